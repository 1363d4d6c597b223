//! The query engine: SQL text in, Arrow batches out.
//!
//! 1. The SQL is parsed (PostgreSQL dialect) and refused unless it is one read-only
//!    statement: `SELECT` (with CTEs), `EXPLAIN [ANALYZE]`, or `SHOW`.
//! 2. A DataFusion session is made over a snapshot of the database: its tables are
//!    [`CityTable`](crate::provider::CityTable)s reading that snapshot's segments and
//!    buffered rows, and DataFusion plans, optimizes and executes the statement.
//! 3. Errors are classified (`error.rs`): the user's fault with a position, or ours.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use citytsdb_storage::Engine;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::catalog::{
    CatalogProvider, CatalogProviderList, MemoryCatalogProvider, MemoryCatalogProviderList,
};
use datafusion::common::tree_node::TreeNode;
use datafusion::execution::context::SQLOptions;
use datafusion::execution::memory_pool::{GreedyMemoryPool, TrackConsumersPool};
use datafusion::execution::runtime_env::{RuntimeEnv, RuntimeEnvBuilder};
use datafusion::execution::session_state::{SessionState, SessionStateBuilder};
use datafusion::execution::SendableRecordBatchStream;
use datafusion::execution::TaskContext;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::prelude::DataFrame;
use datafusion::prelude::{SessionConfig, SessionContext};
use datafusion::sql::parser::{DFParser, Statement as DfStatement};
use datafusion::sql::sqlparser::ast::Statement as SqlStatement;
use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
use datafusion::sql::sqlparser::keywords::Keyword;
use datafusion::sql::sqlparser::tokenizer::{Token, Tokenizer};
use futures::StreamExt;
use tracing::Instrument;

use crate::delete::{Delete, DeleteError};
use crate::error::{Position, QueryError};
use crate::first_last::FirstLastByTime;
use crate::gapfill::{CityQueryPlanner, GapFillRule};
use crate::latest::LatestFromCache;
use crate::plan_cache::{Kept, PlanCache};
use crate::provider::{DatabaseSchema, IndexCache, STORE_URL};
use crate::system::{AlertSource, DevicesMemo, SystemSchema, SYSTEM_SCHEMA};

/// The catalog name DataFusion sees; the database's tables are in its `public` schema.
pub(crate) const CATALOG: &str = "citytsdb";
/// Nesting depth at which the parser refuses SQL, well before any stack is at risk.
const RECURSION_LIMIT: usize = 64;
/// Most operators one statement may hold. A flat chain (`a + a + ...`, `x = 1 OR
/// x = 2 OR ...`) is no nesting to the parser, but the planner walks it, and
/// frees it, recursively: a few tens of thousands of links take more stack than
/// any thread has.
const MAX_OPERATORS: usize = 10_000;

/// What one query may use before it is stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueryLimits {
    /// Wall-clock time from parsing to the last row.
    pub timeout: Duration,
    /// Memory its operators may reserve (sorts and aggregates spill to disk first).
    pub memory_bytes: usize,
    /// A query taking at least this long is logged with its SQL.
    pub slow: Duration,
    /// Memory all running queries together may reserve: past it, operators that
    /// can spill do, and a query that needs more is refused as the server's being
    /// busy (503), not its own fault.
    pub total_memory_bytes: usize,
}

impl Default for QueryLimits {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(60),
            memory_bytes: 1 << 30,
            slow: Duration::from_secs(1),
            total_memory_bytes: 4 << 30,
        }
    }
}

/// A query's answer, fully collected.
#[derive(Debug)]
pub struct QueryOutput {
    /// Column names and types.
    pub schema: SchemaRef,
    /// The rows.
    pub batches: Vec<RecordBatch>,
}

/// Batches a running query may have made and the reader not yet taken.
pub const STREAM_AHEAD: usize = 2;

/// A running query's answer, batch by batch.
pub struct QueryStream {
    /// Column names and types.
    pub schema: SchemaRef,
    rx: tokio::sync::mpsc::Receiver<Result<RecordBatch, QueryError>>,
    deadline: tokio::time::Instant,
    timeout: QueryError,
    _guard: AbortOnDrop,
}

impl QueryStream {
    /// The next batch; `None` after the last. An error is the last item.
    pub async fn next(&mut self) -> Option<Result<RecordBatch, QueryError>> {
        // The time limit holds even if the query's operators never yield.
        match tokio::time::timeout_at(self.deadline, self.rx.recv()).await {
            Ok(item) => item,
            Err(_) => {
                self.rx.close();
                Some(Err(std::mem::replace(
                    &mut self.timeout,
                    QueryError::Internal("the query already timed out".into()),
                )))
            }
        }
    }
}

/// Upper bounds (seconds) of the query latency histogram's buckets.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0,
];

/// Counts of the queries run since the engine was made (monotonic).
#[derive(Debug, Default)]
pub struct QueryMetrics {
    /// Queries run to their end, failed or cancelled.
    pub queries: AtomicU64,
    /// Queries that failed (errors, time and memory limits) or were cancelled.
    pub failures: AtomicU64,
    /// Queries whose time was at most each [`LATENCY_BUCKETS`] bound (cumulative).
    pub buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    /// Their total time, nanoseconds.
    pub nanos: AtomicU64,
}

impl QueryMetrics {
    fn observe(&self, elapsed: Duration, failed: bool) {
        self.queries.fetch_add(1, Relaxed);
        if failed {
            self.failures.fetch_add(1, Relaxed);
        }
        self.nanos.fetch_add(elapsed.as_nanos() as u64, Relaxed);
        let secs = elapsed.as_secs_f64();
        for (bound, count) in LATENCY_BUCKETS.iter().zip(&self.buckets) {
            if secs <= *bound {
                count.fetch_add(1, Relaxed);
            }
        }
    }
}

/// Records a query's time when its task ends, however it ends, and logs it
/// with its SQL if it was slow.
struct Timed {
    metrics: Arc<QueryMetrics>,
    started: std::time::Instant,
    failed: bool,
    slow: Duration,
    db: String,
    sql: String,
}

impl Drop for Timed {
    fn drop(&mut self) {
        let elapsed = self.started.elapsed();
        self.metrics.observe(elapsed, self.failed);
        if elapsed >= self.slow {
            tracing::warn!(
                db = %self.db,
                sql = %self.sql,
                ms = elapsed.as_millis() as u64,
                failed = self.failed,
                "slow query"
            );
        }
    }
}

/// Cancels a query's task when its stream is dropped.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        // Cancels the plan and every task it spawned at their next yield.
        self.0.abort();
    }
}

/// Runs SQL over a storage engine's databases. Cheap to clone.
#[derive(Clone)]
pub struct QueryEngine {
    storage: Engine,
    runtime: Arc<RuntimeEnv>,
    /// What every query's session starts from: configuration, functions, rules
    /// and planners, made once (`QueryEngine::session`).
    base: Arc<SessionState>,
    /// Optimized plans of statements run before (`plan_cache.rs`).
    plans: Arc<PlanCache>,
    indexes: Arc<IndexCache>,
    limits: QueryLimits,
    /// The memory every query's pool also draws on (`QueryLimits::total_memory_bytes`).
    shared_memory: Arc<GreedyMemoryPool>,
    executor: Arc<Executor>,
    alerts: Option<Arc<dyn AlertSource>>,
    metrics: Arc<QueryMetrics>,
    /// Held by a rollup refresh and a rollup's removal: one at a time.
    pub(crate) rollup_lock: Arc<tokio::sync::Mutex<()>>,
    /// `system.devices` as last built for each database.
    devices: Arc<DevicesMemo>,
}

/// The threads queries run on, apart from the ones serving requests: a query that
/// keeps every core busy cannot stall the HTTP server, its timers, or writes.
struct Executor {
    runtime: Option<tokio::runtime::Runtime>,
}

impl Executor {
    fn new() -> Result<Self, QueryError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .thread_name("citytsdb-query")
            // Planning recurses through the statement's tree: with MAX_OPERATORS
            // links and the test profile's larger frames, tens of MiB. Only the
            // pages a thread touches are ever committed.
            .thread_stack_size(64 << 20)
            .enable_all()
            .build()
            .map_err(|e| QueryError::Internal(format!("cannot start the query threads: {e}")))?;
        Ok(Self {
            runtime: Some(runtime),
        })
    }

    fn handle(&self) -> &tokio::runtime::Handle {
        // Only `drop` takes the runtime out.
        self.runtime
            .as_ref()
            .expect("the query runtime lives until drop")
            .handle()
    }
}

impl Drop for Executor {
    fn drop(&mut self) {
        // May run inside the server's runtime, where a blocking shutdown would panic.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl QueryEngine {
    /// The storage engine it reads.
    pub fn storage(&self) -> &Engine {
        &self.storage
    }

    /// A query engine over `storage`, reading segments from its object store.
    pub fn new(storage: Engine, limits: QueryLimits) -> Result<Self, QueryError> {
        let shared_memory = Arc::new(GreedyMemoryPool::new(limits.total_memory_bytes));
        // A plan run without its own task context (`QueryEngine::task_context`)
        // still stays within one query's limit and the shared pool.
        let runtime = RuntimeEnvBuilder::new()
            .with_memory_pool(Arc::new(crate::memory::SharedPool::new(
                limits.memory_bytes,
                shared_memory.clone(),
            )))
            .build_arc()
            .map_err(|e| QueryError::Internal(e.to_string()))?;
        let url = url::Url::parse(STORE_URL).map_err(|e| QueryError::Internal(e.to_string()))?;
        runtime.register_object_store(&url, storage.store().clone());
        Ok(Self {
            storage,
            base: Arc::new(base_state(runtime.clone())),
            plans: Arc::default(),
            runtime,
            indexes: Arc::new(IndexCache::default()),
            limits,
            shared_memory,
            executor: Arc::new(Executor::new()?),
            alerts: None,
            metrics: Arc::default(),
            rollup_lock: Arc::default(),
            devices: Arc::default(),
        })
    }

    /// Serves `system.rules`, `system.alerts` and `system.alert_events` from
    /// `alerts` (they are empty without one).
    pub fn with_alerts(mut self, alerts: Arc<dyn AlertSource>) -> Self {
        self.alerts = Some(alerts);
        self
    }

    /// The runtime queries run on.
    pub(crate) fn executor_handle(&self) -> &tokio::runtime::Handle {
        self.executor.handle()
    }

    /// What queries it has run.
    pub fn metrics(&self) -> &QueryMetrics {
        &self.metrics
    }

    /// The optimized plans it keeps of statements run before.
    pub fn plan_cache(&self) -> &PlanCache {
        &self.plans
    }

    /// The limits every query runs under.
    pub fn limits(&self) -> QueryLimits {
        self.limits
    }

    /// Runs one read-only statement against `db` and collects the answer, stopping it
    /// with [`QueryError::Timeout`] or [`QueryError::ResourcesExhausted`] past a limit.
    pub async fn query(&self, db: &str, sql: &str) -> Result<QueryOutput, QueryError> {
        let mut stream = self.stream(db, sql).await?;
        let mut batches = Vec::new();
        while let Some(b) = stream.next().await {
            batches.push(b?);
        }
        Ok(QueryOutput {
            schema: stream.schema,
            batches,
        })
    }

    /// Plans one read-only statement against `db` and starts it; its batches come
    /// out of the returned stream as they are made, at most [`STREAM_AHEAD`] ahead
    /// of the reader. The limits hold for the whole stream: past one, the stream's
    /// last item is the error. Dropping the stream cancels the query.
    pub async fn stream(&self, db: &str, sql: &str) -> Result<QueryStream, QueryError> {
        let deadline = tokio::time::Instant::now() + self.limits.timeout;
        let (tx, mut rx) = tokio::sync::mpsc::channel(STREAM_AHEAD);
        let (schema_tx, schema_rx) = tokio::sync::oneshot::channel();
        let this = self.clone();
        let (db, sql) = (db.to_string(), sql.to_string());
        let timeout = self.timeout_error();
        let timed = Timed {
            metrics: self.metrics.clone(),
            started: std::time::Instant::now(),
            failed: true,
            slow: self.limits.slow,
            db: db.to_string(),
            sql: sql.to_string(),
        };
        let task = self.executor.handle().spawn(
            async move {
                // The whole guard moves in: it records when the task ends or is aborted.
                let mut timed = timed;
                let work = async {
                    // The session lives as long as the stream: it holds the snapshot,
                    // whose pin keeps the segments being read from the collector.
                    let (_session, mut stream) = this.query_stream(&db, &sql).await?;
                    let _ = schema_tx.send(stream.schema());
                    while let Some(batch) = stream.next().await {
                        let batch = batch.map_err(|e| QueryError::from_datafusion(e, &sql))?;
                        if tx.send(Ok(batch)).await.is_err() {
                            break; // The reader went away.
                        }
                    }
                    Ok(())
                };
                let failure = match tokio::time::timeout_at(deadline, work).await {
                    Ok(Ok(())) => {
                        timed.failed = false;
                        return;
                    }
                    Ok(Err(e)) => this.explain_limit(e),
                    Err(_) => timeout,
                };
                let _ = tx.send(Err(failure)).await;
            }
            .instrument(tracing::Span::current()),
        );
        let guard = AbortOnDrop(task.abort_handle());
        // Planning, within the time limit even if the planner never yields.
        match tokio::time::timeout_at(deadline, schema_rx).await {
            Ok(Ok(schema)) => Ok(QueryStream {
                schema,
                rx,
                deadline,
                timeout: self.timeout_error(),
                _guard: guard,
            }),
            Ok(Err(_)) => match rx.recv().await {
                Some(Err(e)) => Err(e),
                _ => Err(QueryError::Internal(
                    "the query task ended without an answer".into(),
                )),
            },
            Err(_) => Err(self.timeout_error()),
        }
    }

    fn timeout_error(&self) -> QueryError {
        QueryError::Timeout(format!(
            "query exceeded its time limit of {:?}",
            self.limits.timeout
        ))
    }

    fn explain_limit(&self, e: QueryError) -> QueryError {
        match e {
            QueryError::ResourcesExhausted(m) => QueryError::ResourcesExhausted(format!(
                "query exceeded its memory limit of {} bytes: {m}",
                self.limits.memory_bytes
            )),
            other => other,
        }
    }

    /// Plans one read-only statement against `db` and starts executing it on the
    /// calling runtime. Keep the session state until the stream is done: its
    /// snapshot pins the catalog version whose segments the stream reads.
    async fn query_stream(
        &self,
        db: &str,
        sql: &str,
    ) -> Result<(SessionState, SendableRecordBatchStream), QueryError> {
        let err = |e| QueryError::from_datafusion(e, sql);
        let snapshot = self
            .storage
            .snapshot(db)
            .ok_or_else(|| QueryError::DatabaseNotFound(db.to_string()))?;
        let mut state = self.state_of(db, snapshot, true)?;
        // Marks the start of execution: `now()` is this moment.
        state.mark_start_execution();
        // A kept plan was checked when it was made, from this very text.
        let plan = match self.plans.get(db, sql, &state).await {
            Some(Kept::Physical(physical)) => {
                let task = self.task_context(&state, &physical);
                let stream =
                    datafusion::physical_plan::execute_stream(physical, task).map_err(err)?;
                return Ok((state, stream));
            }
            Some(Kept::Logical(plan)) => plan,
            None => {
                let rewritten = check_read_only(sql)?;
                let text = rewritten.as_deref().unwrap_or(sql);
                let logical = state.create_logical_plan(text).await.map_err(err)?;
                SQLOptions::new()
                    .with_allow_ddl(false)
                    .with_allow_dml(false)
                    .with_allow_statements(false)
                    .verify_plan(&logical)
                    .map_err(err)?;
                let optimized = state.optimize(&logical).map_err(err)?;
                self.plans.put(db, sql, &logical, &optimized);
                optimized
            }
        };
        let physical = state
            .query_planner()
            .create_physical_plan(&plan, &state)
            .await
            .map_err(err)?;
        self.plans.put_physical(db, sql, &physical);
        let task = self.task_context(&state, &physical);
        let stream = datafusion::physical_plan::execute_stream(physical, task).map_err(err)?;
        Ok((state, stream))
    }

    /// A session with our configuration, functions and rules, and no tables yet:
    /// a copy of the engine's base state with a catalog list of its own.
    pub(crate) fn session(&self) -> SessionContext {
        let mut state = self.base.as_ref().clone();
        state.register_catalog_list(Arc::new(MemoryCatalogProviderList::new()));
        SessionContext::new_with_state(state)
    }

    /// A task context for running `plan`, planned in `state`: a memory pool of its
    /// own (`QueryLimits::memory_bytes`) that also draws on the pool all queries
    /// share; caches, spill files and stores are the engine's.
    pub(crate) fn task_context(
        &self,
        state: &SessionState,
        plan: &Arc<dyn ExecutionPlan>,
    ) -> Arc<TaskContext> {
        let runtime = Arc::new(RuntimeEnv {
            memory_pool: Arc::new(TrackConsumersPool::new(
                crate::memory::SharedPool::new(
                    self.limits.memory_bytes,
                    self.shared_memory.clone(),
                ),
                std::num::NonZeroUsize::new(3).expect("3 is not zero"),
            )),
            disk_manager: self.runtime.disk_manager.clone(),
            cache_manager: self.runtime.cache_manager.clone(),
            object_store_registry: self.runtime.object_store_registry.clone(),
        });
        // A physical plan holds its functions: only information_schema's
        // `routines` and `parameters`, streamed tables, list them from the task
        // context. Copying DataFusion's ~300 functions by name for every query
        // costs more than a small query's scan.
        let context = match streams_a_table(plan) {
            true => TaskContext::from(state).with_runtime(runtime),
            false => TaskContext::new(
                None,
                state.session_id().to_string(),
                state.config().clone(),
                Default::default(),
                Default::default(),
                Default::default(),
                Default::default(),
                runtime,
            ),
        };
        Arc::new(context)
    }

    /// Plans `df`, runs it in a task context of its own and collects the answer.
    pub(crate) async fn collect(
        &self,
        df: DataFrame,
    ) -> datafusion::common::Result<Vec<RecordBatch>> {
        let (state, plan) = df.into_parts();
        let physical = state.create_physical_plan(&plan).await?;
        let task = self.task_context(&state, &physical);
        datafusion::physical_plan::collect(physical, task).await
    }

    fn context(&self, db: &str) -> Result<SessionContext, QueryError> {
        let snapshot = self
            .storage
            .snapshot(db)
            .ok_or_else(|| QueryError::DatabaseNotFound(db.to_string()))?;
        self.context_of(db, snapshot, true)
    }

    /// A session over `snapshot` in which a rollup's table holds only its
    /// materialised rows (for the refresher).
    pub(crate) fn raw_context(
        &self,
        db: &str,
        snapshot: citytsdb_storage::DbSnapshot,
    ) -> Result<SessionContext, QueryError> {
        self.context_of(db, snapshot, false)
    }

    /// A session over `snapshot`, a view of `db`; with `views`, a rollup answers
    /// with its dirty buckets computed from the raw rows.
    fn context_of(
        &self,
        db: &str,
        snapshot: citytsdb_storage::DbSnapshot,
        views: bool,
    ) -> Result<SessionContext, QueryError> {
        Ok(SessionContext::new_with_state(
            self.state_of(db, snapshot, views)?,
        ))
    }

    /// The session state of [`Self::context_of`]: the base state copied once, with
    /// the catalog of `snapshot` and the latest-rows rule of `db`.
    fn state_of(
        &self,
        db: &str,
        snapshot: citytsdb_storage::DbSnapshot,
        views: bool,
    ) -> Result<SessionState, QueryError> {
        let mut state = self.base.as_ref().clone();
        let catalog = MemoryCatalogProvider::new();
        let snapshot = Arc::new(snapshot);
        let schema = DatabaseSchema::new(
            snapshot.clone(),
            self.storage.store().clone(),
            self.indexes.clone(),
        )
        .with_rollup_views(views);
        catalog
            .register_schema("public", Arc::new(schema))
            .map_err(|e| QueryError::Internal(e.to_string()))?;
        let system = SystemSchema::new(self.storage.clone(), snapshot.clone(), self.alerts.clone())
            .with_devices_memo(self.devices.clone());
        catalog
            .register_schema(SYSTEM_SCHEMA, Arc::new(system))
            .map_err(|e| QueryError::Internal(e.to_string()))?;
        let catalogs = MemoryCatalogProviderList::new();
        catalogs.register_catalog(CATALOG.to_string(), Arc::new(catalog));
        state.register_catalog_list(Arc::new(catalogs));
        // A rollup's latest rows are not what the series registry holds.
        let tables = snapshot
            .schemas
            .iter()
            .filter(|(t, _)| snapshot.rollup(t).is_none())
            .map(|(t, s)| (t.clone(), s.clone()))
            .collect();
        state.add_analyzer_rule(Arc::new(LatestFromCache::new(
            self.storage.clone(),
            db,
            tables,
            CATALOG,
        )));
        Ok(state)
    }

    /// Runs `DELETE FROM table WHERE predicate` (checked by
    /// [`crate::delete::parse_delete`]) against `db`: every row `SELECT ... FROM table
    /// WHERE predicate` answers over the rows written before the call is deleted,
    /// durably, before it returns. Returns how many rows (distinct series and times).
    pub async fn delete(&self, db: &str, delete: &Delete) -> Result<u64, DeleteError> {
        if let Some(snapshot) = self.storage.snapshot(db) {
            crate::rollup::refuse_rollup(&snapshot, &delete.table, "delete from")?;
        }
        self.delete_rows(db, delete).await
    }

    /// [`QueryEngine::delete`], also of a rollup's materialised rows.
    pub(crate) async fn delete_rows(&self, db: &str, delete: &Delete) -> Result<u64, DeleteError> {
        let deadline = tokio::time::Instant::now() + self.limits.timeout;
        let mut turn = self.storage.begin_delete().await?;
        let snapshot = turn
            .snapshot(db)
            .ok_or_else(|| QueryError::DatabaseNotFound(db.to_string()))?;
        let Some(schema) = snapshot.schemas.get(&delete.table).cloned() else {
            return Err(QueryError::invalid(format!(
                "table '{}' not found in database '{db}'",
                delete.table
            ))
            .into());
        };
        let select = delete.select_keys(schema.tag_names());
        let ctx = self.context_of(db, snapshot, false)?;
        let options = SQLOptions::new()
            .with_allow_ddl(false)
            .with_allow_dml(false)
            .with_allow_statements(false);
        let find = async {
            // Positions would point into the SELECT, not the statement sent.
            let unplaced = |e| match QueryError::from_datafusion(e, &select) {
                QueryError::Invalid { message, .. } => QueryError::invalid(message),
                other => other,
            };
            let df = ctx
                .sql_with_options(&select, options)
                .await
                .map_err(unplaced)?;
            self.collect(df).await.map_err(unplaced)
        };
        let keys = match tokio::time::timeout_at(deadline, find).await {
            Ok(keys) => keys.map_err(|e| self.explain_limit(e))?,
            Err(_) => return Err(self.timeout_error().into()),
        };
        let stats = turn.delete_keys(db, &delete.table, &keys).await?;
        crate::delete::correct_latest(self, db, &delete.table, &schema, &keys).await?;
        Ok(stats.keys as u64)
    }

    /// Plans `sql` against `db` without running it: its answer's columns, and
    /// whether it is a plain filter on one table (no aggregate, grouping, window,
    /// ordering, limit, join or subquery), which can be checked row by row.
    pub async fn describe(&self, db: &str, sql: &str) -> Result<Described, QueryError> {
        let rewritten = check_read_only(sql)?;
        let text = rewritten.as_deref().unwrap_or(sql);
        let ctx = self.context(db)?;
        let state = ctx.state();
        let err = |e| QueryError::from_datafusion(e, sql);
        let plan = state.create_logical_plan(text).await.map_err(err)?;
        SQLOptions::new()
            .with_allow_ddl(false)
            .with_allow_dml(false)
            .with_allow_statements(false)
            .verify_plan(&plan)
            .map_err(err)?;
        // A rollup is not written to: its rules are evaluated on their schedule.
        let filter_table = plain_filter_table(&plan).filter(|t| !self.storage.is_rollup(db, t));
        let physical = state.create_physical_plan(&plan).await.map_err(err)?;
        Ok(Described {
            schema: physical.schema(),
            filter_table,
        })
    }
}

/// Whether `plan` reads a streamed table (`StreamingTableExec`), as
/// information_schema's tables are read.
fn streams_a_table(plan: &Arc<dyn ExecutionPlan>) -> bool {
    plan.name() == "StreamingTableExec" || plan.children().into_iter().any(streams_a_table)
}

/// The session state every query's starts from: our configuration, DataFusion's
/// functions and ours, our analyzer rules and planner, over `runtime`.
fn base_state(runtime: Arc<RuntimeEnv>) -> SessionState {
    let config = SessionConfig::new()
        .with_information_schema(true)
        .with_create_default_catalog_and_schema(false)
        .with_default_catalog_and_schema(CATALOG, "public")
        .set_str("datafusion.sql_parser.dialect", "PostgreSQL")
        .set_str("datafusion.sql_parser.collect_spans", "true")
        .set_str(
            "datafusion.sql_parser.recursion_limit",
            &RECURSION_LIMIT.to_string(),
        )
        .set_str("datafusion.execution.time_zone", "+00:00")
        // A table scan estimates its rows from the pruning (at most the rows
        // selected): one under a batch stays in one partition (`exec.rs`).
        .set_bool(
            "datafusion.execution.use_row_number_estimates_to_optimize_partitioning",
            true,
        );
    let mut builder = SessionStateBuilder::new()
        .with_config(config)
        .with_runtime_env(runtime)
        .with_default_features()
        .with_query_planner(Arc::new(CityQueryPlanner))
        // After DataFusion's rules, which plan the aggregates it replaces.
        .with_physical_optimizer_rule(Arc::new(crate::run_agg::RunAggregateRule));
    // Ours are registered after DataFusion's: a name both have is ours.
    let scalar = builder.scalar_functions().get_or_insert_with(Vec::new);
    scalar.extend(crate::gapfill::functions().into_iter().map(Arc::new));
    // TimescaleDB's name for the same bucketing (origin 1970-01-01T00:00:00Z).
    let date_bin = datafusion::functions::datetime::date_bin();
    scalar.push(Arc::new(
        date_bin.as_ref().clone().with_aliases(["time_bucket"]),
    ));
    builder
        .aggregate_functions()
        .get_or_insert_with(Vec::new)
        .extend(crate::first_last::functions().into_iter().map(Arc::new));
    let mut state = builder.build();
    state.add_analyzer_rule(Arc::new(FirstLastByTime));
    state.add_analyzer_rule(Arc::new(GapFillRule));
    state
}

/// What [`QueryEngine::describe`] learns of a query.
#[derive(Debug, Clone)]
pub struct Described {
    /// The answer's columns.
    pub schema: SchemaRef,
    /// The table, when the query is a plain filter on one table of the database.
    pub filter_table: Option<String>,
}

/// The table a plan filters and projects, if that is all it does.
fn plain_filter_table(plan: &datafusion::logical_expr::LogicalPlan) -> Option<String> {
    use datafusion::logical_expr::{Expr, LogicalPlan};
    let no_subquery = |e: &Expr| {
        !e.exists(|x| {
            Ok(matches!(
                x,
                Expr::ScalarSubquery(_) | Expr::Exists(_) | Expr::InSubquery(_)
            ))
        })
        .unwrap_or(true)
    };
    let mut node = plan;
    loop {
        match node {
            LogicalPlan::Projection(p) if p.expr.iter().all(no_subquery) => node = &p.input,
            LogicalPlan::Filter(f) if no_subquery(&f.predicate) => node = &f.input,
            LogicalPlan::SubqueryAlias(a) => node = &a.input,
            LogicalPlan::TableScan(scan) => {
                let r = &scan.table_name;
                let ours = r.schema().is_none_or(|s| s == "public")
                    && r.catalog().is_none_or(|c| c == CATALOG);
                return ours.then(|| r.table().to_string());
            }
            _ => return None,
        }
    }
}

/// Refuses anything but exactly one SELECT, EXPLAIN or SHOW statement; returns the
/// statement rewritten where DataFusion's own reading would surprise (`SHOW`).
fn check_read_only(sql: &str) -> Result<Option<String>, QueryError> {
    check_operators(sql)?;
    let statements = DFParser::parse_sql_with_dialect(sql, &PostgreSqlDialect {})
        .map_err(|e| QueryError::from_datafusion(e, sql))?;
    let mut iter = statements.iter();
    let Some(first) = iter.next() else {
        return Err(QueryError::invalid(
            "the query is empty: send one SELECT, EXPLAIN or SHOW statement",
        ));
    };
    if iter.next().is_some() {
        return Err(QueryError::invalid("send one statement per query"));
    }
    if !is_read_only(first) {
        return Err(QueryError::Invalid {
            message: format!(
                "only SELECT, EXPLAIN and SHOW statements are allowed; got {}",
                statement_keyword(sql)
            ),
            position: first_token_position(sql),
        });
    }
    Ok(rewrite_show(first))
}

/// Refuses a statement of more than [`MAX_OPERATORS`] operators, pointing at the
/// first one too many. Text the tokenizer cannot read is left to the parser, which
/// says what is wrong with it.
fn check_operators(sql: &str) -> Result<(), QueryError> {
    let dialect = PostgreSqlDialect {};
    let Ok(tokens) = Tokenizer::new(&dialect, sql).tokenize_with_location() else {
        return Ok(());
    };
    let mut operators = tokens.iter().filter(|t| {
        matches!(
            t.token,
            Token::Plus
                | Token::Minus
                | Token::Mul
                | Token::Div
                | Token::Mod
                | Token::Eq
                | Token::DoubleEq
                | Token::Neq
                | Token::Lt
                | Token::Gt
                | Token::LtEq
                | Token::GtEq
                | Token::StringConcat
                | Token::Ampersand
                | Token::Pipe
                | Token::Caret
        ) || matches!(&t.token, Token::Word(w) if matches!(w.keyword, Keyword::AND | Keyword::OR))
    });
    match operators.nth(MAX_OPERATORS) {
        None => Ok(()),
        Some(t) => Err(QueryError::Invalid {
            message: format!(
                "the statement holds more than {MAX_OPERATORS} operators; split it, or test many values with IN (...)"
            ),
            position: Some(Position {
                line: t.span.start.line,
                column: t.span.start.column,
            }),
        }),
    }
}

/// `SHOW COLUMNS FROM t` means the database's table `t`, not every schema's (the
/// `system` schema has tables of the same names); `SHOW TABLES` lists in a stable
/// order.
fn rewrite_show(statement: &DfStatement) -> Option<String> {
    let DfStatement::Statement(s) = statement else {
        return None;
    };
    match s.as_ref() {
        SqlStatement::ShowColumns {
            extended,
            full,
            show_options,
        } => {
            let name = show_options.show_in.as_ref()?.parent_name.as_ref()?;
            if name.0.len() != 1 || show_options.filter_position.is_some() {
                return None;
            }
            let mut qualified = name.clone();
            qualified.0.insert(
                0,
                datafusion::sql::sqlparser::ast::ObjectNamePart::Identifier("public".into()),
            );
            let mut options = show_options.clone();
            if let Some(show_in) = options.show_in.as_mut() {
                show_in.parent_name = Some(qualified);
            }
            Some(
                SqlStatement::ShowColumns {
                    extended: *extended,
                    full: *full,
                    show_options: options,
                }
                .to_string(),
            )
        }
        SqlStatement::ShowTables { show_options, .. }
            if show_options.show_in.is_none() && show_options.filter_position.is_none() =>
        {
            Some(
                "SELECT table_catalog, table_schema, table_name, table_type \
                 FROM information_schema.tables ORDER BY table_schema, table_name"
                    .to_string(),
            )
        }
        _ => None,
    }
}

fn is_read_only(s: &DfStatement) -> bool {
    match s {
        DfStatement::Statement(s) => match s.as_ref() {
            SqlStatement::Query(_)
            | SqlStatement::ShowTables { .. }
            | SqlStatement::ShowColumns { .. }
            | SqlStatement::ShowFunctions { .. } => true,
            SqlStatement::Explain { statement, .. } => {
                matches!(statement.as_ref(), SqlStatement::Query(_))
            }
            _ => false,
        },
        DfStatement::Explain(e) => is_read_only(&e.statement),
        _ => false,
    }
}

fn statement_keyword(sql: &str) -> String {
    sql.split_whitespace().next().unwrap_or("").to_uppercase()
}

fn first_token_position(sql: &str) -> Option<Position> {
    let mut line = 1;
    let mut column = 1;
    for c in sql.chars() {
        if !c.is_whitespace() {
            return Some(Position { line, column });
        }
        if c == '\n' {
            line += 1;
            column = 1;
        } else {
            column += 1;
        }
    }
    None
}

/// A storage engine over an in-memory object store (its WAL in a temporary
/// directory, kept alive by the returned guard) with table `t` of database `db`.
#[cfg(test)]
async fn test_store(
    t: citytsdb_storage::TableSchema,
) -> (tempfile::TempDir, citytsdb_storage::Engine) {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn object_store::ObjectStore> = Arc::new(object_store::memory::InMemory::new());
    let storage = citytsdb_storage::Engine::open(citytsdb_storage::EngineConfig::new(
        dir.path().to_path_buf(),
        store,
    ))
    .await
    .unwrap();
    storage.update_schemas("db", |s| s.insert("t".into(), t));
    (dir, storage)
}

#[cfg(test)]
mod fuzz;
#[cfg(test)]
mod merge_tests;
#[cfg(test)]
mod pin_tests;
#[cfg(test)]
mod run_agg_tests;
#[cfg(test)]
mod scan_tests;
#[cfg(test)]
mod session_tests;
#[cfg(test)]
mod system_tests;
