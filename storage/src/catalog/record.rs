//! Catalog records: one change each, and how it folds into the state.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{Catalog, DatabaseCatalog, Garbage, SegmentMeta, TableCatalog};
use crate::error::{Result, StorageError};
use crate::schema::TableSchema;

/// Who wrote a record: a node (a data directory, whose WAL it flushes) and the
/// fencing epoch it claimed when it opened the store. A writer whose epoch is no
/// longer the newest may not commit.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct WriterId {
    /// The node's id, kept in its data directory.
    pub node: String,
    /// The epoch it claimed.
    pub epoch: u64,
}

/// One change of the catalog, as stored in `catalog/log/<seq>.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Its number: one more than the record it follows.
    pub seq: u64,
    /// Who wrote it.
    pub writer: WriterId,
    /// When, Unix nanoseconds (informative).
    pub time: i64,
    /// What changed, applied in order.
    pub ops: Vec<Op>,
}

/// One step of a change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// A writer takes over the store with a new epoch; earlier epochs are fenced.
    Claim {
        /// The new writer.
        writer: WriterId,
    },
    /// A table (and its database, if new) is created with these ids.
    CreateTable {
        /// Database name.
        db: String,
        /// Its id, if the database is new (else the existing id is kept).
        db_id: u32,
        /// Table name.
        table: String,
        /// The table's id.
        table_id: u32,
    },
    /// A database is created with this id (without tables yet).
    CreateDatabase {
        /// Database name.
        db: String,
        /// Its id.
        db_id: u32,
    },
    /// How long a database's or a table's rows are kept.
    Retention {
        /// Database.
        db: String,
        /// The table, or `None` for the database's own setting.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        table: Option<String>,
        /// Nanoseconds; `None` keeps rows forever (a table's `None`: as its
        /// database says).
        nanos: Option<i64>,
    },
    /// A table's schema as of this record.
    Schema {
        /// Database.
        db: String,
        /// Table.
        table: String,
        /// The schema.
        schema: TableSchema,
    },
    /// A segment joins the table.
    AddSegment {
        /// Database.
        db: String,
        /// Table.
        table: String,
        /// The segment.
        segment: SegmentMeta,
        /// Its tag values, by tag column.
        tags: BTreeMap<String, Vec<String>>,
    },
    /// A segment leaves the table; its files become garbage.
    RemoveSegment {
        /// Database.
        db: String,
        /// Table.
        table: String,
        /// Its day.
        day: i64,
        /// Its id.
        id: u32,
    },
    /// Rows of a segment are deleted (added to its deleted rows).
    DeleteRows {
        /// Database.
        db: String,
        /// Table.
        table: String,
        /// The segment's day.
        day: i64,
        /// Its id.
        id: u32,
        /// Positions of the rows in its file.
        rows: super::Bitmap,
    },
    /// A registry of the series a flush touched, to apply after the table's others.
    SeriesDelta {
        /// Database.
        db: String,
        /// Table.
        table: String,
        /// The object id in its key.
        id: u32,
        /// Its key.
        key: String,
    },
    /// The table's registry files up to and including `replaced` were folded into
    /// one full registry; they become garbage.
    SeriesFolded {
        /// Database.
        db: String,
        /// Table.
        table: String,
        /// The object id in the full registry's key.
        id: u32,
        /// The full registry.
        full: String,
        /// The files it replaces (the old full one and deltas), oldest first.
        replaced: Vec<String>,
    },
    /// Every row of the node's WAL files up to `upto` is in segments.
    WalPersisted {
        /// The node.
        node: String,
        /// The newest such WAL file.
        upto: u64,
    },
    /// A rollup is made (its table by `CreateTable` before it).
    CreateRollup {
        /// Database.
        db: String,
        /// What it computes.
        rollup: crate::rollup::RollupDef,
    },
    /// A rollup's materialised rows are those of record `as_of`, but for `pending`.
    RollupRefreshed {
        /// Database.
        db: String,
        /// The rollup.
        name: String,
        /// The record they were computed from.
        as_of: u64,
        /// Ranges still stale as of it.
        pending: Vec<crate::rollup::Dirty>,
    },
    /// A rollup and its table are removed; its files become garbage.
    DropRollup {
        /// Database.
        db: String,
        /// The rollup.
        name: String,
    },
    /// Garbage that was deleted.
    Collected {
        /// Its keys.
        paths: Vec<String>,
    },
}

fn missing(what: String) -> StorageError {
    StorageError::Corrupt(format!(
        "catalog record refers to {what}, which does not exist"
    ))
}

/// The id to hand out after `id`: a record holding the last id of the range
/// leaves none to hand out, which no writer does.
fn next_id(id: u32, what: &str) -> Result<u32> {
    id.checked_add(1).ok_or_else(|| {
        StorageError::Corrupt(format!(
            "catalog record gives a {what} the id {id}, which leaves none to hand out"
        ))
    })
}

impl Catalog {
    /// The state after `record`, which must be the next one. `self` stays as it
    /// was (readers may hold it): the tables and days `record` touches are copied.
    pub fn apply(&self, record: &Record) -> Result<Catalog> {
        self.clone().applied(record)
    }

    /// `record` applied to this state in place: what no one else shares is changed,
    /// not copied (opening applies many records in a row this way).
    pub fn applied(mut self, record: &Record) -> Result<Catalog> {
        if record.seq != self.seq + 1 {
            return Err(StorageError::Corrupt(format!(
                "catalog record {} does not follow {}",
                record.seq, self.seq
            )));
        }
        self.seq = record.seq;
        for op in &record.ops {
            self.apply_op(op, record.seq)?;
        }
        Ok(self)
    }

    /// Whether `record` could be applied now: every segment it removes is still
    /// here. Records are computed against one version and committed against a later
    /// one; this is the check that the later one still fits.
    pub fn admits(&self, ops: &[Op]) -> bool {
        ops.iter().all(|op| match op {
            Op::RemoveSegment { db, table, day, id }
            | Op::DeleteRows {
                db, table, day, id, ..
            } => self
                .table(db, table)
                .and_then(|t| t.segment(*day, *id))
                .is_some(),
            _ => true,
        })
    }

    fn database_mut(&mut self, db: &str) -> Result<&mut DatabaseCatalog> {
        let d = self
            .databases
            .get_mut(db)
            .ok_or_else(|| missing(format!("database {db}")))?;
        Ok(Arc::make_mut(d))
    }

    fn table_mut(&mut self, db: &str, table: &str) -> Result<&mut TableCatalog> {
        let t = self
            .database_mut(db)?
            .tables
            .get_mut(table)
            .ok_or_else(|| missing(format!("table {db}.{table}")))?;
        Ok(Arc::make_mut(t))
    }

    /// Drops the deletes of `table` every rollup of it has caught up with.
    fn forget_deletes(&mut self, db: &str, table: &str) -> Result<()> {
        let oldest = self.databases.get(db).and_then(|d| d.oldest_as_of(table));
        if let Some(t) = self.table(db, table) {
            let stale = |c: &crate::rollup::Changed| oldest.is_none_or(|o| c.seq <= o);
            if t.deletes.iter().any(stale) {
                self.table_mut(db, table)?.deletes.retain(|c| !stale(c));
            }
        }
        Ok(())
    }

    fn apply_op(&mut self, op: &Op, seq: u64) -> Result<()> {
        match op {
            Op::Claim { writer } => self.writer = Some(writer.clone()),
            Op::CreateTable {
                db,
                db_id,
                table,
                table_id,
            } => {
                let d = self.databases.entry(db.clone()).or_insert_with(|| {
                    Arc::new(DatabaseCatalog {
                        id: *db_id,
                        ..Default::default()
                    })
                });
                self.next_db_id = self.next_db_id.max(next_id(d.id, "database")?);
                Arc::make_mut(d)
                    .tables
                    .entry(table.clone())
                    .or_insert_with(|| {
                        Arc::new(TableCatalog {
                            id: *table_id,
                            ..Default::default()
                        })
                    });
                self.next_table_id = self.next_table_id.max(next_id(*table_id, "table")?);
            }
            Op::CreateDatabase { db, db_id } => {
                self.databases.entry(db.clone()).or_insert_with(|| {
                    Arc::new(DatabaseCatalog {
                        id: *db_id,
                        ..Default::default()
                    })
                });
                self.next_db_id = self.next_db_id.max(next_id(*db_id, "database")?);
            }
            Op::Retention { db, table, nanos } => match table {
                Some(table) => self.table_mut(db, table)?.retention = *nanos,
                None => self.database_mut(db)?.retention = *nanos,
            },
            Op::Schema { db, table, schema } => self.table_mut(db, table)?.schema = schema.clone(),
            Op::AddSegment {
                db,
                table,
                segment,
                tags,
            } => {
                self.next_segment_id = self.next_segment_id.max(next_id(segment.id, "segment")?);
                let t = self.table_mut(db, table)?;
                let day = t.days.entry(segment.day).or_default();
                Arc::make_mut(day).add_segment(segment.clone(), tags);
            }
            Op::RemoveSegment { db, table, day, id } => {
                let t = self.table_mut(db, table)?;
                let days = &mut t.days;
                let entry = days
                    .get_mut(day)
                    .ok_or_else(|| missing(format!("segment {id} of day {day}")))?;
                let d = Arc::make_mut(entry);
                let meta = d
                    .remove_segment(*id)
                    .ok_or_else(|| missing(format!("segment {id} of day {day}")))?;
                if d.segments.is_empty() {
                    days.remove(day);
                }
                for path in meta.files() {
                    self.garbage.push(Garbage {
                        since: seq,
                        path: path.to_string(),
                    });
                }
            }
            Op::DeleteRows {
                db,
                table,
                day,
                id,
                rows,
            } => {
                let t = self.table_mut(db, table)?;
                let d = t
                    .days
                    .get_mut(day)
                    .ok_or_else(|| missing(format!("segment {id} of day {day}")))?;
                let meta = Arc::make_mut(d)
                    .segments
                    .get_mut(id)
                    .ok_or_else(|| missing(format!("segment {id} of day {day}")))?;
                let deleted = meta.deleted.get_or_insert_with(Default::default);
                deleted.0 |= &rows.0;
                let (min_time, max_time) = (meta.min_time, meta.max_time);
                if self
                    .databases
                    .get(db)
                    .is_some_and(|d| d.is_rollup_source(table))
                {
                    self.table_mut(db, table)?
                        .deletes
                        .push(crate::rollup::Changed {
                            seq,
                            min_time,
                            max_time,
                        });
                }
            }
            Op::CreateRollup { db, rollup } => {
                self.table_mut(db, &rollup.name)?;
                self.database_mut(db)?.rollups.insert(
                    rollup.name.clone(),
                    crate::rollup::RollupCatalog {
                        def: rollup.clone(),
                        as_of: 0,
                        pending: Vec::new(),
                    },
                );
            }
            Op::RollupRefreshed {
                db,
                name,
                as_of,
                pending,
            } => {
                let r = self
                    .database_mut(db)?
                    .rollups
                    .get_mut(name)
                    .ok_or_else(|| missing(format!("rollup {db}.{name}")))?;
                r.as_of = *as_of;
                r.pending = pending.clone();
                let source = r.def.source.clone();
                self.forget_deletes(db, &source)?;
            }
            Op::DropRollup { db, name } => {
                let d = self.database_mut(db)?;
                let r = d
                    .rollups
                    .remove(name)
                    .ok_or_else(|| missing(format!("rollup {db}.{name}")))?;
                if let Some(t) = d.tables.remove(name) {
                    let files = t
                        .segments()
                        .flat_map(|s| s.files())
                        .chain(t.series.keys())
                        .map(|path| Garbage {
                            since: seq,
                            path: path.to_string(),
                        });
                    self.garbage.extend(files);
                }
                self.forget_deletes(db, &r.def.source)?;
            }
            Op::SeriesDelta { db, table, id, key } => {
                self.next_segment_id = self.next_segment_id.max(next_id(*id, "object")?);
                self.table_mut(db, table)?.series.deltas.push(key.clone());
            }
            Op::SeriesFolded {
                db,
                table,
                id,
                full,
                replaced,
            } => {
                self.next_segment_id = self.next_segment_id.max(next_id(*id, "object")?);
                let series = &mut self.table_mut(db, table)?.series;
                let kept: Vec<String> = series
                    .keys()
                    .filter(|k| !replaced.iter().any(|r| r == k))
                    .map(str::to_string)
                    .collect();
                // The folded files are the oldest ones; what came after them stays.
                series.full = Some(full.clone());
                series.deltas = kept
                    .into_iter()
                    .filter(|k| Some(k) != series.full.as_ref())
                    .collect();
                for path in replaced {
                    self.garbage.push(Garbage {
                        since: seq,
                        path: path.clone(),
                    });
                }
            }
            Op::WalPersisted { node, upto } => {
                let e = self.wal_persisted.entry(node.clone()).or_default();
                *e = (*e).max(*upto);
            }
            Op::Collected { paths } => self.garbage.retain(|g| !paths.contains(&g.path)),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn writer() -> WriterId {
        WriterId {
            node: "n1".into(),
            epoch: 1,
        }
    }

    fn segment(id: u32, day: i64) -> SegmentMeta {
        SegmentMeta {
            id,
            day,
            path: format!("s{id}.parquet"),
            index_path: format!("s{id}.index"),
            size: 10,
            rows: 5,
            min_time: day * super::super::DAY_NANOS,
            max_time: day * super::super::DAY_NANOS + 1,
            row_group_rows: vec![5],
            seq: 1,
            run: 1,
            level: 0,
            created: 0,
            deleted: None,
        }
    }

    fn record(seq: u64, ops: Vec<Op>) -> Record {
        Record {
            seq,
            writer: writer(),
            time: 0,
            ops,
        }
    }

    #[test]
    fn records_fold_into_the_state_and_removed_files_become_garbage() {
        let c = Catalog::default();
        let create = Op::CreateTable {
            db: "city".into(),
            db_id: 0,
            table: "manhole".into(),
            table_id: 0,
        };
        let add = |id| Op::AddSegment {
            db: "city".into(),
            table: "manhole".into(),
            segment: segment(id, 20_000),
            tags: [("device".to_string(), vec![format!("mh-{id}")])].into(),
        };
        let c = c.apply(&record(1, vec![create, add(0), add(1)])).unwrap();
        let t = c.table("city", "manhole").unwrap();
        assert_eq!(t.segment_count(), 2);
        assert_eq!(c.next_segment_id, 2);
        assert!(t.days[&20_000]
            .holding("device", &["mh-1".into()])
            .contains(1));

        let before = c.clone();
        let remove = Op::RemoveSegment {
            db: "city".into(),
            table: "manhole".into(),
            day: 20_000,
            id: 0,
        };
        assert!(c.admits(std::slice::from_ref(&remove)));
        let c = c.apply(&record(2, vec![remove.clone()])).unwrap();
        assert_eq!(c.table("city", "manhole").unwrap().segment_count(), 1);
        assert_eq!(
            before.table("city", "manhole").unwrap().segment_count(),
            2,
            "the older version is untouched"
        );
        assert_eq!(
            c.garbage
                .iter()
                .map(|g| (g.since, g.path.as_str()))
                .collect::<Vec<_>>(),
            vec![(2, "s0.parquet"), (2, "s0.index")]
        );
        assert!(!c.admits(std::slice::from_ref(&remove)), "already gone");
        assert!(c.apply(&record(3, vec![remove])).is_err());
        assert!(c.apply(&record(9, vec![])).is_err(), "out of order");
        let c = c
            .apply(&record(
                3,
                vec![Op::Collected {
                    paths: vec!["s0.parquet".into(), "s0.index".into()],
                }],
            ))
            .unwrap();
        assert!(c.garbage.is_empty());
    }

    #[test]
    fn a_fold_replaces_the_oldest_series_files() {
        let mut c = Catalog::default()
            .apply(&record(
                1,
                vec![Op::CreateTable {
                    db: "d".into(),
                    db_id: 0,
                    table: "t".into(),
                    table_id: 0,
                }],
            ))
            .unwrap();
        for (seq, key) in [(2, "a"), (3, "b"), (4, "c")] {
            c = c
                .apply(&record(
                    seq,
                    vec![Op::SeriesDelta {
                        db: "d".into(),
                        table: "t".into(),
                        id: seq as u32,
                        key: key.into(),
                    }],
                ))
                .unwrap();
        }
        let c = c
            .apply(&record(
                5,
                vec![Op::SeriesFolded {
                    db: "d".into(),
                    table: "t".into(),
                    id: 9,
                    full: "f".into(),
                    replaced: vec!["a".into(), "b".into()],
                }],
            ))
            .unwrap();
        let s = &c.table("d", "t").unwrap().series;
        assert_eq!(s.full.as_deref(), Some("f"));
        assert_eq!(s.deltas, vec!["c".to_string()]);
        assert_eq!(c.garbage.len(), 2);
    }

    /// A regression case of `catalog::log::fuzz`: a record giving something the
    /// last id of the range overflowed the next id to hand out (a panic in debug
    /// builds, the ids starting over at 0 in release ones); it is corrupt.
    #[test]
    fn an_id_at_the_end_of_the_range_is_corrupt() {
        let last = u32::MAX;
        let ops = [
            Op::CreateDatabase {
                db: "city".into(),
                db_id: last,
            },
            Op::CreateTable {
                db: "city".into(),
                db_id: 0,
                table: "gauge".into(),
                table_id: last,
            },
            Op::SeriesDelta {
                db: "city".into(),
                table: "gauge".into(),
                id: last,
                key: "k".into(),
            },
        ];
        for op in ops {
            let err = Catalog::default().apply(&record(1, vec![op])).unwrap_err();
            assert!(
                matches!(&err, StorageError::Corrupt(m) if m.contains("leaves none to hand out")),
                "{err:?}"
            );
        }
        let add = Op::AddSegment {
            db: "city".into(),
            table: "gauge".into(),
            segment: segment(last, 20_000),
            tags: BTreeMap::new(),
        };
        let create = Op::CreateTable {
            db: "city".into(),
            db_id: 0,
            table: "gauge".into(),
            table_id: 0,
        };
        let err = Catalog::default()
            .apply(&record(1, vec![create, add]))
            .unwrap_err();
        assert!(matches!(err, StorageError::Corrupt(_)), "{err:?}");
    }

    #[test]
    fn records_read_back_as_written() {
        let r = record(
            7,
            vec![
                Op::Claim { writer: writer() },
                Op::WalPersisted {
                    node: "n1".into(),
                    upto: 3,
                },
            ],
        );
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.contains(r#""op":"claim""#), "{json}");
        assert_eq!(serde_json::from_str::<Record>(&json).unwrap(), r);
    }
}
