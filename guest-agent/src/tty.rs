//! Interactive agents: a pty in the guest, relayed over the TTY port.
//!
//! When `Provision` carries a `tty`, the agent command runs with a pty's
//! slave as stdin, stdout, stderr and controlling terminal (see
//! [`crate::run::spawn_io`]), and two threads copy bytes between the pty's
//! master and the virtio-serial port named [`TTY_PORT`]: host keystrokes in,
//! the terminal's output out. `Resize` sets the master's window size, which
//! makes the kernel send SIGWINCH to the foreground process group.
//!
//! **Invariants:**
//! - The control channel never carries terminal bytes and the TTY port never
//!   carries a message: a program in the guest cannot forge protocol frames
//!   by printing.
//! - A read of 0 bytes from the port means "no host connected yet" (the
//!   virtio console driver's behaviour), not the end: the relay waits and
//!   reads again.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use nix::errno::Errno;
use nix::pty::{OpenptyResult, Winsize, openpty};
use zerolease_protocol::TtySpec;

/// The name of the virtio-serial port that carries the raw terminal stream.
pub const TTY_PORT: &str = "org.zerolease.tty";

/// How long to wait for the TTY port to appear.
const PORT_WAIT: Duration = Duration::from_secs(5);

/// How long the port relay waits before reading again when no host is
/// connected.
const NO_HOST_PAUSE: Duration = Duration::from_millis(50);

/// Where to look for the TTY port.
#[derive(Debug, Clone)]
pub struct PortLookup {
    /// `/sys` in the guest.
    pub sysfs_root: PathBuf,
    /// `/dev` in the guest.
    pub dev_root: PathBuf,
}

/// Why the terminal could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TtyError {
    /// No pty could be allocated.
    #[error("cannot open a pty")]
    Openpty(#[source] Errno),
    /// The pty slave could not be given to the agent user.
    #[error("cannot hand the pty to the agent user")]
    Chown(#[source] Errno),
    /// The TTY port is missing or cannot be opened.
    #[error("cannot open the TTY port {TTY_PORT}")]
    Port(#[source] crate::boot::BootError),
    /// Duplicating a descriptor failed.
    #[error("cannot duplicate a descriptor")]
    Dup(#[source] io::Error),
}

/// The window size for `rows` x `cols`.
pub fn winsize(rows: u16, cols: u16) -> Winsize {
    Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

/// Opens a pty of the size in `spec` whose slave belongs to `uid:gid`.
/// Returns (master, slave).
pub fn open_pty(spec: &TtySpec, uid: u32, gid: u32) -> Result<(OwnedFd, OwnedFd), TtyError> {
    let OpenptyResult { master, slave } =
        openpty(Some(&winsize(spec.rows, spec.cols)), None).map_err(TtyError::Openpty)?;
    nix::unistd::fchown(
        &slave,
        Some(nix::unistd::Uid::from_raw(uid)),
        Some(nix::unistd::Gid::from_raw(gid)),
    )
    .map_err(TtyError::Chown)?;
    Ok((master, slave))
}

nix::ioctl_write_ptr_bad!(tiocswinsz, nix::libc::TIOCSWINSZ, Winsize);

/// Sets the window size of the pty whose master is `master`; the kernel
/// signals SIGWINCH to its foreground process group.
pub fn set_size(master: BorrowedFd<'_>, rows: u16, cols: u16) -> Result<(), Errno> {
    let size = winsize(rows, cols);
    // SAFETY: TIOCSWINSZ reads one `winsize` from the pointer, which points
    // to a live local of exactly that type; the fd is borrowed and open.
    unsafe { tiocswinsz(master.as_raw_fd(), &size) }.map(drop)
}

/// Finds and opens the TTY port for reading and writing.
pub fn open_port(lookup: &PortLookup) -> Result<File, TtyError> {
    crate::boot::open_control_port(&lookup.sysfs_root, &lookup.dev_root, TTY_PORT, PORT_WAIT)
        .map_err(TtyError::Port)
}

/// Starts the two relay threads between `master` and `port`. The returned
/// receiver gets `()` once the pty's output is drained (every slave
/// descriptor closed, so the master reads EIO) and all of it was written to
/// the port.
pub fn start_relay(master: &OwnedFd, port: File) -> Result<mpsc::Receiver<()>, TtyError> {
    let master_in = File::from(master.try_clone().map_err(TtyError::Dup)?);
    let master_out = File::from(master.try_clone().map_err(TtyError::Dup)?);
    let port_in = port.try_clone().map_err(TtyError::Dup)?;
    let port_out = port;
    let (drained_tx, drained_rx) = mpsc::channel();
    std::thread::spawn(move || {
        copy_out(master_out, port_out);
        let _ = drained_tx.send(());
    });
    std::thread::spawn(move || copy_in(port_in, master_in));
    Ok(drained_rx)
}

/// The terminal's output to the host, until the pty is closed.
fn copy_out(mut master: File, mut port: File) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match master.read(&mut buf) {
            // EIO: every slave descriptor is closed.
            Ok(0) => return,
            Ok(n) => {
                if port.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// Host keystrokes to the terminal. Ends when the pty is gone.
fn copy_in(mut port: File, mut master: File) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match port.read(&mut buf) {
            Ok(0) => std::thread::sleep(NO_HOST_PAUSE),
            Ok(n) => {
                if let Err(err) = master.write_all(&buf[..n])
                    && err.raw_os_error() == Some(nix::libc::EIO)
                {
                    return;
                }
            }
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => std::thread::sleep(NO_HOST_PAUSE),
        }
    }
}

/// Whether `fd` is a terminal (for tests).
pub fn is_terminal(fd: BorrowedFd<'_>) -> bool {
    nix::unistd::isatty(fd).unwrap_or(false)
}

/// The default lookup under `root`.
pub fn lookup_under(root: &Path) -> PortLookup {
    PortLookup {
        sysfs_root: root.join("sys"),
        dev_root: root.join("dev"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn pty_size_is_set_and_changed() {
        let me = nix::unistd::getuid().as_raw();
        let gid = nix::unistd::getgid().as_raw();
        let spec = TtySpec {
            rows: 33,
            cols: 101,
            term: "xterm".into(),
        };
        let (master, slave) = open_pty(&spec, me, gid).unwrap();
        assert!(is_terminal(slave.as_fd()));
        let size = |fd: BorrowedFd<'_>| {
            let mut ws = winsize(0, 0);
            // SAFETY: TIOCGWINSZ writes one `winsize` into a live local.
            let rc = unsafe { nix::libc::ioctl(fd.as_raw_fd(), nix::libc::TIOCGWINSZ, &mut ws) };
            assert_eq!(rc, 0);
            (ws.ws_row, ws.ws_col)
        };
        assert_eq!(size(slave.as_fd()), (33, 101));
        set_size(master.as_fd(), 50, 200).unwrap();
        assert_eq!(size(slave.as_fd()), (50, 200));
    }

    #[test]
    fn relay_copies_both_ways_and_reports_the_drain() {
        use std::os::unix::net::UnixStream;
        let me = nix::unistd::getuid().as_raw();
        let gid = nix::unistd::getgid().as_raw();
        let spec = TtySpec {
            rows: 24,
            cols: 80,
            term: "xterm".into(),
        };
        let (master, slave) = open_pty(&spec, me, gid).unwrap();
        // A socket pair stands in for the port: `File` over one end.
        let (port, mut host) = UnixStream::pair().unwrap();
        let drained = start_relay(&master, File::from(OwnedFd::from(port))).unwrap();
        let mut slave = File::from(slave);
        // Host → terminal: with the default (cooked) line discipline the
        // line arrives at the slave once it is complete.
        host.write_all(b"hello\n").unwrap();
        let mut buf = [0u8; 6];
        slave.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hello\n");
        // Terminal → host (ONLCR turns \n into \r\n), plus the echo.
        slave.write_all(b"out\n").unwrap();
        host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut seen = Vec::new();
        while !String::from_utf8_lossy(&seen).contains("out\r\n") {
            let mut chunk = [0u8; 64];
            let n = host.read(&mut chunk).unwrap();
            assert!(n > 0);
            seen.extend_from_slice(&chunk[..n]);
        }
        assert!(drained.try_recv().is_err(), "not drained while open");
        drop(slave);
        drained.recv_timeout(Duration::from_secs(5)).unwrap();
    }
}
