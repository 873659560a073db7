//! What a running session leaves on disk so other commands (`ps`,
//! `revoke`, `destroy`) and a later supervisor can find it: one JSON record
//! per session under `<home>/sessions/`, mode 0600, rewritten at every
//! transition, and a control socket in the session's runtime directory.
//!
//! The record holds names, addresses and pids — never a secret.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::clock::Timestamp;
use crate::home::StateDir;
use crate::jail::JailRecord;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    pub id: String,
    pub name: String,
    pub image: String,
    /// The `zerolease run` process.
    pub pid: u32,
    pub started: Timestamp,
    pub state: String,
    pub runtime_dir: PathBuf,
    pub jail: Option<JailRecord>,
    /// QEMU's pid, once it runs.
    pub qemu_pid: Option<u32>,
    pub exit_code: Option<i32>,
    /// The host directory copied in as the workspace (where `zerolease
    /// apply` applies the changes by default).
    #[serde(default)]
    pub workspace: Option<PathBuf>,
}

pub fn sessions_dir(home: &StateDir) -> PathBuf {
    home.root().join("sessions")
}

fn path_of(home: &StateDir, id: &str) -> PathBuf {
    sessions_dir(home).join(format!("{id}.json"))
}

/// The control socket of a running session.
pub fn control_socket(runtime_dir: &Path) -> PathBuf {
    runtime_dir.join("supervisor.sock")
}

impl SessionRecord {
    /// Writes the record atomically (temp file, then rename), mode 0600.
    pub fn save(&self, home: &StateDir) -> std::io::Result<()> {
        let dir = sessions_dir(home);
        std::fs::create_dir_all(&dir)?;
        let path = path_of(home, &self.id);
        let tmp = path.with_extension("json.tmp");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        // One write: serde_json on a File makes a system call per token.
        let mut text = serde_json::to_vec_pretty(self)?;
        text.push(b'\n');
        f.write_all(&text)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)
    }

    pub fn load(home: &StateDir, id: &str) -> std::io::Result<SessionRecord> {
        let text = std::fs::read_to_string(path_of(home, id))?;
        serde_json::from_str(&text).map_err(std::io::Error::other)
    }

    /// Every record, oldest first; unreadable files are skipped with a warning.
    pub fn all(home: &StateDir) -> Vec<SessionRecord> {
        let mut out: Vec<SessionRecord> = std::fs::read_dir(sessions_dir(home))
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            .filter_map(|e| {
                let text = std::fs::read_to_string(e.path()).ok()?;
                serde_json::from_str(&text)
                    .map_err(|err| tracing::warn!(path = %e.path().display(), "unreadable session record: {err}"))
                    .ok()
            })
            .collect();
        out.sort_by_key(|r| r.started);
        out
    }

    /// Whether the `zerolease run` process of this record is still alive.
    pub fn supervisor_alive(&self) -> bool {
        Path::new(&format!("/proc/{}", self.pid)).exists()
            && std::fs::read_to_string(format!("/proc/{}/cmdline", self.pid))
                .is_ok_and(|c| c.contains("zerolease"))
    }

    pub fn is_finished(&self) -> bool {
        matches!(self.state.as_str(), "destroyed" | "failed")
    }
}
