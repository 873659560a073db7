//! Special-purpose address classification and the configured allow list.
//!
//! **Invariant:** the proxy connects only to an address for which
//! [`check_address`] returned `Ok`. An address in any special-purpose range
//! (private, loopback, link-local, cloud metadata, CGNAT, benchmarking,
//! reserved, multicast, broadcast, documentation, IPv4-mapped, NAT64, ULA,
//! unspecified, ...) is refused unless an [`AllowedCidrs`] entry contains it.
//!
//! Pure: no I/O, no resolver. The table here is deliberately wider than the
//! IANA "not globally reachable" list where a range can smuggle an IPv4
//! address (6to4, IPv4-compatible, NAT64): the proxy never needs those.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use ipnet::IpNet;

/// Why an address is not an ordinary public unicast address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SpecialRange {
    /// `0.0.0.0`, `::`.
    Unspecified,
    /// `0.0.0.0/8` ("this network").
    ThisNetwork,
    /// `127.0.0.0/8`, `::1`.
    Loopback,
    /// RFC 1918: `10/8`, `172.16/12`, `192.168/16`.
    Private,
    /// `169.254.169.254` and `fd00:ec2::254`: cloud instance metadata.
    Metadata,
    /// `169.254/16`, `fe80::/10`, deprecated site-local `fec0::/10`.
    LinkLocal,
    /// `100.64.0.0/10` (RFC 6598 shared address space).
    Cgnat,
    /// `192.0.0.0/24` IETF protocol assignments, `2001::/23`.
    ProtocolAssignment,
    /// `198.18.0.0/15` (RFC 2544).
    Benchmarking,
    /// `192.0.2/24`, `198.51.100/24`, `203.0.113/24`, `2001:db8::/32`,
    /// `3fff::/20`.
    Documentation,
    /// `240.0.0.0/4` (except broadcast), `100::/64` discard-only.
    Reserved,
    /// `255.255.255.255`.
    Broadcast,
    /// `224.0.0.0/4`, `ff00::/8`.
    Multicast,
    /// `::ffff:0:0/96`.
    Ipv4Mapped,
    /// `::/96` (deprecated IPv4-compatible).
    Ipv4Compatible,
    /// `64:ff9b::/96`, `64:ff9b:1::/48`.
    Nat64,
    /// `2002::/16` (6to4), `192.88.99.0/24` (6to4 relay anycast).
    SixToFour,
    /// `fc00::/7`.
    UniqueLocal,
}

impl fmt::Display for SpecialRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            SpecialRange::Unspecified => "unspecified",
            SpecialRange::ThisNetwork => "this-network (0/8)",
            SpecialRange::Loopback => "loopback",
            SpecialRange::Private => "private (RFC 1918)",
            SpecialRange::Metadata => "cloud metadata",
            SpecialRange::LinkLocal => "link-local",
            SpecialRange::Cgnat => "shared address space (100.64/10)",
            SpecialRange::ProtocolAssignment => "IETF protocol assignment",
            SpecialRange::Benchmarking => "benchmarking (198.18/15)",
            SpecialRange::Documentation => "documentation",
            SpecialRange::Reserved => "reserved",
            SpecialRange::Broadcast => "broadcast",
            SpecialRange::Multicast => "multicast",
            SpecialRange::Ipv4Mapped => "IPv4-mapped IPv6",
            SpecialRange::Ipv4Compatible => "IPv4-compatible IPv6",
            SpecialRange::Nat64 => "NAT64",
            SpecialRange::SixToFour => "6to4",
            SpecialRange::UniqueLocal => "unique local IPv6",
        };
        f.write_str(s)
    }
}

/// The special-purpose range `ip` falls in, or `None` for an ordinary
/// public unicast address.
pub fn classify(ip: IpAddr) -> Option<SpecialRange> {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

fn classify_v4(ip: Ipv4Addr) -> Option<SpecialRange> {
    let o = ip.octets();
    let range = match o {
        [0, 0, 0, 0] => SpecialRange::Unspecified,
        [0, ..] => SpecialRange::ThisNetwork,
        [10, ..] => SpecialRange::Private,
        [100, b, ..] if (64..128).contains(&b) => SpecialRange::Cgnat,
        [127, ..] => SpecialRange::Loopback,
        [169, 254, 169, 254] => SpecialRange::Metadata,
        [169, 254, ..] => SpecialRange::LinkLocal,
        [172, b, ..] if (16..32).contains(&b) => SpecialRange::Private,
        [192, 0, 0, _] => SpecialRange::ProtocolAssignment,
        [192, 0, 2, _] => SpecialRange::Documentation,
        [192, 88, 99, _] => SpecialRange::SixToFour,
        [192, 168, ..] => SpecialRange::Private,
        [198, 18 | 19, ..] => SpecialRange::Benchmarking,
        [198, 51, 100, _] => SpecialRange::Documentation,
        [203, 0, 113, _] => SpecialRange::Documentation,
        [255, 255, 255, 255] => SpecialRange::Broadcast,
        [a, ..] if (224..240).contains(&a) => SpecialRange::Multicast,
        [a, ..] if a >= 240 => SpecialRange::Reserved,
        _ => return None,
    };
    Some(range)
}

fn classify_v6(ip: Ipv6Addr) -> Option<SpecialRange> {
    let s = ip.segments();
    let range = if ip.is_unspecified() {
        SpecialRange::Unspecified
    } else if ip.is_loopback() {
        SpecialRange::Loopback
    } else if s[..6] == [0, 0, 0, 0, 0, 0xffff] {
        SpecialRange::Ipv4Mapped
    } else if s[..6] == [0; 6] {
        SpecialRange::Ipv4Compatible
    } else if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] || s[..3] == [0x64, 0xff9b, 1] {
        SpecialRange::Nat64
    } else if s[..4] == [0x100, 0, 0, 0] {
        SpecialRange::Reserved
    } else if s[0] == 0x2001 && s[1] == 0x0db8 || s[0] & 0xfff0 == 0x3ff0 {
        SpecialRange::Documentation
    } else if s[0] == 0x2001 && s[1] < 0x200 {
        SpecialRange::ProtocolAssignment
    } else if s[0] == 0x2002 {
        SpecialRange::SixToFour
    } else if ip == Ipv6Addr::new(0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x254) {
        SpecialRange::Metadata
    } else if s[0] & 0xfe00 == 0xfc00 {
        SpecialRange::UniqueLocal
    } else if s[0] & 0xffc0 == 0xfe80 || s[0] & 0xffc0 == 0xfec0 {
        SpecialRange::LinkLocal
    } else if s[0] & 0xff00 == 0xff00 {
        SpecialRange::Multicast
    } else {
        return None;
    };
    Some(range)
}

/// Networks the operator explicitly permits even though they are special
/// (a private mirror, or `127.0.0.0/8` in tests). Empty by default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowedCidrs(Vec<IpNet>);

/// A CIDR in the allow list could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{input}` is not a CIDR network (expected e.g. `10.1.0.0/16`)")]
pub struct CidrError {
    pub input: String,
    #[source]
    source: ipnet::AddrParseError,
}

impl AllowedCidrs {
    pub fn new(nets: Vec<IpNet>) -> Self {
        AllowedCidrs(nets)
    }

    /// Parses each string as `addr/prefix`.
    pub fn parse<S: AsRef<str>>(items: &[S]) -> Result<Self, CidrError> {
        items
            .iter()
            .map(|s| {
                IpNet::from_str(s.as_ref()).map_err(|source| CidrError {
                    input: s.as_ref().to_owned(),
                    source,
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .map(AllowedCidrs)
    }

    pub fn permits(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|net| net.contains(&ip))
    }
}

/// `Ok` when the proxy may connect to `ip`: public, or special but inside an
/// allowed network.
pub fn check_address(ip: IpAddr, allowed: &AllowedCidrs) -> Result<(), SpecialRange> {
    match classify(ip) {
        None => Ok(()),
        Some(_) if allowed.permits(ip) => Ok(()),
        Some(range) => Err(range),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn classification_table() {
        use SpecialRange::*;
        let table: &[(&str, Option<SpecialRange>)] = &[
            ("0.0.0.0", Some(Unspecified)),
            ("0.1.2.3", Some(ThisNetwork)),
            ("10.0.0.1", Some(Private)),
            ("10.255.255.255", Some(Private)),
            ("11.0.0.1", None),
            ("100.63.255.255", None),
            ("100.64.0.0", Some(Cgnat)),
            ("100.127.255.255", Some(Cgnat)),
            ("100.128.0.0", None),
            ("127.0.0.1", Some(Loopback)),
            ("127.255.0.1", Some(Loopback)),
            ("169.254.169.254", Some(Metadata)),
            ("169.254.0.1", Some(LinkLocal)),
            ("172.15.255.255", None),
            ("172.16.0.1", Some(Private)),
            ("172.31.255.255", Some(Private)),
            ("172.32.0.0", None),
            ("192.0.0.8", Some(ProtocolAssignment)),
            ("192.0.2.1", Some(Documentation)),
            ("192.88.99.1", Some(SixToFour)),
            ("192.168.1.1", Some(Private)),
            ("192.169.0.1", None),
            ("198.17.255.255", None),
            ("198.18.0.1", Some(Benchmarking)),
            ("198.19.255.255", Some(Benchmarking)),
            ("198.20.0.0", None),
            ("198.51.100.7", Some(Documentation)),
            ("203.0.113.9", Some(Documentation)),
            ("224.0.0.1", Some(Multicast)),
            ("239.255.255.255", Some(Multicast)),
            ("240.0.0.1", Some(Reserved)),
            ("255.255.255.254", Some(Reserved)),
            ("255.255.255.255", Some(Broadcast)),
            ("1.1.1.1", None),
            ("93.184.216.34", None),
            ("::", Some(Unspecified)),
            ("::1", Some(Loopback)),
            ("::ffff:127.0.0.1", Some(Ipv4Mapped)),
            ("::ffff:8.8.8.8", Some(Ipv4Mapped)),
            ("::127.0.0.1", Some(Ipv4Compatible)),
            ("64:ff9b::a00:1", Some(Nat64)),
            ("64:ff9b:1::1", Some(Nat64)),
            ("100::1", Some(Reserved)),
            ("2001:db8::1", Some(Documentation)),
            ("3fff::1", Some(Documentation)),
            ("2001::1", Some(ProtocolAssignment)),
            ("2002:a00:1::1", Some(SixToFour)),
            ("fd00:ec2::254", Some(Metadata)),
            ("fd00:ec2::253", Some(UniqueLocal)),
            ("fc00::1", Some(UniqueLocal)),
            ("fdff:ffff::1", Some(UniqueLocal)),
            ("fe80::1", Some(LinkLocal)),
            ("febf::1", Some(LinkLocal)),
            ("fec0::1", Some(LinkLocal)),
            ("ff02::1", Some(Multicast)),
            ("2606:4700::1111", None),
            ("2a00:1450::1", None),
        ];
        for (addr, want) in table {
            assert_eq!(classify(ip(addr)), *want, "{addr}");
        }
    }

    #[test]
    fn allow_list_permits_only_its_networks() {
        let allowed = AllowedCidrs::parse(&["127.0.0.0/8", "fd12::/16"]).unwrap();
        assert_eq!(check_address(ip("127.0.0.1"), &allowed), Ok(()));
        assert_eq!(check_address(ip("fd12::5"), &allowed), Ok(()));
        assert_eq!(
            check_address(ip("10.0.0.1"), &allowed),
            Err(SpecialRange::Private)
        );
        // A mapped form of an allowed IPv4 network is not the same network.
        assert_eq!(
            check_address(ip("::ffff:127.0.0.1"), &allowed),
            Err(SpecialRange::Ipv4Mapped)
        );
        assert_eq!(
            check_address(ip("8.8.8.8"), &AllowedCidrs::default()),
            Ok(())
        );
        assert_eq!(
            check_address(ip("169.254.169.254"), &AllowedCidrs::default()),
            Err(SpecialRange::Metadata)
        );
    }

    #[test]
    fn bad_cidr_is_an_error() {
        for bad in ["", "10.0.0.0", "10.0.0.0/33", "example.com/8", "::/129"] {
            assert!(AllowedCidrs::parse(&[bad]).is_err(), "{bad}");
        }
    }
}
