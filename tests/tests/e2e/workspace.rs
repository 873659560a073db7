//! Workspaces for real: a git repository copied into the VM, an agent that
//! edits it and also plants hooks, hostile git config and symlinks, and
//! what comes back — a patch and a bundle that `apply` brings into the host
//! repository without running or planting anything.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use zerolease::session::workspace::{self, ApplyError, ApplyOptions};
use zerolease::session::{self, SessionError};
use zerolease_tests::require_root_and_tools;

use crate::session::{CANARY, MANIFEST, SessionWorld, image_ready};

/// The agent: edits a tracked file, adds one, plants three hooks and
/// hostile config (each would touch a marker under `@MARK@` if it ever ran
/// on the host), makes two symlinks that point out of the tree and one that
/// stays in it.
const SCRIPT: &str = r#"
echo "pwd=$(pwd)"
echo "edited in the VM" >> README
echo "brand new" > added.txt
for h in post-checkout pre-commit post-merge; do
  printf '#!/bin/sh\ntouch @MARK@/%s\n' "$h" > .git/hooks/$h
  chmod +x .git/hooks/$h
done
git config core.fsmonitor "touch @MARK@/fsmonitor"
git config core.hooksPath .git/hooks
ln -s /etc/passwd passwd-link
ln -s ../../outside outside-link
ln -s README readme-link
echo "token-in-tree=$(ls /home/agent/.config/api 2>/dev/null | wc -l)"
exit 0
"#;

fn git(dir: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new("git")
        .current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("HOME", dir)
        .args(["-c", "user.name=t", "-c", "user.email=t@example.invalid"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every file under `root` (symlinks as their target), with its contents.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let rel = path.strip_prefix(root).unwrap().to_owned();
            if meta.file_type().is_symlink() {
                let target = std::fs::read_link(&path).unwrap();
                out.insert(rel, format!("-> {}", target.display()).into_bytes());
            } else if meta.is_dir() {
                stack.push(path);
            } else {
                out.insert(rel, std::fs::read(&path).unwrap());
            }
        }
    }
    out
}

fn host_repo(root: &Path) -> PathBuf {
    let repo = root.join("project");
    std::fs::create_dir_all(repo.join("src")).unwrap();
    git(&repo, &["init", "-q", "-b", "main"]);
    std::fs::write(repo.join("README"), "the project\n").unwrap();
    std::fs::write(repo.join("src/lib.rs"), "pub fn f() {}\n").unwrap();
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-q", "-m", "base"]);
    repo
}

#[test]
fn workspace_changes_come_back_as_a_safe_patch() {
    if !require_root_and_tools(&["ip", "nft", "qemu-system-x86_64", "git"]) || !image_ready() {
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let marks = scratch.path().join("markers");
    std::fs::create_dir_all(&marks).unwrap();
    let repo = host_repo(scratch.path());
    let script = SCRIPT.replace("@MARK@", &marks.display().to_string());
    let w = SessionWorld::with_manifest(MANIFEST, &script);
    let mut config = w.config();
    config.workspace = Some(repo.clone());
    let before = snapshot(&repo);

    let started = Instant::now();
    let vault = w.vault.clone();
    let manifest = w.manifest.clone();
    let (outcome, out, err) = w.host.block_on(|| async {
        let mut out = Vec::new();
        let mut err = Vec::new();
        let outcome = session::run(vault, manifest, config, &mut out, &mut err).await;
        (outcome, out, err)
    });
    let out = String::from_utf8_lossy(&out).into_owned();
    let err = String::from_utf8_lossy(&err).into_owned();
    eprintln!(
        "TIMING workspace session: {:?}\n--- stdout\n{out}--- stderr\n{err}",
        started.elapsed()
    );
    let outcome = outcome.unwrap_or_else(|e| panic!("the session failed: {e}\n{out}\n{err}"));
    assert_eq!(outcome.code, Some(0), "{out}\n{err}");
    // The agent started in the workspace, below its home; the provisioned
    // (secret) files are not in the tree.
    assert!(out.contains("pwd=/home/agent/work"), "{out}");
    assert!(err.contains("zerolease diff"), "{err}");
    // The host tree was not touched during the session.
    assert_eq!(
        snapshot(&repo),
        before,
        "the workspace changed during the session"
    );

    let dir = workspace::output_dir(&w.home(), &outcome.session);
    let patch = std::fs::read(dir.join(workspace::PATCH_FILE)).unwrap();
    let text = String::from_utf8_lossy(&patch);
    assert!(text.contains("+edited in the VM"), "{text}");
    assert!(
        text.contains("b/added.txt") && text.contains("+brand new"),
        "{text}"
    );
    assert!(!text.contains(".git/"), "{text}");
    assert!(!text.contains(CANARY));
    // What `zerolease diff` warns about: exactly the two symlinks.
    let refused: Vec<String> = workspace::check_patch(&patch)
        .iter()
        .filter(|s| !s.refusals.is_empty())
        .map(|s| s.display_path())
        .collect();
    assert_eq!(refused, vec!["outside-link", "passwd-link", "readme-link"]);
    // The bundle is there and fits on the host's base commit.
    let bundle = dir.join(workspace::BUNDLE_FILE);
    assert!(!String::from_utf8_lossy(&std::fs::read(&bundle).unwrap()).contains(CANARY));
    git(&repo, &["bundle", "verify", "-q", bundle.to_str().unwrap()]);

    let hooks_before = snapshot(&repo.join(".git/hooks"));
    let config_before = std::fs::read(repo.join(".git/config")).unwrap();
    // Plain `apply`: refused as a whole, naming the symlinks; nothing changes.
    let refusal = workspace::apply(&patch, &repo, ApplyOptions::default()).unwrap_err();
    let message = refusal.to_string();
    assert!(matches!(refusal, ApplyError::Unsafe(_)), "{message}");
    assert!(
        message.contains("passwd-link") && message.contains("outside-link"),
        "{message}"
    );
    assert_eq!(snapshot(&repo), before);
    // `--skip-unsafe --allow-symlinks`: the regular changes and the in-tree
    // symlink land, the two pointing out of the tree do not.
    let options = ApplyOptions {
        skip_unsafe: true,
        allow_symlinks: true,
    };
    let done = workspace::apply(&patch, &repo, options).unwrap();
    assert_eq!(done.applied, vec!["README", "added.txt", "readme-link"]);
    assert_eq!(
        std::fs::read_link(repo.join("readme-link")).unwrap(),
        PathBuf::from("README")
    );
    assert_eq!(done.refused.len(), 2);
    assert_eq!(
        std::fs::read_to_string(repo.join("README")).unwrap(),
        "the project\nedited in the VM\n"
    );
    assert_eq!(
        std::fs::read_to_string(repo.join("added.txt")).unwrap(),
        "brand new\n"
    );
    assert!(std::fs::symlink_metadata(repo.join("passwd-link")).is_err());
    assert!(std::fs::symlink_metadata(repo.join("outside-link")).is_err());
    assert_eq!(snapshot(&repo.join(".git/hooks")), hooks_before);
    assert_eq!(
        std::fs::read(repo.join(".git/config")).unwrap(),
        config_before
    );
    // The user goes on with ordinary git (hooks on): nothing planted runs.
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-q", "-m", "agent's work"]);
    git(&repo, &["checkout", "-q", "-b", "other"]);
    git(&repo, &["status", "--short"]);
    assert_eq!(
        std::fs::read_dir(&marks).unwrap().count(),
        0,
        "a planted hook ran on the host"
    );
    // No new output holds the canary: the session's files, its record, the
    // messages on stderr.
    assert!(!err.contains(CANARY));
    for (path, data) in snapshot(&w.home().root().join("sessions")) {
        assert!(
            !String::from_utf8_lossy(&data).contains(CANARY),
            "{} holds the canary",
            path.display()
        );
    }
    w.assert_no_leftovers(&outcome.session);
}

/// A workspace over the limit is refused before anything is set up, with
/// its size and how to fix it.
#[test]
fn an_oversize_workspace_is_refused_before_boot() {
    if !require_root_and_tools(&["ip", "nft", "qemu-system-x86_64"]) || !image_ready() {
        return;
    }
    let manifest = MANIFEST.replace(
        "resources: { memory: 384MiB }",
        "resources: { memory: 64MiB }\nworkspace: big",
    );
    let w = SessionWorld::with_manifest(&manifest, "exit 0");
    let big = w.dir.path().join("big");
    std::fs::create_dir_all(&big).unwrap();
    // Sparse: 40 MiB as far as sizes go, nothing on disk.
    let f = std::fs::File::create(big.join("blob")).unwrap();
    f.set_len(40 << 20).unwrap();
    let vault = w.vault.clone();
    let manifest = w.manifest.clone();
    let config = w.config();
    let started = Instant::now();
    let result = w.host.block_on(|| async {
        let mut sink = Vec::new();
        let mut sink2 = Vec::new();
        session::run(vault, manifest, config, &mut sink, &mut sink2).await
    });
    let err = result.unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, SessionError::Workspace(_)), "{text}");
    assert!(
        text.contains("40.0 MiB") && text.contains("32.0 MiB"),
        "{text}"
    );
    assert!(text.contains("raise resources.memory"), "{text}");
    assert!(started.elapsed().as_secs() < 10, "it booted first");
    // Nothing was set up: no runtime directory, no QEMU.
    assert!(
        !w.dir.path().join("home/run").exists()
            || std::fs::read_dir(w.dir.path().join("home/run"))
                .unwrap()
                .next()
                .is_none()
    );
}

/// A directory that is not a git repository: the guest makes one with a base
/// commit, and the patch applies back to the plain directory.
#[test]
fn a_plain_directory_workspace_round_trips() {
    if !require_root_and_tools(&["ip", "nft", "qemu-system-x86_64", "git"]) || !image_ready() {
        return;
    }
    let manifest = MANIFEST.replace(
        "resources: { memory: 384MiB }",
        "resources: { memory: 384MiB }\nworkspace: plain\nworkdir: /home/agent/src",
    );
    let script =
        "echo \"pwd=$(pwd) log=$(git log --format=%s)\"; echo changed > notes.txt; rm gone.txt";
    let w = SessionWorld::with_manifest(&manifest, script);
    let plain = w.dir.path().join("plain");
    std::fs::create_dir_all(&plain).unwrap();
    std::fs::write(plain.join("notes.txt"), "original\n").unwrap();
    std::fs::write(plain.join("gone.txt"), "to be removed\n").unwrap();
    let vault = w.vault.clone();
    let manifest = w.manifest.clone();
    let config = w.config();
    let (outcome, out, err) = w.host.block_on(|| async {
        let mut out = Vec::new();
        let mut err = Vec::new();
        let outcome = session::run(vault, manifest, config, &mut out, &mut err).await;
        (outcome, out, err)
    });
    let out = String::from_utf8_lossy(&out).into_owned();
    let err = String::from_utf8_lossy(&err).into_owned();
    let outcome = outcome.unwrap_or_else(|e| panic!("the session failed: {e}\n{out}\n{err}"));
    assert_eq!(outcome.code, Some(0), "{out}\n{err}");
    // The manifest's workdir (below the home) is where the copy went, as a
    // repository with one base commit.
    assert!(
        out.contains("pwd=/home/agent/src log=zerolease: the workspace as copied"),
        "{out}"
    );
    let dir = workspace::output_dir(&w.home(), &outcome.session);
    let patch = std::fs::read(dir.join(workspace::PATCH_FILE)).unwrap();
    let done = workspace::apply(&patch, &plain, ApplyOptions::default()).unwrap();
    assert_eq!(done.applied, vec!["gone.txt", "notes.txt"]);
    assert_eq!(
        std::fs::read_to_string(plain.join("notes.txt")).unwrap(),
        "changed\n"
    );
    assert!(!plain.join("gone.txt").exists());
    assert!(!plain.join(".git").exists());
    w.assert_no_leftovers(&outcome.session);
}

/// A session that times out while its agent is still at work: the agent is
/// cut off and stopped, and what it changed so far comes back all the same.
#[test]
fn a_session_that_times_out_still_brings_back_the_work() {
    if !require_root_and_tools(&["ip", "nft", "qemu-system-x86_64", "git"]) || !image_ready() {
        return;
    }
    let manifest = MANIFEST.replace("timeout: 3m", "timeout: 30s").replace(
        "resources: { memory: 384MiB }",
        "resources: { memory: 384MiB }\nworkspace: plain\nworkdir: /home/agent/src",
    );
    let script = "echo changed > notes.txt; echo at-work; sleep 600";
    let w = SessionWorld::with_manifest(&manifest, script);
    let plain = w.dir.path().join("plain");
    std::fs::create_dir_all(&plain).unwrap();
    std::fs::write(plain.join("notes.txt"), "original\n").unwrap();
    let vault = w.vault.clone();
    let manifest = w.manifest.clone();
    let config = w.config();
    let started = Instant::now();
    let (outcome, out, err) = w.host.block_on(|| async {
        let mut out = Vec::new();
        let mut err = Vec::new();
        let outcome = session::run(vault, manifest, config, &mut out, &mut err).await;
        (outcome, out, err)
    });
    let took = started.elapsed();
    let out = String::from_utf8_lossy(&out).into_owned();
    let err = String::from_utf8_lossy(&err).into_owned();
    match outcome {
        Err(SessionError::Timeout(_)) => {}
        other => panic!("expected a timeout, got {other:?}\n{out}\n{err}"),
    }
    assert!(out.contains("at-work"), "{out}\n{err}");
    assert!(
        err.contains("stopping the agent to bring back its workspace"),
        "{err}"
    );
    assert!(
        took < Duration::from_secs(30) + session::COLLECT_GRACE,
        "took {took:?}"
    );
    let sessions = zerolease::session::record::SessionRecord::all(&w.home());
    let [record] = sessions.as_slice() else {
        panic!("expected one session, found {}", sessions.len());
    };
    let id = &record.id;
    let patch = std::fs::read(workspace::output_dir(&w.home(), id).join(workspace::PATCH_FILE))
        .unwrap_or_else(|e| panic!("no patch after the timeout: {e}\n{err}"));
    let done = workspace::apply(&patch, &plain, ApplyOptions::default()).unwrap();
    assert_eq!(done.applied, vec!["notes.txt"]);
    assert_eq!(
        std::fs::read_to_string(plain.join("notes.txt")).unwrap(),
        "changed\n"
    );
    // The audit log tells the story in order: cut off (leases revoked) for
    // the timeout, the agent ended, then the session failed as timed out.
    let details: Vec<String> = w
        .vault
        .audit_list(zerolease::vault::AuditFilter::default())
        .unwrap()
        .into_iter()
        .filter(|r| r.record.event == "session_transition")
        .map(|r| r.record.detail)
        .collect();
    let at = |prefix: &str| {
        details
            .iter()
            .position(|d| d.starts_with(prefix))
            .unwrap_or_else(|| panic!("no `{prefix}` transition in {details:?}"))
    };
    assert!(at("revoked: the session timed out") < at("stopping: agent ended"));
    assert!(at("stopping: agent ended") < at("failed: the session timed out"));
    w.assert_no_leftovers(id);
}
