//! How rules reach the data: planning and running their SQL. [`EngineQueries`]
//! is the server's query and storage engines; [`MemoryQueries`] answers what a
//! test told it to.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use citytsdb_query::{BatchQuery, Described, QueryEngine, QueryError};
use citytsdb_storage::Engine;
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;

/// Plans and runs rule SQL.
#[async_trait]
pub trait RuleQueries: Send + Sync {
    /// Plans `sql` against `db` without running it: the answer's columns, and the
    /// table when the query is a plain filter on one table (checked on write).
    async fn describe(&self, db: &str, sql: &str) -> Result<Described, QueryError>;

    /// Runs `sql` against `db`: every row of the answer.
    async fn query(&self, db: &str, sql: &str) -> Result<Vec<RecordBatch>, QueryError>;

    /// The columns `db.table` has now (written but unpersisted ones included), to
    /// reshape a written batch before a rule reads it; `None` without such table.
    fn table_schema(&self, db: &str, table: &str) -> Option<SchemaRef>;

    /// Runs `sql` over `batch` alone, as if it were the whole of `table`.
    async fn query_batch(
        &self,
        table: &str,
        batch: RecordBatch,
        sql: &str,
    ) -> Result<Vec<RecordBatch>, QueryError>;
}

/// Most (table, SQL) pairs whose plans over a written batch are kept.
const MAX_BATCH_PLANS: usize = 1024;

/// Fast-path plans by (table, SQL).
type BatchPlans = HashMap<(String, String), Arc<BatchQuery>>;

/// Rule SQL on the server's engines.
#[derive(Clone)]
pub struct EngineQueries {
    query: QueryEngine,
    storage: Engine,
    /// The fast path's queries, planned once per (table, SQL) and columns.
    planned: Arc<Mutex<BatchPlans>>,
    plans: Arc<std::sync::atomic::AtomicUsize>,
}

impl EngineQueries {
    /// Rules read through `query`; written batches take `storage`'s table schemas.
    pub fn new(query: QueryEngine, storage: Engine) -> Self {
        Self {
            query,
            storage,
            planned: Arc::default(),
            plans: Arc::default(),
        }
    }

    /// How many times a query over written batches was planned.
    pub fn batch_plans(&self) -> usize {
        self.plans.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn planned(&self) -> MutexGuard<'_, BatchPlans> {
        self.planned.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl RuleQueries for EngineQueries {
    async fn describe(&self, db: &str, sql: &str) -> Result<Described, QueryError> {
        self.query.describe(db, sql).await
    }

    async fn query(&self, db: &str, sql: &str) -> Result<Vec<RecordBatch>, QueryError> {
        Ok(self.query.query(db, sql).await?.batches)
    }

    fn table_schema(&self, db: &str, table: &str) -> Option<SchemaRef> {
        Some(self.storage.table_schema(db, table)?.arrow_schema())
    }

    async fn query_batch(
        &self,
        table: &str,
        batch: RecordBatch,
        sql: &str,
    ) -> Result<Vec<RecordBatch>, QueryError> {
        let key = (table.to_string(), sql.to_string());
        let cached = self
            .planned()
            .get(&key)
            .filter(|q| *q.input() == batch.schema())
            .cloned();
        let planned = match cached {
            Some(q) => q,
            None => {
                let q = Arc::new(
                    self.query
                        .plan_batch_query(table, batch.schema(), sql)
                        .await?,
                );
                self.plans
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let mut planned = self.planned();
                if planned.len() >= MAX_BATCH_PLANS {
                    planned.clear();
                }
                planned.insert(key, q.clone());
                q
            }
        };
        planned.run(batch).await
    }
}

/// What [`MemoryQueries`] does with a written batch for one SQL text.
pub type BatchFilter = Arc<dyn Fn(&RecordBatch) -> RecordBatch + Send + Sync>;

#[derive(Default)]
struct Memory {
    tables: HashMap<(String, String), SchemaRef>,
    plans: HashMap<String, Described>,
    answers: HashMap<String, Result<Vec<RecordBatch>, String>>,
    filters: HashMap<String, BatchFilter>,
    queries: usize,
}

/// Answers rule SQL from what a test set, by SQL text: plans, answers (or
/// failures) and, for the fast path, a filter standing in for the query over a
/// written batch. A database exists once one of its tables is set.
#[derive(Default)]
pub struct MemoryQueries {
    memory: Mutex<Memory>,
}

impl MemoryQueries {
    fn memory(&self) -> MutexGuard<'_, Memory> {
        self.memory.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Declares `db.table` with `schema`.
    pub fn set_table(&self, db: &str, table: &str, schema: SchemaRef) {
        self.memory()
            .tables
            .insert((db.to_string(), table.to_string()), schema);
    }

    /// What describing `sql` gives: the answer's columns, and the table it is a
    /// plain filter of, if it is one.
    pub fn set_plan(&self, sql: &str, columns: SchemaRef, filter_table: Option<&str>) {
        self.memory().plans.insert(
            sql.to_string(),
            Described {
                schema: columns,
                filter_table: filter_table.map(str::to_string),
            },
        );
    }

    /// What running `sql` returns from now on.
    pub fn set_answer(&self, sql: &str, batches: Vec<RecordBatch>) {
        self.memory().answers.insert(sql.to_string(), Ok(batches));
    }

    /// Makes running `sql` fail with `message` from now on.
    pub fn set_failure(&self, sql: &str, message: &str) {
        self.memory()
            .answers
            .insert(sql.to_string(), Err(message.to_string()));
    }

    /// What running `sql` over a written batch returns: `filter` of the batch.
    pub fn set_batch_filter(&self, sql: &str, filter: BatchFilter) {
        self.memory().filters.insert(sql.to_string(), filter);
    }

    /// How many times [`RuleQueries::query`] ran.
    pub fn queries_run(&self) -> usize {
        self.memory().queries
    }
}

#[async_trait]
impl RuleQueries for MemoryQueries {
    async fn describe(&self, db: &str, sql: &str) -> Result<Described, QueryError> {
        let memory = self.memory();
        if !memory.tables.keys().any(|(d, _)| d == db) {
            return Err(QueryError::DatabaseNotFound(db.to_string()));
        }
        memory
            .plans
            .get(sql)
            .cloned()
            .ok_or_else(|| QueryError::invalid(format!("no plan was set for {sql}")))
    }

    async fn query(&self, _db: &str, sql: &str) -> Result<Vec<RecordBatch>, QueryError> {
        let mut memory = self.memory();
        memory.queries += 1;
        match memory.answers.get(sql) {
            Some(Ok(batches)) => Ok(batches.clone()),
            Some(Err(message)) => Err(QueryError::Internal(message.clone())),
            None => Ok(Vec::new()),
        }
    }

    fn table_schema(&self, db: &str, table: &str) -> Option<SchemaRef> {
        self.memory()
            .tables
            .get(&(db.to_string(), table.to_string()))
            .cloned()
    }

    async fn query_batch(
        &self,
        _table: &str,
        batch: RecordBatch,
        sql: &str,
    ) -> Result<Vec<RecordBatch>, QueryError> {
        let filter = self.memory().filters.get(sql).cloned();
        match filter {
            Some(f) => Ok(vec![f(&batch)]),
            None => Err(QueryError::Internal(format!(
                "no batch filter was set for {sql}"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::array::{Float64Array, StringArray};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};

    use super::*;

    #[tokio::test]
    async fn a_fast_path_query_is_planned_once_per_columns() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn object_store::ObjectStore> =
            Arc::new(object_store::memory::InMemory::new());
        let storage = Engine::open(citytsdb_storage::EngineConfig::new(
            dir.path().to_path_buf(),
            store,
        ))
        .await
        .unwrap();
        let query = QueryEngine::new(storage.clone(), Default::default()).unwrap();
        let queries = EngineQueries::new(query, storage.clone());
        let schema: SchemaRef = Arc::new(Schema::new(vec![
            Field::new("device", DataType::Utf8, true),
            Field::new("tilt_deg", DataType::Float64, true),
        ]));
        let batch = |tilt: f64| {
            RecordBatch::try_new(
                schema.clone(),
                vec![
                    Arc::new(StringArray::from_iter_values(["a"])),
                    Arc::new(Float64Array::from_iter_values([tilt])),
                ],
            )
            .unwrap()
        };
        let sql = "SELECT device FROM manhole WHERE tilt_deg > 15";
        let mut matched = 0;
        for tilt in [20.0, 1.0, 30.0] {
            let out = queries
                .query_batch("manhole", batch(tilt), sql)
                .await
                .unwrap();
            matched += out.iter().map(|b| b.num_rows()).sum::<usize>();
        }
        assert_eq!(matched, 2);
        assert_eq!(queries.batch_plans(), 1, "planned once for three batches");
        // New columns: planned again.
        let wider: SchemaRef = Arc::new(Schema::new(vec![
            Field::new("device", DataType::Utf8, true),
            Field::new("tilt_deg", DataType::Float64, true),
            Field::new("water_level_cm", DataType::Float64, true),
        ]));
        let b = RecordBatch::try_new(
            wider,
            vec![
                Arc::new(StringArray::from_iter_values(["a"])),
                Arc::new(Float64Array::from_iter_values([16.0])),
                Arc::new(Float64Array::from_iter_values([1.0])),
            ],
        )
        .unwrap();
        let out = queries.query_batch("manhole", b, sql).await.unwrap();
        assert_eq!(out.iter().map(|b| b.num_rows()).sum::<usize>(), 1);
        assert_eq!(queries.batch_plans(), 2);
        storage.shutdown().await.unwrap();
    }
}
