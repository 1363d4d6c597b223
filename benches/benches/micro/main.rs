//! Criterion micro-benchmarks of the hot paths, one binary (so they link once),
//! a module per path:
//!
//! - `line_protocol`: parsing, validating and building batches of a write;
//! - `wal`: encoding and appending a write's WAL record;
//! - `segment`: encoding a day's rows as a Parquet segment;
//! - `index`: a segment's tag bitmaps and the access plan of a device;
//! - `scan`: queries over an engine in memory, and encoding their answers.
//!
//! `cargo bench -p citytsdb-benches --bench micro [-- FILTER]` runs them (FILTER
//! picks benchmarks by name, e.g. `wal`); `cargo test --workspace --all-targets`
//! runs each once as a test.

mod index;
mod line_protocol;
mod scan;
mod segment;
mod wal;

criterion::criterion_main!(
    line_protocol::benches,
    wal::benches,
    segment::benches,
    index::benches,
    scan::benches
);
