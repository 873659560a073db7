//! Lease arithmetic: plain data and pure functions of `now`.
//!
//! **Invariant:** a lease is usable only while it is not revoked, `now` is
//! before its expiry, and (when counted) it has uses left; renewal never moves
//! the expiry past `max_expires`, fixed at first issue from the grant's
//! maximum TTL.

use std::fmt;
use std::time::Duration;

use serde::Serialize;

use crate::clock::Timestamp;
use crate::domain::{DomainPattern, HostName, scope_matches};

/// A lease id: 128 random bits as 32 hex digits.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct LeaseId(pub String);

impl fmt::Display for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LeaseId({})", self.0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Lease {
    pub id: LeaseId,
    pub agent: String,
    pub session: String,
    pub secret: String,
    pub grant_id: i64,
    pub domains: Vec<DomainPattern>,
    pub issued: Timestamp,
    pub expires: Timestamp,
    /// The latest expiry renewals may reach: first issue + the grant's max TTL.
    pub max_expires: Timestamp,
    /// `None` when uses are not counted.
    pub uses_left: Option<u32>,
    pub renewals: u32,
    pub renewable: bool,
    pub revoked: Option<Timestamp>,
}

/// What a lease is at a moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LeaseStatus {
    Active,
    Expired,
    Revoked,
    /// Every counted use is spent.
    Exhausted,
}

impl LeaseStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            LeaseStatus::Active => "active",
            LeaseStatus::Expired => "expired",
            LeaseStatus::Revoked => "revoked",
            LeaseStatus::Exhausted => "exhausted",
        }
    }
}

/// Why a lease refused an access or a renewal.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseRefusal {
    #[error("the lease was revoked")]
    Revoked,
    #[error("the lease has expired")]
    Expired,
    #[error("the lease has no uses left")]
    Exhausted,
    #[error("the lease does not cover `{0}`")]
    DomainNotCovered(HostName),
    #[error("the lease is not renewable (its grant does not allow renewal)")]
    NotRenewable,
    #[error("the lease is already at the grant's maximum lifetime")]
    AtMaximum,
}

impl Lease {
    pub fn status(&self, now: Timestamp) -> LeaseStatus {
        if self.revoked.is_some() {
            LeaseStatus::Revoked
        } else if now >= self.expires {
            LeaseStatus::Expired
        } else if self.uses_left == Some(0) {
            LeaseStatus::Exhausted
        } else {
            LeaseStatus::Active
        }
    }

    fn require_active(&self, now: Timestamp) -> Result<(), LeaseRefusal> {
        match self.status(now) {
            LeaseStatus::Active => Ok(()),
            LeaseStatus::Revoked => Err(LeaseRefusal::Revoked),
            LeaseStatus::Expired => Err(LeaseRefusal::Expired),
            LeaseStatus::Exhausted => Err(LeaseRefusal::Exhausted),
        }
    }

    /// Checks an access to `domain` at `now`; on success returns the uses
    /// left afterwards (unchanged `None` when uncounted).
    pub fn check_access(
        &self,
        domain: &HostName,
        now: Timestamp,
    ) -> Result<Option<u32>, LeaseRefusal> {
        self.require_active(now)?;
        if !scope_matches(&self.domains, domain) {
            return Err(LeaseRefusal::DomainNotCovered(domain.clone()));
        }
        self.check_use(now)
    }

    /// Checks a use that is not for one domain — the value handed to a
    /// session's guest, which can only send it through the proxy to the
    /// lease's domains — and returns the uses left afterwards.
    pub fn check_use(&self, now: Timestamp) -> Result<Option<u32>, LeaseRefusal> {
        self.require_active(now)?;
        Ok(self.uses_left.map(|n| n - 1))
    }

    /// The expiry after renewing for `ttl` at `now`: `now + ttl`, capped at
    /// `max_expires`, and never earlier than the current expiry.
    pub fn renewed_expiry(&self, ttl: Duration, now: Timestamp) -> Result<Timestamp, LeaseRefusal> {
        self.require_active(now)?;
        if !self.renewable {
            return Err(LeaseRefusal::NotRenewable);
        }
        if self.expires >= self.max_expires {
            return Err(LeaseRefusal::AtMaximum);
        }
        let wanted = now.saturating_add(ttl).min(self.max_expires);
        Ok(wanted.max(self.expires))
    }

    pub fn time_left(&self, now: Timestamp) -> Duration {
        now.until(self.expires)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease() -> Lease {
        Lease {
            id: LeaseId("00".repeat(16)),
            agent: "a".into(),
            session: "s".into(),
            secret: "gh".into(),
            grant_id: 1,
            domains: vec!["api.github.com".parse().unwrap()],
            issued: Timestamp(1_000),
            expires: Timestamp(61_000),
            max_expires: Timestamp(121_000),
            uses_left: Some(2),
            renewals: 0,
            renewable: true,
            revoked: None,
        }
    }

    #[test]
    fn status_table() {
        let l = lease();
        assert_eq!(l.status(Timestamp(60_999)), LeaseStatus::Active);
        assert_eq!(l.status(Timestamp(61_000)), LeaseStatus::Expired);
        let mut r = l.clone();
        r.revoked = Some(Timestamp(2_000));
        assert_eq!(r.status(Timestamp(2_000)), LeaseStatus::Revoked);
        let mut e = l.clone();
        e.uses_left = Some(0);
        assert_eq!(e.status(Timestamp(2_000)), LeaseStatus::Exhausted);
    }

    #[test]
    fn access_checks_domain_and_counts() {
        let l = lease();
        let ok = HostName::parse("API.github.com.").unwrap();
        let bad = HostName::parse("github.com").unwrap();
        assert_eq!(l.check_access(&ok, Timestamp(2_000)), Ok(Some(1)));
        assert_eq!(
            l.check_access(&bad, Timestamp(2_000)),
            Err(LeaseRefusal::DomainNotCovered(bad))
        );
        assert_eq!(
            l.check_access(&ok, Timestamp(70_000)),
            Err(LeaseRefusal::Expired)
        );
    }

    #[test]
    fn renewal_is_capped_at_max() {
        let l = lease();
        let s = Duration::from_secs;
        assert_eq!(
            l.renewed_expiry(s(30), Timestamp(50_000)),
            Ok(Timestamp(80_000))
        );
        assert_eq!(
            l.renewed_expiry(s(3600), Timestamp(50_000)),
            Ok(Timestamp(121_000))
        );
        // A shorter renewal never shortens the lease.
        assert_eq!(
            l.renewed_expiry(s(1), Timestamp(2_000)),
            Ok(Timestamp(61_000))
        );
        let mut at_max = l.clone();
        at_max.expires = at_max.max_expires;
        assert_eq!(
            at_max.renewed_expiry(s(1), Timestamp(2_000)),
            Err(LeaseRefusal::AtMaximum)
        );
        let mut fixed = l.clone();
        fixed.renewable = false;
        assert_eq!(
            fixed.renewed_expiry(s(1), Timestamp(2_000)),
            Err(LeaseRefusal::NotRenewable)
        );
    }
}
