//! The two front ends and the tunnel copy loop.
//!
//! Each front end serves one session on one listener the caller passes in:
//! the session is known by which listener a connection arrived on (in
//! production the host address of the session's tap link), never by
//! anything the guest says.
//!
//! **Invariant:** bytes flow to an upstream only after [`ProxyRegistry::admit`],
//! the address check and [`ProxyRegistry::register_tunnel`] all succeeded, and
//! the copy loop selects on the entry's cut signal, so a revocation or expiry
//! ends both directions at once. TLS is never terminated: the proxy reads
//! the ClientHello (transparent mode) and replays it unchanged.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, sleep_until, timeout};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::domain::HostName;

use super::addr::AllowedCidrs;
use super::connect::{ConnectParse, MAX_HEAD, RequestError, TargetHost, parse_connect};
use super::events::{
    FrontEnd, ProxyEvents, RefusalReason, RefusalRecord, TunnelEnd, TunnelOpening, TunnelRecord,
};
use super::policy::check_answers;
use super::registry::{
    Admission, Counters, CutReason, ProxyRegistry, SessionId, ShutdownHandle, TunnelGuard,
};
use super::resolve::Resolver;
use super::sni::{MAX_HELLO_BYTES, SniError, SniParse, parse_client_hello};

/// Timeouts and address policy shared by every front end.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Time for the whole request head or ClientHello to arrive.
    pub header_timeout: Duration,
    /// A tunnel with no bytes either way for this long is closed.
    pub idle_timeout: Duration,
    /// Time for name resolution plus the upstream TCP handshake.
    pub connect_timeout: Duration,
    /// Special-purpose networks the proxy may nevertheless connect to.
    pub allowed_cidrs: AllowedCidrs,
    /// The upstream port the transparent front end dials (the port nftables
    /// redirected from).
    pub transparent_port: u16,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            connect_timeout: Duration::from_secs(10),
            allowed_cidrs: AllowedCidrs::default(),
            transparent_port: 443,
        }
    }
}

/// Everything a front end needs; cheap to clone.
#[derive(Debug, Clone)]
pub struct ProxyState {
    pub registry: ProxyRegistry,
    pub resolver: Arc<dyn Resolver>,
    pub events: Arc<dyn ProxyEvents>,
    pub config: Arc<ProxyConfig>,
}

impl ProxyState {
    pub fn new(
        registry: ProxyRegistry,
        resolver: Arc<dyn Resolver>,
        events: Arc<dyn ProxyEvents>,
        config: ProxyConfig,
    ) -> Self {
        ProxyState {
            registry,
            resolver,
            events,
            config: Arc::new(config),
        }
    }
}

/// The sockets one session's proxy serves on, all bound by the caller (in
/// production on the host address of the session's tap link, possibly
/// inside a network namespace). Any may be absent.
#[derive(Debug, Default)]
pub struct SessionListeners {
    pub explicit: Option<TcpListener>,
    pub transparent: Option<TcpListener>,
    pub dns_udp: Option<tokio::net::UdpSocket>,
    pub dns_tcp: Option<TcpListener>,
    /// What the DNS stub answers; required when a DNS socket is given.
    pub dns: Option<super::dns::DnsStubConfig>,
}

/// Runs every front end of one session until `shutdown` is cancelled.
pub async fn run_session(
    listeners: SessionListeners,
    session: SessionId,
    state: ProxyState,
    shutdown: CancellationToken,
) {
    let SessionListeners {
        explicit,
        transparent,
        dns_udp,
        dns_tcp,
        dns,
    } = listeners;
    let explicit = async {
        if let Some(l) = explicit {
            run_explicit(l, session.clone(), state.clone(), shutdown.clone()).await;
        }
    };
    let transparent = async {
        if let Some(l) = transparent {
            run_transparent(l, session.clone(), state.clone(), shutdown.clone()).await;
        }
    };
    let udp = async {
        if let (Some(sock), Some(cfg)) = (dns_udp, dns) {
            super::dns::run_udp(sock, cfg, shutdown.clone()).await;
        }
    };
    let tcp = async {
        if let (Some(l), Some(cfg)) = (dns_tcp, dns) {
            super::dns::run_tcp(l, cfg, shutdown.clone()).await;
        }
    };
    tokio::join!(explicit, transparent, udp, tcp);
}

/// Serves HTTP CONNECT for `session` on `listener` until `shutdown` is
/// cancelled; then closes every tunnel it opened and returns once they are
/// gone.
pub async fn run_explicit(
    listener: TcpListener,
    session: SessionId,
    state: ProxyState,
    shutdown: CancellationToken,
) {
    run(listener, session, state, shutdown, FrontEnd::Explicit).await;
}

/// Serves redirected TLS for `session` on `listener`, routed by SNI, until
/// `shutdown` is cancelled.
pub async fn run_transparent(
    listener: TcpListener,
    session: SessionId,
    state: ProxyState,
    shutdown: CancellationToken,
) {
    run(listener, session, state, shutdown, FrontEnd::Transparent).await;
}

async fn run(
    listener: TcpListener,
    session: SessionId,
    state: ProxyState,
    shutdown: CancellationToken,
    front_end: FrontEnd,
) {
    let tracker = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, peer)) => {
                let conn = Conn {
                    session: session.clone(),
                    state: state.clone(),
                    shutdown: shutdown.clone(),
                    front_end,
                    peer,
                };
                tracker.spawn(conn.serve(stream));
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "proxy accept failed");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
            }
        }
    }
    tracker.close();
    tracker.wait().await;
}

/// A refusal on its way to the audit sink.
#[derive(Debug)]
struct Refusal {
    reason: RefusalReason,
    host: Option<HostName>,
    port: Option<u16>,
    address: Option<std::net::IpAddr>,
}

impl Refusal {
    fn new(reason: RefusalReason) -> Self {
        Refusal {
            reason,
            host: None,
            port: None,
            address: None,
        }
    }
    fn target(mut self, host: &HostName, port: u16) -> Self {
        self.host = Some(host.clone());
        self.port = Some(port);
        self
    }
}

/// An upstream connection that passed every check.
struct Upstream {
    stream: TcpStream,
    address: SocketAddr,
    admission: Admission,
    guard: TunnelGuard,
}

struct Conn {
    session: SessionId,
    state: ProxyState,
    shutdown: CancellationToken,
    front_end: FrontEnd,
    peer: SocketAddr,
}

impl Conn {
    async fn serve(self, mut client: TcpStream) {
        let _slot = match self.state.registry.acquire_slot(&self.session) {
            Ok(slot) => slot,
            Err(reason) => return self.refuse(&mut client, Refusal::new(reason)).await,
        };
        let _ = client.set_nodelay(true);
        let set_up = async {
            match self.front_end {
                FrontEnd::Explicit => self.explicit(&mut client).await,
                FrontEnd::Transparent => self.transparent(&mut client).await,
            }
        };
        // Shutdown does not wait for a slow client's head or a slow dial.
        let outcome = tokio::select! {
            _ = self.shutdown.cancelled() => return,
            o = set_up => o,
        };
        match outcome {
            Ok((host, upstream, early)) => self.tunnel(client, host, upstream, early).await,
            Err(refusal) => self.refuse(&mut client, refusal).await,
        }
    }

    /// Reads a CONNECT head; returns the upstream plus any payload the
    /// client sent early. [`Conn::tunnel`] answers `200`.
    async fn explicit(
        &self,
        client: &mut TcpStream,
    ) -> Result<(HostName, Upstream, Vec<u8>), Refusal> {
        let mut buf = Vec::with_capacity(1024);
        let head = read_until(
            client,
            &mut buf,
            MAX_HEAD,
            self.state.config.header_timeout,
            |b| match parse_connect(b) {
                ConnectParse::Incomplete => None,
                other => Some(other),
            },
        )
        .await?;
        let (target, head_len) = match head {
            ConnectParse::Connect { target, head_len } => (target, head_len),
            ConnectParse::Rejected(e) => return Err(Refusal::new(request_refusal(e))),
            ConnectParse::Incomplete => return Err(Refusal::new(RefusalReason::Malformed)),
        };
        let host = match target.host {
            TargetHost::Name(name) => name,
            TargetHost::Ipv6(ip) => {
                let mut r = Refusal::new(RefusalReason::IpLiteral);
                r.port = Some(target.port);
                r.address = Some(ip.into());
                return Err(r);
            }
        };
        let upstream = self.dial(client, &host, target.port).await?;
        let early = buf.split_off(head_len);
        Ok((host, upstream, early))
    }

    /// Reads a ClientHello; the bytes read are replayed to the upstream.
    async fn transparent(
        &self,
        client: &mut TcpStream,
    ) -> Result<(HostName, Upstream, Vec<u8>), Refusal> {
        let mut buf = Vec::with_capacity(2048);
        let parsed = read_until(
            client,
            &mut buf,
            MAX_HELLO_BYTES,
            self.state.config.header_timeout,
            |b| match parse_client_hello(b) {
                SniParse::Incomplete => None,
                other => Some(other),
            },
        )
        .await?;
        let host = match parsed {
            SniParse::Sni { name, .. } => name,
            SniParse::Rejected(e) => return Err(Refusal::new(sni_refusal(e))),
            SniParse::Incomplete => return Err(Refusal::new(RefusalReason::Malformed)),
        };
        let upstream = self
            .dial(client, &host, self.state.config.transparent_port)
            .await?;
        Ok((host, upstream, buf))
    }

    /// Lease check, resolution, address check, connect, registration — in
    /// that order.
    async fn dial(
        &self,
        client: &TcpStream,
        host: &HostName,
        port: u16,
    ) -> Result<Upstream, Refusal> {
        let st = &self.state;
        let refuse = |reason| Refusal::new(reason).target(host, port);
        let admission = st
            .registry
            .admit(&self.session, host, port)
            .map_err(refuse)?;
        let deadline = Instant::now() + st.config.connect_timeout;
        let answers = match host.as_ipv4() {
            // A literal the entry names exactly: no DNS.
            Some(ip) => vec![ip.into()],
            None => {
                let lookup = tokio::select! {
                    _ = admission.cut.cancelled() => return Err(refuse(RefusalReason::NotLeased)),
                    r = tokio::time::timeout_at(deadline, st.resolver.resolve(host)) => r,
                };
                match lookup {
                    Ok(Ok(ips)) => ips,
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "proxy resolve failed");
                        return Err(refuse(RefusalReason::ResolveFailed));
                    }
                    Err(_) => return Err(refuse(RefusalReason::ResolveFailed)),
                }
            }
        };
        let checked = check_answers(&answers, &st.config.allowed_cidrs).map_err(|special| {
            let mut r = refuse(RefusalReason::PrivateAddress);
            r.address = Some(special.address);
            r
        })?;
        let mut connected = None;
        for ip in checked {
            let address = SocketAddr::new(ip, port);
            let attempt = tokio::select! {
                _ = admission.cut.cancelled() => return Err(refuse(RefusalReason::NotLeased)),
                r = tokio::time::timeout_at(deadline, TcpStream::connect(address)) => r,
            };
            match attempt {
                Ok(Ok(stream)) => {
                    connected = Some((stream, address));
                    break;
                }
                Ok(Err(e)) => tracing::debug!(%address, error = %e, "proxy connect failed"),
                Err(_) => break,
            }
        }
        let (stream, address) = connected.ok_or_else(|| refuse(RefusalReason::ConnectFailed))?;
        let _ = stream.set_nodelay(true);
        let opening = TunnelOpening {
            session: self.session.clone(),
            front_end: self.front_end,
            entry: admission.entry.id.clone(),
            kind: admission.entry.kind.clone(),
            host: host.clone(),
            address,
        };
        if let Err(e) = st.events.tunnel_opening(&opening) {
            tracing::warn!(error = %e, "proxy access refused: audit failed");
            return Err(refuse(RefusalReason::AuditFailed));
        }
        // Duplicates the registry can shut down on revocation. Failing to
        // make them (out of descriptors) refuses rather than opening a
        // tunnel that could only be cut by its own task.
        let sockets = [client, &stream]
            .into_iter()
            .map(ShutdownHandle::for_stream)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| refuse(RefusalReason::ConnectFailed))?;
        let guard = st
            .registry
            .register_tunnel(
                &self.session,
                &admission,
                self.front_end,
                host.clone(),
                address,
                sockets,
            )
            .map_err(refuse)?;
        Ok(Upstream {
            stream,
            address,
            admission,
            guard,
        })
    }

    async fn tunnel(&self, mut client: TcpStream, host: HostName, up: Upstream, early: Vec<u8>) {
        let Upstream {
            stream: mut upstream,
            address,
            admission,
            guard,
        } = up;
        let started = Instant::now();
        let counters = guard.counters().clone();
        // The 200 goes out only once the upstream connection exists, so a
        // client never sees success for a tunnel that cannot open.
        let reply_failed = self.front_end == FrontEnd::Explicit
            && client
                .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                .await
                .is_err();
        let end =
            if reply_failed || (!early.is_empty() && upstream.write_all(&early).await.is_err()) {
                TunnelEnd::Error
            } else {
                counters.up.fetch_add(early.len() as u64, Ordering::Relaxed);
                copy_loop(
                    &client,
                    &upstream,
                    &counters,
                    &admission,
                    &self.shutdown,
                    self.state.config.idle_timeout,
                )
                .await
            };
        // Both directions end here. A cut (revocation, expiry) or an error
        // resets both connections, discarding what is still buffered, so no
        // byte moves after the cut; an orderly end sends FIN to both.
        if matches!(
            end,
            TunnelEnd::Revoked | TunnelEnd::Expired | TunnelEnd::Error
        ) {
            let _ = client.set_zero_linger();
            let _ = upstream.set_zero_linger();
        } else {
            let _ = client.shutdown().await;
            let _ = upstream.shutdown().await;
        }
        // The registry's duplicate descriptors go first, so dropping the
        // streams really closes the sockets (and sends the reset).
        drop(guard);
        drop(client);
        drop(upstream);
        self.state.events.tunnel_closed(TunnelRecord {
            session: self.session.clone(),
            front_end: self.front_end,
            entry: admission.entry.id.clone(),
            kind: admission.entry.kind.clone(),
            host,
            address,
            bytes_up: counters.up.load(Ordering::Relaxed),
            bytes_down: counters.down.load(Ordering::Relaxed),
            duration: started.elapsed(),
            end,
        });
    }

    async fn refuse(&self, client: &mut TcpStream, refusal: Refusal) {
        self.state.registry.count_refusal(&self.session);
        self.state.events.refused(RefusalRecord {
            session: self.session.clone(),
            front_end: self.front_end,
            peer: self.peer,
            host: refusal.host,
            port: refusal.port,
            address: refusal.address,
            reason: refusal.reason,
        });
        if self.front_end == FrontEnd::Explicit {
            let response = refusal_response(refusal.reason);
            // Best effort, bounded: a client that does not read must not
            // hold the connection open.
            let _ = timeout(
                Duration::from_secs(1),
                client.write_all(response.as_bytes()),
            )
            .await;
        }
        let _ = client.shutdown().await;
    }
}

/// Reads into `buf` (at most `bound` bytes) until `parse` gives an answer.
async fn read_until<T>(
    client: &mut TcpStream,
    buf: &mut Vec<u8>,
    bound: usize,
    limit: Duration,
    mut parse: impl FnMut(&[u8]) -> Option<T>,
) -> Result<T, Refusal> {
    let read = async {
        let mut chunk = [0u8; 4096];
        loop {
            let room = bound.saturating_sub(buf.len()).min(chunk.len());
            if room == 0 {
                // The parser saw the whole bound and still wants more.
                return Err(Refusal::new(RefusalReason::TooLarge));
            }
            let n = client
                .read(&mut chunk[..room])
                .await
                .map_err(|_| Refusal::new(RefusalReason::Malformed))?;
            if n == 0 {
                return Err(Refusal::new(RefusalReason::Malformed));
            }
            buf.extend_from_slice(&chunk[..n]);
            if let Some(answer) = parse(buf) {
                return Ok(answer);
            }
        }
    };
    timeout(limit, read)
        .await
        .unwrap_or_else(|_| Err(Refusal::new(RefusalReason::Timeout)))
}

fn request_refusal(e: RequestError) -> RefusalReason {
    match e {
        RequestError::NotConnect => RefusalReason::NotConnect,
        RequestError::TooLarge | RequestError::TooManyHeaders => RefusalReason::TooLarge,
        RequestError::InvalidName => RefusalReason::InvalidName,
        RequestError::Malformed(_) => RefusalReason::Malformed,
    }
}

fn sni_refusal(e: SniError) -> RefusalReason {
    match e {
        SniError::NoSni => RefusalReason::NoSni,
        SniError::MultipleSni => RefusalReason::MultipleSni,
        SniError::InvalidName => RefusalReason::InvalidName,
        SniError::TooLarge => RefusalReason::TooLarge,
        SniError::Malformed(_) => RefusalReason::Malformed,
    }
}

/// The HTTP response for a refused CONNECT: a status and a short reason.
pub fn refusal_response(reason: RefusalReason) -> String {
    let status = match reason {
        RefusalReason::NotLeased
        | RefusalReason::PortNotAllowed
        | RefusalReason::IpLiteral
        | RefusalReason::PrivateAddress
        | RefusalReason::NotConnect => "403 Forbidden",
        RefusalReason::InvalidName
        | RefusalReason::Malformed
        | RefusalReason::NoSni
        | RefusalReason::MultipleSni => "400 Bad Request",
        RefusalReason::TooLarge => "431 Request Header Fields Too Large",
        RefusalReason::Timeout => "408 Request Timeout",
        RefusalReason::TooManyTunnels => "429 Too Many Requests",
        RefusalReason::ResolveFailed | RefusalReason::ConnectFailed => "502 Bad Gateway",
        RefusalReason::AuditFailed => "503 Service Unavailable",
    };
    let body = format!("zerolease proxy: {reason}\n");
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

const FIRST_NONE: u8 = 0;
const FIRST_CLIENT: u8 = 1;
const FIRST_UPSTREAM: u8 = 2;

/// Copies both ways until both sides closed, an error, idleness, the
/// entry's cut, or shutdown — whichever comes first.
async fn copy_loop(
    client: &TcpStream,
    upstream: &TcpStream,
    counters: &Counters,
    admission: &Admission,
    shutdown: &CancellationToken,
    idle: Duration,
) -> TunnelEnd {
    let start = Instant::now();
    let last_ms = AtomicU64::new(0);
    let first = AtomicU8::new(FIRST_NONE);
    let copy = async {
        tokio::try_join!(
            pump(
                client,
                upstream,
                &counters.up,
                &last_ms,
                start,
                &first,
                FIRST_CLIENT
            ),
            pump(
                upstream,
                client,
                &counters.down,
                &last_ms,
                start,
                &first,
                FIRST_UPSTREAM
            ),
        )
    };
    let idle_watch = async {
        loop {
            let last = start + Duration::from_millis(last_ms.load(Ordering::Relaxed));
            if Instant::now() >= last + idle {
                return;
            }
            sleep_until(last + idle).await;
        }
    };
    tokio::select! {
        biased;
        _ = admission.cut.cancelled() => match admission.cut.reason() {
            CutReason::Revoked => TunnelEnd::Revoked,
            CutReason::Expired => TunnelEnd::Expired,
        },
        _ = shutdown.cancelled() => TunnelEnd::Shutdown,
        _ = idle_watch => TunnelEnd::IdleTimeout,
        r = copy => {
            let closed_by = match first.load(Ordering::Relaxed) {
                FIRST_UPSTREAM => Some(TunnelEnd::UpstreamClosed),
                FIRST_CLIENT => Some(TunnelEnd::ClientClosed),
                _ => None,
            };
            match (r, closed_by) {
                (Ok(_), closed_by) => closed_by.unwrap_or(TunnelEnd::ClientClosed),
                // A side that reset the connection (closed with unread
                // data, or closed and then got more), or whose peer did:
                // the tunnel ended with that side's close, not in error.
                (Err(e), Some(closed_by)) if gone(&e) => closed_by,
                (Err(_), _) => TunnelEnd::Error,
            }
        }
    }
}

/// A write to a peer that has gone: reset or broken pipe.
fn gone(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
    )
}

/// The pipe size asked for, and the most one splice(2) moves.
const PIPE_BYTES: usize = 1 << 20;

/// Moves one direction with splice(2) through a pipe, so the bytes never
/// enter user space: a userspace copy doubles the memory traffic of every
/// byte (socket → buffer → socket) and held a tunnel to about half of a
/// direct connection's throughput on loopback.
///
/// The pipe is made on the first readable event, so an idle tunnel holds no
/// pipe, buffer or extra descriptor. It is emptied before the next read, so
/// a `WouldBlock` always comes from the socket whose readiness `try_io`
/// clears. Dropping this future (cut, shutdown) drops the pipe and whatever
/// it still held: no byte moves after the cut.
async fn pump(
    from: &TcpStream,
    to: &TcpStream,
    count: &AtomicU64,
    last_ms: &AtomicU64,
    start: Instant,
    first: &AtomicU8,
    me: u8,
) -> std::io::Result<()> {
    use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl, splice};
    from.readable().await?;
    let (pipe_r, pipe_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
    // A larger pipe means fewer calls; the default (64 KiB) still works.
    let _ = fcntl(&pipe_w, FcntlArg::F_SETPIPE_SZ(PIPE_BYTES as i32));
    let flags = SpliceFFlags::SPLICE_F_NONBLOCK | SpliceFFlags::SPLICE_F_MOVE;
    loop {
        let n = loop {
            from.readable().await?;
            match from.try_io(Interest::READABLE, || {
                Ok(splice(from, None, &pipe_w, None, PIPE_BYTES, flags)?)
            }) {
                Ok(n) => break n,
                Err(e) if retry(&e) => continue,
                Err(e) => {
                    // Reset by this side's peer: its (abortive) close.
                    if gone(&e) {
                        closed(first, me);
                    }
                    return Err(e);
                }
            }
        };
        if n == 0 {
            closed(first, me);
            // Half-close: pass the EOF on, keep the other direction open.
            // NotConnected means the peer is already gone (as tokio's own
            // shutdown treats it): nothing left to tell it.
            return match socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write) {
                Err(e) if e.kind() == std::io::ErrorKind::NotConnected => Ok(()),
                r => r,
            };
        }
        let mut left = n;
        while left > 0 {
            to.writable().await?;
            match to.try_io(Interest::WRITABLE, || {
                Ok(splice(&pipe_r, None, to, None, left, flags)?)
            }) {
                Ok(m) => left -= m,
                Err(e) if retry(&e) => continue,
                Err(e) => {
                    // The other side's peer is gone: its close, unless a
                    // side closed before.
                    if gone(&e) {
                        closed(first, other(me));
                    }
                    return Err(e);
                }
            }
        }
        count.fetch_add(n as u64, Ordering::Relaxed);
        last_ms.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

/// Records that side `me` closed, unless a side closed before.
fn closed(first: &AtomicU8, me: u8) {
    let _ = first.compare_exchange(FIRST_NONE, me, Ordering::Relaxed, Ordering::Relaxed);
}

/// The side across the tunnel from `me`.
fn other(me: u8) -> u8 {
    if me == FIRST_CLIENT {
        FIRST_UPSTREAM
    } else {
        FIRST_CLIENT
    }
}

/// Errors after which the same splice is simply tried again.
fn retry(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
    )
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::domain::DomainPattern;
    use crate::proxy::events::MemoryEvents;
    use crate::proxy::registry::Entry;
    use crate::proxy::resolve::OverrideResolver;

    /// Bytes that differ at every offset within a period prime to any
    /// buffer or pipe size, so a dropped, repeated or reordered chunk shows.
    fn pattern(seed: u8, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i % 251) as u8 ^ seed.wrapping_mul(31))
            .collect()
    }

    /// An upstream on loopback that accepts one connection and hands it
    /// to `serve`; its address, and the task with what `serve` returned.
    async fn upstream<F, Fut, T>(serve: F) -> (std::net::SocketAddr, tokio::task::JoinHandle<T>)
    where
        F: FnOnce(TcpStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        let up = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = up.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (s, _) = up.accept().await.unwrap();
            serve(s).await
        });
        (addr, task)
    }

    /// A proxy on loopback whose session may reach `bulk.test` (= the
    /// upstream at `up`), and a client tunnel through it.
    async fn proxied(
        up: std::net::SocketAddr,
    ) -> (
        TcpStream,
        Arc<MemoryEvents>,
        CancellationToken,
        tokio::task::JoinHandle<()>,
    ) {
        let name = HostName::parse("bulk.test").unwrap();
        let registry = ProxyRegistry::new();
        let session = SessionId::new("s");
        registry.add_session(session.clone());
        registry
            .grant(
                &session,
                Entry::allow("bulk", vec![DomainPattern::Exact(name.clone())])
                    .with_ports(vec![up.port()]),
            )
            .unwrap();
        let events = Arc::new(MemoryEvents::new());
        let state = ProxyState::new(
            registry,
            Arc::new(OverrideResolver::new(HashMap::from([(
                name,
                vec![up.ip()],
            )]))),
            events.clone(),
            ProxyConfig {
                allowed_cidrs: AllowedCidrs::parse(&["127.0.0.0/8"]).unwrap(),
                ..ProxyConfig::default()
            },
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(run_explicit(listener, session, state, shutdown.clone()));

        let mut c = TcpStream::connect(proxy).await.unwrap();
        let target = format!("bulk.test:{}", up.port());
        c.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let reply = b"HTTP/1.1 200 Connection established\r\n\r\n";
        let mut head = vec![0u8; reply.len()];
        c.read_exact(&mut head).await.unwrap();
        assert_eq!(head, reply);
        (c, events, shutdown, server)
    }

    /// The tunnel's record, once it has ended.
    async fn ended(events: &MemoryEvents) -> crate::proxy::events::TunnelRecord {
        loop {
            if let Some(rec) = events.tunnels().pop() {
                return rec;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The splice pump moves megabytes both ways intact, passes each
    /// half-close on separately, and counts every byte.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn large_transfers_both_ways_arrive_intact_with_half_close() {
        const LEN: usize = 24 * 1024 * 1024 + 7;
        // Upstream: reads everything, then sends its own payload back.
        let (up_addr, upstream) = upstream(|mut s| async move {
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.unwrap();
            s.write_all(&pattern(2, LEN)).await.unwrap();
            s.shutdown().await.unwrap();
            got
        })
        .await;
        let (c, events, shutdown, server) = proxied(up_addr).await;
        let (mut r, mut w) = c.into_split();
        let send = tokio::spawn(async move {
            w.write_all(&pattern(1, LEN)).await.unwrap();
            // Half-close: the upstream still answers after this.
            w.shutdown().await.unwrap();
            w
        });
        let mut down = Vec::new();
        r.read_to_end(&mut down).await.unwrap();
        let _w = send.await.unwrap();
        let up_got = upstream.await.unwrap();
        assert!(
            up_got == pattern(1, LEN),
            "upstream got {} bytes, altered",
            up_got.len()
        );
        assert!(
            down == pattern(2, LEN),
            "client got {} bytes, altered",
            down.len()
        );

        let rec = ended(&events).await;
        assert_eq!((rec.bytes_up, rec.bytes_down), (LEN as u64, LEN as u64));
        // The client sent the first EOF.
        assert_eq!(rec.end, TunnelEnd::ClientClosed);
        shutdown.cancel();
        server.await.unwrap();
    }

    /// A side that resets the connection instead of closing it (it closed
    /// with unread data, or with SO_LINGER 0) ended the tunnel: recorded
    /// as that side's close, client or upstream, not as an error.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_side_that_resets_is_recorded_as_that_sides_close() {
        for client_resets in [true, false] {
            let (reset_tx, reset_rx) = tokio::sync::oneshot::channel::<()>();
            let (up_addr, upstream) = upstream(move |mut s| async move {
                let mut request = [0u8; 7];
                s.read_exact(&mut request).await.unwrap();
                s.write_all(b"response").await.unwrap();
                if client_resets {
                    // Stays open until the proxy closes its side.
                    let mut rest = Vec::new();
                    let _ = s.read_to_end(&mut rest).await;
                } else {
                    let _ = reset_rx.await;
                    socket2::SockRef::from(&s)
                        .set_linger(Some(Duration::ZERO))
                        .unwrap();
                    drop(s);
                }
            })
            .await;
            let (mut c, events, shutdown, server) = proxied(up_addr).await;
            c.write_all(b"request").await.unwrap();
            let mut response = [0u8; 8];
            c.read_exact(&mut response).await.unwrap();
            assert_eq!(&response, b"response");
            if client_resets {
                socket2::SockRef::from(&c)
                    .set_linger(Some(Duration::ZERO))
                    .unwrap();
                drop(c);
            } else {
                reset_tx.send(()).unwrap();
            }
            let rec = ended(&events).await;
            let expected = if client_resets {
                TunnelEnd::ClientClosed
            } else {
                TunnelEnd::UpstreamClosed
            };
            assert_eq!(rec.end, expected, "client resets: {client_resets}: {rec:?}");
            assert_eq!((rec.bytes_up, rec.bytes_down), (7, 8));
            upstream.await.unwrap();
            shutdown.cancel();
            server.await.unwrap();
        }
    }

    /// A client that closes its side and goes away while the upstream is
    /// still sending makes the proxy's next write fail (reset, broken
    /// pipe): the tunnel ended because the client closed, not in error.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_gone_after_its_close_is_a_client_close_not_an_error() {
        let (up_addr, upstream) = upstream(|mut s| async move {
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.unwrap();
            // Keeps sending after the client's EOF until the proxy closes.
            let chunk = pattern(3, 256 * 1024);
            for _ in 0..256 {
                if s.write_all(&chunk).await.is_err() {
                    break;
                }
            }
            got
        })
        .await;
        let (mut c, events, shutdown, server) = proxied(up_addr).await;
        c.write_all(b"request").await.unwrap();
        c.shutdown().await.unwrap();
        // Gone without reading: the kernel resets what arrives next.
        drop(c);
        let rec = ended(&events).await;
        assert_eq!(rec.end, TunnelEnd::ClientClosed, "{rec:?}");
        assert_eq!(rec.bytes_up, 7);
        assert_eq!(upstream.await.unwrap(), b"request");
        shutdown.cancel();
        server.await.unwrap();
    }
}
