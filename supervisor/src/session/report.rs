//! The end-of-session report: what a session was granted and used, where
//! it went, what was refused and why, how it ended, and how long each phase
//! took.
//!
//! [`build`] is a pure function of the session's audit records (leases,
//! accesses, renewals, revocations, tunnels, refusals — written by the vault
//! and by `proxy_audit`) and the run's outcome, so it is tested with
//! synthetic audit sequences. [`SessionReport::human`] renders it for a
//! terminal; JSON is its serde form. The report is stored next to the
//! session's record (`<home>/sessions/<id>/report.json`) so `zerolease
//! inspect` shows it later.
//!
//! **Invariant:** the report is built only from audit records, which hold
//! names, ids, domains and counts — never a secret value — and from the
//! session's outcome; it therefore never holds a secret either.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::progress::PhaseTiming;
use crate::clock::Timestamp;
use crate::home::StateDir;
use crate::vault::AuditRecord;

/// The report format's version, bumped when a field changes meaning.
pub const REPORT_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionReport {
    pub version: u32,
    pub session: String,
    pub name: String,
    pub image: String,
    pub started: Timestamp,
    pub ended: Timestamp,
    /// `destroyed` when the agent ran to its end (or `zerolease destroy`),
    /// `failed` otherwise.
    pub state: String,
    /// The agent's exit code; `None` when it was killed by a signal or never
    /// ran.
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    /// Why zerolease itself failed the session, if it did.
    pub error: Option<String>,
    pub durations: Durations,
    pub leases: Vec<LeaseSummary>,
    /// Leases the vault refused when the session asked.
    pub lease_denials: Vec<Denial>,
    /// Every name a tunnel reached, by name.
    pub domains: Vec<DomainSummary>,
    pub refused: Refusals,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Durations {
    pub total_seconds: f64,
    pub phases: Vec<PhaseTiming>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseSummary {
    pub lease: String,
    pub secret: String,
    pub domains: Vec<String>,
    /// The lifetime granted at first issue.
    pub ttl_seconds: Option<u64>,
    /// Uses of the lease's value: injection into the guest and git
    /// credential answers.
    pub accesses: u64,
    pub accesses_denied: u64,
    pub renewals: u64,
    pub renewals_denied: u64,
    /// Connections the proxy admitted under this lease.
    pub connections: u64,
    pub revoked: bool,
    pub expired: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Denial {
    pub secret: String,
    pub reason: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainSummary {
    pub domain: String,
    /// Tunnels opened.
    pub connections: u64,
    /// Bytes from the guest to the upstream, over closed tunnels.
    pub bytes_up: u64,
    /// Bytes from the upstream to the guest, over closed tunnels.
    pub bytes_down: u64,
    /// How the tunnels ended (`client closed`, `revoked`, …) and how often.
    pub ends: BTreeMap<String, u64>,
    /// The secret whose lease admitted them, or `None` for allow entries.
    pub secret: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusals {
    pub total: u64,
    /// Counts by the proxy's reason.
    pub by_reason: BTreeMap<String, u64>,
    /// Counts by requested name and reason (`-` when the request named none).
    pub by_name: Vec<NamedRefusal>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamedRefusal {
    pub name: String,
    pub reason: String,
    pub count: u64,
}

/// How the run ended, as `session::run` saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ending {
    pub state: String,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub error: Option<String>,
}

/// The session's facts that are not in the audit log.
#[derive(Debug, Clone)]
pub struct Facts<'a> {
    pub session: &'a str,
    pub name: &'a str,
    pub image: &'a str,
    pub started: Timestamp,
    pub ended: Timestamp,
    pub ending: Ending,
    pub phases: &'a [PhaseTiming],
}

/// `"<N> B up, <M> B down"` inside a `tunnel_closed` detail.
pub fn tunnel_bytes(detail: &str) -> Option<(u64, u64)> {
    detail.split("; ").find_map(|part| {
        let (up, down) = part.split_once(", ")?;
        let up = up.strip_suffix(" B up")?.parse().ok()?;
        let down = down.strip_suffix(" B down")?.parse().ok()?;
        Some((up, down))
    })
}

/// How a tunnel ended: the last part of a `tunnel_closed` detail.
fn tunnel_end(detail: &str) -> String {
    detail
        .rsplit("; ")
        .next()
        .filter(|s| !s.is_empty())
        .unwrap_or("unknown")
        .to_owned()
}

/// The reason of a `connection_refused` detail (`"<front end>: <reason>;
/// port …; from …"`).
pub fn refusal_reason(detail: &str) -> String {
    let head = detail.split("; ").next().unwrap_or("");
    let reason = head.split_once(": ").map_or(head, |(_, r)| r).trim();
    if reason.is_empty() {
        "unknown".to_owned()
    } else {
        reason.to_owned()
    }
}

/// The lifetime of a lease from its `lease_granted` record: the record's
/// time to the `expires <time>` in its detail.
fn granted_ttl(r: &AuditRecord) -> Option<u64> {
    let at = r
        .detail
        .split("; ")
        .find_map(|p| p.strip_prefix("expires "))?;
    let expires = Timestamp::from_system_time(humantime::parse_rfc3339_weak(at).ok()?);
    Some(r.time.until(expires).as_secs_f64().round() as u64)
}

fn domains_of(r: &AuditRecord) -> Vec<String> {
    let Some(d) = &r.domain else {
        return Vec::new();
    };
    serde_json::from_str::<Vec<String>>(d).unwrap_or_else(|_| vec![d.clone()])
}

/// Builds the report of session `facts.session` from its audit records
/// (records of other sessions are ignored).
pub fn build(facts: &Facts<'_>, audit: &[AuditRecord]) -> SessionReport {
    let mut leases: Vec<LeaseSummary> = Vec::new();
    let mut denials = Vec::new();
    let mut domains: BTreeMap<String, DomainSummary> = BTreeMap::new();
    let mut refused = Refusals::default();
    let mut by_name: BTreeMap<(String, String), u64> = BTreeMap::new();

    fn lease_of<'l>(
        leases: &'l mut [LeaseSummary],
        r: &AuditRecord,
    ) -> Option<&'l mut LeaseSummary> {
        let id = r.lease.as_deref()?;
        leases.iter_mut().find(|l| l.lease == id)
    }

    for r in audit
        .iter()
        .filter(|r| r.session.as_deref() == Some(facts.session))
    {
        match r.event.as_str() {
            "lease_granted" => leases.push(LeaseSummary {
                lease: r.lease.clone().unwrap_or_default(),
                secret: r.secret.clone().unwrap_or_default(),
                domains: domains_of(r),
                ttl_seconds: granted_ttl(r),
                ..LeaseSummary::default()
            }),
            "lease_denied" => denials.push(Denial {
                secret: r.secret.clone().unwrap_or_default(),
                reason: r.detail.clone(),
            }),
            "lease_accessed" => {
                if let Some(l) = lease_of(&mut leases, r) {
                    l.accesses += 1;
                }
            }
            "access_denied" => {
                if let Some(l) = lease_of(&mut leases, r) {
                    l.accesses_denied += 1;
                }
            }
            "lease_renewed" => {
                if let Some(l) = lease_of(&mut leases, r) {
                    l.renewals += 1;
                }
            }
            "renew_denied" => {
                if let Some(l) = lease_of(&mut leases, r) {
                    l.renewals_denied += 1;
                }
            }
            "lease_revoked" => {
                if let Some(l) = lease_of(&mut leases, r) {
                    l.revoked = true;
                }
            }
            "lease_expired" => {
                if let Some(l) = lease_of(&mut leases, r) {
                    l.expired = true;
                }
            }
            "tunnel_opened" => {
                let name = r.domain.clone().unwrap_or_else(|| "-".into());
                let d = domains
                    .entry(name.clone())
                    .or_insert_with(|| DomainSummary {
                        domain: name,
                        ..DomainSummary::default()
                    });
                d.connections += 1;
                if d.secret.is_none() {
                    d.secret = r.secret.clone();
                }
                if let Some(l) = lease_of(&mut leases, r) {
                    l.connections += 1;
                }
            }
            "tunnel_closed" => {
                let name = r.domain.clone().unwrap_or_else(|| "-".into());
                let d = domains
                    .entry(name.clone())
                    .or_insert_with(|| DomainSummary {
                        domain: name,
                        ..DomainSummary::default()
                    });
                if let Some((up, down)) = tunnel_bytes(&r.detail) {
                    d.bytes_up += up;
                    d.bytes_down += down;
                }
                *d.ends.entry(tunnel_end(&r.detail)).or_default() += 1;
            }
            "connection_refused" => {
                let reason = refusal_reason(&r.detail);
                let name = r.domain.clone().unwrap_or_else(|| "-".into());
                refused.total += 1;
                *refused.by_reason.entry(reason.clone()).or_default() += 1;
                *by_name.entry((name, reason)).or_default() += 1;
            }
            _ => {}
        }
    }
    refused.by_name = by_name
        .into_iter()
        .map(|((name, reason), count)| NamedRefusal {
            name,
            reason,
            count,
        })
        .collect();
    SessionReport {
        version: REPORT_VERSION,
        session: facts.session.to_owned(),
        name: facts.name.to_owned(),
        image: facts.image.to_owned(),
        started: facts.started,
        ended: facts.ended,
        state: facts.ending.state.clone(),
        exit_code: facts.ending.exit_code,
        signal: facts.ending.signal,
        error: facts.ending.error.clone(),
        durations: Durations {
            total_seconds: facts.started.until(facts.ended).as_secs_f64(),
            phases: facts.phases.to_vec(),
        },
        leases,
        lease_denials: denials,
        domains: domains.into_values().collect(),
        refused,
    }
}

/// Whether every tunnel opened in `audit` for `session` also has its
/// closing record: the proxy writes those from a background thread, so the
/// report waits for them.
pub fn tunnels_settled(session: &str, audit: &[AuditRecord]) -> bool {
    let count = |event: &str| {
        audit
            .iter()
            .filter(|r| r.session.as_deref() == Some(session) && r.event == event)
            .count()
    };
    count("tunnel_closed") >= count("tunnel_opened")
}

/// Whether the session's last phase ended well: the agent exited (whatever
/// its code) or `zerolease destroy` ended it.
pub(super) fn ran_through(result: &Result<super::RunOutcome, super::SessionError>) -> bool {
    matches!(result, Ok(_) | Err(super::SessionError::Destroyed))
}

/// How `result` ended, for the report.
pub fn ending(result: &Result<super::RunOutcome, super::SessionError>) -> Ending {
    match result {
        Ok(o) => Ending {
            state: "destroyed".into(),
            exit_code: o.code,
            signal: o.signal,
            error: None,
        },
        Err(super::SessionError::Destroyed) => Ending {
            state: "destroyed".into(),
            exit_code: None,
            signal: None,
            error: Some(super::SessionError::Destroyed.to_string()),
        },
        Err(e) => Ending {
            state: "failed".into(),
            exit_code: None,
            signal: None,
            error: Some(e.to_string()),
        },
    }
}

/// Builds the report of the session `held` ran, once the proxy's closing
/// records are in (bounded wait), and stores it. `None` when the session
/// never got an id.
pub(super) async fn finish(
    vault: &crate::vault::Vault,
    held: &super::Held,
    result: &Result<super::RunOutcome, super::SessionError>,
) -> Option<SessionReport> {
    let (home, record) = held.record.as_ref()?;
    let filter = || crate::vault::AuditFilter {
        session: Some(record.id.clone()),
        ..crate::vault::AuditFilter::default()
    };
    let read = || -> Vec<AuditRecord> {
        vault
            .audit_list(filter())
            .map(|v| v.into_iter().map(|r| r.record).collect())
            .unwrap_or_else(|e| {
                tracing::warn!("the report cannot read the audit log: {e}");
                Vec::new()
            })
    };
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(3);
    let mut audit = read();
    while !tunnels_settled(&record.id, &audit) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        audit = read();
    }
    let facts = Facts {
        session: &record.id,
        name: &record.name,
        image: &record.image,
        started: record.started,
        ended: vault.now(),
        ending: ending(result),
        phases: held.progress.timings(),
    };
    let report = build(&facts, &audit);
    if let Err(e) = report.save(home) {
        tracing::warn!("could not store the session's report: {e}");
    }
    Some(report)
}

/// `1536` → `1.5 KiB`.
pub fn format_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = UNITS[0];
    for u in &UNITS[1..] {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    format!("{v:.1} {unit}")
}

impl SessionReport {
    /// The report for a person, several lines, each ending in `\n`.
    pub fn human(&self) -> String {
        let mut s = String::new();
        let ended = match (self.exit_code, self.signal, &self.error) {
            (_, _, Some(e)) => format!("failed: {e}"),
            (Some(c), _, None) => format!("agent exit code {c}"),
            (None, Some(sig), None) => format!("agent killed by signal {sig}"),
            (None, None, None) => "agent did not run".to_owned(),
        };
        s.push_str(&format!(
            "── session {} ({}, image {}): {ended}\n",
            self.session, self.name, self.image
        ));
        let phases: Vec<String> = self
            .durations
            .phases
            .iter()
            .map(|p| {
                format!(
                    "{} {:.2}s{}",
                    p.phase.label(),
                    p.seconds,
                    if p.ok { "" } else { " (failed)" }
                )
            })
            .collect();
        s.push_str(&format!(
            "   time: {:.2}s total{}{}\n",
            self.durations.total_seconds,
            if phases.is_empty() { "" } else { " — " },
            phases.join(", ")
        ));
        if self.leases.is_empty() && self.lease_denials.is_empty() {
            s.push_str("   leases: none\n");
        } else {
            s.push_str("   leases:\n");
        }
        for l in &self.leases {
            let mut notes = Vec::new();
            if let Some(t) = l.ttl_seconds {
                notes.push(format!(
                    "ttl {}",
                    humantime::format_duration(std::time::Duration::from_secs(t))
                ));
            }
            notes.push(format!("{} access(es)", l.accesses));
            notes.push(format!("{} connection(s)", l.connections));
            if l.accesses_denied > 0 {
                notes.push(format!("{} access(es) denied", l.accesses_denied));
            }
            if l.renewals > 0 || l.renewals_denied > 0 {
                notes.push(format!(
                    "{} renewal(s), {} refused",
                    l.renewals, l.renewals_denied
                ));
            }
            if l.expired {
                notes.push("expired".into());
            }
            if l.revoked {
                notes.push("revoked".into());
            }
            s.push_str(&format!(
                "     {} → {}: {}\n",
                l.secret,
                l.domains.join(", "),
                notes.join(", ")
            ));
        }
        for d in &self.lease_denials {
            s.push_str(&format!("     {} DENIED: {}\n", d.secret, d.reason));
        }
        if self.domains.is_empty() {
            s.push_str("   reached: nothing\n");
        } else {
            s.push_str("   reached:\n");
        }
        for d in &self.domains {
            s.push_str(&format!(
                "     {}: {} connection(s), {} up, {} down{}\n",
                d.domain,
                d.connections,
                format_bytes(d.bytes_up),
                format_bytes(d.bytes_down),
                d.secret
                    .as_ref()
                    .map(|x| format!(" (lease of {x})"))
                    .unwrap_or_else(|| " (allow entry)".into())
            ));
        }
        if self.refused.total == 0 {
            s.push_str("   refused: nothing\n");
        } else {
            s.push_str(&format!("   refused: {}\n", self.refused.total));
            for n in &self.refused.by_name {
                s.push_str(&format!("     {} ×{}: {}\n", n.name, n.count, n.reason));
            }
        }
        s
    }

    /// Where the report of session `id` is kept.
    pub fn path(home: &StateDir, id: &str) -> PathBuf {
        super::record::sessions_dir(home)
            .join(id)
            .join("report.json")
    }

    /// Stores the report next to the session's record, mode 0600, atomically.
    pub fn save(&self, home: &StateDir) -> std::io::Result<PathBuf> {
        let path = SessionReport::path(home, &self.session);
        if let Some(dir) = path.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
        }
        write_json(&path, self)?;
        Ok(path)
    }

    pub fn load(home: &StateDir, id: &str) -> std::io::Result<SessionReport> {
        let text = std::fs::read_to_string(SessionReport::path(home, id))?;
        serde_json::from_str(&text).map_err(std::io::Error::other)
    }
}

/// Writes `value` as pretty JSON to `path` (temp file, then rename), mode
/// 0600.
pub fn write_json<T: Serialize>(path: &std::path::Path, value: &T) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    serde_json::to_writer_pretty(&mut f, value)?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::progress::Phase;
    use crate::vault::{AuditKind, Outcome};

    const S: &str = "abc123def0";
    const T0: u64 = 1_800_000_000_000;

    fn at(ms: u64, kind: AuditKind, outcome: Outcome) -> AuditRecord {
        AuditRecord::new(Timestamp(T0 + ms), kind, outcome).session(S)
    }

    fn granted(lease: &str, secret: &str, domains: &str, ttl_s: u64) -> AuditRecord {
        let expires = Timestamp(T0 + ttl_s * 1000).rfc3339();
        at(0, AuditKind::LeaseGranted, Outcome::Ok)
            .agent("ci")
            .secret(secret)
            .lease(lease)
            .domain(domains)
            .detail(format!("grant 1; expires {expires}; uses unlimited"))
    }

    fn closed(
        domain: &str,
        lease: Option<(&str, &str)>,
        up: u64,
        down: u64,
        end: &str,
    ) -> AuditRecord {
        let r = at(5, AuditKind::TunnelClosed, Outcome::Ok).domain(domain);
        match lease {
            Some((l, s)) => r.lease(l).secret(s).detail(format!(
                "connect to 198.18.0.2:443; {up} B up, {down} B down; 20 ms; {end}"
            )),
            None => r.detail(format!(
                "allow entry allow-0-x; transparent to 198.18.0.2:443; {up} B up, {down} B down; 20 ms; {end}"
            )),
        }
    }

    fn refused(domain: Option<&str>, front: &str, reason: &str) -> AuditRecord {
        let mut r = at(6, AuditKind::ConnectionRefused, Outcome::Denied);
        if let Some(d) = domain {
            r = r.domain(d);
        }
        r.detail(format!(
            "{front}: {reason}; port 443; from 10.213.0.2:40000"
        ))
    }

    fn facts<'a>(phases: &'a [PhaseTiming]) -> Facts<'a> {
        Facts {
            session: S,
            name: "ci",
            image: "minimal",
            started: Timestamp(T0),
            ended: Timestamp(T0 + 12_500),
            ending: Ending {
                state: "destroyed".into(),
                exit_code: Some(7),
                signal: None,
                error: None,
            },
            phases,
        }
    }

    fn synthetic() -> Vec<AuditRecord> {
        vec![
            at(0, AuditKind::SessionTransition, Outcome::Ok).detail("created: manifest ci"),
            granted("L1", "api", r#"["api.example.test"]"#, 600),
            granted("L2", "npm", r#"["*.npmjs.org","npmjs.org"]"#, 900),
            at(1, AuditKind::LeaseDenied, Outcome::Denied)
                .secret("prod-db")
                .detail("no grant lets agent `ci` lease `prod-db`"),
            at(2, AuditKind::LeaseAccessed, Outcome::Ok)
                .secret("api")
                .lease("L1"),
            at(2, AuditKind::LeaseAccessed, Outcome::Ok)
                .secret("api")
                .lease("L1"),
            at(3, AuditKind::AccessDenied, Outcome::Denied)
                .secret("npm")
                .lease("L2"),
            at(3, AuditKind::LeaseRenewed, Outcome::Ok).lease("L1"),
            at(3, AuditKind::RenewDenied, Outcome::Denied).lease("L2"),
            at(4, AuditKind::TunnelOpened, Outcome::Ok)
                .domain("api.example.test")
                .lease("L1")
                .secret("api"),
            at(4, AuditKind::TunnelOpened, Outcome::Ok)
                .domain("api.example.test")
                .lease("L1")
                .secret("api"),
            at(4, AuditKind::TunnelOpened, Outcome::Ok)
                .domain("open.example.test")
                .detail("allow entry allow-0-x; transparent to 198.18.0.2:443"),
            closed(
                "api.example.test",
                Some(("L1", "api")),
                100,
                2000,
                "client closed",
            ),
            closed("api.example.test", Some(("L1", "api")), 50, 0, "revoked"),
            closed("open.example.test", None, 7, 9, "upstream closed"),
            refused(
                Some("evil.example"),
                "connect",
                "no active lease or allow entry covers this host",
            ),
            refused(
                Some("evil.example"),
                "transparent",
                "no active lease or allow entry covers this host",
            ),
            refused(
                Some("api.example.test"),
                "connect",
                "this port is not allowed for this host",
            ),
            refused(
                None,
                "transparent",
                "the TLS ClientHello has no server name",
            ),
            at(7, AuditKind::LeaseRevoked, Outcome::Ok)
                .lease("L1")
                .detail("session ended"),
            at(7, AuditKind::LeaseExpired, Outcome::Ok).lease("L2"),
            // Another session's records must not count.
            AuditRecord::new(Timestamp(T0), AuditKind::TunnelOpened, Outcome::Ok)
                .session("other00000")
                .domain("api.example.test"),
            AuditRecord::new(Timestamp(T0), AuditKind::ConnectionRefused, Outcome::Denied)
                .session("other00000")
                .detail("connect: invalid host name"),
        ]
    }

    #[test]
    fn leases_granted_used_renewed_and_ended() {
        let phases = [PhaseTiming {
            phase: Phase::Boot,
            seconds: 6.5,
            ok: true,
        }];
        let r = build(&facts(&phases), &synthetic());
        assert_eq!(r.leases.len(), 2);
        let api = &r.leases[0];
        assert_eq!(
            (api.lease.as_str(), api.secret.as_str(), api.domains.clone()),
            ("L1", "api", vec!["api.example.test".to_owned()])
        );
        assert_eq!(api.ttl_seconds, Some(600));
        assert_eq!((api.accesses, api.accesses_denied), (2, 0));
        assert_eq!((api.renewals, api.renewals_denied), (1, 0));
        assert_eq!(api.connections, 2);
        assert!(api.revoked && !api.expired);
        let npm = &r.leases[1];
        assert_eq!(npm.domains, vec!["*.npmjs.org", "npmjs.org"]);
        assert_eq!(npm.ttl_seconds, Some(900));
        assert_eq!((npm.accesses, npm.accesses_denied), (0, 1));
        assert_eq!(npm.renewals_denied, 1);
        assert!(npm.expired && !npm.revoked);
        assert_eq!(
            r.lease_denials,
            vec![Denial {
                secret: "prod-db".into(),
                reason: "no grant lets agent `ci` lease `prod-db`".into()
            }]
        );
    }

    #[test]
    fn domains_reached_with_bytes_and_ends() {
        let r = build(&facts(&[]), &synthetic());
        assert_eq!(r.domains.len(), 2);
        let api = &r.domains[0];
        assert_eq!(api.domain, "api.example.test");
        assert_eq!(
            api.connections, 2,
            "the other session's tunnel is not counted"
        );
        assert_eq!((api.bytes_up, api.bytes_down), (150, 2000));
        assert_eq!(api.ends.get("client closed"), Some(&1));
        assert_eq!(api.ends.get("revoked"), Some(&1));
        assert_eq!(api.secret.as_deref(), Some("api"));
        let open = &r.domains[1];
        assert_eq!(
            (open.connections, open.bytes_up, open.bytes_down),
            (1, 7, 9)
        );
        assert_eq!(open.secret, None);
    }

    #[test]
    fn refusals_by_reason_and_name() {
        let r = build(&facts(&[]), &synthetic());
        assert_eq!(r.refused.total, 4);
        assert_eq!(
            r.refused
                .by_reason
                .get("no active lease or allow entry covers this host"),
            Some(&2)
        );
        assert_eq!(
            r.refused
                .by_reason
                .get("the TLS ClientHello has no server name"),
            Some(&1)
        );
        assert!(!r.refused.by_reason.contains_key("invalid host name"));
        let evil = r
            .refused
            .by_name
            .iter()
            .find(|n| n.name == "evil.example")
            .unwrap();
        assert_eq!(evil.count, 2);
        assert!(
            r.refused
                .by_name
                .iter()
                .any(|n| n.name == "-" && n.count == 1)
        );
    }

    #[test]
    fn outcome_and_durations() {
        let phases = [
            PhaseTiming {
                phase: Phase::ImageCheck,
                seconds: 0.1,
                ok: true,
            },
            PhaseTiming {
                phase: Phase::Boot,
                seconds: 6.5,
                ok: false,
            },
        ];
        let mut f = facts(&phases);
        let r = build(&f, &[]);
        assert_eq!(r.exit_code, Some(7));
        assert_eq!(r.durations.total_seconds, 12.5);
        assert_eq!(r.durations.phases.len(), 2);
        assert!(r.leases.is_empty() && r.domains.is_empty() && r.refused.total == 0);
        let text = r.human();
        assert!(text.contains("agent exit code 7"), "{text}");
        assert!(
            text.contains("boot (until the guest's hello) 6.50s (failed)"),
            "{text}"
        );
        assert!(
            text.contains("leases: none") && text.contains("refused: nothing"),
            "{text}"
        );
        f.ending = Ending {
            state: "failed".into(),
            exit_code: None,
            signal: None,
            error: Some("the session timed out after 3m".into()),
        };
        let r = build(&f, &[]);
        assert!(r.human().contains("failed: the session timed out after 3m"));
        f.ending.error = None;
        f.ending.signal = Some(9);
        assert!(build(&f, &[]).human().contains("killed by signal 9"));
    }

    #[test]
    fn human_text_lists_leases_domains_and_refusals() {
        let text = build(&facts(&[]), &synthetic()).human();
        for want in [
            "api → api.example.test: ttl 10m, 2 access(es), 2 connection(s)",
            "revoked",
            "prod-db DENIED",
            "api.example.test: 2 connection(s), 150 B up, 2.0 KiB down (lease of api)",
            "open.example.test: 1 connection(s), 7 B up, 9 B down (allow entry)",
            "refused: 4",
            "evil.example ×2: no active lease or allow entry covers this host",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
        assert!(text.lines().all(|l| !l.is_empty()));
    }

    #[test]
    fn detail_parsers_take_adversarial_input() {
        let cases: [(&str, Option<(u64, u64)>); 7] = [
            (
                "connect to 1.2.3.4:443; 10 B up, 20 B down; 5 ms; revoked",
                Some((10, 20)),
            ),
            (
                "allow entry a; b; 0 B up, 0 B down; 1 ms; error",
                Some((0, 0)),
            ),
            ("", None),
            ("x B up, 2 B down", None),
            ("10 B up, -2 B down", None),
            ("18446744073709551616 B up, 1 B down", None),
            ("10 B up; 20 B down", None),
        ];
        for (detail, want) in cases {
            assert_eq!(tunnel_bytes(detail), want, "{detail:?}");
        }
        assert_eq!(tunnel_end(""), "unknown");
        assert_eq!(tunnel_end("a; b; idle timeout"), "idle timeout");
        assert_eq!(
            refusal_reason("connect: malformed request"),
            "malformed request"
        );
        assert_eq!(refusal_reason("no front end given"), "no front end given");
        assert_eq!(refusal_reason(""), "unknown");
        assert_eq!(refusal_reason("transparent: ; port 1"), "unknown");
        // A grant record without a parseable expiry has no ttl, not a wrong one.
        let mut g = granted("L", "s", "not json", 60);
        assert_eq!(domains_of(&g), vec!["not json"]);
        g.detail = "grant 1; expires yesterday".into();
        assert_eq!(granted_ttl(&g), None);
    }

    #[test]
    fn tunnels_settle_when_every_open_has_its_close() {
        let open = at(1, AuditKind::TunnelOpened, Outcome::Ok);
        let close = at(2, AuditKind::TunnelClosed, Outcome::Ok);
        assert!(tunnels_settled(S, &[]));
        assert!(!tunnels_settled(S, std::slice::from_ref(&open)));
        assert!(tunnels_settled(S, &[open.clone(), close]));
        let other = open.session("zzz");
        assert!(tunnels_settled(S, &[other]));
    }

    #[test]
    fn bytes_are_human() {
        for (n, want) in [
            (0, "0 B"),
            (1023, "1023 B"),
            (1024, "1.0 KiB"),
            (1536, "1.5 KiB"),
            (5 << 20, "5.0 MiB"),
            (u64::MAX, "16777216.0 TiB"),
        ] {
            assert_eq!(format_bytes(n), want);
        }
    }

    #[test]
    fn json_round_trips_and_is_stored_privately() {
        let dir = tempfile::tempdir().unwrap();
        let home = StateDir::at(dir.path());
        let r = build(&facts(&[]), &synthetic());
        let path = r.save(&home).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(SessionReport::load(&home, S).unwrap(), r);
        // A session record listing skips the report's directory.
        assert!(crate::session::record::SessionRecord::all(&home).is_empty());
    }
}
