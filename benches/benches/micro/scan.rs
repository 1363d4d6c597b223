//! Queries through the query engine (`query/src/engine.rs`, `QueryEngine::query`)
//! over a small flushed database: a day of the city workload, 500 devices every 5
//! minutes (144,000 lines; about 57,000 `manhole` rows in one segment per table),
//! written and flushed to an in-memory object store. Each run parses, plans,
//! prunes (tag bitmaps to a row selection), reads the Parquet and aggregates.
//!
//! - `filter_group_by`: a district's hourly water level and tilt per device (tag
//!   filter, group-by);
//! - `one_device_day`: every reading of one cover in a day;
//! - `district_hour_all`: water level per district and hour over every row;
//! - `latest_every_device`: the latest reading of every cover, from memory.
//!
//! The `encode` group writes two of those answers in the HTTP API's text formats
//! (`server/src/format.rs`): one device's day (288 rows) and the latest reading of
//! every cover (200 rows, seven columns), each as JSON and CSV.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use citytsdb_benches::fixtures::city_days;
use citytsdb_ingest::{build_batches, parse_body, validate, Precision};
use citytsdb_query::{QueryEngine, QueryLimits};
use citytsdb_server::format::{render, Format};
use citytsdb_storage::{Engine, EngineConfig};
use criterion::{criterion_group, Criterion};
use object_store::memory::InMemory;

const LATEST: &str = "SELECT DISTINCT ON (device) device, district, time, tilt_deg, \
     water_level_cm, battery_pct, cover_open FROM manhole ORDER BY device, time DESC";

const QUERIES: [(&str, &str); 4] = [
    (
        "filter_group_by",
        "SELECT device, date_bin(INTERVAL '1 hour', time) AS hour, avg(water_level_cm) AS water_cm, max(tilt_deg) AS tilt_deg \
         FROM manhole WHERE district = '金水区' GROUP BY device, hour",
    ),
    (
        "one_device_day",
        "SELECT time, tilt_deg, water_level_cm FROM manhole \
         WHERE device = 'mh-00001' AND time >= '2025-12-01T00:00:00Z' AND time < '2025-12-02T00:00:00Z' ORDER BY time",
    ),
    (
        "district_hour_all",
        "SELECT district, date_bin(INTERVAL '1 hour', time) AS hour, avg(water_level_cm) AS water_cm \
         FROM manhole GROUP BY district, hour",
    ),
    ("latest_every_device", LATEST),
];

/// Writes and flushes the workload as the server would, and opens a query engine on it.
async fn flushed_database(data_dir: &std::path::Path) -> QueryEngine {
    let mut config = EngineConfig::new(data_dir.to_path_buf(), Arc::new(InMemory::new()));
    config.flush_rows = usize::MAX;
    config.flush_interval = Duration::from_secs(24 * 3600);
    config.max_buffer_bytes = usize::MAX;
    let storage = Engine::open(config)
        .await
        .expect("opening the storage engine");
    let body = city_days(500, 300, 1);
    let parsed = parse_body(&body);
    assert!(parsed.rejected.is_empty());
    let validated =
        storage.update_schemas("city", |s| validate(parsed.lines, Precision::Second, s));
    let batches = build_batches(&validated, 0).expect("building batches");
    storage
        .write("city", batches, false)
        .await
        .expect("writing the workload");
    let flushed = storage.flush().await.expect("flushing");
    assert_eq!(flushed.segments_written, 4, "{flushed:?}");
    QueryEngine::new(storage, QueryLimits::default()).expect("a query engine")
}

fn scan(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let dir = tempfile::tempdir().expect("a temporary directory");
    let engine = rt.block_on(flushed_database(dir.path()));

    let mut g = c.benchmark_group("scan");
    for (name, sql) in QUERIES {
        let out = rt.block_on(engine.query("city", sql)).expect(name);
        let rows: usize = out.batches.iter().map(|b| b.num_rows()).sum();
        assert!(rows > 0, "{name} returns no rows");
        g.bench_function(name, |b| {
            b.to_async(&rt)
                .iter(|| async { black_box(engine.query("city", sql).await) })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("encode");
    for (name, sql) in [
        ("one_device_day", QUERIES[1].1),
        ("latest_every_device", LATEST),
    ] {
        let out = rt.block_on(engine.query("city", sql)).expect(name);
        for (format_name, format) in [("json", Format::Json), ("csv", Format::Csv)] {
            g.bench_function(format!("{name}/{format_name}"), |b| {
                b.iter(|| black_box(render(format, &out.schema, &out.batches)))
            });
        }
    }
    g.finish();
}

criterion_group!(benches, scan);
