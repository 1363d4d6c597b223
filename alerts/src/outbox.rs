//! The outbox: the notifications not yet accepted, in memory, and
//! `<data-dir>/alerts/outbox.jsonl`, the journal of its changes.
//!
//! Each change is one record, appended by the store thread with the others of its
//! batch and one fsync (never a rewrite of the whole outbox per change):
//!
//! - `enqueued`: a notification joins the outbox;
//! - `replaced`: a re-send of a rule's firing alerts to its Alertmanager replaces
//!   the body of the re-send still waiting, so an outage does not add one
//!   notification a minute;
//! - `attempted`: a post was refused; when to try again, and why;
//! - `delivered`: accepted, it leaves the outbox;
//! - `dropped`: the outbox was full and this one made room for a newer one.
//!
//! Loading replays the records in order; a torn last record (a crash mid-append)
//! is skipped. The journal is rewritten, one `enqueued` record per waiting
//! notification, once it holds more than twice as many records as that (and at
//! least [`REWRITE_FLOOR`]), and after a torn or failed append.
//!
//! The outbox is bounded ([`OUTBOX_LIMIT`] by default): a new notification past
//! the limit drops a waiting re-send if there is one (the next re-send says it
//! again), else the oldest notification. Adding one never waits.
//!
//! `enqueued` and `replaced` records carry the epoch of the `state.json` their
//! batch writes after them. Records newer than the stored `state.json` come from
//! a batch whose states were never written; loading ignores them, so a
//! notification is kept exactly when the state change that made it is.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::notify::{backoff, Notification, Target};

/// Notifications the outbox holds unless configured otherwise.
pub const OUTBOX_LIMIT: usize = 10_000;
/// The journal is not rewritten for its length below this many records.
const REWRITE_FLOOR: usize = 1_000;

/// One line of `outbox.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub(crate) enum Record {
    /// A notification joined the outbox.
    Enqueued {
        /// The epoch of the `state.json` stored with it.
        epoch: u64,
        notification: Notification,
    },
    /// A re-send replaced the body of a waiting one.
    Replaced {
        /// The epoch of the `state.json` stored with it.
        epoch: u64,
        id: u64,
        body: Value,
        firing: Vec<String>,
    },
    /// A post was refused.
    Attempted {
        id: u64,
        attempts: u32,
        next_attempt: i64,
        last_error: Option<String>,
    },
    /// A post was accepted.
    Delivered { id: u64 },
    /// Dropped to make room.
    Dropped { id: u64 },
}

/// What the store thread writes to `outbox.jsonl`.
#[derive(Debug)]
pub(crate) enum JournalWrite {
    /// New records, at the end.
    Append(Vec<Record>),
    /// The whole file: one `enqueued` record per waiting notification.
    Rewrite(Vec<Record>),
}

/// One notification to post, and the change that gave it its body.
#[derive(Debug, Clone)]
pub(crate) struct Posting {
    pub notification: Notification,
    pub change: u64,
}

#[derive(Debug, Clone)]
struct Waiting {
    notification: Notification,
    /// The epoch its body was stored with; `None` until the store takes it.
    epoch: Option<u64>,
    /// The change that gave it its body: it may be posted once that is stored.
    change: u64,
}

/// The waiting notifications, by id (their order), and the journal's records not
/// yet written.
#[derive(Debug)]
pub(crate) struct Outbox {
    waiting: BTreeMap<u64, Waiting>,
    next_id: u64,
    limit: usize,
    unwritten: Vec<Record>,
    /// Counts the bodies set (enqueued and replaced).
    changes: u64,
    /// The journal on disk, with its states, holds the bodies up to this change.
    stored: u64,
    /// Records in `outbox.jsonl`.
    file_records: usize,
    /// The file is to be rewritten from memory (after a torn or failed append,
    /// records to forget, or the outbox of an earlier version's `state.json`);
    /// until then no record is kept for it.
    rewrite: bool,
}

impl Outbox {
    /// An empty outbox holding at most `limit` (at least 1) notifications.
    pub fn new(limit: usize) -> Self {
        Self {
            waiting: BTreeMap::new(),
            next_id: 0,
            limit: limit.max(1),
            unwritten: Vec::new(),
            changes: 0,
            stored: 0,
            file_records: 0,
            rewrite: false,
        }
    }

    /// The outbox an earlier version kept in `state.json`; the first store writes
    /// it to the journal.
    pub fn from_state_file(
        outbox: BTreeMap<u64, Notification>,
        next_id: u64,
        limit: usize,
    ) -> Self {
        let mut o = Self::new(limit);
        o.next_id = next_id.max(outbox.keys().next_back().map_or(0, |id| id + 1));
        o.rewrite = !outbox.is_empty();
        o.waiting = outbox
            .into_iter()
            .map(|(id, notification)| {
                let epoch = Some(0);
                (
                    id,
                    Waiting {
                        notification,
                        epoch,
                        change: 0,
                    },
                )
            })
            .collect();
        o
    }

    /// The outbox `outbox.jsonl` holds, given the epoch of the stored `state.json`.
    pub fn replay(text: &str, stored_epoch: u64, limit: usize) -> Self {
        let mut o = Self::new(limit);
        // Only a record that ends with its newline was written whole.
        let whole = text.rfind('\n').map_or("", |end| &text[..=end]);
        if whole.len() < text.len() {
            tracing::warn!("the last record of the alert outbox journal is torn (a crash mid-write); it is ignored");
            o.rewrite = true;
        }
        for line in whole.lines() {
            o.file_records += 1;
            match serde_json::from_str::<Record>(line) {
                Ok(record) => o.replay_one(record, stored_epoch),
                Err(e) => {
                    tracing::warn!(error = %e, "an unreadable record of the alert outbox journal is ignored");
                    o.rewrite = true;
                }
            }
        }
        o
    }

    fn replay_one(&mut self, record: Record, stored_epoch: u64) {
        match record {
            Record::Enqueued {
                epoch,
                notification,
            } => {
                self.next_id = self.next_id.max(notification.id + 1);
                if epoch > stored_epoch {
                    self.rewrite = true;
                    return;
                }
                let waiting = Waiting {
                    notification,
                    epoch: Some(epoch),
                    change: 0,
                };
                self.waiting.insert(waiting.notification.id, waiting);
            }
            Record::Replaced {
                epoch,
                id,
                body,
                firing,
            } => {
                if epoch > stored_epoch {
                    self.rewrite = true;
                } else if let Some(w) = self.waiting.get_mut(&id) {
                    w.notification.body = body;
                    w.notification.firing = firing;
                    w.epoch = Some(epoch);
                }
            }
            Record::Attempted {
                id,
                attempts,
                next_attempt,
                last_error,
            } => {
                if let Some(w) = self.waiting.get_mut(&id) {
                    w.notification.attempts = attempts;
                    w.notification.next_attempt = next_attempt;
                    w.notification.last_error = last_error;
                }
            }
            Record::Delivered { id } | Record::Dropped { id } => {
                self.waiting.remove(&id);
            }
        }
    }

    /// How many notifications wait.
    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    /// The waiting notifications, oldest first.
    pub fn notifications(&self) -> impl Iterator<Item = &Notification> {
        self.waiting.values().map(|w| &w.notification)
    }

    fn record(&mut self, record: Record) {
        // A rewrite writes everything from memory: no record is needed for it.
        if !self.rewrite {
            self.unwritten.push(record);
        }
    }

    /// Adds a notification, due at `now`; returns the notifications dropped to
    /// make room for it.
    pub fn enqueue(
        &mut self,
        rule_id: &str,
        target: Target,
        body: Value,
        firing: Vec<String>,
        resend: bool,
        now: i64,
    ) -> Vec<Notification> {
        let mut dropped = Vec::new();
        while self.waiting.len() >= self.limit {
            let victim = self
                .waiting
                .values()
                .find(|w| w.notification.resend)
                .or_else(|| self.waiting.values().next())
                .map(|w| w.notification.id);
            let Some(id) = victim else { break };
            if let Some(w) = self.waiting.remove(&id) {
                dropped.push(w.notification);
            }
            self.record(Record::Dropped { id });
        }
        let id = self.next_id;
        self.next_id += 1;
        self.changes += 1;
        let notification = Notification {
            id,
            rule_id: rule_id.to_string(),
            target,
            body,
            attempts: 0,
            next_attempt: now,
            last_error: None,
            firing,
            resend,
        };
        self.record(Record::Enqueued {
            epoch: 0,
            notification: notification.clone(),
        });
        self.waiting.insert(
            id,
            Waiting {
                notification,
                epoch: None,
                change: self.changes,
            },
        );
        dropped
    }

    /// Posts `alerts` (fingerprint and Alertmanager alert) of `rule_id` to
    /// `target` again. An alert a waiting notification already tells firing is
    /// left out; the rest replace the body of the rule's waiting re-send, or
    /// become a new one. Returns the notifications dropped to make room.
    pub fn resend(
        &mut self,
        rule_id: &str,
        target: Target,
        alerts: Vec<(String, Value)>,
        now: i64,
    ) -> Vec<Notification> {
        let same = |n: &Notification| n.rule_id == rule_id && n.target == target;
        let told: BTreeSet<&String> = self
            .notifications()
            .filter(|n| !n.resend && same(n))
            .flat_map(|n| &n.firing)
            .collect();
        let (firing, bodies): (Vec<String>, Vec<Value>) = alerts
            .into_iter()
            .filter(|(fingerprint, _)| !told.contains(fingerprint))
            .unzip();
        if firing.is_empty() {
            return Vec::new();
        }
        let earlier = self
            .notifications()
            .find(|n| n.resend && same(n))
            .map(|n| n.id);
        let body = Value::Array(bodies);
        let Some(id) = earlier else {
            return self.enqueue(rule_id, target, body, firing, true, now);
        };
        self.changes += 1;
        if let Some(w) = self.waiting.get_mut(&id) {
            w.notification.body = body.clone();
            w.notification.firing = firing.clone();
            w.epoch = None;
            w.change = self.changes;
        }
        self.record(Record::Replaced {
            epoch: 0,
            id,
            body,
            firing,
        });
        Vec::new()
    }

    /// The oldest notification of each target, if the store has written it: the
    /// only ones that may be posted (receivers see a rule's messages in order).
    fn heads(&self) -> impl Iterator<Item = &Waiting> {
        let mut heads: BTreeMap<&Target, &Waiting> = BTreeMap::new();
        for w in self.waiting.values() {
            heads.entry(&w.notification.target).or_insert(w);
        }
        heads.into_values().filter(|w| w.change <= self.stored)
    }

    /// What may be posted at `now`.
    pub fn due(&self, now: i64) -> Vec<Posting> {
        self.heads()
            .filter(|w| w.notification.next_attempt <= now)
            .map(|w| Posting {
                notification: w.notification.clone(),
                change: w.change,
            })
            .collect()
    }

    /// When the next post may be made.
    pub fn next_due(&self) -> Option<i64> {
        self.heads().map(|w| w.notification.next_attempt).min()
    }

    /// `posted` was accepted: it leaves the outbox, unless a re-send replaced its
    /// body meanwhile (then the new body goes too).
    pub fn delivered(&mut self, posted: &Posting) {
        let id = posted.notification.id;
        if self
            .waiting
            .get(&id)
            .is_some_and(|w| w.change == posted.change)
        {
            self.waiting.remove(&id);
            self.record(Record::Delivered { id });
        }
    }

    /// Notification `id` was refused at `now` because of `error`: it is tried
    /// again after [`backoff`]. Returns its attempts so far.
    pub fn refused(&mut self, id: u64, error: String, now: i64) -> Option<u32> {
        let w = self.waiting.get_mut(&id)?;
        let n = &mut w.notification;
        n.attempts += 1;
        n.next_attempt = now + backoff(n.attempts).as_nanos() as i64;
        n.last_error = Some(error);
        let record = Record::Attempted {
            id,
            attempts: n.attempts,
            next_attempt: n.next_attempt,
            last_error: n.last_error.clone(),
        };
        let attempts = n.attempts;
        self.record(record);
        Some(attempts)
    }

    /// Whether the journal is behind the outbox in memory.
    pub fn has_unwritten(&self) -> bool {
        self.rewrite || !self.unwritten.is_empty()
    }

    /// Counts the bodies set so far.
    pub fn changes(&self) -> u64 {
        self.changes
    }

    /// What the journal lacks, for a batch whose `state.json` has `epoch`: the new
    /// records, or the whole outbox once the file is twice as long as that.
    pub fn take_unwritten(&mut self, epoch: u64) -> Option<JournalWrite> {
        if !self.has_unwritten() {
            return None;
        }
        for w in self.waiting.values_mut() {
            w.epoch.get_or_insert(epoch);
        }
        let mut new = std::mem::take(&mut self.unwritten);
        let live = self.waiting.len();
        if self.rewrite || self.file_records + new.len() > (2 * live).max(REWRITE_FLOOR) {
            self.rewrite = false;
            self.file_records = live;
            return Some(JournalWrite::Rewrite(
                self.waiting
                    .values()
                    .map(|w| Record::Enqueued {
                        epoch: w.epoch.unwrap_or(epoch),
                        notification: w.notification.clone(),
                    })
                    .collect(),
            ));
        }
        for record in &mut new {
            if let Record::Enqueued { epoch: e, .. } | Record::Replaced { epoch: e, .. } = record {
                *e = epoch;
            }
        }
        self.file_records += new.len();
        Some(JournalWrite::Append(new))
    }

    /// Writing what [`Outbox::take_unwritten`] gave failed: the next store
    /// rewrites the file.
    pub fn write_failed(&mut self) {
        self.rewrite = true;
        self.unwritten.clear();
    }

    /// The journal and its states hold the bodies up to change `changes`: those
    /// notifications may be posted.
    pub fn stored_up_to(&mut self, changes: u64) {
        self.stored = self.stored.max(changes);
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn am() -> Target {
        Target::Alertmanager("http://am.test:9093".into())
    }

    fn alert(fingerprint: &str) -> (String, Value) {
        (
            fingerprint.to_string(),
            json!({"labels": {"fp": fingerprint}}),
        )
    }

    fn text(write: JournalWrite) -> String {
        let (JournalWrite::Append(records) | JournalWrite::Rewrite(records)) = write;
        records
            .iter()
            .map(|r| serde_json::to_string(r).unwrap() + "\n")
            .collect()
    }

    #[test]
    fn a_resend_merges_into_what_waits() {
        let mut o = Outbox::new(100);
        // a fired while the Alertmanager was down: its firing message waits.
        o.enqueue("r", am(), json!([{"a": 1}]), vec!["a".into()], false, 0);
        for minute in 1..=30 {
            assert!(o.resend("r", am(), vec![alert("a")], minute).is_empty());
        }
        assert_eq!(o.len(), 1, "a is told by the waiting message");
        // b fired and was told; then the Alertmanager went down.
        for minute in 31..=60 {
            o.resend("r", am(), vec![alert("a"), alert("b")], minute);
        }
        assert_eq!(o.len(), 2, "one message per alert instance");
        let resend = o.notifications().find(|n| n.resend).unwrap();
        assert_eq!(resend.firing, ["b"]);
        assert_eq!(resend.body, json!([{"labels": {"fp": "b"}}]));
        // Another rule's re-sends are its own.
        o.resend("other", am(), vec![alert("c")], 61);
        assert_eq!(o.len(), 3);
    }

    #[test]
    fn a_full_outbox_drops_resends_first_then_the_oldest() {
        let mut o = Outbox::new(3);
        let hook = Target::Webhook("http://hook.test".into());
        o.enqueue("r", hook.clone(), json!(0), vec![], false, 0);
        o.resend("r", am(), vec![alert("a")], 0);
        o.enqueue("r", hook.clone(), json!(2), vec![], false, 0);
        let dropped = o.enqueue("r", hook.clone(), json!(3), vec![], false, 0);
        assert_eq!(dropped.iter().map(|n| n.id).collect::<Vec<_>>(), [1]);
        let dropped = o.enqueue("r", hook, json!(4), vec![], false, 0);
        assert_eq!(dropped.iter().map(|n| n.id).collect::<Vec<_>>(), [0]);
        let ids: Vec<u64> = o.notifications().map(|n| n.id).collect();
        assert_eq!(ids, [2, 3, 4]);
        // The journal says the same.
        let written = text(o.take_unwritten(1).unwrap());
        let again = Outbox::replay(&written, 1, 3);
        assert_eq!(
            again.notifications().map(|n| n.id).collect::<Vec<_>>(),
            [2, 3, 4]
        );
        assert_eq!(again.next_id, 5);
    }

    #[test]
    fn replay_skips_a_torn_tail_and_records_of_an_unstored_state() {
        let mut o = Outbox::new(100);
        let hook = Target::Webhook("http://hook.test".into());
        o.enqueue("r", hook.clone(), json!(0), vec![], false, 0);
        o.enqueue("r", hook.clone(), json!(1), vec![], false, 0);
        let mut file = text(o.take_unwritten(4).unwrap());
        o.stored_up_to(o.changes());
        let posted = o.due(0).remove(0);
        o.delivered(&posted);
        o.refused(1, "answered 503".into(), 0);
        file += &text(o.take_unwritten(4).unwrap());
        // A batch whose state.json (epoch 5) was never written.
        o.enqueue("r", hook, json!(2), vec![], false, 0);
        file += &text(o.take_unwritten(5).unwrap());

        let whole = Outbox::replay(&file, 5, 100);
        assert_eq!(whole.len(), 2);
        let loaded = Outbox::replay(&file, 4, 100);
        assert_eq!(loaded.len(), 1, "the unstored batch is forgotten");
        assert!(loaded.has_unwritten(), "and the file rewritten without it");
        let n = loaded.notifications().next().unwrap();
        assert_eq!((n.id, n.attempts), (1, 1));
        assert_eq!(n.last_error.as_deref(), Some("answered 503"));
        assert_eq!(loaded.next_id, 3, "ids are not used twice");

        let torn = format!("{file}{{\"op\":\"delivered\",\"i");
        let loaded = Outbox::replay(&torn, 5, 100);
        assert_eq!(loaded.len(), 2);
        assert!(loaded.has_unwritten(), "the torn tail is rewritten away");
    }

    #[test]
    fn the_journal_is_rewritten_once_twice_its_live_size() {
        let mut o = Outbox::new(100);
        let hook = Target::Webhook("http://hook.test".into());
        let mut appended = 0;
        loop {
            o.enqueue("r", hook.clone(), json!(0), vec![], false, 0);
            o.stored_up_to(o.changes());
            let posted = o.due(0).remove(0);
            o.delivered(&posted);
            match o.take_unwritten(1).unwrap() {
                JournalWrite::Append(records) => appended += records.len(),
                JournalWrite::Rewrite(records) => {
                    assert!(records.is_empty(), "nothing waits");
                    break;
                }
            }
        }
        assert_eq!(appended, REWRITE_FLOOR);
        assert_eq!(o.file_records, 0);
    }
}
