//! The `system` schema: live state of the database as tables, built from memory
//! when a query names them (no segment is read).
//!
//! - `system.tables`: one row per table, with its columns, series, segments and
//!   buffered rows.
//! - `system.segments`: one row per persisted segment.
//! - `system.devices`: one row per table and device (the `device` tag), from the
//!   series registry, so "devices silent for 10 minutes" is a cheap query.
//! - `system.rules`, `system.alerts`, `system.alert_events`: the alert engine's
//!   rules, active instances and state changes, from [`AlertSource`].

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use citytsdb_storage::series::SeriesRows;
use citytsdb_storage::units::format_duration;
use citytsdb_storage::{ColumnKind, DbSnapshot, Engine, TableSchema};
use datafusion::arrow::array::{
    Array, ArrayData, ArrayRef, AsArray, Date32Array, RecordBatch, StringArray, StringBuilder,
    TimestampNanosecondArray, UInt64Array,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::catalog::{MemTable, SchemaProvider, TableProvider};
use datafusion::common::Result;

use crate::exec::external;
use crate::latest::leading_16;

/// Name of the schema holding the system tables.
pub const SYSTEM_SCHEMA: &str = "system";

/// Names of the system tables.
pub const SYSTEM_TABLES: [&str; 6] = [
    "tables",
    "segments",
    "devices",
    "rules",
    "alerts",
    "alert_events",
];

/// Where `system.rules`, `system.alerts` and `system.alert_events` come from: the
/// alert engine, as batches in the schemas of [`rules_schema`], [`alerts_schema`]
/// and [`alert_events_schema`].
pub trait AlertSource: Send + Sync + fmt::Debug {
    /// The database's rules.
    fn rules(&self, db: &str) -> Result<RecordBatch>;
    /// The database's active alert instances.
    fn alerts(&self, db: &str) -> Result<RecordBatch>;
    /// The database's alert state changes, oldest first.
    fn alert_events(&self, db: &str) -> Result<RecordBatch>;
}

fn time_type() -> DataType {
    DataType::Timestamp(TimeUnit::Nanosecond, Some("UTC".into()))
}

fn utf8(name: &str) -> Field {
    Field::new(name, DataType::Utf8, true)
}

fn time(name: &str) -> Field {
    Field::new(name, time_type(), true)
}

fn count(name: &str) -> Field {
    Field::new(name, DataType::UInt64, false)
}

/// Columns of `system.rules`.
pub fn rules_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        utf8("id"),
        utf8("name"),
        utf8("department"),
        utf8("db"),
        utf8("sql"),
        utf8("every"),
        utf8("for"),
        utf8("keep_firing_for"),
        utf8("severity"),
        utf8("labels"),
        utf8("annotations"),
        utf8("webhook"),
    ]))
}

/// Columns of `system.alerts`.
pub fn alerts_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        utf8("rule_id"),
        utf8("rule_name"),
        utf8("department"),
        utf8("fingerprint"),
        utf8("state"),
        utf8("labels"),
        utf8("annotations"),
        time("active_at"),
        time("fired_at"),
    ]))
}

/// Columns of `system.alert_events`.
pub fn alert_events_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        time("time"),
        utf8("rule_id"),
        utf8("rule_name"),
        utf8("department"),
        utf8("fingerprint"),
        utf8("from_state"),
        utf8("to_state"),
        utf8("labels"),
    ]))
}

fn tables_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        utf8("table_name"),
        count("columns"),
        utf8("tags"),
        utf8("fields"),
        count("series"),
        count("segments"),
        count("segment_rows"),
        count("segment_bytes"),
        count("buffered_rows"),
        time("min_time"),
        time("max_time"),
        utf8("retention"),
    ]))
}

fn segments_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        utf8("table_name"),
        count("segment_id"),
        Field::new("day", DataType::Date32, false),
        utf8("path"),
        count("rows"),
        count("bytes"),
        time("min_time"),
        time("max_time"),
    ]))
}

fn devices_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        utf8("table_name"),
        utf8("device"),
        utf8("district"),
        time("first_time"),
        time("last_time"),
        count("rows"),
        utf8("tags"),
    ]))
}

/// The `system` schema of one database.
pub struct SystemSchema {
    storage: Engine,
    snapshot: Arc<DbSnapshot>,
    alerts: Option<Arc<dyn AlertSource>>,
    devices: Arc<DevicesMemo>,
}

/// The `system.devices` rows last built for each database, with the series
/// registry arrays they were built from. The registry hands out the same arrays
/// until its series change (`SeriesTable::rows`), so between writes the rows are
/// built once, not per query (a sort of every series and a JSON object per
/// device); the arrays are compared by their buffers' addresses, which stay taken
/// while the memo holds them.
#[derive(Default)]
pub struct DevicesMemo(Mutex<HashMap<String, (Sources, RecordBatch)>>);

/// Each table's name and the registry arrays its devices come from.
type Sources = Vec<(String, Vec<ArrayData>)>;

impl DevicesMemo {
    /// Databases whose rows are kept; past this, one is dropped for a new one.
    const DATABASES: usize = 16;

    fn get(&self, db: &str, from: &Sources) -> Option<RecordBatch> {
        let memo = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let (seen, rows) = memo.get(db)?;
        let same = seen.len() == from.len()
            && seen.iter().zip(from).all(|((a, xs), (b, ys))| {
                a == b && xs.len() == ys.len() && xs.iter().zip(ys).all(|(x, y)| x.ptr_eq(y))
            });
        same.then(|| rows.clone())
    }

    fn set(&self, db: &str, from: Sources, rows: &RecordBatch) {
        let mut memo = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if memo.len() >= Self::DATABASES && !memo.contains_key(db) {
            if let Some(other) = memo.keys().next().cloned() {
                memo.remove(&other);
            }
        }
        memo.insert(db.to_string(), (from, rows.clone()));
    }
}

impl fmt::Debug for DevicesMemo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DevicesMemo")
    }
}

impl fmt::Debug for SystemSchema {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SystemSchema")
            .field("db", &self.snapshot.name)
            .finish()
    }
}

impl SystemSchema {
    /// The system tables of `snapshot`'s database; without `alerts`, the alert
    /// tables are empty.
    pub fn new(
        storage: Engine,
        snapshot: Arc<DbSnapshot>,
        alerts: Option<Arc<dyn AlertSource>>,
    ) -> Self {
        Self {
            storage,
            snapshot,
            alerts,
            devices: Default::default(),
        }
    }

    /// Keeps `system.devices` in `memo`, which outlives this schema.
    pub fn with_devices_memo(mut self, memo: Arc<DevicesMemo>) -> Self {
        self.devices = memo;
        self
    }

    fn tables(&self) -> Result<RecordBatch> {
        let mut cols: (Vec<String>, Vec<u64>, Vec<String>, Vec<String>) = Default::default();
        let mut nums: [Vec<u64>; 5] = Default::default();
        let mut times: (Vec<Option<i64>>, Vec<Option<i64>>) = Default::default();
        let mut retention: Vec<Option<String>> = Vec::new();
        for (name, schema) in &self.snapshot.schemas {
            retention.push(
                self.snapshot
                    .catalog
                    .retention(&self.snapshot.name, name)
                    .map(|r| format_duration(Duration::from_nanos(r.max(0) as u64))),
            );
            let catalog = self.snapshot.table_catalog(name);
            let (buffered, range) = self.snapshot.buffered(name);
            let series = match self.storage.series_rows(&self.snapshot.name, name) {
                Some(r) => r.map_err(external)?.rows.len() as u64,
                None => 0,
            };
            let of_kind = |tag: bool| {
                schema
                    .columns()
                    .iter()
                    .filter(|c| match c.kind {
                        ColumnKind::Tag => tag,
                        ColumnKind::Field(_) => !tag,
                        ColumnKind::Time => false,
                    })
                    .map(|c| c.name.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            };
            cols.0.push(name.clone());
            cols.1.push(schema.columns().len() as u64);
            cols.2.push(of_kind(true));
            cols.3.push(of_kind(false));
            let segments = catalog.map(|c| c.segments().collect::<Vec<_>>());
            let segments = segments.unwrap_or_default();
            nums[0].push(series);
            nums[1].push(segments.len() as u64);
            nums[2].push(segments.iter().map(|s| s.rows).sum());
            nums[3].push(segments.iter().map(|s| s.size).sum());
            nums[4].push(buffered.iter().map(|b| b.num_rows() as u64).sum());
            let lo = segments
                .iter()
                .map(|s| s.min_time)
                .chain(range.map(|r| r.0));
            let hi = segments
                .iter()
                .map(|s| s.max_time)
                .chain(range.map(|r| r.1));
            // Rows past retention are gone for readers, wherever they still lie.
            let cut = self.snapshot.cutoff(name).unwrap_or(i64::MIN);
            let hi = hi.max().filter(|&t| t >= cut);
            times
                .0
                .push(lo.min().filter(|_| hi.is_some()).map(|t| t.max(cut)));
            times.1.push(hi);
        }
        let [series, segments, rows, bytes, buffered] = nums;
        batch(
            tables_schema(),
            vec![
                Arc::new(StringArray::from(cols.0)),
                Arc::new(UInt64Array::from(cols.1)),
                Arc::new(StringArray::from(cols.2)),
                Arc::new(StringArray::from(cols.3)),
                Arc::new(UInt64Array::from(series)),
                Arc::new(UInt64Array::from(segments)),
                Arc::new(UInt64Array::from(rows)),
                Arc::new(UInt64Array::from(bytes)),
                Arc::new(UInt64Array::from(buffered)),
                timestamps(times.0),
                timestamps(times.1),
                Arc::new(StringArray::from(retention)),
            ],
        )
    }

    fn segments(&self) -> Result<RecordBatch> {
        let mut table = Vec::new();
        let mut id = Vec::new();
        let mut day = Vec::new();
        let mut path = Vec::new();
        let mut rows = Vec::new();
        let mut bytes = Vec::new();
        let mut lo = Vec::new();
        let mut hi = Vec::new();
        for name in self.snapshot.schemas.keys() {
            let Some(c) = self.snapshot.table_catalog(name) else {
                continue;
            };
            let mut segments: Vec<_> = c.segments().collect();
            segments.sort_by_key(|s| (s.day, s.id));
            for s in segments {
                table.push(name.clone());
                id.push(u64::from(s.id));
                day.push(i32::try_from(s.day).unwrap_or(i32::MAX));
                path.push(s.path.clone());
                rows.push(s.rows);
                bytes.push(s.size);
                lo.push(Some(s.min_time));
                hi.push(Some(s.max_time));
            }
        }
        batch(
            segments_schema(),
            vec![
                Arc::new(StringArray::from(table)),
                Arc::new(UInt64Array::from(id)),
                Arc::new(Date32Array::from(day)),
                Arc::new(StringArray::from(path)),
                Arc::new(UInt64Array::from(rows)),
                Arc::new(UInt64Array::from(bytes)),
                timestamps(lo),
                timestamps(hi),
            ],
        )
    }

    fn devices(&self) -> Result<RecordBatch> {
        let mut tables = Vec::new();
        for (name, schema) in &self.snapshot.schemas {
            if schema.kind("device") != Some(ColumnKind::Tag) {
                continue;
            }
            if let Some(rows) = self.storage.series_rows(&self.snapshot.name, name) {
                tables.push((name, schema, rows.map_err(external)?));
            }
        }
        let from: Sources = tables
            .iter()
            .map(|(name, _, rows)| {
                let arrays = rows.latest.columns().iter().map(|c| c.to_data());
                (name.to_string(), arrays.collect())
            })
            .collect();
        if let Some(rows) = self.devices.get(&self.snapshot.name, &from) {
            return Ok(rows);
        }
        let rows = self.build_devices(&tables)?;
        self.devices.set(&self.snapshot.name, from, &rows);
        Ok(rows)
    }

    fn build_devices(
        &self,
        tables: &[(&String, &Arc<TableSchema>, SeriesRows)],
    ) -> Result<RecordBatch> {
        let mut out = DeviceColumns::default();
        let mut json = Vec::new();
        for (name, schema, rows) in tables {
            let name = name.as_str();
            let latest = &rows.latest;
            let times = latest
                .column_by_name(citytsdb_storage::schema::TIME_COLUMN)
                .map(|c| c.as_primitive::<datafusion::arrow::datatypes::TimestampNanosecondType>())
                .ok_or_else(|| {
                    external(citytsdb_storage::StorageError::Internal("no time".into()))
                })?;
            let tags: Vec<(&str, &StringArray)> = schema
                .tag_names()
                .filter_map(|t| Some((t, latest.column_by_name(t)?.as_string::<i32>())))
                .collect();
            let device_col = tags
                .iter()
                .find(|(t, _)| *t == "device")
                .map(|(_, a)| *a)
                .ok_or_else(|| {
                    external(citytsdb_storage::StorageError::Internal("no device".into()))
                })?;
            // The tags as a JSON object, keys in order as serde_json's map has them.
            let mut tag_order = tags.clone();
            tag_order.sort_by_key(|(t, _)| *t);
            let district = tags.iter().find(|(t, _)| *t == "district").map(|(_, a)| *a);
            // Each device's series side by side (devices in order, each one's
            // series in registry order), merged: span and count over all of them,
            // tags and district from the one that reported last.
            let mut order: Vec<(u128, usize)> = (0..latest.num_rows())
                .filter(|&i| device_col.is_valid(i))
                .map(|i| (leading_16(device_col.value(i).as_bytes()), i))
                .collect();
            order.sort_unstable_by(|a, b| {
                a.0.cmp(&b.0)
                    .then_with(|| device_col.value(a.1).cmp(device_col.value(b.1)))
                    .then(a.1.cmp(&b.1))
            });
            let mut start = 0;
            while start < order.len() {
                let device = device_col.value(order[start].1);
                let (mut first, mut last, mut count, mut pick) = (i64::MAX, i64::MIN, 0, 0);
                let mut end = start;
                while end < order.len() && device_col.value(order[end].1) == device {
                    let i = order[end].1;
                    first = first.min(rows.first_time[i]);
                    // Ties go to the later series, as registry order has them.
                    if times.value(i) >= last {
                        last = times.value(i);
                        pick = i;
                    }
                    count += rows.rows[i];
                    end += 1;
                }
                start = end;
                json.clear();
                json.push(b'{');
                for (t, a) in tag_order.iter().filter(|(_, a)| a.is_valid(pick)) {
                    if json.len() > 1 {
                        json.push(b',');
                    }
                    // Writing a &str into a Vec cannot fail.
                    let _ = serde_json::to_writer(&mut json, t);
                    json.push(b':');
                    let _ = serde_json::to_writer(&mut json, a.value(pick));
                }
                json.push(b'}');
                out.table.append_value(name);
                out.device.append_value(device);
                out.district
                    .append_option(district.and_then(|a| a.is_valid(pick).then(|| a.value(pick))));
                out.first.push(first);
                out.last.push(last);
                out.rows.push(count);
                out.tags.append_value(
                    // serde_json writes UTF-8.
                    String::from_utf8_lossy(&json),
                );
            }
        }
        let mut out = out;
        let stamps = |t: Vec<i64>| -> ArrayRef {
            Arc::new(TimestampNanosecondArray::from(t).with_timezone("UTC"))
        };
        batch(
            devices_schema(),
            vec![
                Arc::new(out.table.finish()),
                Arc::new(out.device.finish()),
                Arc::new(out.district.finish()),
                stamps(out.first),
                stamps(out.last),
                Arc::new(UInt64Array::from(out.rows)),
                Arc::new(out.tags.finish()),
            ],
        )
    }
}

#[derive(Default)]
struct DeviceColumns {
    table: StringBuilder,
    device: StringBuilder,
    district: StringBuilder,
    first: Vec<i64>,
    last: Vec<i64>,
    rows: Vec<u64>,
    tags: StringBuilder,
}

fn timestamps(values: Vec<Option<i64>>) -> ArrayRef {
    Arc::new(TimestampNanosecondArray::from(values).with_timezone("UTC"))
}

fn batch(schema: SchemaRef, columns: Vec<ArrayRef>) -> Result<RecordBatch> {
    Ok(RecordBatch::try_new(schema, columns)?)
}

fn table(batch: RecordBatch) -> Result<Arc<dyn TableProvider>> {
    Ok(Arc::new(MemTable::try_new(
        batch.schema(),
        vec![vec![batch]],
    )?))
}

#[async_trait]
impl SchemaProvider for SystemSchema {
    fn table_names(&self) -> Vec<String> {
        SYSTEM_TABLES.iter().map(|t| t.to_string()).collect()
    }

    async fn table(&self, name: &str) -> Result<Option<Arc<dyn TableProvider>>> {
        let db = &self.snapshot.name;
        let empty = |schema: SchemaRef| RecordBatch::new_empty(schema);
        let batch = match name {
            "tables" => self.tables()?,
            "segments" => self.segments()?,
            "devices" => self.devices()?,
            "rules" => match &self.alerts {
                Some(a) => a.rules(db)?,
                None => empty(rules_schema()),
            },
            "alerts" => match &self.alerts {
                Some(a) => a.alerts(db)?,
                None => empty(alerts_schema()),
            },
            "alert_events" => match &self.alerts {
                Some(a) => a.alert_events(db)?,
                None => empty(alert_events_schema()),
            },
            _ => return Ok(None),
        };
        table(batch).map(Some)
    }

    fn table_exist(&self, name: &str) -> bool {
        SYSTEM_TABLES.contains(&name)
    }
}
