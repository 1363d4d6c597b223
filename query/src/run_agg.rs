//! The first stage of a `GROUP BY` over tag columns, grouped by runs.
//!
//! A table's rows come from its segments sorted by series, then time, so the tag
//! values of consecutive rows are almost always those of the row before: one cover's
//! day is a few hundred rows with the same `device` and `district`. DataFusion's
//! partial hash aggregate hashes and compares every row's keys all the same; with
//! two or more string keys that is most of a whole-range aggregate's time (top 10
//! covers by max tilt: 368 of 650 CPU-milliseconds).
//!
//! [`RunAggregateExec`] replaces such a partial aggregate. It finds where the keys
//! change from one row to the next (for string views, 32 rows at a time, walking
//! row by row only a block where something changes), looks a group up only where
//! a run starts, fills each run's rows with its group, then feeds the aggregates'
//! own groups accumulators the group of every row.
//! Its output is the partial aggregate's, column for column, so the final stage is
//! DataFusion's unchanged. It is used ([`RunAggregateRule`]) only where that pays:
//! a `Partial` aggregate of unordered input grouped by two or more plain string
//! columns (with one, DataFusion's own grouping is cheap already), no
//! `FILTER`, `DISTINCT` or `ORDER BY` in its aggregates, and every aggregate able to
//! update by group index, over a table scan through nothing that reorders rows.
//!
//! Where the scan can, it gives the keys as string views
//! ([`RunAggregateExec::with_string_views`], `string_views.rs`): they decode
//! faster from Parquet's dictionaries, and two rows' short keys compare as two
//! 128-bit numbers.
//!
//! Memory: the groups' keys and accumulators are counted against the query's memory
//! pool; when the pool refuses more, the groups so far are emitted and the stage
//! starts over, which a partial stage may do (the final stage merges them).

use std::fmt;
use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, RecordBatch, StringArray, StringBuilder, StringViewArray,
};
use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::common::tree_node::{Transformed, TransformedResult, TreeNode, TreeNodeRecursion};
use datafusion::common::{DataFusionError, HashMap, Result};
use datafusion::config::ConfigOptions;
use datafusion::execution::memory_pool::{MemoryConsumer, MemoryReservation};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::{EmitTo, GroupsAccumulator};
use datafusion::physical_expr::aggregate::AggregateFunctionExpr;
use datafusion::physical_expr::expressions::Column;
use datafusion::physical_expr::utils::collect_columns;
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_plan::aggregates::{
    aggregate_expressions, evaluate_many, AggregateExec, AggregateMode,
};
use datafusion::physical_plan::filter::FilterExec;
use datafusion::physical_plan::metrics::{
    BaselineMetrics, Count, ExecutionPlanMetricsSet, MetricBuilder, MetricsSet,
};
use datafusion::physical_plan::projection::ProjectionExec;
use datafusion::physical_plan::repartition::RepartitionExec;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::InputOrderMode;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, InputDistributionRequirements, Partitioning,
    PlanProperties, ReplaceChildrenOptions,
};
use futures::{StreamExt, TryStreamExt};

use crate::exec::CityScanExec;

/// Puts [`RunAggregateExec`] in place of the partial aggregates it serves better.
#[derive(Debug, Default)]
pub struct RunAggregateRule;

impl PhysicalOptimizerRule for RunAggregateRule {
    fn optimize(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        _config: &ConfigOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        plan.transform_up(|node| {
            let Some(agg) = node.downcast_ref::<AggregateExec>() else {
                return Ok(Transformed::no(node));
            };
            if !suits(agg) {
                return Ok(Transformed::no(node));
            }
            let agg = Arc::new(agg.clone());
            let run = RunAggregateExec::new(agg).with_string_views()?;
            Ok(Transformed::yes(Arc::new(run) as Arc<dyn ExecutionPlan>))
        })
        .data()
    }

    fn name(&self) -> &str {
        "run_aggregate"
    }

    fn schema_check(&self) -> bool {
        true
    }
}

/// Whether `agg` is a partial aggregate that [`RunAggregateExec`] can stand in for
/// and that reads a table scan's rows in their order.
fn suits(agg: &AggregateExec) -> bool {
    // (A grouped aggregate makes no dynamic filter: DataFusion's are for
    // aggregates without a grouping.)
    if *agg.mode() != AggregateMode::Partial || agg.limit_options().is_some() {
        return false;
    }
    // With one string key DataFusion's own grouping (one hash table of bytes)
    // is already cheap; with two or more it compares rows column by column.
    let group_by = agg.group_expr();
    if group_by.expr().len() < 2
        || group_by.has_grouping_set()
        || *agg.input_order_mode() != InputOrderMode::Linear
    {
        return false;
    }
    let input_schema = agg.input().schema();
    let string_columns = group_by.expr().iter().all(|(expr, _)| {
        expr.downcast_ref::<Column>().is_some_and(|c| {
            input_schema
                .fields()
                .get(c.index())
                .is_some_and(|f| f.data_type() == &DataType::Utf8)
        })
    });
    let simple_aggregates = agg.filter_expr().iter().all(Option::is_none)
        && agg.aggr_expr().iter().all(|a| {
            !a.is_distinct() && a.order_bys().is_empty() && a.groups_accumulator_supported()
        });
    string_columns && simple_aggregates && reads_scan_in_order(agg.input())
}

/// Whether `plan` is a table scan, through only nodes that keep its rows' order
/// within each batch.
fn reads_scan_in_order(plan: &Arc<dyn ExecutionPlan>) -> bool {
    let mut node = plan;
    loop {
        if node.downcast_ref::<CityScanExec>().is_some() {
            return true;
        }
        let keeps_order = node.downcast_ref::<FilterExec>().is_some()
            || node.downcast_ref::<ProjectionExec>().is_some()
            || passes_batches_on(node);
        let children = node.children();
        if !keeps_order || children.len() != 1 {
            return false;
        }
        node = children[0];
    }
}

/// Whether `node` hands its input's batches on whole and unchanged (a round-robin
/// repartition, DataFusion's cooperative yielding).
pub(crate) fn passes_batches_on(node: &Arc<dyn ExecutionPlan>) -> bool {
    node.downcast_ref::<RepartitionExec>()
        .is_some_and(|r| matches!(r.partitioning(), Partitioning::RoundRobinBatch(_)))
        || node.name() == "CooperativeExec"
}

/// A partial aggregate over string keys that looks groups up once per run of equal
/// keys (module docs). Its output is that of the [`AggregateExec`] it stands for.
#[derive(Debug)]
pub struct RunAggregateExec {
    agg: Arc<AggregateExec>,
    /// What it reads: the aggregate's input, or that input with the key columns
    /// `views` read as string views.
    input: Arc<dyn ExecutionPlan>,
    views: Vec<String>,
    metrics: ExecutionPlanMetricsSet,
}

impl RunAggregateExec {
    /// Stands in for `agg`, which [`RunAggregateRule`] has found suitable.
    pub fn new(agg: Arc<AggregateExec>) -> Self {
        Self {
            input: Arc::clone(agg.input()),
            agg,
            views: Vec::new(),
            metrics: ExecutionPlanMetricsSet::new(),
        }
    }

    /// The same stage reading its keys as string views, where the table scan
    /// below can decode them so (`string_views.rs`) and no aggregate reads them;
    /// as it is otherwise.
    pub fn with_string_views(self) -> Result<Self> {
        let schema = self.agg.input().schema();
        let arguments = aggregate_expressions(self.agg.aggr_expr(), self.agg.mode(), 0)?;
        let read: Vec<usize> = arguments
            .iter()
            .flatten()
            .flat_map(collect_columns)
            .map(|c| c.index())
            .collect();
        let names: Vec<String> = key_columns(&self.agg)
            .into_iter()
            .filter(|k| !read.contains(k))
            .map(|k| schema.field(k).name().clone())
            .collect();
        if names.is_empty() {
            return Ok(self);
        }
        Ok(
            match crate::string_views::string_views(self.agg.input(), &names)? {
                Some(input) => Self {
                    input,
                    views: names,
                    ..self
                },
                None => self,
            },
        )
    }
}

/// The input columns `agg` groups by.
fn key_columns(agg: &AggregateExec) -> Vec<usize> {
    agg.group_expr()
        .expr()
        .iter()
        .filter_map(|(e, _)| e.downcast_ref::<Column>().map(Column::index))
        .collect()
}

impl DisplayAs for RunAggregateExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let keys: Vec<&str> = self
            .agg
            .group_expr()
            .expr()
            .iter()
            .map(|(_, name)| name.as_str())
            .collect();
        let aggs: Vec<&str> = self.agg.aggr_expr().iter().map(|a| a.name()).collect();
        write!(
            f,
            "RunAggregateExec: mode=Partial, gby=[{}], aggr=[{}]",
            keys.join(", "),
            aggs.join(", ")
        )?;
        if !self.views.is_empty() {
            write!(f, ", string_views=[{}]", self.views.join(", "))?;
        }
        Ok(())
    }
}

impl ExecutionPlan for RunAggregateExec {
    fn name(&self) -> &str {
        "RunAggregateExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        self.agg.properties()
    }

    fn input_distribution_requirements(&self) -> InputDistributionRequirements {
        self.agg.input_distribution_requirements()
    }

    fn maintains_input_order(&self) -> Vec<bool> {
        vec![false]
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn apply_expressions(
        &self,
        f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        self.agg.apply_expressions(f)
    }

    fn replace_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
        options: ReplaceChildrenOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        // The same input rearranged (string views and all) keeps the stage as it
        // is.
        if let [child] = &children[..] {
            if !self.views.is_empty() && child.schema() == self.input.schema() {
                return Ok(Arc::new(Self {
                    agg: Arc::clone(&self.agg),
                    input: Arc::clone(child),
                    views: self.views.clone(),
                    metrics: ExecutionPlanMetricsSet::new(),
                }));
            }
        }
        // New children may no longer suit it: then DataFusion's aggregate runs.
        let agg = Arc::clone(&self.agg).replace_children(children, options)?;
        match agg.downcast_ref::<AggregateExec>() {
            Some(a) if suits(a) => Ok(Arc::new(Self::new(Arc::new(a.clone())))),
            _ => Ok(agg),
        }
    }

    crate::exec::with_new_children_by_replace!();

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        let input = self.input.execute(partition, Arc::clone(&context))?;
        let schema = self.agg.schema();
        let keys = key_columns(&self.agg);
        let arguments = aggregate_expressions(self.agg.aggr_expr(), self.agg.mode(), 0)?;
        let aggregates = self.agg.aggr_expr().to_vec();
        let reservation = MemoryConsumer::new(format!("RunAggregateExec[{partition}]"))
            .register(context.memory_pool());
        let groups = RunGroups {
            keys,
            arguments,
            accumulators: accumulators(&aggregates)?,
            aggregates,
            index: HashMap::new(),
            key_values: Vec::new(),
            scratch: Vec::new(),
            current: None,
            group_indices: Vec::new(),
            starts: Vec::new(),
            reservation,
            schema: Arc::clone(&schema),
            batch_size: context.session_config().batch_size(),
            baseline: BaselineMetrics::new(&self.metrics, partition),
            early_emits: MetricBuilder::new(&self.metrics).counter("early_emits", partition),
            held: 0,
        };
        let out =
            futures::stream::try_unfold((input, Some(groups)), |(mut input, groups)| async move {
                let Some(mut groups) = groups else {
                    return Ok(None);
                };
                while let Some(batch) = input.next().await {
                    let batch = batch?;
                    if let Some(early) = groups.update(&batch)? {
                        return Ok(Some((early, (input, Some(groups)))));
                    }
                }
                let last = groups.emit()?;
                groups.baseline.done();
                Ok::<_, DataFusionError>(Some((last, (input, None))))
            })
            .map_ok(|batches| futures::stream::iter(batches.into_iter().map(Ok)))
            .try_flatten();
        Ok(Box::pin(RecordBatchStreamAdapter::new(schema, out)))
    }

    fn metrics(&self) -> Option<MetricsSet> {
        Some(self.metrics.clone_inner())
    }
}

/// One row's keys: each value's bytes, or `None` for null.
type RowKeys = Box<[Option<Box<[u8]>>]>;

/// The groups of one partition.
struct RunGroups {
    /// Input columns of the keys.
    keys: Vec<usize>,
    /// Each aggregate's argument expressions.
    arguments: Vec<Vec<Arc<dyn PhysicalExpr>>>,
    accumulators: Vec<Box<dyn GroupsAccumulator>>,
    /// The aggregates, to make fresh accumulators when the groups start over.
    aggregates: Vec<Arc<AggregateFunctionExpr>>,
    /// Encoded keys (see [`encode`]) to group.
    index: HashMap<Box<[u8]>, usize>,
    /// Each key column's values, by group.
    key_values: Vec<StringBuilder>,
    scratch: Vec<u8>,
    /// The group of the last row seen, carried across batches.
    current: Option<(RowKeys, usize)>,
    group_indices: Vec<usize>,
    /// The rows of the batch at hand whose keys differ from the row before.
    starts: Vec<usize>,
    reservation: MemoryReservation,
    schema: SchemaRef,
    batch_size: usize,
    baseline: BaselineMetrics,
    /// Times the groups were given early, the memory pool refusing more.
    early_emits: Count,
    /// Bytes of the keys, their index and the group indices (the accumulators
    /// report their own), kept as groups are added.
    held: usize,
}

/// A groups accumulator for each of `aggregates`.
fn accumulators(
    aggregates: &[Arc<AggregateFunctionExpr>],
) -> Result<Vec<Box<dyn GroupsAccumulator>>> {
    aggregates
        .iter()
        .map(|a| a.create_groups_accumulator())
        .collect()
}

/// A key column of the input: plain strings, or string views, as a table scan
/// gives them to this stage when it can ([`RunAggregateExec::with_string_views`]).
#[derive(Clone, Copy)]
enum Keys<'a> {
    Plain(&'a StringArray),
    Views(&'a StringViewArray),
}

impl<'a> Keys<'a> {
    fn of(c: &'a ArrayRef) -> Option<Self> {
        match c.data_type() {
            DataType::Utf8 => Some(Keys::Plain(c.as_string::<i32>())),
            DataType::Utf8View => Some(Keys::Views(c.as_string_view())),
            _ => None,
        }
    }

    /// Row `row`'s value, or `None` when null.
    #[inline]
    fn value(self, row: usize) -> Option<&'a str> {
        match self {
            Keys::Plain(c) => c.is_valid(row).then(|| c.value(row)),
            Keys::Views(c) => c.is_valid(row).then(|| c.value(row)),
        }
    }

    /// Row `row`'s bytes, or `None` when null: for plain strings straight from
    /// the offsets, as this runs for every row.
    #[inline]
    fn raw(self, row: usize) -> Option<&'a [u8]> {
        match self {
            Keys::Plain(c) => raw(c, row),
            Keys::Views(_) => self.value(row).map(str::as_bytes),
        }
    }

    /// Whether rows `a` and `b` hold the same value. Two views that are equal
    /// hold the same bytes (a short value is inside its view, a long one is the
    /// same place in the same buffer); unequal views differ unless both are long,
    /// of one length and one prefix, and then the bytes say.
    #[inline]
    fn same(self, a: usize, b: usize) -> bool {
        match self {
            Keys::Plain(c) => raw(c, a) == raw(c, b),
            Keys::Views(c) => {
                let (valid_a, valid_b) = (c.is_valid(a), c.is_valid(b));
                if !valid_a || !valid_b {
                    return valid_a == valid_b;
                }
                let (x, y) = (c.views()[a], c.views()[b]);
                if x == y {
                    return true;
                }
                // The low 32 bits are the length, the next 32 the first bytes.
                let long_alike = x as u32 == y as u32
                    && x as u32 > INLINE_VIEW_BYTES
                    && (x >> 32) as u32 == (y >> 32) as u32;
                long_alike && c.value(a) == c.value(b)
            }
        }
    }
}

/// The longest value a string view holds inside itself.
const INLINE_VIEW_BYTES: u32 = 12;

/// `row`'s keys, each a length-prefixed value or a null marker, into `out`.
fn encode(columns: &[Keys<'_>], row: usize, out: &mut Vec<u8>) {
    out.clear();
    for c in columns {
        match c.raw(row) {
            None => out.push(0),
            Some(v) => {
                out.push(1);
                out.extend_from_slice(&(v.len() as u32).to_le_bytes());
                out.extend_from_slice(v);
            }
        }
    }
}

/// Row `row`'s bytes in `c`, or `None` when null: straight from the offsets, as
/// this runs for every row.
#[inline]
fn raw(c: &StringArray, row: usize) -> Option<&[u8]> {
    if c.is_null(row) {
        return None;
    }
    let offsets = c.value_offsets();
    Some(&c.value_data()[offsets[row] as usize..offsets[row + 1] as usize])
}

/// The rows of a batch of `rows` rows whose keys differ from the row before, in
/// order, into `starts` (row 0 is never listed). Rows of one series pass in
/// blocks: a block of views that all equal their predecessors' (the common case,
/// runs being hundreds of rows long) costs a few vector comparisons, and only a
/// block holding a change is walked row by row.
fn run_starts(columns: &[Keys<'_>], rows: usize, starts: &mut Vec<usize>) {
    const BLOCK: usize = 32;
    starts.clear();
    for c in columns {
        match c {
            Keys::Views(a) if a.null_count() == 0 => {
                let views = &a.views()[..rows];
                let mut row = 1;
                while row < rows {
                    let end = (row + BLOCK).min(rows);
                    // Differences OR-ed together, which vectorizes; tested once.
                    let changed = views[row..end]
                        .iter()
                        .zip(&views[row - 1..end - 1])
                        .fold(0u128, |d, (x, y)| d | (x ^ y));
                    if changed != 0 {
                        for r in row..end {
                            if views[r] != views[r - 1] && !c.same(r - 1, r) {
                                starts.push(r);
                            }
                        }
                    }
                    row = end;
                }
            }
            _ => starts.extend((1..rows).filter(|&r| !c.same(r - 1, r))),
        }
    }
    if columns.len() > 1 {
        // Each column's starts are in order; together they may not be, and a row
        // where two columns change is one start. The stable sort finds the
        // columns' sorted runs and merges them, in linear time however many
        // starts a batch of short runs has.
        starts.sort();
        starts.dedup();
    }
}

impl RunGroups {
    /// Adds `batch`'s rows. Returns the groups so far, and starts over, when the
    /// memory pool refuses room for more.
    fn update(&mut self, batch: &RecordBatch) -> Result<Option<Vec<RecordBatch>>> {
        let elapsed = self.baseline.elapsed_compute().clone();
        let timer = elapsed.timer();
        let rows = batch.num_rows();
        if rows == 0 {
            return Ok(None);
        }
        let columns = self
            .keys
            .iter()
            .map(|&k| {
                Keys::of(batch.column(k)).ok_or_else(|| {
                    DataFusionError::Internal(format!(
                        "RunAggregateExec: key column {k} is {}, not Utf8 or Utf8View",
                        batch.column(k).data_type()
                    ))
                })
            })
            .collect::<Result<Vec<Keys<'_>>>>()?;
        if self.key_values.is_empty() {
            self.key_values = columns.iter().map(|_| StringBuilder::new()).collect();
        }
        self.group_indices.clear();
        self.group_indices.reserve(rows);
        // The first row continues the last batch's run when its keys are the same.
        let continued = self.current.as_ref().and_then(|(keys, g)| {
            let same = columns
                .iter()
                .zip(keys.iter())
                .all(|(c, k)| c.raw(0) == k.as_deref());
            same.then_some(*g)
        });
        let mut group = match continued {
            Some(g) => g,
            None => self.lookup(&columns, 0),
        };
        let mut starts = std::mem::take(&mut self.starts);
        run_starts(&columns, rows, &mut starts);
        // Each run's rows take its group: a fill per run, a lookup per run.
        for &start in &starts {
            self.group_indices.resize(start, group);
            group = self.lookup(&columns, start);
        }
        self.group_indices.resize(rows, group);
        self.starts = starts;
        let last: RowKeys = columns
            .iter()
            .map(|c| c.raw(rows - 1).map(Box::from))
            .collect();
        self.current = Some((last, group));

        let values = evaluate_many(&self.arguments, batch)?;
        let total = self.index.len();
        for (acc, values) in self.accumulators.iter_mut().zip(&values) {
            acc.update_batch(values, &self.group_indices, None, total)?;
        }
        timer.done();
        if self.reservation.try_resize(self.size()).is_err() {
            self.early_emits.add(1);
            return self.emit().map(Some);
        }
        Ok(None)
    }

    /// The group of `row`'s keys, made when new.
    fn lookup(&mut self, columns: &[Keys<'_>], row: usize) -> usize {
        encode(columns, row, &mut self.scratch);
        if let Some(&g) = self.index.get(self.scratch.as_slice()) {
            return g;
        }
        let g = self.index.len();
        self.index.insert(self.scratch.as_slice().into(), g);
        // The key twice (index and builders) and the index's slot.
        self.held += 2 * self.scratch.len() + std::mem::size_of::<(Box<[u8]>, usize)>() + 8;
        for (builder, c) in self.key_values.iter_mut().zip(columns) {
            builder.append_option(c.value(row));
        }
        g
    }

    /// Bytes held: the accumulators (as they report), the keys, their index,
    /// the group indices and the run starts. Not a walk over the groups: this
    /// runs per batch.
    fn size(&self) -> usize {
        let accumulators: usize = self.accumulators.iter().map(|a| a.size()).sum();
        let index_slack =
            (self.index.capacity() - self.index.len()) * std::mem::size_of::<(Box<[u8]>, usize)>();
        accumulators
            + self.held
            + index_slack
            + self.group_indices.capacity() * 8
            + self.starts.capacity() * 8
    }

    /// Every group so far, as the partial aggregate's output in batches of at most
    /// `batch_size` rows; the groups start over.
    fn emit(&mut self) -> Result<Vec<RecordBatch>> {
        let elapsed = self.baseline.elapsed_compute().clone();
        let timer = elapsed.timer();
        if self.index.is_empty() {
            self.reservation.free();
            return Ok(vec![]);
        }
        let mut columns: Vec<ArrayRef> = self
            .key_values
            .iter_mut()
            .map(|b| Arc::new(b.finish()) as ArrayRef)
            .collect();
        for acc in &mut self.accumulators {
            columns.extend(acc.state(EmitTo::All)?);
        }
        let batch = RecordBatch::try_new(Arc::clone(&self.schema), columns)?;
        self.index = HashMap::new();
        self.current = None;
        self.held = 0;
        self.accumulators = accumulators(&self.aggregates)?;
        // The emitted groups stay counted until the next batch is read.
        self.reservation.resize(batch.get_array_memory_size());
        let rows = batch.num_rows();
        let step = self.batch_size.max(1);
        let out: Vec<RecordBatch> = (0..rows)
            .step_by(step)
            .map(|start| batch.slice(start, step.min(rows - start)))
            .collect();
        self.baseline.record_output(rows);
        self.baseline.output_batches().add(out.len());
        timer.done();
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::Float64Array;
    use datafusion::arrow::datatypes::{Field, Float64Type, Int64Type, Schema};
    use datafusion::datasource::memory::MemorySourceConfig;
    use datafusion::execution::memory_pool::GreedyMemoryPool;
    use datafusion::execution::runtime_env::RuntimeEnvBuilder;
    use datafusion::functions_aggregate::count::count_udaf;
    use datafusion::functions_aggregate::sum::sum_udaf;
    use datafusion::physical_expr::aggregate::AggregateExprBuilder;
    use datafusion::physical_plan::aggregates::PhysicalGroupBy;
    use datafusion::physical_plan::expressions::col;
    use std::collections::BTreeMap;

    const SERIES: usize = 2_000;
    const RUN: usize = 10;

    /// Series `s`'s `a`: short, or longer than a string view holds inside
    /// itself, of one length and first bytes for every series.
    fn a(s: usize, long: bool) -> String {
        match long {
            false => format!("a{s}"),
            true => format!("a-series-with-a-long-name-{s:05}"),
        }
    }

    /// Run starts found a block at a time are those of a row-by-row walk: runs
    /// shorter and longer than a block, changes on block edges, in one column or
    /// in the other, views short and long, with and without nulls.
    #[test]
    fn run_starts_are_the_rows_whose_keys_change() {
        let lengths = [1, 2, 15, 16, 17, 31, 32, 33, 1, 64, 65, 100, 3, 450, 32, 1];
        let mut a = Vec::new();
        let mut b = Vec::new();
        for (i, &n) in lengths.iter().enumerate() {
            for r in 0..n {
                a.push(Some(format!("device-with-a-long-name-{:03}", i / 2)));
                // `b` changes inside some of `a`'s runs, and is null in others.
                b.push(match (i % 3, r < n / 2) {
                    (0, _) => None,
                    (1, first) => Some(format!("d{first}")),
                    _ => Some(format!("d{i}")),
                });
            }
        }
        let rows = a.len();
        let a = StringViewArray::from_iter(a.iter().map(|v| v.as_deref()));
        let b_plain = StringArray::from_iter(b.iter().map(|v| v.as_deref()));
        let b_views = StringViewArray::from_iter(b.iter().map(|v| v.as_deref()));
        let a_dense =
            StringViewArray::from_iter_values((0..rows).map(|r| format!("x{}", r / 7 % 3)));
        let cases: Vec<Vec<Keys<'_>>> = vec![
            vec![Keys::Views(&a)],
            vec![Keys::Views(&a), Keys::Plain(&b_plain)],
            vec![Keys::Views(&a), Keys::Views(&b_views)],
            vec![Keys::Views(&b_views), Keys::Views(&a_dense)],
        ];
        for columns in cases {
            let naive: Vec<usize> = (1..rows)
                .filter(|&r| columns.iter().any(|c| !c.same(r - 1, r)))
                .collect();
            let mut starts = vec![7];
            run_starts(&columns, rows, &mut starts);
            assert_eq!(starts, naive);
            assert!(!naive.is_empty());
        }
    }

    /// Every series (`a`, `b`: null, empty or text) twice over, in runs of half
    /// of `RUN` rows, value the series number, in batches of 997 rows (so runs
    /// straddle batches).
    fn input(long: bool) -> (SchemaRef, Arc<dyn ExecutionPlan>) {
        let schema = Arc::new(Schema::new(vec![
            Field::new("a", DataType::Utf8, false),
            Field::new("b", DataType::Utf8, true),
            Field::new("v", DataType::Float64, false),
        ]));
        let b = |s: usize| match s % 3 {
            0 => None,
            1 => Some(String::new()),
            _ => Some(format!("b{}", s % 7)),
        };
        let rows: Vec<usize> = (0..2)
            .flat_map(|_| (0..SERIES).flat_map(|s| std::iter::repeat_n(s, RUN / 2)))
            .collect();
        let batches = rows
            .chunks(997)
            .map(|chunk| {
                RecordBatch::try_new(
                    Arc::clone(&schema),
                    vec![
                        Arc::new(StringArray::from_iter_values(
                            chunk.iter().map(|&s| a(s, long)),
                        )),
                        Arc::new(StringArray::from_iter(chunk.iter().map(|&s| b(s)))),
                        Arc::new(Float64Array::from_iter_values(
                            chunk.iter().map(|&s| s as f64),
                        )),
                    ],
                )
                .unwrap()
            })
            .collect();
        let plan = MemorySourceConfig::try_new_exec(&[batches], Arc::clone(&schema), None).unwrap();
        (schema, plan)
    }

    /// The partial stage's output rows, merged by key: (count, sum) per series.
    async fn run(
        pool_bytes: usize,
        long: bool,
        views: bool,
    ) -> (usize, usize, BTreeMap<(String, Option<String>), (i64, f64)>) {
        let (schema, plan) = input(long);
        let group_by = PhysicalGroupBy::new_single(vec![
            (col("a", &schema).unwrap(), "a".to_owned()),
            (col("b", &schema).unwrap(), "b".to_owned()),
        ]);
        let aggregate = |udaf, name: &str| {
            Arc::new(
                AggregateExprBuilder::new(udaf, vec![col("v", &schema).unwrap()])
                    .schema(Arc::clone(&schema))
                    .alias(name)
                    .build()
                    .unwrap(),
            )
        };
        let agg = AggregateExec::try_new(
            AggregateMode::Partial,
            group_by,
            vec![aggregate(count_udaf(), "n"), aggregate(sum_udaf(), "total")],
            vec![None, None],
            plan,
            Arc::clone(&schema),
        )
        .unwrap();
        let mut exec = RunAggregateExec::new(Arc::new(agg));
        if views {
            // The keys as a table scan gives them when it decodes views.
            let names = vec!["a".to_owned(), "b".to_owned()];
            exec.input = crate::string_views::cast(&exec.input, &names).unwrap();
            assert_eq!(
                exec.input.schema().field(0).data_type(),
                &DataType::Utf8View
            );
            exec.views = names;
        }
        let exec = Arc::new(exec);
        let runtime = RuntimeEnvBuilder::new()
            .with_memory_pool(Arc::new(GreedyMemoryPool::new(pool_bytes)))
            .build_arc()
            .unwrap();
        let ctx = Arc::new(TaskContext::default().with_runtime(runtime));
        let batches: Vec<RecordBatch> = exec.execute(0, ctx).unwrap().try_collect().await.unwrap();
        let mut merged = BTreeMap::new();
        let mut rows = 0;
        for batch in &batches {
            assert_eq!(batch.schema(), exec.schema());
            let a = batch.column(0).as_string::<i32>();
            let b = batch.column(1).as_string::<i32>();
            let n = batch.column(2).as_primitive::<Int64Type>();
            let total = batch.column(3).as_primitive::<Float64Type>();
            for r in 0..batch.num_rows() {
                let key = (
                    a.value(r).to_owned(),
                    b.is_valid(r).then(|| b.value(r).to_owned()),
                );
                let e = merged.entry(key).or_insert((0, 0.0));
                e.0 += n.value(r);
                e.1 += total.value(r);
                rows += 1;
            }
        }
        let early = exec
            .metrics()
            .unwrap()
            .sum_by_name("early_emits")
            .map_or(0, |m| m.as_usize());
        (rows, early, merged)
    }

    fn want(long: bool) -> BTreeMap<(String, Option<String>), (i64, f64)> {
        (0..SERIES)
            .map(|s| {
                let b = match s % 3 {
                    0 => None,
                    1 => Some(String::new()),
                    _ => Some(format!("b{}", s % 7)),
                };
                ((a(s, long), b), (RUN as i64, (s * RUN) as f64))
            })
            .collect()
    }

    #[tokio::test]
    async fn runs_give_each_group_once_with_room() {
        for (long, views) in [(false, false), (false, true), (true, false), (true, true)] {
            let (rows, early, merged) = run(64 << 20, long, views).await;
            assert_eq!((rows, early), (SERIES, 0), "long {long}, views {views}");
            assert_eq!(merged, want(long), "long {long}, views {views}");
        }
    }

    #[tokio::test]
    async fn a_small_pool_makes_it_give_groups_early_and_start_over() {
        for views in [false, true] {
            let (rows, early, merged) = run(32 << 10, true, views).await;
            assert!(early > 0, "no early emission");
            assert!(rows > SERIES, "{rows} rows");
            assert_eq!(
                merged,
                want(true),
                "the partial rows add up to every group's"
            );
        }
    }
}
