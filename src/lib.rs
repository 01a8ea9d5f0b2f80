//! The `updraft` package: the demo and the benchmark suite, which run a daemon and an
//! agent in one process over real QUIC on loopback, and the [`harness`] the two share to
//! start them. The end-to-end tests in `tests/` do not use it: they start the real
//! `updraftd` and `updraft-agent` binaries as child processes (`tests/common`).
#![forbid(unsafe_code)]

pub mod bench;
pub mod demo;
pub mod harness;
