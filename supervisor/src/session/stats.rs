//! Live numbers of a running session, for `zerolease ps` and `inspect`:
//! the answer to the control socket's `stats` command, one JSON line.
//!
//! Only the running `zerolease run` holds the proxy registry and sits in the
//! jail's network namespace, so it answers; another process asks over the
//! control socket.
//!
//! **Invariant:** stats carry names, counts and byte totals — never a
//! secret or a lease's value.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::proxy::registry::{SessionId, SessionSnapshot};
use crate::vault::{AuditFilter, AuditRecord, Vault};

/// One open tunnel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveTunnel {
    pub host: String,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub age_seconds: u64,
}

/// What a running session reports about itself.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveStats {
    pub session: String,
    pub tunnels_open: usize,
    pub tunnels: Vec<LiveTunnel>,
    /// Tunnels opened so far, open or closed.
    pub connections: u64,
    /// Bytes over open and closed tunnels.
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// Connections the proxy refused.
    pub refused: u64,
    /// Packets the jail's nftables rules dropped, by counter; `None` when
    /// they could not be read.
    pub jail_dropped: Option<BTreeMap<String, u64>>,
    /// Refusals plus dropped packets: every blocked attempt.
    pub blocked: u64,
}

/// Builds the stats from the proxy's live view, the session's audit records
/// (for closed tunnels), and the jail's counters.
pub fn build(
    session: &str,
    snapshot: Option<&SessionSnapshot>,
    audit: &[AuditRecord],
    jail: Option<&crate::jail::JailCounters>,
) -> LiveStats {
    let mut s = LiveStats {
        session: session.to_owned(),
        ..LiveStats::default()
    };
    for r in audit
        .iter()
        .filter(|r| r.session.as_deref() == Some(session))
    {
        match r.event.as_str() {
            "tunnel_opened" => s.connections += 1,
            "tunnel_closed" => {
                if let Some((up, down)) = super::report::tunnel_bytes(&r.detail) {
                    s.bytes_up += up;
                    s.bytes_down += down;
                }
            }
            _ => {}
        }
    }
    if let Some(snap) = snapshot {
        s.tunnels_open = snap.tunnels.len();
        s.refused = snap.refusals;
        for t in &snap.tunnels {
            s.bytes_up += t.bytes_up;
            s.bytes_down += t.bytes_down;
            s.tunnels.push(LiveTunnel {
                host: t.host.to_string(),
                bytes_up: t.bytes_up,
                bytes_down: t.bytes_down,
                age_seconds: t.age.as_secs(),
            });
        }
    }
    if let Some(c) = jail {
        let dropped: BTreeMap<String, u64> = [
            ("ipv6", c.ipv6),
            ("spoofed", c.spoofed),
            ("forward", c.forward),
            ("input_other", c.input_other),
            ("output_other", c.output_other),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.packets))
        .collect();
        s.jail_dropped = Some(dropped);
    }
    s.blocked = s.refused + jail.map_or(0, |c| c.dropped_packets());
    s
}

/// Answers `stats` for the session `held` runs: one JSON line.
pub(super) async fn answer(vault: &Vault, held: &super::Held) -> String {
    let session = held.session.clone().unwrap_or_default();
    let snapshot = held
        .registry
        .as_ref()
        .and_then(|r| r.snapshot(&SessionId::new(&session)));
    let jail = match &held.jail {
        Some(j) => j.counters().await.ok(),
        None => None,
    };
    let audit: Vec<AuditRecord> = vault
        .audit_list(AuditFilter {
            session: Some(session.clone()),
            ..AuditFilter::default()
        })
        .map(|v| v.into_iter().map(|r| r.record).collect())
        .unwrap_or_default();
    let stats = build(&session, snapshot.as_ref(), &audit, jail.as_ref());
    let mut line = serde_json::to_string(&stats).unwrap_or_else(|_| "{}".into());
    line.push('\n');
    line
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::clock::Timestamp;
    use crate::domain::HostName;
    use crate::jail::{Count, JailCounters};
    use crate::proxy::events::FrontEnd;
    use crate::proxy::registry::{EntryId, TunnelSnapshot};
    use crate::vault::{AuditKind, Outcome};

    fn rec(session: &str, kind: AuditKind, detail: &str) -> AuditRecord {
        AuditRecord::new(Timestamp(1), kind, Outcome::Ok)
            .session(session)
            .detail(detail)
    }

    #[test]
    fn live_and_closed_tunnels_refusals_and_drops_add_up() {
        let snap = SessionSnapshot {
            session: SessionId::new("s1"),
            entries: vec![EntryId::new("L1")],
            tunnels: vec![TunnelSnapshot {
                entry: EntryId::new("L1"),
                front_end: FrontEnd::Explicit,
                host: HostName::parse("api.example.test").unwrap(),
                address: "198.18.0.2:443".parse().unwrap(),
                bytes_up: 5,
                bytes_down: 6,
                age: Duration::from_secs(3),
            }],
            refusals: 2,
        };
        let audit = [
            rec("s1", AuditKind::TunnelOpened, "connect to x"),
            rec("s1", AuditKind::TunnelOpened, "connect to x"),
            rec(
                "s1",
                AuditKind::TunnelClosed,
                "connect to x; 100 B up, 200 B down; 1 ms; client closed",
            ),
            rec(
                "s2",
                AuditKind::TunnelClosed,
                "connect to x; 999 B up, 999 B down; 1 ms; client closed",
            ),
            rec("s1", AuditKind::TunnelClosed, "garbage"),
        ];
        let jail = JailCounters {
            ipv6: Count {
                packets: 3,
                bytes: 300,
            },
            forward: Count {
                packets: 1,
                bytes: 60,
            },
            redirected: Count {
                packets: 50,
                bytes: 5000,
            },
            ..JailCounters::default()
        };
        let s = build("s1", Some(&snap), &audit, Some(&jail));
        assert_eq!(s.tunnels_open, 1);
        assert_eq!(s.connections, 2);
        assert_eq!((s.bytes_up, s.bytes_down), (105, 206));
        assert_eq!(s.refused, 2);
        let dropped = s.jail_dropped.as_ref().unwrap();
        assert_eq!(dropped.get("ipv6"), Some(&3));
        assert!(
            !dropped.contains_key("redirected"),
            "diverted is not dropped"
        );
        assert_eq!(s.blocked, 2 + 4);
        assert_eq!(s.tunnels[0].host, "api.example.test");
        assert_eq!(s.tunnels[0].age_seconds, 3);

        // The JSON shape `ps` reads.
        let v: serde_json::Value = serde_json::to_value(&s).unwrap();
        for key in [
            "session",
            "tunnels_open",
            "tunnels",
            "connections",
            "bytes_up",
            "bytes_down",
            "refused",
            "jail_dropped",
            "blocked",
        ] {
            assert!(v.get(key).is_some(), "no {key} in {v}");
        }
        let back: LiveStats = serde_json::from_value(v).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn the_control_socket_parses_stats_exactly() {
        use crate::session::Control;
        for c in [Control::Revoke, Control::Destroy, Control::Stats] {
            assert_eq!(Control::parse(c.as_str()), Some(c));
            assert_eq!(Control::parse(&format!("  {}\n", c.as_str())), Some(c));
        }
        for bad in ["", "STATS", "stats now", "stat", "stats;destroy", "\0stats"] {
            assert_eq!(Control::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn no_proxy_or_jail_yet_is_all_zero() {
        let s = build("s1", None, &[], None);
        assert_eq!(s.tunnels_open, 0);
        assert_eq!(s.blocked, 0);
        assert_eq!(s.jail_dropped, None);
    }
}
