use super::*;

fn parse(text: &str) -> Result<Manifest, ManifestError> {
    Manifest::parse(text, Path::new("/work/m.yaml"))
}

const FULL: &str = r#"
name: demo
image: minimal
resources: { cpus: 2, memory: 1GiB, disk: 4GiB }
timeout: 10m
accel: tcg
command: ["curl", "-sf", "https://api.github.com/user"]
workdir: /home/agent/src
env: { LANG: C.UTF-8 }
workspace: ./project
credentials:
  - secret: github
    domains: [api.github.com]
    ttl: 15m
    max_uses: 100
    renew: auto
    inject:
      - env: GITHUB_TOKEN
      - file: { path: .config/gh/hosts.yml, template: "oauth_token: ${SECRET}\n", mode: 0600 }
      - git_credential: {}
allow:
  - domain: registry.npmjs.org
  - domain: "*.pythonhosted.org"
    ports: [443, 8443]
ca_certs: [certs/ca.pem]
network:
  overrides: { api.test.example: [198.18.0.2] }
  allow_cidrs: [198.18.0.0/24]
"#;

#[test]
fn full_manifest_parses_with_every_field() {
    let m = parse(FULL).unwrap();
    assert_eq!(m.name, "demo");
    assert_eq!(m.resources.memory, 1 << 30);
    assert_eq!(m.timeout, Duration::from_secs(600));
    assert_eq!(m.accel, Accel::Tcg);
    assert_eq!(m.command[0], "curl");
    assert_eq!(m.workspace, Some(PathBuf::from("/work/./project")));
    assert_eq!(m.ca_certs, vec![PathBuf::from("/work/certs/ca.pem")]);
    let c = &m.credentials[0];
    assert_eq!(c.renew, Renew::Auto);
    assert_eq!(c.inject.len(), 3);
    assert!(matches!(&c.inject[1], Inject::File(f) if f.mode == 0o600));
    assert!(matches!(&c.inject[2], Inject::GitCredential(g) if g.username == "x-access-token"));
    assert_eq!(m.allow[0].ports, vec![443]);
    assert_eq!(m.allow[1].ports, vec![443, 8443]);
    assert_eq!(m.network.overrides.len(), 1);
}

#[test]
fn defaults_for_a_small_manifest() {
    let m = parse("name: x\nimage: minimal\ncommand: echo hi\n").unwrap();
    assert_eq!(m.command, vec!["sh", "-c", "echo hi"]);
    assert_eq!(m.resources, Resources::default());
    assert_eq!(m.accel, Accel::Auto);
    assert_eq!(m.user, "agent");
    assert_eq!(m.workdir, "/home/agent");
    assert!(m.credentials.is_empty());
}

#[test]
fn unknown_field_names_place_and_suggests() {
    let e = parse("name: x\nimage: minimal\ncommand: a\ncredentials:\n  - secret: s\n    domian: [a.com]\n    inject: [env: X]\n")
        .unwrap_err();
    assert_eq!((e.line, e.column), (Some(6), Some(5)), "{e}");
    assert!(e.message.contains("unknown field `domian`"), "{e}");
    assert_eq!(e.hint.as_deref(), Some("did you mean \"domains\"?"));
    assert!(
        e.to_string().starts_with("/work/m.yaml:6:5: unknown field"),
        "{e}"
    );
}

#[test]
fn invalid_values_are_refused_with_a_place() {
    let base = "name: x\nimage: minimal\ncommand: a\n";
    let cases: &[(&str, &str)] = &[
        (
            "credentials:\n  - secret: s\n    domains: [\"evil@x.com\"]\n    inject: [env: A]\n",
            "not a valid host name",
        ),
        (
            "credentials:\n  - secret: s\n    inject: []\n",
            "has no `inject`",
        ),
        (
            "credentials:\n  - secret: s\n    inject: [env: 1BAD]\n",
            "not a valid variable name",
        ),
        (
            "credentials:\n  - secret: s\n    inject:\n      - file: { path: ../../etc/passwd, template: \"${SECRET}\" }\n",
            "inside the agent's home",
        ),
        (
            "credentials:\n  - secret: s\n    inject:\n      - file: { path: /etc/x, template: \"${SECRET}\" }\n",
            "inside the agent's home",
        ),
        (
            "credentials:\n  - secret: s\n    inject:\n      - file: { path: a, template: \"${SECRET}\", mode: 0666 }\n",
            "writable by others",
        ),
        (
            "credentials:\n  - secret: s\n    inject:\n      - file: { path: a, template: \"no placeholder\" }\n",
            "does not use",
        ),
        (
            "credentials:\n  - secret: s\n    ttl: soon\n    inject: [env: A]\n",
            "not a duration",
        ),
        (
            "credentials:\n  - secret: s\n    max_uses: 0\n    inject: [env: A]\n",
            "at least 1",
        ),
        (
            "env: { A: x }\ncredentials:\n  - secret: s\n    inject: [env: A]\n",
            "set twice",
        ),
        ("allow:\n  - domain: \"*.com\"\n", "registrable domain"),
        (
            "allow:\n  - domain: a.com\n    ports: [0]\n",
            "between 1 and 65535",
        ),
        ("network:\n  allow_cidrs: [10.0.0.0/33]\n", "not a CIDR"),
        ("resources: { memory: 1TB }\n", "unknown size unit"),
        ("accel: kvn\n", "unknown variant `kvn`"),
    ];
    for (extra, want) in cases {
        let e = parse(&format!("{base}{extra}")).unwrap_err();
        assert!(e.to_string().contains(want), "{extra:?}: {e}");
        assert!(e.line.is_some(), "{extra:?} has no line: {e}");
    }
    let e = parse("name: x\nimage: minimal\ncommand: a\naccel: kvn\n").unwrap_err();
    assert_eq!(e.hint.as_deref(), Some("did you mean \"kvm\"?"));
    assert!(parse("name: x\nimage: minimal\ncommand: \"\"\n").is_err());
    assert!(parse("name: \"bad name\"\nimage: minimal\ncommand: a\n").is_err());
}

#[test]
fn oversized_and_hostile_documents_are_refused() {
    let big = format!(
        "name: x\nimage: minimal\ncommand: a\nenv: {{ A: \"{}\" }}\n",
        "x".repeat(MAX_MANIFEST_LEN)
    );
    assert!(parse(&big).unwrap_err().message.contains("limit"));
    let deep = format!(
        "name: x\nimage: minimal\ncommand: a\nenv: {}{}\n",
        "[".repeat(5000),
        "]".repeat(5000)
    );
    assert!(parse(&deep).is_err());
    let bomb = "a: &a [x,x,x,x,x,x,x,x,x]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\nd: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\ne: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\nf: [*e,*e,*e,*e,*e,*e,*e,*e,*e]\n";
    assert!(parse(bomb).is_err());
}

#[test]
fn sizes() {
    assert_eq!(parse_size("512MiB"), Ok(512 << 20));
    assert_eq!(parse_size("2G"), Ok(2_000_000_000));
    assert_eq!(parse_size("1024"), Ok(1024));
    assert!(parse_size("x").is_err());
    assert!(parse_size("99999999999999GiB").is_err());
}

/// Every example manifest in `manifests/` parses.
#[test]
fn example_manifests_parse() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            Manifest::load(&path).unwrap_or_else(|e| panic!("{e}"));
            n += 1;
        }
    }
    assert!(n >= 1, "no example manifests in {}", dir.display());
}
