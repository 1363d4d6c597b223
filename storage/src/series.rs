//! The series registry: for every series of a table, its first and last time, how
//! many readings it received, and its latest row — kept up to date on every write.
//!
//! It answers "the latest reading of every device" (`DISTINCT ON (device) ... ORDER
//! BY device, time DESC`) and `system.devices` from memory, without reading a
//! segment. A series is one combination of tag values, as in the segments.
//!
//! The latest row follows the write rule of the table: a later time replaces it, the
//! same time merges into it field by field (a non-null value wins), an earlier time
//! leaves it alone. `rows` counts readings received, so a retried reading counts
//! again; it is a feed's volume, not the table's row count.
//!
//! Each flush persists the registry of what it flushed beside the catalog version it
//! commits (an Arrow IPC file per table), and opening loads it and replays the WAL on
//! top, so a restart loses nothing and counts nothing twice.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::io::Cursor;
use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, Float64Array, Int64Array, RecordBatch, StringArray,
    StringBuilder, TimestampNanosecondArray, UInt32Array, UInt64Array,
};
use datafusion::arrow::compute::{cast, take_record_batch};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimestampNanosecondType};
use datafusion::arrow::ipc::reader::FileReader;
use datafusion::arrow::ipc::writer::FileWriter;
use datafusion::common::ScalarValue;

use crate::error::{Result, StorageError};
use crate::schema::{ColumnKind, TableSchema, TIME_COLUMN};

/// Name of the persisted column holding each series' first time.
const FIRST_TIME: &str = "__first_time";
/// Name of the persisted column holding each series' reading count.
const ROWS: &str = "__rows";
/// File metadata key marking a correction (see [`SeriesTable::replaces`]).
const REPLACES: &str = "citytsdb.series.replaces";

fn internal(e: datafusion::error::DataFusionError) -> StorageError {
    StorageError::Internal(e.to_string())
}

/// One series: its tags, time span, count and latest row.
#[derive(Debug, Clone)]
struct Series {
    /// Tag values by tag slot; slots past the end are null.
    tags: Vec<Option<Arc<str>>>,
    first_time: i64,
    last_time: i64,
    rows: u64,
    /// Latest values by field slot; slots past the end are null.
    last: Vec<Option<ScalarValue>>,
}

/// A written field column, its type looked at once per batch rather than once per
/// value: the latest value of every row is taken from it.
enum FieldValues<'a> {
    Float(&'a Float64Array),
    Integer(&'a Int64Array),
    UInteger(&'a UInt64Array),
    Boolean(&'a BooleanArray),
    Other(&'a ArrayRef),
}

impl<'a> FieldValues<'a> {
    fn of(a: &'a ArrayRef) -> Self {
        match a.data_type() {
            DataType::Float64 => Self::Float(a.as_primitive()),
            DataType::Int64 => Self::Integer(a.as_primitive()),
            DataType::UInt64 => Self::UInteger(a.as_primitive()),
            DataType::Boolean => Self::Boolean(a.as_boolean()),
            _ => Self::Other(a),
        }
    }

    fn is_valid(&self, row: usize) -> bool {
        match self {
            Self::Float(a) => a.is_valid(row),
            Self::Integer(a) => a.is_valid(row),
            Self::UInteger(a) => a.is_valid(row),
            Self::Boolean(a) => a.is_valid(row),
            Self::Other(a) => a.is_valid(row),
        }
    }

    /// The value at a valid `row`, as [`ScalarValue::try_from_array`] gives it.
    fn value(&self, row: usize) -> Result<ScalarValue> {
        Ok(match self {
            Self::Float(a) => ScalarValue::Float64(Some(a.value(row))),
            Self::Integer(a) => ScalarValue::Int64(Some(a.value(row))),
            Self::UInteger(a) => ScalarValue::UInt64(Some(a.value(row))),
            Self::Boolean(a) => ScalarValue::Boolean(Some(a.value(row))),
            Self::Other(a) => ScalarValue::try_from_array(a, row).map_err(internal)?,
        })
    }
}

/// A series' key as the registry stores it: its tag slots' values encoded by
/// [`SeriesTable::key`]. It hashes as the values it encodes, so a row's series is
/// found by its values ([`Values`]) without encoding them.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SeriesKey(Box<str>);

impl Hash for SeriesKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        Encoded(&self.0).hash(state)
    }
}

/// An encoded key, borrowed: hashes and compares as the [`SeriesKey`] it encodes.
struct Encoded<'a>(&'a str);

impl<'a> Encoded<'a> {
    /// The tag slots' values it encodes, up to the last non-null one. A key that is
    /// not [`SeriesTable::key`]'s encoding ends where it stops making sense.
    fn values(&self) -> impl Iterator<Item = Option<&'a str>> + use<'a> {
        let mut rest: &'a str = self.0;
        std::iter::from_fn(move || {
            if let Some(after) = rest.strip_prefix('-') {
                rest = after;
                return Some(None);
            }
            let colon = rest.find(':')?;
            let len: usize = rest[..colon].parse().ok()?;
            let value = rest.get(colon + 1..colon + 1 + len)?;
            rest = &rest[colon + 1 + len..];
            Some(Some(value))
        })
    }
}

impl Hash for Encoded<'_> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.values().for_each(|v| v.hash(state));
    }
}

impl hashbrown::Equivalent<SeriesKey> for Encoded<'_> {
    fn equivalent(&self, key: &SeriesKey) -> bool {
        *self.0 == *key.0
    }
}

/// A row's tag slots' values, looked up in the registry as the key they would
/// encode to.
struct Values<'v, 'a>(&'v [Option<&'a str>]);

impl<'v, 'a> Values<'v, 'a> {
    /// The values up to the last non-null one, as [`SeriesTable::key`] encodes them.
    fn of(values: &'v [Option<&'a str>]) -> Self {
        let used = values
            .iter()
            .rposition(Option::is_some)
            .map_or(0, |i| i + 1);
        Self(&values[..used])
    }
}

impl Hash for Values<'_, '_> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.iter().for_each(|v| v.hash(state));
    }
}

impl hashbrown::Equivalent<SeriesKey> for Values<'_, '_> {
    fn equivalent(&self, key: &SeriesKey) -> bool {
        let mut stored = Encoded(&key.0).values();
        self.0.iter().all(|v| stored.next() == Some(*v)) && stored.next().is_none()
    }
}

/// The series of one table.
#[derive(Debug, Clone, Default)]
pub struct SeriesTable {
    /// Tag names by slot, in the order first seen.
    tag_slots: Vec<String>,
    /// Field names by slot, in the order first seen.
    field_slots: Vec<String>,
    /// Series key (see [`SeriesTable::key`]) -> index in `series` (hashbrown's
    /// default hasher, randomly seeded: SipHash was a tenth of a write's time).
    /// Looked up by the tag values themselves ([`Values`]), so a written row's key
    /// is never encoded unless its series is new.
    index: datafusion::common::HashMap<SeriesKey, usize>,
    series: Vec<Series>,
    /// Whether this registry, applied to an older one, replaces its series'
    /// entries (a correction after a delete) rather than adding to them; an entry of
    /// no rows removes the series.
    pub replaces: bool,
    /// The last [`SeriesTable::rows`] made, until the series change: latest-value
    /// queries that come faster than writes build it once.
    built: BuiltRows,
}

/// [`SeriesRows`] as last built, with the schema they were built in.
#[derive(Default)]
struct BuiltRows(std::sync::Mutex<Option<(SchemaRef, Arc<SeriesRows>)>>);

impl BuiltRows {
    fn get(&self, schema: &SchemaRef) -> Option<Arc<SeriesRows>> {
        let built = self.0.lock().unwrap_or_else(|e| e.into_inner());
        built
            .as_ref()
            .filter(|(s, _)| s == schema)
            .map(|(_, rows)| rows.clone())
    }

    fn set(&self, schema: SchemaRef, rows: Arc<SeriesRows>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some((schema, rows));
    }

    fn clear(&mut self) {
        *self.0.get_mut().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

impl Clone for BuiltRows {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl std::fmt::Debug for BuiltRows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BuiltRows")
    }
}

/// A table's series as Arrow arrays, one row per series.
#[derive(Debug, Clone)]
pub struct SeriesRows {
    /// Each series' latest row in the table's schema (`time` is its last time).
    pub latest: RecordBatch,
    /// Each series' first time, nanoseconds.
    pub first_time: Vec<i64>,
    /// Readings each series received.
    pub rows: Vec<u64>,
}

impl SeriesRows {
    /// The series whose latest row is at or after `time`, with first times no
    /// older than it.
    pub fn since(self, time: i64) -> Result<SeriesRows> {
        let Some(last) = self
            .latest
            .column_by_name(TIME_COLUMN)
            .and_then(|c| c.as_primitive_opt::<TimestampNanosecondType>())
        else {
            return Ok(self);
        };
        let keep: Vec<bool> = last.values().iter().map(|&t| t >= time).collect();
        if keep.iter().all(|k| *k) {
            let first_time = self.first_time.iter().map(|&t| t.max(time)).collect();
            return Ok(SeriesRows { first_time, ..self });
        }
        let mask = datafusion::arrow::array::BooleanArray::from(keep.clone());
        let latest = datafusion::arrow::compute::filter_record_batch(&self.latest, &mask)?;
        let first_time = self
            .first_time
            .iter()
            .zip(&keep)
            .filter(|(_, k)| **k)
            .map(|(&t, _)| t.max(time))
            .collect();
        let rows = self
            .rows
            .iter()
            .zip(&keep)
            .filter(|(_, k)| **k)
            .map(|(&n, _)| n)
            .collect();
        Ok(SeriesRows {
            latest,
            first_time,
            rows,
        })
    }
}

impl SeriesTable {
    /// Series known.
    pub fn len(&self) -> usize {
        self.series.len()
    }

    /// True when no series is known.
    pub fn is_empty(&self) -> bool {
        self.series.is_empty()
    }

    /// Whether a series with these tags (name, value) is known. A tag name the
    /// table has never had makes a new series.
    pub fn knows<'t>(&self, tags: impl IntoIterator<Item = (&'t str, &'t str)>) -> bool {
        let mut values: Vec<Option<&str>> = vec![None; self.tag_slots.len()];
        for (name, value) in tags {
            match self.tag_slots.iter().position(|s| s == name) {
                Some(slot) => values[slot] = Some(value),
                None => return false,
            }
        }
        self.index.contains_key(&Values::of(&values))
    }

    fn slot(slots: &mut Vec<String>, name: &str) -> usize {
        match slots.iter().position(|s| s == name) {
            Some(i) => i,
            None => {
                slots.push(name.to_string());
                slots.len() - 1
            }
        }
    }

    /// Writes a series key: each tag slot up to the last non-null one, as its
    /// length and bytes (`-` for null), so no two tag sets share a key and a tag
    /// added to the table later leaves existing keys unchanged.
    fn key(out: &mut String, values: &[Option<&str>]) {
        out.clear();
        let used = values
            .iter()
            .rposition(Option::is_some)
            .map_or(0, |i| i + 1);
        for v in &values[..used] {
            match v {
                Some(v) => {
                    // The length's digits without a String per tag per row.
                    out.push_str(itoa::Buffer::new().format(v.len()));
                    out.push(':');
                    out.push_str(v);
                }
                None => out.push('-'),
            }
        }
    }

    /// The registry of rows merged by [`sort_dedup_runs`](crate::merge::sort_dedup_runs)
    /// (sorted by series then time, a (series, time) once), `runs` saying where each
    /// series' rows end and how many were received: what applying every received
    /// row would make, for the cost of one row per series. A run's last row is its
    /// series' latest, merged field by field as [`apply`](Self::apply) merges a time
    /// written twice. `None` if two runs turn out to be one series.
    pub fn from_runs(
        merged: &RecordBatch,
        runs: &[crate::merge::SeriesRun],
    ) -> Result<Option<Self>> {
        let mut out = Self::default();
        if runs.is_empty() {
            return Ok(Some(out));
        }
        let Some(times) = merged
            .column_by_name(TIME_COLUMN)
            .and_then(|c| c.as_primitive_opt::<TimestampNanosecondType>())
        else {
            return Ok(None);
        };
        let last_rows: Vec<u32> = runs.iter().map(|r| r.end as u32 - 1).collect();
        let latest = take_record_batch(merged, &UInt32Array::from(last_rows))?;
        out.apply(&latest)?;
        if out.series.len() != runs.len() {
            return Ok(None);
        }
        let mut start = 0;
        for (series, run) in out.series.iter_mut().zip(runs) {
            series.first_time = times.value(start);
            series.rows = run.received;
            start = run.end;
        }
        Ok(Some(out))
    }

    /// Applies one written batch (any subset of the table's columns, rows in any
    /// order), in write order relative to earlier calls.
    pub fn apply(&mut self, batch: &RecordBatch) -> Result<()> {
        self.built.clear();
        let schema = batch.schema();
        let Some(times) = batch
            .column_by_name(TIME_COLUMN)
            .and_then(|c| c.as_primitive_opt::<TimestampNanosecondType>())
        else {
            return Err(StorageError::Internal(
                "a written batch has no nanosecond time column".into(),
            ));
        };
        let table = TableSchema::from_arrow(&schema).map_err(StorageError::Internal)?;
        let mut tags: Vec<(usize, ArrayRef)> = Vec::new();
        let mut fields: Vec<(usize, ArrayRef)> = Vec::new();
        for (i, f) in schema.fields().iter().enumerate() {
            match table.kind(f.name()) {
                Some(ColumnKind::Tag) => {
                    let slot = Self::slot(&mut self.tag_slots, f.name());
                    tags.push((slot, cast(batch.column(i), &DataType::Utf8)?));
                }
                Some(ColumnKind::Field(_)) => {
                    let slot = Self::slot(&mut self.field_slots, f.name());
                    fields.push((slot, batch.column(i).clone()));
                }
                _ => {}
            }
        }
        let tag_strings: Vec<(usize, &StringArray)> = tags
            .iter()
            .map(|(slot, a)| (*slot, a.as_string::<i32>()))
            .collect();
        let field_values: Vec<(usize, FieldValues<'_>)> = fields
            .iter()
            .map(|(slot, a)| (*slot, FieldValues::of(a)))
            .collect();
        // Each row's series first, then the rows applied: looked up one after
        // another, the rows' lookups (each a few cache misses in a registry of
        // many series) overlap rather than wait on the update before them.
        let mut values: Vec<Option<&str>> = vec![None; self.tag_slots.len()];
        let mut key = String::new();
        let mut series_of = Vec::with_capacity(batch.num_rows());
        for row in 0..batch.num_rows() {
            values.iter_mut().for_each(|v| *v = None);
            for (slot, a) in &tag_strings {
                if a.is_valid(row) {
                    values[*slot] = Some(a.value(row));
                }
            }
            let i = match self.index.get(&Values::of(&values)) {
                Some(&i) => i,
                None => {
                    let time = times.value(row);
                    Self::key(&mut key, &values);
                    self.series.push(Series {
                        tags: values.iter().map(|v| v.map(Arc::from)).collect(),
                        first_time: time,
                        last_time: time,
                        rows: 0,
                        last: Vec::new(),
                    });
                    self.index
                        .insert(SeriesKey(key.as_str().into()), self.series.len() - 1);
                    self.series.len() - 1
                }
            };
            series_of.push(i);
        }
        for (row, &i) in series_of.iter().enumerate() {
            let time = times.value(row);
            let s = &mut self.series[i];
            s.rows += 1;
            s.first_time = s.first_time.min(time);
            if time < s.last_time {
                continue;
            }
            if time > s.last_time {
                s.last_time = time;
                s.last.iter_mut().for_each(|v| *v = None);
            }
            for (slot, a) in &field_values {
                if a.is_valid(row) {
                    if s.last.len() <= *slot {
                        s.last.resize(*slot + 1, None);
                    }
                    s.last[*slot] = Some(a.value(row)?);
                }
            }
        }
        Ok(())
    }

    /// Where `newer`'s tag and field slots are in this registry (added if new).
    fn slot_maps(&mut self, newer: &SeriesTable) -> (Vec<usize>, Vec<usize>) {
        let tags = newer
            .tag_slots
            .iter()
            .map(|name| Self::slot(&mut self.tag_slots, name))
            .collect();
        let fields = newer
            .field_slots
            .iter()
            .map(|name| Self::slot(&mut self.field_slots, name))
            .collect();
        (tags, fields)
    }

    /// Another registry's series in this one's slots (see `slot_maps`): its tags,
    /// with its key in `key`, and its latest values.
    fn remapped(
        &self,
        n: &Series,
        (tag_map, field_map): &(Vec<usize>, Vec<usize>),
        key: &mut String,
    ) -> (Vec<Option<Arc<str>>>, Vec<Option<ScalarValue>>) {
        let mut tags: Vec<Option<Arc<str>>> = vec![None; self.tag_slots.len()];
        for (from, v) in n.tags.iter().enumerate() {
            if let (Some(v), Some(&to)) = (v, tag_map.get(from)) {
                tags[to] = Some(v.clone());
            }
        }
        let values: Vec<Option<&str>> = tags.iter().map(|t| t.as_deref()).collect();
        Self::key(key, &values);
        let mut last: Vec<Option<ScalarValue>> = Vec::new();
        for (from, v) in n.last.iter().enumerate() {
            if let (Some(v), Some(&to)) = (v, field_map.get(from)) {
                if last.len() <= to {
                    last.resize(to + 1, None);
                }
                last[to] = Some(v.clone());
            }
        }
        (tags, last)
    }

    /// Folds in the registry of later writes (as a flush's delta holds them): for
    /// each of `newer`'s series, counts add up, the first time is the earlier one,
    /// and the latest row follows the write rule, `newer` being the later write.
    pub fn absorb(&mut self, newer: &SeriesTable) {
        self.built.clear();
        let maps = self.slot_maps(newer);
        let mut key = String::new();
        for n in &newer.series {
            let (tags, last) = self.remapped(n, &maps, &mut key);
            let Some(&i) = self.index.get(&Encoded(key.as_str())) else {
                self.series.push(Series {
                    tags,
                    first_time: n.first_time,
                    last_time: n.last_time,
                    rows: n.rows,
                    last,
                });
                self.index
                    .insert(SeriesKey(key.as_str().into()), self.series.len() - 1);
                continue;
            };
            let s = &mut self.series[i];
            s.rows += n.rows;
            s.first_time = s.first_time.min(n.first_time);
            if n.last_time < s.last_time {
                continue;
            }
            if n.last_time > s.last_time {
                s.last_time = n.last_time;
                s.last = last;
                continue;
            }
            if s.last.len() < last.len() {
                s.last.resize(last.len(), None);
            }
            for (slot, v) in last.into_iter().enumerate() {
                if v.is_some() {
                    s.last[slot] = v;
                }
            }
        }
    }

    /// Applies a correction (`newer.replaces`): each of `newer`'s series takes its
    /// entry whole, and a series whose entry has no rows is removed.
    pub fn replace_from(&mut self, newer: &SeriesTable) {
        self.built.clear();
        let maps = self.slot_maps(newer);
        let mut key = String::new();
        for n in &newer.series {
            let (tags, last) = self.remapped(n, &maps, &mut key);
            let found = self.index.get(&Encoded(key.as_str())).copied();
            if n.rows == 0 {
                if let Some(i) = found {
                    self.index.remove(&Encoded(key.as_str()));
                    self.series.swap_remove(i);
                    if i < self.series.len() {
                        // The last series moved into the hole.
                        let moved: Vec<Option<&str>> =
                            self.series[i].tags.iter().map(|t| t.as_deref()).collect();
                        let mut moved_key = String::new();
                        Self::key(&mut moved_key, &moved);
                        self.index.insert(SeriesKey(moved_key.into()), i);
                    }
                }
                continue;
            }
            let entry = Series {
                tags,
                first_time: n.first_time,
                last_time: n.last_time,
                rows: n.rows,
                last,
            };
            match found {
                Some(i) => self.series[i] = entry,
                None => {
                    self.series.push(entry);
                    self.index
                        .insert(SeriesKey(key.as_str().into()), self.series.len() - 1);
                }
            }
        }
    }

    /// The first time and row count of the series `tags` names (tag name, value).
    fn counts(&self, tags: &[(&str, Option<&str>)]) -> Option<(i64, u64)> {
        let mut values: Vec<Option<&str>> = vec![None; self.tag_slots.len()];
        for (name, v) in tags {
            match self.tag_slots.iter().position(|s| s == name) {
                Some(i) => values[i] = *v,
                None if v.is_some() => return None,
                None => {}
            }
        }
        let mut key = String::new();
        Self::key(&mut key, &values);
        let s = &self.series[*self.index.get(&Encoded(key.as_str()))?];
        Some((s.first_time, s.rows))
    }

    /// Takes each series' first time and row count from `from` (where it has the
    /// series), and marks the series from position `gone` on as having no rows.
    pub fn take_counts(&mut self, from: &SeriesTable, gone: usize) {
        self.built.clear();
        for i in 0..self.series.len() {
            if i >= gone {
                self.series[i].rows = 0;
                continue;
            }
            let tags: Vec<(&str, Option<&str>)> = self
                .tag_slots
                .iter()
                .zip(
                    self.series[i]
                        .tags
                        .iter()
                        .map(|t| t.as_deref())
                        .chain(std::iter::repeat(None)),
                )
                .map(|(name, v)| (name.as_str(), v))
                .collect();
            if let Some((first, rows)) = from.counts(&tags) {
                let s = &mut self.series[i];
                s.first_time = first.min(s.first_time);
                s.rows = rows;
            }
        }
    }

    /// Every series as arrays in `schema`'s columns (columns it never saw are null).
    pub fn rows(&self, schema: &TableSchema) -> Result<SeriesRows> {
        let arrow = schema.arrow_schema();
        if let Some(rows) = self.built.get(&arrow) {
            return Ok(rows.as_ref().clone());
        }
        let rows = self.build_rows(schema, &arrow)?;
        self.built.set(arrow, Arc::new(rows.clone()));
        Ok(rows)
    }

    fn build_rows(&self, schema: &TableSchema, arrow: &SchemaRef) -> Result<SeriesRows> {
        let mut columns: Vec<ArrayRef> = Vec::with_capacity(arrow.fields().len());
        for (c, f) in schema.columns().iter().zip(arrow.fields()) {
            let array: ArrayRef = match c.kind {
                ColumnKind::Time => Arc::new(
                    TimestampNanosecondArray::from_iter_values(
                        self.series.iter().map(|s| s.last_time),
                    )
                    .with_data_type(f.data_type().clone()),
                ),
                ColumnKind::Tag => {
                    let slot = self.tag_slots.iter().position(|s| *s == c.name);
                    let bytes = self
                        .series
                        .iter()
                        .map(|s| {
                            slot.and_then(|i| s.tags.get(i)?.as_deref())
                                .map_or(0, str::len)
                        })
                        .sum();
                    let mut values = StringBuilder::with_capacity(self.series.len(), bytes);
                    for s in &self.series {
                        values.append_option(slot.and_then(|i| s.tags.get(i)?.as_deref()));
                    }
                    Arc::new(values.finish())
                }
                ColumnKind::Field(_) => {
                    let slot = self.field_slots.iter().position(|s| *s == c.name);
                    match self.typed_field(slot, f.data_type()) {
                        Some(array) => array,
                        None if self.series.is_empty() => {
                            datafusion::arrow::array::new_empty_array(f.data_type())
                        }
                        None => {
                            let null = ScalarValue::try_from(f.data_type()).map_err(internal)?;
                            let values = self.series.iter().map(|s| {
                                slot.and_then(|i| s.last.get(i).cloned().flatten())
                                    .unwrap_or_else(|| null.clone())
                            });
                            ScalarValue::iter_to_array(values).map_err(internal)?
                        }
                    }
                }
            };
            columns.push(array);
        }
        let latest = RecordBatch::try_new(arrow.clone(), columns)?;
        Ok(SeriesRows {
            latest,
            first_time: self.series.iter().map(|s| s.first_time).collect(),
            rows: self.series.iter().map(|s| s.rows).collect(),
        })
    }

    /// The latest values of field `slot` as an array of `data_type`, built directly
    /// for the field types line protocol writes; `None` for any other type, or if
    /// a value is not of the column's type, to be built from the scalars instead.
    fn typed_field(&self, slot: Option<usize>, data_type: &DataType) -> Option<ArrayRef> {
        fn collect<'a, T>(
            series: &'a [Series],
            slot: Option<usize>,
            value: impl Fn(&'a ScalarValue) -> Option<Option<T>>,
        ) -> Option<Vec<Option<T>>> {
            series
                .iter()
                .map(|s| match slot.and_then(|i| s.last.get(i)?.as_ref()) {
                    Some(v) => value(v),
                    None => Some(None),
                })
                .collect()
        }
        let series = &self.series;
        Some(match data_type {
            DataType::Float64 => {
                Arc::new(Float64Array::from(collect(series, slot, |v| match v {
                    ScalarValue::Float64(x) => Some(*x),
                    _ => None,
                })?))
            }
            DataType::Int64 => Arc::new(Int64Array::from(collect(series, slot, |v| match v {
                ScalarValue::Int64(x) => Some(*x),
                _ => None,
            })?)),
            DataType::UInt64 => Arc::new(UInt64Array::from(collect(series, slot, |v| match v {
                ScalarValue::UInt64(x) => Some(*x),
                _ => None,
            })?)),
            DataType::Boolean => {
                Arc::new(BooleanArray::from(collect(series, slot, |v| match v {
                    ScalarValue::Boolean(x) => Some(*x),
                    _ => None,
                })?))
            }
            DataType::Utf8 => Arc::new(StringArray::from(collect(series, slot, |v| match v {
                ScalarValue::Utf8(x) => Some(x.as_deref()),
                _ => None,
            })?)),
            _ => return None,
        })
    }

    /// The table's series as an Arrow IPC file, for persisting beside the catalog.
    pub fn encode(&self, schema: &TableSchema) -> Result<Vec<u8>> {
        let rows = self.rows(schema)?;
        let mut fields: Vec<Arc<Field>> = rows.latest.schema().fields().iter().cloned().collect();
        fields.push(Arc::new(Field::new(FIRST_TIME, DataType::Int64, false)));
        fields.push(Arc::new(Field::new(ROWS, DataType::UInt64, false)));
        let mut columns = rows.latest.columns().to_vec();
        columns.push(Arc::new(datafusion::arrow::array::Int64Array::from(
            rows.first_time,
        )));
        columns.push(Arc::new(UInt64Array::from(rows.rows)));
        let mut metadata = HashMap::new();
        if self.replaces {
            metadata.insert(REPLACES.to_string(), "true".to_string());
        }
        let schema: SchemaRef = Arc::new(Schema::new_with_metadata(fields, metadata));
        let batch = RecordBatch::try_new(schema.clone(), columns)?;
        let mut out = Vec::new();
        let mut writer = FileWriter::try_new(&mut out, &schema)?;
        writer.write(&batch)?;
        writer.finish()?;
        drop(writer);
        Ok(out)
    }

    /// Reads a table's series back from [`SeriesTable::encode`]'s output.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let reader = FileReader::try_new(Cursor::new(bytes), None)?;
        let mut out = Self {
            replaces: reader.schema().metadata().get(REPLACES).map(String::as_str) == Some("true"),
            ..Self::default()
        };
        for batch in reader {
            let batch = batch?;
            let first = batch
                .column_by_name(FIRST_TIME)
                .and_then(|c| c.as_primitive_opt::<datafusion::arrow::datatypes::Int64Type>())
                .ok_or_else(|| StorageError::Internal("series file without first times".into()))?
                .clone();
            let rows = batch
                .column_by_name(ROWS)
                .and_then(|c| c.as_primitive_opt::<datafusion::arrow::datatypes::UInt64Type>())
                .ok_or_else(|| StorageError::Internal("series file without row counts".into()))?
                .clone();
            let keep: Vec<usize> = batch
                .schema()
                .fields()
                .iter()
                .enumerate()
                .filter(|(_, f)| f.name() != FIRST_TIME && f.name() != ROWS)
                .map(|(i, _)| i)
                .collect();
            let latest = batch.project(&keep)?;
            let start = out.series.len();
            out.apply(&latest)?;
            // One row per series: restore what `apply` cannot know.
            for (i, s) in out.series[start..].iter_mut().enumerate() {
                s.first_time = first.value(i);
                s.rows = rows.value(i);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::{ColumnDef, FieldType};
    use datafusion::arrow::array::{Float64Array, Int64Array};

    fn schema() -> TableSchema {
        TableSchema::from(vec![
            ColumnDef {
                name: TIME_COLUMN.into(),
                kind: ColumnKind::Time,
            },
            ColumnDef {
                name: "device".into(),
                kind: ColumnKind::Tag,
            },
            ColumnDef {
                name: "tilt".into(),
                kind: ColumnKind::Field(FieldType::Float),
            },
            ColumnDef {
                name: "battery".into(),
                kind: ColumnKind::Field(FieldType::Integer),
            },
        ])
    }

    /// A registry's series as sorted text: tags, latest row, first time, count.
    fn described(t: &SeriesTable) -> Vec<String> {
        let rows = t.rows(&schema()).unwrap();
        let latest = datafusion::arrow::util::display::ArrayFormatter::try_new;
        let columns: Vec<_> = rows
            .latest
            .columns()
            .iter()
            .map(|c| latest(c.as_ref(), &Default::default()).unwrap())
            .collect();
        let mut out: Vec<String> = (0..rows.latest.num_rows())
            .map(|i| {
                let values: Vec<String> = columns.iter().map(|c| c.value(i).to_string()).collect();
                format!(
                    "{} first={} rows={}",
                    values.join(" "),
                    rows.first_time[i],
                    rows.rows[i]
                )
            })
            .collect();
        out.sort();
        out
    }

    #[test]
    fn the_registry_of_merged_runs_is_that_of_every_row() {
        // Out of order, a (series, time) written twice with fields split over the
        // writes, an earlier time after a later one, nulls.
        let writes = [
            batch(&[
                ("a", 20, Some(1.0), None),
                ("b", 5, None, Some(7)),
                ("a", 10, Some(9.0), Some(3)),
            ]),
            batch(&[
                ("a", 20, None, Some(4)),
                ("c", 1, None, None),
                ("b", 5, Some(2.5), None),
                ("b", 3, Some(8.0), Some(8)),
            ]),
            batch(&[("a", 20, Some(6.0), None), ("c", 2, Some(0.5), None)]),
        ];
        let mut every_row = SeriesTable::default();
        for w in &writes {
            every_row.apply(w).unwrap();
        }
        let arrow = schema().arrow_schema();
        let keys = crate::merge::key_columns(&schema(), &arrow).unwrap();
        let (merged, runs) = crate::merge::sort_dedup_runs(&arrow, &writes, &keys).unwrap();
        let runs = runs.expect("time is never null");
        assert_eq!(runs.iter().map(|r| r.received).sum::<u64>(), 9);
        let from_runs = SeriesTable::from_runs(&merged, &runs).unwrap().unwrap();
        assert_eq!(described(&from_runs), described(&every_row));
        assert_eq!(from_runs.len(), 3);
    }

    #[test]
    fn a_latest_value_of_each_type_is_the_arrays_scalar() {
        let columns: Vec<ArrayRef> = vec![
            Arc::new(Float64Array::from(vec![Some(1.5), None])),
            Arc::new(Int64Array::from(vec![Some(-3), None])),
            Arc::new(UInt64Array::from(vec![Some(7), None])),
            Arc::new(BooleanArray::from(vec![Some(true), None])),
            Arc::new(StringArray::from(vec![Some("open"), None])),
        ];
        for a in &columns {
            let values = FieldValues::of(a);
            assert!(values.is_valid(0) && !values.is_valid(1));
            let got = values.value(0).unwrap();
            assert_eq!(got, ScalarValue::try_from_array(a, 0).unwrap());
            assert_eq!(got.data_type(), *a.data_type());
        }
    }

    fn batch(rows: &[(&str, i64, Option<f64>, Option<i64>)]) -> RecordBatch {
        let s = schema();
        RecordBatch::try_new(
            s.arrow_schema(),
            vec![
                Arc::new(
                    TimestampNanosecondArray::from_iter_values(rows.iter().map(|r| r.1))
                        .with_timezone("UTC"),
                ),
                Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.0))),
                Arc::new(Float64Array::from_iter(rows.iter().map(|r| r.2))),
                Arc::new(Int64Array::from_iter(rows.iter().map(|r| r.3))),
            ],
        )
        .unwrap()
    }

    /// (device, last time, rows) of every series, by device.
    fn summary(t: &SeriesTable) -> Vec<(String, i64, u64)> {
        let r = t.rows(&schema()).unwrap();
        let devices = r.latest.column(1).as_string::<i32>();
        let times = r.latest.column(0).as_primitive::<TimestampNanosecondType>();
        let mut out: Vec<_> = (0..r.latest.num_rows())
            .map(|i| (devices.value(i).to_string(), times.value(i), r.rows[i]))
            .collect();
        out.sort();
        out
    }

    #[test]
    fn built_rows_are_reused_until_the_series_change() {
        let mut t = SeriesTable::default();
        t.apply(&batch(&[("a", 20, Some(1.0), None)])).unwrap();
        let first = t.rows(&schema()).unwrap();
        let again = t.rows(&schema()).unwrap();
        assert_eq!(first.latest, again.latest);
        assert_eq!(first.latest.num_rows(), 1);
        // Every change builds them again: a write, a merge, a correction.
        t.apply(&batch(&[("b", 30, Some(2.0), None)])).unwrap();
        assert_eq!(t.rows(&schema()).unwrap().latest.num_rows(), 2);
        let mut newer = SeriesTable::default();
        newer.apply(&batch(&[("c", 40, Some(3.0), None)])).unwrap();
        t.absorb(&newer);
        assert_eq!(t.rows(&schema()).unwrap().latest.num_rows(), 3);
        // A correction: a's newest row went, b went altogether.
        let mut fix = SeriesTable::default();
        fix.apply(&batch(&[("a", 10, Some(1.5), None), ("b", 0, None, None)]))
            .unwrap();
        fix.take_counts(&t, 1);
        fix.replaces = true;
        t.replace_from(&fix);
        assert_eq!(summary(&t), vec![("a".into(), 10, 1), ("c".into(), 40, 1)]);
        // A schema with another column is built for that schema.
        let mut wider = schema();
        wider
            .add_column("extra", ColumnKind::Field(FieldType::Float))
            .unwrap();
        assert_eq!(
            t.rows(&wider).unwrap().latest.num_columns(),
            wider.columns().len()
        );
    }

    #[test]
    fn a_correction_replaces_entries_and_removes_emptied_series() {
        let mut t = SeriesTable::default();
        t.apply(&batch(&[
            ("a", 20, Some(1.0), None),
            ("b", 30, Some(2.0), None),
            ("c", 40, Some(3.0), None),
            ("a", 10, Some(1.5), None),
        ]))
        .unwrap();
        // a's newest row went (its newest left is at 10); b went altogether.
        let mut fix = SeriesTable::default();
        fix.apply(&batch(&[("a", 10, Some(1.5), None)])).unwrap();
        fix.apply(&batch(&[("b", 0, None, None)])).unwrap();
        fix.take_counts(&t, 1);
        fix.replaces = true;
        let stored = SeriesTable::decode(&fix.encode(&schema()).unwrap()).unwrap();
        assert!(stored.replaces);
        for fix in [fix, stored] {
            let mut after = t.clone();
            after.replace_from(&fix);
            assert_eq!(
                summary(&after),
                vec![("a".into(), 10, 2), ("c".into(), 40, 1)]
            );
            // The moved series is still found by its key.
            after.apply(&batch(&[("c", 50, None, None)])).unwrap();
            assert_eq!(summary(&after)[1], ("c".into(), 50, 2));
        }
    }

    #[test]
    fn latest_row_follows_the_write_rule_and_survives_encoding() {
        let mut t = SeriesTable::default();
        t.apply(&batch(&[
            ("a", 20, Some(1.0), Some(90)),
            ("b", 10, Some(2.0), None),
            ("a", 10, Some(9.0), Some(99)),
        ]))
        .unwrap();
        // Same time merges field by field; an earlier time changes only the span.
        t.apply(&batch(&[
            ("a", 20, None, Some(80)),
            ("b", 5, Some(7.0), Some(1)),
        ]))
        .unwrap();
        // A later time replaces the row: its missing fields are null.
        t.apply(&batch(&[("b", 30, None, Some(50))])).unwrap();
        for t in [
            t.clone(),
            SeriesTable::decode(&t.encode(&schema()).unwrap()).unwrap(),
        ] {
            let r = t.rows(&schema()).unwrap();
            let devices = r.latest.column(1).as_string::<i32>();
            let times = r.latest.column(0).as_primitive::<TimestampNanosecondType>();
            let tilt = r
                .latest
                .column(2)
                .as_primitive::<datafusion::arrow::datatypes::Float64Type>();
            let battery = r
                .latest
                .column(3)
                .as_primitive::<datafusion::arrow::datatypes::Int64Type>();
            assert_eq!(devices.value(0), "a");
            assert_eq!(
                (times.value(0), tilt.value(0), battery.value(0)),
                (20, 1.0, 80)
            );
            assert_eq!((r.first_time[0], r.rows[0]), (10, 3));
            assert_eq!(devices.value(1), "b");
            assert_eq!(
                (times.value(1), tilt.is_null(1), battery.value(1)),
                (30, true, 50)
            );
            assert_eq!((r.first_time[1], r.rows[1]), (5, 3));
        }
    }

    /// The registry as rows, for comparing two registries.
    fn dump(t: &SeriesTable) -> Vec<String> {
        let r = t.rows(&schema()).unwrap();
        let text = datafusion::arrow::util::pretty::pretty_format_batches(&[r.latest])
            .unwrap()
            .to_string();
        let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
        lines.push(format!("{:?} {:?}", r.first_time, r.rows));
        lines
    }

    #[test]
    fn deltas_folded_in_order_equal_the_registry_of_every_write() {
        let writes = [
            batch(&[("a", 20, Some(1.0), Some(90)), ("b", 10, Some(2.0), None)]),
            batch(&[("a", 20, None, Some(80)), ("b", 5, Some(7.0), Some(1))]),
            batch(&[("c", 1, Some(3.0), None), ("a", 10, Some(9.0), Some(99))]),
            batch(&[("b", 30, None, Some(50)), ("a", 20, Some(4.0), None)]),
        ];
        let mut whole = SeriesTable::default();
        for w in &writes {
            whole.apply(w).unwrap();
        }
        // One delta per "flush" of one or two writes, each through its file.
        let mut folded = SeriesTable::default();
        for flush in writes.chunks(2) {
            let mut delta = SeriesTable::default();
            for w in flush {
                delta.apply(w).unwrap();
            }
            let delta = SeriesTable::decode(&delta.encode(&schema()).unwrap()).unwrap();
            folded.absorb(&delta);
        }
        assert_eq!(dump(&folded), dump(&whole));
    }

    #[test]
    fn keys_tell_tag_sets_apart() {
        let mut a = String::new();
        let mut b = String::new();
        SeriesTable::key(&mut a, &[Some("x,y"), None]);
        SeriesTable::key(&mut b, &[Some("x"), Some("y")]);
        assert_ne!(a, b);
        SeriesTable::key(&mut b, &[Some("x,y")]);
        assert_eq!(a, b);
    }

    proptest::proptest! {
        /// A row's values find the key they encode to: same hash, equivalent, and
        /// no other key is equivalent to them, for values holding the encoding's
        /// own characters and tag sets with nulls and trailing nulls.
        #[test]
        fn values_hash_and_compare_as_their_encoded_key(
            sets in proptest::collection::vec(
                proptest::collection::vec(
                    proptest::option::of(proptest::sample::select(vec![
                        "", "-", ":", "1:", "12", "1:a", "mh-00001", "金水区", "x-1:2",
                    ])),
                    0..4,
                ),
                1..12,
            )
        ) {
            use hashbrown::Equivalent;
            use std::hash::BuildHasher;
            let hasher = hashbrown::DefaultHashBuilder::default();
            let keys: Vec<SeriesKey> = sets
                .iter()
                .map(|values| {
                    let mut key = String::new();
                    SeriesTable::key(&mut key, values);
                    SeriesKey(key.into())
                })
                .collect();
            for (values, key) in sets.iter().zip(&keys) {
                let row = Values::of(values);
                proptest::prop_assert_eq!(hasher.hash_one(&row), hasher.hash_one(key));
                proptest::prop_assert_eq!(hasher.hash_one(Encoded(&key.0)), hasher.hash_one(key));
                for other in &keys {
                    proptest::prop_assert_eq!(row.equivalent(other), key == other);
                    proptest::prop_assert_eq!(Encoded(&key.0).equivalent(other), key == other);
                }
            }
        }
    }
}
