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
