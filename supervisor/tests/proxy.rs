//! Loopback integration tests of the egress proxy: real sockets on
//! 127.0.0.1, real TLS (rustls + an rcgen test CA) through the tunnel, name
//! overrides pointing test names at local upstreams.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::sync::CancellationToken;
use zerolease::domain::{DomainPattern, HostName};
use zerolease::proxy::addr::AllowedCidrs;
use zerolease::proxy::events::{FrontEnd, MemoryEvents, RefusalReason, TunnelEnd};
use zerolease::proxy::registry::{Entry, EntryId, EntryKind, ProxyRegistry, SessionId};
use zerolease::proxy::resolve::{OverrideResolver, ResolveFuture, Resolver};
use zerolease::proxy::server::{
    ProxyConfig, ProxyState, SessionListeners, run_explicit, run_session, run_transparent,
};

// ---------------------------------------------------------------- harness

/// The cut-off measurements run alone: every other test in this binary takes
/// a shared guard, those two take it exclusively, so TLS handshakes in
/// neighbouring tests do not eat the CPU they are timing.
static TIMING: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// Counts every query, then answers from overrides.
#[derive(Debug)]
struct CountingResolver {
    inner: OverrideResolver,
    queries: AtomicUsize,
}

impl Resolver for CountingResolver {
    fn resolve<'a>(&'a self, name: &'a HostName) -> ResolveFuture<'a> {
        self.queries.fetch_add(1, Ordering::SeqCst);
        self.inner.resolve(name)
    }
}

struct Proxy {
    registry: ProxyRegistry,
    events: Arc<MemoryEvents>,
    resolver: Arc<CountingResolver>,
    state: ProxyState,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

/// One session's two listeners.
#[derive(Clone, Copy)]
struct Listeners {
    explicit: SocketAddr,
    transparent: SocketAddr,
}

fn name(s: &str) -> HostName {
    HostName::parse(s).unwrap()
}

fn pats(p: &[&str]) -> Vec<DomainPattern> {
    p.iter().map(|s| DomainPattern::parse(s).unwrap()).collect()
}

fn loopback_config() -> ProxyConfig {
    ProxyConfig {
        allowed_cidrs: AllowedCidrs::parse(&["127.0.0.0/8"]).unwrap(),
        ..ProxyConfig::default()
    }
}

impl Proxy {
    fn new(config: ProxyConfig, overrides: &[(&str, &str)]) -> Self {
        Self::with_registry(ProxyRegistry::new(), config, overrides)
    }

    fn with_registry(
        registry: ProxyRegistry,
        config: ProxyConfig,
        overrides: &[(&str, &str)],
    ) -> Self {
        let map: HashMap<HostName, Vec<IpAddr>> = overrides
            .iter()
            .map(|(n, ip)| (name(n), vec![ip.parse().unwrap()]))
            .collect();
        let resolver = Arc::new(CountingResolver {
            inner: OverrideResolver::new(map),
            queries: AtomicUsize::new(0),
        });
        let events = Arc::new(MemoryEvents::new());
        let state = ProxyState {
            registry: registry.clone(),
            resolver: resolver.clone(),
            events: events.clone(),
            config: Arc::new(config),
        };
        Proxy {
            registry,
            events,
            resolver,
            state,
            shutdown: CancellationToken::new(),
            tasks: Vec::new(),
        }
    }

    async fn serve(&mut self, session: &str) -> Listeners {
        let sid = SessionId::new(session);
        self.registry.add_session(sid.clone());
        let e = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let t = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let l = Listeners {
            explicit: e.local_addr().unwrap(),
            transparent: t.local_addr().unwrap(),
        };
        self.tasks.push(tokio::spawn(run_explicit(
            e,
            sid.clone(),
            self.state.clone(),
            self.shutdown.clone(),
        )));
        self.tasks.push(tokio::spawn(run_transparent(
            t,
            sid,
            self.state.clone(),
            self.shutdown.clone(),
        )));
        l
    }

    fn grant(&self, session: &str, entry: Entry) {
        self.registry
            .grant(&SessionId::new(session), entry)
            .unwrap();
    }

    fn queries(&self) -> usize {
        self.resolver.queries.load(Ordering::SeqCst)
    }

    async fn refusal(&self) -> RefusalReason {
        eventually(|| self.events.refusals().last().map(|r| r.reason)).await
    }
}

/// Polls `f` until it returns `Some` (records are written after sockets
/// close, so they trail the client's view by a moment).
async fn eventually<T>(mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "condition not met within 5 s");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Sends a CONNECT and returns the stream and the response status line.
async fn connect_via(proxy: SocketAddr, target: &str) -> (TcpStream, String) {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let head = read_head(&mut s).await;
    (s, head.lines().next().unwrap_or_default().to_owned())
}

async fn read_head(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut b).await {
            Ok(1) => head.push(b[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// Asserts the proxy answers `status` and closes.
async fn expect_refused(proxy: SocketAddr, target: &str, status: &str) {
    let (mut s, line) = connect_via(proxy, target).await;
    assert!(
        line.starts_with(&format!("HTTP/1.1 {status}")),
        "{target}: {line}"
    );
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
        .await
        .expect("refused connection must close");
}

struct TestCa {
    roots: rustls::RootCertStore,
    acceptor: TlsAcceptor,
}

/// A CA and a leaf for `names`, with a rustls server config for the leaf.
fn test_ca(names: &[&str]) -> TestCa {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "zerolease test CA");
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().unwrap())
        .unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf =
        rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap()
            .signed_by(&leaf_key, &ca)
            .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der().clone()).unwrap();
    let server = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(leaf.der().to_vec())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
        )
        .unwrap();
    TestCa {
        roots,
        acceptor: TlsAcceptor::from(Arc::new(server)),
    }
}

/// A TLS echo server on loopback.
async fn tls_echo_upstream(acceptor: TlsAcceptor) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(s).await else {
                    return;
                };
                let mut buf = [0u8; 4096];
                while let Ok(n) = tls.read(&mut buf).await {
                    if n == 0 || tls.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                    let _ = tls.flush().await;
                }
                let _ = tls.shutdown().await;
            });
        }
    });
    addr
}

/// A plain TCP echo server on loopback.
async fn echo_upstream() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// An upstream that streams 1 KiB every 5 ms to each client, on plain
/// threads apart from the proxy's runtime (as a remote server would be),
/// and reports when the proxy ended its side (EOF or error).
fn streaming_upstream() -> (SocketAddr, std::sync::mpsc::Receiver<Instant>) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            let tx = tx.clone();
            std::thread::spawn(move || {
                use std::io::{ErrorKind, Read, Write};
                s.set_read_timeout(Some(Duration::from_millis(5))).unwrap();
                let chunk = [0x5au8; 1024];
                let mut buf = [0u8; 1024];
                loop {
                    if s.write_all(&chunk).is_err() {
                        break;
                    }
                    match s.read(&mut buf) {
                        Ok(0) => break,
                        Ok(_) => {}
                        Err(e)
                            if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                        Err(_) => break,
                    }
                }
                let _ = tx.send(Instant::now());
            });
        }
    });
    (addr, rx)
}

fn tls_connector(roots: rustls::RootCertStore) -> TlsConnector {
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    TlsConnector::from(Arc::new(config))
}

// ---------------------------------------------------------------- tests

#[tokio::test]
async fn leased_name_via_connect_carries_real_tls_end_to_end() {
    let _timing = TIMING.read().await;
    let ca = test_ca(&["git.test"]);
    let up = tls_echo_upstream(ca.acceptor.clone()).await;
    let mut p = Proxy::new(loopback_config(), &[("git.test", "127.0.0.1")]);
    let l = p.serve("s1").await;
    p.grant(
        "s1",
        Entry::lease("lease-1", "github-pat", pats(&["git.test"]), None)
            .with_ports(vec![up.port()]),
    );

    let (stream, status) = connect_via(l.explicit, &format!("git.test:{}", up.port())).await;
    assert_eq!(status, "HTTP/1.1 200 Connection established");
    // The client verifies the upstream's certificate through the tunnel:
    // the proxy does not terminate TLS.
    let mut tls = tls_connector(ca.roots)
        .connect(ServerName::try_from("git.test").unwrap(), stream)
        .await
        .expect("TLS handshake through the tunnel");
    tls.write_all(b"ping through the proxy").await.unwrap();
    let mut buf = [0u8; 22];
    tls.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping through the proxy");
    let snap = p.registry.snapshot(&SessionId::new("s1")).unwrap();
    assert_eq!(snap.tunnels.len(), 1);
    assert!(snap.tunnels[0].bytes_up > 0 && snap.tunnels[0].bytes_down > 0);
    tls.shutdown().await.unwrap();
    drop(tls);

    let rec = eventually(|| p.events.tunnels().pop()).await;
    assert_eq!(rec.entry, EntryId::new("lease-1"));
    assert_eq!(
        rec.kind,
        EntryKind::Lease {
            secret_name: "github-pat".into()
        }
    );
    assert_eq!(rec.host, name("git.test"));
    assert_eq!(rec.address, up);
    assert_eq!(rec.front_end, FrontEnd::Explicit);
    assert!(rec.bytes_up > 22 && rec.bytes_down > 22, "{rec:?}");
    assert!(matches!(
        rec.end,
        TunnelEnd::ClientClosed | TunnelEnd::UpstreamClosed
    ));
    assert_eq!(p.queries(), 1);
}

#[tokio::test]
async fn unleased_name_is_refused_before_any_dns_query() {
    let _timing = TIMING.read().await;
    let mut p = Proxy::new(loopback_config(), &[("other.test", "127.0.0.1")]);
    let l = p.serve("s1").await;
    p.grant("s1", Entry::allow("allowed", pats(&["git.test"])));
    for target in [
        "other.test:443",
        "evilgit.test:443",
        "git.test.evil.net:443",
    ] {
        expect_refused(l.explicit, target, "403").await;
        assert_eq!(p.refusal().await, RefusalReason::NotLeased);
    }
    assert_eq!(
        p.queries(),
        0,
        "an unleased name must never reach the resolver"
    );
    let snap = p.registry.snapshot(&SessionId::new("s1")).unwrap();
    assert_eq!(snap.refusals, 3);
}

#[tokio::test]
async fn ports_other_than_the_allowed_ones_are_refused() {
    let _timing = TIMING.read().await;
    let mut p = Proxy::new(loopback_config(), &[("git.test", "127.0.0.1")]);
    let l = p.serve("s1").await;
    p.grant("s1", Entry::allow("git", pats(&["git.test"])));
    for port in [22, 80, 8443] {
        expect_refused(l.explicit, &format!("git.test:{port}"), "403").await;
        assert_eq!(p.refusal().await, RefusalReason::PortNotAllowed);
    }
    assert_eq!(p.queries(), 0);
}

#[tokio::test]
async fn ip_literals_are_refused_unless_leased_exactly() {
    let _timing = TIMING.read().await;
    let up = echo_upstream().await;
    let mut p = Proxy::new(loopback_config(), &[]);
    let l = p.serve("s1").await;
    p.grant(
        "s1",
        Entry::allow("git", pats(&["git.test"])).with_ports(vec![up.port()]),
    );
    expect_refused(l.explicit, &format!("127.0.0.1:{}", up.port()), "403").await;
    assert_eq!(p.refusal().await, RefusalReason::IpLiteral);
    expect_refused(l.explicit, &format!("[::1]:{}", up.port()), "403").await;
    assert_eq!(p.refusal().await, RefusalReason::IpLiteral);

    // An entry for exactly that literal admits it, without DNS.
    p.grant(
        "s1",
        Entry::allow("lit", pats(&["127.0.0.1"])).with_ports(vec![up.port()]),
    );
    let (mut s, status) = connect_via(l.explicit, &format!("127.0.0.1:{}", up.port())).await;
    assert_eq!(status, "HTTP/1.1 200 Connection established");
    s.write_all(b"x").await.unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await.unwrap();
    assert_eq!(p.queries(), 0);
}

#[tokio::test]
async fn private_answers_are_refused_without_a_cidr_allowance() {
    let _timing = TIMING.read().await;
    let up = echo_upstream().await;
    let mut p = Proxy::new(
        ProxyConfig::default(),
        &[
            ("git.test", "127.0.0.1"),
            ("meta.test", "169.254.169.254"),
            ("lan.test", "10.0.0.1"),
            ("mapped.test", "::ffff:127.0.0.1"),
        ],
    );
    let l = p.serve("s1").await;
    p.grant(
        "s1",
        Entry::allow(
            "all",
            pats(&["git.test", "meta.test", "lan.test", "mapped.test"]),
        )
        .with_ports(vec![up.port()]),
    );
    for (host, addr) in [
        ("git.test", "127.0.0.1"),
        ("meta.test", "169.254.169.254"),
        ("lan.test", "10.0.0.1"),
        ("mapped.test", "::ffff:127.0.0.1"),
    ] {
        expect_refused(l.explicit, &format!("{host}:{}", up.port()), "403").await;
        let r = eventually(|| {
            p.events
                .refusals()
                .pop()
                .filter(|r| r.host == Some(name(host)))
        })
        .await;
        assert_eq!(r.reason, RefusalReason::PrivateAddress);
        assert_eq!(r.address, Some(addr.parse().unwrap()));
    }
}

#[tokio::test]
async fn requests_other_than_connect_and_malformed_heads_are_refused() {
    let _timing = TIMING.read().await;
    let mut p = Proxy::new(loopback_config(), &[]);
    let l = p.serve("s1").await;
    let cases: &[(&[u8], &str, RefusalReason)] = &[
        (
            b"GET http://git.test/ HTTP/1.1\r\nHost: git.test\r\n\r\n",
            "403",
            RefusalReason::NotConnect,
        ),
        (
            b"CONNECT evil.com@good.com:443 HTTP/1.1\r\n\r\n",
            "400",
            RefusalReason::InvalidName,
        ),
        (
            b"CONNECT git.test HTTP/1.1\r\n\r\n",
            "400",
            RefusalReason::Malformed,
        ),
        (
            b"CONNECT git.test:0 HTTP/1.1\r\n\r\n",
            "400",
            RefusalReason::Malformed,
        ),
        (
            b"CONNECT git.test:443 HTTP/1.1\n\n",
            "400",
            RefusalReason::Malformed,
        ),
    ];
    for (req, status, reason) in cases {
        let mut s = TcpStream::connect(l.explicit).await.unwrap();
        s.write_all(req).await.unwrap();
        let head = read_head(&mut s).await;
        assert!(head.starts_with(&format!("HTTP/1.1 {status}")), "{head}");
        assert_eq!(p.refusal().await, *reason);
    }
    // Header flood.
    let mut s = TcpStream::connect(l.explicit).await.unwrap();
    let mut req = b"CONNECT git.test:443 HTTP/1.1\r\n".to_vec();
    for i in 0..100 {
        req.extend_from_slice(format!("X-{i}: y\r\n").as_bytes());
    }
    req.extend_from_slice(b"\r\n");
    s.write_all(&req).await.unwrap();
    assert!(read_head(&mut s).await.starts_with("HTTP/1.1 431"));
    assert_eq!(p.refusal().await, RefusalReason::TooLarge);
    // An endless header line.
    let mut s = TcpStream::connect(l.explicit).await.unwrap();
    let _ = s.write_all(&vec![b'A'; 20_000]).await;
    assert!(read_head(&mut s).await.starts_with("HTTP/1.1 431"));
    assert_eq!(p.refusal().await, RefusalReason::TooLarge);
    assert_eq!(p.queries(), 0);
}

#[tokio::test]
async fn slow_request_heads_time_out() {
    let _timing = TIMING.read().await;
    let config = ProxyConfig {
        header_timeout: Duration::from_millis(200),
        ..loopback_config()
    };
    let mut p = Proxy::new(config, &[]);
    let l = p.serve("s1").await;
    let mut s = TcpStream::connect(l.explicit).await.unwrap();
    s.write_all(b"CONNECT git.test:443 HTTP/1.1\r\n")
        .await
        .unwrap();
    assert!(read_head(&mut s).await.starts_with("HTTP/1.1 408"));
    assert_eq!(p.refusal().await, RefusalReason::Timeout);
    // The transparent side just closes.
    let mut t = TcpStream::connect(l.transparent).await.unwrap();
    t.write_all(&[22, 3, 1]).await.unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), t.read_to_end(&mut rest))
        .await
        .unwrap();
    assert!(rest.is_empty());
    assert_eq!(p.refusal().await, RefusalReason::Timeout);
}

#[tokio::test]
async fn concurrent_connections_per_session_are_bounded() {
    let _timing = TIMING.read().await;
    let up = echo_upstream().await;
    let mut p = Proxy::with_registry(
        ProxyRegistry::with_max_tunnels(2),
        loopback_config(),
        &[("git.test", "127.0.0.1")],
    );
    let l = p.serve("s1").await;
    p.grant(
        "s1",
        Entry::allow("git", pats(&["git.test"])).with_ports(vec![up.port()]),
    );
    let target = format!("git.test:{}", up.port());
    let (a, sa) = connect_via(l.explicit, &target).await;
    let (b, sb) = connect_via(l.explicit, &target).await;
    assert!(sa.contains("200") && sb.contains("200"));
    expect_refused(l.explicit, &target, "429").await;
    assert_eq!(p.refusal().await, RefusalReason::TooManyTunnels);
    drop(a);
    drop(b);
    // Slots come back once the tunnels are gone.
    eventually(|| (p.events.tunnels().len() == 2).then_some(())).await;
    let (_c, sc) = connect_via(l.explicit, &target).await;
    assert!(sc.contains("200"), "{sc}");
}

#[tokio::test]
async fn idle_tunnels_are_closed() {
    let _timing = TIMING.read().await;
    let up = echo_upstream().await;
    let config = ProxyConfig {
        idle_timeout: Duration::from_millis(200),
        ..loopback_config()
    };
    let mut p = Proxy::new(config, &[("git.test", "127.0.0.1")]);
    let l = p.serve("s1").await;
    p.grant(
        "s1",
        Entry::allow("git", pats(&["git.test"])).with_ports(vec![up.port()]),
    );
    let (mut s, status) = connect_via(l.explicit, &format!("git.test:{}", up.port())).await;
    assert!(status.contains("200"));
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
        .await
        .expect("idle tunnel must close");
    let rec = eventually(|| p.events.tunnels().pop()).await;
    assert_eq!(rec.end, TunnelEnd::IdleTimeout);
}

#[tokio::test]
async fn transparent_mode_routes_by_sni_to_the_names_own_address() {
    let _timing = TIMING.read().await;
    let ca = test_ca(&["git.test"]);
    let up = tls_echo_upstream(ca.acceptor.clone()).await;
    let config = ProxyConfig {
        transparent_port: up.port(),
        ..loopback_config()
    };
    let mut p = Proxy::new(
        config,
        &[("git.test", "127.0.0.1"), ("other.test", "127.0.0.1")],
    );
    let l = p.serve("s1").await;
    p.grant(
        "s1",
        Entry::lease("lease-t", "token", pats(&["git.test"]), None).with_ports(vec![up.port()]),
    );
    // The client dials the proxy's port (as nftables' redirect would make
    // it), yet reaches the upstream the name resolves to.
    let tcp = TcpStream::connect(l.transparent).await.unwrap();
    let mut tls = tls_connector(ca.roots.clone())
        .connect(ServerName::try_from("git.test").unwrap(), tcp)
        .await
        .expect("TLS through the transparent front end");
    tls.write_all(b"hello sni").await.unwrap();
    let mut buf = [0u8; 9];
    tls.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"hello sni");
    drop(tls);
    let rec = eventually(|| p.events.tunnels().pop()).await;
    assert_eq!(rec.front_end, FrontEnd::Transparent);
    assert_eq!(rec.address, up);
    assert_eq!(rec.host, name("git.test"));

    // An unleased SNI: the connection is closed, nothing is resolved.
    let before = p.queries();
    let tcp = TcpStream::connect(l.transparent).await.unwrap();
    let refused = tls_connector(ca.roots)
        .connect(ServerName::try_from("other.test").unwrap(), tcp)
        .await;
    assert!(refused.is_err());
    assert_eq!(p.refusal().await, RefusalReason::NotLeased);
    assert_eq!(p.queries(), before);
}

#[tokio::test]
async fn transparent_mode_reassembles_a_segmented_hello_and_replays_it_unchanged() {
    let _timing = TIMING.read().await;
    // A plain echo upstream sends the replayed ClientHello straight back, so
    // the client can compare it with what it sent.
    let up = echo_upstream().await;
    let config = ProxyConfig {
        transparent_port: up.port(),
        ..loopback_config()
    };
    let mut p = Proxy::new(config, &[("git.test", "127.0.0.1")]);
    let l = p.serve("s1").await;
    p.grant(
        "s1",
        Entry::allow("git", pats(&["git.test"])).with_ports(vec![up.port()]),
    );
    // Records of 50 bytes, sent in TCP segments of 17 bytes.
    let hello = zerolease::proxy::sni::build_client_hello(&[b"git.test"], 50);
    let mut s = TcpStream::connect(l.transparent).await.unwrap();
    s.set_nodelay(true).unwrap();
    for seg in hello.chunks(17) {
        s.write_all(seg).await.unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let mut back = vec![0u8; hello.len()];
    s.read_exact(&mut back).await.unwrap();
    assert_eq!(back, hello);
    drop(s);
    let rec = eventually(|| p.events.tunnels().pop()).await;
    assert_eq!(rec.host, name("git.test"));
    assert_eq!(rec.bytes_up, hello.len() as u64);
}

#[tokio::test]
async fn transparent_mode_refuses_hellos_without_one_valid_sni() {
    let _timing = TIMING.read().await;
    let mut p = Proxy::new(loopback_config(), &[]);
    let l = p.serve("s1").await;
    let cases: Vec<(Vec<u8>, RefusalReason)> = vec![
        (
            zerolease::proxy::sni::build_client_hello(&[], 100),
            RefusalReason::NoSni,
        ),
        (
            zerolease::proxy::sni::build_client_hello(&[b"a.test", b"b.test"], 100),
            RefusalReason::MultipleSni,
        ),
        (
            zerolease::proxy::sni::build_client_hello(&[b"a_b.test"], 100),
            RefusalReason::InvalidName,
        ),
        (b"GET / HTTP/1.1\r\n\r\n".to_vec(), RefusalReason::Malformed),
    ];
    for (bytes, reason) in cases {
        let mut s = TcpStream::connect(l.transparent).await.unwrap();
        s.write_all(&bytes).await.unwrap();
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
            .await
            .unwrap();
        assert!(rest.is_empty());
        assert_eq!(p.refusal().await, reason);
    }
    assert_eq!(p.queries(), 0);
}

#[tokio::test]
async fn two_sessions_cannot_use_each_others_entries() {
    let _timing = TIMING.read().await;
    let up = echo_upstream().await;
    let mut p = Proxy::new(
        loopback_config(),
        &[("a.test", "127.0.0.1"), ("b.test", "127.0.0.1")],
    );
    let la = p.serve("a").await;
    let lb = p.serve("b").await;
    p.grant(
        "a",
        Entry::allow("a-only", pats(&["a.test"])).with_ports(vec![up.port()]),
    );
    p.grant(
        "b",
        Entry::allow("b-only", pats(&["b.test"])).with_ports(vec![up.port()]),
    );
    let port = up.port();
    expect_refused(lb.explicit, &format!("a.test:{port}"), "403").await;
    expect_refused(la.explicit, &format!("b.test:{port}"), "403").await;
    let (mut sa, st) = connect_via(la.explicit, &format!("a.test:{port}")).await;
    assert!(st.contains("200"));
    let (mut sb, st) = connect_via(lb.explicit, &format!("b.test:{port}")).await;
    assert!(st.contains("200"));
    // Revoking session a leaves session b's tunnel working.
    assert!(p.registry.revoke_session(&SessionId::new("a")));
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), sa.read_to_end(&mut rest))
        .await
        .unwrap();
    sb.write_all(b"still here").await.unwrap();
    let mut buf = [0u8; 10];
    sb.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"still here");
    expect_refused(la.explicit, &format!("a.test:{port}"), "403").await;
}

/// Opens `n` tunnels to a streaming upstream; each client, on a thread of
/// its own (as a guest process would be), reads until its connection dies
/// and returns when that happened.
async fn open_streaming_tunnels(
    l: Listeners,
    target: &str,
    n: usize,
) -> Vec<std::thread::JoinHandle<Instant>> {
    let mut clients = Vec::new();
    for _ in 0..n {
        let (mut s, status) = connect_via(l.explicit, target).await;
        assert!(status.contains("200"), "{status}");
        let mut first = [0u8; 1024];
        s.read_exact(&mut first).await.unwrap();
        let std = s.into_std().unwrap();
        std.set_nonblocking(false).unwrap();
        clients.push(std::thread::spawn(move || {
            use std::io::Read;
            let mut s = std;
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => return Instant::now(),
                    Ok(_) => {}
                }
            }
        }));
    }
    clients
}

/// Joins the client threads and collects the upstream reports, without
/// blocking the runtime the proxy runs on.
async fn cut_times(
    clients: Vec<std::thread::JoinHandle<Instant>>,
    upstream_ends: std::sync::mpsc::Receiver<Instant>,
    n: usize,
) -> (Vec<Instant>, Vec<Instant>) {
    tokio::task::spawn_blocking(move || {
        let client: Vec<Instant> = clients.into_iter().map(|c| c.join().unwrap()).collect();
        let upstream: Vec<Instant> = (0..n)
            .map(|_| upstream_ends.recv_timeout(Duration::from_secs(5)).unwrap())
            .collect();
        (client, upstream)
    })
    .await
    .unwrap()
}

fn percentile(mut v: Vec<Duration>, p: usize) -> Duration {
    v.sort();
    let idx = (v.len() * p).div_ceil(100).saturating_sub(1);
    v[idx.min(v.len() - 1)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_lease_cuts_100_live_tunnels_within_50ms() {
    let _timing = TIMING.write().await;
    let (up, upstream_ends) = streaming_upstream();
    let mut p = Proxy::new(loopback_config(), &[("bulk.test", "127.0.0.1")]);
    let l = p.serve("s1").await;
    p.grant(
        "s1",
        Entry::lease("lease-bulk", "token", pats(&["bulk.test"]), None).with_ports(vec![up.port()]),
    );
    let tasks = open_streaming_tunnels(l, &format!("bulk.test:{}", up.port()), 100).await;
    assert_eq!(
        p.registry
            .snapshot(&SessionId::new("s1"))
            .unwrap()
            .tunnels
            .len(),
        100
    );

    let called = Instant::now();
    assert_eq!(p.registry.revoke_lease(&EntryId::new("lease-bulk")), 1);
    let revoked = Instant::now();

    let (client, upstream) = cut_times(tasks, upstream_ends, 100).await;
    let last = client.iter().chain(&upstream).max().unwrap();
    println!(
        "revoke_lease call took {:?}; last side closed {:?} after the call began",
        revoked - called,
        last.saturating_duration_since(called)
    );
    let client_cut: Vec<Duration> = client
        .iter()
        .map(|t| t.saturating_duration_since(revoked))
        .collect();
    let upstream_cut: Vec<Duration> = upstream
        .iter()
        .map(|t| t.saturating_duration_since(revoked))
        .collect();
    let (c50, c99) = (
        percentile(client_cut.clone(), 50),
        percentile(client_cut, 99),
    );
    let (u50, u99) = (
        percentile(upstream_cut.clone(), 50),
        percentile(upstream_cut, 99),
    );
    println!(
        "revocation cut-off over 100 tunnels: client p50 {c50:?} p99 {c99:?}; upstream p50 {u50:?} p99 {u99:?}"
    );
    assert!(c99 < Duration::from_millis(50), "client side p99 {c99:?}");
    assert!(u99 < Duration::from_millis(50), "upstream side p99 {u99:?}");

    let recs = eventually(|| {
        let t = p.events.tunnels();
        (t.len() == 100).then_some(t)
    })
    .await;
    assert!(recs.iter().all(|r| r.end == TunnelEnd::Revoked));
    assert!(
        p.registry
            .snapshot(&SessionId::new("s1"))
            .unwrap()
            .tunnels
            .is_empty()
    );
    expect_refused(l.explicit, &format!("bulk.test:{}", up.port()), "403").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_cuts_live_tunnels_on_its_own_clock() {
    let _timing = TIMING.write().await;
    let (up, upstream_ends) = streaming_upstream();
    let mut p = Proxy::new(loopback_config(), &[("bulk.test", "127.0.0.1")]);
    let l = p.serve("s1").await;
    let expires = Instant::now() + Duration::from_millis(400);
    p.grant(
        "s1",
        Entry::lease("lease-exp", "token", pats(&["bulk.test"]), Some(expires))
            .with_ports(vec![up.port()]),
    );
    let tasks = open_streaming_tunnels(l, &format!("bulk.test:{}", up.port()), 10).await;
    assert!(
        Instant::now() < expires,
        "set-up took longer than the lease"
    );
    let (client, upstream) = cut_times(tasks, upstream_ends, 10).await;
    assert!(client.iter().all(|t| *t >= expires), "cut before expiry");
    let cut: Vec<Duration> = client
        .iter()
        .chain(&upstream)
        .map(|t| t.saturating_duration_since(expires))
        .collect();
    let p99 = percentile(cut, 99);
    println!("expiry cut-off p99 {p99:?}");
    assert!(p99 < Duration::from_millis(50), "p99 {p99:?}");
    let recs = eventually(|| {
        let t = p.events.tunnels();
        (t.len() == 10).then_some(t)
    })
    .await;
    assert!(recs.iter().all(|r| r.end == TunnelEnd::Expired));
    expect_refused(l.explicit, &format!("bulk.test:{}", up.port()), "403").await;
}

#[tokio::test]
async fn access_fails_closed_when_it_cannot_be_audited() {
    let _timing = TIMING.read().await;
    let up = echo_upstream().await;
    let mut p = Proxy::new(loopback_config(), &[("git.test", "127.0.0.1")]);
    let l = p.serve("s1").await;
    p.grant(
        "s1",
        Entry::allow("git", pats(&["git.test"])).with_ports(vec![up.port()]),
    );
    p.events.set_fail_opening(true);
    expect_refused(l.explicit, &format!("git.test:{}", up.port()), "503").await;
    assert_eq!(p.refusal().await, RefusalReason::AuditFailed);
    assert!(
        p.registry
            .snapshot(&SessionId::new("s1"))
            .unwrap()
            .tunnels
            .is_empty()
    );
    p.events.set_fail_opening(false);
    let (_s, status) = connect_via(l.explicit, &format!("git.test:{}", up.port())).await;
    assert!(status.contains("200"), "{status}");
}

#[tokio::test]
async fn run_session_serves_every_front_end_it_is_given() {
    let _timing = TIMING.read().await;
    use hickory_proto::op::{Message, MessageType, OpCode, Query};
    use hickory_proto::rr::{Name, RData, RecordType};
    use zerolease::proxy::dns::DnsStubConfig;

    let up = echo_upstream().await;
    let registry = ProxyRegistry::new();
    let session = SessionId::new("whole");
    registry.add_session(session.clone());
    registry
        .grant(
            &session,
            Entry::allow("git", pats(&["git.test"])).with_ports(vec![up.port()]),
        )
        .unwrap();
    let events = Arc::new(MemoryEvents::new());
    let state = ProxyState::new(
        registry,
        Arc::new(OverrideResolver::new(HashMap::from([(
            name("git.test"),
            vec![up.ip()],
        )]))),
        events.clone(),
        loopback_config(),
    );
    let explicit = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let explicit_addr = explicit.local_addr().unwrap();
    let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let udp_addr = udp.local_addr().unwrap();
    let listeners = SessionListeners {
        explicit: Some(explicit),
        dns_udp: Some(udp),
        dns: Some(DnsStubConfig {
            answer: "10.200.0.1".parse().unwrap(),
            ttl: 5,
        }),
        ..SessionListeners::default()
    };
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(run_session(listeners, session, state, shutdown.clone()));

    let (mut s, status) = connect_via(explicit_addr, &format!("git.test:{}", up.port())).await;
    assert!(status.contains("200"), "{status}");
    s.write_all(b"z").await.unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await.unwrap();

    let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut q = Message::new(1, MessageType::Query, OpCode::Query);
    q.add_query(Query::query(
        Name::from_ascii("git.test.").unwrap(),
        RecordType::A,
    ));
    client
        .send_to(&q.to_vec().unwrap(), udp_addr)
        .await
        .unwrap();
    let mut buf = [0u8; 512];
    let (n, _) = tokio::time::timeout(Duration::from_secs(5), client.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let r = Message::from_vec(&buf[..n]).unwrap();
    assert_eq!(
        r.answers[0].data,
        RData::A("10.200.0.1".parse::<std::net::Ipv4Addr>().unwrap().into())
    );

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(events.tunnels().pop().unwrap().end, TunnelEnd::Shutdown);
}

/// Expiry on a paused clock: the tunnel lives exactly until the lease's
/// monotonic deadline, however far away, without any real waiting.
#[tokio::test(start_paused = true)]
async fn expiry_with_a_paused_clock_cuts_at_the_deadline() {
    let _timing = TIMING.read().await;
    let up = echo_upstream().await;
    let config = ProxyConfig {
        idle_timeout: Duration::from_secs(24 * 3600),
        ..loopback_config()
    };
    let mut p = Proxy::new(config, &[("git.test", "127.0.0.1")]);
    let l = p.serve("s1").await;
    let granted = Instant::now();
    let ttl = Duration::from_secs(3600);
    p.grant(
        "s1",
        Entry::lease(
            "lease-hour",
            "token",
            pats(&["git.test"]),
            Some(granted + ttl),
        )
        .with_ports(vec![up.port()]),
    );
    let (mut s, status) = connect_via(l.explicit, &format!("git.test:{}", up.port())).await;
    assert!(status.contains("200"), "{status}");
    s.write_all(b"a").await.unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await.unwrap();
    tokio::time::advance(ttl - Duration::from_secs(1)).await;
    // Still open a second before the deadline.
    s.write_all(b"b").await.unwrap();
    s.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"b");
    // Now wait: the runtime's clock jumps to the deadline and the cut
    // follows.
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest).await;
    let lived = granted.elapsed();
    assert!(
        lived >= ttl && lived < ttl + Duration::from_secs(1),
        "{lived:?}"
    );
    let rec = eventually(|| p.events.tunnels().pop()).await;
    assert_eq!(rec.end, TunnelEnd::Expired);
}

#[tokio::test]
async fn garbage_on_both_listeners_leaves_the_proxy_serving() {
    let _timing = TIMING.read().await;
    let up = echo_upstream().await;
    let config = ProxyConfig {
        header_timeout: Duration::from_millis(500),
        ..loopback_config()
    };
    let mut p = Proxy::new(config, &[("git.test", "127.0.0.1")]);
    let l = p.serve("s1").await;
    p.grant(
        "s1",
        Entry::allow("git", pats(&["git.test"])).with_ports(vec![up.port()]),
    );
    // A fixed-seed xorshift stream: reproducible garbage.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut conns = Vec::new();
    for i in 0..60 {
        let len = (next() % 20_000) as usize;
        let mut bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        // Some start like the real thing, then go wrong.
        match i % 3 {
            0 => bytes
                .splice(0..0, b"CONNECT git.test:".iter().copied())
                .for_each(drop),
            1 => bytes
                .splice(0..0, [22u8, 3, 1, 0x10, 0x00, 1, 0, 0x0f])
                .for_each(drop),
            _ => {}
        }
        let addr = if i % 2 == 0 {
            l.explicit
        } else {
            l.transparent
        };
        conns.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let _ = s.write_all(&bytes).await;
            let mut sink = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut sink)).await;
        }));
    }
    for c in conns {
        c.await.unwrap();
    }
    let (mut s, status) = connect_via(l.explicit, &format!("git.test:{}", up.port())).await;
    assert!(status.contains("200"), "{status}");
    s.write_all(b"ok").await.unwrap();
    let mut b = [0u8; 2];
    s.read_exact(&mut b).await.unwrap();
    assert_eq!(p.queries(), 1, "garbage must never reach the resolver");
}

#[tokio::test]
async fn shutdown_closes_tunnels_and_returns() {
    let _timing = TIMING.read().await;
    let up = echo_upstream().await;
    let mut p = Proxy::new(loopback_config(), &[("git.test", "127.0.0.1")]);
    let l = p.serve("s1").await;
    p.grant(
        "s1",
        Entry::allow("git", pats(&["git.test"])).with_ports(vec![up.port()]),
    );
    let (mut s, status) = connect_via(l.explicit, &format!("git.test:{}", up.port())).await;
    assert!(status.contains("200"));
    p.shutdown.cancel();
    for t in std::mem::take(&mut p.tasks) {
        tokio::time::timeout(Duration::from_secs(5), t)
            .await
            .unwrap()
            .unwrap();
    }
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
        .await
        .unwrap();
    assert_eq!(p.events.tunnels().pop().unwrap().end, TunnelEnd::Shutdown);
}
