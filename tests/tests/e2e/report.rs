//! Seeing what a session did, through the real `zerolease` binary: the
//! end-of-session report (stderr, `--report FILE`, `inspect`), live numbers
//! in `ps` while it runs, `run --ci` driven by the exact commands of
//! `docs/ci.md`, and cleanup when `--ci` gets SIGTERM.
//!
//! The binary is `zerolease_tests::zerolease_bin()`: built by cargo before
//! the first use, so never older than the sources.

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use zerolease::home::StateDir;
use zerolease::session::record::SessionRecord;
use zerolease::session::workspace;
use zerolease_tests::{require_root_and_tools, zerolease_bin};

use crate::session::{CANARY, SessionWorld, image_ready, walk};

/// A session named `ci` (the agent the documented policy grant names),
/// with the test upstream's names and CA.
const MANIFEST: &str = r#"
name: ci
image: minimal
accel: tcg
timeout: 3m
resources: { memory: 384MiB }
command: @SCRIPT@
credentials:
  - secret: api
    inject:
      - env: API_TOKEN
ca_certs: [@CA@]
network:
  overrides: { api.session.test: [198.18.0.2], other.session.test: [198.18.0.2] }
  allow_cidrs: [198.18.0.0/24]
"#;

/// A leased call, an unleased one (refused by the proxy), then exit 7.
const LEASED_AND_UNLEASED: &str = r#"
curl -sS -H "Authorization: Bearer $API_TOKEN" https://api.session.test/auth
echo "unleased=$(curl -s -o /dev/null -w '%{http_connect}' --max-time 5 https://other.session.test/hello; echo rc$?)"
exit 7
"#;

const REFUSED_REASON: &str = "no active lease or allow entry covers this host";

/// `zerolease --home HOME ARGS` in the host namespace, waited for.
fn zl(w: &SessionWorld, args: &[&str]) -> Output {
    Command::new("ip")
        .args(["netns", "exec", w.host.name()])
        .arg(zerolease_bin())
        .arg("--home")
        .arg(w.dir.path().join("home"))
        .args(args)
        .env_remove("ZEROLEASE_KEY_SOURCE")
        .env_remove("ZEROLEASE_HOME")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn zl_json(w: &SessionWorld, args: &[&str]) -> Value {
    let out = zl(w, args);
    assert!(
        out.status.success(),
        "zerolease {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

/// `zerolease run ARGS MANIFEST` in the background.
fn spawn_run(w: &SessionWorld, args: &[&str]) -> Child {
    Command::new("ip")
        .args(["netns", "exec", w.host.name()])
        .arg(zerolease_bin())
        .arg("--home")
        .arg(w.dir.path().join("home"))
        .arg("run")
        .args(["--agent", "e2e"])
        .args(args)
        .arg(w.dir.path().join("session.yaml"))
        .env_remove("ZEROLEASE_KEY_SOURCE")
        .env_remove("ZEROLEASE_HOME")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits (bounded) until the session in `home` runs its agent, gives the
/// agent a second to be at work, then sends `child` SIGTERM. Returns the
/// session's record.
fn sigterm_once_running(home: &StateDir, child: &Child) -> SessionRecord {
    let deadline = Instant::now() + Duration::from_secs(180);
    let record = loop {
        assert!(Instant::now() < deadline, "the session never ran");
        if let Some(r) = SessionRecord::all(home)
            .into_iter()
            .find(|r| r.state == "running")
        {
            break r;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    std::thread::sleep(Duration::from_secs(1));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    record
}

/// Waits for `child` (bounded), returning its exit code and output.
fn finish(mut child: Child, bound: Duration) -> (Option<i32>, String, String) {
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let o = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let e = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + bound;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("zerolease run did not end within {bound:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    (status.code(), o.join().unwrap(), e.join().unwrap())
}

fn assert_no_canary(what: &str, text: &str) {
    assert!(!text.contains(CANARY), "the canary is in {what}");
}

fn assert_no_canary_in_files(dir: &Path) {
    for f in walk(dir) {
        let bytes = std::fs::read(&f).unwrap_or_default();
        assert!(
            !bytes.windows(CANARY.len()).any(|w| w == CANARY.as_bytes()),
            "canary in {}",
            f.display()
        );
    }
}

/// The report's promises for [`LEASED_AND_UNLEASED`].
fn assert_report(r: &Value) {
    assert_eq!(r["exit_code"], 7, "{r}");
    assert_eq!(r["state"], "destroyed", "{r}");
    let lease = &r["leases"][0];
    assert_eq!(lease["secret"], "api", "{r}");
    assert_eq!(lease["domains"][0], "api.session.test", "{r}");
    assert!(lease["accesses"].as_u64().unwrap() >= 1, "{r}");
    assert_eq!(lease["revoked"], true, "{r}");
    let api = r["domains"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["domain"] == "api.session.test")
        .unwrap_or_else(|| panic!("api.session.test not reached: {r}"));
    assert!(api["connections"].as_u64().unwrap() >= 1, "{r}");
    assert!(api["bytes_up"].as_u64().unwrap() > 0, "{r}");
    assert!(api["bytes_down"].as_u64().unwrap() > 0, "{r}");
    let refused = r["refused"]["by_name"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == "other.session.test")
        .unwrap_or_else(|| panic!("the unleased call is not in the report: {r}"));
    assert_eq!(refused["reason"], REFUSED_REASON, "{r}");
    assert!(r["refused"]["by_reason"][REFUSED_REASON].as_u64().unwrap() >= 1);
    let phases: Vec<&str> = r["durations"]["phases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["phase"].as_str().unwrap())
        .collect();
    for p in [
        "image_check",
        "leases",
        "jail",
        "proxy",
        "vm_setup",
        "boot",
        "provisioning",
        "agent",
        "cleanup",
    ] {
        assert!(phases.contains(&p), "no {p} in {phases:?}");
    }
    assert!(r["durations"]["total_seconds"].as_f64().unwrap() > 0.0);
}

/// A session with a leased and an unleased call: `ps --json` while it runs
/// shows the lease's time left and an open tunnel; the report (stderr,
/// `--report`, `inspect --json`) lists the leased domain with bytes, the
/// refusal with its reason, the exit code; the canary is in none of them.
#[test]
fn a_sessions_report_ps_and_inspect_show_what_it_did() {
    if !require_root_and_tools(&["ip", "nft", "qemu-system-x86_64"]) || !image_ready() {
        return;
    }
    // The slow download keeps a tunnel open while `ps` looks.
    let script = LEASED_AND_UNLEASED.replace(
        "exit 7",
        "curl -s -o /dev/null --max-time 12 https://api.session.test/slow/500000000\nexit 7",
    );
    let w = SessionWorld::with_manifest(MANIFEST, &script);
    let report_path = w.dir.path().join("out-report.json");
    let child = spawn_run(&w, &["--report", report_path.to_str().unwrap()]);

    let deadline = Instant::now() + Duration::from_secs(180);
    let (ps, id) = loop {
        assert!(
            Instant::now() < deadline,
            "ps never showed an open tunnel with bytes"
        );
        let ps = zl_json(&w, &["--json", "ps"]);
        if let Some(s) = ps.as_array().unwrap().iter().find(|s| {
            // An open tunnel, once bytes have moved (the first call's
            // closing record is written in the background).
            s["tunnels_open"].as_u64().is_some_and(|n| n >= 1)
                && s["bytes_down"].as_u64().is_some_and(|n| n > 0)
        }) {
            break (s.clone(), s["id"].as_str().unwrap().to_owned());
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    eprintln!("ps during the session: {ps}");
    assert_eq!(ps["state"], "running", "{ps}");
    assert_eq!(ps["image"], "minimal");
    let left = ps["leases"][0]["seconds_left"].as_u64().unwrap();
    assert!(left > 0 && left <= 600, "{ps}");
    assert_eq!(ps["leases"][0]["secret"], "api");
    assert!(ps["live"]["jail_dropped"].is_object(), "{ps}");
    let live = zl_json(&w, &["--json", "inspect", &id]);
    assert!(
        live["live"]["tunnels_open"].as_u64().unwrap() >= 1,
        "{live}"
    );
    assert!(live["report"].is_null());

    let (code, out, err) = finish(child, Duration::from_secs(120));
    eprintln!("--- stdout\n{out}--- stderr\n{err}");
    assert_eq!(code, Some(7), "the agent's exit code passes through");
    assert!(
        out.contains("authorized") && out.contains("unleased=403"),
        "{out}"
    );
    // Progress (plain: stderr is a pipe) and the human report on stderr.
    for want in [
        "zerolease: image check done in",
        "zerolease: boot (until the guest's hello) done in",
        "zerolease: provisioning done in",
        &format!("── session {id}"),
        "agent exit code 7",
        "api.session.test",
        "other.session.test ×1: no active lease",
    ] {
        assert!(err.contains(want), "no {want:?} in stderr:\n{err}");
    }

    let file: Value = serde_json::from_slice(&std::fs::read(&report_path).unwrap()).unwrap();
    assert_eq!(file["session"], id.as_str());
    assert_report(&file);
    let after = zl_json(&w, &["--json", "inspect", &id]);
    assert_eq!(after["state"], "destroyed");
    assert!(after["live"].is_null());
    assert_eq!(after["report"], file, "inspect shows the stored report");
    assert_eq!(after["leases"][0]["status"], "revoked", "{after}");
    let human = zl(&w, &["inspect", &id]);
    assert!(String::from_utf8_lossy(&human.stdout).contains("agent exit code 7"));
    // A finished session is not in `ps`, but in `ps --all`.
    assert!(
        zl_json(&w, &["--json", "ps"])
            .as_array()
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        zl_json(&w, &["--json", "ps", "--all"])[0]["id"],
        id.as_str()
    );

    w.assert_no_leftovers(&id);
    for (what, text) in [
        ("stdout", out.as_str()),
        ("stderr", err.as_str()),
        ("ps", &ps.to_string()),
        ("inspect", &after.to_string()),
    ] {
        assert_no_canary(what, text);
    }
    assert_no_canary_in_files(w.dir.path());
}

/// The lines between `# ci-steps: begin` and `# ci-steps: end`, dedented,
/// of every marked block in `docs/ci.md`.
fn ci_steps() -> Vec<String> {
    let doc = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/ci.md"))
        .unwrap();
    let mut blocks = Vec::new();
    let mut current: Option<Vec<&str>> = None;
    for line in doc.lines() {
        match (line.trim(), current.as_mut()) {
            ("# ci-steps: begin", None) => current = Some(Vec::new()),
            ("# ci-steps: end", Some(_)) => {
                let lines = current.take().unwrap();
                let indent = lines
                    .iter()
                    .filter(|l| !l.trim().is_empty())
                    .map(|l| l.len() - l.trim_start().len())
                    .min()
                    .unwrap_or(0);
                let body: Vec<&str> = lines
                    .iter()
                    .map(|l| l.get(indent..).unwrap_or(""))
                    .collect();
                blocks.push(body.join("\n") + "\n");
            }
            (_, Some(lines)) => lines.push(line),
            (_, None) => {}
        }
    }
    blocks
}

/// The GitHub Actions and GitLab CI jobs of `docs/ci.md` run the same
/// commands, and those commands — run here exactly as written, with the
/// CI's secrets in the environment — load the token through stdin into an
/// `env`-keyed vault and run the session with `--ci`: the agent's exit code
/// is the job's, the report file holds what happened and no secret, and
/// nothing is left behind.
#[test]
fn the_documented_ci_steps_run_a_session() {
    let steps = ci_steps();
    assert_eq!(steps.len(), 2, "a GitHub and a GitLab block: {steps:?}");
    assert_eq!(steps[0], steps[1], "the two jobs run different commands");
    let script = &steps[0];
    assert!(script.contains("zerolease run --ci"), "{script}");
    assert!(!script.contains("$API_TOKEN zerolease") && !script.contains("--value"));
    if !require_root_and_tools(&["ip", "nft", "qemu-system-x86_64", "bash"]) || !image_ready() {
        return;
    }
    let w = SessionWorld::with_manifest(MANIFEST, LEASED_AND_UNLEASED);
    let work = tempfile::tempdir().unwrap();
    std::fs::create_dir(work.path().join("manifests")).unwrap();
    std::fs::copy(
        w.dir.path().join("session.yaml"),
        work.path().join("manifests/ci.yaml"),
    )
    .unwrap();
    let bin_dir = zerolease_bin().parent().unwrap().to_owned();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut key = [0u8; 32];
    getrandom::fill(&mut key).unwrap();

    let started = Instant::now();
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            w.host.name(),
            "bash",
            "-euo",
            "pipefail",
            "-c",
        ])
        .arg(script)
        .current_dir(work.path())
        .env("PATH", path)
        .env("API_TOKEN", CANARY)
        .env("API_DOMAIN", crate::session::API)
        .env("ZEROLEASE_MASTER_KEY", hex::encode(key))
        .env_remove("ZEROLEASE_HOME")
        .env_remove("ZEROLEASE_KEY_SOURCE")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    eprintln!(
        "TIMING documented CI steps: {:?}\n--- stdout\n{stdout}--- stderr\n{stderr}",
        started.elapsed()
    );
    assert_eq!(
        out.status.code(),
        Some(7),
        "the job fails with the agent's code"
    );
    assert!(
        stdout.contains("authorized"),
        "the leased call worked: {stdout}"
    );
    assert!(stderr.contains("zerolease: boot (until the guest's hello) done in"));

    let report: Value =
        serde_json::from_slice(&std::fs::read(work.path().join("zerolease-report.json")).unwrap())
            .unwrap();
    assert_report(&report);
    let id = report["session"].as_str().unwrap().to_owned();
    // The vault is where the steps put it, keyed by the env source.
    let home = work.path().join(".zerolease");
    assert!(home.join("vault.db").exists());
    assert!(
        !home.join("master.key").exists(),
        "the env source writes no key file"
    );
    let record = SessionRecord::load(&StateDir::at(&home), &id).unwrap();
    assert_eq!(record.state, "destroyed");
    assert!(!home.join("run").join(&id).exists());
    let links = w.host.exec("ip", ["-o", "link", "show"]);
    assert!(
        !String::from_utf8_lossy(&links.stdout).contains("zl-"),
        "a tap is left"
    );
    let tables = w.host.exec("nft", ["list", "tables"]);
    assert!(
        !String::from_utf8_lossy(&tables.stdout).contains("zl_"),
        "a table is left"
    );
    let qemus = Command::new("pgrep")
        .args(["-f", &format!("process=zl-{id}")])
        .output()
        .unwrap();
    assert!(qemus.stdout.is_empty(), "a QEMU is left");

    assert_no_canary("stdout", &stdout);
    assert_no_canary("stderr", &stderr);
    assert_no_canary_in_files(work.path());
}

/// A CI runner cancelling the job sends SIGTERM: `run --ci` tears the
/// session down (leases revoked, QEMU, tap, table, runtime directory gone),
/// still writes its report, and exits with zerolease's own code.
#[test]
fn sigterm_during_ci_run_cleans_up_and_still_reports() {
    if !require_root_and_tools(&["ip", "nft", "qemu-system-x86_64"]) || !image_ready() {
        return;
    }
    let w = SessionWorld::with_manifest(MANIFEST, "echo started; sleep 300");
    let report_path = w.dir.path().join("ci-report.json");
    let child = spawn_run(&w, &["--ci", "--report", report_path.to_str().unwrap()]);
    let home = w.home();
    let record = sigterm_once_running(&home, &child);
    let t = Instant::now();
    let (code, out, err) = finish(child, Duration::from_secs(60));
    eprintln!(
        "TIMING SIGTERM to exit: {:?}\n--- stdout\n{out}--- stderr\n{err}",
        t.elapsed()
    );
    assert_eq!(
        code,
        Some(125),
        "zerolease's own code for an interrupted session"
    );
    assert!(err.contains("interrupted"), "{err}");
    w.assert_no_leftovers(&record.id);
    assert_eq!(
        SessionRecord::load(&home, &record.id).unwrap().state,
        "failed"
    );
    let leases = w
        .vault
        .list_leases(zerolease::vault::LeaseFilter {
            session: Some(record.id.clone()),
            include_inactive: true,
        })
        .unwrap();
    assert!(!leases.is_empty() && leases.iter().all(|l| l.revoked.is_some()));
    let report: Value = serde_json::from_slice(&std::fs::read(&report_path).unwrap()).unwrap();
    assert_eq!(report["state"], "failed");
    assert!(report["exit_code"].is_null());
    assert!(
        report["error"].as_str().unwrap().contains("interrupted"),
        "{report}"
    );
    assert_no_canary_in_files(w.dir.path());
}

/// SIGTERM to a session whose agent works on a workspace: the agent is cut
/// off and stopped, what it changed comes back, and zerolease still exits
/// as interrupted, leaving nothing behind.
#[test]
fn sigterm_still_brings_back_the_workspace() {
    if !require_root_and_tools(&["ip", "nft", "qemu-system-x86_64", "git"]) || !image_ready() {
        return;
    }
    let w = SessionWorld::with_manifest(
        MANIFEST,
        "echo changed > notes.txt; echo started; sleep 300",
    );
    let plain = w.dir.path().join("plain");
    std::fs::create_dir_all(&plain).unwrap();
    std::fs::write(plain.join("notes.txt"), "original\n").unwrap();
    let child = spawn_run(&w, &["--workspace", plain.to_str().unwrap()]);
    let home = w.home();
    let record = sigterm_once_running(&home, &child);
    let (code, out, err) = finish(child, Duration::from_secs(120));
    assert_eq!(code, Some(125), "--- stdout\n{out}--- stderr\n{err}");
    assert!(
        err.contains("stopping the agent to bring back its workspace"),
        "{err}"
    );
    let patch = std::fs::read(workspace::output_dir(&home, &record.id).join(workspace::PATCH_FILE))
        .unwrap_or_else(|e| panic!("no patch after SIGTERM: {e}\n{err}"));
    let done = workspace::apply(&patch, &plain, workspace::ApplyOptions::default()).unwrap();
    assert_eq!(done.applied, vec!["notes.txt"]);
    assert_eq!(
        std::fs::read_to_string(plain.join("notes.txt")).unwrap(),
        "changed\n"
    );
    w.assert_no_leftovers(&record.id);
    assert_eq!(
        SessionRecord::load(&home, &record.id).unwrap().state,
        "failed"
    );
}

/// `--timeout` overrides the manifest's and is hard: it fires even while
/// the VM is still booting, tears everything down, and the report says why.
#[test]
fn the_ci_timeout_is_hard_and_reported() {
    if !require_root_and_tools(&["ip", "nft", "qemu-system-x86_64"]) || !image_ready() {
        return;
    }
    let w = SessionWorld::with_manifest(MANIFEST, "sleep 300");
    let report_path = w.dir.path().join("ci-report.json");
    let t = Instant::now();
    let child = spawn_run(
        &w,
        &[
            "--ci",
            "--timeout",
            "4s",
            "--report",
            report_path.to_str().unwrap(),
        ],
    );
    let (code, _out, err) = finish(child, Duration::from_secs(60));
    eprintln!("TIMING --timeout 4s to exit: {:?}\n{err}", t.elapsed());
    assert_eq!(code, Some(125), "{err}");
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
    let records = SessionRecord::all(&w.home());
    assert_eq!(records.len(), 1);
    let id = records[0].id.clone();
    assert_eq!(records[0].state, "failed");
    w.assert_no_leftovers(&id);
    let report: Value = serde_json::from_slice(&std::fs::read(&report_path).unwrap()).unwrap();
    assert_eq!(report["session"], id.as_str());
    assert!(
        report["error"]
            .as_str()
            .unwrap()
            .contains("timed out after 4s"),
        "{report}"
    );
    let failed: Vec<&Value> = report["durations"]["phases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["ok"] == false)
        .collect();
    assert_eq!(failed.len(), 1, "the phase it timed out in: {report}");
}
