//! Our execution plan nodes: the scan's report of its pruning, and the merge of
//! overlapping sources.

use std::fmt;
use std::sync::Arc;

use citytsdb_storage::merge::sort_dedup;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::common::{DataFusionError, Result};
use datafusion::execution::memory_pool::MemoryConsumer;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::metrics::{
    BaselineMetrics, ExecutionPlanMetricsSet, MetricBuilder, MetricsSet, Time,
};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    ChildrenPropertiesMode, DisplayAs, DisplayFormatType, ExecutionPlan, ExecutionPlanProperties,
    Partitioning, PlanProperties, ReplaceChildrenOptions,
};

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

    #[allow(deprecated)]
    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        self.replace_children(
            children,
            ReplaceChildrenOptions::new(ChildrenPropertiesMode::Recompute),
        )
    }

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
}

/// Merges sources that may hold the same (series, time): every row of every input
/// (inputs ordered oldest first), sorted by series then time, one row per key, each
/// field from the newest input that carries it.
///
/// It holds all its input in memory, so the scan uses it only for the few sources
/// that overlap: segments whose time range meets the buffered rows'.
#[derive(Debug)]
pub struct DedupExec {
    inputs: Vec<Arc<dyn ExecutionPlan>>,
    keys: Vec<usize>,
    properties: Arc<PlanProperties>,
}

impl DedupExec {
    /// Merges `inputs` (all of schema `schema`, oldest first) on the `keys` columns.
    pub fn new(schema: SchemaRef, inputs: Vec<Arc<dyn ExecutionPlan>>, keys: Vec<usize>) -> Self {
        let properties = Arc::new(PlanProperties::new(
            EquivalenceProperties::new(schema),
            Partitioning::UnknownPartitioning(1),
            EmissionType::Final,
            Boundedness::Bounded,
        ));
        Self {
            inputs,
            keys,
            properties,
        }
    }
}

impl DisplayAs for DedupExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "DedupExec: inputs={} keys={:?}",
            self.inputs.len(),
            self.keys
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
        )))
    }

    #[allow(deprecated)]
    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        self.replace_children(
            children,
            ReplaceChildrenOptions::new(ChildrenPropertiesMode::Recompute),
        )
    }

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
        let out_schema = schema.clone();
        let reservation = MemoryConsumer::new("DedupExec").register(context.memory_pool());
        let fut = async move {
            // What is merged is held whole: charged to the query's memory pool.
            let all = crate::collect::collect(streams, &out_schema, reservation).await?;
            sort_dedup(&out_schema, &[all], &keys).map_err(external)
        };
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            schema,
            futures::stream::once(fut),
        )))
    }
}
