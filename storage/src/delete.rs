//! Deletes: rows named by their keys (series and time) are masked in the segments
//! that hold them, without touching a Parquet file.
//!
//! A delete runs in a [`DeleteTurn`]: every buffered row is flushed first (so every
//! row acknowledged before the delete is in a segment), and compaction waits until
//! the turn ends (so the segments the masks name stay as they were read). The
//! caller finds the keys to delete in the turn's snapshot (the merged rows, as a
//! query sees them; rows written after the turn began are not in it and stay), and
//! [`DeleteTurn::delete_keys`] masks every stored copy of those keys: for each
//! segment the catalog's day, time and tag bitmaps leave, the segment's own tag
//! index picks the rows of the named series, only those rows' key columns are
//! read, and the positions that match join the segment's deleted rows
//! (`SegmentMeta::deleted`), all in one catalog record. Readers skip masked rows;
//! compaction leaves them out of what it writes.

use std::collections::{BTreeSet, HashSet};

use datafusion::arrow::array::{AsArray, RecordBatch};
use datafusion::arrow::datatypes::{Schema, SchemaRef, TimestampNanosecondType};
use datafusion::arrow::row::{OwnedRow, RowConverter, SortField};
use datafusion::parquet::arrow::arrow_reader::{ArrowReaderOptions, RowSelection, RowSelector};
use datafusion::parquet::arrow::async_reader::AsyncFileReader;
use datafusion::parquet::arrow::ParquetRecordBatchStreamBuilder;
use datafusion::parquet::arrow::ProjectionMask;
use datafusion::parquet::errors::ParquetError;
use datafusion::parquet::file::metadata::{
    PageIndexPolicy, ParquetMetaData, ParquetMetaDataReader,
};
use futures::future::BoxFuture;
use futures::StreamExt;
use object_store::path::Path as ObjectPath;
use object_store::ObjectStore;
use object_store::ObjectStoreExt;
use roaring::RoaringBitmap;
use std::sync::Arc;

use crate::catalog::{Bitmap, Op, SegmentMeta};
use crate::engine::{DbSnapshot, Engine};
use crate::error::{Result, StorageError};
use crate::index::{SegmentIndex, TagConstraint};
use crate::merge::align;
use crate::schema::TIME_COLUMN;

/// What a delete did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeleteStats {
    /// Distinct (series, time) keys asked to delete.
    pub keys: usize,
    /// Segments whose masks grew.
    pub segments: usize,
    /// Stored rows newly masked (a key may have copies in several segments).
    pub rows_masked: u64,
}

/// A delete in progress: buffered rows flushed, compaction held off.
pub struct DeleteTurn<'a> {
    engine: &'a Engine,
    /// The catalog version the keys were found in: only its segments are masked
    /// (a flush during the delete adds rows written after it began, which stay).
    catalog: Option<Arc<crate::catalog::Catalog>>,
    _compaction: tokio::sync::MutexGuard<'a, ()>,
    _upkeep: tokio::sync::RwLockReadGuard<'a, ()>,
}

impl Engine {
    /// Begins a delete: flushes every buffered row, then holds compaction off until
    /// the turn is dropped.
    pub async fn begin_delete(&self) -> Result<DeleteTurn<'_>> {
        self.flush().await?;
        let compaction = self.inner.compaction_lock.lock().await;
        let upkeep = self.inner.upkeep.read().await;
        Ok(DeleteTurn {
            engine: self,
            catalog: None,
            _compaction: compaction,
            _upkeep: upkeep,
        })
    }
}

impl DeleteTurn<'_> {
    /// The persisted rows of `db` as of now (without the write buffer: rows written
    /// since the turn began are not the delete's to remove).
    pub fn snapshot(&mut self, db: &str) -> Option<DbSnapshot> {
        let mut snapshot = self.engine.snapshot(db)?;
        snapshot.buffers.clear();
        self.catalog = Some(snapshot.catalog.clone());
        Some(snapshot)
    }

    /// Masks every stored copy of the rows `keys` names: batches holding the
    /// table's tag columns (a missing one is null) and `time`. Durable when it
    /// returns.
    pub async fn delete_keys(
        self,
        db: &str,
        table: &str,
        keys: &[RecordBatch],
    ) -> Result<DeleteStats> {
        let engine = self.engine;
        let catalog = self.catalog.clone().unwrap_or_else(|| engine.catalog());
        let Some(tc) = catalog.table(db, table) else {
            return Ok(DeleteStats::default());
        };
        let tags: Vec<String> = tc.schema.tag_names().map(str::to_string).collect();
        let arrow = tc.schema.arrow_schema();
        let key_schema: SchemaRef = Arc::new(Schema::new(
            tags.iter()
                .map(String::as_str)
                .chain([TIME_COLUMN])
                .map(|c| arrow.field_with_name(c).cloned())
                .collect::<std::result::Result<Vec<_>, _>>()?,
        ));
        let converter = key_converter(&key_schema)?;
        let mut wanted: HashSet<OwnedRow> = HashSet::new();
        let (mut lo, mut hi) = (i64::MAX, i64::MIN);
        let mut values: Vec<BTreeSet<String>> = vec![BTreeSet::new(); tags.len()];
        let mut null_tag = vec![false; tags.len()];
        for batch in keys {
            let batch = align(batch, &key_schema)?;
            if batch.num_rows() == 0 {
                continue;
            }
            let times = batch
                .column(tags.len())
                .as_primitive::<TimestampNanosecondType>();
            for t in times.values().iter() {
                lo = lo.min(*t);
                hi = hi.max(*t);
            }
            for (i, col) in batch.columns()[..tags.len()].iter().enumerate() {
                for v in col.as_string::<i32>().iter() {
                    match v {
                        Some(v) => {
                            values[i].insert(v.to_string());
                        }
                        None => null_tag[i] = true,
                    }
                }
            }
            let rows = converter.convert_columns(batch.columns())?;
            wanted.extend(rows.iter().map(|r| r.owned()));
        }
        let mut stats = DeleteStats {
            keys: wanted.len(),
            ..Default::default()
        };
        if wanted.is_empty() {
            return Ok(stats);
        }
        // Only series with a value for every tag can be found by the tag bitmaps.
        let constraints: Vec<TagConstraint> = tags
            .iter()
            .zip(values)
            .zip(&null_tag)
            .filter(|(_, null)| !**null)
            .map(|((column, values), _)| TagConstraint {
                column: column.clone(),
                values: values.into_iter().collect(),
            })
            .collect();

        let mut ops = Vec::new();
        for (day, d) in tc.days_between(lo, hi) {
            let mut holding: Option<RoaringBitmap> = None;
            for c in &constraints {
                let ids = d.holding(&c.column, &c.values);
                holding = Some(match holding {
                    Some(h) => h & ids,
                    None => ids,
                });
            }
            for seg in d.segments.values() {
                if !seg.overlaps(lo, hi) || holding.as_ref().is_some_and(|h| !h.contains(seg.id)) {
                    continue;
                }
                let found =
                    matching_positions(engine, seg, &key_schema, &converter, &wanted, &constraints)
                        .await?;
                let new = match seg.deleted_rows() {
                    Some(old) => found - old,
                    None => found,
                };
                if new.is_empty() {
                    continue;
                }
                stats.segments += 1;
                stats.rows_masked += new.len();
                ops.push(Op::DeleteRows {
                    db: db.to_string(),
                    table: table.to_string(),
                    day: *day,
                    id: seg.id,
                    rows: Bitmap(new),
                });
            }
        }
        if !ops.is_empty() {
            engine.commit(|_, _| Ok(ops.clone())).await?;
        }
        Ok(stats)
    }
}

/// Positions of `seg`'s rows whose key is in `wanted`; only the rows of the
/// series `constraints` allow are read, and of them only the key columns: the page
/// index tells which pages hold them, and only those are fetched.
async fn matching_positions(
    engine: &Engine,
    seg: &SegmentMeta,
    key_schema: &SchemaRef,
    converter: &RowConverter,
    wanted: &HashSet<OwnedRow>,
    constraints: &[TagConstraint],
) -> Result<RoaringBitmap> {
    let store = engine.store();
    let index = store
        .get(&ObjectPath::from(seg.index_path.as_str()))
        .await?
        .bytes()
        .await?;
    let index = SegmentIndex::decode(&index)?;
    let candidates = index
        .matching_rows(constraints)
        .unwrap_or_else(|| seg.all_rows());
    if candidates.is_empty() {
        return Ok(RoaringBitmap::new());
    }
    let reader = RangeReader {
        store: store.clone(),
        path: ObjectPath::from(seg.path.as_str()),
        size: seg.size,
    };
    let builder =
        ParquetRecordBatchStreamBuilder::new_with_options(reader, ArrowReaderOptions::new())
            .await?;
    let file_schema = builder.schema().clone();
    let leaves: Vec<usize> = key_schema
        .fields()
        .iter()
        .filter_map(|f| file_schema.index_of(f.name()).ok())
        .collect();
    let mask = ProjectionMask::roots(builder.parquet_schema(), leaves);
    let mut batches = builder
        .with_projection(mask)
        .with_row_selection(selection(&candidates, seg.rows))
        .with_batch_size(64 * 1024)
        .build()?;
    let mut positions = candidates.iter();
    let mut found = RoaringBitmap::new();
    while let Some(batch) = batches.next().await {
        let batch = align(&batch?, key_schema)?;
        let rows = converter.convert_columns(batch.columns())?;
        for row in rows.iter() {
            let Some(pos) = positions.next() else {
                return Err(StorageError::Corrupt(
                    "a segment returned more rows than were selected".into(),
                ));
            };
            if wanted.contains(&row.owned()) {
                found.insert(pos);
            }
        }
    }
    Ok(found)
}

/// A segment read by byte ranges from the store, its metadata with the page index
/// (so a row selection fetches only the pages it needs).
struct RangeReader {
    store: Arc<dyn ObjectStore>,
    path: ObjectPath,
    size: u64,
}

impl AsyncFileReader for RangeReader {
    fn get_bytes(
        &mut self,
        range: std::ops::Range<u64>,
    ) -> BoxFuture<'_, datafusion::parquet::errors::Result<bytes::Bytes>> {
        Box::pin(async move {
            self.store
                .get_range(&self.path, range)
                .await
                .map_err(|e| ParquetError::External(Box::new(e)))
        })
    }

    fn get_metadata<'a>(
        &'a mut self,
        _options: Option<&'a ArrowReaderOptions>,
    ) -> BoxFuture<'a, datafusion::parquet::errors::Result<Arc<ParquetMetaData>>> {
        Box::pin(async move {
            let size = self.size;
            let metadata = ParquetMetaDataReader::new()
                .with_page_index_policy(PageIndexPolicy::Optional)
                .load_and_finish(self, size)
                .await?;
            Ok(Arc::new(metadata))
        })
    }
}

/// Rows of the key columns, comparable as bytes.
fn key_converter(key_schema: &SchemaRef) -> Result<RowConverter> {
    Ok(RowConverter::new(
        key_schema
            .fields()
            .iter()
            .map(|f| SortField::new(f.data_type().clone()))
            .collect(),
    )?)
}

/// A selection of exactly `rows` among a file's `total` rows.
fn selection(rows: &RoaringBitmap, total: u64) -> RowSelection {
    let mut selectors = Vec::new();
    let mut pos = 0u64;
    for (start, stop) in crate::index::runs(rows, 0, u32::MAX) {
        let (start, stop) = (u64::from(start), u64::from(stop));
        if start > pos {
            selectors.push(RowSelector::skip((start - pos) as usize));
        }
        selectors.push(RowSelector::select((stop - start) as usize));
        pos = stop;
    }
    if pos < total {
        selectors.push(RowSelector::skip((total - pos) as usize));
    }
    RowSelection::from(selectors)
}

impl Engine {
    /// Corrects `db.table`'s series registry after a delete took series' newest
    /// rows: `latest` holds the newest remaining row of each such series (any of
    /// the table's columns; tags and `time` at least), `gone` the tags of series
    /// with no row left. Persisted as a registry delta that replaces those series'
    /// entries (first times and counts stay as they were), so the latest-per-device
    /// path and `system.devices` answer from the rows that remain.
    pub async fn correct_series(
        &self,
        db: &str,
        table: &str,
        latest: &[RecordBatch],
        gone: &[RecordBatch],
    ) -> Result<()> {
        if latest.iter().chain(gone).all(|b| b.num_rows() == 0) {
            return Ok(());
        }
        let mut part = crate::series::SeriesTable::default();
        for b in latest {
            part.apply(b)?;
        }
        let kept = part.len();
        for b in gone {
            part.apply(b)?;
        }
        let schema = {
            let state = crate::engine::read(&self.inner.state);
            let Some(schema) = state.schemas.get(db).and_then(|t| t.get(table)).cloned() else {
                return Err(StorageError::TableNotFound(format!("{db}.{table}")));
            };
            let none = crate::series::SeriesTable::default();
            let current = state.series.get(db).and_then(|t| t.get(table));
            part.take_counts(current.unwrap_or(&none), kept);
            schema
        };
        part.replaces = true;
        let bytes = {
            let (part, schema) = (part.clone(), schema.clone());
            tokio::task::spawn_blocking(move || part.encode(&schema))
                .await
                .map_err(crate::flush::task_failed)??
        };
        let catalog = self.catalog();
        let (Some(d), Some(tc)) = (catalog.databases.get(db), catalog.table(db, table)) else {
            return Err(StorageError::TableNotFound(format!("{db}.{table}")));
        };
        let (db_id, table_id) = (d.id, tc.id);
        let (id, keys) = self
            .put_fresh(
                |id| vec![crate::paths::series_file(db_id, table_id, id, false)],
                vec![bytes.into()],
            )
            .await?;
        let key = keys.into_iter().next().unwrap_or_default().to_string();
        self.commit(|_, _| {
            Ok(vec![Op::SeriesDelta {
                db: db.to_string(),
                table: table.to_string(),
                id,
                key: key.clone(),
            }])
        })
        .await?;
        let mut state = crate::engine::write(&self.inner.state);
        if let Some(r) = state.series.get_mut(db).and_then(|t| t.get_mut(table)) {
            r.replace_from(&part);
        }
        Ok(())
    }
}
