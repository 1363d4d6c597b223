//! Retention: how long a database's or a table's rows are kept, and the expiry
//! that drops what is older.
//!
//! A setting is a catalog record (`Op::Retention`), so it survives restarts and is
//! the same for every reader of the store. A table's setting wins over its
//! database's; neither keeps rows forever. Rows older than `now - retention` (the
//! cutoff) are invisible at once: every reader bounds its scan by
//! [`DbSnapshot::cutoff`]. They leave the store in two ways:
//!
//! - a segment wholly older than the cutoff leaves the catalog in one record per
//!   table ([`Engine::expire`], run by the compactor before it looks for merges),
//!   and its files become garbage;
//! - a day the cutoff cuts is rewritten without its expired rows by compaction,
//!   once the expired part reaches [`TRIM_AFTER`] back from the cutoff (trimming
//!   on every step of the cutoff would rewrite a day over and over).

use std::time::Duration;

use crate::catalog::{Catalog, DayCatalog, Op};
use crate::engine::{DbSnapshot, Engine};
use crate::error::{Result, StorageError};
use crate::units::now_nanos;

/// A day the retention cutoff cuts is trimmed once its rows reach this far (6 h)
/// behind the cutoff.
pub const TRIM_AFTER: i64 = 6 * 3_600_000_000_000;

/// Longest retention accepted: rows older than this (about 290 years) cannot be
/// written anyway.
pub const MAX_RETENTION: Duration = Duration::from_secs(290 * 365 * 86_400);

/// The oldest time still kept at `now` under `retention` nanoseconds (`None`: all).
pub fn cutoff(retention: Option<i64>, now: i64) -> Option<i64> {
    retention.map(|r| now.saturating_sub(r))
}

/// Whether some of `day`'s rows are expired at `cutoff` for long enough to trim
/// (with `now_please`, at all). A segment whose rows all expired is not counted:
/// expiry drops it whole.
pub fn due_for_trim(day: &DayCatalog, cutoff: i64, now_please: bool) -> bool {
    let slack = if now_please { 0 } else { TRIM_AFTER };
    day.segments
        .values()
        .any(|s| s.min_time < cutoff.saturating_sub(slack) && s.max_time >= cutoff)
}

/// One database's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatabaseSettings {
    /// Its name.
    pub name: String,
    /// How long its rows are kept, unless a table says otherwise.
    pub retention: Option<Duration>,
    /// Its tables' own retention settings, by table (tables without one are left
    /// out).
    pub tables: Vec<(String, Duration)>,
}

pub(crate) fn nanos(retention: Option<Duration>) -> Result<Option<i64>> {
    match retention {
        None => Ok(None),
        Some(d) if d.is_zero() => Err(StorageError::InvalidInput(
            "retention must be longer than 0 (null keeps rows forever)".into(),
        )),
        Some(d) if d > MAX_RETENTION => Err(StorageError::InvalidInput(format!(
            "retention is longer than the longest accepted, {} days (null keeps rows forever)",
            MAX_RETENTION.as_secs() / 86_400
        ))),
        Some(d) => Ok(Some(d.as_nanos() as i64)),
    }
}

fn duration(nanos: i64) -> Duration {
    Duration::from_nanos(nanos.max(0) as u64)
}

impl Engine {
    /// Sets how long `db`'s rows (with `table`, that table's) are kept; `None`
    /// keeps them forever (a table's `None`: as its database says). A database is
    /// created if it does not exist; a table must exist (written to at least once).
    /// Durable when it returns; rows past the new cutoff are invisible from then on.
    pub async fn set_retention(
        &self,
        db: &str,
        table: Option<&str>,
        retention: Option<Duration>,
    ) -> Result<()> {
        let nanos = nanos(retention)?;
        let schema = match table {
            Some(t) => Some(
                self.snapshot(db)
                    .and_then(|s| s.schemas.get(t).cloned())
                    .ok_or_else(|| StorageError::TableNotFound(format!("{db}.{t}")))?,
            ),
            None => None,
        };
        let _upkeep = self.inner.upkeep.read().await;
        self.commit(|c, _| {
            let mut ops = Vec::new();
            match (table, &schema) {
                (Some(t), Some(schema)) if c.table(db, t).is_none() => {
                    ops.extend(crate::flush::create_ops(c, &[(db.into(), t.into())]));
                    ops.push(Op::Schema {
                        db: db.into(),
                        table: t.into(),
                        schema: (**schema).clone(),
                    });
                }
                (None, _) if !c.databases.contains_key(db) => ops.push(Op::CreateDatabase {
                    db: db.into(),
                    db_id: c.next_db_id,
                }),
                _ => {}
            }
            ops.push(Op::Retention {
                db: db.into(),
                table: table.map(str::to_string),
                nanos,
            });
            Ok(ops)
        })
        .await?;
        self.add_database(db);
        Ok(())
    }

    /// Every database with its retention settings, by name.
    pub fn database_settings(&self) -> Vec<DatabaseSettings> {
        let catalog = self.catalog();
        self.databases()
            .into_iter()
            .map(|name| {
                let d = catalog.databases.get(&name);
                DatabaseSettings {
                    retention: d.and_then(|d| d.retention).map(duration),
                    tables: d
                        .map(|d| {
                            d.tables
                                .iter()
                                .filter_map(|(t, tc)| Some((t.clone(), duration(tc.retention?))))
                                .collect()
                        })
                        .unwrap_or_default(),
                    name,
                }
            })
            .collect()
    }

    /// Removes from the catalog every segment wholly older than its table's
    /// cutoff, one record per table. Returns how many segments left.
    pub async fn expire(&self) -> Result<usize> {
        let catalog = self.catalog();
        let now = now_nanos();
        let mut removed = 0;
        for (db, table, _) in catalog.tables() {
            let Some(cut) = cutoff(catalog.retention(db, table), now) else {
                continue;
            };
            let gone: Vec<(i64, u32)> = expired(&catalog, db, table, cut);
            if gone.is_empty() {
                continue;
            }
            self.commit(|c, _| {
                Ok(gone
                    .iter()
                    .filter(|(day, id)| {
                        c.table(db, table)
                            .and_then(|t| t.segment(*day, *id))
                            .is_some()
                    })
                    .map(|&(day, id)| Op::RemoveSegment {
                        db: db.into(),
                        table: table.into(),
                        day,
                        id,
                    })
                    .collect())
            })
            .await?;
            tracing::info!(db, table, segments = gone.len(), cutoff = cut, "expired");
            removed += gone.len();
        }
        Ok(removed)
    }
}

/// The (day, id) of `db.table`'s segments wholly older than `cut`.
fn expired(catalog: &Catalog, db: &str, table: &str, cut: i64) -> Vec<(i64, u32)> {
    let Some(tc) = catalog.table(db, table) else {
        return Vec::new();
    };
    tc.days
        .range(..=crate::catalog::day_of(cut))
        .flat_map(|(day, d)| {
            d.segments
                .values()
                .filter(move |s| s.max_time < cut)
                .map(move |s| (*day, s.id))
        })
        .collect()
}

impl DbSnapshot {
    /// The oldest time of `table` a reader may see now (rows before it are past
    /// their retention), or `None` if every row is kept.
    pub fn cutoff(&self, table: &str) -> Option<i64> {
        cutoff(self.catalog.retention(&self.name, table), now_nanos())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::catalog::{SegmentMeta, DAY_NANOS};

    fn day(spans: &[(i64, i64)]) -> DayCatalog {
        let mut d = DayCatalog::default();
        for (i, &(lo, hi)) in spans.iter().enumerate() {
            d.add_segment(
                SegmentMeta {
                    id: i as u32,
                    day: 0,
                    path: format!("s{i}.parquet"),
                    index_path: format!("s{i}.index"),
                    size: 1,
                    rows: 1,
                    min_time: lo,
                    max_time: hi,
                    row_group_rows: vec![1],
                    level: 0,
                    seq: 1,
                    run: 1,
                    created: 0,
                    deleted: None,
                },
                &BTreeMap::new(),
            );
        }
        d
    }

    #[test]
    fn a_day_is_trimmed_once_its_expired_part_is_old_enough() {
        let hour = DAY_NANOS / 24;
        let d = day(&[(0, 20 * hour)]);
        assert!(!due_for_trim(&d, 5 * hour, false), "5 h expired: not yet");
        assert!(due_for_trim(&d, 5 * hour, true), "now, when asked");
        assert!(due_for_trim(&d, 7 * hour, false), "7 h expired");
        assert!(
            !due_for_trim(&d, 21 * hour, false),
            "wholly expired: expiry drops it, no trim"
        );
        assert!(!due_for_trim(&d, 0, true), "nothing expired");
        assert_eq!(cutoff(None, 100), None);
        assert_eq!(cutoff(Some(30), 100), Some(70));
        assert_eq!(cutoff(Some(i64::MAX), i64::MIN + 5), Some(i64::MIN));
    }

    #[test]
    fn settings_out_of_range_are_refused() {
        assert!(nanos(Some(Duration::ZERO)).is_err());
        assert!(nanos(Some(MAX_RETENTION + Duration::from_secs(1))).is_err());
        assert_eq!(
            nanos(Some(Duration::from_secs(2))).unwrap(),
            Some(2_000_000_000)
        );
        assert_eq!(nanos(None).unwrap(), None);
    }
}
