//! Our execution plan nodes: the scan's report of its pruning, and the merge of
//! overlapping sources.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use citytsdb_storage::merge::sort_dedup;
use citytsdb_storage::schema::TIME_COLUMN;
use datafusion::arrow::array::{AsArray, BooleanArray, RecordBatch};
use datafusion::arrow::compute::filter_record_batch;
use datafusion::arrow::compute::kernels::boolean::not;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::datatypes::TimestampNanosecondType;
use datafusion::common::stats::Precision;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::common::{DataFusionError, Result, Statistics};
use datafusion::execution::memory_pool::MemoryConsumer;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::metrics::{
    BaselineMetrics, ExecutionPlanMetricsSet, MetricBuilder, MetricsSet, Time,
};
use datafusion::physical_plan::statistics::StatisticsArgs;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, ExecutionPlanProperties, Partitioning,
    PlanProperties, ReplaceChildrenOptions,
};
use futures::StreamExt;

/// `ExecutionPlan::with_new_children`, still required by DataFusion but
/// deprecated, as DataFusion documents it: `replace_children`, the properties
/// recomputed. Our nodes implement `replace_children`.
macro_rules! with_new_children_by_replace {
    () => {
        #[allow(deprecated)]
        fn with_new_children(
            self: std::sync::Arc<Self>,
            children: Vec<std::sync::Arc<dyn datafusion::physical_plan::ExecutionPlan>>,
        ) -> datafusion::common::Result<std::sync::Arc<dyn datafusion::physical_plan::ExecutionPlan>>
        {
            self.replace_children(
                children,
                datafusion::physical_plan::ReplaceChildrenOptions::new(
                    datafusion::physical_plan::ChildrenPropertiesMode::Recompute,
                ),
            )
        }
    };
}
pub(crate) use with_new_children_by_replace;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A storage failure inside a query, as DataFusion carries it.
pub fn external(e: citytsdb_storage::StorageError) -> DataFusionError {
    DataFusionError::External(Box::new(e))
}

/// What the scan's pruning decided, shown by `EXPLAIN` and `EXPLAIN ANALYZE`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScanReport {
    /// The table scanned.
    pub table: String,
    /// Segments of the table in the catalog.
    pub segments_total: usize,
    /// Segments left after time and tag-bitmap pruning.
    pub segments_opened: usize,
    /// Rows in all the table's segments.
    pub rows_total: u64,
    /// Rows the tag bitmaps select in the opened segments.
    pub rows_selected: u64,
    /// Rows in the Parquet pages that must be decoded to read them.
    pub rows_decoded: u64,
    /// Buffered (unpersisted) rows read.
    pub buffer_rows: usize,
    /// Segments merged with buffered rows because they overlap in time.
    pub segments_merged: usize,
    /// Set when the rows come from the series registry instead of the table: one
    /// latest row per series, this many (`latest.rs`).
    pub cached_series: Option<usize>,
}

/// The root of a table scan: passes rows through and reports the pruning, the
/// rows it gave and the time it took (`scan_time`: reading and decoding included).
#[derive(Debug)]
pub struct CityScanExec {
    report: ScanReport,
    input: Arc<dyn ExecutionPlan>,
    metrics: ExecutionPlanMetricsSet,
}

impl CityScanExec {
    /// Wraps the plan that reads the table's sources.
    pub fn new(report: ScanReport, input: Arc<dyn ExecutionPlan>) -> Self {
        Self {
            report,
            input,
            metrics: ExecutionPlanMetricsSet::new(),
        }
    }

    /// Whether it reads the table's sources (not the latest rows of the series
    /// registry).
    pub fn is_table_scan(&self) -> bool {
        self.report.cached_series.is_none()
    }

    /// The plan that reads the sources.
    pub fn input(&self) -> &Arc<dyn ExecutionPlan> {
        &self.input
    }

    /// The same scan, its sources read by `input`.
    pub fn with_input(&self, input: Arc<dyn ExecutionPlan>) -> Self {
        Self::new(self.report.clone(), input)
    }
}

/// A scan's output, timed.
struct TimedStream {
    input: SendableRecordBatchStream,
    baseline: BaselineMetrics,
    scan_time: Time,
}

impl futures::Stream for TimedStream {
    type Item = Result<datafusion::arrow::record_batch::RecordBatch>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        let this = &mut *self;
        let timer = this.scan_time.timer();
        let poll = this.input.as_mut().poll_next(cx);
        timer.done();
        this.baseline.record_poll(poll)
    }
}

impl datafusion::physical_plan::RecordBatchStream for TimedStream {
    fn schema(&self) -> SchemaRef {
        self.input.schema()
    }
}

impl DisplayAs for CityScanExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = &self.report;
        if let Some(series) = r.cached_series {
            return write!(
                f,
                "LastValueCacheExec: table={} series={} segments_opened=0 rows_decoded=0",
                r.table, series
            );
        }
        write!(
            f,
            "CityScanExec: table={} segments_total={} segments_opened={} rows_total={} rows_selected={} rows_decoded={} buffer_rows={} segments_merged={}",
            r.table, r.segments_total, r.segments_opened, r.rows_total, r.rows_selected, r.rows_decoded, r.buffer_rows, r.segments_merged
        )
    }
}

impl ExecutionPlan for CityScanExec {
    fn name(&self) -> &str {
        if self.report.cached_series.is_some() {
            "LastValueCacheExec"
        } else {
            "CityScanExec"
        }
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        self.input.properties()
    }

    fn maintains_input_order(&self) -> Vec<bool> {
        vec![true]
    }

    fn benefits_from_input_partitioning(&self) -> Vec<bool> {
        vec![false]
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn replace_children(
        self: Arc<Self>,
        mut children: Vec<Arc<dyn ExecutionPlan>>,
        _options: ReplaceChildrenOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        Ok(Arc::new(Self::new(
            self.report.clone(),
            children.swap_remove(0),
        )))
    }

    crate::exec::with_new_children_by_replace!();

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        let input = self.input.execute(partition, context)?;
        Ok(Box::pin(TimedStream {
            input,
            baseline: BaselineMetrics::new(&self.metrics, partition),
            scan_time: MetricBuilder::new(&self.metrics).subset_time("scan_time", partition),
        }))
    }

    fn metrics(&self) -> Option<MetricsSet> {
        Some(self.metrics.clone_inner())
    }

    /// At most the rows the pruning selected (the filters above may keep fewer):
    /// an estimate that lets the optimizer leave a small scan in one partition
    /// rather than spread a few hundred rows over the CPUs and merge them back
    /// (`use_row_number_estimates_to_optimize_partitioning`, `engine.rs`).
    fn statistics_from_inputs(
        &self,
        _input_stats: &[Arc<Statistics>],
        args: &StatisticsArgs,
    ) -> Result<Arc<Statistics>> {
        if args.partition().is_some() {
            return Ok(Arc::new(Statistics::new_unknown(&self.schema())));
        }
        let r = &self.report;
        let rows = match r.cached_series {
            Some(series) => series as u64,
            None => r.rows_selected.saturating_add(r.buffer_rows as u64),
        };
        Ok(Arc::new(estimated_rows(&self.schema(), rows)))
    }
}

/// Statistics that know only an estimate of the rows, `rows`.
pub fn estimated_rows(schema: &datafusion::arrow::datatypes::Schema, rows: u64) -> Statistics {
    Statistics::new_unknown(schema).with_num_rows(Precision::Inexact(
        usize::try_from(rows).unwrap_or(usize::MAX),
    ))
}

/// Merges sources that may hold the same (series, time): every row of every input
/// (inputs ordered oldest first), one row per key, each field from the newest input
/// that carries it.
///
/// Only rows whose time lies in one of `windows` — the times two or more inputs'
/// ranges share, where alone a key can repeat — are held, sorted and merged; the
/// others pass straight through as they are read. So what it holds is the overlap
/// of its inputs, not their size (a flush's segment and the buffered rows after it
/// share only the seconds they straddle).
#[derive(Debug)]
pub struct DedupExec {
    inputs: Vec<Arc<dyn ExecutionPlan>>,
    keys: Vec<usize>,
    /// Sorted, disjoint, inclusive time ranges (nanoseconds) to merge in.
    windows: Arc<Vec<(i64, i64)>>,
    properties: Arc<PlanProperties>,
}

/// The times (inclusive ranges, sorted and disjoint) that two or more of `ranges`
/// (inclusive) cover.
pub fn shared_windows(ranges: &[(i64, i64)]) -> Vec<(i64, i64)> {
    // Half-open [lo, hi + 1): at one instant, ends come before starts.
    let mut events: Vec<(i128, i32)> = ranges
        .iter()
        .filter(|(lo, hi)| lo <= hi)
        .flat_map(|&(lo, hi)| [(i128::from(lo), 1), (i128::from(hi) + 1, -1)])
        .collect();
    events.sort_unstable();
    let mut out: Vec<(i64, i64)> = Vec::new();
    let mut depth = 0;
    let mut start = 0i128;
    for (at, step) in events {
        let before = depth;
        depth += step;
        if before < 2 && depth >= 2 {
            start = at;
        } else if before >= 2 && depth < 2 {
            // `at` is past the window's last instant; both ends fit in i64.
            let (lo, hi) = (start as i64, (at - 1) as i64);
            match out.last_mut() {
                Some(last) if i128::from(last.1) + 1 >= i128::from(lo) => last.1 = hi,
                _ => out.push((lo, hi)),
            }
        }
    }
    out
}

/// Whether `t` lies in one of `windows` (sorted, disjoint, inclusive).
fn in_windows(windows: &[(i64, i64)], t: i64) -> bool {
    let i = windows.partition_point(|w| w.1 < t);
    windows.get(i).is_some_and(|w| w.0 <= t)
}

/// `batch` split by time into the rows in `windows` and the others.
fn split_by_windows(
    batch: &RecordBatch,
    time: usize,
    windows: &[(i64, i64)],
) -> Result<(RecordBatch, RecordBatch)> {
    let times = batch
        .column(time)
        .as_primitive_opt::<TimestampNanosecondType>()
        .ok_or_else(|| DataFusionError::Internal("DedupExec: time is not nanoseconds".into()))?;
    let inside: BooleanArray = times
        .values()
        .iter()
        .map(|&t| Some(in_windows(windows, t)))
        .collect();
    let outside = not(&inside)?;
    Ok((
        filter_record_batch(batch, &inside)?,
        filter_record_batch(batch, &outside)?,
    ))
}

impl DedupExec {
    /// Merges `inputs` (all of schema `schema`, oldest first) on the `keys` columns,
    /// within `windows` (see [`shared_windows`]); rows outside pass through.
    pub fn new(
        schema: SchemaRef,
        inputs: Vec<Arc<dyn ExecutionPlan>>,
        keys: Vec<usize>,
        windows: Vec<(i64, i64)>,
    ) -> Self {
        let properties = Arc::new(PlanProperties::new(
            EquivalenceProperties::new(schema),
            Partitioning::UnknownPartitioning(1),
            EmissionType::Final,
            Boundedness::Bounded,
        ));
        Self {
            inputs,
            keys,
            windows: Arc::new(windows),
            properties,
        }
    }
}

impl DisplayAs for DedupExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "DedupExec: inputs={} keys={:?} windows={}",
            self.inputs.len(),
            self.keys,
            self.windows.len()
        )
    }
}

impl ExecutionPlan for DedupExec {
    fn name(&self) -> &str {
        "DedupExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        self.inputs.iter().collect()
    }

    fn benefits_from_input_partitioning(&self) -> Vec<bool> {
        vec![false; self.inputs.len()]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn replace_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
        _options: ReplaceChildrenOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        Ok(Arc::new(Self::new(
            self.schema(),
            children,
            self.keys.clone(),
            self.windows.to_vec(),
        )))
    }

    crate::exec::with_new_children_by_replace!();

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        if partition != 0 {
            return Err(DataFusionError::Internal(format!(
                "DedupExec has one partition, asked for {partition}"
            )));
        }
        let schema = self.schema();
        let mut streams = Vec::new();
        for input in &self.inputs {
            for p in 0..input.output_partitioning().partition_count() {
                streams.push(input.execute(p, context.clone())?);
            }
        }
        let keys = self.keys.clone();
        let time = schema.index_of(TIME_COLUMN)?;
        let windows = self.windows.clone();
        // What is merged is held until the inputs end: charged to the query's pool.
        let reservation = Arc::new(Mutex::new(
            MemoryConsumer::new("DedupExec").register(context.memory_pool()),
        ));
        let held: Arc<Mutex<Vec<RecordBatch>>> = Arc::default();
        // The inputs one after another, oldest first: the order the merge needs.
        let passed = {
            let (held, reservation) = (held.clone(), reservation.clone());
            futures::stream::iter(streams)
                .flatten()
                .map(move |batch| {
                    let batch = batch?;
                    let (inside, outside) = split_by_windows(&batch, time, &windows)?;
                    if inside.num_rows() > 0 {
                        lock(&reservation).try_grow(inside.get_array_memory_size())?;
                        lock(&held).push(inside);
                    }
                    Ok(outside)
                })
                .filter(|b: &Result<RecordBatch>| {
                    futures::future::ready(b.as_ref().map_or(true, |b| b.num_rows() > 0))
                })
        };
        let out_schema = schema.clone();
        let merged = futures::stream::once(async move {
            let batches = std::mem::take(&mut *lock(&held));
            if batches.is_empty() {
                return Ok(None);
            }
            let merged = sort_dedup(&out_schema, &batches, &keys).map_err(external)?;
            drop(batches);
            lock(&reservation).free();
            Ok(Some(merged))
        })
        .filter_map(|r: Result<Option<RecordBatch>>| futures::future::ready(r.transpose()));
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            schema,
            passed.chain(merged),
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_windows_are_the_times_two_ranges_cover() {
        assert_eq!(shared_windows(&[]), []);
        assert_eq!(shared_windows(&[(0, 10)]), []);
        // Apart, touching at one instant, overlapping, nested.
        assert_eq!(shared_windows(&[(0, 10), (11, 20)]), []);
        assert_eq!(shared_windows(&[(0, 10), (10, 20)]), [(10, 10)]);
        assert_eq!(shared_windows(&[(0, 10), (5, 20)]), [(5, 10)]);
        assert_eq!(
            shared_windows(&[(0, 100), (20, 30), (40, 50)]),
            [(20, 30), (40, 50)]
        );
        // Chained flushes, then buffered rows over the last one's end.
        assert_eq!(
            shared_windows(&[(0, 10), (8, 20), (18, 30), (29, 40)]),
            [(8, 10), (18, 20), (29, 30)]
        );
        // Adjacent windows join.
        assert_eq!(
            shared_windows(&[(0, 10), (5, 10), (11, 20), (11, 15)]),
            [(5, 15)]
        );
        // The ends of the range.
        assert_eq!(
            shared_windows(&[(i64::MIN, i64::MAX), (i64::MAX - 1, i64::MAX)]),
            [(i64::MAX - 1, i64::MAX)]
        );
        assert_eq!(
            shared_windows(&[(i64::MIN, 0), (i64::MIN, i64::MIN)]),
            [(i64::MIN, i64::MIN)]
        );
    }

    #[test]
    fn a_time_is_in_a_window_when_one_holds_it() {
        let w = [(5, 10), (20, 20), (30, 40)];
        let inside: Vec<i64> = (0..45).filter(|&t| in_windows(&w, t)).collect();
        let want: Vec<i64> = (5..=10).chain([20]).chain(30..=40).collect();
        assert_eq!(inside, want);
        assert!(!in_windows(&[], 0));
    }
}
