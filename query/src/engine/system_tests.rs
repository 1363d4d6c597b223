//! `system.devices` follows every write, though it is built once between writes.

use std::sync::Arc;

use citytsdb_storage::{ColumnKind, FieldType, TableSchema};
use datafusion::arrow::array::{
    AsArray, Float64Array, RecordBatch, StringArray, TimestampNanosecondArray,
};
use datafusion::arrow::datatypes::{TimestampNanosecondType, UInt64Type};

use super::QueryEngine;

fn schema() -> TableSchema {
    let mut t = TableSchema::default();
    t.add_column("device", ColumnKind::Tag).unwrap();
    t.add_column("district", ColumnKind::Tag).unwrap();
    t.add_column("v", ColumnKind::Field(FieldType::Float))
        .unwrap();
    t
}

/// Rows of (device, district, seconds).
fn rows(rows: &[(&str, &str, i64)]) -> RecordBatch {
    RecordBatch::try_new(
        schema().arrow_schema(),
        vec![
            Arc::new(
                TimestampNanosecondArray::from_iter_values(
                    rows.iter().map(|r| r.2 * 1_000_000_000),
                )
                .with_timezone("UTC"),
            ),
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.0))),
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.1))),
            Arc::new(Float64Array::from_iter_values(
                rows.iter().map(|r| r.2 as f64),
            )),
        ],
    )
    .unwrap()
}

/// (device, district, last second, rows) of every device, by device.
async fn devices(engine: &QueryEngine, db: &str) -> Vec<(String, String, i64, u64)> {
    let out = engine
        .query(
            db,
            "SELECT device, district, last_time, rows FROM system.devices ORDER BY device",
        )
        .await
        .unwrap();
    let mut all = Vec::new();
    for b in &out.batches {
        let (d, z) = (
            b.column(0).as_string::<i32>(),
            b.column(1).as_string::<i32>(),
        );
        let t = b.column(2).as_primitive::<TimestampNanosecondType>();
        let n = b.column(3).as_primitive::<UInt64Type>();
        for i in 0..b.num_rows() {
            all.push((
                d.value(i).to_string(),
                z.value(i).to_string(),
                t.value(i) / 1_000_000_000,
                n.value(i),
            ));
        }
    }
    all
}

fn row(d: &str, z: &str, t: i64, n: u64) -> (String, String, i64, u64) {
    (d.to_string(), z.to_string(), t, n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn system_devices_follows_every_write() {
    let (_dir, storage) = super::test_store(schema()).await;
    storage.update_schemas("db2", |s| s.insert("t".into(), schema()));
    let write = |db: &'static str, batch| storage.write(db, vec![("t".into(), batch)], false);
    write("db", rows(&[("d1", "a", 1), ("d2", "b", 2)]))
        .await
        .unwrap();
    write("db2", rows(&[("x1", "z", 7)])).await.unwrap();
    let engine = QueryEngine::new(storage.clone(), Default::default()).unwrap();

    let first = vec![row("d1", "a", 1, 1), row("d2", "b", 2, 1)];
    assert_eq!(devices(&engine, "db").await, first);
    // Again with no write between: the same rows; another database has its own.
    assert_eq!(devices(&engine, "db").await, first);
    assert_eq!(devices(&engine, "db2").await, vec![row("x1", "z", 7, 1)]);
    assert_eq!(devices(&engine, "db").await, first);

    // A later reading, a new device, and a device that moved district (a second
    // series: its latest district shows).
    write(
        "db",
        rows(&[("d1", "a", 5), ("d3", "c", 3), ("d2", "e", 4)]),
    )
    .await
    .unwrap();
    let second = vec![
        row("d1", "a", 5, 2),
        row("d2", "e", 4, 2),
        row("d3", "c", 3, 1),
    ];
    assert_eq!(devices(&engine, "db").await, second);
    // A flush moves rows, not series.
    storage.flush().await.unwrap();
    assert_eq!(devices(&engine, "db").await, second);
    assert_eq!(devices(&engine, "db2").await, vec![row("x1", "z", 7, 1)]);
    write("db2", rows(&[("x1", "z", 9)])).await.unwrap();
    assert_eq!(devices(&engine, "db2").await, vec![row("x1", "z", 9, 2)]);
    assert_eq!(devices(&engine, "db").await, second);
    storage.shutdown().await.unwrap();
}
