//! The storage engine: the write path from an acknowledged batch to a segment,
//! and the upkeep that keeps a store that has lived for years as cheap as a new one.
//!
//! 1. [`Engine::update_schemas`] serializes schema growth, so two writers cannot
//!    give one new column two types.
//! 2. [`Engine::write`] hands the encoded batch to the WAL thread, which appends
//!    every write that arrived meanwhile, fsyncs once (group commit), applies them to
//!    the write buffer, and only then acknowledges: an `Ok` is durable and visible.
//! 3. [`Engine::flush`] (`flush.rs`; run by the background flusher on size and age,
//!    or on request) rotates the WAL so the buffer's rows are exactly those in closed
//!    files, writes one new segment per table and day and a registry of the series it
//!    touched, commits them as one catalog record (`commit.rs`), and then deletes the
//!    closed WAL files. A failed flush keeps everything in memory and in the WAL, and
//!    is retried. A flush only adds: it never reads or rewrites a segment.
//! 4. Compaction (`compact.rs`), in the background, merges a day's small segments
//!    into large sorted ones and swaps them in with one record.
//! 5. Garbage collection (`gc.rs`) deletes what no version refers to once no reader
//!    holds an older one, and sweeps objects an interrupted flush or compaction left.
//! 6. [`Engine::snapshot`] gives readers a consistent view: a catalog version plus
//!    the buffered rows not in it; it pins that version until dropped.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use datafusion::arrow::record_batch::RecordBatch;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt};
use tokio::sync::{mpsc, oneshot, Notify};

use crate::buffer::{TableBuffer, WriteBuffer};
use crate::catalog::{Catalog, CatalogLog, TableCatalog, WriterId};
use crate::commit::Commits;
use crate::compact::CompactionConfig;
use crate::error::{Result, StorageError};
use crate::paths;
use crate::schema::TableSchema;
use crate::series::{SeriesRows, SeriesTable};
use crate::wal::{self, WalEntry, WalWriter};

/// How the engine is set up.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Local directory for the WAL.
    pub data_dir: PathBuf,
    /// Where segments and the catalog live.
    pub store: Arc<dyn ObjectStore>,
    /// Flush once this many rows are buffered.
    pub flush_rows: usize,
    /// Flush buffered rows at least this often.
    pub flush_interval: Duration,
    /// Writes are refused (see [`StorageError::BufferFull`]) while more than this
    /// many bytes wait in memory for a flush, as when the object store is failing.
    pub max_buffer_bytes: usize,
    /// How segments are merged in the background.
    pub compaction: CompactionConfig,
    /// An object no catalog version refers to is swept once it is this old (an
    /// interrupted flush or compaction left it; younger ones may still be on their
    /// way into the catalog from another process).
    pub sweep_grace: Duration,
    /// The directory of a local (`file://`) store, whose interrupted uploads leave
    /// staging files the store does not list; the sweep removes them too.
    pub local_store: Option<PathBuf>,
}

impl EngineConfig {
    /// The defaults for a data directory and a store.
    pub fn new(data_dir: PathBuf, store: Arc<dyn ObjectStore>) -> Self {
        Self {
            data_dir,
            store,
            flush_rows: 1_000_000,
            flush_interval: Duration::from_secs(60),
            max_buffer_bytes: 2 << 30,
            compaction: CompactionConfig::default(),
            sweep_grace: Duration::from_secs(3600),
            local_store: None,
        }
    }
}

/// Most writes one WAL group commit takes at once.
const MAX_GROUP: usize = 4096;

/// Unflushed rows moved out of the active buffer by a WAL rotation.
#[derive(Debug)]
pub(crate) struct Persisting {
    pub(crate) buffer: WriteBuffer,
    /// Every WAL file up to and including this one holds only rows of this and
    /// earlier persisting buffers.
    pub(crate) wal_upto: u64,
}

/// Database -> table -> series registry.
type SeriesMap = BTreeMap<String, BTreeMap<String, SeriesTable>>;

#[derive(Debug, Default)]
pub(crate) struct State {
    pub(crate) catalog: Arc<Catalog>,
    pub(crate) schemas: BTreeMap<String, BTreeMap<String, Arc<TableSchema>>>,
    pub(crate) active: WriteBuffer,
    pub(crate) persisting: Vec<Arc<Persisting>>,
    /// Every acknowledged row's series, buffered or persisted.
    pub(crate) series: SeriesMap,
}

impl State {
    fn apply_series(&mut self, db: &str, table: &str, batch: &RecordBatch) {
        let registry = self
            .series
            .entry(db.to_string())
            .or_default()
            .entry(table.to_string())
            .or_default();
        if let Err(e) = registry.apply(batch) {
            tracing::error!(db, table, error = %e, "cannot update the series registry");
        }
    }
}

enum WalCommand {
    Write {
        payload: Vec<u8>,
        entry: WalEntry,
        sync: bool,
        done: oneshot::Sender<Result<()>>,
    },
    Rotate {
        done: oneshot::Sender<Result<()>>,
    },
}

/// What a flush did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FlushStats {
    /// Segments written.
    pub segments_written: usize,
    /// Rows written to them (after merging).
    pub rows: u64,
    /// Existing segments replaced: always 0 since flushes only add segments
    /// (compaction replaces them); kept for the API's answer.
    pub segments_replaced: usize,
}

/// What opening found in the WAL, for the log.
#[derive(Debug, Clone, Default)]
struct ReplayStats {
    files: usize,
    skipped: usize,
    writes: usize,
    rows: usize,
    torn_bytes: u64,
}

/// Counts of the engine's work since it opened (monotonic).
#[derive(Debug, Default)]
pub struct EngineMetrics {
    /// Flushes that wrote segments.
    pub flushes: AtomicU64,
    /// Flushes that failed.
    pub flush_failures: AtomicU64,
    /// Rows the flushes wrote.
    pub flushed_rows: AtomicU64,
    /// Time spent flushing, nanoseconds.
    pub flush_nanos: AtomicU64,
    /// Compactions done.
    pub compactions: AtomicU64,
    /// Compactions that failed.
    pub compaction_failures: AtomicU64,
    /// Bytes of segments compactions read.
    pub compacted_bytes: AtomicU64,
    /// Time spent compacting, nanoseconds.
    pub compaction_nanos: AtomicU64,
}

/// The storage engine. Cheap to clone; all clones share one engine.
#[derive(Clone)]
pub struct Engine {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) config: EngineConfig,
    pub(crate) state: Arc<RwLock<State>>,
    pub(crate) schema_lock: Mutex<()>,
    wal_tx: Mutex<Option<mpsc::Sender<WalCommand>>>,
    wal_thread: Mutex<Option<JoinHandle<()>>>,
    pub(crate) flush_lock: tokio::sync::Mutex<()>,
    pub(crate) flush_wanted: Arc<Notify>,
    pub(crate) compaction_wanted: Notify,
    /// One compaction at a time (the background one, or one asked for).
    pub(crate) compaction_lock: tokio::sync::Mutex<()>,
    /// Set once when the engine stops; background tasks return when they see it.
    stop: tokio::sync::watch::Sender<bool>,
    pub(crate) stopping: std::sync::atomic::AtomicBool,
    /// Held (shared) by whatever writes objects on their way into the catalog, and
    /// (exclusive) by the sweep, which must not take them for leftovers.
    pub(crate) upkeep: tokio::sync::RwLock<()>,
    /// The catalog log, and this engine's place in it.
    pub(crate) commits: Commits,
    /// Versions readers hold: catalog record -> snapshots on it.
    pub(crate) readers: Arc<Mutex<BTreeMap<u64, usize>>>,
    /// Object ids (segments, series files) handed out by this process never repeat,
    /// even across failed flushes whose records may or may not have landed.
    next_object_id: std::sync::atomic::AtomicU32,
    /// Counts of the work done, for `/metrics`.
    pub(crate) metrics: EngineMetrics,
    /// The data directory's `LOCK` file, locked while the engine lives (the OS
    /// releases it when the process ends, however it ends).
    _lock: std::fs::File,
}

pub(crate) fn read(state: &RwLock<State>) -> RwLockReadGuard<'_, State> {
    state.read().unwrap_or_else(|e| e.into_inner())
}

pub(crate) fn write(state: &RwLock<State>) -> RwLockWriteGuard<'_, State> {
    state.write().unwrap_or_else(|e| e.into_inner())
}

/// Locking that outlives a panicked holder: every guarded value here stays
/// consistent between statements, so a poisoned lock is still safe to use.
pub(crate) trait Locked<T> {
    fn locked(&self) -> std::sync::MutexGuard<'_, T>;
}

impl<T> Locked<T> for Mutex<T> {
    fn locked(&self) -> std::sync::MutexGuard<'_, T> {
        self.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Engine {
    /// Opens the engine: locks the data directory, reads the catalog (its newest
    /// checkpoint and the records after it), claims the store with a new epoch,
    /// loads the series registries, replays the WAL files not yet persisted
    /// (cutting off a torn tail), and starts the WAL thread and the background
    /// flusher, compactor and collector.
    ///
    /// Fails with [`StorageError::DataDirInUse`] while another process has the
    /// data directory open: two writers of one WAL would corrupt it. Another
    /// process on another data directory sharing the store is fenced: its next
    /// commit fails with [`StorageError::Fenced`].
    ///
    /// Must be called within a Tokio runtime.
    pub async fn open(config: EngineConfig) -> Result<Self> {
        let wal_dir = paths::wal_dir(&config.data_dir);
        std::fs::create_dir_all(&wal_dir)?;
        let lock = lock_data_dir(&config.data_dir)?;
        let node = node_id(&config.data_dir)?;
        let started = std::time::Instant::now();
        let log = CatalogLog::new(config.store.clone());
        let loaded = log.load().await?;
        let catalog_ms = started.elapsed().as_millis();
        let (checkpoint, records) = (
            loaded.checkpoint.seq,
            loaded.catalog.seq - loaded.checkpoint.seq,
        );
        let commits = Commits::new(log, node.clone(), loaded.checkpoint, loaded.record_bytes);
        let catalog = commits.claim(loaded.catalog).await?;
        let series = load_series(&config.store, &catalog).await?;
        tracing::info!(
            checkpoint,
            records,
            catalog_ms,
            total_ms = started.elapsed().as_millis(),
            "opened the catalog and the series registries"
        );
        let wal_persisted = catalog.wal_persisted.get(&node).copied().unwrap_or(0);
        let mut state = State {
            series,
            schemas: catalog
                .tables()
                .map(|(db, t, tc)| (db.to_string(), t.to_string(), Arc::new(tc.schema.clone())))
                .fold(
                    BTreeMap::new(),
                    |mut m: BTreeMap<_, BTreeMap<_, _>>, (db, t, s)| {
                        m.entry(db).or_default().insert(t, s);
                        m
                    },
                ),
            ..Default::default()
        };
        for db in catalog.databases.keys() {
            // Databases made without tables (a retention set first).
            state.schemas.entry(db.clone()).or_default();
        }

        let mut replay = ReplayStats::default();
        let files = wal::list_files(&wal_dir)?;
        let mut last_seq = 0;
        for (seq, path) in &files {
            last_seq = *seq;
            if *seq <= wal_persisted {
                // Its rows are in segments; a crash came between the commit and
                // the file's deletion.
                std::fs::remove_file(path)?;
                replay.skipped += 1;
                continue;
            }
            let file = wal::replay_file(path)?;
            if file.entries.is_empty() {
                // Nothing in it was acknowledged (a server stopped before its first
                // write, or only a torn record): no reason to keep it.
                std::fs::remove_file(path)?;
                replay.skipped += 1;
                continue;
            }
            replay.files += 1;
            replay.torn_bytes += file.torn_bytes;
            for entry in file.entries {
                replay.writes += 1;
                replay.rows += entry
                    .tables
                    .iter()
                    .map(|(_, b)| b.num_rows())
                    .sum::<usize>();
                apply_replayed(&mut state, entry);
            }
        }
        if replay.files + replay.skipped > 0 {
            tracing::info!(
                files = replay.files,
                skipped = replay.skipped,
                writes = replay.writes,
                rows = replay.rows,
                torn_bytes = replay.torn_bytes,
                "replayed the WAL"
            );
        }
        let next_object_id = catalog.next_segment_id;
        state.catalog = Arc::new(catalog);
        let writer = WalWriter::create(&wal_dir, last_seq.max(wal_persisted) + 1)?;
        let state = Arc::new(RwLock::new(state));
        let flush_wanted = Arc::new(Notify::new());
        let (tx, rx) = mpsc::channel(MAX_GROUP);
        let thread = {
            let state = state.clone();
            let flush_wanted = flush_wanted.clone();
            let flush_rows = config.flush_rows;
            std::thread::Builder::new()
                .name("citytsdb-wal".into())
                .spawn(move || wal_loop(writer, rx, state, flush_wanted, flush_rows))?
        };
        let engine = Self {
            inner: Arc::new(Inner {
                config,
                state,
                schema_lock: Mutex::new(()),
                wal_tx: Mutex::new(Some(tx)),
                wal_thread: Mutex::new(Some(thread)),
                flush_lock: tokio::sync::Mutex::new(()),
                flush_wanted,
                compaction_wanted: Notify::new(),
                compaction_lock: tokio::sync::Mutex::new(()),
                stop: tokio::sync::watch::Sender::new(false),
                stopping: std::sync::atomic::AtomicBool::new(false),
                upkeep: tokio::sync::RwLock::new(()),
                commits,
                readers: Arc::new(Mutex::new(BTreeMap::new())),
                next_object_id: std::sync::atomic::AtomicU32::new(next_object_id),
                metrics: EngineMetrics::default(),
                _lock: lock,
            }),
        };
        engine.spawn_flusher();
        engine.spawn_compactor();
        engine.spawn_collector();
        Ok(engine)
    }

    /// The object store holding segments and the catalog.
    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.inner.config.store
    }

    /// The newest catalog version.
    pub fn catalog(&self) -> Arc<Catalog> {
        read(&self.inner.state).catalog.clone()
    }

    /// Who this engine writes as.
    pub fn writer(&self) -> WriterId {
        self.inner.commits.writer()
    }

    /// A fresh id for an object (a segment, a series file), never handed out before
    /// by this process nor found in the catalog.
    pub(crate) fn allocate_id(&self) -> u32 {
        let floor = read(&self.inner.state).catalog.next_segment_id;
        let ids = &self.inner.next_object_id;
        ids.fetch_max(floor, std::sync::atomic::Ordering::SeqCst);
        ids.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    }

    /// Runs `f` on the database's table schemas with every other schema change held
    /// off; changes `f` makes are visible to other writers when it returns.
    ///
    /// Not durable by itself: a new column becomes durable with the first write that
    /// carries it (the WAL records each batch's schema).
    pub fn update_schemas<R>(
        &self,
        db: &str,
        f: impl FnOnce(&mut BTreeMap<String, TableSchema>) -> R,
    ) -> R {
        let _guard = self.inner.schema_lock.locked();
        let mut schemas: BTreeMap<String, TableSchema> = read(&self.inner.state)
            .schemas
            .get(db)
            .map(|t| t.iter().map(|(k, v)| (k.clone(), (**v).clone())).collect())
            .unwrap_or_default();
        let out = f(&mut schemas);
        if schemas.is_empty() {
            // Nothing was accepted: a database is created by its first written row.
            return out;
        }
        let mut state = write(&self.inner.state);
        let current = state.schemas.entry(db.to_string()).or_default();
        for (table, schema) in schemas {
            if current.get(&table).map(|s| **s != schema).unwrap_or(true) {
                current.insert(table, Arc::new(schema));
            }
        }
        out
    }

    /// Writes batches (one per table) to `db`.
    ///
    /// When this returns `Ok`, the rows are visible to every query, and — if `sync` —
    /// durable: on disk in the WAL and fsynced. With `sync = false` they are in the
    /// OS's page cache and survive a crash of the process but not of the machine.
    pub async fn write(
        &self,
        db: &str,
        tables: Vec<(String, RecordBatch)>,
        sync: bool,
    ) -> Result<()> {
        let buffered = self.buffered_bytes();
        if buffered > self.inner.config.max_buffer_bytes {
            self.inner.flush_wanted.notify_one();
            return Err(StorageError::BufferFull(format!(
                "{buffered} bytes are waiting to be persisted (limit {}); the object store is failing or behind",
                self.inner.config.max_buffer_bytes
            )));
        }
        let entry = WalEntry {
            db: db.to_string(),
            tables,
        };
        let payload = entry.encode()?;
        let (done, wait) = oneshot::channel();
        self.send(WalCommand::Write {
            payload,
            entry,
            sync,
            done,
        })
        .await?;
        wait.await.map_err(|_| StorageError::ShuttingDown)?
    }

    async fn send(&self, cmd: WalCommand) -> Result<()> {
        let tx = self.inner.wal_tx.locked().clone();
        match tx {
            Some(tx) => tx.send(cmd).await.map_err(|_| StorageError::ShuttingDown),
            None => Err(StorageError::ShuttingDown),
        }
    }

    /// Moves the active buffer aside (still readable) and closes its WAL file.
    pub(crate) async fn rotate_wal(&self) -> Result<()> {
        let (done, wait) = oneshot::channel();
        self.send(WalCommand::Rotate { done }).await?;
        wait.await.map_err(|_| StorageError::ShuttingDown)?
    }

    /// A consistent read view of one database, or `None` if it does not exist. The
    /// catalog version it holds is not garbage-collected while the view lives.
    pub fn snapshot(&self, db: &str) -> Option<DbSnapshot> {
        let state = read(&self.inner.state);
        let schemas = state.schemas.get(db)?.clone();
        let mut buffers: BTreeMap<String, Vec<TableBuffer>> = BTreeMap::new();
        for buffer in state
            .persisting
            .iter()
            .map(|p| &p.buffer)
            .chain([&state.active])
        {
            if let Some(tables) = buffer.databases.get(db) {
                for (t, b) in tables {
                    buffers.entry(t.clone()).or_default().push(b.clone());
                }
            }
        }
        Some(DbSnapshot {
            name: db.to_string(),
            pin: Arc::new(ReaderPin::new(
                state.catalog.seq,
                self.inner.readers.clone(),
            )),
            catalog: state.catalog.clone(),
            schemas,
            buffers,
        })
    }

    /// What the engine has done since it opened.
    pub fn metrics(&self) -> &EngineMetrics {
        &self.inner.metrics
    }

    /// Bytes in the WAL directory now (files not yet persisted to segments).
    pub fn wal_bytes(&self) -> u64 {
        let dir = crate::paths::wal_dir(&self.inner.config.data_dir);
        std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok()?.metadata().ok())
                    .filter(|m| m.is_file())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    }

    /// The schema `db.table` has now (written but unpersisted columns included),
    /// without taking a whole snapshot.
    pub fn table_schema(&self, db: &str, table: &str) -> Option<Arc<TableSchema>> {
        read(&self.inner.state).schemas.get(db)?.get(table).cloned()
    }

    /// Calls `f` with the series registry of `db`.`table` (`None` when the table has
    /// no series yet), under the engine's read lock: keep `f` short.
    pub fn with_series<R>(
        &self,
        db: &str,
        table: &str,
        f: impl FnOnce(Option<&SeriesTable>) -> R,
    ) -> R {
        let state = read(&self.inner.state);
        f(state.series.get(db).and_then(|t| t.get(table)))
    }

    /// Every series of a table with its latest row, or `None` if the table does not
    /// exist. Built from memory: no segment is read. Series whose latest row is
    /// past the table's retention are left out (and no first time is older than
    /// the retention's cutoff).
    pub fn series_rows(&self, db: &str, table: &str) -> Option<Result<SeriesRows>> {
        let state = read(&self.inner.state);
        let schema = state.schemas.get(db)?.get(table)?.clone();
        let registry = state.series.get(db).and_then(|t| t.get(table));
        let rows = match registry {
            Some(r) => r.rows(&schema),
            None => SeriesTable::default().rows(&schema),
        };
        let cut = crate::retention::cutoff(
            state.catalog.retention(db, table),
            crate::units::now_nanos(),
        );
        Some(match cut {
            Some(cut) => rows.and_then(|r| r.since(cut)),
            None => rows,
        })
    }

    /// Makes `db` known (as its first write would), without tables.
    pub(crate) fn add_database(&self, db: &str) {
        write(&self.inner.state)
            .schemas
            .entry(db.to_string())
            .or_default();
    }

    /// Names of all databases.
    pub fn databases(&self) -> Vec<String> {
        read(&self.inner.state).schemas.keys().cloned().collect()
    }

    /// Approximate bytes of memory held by rows not yet persisted.
    pub fn buffered_bytes(&self) -> usize {
        let s = read(&self.inner.state);
        s.active.bytes + s.persisting.iter().map(|p| p.buffer.bytes).sum::<usize>()
    }

    /// Rows buffered and not yet persisted.
    pub fn buffered_rows(&self) -> usize {
        let s = read(&self.inner.state);
        s.active.rows + s.persisting.iter().map(|p| p.buffer.rows).sum::<usize>()
    }

    /// Deletes this node's WAL files up to `upto`: their rows are in segments.
    pub(crate) fn delete_wal_upto(&self, upto: u64) -> Result<()> {
        for (seq, path) in wal::list_files(&paths::wal_dir(&self.inner.config.data_dir))? {
            if seq <= upto {
                std::fs::remove_file(&path)?;
            }
        }
        Ok(())
    }

    fn spawn_flusher(&self) {
        let engine = self.clone();
        tokio::spawn(async move {
            let interval = engine.inner.config.flush_interval;
            let mut backoff = Duration::from_secs(1);
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(interval) => {}
                    _ = engine.inner.flush_wanted.notified() => {}
                    _ = engine.stopped() => return,
                }
                if engine.is_stopping() {
                    return;
                }
                if engine.buffered_rows() == 0 {
                    continue;
                }
                match engine.flush().await {
                    Ok(_) => backoff = Duration::from_secs(1),
                    Err(StorageError::ShuttingDown) => return,
                    Err(e) => {
                        tracing::error!(error = %e, retry_in = ?backoff, "flush failed; rows stay in the WAL and memory");
                        tokio::select! {
                            _ = tokio::time::sleep(backoff) => {}
                            _ = engine.stopped() => return,
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(60));
                        engine.inner.flush_wanted.notify_one();
                    }
                }
            }
        });
    }

    /// Resolves once the engine is stopping (at once if it already is).
    pub(crate) async fn stopped(&self) {
        let mut stop = self.inner.stop.subscribe();
        // `wait_for` looks at the current value first, so a stop sent before this
        // call is not missed.
        let _ = stop.wait_for(|&s| s).await;
    }

    pub(crate) fn is_stopping(&self) -> bool {
        self.inner
            .stopping
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Stops taking writes, flushes what is buffered, and stops the WAL thread and
    /// the background tasks.
    ///
    /// A failed final flush loses nothing: the rows stay in the WAL for the next start.
    pub async fn shutdown(&self) -> Result<()> {
        // The flag covers a task that is mid-work and not waiting on `stop`.
        self.inner
            .stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.inner.stop.send_replace(true);
        let flushed = self.flush().await;
        if flushed.is_ok() {
            // The next start then reads one checkpoint and no records.
            self.checkpoint_now().await;
        }
        self.inner.wal_tx.locked().take();
        let thread = self.inner.wal_thread.locked().take();
        if let Some(t) = thread {
            tokio::task::spawn_blocking(move || t.join())
                .await
                .map_err(|e| StorageError::Internal(e.to_string()))?
                .map_err(|_| StorageError::Internal("the WAL thread panicked".into()))?;
        }
        flushed.map(|_| ())
    }
}

#[cfg(test)]
impl Engine {
    /// Stops the engine as a crash would: no flush, the buffered rows stay in the
    /// WAL; the background tasks end, and with them the data directory's lock.
    pub(crate) async fn halt(self) {
        self.inner
            .stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.inner.stop.send_replace(true);
        self.inner.wal_tx.locked().take();
        let thread = self.inner.wal_thread.locked().take();
        if let Some(t) = thread {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }
}

/// A catalog version held by a reader; the collector keeps what it refers to.
#[derive(Debug)]
pub struct ReaderPin {
    seq: u64,
    readers: Arc<Mutex<BTreeMap<u64, usize>>>,
}

impl ReaderPin {
    fn new(seq: u64, readers: Arc<Mutex<BTreeMap<u64, usize>>>) -> Self {
        *readers.locked().entry(seq).or_default() += 1;
        Self { seq, readers }
    }
}

impl Drop for ReaderPin {
    fn drop(&mut self) {
        let mut readers = self.readers.locked();
        if let Some(n) = readers.get_mut(&self.seq) {
            *n -= 1;
            if *n == 0 {
                readers.remove(&self.seq);
            }
        }
    }
}

/// Takes the data directory's exclusive lock, without waiting for it.
fn lock_data_dir(data_dir: &Path) -> Result<std::fs::File> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(paths::lock_file(data_dir))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => {
            Err(StorageError::DataDirInUse(data_dir.display().to_string()))
        }
        // Some network file systems cannot lock; run unprotected rather than not at all.
        Err(std::fs::TryLockError::Error(e)) if e.kind() == std::io::ErrorKind::Unsupported => {
            tracing::warn!(data_dir = %data_dir.display(), "this file system cannot lock the data directory; make sure no other citytsdb process uses it");
            Ok(file)
        }
        Err(std::fs::TryLockError::Error(e)) => Err(e.into()),
    }
}

/// The data directory's node id, made once and kept in `NODE`.
fn node_id(data_dir: &Path) -> Result<String> {
    let path = paths::node_file(data_dir);
    match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => return Ok(id.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e.into()),
    }
    use std::hash::{BuildHasher, Hasher};
    // Unique enough to tell nodes apart: the clock, the process and the path, mixed
    // by the standard library's randomly keyed hasher.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_i64(crate::units::now_nanos());
    h.write_u32(std::process::id());
    h.write(data_dir.as_os_str().as_encoded_bytes());
    let id = format!("{:016x}", h.finish());
    crate::files::write_atomically(&path, id.as_bytes())?;
    Ok(id)
}

fn apply_replayed(state: &mut State, entry: WalEntry) {
    for (name, batch) in entry.tables {
        let tables = state.schemas.entry(entry.db.clone()).or_default();
        let incoming = match TableSchema::from_arrow(batch.schema_ref()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(db = %entry.db, table = %name, error = %e, "skipping a WAL batch with an unreadable schema");
                continue;
            }
        };
        let mut schema = tables.get(&name).map(|s| (**s).clone()).unwrap_or_default();
        if let Err(e) = schema.merge(&incoming) {
            tracing::error!(db = %entry.db, table = %name, error = %e, "skipping a WAL batch whose schema conflicts");
            continue;
        }
        tables.insert(name.clone(), Arc::new(schema));
        state.apply_series(&entry.db, &name, &batch);
        state.active.push(&entry.db, &name, batch);
    }
}

/// Reads a table's series registry: its full file, then each delta in order.
pub(crate) async fn read_registry(
    store: &Arc<dyn ObjectStore>,
    table: &TableCatalog,
) -> Result<SeriesTable> {
    let mut registry = SeriesTable::default();
    for key in table.series.keys() {
        let bytes = store.get(&ObjectPath::from(key)).await?.bytes().await?;
        let part = tokio::task::spawn_blocking(move || SeriesTable::decode(&bytes))
            .await
            .map_err(crate::flush::task_failed)??;
        if part.replaces {
            registry.replace_from(&part);
        } else if registry.is_empty() {
            registry = part;
        } else {
            registry.absorb(&part);
        }
    }
    Ok(registry)
}

/// Loads the series registry of every table the catalog lists.
async fn load_series(store: &Arc<dyn ObjectStore>, catalog: &Catalog) -> Result<SeriesMap> {
    let mut out = SeriesMap::new();
    for (db, table, tc) in catalog.tables() {
        let registry = read_registry(store, tc).await?;
        out.entry(db.to_string())
            .or_default()
            .insert(table.to_string(), registry);
    }
    Ok(out)
}

/// Writes and rotations the WAL thread has made durable, handed to the apply thread
/// in WAL order.
enum Durable {
    /// Writes one fsync made durable: make their rows visible, then acknowledge them.
    Group(Vec<(WalEntry, oneshot::Sender<Result<()>>)>),
    /// The WAL file `closed` was closed: every row applied so far is in it or an
    /// earlier file, so the active buffer moves aside with it.
    Rotated {
        closed: u64,
        done: oneshot::Sender<Result<()>>,
    },
}

/// Groups durable between the WAL thread and the apply thread at most: past them
/// the WAL thread waits, so a slow apply holds writers back rather than memory.
const DURABLE_QUEUE: usize = 2;

/// The WAL thread: appends each write, makes a group of them durable with one fsync,
/// and hands the group to the apply thread (spawned here), which makes its rows
/// visible and acknowledges them. The next group's appends and fsync overlap the
/// last group's apply; a write is still acknowledged only once it is durable and
/// visible. Returns once every write received is acknowledged or failed.
fn wal_loop(
    mut writer: WalWriter,
    mut rx: mpsc::Receiver<WalCommand>,
    state: Arc<RwLock<State>>,
    flush_wanted: Arc<Notify>,
    flush_rows: usize,
) {
    let (to_apply, durable) = std::sync::mpsc::sync_channel(DURABLE_QUEUE);
    let applier = std::thread::Builder::new()
        .name("citytsdb-apply".into())
        .spawn(move || apply_loop(durable, state, flush_wanted, flush_rows));
    let applier = match applier {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the WAL's apply thread");
            refuse_all(&mut rx, &format!("its apply thread did not start: {e}"));
            return;
        }
    };
    let mut group: Vec<WalCommand> = Vec::new();
    // Set when a failed write could not be cut off the WAL: from then on nothing can
    // be made durable safely, so every write is refused until a restart replays.
    let mut broken: Option<String> = None;
    while let Some(first) = rx.blocking_recv() {
        group.push(first);
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(c) => group.push(c),
                Err(_) => break,
            }
        }
        let mut pending: Vec<(WalEntry, oneshot::Sender<Result<()>>)> = Vec::new();
        let mut fsync = false;
        for cmd in group.drain(..) {
            if let Some(why) = &broken {
                refuse(cmd, why);
                continue;
            }
            match cmd {
                WalCommand::Write {
                    payload,
                    entry,
                    sync,
                    done,
                } => match writer.append(&payload) {
                    Ok(()) => {
                        fsync |= sync;
                        pending.push((entry, done));
                    }
                    Err(e) => {
                        fail_group(&mut writer, &mut pending, &mut broken, "append", &e);
                        let _ = done.send(Err(e));
                        fsync = false;
                    }
                },
                WalCommand::Rotate { done } => {
                    commit_group(&mut writer, &to_apply, &mut pending, fsync, &mut broken);
                    fsync = false;
                    match writer.rotate() {
                        Ok(closed) => hand_over(&to_apply, Durable::Rotated { closed, done }),
                        Err(e) => drop(done.send(Err(e))),
                    }
                }
            }
        }
        commit_group(&mut writer, &to_apply, &mut pending, fsync, &mut broken);
    }
    if broken.is_none() {
        if let Err(e) = writer.sync(true) {
            tracing::error!(error = %e, "final WAL sync failed");
        }
    }
    drop(to_apply);
    if applier.join().is_err() {
        tracing::error!("the WAL's apply thread panicked");
    }
}

/// Refuses a command because the WAL cannot be used (`why`).
fn refuse(cmd: WalCommand, why: &str) {
    let err = StorageError::Io(std::io::Error::other(format!(
        "the WAL is unusable ({why}); restart the server"
    )));
    match cmd {
        WalCommand::Write { done, .. } => drop(done.send(Err(err))),
        WalCommand::Rotate { done } => drop(done.send(Err(err))),
    }
}

/// Refuses every command until the channel closes (the WAL cannot be used).
fn refuse_all(rx: &mut mpsc::Receiver<WalCommand>, why: &str) {
    while let Some(cmd) = rx.blocking_recv() {
        refuse(cmd, why);
    }
}

/// Hands durable work to the apply thread. Should that thread be gone (it panicked),
/// the work's acknowledgements are dropped with it, and its writers are told the
/// server is stopping; the rows are in the WAL for the next start.
fn hand_over(to_apply: &std::sync::mpsc::SyncSender<Durable>, work: Durable) {
    if to_apply.send(work).is_err() {
        tracing::error!("the WAL's apply thread is gone: durable writes are not acknowledged");
    }
}

/// The apply thread: in WAL order, makes each durable group's rows visible (the
/// active buffer and the series registry) and acknowledges them, and moves the
/// active buffer aside at each WAL rotation.
fn apply_loop(
    durable: std::sync::mpsc::Receiver<Durable>,
    state: Arc<RwLock<State>>,
    flush_wanted: Arc<Notify>,
    flush_rows: usize,
) {
    for work in durable {
        match work {
            Durable::Group(pending) => {
                let wants_flush = {
                    let mut s = write(&state);
                    for (entry, _) in pending.iter() {
                        for (table, batch) in &entry.tables {
                            s.apply_series(&entry.db, table, batch);
                            s.active.push(&entry.db, table, batch.clone());
                        }
                    }
                    s.active.rows >= flush_rows
                };
                for (_, done) in pending {
                    let _ = done.send(Ok(()));
                }
                if wants_flush {
                    flush_wanted.notify_one();
                }
            }
            Durable::Rotated { closed, done } => {
                set_aside(&state, closed);
                let _ = done.send(Ok(()));
            }
        }
    }
}

/// Fails every write appended since the last fsync, for `cause`, and cuts them off
/// the WAL. A local disk's error (a full disk above all) stays an I/O error of its
/// kind, so the caller can tell a client to come back later.
fn fail_group(
    writer: &mut WalWriter,
    pending: &mut Vec<(WalEntry, oneshot::Sender<Result<()>>)>,
    broken: &mut Option<String>,
    what: &str,
    cause: &StorageError,
) {
    let failed = || {
        let message = format!("WAL {what} failed, the write was not made durable: {cause}");
        match cause {
            StorageError::Io(e) => StorageError::Io(std::io::Error::new(e.kind(), message)),
            _ => StorageError::Internal(message),
        }
    };
    for (_, done) in pending.drain(..) {
        let _ = done.send(Err(failed()));
    }
    if let Err(e) = writer.discard_unsynced() {
        tracing::error!(error = %e, "cannot cut failed writes off the WAL; refusing writes until restart");
        *broken = Some(e.to_string());
    }
}

/// Makes the appended writes durable (one fsync) and hands them to the apply thread,
/// which applies and acknowledges them.
fn commit_group(
    writer: &mut WalWriter,
    to_apply: &std::sync::mpsc::SyncSender<Durable>,
    pending: &mut Vec<(WalEntry, oneshot::Sender<Result<()>>)>,
    fsync: bool,
    broken: &mut Option<String>,
) {
    if pending.is_empty() {
        return;
    }
    if let Err(e) = writer.sync(fsync) {
        tracing::error!(error = %e, "WAL sync failed");
        fail_group(writer, pending, broken, "sync", &e);
        return;
    }
    hand_over(to_apply, Durable::Group(std::mem::take(pending)));
}

/// Moves the active buffer aside as persisting, its rows all in WAL files up to
/// `closed`.
fn set_aside(state: &RwLock<State>, closed: u64) {
    let mut s = write(state);
    let buffer = std::mem::take(&mut s.active);
    if !buffer.is_empty() {
        s.persisting.push(Arc::new(Persisting {
            buffer,
            wal_upto: closed,
        }));
    } else if let Some(last) = s.persisting.last_mut() {
        // Nothing new: the closed file holds nothing, so it can go with the last batch.
        if let Some(p) = Arc::get_mut(last) {
            p.wal_upto = closed;
        }
    }
}

/// A read view of one database: a catalog version plus the rows buffered since.
#[derive(Debug, Clone)]
pub struct DbSnapshot {
    /// Database name.
    pub name: String,
    /// The catalog version the view is based on.
    pub catalog: Arc<Catalog>,
    /// Current table schemas (including columns not yet persisted).
    pub schemas: BTreeMap<String, Arc<TableSchema>>,
    /// Buffered rows per table, oldest buffer first.
    pub buffers: BTreeMap<String, Vec<TableBuffer>>,
    /// Keeps `catalog`'s objects from being collected while the view lives.
    pin: Arc<ReaderPin>,
}

impl DbSnapshot {
    /// The persisted part of a table, if any of it is persisted.
    pub fn table_catalog(&self, table: &str) -> Option<&TableCatalog> {
        self.catalog.table(&self.name, table).map(|t| t.as_ref())
    }

    /// The catalog record the view is of.
    pub fn seq(&self) -> u64 {
        self.pin.seq
    }

    /// Buffered batches of a table in write order, with their overall time range.
    pub fn buffered(&self, table: &str) -> (Vec<RecordBatch>, Option<(i64, i64)>) {
        let Some(parts) = self.buffers.get(table) else {
            return (Vec::new(), None);
        };
        let batches = parts
            .iter()
            .flat_map(|b| b.batches.iter().cloned())
            .collect();
        let range = parts
            .iter()
            .filter(|b| b.rows > 0)
            .map(|b| (b.min_time, b.max_time))
            .reduce(|(a, b), (c, d)| (a.min(c), b.max(d)));
        (batches, range)
    }
}
