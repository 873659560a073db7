use std::path::Path;

use zeroize::Zeroizing;

use super::*;
use crate::clock::ManualClock;
use crate::home::StateDir;
use crate::proxy::registry::Entry;
use crate::vault::{
    AgentPattern, GrantSpec, LeaseAsk, LeaseId, LeaseRequest, NewSecret, SecretValue, VaultConfig,
};

const START: Timestamp = Timestamp(1_800_000_000_000);

fn s(n: u64) -> Duration {
    Duration::from_secs(n)
}

#[test]
fn request_lines_parse_or_are_refused() {
    let renew = |credential: Option<&str>, ttl: Option<u64>| {
        Some(Ok(Request::Renew(RenewRequest {
            credential: credential.map(str::to_owned),
            ttl_secs: ttl,
        })))
    };
    let malformed =
        |line: &str| matches!(Request::parse(line), Some(Err(RequestError::Malformed(_))));
    // Not a lease request: left to the other commands.
    for line in [
        "revoke\n", "destroy", "stats\n", "", "\n", "  ok {", "renew",
    ] {
        assert_eq!(Request::parse(line), None, "{line:?}");
    }
    // Good ones.
    assert_eq!(Request::parse("{\"renew\":{}}\n"), renew(None, None));
    assert_eq!(
        Request::parse(" {\"renew\":{\"credential\":\"api\",\"ttl_secs\":60}}\r\n"),
        renew(Some("api"), Some(60))
    );
    assert_eq!(
        Request::parse("{\"renew\":{\"credential\":null}}"),
        renew(None, None)
    );
    assert_eq!(
        Request::parse("{\"rotated\":{\"secret\":\"gh.token-1\"}}\n"),
        Some(Ok(Request::Rotated(RotatedRequest {
            secret: "gh.token-1".into()
        })))
    );
    // Adversarial: unknown commands, fields, types, extra keys, trailing
    // junk, deep nesting.
    for line in [
        "{}",
        "{\"grant\":{}}",
        "{\"renew\":{\"credential\":\"api\",\"x\":1}}",
        "{\"renew\":{},\"rotated\":{\"secret\":\"a\"}}",
        "{\"renew\":{}} trailing",
        "{\"renew\":{\"ttl_secs\":-1}}",
        "{\"renew\":{\"ttl_secs\":1e3}}",
        "{\"renew\":{\"ttl_secs\":99999999999999999999999}}",
        "{\"renew\":{\"credential\":7}}",
        "{\"renew\":[]}",
        "{\"rotated\":{}}",
        "{\"rotated\":\"api\"}",
        "{\"renew\":{",
        "{\"rotated\":{\"secret\":\"a\",\"value\":\"s3cret\"}}",
    ] {
        assert!(malformed(line), "{line:?} -> {:?}", Request::parse(line));
    }
    let deep = format!("{}{}", "{\"renew\":".repeat(100), "}".repeat(100));
    assert!(deep.len() < MAX_REQUEST_LEN);
    assert!(malformed(&deep));
    let deep_array = format!(
        "{{\"renew\":{{\"credential\":{}{}}}}}",
        "[".repeat(480),
        "]".repeat(480)
    );
    assert!(deep_array.len() < MAX_REQUEST_LEN);
    assert!(malformed(&deep_array));
    // Names and TTLs are checked after parsing.
    for (line, want) in [
        (
            "{\"rotated\":{\"secret\":\"\"}}",
            RequestError::BadName(String::new()),
        ),
        (
            "{\"rotated\":{\"secret\":\"../x\"}}",
            RequestError::BadName("../x".into()),
        ),
        (
            "{\"renew\":{\"credential\":\"a b\"}}",
            RequestError::BadName("a b".into()),
        ),
        (
            "{\"renew\":{\"credential\":\"a\\nb\"}}",
            RequestError::BadName("a b".into()),
        ),
        (
            "{\"renew\":{\"credential\":\"é\"}}",
            RequestError::BadName("é".into()),
        ),
        ("{\"renew\":{\"ttl_secs\":0}}", RequestError::BadTtl),
        ("{\"renew\":{\"ttl_secs\":31622401}}", RequestError::BadTtl),
    ] {
        assert_eq!(Request::parse(line), Some(Err(want)), "{line:?}");
    }
    let long_name = format!("{{\"rotated\":{{\"secret\":\"{}\"}}}}", "a".repeat(129));
    assert!(matches!(
        Request::parse(&long_name),
        Some(Err(RequestError::BadName(n))) if n.len() == 129
    ));
    // Too long: a line cut at the reader's bound, or longer.
    let cut = format!(
        "{{\"renew\":{{\"credential\":\"{}",
        "a".repeat(MAX_REQUEST_LEN)
    );
    assert_eq!(
        Request::parse(&cut[..MAX_REQUEST_LEN]),
        Some(Err(RequestError::TooLong))
    );
    assert_eq!(Request::parse(&cut), Some(Err(RequestError::TooLong)));
    // A request renders to a line that parses back to itself.
    for r in [
        Request::Renew(RenewRequest::default()),
        Request::Renew(RenewRequest {
            credential: Some("api".into()),
            ttl_secs: Some(90),
        }),
        Request::Rotated(RotatedRequest {
            secret: "api".into(),
        }),
    ] {
        let line = r.to_line();
        assert!(line.ends_with('\n') && line.len() < MAX_REQUEST_LEN);
        assert_eq!(Request::parse(&line), Some(Ok(r)));
    }
}

#[test]
fn error_text_sent_back_is_short_and_plain() {
    let long = format!("{}\u{1b}[31m", "x".repeat(500));
    let out = short(&long);
    assert_eq!(out.chars().count(), 200);
    assert!(!out.contains('\u{1b}'));
}

fn lease(expires: u64, max: u64) -> Lease {
    Lease {
        id: LeaseId("00".repeat(16)),
        agent: "a".into(),
        session: "s".into(),
        secret: "api".into(),
        grant_id: 1,
        domains: vec!["api.example.com".parse().unwrap()],
        issued: START,
        expires: START.saturating_add(s(expires)),
        max_expires: START.saturating_add(s(max)),
        uses_left: None,
        renewals: 0,
        renewable: true,
        revoked: None,
    }
}

#[test]
fn auto_renewal_is_due_when_a_third_is_left_until_the_maximum() {
    let at = |secs: u64| START.saturating_add(s(secs));
    let l = lease(30, 100);
    let table: Vec<(Lease, Duration, Timestamp, AutoStep)> = vec![
        // Issued now for 30 s: due at 20 s.
        (l.clone(), s(30), at(0), AutoStep::Wait(s(20))),
        (l.clone(), s(30), at(19), AutoStep::Wait(s(1))),
        (l.clone(), s(30), at(20), AutoStep::RenewNow),
        (l.clone(), s(30), at(29), AutoStep::RenewNow),
        // After a renewal at 20 s to 50 s: next due at 40 s.
        (lease(50, 100), s(30), at(20), AutoStep::Wait(s(20))),
        // Capped at the maximum: nothing more to do.
        (
            lease(100, 100),
            s(30),
            at(80),
            AutoStep::Stop("the lease is at its grant's maximum lifetime"),
        ),
        // A period longer than the lease: due at once, not an underflow.
        (lease(10, 100), s(3600), at(0), AutoStep::RenewNow),
        // Ended leases stop.
        (
            l.clone(),
            s(30),
            at(30),
            AutoStep::Stop("the lease has expired"),
        ),
        (
            l.clone(),
            s(30),
            at(u64::MAX / 2000),
            AutoStep::Stop("the lease has expired"),
        ),
        (
            Lease {
                revoked: Some(at(1)),
                ..l.clone()
            },
            s(30),
            at(25),
            AutoStep::Stop("the lease was revoked"),
        ),
        (
            Lease {
                uses_left: Some(0),
                ..l.clone()
            },
            s(30),
            at(25),
            AutoStep::Stop("the lease has no uses left"),
        ),
        (
            Lease {
                renewable: false,
                ..l.clone()
            },
            s(30),
            at(25),
            AutoStep::Stop("its grant does not allow renewal"),
        ),
        // A zero period still renews a second before the end.
        (l.clone(), Duration::ZERO, at(28), AutoStep::Wait(s(1))),
        (l.clone(), Duration::ZERO, at(29), AutoStep::RenewNow),
    ];
    for (i, (lease, period, now, want)) in table.into_iter().enumerate() {
        assert_eq!(auto_step(&lease, period, now), want, "row {i}");
    }
}

#[test]
fn auto_renewal_walks_to_the_maximum_without_a_hot_loop() {
    // Simulates the renewer against the lease arithmetic: every renewal
    // moves the expiry forward, and it stops at the maximum.
    let mut l = lease(30, 100);
    let mut now = START;
    let mut renewals = 0;
    for _ in 0..100 {
        match auto_step(&l, s(30), now) {
            AutoStep::Wait(d) => {
                assert!(d > Duration::ZERO);
                now = now.saturating_add(d);
            }
            AutoStep::RenewNow => {
                let next = l.renewed_expiry(s(30), now).unwrap();
                assert!(next > l.expires);
                l.expires = next;
                renewals += 1;
            }
            AutoStep::Stop(_) => break,
        }
    }
    assert_eq!(l.expires, l.max_expires);
    assert_eq!(renewals, 4, "20→50, 40→70, 60→90, 80→100");
}

struct World {
    _dir: tempfile::TempDir,
    clock: ManualClock,
    vault: Arc<Vault>,
}

fn world(renewable: bool) -> World {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START);
    let mut config = VaultConfig::new(StateDir::at(dir.path()));
    config.durable = false;
    let vault = Arc::new(Vault::open(config, Arc::new(clock.clone())).unwrap());
    vault
        .add_secret(
            NewSecret {
                name: "api".into(),
                kind: "token".into(),
                description: String::new(),
                domains: vec!["api.example.com".parse().unwrap()],
            },
            SecretValue::new(Zeroizing::new(b"zl-canary-leases".to_vec())),
        )
        .unwrap();
    vault
        .add_grant(GrantSpec {
            agent: AgentPattern::parse("agent").unwrap(),
            secret: "api".into(),
            domains: vec!["api.example.com".parse().unwrap()],
            ttl: s(100),
            max_uses: None,
            renewable,
        })
        .unwrap();
    World {
        _dir: dir,
        clock,
        vault,
    }
}

fn grant(w: &World, ttl: u64) -> Lease {
    w.vault
        .grant(LeaseRequest {
            agent: "agent".into(),
            session: "sess".into(),
            secret: "api".into(),
            ask: LeaseAsk {
                ttl: Some(s(ttl)),
                ..LeaseAsk::default()
            },
        })
        .unwrap()
}

fn registry_with(lease: &Lease) -> ProxyRegistry {
    let r = ProxyRegistry::new();
    r.add_session(SessionId::new("sess"));
    r.grant(
        &SessionId::new("sess"),
        Entry::lease(
            lease.id.0.clone(),
            "api",
            lease.domains.clone(),
            Some(tokio::time::Instant::now() + s(30)),
        ),
    )
    .unwrap();
    r
}

fn admitted(r: &ProxyRegistry) -> bool {
    let host = crate::domain::HostName::parse("api.example.com").unwrap();
    r.admit(&SessionId::new("sess"), &host, 443).is_ok()
}

#[tokio::test(start_paused = true)]
async fn renewing_moves_the_vault_lease_and_the_proxy_deadline() {
    let w = world(true);
    let l = grant(&w, 30);
    let r = registry_with(&l);
    w.clock.advance(s(20));
    tokio::time::advance(s(20)).await;
    let renewed = renew_one(&w.vault, Some(&r), "sess", &l.id.0, Some(s(30))).unwrap();
    assert_eq!(renewed.expires, START.saturating_add(s(50)));
    // Past the old deadline the proxy still admits; at the new one it cuts.
    tokio::time::advance(s(25)).await;
    tokio::task::yield_now().await;
    assert!(admitted(&r));
    tokio::time::advance(s(5)).await;
    tokio::task::yield_now().await;
    assert!(!admitted(&r));
    // The renewal is in the audit log, without the value.
    let audit = w.vault.audit_list(Default::default()).unwrap();
    assert!(audit.iter().any(|a| a.record.event == "lease_renewed"));
    assert!(
        !serde_json::to_string(&audit)
            .unwrap()
            .contains("zl-canary-leases")
    );
}

#[tokio::test(start_paused = true)]
async fn refusals_say_what_to_do() {
    // Not renewable.
    let w = world(false);
    let l = grant(&w, 30);
    let r = registry_with(&l);
    let e = renew_one(&w.vault, Some(&r), "sess", &l.id.0, None).unwrap_err();
    assert!(matches!(e, RenewError::NotRenewable { .. }), "{e:?}");
    assert!(e.is_final());
    let text = e.chain();
    assert!(
        text.contains("secret `api`") && text.contains("--renewable"),
        "{text}"
    );
    assert!(text.contains("--agent agent"), "{text}");

    // At the maximum: the first renewal reaches it, the second is refused
    // with the time.
    let w = world(true);
    let l = grant(&w, 30);
    let r = registry_with(&l);
    let at_max = renew_one(&w.vault, Some(&r), "sess", &l.id.0, None).unwrap();
    assert_eq!(at_max.expires, at_max.max_expires);
    let e = renew_one(&w.vault, Some(&r), "sess", &l.id.0, None).unwrap_err();
    assert!(matches!(e, RenewError::AtMaximum { .. }), "{e:?}");
    assert!(
        e.chain().contains(&at_max.max_expires.rfc3339()),
        "{}",
        e.chain()
    );

    // Revoked: refused, and the proxy entry stays gone.
    let l2 = grant(&w, 30);
    let r2 = registry_with(&l2);
    w.vault
        .revoke(crate::vault::RevokeScope::Lease(l2.id.0.clone()))
        .unwrap();
    r2.revoke_lease(&EntryId::new(l2.id.0.clone()));
    let e = renew_one(&w.vault, Some(&r2), "sess", &l2.id.0, None).unwrap_err();
    assert!(
        matches!(
            e,
            RenewError::Ended {
                reason: LeaseRefusal::Revoked,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(!admitted(&r2));

    // Unknown lease: a vault error.
    let e = renew_one(&w.vault, Some(&r2), "sess", "ff", None).unwrap_err();
    assert!(matches!(e, RenewError::Vault { .. }), "{e:?}");
}

#[tokio::test(start_paused = true)]
async fn the_automatic_renewer_keeps_a_lease_alive_until_the_maximum() {
    let w = world(true);
    let l = grant(&w, 30);
    let r = registry_with(&l);
    let renewer = AutoRenewer::spawn(
        w.vault.clone(),
        r.clone(),
        "sess".into(),
        vec![AutoJob {
            lease: l.id.0.clone(),
            secret: "api".into(),
            period: s(30),
        }],
    );
    // Both clocks move together, one second at a time.
    let mut expiries = Vec::new();
    for _ in 0..120 {
        w.clock.advance(s(1));
        tokio::time::advance(s(1)).await;
        for _ in 0..5 {
            tokio::task::yield_now().await;
        }
        let now = w.vault.get_lease(&l.id.0).unwrap().expires;
        if expiries.last() != Some(&now) {
            expiries.push(now);
        }
        if w.vault.now() < START.saturating_add(s(100)) {
            assert!(admitted(&r), "cut while renewed, at {:?}", w.vault.now());
        }
    }
    let at = |n: u64| START.saturating_add(s(n));
    assert_eq!(expiries, vec![at(30), at(50), at(70), at(90), at(100)]);
    // The maximum is final: cut at it.
    assert!(!admitted(&r));
    drop(renewer);
}

#[tokio::test(start_paused = true)]
async fn dropping_the_renewer_stops_it() {
    let w = world(true);
    let l = grant(&w, 30);
    let r = registry_with(&l);
    let renewer = AutoRenewer::spawn(
        w.vault.clone(),
        r.clone(),
        "sess".into(),
        vec![AutoJob {
            lease: l.id.0.clone(),
            secret: "api".into(),
            period: s(30),
        }],
    );
    drop(renewer);
    for _ in 0..40 {
        w.clock.advance(s(1));
        tokio::time::advance(s(1)).await;
        tokio::task::yield_now().await;
    }
    assert_eq!(
        w.vault.get_lease(&l.id.0).unwrap().expires,
        START.saturating_add(s(30))
    );
    assert!(!admitted(&r));
}

#[test]
fn asking_a_missing_socket_is_a_clear_error() {
    let e = ask(
        Path::new("/nonexistent/zerolease/supervisor.sock"),
        &Request::Renew(RenewRequest::default()),
        s(1),
    )
    .unwrap_err();
    assert!(matches!(e, ControlError::Connect { .. }), "{e:?}");
    // A request the session would refuse is not sent at all.
    let e = ask(
        Path::new("/nonexistent"),
        &Request::Rotated(RotatedRequest {
            secret: "no such".into(),
        }),
        s(1),
    )
    .unwrap_err();
    assert!(matches!(e, ControlError::Request(_)), "{e:?}");
}

proptest::proptest! {
    /// Any line either is not a lease request, is refused, or is a valid
    /// request that renders back to a line parsing to itself.
    #[test]
    fn any_line_parses_to_a_valid_request_or_is_refused(
        line in proptest::string::string_regex("\\{?[a-z\":{}, 0-9_.\\-\\[\\]]{0,80}\\}?\n?").unwrap()
    ) {
        match Request::parse(&line) {
            None => proptest::prop_assert!(!line.trim_start().starts_with('{'), "{:?}", line),
            Some(Err(_)) => {}
            Some(Ok(r)) => {
                proptest::prop_assert!(r.validate().is_ok());
                proptest::prop_assert_eq!(Request::parse(&r.to_line()), Some(Ok(r)));
            }
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..2048)) {
        let line = String::from_utf8_lossy(&bytes);
        let _ = Request::parse(&line);
        let prefixed = format!("{{{line}");
        proptest::prop_assert!(Request::parse(&prefixed).is_some());
    }
}

fn manifest(credentials: &str) -> Manifest {
    let text =
        format!("name: agent\nimage: minimal\ncommand: [\"true\"]\ncredentials:\n{credentials}");
    Manifest::parse(&text, Path::new("/work/m.yaml")).unwrap_or_else(|e| panic!("{e}"))
}

#[tokio::test(start_paused = true)]
async fn a_session_renews_its_own_leases_with_the_manifest_ttl_by_default() {
    let w = world(true);
    let m = manifest(
        "  - secret: api\n    ttl: 30s\n    renew: auto\n    inject: [{ env: API_TOKEN }]\n",
    );
    let l = grant(&w, 30);
    let r = registry_with(&l);
    let leases = vec![(0, l.clone())];
    let ctx = Ctx {
        vault: &w.vault,
        manifest: &m,
        leases: &leases,
        registry: Some(&r),
        session: "sess",
    };
    w.clock.advance(s(20));
    tokio::time::advance(s(20)).await;
    // No ttl asked: the manifest's 30 s from now, not the grant's 100 s.
    let Reply::Renewed { leases: out } = renew(&ctx, &RenewRequest::default()) else {
        panic!("not renewed");
    };
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].refused, None);
    assert_eq!(out[0].expires, START.saturating_add(s(50)));
    assert_eq!(out[0].max_expires, START.saturating_add(s(100)));
    // An explicit ttl, capped at the grant's maximum.
    let asked = RenewRequest {
        credential: Some("api".into()),
        ttl_secs: Some(3600),
    };
    let Reply::Renewed { leases: out } = renew(&ctx, &asked) else {
        panic!("not renewed");
    };
    assert_eq!(out[0].expires, START.saturating_add(s(100)));
    // At the maximum now: refused, with the lease's expiry unchanged.
    let Reply::Renewed { leases: out } = renew(&ctx, &asked) else {
        panic!("not renewed");
    };
    assert!(
        out[0]
            .refused
            .as_deref()
            .is_some_and(|r| r.contains("maximum")),
        "{out:?}"
    );
    assert_eq!(out[0].expires, START.saturating_add(s(100)));
    // A secret the session does not hold.
    let other = RenewRequest {
        credential: Some("nope".into()),
        ttl_secs: None,
    };
    match renew(&ctx, &other) {
        Reply::Error { kind, message } => {
            assert_eq!(kind, ErrorKind::NotFound);
            assert!(
                message.contains("`nope`") && message.contains("api"),
                "{message}"
            );
        }
        r => panic!("{r:?}"),
    }
    // The auto jobs of this manifest: one, with the manifest's period.
    assert_eq!(
        auto_jobs(&m, &leases),
        vec![AutoJob {
            lease: l.id.0.clone(),
            secret: "api".into(),
            period: s(30),
        }]
    );
    let manual = manifest("  - secret: api\n    inject: [{ env: API_TOKEN }]\n");
    assert!(auto_jobs(&manual, &leases).is_empty());
}
