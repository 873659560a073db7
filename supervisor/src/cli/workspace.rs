//! `zerolease diff` and `zerolease apply`: a session's workspace changes,
//! reviewed and brought into the host tree.
//!
//! **Architecture Invariant:** nothing the guest produced is executed here.
//! The patch is printed (control characters escaped on a terminal), parsed,
//! checked and handed to host git with hooks, fsmonitor and system/global
//! config off (see `session::workspace`). The bundle is only pointed to.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;

use super::output::{ExitStatus, json};
use crate::home::StateDir;
use crate::session::record::SessionRecord;
use crate::session::workspace::{self, ApplyError, BUNDLE_FILE, PATCH_FILE};

fn load(home: &StateDir, session: &str) -> anyhow::Result<Option<(SessionRecord, PathBuf)>> {
    let record = match SessionRecord::load(home, session) {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("error: no session `{session}`; `zerolease ps --all` lists them");
            return Ok(None);
        }
        Err(e) => {
            return Err(e)
                .with_context(|| format!("cannot read the record of session `{session}`"));
        }
    };
    let dir = workspace::output_dir(home, &record.id);
    Ok(Some((record, dir)))
}

fn read_patch(dir: &Path, session: &str) -> anyhow::Result<Option<Vec<u8>>> {
    let path = dir.join(PATCH_FILE);
    match std::fs::read(&path) {
        Ok(p) => Ok(Some(p)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!(
                "error: session `{session}` has no workspace changes (it had no workspace, or the guest did not deliver them)"
            );
            Ok(None)
        }
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// `zerolease diff SESSION [--stat]`.
pub fn diff(home: &StateDir, session: &str, stat: bool, j: bool) -> anyhow::Result<ExitStatus> {
    let Some((_, dir)) = load(home, session)? else {
        return Ok(ExitStatus::NotFound);
    };
    let Some(patch) = read_patch(&dir, session)? else {
        return Ok(ExitStatus::NotFound);
    };
    let sections = workspace::check_patch(&patch);
    if j {
        let files: Vec<_> = sections
            .iter()
            .map(|s| {
                serde_json::json!({
                    "path": s.display_path(),
                    "refused": s.refusals.iter().map(ToString::to_string).collect::<Vec<_>>(),
                })
            })
            .collect();
        let bundle = dir.join(BUNDLE_FILE);
        json(&serde_json::json!({
            "session": session,
            "patch": dir.join(PATCH_FILE),
            "bundle": bundle.exists().then_some(bundle),
            "files": files,
        }))?;
        return Ok(ExitStatus::Success);
    }
    let mut out = std::io::stdout().lock();
    if stat {
        if patch.is_empty() {
            writeln!(out, "no changes")?;
        } else {
            write!(out, "{}", workspace::stat(&dir.join(PATCH_FILE))?)?;
        }
    } else if out.is_terminal() {
        // The patch is the guest's text: never let it drive the terminal.
        write!(
            out,
            "{}",
            workspace::sanitize(&String::from_utf8_lossy(&patch))
        )?;
    } else {
        out.write_all(&patch)?;
    }
    let unsafe_files: Vec<_> = sections.iter().filter(|s| !s.refusals.is_empty()).collect();
    if !unsafe_files.is_empty() {
        eprintln!("zerolease apply will refuse these changes:");
        for s in unsafe_files {
            let why: Vec<_> = s.refusals.iter().map(ToString::to_string).collect();
            eprintln!("  {}: {}", s.display_path(), why.join("; "));
        }
    }
    Ok(ExitStatus::Success)
}

/// `zerolease apply SESSION [--to DIR] [--skip-unsafe] [--allow-symlinks]`.
pub fn apply(
    home: &StateDir,
    session: &str,
    to: Option<PathBuf>,
    options: workspace::ApplyOptions,
    j: bool,
) -> anyhow::Result<ExitStatus> {
    let Some((record, dir)) = load(home, session)? else {
        return Ok(ExitStatus::NotFound);
    };
    let Some(to) = to.or(record.workspace) else {
        eprintln!("error: session `{session}` recorded no workspace; say where with --to DIR");
        return Ok(ExitStatus::Usage);
    };
    let Some(patch) = read_patch(&dir, session)? else {
        return Ok(ExitStatus::NotFound);
    };
    let refuse = |e: &ApplyError, status: ExitStatus| -> anyhow::Result<ExitStatus> {
        if j {
            let refused = match e {
                ApplyError::Unsafe(list) => list
                    .iter()
                    .map(|(p, r)| serde_json::json!({ "path": p, "reason": r }))
                    .collect(),
                _ => Vec::new(),
            };
            json(&serde_json::json!({
                "session": session,
                "to": to,
                "applied": [],
                "refused": refused,
                "error": workspace::chain(e),
            }))?;
        } else {
            eprintln!("error: {}", workspace::chain(e));
        }
        Ok(status)
    };
    match workspace::apply(&patch, &to, options) {
        Ok(done) => {
            if j {
                let refused: Vec<_> = done
                    .refused
                    .iter()
                    .map(|(p, r)| serde_json::json!({ "path": p, "reason": r }))
                    .collect();
                json(&serde_json::json!({
                    "session": session,
                    "to": done.to,
                    "applied": done.applied,
                    "refused": refused,
                }))?;
            } else {
                println!(
                    "applied {} file(s) to {}",
                    done.applied.len(),
                    done.to.display()
                );
                for p in &done.applied {
                    println!("  {p}");
                }
                if !done.refused.is_empty() {
                    eprintln!("skipped {} unsafe change(s):", done.refused.len());
                    for (p, r) in &done.refused {
                        eprintln!("  {p}: {r}");
                    }
                }
            }
            Ok(ExitStatus::Success)
        }
        Err(e @ ApplyError::Unsafe(_)) => refuse(&e, ExitStatus::Denied),
        Err(e) => refuse(&e, ExitStatus::Failure),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::super::{Cli, Command};

    fn parse(args: &[&str]) -> Command {
        Cli::try_parse_from(args).unwrap().command
    }

    #[test]
    fn the_workspace_commands_parse() {
        match parse(&["zerolease", "run", "--workspace", "proj", "m.yaml"]) {
            Command::Run {
                workspace,
                manifest,
                ..
            } => {
                assert_eq!(workspace.as_deref(), Some(std::path::Path::new("proj")));
                assert_eq!(manifest, std::path::PathBuf::from("m.yaml"));
            }
            other => panic!("{other:?}"),
        }
        match parse(&["zerolease", "diff", "--stat", "abc"]) {
            Command::Diff { session, stat } => assert!(stat && session == "abc"),
            other => panic!("{other:?}"),
        }
        match parse(&[
            "zerolease",
            "apply",
            "abc",
            "--to",
            "/tmp/x",
            "--skip-unsafe",
            "--allow-symlinks",
        ]) {
            Command::Apply {
                session,
                to,
                skip_unsafe,
                allow_symlinks,
            } => {
                assert_eq!(session, "abc");
                assert_eq!(to.as_deref(), Some(std::path::Path::new("/tmp/x")));
                assert!(skip_unsafe && allow_symlinks);
            }
            other => panic!("{other:?}"),
        }
        match parse(&["zerolease", "apply", "abc"]) {
            Command::Apply {
                to,
                skip_unsafe,
                allow_symlinks,
                ..
            } => assert!(to.is_none() && !skip_unsafe && !allow_symlinks),
            other => panic!("{other:?}"),
        }
        assert!(Cli::try_parse_from(["zerolease", "apply"]).is_err());
    }

    #[test]
    fn diff_and_apply_report_a_missing_session() {
        let home = tempfile::tempdir().unwrap();
        let home = crate::home::StateDir::at(home.path());
        assert_eq!(
            super::diff(&home, "nope", false, false).unwrap(),
            super::ExitStatus::NotFound
        );
        assert_eq!(
            super::apply(&home, "nope", None, Default::default(), false).unwrap(),
            super::ExitStatus::NotFound
        );
    }
}
