//! Finding a virtio-serial port by name.
//!
//! The kernel lists each port under `/sys/class/virtio-ports/<dev>/name`,
//! where `<dev>` (e.g. `vport1p1`) is also the device node's name under
//! `/dev`. The sysfs root is a parameter so tests can use a temp directory.
//!
//! **Invariant:** a lookup succeeds only if exactly one port has the name;
//! two ports claiming the same name is an error, never a first-match guess.

use std::io;
use std::path::{Path, PathBuf};

/// A named virtio-serial port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtioPort {
    /// The port's name as the host set it.
    pub name: String,
    /// The device's name (`vport1p1`).
    pub device: String,
}

impl VirtioPort {
    /// The device node under `dev_root` (normally `/dev`).
    pub fn dev_path(&self, dev_root: &Path) -> PathBuf {
        dev_root.join(&self.device)
    }
}

/// Why a port could not be found.
#[derive(Debug, thiserror::Error)]
pub enum FindPortError {
    /// The class directory cannot be listed (no virtio_console driver?).
    #[error("cannot list {path} (is the virtio_console module loaded?)")]
    List {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A port's name attribute cannot be read.
    #[error("cannot read {path}")]
    ReadName {
        /// The attribute file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// No port has the name.
    #[error("no virtio-serial port is named {name:?} (named ports: {available:?})")]
    NotFound {
        /// The name looked for.
        name: String,
        /// The names that exist.
        available: Vec<String>,
    },
    /// More than one port has the name.
    #[error("virtio-serial ports {devices:?} are all named {name:?}")]
    Ambiguous {
        /// The name looked for.
        name: String,
        /// The devices claiming it.
        devices: Vec<String>,
    },
}

/// Lists named ports under `<sysfs_root>/class/virtio-ports`, sorted by
/// device. Ports without a name, and entries whose directory name is not a
/// plain device name, are skipped.
pub fn list_ports(sysfs_root: &Path) -> Result<Vec<VirtioPort>, FindPortError> {
    let dir = sysfs_root.join("class/virtio-ports");
    let entries = std::fs::read_dir(&dir).map_err(|source| FindPortError::List {
        path: dir.clone(),
        source,
    })?;
    let mut ports = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| FindPortError::List {
            path: dir.clone(),
            source,
        })?;
        let Some(device) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if device.is_empty() || !device.bytes().all(|b| b.is_ascii_alphanumeric()) {
            continue;
        }
        let name_path = entry.path().join("name");
        let name = match std::fs::read_to_string(&name_path) {
            Ok(name) => name.trim_end_matches('\n').to_owned(),
            Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
            Err(source) => {
                return Err(FindPortError::ReadName {
                    path: name_path,
                    source,
                });
            }
        };
        if !name.is_empty() {
            ports.push(VirtioPort { name, device });
        }
    }
    ports.sort_by(|a, b| a.device.cmp(&b.device));
    Ok(ports)
}

/// Finds the one port named `name` under `sysfs_root` (normally `/sys`).
pub fn find_port(sysfs_root: &Path, name: &str) -> Result<VirtioPort, FindPortError> {
    let ports = list_ports(sysfs_root)?;
    let mut matching: Vec<&VirtioPort> = ports.iter().filter(|p| p.name == name).collect();
    match matching.len() {
        1 => Ok(matching.remove(0).clone()),
        0 => Err(FindPortError::NotFound {
            name: name.to_owned(),
            available: ports.iter().map(|p| p.name.clone()).collect(),
        }),
        _ => Err(FindPortError::Ambiguous {
            name: name.to_owned(),
            devices: matching.iter().map(|p| p.device.clone()).collect(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake sysfs with the given (device, name) ports; `None` means the
    /// port has no name attribute.
    fn sysfs(ports: &[(&str, Option<&str>)]) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        let class = root.path().join("class/virtio-ports");
        std::fs::create_dir_all(&class).unwrap();
        for (device, name) in ports {
            let dir = class.join(device);
            std::fs::create_dir_all(&dir).unwrap();
            if let Some(name) = name {
                std::fs::write(dir.join("name"), format!("{name}\n")).unwrap();
            }
        }
        root
    }

    #[test]
    fn finds_the_named_port() {
        let root = sysfs(&[
            ("vport0p0", Some("")),
            ("vport1p1", Some("org.zerolease.control")),
            ("vport1p2", Some("org.zerolease.tty")),
            ("vport2p1", None),
        ]);
        let port = find_port(root.path(), "org.zerolease.control").unwrap();
        assert_eq!(
            port,
            VirtioPort {
                name: "org.zerolease.control".into(),
                device: "vport1p1".into()
            }
        );
        assert_eq!(
            port.dev_path(Path::new("/dev")),
            PathBuf::from("/dev/vport1p1")
        );
        assert_eq!(
            find_port(root.path(), "org.zerolease.tty").unwrap().device,
            "vport1p2"
        );
        let names: Vec<_> = list_ports(root.path())
            .unwrap()
            .into_iter()
            .map(|p| p.name)
            .collect();
        assert_eq!(names, ["org.zerolease.control", "org.zerolease.tty"]);
    }

    #[test]
    fn not_found_lists_what_exists() {
        let root = sysfs(&[("vport1p1", Some("other"))]);
        match find_port(root.path(), "org.zerolease.control") {
            Err(FindPortError::NotFound { available, .. }) => assert_eq!(available, ["other"]),
            other => panic!("{other:?}"),
        }
        // A name is compared exactly: no prefix, case or whitespace slack.
        for wrong in ["othe", "Other", "other ", ""] {
            assert!(find_port(root.path(), wrong).is_err(), "{wrong:?}");
        }
    }

    #[test]
    fn duplicate_names_are_ambiguous() {
        let root = sysfs(&[("vport1p1", Some("ctl")), ("vport2p1", Some("ctl"))]);
        match find_port(root.path(), "ctl") {
            Err(FindPortError::Ambiguous { devices, .. }) => {
                assert_eq!(devices, ["vport1p1", "vport2p1"]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn odd_directory_names_are_skipped() {
        let root = sysfs(&[("..hidden", Some("ctl")), ("vport 1", Some("ctl"))]);
        assert!(matches!(
            find_port(root.path(), "ctl"),
            Err(FindPortError::NotFound { .. })
        ));
    }

    #[test]
    fn missing_class_directory_is_reported() {
        let root = tempfile::tempdir().unwrap();
        assert!(matches!(
            find_port(root.path(), "ctl"),
            Err(FindPortError::List { .. })
        ));
    }
}
