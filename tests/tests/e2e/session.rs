//! `zerolease run` for real: a VM booted (TCG) from the `minimal` image in
//! the "host" namespace, behind its jail and proxy, reaching an HTTPS API in
//! the "upstream" namespace with a token it holds only as a lease.
//!
//! One session checks several promises at once, since a boot costs ~10 s:
//! the leased call works with the env-injected token; an unleased name, a
//! direct IP, and UDP from inside the VM all fail; the agent's exit code
//! comes out; nothing is left behind; every lease is revoked; and the
//! canary secret is nowhere outside the vault's ciphertext.

use std::sync::Arc;
use std::time::{Duration, Instant};

use zerolease::clock::SystemClock;
use zerolease::home::StateDir;
use zerolease::manifest::Manifest;
use zerolease::session::{self, RunConfig};
use zerolease::vault::{
    AgentPattern, AuditFilter, GrantSpec, NewSecret, SecretValue, Vault, VaultConfig,
};
use zerolease_tests::upstream::{HttpsServer, TestCa};
use zerolease_tests::{Netns, require_root_and_tools};

use crate::world::{UPSTREAM, sa};

const CANARY: &str = "zl-canary-token-5d41402abc4b2a76b9719d911017c592";
const API: &str = "api.session.test";

/// The agent's script: the leased call, then three things that must fail,
/// each printing its outcome, then an exit code of its own.
const SCRIPT: &str = r#"
curl -sS -H "Authorization: Bearer $API_TOKEN" https://api.session.test/auth
echo "unleased=$(curl -s -o /dev/null -w '%{http_connect}' --max-time 5 https://other.session.test/hello; echo rc$?)"
echo "direct=$(curl -s -o /dev/null --noproxy '*' --max-time 5 -k https://198.18.0.2/hello; echo rc$?)"
echo "udp=$(echo x | nc -u -w 2 198.18.0.2 53 >/dev/null 2>&1; nslookup -timeout=2 example.com 198.18.0.2 >/dev/null 2>&1; echo rc$?)"
env | grep -c API_TOKEN
exit 7
"#;

fn image_ready() -> bool {
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

#[test]
fn a_session_runs_the_agent_with_its_lease_and_leaves_nothing() {
    if !require_root_and_tools(&["ip", "nft", "qemu-system-x86_64"]) || !image_ready() {
        return;
    }
    let host = Netns::new("sh");
    let upstream = Netns::new("su");
    host.veth_to("up0", &upstream, "eth0");
    host.ip(["addr", "add", "198.18.0.1/24", "dev", "up0"]);
    host.ip(["link", "set", "up0", "up"]);
    upstream.ip(["addr", "add", "198.18.0.2/24", "dev", "eth0"]);
    upstream.ip(["link", "set", "eth0", "up"]);

    let ca = TestCa::new(&[API, "other.session.test"]);
    let server = HttpsServer::start(&upstream, sa(UPSTREAM, 443), &ca, Some(CANARY));
    let dir = tempfile::tempdir().unwrap();
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
    std::fs::write(
        &manifest_path,
        format!(
            "name: e2e\nimage: minimal\naccel: tcg\ntimeout: 3m\nresources: {{ memory: 384MiB }}\n\
             command: {script:?}\n\
             credentials:\n  - secret: api\n    inject: [env: API_TOKEN]\n\
             ca_certs: [{ca}]\n\
             network:\n  overrides: {{ {API}: [198.18.0.2], other.session.test: [198.18.0.2] }}\n  allow_cidrs: [198.18.0.0/24]\n",
            script = SCRIPT,
            ca = ca_path.display(),
        ),
    )
    .unwrap();
    let manifest = Manifest::load(&manifest_path).unwrap_or_else(|e| panic!("{e}"));
    let config = RunConfig {
        home: StateDir::at(dir.path().join("home")),
        images: None,
        agent: None,
        command: None,
        hello_bound: Duration::from_secs(120),
    };

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

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
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
