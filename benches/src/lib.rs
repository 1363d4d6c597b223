//! The city workload, for benchmarks and tests.
//!
//! [`workload`] generates manhole readings as a city's gateways send them —
//! daily water cycles, rain bumps, rare tilt jumps, duplicate retries, late
//! batches, tag values that need escaping — deterministically for a seed, as line
//! protocol and as the rows a correct store must hold afterwards.

pub mod workload;
