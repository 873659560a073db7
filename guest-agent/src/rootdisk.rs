//! Switching from the initramfs to an image's read-only root disk.
//!
//! Images with a root disk (e.g. `devbox`) boot the same initramfs — this
//! agent as `/init` plus kernel modules — and the kernel command line names
//! the disk by its virtio-blk serial (`zl.root=zl-root`). PID 1 then:
//!
//! 1. finds the disk under `/sys/block/*/serial` ([`find_disk`]),
//! 2. mounts it read-only (ext4) at [`LOWER`],
//! 3. mounts a tmpfs at [`RW`] and an overlay of both at [`NEW_ROOT`], so
//!    everything the session writes goes to memory,
//! 4. bind-mounts its own binary read-only at [`GUEST_BINARY`] inside (git's
//!    credential helper runs it),
//! 5. moves `/dev` (with `/dev/pts`), `/proc`, `/sys`, `/run` and `/tmp`
//!    into the new root, and
//! 6. moves the new root onto `/` and `chroot`s into it, like `switch_root`.
//!
//! Boot then continues exactly as with an initramfs-only image.
//!
//! **Architecture Invariant:** the VM never writes to the image. The disk is
//! attached read-only by QEMU *and* mounted read-only here; the only
//! writable layer is a tmpfs that dies with the VM.
//!
//! The initramfs's files are not deleted after the switch (`switch_root`
//! does that to free memory); for a root-disk image it holds only this agent
//! and the modules, a few MiB.

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::mount::{MsFlags, mount};

use crate::boot::BootError;

/// Where the read-only disk is mounted, relative to the initramfs root.
pub const LOWER: &str = "zl/lower";
/// Where the tmpfs holding the overlay's upper and work directories goes.
pub const RW: &str = "zl/rw";
/// Where the overlay (the future root) is assembled.
pub const NEW_ROOT: &str = "zl/root";
/// The agent's binary inside the new root, for git's credential helper.
pub const GUEST_BINARY: &str = "usr/local/bin/zerolease-guest";
/// Mount points moved from the initramfs into the new root, in order.
pub const MOVED: [&str; 5] = ["dev", "proc", "sys", "run", "tmp"];

/// The block device (e.g. `vda`) whose `serial` attribute is `serial`,
/// under `<sysfs_root>/block`. Names are compared exactly (the kernel
/// prints the serial without padding).
pub fn find_disk(sysfs_root: &Path, serial: &str) -> Result<String, BootError> {
    let dir = sysfs_root.join("block");
    let entries = std::fs::read_dir(&dir).map_err(|source| BootError::File {
        path: dir.clone(),
        source,
    })?;
    let mut names: Vec<String> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
        .collect();
    names.sort();
    for name in names {
        let Ok(found) = std::fs::read_to_string(dir.join(&name).join("serial")) else {
            continue;
        };
        if found.trim_end_matches(['\n', '\0']) == serial {
            return Ok(name);
        }
    }
    Err(BootError::NoRootDisk {
        serial: serial.to_owned(),
        path: dir,
    })
}

/// [`find_disk`], waiting up to `wait` for the driver to probe the disk.
pub fn wait_for_disk(sysfs_root: &Path, serial: &str, wait: Duration) -> Result<String, BootError> {
    let deadline = Instant::now() + wait;
    loop {
        match find_disk(sysfs_root, serial) {
            Ok(name) => return Ok(name),
            Err(err) if Instant::now() >= deadline => return Err(err),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// The overlay's mount data. Paths must not contain `,` or `:` (which
/// overlayfs would read as separators); ours are fixed.
pub fn overlay_options(lower: &Path, upper: &Path, work: &Path) -> Result<String, BootError> {
    let text = |p: &Path| -> Result<String, BootError> {
        p.to_str()
            .filter(|s| !s.contains([',', ':', '\\']) && !s.chars().any(char::is_control))
            .map(str::to_owned)
            .ok_or_else(|| BootError::File {
                path: p.to_path_buf(),
                source: io::Error::from(io::ErrorKind::InvalidInput),
            })
    };
    Ok(format!(
        "lowerdir={},upperdir={},workdir={}",
        text(lower)?,
        text(upper)?,
        text(work)?
    ))
}

fn mount_err<'a>(fstype: &'static str, target: &'a Path) -> impl FnOnce(Errno) -> BootError + 'a {
    move |errno| BootError::Mount {
        fstype,
        target: target.to_path_buf(),
        source: errno.into(),
    }
}

fn file_err(path: &Path) -> impl FnOnce(io::Error) -> BootError + '_ {
    move |source| BootError::File {
        path: path.to_path_buf(),
        source,
    }
}

/// Steps 2–6 of the module docs: mounts `/dev/<disk>` read-only under an
/// overlay and makes it the root. `root` is the initramfs root (`/`), whose
/// `dev`, `proc`, `sys`, `run` and `tmp` are already mounted. Privileged;
/// PID 1 only.
pub fn switch_to(root: &Path, disk: &str, agent_binary: &Path) -> Result<(), BootError> {
    let lower = root.join(LOWER);
    let rw = root.join(RW);
    let new_root = root.join(NEW_ROOT);
    for dir in [&lower, &rw, &new_root] {
        std::fs::create_dir_all(dir).map_err(file_err(dir))?;
    }

    let device = root.join("dev").join(disk);
    mount(
        Some(&device),
        &lower,
        Some("ext4"),
        MsFlags::MS_RDONLY,
        Some("noload"),
    )
    .map_err(mount_err("ext4", &lower))?;
    mount(
        Some("tmpfs"),
        &rw,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755"),
    )
    .map_err(mount_err("tmpfs", &rw))?;
    let upper = rw.join("upper");
    let work = rw.join("work");
    for dir in [&upper, &work] {
        std::fs::create_dir_all(dir).map_err(file_err(dir))?;
    }
    let options = overlay_options(&lower, &upper, &work)?;
    mount(
        Some("overlay"),
        &new_root,
        Some("overlay"),
        MsFlags::empty(),
        Some(options.as_str()),
    )
    .map_err(mount_err("overlay", &new_root))?;

    // This binary, read-only, where /etc/gitconfig's helper finds it.
    let inside = new_root.join(GUEST_BINARY);
    if let Some(parent) = inside.parent() {
        std::fs::create_dir_all(parent).map_err(file_err(parent))?;
    }
    std::fs::write(&inside, b"").map_err(file_err(&inside))?;
    mount(
        Some(agent_binary),
        &inside,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(mount_err("bind", &inside))?;
    mount(
        None::<&str>,
        &inside,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        None::<&str>,
    )
    .map_err(mount_err("bind", &inside))?;

    for dir in MOVED {
        let from = root.join(dir);
        let to = new_root.join(dir);
        std::fs::create_dir_all(&to).map_err(file_err(&to))?;
        mount(
            Some(&from),
            &to,
            None::<&str>,
            MsFlags::MS_MOVE,
            None::<&str>,
        )
        .map_err(mount_err("move", &to))?;
    }

    // switch_root: the new root goes on top of `/`, then becomes our root.
    std::env::set_current_dir(&new_root).map_err(file_err(&new_root))?;
    mount(
        Some("."),
        root,
        None::<&str>,
        MsFlags::MS_MOVE,
        None::<&str>,
    )
    .map_err(mount_err("move", root))?;
    nix::unistd::chroot(".").map_err(|errno| BootError::File {
        path: PathBuf::from("chroot ."),
        source: errno.into(),
    })?;
    std::env::set_current_dir("/").map_err(file_err(Path::new("/")))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_disk_by_serial() {
        let sys = tempfile::tempdir().unwrap();
        assert!(matches!(
            find_disk(sys.path(), "zl-root"),
            Err(BootError::File { .. })
        ));
        let block = sys.path().join("block");
        for (name, serial) in [
            ("vda", Some("zl-work\n")),
            ("vdb", Some("zl-root\n")),
            ("vdc", Some("zl-rootx\n")),
            ("loop0", None),
        ] {
            std::fs::create_dir_all(block.join(name)).unwrap();
            if let Some(serial) = serial {
                std::fs::write(block.join(name).join("serial"), serial).unwrap();
            }
        }
        assert_eq!(find_disk(sys.path(), "zl-root").unwrap(), "vdb");
        assert_eq!(find_disk(sys.path(), "zl-work").unwrap(), "vda");
        // Exact match only: no prefixes, no case folding.
        for missing in ["zl-roo", "ZL-ROOT", "zl", ""] {
            let err = find_disk(sys.path(), missing).unwrap_err();
            assert!(matches!(err, BootError::NoRootDisk { .. }), "{missing:?}");
        }
        let err = wait_for_disk(sys.path(), "zl-none", Duration::ZERO).unwrap_err();
        assert!(err.to_string().contains("zl-none"), "{err}");
    }

    #[test]
    fn overlay_options_refuse_separators() {
        let root = Path::new("/zl");
        assert_eq!(
            overlay_options(
                &root.join("lower"),
                &root.join("rw/upper"),
                &root.join("rw/work")
            )
            .unwrap(),
            "lowerdir=/zl/lower,upperdir=/zl/rw/upper,workdir=/zl/rw/work"
        );
        for bad in ["/a,b", "/a:b", "/a\\b", "/a\nb"] {
            assert!(
                overlay_options(Path::new(bad), Path::new("/u"), Path::new("/w")).is_err(),
                "{bad:?}"
            );
        }
    }
}
