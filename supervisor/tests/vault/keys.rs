//! Key sources and key rotation.

use super::*;
use zerolease::domain::HostName;
use zerolease::vault::{EnvKeys, KeySourceKind, KeyringBackend, VaultError};

fn env_config(dir: &Path, current: Option<&str>, new: Option<&str>) -> VaultConfig {
    let mut c = config(dir);
    c.key_source = Some(KeySourceKind::Env);
    c.env_keys = EnvKeys::from_values(current, new);
    c
}

fn read_back(v: &Vault, lease: &str) -> Vec<u8> {
    v.access(lease, &HostName::parse("k.example.com").unwrap())
        .unwrap()
        .expose()
        .to_vec()
}

fn seeded(v: &Vault) -> String {
    add_secret(v, "k", "key-test-value", &["k.example.com"]);
    add_grant(v, "*", "k", &["k.example.com"], 3600, None, false);
    v.grant(request("a", "s", "k")).unwrap().id.0
}

#[test]
fn file_key_rotation_rewraps_and_old_key_stops_working() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START);
    let mut v = open(dir.path(), &clock);
    let lease = seeded(&v);
    let old_key = std::fs::read(dir.path().join("master.key")).unwrap();
    let ct_before: Vec<u8> = raw_db(dir.path())
        .query_row("SELECT ciphertext FROM secrets", [], |r| r.get(0))
        .unwrap();
    assert_eq!(v.rotate_key(None).unwrap(), KeySourceKind::File);
    drop(v);

    let new_key = std::fs::read(dir.path().join("master.key")).unwrap();
    assert_ne!(old_key, new_key);
    assert!(!dir.path().join("master.key.new").exists());
    let ct_after: Vec<u8> = raw_db(dir.path())
        .query_row("SELECT ciphertext FROM secrets", [], |r| r.get(0))
        .unwrap();
    assert_eq!(ct_before, ct_after, "secrets are not re-encrypted");

    let v = open(dir.path(), &clock);
    assert_eq!(read_back(&v, &lease), b"key-test-value");
    assert!(
        v.audit_list(Default::default())
            .unwrap()
            .iter()
            .any(|r| r.record.event == "key_rotated")
    );
    drop(v);

    std::fs::write(dir.path().join("master.key"), &old_key).unwrap();
    let err = Vault::open(config(dir.path()), Arc::new(clock.clone())).unwrap_err();
    assert!(matches!(err, VaultError::WrongKey { .. }), "{err}");
}

#[test]
fn interrupted_rotation_is_finished_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START);
    let mut v = open(dir.path(), &clock);
    let lease = seeded(&v);
    let old_key = std::fs::read(dir.path().join("master.key")).unwrap();
    v.rotate_key(None).unwrap();
    drop(v);
    // Put the files back as they were after the commit but before the
    // promotion: old key current, new key staged.
    let new_key = std::fs::read(dir.path().join("master.key")).unwrap();
    std::fs::write(dir.path().join("master.key"), &old_key).unwrap();
    std::fs::write(dir.path().join("master.key.new"), &new_key).unwrap();

    let v = open(dir.path(), &clock);
    assert_eq!(read_back(&v, &lease), b"key-test-value");
    assert_eq!(
        std::fs::read(dir.path().join("master.key")).unwrap(),
        new_key
    );
    assert!(!dir.path().join("master.key.new").exists());
}

#[test]
fn env_key_source_and_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START);
    let k1 = "a1".repeat(32);
    let k2 = "b2".repeat(32);

    let err = Vault::open(env_config(dir.path(), None, None), Arc::new(clock.clone())).unwrap_err();
    assert!(
        err.to_string().contains("ZEROLEASE_MASTER_KEY is not set"),
        "{err}"
    );

    let v = Vault::open(
        env_config(dir.path(), Some(&k1), None),
        Arc::new(clock.clone()),
    )
    .unwrap();
    let lease = seeded(&v);
    drop(v);
    assert!(
        !dir.path().join("master.key").exists(),
        "env source writes no key file"
    );

    // Without --key-source the recorded source is used.
    let mut c = config(dir.path());
    c.env_keys = EnvKeys::from_values(Some(&k1), None);
    let v = Vault::open(c, Arc::new(clock.clone())).unwrap();
    assert_eq!(v.key_source(), KeySourceKind::Env);
    drop(v);

    // Asking for another source than the recorded one is refused.
    let mut c = config(dir.path());
    c.key_source = Some(KeySourceKind::File);
    let err = Vault::open(c, Arc::new(clock.clone())).unwrap_err();
    assert!(matches!(err, VaultError::KeySourceMismatch { .. }), "{err}");

    let mut v = Vault::open(
        env_config(dir.path(), Some(&k1), None),
        Arc::new(clock.clone()),
    )
    .unwrap();
    let err = v.rotate_key(None).unwrap_err();
    assert!(
        err.to_string().contains("ZEROLEASE_NEW_MASTER_KEY"),
        "{err}"
    );
    drop(v);
    let mut v = Vault::open(
        env_config(dir.path(), Some(&k1), Some(&k2)),
        Arc::new(clock.clone()),
    )
    .unwrap();
    v.rotate_key(None).unwrap();
    drop(v);

    let err = Vault::open(
        env_config(dir.path(), Some(&k1), None),
        Arc::new(clock.clone()),
    )
    .unwrap_err();
    assert!(matches!(err, VaultError::WrongKey { .. }), "{err}");
    let v = Vault::open(
        env_config(dir.path(), Some(&k2), None),
        Arc::new(clock.clone()),
    )
    .unwrap();
    assert_eq!(read_back(&v, &lease), b"key-test-value");
}

#[test]
fn moving_from_file_to_env() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START);
    let v = open(dir.path(), &clock);
    let lease = seeded(&v);
    drop(v);
    let k = "c3".repeat(32);
    let mut c = config(dir.path());
    c.env_keys = EnvKeys::from_values(None, Some(&k));
    let mut v = Vault::open(c, Arc::new(clock.clone())).unwrap();
    assert_eq!(
        v.rotate_key(Some(KeySourceKind::Env)).unwrap(),
        KeySourceKind::Env
    );
    drop(v);
    let v = Vault::open(
        env_config(dir.path(), Some(&k), None),
        Arc::new(clock.clone()),
    )
    .unwrap();
    assert_eq!(read_back(&v, &lease), b"key-test-value");
}

/// The kernel keyutils backend, in a fresh session keyring of this process.
#[test]
fn keyring_key_source_with_keyutils() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START);
    let mut c = config(dir.path());
    c.key_source = Some(KeySourceKind::Keyring);
    c.keyring_backend = KeyringBackend::Keyutils;
    let mut v = match Vault::open(c, Arc::new(clock.clone())) {
        Ok(v) => v,
        Err(e) if std::env::var("CI").as_deref() != Ok("true") => {
            eprintln!("skipping: keyutils unavailable here: {e}");
            return;
        }
        Err(e) => panic!("keyutils key source failed under CI: {e}"),
    };
    let lease = seeded(&v);
    assert!(!dir.path().join("master.key").exists());
    v.rotate_key(None).unwrap();
    drop(v);
    let mut c = config(dir.path());
    c.keyring_backend = KeyringBackend::Keyutils;
    let v = Vault::open(c, Arc::new(clock.clone())).unwrap();
    assert_eq!(v.key_source(), KeySourceKind::Keyring);
    assert_eq!(read_back(&v, &lease), b"key-test-value");
}
