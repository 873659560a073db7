//! Links, addresses and routes through rtnetlink.
//!
//! PRIVILEGED (changes need CAP_NET_ADMIN). A netlink socket belongs to the
//! network namespace of the thread that opened it, so every operation opens
//! its own connection: the namespace acted on is always the caller's.

use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::LinkAttribute;
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteHeader, RouteType};
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};
use thiserror::Error;
use tokio::task::JoinHandle;

use super::pool::{Ipv4Net, RouteInfo};

const ENODEV: i32 = 19;
const EEXIST: i32 = 17;

/// A netlink request that failed.
#[derive(Debug, Error)]
pub enum NetlinkError {
    #[error("cannot open a netlink socket")]
    Connect(#[source] std::io::Error),
    #[error("{what} failed")]
    Request {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("there is no network interface named `{name}`")]
    NoSuchLink { name: String },
    #[error("cannot turn IPv6 off on `{name}` ({path})")]
    Sysctl {
        name: String,
        path: String,
        #[source]
        source: std::io::Error,
    },
}

fn errno(err: &rtnetlink::Error) -> Option<i32> {
    match err {
        rtnetlink::Error::NetlinkError(msg) => Some(-msg.raw_code()),
        _ => None,
    }
}

/// One connection to the kernel's routing netlink, in the caller's namespace.
pub struct Netlink {
    handle: Handle,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for Netlink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Netlink").finish_non_exhaustive()
    }
}

impl Drop for Netlink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Netlink {
    /// Opens the socket now, on this thread (hence in its namespace).
    /// Needs a tokio runtime.
    pub fn connect() -> Result<Self, NetlinkError> {
        let (connection, handle, _) = rtnetlink::new_connection().map_err(NetlinkError::Connect)?;
        let task = tokio::spawn(connection);
        Ok(Self { handle, task })
    }

    fn request(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetlinkError {
        let what = what.into();
        move |source| NetlinkError::Request { what, source }
    }

    /// The index of the interface `name`, if it exists.
    pub async fn link_index(&self, name: &str) -> Result<Option<u32>, NetlinkError> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_owned())
            .execute();
        match links.try_next().await {
            Ok(Some(link)) => Ok(Some(link.header.index)),
            Ok(None) => Ok(None),
            Err(e) if errno(&e) == Some(ENODEV) => Ok(None),
            Err(e) => Err(Self::request(format!("looking up interface `{name}`"))(e)),
        }
    }

    /// Every interface, as (index, name).
    pub async fn links(&self) -> Result<Vec<(u32, String)>, NetlinkError> {
        let mut out = Vec::new();
        let mut links = self.handle.link().get().execute();
        while let Some(link) = links
            .try_next()
            .await
            .map_err(Self::request("listing interfaces"))?
        {
            let name = link.attributes.iter().find_map(|a| match a {
                LinkAttribute::IfName(n) => Some(n.clone()),
                _ => None,
            });
            if let Some(name) = name {
                out.push((link.header.index, name));
            }
        }
        Ok(out)
    }

    /// Deletes the interface `name`; a missing one is not an error.
    pub async fn delete_link(&self, name: &str) -> Result<(), NetlinkError> {
        let Some(index) = self.link_index(name).await? else {
            return Ok(());
        };
        match self.handle.link().del(index).execute().await {
            Ok(()) => Ok(()),
            // Gone between the lookup and the delete: fine.
            Err(e) if errno(&e) == Some(ENODEV) => Ok(()),
            Err(e) => Err(Self::request(format!("deleting interface `{name}`"))(e)),
        }
    }

    pub async fn set_up(&self, name: &str, index: u32) -> Result<(), NetlinkError> {
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(Self::request(format!("bringing interface `{name}` up")))
    }

    /// Adds `addr/prefix` to the interface; an address already there is fine.
    pub async fn add_address(
        &self,
        name: &str,
        index: u32,
        addr: Ipv4Addr,
        prefix: u8,
    ) -> Result<(), NetlinkError> {
        match self
            .handle
            .address()
            .add(index, IpAddr::V4(addr), prefix)
            .execute()
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(EEXIST) => Ok(()),
            Err(e) => Err(Self::request(format!(
                "adding address {addr}/{prefix} to `{name}`"
            ))(e)),
        }
    }

    /// The IPv4 addresses of the namespace, each as a /32.
    pub async fn ipv4_addresses(&self) -> Result<Vec<Ipv4Net>, NetlinkError> {
        let mut out = Vec::new();
        let mut addrs = self.handle.address().get().execute();
        while let Some(msg) = addrs
            .try_next()
            .await
            .map_err(Self::request("listing addresses"))?
        {
            if msg.header.family != AddressFamily::Inet {
                continue;
            }
            for attr in &msg.attributes {
                if let AddressAttribute::Local(IpAddr::V4(a))
                | AddressAttribute::Address(IpAddr::V4(a)) = attr
                {
                    out.push(Ipv4Net::new_truncating(*a, 32));
                }
            }
        }
        Ok(out)
    }

    /// The unicast IPv4 routes of the main table, with their devices' names.
    pub async fn ipv4_main_routes(&self) -> Result<Vec<RouteInfo>, NetlinkError> {
        let names = self.links().await?;
        let mut out = Vec::new();
        let mut routes = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute();
        while let Some(msg) = routes
            .try_next()
            .await
            .map_err(Self::request("listing routes"))?
        {
            let table = msg
                .attributes
                .iter()
                .find_map(|a| match a {
                    RouteAttribute::Table(t) => Some(*t),
                    _ => None,
                })
                .unwrap_or(u32::from(msg.header.table));
            if table != u32::from(RouteHeader::RT_TABLE_MAIN) {
                continue;
            }
            if !matches!(
                msg.header.kind,
                RouteType::Unicast
                    | RouteType::BlackHole
                    | RouteType::Unreachable
                    | RouteType::Prohibit
            ) {
                continue;
            }
            let mut destination = Ipv4Addr::UNSPECIFIED;
            let mut device = None;
            for attr in &msg.attributes {
                match attr {
                    RouteAttribute::Destination(RouteAddress::Inet(a)) => destination = *a,
                    RouteAttribute::Oif(i) => {
                        device = names
                            .iter()
                            .find(|(idx, _)| idx == i)
                            .map(|(_, n)| n.clone())
                    }
                    _ => {}
                }
            }
            out.push(RouteInfo {
                destination: Ipv4Net::new_truncating(
                    destination,
                    msg.header.destination_prefix_length,
                ),
                device,
            });
        }
        Ok(out)
    }
}

/// Turns IPv6 off on the host side of the link, so the host sends the guest
/// no router solicitations or multicast reports (they would only be dropped
/// and counted). The jail's table drops IPv6 either way; a kernel without
/// IPv6 has nothing to turn off.
///
/// `/proc/sys/net` resolves to the network namespace of the calling thread.
pub fn disable_ipv6(name: &str) -> Result<(), NetlinkError> {
    let path = format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6");
    match std::fs::write(&path, "1") {
        Ok(()) => Ok(()),
        Err(e)
            if e.kind() == std::io::ErrorKind::NotFound
                && !std::path::Path::new("/proc/sys/net/ipv6").exists() =>
        {
            Ok(())
        }
        Err(source) => Err(NetlinkError::Sysctl {
            name: name.to_owned(),
            path,
            source,
        }),
    }
}
