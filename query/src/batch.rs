//! A rule's SQL planned once and run over each written batch (the alert fast
//! path): parsing, optimising and physical planning happen when the rule or the
//! table's columns change, not per batch; a run swaps the batch into the plan's
//! in-memory scan and executes on the query threads under the query time limit.

use std::sync::Arc;

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::catalog::{CatalogProvider, MemTable, MemoryCatalogProvider, SchemaProvider};
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::datasource::source::{DataSource as _, DataSourceExec};
use datafusion::execution::TaskContext;
use datafusion::physical_plan::{collect, ExecutionPlan};

use crate::engine::QueryEngine;
use crate::error::QueryError;

/// `sql` planned over a table of `input`'s columns.
pub struct BatchQuery {
    sql: String,
    input: SchemaRef,
    plan: Arc<dyn ExecutionPlan>,
    task: Arc<TaskContext>,
    engine: QueryEngine,
}

impl std::fmt::Debug for BatchQuery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchQuery")
            .field("sql", &self.sql)
            .finish()
    }
}

impl QueryEngine {
    /// Plans `sql` over a table `table` with columns `input`, for
    /// [`BatchQuery::run`] on batches of those columns.
    pub async fn plan_batch_query(
        &self,
        table: &str,
        input: SchemaRef,
        sql: &str,
    ) -> Result<BatchQuery, QueryError> {
        let ctx = self.session();
        let catalog = MemoryCatalogProvider::new();
        let schema = datafusion::catalog::MemorySchemaProvider::new();
        let provider = MemTable::try_new(input.clone(), vec![vec![]])
            .map_err(|e| QueryError::Internal(e.to_string()))?;
        schema
            .register_table(table.to_string(), Arc::new(provider))
            .map_err(|e| QueryError::Internal(e.to_string()))?;
        catalog
            .register_schema("public", Arc::new(schema))
            .map_err(|e| QueryError::Internal(e.to_string()))?;
        ctx.register_catalog(crate::engine::CATALOG, Arc::new(catalog));
        let err = |e| QueryError::from_datafusion(e, sql);
        let plan = ctx
            .sql(sql)
            .await
            .map_err(err)?
            .create_physical_plan()
            .await
            .map_err(err)?;
        let task = self.task_context(&ctx.state(), &plan);
        Ok(BatchQuery {
            sql: sql.to_string(),
            input,
            plan,
            task,
            engine: self.clone(),
        })
    }
}

impl BatchQuery {
    /// The columns it was planned for.
    pub fn input(&self) -> &SchemaRef {
        &self.input
    }

    /// Runs the query over `batch` alone (which must have the planned columns).
    pub async fn run(&self, batch: RecordBatch) -> Result<Vec<RecordBatch>, QueryError> {
        if batch.schema() != self.input {
            return Err(QueryError::Internal(format!(
                "a batch of other columns than {} was planned for",
                self.sql
            )));
        }
        let input = self.input.clone();
        let plan = self
            .plan
            .clone()
            .transform_up(|node| {
                let Some(scan) = node.downcast_ref::<DataSourceExec>() else {
                    return Ok(Transformed::no(node));
                };
                let Some(memory) = scan.data_source().downcast_ref::<MemorySourceConfig>() else {
                    return Ok(Transformed::no(node));
                };
                let source = MemorySourceConfig::try_new(
                    &[vec![batch.clone()]],
                    input.clone(),
                    memory.projection().clone(),
                )?
                .with_limit(memory.fetch());
                Ok(Transformed::yes(
                    DataSourceExec::from_data_source(source) as Arc<dyn ExecutionPlan>
                ))
            })
            .map_err(|e| QueryError::from_datafusion(e, &self.sql))?
            .data;
        let task = self.task.clone();
        let limit = self.engine.limits().timeout;
        let sql = self.sql.clone();
        let work = self.engine.executor_handle().spawn(async move {
            match tokio::time::timeout(limit, collect(plan, task)).await {
                Ok(answer) => answer.map_err(|e| QueryError::from_datafusion(e, &sql)),
                Err(_) => Err(QueryError::Timeout(format!(
                    "checking a written batch exceeded the query time limit of {limit:?}"
                ))),
            }
        });
        work.await
            .map_err(|e| QueryError::Internal(format!("the batch query task failed: {e}")))?
    }
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::array::{Float64Array, StringArray};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};

    use super::*;

    fn batch(schema: &SchemaRef, devices: &[&str], tilts: &[f64]) -> RecordBatch {
        RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(StringArray::from_iter_values(devices)),
                Arc::new(Float64Array::from_iter_values(tilts.iter().copied())),
            ],
        )
        .unwrap()
    }

    #[tokio::test]
    async fn planned_once_runs_over_each_batch() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn object_store::ObjectStore> =
            Arc::new(object_store::memory::InMemory::new());
        let storage = citytsdb_storage::Engine::open(citytsdb_storage::EngineConfig::new(
            dir.path().to_path_buf(),
            store,
        ))
        .await
        .unwrap();
        let engine = QueryEngine::new(storage.clone(), Default::default()).unwrap();
        let schema: SchemaRef = Arc::new(Schema::new(vec![
            Field::new("device", DataType::Utf8, true),
            Field::new("tilt_deg", DataType::Float64, true),
        ]));
        let q = engine
            .plan_batch_query(
                "manhole",
                schema.clone(),
                "SELECT device, tilt_deg * 2 AS twice FROM manhole WHERE tilt_deg > 15",
            )
            .await
            .unwrap();
        let rows = |out: Vec<RecordBatch>| -> Vec<String> {
            out.iter()
                .flat_map(|b| {
                    let d = b
                        .column(0)
                        .as_any()
                        .downcast_ref::<StringArray>()
                        .unwrap()
                        .clone();
                    let t = b
                        .column(1)
                        .as_any()
                        .downcast_ref::<Float64Array>()
                        .unwrap()
                        .clone();
                    (0..b.num_rows()).map(move |i| format!("{}={}", d.value(i), t.value(i)))
                })
                .collect()
        };
        let first = q
            .run(batch(&schema, &["a", "b"], &[20.0, 1.0]))
            .await
            .unwrap();
        assert_eq!(rows(first), ["a=40"]);
        let second = q
            .run(batch(&schema, &["c", "d", "e"], &[16.0, 30.0, 2.0]))
            .await
            .unwrap();
        assert_eq!(rows(second), ["c=32", "d=60"]);
        let empty = q.run(batch(&schema, &[], &[])).await.unwrap();
        assert!(rows(empty).is_empty());
        let other: SchemaRef = Arc::new(Schema::new(vec![Field::new("x", DataType::Utf8, true)]));
        let wrong =
            RecordBatch::try_new(other, vec![Arc::new(StringArray::from_iter_values(["x"]))])
                .unwrap();
        assert!(q.run(wrong).await.is_err());
        storage.shutdown().await.unwrap();
    }
}
