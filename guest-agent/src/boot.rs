//! PID 1 boot: mounts, kernel modules, then the control channel, with the
//! network coming up on its own thread meanwhile.
//!
//! Every step takes its paths from a root directory (or sysfs/proc root)
//! so tests can run the file-level parts against a temp dir; `mount`,
//! `finit_module` and the interface ioctls themselves only run as PID 1 in
//! the guest ([`pid1_main`]).
//!
//! **Invariants:**
//! - PID 1 never returns or exits: whatever happens, it ends in
//!   [`power_off`] (after `sync`), which loops if the kernel refuses.
//! - The network is IPv4 only, configured exactly from the kernel command
//!   line: one address on the first non-loopback interface and a default
//!   route via the host. IPv6 is disabled when the kernel has it.
//! - The module list can name only files below the kernel's module
//!   directory (no absolute paths, no `..`).
//! - The agent's command never starts before the network is configured:
//!   [`agent`] waits for the [`Pending`] network before it spawns it, and a
//!   network that failed stops the command.

use crate::{error_chain as chain, log};
use std::fs::File;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::kmod::{ModuleInitFlags, finit_module};
use nix::libc;
use nix::mount::{MsFlags, mount};
use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};

use crate::agent::{self, AgentConfig, Outcome};
use crate::cmdline::{self, GuestConfig};
use crate::pending::Pending;
use crate::provision::Layout;
use crate::rootdisk;
use crate::run::Reaping;
use crate::virtio;

/// The module load list, relative to the root.
pub const MODULE_LIST: &str = "lib/modules/zerolease.load";

/// Modules only the network needs that do not sit on the virtio transport:
/// the network's own thread loads them while the transport loads.
const NETWORK_MODULES: [&str; 2] = ["failover", "net_failover"];

/// The NIC's driver: its devices sit on the transport, so the network's
/// thread loads it once the transport is in (loaded earlier, its probe would
/// run inside the transport's, on the other thread).
const NIC_MODULE: &str = "virtio_net";

/// The module only a virtio disk needs: a workspace's or a root disk's.
const DISK_MODULE: &str = "virtio_blk";

/// The module list split by who loads each part, and when.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ModulePlan {
    /// The virtio transport: everything listed before `virtio_console`,
    /// loaded first, as every other driver's devices sit on it.
    pub transport: Vec<PathBuf>,
    /// What the NIC's driver needs besides the transport
    /// ([`NETWORK_MODULES`]).
    pub network: Vec<PathBuf>,
    /// The NIC's driver ([`NIC_MODULE`]).
    pub nic: Vec<PathBuf>,
    /// `virtio_blk`, loaded only once a disk is needed.
    pub disk: Vec<PathBuf>,
    /// The rest (`virtio_console`, the control port's driver, first).
    pub rest: Vec<PathBuf>,
}

impl ModulePlan {
    /// Splits `files`, kept in their listed order within each part.
    pub fn new(files: &[PathBuf]) -> ModulePlan {
        let transport = files
            .iter()
            .position(|file| is_module(file, "virtio_console"))
            .unwrap_or(0);
        let mut plan = ModulePlan {
            transport: files[..transport].to_vec(),
            ..ModulePlan::default()
        };
        for file in &files[transport..] {
            let part = if NETWORK_MODULES.iter().any(|name| is_module(file, name)) {
                &mut plan.network
            } else if is_module(file, NIC_MODULE) {
                &mut plan.nic
            } else if is_module(file, DISK_MODULE) {
                &mut plan.disk
            } else {
                &mut plan.rest
            };
            part.push(file.clone());
        }
        plan
    }
}

/// How long to wait for the control port to appear after loading modules.
const PORT_WAIT: Duration = Duration::from_secs(10);

/// How often to look for the control port at first.
const PORT_POLL: Duration = Duration::from_millis(2);

/// For how long to look that often, before the pause doubles.
const PORT_POLL_FAST: Duration = Duration::from_millis(200);

/// Why a boot step failed.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// A mount failed.
    #[error("cannot mount {fstype} on {target}")]
    Mount {
        /// The file system type.
        fstype: &'static str,
        /// The mount point.
        target: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The module list is unreadable or names an unsafe path.
    #[error("module list {path}: {reason}")]
    ModuleList {
        /// The list.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A module failed to load.
    #[error("cannot load kernel module {path}")]
    Module {
        /// The module file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Network configuration failed.
    #[error("cannot {action} on interface {interface}")]
    Net {
        /// What was being done.
        action: &'static str,
        /// The interface.
        interface: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The kernel command line names a root disk that never appeared.
    #[error(
        "no disk with serial `{serial}` under {path} (is virtio_blk loaded? did QEMU get the root disk?)"
    )]
    NoRootDisk {
        /// The serial from `zl.root`.
        serial: String,
        /// The sysfs directory searched.
        path: PathBuf,
    },
    /// No network interface but `lo`.
    #[error("no network interface besides lo under {path} (is virtio_net loaded?)")]
    NoInterface {
        /// The sysfs directory.
        path: PathBuf,
    },
    /// A file under /proc or /sys could not be read or written.
    #[error("cannot access {path}")]
    File {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The virtio transport failed to load, so the NIC cannot appear.
    #[error("the virtio transport did not load")]
    NoTransport,
    /// The control port is missing.
    #[error("cannot find the control port")]
    Startup(#[from] crate::StartupError),
}

/// Mounts /proc, /sys, /dev (devtmpfs), /dev/pts, /run and /tmp under
/// `root`. A file system that is already mounted there is left alone.
pub fn mount_early(root: &Path) -> Result<(), BootError> {
    let common = MsFlags::MS_NOSUID;
    let table: [(&'static str, &str, MsFlags, &str); 6] = [
        (
            "proc",
            "proc",
            common | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            "",
        ),
        (
            "sysfs",
            "sys",
            common | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            "",
        ),
        ("devtmpfs", "dev", common, "mode=0755"),
        (
            "devpts",
            "dev/pts",
            common | MsFlags::MS_NOEXEC,
            "mode=0620,ptmxmode=0666",
        ),
        ("tmpfs", "run", common | MsFlags::MS_NODEV, "mode=0755"),
        ("tmpfs", "tmp", common | MsFlags::MS_NODEV, "mode=1777"),
    ];
    for (fstype, dir, flags, data) in table {
        let target = root.join(dir);
        let fail = |source| BootError::Mount {
            fstype,
            target: target.clone(),
            source,
        };
        std::fs::create_dir_all(&target).map_err(fail)?;
        match mount(Some(fstype), &target, Some(fstype), flags, Some(data)) {
            Ok(()) | Err(Errno::EBUSY) => {}
            Err(errno) => return Err(fail(errno.into())),
        }
    }
    Ok(())
}

/// Parses the module load list: one path per line, relative to the
/// kernel's module directory; blank lines and `#` comments are skipped.
pub fn parse_module_list(text: &str) -> Result<Vec<String>, String> {
    let mut modules = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if line.starts_with('/')
            || line
                .split('/')
                .any(|part| part.is_empty() || part == "." || part == "..")
        {
            return Err(format!(
                "line {}: {line:?} must be a relative path without `.`, `..` or empty components",
                number + 1
            ));
        }
        modules.push(line.to_owned());
    }
    Ok(modules)
}

/// The module files to load, in order, for kernel `release` under `root`.
/// A missing list means no modules (a kernel with everything built in).
pub fn module_files(root: &Path, release: &str) -> Result<Vec<PathBuf>, BootError> {
    let path = root.join(MODULE_LIST);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => {
            return Err(BootError::ModuleList {
                path,
                reason: err.to_string(),
            });
        }
    };
    let dir = root.join("lib/modules").join(release);
    let modules =
        parse_module_list(&text).map_err(|reason| BootError::ModuleList { path, reason })?;
    Ok(modules.into_iter().map(|m| dir.join(m)).collect())
}

/// Whether a module file is compressed (the kernel decompresses it when
/// told so).
pub fn is_compressed_module(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("xz" | "zst" | "gz")
    )
}

/// Loads each module with `finit_module`; one already loaded is fine.
pub fn load_modules(files: &[PathBuf]) -> Result<usize, BootError> {
    /// `MODULE_INIT_COMPRESSED_FILE` from `<linux/module.h>`.
    const COMPRESSED: libc::c_uint = 4;
    let mut loaded = 0;
    for path in files {
        let fail = |source| BootError::Module {
            path: path.clone(),
            source,
        };
        let file = File::open(path).map_err(fail)?;
        let flags = if is_compressed_module(path) {
            ModuleInitFlags::from_bits_retain(COMPRESSED)
        } else {
            ModuleInitFlags::empty()
        };
        match finit_module(&file, c"", flags) {
            Ok(()) => loaded += 1,
            Err(Errno::EEXIST) => {}
            Err(errno) => return Err(fail(errno.into())),
        }
    }
    Ok(loaded)
}

/// Whether `file` is the module named `name` (`name.ko`, compressed or
/// not).
fn is_module(file: &Path, name: &str) -> bool {
    file.file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix(name))
        .is_some_and(|rest| rest == ".ko" || rest.starts_with(".ko."))
}

/// The first interface other than `lo` under `<sysfs_root>/class/net`, by
/// name.
pub fn first_nic(sysfs_root: &Path) -> Result<String, BootError> {
    let dir = sysfs_root.join("class/net");
    let entries = std::fs::read_dir(&dir).map_err(|source| BootError::File {
        path: dir.clone(),
        source,
    })?;
    let mut names: Vec<String> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
        .filter(|name| name != "lo")
        .collect();
    names.sort();
    names
        .into_iter()
        .next()
        .ok_or(BootError::NoInterface { path: dir })
}

/// Turns IPv6 off everywhere when the kernel has it.
pub fn disable_ipv6(proc_root: &Path) -> Result<bool, BootError> {
    let mut done = false;
    for scope in ["all", "default"] {
        let path = proc_root.join(format!("sys/net/ipv6/conf/{scope}/disable_ipv6"));
        if !path.exists() {
            continue;
        }
        std::fs::write(&path, "1").map_err(|source| BootError::File { path, source })?;
        done = true;
    }
    Ok(done)
}

/// The IPv4 netmask for a prefix length.
pub fn netmask(prefix_len: u8) -> Ipv4Addr {
    Ipv4Addr::from(
        u32::MAX
            .checked_shl(32 - u32::from(prefix_len))
            .unwrap_or(0),
    )
}

/// The kernel's `struct rtentry` (`<linux/route.h>`); libc has it only for
/// musl.
#[repr(C)]
struct RtEntry {
    rt_pad1: libc::c_ulong,
    rt_dst: libc::sockaddr,
    rt_gateway: libc::sockaddr,
    rt_genmask: libc::sockaddr,
    rt_flags: libc::c_ushort,
    rt_pad2: libc::c_short,
    rt_pad3: libc::c_ulong,
    rt_pad4: *mut libc::c_void,
    rt_metric: libc::c_short,
    rt_dev: *mut libc::c_char,
    rt_mtu: libc::c_ulong,
    rt_window: libc::c_ulong,
    rt_irtt: libc::c_ushort,
}

fn sockaddr_in(addr: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(addr).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size (16 bytes) and
    // any bit pattern is a valid sockaddr.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn ifreq(name: &str) -> io::Result<libc::ifreq> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    Ok(req)
}

fn inet_socket() -> io::Result<OwnedFd> {
    Ok(socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?)
}

/// SIOCSIFADDR: sets the interface's IPv4 address.
fn set_address(sock: &OwnedFd, name: &str, addr: Ipv4Addr) -> io::Result<()> {
    let mut req = ifreq(name)?;
    req.ifr_ifru.ifru_addr = sockaddr_in(addr);
    // SAFETY: SIOCSIFADDR reads a valid, initialised ifreq that outlives
    // the call.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFADDR as _, &req) };
    Errno::result(rc).map(drop).map_err(io::Error::from)
}

/// SIOCSIFNETMASK: sets the interface's netmask.
fn set_netmask(sock: &OwnedFd, name: &str, mask: Ipv4Addr) -> io::Result<()> {
    let mut req = ifreq(name)?;
    req.ifr_ifru.ifru_netmask = sockaddr_in(mask);
    // SAFETY: SIOCSIFNETMASK reads a valid, initialised ifreq that outlives
    // the call.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFNETMASK as _, &req) };
    Errno::result(rc).map(drop).map_err(io::Error::from)
}

/// SIOCGIFFLAGS + SIOCSIFFLAGS: sets IFF_UP.
fn set_up(sock: &OwnedFd, name: &str) -> io::Result<()> {
    let mut req = ifreq(name)?;
    // SAFETY: SIOCGIFFLAGS writes the flags into the ifreq we own.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS as _, &mut req) };
    Errno::result(rc).map_err(io::Error::from)?;
    // SAFETY: SIOCGIFFLAGS just initialised the flags member of the union.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    req.ifr_ifru.ifru_flags = flags | (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    // SAFETY: SIOCSIFFLAGS reads the valid ifreq we own.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS as _, &req) };
    Errno::result(rc).map(drop).map_err(io::Error::from)
}

/// SIOCADDRT: adds the default route via `gateway`.
fn add_default_route(sock: &OwnedFd, gateway: Ipv4Addr) -> io::Result<()> {
    let route = RtEntry {
        rt_pad1: 0,
        rt_dst: sockaddr_in(Ipv4Addr::UNSPECIFIED),
        rt_gateway: sockaddr_in(gateway),
        rt_genmask: sockaddr_in(Ipv4Addr::UNSPECIFIED),
        rt_flags: libc::RTF_UP | libc::RTF_GATEWAY,
        rt_pad2: 0,
        rt_pad3: 0,
        rt_pad4: std::ptr::null_mut(),
        rt_metric: 0,
        rt_dev: std::ptr::null_mut(),
        rt_mtu: 0,
        rt_window: 0,
        rt_irtt: 0,
    };
    // SAFETY: SIOCADDRT reads a valid rtentry laid out as the kernel's
    // `struct rtentry`; rt_dev is null, so the kernel picks the device.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCADDRT as _, &route) };
    match Errno::result(rc) {
        Ok(_) | Err(Errno::EEXIST) => Ok(()),
        Err(errno) => Err(errno.into()),
    }
}

/// The error maker for a failed interface step.
fn net_step(action: &'static str, interface: &str) -> impl FnOnce(io::Error) -> BootError {
    let interface = interface.to_owned();
    move |source| BootError::Net {
        action,
        interface,
        source,
    }
}

/// Opens the socket the interface ioctls go through and brings up `lo`.
/// The kernel gives `lo` 127.0.0.1/8 as it comes up (and no ::1 once IPv6
/// is off): setting them first cost two ioctls, about 7 ms under emulation.
/// Needs no driver, so it runs before the NIC's is loaded.
fn loopback_up() -> Result<OwnedFd, BootError> {
    let sock = inet_socket().map_err(net_step("open a socket", "-"))?;
    set_up(&sock, "lo").map_err(net_step("bring up", "lo"))?;
    Ok(sock)
}

/// Brings up the first NIC with the command line's address and default
/// route, through `sock` from [`loopback_up`]. Returns the NIC's name.
fn configure_nic(
    sock: &OwnedFd,
    sysfs_root: &Path,
    config: &GuestConfig,
) -> Result<String, BootError> {
    let nic = first_nic(sysfs_root)?;
    set_address(sock, &nic, config.address).map_err(net_step("set the address", &nic))?;
    set_netmask(sock, &nic, netmask(config.prefix_len))
        .map_err(net_step("set the netmask", &nic))?;
    set_up(sock, &nic).map_err(net_step("bring up", &nic))?;
    add_default_route(sock, config.gateway).map_err(net_step("add the default route", &nic))?;
    Ok(nic)
}

/// Finds the control port (waiting for the driver to create it) and opens
/// it for reading and writing.
pub fn open_control_port(
    sysfs_root: &Path,
    dev_root: &Path,
    name: &str,
    wait: Duration,
) -> Result<File, BootError> {
    let start = Instant::now();
    let deadline = start + wait;
    // The driver adds ports from a work queue once QEMU announces them, so
    // a port appears 5 to 25 ms after the module loaded under emulation:
    // look every 2 ms for a while (a doubling pause overshot by up to
    // 16 ms), then less often.
    let mut pause = PORT_POLL;
    loop {
        let found = virtio::find_port(sysfs_root, name)
            .map_err(|err| BootError::Startup(crate::StartupError::Port(err)))
            .and_then(|port| {
                let path = port.dev_path(dev_root);
                std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&path)
                    .map_err(|source| BootError::File { path, source })
            });
        match found {
            Ok(file) => return Ok(file),
            Err(err) if Instant::now() >= deadline => return Err(err),
            Err(_) => {
                std::thread::sleep(pause);
                if start.elapsed() >= PORT_POLL_FAST {
                    pause = (pause * 2).min(Duration::from_millis(100));
                }
            }
        }
    }
}

/// What [`boot`] leaves for the agent.
struct Booted {
    port: File,
    /// The command git runs as its credential helper.
    helper_command: String,
    /// The network, still coming up on its own thread.
    network: Pending,
    /// The disk's driver, not loaded yet.
    disk_modules: Vec<PathBuf>,
}

/// Everything PID 1 does before serving the host.
fn boot(root: &Path) -> Result<Booted, BootError> {
    mount_early(root)?;
    log("started");
    let proc_root = root.join("proc");
    let sysfs_root = root.join("sys");
    let cmdline_path = proc_root.join("cmdline");
    let text = std::fs::read_to_string(&cmdline_path).map_err(|source| BootError::File {
        path: cmdline_path,
        source,
    })?;
    let config = cmdline::parse(&text).map_err(|err| BootError::Startup(err.into()))?;
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .map_err(|errno| BootError::File {
            path: PathBuf::from("uname"),
            source: errno.into(),
        })?;
    let files = module_files(root, &release)?;
    let mut plan = ModulePlan::new(&files);
    // The network comes up on its own thread while this one loads the
    // transport, finds the control port and talks to the host. It starts
    // first: what needs no transport (the failover modules, IPv6 off, `lo`
    // up) runs on the second vCPU while this one loads the transport; then
    // it loads the NIC's driver and configures the NIC. With a root disk it
    // starts only after the switch, which moves /sys and /proc and leaves
    // the module files behind: its modules, and the disk's, load here first.
    let (transport_loaded, transport_gate) = mpsc::sync_channel(1);
    let network = match config.root_disk {
        None => Some(start_network(
            NetworkModules {
                base: std::mem::take(&mut plan.network),
                nic: std::mem::take(&mut plan.nic),
            },
            Some(transport_gate),
            &proc_root,
            &sysfs_root,
            &config,
        )),
        Some(_) => None,
    };
    let mut loaded = load_modules(&plan.transport)?;
    // No receiver (a root disk): nothing waits for it.
    let _ = transport_loaded.send(());
    let disk_modules = match config.root_disk {
        None => plan.disk,
        Some(_) => {
            loaded += load_modules(&plan.network)?;
            loaded += load_modules(&plan.nic)?;
            loaded += load_modules(&plan.disk)?;
            Vec::new()
        }
    };
    loaded += load_modules(&plan.rest)?;
    log(&format!("loaded {loaded} kernel modules for {release}"));
    // Where this binary is, before /proc moves: /init in the initramfs.
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/init"));
    let helper_command = if let Some(serial) = &config.root_disk {
        let disk = rootdisk::wait_for_disk(&sysfs_root, serial, PORT_WAIT)?;
        rootdisk::switch_to(root, &disk, &exe)?;
        log(&format!(
            "root: /dev/{disk} (read-only) under a tmpfs overlay"
        ));
        format!("/{} credential", rootdisk::GUEST_BINARY)
    } else {
        format!("{} credential", exe.display())
    };
    let network = network.unwrap_or_else(|| {
        start_network(
            NetworkModules::default(),
            None,
            &proc_root,
            &sysfs_root,
            &config,
        )
    });
    let port = open_control_port(
        &sysfs_root,
        &root.join("dev"),
        &config.control_port,
        PORT_WAIT,
    )?;
    log("control port open");
    Ok(Booted {
        port,
        helper_command,
        network,
        disk_modules,
    })
}

/// The modules the network's thread loads.
#[derive(Debug, Default)]
struct NetworkModules {
    /// Loaded at once: they need no transport.
    base: Vec<PathBuf>,
    /// Loaded once the transport is in.
    nic: Vec<PathBuf>,
}

/// Brings the network up on a thread of its own: `modules.base`, IPv6 off
/// (before the NIC exists, so it inherits the default), `lo` up, then, once
/// `transport` says the transport is loaded (at once if `None`),
/// `modules.nic` and the NIC's address and route. Its console line says
/// when it is done; a failure is the reason the agent's command cannot
/// start.
fn start_network(
    modules: NetworkModules,
    transport: Option<Receiver<()>>,
    proc_root: &Path,
    sysfs_root: &Path,
    config: &GuestConfig,
) -> Pending {
    let (proc_root, sysfs_root, config) =
        (proc_root.to_owned(), sysfs_root.to_owned(), config.clone());
    Pending::spawn("network", move || {
        let up = || -> Result<String, BootError> {
            load_modules(&modules.base)?;
            disable_ipv6(&proc_root)?;
            let sock = loopback_up()?;
            if let Some(gate) = transport {
                // The sender is dropped without sending when the transport
                // failed to load; boot fails then and nobody waits for this.
                gate.recv().map_err(|_| BootError::NoTransport)?;
            }
            load_modules(&modules.nic)?;
            configure_nic(&sock, &sysfs_root, &config)
        };
        match up() {
            Ok(nic) => {
                log(&format!(
                    "{nic}: {}/{} via {}",
                    config.address, config.prefix_len, config.gateway
                ));
                Ok(())
            }
            Err(err) => {
                let why = chain(&err);
                log(&format!("network failed: {why}"));
                Err(why)
            }
        }
    })
}

/// PID 1's whole life: boot, serve the host, power off. Never returns.
pub fn pid1_main() -> ! {
    let root = Path::new("/");
    match boot(root) {
        Ok(Booted {
            port,
            helper_command,
            network,
            disk_modules,
        }) => {
            let config = AgentConfig {
                layout: Layout::new(root),
                proc_root: root.join("proc"),
                helper_command,
                credential_timeout: Duration::from_secs(30),
                reaping: Reaping::All,
                tty_port: crate::tty::lookup_under(root),
                network,
                disk_modules,
            };
            let outcome = port
                .try_clone()
                .map_err(|err| log(&format!("cannot duplicate the control port: {err}")))
                .ok()
                .map(|reader| agent::serve(reader, port, &config));
            match outcome {
                Some(Ok(Outcome::Shutdown)) => log("shutdown requested"),
                Some(Ok(Outcome::HostGone)) => log("the host is gone"),
                Some(Ok(Outcome::RevokeFailed)) => log("revocation failed: powering off"),
                Some(Err(err)) => log(&chain(&err)),
                None => {}
            }
        }
        Err(err) => log(&format!("boot failed: {}", chain(&err))),
    }
    power_off()
}

/// Syncs and powers off; if the kernel refuses, waits forever (PID 1 must
/// not exit).
pub fn power_off() -> ! {
    nix::unistd::sync();
    let err = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    log(&format!("power off failed: {err:?}"));
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_lists() {
        assert_eq!(
            parse_module_list(
                "# virtio first\nkernel/drivers/virtio/virtio.ko\n\n  kernel/drivers/net/virtio_net.ko.xz  \n"
            ),
            Ok(vec![
                "kernel/drivers/virtio/virtio.ko".to_owned(),
                "kernel/drivers/net/virtio_net.ko.xz".to_owned()
            ])
        );
        for bad in ["/lib/x.ko", "../x.ko", "a/../../x.ko", "a//b.ko", "./a.ko"] {
            assert!(parse_module_list(bad).is_err(), "{bad:?}");
        }
    }

    fn under_kernel(names: &[&str]) -> Vec<PathBuf> {
        names
            .iter()
            .map(|name| Path::new("/lib/modules/6.1.0-1/kernel").join(name))
            .collect()
    }

    #[test]
    fn the_module_plan_splits_the_list_by_who_loads_it() {
        let files = under_kernel(&[
            "virtio/virtio.ko",
            "virtio/virtio_pci.ko.xz",
            "char/virtio_console.ko",
            "net/core/failover.ko",
            "net/virtio_net.ko.zst",
            "block/virtio_blk.ko",
            "fs/ext4.ko",
        ]);
        assert_eq!(
            ModulePlan::new(&files),
            ModulePlan {
                transport: under_kernel(&["virtio/virtio.ko", "virtio/virtio_pci.ko.xz"]),
                network: under_kernel(&["net/core/failover.ko"]),
                nic: under_kernel(&["net/virtio_net.ko.zst"]),
                disk: under_kernel(&["block/virtio_blk.ko"]),
                rest: under_kernel(&["char/virtio_console.ko", "fs/ext4.ko"]),
            }
        );
        // Without virtio_console there is no transport to put first.
        let plain = under_kernel(&["block/virtio_blk.ko", "fs/ext4.ko"]);
        assert_eq!(
            ModulePlan::new(&plain),
            ModulePlan {
                disk: under_kernel(&["block/virtio_blk.ko"]),
                rest: under_kernel(&["fs/ext4.ko"]),
                ..ModulePlan::default()
            }
        );
    }

    #[test]
    fn modules_are_known_by_name_compressed_or_not() {
        assert!(is_module(Path::new("/m/virtio_blk.ko"), "virtio_blk"));
        assert!(is_module(Path::new("/m/virtio_blk.ko.zst"), "virtio_blk"));
        assert!(!is_module(Path::new("/m/virtio_blk_x.ko"), "virtio_blk"));
        assert!(!is_module(Path::new("/m/virtio_blkx.ko"), "virtio_blk"));
        assert!(!is_module(Path::new("/m/virtio_blk"), "virtio_blk"));
    }

    #[test]
    fn module_files_resolve_under_the_release() {
        let root = tempfile::tempdir().unwrap();
        assert!(module_files(root.path(), "6.1.0-1").unwrap().is_empty());
        std::fs::create_dir_all(root.path().join("lib/modules")).unwrap();
        std::fs::write(root.path().join(MODULE_LIST), "a.ko\nb/c.ko.zst\n").unwrap();
        let files = module_files(root.path(), "6.1.0-1").unwrap();
        assert_eq!(
            files,
            [
                root.path().join("lib/modules/6.1.0-1/a.ko"),
                root.path().join("lib/modules/6.1.0-1/b/c.ko.zst")
            ]
        );
        assert!(!is_compressed_module(&files[0]));
        assert!(is_compressed_module(&files[1]));
        // A missing module file is an error that names it.
        let err = load_modules(&files).unwrap_err();
        assert!(err.to_string().contains("a.ko"), "{err}");
        std::fs::write(root.path().join(MODULE_LIST), "../../etc/x.ko\n").unwrap();
        assert!(matches!(
            module_files(root.path(), "6.1.0-1"),
            Err(BootError::ModuleList { .. })
        ));
    }

    #[test]
    fn picks_the_first_nic() {
        let root = tempfile::tempdir().unwrap();
        let net = root.path().join("class/net");
        assert!(matches!(
            first_nic(root.path()),
            Err(BootError::File { .. })
        ));
        std::fs::create_dir_all(net.join("lo")).unwrap();
        assert!(matches!(
            first_nic(root.path()),
            Err(BootError::NoInterface { .. })
        ));
        for name in ["eth1", "eth0", "enp0s3"] {
            std::fs::create_dir_all(net.join(name)).unwrap();
        }
        assert_eq!(first_nic(root.path()).unwrap(), "enp0s3");
    }

    #[test]
    fn disables_ipv6_when_present() {
        let root = tempfile::tempdir().unwrap();
        assert!(!disable_ipv6(root.path()).unwrap());
        let all = root.path().join("sys/net/ipv6/conf/all");
        std::fs::create_dir_all(&all).unwrap();
        std::fs::write(all.join("disable_ipv6"), "0").unwrap();
        assert!(disable_ipv6(root.path()).unwrap());
        assert_eq!(
            std::fs::read_to_string(all.join("disable_ipv6")).unwrap(),
            "1"
        );
    }

    #[test]
    fn netmasks() {
        let cases = [
            (1, "128.0.0.0"),
            (8, "255.0.0.0"),
            (24, "255.255.255.0"),
            (30, "255.255.255.252"),
            (32, "255.255.255.255"),
        ];
        for (prefix, mask) in cases {
            assert_eq!(netmask(prefix).to_string(), mask, "{prefix}");
        }
    }

    #[test]
    fn rtentry_matches_the_kernel_layout() {
        // x86_64 `struct rtentry` is 120 bytes.
        assert_eq!(std::mem::size_of::<RtEntry>(), 120);
        assert_eq!(std::mem::size_of::<libc::sockaddr>(), 16);
    }

    #[test]
    fn ifreq_names() {
        assert!(ifreq("eth0").is_ok());
        assert!(ifreq("").is_err());
        assert!(ifreq("a-name-way-too-long").is_err());
        assert!(ifreq("a\0b").is_err());
    }

    #[test]
    fn control_port_wait_gives_up_with_the_lookup_error() {
        let root = tempfile::tempdir().unwrap();
        let err = open_control_port(root.path(), root.path(), "ctl", Duration::ZERO).unwrap_err();
        assert!(matches!(err, BootError::Startup(_)), "{err:?}");
        let dir = root.path().join("class/virtio-ports/vport1p1");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("name"), "ctl\n").unwrap();
        std::fs::write(root.path().join("vport1p1"), "").unwrap();
        assert!(open_control_port(root.path(), root.path(), "ctl", Duration::ZERO).is_ok());
    }
}
