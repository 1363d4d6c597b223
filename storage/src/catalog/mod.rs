//! The catalog: databases, tables, schemas, segments, the tag bitmaps, and what
//! waits to be deleted — kept as a log of small changes.
//!
//! 1. `record.rs` — every change (a flush, a compaction, a schema change, a
//!    writer taking over the store) is one [`Record`] of [`Op`]s, numbered, naming
//!    the writer and its fencing epoch. [`Catalog::apply`] folds a record into the
//!    state; applying the same records in order always gives the same state.
//! 2. `log.rs` — records are objects `catalog/log/<seq>.json`, each created
//!    create-only, so of two processes appending the same number exactly one wins;
//!    the other catches up and tries the next number, or stops if it was fenced.
//!    A checkpoint (`catalog/checkpoint/<seq>.json.zst`) holds the state as of a record;
//!    opening reads the newest checkpoint and the records after it, so a commit and
//!    a restart cost what changed since, never the store's whole history.
//! 3. This file — the state. It is shared copy-on-write: tables and days are
//!    `Arc`s, so a new version after a flush copies only the days the flush touched,
//!    and readers keep the `Arc<Catalog>` they started with.
//!
//! Segments are kept per table and UTC day, each day with its own tag value ->
//! segment bitmaps: a query's time range picks days, its tag filters segments.

mod log;
mod record;

use std::collections::BTreeMap;
use std::sync::Arc;

use base64::Engine as _;
use roaring::RoaringBitmap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub use self::log::{CatalogLog, Checkpoint, LEGACY_PREFIX};
pub use self::record::{Op, Record, WriterId};
use crate::schema::TableSchema;

/// Nanoseconds in a UTC day, the time partition of a segment.
pub const DAY_NANOS: i64 = 86_400_000_000_000;

/// The UTC day (days since 1970-01-01) holding a timestamp.
pub fn day_of(time_ns: i64) -> i64 {
    time_ns.div_euclid(DAY_NANOS)
}

/// The catalog as of one record.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Catalog {
    /// The last record folded in; 0 before anything was committed.
    pub seq: u64,
    /// Next database id to hand out.
    pub next_db_id: u32,
    /// Next table id to hand out.
    pub next_table_id: u32,
    /// Next segment id to hand out.
    pub next_segment_id: u32,
    /// The writer that holds the store: the newest epoch claimed.
    #[serde(default)]
    pub writer: Option<WriterId>,
    /// Per writing node (data directory), the newest WAL file whose rows are all
    /// in segments: on a restart, that node's older WAL files are not replayed.
    #[serde(default)]
    pub wal_persisted: BTreeMap<String, u64>,
    /// Objects no version from `garbage[i].since` on refers to; deleted once no
    /// reader holds an older version.
    #[serde(default)]
    pub garbage: Vec<Garbage>,
    /// Databases by name.
    pub databases: BTreeMap<String, Arc<DatabaseCatalog>>,
}

/// An object that is no longer part of the catalog.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Garbage {
    /// The record that stopped referring to it.
    pub since: u64,
    /// Its key.
    pub path: String,
}

/// A database in the catalog.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DatabaseCatalog {
    /// Id used in object keys.
    pub id: u32,
    /// How long its tables' rows are kept, nanoseconds (`None`: forever), unless a
    /// table says otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<i64>,
    /// Tables by name.
    pub tables: BTreeMap<String, Arc<TableCatalog>>,
    /// Rollups by name (each also a table of `tables`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub rollups: BTreeMap<String, crate::rollup::RollupCatalog>,
}

/// A table in the catalog.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TableCatalog {
    /// Id used in object keys.
    pub id: u32,
    /// The schema as of this version.
    pub schema: TableSchema,
    /// How long its rows are kept, nanoseconds; `None`: as its database says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<i64>,
    /// Segments by UTC day.
    pub days: BTreeMap<i64, Arc<DayCatalog>>,
    /// The objects holding the series registry (`series.rs`) of the rows this
    /// version holds: a full registry and the changes since, in order.
    #[serde(default)]
    pub series: SeriesFiles,
    /// Deletes its rollups have not caught up with (kept only while it has any).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deletes: Vec<crate::rollup::Changed>,
}

/// The series registry of a table, as stored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeriesFiles {
    /// A whole registry, if one was written.
    pub full: Option<String>,
    /// Registries of the series each later flush touched, oldest first.
    pub deltas: Vec<String>,
}

impl SeriesFiles {
    /// Every object, the full one first.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.full
            .iter()
            .chain(self.deltas.iter())
            .map(String::as_str)
    }
}

/// One table's segments of one UTC day.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DayCatalog {
    /// Segments by id.
    pub segments: BTreeMap<u32, SegmentMeta>,
    /// Tag column -> tag value -> ids of the day's segments holding it.
    pub tags: BTreeMap<String, BTreeMap<String, Bitmap>>,
}

/// What the catalog knows of one segment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentMeta {
    /// Segment id.
    pub id: u32,
    /// The UTC day it covers.
    pub day: i64,
    /// Key of the Parquet file.
    pub path: String,
    /// Key of the tag index.
    pub index_path: String,
    /// Size of the Parquet file in bytes.
    pub size: u64,
    /// Rows in the segment.
    pub rows: u64,
    /// Earliest timestamp, nanoseconds.
    pub min_time: i64,
    /// Latest timestamp, nanoseconds.
    pub max_time: i64,
    /// Rows per row group.
    pub row_group_rows: Vec<u64>,
    /// How recent its rows are: the record that wrote them (for a compacted
    /// segment, the newest of its inputs'). Where two segments hold the same
    /// (series, time), the higher `seq` wins.
    #[serde(default)]
    pub seq: u64,
    /// The record that created it. Segments of one run (one flush, or one
    /// compaction's outputs) never hold the same (series, time).
    #[serde(default)]
    pub run: u64,
    /// 0 for a flush's segment; compactions raise it.
    #[serde(default)]
    pub level: u32,
    /// When it was written, Unix nanoseconds: how long its day has been quiet.
    #[serde(default)]
    pub created: i64,
    /// Its rows that were deleted (positions in the file, from 0): readers skip
    /// them, compaction leaves them out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deleted: Option<Bitmap>,
}

impl SegmentMeta {
    /// True when the segment may hold rows in `[lo, hi]`.
    pub fn overlaps(&self, lo: i64, hi: i64) -> bool {
        self.min_time <= hi && lo <= self.max_time
    }

    /// The objects it consists of.
    pub fn files(&self) -> [&str; 2] {
        [self.path.as_str(), self.index_path.as_str()]
    }

    /// Positions of its rows that were deleted, if any were.
    pub fn deleted_rows(&self) -> Option<&RoaringBitmap> {
        self.deleted
            .as_ref()
            .map(|b| &b.0)
            .filter(|b| !b.is_empty())
    }

    /// Every row position of the segment.
    pub fn all_rows(&self) -> RoaringBitmap {
        let mut all = RoaringBitmap::new();
        all.insert_range(0..self.rows as u32);
        all
    }

    /// Of `rows` (`None`: all of them), those not deleted; `None` still means all.
    pub fn kept(&self, rows: Option<RoaringBitmap>) -> Option<RoaringBitmap> {
        match self.deleted_rows() {
            Some(d) => Some(rows.unwrap_or_else(|| self.all_rows()) - d),
            None => rows,
        }
    }
}

impl DayCatalog {
    /// Adds a segment and its tag values.
    pub fn add_segment(&mut self, meta: SegmentMeta, tags: &BTreeMap<String, Vec<String>>) {
        for (column, values) in tags {
            let col = self.tags.entry(column.clone()).or_default();
            for v in values {
                col.entry(v.clone()).or_default().0.insert(meta.id);
            }
        }
        self.segments.insert(meta.id, meta);
    }

    /// Removes a segment and its id from the tag bitmaps.
    pub fn remove_segment(&mut self, id: u32) -> Option<SegmentMeta> {
        let meta = self.segments.remove(&id)?;
        for col in self.tags.values_mut() {
            col.retain(|_, b| {
                b.0.remove(id);
                !b.0.is_empty()
            });
        }
        self.tags.retain(|_, col| !col.is_empty());
        Some(meta)
    }

    /// Ids of the day's segments holding any of `values` in tag `column`.
    pub fn holding(&self, column: &str, values: &[String]) -> RoaringBitmap {
        let mut out = RoaringBitmap::new();
        if let Some(col) = self.tags.get(column) {
            for v in values {
                if let Some(b) = col.get(v) {
                    out |= &b.0;
                }
            }
        }
        out
    }
}

impl TableCatalog {
    /// Every segment, by day then id.
    pub fn segments(&self) -> impl Iterator<Item = &SegmentMeta> {
        self.days.values().flat_map(|d| d.segments.values())
    }

    /// The days that may hold rows in `[lo, hi]`, oldest first.
    pub fn days_between(&self, lo: i64, hi: i64) -> impl Iterator<Item = (&i64, &Arc<DayCatalog>)> {
        let (a, b) = (day_of(lo), day_of(hi));
        let range = if a <= b { a..=b } else { b..=a };
        self.days.range(range)
    }

    /// Segments in all.
    pub fn segment_count(&self) -> usize {
        self.days.values().map(|d| d.segments.len()).sum()
    }

    /// The segment with `id`, if it is part of this version.
    pub fn segment(&self, day: i64, id: u32) -> Option<&SegmentMeta> {
        self.days.get(&day)?.segments.get(&id)
    }
}

impl Catalog {
    /// The table, if it exists.
    pub fn table(&self, db: &str, table: &str) -> Option<&Arc<TableCatalog>> {
        self.databases.get(db)?.tables.get(table)
    }

    /// How long `db.table`'s rows are kept, nanoseconds: the table's setting, else
    /// its database's; `None` keeps them forever.
    pub fn retention(&self, db: &str, table: &str) -> Option<i64> {
        let d = self.databases.get(db)?;
        d.tables
            .get(table)
            .and_then(|t| t.retention)
            .or(d.retention)
    }

    /// Every table, as (database, table name, table).
    pub fn tables(&self) -> impl Iterator<Item = (&str, &str, &Arc<TableCatalog>)> {
        self.databases.iter().flat_map(|(db, d)| {
            d.tables
                .iter()
                .map(move |(t, tc)| (db.as_str(), t.as_str(), tc))
        })
    }

    /// Every object this version refers to: segments, their indexes, series files.
    pub fn live_objects(&self) -> impl Iterator<Item = &str> {
        self.tables().flat_map(|(_, _, t)| {
            t.segments()
                .flat_map(|s| s.files())
                .chain(t.series.keys())
                .collect::<Vec<_>>()
        })
    }
}

/// A roaring bitmap stored in JSON as a list of ids when it holds few (most tag
/// values of a compacted day are in one or two segments), else as base64 of
/// roaring's portable serialization. Both forms are read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Bitmap(pub RoaringBitmap);

/// Bitmaps of up to this many ids are written as a list.
const LISTED_IDS: u64 = 16;

impl Serialize for Bitmap {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        if self.0.len() <= LISTED_IDS {
            return s.collect_seq(self.0.iter());
        }
        let mut bytes = Vec::with_capacity(self.0.serialized_size());
        self.0
            .serialize_into(&mut bytes)
            .map_err(serde::ser::Error::custom)?;
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes))
    }
}

impl<'de> Deserialize<'de> for Bitmap {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Bitmap;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a list of segment ids or a base64 roaring bitmap")
            }

            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Bitmap, E> {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(text)
                    .map_err(E::custom)?;
                RoaringBitmap::deserialize_from(&bytes[..])
                    .map(Bitmap)
                    .map_err(E::custom)
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Bitmap, A::Error> {
                let mut b = RoaringBitmap::new();
                while let Some(id) = seq.next_element::<u32>()? {
                    b.insert(id);
                }
                Ok(Bitmap(b))
            }
        }
        d.deserialize_any(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmaps_round_trip_in_both_forms() {
        for ids in [
            vec![],
            vec![7],
            (0..17).collect::<Vec<u32>>(),
            (0..1000).step_by(3).collect(),
        ] {
            let b = Bitmap(ids.iter().copied().collect());
            let json = serde_json::to_string(&b).unwrap();
            assert_eq!(
                json.starts_with('['),
                ids.len() <= LISTED_IDS as usize,
                "{json}"
            );
            let back: Bitmap = serde_json::from_str(&json).unwrap();
            assert_eq!(back, b);
        }
    }
}
