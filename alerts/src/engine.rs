//! The [`AlertEngine`]: what it holds, how it opens and stops, and how rules are
//! registered, replaced and deleted. Its other jobs each have a file:
//! `schedule.rs`, `fast_path.rs`, `store.rs`, `delivery.rs` and `views.rs`.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use citytsdb_query::QueryEngine;
use citytsdb_storage::units::rfc3339;
use citytsdb_storage::Engine;
use datafusion::arrow::array::RecordBatch;
use serde_json::Value;

use crate::clock::{Clock, SystemClock};
use crate::error::RuleError;
use crate::fast_path::FastPath;
use crate::notifier::{HttpNotifier, Notifier};
use crate::notify::Notification;
use crate::outbox::Outbox;
use crate::queries::{EngineQueries, RuleQueries};
use crate::rule::{Rule, RuleSpec, Timing};
use crate::schedule::Schedule;
use crate::state::{Change, State};
use crate::store::{Event, Files, History, Persisted, Unsaved};
use crate::views::AlertTables;
use crate::{delivery, fast_path, notify, rows, store};

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
    /// Notifications dropped, never delivered, to make room in a full outbox.
    pub notifications_dropped: AtomicU64,
    /// Written batches the fast path checked.
    pub fast_path_batches: AtomicU64,
    /// Written batches the fast path had no room for.
    pub fast_path_dropped: AtomicU64,
}

/// What the engine talks to: the data, time, and the receivers of notifications.
pub struct Seams {
    /// Plans and runs rule SQL.
    pub queries: Arc<dyn RuleQueries>,
    /// Dates changes and notifications.
    pub clock: Arc<dyn Clock>,
    /// Posts notifications.
    pub notifier: Arc<dyn Notifier>,
}

impl Seams {
    /// The server's: its query and storage engines, the system clock, HTTP.
    pub fn real(query: QueryEngine, storage: Engine) -> Self {
        Self {
            queries: Arc::new(EngineQueries::new(query, storage)),
            clock: Arc::new(SystemClock),
            notifier: Arc::new(HttpNotifier::new()),
        }
    }
}

/// Who moves the engine along.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driver {
    /// Its own tasks and threads: a task per rule, the fast-path task, the store
    /// thread and the delivery thread.
    Background,
    /// The caller, one step at a time: [`AlertEngine::evaluate_now`],
    /// [`AlertEngine::check_written`], [`AlertEngine::store_now`] and
    /// [`AlertEngine::deliver_due`]. Nothing happens between calls.
    Caller,
}

/// A registered rule with what planning learned and how its evaluations went.
pub(crate) struct Entry {
    pub rule: Rule,
    pub timing: Timing,
    /// The table a fast-path rule filters.
    pub fast_table: Option<String>,
    /// The answer's identity columns.
    pub identity: Vec<String>,
    pub last_error: Option<String>,
    pub last_evaluation: Option<i64>,
}

/// Everything behind the engine's lock.
pub(crate) struct Inner {
    pub rules: BTreeMap<String, Entry>,
    pub state: Persisted,
    /// Notifications not yet accepted.
    pub outbox: Outbox,
    pub history: History,
    pub unsaved: Unsaved,
    /// When each rule last posted its firing alerts to its Alertmanager again.
    pub last_resend: HashMap<String, i64>,
}

/// The engine's state, shared by its handles, tasks and threads.
pub(crate) struct Shared {
    pub files: Files,
    pub queries: Arc<dyn RuleQueries>,
    pub clock: Arc<dyn Clock>,
    pub notifier: Arc<dyn Notifier>,
    /// Held only for memory work, never across a disk write or a post.
    pub inner: Mutex<Inner>,
    /// Wakes the store thread; paired with `inner`.
    pub store_wake: Condvar,
    /// Wakes the delivery thread; paired with `inner`.
    pub outbox_wake: Condvar,
    /// Held while `outbox.jsonl`, `state.json` and `history.jsonl` are written.
    pub store_writer: Mutex<()>,
    /// Held by create, replace and delete from start to end, so `rules.json` is
    /// written in the order rules change.
    rule_changes: tokio::sync::Mutex<()>,
    pub schedule: Schedule,
    pub fast: FastPath,
    pub stopping: AtomicBool,
    pub stats: AlertStats,
    pub driver: Driver,
    next_rule: AtomicU64,
}

/// Locks `m`, going on after a panic elsewhere poisoned it: the engine keeps
/// serving rather than failing every later call.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    /// The states changed: the store thread has work.
    pub(crate) fn mark_changed(&self, inner: &mut Inner) {
        inner.unsaved.change();
        self.store_wake.notify_all();
    }

    /// Only the outbox changed (the store thread appends its records); counts and
    /// logs the notifications `dropped` to make room.
    pub(crate) fn outbox_changed(&self, dropped: Vec<Notification>) {
        for n in &dropped {
            tracing::warn!(id = n.id, rule = %n.rule_id, target = %n.target.post_url(), attempts = n.attempts, "the alert outbox is full: the notification dropped to make room will never be delivered");
        }
        self.stats
            .notifications_dropped
            .fetch_add(dropped.len() as u64, Ordering::Relaxed);
        self.store_wake.notify_all();
    }

    /// Records one rule's changes: the history, the notifications they call for,
    /// and a wake for the store thread. Called with the lock held.
    pub(crate) fn apply(&self, inner: &mut Inner, rule_id: &str, changes: Vec<Change>) {
        if changes.is_empty() {
            return;
        }
        let Some(entry) = inner.rules.get(rule_id) else {
            return;
        };
        let rule = entry.rule.clone();
        for c in &changes {
            tracing::info!(rule = %rule.spec.name, fingerprint = %c.instance.fingerprint, from = %c.from, to = %c.to, "alert state changed");
            inner.history.push(Event::of(&rule, c));
        }
        let now = self.clock.now_nanos();
        let firing: Vec<String> = changes
            .iter()
            .filter(|c| c.to == "firing")
            .map(|c| c.instance.fingerprint.clone())
            .collect();
        for (target, body) in notify::messages(&rule, &changes) {
            let dropped = inner
                .outbox
                .enqueue(&rule.id, target, body, firing.clone(), false, now);
            self.outbox_changed(dropped);
        }
        self.mark_changed(inner);
    }

    /// Ends every instance of a rule being removed or redefined: firing ones are
    /// resolved and told, pending ones dropped.
    fn resolve_all(&self, inner: &mut Inner, rule: &Rule) {
        let now = self.clock.now_nanos();
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
        self.apply(inner, &rule.id, changes);
    }
}

/// The alert engine. Cheap to clone.
#[derive(Clone)]
pub struct AlertEngine {
    pub(crate) shared: Arc<Shared>,
}

impl AlertEngine {
    /// Opens the server's engine over `<data_dir>/alerts` with the real seams
    /// ([`Seams::real`]), running in the background, its outbox holding at most
    /// `outbox_limit` notifications ([`crate::OUTBOX_LIMIT`] by default). `tables`
    /// starts serving the alert system tables.
    pub async fn open(
        data_dir: &Path,
        query: QueryEngine,
        storage: Engine,
        outbox_limit: usize,
        tables: &AlertTables,
    ) -> Result<Self, RuleError> {
        Self::open_with(
            data_dir,
            Seams::real(query, storage),
            Driver::Background,
            outbox_limit,
            tables,
        )
        .await
    }

    /// Opens the engine over `<data_dir>/alerts`: loads rules, states and the
    /// outbox, plans the rules again, and with [`Driver::Background`] starts
    /// every rule's task, the fast path, the store thread and the delivery thread.
    /// A full outbox (`outbox_limit` notifications) drops one for each new one,
    /// counted in [`AlertStats::notifications_dropped`].
    pub async fn open_with(
        data_dir: &Path,
        seams: Seams,
        driver: Driver,
        outbox_limit: usize,
        tables: &AlertTables,
    ) -> Result<Self, RuleError> {
        let files = Files::new(data_dir);
        let (files, loaded) = tokio::task::spawn_blocking(move || {
            let loaded = files.load(outbox_limit);
            (files, loaded)
        })
        .await
        .map_err(|e| RuleError::task("loading the alert files", e))?;
        let loaded = loaded?;
        let shared = Arc::new(Shared {
            files,
            queries: seams.queries,
            clock: seams.clock,
            notifier: seams.notifier,
            inner: Mutex::new(Inner {
                rules: BTreeMap::new(),
                unsaved: Unsaved::loaded(&loaded.state),
                state: loaded.state,
                outbox: loaded.outbox,
                history: loaded.history,
                last_resend: HashMap::new(),
            }),
            store_wake: Condvar::new(),
            outbox_wake: Condvar::new(),
            store_writer: Mutex::new(()),
            rule_changes: tokio::sync::Mutex::new(()),
            schedule: Schedule::default(),
            fast: FastPath::new(),
            stopping: AtomicBool::new(false),
            stats: AlertStats::default(),
            driver,
            next_rule: AtomicU64::new(0),
        });
        if loaded.earlier_state {
            lock(&shared.inner).unsaved.change();
        }
        let engine = Self { shared };
        for rule in loaded.rules {
            let entry = engine.reopen(rule).await?;
            engine.install(entry, None);
        }
        engine.warn_of_orphans();
        if driver == Driver::Background {
            if let Err(e) = engine.start_background() {
                engine.stop();
                return Err(e);
            }
        }
        tables.attach(&engine.shared);
        Ok(engine)
    }

    fn start_background(&self) -> Result<(), RuleError> {
        let thread = |name: &str, run: fn(Arc<Shared>), shared: Arc<Shared>| {
            std::thread::Builder::new()
                .name(name.into())
                .spawn(move || run(shared))
                .map(|_| ())
                .map_err(|e| RuleError::Internal(format!("starting the {name} thread: {e}")))
        };
        thread("alerts-store", store::run, self.shared.clone())?;
        thread("alerts-notify", delivery::run, self.shared.clone())?;
        fast_path::spawn(&self.shared);
        Ok(())
    }

    /// A stored rule, planned again. One that does not plan now (its database is
    /// not there yet) is evaluated as a query on its schedule, and its errors show
    /// in `last_error`.
    async fn reopen(&self, rule: Rule) -> Result<Entry, RuleError> {
        let timing = rule
            .spec
            .check()
            .map_err(|e| RuleError::Internal(format!("stored rule {} is invalid: {e}", rule.id)))?;
        let described = match self
            .shared
            .queries
            .describe(&rule.spec.db, &rule.spec.sql)
            .await
        {
            Ok(d) => Some(d),
            Err(e) => {
                tracing::warn!(rule = %rule.spec.name, error = %e, "a stored rule does not plan now; it is evaluated on its schedule and its errors show in last_error");
                None
            }
        };
        Ok(Entry {
            fast_table: described.as_ref().and_then(|d| d.filter_table.clone()),
            identity: described
                .as_ref()
                .map(|d| rows::identity_columns(&d.schema))
                .unwrap_or_default(),
            timing,
            rule,
            last_error: None,
            last_evaluation: None,
        })
    }

    fn warn_of_orphans(&self) {
        let inner = lock(&self.shared.inner);
        let orphans = inner
            .state
            .instances
            .keys()
            .filter(|k| !inner.rules.contains_key(*k))
            .count();
        if orphans > 0 {
            tracing::warn!(
                orphans,
                "alert states of rules that no longer exist are ignored"
            );
        }
    }

    /// Counters for `/metrics`.
    pub fn stats(&self) -> &AlertStats {
        &self.shared.stats
    }

    /// Notifications waiting in the outbox (not yet accepted).
    pub fn outbox_len(&self) -> usize {
        lock(&self.shared.inner).outbox.len()
    }

    /// Makes `entry` the rule of its id and, in the background, (re)starts its task.
    /// The instances of `ending` (a definition whose query is replaced) end under
    /// the same lock, so no evaluation of it lands in between.
    fn install(&self, entry: Entry, ending: Option<&Rule>) {
        let id = entry.rule.id.clone();
        let every = entry.timing.every;
        {
            let mut inner = lock(&self.shared.inner);
            if let Some(old) = ending {
                self.shared.resolve_all(&mut inner, old);
            }
            inner.rules.insert(id.clone(), entry);
            self.shared.fast.follow(&inner.rules);
        }
        if self.shared.driver == Driver::Background {
            self.shared
                .schedule
                .start(Arc::downgrade(&self.shared), id, every);
        }
    }

    /// Checks `spec` and plans its SQL: the entry it would be as rule `id`.
    async fn prepare(&self, id: String, spec: RuleSpec) -> Result<Entry, RuleError> {
        let timing = spec.check().map_err(RuleError::Invalid)?;
        let described = self
            .shared
            .queries
            .describe(&spec.db, &spec.sql)
            .await
            .map_err(RuleError::from_plan)?;
        rows::check_templates(&spec, &described.schema).map_err(RuleError::Invalid)?;
        let rule = Rule {
            id,
            spec,
            fast_path: described.filter_table.is_some(),
            updated_at: rfc3339(i128::from(self.shared.clock.now_nanos())),
        };
        Ok(Entry {
            identity: rows::identity_columns(&described.schema),
            fast_table: described.filter_table,
            timing,
            rule,
            last_error: None,
            last_evaluation: None,
        })
    }

    /// An id no rule and no stored state has.
    fn new_id(&self) -> String {
        let inner = lock(&self.shared.inner);
        loop {
            let n = self.shared.next_rule.fetch_add(1, Ordering::SeqCst);
            let t = self.shared.clock.now_nanos() as u64;
            let id = format!(
                "{:016x}",
                t.rotate_left(17) ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15)
            );
            if !inner.rules.contains_key(&id) && !inner.state.instances.contains_key(&id) {
                return id;
            }
        }
    }

    /// The registered rules but `without`, and `with`: what `rules.json` is to hold.
    fn rules_with(&self, without: Option<&str>, with: Option<&Rule>) -> Vec<Rule> {
        let inner = lock(&self.shared.inner);
        inner
            .rules
            .values()
            .map(|e| &e.rule)
            .filter(|r| Some(r.id.as_str()) != without)
            .chain(with)
            .cloned()
            .collect()
    }

    /// Replaces `rules.json` on the blocking pool; durable when it returns.
    async fn store_rules(&self, rules: Vec<Rule>) -> Result<(), RuleError> {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || shared.files.write_rules(&rules))
            .await
            .map_err(|e| RuleError::task("storing the rules", e))?
    }

    /// Stores the states and the outbox now, on the blocking pool, so that what a
    /// rule change resolved is stored before the change is answered.
    async fn store_state(&self) {
        let shared = self.shared.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || shared.store_now()).await {
            tracing::error!(error = %e, "storing the alert states did not finish; the store thread tries again");
        }
    }

    /// Registers a rule: checked, planned, stored (durable when this returns), and
    /// evaluated from now on. Returns the rule as [`AlertEngine::get`] shows it.
    pub async fn create(&self, spec: RuleSpec) -> Result<Value, RuleError> {
        let _changing = self.shared.rule_changes.lock().await;
        let entry = self.prepare(self.new_id(), spec).await?;
        let id = entry.rule.id.clone();
        self.store_rules(self.rules_with(None, Some(&entry.rule)))
            .await?;
        lock(&self.shared.inner)
            .state
            .instances
            .entry(id.clone())
            .or_default();
        self.install(entry, None);
        self.get(&id).ok_or(RuleError::NotFound(id))
    }

    /// Replaces a rule's definition, durably when this returns. Instances are kept
    /// when the SQL and database are the same; otherwise firing ones are resolved
    /// (and told) and the rest dropped.
    pub async fn replace(&self, id: &str, spec: RuleSpec) -> Result<Value, RuleError> {
        let _changing = self.shared.rule_changes.lock().await;
        let old = lock(&self.shared.inner)
            .rules
            .get(id)
            .map(|e| e.rule.clone())
            .ok_or_else(|| RuleError::NotFound(id.to_string()))?;
        let entry = self.prepare(id.to_string(), spec).await?;
        self.store_rules(self.rules_with(Some(id), Some(&entry.rule)))
            .await?;
        let same_query = old.spec.sql == entry.rule.spec.sql && old.spec.db == entry.rule.spec.db;
        self.install(entry, (!same_query).then_some(&old));
        if !same_query {
            self.store_state().await;
        }
        self.get(id)
            .ok_or_else(|| RuleError::NotFound(id.to_string()))
    }

    /// Deletes a rule, durably when this returns; its firing instances are
    /// resolved and told.
    pub async fn delete(&self, id: &str) -> Result<(), RuleError> {
        let _changing = self.shared.rule_changes.lock().await;
        let rule = lock(&self.shared.inner)
            .rules
            .get(id)
            .map(|e| e.rule.clone())
            .ok_or_else(|| RuleError::NotFound(id.to_string()))?;
        self.store_rules(self.rules_with(Some(id), None)).await?;
        {
            let mut inner = lock(&self.shared.inner);
            self.shared.resolve_all(&mut inner, &rule);
            inner.rules.remove(id);
            inner.last_resend.remove(id);
            self.shared.fast.follow(&inner.rules);
            self.shared.mark_changed(&mut inner);
        }
        self.shared.schedule.stop(id);
        self.store_state().await;
        Ok(())
    }

    /// Hands written batches to the fast path; never waits. A batch to a database
    /// without fast-path rules is not even queued.
    pub fn on_write(&self, db: &str, tables: &[(String, RecordBatch)]) {
        self.shared.on_write(db, tables);
    }

    /// Evaluates one rule now, as its task does every `every`: runs its query
    /// (a fast-path rule only lets time pass) and moves its instances on. The
    /// changes are in memory when this returns, and stored soon after.
    pub async fn evaluate_now(&self, rule_id: &str) {
        self.shared.evaluate_now(rule_id).await;
    }

    /// Checks the batches [`AlertEngine::on_write`] queued against their rules,
    /// as the fast-path task does. With [`Driver::Background`] the task has the
    /// queue and this does nothing.
    pub async fn check_written(&self) {
        self.shared.check_queued().await;
    }

    /// Writes the history, the outbox's new records and, if they changed, the
    /// states, as the store thread does; returns whether the files are up to
    /// date. Blocks on the disk: not for an async worker.
    pub fn store_now(&self) -> bool {
        self.shared.store_now()
    }

    /// Posts every stored, due outbox entry, oldest first per target, as the
    /// delivery thread does; returns how many posts were tried. Blocks on the
    /// receivers: not for an async worker.
    pub fn deliver_due(&self) -> usize {
        self.shared.deliver_due()
    }

    fn stop(&self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        self.shared.schedule.stop_all();
        self.shared.store_wake.notify_all();
        self.shared.outbox_wake.notify_all();
    }

    /// Stops the tasks and threads and stores the states and the outbox one last
    /// time (on the blocking pool). Notifications not yet accepted wait in the
    /// stored outbox for the next start.
    pub async fn shutdown(&self) {
        self.stop();
        self.store_state().await;
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use serde_json::json;

    use super::*;
    use crate::testing::{answer, rule, Harness, HOOK, TILTED, TILTED_LONG};

    fn stored_rules(h: &Harness) -> Vec<Value> {
        let bytes = std::fs::read(h.dir.path().join("alerts/rules.json")).expect("rules.json");
        serde_json::from_slice(&bytes).expect("JSON")
    }

    #[tokio::test]
    async fn rules_are_checked_planned_and_stored_before_the_answer() {
        let h = Harness::new().await;
        let refused = |patch: Value| {
            let mut spec = rule("tilted", TILTED, "0s", "0s");
            for (k, v) in patch.as_object().expect("an object") {
                spec[k] = v.clone();
            }
            spec
        };
        for (patch, want) in [
            (json!({"every": "0s"}), "every must be at least"),
            (json!({"db": "nowhere"}), "database nowhere does not exist"),
            (json!({"sql": "SELECT nope"}), "sql: "),
            (
                json!({"annotations": {"summary": "{{level}}"}}),
                "annotations.summary uses {{level}}, which the query does not return (its columns: device, tilt_deg)",
            ),
        ] {
            match h.create(refused(patch.clone())).await {
                Err(RuleError::Invalid(message)) => {
                    assert!(message.contains(want), "{patch}: {message:?} should say {want:?}")
                }
                other => panic!("{patch} should be invalid, got {other:?}"),
            }
        }
        assert!(h.engine.list(None).is_empty());
        assert!(!h.dir.path().join("alerts/rules.json").exists());

        let id = h.create(rule("tilted", TILTED, "1m", "0s")).await.unwrap();
        assert_eq!(stored_rules(&h)[0]["id"], json!(id));
        assert_eq!(stored_rules(&h)[0]["for"], "1m");

        let mut changed = rule("tilted", TILTED, "1m", "0s");
        changed["severity"] = json!("critical");
        let spec = serde_json::from_value::<RuleSpec>(changed).unwrap();
        let shown = h.engine.replace(&id, spec.clone()).await.unwrap();
        assert_eq!(
            (shown["id"].clone(), shown["severity"].clone()),
            (json!(id), json!("critical"))
        );
        assert_eq!(stored_rules(&h)[0]["severity"], "critical");
        assert!(matches!(
            h.engine.replace("nope", spec).await,
            Err(RuleError::NotFound(_))
        ));
        assert!(matches!(
            h.engine.delete("nope").await,
            Err(RuleError::NotFound(_))
        ));
        assert_eq!(h.engine.department_of(&id).as_deref(), Some("covers"));
        h.engine.delete(&id).await.unwrap();
        assert_eq!(stored_rules(&h), Vec::<Value>::new());
        assert!(h.engine.get(&id).is_none());
    }

    #[tokio::test]
    async fn a_new_query_or_a_deletion_resolves_firing_instances_durably() {
        let h = Harness::new().await;
        let id = h.create(rule("tilted", TILTED, "0s", "0s")).await.unwrap();
        h.queries
            .set_answer(TILTED, vec![answer(&[("mh-1", 20.0)])]);
        h.engine.evaluate_now(&id).await;
        assert_eq!(h.states().len(), 1);

        let mut same = rule("tilted", TILTED, "0s", "0s");
        same["severity"] = json!("critical");
        h.engine
            .replace(&id, serde_json::from_value(same).unwrap())
            .await
            .unwrap();
        assert_eq!(h.states().len(), 1, "the same query keeps its instances");

        let other = rule("tilted", TILTED_LONG, "0s", "0s");
        h.engine
            .replace(&id, serde_json::from_value(other).unwrap())
            .await
            .unwrap();
        assert!(h.states().is_empty(), "another query starts afresh");
        let outbox = h.stored_outbox().clone();
        assert_eq!(
            outbox["1"]["body"]["status"], "resolved",
            "stored when replace returns: {outbox}"
        );

        h.queries
            .set_answer(TILTED_LONG, vec![answer(&[("mh-2", 50.0)])]);
        h.engine.evaluate_now(&id).await;
        h.engine.delete(&id).await.unwrap();
        assert!(h.states().is_empty());
        assert_eq!(h.stored_outbox()["3"]["body"]["status"], "resolved");
        assert_eq!(h.stored_state()["instances"], json!({}));
        h.engine.deliver_due();
        assert_eq!(
            h.told(),
            [
                ("firing".to_string(), "mh-1".to_string()),
                ("resolved".to_string(), "mh-1".to_string()),
                ("firing".to_string(), "mh-2".to_string()),
                ("resolved".to_string(), "mh-2".to_string()),
            ]
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn in_the_background_a_rule_is_evaluated_stored_and_told() {
        let h = Harness::with_driver(Driver::Background).await;
        h.queries
            .set_answer(TILTED, vec![answer(&[("mh-1", 20.0)])]);
        let mut spec = rule("tilted", TILTED, "0s", "0s");
        spec["every"] = json!("1s");
        h.create(spec).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !(h.notifier.accepted().len() == 1 && h.stored_outbox() == json!({})) {
            assert!(
                Instant::now() < deadline,
                "posted: {:?}, stored outbox: {:?}",
                h.notifier.posts(),
                h.stored_outbox()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(h.notifier.posts()[0].target.post_url(), HOOK);
        assert_eq!(h.told(), [("firing".to_string(), "mh-1".to_string())]);
        h.engine.shutdown().await;
        assert!(h.engine.shared.stopping.load(Ordering::SeqCst));
        assert_eq!(
            h.stored_state()["instances"].as_object().map(|i| i.len()),
            Some(1)
        );
    }
}
