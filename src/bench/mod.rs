//! `updraft bench`: the benchmark suite. Every figure is printed beside a baseline
//! measured in the same run, because only ratios travel between machines.

pub mod cluster;
pub mod faults;
pub mod footprint;
pub mod offload;
pub mod placement;
