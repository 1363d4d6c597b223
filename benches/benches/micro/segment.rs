//! Writing one segment (`storage/src/segment.rs`, `encode`): a day of the `manhole`
//! table of the city workload (500 devices every 5 minutes; 200 of them covers, so
//! about 57,000 rows), sorted and merged as a flush hands it over, encoded to
//! Parquet (ZSTD, decimals, page index) with its tag index and page boundaries:
//! as a flush writes it (`encode_manhole_day`, one fixed layout per column kind)
//! and as compaction writes a settled day (`encode_manhole_day_measured`, each
//! column's layout measured on a sample first).
//!
//! Throughput is rows per second.

use std::hint::black_box;
use std::time::Duration;

use citytsdb_benches::fixtures::{city_batches, city_days, segment_rows};
use citytsdb_storage::segment::{encode, encode_with, Layout, SETTLED_PAGE_ROWS};
use criterion::{criterion_group, Criterion, Throughput};

fn segment(c: &mut Criterion) {
    let write = city_batches(&city_days(500, 300, 1));
    let (schema, batch) = write.table("manhole");
    let rows = segment_rows(schema, batch);

    let mut g = c.benchmark_group("segment");
    g.throughput(Throughput::Elements(rows.num_rows() as u64));
    g.sample_size(20);
    g.measurement_time(Duration::from_secs(10));
    g.bench_function("encode_manhole_day", |b| {
        b.iter(|| encode(black_box(&rows), schema).map(|s| s.parquet.len()))
    });
    let settled = Layout::Measured {
        page_rows: SETTLED_PAGE_ROWS,
    };
    g.bench_function("encode_manhole_day_measured", |b| {
        b.iter(|| encode_with(black_box(&rows), schema, settled).map(|s| s.parquet.len()))
    });
    g.finish();
}

criterion_group!(benches, segment);
