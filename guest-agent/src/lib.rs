//! The zerolease guest agent, PID 1 inside the disposable VM.
//!
//! Bird's-eye view, in boot order:
//! - [`boot`]: PID 1 mounts /proc, /sys, /dev, /dev/pts, /run, /tmp, loads
//!   the kernel modules listed in `/lib/modules/zerolease.load` (not
//!   `virtio_blk` when the VM has no disk), finds the control port
//!   ([`virtio`]) and hands it to [`agent`] while a thread ([`pending`])
//!   configures IPv4 from the kernel command line ([`cmdline`]) and
//!   disables IPv6; whatever
//!   happens, it ends by syncing and powering off. With `zl.root=` it first
//!   switches to the image's read-only root disk under a tmpfs overlay
//!   ([`rootdisk`]).
//! - [`agent`]: the main loop on the control channel (handshake, then
//!   `Provision`, credential requests, `UpdateSecrets`, `Revoke`,
//!   `Shutdown`), threads and channels, one writer.
//! - [`provision`]: the env file ([`env`](mod@env) renders it), files in the agent's
//!   home (confined, atomic), the CA bundle and `/etc/gitconfig`; the user
//!   comes from `/etc/passwd` ([`passwd`]).
//! - [`run`]: the agent command as the unprivileged user, its output, and
//!   killing every process of that user on revocation.
//! - [`credential`]: git's credential helper (`zerolease-guest credential
//!   get`) and its socket server inside PID 1.
//!
//! The binary in `main.rs` only dispatches on its arguments (and on being
//! PID 1).
//!
//! **Architecture Invariant:** the guest gets no control-plane secret at
//! boot. The kernel command line carries only addresses and a port name;
//! everything secret arrives later over the control channel, as
//! `zerolease_protocol` messages, and the guest never holds a vault token:
//! it receives already-leased values and asks the host per credential use.

pub mod agent;
pub mod boot;
pub mod cmdline;
pub mod credential;
pub mod env;
pub mod passwd;
pub mod pending;
pub mod provision;
pub mod rootdisk;
pub mod run;
pub mod tty;
pub mod virtio;
pub mod workspace;

/// An error and its causes on one line (`what: because: because`), for the
/// console, which is all the guest has to report with before the host
/// channel is up. Messages never carry secret values.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// A line on the guest's console, stamped with the guest's uptime to the
/// millisecond (the kernel stamps its own lines alike) so that a slow boot
/// shows where the time went.
pub(crate) fn log(line: &str) {
    match uptime() {
        Some(up) => eprintln!("zerolease-guest [{up}]: {line}"),
        None => eprintln!("zerolease-guest: {line}"),
    }
}

/// Seconds since the guest booted, with three decimals: `CLOCK_BOOTTIME`,
/// the clock behind `/proc/uptime`, readable before `/proc` is mounted.
fn uptime() -> Option<String> {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME).ok()?;
    Some(format!("{}.{:03}", now.tv_sec(), now.tv_nsec() / 1_000_000))
}

/// This agent's version, sent in `Hello`.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The `--version` line.
pub fn version_line() -> String {
    format!(
        "zerolease-guest {AGENT_VERSION} (protocol {})",
        zerolease_protocol::PROTOCOL_VERSION
    )
}

use std::path::Path;

/// Why the agent cannot find its control channel at startup.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// The kernel command line is unusable.
    #[error("bad kernel command line")]
    Cmdline(#[from] cmdline::CmdlineError),
    /// The control port is missing or ambiguous.
    #[error("cannot find the control port")]
    Port(#[from] virtio::FindPortError),
}

/// Reads the configuration from `cmdline` and finds its control port under
/// `sysfs_root`: the first step of the agent's boot.
pub fn locate_control_channel(
    cmdline: &str,
    sysfs_root: &Path,
) -> Result<(cmdline::GuestConfig, virtio::VirtioPort), StartupError> {
    let config = cmdline::parse(cmdline)?;
    let port = virtio::find_port(sysfs_root, &config.control_port)?;
    Ok((config, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_line_names_both_versions() {
        assert_eq!(
            version_line(),
            format!("zerolease-guest {AGENT_VERSION} (protocol 1.1)")
        );
    }

    #[test]
    fn locates_the_port_named_on_the_command_line() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("class/virtio-ports/vport3p1");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("name"), "ctl.x\n").unwrap();

        let (config, port) = locate_control_channel(
            "zl.ip=10.9.0.2/30 zl.gw=10.9.0.1 zl.port=ctl.x",
            root.path(),
        )
        .unwrap();
        assert_eq!(config.control_port, "ctl.x");
        assert_eq!(port.device, "vport3p1");

        // The default name is not there: a clear error, not a guess.
        assert!(matches!(
            locate_control_channel("zl.ip=10.9.0.2/30 zl.gw=10.9.0.1", root.path()),
            Err(StartupError::Port(virtio::FindPortError::NotFound { .. }))
        ));
        assert!(matches!(
            locate_control_channel("zl.gw=10.9.0.1", root.path()),
            Err(StartupError::Cmdline(_))
        ));
    }
}
