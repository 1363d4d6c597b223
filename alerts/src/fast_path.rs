//! The fast path: a rule that is a plain filter on one table is checked against
//! every written batch, so its alert fires moments after the reading that
//! causes it rather than at the rule's next evaluation.
//!
//! [`crate::AlertEngine::on_write`] only queues (a write's acknowledgement never
//! waits; past [`FAST_PATH_QUEUE`] batches one is not checked, and the miss is
//! counted and logged). A task of its own takes each batch, reshapes it to its
//! table's columns, and runs each rule's SQL over it: the rows that match are
//! instances returned now. It then runs the SQL over each series' newest row
//! alone: a series whose newest reading no longer matches is an instance no
//! longer returned.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use citytsdb_storage::merge::align;
use citytsdb_storage::schema::TIME_COLUMN;
use datafusion::arrow::array::{Array, ArrayRef, AsArray, RecordBatch, UInt64Array};
use datafusion::arrow::compute::{cast, take};
use datafusion::arrow::datatypes::{DataType, TimestampNanosecondType};
use tokio::sync::mpsc;

use crate::engine::{lock, Entry, Shared};
use crate::rows;
use crate::rule::Rule;

/// Written batches waiting for the fast path.
const FAST_PATH_QUEUE: usize = 65_536;

/// One write: its database and its batches by table.
type Written = (String, Vec<(String, RecordBatch)>);

/// The queue between writes and the fast-path task.
pub(crate) struct FastPath {
    tx: mpsc::Sender<Written>,
    /// The receiving end, until the task takes it; with `Driver::Caller` it stays
    /// here for `check_queued`.
    rx: Mutex<Option<mpsc::Receiver<Written>>>,
    /// Databases with at least one fast-path rule: writes elsewhere skip the queue.
    dbs: Mutex<BTreeSet<String>>,
}

impl FastPath {
    /// An empty queue.
    pub fn new() -> Self {
        let (tx, rx) = mpsc::channel(FAST_PATH_QUEUE);
        Self {
            tx,
            rx: Mutex::new(Some(rx)),
            dbs: Mutex::new(BTreeSet::new()),
        }
    }

    /// Follows a change of the registered rules: which databases have fast-path
    /// rules.
    pub fn follow(&self, rules: &BTreeMap<String, Entry>) {
        *lock(&self.dbs) = rules
            .values()
            .filter(|e| e.fast_table.is_some())
            .map(|e| e.rule.spec.db.clone())
            .collect();
    }
}

/// Starts the fast-path task; it ends when the engine is gone.
pub(crate) fn spawn(shared: &Arc<Shared>) {
    let Some(mut rx) = lock(&shared.fast.rx).take() else {
        return;
    };
    let shared = Arc::downgrade(shared);
    tokio::spawn(async move {
        while let Some((db, tables)) = rx.recv().await {
            let Some(shared) = shared.upgrade() else {
                return;
            };
            shared.check_batches(&db, tables).await;
        }
    });
}

impl Shared {
    /// Queues a write for the fast path, if its database has fast-path rules.
    pub(crate) fn on_write(&self, db: &str, tables: &[(String, RecordBatch)]) {
        if !lock(&self.fast.dbs).contains(db) {
            return;
        }
        if self
            .fast
            .tx
            .try_send((db.to_string(), tables.to_vec()))
            .is_err()
        {
            self.stats.fast_path_dropped.fetch_add(1, Ordering::Relaxed);
            tracing::error!(
                db,
                "the alert fast path is behind; a written batch was not checked against its rules"
            );
        }
    }

    /// Checks every queued write now (the queue is the caller's only without the
    /// background task).
    pub(crate) async fn check_queued(&self) {
        let Some(mut rx) = lock(&self.fast.rx).take() else {
            return;
        };
        while let Ok((db, tables)) = rx.try_recv() {
            self.check_batches(&db, tables).await;
        }
        *lock(&self.fast.rx) = Some(rx);
    }

    /// Checks the fast-path rules of `db` against written batches.
    async fn check_batches(&self, db: &str, tables: Vec<(String, RecordBatch)>) {
        for (table, batch) in tables {
            let rules: Vec<(Rule, Vec<String>)> = {
                let inner = lock(&self.inner);
                inner
                    .rules
                    .values()
                    .filter(|e| e.rule.spec.db == db && e.fast_table.as_deref() == Some(&table))
                    .map(|e| (e.rule.clone(), e.identity.clone()))
                    .collect()
            };
            if rules.is_empty() {
                continue;
            }
            self.stats.fast_path_batches.fetch_add(1, Ordering::Relaxed);
            let Some(schema) = self.queries.table_schema(db, &table) else {
                continue;
            };
            // The rule was planned against the table's columns; a write may carry
            // fewer, or other types.
            let batch = match align(&batch, &schema) {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!(table = %table, error = %e, "cannot align a written batch for the fast path");
                    continue;
                }
            };
            for (rule, identity) in rules {
                self.check_batch(&rule, &identity, &table, &batch).await;
            }
        }
    }

    async fn check_batch(
        &self,
        rule: &Rule,
        identity: &[String],
        table: &str,
        batch: &RecordBatch,
    ) {
        let sql = &rule.spec.sql;
        let matched = match self.queries.query_batch(table, batch.clone(), sql).await {
            Ok(out) => rows::observations(rule, &out),
            Err(e) => {
                self.stats
                    .evaluation_failures
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(rule = %rule.spec.name, error = %e, "checking a written batch failed");
                return;
            }
        };
        // The series whose newest reading here no longer matches stop being returned
        // (worth finding only while the rule has active instances).
        let mut stopped = Vec::new();
        let any_active = !matched.is_empty()
            || lock(&self.inner)
                .state
                .instances
                .get(&rule.id)
                .is_some_and(|r| !r.active.is_empty());
        if let Some(latest) = any_active.then(|| latest_rows(batch, identity)).flatten() {
            let still: BTreeSet<String> =
                match self.queries.query_batch(table, latest.clone(), sql).await {
                    Ok(out) => rows::observations(rule, &out)
                        .into_iter()
                        .map(|o| o.fingerprint)
                        .collect(),
                    Err(_) => return,
                };
            for key in identities(&latest, identity) {
                let fp = rows::instance_fingerprint(&rule.id, &key);
                if !still.contains(&fp) {
                    stopped.push(fp);
                }
            }
        }
        let now = self.clock.now_nanos();
        let mut inner = lock(&self.inner);
        let Some(entry) = inner.rules.get(&rule.id) else {
            return;
        };
        if entry.rule != *rule {
            return;
        }
        let timing = entry.timing;
        let mut changes = Vec::new();
        let instances = inner.state.instances.entry(rule.id.clone()).or_default();
        for obs in matched {
            instances.seen(&rule.id, &timing, now, obs, &mut changes);
        }
        for fp in stopped {
            instances.unseen(&timing, now, &fp, &mut changes);
        }
        self.apply(&mut inner, &rule.id, changes);
    }
}

/// Each identity's newest row of a batch (by `time`), or `None` when the identity
/// columns are not all string columns of the batch.
fn latest_rows(batch: &RecordBatch, identity: &[String]) -> Option<RecordBatch> {
    let times = batch
        .column_by_name(TIME_COLUMN)?
        .as_primitive_opt::<TimestampNanosecondType>()?
        .clone();
    let columns: Vec<ArrayRef> = identity
        .iter()
        .map(|c| cast(batch.column_by_name(c)?, &DataType::Utf8).ok())
        .collect::<Option<_>>()?;
    let mut newest: HashMap<Vec<Option<String>>, usize> = HashMap::new();
    for row in 0..batch.num_rows() {
        let key: Vec<Option<String>> = columns
            .iter()
            .map(|c| {
                c.is_valid(row)
                    .then(|| c.as_string::<i32>().value(row).to_string())
            })
            .collect();
        let e = newest.entry(key).or_insert(row);
        if times.value(row) >= times.value(*e) {
            *e = row;
        }
    }
    let mut rows: Vec<u64> = newest.into_values().map(|r| r as u64).collect();
    rows.sort_unstable();
    let idx = UInt64Array::from(rows);
    let columns = batch
        .columns()
        .iter()
        .map(|c| take(c, &idx, None))
        .collect::<Result<Vec<_>, _>>()
        .ok()?;
    RecordBatch::try_new(batch.schema(), columns).ok()
}

/// The identity values of each row (NULL as the empty string, as in labels).
fn identities(batch: &RecordBatch, identity: &[String]) -> Vec<BTreeMap<String, String>> {
    let columns: Vec<(String, ArrayRef)> = identity
        .iter()
        .filter_map(|c| {
            Some((
                c.clone(),
                cast(batch.column_by_name(c)?, &DataType::Utf8).ok()?,
            ))
        })
        .collect();
    (0..batch.num_rows())
        .map(|row| {
            columns
                .iter()
                .map(|(name, c)| {
                    let v = if c.is_valid(row) {
                        c.as_string::<i32>().value(row).to_string()
                    } else {
                        String::new()
                    };
                    (name.clone(), v)
                })
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use crate::testing::{at, readings, rule, Harness, DB, S, T0, TILTED_NOW};
    use crate::Clock;

    #[tokio::test]
    async fn a_matching_write_fires_and_the_next_reading_of_its_series_resolves() {
        let h = Harness::new().await;
        let mut spec = rule("tilted-now", TILTED_NOW, "0s", "0s");
        spec["every"] = "10m".into();
        let id = h.create(spec).await.unwrap();
        assert_eq!(h.engine.get(&id).unwrap()["fast_path"], true);
        let write = |device: &str, tilt: f64| {
            let t = h.clock.now_nanos();
            h.engine.on_write(
                DB,
                &[("manhole".to_string(), readings(&[(device, t, tilt)]))],
            );
        };

        h.engine.on_write(
            DB,
            &[(
                "manhole".to_string(),
                readings(&[("mh-1", T0, 19.5), ("mh-2", T0, 2.0)]),
            )],
        );
        h.engine.check_written().await;
        assert_eq!(
            h.states(),
            [("mh-1".to_string(), "firing".to_string(), at(0), Some(at(0)))]
        );

        // Another series' reading changes nothing; the same series' next one resolves.
        h.advance(1.0);
        write("mh-2", 3.0);
        h.engine.check_written().await;
        assert_eq!(h.states().len(), 1);
        h.advance(1.0);
        write("mh-1", 0.5);
        h.engine.check_written().await;
        assert!(h.states().is_empty());

        h.store_and_deliver();
        assert_eq!(
            h.told(),
            [
                ("firing".to_string(), "mh-1".to_string()),
                ("resolved".to_string(), "mh-1".to_string())
            ]
        );
        let bodies = h.notifier.accepted();
        assert_eq!(
            bodies[0]["alerts"][0]["annotations"]["summary"],
            "mh-1 tilted 19.5 degrees"
        );
        assert_eq!(bodies[1]["alerts"][0]["endsAt"], at(2));
        assert_eq!(
            h.engine.stats().fast_path_batches.load(Ordering::Relaxed),
            3
        );
        // Its scheduled evaluation only lets time pass: no query runs.
        h.engine.evaluate_now(&id).await;
        assert_eq!(h.queries.queries_run(), 0);
    }

    #[tokio::test]
    async fn only_the_newest_reading_of_a_series_says_whether_it_still_matches() {
        let h = Harness::new().await;
        let id = h
            .create(rule("tilted-now", TILTED_NOW, "0s", "0s"))
            .await
            .unwrap();
        // Cleared within the batch: fired by the old reading, resolved by the new.
        let batch = readings(&[
            ("mh-1", T0 + S, 1.0),
            ("mh-1", T0, 25.0),
            ("mh-2", T0, 30.0),
        ]);
        h.engine.on_write(DB, &[("manhole".to_string(), batch)]);
        h.engine.check_written().await;
        assert_eq!(
            h.states(),
            [("mh-2".to_string(), "firing".to_string(), at(0), Some(at(0)))]
        );
        let mut moves = h.moves();
        assert_eq!(moves.pop().as_deref(), Some("mh-1:firing->resolved"));
        moves.sort();
        assert_eq!(
            moves,
            [
                "mh-1:inactive->pending",
                "mh-1:pending->firing",
                "mh-2:inactive->pending",
                "mh-2:pending->firing",
            ]
        );
        assert!(h.engine.get(&id).is_some());
    }

    #[tokio::test]
    async fn writes_without_fast_path_rules_are_not_checked() {
        let h = Harness::new().await;
        h.create(rule("tilted-now", TILTED_NOW, "0s", "0s"))
            .await
            .unwrap();
        let batch = readings(&[("mh-1", T0, 25.0)]);
        h.engine
            .on_write("elsewhere", &[("manhole".to_string(), batch.clone())]);
        h.engine.on_write(DB, &[("parking".to_string(), batch)]);
        h.engine.check_written().await;
        assert_eq!(
            h.engine.stats().fast_path_batches.load(Ordering::Relaxed),
            0
        );
        assert!(h.states().is_empty());
    }
}
