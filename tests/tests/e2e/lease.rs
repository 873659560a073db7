//! Leases during a session, through the real `zerolease` binary: `zerolease
//! run` in the "host" namespace, and `zerolease renew` / `zerolease secret
//! rotate` from outside while the agent keeps working.
//!
//! 1. A 40 s lease on a renewable grant outlives its first expiry after
//!    `zerolease renew`, while a non-renewable one is refused with a message
//!    that says what to do, and a finished session is "not running".
//! 2. `renew: auto` keeps a 30 s lease alive past its first expiry.
//! 3. `zerolease secret rotate` while the agent waits rewrites the guest's
//!    env file and templated file, and git's credential helper serves the
//!    new value; no output, log or reply holds either value.
//!
//! The binary is `zerolease_tests::zerolease_bin()`: built by cargo before
//! the first use, so never older than the sources.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use sha2::Digest;
use zerolease::session::record::SessionRecord;
use zerolease::vault::{AgentPattern, AuditFilter, GrantSpec, NewSecret, SecretValue};
use zerolease_tests::{require_root_and_tools, zerolease_bin};

use crate::session::{CANARY, SessionWorld, image_ready, walk};

/// The leased API's name.
const API_DOMAIN: &str = "api.session.test";

/// A value rotated in during test 3; never printed by anyone.
const ROTATED: &str = "zl-canary-rotated-7c4ca4238a0b923820dcc509a6f75849b";

/// The manifest of these tests; the agent is `lease`.
const MANIFEST: &str = r#"
name: lease
image: minimal
accel: tcg
timeout: 4m
resources: { memory: 384MiB }
command: @SCRIPT@
credentials:
@CREDENTIALS@
ca_certs: [@CA@]
network:
  overrides: { api.session.test: [198.18.0.2] }
  allow_cidrs: [198.18.0.0/24]
"#;

/// Polls the leased API every 2 s for `secs` seconds, printing the host
/// clock's second and the HTTP status of each call.
fn poll_script(secs: u32) -> String {
    format!(
        r#"end=$(( $(date +%s) + {secs} ))
while [ "$(date +%s)" -lt "$end" ]; do
  code=$(curl -s -o /dev/null -w '%{{http_code}}' --max-time 5 -H "Authorization: Bearer $API_TOKEN" https://api.session.test/auth)
  echo "poll $(date +%s) $code"
  sleep 2
done
echo polling-done"#
    )
}

fn world(credentials: &str, script: &str) -> SessionWorld {
    let template = MANIFEST.replace("@CREDENTIALS@", credentials);
    let w = SessionWorld::with_manifest(&template, script);
    grant(&w, "api", 300, true);
    w
}

fn grant(w: &SessionWorld, secret: &str, max_secs: u64, renewable: bool) {
    w.vault
        .add_grant(GrantSpec {
            agent: AgentPattern::parse("lease").unwrap(),
            secret: secret.into(),
            domains: vec![format!("{secret}.session.test").parse().unwrap()],
            ttl: Duration::from_secs(max_secs),
            max_uses: None,
            renewable,
        })
        .unwrap();
}

/// `zerolease --home <home> ARGS` on the host, with `stdin` fed in.
fn cli(w: &SessionWorld, args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(zerolease_bin())
        .arg("--home")
        .arg(w.home().root())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(s) = stdin {
        input.write_all(s.as_bytes()).unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
}

/// A `zerolease run` in the host namespace, its output collected as it
/// comes.
struct Run {
    child: Child,
    out: Arc<Mutex<Vec<String>>>,
    err: Arc<Mutex<Vec<String>>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl Run {
    fn start(w: &SessionWorld) -> Run {
        let manifest = w.dir.path().join("session.yaml");
        let home = w.home().root().display().to_string();
        let mut child = w.host.spawn(
            &zerolease_bin().display().to_string(),
            [
                "-v",
                "--home",
                &home,
                "run",
                &manifest.display().to_string(),
                "--hello-timeout",
                "120s",
            ],
        );
        let out = Arc::new(Mutex::new(Vec::new()));
        let err = Arc::new(Mutex::new(Vec::new()));
        let collect = |stream: Box<dyn std::io::Read + Send>, into: Arc<Mutex<Vec<String>>>| {
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    into.lock().unwrap().push(line);
                }
            })
        };
        let readers = vec![
            collect(Box::new(child.stdout.take().unwrap()), out.clone()),
            collect(Box::new(child.stderr.take().unwrap()), err.clone()),
        ];
        Run {
            child,
            out,
            err,
            readers,
        }
    }

    fn out(&self) -> Vec<String> {
        self.out.lock().unwrap().clone()
    }

    /// Waits until a line of the agent's output satisfies `pred`.
    fn wait_for(&mut self, what: &str, within: Duration, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + within;
        loop {
            if let Some(l) = self.out().into_iter().find(|l| pred(l)) {
                return l;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                std::thread::sleep(Duration::from_millis(200));
                panic!(
                    "zerolease run ended ({status}) before {what}\n--- stdout\n{}\n--- stderr\n{}",
                    self.out().join("\n"),
                    self.err.lock().unwrap().join("\n")
                );
            }
            assert!(
                Instant::now() < deadline,
                "no {what} within {within:?}\n--- stdout\n{}\n--- stderr\n{}",
                self.out().join("\n"),
                self.err.lock().unwrap().join("\n")
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits for the exit; returns the exit code, stdout and stderr.
    fn finish(mut self) -> (Option<i32>, String, String) {
        let deadline = Instant::now() + Duration::from_secs(200);
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("zerolease run did not end");
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        let out = self.out().join("\n");
        let err = self.err.lock().unwrap().join("\n");
        eprintln!("--- session stdout\n{out}\n--- session stderr\n{err}");
        (status.code(), out, err)
    }
}

/// The session's record, once it is running.
fn running_session(w: &SessionWorld) -> SessionRecord {
    let home = w.home();
    let deadline = Instant::now() + Duration::from_secs(150);
    loop {
        if let Some(r) = SessionRecord::all(&home)
            .into_iter()
            .find(|r| r.state == "running")
        {
            return r;
        }
        assert!(Instant::now() < deadline, "the session never ran");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The lease of `secret` in session `id`.
fn lease_of(w: &SessionWorld, id: &str, secret: &str) -> zerolease::vault::Lease {
    w.vault
        .list_leases(zerolease::vault::LeaseFilter {
            session: Some(id.into()),
            include_inactive: true,
        })
        .unwrap()
        .into_iter()
        .find(|l| l.secret == secret)
        .unwrap_or_else(|| panic!("no lease of {secret} in {id}"))
}

/// The monotonic instant of a vault time.
fn instant_of(t: zerolease::clock::Timestamp) -> Instant {
    let (wall, now) = (SystemTime::now(), Instant::now());
    match t.to_system_time().duration_since(wall) {
        Ok(ahead) => now + ahead,
        Err(behind) => now - behind.duration(),
    }
}

/// Upstream connections that ended well after `t` (each poll is one).
fn calls_after(w: &SessionWorld, t: Instant) -> usize {
    let margin = Duration::from_secs(3);
    w.server
        .closed()
        .iter()
        .filter(|c| **c > t + margin)
        .count()
}

/// `(guest second, status)` of every poll line.
fn polls(out: &str) -> Vec<(u64, String)> {
    out.lines()
        .filter_map(|l| {
            let mut p = l.strip_prefix("poll ")?.split(' ');
            Some((p.next()?.parse().ok()?, p.next()?.to_owned()))
        })
        .collect()
}

fn sha256(s: &str) -> String {
    hex::encode(sha2::Sha256::digest(s.as_bytes()))
}

/// No value of either canary anywhere we can see.
fn assert_no_secret(texts: &[&str]) {
    for t in texts {
        assert!(!t.contains(CANARY), "the secret leaked:\n{t}");
        assert!(!t.contains(ROTATED), "the rotated secret leaked:\n{t}");
    }
}

fn tools_ready() -> bool {
    require_root_and_tools(&["ip", "nft", "qemu-system-x86_64"]) && image_ready()
}

#[test]
fn renew_extends_a_running_sessions_lease_past_its_first_expiry() {
    if !tools_ready() {
        return;
    }
    let credentials = "  - secret: api\n    ttl: 40s\n    inject: [{ env: API_TOKEN }]\n  - secret: other\n    ttl: 4m\n    inject: [{ env: OTHER_TOKEN }]";
    let w = world(credentials, &poll_script(75));
    w.vault
        .add_secret(
            NewSecret {
                name: "other".into(),
                kind: "token".into(),
                description: String::new(),
                domains: vec!["other.session.test".parse().unwrap()],
            },
            SecretValue::new(zeroize::Zeroizing::new(b"other-value".to_vec())),
        )
        .unwrap();
    grant(&w, "other", 300, false);

    let mut run = Run::start(&w);
    let record = running_session(&w);
    let first = lease_of(&w, &record.id, "api");
    let old_expiry = instant_of(first.expires);
    run.wait_for("a first poll", Duration::from_secs(120), |l| {
        l.starts_with("poll ")
    });
    assert!(Instant::now() < old_expiry, "booting took the whole lease");

    // Renew all: `api` is extended, `other` is refused with what to do.
    let out = cli(&w, &["--json", "renew", &record.id, "--ttl", "2m"], None);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    eprintln!("renew: {:?}\n{stdout}{stderr}", out.status);
    assert_eq!(out.status.code(), Some(3), "one lease is refused: exit 3");
    let reply: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let leases = reply["leases"].as_array().unwrap();
    let api = leases.iter().find(|l| l["secret"] == "api").unwrap();
    let other = leases.iter().find(|l| l["secret"] == "other").unwrap();
    assert_eq!(api["renewed"], true, "{reply}");
    assert!(api["seconds_left"].as_u64().unwrap() > 100, "{reply}");
    assert_eq!(other["renewed"], false, "{reply}");
    let why = other["refused"].as_str().unwrap();
    assert!(
        why.contains("does not allow renewal") && why.contains("--renewable"),
        "{why}"
    );
    let renewed = lease_of(&w, &record.id, "api");
    assert!(renewed.expires > first.expires);
    assert_eq!(renewed.renewals, 1);

    // One credential, human output, exit 0.
    let out = cli(&w, &["renew", &record.id, "--credential", "api"], None);
    let human = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(0), "{human}");
    assert!(human.contains("renewed `api` until"), "{human}");
    // A credential the session does not hold: not found, exit 4.
    let out = cli(&w, &["renew", &record.id, "--credential", "nope"], None);
    assert_eq!(out.status.code(), Some(4));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("holds no lease of secret `nope`"),
        "{out:?}"
    );

    let (code, sout, serr) = run.finish();
    assert_eq!(code, Some(0), "{sout}\n{serr}");
    let polls = polls(&sout);
    assert!(polls.len() >= 5, "{polls:?}");
    assert!(
        polls.iter().all(|(_, c)| c == "200"),
        "a call failed: {polls:?}"
    );
    let after = calls_after(&w, old_expiry);
    assert!(
        after >= 3,
        "{after} calls well past the first expiry: {polls:?}"
    );
    assert!(serr.contains("lease renewed"), "{serr}");

    // The session is over: renewing it is a clear error, exit 4.
    let out = cli(&w, &["renew", &record.id], None);
    assert_eq!(out.status.code(), Some(4));
    let ended = out_text(&out);
    assert!(ended.contains("is not running"), "{ended}");
    assert_no_secret(&[&ended, &sout, &serr, &stdout, &stderr, &human]);
    w.assert_no_leftovers(&record.id);
}

fn out_text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn renew_auto_keeps_a_session_working_past_its_first_ttl() {
    if !tools_ready() {
        return;
    }
    let credentials =
        "  - secret: api\n    ttl: 30s\n    renew: auto\n    inject: [{ env: API_TOKEN }]";
    let w = world(credentials, &poll_script(70));
    let mut run = Run::start(&w);
    let record = running_session(&w);
    let first = lease_of(&w, &record.id, "api");
    let old_expiry = instant_of(first.expires);
    run.wait_for("a first poll", Duration::from_secs(120), |l| {
        l.starts_with("poll ")
    });
    let (code, out, err) = run.finish();
    assert_eq!(code, Some(0), "{out}\n{err}");
    let polls = polls(&out);
    assert!(polls.len() >= 5, "{polls:?}");
    assert!(
        polls.iter().all(|(_, c)| c == "200"),
        "a call failed: {polls:?}"
    );
    let after = calls_after(&w, old_expiry);
    assert!(
        after >= 3,
        "{after} calls well past the first expiry: {polls:?}"
    );
    // Each renewal is audited and logged, without the value.
    let renewals = w
        .vault
        .audit_list(AuditFilter {
            session: Some(record.id.clone()),
            ..AuditFilter::default()
        })
        .unwrap()
        .into_iter()
        .filter(|r| r.record.event == "lease_renewed")
        .count();
    assert!(renewals >= 2, "{renewals} renewals");
    assert!(err.contains("lease renewed"), "{err}");
    assert_no_secret(&[&out, &err]);
    w.assert_no_leftovers(&record.id);
}

/// Prints, every second, the hashes of the env file's value, the templated
/// file and git's credential for the API host, until the file changes (or
/// 100 s pass).
const ROTATE_SCRIPT: &str = r#"
h() { sha256sum | cut -d' ' -f1; }
state() {
  e=$( (. /run/zerolease/env; printf %s "$API_TOKEN") | h)
  f=$(h < .config/api/token.conf)
  g=$(printf 'protocol=https\nhost=api.session.test\n\n' | GIT_TERMINAL_PROMPT=0 git credential fill 2>/dev/null | sed -n 's/^password=//p' | tr -d '\n' | h)
  echo "state env=$e file=$f git=$g mode=$(stat -c '%a %U' .config/api/token.conf /run/zerolease/env | tr '\n' ' ')"
}
first=$(h < .config/api/token.conf)
end=$(( $(date +%s) + 100 ))
while [ "$(date +%s)" -lt "$end" ]; do
  state
  [ "$(h < .config/api/token.conf)" != "$first" ] && break
  sleep 1
done
state
echo rotate-done
"#;

#[test]
fn secret_rotate_pushes_the_new_value_into_a_running_session() {
    if !tools_ready() {
        return;
    }
    let credentials = "  - secret: api\n    inject:\n      - env: API_TOKEN\n      - git_credential: {}\n      - file:\n          path: .config/api/token.conf\n          mode: 0600\n          template: \"token = ${SECRET}\\n\"";
    let w = world(credentials, ROTATE_SCRIPT);
    let mut run = Run::start(&w);
    let record = running_session(&w);
    let old_file = sha256(&format!("token = {CANARY}\n"));
    let new_file = sha256(&format!("token = {ROTATED}\n"));
    let (old, new) = (sha256(CANARY), sha256(ROTATED));
    let before = run.wait_for("the first state", Duration::from_secs(120), |l| {
        l.starts_with("state ")
    });
    assert_eq!(
        before,
        format!("state env={old} file={old_file} git={old} mode=600 agent 600 agent "),
    );

    let out = cli(&w, &["--json", "secret", "rotate", "api"], Some(ROTATED));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    eprintln!("rotate: {:?}\n{stdout}{stderr}", out.status);
    assert_eq!(out.status.code(), Some(0));
    let reply: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(reply["version"], 2);
    let sessions = reply["sessions"].as_array().unwrap();
    assert_eq!(sessions.len(), 1, "{reply}");
    assert_eq!(sessions[0]["session"], record.id.as_str());
    assert_eq!(sessions[0]["updated"], true, "{reply}");
    assert_eq!(sessions[0]["env"], serde_json::json!(["API_TOKEN"]));
    assert_eq!(
        sessions[0]["files"],
        serde_json::json!([".config/api/token.conf"])
    );

    let after = run.wait_for("the rotated state", Duration::from_secs(60), |l| {
        l.contains(&format!("file={new_file}"))
    });
    assert_eq!(
        after,
        format!("state env={new} file={new_file} git={new} mode=600 agent 600 agent "),
    );
    let (code, out, err) = run.finish();
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(out.contains("rotate-done"));
    assert!(err.contains("pushed the rotated secret"), "{err}");

    // Neither value anywhere: outputs, logs, the CLI's reply, the audit
    // log, the state directory.
    let audit =
        serde_json::to_string(&w.vault.audit_list(AuditFilter::default()).unwrap()).unwrap();
    assert_no_secret(&[&out, &err, &stdout, &stderr, &audit]);
    for f in walk(w.home().root()) {
        let bytes = std::fs::read(&f).unwrap_or_default();
        for v in [CANARY, ROTATED] {
            assert!(
                !bytes.windows(v.len()).any(|x| x == v.as_bytes()),
                "a value in {}",
                f.display()
            );
        }
    }
    w.assert_no_leftovers(&record.id);
}

/// A live session that cannot take the new value (here: its control socket
/// hangs up without an answer) does not fail the rotation: `secret rotate`
/// stores the new version, exits 0, and warns which session still has the
/// old value. Needs no VM: the "session" is a record, a socket, and a
/// `zerolease` process standing in for its `run`.
#[test]
fn secret_rotate_succeeds_with_a_warning_when_a_session_cannot_be_updated() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let zl = |args: &[&str], stdin: &str| {
        let mut child = Command::new(zerolease_bin())
            .arg("--home")
            .arg(&home)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let id = "fake0session";
    let add = zl(&["secret", "add", "api", "--domain", API_DOMAIN], CANARY);
    assert_eq!(add.0, Some(0), "{add:?}");
    let grant = zl(
        &[
            "policy", "grant", "--agent", "a", "--secret", "api", "--domain", API_DOMAIN, "--ttl",
            "10m",
        ],
        "",
    );
    assert_eq!(grant.0, Some(0), "{grant:?}");
    let lease = zl(
        &[
            "lease",
            "grant",
            "--agent",
            "a",
            "--session",
            id,
            "--secret",
            "api",
        ],
        "",
    );
    assert_eq!(lease.0, Some(0), "{lease:?}");

    // The stand-in for the session's `zerolease run`: a zerolease process
    // that waits on its stdin.
    let other_home = dir.path().join("other");
    let mut standin = Command::new(zerolease_bin())
        .arg("--home")
        .arg(&other_home)
        .args(["secret", "add", "x", "--domain", "x.example"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let runtime_dir = dir.path().join("run");
    std::fs::create_dir_all(&runtime_dir).unwrap();
    let listener = std::os::unix::net::UnixListener::bind(
        zerolease::session::record::control_socket(&runtime_dir),
    )
    .unwrap();
    // Reads each request and hangs up without answering.
    let hangs_up = std::thread::spawn(move || {
        let mut lines = Vec::new();
        for _ in 0..2 {
            let (s, _) = listener.accept().unwrap();
            let mut line = String::new();
            BufReader::new(&s).read_line(&mut line).unwrap();
            lines.push(line);
        }
        lines
    });
    let record = SessionRecord {
        id: id.into(),
        name: "fake".into(),
        image: "minimal".into(),
        pid: standin.id(),
        started: zerolease::clock::Timestamp::from_system_time(SystemTime::now()),
        state: "running".into(),
        runtime_dir,
        jail: None,
        qemu_pid: None,
        exit_code: None,
        workspace: None,
    };
    record.save(&zerolease::home::StateDir::at(&home)).unwrap();
    assert!(record.supervisor_alive());

    let (code, stdout, stderr) = zl(&["--json", "secret", "rotate", "api"], ROTATED);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    let reply: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(reply["version"], 2);
    assert_eq!(reply["sessions"][0]["session"], id);
    assert_eq!(reply["sessions"][0]["updated"], false);
    let error = reply["sessions"][0]["error"].as_str().unwrap();
    assert!(error.contains("ended before it answered"), "{error}");

    // The human form says it as a warning.
    let (code, stdout, stderr) = zl(&["secret", "rotate", "api"], "third-value");
    assert_eq!(code, Some(0));
    assert!(stdout.contains("is now version 3"), "{stdout}");
    assert!(
        stderr.contains(&format!("warning: session `{id}` still has the old value")),
        "{stderr}"
    );
    let _ = standin.kill();
    let _ = standin.wait();
    let requests = hangs_up.join().unwrap();
    assert_eq!(requests, vec!["{\"rotated\":{\"secret\":\"api\"}}\n"; 2]);
    assert_no_secret(&[&stdout, &stderr, &requests.concat()]);
}
