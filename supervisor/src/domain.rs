//! Host names and domain scopes: the one place that decides whether a name is
//! acceptable and whether a scope covers it.
//!
//! The vault uses it for secret ceilings, grants and leases; the proxy uses it
//! for every connection. Keeping one implementation means the name a lease was
//! granted for and the name the proxy checks are normalised the same way.
//!
//! **Invariant:** a [`HostName`] is always lower-case ASCII (IDNA names are
//! converted to their `xn--` form), has no trailing dot, and consists of 1..=63
//! byte labels of `[a-z0-9-]` that neither start nor end with `-`, 253 bytes at
//! most in all. Anything else — empty labels, `@`, `%`, `/`, whitespace, NUL,
//! over-long labels, bracketed IPv6 — is rejected, never repaired.
//!
//! **Invariant:** a wildcard `*.example.com` matches names *below*
//! `example.com` on a label boundary only: `a.example.com` and
//! `a.b.example.com`, never `example.com` itself, `evilexample.com` or
//! `example.com.evil.net`.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest host name in bytes, without the trailing dot (RFC 1035 §2.3.4).
const MAX_NAME_LEN: usize = 253;
/// Longest label in bytes (RFC 1035 §2.3.4).
const MAX_LABEL_LEN: usize = 63;

/// Why a name or pattern was rejected. The offending input is included
/// because names are never secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    #[error("`{input}` is not a valid host name: {reason}")]
    InvalidName { input: String, reason: &'static str },
    #[error("`{input}` is not a valid domain pattern: {reason}")]
    InvalidPattern { input: String, reason: &'static str },
}

/// A validated, normalised host name (or IPv4 literal).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HostName(String);

impl HostName {
    /// Validates and normalises `input`: case-folded, one trailing dot
    /// dropped, IDNA converted to ASCII.
    pub fn parse(input: &str) -> Result<Self, DomainError> {
        let invalid = |reason| DomainError::InvalidName {
            input: input.to_owned(),
            reason,
        };
        if input.is_empty() {
            return Err(invalid("it is empty"));
        }
        // Reject characters that have meaning in URLs, authorities or shells
        // before IDNA processing gets a chance to map them to something else
        // (IDNA maps some full-width forms of these to ASCII).
        if let Some(reason) = forbidden_char(input) {
            return Err(invalid(reason));
        }
        let trimmed = input.strip_suffix('.').unwrap_or(input);
        if trimmed.is_empty() {
            return Err(invalid("it is empty"));
        }
        if trimmed.split('.').any(str::is_empty) {
            return Err(invalid("it has an empty label"));
        }
        let ascii = if trimmed.is_ascii() && !has_ace_label(trimmed) {
            trimmed.to_ascii_lowercase()
        } else {
            idna::domain_to_ascii_strict(trimmed)
                .map_err(|_| invalid("it is not a valid internationalised name"))?
        };
        // IDNA mapping can produce characters that are fine in Unicode but
        // must not reach a resolver; check the result again.
        if let Some(reason) = forbidden_char(&ascii) {
            return Err(invalid(reason));
        }
        validate_ascii_name(&ascii).map_err(invalid)?;
        Ok(HostName(ascii))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name as an IPv4 address, when it is a dotted-quad literal.
    pub fn as_ipv4(&self) -> Option<Ipv4Addr> {
        self.0.parse().ok()
    }

    /// True when `self` is strictly below `parent` on a label boundary.
    fn is_strict_subdomain_of(&self, parent: &HostName) -> bool {
        self.0.len() > parent.0.len()
            && self.0.ends_with(parent.0.as_str())
            && self.0.as_bytes()[self.0.len() - parent.0.len() - 1] == b'.'
    }
}

fn forbidden_char(s: &str) -> Option<&'static str> {
    for c in s.chars() {
        let reason = match c {
            '\0' => "it contains a NUL byte",
            c if c.is_whitespace() => "it contains whitespace",
            c if c.is_control() => "it contains a control character",
            '@' | '%' | '/' | '\\' | ':' | '?' | '#' | '[' | ']' | '*' | '_' => {
                "it contains a character not allowed in host names"
            }
            // Full-width and other dots that IDNA would fold into `.`; accepting
            // them would let two spellings of one name slip past a comparison.
            '\u{3002}' | '\u{FF0E}' | '\u{FF61}' => "it contains a non-ASCII dot",
            _ => continue,
        };
        return Some(reason);
    }
    None
}

fn has_ace_label(s: &str) -> bool {
    s.split('.')
        .any(|l| l.len() >= 4 && l[..4].eq_ignore_ascii_case("xn--"))
}

fn validate_ascii_name(name: &str) -> Result<(), &'static str> {
    if name.len() > MAX_NAME_LEN {
        return Err("it is longer than 253 bytes");
    }
    let mut labels = 0;
    for label in name.split('.') {
        labels += 1;
        if label.is_empty() {
            return Err("it has an empty label");
        }
        if label.len() > MAX_LABEL_LEN {
            return Err("a label is longer than 63 bytes");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err("it contains a character not allowed in host names");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("a label starts or ends with `-`");
        }
    }
    // An all-numeric last label is only acceptable as a full IPv4 literal:
    // `1.2.3` or `10.0.0.999` would be resolved inconsistently by different
    // resolvers, so they are refused outright.
    let last = name.rsplit('.').next().unwrap_or_default();
    if last.bytes().all(|b| b.is_ascii_digit()) && name.parse::<Ipv4Addr>().is_err() {
        return Err("it looks like an IP address but is not a valid IPv4 literal");
    }
    debug_assert!(labels >= 1);
    Ok(())
}

impl fmt::Display for HostName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for HostName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HostName({})", self.0)
    }
}

impl FromStr for HostName {
    type Err = DomainError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        HostName::parse(s)
    }
}

/// A domain scope: one exact name, or every name below a suffix.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DomainPattern {
    /// Matches exactly this name.
    Exact(HostName),
    /// `*.suffix`: matches names strictly below `suffix`. The suffix has at
    /// least two labels and is never an IP literal.
    Wildcard(HostName),
}

impl DomainPattern {
    pub fn parse(input: &str) -> Result<Self, DomainError> {
        let invalid = |reason| DomainError::InvalidPattern {
            input: input.to_owned(),
            reason,
        };
        match input.strip_prefix("*.") {
            Some(rest) => {
                if rest.contains('*') {
                    return Err(invalid("only one leading `*.` is allowed"));
                }
                let suffix = HostName::parse(rest).map_err(|e| match e {
                    DomainError::InvalidName { reason, .. } => invalid(reason),
                    other => other,
                })?;
                if suffix.as_ipv4().is_some() {
                    return Err(invalid("a wildcard cannot cover an IP address"));
                }
                if !suffix.0.contains('.') {
                    return Err(invalid(
                        "a wildcard must sit below a registrable domain (`*.example.com`, not `*.com`)",
                    ));
                }
                Ok(DomainPattern::Wildcard(suffix))
            }
            None if input.contains('*') => Err(invalid(
                "`*` is only allowed as a whole leading label (`*.example.com`)",
            )),
            None => HostName::parse(input).map(DomainPattern::Exact),
        }
    }

    /// Whether `name` is inside this scope.
    pub fn matches(&self, name: &HostName) -> bool {
        match self {
            DomainPattern::Exact(exact) => exact == name,
            DomainPattern::Wildcard(suffix) => name.is_strict_subdomain_of(suffix),
        }
    }

    /// Whether every name `other` matches is also matched by `self`, so
    /// `other` may be granted out of `self` without widening it.
    pub fn covers(&self, other: &DomainPattern) -> bool {
        match (self, other) {
            (_, DomainPattern::Exact(name)) => self.matches(name),
            (DomainPattern::Exact(_), DomainPattern::Wildcard(_)) => false,
            (DomainPattern::Wildcard(mine), DomainPattern::Wildcard(theirs)) => {
                mine == theirs || theirs.is_strict_subdomain_of(mine)
            }
        }
    }
}

/// Whether any pattern in `scope` matches `name`.
pub fn scope_matches(scope: &[DomainPattern], name: &HostName) -> bool {
    scope.iter().any(|p| p.matches(name))
}

/// The patterns of `requested` that no pattern of `ceiling` covers; empty when
/// `requested` lies wholly within `ceiling`.
pub fn uncovered<'a>(
    ceiling: &[DomainPattern],
    requested: &'a [DomainPattern],
) -> Vec<&'a DomainPattern> {
    requested
        .iter()
        .filter(|r| !ceiling.iter().any(|c| c.covers(r)))
        .collect()
}

impl fmt::Display for DomainPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DomainPattern::Exact(name) => write!(f, "{name}"),
            DomainPattern::Wildcard(suffix) => write!(f, "*.{suffix}"),
        }
    }
}

impl fmt::Debug for DomainPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DomainPattern({self})")
    }
}

impl FromStr for DomainPattern {
    type Err = DomainError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DomainPattern::parse(s)
    }
}

impl Serialize for DomainPattern {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for DomainPattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        DomainPattern::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl Serialize for HostName {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for HostName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        HostName::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn name(s: &str) -> HostName {
        HostName::parse(s).unwrap()
    }
    fn pat(s: &str) -> DomainPattern {
        DomainPattern::parse(s).unwrap()
    }

    #[test]
    fn normalises_names() {
        let cases = [
            ("Example.COM", "example.com"),
            ("example.com.", "example.com"),
            ("API.GitHub.com.", "api.github.com"),
            ("bücher.example", "xn--bcher-kva.example"),
            ("XN--BCHER-KVA.example", "xn--bcher-kva.example"),
            ("10.0.0.1", "10.0.0.1"),
            ("a-b.c0", "a-b.c0"),
            ("localhost", "localhost"),
        ];
        for (input, want) in cases {
            assert_eq!(HostName::parse(input).unwrap().as_str(), want, "{input}");
        }
    }

    #[test]
    fn rejects_bad_names() {
        let long_label = format!("{}.com", "a".repeat(64));
        let long_name = format!("{}com", "abcdefghi.".repeat(26));
        let cases: &[&str] = &[
            "",
            ".",
            "example.com..",
            ".example.com",
            "exa..mple.com",
            "user@example.com",
            "example.com%00",
            "example.com/path",
            "example.com\\x",
            "exa mple.com",
            "example.com\n",
            "example.com\0",
            "example.com\t",
            "example.com:443",
            "[::1]",
            "-example.com",
            "example-.com",
            "ex_ample.com",
            "*.example.com",
            "1.2.3",
            "10.0.0.999",
            "example.123",
            "example。com",
            "xn--zz.com",
            &long_label,
            &long_name,
        ];
        for input in cases {
            assert!(HostName::parse(input).is_err(), "accepted {input:?}");
        }
    }

    #[test]
    fn wildcard_matches_on_label_boundary_only() {
        let p = pat("*.example.com");
        for yes in ["a.example.com", "a.b.example.com", "A.Example.Com."] {
            assert!(p.matches(&name(yes)), "{yes}");
        }
        for no in [
            "example.com",
            "evilexample.com",
            "example.com.evil.net",
            "aexample.com",
            "example.co",
        ] {
            assert!(!p.matches(&name(no)), "{no}");
        }
    }

    #[test]
    fn exact_matches_only_itself() {
        let p = pat("api.github.com");
        assert!(p.matches(&name("API.github.com.")));
        assert!(!p.matches(&name("x.api.github.com")));
        assert!(!p.matches(&name("github.com")));
    }

    #[test]
    fn rejects_bad_patterns() {
        for input in [
            "*",
            "*.",
            "*.com",
            "**.example.com",
            "*.*.example.com",
            "a.*.example.com",
            "*example.com",
            "*.10.0.0.1",
            "*.exa mple.com",
        ] {
            assert!(DomainPattern::parse(input).is_err(), "accepted {input:?}");
        }
    }

    #[test]
    fn covers_is_containment() {
        let table = [
            ("*.example.com", "a.example.com", true),
            ("*.example.com", "*.a.example.com", true),
            ("*.example.com", "*.example.com", true),
            ("*.example.com", "example.com", false),
            ("*.a.example.com", "*.example.com", false),
            ("example.com", "*.example.com", false),
            ("example.com", "example.com", true),
            ("example.com", "a.example.com", false),
        ];
        for (outer, inner, want) in table {
            assert_eq!(pat(outer).covers(&pat(inner)), want, "{outer} ⊇ {inner}");
        }
        let ceiling = [pat("github.com"), pat("*.github.com")];
        let req = [pat("api.github.com"), pat("gitlab.com")];
        assert_eq!(uncovered(&ceiling, &req), vec![&req[1]]);
    }

    fn label() -> impl Strategy<Value = String> {
        "[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?"
    }
    fn hostname() -> impl Strategy<Value = String> {
        prop::collection::vec(label(), 1..5).prop_map(|l| l.join("."))
    }

    proptest! {
        /// Anything accepted is a fixed point of normalisation and passes the
        /// strict ASCII validation on its own.
        #[test]
        fn accepted_names_are_normal(input in "\\PC{0,40}") {
            if let Ok(n) = HostName::parse(&input) {
                prop_assert!(validate_ascii_name(n.as_str()).is_ok());
                prop_assert_eq!(HostName::parse(n.as_str()).unwrap(), n.clone());
                prop_assert!(!n.as_str().ends_with('.'));
            }
        }

        /// Case and one trailing dot never change the result.
        #[test]
        fn case_and_trailing_dot_are_ignored(h in hostname()) {
            if let Ok(n) = HostName::parse(&h) {
                prop_assert_eq!(HostName::parse(&h.to_ascii_uppercase()).unwrap(), n.clone());
                prop_assert_eq!(HostName::parse(&format!("{h}.")).unwrap(), n);
            }
        }

        /// A wildcard matches exactly the names that end in `.suffix`.
        #[test]
        fn wildcard_agrees_with_model(suffix in hostname(), candidate in hostname()) {
            prop_assume!(suffix.contains('.'));
            let Ok(p) = DomainPattern::parse(&format!("*.{suffix}")) else { return Ok(()) };
            let Ok(n) = HostName::parse(&candidate) else { return Ok(()) };
            let model = candidate.ends_with(&format!(".{suffix}"));
            prop_assert_eq!(p.matches(&n), model);
            // Gluing the suffix onto a label without a dot never matches.
            let glued = format!("x{suffix}");
            if let Ok(g) = HostName::parse(&glued) {
                prop_assert!(!p.matches(&g));
            }
        }

        /// If a covers b, every name b matches is matched by a.
        #[test]
        fn covers_implies_matches(a in hostname(), b in hostname(), n in hostname(), wa: bool, wb: bool) {
            let mk = |s: &str, w: bool| DomainPattern::parse(&if w { format!("*.{s}") } else { s.to_owned() });
            let (Ok(pa), Ok(pb), Ok(n)) = (mk(&a, wa), mk(&b, wb), HostName::parse(&n)) else { return Ok(()) };
            if pa.covers(&pb) && pb.matches(&n) {
                prop_assert!(pa.matches(&n));
            }
        }
    }
}
