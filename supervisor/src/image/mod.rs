//! Guest images: where they live, their `image.json` record, sealing at
//! build time and verification before boot.
//!
//! An image is a directory (`images/out/<name>/`) holding a kernel
//! ([`KERNEL_FILE`]), an initramfs ([`INITRAMFS_FILE`]), optionally a
//! read-only ext4 root disk ([`ROOT_DISK_FILE`], e.g. image `devbox`) and
//! `image.json` ([`ImageRecord`]): the SHA-256 of those files, the kernel
//! package they came from, and the result of the credential scan ([`scan`]).
//!
//! **Architecture Invariant:** [`seal`] writes a record whose scan passed
//! only if the scan found nothing, and [`verify`] — which the session calls
//! before every boot — accepts an image only if its record says the scan
//! passed and every recorded file (the root disk too, when the record has
//! one) still hashes to its recorded digest (DESIGN invariant 1). There is
//! no flag to skip either. A root disk that is present but not recorded is
//! never booted: [`VerifiedImage::root_disk`] comes from the record only.
//! The session may take the files' digests from a [`DigestCache`]
//! ([`verify_with`]); that replaces reading a file while its `stat` is
//! unchanged, never the comparison with the record ([`digest_cache`]
//! argues why it is safe).
//!
//! Residual risk: `verify` checks the files, then QEMU opens them by path. The
//! images directory must be writable only by the user running the supervisor.

pub mod cpio;
pub mod digest_cache;
pub mod scan;

use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use digest_cache::DigestCache;
pub use scan::{Allowlist, Finding, Location, Rule, ScanError, ScanReport};

/// The kernel's file name inside an image directory: uncompressed, booted
/// through its PVH entry point (`scripts/build-image` unpacks the bzImage).
pub const KERNEL_FILE: &str = "vmlinux";
/// The initramfs's file name inside an image directory.
pub const INITRAMFS_FILE: &str = "initramfs.cpio";
/// The root disk's file name inside an image directory (raw ext4, attached
/// read-only).
pub const ROOT_DISK_FILE: &str = "root.ext4";
/// The record's file name inside an image directory.
pub const RECORD_FILE: &str = "image.json";
/// Overrides where named images are looked up.
pub const ENV_IMAGES: &str = "ZEROLEASE_IMAGES";
/// Version of the `image.json` format this code writes and reads.
pub const RECORD_FORMAT: u32 = 1;

/// Where named images live: `explicit`, else `$ZEROLEASE_IMAGES`, else
/// `images/out` in the source tree this binary was built from.
pub fn images_root(explicit: Option<&Path>) -> PathBuf {
    if let Some(p) = explicit {
        return p.to_path_buf();
    }
    if let Some(p) = std::env::var_os(ENV_IMAGES).filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new("."))
        .join("images/out")
}

/// An image name: lower-case letters, digits, `-`, `_`, `.`, not starting
/// with `.` (so never `..`), at most 64 bytes.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b))
}

/// Resolves a command-line argument: a name under `root`, or (if it
/// contains `/`) a directory path.
pub fn resolve(arg: &str, root: &Path) -> Result<PathBuf, ImageError> {
    if arg.contains('/') {
        Ok(PathBuf::from(arg))
    } else if valid_name(arg) {
        Ok(root.join(arg))
    } else {
        Err(ImageError::BadName(arg.to_string()))
    }
}

/// One file of an image and its digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDigest {
    pub file: String,
    /// Lower-case hex SHA-256.
    pub sha256: String,
    pub size: u64,
}

/// The Debian package the kernel (and its modules) came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelPackage {
    /// e.g. `linux-image-6.1.0-50-cloud-amd64`.
    pub package: String,
    /// Debian version, e.g. `6.1.176-1`.
    pub version: String,
    /// `uname -r` of the kernel, e.g. `6.1.0-50-cloud-amd64`.
    pub release: String,
    /// SHA-256 of the `.deb`, as pinned in the lock file.
    pub deb_sha256: String,
}

/// The scan as recorded: what was scanned and what was found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScanRecord {
    pub passed: bool,
    /// What was scanned (the initramfs always; staging trees if given).
    pub targets: Vec<String>,
    pub files: u64,
    pub bytes: u64,
    pub findings: Vec<Finding>,
    /// Private keys the recipe's allowlist accepted as public test
    /// material (see [`Allowlist`]).
    #[serde(default)]
    pub allowed: Vec<Finding>,
}

/// `image.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    pub format: u32,
    pub name: String,
    pub kernel: FileDigest,
    pub initramfs: FileDigest,
    /// The read-only root disk, for images that have one. Absent in
    /// records of initramfs-only images (and of older builds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_disk: Option<FileDigest>,
    pub kernel_package: KernelPackage,
    pub scan: ScanRecord,
}

/// What [`seal`] needs: the image directory already holds the kernel and
/// the initramfs.
#[derive(Debug, Clone)]
pub struct SealRequest {
    pub name: String,
    pub dir: PathBuf,
    pub kernel_package: KernelPackage,
    /// Extra trees to scan as well, e.g. the initramfs staging directory.
    pub also_scan: Vec<PathBuf>,
    /// Known public test keys to accept (the recipe's `scan-allow`).
    pub allow: Allowlist,
    /// The directory also holds [`ROOT_DISK_FILE`]: record its digest. Its
    /// contents are scanned through its source tree in `also_scan`.
    pub root_disk: bool,
}

/// An image that passed [`verify`]: boot these paths.
#[derive(Debug, Clone)]
pub struct VerifiedImage {
    pub name: String,
    pub dir: PathBuf,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    /// The root disk to attach read-only, when the record has one.
    pub root_disk: Option<PathBuf>,
    pub record: ImageRecord,
}

/// Why an image cannot be sealed or booted. Messages say what to do.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(
        "`{0}` is not an image name (lower-case letters, digits, `-`, `_`, `.`); give a directory path with a `/` instead"
    )]
    BadName(String),
    #[error("image `{name}`: {file} is missing in {dir}; build it with scripts/build-image {name}")]
    Missing {
        name: String,
        dir: PathBuf,
        file: &'static str,
    },
    #[error("image `{name}`: cannot read {path}")]
    Io {
        name: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "image `{name}`: {path} is not a valid image record; rebuild it with scripts/build-image {name}"
    )]
    BadRecord {
        name: String,
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "image `{name}`: image.json has format {found}, this zerolease reads {RECORD_FORMAT}; rebuild it with scripts/build-image {name}"
    )]
    Format { name: String, found: u32 },
    #[error(
        "image `{name}`: image.json names image `{recorded}`; rebuild it with scripts/build-image {name}"
    )]
    NameMismatch { name: String, recorded: String },
    #[error(
        "image `{name}`: the credential scan did not pass ({findings} finding(s)); remove the credential material from the image recipe and rebuild it with scripts/build-image {name}"
    )]
    ScanFailed { name: String, findings: usize },
    #[error(
        "image `{name}`: {file} does not match image.json (sha256 {actual}, recorded {expected}); rebuild it with scripts/build-image {name}"
    )]
    DigestMismatch {
        name: String,
        file: &'static str,
        expected: String,
        actual: String,
    },
    #[error("image `{name}`: the credential scan could not finish")]
    Scan {
        name: String,
        #[source]
        source: ScanError,
    },
}

impl ImageError {
    /// True when the image was found but is not trustworthy (tampered,
    /// failed scan), as opposed to absent or unreadable.
    pub fn is_integrity(&self) -> bool {
        matches!(
            self,
            ImageError::ScanFailed { .. } | ImageError::DigestMismatch { .. }
        )
    }
}

/// Streams a file through SHA-256.
pub fn sha256_file(path: &Path) -> io::Result<(String, u64)> {
    let mut f = fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        size += n as u64;
        hasher.update(&buf[..n]);
    }
    Ok((hex::encode(hasher.finalize()), size))
}

fn digest(name: &str, dir: &Path, file: &'static str) -> Result<FileDigest, ImageError> {
    let path = dir.join(file);
    match sha256_file(&path) {
        Ok((sha256, size)) => Ok(FileDigest {
            file: file.to_string(),
            sha256,
            size,
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(ImageError::Missing {
            name: name.to_string(),
            dir: dir.to_path_buf(),
            file,
        }),
        Err(source) => Err(ImageError::Io {
            name: name.to_string(),
            path,
            source,
        }),
    }
}

/// Scans the image (its initramfs and `also_scan`), hashes the kernel and
/// initramfs, and writes `image.json`.
///
/// When the scan finds anything the record is still written — with
/// `passed: false`, so a stale passing record cannot survive — and the
/// result is [`ImageError::ScanFailed`]; the record is returned only when
/// the image is clean.
pub fn seal(req: &SealRequest) -> Result<ImageRecord, ImageError> {
    let name = &req.name;
    if !valid_name(name) {
        return Err(ImageError::BadName(name.clone()));
    }
    let record_path = req.dir.join(RECORD_FILE);
    // Never leave an old passing record next to new files.
    match fs::remove_file(&record_path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(ImageError::Io {
                name: name.clone(),
                path: record_path,
                source,
            });
        }
    }
    let kernel = digest(name, &req.dir, KERNEL_FILE)?;
    let initramfs = digest(name, &req.dir, INITRAMFS_FILE)?;
    let root_disk = if req.root_disk {
        Some(digest(name, &req.dir, ROOT_DISK_FILE)?)
    } else {
        None
    };

    let scan_err = |source| ImageError::Scan {
        name: name.clone(),
        source,
    };
    let mut report = scan::scan_cpio(&req.dir.join(INITRAMFS_FILE)).map_err(scan_err)?;
    let mut targets = vec![INITRAMFS_FILE.to_string()];
    for extra in &req.also_scan {
        report.merge(scan::scan_dir(extra).map_err(scan_err)?);
        targets.push(extra.display().to_string());
    }
    report.apply(&req.allow);
    // The initramfs may have changed while it was scanned.
    let again = digest(name, &req.dir, INITRAMFS_FILE)?;
    if again != initramfs {
        return Err(ImageError::DigestMismatch {
            name: name.clone(),
            file: INITRAMFS_FILE,
            expected: initramfs.sha256,
            actual: again.sha256,
        });
    }

    let record = ImageRecord {
        format: RECORD_FORMAT,
        name: name.clone(),
        kernel,
        initramfs,
        root_disk,
        kernel_package: req.kernel_package.clone(),
        scan: ScanRecord {
            passed: report.is_clean(),
            targets,
            files: report.files,
            bytes: report.bytes,
            findings: report.findings,
            allowed: report.allowed,
        },
    };
    write_record(&record_path, &record).map_err(|source| ImageError::Io {
        name: name.clone(),
        path: record_path.clone(),
        source,
    })?;
    if !record.scan.passed {
        return Err(ImageError::ScanFailed {
            name: name.clone(),
            findings: record.scan.findings.len(),
        });
    }
    Ok(record)
}

/// Writes through a temporary file and a rename, so a reader sees the old
/// record or the new one, never half of one.
fn write_record(path: &Path, record: &ImageRecord) -> io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    let mut text = serde_json::to_string_pretty(record).map_err(io::Error::other)?;
    text.push('\n');
    fs::write(&tmp, text)?;
    fs::rename(&tmp, path)
}

/// Reads `image.json` of the image in `dir` without checking the files.
pub fn read_record(dir: &Path) -> Result<ImageRecord, ImageError> {
    let name = dir_name(dir);
    let path = dir.join(RECORD_FILE);
    let text = match fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(ImageError::Missing {
                name,
                dir: dir.to_path_buf(),
                file: RECORD_FILE,
            });
        }
        Err(source) => return Err(ImageError::Io { name, path, source }),
    };
    serde_json::from_slice(&text).map_err(|source| ImageError::BadRecord { name, path, source })
}

fn dir_name(dir: &Path) -> String {
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| dir.display().to_string())
}

/// The digest of an image file, from `cache` when a fresh `stat` matches a
/// remembered one exactly ([`digest_cache`] says why that is safe), else
/// by hashing it (and remembering the result when it may).
fn cached_digest(
    name: &str,
    dir: &Path,
    file: &'static str,
    cache: &DigestCache,
) -> Result<FileDigest, ImageError> {
    use digest_cache::{Entry, FileStamp, now_ns, reusable, storable};
    let path = dir.join(file);
    let stat = |path: &Path| match fs::metadata(path) {
        Ok(meta) => Ok(FileStamp::of(&meta)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(ImageError::Missing {
            name: name.to_string(),
            dir: dir.to_path_buf(),
            file,
        }),
        Err(source) => Err(ImageError::Io {
            name: name.to_string(),
            path: path.to_path_buf(),
            source,
        }),
    };
    let before = stat(&path)?;
    let key = fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
    if let Some(entry) = cache.get(&key)
        && reusable(&entry, &before)
    {
        return Ok(FileDigest {
            file: file.to_string(),
            sha256: entry.sha256,
            size: entry.size,
        });
    }
    let started = now_ns();
    let fresh = digest(name, dir, file)?;
    let after = stat(&path)?;
    if storable(&before, &after, started, cache.policy) && fresh.size == after.size {
        // A cache that cannot be written only costs the next run a hash.
        let _ = cache.put(
            &key,
            Entry {
                stamp: after,
                sha256: fresh.sha256.clone(),
                size: fresh.size,
            },
        );
    }
    Ok(fresh)
}

/// Checks an image before boot: its record is readable and of this format,
/// names this directory's image, records a passing scan, and every recorded
/// file hashes to its recorded digest.
pub fn verify(dir: &Path) -> Result<VerifiedImage, ImageError> {
    verify_with(dir, None)
}

/// [`verify`], taking each file's digest from `cache` when its `stat` is
/// unchanged since it was last hashed (the session does this; `zerolease
/// image verify` always hashes everything).
pub fn verify_with(dir: &Path, cache: Option<&DigestCache>) -> Result<VerifiedImage, ImageError> {
    let name = dir_name(dir);
    let record = read_record(dir)?;
    if record.format != RECORD_FORMAT {
        return Err(ImageError::Format {
            name,
            found: record.format,
        });
    }
    if record.name != name {
        return Err(ImageError::NameMismatch {
            name,
            recorded: record.name,
        });
    }
    if !record.scan.passed || !record.scan.findings.is_empty() {
        return Err(ImageError::ScanFailed {
            name,
            findings: record.scan.findings.len(),
        });
    }
    let files = [
        (KERNEL_FILE, Some(&record.kernel)),
        (INITRAMFS_FILE, Some(&record.initramfs)),
        (ROOT_DISK_FILE, record.root_disk.as_ref()),
    ];
    for (file, recorded) in files {
        let Some(recorded) = recorded else { continue };
        let actual = match cache {
            Some(cache) => cached_digest(&name, dir, file, cache)?,
            None => digest(&name, dir, file)?,
        };
        if recorded.file != file || actual.sha256 != recorded.sha256.to_ascii_lowercase() {
            return Err(ImageError::DigestMismatch {
                name,
                file,
                expected: recorded.sha256.clone(),
                actual: actual.sha256,
            });
        }
    }
    Ok(VerifiedImage {
        kernel: dir.join(KERNEL_FILE),
        initramfs: dir.join(INITRAMFS_FILE),
        root_disk: record.root_disk.as_ref().map(|_| dir.join(ROOT_DISK_FILE)),
        dir: dir.to_path_buf(),
        name,
        record,
    })
}

/// [`verify`] for a command-line style argument: an image name looked up
/// under [`images_root`]`(images)`, or a directory path (contains `/`).
pub fn verify_named(arg: &str, images: Option<&Path>) -> Result<VerifiedImage, ImageError> {
    verify(&resolve(arg, &images_root(images))?)
}

/// [`verify_named`] with a digest cache ([`verify_with`]).
pub fn verify_named_with(
    arg: &str,
    images: Option<&Path>,
    cache: Option<&DigestCache>,
) -> Result<VerifiedImage, ImageError> {
    verify_with(&resolve(arg, &images_root(images))?, cache)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for good in ["minimal", "dev-1.2", "a_b"] {
            assert!(valid_name(good), "{good}");
        }
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "Minimal",
            "a/b",
            "a b",
            &"x".repeat(65),
        ] {
            assert!(!valid_name(bad), "{bad}");
        }
        let root = Path::new("/srv/images");
        assert_eq!(
            resolve("minimal", root).unwrap(),
            Path::new("/srv/images/minimal")
        );
        assert_eq!(resolve("./x/y", root).unwrap(), Path::new("./x/y"));
        assert!(matches!(resolve("..", root), Err(ImageError::BadName(_))));
    }

    #[test]
    fn explicit_root_wins() {
        assert_eq!(
            images_root(Some(Path::new("/tmp/imgs"))),
            Path::new("/tmp/imgs")
        );
    }
}
