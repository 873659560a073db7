//! The test "internet": HTTPS servers with certificates from a CA made for
//! the test, run inside a namespace the test created.
//!
//! Routes: `/hello`; `/bytes/N` (N bytes, as fast as possible);
//! `/slow/N` (N bytes, 16 KiB every 10 ms, for transfers that are still
//! running when a lease is revoked); `/auth` (200 only with
//! `Authorization: Bearer <token>`). Every request gets `Connection: close`.
//!
//! The server counts the TCP connections it accepted and records when each
//! one ended, so tests can prove the upstream saw nothing, or measure how
//! soon it saw a revoked tunnel close.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::Netns;

/// A certificate authority made for one test, and a leaf for some names.
#[derive(Debug)]
pub struct TestCa {
    ca_pem: String,
    server: Arc<rustls::ServerConfig>,
}

impl TestCa {
    /// A fresh CA and one leaf certificate valid for `names`.
    pub fn new(names: &[&str]) -> TestCa {
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "zerolease e2e test CA");
        let ca =
            rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().unwrap())
                .unwrap();
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let leaf =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap()
                .signed_by(&leaf_key, &ca)
                .unwrap();
        let server = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from(leaf.der().to_vec())],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
            )
            .unwrap();
        TestCa {
            ca_pem: ca.pem(),
            server: Arc::new(server),
        }
    }

    /// Writes the CA certificate for `curl --cacert`.
    pub fn write_ca(&self, dir: &Path) -> PathBuf {
        let path = dir.join("test-ca.pem");
        std::fs::write(&path, &self.ca_pem).unwrap();
        path
    }
}

/// A running HTTPS server; stopped when dropped.
#[derive(Debug)]
pub struct HttpsServer {
    pub addr: SocketAddr,
    stop: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
    requests: Arc<AtomicU64>,
    connections: Arc<AtomicU64>,
    closed: Arc<Mutex<Vec<Instant>>>,
}

impl HttpsServer {
    /// Starts a server on `addr` inside `ns`. `token` is what `/auth` wants.
    pub fn start(
        ns: &Arc<Netns>,
        addr: SocketAddr,
        ca: &TestCa,
        token: Option<&str>,
    ) -> HttpsServer {
        HttpsServer::start_with_git(ns, addr, ca, token, None)
    }

    /// Also serves the bare repositories under `git_root` at `/git/…`
    /// through `git http-backend` (smart HTTP), to clients that authenticate
    /// with HTTP Basic and `token` as the password.
    pub fn start_with_git(
        ns: &Arc<Netns>,
        addr: SocketAddr,
        ca: &TestCa,
        token: Option<&str>,
        git_root: Option<std::path::PathBuf>,
    ) -> HttpsServer {
        let stop = CancellationToken::new();
        let requests = Arc::new(AtomicU64::new(0));
        let connections = Arc::new(AtomicU64::new(0));
        let closed = Arc::new(Mutex::new(Vec::new()));
        let acceptor = TlsAcceptor::from(ca.server.clone());
        let token = token.map(str::to_owned);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = {
            let (ns, stop, requests) = (ns.clone(), stop.clone(), requests.clone());
            let (connections, closed) = (connections.clone(), closed.clone());
            std::thread::spawn(move || {
                ns.block_on(|| async move {
                    let listener = TcpListener::bind(addr).await.expect("bind upstream");
                    ready_tx.send(listener.local_addr().unwrap()).unwrap();
                    loop {
                        let (sock, _) = tokio::select! {
                            _ = stop.cancelled() => break,
                            r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
                        };
                        connections.fetch_add(1, Ordering::SeqCst);
                        let (acceptor, token, requests, stop, closed, git_root) = (
                            acceptor.clone(),
                            token.clone(),
                            requests.clone(),
                            stop.clone(),
                            closed.clone(),
                            git_root.clone(),
                        );
                        tokio::spawn(async move {
                            if let Ok(tls) = acceptor.accept(sock).await {
                                requests.fetch_add(1, Ordering::SeqCst);
                                tokio::select! {
                                    _ = stop.cancelled() => {}
                                    _ = serve(tls, token.as_deref(), git_root.as_deref()) => {}
                                }
                            }
                            // The socket is dropped here: the connection is over.
                            closed
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .push(Instant::now());
                        });
                    }
                })
            })
        };
        let addr = ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("upstream started");
        HttpsServer {
            addr,
            stop,
            thread: Some(thread),
            requests,
            connections,
            closed,
        }
    }

    /// TLS connections that completed a handshake.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }

    /// TCP connections accepted, handshake or not.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::SeqCst)
    }

    /// When each finished connection ended (its socket dropped), in order.
    pub fn closed(&self) -> Vec<Instant> {
        self.closed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Drop for HttpsServer {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn serve<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut s: S,
    token: Option<&str>,
    git_root: Option<&Path>,
) {
    let mut head = Vec::new();
    let mut buf = [0u8; 2048];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        if head.len() > 16 * 1024 {
            return;
        }
    }
    let text = String::from_utf8_lossy(&head);
    let mut lines = text.split("\r\n");
    let path = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .unwrap_or("/")
        .to_owned();
    let auth = lines
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("authorization")
                .then(|| v.trim().to_owned())
        })
        .unwrap_or_default();
    let n_of = |p: &str| p.parse::<u64>().unwrap_or(0);
    if let (Some(root), true) = (git_root, path.starts_with("/git/")) {
        git_cgi(&mut s, &head, token, root).await;
        return;
    }
    match path.as_str() {
        "/hello" => respond(&mut s, 200, b"hello from upstream\n").await,
        "/auth" => match token {
            Some(t) if auth == format!("Bearer {t}") => respond(&mut s, 200, b"authorized\n").await,
            _ => respond(&mut s, 401, b"unauthorized\n").await,
        },
        p if p.starts_with("/bytes/") => stream(&mut s, n_of(&p[7..]), None).await,
        p if p.starts_with("/slow/") => {
            stream(&mut s, n_of(&p[6..]), Some(Duration::from_millis(10))).await
        }
        _ => respond(&mut s, 404, b"not found\n").await,
    }
}

async fn respond<S: tokio::io::AsyncWrite + Unpin>(s: &mut S, code: u16, body: &[u8]) {
    let head = format!(
        "HTTP/1.1 {code} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = s.write_all(head.as_bytes()).await;
    let _ = s.write_all(body).await;
    let _ = s.shutdown().await;
}

async fn stream<S: tokio::io::AsyncWrite + Unpin>(s: &mut S, n: u64, pace: Option<Duration>) {
    let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n");
    if s.write_all(head.as_bytes()).await.is_err() {
        return;
    }
    let chunk = vec![b'x'; if pace.is_some() { 16 * 1024 } else { 64 * 1024 }];
    let mut left = n;
    while left > 0 {
        let k = left.min(chunk.len() as u64) as usize;
        if s.write_all(&chunk[..k]).await.is_err() {
            return;
        }
        left -= k as u64;
        if let Some(p) = pace {
            tokio::time::sleep(p).await;
        }
    }
    let _ = s.shutdown().await;
}

/// One smart-HTTP request through `git http-backend` (CGI), behind HTTP
/// Basic authentication with `token` as the password.
async fn git_cgi<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    s: &mut S,
    head: &[u8],
    token: Option<&str>,
    root: &Path,
) {
    use base64::Engine;
    let end = head
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(head.len())
        + 4;
    let text = String::from_utf8_lossy(&head[..end.min(head.len())]).into_owned();
    let mut lines = text.split("\r\n");
    let mut first = lines.next().unwrap_or_default().split(' ');
    let method = first.next().unwrap_or("GET").to_owned();
    let target = first.next().unwrap_or("/").to_owned();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            Some((k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        })
        .collect();
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let authorized_user = header("authorization").and_then(|a| {
        let b64 = a.strip_prefix("Basic ")?;
        let raw = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
        let raw = String::from_utf8(raw).ok()?;
        let (user, pass) = raw.split_once(':')?;
        (Some(pass) == token).then(|| user.to_owned())
    });
    let Some(user) = authorized_user else {
        let body = b"authentication required\n";
        let head = format!(
            "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"git\"\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        let _ = s.write_all(head.as_bytes()).await;
        let _ = s.write_all(body).await;
        let _ = s.shutdown().await;
        return;
    };
    // The request body: what came with the head, then the rest.
    let mut body = head[end.min(head.len())..].to_vec();
    let chunked = header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
    let mut buf = [0u8; 16 * 1024];
    if chunked {
        while !body.windows(5).any(|w| w == b"0\r\n\r\n") {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => body.extend_from_slice(&buf[..n]),
            }
        }
        body = dechunk(&body);
    } else {
        let len: usize = header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        while body.len() < len {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => body.extend_from_slice(&buf[..n]),
            }
        }
        body.truncate(len);
    }
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let mut cmd = tokio::process::Command::new("git");
    cmd.arg("http-backend")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("GIT_PROJECT_ROOT", root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("PATH_INFO", path.strip_prefix("/git").unwrap_or(path))
        .env("QUERY_STRING", query)
        .env("REQUEST_METHOD", &method)
        .env("CONTENT_TYPE", header("content-type").unwrap_or_default())
        .env("CONTENT_LENGTH", body.len().to_string())
        .env("REMOTE_USER", &user)
        .env("REMOTE_ADDR", "198.18.0.1")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    if let Some(enc) = header("content-encoding") {
        cmd.env("HTTP_CONTENT_ENCODING", enc);
    }
    let Ok(mut child) = cmd.spawn() else { return };
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(&body).await;
    }
    let Ok(out) = child.wait_with_output().await else {
        return;
    };
    let cgi = out.stdout;
    let split = cgi
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| (p, 4))
        .or_else(|| cgi.windows(2).position(|w| w == b"\n\n").map(|p| (p, 2)));
    let Some((at, sep)) = split else { return };
    let cgi_head = String::from_utf8_lossy(&cgi[..at]).into_owned();
    let cgi_body = &cgi[at + sep..];
    let mut status = "200 OK".to_owned();
    let mut response = String::new();
    for l in cgi_head.lines() {
        match l.split_once(':') {
            Some((k, v)) if k.eq_ignore_ascii_case("status") => status = v.trim().to_owned(),
            Some(_) => {
                response.push_str(l.trim_end());
                response.push_str("\r\n");
            }
            None => {}
        }
    }
    let head = format!(
        "HTTP/1.1 {status}\r\n{response}Content-Length: {}\r\nConnection: close\r\n\r\n",
        cgi_body.len()
    );
    let _ = s.write_all(head.as_bytes()).await;
    let _ = s.write_all(cgi_body).await;
    let _ = s.shutdown().await;
}

/// Decodes an HTTP/1.1 chunked body.
fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = data.windows(2).position(|w| w == b"\r\n") {
        let size = std::str::from_utf8(&data[..eol])
            .ok()
            .and_then(|l| usize::from_str_radix(l.split(';').next().unwrap_or("").trim(), 16).ok())
            .unwrap_or(0);
        data = &data[eol + 2..];
        if size == 0 || data.len() < size {
            break;
        }
        out.extend_from_slice(&data[..size]);
        data = &data[(size + 2).min(data.len())..];
    }
    out
}
