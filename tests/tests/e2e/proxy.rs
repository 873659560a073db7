//! The lease-gated proxy as the guest's one exit, against real kernels and a
//! real client: the jail is applied in the "host" namespace, the proxy runs
//! there on the jail's host address and proxy ports, HTTPS servers with a
//! test CA run in the "upstream" namespace, and `curl` runs in the guest.
//!
//! Test names resolve only through the proxy's own resolver:
//! `api.test.example` and `other.test.example` → the upstream (198.18.0.2),
//! `private.test.example` → 10.9.9.9; `allowed_cidrs` permits 198.18.0.0/24
//! only (198.18.0.0/15 is otherwise a special-purpose range).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV6};
use std::path::PathBuf;
use std::process::Output;
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use zerolease::domain::{DomainPattern, HostName};
use zerolease::jail::Jail;
use zerolease::proxy::addr::AllowedCidrs;
use zerolease::proxy::events::{
    FrontEnd, MemoryEvents, ProxyEvent, RefusalReason, TunnelEnd, TunnelRecord,
};
use zerolease::proxy::registry::{Entry, EntryId, EntryKind, ProxyRegistry, SessionId};
use zerolease::proxy::resolve::{OverrideResolver, ResolveFuture, Resolver};
use zerolease::proxy::server::{ProxyConfig, ProxyState, SessionListeners, run_session};
use zerolease_tests::upstream::{HttpsServer, TestCa};
use zerolease_tests::{InNs, Netns, require_root_and_tools, udp_received};

use crate::world::{Guest, OTHER_PORT, PORTS, SPOOF, TOOLS, UPSTREAM, World, sa};

const API: &str = "api.test.example";
const OTHER: &str = "other.test.example";
const PRIVATE: &str = "private.test.example";
const PRIVATE_ADDR: Ipv4Addr = Ipv4Addr::new(10, 9, 9, 9);
/// An address that exists nowhere; the jail diverts TLS to it anyway.
const NOWHERE: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);
const HELLO: &str = "hello from upstream\n";
/// Cut-off figures must be well within the 1 s the design promises.
const CUT_BOUND: Duration = Duration::from_millis(500);

/// The cut-off measurements take this exclusively, the other proxy tests
/// share it, so TLS handshakes of neighbouring tests do not eat the CPU
/// being timed.
static TIMING: RwLock<()> = RwLock::new(());

fn shared() -> RwLockReadGuard<'static, ()> {
    TIMING.read().unwrap_or_else(|p| p.into_inner())
}

fn exclusive() -> RwLockWriteGuard<'static, ()> {
    TIMING.write().unwrap_or_else(|p| p.into_inner())
}

fn name(s: &str) -> HostName {
    HostName::parse(s).expect("test names are valid")
}

fn pats(p: &[&str]) -> Vec<DomainPattern> {
    p.iter()
        .map(|s| DomainPattern::parse(s).expect("test patterns are valid"))
        .collect()
}

fn lease(id: &str, pattern: &str) -> Entry {
    Entry::lease(id, format!("{id}-secret"), pats(&[pattern]), None)
}

/// Counts queries per name, then answers from the overrides.
#[derive(Debug)]
struct CountingResolver {
    inner: OverrideResolver,
    queries: Mutex<HashMap<String, usize>>,
}

impl CountingResolver {
    fn new() -> Self {
        let up = vec![IpAddr::V4(UPSTREAM)];
        CountingResolver {
            inner: OverrideResolver::new(HashMap::from([
                (name(API), up.clone()),
                (name(OTHER), up),
                (name(PRIVATE), vec![IpAddr::V4(PRIVATE_ADDR)]),
            ])),
            queries: Mutex::default(),
        }
    }

    fn queries(&self, name: &str) -> usize {
        let q = self.queries.lock().unwrap_or_else(|p| p.into_inner());
        q.get(name).copied().unwrap_or(0)
    }
}

impl Resolver for CountingResolver {
    fn resolve<'a>(&'a self, name: &'a HostName) -> ResolveFuture<'a> {
        *self
            .queries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(name.as_str().to_owned())
            .or_default() += 1;
        self.inner.resolve(name)
    }
}

/// One proxy (one registry, one runtime on a thread in the host namespace)
/// serving any number of sessions, each on its jail's host address. Stopped
/// (and waited for) when dropped.
struct Proxy {
    registry: ProxyRegistry,
    events: Arc<MemoryEvents>,
    resolver: Arc<CountingResolver>,
    runtime: tokio::runtime::Handle,
    shutdown: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Proxy {
    fn start(host: &Arc<Netns>, sessions: &[(&str, Ipv4Addr)]) -> Proxy {
        let registry = ProxyRegistry::new();
        let resolver = Arc::new(CountingResolver::new());
        let events = Arc::new(MemoryEvents::new());
        let config = ProxyConfig {
            allowed_cidrs: AllowedCidrs::parse(&["198.18.0.0/24"]).expect("cidr"),
            ..ProxyConfig::default()
        };
        let state = ProxyState::new(registry.clone(), resolver.clone(), events.clone(), config);
        let sessions: Vec<(SessionId, Ipv4Addr)> = sessions
            .iter()
            .map(|(id, addr)| (SessionId::new(*id), *addr))
            .collect();
        for (sid, _) in &sessions {
            assert!(registry.add_session(sid.clone()));
        }
        let shutdown = CancellationToken::new();
        let (ready, started) = std::sync::mpsc::channel();
        let thread = {
            let (host, shutdown) = (host.clone(), shutdown.clone());
            std::thread::spawn(move || {
                host.block_on(|| async move {
                    let mut tasks = Vec::new();
                    for (sid, addr) in sessions {
                        let bind = |port| TcpListener::bind(sa(addr, port));
                        let listeners = SessionListeners {
                            explicit: Some(bind(PORTS.connect).await.expect("bind connect")),
                            transparent: Some(
                                bind(PORTS.transparent).await.expect("bind transparent"),
                            ),
                            ..SessionListeners::default()
                        };
                        tasks.push(tokio::spawn(run_session(
                            listeners,
                            sid,
                            state.clone(),
                            shutdown.clone(),
                        )));
                    }
                    ready
                        .send(tokio::runtime::Handle::current())
                        .expect("test waits for the proxy");
                    for task in tasks {
                        task.await.expect("proxy session task");
                    }
                });
            })
        };
        let runtime = started
            .recv_timeout(Duration::from_secs(10))
            .expect("the proxy started");
        Proxy {
            registry,
            events,
            resolver,
            runtime,
            shutdown,
            thread: Some(thread),
        }
    }

    fn grant(&self, session: &str, entry: Entry) {
        // Expiry timers run on the proxy's runtime.
        let _enter = self.runtime.enter();
        self.registry
            .grant(&SessionId::new(session), entry)
            .expect("grant");
    }

    /// Waits until `session` has one open tunnel that has carried at least
    /// `bytes` down.
    fn wait_for_transfer(&self, session: &str, bytes: u64) {
        let sid = SessionId::new(session);
        eventually("a running transfer", || {
            self.registry
                .snapshot(&sid)?
                .tunnels
                .iter()
                .any(|t| t.bytes_down >= bytes)
                .then_some(())
        });
    }

    fn tunnels(&self) -> Vec<TunnelRecord> {
        self.events.tunnels()
    }

    fn refusal_count(&self) -> usize {
        self.events.refusals().len()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(thread) = self.thread.take() {
            // A panic there has already been printed; the test fails on
            // its own assertions.
            let _ = thread.join();
        }
    }
}

/// Polls `f` (records trail the client's view by a moment: they are written
/// after the sockets close).
fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within 10 s");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// One session's world: host, upstream and guest namespaces, the jail, an
/// HTTPS upstream for the test names and the proxy. Fields drop in order:
/// the proxy and the upstream stop before the jail and the namespaces go.
struct Setup {
    proxy: Proxy,
    upstream: HttpsServer,
    jail: InNs<Jail>,
    guest: Guest,
    world: World,
    ca: PathBuf,
    _dir: tempfile::TempDir,
    id: String,
    host: Ipv4Addr,
}

impl Setup {
    fn new(id: &str) -> Setup {
        let world = World::new();
        let guest = world.guest(id);
        let jail = world.jail(&guest, None);
        let host = jail.get().record().host;
        let ca = TestCa::new(&[API, OTHER, PRIVATE]);
        let dir = tempfile::tempdir().expect("temp dir");
        let ca_file = ca.write_ca(dir.path());
        let upstream = HttpsServer::start(&world.upstream, sa(UPSTREAM, 443), &ca, None);
        let proxy = Proxy::start(&world.host, &[(id, host)]);
        Setup {
            proxy,
            upstream,
            jail,
            guest,
            world,
            ca: ca_file,
            _dir: dir,
            id: id.to_owned(),
            host,
        }
    }

    fn grant(&self, entry: Entry) {
        self.proxy.grant(&self.id, entry);
    }

    /// `curl` in the guest through this session's explicit proxy.
    fn via_proxy(&self, args: &[&str]) -> Output {
        curl_via(&self.guest, &self.ca, self.host, args)
    }

    /// `curl` in the guest with no proxy, `name` pinned to `addr`.
    fn direct(&self, name: &str, addr: Ipv4Addr, args: &[&str]) -> Output {
        let resolve = format!("{name}:443:{addr}");
        let mut all = vec!["--resolve", &resolve];
        all.extend_from_slice(args);
        curl_direct(&self.guest, &self.ca, &all)
    }
}

const CURL_BASE: &[&str] = &["-sS", "--max-time", "15", "--connect-timeout", "3"];

fn curl_via(guest: &Guest, ca: &std::path::Path, proxy_host: Ipv4Addr, args: &[&str]) -> Output {
    let proxy = format!("http://{proxy_host}:{}", PORTS.connect);
    let ca = ca.to_string_lossy();
    let mut all: Vec<&str> = CURL_BASE.to_vec();
    all.extend(["--cacert", &ca, "--proxy", &proxy]);
    all.extend_from_slice(args);
    guest.ns.exec("curl", all)
}

fn curl_direct(guest: &Guest, ca: &std::path::Path, args: &[&str]) -> Output {
    let ca = ca.to_string_lossy();
    let mut all: Vec<&str> = CURL_BASE.to_vec();
    // No proxy from the environment either.
    all.extend(["--cacert", &ca, "--noproxy", "*"]);
    all.extend_from_slice(args);
    guest.ns.exec("curl", all)
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}, stdout {:?}, stderr {:?}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Asserts curl got `HELLO` back.
fn assert_hello(out: &Output) {
    assert!(out.status.success(), "{}", text(out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), HELLO, "{}", text(out));
}

/// The proxy's answer to the CONNECT (`%{http_connect}`), for a request
/// whose body is discarded.
fn connect_status(s: &Setup, url: &str, extra: &[&str]) -> String {
    let mut args = vec!["-o", "/dev/null", "-w", "%{http_connect}"];
    args.extend_from_slice(extra);
    args.push(url);
    let out = s.via_proxy(&args);
    assert!(!out.status.success(), "refused, yet {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// (reason, host, port, address) of every refusal, in order.
type RefusalKey = (RefusalReason, Option<String>, Option<u16>, Option<IpAddr>);

fn refusal_keys(events: &MemoryEvents) -> Vec<RefusalKey> {
    events
        .refusals()
        .into_iter()
        .map(|r| {
            (
                r.reason,
                r.host.map(|h| h.as_str().to_owned()),
                r.port,
                r.address,
            )
        })
        .collect()
}

fn upstream_addr() -> SocketAddr {
    sa(UPSTREAM, 443)
}

// ------------------------------------------------------------------ tests

/// 1. A leased name through CONNECT works end to end, and TLS is verified
///    against the test CA by curl itself (the proxy never terminates TLS).
#[test]
fn leased_name_through_connect_works_with_tls_verified() {
    let _t = shared();
    if !require_root_and_tools(TOOLS) {
        return;
    }
    let s = Setup::new("c1");
    s.grant(lease("l-api", API));

    let out = s.via_proxy(&[&format!("https://{API}/hello")]);
    assert_hello(&out);
    assert_eq!(s.upstream.requests(), 1);
    assert_eq!(s.proxy.resolver.queries(API), 1);

    // Without the test CA, curl refuses the upstream's certificate: the
    // tunnel carried the upstream's own TLS, not something of the proxy.
    let out = s.guest.ns.exec(
        "curl",
        CURL_BASE.iter().copied().chain([
            "--proxy",
            &format!("http://{}:{}", s.host, PORTS.connect),
            &format!("https://{API}/hello"),
        ]),
    );
    assert_eq!(out.status.code(), Some(60), "{}", text(&out));

    let tunnels = eventually("two tunnel records", || {
        let t = s.proxy.tunnels();
        (t.len() == 2).then_some(t)
    });
    assert!(
        tunnels
            .iter()
            .all(|t| t.host == name(API) && t.address == upstream_addr())
    );
}

/// 2. An unleased name is refused with 403 before any DNS query for it.
#[test]
fn unleased_name_is_refused_without_a_dns_query() {
    let _t = shared();
    if !require_root_and_tools(TOOLS) {
        return;
    }
    let s = Setup::new("c2");
    s.grant(lease("l-api", API));

    for host in [OTHER, "nowhere.test.example", "API.test.example.evil"] {
        let status = connect_status(&s, &format!("https://{host}/hello"), &[]);
        assert_eq!(status, "403", "{host}");
        assert_eq!(
            s.proxy.resolver.queries(&host.to_ascii_lowercase()),
            0,
            "{host} was looked up"
        );
    }
    assert_eq!(s.upstream.connections(), 0);
    let keys = eventually("three refusals", || {
        let k = refusal_keys(&s.proxy.events);
        (k.len() == 3).then_some(k)
    });
    assert!(
        keys.iter()
            .all(|k| k.0 == RefusalReason::NotLeased && k.2 == Some(443)),
        "{keys:?}"
    );
}

/// 3. A leased name on another port, and an IP literal, are refused.
#[test]
fn other_ports_and_ip_literals_are_refused() {
    let _t = shared();
    if !require_root_and_tools(TOOLS) {
        return;
    }
    let s = Setup::new("c3");
    s.grant(lease("l-api", API));
    let ssh = s.world.upstream.tcp_listener(sa(UPSTREAM, 22));
    let http = s.world.upstream.tcp_listener(sa(UPSTREAM, 80));

    assert_eq!(
        connect_status(&s, &format!("https://{API}:22/"), &[]),
        "403"
    );
    // Plain HTTP through a tunnel: CONNECT api.test.example:80.
    assert_eq!(
        connect_status(&s, &format!("http://{API}/"), &["--proxytunnel"]),
        "403"
    );
    assert_eq!(
        connect_status(&s, &format!("https://{UPSTREAM}/hello"), &[]),
        "403"
    );
    assert_eq!(
        s.proxy.resolver.queries(API),
        0,
        "the port is checked first"
    );
    assert!(ssh.accepted().is_none() && http.accepted().is_none());
    assert_eq!(s.upstream.connections(), 0);
    let keys = eventually("three refusals", || {
        let k = refusal_keys(&s.proxy.events);
        (k.len() == 3).then_some(k)
    });
    assert_eq!(
        keys,
        vec![
            (
                RefusalReason::PortNotAllowed,
                Some(API.into()),
                Some(22),
                None
            ),
            (
                RefusalReason::PortNotAllowed,
                Some(API.into()),
                Some(80),
                None
            ),
            (
                RefusalReason::IpLiteral,
                Some(UPSTREAM.to_string()),
                Some(443),
                None
            ),
        ]
    );
}

/// 4. A leased name that resolves outside `allowed_cidrs` is refused.
#[test]
fn leased_name_resolving_to_a_private_address_is_refused() {
    let _t = shared();
    if !require_root_and_tools(TOOLS) {
        return;
    }
    let s = Setup::new("c4");
    s.grant(lease("l-priv", PRIVATE));
    // Something to reach at that address if the proxy dialled it.
    s.world
        .host
        .ip(["addr", "add", &format!("{PRIVATE_ADDR}/32"), "dev", "lo"]);
    let private = s.world.host.tcp_listener(sa(PRIVATE_ADDR, 443));

    let status = connect_status(&s, &format!("https://{PRIVATE}/hello"), &[]);
    assert_eq!(status, "403");
    assert_eq!(s.proxy.resolver.queries(PRIVATE), 1);
    assert!(private.accepted().is_none());
    let keys = eventually("one refusal", || {
        let k = refusal_keys(&s.proxy.events);
        (k.len() == 1).then_some(k)
    });
    assert_eq!(
        keys,
        vec![(
            RefusalReason::PrivateAddress,
            Some(PRIVATE.into()),
            Some(443),
            Some(IpAddr::V4(PRIVATE_ADDR))
        )]
    );
}

/// 5. Transparent mode: TLS to any address is diverted by the jail; the
///    proxy routes it by SNI to the leased name's own address.
#[test]
fn transparent_mode_routes_by_sni_and_refuses_unleased_names() {
    let _t = shared();
    if !require_root_and_tools(TOOLS) {
        return;
    }
    let s = Setup::new("t5");
    s.grant(lease("l-api", API));

    let out = s.direct(API, NOWHERE, &[&format!("https://{API}/hello")]);
    assert_hello(&out);
    assert_eq!(s.upstream.requests(), 1);
    let tunnel = eventually("a tunnel record", || s.proxy.tunnels().pop());
    assert_eq!(tunnel.front_end, FrontEnd::Transparent);
    assert_eq!(tunnel.address, upstream_addr());

    let before = s.upstream.connections();
    let out = s.direct(OTHER, NOWHERE, &[&format!("https://{OTHER}/hello")]);
    assert!(!out.status.success(), "{}", text(&out));
    assert_eq!(s.upstream.connections(), before, "the upstream saw it");
    assert_eq!(s.proxy.resolver.queries(OTHER), 0);
    let refusal = eventually("a refusal", || s.proxy.events.refusals().pop());
    assert_eq!(
        (refusal.reason, refusal.front_end, refusal.host),
        (
            RefusalReason::NotLeased,
            FrontEnd::Transparent,
            Some(name(OTHER))
        )
    );
    assert!(world_counters(&s).redirected.packets >= 2);
}

fn world_counters(s: &Setup) -> zerolease::jail::JailCounters {
    s.world.counters(&s.jail)
}

/// 6. With the proxy running it is the only exit: TLS straight at the
///    upstream's address ends at the proxy, everything else is dropped and
///    counted by the jail.
#[test]
fn the_proxy_is_the_only_exit() {
    let _t = shared();
    if !require_root_and_tools(TOOLS) {
        return;
    }
    let s = Setup::new("x6");
    s.grant(lease("l-api", API));

    // TLS to the upstream's own address, name and all: diverted, and the
    // connection the upstream sees is the proxy's.
    let out = s.direct(API, UPSTREAM, &[&format!("https://{API}/hello")]);
    assert_hello(&out);
    let tunnel = eventually("a tunnel record", || s.proxy.tunnels().pop());
    assert_eq!(tunnel.front_end, FrontEnd::Transparent);
    // To the bare address: curl sends no SNI, the proxy refuses, the
    // upstream sees nothing.
    let before = s.upstream.connections();
    let out = curl_direct(&s.guest, &s.ca, &[&format!("https://{UPSTREAM}/hello")]);
    assert!(!out.status.success(), "{}", text(&out));
    assert_eq!(s.upstream.connections(), before);
    let refusal = eventually("a refusal", || s.proxy.events.refusals().pop());
    assert_eq!(refusal.reason, RefusalReason::NoSni);
    assert_eq!(refusal.peer.ip(), s.jail.get().record().guest);

    // Plain TCP, UDP and ICMP to the upstream: not forwarded.
    let http = s.world.upstream.tcp_listener(sa(UPSTREAM, 80));
    let udp = s.world.upstream.udp_socket(sa(UPSTREAM, 53));
    let c0 = world_counters(&s);
    assert!(!s.guest.ns.tcp_connects(None, sa(UPSTREAM, 80)));
    assert!(http.accepted().is_none());
    s.guest.ns.udp_send(sa(UPSTREAM, 53), b"query");
    assert_eq!(udp_received(&udp), None);
    assert!(!s.guest.ns.pings(&UPSTREAM.to_string()));
    let c1 = world_counters(&s);
    assert!(
        c1.forward.packets >= c0.forward.packets + 3,
        "{c0:?} → {c1:?}"
    );

    // Another port of the host, next to the proxy.
    let other = s.world.host.tcp_listener(sa(s.host, OTHER_PORT));
    assert!(!s.guest.ns.tcp_connects(None, sa(s.host, OTHER_PORT)));
    assert!(other.accepted().is_none());
    let c2 = world_counters(&s);
    assert!(c2.input_other.packets > c1.input_other.packets);

    // A spoofed source towards the proxy port never reaches the proxy.
    let refusals = s.proxy.refusal_count();
    s.guest.add_spoof_address(&s.world.host);
    assert!(
        !s.guest
            .ns
            .tcp_connects(Some(sa(SPOOF, 0)), sa(s.host, PORTS.connect))
    );
    let c3 = world_counters(&s);
    assert!(c3.spoofed.packets > c2.spoofed.packets);

    // IPv6 towards the host, even with addresses on both ends.
    s.guest.add_ipv6(&s.world.host);
    let six: SocketAddr =
        SocketAddrV6::new("fd00:5a::1".parse().expect("v6"), PORTS.connect, 0, 0).into();
    let six_listener = s.world.host.tcp_listener(six);
    assert!(!s.guest.ns.tcp_connects(None, six));
    assert!(six_listener.accepted().is_none());
    assert!(world_counters(&s).ipv6.packets > c3.ipv6.packets);

    assert_eq!(s.proxy.refusal_count(), refusals);
    assert_eq!(s.proxy.tunnels().len(), 1);
}

/// A download through the proxy, running in the background.
struct Download {
    exited: std::sync::mpsc::Receiver<(Instant, Output)>,
}

impl Download {
    fn start(s: &Setup, path: &str) -> Download {
        let proxy = format!("http://{}:{}", s.host, PORTS.connect);
        let ca = s.ca.to_string_lossy().into_owned();
        let url = format!("https://{API}{path}");
        let child = s.guest.ns.spawn(
            "curl",
            [
                "-sS",
                "--max-time",
                "30",
                "--cacert",
                &ca,
                "--proxy",
                &proxy,
                "-o",
                "/dev/null",
                &url,
            ],
        );
        let (tx, exited) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let out = child.wait_with_output().expect("wait for curl");
            let _ = tx.send((Instant::now(), out));
        });
        Download { exited }
    }

    fn wait(&self) -> (Instant, Output) {
        self.exited
            .recv_timeout(Duration::from_secs(35))
            .expect("curl exited")
    }
}

/// The time from `revoked` to curl's exit and to the upstream's socket
/// closing, for a transfer cut by `revoke`.
fn cut_figures(s: &Setup, revoke: impl FnOnce()) -> (Duration, Duration) {
    let download = Download::start(s, "/slow/50000000");
    s.proxy.wait_for_transfer(&s.id, 256 * 1024);
    let before = Instant::now();
    revoke();
    let revoked = Instant::now();
    let (exit, out) = download.wait();
    assert!(
        !out.status.success(),
        "the transfer finished: {}",
        text(&out)
    );
    let closed = eventually("the upstream connection closed", || {
        s.upstream.closed().first().copied()
    });
    assert!(
        closed >= before,
        "the upstream closed before the revocation"
    );
    (
        exit.saturating_duration_since(revoked),
        closed.saturating_duration_since(revoked),
    )
}

fn assert_cut(what: &str, client: Duration, upstream: Duration) {
    println!(
        "cut-off after {what}: curl exited after {:.1} ms, upstream closed after {:.1} ms",
        client.as_secs_f64() * 1e3,
        upstream.as_secs_f64() * 1e3
    );
    assert!(client < CUT_BOUND, "{what}: curl exit took {client:?}");
    assert!(
        upstream < CUT_BOUND,
        "{what}: upstream close took {upstream:?}"
    );
}

fn last_end(s: &Setup) -> TunnelEnd {
    eventually("a tunnel record", || s.proxy.tunnels().pop()).end
}

/// 7a. Revoking the session cuts a running transfer at once and refuses
///     what comes next.
#[test]
fn revoking_the_session_cuts_a_running_transfer() {
    let _t = exclusive();
    if !require_root_and_tools(TOOLS) {
        return;
    }
    let s = Setup::new("r7");
    s.grant(lease("l-api", API));
    let (client, upstream) = cut_figures(&s, || {
        assert!(s.proxy.registry.revoke_session(&SessionId::new(&s.id)));
    });
    assert_cut("revoke_session", client, upstream);
    assert_eq!(last_end(&s), TunnelEnd::Revoked);
    assert_eq!(
        connect_status(&s, &format!("https://{API}/hello"), &[]),
        "403"
    );
}

/// 7b. Revoking the lease does the same, for that lease only.
#[test]
fn revoking_the_lease_cuts_a_running_transfer() {
    let _t = exclusive();
    if !require_root_and_tools(TOOLS) {
        return;
    }
    let s = Setup::new("r7l");
    s.grant(lease("l-api", API));
    s.grant(lease("l-other", OTHER));
    let (client, upstream) = cut_figures(&s, || {
        assert_eq!(s.proxy.registry.revoke_lease(&EntryId::new("l-api")), 1);
    });
    assert_cut("revoke_lease", client, upstream);
    assert_eq!(last_end(&s), TunnelEnd::Revoked);
    assert_eq!(
        connect_status(&s, &format!("https://{API}/hello"), &[]),
        "403"
    );
    // The other lease of the session still works.
    assert_hello(&s.via_proxy(&[&format!("https://{OTHER}/hello")]));
}

/// 7c. Expiry cuts a running transfer on its own, at the expiry.
#[test]
fn lease_expiry_cuts_a_running_transfer_at_expiry() {
    let _t = exclusive();
    if !require_root_and_tools(TOOLS) {
        return;
    }
    let s = Setup::new("e7");
    let ttl = Duration::from_millis(1500);
    let granted = Instant::now();
    s.grant(lease("l-api", API).with_expiry(tokio::time::Instant::from_std(granted + ttl)));
    let download = Download::start(&s, "/slow/50000000");
    s.proxy.wait_for_transfer(&s.id, 64 * 1024);
    assert!(
        granted.elapsed() < ttl,
        "the transfer must be running before expiry"
    );
    let (exit, out) = download.wait();
    assert!(
        !out.status.success(),
        "the transfer finished: {}",
        text(&out)
    );
    let closed = eventually("the upstream connection closed", || {
        s.upstream.closed().first().copied()
    });
    let expiry = granted + ttl;
    assert!(exit >= expiry, "curl was cut before the expiry");
    assert!(closed >= expiry, "the upstream closed before the expiry");
    assert_cut(
        "expiry",
        exit.saturating_duration_since(expiry),
        closed.saturating_duration_since(expiry),
    );
    assert_eq!(last_end(&s), TunnelEnd::Expired);
    assert_eq!(
        connect_status(&s, &format!("https://{API}/hello"), &[]),
        "403"
    );
}

/// 8. Two sessions side by side: each guest reaches only its own proxy, and
///    each proxy admits only its own session's leases.
#[test]
fn two_sessions_are_kept_apart() {
    let _t = shared();
    if !require_root_and_tools(TOOLS) {
        return;
    }
    let world = World::new();
    let guest_a = world.guest("sa");
    let guest_b = world.guest("sb");
    let jail_a = world.jail(&guest_a, None);
    let jail_b = world.jail(&guest_b, None);
    let (a, b) = (jail_a.get().record().host, jail_b.get().record().host);
    assert_ne!(a, b);
    let ca = TestCa::new(&[API, OTHER]);
    let dir = tempfile::tempdir().expect("temp dir");
    let ca_file = ca.write_ca(dir.path());
    let upstream = HttpsServer::start(&world.upstream, sa(UPSTREAM, 443), &ca, None);
    let proxy = Proxy::start(&world.host, &[("sa", a), ("sb", b)]);
    proxy.grant("sa", lease("l-a", API));
    proxy.grant("sb", lease("l-b", OTHER));
    let api = format!("https://{API}/hello");
    let other = format!("https://{OTHER}/hello");

    // Each guest, its own proxy, its own lease.
    assert_hello(&curl_via(&guest_a, &ca_file, a, &[&api]));
    assert_hello(&curl_via(&guest_b, &ca_file, b, &[&other]));

    // A through B's proxy: dropped by A's jail before B's proxy sees it.
    let before = world.counters(&jail_a);
    let out = curl_via(&guest_a, &ca_file, b, &[&other]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(world.counters(&jail_a).input_other.packets > before.input_other.packets);

    // A's proxy refuses B's name, B's proxy refuses A's name.
    for (guest, host, url) in [(&guest_a, a, &other), (&guest_b, b, &api)] {
        let out = curl_via(
            guest,
            &ca_file,
            host,
            &["-o", "/dev/null", "-w", "%{http_connect}", url],
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "403",
            "{}",
            text(&out)
        );
    }
    let refusals = eventually("two refusals", || {
        let r = proxy.events.refusals();
        (r.len() == 2).then_some(r)
    });
    let seen: Vec<_> = refusals
        .iter()
        .map(|r| (r.session.as_str(), r.host.clone(), r.reason))
        .collect();
    assert_eq!(
        seen,
        vec![
            ("sa", Some(name(OTHER)), RefusalReason::NotLeased),
            ("sb", Some(name(API)), RefusalReason::NotLeased),
        ]
    );
    assert_eq!(upstream.requests(), 2);
    assert_eq!(proxy.resolver.queries(API), 1);
    assert_eq!(proxy.resolver.queries(OTHER), 1);
    drop(proxy);
    drop(upstream);
}

/// 9. The audit records: each tunnel with its host, resolved address,
///    bytes and end reason; each refusal with its reason.
#[test]
fn audit_events_record_tunnels_and_refusals() {
    let _t = shared();
    if !require_root_and_tools(TOOLS) {
        return;
    }
    let s = Setup::new("a9");
    s.grant(lease("l-api", API));
    s.grant(Entry::allow("allow-private", pats(&[PRIVATE])));
    const BYTES: u64 = 100_000;

    // One step at a time, so the records' order is the steps' order.
    let recorded = |n: usize| {
        eventually("the step's record", || {
            let e = s.proxy.events.events();
            (e.len() == n).then_some(e)
        })
    };
    let out = s.via_proxy(&["-o", "/dev/null", &format!("https://{API}/bytes/{BYTES}")]);
    assert!(out.status.success(), "{}", text(&out));
    recorded(1);
    let out = s.direct(API, NOWHERE, &[&format!("https://{API}/hello")]);
    assert_hello(&out);
    recorded(2);
    connect_status(&s, &format!("https://{OTHER}/"), &[]);
    recorded(3);
    connect_status(&s, &format!("https://{API}:8443/"), &[]);
    recorded(4);
    connect_status(&s, &format!("https://{PRIVATE}/"), &[]);
    let events = recorded(5);
    let guest = s.jail.get().record().guest;
    let sid = SessionId::new(&s.id);
    let kind = EntryKind::Lease {
        secret_name: "l-api-secret".into(),
    };
    let mut summary = Vec::new();
    for event in &events {
        match event {
            ProxyEvent::Tunnel(t) => {
                assert_eq!(t.session, sid);
                assert_eq!((&t.entry, &t.kind), (&EntryId::new("l-api"), &kind));
                assert_eq!((t.host.as_str(), t.address), (API, upstream_addr()));
                assert!(t.bytes_up > 0, "{t:?}");
                assert!(
                    matches!(t.end, TunnelEnd::UpstreamClosed | TunnelEnd::ClientClosed),
                    "{t:?}"
                );
                let body = match t.front_end {
                    FrontEnd::Explicit => BYTES,
                    FrontEnd::Transparent => HELLO.len() as u64,
                };
                assert!(t.bytes_down > body, "{t:?}");
                summary.push(format!("tunnel {:?}", t.front_end));
            }
            ProxyEvent::Refusal(r) => {
                assert_eq!(r.session, sid);
                assert_eq!(r.peer.ip(), guest);
                summary.push(format!(
                    "refused {:?} {} {:?} {:?}",
                    r.reason,
                    r.host.as_ref().map_or("-", HostName::as_str),
                    r.port,
                    r.address
                ));
            }
        }
    }
    assert_eq!(
        summary,
        vec![
            "tunnel Explicit".to_owned(),
            "tunnel Transparent".to_owned(),
            format!("refused NotLeased {OTHER} Some(443) None"),
            format!("refused PortNotAllowed {API} Some(8443) None"),
            format!("refused PrivateAddress {PRIVATE} Some(443) Some({PRIVATE_ADDR})"),
        ]
    );
}

/// A setup tears everything down when dropped: its namespaces are gone
/// (the proxy and upstream threads, which hold them, have stopped).
#[test]
fn a_setup_leaves_no_namespace_behind() {
    let _t = shared();
    if !require_root_and_tools(TOOLS) {
        return;
    }
    let s = Setup::new("n0");
    let names = [
        s.world.host.name().to_owned(),
        s.world.upstream.name().to_owned(),
        s.guest.ns.name().to_owned(),
    ];
    s.grant(lease("l-api", API));
    assert_hello(&s.via_proxy(&[&format!("https://{API}/hello")]));
    drop(s);
    let out = zerolease_tests::run_cmd("ip", ["netns", "list"]).expect("ip netns list");
    let listed = String::from_utf8_lossy(&out.stdout).into_owned();
    for n in &names {
        assert!(!listed.contains(n.as_str()), "{n} left behind: {listed}");
    }
}
