//! Compaction: a day's small segments merged into large sorted ones, in the
//! background.
//!
//! A table's day holds *runs*: the segments of one flush, or of one compaction
//! (whose outputs never share a (series, time)). Runs that overlap in time may hold
//! the same (series, time) twice; the newer run (higher `seq`) wins, as the query
//! path's merge does. So a compaction may only merge runs that are adjacent in
//! `seq`, and its output keeps the newest input's `seq`.
//!
//! 1. Choosing ([`plan`]): a day untouched for `settle` is merged whole, into one
//!    run; a day still being written merges its newest runs once at least
//!    `min_runs` of them together weigh as much as half the run before them
//!    (runs grow geometrically, so a row is rewritten a logarithmic number of
//!    times while its day fills up).
//! 2. Merging: the inputs are read oldest run first, sorted by series then time,
//!    merged as a flush merges (last write wins, field by field), and cut at series
//!    boundaries into segments of about `target_bytes`. A merge of a whole day
//!    lays its column chunks out by measurement (`segment::Layout::Measured`);
//!    a merge of a hot day's newest runs writes the flush's fixed layout.
//! 3. Swapping: one catalog record removes the inputs and adds the outputs. Readers
//!    on the older version keep reading the inputs until they finish; the inputs
//!    are then garbage (`gc.rs`).
//! 4. Pacing: after each compaction the compactor rests in proportion to the time
//!    it worked (`duty`), so on a small machine it never takes the CPU from ingest.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use datafusion::arrow::record_batch::RecordBatch;
use datafusion::arrow::row::{RowConverter, SortField};
use object_store::path::Path as ObjectPath;
use object_store::ObjectStoreExt;

use crate::catalog::{Catalog, Op, SegmentMeta, TableCatalog};
use crate::engine::{read_registry, Engine};
use crate::error::{Result, StorageError};
use crate::merge::{align, key_columns, sort_dedup};
use crate::paths;
use crate::retention;
use crate::schema::TableSchema;
use crate::segment;
use crate::units::now_nanos;
use roaring::RoaringBitmap;

/// Registry deltas a table may gather before they are folded into a full one: a
/// restart reads at most this many files per table besides the full one.
const FOLD_DELTAS: usize = 32;

/// How segments are merged in the background.
#[derive(Debug, Clone, PartialEq)]
pub struct CompactionConfig {
    /// Runs compaction in the background at all.
    pub enabled: bool,
    /// Merged segments are cut at about this many bytes.
    pub target_bytes: u64,
    /// A day's newest runs are merged once there are this many of them.
    pub min_runs: usize,
    /// A day without a new segment for this long is merged into one run.
    pub settle: Duration,
    /// Most bytes of segments one compaction reads (they are merged in memory).
    pub max_input_bytes: u64,
    /// The share of time compaction may work; it rests the rest.
    pub duty: f64,
    /// How often the compactor looks for work besides after each flush.
    pub interval: Duration,
    /// Rows per data page (every column but `time`) of a settled day's segments:
    /// fewer make one device's read decode less, more compress better.
    pub page_rows: usize,
}

impl Default for CompactionConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            target_bytes: 128 << 20,
            min_runs: 4,
            settle: Duration::from_secs(60),
            max_input_bytes: 256 << 20,
            duty: 0.5,
            interval: Duration::from_secs(10),
            page_rows: segment::SETTLED_PAGE_ROWS,
        }
    }
}

/// What one compaction did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompactionStats {
    /// Compactions run.
    pub compactions: usize,
    /// Segments merged.
    pub segments_in: usize,
    /// Segments written.
    pub segments_out: usize,
    /// Bytes read.
    pub bytes_in: u64,
    /// Bytes written.
    pub bytes_out: u64,
    /// Rows written.
    pub rows: u64,
    /// Segments dropped whole because their rows were past retention.
    pub segments_expired: usize,
}

/// The segments of one run of a day.
#[derive(Debug, Clone)]
struct Run<'a> {
    seq: u64,
    bytes: u64,
    created: i64,
    segments: Vec<&'a SegmentMeta>,
}

/// The runs of a day, oldest first.
fn runs(day: &crate::catalog::DayCatalog) -> Vec<Run<'_>> {
    let mut by_run: BTreeMap<u64, Run<'_>> = BTreeMap::new();
    for s in day.segments.values() {
        let r = by_run.entry(s.run).or_insert(Run {
            seq: 0,
            bytes: 0,
            created: 0,
            segments: Vec::new(),
        });
        r.seq = r.seq.max(s.seq);
        r.bytes += s.size;
        r.created = r.created.max(s.created);
        r.segments.push(s);
    }
    let mut runs: Vec<Run<'_>> = by_run.into_values().collect();
    runs.sort_by_key(|r| r.seq);
    runs
}

/// The segments of one day to merge now, if any: see the module's doc.
pub fn plan<'a>(
    day: &'a crate::catalog::DayCatalog,
    now: i64,
    config: &CompactionConfig,
    force: bool,
) -> Option<Vec<&'a SegmentMeta>> {
    let runs = runs(day);
    if runs.len() < 2 {
        return None;
    }
    let newest = runs.iter().map(|r| r.created).max().unwrap_or(0);
    let settled = force || now.saturating_sub(newest) >= config.settle.as_nanos() as i64;
    let mut window: Vec<&Run<'_>> = Vec::new();
    let mut acc = 0u64;
    for r in runs.iter().rev() {
        let fits = acc + r.bytes <= config.max_input_bytes;
        if !fits && window.len() >= 2 {
            break;
        }
        if !settled && window.len() >= 2 && r.bytes > acc * 2 {
            break;
        }
        window.push(r);
        acc += r.bytes;
    }
    let enough = if settled { 2 } else { config.min_runs.max(2) };
    (window.len() >= enough).then(|| {
        window
            .into_iter()
            .flat_map(|r| r.segments.iter().copied())
            .collect()
    })
}

/// A (table, day) to compact, with its inputs.
struct Pick<'a> {
    db: &'a str,
    table: &'a str,
    catalog: &'a Arc<TableCatalog>,
    inputs: Vec<&'a SegmentMeta>,
}

/// The next (table, day) to compact in `catalog`, with its inputs.
fn pick<'a>(
    catalog: &'a Catalog,
    now: i64,
    config: &CompactionConfig,
    force: bool,
) -> Option<Pick<'a>> {
    // The most fragmented day first: it costs queries the most.
    let mut best: Option<(usize, Pick<'a>)> = None;
    for (db, table, tc) in catalog.tables() {
        let cut = retention::cutoff(catalog.retention(db, table), now);
        for day in tc.days.values() {
            let planned = if day.segments.len() < 2 {
                None
            } else {
                plan(day, now, config, force)
            };
            // A day the retention cutoff cuts is rewritten whole, without what
            // expired; a day with deleted rows, without them.
            let planned = planned.or_else(|| {
                let trim = cut.is_some_and(|c| retention::due_for_trim(day, c, force));
                let masked = day.segments.values().any(|s| s.deleted_rows().is_some());
                (trim || masked).then(|| day.segments.values().collect())
            });
            if let Some(inputs) = planned {
                let n = day.segments.len();
                if best.as_ref().is_none_or(|(m, _)| n > *m) {
                    best = Some((
                        n,
                        Pick {
                            db,
                            table,
                            catalog: tc,
                            inputs,
                        },
                    ));
                }
            }
        }
    }
    best.map(|(_, p)| p)
}

impl Engine {
    /// Runs compactions until none is due; with `force`, every day with more than
    /// one run is merged whole, settled or not. Returns what was done.
    pub async fn compact(&self, force: bool) -> Result<CompactionStats> {
        let mut total = CompactionStats {
            segments_expired: self.expire().await?,
            ..Default::default()
        };
        // One `now` for the whole run: a cutoff that moved on with the clock would
        // find a few more rows to trim after every trim.
        let now = now_nanos();
        while let Some(stats) = self.compact_once(force, now).await? {
            total.compactions += 1;
            total.segments_in += stats.segments_in;
            total.segments_out += stats.segments_out;
            total.bytes_in += stats.bytes_in;
            total.bytes_out += stats.bytes_out;
            total.rows += stats.rows;
            if self.is_stopping() {
                break;
            }
        }
        Ok(total)
    }

    /// One compaction, if one is due.
    pub(crate) async fn compact_once(
        &self,
        force: bool,
        now: i64,
    ) -> Result<Option<CompactionStats>> {
        use std::sync::atomic::Ordering::Relaxed;
        let started = Instant::now();
        let result = self.compact_one(force, now).await;
        let m = &self.inner.metrics;
        match &result {
            Ok(Some(s)) => {
                m.compactions.fetch_add(1, Relaxed);
                m.compacted_bytes.fetch_add(s.bytes_in, Relaxed);
                m.compaction_nanos
                    .fetch_add(started.elapsed().as_nanos() as u64, Relaxed);
            }
            Ok(None) => {}
            Err(_) => {
                m.compaction_failures.fetch_add(1, Relaxed);
            }
        }
        result
    }

    async fn compact_one(&self, force: bool, now: i64) -> Result<Option<CompactionStats>> {
        let _turn = self.inner.compaction_lock.lock().await;
        let _upkeep = self.inner.upkeep.read().await;
        let catalog = self.catalog();
        let config = &self.inner.config.compaction;
        let Some(Pick {
            db,
            table,
            catalog: tc,
            inputs,
        }) = pick(&catalog, now, config, force)
        else {
            return Ok(None);
        };
        let (db, table) = (db.to_string(), table.to_string());
        let db_id = catalog.databases[&db].id;
        let schema = Arc::new(tc.schema.clone());
        let mut inputs: Vec<SegmentMeta> = inputs.into_iter().cloned().collect();
        inputs.sort_by_key(|s| (s.seq, s.id));
        let day = inputs[0].day;
        let level = inputs.iter().map(|s| s.level).max().unwrap_or(0) + 1;
        // A whole day's merge writes what stays, laid out by measurement (which
        // tries slow, strong compression); merging the newest runs of a day still
        // being written is cheap, as a flush is, for it will be merged again.
        let whole_day = tc.days.get(&day).map(|d| d.segments.len()) == Some(inputs.len());
        let layout = if whole_day {
            segment::Layout::Measured {
                page_rows: config.page_rows,
            }
        } else {
            segment::Layout::Fixed
        };
        let seq = inputs.iter().map(|s| s.seq).max().unwrap_or(0);
        let bytes_in: u64 = inputs.iter().map(|s| s.size).sum();
        let rows_in: u64 = inputs.iter().map(|s| s.rows).sum();

        let mut files = Vec::with_capacity(inputs.len());
        for s in &inputs {
            let bytes = self
                .store()
                .get(&ObjectPath::from(s.path.as_str()))
                .await?
                .bytes()
                .await?;
            files.push((bytes, s.deleted_rows().cloned()));
        }
        // About how many rows make a segment of the target size.
        let rows_per_segment = if bytes_in == 0 {
            usize::MAX
        } else {
            ((config.target_bytes as f64 / bytes_in as f64) * rows_in as f64).max(1.0) as usize
        };
        // Rows past the table's retention are left out.
        let cut = retention::cutoff(catalog.retention(&db, &table), now);
        let chunks = {
            let schema = schema.clone();
            tokio::task::spawn_blocking(move || merge_files(&schema, files, rows_per_segment, cut))
                .await
                .map_err(crate::flush::task_failed)??
        };
        let mut outputs = Vec::with_capacity(chunks.len());
        for rows in chunks {
            outputs.push(
                self.write_segment(
                    crate::flush::Place {
                        db_id,
                        table_id: tc.id,
                        day,
                    },
                    rows,
                    &schema,
                    level,
                    layout,
                )
                .await?,
            );
        }
        let stats = CompactionStats {
            compactions: 1,
            segments_in: inputs.len(),
            segments_out: outputs.len(),
            bytes_in,
            bytes_out: outputs.iter().map(|o| o.meta.size).sum(),
            rows: outputs.iter().map(|o| o.meta.rows).sum(),
            segments_expired: 0,
        };
        let committed = self
            .commit(|c, record| {
                // Deletes and compaction take turns (`compaction_lock`), so the
                // inputs are as they were read; this only makes sure of it.
                let unchanged = inputs
                    .iter()
                    .all(|s| c.table(&db, &table).and_then(|t| t.segment(s.day, s.id)) == Some(s));
                if !unchanged {
                    return Err(StorageError::Conflict(
                        "a segment being compacted changed meanwhile".into(),
                    ));
                }
                let mut ops: Vec<Op> = inputs
                    .iter()
                    .map(|s| Op::RemoveSegment {
                        db: db.clone(),
                        table: table.clone(),
                        day: s.day,
                        id: s.id,
                    })
                    .collect();
                for o in &outputs {
                    ops.push(Op::AddSegment {
                        db: db.clone(),
                        table: table.clone(),
                        segment: SegmentMeta {
                            seq,
                            run: record,
                            ..o.meta.clone()
                        },
                        tags: o.tags.clone(),
                    });
                }
                Ok(ops)
            })
            .await;
        if let Err(e) = committed {
            // Nothing refers to the outputs; the sweep would find them, but there is
            // no reason to leave them for it.
            for o in &outputs {
                for f in o.meta.files() {
                    let _ = self.store().delete(&ObjectPath::from(f)).await;
                }
            }
            return Err(e);
        }
        tracing::debug!(db, table, day, ?stats, "compacted");
        Ok(Some(stats))
    }

    /// Folds each table's series registry files — its full registry and the deltas
    /// flushes added since — into one full registry, for every table with at least
    /// `min_deltas` deltas. Returns how many tables were folded.
    pub async fn fold_series(&self, min_deltas: usize) -> Result<usize> {
        // One fold or compaction at a time: two folds of one table would conflict.
        let _turn = self.inner.compaction_lock.lock().await;
        let _upkeep = self.inner.upkeep.read().await;
        let catalog = self.catalog();
        let mut folded = 0;
        for (db, table, tc) in catalog.tables() {
            if tc.series.deltas.len() < min_deltas.max(1) {
                continue;
            }
            let registry = read_registry(self.store(), tc).await?;
            let schema = tc.schema.clone();
            let bytes = tokio::task::spawn_blocking(move || registry.encode(&schema))
                .await
                .map_err(crate::flush::task_failed)??;
            let (db_id, table_id) = (catalog.databases[db].id, tc.id);
            let (id, keys) = self
                .put_fresh(
                    |id| vec![paths::series_file(db_id, table_id, id, true)],
                    vec![bytes.into()],
                )
                .await?;
            let key = keys.into_iter().next().unwrap_or_default();
            let replaced: Vec<String> = tc.series.keys().map(str::to_string).collect();
            let (db, table, full) = (db.to_string(), table.to_string(), key.to_string());
            self.commit(|c, _| {
                let now: Vec<&str> = c
                    .table(&db, &table)
                    .map(|t| t.series.keys().collect())
                    .unwrap_or_default();
                if !now.starts_with(&replaced.iter().map(String::as_str).collect::<Vec<_>>()) {
                    return Err(StorageError::Conflict(format!(
                        "the series files of {db}.{table} changed while they were folded"
                    )));
                }
                Ok(vec![Op::SeriesFolded {
                    db: db.clone(),
                    table: table.clone(),
                    id,
                    full: full.clone(),
                    replaced: replaced.clone(),
                }])
            })
            .await?;
            folded += 1;
        }
        Ok(folded)
    }

    pub(crate) fn spawn_compactor(&self) {
        if !self.inner.config.compaction.enabled {
            return;
        }
        let engine = self.clone();
        tokio::spawn(async move {
            let config = engine.inner.config.compaction.clone();
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(config.interval) => {}
                    _ = engine.inner.compaction_wanted.notified() => {}
                    _ = engine.stopped() => return,
                }
                if let Err(e) = engine.expire().await {
                    tracing::warn!(error = %e, "expiring segments past retention failed");
                }
                loop {
                    if engine.is_stopping() {
                        return;
                    }
                    let started = Instant::now();
                    match engine.compact_once(false, now_nanos()).await {
                        Ok(Some(_)) => {}
                        Ok(None) => {
                            if let Err(e) = engine.fold_series(FOLD_DELTAS).await {
                                tracing::warn!(error = %e, "folding series registries failed");
                            }
                            break;
                        }
                        Err(StorageError::ShuttingDown) => return,
                        Err(e) => {
                            tracing::warn!(error = %e, "compaction failed; its inputs stay as they are");
                            break;
                        }
                    }
                    let rest = started
                        .elapsed()
                        .mul_f64((1.0 - config.duty).max(0.0) / config.duty.max(0.01));
                    tokio::select! {
                        _ = tokio::time::sleep(rest) => {}
                        _ = engine.stopped() => return,
                    }
                }
            }
        });
    }
}

/// Reads segment files (oldest run first) without their deleted rows (positions
/// in the file) and rows older than `cutoff`, merges their rows, and cuts them at
/// series boundaries into chunks of about `rows_per_segment` rows.
fn merge_files(
    schema: &TableSchema,
    files: Vec<(bytes::Bytes, Option<RoaringBitmap>)>,
    rows_per_segment: usize,
    cutoff: Option<i64>,
) -> Result<Vec<RecordBatch>> {
    let arrow = schema.arrow_schema();
    let mut parts = Vec::new();
    for (f, deleted) in files {
        for b in segment::decode_kept(f, deleted.as_ref())? {
            let b = align(&b, &arrow)?;
            let b = match cutoff {
                Some(cut) => crate::buffer::since(&b, cut)?,
                None => b,
            };
            if b.num_rows() > 0 {
                parts.push(b);
            }
        }
    }
    if parts.is_empty() {
        return Ok(Vec::new());
    }
    let keys = key_columns(schema, &arrow)?;
    let merged = sort_dedup(&arrow, &parts, &keys)?;
    drop(parts);
    let n = merged.num_rows();
    if n <= rows_per_segment {
        return Ok(vec![merged]);
    }
    // The series key of each row: the tag columns (keys but the last, `time`).
    let tags = &keys[..keys.len() - 1];
    let converter = RowConverter::new(
        tags.iter()
            .map(|&i| SortField::new(arrow.field(i).data_type().clone()))
            .collect(),
    )?;
    let rows = converter.convert_columns(
        &tags
            .iter()
            .map(|&i| merged.column(i).clone())
            .collect::<Vec<_>>(),
    )?;
    let mut chunks = Vec::new();
    let mut start = 0;
    let mut at = rows_per_segment;
    while at < n {
        // Move to the next series boundary, so one series stays in one segment.
        while at < n && rows.row(at) == rows.row(at - 1) {
            at += 1;
        }
        if at >= n {
            break;
        }
        chunks.push(merged.slice(start, at - start));
        start = at;
        at = start + rows_per_segment;
    }
    chunks.push(merged.slice(start, n - start));
    Ok(chunks)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::DayCatalog;

    fn seg(id: u32, run: u64, size: u64, created: i64) -> SegmentMeta {
        SegmentMeta {
            id,
            day: 1,
            path: format!("{id}"),
            index_path: format!("{id}.i"),
            size,
            rows: size,
            min_time: 0,
            max_time: 10,
            row_group_rows: vec![size],
            seq: run,
            run,
            level: 0,
            created,
            deleted: None,
        }
    }

    fn day(segments: &[SegmentMeta]) -> DayCatalog {
        let mut d = DayCatalog::default();
        for s in segments {
            d.add_segment(s.clone(), &BTreeMap::new());
        }
        d
    }

    fn ids(p: Option<Vec<&SegmentMeta>>) -> Vec<u32> {
        let mut ids: Vec<u32> = p.unwrap_or_default().iter().map(|s| s.id).collect();
        ids.sort_unstable();
        ids
    }

    #[test]
    fn a_hot_day_merges_its_newest_runs_and_a_settled_day_all_of_them() {
        let config = CompactionConfig {
            min_runs: 4,
            settle: Duration::from_secs(60),
            ..Default::default()
        };
        let now = 1_000_000_000_000;
        let fresh = now - 1_000_000_000;
        // Three small runs: not yet enough.
        let d = day(&[
            seg(1, 1, 10, fresh),
            seg(2, 2, 10, fresh),
            seg(3, 3, 10, fresh),
        ]);
        assert_eq!(ids(plan(&d, now, &config, false)), Vec::<u32>::new());
        // Four: merged.
        let d = day(&[
            seg(1, 1, 10, fresh),
            seg(2, 2, 10, fresh),
            seg(3, 3, 10, fresh),
            seg(4, 4, 10, fresh),
        ]);
        assert_eq!(ids(plan(&d, now, &config, false)), vec![1, 2, 3, 4]);
        // A big old run stays out until the new ones weigh half as much.
        let d = day(&[
            seg(9, 1, 1000, fresh),
            seg(2, 2, 10, fresh),
            seg(3, 3, 10, fresh),
            seg(4, 4, 10, fresh),
            seg(5, 5, 10, fresh),
        ]);
        assert_eq!(ids(plan(&d, now, &config, false)), vec![2, 3, 4, 5]);
        // Settled: everything, big run included.
        let old = now - 120_000_000_000;
        let d = day(&[seg(9, 1, 1000, old), seg(2, 2, 10, old)]);
        assert_eq!(ids(plan(&d, now, &config, false)), vec![2, 9]);
        assert_eq!(
            ids(plan(&day(&[seg(9, 1, 1000, old)]), now, &config, true)),
            Vec::<u32>::new()
        );
    }

    #[test]
    fn the_window_is_contiguous_in_seq_and_within_the_input_budget() {
        let config = CompactionConfig {
            min_runs: 2,
            max_input_bytes: 25,
            ..Default::default()
        };
        let d = day(&[seg(1, 1, 10, 0), seg(2, 2, 10, 0), seg(3, 3, 10, 0)]);
        // Only the two newest fit the budget; the oldest is never skipped over.
        assert_eq!(ids(plan(&d, i64::MAX, &config, true)), vec![2, 3]);
    }
}
