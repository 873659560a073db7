//! Images: a planted credential is refused at build (`seal`) and at boot
//! (`verify`); a file changed after sealing is refused at boot; a clean
//! image passes. Small images made here — the real Debian image is built by
//! `scripts/build-image`, not by `cargo test`.

use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::Command;

use zerolease::image::{
    self, DigestCache, ImageError, KernelPackage, Rule, SealRequest, cpio::write_newc, verify,
};

fn fake_key() -> String {
    // Built at run time so this file does not itself look like a key.
    format!(
        "-----BEGIN {}PRIVATE KEY-----\n{}\n-----END {}PRIVATE KEY-----\n",
        "OPENSSH ",
        "b3BlbnNzaC1rZXktdjEAAAAA".repeat(3),
        "OPENSSH "
    )
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(bytes).unwrap();
    gz.finish().unwrap()
}

/// Makes `root/name` with a kernel and an initramfs holding `extra`.
fn make_image(root: &Path, name: &str, extra: &[(&str, u32, &[u8])]) -> std::path::PathBuf {
    let dir = root.join(name);
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join(image::KERNEL_FILE), b"MZ fake bzImage\x00\x01\x02").unwrap();
    let mut members: Vec<(&str, u32, &[u8])> = vec![
        ("init", 0o100_755, b"\x7fELF stub init"),
        ("etc", 0o040_755, b""),
        ("etc/passwd", 0o100_644, b"root:x:0:0:root:/root:/bin/sh\n"),
    ];
    members.extend_from_slice(extra);
    fs::write(dir.join(image::INITRAMFS_FILE), gzip(&write_newc(&members))).unwrap();
    dir
}

fn request(name: &str, dir: &Path) -> SealRequest {
    SealRequest {
        name: name.into(),
        dir: dir.into(),
        kernel_package: KernelPackage {
            package: "linux-image-test-cloud-amd64".into(),
            version: "1.0-1".into(),
            release: "test-cloud-amd64".into(),
            deb_sha256: "00".repeat(32),
        },
        also_scan: Vec::new(),
        allow: image::Allowlist::default(),
        root_disk: false,
    }
}

fn cli(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_zerolease"))
        .args(args)
        .env_remove("ZEROLEASE_IMAGES")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn clean_image_seals_and_verifies() {
    let root = tempfile::tempdir().unwrap();
    let dir = make_image(root.path(), "clean", &[]);
    let record = image::seal(&request("clean", &dir)).unwrap();
    assert!(record.scan.passed);
    assert_eq!(record.scan.files, 2);
    let v = verify(&dir).unwrap();
    assert_eq!(v.record, record);
    assert_eq!(v.initramfs, dir.join("initramfs.cpio"));

    // The CLI agrees, by name under --images and by path.
    let root_s = root.path().to_str().unwrap();
    let (code, out, err) = cli(&["image", "verify", "clean", "--images", root_s]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, _) = cli(&["image", "verify", dir.to_str().unwrap(), "--json"]);
    assert_eq!(code, 0);
    assert!(out.contains("\"verified\":true"), "{out}");
    let (code, out, _) = cli(&["image", "scan", dir.to_str().unwrap()]);
    assert_eq!(code, 0);
    assert!(out.contains("clean"), "{out}");
}

#[test]
fn planted_key_is_refused_by_seal_and_verify() {
    let root = tempfile::tempdir().unwrap();
    let key = fake_key();
    let dir = make_image(
        root.path(),
        "dirty",
        &[("home/agent/.ssh/id_ed25519", 0o100_600, key.as_bytes())],
    );
    let err = image::seal(&request("dirty", &dir)).unwrap_err();
    assert!(
        matches!(err, ImageError::ScanFailed { findings: 1, .. }),
        "{err}"
    );
    // The record on disk says the scan failed, and names the file, not the key.
    let record = image::read_record(&dir).unwrap();
    assert!(!record.scan.passed);
    assert_eq!(record.scan.findings[0].rule, Rule::PrivateKey);
    assert_eq!(record.scan.findings[0].path, "/home/agent/.ssh/id_ed25519");
    let on_disk = fs::read_to_string(dir.join("image.json")).unwrap();
    assert!(!on_disk.contains("b3BlbnNzaC1rZXkt"), "{on_disk}");

    let err = verify(&dir).unwrap_err();
    assert!(matches!(err, ImageError::ScanFailed { .. }), "{err}");
    assert!(
        err.to_string().contains("scripts/build-image dirty"),
        "{err}"
    );

    // The CLI: scan exits 6 and lists the finding without the key text.
    let (code, out, err) = cli(&["image", "scan", dir.to_str().unwrap()]);
    assert_eq!(code, 6, "{out}{err}");
    assert!(
        err.contains("/home/agent/.ssh/id_ed25519: private key at line 1"),
        "{err}"
    );
    assert!(!err.contains("b3BlbnNzaC1rZXkt") && !out.contains("b3BlbnNzaC1rZXkt"));
    let (code, _, _) = cli(&["image", "verify", dir.to_str().unwrap()]);
    assert_eq!(code, 6);

    // A key in the staging tree (not yet in the archive) fails the seal too.
    let clean = make_image(root.path(), "staged", &[]);
    let staging = root.path().join("staging/root/.aws");
    fs::create_dir_all(&staging).unwrap();
    fs::write(
        staging.join("credentials"),
        "[default]\naws_secret_access_key = abc/def\n",
    )
    .unwrap();
    let mut req = request("staged", &clean);
    req.also_scan = vec![root.path().join("staging")];
    let err = image::seal(&req).unwrap_err();
    assert!(matches!(err, ImageError::ScanFailed { .. }), "{err}");
    assert!(verify(&clean).is_err());
}

#[test]
fn tampered_files_are_refused_by_verify() {
    let root = tempfile::tempdir().unwrap();
    let dir = make_image(root.path(), "tamper", &[]);
    image::seal(&request("tamper", &dir)).unwrap();
    verify(&dir).unwrap();

    // One byte of the initramfs changed after sealing.
    let path = dir.join(image::INITRAMFS_FILE);
    let original = fs::read(&path).unwrap();
    let mut bytes = original.clone();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    fs::write(&path, &bytes).unwrap();
    let err = verify(&dir).unwrap_err();
    match &err {
        ImageError::DigestMismatch { file, .. } => assert_eq!(*file, "initramfs.cpio"),
        other => panic!("{other}"),
    }
    let msg = err.to_string();
    assert!(
        msg.starts_with("image `tamper`: initramfs.cpio does not match image.json (sha256 ")
            && msg.ends_with("rebuild it with scripts/build-image tamper"),
        "{msg}"
    );
    let (code, _, stderr) = cli(&["image", "verify", dir.to_str().unwrap()]);
    assert_eq!(code, 6, "{stderr}");
    fs::write(&path, &original).unwrap();
    verify(&dir).unwrap();

    // The kernel too.
    fs::write(dir.join(image::KERNEL_FILE), b"another kernel").unwrap();
    assert!(matches!(
        verify(&dir),
        Err(ImageError::DigestMismatch {
            file: image::KERNEL_FILE,
            ..
        })
    ));
}

#[test]
fn missing_or_broken_records_are_refused() {
    let root = tempfile::tempdir().unwrap();
    let dir = make_image(root.path(), "norecord", &[]);
    let err = verify(&dir).unwrap_err();
    assert!(
        matches!(
            err,
            ImageError::Missing {
                file: "image.json",
                ..
            }
        ),
        "{err}"
    );
    let (code, _, _) = cli(&["image", "verify", dir.to_str().unwrap()]);
    assert_eq!(code, 4);

    fs::write(dir.join("image.json"), "{ not json").unwrap();
    assert!(matches!(verify(&dir), Err(ImageError::BadRecord { .. })));

    // A record copied from another image does not vouch for this one.
    let other = make_image(root.path(), "other", &[]);
    image::seal(&request("other", &other)).unwrap();
    fs::copy(other.join("image.json"), dir.join("image.json")).unwrap();
    assert!(matches!(verify(&dir), Err(ImageError::NameMismatch { .. })));

    // A record edited to claim a pass is still refused if it lists findings.
    let mut record = image::read_record(&other).unwrap();
    record.scan.findings.push(image::Finding {
        path: "/x".into(),
        rule: Rule::GithubToken,
        location: image::Location::Offset(1),
        fingerprint: None,
    });
    fs::write(
        other.join("image.json"),
        serde_json::to_string(&record).unwrap(),
    )
    .unwrap();
    assert!(matches!(verify(&other), Err(ImageError::ScanFailed { .. })));

    // Missing files.
    fs::remove_file(other.join(image::KERNEL_FILE)).unwrap();
    assert!(image::seal(&request("other", &other)).is_err());
    assert!(
        !other.join("image.json").exists(),
        "seal removes a stale record first"
    );
}

#[test]
fn root_disk_is_recorded_verified_and_never_booted_unrecorded() {
    let root = tempfile::tempdir().unwrap();
    let dir = make_image(root.path(), "disk", &[]);
    // A root disk that is not recorded is never handed out for boot.
    fs::write(dir.join(image::ROOT_DISK_FILE), vec![0u8; 4096]).unwrap();
    image::seal(&request("disk", &dir)).unwrap();
    let v = verify(&dir).unwrap();
    assert_eq!(v.root_disk, None);
    assert_eq!(v.record.root_disk, None);
    let text = fs::read_to_string(dir.join("image.json")).unwrap();
    assert!(!text.contains("root_disk"), "{text}");

    // Recorded: its digest is checked like the others.
    let mut req = request("disk", &dir);
    req.root_disk = true;
    let record = image::seal(&req).unwrap();
    let recorded = record.root_disk.clone().unwrap();
    assert_eq!(recorded.file, "root.ext4");
    assert_eq!(recorded.size, 4096);
    let v = verify(&dir).unwrap();
    assert_eq!(v.root_disk, Some(dir.join("root.ext4")));

    // One byte changed anywhere in the disk (here: deep inside) is refused.
    let path = dir.join(image::ROOT_DISK_FILE);
    let mut bytes = fs::read(&path).unwrap();
    bytes[3000] = b'x';
    fs::write(&path, &bytes).unwrap();
    let err = verify(&dir).unwrap_err();
    assert!(
        matches!(
            err,
            ImageError::DigestMismatch {
                file: "root.ext4",
                ..
            }
        ),
        "{err}"
    );
    assert!(err.is_integrity());
    let (code, _, stderr) = cli(&["image", "verify", dir.to_str().unwrap()]);
    assert_eq!(code, 6, "{stderr}");
    assert!(
        stderr.contains("root.ext4 does not match image.json"),
        "{stderr}"
    );

    // A recorded disk that is gone is missing, not silently skipped.
    fs::remove_file(&path).unwrap();
    assert!(matches!(
        verify(&dir),
        Err(ImageError::Missing {
            file: "root.ext4",
            ..
        })
    ));
    // And seal refuses to record a disk that is not there.
    assert!(matches!(
        image::seal(&req),
        Err(ImageError::Missing {
            file: "root.ext4",
            ..
        })
    ));
}

#[test]
fn records_without_a_root_disk_still_read() {
    // image.json written before root disks existed has no `root_disk` key.
    let root = tempfile::tempdir().unwrap();
    let dir = make_image(root.path(), "old", &[]);
    image::seal(&request("old", &dir)).unwrap();
    let text = fs::read_to_string(dir.join("image.json")).unwrap();
    let value: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert!(value.get("root_disk").is_none());
    assert_eq!(verify(&dir).unwrap().root_disk, None);
}

/// The session's root-disk digest cache: a hash is reused only while the
/// file's stat is unchanged, it never makes a changed disk pass, and the
/// comparison with image.json still happens.
#[test]
fn root_disk_digest_cache_never_hides_a_change() {
    use image::digest_cache::{CACHE_FILE, CachePolicy};
    use std::time::Duration;
    let root = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let dir = make_image(root.path(), "cached", &[]);
    let disk = dir.join(image::ROOT_DISK_FILE);
    fs::write(&disk, vec![7u8; 8192]).unwrap();
    let mut req = request("cached", &dir);
    req.root_disk = true;
    image::seal(&req).unwrap();

    // The default policy does not remember a file changed moments ago.
    let strict = DigestCache::in_state_dir(state.path());
    image::verify_with(&dir, Some(&strict)).unwrap();
    assert!(!state.path().join(CACHE_FILE).exists());

    // Without the age margin (tests only) it does.
    let mut cache = DigestCache::in_state_dir(state.path());
    cache.policy = CachePolicy {
        min_age: Duration::ZERO,
    };
    image::verify_with(&dir, Some(&cache)).unwrap();
    let cache_path = state.path().join(CACHE_FILE);
    let text = fs::read_to_string(&cache_path).unwrap();
    assert!(text.contains("root.ext4"), "{text}");

    // The remembered digest is used (an entry edited to another digest is
    // what verify compares with image.json, and it refuses) ...
    let edited = text.replace(
        &image::read_record(&dir).unwrap().root_disk.unwrap().sha256,
        &"0".repeat(64),
    );
    fs::write(&cache_path, &edited).unwrap();
    assert!(matches!(
        image::verify_with(&dir, Some(&cache)),
        Err(ImageError::DigestMismatch {
            file: "root.ext4",
            ..
        })
    ));
    // ... and the full check (no cache) still passes: the disk is fine.
    verify(&dir).unwrap();
    fs::write(&cache_path, &text).unwrap();
    image::verify_with(&dir, Some(&cache)).unwrap();

    // Changed in place, same size: the ctime moved, so it is hashed again
    // and refused. (The pause lets the file system's timestamp tick over.)
    std::thread::sleep(Duration::from_millis(30));
    let mut bytes = fs::read(&disk).unwrap();
    bytes[4000] ^= 1;
    {
        use std::io::{Seek, SeekFrom};
        let mut f = fs::OpenOptions::new().write(true).open(&disk).unwrap();
        f.seek(SeekFrom::Start(4000)).unwrap();
        f.write_all(&bytes[4000..4001]).unwrap();
    }
    assert!(matches!(
        image::verify_with(&dir, Some(&cache)),
        Err(ImageError::DigestMismatch {
            file: "root.ext4",
            ..
        })
    ));
    // Put back byte for byte: the stat differs from the remembered one, so
    // it is hashed again (and passes, being the same bytes).
    bytes[4000] ^= 1;
    fs::write(&disk, &bytes).unwrap();
    image::verify_with(&dir, Some(&cache)).unwrap();

    // Replaced by another file (rename over it): another inode, hashed.
    let tampered = dir.join("root.ext4.new");
    let mut other = bytes.clone();
    other[100] ^= 1;
    fs::write(&tampered, &other).unwrap();
    fs::rename(&tampered, &disk).unwrap();
    assert!(matches!(
        image::verify_with(&dir, Some(&cache)),
        Err(ImageError::DigestMismatch {
            file: "root.ext4",
            ..
        })
    ));
}

/// The cache covers the kernel and the initramfs as well: remembered after
/// one run, and a changed initramfs is still hashed again and refused.
#[test]
fn the_initramfs_digest_is_cached_and_a_change_is_refused() {
    use image::digest_cache::{CACHE_FILE, CachePolicy};
    use std::time::Duration;
    let root = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let dir = make_image(root.path(), "cachedinit", &[]);
    image::seal(&request("cachedinit", &dir)).unwrap();
    let mut cache = DigestCache::in_state_dir(state.path());
    cache.policy = CachePolicy {
        min_age: Duration::ZERO,
    };
    image::verify_with(&dir, Some(&cache)).unwrap();
    let text = fs::read_to_string(state.path().join(CACHE_FILE)).unwrap();
    assert!(text.contains(image::INITRAMFS_FILE), "{text}");
    assert!(text.contains(image::KERNEL_FILE), "{text}");

    std::thread::sleep(Duration::from_millis(30));
    let initramfs = dir.join(image::INITRAMFS_FILE);
    let mut bytes = fs::read(&initramfs).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    fs::write(&initramfs, &bytes).unwrap();
    assert!(matches!(
        image::verify_with(&dir, Some(&cache)),
        Err(ImageError::DigestMismatch {
            file: image::INITRAMFS_FILE,
            ..
        })
    ));
}
