//! The per-session nftables table, rendered from plain data.
//!
//! **Architecture Invariant:** this file decides what a guest can reach and
//! does no I/O. Everything it matches is keyed on `iifname`/`oifname` (names,
//! not indexes), so the table can be loaded before the interface exists or is
//! up — which is what lets `Jail::create` put the rules in place first.
//!
//! What the table enforces, for packets arriving on the session interface:
//!
//! | chain (hook, priority)        | rule                                                   | counter        |
//! |-------------------------------|--------------------------------------------------------|----------------|
//! | `guard` (prerouting, -150)    | any IPv6                                → drop         | `ipv6`         |
//! |                               | IPv4 source ≠ guest address             → drop         | `spoofed`      |
//! | `divert` (prerouting, dstnat) | TCP 443 to any address → host:transparent port         | `redirected`   |
//! |                               | TCP/UDP 53 to the host → host:DNS stub port (optional) | —              |
//! | `input` (input, filter)       | established/related                     → accept       | —              |
//! |                               | TCP to host on the proxy ports          → accept       | —              |
//! |                               | TCP/UDP to host on the DNS stub port    → accept       | —              |
//! |                               | anything else (ports, UDP, ICMP, …)     → drop         | `input_other`  |
//! | `forward` (forward, filter)   | anything from or to the interface       → drop         | `forward`      |
//! | `output` (output, filter)     | to the interface: established/related   → accept       | —              |
//! |                               | to the interface: anything else         → drop         | `output_other` |
//!
//! The guard runs before NAT (priority -150 < -100), so a spoofed or IPv6
//! packet never reaches the redirect. Replies to the guest's accepted
//! connections leave through `output` as conntrack `established`; the host
//! itself does not open connections into the guest. Chains hook with policy
//! `accept` and only ever match the session's own interface: one session's
//! table never decides about another interface's traffic.

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use nftables::batch::Batch;
use nftables::expr::{
    CT, Expression, Meta, MetaKey, NamedExpression, Payload, PayloadField, SetItem,
};
use nftables::schema::{Chain, Counter, NfListObject, Nftables, Rule, Table};
use nftables::stmt::{Match, NAT, NATFamily, Operator, Statement};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};
use serde::Serialize;
use thiserror::Error;

/// The ports of the session's proxy on the host side of the link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProxyPorts {
    /// The explicit HTTP CONNECT proxy (`HTTPS_PROXY` in the guest).
    pub connect: u16,
    /// The transparent TLS-SNI listener that diverted port-443 traffic lands on.
    pub transparent: u16,
}

/// Everything the ruleset depends on. Plain data, so the rendering is pure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JailSpec {
    /// The nftables table, `zl_<id>`.
    pub table: String,
    /// The session interface, `zl-<id>`.
    pub interface: String,
    pub host: Ipv4Addr,
    pub guest: Ipv4Addr,
    pub ports: ProxyPorts,
    /// The supervisor's DNS stub on the host address, if the session uses one.
    /// The guest asks `host:53`; the table diverts that to this port.
    pub dns_port: Option<u16>,
}

/// The named counters of a jail table, one per kind of traffic it stops (and
/// one for the diverted port-443 connections).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CounterName {
    Ipv6,
    Spoofed,
    Redirected,
    InputOther,
    Forward,
    OutputOther,
}

impl CounterName {
    pub const ALL: [CounterName; 6] = [
        CounterName::Ipv6,
        CounterName::Spoofed,
        CounterName::Redirected,
        CounterName::InputOther,
        CounterName::Forward,
        CounterName::OutputOther,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CounterName::Ipv6 => "ipv6",
            CounterName::Spoofed => "spoofed",
            CounterName::Redirected => "redirected",
            CounterName::InputOther => "input_other",
            CounterName::Forward => "forward",
            CounterName::OutputOther => "output_other",
        }
    }
}

/// Packets and bytes seen by one counter.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Count {
    pub packets: u64,
    pub bytes: u64,
}

/// What a session's jail has counted, as read back from the kernel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct JailCounters {
    /// IPv4 packets whose source was not the guest's address.
    pub spoofed: Count,
    /// Any IPv6 packet from the guest (including neighbour discovery).
    pub ipv6: Count,
    /// Packets the host would have routed to or from the guest.
    pub forward: Count,
    /// Packets for the host other than the proxy (and DNS stub) ports.
    pub input_other: Count,
    /// Packets from the host into the guest that answer nothing.
    pub output_other: Count,
    /// Port-443 connection packets diverted to the transparent proxy.
    pub redirected: Count,
}

impl JailCounters {
    fn slot(&mut self, name: CounterName) -> &mut Count {
        match name {
            CounterName::Ipv6 => &mut self.ipv6,
            CounterName::Spoofed => &mut self.spoofed,
            CounterName::Redirected => &mut self.redirected,
            CounterName::InputOther => &mut self.input_other,
            CounterName::Forward => &mut self.forward,
            CounterName::OutputOther => &mut self.output_other,
        }
    }

    /// Packets dropped for any reason.
    pub fn dropped_packets(&self) -> u64 {
        [
            self.spoofed,
            self.ipv6,
            self.forward,
            self.input_other,
            self.output_other,
        ]
        .iter()
        .map(|c| c.packets)
        .sum()
    }
}

const PRIO_GUARD: i32 = -150; // "mangle": before dstnat, after conntrack (-200)
const PRIO_DSTNAT: i32 = -100;
const PRIO_FILTER: i32 = 0;

/// Renders the whole table as one nftables batch.
///
/// The batch starts with `add table; delete table; add table`, so applying it
/// replaces any previous table of the same name in the same transaction:
/// there is never a moment with a half-loaded or an empty table.
pub fn render(spec: &JailSpec) -> Nftables<'static> {
    let mut batch = Batch::new();
    let table = Table {
        family: NfFamily::INet,
        name: spec.table.clone().into(),
        handle: None,
    };
    batch.add(NfListObject::Table(table.clone()));
    batch.delete(NfListObject::Table(table.clone()));
    batch.add(NfListObject::Table(table));

    for name in CounterName::ALL {
        batch.add(NfListObject::Counter(Counter {
            family: NfFamily::INet,
            table: spec.table.clone().into(),
            name: name.as_str().into(),
            handle: None,
            packets: None,
            bytes: None,
        }));
    }

    let r = Render { spec };
    let chains: [(&str, NfChainType, NfHook, i32); 5] = [
        ("guard", NfChainType::Filter, NfHook::Prerouting, PRIO_GUARD),
        ("divert", NfChainType::NAT, NfHook::Prerouting, PRIO_DSTNAT),
        ("input", NfChainType::Filter, NfHook::Input, PRIO_FILTER),
        ("forward", NfChainType::Filter, NfHook::Forward, PRIO_FILTER),
        ("output", NfChainType::Filter, NfHook::Output, PRIO_FILTER),
    ];
    for (name, kind, hook, prio) in chains {
        batch.add(NfListObject::Chain(Chain {
            family: NfFamily::INet,
            table: spec.table.clone().into(),
            name: name.into(),
            _type: Some(kind),
            hook: Some(hook),
            prio: Some(prio),
            // Accept: the chain sees every interface of the host; it must only
            // decide about the session interface, which its rules name.
            policy: Some(NfChainPolicy::Accept),
            ..Chain::default()
        }));
    }

    // guard: before anything else looks at the packet.
    r.rule(
        &mut batch,
        "guard",
        [
            r.iif(),
            r.nfproto("ipv6"),
            counter(CounterName::Ipv6),
            drop(),
        ],
    );
    r.rule(
        &mut batch,
        "guard",
        [
            r.iif(),
            cmp(payload("ip", "saddr"), Operator::NEQ, addr(spec.guest)),
            counter(CounterName::Spoofed),
            drop(),
        ],
    );

    // divert: every TCP 443, whatever the destination, lands on the
    // transparent proxy. `dnat ip to host` rather than `redirect`, so the
    // target does not depend on which address the interface lists first.
    r.rule(
        &mut batch,
        "divert",
        [
            r.iif(),
            cmp(
                payload("tcp", "dport"),
                Operator::EQ,
                Expression::Number(443),
            ),
            counter(CounterName::Redirected),
            dnat(spec.host, spec.ports.transparent),
        ],
    );
    if let Some(dns) = spec.dns_port {
        for proto in ["udp", "tcp"] {
            r.rule(
                &mut batch,
                "divert",
                [
                    r.iif(),
                    cmp(payload("ip", "daddr"), Operator::EQ, addr(spec.host)),
                    cmp(
                        payload(proto, "dport"),
                        Operator::EQ,
                        Expression::Number(53),
                    ),
                    dnat(spec.host, dns),
                ],
            );
        }
    }

    // input: the proxy ports (and DNS stub) on the host address, nothing else.
    r.rule(&mut batch, "input", [r.iif(), ct_state_answer(), accept()]);
    let proxy_ports: BTreeSet<u16> = [spec.ports.connect, spec.ports.transparent].into();
    r.rule(
        &mut batch,
        "input",
        [
            r.iif(),
            cmp(payload("ip", "daddr"), Operator::EQ, addr(spec.host)),
            cmp(
                payload("tcp", "dport"),
                Operator::EQ,
                port_set(&proxy_ports),
            ),
            accept(),
        ],
    );
    if let Some(dns) = spec.dns_port {
        for proto in ["udp", "tcp"] {
            r.rule(
                &mut batch,
                "input",
                [
                    r.iif(),
                    cmp(payload("ip", "daddr"), Operator::EQ, addr(spec.host)),
                    cmp(
                        payload(proto, "dport"),
                        Operator::EQ,
                        Expression::Number(dns.into()),
                    ),
                    accept(),
                ],
            );
        }
    }
    r.rule(
        &mut batch,
        "input",
        [r.iif(), counter(CounterName::InputOther), drop()],
    );

    // forward: the guest is never routed anywhere, nor anything to it.
    r.rule(
        &mut batch,
        "forward",
        [r.iif(), counter(CounterName::Forward), drop()],
    );
    r.rule(
        &mut batch,
        "forward",
        [r.oif(), counter(CounterName::Forward), drop()],
    );

    // output: only answers to what the guest opened.
    r.rule(&mut batch, "output", [r.oif(), ct_state_answer(), accept()]);
    r.rule(
        &mut batch,
        "output",
        [r.oif(), counter(CounterName::OutputOther), drop()],
    );

    batch.to_nftables()
}

struct Render<'s> {
    spec: &'s JailSpec,
}

impl Render<'_> {
    fn rule<const N: usize>(
        &self,
        batch: &mut Batch<'static>,
        chain: &str,
        expr: [Statement<'static>; N],
    ) {
        batch.add(NfListObject::Rule(Rule {
            family: NfFamily::INet,
            table: self.spec.table.clone().into(),
            chain: chain.to_owned().into(),
            expr: Cow::Owned(expr.into()),
            ..Rule::default()
        }));
    }

    fn iif(&self) -> Statement<'static> {
        cmp(
            meta(MetaKey::Iifname),
            Operator::EQ,
            string(&self.spec.interface),
        )
    }

    fn oif(&self) -> Statement<'static> {
        cmp(
            meta(MetaKey::Oifname),
            Operator::EQ,
            string(&self.spec.interface),
        )
    }

    fn nfproto(&self, proto: &str) -> Statement<'static> {
        cmp(meta(MetaKey::Nfproto), Operator::EQ, string(proto))
    }
}

fn cmp(left: Expression<'static>, op: Operator, right: Expression<'static>) -> Statement<'static> {
    Statement::Match(Match { left, right, op })
}

fn meta(key: MetaKey) -> Expression<'static> {
    Expression::Named(NamedExpression::Meta(Meta { key }))
}

fn payload(protocol: &str, field: &str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(
        PayloadField {
            protocol: protocol.to_owned().into(),
            field: field.to_owned().into(),
        },
    )))
}

fn string(s: &str) -> Expression<'static> {
    Expression::String(s.to_owned().into())
}

fn addr(a: Ipv4Addr) -> Expression<'static> {
    Expression::String(a.to_string().into())
}

fn port_set(ports: &BTreeSet<u16>) -> Expression<'static> {
    Expression::Named(NamedExpression::Set(
        ports
            .iter()
            .map(|p| SetItem::Element(Expression::Number((*p).into())))
            .collect(),
    ))
}

fn ct_state_answer() -> Statement<'static> {
    cmp(
        Expression::Named(NamedExpression::CT(CT {
            key: "state".into(),
            family: None,
            dir: None,
        })),
        Operator::IN,
        Expression::List(vec![string("established"), string("related")]),
    )
}

fn counter(name: CounterName) -> Statement<'static> {
    Statement::Counter(nftables::stmt::Counter::Named(name.as_str().into()))
}

fn dnat(host: Ipv4Addr, port: u16) -> Statement<'static> {
    Statement::DNAT(Some(NAT {
        addr: Some(addr(host)),
        family: Some(NATFamily::IP),
        port: Some(Expression::Number(port.into())),
        flags: None,
    }))
}

fn drop() -> Statement<'static> {
    Statement::Drop(None)
}

fn accept() -> Statement<'static> {
    Statement::Accept(None)
}

/// Why `nft -j list table …` output could not be read as jail counters.
#[derive(Debug, Error)]
pub enum CounterParseError {
    #[error("`nft -j` printed something that is not nftables JSON")]
    Json(#[source] serde_json::Error),
    #[error(
        "the table `{table}` has no counter `{counter}`; it was not created by this version of zerolease"
    )]
    Missing {
        table: String,
        counter: &'static str,
    },
}

/// Reads the named counters of `table` out of `nft -j list table inet <table>`.
pub fn parse_counters(table: &str, json: &str) -> Result<JailCounters, CounterParseError> {
    #[derive(serde::Deserialize)]
    struct Listing {
        nftables: Vec<serde_json::Value>,
    }
    #[derive(serde::Deserialize)]
    struct RawCounter {
        table: String,
        name: String,
        #[serde(default)]
        packets: u64,
        #[serde(default)]
        bytes: u64,
    }
    let listing: Listing = serde_json::from_str(json).map_err(CounterParseError::Json)?;
    let mut out = JailCounters::default();
    let mut seen = BTreeSet::new();
    for object in listing.nftables {
        let Some(raw) = object.get("counter") else {
            continue;
        };
        let raw: RawCounter =
            serde_json::from_value(raw.clone()).map_err(CounterParseError::Json)?;
        if raw.table != table {
            continue;
        }
        if let Some(name) = CounterName::ALL
            .into_iter()
            .find(|n| n.as_str() == raw.name)
        {
            *out.slot(name) = Count {
                packets: raw.packets,
                bytes: raw.bytes,
            };
            seen.insert(name.as_str());
        }
    }
    if let Some(missing) = CounterName::ALL
        .into_iter()
        .find(|n| !seen.contains(n.as_str()))
    {
        return Err(CounterParseError::Missing {
            table: table.to_owned(),
            counter: missing.as_str(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(dns: Option<u16>) -> JailSpec {
        JailSpec {
            table: "zl_golden".into(),
            interface: "zl-golden".into(),
            host: Ipv4Addr::new(10, 213, 0, 1),
            guest: Ipv4Addr::new(10, 213, 0, 2),
            ports: ProxyPorts {
                connect: 3128,
                transparent: 3129,
            },
            dns_port: dns,
        }
    }

    /// Compares `actual` with the checked-in golden file; with
    /// `ZEROLEASE_UPDATE_GOLDEN=1` rewrites the file instead.
    fn golden(file: &str, actual: &str) {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("src/jail/golden")
            .join(file);
        if std::env::var_os("ZEROLEASE_UPDATE_GOLDEN").is_some() {
            std::fs::write(&path, actual).unwrap();
            return;
        }
        let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "cannot read {}: {e}; run with ZEROLEASE_UPDATE_GOLDEN=1 to create it",
                path.display()
            )
        });
        assert!(
            expected == actual,
            "rendered ruleset differs from {}; review the change and rerun with \
             ZEROLEASE_UPDATE_GOLDEN=1 to accept it.\n--- actual ---\n{actual}",
            path.display()
        );
    }

    fn pretty(spec: &JailSpec) -> String {
        let mut s = serde_json::to_string_pretty(&render(spec)).unwrap();
        s.push('\n');
        s
    }

    #[test]
    fn golden_ruleset_without_dns() {
        golden("ruleset.json", &pretty(&spec(None)));
    }

    #[test]
    fn golden_ruleset_with_dns() {
        golden("ruleset-dns.json", &pretty(&spec(Some(5353))));
    }

    #[test]
    fn every_drop_is_counted_and_scoped_to_the_interface() {
        for dns in [None, Some(53)] {
            let spec = spec(dns);
            let rendered = render(&spec);
            let rules: Vec<&Rule> = rendered
                .objects
                .iter()
                .filter_map(|o| match o {
                    nftables::schema::NfObject::CmdObject(nftables::schema::NfCmd::Add(
                        NfListObject::Rule(r),
                    )) => Some(r),
                    _ => None,
                })
                .collect();
            assert!(rules.len() >= 9);
            for rule in rules {
                let first = rule.expr.first().unwrap();
                assert!(
                    *first == Render { spec: &spec }.iif()
                        || *first == Render { spec: &spec }.oif(),
                    "rule in {} does not start with the interface match: {:?}",
                    rule.chain,
                    rule.expr
                );
                if rule.expr.last() == Some(&drop()) {
                    let n = rule.expr.len();
                    assert!(
                        matches!(rule.expr[n - 2], Statement::Counter(_)),
                        "uncounted drop in {}",
                        rule.chain
                    );
                }
            }
        }
    }

    #[test]
    fn equal_proxy_ports_render_one_set_element() {
        let mut s = spec(None);
        s.ports.transparent = s.ports.connect;
        let json = serde_json::to_string(&render(&s)).unwrap();
        assert!(json.contains(r#"{"set":[3128]}"#), "{json}");
    }

    #[test]
    fn parse_counters_table() {
        let listing = r#"{"nftables": [
          {"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
          {"table": {"family": "inet", "name": "zl_a", "handle": 1}},
          {"counter": {"family": "inet", "name": "ipv6", "table": "zl_a", "handle": 1, "packets": 3, "bytes": 216}},
          {"counter": {"family": "inet", "name": "spoofed", "table": "zl_a", "handle": 2, "packets": 1, "bytes": 60}},
          {"counter": {"family": "inet", "name": "redirected", "table": "zl_a", "handle": 3, "packets": 0, "bytes": 0}},
          {"counter": {"family": "inet", "name": "input_other", "table": "zl_a", "handle": 4, "packets": 5000000000, "bytes": 9000000000000}},
          {"counter": {"family": "inet", "name": "forward", "table": "zl_a", "handle": 5, "packets": 2, "bytes": 120}},
          {"counter": {"family": "inet", "name": "output_other", "table": "zl_a", "handle": 6, "packets": 0, "bytes": 0}},
          {"counter": {"family": "inet", "name": "ipv6", "table": "zl_b", "handle": 7, "packets": 99, "bytes": 99}},
          {"counter": {"family": "inet", "name": "unknown", "table": "zl_a", "handle": 8, "packets": 99, "bytes": 99}},
          {"chain": {"family": "inet", "table": "zl_a", "name": "guard", "handle": 9}}
        ]}"#;
        let c = parse_counters("zl_a", listing).unwrap();
        assert_eq!(
            c.ipv6,
            Count {
                packets: 3,
                bytes: 216
            }
        );
        assert_eq!(c.spoofed.packets, 1);
        // Counters beyond u32 (a flooding guest) still parse.
        assert_eq!(c.input_other.packets, 5_000_000_000);
        assert_eq!(c.forward.packets, 2);
        assert_eq!(c.dropped_packets(), 3 + 1 + 5_000_000_000 + 2);

        // Another table's counters are not ours: zl_b lacks the rest.
        assert!(matches!(
            parse_counters("zl_b", listing),
            Err(CounterParseError::Missing {
                counter: "spoofed",
                ..
            })
        ));
        for bad in [
            "",
            "{}",
            "[]",
            "not json",
            r#"{"nftables": [{"counter": {"name": 5}}]}"#,
        ] {
            assert!(parse_counters("zl_a", bad).is_err(), "{bad}");
        }
        assert!(matches!(
            parse_counters("zl_a", r#"{"nftables": []}"#),
            Err(CounterParseError::Missing { .. })
        ));
    }
}
