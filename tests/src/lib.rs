//! Shared harness for zerolease's end-to-end tests.
//!
//! Every test that touches the network builds its own world out of network
//! namespaces named `zlt-<role>-<random>` and deletes them when done; nothing
//! here ever changes the namespace the test process started in.
//!
//! Network namespace membership is per thread, and a thread or process
//! created from a thread starts in that thread's namespace. [`Netns::run`]
//! therefore does its work on a fresh thread that first joins the namespace
//! (`setns`), and [`Netns::exec`] starts commands through `ip netns exec`.
//! A socket stays in the namespace it was created in, so a listener made by
//! `run` can be used from any thread afterwards.

use std::ffi::OsStr;
use std::fs::File;
use std::future::Future;
use std::io;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sched::{CloneFlags, setns};

pub mod upstream;

/// Why the test environment is unusable.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error("`{0}` failed: {1}")]
    Command(String, String),
    #[error("cannot run `{0}`")]
    Spawn(String, #[source] io::Error),
}

/// Checks that we are root and that `tools` are on PATH.
///
/// Returns `true` when the test can run. Otherwise, under `CI=true` it panics
/// (CI must never skip silently); elsewhere it prints why and returns `false`
/// so the test can return early.
pub fn require_root_and_tools(tools: &[&str]) -> bool {
    let mut missing = Vec::new();
    if !nix::unistd::geteuid().is_root() {
        missing.push("root privileges (run the tests as root)".to_owned());
    }
    for tool in tools {
        if !on_path(tool) {
            missing.push(format!("the `{tool}` command"));
        }
    }
    if missing.is_empty() {
        return true;
    }
    let reason = format!(
        "this test needs {}; scripts/setup installs the packages",
        missing.join(", ")
    );
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("CI=true and {reason}");
    }
    eprintln!("SKIPPED: {reason}");
    false
}

fn on_path(tool: &str) -> bool {
    let Some(path) = std::env::var_os("PATH") else {
        return false;
    };
    std::env::split_paths(&path).any(|dir| {
        let candidate = dir.join(tool);
        candidate.is_file()
    }) || ["/usr/sbin", "/sbin"]
        .iter()
        .any(|dir| std::path::Path::new(dir).join(tool).is_file())
}

fn random_suffix() -> String {
    let mut bytes = [0u8; 4];
    getrandom::fill(&mut bytes).expect("the OS random source works");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Runs a command, returning its output; fails when it exits non-zero.
pub fn run_cmd<I, S>(program: &str, args: I) -> Result<Output, HarnessError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<_> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let shown = format!(
        "{program} {}",
        args.iter()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let out = Command::new(program)
        .args(&args)
        .output()
        .map_err(|e| HarnessError::Spawn(shown.clone(), e))?;
    if !out.status.success() {
        return Err(HarnessError::Command(
            shown,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ));
    }
    Ok(out)
}

/// A network namespace made by the test, deleted when dropped.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `zlt-<role>-<random>` with its loopback up.
    pub fn new(role: &str) -> Arc<Netns> {
        let name = format!("zlt-{role}-{}", random_suffix());
        run_cmd("ip", ["netns", "add", &name]).expect("ip netns add");
        let ns = Arc::new(Netns { name });
        ns.ip(["link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n <ns> ARGS`, which must succeed.
    pub fn ip<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut all: Vec<std::ffi::OsString> = vec!["-n".into(), self.name.clone().into()];
        all.extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        run_cmd("ip", all).unwrap_or_else(|e| panic!("in {}: {e}", self.name))
    }

    /// Runs `program ARGS` inside the namespace and returns its output,
    /// whatever its exit status.
    pub fn exec<I, S>(&self, program: &str, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Command::new("ip")
            .args(["netns", "exec", &self.name, program])
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {program} in {}: {e}", self.name))
    }

    /// Starts `program ARGS` inside the namespace in the background, with
    /// its output captured. `ip netns exec` execs the program itself, so the
    /// child's exit is the program's exit.
    pub fn spawn<I, S>(&self, program: &str, args: I) -> std::process::Child
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Command::new("ip")
            .args(["netns", "exec", &self.name, program])
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program} in {}: {e}", self.name))
    }

    /// Creates a veth pair: `name` here, `peer_name` in `peer`. Both ends are
    /// left down and unaddressed.
    pub fn veth_to(&self, name: &str, peer: &Netns, peer_name: &str) {
        self.ip([
            "link", "add", name, "type", "veth", "peer", "name", peer_name, "netns", &peer.name,
        ]);
    }

    /// Sets a sysctl inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        let out = self.exec("sh", ["-c", &format!("echo {value} > {path}")]);
        assert!(
            out.status.success(),
            "sysctl {key}={value} in {}",
            self.name
        );
    }

    /// Runs `f` on a thread that has joined this namespace.
    pub fn run<F, R>(&self, f: F) -> R
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    let ns = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
                    setns(&ns, CloneFlags::CLONE_NEWNET)
                        .unwrap_or_else(|e| panic!("setns {path}: {e}"));
                    f()
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Runs the future made by `f` on a current-thread runtime inside this
    /// namespace (netlink sockets and `nft` children start there too).
    pub fn block_on<F, Fut>(&self, f: F) -> Fut::Output
    where
        F: FnOnce() -> Fut + Send,
        Fut: Future,
        Fut::Output: Send,
    {
        self.run(|| block_here(f()))
    }

    /// A TCP listener bound inside this namespace.
    pub fn tcp_listener(&self, addr: SocketAddr) -> Listener {
        let listener = self.run(|| TcpListener::bind(addr)).unwrap_or_else(|e| {
            panic!("bind tcp {addr} in {}: {e}", self.name);
        });
        listener.set_nonblocking(true).expect("nonblocking");
        Listener { listener }
    }

    /// A UDP socket bound inside this namespace.
    pub fn udp_socket(&self, addr: SocketAddr) -> UdpSocket {
        let socket = self
            .run(|| UdpSocket::bind(addr))
            .unwrap_or_else(|e| panic!("bind udp {addr} in {}: {e}", self.name));
        socket
            .set_read_timeout(Some(PROBE_TIMEOUT))
            .expect("read timeout");
        socket
    }

    /// Whether a TCP connection from this namespace to `dst` (optionally from
    /// the local address `src`) completes within [`PROBE_TIMEOUT`].
    pub fn tcp_connects(&self, src: Option<SocketAddr>, dst: SocketAddr) -> bool {
        self.block_on(|| async move {
            let socket = match dst {
                SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
                SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
            }
            .expect("tcp socket");
            if let Some(src) = src {
                socket.bind(src).expect("bind source address");
            }
            matches!(
                tokio::time::timeout(PROBE_TIMEOUT, socket.connect(dst)).await,
                Ok(Ok(_))
            )
        })
    }

    /// Sends one UDP datagram from this namespace to `dst`.
    pub fn udp_send(&self, dst: SocketAddr, payload: &[u8]) {
        self.run(|| {
            let bind: SocketAddr = if dst.is_ipv4() {
                "0.0.0.0:0".parse().expect("addr")
            } else {
                "[::]:0".parse().expect("addr")
            };
            let socket = UdpSocket::bind(bind).expect("udp bind");
            // A send into a dropped path still succeeds locally; an error
            // here (e.g. no route) also means nothing arrives.
            let _ = socket.send_to(payload, dst);
        })
    }

    /// Whether one ICMP echo from this namespace to `dst` is answered.
    pub fn pings(&self, dst: &str) -> bool {
        self.exec("ping", ["-c", "1", "-W", "1", dst])
            .status
            .success()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace also removes its interfaces (a veth pair
        // goes with either end) and its nftables tables.
        if let Err(e) = run_cmd("ip", ["netns", "del", &self.name]) {
            eprintln!("warning: could not delete namespace {}: {e}", self.name);
        }
    }
}

/// How long a probe waits before calling a packet dropped.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(700);

/// A TCP listener that reports whether anyone connected.
#[derive(Debug)]
pub struct Listener {
    listener: TcpListener,
}

impl Listener {
    /// The first connection accepted within [`PROBE_TIMEOUT`] as (peer, local).
    pub fn accepted(&self) -> Option<(SocketAddr, SocketAddr)> {
        let deadline = Instant::now() + PROBE_TIMEOUT;
        loop {
            match self.listener.accept() {
                Ok((stream, peer)) => return Some((peer, stream.local_addr().ok()?)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        return None;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("accept: {e}"),
            }
        }
    }

    /// Accepts one connection (waiting up to [`PROBE_TIMEOUT`]) and returns
    /// the first bytes the peer sent.
    pub fn accept_and_read(&self) -> Option<(SocketAddr, Vec<u8>)> {
        use std::io::Read;
        let deadline = Instant::now() + PROBE_TIMEOUT * 3;
        loop {
            match self.listener.accept() {
                Ok((mut stream, peer)) => {
                    stream.set_nonblocking(false).ok()?;
                    stream.set_read_timeout(Some(PROBE_TIMEOUT * 3)).ok()?;
                    let mut buf = vec![0u8; 512];
                    let n = stream.read(&mut buf).ok()?;
                    buf.truncate(n);
                    return Some((peer, buf));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        return None;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("accept: {e}"),
            }
        }
    }
}

/// Whether `socket` receives a datagram within its read timeout.
pub fn udp_received(socket: &UdpSocket) -> Option<Vec<u8>> {
    let mut buf = [0u8; 512];
    match socket.recv_from(&mut buf) {
        Ok((n, _)) => Some(buf[..n].to_vec()),
        Err(_) => None,
    }
}

/// A value that must be dropped inside a namespace (a `Jail` tears down the
/// namespace of the thread that drops it). Dropping the wrapper moves the
/// value to a thread in `ns` first, so a failing test never touches the
/// namespace the test runner started in.
#[derive(Debug)]
pub struct InNs<T: Send> {
    value: Option<T>,
    ns: Arc<Netns>,
}

impl<T: Send> InNs<T> {
    pub fn new(ns: &Arc<Netns>, value: T) -> Self {
        Self {
            value: Some(value),
            ns: Arc::clone(ns),
        }
    }

    pub fn get(&self) -> &T {
        self.value.as_ref().expect("present until drop")
    }

    pub fn get_mut(&mut self) -> &mut T {
        self.value.as_mut().expect("present until drop")
    }

    /// Runs `f` with the value on a thread inside the namespace.
    pub fn with<F, R>(&mut self, f: F) -> R
    where
        F: FnOnce(&mut T) -> R + Send,
        R: Send,
    {
        let value = self.value.as_mut().expect("present until drop");
        self.ns.run(move || f(value))
    }

    /// Consumes the wrapper, handing the value to `f` on a thread inside the
    /// namespace (where it is dropped unless `f` returns it in `R`).
    pub fn consume<F, R>(mut self, f: F) -> R
    where
        F: FnOnce(T) -> R + Send,
        R: Send,
    {
        let value = self.value.take().expect("present until drop");
        self.ns.run(move || f(value))
    }
}

impl<T: Send> Drop for InNs<T> {
    fn drop(&mut self) {
        if let Some(value) = self.value.take() {
            self.ns.run(move || drop(value));
        }
    }
}

/// Runs `fut` to completion on a new current-thread runtime on this thread
/// (use it inside [`Netns::run`] or [`InNs::with`]).
pub fn block_here<Fut: Future>(fut: Fut) -> Fut::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(fut)
}

/// The `zerolease` binary of this workspace, built once per test process
/// with `cargo build` so it is never older than the sources
/// (`CARGO_BIN_EXE_*` exists only for a package's own tests).
pub fn zerolease_bin() -> std::path::PathBuf {
    static BIN: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let status = Command::new(env!("CARGO"))
            .args(["build", "-q", "-p", "zerolease", "--bin", "zerolease"])
            .current_dir(&root)
            .status()
            .expect("cannot run cargo build for the zerolease binary");
        assert!(status.success(), "cargo build -p zerolease failed");
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| root.join("target"));
        let bin = target.join("debug/zerolease");
        assert!(bin.exists(), "{} is missing after the build", bin.display());
        bin
    })
    .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_tool_skips_outside_ci_and_fails_in_ci() {
        let tools = ["zerolease-no-such-tool-0c5e"];
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            let result = std::panic::catch_unwind(|| require_root_and_tools(&tools));
            assert!(result.is_err(), "CI=true must fail, not skip");
        } else {
            assert!(!require_root_and_tools(&tools));
        }
    }

    #[test]
    fn namespace_names_are_unique() {
        let a = random_suffix();
        let b = random_suffix();
        assert_eq!(a.len(), 8);
        assert_ne!(a, b);
    }
}
