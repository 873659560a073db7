//! The agent's output, kept on disk: `<home>/sessions/<id>/output.log`
//! (and `output.log.1`, the part before it), read back by `zerolease logs`.
//!
//! Everything the agent writes — piped stdout and stderr, or the bytes of
//! its terminal — is appended as it arrives. The log is bounded: when the
//! current file would pass half the limit, it becomes `output.log.1`
//! (replacing the older one) and a new file starts, so at most [`LOG_LIMIT`]
//! bytes are kept and always the newest ones.
//!
//! **Invariants:**
//! - The directory is 0700 and the files 0600: the log holds whatever the
//!   agent printed. The supervisor itself writes nothing else into it (no
//!   lease, no value, no message of its own).
//! - A failure to write the log never stops the session or the relay to
//!   the user's terminal; it is reported once and the log is closed.

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::home::StateDir;

/// How many bytes of output a session keeps at most (the newest).
pub const LOG_LIMIT: u64 = 8 << 20;

/// The directory of session `id` (its output; the record sits next to it).
pub fn session_dir(home: &StateDir, id: &str) -> PathBuf {
    super::record::sessions_dir(home).join(id)
}

/// The current log of session `id`.
pub fn log_path(home: &StateDir, id: &str) -> PathBuf {
    session_dir(home, id).join("output.log")
}

/// The guest's serial console of session `id` (kernel messages and the
/// guest agent's own lines, never the agent's output), kept after the VM
/// is gone so that a failed boot can be read.
pub fn console_path(home: &StateDir, id: &str) -> PathBuf {
    session_dir(home, id).join("console.log")
}

/// How many bytes of the console a finished session keeps (the newest).
pub const CONSOLE_LIMIT: u64 = 1 << 20;

/// Cuts the file at `path` down to its last `limit` bytes, if it is longer:
/// the guest writes its console unchecked while it runs.
pub fn keep_tail(path: &Path, limit: u64) -> std::io::Result<()> {
    use std::io::Read;
    let mut file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    if len <= limit {
        return Ok(());
    }
    file.seek(SeekFrom::Start(len - limit))?;
    let mut tail = Vec::with_capacity(usize::try_from(limit).unwrap_or(0));
    file.take(limit).read_to_end(&mut tail)?;
    let partial = path.with_extension("log.part");
    let mut out = create(&partial)?;
    out.write_all(&tail)?;
    std::fs::rename(&partial, path)
}

/// The older part of the log.
pub fn previous_path(current: &Path) -> PathBuf {
    current.with_extension("log.1")
}

/// Whether appending `incoming` bytes to a file of `current` bytes should
/// first start a new file, given the total `limit` (two files of half).
pub fn should_rotate(current: u64, incoming: u64, limit: u64) -> bool {
    current > 0 && current.saturating_add(incoming) > limit / 2
}

/// The session's output log; cheap to clone (all clones write the same
/// file). Closed until [`SessionLog::open`] is called, and writes to a
/// closed log are dropped.
#[derive(Debug, Clone, Default)]
pub struct SessionLog {
    inner: Arc<Mutex<Option<Open>>>,
}

#[derive(Debug)]
struct Open {
    path: PathBuf,
    file: File,
    len: u64,
    limit: u64,
}

impl SessionLog {
    /// Creates the session's directory and an empty log in it.
    pub fn open(&self, home: &StateDir, id: &str) -> std::io::Result<()> {
        self.open_at(&log_path(home, id), LOG_LIMIT)
    }

    /// Like [`SessionLog::open`] with any path and limit (tests).
    pub fn open_at(&self, path: &Path, limit: u64) -> std::io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
        }
        let file = create(path)?;
        if let Ok(mut inner) = self.inner.lock() {
            *inner = Some(Open {
                path: path.to_owned(),
                file,
                len: 0,
                limit,
            });
        }
        Ok(())
    }

    /// Appends `data`, rotating first if the file would pass its half.
    pub fn append(&self, data: &[u8]) {
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        let Some(open) = inner.as_mut() else {
            return;
        };
        if let Err(e) = open.append(data) {
            tracing::warn!(
                "cannot write the session log {}: {e}; it stops here",
                open.path.display()
            );
            *inner = None;
        }
    }
}

impl Open {
    fn append(&mut self, data: &[u8]) -> std::io::Result<()> {
        // A chunk larger than half the limit keeps only its tail.
        let half = usize::try_from(self.limit / 2).unwrap_or(usize::MAX);
        let data = &data[data.len().saturating_sub(half)..];
        if should_rotate(self.len, data.len() as u64, self.limit) {
            std::fs::rename(&self.path, previous_path(&self.path))?;
            self.file = create(&self.path)?;
            self.len = 0;
        }
        self.file.write_all(data)?;
        self.len += data.len() as u64;
        Ok(())
    }
}

fn create(path: &Path) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

/// A writer that also appends what it writes to the session log.
pub struct Tee<'a> {
    pub out: &'a mut (dyn Write + Send),
    pub log: SessionLog,
}

impl std::fmt::Debug for Tee<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tee").finish_non_exhaustive()
    }
}

impl Write for Tee<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.out.write(buf)?;
        self.log.append(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// Reads a session's log: the older part, then the current one.
#[derive(Debug)]
pub struct LogReader {
    current: PathBuf,
    file: Option<File>,
    inode: Option<u64>,
    pos: u64,
}

impl LogReader {
    /// A reader of the log at `current` (see [`log_path`]).
    pub fn new(current: PathBuf) -> LogReader {
        LogReader {
            current,
            file: None,
            inode: None,
            pos: 0,
        }
    }

    /// Everything there is now, the older part first.
    pub fn read_all(&mut self, out: &mut dyn Write) -> std::io::Result<()> {
        if let Ok(mut old) = File::open(previous_path(&self.current)) {
            std::io::copy(&mut old, out)?;
        }
        self.read_new(out)
    }

    /// What was appended since the last call. A rotation (the current file
    /// replaced) is followed: the rest of the old file, then the new one
    /// from its start.
    pub fn read_new(&mut self, out: &mut dyn Write) -> std::io::Result<()> {
        use std::os::unix::fs::MetadataExt;
        let now = std::fs::metadata(&self.current).ok().map(|m| m.ino());
        if now != self.inode {
            if let Some(mut old) = self.file.take() {
                // The old current file is now `.1`: finish it.
                std::io::copy(&mut old, out)?;
            }
            self.file = File::open(&self.current).ok();
            self.inode = now;
            self.pos = 0;
        }
        if let Some(f) = self.file.as_mut() {
            f.seek(SeekFrom::Start(self.pos))?;
            let n = std::io::copy(f, out)?;
            self.pos += n;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_decision() {
        // (current, incoming, limit, rotate)
        let cases = [
            (0, 0, 100, false),
            (0, 1000, 100, false),
            (10, 40, 100, false),
            (10, 41, 100, true),
            (50, 0, 100, false),
            (50, 1, 100, true),
            (u64::MAX, u64::MAX, 100, true),
        ];
        for (current, incoming, limit, rotate) in cases {
            assert_eq!(
                should_rotate(current, incoming, limit),
                rotate,
                "{current}+{incoming}/{limit}"
            );
        }
    }

    #[test]
    fn keep_tail_keeps_the_newest_bytes_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        keep_tail(&path, 10).unwrap(); // missing: nothing to do
        assert!(!path.exists());
        std::fs::write(&path, b"0123456789").unwrap();
        keep_tail(&path, 10).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"0123456789");
        std::fs::write(&path, b"0123456789abcdef").unwrap();
        keep_tail(&path, 10).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"6789abcdef");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(!dir.path().join("console.log.part").exists());
    }

    fn read_all(path: &Path) -> Vec<u8> {
        let mut out = Vec::new();
        LogReader::new(path.to_owned()).read_all(&mut out).unwrap();
        out
    }

    #[test]
    fn keeps_the_newest_bytes_within_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s/output.log");
        let log = SessionLog::default();
        log.append(b"dropped: not open yet");
        log.open_at(&path, 100).unwrap();
        let mut all = Vec::new();
        for i in 0..200u32 {
            let line = format!("{i:03}\n");
            log.append(line.as_bytes());
            all.extend_from_slice(line.as_bytes());
            let kept = read_all(&path);
            assert!(kept.len() <= 100, "{} bytes kept", kept.len());
            assert!(all.ends_with(&kept), "not a suffix at {i}");
            assert!(kept.len() >= 50 || kept.len() == all.len());
        }
        // One chunk over the limit keeps its tail.
        let big: Vec<u8> = (0..1000u32).map(|i| b'a' + (i % 26) as u8).collect();
        log.append(&big);
        let kept = read_all(&path);
        assert!(kept.len() <= 100 && big.ends_with(&kept[kept.len() - 50..]));
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&previous_path(&path)), 0o600);
        assert_eq!(mode(path.parent().unwrap()), 0o700);
    }

    #[test]
    fn a_follower_sees_every_byte_once_across_rotations() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("output.log");
        let log = SessionLog::default();
        log.open_at(&path, 64).unwrap();
        let mut reader = LogReader::new(path.clone());
        let mut seen = Vec::new();
        let mut all = Vec::new();
        for i in 0..100u32 {
            let chunk = format!("<{i}>");
            log.append(chunk.as_bytes());
            all.extend_from_slice(chunk.as_bytes());
            // Read after every write: no rotation can be missed.
            reader.read_new(&mut seen).unwrap();
        }
        assert_eq!(
            String::from_utf8(seen).unwrap(),
            String::from_utf8(all).unwrap()
        );
    }

    #[test]
    fn tee_writes_both() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("output.log");
        let log = SessionLog::default();
        log.open_at(&path, 1 << 20).unwrap();
        let mut screen = Vec::new();
        let mut tee = Tee {
            out: &mut screen,
            log: log.clone(),
        };
        tee.write_all(b"hello\n").unwrap();
        assert_eq!(screen, b"hello\n");
        assert_eq!(read_all(&path), b"hello\n");
    }
}
