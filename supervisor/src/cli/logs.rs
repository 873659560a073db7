//! `zerolease logs SESSION [-f] [--console]`: the agent's output as the
//! session kept it (see `session::log`), or the guest's serial console.
//! Needs no vault: both are files in the session's directory.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use crate::home::StateDir;
use crate::jail::JailId;
use crate::session::log::{LogReader, console_path, log_path};
use crate::session::record::SessionRecord;

use super::ExitStatus;

/// How often `-f` looks for new output.
const FOLLOW_POLL: Duration = Duration::from_millis(200);

#[derive(Debug, thiserror::Error)]
pub enum LogsError {
    #[error("`{0}` is not a session id; list sessions with `zerolease ps --all`")]
    BadId(String),
    #[error("no output log for session `{0}`; list sessions with `zerolease ps --all`")]
    NoLog(String),
    #[error(
        "no console log for session `{0}` (sessions before this version did not keep one); \
         list sessions with `zerolease ps --all`"
    )]
    NoConsole(String),
    #[error("cannot read the log of session `{session}`")]
    Read {
        session: String,
        #[source]
        source: std::io::Error,
    },
}

/// Prints the log (or with `console` the guest's console) of `session`;
/// with `follow`, keeps printing what is appended until the session ended.
pub fn run(
    home: Option<PathBuf>,
    session: &str,
    follow: bool,
    console: bool,
) -> anyhow::Result<ExitStatus> {
    let home = StateDir::resolve(home)?;
    // The id names a path: only a well-formed one is used.
    JailId::parse(session).map_err(|_| LogsError::BadId(session.to_owned()))?;
    let path = if console {
        console_path(&home, session)
    } else {
        log_path(&home, session)
    };
    if !path.exists() {
        let id = session.to_owned();
        return Err(if console {
            LogsError::NoConsole(id)
        } else {
            LogsError::NoLog(id)
        }
        .into());
    }
    let read_err = |source| LogsError::Read {
        session: session.to_owned(),
        source,
    };
    let mut reader = LogReader::new(path);
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    reader.read_all(&mut out).map_err(read_err)?;
    out.flush().map_err(read_err)?;
    if !follow {
        return Ok(ExitStatus::Success);
    }
    loop {
        // Whether it runs is read before the log, so its last output is
        // printed after it ended.
        let running = SessionRecord::load(&home, session)
            .is_ok_and(|r| !r.is_finished() && r.supervisor_alive());
        reader.read_new(&mut out).map_err(read_err)?;
        out.flush().map_err(read_err)?;
        if !running {
            return Ok(ExitStatus::Success);
        }
        std::thread::sleep(FOLLOW_POLL);
    }
}
