//! `zerolease renew`, and the half of `zerolease secret rotate` that pushes
//! the new value into running sessions. Both ask a running session over its
//! control socket (`session::leases` holds the protocol and the logic).

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use super::output::{ExitStatus, json};
use super::parse_ttl;
use crate::clock::{Timestamp, format_duration_short};
use crate::home::StateDir;
use crate::session::leases::{
    self, ControlError, ErrorKind, RenewRequest, Reply, Request, RotatedRequest,
};
use crate::session::record::{SessionRecord, control_socket};
use crate::vault::{LeaseFilter, Vault};

/// How long a session may take to answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// The record of a session that is running now, or the message and exit
/// status saying why there is none.
fn running(home: &StateDir, session: &str) -> Result<SessionRecord, (String, ExitStatus)> {
    let record = SessionRecord::load(home, session).map_err(|_| {
        (
            format!("no session `{session}`; list running sessions with `zerolease ps`"),
            ExitStatus::NotFound,
        )
    })?;
    if record.is_finished() || !record.supervisor_alive() {
        let state = if record.is_finished() {
            record.state.clone()
        } else {
            "orphaned: its zerolease run died".to_owned()
        };
        return Err((
            format!(
                "session `{session}` is not running ({state}); only a running session's leases can be renewed"
            ),
            ExitStatus::NotFound,
        ));
    }
    Ok(record)
}

fn exit_of(kind: ErrorKind) -> ExitStatus {
    match kind {
        ErrorKind::Invalid => ExitStatus::Usage,
        ErrorKind::NotFound => ExitStatus::NotFound,
        ErrorKind::Failed => ExitStatus::Failure,
    }
}

fn exit_of_control(e: &ControlError) -> ExitStatus {
    match e {
        ControlError::Request(_) => ExitStatus::Usage,
        ControlError::Connect { .. } | ControlError::Ended => ExitStatus::NotFound,
        ControlError::Io(_) | ControlError::Reply(_) => ExitStatus::Failure,
    }
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(c) = source {
        s.push_str(": ");
        s.push_str(&c.to_string());
        source = c.source();
    }
    s
}

/// `zerolease renew SESSION [--credential NAME] [--ttl T]`.
pub(super) fn renew(
    vault: &Vault,
    home: Option<PathBuf>,
    session: &str,
    credential: Option<String>,
    ttl: Option<String>,
    j: bool,
) -> anyhow::Result<ExitStatus> {
    let ttl_secs = ttl
        .as_deref()
        .map(parse_ttl)
        .transpose()?
        .map(|d| d.as_secs().max(1));
    let home = StateDir::resolve(home)?;
    let record = match running(&home, session) {
        Ok(r) => r,
        Err((message, status)) => {
            eprintln!("error: {message}");
            return Ok(status);
        }
    };
    let request = Request::Renew(RenewRequest {
        credential,
        ttl_secs,
    });
    let reply = match leases::ask(
        &control_socket(&record.runtime_dir),
        &request,
        ANSWER_TIMEOUT,
    ) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: session `{session}`: {}", chain(&e));
            return Ok(exit_of_control(&e));
        }
    };
    let outcomes = match reply {
        Reply::Renewed { leases } => leases,
        Reply::Error { kind, message } => {
            eprintln!("error: {message}");
            return Ok(exit_of(kind));
        }
        Reply::Updated { .. } => {
            eprintln!("error: session `{session}` answered something else");
            return Ok(ExitStatus::Failure);
        }
    };
    let now = vault.now();
    let all_renewed = outcomes.iter().all(|o| o.refused.is_none());
    if j {
        #[derive(Serialize)]
        struct View<'a> {
            secret: &'a str,
            lease: &'a str,
            renewed: bool,
            expires: Timestamp,
            seconds_left: u64,
            max_expires: Timestamp,
            refused: Option<&'a str>,
        }
        let leases: Vec<View<'_>> = outcomes
            .iter()
            .map(|o| View {
                secret: &o.secret,
                lease: &o.lease,
                renewed: o.refused.is_none(),
                expires: o.expires,
                seconds_left: now.until(o.expires).as_secs(),
                max_expires: o.max_expires,
                refused: o.refused.as_deref(),
            })
            .collect();
        json(&serde_json::json!({ "session": session, "leases": leases }))?;
    } else {
        for o in &outcomes {
            match &o.refused {
                None => println!(
                    "renewed `{}` until {} ({} left; its grant's maximum is {})",
                    o.secret,
                    o.expires.rfc3339(),
                    format_duration_short(now.until(o.expires)),
                    o.max_expires.rfc3339()
                ),
                Some(why) => eprintln!("refused `{}`: {why}", o.secret),
            }
        }
    }
    Ok(if all_renewed {
        ExitStatus::Success
    } else {
        ExitStatus::Denied
    })
}

/// How pushing a rotated secret into one running session went.
#[derive(Debug, Clone, Serialize)]
pub(super) struct Pushed {
    pub session: String,
    pub updated: bool,
    /// Env variables and home files rewritten in the guest.
    pub env: Vec<String>,
    pub files: Vec<String>,
    pub error: Option<String>,
}

/// Tells every running session holding an active lease of `secret` that it
/// was rotated, and collects how each went. Failures are reported, not
/// raised: the rotation itself is already durable.
pub(super) fn push_rotation(vault: &Vault, home: Option<PathBuf>, secret: &str) -> Vec<Pushed> {
    let home = match StateDir::resolve(home) {
        Ok(h) => h,
        Err(e) => {
            tracing::warn!("cannot look for running sessions: {e}");
            return Vec::new();
        }
    };
    let mut out = Vec::new();
    for record in SessionRecord::all(&home) {
        if record.is_finished() || !record.supervisor_alive() {
            continue;
        }
        let holds = vault
            .list_leases(LeaseFilter {
                session: Some(record.id.clone()),
                include_inactive: false,
            })
            .is_ok_and(|ls| ls.iter().any(|l| l.secret == secret));
        if !holds {
            continue;
        }
        let request = Request::Rotated(RotatedRequest {
            secret: secret.to_owned(),
        });
        let answer = leases::ask(
            &control_socket(&record.runtime_dir),
            &request,
            ANSWER_TIMEOUT,
        );
        let failed = |error: String| Pushed {
            session: record.id.clone(),
            updated: false,
            env: Vec::new(),
            files: Vec::new(),
            error: Some(error),
        };
        out.push(match answer {
            Ok(Reply::Updated { env, files, .. }) => Pushed {
                session: record.id.clone(),
                updated: true,
                env,
                files,
                error: None,
            },
            Ok(Reply::Error { message, .. }) => failed(message),
            Ok(Reply::Renewed { .. }) => failed("the session answered something else".into()),
            Err(e) => failed(chain(&e)),
        });
    }
    out
}

/// Prints what [`push_rotation`] did, for people; failures are warnings.
pub(super) fn print_pushed(secret: &str, pushed: &[Pushed]) {
    for p in pushed {
        if p.updated {
            let mut what: Vec<String> = p.env.iter().map(|e| format!("env {e}")).collect();
            what.extend(p.files.iter().map(|f| format!("file ~/{f}")));
            if what.is_empty() {
                what.push("git credentials only (served from the vault per request)".into());
            }
            println!(
                "session `{}` now has the new value: {}",
                p.session,
                what.join(", ")
            );
        } else {
            eprintln!(
                "warning: session `{}` still has the old value of `{secret}`: {}; the rotation itself is stored",
                p.session,
                p.error.as_deref().unwrap_or("unknown error")
            );
        }
    }
}
