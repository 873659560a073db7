//! Remembered SHA-256 digests of image files, so `run` does not rehash a
//! 1.7 GiB root disk (or a 30 MiB initramfs) before every boot.
//!
//! An entry says: the file at this path, with this (device, inode, size,
//! mtime, ctime), hashed to this digest. [`verify`](super::verify_with)
//! still compares the digest with `image.json`; the cache only replaces
//! reading the file.
//!
//! **Architecture Invariant:** an entry stands in for hashing only when
//! every field of a fresh `stat` equals the remembered one ([`reusable`]).
//! That is safe because:
//! - the kernel sets ctime on every change of content or metadata (write,
//!   mmap store, truncate, fallocate, `utimensat`, chmod, link) and user
//!   space cannot set it back; replacing the file changes the inode;
//! - an entry is stored only when the file's stat was the same before and
//!   after hashing and its ctime was at least [`CachePolicy::min_age`] older
//!   than the start of hashing ([`storable`]), so a change in the same
//!   timestamp tick as the hash cannot hide (git's "racily clean" rule);
//! - the cache file lives in the supervisor's state directory, is written
//!   0600, and is ignored unless it is owned by this user and not writable
//!   by group or others ([`DigestCache::load`]). Whoever can write it, or
//!   the images directory, could already swap files between verify and
//!   QEMU's open (a documented residual risk), so it grants nothing new.
//!
//! Residual: a root user who changes the disk and steps the clock back to
//! reproduce its exact ctime in nanoseconds; root on the host is trusted.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// The cache's file name in the state directory.
pub const CACHE_FILE: &str = "image-digests.json";

/// What identifies one version of a file, from `stat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStamp {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    /// Nanoseconds since the epoch.
    pub mtime_ns: i128,
    /// Nanoseconds since the epoch.
    pub ctime_ns: i128,
}

impl FileStamp {
    pub fn of(meta: &fs::Metadata) -> FileStamp {
        FileStamp {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            ctime_ns: i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec()),
        }
    }
}

/// One remembered digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub stamp: FileStamp,
    /// Lower-case hex SHA-256.
    pub sha256: String,
    pub size: u64,
}

/// When a fresh hash may be remembered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CachePolicy {
    /// How much older than the start of hashing the file's ctime must be.
    pub min_age: Duration,
}

impl Default for CachePolicy {
    fn default() -> Self {
        CachePolicy {
            min_age: Duration::from_secs(2),
        }
    }
}

/// Whether `entry` may stand in for hashing a file whose stat is `now`.
pub fn reusable(entry: &Entry, now: &FileStamp) -> bool {
    entry.stamp == *now && entry.size == now.size
}

/// Whether a digest computed between `before` and `after` (stats of the
/// file) starting at `started_ns` may be remembered.
pub fn storable(
    before: &FileStamp,
    after: &FileStamp,
    started_ns: i128,
    policy: CachePolicy,
) -> bool {
    before == after
        && started_ns.saturating_sub(after.ctime_ns) >= policy.min_age.as_nanos() as i128
        && after.mtime_ns <= started_ns
}

/// Nanoseconds since the epoch, now.
pub fn now_ns() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0)
}

/// The cache file's contents: path → entry.
#[derive(Debug, Default, Serialize, Deserialize)]
struct CacheFile {
    entries: BTreeMap<PathBuf, Entry>,
}

/// The cache at a path in the state directory.
#[derive(Debug, Clone)]
pub struct DigestCache {
    path: PathBuf,
    pub policy: CachePolicy,
}

impl DigestCache {
    pub fn at(path: impl Into<PathBuf>) -> DigestCache {
        DigestCache {
            path: path.into(),
            policy: CachePolicy::default(),
        }
    }

    /// The cache of a state directory.
    pub fn in_state_dir(root: &Path) -> DigestCache {
        DigestCache::at(root.join(CACHE_FILE))
    }

    /// The entries, or none when the file is missing, unreadable, not
    /// ours, writable by others, or not a cache (all the same: hash).
    fn load(&self) -> CacheFile {
        let Ok(meta) = fs::symlink_metadata(&self.path) else {
            return CacheFile::default();
        };
        let ours = meta.is_file()
            && meta.uid() == nix::unistd::Uid::effective().as_raw()
            && meta.permissions().mode() & 0o022 == 0;
        if !ours {
            return CacheFile::default();
        }
        fs::read(&self.path)
            .ok()
            .and_then(|text| serde_json::from_slice(&text).ok())
            .unwrap_or_default()
    }

    /// The remembered entry for `file` (an absolute path).
    pub fn get(&self, file: &Path) -> Option<Entry> {
        self.load().entries.remove(file)
    }

    /// Remembers `entry` for `file`: temp file (0600) and rename. Failing
    /// to write the cache is not an error for the caller.
    pub fn put(&self, file: &Path, entry: Entry) -> io::Result<()> {
        let mut cache = self.load();
        cache.entries.retain(|p, _| p.exists());
        cache.entries.insert(file.to_path_buf(), entry);
        let text = serde_json::to_vec_pretty(&cache).map_err(io::Error::other)?;
        let tmp = self.path.with_extension("json.tmp");
        let _ = fs::remove_file(&tmp);
        {
            use std::io::Write;
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&text)?;
        }
        fs::rename(&tmp, &self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: i128 = 1_000_000_000;

    fn stamp() -> FileStamp {
        FileStamp {
            dev: 2049,
            ino: 42,
            size: 1 << 30,
            mtime_ns: 1_000 * S,
            ctime_ns: 1_000 * S + 5,
        }
    }

    fn entry() -> Entry {
        Entry {
            stamp: stamp(),
            sha256: "ab".repeat(32),
            size: 1 << 30,
        }
    }

    #[test]
    fn reused_only_when_every_field_matches() {
        assert!(reusable(&entry(), &stamp()));
        type Change = (&'static str, fn(&mut FileStamp));
        let changes: [Change; 6] = [
            ("other device", |s| s.dev += 1),
            ("other inode (replaced)", |s| s.ino += 1),
            ("other size", |s| s.size -= 1),
            ("mtime set back by utimensat", |s| s.mtime_ns -= 1),
            ("ctime one nanosecond later", |s| s.ctime_ns += 1),
            ("ctime earlier (clock stepped back)", |s| s.ctime_ns -= S),
        ];
        for (what, change) in changes {
            let mut now = stamp();
            change(&mut now);
            assert!(!reusable(&entry(), &now), "{what}");
        }
        // An entry whose recorded size disagrees with its own stamp.
        let mut odd = entry();
        odd.size += 1;
        assert!(!reusable(&odd, &stamp()));
    }

    #[test]
    fn stored_only_when_stable_and_old_enough() {
        let policy = CachePolicy::default();
        let old = stamp();
        let started = old.ctime_ns + 2 * S;
        assert!(storable(&old, &old, started, policy));
        // Changed while being hashed.
        let mut during = old;
        during.ctime_ns += 1;
        assert!(!storable(&old, &during, started, policy));
        // Changed just before hashing: a change in the same tick could hide.
        assert!(!storable(&old, &old, old.ctime_ns + S, policy));
        assert!(!storable(&old, &old, old.ctime_ns, policy));
        // ctime in the future (clock stepped back since).
        assert!(!storable(&old, &old, old.ctime_ns - S, policy));
        // mtime in the future (set by utimensat): never trusted.
        let mut future = old;
        future.mtime_ns = started + S;
        assert!(!storable(&future, &future, started, policy));
        // A zero margin (tests) still needs stability.
        let none = CachePolicy {
            min_age: Duration::ZERO,
        };
        assert!(storable(&old, &old, old.ctime_ns, none));
        assert!(!storable(&old, &during, old.ctime_ns + S, none));
    }

    #[test]
    fn a_cache_file_that_is_not_ours_alone_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DigestCache::in_state_dir(dir.path());
        let file = dir.path().join("root.ext4");
        fs::write(&file, b"disk").unwrap();
        assert_eq!(cache.get(&file), None);
        cache.put(&file, entry()).unwrap();
        assert_eq!(cache.get(&file), Some(entry()));
        let path = dir.path().join(CACHE_FILE);
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // Group- or world-writable: ignored.
        for mode in [0o620, 0o602, 0o666] {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
            assert_eq!(cache.get(&file), None, "{mode:o}");
        }
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(cache.get(&file), Some(entry()));
        // A symlink in its place: ignored.
        fs::rename(&path, dir.path().join("elsewhere.json")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("elsewhere.json"), &path).unwrap();
        assert_eq!(cache.get(&file), None);
        // Garbage: ignored, and overwritten by the next put.
        fs::remove_file(&path).unwrap();
        fs::write(&path, b"{ not json").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(cache.get(&file), None);
        cache.put(&file, entry()).unwrap();
        assert_eq!(cache.get(&file), Some(entry()));
        // Entries of files that are gone are dropped on the next put.
        let other = dir.path().join("gone.ext4");
        cache.put(&other, entry()).unwrap();
        let third = dir.path().join("third.ext4");
        fs::write(&third, b"x").unwrap();
        cache.put(&third, entry()).unwrap();
        assert_eq!(cache.get(&other), None);
        assert_eq!(cache.get(&file), Some(entry()));
    }
}
