//! The jail against a real kernel: each test builds a host, guest(s) and an
//! upstream namespace (see `world.rs`) and probes from the guest.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV6};

use zerolease::jail::{Jail, JailError, PoolError, reap_leftovers};
use zerolease_tests::{InNs, block_here, require_root_and_tools, udp_received};

use crate::world::{OTHER_PORT, PORTS, SPOOF, TOOLS, UPSTREAM, World, destroy, sa};

fn v6(addr: &str, port: u16) -> SocketAddr {
    SocketAddr::V6(SocketAddrV6::new(addr.parse().expect("v6"), port, 0, 0))
}

/// Control: without a jail every probe used below gets through. This is what
/// makes the "dropped" results of the other tests mean something.
#[test]
fn probes_get_through_without_a_jail() {
    if !require_root_and_tools(TOOLS) {
        return;
    }
    let world = World::new();
    let guest = world.guest("ctl");
    let host_addr = Ipv4Addr::new(10, 213, 0, 1);
    world
        .host
        .ip(["addr", "add", "10.213.0.1/30", "dev", "zl-ctl"]);
    world.host.ip(["link", "set", "zl-ctl", "up"]);
    guest.configure(host_addr, Ipv4Addr::new(10, 213, 0, 2), 30);
    guest.add_ipv6(&world.host);
    guest.add_spoof_address(&world.host);

    let other = world.host.tcp_listener(sa(host_addr, OTHER_PORT));
    assert!(guest.ns.tcp_connects(None, sa(host_addr, OTHER_PORT)));
    assert!(other.accepted().is_some());

    let udp = world.host.udp_socket(sa(host_addr, 5000));
    guest.ns.udp_send(sa(host_addr, 5000), b"hello");
    assert_eq!(udp_received(&udp).as_deref(), Some(&b"hello"[..]));

    assert!(guest.ns.pings(&host_addr.to_string()));
    assert!(guest.ns.pings(&UPSTREAM.to_string()));

    let up = world.upstream.tcp_listener(sa(UPSTREAM, OTHER_PORT));
    assert!(guest.ns.tcp_connects(None, sa(UPSTREAM, OTHER_PORT)));
    assert!(up.accepted().is_some());

    let six = world.host.tcp_listener(v6("fd00:5a::1", OTHER_PORT));
    assert!(guest.ns.tcp_connects(None, v6("fd00:5a::1", OTHER_PORT)));
    assert!(six.accepted().is_some());

    assert!(
        guest
            .ns
            .tcp_connects(Some(sa(SPOOF, 0)), sa(host_addr, OTHER_PORT))
    );
    let (peer, _) = other.accepted().expect("spoofed connection accepted");
    assert_eq!(peer.ip(), SPOOF);
}

#[test]
fn guest_reaches_the_proxy_ports_and_nothing_else_on_the_host() {
    if !require_root_and_tools(TOOLS) {
        return;
    }
    let world = World::new();
    let guest = world.guest("a");
    let jail = world.jail(&guest, None);
    let rec = jail.get().record().clone();
    assert_eq!(rec.interface, "zl-a");
    assert_eq!(rec.table, "zl_a");
    assert_eq!(
        (rec.host, rec.guest, rec.prefix),
        (
            Ipv4Addr::new(10, 213, 0, 1),
            Ipv4Addr::new(10, 213, 0, 2),
            30
        )
    );

    // The explicit proxy port, over a real client: curl speaks CONNECT and
    // the listener sees the guest's own address.
    let connect = world.host.tcp_listener(sa(rec.host, PORTS.connect));
    let client = std::thread::spawn({
        let ns = guest.ns.clone();
        let proxy = format!("http://{}:{}", rec.host, PORTS.connect);
        // The test listener never answers the CONNECT; curl gives up when
        // the listener closes the connection.
        move || {
            ns.exec(
                "curl",
                [
                    "-s",
                    "--max-time",
                    "3",
                    "--proxy",
                    &proxy,
                    "https://example.invalid/",
                ],
            )
        }
    });
    let (peer, first) = connect
        .accept_and_read()
        .expect("CONNECT reached the proxy port");
    assert_eq!(peer.ip(), rec.guest);
    assert!(
        first.starts_with(b"CONNECT example.invalid:443"),
        "{:?}",
        String::from_utf8_lossy(&first)
    );
    let _ = client.join();

    let transparent = world.host.tcp_listener(sa(rec.host, PORTS.transparent));
    assert!(guest.ns.tcp_connects(None, sa(rec.host, PORTS.transparent)));
    assert!(transparent.accepted().is_some());
    // (IPv6 noise from the guest's own stack may already be counted.)
    let c = world.counters(&jail);
    assert_eq!(
        (c.input_other, c.spoofed, c.forward),
        Default::default(),
        "{c:?}"
    );

    // Another TCP port of the host.
    let other = world.host.tcp_listener(sa(rec.host, OTHER_PORT));
    let before = world.counters(&jail);
    assert!(!guest.ns.tcp_connects(None, sa(rec.host, OTHER_PORT)));
    assert!(other.accepted().is_none());
    let after = world.counters(&jail);
    assert!(after.input_other.packets > before.input_other.packets);

    // The proxy port of the host, but over UDP; and DNS, which is off.
    for port in [PORTS.connect, 53] {
        let udp = world.host.udp_socket(sa(rec.host, port));
        let before = world.counters(&jail);
        guest.ns.udp_send(sa(rec.host, port), b"hello");
        assert_eq!(udp_received(&udp), None, "udp port {port}");
        assert_eq!(
            world.counters(&jail).input_other.packets,
            before.input_other.packets + 1
        );
    }

    // ICMP to the host.
    let before = world.counters(&jail);
    assert!(!guest.ns.pings(&rec.host.to_string()));
    assert!(world.counters(&jail).input_other.packets > before.input_other.packets);

    // A proxy port on another address of the host (its uplink).
    let uplink = world
        .host
        .tcp_listener(sa(crate::world::HOST_UPLINK, PORTS.connect));
    assert!(
        !guest
            .ns
            .tcp_connects(None, sa(crate::world::HOST_UPLINK, PORTS.connect))
    );
    assert!(uplink.accepted().is_none());
}

#[test]
fn dns_stub_is_reachable_only_when_enabled() {
    if !require_root_and_tools(TOOLS) {
        return;
    }
    let world = World::new();
    let guest = world.guest("dns");
    let jail = world.jail(&guest, Some(5353));
    let host = jail.get().record().host;

    // The guest asks host:53; the stub listens on host:5353.
    let udp = world.host.udp_socket(sa(host, 5353));
    guest.ns.udp_send(sa(host, 53), b"query");
    assert_eq!(udp_received(&udp).as_deref(), Some(&b"query"[..]));
    let tcp = world.host.tcp_listener(sa(host, 5353));
    assert!(guest.ns.tcp_connects(None, sa(host, 53)));
    assert!(tcp.accepted().is_some());

    // Other UDP is still dropped.
    let other = world.host.udp_socket(sa(host, 5000));
    guest.ns.udp_send(sa(host, 5000), b"x");
    assert_eq!(udp_received(&other), None);
    assert!(world.counters(&jail).input_other.packets >= 1);
}

#[test]
fn nothing_is_forwarded_even_with_ip_forward_on() {
    if !require_root_and_tools(TOOLS) {
        return;
    }
    let world = World::new();
    let guest = world.guest("fwd");
    let jail = world.jail(&guest, None);

    let tcp = world.upstream.tcp_listener(sa(UPSTREAM, OTHER_PORT));
    let udp = world.upstream.udp_socket(sa(UPSTREAM, 5000));

    let before = world.counters(&jail);
    assert!(!guest.ns.tcp_connects(None, sa(UPSTREAM, OTHER_PORT)));
    assert!(tcp.accepted().is_none());
    let after_tcp = world.counters(&jail);
    assert!(after_tcp.forward.packets > before.forward.packets);

    guest.ns.udp_send(sa(UPSTREAM, 5000), b"leak");
    assert_eq!(udp_received(&udp), None);
    let after_udp = world.counters(&jail);
    assert_eq!(after_udp.forward.packets, after_tcp.forward.packets + 1);

    assert!(!guest.ns.pings(&UPSTREAM.to_string()));
    assert!(world.counters(&jail).forward.packets > after_udp.forward.packets);

    // Nor from the upstream side into the guest.
    let rec = jail.get().record().clone();
    let before = world.counters(&jail);
    assert!(!world.upstream.pings(&rec.guest.to_string()));
    assert!(world.counters(&jail).forward.packets > before.forward.packets);
}

#[test]
fn ipv6_is_dropped() {
    if !require_root_and_tools(TOOLS) {
        return;
    }
    let world = World::new();
    let guest = world.guest("six");
    let jail = world.jail(&guest, None);
    guest.add_ipv6(&world.host);

    let listener = world.host.tcp_listener(v6("fd00:5a::1", PORTS.connect));
    assert!(!guest.ns.tcp_connects(None, v6("fd00:5a::1", PORTS.connect)));
    assert!(listener.accepted().is_none());
    let c = world.counters(&jail);
    assert!(c.ipv6.packets > 0);
    assert_eq!(
        c.input_other.packets, 0,
        "IPv6 must be stopped before input"
    );
}

#[test]
fn spoofed_source_is_dropped() {
    if !require_root_and_tools(TOOLS) {
        return;
    }
    let world = World::new();
    let guest = world.guest("spf");
    let jail = world.jail(&guest, None);
    guest.add_spoof_address(&world.host);
    let host = jail.get().record().host;

    let listener = world.host.tcp_listener(sa(host, PORTS.connect));
    assert!(
        !guest
            .ns
            .tcp_connects(Some(sa(SPOOF, 0)), sa(host, PORTS.connect))
    );
    assert!(listener.accepted().is_none());
    let c = world.counters(&jail);
    assert!(c.spoofed.packets > 0);
    // And the guest's real address still works on the same port.
    assert!(guest.ns.tcp_connects(None, sa(host, PORTS.connect)));
    assert!(listener.accepted().is_some());
}

#[test]
fn tcp_443_to_any_address_lands_on_the_transparent_port() {
    if !require_root_and_tools(TOOLS) {
        return;
    }
    let world = World::new();
    let guest = world.guest("tls");
    let jail = world.jail(&guest, None);
    let rec = jail.get().record().clone();

    let real = world.upstream.tcp_listener(sa(UPSTREAM, 443));
    let transparent = world.host.tcp_listener(sa(rec.host, PORTS.transparent));

    // A real TLS client towards the upstream's address.
    let client = std::thread::spawn({
        let ns = guest.ns.clone();
        move || {
            ns.exec(
                "curl",
                ["-sk", "--max-time", "3", &format!("https://{UPSTREAM}/")],
            )
        }
    });
    let (peer, hello) = transparent
        .accept_and_read()
        .expect("the transparent port received the connection");
    assert_eq!(peer.ip(), rec.guest);
    assert_eq!(&hello[..2], &[0x16, 0x03], "a TLS handshake record");
    drop(transparent);
    let _ = client.join();
    assert!(real.accepted().is_none(), "the upstream saw the connection");

    // An address that exists nowhere, and the host's own address.
    let transparent = world.host.tcp_listener(sa(rec.host, PORTS.transparent));
    for dst in [Ipv4Addr::new(203, 0, 113, 7), rec.host] {
        assert!(guest.ns.tcp_connects(None, sa(dst, 443)), "443 to {dst}");
        let (_, local) = transparent.accepted().expect("redirected");
        assert_eq!(local, sa(rec.host, PORTS.transparent));
    }
    let c = world.counters(&jail);
    assert!(c.redirected.packets >= 3);
    assert_eq!(c.forward.packets, 0);
}

#[test]
fn two_sessions_cannot_reach_each_other() {
    if !require_root_and_tools(TOOLS) {
        return;
    }
    let world = World::new();
    let guest_a = world.guest("ta");
    let guest_b = world.guest("tb");
    let jail_a = world.jail(&guest_a, None);
    let jail_b = world.jail(&guest_b, None);
    let a = jail_a.get().record().clone();
    let b = jail_b.get().record().clone();
    assert_ne!(a.host, b.host, "each session gets its own /30");
    assert_eq!(b.host, Ipv4Addr::new(10, 213, 0, 5));

    let b_proxy = world.host.tcp_listener(sa(b.host, PORTS.connect));
    let before = world.counters(&jail_a);
    assert!(!guest_a.ns.tcp_connects(None, sa(b.host, PORTS.connect)));
    assert!(b_proxy.accepted().is_none());
    assert!(world.counters(&jail_a).input_other.packets > before.input_other.packets);

    // Guest to guest is forwarding, and dropped (by whichever of the two
    // tables' forward chains the kernel runs first).
    let forwarded =
        |w: &World| w.counters(&jail_a).forward.packets + w.counters(&jail_b).forward.packets;
    let before = forwarded(&world);
    let b_guest = guest_b.ns.tcp_listener(sa(b.guest, OTHER_PORT));
    assert!(!guest_a.ns.tcp_connects(None, sa(b.guest, OTHER_PORT)));
    assert!(b_guest.accepted().is_none());
    assert!(forwarded(&world) > before);

    // B still reaches its own proxy.
    assert!(guest_b.ns.tcp_connects(None, sa(b.host, PORTS.connect)));
    assert!(b_proxy.accepted().is_some());
}

#[test]
fn teardown_leaves_no_table_and_no_link() {
    if !require_root_and_tools(TOOLS) {
        return;
    }
    let world = World::new();
    let guest = world.guest("td");
    let mut jail = world.jail(&guest, None);
    assert_eq!(
        world.leftovers(),
        (vec!["zl_td".to_owned()], vec!["zl-td".to_owned()])
    );
    destroy(&mut jail).expect("destroy");
    assert_eq!(world.leftovers(), (vec![], vec![]));
    destroy(&mut jail).expect("destroy is idempotent");

    // Drop without destroy also cleans up.
    let guest = world.guest("dr");
    let jail = world.jail(&guest, None);
    assert_eq!(world.leftovers().1, vec!["zl-dr".to_owned()]);
    drop(jail);
    assert_eq!(world.leftovers(), (vec![], vec![]));

    // A rebuilt jail whose pieces are already gone destroys without error.
    let guest = world.guest("re");
    let jail = world.jail(&guest, None);
    let record = jail.consume(|j| j.into_record());
    let mut first = InNs::new(&world.host, Jail::for_existing(record.clone()));
    destroy(&mut first).expect("destroy from a record");
    let mut again = InNs::new(&world.host, Jail::for_existing(record));
    destroy(&mut again).expect("destroying what is gone");
    assert_eq!(world.leftovers(), (vec![], vec![]));
}

#[test]
fn reap_removes_orphans_and_keeps_live_sessions() {
    if !require_root_and_tools(TOOLS) {
        return;
    }
    let world = World::new();
    let live_guest = world.guest("live");
    let dead_guest = world.guest("dead");
    let live = world.jail(&live_guest, None).consume(|j| j.into_record());
    // As if the supervisor died: both jails stay, neither value tears down.
    world.jail(&dead_guest, None).consume(|j| j.into_record());

    let live_id = live.id.clone();
    let reaped = world
        .host
        .block_on(|| async move { reap_leftovers(&[live_id]).await })
        .expect("reap");
    assert_eq!(reaped.links, ["zl-dead"]);
    assert_eq!(reaped.tables, ["zl_dead"]);
    assert_eq!(
        world.leftovers(),
        (vec!["zl_live".to_owned()], vec!["zl-live".to_owned()])
    );

    // The live session still works.
    let listener = world.host.tcp_listener(sa(live.host, PORTS.connect));
    assert!(
        live_guest
            .ns
            .tcp_connects(None, sa(live.host, PORTS.connect))
    );
    assert!(listener.accepted().is_some());

    // Reaping twice finds nothing; reaping with no live session takes the rest.
    let live_id = live.id.clone();
    let again = world
        .host
        .block_on(|| async move { reap_leftovers(&[live_id]).await })
        .expect("reap again");
    assert!(again.links.is_empty() && again.tables.is_empty());
    world
        .host
        .run(|| block_here(reap_leftovers(&[])))
        .expect("reap all");
    assert_eq!(world.leftovers(), (vec![], vec![]));
}

#[test]
fn a_pool_overlapping_a_route_is_refused_and_leaves_nothing() {
    if !require_root_and_tools(TOOLS) {
        return;
    }
    let world = World::new();
    world
        .host
        .ip(["route", "add", "10.213.0.0/16", "dev", "up0"]);
    let guest = world.guest("ovl");
    let config = guest.jail_config(None);
    let err = world
        .host
        .block_on(|| async move { Jail::create(config).await.map(|j| j.into_record()) })
        .expect_err("overlap refused");
    assert!(
        matches!(err, JailError::Pool(PoolError::Overlap { .. })),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "address pool 10.213.0.0/16 overlaps the route 10.213.0.0/16 dev up0; \
         choose another pool with --pool"
    );
    // The given interface is untouched, and no table was loaded.
    assert_eq!(world.leftovers(), (vec![], vec!["zl-ovl".to_owned()]));
}

#[test]
fn a_missing_interface_is_reported_and_nothing_is_loaded() {
    if !require_root_and_tools(TOOLS) {
        return;
    }
    let world = World::new();
    let config = zerolease::jail::JailConfig {
        id: zerolease::jail::JailId::parse("nope").expect("id"),
        link: zerolease::jail::Link::Existing {
            name: "zl-nope".to_owned(),
        },
        pool: zerolease::jail::DEFAULT_POOL.parse().expect("pool"),
        ports: PORTS,
        dns_port: None,
    };
    let err = world
        .host
        .block_on(|| async move { Jail::create(config).await.map(|j| j.into_record()) })
        .expect_err("no such interface");
    assert_eq!(
        err.to_string(),
        "there is no network interface named `zl-nope`"
    );
    assert_eq!(world.leftovers(), (vec![], vec![]));
}

/// A session makes its jail in two halves so the rules load while QEMU
/// starts: until `seal` the link is down (it carries nothing) and has no
/// table; `seal` loads the table, then brings the link up.
#[test]
fn a_jail_made_down_is_up_only_once_sealed() {
    if !require_root_and_tools(TOOLS) {
        return;
    }
    let world = World::new();
    let guest = world.guest("sl");
    let config = guest.jail_config(None);
    let jail = world
        .host
        .block_on(|| Jail::create_down(config))
        .expect("create the jail, down");
    let mut jail = InNs::new(&world.host, jail);
    let is_up = || {
        let out = world.host.ip(["-o", "link", "show", "dev", "zl-sl"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let flags = text.split(['<', '>']).nth(1).unwrap_or_default().to_owned();
        flags.split(',').any(|flag| flag == "UP")
    };
    assert!(!is_up(), "the link is up before its rules are loaded");
    assert_eq!(world.leftovers().0, Vec::<String>::new());
    jail.with(|j| block_here(j.seal())).expect("seal");
    assert!(is_up(), "sealing brings the link up");
    assert_eq!(world.leftovers().0, vec!["zl_sl".to_owned()]);
    // Sealed, it filters like any jail.
    let record = jail.get().record().clone();
    guest.configure(record.host, record.guest, record.prefix);
    assert!(!guest.ns.tcp_connects(None, sa(UPSTREAM, OTHER_PORT)));
    assert!(world.counters(&jail).forward.packets > 0);
    destroy(&mut jail).expect("destroy");
    assert_eq!(world.leftovers(), (vec![], vec![]));

    // A jail rebuilt from its record is for tearing down only.
    let rebuilt = Jail::for_existing(record);
    let err = block_here(rebuilt.seal()).expect_err("a rebuilt jail does not seal");
    assert!(matches!(err, JailError::NotBuilt { .. }), "{err}");
}
