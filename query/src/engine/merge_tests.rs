//! Buffered rows over a flushed segment's last seconds: the merge holds only the
//! rows of the seconds they share, so a query of the whole day needs little memory,
//! and its answer has each (series, time) once with the newest values.

use std::sync::Arc;

use citytsdb_storage::{ColumnKind, FieldType, TableSchema};
use datafusion::arrow::array::{AsArray, Float64Array, StringArray, TimestampNanosecondArray};
use datafusion::arrow::datatypes::{Float64Type, Int64Type};
use datafusion::arrow::record_batch::RecordBatch;

use super::{QueryEngine, QueryLimits};

fn schema() -> TableSchema {
    let mut t = TableSchema::default();
    t.add_column("device", ColumnKind::Tag).unwrap();
    t.add_column("v", ColumnKind::Field(FieldType::Float))
        .unwrap();
    t
}

/// Rows at seconds `times`, device `d{t % 10}`, value `value(t)`.
fn rows(times: std::ops::Range<i64>, value: impl Fn(i64) -> f64) -> RecordBatch {
    RecordBatch::try_new(
        schema().arrow_schema(),
        vec![
            Arc::new(
                TimestampNanosecondArray::from_iter_values(
                    times.clone().map(|t| t * 1_000_000_000),
                )
                .with_timezone("UTC"),
            ),
            Arc::new(StringArray::from_iter_values(
                times.clone().map(|t| format!("d{}", t % 10)),
            )),
            Arc::new(Float64Array::from_iter_values(times.map(value))),
        ],
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merging_the_buffer_with_a_segment_holds_only_the_seconds_they_share() {
    let (_dir, storage) = super::test_store(schema()).await;
    // A flushed day of 80,000 seconds, then buffered rows over its last 100
    // seconds (new values) and 100 seconds past it.
    const N: i64 = 80_000;
    let write = |batch| storage.write("db", vec![("t".into(), batch)], false);
    write(rows(0..N, |t| t as f64)).await.unwrap();
    storage.flush().await.unwrap();
    write(rows(N - 100..N + 100, |_| -1.0)).await.unwrap();

    // Far less memory than the day's rows take, more than the overlap's.
    let limits = QueryLimits {
        memory_bytes: 512 << 10,
        ..QueryLimits::default()
    };
    let engine = QueryEngine::new(storage.clone(), limits).unwrap();
    let out = engine
        .query("db", "SELECT count(*) AS n, sum(v) AS total FROM t")
        .await
        .expect("the merge holds only the shared seconds");
    let b = &out.batches[0];
    let n = b.column(0).as_primitive::<Int64Type>().value(0);
    let total = b.column(1).as_primitive::<Float64Type>().value(0);
    // Each second once: the 100 shared seconds are not counted twice.
    assert_eq!(n, N + 100);
    let kept: f64 = (0..N - 100).map(|t| t as f64).sum();
    assert_eq!(total, kept - 200.0);
    storage.shutdown().await.unwrap();
}
