//! `zerolease run --ci` never waits on a person: a vault whose key is
//! missing fails at once with exit code 5 and names what is missing, even
//! with stdin left open (a prompt would hang); a bad `--report` is a usage
//! error before anything is built. No root needed: both fail before a
//! session starts.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn run_ci(home: &Path, extra: &[&str], env_key_source: bool) -> (Option<i32>, String) {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/ci.yaml");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_zerolease"));
    cmd.arg("--home")
        .arg(home)
        .args(["run", "--ci"])
        .args(extra)
        .arg(manifest)
        .env_remove("ZEROLEASE_MASTER_KEY")
        .env_remove("ZEROLEASE_KEY_SOURCE")
        // Left open and never written: a prompt would wait forever.
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if env_key_source {
        cmd.env("ZEROLEASE_KEY_SOURCE", "env");
    }
    let mut child = cmd.spawn().unwrap();
    let _stdin = child.stdin.take();
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("zerolease run --ci waited (for a prompt?)");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_missing_master_key_fails_at_once_with_exit_5() {
    let home = tempfile::tempdir().unwrap();
    let (code, err) = run_ci(home.path(), &[], true);
    assert_eq!(code, Some(5), "{err}");
    assert!(err.contains("ZEROLEASE_MASTER_KEY"), "{err}");
}

#[test]
fn a_report_path_that_is_a_directory_is_a_usage_error() {
    let home = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (code, err) = run_ci(
        home.path(),
        &["--report", dir.path().to_str().unwrap()],
        false,
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("is a directory"), "{err}");
    // Nothing was started.
    assert!(!home.path().join("sessions").exists());
}
