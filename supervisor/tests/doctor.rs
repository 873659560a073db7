//! `zerolease doctor` on this host, through the real binary: every check
//! runs for real (QEMU is started, the routing table read, the image
//! verified). Needs root, QEMU, nft and the built `minimal` image; under
//! `CI=true` their absence fails the test, since `scripts/test` installs
//! and builds them.

use std::process::Command;

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Whether this host can run the test; outside CI a missing piece skips it.
fn ready() -> bool {
    let missing = if !nix::unistd::Uid::effective().is_root() {
        Some("root".to_owned())
    } else {
        zerolease::image::verify_named("minimal", None)
            .err()
            .map(|e| format!("the minimal image ({e}); build it with scripts/build-image minimal"))
    };
    match missing {
        None => true,
        Some(m) if in_ci() => panic!("CI=true and this test needs {m}"),
        Some(m) => {
            eprintln!("SKIPPED: needs {m}");
            false
        }
    }
}

#[test]
fn doctor_passes_on_a_host_that_runs_sessions_and_names_what_it_tested() {
    if !ready() {
        return;
    }
    let home = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_zerolease"))
        .args(["doctor", "--json", "--kvm-timeout", "30s", "--home"])
        .arg(home.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: serde_json::Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("doctor --json printed {stdout:?}: {e}"));
    assert_eq!(out.status.code(), Some(0), "{report:#}");
    assert_eq!(report["ok"], true);
    let checks = report["checks"].as_array().unwrap();
    let status = |name: &str| {
        checks
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no check named {name}: {report:#}"))
    };
    for name in ["privileges", "qemu", "tun", "nft", "image", "address-pool"] {
        assert_eq!(status(name)["status"], "ok", "{name}: {report:#}");
    }
    // KVM either booted the session kernel or says why not and how to go on.
    let kvm = status("kvm");
    match kvm["status"].as_str().unwrap() {
        "ok" => assert!(kvm["detail"].as_str().unwrap().contains("booted under KVM")),
        "warn" => assert!(kvm["fix"].as_str().unwrap().contains("accel: tcg"), "{kvm}"),
        other => panic!("kvm check is {other}: {kvm}"),
    }
}

/// The KVM check's probe, run under TCG (KVM does not run guests on every
/// host, this one included): it must see the session kernel run. A probe
/// blind to the kernel calls KVM broken on every host — as it did while the
/// probe booted with `loglevel=0`, which silences even the panic it waits for.
#[test]
fn the_boot_probe_sees_the_session_kernel_run() {
    if !ready() {
        return;
    }
    let image = zerolease::image::verify_named("minimal", None).unwrap();
    let took = zerolease::doctor::probe_boot(
        std::path::Path::new("qemu-system-x86_64"),
        &image.kernel,
        zerolease::vm::argv::AccelKind::Tcg,
        std::time::Duration::from_secs(60),
    )
    .unwrap_or_else(|why| panic!("the probe did not see the kernel under TCG: {why}"));
    assert!(took < std::time::Duration::from_secs(60), "{took:?}");
}

#[test]
fn doctor_fails_and_says_how_to_fix_a_missing_image() {
    if !ready() {
        return;
    }
    let home = tempfile::tempdir().unwrap();
    let images = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_zerolease"))
        .args(["doctor", "--kvm-timeout", "1s", "--home"])
        .arg(home.path())
        .arg("--images")
        .arg(images.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("FAIL  image"), "{stdout}");
    assert!(
        stdout.contains("fix: build it: scripts/build-image minimal"),
        "{stdout}"
    );
    assert!(stdout.contains("1 problem(s) stop sessions"), "{stdout}");
}
