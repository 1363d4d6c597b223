//! The city workload, for benchmarks and tests.
//!
//! [`workload`] generates manhole readings as a city's gateways send them —
//! daily water cycles, rain bumps, rare tilt jumps, duplicate retries, late
//! batches, tag values that need escaping — deterministically for a seed, as line
//! protocol and as the rows a correct store must hold afterwards.
//!
//! [`fixtures`] makes the inputs of the criterion micro-benchmarks
//! (`benches/benches/`) from the four-table workload of `citytsdb gen`.

pub mod fixtures;
pub mod workload;
