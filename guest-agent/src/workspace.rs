//! The workspace in the guest: extracted from the host's read-only tar disk
//! before the agent starts, and turned into a git bundle and a patch on the
//! out disk after it exits.
//!
//! **Invariants:**
//! - Extraction runs on a thread whose filesystem uid and gid are the agent
//!   user's (`setfsuid`/`setfsgid`), so it can do nothing the agent could
//!   not, and everything it creates is the agent's. Each entry's path must be
//!   relative with only normal components (no `/…`, `..`, `.`); every parent
//!   must be a real directory (never a symlink: nothing is written through
//!   one); files are created `O_CREAT | O_EXCL | O_NOFOLLOW`; modes keep
//!   only permission bits (no set-id, no sticky); symlinks are created as
//!   symlinks and never followed; hard links, devices and fifos are refused.
//! - git runs as the agent user with hooks and fsmonitor off, no system or
//!   global config, and the repository's `.git/config` put back as the host
//!   sent it before anything is committed, so what the agent planted in
//!   `.git/` does not run. Whatever it does run, runs unprivileged, in the
//!   guest, and the host treats the result as untrusted anyway.
//! - The result is written to the out disk and synced before `Exited` is
//!   sent; a failure is written into the header, never silently dropped.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Stdio};

use zerolease_protocol::WorkspaceSpec;
use zerolease_protocol::workspace::{
    OUT_HEADER_LEN, OutHeader, WORKSPACE_IN_SERIAL, WORKSPACE_OUT_SERIAL,
};

use crate::passwd::User;
use crate::provision::Layout;

/// Largest `.git/config` kept to restore (a bigger one is not restored:
/// the commit then fails closed).
const MAX_CONFIG: u64 = 1 << 20;

/// Why the workspace could not be set up or collected.
#[derive(Debug, thiserror::Error)]
pub enum WorkspaceError {
    /// No disk with the serial.
    #[error("no disk with serial `{serial}` under /sys/block")]
    NoDisk {
        /// The serial looked for.
        serial: &'static str,
    },
    /// The workspace would cover the agent's home.
    #[error("the workspace path {path} must be below the agent's home {home}, not it or above it")]
    CoversHome {
        /// The workspace path.
        path: String,
        /// The home.
        home: String,
    },
    /// An entry of the tar is refused.
    #[error("refusing tar entry {path:?}: {reason}")]
    Refused {
        /// The entry's path, lossily.
        path: String,
        /// Why.
        reason: &'static str,
    },
    /// Reading the tar or writing the tree failed.
    #[error("cannot {action} {}", path.display())]
    Io {
        /// What.
        action: &'static str,
        /// On which path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Switching the extraction thread to the agent's uid failed.
    #[error("cannot act as uid {uid} for the extraction")]
    Fsuid {
        /// The uid.
        uid: u32,
    },
    /// A git command failed.
    #[error("git {what} failed: {stderr}")]
    Git {
        /// Which command.
        what: String,
        /// Its error output, one line, bounded.
        stderr: String,
    },
    /// The result does not fit in the out disk.
    #[error("the result is larger than the out disk ({limit} bytes)")]
    TooLarge {
        /// Room on the disk.
        limit: u64,
    },
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> WorkspaceError {
    let path = path.to_owned();
    move |source| WorkspaceError::Io {
        action,
        path,
        source,
    }
}

/// Finds the block device whose `serial` is `serial`: `/dev/<name>` for the
/// `<sys_block>/<name>/serial` that matches.
pub fn find_disk(layout: &Layout, serial: &'static str) -> Result<PathBuf, WorkspaceError> {
    let sys = layout.host_path("/sys/block");
    let entries = std::fs::read_dir(&sys).map_err(io_err("list", &sys))?;
    for entry in entries.flatten() {
        let Ok(text) = std::fs::read_to_string(entry.path().join("serial")) else {
            continue;
        };
        if text.trim_end_matches(['\n', '\0', ' ']) == serial {
            return Ok(layout.host_path("/dev").join(entry.file_name()));
        }
    }
    Err(WorkspaceError::NoDisk { serial })
}

/// Runs `f` on a thread whose filesystem uid/gid are `uid`/`gid` (Linux
/// keeps them per thread), unless that is already this process's euid.
fn as_user<T: Send>(
    uid: u32,
    gid: u32,
    f: impl FnOnce() -> Result<T, WorkspaceError> + Send,
) -> Result<T, WorkspaceError> {
    use nix::unistd::{Gid, Uid, geteuid, setfsgid, setfsuid};
    if geteuid().as_raw() == uid {
        return f();
    }
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // Group first: after the uid switch the thread lacks the
                // capability to change it. setfs*id report failure only by
                // leaving the id unchanged, so read it back (an invalid id
                // changes nothing and returns the current one).
                setfsgid(Gid::from_raw(gid));
                setfsuid(Uid::from_raw(uid));
                if setfsuid(Uid::from_raw(u32::MAX)).as_raw() != uid
                    || setfsgid(Gid::from_raw(u32::MAX)).as_raw() != gid
                {
                    return Err(WorkspaceError::Fsuid { uid });
                }
                f()
            })
            .join()
            .unwrap_or(Err(WorkspaceError::Fsuid { uid }))
    })
}

/// Checks an entry's path: relative, normal components only. Returns the
/// components.
pub fn entry_components(path: &Path) -> Result<Vec<&std::ffi::OsStr>, &'static str> {
    let mut parts = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => parts.push(p),
            Component::CurDir => return Err("it has a `.` component"),
            Component::ParentDir => return Err("it has a `..` component"),
            Component::RootDir | Component::Prefix(_) => return Err("it is absolute"),
        }
    }
    if parts.is_empty() {
        return Err("it is empty");
    }
    Ok(parts)
}

/// Makes sure every parent of `dest/parts` is a real directory (creating
/// missing ones), never a symlink.
fn real_parents(dest: &Path, parts: &[&std::ffi::OsStr]) -> Result<PathBuf, WorkspaceError> {
    let mut dir = dest.to_owned();
    for part in &parts[..parts.len() - 1] {
        dir.push(part);
        match std::fs::symlink_metadata(&dir) {
            Ok(m) if m.file_type().is_dir() => {}
            Ok(_) => {
                return Err(WorkspaceError::Refused {
                    path: dir.display().to_string(),
                    reason: "a parent is not a directory (a symlink is never followed)",
                });
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                std::fs::create_dir(&dir).map_err(io_err("create", &dir))?;
            }
            Err(e) => return Err(io_err("inspect", &dir)(e)),
        }
    }
    Ok(dest.join(parts.iter().collect::<PathBuf>()))
}

/// Extracts the tar `archive` into the existing directory `dest` with the
/// checks of the module's invariants; returns the number of entries.
pub fn extract<R: Read>(archive: R, dest: &Path) -> Result<u64, WorkspaceError> {
    let mut archive = tar::Archive::new(archive);
    let mut count = 0;
    let mut dirs: Vec<(PathBuf, u32)> = Vec::new();
    let entries = archive.entries().map_err(io_err("read the tar on", dest))?;
    for entry in entries {
        let mut entry = entry.map_err(io_err("read the tar for", dest))?;
        let raw = entry
            .path()
            .map_err(io_err("read a tar path for", dest))?
            .into_owned();
        let refuse = |reason| WorkspaceError::Refused {
            path: raw.display().to_string(),
            reason,
        };
        let kind = entry.header().entry_type();
        if matches!(
            kind,
            tar::EntryType::XGlobalHeader | tar::EntryType::XHeader
        ) {
            continue;
        }
        let parts = entry_components(&raw).map_err(refuse)?;
        let target = real_parents(dest, &parts)?;
        let mode = entry
            .header()
            .mode()
            .map_err(io_err("read a mode in", dest))?
            & 0o777;
        match kind {
            tar::EntryType::Directory => {
                match std::fs::symlink_metadata(&target) {
                    Ok(m) if m.file_type().is_dir() => {}
                    Ok(_) => return Err(refuse("a directory entry over a non-directory")),
                    Err(_) => std::fs::create_dir(&target).map_err(io_err("create", &target))?,
                }
                dirs.push((target, mode | 0o700));
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let mut file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(nix::libc::O_NOFOLLOW)
                    .open(&target)
                    .map_err(io_err("create", &target))?;
                io::copy(&mut entry, &mut file).map_err(io_err("write", &target))?;
                file.set_permissions(std::fs::Permissions::from_mode(mode))
                    .map_err(io_err("set the mode of", &target))?;
            }
            tar::EntryType::Symlink => {
                let link = entry
                    .link_name()
                    .map_err(io_err("read a link target for", &target))?
                    .ok_or_else(|| refuse("a symlink without a target"))?;
                std::os::unix::fs::symlink(&*link, &target)
                    .map_err(io_err("create the symlink", &target))?;
            }
            tar::EntryType::Link => return Err(refuse("hard links are not extracted")),
            tar::EntryType::Char | tar::EntryType::Block => {
                return Err(refuse("device nodes are not extracted"));
            }
            tar::EntryType::Fifo => return Err(refuse("fifos are not extracted")),
            _ => return Err(refuse("an unsupported entry type")),
        }
        count += 1;
    }
    // Modes of directories last, deepest first, so a read-only directory
    // does not stop its own contents.
    for (dir, mode) in dirs.into_iter().rev() {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode))
            .map_err(io_err("set the mode of", &dir))?;
    }
    Ok(count)
}

/// The workspace after it was set up.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The workspace directory (a path on this machine).
    pub dir: PathBuf,
    /// The host's base commit, if it sent one.
    pub base: Option<String>,
    /// The commit the agent's changes are measured from: the workspace as it
    /// was copied in.
    pub start: String,
    /// The out disk.
    pub out_disk: PathBuf,
    /// The agent user.
    pub uid: u32,
    /// The agent user's group.
    pub gid: u32,
    /// `.git/config` as the host sent it, restored before committing.
    pub config: Option<Vec<u8>>,
}

/// A git command as the agent user in `dir`, with nothing of the
/// repository's or system's hooks and helpers that could be avoided.
fn git(dir: &Path, uid: u32, gid: u32) -> Command {
    let mut cmd = Command::new("git");
    cmd.current_dir(dir)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("HOME", "/nonexistent")
        .env("LANG", "C")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_AUTHOR_DATE", "1970-01-01T00:00:00Z")
        .env("GIT_COMMITTER_DATE", "1970-01-01T00:00:00Z")
        .args([
            "-c",
            "core.hooksPath=/dev/null",
            "-c",
            "core.fsmonitor=false",
            "-c",
            "core.untrackedCache=false",
            "-c",
            "commit.gpgSign=false",
            "-c",
            "gc.auto=0",
            "-c",
            "maintenance.auto=false",
            "-c",
            "user.name=zerolease",
            "-c",
            "user.email=zerolease@localhost",
            "-c",
            "init.defaultBranch=main",
            "-c",
            "safe.directory=*",
        ])
        .stdin(Stdio::null());
    if nix::unistd::geteuid().as_raw() != uid {
        cmd.uid(uid).gid(gid);
    }
    cmd
}

/// Runs `cmd`, returning its stdout, or its stderr as the error.
fn run(mut cmd: Command, what: &str) -> Result<Vec<u8>, WorkspaceError> {
    let _turn = reaper_turn();
    let out = cmd.output().map_err(|e| WorkspaceError::Git {
        what: what.to_owned(),
        stderr: e.to_string(),
    })?;
    if !out.status.success() {
        let mut text: String = String::from_utf8_lossy(&out.stderr)
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        let mut cut = text.len().min(300);
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        return Err(WorkspaceError::Git {
            what: what.to_owned(),
            stderr: text.trim().to_owned(),
        });
    }
    Ok(out.stdout)
}

/// Keeps PID 1's orphan reaper from taking our git child's exit status.
fn reaper_turn() -> std::sync::MutexGuard<'static, ()> {
    crate::run::REAPER
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn one_line(out: Vec<u8>) -> String {
    String::from_utf8_lossy(&out).trim().to_owned()
}

/// The guest path the workspace goes to must be strictly below the home, so
/// provisioned files (which hold secrets) are never part of it.
pub fn check_path(path: &str, home: &str) -> Result<(), WorkspaceError> {
    let home = home.trim_end_matches('/');
    let below = path
        .strip_prefix(home)
        .is_some_and(|rest| rest.starts_with('/') && rest.len() > 1);
    if below {
        Ok(())
    } else {
        Err(WorkspaceError::CoversHome {
            path: path.to_owned(),
            home: home.to_owned(),
        })
    }
}

/// Sets up the workspace: finds the disks, extracts the tar into
/// `spec.path` as `user`, and records the starting commit (creating a
/// repository with a base commit if the workspace is not one).
pub fn prepare(
    layout: &Layout,
    spec: &WorkspaceSpec,
    user: &User,
) -> Result<Prepared, WorkspaceError> {
    check_path(&spec.path, &user.home)?;
    let input = find_disk(layout, WORKSPACE_IN_SERIAL)?;
    let out_disk = find_disk(layout, WORKSPACE_OUT_SERIAL)?;
    prepare_from(layout, spec, user, &input, out_disk)
}

/// [`prepare`] with the disks given (tests use plain files).
pub fn prepare_from(
    layout: &Layout,
    spec: &WorkspaceSpec,
    user: &User,
    input: &Path,
    out_disk: PathBuf,
) -> Result<Prepared, WorkspaceError> {
    let (uid, gid) = (user.uid, user.gid);
    let dir = layout.host_path(&spec.path);
    // The parents as root (the workdir may be outside the home), the
    // directory itself the agent's and empty.
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent).map_err(io_err("create", parent))?;
    }
    match std::fs::create_dir(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            let empty = std::fs::symlink_metadata(&dir).is_ok_and(|m| m.is_dir())
                && std::fs::read_dir(&dir).is_ok_and(|mut d| d.next().is_none());
            if !empty {
                return Err(WorkspaceError::Refused {
                    path: spec.path.clone(),
                    reason: "the workspace directory exists and is not empty",
                });
            }
        }
        Err(e) => return Err(io_err("create", &dir)(e)),
    }
    std::os::unix::fs::lchown(&dir, Some(uid), Some(gid)).map_err(io_err("chown", &dir))?;
    let tar = File::open(input).map_err(io_err("open", input))?;
    let target = dir.clone();
    as_user(uid, gid, move || extract(io::BufReader::new(tar), &target))?;

    let dot_git = dir.join(".git");
    let is_repo = std::fs::symlink_metadata(&dot_git).is_ok_and(|m| m.is_dir());
    let start = if is_repo {
        snapshot(&dir, uid, gid)?
    } else {
        let mut init = git(&dir, uid, gid);
        init.args(["init", "-q"]);
        run(init, "init")?;
        let mut add = git(&dir, uid, gid);
        add.args(["add", "-A"]);
        run(add, "add")?;
        let mut commit = git(&dir, uid, gid);
        commit.args([
            "commit",
            "-q",
            "--no-verify",
            "--allow-empty",
            "-m",
            "zerolease: the workspace as copied",
        ]);
        run(commit, "commit")?;
        rev_parse(&dir, uid, gid, "HEAD")?
    };
    if let Some(base) = &spec.base {
        let found = rev_parse(&dir, uid, gid, &format!("{base}^{{commit}}"))?;
        if &found != base {
            return Err(WorkspaceError::Git {
                what: "rev-parse".into(),
                stderr: "the base commit is not in the copied repository".into(),
            });
        }
    }
    let mut keep = git(&dir, uid, gid);
    keep.args(["update-ref", "refs/zerolease/start", &start]);
    run(keep, "update-ref")?;
    let config_path = dot_git.join("config");
    let config = as_user(uid, gid, || Ok(read_bounded(&config_path)))?;
    Ok(Prepared {
        dir,
        base: spec.base.clone(),
        start,
        out_disk,
        uid,
        gid,
        config,
    })
}

fn read_bounded(path: &Path) -> Option<Vec<u8>> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
        .ok()?;
    let mut data = Vec::new();
    file.take(MAX_CONFIG + 1).read_to_end(&mut data).ok()?;
    (data.len() as u64 <= MAX_CONFIG).then_some(data)
}

fn rev_parse(dir: &Path, uid: u32, gid: u32, what: &str) -> Result<String, WorkspaceError> {
    let mut cmd = git(dir, uid, gid);
    cmd.args(["rev-parse", "--verify", "-q", what]);
    let id = one_line(run(cmd, "rev-parse")?);
    if zerolease_protocol::message::is_commit_id(&id) {
        Ok(id)
    } else {
        Err(WorkspaceError::Git {
            what: "rev-parse".into(),
            stderr: "not a commit id".into(),
        })
    }
}

/// A commit of the working tree as it is (tracked and untracked, not
/// ignored), on top of `HEAD` when there is one, made through a temporary
/// index so neither `HEAD` nor the index move.
fn snapshot(dir: &Path, uid: u32, gid: u32) -> Result<String, WorkspaceError> {
    let index = dir.join(".git/zerolease-snapshot-index");
    let _ = std::fs::remove_file(&index);
    let head = rev_parse(dir, uid, gid, "HEAD^{commit}").ok();
    let with_index = |args: &[&str], what: &str| {
        let mut cmd = git(dir, uid, gid);
        cmd.env("GIT_INDEX_FILE", &index).args(args);
        run(cmd, what)
    };
    if head.is_some() {
        with_index(&["read-tree", "HEAD"], "read-tree")?;
    }
    with_index(&["add", "-A"], "add")?;
    let tree = one_line(with_index(&["write-tree"], "write-tree")?);
    let _ = std::fs::remove_file(&index);
    let mut cmd = git(dir, uid, gid);
    cmd.args([
        "commit-tree",
        &tree,
        "-m",
        "zerolease: the workspace as copied",
    ]);
    if let Some(h) = &head {
        cmd.args(["-p", h]);
    }
    let id = one_line(run(cmd, "commit-tree")?);
    if zerolease_protocol::message::is_commit_id(&id) {
        Ok(id)
    } else {
        Err(WorkspaceError::Git {
            what: "commit-tree".into(),
            stderr: "not a commit id".into(),
        })
    }
}

/// Puts `.git/config` back as the host sent it (as the agent user: a
/// replaced `.git` leads nowhere the agent could not write itself).
fn restore_config(p: &Prepared) -> Result<(), WorkspaceError> {
    let Some(config) = p.config.clone() else {
        return Ok(());
    };
    let path = p.dir.join(".git/config");
    as_user(p.uid, p.gid, move || {
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("remove", &path)(e)),
        }
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&path)
            .map_err(io_err("create", &path))?;
        file.write_all(&config).map_err(io_err("write", &path))
    })
}

/// Commits what the agent changed, and returns the final commit.
fn commit_changes(p: &Prepared) -> Result<String, WorkspaceError> {
    restore_config(p)?;
    let (dir, uid, gid) = (&p.dir, p.uid, p.gid);
    let mut add = git(dir, uid, gid);
    add.args(["add", "-A"]);
    run(add, "add")?;
    let mut staged = git(dir, uid, gid);
    staged.args(["diff", "--cached", "--quiet", "--no-ext-diff"]);
    let turn = reaper_turn();
    let changed = !staged
        .status()
        .map_err(|e| WorkspaceError::Git {
            what: "diff --cached".into(),
            stderr: e.to_string(),
        })?
        .success();
    drop(turn);
    if changed {
        let mut commit = git(dir, uid, gid);
        commit.args([
            "commit",
            "-q",
            "--no-verify",
            "-m",
            "zerolease: the agent's changes",
        ]);
        run(commit, "commit")?;
    }
    rev_parse(dir, uid, gid, "HEAD^{commit}")
}

/// Streams `cmd`'s stdout to `disk` at its current position, at most
/// `room` bytes; returns how many were written.
fn stream(mut cmd: Command, what: &str, disk: &mut File, room: u64) -> Result<u64, WorkspaceError> {
    cmd.stdout(Stdio::piped()).stderr(Stdio::null());
    let _turn = reaper_turn();
    let mut child = cmd.spawn().map_err(|e| WorkspaceError::Git {
        what: what.to_owned(),
        stderr: e.to_string(),
    })?;
    let mut stdout = child.stdout.take().ok_or_else(|| WorkspaceError::Git {
        what: what.to_owned(),
        stderr: "no output pipe".into(),
    })?;
    let copied = io::copy(&mut (&mut stdout).take(room + 1), disk);
    drop(stdout);
    let status = child.wait();
    let copied = copied.map_err(io_err("write the out disk", Path::new("out")))?;
    if copied > room {
        let _ = child.kill();
        return Err(WorkspaceError::TooLarge { limit: room });
    }
    match status {
        Ok(s) if s.success() => Ok(copied),
        _ => Err(WorkspaceError::Git {
            what: what.to_owned(),
            stderr: format!("exit status {status:?}"),
        }),
    }
}

/// Commits the agent's changes and writes the bundle and patch to the out
/// disk, header last, synced. A failure goes into the header; the error is
/// returned too, for the console.
pub fn finish(p: &Prepared) -> Result<OutHeader, WorkspaceError> {
    let mut disk = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&p.out_disk)
        .map_err(io_err("open", &p.out_disk))?;
    let result = write_result(p, &mut disk);
    let header = match &result {
        Ok(h) => h.clone(),
        Err(e) => OutHeader {
            bundle_len: 0,
            patch_len: 0,
            error: Some(crate::error_chain(e)),
        },
    };
    disk.seek(SeekFrom::Start(0))
        .and_then(|_| disk.write_all(&header.encode()))
        .and_then(|()| disk.sync_all())
        .map_err(io_err("write the header of", &p.out_disk))?;
    result
}

fn write_result(p: &Prepared, disk: &mut File) -> Result<OutHeader, WorkspaceError> {
    let size = disk
        .seek(SeekFrom::End(0))
        .map_err(io_err("size", &p.out_disk))?;
    let room = size.saturating_sub(OUT_HEADER_LEN as u64);
    let head = commit_changes(p)?;
    let (dir, uid, gid) = (&p.dir, p.uid, p.gid);
    disk.seek(SeekFrom::Start(OUT_HEADER_LEN as u64))
        .map_err(io_err("seek", &p.out_disk))?;
    let unchanged = match &p.base {
        Some(base) => *base == head,
        None => head == p.start,
    };
    let bundle_len = if unchanged {
        0
    } else {
        let mut update = git(dir, uid, gid);
        update.args(["update-ref", "refs/zerolease/result", &head]);
        run(update, "update-ref")?;
        let mut bundle = git(dir, uid, gid);
        bundle.args(["bundle", "create", "-q", "-", "refs/zerolease/result"]);
        if let Some(base) = &p.base
            && base != &head
        {
            bundle.arg(format!("^{base}"));
        }
        stream(bundle, "bundle create", disk, room)?
    };
    let mut diff = git(dir, uid, gid);
    diff.args([
        "diff",
        "--binary",
        "--full-index",
        "--no-color",
        "--no-ext-diff",
        "--no-textconv",
        "--no-renames",
        "--src-prefix=a/",
        "--dst-prefix=b/",
        &p.start,
        &head,
    ]);
    let patch_len = stream(diff, "diff", disk, room - bundle_len)?;
    disk.sync_all().map_err(io_err("sync", &p.out_disk))?;
    Ok(OutHeader {
        bundle_len,
        patch_len,
        error: None,
    })
}

#[cfg(test)]
mod tests;
