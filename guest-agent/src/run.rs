//! Running the agent command as the unprivileged user, relaying its output,
//! and killing everything that user runs.
//!
//! **Invariants:**
//! - The command runs with the agent's uid and gid and no supplementary
//!   groups: between `fork` and `exec` the child calls `setgroups(0, NULL)`
//!   (when root), `setgid`, `setuid` — in that order, so no step needs a
//!   privilege an earlier one dropped — then `chdir` into the workdir as the
//!   agent. Only async-signal-safe calls on data prepared before the fork.
//! - Its environment is exactly the [`AgentEnv`]; nothing of PID 1's
//!   environment leaks into it.
//! - [`kill_user`] never targets root or the caller's own uid, so it can
//!   neither take down the guest agent nor, in a test, the test runner.

use std::io::{self, Read};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::Pid;
use zerolease_protocol::OutputStream;

use crate::env::AgentEnv;
use crate::passwd::User;

/// Largest chunk of output sent in one `Output` message (well under the
/// frame bound after base64).
pub const OUTPUT_CHUNK: usize = 32 * 1024;

/// How long to wait for the output pipes to drain after the agent exits
/// (a background process may keep them open).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// What the running agent produces.
#[derive(Debug)]
pub enum AgentEvent {
    /// A chunk of output.
    Output(OutputStream, Vec<u8>),
    /// The command ended; sent after its output.
    Exited {
        /// Exit code, if it exited.
        code: Option<i32>,
        /// Signal, if one killed it.
        signal: Option<i32>,
    },
}

/// How the agent's exit is collected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reaping {
    /// Wait for the agent's pid only (tests, or any non-init process).
    AgentOnly,
    /// As PID 1: reap every child (orphans are re-parented to us) and
    /// report the agent's status when it comes.
    All,
}

/// Why the agent could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// The command is empty.
    #[error("the agent command is empty")]
    EmptyCommand,
    /// `exec` or the setup before it failed.
    #[error("cannot start the agent command `{program}` in {workdir}")]
    Spawn {
        /// The program (not its arguments: they may carry values).
        program: String,
        /// The working directory.
        workdir: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// How the agent's standard streams are connected.
#[derive(Debug)]
pub enum AgentIo {
    /// stdin is `/dev/null`; stdout and stderr are pipes whose chunks
    /// arrive as [`AgentEvent::Output`]. The command gets its own process
    /// group.
    Pipes,
    /// stdin, stdout and stderr are the pty `slave`, which becomes the
    /// controlling terminal of a new session (`setsid` + `TIOCSCTTY`). The
    /// output is relayed elsewhere ([`crate::tty`]); `drained` says when it
    /// is all out, so `Exited` follows it.
    Pty {
        /// The pty's slave side.
        slave: std::os::fd::OwnedFd,
        /// Signalled once the relay has sent the last output.
        drained: mpsc::Receiver<()>,
    },
}

/// An agent command that runs (its `exec` succeeded) but whose output is
/// not relayed yet, nor its exit waited for: [`Spawned::relay`] starts the
/// threads that do both. Split from [`spawn_io`] so that the host hears
/// `Started` before those threads exist — each costs an emulated guest a few
/// milliseconds, and the command is running already. Meanwhile its output
/// waits in the pipes.
#[must_use = "relay() reports the agent's output and exit"]
pub struct Spawned {
    child: Child,
    pty_drained: Option<mpsc::Receiver<()>>,
    reaping: Reaping,
    sink: Arc<dyn Fn(AgentEvent) + Send + Sync>,
}

impl std::fmt::Debug for Spawned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spawned")
            .field("pid", &self.child.id())
            .field("reaping", &self.reaping)
            .finish_non_exhaustive()
    }
}

/// Starts `command` as `user` in `workdir` (a path on this machine) with
/// exactly `env` and the standard streams connected as `io` says. Once
/// [`Spawned::relay`] runs, output and the exit status arrive through
/// `sink`, in order.
pub fn spawn_io(
    command: &[String],
    env: &AgentEnv,
    user: &User,
    workdir: &Path,
    reaping: Reaping,
    io: AgentIo,
    sink: impl Fn(AgentEvent) + Send + Sync + 'static,
) -> Result<Spawned, SpawnError> {
    let (program, args) = command.split_first().ok_or(SpawnError::EmptyCommand)?;
    let spawn_err = |source| SpawnError::Spawn {
        program: program.clone(),
        workdir: workdir.display().to_string(),
        source,
    };
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env_clear()
        .envs(env.vars().iter().map(|v| (v.name(), v.value())));
    let pty_drained = match io {
        AgentIo::Pipes => {
            cmd.process_group(0)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            None
        }
        AgentIo::Pty { slave, drained } => {
            // No process_group(0) here: a group leader cannot setsid.
            cmd.stdin(Stdio::from(slave.try_clone().map_err(spawn_err)?))
                .stdout(Stdio::from(slave.try_clone().map_err(spawn_err)?))
                .stderr(Stdio::from(slave));
            Some(drained)
        }
    };
    let new_session = pty_drained.is_some();
    let workdir_c = std::ffi::CString::new(workdir.as_os_str().as_encoded_bytes())
        .map_err(|_| spawn_err(io::Error::from(io::ErrorKind::InvalidInput)))?;
    let (uid, gid) = (user.uid, user.gid);
    // SAFETY: the closure runs in the forked child before exec. It only
    // makes async-signal-safe system calls (setsid, ioctl, getuid,
    // setgroups, setgid, setuid, chdir) on integers and a C string built
    // before the fork; it allocates nothing and takes no locks.
    unsafe {
        cmd.pre_exec(move || {
            if new_session {
                take_terminal()?;
            }
            drop_privileges(uid, gid, &workdir_c)
        });
    }
    let child = cmd.spawn().map_err(spawn_err)?;
    // Our copies of the pty slave must go, or the master never reads EIO.
    drop(cmd);
    Ok(Spawned {
        child,
        pty_drained,
        reaping,
        sink: Arc::new(sink),
    })
}

impl Spawned {
    /// The agent's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Starts relaying the agent's output to the sink and waiting for its
    /// exit, which arrives as [`AgentEvent::Exited`] after the output.
    pub fn relay(self) {
        let Spawned {
            mut child,
            pty_drained,
            reaping,
            sink,
        } = self;
        let (drained_tx, drained_rx) = mpsc::channel();
        let readers = [
            child
                .stdout
                .take()
                .map(|r| (OutputStream::Stdout, Box::new(r) as Box<dyn Read + Send>)),
            child
                .stderr
                .take()
                .map(|r| (OutputStream::Stderr, Box::new(r) as Box<dyn Read + Send>)),
        ];
        let mut pipes = 0;
        for (stream, reader) in readers.into_iter().flatten() {
            pipes += 1;
            let sink = sink.clone();
            let drained = drained_tx.clone();
            std::thread::spawn(move || {
                relay(stream, reader, &*sink);
                let _ = drained.send(());
            });
        }
        if let Some(pty) = pty_drained {
            pipes += 1;
            let drained = drained_tx.clone();
            std::thread::spawn(move || {
                let _ = pty.recv();
                let _ = drained.send(());
            });
        }
        drop(drained_tx);
        std::thread::spawn(move || {
            let status = wait(child, reaping);
            let deadline = Instant::now() + DRAIN_TIMEOUT;
            for _ in 0..pipes {
                let left = deadline.saturating_duration_since(Instant::now());
                if drained_rx.recv_timeout(left).is_err() {
                    break;
                }
            }
            let (code, signal) = exit_fields(status);
            sink(AgentEvent::Exited { code, signal });
            if reaping == Reaping::All {
                reap_orphans_forever();
            }
        });
    }
}

/// Runs in the child between fork and exec, before dropping privileges:
/// a new session whose controlling terminal is stdin (the pty slave).
fn take_terminal() -> io::Result<()> {
    use nix::libc;
    // SAFETY: plain system calls with integer arguments; stdin is the pty
    // slave, dup2'd there by `Command` before this runs.
    unsafe {
        if libc::setsid() < 0 {
            return Err(io::Error::last_os_error());
        }
        if libc::ioctl(0, libc::TIOCSCTTY, 0) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Runs in the child between fork and exec; see the SAFETY note in [`spawn_io`].
fn drop_privileges(uid: u32, gid: u32, workdir: &std::ffi::CStr) -> io::Result<()> {
    use nix::libc;
    // SAFETY: plain system calls with valid arguments (a null list of
    // length 0 for setgroups, a NUL-terminated path for chdir).
    unsafe {
        if libc::geteuid() == 0 && libc::setgroups(0, std::ptr::null()) != 0 {
            return Err(io::Error::last_os_error());
        }
        if libc::setgid(gid) != 0 {
            return Err(io::Error::last_os_error());
        }
        if libc::setuid(uid) != 0 {
            return Err(io::Error::last_os_error());
        }
        if libc::chdir(workdir.as_ptr()) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

fn relay(stream: OutputStream, mut reader: Box<dyn Read + Send>, sink: &dyn Fn(AgentEvent)) {
    let mut buf = vec![0u8; OUTPUT_CHUNK];
    loop {
        match reader.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => sink(AgentEvent::Output(stream, buf[..n].to_vec())),
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// Maps an exit status to `Exited`'s fields: exactly one is set.
pub fn exit_fields(status: ExitStatus) -> (Option<i32>, Option<i32>) {
    match (status.code(), status.signal()) {
        (Some(code), _) => (Some(code), None),
        (None, Some(signal)) => (None, Some(signal)),
        // Neither (cannot happen for a waited child): report failure.
        (None, None) => (Some(255), None),
    }
}

fn wait(mut child: Child, reaping: Reaping) -> ExitStatus {
    match reaping {
        Reaping::AgentOnly => child
            .wait()
            .unwrap_or_else(|_| ExitStatus::from_raw(255 << 8)),
        Reaping::All => {
            let agent = Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
            loop {
                match waitpid(None, None) {
                    Ok(WaitStatus::Exited(pid, code)) if pid == agent => {
                        return ExitStatus::from_raw((code & 0xff) << 8);
                    }
                    Ok(WaitStatus::Signaled(pid, signal, _)) if pid == agent => {
                        return ExitStatus::from_raw(signal as i32);
                    }
                    Ok(_) | Err(Errno::EINTR) => {}
                    Err(_) => return ExitStatus::from_raw(255 << 8),
                }
            }
        }
    }
}

/// Held by whoever spawns and waits for a child of PID 1 after the agent
/// exited (the workspace's git commands), so [`reap_orphans_forever`] does
/// not reap it first and lose its exit status.
pub static REAPER: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Reaps orphans forever (PID 1, after the agent's exit was reported),
/// polling so that it can stand aside while [`REAPER`] is held.
pub fn reap_orphans_forever() {
    use nix::sys::wait::WaitPidFlag;
    loop {
        let reaped = {
            let _turn = REAPER
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            waitpid(None, Some(WaitPidFlag::WNOHANG))
        };
        match reaped {
            Ok(WaitStatus::StillAlive) => std::thread::sleep(Duration::from_millis(100)),
            Ok(_) | Err(Errno::EINTR) => {}
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// Why the agent user's processes could not all be killed.
#[derive(Debug, thiserror::Error)]
pub enum KillError {
    /// The uid is root or our own.
    #[error("refusing to kill every process of uid {uid}: it is root or this process's own uid")]
    RefusedUid {
        /// The uid.
        uid: u32,
    },
    /// The helper that sends the signals could not be started.
    #[error("cannot fork the killer process")]
    Fork(#[source] Errno),
    /// Processes of the user survived.
    #[error("{count} processes of uid {uid} are still alive after {rounds} rounds of SIGKILL")]
    Survivors {
        /// The uid.
        uid: u32,
        /// How many.
        count: usize,
        /// Rounds tried.
        rounds: u32,
    },
}

/// Sends SIGKILL to every process of `uid`: a forked child takes the uid and
/// calls `kill(-1, SIGKILL)`, which the kernel applies atomically to every
/// process that uid may signal (a `fork` racing with it fails). Repeats
/// until `<proc_root>/<pid>/status` shows no live process of the uid.
pub fn kill_user(uid: u32, proc_root: &Path) -> Result<(), KillError> {
    let me = nix::unistd::getuid().as_raw();
    if uid == 0 || uid == me {
        return Err(KillError::RefusedUid { uid });
    }
    const ROUNDS: u32 = 20;
    for _ in 0..ROUNDS {
        kill_as(uid)?;
        if live_processes_of(uid, proc_root) == 0 {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(KillError::Survivors {
        uid,
        count: live_processes_of(uid, proc_root),
        rounds: ROUNDS,
    })
}

fn kill_as(uid: u32) -> Result<(), KillError> {
    use nix::unistd::{ForkResult, fork};
    // SAFETY: the child runs only async-signal-safe system calls (setuid,
    // kill, _exit) and touches no memory another thread could have locked,
    // so forking from this multithreaded process is sound.
    match unsafe { fork() }.map_err(KillError::Fork)? {
        ForkResult::Child => {
            // SAFETY: plain system calls on integers; `_exit` does not run
            // destructors or atexit handlers that could deadlock.
            unsafe {
                if nix::libc::setuid(uid) != 0 {
                    nix::libc::_exit(1);
                }
                // -1: every process this uid may signal, except the caller.
                nix::libc::kill(-1, nix::libc::SIGKILL);
                nix::libc::_exit(0);
            }
        }
        ForkResult::Parent { child } => {
            while let Err(Errno::EINTR) = waitpid(child, None) {}
            Ok(())
        }
    }
}

/// Counts processes of `uid` (by real uid) that are not zombies.
pub fn live_processes_of(uid: u32, proc_root: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(proc_root) else {
        return 0;
    };
    entries
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter_map(|e| std::fs::read_to_string(e.path().join("status")).ok())
        .filter(|status| status_is_live_uid(status, uid))
        .count()
}

/// Whether a `/proc/<pid>/status` text is a non-zombie with real uid `uid`.
pub fn status_is_live_uid(status: &str, uid: u32) -> bool {
    let mut real_uid = None;
    let mut zombie = false;
    for line in status.lines() {
        if let Some(rest) = line.strip_prefix("Uid:") {
            real_uid = rest
                .split_whitespace()
                .next()
                .and_then(|u| u.parse::<u32>().ok());
        } else if let Some(rest) = line.strip_prefix("State:") {
            zombie = matches!(rest.trim_start().chars().next(), Some('Z' | 'X'));
        }
    }
    real_uid == Some(uid) && !zombie
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_parsing() {
        let status = |state: &str, uid: &str| {
            format!("Name:\tsh\nState:\t{state}\nTgid:\t5\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n")
        };
        let cases = [
            (status("S (sleeping)", "1000"), 1000, true),
            (status("R (running)", "1000"), 1000, true),
            (status("Z (zombie)", "1000"), 1000, false),
            (status("X (dead)", "1000"), 1000, false),
            (status("S (sleeping)", "1001"), 1000, false),
            (status("S (sleeping)", "10000"), 1000, false),
            ("Name:\tx\n".to_owned(), 1000, false),
            ("Uid:\tabc\n".to_owned(), 1000, false),
        ];
        for (text, uid, expected) in cases {
            assert_eq!(status_is_live_uid(&text, uid), expected, "{text:?}");
        }
    }

    #[test]
    fn refuses_root_and_own_uid() {
        let me = nix::unistd::getuid().as_raw();
        for uid in [0, me] {
            assert!(matches!(
                kill_user(uid, Path::new("/proc")),
                Err(KillError::RefusedUid { .. })
            ));
        }
    }

    #[test]
    fn exit_fields_set_exactly_one() {
        assert_eq!(exit_fields(ExitStatus::from_raw(7 << 8)), (Some(7), None));
        assert_eq!(exit_fields(ExitStatus::from_raw(9)), (None, Some(9)));
        assert_eq!(exit_fields(ExitStatus::from_raw(0)), (Some(0), None));
    }
}
