//! Property-based fuzzing of write validation: whatever the body and however small
//! the limits, every data line is written or rejected exactly once, a rejection
//! names a line and a column inside it, and the accepted lines always make batches.
//!
//! `CITYTSDB_FUZZ_CASES` sets the cases per property (see `line_protocol/fuzz.rs`).

use proptest::prelude::*;

use super::*;
use crate::line_protocol::fuzz::{
    chars, config, hostile_body, model_line, mutate, mutation, physical_lines, ModelLine,
};

/// Limits small enough that fuzzed bodies reach every one of them.
fn limits() -> impl Strategy<Value = Limits> {
    (40usize..400, 0usize..12, 1usize..4, 2usize..8, 1usize..5).prop_map(
        |(max_line_bytes, max_string_bytes, max_tables, max_columns, max_series)| Limits {
            max_line_bytes,
            max_string_bytes,
            max_tables,
            max_columns,
            max_series,
            ..Limits::default()
        },
    )
}

fn precision() -> impl Strategy<Value = Precision> {
    prop::sample::select(
        &[
            Precision::Nanosecond,
            Precision::Microsecond,
            Precision::Millisecond,
            Precision::Second,
            Precision::Auto,
        ][..],
    )
}

/// Validates `body` into `schemas` as a write does, checking what every write
/// promises; returns the accepted lines' count.
fn write(
    body: &[u8],
    precision: Precision,
    schemas: &mut BTreeMap<String, TableSchema>,
    limits: &Limits,
) -> Result<usize, TestCaseError> {
    let parsed = parse_body(body);
    // What is reserved for the parsed lines is bounded by the body's size, not by
    // its line count (a body of newlines is all lines).
    prop_assert!(parsed.lines.capacity() <= body.len() / 6 + 1);
    let lines = physical_lines(body);
    let parse_rejected = parsed.rejected.len();
    let v = validate_against(parsed.lines, precision, schemas, limits, &NoSeries);
    let accepted: usize = v.tables.values().map(|(_, l)| l.len()).sum();
    prop_assert_eq!(
        accepted + v.rejected.len() + parse_rejected,
        parsed.data_lines,
        "every data line is written or rejected, once"
    );
    for e in parsed.rejected.iter().chain(&v.rejected) {
        prop_assert!(e.line >= 1 && e.line <= lines.len(), "{:?}", e);
        let line = lines[e.line - 1];
        prop_assert!(
            e.column >= 1 && e.column <= chars(line) + 1,
            "column {} of {:?}: {}",
            e.column,
            String::from_utf8_lossy(line),
            e.message
        );
        prop_assert!(!e.message.is_empty());
    }
    prop_assert!(schemas.len() <= limits.max_tables, "{:?}", schemas.keys());
    for (table, (schema, accepted)) in &v.tables {
        prop_assert!(schema.columns().len() <= limits.max_columns);
        for &i in accepted {
            prop_assert_eq!(v.lines[i].1.measurement.as_ref(), table.as_str());
        }
    }
    let batches = build_batches(&v, 42)
        .map_err(|e| TestCaseError::fail(format!("accepted lines make no batch: {e}")))?;
    for (table, batch) in &batches {
        prop_assert_eq!(batch.num_rows(), v.tables[table].1.len());
        prop_assert_eq!(batch.schema_ref().field(0).name(), TIME_COLUMN);
    }
    Ok(accepted)
}

proptest! {
    #![proptest_config(config(500))]

    #[test]
    fn hostile_bodies_are_written_or_rejected_line_by_line(
        first in hostile_body(),
        second in hostile_body(),
        precision in precision(),
        limits in limits(),
    ) {
        // Two writes, so the second meets the tables and columns the first made.
        let mut schemas = BTreeMap::new();
        write(&first, precision, &mut schemas, &limits)?;
        write(&second, precision, &mut schemas, &limits)?;
    }

    #[test]
    fn model_lines_are_written_or_rejected_saying_why(
        lines in prop::collection::vec(model_line(), 1..8),
        mutations in prop::collection::vec(mutation(), 0..3),
        precision in precision(),
    ) {
        let text: Vec<String> = lines.iter().map(ModelLine::write).collect();
        let mut body = text.join("\n").into_bytes();
        mutate(&mut body, &mutations);
        let mut schemas = BTreeMap::new();
        let accepted = write(&body, precision, &mut schemas, &Limits::default())?;
        if mutations.is_empty() {
            // Only a type conflict between lines or a timestamp past the
            // nanosecond range rejects a well-formed line.
            let parsed = parse_body(&body);
            prop_assert!(parsed.rejected.is_empty());
            let v = validate(parsed.lines, precision, &mut BTreeMap::new());
            prop_assert_eq!(v.tables.values().map(|(_, l)| l.len()).sum::<usize>(), accepted);
            for e in &v.rejected {
                prop_assert!(
                    e.message.contains(" in table ") || e.message.contains("out of range for precision"),
                    "{}", e.message
                );
            }
        }
    }
}
