//! The credential scanner for guest images.
//!
//! [`scan_bytes`] is the pure core: one file's path inside the image and its
//! contents in, findings out. The walkers ([`scan_dir`], [`scan_cpio`],
//! [`scan_path`]) only feed it.
//!
//! **Architecture Invariant:** a [`Finding`] names the file, the rule and a
//! line or byte offset — never the matched text. Findings are printed,
//! written to `image.json` and logged, so they must not carry the secret
//! they found.
//!
//! **Architecture Invariant:** walkers fail closed: a file or archive member
//! that cannot be read is an error, not a clean result.

use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::LazyLock;

use regex::bytes::{Regex, RegexSet};
use serde::{Deserialize, Serialize};

use super::cpio::{self, CpioError};

/// Largest single file the scanner reads into memory (an initramfs member
/// or a file in a directory).
pub const MAX_FILE: u64 = 512 << 20;

/// What a finding matched. Path rules look at well-known credential files;
/// pattern rules look at every file, binaries included.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Rule {
    /// PEM (`-----BEGIN … PRIVATE KEY-----`, any flavour incl. OPENSSH,
    /// ENCRYPTED, PGP) or SSH2 private key with a body.
    PrivateKey,
    /// PuTTY `.ppk` private key.
    PuttyKey,
    /// `.netrc` with a `password` token.
    NetrcPassword,
    /// `.git-credentials` with `scheme://user:pass@`.
    GitCredentials,
    /// `.npmrc` with `_authToken`, `_auth` or `_password`.
    NpmrcAuth,
    /// `.docker/config.json` with an `auths` entry carrying `auth`.
    DockerAuth,
    /// `.aws/credentials` (or config) with `aws_secret_access_key`.
    AwsCredentials,
    /// gh `hosts.yml` with `oauth_token`.
    GhOauthToken,
    GithubToken,
    GitlabToken,
    NpmToken,
    PypiToken,
    SlackToken,
    AwsAccessKeyId,
    GoogleApiKey,
}

impl Rule {
    pub fn describe(self) -> &'static str {
        match self {
            Rule::PrivateKey => "private key",
            Rule::PuttyKey => "PuTTY private key",
            Rule::NetrcPassword => ".netrc password",
            Rule::GitCredentials => "git credential with a password",
            Rule::NpmrcAuth => ".npmrc auth token",
            Rule::DockerAuth => "docker registry auth",
            Rule::AwsCredentials => "AWS secret access key",
            Rule::GhOauthToken => "gh oauth_token",
            Rule::GithubToken => "GitHub token pattern",
            Rule::GitlabToken => "GitLab token pattern",
            Rule::NpmToken => "npm token pattern",
            Rule::PypiToken => "PyPI token pattern",
            Rule::SlackToken => "Slack token pattern",
            Rule::AwsAccessKeyId => "AWS access key id pattern",
            Rule::GoogleApiKey => "Google API key pattern",
        }
    }
}

/// Where in a file: a line for text, a byte offset for binaries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Location {
    Line(u64),
    Offset(u64),
}

/// One suspected credential. Holds no part of the matched text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    /// Path inside the image, starting with `/`.
    pub path: String,
    pub rule: Rule,
    pub location: Location,
    /// For private keys only: SHA-256 of the whole key block (BEGIN line
    /// through END line), so a known public test key can be allowed by
    /// digest. Never set for passwords or tokens, whose digests could be
    /// brute-forced back to the secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (what, n) = match self.location {
            Location::Line(n) => ("line", n),
            Location::Offset(n) => ("offset", n),
        };
        write!(f, "{}: {} at {what} {n}", self.path, self.rule.describe())?;
        if let Some(fp) = &self.fingerprint {
            write!(f, " (sha256 {fp})")?;
        }
        Ok(())
    }
}

/// What a walk looked at and found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScanReport {
    pub files: u64,
    pub bytes: u64,
    pub findings: Vec<Finding>,
    /// Findings an [`Allowlist`] accepted; recorded, not failing.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed: Vec<Finding>,
}

impl ScanReport {
    pub fn is_clean(&self) -> bool {
        self.findings.is_empty()
    }

    fn add(&mut self, path: &str, contents: &[u8]) {
        self.files += 1;
        self.bytes += contents.len() as u64;
        self.findings.extend(scan_bytes(path, contents));
    }

    pub fn merge(&mut self, other: ScanReport) {
        self.files += other.files;
        self.bytes += other.bytes;
        self.findings.extend(other.findings);
        self.allowed.extend(other.allowed);
    }

    /// Moves the findings `allow` accepts from `findings` to `allowed`.
    pub fn apply(&mut self, allow: &Allowlist) {
        let (allowed, findings) = std::mem::take(&mut self.findings)
            .into_iter()
            .partition(|f| allow.accepts(f));
        self.findings = findings;
        self.allowed.extend::<Vec<Finding>>(allowed);
    }
}

/// Private keys known to be public test material (e.g. the self-test keys
/// GnuTLS compiles into `libgnutls.so`), accepted by the SHA-256 of the
/// whole key block. Only private-key findings can be allowed, and only by
/// exact digest: there is no path or rule wildcard.
///
/// Text format: one `SHA256  reason…` per line, `#` comments.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allowlist {
    digests: std::collections::BTreeSet<String>,
}

#[derive(Debug, thiserror::Error)]
#[error("allowlist line {line}: expected a 64-digit hex SHA-256, then a reason")]
pub struct AllowlistError {
    pub line: usize,
}

impl Allowlist {
    pub fn parse(text: &str) -> Result<Allowlist, AllowlistError> {
        let mut digests = std::collections::BTreeSet::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let mut words = line.split_whitespace();
            let digest = words.next().unwrap_or("");
            let has_reason = words.next().is_some();
            if digest.len() != 64 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) || !has_reason {
                return Err(AllowlistError { line: i + 1 });
            }
            digests.insert(digest.to_ascii_lowercase());
        }
        Ok(Allowlist { digests })
    }

    pub fn accepts(&self, f: &Finding) -> bool {
        f.rule == Rule::PrivateKey
            && f.fingerprint
                .as_ref()
                .is_some_and(|fp| self.digests.contains(fp))
    }

    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }
}

/// The SHA-256 of a private key block starting at `start`: through the end
/// of its END line (or the `-----`-free end of the block if none follows
/// within 64 KiB).
fn key_fingerprint(contents: &[u8], start: usize) -> String {
    use sha2::{Digest, Sha256};
    let window = &contents[start..contents.len().min(start + 64 * 1024)];
    let end = window
        .windows(8)
        .position(|w| w == b"-----END" || w == b"---- END")
        .map(|at| {
            window[at..]
                .iter()
                .position(|&b| b == b'\n')
                .map_or(window.len(), |nl| at + nl + 1)
        })
        .unwrap_or(window.len());
    hex::encode(Sha256::digest(&window[..end]))
}

/// Why a walk could not finish. A failed walk is not a clean scan.
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error("cannot read `{path}`")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("`{path}` is {size} bytes, over the scanner's {MAX_FILE}-byte limit")]
    TooLarge { path: PathBuf, size: u64 },
    #[error("cannot read the cpio archive `{path}`")]
    Cpio {
        path: PathBuf,
        #[source]
        source: CpioError,
    },
}

// Pattern rules. `(?-u)` makes `\b` and classes ASCII so they work on
// binaries; length bounds and boundaries keep random bytes in ELF files and
// base64 in CA bundles from matching.
struct Patterns {
    any: RegexSet,
    rules: Vec<(Rule, Regex)>,
    putty_lines: Regex,
}

const PEM_PRIVATE: &str = r"(?-u)(?:-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----|---- BEGIN SSH2 (?:ENCRYPTED )?PRIVATE KEY ----)[ \t]*\r?\n(?:[A-Za-z0-9-]+:[^\n]*\n|[ \t]*\r?\n)*[A-Za-z0-9+/]{16}";
const PUTTY: &str = r"(?-u)PuTTY-User-Key-File-[0-9]+: *[A-Za-z0-9@.-]+\r?\n";

static PATTERNS: LazyLock<Patterns> = LazyLock::new(|| {
    let table: &[(Rule, &str)] = &[
        (Rule::PrivateKey, PEM_PRIVATE),
        (Rule::PuttyKey, PUTTY),
        (Rule::GithubToken, r"(?-u)\bgh[pousr]_[A-Za-z0-9]{36,251}\b"),
        (
            Rule::GithubToken,
            r"(?-u)\bgithub_pat_[A-Za-z0-9_]{70,251}\b",
        ),
        (
            Rule::GitlabToken,
            r"(?-u)\bglpat-[A-Za-z0-9_.-]{20,128}(?:[^A-Za-z0-9_.-]|$)",
        ),
        (Rule::NpmToken, r"(?-u)\bnpm_[A-Za-z0-9]{36}\b"),
        (Rule::PypiToken, r"(?-u)\bpypi-AgEI[A-Za-z0-9_-]{50,}"),
        (
            Rule::SlackToken,
            r"(?-u)\bxox[abprs]-[0-9A-Za-z]{1,40}-[0-9A-Za-z-]{8,250}",
        ),
        (Rule::AwsAccessKeyId, r"(?-u)\b(?:AKIA|ASIA)[A-Z0-9]{16}\b"),
        (
            Rule::GoogleApiKey,
            r"(?-u)\bAIza[0-9A-Za-z_-]{35}(?:[^0-9A-Za-z_-]|$)",
        ),
    ];
    let rules: Vec<(Rule, Regex)> = table
        .iter()
        .map(|(rule, re)| (*rule, Regex::new(re).expect("scanner pattern compiles")))
        .collect();
    let any = RegexSet::new(table.iter().map(|(_, re)| *re)).expect("scanner patterns compile");
    Patterns {
        any,
        rules,
        putty_lines: Regex::new(r"(?-u)Private-Lines: *[0-9]+").expect("pattern compiles"),
    }
});

/// Scans one file: `path` is its path inside the image (used to pick the
/// path rules), `contents` its bytes. Pure.
pub fn scan_bytes(path: &str, contents: &[u8]) -> Vec<Finding> {
    let path = normalise(path);
    let mut out = Vec::new();
    let mut push = |rule: Rule, location: Location, fingerprint: Option<String>| {
        out.push(Finding {
            path: path.clone(),
            rule,
            location,
            fingerprint,
        })
    };

    for (rule, line) in path_rules(&path, contents) {
        push(rule, Location::Line(line), None);
    }

    let p = &*PATTERNS;
    let matched = p.any.matches(contents);
    if matched.matched_any() {
        let binary = contents.contains(&0);
        let locate = |off: usize| {
            if binary {
                Location::Offset(off as u64)
            } else {
                Location::Line(line_of(contents, off))
            }
        };
        for i in matched.iter() {
            let (rule, re) = &p.rules[i];
            for m in re.find_iter(contents) {
                if *rule == Rule::PuttyKey {
                    // A key file has its private block after the header.
                    let rest = &contents[m.end()..contents.len().min(m.end() + 16 * 1024)];
                    if !p.putty_lines.is_match(rest) {
                        continue;
                    }
                }
                let fingerprint =
                    (*rule == Rule::PrivateKey).then(|| key_fingerprint(contents, m.start()));
                push(*rule, locate(m.start()), fingerprint);
            }
        }
    }
    out
}

/// `/`-rooted, without `./` or duplicate slashes.
fn normalise(path: &str) -> String {
    let parts: Vec<&str> = path
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    format!("/{}", parts.join("/"))
}

fn line_of(contents: &[u8], off: usize) -> u64 {
    contents[..off].iter().filter(|&&b| b == b'\n').count() as u64 + 1
}

/// Lines of `contents` with 1-based numbers, comments (`#`, `;`) dropped.
fn lines(contents: &[u8]) -> impl Iterator<Item = (u64, &str)> {
    contents
        .split(|&b| b == b'\n')
        .enumerate()
        .filter_map(|(i, l)| {
            let l = std::str::from_utf8(l).ok()?.trim();
            (!l.starts_with('#') && !l.starts_with(';')).then_some((i as u64 + 1, l))
        })
}

/// True if `value` is empty, an empty quoted string, or only a reference
/// to an environment variable (`${NPM_TOKEN}`), which holds no secret.
fn no_secret_value(value: &str) -> bool {
    let v = value.trim().trim_matches(|c| c == '"' || c == '\'');
    if v.is_empty() {
        return true;
    }
    v.strip_prefix("${")
        .and_then(|r| r.strip_suffix('}'))
        .is_some_and(|name| {
            !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        })
}

/// `key = value` or `key: value` when the key (after an optional
/// `//registry/:` scope) is one of `keys`.
fn keyed_value<'a>(line: &'a str, keys: &[&str], sep: char) -> Option<&'a str> {
    let (key, value) = line.split_once(sep)?;
    let key = key.trim();
    let key = key.rsplit_once(':').map_or(key, |(_, k)| k);
    keys.contains(&key).then_some(value)
}

/// Path rules: well-known credential files, judged by name and contents.
fn path_rules(path: &str, contents: &[u8]) -> Vec<(Rule, u64)> {
    let parts: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    let ends_with = |tail: &[&str]| parts.ends_with(tail);
    let base = parts.last().copied().unwrap_or("");
    let mut out = Vec::new();

    if base == ".netrc" || base == "_netrc" {
        // Tokens may span lines: `machine x\n  login y\n  password z`.
        let tokens: Vec<(u64, &str)> = contents
            .split(|&b| b == b'\n')
            .enumerate()
            .flat_map(|(i, l)| {
                l.split(|b| b.is_ascii_whitespace())
                    .filter(|t| !t.is_empty())
                    .map(move |t| (i as u64 + 1, std::str::from_utf8(t).unwrap_or("")))
            })
            .collect();
        for w in tokens.windows(2) {
            if w[0].1 == "password" {
                out.push((Rule::NetrcPassword, w[0].0));
            }
        }
    }

    if base == ".git-credentials" || ends_with(&["git", "credentials"]) {
        static USERPASS: LazyLock<Regex> = LazyLock::new(|| {
            Regex::new(r"(?-u)[A-Za-z][A-Za-z0-9+.-]*://[^/@:\s]*:[^@\s/]+@")
                .expect("pattern compiles")
        });
        for (n, l) in lines(contents) {
            if USERPASS.is_match(l.as_bytes()) {
                out.push((Rule::GitCredentials, n));
            }
        }
    }

    if base == ".npmrc" || base == "npmrc" {
        for (n, l) in lines(contents) {
            if keyed_value(l, &["_authToken", "_auth", "_password"], '=')
                .is_some_and(|v| !no_secret_value(v))
            {
                out.push((Rule::NpmrcAuth, n));
            }
        }
    }

    if ends_with(&[".docker", "config.json"]) {
        out.extend(
            docker_auths(contents)
                .into_iter()
                .map(|n| (Rule::DockerAuth, n)),
        );
    }

    if ends_with(&[".aws", "credentials"]) || ends_with(&[".aws", "config"]) {
        for (n, l) in lines(contents) {
            if keyed_value(l, &["aws_secret_access_key", "aws_session_token"], '=')
                .is_some_and(|v| !no_secret_value(v))
            {
                out.push((Rule::AwsCredentials, n));
            }
        }
    }

    if ends_with(&["gh", "hosts.yml"]) {
        for (n, l) in lines(contents) {
            let l = l.trim_start_matches("- ");
            if keyed_value(l, &["oauth_token"], ':').is_some_and(|v| !no_secret_value(v)) {
                out.push((Rule::GhOauthToken, n));
            }
        }
    }
    out
}

/// Lines of `auths` entries that carry `auth` (or `identitytoken` /
/// `password`). A file that does not parse but mentions `"auth"` counts, so
/// a broken file cannot hide a credential.
fn docker_auths(contents: &[u8]) -> Vec<u64> {
    let find_line = |needle: &str| {
        contents
            .windows(needle.len())
            .position(|w| w == needle.as_bytes())
            .map_or(1, |off| line_of(contents, off))
    };
    let Ok(doc) = serde_json::from_slice::<serde_json::Value>(contents) else {
        return if contents.windows(6).any(|w| w == b"\"auth\"") {
            vec![find_line("\"auth\"")]
        } else {
            Vec::new()
        };
    };
    let Some(auths) = doc.get("auths").and_then(|a| a.as_object()) else {
        return Vec::new();
    };
    auths
        .iter()
        .filter(|(_, entry)| {
            ["auth", "identitytoken", "password"].iter().any(|k| {
                entry
                    .get(*k)
                    .and_then(|v| v.as_str())
                    .is_some_and(|s| !s.is_empty())
            })
        })
        .map(|(registry, _)| find_line(&format!("\"{registry}\"")))
        .collect()
}

/// Scans every regular file under `root` (symlinks are not followed; their
/// targets are either inside the tree and scanned there, or outside the
/// image). Paths in findings are relative to `root`, `/`-rooted.
pub fn scan_dir(root: &Path) -> Result<ScanReport, ScanError> {
    let mut report = ScanReport::default();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        let io_err = |source| ScanError::Io {
            path: dir.clone(),
            source,
        };
        let mut entries: Vec<_> = fs::read_dir(&dir)
            .map_err(io_err)?
            .collect::<Result<_, _>>()
            .map_err(io_err)?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let path = entry.path();
            let meta = fs::symlink_metadata(&path).map_err(|source| ScanError::Io {
                path: path.clone(),
                source,
            })?;
            let child = rel.join(entry.file_name());
            if meta.is_dir() {
                stack.push(child);
            } else if meta.is_file() {
                if meta.len() > MAX_FILE {
                    return Err(ScanError::TooLarge {
                        path,
                        size: meta.len(),
                    });
                }
                let contents = fs::read(&path).map_err(|source| ScanError::Io { path, source })?;
                report.add(&child.to_string_lossy(), &contents);
            }
        }
    }
    Ok(report)
}

/// Scans every regular file in a newc archive (plain, gzip or zstd,
/// possibly several concatenated).
pub fn scan_cpio(path: &Path) -> Result<ScanReport, ScanError> {
    let file = fs::File::open(path).map_err(|source| ScanError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let cpio_err = |source| ScanError::Cpio {
        path: path.to_path_buf(),
        source,
    };
    let mut reader = cpio::open(file, MAX_FILE).map_err(cpio_err)?;
    let mut report = ScanReport::default();
    while let Some(entry) = reader.next_entry().map_err(cpio_err)? {
        if entry.is_file() {
            report.add(&entry.name, &entry.data);
        }
    }
    Ok(report)
}

/// Scans a directory, a cpio archive, a single file, or an image directory (one holding
/// `initramfs.cpio`, of which only the initramfs is scanned: the kernel
/// comes from a verified Debian package).
pub fn scan_path(path: &Path) -> Result<ScanReport, ScanError> {
    let meta = fs::metadata(path).map_err(|source| ScanError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    if meta.is_dir() {
        let initramfs = path.join(super::INITRAMFS_FILE);
        if initramfs.is_file() {
            return scan_cpio(&initramfs);
        }
        scan_dir(path)
    } else if looks_like_archive(path)? {
        scan_cpio(path)
    } else {
        // Any other single file is scanned as itself.
        if meta.len() > MAX_FILE {
            return Err(ScanError::TooLarge {
                path: path.to_path_buf(),
                size: meta.len(),
            });
        }
        let contents = fs::read(path).map_err(|source| ScanError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let mut report = ScanReport::default();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        report.add(name.as_deref().unwrap_or("file"), &contents);
        Ok(report)
    }
}

/// gzip, zstd or newc magic at the start of the file.
fn looks_like_archive(path: &Path) -> Result<bool, ScanError> {
    let mut magic = [0u8; 4];
    let n = io::Read::read(
        &mut fs::File::open(path).map_err(|source| ScanError::Io {
            path: path.to_path_buf(),
            source,
        })?,
        &mut magic,
    )
    .map_err(|source| ScanError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let magic = &magic[..n];
    Ok(magic.starts_with(&[0x1f, 0x8b])
        || magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd])
        || magic.starts_with(b"0707"))
}

#[cfg(test)]
mod tests {
    use super::*;

    // Fake credentials assembled at run time so this source file does not
    // itself look like it holds any.
    fn rep(c: char, n: usize) -> String {
        std::iter::repeat_n(c, n).collect()
    }

    fn pem(kind: &str) -> String {
        format!(
            "-----BEGIN {kind}PRIVATE KEY-----\n{}\n{}==\n-----END {kind}PRIVATE KEY-----\n",
            rep('A', 64),
            rep('Q', 20)
        )
    }

    fn rules(path: &str, contents: &str) -> Vec<Rule> {
        let mut r: Vec<Rule> = scan_bytes(path, contents.as_bytes())
            .into_iter()
            .map(|f| f.rule)
            .collect();
        r.dedup();
        r
    }

    #[test]
    fn every_rule_has_a_positive_and_a_near_miss() {
        let gh = format!("token ghp_{} here", rep('a', 36));
        let gh_short = format!("token ghp_{} here", rep('a', 35));
        let cases: Vec<(Rule, &str, String, &str, String)> = vec![
            // (rule, path, positive, near-miss path, near-miss contents)
            (Rule::PrivateKey, "/root/key", pem("RSA "), "/root/key", format!("-----BEGIN PUBLIC KEY-----\n{}\n", rep('A', 64))),
            (Rule::PrivateKey, "/k", pem(""), "/k", "-----BEGIN PRIVATE KEY-----\n".into()),
            (Rule::PrivateKey, "/k", pem("OPENSSH "), "/k", format!("-----BEGIN CERTIFICATE-----\n{}\n", rep('A', 64))),
            (Rule::PrivateKey, "/k", pem("EC "), "/k", format!("-----BEGIN OPENSSH PRIVATE KEY-----\n{}\n", rep('A', 15))),
            (Rule::PrivateKey, "/k", pem("ENCRYPTED "), "/k", format!("BEGIN RSA PRIVATE KEY\n{}\n", rep('A', 64))),
            (Rule::PrivateKey, "/k", format!("-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-128-CBC,00\n\n{}\n", rep('B', 64)), "/k", "-----BEGIN DSA PRIVATE KEY----- no newline".into()),
            (Rule::PrivateKey, "/k", format!("-----BEGIN PGP PRIVATE KEY BLOCK-----\nVersion: x\n\n{}\n", rep('l', 64)), "/k", format!("-----BEGIN PGP PUBLIC KEY BLOCK-----\n\n{}\n", rep('l', 64))),
            (Rule::PrivateKey, "/k", format!("---- BEGIN SSH2 ENCRYPTED PRIVATE KEY ----\nComment: \"x\"\n{}\n", rep('P', 64)), "/k", format!("---- BEGIN SSH2 PUBLIC KEY ----\n{}\n", rep('P', 64))),
            (Rule::PuttyKey, "/id.ppk", format!("PuTTY-User-Key-File-3: ssh-ed25519\nEncryption: none\nComment: x\nPublic-Lines: 2\n{}\nPrivate-Lines: 1\n{}\n", rep('A', 40), rep('B', 40)), "/id.ppk", "PuTTY-User-Key-File-3: ssh-ed25519\nPublic-Lines: 2\n".into()),
            (Rule::NetrcPassword, "/root/.netrc", "machine github.com\n  login u\n  password hunter2\n".into(), "/root/.netrc", "machine github.com login u\n".into()),
            (Rule::NetrcPassword, "/home/agent/_netrc", "machine a login b password c".into(), "/home/agent/netrc.txt", "machine a login b password c".into()),
            (Rule::GitCredentials, "/root/.git-credentials", "https://user:s3cret@github.com\n".into(), "/root/.git-credentials", "https://user@github.com\nhttps://github.com/a:b\n".into()),
            (Rule::GitCredentials, "/root/.config/git/credentials", "https://x:y@gitlab.com\n".into(), "/root/.config/git/config", "https://x:y@gitlab.com\n".into()),
            (Rule::NpmrcAuth, "/home/agent/.npmrc", "//registry.npmjs.org/:_authToken=abc123\n".into(), "/home/agent/.npmrc", "//registry.npmjs.org/:_authToken=${NPM_TOKEN}\nregistry=https://registry.npmjs.org/\n".into()),
            (Rule::NpmrcAuth, "/etc/npmrc", "_auth = dXNlcjpwYXNz\n".into(), "/etc/npmrc", "; _auth = dXNlcjpwYXNz\n_password=\n".into()),
            (Rule::NpmrcAuth, "/etc/npmrc", "_password=\"cGFzcw==\"\n".into(), "/etc/npmrc.bak", "_password=cGFzcw==\n".into()),
            (Rule::DockerAuth, "/root/.docker/config.json", "{\"auths\": {\"ghcr.io\": {\"auth\": \"dXNlcjpwYXNz\"}}}".into(), "/root/.docker/config.json", "{\"auths\": {\"ghcr.io\": {}}, \"credsStore\": \"desktop\"}".into()),
            (Rule::DockerAuth, "/root/.docker/config.json", "{\"auths\": {\"x\": {\"auth\": \"dXNl\"}".into(), "/root/.docker/config.json", "{\"auths\": {\"x\": {\"auth\": \"\"}}}".into()),
            (Rule::AwsCredentials, "/root/.aws/credentials", "[default]\naws_access_key_id = x\naws_secret_access_key = abcdEFGH/1234\n".into(), "/root/.aws/credentials", "[default]\naws_access_key_id = x\naws_secret_access_key =\n# aws_secret_access_key = old\n".into()),
            (Rule::GhOauthToken, "/home/agent/.config/gh/hosts.yml", "github.com:\n    user: octocat\n    oauth_token: gho_short\n".into(), "/home/agent/.config/gh/hosts.yml", "github.com:\n    user: octocat\n    git_protocol: https\n    oauth_token: \"\"\n".into()),
            (Rule::GithubToken, "/x", gh, "/x", gh_short),
            (Rule::GithubToken, "/x", format!("gho_{}", rep('Z', 36)), "/x", format!("ghx_{}", rep('Z', 36))),
            (Rule::GithubToken, "/x", format!("x=ghs_{}\n", rep('1', 40)), "/x", format!("aghs_{}", rep('1', 36))),
            (Rule::GithubToken, "/x", format!("github_pat_{}_{}", rep('A', 22), rep('b', 59)), "/x", format!("github_pat_{}", rep('A', 30))),
            (Rule::GitlabToken, "/x", format!("glpat-{}\n", rep('x', 20)), "/x", format!("glpat-{}\n", rep('x', 10))),
            (Rule::NpmToken, "/x", format!("npm_{}", rep('k', 36)), "/x", format!("npm_{}", rep('k', 37))),
            (Rule::PypiToken, "/x", format!("pypi-AgEIcHlwaS5vcmc{}", rep('q', 60)), "/x", format!("pypi-AgEIcHlwaS5vcmc{}", rep('q', 10))),
            (Rule::SlackToken, "/x", "xoxb-123456789012-abcdefghijkl".into(), "/x", "xoxz-123456789012-abcdefghijkl xoxb-1-abc".into()),
            (Rule::AwsAccessKeyId, "/x", format!("id AKIA{}\n", rep('Q', 16)), "/x", format!("id AKIA{}\n", rep('Q', 15))),
            (Rule::AwsAccessKeyId, "/x", format!("ASIA{}", rep('7', 16)), "/x", format!("XASIA{} ASIA{}", rep('7', 16), rep('7', 17))),
            (Rule::GoogleApiKey, "/x", format!("key=AIza{}&", rep('s', 35)), "/x", format!("key=AIza{}&", rep('s', 34))),
        ];
        for (rule, path, positive, miss_path, miss) in cases {
            assert_eq!(
                rules(path, &positive),
                vec![rule],
                "{rule:?} positive in {path}"
            );
            assert!(
                rules(miss_path, &miss).is_empty(),
                "{rule:?} near miss in {miss_path}: {:?}",
                rules(miss_path, &miss)
            );
        }
    }

    #[test]
    fn allowlist_accepts_only_private_keys_by_exact_digest() {
        let key = pem("");
        let other = pem("RSA ");
        let token = format!("ghp_{}", rep('t', 36));
        let text = format!("x\n{key}y\n{other}{token}\n");
        let mut report = ScanReport::default();
        report.add("/lib/libtls.so", text.as_bytes());
        assert_eq!(report.findings.len(), 3);
        let fp = |k: &str| {
            use sha2::{Digest, Sha256};
            hex::encode(Sha256::digest(k.as_bytes()))
        };
        // The fingerprint covers the whole block, BEGIN through END line.
        assert_eq!(
            report.findings[0].fingerprint.as_deref(),
            Some(fp(&key).as_str())
        );
        assert!(
            report.findings[2].fingerprint.is_none(),
            "tokens carry no digest"
        );

        let allow = Allowlist::parse(&format!(
            "# test keys\n{}  public test key\n\n",
            fp(&key).to_uppercase()
        ))
        .unwrap();
        report.apply(&allow);
        assert_eq!(report.allowed.len(), 1);
        assert_eq!(report.allowed[0].location, Location::Line(2));
        let left: Vec<Rule> = report.findings.iter().map(|f| f.rule).collect();
        assert_eq!(left, [Rule::PrivateKey, Rule::GithubToken]);
        assert!(!report.is_clean());

        for bad in [
            "abc reason",
            &format!("{} ", fp(&key)),
            &format!("{}z reason", &fp(&key)[1..]),
        ] {
            assert!(Allowlist::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn findings_never_carry_the_secret() {
        let secret = format!("ghp_{}", rep('s', 36));
        let findings = scan_bytes(
            "/home/agent/.env",
            format!("A=1\nTOKEN={secret}\n").as_bytes(),
        );
        assert_eq!(findings.len(), 1);
        let f = &findings[0];
        assert_eq!(f.location, Location::Line(2));
        for shown in [
            f.to_string(),
            format!("{f:?}"),
            serde_json::to_string(f).unwrap(),
        ] {
            assert!(!shown.contains(&secret[4..]), "{shown}");
        }
        assert_eq!(
            f.to_string(),
            "/home/agent/.env: GitHub token pattern at line 2"
        );
    }

    #[test]
    fn binaries_report_offsets() {
        let mut bin = b"\x7fELF\0\0\0".to_vec();
        let at = bin.len() + 1;
        bin.extend_from_slice(format!(" AKIA{} ", rep('Z', 16)).as_bytes());
        let f = scan_bytes("usr/bin/tool", &bin);
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].path, "/usr/bin/tool");
        assert_eq!(f[0].location, Location::Offset(at as u64));
    }

    #[test]
    fn ca_bundle_and_plain_text_are_clean() {
        let cert = format!(
            "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
            (0..20)
                .map(|_| "MIIFazCCA1OgAwIBAgIRAIIQz7DSQONZRGPgu2OCiwAwDQYJKoZIhvcNAQELBQAw")
                .collect::<Vec<_>>()
                .join("\n")
        );
        assert!(scan_bytes("/etc/ssl/certs/ca-certificates.crt", cert.as_bytes()).is_empty());
        assert!(scan_bytes("/etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n").is_empty());
    }

    #[test]
    fn system_files_scan_clean_when_present() {
        // Real files from this machine, as they would enter an image.
        for p in [
            "/etc/ssl/certs/ca-certificates.crt",
            "/usr/bin/git",
            "/usr/bin/curl",
        ] {
            if let Ok(c) = fs::read(p) {
                assert!(scan_bytes(p, &c).is_empty(), "{p}: {:?}", scan_bytes(p, &c));
            }
        }
    }

    #[test]
    fn planted_key_is_found_in_a_nested_directory_and_a_cpio() {
        let dir = tempfile::tempdir().unwrap();
        let nested = dir.path().join("home/agent/.ssh/deep/er");
        fs::create_dir_all(&nested).unwrap();
        fs::write(dir.path().join("home/agent/readme"), "hello\n").unwrap();
        fs::write(nested.join("id_ed25519"), pem("OPENSSH ")).unwrap();
        #[cfg(unix)]
        std::os::unix::fs::symlink("/etc/shadow", dir.path().join("link")).unwrap();
        let r = scan_dir(dir.path()).unwrap();
        assert_eq!(r.files, 2);
        assert_eq!(r.findings.len(), 1);
        assert_eq!(r.findings[0].path, "/home/agent/.ssh/deep/er/id_ed25519");
        assert_eq!(r.findings[0].location, Location::Line(1));

        let key = pem("RSA ");
        let archive = cpio::write_newc(&[
            ("bin", 0o040_755, b""),
            ("bin/sh", 0o100_755, b"#!busybox"),
            ("./root/.ssh/id_rsa", 0o100_600, key.as_bytes()),
        ]);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        io::Write::write_all(&mut gz, &archive).unwrap();
        // Compressed, under the image's own name: the reader goes by magic.
        let path = dir.path().join(crate::image::INITRAMFS_FILE);
        fs::write(&path, gz.finish().unwrap()).unwrap();
        let r = scan_cpio(&path).unwrap();
        assert_eq!(r.files, 2);
        assert_eq!(r.findings.len(), 1);
        assert_eq!(r.findings[0].path, "/root/.ssh/id_rsa");
        // scan_path on the directory now scans its initramfs.
        assert_eq!(scan_path(dir.path()).unwrap().findings, r.findings);
    }

    #[test]
    fn unreadable_archives_are_errors_not_clean() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.cpio");
        let mut bytes = cpio::write_newc(&[("a", 0o100_644, b"a")]);
        bytes.extend_from_slice(b"\x1f\x8b hidden");
        fs::write(&path, bytes).unwrap();
        assert!(matches!(scan_cpio(&path), Err(ScanError::Cpio { .. })));
        assert!(matches!(
            scan_path(&dir.path().join("missing")),
            Err(ScanError::Io { .. })
        ));
    }
}
