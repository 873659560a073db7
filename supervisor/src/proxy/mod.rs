//! The lease-gated egress proxy: HTTP CONNECT and TLS-SNI front ends per
//! session, no TLS termination.
//!
//! **Invariant:** a connection is admitted only when an active entry of the
//! session it arrived on covers its host name and port; the proxy resolves
//! the name itself only after that check, refuses special-purpose addresses
//! unless configured, and connects to exactly an address it checked.
//!
//! Layout: pure parsers ([`connect`], [`sni`]) and decisions ([`addr`],
//! [`policy`]); the live state ([`registry`]); I/O ([`resolve`], [`server`],
//! [`dns`]); and what gets reported ([`events`]).
//!
//! **Architecture Invariant:** the proxy does not know about the vault. It
//! is told what is reachable through [`registry::ProxyRegistry::grant`] and
//! tells the world what happened through [`events::ProxyEvents`].

pub mod addr;
pub mod connect;
pub mod dns;
pub mod events;
pub mod policy;
pub mod props;
pub mod registry;
pub mod resolve;
pub mod server;
pub mod sni;
