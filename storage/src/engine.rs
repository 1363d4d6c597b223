//! The storage engine: the write path from an acknowledged batch to a segment.
//!
//! 1. [`Engine::update_schemas`] serializes schema growth, so two writers cannot
//!    give one new column two types.
//! 2. [`Engine::write`] hands the encoded batch to the WAL thread, which appends
//!    every write that arrived meanwhile, fsyncs once (group commit), applies them to
//!    the write buffer, and only then acknowledges: an `Ok` is durable and visible.
//! 3. [`Engine::flush`] (run by the background flusher on size and age, or on
//!    request) rotates the WAL so the buffer's rows are exactly those in closed files,
//!    writes one segment per table and day, commits a new catalog version, and then
//!    deletes the closed WAL files. A failed flush keeps everything in memory and in
//!    the WAL, and is retried.
//! 4. [`Engine::snapshot`] gives readers a consistent view: a catalog version plus
//!    the buffered rows not in it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use datafusion::arrow::array::{AsArray, BooleanArray};
use datafusion::arrow::compute::filter_record_batch;
use datafusion::arrow::datatypes::TimestampNanosecondType;
use datafusion::arrow::record_batch::RecordBatch;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use tokio::sync::{mpsc, oneshot, Notify};

use crate::buffer::{time_range, TableBuffer, WriteBuffer};
use crate::catalog::{self, day_of, Catalog, SegmentMeta, TableCatalog};
use crate::error::{Result, StorageError};
use crate::merge::{align, key_columns, sort_dedup};
use crate::paths;
use crate::schema::{TableSchema, TIME_COLUMN};
use crate::segment;
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
}

/// How long replaced segments stay readable for queries that started before the swap.
const DELETE_GRACE: Duration = Duration::from_secs(300);
/// Most writes one WAL group commit takes at once.
const MAX_GROUP: usize = 4096;

/// Unflushed rows moved out of the active buffer by a WAL rotation.
#[derive(Debug)]
struct Persisting {
    buffer: WriteBuffer,
    /// Every WAL file up to and including this one holds only rows of this and
    /// earlier persisting buffers.
    wal_upto: u64,
}

/// Database -> table -> series registry.
type SeriesMap = BTreeMap<String, BTreeMap<String, SeriesTable>>;

#[derive(Debug, Default)]
struct State {
    catalog: Arc<Catalog>,
    schemas: BTreeMap<String, BTreeMap<String, Arc<TableSchema>>>,
    active: WriteBuffer,
    persisting: Vec<Arc<Persisting>>,
    /// Every acknowledged row's series, buffered or persisted.
    series: SeriesMap,
    /// The series of the rows `catalog` holds: where the next flush starts from.
    persisted_series: SeriesMap,
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
    /// Existing segments merged into new ones because late rows overlapped them.
    pub segments_replaced: usize,
}

/// What opening found in the WAL, for the log.
#[derive(Debug, Clone, Default)]
struct ReplayStats {
    /// WAL files read.
    pub files: usize,
    /// Writes replayed.
    pub writes: usize,
    /// Rows replayed.
    pub rows: usize,
    /// Bytes of torn tails cut off.
    pub torn_bytes: u64,
}

/// The storage engine. Cheap to clone; all clones share one engine.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    config: EngineConfig,
    state: Arc<RwLock<State>>,
    schema_lock: Mutex<()>,
    wal_tx: Mutex<Option<mpsc::Sender<WalCommand>>>,
    wal_thread: Mutex<Option<JoinHandle<()>>>,
    flush_lock: tokio::sync::Mutex<()>,
    flush_wanted: Arc<Notify>,
    stop: Notify,
    stopping: std::sync::atomic::AtomicBool,
    graveyard: Mutex<Vec<(Instant, Vec<ObjectPath>)>>,
    /// Segment ids handed out by this process never repeat, even across failed
    /// flushes whose catalog commit may or may not have landed.
    next_segment_id: std::sync::atomic::AtomicU32,
    /// The data directory's `LOCK` file, locked while the engine lives (the OS
    /// releases it when the process ends, however it ends).
    _lock: std::fs::File,
}

fn read(state: &RwLock<State>) -> RwLockReadGuard<'_, State> {
    state.read().unwrap_or_else(|e| e.into_inner())
}

fn write(state: &RwLock<State>) -> RwLockWriteGuard<'_, State> {
    state.write().unwrap_or_else(|e| e.into_inner())
}

/// Locking that outlives a panicked holder: every guarded value here stays
/// consistent between statements, so a poisoned lock is still safe to use.
trait Locked<T> {
    fn locked(&self) -> std::sync::MutexGuard<'_, T>;
}

impl<T> Locked<T> for Mutex<T> {
    fn locked(&self) -> std::sync::MutexGuard<'_, T> {
        self.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Engine {
    /// Opens the engine: locks the data directory, loads the newest catalog, replays
    /// the WAL (cutting off a torn tail), and starts the WAL thread and the
    /// background flusher.
    ///
    /// Fails with [`StorageError::DataDirInUse`] while another process has the
    /// data directory open: two writers of one WAL would corrupt it.
    ///
    /// Must be called within a Tokio runtime.
    pub async fn open(config: EngineConfig) -> Result<Self> {
        let wal_dir = paths::wal_dir(&config.data_dir);
        std::fs::create_dir_all(&wal_dir)?;
        let lock = lock_data_dir(&config.data_dir)?;
        let catalog = catalog::load_latest(&config.store).await?;
        let persisted_series = load_series(&config.store, &catalog).await?;
        let mut state = State {
            series: persisted_series.clone(),
            persisted_series,
            schemas: catalog
                .databases
                .iter()
                .map(|(db, d)| {
                    let tables = d
                        .tables
                        .iter()
                        .map(|(t, tc)| (t.clone(), Arc::new(tc.schema.clone())))
                        .collect();
                    (db.clone(), tables)
                })
                .collect(),
            catalog: Arc::new(catalog),
            ..Default::default()
        };

        let mut replay = ReplayStats::default();
        let files = wal::list_files(&wal_dir)?;
        let mut last_seq = 0;
        for (seq, path) in &files {
            let file = wal::replay_file(path)?;
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
            last_seq = *seq;
        }
        if replay.files > 0 {
            tracing::info!(
                files = replay.files,
                writes = replay.writes,
                rows = replay.rows,
                torn_bytes = replay.torn_bytes,
                "replayed the WAL"
            );
        }
        let writer = WalWriter::create(&wal_dir, last_seq + 1)?;
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
                stop: Notify::new(),
                stopping: std::sync::atomic::AtomicBool::new(false),
                graveyard: Mutex::new(Vec::new()),
                next_segment_id: std::sync::atomic::AtomicU32::new(0),
                _lock: lock,
            }),
        };
        engine.spawn_flusher();
        Ok(engine)
    }

    /// The object store holding segments and the catalog.
    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.inner.config.store
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

    /// A consistent read view of one database, or `None` if it does not exist.
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
            catalog: state.catalog.clone(),
            schemas,
            buffers,
        })
    }

    /// Every series of a table with its latest row, or `None` if the table does not
    /// exist. Built from memory: no segment is read.
    pub fn series_rows(&self, db: &str, table: &str) -> Option<Result<SeriesRows>> {
        let state = read(&self.inner.state);
        let schema = state.schemas.get(db)?.get(table)?.clone();
        let registry = state.series.get(db).and_then(|t| t.get(table));
        Some(match registry {
            Some(r) => r.rows(&schema),
            None => SeriesTable::default().rows(&schema),
        })
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

    /// Persists every buffered row to segments and deletes the WAL files that held them.
    ///
    /// When this returns `Ok`, every write acknowledged before the call is in a
    /// segment listed by a committed catalog version.
    pub async fn flush(&self) -> Result<FlushStats> {
        let _guard = self.inner.flush_lock.lock().await;
        if self.buffered_rows() == 0 {
            self.bury_expired().await;
            return Ok(FlushStats::default());
        }
        let (done, wait) = oneshot::channel();
        self.send(WalCommand::Rotate { done }).await?;
        wait.await.map_err(|_| StorageError::ShuttingDown)??;

        let (base, persisting, schemas, mut series) = {
            let s = read(&self.inner.state);
            (
                s.catalog.clone(),
                s.persisting.clone(),
                s.schemas.clone(),
                s.persisted_series.clone(),
            )
        };
        self.bury_expired().await;
        if persisting.is_empty() {
            return Ok(FlushStats::default());
        }
        let mut next = (*base).clone();
        next.version += 1;
        let floor = &self.inner.next_segment_id;
        next.next_segment_id = next
            .next_segment_id
            .max(floor.load(std::sync::atomic::Ordering::SeqCst));
        let mut stats = FlushStats::default();
        let mut replaced = Vec::new();
        let mut tables: BTreeMap<(String, String), Vec<RecordBatch>> = BTreeMap::new();
        for p in &persisting {
            for (db, ts) in &p.buffer.databases {
                for (t, b) in ts {
                    tables
                        .entry((db.clone(), t.clone()))
                        .or_default()
                        .extend(b.batches.iter().cloned());
                }
            }
        }
        for ((db, table), batches) in tables {
            let Some(schema) = schemas.get(&db).and_then(|t| t.get(&table)).cloned() else {
                return Err(StorageError::Internal(format!(
                    "buffered rows for {db}.{table} have no schema"
                )));
            };
            let registry = {
                let mut registry = series
                    .get(&db)
                    .and_then(|t| t.get(&table))
                    .cloned()
                    .unwrap_or_default();
                let (schema, batches) = (schema.clone(), batches.clone());
                tokio::task::spawn_blocking(move || {
                    for b in &batches {
                        registry.apply(b)?;
                    }
                    registry.encode(&schema).map(|bytes| (registry, bytes))
                })
                .await
                .map_err(|e| StorageError::Internal(format!("flush task failed: {e}")))??
            };
            let version = next.version;
            let (db_id, tc) = next.table_mut(&db, &table);
            let key = paths::series_file(db_id, tc.id, version);
            self.store().put(&key, PutPayload::from(registry.1)).await?;
            if let Some(old) = tc.series.replace(key.to_string()) {
                replaced.push(ObjectPath::from(old));
            }
            series
                .entry(db.clone())
                .or_default()
                .insert(table.clone(), registry.0);
            let days = {
                let schema = schema.clone();
                tokio::task::spawn_blocking(move || merge_by_day(&schema, &batches))
                    .await
                    .map_err(|e| StorageError::Internal(format!("flush task failed: {e}")))??
            };
            for (day, rows) in days {
                self.write_segment(
                    &mut next,
                    &db,
                    &table,
                    &schema,
                    day,
                    rows,
                    &mut stats,
                    &mut replaced,
                )
                .await?;
            }
        }
        for (db, tables) in &schemas {
            for (table, schema) in tables {
                if let Some(tc) = next
                    .databases
                    .get_mut(db)
                    .and_then(|d| d.tables.get_mut(table))
                {
                    tc.schema = (**schema).clone();
                }
            }
        }
        floor.fetch_max(next.next_segment_id, std::sync::atomic::Ordering::SeqCst);
        if let Err(e) = catalog::commit(self.store(), &next).await {
            // The commit may have landed anyway (a timeout after the write): start the
            // retry from whatever the store now holds.
            self.reload_catalog().await;
            return Err(e);
        }
        let wal_upto = persisting.iter().map(|p| p.wal_upto).max().unwrap_or(0);
        {
            let mut s = write(&self.inner.state);
            s.catalog = Arc::new(next);
            s.persisted_series = series;
            s.persisting
                .retain(|p| !persisting.iter().any(|q| Arc::ptr_eq(p, q)));
        }
        self.delete_wal_upto(wal_upto)?;
        if !replaced.is_empty() {
            self.inner
                .graveyard
                .locked()
                .push((Instant::now(), replaced));
        }
        tracing::debug!(?stats, "flushed");
        Ok(stats)
    }

    #[allow(clippy::too_many_arguments)]
    async fn write_segment(
        &self,
        next: &mut Catalog,
        db: &str,
        table: &str,
        schema: &Arc<TableSchema>,
        day: i64,
        rows: RecordBatch,
        stats: &mut FlushStats,
        replaced: &mut Vec<ObjectPath>,
    ) -> Result<()> {
        let Some((lo, hi)) = time_range(&rows) else {
            return Ok(());
        };
        let segment_id = next.allocate_segment_id();
        let (db_id, tc) = next.table_mut(db, table);
        tc.schema = (**schema).clone();
        let table_id = tc.id;
        // Segments of a table never overlap in time, so a (series, time) lives in at most
        // one: late rows that overlap existing segments are merged into a new one.
        let overlapping: Vec<SegmentMeta> = tc
            .segments
            .values()
            .filter(|s| s.day == day && s.overlaps(lo, hi))
            .cloned()
            .collect();
        let mut parts = Vec::with_capacity(overlapping.len() + 1);
        let arrow = schema.arrow_schema();
        for old in &overlapping {
            let bytes = self
                .store()
                .get(&ObjectPath::from(old.path.as_str()))
                .await?
                .bytes()
                .await?;
            for b in segment::decode(bytes)? {
                parts.push(align(&b, &arrow)?);
            }
        }
        let schema2 = schema.clone();
        let encoded = tokio::task::spawn_blocking(move || {
            let merged = if parts.is_empty() {
                rows
            } else {
                parts.push(rows);
                let keys = key_columns(&schema2, &arrow)?;
                sort_dedup(&arrow, &parts, &keys)?
            };
            segment::encode(&merged, &schema2)
        })
        .await
        .map_err(|e| StorageError::Internal(format!("segment encoding task failed: {e}")))??;

        let path = paths::segment_file(db_id, table_id, day, segment_id);
        let index_path = paths::segment_index(db_id, table_id, day, segment_id);
        let size = encoded.parquet.len() as u64;
        self.store()
            .put(&path, PutPayload::from(encoded.parquet.clone()))
            .await?;
        self.store()
            .put(&index_path, PutPayload::from(encoded.index.encode()?))
            .await?;
        let (min_time, max_time) = overlapping
            .iter()
            .fold((lo, hi), |(a, b), s| (a.min(s.min_time), b.max(s.max_time)));
        let tags: BTreeMap<String, Vec<String>> = encoded
            .index
            .tags
            .iter()
            .map(|(c, values)| (c.clone(), values.keys().cloned().collect()))
            .collect();
        let (_, tc) = next.table_mut(db, table);
        for old in &overlapping {
            tc.remove_segment(old.id);
            replaced.push(ObjectPath::from(old.path.as_str()));
            replaced.push(ObjectPath::from(old.index_path.as_str()));
        }
        let meta = SegmentMeta {
            id: segment_id,
            day,
            path: path.to_string(),
            index_path: index_path.to_string(),
            size,
            rows: encoded.rows,
            min_time,
            max_time,
            row_group_rows: encoded.row_group_rows,
        };
        tc.add_segment(meta, &tags);
        stats.segments_written += 1;
        stats.segments_replaced += overlapping.len();
        stats.rows += encoded.rows;
        Ok(())
    }

    async fn reload_catalog(&self) {
        match catalog::load_latest(self.store()).await {
            Ok(latest) => {
                let mut s = write(&self.inner.state);
                if latest.version > s.catalog.version {
                    tracing::warn!(
                        version = latest.version,
                        "a catalog commit reported failure but landed; using it"
                    );
                    s.catalog = Arc::new(latest);
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot reload the catalog after a failed commit"),
        }
    }

    fn delete_wal_upto(&self, upto: u64) -> Result<()> {
        for (seq, path) in wal::list_files(&paths::wal_dir(&self.inner.config.data_dir))? {
            if seq <= upto {
                std::fs::remove_file(&path)?;
            }
        }
        Ok(())
    }

    async fn bury_expired(&self) {
        let due: Vec<ObjectPath> = {
            let mut g = self.inner.graveyard.locked();
            let (due, keep): (Vec<_>, Vec<_>) =
                g.drain(..).partition(|(t, _)| t.elapsed() >= DELETE_GRACE);
            *g = keep;
            due.into_iter().flat_map(|(_, p)| p).collect()
        };
        for p in due {
            if let Err(e) = self.store().delete(&p).await {
                tracing::warn!(path = %p, error = %e, "could not delete a replaced segment");
            }
        }
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
                    _ = engine.inner.stop.notified() => return,
                }
                if engine
                    .inner
                    .stopping
                    .load(std::sync::atomic::Ordering::SeqCst)
                {
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
                            _ = engine.inner.stop.notified() => return,
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(60));
                        engine.inner.flush_wanted.notify_one();
                    }
                }
            }
        });
    }

    /// Stops taking writes, flushes what is buffered, and stops the WAL thread.
    ///
    /// A failed final flush loses nothing: the rows stay in the WAL for the next start.
    pub async fn shutdown(&self) -> Result<()> {
        // The flag covers a flusher that is mid-flush and not waiting on `stop`.
        self.inner
            .stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.inner.stop.notify_waiters();
        let flushed = self.flush().await;
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

/// Takes the data directory's exclusive lock, without waiting for it.
fn lock_data_dir(data_dir: &std::path::Path) -> Result<std::fs::File> {
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

/// Sorts and merges a table's buffered batches and splits them by UTC day.
fn merge_by_day(schema: &TableSchema, batches: &[RecordBatch]) -> Result<Vec<(i64, RecordBatch)>> {
    let arrow = schema.arrow_schema();
    let aligned = batches
        .iter()
        .map(|b| align(b, &arrow))
        .collect::<Result<Vec<_>>>()?;
    let keys = key_columns(schema, &arrow)?;
    let merged = sort_dedup(&arrow, &aligned, &keys)?;
    let times = merged
        .column_by_name(TIME_COLUMN)
        .and_then(|c| c.as_primitive_opt::<TimestampNanosecondType>())
        .ok_or_else(|| StorageError::Internal("merged batch has no time column".into()))?;
    let days: Vec<i64> = times.values().iter().map(|&t| day_of(t)).collect();
    let mut distinct = days.clone();
    distinct.sort_unstable();
    distinct.dedup();
    if distinct.len() <= 1 {
        return Ok(distinct.into_iter().map(|d| (d, merged.clone())).collect());
    }
    distinct
        .into_iter()
        .map(|d| {
            let mask = BooleanArray::from(days.iter().map(|&x| x == d).collect::<Vec<_>>());
            Ok((d, filter_record_batch(&merged, &mask)?))
        })
        .collect()
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

/// Loads the series registry of every table the catalog lists.
async fn load_series(store: &Arc<dyn ObjectStore>, catalog: &Catalog) -> Result<SeriesMap> {
    let mut out = SeriesMap::new();
    for (db, d) in &catalog.databases {
        for (table, tc) in &d.tables {
            let Some(key) = &tc.series else { continue };
            let bytes = store
                .get(&ObjectPath::from(key.as_str()))
                .await?
                .bytes()
                .await?;
            let registry = SeriesTable::decode(&bytes)?;
            out.entry(db.clone())
                .or_default()
                .insert(table.clone(), registry);
        }
    }
    Ok(out)
}

fn wal_loop(
    mut writer: WalWriter,
    mut rx: mpsc::Receiver<WalCommand>,
    state: Arc<RwLock<State>>,
    flush_wanted: Arc<Notify>,
    flush_rows: usize,
) {
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
                let err = || {
                    StorageError::Internal(format!(
                        "the WAL is unusable ({why}); restart the server"
                    ))
                };
                match cmd {
                    WalCommand::Write { done, .. } => drop(done.send(Err(err()))),
                    WalCommand::Rotate { done } => drop(done.send(Err(err()))),
                }
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
                        let _ = done.send(Err(e));
                        fail_group(&mut writer, &mut pending, &mut broken, "append");
                        fsync = false;
                    }
                },
                WalCommand::Rotate { done } => {
                    commit_group(&mut writer, &state, &mut pending, fsync, &mut broken);
                    fsync = false;
                    let _ = done.send(rotate(&mut writer, &state));
                }
            }
        }
        commit_group(&mut writer, &state, &mut pending, fsync, &mut broken);
        if read(&state).active.rows >= flush_rows {
            flush_wanted.notify_one();
        }
    }
    if broken.is_none() {
        if let Err(e) = writer.sync(true) {
            tracing::error!(error = %e, "final WAL sync failed");
        }
    }
}

/// Fails every write appended since the last fsync and cuts them off the WAL.
fn fail_group(
    writer: &mut WalWriter,
    pending: &mut Vec<(WalEntry, oneshot::Sender<Result<()>>)>,
    broken: &mut Option<String>,
    what: &str,
) {
    for (_, done) in pending.drain(..) {
        let _ = done.send(Err(StorageError::Internal(format!(
            "WAL {what} failed; the write was not made durable"
        ))));
    }
    if let Err(e) = writer.discard_unsynced() {
        tracing::error!(error = %e, "cannot cut failed writes off the WAL; refusing writes until restart");
        *broken = Some(e.to_string());
    }
}

/// Makes the appended writes durable (one fsync), applies them, and acknowledges them.
fn commit_group(
    writer: &mut WalWriter,
    state: &RwLock<State>,
    pending: &mut Vec<(WalEntry, oneshot::Sender<Result<()>>)>,
    fsync: bool,
    broken: &mut Option<String>,
) {
    if pending.is_empty() {
        return;
    }
    if let Err(e) = writer.sync(fsync) {
        tracing::error!(error = %e, "WAL sync failed");
        fail_group(writer, pending, broken, "sync");
        return;
    }
    {
        let mut s = write(state);
        for (entry, _) in pending.iter() {
            for (table, batch) in &entry.tables {
                s.apply_series(&entry.db, table, batch);
                s.active.push(&entry.db, table, batch.clone());
            }
        }
    }
    for (_, done) in pending.drain(..) {
        let _ = done.send(Ok(()));
    }
}

fn rotate(writer: &mut WalWriter, state: &RwLock<State>) -> Result<()> {
    let closed = writer.rotate()?;
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
    Ok(())
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
}

impl DbSnapshot {
    /// The persisted part of a table, if any of it is persisted.
    pub fn table_catalog(&self, table: &str) -> Option<&TableCatalog> {
        self.catalog.databases.get(&self.name)?.tables.get(table)
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
