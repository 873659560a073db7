//! What the proxy reports: one record per finished tunnel and one per
//! refusal, as closed enums. The lead wires [`ProxyEvents`] to the vault's
//! hash-chained audit log; [`MemoryEvents`] keeps them for tests.
//!
//! **Invariant:** records carry names (session, entry, secret name, host),
//! never secret values. Calls are synchronous and must not block: the proxy
//! reports after a tunnel is already closed, so revocation never waits on
//! audit.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::domain::HostName;

use super::registry::{EntryId, EntryKind, SessionId};

/// Which listener a connection arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FrontEnd {
    /// HTTP CONNECT.
    Explicit,
    /// TLS redirected by nftables, routed by SNI.
    Transparent,
}

/// How a tunnel ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TunnelEnd {
    /// The client closed (or half-closed first and the upstream followed);
    /// a reset from the client counts as its close.
    ClientClosed,
    /// The upstream closed first (a reset too).
    UpstreamClosed,
    /// Its entry or session was revoked.
    Revoked,
    /// Its entry expired.
    Expired,
    /// No bytes in either direction for the idle timeout.
    IdleTimeout,
    /// The proxy itself was shut down.
    Shutdown,
    /// A read or write failed other than by a side going away.
    Error,
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefusalReason {
    /// No active entry of this session covers the name.
    NotLeased,
    /// An entry covers the name but not the port.
    PortNotAllowed,
    /// An IP literal no entry names exactly (or any IPv6 literal).
    IpLiteral,
    /// A resolved (or literal) address is in a special-purpose range.
    PrivateAddress,
    /// The ClientHello carries no SNI.
    NoSni,
    /// The ClientHello carries several SNI names.
    MultipleSni,
    /// The requested name is not a valid host name.
    InvalidName,
    /// An HTTP request other than CONNECT.
    NotConnect,
    /// Not a well-formed request head or ClientHello.
    Malformed,
    /// The request head or ClientHello exceeds its bound.
    TooLarge,
    /// The request head or ClientHello did not arrive in time.
    Timeout,
    /// The session has its maximum number of connections open.
    TooManyTunnels,
    /// The name did not resolve.
    ResolveFailed,
    /// No checked address accepted the connection.
    ConnectFailed,
    /// The audit sink could not record the access (fail closed).
    AuditFailed,
}

impl fmt::Display for RefusalReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            RefusalReason::NotLeased => "no active lease or allow entry covers this host",
            RefusalReason::PortNotAllowed => "this port is not allowed for this host",
            RefusalReason::IpLiteral => "IP addresses are not allowed, use a host name",
            RefusalReason::PrivateAddress => "the host resolves to a non-public address",
            RefusalReason::NoSni => "the TLS ClientHello has no server name",
            RefusalReason::MultipleSni => "the TLS ClientHello has several server names",
            RefusalReason::InvalidName => "invalid host name",
            RefusalReason::NotConnect => "only CONNECT is supported by this proxy",
            RefusalReason::Malformed => "malformed request",
            RefusalReason::TooLarge => "request too large",
            RefusalReason::Timeout => "request not received in time",
            RefusalReason::TooManyTunnels => "too many open connections for this session",
            RefusalReason::ResolveFailed => "the host name did not resolve",
            RefusalReason::ConnectFailed => "could not connect to the host",
            RefusalReason::AuditFailed => "the access could not be audited",
        };
        f.write_str(s)
    }
}

/// One finished tunnel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelRecord {
    pub session: SessionId,
    pub front_end: FrontEnd,
    pub entry: EntryId,
    /// The secret name for a lease, or `Allow`.
    pub kind: EntryKind,
    pub host: HostName,
    /// The address actually connected to (always a checked one).
    pub address: SocketAddr,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub duration: Duration,
    pub end: TunnelEnd,
}

/// One refused connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusalRecord {
    pub session: SessionId,
    pub front_end: FrontEnd,
    pub peer: SocketAddr,
    /// The requested host, when one was parsed.
    pub host: Option<HostName>,
    pub port: Option<u16>,
    /// The offending address for [`RefusalReason::PrivateAddress`].
    pub address: Option<IpAddr>,
    pub reason: RefusalReason,
}

/// A tunnel whose upstream TCP connection exists but that has carried no
/// byte yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelOpening {
    pub session: SessionId,
    pub front_end: FrontEnd,
    pub entry: EntryId,
    pub kind: EntryKind,
    pub host: HostName,
    pub address: SocketAddr,
}

/// The audit sink could not record an access; the access is refused.
#[derive(Debug, thiserror::Error)]
#[error("could not record the proxy access in the audit log")]
pub struct AuditError {
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

/// Receives the proxy's records. Implementations must not block for long:
/// they run on the connection's task.
pub trait ProxyEvents: Send + Sync + fmt::Debug {
    /// Called before the first byte moves. An error refuses the tunnel
    /// (invariant 6: no access without its audit record).
    fn tunnel_opening(&self, record: &TunnelOpening) -> Result<(), AuditError> {
        let _ = record;
        Ok(())
    }
    /// Called once the tunnel is closed in both directions.
    fn tunnel_closed(&self, record: TunnelRecord);
    /// Called once per refused connection.
    fn refused(&self, record: RefusalRecord);
}

/// Either kind of record, in arrival order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxyEvent {
    Tunnel(TunnelRecord),
    Refusal(RefusalRecord),
}

/// Keeps every record in memory (tests, `ps` debugging).
#[derive(Debug, Default)]
pub struct MemoryEvents {
    events: Mutex<Vec<ProxyEvent>>,
    fail_opening: AtomicBool,
}

impl MemoryEvents {
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes [`ProxyEvents::tunnel_opening`] fail, as a broken audit log
    /// would.
    pub fn set_fail_opening(&self, fail: bool) {
        self.fail_opening.store(fail, Ordering::SeqCst);
    }

    pub fn events(&self) -> Vec<ProxyEvent> {
        self.lock().clone()
    }

    pub fn tunnels(&self) -> Vec<TunnelRecord> {
        self.lock()
            .iter()
            .filter_map(|e| match e {
                ProxyEvent::Tunnel(t) => Some(t.clone()),
                ProxyEvent::Refusal(_) => None,
            })
            .collect()
    }

    pub fn refusals(&self) -> Vec<RefusalRecord> {
        self.lock()
            .iter()
            .filter_map(|e| match e {
                ProxyEvent::Refusal(r) => Some(r.clone()),
                ProxyEvent::Tunnel(_) => None,
            })
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<ProxyEvent>> {
        // A panic elsewhere while holding the lock leaves a usable Vec.
        self.events.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl ProxyEvents for MemoryEvents {
    fn tunnel_opening(&self, _: &TunnelOpening) -> Result<(), AuditError> {
        if self.fail_opening.load(Ordering::SeqCst) {
            return Err(AuditError {
                source: "audit log unavailable (test)".into(),
            });
        }
        Ok(())
    }
    fn tunnel_closed(&self, record: TunnelRecord) {
        self.lock().push(ProxyEvent::Tunnel(record));
    }
    fn refused(&self, record: RefusalRecord) {
        self.lock().push(ProxyEvent::Refusal(record));
    }
}

/// Logs records with `tracing` and keeps nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct TracingEvents;

impl ProxyEvents for TracingEvents {
    fn tunnel_closed(&self, r: TunnelRecord) {
        tracing::info!(
            session = %r.session, entry = %r.entry, host = %r.host, address = %r.address,
            up = r.bytes_up, down = r.bytes_down, duration_ms = r.duration.as_millis() as u64,
            end = ?r.end, "proxy tunnel closed"
        );
    }
    fn refused(&self, r: RefusalRecord) {
        tracing::info!(
            session = %r.session, host = ?r.host.as_ref().map(HostName::as_str), port = ?r.port,
            reason = ?r.reason, "proxy refused connection"
        );
    }
}
