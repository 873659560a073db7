//! zerolease: a host-side supervisor that runs AI coding agents in disposable
//! VMs and hands them only time-bounded, domain-scoped credential leases.
//!
//! The binary in `main.rs` only parses arguments and maps the result to an
//! exit code; everything else lives here so tests can call it directly. See
//! `ARCHITECTURE.md` for the code map.

pub mod cli;
pub mod clock;
pub mod doctor;
pub mod domain;
pub mod home;
pub mod image;
pub mod jail;
pub mod manifest;
pub mod proxy;
pub mod proxy_audit;
pub mod session;
pub mod vault;
pub mod vm;
