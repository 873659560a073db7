//! The QEMU side of a session against a real QEMU under TCG.
//!
//! The VMs here boot firmware only (no kernel): enough for QMP, process
//! control, descriptor passing and the watchdog's timeout. Under `CI=true`
//! a missing QEMU fails these tests; elsewhere they skip with a reason.

use std::ffi::OsString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use std::net::Ipv4Addr;
use zerolease::jail::JailId;

use zerolease::vm::argv::{self, AccelKind, Mac, Machine, NetSpec, VmSpec};
use zerolease::vm::overlay::{Overlay, OverlayError};
use zerolease::vm::process::{self, StopRequest, Stopped, VmError, VmRecord};
use zerolease::vm::watchdog::{BootError, QemuBooter, boot_with_fallback};
use zerolease::vm::{Vm, reap_leftovers};

const QMP_BOUND: Duration = Duration::from_secs(10);

/// The QEMU binary, or `None` (skip) outside CI when it is missing.
fn qemu() -> Option<PathBuf> {
    match process::find_qemu() {
        Ok(path) => Some(path),
        Err(err) => {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("CI=true and {err}");
            }
            eprintln!("SKIPPED: {err}");
            None
        }
    }
}

/// Whether the test may make taps; under CI a missing privilege fails.
fn root_and_tun() -> bool {
    if nix::unistd::geteuid().is_root() && Path::new("/dev/net/tun").exists() {
        return true;
    }
    let reason = "this test needs root and /dev/net/tun";
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("CI=true and {reason}");
    }
    eprintln!("SKIPPED: {reason}");
    false
}

fn spec(session: &str, dir: &Path) -> VmSpec {
    VmSpec {
        session: JailId::parse(session).unwrap(),
        machine: Machine::Q35,
        accel: AccelKind::Tcg,
        vcpus: 1,
        memory_mib: 128,
        boot: None,
        disk: None,
        raw_disks: Vec::new(),
        root_disk: None,
        net: None,
        runtime_dir: dir.to_owned(),
        console_log: None,
    }
}

/// A temporary directory of mode 0700, as a session's runtime dir is.
fn private_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    make_private(dir.path());
    dir
}

fn make_private(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).unwrap();
}

fn alive(pid: u32) -> bool {
    // A zombie keeps its /proc entry but has no command line.
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| !c.is_empty())
}

async fn started(qemu: &Path, session: &str, dir: &Path) -> Vm {
    let t = Instant::now();
    let mut vm = Vm::spawn(qemu, &spec(session, dir), None).unwrap();
    vm.connect_qmp(QMP_BOUND).await.unwrap();
    eprintln!("TIMING QEMU start to QMP ready: {:?}", t.elapsed());
    vm
}

#[tokio::test]
async fn qmp_negotiates_answers_and_quits() {
    let Some(qemu) = qemu() else { return };
    let dir = private_dir();
    let mut vm = started(&qemu, "qmpquit", dir.path()).await;
    let status = vm.qmp().unwrap().query_status().await.unwrap();
    assert!(status.running, "{status:?}");
    assert_eq!(status.state, "running");

    let pid = vm.pid();
    let t = Instant::now();
    let how = vm.destroy(Duration::from_secs(5)).await.unwrap();
    eprintln!("TIMING destroy by quit: {:?}", t.elapsed());
    assert_eq!(how, Stopped::Exited);
    assert_eq!(vm.exit_status().unwrap().code(), Some(0));
    assert!(!alive(pid));
    // Idempotent.
    assert_eq!(
        vm.destroy(Duration::from_secs(1)).await.unwrap(),
        Stopped::AlreadyGone
    );
    vm.kill().await.unwrap();
    assert!(
        std::fs::read_to_string(dir.path().join("qemu.log")).is_ok(),
        "QEMU's output goes to qemu.log"
    );
}

#[tokio::test]
async fn events_report_a_stop_and_the_exit() {
    let Some(qemu) = qemu() else { return };
    let dir = private_dir();
    let mut vm = started(&qemu, "events", dir.path()).await;
    let pid = vm.pid();
    // Shutdown event then exit, from a quit.
    vm.qmp().unwrap().quit().await.unwrap();
    let mut seen = Vec::new();
    loop {
        let event = tokio::time::timeout(Duration::from_secs(10), vm.next_event())
            .await
            .expect("events keep coming until exit");
        let done = matches!(event, zerolease::vm::VmEvent::Exited { .. });
        seen.push(event);
        if done {
            break;
        }
    }
    assert!(
        seen.contains(&zerolease::vm::VmEvent::Shutdown {
            guest: false,
            reason: "host-qmp-quit".into()
        }),
        "{seen:?}"
    );
    assert!(!alive(pid));
}

#[tokio::test]
async fn ignored_powerdown_escalates_to_sigkill() {
    let Some(qemu) = qemu() else { return };
    let dir = private_dir();
    let mut vm = started(&qemu, "powerdown", dir.path()).await;
    let pid = vm.pid();
    // Firmware alone does not act on the ACPI power button.
    let t = Instant::now();
    let how = vm
        .shutdown(StopRequest::Powerdown, Duration::from_secs(1))
        .await
        .unwrap();
    eprintln!(
        "TIMING destroy with ignored powerdown (grace 1s): {:?}",
        t.elapsed()
    );
    assert_eq!(how, Stopped::Killed);
    assert!(!alive(pid));
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(vm.exit_status().unwrap().signal(), Some(9));
}

#[tokio::test]
async fn destroy_of_a_frozen_qemu_kills_it() {
    let Some(qemu) = qemu() else { return };
    let dir = private_dir();
    let mut vm = started(&qemu, "frozen", dir.path()).await;
    let pid = vm.pid();
    // A stopped QEMU cannot answer `quit`.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .unwrap();
    let t = Instant::now();
    let how = vm.destroy(Duration::from_secs(1)).await.unwrap();
    eprintln!(
        "TIMING destroy of a frozen QEMU (grace 1s): {:?}",
        t.elapsed()
    );
    assert_eq!(how, Stopped::Killed);
    assert!(!alive(pid));
}

#[tokio::test]
async fn dropping_a_vm_kills_it() {
    let Some(qemu) = qemu() else { return };
    let dir = private_dir();
    let vm = started(&qemu, "dropped", dir.path()).await;
    let pid = vm.pid();
    drop(vm);
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(pid) {
        assert!(Instant::now() < deadline, "QEMU {pid} outlived its Vm");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The hello never comes from firmware: the watchdog gives up with the
/// message a user can act on, and leaves no QEMU behind.
#[tokio::test]
async fn watchdog_times_out_with_a_clear_message() {
    let Some(qemu) = qemu() else { return };
    let dir = private_dir();
    let mut booter = QemuBooter {
        qemu,
        spec: spec("nohello", dir.path()),
        tap: None,
        qmp_bound: QMP_BOUND,
        discard_grace: Duration::from_secs(2),
    };
    let t = Instant::now();
    let err = boot_with_fallback(&mut booter, &[AccelKind::Tcg], Duration::from_secs(2))
        .await
        .unwrap_err();
    eprintln!("TIMING watchdog with a 2s bound: {:?}", t.elapsed());
    assert!(matches!(err, BootError::NoHello { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!(
            "the guest did not say hello within 2s under TCG; see the console log at {}",
            dir.path().join("console.log").display()
        )
    );
    assert!(
        marked_pids("nohello").is_empty(),
        "the failed attempt left a QEMU"
    );
}

fn marked_pids(session: &str) -> Vec<u32> {
    let marker = format!("zl-{session},process=zl-{session}");
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.split(|b| *b == 0).any(|a| a == marker.as_bytes()))
        })
        .collect()
}

/// The tap stand-in (a pipe) arrives at its fixed number, and no variable
/// of the supervisor reaches QEMU.
#[tokio::test]
async fn child_gets_the_descriptor_and_a_clean_environment() {
    let Some(qemu) = qemu() else { return };
    const CANARY: &str = "canary-master-key-5e1f0c";
    // SAFETY: no other code in this test binary reads or writes this
    // variable; std's environment accessors (used by `Command` when it
    // builds a child's environment) take the environment lock.
    unsafe { std::env::set_var("ZEROLEASE_MASTER_KEY", CANARY) };
    let dir = private_dir();
    let (read_end, write_end): (OwnedFd, OwnedFd) = nix::unistd::pipe().unwrap();
    let our_pipe = std::fs::read_link(format!("/proc/self/fd/{}", write_end.as_raw_fd())).unwrap();
    const TARGET: i32 = 7;
    // A descriptor without FD_CLOEXEC, as a careless parent might leave one.
    let leaky = nix::unistd::dup(&write_end).unwrap();
    let leaky_fd = leaky.as_raw_fd();
    let flags = nix::fcntl::fcntl(&leaky, nix::fcntl::FcntlArg::F_GETFD).unwrap();
    assert_eq!(
        flags & nix::libc::FD_CLOEXEC,
        0,
        "the stand-in leaks on exec"
    );
    let args: Vec<OsString> = argv::build_argv(&spec("fdpass", dir.path())).unwrap();
    let mut vm = process::spawn_qemu(
        &qemu,
        args,
        &JailId::parse("fdpass").unwrap(),
        dir.path(),
        vec![(read_end, TARGET)],
    )
    .unwrap();
    vm.connect_qmp(QMP_BOUND).await.unwrap();
    let pid = vm.pid();

    let theirs = std::fs::read_link(format!("/proc/{pid}/fd/{TARGET}")).unwrap();
    assert_eq!(theirs, our_pipe, "fd {TARGET} in QEMU is our pipe");

    let open: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    let pipes_in_qemu = open
        .iter()
        .filter(|fd| {
            std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).is_ok_and(|l| l == our_pipe)
        })
        .count();
    assert_eq!(
        pipes_in_qemu, 1,
        "only fd {TARGET} is our pipe in QEMU (leaky fd {leaky_fd} must not be inherited)"
    );
    drop(leaky);

    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    assert!(
        !environ
            .windows(CANARY.len())
            .any(|w| w == CANARY.as_bytes()),
        "the canary reached QEMU's environment"
    );
    assert_eq!(
        environ, b"LC_ALL=C\0",
        "QEMU's environment is exactly LC_ALL=C"
    );

    vm.destroy(Duration::from_secs(5)).await.unwrap();
    drop(write_end);
}

/// A pid whose command line lacks the session's marker is never killed.
#[tokio::test]
async fn for_existing_refuses_a_stranger() {
    let mut stranger = std::process::Command::new("sleep")
        .arg("60")
        .spawn()
        .unwrap();
    // Past the `execve` window in which the command line reads empty.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !std::fs::read(format!("/proc/{}/cmdline", stranger.id()))
        .is_ok_and(|c| c.starts_with(b"sleep"))
    {
        assert!(Instant::now() < deadline, "sleep did not start");
        std::thread::sleep(Duration::from_millis(5));
    }
    let record = VmRecord {
        session: JailId::parse("stranger").unwrap(),
        pid: stranger.id(),
        runtime_dir: "/nonexistent".into(),
    };
    let err = Vm::for_existing(record).unwrap_err();
    assert!(matches!(err, VmError::NotOurs { .. }), "{err}");
    std::thread::sleep(Duration::from_millis(50));
    assert!(
        stranger.try_wait().unwrap().is_none(),
        "the stranger was killed"
    );
    stranger.kill().unwrap();
    stranger.wait().unwrap();

    // A pid that is gone gives a handle whose kill does nothing.
    let gone = VmRecord {
        session: JailId::parse("gone").unwrap(),
        pid: stranger.id(),
        runtime_dir: "/nonexistent".into(),
    };
    let mut vm = Vm::for_existing(gone).unwrap();
    vm.kill().await.unwrap();
}

/// A record of a live QEMU rebuilds a handle that kills it; the marker of
/// another session does not match.
#[tokio::test]
async fn for_existing_kills_its_own_qemu() {
    let Some(qemu) = qemu() else { return };
    let dir = private_dir();
    let mut owned = started(&qemu, "adopted", dir.path()).await;
    let record = owned.record();

    let mut wrong = record.clone();
    wrong.session = JailId::parse("other").unwrap();
    assert!(matches!(
        Vm::for_existing(wrong),
        Err(VmError::NotOurs { .. })
    ));

    let mut adopted = Vm::for_existing(record).unwrap();
    adopted.kill().await.unwrap();
    adopted.kill().await.unwrap();
    // The zombie is ours to collect.
    assert_eq!(
        owned.destroy(Duration::from_secs(1)).await.unwrap(),
        Stopped::AlreadyGone
    );
    assert!(!alive(owned.pid()));
}

/// `reap_leftovers` kills a marked QEMU under its root whose session is not
/// live, and leaves the live one and one under another root alone.
#[tokio::test]
async fn reap_leftovers_kills_only_orphans_under_its_root() {
    let Some(qemu) = qemu() else { return };
    let root = private_dir();
    let other_root = private_dir();
    let mk = |parent: &Path, name: &str| {
        let dir = parent.join(name);
        std::fs::create_dir(&dir).unwrap();
        make_private(&dir);
        dir
    };
    // Started without a `Vm`, as a crashed supervisor would leave it.
    let raw = |dir: &Path, session: &str| {
        std::process::Command::new(&qemu)
            .args(argv::build_argv(&spec(session, dir)).unwrap())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut orphan = raw(&mk(root.path(), "orphan1"), "orphan1");
    let mut elsewhere = raw(&mk(other_root.path(), "orphan2"), "orphan2");
    let live_dir = mk(root.path(), "live1");
    let mut live = started(&qemu, "live1", &live_dir).await;
    // Let the raw ones get going (their argv is in place from exec on).
    tokio::time::sleep(Duration::from_millis(200)).await;

    let reaped = reap_leftovers(root.path(), &[JailId::parse("live1").unwrap()])
        .await
        .unwrap();
    assert_eq!(reaped.len(), 1, "{reaped:?}");
    assert_eq!(reaped[0].session.as_str(), "orphan1");
    assert_eq!(reaped[0].pid, orphan.id());
    let status = orphan.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(9));

    assert!(alive(elsewhere.id()), "a QEMU of another root was reaped");
    assert!(
        live.qmp().unwrap().query_status().await.is_ok(),
        "the live VM was reaped"
    );

    elsewhere.kill().unwrap();
    elsewhere.wait().unwrap();
    live.destroy(Duration::from_secs(5)).await.unwrap();
}

/// The overlay is a qcow2 file backed by the base, and goes away on
/// destroy (idempotent) or drop.
#[tokio::test]
async fn overlay_over_a_read_only_base() {
    let Some(_) = qemu() else { return };
    let qemu_img = match process::find_qemu_img() {
        Ok(path) => path,
        Err(err) => {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("CI=true and {err}");
            }
            eprintln!("SKIPPED: {err}");
            return;
        }
    };
    let dir = private_dir();
    let base = dir.path().join("base.qcow2");
    let out = std::process::Command::new(&qemu_img)
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&base)
        .arg("16M")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let path = dir.path().join("overlay.qcow2");

    let mut overlay = Overlay::create(&base, &path).await.unwrap();
    let info = std::process::Command::new(&qemu_img)
        .args(["info", "--output=json"])
        .arg(&path)
        .output()
        .unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["format"], "qcow2");
    assert_eq!(info["backing-filename"], base.to_str().unwrap());
    overlay.destroy().unwrap();
    assert!(!path.exists());
    overlay.destroy().unwrap();

    // Drop removes too, and a leftover at the path is replaced.
    std::fs::write(&path, b"leftover").unwrap();
    let overlay = Overlay::create(&base, &path).await.unwrap();
    assert!(path.exists());
    drop(overlay);
    assert!(!path.exists());

    let err = Overlay::create(&dir.path().join("missing"), &path)
        .await
        .unwrap_err();
    assert!(matches!(err, OverlayError::NoBase(_)), "{err}");
}

mod tap {
    //! A real tap, made in a network namespace of this test's own, handed
    //! to QEMU as a descriptor.
    use std::fs::OpenOptions;
    use std::os::fd::OwnedFd;
    use std::os::unix::fs::OpenOptionsExt;

    use nix::libc;

    nix::ioctl_write_ptr_bad!(
        tunsetiff,
        nix::request_code_write!(b'T', 202, size_of::<libc::c_int>()),
        libc::ifreq
    );

    /// Opens a fresh (non-persistent) tap `name` in a new network namespace
    /// that lives as long as the descriptor. Runs on its own thread, since
    /// namespace membership is per thread.
    pub fn in_private_netns(name: &'static str) -> OwnedFd {
        std::thread::spawn(move || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare netns");
            let tun = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_CLOEXEC)
                .open("/dev/net/tun")
                .expect("open /dev/net/tun");
            // SAFETY: `ifreq` is plain C data; all-zero bytes are valid.
            let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
            for (dst, src) in request.ifr_name.iter_mut().zip(name.bytes()) {
                *dst = src as libc::c_char;
            }
            request.ifr_ifru.ifru_flags =
                (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
            // SAFETY: TUNSETIFF reads an `ifreq` from a valid pointer to one
            // that lives across the call, on a descriptor we own.
            unsafe { tunsetiff(std::os::fd::AsRawFd::as_raw_fd(&tun), &request) }
                .expect("TUNSETIFF");
            OwnedFd::from(tun)
        })
        .join()
        .expect("the tap thread")
    }
}

/// QEMU takes a real tap as `-netdev tap,fd=N` without any privilege of its
/// own: if the descriptor were wrong QEMU would refuse to start.
#[tokio::test]
async fn qemu_accepts_the_tap_descriptor() {
    let Some(qemu) = qemu() else { return };
    if !root_and_tun() {
        return;
    }
    let tap = tap::in_private_netns("zl-taptest");
    let dir = private_dir();
    let mut spec = spec("taptest", dir.path());
    spec.net = Some(NetSpec {
        fd: 3,
        mac: Mac::for_session(&spec.session),
        guest_ip: Ipv4Addr::new(10, 77, 0, 2),
        host_ip: Ipv4Addr::new(10, 77, 0, 1),
    });
    let mut vm = Vm::spawn(&qemu, &spec, Some(tap)).unwrap();
    let connected = vm.connect_qmp(QMP_BOUND).await.map(|_| ());
    let log = std::fs::read_to_string(vm.qemu_log()).unwrap_or_default();
    connected.unwrap_or_else(|e| panic!("QEMU did not come up with the tap: {e}; log: {log}"));
    let status = vm.qmp().unwrap().query_status().await.unwrap();
    assert!(status.running);
    let fd3 = std::fs::read_link(format!("/proc/{}/fd/3", vm.pid())).unwrap();
    assert_eq!(fd3, Path::new("/dev/net/tun"));
    // A spec with a network refuses to start without its tap.
    assert!(matches!(
        Vm::spawn(&qemu, &spec, None),
        Err(zerolease::vm::SpawnError::TapMismatch)
    ));
    vm.destroy(Duration::from_secs(5)).await.unwrap();
}

/// `auto` on this host: KVM first when /dev/kvm opens (QEMU dies or the
/// firmware stays silent there), then TCG, which also stays silent; the
/// error names TCG and the console log, and no QEMU is left.
#[tokio::test]
async fn auto_falls_back_to_tcg_and_reports_it() {
    let Some(qemu) = qemu() else { return };
    let dir = private_dir();
    let t = Instant::now();
    let err = zerolease::vm::boot(
        qemu,
        spec("autoboot", dir.path()),
        None,
        zerolease::vm::Accel::Auto,
        Duration::from_secs(2),
    )
    .await
    .unwrap_err();
    eprintln!(
        "TIMING auto boot (kvm usable: {}) to failure: {:?}",
        zerolease::vm::watchdog::kvm_usable(),
        t.elapsed()
    );
    assert!(
        err.to_string()
            .starts_with("the guest did not say hello within 2s under TCG"),
        "{err}"
    );
    assert!(marked_pids("autoboot").is_empty(), "an attempt left a QEMU");
}

/// QEMU's sockets live in a directory only this user can enter.
#[tokio::test]
async fn a_shared_runtime_dir_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let Some(qemu) = qemu() else { return };
    let dir = private_dir();
    for mode in [0o755, 0o710, 0o701, 0o777] {
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(mode)).unwrap();
        let err = Vm::spawn(&qemu, &spec("shared", dir.path()), None).unwrap_err();
        assert!(
            matches!(err, zerolease::vm::SpawnError::RuntimeDirNotPrivate { .. }),
            "{mode:o}: {err}"
        );
    }
    let file = dir.path().join("file");
    std::fs::write(&file, b"").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o700)).unwrap();
    assert!(Vm::spawn(&qemu, &spec("notadir", &file), None).is_err());
    assert!(marked_pids("shared").is_empty());
}

/// A real guest says hello: by default the project's own `minimal` image
/// (`scripts/build-image minimal`; the Debian cloud kernel and the guest
/// agent as PID 1, which configures its NIC from the kernel command line and
/// then greets the host), or any kernel and initramfs given by
/// `ZEROLEASE_TEST_KERNEL` and `ZEROLEASE_TEST_INITRD`. Under CI a missing
/// image fails the test.
#[tokio::test]
async fn a_real_guest_says_hello() {
    let Some(qemu) = qemu() else { return };
    let (kernel, initrd, own_image) = match (
        std::env::var_os("ZEROLEASE_TEST_KERNEL"),
        std::env::var_os("ZEROLEASE_TEST_INITRD"),
    ) {
        (Some(k), Some(i)) => (PathBuf::from(k), PathBuf::from(i), false),
        _ => match zerolease::image::verify_named("minimal", None) {
            Ok(image) => (image.kernel, image.initramfs, true),
            Err(e) => {
                if std::env::var("CI").is_ok_and(|v| v == "true") {
                    panic!("CI=true and the minimal image is not usable: {e}");
                }
                eprintln!("SKIPPED: {e}");
                return;
            }
        },
    };
    if !root_and_tun() {
        return;
    }
    let dir = private_dir();
    let mut spec = spec("hello", dir.path());
    spec.memory_mib = 256;
    spec.boot = Some(argv::DirectBoot {
        kernel,
        initrd: Some(initrd),
    });
    // The guest agent needs its link: a tap in a private namespace.
    spec.net = Some(NetSpec {
        fd: 3,
        mac: Mac::for_session(&spec.session),
        guest_ip: Ipv4Addr::new(10, 77, 0, 2),
        host_ip: Ipv4Addr::new(10, 77, 0, 1),
    });
    let tap = tap::in_private_netns("zl-hello");
    let t = Instant::now();
    let booted = zerolease::vm::boot(
        qemu,
        spec,
        Some(tap),
        zerolease::vm::Accel::Auto,
        Duration::from_secs(60),
    )
    .await
    .unwrap_or_else(|e| {
        let console = std::fs::read_to_string(dir.path().join("console.log")).unwrap_or_default();
        panic!("{e}: {e:?}\n--- console ---\n{console}")
    });
    // On nested hosts like the development machines KVM is tried first and
    // fails; the hello then comes under TCG.
    eprintln!(
        "TIMING QEMU start to guest hello (auto; kvm usable: {}; won: {}): {:?}",
        zerolease::vm::watchdog::kvm_usable(),
        booted.accel,
        t.elapsed()
    );
    if own_image {
        assert_eq!(booted.hello.agent_version, env!("CARGO_PKG_VERSION"));
    }
    let mut vm = booted.vm;
    let t = Instant::now();
    let how = vm.destroy(Duration::from_secs(5)).await.unwrap();
    eprintln!(
        "TIMING destroy of a booted guest: {:?} ({how:?})",
        t.elapsed()
    );
}
