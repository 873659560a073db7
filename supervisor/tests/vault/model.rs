//! The lease state machine against a simple model: random sequences of
//! grant / access / renew / revoke / expire / clock advance must give the
//! same outcomes from the vault and from a few lines of obvious code.

use std::collections::BTreeMap;

use super::*;
use proptest::prelude::*;
use zerolease::domain::HostName;
use zerolease::vault::{LeaseFilter, RevokeScope, VaultError};

const AGENTS: [&str; 3] = ["dev", "ci-1", "ci-2"];
const SESSIONS: [&str; 2] = ["s0", "s1"];
const HOSTS: [&str; 3] = ["api.x.com", "x.com", "y.com"];

#[derive(Debug, Clone)]
enum Op {
    Grant {
        agent: usize,
        session: usize,
        secret: usize,
        ttl_s: u64,
    },
    Access {
        lease: usize,
        host: usize,
    },
    Renew {
        lease: usize,
        ttl_s: u64,
    },
    Revoke {
        lease: usize,
    },
    RevokeSession {
        session: usize,
    },
    Advance {
        ms: u64,
    },
    Expire,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..3usize, 0..2usize, 0..2usize, 1..150u64).prop_map(|(agent, session, secret, ttl_s)| {
            Op::Grant {
                agent,
                session,
                secret,
                ttl_s,
            }
        }),
        (0..8usize, 0..3usize).prop_map(|(lease, host)| Op::Access { lease, host }),
        (0..8usize, 1..150u64).prop_map(|(lease, ttl_s)| Op::Renew { lease, ttl_s }),
        (0..8usize).prop_map(|lease| Op::Revoke { lease }),
        (0..2usize).prop_map(|session| Op::RevokeSession { session }),
        (0..120_000u64).prop_map(|ms| Op::Advance { ms }),
        Just(Op::Expire),
    ]
}

/// The model's lease.
#[derive(Debug, Clone)]
struct M {
    session: usize,
    secret: usize,
    issued: u64,
    expires: u64,
    uses: Option<u32>,
    revoked: bool,
}

/// Policy of the model (and of the vault under test):
/// - secret 0 ("wild"): agent `dev`, domains `*.x.com`, max 100 s, 3 uses, renewable;
/// - secret 1 ("plain"): agents `ci-*`, domain `y.com`, max 60 s, unlimited, not renewable.
fn policy(agent: usize, secret: usize) -> Option<(u64, Option<u32>, bool)> {
    match (secret, AGENTS[agent]) {
        (0, "dev") => Some((100_000, Some(3), true)),
        (1, a) if a.starts_with("ci-") => Some((60_000, None, false)),
        _ => None,
    }
}

fn covers(secret: usize, host: usize) -> bool {
    match secret {
        0 => HOSTS[host] == "api.x.com",
        _ => HOSTS[host] == "y.com",
    }
}

const VALUES: [&str; 2] = ["wild-value", "plain-value"];
const NAMES: [&str; 2] = ["wild", "plain"];

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn vault_agrees_with_model(ops in prop::collection::vec(op(), 1..40)) {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(START);
        let v = open(dir.path(), &clock);
        add_secret(&v, "wild", VALUES[0], &["*.x.com", "x.com"]);
        add_secret(&v, "plain", VALUES[1], &["y.com"]);
        add_grant(&v, "dev", "wild", &["*.x.com"], 100, Some(3), true);
        add_grant(&v, "ci-*", "plain", &["y.com"], 60, None, false);

        let mut now = 0u64; // ms since START
        let mut model: Vec<M> = Vec::new();
        let mut ids: Vec<String> = Vec::new();

        for op in ops {
            match op {
                Op::Grant { agent, session, secret, ttl_s } => {
                    let mut req = request(AGENTS[agent], SESSIONS[session], NAMES[secret]);
                    req.ask.ttl = Some(Duration::from_secs(ttl_s));
                    let got = v.grant(req);
                    match policy(agent, secret) {
                        Some((max, uses, _)) if ttl_s * 1000 <= max => {
                            let l = got.expect("model grants");
                            prop_assert_eq!(l.expires, START.saturating_add(Duration::from_millis(now + ttl_s * 1000)));
                            model.push(M { session, secret, issued: now, expires: now + ttl_s * 1000, uses, revoked: false });
                            ids.push(l.id.0);
                        }
                        Some(_) => prop_assert!(matches!(got, Err(VaultError::Denied { .. })), "too long must be denied"),
                        None => prop_assert!(matches!(got, Err(VaultError::Denied { .. })), "no grant must be denied"),
                    }
                }
                Op::Access { lease, host } => {
                    let Some(m) = model.get_mut(lease) else { continue };
                    let got = v.access(&ids[lease], &HostName::parse(HOSTS[host]).unwrap());
                    let ok = !m.revoked && now < m.expires && m.uses != Some(0) && covers(m.secret, host);
                    if ok {
                        let value = got.expect("model allows access");
                        prop_assert_eq!(value.expose(), VALUES[m.secret].as_bytes());
                        m.uses = m.uses.map(|u| u - 1);
                    } else {
                        prop_assert!(matches!(got, Err(VaultError::LeaseRefused { .. })), "access must be refused");
                    }
                }
                Op::Renew { lease, ttl_s } => {
                    let Some(m) = model.get_mut(lease) else { continue };
                    let got = v.renew(&ids[lease], Some(Duration::from_secs(ttl_s)));
                    let (max, _, renewable) = policy(if m.secret == 0 { 0 } else { 1 }, m.secret).unwrap();
                    let cap = m.issued + max;
                    let ok = !m.revoked && now < m.expires && m.uses != Some(0) && renewable && m.expires < cap;
                    if ok {
                        let want = (now + ttl_s * 1000).min(cap).max(m.expires);
                        let l = got.expect("model renews");
                        prop_assert_eq!(l.expires, START.saturating_add(Duration::from_millis(want)));
                        m.expires = want;
                    } else {
                        prop_assert!(matches!(got, Err(VaultError::LeaseRefused { .. })), "renew must be refused");
                    }
                }
                Op::Revoke { lease } => {
                    let Some(m) = model.get_mut(lease) else { continue };
                    let got = v.revoke(RevokeScope::Lease(ids[lease].clone())).unwrap();
                    prop_assert_eq!(got.len(), usize::from(!m.revoked));
                    m.revoked = true;
                }
                Op::RevokeSession { session } => {
                    let got = v.revoke(RevokeScope::Session(SESSIONS[session].into())).unwrap();
                    let want = model.iter().filter(|m| m.session == session && !m.revoked).count();
                    prop_assert_eq!(got.len(), want);
                    model.iter_mut().filter(|m| m.session == session).for_each(|m| m.revoked = true);
                }
                Op::Advance { ms } => {
                    now += ms;
                    clock.advance(Duration::from_millis(ms));
                }
                Op::Expire => {
                    v.expire_due().unwrap();
                }
            }
            // Active leases agree after every step.
            let active: BTreeMap<String, ()> = v
                .list_leases(LeaseFilter::default())
                .unwrap()
                .into_iter()
                .map(|l| (l.id.0, ()))
                .collect();
            let want: BTreeMap<String, ()> = model
                .iter()
                .zip(&ids)
                .filter(|(m, _)| !m.revoked && now < m.expires && m.uses != Some(0))
                .map(|(_, id)| (id.clone(), ()))
                .collect();
            prop_assert_eq!(active, want);
        }
        prop_assert!(v.audit_verify().unwrap().is_intact());
    }
}
