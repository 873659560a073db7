//! What the guest is told: the `Provision` message built from a manifest and
//! its leases, and the answers to git credential requests.
//!
//! **Invariant:** a value leaves the vault here only through
//! `Vault::access_for_injection` (env, files: counted and audited) or
//! `Vault::access` for the exact host git asks for (credential helper), and
//! goes straight into protocol types that zeroize and redact it.

use std::sync::Arc;

use zeroize::Zeroizing;
use zerolease_protocol::{
    CredentialOutcome, FileSpec, PlainEnvVar, Provision, ProxySettings, SecretBytes, SecretEnvVar,
    SecretString,
};

use super::{SessionError, git_host, injects_git};
use crate::domain::{DomainPattern, scope_matches};
use crate::manifest::{Inject, Manifest, SECRET_PLACEHOLDER};
use crate::vault::{Lease, Vault};

/// The secret-bearing part of a provisioning: env variables, files, and the
/// hosts the git credential helper serves.
pub(super) struct Injected {
    pub(super) env: Vec<SecretEnvVar>,
    pub(super) files: Vec<FileSpec>,
    pub(super) git_hosts: Vec<String>,
}

pub(super) fn build(
    vault: &Arc<Vault>,
    manifest: &Manifest,
    leases: &[(usize, Lease)],
    command: Vec<String>,
    proxy_url: &str,
) -> Result<Provision, SessionError> {
    let Injected {
        env,
        files,
        git_hosts,
    } = injected(vault, manifest, leases)?;
    let mut ca_certs = Vec::new();
    for path in &manifest.ca_certs {
        let pem = std::fs::read_to_string(path).map_err(|e| {
            SessionError::Provision(format!(
                "cannot read CA certificate {}: {e}",
                path.display()
            ))
        })?;
        ca_certs.push(pem);
    }
    Ok(Provision {
        env,
        env_plain: manifest
            .env
            .iter()
            .map(|(k, v)| PlainEnvVar {
                name: k.clone(),
                value: v.clone(),
            })
            .collect(),
        files,
        ca_certs,
        proxy: ProxySettings {
            http_proxy: Some(proxy_url.to_owned()),
            https_proxy: Some(proxy_url.to_owned()),
            no_proxy: Vec::new(),
        },
        git_credential_hosts: git_hosts,
        command,
        workdir: manifest.workdir.clone(),
        user: manifest.user.clone(),
        workspace: None,
        tty: None,
    })
}

/// The env variables and files of `leases`' credentials, with the values
/// the vault holds now (each an audited, counted access), and their git
/// hosts. Used to provision, and again to push a rotated secret.
pub(super) fn injected(
    vault: &Arc<Vault>,
    manifest: &Manifest,
    leases: &[(usize, Lease)],
) -> Result<Injected, SessionError> {
    let mut env = Vec::new();
    let mut files = Vec::new();
    let mut git_hosts = Vec::new();
    for (index, lease) in leases {
        let credential = &manifest.credentials[*index];
        let needs_value = credential
            .inject
            .iter()
            .any(|i| matches!(i, Inject::Env(_) | Inject::File(_)));
        let value = if needs_value {
            Some(vault.access_for_injection(&lease.id.0)?)
        } else {
            None
        };
        for inject in &credential.inject {
            match (inject, &value) {
                (Inject::Env(name), Some(v)) => {
                    let text = std::str::from_utf8(v.expose()).map_err(|_| {
                        SessionError::Provision(format!(
                            "secret `{}` is not UTF-8 text, so it cannot be an environment variable; inject it as a file",
                            credential.secret
                        ))
                    })?;
                    env.push(SecretEnvVar {
                        name: name.clone(),
                        value: SecretString::new(text.to_owned()),
                    });
                }
                (Inject::File(f), Some(v)) => {
                    let mut rendered = Zeroizing::new(Vec::new());
                    let mut parts = f.template.split(SECRET_PLACEHOLDER).peekable();
                    while let Some(part) = parts.next() {
                        rendered.extend_from_slice(part.as_bytes());
                        if parts.peek().is_some() {
                            rendered.extend_from_slice(v.expose());
                        }
                    }
                    files.push(FileSpec {
                        path: f.path.to_string_lossy().into_owned(),
                        contents: SecretBytes::new(std::mem::take(&mut *rendered)),
                        mode: f.mode,
                    });
                }
                (Inject::GitCredential(_), _) => {
                    git_hosts.extend(lease.domains.iter().filter_map(|d| match d {
                        DomainPattern::Exact(h) => Some(h.to_string()),
                        DomainPattern::Wildcard(_) => None,
                    }));
                }
                _ => {}
            }
        }
    }
    Ok(Injected {
        env,
        files,
        git_hosts,
    })
}

/// Answers a git credential request: only over HTTPS, only for a host a
/// lease of this session covers and whose credential is served to git, and
/// every answer is an audited access of that lease for that host.
pub(super) fn git_credential(
    vault: &Arc<Vault>,
    manifest: &Manifest,
    leases: &[(usize, Lease)],
    protocol: &str,
    host: &str,
) -> CredentialOutcome {
    let denied = |reason: &str| CredentialOutcome::Denied {
        reason: reason.to_owned(),
    };
    if protocol != "https" {
        return denied("only https credentials are served");
    }
    let Some(name) = git_host(host) else {
        return denied("not a valid host name");
    };
    let Some((index, lease)) = leases
        .iter()
        .find(|(i, l)| injects_git(manifest, *i) && scope_matches(&l.domains, &name))
    else {
        return denied("no lease of this session covers this host for git");
    };
    let username = manifest.credentials[*index]
        .inject
        .iter()
        .find_map(|i| match i {
            Inject::GitCredential(g) => Some(g.username.clone()),
            _ => None,
        })
        .unwrap_or_default();
    match vault.access(&lease.id.0, &name) {
        Ok(v) => match std::str::from_utf8(v.expose()) {
            Ok(text) => CredentialOutcome::Granted {
                username,
                password: SecretString::new(text.to_owned()),
            },
            Err(_) => denied("the secret is not text"),
        },
        Err(e) => CredentialOutcome::Denied {
            reason: e.to_string(),
        },
    }
}
