//! Rollups (continuous aggregates): a table of per-bucket aggregates of another
//! table, kept by the store.
//!
//! A rollup is a definition ([`RollupDef`]) and a table of its own, named after it,
//! holding the *materialised* buckets: `time` (the bucket's start), the source's
//! tags, and one column per aggregate. What the materialised rows may lag behind
//! is told by the catalog alone, so nothing of it is lost in a crash:
//!
//! - `as_of`: the catalog record the materialised rows were computed from. Rows
//!   written since are in segments with a higher `seq` (a compaction keeps its
//!   newest input's `seq`, so merging changes nothing here), and deletes since are
//!   listed in the source table's `deletes` with their record and time range;
//! - `pending`: ranges known to be stale at `as_of` and not yet recomputed.
//!
//! Those, plus the time ranges of the source's buffered rows, are the rollup's
//! *dirty* ranges ([`DbSnapshot::rollup_dirty`]), aligned to whole buckets. A
//! reader takes the materialised rows outside them and computes the buckets inside
//! them from the raw rows on the fly, so a rollup always answers what the same
//! `GROUP BY` over the retained raw rows answers. The refresher (in the query
//! crate, which can aggregate) recomputes dirty ranges oldest first, a bounded
//! chunk at a time, and commits its progress with [`Engine::rollup_progress`].
//!
//! Buckets older than the source's retention are never dirty: they keep the values
//! they had, which is what a rollup is for. The rollup table has a retention of its
//! own.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::catalog::{Catalog, DatabaseCatalog, Op};
use crate::engine::{write, DbSnapshot, Engine, Locked};
use crate::error::{Result, StorageError};
use crate::schema::{ColumnDef, ColumnKind, FieldType, TableSchema, TIME_COLUMN};

/// At most this many dirty ranges are told apart; beyond it the closest are joined
/// (a reader's filter stays small, at the price of computing a little more).
const MAX_DIRTY_RANGES: usize = 64;

/// An aggregate a rollup column holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Aggregate {
    /// Smallest value.
    Min,
    /// Largest value.
    Max,
    /// Mean of the values.
    Avg,
    /// Sum of the values.
    Sum,
    /// Number of non-NULL values.
    Count,
    /// The value at the earliest time.
    First,
    /// The value at the latest time.
    Last,
}

impl Aggregate {
    /// Every aggregate, in the order columns are laid out.
    pub const ALL: [Aggregate; 7] = [
        Self::Min,
        Self::Max,
        Self::Avg,
        Self::Sum,
        Self::Count,
        Self::First,
        Self::Last,
    ];

    /// Its SQL name, also the suffix of its column (`water_level_cm_avg`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Min => "min",
            Self::Max => "max",
            Self::Avg => "avg",
            Self::Sum => "sum",
            Self::Count => "count",
            Self::First => "first",
            Self::Last => "last",
        }
    }

    /// The aggregate named `name` (lowercase), if any.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.name() == name)
    }

    /// The type of this aggregate over a field of type `field`, or `None` when it
    /// does not apply (the mean of strings).
    pub fn result_type(self, field: FieldType) -> Option<FieldType> {
        use FieldType::*;
        match (self, field) {
            (Self::Count, _) => Some(Integer),
            (Self::First | Self::Last, t) => Some(t),
            (Self::Min | Self::Max, Boolean) => None,
            (Self::Min | Self::Max, t) => Some(t),
            (Self::Avg, Float | Integer | UInteger) => Some(Float),
            (Self::Sum, Float) => Some(Float),
            (Self::Sum, Integer) => Some(Integer),
            (Self::Sum, UInteger) => Some(UInteger),
            (Self::Avg | Self::Sum, Boolean | String) => None,
        }
    }
}

/// One column of a rollup: an aggregate of a source field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RollupColumn {
    /// The column's name (`<field>_<aggregate>`).
    pub name: String,
    /// The source field.
    pub field: String,
    /// The aggregate.
    pub aggregate: Aggregate,
    /// The column's type.
    pub kind: FieldType,
}

/// What a rollup computes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RollupDef {
    /// Its name, also its table's.
    pub name: String,
    /// The table it aggregates.
    pub source: String,
    /// Bucket width, nanoseconds; buckets start at multiples of it from the epoch.
    pub interval: i64,
    /// The source's tags it groups by (all of them when it was made).
    pub tags: Vec<String>,
    /// Its aggregate columns, in table order.
    pub columns: Vec<RollupColumn>,
}

impl RollupDef {
    /// Checks `aggregates` (field -> aggregates) against the source's schema and
    /// makes the definition; the error names the field or aggregate at fault.
    pub fn new(
        name: &str,
        source: &str,
        source_schema: &TableSchema,
        interval: Duration,
        aggregates: &[(String, Vec<String>)],
    ) -> std::result::Result<Self, String> {
        let interval = i64::try_from(interval.as_nanos()).unwrap_or(i64::MAX);
        if interval < 1_000_000_000 {
            return Err("interval: a rollup's buckets are at least 1s wide".into());
        }
        if interval > 366 * crate::catalog::DAY_NANOS {
            return Err("interval: a rollup's buckets are at most 366d wide".into());
        }
        if aggregates.is_empty() {
            return Err("aggregates: name at least one field and its aggregates".into());
        }
        let mut columns: Vec<RollupColumn> = Vec::new();
        for (field, names) in aggregates {
            let kind = match source_schema.kind(field) {
                Some(ColumnKind::Field(t)) => t,
                Some(other) => {
                    return Err(format!(
                        "aggregates.{field}: '{field}' is {} of '{source}', not a field",
                        other.describe()
                    ))
                }
                None => {
                    return Err(format!(
                        "aggregates.{field}: table '{source}' has no field '{field}'"
                    ))
                }
            };
            if names.is_empty() {
                return Err(format!("aggregates.{field}: name at least one aggregate"));
            }
            for a in names {
                let aggregate = Aggregate::parse(a).ok_or_else(|| {
                    format!(
                        "aggregates.{field}: unknown aggregate '{a}' (expected one of min, max, avg, sum, count, first, last)"
                    )
                })?;
                let result = aggregate.result_type(kind).ok_or_else(|| {
                    format!(
                        "aggregates.{field}: {a} does not apply to a {} field",
                        kind.name()
                    )
                })?;
                let column = format!("{field}_{a}");
                if columns.iter().any(|c| c.name == column) {
                    return Err(format!("aggregates.{field}: {a} is named twice"));
                }
                columns.push(RollupColumn {
                    name: column,
                    field: field.clone(),
                    aggregate,
                    kind: result,
                });
            }
        }
        let tags: Vec<String> = source_schema.tag_names().map(str::to_string).collect();
        if let Some(c) = columns.iter().find(|c| tags.contains(&c.name)) {
            return Err(format!(
                "aggregates.{}: column '{}' would be named like a tag of '{source}'",
                c.field, c.name
            ));
        }
        Ok(Self {
            name: name.to_string(),
            source: source.to_string(),
            interval,
            tags,
            columns,
        })
    }

    /// The rollup table's schema: `time`, the tags, the aggregate columns.
    pub fn schema(&self) -> TableSchema {
        let mut columns = vec![ColumnDef {
            name: TIME_COLUMN.to_string(),
            kind: ColumnKind::Time,
        }];
        columns.extend(self.tags.iter().map(|t| ColumnDef {
            name: t.clone(),
            kind: ColumnKind::Tag,
        }));
        columns.extend(self.columns.iter().map(|c| ColumnDef {
            name: c.name.clone(),
            kind: ColumnKind::Field(c.kind),
        }));
        TableSchema::from(columns)
    }

    /// The start of the bucket holding `time`.
    pub fn bucket(&self, time: i64) -> i64 {
        time - time.rem_euclid(self.interval)
    }

    /// The start of the first bucket starting at or after `time`.
    pub fn bucket_at_or_after(&self, time: i64) -> i64 {
        let b = self.bucket(time);
        if b == time {
            b
        } else {
            b.saturating_add(self.interval)
        }
    }
}

/// Whole buckets `[lo, hi)` whose materialised rows are stale.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dirty {
    /// Start of the first bucket.
    pub lo: i64,
    /// End of the last bucket (exclusive).
    pub hi: i64,
    /// Rows were deleted in it: materialised rows must be removed before the
    /// range is written again (a group may have vanished).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub clear: bool,
}

/// A rollup as the catalog keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RollupCatalog {
    /// What it computes.
    pub def: RollupDef,
    /// The record its materialised rows were computed from (0: none yet).
    pub as_of: u64,
    /// Ranges stale as of `as_of`, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending: Vec<Dirty>,
}

/// Rows deleted from a rollup's source: the record and the time range they lay in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Changed {
    /// The record that deleted them.
    pub seq: u64,
    /// Earliest time they may have had.
    pub min_time: i64,
    /// Latest time they may have had.
    pub max_time: i64,
}

impl DatabaseCatalog {
    /// Whether some rollup aggregates `table`.
    pub fn is_rollup_source(&self, table: &str) -> bool {
        self.rollups.values().any(|r| r.def.source == table)
    }

    /// The oldest `as_of` of the rollups of `table` (what their deletes are kept
    /// for), or `None` if it has none.
    pub(crate) fn oldest_as_of(&self, table: &str) -> Option<u64> {
        self.rollups
            .values()
            .filter(|r| r.def.source == table)
            .map(|r| r.as_of)
            .min()
    }
}

/// Joins `ranges` (any order) into sorted, disjoint, whole-bucket ranges.
fn normalise(def: &RollupDef, mut ranges: Vec<Dirty>) -> Vec<Dirty> {
    for r in &mut ranges {
        r.lo = def.bucket(r.lo);
        r.hi = def
            .bucket_at_or_after(r.hi)
            .max(r.lo.saturating_add(def.interval));
    }
    ranges.sort_by_key(|r| r.lo);
    let mut out: Vec<Dirty> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match out.last_mut() {
            Some(last) if r.lo <= last.hi => {
                last.hi = last.hi.max(r.hi);
                last.clear |= r.clear;
            }
            _ => out.push(r),
        }
    }
    // Too many ranges: join across the smallest gaps, doubling what counts as small.
    let mut gap = def.interval;
    while out.len() > MAX_DIRTY_RANGES {
        let mut joined: Vec<Dirty> = Vec::with_capacity(out.len());
        for r in out {
            match joined.last_mut() {
                Some(last) if r.lo - last.hi <= gap => {
                    last.hi = r.hi;
                    last.clear |= r.clear;
                }
                _ => joined.push(r),
            }
        }
        out = joined;
        gap = gap.saturating_mul(2);
    }
    out
}

/// Drops what lies before `floor` (a bucket start).
fn clip(ranges: Vec<Dirty>, floor: Option<i64>) -> Vec<Dirty> {
    let Some(floor) = floor else {
        return ranges;
    };
    ranges
        .into_iter()
        .filter(|r| r.hi > floor)
        .map(|r| Dirty {
            lo: r.lo.max(floor),
            ..r
        })
        .collect()
}

impl DbSnapshot {
    /// The rollup `name` of this database, if it has one.
    pub fn rollup(&self, name: &str) -> Option<&RollupCatalog> {
        self.catalog.databases.get(&self.name)?.rollups.get(name)
    }

    /// The rollups of this database, by name.
    pub fn rollups(&self) -> impl Iterator<Item = &RollupCatalog> {
        self.catalog
            .databases
            .get(&self.name)
            .into_iter()
            .flat_map(|d| d.rollups.values())
    }

    /// The ranges of rollup `name` whose materialised rows may be stale in this
    /// view, oldest first (with `buffered`, including the source's buffered rows),
    /// never reaching before the source's retention: those buckets keep their
    /// values.
    pub fn rollup_dirty(&self, name: &str, buffered: bool) -> Vec<Dirty> {
        let Some(rollup) = self.rollup(name) else {
            return Vec::new();
        };
        let def = &rollup.def;
        let mut ranges = rollup.pending.clone();
        if let Some(t) = self.table_catalog(&def.source) {
            let since = rollup.as_of;
            ranges.extend(
                t.segments()
                    .filter(|s| since == 0 || s.seq > since)
                    .map(|s| Dirty {
                        lo: s.min_time,
                        hi: s.max_time.saturating_add(1),
                        clear: false,
                    }),
            );
            ranges.extend(t.deletes.iter().filter(|c| c.seq > since).map(|c| Dirty {
                lo: c.min_time,
                hi: c.max_time.saturating_add(1),
                clear: true,
            }));
        }
        if buffered {
            if let Some(parts) = self.buffers.get(&def.source) {
                ranges.extend(parts.iter().filter(|b| b.rows > 0).map(|b| Dirty {
                    lo: b.min_time,
                    hi: b.max_time.saturating_add(1),
                    clear: false,
                }));
            }
        }
        let floor = self.cutoff(&def.source).map(|c| def.bucket_at_or_after(c));
        clip(normalise(def, ranges), floor)
    }
}

/// How a rollup stands, for listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RollupStatus {
    /// The catalog entry.
    pub rollup: RollupCatalog,
    /// How long its rows are kept, if the rollup table says.
    pub retention: Option<Duration>,
    /// Its stale ranges now, the source's buffered rows left out.
    pub dirty: Vec<Dirty>,
}

impl Engine {
    /// Makes rollup `def` in `db`, with its table (kept `retention`, or as the
    /// database says). Durable when it returns; the rollup is queryable at once,
    /// computed from the raw rows until the refresher has materialised it.
    pub async fn create_rollup(
        &self,
        db: &str,
        def: RollupDef,
        retention: Option<Duration>,
    ) -> Result<()> {
        let retention = crate::retention::nanos(retention)?;
        let snapshot = self
            .snapshot(db)
            .ok_or_else(|| StorageError::DatabaseNotFound(db.to_string()))?;
        if !snapshot.schemas.contains_key(&def.source) {
            return Err(StorageError::TableNotFound(format!("{db}.{}", def.source)));
        }
        if snapshot.rollup(&def.source).is_some() {
            return Err(StorageError::InvalidInput(format!(
                "source: '{}' is a rollup; a rollup aggregates a table of readings",
                def.source
            )));
        }
        let schema = def.schema();
        let source_schema = snapshot.schemas[&def.source].clone();
        let taken = || {
            StorageError::Conflict(format!(
                "a table named '{}' already exists in database '{db}'",
                def.name
            ))
        };
        // The name is taken in the schemas first, so no write can make a table of it.
        {
            let _schemas = self.inner.schema_lock.locked();
            let mut state = write(&self.inner.state);
            let tables = state.schemas.entry(db.to_string()).or_default();
            if tables.contains_key(&def.name) {
                return Err(taken());
            }
            tables.insert(def.name.clone(), std::sync::Arc::new(schema.clone()));
        }
        let _upkeep = self.inner.upkeep.read().await;
        let names = [
            (db.to_string(), def.source.clone()),
            (db.to_string(), def.name.clone()),
        ];
        let committed = self
            .commit(|c, _| {
                if c.table(db, &def.name).is_some() {
                    return Err(taken());
                }
                // The source may exist only in the buffer yet: its table is made too.
                let mut ops = crate::flush::create_ops(c, &names);
                if c.table(db, &def.source).is_none() {
                    ops.push(Op::Schema {
                        db: db.into(),
                        table: def.source.clone(),
                        schema: (*source_schema).clone(),
                    });
                }
                ops.push(Op::Schema {
                    db: db.into(),
                    table: def.name.clone(),
                    schema: schema.clone(),
                });
                if retention.is_some() {
                    ops.push(Op::Retention {
                        db: db.into(),
                        table: Some(def.name.clone()),
                        nanos: retention,
                    });
                }
                ops.push(Op::CreateRollup {
                    db: db.into(),
                    rollup: def.clone(),
                });
                Ok(ops)
            })
            .await;
        if let Err(e) = committed {
            let _schemas = self.inner.schema_lock.locked();
            if let Some(t) = write(&self.inner.state).schemas.get_mut(db) {
                t.remove(&def.name);
            }
            return Err(e);
        }
        Ok(())
    }

    /// Removes rollup `name` of `db` and its table; its files become garbage.
    /// The caller keeps the refresher off it meanwhile.
    pub async fn drop_rollup(&self, db: &str, name: &str) -> Result<()> {
        if self.rollup(db, name).is_none() {
            return Err(StorageError::TableNotFound(format!("{db}.{name}")));
        }
        // Its rows still in the WAL are persisted first, so a restart does not
        // replay them into a table that no longer exists.
        self.flush().await?;
        let _upkeep = self.inner.upkeep.read().await;
        self.commit(|c, _| {
            if c.databases
                .get(db)
                .and_then(|d| d.rollups.get(name))
                .is_none()
            {
                return Err(StorageError::TableNotFound(format!("{db}.{name}")));
            }
            Ok(vec![Op::DropRollup {
                db: db.into(),
                name: name.into(),
            }])
        })
        .await?;
        let mut state = write(&self.inner.state);
        if let Some(t) = state.schemas.get_mut(db) {
            t.remove(name);
        }
        if let Some(t) = state.series.get_mut(db) {
            t.remove(name);
        }
        Ok(())
    }

    /// Rollup `name` of `db`, if it exists.
    pub fn rollup(&self, db: &str, name: &str) -> Option<RollupCatalog> {
        self.catalog().databases.get(db)?.rollups.get(name).cloned()
    }

    /// Whether `table` of `db` is a rollup (written only by the store).
    pub fn is_rollup(&self, db: &str, table: &str) -> bool {
        self.catalog()
            .databases
            .get(db)
            .is_some_and(|d| d.rollups.contains_key(table))
    }

    /// The rollups of `db` and how they stand, by name.
    pub fn rollup_statuses(&self, db: &str) -> Vec<RollupStatus> {
        let Some(snapshot) = self.snapshot(db) else {
            return Vec::new();
        };
        snapshot
            .rollups()
            .map(|r| RollupStatus {
                rollup: r.clone(),
                retention: snapshot
                    .table_catalog(&r.def.name)
                    .and_then(|t| t.retention)
                    .map(|n| Duration::from_nanos(n.max(0) as u64)),
                dirty: snapshot.rollup_dirty(&r.def.name, false),
            })
            .collect()
    }

    /// Records that rollup `name`'s materialised rows are those of record `as_of`
    /// but for `pending`.
    pub async fn rollup_progress(
        &self,
        db: &str,
        name: &str,
        as_of: u64,
        pending: Vec<Dirty>,
    ) -> Result<()> {
        self.commit(|c, _| {
            let Some(r) = c.databases.get(db).and_then(|d| d.rollups.get(name)) else {
                return Err(StorageError::TableNotFound(format!("{db}.{name}")));
            };
            if r.as_of > as_of {
                return Err(StorageError::Conflict(format!(
                    "rollup {db}.{name} is already as of record {}",
                    r.as_of
                )));
            }
            Ok(vec![Op::RollupRefreshed {
                db: db.into(),
                name: name.into(),
                as_of,
                pending: pending.clone(),
            }])
        })
        .await?;
        Ok(())
    }
}

impl Catalog {
    /// The rollups of `db`, by name.
    pub fn rollups(&self, db: &str) -> Option<&BTreeMap<String, RollupCatalog>> {
        self.databases.get(db).map(|d| &d.rollups)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def(interval: i64) -> RollupDef {
        RollupDef {
            name: "r".into(),
            source: "s".into(),
            interval,
            tags: vec![],
            columns: vec![],
        }
    }

    fn d(lo: i64, hi: i64) -> Dirty {
        Dirty {
            lo,
            hi,
            clear: false,
        }
    }

    #[test]
    fn ranges_are_aligned_to_buckets_and_joined() {
        let r = def(10);
        let got = normalise(&r, vec![d(23, 24), d(1, 2), d(-5, -4), d(9, 10)]);
        assert_eq!(got, vec![d(-10, 10), d(20, 30)]);
        // A point on a boundary is a whole bucket.
        assert_eq!(normalise(&r, vec![d(20, 21)]), vec![d(20, 30)]);
        // Clearing spreads over what it is joined with.
        let mut c = d(31, 32);
        c.clear = true;
        let got = normalise(&r, vec![d(25, 35), c]);
        assert_eq!(got.len(), 1);
        assert!(got[0].clear);
    }

    #[test]
    fn many_ranges_are_joined_across_the_smallest_gaps() {
        let r = def(10);
        let ranges: Vec<Dirty> = (0..500).map(|i| d(i * 100, i * 100 + 1)).collect();
        let got = normalise(&r, ranges);
        assert!(got.len() <= MAX_DIRTY_RANGES, "{}", got.len());
        assert_eq!(got.first().unwrap().lo, 0);
        assert_eq!(got.last().unwrap().hi, 49_910);
        // Every original bucket is still covered.
        for i in 0..500 {
            assert!(got.iter().any(|g| g.lo <= i * 100 && i * 100 + 10 <= g.hi));
        }
    }

    #[test]
    fn retention_clips_what_is_stale() {
        let got = clip(vec![d(0, 10), d(20, 40)], Some(30));
        assert_eq!(got, vec![d(30, 40)]);
        assert_eq!(clip(vec![d(0, 10)], None), vec![d(0, 10)]);
    }

    #[test]
    fn aggregates_apply_to_the_types_they_fit() {
        assert_eq!(
            Aggregate::Avg.result_type(FieldType::Integer),
            Some(FieldType::Float)
        );
        assert_eq!(Aggregate::Avg.result_type(FieldType::String), None);
        assert_eq!(
            Aggregate::Count.result_type(FieldType::Boolean),
            Some(FieldType::Integer)
        );
        assert_eq!(Aggregate::Max.result_type(FieldType::Boolean), None);
        assert_eq!(Aggregate::parse("last"), Some(Aggregate::Last));
        assert_eq!(Aggregate::parse("median"), None);
    }

    #[test]
    fn a_definition_names_what_is_wrong() {
        let mut s = TableSchema::default();
        s.add_column("device", ColumnKind::Tag).unwrap();
        s.add_column("level", ColumnKind::Field(FieldType::Float))
            .unwrap();
        s.add_column("note", ColumnKind::Field(FieldType::String))
            .unwrap();
        let hour = Duration::from_secs(3600);
        let aggs =
            |f: &str, a: &[&str]| vec![(f.to_string(), a.iter().map(|x| x.to_string()).collect())];
        let ok = RollupDef::new("r", "s", &s, hour, &aggs("level", &["min", "count"])).unwrap();
        assert_eq!(ok.tags, vec!["device".to_string()]);
        let schema = ok.schema();
        let names: Vec<&str> = schema.columns().iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["time", "device", "level_min", "level_count"]);
        let err = |f, a: &[&str], i| RollupDef::new("r", "s", &s, i, &aggs(f, a)).unwrap_err();
        assert!(err("depth", &["min"], hour).contains("no field 'depth'"));
        assert!(err("device", &["min"], hour).contains("not a field"));
        assert!(err("note", &["avg"], hour).contains("avg does not apply"));
        assert!(err("level", &["median"], hour).contains("unknown aggregate 'median'"));
        assert!(err("level", &["min"], Duration::from_millis(10)).contains("at least 1s"));
    }
}
