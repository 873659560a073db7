//! How results reach the terminal: aligned tables for people, JSON for
//! scripts, and one mapping from errors to exit codes.

use std::io::Write;
use std::process::ExitCode;

use serde::Serialize;

use crate::vault::VaultError;

/// Every exit code `zerolease` itself uses (README, "Exit codes").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    Success = 0,
    /// An unexpected failure: I/O, the database, a bug.
    Failure = 1,
    /// The command line was wrong.
    Usage = 2,
    /// Policy or a lease refused the request.
    Denied = 3,
    /// A named secret, grant or lease does not exist.
    NotFound = 4,
    /// The vault could not be unlocked: missing or wrong key.
    Locked = 5,
    /// Tampering found: a broken audit chain or a ciphertext that does not
    /// authenticate.
    Integrity = 6,
    /// The audit log could not be written, so the operation was refused.
    AuditUnavailable = 7,
    /// `zerolease run` itself failed (boot, jail, proxy, provisioning); the
    /// agent's own exit codes pass through unchanged otherwise.
    SessionFailed = 125,
}

impl From<ExitStatus> for ExitCode {
    fn from(s: ExitStatus) -> ExitCode {
        ExitCode::from(s as u8)
    }
}

impl ExitStatus {
    pub fn of(e: &VaultError) -> ExitStatus {
        match e {
            VaultError::Denied { .. } | VaultError::LeaseRefused { .. } => ExitStatus::Denied,
            VaultError::SecretNotFound(_)
            | VaultError::GrantNotFound(_)
            | VaultError::LeaseNotFound(_) => ExitStatus::NotFound,
            VaultError::Key(_)
            | VaultError::WrongKey { .. }
            | VaultError::KeySourceMismatch { .. }
            | VaultError::UnknownKeySource(_) => ExitStatus::Locked,
            VaultError::Undecryptable(_) => ExitStatus::Integrity,
            VaultError::AuditUnavailable(_) => ExitStatus::AuditUnavailable,
            VaultError::Invalid(_)
            | VaultError::SecretExists(_)
            | VaultError::OutsideCeiling { .. } => ExitStatus::Usage,
            _ => ExitStatus::Failure,
        }
    }
}

/// Prints `value` as one line of JSON.
pub fn json<T: Serialize>(value: &T) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, value)?;
    writeln!(out)?;
    Ok(())
}

/// A plain table: a header row and left-aligned columns.
#[derive(Debug, Default)]
pub struct Table {
    header: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&'static str]) -> Table {
        Table {
            header: header.to_vec(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn print(&self, empty: &str) {
        if self.rows.is_empty() {
            println!("{empty}");
            return;
        }
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.len()).collect();
        for r in &self.rows {
            for (w, c) in widths.iter_mut().zip(r) {
                *w = (*w).max(c.chars().count());
            }
        }
        let line = |cells: Vec<&str>| {
            let mut s = String::new();
            for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
                if i + 1 == cells.len() {
                    s.push_str(c);
                } else {
                    s.push_str(&format!("{c:<w$}  "));
                }
            }
            println!("{}", s.trim_end());
        };
        line(self.header.clone());
        for r in &self.rows {
            line(r.iter().map(String::as_str).collect());
        }
    }
}
