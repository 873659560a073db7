//! Interactive sessions: the `zerolease` binary run under a pty the test
//! owns, as a user's terminal would run it, against a real VM.
//!
//! One session checks: the agent's stdin is a pty (`tty`, `test -t 0`);
//! `stty size` shows the host window's size, and the new size after the
//! host window changes (TIOCSWINSZ on the pty → SIGWINCH to zerolease →
//! `Resize`); Ctrl-C kills a foreground `sleep` in the guest's shell and
//! the session goes on; `Enter ~ .` ends the session, nothing is left, and
//! the terminal's settings afterwards are exactly what they were before.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::pty::{Winsize, openpty};
use nix::sys::termios::{self, Termios};
use zerolease_tests::{require_root_and_tools, zerolease_bin};

use crate::session::{CANARY, SessionWorld, image_ready};

fn winsize(rows: u16, cols: u16) -> Winsize {
    Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

nix::ioctl_write_ptr_bad!(tiocswinsz, nix::libc::TIOCSWINSZ, Winsize);

/// A pty whose slave is a child's controlling terminal, and everything the
/// child wrote to it.
struct HostPty {
    master: File,
    slave: OwnedFd,
    seen: Arc<Mutex<Vec<u8>>>,
}

impl HostPty {
    fn new(rows: u16, cols: u16) -> HostPty {
        let pty = openpty(Some(&winsize(rows, cols)), None).unwrap();
        let master = File::from(pty.master);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut reader = master.try_clone().unwrap();
        let sink = seen.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // EIO once the child and we have closed the slave.
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        HostPty {
            master,
            slave: pty.slave,
            seen,
        }
    }

    /// Starts `cmd` in a new session with the slave as its controlling
    /// terminal and stdin, stdout and stderr.
    fn spawn(&self, mut cmd: Command) -> Child {
        let stdio = || Stdio::from(self.slave.try_clone().unwrap());
        cmd.stdin(stdio()).stdout(stdio()).stderr(stdio());
        // SAFETY: setsid and ioctl are async-signal-safe system calls on
        // integers; nothing is allocated between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if nix::libc::setsid() < 0 || nix::libc::ioctl(0, nix::libc::TIOCSCTTY, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd.spawn().unwrap()
    }

    fn termios(&self) -> Termios {
        termios::tcgetattr(self.slave.as_fd()).unwrap()
    }

    fn type_in(&mut self, bytes: &[u8]) {
        self.master.write_all(bytes).unwrap();
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.seen.lock().unwrap()).into_owned()
    }

    /// Waits until the output contains `needle`; panics with the output
    /// after `timeout`.
    fn wait_for(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.text();
            if text.contains(needle) {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "no {needle:?} within {timeout:?}; the terminal shows:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits for `run`'s hint that the session is interactive, then for the
    /// guest's shell to answer; returns the session id the hint names.
    fn joined_session(&mut self) -> String {
        let text = self.wait_for("is interactive", Duration::from_secs(150));
        let id = text
            .split("session ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("no session id in {text}"))
            .to_owned();
        // Markers are computed by the guest's shell, so the echo of what we
        // type never matches them.
        self.type_in(b"echo R$((40+2))Y\r");
        self.wait_for("R42Y", Duration::from_secs(60));
        id
    }

    fn resize(&self, rows: u16, cols: u16) {
        let ws = winsize(rows, cols);
        // SAFETY: TIOCSWINSZ reads one `winsize` from a live local; the
        // master is open.
        unsafe { tiocswinsz(self.master.as_raw_fd(), &ws) }.unwrap();
    }
}

fn same(a: &Termios, b: &Termios) -> bool {
    a.input_flags == b.input_flags
        && a.output_flags == b.output_flags
        && a.control_flags == b.control_flags
        && a.local_flags == b.local_flags
        && a.control_chars == b.control_chars
}

fn wait_exit(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!("zerolease did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn an_interactive_session_gets_a_real_terminal_and_the_escape_ends_it() {
    if !require_root_and_tools(&["ip", "nft", "qemu-system-x86_64"]) || !image_ready() {
        return;
    }
    let bin = zerolease_bin();
    let w = SessionWorld::new("exec sh -i");
    let manifest = w.dir.path().join("session.yaml");
    let mut pty = HostPty::new(30, 100);
    let before = pty.termios();

    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", w.host.name()])
        .arg(&bin)
        .arg("run")
        .arg(&manifest)
        .env("ZEROLEASE_HOME", w.dir.path().join("home"))
        .env("TERM", "vt100")
        .env_remove("ZEROLEASE_LOG");
    let mut child = pty.spawn(cmd);

    // The hint names the session; then the guest's shell talks.
    let id = pty.joined_session();

    // A real terminal, of the host window's size, with TERM passed on.
    pty.type_in(b"tty; test -t 0 && echo T$((6*7))T; echo TERM=$TERM.; stty size\r");
    pty.wait_for("T42T", Duration::from_secs(20));
    pty.wait_for("/dev/pts/", Duration::from_secs(20));
    pty.wait_for("TERM=vt100.", Duration::from_secs(20));
    pty.wait_for("30 100", Duration::from_secs(20));

    // The host window changes size: the guest's terminal follows.
    pty.resize(41, 123);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        pty.type_in(b"stty size\r");
        std::thread::sleep(Duration::from_secs(1));
        if pty.text().contains("41 123") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the size did not follow:\n{}",
            pty.text()
        );
    }

    // Ctrl-C reaches the agent: it kills the foreground sleep, and the
    // session (and its shell) go on.
    pty.type_in(b"sleep 1000\r");
    std::thread::sleep(Duration::from_secs(2));
    pty.type_in(b"\x03");
    pty.type_in(b"echo C$((2+3))D\r");
    pty.wait_for("C5D", Duration::from_secs(30));
    assert!(
        child.try_wait().unwrap().is_none(),
        "Ctrl-C ended zerolease"
    );

    // `~~` at a line start sends one `~`: `~/../../bin/echo` is /bin/echo
    // only if exactly one arrived.
    pty.type_in(b"\r~~/../../bin/echo V$((3*3))V\r");
    pty.wait_for("V9V", Duration::from_secs(20));

    // Enter ~ . ends the session.
    pty.type_in(b"\r~.");
    let status = wait_exit(&mut child, Duration::from_secs(60));
    let text = pty.text();
    eprintln!("--- terminal\n{text}");
    assert!(
        status.signal().is_none(),
        "zerolease was killed: {status:?}"
    );
    assert_ne!(
        status.code(),
        Some(0),
        "an escaped session is not a success"
    );
    assert!(text.contains("stopped from its terminal"), "{text}");
    assert!(
        same(&pty.termios(), &before),
        "the terminal's settings were not restored"
    );
    w.assert_no_leftovers(&id);
    assert!(!text.contains(CANARY), "the canary reached the terminal");
}

/// The output log: a non-interactive `zerolease run` (the existing piped
/// mode) keeps stdout and stderr in `sessions/<id>/output.log`, 0600;
/// `zerolease logs -f` started while the agent runs prints everything and
/// returns once the session has ended; `zerolease logs` prints it again;
/// `zerolease logs --console` prints the guest's kept serial console.
#[test]
fn logs_keep_the_agents_output_and_follow_it_until_the_end() {
    if !require_root_and_tools(&["ip", "nft", "qemu-system-x86_64"]) || !image_ready() {
        return;
    }
    let bin = zerolease_bin();
    let w = SessionWorld::new(
        "echo first-$((1+1)); echo err-$((2+2)) >&2; sleep 6; echo second-$((3+3)); exit 3",
    );
    let home = w.dir.path().join("home");
    let run = Command::new("ip")
        .args(["netns", "exec", w.host.name()])
        .arg(&bin)
        .args(["run", "--no-tty"])
        .arg(w.dir.path().join("session.yaml"))
        .env("ZEROLEASE_HOME", &home)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    // The session's record appears once it has an id; its log with it.
    let deadline = Instant::now() + Duration::from_secs(60);
    let id = loop {
        let found = std::fs::read_dir(home.join("sessions"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.strip_suffix(".json").map(str::to_owned)
            })
            .next();
        if let Some(id) = found {
            break id;
        }
        assert!(Instant::now() < deadline, "no session record appeared");
        std::thread::sleep(Duration::from_millis(100));
    };
    let follow = Command::new(&bin)
        .args(["logs", "-f", &id])
        .env("ZEROLEASE_HOME", &home)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let ran = run.wait_with_output().unwrap();
    let ran_stdout = String::from_utf8_lossy(&ran.stdout).into_owned();
    assert_eq!(
        ran.status.code(),
        Some(3),
        "{ran_stdout}\n{}",
        String::from_utf8_lossy(&ran.stderr)
    );
    // `-f` ends by itself once the session has ended.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(follow.wait_with_output());
    });
    let followed = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("logs -f did not return after the session ended")
        .unwrap();
    assert!(followed.status.success());
    let followed = String::from_utf8_lossy(&followed.stdout).into_owned();
    let (a, b, c) = (
        followed.find("first-2"),
        followed.find("err-4"),
        followed.find("second-6"),
    );
    assert!(
        a.is_some() && b.is_some() && c > a && c > b,
        "logs -f printed:\n{followed}"
    );
    assert!(ran_stdout.contains("first-2") && ran_stdout.contains("second-6"));

    // Afterwards, the whole log again, from the file.
    let again = Command::new(&bin)
        .args(["logs", &id])
        .env("ZEROLEASE_HOME", &home)
        .output()
        .unwrap();
    assert!(again.status.success());
    assert_eq!(String::from_utf8_lossy(&again.stdout), followed);
    let log = home.join("sessions").join(&id).join("output.log");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&log).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(!std::fs::read_to_string(&log).unwrap().contains(CANARY));
    // The guest's console outlives the VM, private, with the guest agent's
    // uptime-stamped boot lines and not the agent's output.
    let console = Command::new(&bin)
        .args(["logs", "--console", &id])
        .env("ZEROLEASE_HOME", &home)
        .output()
        .unwrap();
    assert!(console.status.success());
    let console = String::from_utf8_lossy(&console.stdout).into_owned();
    assert!(
        console.contains("zerolease-guest [") && console.contains("control port open"),
        "console log:\n{console}"
    );
    assert!(!console.contains("first-2") && !console.contains(CANARY));
    let console_log = home.join("sessions").join(&id).join("console.log");
    assert_eq!(
        std::fs::metadata(&console_log)
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    // A bad id is refused before any path is built from it.
    let bad = Command::new(&bin)
        .args(["logs", "../../etc"])
        .env("ZEROLEASE_HOME", &home)
        .output()
        .unwrap();
    assert!(!bad.status.success());
    w.assert_no_leftovers(&id);
}

/// `run --detach` prints the id of a running session and exits 0;
/// `zerolease attach` gets a real terminal of its own size; Enter ~ .
/// detaches and the session goes on; a second attach finds the same shell,
/// whose `exit 5` ends the session: attach returns, the record says 5,
/// nothing is left, and the log has what the terminal showed.
#[test]
fn a_detached_session_is_attached_detached_and_ended() {
    if !require_root_and_tools(&["ip", "nft", "qemu-system-x86_64"]) || !image_ready() {
        return;
    }
    let bin = zerolease_bin();
    let w = SessionWorld::new("exec sh -i");
    let home = w.dir.path().join("home");
    let started = Command::new("ip")
        .args(["netns", "exec", w.host.name()])
        .arg(&bin)
        .args(["run", "--detach"])
        .arg(w.dir.path().join("session.yaml"))
        .env("ZEROLEASE_HOME", &home)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let id = String::from_utf8_lossy(&started.stdout).trim().to_owned();
    assert!(
        started.status.success() && !id.is_empty(),
        "run --detach: {:?}\n{id}\n{}",
        started.status,
        String::from_utf8_lossy(&started.stderr)
    );
    let record = || zerolease::session::record::SessionRecord::load(&w.home(), &id).unwrap();
    assert_eq!(record().state, "running");
    assert!(record().supervisor_alive());

    // First attach: a terminal of the attaching window's size.
    let attach = |pty: &HostPty| {
        let mut cmd = Command::new(&bin);
        cmd.args(["attach", &id]).env("ZEROLEASE_HOME", &home);
        pty.spawn(cmd)
    };
    let mut pty = HostPty::new(33, 99);
    let before = pty.termios();
    let mut child = attach(&pty);
    pty.wait_for("attached to session", Duration::from_secs(20));
    pty.type_in(b"echo A$((5*5))A; stty size; test -t 0 && echo T$((6*7))T\r");
    pty.wait_for("A25A", Duration::from_secs(60));
    pty.wait_for("33 99", Duration::from_secs(20));
    pty.wait_for("T42T", Duration::from_secs(20));
    // The attached window changes size: the guest's terminal follows.
    pty.resize(37, 111);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        pty.type_in(b"stty size\r");
        std::thread::sleep(Duration::from_secs(1));
        if pty.text().contains("37 111") {
            break;
        }
        assert!(Instant::now() < deadline, "no resize:\n{}", pty.text());
    }
    pty.type_in(b"\r~.");
    let status = wait_exit(&mut child, Duration::from_secs(20));
    assert_eq!(status.code(), Some(0));
    pty.wait_for("keeps running", Duration::from_secs(5));
    assert!(
        same(&pty.termios(), &before),
        "attach left the terminal raw"
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(record().state, "running", "detaching stopped the session");

    // Second attach: the same shell; its exit ends the session.
    let mut pty = HostPty::new(20, 70);
    let mut child = attach(&pty);
    pty.wait_for("attached to session", Duration::from_secs(20));
    pty.type_in(b"echo B$((6*6))B; stty size\r");
    pty.wait_for("B36B", Duration::from_secs(30));
    pty.wait_for("20 70", Duration::from_secs(20));
    pty.type_in(b"exit 5\r");
    let status = wait_exit(&mut child, Duration::from_secs(60));
    assert_eq!(status.code(), Some(0));
    pty.wait_for("has ended", Duration::from_secs(5));
    let deadline = Instant::now() + Duration::from_secs(60);
    while !record().is_finished() {
        assert!(Instant::now() < deadline, "the session did not end");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(record().exit_code, Some(5));
    w.assert_no_leftovers(&id);
    let log = std::fs::read_to_string(home.join("sessions").join(&id).join("output.log")).unwrap();
    assert!(log.contains("A25A") && log.contains("B36B"), "{log}");
    assert!(!log.contains(CANARY));
}

/// In an interactive session a SIGINT (from `kill`; the raw terminal sends
/// none) does not end the session, SIGTERM does: cleanup runs, nothing is
/// left, and the terminal is restored on that path too.
#[test]
fn sigterm_ends_an_interactive_session_and_restores_the_terminal() {
    if !require_root_and_tools(&["ip", "nft", "qemu-system-x86_64"]) || !image_ready() {
        return;
    }
    let bin = zerolease_bin();
    let w = SessionWorld::new("exec sh -i");
    let mut pty = HostPty::new(24, 80);
    let before = pty.termios();
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", w.host.name()])
        .arg(&bin)
        .arg("run")
        .arg(w.dir.path().join("session.yaml"))
        .env("ZEROLEASE_HOME", w.dir.path().join("home"));
    let mut child = pty.spawn(cmd);
    let id = pty.joined_session();
    assert!(
        !same(&pty.termios(), &before),
        "the terminal is not raw during the session"
    );

    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    pty.type_in(b"echo S$((3+4))S\r");
    pty.wait_for("S7S", Duration::from_secs(30));
    assert!(
        child.try_wait().unwrap().is_none(),
        "SIGINT ended the session"
    );

    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = wait_exit(&mut child, Duration::from_secs(60));
    assert!(
        status.signal().is_none(),
        "zerolease was killed: {status:?}"
    );
    assert_ne!(status.code(), Some(0));
    assert!(
        same(&pty.termios(), &before),
        "the terminal's settings were not restored after SIGTERM"
    );
    w.assert_no_leftovers(&id);
}
