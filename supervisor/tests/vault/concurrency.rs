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
