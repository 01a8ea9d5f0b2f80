//! The `updraft` package: the demo and the benchmark suite, which run a daemon and an
//! agent in one process over real QUIC on loopback, and the [`harness`] they share
//! with the end-to-end tests.
#![forbid(unsafe_code)]

pub mod bench;
pub mod demo;
pub mod harness;
