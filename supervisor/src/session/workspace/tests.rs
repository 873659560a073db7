use super::*;
use std::os::unix::fs::PermissionsExt;

fn tree() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("ws");
    std::fs::create_dir_all(root.join("src/deep")).unwrap();
    std::fs::write(root.join("README"), "hello\n").unwrap();
    std::fs::write(root.join("src/deep/main.rs"), "fn main() {}\n").unwrap();
    std::fs::write(root.join("tool"), "#!/bin/sh\n").unwrap();
    std::fs::set_permissions(root.join("tool"), std::fs::Permissions::from_mode(0o4755)).unwrap();
    // Outside the workspace: a directory a symlink points to.
    std::fs::create_dir_all(dir.path().join("outside")).unwrap();
    std::fs::write(dir.path().join("outside/secret"), "do not copy").unwrap();
    std::os::unix::fs::symlink("/etc/passwd", root.join("passwd")).unwrap();
    std::os::unix::fs::symlink("../outside", root.join("out")).unwrap();
    nix::unistd::mkfifo(
        &root.join("fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o600),
    )
    .unwrap();
    let _sock = std::os::unix::net::UnixListener::bind(root.join("sock")).unwrap();
    dir
}

#[test]
fn the_tar_holds_files_dirs_and_symlinks_but_nothing_special_or_followed() {
    let dir = tree();
    let root = dir.path().join("ws");
    let mut file = tempfile::tempfile().unwrap();
    let summary = write_tar(&root, &mut file, DEFAULT_LIMIT).unwrap();
    assert_eq!(
        summary.skipped,
        vec![PathBuf::from("fifo"), PathBuf::from("sock")]
    );
    file.seek(SeekFrom::Start(0)).unwrap();
    let mut archive = tar::Archive::new(file);
    let mut seen = Vec::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let path = entry.path().unwrap().display().to_string();
        let kind = entry.header().entry_type();
        let mode = entry.header().mode().unwrap();
        let link = entry.link_name().unwrap().map(|l| l.display().to_string());
        let mut data = String::new();
        entry.read_to_string(&mut data).unwrap();
        seen.push((path, kind, mode, link, data));
    }
    let find = |p: &str| seen.iter().find(|e| e.0 == p).cloned();
    let readme = find("README").unwrap();
    assert_eq!(readme.1, tar::EntryType::Regular);
    assert_eq!(readme.4, "hello\n");
    assert_eq!(find("src/deep/main.rs").unwrap().4, "fn main() {}\n");
    // Set-id bits never go in.
    assert_eq!(find("tool").unwrap().2, 0o755);
    // Symlinks stay symlinks, with their targets as written.
    let passwd = find("passwd").unwrap();
    assert_eq!(passwd.1, tar::EntryType::Symlink);
    assert_eq!(passwd.3.as_deref(), Some("/etc/passwd"));
    assert_eq!(passwd.4, "");
    let out = find("out").unwrap();
    assert_eq!(out.1, tar::EntryType::Symlink);
    assert_eq!(out.3.as_deref(), Some("../outside"));
    // Nothing behind a symlink, no special files.
    assert!(seen.iter().all(|e| !e.0.starts_with("out/")), "{seen:?}");
    assert!(seen.iter().all(|e| !e.4.contains("do not copy")));
    assert!(find("fifo").is_none() && find("sock").is_none());
    assert!(find("src").unwrap().1.is_dir());
    assert_eq!(summary.entries, seen.len() as u64);
}

#[test]
fn long_names_survive() {
    let dir = tempfile::tempdir().unwrap();
    let long = "d".repeat(120);
    let path = dir.path().join(&long).join("f".repeat(150));
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, "x").unwrap();
    let mut file = tempfile::tempfile().unwrap();
    write_tar(dir.path(), &mut file, DEFAULT_LIMIT).unwrap();
    file.seek(SeekFrom::Start(0)).unwrap();
    let names: Vec<String> = tar::Archive::new(file)
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().display().to_string())
        .collect();
    assert!(
        names.contains(&format!("{long}/{}", "f".repeat(150))),
        "{names:?}"
    );
}

#[test]
fn an_oversize_workspace_is_refused_with_its_size_and_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("big"), vec![0u8; 300_000]).unwrap();
    let err = prepare(
        dir.path(),
        (100_000, "resources.disk", "raise resources.disk"),
    )
    .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, WorkspaceError::TooBig { .. }), "{text}");
    assert!(
        text.contains("293.5 KiB") && text.contains("97.7 KiB"),
        "{text}"
    );
    assert!(text.contains("raise resources.disk"), "{text}");
    // Under the limit it is fine, and without .git there is no base.
    let ok = prepare(dir.path(), (1 << 20, "", "")).unwrap();
    assert_eq!(ok.base, None);
    // The limit also stops a tree that grew after it was measured.
    let mut file = tempfile::tempfile().unwrap();
    assert!(matches!(
        write_tar(dir.path(), &mut file, 1000),
        Err(WorkspaceError::TooBig { .. })
    ));
}

#[test]
fn a_git_file_instead_of_a_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(".git"), "gitdir: /elsewhere\n").unwrap();
    assert!(matches!(
        prepare(dir.path(), (1 << 20, "", "")),
        Err(WorkspaceError::GitFile { .. })
    ));
}

#[test]
fn limits() {
    const G: u64 = 1 << 30;
    let cases = [
        // (disk, memory) -> limit
        ((2 * G, 4 * G), G),
        ((512 << 20, 4 * G), 512 << 20),
        ((2 * G, 512 << 20), 256 << 20),
        ((100 << 20, 512 << 20), 100 << 20),
    ];
    for ((disk, memory), want) in cases {
        assert_eq!(limit_for(disk, memory).0, want, "{disk} {memory}");
    }
}

#[test]
fn paths() {
    let cases = [
        ("src/main.rs", Ok(())),
        ("a/.gitignore", Ok(())),
        (".github/workflows/x.yml", Ok(())),
        ("x.git/y", Ok(())),
        ("..x/y", Ok(())),
        (".git/hooks/post-checkout", Err(Refusal::GitDir)),
        (".git", Err(Refusal::GitDir)),
        ("sub/.git/config", Err(Refusal::GitDir)),
        (".GIT/config", Err(Refusal::GitDir)),
        (".git./config", Err(Refusal::GitDir)),
        (".git /config", Err(Refusal::GitDir)),
        ("GIT~1/config", Err(Refusal::GitDir)),
        ("../outside", Err(Refusal::Escapes)),
        ("a/../../b", Err(Refusal::Escapes)),
        ("/etc/passwd", Err(Refusal::Escapes)),
        ("a//b", Err(Refusal::Escapes)),
        ("./a", Err(Refusal::Escapes)),
        ("", Err(Refusal::Escapes)),
        ("a\\..\\b", Err(Refusal::Escapes)),
        ("a\0b", Err(Refusal::Escapes)),
    ];
    for (path, want) in cases {
        assert_eq!(check_path(path), want, "{path:?}");
    }
}

const EDIT: &str = "diff --git a/README b/README
index 1111111..2222222 100644
--- a/README
+++ b/README
@@ -1 +1 @@
-old
+new
";

const NEW_FILE: &str = "diff --git a/new.txt b/new.txt
new file mode 100644
index 0000000..3333333
--- /dev/null
+++ b/new.txt
@@ -0,0 +1 @@
+hi
";

fn refusals(patch: &str) -> Vec<Vec<Refusal>> {
    check_patch(patch.as_bytes())
        .into_iter()
        .map(|s| s.refusals)
        .collect()
}

#[test]
fn patch_sections_are_checked_one_by_one() {
    use Refusal::*;
    let un = |why| Unparsable(why);
    let cases: Vec<(&str, String, Vec<Vec<Refusal>>)> = vec![
        ("an edit", EDIT.into(), vec![vec![]]),
        ("a new file", NEW_FILE.into(), vec![vec![]]),
        ("edit and new", format!("{EDIT}{NEW_FILE}"), vec![vec![], vec![]]),
        (
            "a new symlink",
            "diff --git a/passwd b/passwd\nnew file mode 120000\nindex 0000000..4444444\n--- /dev/null\n+++ b/passwd\n@@ -0,0 +1 @@\n+/etc/passwd\n\\ No newline at end of file\n".into(),
            vec![vec![Symlink]],
        ),
        (
            "a file turned into a symlink",
            "diff --git a/f b/f\nold mode 100644\nnew mode 120000\n".into(),
            vec![vec![Symlink]],
        ),
        (
            "a changed symlink target",
            "diff --git a/l b/l\nindex 1111111..2222222 120000\n--- a/l\n+++ b/l\n@@ -1 +1 @@\n-a\n+../../outside\n".into(),
            vec![vec![Symlink]],
        ),
        (
            "a removed symlink",
            "diff --git a/l b/l\ndeleted file mode 120000\nindex 1111111..0000000\n--- a/l\n+++ /dev/null\n@@ -1 +0,0 @@\n-x\n".into(),
            vec![vec![Symlink]],
        ),
        (
            "a gitlink",
            "diff --git a/sub b/sub\nnew file mode 160000\nindex 0000000..5555555\n--- /dev/null\n+++ b/sub\n@@ -0,0 +1 @@\n+Subproject commit 5555555555555555555555555555555555555555\n".into(),
            vec![vec![Gitlink]],
        ),
        (
            "a hook",
            "diff --git a/.git/hooks/post-checkout b/.git/hooks/post-checkout\nnew file mode 100755\nindex 0000000..6666666\n--- /dev/null\n+++ b/.git/hooks/post-checkout\n@@ -0,0 +1 @@\n+touch /tmp/x\n".into(),
            vec![vec![GitDir]],
        ),
        (
            "a rename onto .git",
            "diff --git a/x b/.git/config\nsimilarity index 100%\nrename from x\nrename to .git/config\n".into(),
            vec![vec![GitDir]],
        ),
        (
            "a copy out of the tree",
            "diff --git a/x b/../x\nsimilarity index 100%\ncopy from x\ncopy to ../x\n".into(),
            vec![vec![Escapes]],
        ),
        (
            "a path up and out",
            "diff --git a/../x b/../x\nnew file mode 100644\n--- /dev/null\n+++ b/../x\n@@ -0,0 +1 @@\n+x\n".into(),
            vec![vec![Escapes]],
        ),
        (
            "a quoted path into .git",
            "diff --git \"a/.git/hooks/pre-commit\" \"b/.git/hooks/pre-commit\"\nnew file mode 100755\n--- /dev/null\n+++ \"b/.git/hooks/pre-commit\"\n@@ -0,0 +1 @@\n+x\n".into(),
            vec![vec![GitDir]],
        ),
        (
            "an octal-escaped .git",
            "diff --git \"a/\\056git/config\" \"b/\\056git/config\"\nindex 1111111..2222222 100644\n--- \"a/\\056git/config\"\n+++ \"b/\\056git/config\"\n@@ -1 +1 @@\n-a\n+b\n".into(),
            vec![vec![GitDir]],
        ),
        (
            "a binary edit under .git",
            "diff --git a/.git/index b/.git/index\nindex 1111111..2222222 100644\nGIT binary patch\nliteral 1\nIcmZo*00001\n\nliteral 0\nHcmV?d00001\n\n".into(),
            vec![vec![GitDir]],
        ),
        (
            "an executable bit is fine",
            "diff --git a/t b/t\nold mode 100644\nnew mode 100755\n".into(),
            vec![vec![]],
        ),
        (
            "an odd mode",
            "diff --git a/t b/t\nold mode 100644\nnew mode 104755\n".into(),
            vec![vec![OddMode("104755".into())]],
        ),
        (
            "an unknown header line",
            "diff --git a/t b/t\nrename-ish t\n".into(),
            vec![vec![un("an unknown header line")]],
        ),
        (
            "text before the first file",
            format!("From: x\n{EDIT}"),
            vec![vec![un("text before the first file")], vec![]],
        ),
        (
            "no path at all",
            "diff --git x\n".into(),
            vec![vec![un("no path found")]],
        ),
        (
            "a --- path without its prefix",
            "diff --git a/t b/t\n--- /etc/passwd\n+++ b/t\n@@ -1 +1 @@\n-a\n+b\n".into(),
            vec![vec![un("a path without its a/ or b/ prefix")]],
        ),
    ];
    for (name, patch, want) in cases {
        assert_eq!(refusals(&patch), want, "{name}");
    }
}

#[test]
fn the_safe_patch_keeps_only_safe_sections() {
    let hook = "diff --git a/.git/hooks/x b/.git/hooks/x\nnew file mode 100755\n--- /dev/null\n+++ b/.git/hooks/x\n@@ -0,0 +1 @@\n+x\n";
    let patch = format!("{EDIT}{hook}{NEW_FILE}");
    let sections = check_patch(patch.as_bytes());
    assert_eq!(
        String::from_utf8(safe_patch(&sections)).unwrap(),
        format!("{EDIT}{NEW_FILE}")
    );
    assert_eq!(sections[1].display_path(), ".git/hooks/x");
}

#[test]
fn sanitize_defuses_terminal_escapes() {
    assert_eq!(sanitize("a\x1b[2Jb\n\tc\r"), "a\\x1b[2Jb\n\tc\\x0d");
}

const STRICT: ApplyOptions = ApplyOptions {
    skip_unsafe: false,
    allow_symlinks: false,
};
const SKIP: ApplyOptions = ApplyOptions {
    skip_unsafe: true,
    allow_symlinks: false,
};

fn git(dir: &Path, args: &[&str]) -> String {
    let out = host_git(dir)
        .args(["-c", "user.name=t", "-c", "user.email=t@example.invalid"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn have_git() -> bool {
    let ok = Command::new("git").arg("--version").output().is_ok();
    if !ok {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "CI=true and git is missing"
        );
        eprintln!("SKIPPED: git is not installed");
    }
    ok
}

/// A repository with one commit, its clone-like copy as the "host", and a
/// patch made by real git from edits in the first.
#[test]
fn apply_brings_regular_changes_and_refuses_the_rest() {
    if !have_git() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let guest = dir.path().join("guest");
    std::fs::create_dir_all(&guest).unwrap();
    git(&guest, &["init", "-q", "-b", "main"]);
    std::fs::write(guest.join("README"), "one\n").unwrap();
    std::fs::write(guest.join("bin.dat"), [0u8, 1, 2, 3, 255]).unwrap();
    git(&guest, &["add", "-A"]);
    git(&guest, &["commit", "-q", "-m", "base"]);
    let host = dir.path().join("host");
    git(dir.path(), &["clone", "-q", "guest", "host"]);
    let config_before = std::fs::read(host.join(".git/config")).unwrap();

    std::fs::write(guest.join("README"), "one\ntwo\n").unwrap();
    std::fs::write(guest.join("added.txt"), "new\n").unwrap();
    std::fs::write(guest.join("bin.dat"), [9u8, 0, 8, 0, 7]).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", guest.join("passwd")).unwrap();
    std::os::unix::fs::symlink("../../outside", guest.join("outside")).unwrap();
    git(&guest, &["add", "-A"]);
    git(&guest, &["commit", "-q", "-m", "agent"]);
    let patch = git(
        &guest,
        &[
            "diff",
            "--binary",
            "--full-index",
            "--no-ext-diff",
            "HEAD~1",
            "HEAD",
        ],
    );

    // By default: refused as a whole, naming both symlinks; nothing changed.
    let err = apply(patch.as_bytes(), &host, STRICT).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("passwd: creates, changes or removes a symlink"),
        "{text}"
    );
    assert!(text.contains("outside: creates"), "{text}");
    assert!(text.contains("--skip-unsafe"), "{text}");
    assert_eq!(
        std::fs::read_to_string(host.join("README")).unwrap(),
        "one\n"
    );

    // With --skip-unsafe: the rest lands, the symlinks do not.
    let done = apply(patch.as_bytes(), &host, SKIP).unwrap();
    assert_eq!(done.applied, vec!["README", "added.txt", "bin.dat"]);
    assert_eq!(done.refused.len(), 2);
    assert_eq!(
        std::fs::read_to_string(host.join("README")).unwrap(),
        "one\ntwo\n"
    );
    assert_eq!(
        std::fs::read_to_string(host.join("added.txt")).unwrap(),
        "new\n"
    );
    assert_eq!(
        std::fs::read(host.join("bin.dat")).unwrap(),
        [9u8, 0, 8, 0, 7]
    );
    assert!(std::fs::symlink_metadata(host.join("passwd")).is_err());
    assert!(std::fs::symlink_metadata(host.join("outside")).is_err());
    assert_eq!(
        std::fs::read(host.join(".git/config")).unwrap(),
        config_before
    );

    // A patch that no longer applies changes nothing and says so.
    let err = apply(patch.as_bytes(), &host, SKIP).unwrap_err();
    assert!(matches!(err, ApplyError::DoesNotApply { .. }), "{err}");
}

#[test]
fn git_cross_checks_what_it_would_touch() {
    if !have_git() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("p.patch");
    std::fs::write(&file, format!("{EDIT}{NEW_FILE}")).unwrap();
    git_agrees(&file, 2).unwrap();
    // A count that differs from git's is refused.
    assert!(git_agrees(&file, 1).is_err());
    let st = stat(&file).unwrap();
    assert!(st.contains("README") && st.contains("new.txt"), "{st}");
}

fn out_disk(dir: &Path, header: &OutHeader, data: &[u8], len: u64) -> PathBuf {
    let path = dir.join("out.img");
    let mut f = File::create(&path).unwrap();
    f.write_all(&header.encode()).unwrap();
    f.write_all(data).unwrap();
    f.set_len(len).unwrap();
    path
}

#[test]
fn collect_copies_within_bounds() {
    let dir = tempfile::tempdir().unwrap();
    let header = OutHeader {
        bundle_len: 3,
        patch_len: 4,
        error: None,
    };
    let disk = out_disk(dir.path(), &header, b"BUNpat!", 4096);
    let dest = dir.path().join("sessions/abc");
    let got = collect(&disk, &dest).unwrap();
    assert_eq!(std::fs::read(got.bundle.unwrap()).unwrap(), b"BUN");
    assert_eq!(std::fs::read(&got.patch).unwrap(), b"pat!");
    let mode = std::fs::metadata(&got.patch).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);

    // Nothing changed: an empty patch and no bundle.
    let empty = OutHeader {
        bundle_len: 0,
        patch_len: 0,
        error: None,
    };
    let disk = out_disk(dir.path(), &empty, b"", 4096);
    let got = collect(&disk, &dest).unwrap();
    assert!(got.bundle.is_none() && got.patch_len == 0);
    assert!(!dest.join(BUNDLE_FILE).exists());

    // Lengths past the disk, no header, and a guest failure.
    let long = OutHeader {
        bundle_len: 4000,
        patch_len: 1000,
        error: None,
    };
    let disk = out_disk(dir.path(), &long, b"", 4096);
    assert!(matches!(
        collect(&disk, &dest),
        Err(WorkspaceError::BadResult(OutHeaderError::TooLong { .. }))
    ));
    let blank = dir.path().join("blank.img");
    File::create(&blank).unwrap().set_len(4096).unwrap();
    assert!(matches!(
        collect(&blank, &dest),
        Err(WorkspaceError::BadResult(OutHeaderError::NoHeader))
    ));
    let failed = OutHeader {
        bundle_len: 0,
        patch_len: 0,
        error: Some("git commit failed".into()),
    };
    let disk = out_disk(dir.path(), &failed, b"", 4096);
    let err = collect(&disk, &dest).unwrap_err();
    assert!(err.to_string().contains("git commit failed"), "{err}");
}

#[test]
fn the_guest_path_is_below_the_home() {
    let cases = [
        ("/home/agent", "agent", "/home/agent/work"),
        ("/home/agent/", "agent", "/home/agent/work"),
        ("/home/agent/proj", "agent", "/home/agent/proj"),
        ("/home/agent/proj/", "agent", "/home/agent/proj"),
        ("/srv", "agent", "/home/agent/work"),
        ("/home/agentx", "agent", "/home/agent/work"),
        ("/home/dev/src", "dev", "/home/dev/src"),
    ];
    for (workdir, user, want) in cases {
        assert_eq!(guest_path(workdir, user), want, "{workdir}");
    }
}

mod props {
    use super::*;
    use proptest::prelude::*;

    /// Lines a patch header is made of, hostile ones included.
    fn line() -> impl Strategy<Value = String> {
        let path = prop_oneof![
            Just("README".to_owned()),
            Just(".git/hooks/x".to_owned()),
            Just("../x".to_owned()),
            Just("/etc/passwd".to_owned()),
            Just("\"\\056git/config\"".to_owned()),
            Just("a b".to_owned()),
            "[a-z./]{1,12}",
        ];
        let mode = prop_oneof![
            Just("100644"),
            Just("100755"),
            Just("120000"),
            Just("160000"),
            Just("040000")
        ];
        prop_oneof![
            path.clone().prop_map(|p| format!("diff --git a/{p} b/{p}")),
            mode.clone().prop_map(|m| format!("new file mode {m}")),
            mode.clone().prop_map(|m| format!("old mode {m}")),
            mode.prop_map(|m| format!("index 1111111..2222222 {m}")),
            path.clone().prop_map(|p| format!("--- a/{p}")),
            path.clone().prop_map(|p| format!("+++ b/{p}")),
            path.clone().prop_map(|p| format!("rename from {p}")),
            path.prop_map(|p| format!("rename to {p}")),
            Just("--- /dev/null".to_owned()),
            Just("@@ -0,0 +1 @@".to_owned()),
            Just("+content".to_owned()),
            Just("GIT binary patch".to_owned()),
            "[ -~]{0,20}",
        ]
    }

    proptest! {
        #[test]
        fn arbitrary_bytes(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
            check_result_properties(&data);
        }

        #[test]
        fn patch_like_text(lines in proptest::collection::vec(line(), 0..40)) {
            let text = lines.join("\n");
            check_result_properties(text.as_bytes());
        }
    }
}

#[test]
fn symlink_targets() {
    let cases = [
        ("link", "README", true),
        ("a/link", "../README", true),
        ("a/b/link", "../../src/lib.rs", true),
        ("link", "./x/./y", true),
        ("link", ".", true),
        ("link", "../outside", false),
        ("a/link", "../../outside", false),
        ("link", "/etc/passwd", false),
        ("link", ".git/hooks", false),
        ("link", "x/../.git", false),
        ("link", ".GIT/config", false),
        ("a/link", "b/../../..", false),
        ("link", "", false),
        ("link", "a\\..\\..\\x", false),
    ];
    for (link, target, ok) in cases {
        assert_eq!(
            symlink_target_in_tree(link, target),
            ok,
            "{link} -> {target}"
        );
    }
}

#[test]
fn allow_symlinks_lets_only_in_tree_links_through() {
    if !have_git() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let guest = dir.path().join("guest");
    std::fs::create_dir_all(guest.join("src")).unwrap();
    git(&guest, &["init", "-q", "-b", "main"]);
    std::fs::write(guest.join("src/lib.rs"), "x\n").unwrap();
    std::os::unix::fs::symlink("/etc", guest.join("h")).unwrap();
    git(&guest, &["add", "-A"]);
    git(&guest, &["commit", "-q", "-m", "base"]);
    git(dir.path(), &["clone", "-q", "guest", "host"]);
    let host = dir.path().join("host");

    for (name, target) in [
        ("in", "src/lib.rs"),
        ("up", "../x"),
        ("gitl", ".git/hooks"),
        ("via", "h/passwd"),
        ("chain", "in"),
    ] {
        std::os::unix::fs::symlink(target, guest.join(name)).unwrap();
    }
    git(&guest, &["add", "-A"]);
    git(&guest, &["commit", "-q", "-m", "links"]);
    let patch = git(
        &guest,
        &["diff", "--binary", "--full-index", "HEAD~1", "HEAD"],
    );
    let allow = ApplyOptions {
        skip_unsafe: false,
        allow_symlinks: true,
    };
    let err = apply(patch.as_bytes(), &host, allow)
        .unwrap_err()
        .to_string();
    for refused in ["up", "gitl", "via", "chain"] {
        assert!(
            err.contains(&format!("  {refused}: is a symlink that points out")),
            "{err}"
        );
    }
    assert!(!err.contains("  in:"), "{err}");
    let done = apply(
        patch.as_bytes(),
        &host,
        ApplyOptions {
            skip_unsafe: true,
            allow_symlinks: true,
        },
    )
    .unwrap();
    assert_eq!(done.applied, vec!["in"]);
    assert_eq!(
        std::fs::read_link(host.join("in")).unwrap(),
        PathBuf::from("src/lib.rs")
    );
    for gone in ["up", "gitl", "via", "chain"] {
        assert!(
            std::fs::symlink_metadata(host.join(gone)).is_err(),
            "{gone}"
        );
    }
}

#[test]
fn apply_works_on_a_plain_directory_too() {
    if !have_git() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let plain = dir.path().join("plain");
    std::fs::create_dir_all(&plain).unwrap();
    std::fs::write(plain.join("README"), "old\n").unwrap();
    let done = apply(
        format!("{EDIT}{NEW_FILE}").as_bytes(),
        &plain,
        ApplyOptions::default(),
    )
    .unwrap();
    assert_eq!(done.applied, vec!["README", "new.txt"]);
    assert_eq!(
        std::fs::read_to_string(plain.join("README")).unwrap(),
        "new\n"
    );
    assert_eq!(
        std::fs::read_to_string(plain.join("new.txt")).unwrap(),
        "hi\n"
    );
    assert!(!plain.join(".git").exists());
}

#[test]
fn the_announcement_lists_what_is_left_out() {
    let dir = tree();
    let prepared = prepare(&dir.path().join("ws"), (DEFAULT_LIMIT, "", "")).unwrap();
    let mut err = Vec::new();
    announce(&prepared, &mut err);
    let text = String::from_utf8(err).unwrap();
    assert!(text.contains("entries"), "{text}");
    assert!(
        text.contains("left out 2 special file(s) (sockets, devices, fifos): fifo, sock"),
        "{text}"
    );
}
