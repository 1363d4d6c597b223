//! citytsdb's storage: where an acknowledged reading lives until it is queried.
//!
//! The write path, each step in its file:
//!
//! 1. `schema.rs` — a table's columns (`time`, tags, typed fields), grown on write.
//! 2. `wal.rs` — each write becomes one checksummed WAL record; a group of writes
//!    shares one fsync, after which the write is acknowledged (`engine.rs`).
//! 3. `buffer.rs` — acknowledged batches wait in memory, queryable at once.
//! 4. `merge.rs` — on flush, rows are sorted by series then time and a (series,
//!    time) written twice is merged (last write wins, field by field).
//! 5. `segment.rs` + `index.rs` — one Parquet segment per table and UTC day, with
//!    its tag -> row bitmaps and page boundaries beside it.
//! 6. `catalog/` + `commit.rs` — one create-only catalog record adds the segments
//!    and their tag -> segment bitmaps; then the WAL files it covers are deleted.
//!
//! After that, in the background: `compact.rs` merges a day's segments, `gc.rs`
//! deletes what no version refers to, `retention.rs` drops rows past a table's
//! retention, and `delete.rs` masks deleted rows in their segments until compaction
//! leaves them out; `rollup.rs` keeps what a rollup's materialised rows lag
//! behind.
//!
//! `series.rs` keeps every series' latest row and time span in memory, updated
//! with the buffer and persisted with each flush (a delta per flush, folded now
//! and then; a delete's correction replaces entries).
//!
//! Every object key is built in `paths.rs`. Readers take an [`engine::DbSnapshot`]:
//! a catalog version plus the buffered rows not yet in it.

pub mod buffer;
pub mod catalog;
mod commit;
pub mod compact;
pub mod delete;
pub mod engine;
pub mod error;
pub mod files;
mod flush;
#[cfg(test)]
mod fuzz;
pub mod gc;
pub mod index;
#[cfg(test)]
mod lifecycle_tests;
pub mod merge;
pub mod paths;
pub mod retention;
pub mod rollup;
pub mod schema;
pub mod segment;
pub mod series;
pub mod units;
pub mod wal;

pub use compact::{CompactionConfig, CompactionStats};
pub use delete::{DeleteStats, DeleteTurn};
pub use engine::{DbSnapshot, Engine, EngineConfig, EngineMetrics, FlushStats};
pub use error::{Result, StorageError};
pub use gc::GcStats;
pub use retention::DatabaseSettings;
pub use schema::{ColumnKind, FieldType, TableSchema};
