//! If the audit record cannot be written, grants and accesses give nothing;
//! revocation still takes effect and its record is written later.

use super::*;
use zerolease::domain::HostName;
use zerolease::vault::{LeaseFilter, RevokeScope, VaultError};

const BREAK_AUDIT: &str = "CREATE TRIGGER break_audit BEFORE INSERT ON audit
    BEGIN SELECT RAISE(ABORT, 'injected audit failure'); END;";

fn lease_rows(dir: &Path) -> i64 {
    raw_db(dir)
        .query_row("SELECT COUNT(*) FROM leases", [], |r| r.get(0))
        .unwrap()
}

#[test]
fn grant_and_access_fail_closed_when_audit_cannot_be_written() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START);
    let v = open(dir.path(), &clock);
    add_secret(&v, "npm", "npm_secret_canary", &["registry.npmjs.org"]);
    add_grant(
        &v,
        "ci-*",
        "npm",
        &["registry.npmjs.org"],
        600,
        Some(5),
        false,
    );
    let lease = v.grant(request("ci-1", "s1", "npm")).unwrap();
    let before = lease_rows(dir.path());

    raw_db(dir.path()).execute_batch(BREAK_AUDIT).unwrap();

    let err = v.grant(request("ci-2", "s2", "npm")).unwrap_err();
    assert!(matches!(err, VaultError::AuditUnavailable(_)), "{err}");
    assert_eq!(lease_rows(dir.path()), before, "no lease row may remain");

    let host = HostName::parse("registry.npmjs.org").unwrap();
    let err = v.access(&lease.id.0, &host).unwrap_err();
    assert!(matches!(err, VaultError::AuditUnavailable(_)), "{err}");
    assert!(!format!("{err} {err:?}").contains("canary"));
    // The refused access did not spend a use.
    assert_eq!(v.get_lease(&lease.id.0).unwrap().uses_left, Some(5));

    // Revocation is not held hostage by the audit log.
    let revoked = v.revoke(RevokeScope::Session("s1".into())).unwrap();
    assert_eq!(revoked, vec![lease.id.clone()]);
    assert!(v.get_lease(&lease.id.0).unwrap().revoked.is_some());
    assert!(v.list_leases(LeaseFilter::default()).unwrap().is_empty());

    // Once the log works again, the held-back record is written first and
    // the chain is intact.
    raw_db(dir.path())
        .execute_batch("DROP TRIGGER break_audit")
        .unwrap();
    let again = v.grant(request("ci-3", "s3", "npm")).unwrap();
    let records = v.audit_list(Default::default()).unwrap();
    let revoke_pos = records
        .iter()
        .position(|r| {
            r.record.event == "lease_revoked" && r.record.lease.as_deref() == Some(&lease.id.0)
        })
        .expect("revocation recorded after the log recovered");
    let grant_pos = records
        .iter()
        .position(|r| r.record.lease.as_deref() == Some(&again.id.0))
        .unwrap();
    assert!(revoke_pos < grant_pos);
    assert!(v.audit_verify().unwrap().is_intact());
}

#[test]
fn admin_changes_fail_closed_too() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START);
    let v = open(dir.path(), &clock);
    raw_db(dir.path()).execute_batch(BREAK_AUDIT).unwrap();
    let err = v
        .add_secret(
            NewSecret {
                name: "x".into(),
                kind: "token".into(),
                description: String::new(),
                domains: vec!["x.example.com".parse().unwrap()],
            },
            value("v"),
        )
        .unwrap_err();
    assert!(matches!(err, VaultError::AuditUnavailable(_)), "{err}");
    assert!(v.list_secrets().unwrap().is_empty());
}

/// A record queued without waiting that cannot be written is not lost
/// silently: its failure reaches the caller's callback.
#[test]
fn a_queued_record_that_cannot_be_written_reports_it() {
    use zerolease::vault::{AuditKind, AuditRecord, Outcome};
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START);
    let v = open(dir.path(), &clock);
    raw_db(dir.path()).execute_batch(BREAK_AUDIT).unwrap();
    let (failed_tx, failed) = std::sync::mpsc::channel();
    v.audit_append_queued(
        AuditRecord::new(v.now(), AuditKind::SessionTransition, Outcome::Ok)
            .session("s1")
            .detail("provisioning: queued"),
        move |e| {
            let _ = failed_tx.send(e);
        },
    );
    let err = failed
        .recv_timeout(Duration::from_secs(10))
        .expect("the failure is reported");
    assert!(matches!(err, VaultError::AuditUnavailable(_)), "{err}");
    raw_db(dir.path())
        .execute_batch("DROP TRIGGER break_audit")
        .unwrap();
    let records = v.audit_list(Default::default()).unwrap();
    assert!(
        records.iter().all(|r| r.record.session.is_none()),
        "nothing of s1 was written"
    );
}
