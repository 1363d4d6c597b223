//! Line-protocol parsing, alone and with the rest of a write's CPU work.
//!
//! The body is 10,000 lines of the four-table city workload (`citytsdb gen`, 1,000
//! devices every 5 minutes), the size of a large gateway batch. Three steps of the
//! write path (ARCHITECTURE.md, "Write path", steps 2-4):
//!
//! - `parse`: `parse_lines` over the body, the parser alone;
//! - `parse_body`: the same plus the list of parsed lines the write keeps;
//! - `parse_validate_build`: `parse_body`, `validate` against tables that already
//!   exist (the steady state) and `build_batches`, everything a write does before
//!   the WAL.
//!
//! Group `line_protocol_lines` reports lines per second, `line_protocol_bytes` bytes
//! per second.

use std::collections::BTreeMap;
use std::hint::black_box;

use citytsdb_benches::fixtures::{city_batches, city_body};
use citytsdb_ingest::line_protocol::parse_lines;
use citytsdb_ingest::{build_batches, parse_body, validate, Precision};
use criterion::{criterion_group, Criterion, Throughput};

/// Lines in the body.
const LINES: usize = 10_000;

fn line_protocol(c: &mut Criterion) {
    let body = city_body(1_000, 300, LINES);
    let lines = parse_lines(&body).count() as u64;
    assert_eq!(lines, LINES as u64);
    let known = city_batches(&body).schemas;

    let parse = |body: &[u8]| parse_lines(body).filter(Result::is_ok).count();
    let write = |body: &[u8], schemas: &mut BTreeMap<_, _>| {
        let parsed = parse_body(body);
        let validated = validate(parsed.lines, Precision::Second, schemas);
        build_batches(&validated, 0).map(|b| b.len())
    };

    let mut g = c.benchmark_group("line_protocol_lines");
    g.throughput(Throughput::Elements(lines));
    g.bench_function("parse", |b| b.iter(|| parse(black_box(&body))));
    g.bench_function("parse_body", |b| {
        b.iter(|| parse_body(black_box(&body)).lines.len())
    });
    let mut schemas = known.clone();
    g.bench_function("parse_validate_build", |b| {
        b.iter(|| write(black_box(&body), &mut schemas))
    });
    g.finish();

    let mut g = c.benchmark_group("line_protocol_bytes");
    g.throughput(Throughput::Bytes(body.len() as u64));
    g.bench_function("parse", |b| b.iter(|| parse(black_box(&body))));
    let mut schemas = known;
    g.bench_function("parse_validate_build", |b| {
        b.iter(|| write(black_box(&body), &mut schemas))
    });
    g.finish();
}

criterion_group!(benches, line_protocol);
