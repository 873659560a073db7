//! The per-session network jail: a tap (or a given interface), a /30 from the
//! address pool, and one nftables table that leaves the guest exactly one
//! exit — its session's proxy ports on the host side of its link.
//!
//! **Architecture Invariant:** rules are in place before the link is up.
//! `Jail::create` creates the tap down, loads the table, adds the address and
//! only then sets the link up; the table matches the interface by name, so it
//! can be loaded before the link exists at all.
//!
//! **Architecture Invariant:** the `zl-` link prefix and the `zl_` table
//! prefix belong to zerolease. `reap_leftovers` deletes any such link or
//! table whose session is not live.
//!
//! The module does not know about sessions, QEMU or the proxy: it is given a
//! short id, the proxy ports and an owner uid, and hands back a [`JailRecord`]
//! the session layer persists.
//!
//! Privileged code lives in `tap.rs` (ioctls), `netlink.rs` (rtnetlink) and
//! `nft.rs` (`nft -j`); `pool.rs` and `ruleset.rs` are pure.

pub mod netlink;
pub mod nft;
pub mod pool;
pub mod ruleset;
pub mod tap;

use std::fmt;
use std::net::Ipv4Addr;

use nix::unistd::Uid;
use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use netlink::{Netlink, NetlinkError};
pub use nft::NftError;
pub use pool::{DEFAULT_POOL, Ipv4Net, LinkNet, PoolError, RouteInfo};
pub use ruleset::{Count, CounterName, JailCounters, JailSpec, ProxyPorts};
pub use tap::TapError;

/// Prefix of every interface zerolease creates (`zl-<id>`).
pub const LINK_PREFIX: &str = "zl-";
/// Prefix of every nftables table zerolease creates (`inet zl_<id>`).
pub const TABLE_PREFIX: &str = "zl_";
/// Longest id: `zl-` plus the id must fit IFNAMSIZ - 1 = 15 bytes.
pub const MAX_ID_LEN: usize = 12;

/// The short id that names a session's link and table: 1 to 12 lowercase
/// ASCII letters or digits. The session layer derives it from its session id.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct JailId(String);

impl JailId {
    pub fn parse(input: &str) -> Result<Self, JailError> {
        let ok = !input.is_empty()
            && input.len() <= MAX_ID_LEN
            && input
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        if ok {
            Ok(Self(input.to_owned()))
        } else {
            Err(JailError::BadId {
                input: input.to_owned(),
            })
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `zl-<id>`.
    pub fn link_name(&self) -> String {
        format!("{LINK_PREFIX}{}", self.0)
    }

    /// `zl_<id>`.
    pub fn table_name(&self) -> String {
        format!("{TABLE_PREFIX}{}", self.0)
    }
}

impl TryFrom<String> for JailId {
    type Error = JailError;
    fn try_from(s: String) -> Result<Self, JailError> {
        Self::parse(&s)
    }
}

impl From<JailId> for String {
    fn from(id: JailId) -> String {
        id.0
    }
}

impl fmt::Display for JailId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The interface a jail is built on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Link {
    /// Create the persistent tap `zl-<id>`, owned by the uid QEMU runs as.
    Tap { owner: Uid },
    /// Adopt an interface that already exists (in tests: the host end of a
    /// veth pair standing in for a VM). Name it `zl-…` so reaping finds it.
    /// The jail owns it from then on: `destroy` deletes it. Pass it down:
    /// a link that is already up carries traffic unfiltered until the table
    /// is loaded.
    Existing { name: String },
}

/// What the jail needs to know; plain data.
#[derive(Clone, Debug)]
pub struct JailConfig {
    pub id: JailId,
    pub link: Link,
    pub pool: Ipv4Net,
    pub ports: ProxyPorts,
    pub dns_port: Option<u16>,
}

/// Everything needed to tear a jail down later, from another process if need
/// be. The session layer persists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JailRecord {
    pub id: JailId,
    pub interface: String,
    pub table: String,
    pub host: Ipv4Addr,
    pub guest: Ipv4Addr,
    pub prefix: u8,
}

/// Why a jail could not be built, read or removed.
#[derive(Debug, Error)]
pub enum JailError {
    #[error("`{input}` is not a usable jail id: use 1 to {MAX_ID_LEN} lowercase letters or digits")]
    BadId { input: String },
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error(transparent)]
    Nft(#[from] NftError),
    #[error(
        "setting up the jail of session {id} failed, and removing what was set up failed too \
         ({cleanup}); `zerolease reap` retries the removal"
    )]
    CreateAndCleanup {
        id: JailId,
        #[source]
        source: Box<JailError>,
        cleanup: Box<JailError>,
    },
    #[error("the jail of session {id} was rebuilt from its record to be torn down, not sealed")]
    NotBuilt { id: JailId },
}

/// A live jail: its link and its nftables table. Dropping it tears both down
/// (best effort); call [`Jail::destroy`] to see errors.
#[derive(Debug)]
pub struct Jail {
    record: JailRecord,
    /// What the rules are made from; `None` for a jail rebuilt from its
    /// record, which is only ever torn down.
    spec: Option<JailSpec>,
    destroyed: bool,
}

/// Serialises address allocation within this process, so two sessions
/// starting at once do not pick the same /30.
static ALLOCATION: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

impl Jail {
    /// Builds the jail in the calling thread's network namespace: both
    /// halves below, one after the other.
    ///
    /// Ordering (the invariant of this module):
    /// 1. pick a /30 (the pool must not overlap a foreign route);
    /// 2. create the tap, down (or find the given interface);
    /// 3. add the host address, the link still down;
    /// 4. load the table — from here on the interface is filtered;
    /// 5. set the link up.
    ///
    /// On failure everything done so far is undone.
    pub async fn create(config: JailConfig) -> Result<Jail, JailError> {
        let jail = Jail::create_down(config).await?;
        match jail.seal().await {
            Ok(()) => Ok(jail),
            Err(err) => Err(jail.undo(err).await),
        }
    }

    /// Steps 1 to 3: the link exists, with the host address, but is down,
    /// so it carries nothing; [`Jail::seal`] does the rest. A session
    /// starts its proxy and QEMU in between (a tap that is down refuses
    /// QEMU's writes), so loading the rules overlaps QEMU's start.
    ///
    /// On failure everything done so far is undone.
    pub async fn create_down(config: JailConfig) -> Result<Jail, JailError> {
        let nl = Netlink::connect()?;
        let _allocating = ALLOCATION.lock().await;
        let link_net = allocate(&nl, config.pool).await?;
        let interface = match &config.link {
            Link::Tap { .. } => config.id.link_name(),
            Link::Existing { name } => name.clone(),
        };
        let record = JailRecord {
            id: config.id.clone(),
            table: config.id.table_name(),
            interface: interface.clone(),
            host: link_net.host(),
            guest: link_net.guest(),
            prefix: link_net.net().prefix(),
        };
        let spec = JailSpec {
            table: record.table.clone(),
            interface: record.interface.clone(),
            host: record.host,
            guest: record.guest,
            ports: config.ports,
            dns_port: config.dns_port,
        };

        // Step 2. Check the given interface before the jail owns it, so a
        // typo does not make `destroy` delete something else.
        match &config.link {
            Link::Tap { owner } => tap::create_persistent_tap(&interface, *owner)?,
            Link::Existing { name } => {
                if nl.link_index(name).await?.is_none() {
                    return Err(NetlinkError::NoSuchLink { name: name.clone() }.into());
                }
            }
        }
        let jail = Jail {
            record,
            spec: Some(spec),
            destroyed: false,
        };
        match jail.address(&nl).await {
            Ok(()) => Ok(jail),
            Err(err) => Err(jail.undo(err).await),
        }
    }

    /// Step 3: the host address, on the link that is still down.
    async fn address(&self, nl: &Netlink) -> Result<(), JailError> {
        let interface = &self.record.interface;
        let index = self.index(nl).await?;
        netlink::disable_ipv6(interface)?;
        nl.add_address(interface, index, self.record.host, self.record.prefix)
            .await?;
        Ok(())
    }

    /// Steps 4 and 5: loads the table, then sets the link up. The rules
    /// match by name, so they hold from the first packet the link can
    /// carry. On failure the caller tears the jail down.
    pub async fn seal(&self) -> Result<(), JailError> {
        let spec = self.spec.as_ref().ok_or_else(|| JailError::NotBuilt {
            id: self.record.id.clone(),
        })?;
        nft::apply(spec).await?;
        let nl = Netlink::connect()?;
        let index = self.index(&nl).await?;
        nl.set_up(&spec.interface, index).await?;
        Ok(())
    }

    async fn index(&self, nl: &Netlink) -> Result<u32, JailError> {
        let interface = &self.record.interface;
        Ok(nl
            .link_index(interface)
            .await?
            .ok_or_else(|| NetlinkError::NoSuchLink {
                name: interface.clone(),
            })?)
    }

    /// Tears down what was built after `err`, and says what failed.
    async fn undo(mut self, err: JailError) -> JailError {
        let id = self.record.id.clone();
        match self.destroy().await {
            Ok(()) => err,
            Err(cleanup) => JailError::CreateAndCleanup {
                id,
                source: Box::new(err),
                cleanup: Box::new(cleanup),
            },
        }
    }

    /// Rebuilds the RAII value of a jail from its record (e.g. after a
    /// supervisor restart), so it can be torn down.
    pub fn for_existing(record: JailRecord) -> Jail {
        Jail {
            record,
            spec: None,
            destroyed: false,
        }
    }

    pub fn record(&self) -> &JailRecord {
        &self.record
    }

    /// Gives up ownership without tearing anything down; the record is what
    /// a later `for_existing` or `reap_leftovers` needs.
    pub fn into_record(mut self) -> JailRecord {
        self.destroyed = true;
        self.record.clone()
    }

    /// What the table has counted so far.
    pub async fn counters(&self) -> Result<JailCounters, JailError> {
        Ok(nft::counters(&self.record.table).await?)
    }

    /// Deletes the link, then the table. Idempotent: missing pieces are fine.
    ///
    /// Link first: once it is gone no packet can arrive on it, so there is no
    /// moment where a live link is unfiltered.
    pub async fn destroy(&mut self) -> Result<(), JailError> {
        if self.destroyed {
            return Ok(());
        }
        let nl = Netlink::connect()?;
        nl.delete_link(&self.record.interface).await?;
        nft::delete_table(&self.record.table).await?;
        self.destroyed = true;
        Ok(())
    }
}

impl Drop for Jail {
    fn drop(&mut self) {
        if self.destroyed {
            return;
        }
        // Drop cannot await, and may run inside a runtime. A scoped thread
        // gets its own small runtime; a new thread starts in the network
        // namespace of the thread that spawned it, i.e. this one.
        let record = self.record.clone();
        let result = std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .map_err(|e| e.to_string())?;
                    runtime
                        .block_on(Jail::for_existing(record).destroy_consuming())
                        .map_err(|e| e.to_string())
                })
                .join()
        });
        match result {
            Ok(Ok(())) => {}
            Ok(Err(err)) => tracing::warn!(
                interface = %self.record.interface,
                table = %self.record.table,
                "tearing down the jail on drop failed: {err}; `zerolease reap` removes it later"
            ),
            Err(_) => tracing::warn!(
                interface = %self.record.interface,
                "tearing down the jail on drop panicked"
            ),
        }
        self.destroyed = true;
    }
}

impl Jail {
    async fn destroy_consuming(mut self) -> Result<(), JailError> {
        let result = self.destroy().await;
        // Whatever happened, this copy must not try again from its own Drop.
        self.destroyed = true;
        result
    }
}

/// Picks the next free /30 after checking the pool against the routes.
async fn allocate(nl: &Netlink, pool: Ipv4Net) -> Result<LinkNet, JailError> {
    let routes = nl.ipv4_main_routes().await?;
    pool::check_pool(pool, &routes)?;
    let mut in_use = nl.ipv4_addresses().await?;
    in_use.extend(
        routes
            .iter()
            .filter(|r| r.destination.prefix() > 0)
            .map(|r| r.destination),
    );
    Ok(pool::next_free(pool, &in_use)?)
}

/// Reads a jail's counters by table name, without owning the jail (for
/// `zerolease ps`).
pub async fn read_counters(table: &str) -> Result<JailCounters, JailError> {
    Ok(nft::counters(table).await?)
}

/// What [`reap_leftovers`] removed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Reaped {
    pub tables: Vec<String>,
    pub links: Vec<String>,
}

/// Deletes every `inet zl_*` table and `zl-*` link of the calling thread's
/// namespace whose id is not in `live`.
pub async fn reap_leftovers(live: &[JailId]) -> Result<Reaped, JailError> {
    let is_live = |suffix: &str| live.iter().any(|id| id.as_str() == suffix);
    let mut reaped = Reaped::default();
    let nl = Netlink::connect()?;
    // Links before tables, for the same reason as in `destroy`.
    for (_, name) in nl.links().await? {
        if let Some(suffix) = name.strip_prefix(LINK_PREFIX)
            && !is_live(suffix)
        {
            nl.delete_link(&name).await?;
            reaped.links.push(name);
        }
    }
    for table in nft::inet_tables().await? {
        if let Some(suffix) = table.strip_prefix(TABLE_PREFIX)
            && !is_live(suffix)
        {
            nft::delete_table(&table).await?;
            reaped.tables.push(table);
        }
    }
    Ok(reaped)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jail_id_table() {
        for good in ["a", "0", "abc123", "abcdefghijkl"] {
            let id = JailId::parse(good).unwrap();
            assert_eq!(id.link_name(), format!("zl-{good}"));
            assert_eq!(id.table_name(), format!("zl_{good}"));
            assert!(id.link_name().len() < 16);
        }
        for bad in [
            "",
            "abcdefghijklm",
            "ABC",
            "a-b",
            "a_b",
            "a b",
            "a/b",
            "é",
            "a\0",
            "../x",
            "a;drop",
        ] {
            assert!(JailId::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            JailId::parse("A").unwrap_err().to_string(),
            "`A` is not a usable jail id: use 1 to 12 lowercase letters or digits"
        );
    }

    #[test]
    fn record_round_trips_and_validates_the_id() {
        let record = JailRecord {
            id: JailId::parse("s1").unwrap(),
            interface: "zl-s1".into(),
            table: "zl_s1".into(),
            host: Ipv4Addr::new(10, 213, 0, 1),
            guest: Ipv4Addr::new(10, 213, 0, 2),
            prefix: 30,
        };
        let json = serde_json::to_string(&record).unwrap();
        assert_eq!(serde_json::from_str::<JailRecord>(&json).unwrap(), record);
        let forged = json.replace("\"s1\"", "\"S 1\"");
        assert!(serde_json::from_str::<JailRecord>(&forged).is_err());
    }
}
