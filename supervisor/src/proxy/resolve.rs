//! Name resolution on the host, behind a small trait so tests can count
//! queries and point names at loopback.
//!
//! **Architecture Invariant:** the resolver knows nothing about leases or
//! address policy; the proxy asks it only after a name passed the lease
//! check, and checks every answer itself.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;

use crate::domain::HostName;

/// A boxed resolver future.
pub type ResolveFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Vec<IpAddr>, ResolveError>> + Send + 'a>>;

/// Why a name could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("could not resolve `{name}`")]
    Lookup {
        name: HostName,
        #[source]
        source: std::io::Error,
    },
    #[error("`{name}` has no addresses")]
    NoAddresses { name: HostName },
}

/// Turns a host name into addresses.
pub trait Resolver: Send + Sync + fmt::Debug {
    fn resolve<'a>(&'a self, name: &'a HostName) -> ResolveFuture<'a>;
}

/// The host's own resolver (`getaddrinfo` via tokio).
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemResolver;

impl Resolver for SystemResolver {
    fn resolve<'a>(&'a self, name: &'a HostName) -> ResolveFuture<'a> {
        Box::pin(async move {
            let addrs = tokio::net::lookup_host((name.as_str(), 0))
                .await
                .map_err(|source| ResolveError::Lookup {
                    name: name.clone(),
                    source,
                })?;
            let mut ips: Vec<IpAddr> = Vec::new();
            for a in addrs {
                if !ips.contains(&a.ip()) {
                    ips.push(a.ip());
                }
            }
            if ips.is_empty() {
                return Err(ResolveError::NoAddresses { name: name.clone() });
            }
            Ok(ips)
        })
    }
}

/// Fixed answers for some names (tests, private networks); every other name
/// goes to `fallback`, or fails when there is none.
#[derive(Debug, Clone)]
pub struct OverrideResolver {
    overrides: HashMap<HostName, Vec<IpAddr>>,
    fallback: Option<Arc<dyn Resolver>>,
}

impl OverrideResolver {
    /// Only the overrides; unknown names fail to resolve.
    pub fn new(overrides: HashMap<HostName, Vec<IpAddr>>) -> Self {
        OverrideResolver {
            overrides,
            fallback: None,
        }
    }

    /// The overrides first, then `fallback`.
    pub fn with_fallback(
        overrides: HashMap<HostName, Vec<IpAddr>>,
        fallback: Arc<dyn Resolver>,
    ) -> Self {
        OverrideResolver {
            overrides,
            fallback: Some(fallback),
        }
    }
}

impl Resolver for OverrideResolver {
    fn resolve<'a>(&'a self, name: &'a HostName) -> ResolveFuture<'a> {
        if let Some(ips) = self.overrides.get(name) {
            let ips = ips.clone();
            return Box::pin(async move {
                if ips.is_empty() {
                    Err(ResolveError::NoAddresses { name: name.clone() })
                } else {
                    Ok(ips)
                }
            });
        }
        match &self.fallback {
            Some(fallback) => fallback.resolve(name),
            None => Box::pin(async move { Err(ResolveError::NoAddresses { name: name.clone() }) }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn overrides_answer_and_unknown_names_fail() {
        let name = HostName::parse("git.test").unwrap();
        let r = OverrideResolver::new(HashMap::from([(
            name.clone(),
            vec!["127.0.0.1".parse().unwrap()],
        )]));
        assert_eq!(
            r.resolve(&name).await.unwrap(),
            vec!["127.0.0.1".parse::<IpAddr>().unwrap()]
        );
        let other = HostName::parse("other.test").unwrap();
        assert!(matches!(
            r.resolve(&other).await,
            Err(ResolveError::NoAddresses { .. })
        ));
    }

    #[tokio::test]
    async fn system_resolver_handles_literals_without_network() {
        let name = HostName::parse("127.0.0.1").unwrap();
        assert_eq!(
            SystemResolver.resolve(&name).await.unwrap(),
            vec!["127.0.0.1".parse::<IpAddr>().unwrap()]
        );
    }
}
