//! A recognisable secret goes through every command; it must come out only
//! where it is asked for (`lease access` on stdout) and nowhere else: not in
//! logs, errors, listings, the audit log, or the database files' bytes.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use super::*;

const CANARY: &str = "zl-CANARY-7f3a9c1e-do-not-leak";
const CANARY2: &str = "zl-CANARY-rotated-42b7e0d1";

struct Cli {
    home: tempfile::TempDir,
    transcript: String,
}

impl Cli {
    fn new() -> Cli {
        Cli {
            home: tempfile::tempdir().unwrap(),
            transcript: String::new(),
        }
    }

    fn run(&mut self, args: &[&str], stdin: Option<&str>) -> Output {
        self.run_with(args, stdin, true)
    }

    /// Runs a command whose stdout is the secret itself: the transcript
    /// keeps its stderr only.
    fn access(&mut self, args: &[&str]) -> Output {
        self.run_with(args, None, false)
    }

    fn run_with(&mut self, args: &[&str], stdin: Option<&str>, record_stdout: bool) -> Output {
        let mut child = Command::new(env!("CARGO_BIN_EXE_zerolease"))
            .args(["-vv"])
            .args(args)
            .env("ZEROLEASE_HOME", self.home.path())
            .env("ZEROLEASE_LOG", "trace")
            .env_remove("ZEROLEASE_KEY_SOURCE")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut input = child.stdin.take().unwrap();
        if let Some(s) = stdin {
            input.write_all(s.as_bytes()).unwrap();
        }
        drop(input);
        let out = child.wait_with_output().unwrap();
        self.transcript.push_str(&format!(
            "$ zerolease {}\n{}{}",
            args.join(" "),
            if record_stdout {
                String::from_utf8_lossy(&out.stdout)
            } else {
                "[stdout is the secret]\n".into()
            },
            String::from_utf8_lossy(&out.stderr)
        ));
        out
    }

    fn ok(&mut self, args: &[&str], stdin: Option<&str>) -> String {
        let out = self.run(args, stdin);
        assert!(
            out.status.success(),
            "{args:?} failed:\n{}",
            self.transcript
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn code(&mut self, args: &[&str]) -> i32 {
        self.run(args, None).status.code().unwrap()
    }
}

#[test]
fn canary_secret_never_leaks() {
    let mut cli = Cli::new();
    cli.ok(
        &[
            "secret",
            "add",
            "gh",
            "--domain",
            "api.github.com",
            "--kind",
            "token",
        ],
        Some(&format!("{CANARY}\n")),
    );
    cli.ok(&["secret", "ls"], None);
    cli.ok(&["--json", "secret", "ls"], None);
    cli.ok(
        &[
            "policy",
            "grant",
            "--agent",
            "ci-*",
            "--secret",
            "gh",
            "--domain",
            "api.github.com",
            "--ttl",
            "10m",
            "--max-uses",
            "5",
            "--renewable",
        ],
        None,
    );
    cli.ok(&["policy", "ls"], None);
    let exported = cli.ok(&["policy", "export"], None);
    let policy_file = cli.home.path().join("policy.yaml");
    std::fs::write(&policy_file, exported).unwrap();
    cli.ok(&["policy", "import", policy_file.to_str().unwrap()], None);
    let lease = cli.ok(
        &[
            "lease",
            "grant",
            "--agent",
            "ci-1",
            "--session",
            "s1",
            "--secret",
            "gh",
            "--ttl",
            "2m",
        ],
        None,
    );
    let lease = lease.trim().to_owned();

    // The one place the value is meant to appear.
    let out = cli.access(&["lease", "access", &lease, "--domain", "api.github.com"]);
    assert!(out.status.success());
    assert_eq!(
        out.stdout,
        CANARY.as_bytes(),
        "access returns the value byte-exact"
    );

    assert_eq!(
        cli.code(&["lease", "access", &lease, "--domain", "evil.example"]),
        3
    );
    assert_eq!(
        cli.code(&[
            "lease",
            "grant",
            "--agent",
            "dev",
            "--session",
            "s1",
            "--secret",
            "gh"
        ]),
        3
    );
    assert_eq!(
        cli.code(&["lease", "access", "0000", "--domain", "api.github.com"]),
        4
    );
    assert_eq!(cli.code(&["secret", "rm", "nope"]), 4);
    assert_eq!(cli.code(&["secret", "add", "--domain", "x.com"]), 2);
    cli.ok(&["lease", "renew", &lease, "--ttl", "5m"], None);
    cli.ok(&["lease", "ls", "--all"], None);
    cli.ok(&["--json", "lease", "ls", "--all"], None);
    cli.ok(&["secret", "rotate", "gh"], Some(CANARY2));
    let out = cli.access(&["lease", "access", &lease, "--domain", "api.github.com"]);
    assert_eq!(
        out.stdout,
        CANARY2.as_bytes(),
        "rotation is seen by the lease"
    );
    cli.ok(&["lease", "revoke", "--session", "s1"], None);
    cli.ok(&["key", "rotate"], None);
    cli.ok(&["audit", "ls"], None);
    cli.ok(&["--json", "audit", "ls"], None);
    cli.ok(&["audit", "verify"], None);
    cli.ok(&["secret", "rm", "gh"], None);

    for canary in [CANARY, CANARY2] {
        assert!(
            !cli.transcript.contains(canary),
            "canary leaked:\n{}",
            cli.transcript
        );
        // Anywhere in the state directory: database, WAL, key file.
        for entry in std::fs::read_dir(cli.home.path()).unwrap() {
            let path = entry.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            for needle in [canary.as_bytes().to_vec(), hex_of(canary).into_bytes()] {
                assert!(
                    !bytes.windows(needle.len()).any(|w| w == needle.as_slice()),
                    "canary found in {}",
                    path.display()
                );
            }
        }
    }
    assert!(
        cli.transcript.contains("lease_accessed"),
        "the audit listing ran"
    );
}

fn hex_of(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn audit_verify_exit_code_names_the_record() {
    let mut cli = Cli::new();
    cli.ok(
        &["secret", "add", "s", "--domain", "x.example.com"],
        Some("v"),
    );
    cli.ok(
        &[
            "policy",
            "grant",
            "--agent",
            "a",
            "--secret",
            "s",
            "--domain",
            "x.example.com",
            "--ttl",
            "1m",
        ],
        None,
    );
    raw_db(cli.home.path())
        .execute(
            "UPDATE audit SET detail = 'nothing to see' WHERE seq = 2",
            [],
        )
        .unwrap();
    let out = cli.run(&["audit", "verify"], None);
    assert_eq!(out.status.code(), Some(6));
    assert!(String::from_utf8_lossy(&out.stdout).contains("record 2 was edited"));
}

#[test]
fn wrong_key_exit_code() {
    let mut cli = Cli::new();
    cli.ok(&["secret", "ls"], None);
    std::fs::write(cli.home.path().join("master.key"), "22".repeat(32)).unwrap();
    let out = cli.run(&["secret", "ls"], None);
    assert_eq!(out.status.code(), Some(5));
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not open this vault"));
}
