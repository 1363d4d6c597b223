//! Optimized plans of repeated statements.
//!
//! Dashboards and alert rules send the same SQL again and again. Parsing, analysis
//! and logical optimization of a statement depend only on its text and on the
//! schemas of the tables it reads, so the optimized logical plan is kept, keyed by
//! database and text. A later run of the same text swaps each table scan's source
//! for the table of its own snapshot (the rows it may see) and goes straight to
//! physical planning, which is where segments and indexes are chosen.
//!
//! A plan is kept only when that swap gives the plan a fresh plan would be:
//!
//! - every table it reads is one of the database's own tables (not a rollup's view,
//!   whose plan depends on which buckets are dirty, nor a `system` or
//!   `information_schema` table, which are made from the snapshot), or the latest
//!   rows of one (`latest.rs`: it reads the series registry when the plan runs, so
//!   it is kept as it is), and
//! - it calls no function whose answer may change between runs (`now()`,
//!   `random()`): the optimizer folds those into constants.
//!
//! A kept plan is used only while every table it reads has the schema it was
//! planned with: a new column or a new table type plans the statement afresh
//! (and replaces the entry).
//!
//! A plan that reads only latest rows (`latest.rs`) is kept whole, physical plan
//! included, when every node of it may run again (`RERUNNABLE`): its rows come
//! from the registry when it runs, so nothing in it depends on the snapshot, and
//! the latest readings of a dashboard skip physical planning too.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::catalog::TableProvider;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{DataFusionError, TableReference};
use datafusion::datasource::{provider_as_source, source_as_provider};
use datafusion::execution::session_state::SessionState;
use datafusion::logical_expr::{
    Expr, LogicalPlan, LogicalTableSource, TableScan, TableSource, Volatility,
};
use datafusion::physical_plan::ExecutionPlan;

use crate::latest::LatestTable;
use crate::provider::CityTable;

/// Statements kept, at most.
pub const CAPACITY: usize = 256;
/// Longer statements are planned every time (they are not what dashboards repeat,
/// and a bounded number of bounded keys bounds the cache's memory).
pub const MAX_SQL_BYTES: usize = 16 << 10;

/// Kept plans, by database and statement text.
#[derive(Default)]
pub struct PlanCache {
    entries: Mutex<Entries>,
    /// Runs that used a kept plan.
    pub hits: AtomicU64,
    /// Runs that planned their statement (it was not kept, or its schemas changed).
    pub misses: AtomicU64,
    /// Of the hits, runs that used a kept physical plan as it was.
    pub whole: AtomicU64,
}

#[derive(Default)]
struct Entries {
    map: HashMap<(String, String), Entry>,
    tick: u64,
}

struct Entry {
    plan: Arc<LogicalPlan>,
    /// The schema of each table the plan reads, as planned.
    tables: Vec<(String, SchemaRef)>,
    /// Whether every table the plan reads is read from the series registry.
    latest_only: bool,
    /// The physical plan, once planned, when it can be run again as it is.
    physical: Option<Arc<dyn ExecutionPlan>>,
    used: u64,
}

/// A kept plan.
#[derive(Debug)]
pub enum Kept {
    /// Ready to run.
    Physical(Arc<dyn ExecutionPlan>),
    /// Ready for physical planning.
    Logical(LogicalPlan),
}

/// Physical plan nodes that hold no state from one run to the next, so a plan made
/// of them only can be run again (DataFusion's repartitioning and `TopK` sorts
/// keep state across runs).
const RERUNNABLE: &[&str] = &[
    "ProjectionExec",
    "FilterExec",
    "CoalesceBatchesExec",
    "CoalescePartitionsExec",
    "CooperativeExec",
    "GlobalLimitExec",
    "LocalLimitExec",
    "LatestPerKeyExec",
    "LastValueCacheExec",
    "LatestRowsExec",
];

/// The table `name` (a table reference as SQL would write it) resolves to in
/// `state`, as `SessionContext::table_provider` finds it.
async fn table_provider(state: &SessionState, name: &str) -> Option<Arc<dyn TableProvider>> {
    let reference = TableReference::from(name);
    let table = reference.table().to_string();
    let schema = state.schema_for_ref(reference).ok()?;
    schema.table(&table).await.ok().flatten()
}

/// Whether every node of `plan` is [`RERUNNABLE`].
fn rerunnable(plan: &Arc<dyn ExecutionPlan>) -> bool {
    RERUNNABLE.contains(&plan.name()) && plan.children().into_iter().all(rerunnable)
}

impl PlanCache {
    /// The kept plan of `sql` over `db`, rebound to the tables of `state`, if there
    /// is one and every table it reads still has the schema it was planned with.
    pub async fn get(&self, db: &str, sql: &str, state: &SessionState) -> Option<Kept> {
        let (plan, tables, physical) = {
            let mut entries = lock(&self.entries);
            entries.tick += 1;
            let tick = entries.tick;
            let key = (db.to_string(), sql.to_string());
            let Some(entry) = entries.map.get_mut(&key) else {
                self.misses.fetch_add(1, Relaxed);
                return None;
            };
            entry.used = tick;
            (
                entry.plan.clone(),
                entry.tables.clone(),
                entry.physical.clone(),
            )
        };
        let mut current = HashMap::with_capacity(tables.len());
        for (name, schema) in &tables {
            let table = match table_provider(state, name).await {
                Some(t) if t.is::<CityTable>() && &t.schema() == schema => t,
                _ => {
                    self.misses.fetch_add(1, Relaxed);
                    return None;
                }
            };
            current.insert(name.clone(), table);
        }
        if let Some(physical) = physical {
            self.hits.fetch_add(1, Relaxed);
            self.whole.fetch_add(1, Relaxed);
            return Some(Kept::Physical(physical));
        }
        let rebound = plan.as_ref().clone().transform_up_with_subqueries(|node| {
            let LogicalPlan::TableScan(scan) = node else {
                return Ok(Transformed::no(node));
            };
            if is_latest(&scan.source) {
                return Ok(Transformed::no(LogicalPlan::TableScan(scan)));
            }
            let table = current.get(scan.table_name.table()).ok_or_else(|| {
                DataFusionError::Internal(format!("{} was not looked up", scan.table_name))
            })?;
            Ok(Transformed::yes(LogicalPlan::TableScan(TableScan {
                source: provider_as_source(table.clone()),
                ..scan
            })))
        });
        match rebound {
            Ok(t) => {
                self.hits.fetch_add(1, Relaxed);
                Some(Kept::Logical(t.data))
            }
            Err(_) => {
                self.misses.fetch_add(1, Relaxed);
                None
            }
        }
    }

    /// Keeps `optimized`, the plan of `sql` over `db` whose plan before analysis
    /// and optimization was `logical`, if it can be reused (module docs).
    pub fn put(&self, db: &str, sql: &str, logical: &LogicalPlan, optimized: &LogicalPlan) {
        if sql.len() > MAX_SQL_BYTES {
            return;
        }
        let Some(tables) = reusable(logical, optimized) else {
            return;
        };
        let mut latest_only = true;
        let _ = optimized.apply_with_subqueries(|node| {
            if let LogicalPlan::TableScan(scan) = node {
                latest_only &= is_latest(&scan.source);
            }
            Ok(TreeNodeRecursion::Continue)
        });
        // Kept without its tables: they hold the snapshot they were made from,
        // and with it the segments it reads (from the collector).
        let Ok(stripped) = optimized.clone().transform_up_with_subqueries(|node| {
            let LogicalPlan::TableScan(scan) = node else {
                return Ok(Transformed::no(node));
            };
            if is_latest(&scan.source) {
                return Ok(Transformed::no(LogicalPlan::TableScan(scan)));
            }
            let schema = scan.source.schema();
            Ok(Transformed::yes(LogicalPlan::TableScan(TableScan {
                source: Arc::new(LogicalTableSource::new(schema)),
                ..scan
            })))
        }) else {
            return;
        };
        let mut entries = lock(&self.entries);
        entries.tick += 1;
        let used = entries.tick;
        if entries.map.len() >= CAPACITY {
            // The least recently used goes: one pass over a few hundred entries, on
            // a miss only.
            if let Some(oldest) = entries
                .map
                .iter()
                .min_by_key(|(_, e)| e.used)
                .map(|(k, _)| k.clone())
            {
                entries.map.remove(&oldest);
            }
        }
        entries.map.insert(
            (db.to_string(), sql.to_string()),
            Entry {
                plan: Arc::new(stripped.data),
                tables,
                latest_only,
                physical: None,
                used,
            },
        );
    }

    /// Keeps `physical`, the physical plan of the kept plan of `sql` over `db`,
    /// when that plan reads only latest rows and `physical` can run again as it is.
    pub fn put_physical(&self, db: &str, sql: &str, physical: &Arc<dyn ExecutionPlan>) {
        // Checked first: most plans (every table scan's) are not rerunnable, and
        // then the query pays neither the lock nor the key.
        if !rerunnable(physical) {
            return;
        }
        let mut entries = lock(&self.entries);
        let key = (db.to_string(), sql.to_string());
        let Some(entry) = entries.map.get_mut(&key) else {
            return;
        };
        if entry.latest_only && entry.physical.is_none() {
            entry.physical = Some(physical.clone());
        }
    }

    /// Statements kept now.
    pub fn len(&self) -> usize {
        lock(&self.entries).map.len()
    }

    /// Whether no statement is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The tables (by name, with their schemas) `optimized` reads, if it can be kept:
/// every scan in both plans reads one of our tables by its bare name, and no
/// expression of `logical` calls a function whose answer may change.
fn reusable(logical: &LogicalPlan, optimized: &LogicalPlan) -> Option<Vec<(String, SchemaRef)>> {
    let mut tables: Vec<(String, SchemaRef)> = Vec::new();
    if !keepable(logical, &mut Vec::new()) || !keepable(optimized, &mut tables) {
        return None;
    }
    // Two tables of one name (in different schemas) would be ambiguous to rebind.
    let mut names: Vec<&str> = tables.iter().map(|(n, _)| n.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    (names.len() == tables.len()).then_some(tables)
}

/// Whether every scan of `plan` reads one of our tables and no expression calls a
/// function whose answer may change; the tables read go to `tables`.
fn keepable(plan: &LogicalPlan, tables: &mut Vec<(String, SchemaRef)>) -> bool {
    let mut ok = true;
    let walked = plan.apply_with_subqueries(|node| {
        if let LogicalPlan::TableScan(scan) = node {
            let Some(p) = source_as_provider(&scan.source)
                .ok()
                .filter(|p| p.is::<CityTable>() || p.is::<LatestTable>())
            else {
                ok = false;
                return Ok(TreeNodeRecursion::Stop);
            };
            let name = scan.table_name.table();
            if !tables.iter().any(|(n, _)| n == name) {
                tables.push((name.to_string(), p.schema()));
            }
        }
        node.apply_expressions(|e| {
            e.apply(|x| {
                if changing(x) {
                    ok = false;
                    return Ok(TreeNodeRecursion::Stop);
                }
                Ok(TreeNodeRecursion::Continue)
            })
        })?;
        Ok(if ok {
            TreeNodeRecursion::Continue
        } else {
            TreeNodeRecursion::Stop
        })
    });
    walked.is_ok() && ok
}

/// Whether `source` reads a table's latest rows from the series registry.
fn is_latest(source: &Arc<dyn TableSource>) -> bool {
    source_as_provider(source).is_ok_and(|p| p.is::<LatestTable>())
}

/// Whether `e` calls a function whose answer may differ from one run to the next.
fn changing(e: &Expr) -> bool {
    match e {
        Expr::ScalarFunction(f) => f.func.signature().volatility != Volatility::Immutable,
        Expr::AggregateFunction(f) => f.func.signature().volatility != Volatility::Immutable,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering::Relaxed;
    use std::sync::Arc;

    use citytsdb_storage::{ColumnKind, Engine, EngineConfig, FieldType, TableSchema};
    use datafusion::arrow::array::{Float64Array, StringArray, TimestampNanosecondArray};
    use datafusion::arrow::record_batch::RecordBatch;
    use datafusion::arrow::util::pretty::pretty_format_batches;

    use crate::QueryEngine;

    fn schema(extra: bool) -> TableSchema {
        let mut t = TableSchema::default();
        t.add_column("device", ColumnKind::Tag).unwrap();
        t.add_column("v", ColumnKind::Field(FieldType::Float))
            .unwrap();
        if extra {
            t.add_column("w", ColumnKind::Field(FieldType::Float))
                .unwrap();
        }
        t
    }

    fn rows(extra: bool, at: i64, v: f64) -> RecordBatch {
        let mut columns: Vec<datafusion::arrow::array::ArrayRef> = vec![
            Arc::new(TimestampNanosecondArray::from(vec![at * 1_000_000_000]).with_timezone("UTC")),
            Arc::new(StringArray::from(vec!["d1"])),
            Arc::new(Float64Array::from(vec![v])),
        ];
        if extra {
            columns.push(Arc::new(Float64Array::from(vec![v * 10.0])));
        }
        RecordBatch::try_new(schema(extra).arrow_schema(), columns).unwrap()
    }

    /// Writes one row of `d1` (with column `w` when `extra`) at second `at`.
    async fn write(storage: &Engine, extra: bool, at: i64, v: f64) {
        storage
            .write("db", vec![("t".into(), rows(extra, at, v))], false)
            .await
            .unwrap();
    }

    async fn answer(engine: &QueryEngine, sql: &str) -> String {
        let out = engine.query("db", sql).await.unwrap();
        pretty_format_batches(&out.batches).unwrap().to_string()
    }

    fn hits(engine: &QueryEngine) -> (u64, u64) {
        let c = engine.plan_cache();
        (c.hits.load(Relaxed), c.misses.load(Relaxed))
    }

    async fn setup() -> (tempfile::TempDir, Engine, QueryEngine) {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn object_store::ObjectStore> =
            Arc::new(object_store::memory::InMemory::new());
        let storage = Engine::open(EngineConfig::new(dir.path().to_path_buf(), store))
            .await
            .unwrap();
        storage.update_schemas("db", |s| s.insert("t".into(), schema(false)));
        write(&storage, false, 1, 1.0).await;
        let engine = QueryEngine::new(storage.clone(), Default::default()).unwrap();
        (dir, storage, engine)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_repeated_statement_reuses_its_plan_and_sees_every_new_row() {
        let (_dir, storage, engine) = setup().await;
        let sql = "SELECT count(*) AS n, sum(v) AS s FROM t WHERE device = 'd1'";
        assert!(answer(&engine, sql).await.contains("| 1 | 1.0 |"));
        assert_eq!(hits(&engine), (0, 1));
        // Rows written after the plan was kept, buffered and then flushed.
        write(&storage, false, 2, 2.0).await;
        assert!(answer(&engine, sql).await.contains("| 2 | 3.0 |"));
        storage.flush().await.unwrap();
        write(&storage, false, 3, 4.0).await;
        assert!(answer(&engine, sql).await.contains("| 3 | 7.0 |"));
        assert_eq!(hits(&engine), (2, 1));
        assert_eq!(engine.plan_cache().len(), 1);
        storage.shutdown().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_new_column_plans_the_statement_again() {
        let (_dir, storage, engine) = setup().await;
        let sql = "SELECT * FROM t ORDER BY time";
        let before = answer(&engine, sql).await;
        assert!(!before.contains("| w"), "{before}");
        storage.update_schemas("db", |s| s.insert("t".into(), schema(true)));
        write(&storage, true, 2, 2.0).await;
        let after = answer(&engine, sql).await;
        assert!(after.contains("| w"), "{after}");
        assert!(after.contains("20.0"), "{after}");
        assert_eq!(hits(&engine), (0, 2));
        // And the new plan is kept in turn.
        answer(&engine, sql).await;
        assert_eq!(hits(&engine), (1, 2));
        storage.shutdown().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_latest_rows_of_a_kept_plan_are_read_when_it_runs() {
        let (_dir, storage, engine) = setup().await;
        let sql = "SELECT DISTINCT ON (device) device, time, v FROM t ORDER BY device, time DESC";
        let plan = answer(&engine, &format!("EXPLAIN {sql}")).await;
        assert!(
            plan.contains("LatestPerKeyExec: keys=[device] time=time memo=registry")
                && !plan.contains("SortExec"),
            "{plan}"
        );
        assert!(answer(&engine, sql)
            .await
            .contains("| d1     | 1970-01-01T00:00:01Z | 1.0 |"));
        write(&storage, false, 2, 2.0).await;
        assert!(answer(&engine, sql)
            .await
            .contains("| d1     | 1970-01-01T00:00:02Z | 2.0 |"));
        storage.flush().await.unwrap();
        write(&storage, false, 3, 4.0).await;
        assert!(answer(&engine, sql)
            .await
            .contains("| d1     | 1970-01-01T00:00:03Z | 4.0 |"));
        assert_eq!(hits(&engine), (2, 2), "EXPLAIN is a statement of its own");
        // The first run kept its physical plan too; the later ones ran it again.
        assert_eq!(engine.plan_cache().whole.load(Relaxed), 2, "{plan}");
        // Runs of one kept plan at once each read the rows whole.
        let runs = (0..8).map(|_| answer(&engine, sql));
        for out in futures::future::join_all(runs).await {
            assert!(
                out.contains("| d1     | 1970-01-01T00:00:03Z | 4.0 |"),
                "{out}"
            );
        }
        assert_eq!(engine.plan_cache().whole.load(Relaxed), 10);
        assert_eq!(hits(&engine), (10, 2));
        // A new column plans the statement again, and `*` shows it.
        let star = "SELECT DISTINCT ON (device) * FROM t ORDER BY device, time DESC";
        answer(&engine, star).await;
        storage.update_schemas("db", |s| s.insert("t".into(), schema(true)));
        write(&storage, true, 4, 5.0).await;
        let after = answer(&engine, star).await;
        assert!(after.contains("| w") && after.contains("50.0"), "{after}");
        assert_eq!(hits(&engine), (10, 4));
        storage.shutdown().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn statements_with_now_or_system_tables_are_planned_every_time() {
        let (_dir, storage, engine) = setup().await;
        for sql in [
            "SELECT count(*) FROM t WHERE time < now()",
            "SELECT now() AS at",
            "SELECT count(*) FROM t WHERE random() < 2",
            "SELECT count(*) FROM system.tables",
            "SELECT count(*) FROM information_schema.columns",
        ] {
            answer(&engine, sql).await;
            answer(&engine, sql).await;
        }
        assert_eq!(hits(&engine).0, 0);
        assert!(engine.plan_cache().is_empty());
        // now() moves between runs.
        let a = answer(&engine, "SELECT now() AS at").await;
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        let b = answer(&engine, "SELECT now() AS at").await;
        assert_ne!(a, b);
        storage.shutdown().await.unwrap();
    }
}
