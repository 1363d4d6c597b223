//! citytsdb's query side: SQL over the storage engine's snapshots.
//!
//! The read path, each step in its file:
//!
//! 1. `engine.rs` — parses the SQL, refuses anything not read-only, and opens a
//!    DataFusion session over a snapshot of the database (a copy of one base
//!    state made once). `plan_cache.rs` keeps the optimized plans of statements
//!    run before, so a repeated statement goes straight to physical planning.
//! 2. `provider.rs` — each table is a `CityTable`; its scan turns pushed-down
//!    filters into [`pruning::KeyBounds`] (`pruning.rs`), prunes segments by time and
//!    by the catalog's tag bitmaps, turns each segment's bitmaps into a Parquet
//!    access plan, and adds the buffered rows.
//! 3. `exec.rs` — `DedupExec` merges segments and buffered rows that overlap;
//!    `CityScanExec` reports what was pruned, for `EXPLAIN ANALYZE`.
//! 4. `first_last.rs`, `latest.rs` — analyzer rules: `first(x)`/`last(x)` become
//!    ordered aggregates; latest-per-series `DISTINCT ON` reads the series registry.
//!    `gapfill.rs` plans `date_bin_gapfill` with `locf`/`interpolate` as a
//!    `GapFill` node and runs it as `GapFillExec`.
//!    Both run in `collect.rs`'s `CollectExec`, which collects a node's whole
//!    input, charging it to the query's memory pool, then transforms it.
//! 5. `system.rs` — the `system` schema: tables, segments, devices, alert state.
//! 6. `error.rs` — failures classified as the user's (with a position) or ours.

pub mod batch;
pub mod collect;
pub mod decimal;
pub mod delete;
pub mod engine;
pub mod error;
pub mod exec;
pub mod first_last;
pub mod gapfill;
pub mod latest;
pub mod memory;
pub mod plan_cache;
pub mod provider;
pub mod pruning;
pub mod rollup;
pub mod run_agg;
pub mod string_views;
pub mod system;

pub use batch::BatchQuery;
pub use engine::{
    Described, QueryEngine, QueryLimits, QueryMetrics, QueryOutput, QueryStream, LATENCY_BUCKETS,
};
pub use error::{Position, QueryError};
