//! Guest configuration from the kernel command line.
//!
//! The supervisor boots the guest with parameters like
//! `zl.ip=10.213.0.2/30 zl.gw=10.213.0.1 zl.port=org.zerolease.control`,
//! and `zl.root=zl-root` (the virtio-blk serial of a read-only root disk)
//! for images that have one.
//! [`parse`] is a pure function from the command line text to a validated
//! [`GuestConfig`].
//!
//! **Invariants:** every `zl.*` parameter is known, given at most once and
//! valid, or parsing fails; other parameters (`console=…`, quoted values,
//! anything after `--`) are ignored. The address and gateway share a subnet
//! and are usable host addresses in it.

use std::net::Ipv4Addr;

/// The control port's name when `zl.port` is not given.
pub const DEFAULT_CONTROL_PORT: &str = "org.zerolease.control";

const KEY_IP: &str = "zl.ip";
const KEY_GW: &str = "zl.gw";
const KEY_PORT: &str = "zl.port";
const KEY_ROOT: &str = "zl.root";

/// The longest virtio-blk serial (`VIRTIO_BLK_ID_BYTES`).
pub const MAX_DISK_SERIAL: usize = 20;

/// What the guest learns from the kernel command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestConfig {
    /// The guest's address on its link to the host.
    pub address: Ipv4Addr,
    /// Prefix length of that link.
    pub prefix_len: u8,
    /// The host's side of the link (where the proxy listens).
    pub gateway: Ipv4Addr,
    /// The name of the virtio-serial control port.
    pub control_port: String,
    /// The serial of the virtio-blk disk holding a read-only root file
    /// system to switch to; `None` keeps the initramfs as the root.
    pub root_disk: Option<String>,
}

/// Why the kernel command line is not a usable guest configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CmdlineError {
    /// A required parameter is absent.
    #[error("kernel command line lacks `{key}=`")]
    Missing {
        /// The parameter.
        key: &'static str,
    },
    /// A parameter is given twice.
    #[error("kernel command line gives `{key}` more than once")]
    Duplicate {
        /// The parameter.
        key: String,
    },
    /// A `zl.` parameter this agent does not know (host and guest versions
    /// are out of step).
    #[error("unknown zerolease parameter `{key}` on the kernel command line")]
    Unknown {
        /// The parameter.
        key: String,
    },
    /// A parameter's value is malformed.
    #[error("`{key}={value}` on the kernel command line: {reason}")]
    Invalid {
        /// The parameter.
        key: &'static str,
        /// Its value.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// Splits a kernel command line into parameters the way the kernel does:
/// on whitespace outside double quotes, stopping at `--` (what follows is
/// for init's argv). Quotes are removed.
fn parameters(cmdline: &str) -> Vec<String> {
    let mut params = Vec::new();
    let mut current = String::new();
    let mut in_quotes = false;
    let mut started = false;
    for c in cmdline.chars() {
        match c {
            '"' => {
                in_quotes = !in_quotes;
                started = true;
            }
            c if c.is_whitespace() && !in_quotes => {
                if started {
                    if current == "--" {
                        return params;
                    }
                    params.push(std::mem::take(&mut current));
                    started = false;
                }
            }
            c => {
                current.push(c);
                started = true;
            }
        }
    }
    if started && current != "--" {
        params.push(current);
    }
    params
}

/// Parses and validates the guest configuration from `cmdline` (the
/// contents of `/proc/cmdline`).
pub fn parse(cmdline: &str) -> Result<GuestConfig, CmdlineError> {
    let mut ip = None;
    let mut gw = None;
    let mut port = None;
    let mut root = None;
    for param in parameters(cmdline) {
        let (key, value) = param.split_once('=').unwrap_or((&param, ""));
        if !key.starts_with("zl.") {
            continue;
        }
        let slot = match key {
            KEY_IP => &mut ip,
            KEY_GW => &mut gw,
            KEY_PORT => &mut port,
            KEY_ROOT => &mut root,
            _ => {
                return Err(CmdlineError::Unknown {
                    key: key.to_owned(),
                });
            }
        };
        if slot.replace(value.to_owned()).is_some() {
            return Err(CmdlineError::Duplicate {
                key: key.to_owned(),
            });
        }
    }

    let ip = ip.ok_or(CmdlineError::Missing { key: KEY_IP })?;
    let gw = gw.ok_or(CmdlineError::Missing { key: KEY_GW })?;
    let invalid = |key, value: &str, reason| CmdlineError::Invalid {
        key,
        value: value.to_owned(),
        reason,
    };

    let (address, prefix) = ip
        .split_once('/')
        .ok_or_else(|| invalid(KEY_IP, &ip, "expected ADDRESS/PREFIX"))?;
    let address: Ipv4Addr = address
        .parse()
        .map_err(|_| invalid(KEY_IP, &ip, "not an IPv4 address"))?;
    let prefix_len: u8 = prefix
        .parse()
        .ok()
        .filter(|p| (1..=30).contains(p))
        .ok_or_else(|| invalid(KEY_IP, &ip, "prefix length must be 1-30"))?;
    let gateway: Ipv4Addr = gw
        .parse()
        .map_err(|_| invalid(KEY_GW, &gw, "not an IPv4 address"))?;

    if !is_usable_host(address, prefix_len) {
        return Err(invalid(
            KEY_IP,
            &ip,
            "not a usable host address in its subnet",
        ));
    }
    if !is_usable_host(gateway, prefix_len) || !same_subnet(address, gateway, prefix_len) {
        return Err(invalid(
            KEY_GW,
            &gw,
            "not a usable host address in zl.ip's subnet",
        ));
    }
    if address == gateway {
        return Err(invalid(KEY_GW, &gw, "equals the guest's own address"));
    }

    let control_port = port.unwrap_or_else(|| DEFAULT_CONTROL_PORT.to_owned());
    if !is_valid_port_name(&control_port) {
        return Err(invalid(
            KEY_PORT,
            &control_port,
            "port names are 1-255 characters of [A-Za-z0-9._-]",
        ));
    }

    if let Some(serial) = &root
        && !is_valid_disk_serial(serial)
    {
        return Err(invalid(
            KEY_ROOT,
            serial,
            "disk serials are 1-20 characters of [A-Za-z0-9._-]",
        ));
    }

    Ok(GuestConfig {
        address,
        prefix_len,
        gateway,
        control_port,
        root_disk: root,
    })
}

fn mask(prefix_len: u8) -> u32 {
    u32::MAX << (32 - u32::from(prefix_len))
}

fn same_subnet(a: Ipv4Addr, b: Ipv4Addr, prefix_len: u8) -> bool {
    u32::from(a) & mask(prefix_len) == u32::from(b) & mask(prefix_len)
}

/// Not the subnet's network or broadcast address, and an ordinary unicast
/// address (not unspecified, loopback, multicast or broadcast).
fn is_usable_host(addr: Ipv4Addr, prefix_len: u8) -> bool {
    let host_bits = u32::from(addr) & !mask(prefix_len);
    host_bits != 0
        && host_bits != !mask(prefix_len)
        && !addr.is_unspecified()
        && !addr.is_loopback()
        && !addr.is_multicast()
        && !addr.is_broadcast()
}

/// Whether `name` can be a virtio-serial port name as the supervisor sets it.
pub fn is_valid_port_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Whether `serial` can be a virtio-blk serial as the supervisor sets it.
pub fn is_valid_disk_serial(serial: &str) -> bool {
    !serial.is_empty() && serial.len() <= MAX_DISK_SERIAL && is_valid_port_name(serial)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(address: [u8; 4], prefix_len: u8, gateway: [u8; 4], port: &str) -> GuestConfig {
        GuestConfig {
            address: address.into(),
            prefix_len,
            gateway: gateway.into(),
            control_port: port.to_owned(),
            root_disk: None,
        }
    }

    #[test]
    fn accepted() {
        let cases = [
            (
                "zl.ip=10.213.0.2/30 zl.gw=10.213.0.1 zl.port=org.zerolease.control",
                config(
                    [10, 213, 0, 2],
                    30,
                    [10, 213, 0, 1],
                    "org.zerolease.control",
                ),
            ),
            (
                "console=ttyS0 quiet zl.gw=10.213.0.1 zl.ip=10.213.0.2/30 panic=-1",
                config([10, 213, 0, 2], 30, [10, 213, 0, 1], DEFAULT_CONTROL_PORT),
            ),
            (
                "  zl.ip=192.168.7.10/24\tzl.gw=192.168.7.1\nzl.port=ctl-2_x \n",
                config([192, 168, 7, 10], 24, [192, 168, 7, 1], "ctl-2_x"),
            ),
            // Quoted values of other parameters may contain spaces and even
            // text that looks like a zl parameter.
            (
                "dyndbg=\"file x zl.ip=1.1.1.1/8 +p\" zl.ip=10.0.0.2/30 zl.gw=10.0.0.1",
                config([10, 0, 0, 2], 30, [10, 0, 0, 1], DEFAULT_CONTROL_PORT),
            ),
            // A quoted zl value is unquoted, as the kernel does.
            (
                "zl.ip=\"10.0.0.2/30\" zl.gw=10.0.0.1",
                config([10, 0, 0, 2], 30, [10, 0, 0, 1], DEFAULT_CONTROL_PORT),
            ),
            // After `--` everything belongs to init.
            (
                "zl.ip=10.0.0.2/30 zl.gw=10.0.0.1 -- zl.ip=9.9.9.9/8 zl.bogus",
                config([10, 0, 0, 2], 30, [10, 0, 0, 1], DEFAULT_CONTROL_PORT),
            ),
            (
                "zl.ip=10.0.0.2/8 zl.gw=10.255.255.254",
                config([10, 0, 0, 2], 8, [10, 255, 255, 254], DEFAULT_CONTROL_PORT),
            ),
        ];
        for (cmdline, expected) in cases {
            assert_eq!(parse(cmdline), Ok(expected), "{cmdline:?}");
        }
    }

    #[test]
    fn root_disk() {
        let base = "zl.ip=10.0.0.2/30 zl.gw=10.0.0.1";
        let with = |serial: &str| {
            let mut c = config([10, 0, 0, 2], 30, [10, 0, 0, 1], DEFAULT_CONTROL_PORT);
            c.root_disk = Some(serial.to_owned());
            c
        };
        let cases = [
            (
                "",
                Ok(config(
                    [10, 0, 0, 2],
                    30,
                    [10, 0, 0, 1],
                    DEFAULT_CONTROL_PORT,
                )),
            ),
            (" zl.root=zl-root", Ok(with("zl-root"))),
            (" zl.root=A.b_c-1", Ok(with("A.b_c-1"))),
            (
                " zl.root=12345678901234567890",
                Ok(with("12345678901234567890")),
            ),
            (" zl.root=\"zl-root\"", Ok(with("zl-root"))),
        ];
        for (extra, expected) in cases {
            let line = format!("{base}{extra}");
            assert_eq!(parse(&line), expected, "{line:?}");
        }
        for bad in [
            " zl.root=",
            " zl.root",
            " zl.root=/dev/vda",
            " zl.root=../vda",
            " zl.root=123456789012345678901",
            " zl.root=\"a b\"",
            " zl.root=a,b",
        ] {
            let line = format!("{base}{bad}");
            assert!(
                matches!(
                    parse(&line),
                    Err(CmdlineError::Invalid { key: KEY_ROOT, .. })
                ),
                "{line:?}"
            );
        }
        let line = format!("{base} zl.root=a zl.root=b");
        assert!(matches!(parse(&line), Err(CmdlineError::Duplicate { .. })));
    }

    #[test]
    fn rejected() {
        let cases: &[(&str, &str)] = &[
            ("", "missing zl.ip"),
            ("zl.gw=10.0.0.1", "missing zl.ip"),
            ("zl.ip=10.0.0.2/30", "missing zl.gw"),
            (
                "zl.ip=10.0.0.2/30 zl.gw=10.0.0.1 zl.ip=10.0.0.2/30",
                "duplicate",
            ),
            (
                "zl.ip=10.0.0.2/30 zl.gw=10.0.0.1 zl.port=a zl.port=b",
                "duplicate",
            ),
            ("zl.ip=10.0.0.2/30 zl.gw=10.0.0.1 zl.token=abc", "unknown"),
            ("zl.ip=10.0.0.2/30 zl.gw=10.0.0.1 zl.", "unknown"),
            ("zl.ip=10.0.0.2/30 zl.gw=10.0.0.1 zl.IP=1", "unknown"),
            ("zl.ip=10.0.0.2 zl.gw=10.0.0.1", "invalid zl.ip"),
            ("zl.ip=10.0.0.2/ zl.gw=10.0.0.1", "invalid zl.ip"),
            ("zl.ip=10.0.0.2/31 zl.gw=10.0.0.3", "invalid zl.ip"),
            ("zl.ip=10.0.0.2/0 zl.gw=10.0.0.1", "invalid zl.ip"),
            ("zl.ip=10.0.0.2/33 zl.gw=10.0.0.1", "invalid zl.ip"),
            ("zl.ip=10.0.0.2/-1 zl.gw=10.0.0.1", "invalid zl.ip"),
            ("zl.ip=10.0.0.256/30 zl.gw=10.0.0.1", "invalid zl.ip"),
            ("zl.ip=::1/64 zl.gw=10.0.0.1", "invalid zl.ip"),
            ("zl.ip=10.0.0.0/30 zl.gw=10.0.0.1", "invalid zl.ip"),
            ("zl.ip=10.0.0.3/30 zl.gw=10.0.0.1", "invalid zl.ip"),
            ("zl.ip=127.0.0.2/30 zl.gw=127.0.0.1", "invalid zl.ip"),
            ("zl.ip=224.0.0.2/30 zl.gw=224.0.0.1", "invalid zl.ip"),
            ("zl.ip=10.0.0.2/30 zl.gw=10.0.0.5", "invalid zl.gw"),
            ("zl.ip=10.0.0.2/30 zl.gw=10.0.0.3", "invalid zl.gw"),
            ("zl.ip=10.0.0.2/30 zl.gw=10.0.0.2", "invalid zl.gw"),
            ("zl.ip=10.0.0.2/30 zl.gw=gateway", "invalid zl.gw"),
            ("zl.ip=10.0.0.2/30 zl.gw=", "invalid zl.gw"),
            (
                "zl.ip=10.0.0.2/30 zl.gw=10.0.0.1 zl.port=",
                "invalid zl.port",
            ),
            (
                "zl.ip=10.0.0.2/30 zl.gw=10.0.0.1 zl.port=../../x",
                "invalid zl.port",
            ),
            (
                "zl.ip=10.0.0.2/30 zl.gw=10.0.0.1 zl.port=\"a b\"",
                "invalid zl.port",
            ),
        ];
        for (cmdline, expected) in cases {
            let outcome = match parse(cmdline) {
                Ok(config) => format!("accepted {config:?}"),
                Err(CmdlineError::Missing { key }) => format!("missing {key}"),
                Err(CmdlineError::Duplicate { .. }) => "duplicate".to_owned(),
                Err(CmdlineError::Unknown { .. }) => "unknown".to_owned(),
                Err(CmdlineError::Invalid { key, .. }) => format!("invalid {key}"),
            };
            assert_eq!(&outcome, expected, "{cmdline:?}");
        }
    }

    #[test]
    fn splits_like_the_kernel() {
        let cases: &[(&str, &[&str])] = &[
            ("", &[]),
            ("a b  c", &["a", "b", "c"]),
            ("k=\"x y\" z", &["k=x y", "z"]),
            ("\"unterminated quote", &["unterminated quote"]),
            ("a -- b c", &["a"]),
            ("a --x b", &["a", "--x", "b"]),
            ("k=\"\"", &["k="]),
        ];
        for (cmdline, expected) in cases {
            assert_eq!(parameters(cmdline), *expected, "{cmdline:?}");
        }
    }
}
