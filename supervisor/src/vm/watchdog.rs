//! Choosing the accelerator, and the boot watchdog that falls back from KVM
//! to TCG.
//!
//! On nested hosts `/dev/kvm` can exist and open while a guest under it
//! never gets anywhere. The only reliable sign of a working boot is the
//! guest agent's `Hello` on the control channel, so the boot loop waits for
//! it with a bound and, under `auto`, tries TCG when KVM stays silent.
//!
//! The loop ([`boot_with_fallback`]) is generic over a [`Booter`], so the
//! fallback logic is tested without QEMU; [`QemuBooter`] is the real one.

use std::fmt;
use std::io::{self, Cursor};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use zerolease_protocol::{
    FrameReader, GuestMessage, HandshakeError, HostMessage, MAX_FRAME_LEN, PROTOCOL_VERSION,
    ProtocolVersion, ReadError, WriteError, accept_hello, answer_hello, encode_frame,
};

use super::argv::{AccelKind, VmSpec};
use super::process::{SpawnError, Vm};
use super::qmp::{QmpError, VmEvent};

/// The accelerator the user asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// KVM when `/dev/kvm` is usable and the guest says hello under it,
    /// TCG otherwise.
    #[default]
    Auto,
    Kvm,
    Tcg,
}

impl std::str::FromStr for Accel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "kvm" => Ok(Self::Kvm),
            "tcg" => Ok(Self::Tcg),
            other => Err(format!(
                "unknown accelerator `{other}`; use auto, kvm or tcg"
            )),
        }
    }
}

/// The accelerators to try, in order. Pure: `kvm_usable` is whether
/// `/dev/kvm` opens read-write ([`kvm_usable`]).
pub fn accel_attempts(accel: Accel, kvm_usable: bool) -> Vec<AccelKind> {
    match (accel, kvm_usable) {
        (Accel::Auto, true) => vec![AccelKind::Kvm, AccelKind::Tcg],
        (Accel::Auto, false) => vec![AccelKind::Tcg],
        // An explicit choice is tried as asked; QEMU reports a missing KVM.
        (Accel::Kvm, _) => vec![AccelKind::Kvm],
        (Accel::Tcg, _) => vec![AccelKind::Tcg],
    }
}

/// Whether `/dev/kvm` opens read-write for this process.
pub fn kvm_usable() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// The guest's greeting, answered with `Welcome`; the channel stays open for
/// provisioning.
#[derive(Debug)]
pub struct Hello {
    pub channel: UnixStream,
    pub guest_protocol: ProtocolVersion,
    pub agent_version: String,
}

/// Why waiting for the guest's hello failed (other than running out of
/// time, which the caller's bound decides).
#[derive(Debug, thiserror::Error)]
pub enum HelloError {
    #[error("cannot connect to the control socket {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the control channel failed before the guest said hello")]
    Io(#[source] io::Error),
    #[error("the guest sent a frame of {len} bytes, over the limit of {MAX_FRAME_LEN}")]
    TooLarge { len: u32 },
    #[error("the guest's first message is not valid")]
    Read(#[source] ReadError),
    #[error("the guest's hello was refused")]
    Handshake(#[source] HandshakeError),
    #[error("cannot answer the guest's hello")]
    Answer(#[source] WriteError),
    #[error("QEMU exited before the guest said hello ({0:?})")]
    QemuExited(VmEvent),
}

impl HelloError {
    /// Whether another accelerator might do better: the guest stayed silent
    /// or QEMU died (KVM refusing to start, for instance). A guest that
    /// spoke nonsense will speak it under TCG too.
    fn worth_a_fallback(&self) -> bool {
        matches!(self, Self::QemuExited(_) | Self::Connect { .. })
    }
}

/// Waits until the guest agent says hello on the control channel at `path`
/// (QEMU is the server; this connects as a client, retrying while QEMU has
/// not created the socket), checks the version and answers. Unbounded: the
/// caller puts a timeout around it.
pub async fn wait_for_hello(path: &Path) -> Result<Hello, HelloError> {
    let mut channel = loop {
        match UnixStream::connect(path).await {
            Ok(stream) => break stream,
            Err(err)
                if matches!(
                    err.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                ) =>
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(source) => {
                return Err(HelloError::Connect {
                    path: path.to_owned(),
                    source,
                });
            }
        }
    };
    let mut header = [0u8; 4];
    channel
        .read_exact(&mut header)
        .await
        .map_err(HelloError::Io)?;
    let len = u32::from_be_bytes(header);
    if usize::try_from(len).map_or(true, |len| len > MAX_FRAME_LEN) {
        return Err(HelloError::TooLarge { len });
    }
    // Bounded above; the protocol crate re-checks the frame and decodes it.
    let mut frame = zeroize::Zeroizing::new(vec![0u8; 4 + len as usize]);
    frame[..4].copy_from_slice(&header);
    channel
        .read_exact(&mut frame[4..])
        .await
        .map_err(HelloError::Io)?;
    let first: GuestMessage = FrameReader::new(Cursor::new(&frame[..]))
        .read_message()
        .map_err(HelloError::Read)?;

    let answer: HostMessage = answer_hello(PROTOCOL_VERSION, &first);
    let out = encode_frame(&answer).map_err(HelloError::Answer)?;
    channel.write_all(&out).await.map_err(HelloError::Io)?;
    let guest_protocol = accept_hello(PROTOCOL_VERSION, &first).map_err(HelloError::Handshake)?;
    let GuestMessage::Hello { agent_version, .. } = first else {
        // accept_hello refused anything else above.
        return Err(HelloError::Handshake(HandshakeError::Unexpected {
            expected: "hello",
            got: first.kind(),
        }));
    };
    Ok(Hello {
        channel,
        guest_protocol,
        agent_version,
    })
}

/// Why the VM could not be booted.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("nothing to try: the accelerator list is empty")]
    NoAttempts,
    #[error("cannot start QEMU under {}", upper(*accel))]
    Start {
        accel: AccelKind,
        #[source]
        source: StartError,
    },
    #[error(
        "the guest did not say hello within {} under {}; see the console log at {}",
        humantime::format_duration(*bound),
        upper(*accel),
        console_log.display()
    )]
    NoHello {
        bound: Duration,
        accel: AccelKind,
        console_log: PathBuf,
    },
    #[error(
        "the guest's hello failed under {}; see the console log at {}",
        upper(*accel),
        console_log.display()
    )]
    Hello {
        accel: AccelKind,
        console_log: PathBuf,
        #[source]
        source: HelloError,
    },
}

/// Why one start failed.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("spawning QEMU failed")]
    Spawn(#[from] SpawnError),
    #[error("QEMU's monitor did not come up")]
    Qmp(#[from] QmpError),
    #[error("cannot duplicate the tap descriptor for another attempt")]
    Tap(#[source] io::Error),
}

fn upper(accel: AccelKind) -> impl fmt::Display {
    accel.as_str().to_ascii_uppercase()
}

/// Starts and stops VMs for [`boot_with_fallback`]; injectable so the
/// fallback logic is tested without QEMU.
pub trait Booter {
    type Vm;
    /// Starts a VM under `accel`.
    fn start(&mut self, accel: AccelKind) -> impl Future<Output = Result<Self::Vm, StartError>>;
    /// Waits (unbounded; the loop bounds it) for the guest's hello.
    fn wait_hello(&mut self, vm: &mut Self::Vm) -> impl Future<Output = Result<Hello, HelloError>>;
    /// Tears down a VM that did not make it. Must not leave a process.
    fn discard(&mut self, vm: Self::Vm) -> impl Future<Output = ()>;
    /// Where that VM's console log is, for the error message.
    fn console_log(&self, vm: &Self::Vm) -> PathBuf;
}

/// A VM that said hello.
#[derive(Debug)]
pub struct Booted<V> {
    pub vm: V,
    pub hello: Hello,
    pub accel: AccelKind,
}

/// Tries each accelerator of `attempts` in turn; each gets `bound` to say
/// hello. Falls back to the next one when the guest stays silent or QEMU
/// dies; fails at once when the guest says something wrong. The last
/// failure is returned.
pub async fn boot_with_fallback<B: Booter>(
    booter: &mut B,
    attempts: &[AccelKind],
    bound: Duration,
) -> Result<Booted<B::Vm>, BootError> {
    let mut last = BootError::NoAttempts;
    for (i, &accel) in attempts.iter().enumerate() {
        let is_last = i + 1 == attempts.len();
        let mut vm = match booter.start(accel).await {
            Ok(vm) => vm,
            Err(source) => {
                last = BootError::Start { accel, source };
                if is_last {
                    break;
                }
                tracing::warn!(%accel, error = %last, "falling back to the next accelerator");
                continue;
            }
        };
        let console_log = booter.console_log(&vm);
        let outcome = tokio::time::timeout(bound, booter.wait_hello(&mut vm)).await;
        match outcome {
            Ok(Ok(hello)) => return Ok(Booted { vm, hello, accel }),
            Ok(Err(source)) => {
                let fall_back = source.worth_a_fallback();
                booter.discard(vm).await;
                last = BootError::Hello {
                    accel,
                    console_log,
                    source,
                };
                if !fall_back {
                    return Err(last);
                }
            }
            Err(_) => {
                booter.discard(vm).await;
                last = BootError::NoHello {
                    bound,
                    accel,
                    console_log,
                };
            }
        }
        if !is_last {
            tracing::warn!(%accel, error = %last, "falling back to the next accelerator");
        }
    }
    Err(last)
}

/// Boots `spec` with the accelerators `accel` allows on this host, waiting
/// up to `hello_bound` for the hello under each. What the session calls.
pub async fn boot(
    qemu: PathBuf,
    spec: VmSpec,
    tap: Option<OwnedFd>,
    accel: Accel,
    hello_bound: Duration,
) -> Result<Booted<Vm>, BootError> {
    let attempts = accel_attempts(accel, kvm_usable());
    let mut booter = QemuBooter {
        qemu,
        spec,
        tap,
        qmp_bound: Duration::from_secs(10),
        discard_grace: Duration::from_secs(2),
    };
    boot_with_fallback(&mut booter, &attempts, hello_bound).await
}

/// The real [`Booter`]: spawns QEMU from a spec (its `accel` is replaced per
/// attempt), connects QMP, and waits for the hello on the control socket
/// while watching for QEMU's exit.
#[derive(Debug)]
pub struct QemuBooter {
    pub qemu: PathBuf,
    pub spec: VmSpec,
    /// The tap; each attempt gets a duplicate.
    pub tap: Option<OwnedFd>,
    /// Bound on QEMU creating its QMP socket.
    pub qmp_bound: Duration,
    /// Grace for a discarded attempt before SIGKILL.
    pub discard_grace: Duration,
}

impl Booter for QemuBooter {
    type Vm = Vm;

    async fn start(&mut self, accel: AccelKind) -> Result<Vm, StartError> {
        let mut spec = self.spec.clone();
        spec.accel = accel;
        let tap = self
            .tap
            .as_ref()
            .map(OwnedFd::try_clone)
            .transpose()
            .map_err(StartError::Tap)?;
        let mut vm = Vm::spawn(&self.qemu, &spec, tap)?;
        if let Err(err) = vm.connect_qmp(self.qmp_bound).await {
            let _ = vm.kill().await;
            return Err(err.into());
        }
        Ok(vm)
    }

    async fn wait_hello(&mut self, vm: &mut Vm) -> Result<Hello, HelloError> {
        let control = vm.control_socket();
        let hello = wait_for_hello(&control);
        tokio::pin!(hello);
        loop {
            tokio::select! {
                result = &mut hello => return result,
                event = vm.next_event() => {
                    if matches!(event, VmEvent::Exited { .. }) {
                        return Err(HelloError::QemuExited(event));
                    }
                    tracing::debug!(?event, "VM event while waiting for hello");
                }
            }
        }
    }

    async fn discard(&mut self, mut vm: Vm) {
        if let Err(err) = vm.destroy(self.discard_grace).await {
            tracing::error!(error = %err, pid = vm.pid(), "cannot stop a failed boot attempt");
        }
    }

    fn console_log(&self, vm: &Vm) -> PathBuf {
        vm.console_log()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use zerolease_protocol::FrameWriter;

    #[test]
    fn accel_parses() {
        assert_eq!("auto".parse(), Ok(Accel::Auto));
        assert_eq!("kvm".parse(), Ok(Accel::Kvm));
        assert_eq!("tcg".parse(), Ok(Accel::Tcg));
        for bad in ["", "KVM", "hvf", "tcg "] {
            assert!(bad.parse::<Accel>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn attempts_table() {
        use AccelKind::{Kvm, Tcg};
        let cases = [
            (Accel::Auto, true, vec![Kvm, Tcg]),
            (Accel::Auto, false, vec![Tcg]),
            (Accel::Kvm, true, vec![Kvm]),
            (Accel::Kvm, false, vec![Kvm]),
            (Accel::Tcg, true, vec![Tcg]),
            (Accel::Tcg, false, vec![Tcg]),
        ];
        for (accel, kvm, want) in cases {
            assert_eq!(accel_attempts(accel, kvm), want, "{accel:?} kvm={kvm}");
        }
    }

    /// What a fake attempt does.
    #[derive(Debug)]
    enum Script {
        /// Start fails.
        StartFails,
        /// Never says hello.
        Silent,
        /// QEMU exits.
        Exits,
        /// Says something that is not a hello.
        Garbage,
        /// Says hello.
        Hello,
    }

    struct FakeBooter {
        scripts: VecDeque<Script>,
        started: Vec<AccelKind>,
        discarded: Vec<AccelKind>,
    }

    impl FakeBooter {
        fn new(scripts: Vec<Script>) -> Self {
            Self {
                scripts: scripts.into(),
                started: Vec::new(),
                discarded: Vec::new(),
            }
        }
    }

    #[derive(Debug)]
    struct FakeVm {
        accel: AccelKind,
        script: Script,
    }

    impl Booter for FakeBooter {
        type Vm = FakeVm;

        async fn start(&mut self, accel: AccelKind) -> Result<FakeVm, StartError> {
            self.started.push(accel);
            let script = self.scripts.pop_front().expect("a script per attempt");
            if matches!(script, Script::StartFails) {
                return Err(StartError::Tap(io::Error::other("fake")));
            }
            Ok(FakeVm { accel, script })
        }

        async fn wait_hello(&mut self, vm: &mut FakeVm) -> Result<Hello, HelloError> {
            match vm.script {
                Script::Silent => std::future::pending().await,
                Script::Exits => Err(HelloError::QemuExited(VmEvent::Exited {
                    code: Some(1),
                    signal: None,
                })),
                Script::Garbage => Err(HelloError::Handshake(HandshakeError::Unexpected {
                    expected: "hello",
                    got: "started",
                })),
                Script::Hello => {
                    let (channel, _peer) = UnixStream::pair().unwrap();
                    Ok(Hello {
                        channel,
                        guest_protocol: PROTOCOL_VERSION,
                        agent_version: "fake".into(),
                    })
                }
                Script::StartFails => unreachable!("never started"),
            }
        }

        async fn discard(&mut self, vm: FakeVm) {
            self.discarded.push(vm.accel);
        }

        fn console_log(&self, vm: &FakeVm) -> PathBuf {
            format!("/run/zl/x/console-{}.log", vm.accel).into()
        }
    }

    const BOUND: Duration = Duration::from_secs(20);
    use AccelKind::{Kvm, Tcg};

    #[tokio::test(start_paused = true)]
    async fn silent_kvm_falls_back_to_tcg() {
        let mut booter = FakeBooter::new(vec![Script::Silent, Script::Hello]);
        let booted = boot_with_fallback(&mut booter, &[Kvm, Tcg], BOUND)
            .await
            .unwrap();
        assert_eq!(booted.accel, Tcg);
        assert_eq!(booter.started, [Kvm, Tcg]);
        assert_eq!(booter.discarded, [Kvm]);
    }

    #[tokio::test(start_paused = true)]
    async fn kvm_that_says_hello_is_kept() {
        let mut booter = FakeBooter::new(vec![Script::Hello]);
        let booted = boot_with_fallback(&mut booter, &[Kvm, Tcg], BOUND)
            .await
            .unwrap();
        assert_eq!(booted.accel, Kvm);
        assert!(booter.discarded.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn qemu_dying_under_kvm_falls_back() {
        for first in [Script::Exits, Script::StartFails] {
            let mut booter = FakeBooter::new(vec![first, Script::Hello]);
            let booted = boot_with_fallback(&mut booter, &[Kvm, Tcg], BOUND)
                .await
                .unwrap();
            assert_eq!(booted.accel, Tcg);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn silent_everywhere_fails_with_the_clear_message() {
        let mut booter = FakeBooter::new(vec![Script::Silent, Script::Silent]);
        let started = tokio::time::Instant::now();
        let err = boot_with_fallback(&mut booter, &[Kvm, Tcg], BOUND)
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "the guest did not say hello within 20s under TCG; \
             see the console log at /run/zl/x/console-tcg.log"
        );
        assert_eq!(booter.discarded, [Kvm, Tcg]);
        // Each attempt got exactly its bound (time is virtual here).
        assert_eq!(started.elapsed(), BOUND * 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_wrong_greeting_does_not_fall_back() {
        let mut booter = FakeBooter::new(vec![Script::Garbage, Script::Hello]);
        let err = boot_with_fallback(&mut booter, &[Kvm, Tcg], BOUND)
            .await
            .unwrap_err();
        assert!(matches!(err, BootError::Hello { accel: Kvm, .. }), "{err}");
        assert_eq!(booter.started, [Kvm]);
        assert_eq!(booter.discarded, [Kvm]);
    }

    #[tokio::test(start_paused = true)]
    async fn failing_last_start_is_reported() {
        let mut booter = FakeBooter::new(vec![Script::StartFails]);
        let err = boot_with_fallback(&mut booter, &[Tcg], BOUND)
            .await
            .unwrap_err();
        assert!(
            err.to_string().starts_with("cannot start QEMU under TCG"),
            "{err}"
        );
        let mut booter = FakeBooter::new(vec![]);
        let err = boot_with_fallback(&mut booter, &[], BOUND)
            .await
            .unwrap_err();
        assert!(matches!(err, BootError::NoAttempts));
    }

    /// The real hello wait against a fake guest on a socket.
    #[tokio::test]
    async fn wait_for_hello_reads_and_answers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let guest = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut out = Vec::new();
            FrameWriter::new(&mut out)
                .write_message(&GuestMessage::Hello {
                    protocol_version: PROTOCOL_VERSION,
                    agent_version: "test-agent".into(),
                })
                .unwrap();
            stream.write_all(&out).await.unwrap();
            let mut header = [0u8; 4];
            stream.read_exact(&mut header).await.unwrap();
            let mut payload = vec![0u8; u32::from_be_bytes(header) as usize];
            stream.read_exact(&mut payload).await.unwrap();
            let mut frame = header.to_vec();
            frame.extend(payload);
            FrameReader::new(Cursor::new(frame))
                .read_message::<HostMessage>()
                .unwrap()
        });
        let hello = wait_for_hello(&path).await.unwrap();
        assert_eq!(hello.agent_version, "test-agent");
        assert_eq!(hello.guest_protocol, PROTOCOL_VERSION);
        let answer = guest.await.unwrap();
        assert!(matches!(answer, HostMessage::Welcome { .. }), "{answer:?}");
    }

    #[tokio::test]
    async fn wait_for_hello_refuses_bad_first_frames() {
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("oversized", (u32::MAX).to_be_bytes().to_vec()),
            ("not json", {
                let mut v = 5u32.to_be_bytes().to_vec();
                v.extend(b"hello");
                v
            }),
            ("wrong major", {
                let mut out = Vec::new();
                FrameWriter::new(&mut out)
                    .write_message(&GuestMessage::Hello {
                        protocol_version: ProtocolVersion {
                            major: PROTOCOL_VERSION.major + 1,
                            minor: 0,
                        },
                        agent_version: "x".into(),
                    })
                    .unwrap();
                out
            }),
            ("not a hello first", {
                let mut out = Vec::new();
                FrameWriter::new(&mut out)
                    .write_message(&GuestMessage::Started { pid: 1 })
                    .unwrap();
                out
            }),
            ("truncated", vec![0, 0, 0, 10, b'{']),
        ];
        for (what, bytes) in cases {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("control.sock");
            let listener = tokio::net::UnixListener::bind(&path).unwrap();
            let guest = tokio::spawn(async move {
                let (mut stream, _) = listener.accept().await.unwrap();
                stream.write_all(&bytes).await.unwrap();
                drop(stream.shutdown().await);
                // Keep reading so an answer does not fail on a closed peer.
                let mut sink = Vec::new();
                let _ = stream.read_to_end(&mut sink).await;
            });
            let err = wait_for_hello(&path).await.unwrap_err();
            assert!(!err.worth_a_fallback(), "{what}: {err}");
            guest.await.unwrap();
        }
    }
}
