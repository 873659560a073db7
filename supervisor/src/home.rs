//! The state directory: where the vault database and the file key live.

use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

pub const ENV_HOME: &str = "ZEROLEASE_HOME";

#[derive(Debug, thiserror::Error)]
pub enum HomeError {
    #[error(
        "cannot find a data directory: set {ENV_HOME} to the directory zerolease should keep its state in"
    )]
    NoDataDir,
    #[error("cannot {action} the state directory {}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// `$ZEROLEASE_HOME`, or the XDG data directory's `zerolease`
/// (`~/.local/share/zerolease`).
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    pub fn resolve(explicit: Option<PathBuf>) -> Result<StateDir, HomeError> {
        let root = match explicit {
            Some(p) => p,
            None => dirs::data_dir()
                .ok_or(HomeError::NoDataDir)?
                .join("zerolease"),
        };
        Ok(StateDir { root })
    }

    pub fn at(root: impl Into<PathBuf>) -> StateDir {
        StateDir { root: root.into() }
    }

    /// Creates the directory (mode 0700) if missing and tightens its mode if
    /// it is wider, since it holds the key file.
    pub fn ensure(&self) -> Result<(), HomeError> {
        let io = |action| {
            let path = self.root.clone();
            move |source| HomeError::Io {
                action,
                path,
                source,
            }
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.root)
            .map_err(io("create"))?;
        let mode = fs::metadata(&self.root)
            .map_err(io("inspect"))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            tracing::warn!(path = %self.root.display(), "state directory was group/world accessible; setting it to 0700");
            fs::set_permissions(&self.root, fs::Permissions::from_mode(0o700))
                .map_err(io("set permissions on"))?;
        }
        Ok(())
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn vault_db(&self) -> PathBuf {
        self.root.join("vault.db")
    }

    pub fn master_key(&self) -> PathBuf {
        self.root.join("master.key")
    }
}
