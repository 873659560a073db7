//! The jail topology: a "host" namespace where the jail is applied, "guest"
//! namespaces attached to it by veth pairs whose host end is named like a
//! tap (`zl-…`) and stands in for a VM, and an "upstream" namespace the host
//! can route to, for checking that nothing leaks.
//!
//! ```text
//!  guest (eth0) ══ veth ══ zl-<id> ┐
//!                                  host ── up0 ══ veth ══ eth0  upstream
//!  guest (eth0) ══ veth ══ zl-<id> ┘      198.18.0.1        198.18.0.2
//! ```

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use zerolease::jail::{DEFAULT_POOL, Jail, JailConfig, JailCounters, JailId, Link, ProxyPorts};
use zerolease_tests::{InNs, Netns, block_here};

pub const HOST_UPLINK: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const UPSTREAM: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
pub const PORTS: ProxyPorts = ProxyPorts {
    connect: 3128,
    transparent: 3129,
};
/// A source address that is not the guest's.
pub const SPOOF: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 5);
/// A port nothing of the jail allows.
pub const OTHER_PORT: u16 = 8080;
/// The tools the jail tests drive.
pub const TOOLS: &[&str] = &["ip", "nft", "ping", "curl"];

pub fn sa(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::from((ip, port))
}

pub struct World {
    pub host: Arc<Netns>,
    pub upstream: Arc<Netns>,
}

impl World {
    pub fn new() -> World {
        let host = Netns::new("host");
        let upstream = Netns::new("up");
        host.veth_to("up0", &upstream, "eth0");
        host.ip(["addr", "add", "198.18.0.1/24", "dev", "up0"]);
        host.ip(["link", "set", "up0", "up"]);
        upstream.ip(["addr", "add", "198.18.0.2/24", "dev", "eth0"]);
        upstream.ip(["link", "set", "eth0", "up"]);
        // The upstream would answer the pool if packets got there.
        upstream.ip(["route", "add", "10.0.0.0/8", "via", "198.18.0.1"]);
        // The host is a router: only the jail stops forwarding.
        host.sysctl("net.ipv4.ip_forward", "1");
        World { host, upstream }
    }

    /// A guest namespace linked to the host by a veth whose host end is
    /// `zl-<id>`, left down and unaddressed for the jail to configure.
    pub fn guest(&self, id: &str) -> Guest {
        let ns = Netns::new(&format!("g{id}"));
        let link = format!("zl-{id}");
        self.host.veth_to(&link, &ns, "eth0");
        Guest {
            ns,
            id: JailId::parse(id).expect("test ids are valid"),
            link,
        }
    }

    /// Builds the jail of `guest` in the host namespace.
    pub fn jail(&self, guest: &Guest, dns_port: Option<u16>) -> InNs<Jail> {
        let config = guest.jail_config(dns_port);
        let jail = self
            .host
            .block_on(|| Jail::create(config))
            .expect("create the jail");
        let jail = InNs::new(&self.host, jail);
        let record = jail.get().record();
        guest.configure(record.host, record.guest, record.prefix);
        jail
    }

    pub fn counters(&self, jail: &InNs<Jail>) -> JailCounters {
        let table = jail.get().record().table.clone();
        self.host
            .block_on(|| async move { zerolease::jail::read_counters(&table).await })
            .expect("read counters")
    }

    /// The `inet` tables and links of the host namespace that carry
    /// zerolease's prefixes.
    pub fn leftovers(&self) -> (Vec<String>, Vec<String>) {
        let tables = self
            .host
            .block_on(zerolease::jail::nft::inet_tables)
            .expect("list tables")
            .into_iter()
            .filter(|t| t.starts_with("zl_"))
            .collect();
        let links = self
            .host
            .block_on(|| async { zerolease::jail::Netlink::connect()?.links().await })
            .expect("list links")
            .into_iter()
            .map(|(_, name)| name)
            .filter(|n| n.starts_with("zl-"))
            .collect();
        (tables, links)
    }
}

pub struct Guest {
    pub ns: Arc<Netns>,
    pub id: JailId,
    pub link: String,
}

impl Guest {
    /// The jail of this guest on its veth end, from the default pool.
    pub fn jail_config(&self, dns_port: Option<u16>) -> JailConfig {
        JailConfig {
            id: self.id.clone(),
            link: Link::Existing {
                name: self.link.clone(),
            },
            pool: DEFAULT_POOL.parse().expect("default pool"),
            ports: PORTS,
            dns_port,
        }
    }

    /// Addresses the guest end as a VM would configure itself.
    pub fn configure(&self, host: Ipv4Addr, guest: Ipv4Addr, prefix: u8) {
        let addr = format!("{guest}/{prefix}");
        self.ns.ip(["addr", "add", &addr, "dev", "eth0"]);
        self.ns.ip(["link", "set", "eth0", "up"]);
        self.ns
            .ip(["route", "add", "default", "via", &host.to_string()]);
    }

    /// Gives both ends of the link IPv6 addresses. The jail turns IPv6 off on
    /// the host end; this turns it back on, so that only the table stands
    /// between the guest and the host's IPv6 sockets.
    pub fn add_ipv6(&self, host: &Netns) {
        host.sysctl(&format!("net.ipv6.conf.{}.disable_ipv6", self.link), "0");
        host.ip([
            "-6",
            "addr",
            "add",
            "fd00:5a::1/64",
            "dev",
            &self.link,
            "nodad",
        ]);
        self.ns
            .ip(["-6", "addr", "add", "fd00:5a::2/64", "dev", "eth0", "nodad"]);
    }

    /// Adds `SPOOF` to the guest and a host route back to it through the
    /// guest's link, so only the jail can stop a spoofed connection.
    pub fn add_spoof_address(&self, host: &Netns) {
        self.ns
            .ip(["addr", "add", &format!("{SPOOF}/32"), "dev", "eth0"]);
        host.ip(["route", "add", &format!("{SPOOF}/32"), "dev", &self.link]);
    }
}

/// Tears a jail down inside its namespace, returning the result.
pub fn destroy(jail: &mut InNs<Jail>) -> Result<(), zerolease::jail::JailError> {
    jail.with(|j| block_here(j.destroy()))
}
