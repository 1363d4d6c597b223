//! Latest reading per device from memory: `SELECT DISTINCT ON (device) ... ORDER BY
//! device, time DESC` reads the series registry (`citytsdb_storage::series`) instead
//! of the table.
//!
//! [`LatestFromCache`], an analyzer rule, finds a `DISTINCT ON` whose every
//! expression is a tag column and whose ordering continues with `time DESC`, over
//! one of our tables through filters that only name tags or put a lower bound on
//! `time`. Each series' latest row is then the only candidate its series can
//! contribute, so the table scan under the `DISTINCT ON` is swapped for a
//! [`LatestTable`] scan of one row per series; the filters and everything above
//! stay as they are and give the same answer.
//!
//! When the ordering is exactly the `ON` keys then `time DESC` (the usual
//! "latest of every device"), the `DISTINCT ON` itself is replaced as well:
//! DataFusion plans it as an ordered `first_value` aggregate per column, which
//! costs tens of milliseconds for 10^4 series. A [`LatestPerKey`] node keeps, for
//! each `ON` key, the row with the greatest time (a hash map over the few cached
//! rows), and a sort and the select list finish the query.

use std::collections::HashSet;
use std::fmt;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use citytsdb_storage::schema::TIME_COLUMN;
use citytsdb_storage::{ColumnKind, Engine, TableSchema};
use datafusion::arrow::array::{Array, ArrayData, AsArray, RecordBatch, UInt64Array};
use datafusion::arrow::compute::take_record_batch;
use datafusion::arrow::compute::SortOptions;
use datafusion::arrow::datatypes::{SchemaRef, TimestampNanosecondType};
use datafusion::arrow::row::{RowConverter, SortField};
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{exec_err, plan_err, Column, DFSchemaRef, Result};
use datafusion::datasource::provider_as_source;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::physical_planning_context::PhysicalPlanningContext;
use datafusion::logical_expr::utils::split_conjunction;
use datafusion::logical_expr::{
    BinaryExpr, Distinct, DistinctOn, Expr, Extension, LogicalPlan, LogicalPlanBuilder, Operator,
    Projection, TableProviderFilterPushDown, TableScan, TableScanBuilder, TableType,
    UserDefinedLogicalNode, UserDefinedLogicalNodeCore,
};
use datafusion::optimizer::AnalyzerRule;
use datafusion::physical_expr::expressions::Column as PhysicalColumn;
use datafusion::physical_expr::EquivalenceProperties;
use datafusion::physical_expr::{PhysicalExpr, PhysicalSortExpr};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, Partitioning, PlanProperties,
    ReplaceChildrenOptions,
};
use datafusion::physical_planner::{ExtensionPlanner, PhysicalPlanner};

use crate::collect::{CollectExec, Transform};
use crate::exec::{external, CityScanExec, ScanReport};

/// The analyzer rule that answers latest-per-series queries from memory.
pub struct LatestFromCache {
    storage: Engine,
    db: String,
    /// The database's tables and their schemas, as the query's snapshot has them.
    tables: Vec<(String, Arc<TableSchema>)>,
    /// Catalog and schema names a reference to one of our tables may carry.
    catalog: String,
}

impl fmt::Debug for LatestFromCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LatestFromCache")
            .field("db", &self.db)
            .finish()
    }
}

impl LatestFromCache {
    /// The rule for one query over `db`, whose tables live in catalog `catalog`'s
    /// `public` schema.
    pub fn new(
        storage: Engine,
        db: &str,
        tables: Vec<(String, Arc<TableSchema>)>,
        catalog: &str,
    ) -> Self {
        Self {
            storage,
            db: db.to_string(),
            tables,
            catalog: catalog.to_string(),
        }
    }

    fn table_of(&self, scan: &TableScan) -> Option<&(String, Arc<TableSchema>)> {
        let r = &scan.table_name;
        if r.schema().is_some_and(|s| s != "public")
            || r.catalog().is_some_and(|c| c != self.catalog)
        {
            return None;
        }
        self.tables.iter().find(|(name, _)| name == r.table())
    }

    /// The table the `DISTINCT ON` can read from the registry, if it can.
    fn cacheable(&self, on: &DistinctOn) -> Option<String> {
        let sort = on.sort_expr.as_ref()?;
        let k = on.on_expr.len();
        let next = sort.get(k)?;
        if next.asc || !matches!(&next.expr, Expr::Column(c) if c.name == TIME_COLUMN) {
            return None;
        }
        let mut plan = on.input.as_ref();
        let mut conjuncts: Vec<&Expr> = Vec::new();
        let (table, schema) = loop {
            match plan {
                LogicalPlan::Filter(f) => {
                    conjuncts.extend(split_conjunction(&f.predicate));
                    plan = f.input.as_ref();
                }
                LogicalPlan::SubqueryAlias(a) => plan = a.input.as_ref(),
                LogicalPlan::TableScan(scan) => {
                    if !scan.filters.is_empty() || scan.fetch.is_some() {
                        return None;
                    }
                    break self.table_of(scan)?;
                }
                _ => return None,
            }
        };
        let is_tag = |e: &Expr| matches!(e, Expr::Column(c) if schema.kind(&c.name) == Some(ColumnKind::Tag));
        if !on.on_expr.iter().all(is_tag) || !sort[..k].iter().all(|s| is_tag(&s.expr)) {
            return None;
        }
        let tags_only = |e: &Expr| {
            e.column_refs()
                .iter()
                .all(|c| schema.kind(&c.name) == Some(ColumnKind::Tag))
        };
        if conjuncts
            .iter()
            .all(|c| !c.is_volatile() && (tags_only(c) || time_lower_bound(c)))
        {
            Some(table.clone())
        } else {
            None
        }
    }

    fn swap_scan(&self, plan: LogicalPlan, table: &str) -> Result<Transformed<LogicalPlan>> {
        plan.transform_up(|node| match node {
            LogicalPlan::TableScan(scan) if scan.table_name.table() == table => {
                let Some((_, schema)) = self.table_of(&scan) else {
                    return Ok(Transformed::no(LogicalPlan::TableScan(scan)));
                };
                let provider = LatestTable {
                    storage: self.storage.clone(),
                    db: self.db.clone(),
                    table: table.to_string(),
                    arrow: schema.arrow_schema(),
                };
                let scan =
                    TableScanBuilder::new(scan.table_name, provider_as_source(Arc::new(provider)))
                        .with_projection(scan.projection)
                        .with_filters(scan.filters)
                        .with_fetch(scan.fetch)
                        .build()?;
                Ok(Transformed::yes(LogicalPlan::TableScan(scan)))
            }
            other => Ok(Transformed::no(other)),
        })
    }
}

/// `DISTINCT ON (k...) ... ORDER BY k..., time DESC` over at most one row per
/// series, as [`LatestPerKey`] under a sort and the select list (the sort has
/// nothing left to do: [`LatestPerKeyExec`] answers in its order, and the
/// physical optimizer removes it); any other
/// ordering (a tie-break after `time`) stays a `DISTINCT ON`.
fn without_distinct_on(on: DistinctOn) -> Result<LogicalPlan> {
    let k = on.on_expr.len();
    let keys: Option<Vec<Column>> = on
        .on_expr
        .iter()
        .map(|e| match e {
            Expr::Column(c) => Some(c.clone()),
            _ => None,
        })
        .collect();
    let time = match on.sort_expr.as_deref() {
        Some(sort) if sort.len() == k + 1 => match &sort[k].expr {
            Expr::Column(c) => Some((c.clone(), sort[k].nulls_first)),
            _ => None,
        },
        _ => None,
    };
    let (Some(keys), Some((time, nulls_first)), Some(sort)) = (keys, time, on.sort_expr.clone())
    else {
        return Ok(LogicalPlan::Distinct(Distinct::On(on)));
    };
    let key_order = sort[..k].iter().map(|s| (s.asc, s.nulls_first)).collect();
    let latest = LogicalPlan::Extension(Extension {
        node: Arc::new(LatestPerKey {
            input: on.input.clone(),
            keys,
            key_order,
            time,
            nulls_first,
        }),
    });
    let sorted = LogicalPlanBuilder::from(latest).sort(sort)?.build()?;
    Ok(LogicalPlan::Projection(Projection::try_new(
        on.select_expr,
        Arc::new(sorted),
    )?))
}

/// For each distinct value of `keys`, the input row with the greatest `time` (a
/// null time counts as the greatest when `nulls_first`, as `ORDER BY time DESC`
/// has it). Its input holds at most one row per series, so this runs in memory.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd)]
pub struct LatestPerKey {
    input: Arc<LogicalPlan>,
    keys: Vec<Column>,
    /// Each key's order in the answer: (ascending, nulls first).
    key_order: Vec<(bool, bool)>,
    time: Column,
    nulls_first: bool,
}

impl UserDefinedLogicalNodeCore for LatestPerKey {
    fn name(&self) -> &str {
        "LatestPerKey"
    }

    fn inputs(&self) -> Vec<&LogicalPlan> {
        vec![self.input.as_ref()]
    }

    fn schema(&self) -> &DFSchemaRef {
        self.input.schema()
    }

    fn expressions(&self) -> Vec<Expr> {
        Vec::new()
    }

    fn prevent_predicate_push_down_columns(&self) -> HashSet<String> {
        // A filter above picks among the latest rows; below, it would change which
        // row is the latest.
        self.input
            .schema()
            .columns()
            .into_iter()
            .map(|c| c.flat_name())
            .chain(
                self.input
                    .schema()
                    .fields()
                    .iter()
                    .map(|f| f.name().clone()),
            )
            .collect()
    }

    fn fmt_for_explain(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "LatestPerKey: keys=[{}] time={}",
            self.keys
                .iter()
                .map(|c| c.flat_name())
                .collect::<Vec<_>>()
                .join(", "),
            self.time.flat_name()
        )
    }

    fn with_exprs_and_inputs(
        &self,
        _exprs: Vec<Expr>,
        mut inputs: Vec<LogicalPlan>,
    ) -> Result<Self> {
        let Some(input) = inputs.pop() else {
            return plan_err!("LatestPerKey takes one input");
        };
        Ok(Self {
            input: Arc::new(input),
            ..self.clone()
        })
    }
}

/// Plans [`LatestPerKey`] nodes as [`LatestPerKeyExec`].
#[derive(Debug)]
pub(crate) struct LatestPlanner;

#[async_trait]
impl ExtensionPlanner for LatestPlanner {
    async fn plan_extension(
        &self,
        _planner: &dyn PhysicalPlanner,
        node: &dyn UserDefinedLogicalNode,
        logical_inputs: &[&LogicalPlan],
        physical_inputs: &[Arc<dyn ExecutionPlan>],
        _session: &dyn Session,
        _planning_ctx: &PhysicalPlanningContext,
    ) -> Result<Option<Arc<dyn ExecutionPlan>>> {
        let Some(latest) = node.as_any().downcast_ref::<LatestPerKey>() else {
            return Ok(None);
        };
        let ([logical], [input]) = (logical_inputs, physical_inputs) else {
            return plan_err!("LatestPerKey takes one input");
        };
        let schema = logical.schema();
        let spec = KeySpec {
            keys: latest
                .keys
                .iter()
                .zip(&latest.key_order)
                .map(|(c, &(asc, nulls_first))| {
                    let options = SortOptions {
                        descending: !asc,
                        nulls_first,
                    };
                    Ok((schema.index_of_column(c)?, options))
                })
                .collect::<Result<_>>()?,
            time: schema.index_of_column(&latest.time)?,
            nulls_first: latest.nulls_first,
            memo: reads_only_latest_rows(input).then(Default::default),
        };
        Ok(Some(Arc::new(LatestPerKeyExec::new(input.clone(), spec))))
    }
}

/// What [`LatestPerKeyExec`] does, by input column index.
#[derive(Debug, Clone)]
pub struct KeySpec {
    /// The key columns and the order the answer is in.
    keys: Vec<(usize, SortOptions)>,
    time: usize,
    nulls_first: bool,
    /// Where the input is the series registry's latest rows: the last answer.
    memo: Option<Arc<Memo>>,
}

/// Whether every source under `plan` is the series registry's latest rows.
fn reads_only_latest_rows(plan: &Arc<dyn ExecutionPlan>) -> bool {
    let children = plan.children();
    match children.is_empty() {
        true => plan.downcast_ref::<LatestRowsExec>().is_some(),
        false => children.into_iter().all(reads_only_latest_rows),
    }
}

/// The last answer of a [`LatestPerKeyExec`] over the series registry, and the
/// input it came from. The registry hands out the same arrays until its series
/// change (`SeriesTable::rows`), so a plan run again between writes (the plan
/// cache keeps such plans whole) answers without another pass over every series:
/// the inputs are compared by their buffers' addresses, which stay taken while the
/// memo holds them. It holds no more than the registry's own rows and one answer.
#[derive(Default)]
pub struct Memo {
    last: Mutex<Option<(Vec<ArrayData>, RecordBatch)>>,
    /// Answers given from the memo.
    hits: std::sync::atomic::AtomicU64,
}

impl Memo {
    fn get(&self, input: &RecordBatch) -> Option<RecordBatch> {
        let last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let (seen, answer) = last.as_ref()?;
        let same = seen.len() == input.num_columns()
            && seen
                .iter()
                .zip(input.columns())
                .all(|(a, b)| a.ptr_eq(&b.to_data()));
        if same {
            self.hits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        same.then(|| answer.clone())
    }

    fn set(&self, input: &RecordBatch, answer: &RecordBatch) {
        let seen = input.columns().iter().map(|c| c.to_data()).collect();
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some((seen, answer.clone()));
    }
}

impl fmt::Debug for Memo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Memo")
    }
}

/// Runs [`LatestPerKey`]: collects its (small) input and keeps the latest row of
/// each key, in the order of the keys.
pub type LatestPerKeyExec = CollectExec<KeySpec>;

impl Transform for KeySpec {
    const NAME: &'static str = "LatestPerKeyExec";

    fn schema(&self, input: &SchemaRef) -> SchemaRef {
        input.clone()
    }

    fn describe(&self, input: &SchemaRef, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = |i: usize| input.field(i).name().clone();
        write!(
            f,
            "keys=[{}] time={}",
            self.keys
                .iter()
                .map(|&(i, _)| name(i))
                .collect::<Vec<_>>()
                .join(", "),
            name(self.time)
        )?;
        // The answer is kept for the next run over the same registry rows.
        if self.memo.is_some() {
            f.write_str(" memo=registry")?;
        }
        Ok(())
    }

    fn apply(&self, input: &RecordBatch) -> Result<RecordBatch> {
        let Some(memo) = &self.memo else {
            return latest_per_key(input, self);
        };
        if let Some(answer) = memo.get(input) {
            return Ok(answer);
        }
        let answer = latest_per_key(input, self)?;
        memo.set(input, &answer);
        Ok(answer)
    }

    fn ordering(&self, input: &SchemaRef) -> Vec<PhysicalSortExpr> {
        // One row per key: in key order is also in (key, time) order.
        let column = |i: usize| -> Arc<dyn PhysicalExpr> {
            Arc::new(PhysicalColumn::new(input.field(i).name(), i))
        };
        let time = SortOptions {
            descending: true,
            nulls_first: self.nulls_first,
        };
        self.keys
            .iter()
            .map(|&(i, options)| PhysicalSortExpr::new(column(i), options))
            .chain([PhysicalSortExpr::new(column(self.time), time)])
            .collect()
    }
}

/// The rows of `batch` that are the latest of their key, in the order of the keys.
fn latest_per_key(batch: &RecordBatch, spec: &KeySpec) -> Result<RecordBatch> {
    let schema = batch.schema();
    // Rows of the keys compare as the answer orders them.
    let converter = RowConverter::new(
        spec.keys
            .iter()
            .map(|&(i, options)| {
                SortField::new_with_options(schema.field(i).data_type().clone(), options)
            })
            .collect(),
    )?;
    let keys = converter.convert_columns(
        &spec
            .keys
            .iter()
            .map(|&(i, _)| batch.column(i).clone())
            .collect::<Vec<_>>(),
    )?;
    let Some(times) = batch
        .column(spec.time)
        .as_primitive_opt::<TimestampNanosecondType>()
    else {
        return exec_err!(
            "LatestPerKeyExec: column {} is not a nanosecond timestamp",
            schema.field(spec.time).name()
        );
    };
    // Nulls compare as later than every time when they sort first.
    let later = |a: usize, b: usize| match (times.is_null(a), times.is_null(b)) {
        (false, false) => times.value(a) > times.value(b),
        (true, false) => spec.nulls_first,
        (false, true) => !spec.nulls_first,
        (true, true) => false,
    };
    let n = batch.num_rows();
    // Every row by its key, equal keys side by side in the order they came. Rows
    // compare first by their key's leading 16 bytes as one number, which is far
    // cheaper than comparing the rows and, for tag values, mostly decides; then
    // whole; then by position. A sort, not a hash map: the answer is wanted in
    // key order anyway.
    let mut order: Vec<(u128, usize)> = (0..n)
        .map(|i| (leading_16(keys.row(i).data()), i))
        .collect();
    order.sort_unstable_by(|a, b| {
        a.0.cmp(&b.0)
            .then_with(|| keys.row(a.1).cmp(&keys.row(b.1)))
            .then(a.1.cmp(&b.1))
    });
    let same = |a: (u128, usize), b: (u128, usize)| a.0 == b.0 && keys.row(a.1) == keys.row(b.1);
    let mut picks = Vec::new();
    let mut start = 0;
    while start < n {
        let (mut pick, mut i) = (order[start].1, start + 1);
        while i < n && same(order[i], order[start]) {
            if later(order[i].1, pick) {
                pick = order[i].1;
            }
            i += 1;
        }
        picks.push(pick as u64);
        start = i;
    }
    let rows = UInt64Array::from(picks);
    Ok(take_record_batch(batch, &rows)?)
}

/// The first 16 bytes of `bytes` (zeros past its end) as one number, which orders
/// byte strings as they compare, except that it cannot tell apart those equal in
/// their first 16 bytes: a sort key to try before the whole strings.
pub(crate) fn leading_16(bytes: &[u8]) -> u128 {
    let mut head = [0u8; 16];
    let len = bytes.len().min(16);
    head[..len].copy_from_slice(&bytes[..len]);
    u128::from_be_bytes(head)
}

/// `time > x` or `time >= x` (either way round) with `x` free of columns: a series
/// has a matching row exactly when its latest row matches.
fn time_lower_bound(e: &Expr) -> bool {
    let Expr::BinaryExpr(BinaryExpr { left, op, right }) = e else {
        return false;
    };
    let is_time = |e: &Expr| matches!(e, Expr::Column(c) if c.name == TIME_COLUMN);
    let constant = |e: &Expr| e.column_refs().is_empty();
    match op {
        Operator::Gt | Operator::GtEq => is_time(left) && constant(right),
        Operator::Lt | Operator::LtEq => constant(left) && is_time(right),
        _ => false,
    }
}

impl AnalyzerRule for LatestFromCache {
    fn analyze(&self, plan: LogicalPlan, _config: &ConfigOptions) -> Result<LogicalPlan> {
        plan.transform_down(|node| {
            let table = match &node {
                LogicalPlan::Distinct(Distinct::On(on)) => self.cacheable(on),
                _ => None,
            };
            let Some(table) = table else {
                return Ok(Transformed::no(node));
            };
            let swapped = node.map_children(|child| self.swap_scan(child, &table))?;
            let plan = match swapped.data {
                LogicalPlan::Distinct(Distinct::On(on)) => without_distinct_on(on)?,
                other => other,
            };
            Ok(Transformed::new(plan, true, TreeNodeRecursion::Jump))
        })
        .map(|t| t.data)
    }

    fn name(&self) -> &str {
        "citytsdb_latest_from_cache"
    }
}

/// One row per series: its latest reading, from the series registry.
pub struct LatestTable {
    storage: Engine,
    db: String,
    table: String,
    arrow: SchemaRef,
}

impl fmt::Debug for LatestTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LatestTable")
            .field("table", &self.table)
            .finish()
    }
}

#[async_trait]
impl TableProvider for LatestTable {
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
        // The filters stay above the scan.
        Ok(vec![
            TableProviderFilterPushDown::Unsupported;
            filters.len()
        ])
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let source = Arc::new(LatestRowsExec::new(
            self.storage.clone(),
            self.db.clone(),
            self.table.clone(),
            self.arrow.clone(),
            projection.cloned(),
        )?);
        let report = ScanReport {
            table: self.table.clone(),
            cached_series: Some(
                self.storage
                    .with_series(&self.db, &self.table, |s| s.map_or(0, |s| s.len())),
            ),
            ..Default::default()
        };
        Ok(Arc::new(CityScanExec::new(report, source)))
    }
}

/// A table's latest rows, one per series, read from the series registry when the
/// plan runs (not when it is planned): a plan holding it can run again and again
/// (`plan_cache.rs` keeps such plans whole) and always reads the rows of the moment.
pub struct LatestRowsExec {
    storage: Engine,
    db: String,
    table: String,
    /// The table's columns as the query's snapshot has them.
    arrow: SchemaRef,
    projection: Option<Vec<usize>>,
    properties: Arc<PlanProperties>,
}

impl LatestRowsExec {
    fn new(
        storage: Engine,
        db: String,
        table: String,
        arrow: SchemaRef,
        projection: Option<Vec<usize>>,
    ) -> Result<Self> {
        let schema = match &projection {
            Some(p) => Arc::new(arrow.project(p)?),
            None => arrow.clone(),
        };
        let properties = Arc::new(PlanProperties::new(
            EquivalenceProperties::new(schema),
            Partitioning::UnknownPartitioning(1),
            EmissionType::Incremental,
            Boundedness::Bounded,
        ));
        Ok(Self {
            storage,
            db,
            table,
            arrow,
            projection,
            properties,
        })
    }

    /// The latest rows now, in the snapshot's columns, projected.
    fn rows(&self) -> Result<RecordBatch> {
        let rows = match self.storage.series_rows(&self.db, &self.table) {
            Some(r) => r.map_err(external)?,
            None => citytsdb_storage::series::SeriesTable::default()
                .rows(
                    &TableSchema::from_arrow(&self.arrow)
                        .map_err(|e| external(citytsdb_storage::StorageError::Internal(e)))?,
                )
                .map_err(external)?,
        };
        // The registry may know columns added after the query's snapshot: keep the
        // snapshot's, in its order.
        let latest = rows.latest.schema();
        let wanted: Vec<usize> = match &self.projection {
            Some(p) => p.clone(),
            None => (0..self.arrow.fields().len()).collect(),
        };
        let mut keep = Vec::with_capacity(wanted.len());
        for i in wanted {
            let f = self.arrow.field(i);
            match latest.index_of(f.name()) {
                Ok(at) => keep.push(at),
                Err(_) => {
                    return exec_err!(
                        "the series registry of {} has no column {}",
                        self.table,
                        f.name()
                    )
                }
            }
        }
        let batch = rows.latest.project(&keep)?;
        Ok(RecordBatch::try_new(
            self.schema(),
            batch.columns().to_vec(),
        )?)
    }
}

impl fmt::Debug for LatestRowsExec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LatestRowsExec")
            .field("db", &self.db)
            .field("table", &self.table)
            .field("projection", &self.projection)
            .finish()
    }
}

impl DisplayAs for LatestRowsExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LatestRowsExec: table={}", self.table)
    }
}

impl ExecutionPlan for LatestRowsExec {
    fn name(&self) -> &str {
        "LatestRowsExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        Vec::new()
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
        if !children.is_empty() {
            return plan_err!("LatestRowsExec has no inputs");
        }
        Ok(self)
    }

    crate::exec::with_new_children_by_replace!();

    fn execute(
        &self,
        partition: usize,
        _context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        if partition != 0 {
            return exec_err!("LatestRowsExec has one partition, asked for {partition}");
        }
        let batch = self.rows()?;
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            self.schema(),
            futures::stream::once(async move { Ok(batch) }),
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{StringArray, TimestampNanosecondArray};
    use datafusion::arrow::datatypes::{DataType, Field, Schema, TimeUnit};

    fn batch() -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("device", DataType::Utf8, true),
            Field::new(
                "time",
                DataType::Timestamp(TimeUnit::Nanosecond, Some("UTC".into())),
                true,
            ),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(vec![
                    Some("a"),
                    Some("b"),
                    Some("a"),
                    Some("b"),
                    None,
                    Some("c"),
                    None,
                ])),
                Arc::new(
                    TimestampNanosecondArray::from(vec![
                        Some(10),
                        Some(5),
                        Some(20),
                        Some(5),
                        Some(1),
                        None,
                        Some(2),
                    ])
                    .with_timezone("UTC"),
                ),
            ],
        )
        .unwrap()
    }

    fn kept_in(nulls_first: bool, key_order: SortOptions) -> Vec<(Option<String>, Option<i64>)> {
        let spec = KeySpec {
            keys: vec![(0, key_order)],
            time: 1,
            nulls_first,
            memo: None,
        };
        let out = latest_per_key(&batch(), &spec).unwrap();
        let devices = out.column(0).as_string::<i32>();
        let times = out.column(1).as_primitive::<TimestampNanosecondType>();
        (0..out.num_rows())
            .map(|i| {
                (
                    devices.is_valid(i).then(|| devices.value(i).to_string()),
                    times.is_valid(i).then(|| times.value(i)),
                )
            })
            .collect()
    }

    fn kept(nulls_first: bool) -> Vec<(Option<String>, Option<i64>)> {
        kept_in(nulls_first, SortOptions::default())
    }

    #[test]
    fn rows_already_in_key_order_keep_the_same_rows() {
        // The same rows in key order (as the registry usually holds them) take the
        // linear path and must keep what the map keeps.
        let b = batch();
        for order in [
            SortOptions::default(),
            SortOptions {
                descending: true,
                nulls_first: false,
            },
        ] {
            let by_key =
                datafusion::arrow::compute::sort_to_indices(b.column(0), Some(order), None)
                    .unwrap();
            let sorted = take_record_batch(&b, &by_key).unwrap();
            for nulls_first in [true, false] {
                let spec = KeySpec {
                    keys: vec![(0, order)],
                    time: 1,
                    nulls_first,
                    memo: None,
                };
                assert_eq!(
                    latest_per_key(&sorted, &spec).unwrap(),
                    latest_per_key(&b, &spec).unwrap(),
                    "key order {order:?}, nulls first {nulls_first}"
                );
            }
        }
    }

    #[test]
    fn the_memo_answers_again_only_for_the_same_arrays() {
        let memo = Arc::new(Memo::default());
        let spec = KeySpec {
            keys: vec![(0, SortOptions::default())],
            time: 1,
            nulls_first: false,
            memo: Some(memo.clone()),
        };
        let hits = || memo.hits.load(std::sync::atomic::Ordering::Relaxed);
        let b = batch();
        let expected = latest_per_key(&b, &spec).unwrap();
        assert_eq!(spec.apply(&b).unwrap(), expected);
        assert_eq!(hits(), 0);
        // The same arrays, in a batch of their own: the memo's answer.
        let again = RecordBatch::try_new(b.schema(), b.columns().to_vec()).unwrap();
        assert_eq!(spec.apply(&again).unwrap(), expected);
        assert_eq!(hits(), 1);
        // Equal values in other buffers, a shorter slice of the same buffers and
        // other values: each computed afresh.
        let deep = RecordBatch::try_new(
            b.schema(),
            b.columns()
                .iter()
                .map(|c| {
                    // Two arrays concatenate into new buffers.
                    let none = c.slice(0, 0);
                    datafusion::arrow::compute::concat(&[c.as_ref(), none.as_ref()]).unwrap()
                })
                .collect(),
        )
        .unwrap();
        assert_eq!(spec.apply(&deep).unwrap(), expected);
        assert_eq!(hits(), 1);
        let shorter = b.slice(0, 4);
        assert_eq!(
            spec.apply(&shorter).unwrap(),
            latest_per_key(&shorter, &spec).unwrap()
        );
        assert_eq!(hits(), 1);
        let later = RecordBatch::try_new(
            b.schema(),
            vec![
                b.column(0).clone(),
                Arc::new(
                    TimestampNanosecondArray::from(vec![
                        Some(10),
                        Some(50),
                        Some(20),
                        Some(5),
                        Some(1),
                        None,
                        Some(2),
                    ])
                    .with_timezone("UTC"),
                ),
            ],
        )
        .unwrap();
        let answer = spec.apply(&later).unwrap();
        assert_eq!(answer, latest_per_key(&later, &spec).unwrap());
        assert_ne!(answer, expected);
        // And the newest input is the one remembered.
        assert_eq!(spec.apply(&later).unwrap(), answer);
        assert_eq!(hits(), 2);
    }

    #[test]
    fn keeps_the_latest_row_of_each_key_in_key_order() {
        let s = |d: &str| Some(d.to_string());
        // A null key is a key of its own.
        assert_eq!(
            kept(true),
            vec![
                (None, Some(2)),
                (s("a"), Some(20)),
                (s("b"), Some(5)),
                (s("c"), None),
            ]
        );
        let descending = SortOptions {
            descending: true,
            nulls_first: false,
        };
        assert_eq!(
            kept_in(true, descending),
            vec![
                (s("c"), None),
                (s("b"), Some(5)),
                (s("a"), Some(20)),
                (None, Some(2)),
            ]
        );
    }

    #[test]
    fn a_null_time_is_the_latest_only_when_nulls_sort_first() {
        let c = kept(false)
            .into_iter()
            .find(|(d, _)| d.as_deref() == Some("c"));
        // The only row of `c` is kept either way.
        assert_eq!(c, Some((Some("c".to_string()), None)));
        let spec = KeySpec {
            keys: vec![(0, SortOptions::default())],
            time: 1,
            nulls_first: false,
            memo: None,
        };
        let b = batch().slice(4, 3);
        // Keys: null (t=1), c (null), null (t=2): the null key keeps t=2 either way.
        let out = latest_per_key(&b, &spec).unwrap();
        assert_eq!(out.num_rows(), 2);
    }

    #[test]
    fn keys_alike_in_their_first_bytes_stay_apart() {
        // Keys longer than the 16 bytes compared as a number, sharing them, and
        // keys that are prefixes of others: against a plain map, in pseudo-random
        // order with repeated and null times.
        let names = [
            Some("zhengzhou-jinshui-mh-000001"),
            Some("zhengzhou-jinshui-mh-000002"),
            Some("zhengzhou-jinshui-mh-00000"),
            Some("zhengzhou-jinshui"),
            Some("zhengzhou-jinshui-mh-000001\u{0}"),
            Some(""),
            Some("a"),
            None,
        ];
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut devices = Vec::new();
        let mut times = Vec::new();
        for _ in 0..500 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            devices.push(names[(x % names.len() as u64) as usize]);
            times.push((!x.is_multiple_of(7)).then_some((x >> 20) as i64 % 50));
        }
        let mut expected: std::collections::BTreeMap<Option<&str>, Option<i64>> =
            Default::default();
        for (d, t) in devices.iter().zip(&times) {
            let e = expected.entry(*d).or_insert(*t);
            // Nulls last: a null time is the latest only of a key with no other.
            if t.is_some() && (e.is_none() || t > e) {
                *e = *t;
            }
        }
        let batch = RecordBatch::try_from_iter(vec![
            (
                "device",
                Arc::new(StringArray::from(devices)) as Arc<dyn Array>,
            ),
            (
                "time",
                Arc::new(TimestampNanosecondArray::from(times)) as Arc<dyn Array>,
            ),
        ])
        .unwrap();
        let spec = KeySpec {
            keys: vec![(0, SortOptions::default())],
            time: 1,
            nulls_first: false,
            memo: None,
        };
        let out = latest_per_key(&batch, &spec).unwrap();
        let d = out.column(0).as_string::<i32>();
        let t = out.column(1).as_primitive::<TimestampNanosecondType>();
        let got: Vec<(Option<&str>, Option<i64>)> = (0..out.num_rows())
            .map(|i| {
                (
                    d.is_valid(i).then(|| d.value(i)),
                    t.is_valid(i).then(|| t.value(i)),
                )
            })
            .collect();
        // BTreeMap orders None first, as the default sort options do.
        assert_eq!(got, expected.into_iter().collect::<Vec<_>>());
    }
}
