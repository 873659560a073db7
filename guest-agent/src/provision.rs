//! Provisioning: writing what the agent needs into the guest's filesystem.
//!
//! Everything is written under a root directory ([`Layout`]) so tests can
//! provision into a temp dir; in the guest the root is `/`.
//!
//! **Invariants:**
//! - Files under the agent's home are reached one component at a time with
//!   `openat(O_NOFOLLOW | O_DIRECTORY)` from a descriptor of the home, so a
//!   symlink (planted by the agent before an update, say) never leads a write
//!   outside the home; `..`, absolute and empty components are refused before
//!   that.
//! - Every write is atomic: a fresh `O_EXCL | O_NOFOLLOW` temp file in the
//!   same directory, owner and mode set on the descriptor, data synced, then
//!   renamed over the target. An existing file (or a symlink in its place) is
//!   replaced, never written through.
//! - Secret-bearing files (the env file and the home files) are owned by the
//!   agent user and never group- or world-accessible: group/other bits of a
//!   requested mode are dropped and owner read/write is always set.
//! - A failed provisioning removes what it had written.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{OFlag, openat, renameat};
use nix::sys::stat::{Mode, SFlag, fchmod, fstat, mkdirat};
use nix::unistd::{Gid, Uid, UnlinkatFlags, fchown, fchownat, symlinkat, unlinkat};
use zeroize::Zeroizing;
use zerolease_protocol::message::check_relative_path;
use zerolease_protocol::{FileSpec, Provision, SecretEnvVar};

use crate::env::{AgentEnv, EnvError, EnvPaths};
use crate::passwd::{self, PasswdError, User};

/// Guest paths zerolease uses.
pub mod paths {
    /// Directory for the env file, CA bundle and credential socket.
    pub const RUN_DIR: &str = "/run/zerolease";
    /// The env file.
    pub const ENV_FILE: &str = "/run/zerolease/env";
    /// The CA bundle the agent's TLS clients use.
    pub const CA_BUNDLE: &str = "/run/zerolease/ca-bundle.crt";
    /// The credential helper's socket.
    pub const CREDENTIAL_SOCKET: &str = "/run/zerolease/credential.sock";
    /// The image's CA bundle.
    pub const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
    /// Git's system configuration.
    pub const GITCONFIG: &str = "/etc/gitconfig";
    /// The user database.
    pub const PASSWD: &str = "/etc/passwd";
}

/// Where the guest's filesystem is: `/` in the guest, a temp dir in tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    /// A layout rooted at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the absolute guest path `guest` is on this machine.
    pub fn host_path(&self, guest: &str) -> PathBuf {
        self.root.join(guest.trim_start_matches('/'))
    }
}

/// Why provisioning (or updating, or removing) failed. Never carries a
/// secret value.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    /// The user database cannot be read.
    #[error("cannot read {path}")]
    ReadPasswd {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The user cannot be used.
    #[error("cannot run as the requested user")]
    User(#[from] PasswdError),
    /// The environment is unacceptable.
    #[error("cannot build the agent's environment")]
    Env(#[from] EnvError),
    /// A file path breaks a rule.
    #[error("refusing file {path:?}: {reason}")]
    UnsafePath {
        /// The path as given (relative to the home).
        path: String,
        /// Why.
        reason: &'static str,
    },
    /// The credential helper command cannot go into a git config file.
    #[error("credential helper command {command:?} must be an absolute path with plain words")]
    HelperCommand {
        /// The command.
        command: String,
    },
    /// A file system operation failed.
    #[error("cannot {action} {path}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// On which (guest or home-relative) path.
        path: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

fn io_err(
    action: &'static str,
    path: impl Into<String>,
) -> impl FnOnce(io::Error) -> ProvisionError {
    let path = path.into();
    move |source| ProvisionError::Io {
        action,
        path,
        source,
    }
}

/// What was provisioned: needed to update and remove it later.
#[derive(Debug)]
pub struct Provisioned {
    /// The agent user.
    pub user: User,
    /// The agent's environment (also in the env file).
    pub env: AgentEnv,
    /// Files written under the home, relative to it.
    pub files: Vec<String>,
    /// Hosts git may ask credentials for.
    pub credential_hosts: Vec<String>,
}

/// Reads `user` from the layout's `/etc/passwd`.
pub fn load_user(layout: &Layout, user: &str) -> Result<User, ProvisionError> {
    let path = layout.host_path(paths::PASSWD);
    let text = std::fs::read_to_string(&path)
        .map_err(|source| ProvisionError::ReadPasswd { path, source })?;
    Ok(passwd::lookup(&text, user)?)
}

/// Writes everything `spec` asks for. `helper_command` is how git runs this
/// binary as a credential helper (e.g. `/init credential`). On error, what
/// was written is removed again.
pub fn provision(
    layout: &Layout,
    spec: &Provision,
    helper_command: &str,
) -> Result<Provisioned, ProvisionError> {
    let user = load_user(layout, &spec.user)?;
    let env = AgentEnv::build(
        &user,
        &spec.proxy,
        &EnvPaths {
            ca_bundle: paths::CA_BUNDLE.to_owned(),
        },
        &spec.env_plain,
        &spec.env,
    )?;
    for file in &spec.files {
        check_relative_path(&file.path).map_err(|_| ProvisionError::UnsafePath {
            path: file.path.clone(),
            reason: "paths must be relative to the home, without `..`, `.` or empty components",
        })?;
    }
    let mut done = Provisioned {
        user,
        env,
        files: Vec::new(),
        credential_hosts: spec.git_credential_hosts.clone(),
    };
    match write_all(layout, spec, helper_command, &mut done) {
        Ok(()) => Ok(done),
        Err(err) => {
            // Best effort: the error that stopped us is the one to report.
            let _ = remove(layout, &done, true);
            Err(err)
        }
    }
}

fn write_all(
    layout: &Layout,
    spec: &Provision,
    helper_command: &str,
    done: &mut Provisioned,
) -> Result<(), ProvisionError> {
    let run_dir = prepare_dir(layout, paths::RUN_DIR, 0o755)?;
    write_ca_bundle(layout, &run_dir, &spec.ca_certs)?;
    write_env_file(&run_dir, &done.user, &done.env)?;
    write_gitconfig(layout, helper_command, &spec.git_credential_hosts)?;
    let home = open_home(layout, &done.user)?;
    for file in &spec.files {
        write_home_file(&home, &done.user, file)?;
        done.files.push(file.path.clone());
    }
    Ok(())
}

/// Replaces secret variables and files (`UpdateSecrets`). The env file is
/// rewritten atomically; each file is replaced atomically.
pub fn update(
    layout: &Layout,
    done: &mut Provisioned,
    env: &[SecretEnvVar],
    files: &[FileSpec],
) -> Result<(), ProvisionError> {
    for file in files {
        check_relative_path(&file.path).map_err(|_| ProvisionError::UnsafePath {
            path: file.path.clone(),
            reason: "paths must be relative to the home, without `..`, `.` or empty components",
        })?;
    }
    let mut next_env = done.env.clone();
    next_env.update_secrets(env)?;
    let run_dir = prepare_dir(layout, paths::RUN_DIR, 0o755)?;
    write_env_file(&run_dir, &done.user, &next_env)?;
    done.env = next_env;
    let home = open_home(layout, &done.user)?;
    for file in files {
        write_home_file(&home, &done.user, file)?;
        if !done.files.contains(&file.path) {
            done.files.push(file.path.clone());
        }
    }
    Ok(())
}

/// Deletes the env file and the provisioned home files; with `scrub`, each
/// is overwritten with zeros (and synced) first. Files the agent moved out
/// of reach (by replacing a directory with a symlink, say) are not chased.
pub fn remove(layout: &Layout, done: &Provisioned, scrub: bool) -> Result<(), ProvisionError> {
    let mut first_error = None;
    let run_dir = layout.host_path(paths::RUN_DIR);
    match open_dir(&run_dir) {
        Ok(dir) => {
            if let Err(err) = remove_in(&dir, "env", scrub, done.user.uid) {
                first_error.get_or_insert(io_err("remove", paths::ENV_FILE)(err));
            }
        }
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(err) => {
            first_error.get_or_insert(io_err("open", paths::RUN_DIR)(err));
        }
    }
    match open_home(layout, &done.user) {
        Ok(home) => {
            for path in &done.files {
                let outcome = match walk_to_parent(&home, path, &done.user, false) {
                    Ok((dir, name)) => remove_in(&dir, name, scrub, done.user.uid),
                    Err(err) if is_gone(&err) => Ok(()),
                    Err(err) => Err(err),
                };
                if let Err(err) = outcome {
                    first_error.get_or_insert(io_err("remove", path.clone())(err));
                }
            }
        }
        Err(err) => {
            first_error.get_or_insert(err);
        }
    }
    match first_error {
        Some(err) => Err(err),
        None => Ok(()),
    }
}

fn is_gone(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error().map(Errno::from_raw),
        Some(Errno::ENOENT | Errno::ELOOP | Errno::ENOTDIR)
    )
}

/// Creates (if needed) a root-owned directory and returns a descriptor.
fn prepare_dir(layout: &Layout, guest: &str, mode: u32) -> Result<OwnedFd, ProvisionError> {
    let path = layout.host_path(guest);
    std::fs::create_dir_all(&path).map_err(io_err("create", guest))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
        .map_err(io_err("set the mode of", guest))?;
    open_dir(&path).map_err(io_err("open", guest))
}

fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    let fd = nix::fcntl::open(
        path,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    Ok(fd)
}

/// Opens the agent's home, creating it if the image lacks it, and makes
/// sure it belongs to the agent with mode 0700 (it holds their secrets).
fn open_home(layout: &Layout, user: &User) -> Result<OwnedFd, ProvisionError> {
    let path = layout.host_path(&user.home);
    if !path.exists() {
        std::fs::create_dir_all(&path).map_err(io_err("create", user.home.clone()))?;
    }
    let dir = open_dir(&path).map_err(io_err("open", user.home.clone()))?;
    fchown(
        &dir,
        Some(Uid::from_raw(user.uid)),
        Some(Gid::from_raw(user.gid)),
    )
    .map_err(|errno| io_err("chown", user.home.clone())(errno.into()))?;
    fchmod(&dir, Mode::from_bits_truncate(0o700))
        .map_err(|errno| io_err("set the mode of", user.home.clone())(errno.into()))?;
    Ok(dir)
}

/// The CA bundle's link to the image's bundle, relative so that it holds
/// under any [`Layout`] root.
const SYSTEM_CA_LINK: &str = "../../etc/ssl/certs/ca-certificates.crt";

/// Without extra certificates the bundle is a link to the image's own, as
/// copying 200 KiB costs a TCG guest about 15 ms of every session; with
/// them (or with no system bundle) it is a file holding both.
fn write_ca_bundle(
    layout: &Layout,
    run_dir: &OwnedFd,
    extra: &[String],
) -> Result<(), ProvisionError> {
    if extra.is_empty() && layout.host_path(paths::SYSTEM_CA_BUNDLE).is_file() {
        return link_atomic(run_dir, "ca-bundle.crt", SYSTEM_CA_LINK)
            .map_err(io_err("link", paths::CA_BUNDLE));
    }
    let mut bundle = match std::fs::read(layout.host_path(paths::SYSTEM_CA_BUNDLE)) {
        Ok(bytes) => bytes,
        Err(err) if err.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(err) => return Err(io_err("read", paths::SYSTEM_CA_BUNDLE)(err)),
    };
    for pem in extra {
        if !bundle.is_empty() && !bundle.ends_with(b"\n") {
            bundle.push(b'\n');
        }
        bundle.extend_from_slice(pem.as_bytes());
    }
    if !bundle.is_empty() && !bundle.ends_with(b"\n") {
        bundle.push(b'\n');
    }
    write_atomic(run_dir, "ca-bundle.crt", &bundle, 0o644, None)
        .map_err(io_err("write", paths::CA_BUNDLE))
}

fn write_env_file(run_dir: &OwnedFd, user: &User, env: &AgentEnv) -> Result<(), ProvisionError> {
    let contents = env.render();
    write_atomic(run_dir, "env", &contents, 0o600, Some(user))
        .map_err(io_err("write", paths::ENV_FILE))
}

/// The git system config: every credential request goes to this binary.
pub fn render_gitconfig(helper_command: &str, hosts: &[String]) -> Result<String, ProvisionError> {
    let plain_words = helper_command.starts_with('/')
        && helper_command.split(' ').all(|word| {
            !word.is_empty()
                && word
                    .bytes()
                    .all(|b| b.is_ascii_graphic() && !b"\"\\#;'`$".contains(&b))
        });
    if !plain_words {
        return Err(ProvisionError::HelperCommand {
            command: helper_command.to_owned(),
        });
    }
    let mut text = String::from(
        "# Written by zerolease-guest: git asks the guest agent for credentials,\n\
         # which asks the host; no credential is stored in the guest.\n\
         [credential]\n",
    );
    text.push_str(&format!("\thelper = {helper_command}\n"));
    if !hosts.is_empty() {
        text.push_str("# Hosts the host may grant credentials for:\n");
        for host in hosts {
            text.push_str(&format!(
                "#   {}\n",
                host.replace(|c: char| c.is_control(), "?")
            ));
        }
    }
    Ok(text)
}

fn write_gitconfig(
    layout: &Layout,
    helper_command: &str,
    hosts: &[String],
) -> Result<(), ProvisionError> {
    let text = render_gitconfig(helper_command, hosts)?;
    let etc = prepare_dir(layout, "/etc", 0o755)?;
    write_atomic(&etc, "gitconfig", text.as_bytes(), 0o644, None)
        .map_err(io_err("write", paths::GITCONFIG))
}

/// The mode a provisioned home file gets: the owner bits asked for plus
/// read/write; never any group or world access.
pub fn file_mode(requested: u32) -> u32 {
    (requested & 0o700) | 0o600
}

fn write_home_file(home: &OwnedFd, user: &User, spec: &FileSpec) -> Result<(), ProvisionError> {
    let unsafe_path = |reason| ProvisionError::UnsafePath {
        path: spec.path.clone(),
        reason,
    };
    let (dir, name) = walk_to_parent(home, &spec.path, user, true).map_err(|err| {
        if is_gone(&err) && err.raw_os_error() != Some(Errno::ENOENT as i32) {
            unsafe_path("a directory on the way is a symlink or not a directory")
        } else {
            io_err("create the directories of", spec.path.clone())(err)
        }
    })?;
    write_atomic(
        &dir,
        name,
        spec.contents.expose_secret(),
        file_mode(spec.mode),
        Some(user),
    )
    .map_err(|err| {
        if err.raw_os_error() == Some(Errno::EISDIR as i32) {
            unsafe_path("a directory is in the way")
        } else {
            io_err("write", spec.path.clone())(err)
        }
    })
}

/// Opens the directory holding `rel` (relative to `home`, already checked),
/// one component at a time without following symlinks; with `create`,
/// missing directories are made (0700, owned by the agent).
fn walk_to_parent<'a>(
    home: &OwnedFd,
    rel: &'a str,
    user: &User,
    create: bool,
) -> io::Result<(OwnedFd, &'a str)> {
    let mut parts: Vec<&str> = rel.split('/').collect();
    let name = parts.pop().unwrap_or_default();
    if name.is_empty()
        || parts
            .iter()
            .any(|p| p.is_empty() || *p == "." || *p == "..")
    {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    let mut dir = home.try_clone()?;
    for part in parts {
        if create {
            match mkdirat(&dir, part, Mode::from_bits_truncate(0o700)) {
                Ok(()) => fchownat(
                    &dir,
                    part,
                    Some(Uid::from_raw(user.uid)),
                    Some(Gid::from_raw(user.gid)),
                    nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
                )?,
                Err(Errno::EEXIST) => {}
                Err(errno) => return Err(errno.into()),
            }
        }
        dir = openat(
            &dir,
            part,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
    }
    Ok((dir, name))
}

/// Writes `contents` to `name` in `dir` atomically (temp file + rename).
fn write_atomic(
    dir: &OwnedFd,
    name: &str,
    contents: &[u8],
    mode: u32,
    owner: Option<&User>,
) -> io::Result<()> {
    let tmp = stale_tmp_removed(dir, name)?;
    let fd = openat(
        dir,
        tmp.as_str(),
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(mode & 0o600),
    )?;
    let result = (|| -> io::Result<()> {
        if let Some(user) = owner {
            fchown(
                &fd,
                Some(Uid::from_raw(user.uid)),
                Some(Gid::from_raw(user.gid)),
            )?;
        }
        fchmod(&fd, Mode::from_bits_truncate(mode))?;
        let mut file = File::from(fd.try_clone()?);
        file.write_all(contents)?;
        file.sync_all()?;
        renameat(dir, tmp.as_str(), dir, name)?;
        Ok(())
    })();
    if result.is_err() {
        let _ = unlinkat(dir, tmp.as_str(), UnlinkatFlags::NoRemoveDir);
    }
    result
}

/// The temp name for `name` in `dir`, with whatever an interrupted write
/// left under it removed.
fn stale_tmp_removed(dir: &OwnedFd, name: &str) -> io::Result<String> {
    let tmp = format!(".{name}.zl-tmp");
    match unlinkat(dir, tmp.as_str(), UnlinkatFlags::NoRemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => Ok(tmp),
        Err(errno) => Err(errno.into()),
    }
}

/// Points `name` in `dir` at `target` atomically (temp link + rename).
fn link_atomic(dir: &OwnedFd, name: &str, target: &str) -> io::Result<()> {
    let tmp = stale_tmp_removed(dir, name)?;
    symlinkat(target, dir, tmp.as_str())?;
    renameat(dir, tmp.as_str(), dir, name).inspect_err(|_| {
        let _ = unlinkat(dir, tmp.as_str(), UnlinkatFlags::NoRemoveDir);
    })?;
    Ok(())
}

/// Unlinks `name` in `dir`; with `scrub`, first overwrites it with zeros if
/// it is a regular file with one link owned by `uid` or root (a hard link
/// to some other file is unlinked, not overwritten).
fn remove_in(dir: &OwnedFd, name: &str, scrub: bool, uid: u32) -> io::Result<()> {
    if scrub {
        match openat(
            dir,
            name,
            OFlag::O_WRONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => overwrite(fd, uid)?,
            Err(Errno::ENOENT) => return Ok(()),
            Err(Errno::ELOOP | Errno::EISDIR | Errno::ENXIO) => {}
            Err(errno) => return Err(errno.into()),
        }
    }
    match unlinkat(dir, name, UnlinkatFlags::NoRemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => Ok(()),
        Err(errno) => Err(errno.into()),
    }
}

fn overwrite(fd: OwnedFd, uid: u32) -> io::Result<()> {
    let stat = fstat(fd.as_fd())?;
    let regular = SFlag::from_bits_truncate(stat.st_mode & SFlag::S_IFMT.bits()) == SFlag::S_IFREG;
    if !regular || stat.st_nlink != 1 || (stat.st_uid != uid && stat.st_uid != 0) {
        return Ok(());
    }
    let mut file = File::from(fd);
    let zeros = Zeroizing::new(vec![0u8; 64 * 1024]);
    let mut left = u64::try_from(stat.st_size).unwrap_or(0);
    while left > 0 {
        let chunk = usize::try_from(left.min(zeros.len() as u64)).unwrap_or(zeros.len());
        file.write_all(&zeros[..chunk])?;
        left -= chunk as u64;
    }
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use proptest::prelude::*;
    use zerolease_protocol::{PlainEnvVar, ProxySettings, SecretBytes, SecretString};

    use super::*;

    const HELPER: &str = "/init credential";

    /// A temp root with an `agent` user: uid 1000 when running as root,
    /// otherwise our own ids (so chown works).
    fn root() -> (tempfile::TempDir, Layout, u32, u32) {
        let dir = tempfile::tempdir().unwrap();
        let (uid, gid) = if nix::unistd::geteuid().is_root() {
            (1000, 1000)
        } else {
            (
                nix::unistd::getuid().as_raw(),
                nix::unistd::getgid().as_raw(),
            )
        };
        std::fs::create_dir_all(dir.path().join("etc/ssl/certs")).unwrap();
        std::fs::write(
            dir.path().join("etc/passwd"),
            format!("root:x:0:0::/root:/bin/sh\nagent:x:{uid}:{gid}::/home/agent:/bin/sh\n"),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("etc/ssl/certs/ca-certificates.crt"),
            "-----BEGIN CERTIFICATE-----\nSYSTEM\n-----END CERTIFICATE-----",
        )
        .unwrap();
        let layout = Layout::new(dir.path());
        (dir, layout, uid, gid)
    }

    fn spec(files: Vec<FileSpec>) -> Provision {
        Provision {
            env: vec![SecretEnvVar {
                name: "TOKEN".into(),
                value: SecretString::new("it's $(id) `id` $HOME\n\"x\"".into()),
            }],
            env_plain: vec![PlainEnvVar {
                name: "LANG".into(),
                value: "C.UTF-8".into(),
            }],
            files,
            ca_certs: vec![
                "-----BEGIN CERTIFICATE-----\nEXTRA\n-----END CERTIFICATE-----\n".into(),
            ],
            proxy: ProxySettings {
                http_proxy: Some("http://10.0.0.1:3128".into()),
                https_proxy: Some("http://10.0.0.1:3128".into()),
                no_proxy: vec!["localhost".into()],
            },
            git_credential_hosts: vec!["github.com".into()],
            command: vec!["true".into()],
            workdir: "/home/agent".into(),
            user: "agent".into(),
            workspace: None,
            tty: None,
        }
    }

    fn file(path: &str, contents: &[u8], mode: u32) -> FileSpec {
        FileSpec {
            path: path.into(),
            contents: SecretBytes::new(contents.to_vec()),
            mode,
        }
    }

    /// Sources `env_file` in `sh` and prints `name`'s value.
    fn sourced(env_file: &Path, name: &str) -> Vec<u8> {
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(". \"$1\"; printf %s \"${name}\""))
            .arg("sh")
            .arg(env_file)
            .env_clear()
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        out.stdout
    }

    #[test]
    fn provisions_everything() {
        let (_dir, layout, uid, gid) = root();
        let done = provision(
            &layout,
            &spec(vec![
                file(".config/gh/hosts.yml", b"token: x\n", 0o600),
                file("bin/tool", b"#!/bin/sh\n", 0o777),
            ]),
            HELPER,
        )
        .unwrap();
        assert_eq!(done.files, [".config/gh/hosts.yml", "bin/tool"]);

        let env_file = layout.host_path(paths::ENV_FILE);
        let meta = std::fs::metadata(&env_file).unwrap();
        assert_eq!(meta.mode() & 0o7777, 0o600);
        assert_eq!((meta.uid(), meta.gid()), (uid, gid));
        assert_eq!(sourced(&env_file, "TOKEN"), b"it's $(id) `id` $HOME\n\"x\"");
        assert_eq!(sourced(&env_file, "HOME"), b"/home/agent");
        assert_eq!(sourced(&env_file, "https_proxy"), b"http://10.0.0.1:3128");
        assert_eq!(
            sourced(&env_file, "GIT_SSL_CAINFO"),
            paths::CA_BUNDLE.as_bytes()
        );

        let home = layout.host_path("/home/agent");
        let hosts = home.join(".config/gh/hosts.yml");
        assert_eq!(std::fs::read(&hosts).unwrap(), b"token: x\n");
        let meta = std::fs::metadata(&hosts).unwrap();
        assert_eq!(
            (meta.mode() & 0o7777, meta.uid(), meta.gid()),
            (0o600, uid, gid)
        );
        let meta = std::fs::metadata(&home).unwrap();
        assert_eq!((meta.mode() & 0o7777, meta.uid()), (0o700, uid));
        let meta = std::fs::metadata(home.join(".config/gh")).unwrap();
        assert_eq!((meta.mode() & 0o7777, meta.uid()), (0o700, uid));
        // 0o777 asked: group and world bits are dropped.
        let meta = std::fs::metadata(home.join("bin/tool")).unwrap();
        assert_eq!(meta.mode() & 0o7777, 0o700);

        let bundle = std::fs::read_to_string(layout.host_path(paths::CA_BUNDLE)).unwrap();
        assert_eq!(
            bundle,
            "-----BEGIN CERTIFICATE-----\nSYSTEM\n-----END CERTIFICATE-----\n\
             -----BEGIN CERTIFICATE-----\nEXTRA\n-----END CERTIFICATE-----\n"
        );
        let gitconfig = std::fs::read_to_string(layout.host_path(paths::GITCONFIG)).unwrap();
        assert!(
            gitconfig.contains("[credential]\n\thelper = /init credential\n"),
            "{gitconfig}"
        );
        // No temp files are left behind.
        let leftovers: Vec<_> = std::fs::read_dir(layout.host_path(paths::RUN_DIR))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n.to_string_lossy().contains("zl-tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    /// Without extra certificates the bundle is the image's own, reached
    /// through a link; a later provision with extras replaces the link with
    /// a file holding both, and the image's bundle is left as it was.
    #[test]
    fn without_extra_certificates_the_bundle_links_to_the_images_own() {
        let (_dir, layout, _, _) = root();
        let mut bare = spec(Vec::new());
        bare.ca_certs.clear();
        provision(&layout, &bare, HELPER).unwrap();
        let bundle = layout.host_path(paths::CA_BUNDLE);
        let system = layout.host_path(paths::SYSTEM_CA_BUNDLE);
        assert!(std::fs::symlink_metadata(&bundle).unwrap().is_symlink());
        assert_eq!(
            std::fs::canonicalize(&bundle).unwrap(),
            std::fs::canonicalize(&system).unwrap()
        );

        provision(&layout, &spec(Vec::new()), HELPER).unwrap();
        assert!(std::fs::symlink_metadata(&bundle).unwrap().is_file());
        assert!(std::fs::read_to_string(&bundle).unwrap().contains("EXTRA"));
        assert!(!std::fs::read_to_string(&system).unwrap().contains("EXTRA"));

        // No system bundle: a file, even if empty, never a dangling link.
        std::fs::remove_file(&system).unwrap();
        provision(&layout, &bare, HELPER).unwrap();
        assert!(std::fs::symlink_metadata(&bundle).unwrap().is_file());
    }

    #[test]
    fn file_modes_never_reach_group_or_world() {
        let cases = [
            (0o600, 0o600),
            (0o400, 0o600),
            (0o000, 0o600),
            (0o644, 0o600),
            (0o666, 0o600),
            (0o700, 0o700),
            (0o755, 0o700),
            (0o777, 0o700),
            (0o500, 0o700),
        ];
        for (requested, expected) in cases {
            assert_eq!(file_mode(requested), expected, "{requested:#o}");
        }
    }

    #[test]
    fn refuses_escapes() {
        let (dir, layout, _, _) = root();
        let home = layout.host_path("/home/agent");
        std::fs::create_dir_all(&home).unwrap();
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, home.join("link")).unwrap();
        std::os::unix::fs::symlink(outside.join("target"), home.join("dangling")).unwrap();
        std::fs::create_dir_all(home.join("adir")).unwrap();

        // A directory on the way is a symlink: refused, nothing outside.
        let err = provision(&layout, &spec(vec![file("link/x", b"s", 0o600)]), HELPER).unwrap_err();
        assert!(matches!(err, ProvisionError::UnsafePath { .. }), "{err:?}");
        assert!(!outside.join("x").exists());
        // The failed provisioning removed the env file again.
        assert!(!layout.host_path(paths::ENV_FILE).exists());

        // The target itself is a symlink: replaced, not written through.
        provision(&layout, &spec(vec![file("dangling", b"s", 0o600)]), HELPER).unwrap();
        assert!(!outside.join("target").exists());
        assert!(
            std::fs::symlink_metadata(home.join("dangling"))
                .unwrap()
                .is_file()
        );

        // A directory where the file should go.
        let err = provision(&layout, &spec(vec![file("adir", b"s", 0o600)]), HELPER).unwrap_err();
        assert!(matches!(err, ProvisionError::UnsafePath { .. }), "{err:?}");

        // Paths that are refused before touching anything.
        for bad in ["../x", "/etc/passwd", "a/../../x", "a//b", "./a", ""] {
            let err = provision(&layout, &spec(vec![file(bad, b"s", 0o600)]), HELPER).unwrap_err();
            assert!(
                matches!(err, ProvisionError::UnsafePath { .. }),
                "{bad:?}: {err:?}"
            );
        }
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
    }

    #[test]
    fn refuses_nul_and_reserved_names_and_bad_helpers() {
        let (_dir, layout, _, _) = root();
        let mut s = spec(vec![]);
        s.env[0].value = SecretString::new("a\0b".into());
        let err = provision(&layout, &s, HELPER).unwrap_err();
        assert!(
            matches!(err, ProvisionError::Env(EnvError::Nul { ref name }) if name == "TOKEN"),
            "{err:?}"
        );
        let mut s = spec(vec![]);
        s.user = "nobody".into();
        assert!(matches!(
            provision(&layout, &s, HELPER),
            Err(ProvisionError::User(_))
        ));
        for helper in [
            "init credential",
            "/init\ncredential",
            "/in\"it",
            "/init  x",
            "/a;b",
        ] {
            assert!(
                matches!(
                    provision(&layout, &spec(vec![]), helper),
                    Err(ProvisionError::HelperCommand { .. })
                ),
                "{helper:?}"
            );
        }
    }

    #[test]
    fn updates_and_scrubs() {
        let (_dir, layout, _, _) = root();
        let mut done = provision(
            &layout,
            &spec(vec![file("a/token", b"old-secret", 0o600)]),
            HELPER,
        )
        .unwrap();
        let home = layout.host_path("/home/agent");
        // A hard link the agent made to the file keeps the old inode; the
        // update replaces the name, not the inode's contents.
        std::fs::hard_link(home.join("a/token"), home.join("keep")).unwrap();
        update(
            &layout,
            &mut done,
            &[SecretEnvVar {
                name: "TOKEN".into(),
                value: SecretString::new("new-token".into()),
            }],
            &[
                file("a/token", b"new-secret", 0o600),
                file("b", b"bee", 0o600),
            ],
        )
        .unwrap();
        let env_file = layout.host_path(paths::ENV_FILE);
        assert_eq!(sourced(&env_file, "TOKEN"), b"new-token");
        assert_eq!(std::fs::read(home.join("a/token")).unwrap(), b"new-secret");
        assert_eq!(std::fs::read(home.join("keep")).unwrap(), b"old-secret");
        assert_eq!(done.files, ["a/token", "b"]);

        // A refused update changes nothing.
        assert!(
            update(
                &layout,
                &mut done,
                &[SecretEnvVar {
                    name: "HOME".into(),
                    value: SecretString::new("/".into()),
                }],
                &[],
            )
            .is_err()
        );
        assert_eq!(sourced(&env_file, "TOKEN"), b"new-token");

        // Keep a descriptor on the file to see its contents after unlink.
        let held = std::fs::File::open(home.join("a/token")).unwrap();
        remove(&layout, &done, true).unwrap();
        assert!(!env_file.exists());
        assert!(!home.join("a/token").exists());
        assert!(!home.join("b").exists());
        let mut contents = Vec::new();
        std::io::Read::read_to_end(&mut &held, &mut contents).unwrap();
        assert_eq!(contents, vec![0u8; b"new-secret".len()]);
        // Removing twice is fine.
        remove(&layout, &done, true).unwrap();
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// Any value without NUL comes back byte-exact from `sh` sourcing
        /// the env file, and nothing in it runs.
        #[test]
        fn env_file_values_round_trip_through_sh(
            value in "[^\0]{0,64}|(['\"`$()\\\\\n\r; |&*?~{}!#-]|[a-z]){0,48}",
        ) {
            let (_dir, layout, _, _) = root();
            let mut s = spec(vec![]);
            s.env[0].value = SecretString::new(value.clone());
            let marker = layout.root().join("executed");
            s.env_plain[0].value = format!("$(touch {})", marker.display());
            provision(&layout, &s, HELPER).unwrap();
            let env_file = layout.host_path(paths::ENV_FILE);
            prop_assert_eq!(sourced(&env_file, "TOKEN"), value.as_bytes().to_vec());
            prop_assert!(!marker.exists());
        }
    }
}
