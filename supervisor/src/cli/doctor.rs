//! `zerolease doctor`: the host checks of [`crate::doctor`], for people
//! (one line per check, the fix under each problem) or `--json`.

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use super::output::{ExitStatus, json};
use crate::doctor::{Check, DoctorConfig, Status};
use crate::home::StateDir;

#[derive(Serialize)]
struct Report<'a> {
    ok: bool,
    checks: &'a [Check],
}

/// Runs the checks; exits 0 when nothing failed (warnings allowed), 1 when
/// a session could not run on this host.
pub fn run(
    home: Option<PathBuf>,
    images: Option<PathBuf>,
    image: String,
    kvm_timeout: Duration,
    as_json: bool,
) -> anyhow::Result<ExitStatus> {
    let home = StateDir::resolve(home)?;
    let checks = crate::doctor::run(&DoctorConfig {
        home,
        images,
        image,
        kvm_bound: kvm_timeout,
    });
    let ok = !checks.iter().any(|c| c.status == Status::Fail);
    if as_json {
        json(&Report {
            ok,
            checks: &checks,
        })?;
    } else {
        print!("{}", render(&checks));
    }
    Ok(if ok {
        ExitStatus::Success
    } else {
        ExitStatus::Failure
    })
}

/// The human form: status, name, what was found; the fix indented below.
pub fn render(checks: &[Check]) -> String {
    let width = checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
    let mut out = String::new();
    for c in checks {
        out.push_str(&format!(
            "{:<4}  {:<width$}  {}\n",
            c.status.as_str(),
            c.name,
            c.detail
        ));
        if let Some(fix) = &c.fix {
            out.push_str(&format!("{:<4}  {:<width$}  fix: {fix}\n", "", ""));
        }
    }
    let failed = checks.iter().filter(|c| c.status == Status::Fail).count();
    let warned = checks.iter().filter(|c| c.status == Status::Warn).count();
    out.push_str(&match (failed, warned) {
        (0, 0) => "this host can run zerolease sessions\n".to_owned(),
        (0, w) => format!("this host can run zerolease sessions ({w} warning(s) above)\n"),
        (f, _) => format!(
            "{f} problem(s) stop sessions on this host; fix them and run zerolease doctor again\n"
        ),
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_fixes_under_problems() {
        let checks = vec![
            Check {
                name: "qemu",
                status: Status::Ok,
                detail: "found".into(),
                fix: None,
            },
            Check {
                name: "tun",
                status: Status::Fail,
                detail: "/dev/net/tun does not exist".into(),
                fix: Some("sudo modprobe tun".into()),
            },
        ];
        let text = render(&checks);
        assert_eq!(
            text,
            "ok    qemu  found\n\
             FAIL  tun   /dev/net/tun does not exist\n\
             \x20     \x20     fix: sudo modprobe tun\n\
             1 problem(s) stop sessions on this host; fix them and run zerolease doctor again\n"
        );
    }
}
