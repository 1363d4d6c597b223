//! A scan that reads one row group of a segment keeps the segment in one file
//! group; one that reads more is split across partitions as DataFusion splits
//! large files.

use std::sync::Arc;

use citytsdb_storage::{ColumnKind, FieldType, TableSchema};
use datafusion::arrow::array::{
    AsArray, Float64Array, RecordBatch, StringArray, TimestampNanosecondArray,
};
use datafusion::arrow::datatypes::Float64Type;

use super::QueryEngine;

fn schema() -> TableSchema {
    let mut t = TableSchema::default();
    t.add_column("device", ColumnKind::Tag).unwrap();
    t.add_column("v", ColumnKind::Field(FieldType::Float))
        .unwrap();
    t
}

/// Ten devices of `PER` rows each, every 100 ms of one day; values that do not
/// compress, so the segment is larger than DataFusion's smallest split.
const PER: usize = 30_000;

fn value(i: usize) -> f64 {
    let mut x = i as u64 ^ 0x9e37_79b9_7f4a_7c15;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    (x >> 11) as f64 / (1u64 << 53) as f64
}

fn rows() -> RecordBatch {
    let n = 10 * PER;
    RecordBatch::try_new(
        schema().arrow_schema(),
        vec![
            Arc::new(
                TimestampNanosecondArray::from_iter_values((0..n).map(|i| i as i64 * 100_000_000))
                    .with_timezone("UTC"),
            ),
            Arc::new(StringArray::from_iter_values(
                (0..n).map(|i| format!("d{}", i % 10)),
            )),
            Arc::new(Float64Array::from_iter_values((0..n).map(value))),
        ],
    )
    .unwrap()
}

async fn explain(engine: &QueryEngine, sql: &str) -> String {
    let out = engine.query("db", &format!("EXPLAIN {sql}")).await.unwrap();
    let mut text = String::new();
    for b in &out.batches {
        for r in 0..b.num_rows() {
            text.push_str(b.column(1).as_string::<i32>().value(r));
        }
    }
    text
}

async fn max_v(engine: &QueryEngine, sql: &str) -> f64 {
    let out = engine.query("db", sql).await.unwrap();
    out.batches[0]
        .column(0)
        .as_primitive::<Float64Type>()
        .value(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_row_group_is_read_by_one_partition() {
    let (_dir, storage) = super::test_store(schema()).await;
    storage
        .write("db", vec![("t".into(), rows())], false)
        .await
        .unwrap();
    storage.flush().await.unwrap();
    let engine = QueryEngine::new(storage.clone(), Default::default()).unwrap();

    // The segment holds the devices one after another, in row groups of 131,072
    // rows: d1's rows (30,000 to 59,999) lie in the first.
    let one = "SELECT max(v) FROM t WHERE device = 'd1'";
    let plan = explain(&engine, one).await;
    assert!(
        plan.contains("file_groups={1 group:") && plan.contains("rows_selected=30000"),
        "{plan}"
    );
    let expected = (0..10 * PER)
        .filter(|i| i % 10 == 1)
        .map(value)
        .fold(f64::MIN, f64::max);
    assert_eq!(max_v(&engine, one).await, expected);

    // d4's rows (120,000 to 149,999) reach into the second row group, and every
    // device's rows are all three: both are split.
    for (sql, device) in [
        ("SELECT max(v) FROM t WHERE device = 'd4'", Some(4)),
        ("SELECT max(v) FROM t", None),
    ] {
        let plan = explain(&engine, sql).await;
        assert!(plan.contains("file_groups={2 groups:"), "{sql}: {plan}");
        let expected = (0..10 * PER)
            .filter(|i| device.is_none_or(|d| i % 10 == d))
            .map(value)
            .fold(f64::MIN, f64::max);
        assert_eq!(max_v(&engine, sql).await, expected, "{sql}");
    }
    storage.shutdown().await.unwrap();
}
