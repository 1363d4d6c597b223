//! A running query keeps the segments it reads: compaction may replace them, but
//! the collector deletes them only once the query's stream is gone.

use std::sync::Arc;

use citytsdb_storage::{ColumnKind, FieldType, TableSchema};
use datafusion::arrow::array::{Float64Array, StringArray, TimestampNanosecondArray};
use datafusion::arrow::record_batch::RecordBatch;

use super::QueryEngine;

fn schema() -> TableSchema {
    let mut t = TableSchema::default();
    t.add_column("device", ColumnKind::Tag).unwrap();
    t.add_column("v", ColumnKind::Field(FieldType::Float))
        .unwrap();
    t
}

/// `n` rows of one day, starting at row `from`.
fn rows(from: usize, n: usize) -> RecordBatch {
    let times = (from..from + n).map(|i| i as i64 * 1_000_000_000);
    RecordBatch::try_new(
        schema().arrow_schema(),
        vec![
            Arc::new(TimestampNanosecondArray::from_iter_values(times).with_timezone("UTC")),
            Arc::new(StringArray::from_iter_values(
                (from..from + n).map(|i| format!("d{}", i % 10)),
            )),
            Arc::new(Float64Array::from_iter_values(
                (from..from + n).map(|i| i as f64),
            )),
        ],
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streaming_query_pins_the_segments_it_reads_until_it_is_done() {
    let (_dir, storage) = super::test_store(schema()).await;
    // Three flushes of one day: three segments that compaction merges into one.
    const N: usize = 40_000;
    for part in 0..3 {
        let batch = rows(part * N, N);
        storage
            .write("db", vec![("t".into(), batch)], false)
            .await
            .unwrap();
        storage.flush().await.unwrap();
    }
    let engine = QueryEngine::new(storage.clone(), Default::default()).unwrap();
    // Far more batches than the stream runs ahead: the query is mid-way.
    let mut stream = engine
        .stream("db", "SELECT time, device, v FROM t ORDER BY time")
        .await
        .unwrap();
    let first = stream.next().await.unwrap().unwrap();
    assert!(first.num_rows() > 0);

    let compacted = storage.compact(true).await.unwrap();
    assert!(compacted.segments_in >= 3, "{compacted:?}");
    let gc = storage.collect_garbage().await.unwrap();
    assert_eq!(gc.collected, 0, "the query still reads them: {gc:?}");
    let mut seen = first.num_rows();
    while let Some(batch) = stream.next().await {
        seen += batch.expect("every segment stays readable").num_rows();
    }
    assert_eq!(seen, 3 * N);
    drop(stream);

    // Done: the replaced segments go.
    let mut collected = 0;
    for _ in 0..50 {
        collected += storage.collect_garbage().await.unwrap().collected;
        if collected >= 3 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(collected >= 3, "{collected} objects collected");
    storage.shutdown().await.unwrap();
}
