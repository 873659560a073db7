use super::*;
use std::os::unix::fs::MetadataExt;

/// A tar header with a raw name (bypassing the builder's own checks, as a
/// hostile archive would).
fn raw_entry(
    builder: &mut tar::Builder<Vec<u8>>,
    name: &str,
    kind: tar::EntryType,
    mode: u32,
    link: Option<&str>,
    data: &[u8],
) {
    let mut header = tar::Header::new_gnu();
    {
        let gnu = header.as_gnu_mut().unwrap();
        gnu.name[..name.len()].copy_from_slice(name.as_bytes());
        if let Some(link) = link {
            gnu.linkname[..link.len()].copy_from_slice(link.as_bytes());
        }
    }
    header.set_entry_type(kind);
    header.set_mode(mode);
    header.set_size(data.len() as u64);
    header.set_cksum();
    builder.append(&header, data).unwrap();
}

type Entry<'a> = (&'a str, tar::EntryType, u32, Option<&'a str>, &'a [u8]);

fn archive(entries: &[Entry<'_>]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, kind, mode, link, data) in entries {
        raw_entry(&mut b, name, *kind, *mode, *link, data);
    }
    b.into_inner().unwrap()
}

use tar::EntryType as T;

#[test]
fn a_good_archive_extracts_with_safe_modes_and_symlinks_as_symlinks() {
    let root = tempfile::tempdir().unwrap();
    let dest = root.path().join("ws");
    std::fs::create_dir(&dest).unwrap();
    let tar = archive(&[
        ("src", T::Directory, 0o755, None, b""),
        ("src/main.rs", T::Regular, 0o644, None, b"fn main() {}\n"),
        ("tool", T::Regular, 0o4755, None, b"#!/bin/sh\n"),
        ("deep/er/file", T::Regular, 0o600, None, b"x"),
        ("passwd", T::Symlink, 0o777, Some("/etc/passwd"), b""),
        ("up", T::Symlink, 0o777, Some("../../outside"), b""),
        ("ro", T::Directory, 0o555, None, b""),
        ("ro/inside", T::Regular, 0o644, None, b"y"),
    ]);
    assert_eq!(extract(&tar[..], &dest).unwrap(), 8);
    assert_eq!(
        std::fs::read_to_string(dest.join("src/main.rs")).unwrap(),
        "fn main() {}\n"
    );
    // No set-id bit survives.
    assert_eq!(
        std::fs::metadata(dest.join("tool")).unwrap().mode() & 0o7777,
        0o755
    );
    assert_eq!(std::fs::read(dest.join("deep/er/file")).unwrap(), b"x");
    assert_eq!(
        std::fs::read_link(dest.join("passwd")).unwrap(),
        PathBuf::from("/etc/passwd")
    );
    assert_eq!(
        std::fs::read_link(dest.join("up")).unwrap(),
        PathBuf::from("../../outside")
    );
    assert_eq!(std::fs::read(dest.join("ro/inside")).unwrap(), b"y");
    assert_eq!(
        std::fs::metadata(dest.join("ro")).unwrap().mode() & 0o777,
        0o755 & 0o555 | 0o700
    );
}

#[test]
fn hostile_archives_are_refused_and_write_nothing_outside() {
    let cases: Vec<(&str, Vec<Entry<'_>>)> = vec![
        (
            "absolute",
            vec![("/tmp/zl-abs", T::Regular, 0o644, None, b"x")],
        ),
        ("dotdot", vec![("../escape", T::Regular, 0o644, None, b"x")]),
        (
            "inner dotdot",
            vec![("a/../../escape", T::Regular, 0o644, None, b"x")],
        ),
        (
            "write through a symlinked dir",
            vec![
                ("link", T::Symlink, 0o777, Some("../outside"), b""),
                ("link/planted", T::Regular, 0o644, None, b"x"),
            ],
        ),
        (
            "write over a symlink",
            vec![
                ("f", T::Symlink, 0o777, Some("../outside/target"), b""),
                ("f", T::Regular, 0o644, None, b"x"),
            ],
        ),
        (
            "a directory over a symlink",
            vec![
                ("d", T::Symlink, 0o777, Some("../outside"), b""),
                ("d", T::Directory, 0o755, None, b""),
            ],
        ),
        (
            "hard link",
            vec![("h", T::Link, 0o644, Some("/etc/passwd"), b"")],
        ),
        ("char device", vec![("c", T::Char, 0o644, None, b"")]),
        ("block device", vec![("b", T::Block, 0o644, None, b"")]),
        ("fifo", vec![("p", T::Fifo, 0o644, None, b"")]),
        ("dot", vec![("./x", T::Regular, 0o644, None, b"x")]),
    ];
    for (name, entries) in cases {
        let root = tempfile::tempdir().unwrap();
        let dest = root.path().join("ws");
        let outside = root.path().join("outside");
        std::fs::create_dir_all(&dest).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("target"), "untouched").unwrap();
        let tar = archive(&entries);
        let err = extract(&tar[..], &dest);
        assert!(err.is_err(), "{name}: {err:?}");
        assert_eq!(
            std::fs::read_dir(&outside).unwrap().count(),
            1,
            "{name}: something was written outside"
        );
        assert_eq!(
            std::fs::read_to_string(outside.join("target")).unwrap(),
            "untouched",
            "{name}"
        );
        assert!(!root.path().join("escape").exists(), "{name}");
        assert!(!Path::new("/tmp/zl-abs").exists(), "{name}");
    }
}

#[test]
fn components() {
    for ok in ["a", "a/b", "a/b/", ".hidden/x", "..x/y", "x.."] {
        assert!(entry_components(Path::new(ok)).is_ok(), "{ok}");
    }
    for bad in ["", "/a", "../a", "a/../b", "./a", "a/./b", "/"] {
        // `Path` drops interior `.`; what is left must still be refused or
        // be harmless (it is then a plain relative path).
        let parts = entry_components(Path::new(bad));
        if bad == "a/./b" {
            assert!(parts.is_ok());
        } else {
            assert!(parts.is_err(), "{bad}");
        }
    }
}

#[test]
fn the_workspace_must_be_below_the_home() {
    let cases = [
        ("/home/agent/work", true),
        ("/home/agent/a/b", true),
        ("/home/agent", false),
        ("/home/agent/", false),
        ("/home", false),
        ("/home/agentx/work", false),
        ("/work", false),
    ];
    for (path, ok) in cases {
        assert_eq!(check_path(path, "/home/agent").is_ok(), ok, "{path}");
    }
}

fn have_git() -> bool {
    let ok = Command::new("git").arg("--version").output().is_ok();
    if !ok {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "CI=true and no git"
        );
        eprintln!("SKIPPED: git is not installed");
    }
    ok
}

fn host_git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .args(["-c", "user.name=t", "-c", "user.email=t@example.invalid"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

fn me() -> User {
    User {
        name: "me".into(),
        uid: nix::unistd::geteuid().as_raw(),
        gid: nix::unistd::getegid().as_raw(),
        home: "/home/agent".into(),
    }
}

/// A host repo (one commit, one uncommitted edit), as a tar; extracted,
/// changed by an "agent" that also plants hooks and config; the result
/// holds only the agent's changes, and no planted hook ran.
#[test]
fn round_trip_through_the_disks() {
    if !have_git() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let host = root.path().join("host");
    std::fs::create_dir_all(&host).unwrap();
    host_git(&host, &["init", "-q", "-b", "main"]);
    std::fs::write(host.join("README"), "one\n").unwrap();
    host_git(&host, &["add", "-A"]);
    host_git(&host, &["commit", "-q", "-m", "base"]);
    let base = host_git(&host, &["rev-parse", "HEAD"]);
    // Uncommitted on the host: part of the start, not of the agent's patch.
    std::fs::write(host.join("dirty"), "host's own edit\n").unwrap();

    let mut b = tar::Builder::new(Vec::new());
    b.follow_symlinks(false);
    for entry in std::fs::read_dir(&host).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name();
        if entry.file_type().unwrap().is_dir() {
            b.append_dir_all(&name, entry.path()).unwrap();
        } else {
            b.append_path_with_name(entry.path(), &name).unwrap();
        }
    }
    let tar_file = root.path().join("in.tar");
    std::fs::write(&tar_file, b.into_inner().unwrap()).unwrap();
    let out_file = root.path().join("out.img");
    File::create(&out_file).unwrap().set_len(1 << 20).unwrap();

    let layout = Layout::new(root.path().join("guest"));
    let spec = WorkspaceSpec {
        path: "/home/agent/work".into(),
        base: Some(base.clone()),
    };
    let p = prepare_from(&layout, &spec, &me(), &tar_file, out_file.clone()).unwrap();
    let ws = layout.host_path("/home/agent/work");
    assert_eq!(
        std::fs::read_to_string(ws.join("dirty")).unwrap(),
        "host's own edit\n"
    );

    // The "agent".
    let marker = root.path().join("marker");
    std::fs::write(ws.join("README"), "one\ntwo\n").unwrap();
    std::fs::write(ws.join("new.txt"), "new\n").unwrap();
    for hook in ["pre-commit", "post-commit", "post-checkout", "post-merge"] {
        let path = ws.join(".git/hooks").join(hook);
        std::fs::write(&path, format!("#!/bin/sh\ntouch {}\n", marker.display())).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let mut config = std::fs::OpenOptions::new()
        .append(true)
        .open(ws.join(".git/config"))
        .unwrap();
    writeln!(
        config,
        "[core]\n\thooksPath = .git/hooks\n\tfsmonitor = touch {m}\n[filter \"x\"]\n\tclean = touch {m}",
        m = marker.display()
    )
    .unwrap();
    std::fs::write(ws.join(".gitattributes"), "* filter=x\n").unwrap();

    let header = finish(&p).unwrap();
    assert!(!marker.exists(), "a planted hook or filter ran");
    let disk = std::fs::read(&out_file).unwrap();
    let decoded = OutHeader::decode(&disk[..OUT_HEADER_LEN], disk.len() as u64).unwrap();
    assert_eq!(decoded, header);
    assert!(header.bundle_len > 0);
    let start = OUT_HEADER_LEN + header.bundle_len as usize;
    let patch = String::from_utf8_lossy(&disk[start..start + header.patch_len as usize]);
    assert!(patch.contains("+two"), "{patch}");
    assert!(patch.contains("b/new.txt"), "{patch}");
    assert!(patch.contains("b/.gitattributes"), "{patch}");
    assert!(!patch.contains("host's own edit"), "{patch}");
    assert!(!patch.contains(".git/"), "{patch}");

    // The bundle is usable on the host, on top of the base.
    let bundle = root.path().join("ws.bundle");
    std::fs::write(&bundle, &disk[OUT_HEADER_LEN..start]).unwrap();
    host_git(&host, &["bundle", "verify", "-q", bundle.to_str().unwrap()]);
}

#[test]
fn a_plain_directory_becomes_a_repository_with_a_base_commit() {
    if !have_git() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let tar = archive(&[("a.txt", T::Regular, 0o644, None, b"a\n")]);
    let tar_file = root.path().join("in.tar");
    std::fs::write(&tar_file, tar).unwrap();
    let out_file = root.path().join("out.img");
    File::create(&out_file).unwrap().set_len(1 << 20).unwrap();
    let layout = Layout::new(root.path().join("guest"));
    let spec = WorkspaceSpec {
        path: "/home/agent/work".into(),
        base: None,
    };
    let p = prepare_from(&layout, &spec, &me(), &tar_file, out_file.clone()).unwrap();
    let ws = layout.host_path("/home/agent/work");
    assert_eq!(
        host_git(&ws, &["log", "--format=%s"]),
        "zerolease: the workspace as copied"
    );
    // Nothing changed: no bundle, an empty patch.
    let header = finish(&p).unwrap();
    assert_eq!((header.bundle_len, header.patch_len), (0, 0));
    // A non-empty target directory is refused.
    let again = prepare_from(&layout, &spec, &me(), &tar_file, out_file);
    assert!(again.is_err());
}
