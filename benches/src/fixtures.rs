//! Inputs of the criterion micro-benchmarks in `benches/benches/`: the four-table
//! city workload of `citytsdb gen` (`citytsdb_workload::city`), as a line-protocol
//! body, as the per-table Arrow batches a write makes of it, and as a segment's
//! sorted rows.
//!
//! Everything is deterministic (one seed), so two runs measure the same bytes.

use std::collections::BTreeMap;

use citytsdb_ingest::{build_batches, parse_body, validate, Precision};
use citytsdb_storage::merge::{align, key_columns, sort_dedup};
use citytsdb_storage::TableSchema;
use citytsdb_workload::city::{generate, City};
use datafusion::arrow::record_batch::RecordBatch;

/// The workload's first reading, as `citytsdb gen` starts it: 2025-12-01T00:00:00Z.
pub const START: i64 = 1_764_547_200;

/// The city workload of `devices` devices reporting every `interval` seconds for
/// `days` days, timestamps in seconds. It has the feeds' quirks: devices
/// that skip readings, late and retried lines, UTF-8 district names, tag values
/// that need escaping.
pub fn city_days(devices: u32, interval: i64, days: u32) -> Vec<u8> {
    let city = City {
        devices,
        days,
        start: START,
        interval,
        seed: 42,
        only: None,
    };
    let mut out = Vec::new();
    // Writing to a Vec cannot fail.
    generate(&city, &mut out).expect("writing to memory");
    out
}

/// The first `lines` lines of the city workload of `devices` devices reporting
/// every `interval` (see [`city_days`]).
pub fn city_body(devices: u32, interval: i64, lines: usize) -> Vec<u8> {
    let mut days = 1;
    loop {
        let mut out = city_days(devices, interval, days);
        let mut newlines = out.iter().enumerate().filter(|(_, &b)| b == b'\n');
        if let Some((end, _)) = newlines.nth(lines.saturating_sub(1)) {
            out.truncate(end + 1);
            return out;
        }
        days += 1;
    }
}

/// A body's rows as a write makes them: per-table batches, and the tables' schemas
/// after validation.
#[derive(Debug, Clone)]
pub struct CityBatches {
    /// Table -> schema, grown by the body's lines.
    pub schemas: BTreeMap<String, TableSchema>,
    /// One batch per table, in table-name order.
    pub batches: Vec<(String, RecordBatch)>,
}

impl CityBatches {
    /// Rows in all the batches.
    pub fn rows(&self) -> usize {
        self.batches.iter().map(|(_, b)| b.num_rows()).sum()
    }

    /// One table's batch and schema.
    ///
    /// Panics if the table is not there: a benchmark asked for a table its body lacks.
    pub fn table(&self, name: &str) -> (&TableSchema, &RecordBatch) {
        let batch = self
            .batches
            .iter()
            .find(|(t, _)| t == name)
            .map(|(_, b)| b)
            .unwrap_or_else(|| panic!("no table {name} in the body"));
        (&self.schemas[name], batch)
    }
}

/// Parses, validates (precision: seconds) and builds the batches of a body, as
/// `POST /api/v1/write` does.
///
/// Panics on a rejected line: generated bodies have none.
pub fn city_batches(body: &[u8]) -> CityBatches {
    let parsed = parse_body(body);
    assert!(parsed.rejected.is_empty(), "{:?}", parsed.rejected.first());
    let mut schemas = BTreeMap::new();
    let validated = validate(parsed.lines, Precision::Second, &mut schemas);
    assert!(validated.rejected.is_empty(), "{:?}", validated.rejected);
    let batches = build_batches(&validated, 0).expect("validated lines build batches");
    CityBatches { schemas, batches }
}

/// A table's rows as a flush hands them to the segment writer: aligned to the
/// table's schema, sorted by series then time, a (series, time) written twice merged.
pub fn segment_rows(schema: &TableSchema, batch: &RecordBatch) -> RecordBatch {
    let arrow = schema.arrow_schema();
    let aligned = align(batch, &arrow).expect("the batch fits its own table's schema");
    let keys = key_columns(schema, &arrow).expect("every table has a time column");
    sort_dedup(&arrow, &[aligned], &keys).expect("sorting a valid batch")
}
