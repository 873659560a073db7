//! Proxy overhead over loopback, as ratios against a baseline measured in
//! the same run:
//!
//! - bulk throughput: `ZEROLEASE_BENCH_BYTES` (default 1 GiB) sent to a sink
//!   directly, then through a CONNECT tunnel;
//! - set-up latency: `ZEROLEASE_BENCH_CONNECTS` (default 500) plain TCP
//!   connects vs CONNECT round trips (connect, request, `200`), p50/p99.
//!
//! Run: `cargo bench -p zerolease --bench proxy` (add
//! `ZEROLEASE_BENCH_BYTES=268435456` for a shorter run).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use zerolease::domain::{DomainPattern, HostName};
use zerolease::proxy::addr::AllowedCidrs;
use zerolease::proxy::events::TracingEvents;
use zerolease::proxy::registry::{Entry, ProxyRegistry, SessionId};
use zerolease::proxy::resolve::OverrideResolver;
use zerolease::proxy::server::{ProxyConfig, ProxyState, run_explicit};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Reads everything, then answers with the byte count.
async fn sink() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let _ = s.set_nodelay(true);
                let mut buf = vec![0u8; 256 * 1024];
                let mut total = 0u64;
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) => break,
                        Ok(n) => total += n as u64,
                        Err(_) => return,
                    }
                }
                let _ = s.write_all(&total.to_be_bytes()).await;
            });
        }
    });
    addr
}

async fn connect_tunnel(proxy: SocketAddr, target: &str) -> TcpStream {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    let _ = s.set_nodelay(true);
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut b).await.unwrap();
        head.push(b[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    s
}

async fn push(mut s: TcpStream, bytes: usize) -> Duration {
    let chunk = vec![0xa5u8; 256 * 1024];
    let start = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len());
        s.write_all(&chunk[..n]).await.unwrap();
        left -= n;
    }
    s.shutdown().await.unwrap();
    let mut ack = [0u8; 8];
    s.read_exact(&mut ack).await.unwrap();
    assert_eq!(u64::from_be_bytes(ack), bytes as u64);
    start.elapsed()
}

fn pct(v: &mut [Duration], p: usize) -> Duration {
    v.sort();
    v[((v.len() * p).div_ceil(100))
        .saturating_sub(1)
        .min(v.len() - 1)]
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let bytes = env_usize("ZEROLEASE_BENCH_BYTES", 1 << 30);
        let connects = env_usize("ZEROLEASE_BENCH_CONNECTS", 500);
        let up = sink().await;
        let name = HostName::parse("bench.test").unwrap();
        let registry = ProxyRegistry::with_max_tunnels(connects + 16);
        let session = SessionId::new("bench");
        registry.add_session(session.clone());
        registry
            .grant(
                &session,
                Entry::allow("bench", vec![DomainPattern::Exact(name.clone())])
                    .with_ports(vec![up.port()]),
            )
            .unwrap();
        let state = ProxyState {
            registry,
            resolver: Arc::new(OverrideResolver::new(HashMap::from([(
                name,
                vec![up.ip()],
            )]))),
            events: Arc::new(TracingEvents),
            config: Arc::new(ProxyConfig {
                allowed_cidrs: AllowedCidrs::parse(&["127.0.0.0/8"]).unwrap(),
                ..ProxyConfig::default()
            }),
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(run_explicit(listener, session, state, shutdown.clone()));
        let target = format!("bench.test:{}", up.port());

        // Throughput.
        let direct = {
            let s = TcpStream::connect(up).await.unwrap();
            let _ = s.set_nodelay(true);
            push(s, bytes).await
        };
        let proxied = push(connect_tunnel(proxy, &target).await, bytes).await;
        let mib = bytes as f64 / (1024.0 * 1024.0);
        let (d, p) = (mib / direct.as_secs_f64(), mib / proxied.as_secs_f64());
        println!(
            "throughput {mib:.0} MiB: direct {d:.0} MiB/s, proxied {p:.0} MiB/s, ratio {:.2}",
            p / d
        );

        // Set-up latency.
        let mut direct = Vec::with_capacity(connects);
        let mut proxied = Vec::with_capacity(connects);
        for _ in 0..connects {
            let t = Instant::now();
            let s = TcpStream::connect(up).await.unwrap();
            direct.push(t.elapsed());
            drop(s);
            let t = Instant::now();
            let s = connect_tunnel(proxy, &target).await;
            proxied.push(t.elapsed());
            drop(s);
        }
        let (d50, d99) = (pct(&mut direct, 50), pct(&mut direct, 99));
        let (p50, p99) = (pct(&mut proxied, 50), pct(&mut proxied, 99));
        println!(
            "set-up over {connects} connects: direct p50 {d50:?} p99 {d99:?}; CONNECT p50 {p50:?} p99 {p99:?}; ratio p50 {:.1} p99 {:.1}",
            p50.as_secs_f64() / d50.as_secs_f64(),
            p99.as_secs_f64() / d99.as_secs_f64()
        );
        shutdown.cancel();
        let _ = server.await;
    });
}
