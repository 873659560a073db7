//! The QEMU process: spawning it, owning it, and reaping leftovers.
//!
//! **Architecture Invariants:**
//! - *Clean environment.* QEMU starts with `env_clear()` and only `LC_ALL=C`;
//!   no variable of the supervisor (`ZEROLEASE_MASTER_KEY`, tokens, …) can
//!   reach it. Its argv carries no secret either (see [`super::argv`]).
//! - *No allocation between fork and exec.* The tap descriptor is moved to
//!   its fixed number in the child by a `pre_exec` hook that calls only
//!   `dup2`/`fcntl`, which are async-signal-safe.
//! - *Never kill a stranger.* A [`Vm`] rebuilt from a [`VmRecord`] signals
//!   its pid only through a pidfd, and only after checking that
//!   `/proc/<pid>/cmdline` carries the session's `-name` marker, so a pid the
//!   kernel reused for another process is never killed.
//! - *Never leave a process.* `kill` is idempotent and waits for the process
//!   to be gone; `destroy` asks nicely through QMP, then SIGKILLs; `Drop`
//!   kills as a last resort.
//!
//! QEMU runs in its own process group so a Ctrl-C at the terminal reaches
//! the supervisor only, which then tears the session down in order.

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::libc;
use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;
use tokio::process::{Child, Command};

use super::argv::{self, ArgvError, VmSpec};
use super::qmp::{Qmp, QmpError, VmEvent};
use crate::jail::JailId;

/// How long `kill` waits for a SIGKILLed process to be gone.
const KILL_WAIT: Duration = Duration::from_secs(10);

/// What a restarted supervisor needs to find a QEMU again. Persisted by the
/// session layer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    pub session: JailId,
    pub pid: u32,
    pub runtime_dir: PathBuf,
}

/// Why QEMU could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("the VM spec is invalid")]
    Argv(#[from] ArgvError),
    #[error(
        "the VM spec and the tap disagree: a spec with a network needs a tap \
         descriptor and one without needs none"
    )]
    TapMismatch,
    #[error("cannot create QEMU's log file {path}")]
    Log {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot start {program}; install qemu-system-x86 (scripts/setup does)")]
    Spawn {
        program: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "the runtime directory {path} is not private (mode {mode:o}, owner uid {uid}); \
         QEMU's control and QMP sockets must be reachable by this user only — \
         use a directory of mode 0700 owned by uid {me}"
    )]
    RuntimeDirNotPrivate {
        path: PathBuf,
        mode: u32,
        uid: u32,
        me: u32,
    },
    #[error("cannot inspect the runtime directory {path}")]
    RuntimeDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot find `{0}` on PATH; install qemu-system-x86 (scripts/setup does)")]
    NotFound(String),
}

/// Why controlling or stopping a QEMU failed.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error(
        "process {pid} does not carry the marker `{marker}` (its pid was probably \
         reused); it was left alone"
    )]
    NotOurs { pid: u32, marker: String },
    #[error("cannot inspect process {pid}")]
    Proc {
        pid: u32,
        #[source]
        source: io::Error,
    },
    #[error("cannot signal QEMU (pid {pid})")]
    Signal {
        pid: u32,
        #[source]
        source: io::Error,
    },
    #[error("QEMU (pid {pid}) was still there {waited:?} after SIGKILL")]
    Unkillable { pid: u32, waited: Duration },
    #[error("cannot wait for QEMU (pid {pid})")]
    Wait {
        pid: u32,
        #[source]
        source: io::Error,
    },
    #[error("cannot scan /proc for leftover QEMU processes")]
    Scan(#[source] io::Error),
}

/// How a `destroy` ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stopped {
    /// QEMU was already gone.
    AlreadyGone,
    /// QEMU exited on its own after the QMP request, within the grace.
    Exited,
    /// The grace ran out (or QMP was unusable) and QEMU was SIGKILLed.
    Killed,
}

/// How `shutdown` asks QEMU to stop before the grace runs out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopRequest {
    /// `quit`: QEMU exits at once without asking the guest.
    Quit,
    /// `system_powerdown`: ACPI power button; the guest may ignore it.
    Powerdown,
}

/// A QEMU process of one session. Owned (spawned by us) or adopted (rebuilt
/// from a record to be reaped).
#[derive(Debug)]
pub struct Vm {
    session: JailId,
    pid: u32,
    runtime_dir: PathBuf,
    console_log: PathBuf,
    child: Option<Child>,
    qmp: Option<Qmp>,
    exit: Option<ExitStatus>,
    gone: bool,
}

/// Finds the QEMU binary for x86-64 guests on PATH.
pub fn find_qemu() -> Result<PathBuf, SpawnError> {
    find_on_path("qemu-system-x86_64")
}

/// Finds `qemu-img` on PATH.
pub fn find_qemu_img() -> Result<PathBuf, SpawnError> {
    find_on_path("qemu-img")
}

pub(crate) fn find_on_path(program: &str) -> Result<PathBuf, SpawnError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/bin".into(), "/usr/local/bin".into()])
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| SpawnError::NotFound(program.to_owned()))
}

impl Vm {
    /// Starts QEMU for `spec`. `tap` (required iff `spec.net` is set) is
    /// handed to QEMU at descriptor number `spec.net.fd`. QEMU's stdout and
    /// stderr go to `qemu.log` in the runtime directory, which must exist.
    /// Call inside a tokio runtime.
    pub fn spawn(qemu: &Path, spec: &VmSpec, tap: Option<OwnedFd>) -> Result<Vm, SpawnError> {
        let args = argv::build_argv(spec)?;
        let fds = match (&spec.net, tap) {
            (Some(net), Some(tap)) => vec![(tap, net.fd)],
            (None, None) => Vec::new(),
            _ => return Err(SpawnError::TapMismatch),
        };
        if let Some(path) = &spec.console_log {
            // Created here, private: QEMU would create it with its umask.
            OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(path)
                .map_err(|source| SpawnError::Log {
                    path: path.clone(),
                    source,
                })?;
        }
        let mut vm = spawn_qemu(qemu, args, &spec.session, &spec.runtime_dir, fds)?;
        if let Some(path) = &spec.console_log {
            vm.console_log = path.clone();
        }
        Ok(vm)
    }

    /// Rebuilds the handle of a leftover QEMU from its record, to reap it.
    /// Fails with [`VmError::NotOurs`] — and never signals — when the pid now
    /// belongs to a process without the session's marker. A pid that is gone
    /// gives a handle whose `kill` is a no-op.
    pub fn for_existing(record: VmRecord) -> Result<Vm, VmError> {
        let gone = match read_cmdline(record.pid)? {
            None => true,
            Some(cmdline) => {
                if parse_marker(&cmdline).as_ref() != Some(&record.session) {
                    return Err(VmError::NotOurs {
                        pid: record.pid,
                        marker: argv::marker(&record.session),
                    });
                }
                false
            }
        };
        Ok(Vm {
            session: record.session,
            pid: record.pid,
            console_log: record.runtime_dir.join(argv::CONSOLE_LOG),
            runtime_dir: record.runtime_dir,
            child: None,
            qmp: None,
            exit: None,
            gone,
        })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn session(&self) -> &JailId {
        &self.session
    }

    /// What to persist so a restarted supervisor can reap this QEMU.
    pub fn record(&self) -> VmRecord {
        VmRecord {
            session: self.session.clone(),
            pid: self.pid,
            runtime_dir: self.runtime_dir.clone(),
        }
    }

    pub fn runtime_dir(&self) -> &Path {
        &self.runtime_dir
    }

    /// The guest's serial console log.
    pub fn console_log(&self) -> PathBuf {
        self.console_log.clone()
    }

    /// QEMU's own stdout/stderr.
    pub fn qemu_log(&self) -> PathBuf {
        self.runtime_dir.join(argv::QEMU_LOG)
    }

    /// The host end of the control channel (QEMU is the server).
    pub fn control_socket(&self) -> PathBuf {
        self.runtime_dir.join(argv::CONTROL_SOCKET)
    }

    /// The host end of the TTY stream.
    pub fn tty_socket(&self) -> PathBuf {
        self.runtime_dir.join(argv::TTY_SOCKET)
    }

    pub fn qmp_socket(&self) -> PathBuf {
        self.runtime_dir.join(argv::QMP_SOCKET)
    }

    /// Connects to QEMU's QMP socket (retrying for up to `bound` while QEMU
    /// creates it) and negotiates capabilities. Events are then available
    /// from [`Vm::next_event`].
    pub async fn connect_qmp(&mut self, bound: Duration) -> Result<&Qmp, QmpError> {
        let path = self.qmp_socket();
        let connect = Qmp::connect(&path, bound);
        let outcome = match self.child.as_mut() {
            // Stop waiting as soon as QEMU dies (a refused accelerator, a bad
            // option): its log says why.
            Some(child) => tokio::select! {
                qmp = connect => Ok(qmp),
                status = child.wait() => Err(status),
            },
            None => Ok(connect.await),
        };
        match outcome {
            Ok(qmp) => Ok(self.qmp.insert(qmp?)),
            Err(status) => {
                self.note_exit(status);
                Err(QmpError::QemuExited {
                    event: self.exit.map_or(
                        VmEvent::Exited {
                            code: None,
                            signal: None,
                        },
                        VmEvent::exited,
                    ),
                    log: self.qemu_log(),
                })
            }
        }
    }

    /// The QMP connection, once [`Vm::connect_qmp`] succeeded.
    pub fn qmp(&self) -> Option<&Qmp> {
        self.qmp.as_ref()
    }

    /// The next thing that happened to the VM: a QMP event, or
    /// [`VmEvent::Exited`] once QEMU is gone (then again on every call).
    pub async fn next_event(&mut self) -> VmEvent {
        loop {
            if self.gone {
                return self.exit.map_or(
                    VmEvent::Exited {
                        code: None,
                        signal: None,
                    },
                    VmEvent::exited,
                );
            }
            let Some(child) = self.child.as_mut() else {
                // Adopted processes have no event stream worth reading.
                return VmEvent::Exited {
                    code: None,
                    signal: None,
                };
            };
            let event = match self.qmp.as_mut() {
                Some(qmp) => tokio::select! {
                    biased;
                    event = qmp.next_event() => event,
                    status = child.wait() => {
                        self.note_exit(status);
                        None
                    }
                },
                None => {
                    let status = child.wait().await;
                    self.note_exit(status);
                    None
                }
            };
            match event {
                Some(event) => return event,
                // QMP closed: QEMU is exiting; the next turn waits for it.
                None if !self.gone => self.qmp = None,
                None => {}
            }
        }
    }

    fn note_exit(&mut self, status: io::Result<ExitStatus>) {
        // A wait error means the child is no longer ours to wait for; treat
        // it as gone with an unknown status.
        self.exit = status.ok();
        self.gone = true;
    }

    /// Whether QEMU is known to be gone.
    pub fn is_gone(&mut self) -> bool {
        if !self.gone
            && let Some(child) = self.child.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            self.exit = Some(status);
            self.gone = true;
        }
        self.gone
    }

    /// The exit status, once an owned QEMU has been waited for.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        self.exit
    }

    /// SIGKILLs QEMU and waits until it is gone. Idempotent.
    pub async fn kill(&mut self) -> Result<(), VmError> {
        self.qmp = None;
        if self.is_gone() {
            return Ok(());
        }
        let pid = self.pid;
        if let Some(child) = self.child.as_mut() {
            // Our own unreaped child: its pid cannot have been reused.
            if let Err(source) = child.start_kill()
                && child.try_wait().ok().flatten().is_none()
            {
                return Err(VmError::Signal { pid, source });
            }
            let status = tokio::time::timeout(KILL_WAIT, child.wait())
                .await
                .map_err(|_| VmError::Unkillable {
                    pid,
                    waited: KILL_WAIT,
                })?
                .map_err(|source| VmError::Wait { pid, source })?;
            self.exit = Some(status);
        } else {
            kill_adopted(&self.session, pid).await?;
        }
        self.gone = true;
        Ok(())
    }

    /// Stops QEMU for good: `quit` through QMP, wait up to `grace` for it
    /// to exit, then SIGKILL. Never leaves a process behind.
    pub async fn destroy(&mut self, grace: Duration) -> Result<Stopped, VmError> {
        self.shutdown(StopRequest::Quit, grace).await
    }

    /// Like [`Vm::destroy`] with a choice of request. `Powerdown` lets the
    /// guest shut down cleanly if it cooperates within `grace`.
    pub async fn shutdown(
        &mut self,
        request: StopRequest,
        grace: Duration,
    ) -> Result<Stopped, VmError> {
        if self.is_gone() {
            self.qmp = None;
            return Ok(Stopped::AlreadyGone);
        }
        let deadline = tokio::time::Instant::now() + grace;
        if let (Some(qmp), Some(child)) = (self.qmp.as_ref(), self.child.as_mut()) {
            let asked = async {
                // A failed request (QEMU closing the socket while answering,
                // a wedged monitor) is not an error here: the wait below and
                // the SIGKILL after it decide.
                let _ = match request {
                    StopRequest::Quit => qmp.quit().await,
                    StopRequest::Powerdown => qmp.system_powerdown().await,
                };
                child.wait().await
            };
            if let Ok(status) = tokio::time::timeout_at(deadline, asked).await {
                self.qmp = None;
                self.note_exit(status);
                return Ok(Stopped::Exited);
            }
        }
        self.kill().await?;
        Ok(Stopped::Killed)
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if self.gone {
            return;
        }
        match self.child.as_mut() {
            // `kill_on_drop` is set as well; this makes the intent explicit
            // and tokio reaps the zombie in the background.
            Some(child) => {
                let _ = child.start_kill();
            }
            None => {
                if let Ok(pidfd) = pidfd_open(self.pid)
                    && let Ok(Some(cmdline)) = read_cmdline(self.pid)
                    && parse_marker(&cmdline).as_ref() == Some(&self.session)
                {
                    let _ = pidfd_kill(&pidfd);
                }
            }
        }
    }
}

/// Starts `program` with `args`, a clean environment, and each `(fd, n)` of
/// `fds` placed at descriptor number `n` in the child. Lower level than
/// [`Vm::spawn`]; the session code uses that.
pub fn spawn_qemu(
    program: &Path,
    args: Vec<OsString>,
    session: &JailId,
    runtime_dir: &Path,
    fds: Vec<(OwnedFd, RawFd)>,
) -> Result<Vm, SpawnError> {
    check_private(runtime_dir)?;
    let log_path = runtime_dir.join(argv::QEMU_LOG);
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC)
        .open(&log_path)
        .map_err(|source| SpawnError::Log {
            path: log_path.clone(),
            source,
        })?;
    let log_err = log.try_clone().map_err(|source| SpawnError::Log {
        path: log_path.clone(),
        source,
    })?;

    let mut command = Command::new(program);
    command
        .args(&args)
        .env_clear()
        .env("LC_ALL", "C")
        .current_dir(runtime_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log_err))
        .process_group(0)
        .kill_on_drop(true);

    // Computed before fork: the hook below must not allocate.
    let moves: Vec<(RawFd, RawFd)> = fds.iter().map(|(fd, n)| (fd.as_raw_fd(), *n)).collect();
    // SAFETY: the closure runs in the child between fork and exec, where only
    // async-signal-safe functions may be called and nothing may be
    // allocated. It only reads `moves` (allocated before the fork) and makes
    // raw `close_range`, `dup2` and `fcntl` calls, all async-signal-safe
    // system calls.
    unsafe {
        command.pre_exec(move || {
            // Every descriptor above stderr is closed on exec — including
            // any that the supervisor inherited without FD_CLOEXEC — except
            // those moved below, since `dup2` clears the flag on its target.
            // Best effort: kernels before 5.11 lack the flag, and Rust opens
            // everything close-on-exec anyway.
            libc::syscall(
                libc::SYS_close_range,
                3 as libc::c_uint,
                libc::c_uint::MAX,
                libc::CLOSE_RANGE_CLOEXEC as libc::c_uint,
            );
            for &(from, to) in &moves {
                if from == to {
                    let flags = libc::fcntl(from, libc::F_GETFD);
                    if flags < 0 || libc::fcntl(from, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0
                    {
                        return Err(io::Error::last_os_error());
                    }
                } else if libc::dup2(from, to) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }

    let child = command.spawn().map_err(|source| SpawnError::Spawn {
        program: program.to_owned(),
        source,
    })?;
    // The child has its copies; ours close here.
    drop(fds);
    let pid = child.id().unwrap_or_default();
    tracing::debug!(session = %session, pid, "QEMU started");
    Ok(Vm {
        session: session.clone(),
        pid,
        runtime_dir: runtime_dir.to_owned(),
        console_log: runtime_dir.join(argv::CONSOLE_LOG),
        child: Some(child),
        qmp: None,
        exit: None,
        gone: false,
    })
}

/// Whoever can connect to the control socket first owns the guest's
/// channel, and whoever can reach QMP owns the VM: the directory holding
/// them must be this user's alone.
fn check_private(dir: &Path) -> Result<(), SpawnError> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(dir).map_err(|source| SpawnError::RuntimeDir {
        path: dir.to_owned(),
        source,
    })?;
    let me = nix::unistd::geteuid().as_raw();
    let mode = meta.mode() & 0o7777;
    if !meta.is_dir() || meta.uid() != me || mode & 0o077 != 0 {
        return Err(SpawnError::RuntimeDirNotPrivate {
            path: dir.to_owned(),
            mode,
            uid: meta.uid(),
            me,
        });
    }
    Ok(())
}

/// Kills the adopted process `pid` if, and only if, it carries `session`'s
/// marker; waits until it is gone.
async fn kill_adopted(session: &JailId, pid: u32) -> Result<(), VmError> {
    let pidfd = match pidfd_open(pid) {
        Ok(fd) => fd,
        Err(err) if err.raw_os_error() == Some(libc::ESRCH) => return Ok(()),
        Err(source) => return Err(VmError::Proc { pid, source }),
    };
    // Checked after the pidfd exists: the pidfd pins the process we looked
    // at, so the signal below cannot reach a later owner of the pid.
    match read_cmdline(pid)? {
        None => return Ok(()),
        Some(cmdline) if parse_marker(&cmdline).as_ref() == Some(session) => {}
        Some(_) => {
            return Err(VmError::NotOurs {
                pid,
                marker: argv::marker(session),
            });
        }
    }
    match pidfd_kill(&pidfd) {
        Ok(()) => {}
        Err(err) if err.raw_os_error() == Some(libc::ESRCH) => return Ok(()),
        Err(source) => return Err(VmError::Signal { pid, source }),
    }
    // A pidfd becomes readable when its process has exited.
    // SAFETY: `pidfd` is an open descriptor owned by the `OwnedFd` that the
    // `AsyncFd` takes ownership of; nothing else closes or replaces it while
    // it is registered.
    let readable = unsafe { AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE) }
        .map_err(|err| VmError::Wait {
            pid,
            source: err.into(),
        })?;
    match tokio::time::timeout(KILL_WAIT, readable.readable()).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(source)) => Err(VmError::Wait { pid, source }),
        Err(_) => Err(VmError::Unkillable {
            pid,
            waited: KILL_WAIT,
        }),
    }
}

/// What [`reap_leftovers`] killed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReapedVm {
    pub session: JailId,
    pub pid: u32,
}

/// Kills every QEMU that carries a `zl-<id>` marker, whose sockets live
/// under `runtime_root` (so two zerolease homes never reap each other's
/// VMs), and whose id is not in `live`.
pub async fn reap_leftovers(
    runtime_root: &Path,
    live: &[JailId],
) -> Result<Vec<ReapedVm>, VmError> {
    let mut reaped = Vec::new();
    let entries = std::fs::read_dir("/proc").map_err(VmError::Scan)?;
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<u32>().ok())
        else {
            continue;
        };
        // Processes vanish while we scan; that is not an error.
        let Ok(Some(cmdline)) = read_cmdline(pid) else {
            continue;
        };
        let Some(session) = parse_leftover(&cmdline, runtime_root) else {
            continue;
        };
        if live.contains(&session) {
            continue;
        }
        match kill_adopted(&session, pid).await {
            Ok(()) => reaped.push(ReapedVm { session, pid }),
            // It changed under us between the scan and the check.
            Err(VmError::NotOurs { .. }) => {}
            Err(err) => return Err(err),
        }
    }
    Ok(reaped)
}

/// `/proc/<pid>/cmdline`; `None` when the process is gone (or a zombie,
/// which is as good as gone). A live process can show an empty command line
/// (a kernel thread, or one caught in the middle of `execve`); that is
/// returned as empty, which carries no marker.
fn read_cmdline(pid: u32) -> Result<Option<Vec<u8>>, VmError> {
    match std::fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(bytes) if bytes.is_empty() => Ok((!is_zombie_or_gone(pid)).then_some(bytes)),
        Ok(bytes) => Ok(Some(bytes)),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
        // ESRCH shows up when the process exits while we read.
        Err(err) if err.raw_os_error() == Some(libc::ESRCH) => Ok(None),
        Err(source) => Err(VmError::Proc { pid, source }),
    }
}

/// Whether `/proc/<pid>/stat` says the process is a zombie or dead (or it is
/// gone altogether).
fn is_zombie_or_gone(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return true;
    };
    // `pid (comm) S …`: the state follows the last `)`, as comm may hold
    // parentheses and spaces.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next())
        .is_some_and(|state| matches!(state, 'Z' | 'X' | 'x'))
}

/// The session id of a QEMU command line: `argv[0]` is a `qemu-system-*`
/// binary and the value after `-name` is exactly `zl-<id>,process=zl-<id>`
/// with a valid id.
pub fn parse_marker(cmdline: &[u8]) -> Option<JailId> {
    let args: Vec<&[u8]> = cmdline
        .strip_suffix(b"\0")
        .unwrap_or(cmdline)
        .split(|b| *b == 0)
        .collect();
    let program = args.first()?;
    let base = program.rsplit(|b| *b == b'/').next()?;
    if !base.starts_with(b"qemu-system-") {
        return None;
    }
    let at = args.iter().position(|a| *a == b"-name")?;
    let value = std::str::from_utf8(args.get(at + 1)?).ok()?;
    let (name, process) = value.split_once(",process=")?;
    let id = name.strip_prefix(argv::MARKER_PREFIX)?;
    let id = JailId::parse(id).ok()?;
    (process == name).then_some(id)
}

/// Like [`parse_marker`], and the control socket lies under `root`.
fn parse_leftover(cmdline: &[u8], root: &Path) -> Option<JailId> {
    let id = parse_marker(cmdline)?;
    let root = root.to_str()?.trim_end_matches('/');
    let needle = format!("path={root}/");
    cmdline
        .split(|b| *b == 0)
        .filter_map(|a| std::str::from_utf8(a).ok())
        .any(|a| a.starts_with("socket,id=ctl,") && a.contains(&needle))
        .then_some(id)
}

fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
    // SAFETY: pidfd_open(2) takes a pid and flags by value and touches no
    // memory of ours; it returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = RawFd::try_from(fd).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: `fd` was just returned by the kernel, is open, and nothing
    // else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn pidfd_kill(pidfd: &OwnedFd) -> io::Result<()> {
    // SAFETY: pidfd_send_signal(2) with a valid descriptor we own, SIGKILL,
    // a null `siginfo` (allowed: the kernel fills in a default) and no
    // flags.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_fd().as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmdline(args: &[&str]) -> Vec<u8> {
        let mut out = Vec::new();
        for a in args {
            out.extend_from_slice(a.as_bytes());
            out.push(0);
        }
        out
    }

    #[test]
    fn parse_marker_table() {
        let id = |s| Some(JailId::parse(s).unwrap());
        let cases: &[(&[&str], Option<JailId>)] = &[
            (
                &[
                    "/usr/bin/qemu-system-x86_64",
                    "-name",
                    "zl-abc,process=zl-abc",
                ],
                id("abc"),
            ),
            (
                &[
                    "qemu-system-x86_64",
                    "-nodefaults",
                    "-name",
                    "zl-a1,process=zl-a1",
                    "-m",
                    "1",
                ],
                id("a1"),
            ),
            // Not QEMU, even with the marker: never ours.
            (&["/bin/sleep", "-name", "zl-abc,process=zl-abc"], None),
            (
                &[
                    "/tmp/evil-qemu-system-x86_64x",
                    "-name",
                    "zl-abc,process=zl-abc",
                ],
                None,
            ),
            // Marker halves disagree.
            (
                &["qemu-system-x86_64", "-name", "zl-abc,process=zl-abd"],
                None,
            ),
            // Not our prefix.
            (
                &["qemu-system-x86_64", "-name", "vm-abc,process=vm-abc"],
                None,
            ),
            // Invalid id.
            (
                &["qemu-system-x86_64", "-name", "zl-ABC,process=zl-ABC"],
                None,
            ),
            (&["qemu-system-x86_64", "-name", "zl-,process=zl-"], None),
            // Marker somewhere else than after -name.
            (
                &["qemu-system-x86_64", "-append", "zl-abc,process=zl-abc"],
                None,
            ),
            (&["qemu-system-x86_64", "-name"], None),
            (&["qemu-system-x86_64"], None),
        ];
        for (args, want) in cases {
            assert_eq!(&parse_marker(&cmdline(args)), want, "{args:?}");
        }
        assert_eq!(parse_marker(b""), None);
        assert_eq!(parse_marker(b"\0\0"), None);
        assert_eq!(
            parse_marker(b"qemu-system-x86_64\0-name\0zl-\xff,process=zl-\xff"),
            None
        );
    }

    #[test]
    fn leftover_must_live_under_the_runtime_root() {
        let args = |dir: &str| {
            cmdline(&[
                "qemu-system-x86_64",
                "-name",
                "zl-abc,process=zl-abc",
                "-chardev",
                &format!("socket,id=ctl,path={dir}/control.sock,server=on,wait=off"),
            ])
        };
        let root = Path::new("/run/zl");
        assert_eq!(
            parse_leftover(&args("/run/zl/abc"), root),
            Some(JailId::parse("abc").unwrap())
        );
        assert_eq!(parse_leftover(&args("/run/zl-other/abc"), root), None);
        assert_eq!(parse_leftover(&args("/home/x/run/zl/abc"), root), None);
        assert_eq!(
            parse_leftover(&args("/run/zl/abc"), Path::new("/run/zl/")),
            Some(JailId::parse("abc").unwrap())
        );
    }
}
