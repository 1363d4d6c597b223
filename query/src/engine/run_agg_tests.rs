//! `GROUP BY` over tag columns through [`crate::run_agg::RunAggregateExec`]: the
//! same groups and values as computed here, over flushed segments and buffered
//! rows together, null and empty tags as groups of their own.

use std::collections::BTreeMap;
use std::sync::Arc;

use citytsdb_storage::{ColumnKind, FieldType, TableSchema};
use datafusion::arrow::array::{
    Array, AsArray, Float64Array, StringArray, TimestampNanosecondArray,
};
use datafusion::arrow::datatypes::{Float64Type, Int64Type};
use datafusion::arrow::record_batch::RecordBatch;

use super::{QueryEngine, QueryLimits};

const DEVICES: usize = 600;

fn schema() -> TableSchema {
    let mut t = TableSchema::default();
    t.add_column("device", ColumnKind::Tag).unwrap();
    t.add_column("district", ColumnKind::Tag).unwrap();
    t.add_column("v", ColumnKind::Field(FieldType::Float))
        .unwrap();
    t
}

fn district(d: usize) -> Option<String> {
    // Null for some devices, empty for others: two different groups.
    match d % 7 {
        0 => None,
        1 => Some(String::new()),
        _ => Some(format!("z{}", d % 5)),
    }
}

fn value(d: usize, t: i64) -> f64 {
    ((t * 7 + d as i64 * 13) % 101) as f64
}

/// Every device's reading at each second of `times`, time-major (so the buffer is
/// not in series order).
fn rows(times: std::ops::Range<i64>) -> RecordBatch {
    let keys: Vec<(i64, usize)> = times
        .flat_map(|t| (0..DEVICES).map(move |d| (t, d)))
        .collect();
    RecordBatch::try_new(
        schema().arrow_schema(),
        vec![
            Arc::new(
                TimestampNanosecondArray::from_iter_values(
                    keys.iter().map(|(t, _)| t * 1_000_000_000),
                )
                .with_timezone("UTC"),
            ),
            Arc::new(StringArray::from_iter_values(
                keys.iter().map(|(_, d)| format!("d{d:04}")),
            )),
            Arc::new(StringArray::from_iter(
                keys.iter().map(|(_, d)| district(*d)),
            )),
            Arc::new(Float64Array::from_iter_values(
                keys.iter().map(|&(t, d)| value(d, t)),
            )),
        ],
    )
    .unwrap()
}

/// (count, sum, max) of `value` by key, over seconds `0..seconds`.
fn expected<K: Ord>(seconds: i64, key: impl Fn(usize) -> K) -> BTreeMap<K, (i64, f64, f64)> {
    let mut out: BTreeMap<K, (i64, f64, f64)> = BTreeMap::new();
    for t in 0..seconds {
        for d in 0..DEVICES {
            let e = out.entry(key(d)).or_insert((0, 0.0, f64::MIN));
            let v = value(d, t);
            e.0 += 1;
            e.1 += v;
            e.2 = e.2.max(v);
        }
    }
    out
}

fn column_strings(b: &RecordBatch, i: usize) -> Vec<Option<String>> {
    let c = b.column(i).as_string::<i32>();
    (0..c.len())
        .map(|r| c.is_valid(r).then(|| c.value(r).to_owned()))
        .collect()
}

async fn plan(engine: &QueryEngine, sql: &str) -> String {
    let out = engine.query("db", &format!("EXPLAIN {sql}")).await.unwrap();
    let mut text = String::new();
    for b in &out.batches {
        for r in 0..b.num_rows() {
            text.push_str(b.column(1).as_string::<i32>().value(r));
        }
    }
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grouping_by_tags_in_runs_gives_every_group_its_rows() {
    let (_dir, storage) = super::test_store(schema()).await;
    // Two flushed segments (one day, written in two parts) and buffered rows.
    const SECONDS: i64 = 90;
    let write = |batch| storage.write("db", vec![("t".into(), batch)], false);
    write(rows(0..40)).await.unwrap();
    storage.flush().await.unwrap();
    write(rows(40..70)).await.unwrap();
    storage.flush().await.unwrap();
    write(rows(70..SECONDS)).await.unwrap();

    // (Early emission under a small memory pool is `run_agg::tests`': here the
    // final stage and the scan share the pool, so how early is up to timing.)
    let memory = 256 << 20;
    {
        let limits = QueryLimits {
            memory_bytes: memory,
            ..QueryLimits::default()
        };
        let engine = QueryEngine::new(storage.clone(), limits).unwrap();

        let sql = "SELECT device, district, count(*) AS n, sum(v) AS total, max(v) AS top, \
                   avg(v) AS mean FROM t GROUP BY device, district";
        let text = plan(&engine, sql).await;
        // The segments decode the keys as string views, the buffered rows are
        // cast to them.
        assert!(text.contains("string_views=[device, district]"), "{text}");
        let out = engine.query("db", sql).await.unwrap();
        let want = expected(SECONDS, |d| (format!("d{d:04}"), district(d)));
        let mut got = BTreeMap::new();
        for b in &out.batches {
            let devices = column_strings(b, 0);
            let districts = column_strings(b, 1);
            for r in 0..b.num_rows() {
                let key = (devices[r].clone().unwrap(), districts[r].clone());
                let row = (
                    b.column(2).as_primitive::<Int64Type>().value(r),
                    b.column(3).as_primitive::<Float64Type>().value(r),
                    b.column(4).as_primitive::<Float64Type>().value(r),
                );
                // avg's two-column state (count, sum) merged right.
                let mean = b.column(5).as_primitive::<Float64Type>().value(r);
                assert!((mean - row.1 / row.0 as f64).abs() < 1e-9);
                assert!(got.insert(key, row).is_none(), "a group twice ({memory} B)");
            }
        }
        assert_eq!(got, want, "by device and district ({memory} B)");
        // With plenty of memory the first stage gives its groups once.
        let analyzed = plan(&engine, &format!("ANALYZE {sql}")).await;
        let early: usize = analyzed
            .split("early_emits=")
            .skip(1)
            .filter_map(|s| s.split(|c: char| !c.is_ascii_digit()).next())
            .map(|n| n.parse::<usize>().unwrap())
            .sum();
        assert!(analyzed.contains("early_emits="), "{analyzed}");
        assert_eq!(early, 0, "{analyzed}");

        // The keys the other way round, under a filter: a district and a device.
        let sql = "SELECT district, device, count(*) AS n, sum(v) AS total, max(v) AS top \
                   FROM t WHERE v >= 0 GROUP BY district, device";
        let text = plan(&engine, sql).await;
        assert!(text.contains("string_views=[district, device]"), "{text}");
        let out = engine.query("db", sql).await.unwrap();
        let mut got = BTreeMap::new();
        for b in &out.batches {
            let districts = column_strings(b, 0);
            let devices = column_strings(b, 1);
            for r in 0..b.num_rows() {
                let row = (
                    b.column(2).as_primitive::<Int64Type>().value(r),
                    b.column(3).as_primitive::<Float64Type>().value(r),
                    b.column(4).as_primitive::<Float64Type>().value(r),
                );
                let key = (devices[r].clone().unwrap(), districts[r].clone());
                assert!(got.insert(key, row).is_none());
            }
        }
        assert_eq!(got, want, "by district and device ({memory} B)");
    }

    // No rows, no groups.
    let engine = QueryEngine::new(storage.clone(), QueryLimits::default()).unwrap();
    let sql = "SELECT device, district, count(*) FROM t WHERE v < 0 GROUP BY device, district";
    assert!(plan(&engine, sql).await.contains("RunAggregateExec"));
    let out = engine.query("db", sql).await.unwrap();
    assert_eq!(out.batches.iter().map(|b| b.num_rows()).sum::<usize>(), 0);

    // Not for it: one key (DataFusion's grouping is cheap there), a number among
    // the keys, an aggregate with FILTER, DISTINCT with a LIMIT.
    for sql in [
        "SELECT district, count(*) FROM t GROUP BY district",
        "SELECT device, v, count(*) FROM t GROUP BY device, v",
        "SELECT device, district, count(*) FILTER (WHERE v > 3) FROM t GROUP BY device, district",
        "SELECT DISTINCT device, district FROM t LIMIT 3",
    ] {
        assert!(
            !plan(&engine, sql).await.contains("RunAggregateExec"),
            "{sql}"
        );
    }
    storage.shutdown().await.unwrap();
}

/// (count, max) by (device, district) from an answer's columns 0 to 3.
fn groups(batches: &[RecordBatch]) -> BTreeMap<(String, Option<String>), (i64, f64)> {
    let mut got = BTreeMap::new();
    for b in batches {
        let devices = column_strings(b, 0);
        let districts = column_strings(b, 1);
        for r in 0..b.num_rows() {
            let row = (
                b.column(2).as_primitive::<Int64Type>().value(r),
                b.column(3).as_primitive::<Float64Type>().value(r),
            );
            let key = (devices[r].clone().unwrap(), districts[r].clone());
            assert!(got.insert(key, row).is_none(), "a group twice");
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn string_views_only_where_nothing_else_reads_the_keys() {
    let (_dir, storage) = super::test_store(schema()).await;
    // A segment of its own, two that share seconds 60 to 69 (their rows merge),
    // and buffered rows.
    let write = |batch| storage.write("db", vec![("t".into(), batch)], false);
    for seconds in [0..30, 40..70, 60..80] {
        write(rows(seconds)).await.unwrap();
        storage.flush().await.unwrap();
    }
    write(rows(90..100)).await.unwrap();
    let engine = QueryEngine::new(storage.clone(), QueryLimits::default()).unwrap();
    let mut want: BTreeMap<(String, Option<String>), (i64, f64)> = BTreeMap::new();
    for t in (0..30).chain(40..80).chain(90..100) {
        for d in 0..DEVICES {
            let e = want
                .entry((format!("d{d:04}"), district(d)))
                .or_insert((0, f64::MIN));
            e.0 += 1;
            e.1 = e.1.max(value(d, t));
        }
    }
    let from = |first: &str| -> BTreeMap<_, _> {
        want.iter()
            .filter(|((d, _), _)| d.as_str() >= first)
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    };

    // The lone segment decodes views; the merged ones and the buffered rows are
    // cast to them. The answer is the same.
    let sql = "SELECT device, district, count(*), max(v) FROM t GROUP BY device, district";
    let text = plan(&engine, sql).await;
    assert!(text.contains("DedupExec"), "{text}");
    assert!(text.contains("string_views=[device, district]"), "{text}");
    assert_eq!(
        groups(&engine.query("db", sql).await.unwrap().batches),
        want
    );

    // A filter on a key reaches the Parquet reader typed for plain strings: no
    // views, and the same answer.
    let sql = "SELECT device, district, count(*), max(v) FROM t WHERE device >= 'd0300' \
               GROUP BY device, district";
    let text = plan(&engine, sql).await;
    assert!(text.contains("RunAggregateExec"), "{text}");
    assert!(!text.contains("string_views"), "{text}");
    assert_eq!(
        groups(&engine.query("db", sql).await.unwrap().batches),
        from("d0300")
    );

    // An aggregate that reads a key gets it as a plain string: only the other
    // key is a view.
    let sql = "SELECT device, district, count(*), max(v), max(device) FROM t \
               GROUP BY device, district";
    let text = plan(&engine, sql).await;
    assert!(text.contains("string_views=[district]"), "{text}");
    let out = engine.query("db", sql).await.unwrap();
    for b in &out.batches {
        assert_eq!(column_strings(b, 0), column_strings(b, 4));
    }
    assert_eq!(groups(&out.batches), want);

    // A key computed from a tag is not the tag: no views.
    let sql = "SELECT device, upper(district) AS z, count(*), max(v) FROM t \
               GROUP BY device, upper(district)";
    let text = plan(&engine, sql).await;
    assert!(!text.contains("string_views"), "{text}");
    let got = groups(&engine.query("db", sql).await.unwrap().batches);
    let upper: BTreeMap<_, _> = want
        .iter()
        .map(|((d, z), v)| ((d.clone(), z.as_ref().map(|z| z.to_uppercase())), *v))
        .collect();
    assert_eq!(got, upper);
    storage.shutdown().await.unwrap();
}
