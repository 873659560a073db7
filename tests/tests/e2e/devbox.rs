//! The `devbox` image for real agents: a Debian root disk (read-only, under
//! a throwaway tmpfs overlay) with Node.js, Python, git and Claude Code.
//!
//! - In the VM, `claude --version`, `codex --version`, `node`, `python3`
//!   and `git` run, and
//!   `claude -p` itself reaches the (fake) API through the proxy.
//! - `api.anthropic.com` (mapped to the test upstream by
//!   `network.overrides`; the real one is never contacted) answers through
//!   the session's proxy with the lease — over Node's own TLS, the way
//!   Claude Code talks — and is refused by the proxy without it.
//! - The agent writes into its home (which lives on the image), the guest
//!   agent writes /etc as root, and the root disk is byte-for-byte the same
//!   afterwards.
//! - A root disk changed after sealing is refused before anything is built.

use std::time::{Duration, Instant};

use zerolease::image;
use zerolease::session;
use zerolease::vault::{AgentPattern, AuditFilter, GrantSpec, NewSecret, SecretValue};
use zerolease_tests::require_root_and_tools;

use crate::session::{CANARY, SessionWorld, walk};

const ANTHROPIC: &str = "api.anthropic.com";

/// The image must be built (scripts/test builds it); under CI its absence
/// fails the test.
fn devbox_ready() -> bool {
    match image::verify_named("devbox", None) {
        Ok(v) if v.root_disk.is_some() => true,
        Ok(_) => panic!("image devbox has no root disk in its record; rebuild it"),
        Err(e) if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("CI=true and the devbox image is not usable ({e}); scripts/test builds it")
        }
        Err(e) => {
            eprintln!("SKIPPED: {e}; build it with scripts/build-image devbox");
            false
        }
    }
}

/// A session on image devbox; `@CREDENTIALS@` is the credentials block.
const MANIFEST: &str = r#"
name: e2e
image: devbox
accel: tcg
timeout: 8m
resources: { cpus: 2, memory: 2GiB }
command: @SCRIPT@
env: { CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC: "1" }
@CREDENTIALS@
ca_certs: [@CA@]
network:
  overrides: { api.anthropic.com: [198.18.0.2], open.session.test: [198.18.0.2] }
  allow_cidrs: [198.18.0.0/24]
"#;

const LEASED: &str = r#"credentials:
  - secret: anthropic
    domains: [api.anthropic.com]
    inject:
      - env: ANTHROPIC_API_KEY"#;

const UNLEASED: &str = r#"allow:
  - domain: open.session.test"#;

/// GET through the proxy in $HTTPS_PROXY with Node's own http/tls modules
/// (Node 18 has no built-in proxy support, so the CONNECT is explicit, as
/// proxy agents do it); the key goes in the Authorization header, never to
/// stdout. Prints `node=<path> <status> <body>` or `node=<path> connect <status>`.
const GET_JS: &str = r#"
const http = require('http'), https = require('https'), tls = require('tls');
const url = new URL(process.argv[2]);
const proxy = new URL(process.env.HTTPS_PROXY);
const say = (what) => console.log(`node=${url.pathname} ${what}`);
const req = http.request({ host: proxy.hostname, port: proxy.port, method: 'CONNECT', path: `${url.hostname}:443` });
req.on('connect', (res, socket) => {
  if (res.statusCode !== 200) { say(`connect ${res.statusCode}`); socket.destroy(); return; }
  const r = https.request({
    host: url.hostname, path: url.pathname,
    headers: { Authorization: `Bearer ${process.env.ANTHROPIC_API_KEY || ''}` },
    createConnection: () => tls.connect({ socket, servername: url.hostname }),
  }, (res2) => {
    let body = '';
    res2.on('data', (d) => body += d);
    res2.on('end', () => say(`${res2.statusCode} ${body.trim()}`));
  });
  r.on('error', (e) => say(`error ${e.code}`));
  r.end();
});
req.on('error', (e) => say(`error ${e.code}`));
req.end();
"#;

fn script() -> String {
    format!(
        r#"
echo "claude=$(claude --version 2>&1 | head -n1)"
echo "codex=$(codex --version 2>&1 | head -n1)"
echo "node-version=$(node --version)"
echo "python=$(python3 --version 2>&1)"
echo "git=$(git --version)"
echo "user=$(id -un) home=$HOME"
cat > /tmp/get.js <<'EOF'
{GET_JS}
EOF
node /tmp/get.js https://{ANTHROPIC}/hello
node /tmp/get.js https://{ANTHROPIC}/auth
echo "curl=$(curl -s -o /dev/null -w '%{{http_connect}}/%{{http_code}}' --max-time 20 https://{ANTHROPIC}/hello)"
echo "root=$(awk '$2 == "/" {{ print $3 }}' /proc/mounts)"
echo "helper=$(test -x /usr/local/bin/zerolease-guest && echo present)"
dd if=/dev/zero of=$HOME/big bs=1M count=8 2>/dev/null && echo changed >> $HOME/.bashrc && rm -f $HOME/.profile && echo "wrote=ok"
touch /usr/bin/zl-planted 2>/dev/null; echo "usr-write=rc$?"
echo "claude-p=$(timeout 150 claude -p hello 2>&1 | tr '\n' ' ' | head -c 400)"
"#
    )
}

fn add_anthropic_secret(w: &SessionWorld) {
    w.vault
        .add_secret(
            NewSecret {
                name: "anthropic".into(),
                kind: "api-key".into(),
                description: String::new(),
                domains: vec![ANTHROPIC.parse().unwrap()],
            },
            SecretValue::new(zeroize::Zeroizing::new(CANARY.as_bytes().to_vec())),
        )
        .unwrap();
    w.vault
        .add_grant(GrantSpec {
            agent: AgentPattern::parse("e2e").unwrap(),
            secret: "anthropic".into(),
            domains: vec![ANTHROPIC.parse().unwrap()],
            ttl: Duration::from_secs(900),
            max_uses: None,
            renewable: false,
        })
        .unwrap();
}

/// Runs the world's session; returns (outcome, stdout, stderr).
fn run(w: &SessionWorld) -> (session::RunOutcome, String, String) {
    let (vault, manifest, config) = (w.vault.clone(), w.manifest.clone(), w.config());
    let started = Instant::now();
    let (outcome, out, err) = w.host.block_on(|| async move {
        let mut out = Vec::new();
        let mut err = Vec::new();
        let outcome = session::run(vault, manifest, config, &mut out, &mut err).await;
        (outcome, out, err)
    });
    let out = String::from_utf8_lossy(&out).into_owned();
    let err = String::from_utf8_lossy(&err).into_owned();
    eprintln!(
        "TIMING devbox zerolease run, start to teardown: {:?}\n--- stdout\n{out}--- stderr\n{err}",
        started.elapsed()
    );
    let outcome = outcome.unwrap_or_else(|e| panic!("the session failed: {e}\n{out}\n{err}"));
    (outcome, out, err)
}

/// Seconds between the session's `booting` and `provisioning` transitions
/// (QEMU start to the guest agent's hello), from the audit log.
fn hello_seconds(w: &SessionWorld, session: &str) -> Option<f64> {
    let records = w.vault.audit_list(AuditFilter::default()).ok()?;
    let at = |needle: &str| {
        records
            .iter()
            .find(|r| {
                r.record.session.as_deref() == Some(session) && r.record.detail.contains(needle)
            })
            .map(|r| r.record.time)
    };
    let (boot, hello) = (at("jail, proxy, VM")?, at("said hello")?);
    Some(hello.as_millis().saturating_sub(boot.as_millis()) as f64 / 1000.0)
}

#[test]
fn devbox_runs_claude_code_reaches_anthropic_by_lease_and_never_changes_its_disk() {
    if !require_root_and_tools(&["ip", "nft", "qemu-system-x86_64"]) || !devbox_ready() {
        return;
    }
    let t = Instant::now();
    let before = image::verify_named("devbox", None).unwrap();
    eprintln!(
        "TIMING image verify devbox (kernel, initramfs, {} MiB root disk, all hashed): {:?}",
        before.record.root_disk.as_ref().map_or(0, |d| d.size >> 20),
        t.elapsed()
    );
    // What `run` does: the root disk's digest from the state directory's
    // cache once it has been hashed (the image was built seconds ago at the
    // least, so the first verify may remember it).
    let state = tempfile::tempdir().unwrap();
    let cache = image::DigestCache::in_state_dir(state.path());
    image::verify_named_with("devbox", None, Some(&cache)).unwrap();
    let t = Instant::now();
    image::verify_named_with("devbox", None, Some(&cache)).unwrap();
    eprintln!(
        "TIMING image verify devbox with the digest cache warm: {:?}",
        t.elapsed()
    );
    let disk = before.root_disk.clone().unwrap();
    let mtime_before = std::fs::metadata(&disk).unwrap().modified().unwrap();

    let template = MANIFEST.replace("@CREDENTIALS@", LEASED);
    let w = SessionWorld::with_manifest(&template, &script());
    add_anthropic_secret(&w);
    let (outcome, out, err) = run(&w);
    if let Some(s) = hello_seconds(&w, &outcome.session) {
        eprintln!("TIMING devbox boot to hello under TCG: {s:.1}s");
    }

    // The tools of the image run, as the unprivileged agent.
    assert!(out.contains("(Claude Code)"), "{out}");
    assert!(out.contains("codex=codex-cli "), "{out}");
    assert!(out.contains("node-version=v"), "{out}");
    assert!(out.contains("python=Python 3."), "{out}");
    assert!(out.contains("git=git version "), "{out}");
    assert!(out.contains("user=agent home=/home/agent"), "{out}");
    // The guest runs on the overlay, with its own binary inside for git.
    assert!(out.contains("root=overlay"), "{out}");
    assert!(out.contains("helper=present"), "{out}");
    // api.anthropic.com through the lease: Node's TLS with the session CA
    // (NODE_EXTRA_CA_CERTS) and the key from the lease; curl agrees.
    assert!(out.contains("node=/hello 200 hello from upstream"), "{out}");
    assert!(out.contains("node=/auth 200 authorized"), "{out}");
    assert!(out.contains("curl=200/200"), "{out}");
    // Claude Code itself (`claude -p`) goes through HTTPS_PROXY and trusts
    // the session CA: its TLS handshakes with the fake api.anthropic.com
    // complete (node 2, curl 1, claude at least 1). The upstream has no
    // /v1/messages, so claude reports an API error, not a network one.
    assert!(out.contains("claude-p="), "{out}");
    assert!(
        !out.contains("Unable to connect") && !out.contains("certificate"),
        "{out}"
    );
    assert!(
        w.server.requests() >= 4,
        "claude never completed a TLS handshake with the upstream ({} in all)\n{out}",
        w.server.requests()
    );
    // Writes: the agent's home (on the image) and root's /etc changed in the
    // overlay; the agent cannot write to /usr at all.
    assert!(out.contains("wrote=ok"), "{out}");
    assert!(!out.contains("usr-write=rc0"), "{out}");
    assert_eq!(outcome.code, Some(0), "{out}\n{err}");
    w.assert_no_leftovers(&outcome.session);

    // The root disk is unchanged: same digest as recorded, same mtime.
    let after = image::verify_named("devbox", None)
        .unwrap_or_else(|e| panic!("the root disk changed during the session: {e}"));
    assert_eq!(after.record.root_disk, before.record.root_disk);
    assert_eq!(
        std::fs::metadata(&disk).unwrap().modified().unwrap(),
        mtime_before
    );

    // The key never left the vault except into the VM.
    assert!(!out.contains(CANARY) && !err.contains(CANARY));
    for entry in walk(&w.dir.path().join("home")) {
        let bytes = std::fs::read(&entry).unwrap_or_default();
        assert!(
            !bytes.windows(CANARY.len()).any(|x| x == CANARY.as_bytes()),
            "canary in {}",
            entry.display()
        );
    }
}

#[test]
fn devbox_without_the_lease_cannot_reach_anthropic() {
    if !require_root_and_tools(&["ip", "nft", "qemu-system-x86_64"]) || !devbox_ready() {
        return;
    }
    let script = format!(
        r#"
cat > /tmp/get.js <<'EOF'
{GET_JS}
EOF
node /tmp/get.js https://{ANTHROPIC}/hello
echo "curl=$(curl -s -o /dev/null -w '%{{http_connect}}' --max-time 20 https://{ANTHROPIC}/hello; echo rc$?)"
echo "key=${{ANTHROPIC_API_KEY:-unset}}"
node /tmp/get.js https://open.session.test/hello
"#
    );
    let template = MANIFEST.replace("@CREDENTIALS@", UNLEASED);
    let w = SessionWorld::with_manifest(&template, &script);
    // The secret and grant exist; the manifest just does not lease it.
    add_anthropic_secret(&w);
    let (outcome, out, _) = run(&w);

    // The proxy refuses the CONNECT: 403, and curl fails (56).
    assert!(out.contains("node=/hello connect 403"), "{out}");
    assert!(out.contains("curl=403rc56"), "{out}");
    assert!(out.contains("key=unset"), "{out}");
    // The allow-listed name works in the same session, so the refusal is
    // the lease's doing, not a broken network.
    assert!(out.contains("node=/hello 200 hello from upstream"), "{out}");
    assert_eq!(outcome.code, Some(0));
    let refused = w
        .vault
        .audit_list(AuditFilter::default())
        .unwrap()
        .into_iter()
        .any(|r| {
            r.record.event == "connection_refused" && r.record.domain.as_deref() == Some(ANTHROPIC)
        });
    assert!(
        refused,
        "no connection_refused for {ANTHROPIC} in the audit log"
    );
    w.assert_no_leftovers(&outcome.session);
}

/// A root disk that changed after sealing is refused before anything is
/// built: no lease, no jail, no VM. The copy holds the real kernel and
/// initramfs and a small stand-in disk whose digest the record vouches for
/// (copying the real 2 GiB disk would only slow the test; `image::verify`
/// hashes every byte either way, see supervisor/tests/image.rs).
#[test]
fn a_tampered_root_disk_is_refused_before_anything_is_built() {
    if !require_root_and_tools(&["ip", "nft"]) || !devbox_ready() {
        return;
    }
    let template = MANIFEST.replace("@CREDENTIALS@", LEASED);
    let w = SessionWorld::with_manifest(&template, "true");
    add_anthropic_secret(&w);
    let images = tempfile::tempdir().unwrap();
    let src = image::verify_named("devbox", None).unwrap();
    let copy = images.path().join("devbox");
    std::fs::create_dir(&copy).unwrap();
    for f in [image::KERNEL_FILE, image::INITRAMFS_FILE] {
        std::fs::copy(src.dir.join(f), copy.join(f)).unwrap();
    }
    let mut disk = vec![0u8; 1 << 20];
    disk[1080..1082].copy_from_slice(&[0x53, 0xef]); // ext4's magic, for looks
    std::fs::write(copy.join(image::ROOT_DISK_FILE), &disk).unwrap();
    let mut record = src.record.clone();
    let (sha256, size) = image::sha256_file(&copy.join(image::ROOT_DISK_FILE)).unwrap();
    record.root_disk = Some(image::FileDigest {
        file: image::ROOT_DISK_FILE.into(),
        sha256,
        size,
    });
    std::fs::write(
        copy.join(image::RECORD_FILE),
        serde_json::to_string(&record).unwrap(),
    )
    .unwrap();
    // The record is consistent: this copy verifies as it is.
    image::verify(&copy).unwrap();
    // One byte of the disk changes after sealing.
    disk[600_000] ^= 0x40;
    std::fs::write(copy.join(image::ROOT_DISK_FILE), &disk).unwrap();

    w.assert_image_refused_before_anything(images.path(), "root.ext4 does not match image.json");
}

/// `manifests/claude-code.yaml` and `manifests/codex.yaml` load, run on
/// devbox with room for Node, inject their key as an env var leased to
/// exactly their API domain, and pass the grant check `zerolease manifest
/// check` runs — and only against a grant that covers that domain.
#[test]
fn agent_manifests_check_against_their_grants() {
    use zerolease::clock::SystemClock;
    use zerolease::home::StateDir;
    use zerolease::manifest::{Inject, Manifest};
    use zerolease::vault::policy::LeaseAsk;
    use zerolease::vault::{LeaseRequest, Vault, VaultConfig};

    let manifests = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests");
    for (file, agent, env, domain) in [
        (
            "claude-code.yaml",
            "claude-code",
            "ANTHROPIC_API_KEY",
            ANTHROPIC,
        ),
        ("codex.yaml", "codex", "OPENAI_API_KEY", "api.openai.com"),
    ] {
        let m = Manifest::load(&manifests.join(file)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((m.name.as_str(), m.image.as_str()), (agent, "devbox"));
        assert!(m.resources.memory >= 2 << 30, "{file}: node needs 2 GiB");
        assert_eq!(m.credentials.len(), 1, "{file}");
        let c = &m.credentials[0];
        let domains: Vec<String> = c
            .domains
            .as_ref()
            .expect("the manifest names its domain")
            .iter()
            .map(|d| d.to_string())
            .collect();
        assert_eq!(domains, [domain], "{file}");
        assert_eq!(c.inject, [Inject::Env(env.into())], "{file}");
        assert!(m.allow.is_empty(), "{file}: nothing reachable but the API");

        let req = LeaseRequest {
            agent: m.name.clone(),
            session: "manifest-check".into(),
            secret: c.secret.clone(),
            ask: LeaseAsk {
                domains: c.domains.clone(),
                ttl: c.ttl,
                max_uses: c.max_uses,
            },
        };
        // A vault with the secret (ceiling: its domain and another) and a
        // grant for `granted`, if any.
        let vault_with = |granted: Option<&str>| {
            let dir = tempfile::tempdir().unwrap();
            let mut vc = VaultConfig::new(StateDir::at(dir.path().join("home")));
            vc.durable = false;
            let vault = Vault::open(vc, std::sync::Arc::new(SystemClock)).unwrap();
            vault
                .add_secret(
                    NewSecret {
                        name: c.secret.clone(),
                        kind: "api-key".into(),
                        description: String::new(),
                        domains: vec![domain.parse().unwrap(), "example.com".parse().unwrap()],
                    },
                    SecretValue::new(zeroize::Zeroizing::new(b"not-a-real-key".to_vec())),
                )
                .unwrap();
            if let Some(granted) = granted {
                vault
                    .add_grant(GrantSpec {
                        agent: AgentPattern::parse(agent).unwrap(),
                        secret: c.secret.clone(),
                        domains: vec![granted.parse().unwrap()],
                        ttl: Duration::from_secs(8 * 3600),
                        max_uses: None,
                        renewable: false,
                    })
                    .unwrap();
            }
            (dir, vault)
        };
        // No grant, or a grant for another domain: refused.
        for granted in [None, Some("example.com")] {
            let (_dir, vault) = vault_with(granted);
            assert!(vault.check_grant(&req).is_err(), "{file}: {granted:?}");
        }
        // The grant the manifest's header comment tells the user to make.
        let (_dir, vault) = vault_with(Some(domain));
        let terms = vault
            .check_grant(&req)
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(terms.ttl, Duration::from_secs(8 * 3600), "{file}");
    }
}
