//! Leases during a session: `zerolease renew` and `renew: auto` extend a
//! running session's leases within their grants' maximum, and a rotated
//! secret is pushed into the sessions that hold it.
//!
//! Requests reach a running session over its control socket as one JSON
//! line (at most [`MAX_REQUEST_LEN`] bytes, beginning with `{`, so the
//! older plain-word commands `revoke` and `destroy` are untouched), and the
//! session answers with one JSON line ([`Reply`]).
//!
//! **Invariants:**
//! - A renewal moves the vault's lease first and then the proxy registry's
//!   deadline of the same lease ([`ProxyRegistry::extend_expiry`]), which
//!   only ever moves a live entry later: it never brings back a revoked or
//!   expired entry, so revocation stays immediate and expiry stays on its
//!   own clock.
//! - A rotated value leaves the vault only through the same code that
//!   provisioned the session (`provision::injected`, an audited access per
//!   lease) and travels only inside `UpdateSecrets`; requests, replies and
//!   logs carry names, never values.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::net::unix::OwnedWriteHalf;
use tokio::task::JoinSet;
use zerolease_protocol::HostMessage;

use super::{SessionError, provision};
use crate::clock::Timestamp;
use crate::manifest::{Manifest, Renew};
use crate::proxy::registry::{EntryId, ProxyRegistry, RegistryError, SessionId};
use crate::vault::{Lease, LeaseRefusal, LeaseStatus, Vault, VaultError};

/// Longest request line a session reads.
pub const MAX_REQUEST_LEN: usize = 1024;
/// Longest reply line a client reads.
pub const MAX_REPLY_LEN: usize = 64 * 1024;
/// Longest lease a renewal may ask for.
pub const MAX_TTL: Duration = Duration::from_secs(366 * 24 * 3600);
/// How long a failed automatic renewal waits before trying again.
const AUTO_RETRY: Duration = Duration::from_secs(5);
/// The shortest period an automatic renewal asks for.
const MIN_AUTO_PERIOD: Duration = Duration::from_secs(3);

/// What another `zerolease` process asks of a running session about its
/// leases.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Request {
    /// Renew the session's leases (all, or those of one secret).
    Renew(RenewRequest),
    /// The named secret was rotated: push its new value into the guest.
    Rotated(RotatedRequest),
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewRequest {
    /// Only the lease of this secret (the manifest's `credentials[].secret`).
    pub credential: Option<String>,
    /// The new lifetime from now; default: the credential's `ttl` in the
    /// manifest, or the grant's maximum. Always capped at the grant's
    /// maximum.
    pub ttl_secs: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RotatedRequest {
    pub secret: String,
}

/// Why a control line is not an acceptable lease request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("the request is longer than {MAX_REQUEST_LEN} bytes")]
    TooLong,
    #[error("the request is not valid: {0}")]
    Malformed(String),
    #[error("`{0}` is not a valid secret name")]
    BadName(String),
    #[error("the ttl must be between 1 second and {} days", MAX_TTL.as_secs() / 86400)]
    BadTtl,
}

impl Request {
    /// Parses one control line. `None` when the line is not a lease
    /// request at all (it does not begin with `{`), so other commands can
    /// be tried; otherwise the request or why it is refused.
    pub fn parse(line: &str) -> Option<Result<Request, RequestError>> {
        if !line.trim_start().starts_with('{') {
            return None;
        }
        Some(Request::parse_json(line))
    }

    fn parse_json(line: &str) -> Result<Request, RequestError> {
        // A reader bounded at the limit returns a line cut short, without
        // its newline: refuse it rather than act on a part.
        if line.len() > MAX_REQUEST_LEN || (line.len() == MAX_REQUEST_LEN && !line.ends_with('\n'))
        {
            return Err(RequestError::TooLong);
        }
        let request: Request = serde_json::from_str(line.trim())
            .map_err(|e| RequestError::Malformed(short(&e.to_string())))?;
        request.validate()?;
        Ok(request)
    }

    /// Checks the fields a parsed request carries; the client runs it too,
    /// so it never sends what a session would refuse.
    pub fn validate(&self) -> Result<(), RequestError> {
        let name_ok = |n: &str| crate::vault::policy::validate_name("secret", n).is_ok();
        match self {
            Request::Renew(r) => {
                if let Some(c) = &r.credential
                    && !name_ok(c)
                {
                    return Err(RequestError::BadName(short(c)));
                }
                if r.ttl_secs.is_some_and(|t| t == 0 || t > MAX_TTL.as_secs()) {
                    return Err(RequestError::BadTtl);
                }
            }
            Request::Rotated(r) => {
                if !name_ok(&r.secret) {
                    return Err(RequestError::BadName(short(&r.secret)));
                }
            }
        }
        Ok(())
    }

    /// The request as one line, newline included.
    pub fn to_line(&self) -> String {
        let mut s = serde_json::to_string(self).unwrap_or_default();
        s.push('\n');
        s
    }
}

/// Truncates text that goes back to a client: at most 200 characters, no
/// control characters.
fn short(s: &str) -> String {
    s.chars()
        .take(200)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// A session's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    /// One outcome per lease asked about.
    Renewed {
        leases: Vec<RenewOutcome>,
    },
    /// The guest holds the rotated value now: these env variables and
    /// files (home-relative paths) were rewritten. Git credentials are read
    /// from the vault per request, so they need nothing.
    Updated {
        secret: String,
        env: Vec<String>,
        files: Vec<String>,
    },
    Error {
        kind: ErrorKind,
        message: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request was malformed.
    Invalid,
    /// The session holds no lease of the named secret.
    NotFound,
    /// The session could not do it (the vault, the guest).
    Failed,
}

/// How the renewal of one lease went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenewOutcome {
    pub secret: String,
    pub lease: String,
    /// The expiry now in force (the new one when renewed).
    pub expires: Timestamp,
    /// The latest expiry renewals may reach.
    pub max_expires: Timestamp,
    /// `None` when renewed; otherwise why not, for the person at the
    /// terminal.
    pub refused: Option<String>,
}

/// Why one lease could not be renewed.
#[derive(Debug, thiserror::Error)]
pub enum RenewError {
    #[error(
        "the grant of secret `{secret}` does not allow renewal; ask an admin for a renewable grant (`zerolease policy grant --agent {agent} --secret {secret} ... --renewable`) and start a new session"
    )]
    NotRenewable { secret: String, agent: String },
    #[error(
        "the lease of secret `{secret}` is already at its grant's maximum lifetime (until {until}); start a new session for more time"
    )]
    AtMaximum { secret: String, until: String },
    #[error("the lease of secret `{secret}` cannot be renewed")]
    Ended {
        secret: String,
        #[source]
        reason: LeaseRefusal,
    },
    #[error("the vault could not renew the lease of secret `{secret}`")]
    Vault {
        secret: String,
        #[source]
        source: VaultError,
    },
    #[error(
        "the lease of secret `{secret}` was renewed in the vault, but the proxy had already cut it"
    )]
    Proxy {
        secret: String,
        #[source]
        source: RegistryError,
    },
}

impl RenewError {
    /// Whether trying again later cannot help.
    pub fn is_final(&self) -> bool {
        !matches!(self, RenewError::Vault { .. })
    }

    /// The message with its causes, for replies and logs.
    pub fn chain(&self) -> String {
        let mut s = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(e) = source {
            s.push_str(": ");
            s.push_str(&e.to_string());
            source = e.source();
        }
        s
    }
}

/// Renews lease `lease_id` of `session` in the vault for `ttl` (default: the
/// grant's maximum), then moves its proxy deadline to match.
pub fn renew_one(
    vault: &Vault,
    registry: Option<&ProxyRegistry>,
    session: &str,
    lease_id: &str,
    ttl: Option<Duration>,
) -> Result<Lease, RenewError> {
    let renewed = vault.renew(lease_id, ttl).map_err(|e| {
        let before = vault.get_lease(lease_id).ok();
        let secret = before
            .as_ref()
            .map_or_else(String::new, |l| l.secret.clone());
        match e {
            VaultError::LeaseRefused { reason, .. } => match reason {
                LeaseRefusal::NotRenewable => RenewError::NotRenewable {
                    agent: before.map_or_else(String::new, |l| l.agent),
                    secret,
                },
                LeaseRefusal::AtMaximum => RenewError::AtMaximum {
                    until: before.map_or_else(String::new, |l| l.max_expires.rfc3339()),
                    secret,
                },
                reason => RenewError::Ended { secret, reason },
            },
            source => RenewError::Vault { secret, source },
        }
    })?;
    if let Some(registry) = registry {
        let left = renewed.time_left(vault.now());
        registry
            .extend_expiry(
                &SessionId::new(session),
                &EntryId::new(renewed.id.0.clone()),
                tokio::time::Instant::now() + left,
            )
            .map_err(|source| RenewError::Proxy {
                secret: renewed.secret.clone(),
                source,
            })?;
    }
    tracing::info!(
        session,
        secret = %renewed.secret,
        lease = %renewed.id,
        expires = %renewed.expires.rfc3339(),
        "lease renewed"
    );
    Ok(renewed)
}

/// What a running session needs to answer lease requests.
pub(super) struct Ctx<'a> {
    pub(super) vault: &'a Arc<Vault>,
    pub(super) manifest: &'a Manifest,
    pub(super) leases: &'a [(usize, Lease)],
    pub(super) registry: Option<&'a ProxyRegistry>,
    pub(super) session: &'a str,
}

/// Answers a control line that is not one of the word commands: a lease
/// request, or `error: unknown command`.
pub(super) async fn on_line(
    ctx: &Ctx<'_>,
    line: &str,
    channel: &mut (impl tokio::io::AsyncWrite + Unpin),
    pending: &mut PendingUpdates,
    mut write: OwnedWriteHalf,
) -> Result<(), SessionError> {
    match Request::parse(line) {
        Some(Ok(Request::Renew(r))) => send_reply(write, renew(ctx, &r)),
        Some(Ok(Request::Rotated(r))) => rotated(ctx, &r.secret, channel, pending, write).await?,
        Some(Err(e)) => send_reply(
            write,
            Reply::Error {
                kind: ErrorKind::Invalid,
                message: e.to_string(),
            },
        ),
        None => {
            let _ = write.write_all(b"error: unknown command\n").await;
        }
    }
    Ok(())
}

/// Renews the session's leases as `req` asks.
pub(super) fn renew(ctx: &Ctx<'_>, req: &RenewRequest) -> Reply {
    let chosen: Vec<&(usize, Lease)> = ctx
        .leases
        .iter()
        .filter(|(_, l)| req.credential.as_ref().is_none_or(|c| *c == l.secret))
        .collect();
    if chosen.is_empty() {
        let held: Vec<&str> = ctx.leases.iter().map(|(_, l)| l.secret.as_str()).collect();
        return Reply::Error {
            kind: ErrorKind::NotFound,
            message: match &req.credential {
                Some(c) => format!(
                    "session `{}` holds no lease of secret `{c}`; it holds {}",
                    ctx.session,
                    if held.is_empty() {
                        "none".to_owned()
                    } else {
                        held.join(", ")
                    }
                ),
                None => format!("session `{}` holds no leases", ctx.session),
            },
        };
    }
    let outcomes = chosen
        .into_iter()
        .map(|(index, lease)| {
            let ttl = req
                .ttl_secs
                .map(Duration::from_secs)
                .or(ctx.manifest.credentials[*index].ttl);
            match renew_one(ctx.vault, ctx.registry, ctx.session, &lease.id.0, ttl) {
                Ok(l) => RenewOutcome {
                    secret: l.secret,
                    lease: l.id.0,
                    expires: l.expires,
                    max_expires: l.max_expires,
                    refused: None,
                },
                Err(e) => {
                    tracing::info!(session = ctx.session, "renewal refused: {}", e.chain());
                    let now = ctx.vault.get_lease(&lease.id.0).ok();
                    RenewOutcome {
                        secret: lease.secret.clone(),
                        lease: lease.id.0.clone(),
                        expires: now.as_ref().map_or(lease.expires, |l| l.expires),
                        max_expires: lease.max_expires,
                        refused: Some(e.chain()),
                    }
                }
            }
        })
        .collect();
    Reply::Renewed { leases: outcomes }
}

/// Rotation replies waiting for the guest's answer, oldest first: the
/// guest answers `UpdateSecrets` in the order it receives them.
#[derive(Default)]
pub(super) struct PendingUpdates(VecDeque<(OwnedWriteHalf, Reply)>);

impl PendingUpdates {
    /// The guest answered the oldest `UpdateSecrets`: `Ok` or its reason.
    pub(super) fn answer(&mut self, outcome: Result<(), String>) {
        let Some((write, done)) = self.0.pop_front() else {
            tracing::warn!("the guest answered an update nobody asked for");
            return;
        };
        let reply = match outcome {
            Ok(()) => done,
            Err(reason) => {
                tracing::warn!("the guest could not update secrets: {}", short(&reason));
                Reply::Error {
                    kind: ErrorKind::Failed,
                    message: format!("the guest could not update the files: {}", short(&reason)),
                }
            }
        };
        send_reply(write, reply);
    }
}

/// Writes `reply` as one line without holding up the session's loop.
pub(super) fn send_reply(mut write: OwnedWriteHalf, reply: Reply) {
    tokio::spawn(async move {
        let mut line = serde_json::to_vec(&reply).unwrap_or_default();
        line.push(b'\n');
        let _ = tokio::time::timeout(Duration::from_secs(5), write.write_all(&line)).await;
    });
}

/// Pushes the rotated value of `secret` into the guest: rebuilds the env
/// variables and files of every credential using it and sends
/// `UpdateSecrets`; the reply goes out when the guest answers.
pub(super) async fn rotated(
    ctx: &Ctx<'_>,
    secret: &str,
    channel: &mut (impl tokio::io::AsyncWrite + Unpin),
    pending: &mut PendingUpdates,
    write: OwnedWriteHalf,
) -> Result<(), SessionError> {
    let using: Vec<(usize, Lease)> = ctx
        .leases
        .iter()
        .filter(|(_, l)| l.secret == secret)
        .cloned()
        .collect();
    if using.is_empty() {
        send_reply(
            write,
            Reply::Error {
                kind: ErrorKind::NotFound,
                message: format!(
                    "session `{}` holds no lease of secret `{secret}`",
                    ctx.session
                ),
            },
        );
        return Ok(());
    }
    let injected = match provision::injected(ctx.vault, ctx.manifest, &using) {
        Ok(i) => i,
        Err(e) => {
            tracing::warn!(session = ctx.session, %secret, "cannot push the rotated secret: {e}");
            send_reply(
                write,
                Reply::Error {
                    kind: ErrorKind::Failed,
                    message: format!("cannot read the rotated secret `{secret}`: {e}"),
                },
            );
            return Ok(());
        }
    };
    let done = Reply::Updated {
        secret: secret.to_owned(),
        env: injected.env.iter().map(|v| v.name.clone()).collect(),
        files: injected.files.iter().map(|f| f.path.clone()).collect(),
    };
    if injected.env.is_empty() && injected.files.is_empty() {
        // Only git uses it, and the helper reads the vault per request.
        send_reply(write, done);
        return Ok(());
    }
    super::send(
        channel,
        &HostMessage::UpdateSecrets {
            env: injected.env,
            files: injected.files,
        },
    )
    .await?;
    tracing::info!(session = ctx.session, %secret, "pushed the rotated secret to the guest");
    pending.0.push_back((write, done));
    Ok(())
}

/// What the automatic renewer does next for one lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AutoStep {
    /// Nothing to do for this long.
    Wait(Duration),
    /// Renew now, for the lease's period.
    RenewNow,
    /// Renewing is over for this lease.
    Stop(&'static str),
}

/// The automatic renewer's decision at `now` for `lease`, whose period
/// (the lifetime each renewal asks for) is `period`: renew when a third of
/// the period is left (at least a second before the expiry), until the
/// grant's maximum.
pub fn auto_step(lease: &Lease, period: Duration, now: Timestamp) -> AutoStep {
    match lease.status(now) {
        LeaseStatus::Active => {}
        LeaseStatus::Revoked => return AutoStep::Stop("the lease was revoked"),
        LeaseStatus::Expired => return AutoStep::Stop("the lease has expired"),
        LeaseStatus::Exhausted => return AutoStep::Stop("the lease has no uses left"),
    }
    if !lease.renewable {
        return AutoStep::Stop("its grant does not allow renewal");
    }
    if lease.expires >= lease.max_expires {
        return AutoStep::Stop("the lease is at its grant's maximum lifetime");
    }
    let due = lease
        .expires
        .saturating_sub((period / 3).max(Duration::from_secs(1)));
    if now >= due {
        AutoStep::RenewNow
    } else {
        AutoStep::Wait(now.until(due))
    }
}

/// One lease the automatic renewer keeps alive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AutoJob {
    pub lease: String,
    pub secret: String,
    pub period: Duration,
}

/// The `renew: auto` leases of a session, with their periods: the
/// credential's `ttl`, or the lease's first lifetime.
pub(super) fn auto_jobs(manifest: &Manifest, leases: &[(usize, Lease)]) -> Vec<AutoJob> {
    leases
        .iter()
        .filter(|(i, _)| manifest.credentials[*i].renew == Renew::Auto)
        .map(|(i, l)| AutoJob {
            lease: l.id.0.clone(),
            secret: l.secret.clone(),
            period: manifest.credentials[*i]
                .ttl
                .unwrap_or_else(|| l.issued.until(l.expires))
                .max(MIN_AUTO_PERIOD),
        })
        .collect()
}

/// The running automatic renewers of a session; dropping it stops them, so
/// they end with the session.
#[derive(Debug, Default)]
pub struct AutoRenewer {
    /// Held only to abort the tasks when dropped.
    _tasks: JoinSet<()>,
}

impl AutoRenewer {
    /// Starts one renewer per job. Must be called within a tokio runtime.
    pub fn spawn(
        vault: Arc<Vault>,
        registry: ProxyRegistry,
        session: String,
        jobs: Vec<AutoJob>,
    ) -> AutoRenewer {
        let mut set = JoinSet::new();
        for job in jobs {
            set.spawn(auto_renew(
                vault.clone(),
                registry.clone(),
                session.clone(),
                job,
            ));
        }
        AutoRenewer { _tasks: set }
    }
}

async fn auto_renew(vault: Arc<Vault>, registry: ProxyRegistry, session: String, job: AutoJob) {
    loop {
        let lease = match vault.get_lease(&job.lease) {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(%session, secret = %job.secret, "automatic renewal stops: {e}");
                return;
            }
        };
        match auto_step(&lease, job.period, vault.now()) {
            AutoStep::Stop(why) => {
                tracing::info!(%session, secret = %job.secret, "automatic renewal stops: {why}");
                return;
            }
            AutoStep::Wait(d) => tokio::time::sleep(d).await,
            AutoStep::RenewNow => {
                match renew_one(
                    &vault,
                    Some(&registry),
                    &session,
                    &job.lease,
                    Some(job.period),
                ) {
                    // A renewal that gained nothing would only repeat.
                    Ok(renewed) if renewed.expires <= lease.expires => {
                        tracing::info!(%session, secret = %job.secret, "automatic renewal stops: it no longer extends the lease");
                        return;
                    }
                    Ok(_) => {}
                    Err(e) if e.is_final() => {
                        tracing::warn!(%session, "automatic renewal stops: {}", e.chain());
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(%session, "automatic renewal failed, retrying: {}", e.chain());
                        tokio::time::sleep(AUTO_RETRY).await;
                    }
                }
            }
        }
    }
}

/// Why a client could not get an answer from a session.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot reach the session's control socket {}", path.display())]
    Connect {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the session did not answer")]
    Io(#[source] std::io::Error),
    #[error("the session ended before it answered")]
    Ended,
    #[error("the session's answer is not understood")]
    Reply(#[source] serde_json::Error),
    #[error(transparent)]
    Request(#[from] RequestError),
}

/// Sends `request` to the session whose control socket is `socket` and
/// waits (at most `timeout`) for its one-line reply.
pub fn ask(socket: &Path, request: &Request, timeout: Duration) -> Result<Reply, ControlError> {
    use std::io::{BufRead, Read, Write};
    request.validate()?;
    let mut stream = std::os::unix::net::UnixStream::connect(socket).map_err(|source| {
        ControlError::Connect {
            path: socket.to_owned(),
            source,
        }
    })?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(ControlError::Io)?;
    stream
        .set_write_timeout(Some(timeout))
        .map_err(ControlError::Io)?;
    stream
        .write_all(request.to_line().as_bytes())
        .map_err(ControlError::Io)?;
    let mut line = String::new();
    std::io::BufReader::new((&stream).take(MAX_REPLY_LEN as u64))
        .read_line(&mut line)
        .map_err(ControlError::Io)?;
    if line.trim().is_empty() {
        return Err(ControlError::Ended);
    }
    serde_json::from_str(line.trim()).map_err(ControlError::Reply)
}

#[cfg(test)]
mod tests;
