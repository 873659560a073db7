//! QEMU's command line, built from plain data by a pure function.
//!
//! **Architecture Invariant:** *no secret on the command line.* A process's
//! argv is readable by every local user (`/proc/<pid>/cmdline`, `ps`), so
//! nothing secret may ever be put there. [`VmSpec`] deliberately has no field
//! that could carry a credential: only a validated session id, paths, sizes,
//! addresses and a MAC. Secrets reach the guest only over the control
//! channel, after the handshake. A test builds an argv and checks that none
//! of a set of canary strings placed in the test process's environment
//! appears in it.
//!
//! Other properties:
//! - Every path QEMU parses inside an option list (`path=…`, `file=…`) is
//!   checked to be UTF-8 without `,` or control characters, so a crafted path
//!   cannot inject an option.
//! - The tap is passed as an already-open file descriptor (`fd=N`), so QEMU
//!   needs no privilege to use it; the process layer puts it at number N.
//! - `-name zl-<id>,process=zl-<id>` marks the process; the reaper finds
//!   leftovers by that marker ([`marker`]).

use std::ffi::OsString;
use std::fmt;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use crate::jail::JailId;

/// The virtio-serial port name of the control channel, as the guest sees it
/// under `/sys/class/virtio-ports/*/name`.
pub const CONTROL_PORT: &str = "org.zerolease.control";
/// The virtio-blk serial of an image's read-only root disk; the guest finds
/// the disk by it (`/sys/block/*/serial`) whatever its `vdX` name.
pub const ROOT_DISK_SERIAL: &str = "zl-root";
/// The virtio-serial port name of the raw TTY stream.
pub const TTY_PORT: &str = "org.zerolease.tty";

/// File names inside a session's runtime directory.
pub const CONTROL_SOCKET: &str = "control.sock";
pub const TTY_SOCKET: &str = "tty.sock";
pub const QMP_SOCKET: &str = "qmp.sock";
pub const CONSOLE_LOG: &str = "console.log";
/// QEMU's own stdout/stderr (written by the process layer, not by QEMU).
pub const QEMU_LOG: &str = "qemu.log";

/// Prefix of the `-name` marker of every QEMU zerolease starts.
pub const MARKER_PREFIX: &str = "zl-";

/// The marker `zl-<id>` used both as QEMU's `-name` and its process name.
/// At most 15 bytes, so it survives the kernel's `comm` truncation.
pub fn marker(session: &JailId) -> String {
    format!("{MARKER_PREFIX}{session}")
}

/// The kind of machine QEMU emulates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Machine {
    /// PC with PCIe; the Debian cloud kernel finds virtio-pci devices on it
    /// with its stock modules. The default.
    Q35,
    /// Minimal machine without PCI; needs a kernel with virtio-mmio.
    Microvm,
}

/// The CPU model under TCG (see [`AccelKind::cpu`]). The session benchmark
/// boots its bare baseline with the same model.
pub const TCG_CPU: &str = "max,-erms,-fsrm";

/// The firmware for a direct kernel boot: QEMU's own minimal `qboot`
/// (shipped with QEMU, as the default of its microvm machine) instead of
/// SeaBIOS. It sets up what Linux needs and jumps to the kernel; SeaBIOS's
/// full POST and option ROMs cost a TCG boot about 170 ms more (medians of
/// 8 alternating boots with the session's devices: 4,157 against 4,327 ms).
/// The session benchmark boots its bare baseline with the same firmware.
pub const DIRECT_BOOT_FIRMWARE: &str = "qboot.rom";

/// The accelerator for one boot attempt (the `auto` choice is made by the
/// watchdog, see `watchdog::accel_attempts`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccelKind {
    Kvm,
    Tcg,
}

impl AccelKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Kvm => "kvm",
            Self::Tcg => "tcg",
        }
    }

    /// The CPU model that fits the accelerator: the host's CPU under KVM,
    /// everything TCG can emulate otherwise, except two hints. ERMS and FSRM
    /// tell software that `rep movsb` is the fastest copy; under TCG it is
    /// the slowest, a helper call per byte, and the guest kernel then spends
    /// about 0.7 s more of each boot copying (3.8 s to init instead of 3.1 s,
    /// measured in one script). Without the hints the kernel and glibc pick
    /// their unrolled copies; `rep movsb` still works for any program that
    /// uses it.
    pub fn cpu(self) -> &'static str {
        match self {
            Self::Kvm => "host",
            Self::Tcg => TCG_CPU,
        }
    }
}

impl fmt::Display for AccelKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A MAC address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// A locally administered unicast address derived from the session id,
    /// stable for a session (the QEMU OUI `52:54:00` plus three bytes).
    pub fn for_session(session: &JailId) -> Mac {
        // FNV-1a: stable, tiny, and not security relevant.
        let mut hash: u32 = 0x811c_9dc5;
        for byte in session.as_str().bytes() {
            hash ^= u32::from(byte);
            hash = hash.wrapping_mul(0x0100_0193);
        }
        let [_, a, b, c] = hash.to_be_bytes();
        Mac([0x52, 0x54, 0x00, a, b, c])
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

/// The guest's network: a tap passed as an open descriptor, and the /30 the
/// guest agent configures from the kernel command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetSpec {
    /// The descriptor number the tap has *in QEMU* (the process layer moves
    /// it there).
    pub fd: i32,
    pub mac: Mac,
    /// The guest's address in the session's /30.
    pub guest_ip: Ipv4Addr,
    /// The host side of the /30 (gateway; where the proxy listens).
    pub host_ip: Ipv4Addr,
}

/// Direct kernel boot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirectBoot {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
}

/// Everything the command line depends on. Plain data, and by design without
/// any field that could hold a secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmSpec {
    pub session: JailId,
    pub machine: Machine,
    pub accel: AccelKind,
    /// 1 to [`MAX_VCPUS`].
    pub vcpus: u16,
    /// [`MIN_MEMORY_MIB`] to [`MAX_MEMORY_MIB`].
    pub memory_mib: u32,
    /// Sessions always boot a kernel; `None` starts firmware only (tests and
    /// the bare-QEMU benchmark baseline).
    pub boot: Option<DirectBoot>,
    /// A qcow2 disk (the session's overlay), attached as virtio-blk.
    pub disk: Option<PathBuf>,
    /// Raw disks (the workspace's in and out disks), attached as virtio-blk
    /// with a serial the guest finds them by in `/sys/block/*/serial`.
    pub raw_disks: Vec<RawDisk>,
    /// The image's root file system (raw ext4), attached read-only as
    /// virtio-blk with serial [`ROOT_DISK_SERIAL`]; the kernel command line
    /// then tells the guest agent to switch to it.
    pub root_disk: Option<PathBuf>,
    /// Sessions always have a network; `None` gives the guest no NIC.
    pub net: Option<NetSpec>,
    /// The session's private runtime directory: sockets and logs go here.
    pub runtime_dir: PathBuf,
    /// Where the guest's serial console is written; `None` puts it in the
    /// runtime directory as [`CONSOLE_LOG`]. Sessions keep it next to their
    /// output log so that it outlives the VM (a boot failure points to it).
    pub console_log: Option<PathBuf>,
}

/// A raw image file attached as a virtio-blk disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawDisk {
    pub path: PathBuf,
    /// 1 to 20 bytes of `[A-Za-z0-9_-]` (virtio-blk's serial limit).
    pub serial: String,
    pub read_only: bool,
}

pub const MAX_VCPUS: u16 = 64;
pub const MIN_MEMORY_MIB: u32 = 64;
pub const MAX_MEMORY_MIB: u32 = 1 << 20;

/// Why a spec cannot be turned into a command line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArgvError {
    #[error("a VM needs 1 to {MAX_VCPUS} vCPUs, not {0}")]
    Vcpus(u16),
    #[error("a VM needs {MIN_MEMORY_MIB} to {MAX_MEMORY_MIB} MiB of memory, not {0}")]
    Memory(u32),
    #[error(
        "the path `{0}` cannot be given to QEMU: it must be absolute UTF-8 without `,` \
         or control characters"
    )]
    BadPath(PathBuf),
    #[error("the tap descriptor number {0} is reserved; use 3 or above")]
    BadFd(i32),
    #[error("the microvm machine has no PCI bus; use q35 for virtio-pci devices")]
    MicrovmNeedsMmio,
    #[error("the disk serial `{0}` must be 1 to 20 characters of [A-Za-z0-9_-]")]
    BadSerial(String),
}

/// What every session's kernel command line starts with. `panic=-1` makes a
/// guest panic end QEMU (the session sees it as a crash). The kernel's crypto
/// self-tests (`cryptomgr.notests=1`) are skipped: they check its own
/// algorithm implementations against known answers, nothing in a session
/// relies on the guest kernel's crypto, and under TCG they took about 0.6 s
/// of every boot (bare boot to init 3.1-3.5 s with them, 2.5-2.7 s without,
/// 5 alternating runs each).
pub const KERNEL_ARGS: &str = "console=ttyS0 quiet panic=-1 cryptomgr.notests=1";

/// The kernel command line for a session.
pub fn kernel_cmdline(net: Option<&NetSpec>, root_disk: bool) -> String {
    let mut line = String::from(KERNEL_ARGS);
    if let Some(net) = net {
        line.push_str(&format!(" zl.ip={}/30 zl.gw={}", net.guest_ip, net.host_ip));
    }
    line.push_str(&format!(" zl.port={CONTROL_PORT}"));
    if root_disk {
        line.push_str(&format!(" zl.root={ROOT_DISK_SERIAL}"));
    }
    line
}

/// Builds QEMU's argument list (without the program name).
pub fn build_argv(spec: &VmSpec) -> Result<Vec<OsString>, ArgvError> {
    if !(1..=MAX_VCPUS).contains(&spec.vcpus) {
        return Err(ArgvError::Vcpus(spec.vcpus));
    }
    if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&spec.memory_mib) {
        return Err(ArgvError::Memory(spec.memory_mib));
    }
    // Every device below is virtio-pci.
    if spec.machine == Machine::Microvm {
        return Err(ArgvError::MicrovmNeedsMmio);
    }
    let dir = option_path(&spec.runtime_dir)?;
    let name = marker(&spec.session);

    let mut argv: Vec<String> = Vec::with_capacity(48);
    let mut push = |args: &[&str]| argv.extend(args.iter().map(|a| (*a).to_owned()));

    push(&["-nodefaults", "-no-user-config"]);
    push(&["-name", &format!("{name},process={name}")]);
    push(&["-machine", "q35"]);
    push(&["-accel", spec.accel.as_str()]);
    push(&["-cpu", spec.accel.cpu()]);
    push(&["-smp", &spec.vcpus.to_string()]);
    push(&["-m", &format!("{}M", spec.memory_mib)]);

    if let Some(boot) = &spec.boot {
        push(&["-bios", DIRECT_BOOT_FIRMWARE]);
        // `-kernel` and friends are plain values, not option lists, but the
        // same check keeps odd paths out of the argv altogether.
        push(&["-kernel", option_path(&boot.kernel)?]);
        if let Some(initrd) = &boot.initrd {
            push(&["-initrd", option_path(initrd)?]);
        }
        push(&[
            "-append",
            &kernel_cmdline(spec.net.as_ref(), spec.root_disk.is_some()),
        ]);
    }

    if let Some(root) = &spec.root_disk {
        // Read-only for QEMU as well as for the guest: the image is shared
        // by every session and must never change.
        let root = option_path(root)?;
        push(&[
            "-drive",
            &format!("file={root},format=raw,if=none,id=root,readonly=on"),
        ]);
        push(&[
            "-device",
            &format!("virtio-blk-pci,drive=root,serial={ROOT_DISK_SERIAL}"),
        ]);
    }

    if let Some(disk) = &spec.disk {
        let disk = option_path(disk)?;
        push(&[
            "-drive",
            &format!("file={disk},format=qcow2,if=none,id=d0,discard=unmap"),
        ]);
        push(&["-device", "virtio-blk-pci,drive=d0"]);
    }

    for (i, raw) in spec.raw_disks.iter().enumerate() {
        let path = option_path(&raw.path)?;
        let serial = &raw.serial;
        if serial.is_empty()
            || serial.len() > 20
            || !serial
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(ArgvError::BadSerial(serial.clone()));
        }
        let ro = if raw.read_only { "on" } else { "off" };
        push(&[
            "-drive",
            &format!("file={path},format=raw,if=none,id=r{i},readonly={ro}"),
        ]);
        push(&[
            "-device",
            &format!("virtio-blk-pci,drive=r{i},serial={serial}"),
        ]);
    }

    if let Some(net) = &spec.net {
        if net.fd < 3 {
            return Err(ArgvError::BadFd(net.fd));
        }
        push(&["-netdev", &format!("tap,id=n0,fd={},vhost=off", net.fd)]);
        push(&[
            "-device",
            &format!("virtio-net-pci,netdev=n0,mac={}", net.mac),
        ]);
    }

    push(&["-device", "virtio-serial-pci,id=vser0"]);
    push(&[
        "-chardev",
        &format!("socket,id=ctl,path={dir}/{CONTROL_SOCKET},server=on,wait=off"),
    ]);
    push(&[
        "-device",
        &format!("virtserialport,bus=vser0.0,chardev=ctl,name={CONTROL_PORT}"),
    ]);
    push(&[
        "-chardev",
        &format!("socket,id=tty,path={dir}/{TTY_SOCKET},server=on,wait=off"),
    ]);
    push(&[
        "-device",
        &format!("virtserialport,bus=vser0.0,chardev=tty,name={TTY_PORT}"),
    ]);
    push(&[
        "-qmp",
        &format!("unix:{dir}/{QMP_SOCKET},server=on,wait=off"),
    ]);
    let console = match &spec.console_log {
        Some(path) => option_path(path)?.to_owned(),
        None => format!("{dir}/{CONSOLE_LOG}"),
    };
    push(&["-chardev", &format!("file,id=con,path={console}")]);
    push(&["-serial", "chardev:con"]);
    push(&["-display", "none", "-no-reboot"]);
    push(&[
        "-sandbox",
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
    ]);
    Ok(argv.into_iter().map(OsString::from).collect())
}

/// A path as QEMU will read it inside an option list.
fn option_path(path: &Path) -> Result<&str, ArgvError> {
    let bad = || ArgvError::BadPath(path.to_owned());
    let text = path.to_str().ok_or_else(bad)?;
    if !path.is_absolute() || text.contains(',') || text.chars().any(char::is_control) {
        return Err(bad());
    }
    let trimmed = text.trim_end_matches('/');
    Ok(if trimmed.is_empty() { "/" } else { trimmed })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The session benchmark's bare boot is only a baseline if its CPU
    /// model, firmware and kernel arguments are the ones sessions get.
    #[test]
    fn the_session_benchmark_boots_its_baseline_like_a_session() {
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../scripts/lib/bench-session.sh"
        );
        let text = std::fs::read_to_string(script).unwrap();
        let cpus: Vec<&str> = text
            .split_whitespace()
            // The command may open a substitution: `$(qemu-system-x86_64`.
            .skip_while(|w| !w.ends_with("qemu-system-x86_64"))
            .collect::<Vec<_>>()
            .windows(2)
            .filter(|w| w[0] == "-cpu")
            .map(|w| w[1])
            .collect();
        assert_eq!(cpus, [TCG_CPU], "{script}");
        assert!(
            text.contains(&format!("-bios {DIRECT_BOOT_FIRMWARE} ")),
            "{script} boots its baseline without -bios {DIRECT_BOOT_FIRMWARE}"
        );
        // The kernel command line sessions start with, then init.
        assert!(
            text.contains(&format!(r#"-append "{KERNEL_ARGS} rdinit="#)),
            "{script} boots its baseline without the sessions' kernel arguments"
        );
        // As many vCPUs as the sessions it is compared with.
        assert!(text.contains(r#"-smp "$bench_session_cpus""#), "{script}");
        assert_eq!(
            text.matches("cpus: $bench_session_cpus }").count(),
            2,
            "{script}: both benchmark manifests take the same vCPUs"
        );
    }

    fn spec() -> VmSpec {
        let session = JailId::parse("abc123").unwrap();
        VmSpec {
            session,
            machine: Machine::Q35,
            accel: AccelKind::Tcg,
            vcpus: 2,
            memory_mib: 512,
            boot: Some(DirectBoot {
                kernel: "/img/vmlinux".into(),
                initrd: Some("/img/initrd.img".into()),
            }),
            disk: None,
            raw_disks: Vec::new(),
            root_disk: None,
            net: Some(NetSpec {
                fd: 3,
                mac: Mac([0x52, 0x54, 0, 1, 2, 3]),
                guest_ip: Ipv4Addr::new(10, 77, 0, 2),
                host_ip: Ipv4Addr::new(10, 77, 0, 1),
            }),
            runtime_dir: "/run/zl/abc123".into(),
            console_log: None,
        }
    }

    fn strings(argv: &[OsString]) -> Vec<&str> {
        argv.iter().map(|a| a.to_str().unwrap()).collect()
    }

    #[test]
    fn whole_argv_for_a_session() {
        let argv = build_argv(&spec()).unwrap();
        let expected = [
            "-nodefaults",
            "-no-user-config",
            "-name",
            "zl-abc123,process=zl-abc123",
            "-machine",
            "q35",
            "-accel",
            "tcg",
            "-cpu",
            "max,-erms,-fsrm",
            "-smp",
            "2",
            "-m",
            "512M",
            "-bios",
            "qboot.rom",
            "-kernel",
            "/img/vmlinux",
            "-initrd",
            "/img/initrd.img",
            "-append",
            "console=ttyS0 quiet panic=-1 cryptomgr.notests=1 zl.ip=10.77.0.2/30 zl.gw=10.77.0.1 \
             zl.port=org.zerolease.control",
            "-netdev",
            "tap,id=n0,fd=3,vhost=off",
            "-device",
            "virtio-net-pci,netdev=n0,mac=52:54:00:01:02:03",
            "-device",
            "virtio-serial-pci,id=vser0",
            "-chardev",
            "socket,id=ctl,path=/run/zl/abc123/control.sock,server=on,wait=off",
            "-device",
            "virtserialport,bus=vser0.0,chardev=ctl,name=org.zerolease.control",
            "-chardev",
            "socket,id=tty,path=/run/zl/abc123/tty.sock,server=on,wait=off",
            "-device",
            "virtserialport,bus=vser0.0,chardev=tty,name=org.zerolease.tty",
            "-qmp",
            "unix:/run/zl/abc123/qmp.sock,server=on,wait=off",
            "-chardev",
            "file,id=con,path=/run/zl/abc123/console.log",
            "-serial",
            "chardev:con",
            "-display",
            "none",
            "-no-reboot",
            "-sandbox",
            "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
        ];
        assert_eq!(strings(&argv), expected);
    }

    #[test]
    fn raw_disks_carry_serials_and_read_only() {
        let mut s = spec();
        s.raw_disks = vec![
            RawDisk {
                path: "/run/zl/abc123/workspace.tar".into(),
                serial: "zl-ws-in".into(),
                read_only: true,
            },
            RawDisk {
                path: "/run/zl/abc123/workspace-out.img".into(),
                serial: "zl-ws-out".into(),
                read_only: false,
            },
        ];
        let argv = build_argv(&s).unwrap();
        let argv = strings(&argv);
        let text = argv.join(" ");
        assert!(
            text.contains(
                "-drive file=/run/zl/abc123/workspace.tar,format=raw,if=none,id=r0,readonly=on \
             -device virtio-blk-pci,drive=r0,serial=zl-ws-in"
            ),
            "{text}"
        );
        assert!(text.contains(
            "-drive file=/run/zl/abc123/workspace-out.img,format=raw,if=none,id=r1,readonly=off \
             -device virtio-blk-pci,drive=r1,serial=zl-ws-out"
        ), "{text}");
        // Serials and paths cannot inject options.
        for bad in ["", "a,b", "x=1", "a b", "123456789012345678901", "é"] {
            let mut s = spec();
            s.raw_disks = vec![RawDisk {
                path: "/d".into(),
                serial: bad.into(),
                read_only: true,
            }];
            assert_eq!(
                build_argv(&s),
                Err(ArgvError::BadSerial(bad.into())),
                "{bad:?}"
            );
        }
        let mut s = spec();
        s.raw_disks = vec![RawDisk {
            path: "/d,readonly=off".into(),
            serial: "zl-ws-in".into(),
            read_only: true,
        }];
        assert!(matches!(build_argv(&s), Err(ArgvError::BadPath(_))));
    }

    /// Returns the value following `flag` (first occurrence).
    fn value_of<'a>(argv: &'a [&'a str], flag: &str) -> Option<&'a str> {
        argv.iter()
            .position(|a| *a == flag)
            .and_then(|i| argv.get(i + 1).copied())
    }

    #[test]
    fn variations_table() {
        type Case = (
            &'static str,
            fn(&mut VmSpec),
            &'static str,
            Option<&'static str>,
        );
        let cases: &[Case] = &[
            (
                "kvm accel",
                |s| s.accel = AccelKind::Kvm,
                "-accel",
                Some("kvm"),
            ),
            (
                "kvm cpu",
                |s| s.accel = AccelKind::Kvm,
                "-cpu",
                Some("host"),
            ),
            (
                "tcg cpu",
                |s| s.accel = AccelKind::Tcg,
                "-cpu",
                Some("max,-erms,-fsrm"),
            ),
            ("one vcpu", |s| s.vcpus = 1, "-smp", Some("1")),
            ("max vcpus", |s| s.vcpus = MAX_VCPUS, "-smp", Some("64")),
            ("memory", |s| s.memory_mib = 2048, "-m", Some("2048M")),
            ("no kernel", |s| s.boot = None, "-kernel", None),
            (
                "no kernel, default firmware",
                |s| s.boot = None,
                "-bios",
                None,
            ),
            ("no kernel no append", |s| s.boot = None, "-append", None),
            (
                "no initrd",
                |s| s.boot.as_mut().unwrap().initrd = None,
                "-initrd",
                None,
            ),
            ("no net", |s| s.net = None, "-netdev", None),
            (
                "no net, cmdline without address",
                |s| s.net = None,
                "-append",
                Some(
                    "console=ttyS0 quiet panic=-1 cryptomgr.notests=1 zl.port=org.zerolease.control",
                ),
            ),
            (
                "fd number",
                |s| s.net.as_mut().unwrap().fd = 42,
                "-netdev",
                Some("tap,id=n0,fd=42,vhost=off"),
            ),
            (
                "disk",
                |s| s.disk = Some("/run/zl/abc123/overlay.qcow2".into()),
                "-drive",
                Some("file=/run/zl/abc123/overlay.qcow2,format=qcow2,if=none,id=d0,discard=unmap"),
            ),
            (
                "root disk, read-only raw",
                |s| s.root_disk = Some("/img/devbox/root.ext4".into()),
                "-drive",
                Some("file=/img/devbox/root.ext4,format=raw,if=none,id=root,readonly=on"),
            ),
            (
                "root disk found by serial",
                |s| s.root_disk = Some("/img/devbox/root.ext4".into()),
                "-device",
                Some("virtio-blk-pci,drive=root,serial=zl-root"),
            ),
            (
                "root disk named on the kernel command line",
                |s| s.root_disk = Some("/img/devbox/root.ext4".into()),
                "-append",
                Some(
                    "console=ttyS0 quiet panic=-1 cryptomgr.notests=1 zl.ip=10.77.0.2/30 zl.gw=10.77.0.1 \
                     zl.port=org.zerolease.control zl.root=zl-root",
                ),
            ),
            (
                "trailing slash on the runtime dir",
                |s| s.runtime_dir = "/run/zl/x/".into(),
                "-qmp",
                Some("unix:/run/zl/x/qmp.sock,server=on,wait=off"),
            ),
        ];
        for (what, change, flag, want) in cases {
            let mut s = spec();
            change(&mut s);
            let argv = build_argv(&s).unwrap_or_else(|e| panic!("{what}: {e}"));
            let argv = strings(&argv);
            assert_eq!(value_of(&argv, flag), *want, "{what}");
        }
    }

    #[test]
    fn invalid_specs_table() {
        type Case = (&'static str, fn(&mut VmSpec), ArgvError);
        let cases: &[Case] = &[
            ("zero vcpus", |s| s.vcpus = 0, ArgvError::Vcpus(0)),
            ("too many vcpus", |s| s.vcpus = 65, ArgvError::Vcpus(65)),
            ("tiny memory", |s| s.memory_mib = 1, ArgvError::Memory(1)),
            (
                "huge memory",
                |s| s.memory_mib = u32::MAX,
                ArgvError::Memory(u32::MAX),
            ),
            (
                "comma injects an option",
                |s| s.runtime_dir = "/tmp/x,server=off".into(),
                ArgvError::BadPath("/tmp/x,server=off".into()),
            ),
            (
                "relative runtime dir",
                |s| s.runtime_dir = "run/zl".into(),
                ArgvError::BadPath("run/zl".into()),
            ),
            (
                "newline in kernel path",
                |s| s.boot.as_mut().unwrap().kernel = "/img/vm\nlinuz".into(),
                ArgvError::BadPath("/img/vm\nlinuz".into()),
            ),
            (
                "comma in disk path",
                |s| s.disk = Some("/d,file=/etc/shadow".into()),
                ArgvError::BadPath("/d,file=/etc/shadow".into()),
            ),
            (
                "comma in root disk path",
                |s| s.root_disk = Some("/img/a,snapshot=off".into()),
                ArgvError::BadPath("/img/a,snapshot=off".into()),
            ),
            (
                "relative root disk path",
                |s| s.root_disk = Some("images/out/devbox/root.ext4".into()),
                ArgvError::BadPath("images/out/devbox/root.ext4".into()),
            ),
            (
                "stdin as tap",
                |s| s.net.as_mut().unwrap().fd = 0,
                ArgvError::BadFd(0),
            ),
            (
                "negative fd",
                |s| s.net.as_mut().unwrap().fd = -1,
                ArgvError::BadFd(-1),
            ),
            (
                "microvm",
                |s| s.machine = Machine::Microvm,
                ArgvError::MicrovmNeedsMmio,
            ),
        ];
        for (what, change, want) in cases {
            let mut s = spec();
            change(&mut s);
            assert_eq!(build_argv(&s).unwrap_err(), *want, "{what}");
        }
    }

    #[test]
    fn non_utf8_path_is_refused() {
        use std::os::unix::ffi::OsStrExt;
        let mut s = spec();
        s.runtime_dir = PathBuf::from(std::ffi::OsStr::from_bytes(b"/run/\xff"));
        assert!(matches!(build_argv(&s), Err(ArgvError::BadPath(_))));
    }

    #[test]
    fn marker_fits_the_process_name() {
        let longest = JailId::parse("abcdefghijkl").unwrap();
        assert_eq!(marker(&longest), "zl-abcdefghijkl");
        // The kernel keeps 15 bytes of a process name.
        assert!(marker(&longest).len() <= 15);
    }

    #[test]
    fn mac_is_stable_local_and_unicast() {
        let a = JailId::parse("abc123").unwrap();
        let b = JailId::parse("abc124").unwrap();
        assert_eq!(Mac::for_session(&a), Mac::for_session(&a));
        assert_ne!(Mac::for_session(&a), Mac::for_session(&b));
        let mac = Mac::for_session(&a);
        assert_eq!(mac.0[0] & 1, 0, "unicast");
        assert!(mac.to_string().starts_with("52:54:00:"));
    }

    /// No secret on the command line: canaries placed in this process's
    /// environment (where a careless implementation might pick them up) never
    /// appear in any element of the argv.
    #[test]
    fn argv_contains_no_environment_canary() {
        let canaries = [
            ("ZEROLEASE_MASTER_KEY", "canary-master-key-7f3a9c"),
            ("GITHUB_TOKEN", "canary-ghp-0123456789abcdef"),
            ("ZL_TEST_SECRET", "canary-s3cr3t-d41d8cd9"),
        ];
        for (name, value) in canaries {
            // SAFETY: `set_var` is unsound only when another thread reads or
            // writes the environment concurrently. These names are used by
            // no other test, and std's own accessors take the env lock; the
            // risk is limited to C code reading the environment, which the
            // argv tests do not run.
            unsafe { std::env::set_var(name, value) };
        }
        let mut specs = vec![spec()];
        let mut bare = spec();
        bare.boot = None;
        bare.net = None;
        specs.push(bare);
        let mut kvm = spec();
        kvm.accel = AccelKind::Kvm;
        kvm.disk = Some("/run/zl/abc123/overlay.qcow2".into());
        specs.push(kvm);
        for s in &specs {
            for arg in build_argv(s).unwrap() {
                let arg = arg.to_string_lossy();
                for (name, value) in canaries {
                    assert!(!arg.contains(value), "{name}'s value leaked into `{arg}`");
                }
            }
        }
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// Whatever the paths, an accepted spec yields an argv in which
            /// every option list has exactly the keys we wrote: a path never
            /// adds a `,key=value` of its own, and nothing has a newline.
            #[test]
            fn paths_never_inject_options(
                dir in "/[a-z,=\n\t ./-]{0,24}",
                kernel in "/[a-z,=\n./-]{0,16}",
                vcpus in 0u16..100,
                memory in 0u32..5000,
            ) {
                let mut s = spec();
                s.runtime_dir = dir.clone().into();
                s.boot.as_mut().unwrap().kernel = kernel.clone().into();
                s.vcpus = vcpus;
                s.memory_mib = memory;
                match build_argv(&s) {
                    Ok(argv) => {
                        prop_assert!(!dir.contains(',') && !kernel.contains(','));
                        let argv = strings(&argv);
                        for pair in argv.windows(2) {
                            if matches!(pair[0], "-chardev" | "-qmp") {
                                // socket,id,path,server,wait / file,id,path /
                                // unix:path,server,wait
                                let commas = pair[1].matches(',').count();
                                prop_assert!(commas <= 4, "{}", pair[1]);
                            }
                        }
                        prop_assert!(argv.iter().all(|a| !a.contains('\n')));
                        prop_assert_eq!(value_of(&argv, "-name"), Some("zl-abc123,process=zl-abc123"));
                        prop_assert_eq!(argv.iter().filter(|a| **a == "-name").count(), 1);
                    }
                    // Refused only for a reason the spec really has.
                    Err(err) => prop_assert!(
                        matches!(err, ArgvError::BadPath(_)) && (dir.contains(',')
                            || kernel.contains(',')
                            || dir.contains(char::is_control)
                            || kernel.contains(char::is_control))
                            || matches!(err, ArgvError::Vcpus(_)) && !(1..=MAX_VCPUS).contains(&vcpus)
                            || matches!(err, ArgvError::Memory(_))
                                && !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&memory),
                        "{err:?}"
                    ),
                }
            }
        }
    }
}
