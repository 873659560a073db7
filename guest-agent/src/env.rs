//! The agent's environment: what its process gets and what the env file
//! (`/run/zerolease/env`) holds, rendered as POSIX shell.
//!
//! **Invariants:**
//! - Every value is written inside single quotes, with each `'` written as
//!   `'\''`, so sourcing the file reproduces the value byte for byte and
//!   never expands or executes anything in it (`$VAR`, `$(...)`, backticks,
//!   newlines). A value with NUL is refused: no environment can hold it.
//! - Names zerolease sets itself (home, user, proxy and CA variables) cannot
//!   be overridden by provisioned variables; such a clash is an error.
//! - Values are held in zeroizing buffers and `Debug` prints names only.

use std::fmt;

use zeroize::Zeroizing;
use zerolease_protocol::message::is_valid_env_name;
use zerolease_protocol::{PlainEnvVar, ProxySettings, SecretEnvVar};

use crate::passwd::User;

/// The `PATH` the agent starts with.
pub const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin";

/// Variables zerolease sets and provisioning may not override.
const RESERVED: &[&str] = &[
    "HOME",
    "USER",
    "LOGNAME",
    "HTTPS_PROXY",
    "HTTP_PROXY",
    "NO_PROXY",
    "https_proxy",
    "http_proxy",
    "no_proxy",
    "SSL_CERT_FILE",
    "CURL_CA_BUNDLE",
    "GIT_SSL_CAINFO",
    "NODE_EXTRA_CA_CERTS",
    "REQUESTS_CA_BUNDLE",
];

/// Why an environment cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvError {
    /// A name is not `[A-Za-z_][A-Za-z0-9_]*`.
    #[error("environment variable name {name:?} is not a valid shell name")]
    Name {
        /// The name.
        name: String,
    },
    /// A value contains NUL, which no environment variable can hold.
    #[error("environment variable `{name}` contains a NUL byte, which an environment cannot hold")]
    Nul {
        /// The variable (its value is not quoted).
        name: String,
    },
    /// A provisioned variable would replace one zerolease sets.
    #[error(
        "environment variable `{name}` is set by zerolease itself; remove it from the manifest"
    )]
    Reserved {
        /// The variable.
        name: String,
    },
    /// A variable is given twice.
    #[error("environment variable `{name}` is given more than once")]
    Duplicate {
        /// The variable.
        name: String,
    },
}

/// One variable. The value is zeroized on drop.
#[derive(Clone)]
pub struct EnvVar {
    name: String,
    value: Zeroizing<String>,
    secret: bool,
}

impl EnvVar {
    /// The name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The value (may be secret: do not log it).
    pub fn value(&self) -> &str {
        &self.value
    }
}

impl fmt::Debug for EnvVar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.secret {
            write!(f, "{}=[redacted]", self.name)
        } else {
            write!(f, "{}={:?}", self.name, &*self.value)
        }
    }
}

/// The agent's whole environment, in a stable order.
#[derive(Debug, Clone, Default)]
pub struct AgentEnv {
    vars: Vec<EnvVar>,
}

/// Guest paths the environment points at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvPaths {
    /// The CA bundle (system bundle plus provisioned certificates).
    pub ca_bundle: String,
}

impl AgentEnv {
    /// Builds the environment: HOME/USER/LOGNAME/PATH, the proxy and CA
    /// variables, then the provisioned plain and secret variables (which may
    /// replace `PATH` but no reserved name).
    pub fn build(
        user: &User,
        proxy: &ProxySettings,
        paths: &EnvPaths,
        plain: &[PlainEnvVar],
        secret: &[SecretEnvVar],
    ) -> Result<Self, EnvError> {
        let mut env = Self::default();
        env.set("HOME", &user.home, false)?;
        env.set("USER", &user.name, false)?;
        env.set("LOGNAME", &user.name, false)?;
        env.set("PATH", DEFAULT_PATH, false)?;
        env.set("GIT_TERMINAL_PROMPT", "0", false)?;
        if let Some(url) = &proxy.https_proxy {
            env.set("HTTPS_PROXY", url, false)?;
            env.set("https_proxy", url, false)?;
        }
        if let Some(url) = &proxy.http_proxy {
            env.set("HTTP_PROXY", url, false)?;
            env.set("http_proxy", url, false)?;
        }
        if !proxy.no_proxy.is_empty() {
            let list = proxy.no_proxy.join(",");
            env.set("NO_PROXY", &list, false)?;
            env.set("no_proxy", &list, false)?;
        }
        // OpenSSL/curl/git; Node.js (and Claude Code) add NODE_EXTRA_CA_CERTS
        // to their built-in roots; Python's requests reads REQUESTS_CA_BUNDLE.
        for name in [
            "SSL_CERT_FILE",
            "CURL_CA_BUNDLE",
            "GIT_SSL_CAINFO",
            "NODE_EXTRA_CA_CERTS",
            "REQUESTS_CA_BUNDLE",
        ] {
            env.set(name, &paths.ca_bundle, false)?;
        }
        let mut seen = std::collections::HashSet::new();
        let provisioned = plain
            .iter()
            .map(|var| (&var.name, var.value.as_str(), false))
            .chain(
                secret
                    .iter()
                    .map(|var| (&var.name, var.value.expose_secret(), true)),
            );
        for (name, value, is_secret) in provisioned {
            if !seen.insert(name.as_str()) {
                return Err(EnvError::Duplicate { name: name.clone() });
            }
            env.provisioned(name, value, is_secret)?;
        }
        Ok(env)
    }

    /// Replaces (or adds) secret variables, as `UpdateSecrets` asks. Nothing
    /// changes if any of them is unacceptable.
    pub fn update_secrets(&mut self, secret: &[SecretEnvVar]) -> Result<(), EnvError> {
        let mut next = self.clone();
        for var in secret {
            next.provisioned(&var.name, var.value.expose_secret(), true)?;
        }
        *self = next;
        Ok(())
    }

    fn provisioned(&mut self, name: &str, value: &str, secret: bool) -> Result<(), EnvError> {
        if RESERVED.contains(&name) {
            return Err(EnvError::Reserved {
                name: name.to_owned(),
            });
        }
        self.set(name, value, secret)
    }

    fn set(&mut self, name: &str, value: &str, secret: bool) -> Result<(), EnvError> {
        if !is_valid_env_name(name) {
            return Err(EnvError::Name {
                name: name.to_owned(),
            });
        }
        if value.contains('\0') {
            return Err(EnvError::Nul {
                name: name.to_owned(),
            });
        }
        let var = EnvVar {
            name: name.to_owned(),
            value: Zeroizing::new(value.to_owned()),
            secret,
        };
        match self.vars.iter_mut().find(|v| v.name == name) {
            Some(existing) => *existing = var,
            None => self.vars.push(var),
        }
        Ok(())
    }

    /// The variables in order.
    pub fn vars(&self) -> &[EnvVar] {
        &self.vars
    }

    /// The value of `name`, if set.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.vars
            .iter()
            .find(|v| v.name == name)
            .map(|v| v.value.as_str())
    }

    /// The env file's contents: one `export NAME='value'` line per variable.
    pub fn render(&self) -> Zeroizing<Vec<u8>> {
        let len: usize = self
            .vars
            .iter()
            .map(|v| v.name.len() + 4 * v.value.len() + 16)
            .sum::<usize>()
            + 64;
        let mut out = Zeroizing::new(Vec::with_capacity(len));
        out.extend_from_slice(b"# Written by zerolease-guest. Values are single-quoted.\n");
        for var in &self.vars {
            out.extend_from_slice(b"export ");
            out.extend_from_slice(var.name.as_bytes());
            out.push(b'=');
            shell_quote(var.value.as_bytes(), &mut out);
            out.push(b'\n');
        }
        out
    }
}

/// Appends `value` to `out` as one POSIX-shell word that expands to exactly
/// `value`: `'…'`, with each `'` closed, escaped and reopened (`'\''`).
/// The caller guarantees `out` has room (it is a zeroizing buffer sized up
/// front, so growth would leave copies behind).
pub fn shell_quote(value: &[u8], out: &mut Vec<u8>) {
    out.push(b'\'');
    for &byte in value {
        if byte == b'\'' {
            out.extend_from_slice(b"'\\''");
        } else {
            out.push(byte);
        }
    }
    out.push(b'\'');
}

#[cfg(test)]
mod tests {
    use super::*;
    use zerolease_protocol::SecretString;

    fn user() -> User {
        User {
            name: "agent".into(),
            uid: 1000,
            gid: 1000,
            home: "/home/agent".into(),
        }
    }

    fn paths() -> EnvPaths {
        EnvPaths {
            ca_bundle: "/run/zerolease/ca-bundle.crt".into(),
        }
    }

    fn secret(name: &str, value: &str) -> SecretEnvVar {
        SecretEnvVar {
            name: name.into(),
            value: SecretString::new(value.into()),
        }
    }

    fn plain(name: &str, value: &str) -> PlainEnvVar {
        PlainEnvVar {
            name: name.into(),
            value: value.into(),
        }
    }

    #[test]
    fn quoting_table() {
        let cases: &[(&str, &str)] = &[
            ("", "''"),
            ("abc", "'abc'"),
            ("it's", "'it'\\''s'"),
            ("'", "''\\'''"),
            ("$(id) `id` $HOME \\", "'$(id) `id` $HOME \\'"),
            ("a\nb", "'a\nb'"),
        ];
        for (value, expected) in cases {
            let mut out = Vec::new();
            shell_quote(value.as_bytes(), &mut out);
            assert_eq!(String::from_utf8(out).unwrap(), *expected, "{value:?}");
        }
    }

    #[test]
    fn builds_the_environment() {
        let proxy = ProxySettings {
            http_proxy: Some("http://10.0.0.1:3128".into()),
            https_proxy: Some("http://10.0.0.1:3128".into()),
            no_proxy: vec!["localhost".into(), "127.0.0.1".into()],
        };
        let env = AgentEnv::build(
            &user(),
            &proxy,
            &paths(),
            &[plain("LANG", "C.UTF-8"), plain("PATH", "/opt/bin:/bin")],
            &[secret("TOKEN", "s3cret")],
        )
        .unwrap();
        for (name, value) in [
            ("HOME", "/home/agent"),
            ("USER", "agent"),
            ("PATH", "/opt/bin:/bin"),
            ("HTTPS_PROXY", "http://10.0.0.1:3128"),
            ("http_proxy", "http://10.0.0.1:3128"),
            ("no_proxy", "localhost,127.0.0.1"),
            ("SSL_CERT_FILE", "/run/zerolease/ca-bundle.crt"),
            ("GIT_SSL_CAINFO", "/run/zerolease/ca-bundle.crt"),
            ("NODE_EXTRA_CA_CERTS", "/run/zerolease/ca-bundle.crt"),
            ("REQUESTS_CA_BUNDLE", "/run/zerolease/ca-bundle.crt"),
            ("LANG", "C.UTF-8"),
            ("TOKEN", "s3cret"),
        ] {
            assert_eq!(env.get(name), Some(value), "{name}");
        }
        let debug = format!("{env:?}");
        assert!(!debug.contains("s3cret"), "{debug}");
        assert!(debug.contains("TOKEN=[redacted]"), "{debug}");
        // No proxy settings: no proxy variables.
        let bare = AgentEnv::build(&user(), &ProxySettings::default(), &paths(), &[], &[]).unwrap();
        assert_eq!(bare.get("HTTPS_PROXY"), None);
        assert_eq!(bare.get("NO_PROXY"), None);
    }

    #[test]
    fn refuses_bad_variables() {
        let build = |plain_vars: &[PlainEnvVar], secrets: &[SecretEnvVar]| {
            AgentEnv::build(
                &user(),
                &ProxySettings::default(),
                &paths(),
                plain_vars,
                secrets,
            )
            .map(drop)
        };
        let nul = build(&[], &[secret("T", "a\0b")]).unwrap_err();
        assert_eq!(nul, EnvError::Nul { name: "T".into() });
        assert!(!nul.to_string().contains("a\0b"));
        assert!(matches!(
            build(&[plain("HTTPS_PROXY", "x")], &[]),
            Err(EnvError::Reserved { .. })
        ));
        assert!(matches!(
            build(&[], &[secret("HOME", "/")]),
            Err(EnvError::Reserved { .. })
        ));
        assert!(matches!(
            build(&[plain("A", "1")], &[secret("A", "2")]),
            Err(EnvError::Duplicate { .. })
        ));
        assert!(matches!(
            build(&[plain("A-B", "1")], &[]),
            Err(EnvError::Name { .. })
        ));
        assert!(matches!(
            build(&[plain("A=B", "1")], &[]),
            Err(EnvError::Name { .. })
        ));
    }

    #[test]
    fn update_replaces_and_is_all_or_nothing() {
        let mut env = AgentEnv::build(
            &user(),
            &ProxySettings::default(),
            &paths(),
            &[],
            &[secret("TOKEN", "old")],
        )
        .unwrap();
        env.update_secrets(&[secret("TOKEN", "new"), secret("OTHER", "o")])
            .unwrap();
        assert_eq!(env.get("TOKEN"), Some("new"));
        assert_eq!(env.get("OTHER"), Some("o"));
        assert!(
            env.update_secrets(&[secret("TOKEN", "newer"), secret("HOME", "/")])
                .is_err()
        );
        assert_eq!(env.get("TOKEN"), Some("new"));
    }
}
