//! Detached sessions: the guest's terminal served on `attach.sock` in the
//! session's runtime directory, and `zerolease attach`, the client.
//!
//! The supervisor of a detached session keeps reading the guest's terminal
//! (`tty.sock`) whether or not anyone is attached, so the agent never blocks
//! on output: every byte goes to the session's output log, and to the one
//! attached client if there is one (a new client replaces the old one).
//!
//! Client → server bytes are frames ([`Frame`]): keystrokes, and the
//! client's window size. Server → client bytes are the terminal's output,
//! raw. The escape is the client's business: `~.` detaches it and the
//! session goes on.
//!
//! **Invariants:**
//! - `attach.sock` is 0600 in the 0700 runtime directory: only the user
//!   who runs the session can attach.
//! - A frame is checked before it is used: unknown kinds, oversized
//!   lengths and impossible window sizes drop the client, never reach the
//!   guest.

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use super::log::SessionLog;
use super::tty::{Escape, EscapeScanner, RawMode, TtyError, TtyEvent, window_size};

/// The attach socket's file name in the runtime directory.
pub const ATTACH_SOCKET: &str = "attach.sock";

/// Largest keystroke frame payload.
pub const MAX_DATA: usize = 4096;

const KIND_DATA: u8 = 0;
const KIND_RESIZE: u8 = 1;

/// One client → server frame: `[kind u8][len u16 BE][payload]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Keystrokes for the agent (1..=MAX_DATA bytes).
    Data(Vec<u8>),
    /// The client's window size.
    Resize { rows: u16, cols: u16 },
}

/// Why a frame was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("unknown frame kind {0}")]
    Kind(u8),
    #[error("frame length {0} is out of bounds")]
    Length(usize),
    #[error("a resize frame has an impossible size")]
    Size,
}

impl Frame {
    /// The frame's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let (kind, payload) = match self {
            Frame::Data(d) => (KIND_DATA, d.clone()),
            Frame::Resize { rows, cols } => {
                let mut p = rows.to_be_bytes().to_vec();
                p.extend_from_slice(&cols.to_be_bytes());
                (KIND_RESIZE, p)
            }
        };
        let mut out = vec![kind];
        out.extend_from_slice(&u16::try_from(payload.len()).unwrap_or(0).to_be_bytes());
        out.extend_from_slice(&payload);
        out
    }

    /// Checks a frame header: the payload length to read next.
    pub fn check_header(kind: u8, len: usize) -> Result<usize, FrameError> {
        match kind {
            KIND_DATA if (1..=MAX_DATA).contains(&len) => Ok(len),
            KIND_RESIZE if len == 4 => Ok(len),
            KIND_DATA | KIND_RESIZE => Err(FrameError::Length(len)),
            other => Err(FrameError::Kind(other)),
        }
    }

    /// The frame of a checked header and its payload.
    pub fn decode(kind: u8, payload: &[u8]) -> Result<Frame, FrameError> {
        Frame::check_header(kind, payload.len())?;
        if kind == KIND_DATA {
            return Ok(Frame::Data(payload.to_vec()));
        }
        let rows = u16::from_be_bytes([payload[0], payload[1]]);
        let cols = u16::from_be_bytes([payload[2], payload[3]]);
        zerolease_protocol::check_tty_size(rows, cols).map_err(|_| FrameError::Size)?;
        Ok(Frame::Resize { rows, cols })
    }
}

/// The attach socket of a session whose runtime directory is `runtime_dir`.
pub fn attach_socket(runtime_dir: &Path) -> PathBuf {
    runtime_dir.join(ATTACH_SOCKET)
}

const DRAIN_QUIET: Duration = Duration::from_millis(300);
const DRAIN_MAX: Duration = Duration::from_secs(3);

/// The server side: the guest's terminal relayed to attach clients and the
/// log. Dropping it stops the relay.
#[derive(Debug)]
pub struct AttachServer {
    task: tokio::task::JoinHandle<()>,
    last_output: Arc<AtomicU64>,
    epoch: Instant,
}

impl AttachServer {
    /// Connects to the guest's terminal at `tty_socket`, listens on
    /// `attach_path` (0600) and relays. Window sizes from clients arrive on
    /// `events`. Must be called inside a tokio runtime.
    pub fn start(
        tty_socket: &Path,
        attach_path: &Path,
        events: mpsc::UnboundedSender<TtyEvent>,
        log: SessionLog,
    ) -> Result<AttachServer, TtyError> {
        let connect = |path: &Path| {
            let s = std::os::unix::net::UnixStream::connect(path)?;
            s.set_nonblocking(true)?;
            tokio::net::UnixStream::from_std(s)
        };
        let tty = connect(tty_socket).map_err(|source| TtyError::Connect {
            path: tty_socket.to_owned(),
            source,
        })?;
        let _ = std::fs::remove_file(attach_path);
        let listener = tokio::net::UnixListener::bind(attach_path).map_err(TtyError::Relay)?;
        std::fs::set_permissions(attach_path, std::fs::Permissions::from_mode(0o600))
            .map_err(TtyError::Relay)?;
        let epoch = Instant::now();
        let last_output = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(serve(
            tty,
            listener,
            events,
            log,
            last_output.clone(),
            epoch,
        ));
        Ok(AttachServer {
            task,
            last_output,
            epoch,
        })
    }

    /// Waits until the guest's output has been quiet for a moment (bounded),
    /// then stops.
    pub async fn drain_and_stop(self) {
        let deadline = Instant::now() + DRAIN_MAX;
        loop {
            let last = Duration::from_millis(self.last_output.load(Ordering::Relaxed));
            let quiet = self.epoch.elapsed().saturating_sub(last);
            if quiet >= DRAIN_QUIET || Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(DRAIN_QUIET - quiet).await;
        }
    }
}

impl Drop for AttachServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(
    tty: tokio::net::UnixStream,
    listener: tokio::net::UnixListener,
    events: mpsc::UnboundedSender<TtyEvent>,
    log: SessionLog,
    last_output: Arc<AtomicU64>,
    epoch: Instant,
) {
    let (mut tty_r, mut tty_w) = tty.into_split();
    let (frames_tx, mut frames_rx) = mpsc::channel::<(u64, Frame)>(64);
    let mut client: Option<(u64, tokio::net::unix::OwnedWriteHalf)> = None;
    let mut next_client = 0u64;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        tokio::select! {
            n = tty_r.read(&mut buf) => {
                let n = match n {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let now = u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
                last_output.store(now, Ordering::Relaxed);
                log.append(&buf[..n]);
                if let Some((_, w)) = client.as_mut()
                    && w.write_all(&buf[..n]).await.is_err()
                {
                    client = None;
                }
            }
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                next_client += 1;
                let id = next_client;
                let (r, w) = stream.into_split();
                // A new client replaces the old one.
                client = Some((id, w));
                tokio::spawn(read_frames(id, r, frames_tx.clone()));
            }
            Some((id, frame)) = frames_rx.recv() => {
                if client.as_ref().map(|(c, _)| *c) != Some(id) {
                    continue;
                }
                match frame {
                    Frame::Data(d) => {
                        if tty_w.write_all(&d).await.is_err() {
                            return;
                        }
                    }
                    Frame::Resize { rows, cols } => {
                        let _ = events.send(TtyEvent::Resize { rows, cols });
                    }
                }
            }
        }
    }
}

/// Reads one client's frames until it goes or sends a bad one.
async fn read_frames(
    id: u64,
    mut r: tokio::net::unix::OwnedReadHalf,
    tx: mpsc::Sender<(u64, Frame)>,
) {
    loop {
        let mut head = [0u8; 3];
        if r.read_exact(&mut head).await.is_err() {
            return;
        }
        let len = usize::from(u16::from_be_bytes([head[1], head[2]]));
        let Ok(len) = Frame::check_header(head[0], len) else {
            return;
        };
        let mut payload = vec![0u8; len];
        if r.read_exact(&mut payload).await.is_err() {
            return;
        }
        let Ok(frame) = Frame::decode(head[0], &payload) else {
            return;
        };
        if tx.send((id, frame)).await.is_err() {
            return;
        }
    }
}

/// How an attachment ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachEnd {
    /// The user typed `~.`; the session goes on.
    Detached,
    /// The session ended (or dropped this client).
    SessionGone,
}

/// How often the client looks at its window size.
const SIZE_POLL: Duration = Duration::from_millis(250);

/// `zerolease attach`: joins this process's terminal to the session
/// serving `socket`, until `~.` or the session's end. The terminal is raw
/// meanwhile and restored on every path.
pub fn attach(socket: &Path, hint: &str) -> Result<AttachEnd, TtyError> {
    let mut stream =
        std::os::unix::net::UnixStream::connect(socket).map_err(|source| TtyError::Connect {
            path: socket.to_owned(),
            source,
        })?;
    let reader = stream.try_clone().map_err(TtyError::Relay)?;
    let mut size = window_size(std::io::stdout().as_fd());
    let (rows, cols) = size;
    stream
        .write_all(&Frame::Resize { rows, cols }.encode())
        .map_err(TtyError::Relay)?;
    eprint!("{hint}\r\n");
    let _raw = RawMode::enter(std::io::stdin().as_fd())?;
    let (gone_read, gone_write) = nix::unistd::pipe().map_err(|e| TtyError::Relay(e.into()))?;
    let output = std::thread::spawn(move || {
        let mut reader = reader;
        let mut out = std::io::stdout();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match reader.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if out.write_all(&buf[..n]).and_then(|()| out.flush()).is_err() {
                        break;
                    }
                }
            }
        }
        drop(gone_write);
    });
    let stdin = std::io::stdin();
    let mut scanner = EscapeScanner::default();
    let mut buf = [0u8; MAX_DATA];
    let mut keys = Vec::with_capacity(MAX_DATA);
    let end = loop {
        let mut fds = [
            PollFd::new(stdin.as_fd(), PollFlags::POLLIN),
            PollFd::new(gone_read.as_fd(), PollFlags::POLLIN),
        ];
        let timeout = PollTimeout::try_from(SIZE_POLL).unwrap_or(PollTimeout::NONE);
        match poll(&mut fds, timeout) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => return Err(TtyError::Relay(e.into())),
        }
        if fds[1].revents().is_some_and(|r| !r.is_empty()) {
            break AttachEnd::SessionGone;
        }
        let now = window_size(std::io::stdout().as_fd());
        if now != size {
            size = now;
            let (rows, cols) = now;
            if stream
                .write_all(&Frame::Resize { rows, cols }.encode())
                .is_err()
            {
                break AttachEnd::SessionGone;
            }
        }
        if fds[0].revents().is_none_or(|r| r.is_empty()) {
            continue;
        }
        let n = match nix::unistd::read(stdin.as_fd(), &mut buf) {
            Ok(0) => break AttachEnd::Detached,
            Ok(n) => n,
            Err(Errno::EINTR | Errno::EAGAIN) => continue,
            Err(e) => return Err(TtyError::Relay(e.into())),
        };
        keys.clear();
        let escape = scanner.feed(&buf[..n], &mut keys);
        // A `~` held from the last read can make this one byte longer
        // than a frame takes.
        if keys.chunks(MAX_DATA).any(|chunk| {
            stream
                .write_all(&Frame::Data(chunk.to_vec()).encode())
                .is_err()
        }) {
            break AttachEnd::SessionGone;
        }
        if escape == Some(Escape::Stop) {
            break AttachEnd::Detached;
        }
    };
    let _ = stream.shutdown(std::net::Shutdown::Both);
    let _ = output.join();
    Ok(end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_bad_ones_are_refused() {
        for frame in [
            Frame::Data(b"ls\r".to_vec()),
            Frame::Data(vec![0x03]),
            Frame::Data(vec![b'x'; MAX_DATA]),
            Frame::Resize { rows: 24, cols: 80 },
            Frame::Resize {
                rows: 4096,
                cols: 1,
            },
        ] {
            let bytes = frame.encode();
            let len = usize::from(u16::from_be_bytes([bytes[1], bytes[2]]));
            assert_eq!(Frame::check_header(bytes[0], len), Ok(bytes.len() - 3));
            assert_eq!(Frame::decode(bytes[0], &bytes[3..]), Ok(frame));
        }
        // (kind, payload length, ok)
        for (kind, len, ok) in [
            (0u8, 0usize, false),
            (0, MAX_DATA + 1, false),
            (0, 65535, false),
            (1, 3, false),
            (1, 5, false),
            (2, 1, false),
            (255, 4, false),
            (0, 1, true),
            (1, 4, true),
        ] {
            assert_eq!(Frame::check_header(kind, len).is_ok(), ok, "{kind} {len}");
        }
        for payload in [[0, 0, 0, 80], [0, 24, 0, 0], [0x10, 0x01, 0, 80], [0xff; 4]] {
            assert_eq!(Frame::decode(1, &payload), Err(FrameError::Size));
        }
    }

    #[tokio::test]
    async fn server_relays_to_the_latest_client_and_logs_everything() {
        let dir = tempfile::tempdir().unwrap();
        let tty_path = dir.path().join("tty.sock");
        let attach_path = dir.path().join(ATTACH_SOCKET);
        let guest = tokio::net::UnixListener::bind(&tty_path).unwrap();
        let log = SessionLog::default();
        log.open_at(&dir.path().join("out.log"), 1 << 20).unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let server = AttachServer::start(&tty_path, &attach_path, tx, log).unwrap();
        let (mut guest, _) = guest.accept().await.unwrap();
        let mode = std::fs::metadata(&attach_path)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        // Output with nobody attached goes to the log only.
        guest.write_all(b"early ").await.unwrap();
        let log_path = dir.path().join("out.log");
        for _ in 0..100 {
            if std::fs::read(&log_path).unwrap() == b"early " {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut client = tokio::net::UnixStream::connect(&attach_path).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        guest.write_all(b"late").await.unwrap();
        let mut got = [0u8; 4];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"late");
        // Keys and a resize from the client.
        client
            .write_all(&Frame::Data(b"ls\r".to_vec()).encode())
            .await
            .unwrap();
        client
            .write_all(
                &Frame::Resize {
                    rows: 40,
                    cols: 100,
                }
                .encode(),
            )
            .await
            .unwrap();
        let mut keys = [0u8; 3];
        guest.read_exact(&mut keys).await.unwrap();
        assert_eq!(&keys, b"ls\r");
        assert_eq!(
            rx.recv().await,
            Some(TtyEvent::Resize {
                rows: 40,
                cols: 100
            })
        );
        // A bad frame drops that client: neither it nor anything after it
        // reaches the guest.
        client.write_all(&[7, 0, 1, b'x']).await.unwrap();
        client
            .write_all(&Frame::Data(b"evil".to_vec()).encode())
            .await
            .unwrap();
        let mut any = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_millis(500), guest.read(&mut any)).await;
        assert!(read.is_err(), "the guest got bytes after a bad frame");
        server.drain_and_stop().await;
        let text = std::fs::read_to_string(dir.path().join("out.log")).unwrap();
        assert_eq!(text, "early late");
    }
}
