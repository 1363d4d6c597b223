//! The benchmarks of citytsdb and their inputs.
//!
//! [`fixtures`] makes the inputs of the criterion micro-benchmarks
//! (`benches/benches/`) from the four-table city workload
//! (`citytsdb_workload::city`). `src/bin/alert_latency.rs` measures the alert
//! fast path over HTTP with the manhole workload (`citytsdb_workload::manhole`).

pub mod fixtures;
