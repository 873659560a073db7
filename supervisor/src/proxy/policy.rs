//! The per-connection decision, as plain functions over plain data.
//!
//! **Invariant:** [`choose_entry`] runs before any DNS query: an unleased
//! name never reaches the resolver. [`check_answers`] refuses the whole
//! answer set when any address is special-purpose (an attacker-controlled
//! zone can mix a public and a private answer), so the proxy only ever
//! connects to an address this module accepted.

use std::net::IpAddr;

use tokio::time::Instant;

use crate::domain::HostName;

use super::addr::{AllowedCidrs, SpecialRange, check_address};
use super::events::RefusalReason;
use super::registry::Entry;

/// The entry that admits `name:port` at `now`, from a session's entries in
/// a stable order.
pub fn choose_entry<'a, I>(
    entries: I,
    name: &HostName,
    port: u16,
    now: Instant,
) -> Result<&'a Entry, RefusalReason>
where
    I: IntoIterator<Item = &'a Entry>,
{
    let mut name_covered = false;
    for entry in entries {
        if entry.expires_at.is_some_and(|at| at <= now) {
            continue;
        }
        if !entry.patterns.iter().any(|p| p.matches(name)) {
            continue;
        }
        name_covered = true;
        if entry.ports.contains(&port) {
            return Ok(entry);
        }
    }
    Err(if name_covered {
        RefusalReason::PortNotAllowed
    } else if name.as_ipv4().is_some() {
        RefusalReason::IpLiteral
    } else {
        RefusalReason::NotLeased
    })
}

/// A refused answer set: the first offending address and its range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecialAnswer {
    pub address: IpAddr,
    pub range: SpecialRange,
}

/// Accepts `answers` only when every address is public or allowed; returns
/// them (deduplicated, in order) as the addresses the proxy may dial.
pub fn check_answers(
    answers: &[IpAddr],
    allowed: &AllowedCidrs,
) -> Result<Vec<IpAddr>, SpecialAnswer> {
    let mut out: Vec<IpAddr> = Vec::with_capacity(answers.len());
    for &address in answers {
        check_address(address, allowed).map_err(|range| SpecialAnswer { address, range })?;
        if !out.contains(&address) {
            out.push(address);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::domain::DomainPattern;
    use crate::proxy::registry::{EntryId, EntryKind};

    fn entry(id: &str, patterns: &[&str], ports: &[u16], expires_at: Option<Instant>) -> Entry {
        Entry {
            id: EntryId::new(id),
            patterns: patterns
                .iter()
                .map(|p| DomainPattern::parse(p).unwrap())
                .collect(),
            ports: ports.to_vec(),
            kind: EntryKind::Allow,
            expires_at,
        }
    }

    fn name(s: &str) -> HostName {
        HostName::parse(s).unwrap()
    }

    #[test]
    fn entry_choice_table() {
        let now = Instant::now();
        let later = Some(now + Duration::from_secs(60));
        let entries = [
            entry("gh", &["github.com", "*.github.com"], &[443], later),
            entry("ssh", &["ssh.example.com"], &[22, 443], None),
            entry("old", &["old.example.com"], &[443], Some(now)),
            entry("lit", &["93.184.216.34"], &[443], None),
        ];
        let table: &[(&str, u16, Result<&str, RefusalReason>)] = &[
            ("github.com", 443, Ok("gh")),
            ("API.GitHub.com.", 443, Ok("gh")),
            ("evilgithub.com", 443, Err(RefusalReason::NotLeased)),
            ("github.com.evil.net", 443, Err(RefusalReason::NotLeased)),
            ("github.com", 80, Err(RefusalReason::PortNotAllowed)),
            ("github.com", 22, Err(RefusalReason::PortNotAllowed)),
            ("ssh.example.com", 22, Ok("ssh")),
            ("old.example.com", 443, Err(RefusalReason::NotLeased)),
            ("93.184.216.34", 443, Ok("lit")),
            ("93.184.216.35", 443, Err(RefusalReason::IpLiteral)),
            ("127.0.0.1", 443, Err(RefusalReason::IpLiteral)),
        ];
        for (host, port, want) in table {
            let got = choose_entry(&entries, &name(host), *port, now).map(|e| e.id.as_str());
            assert_eq!(got, *want, "{host}:{port}");
        }
    }

    #[test]
    fn no_entries_refuses() {
        assert_eq!(
            choose_entry(&[], &name("a.example"), 443, Instant::now()).map(|e| e.id.clone()),
            Err(RefusalReason::NotLeased)
        );
    }

    #[test]
    fn any_special_answer_refuses_the_set() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let none = AllowedCidrs::default();
        assert_eq!(
            check_answers(&[ip("93.184.216.34"), ip("93.184.216.34")], &none),
            Ok(vec![ip("93.184.216.34")])
        );
        assert_eq!(
            check_answers(&[ip("93.184.216.34"), ip("10.0.0.1")], &none),
            Err(SpecialAnswer {
                address: ip("10.0.0.1"),
                range: SpecialRange::Private
            })
        );
        assert_eq!(
            check_answers(&[ip("169.254.169.254")], &none)
                .unwrap_err()
                .range,
            SpecialRange::Metadata
        );
        let lo = AllowedCidrs::parse(&["127.0.0.0/8"]).unwrap();
        assert_eq!(
            check_answers(&[ip("127.0.0.1")], &lo),
            Ok(vec![ip("127.0.0.1")])
        );
        assert!(check_answers(&[ip("127.0.0.1"), ip("::1")], &lo).is_err());
    }
}
