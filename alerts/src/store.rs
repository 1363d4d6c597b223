//! What the engine keeps under `<data-dir>/alerts/`, and the thread that writes
//! the states, the outbox and the history there.
//!
//! - `rules.json`: the registered rules, replaced whole (write, fsync, rename) by
//!   create, replace and delete, on the blocking pool, before they answer.
//! - `state.json`: every rule's instances, the outbox and its next id, replaced
//!   whole by the store thread after changes. Changes made while one write runs go
//!   in the next, so a burst costs one fsync rather than one per change. An outbox
//!   entry is posted only once a stored `state.json` holds it: a crash may lose
//!   changes not yet stored, but then it lost their notifications with them, so
//!   after the restart the change is made again and told once.
//! - `history.jsonl`: state changes, appended by the same thread just before the
//!   states, not fsynced (the history informs; states and outbox are what must
//!   survive), and rewritten with only the kept changes once it has grown to
//!   twice their number.

use std::collections::{BTreeMap, VecDeque};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use citytsdb_storage::files::write_atomically;
use citytsdb_storage::paths;
use serde::{Deserialize, Serialize};

use crate::engine::{lock, Shared};
use crate::error::RuleError;
use crate::notify::Notification;
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
    /// Notifications not yet accepted, by id (their order).
    pub outbox: BTreeMap<u64, Notification>,
    /// The id of the next notification.
    pub next_id: u64,
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

/// How far `state.json` is behind the states and the outbox in memory.
#[derive(Debug, Default)]
pub(crate) struct Unsaved {
    /// Counts changes to the states and the outbox.
    changed: u64,
    /// The count the stored `state.json` includes.
    stored: u64,
    /// Outbox entries with a smaller id are in the stored `state.json`.
    stored_below: u64,
}

impl Unsaved {
    /// Right after loading: everything in memory came from the disk.
    pub fn loaded(state: &Persisted) -> Self {
        Self {
            stored_below: state.next_id,
            ..Self::default()
        }
    }

    /// The states or the outbox changed.
    pub fn change(&mut self) {
        self.changed += 1;
    }

    /// Whether a stored `state.json` holds `notification`, so it may be posted.
    pub fn holds(&self, notification: &Notification) -> bool {
        notification.id < self.stored_below
    }

    fn behind(&self) -> bool {
        self.changed != self.stored
    }
}

/// What opening finds under `<data-dir>/alerts/`.
pub(crate) struct Loaded {
    pub rules: Vec<Rule>,
    pub state: Persisted,
    pub history: History,
}

/// The files under `<data-dir>/alerts/`.
#[derive(Debug)]
pub(crate) struct Files {
    dir: PathBuf,
    rules: PathBuf,
    state: PathBuf,
    history: PathBuf,
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
            history: paths::alert_history_file(data_dir),
        }
    }

    /// Reads rules, states, outbox and history (creating the directory the first
    /// time). Blocks on the disk.
    pub fn load(&self) -> Result<Loaded, RuleError> {
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| RuleError::Internal(format!("creating {}: {e}", self.dir.display())))?;
        let rules = read_json(&self.rules)?;
        let state = read_json(&self.state)?;
        let mut history = History::default();
        if let Ok(text) = std::fs::read_to_string(&self.history) {
            for line in text.lines() {
                history.file_lines += 1;
                // A torn last line (a crash mid-append) is skipped.
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
            history,
        })
    }

    /// Replaces `rules.json` with `rules`; durable when it returns. Blocks on the
    /// disk: call it on the blocking pool.
    pub fn write_rules(&self, rules: &[Rule]) -> Result<(), RuleError> {
        let bytes =
            serde_json::to_vec_pretty(rules).map_err(|e| RuleError::Internal(e.to_string()))?;
        write_atomically(&self.rules, &bytes)
            .map_err(|e| RuleError::Internal(format!("storing the rules: {e}")))
    }

    fn write_history(&self, write: HistoryWrite) {
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
}

impl Shared {
    /// Writes what changed since the last store: the new history lines, then
    /// `state.json`; outbox entries it holds may be posted once it returns.
    /// Returns whether `state.json` is now up to date. Blocks on the disk.
    pub(crate) fn store_now(&self) -> bool {
        // One writer at a time: the store thread, a shutdown, or a caller.
        let _writer = lock(&self.store_writer);
        let (history, state) = {
            let mut inner = lock(&self.inner);
            let history = inner.history.take_unwritten();
            let state = inner.unsaved.behind().then(|| {
                (
                    serde_json::to_vec(&inner.state),
                    inner.unsaved.changed,
                    inner.state.next_id,
                )
            });
            (history, state)
        };
        if let Some(history) = history {
            self.files.write_history(history);
        }
        let Some((bytes, changed, next_id)) = state else {
            return true;
        };
        let written = bytes
            .map_err(std::io::Error::other)
            .and_then(|b| write_atomically(&self.files.state, &b));
        match written {
            Ok(()) => {
                let mut inner = lock(&self.inner);
                let unsaved = &mut inner.unsaved;
                unsaved.stored = unsaved.stored.max(changed);
                unsaved.stored_below = unsaved.stored_below.max(next_id);
                let up_to_date = !unsaved.behind();
                drop(inner);
                self.outbox_wake.notify_all();
                up_to_date
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot store the alert states and outbox; notifications wait until they are stored");
                false
            }
        }
    }
}

/// The store thread: writes whenever something changed, until the engine stops
/// (its last write is [`crate::AlertEngine::shutdown`]'s).
pub(crate) fn run(shared: Arc<Shared>) {
    loop {
        {
            let mut inner = lock(&shared.inner);
            while !inner.unsaved.behind() && inner.history.unwritten.is_empty() {
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
        if !stored && lock(&shared.inner).unsaved.behind() {
            std::thread::sleep(RETRY);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

        // A torn last line is skipped on load.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&files.history)
            .unwrap()
            .write_all(b"{\"time\": 5, \"rule")
            .unwrap();
        let loaded = files.load().unwrap();
        assert_eq!(loaded.history.file_lines, HISTORY + 1);
        assert_eq!(loaded.history.events().count(), HISTORY);
        assert_eq!(loaded.history.events().last().map(|e| e.time), Some(-1));
    }

    use crate::rows::instance_fingerprint;
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
        let outbox = h.stored_state()["outbox"].clone();
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
        let stored = h.stored_state();
        assert_eq!(stored["outbox"], serde_json::json!({}));
        assert_eq!(stored["next_id"], 8);
        assert_eq!(stored["instances"][id]["active"][&fp]["active_at"], T0);
    }
}
