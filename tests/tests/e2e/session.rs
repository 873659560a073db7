//! `zerolease run` for real: a VM booted (TCG) from the `minimal` image in
//! the "host" namespace, behind its jail and proxy, reaching an HTTPS API in
//! the "upstream" namespace with a token it holds only as a lease.
//!
//! One session checks several promises at once, since a boot costs ~10 s:
//! the leased call works with the env-injected token; an unleased name, a
//! direct IP, and UDP from inside the VM all fail, and it has no IPv6; the
//! agent's exit code comes out; nothing is left behind; every lease is
//! revoked; and the canary secret is nowhere outside the vault's ciphertext.

use std::sync::Arc;
use std::time::{Duration, Instant};

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use zerolease::clock::SystemClock;
use zerolease::home::StateDir;
use zerolease::manifest::Manifest;

use zerolease::session::record::{SessionRecord, control_socket};
use zerolease::session::{self, RunConfig};
use zerolease::vault::{
    AgentPattern, AuditFilter, GrantSpec, NewSecret, SecretValue, Vault, VaultConfig,
};
use zerolease_tests::upstream::{HttpsServer, TestCa};
use zerolease_tests::{Netns, require_root_and_tools};

use crate::world::{UPSTREAM, sa};

pub(crate) const CANARY: &str = "zl-canary-token-5d41402abc4b2a76b9719d911017c592";
pub(crate) const API: &str = "api.session.test";

/// The agent's script: the leased call, then three things that must fail,
/// the guest's IPv6 addresses (none) and whether the kernel's modprobe
/// helper exists (it must not), each printing its outcome, then an exit
/// code of its own.
const SCRIPT: &str = r#"
curl -sS -H "Authorization: Bearer $API_TOKEN" https://api.session.test/auth
echo "unleased=$(curl -s -o /dev/null -w '%{http_connect}' --max-time 5 https://other.session.test/hello; echo rc$?)"
echo "direct=$(curl -s -o /dev/null --noproxy '*' --max-time 5 -k https://198.18.0.2/hello; echo rc$?)"
echo "udp=$(echo x | nc -u -w 2 198.18.0.2 53 >/dev/null 2>&1; nslookup -timeout=2 example.com 198.18.0.2 >/dev/null 2>&1; echo rc$?)"
echo "ipv6=$(cat /proc/net/if_inet6 2>/dev/null | wc -l)"
echo "modprobe=$(test -e "$(cat /proc/sys/kernel/modprobe)" && echo present || echo absent)"
echo "file=$(stat -c '%a %U' .config/api/token.conf) $(sha256sum .config/api/token.conf | cut -d' ' -f1)"
echo "pwned=$(ls /tmp/pwned /tmp/pwned2 2>/dev/null | wc -l)"
git clone -q https://api.session.test/git/repo.git r && cd r && git -c user.name=vm -c user.email=vm@example.invalid commit -q --allow-empty -m from-vm && git push -q origin HEAD && echo git=push-ok
cd /home/agent
git ls-remote https://open.session.test/git/repo.git >/dev/null 2>&1; echo "git-unleased=rc$?"
exit 7
"#;

/// The session's manifest; `@SCRIPT@` and `@CA@` are filled in. The file
/// template holds quotes, `$(...)` and backticks, which must arrive as
/// written, never run.
pub(crate) const MANIFEST: &str = r#"
name: e2e
image: minimal
accel: tcg
timeout: 3m
resources: { memory: 384MiB }
command: @SCRIPT@
credentials:
  - secret: api
    inject:
      - env: API_TOKEN
      - git_credential: {}
      - file:
          path: .config/api/token.conf
          mode: 0600
          template: "token = \"${SECRET}\"\n# $(touch /tmp/pwned) `touch /tmp/pwned2`\n"
allow:
  - domain: open.session.test
ca_certs: [@CA@]
network:
  overrides: { api.session.test: [198.18.0.2], other.session.test: [198.18.0.2], open.session.test: [198.18.0.2] }
  allow_cidrs: [198.18.0.0/24]
"#;

/// What the templated file must hold, byte for byte.
fn expected_file() -> String {
    format!("token = \"{CANARY}\"\n# $(touch /tmp/pwned) `touch /tmp/pwned2`\n")
}

/// A bare repository `repo.git` under `root` with one commit.
fn seed_repo(root: &std::path::Path) {
    let git = |args: &[&str], dir: &std::path::Path| {
        let out = std::process::Command::new("git")
            .args(args)
            .current_dir(dir)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("HOME", dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    std::fs::create_dir_all(root).unwrap();
    git(&["init", "-q", "--bare", "-b", "main", "repo.git"], root);
    let work = root.join("seed");
    std::fs::create_dir_all(&work).unwrap();
    git(&["init", "-q", "-b", "main"], &work);
    std::fs::write(work.join("README"), "seed\n").unwrap();
    git(&["add", "README"], &work);
    git(
        &[
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@example.invalid",
            "commit",
            "-q",
            "-m",
            "seed",
        ],
        &work,
    );
    git(&["push", "-q", "../repo.git", "main"], &work);
}

fn last_commit(root: &std::path::Path) -> String {
    let out = std::process::Command::new("git")
        .args([
            "-C",
            &root.join("git/repo.git").display().to_string(),
            "log",
            "-1",
            "--format=%s",
            "main",
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

pub(crate) fn image_ready() -> bool {
    match zerolease::image::verify_named("minimal", None) {
        Ok(_) => true,
        Err(e) if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("CI=true and the minimal image is not usable ({e}); scripts/test builds it")
        }
        Err(e) => {
            eprintln!("SKIPPED: {e}; build it with scripts/build-image minimal");
            false
        }
    }
}

/// Host and upstream namespaces, the HTTPS upstream, a vault with the canary
/// token leased to agent `e2e`, and a manifest running `script`.
pub(crate) struct SessionWorld {
    pub(crate) host: Arc<Netns>,
    pub(crate) _upstream: Arc<Netns>,
    pub(crate) server: HttpsServer,
    pub(crate) dir: tempfile::TempDir,
    pub(crate) vault: Arc<Vault>,
    pub(crate) manifest: Manifest,
}

impl SessionWorld {
    pub(crate) fn new(script: &str) -> SessionWorld {
        SessionWorld::with_manifest(MANIFEST, script)
    }

    /// Like [`SessionWorld::new`] with another manifest template (`@SCRIPT@`
    /// and `@CA@` are filled in), for tests that need other fields.
    pub(crate) fn with_manifest(template: &str, script: &str) -> SessionWorld {
        let host = Netns::new("sh");
        let upstream = Netns::new("su");
        host.veth_to("up0", &upstream, "eth0");
        host.ip(["addr", "add", "198.18.0.1/24", "dev", "up0"]);
        host.ip(["link", "set", "up0", "up"]);
        upstream.ip(["addr", "add", "198.18.0.2/24", "dev", "eth0"]);
        upstream.ip(["link", "set", "eth0", "up"]);

        // api.anthropic.com: the devbox tests map it to this upstream.
        let ca = TestCa::new(&[
            API,
            "other.session.test",
            "open.session.test",
            "api.anthropic.com",
        ]);
        let dir = tempfile::tempdir().unwrap();
        let git_root = dir.path().join("git");
        seed_repo(&git_root);
        let server = HttpsServer::start_with_git(
            &upstream,
            sa(UPSTREAM, 443),
            &ca,
            Some(CANARY),
            Some(git_root),
        );
        let ca_path = ca.write_ca(dir.path());

        let mut vc = VaultConfig::new(StateDir::at(dir.path().join("home")));
        vc.durable = false;
        let vault = Arc::new(Vault::open(vc, Arc::new(SystemClock)).unwrap());
        vault
            .add_secret(
                NewSecret {
                    name: "api".into(),
                    kind: "token".into(),
                    description: String::new(),
                    domains: vec![API.parse().unwrap()],
                },
                SecretValue::new(zeroize::Zeroizing::new(CANARY.as_bytes().to_vec())),
            )
            .unwrap();
        vault
            .add_grant(GrantSpec {
                agent: AgentPattern::parse("e2e").unwrap(),
                secret: "api".into(),
                domains: vec![API.parse().unwrap()],
                ttl: Duration::from_secs(600),
                max_uses: None,
                renewable: false,
            })
            .unwrap();

        let manifest_path = dir.path().join("session.yaml");
        let text = template
            .replace("@SCRIPT@", &format!("{script:?}"))
            .replace("@CA@", &ca_path.display().to_string());
        std::fs::write(&manifest_path, text).unwrap();
        let manifest = Manifest::load(&manifest_path).unwrap_or_else(|e| panic!("{e}"));
        SessionWorld {
            host,
            _upstream: upstream,
            server,
            dir,
            vault,
            manifest,
        }
    }

    pub(crate) fn config(&self) -> RunConfig {
        RunConfig {
            home: StateDir::at(self.dir.path().join("home")),
            images: None,
            agent: None,
            command: None,
            hello_bound: Duration::from_secs(120),
            workspace: None,
            tty: None,
            detached: false,
        }
    }

    pub(crate) fn home(&self) -> StateDir {
        StateDir::at(self.dir.path().join("home"))
    }

    /// Nothing of session `id` is left: no tap, no table, no QEMU, no
    /// runtime directory.
    /// Runs the session from the images in `images` and checks it is
    /// refused as a bad image (the message holding `why`) before any lease
    /// is granted or any tap made.
    pub(crate) fn assert_image_refused_before_anything(&self, images: &std::path::Path, why: &str) {
        let mut config = self.config();
        config.images = Some(images.to_owned());
        let (vault, manifest) = (self.vault.clone(), self.manifest.clone());
        let result = self.host.block_on(|| async move {
            session::run(vault, manifest, config, &mut Vec::new(), &mut Vec::new()).await
        });
        let err = result.unwrap_err();
        assert!(matches!(err, session::SessionError::Image(_)), "{err}");
        assert!(err.to_string().contains(why), "{err}");
        let events: Vec<String> = self
            .vault
            .audit_list(AuditFilter::default())
            .unwrap()
            .into_iter()
            .map(|r| r.record.event)
            .collect();
        assert!(!events.iter().any(|e| e == "lease_granted"), "{events:?}");
        let links = self.host.exec("ip", ["-o", "link", "show"]);
        assert!(!String::from_utf8_lossy(&links.stdout).contains("zl-"));
    }

    pub(crate) fn assert_no_leftovers(&self, id: &str) {
        let links = self.host.exec("ip", ["-o", "link", "show"]);
        assert!(
            !String::from_utf8_lossy(&links.stdout).contains("zl-"),
            "a tap is left"
        );
        let tables = self.host.exec("nft", ["list", "tables"]);
        assert!(
            !String::from_utf8_lossy(&tables.stdout).contains("zl_"),
            "a table is left"
        );
        let qemus = std::process::Command::new("pgrep")
            .args(["-f", &format!("process=zl-{id}")])
            .output()
            .unwrap();
        assert!(qemus.stdout.is_empty(), "a QEMU is left");
        assert!(!self.dir.path().join("home/run").join(id).exists());
    }
}

#[test]
fn a_session_runs_the_agent_with_its_lease_and_leaves_nothing() {
    if !require_root_and_tools(&["ip", "nft", "qemu-system-x86_64"]) || !image_ready() {
        return;
    }
    let w = SessionWorld::new(SCRIPT);
    let (host, server, dir, vault) = (&w.host, &w.server, &w.dir, &w.vault);
    let manifest = w.manifest.clone();
    let config = w.config();

    let started = Instant::now();
    let (outcome, out, err) = host.block_on(|| async {
        let mut out = Vec::new();
        let mut err = Vec::new();
        let outcome = session::run(vault.clone(), manifest, config, &mut out, &mut err).await;
        (outcome, out, err)
    });
    let out = String::from_utf8_lossy(&out).into_owned();
    let err = String::from_utf8_lossy(&err).into_owned();
    eprintln!(
        "TIMING zerolease run, boot to teardown: {:?}\n--- stdout\n{out}--- stderr\n{err}",
        started.elapsed()
    );
    let outcome = outcome.unwrap_or_else(|e| panic!("the session failed: {e}\n{out}\n{err}"));

    // The leased call, with the token the upstream wants.
    assert!(out.contains("authorized"), "{out}");
    assert!(server.requests() >= 1);
    // What must fail, failed: an unleased name gets the proxy's 403, a direct
    // IP and UDP get nowhere.
    assert!(out.contains("unleased=403rc56"), "{out}");
    assert!(!out.contains("direct=rc0"), "{out}");
    assert!(!out.contains("udp=rc0"), "{out}");
    // IPv6 is off in the guest: no address at all, not even `::1` (the
    // jail drops it too, which the namespace tests show).
    assert!(out.contains("ipv6=0\n"), "{out}");
    // The image has no modprobe: the kernel runs that helper, and waits for
    // it, for every module it asks for (four while it boots, about 140 ms
    // under TCG), and the image has none of those modules to give.
    assert!(out.contains("modprobe=absent\n"), "{out}");
    // The templated file is byte-exact, 0600, the agent's; nothing in it ran.
    let digest = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(expected_file().as_bytes()))
    };
    assert!(out.contains(&format!("file=600 agent {digest}")), "{out}");
    assert!(out.contains("pwned=0"), "{out}");
    // git over HTTPS through the credential helper: clone and push work for
    // the leased host; a reachable host without a git lease gets nothing.
    assert!(out.contains("git=push-ok"), "{out}\n{err}");
    assert_eq!(last_commit(dir.path()), "from-vm");
    assert!(out.contains("git-unleased=rc128"), "{out}");
    // The agent's exit code comes out.
    assert_eq!(outcome.code, Some(7));

    // Nothing left: no QEMU of the session, no tap, no table, no runtime dir.
    let links = host.exec("ip", ["-o", "link", "show"]);
    assert!(
        !String::from_utf8_lossy(&links.stdout).contains("zl-"),
        "a tap is left"
    );
    let tables = host.exec("nft", ["list", "tables"]);
    assert!(
        !String::from_utf8_lossy(&tables.stdout).contains("zl_"),
        "a table is left"
    );
    let qemus = std::process::Command::new("pgrep")
        .args(["-f", &format!("process=zl-{}", outcome.session)])
        .output()
        .unwrap();
    assert!(qemus.stdout.is_empty(), "a QEMU is left");
    assert!(!dir.path().join("home/run").join(&outcome.session).exists());

    // Every lease of the session was revoked, and the chain holds.
    let records = vault.audit_list(AuditFilter::default()).unwrap();
    let of_session: Vec<_> = records
        .iter()
        .filter(|r| r.record.session.as_deref() == Some(outcome.session.as_str()))
        .map(|r| r.record.event.as_str())
        .collect();
    for event in [
        "lease_granted",
        "lease_accessed",
        "tunnel_opened",
        "lease_revoked",
        "connection_refused",
    ] {
        assert!(of_session.contains(&event), "no {event} in {of_session:?}");
    }
    // The log tells the lifecycle as it was: the secrets are injected while
    // the session is provisioning, after the guest's hello and before the
    // agent runs.
    let story: Vec<String> = records
        .iter()
        .filter(|r| r.record.session.as_deref() == Some(outcome.session.as_str()))
        .map(|r| format!("{}: {}", r.record.event, r.record.detail))
        .collect();
    let at = |prefix: &str| story.iter().position(|line| line.starts_with(prefix));
    let injected: Vec<usize> = (0..story.len())
        .filter(|&i| story[i].starts_with("lease_accessed: injected"))
        .collect();
    let (hello, running) = (
        at("session_transition: provisioning:").expect("a provisioning transition"),
        at("session_transition: running:").expect("a running transition"),
    );
    assert!(!injected.is_empty(), "{story:#?}");
    assert!(
        injected.iter().all(|&i| hello < i && i < running),
        "{story:#?}"
    );
    assert!(vault.audit_verify().unwrap().is_intact());

    // The canary is nowhere on the host outside the vault's ciphertext: not
    // in the session's output streams to us (the agent never printed it),
    // the audit log, or any file of the state directory.
    assert!(!out.contains(CANARY) && !err.contains(CANARY));
    let audit_json = serde_json::to_string(&records).unwrap();
    assert!(!audit_json.contains(CANARY));
    for entry in walk(&dir.path().join("home")) {
        let bytes = std::fs::read(&entry).unwrap_or_default();
        assert!(
            !bytes.windows(CANARY.len()).any(|w| w == CANARY.as_bytes()),
            "canary in {}",
            entry.display()
        );
    }
}

pub(crate) fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// `zerolease revoke` (over the session's control socket, as the CLI does)
/// during a long download in the VM cuts it at once; `zerolease destroy`
/// then tears the session down and leaves nothing.
#[test]
fn revoke_cuts_a_running_download_and_destroy_leaves_nothing() {
    if !require_root_and_tools(&["ip", "nft", "qemu-system-x86_64"]) || !image_ready() {
        return;
    }
    let script = "curl -sS -o /dev/null https://api.session.test/slow/500000000; echo download-exit=$?; sleep 300";
    let w = SessionWorld::new(script);
    let (vault, manifest, config, home) =
        (w.vault.clone(), w.manifest.clone(), w.config(), w.home());
    let host = w.host.clone();
    let runner = std::thread::spawn(move || {
        host.block_on(|| async move {
            let mut out = Vec::new();
            let mut err = Vec::new();
            let r = session::run(vault, manifest, config, &mut out, &mut err).await;
            (r, String::from_utf8_lossy(&out).into_owned())
        })
    });

    // Wait until the download runs through the proxy.
    let deadline = Instant::now() + Duration::from_secs(150);
    let record = loop {
        assert!(Instant::now() < deadline, "the download never started");
        let opened = w
            .vault
            .audit_list(AuditFilter::default())
            .unwrap()
            .iter()
            .any(|r| r.record.event == "tunnel_opened");
        if opened && w.server.requests() >= 1 {
            break SessionRecord::all(&home).pop().expect("a session record");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        w.server.closed().is_empty(),
        "the download ended on its own"
    );

    let ask = |what: &str| {
        let mut s = UnixStream::connect(control_socket(&record.runtime_dir)).unwrap();
        writeln!(s, "{what}").unwrap();
        let mut answer = String::new();
        BufReader::new(&s).read_line(&mut answer).unwrap();
        answer
    };
    let t = Instant::now();
    assert!(ask("revoke").starts_with("ok 1"));
    let returned = t.elapsed();
    let cut = loop {
        if let Some(at) = w.server.closed().first() {
            break at.duration_since(t);
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the download was not cut"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    eprintln!(
        "TIMING revoke call {returned:?}; upstream connection closed {cut:?} after the revoke was sent"
    );
    assert!(cut < Duration::from_secs(1), "cut after {cut:?}");
    let record_now = SessionRecord::load(&home, &record.id).unwrap();
    assert_eq!(record_now.state, "revoked");

    // Let curl's exit reach us before the session goes.
    std::thread::sleep(Duration::from_secs(2));
    let t = Instant::now();
    assert!(ask("destroy").starts_with("ok"));
    let (result, out) = runner.join().unwrap();
    eprintln!(
        "TIMING destroy to teardown: {:?}\n--- stdout\n{out}",
        t.elapsed()
    );
    assert!(
        matches!(result, Err(session::SessionError::Destroyed)),
        "{result:?}"
    );
    assert!(out.contains("download-exit="), "{out}");
    assert!(!out.contains("download-exit=0"), "{out}");
    w.assert_no_leftovers(&record.id);
    assert_eq!(
        SessionRecord::load(&home, &record.id).unwrap().state,
        "destroyed"
    );
    let revoked = w
        .vault
        .audit_list(AuditFilter::default())
        .unwrap()
        .iter()
        .filter(|r| r.record.event == "lease_revoked")
        .count();
    assert_eq!(revoked, 1);
}

/// An image whose initramfs changed after it was sealed is refused before
/// anything is built: no lease, no jail, no VM.
#[test]
fn a_tampered_image_is_refused_before_anything_is_built() {
    if !require_root_and_tools(&["ip", "nft"]) || !image_ready() {
        return;
    }
    let w = SessionWorld::new("true");
    let images = tempfile::tempdir().unwrap();
    let src = zerolease::image::verify_named("minimal", None).unwrap().dir;
    let copy = images.path().join("minimal");
    std::fs::create_dir(&copy).unwrap();
    for f in [
        zerolease::image::KERNEL_FILE,
        zerolease::image::INITRAMFS_FILE,
        zerolease::image::RECORD_FILE,
    ] {
        std::fs::copy(src.join(f), copy.join(f)).unwrap();
    }
    let mut bytes = std::fs::read(copy.join("initramfs.cpio")).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(copy.join("initramfs.cpio"), bytes).unwrap();

    w.assert_image_refused_before_anything(images.path(), "does not match image.json");
}

/// A supervisor that was killed leaves its jail and leases; the next one
/// finds the session by its record and reaps it.
#[test]
fn a_dead_supervisors_session_is_reaped() {
    if !require_root_and_tools(&["ip", "nft"]) {
        return;
    }
    let w = SessionWorld::new("true");
    let home = w.home();
    let id = zerolease::jail::JailId::parse("dead0orphan").unwrap();
    let jail = w.host.block_on(|| async {
        zerolease::jail::Jail::create(zerolease::jail::JailConfig {
            id: id.clone(),
            link: zerolease::jail::Link::Tap {
                owner: nix::unistd::Uid::effective(),
            },
            pool: zerolease::jail::DEFAULT_POOL.parse().unwrap(),
            ports: session::PORTS,
            dns_port: None,
        })
        .await
        .unwrap()
        .into_record()
    });
    let lease = w
        .vault
        .grant(zerolease::vault::LeaseRequest {
            agent: "e2e".into(),
            session: id.as_str().into(),
            secret: "api".into(),
            ask: Default::default(),
        })
        .unwrap();
    // The pid of a process that is gone.
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let runtime_dir = w.dir.path().join("home/run").join(id.as_str());
    std::fs::create_dir_all(&runtime_dir).unwrap();
    SessionRecord {
        id: id.as_str().into(),
        name: "e2e".into(),
        image: "minimal".into(),
        pid: dead,
        started: w.vault.now(),
        state: "running".into(),
        runtime_dir: runtime_dir.clone(),
        jail: Some(jail),
        qemu_pid: None,
        exit_code: None,
        workspace: None,
    }
    .save(&home)
    .unwrap();
    let links = w.host.exec("ip", ["-o", "link", "show"]);
    assert!(String::from_utf8_lossy(&links.stdout).contains("zl-dead0orphan"));

    let vault = w.vault.clone();
    let reaped = w.host.run(|| session::reap_orphans(&vault, &home));
    assert_eq!(reaped, vec!["dead0orphan".to_owned()]);
    let links = w.host.exec("ip", ["-o", "link", "show"]);
    assert!(
        !String::from_utf8_lossy(&links.stdout).contains("zl-"),
        "the tap is left"
    );
    let tables = w.host.exec("nft", ["list", "tables"]);
    assert!(
        !String::from_utf8_lossy(&tables.stdout).contains("zl_"),
        "the table is left"
    );
    assert!(!runtime_dir.exists());
    assert!(w.vault.get_lease(&lease.id.0).unwrap().revoked.is_some());
    assert_eq!(
        SessionRecord::load(&home, "dead0orphan").unwrap().state,
        "destroyed"
    );
    // A second pass finds nothing more to do.
    let vault = w.vault.clone();
    assert!(
        w.host
            .run(|| session::reap_orphans(&vault, &home))
            .is_empty()
    );
}
