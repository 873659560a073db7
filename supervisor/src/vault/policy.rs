//! Policy: a flat, ordered list of grants, evaluated deny-by-default with the
//! first matching grant deciding.
//!
//! **Invariant:** a grant's domains always lie within its secret's ceiling
//! (checked when the grant is added or imported), and a lease's domains within
//! its grant's, so no chain of narrowing ever widens what a secret may reach.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::domain::{DomainPattern, uncovered};

/// An agent pattern: an exact name, `prefix*`, or `*` for every agent.
#[derive(Clone, PartialEq, Eq)]
pub struct AgentPattern(String);

impl AgentPattern {
    pub fn parse(s: &str) -> Result<Self, String> {
        let body = s.strip_suffix('*').unwrap_or(s);
        let valid_char = |c: char| c.is_ascii_alphanumeric() || "._-".contains(c);
        if body.len() > 128 || !body.chars().all(valid_char) || (body.is_empty() && s != "*") {
            return Err(format!(
                "`{s}` is not an agent pattern; use a name of letters, digits, `.`, `_`, `-`, optionally ending in `*` (for example `ci-*`)"
            ));
        }
        Ok(AgentPattern(s.to_owned()))
    }

    pub fn matches(&self, agent: &str) -> bool {
        match self.0.strip_suffix('*') {
            Some(prefix) => agent.starts_with(prefix),
            None => self.0 == agent,
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for AgentPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for AgentPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AgentPattern({})", self.0)
    }
}

impl Serialize for AgentPattern {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for AgentPattern {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        AgentPattern::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Checks an agent or session name: 1–128 of letters, digits, `.`, `_`, `-`.
pub fn validate_name(kind: &str, s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 128
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{s}` is not a valid {kind} name; use 1-128 letters, digits, `.`, `_` or `-`"
        ))
    }
}

/// One rule: `agent` may lease `secret` for (a subset of) `domains`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Grant {
    pub id: i64,
    pub agent: AgentPattern,
    pub secret: String,
    pub domains: Vec<DomainPattern>,
    #[serde(with = "duration_ms")]
    pub max_ttl: Duration,
    pub max_uses: Option<u32>,
    pub renewable: bool,
}

/// A grant as written by a person (CLI or YAML), before it has an id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantSpec {
    pub agent: AgentPattern,
    pub secret: String,
    pub domains: Vec<DomainPattern>,
    #[serde(with = "duration_human")]
    pub ttl: Duration,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_uses: Option<u32>,
    #[serde(default)]
    pub renewable: bool,
}

/// The YAML form of the whole policy, for `policy export` / `policy import`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyDocument {
    pub grants: Vec<GrantSpec>,
}

impl From<&Grant> for GrantSpec {
    fn from(g: &Grant) -> Self {
        GrantSpec {
            agent: g.agent.clone(),
            secret: g.secret.clone(),
            domains: g.domains.clone(),
            ttl: g.max_ttl,
            max_uses: g.max_uses,
            renewable: g.renewable,
        }
    }
}

/// Why a lease request was denied by policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicyDenial {
    /// No grant names this agent and secret.
    NoGrant,
    /// The first matching grant does not cover these domains.
    DomainsNotGranted {
        grant_id: i64,
        missing: Vec<DomainPattern>,
    },
    /// The request asks for longer than the grant's maximum TTL.
    TtlTooLong { grant_id: i64, max: Duration },
    /// The request asks for more uses than the grant allows.
    TooManyUses { grant_id: i64, max: u32 },
}

/// What the caller asks for; `None` takes the grant's value.
#[derive(Debug, Clone, Default)]
pub struct LeaseAsk {
    pub domains: Option<Vec<DomainPattern>>,
    pub ttl: Option<Duration>,
    pub max_uses: Option<u32>,
}

/// The terms a lease gets when policy allows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseTerms {
    pub grant_id: i64,
    pub domains: Vec<DomainPattern>,
    pub ttl: Duration,
    pub max_ttl: Duration,
    pub uses: Option<u32>,
    pub renewable: bool,
}

/// Deny by default; the first grant whose agent pattern matches and that
/// names `secret` decides. A request may narrow the grant, never widen it.
pub fn evaluate(
    grants: &[Grant],
    agent: &str,
    secret: &str,
    ask: &LeaseAsk,
) -> Result<LeaseTerms, PolicyDenial> {
    let grant = grants
        .iter()
        .find(|g| g.secret == secret && g.agent.matches(agent))
        .ok_or(PolicyDenial::NoGrant)?;
    let domains = match &ask.domains {
        Some(d) => {
            let missing: Vec<_> = uncovered(&grant.domains, d).into_iter().cloned().collect();
            if !missing.is_empty() {
                return Err(PolicyDenial::DomainsNotGranted {
                    grant_id: grant.id,
                    missing,
                });
            }
            d.clone()
        }
        None => grant.domains.clone(),
    };
    let ttl = ask.ttl.unwrap_or(grant.max_ttl);
    if ttl > grant.max_ttl {
        return Err(PolicyDenial::TtlTooLong {
            grant_id: grant.id,
            max: grant.max_ttl,
        });
    }
    let uses = match (ask.max_uses, grant.max_uses) {
        (Some(want), Some(max)) if want > max => {
            return Err(PolicyDenial::TooManyUses {
                grant_id: grant.id,
                max,
            });
        }
        (Some(want), _) => Some(want),
        (None, max) => max,
    };
    Ok(LeaseTerms {
        grant_id: grant.id,
        domains,
        ttl,
        max_ttl: grant.max_ttl,
        uses,
        renewable: grant.renewable,
    })
}

mod duration_ms {
    use serde::Serializer;
    use std::time::Duration;
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_secs())
    }
}

mod duration_human {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(*d))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        crate::clock::parse_duration(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(id: i64, agent: &str, secret: &str, domains: &[&str], ttl: u64) -> Grant {
        Grant {
            id,
            agent: AgentPattern::parse(agent).unwrap(),
            secret: secret.into(),
            domains: domains.iter().map(|d| d.parse().unwrap()).collect(),
            max_ttl: Duration::from_secs(ttl),
            max_uses: Some(10),
            renewable: false,
        }
    }

    #[test]
    fn agent_patterns() {
        let p = AgentPattern::parse("ci-*").unwrap();
        assert!(p.matches("ci-7") && p.matches("ci-") && !p.matches("cd-1"));
        assert!(AgentPattern::parse("*").unwrap().matches("anything"));
        let exact = AgentPattern::parse("claude").unwrap();
        assert!(exact.matches("claude") && !exact.matches("claude2"));
        for bad in ["", "a b", "c*i", "**", "a/b", "ci-*x"] {
            assert!(AgentPattern::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn deny_by_default_and_first_match_wins() {
        let grants = vec![
            grant(1, "ci-*", "npm", &["registry.npmjs.org"], 600),
            grant(2, "*", "npm", &["*.npmjs.org"], 3600),
        ];
        let ask = LeaseAsk::default();
        assert_eq!(
            evaluate(&grants, "ci-1", "github", &ask),
            Err(PolicyDenial::NoGrant)
        );
        assert_eq!(evaluate(&grants, "ci-1", "npm", &ask).unwrap().grant_id, 1);
        assert_eq!(evaluate(&grants, "dev", "npm", &ask).unwrap().grant_id, 2);
        // The first match decides even when a later grant would be wider.
        let wide = LeaseAsk {
            domains: Some(vec!["a.npmjs.org".parse().unwrap()]),
            ..Default::default()
        };
        assert!(matches!(
            evaluate(&grants, "ci-1", "npm", &wide),
            Err(PolicyDenial::DomainsNotGranted { grant_id: 1, .. })
        ));
    }

    #[test]
    fn requests_narrow_never_widen() {
        let grants = vec![grant(1, "a", "s", &["*.example.com"], 600)];
        let ok = LeaseAsk {
            domains: Some(vec!["api.example.com".parse().unwrap()]),
            ttl: Some(Duration::from_secs(60)),
            max_uses: Some(3),
        };
        let t = evaluate(&grants, "a", "s", &ok).unwrap();
        assert_eq!(t.ttl, Duration::from_secs(60));
        assert_eq!(t.uses, Some(3));
        let long = LeaseAsk {
            ttl: Some(Duration::from_secs(601)),
            ..Default::default()
        };
        assert!(matches!(
            evaluate(&grants, "a", "s", &long),
            Err(PolicyDenial::TtlTooLong { .. })
        ));
        let many = LeaseAsk {
            max_uses: Some(11),
            ..Default::default()
        };
        assert!(matches!(
            evaluate(&grants, "a", "s", &many),
            Err(PolicyDenial::TooManyUses { max: 10, .. })
        ));
        let apex = LeaseAsk {
            domains: Some(vec!["example.com".parse().unwrap()]),
            ..Default::default()
        };
        assert!(evaluate(&grants, "a", "s", &apex).is_err());
    }

    #[test]
    fn yaml_round_trip() {
        let doc = PolicyDocument {
            grants: vec![GrantSpec::from(&grant(
                1,
                "ci-*",
                "npm",
                &["*.npmjs.org"],
                900,
            ))],
        };
        let text = serde_saphyr::to_string(&doc).unwrap();
        let back: PolicyDocument = serde_saphyr::from_str(&text).unwrap();
        assert_eq!(back, doc);
        let typo = "grants:\n  - agent: a\n    secret: s\n    domian: [x.com]\n    ttl: 1m\n";
        assert!(serde_saphyr::from_str::<PolicyDocument>(typo).is_err());
    }
}
