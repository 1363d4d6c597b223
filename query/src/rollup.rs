//! Rollups as readers see them, and the refresher that materialises them.
//!
//! A rollup table answers, for every bucket, what `GROUP BY date_bin(interval,
//! time)` over the source's retained raw rows answers (`storage/src/rollup.rs` says
//! what is kept where). Read: the view [`view_plan`] is the rollup table's
//! materialised rows outside the dirty ranges, `UNION ALL` the same aggregation
//! computed from the raw rows inside them; DataFusion inlines it into the query, so
//! the query's filters reach both halves.
//!
//! Refresh ([`QueryEngine::refresh_rollups`]): for each rollup, oldest dirty range
//! first and at most [`CHUNK_BUCKETS`] buckets of it at a time, the range's
//! materialised rows are deleted if rows were deleted in it (a group may have
//! vanished), its buckets are aggregated from the raw rows of one snapshot and
//! written to the rollup table through the WAL, and then one catalog record says
//! the rollup is as of that snapshot but for the ranges still left. A crash before
//! the record leaves the range dirty: readers compute it on the fly, and the next
//! refresh writes it again (a rewrite of a (series, time) replaces it).

use std::sync::Arc;

use citytsdb_storage::rollup::{Aggregate, Dirty, RollupDef};
use citytsdb_storage::schema::TIME_COLUMN;
use citytsdb_storage::DbSnapshot;
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::catalog::TableProvider;
use datafusion::common::{Result, ScalarValue};
use datafusion::datasource::provider_as_source;
use datafusion::functions_aggregate::expr_fn::{avg, count, max, min, sum};
use datafusion::functions_aggregate::first_last::{first_value_udaf, last_value_udaf};
use datafusion::logical_expr::expr::{AggregateFunction, NullTreatment};
use datafusion::logical_expr::{
    cast as cast_expr, col, lit, Expr, LogicalPlan, LogicalPlanBuilder,
};
use datafusion::prelude::{and, or};

use crate::delete::Delete;
use crate::engine::QueryEngine;
use crate::error::QueryError;

/// Most buckets one refresh step recomputes (a day of hourly buckets per step
/// at least, so a backfill commits its progress as it goes).
pub const CHUNK_BUCKETS: i64 = 24;

/// Most steps one call of [`QueryEngine::refresh_rollups`] takes per rollup.
const MAX_STEPS_PER_CALL: usize = 4096;

/// At least this much source time per refresh step.
const CHUNK_MIN_NANOS: i64 = 86_400_000_000_000;

fn time_lit(t: i64) -> Expr {
    lit(ScalarValue::TimestampNanosecond(
        Some(t),
        Some(citytsdb_storage::schema::TIME_ZONE.into()),
    ))
}

/// `time` within one of `ranges`, as SQL would say it; also bounded by the first
/// and last so a table's scan prunes by time.
fn within(ranges: &[Dirty]) -> Option<Expr> {
    let (first, last) = (ranges.first()?, ranges.last()?);
    let any = ranges
        .iter()
        .map(|r| {
            and(
                col(TIME_COLUMN).gt_eq(time_lit(r.lo)),
                col(TIME_COLUMN).lt(time_lit(r.hi)),
            )
        })
        .reduce(or)?;
    Some(and(
        and(
            col(TIME_COLUMN).gt_eq(time_lit(first.lo)),
            col(TIME_COLUMN).lt(time_lit(last.hi)),
        ),
        any,
    ))
}

fn aggregate_expr(column: &citytsdb_storage::rollup::RollupColumn) -> Expr {
    let x = col(column.field.as_str());
    let by_time = |udaf| {
        Expr::AggregateFunction(AggregateFunction::new_udf(
            udaf,
            vec![x.clone()],
            false,
            None,
            vec![col(TIME_COLUMN).sort(true, false)],
            Some(NullTreatment::IgnoreNulls),
        ))
    };
    let e = match column.aggregate {
        Aggregate::Min => min(x.clone()),
        Aggregate::Max => max(x.clone()),
        Aggregate::Avg => avg(x.clone()),
        Aggregate::Sum => sum(x.clone()),
        Aggregate::Count => count(x.clone()),
        Aggregate::First => by_time(first_value_udaf()),
        Aggregate::Last => by_time(last_value_udaf()),
    };
    e.alias(column.name.as_str())
}

/// The buckets of `ranges` computed from the raw rows of `source`, with the rollup
/// table's columns and types (`rollup`); `floor` (a bucket start) bounds them below.
pub fn aggregate_plan(
    def: &RollupDef,
    rollup: &SchemaRef,
    source: Arc<dyn TableProvider>,
    ranges: &[Dirty],
) -> Result<LogicalPlan> {
    let stride = lit(ScalarValue::IntervalMonthDayNano(Some(
        datafusion::arrow::datatypes::IntervalMonthDayNano::new(0, 0, def.interval),
    )));
    let bucket = datafusion::functions::expr_fn::date_bin(stride, col(TIME_COLUMN), time_lit(0))
        .alias(TIME_COLUMN);
    let mut group = vec![bucket];
    group.extend(def.tags.iter().map(|t| col(t.as_str())));
    let aggregates: Vec<Expr> = def.columns.iter().map(aggregate_expr).collect();
    let mut builder =
        LogicalPlanBuilder::scan(def.source.as_str(), provider_as_source(source), None)?;
    if let Some(w) = within(ranges) {
        builder = builder.filter(w)?;
    }
    let typed: Vec<Expr> = rollup
        .fields()
        .iter()
        .map(|f| cast_expr(col(f.name().as_str()), f.data_type().clone()).alias(f.name()))
        .collect();
    builder
        .aggregate(group, aggregates)?
        .project(typed)?
        .build()
}

/// The rollup as a reader sees it: its materialised rows outside `dirty`, and the
/// buckets inside `dirty` computed from `source`'s raw rows.
pub fn view_plan(
    def: &RollupDef,
    rollup: Arc<dyn TableProvider>,
    source: Arc<dyn TableProvider>,
    dirty: &[Dirty],
) -> Result<LogicalPlan> {
    let schema = rollup.schema();
    let mut kept = LogicalPlanBuilder::scan(def.name.as_str(), provider_as_source(rollup), None)?;
    if let Some(w) = within(dirty) {
        kept = kept.filter(w.is_not_true())?;
    }
    let live = aggregate_plan(def, &schema, source, dirty)?;
    kept.union(live)?.build()
}

/// A 400 if `table` is a rollup: its rows are computed, never written or deleted.
pub(crate) fn refuse_rollup(
    snapshot: &DbSnapshot,
    table: &str,
    what: &str,
) -> Result<(), QueryError> {
    match snapshot.rollup(table) {
        Some(r) => Err(QueryError::invalid(format!(
            "cannot {what} rollup '{table}': its rows are computed from '{}'; {what} '{}' instead",
            r.def.source, r.def.source
        ))),
        None => Ok(()),
    }
}

/// Why a refresh or a removal of a rollup failed.
#[derive(Debug, thiserror::Error)]
pub enum RollupError {
    /// Planning or running the aggregation failed.
    #[error(transparent)]
    Query(#[from] QueryError),
    /// Writing, flushing or committing failed.
    #[error(transparent)]
    Storage(#[from] citytsdb_storage::StorageError),
}

impl From<crate::delete::DeleteError> for RollupError {
    fn from(e: crate::delete::DeleteError) -> Self {
        match e {
            crate::delete::DeleteError::Query(q) => Self::Query(q),
            crate::delete::DeleteError::Storage(s) => Self::Storage(s),
        }
    }
}

/// What one call of [`QueryEngine::refresh_rollups`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RefreshStats {
    /// Refresh steps committed.
    pub steps: usize,
    /// Rollup rows written.
    pub rows: u64,
}

/// The first chunk of `dirty` one step recomputes, and what is left after it.
fn first_chunk(def: &RollupDef, dirty: &[Dirty]) -> (Dirty, Vec<Dirty>) {
    let span =
        (def.interval.saturating_mul(CHUNK_BUCKETS)).max(def.bucket_at_or_after(CHUNK_MIN_NANOS));
    let first = dirty[0];
    let end = first.lo.saturating_add(span).min(first.hi);
    let chunk = Dirty { hi: end, ..first };
    let mut rest = Vec::with_capacity(dirty.len());
    if end < first.hi {
        rest.push(Dirty { lo: end, ..first });
    }
    rest.extend_from_slice(&dirty[1..]);
    (chunk, rest)
}

impl QueryEngine {
    /// Brings every rollup of every database up to date, a bounded step at a time;
    /// returns what it did. Runs one refresh at a time.
    ///
    /// A rollup whose refresh fails is left for the next call (the first such
    /// error is returned after the others were refreshed); the lock that keeps a
    /// removal out is taken per step, so a removal waits for one step at most.
    pub async fn refresh_rollups(&self) -> Result<RefreshStats, RollupError> {
        let mut stats = RefreshStats::default();
        let mut failure = None;
        for db in self.storage().databases() {
            let names: Vec<String> = match self.storage().snapshot(&db) {
                Some(s) => s.rollups().map(|r| r.def.name.clone()).collect(),
                None => continue,
            };
            for name in names {
                // Bounded, so a source flushed faster than it is refreshed cannot
                // hold one call forever.
                for _ in 0..MAX_STEPS_PER_CALL {
                    let step = {
                        let _one = self.rollup_lock.lock().await;
                        self.refresh_step(&db, &name).await
                    };
                    match step {
                        Ok(Some(rows)) => {
                            stats.steps += 1;
                            stats.rows += rows;
                        }
                        Ok(None) => break,
                        Err(e) => {
                            tracing::warn!(db = %db, rollup = %name, error = %e, "refreshing a rollup failed");
                            failure.get_or_insert(e);
                            break;
                        }
                    }
                }
            }
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(stats),
        }
    }

    /// Refreshes every rollup every `every`, on the query threads, until the
    /// returned handle is dropped or aborted.
    pub fn spawn_rollup_refresher(&self, every: std::time::Duration) -> tokio::task::AbortHandle {
        let this = self.clone();
        self.executor_handle()
            .spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    match this.refresh_rollups().await {
                        Ok(s) if s.steps > 0 => {
                            tracing::debug!(steps = s.steps, rows = s.rows, "rollups refreshed")
                        }
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(error = %e, "refreshing rollups failed; retrying later")
                        }
                    }
                }
            })
            .abort_handle()
    }

    /// Drops rollup `name` of `db` with its table, with no refresh running.
    pub async fn drop_rollup(&self, db: &str, name: &str) -> Result<(), RollupError> {
        let _one = self.rollup_lock.lock().await;
        Ok(self.storage().drop_rollup(db, name).await?)
    }

    /// Recomputes the oldest dirty chunk of rollup `name`; `None` if it was clean.
    async fn refresh_step(&self, db: &str, name: &str) -> Result<Option<u64>, RollupError> {
        let Some(snapshot) = self.storage().snapshot(db) else {
            return Ok(None);
        };
        let Some(rollup) = snapshot.rollup(name).cloned() else {
            return Ok(None);
        };
        let def = rollup.def;
        let dirty = snapshot.rollup_dirty(name, false);
        if dirty.is_empty() {
            return Ok(None);
        }
        let as_of = snapshot.seq();
        let (chunk, rest) = first_chunk(&def, &dirty);
        if chunk.clear {
            let delete = Delete {
                table: def.name.clone(),
                relation: format!("\"{}\"", def.name.replace('"', "\"\"")),
                predicate: format!(
                    "time >= to_timestamp_nanos({}) AND time < to_timestamp_nanos({})",
                    chunk.lo, chunk.hi
                ),
            };
            self.delete_rows(db, &delete).await?;
        }
        let batches = self.aggregate_chunk(db, snapshot, &def, chunk).await?;
        let rows: u64 = batches.iter().map(|b| b.num_rows() as u64).sum();
        if rows > 0 {
            // One WAL record (and one fsync) per step.
            let schema = batches[0].schema();
            let batch = datafusion::arrow::compute::concat_batches(&schema, &batches)
                .map_err(|e| QueryError::Internal(e.to_string()))?;
            self.storage()
                .write(db, vec![(def.name.clone(), batch)], true)
                .await?;
        }
        self.storage()
            .rollup_progress(db, name, as_of, rest)
            .await?;
        Ok(Some(rows))
    }

    async fn aggregate_chunk(
        &self,
        db: &str,
        snapshot: DbSnapshot,
        def: &RollupDef,
        chunk: Dirty,
    ) -> Result<Vec<RecordBatch>, QueryError> {
        let schema = snapshot
            .schemas
            .get(&def.name)
            .map(|s| s.arrow_schema())
            .ok_or_else(|| QueryError::Internal(format!("rollup {} has no table", def.name)))?;
        let ctx = self.raw_context(db, snapshot)?;
        let source = ctx
            .table_provider(def.source.as_str())
            .await
            .map_err(|e| QueryError::from_datafusion(e, &def.source))?;
        let plan = aggregate_plan(def, &schema, source, &[chunk])
            .map_err(|e| QueryError::from_datafusion(e, &def.name))?;
        let df = ctx
            .execute_logical_plan(plan)
            .await
            .map_err(|e| QueryError::from_datafusion(e, &def.name))?;
        let batches = self
            .collect(df)
            .await
            .map_err(|e| QueryError::from_datafusion(e, &def.name))?;
        // Exactly the table's types (the plan casts; nullability may differ).
        batches
            .into_iter()
            .map(|b| {
                let columns = b
                    .columns()
                    .iter()
                    .zip(schema.fields())
                    .map(|(c, f)| cast(c, f.data_type()))
                    .collect::<Result<Vec<_>, _>>()?;
                RecordBatch::try_new(schema.clone(), columns)
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| QueryError::Internal(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def(interval: i64) -> RollupDef {
        RollupDef {
            name: "r".into(),
            source: "s".into(),
            interval,
            tags: vec![],
            columns: vec![],
        }
    }

    #[test]
    fn a_step_takes_a_bounded_chunk_of_the_oldest_range() {
        let hour = 3_600_000_000_000;
        let d = def(hour);
        let dirty = vec![
            Dirty {
                lo: 0,
                hi: 100 * hour,
                clear: true,
            },
            Dirty {
                lo: 200 * hour,
                hi: 201 * hour,
                clear: false,
            },
        ];
        let (chunk, rest) = first_chunk(&d, &dirty);
        assert_eq!((chunk.lo, chunk.hi, chunk.clear), (0, 24 * hour, true));
        assert_eq!(rest.len(), 2);
        assert_eq!(
            (rest[0].lo, rest[0].hi, rest[0].clear),
            (24 * hour, 100 * hour, true)
        );
        let (chunk, rest) = first_chunk(&d, &rest[1..]);
        assert_eq!((chunk.lo, chunk.hi), (200 * hour, 201 * hour));
        assert!(rest.is_empty());
        // Minute buckets still take a day per step.
        let (chunk, _) = first_chunk(&def(60_000_000_000), &dirty);
        assert_eq!(chunk.hi, 24 * hour);
    }
}
