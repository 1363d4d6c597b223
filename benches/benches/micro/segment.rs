//! Writing one segment (`storage/src/segment.rs`, `encode`): a day of the `manhole`
//! table of the city workload (500 devices every 5 minutes; 200 of them covers, so
//! about 57,000 rows), sorted and merged as a flush hands it over, encoded to
//! Parquet (ZSTD, decimals, page index) with its tag index and page boundaries.
//!
//! Throughput is rows per second.

use std::hint::black_box;
use std::time::Duration;

use citytsdb_benches::fixtures::{city_batches, city_days, segment_rows};
use citytsdb_storage::segment::encode;
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
    g.finish();
}

criterion_group!(benches, segment);
