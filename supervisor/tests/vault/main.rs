//! Vault tests through its public API and through the `zerolease` binary.
//! One test binary, modules by concern, a shared harness here.

mod canary;
mod concurrency;
mod fail_closed;
mod keys;
mod model;
mod tamper;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use zeroize::Zeroizing;
use zerolease::clock::{ManualClock, Timestamp};
use zerolease::home::StateDir;
use zerolease::vault::{
    AgentPattern, GrantSpec, LeaseAsk, LeaseRequest, NewSecret, SecretValue, Vault, VaultConfig,
};

pub const START: Timestamp = Timestamp(1_800_000_000_000);

pub fn config(dir: &Path) -> VaultConfig {
    let mut c = VaultConfig::new(StateDir::at(dir));
    c.durable = false;
    c
}

pub fn open(dir: &Path, clock: &ManualClock) -> Vault {
    Vault::open(config(dir), Arc::new(clock.clone())).expect("vault opens")
}

pub fn value(s: &str) -> SecretValue {
    SecretValue::new(Zeroizing::new(s.as_bytes().to_vec()))
}

pub fn add_secret(v: &Vault, name: &str, val: &str, domains: &[&str]) {
    v.add_secret(
        NewSecret {
            name: name.into(),
            kind: "token".into(),
            description: String::new(),
            domains: domains.iter().map(|d| d.parse().unwrap()).collect(),
        },
        value(val),
    )
    .expect("secret stored");
}

pub fn add_grant(
    v: &Vault,
    agent: &str,
    secret: &str,
    domains: &[&str],
    ttl_s: u64,
    uses: Option<u32>,
    renewable: bool,
) {
    v.add_grant(GrantSpec {
        agent: AgentPattern::parse(agent).unwrap(),
        secret: secret.into(),
        domains: domains.iter().map(|d| d.parse().unwrap()).collect(),
        ttl: Duration::from_secs(ttl_s),
        max_uses: uses,
        renewable,
    })
    .expect("grant stored");
}

pub fn request(agent: &str, session: &str, secret: &str) -> LeaseRequest {
    LeaseRequest {
        agent: agent.into(),
        session: session.into(),
        secret: secret.into(),
        ask: LeaseAsk::default(),
    }
}

/// Opens the database file directly, as an attacker or a broken disk would.
pub fn raw_db(dir: &Path) -> rusqlite::Connection {
    let c = rusqlite::Connection::open(dir.join("vault.db")).unwrap();
    c.busy_timeout(Duration::from_secs(10)).unwrap();
    c
}
