//! The catalog on the object store: create-only records and checkpoints.
//!
//! - `catalog/log/<seq>.json` — one [`Record`] each, written with
//!   `PutMode::Create` (the local file system, S3 and memory stores all support it;
//!   none needs a conditional update). Of two writers putting the same number,
//!   exactly one succeeds; the other reads what won and tries the next number.
//! - `catalog/checkpoint/<seq>.json.zst` — the whole [`Catalog`] as of record `seq`,
//!   zstd-compressed JSON.
//!
//! Reading the state: the newest checkpoint, then records `seq + 1`, `seq + 2`, ...
//! fetched one by one until one is missing. Nothing is listed but the handful of
//! checkpoints, so opening costs what changed since the last checkpoint.
//!
//! A store written before the log existed holds numbered whole snapshots
//! (`catalog/<version>.json`); the newest is read as the state before record 1.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::TryStreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::Deserialize;

use super::record::Record;
use super::{Bitmap, Catalog, DatabaseCatalog, DayCatalog, SegmentMeta, SeriesFiles, TableCatalog};
use crate::error::{Result, StorageError};
use crate::paths;
use crate::schema::TableSchema;

/// Where the whole snapshots of stores written before the log lived.
pub const LEGACY_PREFIX: &str = "catalog";

/// Records read at once when catching up.
const READ_AHEAD: u64 = 8;
/// The zstd level of checkpoints.
const CHECKPOINT_ZSTD_LEVEL: i32 = 3;

/// The catalog's records and checkpoints in one object store.
#[derive(Clone)]
pub struct CatalogLog {
    store: Arc<dyn ObjectStore>,
}

impl std::fmt::Debug for CatalogLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CatalogLog").finish_non_exhaustive()
    }
}

/// A checkpoint's place and weight.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Checkpoint {
    /// The record it holds the state as of.
    pub seq: u64,
    /// Its size in bytes.
    pub bytes: u64,
}

/// What opening read.
#[derive(Debug, Clone, Default)]
pub struct Loaded {
    /// The state.
    pub catalog: Catalog,
    /// The checkpoint it started from.
    pub checkpoint: Checkpoint,
    /// Bytes of the records read after it.
    pub record_bytes: u64,
}

fn create_only() -> PutOptions {
    PutOptions {
        mode: PutMode::Create,
        ..Default::default()
    }
}

impl CatalogLog {
    /// The log in `store`.
    pub fn new(store: Arc<dyn ObjectStore>) -> Self {
        Self { store }
    }

    /// The newest state: the newest checkpoint (or a store's legacy snapshot) and
    /// every record after it.
    pub async fn load(&self) -> Result<Loaded> {
        let checkpoints = self.checkpoints().await?;
        let (catalog, checkpoint) = match checkpoints.last() {
            Some(&seq) => {
                let (catalog, bytes) = self.read_checkpoint(seq).await?;
                (catalog, Checkpoint { seq, bytes })
            }
            None => (
                self.read_legacy().await?.unwrap_or_default(),
                Checkpoint::default(),
            ),
        };
        let (catalog, record_bytes) = self.catch_up(catalog).await?;
        Ok(Loaded {
            catalog,
            checkpoint,
            record_bytes,
        })
    }

    /// `state` with every record after it applied; also the records' bytes.
    pub async fn catch_up(&self, mut state: Catalog) -> Result<(Catalog, u64)> {
        let mut bytes = 0;
        loop {
            // Several reads at once: on S3 each is a round trip.
            let from = state.seq + 1;
            let batch =
                futures::future::try_join_all((from..from + READ_AHEAD).map(|seq| self.read(seq)))
                    .await?;
            for found in batch {
                let Some((record, size)) = found else {
                    return Ok((state, bytes));
                };
                state = state.applied(&record)?;
                bytes += size;
            }
        }
    }

    /// Record `seq` and its size, or `None` if it does not exist (yet).
    pub async fn read(&self, seq: u64) -> Result<Option<(Record, u64)>> {
        let path = paths::catalog_record(seq);
        let bytes = match self.store.get(&path).await {
            Ok(r) => r.bytes().await?,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        Ok(Some((decode_record(seq, &bytes)?, bytes.len() as u64)))
    }

    /// Creates `record` as its number. `Ok(Some(bytes))` when it is now there
    /// (written, or found already written with the very same contents, as when a
    /// commit's answer was lost and it is tried again); `Ok(None)` when another
    /// record took the number.
    pub async fn append(&self, record: &Record) -> Result<Option<u64>> {
        let json = serde_json::to_vec(record).map_err(|e| {
            StorageError::Internal(format!("catalog record does not serialize: {e}"))
        })?;
        let path = paths::catalog_record(record.seq);
        match self
            .store
            .put_opts(&path, PutPayload::from(json.clone()), create_only())
            .await
        {
            Ok(_) => Ok(Some(json.len() as u64)),
            Err(object_store::Error::AlreadyExists { .. }) => {
                let existing = self.store.get(&path).await?.bytes().await?;
                Ok((existing.as_ref() == json.as_slice()).then_some(json.len() as u64))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Writes `catalog` as the checkpoint of its record; returns its size as JSON
    /// (what the records since are weighed against).
    pub async fn write_checkpoint(&self, catalog: Arc<Catalog>) -> Result<u64> {
        let seq = catalog.seq;
        // A large catalog takes a while to print: not on the async threads.
        // Mostly tag values and segment keys: zstd takes it to a tenth or less.
        let json = tokio::task::spawn_blocking(move || {
            let json = serde_json::to_vec(catalog.as_ref())
                .map_err(|e| StorageError::Internal(format!("catalog does not serialize: {e}")))?;
            let packed = zstd::bulk::compress(&json, CHECKPOINT_ZSTD_LEVEL)?;
            Ok::<_, StorageError>((packed, json.len() as u64))
        })
        .await
        .map_err(crate::flush::task_failed)??;
        let (json, weight) = json;
        let path = paths::catalog_checkpoint(seq);
        match self
            .store
            .put_opts(&path, PutPayload::from(json.clone()), create_only())
            .await
        {
            // The same state folded twice is the same checkpoint.
            Ok(_) | Err(object_store::Error::AlreadyExists { .. }) => Ok(weight),
            Err(e) => Err(e.into()),
        }
    }

    /// The checkpoints in the store, oldest first.
    pub async fn checkpoints(&self) -> Result<Vec<u64>> {
        let prefix = paths::catalog_checkpoint_prefix();
        let mut seqs: Vec<u64> = self
            .store
            .list(Some(&prefix))
            .try_filter_map(|m| async move { Ok(paths::catalog_checkpoint_seq(&m.location)) })
            .try_collect()
            .await?;
        seqs.sort_unstable();
        Ok(seqs)
    }

    async fn read_checkpoint(&self, seq: u64) -> Result<(Catalog, u64)> {
        let bytes = self
            .store
            .get(&paths::catalog_checkpoint(seq))
            .await?
            .bytes()
            .await?;
        decode_checkpoint(seq, &bytes)
    }

    /// The newest whole snapshot of a store written before the log, as the state
    /// before record 1.
    async fn read_legacy(&self) -> Result<Option<Catalog>> {
        let listed = self
            .store
            .list_with_delimiter(Some(&ObjectPath::from(LEGACY_PREFIX)))
            .await?;
        let newest = listed
            .objects
            .iter()
            .filter_map(|m| Some((paths::legacy_catalog_version(&m.location)?, &m.location)))
            .max();
        let Some((version, path)) = newest else {
            return Ok(None);
        };
        let bytes = self.store.get(path).await?.bytes().await?;
        let legacy: LegacyCatalog = serde_json::from_slice(&bytes)
            .map_err(|e| StorageError::Corrupt(format!("catalog version {version}: {e}")))?;
        tracing::info!(
            version,
            "reading the catalog of a store written before the catalog log"
        );
        Ok(Some(legacy.into_catalog()))
    }
}

/// Record `seq` from the bytes stored as it; corrupt unless they are that record.
pub(crate) fn decode_record(seq: u64, bytes: &[u8]) -> Result<Record> {
    let record: Record = serde_json::from_slice(bytes)
        .map_err(|e| StorageError::Corrupt(format!("catalog record {seq}: {e}")))?;
    if record.seq != seq {
        return Err(StorageError::Corrupt(format!(
            "catalog record {} says it is record {}",
            paths::catalog_record(seq),
            record.seq
        )));
    }
    Ok(record)
}

/// The catalog checkpoint `seq` from its stored bytes, and its size as JSON;
/// corrupt unless they are that checkpoint.
pub(crate) fn decode_checkpoint(seq: u64, bytes: &[u8]) -> Result<(Catalog, u64)> {
    let corrupt =
        |e: &dyn std::fmt::Display| StorageError::Corrupt(format!("catalog checkpoint {seq}: {e}"));
    let json = zstd::stream::decode_all(bytes).map_err(|e| corrupt(&e))?;
    let catalog: Catalog = serde_json::from_slice(&json).map_err(|e| corrupt(&e))?;
    if catalog.seq != seq {
        return Err(StorageError::Corrupt(format!(
            "catalog checkpoint {seq} holds record {}",
            catalog.seq
        )));
    }
    Ok((catalog, json.len() as u64))
}

/// A whole catalog snapshot as stores before the log wrote them.
#[derive(Deserialize)]
struct LegacyCatalog {
    next_db_id: u32,
    next_table_id: u32,
    next_segment_id: u32,
    databases: BTreeMap<String, LegacyDatabase>,
}

#[derive(Deserialize)]
struct LegacyDatabase {
    id: u32,
    tables: BTreeMap<String, LegacyTable>,
}

#[derive(Deserialize)]
struct LegacyTable {
    id: u32,
    schema: TableSchema,
    segments: BTreeMap<u32, SegmentMeta>,
    tag_segments: BTreeMap<String, BTreeMap<String, Bitmap>>,
    #[serde(default)]
    series: Option<String>,
}

impl LegacyCatalog {
    /// Segments never overlapped in these stores, so all of them may share run 0.
    fn into_catalog(self) -> Catalog {
        let databases = self
            .databases
            .into_iter()
            .map(|(name, d)| {
                let tables = d
                    .tables
                    .into_iter()
                    .map(|(t, lt)| (t, Arc::new(lt.into_table())))
                    .collect();
                (
                    name,
                    Arc::new(DatabaseCatalog {
                        id: d.id,
                        tables,
                        ..Default::default()
                    }),
                )
            })
            .collect();
        Catalog {
            next_db_id: self.next_db_id,
            next_table_id: self.next_table_id,
            next_segment_id: self.next_segment_id,
            databases,
            ..Default::default()
        }
    }
}

impl LegacyTable {
    fn into_table(self) -> TableCatalog {
        let mut days: BTreeMap<i64, DayCatalog> = BTreeMap::new();
        let day_of_segment: BTreeMap<u32, i64> =
            self.segments.values().map(|s| (s.id, s.day)).collect();
        for (id, meta) in self.segments {
            days.entry(meta.day).or_default().segments.insert(id, meta);
        }
        for (column, values) in self.tag_segments {
            for (value, ids) in values {
                for id in ids.0.iter() {
                    let Some(day) = day_of_segment.get(&id).and_then(|d| days.get_mut(d)) else {
                        continue;
                    };
                    day.tags
                        .entry(column.clone())
                        .or_default()
                        .entry(value.clone())
                        .or_default()
                        .0
                        .insert(id);
                }
            }
        }
        TableCatalog {
            id: self.id,
            schema: self.schema,
            days: days.into_iter().map(|(d, c)| (d, Arc::new(c))).collect(),
            series: SeriesFiles {
                full: self.series,
                deltas: Vec::new(),
            },
            retention: None,
            deletes: Vec::new(),
        }
    }
}

#[cfg(test)]
mod fuzz;

#[cfg(test)]
mod tests {
    use object_store::memory::InMemory;

    use super::super::{Op, WriterId};
    use super::*;

    fn claim(seq: u64, node: &str, epoch: u64) -> Record {
        let writer = WriterId {
            node: node.into(),
            epoch,
        };
        Record {
            seq,
            writer: writer.clone(),
            time: 0,
            ops: vec![Op::Claim { writer }],
        }
    }

    #[tokio::test]
    async fn of_two_writers_of_one_number_exactly_one_wins() {
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let log = CatalogLog::new(store);
        let (a, b) = (claim(1, "a", 1), claim(1, "b", 1));
        let (ra, rb) = tokio::join!(log.append(&a), log.append(&b));
        let won = [ra.unwrap().is_some(), rb.unwrap().is_some()];
        assert_eq!(won.iter().filter(|w| **w).count(), 1, "{won:?}");
        assert!(
            log.append(if won[0] { &a } else { &b })
                .await
                .unwrap()
                .is_some(),
            "the winner's record again is no conflict"
        );
        let loaded = log.load().await.unwrap();
        assert_eq!(loaded.catalog.seq, 1);
        let winner = if won[0] { "a" } else { "b" };
        assert_eq!(loaded.catalog.writer.unwrap().node, winner);
    }

    #[tokio::test]
    async fn opening_reads_the_newest_checkpoint_and_the_records_after_it() {
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let log = CatalogLog::new(store.clone());
        let mut state = Catalog::default();
        for seq in 1..=5 {
            let r = claim(seq, "a", seq);
            log.append(&r).await.unwrap().unwrap();
            state = state.apply(&r).unwrap();
            if seq == 3 {
                log.write_checkpoint(Arc::new(state.clone())).await.unwrap();
            }
        }
        // Records folded into the checkpoint are not needed any more.
        for seq in 1..=3 {
            store.delete(&paths::catalog_record(seq)).await.unwrap();
        }
        let loaded = log.load().await.unwrap();
        assert_eq!(loaded.checkpoint.seq, 3);
        assert_eq!(loaded.catalog.seq, 5);
        assert_eq!(loaded.catalog.writer.unwrap().epoch, 5);
        assert!(loaded.record_bytes > 0);
    }
}
