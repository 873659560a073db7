//! Address pool arithmetic: which /30 a new session gets, and whether a pool
//! collides with a route the namespace already has.
//!
//! Pure functions over plain data; the caller reads routes and addresses from
//! the kernel (see `netlink.rs`) and passes them in.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use thiserror::Error;

/// The pool used when the user does not pass `--pool`.
pub const DEFAULT_POOL: &str = "10.213.0.0/16";

/// An IPv4 network: an address whose host bits are zero, and a prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Ipv4Net {
    network: Ipv4Addr,
    prefix: u8,
}

/// Why a text is not an IPv4 network.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum NetParseError {
    #[error("`{input}` is not of the form ADDRESS/PREFIX (for example 10.213.0.0/16)")]
    Shape { input: String },
    #[error("`{input}`: the prefix length must be a number from 0 to 32")]
    Prefix { input: String },
    #[error("`{input}`: the address has bits set beyond the prefix; did you mean {suggest}?")]
    HostBits { input: String, suggest: Ipv4Net },
}

impl Ipv4Net {
    /// A network from an address and a prefix; host bits are cleared.
    ///
    /// # Panics
    /// Never for `prefix <= 32`; a larger prefix is clamped to 32.
    pub fn new_truncating(addr: Ipv4Addr, prefix: u8) -> Self {
        let prefix = prefix.min(32);
        Self {
            network: Ipv4Addr::from(u32::from(addr) & mask(prefix)),
            prefix,
        }
    }

    pub fn network(self) -> Ipv4Addr {
        self.network
    }

    pub fn prefix(self) -> u8 {
        self.prefix
    }

    /// The last address of the network.
    pub fn last(self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) | !mask(self.prefix))
    }

    pub fn contains(self, addr: Ipv4Addr) -> bool {
        u32::from(addr) & mask(self.prefix) == u32::from(self.network)
    }

    /// Whether the two networks share at least one address. For prefixes that
    /// is the case exactly when one contains the other's first address.
    pub fn overlaps(self, other: Ipv4Net) -> bool {
        self.contains(other.network) || other.contains(self.network)
    }
}

fn mask(prefix: u8) -> u32 {
    match prefix {
        0 => 0,
        p => u32::MAX << (32 - u32::from(p.min(32))),
    }
}

impl FromStr for Ipv4Net {
    type Err = NetParseError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let shape = || NetParseError::Shape {
            input: input.to_owned(),
        };
        let (addr, prefix) = input.trim().split_once('/').ok_or_else(shape)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| shape())?;
        let prefix: u8 =
            prefix
                .parse()
                .ok()
                .filter(|p| *p <= 32)
                .ok_or_else(|| NetParseError::Prefix {
                    input: input.to_owned(),
                })?;
        let net = Self::new_truncating(addr, prefix);
        if net.network != addr {
            return Err(NetParseError::HostBits {
                input: input.to_owned(),
                suggest: net,
            });
        }
        Ok(net)
    }
}

impl fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// One session's point-to-point link: a /30 whose first usable address is the
/// host side and whose second is the guest side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkNet {
    net: Ipv4Net,
}

impl LinkNet {
    /// The /30 that contains `addr`.
    pub fn containing(addr: Ipv4Addr) -> Self {
        Self {
            net: Ipv4Net::new_truncating(addr, 30),
        }
    }

    pub fn net(self) -> Ipv4Net {
        self.net
    }

    pub fn host(self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.net.network) + 1)
    }

    pub fn guest(self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.net.network) + 2)
    }
}

/// A route of the namespace, as far as pool checks care.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteInfo {
    pub destination: Ipv4Net,
    /// The output interface, if the route has one.
    pub device: Option<String>,
}

impl fmt::Display for RouteInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.device {
            Some(dev) => write!(f, "{} dev {dev}", self.destination),
            None => write!(f, "{}", self.destination),
        }
    }
}

/// Why no /30 could be handed out.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PoolError {
    #[error("address pool {pool} overlaps the route {route}; choose another pool with --pool")]
    Overlap { pool: Ipv4Net, route: RouteInfo },
    #[error(
        "address pool {pool} is smaller than one /30; choose a pool of /30 or larger with --pool"
    )]
    TooSmall { pool: Ipv4Net },
    #[error(
        "address pool {pool} has no free /30 left ({in_use} addresses in use); \
         end a session or choose a larger pool with --pool"
    )]
    Exhausted { pool: Ipv4Net, in_use: usize },
}

/// Refuses a pool that overlaps a route which zerolease did not create.
///
/// Routes through `zl-*` interfaces are our own sessions' links and are
/// expected inside the pool; a default route (prefix 0) overlaps everything
/// and says nothing about local addressing, so both are ignored.
pub fn check_pool(pool: Ipv4Net, routes: &[RouteInfo]) -> Result<(), PoolError> {
    if pool.prefix > 30 {
        return Err(PoolError::TooSmall { pool });
    }
    let foreign = routes.iter().find(|route| {
        route.destination.prefix > 0
            && !route
                .device
                .as_deref()
                .is_some_and(|d| d.starts_with(super::LINK_PREFIX))
            && route.destination.overlaps(pool)
    });
    match foreign {
        Some(route) => Err(PoolError::Overlap {
            pool,
            route: route.clone(),
        }),
        None => Ok(()),
    }
}

/// The lowest /30 of `pool` that shares no address with anything in `in_use`
/// (addresses or networks already present in the namespace).
pub fn next_free(pool: Ipv4Net, in_use: &[Ipv4Net]) -> Result<LinkNet, PoolError> {
    if pool.prefix > 30 {
        return Err(PoolError::TooSmall { pool });
    }
    let first = u64::from(u32::from(pool.network));
    let end = u64::from(u32::from(pool.last())) + 1;
    let mut candidate = first;
    while candidate < end {
        // `candidate < end <= 2^32` so the conversion cannot truncate.
        let block = Ipv4Net::new_truncating(Ipv4Addr::from(candidate as u32), 30);
        match in_use.iter().find(|used| used.overlaps(block)) {
            None => return Ok(LinkNet { net: block }),
            // Skip past the whole used network at once: a big route inside the
            // pool must not cost one iteration per /30.
            Some(used) => {
                let after_used = u64::from(u32::from(used.last())) + 1;
                let after_block = candidate + 4;
                candidate = after_used.max(after_block);
                // Realign to a /30 boundary.
                candidate = (candidate + 3) & !3;
            }
        }
    }
    Err(PoolError::Exhausted {
        pool,
        in_use: in_use.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn route(dst: &str, dev: Option<&str>) -> RouteInfo {
        RouteInfo {
            destination: net(dst),
            device: dev.map(str::to_owned),
        }
    }

    #[test]
    fn parse_table() {
        let ok: &[(&str, &str)] = &[
            ("10.213.0.0/16", "10.213.0.0/16"),
            (" 10.0.0.0/8 ", "10.0.0.0/8"),
            ("0.0.0.0/0", "0.0.0.0/0"),
            ("192.0.2.7/32", "192.0.2.7/32"),
        ];
        for (input, want) in ok {
            assert_eq!(net(input).to_string(), *want, "{input}");
        }
        let bad = [
            "10.213.0.0",
            "10.213.0.0/",
            "10.213.0.0/33",
            "10.213.0.0/-1",
            "10.213.0.0/1x",
            "10.213.0/16",
            "::1/64",
            "/16",
            "",
            "10.213.0.1/16",
            "10.213.0.0/16/2",
        ];
        for input in bad {
            assert!(input.parse::<Ipv4Net>().is_err(), "{input} parsed");
        }
        assert_eq!(
            "10.213.0.1/16".parse::<Ipv4Net>().unwrap_err().to_string(),
            "`10.213.0.1/16`: the address has bits set beyond the prefix; did you mean 10.213.0.0/16?"
        );
    }

    #[test]
    fn overlap_table() {
        let cases = [
            ("10.213.0.0/16", "10.213.0.0/16", true),
            ("10.213.0.0/16", "10.213.4.0/24", true),
            ("10.213.4.0/24", "10.213.0.0/16", true),
            ("10.213.0.0/16", "10.0.0.0/8", true),
            ("10.213.0.0/16", "10.214.0.0/16", false),
            ("10.213.0.0/16", "10.212.255.255/32", false),
            ("10.213.0.0/16", "10.213.255.255/32", true),
            ("0.0.0.0/0", "192.0.2.0/24", true),
        ];
        for (a, b, want) in cases {
            assert_eq!(net(a).overlaps(net(b)), want, "{a} vs {b}");
        }
    }

    #[test]
    fn check_pool_table() {
        let pool = net("10.213.0.0/16");
        let cases: Vec<(Vec<RouteInfo>, Option<&str>)> = vec![
            (vec![], None),
            // The default route overlaps everything and is ignored.
            (vec![route("0.0.0.0/0", Some("eth0"))], None),
            (vec![route("192.168.1.0/24", Some("eth0"))], None),
            // Our own session links live inside the pool.
            (vec![route("10.213.0.0/30", Some("zl-abc"))], None),
            (
                vec![route("10.213.0.0/16", Some("eth0"))],
                Some("10.213.0.0/16 dev eth0"),
            ),
            // A wider route that swallows the pool.
            (
                vec![route("10.0.0.0/8", Some("eth1"))],
                Some("10.0.0.0/8 dev eth1"),
            ),
            // A host route inside the pool, without device (e.g. blackhole).
            (vec![route("10.213.9.9/32", None)], Some("10.213.9.9/32")),
            // A look-alike prefix is not ours.
            (
                vec![route("10.213.0.4/30", Some("zlx-0"))],
                Some("10.213.0.4/30 dev zlx-0"),
            ),
        ];
        for (routes, want) in cases {
            match (check_pool(pool, &routes), want) {
                (Ok(()), None) => {}
                (Err(PoolError::Overlap { route, .. }), Some(want)) => {
                    assert_eq!(route.to_string(), want)
                }
                (got, want) => panic!("{routes:?}: got {got:?}, want {want:?}"),
            }
        }
        assert_eq!(
            check_pool(pool, &[route("10.213.0.0/16", Some("eth0"))])
                .unwrap_err()
                .to_string(),
            "address pool 10.213.0.0/16 overlaps the route 10.213.0.0/16 dev eth0; \
             choose another pool with --pool"
        );
        assert_eq!(
            check_pool(net("10.213.0.0/31"), &[]),
            Err(PoolError::TooSmall {
                pool: net("10.213.0.0/31")
            })
        );
    }

    #[test]
    fn next_free_table() {
        let pool = net("10.213.0.0/16");
        let cases: &[(&[&str], &str)] = &[
            (&[], "10.213.0.0/30"),
            (&["10.213.0.0/30"], "10.213.0.4/30"),
            // A single address marks its whole /30 as taken.
            (&["10.213.0.2/32"], "10.213.0.4/30"),
            (&["10.213.0.0/30", "10.213.0.8/30"], "10.213.0.4/30"),
            (&["10.213.0.0/30", "10.213.0.4/30"], "10.213.0.8/30"),
            // Addresses outside the pool do not matter.
            (&["10.212.255.252/30", "192.0.2.1/32"], "10.213.0.0/30"),
            // A large network inside the pool is skipped in one step.
            (&["10.213.0.0/17"], "10.213.128.0/30"),
            (&["10.213.0.0/24", "10.213.1.0/30"], "10.213.1.4/30"),
        ];
        for (used, want) in cases {
            let used: Vec<Ipv4Net> = used.iter().map(|s| net(s)).collect();
            let got = next_free(pool, &used).unwrap();
            assert_eq!(got.net().to_string(), *want, "{used:?}");
        }
        let got = next_free(pool, &[]).unwrap();
        assert_eq!(got.host(), Ipv4Addr::new(10, 213, 0, 1));
        assert_eq!(got.guest(), Ipv4Addr::new(10, 213, 0, 2));
    }

    #[test]
    fn next_free_exhaustion_and_edges() {
        // A /30 pool has exactly one block.
        let tiny = net("10.213.0.0/30");
        assert_eq!(next_free(tiny, &[]).unwrap().net(), tiny);
        assert_eq!(
            next_free(tiny, &[net("10.213.0.1/32")]),
            Err(PoolError::Exhausted {
                pool: tiny,
                in_use: 1
            })
        );
        // A covering route exhausts the pool.
        let pool = net("10.213.0.0/16");
        assert!(matches!(
            next_free(pool, &[net("0.0.0.0/0")]),
            Err(PoolError::Exhausted { .. })
        ));
        // The very top of the address space: no overflow.
        let top = net("255.255.255.0/24");
        assert_eq!(
            next_free(top, &[net("255.255.255.0/25"), net("255.255.255.128/26")])
                .unwrap()
                .net()
                .to_string(),
            "255.255.255.192/30"
        );
        assert!(next_free(top, &[net("255.255.255.0/24")]).is_err());
        assert_eq!(
            next_free(net("10.0.0.0/31"), &[]),
            Err(PoolError::TooSmall {
                pool: net("10.0.0.0/31")
            })
        );
        // A whole /8 almost full, with the free block at the end: terminates fast.
        let big = net("10.0.0.0/8");
        let got = next_free(
            big,
            &[
                net("10.0.0.0/9"),
                net("10.128.0.0/10"),
                net("10.192.0.0/11"),
            ],
        );
        assert_eq!(got.unwrap().net().to_string(), "10.224.0.0/30");
    }
}
