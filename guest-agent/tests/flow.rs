//! The whole guest flow without a VM: the agent's loop runs against one end
//! of a socketpair standing in for the virtio port, and a fake host in the
//! test drives it through the protocol.
//!
//! These tests run the agent command under a dedicated uid (setuid needs
//! root). Under `CI=true` they fail without root; elsewhere they skip with a
//! reason.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use zerolease_guest::agent::{AgentConfig, Outcome, serve};
use zerolease_guest::pending::Pending;
use zerolease_guest::provision::{Layout, paths};
use zerolease_guest::run::{Reaping, live_processes_of};
use zerolease_protocol::{
    CredentialOutcome, FileSpec, FrameReader, FrameWriter, GuestMessage, HostMessage, OutputStream,
    PROTOCOL_VERSION, PlainEnvVar, Provision, ProxySettings, SecretBytes, SecretEnvVar,
    SecretString, WorkspaceSpec,
};

const TRICKY: &str = "ghp_'quote' \"dq\" $(touch /tmp/zl-pwned) `id` $HOME\nline2 \\ end";

fn need_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "this test needs root (it runs the agent under another uid) and CI=true"
    );
    eprintln!("skipping: needs root to run the agent under another uid");
    false
}

struct Guest {
    _dir: tempfile::TempDir,
    layout: Layout,
    uid: u32,
    host_reader: FrameReader<UnixStream>,
    host_writer: FrameWriter<UnixStream>,
    /// The host's end again, for its socket options.
    host_socket: UnixStream,
    agent: std::thread::JoinHandle<Outcome>,
}

/// Starts the agent's loop on a temp root whose `agent` user has `uid`, and
/// does the handshake as the host.
fn start(uid: u32) -> Guest {
    start_with_network(uid, Pending::finished("network", Ok(())))
}

/// [`start`], with the network still coming up (or failed) as `network`
/// says.
fn start_with_network(uid: u32, network: Pending) -> Guest {
    start_with(uid, network, Vec::new())
}

/// [`start_with_network`], with `disk_modules` as the disk's driver files
/// not loaded yet.
fn start_with(uid: u32, network: Pending, disk_modules: Vec<PathBuf>) -> Guest {
    assert_eq!(
        live_processes_of(uid, Path::new("/proc")),
        0,
        "uid {uid} must be unused on this machine"
    );
    let dir = tempfile::tempdir().unwrap();
    // The agent user must be able to reach its home inside the temp root.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    std::fs::create_dir_all(dir.path().join("etc")).unwrap();
    std::fs::write(
        dir.path().join("etc/passwd"),
        format!("root:x:0:0::/root:/bin/sh\nagent:x:{uid}:{uid}::/home/agent:/bin/sh\n"),
    )
    .unwrap();
    let layout = Layout::new(dir.path());
    let (guest_end, host_end) = UnixStream::pair().unwrap();
    let config = AgentConfig {
        layout: layout.clone(),
        proc_root: PathBuf::from("/proc"),
        helper_command: "/init credential".into(),
        credential_timeout: Duration::from_secs(10),
        reaping: Reaping::AgentOnly,
        tty_port: zerolease_guest::tty::lookup_under(dir.path()),
        network,
        disk_modules,
    };
    let agent = std::thread::spawn(move || {
        let reader = guest_end.try_clone().unwrap();
        serve(reader, guest_end, &config).unwrap()
    });
    host_end
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let host_socket = host_end.try_clone().unwrap();
    let mut host_reader = FrameReader::new(host_end.try_clone().unwrap());
    let mut host_writer = FrameWriter::new(host_end);
    let hello: GuestMessage = host_reader.read_message().unwrap();
    assert!(
        matches!(hello, GuestMessage::Hello { protocol_version, .. } if protocol_version == PROTOCOL_VERSION)
    );
    host_writer
        .write_message(&HostMessage::Welcome {
            protocol_version: PROTOCOL_VERSION,
        })
        .unwrap();
    Guest {
        _dir: dir,
        layout,
        uid,
        host_reader,
        host_writer,
        host_socket,
        agent,
    }
}

fn provision(command: &[&str]) -> Provision {
    Provision {
        env: vec![SecretEnvVar {
            name: "TOKEN".into(),
            value: SecretString::new(TRICKY.into()),
        }],
        env_plain: vec![PlainEnvVar {
            name: "LANG".into(),
            value: "C.UTF-8".into(),
        }],
        files: vec![FileSpec {
            path: ".config/tool/token".into(),
            contents: SecretBytes::new(b"file-secret\n".to_vec()),
            mode: 0o600,
        }],
        ca_certs: vec![],
        proxy: ProxySettings {
            http_proxy: Some("http://10.213.0.1:3128".into()),
            https_proxy: Some("http://10.213.0.1:3128".into()),
            no_proxy: vec![],
        },
        git_credential_hosts: vec!["github.com".into(), "gitlab.com".into()],
        command: command.iter().map(|s| (*s).to_owned()).collect(),
        workdir: "/home/agent/work".into(),
        user: "agent".into(),
        workspace: None,
        tty: None,
    }
}

impl Guest {
    fn send(&mut self, message: HostMessage) {
        self.host_writer.write_message(&message).unwrap();
    }

    fn recv(&mut self) -> GuestMessage {
        self.host_reader.read_message().unwrap()
    }

    /// Provisions and checks `Provisioned` then `Started`.
    fn provision(&mut self, command: &[&str]) -> u32 {
        self.send(HostMessage::Provision(Box::new(provision(command))));
        match self.recv() {
            GuestMessage::Provisioned {} => {}
            other => panic!("expected provisioned, got {other:?}"),
        }
        match self.recv() {
            GuestMessage::Started { pid } => pid,
            other => panic!("expected started, got {other:?}"),
        }
    }

    /// Collects stdout until `Exited`, answering nothing else.
    fn output_until_exit(&mut self) -> (Vec<u8>, Option<i32>, Option<i32>) {
        let mut out = Vec::new();
        loop {
            match self.recv() {
                GuestMessage::Output {
                    stream: OutputStream::Stdout,
                    data,
                } => out.extend_from_slice(&data.0),
                GuestMessage::Output { .. } => {}
                GuestMessage::Exited { code, signal } => return (out, code, signal),
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    fn home(&self) -> PathBuf {
        self.layout.host_path("/home/agent")
    }

    /// Runs the credential helper binary as the agent user against this
    /// guest's socket, in a thread.
    fn helper(&self, host: &str) -> std::thread::JoinHandle<std::process::Output> {
        let socket = self.layout.host_path(paths::CREDENTIAL_SOCKET);
        let uid = self.uid;
        let input = format!("protocol=https\nhost={host}\npath=org/repo.git\n\n");
        std::thread::spawn(move || {
            let mut child = Command::new(env!("CARGO_BIN_EXE_zerolease-guest"))
                .arg("credential")
                .arg("--socket")
                .arg(&socket)
                .arg("get")
                .uid(uid)
                .gid(uid)
                .env_clear()
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            child
                .stdin
                .take()
                .unwrap()
                .write_all(input.as_bytes())
                .unwrap();
            child.wait_with_output().unwrap()
        })
    }

    fn finish(mut self) {
        self.send(HostMessage::Shutdown {});
        assert_eq!(self.agent.join().unwrap(), Outcome::Shutdown);
        assert_eq!(live_processes_of(self.uid, Path::new("/proc")), 0);
    }
}

#[test]
fn provision_run_credential_and_exit() {
    if !need_root() {
        return;
    }
    let mut guest = start(61_234);
    // The token comes through byte-exact; a background process outlives
    // the command (Revoke must kill it later).
    let pid = guest.provision(&[
        "sh",
        "-c",
        "printf %s \"$TOKEN\"; sleep 1000 >/dev/null 2>&1 & exit 7",
    ]);
    assert!(pid > 1);
    let (out, code, signal) = guest.output_until_exit();
    assert_eq!(out, TRICKY.as_bytes());
    assert_eq!((code, signal), (Some(7), None));
    assert!(!Path::new("/tmp/zl-pwned").exists());

    // The env file holds the same value, for shells the agent starts.
    let env_file = guest.layout.host_path(paths::ENV_FILE);
    let sourced = Command::new("sh")
        .arg("-c")
        .arg(". \"$1\"; printf %s \"$TOKEN\"")
        .arg("sh")
        .arg(&env_file)
        .env_clear()
        .output()
        .unwrap();
    assert_eq!(sourced.stdout, TRICKY.as_bytes());
    let file = guest.home().join(".config/tool/token");
    assert_eq!(std::fs::read(&file).unwrap(), b"file-secret\n");

    // A credential request from the helper is forwarded with the host's
    // id and answered.
    let granted = guest.helper("github.com");
    let id = match guest.recv() {
        GuestMessage::CredentialRequest {
            id,
            protocol,
            host,
            path,
        } => {
            assert_eq!(
                (protocol.as_str(), host.as_str(), path.as_deref()),
                ("https", "github.com", Some("org/repo.git"))
            );
            id
        }
        other => panic!("expected a credential request, got {other:?}"),
    };
    guest.send(HostMessage::CredentialResponse {
        id,
        outcome: CredentialOutcome::Granted {
            username: "x-access-token".into(),
            password: SecretString::new("ghp_granted".into()),
        },
    });
    let output = granted.join().unwrap();
    assert!(output.status.success(), "{output:?}");
    assert_eq!(
        output.stdout,
        b"username=x-access-token\npassword=ghp_granted\n"
    );

    // Denied: the helper prints nothing and exits 0.
    let denied = guest.helper("gitlab.com");
    let id = match guest.recv() {
        GuestMessage::CredentialRequest { id, .. } => id,
        other => panic!("expected a credential request, got {other:?}"),
    };
    guest.send(HostMessage::CredentialResponse {
        id,
        outcome: CredentialOutcome::Denied {
            reason: "no lease".into(),
        },
    });
    let output = denied.join().unwrap();
    assert!(output.status.success(), "{output:?}");
    assert!(output.stdout.is_empty());

    // A host outside the provisioned list never reaches the host.
    let refused = guest.helper("evil.example").join().unwrap();
    assert!(
        refused.status.success() && refused.stdout.is_empty(),
        "{refused:?}"
    );

    // Rotation: the env file and the file are replaced.
    guest.send(HostMessage::UpdateSecrets {
        env: vec![SecretEnvVar {
            name: "TOKEN".into(),
            value: SecretString::new("rotated".into()),
        }],
        files: vec![FileSpec {
            path: ".config/tool/token".into(),
            contents: SecretBytes::new(b"rotated-file\n".to_vec()),
            mode: 0o600,
        }],
    });
    assert_eq!(guest.recv(), GuestMessage::SecretsUpdated {});
    assert_eq!(std::fs::read(&file).unwrap(), b"rotated-file\n");

    // Revoke: the background process dies, the files go.
    assert_eq!(live_processes_of(guest.uid, Path::new("/proc")), 1);
    guest.send(HostMessage::Revoke { scrub: true });
    assert_eq!(guest.recv(), GuestMessage::Revoked {});
    assert_eq!(live_processes_of(guest.uid, Path::new("/proc")), 0);
    assert!(!env_file.exists());
    assert!(!file.exists());
    // After revocation the socket is gone: the helper prints nothing and
    // says why on stderr; no request reaches the host.
    let late = guest.helper("github.com").join().unwrap();
    assert!(late.stdout.is_empty(), "{late:?}");
    assert!(
        String::from_utf8_lossy(&late.stderr).contains("credential.sock"),
        "{late:?}"
    );

    guest.finish();
}

#[test]
fn revoke_kills_a_running_agent() {
    if !need_root() {
        return;
    }
    let mut guest = start(61_235);
    guest.provision(&[
        "sh",
        "-c",
        "grep -E '^(Uid|Gid|Groups):' /proc/self/status; env | sort; pwd; echo ready; exec sleep 1000",
    ]);
    let mut out = Vec::new();
    while !out.ends_with(b"ready\n") {
        match guest.recv() {
            GuestMessage::Output { data, .. } => out.extend_from_slice(&data.0),
            other => panic!("unexpected {other:?}"),
        }
    }
    let text = String::from_utf8(out).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines.contains(&"Uid:\t61235\t61235\t61235\t61235"),
        "{text}"
    );
    assert!(
        lines.contains(&"Gid:\t61235\t61235\t61235\t61235"),
        "{text}"
    );
    assert!(
        lines.iter().any(|l| l
            .strip_prefix("Groups:")
            .is_some_and(|g| g.trim().is_empty())),
        "{text}"
    );
    // A clean environment: ours (cargo's variables) does not leak in.
    assert!(!text.contains("CARGO"), "{text}");
    assert!(lines.contains(&"HOME=/home/agent"), "{text}");
    assert!(
        lines.contains(&"https_proxy=http://10.213.0.1:3128"),
        "{text}"
    );
    assert!(
        lines.contains(&"SSL_CERT_FILE=/run/zerolease/ca-bundle.crt"),
        "{text}"
    );
    assert!(
        lines.contains(&guest.home().join("work").to_str().unwrap()),
        "{text}"
    );

    guest.send(HostMessage::Revoke { scrub: false });
    let mut revoked = false;
    let mut exited = None;
    while !(revoked && exited.is_some()) {
        match guest.recv() {
            GuestMessage::Revoked {} => revoked = true,
            GuestMessage::Exited { code, signal } => exited = Some((code, signal)),
            GuestMessage::Output { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(exited, Some((None, Some(9))));
    assert!(!guest.layout.host_path(paths::ENV_FILE).exists());
    assert!(!guest.home().join(".config/tool/token").exists());
    guest.finish();
}

#[test]
fn provision_failure_is_reported_and_leaves_nothing() {
    if !need_root() {
        return;
    }
    let mut guest = start(61_236);
    let mut spec = provision(&["definitely-not-a-program-zl"]);
    spec.env_plain[0].name = "HTTPS_PROXY".into();
    guest.send(HostMessage::Provision(Box::new(spec)));
    match guest.recv() {
        GuestMessage::ProvisionFailed { reason } => {
            assert!(reason.contains("HTTPS_PROXY"), "{reason}");
            assert!(!reason.contains("ghp_"), "{reason}");
        }
        other => panic!("unexpected {other:?}"),
    }
    // A command that cannot start: files written for it are removed again.
    guest.send(HostMessage::Provision(Box::new(provision(&[
        "definitely-not-a-program-zl",
    ]))));
    match guest.recv() {
        GuestMessage::ProvisionFailed { reason } => {
            assert!(reason.contains("definitely-not-a-program-zl"), "{reason}");
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(!guest.layout.host_path(paths::ENV_FILE).exists());
    assert!(!guest.home().join(".config/tool/token").exists());
    // The host going away ends the loop.
    let Guest {
        host_reader,
        host_writer,
        host_socket,
        agent,
        ..
    } = guest;
    drop(host_reader);
    drop(host_writer);
    drop(host_socket);
    assert_eq!(agent.join().unwrap(), Outcome::HostGone);
}

#[test]
fn the_command_waits_for_the_network_and_a_failed_network_stops_it() {
    if !need_root() {
        return;
    }
    // The network is still coming up when `Provision` arrives: the files
    // are written, the command waits.
    let (up, gate) = std::sync::mpsc::channel::<()>();
    let network = Pending::spawn("network", move || {
        gate.recv().map_err(|err| err.to_string())
    });
    let mut guest = start_with_network(61_238, network);
    guest.send(HostMessage::Provision(Box::new(provision(&["true"]))));
    guest
        .host_socket
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let early = guest.host_reader.read_message::<GuestMessage>();
    assert!(
        early.is_err(),
        "the agent answered before the network was up: {early:?}"
    );
    assert!(guest.layout.host_path(paths::ENV_FILE).exists());
    assert_eq!(live_processes_of(61_238, Path::new("/proc")), 0);
    guest
        .host_socket
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    up.send(()).unwrap();
    match guest.recv() {
        GuestMessage::Provisioned {} => {}
        other => panic!("expected provisioned, got {other:?}"),
    }
    assert!(matches!(guest.recv(), GuestMessage::Started { .. }));
    let (_, code, _) = guest.output_until_exit();
    assert_eq!(code, Some(0));
    guest.finish();

    // A network that failed: the command never runs, the reason reaches
    // the host, and nothing provisioned is left behind.
    let failed = Pending::finished("network", Err("cannot bring up on interface eth0".into()));
    let mut guest = start_with_network(61_239, failed);
    guest.send(HostMessage::Provision(Box::new(provision(&["true"]))));
    match guest.recv() {
        GuestMessage::ProvisionFailed { reason } => {
            assert_eq!(reason, "network: cannot bring up on interface eth0");
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(!guest.layout.host_path(paths::ENV_FILE).exists());
    assert!(!guest.home().join(".config/tool/token").exists());
    guest.finish();
}

#[test]
fn the_disk_driver_loads_only_for_a_workspace() {
    if !need_root() {
        return;
    }
    // A driver file that cannot load: a session that never touches it
    // runs, one with a workspace (whose disks it drives) fails on it.
    let missing = tempfile::tempdir().unwrap().path().join("virtio_blk.ko");
    let ready = || Pending::finished("network", Ok(()));
    let mut guest = start_with(61_240, ready(), vec![missing.clone()]);
    guest.provision(&["true"]);
    let (_, code, _) = guest.output_until_exit();
    assert_eq!(code, Some(0));
    guest.finish();

    let mut guest = start_with(61_241, ready(), vec![missing.clone()]);
    let mut spec = provision(&["true"]);
    spec.workspace = Some(WorkspaceSpec {
        path: "/home/agent/work".into(),
        base: None,
    });
    guest.send(HostMessage::Provision(Box::new(spec)));
    match guest.recv() {
        GuestMessage::ProvisionFailed { reason } => {
            assert!(reason.starts_with("workspace: "), "{reason}");
            assert!(reason.contains(&missing.display().to_string()), "{reason}");
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(!guest.layout.host_path(paths::ENV_FILE).exists());
    assert!(!guest.home().join(".config/tool/token").exists());
    guest.finish();
}

/// Runs the loop against a host that answers the hello with `answer` and
/// then sends `then` (raw frames); returns the loop's result.
fn handshake_with(
    answer: &[u8],
    then: &[&[u8]],
) -> Result<Outcome, zerolease_guest::agent::AgentError> {
    let dir = tempfile::tempdir().unwrap();
    let (guest_end, host_end) = UnixStream::pair().unwrap();
    let config = AgentConfig {
        layout: Layout::new(dir.path()),
        proc_root: PathBuf::from("/proc"),
        helper_command: "/init credential".into(),
        credential_timeout: Duration::from_secs(1),
        reaping: Reaping::AgentOnly,
        tty_port: zerolease_guest::tty::lookup_under(dir.path()),
        network: Pending::finished("network", Ok(())),
        disk_modules: Vec::new(),
    };
    let agent = std::thread::spawn(move || {
        let reader = guest_end.try_clone().unwrap();
        serve(reader, guest_end, &config)
    });
    let mut host_reader = FrameReader::new(host_end.try_clone().unwrap());
    let mut host_writer = FrameWriter::new(host_end);
    let hello: GuestMessage = host_reader.read_message().unwrap();
    assert_eq!(hello.kind(), "hello");
    host_writer.write_frame(answer).unwrap();
    for frame in then {
        host_writer.write_frame(frame).unwrap();
    }
    // Close the host's side so a loop still reading sees the end.
    drop(host_reader);
    drop(host_writer);
    agent.join().unwrap()
}

#[test]
fn handshake_outcomes() {
    use zerolease_guest::agent::AgentError;
    use zerolease_protocol::HandshakeError;

    let welcome = br#"{"type":"welcome","protocol_version":{"major":1,"minor":3}}"#;
    let shutdown = br#"{"type":"shutdown"}"#;
    assert_eq!(
        handshake_with(welcome, &[shutdown]).unwrap(),
        Outcome::Shutdown
    );
    // A malformed message after the handshake is skipped, not fatal.
    assert_eq!(
        handshake_with(welcome, &[b"{not json", br#"{"type":"nope"}"#, shutdown]).unwrap(),
        Outcome::Shutdown
    );
    // The host going away before anything else.
    assert_eq!(handshake_with(welcome, &[]).unwrap(), Outcome::HostGone);
    // Credential responses for requests never made are ignored.
    assert_eq!(
        handshake_with(
            welcome,
            &[
                br#"{"type":"credential_response","id":9,"outcome":{"result":"denied","reason":"x"}}"#,
                shutdown
            ]
        )
        .unwrap(),
        Outcome::Shutdown
    );
    assert!(matches!(
        handshake_with(br#"{"type":"reject","reason":"go away"}"#, &[]),
        Err(AgentError::Handshake(HandshakeError::Rejected { .. }))
    ));
    assert!(matches!(
        handshake_with(
            br#"{"type":"welcome","protocol_version":{"major":2,"minor":0}}"#,
            &[]
        ),
        Err(AgentError::Handshake(
            HandshakeError::VersionMismatch { .. }
        ))
    ));
    assert!(matches!(
        handshake_with(shutdown, &[]),
        Err(AgentError::Handshake(HandshakeError::Unexpected { .. }))
    ));
    assert!(matches!(
        handshake_with(b"garbage", &[]),
        Err(AgentError::NoWelcome(_))
    ));
}

#[test]
fn an_interactive_agent_runs_on_a_pty_relayed_over_the_tty_port() {
    use nix::sys::termios::{self, SetArg};
    use std::io::Read;
    use std::sync::{Arc, Mutex};
    if !need_root() {
        return;
    }
    let mut guest = start(61_237);
    // The TTY port: a raw pty pair; the guest finds its slave by the port
    // name under the temp root's sysfs, as `/dev/vport9p1`.
    let port = nix::pty::openpty(None, None).unwrap();
    let mut raw = termios::tcgetattr(&port.slave).unwrap();
    termios::cfmakeraw(&mut raw);
    termios::tcsetattr(&port.slave, SetArg::TCSANOW, &raw).unwrap();
    let slave_path = nix::unistd::ttyname(&port.slave).unwrap();
    let root = guest._dir.path().to_owned();
    let class = root.join("sys/class/virtio-ports/vport9p1");
    std::fs::create_dir_all(&class).unwrap();
    std::fs::write(class.join("name"), "org.zerolease.tty\n").unwrap();
    std::fs::create_dir_all(root.join("dev")).unwrap();
    std::os::unix::fs::symlink(&slave_path, root.join("dev/vport9p1")).unwrap();
    let mut host = std::fs::File::from(port.master);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut reader = host.try_clone().unwrap();
    let sink = seen.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1024];
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    });
    let wait_for = |needle: &str| {
        for _ in 0..200 {
            let text = String::from_utf8_lossy(&seen.lock().unwrap()).into_owned();
            if text.contains(needle) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "no {needle:?} on the tty port; it shows:\n{}",
            String::from_utf8_lossy(&seen.lock().unwrap())
        );
    };

    let mut spec = provision(&[
        "sh",
        "-c",
        "tty; test -t 0 && echo T$((6*7))T; stty size; echo TERM=$TERM.; \
         read x; stty size; echo got-$x; exit 3",
    ]);
    spec.tty = Some(zerolease_protocol::TtySpec {
        rows: 30,
        cols: 90,
        term: "vt100".into(),
    });
    guest.send(HostMessage::Provision(Box::new(spec)));
    assert!(matches!(guest.recv(), GuestMessage::Provisioned {}));
    assert!(matches!(guest.recv(), GuestMessage::Started { .. }));
    wait_for("/dev/pts/");
    wait_for("T42T");
    wait_for("30 90");
    wait_for("TERM=vt100.");

    guest.send(HostMessage::Resize {
        rows: 50,
        cols: 132,
    });
    std::thread::sleep(Duration::from_millis(300));
    host.write_all(b"hello\r").unwrap();
    wait_for("got-hello");
    wait_for("50 132");
    // Nothing came as `Output`: the terminal has its own port.
    match guest.recv() {
        GuestMessage::Exited { code, signal } => assert_eq!((code, signal), (Some(3), None)),
        other => panic!("expected exited, got {other:?}"),
    }
    guest.finish();
}
