//! Benchmarking support. For now: the deterministic data that benchmarks and
//! tests write. TODO(#6): the `larder bench` subcommand and its workloads.

pub mod data;
