//! Gap filling: `date_bin_gapfill(stride, time [, origin])` in `GROUP BY` makes a
//! row for every bucket of the query's `WHERE time` range, for every group; in
//! the select list `locf(agg)` carries the last non-null value forward into
//! buckets without one and `interpolate(agg)` fills them on the straight line
//! between the nearest non-null values before and after (by bucket time).
//!
//! ```sql
//! SELECT date_bin_gapfill(INTERVAL '5 minutes', time) AS bucket, device,
//!        locf(avg(water_level_cm)) AS level
//! FROM manhole
//! WHERE time >= '2025-12-01T00:00:00Z' AND time < '2025-12-01T06:00:00Z'
//! GROUP BY bucket, device
//! ```
//!
//! 1. The three functions are registered as scalar functions so that SQL naming
//!    them plans; they never run.
//! 2. [`GapFillRule`] (an analyzer rule) finds an aggregation grouped by
//!    `date_bin_gapfill`, turns that into DataFusion's `date_bin`, reads the time
//!    range from the filters below, takes `locf`/`interpolate` off the select list,
//!    and puts a [`GapFill`] node between the aggregation and the select list.
//! 3. [`GapFillExec`] sorts the aggregated rows by group and bucket and writes the
//!    filled rows.

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, Float64Array, RecordBatch, TimestampNanosecondArray, UInt64Array,
};
use datafusion::arrow::compute::{cast, lexsort_to_indices, take, SortColumn};
use datafusion::arrow::datatypes::{DataType, Schema, SchemaRef, TimeUnit};
use datafusion::catalog::Session;
use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{plan_err, DFSchema, DFSchemaRef, DataFusionError, Result, ScalarValue};
use datafusion::execution::context::QueryPlanner;
use datafusion::functions::datetime::date_bin;
use datafusion::logical_expr::expr::ScalarFunction;
use datafusion::logical_expr::physical_planning_context::PhysicalPlanningContext;
use datafusion::logical_expr::simplify::SimplifyContext;
use datafusion::logical_expr::utils::split_conjunction;
use datafusion::logical_expr::{
    Aggregate, Between, BinaryExpr, ColumnarValue, Expr, ExprSchemable, Extension, LogicalPlan,
    Operator, Projection, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature,
    UserDefinedLogicalNode, UserDefinedLogicalNodeCore,
};
use datafusion::optimizer::simplify_expressions::ExprSimplifier;
use datafusion::optimizer::AnalyzerRule;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_planner::{DefaultPhysicalPlanner, ExtensionPlanner, PhysicalPlanner};

use crate::collect::{CollectExec, Transform};

/// Most rows one gap fill may produce; past it the query is refused, not run out
/// of memory (a one-second stride over a year would be 31 million rows per group).
const MAX_ROWS: u64 = 10_000_000;

/// The functions this module gives meaning to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd)]
enum Kind {
    DateBinGapfill,
    Locf,
    Interpolate,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Self::DateBinGapfill => "date_bin_gapfill",
            Self::Locf => "locf",
            Self::Interpolate => "interpolate",
        }
    }
}

/// The planning face of one of the functions; [`GapFillRule`] removes every call.
#[derive(Debug, PartialEq, Eq, Hash)]
struct Placeholder {
    kind: Kind,
    signature: Signature,
}

impl ScalarUDFImpl for Placeholder {
    fn name(&self) -> &str {
        self.kind.name()
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        match self.kind {
            Kind::DateBinGapfill => date_bin().return_type(arg_types),
            Kind::Locf | Kind::Interpolate => Ok(arg_types[0].clone()),
        }
    }

    fn invoke_with_args(&self, _args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        match self.kind {
            Kind::DateBinGapfill => plan_err!(
                "date_bin_gapfill() must be a GROUP BY key of an aggregate query whose WHERE clause bounds time on both sides"
            ),
            kind => plan_err!(
                "{}() fills the gaps of date_bin_gapfill(): use it on an aggregate, as in {}(avg(x)), in a query grouped by date_bin_gapfill()",
                kind.name(),
                kind.name()
            ),
        }
    }
}

/// `date_bin_gapfill`, `locf` and `interpolate`, to register with a session.
pub fn functions() -> Vec<ScalarUDF> {
    vec![
        ScalarUDF::new_from_impl(Placeholder {
            kind: Kind::DateBinGapfill,
            signature: date_bin().signature().clone(),
        }),
        ScalarUDF::new_from_impl(Placeholder {
            kind: Kind::Locf,
            signature: Signature::any(1, datafusion::logical_expr::Volatility::Immutable),
        }),
        ScalarUDF::new_from_impl(Placeholder {
            kind: Kind::Interpolate,
            signature: Signature::any(1, datafusion::logical_expr::Volatility::Immutable),
        }),
    ]
}

fn call_of(e: &Expr, kind: Kind) -> Option<&ScalarFunction> {
    match e {
        Expr::ScalarFunction(f) if f.func.name() == kind.name() => Some(f),
        _ => None,
    }
}

/// How a column's missing values are filled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd)]
pub enum Fill {
    /// Last observation carried forward.
    Locf,
    /// Linear interpolation between the neighbouring values.
    Interpolate,
}

/// The logical gap-fill step: every bucket of `[first_bucket, last_bucket]` for
/// every group of its input.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct GapFill {
    input: Arc<LogicalPlan>,
    /// The input's schema with every filled column nullable.
    schema: DFSchemaRef,
    /// Input column holding the bucket start.
    bucket: String,
    /// Input columns that, with the bucket, are the group key.
    groups: Vec<String>,
    /// Bucket width and start of the first bucket, nanoseconds.
    stride: i64,
    first_bucket: i64,
    last_bucket: i64,
    /// Columns filled other than with NULL.
    fills: Vec<(String, Fill)>,
}

impl PartialOrd for GapFill {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        let key = |g: &Self| {
            (
                g.input.clone(),
                g.bucket.clone(),
                g.groups.clone(),
                g.stride,
                g.first_bucket,
                g.last_bucket,
                g.fills.clone(),
            )
        };
        key(self).partial_cmp(&key(other))
    }
}

/// `schema` with every column but the bucket and the group keys nullable: a
/// bucket without rows has no aggregate values.
fn filled_schema(schema: &DFSchemaRef, keys: &[&str]) -> Result<DFSchemaRef> {
    let fields: Vec<_> = schema
        .iter()
        .map(|(q, f)| {
            let f = if keys.contains(&f.name().as_str()) {
                f.clone()
            } else {
                Arc::new(f.as_ref().clone().with_nullable(true))
            };
            (q.cloned(), f)
        })
        .collect();
    Ok(Arc::new(DFSchema::new_with_metadata(
        fields,
        schema.metadata().clone(),
    )?))
}

fn filled_arrow_schema(schema: &SchemaRef, keys: &[usize]) -> SchemaRef {
    let fields: Vec<_> = schema
        .fields()
        .iter()
        .enumerate()
        .map(|(i, f)| {
            if keys.contains(&i) {
                f.as_ref().clone()
            } else {
                f.as_ref().clone().with_nullable(true)
            }
        })
        .collect();
    Arc::new(Schema::new_with_metadata(fields, schema.metadata().clone()))
}

impl GapFill {
    fn keys(&self) -> Vec<&str> {
        std::iter::once(self.bucket.as_str())
            .chain(self.groups.iter().map(String::as_str))
            .collect()
    }
}

impl UserDefinedLogicalNodeCore for GapFill {
    fn name(&self) -> &str {
        "GapFill"
    }

    fn inputs(&self) -> Vec<&LogicalPlan> {
        vec![self.input.as_ref()]
    }

    fn schema(&self) -> &DFSchemaRef {
        &self.schema
    }

    fn expressions(&self) -> Vec<Expr> {
        Vec::new()
    }

    fn prevent_predicate_push_down_columns(&self) -> HashSet<String> {
        // A filter above fills must see the filled rows.
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
            "GapFill: bucket={} groups=[{}] stride={}ns buckets={}..={} fills=[{}]",
            self.bucket,
            self.groups.join(", "),
            self.stride,
            self.first_bucket,
            self.last_bucket,
            self.fills
                .iter()
                .map(|(c, f)| format!("{c}: {f:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    }

    fn with_exprs_and_inputs(
        &self,
        _exprs: Vec<Expr>,
        mut inputs: Vec<LogicalPlan>,
    ) -> Result<Self> {
        let Some(input) = inputs.pop() else {
            return plan_err!("GapFill takes one input");
        };
        Ok(Self {
            schema: filled_schema(input.schema(), &self.keys())?,
            input: Arc::new(input),
            ..self.clone()
        })
    }
}

/// Finds aggregations grouped by `date_bin_gapfill` and plans their gap filling.
#[derive(Debug, Default)]
pub struct GapFillRule;

impl AnalyzerRule for GapFillRule {
    fn analyze(&self, plan: LogicalPlan, config: &ConfigOptions) -> Result<LogicalPlan> {
        plan.transform_up_with_subqueries(|node| rewrite(node, config))
            .map(|t| t.data)
    }

    fn name(&self) -> &str {
        "citytsdb_gap_fill"
    }
}

fn unalias(e: &Expr) -> &Expr {
    match e {
        Expr::Alias(a) => unalias(&a.expr),
        other => other,
    }
}

fn rewrite(node: LogicalPlan, config: &ConfigOptions) -> Result<Transformed<LogicalPlan>> {
    let LogicalPlan::Projection(projection) = node else {
        return Ok(Transformed::no(node));
    };
    let LogicalPlan::Aggregate(agg) = projection.input.as_ref() else {
        return Ok(Transformed::no(LogicalPlan::Projection(projection)));
    };
    let gapfills: Vec<usize> = agg
        .group_expr
        .iter()
        .enumerate()
        .filter(|(_, e)| call_of(unalias(e), Kind::DateBinGapfill).is_some())
        .map(|(i, _)| i)
        .collect();
    let pos = match gapfills.as_slice() {
        [] => return Ok(Transformed::no(LogicalPlan::Projection(projection))),
        [pos] => *pos,
        _ => return plan_err!("a query may group by one date_bin_gapfill() only"),
    };
    let call = call_of(unalias(&agg.group_expr[pos]), Kind::DateBinGapfill)
        .expect("found above")
        .clone();
    let simplifier = Constants::new(config);
    let stride = simplifier.stride(&call.args[0])?;
    let origin = match call.args.get(2) {
        Some(e) => simplifier.timestamp(e)?.ok_or_else(|| {
            DataFusionError::Plan(
                "the origin of date_bin_gapfill() must be a constant timestamp".into(),
            )
        })?,
        None => 0,
    };
    let Expr::Column(time) = &call.args[1] else {
        return plan_err!("date_bin_gapfill() buckets a time column, as in date_bin_gapfill(INTERVAL '5 minutes', time)");
    };
    let (lo, hi) = time_range(agg.input.as_ref(), &time.name, &simplifier)?;
    let (Some(lo), Some(hi)) = (lo, hi) else {
        let t = &time.name;
        return plan_err!(
            "date_bin_gapfill() needs a time range to fill: add WHERE {t} >= <start> AND {t} < <end>"
        );
    };
    // In i128: bounds near the ends of the timestamp range must not overflow.
    let bin = |t: i64| -> i128 {
        let (o, s) = (i128::from(origin), i128::from(stride));
        o + (i128::from(t) - o).div_euclid(s) * s
    };
    let Ok(first_bucket) = i64::try_from(bin(lo)) else {
        return plan_err!(
            "date_bin_gapfill(): the bucket of the range's start would begin before the earliest timestamp (1677-09-21); start the range later or move the origin"
        );
    };
    let last_bucket = i64::try_from(bin(hi)).unwrap_or(i64::MAX);
    let buckets = if first_bucket > last_bucket {
        0
    } else {
        let n = (i128::from(last_bucket) - i128::from(first_bucket)) / i128::from(stride) + 1;
        u64::try_from(n).unwrap_or(u64::MAX)
    };
    if buckets > MAX_ROWS {
        return plan_err!(
            "date_bin_gapfill() would make {buckets} buckets per group (limit {MAX_ROWS}); widen the stride or narrow the time range"
        );
    }

    // The aggregation, grouped by plain date_bin under the same column name.
    let mut group_expr = agg.group_expr.clone();
    let bucket_name = agg.schema.field(pos).name().clone();
    let mut date_bin_args = call.args.clone();
    date_bin_args.truncate(3);
    group_expr[pos] = Expr::ScalarFunction(ScalarFunction::new_udf(date_bin(), date_bin_args))
        .alias(bucket_name.clone());
    let groups: Vec<String> = (0..agg.group_expr.len())
        .filter(|&i| i != pos)
        .map(|i| agg.schema.field(i).name().clone())
        .collect();
    // Aggregate output column -> its expression.
    let aggregates: Vec<(String, Expr)> = agg
        .aggr_expr
        .iter()
        .enumerate()
        .map(|(j, e)| {
            let name = agg.schema.field(agg.group_expr.len() + j).name().clone();
            (name, unalias(e).clone())
        })
        .collect();

    // The select list without locf()/interpolate(): each becomes a copy of its
    // aggregate under its own name, filled, so the plain aggregate stays unfilled.
    let mut aggr_expr = agg.aggr_expr.clone();
    let mut fills: Vec<(String, Fill)> = Vec::new();
    let mut exprs = Vec::with_capacity(projection.expr.len());
    for e in &projection.expr {
        let name = e.schema_name().to_string();
        let rewritten = e.clone().transform_up(|x| {
            let (kind, fill) = if call_of(&x, Kind::Locf).is_some() {
                (Kind::Locf, Fill::Locf)
            } else if call_of(&x, Kind::Interpolate).is_some() {
                (Kind::Interpolate, Fill::Interpolate)
            } else {
                return Ok(Transformed::no(x));
            };
            let Expr::ScalarFunction(f) = x else {
                unreachable!("call_of matched a scalar function")
            };
            let source = match f.args.as_slice() {
                [Expr::Column(c)] => aggregates.iter().find(|(n, _)| *n == c.name),
                _ => None,
            };
            let Some((source_name, source)) = source else {
                let k = kind.name();
                return plan_err!("{k}() takes an aggregate of the query, as in {k}(avg(x))");
            };
            if fill == Fill::Interpolate {
                let data_type = source.get_type(agg.input.schema())?;
                if !data_type.is_numeric() {
                    return plan_err!(
                        "interpolate() needs a numeric column; {source_name} is {data_type}"
                    );
                }
            }
            let filled = format!("{}({source_name})", kind.name());
            if !fills.iter().any(|(n, _)| *n == filled) {
                aggr_expr.push(source.clone().alias(filled.clone()));
                fills.push((filled.clone(), fill));
            }
            Ok(Transformed::new(
                Expr::Column(datafusion::common::Column::from_name(filled)),
                true,
                TreeNodeRecursion::Jump,
            ))
        })?;
        exprs.push(if rewritten.transformed {
            match rewritten.data {
                Expr::Alias(a) => Expr::Alias(a),
                other => other.alias(name),
            }
        } else {
            rewritten.data
        });
    }
    let new_agg = Aggregate::try_new(agg.input.clone(), group_expr, aggr_expr)?;
    let schema = filled_schema(&new_agg.schema, &[])?;
    let mut gap = GapFill {
        schema,
        input: Arc::new(LogicalPlan::Aggregate(new_agg)),
        bucket: bucket_name,
        groups,
        stride,
        first_bucket,
        last_bucket,
        fills,
    };
    gap.schema = filled_schema(gap.input.schema(), &gap.keys())?;
    let input = Arc::new(LogicalPlan::Extension(Extension {
        node: Arc::new(gap),
    }));
    Ok(Transformed::yes(LogicalPlan::Projection(
        Projection::try_new(exprs, input)?,
    )))
}

/// Folds constant expressions (`now() - INTERVAL '1 hour'`, casts of literals).
struct Constants {
    simplifier: ExprSimplifier,
}

impl Constants {
    fn new(config: &ConfigOptions) -> Self {
        let context = SimplifyContext::builder()
            .with_config_options(Arc::new(config.clone()))
            .with_current_time()
            .build();
        Self {
            simplifier: ExprSimplifier::new(context),
        }
    }

    fn literal(&self, e: &Expr) -> Result<Option<ScalarValue>> {
        if !e.column_refs().is_empty() {
            return Ok(None);
        }
        match self.simplifier.simplify(e.clone())? {
            Expr::Literal(v, _) => Ok(Some(v)),
            _ => Ok(None),
        }
    }

    fn timestamp(&self, e: &Expr) -> Result<Option<i64>> {
        let Some(v) = self.literal(e)? else {
            return Ok(None);
        };
        let v = match v.data_type() {
            DataType::Timestamp(_, tz) => {
                v.cast_to(&DataType::Timestamp(TimeUnit::Nanosecond, tz))?
            }
            DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => {
                v.cast_to(&DataType::Timestamp(TimeUnit::Nanosecond, None))?
            }
            _ => return Ok(None),
        };
        Ok(match v {
            ScalarValue::TimestampNanosecond(t, _) => t,
            _ => None,
        })
    }

    fn stride(&self, e: &Expr) -> Result<i64> {
        let ns = match self.literal(e)? {
            Some(ScalarValue::IntervalMonthDayNano(Some(v))) if v.months == 0 => {
                i64::from(v.days)
                    .checked_mul(86_400_000_000_000)
                    .and_then(|d| d.checked_add(v.nanoseconds))
            }
            Some(ScalarValue::IntervalDayTime(Some(v))) => i64::from(v.days)
                .checked_mul(86_400_000_000_000)
                .and_then(|d| d.checked_add(i64::from(v.milliseconds) * 1_000_000)),
            Some(ScalarValue::IntervalMonthDayNano(Some(_)) | ScalarValue::IntervalYearMonth(Some(_))) => {
                return plan_err!(
                    "date_bin_gapfill() needs a fixed stride such as INTERVAL '15 minutes' or '1 day'; months and years vary in length"
                )
            }
            _ => None,
        };
        match ns {
            Some(ns) if ns > 0 => Ok(ns),
            _ => plan_err!("the stride of date_bin_gapfill() must be a positive constant INTERVAL"),
        }
    }
}

/// The inclusive time range the filters under an aggregation impose on `time`.
fn time_range(
    mut plan: &LogicalPlan,
    time: &str,
    constants: &Constants,
) -> Result<(Option<i64>, Option<i64>)> {
    let (mut lo, mut hi): (Option<i64>, Option<i64>) = (None, None);
    let mut lower = |v: i64| lo = Some(lo.map_or(v, |l| l.max(v)));
    let mut upper = |v: i64| hi = Some(hi.map_or(v, |h| h.min(v)));
    let is_time = |e: &Expr| matches!(e, Expr::Column(c) if c.name == time);
    loop {
        match plan {
            LogicalPlan::Filter(f) => {
                for c in split_conjunction(&f.predicate) {
                    match c {
                        Expr::BinaryExpr(BinaryExpr { left, op, right }) => {
                            let (op, value) = if is_time(left) {
                                (*op, right.as_ref())
                            } else if is_time(right) {
                                match op.swap() {
                                    Some(op) => (op, left.as_ref()),
                                    None => continue,
                                }
                            } else {
                                continue;
                            };
                            let Some(v) = constants.timestamp(value)? else {
                                continue;
                            };
                            match op {
                                Operator::Gt => lower(v.saturating_add(1)),
                                Operator::GtEq => lower(v),
                                Operator::Lt => upper(v.saturating_sub(1)),
                                Operator::LtEq => upper(v),
                                Operator::Eq => {
                                    lower(v);
                                    upper(v)
                                }
                                _ => {}
                            }
                        }
                        Expr::Between(Between {
                            expr,
                            negated: false,
                            low,
                            high,
                        }) if is_time(expr) => {
                            if let Some(v) = constants.timestamp(low)? {
                                lower(v);
                            }
                            if let Some(v) = constants.timestamp(high)? {
                                upper(v);
                            }
                        }
                        _ => {}
                    }
                }
                plan = f.input.as_ref();
            }
            LogicalPlan::SubqueryAlias(a) => plan = a.input.as_ref(),
            _ => return Ok((lo, hi)),
        }
    }
}

/// Plans [`GapFill`] nodes as [`GapFillExec`] and `LatestPerKey` nodes as
/// `LatestPerKeyExec`; everything else as DataFusion does.
#[derive(Debug, Default)]
pub struct CityQueryPlanner;

#[async_trait]
impl QueryPlanner for CityQueryPlanner {
    async fn create_physical_plan(
        &self,
        logical_plan: &LogicalPlan,
        session_state: &dyn Session,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        DefaultPhysicalPlanner::with_extension_planners(vec![
            Arc::new(GapFillPlanner),
            Arc::new(crate::latest::LatestPlanner),
        ])
        .create_physical_plan(logical_plan, session_state)
        .await
    }
}

#[derive(Debug)]
struct GapFillPlanner;

#[async_trait]
impl ExtensionPlanner for GapFillPlanner {
    async fn plan_extension(
        &self,
        _planner: &dyn PhysicalPlanner,
        node: &dyn UserDefinedLogicalNode,
        _logical_inputs: &[&LogicalPlan],
        physical_inputs: &[Arc<dyn ExecutionPlan>],
        _session: &dyn Session,
        _planning_ctx: &PhysicalPlanningContext,
    ) -> Result<Option<Arc<dyn ExecutionPlan>>> {
        let Some(gap) = node.as_any().downcast_ref::<GapFill>() else {
            return Ok(None);
        };
        let [input] = physical_inputs else {
            return plan_err!("GapFill takes one input");
        };
        let schema = input.schema();
        let index = |name: &str| -> Result<usize> { Ok(schema.index_of(name)?) };
        let spec = Spec {
            bucket: index(&gap.bucket)?,
            groups: gap.groups.iter().map(|g| index(g)).collect::<Result<_>>()?,
            stride: gap.stride,
            first_bucket: gap.first_bucket,
            last_bucket: gap.last_bucket,
            fills: gap
                .fills
                .iter()
                .map(|(c, f)| Ok((index(c)?, *f)))
                .collect::<Result<_>>()?,
        };
        Ok(Some(Arc::new(GapFillExec::new(input.clone(), spec))))
    }
}

/// What [`GapFillExec`] does, by input column index.
#[derive(Debug, Clone)]
pub struct Spec {
    bucket: usize,
    groups: Vec<usize>,
    stride: i64,
    first_bucket: i64,
    last_bucket: i64,
    fills: Vec<(usize, Fill)>,
}

/// Writes every bucket of every group of its (aggregated) input, filled.
pub type GapFillExec = CollectExec<Spec>;

impl Transform for Spec {
    const NAME: &'static str = "GapFillExec";

    fn schema(&self, input: &SchemaRef) -> SchemaRef {
        let keys: Vec<usize> = std::iter::once(self.bucket)
            .chain(self.groups.iter().copied())
            .collect();
        filled_arrow_schema(input, &keys)
    }

    fn describe(&self, _input: &SchemaRef, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let buckets = (i128::from(self.last_bucket) - i128::from(self.first_bucket))
            .div_euclid(i128::from(self.stride))
            + 1;
        write!(
            f,
            "stride={}ns buckets={} fills={:?}",
            self.stride, buckets, self.fills
        )
    }

    fn apply(&self, input: &RecordBatch) -> Result<RecordBatch> {
        fill(input, self)
    }
}

/// The filled rows of `input`: sorted by group then bucket, one per bucket.
fn fill(input: &RecordBatch, spec: &Spec) -> Result<RecordBatch> {
    let buckets = cast(
        input.column(spec.bucket),
        &DataType::Timestamp(TimeUnit::Nanosecond, None),
    )?;
    let buckets = buckets.as_primitive::<datafusion::arrow::datatypes::TimestampNanosecondType>();
    let mut sort: Vec<SortColumn> = spec
        .groups
        .iter()
        .map(|&g| SortColumn {
            values: input.column(g).clone(),
            options: None,
        })
        .collect();
    sort.push(SortColumn {
        values: input.column(spec.bucket).clone(),
        options: None,
    });
    let order = lexsort_to_indices(&sort, None)?;
    let order: Vec<usize> = order.values().iter().map(|&i| i as usize).collect();
    let same_group = |a: usize, b: usize| -> Result<bool> {
        for &g in &spec.groups {
            let (x, y) = (
                ScalarValue::try_from_array(input.column(g), a)?,
                ScalarValue::try_from_array(input.column(g), b)?,
            );
            if x != y {
                return Ok(false);
            }
        }
        Ok(true)
    };

    // Output rows: (row of the group, input row if the bucket had one, bucket).
    let mut rows: Vec<(usize, Option<usize>, i64)> = Vec::new();
    let mut group_starts: Vec<usize> = Vec::new();
    let mut i = 0;
    while i < order.len() {
        let mut j = i + 1;
        while j < order.len() && same_group(order[i], order[j])? {
            j += 1;
        }
        group_starts.push(rows.len());
        let present = &order[i..j];
        let mut p = 0;
        // `None` once the next bucket would start past the last timestamp.
        let mut b = Some(spec.first_bucket);
        loop {
            let next_present = present
                .get(p)
                .map(|&r| (buckets.is_valid(r), buckets.value(r), r));
            let gen = b.filter(|b| *b <= spec.last_bucket);
            match (next_present, gen) {
                (None, None) => break,
                (Some((valid, t, r)), g) if !valid || g.is_none_or(|g| t <= g) => {
                    rows.push((present[0], Some(r), t));
                    p += 1;
                    if g == Some(t) {
                        b = b.and_then(|b| b.checked_add(spec.stride));
                    }
                }
                (_, Some(g)) => {
                    rows.push((present[0], None, g));
                    b = b.and_then(|b| b.checked_add(spec.stride));
                }
                (Some(_), None) => unreachable!("covered by the guard above"),
            }
            if rows.len() as u64 > MAX_ROWS {
                return Err(DataFusionError::ResourcesExhausted(format!(
                    "gap filling would produce more than {MAX_ROWS} rows; narrow the time range or widen the stride"
                )));
            }
        }
        i = j;
    }
    group_starts.push(rows.len());

    let schema = input.schema();
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(schema.fields().len());
    for (c, field) in schema.fields().iter().enumerate() {
        let array = if c == spec.bucket {
            let values = TimestampNanosecondArray::from_iter_values(rows.iter().map(|r| r.2));
            cast(&(Arc::new(values) as ArrayRef), field.data_type())?
        } else if spec.groups.contains(&c) {
            let idx = UInt64Array::from_iter_values(rows.iter().map(|r| r.0 as u64));
            take(input.column(c), &idx, None)?
        } else {
            let column = input.column(c);
            let present = |r: &(usize, Option<usize>, i64)| r.1.filter(|&i| column.is_valid(i));
            match spec.fills.iter().find(|(i, _)| *i == c).map(|(_, f)| *f) {
                None => {
                    let idx = UInt64Array::from_iter(rows.iter().map(|r| r.1.map(|i| i as u64)));
                    take(column, &idx, None)?
                }
                Some(Fill::Locf) => {
                    let mut idx = Vec::with_capacity(rows.len());
                    for w in group_starts.windows(2) {
                        let mut last = None;
                        for r in &rows[w[0]..w[1]] {
                            last = present(r).or(last);
                            idx.push(last.map(|i| i as u64));
                        }
                    }
                    take(column, &UInt64Array::from(idx), None)?
                }
                Some(Fill::Interpolate) => {
                    let values = cast(column, &DataType::Float64).map_err(|_| {
                        DataFusionError::Plan(format!(
                            "interpolate() needs a numeric column; {} is {}",
                            field.name(),
                            field.data_type()
                        ))
                    })?;
                    let values = values.as_primitive::<datafusion::arrow::datatypes::Float64Type>();
                    let mut out: Vec<Option<f64>> = Vec::with_capacity(rows.len());
                    for w in group_starts.windows(2) {
                        let group = &rows[w[0]..w[1]];
                        let known: Vec<(i64, f64)> = group
                            .iter()
                            .filter_map(|r| present(r).map(|i| (r.2, values.value(i))))
                            .collect();
                        let mut k = 0;
                        for r in group {
                            if let Some(i) = present(r) {
                                out.push(Some(values.value(i)));
                                continue;
                            }
                            while k < known.len() && known[k].0 < r.2 {
                                k += 1;
                            }
                            out.push(match (k.checked_sub(1).map(|p| known[p]), known.get(k)) {
                                (Some((t0, v0)), Some(&(t1, v1))) if t1 > t0 => Some(
                                    v0 + (v1 - v0)
                                        * ((r.2 as f64 - t0 as f64) / (t1 as f64 - t0 as f64)),
                                ),
                                _ => None,
                            });
                        }
                    }
                    let out: ArrayRef = Arc::new(Float64Array::from(out));
                    cast(&out, field.data_type())?
                }
            }
        };
        columns.push(array);
    }
    let keys: Vec<usize> = std::iter::once(spec.bucket)
        .chain(spec.groups.iter().copied())
        .collect();
    Ok(RecordBatch::try_new(
        filled_arrow_schema(&schema, &keys),
        columns,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{Int64Array, StringArray};
    use datafusion::arrow::datatypes::Field;

    #[test]
    fn fills_every_bucket_of_every_group() {
        let schema = Arc::new(Schema::new(vec![
            Field::new(
                "b",
                DataType::Timestamp(TimeUnit::Nanosecond, Some("UTC".into())),
                true,
            ),
            Field::new("g", DataType::Utf8, true),
            Field::new("plain", DataType::Float64, true),
            Field::new("locf", DataType::Int64, true),
            Field::new("interp", DataType::Float64, true),
        ]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(TimestampNanosecondArray::from(vec![40, 10, 0]).with_timezone("UTC")),
                Arc::new(StringArray::from(vec!["x", "x", "y"])),
                Arc::new(Float64Array::from(vec![4.0, 1.0, 9.0])),
                Arc::new(Int64Array::from(vec![Some(4), Some(1), None])),
                Arc::new(Float64Array::from(vec![4.0, 1.0, 9.0])),
            ],
        )
        .unwrap();
        let spec = Spec {
            bucket: 0,
            groups: vec![1],
            stride: 10,
            first_bucket: 0,
            last_bucket: 50,
            fills: vec![(3, Fill::Locf), (4, Fill::Interpolate)],
        };
        let out = fill(&batch, &spec).unwrap();
        assert_eq!(out.schema().fields().len(), schema.fields().len());
        assert_eq!(out.num_rows(), 12);
        let times: Vec<i64> = out
            .column(0)
            .as_primitive::<datafusion::arrow::datatypes::TimestampNanosecondType>()
            .values()
            .to_vec();
        assert_eq!(&times[..6], &[0, 10, 20, 30, 40, 50]);
        let plain = out
            .column(2)
            .as_primitive::<datafusion::arrow::datatypes::Float64Type>();
        assert_eq!(
            plain.iter().take(6).collect::<Vec<_>>(),
            vec![None, Some(1.0), None, None, Some(4.0), None]
        );
        let locf = out
            .column(3)
            .as_primitive::<datafusion::arrow::datatypes::Int64Type>();
        assert_eq!(
            locf.iter().take(6).collect::<Vec<_>>(),
            vec![None, Some(1), Some(1), Some(1), Some(4), Some(4)]
        );
        let interp = out
            .column(4)
            .as_primitive::<datafusion::arrow::datatypes::Float64Type>();
        assert_eq!(
            interp.iter().take(6).collect::<Vec<_>>(),
            vec![None, Some(1.0), Some(2.0), Some(3.0), Some(4.0), None]
        );
        // Group y: its only value at bucket 0; locf of a NULL stays NULL.
        assert_eq!(out.column(1).as_string::<i32>().value(6), "y");
        assert_eq!(locf.iter().skip(6).collect::<Vec<_>>(), vec![None; 6]);
        assert_eq!(interp.value(6), 9.0);
        assert!(interp.is_null(7));
    }
}
