//! Tap creation, which cannot carry traffic without a VM: checked for what
//! the kernel reports about the device.

use nix::unistd::Uid;
use zerolease::jail::tap::create_persistent_tap;
use zerolease::jail::{DEFAULT_POOL, Jail, JailConfig, JailId, Link};
use zerolease_tests::{InNs, Netns, require_root_and_tools};

use crate::world::{PORTS, destroy};

fn details(ns: &Netns, name: &str) -> String {
    let out = ns.ip(["-d", "link", "show", name]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn jail_on_a_tap_creates_a_persistent_owned_tap_and_deletes_it() {
    if !require_root_and_tools(&["ip", "nft"]) {
        return;
    }
    let ns = Netns::new("tap");
    let config = JailConfig {
        id: JailId::parse("tap1").expect("id"),
        link: Link::Tap {
            owner: Uid::from_raw(4242),
        },
        pool: DEFAULT_POOL.parse().expect("pool"),
        ports: PORTS,
        dns_port: None,
    };
    let jail = ns.block_on(|| Jail::create(config)).expect("create");
    let mut jail = InNs::new(&ns, jail);
    assert_eq!(jail.get().record().interface, "zl-tap1");

    let shown = details(&ns, "zl-tap1");
    assert!(shown.contains("tun type tap"), "{shown}");
    assert!(shown.contains("persist on"), "{shown}");
    assert!(shown.contains("user 4242"), "{shown}");
    assert!(shown.contains("vnet_hdr on"), "{shown}");
    // Administratively up (no carrier until QEMU attaches).
    assert!(shown.contains(",UP"), "{shown}");
    let addrs =
        String::from_utf8_lossy(&ns.ip(["-4", "addr", "show", "zl-tap1"]).stdout).into_owned();
    assert!(addrs.contains("inet 10.213.0.1/30"), "{addrs}");
    let tables = ns.exec("nft", ["list", "tables"]);
    assert!(String::from_utf8_lossy(&tables.stdout).contains("table inet zl_tap1"));
    let v6 = ns.exec("cat", ["/proc/sys/net/ipv6/conf/zl-tap1/disable_ipv6"]);
    assert_eq!(
        String::from_utf8_lossy(&v6.stdout).trim(),
        "1",
        "IPv6 stays off on the tap"
    );

    destroy(&mut jail).expect("destroy");
    let gone = ns.exec("ip", ["link", "show", "zl-tap1"]);
    assert!(!gone.status.success(), "the tap is still there");
    destroy(&mut jail).expect("destroy again");
    let tables = ns.exec("nft", ["list", "tables"]);
    assert!(!String::from_utf8_lossy(&tables.stdout).contains("zl_"));
}

#[test]
fn tap_creation_is_idempotent_and_refuses_a_foreign_interface() {
    if !require_root_and_tools(&["ip"]) {
        return;
    }
    let ns = Netns::new("tap");
    ns.run(|| create_persistent_tap("zl-t2", Uid::from_raw(1000)))
        .expect("create");
    // A leftover persistent tap of the same name is taken over.
    ns.run(|| create_persistent_tap("zl-t2", Uid::from_raw(1001)))
        .expect("again");
    let shown = details(&ns, "zl-t2");
    assert!(shown.contains("user 1001"), "{shown}");
    // Created down: only the jail sets it up, after its rules.
    assert!(!shown.contains(",UP"), "{shown}");

    ns.ip([
        "link", "add", "zl-veth", "type", "veth", "peer", "name", "other",
    ]);
    let err = ns
        .run(|| create_persistent_tap("zl-veth", Uid::from_raw(1000)))
        .expect_err("a veth is not a tap");
    assert!(
        err.to_string().contains("already exists and is not a tap"),
        "{err}"
    );
}
