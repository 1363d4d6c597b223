//! The city workloads of citytsdb's tests and benchmarks, deterministic for a
//! seed and free of dependencies, so that what uses them links in a moment.
//!
//! - [`manhole`]: manhole covers' readings as a city's gateways send them (daily
//!   water cycles, rain bumps, rare tilt jumps, duplicate retries, late batches,
//!   tag values that need escaping), as line protocol and as the rows a correct
//!   store must hold afterwards. The end-to-end tests' workload.
//! - [`city`]: the four-table workload of `citytsdb gen` (covers, parking,
//!   traffic, sewage) as line protocol. The benchmarks' workload.

pub mod city;
pub mod manhole;
