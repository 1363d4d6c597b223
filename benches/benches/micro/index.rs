//! From tag bitmaps to the rows a scan reads: for one segment, what the table
//! provider does per segment (`query/src/provider.rs`, `scan`) —
//! `SegmentIndex::matching_rows` (roaring bitmaps of the wanted tag values, OR-ed
//! and AND-ed), `SegmentIndex::selection` (row groups, a `RowSelection` of the
//! runs, and the rows of the pages touched; `storage/src/index.rs`) and
//! `access_plan` (the `ParquetAccessPlan`).
//!
//! The segment is a day of the `manhole` table of the city workload, 1,000 devices
//! every 3 minutes: 400 covers, about 190,000 rows in two row groups, sorted by
//! device, district, then time, encoded as a flush does. Three filters:
//!
//! - `one_device`: `device = 'mh-00001'`, one run of rows;
//! - `ten_devices`: `device IN (10 covers)`, ten runs;
//! - `one_district`: `district = '金水区'`, a run per device of that district.

use std::hint::black_box;

use citytsdb_benches::fixtures::{city_batches, city_days, segment_rows};
use citytsdb_query::provider::access_plan;
use citytsdb_storage::index::{SegmentIndex, TagConstraint};
use citytsdb_storage::segment::encode;
use criterion::{criterion_group, Criterion};

/// The access plan of the rows matching `filter`, and the rows it selects.
fn plan(index: &SegmentIndex, filter: &[TagConstraint]) -> u64 {
    let rows = index.matching_rows(filter);
    let selection = index.selection(rows.as_ref());
    let selected = selection.rows_selected;
    black_box(access_plan(selection.row_groups));
    selected
}

fn index(c: &mut Criterion) {
    let write = city_batches(&city_days(1_000, 180, 1));
    let (schema, batch) = write.table("manhole");
    let segment = encode(&segment_rows(schema, batch), schema).expect("encoding the segment");
    let index = segment.index;
    assert!(index.row_groups.len() > 1, "{:?}", segment.row_group_rows);

    let tag = |column: &str, values: &[&str]| {
        vec![TagConstraint {
            column: column.to_string(),
            values: values.iter().map(|v| v.to_string()).collect(),
        }]
    };
    let covers: Vec<&str> = index.tags["device"].keys().map(String::as_str).collect();
    let ten: Vec<&str> = covers
        .iter()
        .step_by(covers.len() / 10)
        .take(10)
        .copied()
        .collect();
    let filters = [
        ("one_device", tag("device", &covers[..1])),
        ("ten_devices", tag("device", &ten)),
        ("one_district", tag("district", &["金水区"])),
    ];

    let mut g = c.benchmark_group("index_to_access_plan");
    for (name, filter) in &filters {
        assert!(plan(&index, filter) > 0, "{name} selects no rows");
        g.bench_function(*name, |b| b.iter(|| plan(&index, black_box(filter))));
    }
    g.finish();
}

criterion_group!(benches, index);
