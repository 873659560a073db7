//! The throwaway qcow2 overlay a session's VM writes to, over a read-only
//! base image.
//!
//! **Invariant:** the base is never written: QEMU gets only the overlay,
//! whose backing file is opened read-only. The overlay is removed on
//! `destroy` (idempotent) and, as a last resort, on drop.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::process::Command;

use super::process::find_on_path;

/// Why an overlay could not be made or removed.
#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    #[error("cannot run qemu-img; install qemu-utils (scripts/setup does)")]
    Spawn(#[source] io::Error),
    #[error("qemu-img could not create the overlay {overlay} over {base}: {stderr}")]
    Create {
        base: PathBuf,
        overlay: PathBuf,
        stderr: String,
    },
    #[error("the base image {0} does not exist")]
    NoBase(PathBuf),
    #[error("cannot remove the overlay {path}")]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A qcow2 overlay file; removed by [`Overlay::destroy`] or on drop.
#[derive(Debug)]
pub struct Overlay {
    path: PathBuf,
    removed: bool,
}

impl Overlay {
    /// `qemu-img create -f qcow2 -b BASE -F qcow2 OVERLAY`. An existing file
    /// at `path` (a leftover) is replaced.
    pub async fn create(base: &Path, path: &Path) -> Result<Overlay, OverlayError> {
        if !base.is_file() {
            return Err(OverlayError::NoBase(base.to_owned()));
        }
        let qemu_img = find_on_path("qemu-img")
            .map_err(|_| OverlayError::Spawn(io::ErrorKind::NotFound.into()))?;
        remove_if_present(path)?;
        // From here on the file is ours to remove, whatever happens.
        let overlay = Overlay {
            path: path.to_owned(),
            removed: false,
        };
        let output = Command::new(qemu_img)
            .arg("create")
            .args(["-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(base)
            .arg(path)
            .env_clear()
            .env("LC_ALL", "C")
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(OverlayError::Spawn)?;
        if !output.status.success() {
            return Err(OverlayError::Create {
                base: base.to_owned(),
                overlay: path.to_owned(),
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            });
        }
        Ok(overlay)
    }

    /// Rebuilds the handle of a leftover overlay, to remove it.
    pub fn for_existing(path: PathBuf) -> Overlay {
        Overlay {
            path,
            removed: false,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the file. Idempotent; a file already gone is fine.
    pub fn destroy(&mut self) -> Result<(), OverlayError> {
        if !self.removed {
            remove_if_present(&self.path)?;
            self.removed = true;
        }
        Ok(())
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        if let Err(err) = self.destroy() {
            tracing::error!(error = %err, "overlay left behind");
        }
    }
}

fn remove_if_present(path: &Path) -> Result<(), OverlayError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(OverlayError::Remove {
            path: path.to_owned(),
            source,
        }),
    }
}
