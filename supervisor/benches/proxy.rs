//! Proxy overhead over loopback, each figure against a baseline measured in
//! the same run:
//!
//! - tunnel throughput: `ZEROLEASE_BENCH_BYTES` (default 1 GiB) sent to a
//!   sink directly, through the proxy (a child process, as squid is), and
//!   through squid, `ZEROLEASE_BENCH_ROUNDS` (default 5) times each in
//!   rotated order; the medians are compared and the ranges shown;
//! - CONNECT set-up latency p50/p99: `ZEROLEASE_BENCH_CONNECTS` (default 500)
//!   rounds of a plain TCP connect, a proxy CONNECT and a squid CONNECT;
//! - revocation cut-off p50/p99: `ZEROLEASE_BENCH_STREAMS` (default 100)
//!   tunnels streaming from an endless source; time from `revoke_session`
//!   returning to each client seeing EOF or a reset, against the same streams
//!   opened directly and aborted by the source itself;
//! - idle tunnel memory: `ZEROLEASE_BENCH_IDLE` (default 10,000) idle
//!   tunnels held by proxies in child processes, the growth of their RSS
//!   (VmRSS) divided by the count, against a plain server child holding as
//!   many accepted idle connections. Kernel socket memory is not in RSS. A
//!   proxy holds four descriptors per tunnel (two sockets, two duplicates for
//!   the registry), so when RLIMIT_NOFILE cannot hold them all in one process
//!   the tunnels are spread over several proxy processes (as over several
//!   sessions), and the output says how many.
//!
//! Squid runs only when `ZEROLEASE_BENCH_SQUID=127.0.0.1:PORT` names one that
//! allows CONNECT to `127.0.0.1:ZEROLEASE_BENCH_UPSTREAM_PORT` (the sink's
//! port); `scripts/bench proxy` starts one.
//!
//! Run: `scripts/bench proxy [--json]`, or `cargo bench -p zerolease --bench
//! proxy [-- --json]` without squid.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use zerolease::domain::{DomainPattern, HostName};
use zerolease::proxy::addr::AllowedCidrs;
use zerolease::proxy::events::TracingEvents;
use zerolease::proxy::registry::{Entry, ProxyRegistry, SessionId};
use zerolease::proxy::resolve::OverrideResolver;
use zerolease::proxy::server::{ProxyConfig, ProxyState, run_explicit};

const HOST: &str = "bench.test";

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One figure against its baseline.
struct Metric {
    name: &'static str,
    value: f64,
    unit: &'static str,
    baseline_name: &'static str,
    baseline: f64,
    /// Further labelled fields (goals, error counts, context).
    extra: Vec<(&'static str, Value)>,
}

impl Metric {
    fn new(
        name: &'static str,
        value: f64,
        unit: &'static str,
        baseline_name: &'static str,
        baseline: f64,
    ) -> Self {
        Metric {
            name,
            value,
            unit,
            baseline_name,
            baseline,
            extra: Vec::new(),
        }
    }
    fn with(mut self, key: &'static str, v: impl Into<Value>) -> Self {
        self.extra.push((key, v.into()));
        self
    }
    fn ratio(&self) -> f64 {
        self.value / self.baseline
    }
}

fn round(v: f64, places: i32) -> f64 {
    let f = 10f64.powi(places);
    (v * f).round() / f
}

fn print(metrics: &[Metric], as_json: bool) {
    if as_json {
        for m in metrics {
            let mut o = json!({
                "metric": m.name,
                "value": round(m.value, 3),
                "unit": m.unit,
                "baseline": round(m.baseline, 3),
                "baseline_metric": m.baseline_name,
                "ratio": round(m.ratio(), 3),
            });
            for (k, v) in &m.extra {
                o[*k] = v.clone();
            }
            println!("{o}");
        }
        return;
    }
    println!(
        "{:<36} {:>12} {:>8} {:>26} {:>12} {:>8}  notes",
        "metric", "value", "unit", "baseline", "value", "ratio"
    );
    for m in metrics {
        let notes = m
            .extra
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ");
        println!(
            "{:<36} {:>12.3} {:>8} {:>26} {:>12.3} {:>8.3}  {notes}",
            m.name,
            m.value,
            m.unit,
            m.baseline_name,
            m.baseline,
            m.ratio()
        );
    }
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status")
}

fn nofile_limit() -> u64 {
    let limits = std::fs::read_to_string("/proc/self/limits").expect("read /proc/self/limits");
    limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Reads a big-endian u64 length, then that many bytes, then answers with
/// the count. (No half-close: squid ends the whole tunnel on the first FIN.)
async fn sink(port: u16) -> SocketAddr {
    let l = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let _ = s.set_nodelay(true);
                let mut len = [0u8; 8];
                if s.read_exact(&mut len).await.is_err() {
                    return;
                }
                let mut left = u64::from_be_bytes(len);
                let mut buf = vec![0u8; 256 * 1024];
                let mut total = 0u64;
                while left > 0 {
                    let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    match s.read(&mut buf[..want]).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            total += n as u64;
                            left -= n as u64;
                        }
                    }
                }
                let _ = s.write_all(&total.to_be_bytes()).await;
            });
        }
    });
    addr
}

/// Writes without end to every connection until `abort`, then resets them
/// (linger 0, close): the quickest a local sender can cut a stream.
async fn source(abort: CancellationToken) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let abort = abort.clone();
            tokio::spawn(async move {
                let chunk = vec![0x5au8; 64 * 1024];
                let write = async { while s.write_all(&chunk).await.is_ok() {} };
                tokio::select! {
                    _ = abort.cancelled() => {}
                    _ = write => {}
                }
                let _ = s.set_zero_linger();
            });
        }
    });
    addr
}

/// Accepts and holds every connection, idle.
async fn holder() -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let c = count.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            held.push(s);
            c.store(held.len(), Ordering::Relaxed);
        }
    });
    (addr, count)
}

struct Proxy {
    addr: SocketAddr,
    registry: ProxyRegistry,
    session: SessionId,
    shutdown: CancellationToken,
    server: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// A proxy whose one session may reach `bench.test` (= 127.0.0.1) on
    /// `port`.
    async fn start(port: u16, max_tunnels: usize) -> Proxy {
        let name = HostName::parse(HOST).unwrap();
        let registry = ProxyRegistry::with_max_tunnels(max_tunnels);
        let session = SessionId::new("bench");
        registry.add_session(session.clone());
        registry
            .grant(
                &session,
                Entry::allow("bench", vec![DomainPattern::Exact(name.clone())])
                    .with_ports(vec![port]),
            )
            .unwrap();
        let state = ProxyState::new(
            registry.clone(),
            Arc::new(OverrideResolver::new(HashMap::from([(
                name,
                vec!["127.0.0.1".parse().unwrap()],
            )]))),
            Arc::new(TracingEvents),
            ProxyConfig {
                allowed_cidrs: AllowedCidrs::parse(&["127.0.0.0/8"]).unwrap(),
                ..ProxyConfig::default()
            },
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(run_explicit(
            listener,
            session.clone(),
            state,
            shutdown.clone(),
        ));
        Proxy {
            addr,
            registry,
            session,
            shutdown,
            server,
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.server.await;
    }
}

/// Opens a CONNECT tunnel to `target` through the proxy at `via`; the
/// error says what went wrong.
async fn try_tunnel(via: SocketAddr, target: &str) -> Result<TcpStream, String> {
    let io = |e: std::io::Error| e.to_string();
    let mut s = TcpStream::connect(via).await.map_err(io)?;
    let _ = s.set_nodelay(true);
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await
        .map_err(io)?;
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut b).await.map_err(io)?;
        head.push(b[0]);
    }
    if head.starts_with(b"HTTP/1.1 200") || head.starts_with(b"HTTP/1.0 200") {
        Ok(s)
    } else {
        Err(format!(
            "refused: {}",
            String::from_utf8_lossy(&head).trim_end()
        ))
    }
}

async fn tunnel(via: SocketAddr, target: &str) -> TcpStream {
    match try_tunnel(via, target).await {
        Ok(s) => s,
        Err(e) => panic!("CONNECT {target} via {via} failed: {e}"),
    }
}

async fn push(mut s: TcpStream, bytes: usize) -> Duration {
    let chunk = vec![0xa5u8; 256 * 1024];
    let start = Instant::now();
    s.write_all(&(bytes as u64).to_be_bytes()).await.unwrap();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len());
        s.write_all(&chunk[..n]).await.unwrap();
        left -= n;
    }
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

/// User plus system CPU time of a process (`self` or a pid), all threads,
/// from `/proc/<pid>/stat` (in clock ticks).
fn cpu_time(pid: &str) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/PID/stat");
    // Fields after the command name, which ends at the last ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    let per_second = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .and_then(|t| u64::try_from(t).ok())
        .filter(|t| *t > 0)
        .unwrap_or(100);
    Duration::from_micros(ticks * 1_000_000 / per_second)
}

/// The median of `v` (the mean of the middle two for an even count).
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Throughput and set-up latency: direct, proxy and (when given) squid.
async fn tunnels(metrics: &mut Vec<Metric>, squid: Option<SocketAddr>) {
    let bytes = env_usize("ZEROLEASE_BENCH_BYTES", 1 << 30);
    let connects = env_usize("ZEROLEASE_BENCH_CONNECTS", 500);
    let up = sink(env_usize("ZEROLEASE_BENCH_UPSTREAM_PORT", 0) as u16).await;
    // The proxy runs in a child process, as it does in a session and as
    // squid does here: the kernel, not one shared runtime, places the
    // client, the proxy and the sink on the cores.
    let (proxy_child, proxy_addr) = Child::spawn(&["proxy", &up.port().to_string()]).await;
    let target = format!("{HOST}:{}", up.port());
    let squid_target = up.to_string();

    let mib = bytes as f64 / (1024.0 * 1024.0);
    let rate = |d: Duration| mib / d.as_secs_f64();
    // Rounds of direct, proxy and squid in turn, the order rotated each
    // round, so drift and one-off stalls hit all three alike; the medians
    // are compared.
    let rounds = env_usize("ZEROLEASE_BENCH_ROUNDS", 5).max(1);
    let (mut direct, mut proxied, mut via_squid) = (Vec::new(), Vec::new(), Vec::new());
    // CPU time: this process's (client and sink) over the direct rounds,
    // the proxy child's over the proxied ones.
    let child_pid = proxy_child.proc.id().expect("the proxy child runs");
    let (mut endpoints_cpu, mut proxy_cpu) = (Duration::ZERO, Duration::ZERO);
    // The client's and sink's CPU over the proxied rounds too: the proxy's
    // cost to them (smaller reads, more wakeups) besides its own.
    let mut proxied_endpoints_cpu = Duration::ZERO;
    for round in 0..rounds {
        for k in 0..3 {
            match (round + k) % 3 {
                0 => {
                    let s = TcpStream::connect(up).await.unwrap();
                    let _ = s.set_nodelay(true);
                    let cpu = cpu_time("self");
                    direct.push(rate(push(s, bytes).await));
                    endpoints_cpu += cpu_time("self") - cpu;
                }
                1 => {
                    let s = tunnel(proxy_addr, &target).await;
                    let cpu = cpu_time(&child_pid.to_string());
                    let own = cpu_time("self");
                    proxied.push(rate(push(s, bytes).await));
                    proxy_cpu += cpu_time(&child_pid.to_string()) - cpu;
                    proxied_endpoints_cpu += cpu_time("self") - own;
                }
                _ => {
                    if let Some(squid) = squid {
                        via_squid.push(rate(push(tunnel(squid, &squid_target).await, bytes).await));
                    }
                }
            }
        }
    }
    let spread = |v: &[f64]| {
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(0.0, f64::max);
        format!("{lo:.0}..{hi:.0}")
    };
    let (direct_spread, proxied_spread) = (spread(&direct), spread(&proxied));
    let (direct, proxied) = (median(&mut direct), median(&mut proxied));
    let goal = "proxy >= 0.90 x direct and > squid";
    metrics.push(
        Metric::new(
            "proxy_tunnel_throughput",
            proxied,
            "MiB/s",
            "direct_tcp_throughput",
            direct,
        )
        .with("bytes", bytes)
        .with("rounds", rounds)
        .with("range", proxied_spread)
        .with("baseline_range", direct_spread)
        // Client, proxy and sink are three busy threads: on two cores they
        // contend, which the CPU-per-GiB figure below shows.
        .with(
            "cpus",
            std::thread::available_parallelism().map_or(0, std::num::NonZeroUsize::get),
        )
        .with("goal", goal),
    );
    let gib = (rounds * bytes) as f64 / f64::from(1u32 << 30);
    metrics.push(
        Metric::new(
            "proxy_cpu_per_gib",
            ms(proxy_cpu) / gib,
            "ms",
            "direct_endpoints_cpu_per_gib",
            ms(endpoints_cpu) / gib,
        )
        .with(
            "note",
            "CPU time of the proxy process per GiB relayed vs that of the client and sink together per GiB sent directly",
        ),
    );
    metrics.push(Metric::new(
        "proxied_endpoints_cpu_per_gib",
        ms(proxied_endpoints_cpu) / gib,
        "ms",
        "direct_endpoints_cpu_per_gib",
        ms(endpoints_cpu) / gib,
    ));
    if !via_squid.is_empty() {
        let squid_spread = spread(&via_squid);
        let via_squid = median(&mut via_squid);
        metrics.push(
            Metric::new(
                "squid_tunnel_throughput",
                via_squid,
                "MiB/s",
                "direct_tcp_throughput",
                direct,
            )
            .with("bytes", bytes)
            .with("rounds", rounds)
            .with("range", squid_spread),
        );
        metrics.push(
            Metric::new(
                "proxy_tunnel_throughput_vs_squid",
                proxied,
                "MiB/s",
                "squid_tunnel_throughput",
                via_squid,
            )
            .with("bytes", bytes)
            .with("rounds", rounds)
            .with("goal", goal),
        );
    }

    // Set-up latency, the three kinds interleaved so drift hits all alike.
    let mut direct = Vec::with_capacity(connects);
    let mut proxied = Vec::with_capacity(connects);
    let mut via_squid = Vec::with_capacity(connects);
    for _ in 0..connects {
        let t = Instant::now();
        let s = TcpStream::connect(up).await.unwrap();
        direct.push(t.elapsed());
        drop(s);
        let t = Instant::now();
        let s = tunnel(proxy_addr, &target).await;
        proxied.push(t.elapsed());
        drop(s);
        if let Some(squid) = squid {
            let t = Instant::now();
            let s = tunnel(squid, &squid_target).await;
            via_squid.push(t.elapsed());
            drop(s);
        }
    }
    let (d50, d99) = (pct(&mut direct, 50), pct(&mut direct, 99));
    let (p50, p99) = (pct(&mut proxied, 50), pct(&mut proxied, 99));
    metrics.push(
        Metric::new(
            "proxy_connect_setup_p50",
            us(p50),
            "us",
            "direct_connect_p50",
            us(d50),
        )
        .with("samples", connects),
    );
    metrics.push(
        Metric::new(
            "proxy_connect_setup_p99",
            us(p99),
            "us",
            "direct_connect_p99",
            us(d99),
        )
        .with("samples", connects),
    );
    if !via_squid.is_empty() {
        let (s50, s99) = (pct(&mut via_squid, 50), pct(&mut via_squid, 99));
        metrics.push(
            Metric::new(
                "squid_connect_setup_p50",
                us(s50),
                "us",
                "direct_connect_p50",
                us(d50),
            )
            .with("samples", connects),
        );
        metrics.push(
            Metric::new(
                "squid_connect_setup_p99",
                us(s99),
                "us",
                "direct_connect_p99",
                us(d99),
            )
            .with("samples", connects),
        );
        metrics.push(
            Metric::new(
                "proxy_connect_setup_p50_vs_squid",
                us(p50),
                "us",
                "squid_connect_setup_p50",
                us(s50),
            )
            .with("samples", connects),
        );
        metrics.push(
            Metric::new(
                "proxy_connect_setup_p99_vs_squid",
                us(p99),
                "us",
                "squid_connect_setup_p99",
                us(s99),
            )
            .with("samples", connects),
        );
    }
    drop(proxy_child);
}

/// Reads until EOF or an error; reports when the stream began to flow, then
/// returns when it ended.
async fn drain(mut s: TcpStream, flowing: mpsc::Sender<()>) -> Instant {
    let mut buf = vec![0u8; 64 * 1024];
    let mut told = false;
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return Instant::now(),
            Ok(_) if !told => {
                told = true;
                let _ = flowing.send(()).await;
            }
            Ok(_) => {}
        }
    }
}

/// Cut-off latency of `streams` flowing streams: `cut` runs once all flow;
/// each sample is the time from `cut` returning to a client's EOF/reset.
/// Returns the samples and how many streams never ended.
async fn cut_off(streams: Vec<TcpStream>, cut: impl FnOnce()) -> (Vec<Duration>, usize) {
    let n = streams.len();
    let (tx, mut rx) = mpsc::channel(n);
    let mut clients = JoinSet::new();
    for s in streams {
        clients.spawn(drain(s, tx.clone()));
    }
    drop(tx);
    for _ in 0..n {
        rx.recv().await.expect("every stream flows");
    }
    // Let them stream a while, so buffers are full when the cut comes.
    tokio::time::sleep(Duration::from_millis(200)).await;
    cut();
    let t0 = Instant::now();
    let mut samples = Vec::with_capacity(n);
    let collected = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(r) = clients.join_next().await {
            samples.push(r.unwrap().saturating_duration_since(t0));
        }
    })
    .await;
    let stuck = if collected.is_err() {
        clients.abort_all();
        n - samples.len()
    } else {
        0
    };
    (samples, stuck)
}

async fn revocation(metrics: &mut Vec<Metric>) {
    let n = env_usize("ZEROLEASE_BENCH_STREAMS", 100);

    // Baseline: the same streams, direct, reset by the source itself.
    let abort = CancellationToken::new();
    let src = source(abort.clone()).await;
    let mut direct = Vec::with_capacity(n);
    for _ in 0..n {
        direct.push(TcpStream::connect(src).await.unwrap());
    }
    let (mut base, base_stuck) = cut_off(direct, || abort.cancel()).await;

    // Through the proxy, cut by revoking the session.
    let src = source(CancellationToken::new()).await;
    let proxy = Proxy::start(src.port(), n + 16).await;
    let target = format!("{HOST}:{}", src.port());
    let mut tunnels = Vec::with_capacity(n);
    for _ in 0..n {
        tunnels.push(tunnel(proxy.addr, &target).await);
    }
    let (registry, session) = (proxy.registry.clone(), proxy.session.clone());
    let (mut cut, stuck) = cut_off(tunnels, || {
        assert!(registry.revoke_session(&session));
    })
    .await;
    proxy.stop().await;

    let goal = "p99 < 50 ms";
    for p in [50, 99] {
        let (name, base_name) = if p == 50 {
            ("proxy_revocation_cutoff_p50", "direct_abort_cutoff_p50")
        } else {
            ("proxy_revocation_cutoff_p99", "direct_abort_cutoff_p99")
        };
        let value = if cut.is_empty() {
            f64::NAN
        } else {
            ms(pct(&mut cut, p))
        };
        let baseline = if base.is_empty() {
            f64::NAN
        } else {
            ms(pct(&mut base, p))
        };
        metrics.push(
            Metric::new(name, value, "ms", base_name, baseline)
                .with("streams", n)
                .with("not_cut_within_5s", stuck)
                .with("baseline_not_cut_within_5s", base_stuck)
                .with("goal", goal),
        );
    }
}

/// Child process for the throughput and idle tests: either the proxy alone
/// (`proxy PORT`, reaching `bench.test` = 127.0.0.1 on PORT) or a plain server that accepts and
/// holds connections (`holder`). Prints its listening address, then answers
/// each line on stdin with `RSS_KIB CONNECTIONS`; exits at EOF.
fn idle_child(kind: &str, upstream_port: u16) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let (addr, count): (SocketAddr, Box<dyn Fn() -> usize>) = rt.block_on(async {
        if kind == "proxy" {
            let proxy = Proxy::start(upstream_port, 1 << 20).await;
            let (registry, session) = (proxy.registry.clone(), proxy.session.clone());
            let addr = proxy.addr;
            // Serves until the process exits.
            std::mem::forget(proxy);
            let count = move || {
                registry
                    .snapshot(&session)
                    .map(|s| s.tunnels.len())
                    .unwrap_or(0)
            };
            (addr, Box::new(count) as Box<dyn Fn() -> usize>)
        } else {
            let (addr, held) = holder().await;
            let count = move || held.load(Ordering::Relaxed);
            (addr, Box::new(count) as Box<dyn Fn() -> usize>)
        }
    });
    println!("{addr}");
    // The runtime's workers serve; this thread only answers probes.
    for line in std::io::stdin().lines() {
        if line.is_err() {
            break;
        }
        println!("{} {}", rss_kib(), count());
    }
    // Exit without tearing down thousands of tunnels one by one.
    std::process::exit(0);
}

/// The parent's end of one idle child.
struct Child {
    proc: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    stdout: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
}

impl Child {
    async fn spawn(args: &[&str]) -> (Child, SocketAddr) {
        use tokio::io::AsyncBufReadExt;
        let mut proc = tokio::process::Command::new(std::env::current_exe().unwrap())
            .arg("--idle-child")
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn the idle child");
        let stdin = proc.stdin.take().unwrap();
        let mut stdout = tokio::io::BufReader::new(proc.stdout.take().unwrap()).lines();
        let addr = stdout
            .next_line()
            .await
            .unwrap()
            .expect("the child prints its address")
            .parse()
            .unwrap();
        (
            Child {
                proc,
                stdin,
                stdout,
            },
            addr,
        )
    }

    /// The child's RSS in KiB and how many connections it holds.
    async fn probe(&mut self) -> (u64, usize) {
        self.stdin.write_all(b"?\n").await.unwrap();
        let line = self.stdout.next_line().await.unwrap().unwrap();
        let mut f = line.split_whitespace().map(|v| v.parse::<u64>().unwrap());
        (f.next().unwrap(), f.next().unwrap() as usize)
    }
}

/// What one idle phase measured, summed over the children that hold the
/// connections.
struct IdleResult {
    before_kib: u64,
    after_kib: u64,
    opened: usize,
    errors: usize,
}

/// Opens `n` idle connections to `to` (CONNECT tunnels to `target` when
/// given), 128 at a time; returns the open ones and the error count.
async fn open_idle(to: SocketAddr, target: Option<String>, n: usize) -> (Vec<TcpStream>, usize) {
    let mut open = Vec::with_capacity(n);
    let mut errors = 0usize;
    let mut pending = JoinSet::new();
    let mut started = 0usize;
    while started < n || !pending.is_empty() {
        while started < n && pending.len() < 128 {
            let target = target.clone();
            pending.spawn(async move {
                match target {
                    Some(t) => try_tunnel(to, &t).await,
                    None => TcpStream::connect(to).await.map_err(|e| e.to_string()),
                }
            });
            started += 1;
        }
        match pending.join_next().await {
            Some(Ok(Ok(s))) => open.push(s),
            Some(Ok(Err(e))) => {
                if errors < 3 {
                    eprintln!("idle connection failed: {e}");
                }
                errors += 1;
            }
            Some(Err(e)) => {
                eprintln!("idle connection task failed: {e}");
                errors += 1;
            }
            None => break,
        }
    }
    (open, errors)
}

/// Measures `children` (each holding one end of its share of the
/// connections) before and after `n` idle connections are opened, spread
/// evenly over them.
async fn idle_phase(
    mut children: Vec<(Child, SocketAddr)>,
    target: Option<String>,
    n: usize,
) -> IdleResult {
    let k = children.len();
    let share = |i: usize| n / k + usize::from(i < n % k);
    let mut result = IdleResult {
        before_kib: 0,
        after_kib: 0,
        opened: 0,
        errors: 0,
    };
    let mut bases = Vec::with_capacity(k);
    for (child, to) in &mut children {
        // Warm the path once so one-off allocations are not counted.
        drop(open_idle(*to, target.clone(), 1).await);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (before, base) = child.probe().await;
        result.before_kib += before;
        bases.push(base);
    }
    let mut open = Vec::with_capacity(n);
    for (i, (_, to)) in children.iter().enumerate() {
        let (mut some, errors) = open_idle(*to, target.clone(), share(i)).await;
        result.errors += errors;
        open.push(std::mem::take(&mut some));
    }
    // Wait for each child to hold every connection its clients think open.
    for (i, (child, _)) in children.iter_mut().enumerate() {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut held = child.probe().await.1.saturating_sub(bases[i]);
        while held < open[i].len() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
            held = child.probe().await.1.saturating_sub(bases[i]);
        }
        result.errors += open[i].len().saturating_sub(held);
        result.opened += held;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    for (child, _) in &mut children {
        result.after_kib += child.probe().await.0;
    }
    drop(open);
    for (mut child, _) in children {
        let _ = child.proc.start_kill();
    }
    result
}

/// Descriptors a process keeps for itself besides the connections.
const SPARE_FDS: usize = 256;

async fn idle(metrics: &mut Vec<Metric>) {
    let requested = env_usize("ZEROLEASE_BENCH_IDLE", 10_000);
    let limit = nofile_limit() as usize;
    // This process holds one descriptor per connection (the client end);
    // so does the holder child. Past that, the count is capped.
    let n = requested.min(limit.saturating_sub(SPARE_FDS));
    if n < requested {
        eprintln!(
            "idle test: {requested} connections need {} descriptors here, RLIMIT_NOFILE is {limit}; measuring {n}",
            requested + SPARE_FDS
        );
    }
    // A proxy holds four descriptors per tunnel (two sockets, two duplicates
    // for the registry to shut down), so the tunnels are spread over as many
    // proxy processes as the limit needs, as they would be over sessions.
    let per_proxy = (limit.saturating_sub(SPARE_FDS) / 4).max(1);
    let proxies = n.div_ceil(per_proxy).max(1);

    // Baseline: a plain server process holding n accepted idle connections.
    let holder_child = Child::spawn(&["holder", "0"]).await;
    let direct = idle_phase(vec![holder_child], None, n).await;

    // The proxies holding n idle tunnels to a holder child.
    let (upstream, up) = Child::spawn(&["holder", "0"]).await;
    let port = up.port().to_string();
    let mut children = Vec::with_capacity(proxies);
    for _ in 0..proxies {
        children.push(Child::spawn(&["proxy", &port]).await);
    }
    let target = format!("{HOST}:{port}");
    let proxied = idle_phase(children, Some(target), n).await;
    drop(upstream);

    let per = |r: &IdleResult| r.after_kib.saturating_sub(r.before_kib) as f64 / n as f64;
    metrics.push(
        Metric::new(
            "proxy_idle_tunnel_memory",
            per(&proxied),
            "KiB",
            "server_idle_connection_memory",
            per(&direct),
        )
        .with("tunnels", n)
        .with("requested", requested)
        .with("proxy_processes", proxies)
        .with("nofile_limit", limit)
        .with("opened", proxied.opened)
        .with("errors", proxied.errors)
        .with("baseline_errors", direct.errors)
        .with("proxy_idle_process_rss_kib", proxied.before_kib)
        .with("proxy_rss_after_kib", proxied.after_kib)
        .with(
            "note",
            "RSS growth of the proxy processes per tunnel vs a plain accept-and-hold server per connection",
        )
        .with("goal", "< 64 KiB per tunnel, no errors"),
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--idle-child") {
        let kind = args.get(i + 1).expect("--idle-child KIND PORT");
        let port = args
            .get(i + 2)
            .and_then(|v| v.parse().ok())
            .expect("--idle-child KIND PORT");
        idle_child(kind, port);
        return;
    }
    let as_json = args.iter().any(|a| a == "--json");
    let squid: Option<SocketAddr> = std::env::var("ZEROLEASE_BENCH_SQUID")
        .ok()
        .map(|v| v.parse().expect("ZEROLEASE_BENCH_SQUID=127.0.0.1:PORT"));
    if squid.is_none() {
        eprintln!(
            "ZEROLEASE_BENCH_SQUID is not set: no squid figures (scripts/bench proxy sets it)"
        );
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut metrics = Vec::new();
    rt.block_on(async {
        tunnels(&mut metrics, squid).await;
        revocation(&mut metrics).await;
        idle(&mut metrics).await;
    });
    print(&metrics, as_json);
}
