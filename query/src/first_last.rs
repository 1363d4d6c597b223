//! `first(x)` and `last(x)`: the value of `x` at the earliest or latest `time` of
//! the group, ignoring rows where `x` is NULL (as InfluxQL's `FIRST` and `LAST`).
//!
//! Both are registered as aggregate functions so that SQL naming them plans; the
//! [`FirstLastByTime`] analyzer rule then rewrites each call into DataFusion's
//! `first_value(x ORDER BY time) IGNORE NULLS` (or `last_value`), keeping the
//! column's name, so they run on DataFusion's grouped, ordered accumulators.

use citytsdb_storage::schema::TIME_COLUMN;
use datafusion::arrow::datatypes::DataType;
use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::Transformed;
use datafusion::common::{plan_err, Result};
use datafusion::functions_aggregate::first_last::{first_value_udaf, last_value_udaf};
use datafusion::logical_expr::expr::{AggregateFunction, AggregateFunctionParams, NullTreatment};
use datafusion::logical_expr::function::AccumulatorArgs;
use datafusion::logical_expr::{
    Accumulator, Aggregate, AggregateUDF, AggregateUDFImpl, Distinct, Expr, LogicalPlan, Signature,
    SortExpr, Volatility,
};
use datafusion::optimizer::AnalyzerRule;

/// Which end of the group's time range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum End {
    First,
    Last,
}

/// The planning face of `first(x)` / `last(x)`; never executed.
#[derive(Debug, PartialEq, Eq, Hash)]
struct ByTime {
    end: End,
    signature: Signature,
}

impl AggregateUDFImpl for ByTime {
    fn name(&self) -> &str {
        match self.end {
            End::First => "first",
            End::Last => "last",
        }
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        Ok(arg_types[0].clone())
    }

    fn accumulator(&self, _args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        plan_err!(
            "{}(x) is an aggregate over a table's rows by time; as a window function use first_value(x) or last_value(x) with ORDER BY",
            self.name()
        )
    }
}

/// `first` and `last`, to register with a session.
pub fn functions() -> Vec<AggregateUDF> {
    [End::First, End::Last]
        .into_iter()
        .map(|end| {
            AggregateUDF::new_from_impl(ByTime {
                end,
                signature: Signature::any(1, Volatility::Immutable),
            })
        })
        .collect()
}

/// Rewrites `first(x)` / `last(x)` in every aggregation into DataFusion's ordered
/// `first_value` / `last_value`, and drops repeated keys from aggregates' and
/// `DISTINCT ON`'s orderings (see `unique_orderings`).
#[derive(Debug, Default)]
pub struct FirstLastByTime;

impl FirstLastByTime {
    fn rewrite_aggregate(agg: Aggregate) -> Result<Transformed<LogicalPlan>> {
        let mut changed = false;
        let mut aggr_expr = Vec::with_capacity(agg.aggr_expr.len());
        for e in &agg.aggr_expr {
            let (inner, alias) = match e {
                Expr::Alias(a) => (a.expr.as_ref(), Some(a.name.clone())),
                other => (other, None),
            };
            let Expr::AggregateFunction(f) = inner else {
                aggr_expr.push(e.clone());
                continue;
            };
            // `first` and `last` are ours: the session registers no other.
            let udaf = match f.func.name() {
                "first" => first_value_udaf(),
                "last" => last_value_udaf(),
                _ => {
                    aggr_expr.push(e.clone());
                    continue;
                }
            };
            let time = match agg
                .input
                .schema()
                .qualified_fields_with_unqualified_name(TIME_COLUMN)
                .as_slice()
            {
                [(q, field)] => Expr::Column(datafusion::common::Column::new(
                    q.cloned(),
                    field.name(),
                )),
                [] => {
                    return plan_err!(
                        "{}: first(x) and last(x) order by the column named time, and the input has none",
                        inner.schema_name()
                    )
                }
                _ => {
                    return plan_err!(
                        "{}: first(x) and last(x) order by the column named time, and the input has several; use first_value(x ORDER BY t.time)",
                        inner.schema_name()
                    )
                }
            };
            let AggregateFunctionParams {
                args,
                distinct,
                filter,
                ..
            } = &f.params;
            let rewritten = Expr::AggregateFunction(AggregateFunction::new_udf(
                udaf,
                args.clone(),
                *distinct,
                filter.clone(),
                vec![time.sort(true, false)],
                Some(NullTreatment::IgnoreNulls),
            ));
            let name = alias.unwrap_or_else(|| inner.schema_name().to_string());
            aggr_expr.push(rewritten.alias(name));
            changed = true;
        }
        if !changed {
            return Ok(Transformed::no(LogicalPlan::Aggregate(agg)));
        }
        let agg = Aggregate::try_new(agg.input, agg.group_expr, aggr_expr)?;
        Ok(Transformed::yes(LogicalPlan::Aggregate(agg)))
    }
}

/// Whether `sort` orders by one expression twice.
fn has_repeats(sort: &[SortExpr]) -> bool {
    sort.iter()
        .enumerate()
        .any(|(i, s)| sort[..i].iter().any(|t| t.expr == s.expr))
}

/// `sort` without the keys that repeat an earlier one: a repeat orders nothing more.
fn without_repeats(sort: &[SortExpr]) -> Vec<SortExpr> {
    let mut out: Vec<SortExpr> = Vec::with_capacity(sort.len());
    for s in sort {
        if !out.iter().any(|t| t.expr == s.expr) {
            out.push(s.clone());
        }
    }
    out
}

/// `agg` with each aggregate's `ORDER BY` without repeated keys, names kept.
///
/// DataFusion's `first_value` and `last_value` accumulators panic when an
/// ordering repeats a key (`ORDER BY device, device DESC`), as a `DISTINCT ON`
/// ordered by a column and its alias does once rewritten into them.
fn unique_orderings(agg: Aggregate) -> Result<Transformed<LogicalPlan>> {
    let mut changed = false;
    let mut aggr_expr = Vec::with_capacity(agg.aggr_expr.len());
    for e in &agg.aggr_expr {
        let (inner, alias) = match e {
            Expr::Alias(a) => (a.expr.as_ref(), Some(a.name.clone())),
            other => (other, None),
        };
        match inner {
            Expr::AggregateFunction(f) if has_repeats(&f.params.order_by) => {
                let mut f = f.clone();
                f.params.order_by = without_repeats(&f.params.order_by);
                let name = alias.unwrap_or_else(|| inner.schema_name().to_string());
                aggr_expr.push(Expr::AggregateFunction(f).alias(name));
                changed = true;
            }
            _ => aggr_expr.push(e.clone()),
        }
    }
    if !changed {
        return Ok(Transformed::no(LogicalPlan::Aggregate(agg)));
    }
    let agg = Aggregate::try_new(agg.input, agg.group_expr, aggr_expr)?;
    Ok(Transformed::yes(LogicalPlan::Aggregate(agg)))
}

impl AnalyzerRule for FirstLastByTime {
    fn analyze(&self, plan: LogicalPlan, _config: &ConfigOptions) -> Result<LogicalPlan> {
        plan.transform_up_with_subqueries(|node| match node {
            LogicalPlan::Aggregate(agg) => {
                Self::rewrite_aggregate(agg)?.transform_data(|plan| match plan {
                    LogicalPlan::Aggregate(agg) => unique_orderings(agg),
                    other => Ok(Transformed::no(other)),
                })
            }
            // DataFusion turns `DISTINCT ON` into `first_value`s ordered as it is.
            LogicalPlan::Distinct(Distinct::On(mut on))
                if on.sort_expr.as_deref().is_some_and(has_repeats) =>
            {
                on.sort_expr = on.sort_expr.as_deref().map(without_repeats);
                Ok(Transformed::yes(LogicalPlan::Distinct(Distinct::On(on))))
            }
            other => Ok(Transformed::no(other)),
        })
        .map(|t| t.data)
    }

    fn name(&self) -> &str {
        "citytsdb_first_last_by_time"
    }
}
