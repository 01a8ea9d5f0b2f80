//! `updraft bench`: the benchmark suite. Every figure is printed beside a baseline
//! measured in the same run, because only ratios travel between machines.

pub mod cluster;
pub mod exec;
pub mod faults;
pub mod footprint;
mod h2;
pub mod offload;
pub mod placement;
