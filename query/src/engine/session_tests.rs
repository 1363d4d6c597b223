//! Each query's session: functions listed by information_schema although the
//! task context of other queries carries none.

use citytsdb_storage::{ColumnKind, FieldType, TableSchema};
use datafusion::arrow::array::AsArray;
use datafusion::arrow::datatypes::Int64Type;

use super::QueryEngine;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn information_schema_lists_the_functions() {
    let mut schema = TableSchema::default();
    schema.add_column("device", ColumnKind::Tag).unwrap();
    schema
        .add_column("v", ColumnKind::Field(FieldType::Float))
        .unwrap();
    let (_dir, storage) = super::test_store(schema).await;
    let engine = QueryEngine::new(storage, Default::default()).unwrap();
    let count = |sql: &'static str| {
        let engine = engine.clone();
        async move {
            let mut stream = engine.stream("db", sql).await.unwrap();
            let batch = stream.next().await.unwrap().unwrap();
            batch.column(0).as_primitive::<Int64Type>().value(0)
        }
    };
    // Twice each: the second run may come from the plan cache.
    for _ in 0..2 {
        let ours = "SELECT count(DISTINCT routine_name) FROM information_schema.routines \
                    WHERE routine_name IN ('time_bucket', 'locf', 'avg')";
        assert_eq!(count(ours).await, 3);
        let all = "SELECT count(DISTINCT routine_name) FROM information_schema.routines";
        assert!(count(all).await > 200);
        let parameters = "SELECT count(*) FROM information_schema.parameters \
                          WHERE specific_name = 'date_bin'";
        assert!(count(parameters).await > 0);
    }
}
