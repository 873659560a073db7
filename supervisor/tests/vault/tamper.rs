//! Modified ciphertexts, swapped rows, wrong keys, and edited audit logs.

use super::*;
use zerolease::domain::HostName;
use zerolease::vault::VaultError;
use zerolease::vault::audit::ChainProblem;

fn host(s: &str) -> HostName {
    HostName::parse(s).unwrap()
}

fn two_secrets(dir: &Path, clock: &ManualClock) -> (Vault, String, String) {
    let v = open(dir, clock);
    add_secret(&v, "alpha", "alpha-value-111", &["a.example.com"]);
    add_secret(&v, "beta", "beta-value-222", &["a.example.com"]);
    add_grant(&v, "*", "alpha", &["a.example.com"], 600, None, false);
    add_grant(&v, "*", "beta", &["a.example.com"], 600, None, false);
    let la = v.grant(request("ag", "s", "alpha")).unwrap().id.0;
    let lb = v.grant(request("ag", "s", "beta")).unwrap().id.0;
    (v, la, lb)
}

#[test]
fn flipped_ciphertext_byte_gives_generic_error() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START);
    let (v, la, lb) = two_secrets(dir.path(), &clock);
    // Flip one bit of alpha's ciphertext.
    let db = raw_db(dir.path());
    let mut ct: Vec<u8> = db
        .query_row(
            "SELECT ciphertext FROM secrets WHERE name='alpha'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    ct[3] ^= 0x01;
    db.execute(
        "UPDATE secrets SET ciphertext = ?1 WHERE name='alpha'",
        [&ct],
    )
    .unwrap();
    let err = v.access(&la, &host("a.example.com")).unwrap_err();
    assert!(
        matches!(err, VaultError::Undecryptable(ref n) if n == "alpha"),
        "{err}"
    );
    assert!(!err.to_string().contains("value-"), "{err}");
    // The other secret is untouched.
    assert_eq!(
        v.access(&lb, &host("a.example.com")).unwrap().expose(),
        b"beta-value-222"
    );
}

#[test]
fn swapped_rows_never_yield_the_other_secret() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START);
    let (v, la, lb) = two_secrets(dir.path(), &clock);
    raw_db(dir.path())
        .execute_batch(
            "CREATE TEMP TABLE t AS SELECT name, nonce, ciphertext FROM secrets;
             UPDATE secrets SET
               nonce = (SELECT nonce FROM t WHERE t.name = CASE secrets.name WHEN 'alpha' THEN 'beta' ELSE 'alpha' END),
               ciphertext = (SELECT ciphertext FROM t WHERE t.name = CASE secrets.name WHEN 'alpha' THEN 'beta' ELSE 'alpha' END);",
        )
        .unwrap();
    for (lease, name) in [(&la, "alpha"), (&lb, "beta")] {
        let err = v.access(lease, &host("a.example.com")).unwrap_err();
        assert!(
            matches!(err, VaultError::Undecryptable(ref n) if n == name),
            "{err}"
        );
    }
}

#[test]
fn wrong_key_is_a_clear_error_naming_the_source() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START);
    drop(open(dir.path(), &clock));
    std::fs::write(
        dir.path().join("master.key"),
        format!("{}\n", "11".repeat(32)),
    )
    .unwrap();
    let err = Vault::open(config(dir.path()), Arc::new(clock.clone())).unwrap_err();
    assert!(matches!(err, VaultError::WrongKey { .. }), "{err}");
    assert!(err.to_string().contains("key source file"), "{err}");

    std::fs::write(dir.path().join("master.key"), "not a key\n").unwrap();
    let err = Vault::open(config(dir.path()), Arc::new(clock.clone())).unwrap_err();
    assert!(err.to_string().contains("not 64 hex digits"), "{err}");

    std::fs::remove_file(dir.path().join("master.key")).unwrap();
    let err = Vault::open(config(dir.path()), Arc::new(clock.clone())).unwrap_err();
    assert!(err.to_string().contains("is not there"), "{err}");
}

fn audit_with_records(dir: &Path) -> Vault {
    let clock = ManualClock::new(START);
    let v = open(dir, &clock);
    add_secret(&v, "s", "v", &["x.example.com"]);
    add_grant(&v, "a", "s", &["x.example.com"], 60, None, false);
    for i in 0..4 {
        v.grant(request("a", &format!("sess{i}"), "s")).unwrap();
    }
    assert!(v.audit_verify().unwrap().is_intact());
    v
}

#[test]
fn edited_audit_row_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let v = audit_with_records(dir.path());
    raw_db(dir.path())
        .execute("UPDATE audit SET agent = 'someone-else' WHERE seq = 5", [])
        .unwrap();
    assert_eq!(
        v.audit_verify().unwrap().problems,
        vec![ChainProblem::Edited { seq: 5 }]
    );
}

#[test]
fn deleted_audit_row_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let v = audit_with_records(dir.path());
    raw_db(dir.path())
        .execute("DELETE FROM audit WHERE seq = 4", [])
        .unwrap();
    let problems = v.audit_verify().unwrap().problems;
    assert!(
        problems.contains(&ChainProblem::Missing { from: 4, to: 4 }),
        "{problems:?}"
    );
}

#[test]
fn reordered_audit_rows_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let v = audit_with_records(dir.path());
    raw_db(dir.path())
        .execute_batch(
            "UPDATE audit SET seq = -1 WHERE seq = 5;
             UPDATE audit SET seq = 5 WHERE seq = 6;
             UPDATE audit SET seq = 6 WHERE seq = -1;",
        )
        .unwrap();
    let problems = v.audit_verify().unwrap().problems;
    assert!(
        problems.contains(&ChainProblem::BrokenLink { seq: 5 }),
        "{problems:?}"
    );
    assert!(
        problems.contains(&ChainProblem::BrokenLink { seq: 6 }),
        "{problems:?}"
    );
}

#[test]
fn truncated_audit_tail_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let v = audit_with_records(dir.path());
    raw_db(dir.path())
        .execute(
            "DELETE FROM audit WHERE seq = (SELECT MAX(seq) FROM audit)",
            [],
        )
        .unwrap();
    let problems = v.audit_verify().unwrap().problems;
    assert!(
        matches!(problems.as_slice(), [ChainProblem::Truncated { .. }]),
        "{problems:?}"
    );
}
