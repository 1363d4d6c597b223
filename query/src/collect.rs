//! Plan nodes that answer only once they have their whole input: gap filling
//! (`gapfill.rs`) needs every bucket of a group, the latest row per key
//! (`latest.rs`) every row of a key. [`CollectExec`] is the one node for them:
//!
//! 1. it runs every partition of its input and collects the batches, charging
//!    their bytes to the query's memory pool (past `--query-memory-limit` the
//!    query stops with a clear error instead of growing);
//! 2. concatenates them into one batch;
//! 3. hands it to its [`Transform`], whose answer is its single output batch.

use std::fmt;
use std::sync::Arc;

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::compute::concat_batches;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::common::{exec_err, Result};
use datafusion::execution::memory_pool::{MemoryConsumer, MemoryReservation};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr, PhysicalSortExpr};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, Partitioning, PlanProperties,
    ReplaceChildrenOptions,
};
use futures::StreamExt;

/// What a [`CollectExec`] does with its whole input.
pub trait Transform: fmt::Debug + Clone + Send + Sync + 'static {
    /// The node's name in plans, e.g. `GapFillExec`.
    const NAME: &'static str;

    /// The schema of the answer, given the input's.
    fn schema(&self, input: &SchemaRef) -> SchemaRef;

    /// What `EXPLAIN` shows after the name, e.g. `stride=300000000000ns`.
    fn describe(&self, input: &SchemaRef, f: &mut fmt::Formatter<'_>) -> fmt::Result;

    /// The answer, from every input row in one batch (of the input's schema); its
    /// columns are taken under [`Transform::schema`].
    fn apply(&self, input: &RecordBatch) -> Result<RecordBatch>;

    /// The order the answer's rows come in, if [`Transform::apply`] promises one
    /// (a sort above then has nothing to do and goes).
    fn ordering(&self, _input: &SchemaRef) -> Vec<PhysicalSortExpr> {
        Vec::new()
    }
}

/// Collects its input, then applies `T` to all of it; one output partition.
#[derive(Debug)]
pub struct CollectExec<T: Transform> {
    input: Arc<dyn ExecutionPlan>,
    transform: T,
    properties: Arc<PlanProperties>,
}

impl<T: Transform> CollectExec<T> {
    /// `transform` over everything `input` produces.
    pub fn new(input: Arc<dyn ExecutionPlan>, transform: T) -> Self {
        let schema = transform.schema(&input.schema());
        let ordering = transform.ordering(&input.schema());
        let equivalences = match ordering.is_empty() {
            true => EquivalenceProperties::new(schema),
            false => EquivalenceProperties::new_with_orderings(schema, [ordering]),
        };
        let properties = Arc::new(PlanProperties::new(
            equivalences,
            Partitioning::UnknownPartitioning(1),
            EmissionType::Final,
            Boundedness::Bounded,
        ));
        Self {
            input,
            transform,
            properties,
        }
    }

    /// What the node does.
    pub fn transform(&self) -> &T {
        &self.transform
    }
}

impl<T: Transform> DisplayAs for CollectExec<T> {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", T::NAME)?;
        self.transform.describe(&self.input.schema(), f)
    }
}

impl<T: Transform> ExecutionPlan for CollectExec<T> {
    fn name(&self) -> &str {
        T::NAME
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn benefits_from_input_partitioning(&self) -> Vec<bool> {
        vec![false]
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
        if children.len() != 1 {
            return exec_err!("{} takes one input, given {}", T::NAME, children.len());
        }
        Ok(Arc::new(Self::new(
            children.swap_remove(0),
            self.transform.clone(),
        )))
    }

    crate::exec::with_new_children_by_replace!();

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        if partition != 0 {
            return exec_err!("{} has one partition, asked for {partition}", T::NAME);
        }
        let mut streams = Vec::new();
        for p in 0..self.input.properties().partitioning.partition_count() {
            streams.push(self.input.execute(p, context.clone())?);
        }
        let reservation = MemoryConsumer::new(T::NAME).register(context.memory_pool());
        let input_schema = self.input.schema();
        let schema = self.schema();
        let transform = self.transform.clone();
        let fut = {
            let schema = schema.clone();
            async move {
                let input = collect(streams, &input_schema, reservation).await?;
                let out = transform.apply(&input)?;
                Ok(RecordBatch::try_new(schema, out.columns().to_vec())?)
            }
        };
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            schema,
            futures::stream::once(fut),
        )))
    }
}

/// Every batch of `streams` in one batch, its bytes charged to `reservation`
/// while they are held (the batches and their concatenation, at the peak).
pub(crate) async fn collect(
    streams: Vec<SendableRecordBatchStream>,
    schema: &SchemaRef,
    reservation: MemoryReservation,
) -> Result<RecordBatch> {
    let mut batches = Vec::new();
    for mut s in streams {
        while let Some(batch) = s.next().await {
            let batch = batch?;
            reservation.try_grow(batch.get_array_memory_size())?;
            batches.push(batch);
        }
    }
    let collected = reservation.size();
    reservation.try_grow(collected)?;
    let one = concat_batches(schema, &batches)?;
    drop(batches);
    reservation.shrink(collected);
    Ok(one)
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::array::Int64Array;
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use datafusion::datasource::memory::MemorySourceConfig;
    use datafusion::execution::memory_pool::GreedyMemoryPool;
    use datafusion::execution::runtime_env::RuntimeEnvBuilder;
    use datafusion::physical_plan::common::collect as collect_all;

    use super::*;

    /// Sums its input's column into one row.
    #[derive(Debug, Clone)]
    struct Sum;

    impl Transform for Sum {
        const NAME: &'static str = "SumExec";

        fn schema(&self, input: &SchemaRef) -> SchemaRef {
            input.clone()
        }

        fn describe(&self, _input: &SchemaRef, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "all rows")
        }

        fn apply(&self, input: &RecordBatch) -> Result<RecordBatch> {
            let v = input.column(0).as_any().downcast_ref::<Int64Array>();
            let total: i64 = v.map(|a| a.values().iter().sum()).unwrap_or(0);
            Ok(RecordBatch::try_new(
                input.schema(),
                vec![Arc::new(Int64Array::from(vec![total]))],
            )?)
        }
    }

    fn input(partitions: usize, rows: i64) -> Arc<dyn ExecutionPlan> {
        let schema = Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, false)]));
        let parts: Vec<Vec<RecordBatch>> = (0..partitions)
            .map(|_| {
                vec![RecordBatch::try_new(
                    schema.clone(),
                    vec![Arc::new(Int64Array::from_iter_values(0..rows))],
                )
                .unwrap()]
            })
            .collect();
        MemorySourceConfig::try_new_exec(&parts, schema, None).unwrap()
    }

    fn context(limit: usize) -> Arc<TaskContext> {
        let runtime = RuntimeEnvBuilder::new()
            .with_memory_pool(Arc::new(GreedyMemoryPool::new(limit)))
            .build_arc()
            .unwrap();
        Arc::new(TaskContext::default().with_runtime(runtime))
    }

    #[tokio::test]
    async fn every_partition_is_collected_once() {
        let exec = Arc::new(CollectExec::new(input(3, 10), Sum));
        let out = collect_all(exec.execute(0, context(1 << 30)).unwrap())
            .await
            .unwrap();
        let v = out[0].column(0).as_any().downcast_ref::<Int64Array>();
        assert_eq!(v.map(|a| a.value(0)), Some(3 * 45));
        assert!(exec.execute(1, context(1 << 30)).is_err());
        let shown = format!(
            "{}",
            datafusion::physical_plan::displayable(exec.as_ref()).one_line()
        );
        assert_eq!(shown.trim(), "SumExec: all rows");
    }

    #[tokio::test]
    async fn the_collected_bytes_count_against_the_memory_limit() {
        let exec = Arc::new(CollectExec::new(input(2, 100_000), Sum));
        let err = collect_all(exec.execute(0, context(256 << 10)).unwrap())
            .await
            .unwrap_err();
        assert!(err.to_string().contains("Resources exhausted"), "{err}");
        let pool = context(64 << 20);
        let ok = collect_all(exec.execute(0, pool.clone()).unwrap()).await;
        assert!(ok.is_ok());
        assert_eq!(pool.memory_pool().reserved(), 0, "released once answered");
    }
}
