//! The hash-chained audit log.
//!
//! **Invariant:** records carry names, ids, domains and outcomes — never a
//! secret value. Each record stores the SHA-256 of its predecessor and its
//! own hash over its sequence number, that link and every field, and the
//! vault keeps the newest `(seq, hash)` as the chain's head, so
//! [`verify`] finds an edited, deleted, inserted or reordered record and
//! names it.
//!
//! The chain detects changes made without recomputing it. Someone with write
//! access to the database who recomputes every later hash and the head is not
//! detected; `docs/threat-model.md` lists that residual risk.

use std::fmt;

use rusqlite::{Connection, OptionalExtension, params};

use super::store::CachedExt;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::clock::Timestamp;

pub type Hash = [u8; 32];
const GENESIS: Hash = [0u8; 32];
const HEAD_KEY: &str = "audit_head";

/// What happened. The set grows as components land; the string forms are
/// stored and must never change meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditKind {
    VaultCreated,
    KeyRotated,
    SecretAdded,
    SecretRotated,
    SecretRemoved,
    GrantAdded,
    GrantRemoved,
    PolicyImported,
    LeaseGranted,
    LeaseDenied,
    LeaseAccessed,
    AccessDenied,
    LeaseRenewed,
    RenewDenied,
    LeaseRevoked,
    LeaseExpired,
    TunnelOpened,
    TunnelClosed,
    ConnectionRefused,
    SessionTransition,
}

impl AuditKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AuditKind::VaultCreated => "vault_created",
            AuditKind::KeyRotated => "key_rotated",
            AuditKind::SecretAdded => "secret_added",
            AuditKind::SecretRotated => "secret_rotated",
            AuditKind::SecretRemoved => "secret_removed",
            AuditKind::GrantAdded => "grant_added",
            AuditKind::GrantRemoved => "grant_removed",
            AuditKind::PolicyImported => "policy_imported",
            AuditKind::LeaseGranted => "lease_granted",
            AuditKind::LeaseDenied => "lease_denied",
            AuditKind::LeaseAccessed => "lease_accessed",
            AuditKind::AccessDenied => "access_denied",
            AuditKind::LeaseRenewed => "lease_renewed",
            AuditKind::RenewDenied => "renew_denied",
            AuditKind::LeaseRevoked => "lease_revoked",
            AuditKind::LeaseExpired => "lease_expired",
            AuditKind::TunnelOpened => "tunnel_opened",
            AuditKind::TunnelClosed => "tunnel_closed",
            AuditKind::ConnectionRefused => "connection_refused",
            AuditKind::SessionTransition => "session_transition",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Ok,
    Denied,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Denied => "denied",
        }
    }
}

/// One audit record before it is chained.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditRecord {
    pub time: Timestamp,
    pub event: String,
    pub outcome: String,
    pub agent: Option<String>,
    pub session: Option<String>,
    pub secret: Option<String>,
    pub lease: Option<String>,
    pub domain: Option<String>,
    pub detail: String,
}

impl AuditRecord {
    pub fn new(time: Timestamp, kind: AuditKind, outcome: Outcome) -> Self {
        AuditRecord {
            time,
            event: kind.as_str().to_owned(),
            outcome: outcome.as_str().to_owned(),
            agent: None,
            session: None,
            secret: None,
            lease: None,
            domain: None,
            detail: String::new(),
        }
    }
    pub fn agent(mut self, v: impl Into<String>) -> Self {
        self.agent = Some(v.into());
        self
    }
    pub fn session(mut self, v: impl Into<String>) -> Self {
        self.session = Some(v.into());
        self
    }
    pub fn secret(mut self, v: impl Into<String>) -> Self {
        self.secret = Some(v.into());
        self
    }
    pub fn lease(mut self, v: impl fmt::Display) -> Self {
        self.lease = Some(v.to_string());
        self
    }
    pub fn domain(mut self, v: impl fmt::Display) -> Self {
        self.domain = Some(v.to_string());
        self
    }
    pub fn detail(mut self, v: impl Into<String>) -> Self {
        self.detail = v.into();
        self
    }
}

/// A record as stored, with its place in the chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StoredRecord {
    pub seq: i64,
    #[serde(flatten)]
    pub record: AuditRecord,
    #[serde(serialize_with = "as_hex")]
    pub prev_hash: Hash,
    #[serde(serialize_with = "as_hex")]
    pub hash: Hash,
}

fn as_hex<S: serde::Serializer>(h: &Hash, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&hex::encode(h))
}

/// The record's hash: its sequence number, its predecessor's hash and every
/// field, each length-prefixed (with a presence byte for optional fields) so
/// no two different records encode alike.
pub fn record_hash(seq: i64, prev: &Hash, r: &AuditRecord) -> Hash {
    let mut h = Sha256::new();
    h.update(b"zerolease/audit/v1\0");
    h.update(seq.to_be_bytes());
    h.update(prev);
    h.update(r.time.as_millis().to_be_bytes());
    let mut field = |v: Option<&str>| match v {
        None => h.update([0u8]),
        Some(s) => {
            h.update([1u8]);
            h.update((s.len() as u64).to_be_bytes());
            h.update(s.as_bytes());
        }
    };
    field(Some(&r.event));
    field(Some(&r.outcome));
    field(r.agent.as_deref());
    field(r.session.as_deref());
    field(r.secret.as_deref());
    field(r.lease.as_deref());
    field(r.domain.as_deref());
    field(Some(&r.detail));
    h.finalize().into()
}

pub(crate) const SCHEMA: &str = "
CREATE TABLE audit (
    seq       INTEGER PRIMARY KEY,
    ts_ms     INTEGER NOT NULL,
    event     TEXT NOT NULL,
    outcome   TEXT NOT NULL,
    agent     TEXT,
    session   TEXT,
    secret    TEXT,
    lease     TEXT,
    domain    TEXT,
    detail    TEXT NOT NULL,
    prev_hash BLOB NOT NULL,
    hash      BLOB NOT NULL
);
CREATE INDEX audit_session ON audit(session);
CREATE INDEX audit_ts ON audit(ts_ms);
";

fn read_head(conn: &Connection) -> rusqlite::Result<Option<(i64, Hash)>> {
    let v: Option<Vec<u8>> = conn
        .query_row("SELECT value FROM meta WHERE key = ?1", [HEAD_KEY], |r| {
            r.get(0)
        })
        .optional()?;
    Ok(v.and_then(|b| {
        if b.len() != 40 {
            return None;
        }
        let seq = i64::from_be_bytes(b[..8].try_into().ok()?);
        let hash: Hash = b[8..].try_into().ok()?;
        Some((seq, hash))
    }))
}

/// Appends `r` to the chain inside the caller's transaction. The write fails
/// (and so must the caller's operation) when the record cannot be stored.
pub fn append(conn: &Connection, r: &AuditRecord) -> rusqlite::Result<StoredRecord> {
    let last: Option<(i64, Vec<u8>)> = conn
        .query_row(
            "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1",
            [],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .optional()?;
    let (seq, prev) = match last {
        Some((s, h)) => (s + 1, h.try_into().unwrap_or(GENESIS)),
        None => (1, GENESIS),
    };
    let hash = record_hash(seq, &prev, r);
    conn.exec_cached(
        "INSERT INTO audit (seq, ts_ms, event, outcome, agent, session, secret, lease, domain, detail, prev_hash, hash)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
        params![
            seq,
            r.time.as_millis() as i64,
            r.event,
            r.outcome,
            r.agent,
            r.session,
            r.secret,
            r.lease,
            r.domain,
            r.detail,
            prev.as_slice(),
            hash.as_slice()
        ],
    )?;
    let mut head = seq.to_be_bytes().to_vec();
    head.extend_from_slice(&hash);
    conn.exec_cached(
        "INSERT INTO meta (key, value) VALUES (?1, ?2)
         ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        params![HEAD_KEY, head],
    )?;
    Ok(StoredRecord {
        seq,
        record: r.clone(),
        prev_hash: prev,
        hash,
    })
}

/// Which records `list` returns.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    pub session: Option<String>,
    pub since: Option<Timestamp>,
    pub limit: Option<usize>,
}

fn row_to_stored(row: &rusqlite::Row<'_>) -> rusqlite::Result<StoredRecord> {
    let to_hash = |v: Vec<u8>| -> Hash { v.try_into().unwrap_or([0xff; 32]) };
    Ok(StoredRecord {
        seq: row.get(0)?,
        record: AuditRecord {
            time: Timestamp(row.get::<_, i64>(1)?.max(0) as u64),
            event: row.get(2)?,
            outcome: row.get(3)?,
            agent: row.get(4)?,
            session: row.get(5)?,
            secret: row.get(6)?,
            lease: row.get(7)?,
            domain: row.get(8)?,
            detail: row.get(9)?,
        },
        prev_hash: to_hash(row.get(10)?),
        hash: to_hash(row.get(11)?),
    })
}

const COLUMNS: &str =
    "seq, ts_ms, event, outcome, agent, session, secret, lease, domain, detail, prev_hash, hash";

pub fn list(conn: &Connection, f: &AuditFilter) -> rusqlite::Result<Vec<StoredRecord>> {
    let sql = format!(
        "SELECT {COLUMNS} FROM audit
         WHERE (?1 IS NULL OR session = ?1) AND (?2 IS NULL OR ts_ms >= ?2)
         ORDER BY seq DESC LIMIT ?3"
    );
    let mut stmt = conn.prepare_cached(&sql)?;
    let limit = f.limit.map(|l| l as i64).unwrap_or(-1);
    let since = f.since.map(|t| t.as_millis() as i64);
    let mut rows = stmt
        .query_map(params![f.session, since, limit], row_to_stored)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    rows.reverse();
    Ok(rows)
}

/// A break in the chain, naming the record where it shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "problem", rename_all = "snake_case")]
pub enum ChainProblem {
    /// Records with these sequence numbers are gone.
    Missing { from: i64, to: i64 },
    /// The record does not link to the record before it: records were
    /// reordered, or one was removed or inserted before it.
    BrokenLink { seq: i64 },
    /// The record's contents do not match its hash: it was edited.
    Edited { seq: i64 },
    /// The log ends before the last record the vault wrote.
    Truncated {
        last_present: i64,
        last_written: i64,
    },
    /// The head the vault recorded does not match the last record.
    HeadMismatch { seq: i64 },
}

impl fmt::Display for ChainProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChainProblem::Missing { from, to } if from == to => {
                write!(f, "record {from} is missing (deleted)")
            }
            ChainProblem::Missing { from, to } => {
                write!(f, "records {from} to {to} are missing (deleted)")
            }
            ChainProblem::BrokenLink { seq } => write!(
                f,
                "record {seq} does not follow the record before it (reordered, inserted, or a record before it was removed)"
            ),
            ChainProblem::Edited { seq } => write!(f, "record {seq} was edited"),
            ChainProblem::Truncated {
                last_present,
                last_written,
            } => write!(
                f,
                "the log ends at record {last_present} but the vault wrote up to record {last_written}: records were deleted from the end"
            ),
            ChainProblem::HeadMismatch { seq } => write!(
                f,
                "record {seq}, the last one, is not the record the vault last wrote"
            ),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    pub records: u64,
    pub problems: Vec<ChainProblem>,
}

impl VerifyReport {
    pub fn is_intact(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Walks the whole chain and reports every break it finds.
pub fn verify(conn: &Connection) -> rusqlite::Result<VerifyReport> {
    let mut stmt = conn.prepare_cached(&format!("SELECT {COLUMNS} FROM audit ORDER BY seq"))?;
    let mut rows = stmt.query([])?;
    let mut problems = Vec::new();
    let mut records = 0u64;
    let mut prev: Option<(i64, Hash)> = None;
    while let Some(row) = rows.next()? {
        let rec = row_to_stored(row)?;
        records += 1;
        let (expected_seq, expected_prev) = match prev {
            Some((s, h)) => (s + 1, h),
            None => (1, GENESIS),
        };
        if rec.seq > expected_seq {
            problems.push(ChainProblem::Missing {
                from: expected_seq,
                to: rec.seq - 1,
            });
        }
        if rec.prev_hash != expected_prev {
            problems.push(ChainProblem::BrokenLink { seq: rec.seq });
        }
        if record_hash(rec.seq, &rec.prev_hash, &rec.record) != rec.hash {
            problems.push(ChainProblem::Edited { seq: rec.seq });
        }
        prev = Some((rec.seq, rec.hash));
    }
    match (read_head(conn)?, prev) {
        (Some((head_seq, _)), Some((last_seq, _))) if head_seq > last_seq => {
            problems.push(ChainProblem::Truncated {
                last_present: last_seq,
                last_written: head_seq,
            })
        }
        (Some((head_seq, head_hash)), Some((last_seq, last_hash)))
            if head_seq != last_seq || head_hash != last_hash =>
        {
            problems.push(ChainProblem::HeadMismatch { seq: last_seq })
        }
        (Some((head_seq, _)), None) => problems.push(ChainProblem::Truncated {
            last_present: 0,
            last_written: head_seq,
        }),
        _ => {}
    }
    Ok(VerifyReport { records, problems })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db() -> Connection {
        let c = Connection::open_in_memory().unwrap();
        c.execute_batch("CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);")
            .unwrap();
        c.execute_batch(SCHEMA).unwrap();
        for i in 0..6 {
            let r = AuditRecord::new(Timestamp(i), AuditKind::LeaseGranted, Outcome::Ok)
                .agent(format!("agent-{i}"))
                .secret("npm");
            append(&c, &r).unwrap();
        }
        c
    }

    #[test]
    fn intact_chain_verifies() {
        let r = verify(&db()).unwrap();
        assert_eq!(r.records, 6);
        assert!(r.is_intact(), "{:?}", r.problems);
    }

    #[test]
    fn edited_record_is_named() {
        let c = db();
        c.execute("UPDATE audit SET agent = 'mallory' WHERE seq = 3", [])
            .unwrap();
        assert_eq!(
            verify(&c).unwrap().problems,
            vec![ChainProblem::Edited { seq: 3 }]
        );
    }

    #[test]
    fn deleted_record_is_named() {
        let c = db();
        c.execute("DELETE FROM audit WHERE seq = 4", []).unwrap();
        let p = verify(&c).unwrap().problems;
        assert!(
            p.contains(&ChainProblem::Missing { from: 4, to: 4 }),
            "{p:?}"
        );
        assert!(p.contains(&ChainProblem::BrokenLink { seq: 5 }), "{p:?}");
    }

    #[test]
    fn reordered_records_are_named() {
        let c = db();
        c.execute_batch(
            "UPDATE audit SET seq = 100 WHERE seq = 2;
             UPDATE audit SET seq = 2 WHERE seq = 3;
             UPDATE audit SET seq = 3 WHERE seq = 100;",
        )
        .unwrap();
        let p = verify(&c).unwrap().problems;
        assert!(p.contains(&ChainProblem::BrokenLink { seq: 2 }), "{p:?}");
        assert!(p.contains(&ChainProblem::Edited { seq: 2 }), "{p:?}");
    }

    #[test]
    fn truncated_tail_is_detected() {
        let c = db();
        c.execute("DELETE FROM audit WHERE seq >= 5", []).unwrap();
        assert_eq!(
            verify(&c).unwrap().problems,
            vec![ChainProblem::Truncated {
                last_present: 4,
                last_written: 6
            }]
        );
    }

    #[test]
    fn hash_covers_every_field() {
        let base = AuditRecord::new(Timestamp(5), AuditKind::LeaseAccessed, Outcome::Ok)
            .agent("a")
            .session("s")
            .secret("x")
            .lease("l")
            .domain("d.com")
            .detail("t");
        let h = record_hash(1, &GENESIS, &base);
        let variants = [
            AuditRecord {
                time: Timestamp(6),
                ..base.clone()
            },
            AuditRecord {
                agent: None,
                ..base.clone()
            },
            AuditRecord {
                session: Some("s2".into()),
                ..base.clone()
            },
            AuditRecord {
                secret: Some("y".into()),
                ..base.clone()
            },
            AuditRecord {
                lease: Some("m".into()),
                ..base.clone()
            },
            AuditRecord {
                domain: Some("e.com".into()),
                ..base.clone()
            },
            AuditRecord {
                detail: "u".into(),
                ..base.clone()
            },
            AuditRecord {
                outcome: "denied".into(),
                ..base.clone()
            },
        ];
        for v in &variants {
            assert_ne!(record_hash(1, &GENESIS, v), h, "{v:?}");
        }
        assert_ne!(record_hash(2, &GENESIS, &base), h);
    }
}
