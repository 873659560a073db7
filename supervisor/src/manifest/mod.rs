//! Session manifests: the YAML a user writes to say what an agent runs, in
//! which image, with which leased credentials and which credential-less
//! domains.
//!
//! **Architecture Invariant:** this module does no I/O beyond the text it is
//! given: parsing, defaults and validation are pure, so `zerolease manifest
//! check` and the session both get exactly the same answer. Checks that need
//! the vault (a matching grant, the secret's ceiling) live with the vault.
//!
//! Every error names the file, line and column, and where it can, the fix
//! (`unknown field "domian", did you mean "domains"?`).

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::domain::{DomainPattern, HostName};

/// Largest manifest accepted, in bytes.
pub const MAX_MANIFEST_LEN: usize = 256 * 1024;

/// A parsed, validated manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub name: String,
    pub image: String,
    pub resources: Resources,
    pub timeout: Duration,
    pub accel: Accel,
    pub command: Vec<String>,
    pub workdir: String,
    pub user: String,
    pub env: BTreeMap<String, String>,
    pub workspace: Option<PathBuf>,
    pub credentials: Vec<Credential>,
    pub allow: Vec<Allow>,
    pub ca_certs: Vec<PathBuf>,
    pub network: Network,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    #[serde(default = "default_cpus")]
    pub cpus: u32,
    #[serde(default = "default_memory", deserialize_with = "size")]
    pub memory: u64,
    #[serde(default = "default_disk", deserialize_with = "size")]
    pub disk: u64,
}

impl Default for Resources {
    fn default() -> Self {
        Resources {
            cpus: default_cpus(),
            memory: default_memory(),
            disk: default_disk(),
        }
    }
}

fn default_cpus() -> u32 {
    1
}
fn default_memory() -> u64 {
    512 * 1024 * 1024
}
fn default_disk() -> u64 {
    2 * 1024 * 1024 * 1024
}

/// Which accelerator QEMU uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// KVM when usable, falling back to TCG when the guest never says hello.
    #[default]
    Auto,
    Kvm,
    Tcg,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credential {
    pub secret: String,
    /// `None`: the grant's domains. Otherwise a narrowing of them.
    pub domains: Option<Vec<DomainPattern>>,
    pub ttl: Option<Duration>,
    pub max_uses: Option<u32>,
    pub renew: Renew,
    pub inject: Vec<Inject>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Renew {
    /// Renew while the session lives, up to the grant's maximum.
    Auto,
    /// Only `zerolease renew`.
    #[default]
    Manual,
}

/// How a leased value reaches the agent.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Inject {
    /// An environment variable of the agent.
    Env(String),
    /// A file under the agent's home, rendered from a template in which
    /// `${SECRET}` stands for the value.
    File(FileInject),
    /// Served to git by the credential helper, for the credential's domains.
    GitCredential(GitCredential),
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileInject {
    /// Relative to the agent's home; never `..` or absolute.
    pub path: PathBuf,
    pub template: String,
    #[serde(default = "default_mode", deserialize_with = "file_mode")]
    pub mode: u32,
}

fn default_mode() -> u32 {
    0o600
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GitCredential {
    #[serde(default = "default_git_user")]
    pub username: String,
}

fn default_git_user() -> String {
    "x-access-token".into()
}

/// A credential-less domain the agent may reach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allow {
    pub domain: DomainPattern,
    pub ports: Vec<u16>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Network {
    /// Names resolved to fixed addresses by the proxy (private upstreams, tests).
    pub overrides: BTreeMap<HostName, Vec<IpAddr>>,
    /// Special-purpose address ranges the proxy may connect to anyway.
    pub allow_cidrs: Vec<String>,
}

/// The placeholder a file template uses for the secret's value.
pub const SECRET_PLACEHOLDER: &str = "${SECRET}";

/// A manifest error with its place in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestError {
    pub file: PathBuf,
    pub line: Option<u64>,
    pub column: Option<u64>,
    pub message: String,
    pub hint: Option<String>,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(l) = self.line {
            write!(f, ":{l}")?;
            if let Some(c) = self.column {
                write!(f, ":{c}")?;
            }
        }
        write!(f, ": {}", self.message)?;
        if let Some(h) = &self.hint {
            write!(f, "; {h}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ManifestError {}

// ---- raw (as written) ---------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    name: String,
    image: String,
    #[serde(default)]
    resources: Resources,
    #[serde(default, deserialize_with = "opt_duration")]
    timeout: Option<Duration>,
    #[serde(default)]
    accel: Accel,
    command: Command,
    #[serde(default)]
    workdir: Option<String>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    workspace: Option<PathBuf>,
    #[serde(default)]
    credentials: Vec<RawCredential>,
    #[serde(default)]
    allow: Vec<RawAllow>,
    #[serde(default)]
    ca_certs: Vec<PathBuf>,
    #[serde(default)]
    network: RawNetwork,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Command {
    Shell(String),
    Argv(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCredential {
    secret: String,
    #[serde(default)]
    domains: Option<Vec<String>>,
    #[serde(default, deserialize_with = "opt_duration")]
    ttl: Option<Duration>,
    #[serde(default)]
    max_uses: Option<u32>,
    #[serde(default)]
    renew: Renew,
    #[serde(default)]
    inject: Vec<Inject>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAllow {
    domain: String,
    #[serde(default = "default_ports")]
    ports: Vec<u16>,
}

fn default_ports() -> Vec<u16> {
    vec![443]
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNetwork {
    #[serde(default)]
    overrides: BTreeMap<String, Vec<IpAddr>>,
    #[serde(default)]
    allow_cidrs: Vec<String>,
}

fn opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let s = String::deserialize(d)?;
    crate::clock::parse_duration(&s)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

fn size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum S {
        N(u64),
        T(String),
    }
    match S::deserialize(d)? {
        S::N(n) => Ok(n),
        S::T(t) => parse_size(&t).map_err(serde::de::Error::custom),
    }
}

/// Parses `512MiB`, `1GiB`, `2G`, `100M` (powers of 1024 for `Ki/Mi/Gi`,
/// of 1000 for `K/M/G`), or a plain number of bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size; write it like `512MiB` or `2GiB`"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KB" => 1000,
        "Ki" | "KiB" => 1 << 10,
        "M" | "MB" => 1000 * 1000,
        "Mi" | "MiB" => 1 << 20,
        "G" | "GB" => 1000 * 1000 * 1000,
        "Gi" | "GiB" => 1 << 30,
        other => {
            return Err(format!(
                "unknown size unit `{other}` in `{s}`; use KiB, MiB or GiB"
            ));
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("`{s}` is too large"))
}

fn file_mode<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    d.deserialize_any(ModeVisitor)
}

/// File modes as people write them: `0600`, `600`, `"0600"`, `0o600`.
/// YAML readers disagree on whether `0600` is octal (this one reads a
/// number), so a number whose digits are all octal digits is taken as the
/// octal digits written; any other number is the mode's value.
struct ModeVisitor;

impl ModeVisitor {
    fn from_digits<E: serde::de::Error>(digits: &str) -> Result<u32, E> {
        u32::from_str_radix(digits, 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .ok_or_else(|| {
                E::custom(format!(
                    "mode `{digits}` is not an octal file mode like 0600"
                ))
            })
    }

    fn from_number<E: serde::de::Error>(n: u64) -> Result<u32, E> {
        let digits = n.to_string();
        if digits.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
            Self::from_digits(&digits)
        } else {
            u32::try_from(n)
                .ok()
                .filter(|m| *m <= 0o777)
                .ok_or_else(|| E::custom(format!("mode `{n}` is not a file mode like 0600")))
        }
    }
}

impl serde::de::Visitor<'_> for ModeVisitor {
    type Value = u32;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an octal file mode such as 0600")
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<u32, E> {
        Self::from_number(v)
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<u32, E> {
        u64::try_from(v)
            .map_err(|_| E::custom("a file mode cannot be negative"))
            .and_then(Self::from_number)
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<u32, E> {
        if v.fract() != 0.0 || !(0.0..=1e6).contains(&v) {
            return Err(E::custom(format!(
                "mode `{v}` is not a file mode like 0600"
            )));
        }
        Self::from_number(v as u64)
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<u32, E> {
        Self::from_digits(v.trim().trim_start_matches("0o"))
    }
}

// ---- parsing and validation ---------------------------------------------

impl Manifest {
    /// Parses and validates `text`, read from `file` (used in messages and
    /// to resolve relative paths of `workspace` and `ca_certs`).
    pub fn parse(text: &str, file: &Path) -> Result<Manifest, ManifestError> {
        let err = |message: String, hint: Option<String>| ManifestError {
            file: file.to_owned(),
            line: None,
            column: None,
            message,
            hint,
        };
        if text.len() > MAX_MANIFEST_LEN {
            return Err(err(
                format!(
                    "the manifest is {} bytes; the limit is {MAX_MANIFEST_LEN}",
                    text.len()
                ),
                None,
            ));
        }
        let raw: Raw = serde_saphyr::from_str(text).map_err(|e| {
            let loc = e.location();
            let message = first_line(&e.to_string());
            ManifestError {
                file: file.to_owned(),
                line: loc.map(|l| l.line()),
                column: loc.map(|l| l.column()),
                hint: suggestion(&message),
                message,
            }
        })?;
        let at = |what: &str, line_of: &str| {
            locate(text, line_of).map_or_else(
                || err(what.to_owned(), None),
                |(l, c)| ManifestError {
                    file: file.to_owned(),
                    line: Some(l),
                    column: Some(c),
                    message: what.to_owned(),
                    hint: None,
                },
            )
        };
        crate::vault::policy::validate_name("session", &raw.name).map_err(|m| at(&m, "name:"))?;
        if raw.image.trim().is_empty() {
            return Err(at("`image` is empty", "image:"));
        }
        let r = raw.resources;
        if !(1..=64).contains(&r.cpus) {
            return Err(at("`resources.cpus` must be between 1 and 64", "cpus:"));
        }
        if r.memory < 64 << 20 {
            return Err(at("`resources.memory` must be at least 64MiB", "memory:"));
        }
        let command = match raw.command {
            Command::Shell(s) if !s.trim().is_empty() => vec!["sh".into(), "-c".into(), s],
            Command::Argv(v) if !v.is_empty() && !v[0].is_empty() => v,
            _ => return Err(at("`command` is empty", "command:")),
        };
        if command.iter().any(|a| a.contains('\0')) {
            return Err(at("`command` contains a NUL byte", "command:"));
        }
        for (k, v) in &raw.env {
            if !valid_env_name(k) {
                return Err(at(&format!("`env.{k}` is not a valid variable name"), k));
            }
            if v.contains('\0') {
                return Err(at(&format!("`env.{k}` contains a NUL byte"), k));
            }
        }
        let mut credentials = Vec::new();
        let mut env_names: Vec<&str> = raw.env.keys().map(String::as_str).collect();
        for c in &raw.credentials {
            crate::vault::policy::validate_name("secret", &c.secret)
                .map_err(|m| at(&m, &c.secret))?;
            let domains = match &c.domains {
                None => None,
                Some(list) if list.is_empty() => {
                    return Err(at(
                        &format!(
                            "credential `{}` lists no domains; drop `domains` to use the grant's",
                            c.secret
                        ),
                        &c.secret,
                    ));
                }
                Some(list) => Some(
                    list.iter()
                        .map(|d| DomainPattern::parse(d).map_err(|e| at(&e.to_string(), d)))
                        .collect::<Result<Vec<_>, _>>()?,
                ),
            };
            if c.max_uses == Some(0) {
                return Err(at("`max_uses` must be at least 1", "max_uses:"));
            }
            if c.inject.is_empty() {
                return Err(at(
                    &format!(
                        "credential `{}` has no `inject`: say how the agent gets it (env, file or git_credential)",
                        c.secret
                    ),
                    &c.secret,
                ));
            }
            for i in &c.inject {
                match i {
                    Inject::Env(name) => {
                        if !valid_env_name(name) {
                            return Err(at(
                                &format!("`{name}` is not a valid variable name"),
                                name,
                            ));
                        }
                        if env_names.contains(&name.as_str()) {
                            return Err(at(&format!("variable `{name}` is set twice"), name));
                        }
                        env_names.push(name);
                    }
                    Inject::File(f) => {
                        confined(&f.path).map_err(|m| at(&m, &f.path.to_string_lossy()))?;
                        if f.mode & 0o022 != 0 {
                            return Err(at(
                                &format!(
                                    "file `{}` would be writable by others (mode {:o}); use 0600",
                                    f.path.display(),
                                    f.mode
                                ),
                                "mode:",
                            ));
                        }
                        if !f.template.contains(SECRET_PLACEHOLDER) {
                            return Err(at(
                                &format!(
                                    "the template for `{}` does not use {SECRET_PLACEHOLDER}",
                                    f.path.display()
                                ),
                                "template:",
                            ));
                        }
                    }
                    Inject::GitCredential(g) => {
                        if g.username.is_empty() || g.username.chars().any(|c| c.is_control()) {
                            return Err(at(
                                "`git_credential.username` must be a plain name",
                                "username:",
                            ));
                        }
                    }
                }
            }
            credentials.push(Credential {
                secret: c.secret.clone(),
                domains,
                ttl: c.ttl,
                max_uses: c.max_uses,
                renew: c.renew,
                inject: c.inject.clone(),
            });
        }
        let mut allow = Vec::new();
        for a in &raw.allow {
            let domain =
                DomainPattern::parse(&a.domain).map_err(|e| at(&e.to_string(), &a.domain))?;
            if a.ports.is_empty() || a.ports.contains(&0) {
                return Err(at(
                    &format!(
                        "`allow` entry `{}` needs ports between 1 and 65535",
                        a.domain
                    ),
                    &a.domain,
                ));
            }
            allow.push(Allow {
                domain,
                ports: a.ports.clone(),
            });
        }
        let mut overrides = BTreeMap::new();
        for (name, addrs) in &raw.network.overrides {
            let host = HostName::parse(name).map_err(|e| at(&e.to_string(), name))?;
            if addrs.is_empty() {
                return Err(at(
                    &format!("override for `{name}` lists no addresses"),
                    name,
                ));
            }
            overrides.insert(host, addrs.clone());
        }
        for cidr in &raw.network.allow_cidrs {
            valid_cidr(cidr).map_err(|m| at(&m, cidr))?;
        }
        let base = file.parent().unwrap_or(Path::new("."));
        Ok(Manifest {
            name: raw.name,
            image: raw.image,
            resources: r,
            timeout: raw.timeout.unwrap_or(Duration::from_secs(3600)),
            accel: raw.accel,
            command,
            workdir: raw.workdir.unwrap_or_else(|| "/home/agent".into()),
            user: raw.user.unwrap_or_else(|| "agent".into()),
            env: raw.env,
            workspace: raw.workspace.map(|w| base.join(w)),
            credentials,
            allow,
            ca_certs: raw.ca_certs.iter().map(|c| base.join(c)).collect(),
            network: Network {
                overrides,
                allow_cidrs: raw.network.allow_cidrs,
            },
        })
    }

    /// Reads and parses a manifest file.
    pub fn load(path: &Path) -> Result<Manifest, ManifestError> {
        let text = std::fs::read_to_string(path).map_err(|e| ManifestError {
            file: path.to_owned(),
            line: None,
            column: None,
            message: format!("cannot read the manifest: {e}"),
            hint: None,
        })?;
        Manifest::parse(&text, path)
    }
}

fn first_line(s: &str) -> String {
    let line = s.lines().next().unwrap_or(s);
    // serde-saphyr prefixes "error: line L column C: "; we print our own.
    match line.split_once(": ") {
        Some((head, rest)) if head.starts_with("error") => match rest.split_once(": ") {
            Some((loc, msg)) if loc.starts_with("line ") => msg.to_owned(),
            _ => rest.to_owned(),
        },
        _ => line.to_owned(),
    }
}

/// For "unknown field (or variant) `x`, expected one of a, b": the closest
/// expected name.
fn suggestion(message: &str) -> Option<String> {
    let rest = message
        .strip_prefix("unknown field `")
        .or_else(|| message.strip_prefix("unknown variant `"))?;
    let (field, rest) = rest.split_once('`')?;
    let expected = rest.split_once("expected one of ")?.1;
    let best = expected
        .split(", ")
        .map(|c| c.trim_matches(|ch: char| ch == '`' || ch.is_whitespace()))
        .min_by_key(|c| strsim::damerau_levenshtein(field, c))?;
    (strsim::damerau_levenshtein(field, best) <= 2.max(field.len() / 3))
        .then(|| format!("did you mean \"{best}\"?"))
}

/// Line and column (1-based) of the first occurrence of `needle`.
fn locate(text: &str, needle: &str) -> Option<(u64, u64)> {
    if needle.is_empty() {
        return None;
    }
    text.lines()
        .enumerate()
        .find_map(|(i, l)| l.find(needle).map(|c| (i as u64 + 1, c as u64 + 1)))
}

fn valid_env_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c == '_' || c.is_ascii_alphabetic())
        && chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
}

/// A path that stays under the agent's home: relative, no `..`, no root.
fn confined(p: &Path) -> Result<(), String> {
    if p.as_os_str().is_empty() {
        return Err("a file path is empty".into());
    }
    for c in p.components() {
        match c {
            Component::Normal(_) | Component::CurDir => {}
            _ => {
                return Err(format!(
                    "file `{}` must stay inside the agent's home: use a relative path without `..`",
                    p.display()
                ));
            }
        }
    }
    Ok(())
}

fn valid_cidr(s: &str) -> Result<(), String> {
    let bad = || format!("`{s}` is not a CIDR like 10.0.0.0/8 or fd00::/8");
    let (addr, len) = s.split_once('/').ok_or_else(bad)?;
    let addr: IpAddr = addr.parse().map_err(|_| bad())?;
    let len: u8 = len.parse().map_err(|_| bad())?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    if len > max {
        return Err(bad());
    }
    Ok(())
}

#[cfg(test)]
mod tests;
