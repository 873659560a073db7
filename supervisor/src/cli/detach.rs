//! `zerolease run --detach` (start a session in the background) and
//! `zerolease attach SESSION` (join its terminal).
//!
//! The background session is this binary again, `run --detached-child`,
//! in a new session (`setsid`) with no terminal: stdin and stdout are
//! `/dev/null` (the agent's output goes to the session's log), stderr is
//! appended to `<home>/detached.log` (0600). No secret is on its command
//! line or in its environment: it opens the vault itself, so the `file` and
//! `keyring` key sources work and the `env` source is refused here (the
//! key variables were taken out of this process's environment at start).

use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Duration;

use crate::home::StateDir;
use crate::jail::JailId;
use crate::session::attach::{AttachEnd, attach_socket};
use crate::session::record::SessionRecord;
use crate::vault::{KeySourceKind, Vault};

use super::ExitStatus;

#[derive(Debug, thiserror::Error)]
pub enum DetachError {
    #[error(
        "--detach cannot hand the `env` master key to a background session; \
         use the `file` or `keyring` key source, or run in the foreground"
    )]
    EnvKey,
    #[error("`{0}` is not a session id; list sessions with `zerolease ps`")]
    BadId(String),
    #[error("no running session `{0}`; list them with `zerolease ps`")]
    NotRunning(String),
    #[error(
        "session `{0}` was not started with `zerolease run --detach`, so it has no terminal to attach to"
    )]
    NotDetached(String),
    #[error("`zerolease attach` needs a terminal on stdin and stdout")]
    NoTerminal,
}

/// The arguments of the `run` to start in the background.
#[derive(Debug)]
pub struct Background<'a> {
    pub manifest: &'a Path,
    pub agent: Option<String>,
    pub images: Option<PathBuf>,
    pub hello_timeout: &'a str,
    pub command: Vec<String>,
    /// More `run` options passed on as they are (see [`forwarded`]).
    pub extra: Vec<std::ffi::OsString>,
}

/// The `run` options the background session needs as well: `--timeout`,
/// `--workspace`, `--report`, `--quiet`. (`--ci` does not combine with
/// `--detach`.) Relative paths stay valid: the child keeps the cwd.
pub fn forwarded(
    timeout: Option<&str>,
    workspace: Option<&Path>,
    report: Option<&Path>,
    quiet: bool,
) -> Vec<std::ffi::OsString> {
    let mut args: Vec<std::ffi::OsString> = Vec::new();
    if let Some(t) = timeout {
        args.extend(["--timeout".into(), t.into()]);
    }
    if let Some(w) = workspace {
        args.extend(["--workspace".into(), w.into()]);
    }
    if let Some(r) = report {
        args.extend(["--report".into(), r.into()]);
    }
    if quiet {
        args.push("--quiet".into());
    }
    args
}

/// How often the starter looks at the background session's record.
const START_POLL: Duration = Duration::from_millis(200);

/// Starts the session in the background and returns once it runs (printing
/// its id) or failed to start (printing why).
pub fn start(
    vault: &Vault,
    home: Option<PathBuf>,
    args: Background<'_>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    if vault.key_source() == KeySourceKind::Env {
        return Err(DetachError::EnvKey.into());
    }
    let home = StateDir::resolve(home)?;
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(exe);
    cmd.arg("run")
        .arg("--detached-child")
        .arg("--hello-timeout")
        .arg(args.hello_timeout);
    if let Some(agent) = &args.agent {
        cmd.arg("--agent").arg(agent);
    }
    if let Some(images) = &args.images {
        cmd.arg("--images").arg(images);
    }
    cmd.args(&args.extra);
    cmd.arg(args.manifest);
    if !args.command.is_empty() {
        cmd.arg("--").args(&args.command);
    }
    let errors = home.root().join("detached.log");
    let stderr = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&errors)?;
    cmd.env(crate::home::ENV_HOME, home.root())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr);
    // SAFETY: setsid is an async-signal-safe system call; the closure
    // allocates nothing and takes no locks.
    unsafe {
        cmd.pre_exec(|| {
            if nix::libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    let pid = child.id();
    loop {
        if let Some(status) = child.try_wait()? {
            eprintln!(
                "error: the background session failed to start ({status}); its messages are in {}:",
                errors.display()
            );
            print_tail(&errors);
            return Ok(ExitStatus::SessionFailed.into());
        }
        if let Some(r) = SessionRecord::all(&home).into_iter().find(|r| r.pid == pid) {
            match r.state.as_str() {
                "running" | "revoked" => {
                    if json {
                        println!("{}", serde_json::json!({ "session": r.id }));
                    } else {
                        println!("{}", r.id);
                    }
                    return Ok(ExitCode::SUCCESS);
                }
                _ if r.is_finished() => {
                    eprintln!(
                        "error: session `{}` failed to start; its messages are in {}:",
                        r.id,
                        errors.display()
                    );
                    print_tail(&errors);
                    return Ok(ExitStatus::SessionFailed.into());
                }
                _ => {}
            }
        }
        std::thread::sleep(START_POLL);
    }
}

fn print_tail(path: &Path) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    for line in &lines[lines.len().saturating_sub(10)..] {
        eprintln!("  {line}");
    }
}

/// Joins this terminal to detached session `session` until `~.` (detach)
/// or the session's end.
pub fn attach(home: Option<PathBuf>, session: &str) -> anyhow::Result<ExitStatus> {
    use std::io::IsTerminal;
    let home = StateDir::resolve(home)?;
    JailId::parse(session).map_err(|_| DetachError::BadId(session.to_owned()))?;
    if !std::io::stdin().is_terminal() || !std::io::stdout().is_terminal() {
        return Err(DetachError::NoTerminal.into());
    }
    let record = SessionRecord::load(&home, session)
        .ok()
        .filter(|r| !r.is_finished() && r.supervisor_alive())
        .ok_or_else(|| DetachError::NotRunning(session.to_owned()))?;
    let socket = attach_socket(&record.runtime_dir);
    if !socket.exists() {
        return Err(DetachError::NotDetached(session.to_owned()).into());
    }
    let hint = format!("zerolease: attached to session {session}; type Enter ~ . to detach");
    match crate::session::attach::attach(&socket, &hint)? {
        AttachEnd::Detached => eprintln!(
            "zerolease: detached; session {session} keeps running (`zerolease attach {session}` to return)"
        ),
        AttachEnd::SessionGone => eprintln!("zerolease: session {session} has ended"),
    }
    Ok(ExitStatus::Success)
}
