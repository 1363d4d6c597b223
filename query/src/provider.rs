//! The table provider: a table's segments and buffered rows as one DataFusion scan.
//!
//! 1. The filters DataFusion pushes down become [`KeyBounds`] (`pruning.rs`).
//! 2. The catalog's time ranges and tag -> segment bitmaps choose the segments.
//! 3. Each chosen segment's tag -> row bitmaps become a `ParquetAccessPlan` (row
//!    groups plus a `RowSelection`), so only the pages holding those rows are read;
//!    the key filters they do not answer go to the Parquet reader for pruning.
//! 4. Buffered rows are filtered by the same bounds and merged in memory.
//! 5. Segments that may hold the same (series, time) — of different runs (one
//!    flush's or one compaction's segments) whose time ranges meet, or meeting the
//!    buffered rows' range — go through [`DedupExec`] together, oldest run first,
//!    so each (series, time) appears once, newest fields winning; it holds and
//!    merges only the rows in the times two of them share. Once compaction
//!    has merged a day into one run, its segments are read as they are.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use citytsdb_storage::catalog::SegmentMeta;
use citytsdb_storage::index::{RowGroupAccess as SegmentAccess, SegmentIndex};
use citytsdb_storage::merge::{align, key_columns, sort_dedup};
use citytsdb_storage::schema::TIME_COLUMN;
use citytsdb_storage::{ColumnKind, DbSnapshot, TableSchema};
use datafusion::arrow::array::{Array, AsArray, BooleanArray, RecordBatch};
use datafusion::arrow::compute::filter_record_batch;
use datafusion::arrow::datatypes::{DataType, SchemaRef, TimestampNanosecondType};
use datafusion::catalog::{SchemaProvider, Session, TableProvider};
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{Column, DFSchema, Result, ScalarValue};
use datafusion::datasource::listing::PartitionedFile;
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::datasource::physical_plan::parquet::CachedParquetFileReaderFactory;
use datafusion::datasource::physical_plan::parquet::{ParquetAccessPlan, RowGroupAccess};
use datafusion::datasource::physical_plan::ParquetFileReaderFactory;
use datafusion::datasource::physical_plan::{FileGroup, FileScanConfigBuilder, ParquetSource};
use datafusion::datasource::source::DataSourceExec;
use datafusion::execution::object_store::ObjectStoreUrl;
use datafusion::logical_expr::utils::conjunction;
use datafusion::logical_expr::{Expr, Operator, TableProviderFilterPushDown, TableType};
use datafusion::parquet::arrow::arrow_reader::ArrowReaderOptions;
use datafusion::parquet::arrow::async_reader::AsyncFileReader;
use datafusion::parquet::errors::Result as ParquetResult;
use datafusion::parquet::file::metadata::{PageIndexPolicy, ParquetMetaData};
use datafusion::physical_expr::expressions::{BinaryExpr, Column as PhysicalColumn, Literal};
use datafusion::physical_plan::empty::EmptyExec;
use datafusion::physical_plan::filter::FilterExec;
use datafusion::physical_plan::metrics::ExecutionPlanMetricsSet;
use datafusion::physical_plan::projection::ProjectionExec;
use datafusion::physical_plan::union::UnionExec;
use datafusion::physical_plan::ExecutionPlan;
use futures::future::BoxFuture;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt};
use roaring::RoaringBitmap;
use std::ops::Range;

use crate::exec::{estimated_rows, external, shared_windows, CityScanExec, DedupExec, ScanReport};
use crate::pruning::{answered_by_index, KeyBounds};

/// The URL under which the engine's object store is registered with DataFusion.
pub const STORE_URL: &str = "citytsdb://store/";

/// Most segment indexes kept in memory.
const INDEX_CACHE_ENTRIES: usize = 65_536;

/// Segment indexes by object key; segments are immutable, so entries never go stale.
#[derive(Debug, Default)]
pub struct IndexCache {
    entries: Mutex<HashMap<String, Arc<SegmentIndex>>>,
}

impl IndexCache {
    async fn get(&self, store: &Arc<dyn ObjectStore>, key: &str) -> Result<Arc<SegmentIndex>> {
        if let Some(i) = self
            .entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
        {
            return Ok(i.clone());
        }
        let bytes = store.get(&ObjectPath::from(key)).await?.bytes().await?;
        let index = Arc::new(SegmentIndex::decode(&bytes).map_err(external)?);
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() >= INDEX_CACHE_ENTRIES {
            entries.clear();
        }
        entries.insert(key.to_string(), index.clone());
        Ok(index)
    }
}

/// The tables of one database, as of one snapshot.
pub struct DatabaseSchema {
    snapshot: Arc<DbSnapshot>,
    store: Arc<dyn ObjectStore>,
    indexes: Arc<IndexCache>,
    rollup_views: bool,
}

impl fmt::Debug for DatabaseSchema {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatabaseSchema")
            .field("db", &self.snapshot.name)
            .finish()
    }
}

impl DatabaseSchema {
    /// Tables of `snapshot`, reading segments from `store`.
    pub fn new(
        snapshot: Arc<DbSnapshot>,
        store: Arc<dyn ObjectStore>,
        indexes: Arc<IndexCache>,
    ) -> Self {
        Self {
            snapshot,
            store,
            indexes,
            rollup_views: false,
        }
    }

    /// With `views`, a rollup's table answers as its view (materialised rows
    /// outside the dirty ranges, the rest computed from the raw rows); without,
    /// with its materialised rows alone.
    pub fn with_rollup_views(mut self, views: bool) -> Self {
        self.rollup_views = views;
        self
    }

    fn city_table(&self, name: &str) -> Option<CityTable> {
        let schema = self.snapshot.schemas.get(name)?;
        Some(CityTable {
            snapshot: self.snapshot.clone(),
            name: name.to_string(),
            arrow: schema.arrow_schema(),
            schema: schema.clone(),
            store: self.store.clone(),
            indexes: self.indexes.clone(),
        })
    }

    fn rollup_view(&self, name: &str) -> Result<Option<Arc<dyn TableProvider>>> {
        let Some(rollup) = self.snapshot.rollup(name) else {
            return Ok(None);
        };
        let def = &rollup.def;
        let (Some(table), Some(source)) = (self.city_table(name), self.city_table(&def.source))
        else {
            return Ok(None);
        };
        let mut dirty = self.snapshot.rollup_dirty(name, true);
        // Buckets past the rollup's own retention are gone however they were made.
        if let Some(floor) = self
            .snapshot
            .cutoff(name)
            .map(|c| def.bucket_at_or_after(c))
        {
            dirty.retain(|d| d.hi > floor);
            for d in &mut dirty {
                d.lo = d.lo.max(floor);
            }
        }
        if dirty.is_empty() {
            return Ok(Some(Arc::new(table)));
        }
        let plan = crate::rollup::view_plan(def, Arc::new(table), Arc::new(source), &dirty)?;
        Ok(Some(Arc::new(datafusion::catalog::view::ViewTable::new(
            plan, None,
        ))))
    }
}

#[async_trait]
impl SchemaProvider for DatabaseSchema {
    fn table_names(&self) -> Vec<String> {
        self.snapshot.schemas.keys().cloned().collect()
    }

    async fn table(&self, name: &str) -> Result<Option<Arc<dyn TableProvider>>> {
        if self.rollup_views && self.snapshot.rollup(name).is_some() {
            return self.rollup_view(name);
        }
        Ok(self
            .city_table(name)
            .map(|t| Arc::new(t) as Arc<dyn TableProvider>))
    }

    fn table_exist(&self, name: &str) -> bool {
        self.snapshot.schemas.contains_key(name)
    }
}

/// One table: its segments and its buffered rows.
pub struct CityTable {
    snapshot: Arc<DbSnapshot>,
    name: String,
    schema: Arc<TableSchema>,
    arrow: SchemaRef,
    store: Arc<dyn ObjectStore>,
    indexes: Arc<IndexCache>,
}

impl fmt::Debug for CityTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CityTable")
            .field("table", &self.name)
            .finish()
    }
}

#[async_trait]
impl TableProvider for CityTable {
    fn schema(&self) -> SchemaRef {
        self.arrow.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> Result<Vec<TableProviderFilterPushDown>> {
        // Filters prune; DataFusion still applies every one of them above the scan.
        Ok(vec![TableProviderFilterPushDown::Inexact; filters.len()])
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        _limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let filters: Vec<Expr> = filters.iter().map(unqualify).collect::<Result<_>>()?;
        let mut bounds = KeyBounds::from_filters(&filters, &self.schema);
        // Rows past the table's retention are not there for any reader.
        let cutoff = self.snapshot.cutoff(&self.name);
        if let Some(c) = cutoff {
            bounds.min_time = bounds.min_time.max(c);
        }
        let projection: Vec<usize> = projection
            .cloned()
            .unwrap_or_else(|| (0..self.arrow.fields().len()).collect());
        let out_schema = Arc::new(self.arrow.project(&projection)?);
        let catalog = self.snapshot.table_catalog(&self.name);
        let mut report = ScanReport {
            table: self.name.clone(),
            segments_total: catalog.map(|c| c.segment_count()).unwrap_or(0),
            rows_total: catalog
                .map(|c| c.segments().map(|s| s.rows).sum())
                .unwrap_or(0),
            ..Default::default()
        };
        if bounds.is_empty() {
            return Ok(Arc::new(CityScanExec::new(
                report,
                Arc::new(EmptyExec::new(out_schema)),
            )));
        }

        let buffered = self.buffered_rows(&bounds)?;
        let buffer_range = buffered
            .as_ref()
            .and_then(citytsdb_storage::buffer::time_range);
        report.buffer_rows = buffered.as_ref().map(|b| b.num_rows()).unwrap_or(0);

        // Segments by day and time range, then by the day's tag bitmaps, then each
        // one's own bitmaps become row selections.
        let mut chosen: Vec<Chosen<'_>> = Vec::new();
        let mut time_pages = false;
        for (_, day) in catalog
            .map(|c| c.days_between(bounds.min_time, bounds.max_time))
            .into_iter()
            .flatten()
        {
            let mut holding: Option<RoaringBitmap> = None;
            for t in &bounds.tags {
                let ids = day.holding(&t.column, &t.values);
                holding = Some(match holding {
                    Some(h) => h & ids,
                    None => ids,
                });
            }
            for seg in day.segments.values() {
                if !seg.overlaps(bounds.min_time, bounds.max_time)
                    || holding.as_ref().is_some_and(|h| !h.contains(seg.id))
                {
                    continue;
                }
                let file = PartitionedFile::new(seg.path.clone(), seg.size);
                let deleted = seg.deleted_rows();
                let (file, rows) = if bounds.tags.is_empty() && deleted.is_none() {
                    report.rows_selected += seg.rows;
                    report.rows_decoded += seg.rows;
                    (file, seg.rows)
                } else {
                    let index = self.indexes.get(&self.store, &seg.index_path).await?;
                    let rows = if bounds.tags.is_empty() {
                        None
                    } else {
                        index.matching_rows(&bounds.tags)
                    };
                    // Deleted rows are never read.
                    let rows = seg.kept(rows);
                    if rows.as_ref().is_some_and(|r| r.is_empty()) {
                        continue;
                    }
                    let selection = index.selection(rows.as_ref());
                    time_pages |= selection.max_pages > 1;
                    report.rows_selected += selection.rows_selected;
                    report.rows_decoded += selection.rows_decoded;
                    let rows = selection.rows_selected;
                    (file.with_extension(access_plan(selection.row_groups)), rows)
                };
                report.segments_opened += 1;
                chosen.push(Chosen {
                    meta: seg,
                    file,
                    rows,
                });
            }
        }
        let groups = merge_groups(&chosen, buffer_range);
        let plain: Vec<PartitionedFile> = groups
            .plain
            .iter()
            .map(|&i| chosen[i].file.clone())
            .collect();
        let plain_rows: u64 = groups.plain.iter().map(|&i| chosen[i].rows).sum();
        report.segments_merged = groups.merged.iter().map(|g| g.len()).sum();

        // Segments that reach back past the retention cutoff hold rows no reader
        // may see (until compaction trims them): those are filtered out by time.
        let expired = cutoff.filter(|&c| chosen.iter().any(|x| x.meta.min_time < c));
        // With a merge, every source must carry the key columns.
        let mut read_cols = projection.clone();
        if expired.is_some() {
            let time_col = self.arrow.index_of(TIME_COLUMN)?;
            if !read_cols.contains(&time_col) {
                read_cols.push(time_col);
            }
        }
        if !groups.merged.is_empty() {
            for k in key_columns(&self.schema, &self.arrow).map_err(external)? {
                if !read_cols.contains(&k) {
                    read_cols.push(k);
                }
            }
        }
        let read_schema = Arc::new(self.arrow.project(&read_cols)?);
        let predicate = self.key_predicate(state, &filters, !bounds.tags.is_empty(), time_pages)?;
        let keys = if groups.merged.is_empty() {
            Vec::new()
        } else {
            key_columns(&self.schema, &read_schema).map_err(external)?
        };

        let mut parts: Vec<Arc<dyn ExecutionPlan>> = Vec::new();
        if !plain.is_empty() {
            parts.push(self.parquet_exec(
                state,
                plain,
                plain_rows,
                &read_cols,
                predicate.clone(),
            )?);
        }
        let mut memory = match buffered {
            Some(b) if b.num_rows() > 0 => Some(MemorySourceConfig::try_new_exec(
                &[vec![b]],
                self.arrow.clone(),
                Some(read_cols.clone()),
            )? as Arc<dyn ExecutionPlan>),
            _ => None,
        };
        for (g, members) in groups.merged.iter().enumerate() {
            // Oldest rows first: the merge lets later inputs win.
            let mut inputs: Vec<Arc<dyn ExecutionPlan>> = members
                .iter()
                .map(|&i| {
                    self.parquet_exec(
                        state,
                        vec![chosen[i].file.clone()],
                        chosen[i].rows,
                        &read_cols,
                        predicate.clone(),
                    )
                })
                .collect::<Result<_>>()?;
            let mut ranges: Vec<(i64, i64)> = members
                .iter()
                .map(|&i| (chosen[i].meta.min_time, chosen[i].meta.max_time))
                .collect();
            if groups.buffer_group == Some(g) {
                inputs.extend(memory.take());
                ranges.extend(buffer_range);
            }
            parts.push(Arc::new(DedupExec::new(
                read_schema.clone(),
                inputs,
                keys.clone(),
                shared_windows(&ranges),
            )));
        }
        parts.extend(memory);

        let mut plan: Arc<dyn ExecutionPlan> = match parts.len() {
            0 => Arc::new(EmptyExec::new(read_schema.clone())),
            1 => parts.remove(0),
            _ => UnionExec::try_new(parts)?,
        };
        if let Some(c) = expired {
            plan = since(plan, c)?;
        }
        if read_cols != projection {
            let exprs: Vec<(Arc<dyn datafusion::physical_expr::PhysicalExpr>, String)> = out_schema
                .fields()
                .iter()
                .map(|f| {
                    let i = read_schema.index_of(f.name())?;
                    Ok((
                        Arc::new(PhysicalColumn::new(f.name(), i)) as _,
                        f.name().clone(),
                    ))
                })
                .collect::<Result<_>>()?;
            plan = Arc::new(ProjectionExec::try_new(exprs, plan)?);
        }
        Ok(Arc::new(CityScanExec::new(report, plan)))
    }
}

impl CityTable {
    /// Buffered rows within the key bounds, merged to one row per (series, time).
    fn buffered_rows(&self, bounds: &KeyBounds) -> Result<Option<RecordBatch>> {
        let (batches, range) = self.snapshot.buffered(&self.name);
        let Some((lo, hi)) = range else {
            return Ok(None);
        };
        if lo > bounds.max_time || hi < bounds.min_time {
            return Ok(None);
        }
        let mut kept = Vec::with_capacity(batches.len());
        for b in &batches {
            let b = align(b, &self.arrow).map_err(external)?;
            let b = filter_by_bounds(&b, bounds)?;
            if b.num_rows() > 0 {
                kept.push(b);
            }
        }
        if kept.is_empty() {
            return Ok(None);
        }
        let keys = key_columns(&self.schema, &self.arrow).map_err(external)?;
        Ok(Some(
            sort_dedup(&self.arrow, &kept, &keys).map_err(external)?,
        ))
    }

    /// The pushed-down filters on key columns only, as a physical predicate for the
    /// Parquet reader's pruning (row group statistics, bloom filters, page index).
    /// Field filters are left out: a field's newest value may live in another
    /// source.
    ///
    /// When the segments' tag bitmaps picked the rows (`indexed`), the conjuncts
    /// they answered are left out too, and so are those on time alone unless
    /// `time_pages`: the wanted rows of some row group span more than one page, so
    /// the page index may drop some of them by time. A segment is sorted by series
    /// first, so its pages span the day; the rows of one series in one page are
    /// cheaper to read than to prune again per file opened.
    fn key_predicate(
        &self,
        state: &dyn Session,
        filters: &[Expr],
        indexed: bool,
        time_pages: bool,
    ) -> Result<Option<Arc<dyn datafusion::physical_expr::PhysicalExpr>>> {
        let key_only: Vec<Expr> = filters
            .iter()
            .filter(|f| {
                let refs = f.column_refs();
                let key = refs.iter().all(|c| {
                    matches!(
                        self.schema.kind(&c.name),
                        Some(ColumnKind::Tag | ColumnKind::Time)
                    )
                });
                let time_only = refs.iter().all(|c| c.name == TIME_COLUMN);
                key && !(indexed
                    && (answered_by_index(f, &self.schema) || (time_only && !time_pages)))
            })
            .cloned()
            .collect();
        let Some(expr) = conjunction(key_only) else {
            return Ok(None);
        };
        let df_schema = DFSchema::try_from(self.arrow.as_ref().clone())?;
        Ok(Some(state.create_physical_expr(expr, &df_schema)?))
    }

    /// Reads `files`, which select `rows` rows. Their footers and page indexes come
    /// from the runtime's metadata cache: a segment's path is never reused for
    /// other bytes, so what was read once holds until the segment is gone.
    ///
    /// One file's `rows` are given as the estimate of its rows: DataFusion splits
    /// a file into byte ranges read in parallel, each opening the file to find its
    /// row groups, only when the estimate is over a batch (`engine.rs`), and a few
    /// hundred rows of one file are read faster than the file is opened twice.
    /// Several files keep no estimate: they are spread over the CPUs and opened in
    /// parallel.
    fn parquet_exec(
        &self,
        state: &dyn Session,
        files: Vec<PartitionedFile>,
        rows: u64,
        read_cols: &[usize],
        predicate: Option<Arc<dyn datafusion::physical_expr::PhysicalExpr>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let metadata = state.runtime_env().cache_manager.get_file_metadata_cache();
        let mut source = ParquetSource::new(self.arrow.clone()).with_parquet_file_reader_factory(
            Arc::new(SegmentReaders(CachedParquetFileReaderFactory::new(
                self.store.clone(),
                metadata,
            ))),
        );
        if let Some(p) = predicate {
            source = source.with_predicate(p);
        }
        let one_file = files.len() == 1;
        let mut config =
            FileScanConfigBuilder::new(ObjectStoreUrl::parse(STORE_URL)?, Arc::new(source))
                .with_file_group(FileGroup::new(files));
        if one_file {
            config = config.with_statistics(estimated_rows(&self.arrow, rows));
        }
        let config = config
            .with_projection_indices(Some(read_cols.to_vec()))?
            .with_expr_adapter(Some(Arc::new(crate::decimal::SegmentExprAdapterFactory)))
            .build();
        Ok(DataSourceExec::from_data_source(config))
    }
}

/// Readers of segments whose cached metadata holds the page index.
///
/// The Parquet opener asks for the footer without the page index and loads the
/// index itself when it prunes pages, every time: the cache then keeps only the
/// footer, and each query parses every page index again. Asking for the page
/// index with the footer caches both, and the opener finds it loaded.
#[derive(Debug)]
struct SegmentReaders(CachedParquetFileReaderFactory);

impl ParquetFileReaderFactory for SegmentReaders {
    fn create_reader(
        &self,
        partition_index: usize,
        file: PartitionedFile,
        metadata_size_hint: Option<usize>,
        metrics: &ExecutionPlanMetricsSet,
    ) -> Result<Box<dyn AsyncFileReader + Send>> {
        let inner = self
            .0
            .create_reader(partition_index, file, metadata_size_hint, metrics)?;
        Ok(Box::new(WithPageIndex(inner)))
    }
}

/// A segment reader whose metadata always comes with the page index.
struct WithPageIndex(Box<dyn AsyncFileReader + Send>);

impl AsyncFileReader for WithPageIndex {
    fn get_bytes(&mut self, range: Range<u64>) -> BoxFuture<'_, ParquetResult<Bytes>> {
        self.0.get_bytes(range)
    }

    fn get_byte_ranges(
        &mut self,
        ranges: Vec<Range<u64>>,
    ) -> BoxFuture<'_, ParquetResult<Vec<Bytes>>> {
        self.0.get_byte_ranges(ranges)
    }

    fn get_metadata<'a>(
        &'a mut self,
        options: Option<&'a ArrowReaderOptions>,
    ) -> BoxFuture<'a, ParquetResult<Arc<ParquetMetaData>>> {
        let options = options
            .cloned()
            .unwrap_or_default()
            .with_page_index_policy(PageIndexPolicy::Optional);
        Box::pin(async move { self.0.get_metadata(Some(&options)).await })
    }
}

/// A segment a scan reads, and how.
struct Chosen<'a> {
    meta: &'a SegmentMeta,
    file: PartitionedFile,
    /// Rows it selects (every row when no bitmap picked them).
    rows: u64,
}

/// Which chosen segments are read as they are and which are merged together.
#[derive(Debug, Default, PartialEq)]
struct MergeGroups {
    /// Segments no other source can share a (series, time) with.
    plain: Vec<usize>,
    /// Groups to merge, each oldest first (by `seq`).
    merged: Vec<Vec<usize>>,
    /// The group the buffered rows join, if they meet any segment.
    buffer_group: Option<usize>,
}

/// Groups segments that may hold the same (series, time) (`chosen` in day order):
/// two segments of different runs of one day whose time ranges meet, and any segment meeting the buffered
/// rows' range, end up in one group (transitively).
fn merge_groups(chosen: &[Chosen<'_>], buffer: Option<(i64, i64)>) -> MergeGroups {
    let n = chosen.len();
    // Union-find over the segments, with node `n` for the buffered rows.
    let mut parent: Vec<usize> = (0..=n).collect();
    fn root(parent: &mut [usize], mut i: usize) -> usize {
        while parent[i] != i {
            parent[i] = parent[parent[i]];
            i = parent[i];
        }
        i
    }
    let mut joined = vec![false; n + 1];
    let join = |parent: &mut Vec<usize>, joined: &mut Vec<bool>, a: usize, b: usize| {
        let (ra, rb) = (root(parent, a), root(parent, b));
        parent[ra] = rb;
        joined[a] = true;
        joined[b] = true;
    };
    for i in 0..n {
        let a = chosen[i].meta;
        // `chosen` comes day by day: only the rest of `a`'s day can overlap it.
        for (j, other) in chosen.iter().enumerate().skip(i + 1) {
            let b = other.meta;
            if b.day != a.day {
                break;
            }
            if a.run != b.run && a.overlaps(b.min_time, b.max_time) {
                join(&mut parent, &mut joined, i, j);
            }
        }
        if let Some((lo, hi)) = buffer {
            if a.overlaps(lo, hi) {
                join(&mut parent, &mut joined, i, n);
            }
        }
    }
    let mut out = MergeGroups::default();
    let mut group_of_root: HashMap<usize, usize> = HashMap::new();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| (chosen[i].meta.seq, chosen[i].meta.id));
    for i in order {
        if !joined[i] {
            out.plain.push(i);
            continue;
        }
        let r = root(&mut parent, i);
        let g = *group_of_root.entry(r).or_insert_with(|| {
            out.merged.push(Vec::new());
            out.merged.len() - 1
        });
        out.merged[g].push(i);
    }
    if joined[n] {
        out.buffer_group = group_of_root.get(&root(&mut parent, n)).copied();
    }
    out.plain.sort_unstable();
    out
}

/// A segment's row-group access, from its tag bitmaps (`SegmentIndex::selection`),
/// as the `ParquetAccessPlan` DataFusion's Parquet reader takes.
pub fn access_plan(groups: Vec<SegmentAccess>) -> ParquetAccessPlan {
    ParquetAccessPlan::new(
        groups
            .into_iter()
            .map(|g| match g {
                SegmentAccess::Skip => RowGroupAccess::Skip,
                SegmentAccess::Scan => RowGroupAccess::Scan,
                SegmentAccess::Select(s) => RowGroupAccess::Selection(s),
            })
            .collect(),
    )
}

/// Keeps the rows of `batch` (aligned to the table schema) within the key bounds.
/// `plan`'s rows at or after `time` (nanoseconds).
fn since(plan: Arc<dyn ExecutionPlan>, time: i64) -> Result<Arc<dyn ExecutionPlan>> {
    let schema = plan.schema();
    let i = schema.index_of(TIME_COLUMN)?;
    let tz = match schema.field(i).data_type() {
        DataType::Timestamp(_, tz) => tz.clone(),
        _ => None,
    };
    let predicate = Arc::new(BinaryExpr::new(
        Arc::new(PhysicalColumn::new(TIME_COLUMN, i)),
        Operator::GtEq,
        Arc::new(Literal::new(ScalarValue::TimestampNanosecond(
            Some(time),
            tz,
        ))),
    ));
    Ok(Arc::new(FilterExec::try_new(predicate, plan)?))
}

fn filter_by_bounds(batch: &RecordBatch, bounds: &KeyBounds) -> Result<RecordBatch> {
    let n = batch.num_rows();
    let mut keep = vec![true; n];
    if let Some(t) = batch
        .column_by_name(TIME_COLUMN)
        .and_then(|c| c.as_primitive_opt::<TimestampNanosecondType>())
    {
        for (k, &v) in keep.iter_mut().zip(t.values().iter()) {
            *k = v >= bounds.min_time && v <= bounds.max_time;
        }
    }
    for c in &bounds.tags {
        let Some(col) = batch
            .column_by_name(&c.column)
            .and_then(|a| a.as_string_opt::<i32>())
        else {
            keep.iter_mut().for_each(|k| *k = false);
            continue;
        };
        for (i, k) in keep.iter_mut().enumerate() {
            if *k {
                *k = col.is_valid(i) && c.values.iter().any(|v| v == col.value(i));
            }
        }
    }
    if keep.iter().all(|&k| k) {
        return Ok(batch.clone());
    }
    Ok(filter_record_batch(batch, &BooleanArray::from(keep))?)
}

/// The filter with column references stripped of their table qualifier (the scan
/// sees one table).
fn unqualify(e: &Expr) -> Result<Expr> {
    e.clone()
        .transform(|e| match e {
            Expr::Column(c) if c.relation.is_some() => Ok(Transformed::yes(Expr::Column(
                Column::new_unqualified(c.name),
            ))),
            other => Ok(Transformed::no(other)),
        })
        .map(|t| t.data)
}
