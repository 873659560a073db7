//! Every example manifest in `manifests/` passes `zerolease manifest check`
//! — syntax, fields, and a policy grant for each credential — with a vault
//! set up through the CLI the way a user would (`secret add`, value on
//! stdin; `policy grant`). Without the grants the same check fails.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use zerolease::manifest::Manifest;

fn zerolease(home: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_zerolease"))
        .arg("--home")
        .arg(home)
        .args(args)
        .env_remove("ZEROLEASE_KEY_SOURCE")
        .env_remove("ZEROLEASE_MASTER_KEY")
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
    child.wait_with_output().unwrap()
}

fn manifests() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests");
    let mut out: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    out.sort();
    out
}

#[test]
fn every_example_manifest_passes_manifest_check() {
    let files = manifests();
    let names: Vec<String> = files
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for must in ["ci.yaml", "demo.yaml"] {
        assert!(names.iter().any(|n| n == must), "no {must} in {names:?}");
    }
    for file in &files {
        let manifest = Manifest::load(file).unwrap_or_else(|e| panic!("{e}"));
        let home = tempfile::tempdir().unwrap();
        let path = file.to_str().unwrap();

        // Without grants the check fails (exit 3) and names the credential.
        if let Some(c) = manifest.credentials.first() {
            let out = zerolease(home.path(), &["manifest", "check", path], None);
            assert_eq!(out.status.code(), Some(3), "{}", file.display());
            assert!(
                String::from_utf8_lossy(&out.stderr).contains(&c.secret),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }

        for c in &manifest.credentials {
            let domains: Vec<String> = c.domains.as_ref().map_or_else(
                || vec!["example.invalid".to_owned()],
                |d| d.iter().map(ToString::to_string).collect(),
            );
            let mut add = vec!["secret", "add", c.secret.as_str()];
            let mut grant = vec![
                "policy",
                "grant",
                "--agent",
                manifest.name.as_str(),
                "--secret",
                c.secret.as_str(),
                "--ttl",
                "24h",
            ];
            for d in &domains {
                add.extend(["--domain", d.as_str()]);
                grant.extend(["--domain", d.as_str()]);
            }
            let out = zerolease(home.path(), &add, Some("not-a-real-value\n"));
            assert!(out.status.success(), "{:?}", out);
            let out = zerolease(home.path(), &grant, None);
            assert!(out.status.success(), "{:?}", out);
        }
        let out = zerolease(home.path(), &["--json", "manifest", "check", path], None);
        assert!(
            out.status.success(),
            "{}: {}{}",
            file.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["ok"], true, "{v}");
        assert_eq!(
            v["credentials"].as_array().unwrap().len(),
            manifest.credentials.len()
        );
    }
}
