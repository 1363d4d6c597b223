//! What the Parquet reader is asked to prune by: only what the segment indexes
//! did not answer already.

use std::sync::Arc;

use citytsdb_storage::{ColumnKind, FieldType, TableSchema};
use datafusion::arrow::array::{AsArray, Float64Array, StringArray, TimestampNanosecondArray};
use datafusion::arrow::record_batch::RecordBatch;

use super::QueryEngine;

fn schema() -> TableSchema {
    let mut t = TableSchema::default();
    t.add_column("device", ColumnKind::Tag).unwrap();
    t.add_column("v", ColumnKind::Field(FieldType::Float))
        .unwrap();
    t
}

/// `n` readings of `device`, one a second from second `from`.
fn rows(device: &str, from: i64, n: i64) -> RecordBatch {
    RecordBatch::try_new(
        schema().arrow_schema(),
        vec![
            Arc::new(
                TimestampNanosecondArray::from_iter_values(
                    (from..from + n).map(|s| s * 1_000_000_000),
                )
                .with_timezone("UTC"),
            ),
            Arc::new(StringArray::from_iter_values(
                (0..n).map(|_| device.to_string()),
            )),
            Arc::new(Float64Array::from_iter_values(
                (from..from + n).map(|s| s as f64),
            )),
        ],
    )
    .unwrap()
}

/// The predicate of each `DataSourceExec` of `sql`'s plan ("" for none).
async fn scans(engine: &QueryEngine, sql: &str) -> Vec<String> {
    let out = engine.query("db", &format!("EXPLAIN {sql}")).await.unwrap();
    let mut lines = Vec::new();
    for b in &out.batches {
        for r in 0..b.num_rows() {
            let text = b.column(1).as_string::<i32>().value(r);
            lines.extend(
                text.lines()
                    .filter(|l| l.contains("DataSourceExec"))
                    .map(|l| match l.split_once(", predicate=") {
                        Some((_, p)) => p.split(", pruning_predicate=").next().unwrap().to_string(),
                        None => String::new(),
                    }),
            );
        }
    }
    lines
}

/// The whole text of `sql`'s plan.
async fn plan_text(engine: &QueryEngine, sql: &str) -> String {
    let out = engine.query("db", &format!("EXPLAIN {sql}")).await.unwrap();
    let mut text = String::new();
    for b in &out.batches {
        for r in 0..b.num_rows() {
            text.push_str(b.column(1).as_string::<i32>().value(r));
            text.push('\n');
        }
    }
    text
}

async fn count(engine: &QueryEngine, sql: &str) -> i64 {
    let out = engine.query("db", sql).await.unwrap();
    out.batches[0]
        .column(0)
        .as_primitive::<datafusion::arrow::datatypes::Int64Type>()
        .value(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reader_prunes_only_by_what_the_index_did_not_answer() {
    let (_dir, storage) = super::test_store(schema()).await;
    // Ten devices of 100 readings in one flushed segment (one time page), and one
    // device of 40,000 readings (three time pages of 16,384 rows).
    let mut parts: Vec<RecordBatch> = (0..10).map(|d| rows(&format!("d{d}"), 0, 100)).collect();
    parts.push(rows("busy", 0, 40_000));
    let batch =
        datafusion::arrow::compute::concat_batches(&parts[0].schema(), parts.iter()).unwrap();
    storage
        .write("db", vec![("t".into(), batch)], false)
        .await
        .unwrap();
    storage.flush().await.unwrap();
    let engine = QueryEngine::new(storage.clone(), Default::default()).unwrap();
    let range = "time >= '1970-01-01T00:00:10Z' AND time < '1970-01-01T00:00:50Z'";

    // One device in one page: the index picked its rows, nothing is left to prune.
    let sql = format!("SELECT count(*) FROM t WHERE device = 'd3' AND {range}");
    let plan = scans(&engine, &sql).await;
    assert!(!plan.is_empty(), "a segment is read: {plan:?}");
    assert!(plan.iter().all(String::is_empty), "{plan:?}");
    assert_eq!(count(&engine, &sql).await, 40);
    let sql = format!("SELECT count(*) FROM t WHERE device IN ('d3', 'd4') AND {range}");
    assert!(scans(&engine, &sql).await.iter().all(String::is_empty));
    assert_eq!(count(&engine, &sql).await, 80);

    // A device over several pages: time may still drop pages, the device may not.
    let sql = "SELECT count(*) FROM t WHERE device = 'busy' AND time >= '1970-01-01T10:00:00Z'";
    let plan = scans(&engine, sql).await;
    assert!(
        plan.iter()
            .any(|p| p.contains("time") && !p.contains("device")),
        "{plan:?}"
    );
    assert_eq!(count(&engine, sql).await, 40_000 - 36_000);

    // What the index does not answer goes to the reader, time included.
    let sql = format!("SELECT count(*) FROM t WHERE device > 'd8' AND {range}");
    let plan = scans(&engine, &sql).await;
    assert!(
        plan.iter()
            .any(|p| p.contains("device") && p.contains("time")),
        "{plan:?}"
    );
    assert_eq!(count(&engine, &sql).await, 40);
    let sql =
        format!("SELECT count(*) FROM t WHERE device = 'd3' AND device LIKE 'd%' AND {range}");
    let plan = scans(&engine, &sql).await;
    assert!(
        plan.iter()
            .any(|p| p.contains("LIKE") && !p.contains("time")),
        "{plan:?}"
    );
    assert_eq!(count(&engine, &sql).await, 40);

    // A few hundred rows of one segment are read in one partition: not split
    // into byte ranges that each open the file, not spread and merged back.
    let sql = format!("SELECT * FROM t WHERE device = 'd3' AND {range} ORDER BY time");
    let plan = plan_text(&engine, &sql).await;
    for node in [
        "RepartitionExec",
        "SortPreservingMergeExec",
        "CoalescePartitionsExec",
    ] {
        assert!(!plan.contains(node), "{plan}");
    }
    assert!(plan.contains("file_groups={1 group"), "{plan}");
    // All 41,000 rows are more than a batch: the filter runs on every CPU
    // (DataFusion's partitions are the CPUs).
    let plan = plan_text(&engine, "SELECT * FROM t WHERE v > 5 ORDER BY time").await;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert_eq!(plan.contains("RepartitionExec"), cpus > 1, "{plan}");
}
