//! Property-based fuzzing of the WAL's record decoder and replay: arbitrary bytes,
//! and valid records cut short, bit-flipped or with huge length fields, never
//! panic and never allocate past what the input holds; replay keeps exactly the
//! whole, valid records before the damage and reports the rest as torn; valid
//! records round-trip.
//!
//! `CITYTSDB_FUZZ_CASES` sets the cases per property (the long mode:
//! `CITYTSDB_FUZZ_CASES=100000 cargo test -p citytsdb-storage --lib wal::fuzz`).

use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, BooleanArray, Float64Array, Int64Array, StringArray, TimestampNanosecondArray,
    UInt64Array,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use proptest::prelude::*;

use super::*;
use crate::fuzz::config;

/// A column of `rows` values of one of the types a table has.
fn column(kind: u8, rows: usize) -> impl Strategy<Value = (DataType, ArrayRef)> {
    let n = rows;
    match kind % 6 {
        0 => prop::collection::vec(any::<i64>(), n)
            .prop_map(|v| {
                let a = TimestampNanosecondArray::from(v).with_timezone("UTC");
                (a.data_type().clone(), Arc::new(a) as ArrayRef)
            })
            .boxed(),
        1 => prop::collection::vec(prop::option::of("[a-z金,= \\\\]{0,6}"), n)
            .prop_map(|v| (DataType::Utf8, Arc::new(StringArray::from(v)) as ArrayRef))
            .boxed(),
        2 => prop::collection::vec(prop::option::of(any::<f64>()), n)
            .prop_map(|v| {
                (
                    DataType::Float64,
                    Arc::new(Float64Array::from(v)) as ArrayRef,
                )
            })
            .boxed(),
        3 => prop::collection::vec(prop::option::of(any::<i64>()), n)
            .prop_map(|v| (DataType::Int64, Arc::new(Int64Array::from(v)) as ArrayRef))
            .boxed(),
        4 => prop::collection::vec(prop::option::of(any::<u64>()), n)
            .prop_map(|v| (DataType::UInt64, Arc::new(UInt64Array::from(v)) as ArrayRef))
            .boxed(),
        _ => prop::collection::vec(prop::option::of(any::<bool>()), n)
            .prop_map(|v| {
                (
                    DataType::Boolean,
                    Arc::new(BooleanArray::from(v)) as ArrayRef,
                )
            })
            .boxed(),
    }
}

fn batch() -> impl Strategy<Value = RecordBatch> {
    (0usize..6, prop::collection::vec(any::<u8>(), 1..5))
        .prop_flat_map(|(rows, kinds)| {
            kinds
                .into_iter()
                .map(|k| column(k, rows))
                .collect::<Vec<_>>()
        })
        .prop_map(|columns| {
            let fields: Vec<Field> = columns
                .iter()
                .enumerate()
                .map(|(i, (t, _))| Field::new(format!("c{i}"), t.clone(), true))
                .collect();
            let arrays = columns.into_iter().map(|(_, a)| a).collect();
            RecordBatch::try_new(Arc::new(Schema::new(fields)), arrays)
                .expect("columns of one length")
        })
}

fn entry() -> impl Strategy<Value = WalEntry> {
    (
        "[a-z金_]{0,8}",
        prop::collection::vec(("[a-z金 ,]{0,8}", batch()), 0..3),
    )
        .prop_map(|(db, tables)| WalEntry { db, tables })
}

/// Whether two entries hold the same database, tables and rows.
fn same(a: &WalEntry, b: &WalEntry) -> bool {
    a.db == b.db
        && a.tables.len() == b.tables.len()
        && a.tables.iter().zip(&b.tables).all(|(x, y)| x == y)
}

/// One change to a record's bytes. `Length` writes a huge value over four bytes,
/// as a corrupt length field would hold.
#[derive(Debug, Clone)]
enum Damage {
    Flip(usize, u8),
    Truncate(usize),
    Length(usize, u32),
    Insert(usize, u8),
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(i, b)| Damage::Flip(i, b)),
        any::<usize>().prop_map(Damage::Truncate),
        (
            any::<usize>(),
            prop_oneof![
                Just(u32::MAX),
                Just(i32::MAX as u32),
                Just(0x8000_0000),
                Just(0xFFFF_FFF0),
                any::<u32>()
            ]
        )
            .prop_map(|(i, v)| Damage::Length(i, v)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Damage::Insert(i, b)),
    ]
}

fn apply(bytes: &mut Vec<u8>, damage: &Damage) {
    let len = bytes.len();
    match *damage {
        Damage::Flip(i, bit) if len > 0 => bytes[i % len] ^= 1 << bit,
        Damage::Truncate(i) => bytes.truncate(i % (len + 1)),
        Damage::Length(i, v) if len >= 4 => {
            let at = i % (len - 3);
            bytes[at..at + 4].copy_from_slice(&v.to_le_bytes());
        }
        Damage::Insert(i, b) => bytes.insert(i % (len + 1), b),
        _ => {}
    }
}

/// A decode's answer: a whole entry, or an error saying the record is corrupt.
fn decodes_or_is_corrupt(payload: &[u8]) -> Result<(), TestCaseError> {
    match WalEntry::decode(payload) {
        Ok(_) | Err(StorageError::Corrupt(_)) => Ok(()),
        Err(e) => Err(TestCaseError::fail(format!(
            "not reported as corrupt: {e:?}"
        ))),
    }
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn arbitrary_payloads_decode_or_are_corrupt(payload in prop::collection::vec(any::<u8>(), 0..256)) {
        decodes_or_is_corrupt(&payload)?;
    }

    #[test]
    fn valid_entries_round_trip(entry in entry()) {
        let payload = entry.encode().map_err(|e| TestCaseError::fail(e.to_string()))?;
        let back = WalEntry::decode(&payload).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert!(same(&entry, &back), "{:?} came back as {:?}", entry, back);
    }

    #[test]
    fn damaged_payloads_decode_or_are_corrupt(
        entry in entry(),
        damages in prop::collection::vec(damage(), 1..4),
    ) {
        let mut payload = entry.encode().map_err(|e| TestCaseError::fail(e.to_string()))?;
        for d in &damages {
            apply(&mut payload, d);
        }
        decodes_or_is_corrupt(&payload)?;
    }

}

proptest! {
    // Each case writes a file, and replay fsyncs the one it cuts: fewer cases.
    #![proptest_config(config(64))]

    #[test]
    fn replay_keeps_the_records_before_the_damage(
        entries in prop::collection::vec(entry(), 1..4),
        damage in damage(),
    ) {
        let dir = tempfile::tempdir().map_err(|e| TestCaseError::fail(e.to_string()))?;
        let path = paths::wal_file(dir.path(), 1);
        let mut data = MAGIC.to_vec();
        let mut starts = Vec::new();
        for e in &entries {
            starts.push(data.len());
            let payload = e.encode().map_err(|e| TestCaseError::fail(e.to_string()))?;
            data.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            data.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
            data.extend_from_slice(&payload);
        }
        let whole = data.clone();
        apply(&mut data, &damage);
        fs::write(&path, &data).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let r = replay_file(&path).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let kept = fs::metadata(&path).map_err(|e| TestCaseError::fail(e.to_string()))?.len();
        prop_assert_eq!(kept + r.torn_bytes, data.len() as u64);
        // The records before the first changed byte are kept, whole and in order.
        let first_change = whole.iter().zip(&data).position(|(a, b)| a != b)
            .unwrap_or(whole.len().min(data.len()));
        let intact = starts.iter().skip(1).chain(std::iter::once(&whole.len()))
            .take_while(|&&end| end <= first_change).count();
        if first_change < HEADER_LEN {
            prop_assert!(r.entries.is_empty() || first_change >= data.len());
        } else {
            prop_assert!(r.entries.len() >= intact, "{} of {} intact records", r.entries.len(), intact);
        }
        for (got, want) in r.entries.iter().zip(&entries) {
            prop_assert!(same(got, want));
        }
        // A single flipped bit or a cut is caught by the length or the checksum.
        if matches!(damage, Damage::Flip(..) | Damage::Truncate(_)) && data != whole {
            prop_assert_eq!(r.entries.len(), intact);
        }
    }

    #[test]
    fn replay_of_arbitrary_files_never_panics(
        body in prop::collection::vec(any::<u8>(), 0..300),
        with_magic in any::<bool>(),
    ) {
        let dir = tempfile::tempdir().map_err(|e| TestCaseError::fail(e.to_string()))?;
        let path = paths::wal_file(dir.path(), 1);
        let mut data = if with_magic { MAGIC.to_vec() } else { Vec::new() };
        data.extend_from_slice(&body);
        fs::write(&path, &data).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let r = replay_file(&path).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let kept = fs::metadata(&path).map_err(|e| TestCaseError::fail(e.to_string()))?.len();
        prop_assert_eq!(kept + r.torn_bytes, data.len() as u64);
    }
}
