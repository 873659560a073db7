//! The end-to-end suite: one test binary, one module per area. Every test
//! builds its own network namespaces (see `zerolease_tests::Netns`) and needs
//! root; under `CI=true` a missing privilege or tool fails the test.

mod devbox;
mod jail;
mod lease;
mod proxy;
mod report;
mod session;
mod tap;
mod tty;
mod workspace;
mod world;
