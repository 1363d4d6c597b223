//! The alert-rule engine: departments register SQL rules; each row a rule returns
//! is an alert instance, pending, then firing, then resolved; firing and resolved
//! instances are posted to the rule's webhook and Alertmanager.
//!
//! 1. `rule.rs` — a rule and its checks. Registration also plans the SQL
//!    ([`QueryEngine::describe`]): a rule that does not plan is refused, not stored.
//! 2. Each rule has a task that evaluates it every `every` (`evaluate`); `rows.rs`
//!    turns the answer into instances, `state.rs` moves them through their states.
//! 3. A rule that is a plain filter on one table is instead checked against every
//!    written batch (`on_write`, the fast path), on a task of its own so a write's
//!    acknowledgement never waits for it: an instance is returned when a reading of
//!    its series matches, and no longer returned when the series' newest reading in
//!    a batch does not. Its task still runs every `every`, for `for` and
//!    `keep_firing_for`.
//! 4. `notify.rs` — changes worth telling become outbox entries, persisted with the
//!    instance states (`<data-dir>/alerts/state.json`) before they are sent; a
//!    delivery thread posts them and retries until they are accepted. State changes
//!    are appended to `<data-dir>/alerts/history.jsonl`.
//! 5. Rules live in `<data-dir>/alerts/rules.json`. Both files are replaced
//!    atomically (write, fsync, rename), so a restart finds rules, states (with
//!    their `active_at`) and the outbox as they were: a firing instance stays
//!    firing without a second "firing" message.

pub mod clock;
pub mod notifier;
pub mod notify;
pub mod queries;
pub mod rows;
pub mod rule;
pub mod state;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, Weak};
use std::time::Duration;

use citytsdb_query::system::{alert_events_schema, alerts_schema, rules_schema, AlertSource};
use citytsdb_query::{QueryEngine, QueryError};
use citytsdb_storage::files::write_atomically;
use citytsdb_storage::merge::align;
use citytsdb_storage::schema::TIME_COLUMN;
use citytsdb_storage::{paths, Engine};
use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, RecordBatch, StringArray, TimestampNanosecondArray, UInt64Array,
};
use datafusion::arrow::compute::{cast, take};
use datafusion::arrow::datatypes::{DataType, TimestampNanosecondType};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::notify::{Notification, Target};
use crate::rule::{Rule, RuleSpec, Timing};
use crate::state::{Change, RuleInstances, State};
use citytsdb_storage::units::{now_nanos, rfc3339};

/// State changes kept for `/api/v1/alerts/history` and `system.alert_events`.
const HISTORY: usize = 10_000;
/// Written batches waiting for the fast path; past this a batch is not checked
/// (and the miss is counted and logged), so writes never wait.
const FAST_PATH_QUEUE: usize = 65_536;
/// How often firing alerts are posted to an Alertmanager again, which forgets
/// alerts not heard of for its `resolve_timeout` (5 minutes by default).
const ALERTMANAGER_RESEND: Duration = Duration::from_secs(60);

/// Why a rule operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RuleError {
    /// The rule is invalid; nothing was stored.
    #[error("{0}")]
    Invalid(String),
    /// No rule has this id.
    #[error("no rule with id {0}")]
    NotFound(String),
    /// Storing the rules failed.
    #[error("{0}")]
    Internal(String),
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct AlertStats {
    /// Rule evaluations run.
    pub evaluations: AtomicU64,
    /// Rule evaluations that failed.
    pub evaluation_failures: AtomicU64,
    /// Notifications delivered.
    pub notifications_sent: AtomicU64,
    /// Notification attempts that failed (each is retried).
    pub notifications_failed: AtomicU64,
    /// Written batches the fast path checked.
    pub fast_path_batches: AtomicU64,
    /// Written batches the fast path had no room for.
    pub fast_path_dropped: AtomicU64,
}

struct Entry {
    rule: Rule,
    timing: Timing,
    /// The table a fast-path rule filters.
    fast_table: Option<String>,
    /// The answer's identity columns.
    identity: Vec<String>,
    last_error: Option<String>,
    last_evaluation: Option<i64>,
}

/// One state change as the history keeps it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Event {
    time: i64,
    rule_id: String,
    rule_name: String,
    department: String,
    db: String,
    fingerprint: String,
    from: String,
    to: String,
    labels: BTreeMap<String, String>,
}

/// What `state.json` holds.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Persisted {
    instances: BTreeMap<String, RuleInstances>,
    outbox: BTreeMap<u64, Notification>,
    next_id: u64,
}

#[derive(Default)]
struct Inner {
    rules: BTreeMap<String, Entry>,
    state: Persisted,
    /// The newest state changes; also appended to `history.jsonl`.
    history: VecDeque<Event>,
    /// Lines in `history.jsonl`; past twice [`HISTORY`] it is rewritten.
    history_lines: usize,
    last_resend: HashMap<String, i64>,
}

struct Shared {
    data_dir: PathBuf,
    query: QueryEngine,
    storage: Engine,
    inner: Mutex<Inner>,
    /// Wakes the delivery thread; paired with `inner`.
    outbox_wake: Condvar,
    tasks: Mutex<HashMap<String, tokio::task::JoinHandle<()>>>,
    fast_tx: mpsc::Sender<(String, Vec<(String, RecordBatch)>)>,
    /// Databases with at least one fast-path rule, so writes elsewhere skip the queue.
    fast_dbs: Mutex<BTreeSet<String>>,
    stopping: AtomicBool,
    stats: AlertStats,
    next_rule: AtomicU64,
}

/// The alert engine. Cheap to clone.
#[derive(Clone)]
pub struct AlertEngine {
    shared: Arc<Shared>,
}

/// The alert tables of the `system` schema, served from a running [`AlertEngine`]
/// (empty until one is attached).
#[derive(Default)]
pub struct AlertTables {
    engine: OnceLock<Weak<Shared>>,
}

impl std::fmt::Debug for AlertTables {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlertTables").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn read_json<T: for<'de> Deserialize<'de> + Default>(path: &Path) -> Result<T, RuleError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map_err(|e| RuleError::Internal(format!("{} is not readable: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
        Err(e) => Err(RuleError::Internal(format!(
            "reading {}: {e}",
            path.display()
        ))),
    }
}

impl Shared {
    fn rules_path(&self) -> PathBuf {
        paths::alert_rules_file(&self.data_dir)
    }

    fn state_path(&self) -> PathBuf {
        paths::alert_state_file(&self.data_dir)
    }

    /// Stores the rule list `rules`, which becomes the registered set.
    fn store_rules(&self, rules: &[&Rule]) -> Result<(), RuleError> {
        let bytes =
            serde_json::to_vec_pretty(rules).map_err(|e| RuleError::Internal(e.to_string()))?;
        write_atomically(&self.rules_path(), &bytes)
            .map_err(|e| RuleError::Internal(format!("storing the rules: {e}")))
    }

    fn history_path(&self) -> PathBuf {
        paths::alert_history_file(&self.data_dir)
    }

    /// Appends changes to `history.jsonl` (not fsynced: the history informs, the
    /// states and the outbox are what must survive), rewriting it with only the
    /// kept changes once it has grown to twice their number.
    fn append_history(&self, inner: &mut Inner, lines: &str, count: usize) {
        let result = if inner.history_lines + count > 2 * HISTORY {
            let mut all = String::new();
            for e in &inner.history {
                if let Ok(line) = serde_json::to_string(e) {
                    all.push_str(&line);
                    all.push('\n');
                }
            }
            inner.history_lines = inner.history.len();
            write_atomically(&self.history_path(), all.as_bytes())
        } else {
            inner.history_lines += count;
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.history_path())
                .and_then(|mut f| f.write_all(lines.as_bytes()))
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, "cannot append to the alert history file");
        }
    }

    fn save_state(&self, inner: &Inner) {
        let result = serde_json::to_vec(&inner.state)
            .map_err(|e| e.to_string())
            .and_then(|b| write_atomically(&self.state_path(), &b).map_err(|e| e.to_string()));
        if let Err(e) = result {
            tracing::error!(error = %e, "cannot store the alert states and outbox; they are kept in memory and stored with the next change");
        }
    }

    /// Records changes, queues their notifications, stores the state, and wakes
    /// the delivery thread. Called with the lock held.
    fn apply(&self, inner: &mut Inner, rule_id: &str, changes: Vec<Change>) {
        if changes.is_empty() {
            return;
        }
        let Some(entry) = inner.rules.get(rule_id) else {
            return;
        };
        let rule = entry.rule.clone();
        let mut lines = String::new();
        for c in &changes {
            tracing::info!(rule = %rule.spec.name, fingerprint = %c.instance.fingerprint, from = %c.from, to = %c.to, "alert state changed");
            let event = Event {
                time: c.time,
                rule_id: rule.id.clone(),
                rule_name: rule.spec.name.clone(),
                department: rule.spec.department.clone(),
                db: rule.spec.db.clone(),
                fingerprint: c.instance.fingerprint.clone(),
                from: c.from.clone(),
                to: c.to.clone(),
                labels: c.instance.labels.clone(),
            };
            if let Ok(line) = serde_json::to_string(&event) {
                lines.push_str(&line);
                lines.push('\n');
            }
            inner.history.push_back(event);
        }
        while inner.history.len() > HISTORY {
            inner.history.pop_front();
        }
        self.append_history(inner, &lines, changes.len());
        let now = now_nanos();
        for (target, body) in notify::messages(&rule, &changes) {
            self.enqueue(inner, &rule.id, target, body, now);
        }
        self.save_state(inner);
        self.outbox_wake.notify_all();
    }

    fn enqueue(&self, inner: &mut Inner, rule_id: &str, target: Target, body: Value, now: i64) {
        let id = inner.state.next_id;
        inner.state.next_id += 1;
        inner.state.outbox.insert(
            id,
            Notification {
                id,
                rule_id: rule_id.to_string(),
                target,
                body,
                attempts: 0,
                next_attempt: now,
                last_error: None,
            },
        );
    }

    /// Evaluates one rule now.
    async fn evaluate(&self, rule_id: &str) {
        let (rule, timing, fast) = {
            let inner = lock(&self.inner);
            let Some(e) = inner.rules.get(rule_id) else {
                return;
            };
            (e.rule.clone(), e.timing, e.fast_table.is_some())
        };
        self.stats.evaluations.fetch_add(1, Ordering::Relaxed);
        let answer = if fast {
            None
        } else {
            match self.query.query(&rule.spec.db, &rule.spec.sql).await {
                Ok(out) => Some(rows::observations(&rule, &out.batches)),
                Err(e) => {
                    self.stats
                        .evaluation_failures
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(rule = %rule.spec.name, error = %e, "rule evaluation failed; instance states are kept");
                    let mut inner = lock(&self.inner);
                    if let Some(entry) = inner.rules.get_mut(rule_id) {
                        entry.last_error = Some(e.to_string());
                        entry.last_evaluation = Some(now_nanos());
                    }
                    return;
                }
            }
        };
        let now = now_nanos();
        let mut inner = lock(&self.inner);
        let Some(entry) = inner.rules.get_mut(rule_id) else {
            return;
        };
        if entry.rule != rule {
            return; // Replaced while the query ran.
        }
        entry.last_error = None;
        entry.last_evaluation = Some(now);
        let mut changes = Vec::new();
        let instances = inner
            .state
            .instances
            .entry(rule_id.to_string())
            .or_default();
        match answer {
            Some(returned) => instances.evaluate(rule_id, &timing, now, returned, &mut changes),
            None => instances.tick(&timing, now, &mut changes),
        }
        self.resend_to_alertmanager(&mut inner, &rule, now);
        self.apply(&mut inner, rule_id, changes);
    }

    fn resend_to_alertmanager(&self, inner: &mut Inner, rule: &Rule, now: i64) {
        let Some(url) = &rule.spec.alertmanager else {
            return;
        };
        let last = inner.last_resend.get(&rule.id).copied().unwrap_or(now);
        inner.last_resend.insert(rule.id.clone(), last);
        if now - last < ALERTMANAGER_RESEND.as_nanos() as i64 {
            return;
        }
        inner.last_resend.insert(rule.id.clone(), now);
        let firing: Vec<Value> = inner
            .state
            .instances
            .get(&rule.id)
            .map(|r| {
                r.active
                    .values()
                    .filter(|i| i.state == State::Firing)
                    .map(|i| notify::alertmanager_alert(i, None))
                    .collect()
            })
            .unwrap_or_default();
        if !firing.is_empty() {
            self.enqueue(
                inner,
                &rule.id,
                Target::Alertmanager(url.clone()),
                Value::Array(firing),
                now,
            );
            self.save_state(inner);
            self.outbox_wake.notify_all();
        }
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
            let Some(schema) = self
                .storage
                .snapshot(db)
                .and_then(|s| s.schemas.get(&table).cloned())
            else {
                continue;
            };
            let batch = match align(&batch, &schema.arrow_schema()) {
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
        let matched = match self.query.query_batch(table, batch.clone(), sql).await {
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
                match self.query.query_batch(table, latest.clone(), sql).await {
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
        let now = now_nanos();
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

    /// The delivery loop: posts due outbox entries until the engine stops.
    fn deliver(self: Arc<Self>) {
        let agent = notify::agent();
        loop {
            let due = {
                let mut inner = lock(&self.inner);
                loop {
                    if self.stopping.load(Ordering::SeqCst) {
                        return;
                    }
                    let now = now_nanos();
                    // In order per target: only the oldest entry of each target may go.
                    let mut heads: BTreeMap<&Target, &Notification> = BTreeMap::new();
                    for n in inner.state.outbox.values() {
                        heads.entry(&n.target).or_insert(n);
                    }
                    let due: Vec<Notification> = heads
                        .values()
                        .filter(|n| n.next_attempt <= now)
                        .map(|n| (*n).clone())
                        .collect();
                    if !due.is_empty() {
                        break due;
                    }
                    let wait = heads
                        .values()
                        .map(|n| Duration::from_nanos((n.next_attempt - now).max(0) as u64))
                        .min()
                        .unwrap_or(Duration::from_secs(1))
                        .min(Duration::from_secs(1));
                    inner = self
                        .outbox_wake
                        .wait_timeout(inner, wait)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            };
            for n in due {
                let result = notify::post(&agent, &n.target, &n.body);
                let mut inner = lock(&self.inner);
                match result {
                    Ok(()) => {
                        self.stats
                            .notifications_sent
                            .fetch_add(1, Ordering::Relaxed);
                        inner.state.outbox.remove(&n.id);
                    }
                    Err(e) => {
                        self.stats
                            .notifications_failed
                            .fetch_add(1, Ordering::Relaxed);
                        if let Some(entry) = inner.state.outbox.get_mut(&n.id) {
                            entry.attempts += 1;
                            entry.next_attempt =
                                now_nanos() + notify::backoff(entry.attempts).as_nanos() as i64;
                            tracing::warn!(target = %n.target.post_url(), attempts = entry.attempts, error = %e, "notification not delivered; will retry");
                            entry.last_error = Some(e);
                        }
                    }
                }
                self.save_state(&inner);
            }
        }
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

fn query_error(e: QueryError) -> RuleError {
    match e {
        QueryError::DatabaseNotFound(db) => RuleError::Invalid(format!(
            "sql: database {db} does not exist yet; rules are planned against its tables, so write to it first"
        )),
        QueryError::Invalid {
            message,
            position: Some(p),
        } => RuleError::Invalid(format!(
            "sql: {message} (line {}, column {})",
            p.line, p.column
        )),
        other => RuleError::Invalid(format!("sql: {other}")),
    }
}

/// A rule as the API shows it.
fn rule_json(e: &Entry, active: Option<&RuleInstances>) -> Value {
    let mut v = serde_json::to_value(&e.rule).unwrap_or(Value::Null);
    let count = |s: State| active.map_or(0, |a| a.active.values().filter(|i| i.state == s).count());
    v["last_error"] = e.last_error.clone().map_or(Value::Null, Value::from);
    v["last_evaluation"] = e
        .last_evaluation
        .map_or(Value::Null, |t| Value::from(rfc3339(i128::from(t))));
    v["pending"] = Value::from(count(State::Pending));
    v["firing"] = Value::from(count(State::Firing));
    v
}

impl AlertEngine {
    /// Opens the engine over `<data_dir>/alerts`: loads rules, states and the
    /// outbox, starts every rule's task, the fast path and the delivery thread.
    /// `tables` starts serving the alert system tables.
    pub async fn open(
        data_dir: &Path,
        query: QueryEngine,
        storage: Engine,
        tables: &AlertTables,
    ) -> Result<Self, RuleError> {
        let dir = paths::alerts_dir(data_dir);
        std::fs::create_dir_all(&dir)
            .map_err(|e| RuleError::Internal(format!("creating {}: {e}", dir.display())))?;
        let rules: Vec<Rule> = read_json(&paths::alert_rules_file(data_dir))?;
        let state: Persisted = read_json(&paths::alert_state_file(data_dir))?;
        let mut history: VecDeque<Event> = VecDeque::new();
        let mut history_lines = 0;
        if let Ok(text) = std::fs::read_to_string(paths::alert_history_file(data_dir)) {
            for line in text.lines() {
                history_lines += 1;
                // A torn last line (a crash mid-append) is skipped.
                if let Ok(e) = serde_json::from_str::<Event>(line) {
                    history.push_back(e);
                    if history.len() > HISTORY {
                        history.pop_front();
                    }
                }
            }
        }
        let (fast_tx, fast_rx) = mpsc::channel(FAST_PATH_QUEUE);
        let shared = Arc::new(Shared {
            data_dir: data_dir.to_path_buf(),
            query,
            storage,
            inner: Mutex::new(Inner {
                state,
                history,
                history_lines,
                ..Default::default()
            }),
            outbox_wake: Condvar::new(),
            tasks: Mutex::new(HashMap::new()),
            fast_tx,
            fast_dbs: Mutex::new(BTreeSet::new()),
            stopping: AtomicBool::new(false),
            stats: AlertStats::default(),
            next_rule: AtomicU64::new(0),
        });
        let engine = Self { shared };
        for rule in rules {
            let timing = rule.spec.check().map_err(|e| {
                RuleError::Internal(format!("stored rule {} is invalid: {e}", rule.id))
            })?;
            // Planned again when its database is there; until then it is evaluated
            // as a query (and fails, visibly, in last_error).
            let described = match engine
                .shared
                .query
                .describe(&rule.spec.db, &rule.spec.sql)
                .await
            {
                Ok(d) => Some(d),
                Err(e) => {
                    tracing::warn!(rule = %rule.spec.name, error = %e, "a stored rule does not plan now; it is evaluated on its schedule and its errors show in last_error");
                    None
                }
            };
            let entry = Entry {
                fast_table: described.as_ref().and_then(|d| d.filter_table.clone()),
                identity: described
                    .as_ref()
                    .map(|d| rows::identity_columns(&d.schema))
                    .unwrap_or_default(),
                timing,
                rule,
                last_error: None,
                last_evaluation: None,
            };
            engine.install(entry);
        }
        {
            let inner = lock(&engine.shared.inner);
            let known: BTreeSet<&String> = inner.rules.keys().collect();
            let orphans = inner
                .state
                .instances
                .keys()
                .filter(|k| !known.contains(k))
                .count();
            if orphans > 0 {
                tracing::warn!(
                    orphans,
                    "alert states of rules that no longer exist are ignored"
                );
            }
        }
        let delivery = engine.shared.clone();
        std::thread::Builder::new()
            .name("citytsdb-notify".into())
            .spawn(move || delivery.deliver())
            .map_err(|e| RuleError::Internal(format!("starting the notification thread: {e}")))?;
        let fast = Arc::downgrade(&engine.shared);
        tokio::spawn(fast_path(fast, fast_rx));
        let _ = tables.engine.set(Arc::downgrade(&engine.shared));
        Ok(engine)
    }

    /// Counters for `/metrics`.
    pub fn stats(&self) -> &AlertStats {
        &self.shared.stats
    }

    fn install(&self, entry: Entry) {
        let id = entry.rule.id.clone();
        let every = entry.timing.every;
        if entry.fast_table.is_some() {
            lock(&self.shared.fast_dbs).insert(entry.rule.spec.db.clone());
        }
        lock(&self.shared.inner).rules.insert(id.clone(), entry);
        let shared = Arc::downgrade(&self.shared);
        let rule_id = id.clone();
        let task = tokio::spawn(async move {
            let mut interval = tokio::time::interval(every);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                interval.tick().await;
                let Some(shared) = shared.upgrade() else {
                    return;
                };
                if shared.stopping.load(Ordering::SeqCst) {
                    return;
                }
                shared.evaluate(&rule_id).await;
            }
        });
        if let Some(old) = lock(&self.shared.tasks).insert(id, task) {
            old.abort();
        }
    }

    async fn prepare(&self, id: String, spec: RuleSpec) -> Result<Entry, RuleError> {
        let timing = spec.check().map_err(RuleError::Invalid)?;
        let described = self
            .shared
            .query
            .describe(&spec.db, &spec.sql)
            .await
            .map_err(query_error)?;
        let columns: BTreeSet<String> = described
            .schema
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        for (kind, map) in [("labels", &spec.labels), ("annotations", &spec.annotations)] {
            for (key, template) in map {
                for name in rows::references(template) {
                    if !columns.contains(&name) {
                        return Err(RuleError::Invalid(format!(
                            "{kind}.{key} uses {{{{{name}}}}}, which the query does not return (its columns: {})",
                            columns.iter().cloned().collect::<Vec<_>>().join(", ")
                        )));
                    }
                }
            }
        }
        let fast_table = described.filter_table.clone();
        let rule = Rule {
            id,
            spec,
            fast_path: fast_table.is_some(),
            updated_at: rfc3339(i128::from(now_nanos())),
        };
        Ok(Entry {
            identity: rows::identity_columns(&described.schema),
            fast_table,
            timing,
            rule,
            last_error: None,
            last_evaluation: None,
        })
    }

    fn new_id(&self) -> String {
        let n = self.shared.next_rule.fetch_add(1, Ordering::SeqCst);
        let t = now_nanos() as u64;
        format!(
            "{:016x}",
            t.rotate_left(17) ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15)
        )
    }

    /// Registers a rule: checked and planned, stored, and evaluated from now on.
    pub async fn create(&self, spec: RuleSpec) -> Result<Value, RuleError> {
        let entry = self.prepare(self.new_id(), spec).await?;
        let id = entry.rule.id.clone();
        {
            let mut inner = lock(&self.shared.inner);
            let mut staged: Vec<&Rule> = inner.rules.values().map(|e| &e.rule).collect();
            staged.push(&entry.rule);
            self.shared.store_rules(&staged)?;
            inner.state.instances.entry(id.clone()).or_default();
        }
        self.install(entry);
        self.get(&id).ok_or(RuleError::NotFound(id))
    }

    /// Replaces a rule's definition. Instances are kept when the SQL is the same;
    /// otherwise firing ones are resolved (and told) and the rest dropped.
    pub async fn replace(&self, id: &str, spec: RuleSpec) -> Result<Value, RuleError> {
        if !lock(&self.shared.inner).rules.contains_key(id) {
            return Err(RuleError::NotFound(id.to_string()));
        }
        let entry = self.prepare(id.to_string(), spec).await?;
        {
            let mut inner = lock(&self.shared.inner);
            let Some(old) = inner.rules.get(id) else {
                return Err(RuleError::NotFound(id.to_string()));
            };
            let same_sql =
                old.rule.spec.sql == entry.rule.spec.sql && old.rule.spec.db == entry.rule.spec.db;
            let old_rule = old.rule.clone();
            let mut staged: Vec<&Rule> = inner
                .rules
                .values()
                .filter(|e| e.rule.id != id)
                .map(|e| &e.rule)
                .collect();
            staged.push(&entry.rule);
            self.shared.store_rules(&staged)?;
            if !same_sql {
                self.resolve_all(&mut inner, &old_rule);
            }
        }
        self.install(entry);
        self.get(id)
            .ok_or_else(|| RuleError::NotFound(id.to_string()))
    }

    /// Ends every instance of a rule being removed or redefined: firing ones are
    /// resolved and told.
    fn resolve_all(&self, inner: &mut Inner, rule: &Rule) {
        let now = now_nanos();
        let instances = inner.state.instances.remove(&rule.id).unwrap_or_default();
        let changes: Vec<Change> = instances
            .active
            .into_values()
            .map(|i| Change {
                time: now,
                from: i.state.name().into(),
                to: if i.state == State::Firing {
                    "resolved"
                } else {
                    "inactive"
                }
                .into(),
                instance: i,
            })
            .collect();
        self.shared.apply(inner, &rule.id, changes);
    }

    /// Deletes a rule; its firing instances are resolved and told.
    pub fn delete(&self, id: &str) -> Result<(), RuleError> {
        let mut inner = lock(&self.shared.inner);
        let Some(entry) = inner.rules.get(id) else {
            return Err(RuleError::NotFound(id.to_string()));
        };
        let rule = entry.rule.clone();
        let staged: Vec<&Rule> = inner
            .rules
            .values()
            .filter(|e| e.rule.id != id)
            .map(|e| &e.rule)
            .collect();
        self.shared.store_rules(&staged)?;
        self.resolve_all(&mut inner, &rule);
        inner.rules.remove(id);
        self.shared.save_state(&inner);
        drop(inner);
        if let Some(task) = lock(&self.shared.tasks).remove(id) {
            task.abort();
        }
        Ok(())
    }

    /// One rule, as the API shows it.
    pub fn get(&self, id: &str) -> Option<Value> {
        let inner = lock(&self.shared.inner);
        let e = inner.rules.get(id)?;
        Some(rule_json(e, inner.state.instances.get(id)))
    }

    /// Every rule (of `department`, if given).
    pub fn list(&self, department: Option<&str>) -> Vec<Value> {
        let inner = lock(&self.shared.inner);
        inner
            .rules
            .values()
            .filter(|e| department.is_none_or(|d| e.rule.spec.department == d))
            .map(|e| rule_json(e, inner.state.instances.get(&e.rule.id)))
            .collect()
    }

    /// The department owning a rule.
    pub fn department_of(&self, id: &str) -> Option<String> {
        lock(&self.shared.inner)
            .rules
            .get(id)
            .map(|e| e.rule.spec.department.clone())
    }

    /// Active instances, filtered by state, department and rule (id or name).
    pub fn alerts(
        &self,
        state: Option<&str>,
        department: Option<&str>,
        rule: Option<&str>,
    ) -> Vec<Value> {
        let inner = lock(&self.shared.inner);
        let mut out = Vec::new();
        for (rule_id, instances) in &inner.state.instances {
            let Some(e) = inner.rules.get(rule_id) else {
                continue;
            };
            let spec = &e.rule.spec;
            if department.is_some_and(|d| spec.department != d)
                || rule.is_some_and(|r| r != rule_id && r != spec.name)
            {
                continue;
            }
            for i in instances.active.values() {
                if state.is_some_and(|s| s != i.state.name()) {
                    continue;
                }
                out.push(json!({
                    "rule_id": rule_id,
                    "rule": spec.name,
                    "department": spec.department,
                    "db": spec.db,
                    "state": i.state.name(),
                    "fingerprint": i.fingerprint,
                    "labels": i.labels,
                    "annotations": i.annotations,
                    "values": i.values,
                    "active_at": rfc3339(i128::from(i.active_at)),
                    "fired_at": i.fired_at.map(|t| rfc3339(i128::from(t))),
                    "last_seen": rfc3339(i128::from(i.last_seen)),
                }));
            }
        }
        out
    }

    /// State changes between `since` and `until` (Unix nanoseconds), oldest first.
    pub fn history(
        &self,
        since: Option<i64>,
        until: Option<i64>,
        department: Option<&str>,
    ) -> Vec<Value> {
        let inner = lock(&self.shared.inner);
        inner
            .history
            .iter()
            .filter(|e| since.is_none_or(|s| e.time >= s) && until.is_none_or(|u| e.time <= u))
            .filter(|e| department.is_none_or(|d| e.department == d))
            .map(|e| {
                json!({
                    "time": rfc3339(i128::from(e.time)),
                    "rule_id": e.rule_id,
                    "rule": e.rule_name,
                    "department": e.department,
                    "fingerprint": e.fingerprint,
                    "from": e.from,
                    "to": e.to,
                    "labels": e.labels,
                })
            })
            .collect()
    }

    /// Hands written batches to the fast path; never waits.
    pub fn on_write(&self, db: &str, tables: &[(String, RecordBatch)]) {
        if !lock(&self.shared.fast_dbs).contains(db) {
            return;
        }
        if self
            .shared
            .fast_tx
            .try_send((db.to_string(), tables.to_vec()))
            .is_err()
        {
            self.shared
                .stats
                .fast_path_dropped
                .fetch_add(1, Ordering::Relaxed);
            tracing::error!(
                db,
                "the alert fast path is behind; a written batch was not checked against its rules"
            );
        }
    }

    /// Stops the tasks and stores the state.
    pub fn shutdown(&self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        for (_, t) in lock(&self.shared.tasks).drain() {
            t.abort();
        }
        let inner = lock(&self.shared.inner);
        self.shared.save_state(&inner);
        self.shared.outbox_wake.notify_all();
    }
}

async fn fast_path(
    shared: Weak<Shared>,
    mut rx: mpsc::Receiver<(String, Vec<(String, RecordBatch)>)>,
) {
    while let Some((db, tables)) = rx.recv().await {
        let Some(shared) = shared.upgrade() else {
            return;
        };
        shared.check_batches(&db, tables).await;
    }
}

impl AlertTables {
    fn shared(&self) -> Option<Arc<Shared>> {
        self.engine.get()?.upgrade()
    }
}

fn strings<I: IntoIterator<Item = Option<String>>>(values: I) -> ArrayRef {
    std::sync::Arc::new(StringArray::from_iter(values))
}

fn times<I: IntoIterator<Item = Option<i64>>>(values: I) -> ArrayRef {
    std::sync::Arc::new(TimestampNanosecondArray::from_iter(values).with_timezone("UTC"))
}

fn json_text<T: Serialize>(v: &T) -> Option<String> {
    serde_json::to_string(v).ok()
}

type DfResult<T> = datafusion::common::Result<T>;

impl AlertSource for AlertTables {
    fn rules(&self, db: &str) -> DfResult<RecordBatch> {
        let Some(shared) = self.shared() else {
            return Ok(RecordBatch::new_empty(rules_schema()));
        };
        let inner = lock(&shared.inner);
        let rules: Vec<&Rule> = inner
            .rules
            .values()
            .map(|e| &e.rule)
            .filter(|r| r.spec.db == db)
            .collect();
        let col = |f: &dyn Fn(&Rule) -> Option<String>| strings(rules.iter().map(|r| f(r)));
        Ok(RecordBatch::try_new(
            rules_schema(),
            vec![
                col(&|r| Some(r.id.clone())),
                col(&|r| Some(r.spec.name.clone())),
                col(&|r| Some(r.spec.department.clone())),
                col(&|r| Some(r.spec.db.clone())),
                col(&|r| Some(r.spec.sql.clone())),
                col(&|r| Some(r.spec.every.clone())),
                col(&|r| Some(r.spec.for_.clone())),
                col(&|r| Some(r.spec.keep_firing_for.clone())),
                col(&|r| Some(r.spec.severity.clone())),
                col(&|r| json_text(&r.spec.labels)),
                col(&|r| json_text(&r.spec.annotations)),
                col(&|r| r.spec.webhook.clone()),
            ],
        )?)
    }

    fn alerts(&self, db: &str) -> DfResult<RecordBatch> {
        let Some(shared) = self.shared() else {
            return Ok(RecordBatch::new_empty(alerts_schema()));
        };
        let inner = lock(&shared.inner);
        let mut rows = Vec::new();
        for (rule_id, instances) in &inner.state.instances {
            let Some(e) = inner.rules.get(rule_id) else {
                continue;
            };
            if e.rule.spec.db != db {
                continue;
            }
            for i in instances.active.values() {
                rows.push((&e.rule, i));
            }
        }
        Ok(RecordBatch::try_new(
            alerts_schema(),
            vec![
                strings(rows.iter().map(|(r, _)| Some(r.id.clone()))),
                strings(rows.iter().map(|(r, _)| Some(r.spec.name.clone()))),
                strings(rows.iter().map(|(r, _)| Some(r.spec.department.clone()))),
                strings(rows.iter().map(|(_, i)| Some(i.fingerprint.clone()))),
                strings(rows.iter().map(|(_, i)| Some(i.state.name().to_string()))),
                strings(rows.iter().map(|(_, i)| json_text(&i.labels))),
                strings(rows.iter().map(|(_, i)| json_text(&i.annotations))),
                times(rows.iter().map(|(_, i)| Some(i.active_at))),
                times(rows.iter().map(|(_, i)| i.fired_at)),
            ],
        )?)
    }

    fn alert_events(&self, db: &str) -> DfResult<RecordBatch> {
        let Some(shared) = self.shared() else {
            return Ok(RecordBatch::new_empty(alert_events_schema()));
        };
        let inner = lock(&shared.inner);
        let events: Vec<&Event> = inner.history.iter().filter(|e| e.db == db).collect();
        let col = |f: &dyn Fn(&Event) -> Option<String>| strings(events.iter().map(|e| f(e)));
        Ok(RecordBatch::try_new(
            alert_events_schema(),
            vec![
                times(events.iter().map(|e| Some(e.time))),
                col(&|e| Some(e.rule_id.clone())),
                col(&|e| Some(e.rule_name.clone())),
                col(&|e| Some(e.department.clone())),
                col(&|e| Some(e.fingerprint.clone())),
                col(&|e| Some(e.from.clone())),
                col(&|e| Some(e.to.clone())),
                col(&|e| json_text(&e.labels)),
            ],
        )?)
    }
}
