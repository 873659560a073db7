//! The user's terminal attached to an interactive agent: raw mode, the
//! byte relay to the guest's pty (over the VM's TTY port, `tty.sock`),
//! window-size changes, and the `Enter ~ .` escape.
//!
//! Pure parts: [`EscapeScanner`] (what the keyboard bytes mean),
//! [`term_for`] and [`size_or_default`]. I/O parts: [`RawMode`] (the
//! terminal guard) and [`TtyRelay`] (two threads and a SIGWINCH task).
//!
//! **Invariants:**
//! - While the user's terminal is raw, a [`RawMode`] value holds its saved
//!   settings, and they are put back on every path: the guard's drop (normal
//!   end, error, the session future dropped on SIGTERM/SIGHUP or timeout)
//!   and a panic hook (a panic anywhere, in any thread).
//! - Ctrl-C, Ctrl-Z and every other byte the user types go to the agent
//!   unchanged, except the escape: `~.` right after Enter (or at the very
//!   start) ends the session, `~~` there sends one `~`.
//! - The relay never interprets the guest's output: bytes from the TTY port
//!   go to the user's terminal as they are.

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::termios::{self, SetArg, Termios};
use tokio::sync::mpsc;
use zerolease_protocol::{MAX_TTY_DIM, TtySpec};

/// What the user's keystrokes mean besides bytes for the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Escape {
    /// `~.` at the start of a line: stop (in `run`) or detach (in `attach`).
    Stop,
}

/// Finds the `~.` escape in keyboard input, like ssh: `~` is special only
/// at the start of a line (after `\r` or `\n`, or as the very first byte).
/// State carries across calls, so a sequence split over reads is found.
#[derive(Debug, Clone)]
pub struct EscapeScanner {
    line_start: bool,
    tilde: bool,
}

impl Default for EscapeScanner {
    fn default() -> Self {
        EscapeScanner {
            line_start: true,
            tilde: false,
        }
    }
}

impl EscapeScanner {
    /// Appends to `out` the bytes of `input` meant for the agent, and
    /// returns the escape if one was typed (bytes after it are dropped).
    /// A `~` at the start of a line is held back until the next byte says
    /// what it is.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Option<Escape> {
        for &b in input {
            if self.tilde {
                self.tilde = false;
                match b {
                    b'.' => return Some(Escape::Stop),
                    b'~' => {
                        out.push(b'~');
                        self.line_start = false;
                        continue;
                    }
                    _ => out.push(b'~'),
                }
            }
            if self.line_start && b == b'~' {
                self.tilde = true;
                continue;
            }
            out.push(b);
            self.line_start = b == b'\r' || b == b'\n';
        }
        None
    }
}

/// The agent's `TERM`: the user's if it is a plain terminal name, else a
/// safe default.
pub fn term_for(user_term: Option<&str>) -> String {
    const DEFAULT: &str = "xterm-256color";
    match user_term {
        Some(t)
            if !t.is_empty()
                && t.len() <= 64
                && t.bytes().all(|b| {
                    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'+' | b'-')
                }) =>
        {
            t.to_owned()
        }
        _ => DEFAULT.to_owned(),
    }
}

/// A window size the protocol accepts: 0 (unknown) becomes 24x80, anything
/// larger than the protocol's bound is clamped.
pub fn size_or_default(rows: u16, cols: u16) -> (u16, u16) {
    let fix = |v: u16, default: u16| {
        if v == 0 { default } else { v.min(MAX_TTY_DIM) }
    };
    (fix(rows, 24), fix(cols, 80))
}

/// The current size of the terminal on `fd`, as the protocol takes it.
pub fn window_size(fd: BorrowedFd<'_>) -> (u16, u16) {
    let mut ws = nix::libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `winsize` into the pointer, a live local
    // of that type; the fd is borrowed and open.
    let rc = unsafe { nix::libc::ioctl(fd.as_raw_fd(), nix::libc::TIOCGWINSZ, &mut ws) };
    if rc != 0 {
        return size_or_default(0, 0);
    }
    size_or_default(ws.ws_row, ws.ws_col)
}

/// Whether `run` should be interactive: both stdin and stdout are terminals
/// and the user did not say `--no-tty`.
pub fn wants_tty(no_tty: bool) -> bool {
    use std::io::IsTerminal;
    !no_tty && std::io::stdin().is_terminal() && std::io::stdout().is_terminal()
}

/// What the guest needs for the user's terminal (stdin/stdout of this
/// process).
pub fn spec_for_this_terminal() -> TtySpec {
    let (rows, cols) = window_size(std::io::stdout().as_fd());
    TtySpec {
        rows,
        cols,
        term: term_for(std::env::var("TERM").ok().as_deref()),
    }
}

/// The settings the panic hook puts back: (fd, saved termios).
static SAVED: Mutex<Option<(RawFd, Termios)>> = Mutex::new(None);
static HOOK: Once = Once::new();

/// Puts back the terminal settings saved by the live [`RawMode`], if any.
/// Called by the panic hook; safe to call any number of times.
pub fn restore_saved() {
    let saved = match SAVED.lock() {
        Ok(mut s) => s.take(),
        Err(poisoned) => poisoned.into_inner().take(),
    };
    if let Some((fd, termios)) = saved {
        // SAFETY: `fd` was open when saved and `RawMode` (which borrows it
        // for its lifetime) is still alive, or it would have cleared SAVED.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        let _ = termios::tcsetattr(fd, SetArg::TCSADRAIN, &termios);
    }
}

fn install_panic_hook() {
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore_saved();
            previous(info);
        }));
    });
}

/// Why the terminal could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TtyError {
    #[error("cannot read or set the terminal's settings")]
    Termios(#[source] Errno),
    #[error("cannot connect to the guest's terminal at {}", path.display())]
    Connect {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot set up the terminal relay")]
    Relay(#[source] std::io::Error),
}

/// The terminal on `fd` in raw mode for as long as this value lives.
#[derive(Debug)]
pub struct RawMode {
    fd: RawFd,
    saved: Termios,
}

impl RawMode {
    /// Saves the settings of the terminal on `fd` and makes it raw (no
    /// echo, no line editing, no signals from keys, no output processing).
    /// `fd` must stay open while the guard lives.
    pub fn enter(fd: BorrowedFd<'_>) -> Result<RawMode, TtyError> {
        install_panic_hook();
        let saved = termios::tcgetattr(fd).map_err(TtyError::Termios)?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        if let Ok(mut s) = SAVED.lock() {
            *s = Some((fd.as_raw_fd(), saved.clone()));
        }
        termios::tcsetattr(fd, SetArg::TCSADRAIN, &raw).map_err(TtyError::Termios)?;
        Ok(RawMode {
            fd: fd.as_raw_fd(),
            saved,
        })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Ok(mut s) = SAVED.lock() {
            *s = None;
        }
        // SAFETY: the caller of `enter` keeps the fd open while we live.
        let fd = unsafe { BorrowedFd::borrow_raw(self.fd) };
        let _ = termios::tcsetattr(fd, SetArg::TCSADRAIN, &self.saved);
    }
}

/// The guest's terminal joined to the user: this process's own terminal
/// (`run` in the foreground), or `attach.sock` (a detached session).
#[derive(Debug)]
pub enum Joined {
    Terminal(TtyRelay),
    Attach(super::attach::AttachServer),
}

impl Joined {
    /// Joins the guest's terminal at `tty_socket`: to `attach.sock` in
    /// `runtime_dir` if `detached`, else to this process's terminal.
    pub fn start(
        detached: bool,
        tty_socket: &Path,
        runtime_dir: &Path,
        events: mpsc::UnboundedSender<TtyEvent>,
        hint: &str,
        log: super::log::SessionLog,
    ) -> Result<Joined, TtyError> {
        if detached {
            let attach = super::attach::attach_socket(runtime_dir);
            super::attach::AttachServer::start(tty_socket, &attach, events, log).map(Joined::Attach)
        } else {
            TtyRelay::start(tty_socket, events, hint, log).map(Joined::Terminal)
        }
    }

    /// Lets the agent's last output through, then stops.
    pub async fn drain_and_stop(self) {
        match self {
            Joined::Terminal(relay) => relay.drain_and_stop().await,
            Joined::Attach(server) => server.drain_and_stop().await,
        }
    }
}

/// What the relay tells the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TtyEvent {
    /// The user's window changed size.
    Resize { rows: u16, cols: u16 },
    /// The user typed the escape.
    Escape,
}

/// How long the guest's output must be quiet before the relay stops after
/// the agent exited (its last bytes may trail the `Exited` message, which
/// travels on the other port).
const DRAIN_QUIET: Duration = Duration::from_millis(300);
const DRAIN_MAX: Duration = Duration::from_secs(3);

/// The user's terminal (this process's stdin and stdout) joined to the
/// guest's pty over `tty.sock`. Dropping it stops the relay and restores
/// the terminal.
#[derive(Debug)]
pub struct TtyRelay {
    socket: UnixStream,
    stop_write: OwnedFd,
    input: Option<std::thread::JoinHandle<()>>,
    output: Option<std::thread::JoinHandle<()>>,
    winch: Option<tokio::task::JoinHandle<()>>,
    last_output: Arc<AtomicU64>,
    epoch: Instant,
    raw: Option<RawMode>,
}

impl TtyRelay {
    /// Connects to the guest's terminal at `socket_path`, prints the escape
    /// hint, puts the terminal in raw mode and starts relaying. Events (the
    /// escape, window-size changes) arrive on `events`. Must be called
    /// inside a tokio runtime (for SIGWINCH).
    pub fn start(
        socket_path: &Path,
        events: mpsc::UnboundedSender<TtyEvent>,
        hint: &str,
        log: super::log::SessionLog,
    ) -> Result<TtyRelay, TtyError> {
        let socket = UnixStream::connect(socket_path).map_err(|source| TtyError::Connect {
            path: socket_path.to_owned(),
            source,
        })?;
        let (stop_read, stop_write) = nix::unistd::pipe().map_err(|e| TtyError::Relay(e.into()))?;
        let to_guest = socket.try_clone().map_err(TtyError::Relay)?;
        let from_guest = socket.try_clone().map_err(TtyError::Relay)?;
        let mut winch =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())
                .map_err(TtyError::Relay)?;

        eprint!("{hint}\r\n");
        let raw = RawMode::enter(std::io::stdin().as_fd())?;

        let epoch = Instant::now();
        let last_output = Arc::new(AtomicU64::new(0));
        let last = last_output.clone();
        let output = std::thread::spawn(move || copy_to_terminal(from_guest, &last, epoch, &log));
        let escape_tx = events.clone();
        let input = std::thread::spawn(move || {
            if copy_from_keyboard(to_guest, stop_read) == Some(Escape::Stop) {
                let _ = escape_tx.send(TtyEvent::Escape);
            }
        });
        let winch = tokio::spawn(async move {
            while winch.recv().await.is_some() {
                let (rows, cols) = window_size(std::io::stdout().as_fd());
                if events.send(TtyEvent::Resize { rows, cols }).is_err() {
                    return;
                }
            }
        });
        Ok(TtyRelay {
            socket,
            stop_write,
            input: Some(input),
            output: Some(output),
            winch: Some(winch),
            last_output,
            epoch,
            raw: Some(raw),
        })
    }

    /// Waits until the guest's output has been quiet for a moment (bounded),
    /// so the agent's last words reach the screen, then stops.
    pub async fn drain_and_stop(mut self) {
        let deadline = Instant::now() + DRAIN_MAX;
        loop {
            let last = Duration::from_millis(self.last_output.load(Ordering::Relaxed));
            let quiet = self.epoch.elapsed().saturating_sub(last);
            if quiet >= DRAIN_QUIET || Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(DRAIN_QUIET - quiet).await;
        }
        self.stop();
    }

    fn stop(&mut self) {
        let _ = nix::unistd::write(&self.stop_write, b"x");
        let _ = self.socket.shutdown(std::net::Shutdown::Both);
        if let Some(w) = self.winch.take() {
            w.abort();
        }
        for t in [self.input.take(), self.output.take()]
            .into_iter()
            .flatten()
        {
            let _ = t.join();
        }
        // Restore the terminal only after the output thread wrote its last
        // byte.
        self.raw.take();
    }
}

impl Drop for TtyRelay {
    fn drop(&mut self) {
        self.stop();
    }
}

fn copy_to_terminal(
    mut from_guest: UnixStream,
    last: &AtomicU64,
    epoch: Instant,
    log: &super::log::SessionLog,
) {
    let mut buf = vec![0u8; 16 * 1024];
    let mut out = std::io::stdout();
    loop {
        match from_guest.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                let now = u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
                last.store(now, Ordering::Relaxed);
                log.append(&buf[..n]);
                if out.write_all(&buf[..n]).and_then(|()| out.flush()).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// Keyboard → guest until the escape, the end of stdin, or a byte on `stop`.
fn copy_from_keyboard(mut to_guest: UnixStream, stop: OwnedFd) -> Option<Escape> {
    let stdin = std::io::stdin();
    let mut scanner = EscapeScanner::default();
    let mut buf = [0u8; 4096];
    let mut out = Vec::with_capacity(4096);
    loop {
        let mut fds = [
            PollFd::new(stdin.as_fd(), PollFlags::POLLIN),
            PollFd::new(stop.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(Errno::EINTR) => continue,
            Err(_) => return None,
        }
        if fds[1].revents().is_some_and(|r| !r.is_empty()) {
            return None;
        }
        let ready = fds[0].revents().unwrap_or(PollFlags::empty());
        if ready.is_empty() {
            continue;
        }
        let n = match nix::unistd::read(stdin.as_fd(), &mut buf) {
            Ok(0) => return None,
            Ok(n) => n,
            Err(Errno::EINTR | Errno::EAGAIN) => continue,
            Err(_) => return None,
        };
        out.clear();
        let escape = scanner.feed(&buf[..n], &mut out);
        if !out.is_empty() && to_guest.write_all(&out).is_err() {
            return None;
        }
        if escape.is_some() {
            return escape;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `reads` one after the other; returns what reached the agent and
    /// whether the escape was seen.
    fn scan(reads: &[&[u8]]) -> (Vec<u8>, bool) {
        let mut scanner = EscapeScanner::default();
        let mut out = Vec::new();
        for read in reads {
            if scanner.feed(read, &mut out) == Some(Escape::Stop) {
                return (out, true);
            }
        }
        (out, false)
    }

    #[test]
    fn escape_sequences() {
        // (reads, bytes for the agent, escape seen)
        type Case = (&'static [&'static [u8]], &'static [u8], bool);
        let cases: &[Case] = &[
            // At the very start, like ssh.
            (&[b"~."], b"", true),
            (&[b"ls\r~."], b"ls\r", true),
            (&[b"ls\n~."], b"ls\n", true),
            // Bytes after the escape are dropped.
            (&[b"\r~.rm -rf /\r"], b"\r", true),
            // Split across reads, at every point.
            (&[b"ls\r", b"~", b"."], b"ls\r", true),
            (&[b"ls", b"\r~", b"."], b"ls\r", true),
            (&[b"ls\r~", b".x"], b"ls\r", true),
            // `~~` sends one `~`, and the line is no longer at its start.
            (&[b"~~"], b"~", false),
            (&[b"~~."], b"~.", false),
            (&[b"\r~", b"~", b"."], b"\r~.", false),
            // Not at the start of a line: plain bytes.
            (&[b"a~."], b"a~.", false),
            (&[b"echo ~.\r"], b"echo ~.\r", false),
            (&[b" ~."], b" ~.", false),
            // `~` then anything else: both go through, and that byte counts.
            (&[b"~x"], b"~x", false),
            (&[b"~\r~."], b"~\r", true),
            (&[b"~", b"\r", b"~."], b"~\r", true),
            // A held `~` at the end is not sent yet (it may be an escape).
            (&[b"\r~"], b"\r", false),
            // Ctrl-C, Ctrl-Z and other control bytes are plain bytes.
            (&[b"\x03\x1a\x04"], b"\x03\x1a\x04", false),
            (&[b"\x03~."], b"\x03~.", false),
            // Other separators are not line starts.
            (&[b"\t~."], b"\t~.", false),
            (&[b"\x1b~."], b"\x1b~.", false),
            // Empty reads change nothing.
            (&[b"", b"~", b"", b"."], b"", true),
        ];
        for (reads, agent, escaped) in cases {
            let (out, seen) = scan(reads);
            assert_eq!(
                (String::from_utf8_lossy(&out), seen),
                (String::from_utf8_lossy(agent), *escaped),
                "{reads:?}"
            );
        }
    }

    #[test]
    fn escape_is_found_at_every_split_of_a_long_input() {
        let input = b"make test\rvim x\r~~home\r~.after";
        for split in 0..=input.len() {
            let (a, b) = input.split_at(split);
            let (out, seen) = scan(&[a, b]);
            assert!(seen, "split at {split}");
            assert_eq!(out, b"make test\rvim x\r~home\r", "split at {split}");
        }
    }

    #[test]
    fn terms_and_sizes() {
        assert_eq!(term_for(Some("screen-256color")), "screen-256color");
        assert_eq!(term_for(Some("xterm+x.y_z")), "xterm+x.y_z");
        for bad in [None, Some(""), Some("a b"), Some("x\u{1b}]0;"), Some("é")] {
            assert_eq!(term_for(bad), "xterm-256color", "{bad:?}");
        }
        assert_eq!(term_for(Some(&"x".repeat(65))), "xterm-256color");
        let spec = TtySpec {
            rows: 1,
            cols: 1,
            term: term_for(Some("vt100")),
        };
        spec.validate().unwrap();
        for (rows, cols, expected) in [
            (0, 0, (24, 80)),
            (50, 0, (50, 80)),
            (0, 120, (24, 120)),
            (40, 132, (40, 132)),
            (u16::MAX, 5000, (MAX_TTY_DIM, MAX_TTY_DIM)),
        ] {
            let got = size_or_default(rows, cols);
            assert_eq!(got, expected);
            zerolease_protocol::check_tty_size(got.0, got.1).unwrap();
        }
    }

    fn same(a: &Termios, b: &Termios) -> bool {
        a.input_flags == b.input_flags
            && a.output_flags == b.output_flags
            && a.control_flags == b.control_flags
            && a.local_flags == b.local_flags
            && a.control_chars == b.control_chars
    }

    /// One test for the guard, since the panic hook's saved state is global.
    #[test]
    fn raw_mode_is_restored_on_drop_and_by_the_panic_path() {
        let pty = nix::pty::openpty(None, None).unwrap();
        let before = termios::tcgetattr(pty.slave.as_fd()).unwrap();
        assert!(before.local_flags.contains(termios::LocalFlags::ICANON));

        // Drop.
        let guard = RawMode::enter(pty.slave.as_fd()).unwrap();
        let raw = termios::tcgetattr(pty.slave.as_fd()).unwrap();
        assert!(!raw.local_flags.contains(termios::LocalFlags::ICANON));
        assert!(!raw.local_flags.contains(termios::LocalFlags::ISIG));
        assert!(!raw.local_flags.contains(termios::LocalFlags::ECHO));
        drop(guard);
        assert!(same(
            &termios::tcgetattr(pty.slave.as_fd()).unwrap(),
            &before
        ));

        // A panic while raw: the hook restores before the guard's drop runs
        // (and the drop after it changes nothing).
        let fd = pty.slave.as_raw_fd();
        let result = std::panic::catch_unwind(|| {
            // SAFETY: `pty.slave` outlives this closure.
            let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
            let _guard = RawMode::enter(borrowed).unwrap();
            panic!("boom");
        });
        assert!(result.is_err());
        assert!(same(
            &termios::tcgetattr(pty.slave.as_fd()).unwrap(),
            &before
        ));

        // The hook's own path, without unwinding (as with panic=abort).
        let guard = RawMode::enter(pty.slave.as_fd()).unwrap();
        restore_saved();
        assert!(same(
            &termios::tcgetattr(pty.slave.as_fd()).unwrap(),
            &before
        ));
        drop(guard);
        assert!(same(
            &termios::tcgetattr(pty.slave.as_fd()).unwrap(),
            &before
        ));
    }
}
