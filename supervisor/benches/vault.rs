//! `scripts/bench vault`: durable lease throughput against raw sqlite.
//!
//! Baseline: single-row inserts into a plain sqlite table, one durable
//! transaction each (WAL, `synchronous = FULL`), measured in this process on
//! the same disk right before the vault runs. Then the vault's full path —
//! policy check, lease insert, audit append, then an access (use counted,
//! secret decrypted, audit append) — serially and with concurrent callers
//! whose writes share commits. Prints a table, or JSON lines with `--json`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use zeroize::Zeroizing;
use zerolease::clock::SystemClock;
use zerolease::domain::HostName;
use zerolease::home::StateDir;
use zerolease::vault::{
    AgentPattern, GrantSpec, LeaseAsk, LeaseRequest, NewSecret, SecretValue, Vault, VaultConfig,
};

const RUN_FOR: Duration = Duration::from_secs(3);
const CONCURRENCY: usize = 32;

struct Metric {
    name: &'static str,
    value: f64,
    unit: &'static str,
    baseline_name: &'static str,
    baseline: f64,
}

fn raw_inserts(dir: &std::path::Path) -> f64 {
    let conn = rusqlite::Connection::open(dir.join("raw.db")).unwrap();
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;
         CREATE TABLE t (id INTEGER PRIMARY KEY, a TEXT, b BLOB);",
    )
    .unwrap();
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < RUN_FOR {
        conn.execute(
            "INSERT INTO t (a, b) VALUES (?1, ?2)",
            rusqlite::params!["agent-session-secret", vec![7u8; 64]],
        )
        .unwrap();
        n += 1;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn vault(dir: &std::path::Path) -> Arc<Vault> {
    let mut c = VaultConfig::new(StateDir::at(dir.join("vault")));
    c.durable = true;
    let v = Vault::open(c, Arc::new(SystemClock)).unwrap();
    v.add_secret(
        NewSecret {
            name: "bench".into(),
            kind: "token".into(),
            description: String::new(),
            domains: vec!["api.example.com".parse().unwrap()],
        },
        SecretValue::new(Zeroizing::new(b"bench-secret-value-0123456789".to_vec())),
    )
    .unwrap();
    v.add_grant(GrantSpec {
        agent: AgentPattern::parse("*").unwrap(),
        secret: "bench".into(),
        domains: vec!["api.example.com".parse().unwrap()],
        ttl: Duration::from_secs(600),
        max_uses: None,
        renewable: false,
    })
    .unwrap();
    Arc::new(v)
}

/// Lease grant + access pairs per second with `threads` callers.
fn grant_access(v: &Arc<Vault>, threads: usize) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let host = HostName::parse("api.example.com").unwrap();
    let start = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let (v, done, stop, host) = (v.clone(), done.clone(), stop.clone(), host.clone());
            std::thread::spawn(move || {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let l = v
                        .grant(LeaseRequest {
                            agent: format!("agent-{t}"),
                            session: format!("s-{t}-{i}"),
                            secret: "bench".into(),
                            ask: LeaseAsk::default(),
                        })
                        .unwrap();
                    let value = v.access(&l.id.0, &host).unwrap();
                    assert!(!value.is_empty());
                    done.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                }
            })
        })
        .collect();
    std::thread::sleep(RUN_FOR);
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let as_json = std::env::args().any(|a| a == "--json");
    // Keep the files on the same disk as the project, not in a tmpfs.
    let root = std::env::var_os("CARGO_TARGET_TMPDIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::env::current_dir().unwrap().join("target"));
    std::fs::create_dir_all(&root).unwrap();
    let dir = tempfile::tempdir_in(&root).unwrap();

    let raw = raw_inserts(dir.path());
    let v = vault(dir.path());
    let serial = grant_access(&v, 1);
    let concurrent = grant_access(&v, CONCURRENCY);
    assert!(v.audit_verify().unwrap().is_intact());

    let metrics = [
        Metric {
            name: "vault_grant_access_serial",
            value: serial,
            unit: "ops/s",
            baseline_name: "raw_sqlite_insert",
            baseline: raw,
        },
        Metric {
            name: "vault_grant_access_concurrent32",
            value: concurrent,
            unit: "ops/s",
            baseline_name: "raw_sqlite_insert",
            baseline: raw,
        },
    ];
    if as_json {
        for m in &metrics {
            println!(
                "{}",
                serde_json::json!({
                    "metric": m.name,
                    "value": (m.value * 10.0).round() / 10.0,
                    "unit": m.unit,
                    "baseline": (m.baseline * 10.0).round() / 10.0,
                    "baseline_metric": m.baseline_name,
                    "ratio": (m.value / m.baseline * 1000.0).round() / 1000.0,
                })
            );
        }
    } else {
        println!(
            "vault: one op = lease grant (policy + insert + audit) and one access (use + decrypt + audit), durable (WAL, synchronous=FULL)"
        );
        println!(
            "{:<34} {:>12} {:>8} {:>22} {:>12} {:>8}",
            "metric", "value", "unit", "baseline", "value", "ratio"
        );
        for m in &metrics {
            println!(
                "{:<34} {:>12.1} {:>8} {:>22} {:>12.1} {:>8.3}",
                m.name,
                m.value,
                m.unit,
                m.baseline_name,
                m.baseline,
                m.value / m.baseline
            );
        }
    }
}
