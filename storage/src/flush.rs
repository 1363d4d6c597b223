//! The flush: buffered rows become new segments, committed as one record.
//!
//! 1. The WAL rotates, so the rows moved aside are exactly those of the closed files.
//! 2. Tables the catalog does not know yet are created (one small record).
//! 3. Per table: the series the rows touch become a registry delta
//!    (`series/…/<id>.delta.arrow`); the rows are sorted by series then time,
//!    merged (a (series, time) written twice, last write wins) and split by UTC day;
//!    each day becomes one new segment (`segment.rs`).
//! 4. One record adds the segments and deltas, records the table's schema if it
//!    grew, and marks the closed WAL files as persisted; then they are deleted.
//!
//! A flush never reads or rewrites a segment: late rows for a day that already has
//! segments become one more segment, and compaction folds them in later. Its cost
//! is its rows', however old the store.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use datafusion::arrow::array::{AsArray, BooleanArray};
use datafusion::arrow::compute::filter_record_batch;
use datafusion::arrow::datatypes::TimestampNanosecondType;
use datafusion::arrow::record_batch::RecordBatch;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload};

use crate::buffer::time_range;
use crate::catalog::{day_of, Catalog, Op, SegmentMeta};
use crate::engine::{write, Engine, FlushStats};
use crate::error::{Result, StorageError};
use crate::merge::{align, key_columns, sort_dedup_runs};
use crate::paths;
use crate::schema::{TableSchema, TIME_COLUMN};
use crate::segment;
use crate::series::SeriesTable;

/// A segment written to the store, not yet in the catalog.
pub(crate) struct Written {
    /// Its metadata (`seq` and `run` are the committing record's to set).
    pub(crate) meta: SegmentMeta,
    /// Its tag values by column.
    pub(crate) tags: BTreeMap<String, Vec<String>>,
}

/// Where a segment goes: its database's and table's ids and its UTC day.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Place {
    pub(crate) db_id: u32,
    pub(crate) table_id: u32,
    pub(crate) day: i64,
}

pub(crate) fn task_failed(e: tokio::task::JoinError) -> StorageError {
    StorageError::Internal(format!("a storage task failed: {e}"))
}

impl Engine {
    /// Persists every buffered row to segments and deletes the WAL files that held them.
    ///
    /// When this returns `Ok`, every write acknowledged before the call is in a
    /// segment listed by a committed catalog record.
    pub async fn flush(&self) -> Result<FlushStats> {
        let started = std::time::Instant::now();
        let result = self.flush_buffered().await;
        let m = &self.inner.metrics;
        match &result {
            Ok(s) if s.segments_written > 0 => {
                m.flushes.fetch_add(1, Relaxed);
                m.flushed_rows.fetch_add(s.rows, Relaxed);
                m.flush_nanos
                    .fetch_add(started.elapsed().as_nanos() as u64, Relaxed);
            }
            Ok(_) => {}
            Err(_) => {
                m.flush_failures.fetch_add(1, Relaxed);
            }
        }
        result
    }

    async fn flush_buffered(&self) -> Result<FlushStats> {
        let _guard = self.inner.flush_lock.lock().await;
        if self.buffered_rows() == 0 {
            return Ok(FlushStats::default());
        }
        self.rotate_wal().await?;
        let (persisting, schemas) = {
            let s = self.inner.state.read().unwrap_or_else(|e| e.into_inner());
            (s.persisting.clone(), s.schemas.clone())
        };
        if persisting.is_empty() {
            return Ok(FlushStats::default());
        }
        // What this flush writes must not be swept before its record lands.
        let _upkeep = self.inner.upkeep.read().await;
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
        self.create_tables(tables.keys()).await?;
        let catalog = self.catalog();
        let mut ops = Vec::new();
        let mut stats = FlushStats::default();
        for ((db, table), batches) in tables {
            let Some(schema) = schemas.get(&db).and_then(|t| t.get(&table)).cloned() else {
                return Err(StorageError::Internal(format!(
                    "buffered rows for {db}.{table} have no schema"
                )));
            };
            let Some(tc) = catalog.table(&db, &table) else {
                return Err(StorageError::Internal(format!(
                    "table {db}.{table} was not created"
                )));
            };
            let db_id = catalog.databases[&db].id;
            let table_id = tc.id;
            if tc.schema != *schema {
                ops.push(Op::Schema {
                    db: db.clone(),
                    table: table.clone(),
                    schema: (*schema).clone(),
                });
            }
            let (days, delta) = {
                let schema = schema.clone();
                tokio::task::spawn_blocking(move || merge_by_day(&schema, &batches))
                    .await
                    .map_err(task_failed)??
            };
            let (id, keys) = self
                .put_fresh(
                    |id| vec![paths::series_file(db_id, table_id, id, false)],
                    vec![delta.into()],
                )
                .await?;
            let key = keys.into_iter().next().unwrap_or_default();
            ops.push(Op::SeriesDelta {
                db: db.clone(),
                table: table.clone(),
                id,
                key: key.to_string(),
            });
            for (day, rows) in days {
                let written = self
                    .write_segment(
                        Place {
                            db_id,
                            table_id,
                            day,
                        },
                        rows,
                        &schema,
                        0,
                        segment::Layout::Fixed,
                    )
                    .await?;
                stats.segments_written += 1;
                stats.rows += written.meta.rows;
                ops.push(Op::AddSegment {
                    db: db.clone(),
                    table: table.clone(),
                    segment: written.meta,
                    tags: written.tags,
                });
            }
        }
        let wal_upto = persisting.iter().map(|p| p.wal_upto).max().unwrap_or(0);
        ops.push(Op::WalPersisted {
            node: self.writer().node,
            upto: wal_upto,
        });
        self.commit(|_, seq| Ok(ops.iter().map(|op| stamp(op, seq)).collect()))
            .await?;
        {
            let mut s = write(&self.inner.state);
            s.persisting
                .retain(|p| !persisting.iter().any(|q| Arc::ptr_eq(p, q)));
        }
        self.delete_wal_upto(wal_upto)?;
        self.inner.compaction_wanted.notify_one();
        tracing::debug!(?stats, "flushed");
        Ok(stats)
    }

    /// Creates, in one record, the tables of `names` the catalog does not have.
    async fn create_tables<'a>(
        &self,
        names: impl Iterator<Item = &'a (String, String)>,
    ) -> Result<()> {
        let names: Vec<(String, String)> = names.cloned().collect();
        if names
            .iter()
            .all(|(d, t)| self.catalog().table(d, t).is_some())
        {
            return Ok(());
        }
        self.commit(|c, _| Ok(create_ops(c, &names))).await?;
        Ok(())
    }

    /// Encodes rows already sorted and merged as a segment of `day` and uploads it
    /// with its tag index.
    pub(crate) async fn write_segment(
        &self,
        Place {
            db_id,
            table_id,
            day,
        }: Place,
        rows: RecordBatch,
        schema: &Arc<TableSchema>,
        level: u32,
        layout: segment::Layout,
    ) -> Result<Written> {
        let Some((min_time, max_time)) = time_range(&rows) else {
            return Err(StorageError::Internal("a segment of no rows".into()));
        };
        let schema = schema.clone();
        let encoded =
            tokio::task::spawn_blocking(move || segment::encode_with(&rows, &schema, layout))
                .await
                .map_err(task_failed)??;
        let size = encoded.parquet.len() as u64;
        let (id, keys) = self
            .put_fresh(
                |id| {
                    vec![
                        paths::segment_file(db_id, table_id, day, id),
                        paths::segment_index(db_id, table_id, day, id),
                    ]
                },
                vec![
                    encoded.parquet.clone().into(),
                    encoded.index.encode()?.into(),
                ],
            )
            .await?;
        let [path, index_path]: [ObjectPath; 2] = keys
            .try_into()
            .map_err(|_| StorageError::Internal("a segment is two objects".into()))?;
        let tags = encoded
            .index
            .tags
            .iter()
            .map(|(c, values)| (c.clone(), values.keys().cloned().collect()))
            .collect();
        Ok(Written {
            meta: SegmentMeta {
                id,
                day,
                path: path.to_string(),
                index_path: index_path.to_string(),
                size,
                rows: encoded.rows,
                min_time,
                max_time,
                row_group_rows: encoded.row_group_rows,
                seq: 0,
                run: 0,
                level,
                created: crate::units::now_nanos(),
                deleted: None,
            },
            tags,
        })
    }

    /// Uploads new objects under a fresh id, `keys(id)` naming them, and returns
    /// the id and keys. Keys are created, never overwritten: ids come from the
    /// catalog, so a writer racing for the same store, or one that died after
    /// uploading, may already hold an id's keys; then the next id is tried (what
    /// such a writer left is the sweep's).
    pub(crate) async fn put_fresh(
        &self,
        keys: impl Fn(u32) -> Vec<ObjectPath>,
        payloads: Vec<PutPayload>,
    ) -> Result<(u32, Vec<ObjectPath>)> {
        const ATTEMPTS: usize = 64;
        for _ in 0..ATTEMPTS {
            let id = self.allocate_id();
            let paths = keys(id);
            let mut put = 0;
            let mut taken = false;
            for (path, payload) in paths.iter().zip(&payloads) {
                let opts = PutOptions {
                    mode: PutMode::Create,
                    ..Default::default()
                };
                match self.store().put_opts(path, payload.clone(), opts).await {
                    Ok(_) => put += 1,
                    Err(object_store::Error::AlreadyExists { .. }) => {
                        taken = true;
                        break;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            if !taken {
                return Ok((id, paths));
            }
            for path in &paths[..put] {
                // Left behind, the sweep removes it after its grace period.
                let _ = self.store().delete(path).await;
            }
            tracing::warn!(id, "object id already taken in the store; trying the next");
        }
        Err(StorageError::Internal(format!(
            "{ATTEMPTS} object ids in a row were already taken in the store"
        )))
    }
}

/// `op` as committed by record `seq`: a flush's segments are its own run.
fn stamp(op: &Op, seq: u64) -> Op {
    match op {
        Op::AddSegment {
            db,
            table,
            segment,
            tags,
        } if segment.level == 0 => Op::AddSegment {
            db: db.clone(),
            table: table.clone(),
            segment: SegmentMeta {
                seq,
                run: seq,
                ..segment.clone()
            },
            tags: tags.clone(),
        },
        other => other.clone(),
    }
}

/// `CreateTable` ops for the tables of `names` that `c` lacks, with fresh ids.
pub(crate) fn create_ops(c: &Catalog, names: &[(String, String)]) -> Vec<Op> {
    let mut ops = Vec::new();
    let mut next_db = c.next_db_id;
    let mut next_table = c.next_table_id;
    let mut new_dbs: BTreeMap<&str, u32> = BTreeMap::new();
    let mut seen = BTreeSet::new();
    for (db, table) in names {
        if c.table(db, table).is_some() || !seen.insert((db, table)) {
            continue;
        }
        let db_id = match c.databases.get(db) {
            Some(d) => d.id,
            None => *new_dbs.entry(db).or_insert_with(|| {
                next_db += 1;
                next_db - 1
            }),
        };
        ops.push(Op::CreateTable {
            db: db.clone(),
            db_id,
            table: table.clone(),
            table_id: next_table,
        });
        next_table += 1;
    }
    ops
}

/// A table's merged rows by UTC day.
type Days = Vec<(i64, RecordBatch)>;

/// Sorts and merges a table's buffered batches and splits them by UTC day, and
/// encodes the registry delta of the series they touch.
///
/// The delta is built from the merged rows, one row per series (its run's last
/// row is its latest, merged as the registry merges a time written twice), not by
/// applying every buffered row again; only rows that cannot be ranked by series
/// (a null time) take the row-by-row way.
pub(crate) fn merge_by_day(
    schema: &TableSchema,
    batches: &[RecordBatch],
) -> Result<(Days, Vec<u8>)> {
    let arrow = schema.arrow_schema();
    let aligned = batches
        .iter()
        .map(|b| align(b, &arrow))
        .collect::<Result<Vec<_>>>()?;
    let keys = key_columns(schema, &arrow)?;
    let (merged, runs) = sort_dedup_runs(&arrow, &aligned, &keys)?;
    let delta = match runs
        .map(|r| SeriesTable::from_runs(&merged, &r))
        .transpose()?
    {
        Some(Some(delta)) => delta,
        _ => {
            let mut delta = SeriesTable::default();
            for b in batches {
                delta.apply(b)?;
            }
            delta
        }
    };
    let delta = delta.encode(schema)?;
    Ok((split_by_day(merged)?, delta))
}

/// A merged batch's rows by UTC day.
fn split_by_day(merged: RecordBatch) -> Result<Days> {
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
