//! The one way rows get into citytsdb. HTTP (`/api/v1/write` and InfluxDB's
//! paths), MQTT and `citytsdb import --data-dir` all hand a line-protocol body to
//! an [`Ingestor`], which:
//!
//! 0. off the async threads, writes it directly (`write/direct.rs`) when its lines
//!    have their tables' usual keys, already columns: parsed straight into Arrow
//!    columns, then on to step 4; any other body takes steps 1-3;
//! 1. parses it on borrowed bytes (`line_protocol.rs`), off the async threads;
//! 2. validates each line under the storage engine's schema lock (`write.rs`),
//!    growing tables and columns, rejecting a line whose types conflict;
//! 3. builds one Arrow batch per table of the accepted lines;
//! 4. writes them with `Engine::write`, which returns once they are durable and
//!    visible;
//! 5. tells the [`WriteListener`]s (the alert fast path) of the written batches.
//!
//! Its [`IngestError`] says whose fault a failure is: the client's (do not send
//! it again), a busy or failed store's (send it again later: transient), or a
//! bug met on this request (sending it again meets it again).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use citytsdb_storage::units::now_nanos;
use citytsdb_storage::{Engine, StorageError};
use datafusion::arrow::error::ArrowError;
use datafusion::arrow::record_batch::RecordBatch;

use crate::line_protocol::LineError;
use crate::write::{
    build_batches, build_direct, parse_body_into, return_lines, spare_lines, validate_against,
    KnownSeries, KnownTable, Limits, Precision,
};

/// Told of every write once it is durable, with its batches (one per table, as
/// written). Must not block: it runs on the writer's task.
pub trait WriteListener: Send + Sync {
    /// `tables` were written to `db`.
    fn written(&self, db: &str, tables: &[(String, RecordBatch)]);
}

/// Whose fault a failed write is, which decides what its sender should do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The request is wrong; sending it again fails again (HTTP 4xx).
    Client,
    /// The store is busy or stopping; the same request may succeed later (HTTP 503).
    Retry,
    /// The store failed (its disk, its WAL, the object store): nothing was written,
    /// and the same request may succeed once the store is mended (HTTP 503 for a
    /// disk or object store error such as a full disk, 500 for corrupt data).
    Store,
    /// A bug met on this request: nothing was written, and sending it again would
    /// meet it again (HTTP 500).
    Bug,
}

impl Fault {
    /// Whether the same request may succeed later: the store is at fault, not the
    /// request. A sender that must not lose the request keeps it and tries again;
    /// otherwise the request itself is refused and sending it again is no use.
    pub fn is_transient(self) -> bool {
        matches!(self, Self::Retry | Self::Store)
    }
}

/// Why a write wrote nothing.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The database name cannot be stored.
    #[error("invalid database name: at most 255 characters, no control characters")]
    InvalidDatabase,
    /// The storage engine refused or failed the write.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The accepted lines could not be made into batches (a bug).
    #[error("building batches: {0}")]
    Batches(#[source] ArrowError),
    /// The blocking task parsing the body did not finish (a bug).
    #[error("the parsing task failed: {0}")]
    Task(String),
    /// The body holds more lines than one request may.
    #[error("the body has {lines} lines, more than the limit of {max} per request (--max-lines-per-request); send them in smaller requests")]
    TooManyLines {
        /// Lines in the body.
        lines: usize,
        /// The limit.
        max: usize,
    },
}

/// Lines in `body` as the parser numbers them: every newline ends one, and a last
/// line without a newline counts too.
pub fn count_lines(body: &[u8]) -> usize {
    let newlines = memchr::memchr_iter(b'\n', body).count();
    newlines + usize::from(body.last().is_some_and(|&b| b != b'\n'))
}

impl IngestError {
    /// Whose fault it is.
    pub fn fault(&self) -> Fault {
        use StorageError as S;
        match self {
            Self::InvalidDatabase | Self::TooManyLines { .. } => Fault::Client,
            Self::Storage(s) => match s {
                S::InvalidInput(_)
                | S::DatabaseNotFound(_)
                | S::TableNotFound(_)
                | S::Conflict(_) => Fault::Client,
                S::BufferFull(_) | S::ShuttingDown | S::Fenced(_) => Fault::Retry,
                // Encoding this request's batches failed.
                S::Arrow(_) | S::Parquet(_) => Fault::Bug,
                S::Corrupt(_)
                | S::Io(_)
                | S::ObjectStore(_)
                | S::DataDirInUse(_)
                | S::Internal(_) => Fault::Store,
            },
            Self::Batches(_) | Self::Task(_) => Fault::Bug,
        }
    }

    /// Whether the same write may succeed later ([`Fault::is_transient`]).
    pub fn is_transient(&self) -> bool {
        self.fault().is_transient()
    }
}

/// What to write and how.
#[derive(Debug, Clone, Copy)]
pub struct WriteOptions {
    /// The unit of the lines' timestamps.
    pub precision: Precision,
    /// Fsync before returning (false: InfluxDB 3's `no_sync`, the rows survive a
    /// crash of the process but not of the machine).
    pub sync: bool,
    /// Write the good lines of a body with bad ones (false: write nothing then).
    pub accept_partial: bool,
}

impl Default for WriteOptions {
    fn default() -> Self {
        Self {
            precision: Precision::Nanosecond,
            sync: true,
            accept_partial: true,
        }
    }
}

/// What a write did with a body.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Lines rejected, in line order (none written when `accept_partial` was false).
    pub rejected: Vec<LineError>,
    /// Lines that were neither blank nor comments.
    pub data_lines: usize,
    /// Whether the accepted lines were written.
    pub written: bool,
}

impl Outcome {
    /// Rows written.
    pub fn rows_written(&self) -> usize {
        if self.written {
            self.data_lines - self.rejected.len()
        } else {
            0
        }
    }
}

/// A body parsed and validated, not yet written.
pub struct Prepared {
    /// One Arrow batch per table, of the accepted lines.
    pub tables: Vec<(String, RecordBatch)>,
    /// Rejected lines, in line order.
    pub rejected: Vec<LineError>,
    /// Lines that were neither blank nor comments.
    pub data_lines: usize,
}

/// Counts of the writes an ingestor took since it was made (monotonic).
#[derive(Debug, Default)]
pub struct IngestMetrics {
    /// Write requests (bodies) taken, whatever came of them.
    pub writes: AtomicU64,
    /// Bodies' bytes (after decompression).
    pub bytes: AtomicU64,
    /// Rows written.
    pub rows: AtomicU64,
    /// Lines rejected.
    pub rejected_lines: AtomicU64,
    /// Writes that failed (not rejected lines: the store refused or failed).
    pub failures: AtomicU64,
}

/// Writes line protocol into a storage engine. Cheap to clone.
#[derive(Clone)]
pub struct Ingestor {
    storage: Engine,
    listeners: Vec<Arc<dyn WriteListener>>,
    metrics: Arc<IngestMetrics>,
    limits: Limits,
}

impl std::fmt::Debug for Ingestor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ingestor")
            .field("listeners", &self.listeners.len())
            .finish_non_exhaustive()
    }
}

impl Ingestor {
    /// An ingestor writing into `storage`.
    pub fn new(storage: Engine) -> Self {
        Self {
            storage,
            listeners: Vec::new(),
            metrics: Arc::default(),
            limits: Limits::default(),
        }
    }

    /// The same ingestor, checking writes against `limits`.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// What it has written since it was made.
    pub fn metrics(&self) -> &IngestMetrics {
        &self.metrics
    }

    /// Adds a listener told of every write.
    pub fn with_listener(mut self, listener: Arc<dyn WriteListener>) -> Self {
        self.listeners.push(listener);
        self
    }

    /// The storage engine written to.
    pub fn storage(&self) -> &Engine {
        &self.storage
    }

    /// Parses, validates and writes a body: its good lines, or, without
    /// `accept_partial`, nothing if a line is bad. When this returns `Ok` with
    /// `written`, the rows are visible and (with `sync`) durable.
    pub async fn write(
        &self,
        db: &str,
        body: bytes::Bytes,
        options: WriteOptions,
    ) -> Result<Outcome, IngestError> {
        let m = self.metrics.clone();
        m.writes.fetch_add(1, Relaxed);
        m.bytes.fetch_add(body.len() as u64, Relaxed);
        let result = self.write_body(db, body, options).await;
        match &result {
            Ok(o) => {
                m.rows.fetch_add(o.rows_written() as u64, Relaxed);
                m.rejected_lines.fetch_add(o.rejected.len() as u64, Relaxed);
            }
            Err(_) => {
                m.failures.fetch_add(1, Relaxed);
            }
        }
        result
    }

    async fn write_body(
        &self,
        db: &str,
        body: bytes::Bytes,
        options: WriteOptions,
    ) -> Result<Outcome, IngestError> {
        let now = now_nanos();
        let this = self.clone();
        let db_name = db.to_string();
        let prepared = tokio::task::spawn_blocking(move || {
            this.prepare(&db_name, &body, options.precision, now)
        })
        .await
        .map_err(|e| IngestError::Task(e.to_string()))??;
        let write = options.accept_partial || prepared.rejected.is_empty();
        if write && !prepared.tables.is_empty() {
            self.write_prepared(db, prepared.tables, options.sync)
                .await?;
        }
        Ok(Outcome {
            rejected: prepared.rejected,
            data_lines: prepared.data_lines,
            written: write,
        })
    }

    /// Writes batches made by [`Ingestor::prepare`] and tells the listeners.
    pub async fn write_prepared(
        &self,
        db: &str,
        tables: Vec<(String, RecordBatch)>,
        sync: bool,
    ) -> Result<(), IngestError> {
        if self.listeners.is_empty() {
            self.storage.write(db, tables, sync).await?;
            return Ok(());
        }
        // Batches share their buffers: the copy for the listeners is cheap.
        let written = tables.clone();
        self.storage.write(db, tables, sync).await?;
        for l in &self.listeners {
            l.written(db, &written);
        }
        Ok(())
    }

    /// Parses a body, validates its lines against the database's schemas (adding
    /// new tables and columns), and builds the batches of the accepted lines;
    /// lines without a timestamp get `now_ns`. Nothing is written. Blocks on the
    /// schema lock: call it off the async threads.
    pub fn prepare(
        &self,
        db: &str,
        body: &[u8],
        precision: Precision,
        now_ns: i64,
    ) -> Result<Prepared, IngestError> {
        check_db_name(db)?;
        let lines = count_lines(body);
        if lines > self.limits.max_lines {
            return Err(IngestError::TooManyLines {
                lines,
                max: self.limits.max_lines,
            });
        }
        if let Some(direct) = self.prepare_direct(db, body, precision, now_ns) {
            return Ok(direct);
        }
        let mut parsed = parse_body_into(body, spare_lines());
        let mut rejected = parsed.rejected;
        // A rollup's rows are computed by the store, never written.
        if let Some(rollups) = self.storage.catalog().rollups(db).filter(|r| !r.is_empty()) {
            parsed.lines.retain(|(raw, line)| {
                let Some(r) = rollups.get(line.measurement.as_ref()) else {
                    return true;
                };
                rejected.push(crate::write::at(
                    raw,
                    line,
                    1,
                    format!(
                        "table {} is a rollup of {}: its rows are computed, write to {} instead",
                        r.def.name, r.def.source, r.def.source
                    ),
                ));
                false
            });
        }
        let known = EngineSeries {
            engine: &self.storage,
            db,
        };
        let validated = self.storage.update_schemas(db, |schemas| {
            validate_against(parsed.lines, precision, schemas, &self.limits, &known)
        });
        rejected.extend(validated.rejected.iter().cloned());
        rejected.sort_by_key(|e| e.line);
        let tables = build_batches(&validated, now_ns);
        return_lines(validated.lines);
        let tables = tables.map_err(IngestError::Batches)?;
        Ok(Prepared {
            tables,
            rejected,
            data_lines: parsed.data_lines,
        })
    }
}

impl Ingestor {
    /// [`Ingestor::prepare`] of a body whose every line has its table's usual
    /// keys, all of them columns already (`write/direct.rs`): no schema changes,
    /// nothing rejected, and the schema lock is not taken. `None` for any other
    /// body, which then takes the general path.
    fn prepare_direct(
        &self,
        db: &str,
        body: &[u8],
        precision: Precision,
        now_ns: i64,
    ) -> Option<Prepared> {
        let catalog = self.storage.catalog();
        let rollups = catalog.rollups(db);
        let direct = build_direct(body, precision, now_ns, &self.limits, |table| {
            // A rollup's rows are computed by the store: the general path says so.
            if rollups.is_some_and(|r| r.contains_key(table)) {
                return None;
            }
            Some(KnownTable {
                schema: self.storage.table_schema(db, table)?,
                series: self
                    .storage
                    .with_series(db, table, |s| s.map_or(0, |s| s.len())),
            })
        })?;
        Some(Prepared {
            tables: direct.tables,
            rejected: Vec::new(),
            data_lines: direct.data_lines,
        })
    }
}

/// The series of one database, as the engine's registries know them.
struct EngineSeries<'e> {
    engine: &'e Engine,
    db: &'e str,
}

impl KnownSeries for EngineSeries<'_> {
    fn count(&self, table: &str) -> usize {
        self.engine
            .with_series(self.db, table, |s| s.map_or(0, |s| s.len()))
    }

    fn knows(&self, table: &str, tags: &[(&str, &str)]) -> bool {
        self.engine.with_series(self.db, table, |s| {
            s.is_some_and(|s| s.knows(tags.iter().copied()))
        })
    }
}

/// Refuses database names no store can hold.
pub fn check_db_name(db: &str) -> Result<(), IngestError> {
    if db.chars().count() > 255 || db.chars().any(char::is_control) {
        return Err(IngestError::InvalidDatabase);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_counted_as_the_parser_numbers_them() {
        assert_eq!(count_lines(b""), 0);
        assert_eq!(count_lines(b"a"), 1);
        assert_eq!(count_lines(b"a\n"), 1);
        assert_eq!(count_lines(b"a\n\nb"), 3);
        assert_eq!(count_lines(b"\n\n"), 2);
    }

    #[test]
    fn a_failing_store_is_transient_a_refused_or_buggy_request_is_not() {
        let transient = [
            StorageError::BufferFull("full".into()),
            StorageError::ShuttingDown,
            StorageError::Fenced("epoch 2".into()),
            StorageError::Io(std::io::Error::other("disk")),
            StorageError::Internal("the WAL is unusable".into()),
        ];
        for e in transient {
            assert!(IngestError::Storage(e).is_transient());
        }
        let permanent = [
            IngestError::InvalidDatabase,
            IngestError::Storage(StorageError::InvalidInput("too large".into())),
            IngestError::Storage(StorageError::DatabaseNotFound("city".into())),
            IngestError::Batches(ArrowError::ComputeError("bad".into())),
            IngestError::Task("panicked".into()),
        ];
        for e in permanent {
            assert!(!e.is_transient(), "{e:?}");
        }
    }
}
