//! `zerolease doctor`: checks that this host can run sessions and says how
//! to fix each problem.
//!
//! Every check looks at the real thing rather than at a proxy for it: QEMU is
//! run (`--version`), `/dev/net/tun` is opened, `nft` lists tables, the
//! address pool is compared with the routes netlink reports, and KVM is
//! judged by booting the session kernel under it — a readable `/dev/kvm` is
//! not enough on nested hosts, where QEMU aborts or the guest hangs.
//!
//! The checks only read: nothing is created in the host's network namespace
//! and the probe VM has no network device.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::home::StateDir;
use crate::jail::pool::check_pool;
use crate::jail::{DEFAULT_POOL, Ipv4Net, Netlink, RouteInfo};
use crate::vm::argv::AccelKind;

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Works.
    Ok,
    /// Sessions run, but slower or with a caveat.
    Warn,
    /// Sessions cannot run until this is fixed.
    Fail,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
        }
    }
}

/// One check's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    /// Short, stable identifier (`qemu`, `kvm`, …).
    pub name: &'static str,
    pub status: Status,
    /// What was found.
    pub detail: String,
    /// What to do about it, when it is not `ok`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Check {
    fn ok(name: &'static str, detail: impl Into<String>) -> Check {
        Check {
            name,
            status: Status::Ok,
            detail: detail.into(),
            fix: None,
        }
    }

    fn problem(
        name: &'static str,
        status: Status,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Check {
        Check {
            name,
            status,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
}

/// Where to look.
#[derive(Debug, Clone)]
pub struct DoctorConfig {
    pub home: StateDir,
    /// Where images live (as for `zerolease run --images`).
    pub images: Option<PathBuf>,
    /// The image whose kernel the KVM probe boots.
    pub image: String,
    /// How long the KVM probe may take before KVM counts as not working.
    pub kvm_bound: Duration,
}

/// Runs every check, in the order a user would fix them.
pub fn run(config: &DoctorConfig) -> Vec<Check> {
    let qemu = crate::vm::process::find_qemu().ok();
    let image = crate::image::verify_named(&config.image, config.images.as_deref());
    let kernel = image.as_ref().ok().map(|i| i.kernel.clone());
    vec![
        privileges(&proc_status()),
        qemu_check(qemu.as_deref()),
        tun_check(Path::new("/dev/net/tun")),
        nft_check(),
        kvm_check(qemu.as_deref(), kernel.as_deref(), config.kvm_bound),
        pool_check(),
        match image {
            Ok(i) => Check::ok(
                "image",
                format!("`{}` verifies (digests and credential scan)", i.name),
            ),
            Err(e) => Check::problem(
                "image",
                Status::Fail,
                e.to_string(),
                format!("build it: scripts/build-image {}", config.image),
            ),
        },
        state_dir_check(config.home.root()),
        nofile_check(),
    ]
}

fn proc_status() -> String {
    std::fs::read_to_string("/proc/self/status").unwrap_or_default()
}

/// Bit 12 of the effective capability set is CAP_NET_ADMIN.
const CAP_NET_ADMIN: u32 = 12;

/// The effective capability mask from `/proc/self/status` text.
pub fn effective_caps(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
}

/// Taps and nftables tables need CAP_NET_ADMIN (root has it).
pub fn privileges(status: &str) -> Check {
    match effective_caps(status) {
        Some(caps) if caps & (1 << CAP_NET_ADMIN) != 0 => {
            Check::ok("privileges", "CAP_NET_ADMIN is effective")
        }
        Some(_) => Check::problem(
            "privileges",
            Status::Fail,
            "CAP_NET_ADMIN is not effective: zerolease cannot create taps or nftables tables",
            "run zerolease as root (sudo zerolease …)",
        ),
        None => Check::problem(
            "privileges",
            Status::Warn,
            "cannot read the capability set from /proc/self/status",
            "run zerolease as root (sudo zerolease …)",
        ),
    }
}

fn qemu_check(qemu: Option<&Path>) -> Check {
    const FIX: &str = "install QEMU: sudo apt-get install qemu-system-x86";
    let Some(qemu) = qemu else {
        return Check::problem(
            "qemu",
            Status::Fail,
            "qemu-system-x86_64 is not on PATH",
            FIX,
        );
    };
    match Command::new(qemu).arg("--version").output() {
        Ok(out) if out.status.success() => {
            let text = String::from_utf8_lossy(&out.stdout);
            let version = text.lines().next().unwrap_or("").trim();
            Check::ok("qemu", format!("{} ({version})", qemu.display()))
        }
        Ok(out) => Check::problem(
            "qemu",
            Status::Fail,
            format!(
                "{} --version failed: {}",
                qemu.display(),
                last_line(&out.stderr)
            ),
            FIX,
        ),
        Err(e) => Check::problem(
            "qemu",
            Status::Fail,
            format!("cannot run {}: {e}", qemu.display()),
            FIX,
        ),
    }
}

fn tun_check(path: &Path) -> Check {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
    {
        Ok(_) => Check::ok("tun", format!("{} opens read-write", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Check::problem(
            "tun",
            Status::Fail,
            format!("{} does not exist", path.display()),
            "load the tun module: sudo modprobe tun",
        ),
        Err(e) => Check::problem(
            "tun",
            Status::Fail,
            format!("cannot open {}: {e}", path.display()),
            "run zerolease as root (sudo zerolease …)",
        ),
    }
}

fn nft_check() -> Check {
    let found = crate::vm::process::find_on_path("nft").ok().or_else(|| {
        let sbin = PathBuf::from("/usr/sbin/nft");
        sbin.is_file().then_some(sbin)
    });
    match found {
        Some(nft) => nft_run(&nft),
        None => Check::problem(
            "nft",
            Status::Fail,
            "nft is not installed",
            "install nftables: sudo apt-get install nftables",
        ),
    }
}

fn nft_run(nft: &Path) -> Check {
    match Command::new(nft).args(["list", "tables"]).output() {
        Ok(out) if out.status.success() => {
            let ours = String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| l.contains(" zl_"))
                .count();
            Check::ok(
                "nft",
                format!(
                    "{} lists tables ({ours} zerolease table(s) present)",
                    nft.display()
                ),
            )
        }
        Ok(out) => Check::problem(
            "nft",
            Status::Fail,
            format!("nft list tables failed: {}", last_line(&out.stderr)),
            "run zerolease as root (sudo zerolease …); nf_tables must be available in the kernel",
        ),
        Err(e) => Check::problem(
            "nft",
            Status::Fail,
            format!("cannot run {}: {e}", nft.display()),
            "install nftables: sudo apt-get install nftables",
        ),
    }
}

/// What the serial log of the KVM probe says about the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeLog {
    /// The kernel ran to the point where it looked for its root file system.
    KernelRan,
    /// Nothing that shows the kernel ran.
    Silent,
}

/// The probe boots the kernel without an initramfs or root device, so a
/// kernel that runs ends in its "cannot mount root" panic.
pub fn classify_probe(serial: &str) -> ProbeLog {
    if serial.contains("Kernel panic") || serial.contains("Unable to mount root") {
        ProbeLog::KernelRan
    } else {
        ProbeLog::Silent
    }
}

fn kvm_check(qemu: Option<&Path>, kernel: Option<&Path>, bound: Duration) -> Check {
    const FALLBACK: &str = "sessions with `accel: auto` fall back to TCG (slower); set \
                            `accel: tcg` in the manifest to skip the KVM attempt";
    let dev = Path::new("/dev/kvm");
    if !dev.exists() {
        return Check::problem(
            "kvm",
            Status::Warn,
            "/dev/kvm does not exist: only TCG (software emulation) is available",
            format!(
                "enable virtualization in the firmware and load kvm_intel or kvm_amd; {FALLBACK}"
            ),
        );
    }
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open(dev) {
        return Check::problem(
            "kvm",
            Status::Warn,
            format!("cannot open /dev/kvm: {e}"),
            format!("run zerolease as root or add the user to the kvm group; {FALLBACK}"),
        );
    }
    let (Some(qemu), Some(kernel)) = (qemu, kernel) else {
        return Check::problem(
            "kvm",
            Status::Warn,
            "/dev/kvm opens, but whether KVM runs guests was not tested (no QEMU or no image kernel)",
            "fix the qemu and image checks, then run zerolease doctor again",
        );
    };
    match probe_boot(qemu, kernel, AccelKind::Kvm, bound) {
        Ok(took) => Check::ok(
            "kvm",
            format!(
                "KVM runs guests: the session kernel booted under KVM in {} ms",
                took.as_millis()
            ),
        ),
        Err(why) => Check::problem(
            "kvm",
            Status::Warn,
            format!("/dev/kvm opens, but KVM does not run guests here: {why}"),
            format!("this is common on nested virtualization; {FALLBACK}"),
        ),
    }
}

/// Boots `kernel` under `accel` with the CPU model sessions use, no devices
/// but a serial log, and no root: it returns once the kernel's panic about
/// the missing root shows on the serial log (how long that took), or says
/// why it did not within `bound`.
pub fn probe_boot(
    qemu: &Path,
    kernel: &Path,
    accel: AccelKind,
    bound: Duration,
) -> Result<Duration, String> {
    let dir =
        tempfile::tempdir().map_err(|e| format!("cannot create a temporary directory: {e}"))?;
    let serial = dir.path().join("serial.log");
    let mut child = Command::new(qemu)
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .args(["-machine", "q35", "-accel", accel.as_str()])
        .args(["-cpu", accel.cpu(), "-m", "128", "-no-reboot"])
        .arg("-kernel")
        .arg(kernel)
        // Only the panic is printed (KERN_EMERG; the panic then turns the
        // console up). Not `loglevel=0`: that keeps even the panic quiet.
        .args(["-append", "console=ttyS0 panic=-1 loglevel=1"])
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start QEMU: {e}"))?;
    let started = Instant::now();
    let outcome = loop {
        let log = std::fs::read_to_string(&serial).unwrap_or_default();
        if classify_probe(&log) == ProbeLog::KernelRan {
            break Ok(started.elapsed());
        }
        match child.try_wait() {
            Ok(Some(status)) => {
                let mut err = Vec::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = e.read_to_end(&mut err);
                }
                let log = std::fs::read_to_string(&serial).unwrap_or_default();
                if classify_probe(&log) == ProbeLog::KernelRan {
                    break Ok(started.elapsed());
                }
                break Err(format!("QEMU exited ({status}): {}", last_line(&err)));
            }
            Ok(None) if started.elapsed() > bound => {
                break Err(format!(
                    "the kernel printed nothing within {} s",
                    bound.as_secs()
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => break Err(format!("waiting for QEMU: {e}")),
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    outcome
}

fn pool_check() -> Check {
    let routes = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
        .and_then(|rt| {
            rt.block_on(async {
                let nl = Netlink::connect().map_err(|e| e.to_string())?;
                nl.ipv4_main_routes().await.map_err(|e| e.to_string())
            })
        });
    match routes {
        Ok(routes) => pool_verdict(DEFAULT_POOL, &routes),
        Err(e) => Check::problem(
            "address-pool",
            Status::Fail,
            format!("cannot read the routing table: {e}"),
            "run zerolease as root (sudo zerolease …)",
        ),
    }
}

/// Whether the session address pool is free of foreign routes, and how many
/// sessions' links are already in it.
pub fn pool_verdict(pool: &str, routes: &[RouteInfo]) -> Check {
    let net: Ipv4Net = match pool.parse() {
        Ok(n) => n,
        Err(e) => {
            return Check::problem(
                "address-pool",
                Status::Fail,
                format!("the pool {pool} does not parse: {e}"),
                "this is a bug; please report it",
            );
        }
    };
    match check_pool(net, routes) {
        Ok(()) => {
            let ours = routes
                .iter()
                .filter(|r| {
                    r.destination.prefix() > 0
                        && net.overlaps(r.destination)
                        && r.device
                            .as_deref()
                            .is_some_and(|d| d.starts_with(crate::jail::LINK_PREFIX))
                })
                .count();
            let capacity = 1u64 << (32 - u32::from(net.prefix()) - 2);
            Check::ok(
                "address-pool",
                format!(
                    "{pool} overlaps no other route; {ours} session link(s) in use, room for {capacity}"
                ),
            )
        }
        Err(e) => Check::problem(
            "address-pool",
            Status::Fail,
            e.to_string(),
            format!("remove or move the route that overlaps {pool}"),
        ),
    }
}

fn state_dir_check(root: &Path) -> Check {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::metadata(root) {
        Ok(m) if m.permissions().mode() & 0o077 != 0 => Check::problem(
            "state-dir",
            Status::Warn,
            format!(
                "{} is group/world accessible (mode {:o})",
                root.display(),
                m.permissions().mode() & 0o777
            ),
            format!(
                "chmod 700 {} (zerolease also tightens it when it opens the vault)",
                root.display()
            ),
        ),
        Ok(_) => Check::ok("state-dir", format!("{} (mode 0700)", root.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Check::ok(
            "state-dir",
            format!(
                "{} does not exist yet; the first command creates it (mode 0700)",
                root.display()
            ),
        ),
        Err(e) => Check::problem(
            "state-dir",
            Status::Fail,
            format!("cannot inspect {}: {e}", root.display()),
            "check the path given by --home or ZEROLEASE_HOME",
        ),
    }
}

/// Descriptors the proxy needs per idle tunnel (client and upstream socket,
/// and a splice pipe pair for the copy).
const FDS_PER_TUNNEL: u64 = 4;

fn nofile_check() -> Check {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    match open_files_limit(&limits) {
        Some((soft, hard)) => nofile_verdict(soft, hard),
        None => Check::problem(
            "open-files",
            Status::Warn,
            "cannot read the open-files limit from /proc/self/limits",
            "check `ulimit -n`",
        ),
    }
}

/// The soft and hard "Max open files" of `/proc/self/limits` text
/// (`unlimited` reads as `u64::MAX`).
pub fn open_files_limit(limits: &str) -> Option<(u64, u64)> {
    let rest = limits
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))?;
    let mut fields = rest.split_whitespace().map(|f| match f {
        "unlimited" => Some(u64::MAX),
        n => n.parse().ok(),
    });
    Some((fields.next()??, fields.next()??))
}

/// How many idle tunnels the descriptor limit allows a session's
/// supervisor (it runs with the soft limit it inherits).
pub fn nofile_verdict(soft: u64, hard: u64) -> Check {
    let tunnels = soft / FDS_PER_TUNNEL;
    let detail =
        format!("descriptor limit {soft} soft / {hard} hard: about {tunnels} open tunnels");
    if tunnels < 1024 {
        Check::problem(
            "open-files",
            Status::Warn,
            detail,
            format!(
                "raise it before starting zerolease: ulimit -n {} (LimitNOFILE= in a systemd unit)",
                hard.min(1_048_576)
            ),
        )
    } else {
        Check::ok("open-files", detail)
    }
}

fn last_line(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    text.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("no message")
        .trim()
        .chars()
        .take(200)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities() {
        let root = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        assert_eq!(privileges(root).status, Status::Ok);
        let user = "CapEff:\t0000000000000000\n";
        let c = privileges(user);
        assert_eq!(c.status, Status::Fail);
        assert!(c.fix.unwrap().contains("root"));
        // Only CAP_NET_ADMIN (bit 12) matters.
        assert_eq!(privileges("CapEff:\t0000000000001000\n").status, Status::Ok);
        assert_eq!(
            privileges("CapEff:\t0000000000000fff\n").status,
            Status::Fail
        );
        assert_eq!(privileges("garbage").status, Status::Warn);
        assert_eq!(privileges("CapEff:\tzz\n").status, Status::Warn);
    }

    #[test]
    fn probe_logs() {
        assert_eq!(
            classify_probe("[ 2.9] Kernel panic - not syncing: VFS: Unable to mount root fs"),
            ProbeLog::KernelRan
        );
        assert_eq!(classify_probe(""), ProbeLog::Silent);
        assert_eq!(classify_probe("SeaBIOS (version 1.16)\n"), ProbeLog::Silent);
    }

    fn route(dest: &str, dev: Option<&str>) -> RouteInfo {
        RouteInfo {
            destination: dest.parse().unwrap(),
            device: dev.map(str::to_owned),
        }
    }

    #[test]
    fn pools() {
        let free = pool_verdict(
            "10.213.0.0/16",
            &[
                route("0.0.0.0/0", Some("eth0")),
                route("192.168.1.0/24", Some("eth0")),
                route("10.213.0.0/30", Some("zl-abc")),
            ],
        );
        assert_eq!(free.status, Status::Ok);
        assert!(free.detail.contains("1 session link(s)"), "{}", free.detail);
        assert!(free.detail.contains("room for 16384"), "{}", free.detail);

        let taken = pool_verdict("10.213.0.0/16", &[route("10.0.0.0/8", Some("wg0"))]);
        assert_eq!(taken.status, Status::Fail);
        assert!(taken.detail.contains("10.0.0.0/8"), "{}", taken.detail);
        assert!(taken.fix.is_some());
    }

    #[test]
    fn descriptor_limits() {
        assert_eq!(nofile_verdict(20_000, 20_000).status, Status::Ok);
        let low = nofile_verdict(1024, 524_288);
        assert_eq!(low.status, Status::Warn);
        assert!(
            low.detail.contains("about 256 open tunnels"),
            "{}",
            low.detail
        );
        assert!(low.fix.unwrap().contains("ulimit -n 524288"));
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max processes             95000                95000                processes\n\
                      Max open files            1024                 unlimited            files\n";
        assert_eq!(open_files_limit(limits), Some((1024, u64::MAX)));
        assert_eq!(open_files_limit("Max open files  x 3 files"), None);
        assert_eq!(open_files_limit(""), None);
    }

    #[test]
    fn tun_that_does_not_exist() {
        let c = tun_check(Path::new("/nonexistent/zerolease/tun"));
        assert_eq!(c.status, Status::Fail);
        assert!(c.fix.unwrap().contains("modprobe tun"));
    }

    #[test]
    fn missing_qemu_says_what_to_install() {
        let c = qemu_check(None);
        assert_eq!(c.status, Status::Fail);
        assert!(c.fix.unwrap().contains("apt-get install qemu-system-x86"));
    }

    #[test]
    fn state_dir_modes() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let wide = dir.path().join("wide");
        std::fs::create_dir(&wide).unwrap();
        std::fs::set_permissions(&wide, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(state_dir_check(&wide).status, Status::Warn);
        std::fs::set_permissions(&wide, std::fs::Permissions::from_mode(0o700)).unwrap();
        assert_eq!(state_dir_check(&wide).status, Status::Ok);
        assert_eq!(
            state_dir_check(&dir.path().join("absent")).status,
            Status::Ok
        );
    }
}
