//! The zerolease guest agent, PID 1 inside the disposable VM.
//!
//! For now this holds the pure pieces of its job: reading its configuration
//! from the kernel command line ([`cmdline`]) and finding the host's
//! control channel among the virtio-serial ports ([`virtio`]). The binary in
//! `main.rs` only parses arguments and calls into here.
//!
//! **Architecture Invariant:** the guest gets no control-plane secret at
//! boot. The kernel command line carries only addresses and a port name;
//! everything secret arrives later over the control channel, as
//! `zerolease_protocol` messages.

pub mod agent;
pub mod boot;
pub mod cmdline;
pub mod credential;
pub mod env;
pub mod passwd;
pub mod provision;
pub mod run;
pub mod virtio;

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
            format!("zerolease-guest {AGENT_VERSION} (protocol 1.0)")
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
