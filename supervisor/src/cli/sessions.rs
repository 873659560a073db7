//! `zerolease ps`, `zerolease inspect`, and what `zerolease run` shows
//! around a session: progress while it starts and the report at its end
//! (`--quiet`, `--report FILE`, `--ci`).
//!
//! Live numbers (tunnels, bytes, blocked attempts) come from the running
//! session over its control socket (`stats`); a finished or orphaned session
//! shows its record, its leases and, once finished, its stored report.

use std::io::{BufRead, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json as j};

use super::output::{ExitStatus, Table, json};
use super::{lease_row, lease_view};
use crate::clock::{Timestamp, format_duration_short};
use crate::home::StateDir;
use crate::session::progress::{Plain, Progress, ProgressSink, Quiet, Spinner};
use crate::session::record::{SessionRecord, control_socket};
use crate::session::report::{self, SessionReport, format_bytes};
use crate::session::stats::LiveStats;
use crate::vault::{Lease, LeaseFilter, Vault, VaultError};

/// Where `run --ci` writes its JSON report unless `--report` says otherwise.
pub const CI_REPORT: &str = "zerolease-report.json";

/// How `zerolease run` shows a session.
#[derive(Debug, Clone, Default)]
pub struct Presentation {
    pub quiet: bool,
    pub ci: bool,
    pub report: Option<PathBuf>,
}

impl Presentation {
    /// Progress on stderr: nothing with `--quiet`, plain lines under `--ci`
    /// or when stderr is not a terminal, a spinner otherwise.
    pub fn progress(&self) -> Progress {
        let sink: Box<dyn ProgressSink> = if self.quiet {
            Box::new(Quiet)
        } else if self.ci || !std::io::stderr().is_terminal() {
            Box::new(Plain::new(std::io::stderr()))
        } else {
            Box::new(Spinner::default())
        };
        Progress::new(sink)
    }

    /// Where the JSON report goes: `--report`, or [`CI_REPORT`] under `--ci`.
    pub fn report_path(&self) -> Option<PathBuf> {
        self.report
            .clone()
            .or_else(|| self.ci.then(|| PathBuf::from(CI_REPORT)))
    }

    /// Shows the report on stderr (unless `--quiet`) and writes its JSON
    /// where asked. A report that cannot be written is an error: CI relies on
    /// the file.
    ///
    /// A run that failed before it had a session (the image check) has no
    /// report; the file then holds [`early_failure`], so a CI job always
    /// finds one.
    pub fn finish(
        &self,
        report: Option<&SessionReport>,
        error: Option<String>,
    ) -> anyhow::Result<()> {
        let Some(r) = report else {
            if let Some(path) = self.report_path() {
                report::write_json(&path, &early_failure(error)).map_err(|e| {
                    anyhow::anyhow!("cannot write the report to {}: {e}", path.display())
                })?;
            }
            return Ok(());
        };
        if !self.quiet {
            let mut err = std::io::stderr().lock();
            let _ = err.write_all(r.human().as_bytes());
        }
        if let Some(path) = self.report_path() {
            report::write_json(&path, r).map_err(|e| {
                anyhow::anyhow!("cannot write the report to {}: {e}", path.display())
            })?;
        }
        Ok(())
    }
}

/// The report of a run that failed before it had a session.
pub fn early_failure(error: Option<String>) -> Value {
    j!({
        "version": report::REPORT_VERSION,
        "session": null,
        "state": "failed",
        "exit_code": null,
        "signal": null,
        "error": error,
    })
}

/// Asks a running session for its live numbers; `None` when it does not
/// answer (finished, orphaned, or busy for more than two seconds).
pub fn ask_stats(record: &SessionRecord) -> Option<LiveStats> {
    if !record.supervisor_alive() {
        return None;
    }
    let mut stream =
        std::os::unix::net::UnixStream::connect(control_socket(&record.runtime_dir)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    stream
        .set_write_timeout(Some(Duration::from_secs(2)))
        .ok()?;
    writeln!(stream, "{}", crate::session::Control::Stats.as_str()).ok()?;
    let mut line = String::new();
    std::io::BufReader::new(&stream)
        .take(1 << 20)
        .read_line(&mut line)
        .ok()?;
    serde_json::from_str(&line).ok()
}

/// A record's state as `ps` shows it: a session whose `zerolease run` died
/// is `orphaned`.
fn shown_state(r: &SessionRecord) -> String {
    if !r.is_finished() && !r.supervisor_alive() {
        "orphaned".to_owned()
    } else {
        r.state.clone()
    }
}

/// One session of `ps --json`.
pub fn ps_entry(
    r: &SessionRecord,
    state: &str,
    leases: &[Lease],
    live: Option<&LiveStats>,
    now: Timestamp,
) -> Value {
    j!({
        "id": r.id,
        "name": r.name,
        "state": state,
        "image": r.image,
        "started": r.started,
        "age_seconds": r.started.until(now).as_secs(),
        "exit_code": r.exit_code,
        "leases": leases.iter().map(|l| j!({
            "id": l.id, "secret": l.secret, "domains": l.domains,
            "seconds_left": l.time_left(now).as_secs(),
        })).collect::<Vec<_>>(),
        "tunnels_open": live.map(|s| s.tunnels_open),
        "bytes_up": live.map(|s| s.bytes_up),
        "bytes_down": live.map(|s| s.bytes_down),
        "blocked": live.map(|s| s.blocked),
        "live": live,
    })
}

/// `inspect --json`: the record, every lease of the session (active or
/// not), live numbers while it runs, the report once it has finished.
pub fn inspect_entry(
    record: &SessionRecord,
    state: &str,
    leases: &[Lease],
    live: Option<&LiveStats>,
    report: Option<&SessionReport>,
    now: Timestamp,
) -> Value {
    j!({
        "id": record.id,
        "state": state,
        "record": record,
        "leases": leases.iter().map(|l| lease_view(l, now)).collect::<Vec<_>>(),
        "live": live,
        "report": report,
    })
}

fn leases_of(vault: &Vault, session: &str, all: bool) -> anyhow::Result<Vec<Lease>> {
    Ok(vault.list_leases(LeaseFilter {
        session: Some(session.to_owned()),
        include_inactive: all,
    })?)
}

pub fn ps(
    vault: &Vault,
    home: Option<PathBuf>,
    all: bool,
    as_json: bool,
) -> anyhow::Result<ExitStatus> {
    let home = StateDir::resolve(home)?;
    let now = vault.now();
    let mut rows = Vec::new();
    for r in SessionRecord::all(&home) {
        if !all && r.is_finished() {
            continue;
        }
        let state = shown_state(&r);
        let leases = leases_of(vault, &r.id, false)?;
        let live = ask_stats(&r);
        rows.push((r, state, leases, live));
    }
    if as_json {
        let out: Vec<Value> = rows
            .iter()
            .map(|(r, state, leases, live)| ps_entry(r, state, leases, live.as_ref(), now))
            .collect();
        json(&out)?;
        return Ok(ExitStatus::Success);
    }
    let mut t = Table::new(&[
        "SESSION", "NAME", "STATE", "IMAGE", "AGE", "TUNNELS", "BYTES", "BLOCKED", "LEASES",
    ]);
    for (r, state, leases, live) in &rows {
        let dash = || "-".to_owned();
        t.row(vec![
            r.id.clone(),
            r.name.clone(),
            state.clone(),
            r.image.clone(),
            format_duration_short(r.started.until(now)),
            live.as_ref()
                .map_or_else(dash, |s| s.tunnels_open.to_string()),
            live.as_ref().map_or_else(dash, |s| {
                format!(
                    "{}↑ {}↓",
                    format_bytes(s.bytes_up),
                    format_bytes(s.bytes_down)
                )
            }),
            live.as_ref().map_or_else(dash, |s| s.blocked.to_string()),
            leases
                .iter()
                .map(|l| {
                    format!(
                        "{} ({} left)",
                        l.secret,
                        format_duration_short(l.time_left(now))
                    )
                })
                .collect::<Vec<_>>()
                .join(", "),
        ]);
    }
    t.print(if all {
        "no sessions"
    } else {
        "no running sessions (--all shows finished ones)"
    });
    Ok(ExitStatus::Success)
}

pub fn inspect(
    vault: &Vault,
    home: Option<PathBuf>,
    session: &str,
    as_json: bool,
) -> anyhow::Result<ExitStatus> {
    let home = StateDir::resolve(home)?;
    let record = SessionRecord::load(&home, session).map_err(|_| {
        VaultError::Invalid(format!(
            "no session `{session}`; list them with `zerolease ps --all`"
        ))
    })?;
    let now = vault.now();
    let state = shown_state(&record);
    let leases = leases_of(vault, session, true)?;
    let live = ask_stats(&record);
    let report = SessionReport::load(&home, session).ok();
    if as_json {
        json(&inspect_entry(
            &record,
            &state,
            &leases,
            live.as_ref(),
            report.as_ref(),
            now,
        ))?;
        return Ok(ExitStatus::Success);
    }
    println!("session   {}", record.id);
    println!("name      {}", record.name);
    println!("state     {state}");
    println!("image     {}", record.image);
    println!(
        "started   {} ({} ago)",
        record.started.rfc3339(),
        format_duration_short(record.started.until(now))
    );
    if let Some(jail) = &record.jail {
        println!(
            "link      {} (host {}, guest {})",
            jail.interface, jail.host, jail.guest
        );
    }
    if let Some(pid) = record.qemu_pid {
        println!("qemu pid  {pid}");
    }
    if let Some(code) = record.exit_code {
        println!("exit code {code}");
    }
    println!();
    let mut t = Table::new(super::LEASE_HEADER);
    for l in &leases {
        t.row(lease_row(l, now));
    }
    t.print("no leases");
    if let Some(s) = &live {
        println!();
        println!(
            "live: {} tunnel(s) open, {} connection(s), {} up, {} down, {} blocked ({} refused by the proxy)",
            s.tunnels_open,
            s.connections,
            format_bytes(s.bytes_up),
            format_bytes(s.bytes_down),
            s.blocked,
            s.refused
        );
        for tun in &s.tunnels {
            println!(
                "  {}: {} up, {} down, open {}s",
                tun.host,
                format_bytes(tun.bytes_up),
                format_bytes(tun.bytes_down),
                tun.age_seconds
            );
        }
    }
    if let Some(r) = &report {
        println!();
        print!("{}", r.human());
    }
    Ok(ExitStatus::Success)
}

/// Whether `path` names a file `run --ci` may write its report to: not a
/// directory.
pub fn check_report_path(path: &Path) -> anyhow::Result<()> {
    if path.is_dir() {
        return Err(VaultError::Invalid(format!(
            "--report {} is a directory; give a file name such as {CI_REPORT}",
            path.display()
        ))
        .into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> SessionRecord {
        SessionRecord {
            id: "abc123def0".into(),
            name: "ci".into(),
            image: "minimal".into(),
            pid: 1,
            started: Timestamp(1_800_000_000_000),
            state: "running".into(),
            runtime_dir: "/nonexistent".into(),
            jail: None,
            qemu_pid: None,
            exit_code: None,
            workspace: None,
        }
    }

    #[test]
    fn ps_json_has_live_numbers_when_running_and_nulls_otherwise() {
        let now = Timestamp(1_800_000_065_000);
        let live = LiveStats {
            session: "abc123def0".into(),
            tunnels_open: 2,
            bytes_up: 10,
            bytes_down: 20,
            refused: 1,
            blocked: 4,
            ..LiveStats::default()
        };
        let v = ps_entry(&record(), "running", &[], Some(&live), now);
        assert_eq!(v["age_seconds"], 65);
        assert_eq!(v["tunnels_open"], 2);
        assert_eq!(v["bytes_up"], 10);
        assert_eq!(v["blocked"], 4);
        assert_eq!(v["live"]["refused"], 1);
        assert!(v["leases"].as_array().unwrap().is_empty());
        let v = ps_entry(&record(), "orphaned", &[], None, now);
        assert_eq!(v["state"], "orphaned");
        for key in ["tunnels_open", "bytes_up", "bytes_down", "blocked", "live"] {
            assert!(v[key].is_null(), "{key} in {v}");
        }
    }

    #[test]
    fn inspect_json_has_record_leases_live_and_report() {
        let now = Timestamp(1_800_000_065_000);
        let r = record();
        let v = inspect_entry(&r, "running", &[], Some(&LiveStats::default()), None, now);
        assert_eq!(v["id"], "abc123def0");
        assert_eq!(v["record"]["image"], "minimal");
        assert!(v["live"].is_object() && v["report"].is_null());
        let report = crate::session::report::build(
            &crate::session::report::Facts {
                session: "abc123def0",
                name: "ci",
                image: "minimal",
                started: r.started,
                ended: now,
                ending: crate::session::report::Ending {
                    state: "destroyed".into(),
                    exit_code: Some(0),
                    signal: None,
                    error: None,
                },
                phases: &[],
            },
            &[],
        );
        let v = inspect_entry(&r, "destroyed", &[], None, Some(&report), now);
        assert!(v["live"].is_null());
        assert_eq!(v["report"]["exit_code"], 0);
        assert_eq!(v["report"]["durations"]["total_seconds"], 65.0);
        assert!(v["leases"].as_array().unwrap().is_empty());
    }

    #[test]
    fn report_path_defaults_under_ci_only() {
        let p = Presentation::default();
        assert_eq!(p.report_path(), None);
        let ci = Presentation {
            ci: true,
            ..Presentation::default()
        };
        assert_eq!(ci.report_path(), Some(PathBuf::from(CI_REPORT)));
        let both = Presentation {
            ci: true,
            report: Some("out/r.json".into()),
            ..Presentation::default()
        };
        assert_eq!(both.report_path(), Some(PathBuf::from("out/r.json")));
        assert!(check_report_path(Path::new("/")).is_err());
        assert!(check_report_path(Path::new("/nonexistent/r.json")).is_ok());
    }

    #[test]
    fn a_run_without_a_session_still_writes_a_report_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.json");
        let p = Presentation {
            quiet: true,
            ci: true,
            report: Some(path.clone()),
        };
        p.finish(
            None,
            Some("image `minimal` does not match image.json".into()),
        )
        .unwrap();
        let v: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(v["state"], "failed");
        assert!(v["exit_code"].is_null() && v["session"].is_null());
        assert_eq!(v["error"], "image `minimal` does not match image.json");
        // No path asked for: nothing written, no error.
        Presentation::default().finish(None, None).unwrap();
    }

    #[test]
    fn a_dead_session_has_no_live_stats() {
        let mut r = record();
        r.pid = u32::MAX;
        assert_eq!(ask_stats(&r), None);
        assert_eq!(shown_state(&r), "orphaned");
        r.state = "destroyed".into();
        assert_eq!(shown_state(&r), "destroyed");
    }
}
