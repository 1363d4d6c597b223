//! What the engine keeps under `<data-dir>/alerts/`, and the thread that writes
//! the states, the outbox and the history there.
//!
//! - `rules.json`: the registered rules, replaced whole (write, fsync, rename) by
//!   create, replace and delete, on the blocking pool, before they answer.
//! - `outbox.jsonl`: the outbox's journal (`outbox.rs`): records of notifications
//!   enqueued, re-sends merged, attempts, deliveries and drops, appended by the
//!   store thread with one fsync per batch and rewritten only once it is twice
//!   as long as the outbox.
//! - `state.json`: every rule's instances and the epoch (how many times it has
//!   been written), replaced whole by the store thread when instances changed,
//!   after the batch's outbox records. Changes made while one batch is written go
//!   in the next, so a burst costs one fsync of each file rather than one per
//!   change. A notification is posted only once the journal and the states of its
//!   batch are stored: a crash may lose changes not yet stored, but then it lost
//!   their notifications with them (records newer than the stored epoch are
//!   ignored), so after the restart the change is made again and told once.
//!   Earlier versions kept the outbox in `state.json`; it is read from there
//!   while no journal exists.
//! - `history.jsonl`: state changes, appended by the same thread just before the
//!   rest, not fsynced (the history informs; states and outbox are what must
//!   survive), and rewritten with only the kept changes once it has grown to
//!   twice their number.
//!
//! Only the store thread, the blocking pool and a caller driving the engine by
//! hand ([`crate::Driver::Caller`]) write these files; async code hands over.

use std::collections::{BTreeMap, VecDeque};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use citytsdb_storage::files::{sync_dir, write_atomically};
use citytsdb_storage::paths;
use serde::{Deserialize, Serialize};

use crate::engine::{lock, Shared};
use crate::error::RuleError;
use crate::notify::Notification;
use crate::outbox::{JournalWrite, Outbox, Record};
use crate::rule::Rule;
use crate::state::{Change, RuleInstances};

/// State changes kept for `/api/v1/alerts/history` and `system.alert_events`.
const HISTORY: usize = 10_000;
/// How long the store thread waits before trying a failed write again.
const RETRY: Duration = Duration::from_secs(1);

/// What `state.json` holds.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct Persisted {
    /// Each rule's active instances, by rule id.
    pub instances: BTreeMap<String, RuleInstances>,
    /// How many times `state.json` has been written (0 in earlier versions' files).
    #[serde(default)]
    pub epoch: u64,
}

/// The outbox as earlier versions kept it, in `state.json`.
#[derive(Debug, Default, Deserialize)]
struct EarlierOutbox {
    #[serde(default)]
    outbox: BTreeMap<u64, Notification>,
    #[serde(default)]
    next_id: u64,
}

/// One state change as the history keeps it: a line of `history.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Event {
    pub time: i64,
    pub rule_id: String,
    pub rule_name: String,
    pub department: String,
    pub db: String,
    pub fingerprint: String,
    pub from: String,
    pub to: String,
    pub labels: BTreeMap<String, String>,
}

impl Event {
    /// The event of `change`, an instance of `rule`.
    pub fn of(rule: &Rule, change: &Change) -> Self {
        Self {
            time: change.time,
            rule_id: rule.id.clone(),
            rule_name: rule.spec.name.clone(),
            department: rule.spec.department.clone(),
            db: rule.spec.db.clone(),
            fingerprint: change.instance.fingerprint.clone(),
            from: change.from.clone(),
            to: change.to.clone(),
            labels: change.instance.labels.clone(),
        }
    }
}

/// The newest state changes, and those `history.jsonl` does not have yet.
#[derive(Debug, Default)]
pub(crate) struct History {
    kept: VecDeque<Event>,
    unwritten: Vec<Event>,
    /// Lines in `history.jsonl`.
    file_lines: usize,
}

/// What the store thread does to `history.jsonl`.
enum HistoryWrite {
    Append(Vec<Event>),
    Rewrite(Vec<Event>),
}

impl History {
    /// Keeps `event` and queues it for the file.
    pub fn push(&mut self, event: Event) {
        self.unwritten.push(event.clone());
        self.kept.push_back(event);
        while self.kept.len() > HISTORY {
            self.kept.pop_front();
        }
    }

    /// The kept changes, oldest first.
    pub fn events(&self) -> impl Iterator<Item = &Event> {
        self.kept.iter()
    }

    fn take_unwritten(&mut self) -> Option<HistoryWrite> {
        if self.unwritten.is_empty() {
            return None;
        }
        let new = std::mem::take(&mut self.unwritten);
        if self.file_lines + new.len() > 2 * HISTORY {
            self.file_lines = self.kept.len();
            Some(HistoryWrite::Rewrite(self.kept.iter().cloned().collect()))
        } else {
            self.file_lines += new.len();
            Some(HistoryWrite::Append(new))
        }
    }
}

/// How far `state.json` is behind the states in memory.
#[derive(Debug, Default)]
pub(crate) struct Unsaved {
    /// Counts changes to the states.
    changed: u64,
    /// The count the stored `state.json` includes.
    stored: u64,
    /// The epoch of the stored `state.json`.
    epoch: u64,
}

impl Unsaved {
    /// Right after loading: everything in memory came from the disk.
    pub fn loaded(state: &Persisted) -> Self {
        Self {
            epoch: state.epoch,
            ..Self::default()
        }
    }

    /// The states changed.
    pub fn change(&mut self) {
        self.changed += 1;
    }

    fn behind(&self) -> bool {
        self.changed != self.stored
    }
}

/// What opening finds under `<data-dir>/alerts/`.
pub(crate) struct Loaded {
    pub rules: Vec<Rule>,
    pub state: Persisted,
    /// `state.json` is an earlier version's (the outbox in it): the first store
    /// writes it anew, after the journal.
    pub earlier_state: bool,
    pub outbox: Outbox,
    pub history: History,
}

/// The files under `<data-dir>/alerts/`.
#[derive(Debug)]
pub(crate) struct Files {
    dir: PathBuf,
    rules: PathBuf,
    state: PathBuf,
    outbox: PathBuf,
    history: PathBuf,
    /// The threads that touched the disk, for the test that none is the runtime's.
    #[cfg(test)]
    pub(crate) disk_threads: std::sync::Mutex<Vec<std::thread::ThreadId>>,
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

impl Files {
    /// The files of `data_dir`.
    pub fn new(data_dir: &Path) -> Self {
        Self {
            dir: paths::alerts_dir(data_dir),
            rules: paths::alert_rules_file(data_dir),
            state: paths::alert_state_file(data_dir),
            outbox: paths::alert_outbox_file(data_dir),
            history: paths::alert_history_file(data_dir),
            #[cfg(test)]
            disk_threads: std::sync::Mutex::default(),
        }
    }

    fn on_disk(&self) {
        #[cfg(test)]
        crate::engine::lock(&self.disk_threads).push(std::thread::current().id());
    }

    /// Reads rules, states, outbox (holding at most `outbox_limit`) and history,
    /// creating the directory the first time and cutting a torn last line off
    /// the history. Blocks on the disk.
    pub fn load(&self, outbox_limit: usize) -> Result<Loaded, RuleError> {
        self.on_disk();
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| RuleError::Internal(format!("creating {}: {e}", self.dir.display())))?;
        let rules = read_json(&self.rules)?;
        let (state, outbox) = self.read_state(outbox_limit)?;
        // This version's state.json has been written at least once: epoch 1.
        let earlier_state = state.epoch == 0 && self.state.exists();
        let mut history = History::default();
        if let Some(text) = read_text(&self.history)? {
            let whole = text.rfind('\n').map_or(0, |end| end + 1);
            if whole < text.len() {
                // A torn last line (a crash mid-append) goes, or the next line
                // would be appended to it.
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&self.history)
                    .and_then(|f| f.set_len(whole as u64))
                    .map_err(|e| {
                        RuleError::Internal(format!("cutting {}: {e}", self.history.display()))
                    })?;
            }
            for line in text[..whole].lines() {
                history.file_lines += 1;
                if let Ok(e) = serde_json::from_str::<Event>(line) {
                    history.kept.push_back(e);
                    if history.kept.len() > HISTORY {
                        history.kept.pop_front();
                    }
                }
            }
        }
        Ok(Loaded {
            rules,
            state,
            earlier_state,
            outbox,
            history,
        })
    }

    /// Reads the states and the outbox (holding at most `outbox_limit`): the
    /// journal's records up to the stored epoch or, before there was a journal,
    /// the outbox in `state.json`. Changes nothing. Blocks on the disk.
    pub fn read_state(&self, outbox_limit: usize) -> Result<(Persisted, Outbox), RuleError> {
        let state: Persisted = read_json(&self.state)?;
        let outbox = match read_text(&self.outbox)? {
            Some(text) => Outbox::replay(&text, state.epoch, outbox_limit),
            None => {
                let earlier: EarlierOutbox = read_json(&self.state)?;
                Outbox::from_state_file(earlier.outbox, earlier.next_id, outbox_limit)
            }
        };
        Ok((state, outbox))
    }

    /// Replaces `rules.json` with `rules`; durable when it returns. Blocks on the
    /// disk: call it on the blocking pool.
    pub fn write_rules(&self, rules: &[Rule]) -> Result<(), RuleError> {
        self.on_disk();
        let bytes =
            serde_json::to_vec_pretty(rules).map_err(|e| RuleError::Internal(e.to_string()))?;
        write_atomically(&self.rules, &bytes)
            .map_err(|e| RuleError::Internal(format!("storing the rules: {e}")))
    }

    fn write_history(&self, write: HistoryWrite) {
        self.on_disk();
        let text = |events: &[Event]| {
            let mut out = String::new();
            for e in events {
                if let Ok(line) = serde_json::to_string(e) {
                    out.push_str(&line);
                    out.push('\n');
                }
            }
            out
        };
        let result = match write {
            HistoryWrite::Rewrite(events) => {
                write_atomically(&self.history, text(&events).as_bytes())
            }
            HistoryWrite::Append(events) => std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.history)
                .and_then(|mut f| f.write_all(text(&events).as_bytes())),
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, "cannot append to the alert history file");
        }
    }

    /// Appends records to `outbox.jsonl` and fsyncs it, or replaces it whole.
    fn write_outbox(&self, write: JournalWrite) -> std::io::Result<()> {
        self.on_disk();
        let text = |records: &[Record]| -> std::io::Result<Vec<u8>> {
            let mut out = Vec::new();
            for r in records {
                serde_json::to_writer(&mut out, r)?;
                out.push(b'\n');
            }
            Ok(out)
        };
        match write {
            JournalWrite::Rewrite(records) => write_atomically(&self.outbox, &text(&records)?),
            JournalWrite::Append(records) => {
                let created = !self.outbox.exists();
                let mut f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&self.outbox)?;
                f.write_all(&text(&records)?)?;
                f.sync_data()?;
                if created {
                    sync_dir(&self.dir)?;
                }
                Ok(())
            }
        }
    }

    fn write_state(&self, bytes: &[u8]) -> std::io::Result<()> {
        self.on_disk();
        write_atomically(&self.state, bytes)
    }
}

/// Reads `path` as text; `None` when it does not exist.
fn read_text(path: &Path) -> Result<Option<String>, RuleError> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(String::from_utf8_lossy(&bytes).into_owned())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(RuleError::Internal(format!(
            "reading {}: {e}",
            path.display()
        ))),
    }
}

impl Shared {
    /// Writes what changed since the last store: the new history lines, the
    /// outbox's new records (fsynced), then `state.json` if the states changed;
    /// the notifications they hold may be posted once it returns. Returns whether
    /// the files are now up to date. Blocks on the disk: the store thread's, the
    /// blocking pool's or a test's to call.
    pub(crate) fn store_now(&self) -> bool {
        // One writer at a time: the store thread, a rule change, a shutdown, or a caller.
        let _writer = lock(&self.store_writer);
        let (history, journal, state, changes) = {
            let mut guard = lock(&self.inner);
            let inner = &mut *guard;
            let history = inner.history.take_unwritten();
            let state = inner.unsaved.behind().then(|| {
                let epoch = inner.unsaved.epoch + 1;
                inner.state.epoch = epoch;
                (
                    serde_json::to_vec(&inner.state),
                    inner.unsaved.changed,
                    epoch,
                )
            });
            let epoch = state.as_ref().map_or(inner.unsaved.epoch, |s| s.2);
            let journal = inner.outbox.take_unwritten(epoch);
            (history, journal, state, inner.outbox.changes())
        };
        if let Some(history) = history {
            self.files.write_history(history);
        }
        if let Some(journal) = journal {
            if let Err(e) = self.files.write_outbox(journal) {
                tracing::error!(error = %e, "cannot append to the alert outbox journal; notifications wait until it is written");
                lock(&self.inner).outbox.write_failed();
                return false;
            }
        }
        if let Some((bytes, _, _)) = &state {
            let written = match bytes {
                Ok(b) => self.files.write_state(b),
                Err(e) => Err(std::io::Error::other(e.to_string())),
            };
            if let Err(e) = written {
                tracing::error!(error = %e, "cannot store the alert states; notifications wait until they are stored");
                return false;
            }
        }
        let mut inner = lock(&self.inner);
        if let Some((_, changed, epoch)) = state {
            let unsaved = &mut inner.unsaved;
            unsaved.stored = unsaved.stored.max(changed);
            unsaved.epoch = unsaved.epoch.max(epoch);
        }
        inner.outbox.stored_up_to(changes);
        let up_to_date = !inner.unsaved.behind() && !inner.outbox.has_unwritten();
        drop(inner);
        self.outbox_wake.notify_all();
        up_to_date
    }
}

/// The store thread: writes whenever something changed, until the engine stops
/// (its last write is [`crate::AlertEngine::shutdown`]'s).
pub(crate) fn run(shared: Arc<Shared>) {
    loop {
        {
            let mut inner = lock(&shared.inner);
            while !inner.unsaved.behind()
                && inner.history.unwritten.is_empty()
                && !inner.outbox.has_unwritten()
            {
                if shared.stopping.load(Ordering::SeqCst) {
                    return;
                }
                inner = shared
                    .store_wake
                    .wait_timeout(inner, RETRY)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        }
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let stored = shared.store_now();
        // A failed write is retried, but not in a tight loop.
        let behind = {
            let inner = lock(&shared.inner);
            inner.unsaved.behind() || inner.outbox.has_unwritten()
        };
        if !stored && behind {
            std::thread::sleep(RETRY);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::OUTBOX_LIMIT;

    fn event(n: i64) -> Event {
        Event {
            time: n,
            rule_id: "r".into(),
            rule_name: "n".into(),
            department: "d".into(),
            db: "city".into(),
            fingerprint: "f".into(),
            from: "pending".into(),
            to: "firing".into(),
            labels: BTreeMap::new(),
        }
    }

    #[test]
    fn the_history_file_is_appended_then_rewritten_when_twice_too_long() {
        let tmp = tempfile::tempdir().unwrap();
        let files = Files::new(tmp.path());
        std::fs::create_dir_all(&files.dir).unwrap();
        let mut history = History::default();
        for n in 0..(2 * HISTORY as i64) {
            history.push(event(n));
        }
        let Some(HistoryWrite::Append(lines)) = history.take_unwritten() else {
            panic!("the first lines are appended");
        };
        assert_eq!(lines.len(), 2 * HISTORY);
        files.write_history(HistoryWrite::Append(lines));
        history.push(event(-1));
        let Some(HistoryWrite::Rewrite(kept)) = history.take_unwritten() else {
            panic!("one line more is a rewrite");
        };
        assert_eq!(kept.len(), HISTORY);
        assert_eq!(kept.last().map(|e| e.time), Some(-1));
        files.write_history(HistoryWrite::Rewrite(kept));
        assert!(history.take_unwritten().is_none());

        // A torn last line is cut off on load, so the next line starts afresh.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&files.history)
            .unwrap()
            .write_all(b"{\"time\": 5, \"rule")
            .unwrap();
        let mut loaded = files.load(OUTBOX_LIMIT).unwrap();
        assert_eq!(loaded.history.file_lines, HISTORY);
        assert_eq!(loaded.history.events().count(), HISTORY);
        assert_eq!(loaded.history.events().last().map(|e| e.time), Some(-1));
        loaded.history.push(event(-2));
        let Some(HistoryWrite::Append(lines)) = loaded.history.take_unwritten() else {
            panic!("one line is appended");
        };
        files.write_history(HistoryWrite::Append(lines));
        let loaded = files.load(OUTBOX_LIMIT).unwrap();
        assert_eq!(loaded.history.file_lines, HISTORY + 1);
        assert_eq!(loaded.history.events().last().map(|e| e.time), Some(-2));
    }

    use crate::rows::instance_fingerprint;

    fn alerts_file(h: &Harness, name: &str) -> PathBuf {
        h.dir.path().join("alerts").join(name)
    }
    use crate::testing::{answer, at, rule, Harness, HOOK, T0, TILTED, TILTED_LONG};

    #[tokio::test]
    async fn a_restart_keeps_rules_states_and_the_outbox_and_tells_nothing_twice() {
        let h = Harness::new().await;
        let tilted = h.create(rule("tilted", TILTED, "0s", "0s")).await.unwrap();
        let long = h
            .create(rule("tilted-long", TILTED_LONG, "1h", "0s"))
            .await
            .unwrap();
        h.queries
            .set_answer(TILTED, vec![answer(&[("mh-1", 20.0)])]);
        h.queries
            .set_answer(TILTED_LONG, vec![answer(&[("mh-2", 45.0)])]);
        h.engine.evaluate_now(&tilted).await;
        h.engine.evaluate_now(&long).await;
        assert_eq!(h.store_and_deliver(), 1, "mh-1 fired and was told");
        // mh-3 fires while the receiver is down: its message waits in the outbox.
        h.advance(10.0);
        h.notifier.set_failing(true);
        h.queries
            .set_answer(TILTED, vec![answer(&[("mh-1", 20.0), ("mh-3", 30.0)])]);
        h.engine.evaluate_now(&tilted).await;
        assert_eq!(h.store_and_deliver(), 1);
        assert!(h.engine.store_now());
        let rules = h.engine.list(None);
        let before = h.states();
        assert_eq!(before.len(), 3);

        let h = h.restart().await;
        let same = |r: &serde_json::Value| {
            let mut r = r.clone();
            r["last_error"] = serde_json::Value::Null;
            r["last_evaluation"] = serde_json::Value::Null;
            r
        };
        assert_eq!(
            h.engine.list(None),
            rules.iter().map(same).collect::<Vec<_>>()
        );
        assert_eq!(h.states(), before, "states and their times survive");
        let outbox = h.stored_outbox().clone();
        assert_eq!(outbox.as_object().map(|o| o.len()), Some(1));
        assert_eq!(outbox["1"]["attempts"], 1);
        assert_eq!(outbox["1"]["body"]["alerts"][0]["labels"]["device"], "mh-3");

        h.notifier.set_failing(false);
        h.advance(10.0);
        h.engine.evaluate_now(&tilted).await;
        h.engine.evaluate_now(&long).await;
        assert_eq!(h.states(), before, "nothing moved");
        assert_eq!(h.store_and_deliver(), 1, "only the waiting message");
        let told: Vec<(String, String)> = h.told();
        assert_eq!(
            told,
            [
                ("firing".to_string(), "mh-1".to_string()),
                ("firing".to_string(), "mh-3".to_string())
            ]
        );
        assert_eq!(
            h.moves(),
            [
                "mh-1:inactive->pending",
                "mh-1:pending->firing",
                "mh-2:inactive->pending",
                "mh-3:inactive->pending",
                "mh-3:pending->firing"
            ],
            "the history survives too"
        );
    }

    #[tokio::test]
    async fn a_state_not_yet_stored_is_lost_with_its_message_and_told_once_after() {
        let h = Harness::new().await;
        let id = h.create(rule("tilted", TILTED, "0s", "0s")).await.unwrap();
        h.queries
            .set_answer(TILTED, vec![answer(&[("mh-1", 20.0)])]);
        h.engine.evaluate_now(&id).await;
        // Killed before the store thread wrote anything.
        let h = h.restart().await;
        assert!(h.states().is_empty());
        h.engine.evaluate_now(&id).await;
        h.store_and_deliver();
        assert_eq!(h.told(), [("firing".to_string(), "mh-1".to_string())]);
    }

    #[tokio::test]
    async fn files_written_by_earlier_versions_still_open() {
        let dir = tempfile::tempdir().unwrap();
        let alerts = dir.path().join("alerts");
        std::fs::create_dir_all(&alerts).unwrap();
        let id = "0123456789abcdef";
        let fp = instance_fingerprint(id, &[("device".to_string(), "mh-1".to_string())].into());
        std::fs::write(
            alerts.join("rules.json"),
            format!(
                r#"[
  {{
    "id": "{id}",
    "name": "tilted",
    "department": "covers",
    "sql": "{TILTED}",
    "db": "city",
    "every": "15s",
    "for": "0s",
    "keep_firing_for": "0s",
    "severity": "critical",
    "labels": {{}},
    "annotations": {{}},
    "webhook": "{HOOK}",
    "fast_path": false,
    "updated_at": "2025-11-30T00:00:00Z"
  }}
]"#
            ),
        )
        .unwrap();
        std::fs::write(
            alerts.join("state.json"),
            format!(
                r#"{{"instances":{{"{id}":{{"active":{{"{fp}":{{"rule_id":"{id}","fingerprint":"{fp}","labels":{{"alertname":"tilted","department":"covers","device":"mh-1","severity":"critical"}},"annotations":{{}},"values":{{"tilt_deg":20.0}},"state":"firing","active_at":{T0},"fired_at":{T0},"last_seen":{T0},"keep_firing_since":null}}}}}}}},"outbox":{{"7":{{"id":7,"rule_id":"{id}","target":{{"kind":"webhook","url":"{HOOK}"}},"body":{{"status":"firing","alerts":[{{"status":"firing","labels":{{"device":"mh-1"}}}}]}},"attempts":3,"next_attempt":{T0},"last_error":"POST {HOOK}: answered 503"}}}},"next_id":8}}"#
            ),
        )
        .unwrap();
        std::fs::write(
            alerts.join("history.jsonl"),
            format!(
                "{{\"time\":{T0},\"rule_id\":\"{id}\",\"rule_name\":\"tilted\",\"department\":\"covers\",\"db\":\"city\",\"fingerprint\":\"{fp}\",\"from\":\"pending\",\"to\":\"firing\",\"labels\":{{\"device\":\"mh-1\"}}}}\n"
            ),
        )
        .unwrap();

        let h = Harness::new().await;
        let h = Harness { dir, ..h }.restart().await;
        let shown = h.engine.get(id).expect("the stored rule");
        assert_eq!(shown["severity"], "critical");
        assert_eq!(shown["updated_at"], "2025-11-30T00:00:00Z");
        assert_eq!(
            h.states(),
            [("mh-1".to_string(), "firing".to_string(), at(0), Some(at(0)))]
        );
        assert_eq!(h.moves(), ["mh-1:pending->firing"]);
        h.queries
            .set_answer(TILTED, vec![answer(&[("mh-1", 20.0)])]);
        h.engine.evaluate_now(id).await;
        assert_eq!(
            h.engine.deliver_due(),
            1,
            "the stored outbox may go at once"
        );
        assert_eq!(h.told(), [("firing".to_string(), "mh-1".to_string())]);
        assert!(h.engine.store_now());
        assert_eq!(h.stored_outbox(), serde_json::json!({}));
        let stored = h.stored_state();
        assert!(stored.get("outbox").is_none(), "now in outbox.jsonl");
        assert_eq!(stored["epoch"], 1);
        assert_eq!(stored["instances"][id]["active"][&fp]["active_at"], T0);
        // Ids go on from the earlier file's next_id.
        h.queries.set_answer(TILTED, vec![]);
        h.engine.evaluate_now(id).await;
        assert!(h.engine.store_now());
        assert_eq!(
            h.stored_outbox()["8"]["body"]["alerts"][0]["status"],
            "resolved"
        );
    }

    #[tokio::test]
    async fn the_outbox_journal_as_this_version_writes_it_opens() {
        let dir = tempfile::tempdir().unwrap();
        let alerts = dir.path().join("alerts");
        std::fs::create_dir_all(&alerts).unwrap();
        let (id, hook) = ("0123456789abcdef", HOOK);
        std::fs::write(
            alerts.join("state.json"),
            format!(r#"{{"instances":{{"{id}":{{"active":{{}}}}}},"epoch":4}}"#),
        )
        .unwrap();
        let enqueued = |epoch: u64, n: u64, extra: &str| {
            format!(
                r#"{{"op":"enqueued","epoch":{epoch},"notification":{{"id":{n},"rule_id":"{id}","target":{{"kind":"webhook","url":"{hook}"}},"body":{{"n":{n}}},"attempts":0,"next_attempt":{T0},"last_error":null{extra}}}}}"#
            )
        };
        let lines = [
            enqueued(3, 0, ""),
            enqueued(3, 1, r#","firing":["f1"]"#),
            enqueued(4, 2, r#","firing":["f2"],"resend":true"#),
            r#"{"op":"attempted","id":1,"attempts":2,"next_attempt":5,"last_error":"POST: answered 503"}"#.into(),
            r#"{"op":"replaced","epoch":4,"id":2,"body":{"n":22},"firing":["f3"]}"#.into(),
            r#"{"op":"delivered","id":0}"#.into(),
            enqueued(4, 3, ""),
            r#"{"op":"dropped","id":3}"#.into(),
            // A batch whose state.json (epoch 5) was never written, then a torn record.
            enqueued(5, 4, ""),
            r#"{"op":"deliv"#.into(),
        ];
        std::fs::write(alerts.join("outbox.jsonl"), lines.join("\n")).unwrap();

        let h = Harness::new().await;
        let h = Harness { dir, ..h }.restart().await;
        let outbox = h.stored_outbox();
        assert_eq!(
            outbox
                .as_object()
                .map(|o| o.keys().cloned().collect::<Vec<_>>()),
            Some(vec!["1".to_string(), "2".to_string()])
        );
        assert_eq!(outbox["1"]["attempts"], 2);
        assert_eq!(outbox["1"]["firing"], serde_json::json!(["f1"]));
        assert_eq!(outbox["2"]["body"], serde_json::json!({"n": 22}));
        assert_eq!(outbox["2"]["resend"], true);
        assert_eq!(h.engine.outbox_len(), 2);
        // The first store rewrites the journal without the unstored and torn records.
        assert!(h.engine.store_now());
        let text = std::fs::read_to_string(alerts_file(&h, "outbox.jsonl")).unwrap();
        assert_eq!(text.lines().count(), 2, "{text}");
        assert!(text.ends_with('\n'));
    }

    #[tokio::test]
    async fn a_torn_journal_tail_loads_cleanly_and_tells_nothing_twice() {
        let h = Harness::new().await;
        let id = h.create(rule("tilted", TILTED, "0s", "0s")).await.unwrap();
        h.notifier.set_failing(true);
        h.queries
            .set_answer(TILTED, vec![answer(&[("mh-1", 20.0)])]);
        h.engine.evaluate_now(&id).await;
        assert_eq!(h.store_and_deliver(), 1);
        assert!(h.engine.store_now());
        let before = h.stored_outbox();
        // Killed halfway through appending the next record.
        let journal = alerts_file(&h, "outbox.jsonl");
        std::fs::OpenOptions::new()
            .append(true)
            .open(&journal)
            .unwrap()
            .write_all(br#"{"op":"delivered","#)
            .unwrap();

        let h = h.restart().await;
        assert_eq!(h.stored_outbox(), before, "the torn record is ignored");
        assert_eq!(h.engine.outbox_len(), 1);
        h.notifier.set_failing(false);
        h.advance(10.0);
        h.engine.evaluate_now(&id).await;
        assert_eq!(h.store_and_deliver(), 1);
        assert!(h.engine.store_now());
        assert_eq!(h.stored_outbox(), serde_json::json!({}));
        let text = std::fs::read_to_string(&journal).unwrap();
        assert!(
            text.lines()
                .all(|l| serde_json::from_str::<Record>(l).is_ok()),
            "no torn line is left: {text}"
        );
        assert_eq!(h.told(), [("firing".to_string(), "mh-1".to_string())]);
        let h = h.restart().await;
        assert_eq!(h.engine.outbox_len(), 0);
    }

    /// Every write of the alert files happens on a thread that is not the
    /// runtime's: with a current-thread runtime the async code runs on the test's
    /// own thread, so a write made from an async fn would show up as this thread.
    #[tokio::test(flavor = "current_thread")]
    async fn the_files_are_written_off_the_runtime() {
        use std::time::{Duration, Instant};

        let runtime_thread = std::thread::current().id();
        let h = Harness::with_driver(crate::Driver::Background).await;
        h.queries
            .set_answer(TILTED, vec![answer(&[("mh-1", 20.0)])]);
        let mut spec = rule("tilted", TILTED, "0s", "0s");
        spec["every"] = serde_json::json!("1s");
        let id = h.create(spec).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !(h.notifier.accepted().len() == 1 && h.stored_outbox() == serde_json::json!({})) {
            assert!(
                Instant::now() < deadline,
                "posted: {:?}",
                h.notifier.posts()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let other = serde_json::from_value(rule("tilted", TILTED_LONG, "0s", "0s")).unwrap();
        h.engine.replace(&id, other).await.unwrap();
        h.engine.delete(&id).await.unwrap();
        h.engine.shutdown().await;

        let threads = lock(&h.engine.shared.files.disk_threads).clone();
        // load, rules x3, and the states, outbox and history more than once.
        assert!(threads.len() >= 6, "{threads:?}");
        assert!(
            !threads.contains(&runtime_thread),
            "a write ran on the runtime's thread"
        );
    }
}
