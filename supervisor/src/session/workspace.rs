//! The workspace: the user's project directory copied into the VM, and the
//! agent's changes brought back as a git bundle and a patch.
//!
//! Transport is two raw virtio-blk disks, no filesystem code: before boot the
//! host writes the directory as a tar into the session's runtime directory
//! (attached read-only, serial `zl-ws-in`) and creates an empty sparse "out"
//! disk of the same bound (serial `zl-ws-out`). When the agent exits, the
//! guest agent commits the agent's changes, and writes a header, a git
//! bundle and a `git diff --binary` patch to the out disk; the host copies
//! them into `<home>/sessions/<id>/workspace.{bundle,patch}`.
//!
//! **Architecture Invariants:**
//! - *The host tree is read, never written, during a session.* The tar is
//!   built from the directory before boot; nothing from the guest goes back
//!   into it except through `zerolease apply`, run by the user afterwards.
//! - *Symlinks are never followed on the host.* The walk uses
//!   `symlink_metadata`; symlinks go into the tar as symlinks; sockets,
//!   devices and fifos are left out (and reported).
//! - *The guest's output is untrusted data.* Lengths are checked against the
//!   out disk's size before reading ([`OutHeader::decode`]); the patch is
//!   checked section by section ([`check_patch`]) and a section that creates
//!   or changes a symlink or gitlink, touches `.git`, or leaves the tree is
//!   refused; host git only ever parses or applies it, with hooks, fsmonitor
//!   and system/global config off ([`host_git`]). The guest's `.git/` never
//!   comes back.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use zerolease_protocol::workspace::{OUT_HEADER_LEN, OutHeader, OutHeaderError};

/// The largest workspace copied in unless the manifest's resources are
/// smaller (see [`limit_for`]).
pub const DEFAULT_LIMIT: u64 = 1 << 30;
/// File names in the runtime directory.
pub const IN_DISK: &str = "workspace.tar";
pub const OUT_DISK: &str = "workspace-out.img";
/// File names in the session's output directory.
pub const BUNDLE_FILE: &str = "workspace.bundle";
pub const PATCH_FILE: &str = "workspace.patch";
/// Tar overhead counted per entry (its header block; long names add more,
/// which the limit's margin absorbs).
const ENTRY_OVERHEAD: u64 = 512;

#[derive(Debug, thiserror::Error)]
pub enum WorkspaceError {
    #[error("the workspace {} is not a directory", path.display())]
    NotADirectory { path: PathBuf },
    #[error("cannot read the workspace at {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "the workspace {} is {} ({files} files), over the limit of {} ({why}); \
         remove build outputs and other large files from it (or copy only what the agent needs \
         to a smaller directory), or raise the limit: {fix}",
        path.display(), human(*size), human(*limit)
    )]
    TooBig {
        path: PathBuf,
        size: u64,
        files: u64,
        limit: u64,
        why: &'static str,
        fix: &'static str,
    },
    #[error(
        "the workspace's {} is a file, not a directory (a git worktree or submodule); \
         use the main checkout as the workspace",
        path.display()
    )]
    GitFile { path: PathBuf },
    #[error("cannot write {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot run host git ({what})")]
    Git {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("host git failed ({what}): {stderr}")]
    GitFailed { what: String, stderr: String },
    #[error("the guest's workspace result is unusable")]
    BadResult(#[source] OutHeaderError),
    #[error("the guest could not produce the workspace's changes: {0}")]
    GuestFailed(String),
}

/// `1.5 GiB`, `12 MiB`, `800 B`.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64;
    let mut unit = "B";
    for u in UNITS {
        if value < 1024.0 {
            break;
        }
        value /= 1024.0;
        unit = u;
    }
    format!("{value:.1} {unit}")
}

/// The size limit for a session's workspace and why it is that: the
/// smallest of [`DEFAULT_LIMIT`], `resources.disk`, and half of
/// `resources.memory` (the `minimal` image keeps its files in RAM). Also the
/// size of the out disk.
pub fn limit_for(disk: u64, memory: u64) -> (u64, &'static str, &'static str) {
    let half_memory = memory / 2;
    if half_memory < DEFAULT_LIMIT.min(disk) {
        (
            half_memory,
            "half of resources.memory: the guest keeps the files in RAM",
            "raise resources.memory in the manifest",
        )
    } else if disk < DEFAULT_LIMIT {
        (
            disk,
            "resources.disk",
            "raise resources.disk in the manifest",
        )
    } else {
        (
            DEFAULT_LIMIT,
            "the default workspace limit",
            "it cannot be raised yet; copy a smaller directory",
        )
    }
}

/// What a walk of the workspace found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Regular files, directories and symlinks.
    pub entries: u64,
    /// Bytes the tar will take, about (data plus one header per entry).
    pub bytes: u64,
    /// Sockets, devices and fifos left out, relative to the root.
    pub skipped: Vec<PathBuf>,
}

/// What kind of entry a walk met.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Dir,
    File(u64),
    Symlink,
    Special,
}

fn kind_of(meta: &std::fs::Metadata) -> Kind {
    let t = meta.file_type();
    if t.is_symlink() {
        Kind::Symlink
    } else if t.is_dir() {
        Kind::Dir
    } else if t.is_file() {
        Kind::File(meta.len())
    } else {
        debug_assert!(t.is_socket() || t.is_fifo() || t.is_block_device() || t.is_char_device());
        Kind::Special
    }
}

/// Walks `root` without following symlinks, in a stable (sorted) order,
/// calling `visit(relative path, kind, metadata)` for each entry below it.
fn walk(
    root: &Path,
    visit: &mut dyn FnMut(&Path, Kind, &std::fs::Metadata) -> Result<(), WorkspaceError>,
) -> Result<(), WorkspaceError> {
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        let read = |source| WorkspaceError::Read {
            path: dir.clone(),
            source,
        };
        let mut names: Vec<_> = std::fs::read_dir(&dir)
            .map_err(read)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(read)?;
        names.sort();
        let mut subdirs = Vec::new();
        for name in names {
            let child = rel.join(&name);
            let path = root.join(&child);
            let meta = std::fs::symlink_metadata(&path).map_err(|source| WorkspaceError::Read {
                path: path.clone(),
                source,
            })?;
            let kind = kind_of(&meta);
            visit(&child, kind, &meta)?;
            if kind == Kind::Dir {
                subdirs.push(child);
            }
        }
        // Reversed onto the stack so directories come out in sorted order.
        stack.extend(subdirs.into_iter().rev());
    }
    Ok(())
}

/// Measures `root` (not following symlinks).
pub fn measure(root: &Path) -> Result<Summary, WorkspaceError> {
    let mut summary = Summary::default();
    walk(root, &mut |rel, kind, _| {
        match kind {
            Kind::Special => summary.skipped.push(rel.to_owned()),
            Kind::File(len) => {
                summary.entries += 1;
                summary.bytes += ENTRY_OVERHEAD + len.div_ceil(512) * 512;
            }
            Kind::Dir | Kind::Symlink => {
                summary.entries += 1;
                summary.bytes += ENTRY_OVERHEAD;
            }
        }
        Ok(())
    })?;
    Ok(summary)
}

/// A workspace checked and ready to be written as a disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    /// The directory, canonical.
    pub root: PathBuf,
    pub summary: Summary,
    pub limit: u64,
    /// Its git `HEAD` commit, when it is a repository with one.
    pub base: Option<String>,
}

/// Checks the workspace before anything is set up: it is a directory, it
/// fits in `limit`, and its base commit. Fails with what to do.
pub fn prepare(
    dir: &Path,
    (limit, why, fix): (u64, &'static str, &'static str),
) -> Result<Prepared, WorkspaceError> {
    let root = dir.canonicalize().map_err(|source| WorkspaceError::Read {
        path: dir.to_owned(),
        source,
    })?;
    if !root.is_dir() {
        return Err(WorkspaceError::NotADirectory { path: root });
    }
    let summary = measure(&root)?;
    if summary.bytes > limit {
        return Err(WorkspaceError::TooBig {
            path: root,
            size: summary.bytes,
            files: summary.entries,
            limit,
            why,
            fix,
        });
    }
    let dot_git = root.join(".git");
    let base = match std::fs::symlink_metadata(&dot_git) {
        Ok(m) if m.is_dir() => head_commit(&root)?,
        Ok(_) => return Err(WorkspaceError::GitFile { path: dot_git }),
        Err(_) => None,
    };
    Ok(Prepared {
        root,
        summary,
        limit,
        base,
    })
}

/// A `git` command that runs nothing but git itself: no system or global
/// config, no hooks, no fsmonitor, no prompts, no repository discovery above
/// `dir`, no pager.
pub fn host_git(dir: &Path) -> Command {
    let mut cmd = Command::new("git");
    cmd.current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_OPTIONAL_LOCKS", "0")
        .env("GIT_PAGER", "cat")
        .env_remove("GIT_DIR")
        .env_remove("GIT_WORK_TREE")
        .env_remove("GIT_INDEX_FILE")
        .env_remove("GIT_OBJECT_DIRECTORY")
        .env_remove("GIT_ALTERNATE_OBJECT_DIRECTORIES")
        .env_remove("GIT_CONFIG_PARAMETERS")
        .env_remove("GIT_CONFIG_COUNT")
        .env_remove("GIT_EXTERNAL_DIFF")
        .args([
            "-c",
            "core.hooksPath=/dev/null",
            "-c",
            "core.fsmonitor=false",
            "-c",
            "core.pager=cat",
            "-c",
            "core.quotePath=true",
        ])
        .stdin(Stdio::null());
    if let Some(parent) = dir.parent() {
        cmd.env("GIT_CEILING_DIRECTORIES", parent);
    }
    cmd
}

fn run_git(mut cmd: Command, what: &str) -> Result<std::process::Output, WorkspaceError> {
    cmd.output().map_err(|source| WorkspaceError::Git {
        what: what.to_owned(),
        source,
    })
}

/// The repository's `HEAD` commit, or `None` when it has none yet.
fn head_commit(root: &Path) -> Result<Option<String>, WorkspaceError> {
    let mut cmd = host_git(root);
    cmd.args(["rev-parse", "--verify", "-q", "HEAD^{commit}"]);
    let out = run_git(cmd, "rev-parse HEAD")?;
    if !out.status.success() {
        return Ok(None);
    }
    let id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    Ok(zerolease_protocol::message::is_commit_id(&id).then_some(id))
}

/// Pads a reader that came up short with zeros, so a file that shrank while
/// it was copied cannot misalign the archive.
struct Exactly<R> {
    inner: io::Take<R>,
    left: u64,
}

impl<R: Read> Read for Exactly<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Ok(0);
        }
        let want = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let mut n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            buf[..want].fill(0);
            n = want;
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// Writes `root` as a tar to `out`: directories, regular files (permission
/// bits only, no set-id bits, owner 0) and symlinks as symlinks; special
/// files are left out. Stops with [`WorkspaceError::TooBig`] past `limit`
/// bytes, in case the tree grew since [`prepare`] measured it.
pub fn write_tar(root: &Path, out: &mut File, limit: u64) -> Result<Summary, WorkspaceError> {
    let out_path = PathBuf::from(IN_DISK);
    let werr = |source| WorkspaceError::Write {
        path: out_path.clone(),
        source,
    };
    let mut summary = Summary::default();
    let mut builder = tar::Builder::new(&mut *out);
    builder.follow_symlinks(false);
    walk(root, &mut |rel, kind, meta| {
        let mut header = tar::Header::new_gnu();
        header.set_mtime(u64::try_from(meta.mtime()).unwrap_or(0));
        header.set_uid(0);
        header.set_gid(0);
        match kind {
            Kind::Special => {
                summary.skipped.push(rel.to_owned());
                return Ok(());
            }
            Kind::Dir => {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_mode(meta.mode() & 0o777);
                header.set_size(0);
                builder
                    .append_data(&mut header, rel, io::empty())
                    .map_err(werr)?;
                summary.bytes += ENTRY_OVERHEAD;
            }
            Kind::Symlink => {
                let path = root.join(rel);
                let target = std::fs::read_link(&path)
                    .map_err(|source| WorkspaceError::Read { path, source })?;
                header.set_entry_type(tar::EntryType::Symlink);
                header.set_mode(0o777);
                header.set_size(0);
                builder
                    .append_link(&mut header, rel, &target)
                    .map_err(werr)?;
                summary.bytes += ENTRY_OVERHEAD;
            }
            Kind::File(_) => {
                let path = root.join(rel);
                // O_NOFOLLOW: if the file was swapped for a symlink since the
                // walk saw it, fail rather than read what it points to.
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
                    .open(&path)
                    .map_err(|source| WorkspaceError::Read {
                        path: path.clone(),
                        source,
                    })?;
                let now = file.metadata().map_err(|source| WorkspaceError::Read {
                    path: path.clone(),
                    source,
                })?;
                if !now.is_file() {
                    summary.skipped.push(rel.to_owned());
                    return Ok(());
                }
                let len = now.len();
                header.set_entry_type(tar::EntryType::Regular);
                header.set_mode(meta.mode() & 0o777);
                header.set_size(len);
                let data = Exactly {
                    inner: file.take(len),
                    left: len,
                };
                builder.append_data(&mut header, rel, data).map_err(werr)?;
                summary.bytes += ENTRY_OVERHEAD + len.div_ceil(512) * 512;
            }
        }
        summary.entries += 1;
        if summary.bytes > limit {
            return Err(WorkspaceError::TooBig {
                path: root.to_owned(),
                size: summary.bytes,
                files: summary.entries,
                limit,
                why: "it grew while it was copied",
                fix: "stop what is writing into it and try again",
            });
        }
        Ok(())
    })?;
    builder.finish().map_err(werr)?;
    drop(builder);
    out.flush().map_err(werr)?;
    Ok(summary)
}

/// Creates a file in the (private) runtime directory, mode 0600, failing if
/// it exists.
fn create_private(path: &Path) -> Result<File, WorkspaceError> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
        .map_err(|source| WorkspaceError::Write {
            path: path.to_owned(),
            source,
        })
}

/// The two disk files of a session, in its runtime directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disks {
    pub input: PathBuf,
    pub output: PathBuf,
    pub output_len: u64,
}

/// Writes the workspace tar and the empty, sparse out disk into
/// `runtime_dir`. Both go when the runtime directory is removed.
pub fn write_disks(prepared: &Prepared, runtime_dir: &Path) -> Result<Disks, WorkspaceError> {
    let input = runtime_dir.join(IN_DISK);
    let mut file = create_private(&input)?;
    write_tar(&prepared.root, &mut file, prepared.limit)?;
    // A raw disk is read in 512-byte sectors; tar is made of them already,
    // but make sure it is never empty.
    let len = file
        .metadata()
        .map_err(|source| WorkspaceError::Write {
            path: input.clone(),
            source,
        })?
        .len();
    let padded = len.max(1024).div_ceil(512) * 512;
    file.set_len(padded)
        .map_err(|source| WorkspaceError::Write {
            path: input.clone(),
            source,
        })?;
    let output = runtime_dir.join(OUT_DISK);
    let out = create_private(&output)?;
    let output_len = (prepared.limit + OUT_HEADER_LEN as u64).div_ceil(512) * 512;
    out.set_len(output_len)
        .map_err(|source| WorkspaceError::Write {
            path: output.clone(),
            source,
        })?;
    Ok(Disks {
        input,
        output,
        output_len,
    })
}

impl Disks {
    /// The disks as QEMU gets them: the tar read-only, the out disk writable.
    pub fn raw_disks(&self) -> Vec<crate::vm::argv::RawDisk> {
        use zerolease_protocol::workspace::{WORKSPACE_IN_SERIAL, WORKSPACE_OUT_SERIAL};
        vec![
            crate::vm::argv::RawDisk {
                path: self.input.clone(),
                serial: WORKSPACE_IN_SERIAL.into(),
                read_only: true,
            },
            crate::vm::argv::RawDisk {
                path: self.output.clone(),
                serial: WORKSPACE_OUT_SERIAL.into(),
                read_only: false,
            },
        ]
    }
}

/// The session's workspace, if it has one (`--workspace` wins over the
/// manifest's `workspace`), checked before anything is set up.
pub fn for_session(
    manifest: &crate::manifest::Manifest,
    cli: Option<&Path>,
) -> Result<Option<Prepared>, WorkspaceError> {
    let Some(dir) = cli.or(manifest.workspace.as_deref()) else {
        return Ok(None);
    };
    let limit = limit_for(manifest.resources.disk, manifest.resources.memory);
    prepare(dir, limit).map(Some)
}

/// Tells the user (on `stderr`) what is copied in, and which special files
/// are left out.
pub fn announce(prepared: &Prepared, stderr: &mut (dyn Write + Send)) {
    let _ = writeln!(
        stderr,
        "zerolease: copying the workspace {} into the VM ({} entries, {})",
        prepared.root.display(),
        prepared.summary.entries,
        human(prepared.summary.bytes)
    );
    if !prepared.summary.skipped.is_empty() {
        let names: Vec<String> = prepared
            .summary
            .skipped
            .iter()
            .take(10)
            .map(|p| sanitize(&p.display().to_string()))
            .collect();
        let more = prepared.summary.skipped.len().saturating_sub(names.len());
        let _ = writeln!(
            stderr,
            "zerolease: left out {} special file(s) (sockets, devices, fifos): {}{}",
            prepared.summary.skipped.len(),
            names.join(", "),
            if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            }
        );
    }
}

/// Where the workspace goes in the guest: the manifest's `workdir` when it
/// is below the agent's home (`/home/<user>`), else `/home/<user>/work` —
/// never the home itself, which holds the provisioned (secret) files.
pub fn guest_path(workdir: &str, user: &str) -> String {
    let home = format!("/home/{user}");
    let workdir = workdir.trim_end_matches('/');
    match workdir.strip_prefix(&home) {
        Some(rest) if rest.len() > 1 && rest.starts_with('/') => workdir.to_owned(),
        _ => format!("{home}/work"),
    }
}

/// Adds the workspace to `Provision` and makes the agent start in it.
pub fn provision(
    provision: &mut zerolease_protocol::Provision,
    prepared: &Prepared,
    manifest: &crate::manifest::Manifest,
) {
    let path = guest_path(&manifest.workdir, &manifest.user);
    provision.workdir = path.clone();
    provision.workspace = Some(zerolease_protocol::WorkspaceSpec {
        path,
        base: prepared.base.clone(),
    });
}

/// After the agent exited: copies the result into the session's output
/// directory and tells the user (on `stderr`) where it is. A failure is
/// reported, not fatal: the agent's exit code still passes through.
pub fn finish(
    disks: &Disks,
    home: &crate::home::StateDir,
    session: &str,
    stderr: &mut (dyn Write + Send),
) -> Option<Collected> {
    match collect(&disks.output, &output_dir(home, session)) {
        Ok(c) if c.patch_len == 0 => {
            let _ = writeln!(
                stderr,
                "zerolease: the agent changed nothing in the workspace"
            );
            Some(c)
        }
        Ok(c) => {
            let _ = writeln!(
                stderr,
                "zerolease: the agent's changes ({}) are in {}; review them with \
                 `zerolease diff {session}` and apply them with `zerolease apply {session}`",
                human(c.patch_len),
                c.patch.display()
            );
            Some(c)
        }
        Err(e) => {
            let _ = writeln!(
                stderr,
                "zerolease: the workspace's changes could not be collected: {}",
                crate::session::workspace::chain(&e)
            );
            None
        }
    }
}

/// An error and its causes on one line.
pub fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    sanitize(&text)
}

/// [`write_disks`] on tokio's blocking pool, so a large workspace does not
/// stall the runtime the session's proxy runs on.
pub async fn write_disks_off_runtime(
    prepared: &Prepared,
    runtime_dir: &Path,
) -> Result<Disks, WorkspaceError> {
    let (p, dir) = (prepared.clone(), runtime_dir.to_owned());
    tokio::task::spawn_blocking(move || write_disks(&p, &dir))
        .await
        .map_err(|e| WorkspaceError::Write {
            path: runtime_dir.join(IN_DISK),
            source: io::Error::other(e.to_string()),
        })?
}

/// What came back from the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Collected {
    /// `None` when nothing changed (no bundle is written then).
    pub bundle: Option<PathBuf>,
    pub patch: PathBuf,
    pub patch_len: u64,
}

/// The directory holding a session's outputs.
pub fn output_dir(home: &crate::home::StateDir, session: &str) -> PathBuf {
    super::record::sessions_dir(home).join(session)
}

/// Copies the bundle and patch from the out disk into `dest` (created, mode
/// 0700), checking the header against the disk's real size first. The data
/// is copied, never interpreted here.
pub fn collect(out_disk: &Path, dest: &Path) -> Result<Collected, WorkspaceError> {
    let read = |source| WorkspaceError::Read {
        path: out_disk.to_owned(),
        source,
    };
    let mut disk = File::open(out_disk).map_err(read)?;
    let disk_len = disk.metadata().map_err(read)?.len();
    let mut block = [0u8; OUT_HEADER_LEN];
    disk.read_exact(&mut block).map_err(read)?;
    let header = OutHeader::decode(&block, disk_len).map_err(WorkspaceError::BadResult)?;
    if let Some(reason) = header.error {
        return Err(WorkspaceError::GuestFailed(reason));
    }
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dest)
            .map_err(|source| WorkspaceError::Write {
                path: dest.to_owned(),
                source,
            })?;
    }
    let copy = |name: &str, offset: u64, len: u64, disk: &mut File| {
        let path = dest.join(name);
        let _ = std::fs::remove_file(&path);
        let mut file = create_private(&path)?;
        disk.seek(SeekFrom::Start(offset)).map_err(read)?;
        let copied =
            io::copy(&mut disk.take(len), &mut file).map_err(|source| WorkspaceError::Write {
                path: path.clone(),
                source,
            })?;
        if copied != len {
            return Err(WorkspaceError::BadResult(OutHeaderError::TooLong {
                bundle: header.bundle_len,
                patch: header.patch_len,
                disk: disk_len,
            }));
        }
        Ok(path)
    };
    let start = OUT_HEADER_LEN as u64;
    let bundle = if header.bundle_len > 0 {
        Some(copy(BUNDLE_FILE, start, header.bundle_len, &mut disk)?)
    } else {
        let _ = std::fs::remove_file(dest.join(BUNDLE_FILE));
        None
    };
    let patch = copy(
        PATCH_FILE,
        start + header.bundle_len,
        header.patch_len,
        &mut disk,
    )?;
    Ok(Collected {
        bundle,
        patch,
        patch_len: header.patch_len,
    })
}

// ---------------------------------------------------------------------------
// Patch safety
// ---------------------------------------------------------------------------

/// Why one file's change in a patch is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    Symlink,
    /// A symlink `--allow-symlinks` did not let through.
    SymlinkOutside,
    Gitlink,
    GitDir,
    Escapes,
    OddMode(String),
    Unparsable(&'static str),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Symlink => f.write_str("creates, changes or removes a symlink"),
            Refusal::SymlinkOutside => f.write_str(
                "is a symlink that points out of the tree, into .git, or through another symlink",
            ),
            Refusal::Gitlink => f.write_str("creates or changes a submodule (gitlink)"),
            Refusal::GitDir => f.write_str("touches a path under .git/"),
            Refusal::Escapes => {
                f.write_str("has a path that is absolute, has `..` or leaves the tree")
            }
            Refusal::OddMode(m) => write!(f, "sets file mode {m}"),
            Refusal::Unparsable(why) => write!(f, "cannot be checked ({why})"),
        }
    }
}

/// One file's change in a patch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    /// The paths it names (old and new), as git would use them.
    pub paths: Vec<String>,
    /// The raw text of the section.
    pub text: Vec<u8>,
    /// Why it is refused; empty when it is safe to apply.
    pub refusals: Vec<Refusal>,
}

impl Section {
    /// The path to show for it.
    pub fn display_path(&self) -> String {
        self.paths
            .last()
            .map_or_else(|| "(unknown path)".to_owned(), |p| sanitize(p))
    }
}

/// Makes text from the guest safe to print on a terminal: control
/// characters become `\xNN`.
pub fn sanitize(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() && c != '\n' && c != '\t' {
            out.push_str(&format!("\\x{:02x}", u32::from(c)));
        } else {
            out.push(c);
        }
    }
    out
}

/// Whether `path` (relative, as in a patch) stays in the tree and out of
/// `.git`: `Ok` or the refusal.
pub fn check_path(path: &str) -> Result<(), Refusal> {
    if path.is_empty() || path.starts_with('/') || path.contains('\0') || path.contains('\\') {
        return Err(Refusal::Escapes);
    }
    for part in path.split('/') {
        match part {
            "" | "." | ".." => return Err(Refusal::Escapes),
            p if is_dot_git(p) => return Err(Refusal::GitDir),
            _ => {}
        }
    }
    Ok(())
}

/// `.git`, also as other file systems may fold it (`.GIT`, `.git.`,
/// `.git `, `git~1`).
fn is_dot_git(part: &str) -> bool {
    let lower = part.to_ascii_lowercase();
    let trimmed = lower.trim_end_matches(['.', ' ']);
    trimmed == ".git" || lower == "git~1"
}

/// Undoes git's C-style quoting of a path (`"a\tb"`, `"\303\251"`).
fn unquote(s: &str) -> Option<String> {
    let Some(inner) = s.strip_prefix('"').and_then(|s| s.strip_suffix('"')) else {
        return Some(s.to_owned());
    };
    let mut bytes = Vec::new();
    let mut it = inner.bytes().peekable();
    while let Some(b) = it.next() {
        if b != b'\\' {
            bytes.push(b);
            continue;
        }
        let e = it.next()?;
        bytes.push(match e {
            b'a' => 7,
            b'b' => 8,
            b't' => b'\t',
            b'n' => b'\n',
            b'v' => 11,
            b'f' => 12,
            b'r' => b'\r',
            b'"' => b'"',
            b'\\' => b'\\',
            b'0'..=b'3' => {
                let d2 = it.next()?;
                let d3 = it.next()?;
                if !(b'0'..=b'7').contains(&d2) || !(b'0'..=b'7').contains(&d3) {
                    return None;
                }
                (e - b'0') * 64 + (d2 - b'0') * 8 + (d3 - b'0')
            }
            _ => return None,
        });
    }
    String::from_utf8(bytes).ok()
}

/// A `a/…`/`b/…` name from a header line, without its prefix; `None` for
/// `/dev/null`.
fn strip_prefix_path(raw: &str, prefix: &str) -> Result<Option<String>, Refusal> {
    let raw = raw.trim_end_matches('\t');
    let name = unquote(raw).ok_or(Refusal::Unparsable("bad quoting"))?;
    if name == "/dev/null" {
        return Ok(None);
    }
    name.strip_prefix(prefix)
        .map(|p| Some(p.to_owned()))
        .ok_or(Refusal::Unparsable("a path without its a/ or b/ prefix"))
}

/// The names on a `diff --git a/X b/Y` line, when they can be told apart:
/// quoted names, or the same unquoted name twice (what git itself accepts).
fn git_line_names(rest: &str) -> Option<(String, String)> {
    if rest.starts_with('"') {
        // First name quoted: find its closing quote.
        let bytes = rest.as_bytes();
        let mut i = 1;
        while i < bytes.len() {
            match bytes[i] {
                b'\\' => i += 2,
                b'"' => break,
                _ => i += 1,
            }
        }
        let (a, b) = rest.split_at((i + 1).min(rest.len()));
        let a = unquote(a)?.strip_prefix("a/")?.to_owned();
        let b = unquote(b.strip_prefix(' ')?)?
            .strip_prefix("b/")?
            .to_owned();
        return Some((a, b));
    }
    let rest = rest.strip_prefix("a/")?;
    // "X b/X": the name is whatever makes both halves equal.
    let len = rest.len();
    if len < 3 || (len - 3) % 2 != 0 {
        return None;
    }
    let half = (len - 3) / 2;
    let (a, b) = (rest.get(..half)?, rest.get(half..)?);
    let b = b.strip_prefix(" b/")?;
    (a == b).then(|| (a.to_owned(), b.to_owned()))
}

fn check_mode(mode: &str, refusals: &mut Vec<Refusal>) {
    match mode {
        "100644" | "100755" => {}
        "120000" => refusals.push(Refusal::Symlink),
        "160000" => refusals.push(Refusal::Gitlink),
        other => refusals.push(Refusal::OddMode(sanitize(other))),
    }
}

/// Splits a `git diff` patch into per-file sections and checks each one. A
/// patch that does not start with `diff --git` (text before the first
/// section) gets a refused pseudo-section for that text.
pub fn check_patch(patch: &[u8]) -> Vec<Section> {
    let mut sections: Vec<Section> = Vec::new();
    let mut preamble = Vec::new();
    for line in patch.split_inclusive(|&b| b == b'\n') {
        if line.starts_with(b"diff --git ") {
            sections.push(Section {
                paths: Vec::new(),
                text: Vec::new(),
                refusals: Vec::new(),
            });
        }
        match sections.last_mut() {
            Some(s) => s.text.extend_from_slice(line),
            None => preamble.extend_from_slice(line),
        }
    }
    for s in &mut sections {
        check_section(s);
    }
    if !preamble.iter().all(u8::is_ascii_whitespace) {
        sections.insert(
            0,
            Section {
                paths: Vec::new(),
                text: preamble,
                refusals: vec![Refusal::Unparsable("text before the first file")],
            },
        );
    }
    sections
}

fn check_section(s: &mut Section) {
    let Ok(text) = std::str::from_utf8(&s.text) else {
        s.refusals
            .push(Refusal::Unparsable("a header that is not UTF-8"));
        return;
    };
    let mut paths = BTreeSet::new();
    let mut refusals = Vec::new();
    let mut lines = text.lines();
    let first = lines.next().unwrap_or("");
    let rest = first.strip_prefix("diff --git ").unwrap_or("");
    if let Some((a, b)) = git_line_names(rest) {
        paths.insert(a);
        paths.insert(b);
    }
    let mut add = |r: Result<Option<String>, Refusal>, refusals: &mut Vec<Refusal>| match r {
        Ok(Some(p)) => {
            paths.insert(p);
        }
        Ok(None) => {}
        Err(e) => refusals.push(e),
    };
    for line in lines {
        if line.starts_with("@@")
            || line.starts_with("GIT binary patch")
            || line.starts_with("Binary files ")
        {
            break;
        }
        if let Some(m) = line
            .strip_prefix("old mode ")
            .or_else(|| line.strip_prefix("new mode "))
            .or_else(|| line.strip_prefix("deleted file mode "))
            .or_else(|| line.strip_prefix("new file mode "))
        {
            check_mode(m.trim_end(), &mut refusals);
        } else if let Some(idx) = line.strip_prefix("index ") {
            // `index abc..def 100644`: the mode, if present, counts too.
            if let Some((_, m)) = idx.split_once(' ') {
                check_mode(m.trim_end(), &mut refusals);
            }
        } else if let Some(p) = line.strip_prefix("--- ") {
            add(strip_prefix_path(p, "a/"), &mut refusals);
        } else if let Some(p) = line.strip_prefix("+++ ") {
            add(strip_prefix_path(p, "b/"), &mut refusals);
        } else if let Some(p) = line
            .strip_prefix("rename from ")
            .or_else(|| line.strip_prefix("rename to "))
            .or_else(|| line.strip_prefix("copy from "))
            .or_else(|| line.strip_prefix("copy to "))
        {
            add(
                unquote(p)
                    .map(Some)
                    .ok_or(Refusal::Unparsable("bad quoting")),
                &mut refusals,
            );
        } else if line.starts_with("similarity index ") || line.starts_with("dissimilarity index ")
        {
        } else {
            refusals.push(Refusal::Unparsable("an unknown header line"));
        }
    }
    if paths.is_empty() {
        refusals.push(Refusal::Unparsable("no path found"));
    }
    for p in &paths {
        if let Err(r) = check_path(p) {
            refusals.push(r);
        }
    }
    refusals.dedup();
    s.paths = paths.into_iter().collect();
    s.refusals = refusals;
}

/// The sections of `sections` that are safe, as one patch.
pub fn safe_patch(sections: &[Section]) -> Vec<u8> {
    sections
        .iter()
        .filter(|s| s.refusals.is_empty())
        .flat_map(|s| s.text.iter().copied())
        .collect()
}

/// Cross-checks a patch with git's own reading of it (`git apply --numstat
/// -z`, which only parses): every path git would touch must pass
/// [`check_path`], and git must see as many files as [`check_patch`] did.
/// Catches any disagreement between the two parsers.
pub fn git_agrees(patch: &Path, expected_files: usize) -> Result<(), WorkspaceError> {
    let scratch = tempfile_dir()?;
    let mut cmd = host_git(scratch.path());
    cmd.args(["apply", "--numstat", "-z"]).arg(patch);
    let out = run_git(cmd, "apply --numstat")?;
    if !out.status.success() {
        return Err(WorkspaceError::GitFailed {
            what: "apply --numstat".into(),
            stderr: sanitize(String::from_utf8_lossy(&out.stderr).trim()),
        });
    }
    let mut files = 0usize;
    let mut fields = out.stdout.split(|&b| b == 0).peekable();
    while let Some(record) = fields.next() {
        if record.is_empty() {
            continue;
        }
        files += 1;
        // `added\tdeleted\tpath` or, for a rename or copy,
        // `added\tdeleted\t` followed by two NUL-terminated paths.
        let mut parts = record.splitn(3, |&b| b == b'\t');
        let (_, _, path) = (parts.next(), parts.next(), parts.next().unwrap_or(b""));
        let mut paths = Vec::new();
        if path.is_empty() {
            paths.push(fields.next().unwrap_or(b""));
            paths.push(fields.next().unwrap_or(b""));
        } else {
            paths.push(path);
        }
        for p in paths {
            let text = String::from_utf8_lossy(p);
            if let Err(r) = check_path(&text) {
                return Err(WorkspaceError::GitFailed {
                    what: "the patch check".into(),
                    stderr: format!("git reads path `{}`, which {r}", sanitize(&text)),
                });
            }
        }
    }
    if files != expected_files {
        return Err(WorkspaceError::GitFailed {
            what: "the patch check".into(),
            stderr: format!(
                "git reads {files} file(s) in the patch where zerolease read {expected_files}; refusing it"
            ),
        });
    }
    Ok(())
}

fn tempfile_dir() -> Result<TempDir, WorkspaceError> {
    TempDir::new()
}

/// A private scratch directory, removed on drop (no repository in it, so
/// host git treats a patch as plain data there).
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new() -> Result<TempDir, WorkspaceError> {
        use std::os::unix::fs::DirBuilderExt;
        let name = format!(
            "zerolease-ws-{}-{}",
            std::process::id(),
            crate::vault::crypto::random_hex(6).unwrap_or_else(|_| "x".into())
        );
        let path = std::env::temp_dir().join(name);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(|source| WorkspaceError::Write {
                path: path.clone(),
                source,
            })?;
        Ok(TempDir(path))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Properties of [`check_patch`] and [`OutHeader::decode`] on arbitrary
/// bytes, beyond "does not panic"; the fuzz target `workspace_result`, a
/// proptest and the seed-corpus test call this. Panics when one fails.
pub fn check_result_properties(data: &[u8]) {
    // The header: lengths that fit the "disk", and a round trip.
    if let Ok(header) = OutHeader::decode(data, data.len() as u64) {
        let total = header.bundle_len + header.patch_len + OUT_HEADER_LEN as u64;
        assert!(total <= data.len() as u64, "{header:?} does not fit");
        if header.error.is_some() {
            assert_eq!((header.bundle_len, header.patch_len), (0, 0));
        }
        assert_eq!(
            OutHeader::decode(&header.encode(), data.len() as u64).as_ref(),
            Ok(&header)
        );
    }
    // The patch: every section but a refused preamble starts a file; a
    // section let through names paths and every one passes `check_path`;
    // the safe patch re-checks as safe, section for section.
    let sections = check_patch(data);
    for (i, s) in sections.iter().enumerate() {
        if s.refusals.is_empty() {
            assert!(s.text.starts_with(b"diff --git "));
            assert!(!s.paths.is_empty());
            for p in &s.paths {
                assert_eq!(check_path(p), Ok(()), "{p:?} let through");
            }
        } else if !s.text.starts_with(b"diff --git ") {
            assert_eq!(i, 0, "a preamble that is not first");
        }
    }
    let safe = safe_patch(&sections);
    let again = check_patch(&safe);
    assert_eq!(
        again.len(),
        sections.iter().filter(|s| s.refusals.is_empty()).count()
    );
    assert!(again.iter().all(|s| s.refusals.is_empty()));
}

/// Whether a symlink at `link` (a checked path) pointing at `target` stays
/// in the tree: a relative target whose components, taken from the link's
/// directory, never climb above the root and never name `.git`.
pub fn symlink_target_in_tree(link: &str, target: &str) -> bool {
    if target.is_empty() || target.starts_with('/') || target.contains(['\0', '\\']) {
        return false;
    }
    let mut at: Vec<&str> = link.split('/').collect();
    at.pop();
    for part in target.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if at.pop().is_none() {
                    return false;
                }
            }
            p if is_dot_git(p) => return false,
            p => at.push(p),
        }
    }
    true
}

/// For a section refused only because it is a symlink change: the link's
/// path and its new target (`None` when the link is removed). `None` for
/// anything else (renames, binary patches, several `+` lines).
fn symlink_change(section: &Section) -> Option<(String, Option<String>)> {
    if section.refusals != [Refusal::Symlink] || section.paths.len() != 1 {
        return None;
    }
    let text = std::str::from_utf8(&section.text).ok()?;
    let mut in_hunk = false;
    let mut deleted = false;
    let mut added = Vec::new();
    for line in text.lines().skip(1) {
        if !in_hunk {
            if line.starts_with("GIT binary patch") || line.starts_with("Binary files ") {
                return None;
            }
            if line.starts_with("deleted file mode ") {
                deleted = true;
            }
            in_hunk = line.starts_with("@@");
            continue;
        }
        if let Some(t) = line.strip_prefix('+') {
            added.push(t);
        } else if line.starts_with("@@") {
            return None;
        }
    }
    let link = section.paths[0].clone();
    match (deleted, added.as_slice()) {
        (true, []) => Some((link, None)),
        (false, [target]) => Some((link, Some((*target).to_owned()))),
        _ => None,
    }
}

/// Whether `section`, a symlink change, may be applied to `to` under
/// `--allow-symlinks`: the target stays in the tree and no directory on the
/// way to it is a symlink, neither one already in `to` nor one the patch
/// creates (`links`).
fn symlink_allowed(section: &Section, to: &Path, links: &BTreeSet<String>) -> bool {
    let Some((link, target)) = symlink_change(section) else {
        return false;
    };
    let Some(target) = target else {
        return true;
    };
    if !symlink_target_in_tree(&link, &target) {
        return false;
    }
    // Every prefix of the resolved target, as a tree path.
    let mut at: Vec<&str> = link.split('/').collect();
    at.pop();
    for part in target.split('/') {
        match part {
            "" | "." => continue,
            ".." => {
                at.pop();
                continue;
            }
            p => at.push(p),
        }
        let prefix = at.join("/");
        if links.contains(&prefix)
            || std::fs::symlink_metadata(to.join(&prefix)).is_ok_and(|m| m.file_type().is_symlink())
        {
            return false;
        }
    }
    true
}

/// What `apply` did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Applied {
    pub to: PathBuf,
    /// Paths whose changes were applied.
    pub applied: Vec<String>,
    /// Paths whose changes were refused, with why.
    pub refused: Vec<(String, String)>,
}

/// Why `apply` did nothing.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Workspace(#[from] WorkspaceError),
    #[error(
        "the patch has {} change(s) zerolease will not apply:\n{}\nnothing was applied; \
         rerun with --skip-unsafe to apply the other changes without these \
         (--allow-symlinks lets symlinks that stay in the tree through)",
        .0.len(),
        .0.iter().map(|(p, r)| format!("  {p}: {r}")).collect::<Vec<_>>().join("\n")
    )]
    Unsafe(Vec<(String, String)>),
    #[error("the patch does not apply to {}: {stderr}", to.display())]
    DoesNotApply { to: PathBuf, stderr: String },
}

/// How `apply` treats refused changes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApplyOptions {
    /// Apply the safe changes and report the refused ones, instead of
    /// refusing the whole patch.
    pub skip_unsafe: bool,
    /// Let symlinks whose targets stay in the tree through
    /// ([`symlink_target_in_tree`], and not through another symlink).
    pub allow_symlinks: bool,
}

/// Applies a session's patch to `to` with host git (working tree only): the
/// patch is checked first ([`check_patch`], [`git_agrees`]); unsafe
/// sections make it refuse everything unless `skip_unsafe`, which applies
/// the rest and reports them. `git apply --check` runs first, so a patch
/// that does not apply changes nothing.
pub fn apply(patch: &[u8], to: &Path, options: ApplyOptions) -> Result<Applied, ApplyError> {
    let mut sections = check_patch(patch);
    if options.allow_symlinks {
        let links: BTreeSet<String> = sections
            .iter()
            .filter_map(symlink_change)
            .map(|(link, _)| link)
            .collect();
        let allowed: Vec<bool> = sections
            .iter()
            .map(|s| symlink_allowed(s, to, &links))
            .collect();
        for (s, ok) in sections.iter_mut().zip(allowed) {
            if ok {
                s.refusals.clear();
            } else if s.refusals == [Refusal::Symlink] {
                s.refusals = vec![Refusal::SymlinkOutside];
            }
        }
    }
    let refused: Vec<(String, String)> = sections
        .iter()
        .filter(|s| !s.refusals.is_empty())
        .map(|s| {
            let why = s
                .refusals
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ");
            (s.display_path(), why)
        })
        .collect();
    if !refused.is_empty() && !options.skip_unsafe {
        return Err(ApplyError::Unsafe(refused));
    }
    let safe: Vec<&Section> = sections.iter().filter(|s| s.refusals.is_empty()).collect();
    let applied: Vec<String> = safe.iter().map(|s| s.display_path()).collect();
    if safe.is_empty() {
        return Ok(Applied {
            to: to.to_owned(),
            applied,
            refused,
        });
    }
    let scratch = TempDir::new()?;
    let file = scratch.path().join("safe.patch");
    std::fs::write(&file, safe_patch(&sections)).map_err(|source| WorkspaceError::Write {
        path: file.clone(),
        source,
    })?;
    git_agrees(&file, safe.len())?;
    for check in [true, false] {
        let mut cmd = host_git(to);
        cmd.args(["apply", "--whitespace=nowarn"]);
        if check {
            cmd.arg("--check");
        }
        cmd.arg(&file);
        let out = run_git(cmd, "apply")?;
        if !out.status.success() {
            return Err(ApplyError::DoesNotApply {
                to: to.to_owned(),
                stderr: sanitize(String::from_utf8_lossy(&out.stderr).trim()),
            });
        }
    }
    Ok(Applied {
        to: to.to_owned(),
        applied,
        refused,
    })
}

/// `git apply --stat --summary` of a patch (parse only, outside any
/// repository), made safe to print.
pub fn stat(patch: &Path) -> Result<String, WorkspaceError> {
    let scratch = TempDir::new()?;
    let mut cmd = host_git(scratch.path());
    cmd.args(["apply", "--stat", "--summary"]).arg(patch);
    let out = run_git(cmd, "apply --stat")?;
    if !out.status.success() {
        return Err(WorkspaceError::GitFailed {
            what: "apply --stat".into(),
            stderr: sanitize(String::from_utf8_lossy(&out.stderr).trim()),
        });
    }
    Ok(sanitize(&String::from_utf8_lossy(&out.stdout)))
}

#[cfg(test)]
mod tests;
