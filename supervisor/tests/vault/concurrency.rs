//! Many callers at once: each gets its own result, the group commit loses
//! nothing, and the chain stays intact.

use super::*;
use zerolease::domain::HostName;

#[test]
fn concurrent_grants_and_accesses_all_land() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START);
    let v = Arc::new(open(dir.path(), &clock));
    add_secret(&v, "s", "the-value", &["api.example.com"]);
    add_grant(&v, "*", "s", &["api.example.com"], 600, None, false);
    let host = HostName::parse("api.example.com").unwrap();
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let v = v.clone();
            let host = host.clone();
            std::thread::spawn(move || {
                for i in 0..40 {
                    let l = v
                        .grant(request(&format!("a{t}"), &format!("s{t}-{i}"), "s"))
                        .unwrap();
                    assert_eq!(v.access(&l.id.0, &host).unwrap().expose(), b"the-value");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let leases = v
        .list_leases(zerolease::vault::LeaseFilter {
            session: None,
            include_inactive: true,
        })
        .unwrap();
    assert_eq!(leases.len(), 320);
    let report = v.audit_verify().unwrap();
    assert!(report.is_intact(), "{:?}", report.problems);
    // vault_created, secret, grant, then a grant and an access per lease.
    assert_eq!(report.records, 3 + 2 * 320);
}

/// A session's transitions are queued without waiting for their commit.
/// They still land in the order they were queued, all of them before any
/// record appended (and waited for) after them.
#[test]
fn queued_records_land_in_order_before_later_ones() {
    use zerolease::vault::{AuditKind, AuditRecord, Outcome};
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START);
    let v = open(dir.path(), &clock);
    let transition = |detail: String| {
        AuditRecord::new(v.now(), AuditKind::SessionTransition, Outcome::Ok)
            .session("s1")
            .detail(detail)
    };
    let (failed_tx, failed) = std::sync::mpsc::channel();
    for i in 0..100 {
        let failed_tx = failed_tx.clone();
        v.audit_append_queued(transition(format!("queued {i}")), move |e| {
            let _ = failed_tx.send(e.to_string());
        });
    }
    v.audit_append(transition("waited".into())).unwrap();
    let details: Vec<String> = v
        .audit_list(Default::default())
        .unwrap()
        .into_iter()
        .filter(|r| r.record.session.as_deref() == Some("s1"))
        .map(|r| r.record.detail)
        .collect();
    let mut expected: Vec<String> = (0..100).map(|i| format!("queued {i}")).collect();
    expected.push("waited".into());
    assert_eq!(details, expected);
    drop(failed_tx);
    assert_eq!(failed.try_iter().collect::<Vec<_>>(), Vec::<String>::new());
    assert!(v.audit_verify().unwrap().is_intact());
}
