//! The proxy's records, written to the vault's hash-chained audit log.
//!
//! The proxy knows nothing of the vault and the vault nothing of the proxy;
//! this adapter is the one place they meet.
//!
//! **Invariant (fail closed):** a tunnel is admitted only after its
//! `tunnel_opened` record committed ([`ProxyEvents::tunnel_opening`] returns
//! the error otherwise, and the proxy refuses). Closing and refusal records
//! are written by a background thread so the proxy's tasks never wait on
//! them — a tunnel that is already closed, or a connection already refused,
//! needs nothing from the log to stay that way.

use std::sync::Arc;
use std::sync::mpsc;

use crate::proxy::events::{
    AuditError, FrontEnd, ProxyEvents, RefusalRecord, TunnelEnd, TunnelOpening, TunnelRecord,
};
use crate::proxy::registry::EntryKind;
use crate::vault::{AuditKind, AuditRecord, Outcome, Vault};

/// Writes proxy records to a vault's audit log.
#[derive(Debug)]
pub struct VaultProxyEvents {
    vault: Arc<Vault>,
    later: mpsc::Sender<AuditRecord>,
}

impl VaultProxyEvents {
    /// Starts the background writer for closing and refusal records.
    pub fn new(vault: Arc<Vault>) -> std::io::Result<Self> {
        let (later, queue) = mpsc::channel::<AuditRecord>();
        let writer = vault.clone();
        // Ends when the sender (this value) is dropped.
        std::thread::Builder::new()
            .name("proxy-audit".into())
            .spawn(move || {
                for record in queue {
                    if let Err(e) = writer.audit_append(record) {
                        tracing::warn!("could not record a proxy event in the audit log: {e}");
                    }
                }
            })?;
        Ok(VaultProxyEvents { vault, later })
    }
}

fn front(f: FrontEnd) -> &'static str {
    match f {
        FrontEnd::Explicit => "connect",
        FrontEnd::Transparent => "transparent",
    }
}

fn end(e: TunnelEnd) -> &'static str {
    match e {
        TunnelEnd::ClientClosed => "client closed",
        TunnelEnd::UpstreamClosed => "upstream closed",
        TunnelEnd::Revoked => "revoked",
        TunnelEnd::Expired => "expired",
        TunnelEnd::IdleTimeout => "idle timeout",
        TunnelEnd::Shutdown => "proxy shut down",
        TunnelEnd::Error => "error",
    }
}

/// The lease id and secret name of an entry, or the allow entry's name.
fn entry_fields(record: AuditRecord, entry: &str, kind: &EntryKind) -> AuditRecord {
    match kind {
        EntryKind::Lease { secret_name } => record.lease(entry).secret(secret_name),
        EntryKind::Allow => record.detail(format!("allow entry {entry}")),
    }
}

/// Runs a blocking vault call from inside or outside a tokio runtime.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

impl ProxyEvents for VaultProxyEvents {
    fn tunnel_opening(&self, r: &TunnelOpening) -> Result<(), AuditError> {
        let base = AuditRecord::new(self.vault.now(), AuditKind::TunnelOpened, Outcome::Ok)
            .session(r.session.as_str())
            .domain(&r.host);
        let mut record = entry_fields(base, r.entry.as_str(), &r.kind);
        let what = format!("{} to {}", front(r.front_end), r.address);
        record.detail = if record.detail.is_empty() {
            what
        } else {
            format!("{}; {what}", record.detail)
        };
        blocking(|| self.vault.audit_append(record))
            .map(drop)
            .map_err(|e| AuditError {
                source: Box::new(e),
            })
    }

    fn tunnel_closed(&self, r: TunnelRecord) {
        let base = AuditRecord::new(self.vault.now(), AuditKind::TunnelClosed, Outcome::Ok)
            .session(r.session.as_str())
            .domain(&r.host);
        let mut record = entry_fields(base, r.entry.as_str(), &r.kind);
        let what = format!(
            "{} to {}; {} B up, {} B down; {} ms; {}",
            front(r.front_end),
            r.address,
            r.bytes_up,
            r.bytes_down,
            r.duration.as_millis(),
            end(r.end)
        );
        record.detail = if record.detail.is_empty() {
            what
        } else {
            format!("{}; {what}", record.detail)
        };
        let _ = self.later.send(record);
    }

    fn refused(&self, r: RefusalRecord) {
        let mut record = AuditRecord::new(
            self.vault.now(),
            AuditKind::ConnectionRefused,
            Outcome::Denied,
        )
        .session(r.session.as_str());
        if let Some(h) = &r.host {
            record = record.domain(h);
        }
        let mut detail = format!("{}: {}", front(r.front_end), r.reason);
        if let Some(p) = r.port {
            detail.push_str(&format!("; port {p}"));
        }
        if let Some(a) = r.address {
            detail.push_str(&format!("; address {a}"));
        }
        detail.push_str(&format!("; from {}", r.peer));
        let _ = self.later.send(record.detail(detail));
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::clock::{ManualClock, Timestamp};
    use crate::domain::HostName;
    use crate::home::StateDir;
    use crate::proxy::events::RefusalReason;
    use crate::proxy::registry::{EntryId, SessionId};
    use crate::vault::{AuditFilter, VaultConfig};

    fn vault(dir: &std::path::Path) -> Arc<Vault> {
        let mut c = VaultConfig::new(StateDir::at(dir));
        c.durable = false;
        Arc::new(Vault::open(c, Arc::new(ManualClock::new(Timestamp(1_800_000_000_000)))).unwrap())
    }

    fn opening() -> TunnelOpening {
        TunnelOpening {
            session: SessionId::new("s1"),
            front_end: FrontEnd::Explicit,
            entry: EntryId::new("abcd"),
            kind: EntryKind::Lease {
                secret_name: "github".into(),
            },
            host: HostName::parse("api.github.com").unwrap(),
            address: "140.82.112.6:443".parse().unwrap(),
        }
    }

    fn events_of(v: &Vault, kind: &str) -> Vec<AuditRecord> {
        v.audit_list(AuditFilter::default())
            .unwrap()
            .into_iter()
            .map(|r| r.record)
            .filter(|r| r.event == kind)
            .collect()
    }

    #[test]
    fn records_reach_the_chained_log() {
        let dir = tempfile::tempdir().unwrap();
        let v = vault(dir.path());
        let sink = VaultProxyEvents::new(v.clone()).unwrap();
        sink.tunnel_opening(&opening()).unwrap();
        sink.tunnel_closed(TunnelRecord {
            session: SessionId::new("s1"),
            front_end: FrontEnd::Transparent,
            entry: EntryId::new("npm-allow"),
            kind: EntryKind::Allow,
            host: HostName::parse("registry.npmjs.org").unwrap(),
            address: "104.16.0.1:443".parse().unwrap(),
            bytes_up: 10,
            bytes_down: 20,
            duration: Duration::from_millis(1500),
            end: TunnelEnd::Revoked,
        });
        sink.refused(RefusalRecord {
            session: SessionId::new("s1"),
            front_end: FrontEnd::Explicit,
            peer: "10.213.0.2:40000".parse().unwrap(),
            host: Some(HostName::parse("evil.example").unwrap()),
            port: Some(443),
            address: None,
            reason: RefusalReason::NotLeased,
        });
        drop(sink); // flushes the background writer
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while events_of(&v, "connection_refused").is_empty() && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        let opened = events_of(&v, "tunnel_opened");
        assert_eq!(opened.len(), 1);
        assert_eq!(opened[0].lease.as_deref(), Some("abcd"));
        assert_eq!(opened[0].secret.as_deref(), Some("github"));
        assert_eq!(opened[0].domain.as_deref(), Some("api.github.com"));
        let closed = events_of(&v, "tunnel_closed");
        assert_eq!(closed.len(), 1);
        assert!(
            closed[0].detail.contains("10 B up, 20 B down"),
            "{}",
            closed[0].detail
        );
        assert!(closed[0].detail.contains("revoked"));
        let refused = events_of(&v, "connection_refused");
        assert_eq!(refused[0].outcome, "denied");
        assert!(
            refused[0].detail.contains("no active lease"),
            "{}",
            refused[0].detail
        );
        assert!(v.audit_verify().unwrap().is_intact());
    }

    #[test]
    fn opening_fails_closed_when_audit_cannot_be_written() {
        let dir = tempfile::tempdir().unwrap();
        let v = vault(dir.path());
        rusqlite::Connection::open(dir.path().join("vault.db"))
            .unwrap()
            .execute_batch(
                "CREATE TRIGGER no_audit BEFORE INSERT ON audit BEGIN SELECT RAISE(ABORT, 'x'); END;",
            )
            .unwrap();
        let sink = VaultProxyEvents::new(v).unwrap();
        assert!(sink.tunnel_opening(&opening()).is_err());
    }
}
