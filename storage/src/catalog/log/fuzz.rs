//! Property-based fuzzing of the catalog's stored forms: a record or checkpoint
//! of arbitrary or damaged bytes is read or reported corrupt, never a panic;
//! folding any sequence of records (ops naming what does not exist, ids at the
//! ends of their range) is applied or reported corrupt; records and checkpoints
//! read back as written.
//!
//! `CITYTSDB_FUZZ_CASES` sets the cases per property (the long mode:
//! `CITYTSDB_FUZZ_CASES=100000 cargo test -p citytsdb-storage --lib catalog::log::fuzz`).

use proptest::prelude::*;

use super::*;
use crate::catalog::record::{Op, WriterId};
use crate::catalog::{Bitmap, SegmentMeta};
use crate::fuzz::config;
use crate::rollup::Dirty;
use crate::schema::{ColumnKind, FieldType};

fn db() -> impl Strategy<Value = String> {
    prop::sample::select(&["city", "lab", ""][..]).prop_map(str::to_string)
}

fn table() -> impl Strategy<Value = String> {
    prop::sample::select(&["manhole", "gauge", "manhole_1h"][..]).prop_map(str::to_string)
}

/// Ids: small ones that meet each other, and the ends of the range.
fn id() -> impl Strategy<Value = u32> {
    prop_oneof![4 => 0u32..4, 1 => Just(u32::MAX), 1 => Just(u32::MAX - 1), 1 => any::<u32>()]
}

fn day() -> impl Strategy<Value = i64> {
    prop_oneof![4 => 20_000i64..20_003, 1 => Just(i64::MAX), 1 => Just(i64::MIN), 1 => any::<i64>()]
}

fn name() -> impl Strategy<Value = String> {
    prop::sample::select(&["a", "b", "s1.parquet", "金", ""][..]).prop_map(str::to_string)
}

fn bitmap() -> impl Strategy<Value = Bitmap> {
    prop::collection::vec(any::<u32>(), 0..40).prop_map(|ids| Bitmap(ids.into_iter().collect()))
}

fn segment() -> impl Strategy<Value = SegmentMeta> {
    (
        id(),
        day(),
        name(),
        any::<u64>(),
        any::<i64>(),
        any::<i64>(),
        prop::collection::vec(any::<u64>(), 0..3),
        any::<u64>(),
        prop::option::of(bitmap()),
    )
        .prop_map(
            |(id, day, path, rows, min_time, max_time, row_group_rows, seq, deleted)| SegmentMeta {
                id,
                day,
                index_path: format!("{path}.index"),
                path,
                size: rows,
                rows,
                min_time,
                max_time,
                row_group_rows,
                seq,
                run: seq,
                level: 0,
                created: min_time,
                deleted,
            },
        )
}

fn schema() -> impl Strategy<Value = TableSchema> {
    prop::collection::vec(
        (
            name(),
            prop::sample::select(
                &[
                    ColumnKind::Tag,
                    ColumnKind::Time,
                    ColumnKind::Field(FieldType::Float),
                    ColumnKind::Field(FieldType::String),
                ][..],
            ),
        ),
        0..4,
    )
    .prop_map(|columns| {
        let mut schema = TableSchema::default();
        for (name, kind) in columns {
            // A refused column is one the schema does not get.
            let _ = schema.add_column(&name, kind);
        }
        schema
    })
}

fn op() -> impl Strategy<Value = Op> {
    let writer = (name(), any::<u64>()).prop_map(|(node, epoch)| WriterId { node, epoch });
    prop_oneof![
        1 => writer.prop_map(|writer| Op::Claim { writer }),
        4 => (db(), id(), table(), id()).prop_map(|(db, db_id, table, table_id)| Op::CreateTable {
            db,
            db_id,
            table,
            table_id
        }),
        1 => (db(), id()).prop_map(|(db, db_id)| Op::CreateDatabase { db, db_id }),
        1 => (db(), prop::option::of(table()), prop::option::of(any::<i64>()))
            .prop_map(|(db, table, nanos)| Op::Retention { db, table, nanos }),
        1 => (db(), table(), schema()).prop_map(|(db, table, schema)| Op::Schema { db, table, schema }),
        4 => (
            db(),
            table(),
            segment(),
            prop::collection::btree_map(name(), prop::collection::vec(name(), 0..3), 0..3)
        )
            .prop_map(|(db, table, segment, tags)| Op::AddSegment {
                db,
                table,
                segment,
                tags
            }),
        2 => (db(), table(), day(), id()).prop_map(|(db, table, day, id)| Op::RemoveSegment {
            db,
            table,
            day,
            id
        }),
        2 => (db(), table(), day(), id(), bitmap()).prop_map(|(db, table, day, id, rows)| {
            Op::DeleteRows {
                db,
                table,
                day,
                id,
                rows,
            }
        }),
        1 => (db(), table(), id(), name())
            .prop_map(|(db, table, id, key)| Op::SeriesDelta { db, table, id, key }),
        1 => (db(), table(), id(), name(), prop::collection::vec(name(), 0..3)).prop_map(
            |(db, table, id, full, replaced)| Op::SeriesFolded {
                db,
                table,
                id,
                full,
                replaced
            }
        ),
        1 => (name(), any::<u64>()).prop_map(|(node, upto)| Op::WalPersisted { node, upto }),
        1 => (db(), table(), any::<i64>(), any::<i64>(), any::<u64>()).prop_map(
            |(db, source, interval, lo, as_of)| Op::RollupRefreshed {
                db,
                name: source,
                as_of,
                pending: vec![Dirty {
                    lo,
                    hi: lo.saturating_add(interval),
                    clear: interval % 2 == 0
                }],
            }
        ),
        1 => (db(), table()).prop_map(|(db, name)| Op::DropRollup { db, name }),
        1 => prop::collection::vec(name(), 0..3).prop_map(|paths| Op::Collected { paths }),
    ]
}

/// Records numbered from 1, each of a few ops.
fn records() -> impl Strategy<Value = Vec<Record>> {
    prop::collection::vec(
        (
            prop::collection::vec(op(), 0..5),
            any::<i64>(),
            name(),
            any::<u64>(),
        ),
        1..8,
    )
    .prop_map(|records| {
        records
            .into_iter()
            .enumerate()
            .map(|(i, (ops, time, node, epoch))| Record {
                seq: i as u64 + 1,
                writer: WriterId { node, epoch },
                time,
                ops,
            })
            .collect()
    })
}

/// One change to stored bytes.
#[derive(Debug, Clone)]
enum Damage {
    Flip(usize, u8),
    Truncate(usize),
    Insert(usize, &'static str),
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(i, b)| Damage::Flip(i, b)),
        any::<usize>().prop_map(Damage::Truncate),
        (
            any::<usize>(),
            prop::sample::select(
                &[
                    "\"",
                    ",",
                    "{",
                    "}",
                    "[",
                    "]",
                    ":",
                    "-",
                    "9",
                    "4294967295",
                    "4294967296",
                    "-1",
                    "1e999",
                    "18446744073709551616",
                    "null",
                    "\"AAAA\"",
                    "\"OjAAAA==\"",
                ][..]
            )
        )
            .prop_map(|(i, s)| Damage::Insert(i, s)),
    ]
}

fn apply(bytes: &mut Vec<u8>, damage: &Damage) {
    let len = bytes.len();
    match *damage {
        Damage::Flip(i, bit) if len > 0 => bytes[i % len] ^= 1 << bit,
        Damage::Truncate(i) => bytes.truncate(i % (len + 1)),
        Damage::Insert(i, s) => {
            let at = i % (len + 1);
            bytes.splice(at..at, s.bytes());
        }
        Damage::Flip(..) => {}
    }
}

fn corrupt_or_ok<T>(r: Result<T>) -> Result<Option<T>, TestCaseError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(StorageError::Corrupt(_)) => Ok(None),
        Err(e) => Err(TestCaseError::fail(format!(
            "not reported as corrupt: {e:?}"
        ))),
    }
}

/// Folds `records` into an empty catalog as opening does, stopping at the first
/// that is corrupt.
fn fold(records: &[Record]) -> Result<Catalog, TestCaseError> {
    let mut state = Catalog::default();
    for r in records {
        match corrupt_or_ok(state.clone().applied(r))? {
            Some(next) => state = next,
            None => break,
        }
    }
    Ok(state)
}

fn json<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, TestCaseError> {
    serde_json::to_vec(v).map_err(|e| TestCaseError::fail(e.to_string()))
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn records_read_back_as_written(records in records()) {
        for r in &records {
            let back = decode_record(r.seq, &json(r)?)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(&back, r);
        }
    }

    #[test]
    fn any_records_fold_or_are_corrupt(records in records()) {
        let state = fold(&records)?;
        prop_assert!(state.seq <= records.len() as u64);
    }

    #[test]
    fn damaged_records_read_or_are_corrupt(
        records in records(),
        damages in prop::collection::vec(damage(), 1..4),
    ) {
        let mut read = Vec::new();
        for r in &records {
            let mut bytes = json(r)?;
            for d in &damages {
                apply(&mut bytes, d);
            }
            if let Some(r) = corrupt_or_ok(decode_record(r.seq, &bytes))? {
                read.push(r);
            }
        }
        fold(&read)?;
    }

    #[test]
    fn arbitrary_bytes_are_corrupt_records_and_checkpoints(
        bytes in prop::collection::vec(any::<u8>(), 0..200),
        seq in 0u64..3,
    ) {
        corrupt_or_ok(decode_record(seq, &bytes))?;
        corrupt_or_ok(decode_checkpoint(seq, &bytes))?;
        // The same bytes behind a valid zstd frame.
        let packed = zstd::bulk::compress(&bytes, 1).map_err(|e| TestCaseError::fail(e.to_string()))?;
        corrupt_or_ok(decode_checkpoint(seq, &packed))?;
    }

    #[test]
    fn checkpoints_read_back_as_written_or_damaged_are_corrupt(
        records in records(),
        damage in prop::option::of(damage()),
    ) {
        let state = fold(&records)?;
        let written = json(&state)?;
        let mut packed = zstd::bulk::compress(&written, CHECKPOINT_ZSTD_LEVEL)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        match damage {
            None => {
                let (back, size) = decode_checkpoint(state.seq, &packed)
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(size, written.len() as u64);
                prop_assert_eq!(json(&back)?, written);
            }
            Some(d) => {
                apply(&mut packed, &d);
                corrupt_or_ok(decode_checkpoint(state.seq, &packed))?;
            }
        }
    }
}
