//! Alert instances and their states, as Prometheus defines them.
//!
//! An instance is pending from the first evaluation that returns it, firing once
//! it has been returned at every evaluation for the rule's `for` (at once when
//! `for` is `0s`), and resolved when it is no longer returned — a firing instance
//! only after `keep_firing_for` of not being returned. A pending instance that is
//! no longer returned is simply dropped. Times are Unix nanoseconds.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::rule::Timing;

/// Where an instance stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Returned, not yet for long enough.
    Pending,
    /// Returned for long enough; notifications went out.
    Firing,
}

impl State {
    /// The state's name in the API.
    pub fn name(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Firing => "firing",
        }
    }
}

/// One alert instance of a rule: the rule plus the values of its identity columns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Instance {
    /// The rule's id.
    pub rule_id: String,
    /// Hash of the labels: the instance's identity.
    pub fingerprint: String,
    /// `alertname`, `department`, `severity`, the rule's labels and the identity columns.
    pub labels: BTreeMap<String, String>,
    /// Annotations with the templates filled from the latest returned row.
    pub annotations: BTreeMap<String, String>,
    /// The numeric columns of the latest returned row.
    pub values: BTreeMap<String, serde_json::Value>,
    /// Pending or firing.
    pub state: State,
    /// When it was first returned (Prometheus's `activeAt`).
    pub active_at: i64,
    /// When it started firing.
    pub fired_at: Option<i64>,
    /// When it was last returned.
    pub last_seen: i64,
    /// Since when a firing instance has not been returned (it keeps firing for
    /// `keep_firing_for` from here).
    pub keep_firing_since: Option<i64>,
}

/// What an evaluation returned for one instance.
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    /// See [`Instance::fingerprint`].
    pub fingerprint: String,
    /// See [`Instance::labels`].
    pub labels: BTreeMap<String, String>,
    /// See [`Instance::annotations`].
    pub annotations: BTreeMap<String, String>,
    /// See [`Instance::values`].
    pub values: BTreeMap<String, serde_json::Value>,
}

/// A state change, for the history and the notifications.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Change {
    /// When, Unix nanoseconds.
    pub time: i64,
    /// `inactive`, `pending` or `firing`.
    pub from: String,
    /// `pending`, `firing`, `resolved` or `inactive` (a pending instance dropped).
    pub to: String,
    /// The instance after the change.
    pub instance: Instance,
}

/// Prometheus's label-set fingerprint idea: FNV-1a over the sorted labels.
pub fn fingerprint(labels: &BTreeMap<String, String>) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (k, v) in labels {
        for b in k.bytes().chain([0xff]).chain(v.bytes()).chain([0xff]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

fn nanos(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

/// The active instances of one rule.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RuleInstances {
    /// Active instances by fingerprint.
    pub active: BTreeMap<String, Instance>,
}

impl RuleInstances {
    /// The instance was returned at `now`.
    pub fn seen(
        &mut self,
        rule_id: &str,
        timing: &Timing,
        now: i64,
        obs: Observation,
        out: &mut Vec<Change>,
    ) {
        match self.active.get_mut(&obs.fingerprint) {
            Some(i) => {
                i.labels = obs.labels;
                i.annotations = obs.annotations;
                i.values = obs.values;
                i.last_seen = now;
                i.keep_firing_since = None;
                if i.state == State::Pending && now - i.active_at >= nanos(timing.for_) {
                    i.state = State::Firing;
                    i.fired_at = Some(now);
                    out.push(change(now, "pending", "firing", i));
                }
            }
            None => {
                let mut i = Instance {
                    rule_id: rule_id.to_string(),
                    fingerprint: obs.fingerprint.clone(),
                    labels: obs.labels,
                    annotations: obs.annotations,
                    values: obs.values,
                    state: State::Pending,
                    active_at: now,
                    fired_at: None,
                    last_seen: now,
                    keep_firing_since: None,
                };
                out.push(change(now, "inactive", "pending", &i));
                if timing.for_.is_zero() {
                    i.state = State::Firing;
                    i.fired_at = Some(now);
                    out.push(change(now, "pending", "firing", &i));
                }
                self.active.insert(obs.fingerprint, i);
            }
        }
    }

    /// The instance was not returned at `now` (an evaluation without it, or a new
    /// reading of its series that no longer matches).
    pub fn unseen(&mut self, timing: &Timing, now: i64, fingerprint: &str, out: &mut Vec<Change>) {
        let Some(i) = self.active.get_mut(fingerprint) else {
            return;
        };
        match i.state {
            State::Pending => {
                let i = self.active.remove(fingerprint).expect("present");
                out.push(change(now, "pending", "inactive", &i));
            }
            State::Firing => {
                let since = *i.keep_firing_since.get_or_insert(now);
                if now - since >= nanos(timing.keep_firing_for) {
                    let i = self.active.remove(fingerprint).expect("present");
                    out.push(change(now, "firing", "resolved", &i));
                }
            }
        }
    }

    /// One evaluation's whole answer: `seen` for each returned instance, `unseen`
    /// for every active one it did not return.
    pub fn evaluate(
        &mut self,
        rule_id: &str,
        timing: &Timing,
        now: i64,
        returned: Vec<Observation>,
        out: &mut Vec<Change>,
    ) {
        let returned_fps: std::collections::BTreeSet<String> =
            returned.iter().map(|o| o.fingerprint.clone()).collect();
        for obs in returned {
            self.seen(rule_id, timing, now, obs, out);
        }
        let gone: Vec<String> = self
            .active
            .keys()
            .filter(|fp| !returned_fps.contains(*fp))
            .cloned()
            .collect();
        for fp in gone {
            self.unseen(timing, now, &fp, out);
        }
    }

    /// Time passing for a rule checked on write: instances still matching are
    /// still returned, ones waiting out `keep_firing_for` are not.
    pub fn tick(&mut self, timing: &Timing, now: i64, out: &mut Vec<Change>) {
        let fps: Vec<String> = self.active.keys().cloned().collect();
        for fp in fps {
            let Some(i) = self.active.get_mut(&fp) else {
                continue;
            };
            if i.keep_firing_since.is_some() {
                self.unseen(timing, now, &fp, out);
            } else if i.state == State::Pending && now - i.active_at >= nanos(timing.for_) {
                i.state = State::Firing;
                i.fired_at = Some(now);
                out.push(change(now, "pending", "firing", i));
            }
        }
    }
}

fn change(time: i64, from: &str, to: &str, i: &Instance) -> Change {
    Change {
        time,
        from: from.into(),
        to: to.into(),
        instance: i.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const S: i64 = 1_000_000_000;

    fn obs(device: &str) -> Observation {
        let labels: BTreeMap<String, String> = [("device".to_string(), device.to_string())].into();
        Observation {
            fingerprint: fingerprint(&labels),
            labels,
            annotations: BTreeMap::new(),
            values: BTreeMap::new(),
        }
    }

    fn timing(for_: u64, keep: u64) -> Timing {
        Timing {
            every: Duration::from_secs(15),
            for_: Duration::from_secs(for_),
            keep_firing_for: Duration::from_secs(keep),
        }
    }

    fn moves(changes: &[Change]) -> Vec<String> {
        changes
            .iter()
            .map(|c| {
                format!(
                    "{}@{}:{}->{}",
                    c.instance.labels["device"],
                    c.time / S,
                    c.from,
                    c.to
                )
            })
            .collect()
    }

    #[test]
    fn pending_then_firing_after_for_then_resolved() {
        let t = timing(60, 0);
        let mut r = RuleInstances::default();
        let mut out = Vec::new();
        r.evaluate("r", &t, 0, vec![obs("a"), obs("b")], &mut out);
        r.evaluate("r", &t, 30 * S, vec![obs("a")], &mut out); // b dropped while pending
        r.evaluate("r", &t, 60 * S, vec![obs("a")], &mut out);
        r.evaluate("r", &t, 75 * S, vec![obs("a")], &mut out);
        r.evaluate("r", &t, 90 * S, vec![], &mut out);
        assert_eq!(
            moves(&out),
            [
                "a@0:inactive->pending",
                "b@0:inactive->pending",
                "b@30:pending->inactive",
                "a@60:pending->firing",
                "a@90:firing->resolved"
            ]
        );
        assert!(r.active.is_empty());
    }

    #[test]
    fn keep_firing_for_holds_a_firing_instance() {
        let t = timing(0, 30);
        let mut r = RuleInstances::default();
        let mut out = Vec::new();
        r.evaluate("r", &t, 0, vec![obs("a")], &mut out);
        r.evaluate("r", &t, 15 * S, vec![], &mut out);
        r.evaluate("r", &t, 30 * S, vec![obs("a")], &mut out); // back: the clock restarts
        r.evaluate("r", &t, 45 * S, vec![], &mut out);
        r.evaluate("r", &t, 60 * S, vec![], &mut out);
        r.evaluate("r", &t, 75 * S, vec![], &mut out);
        assert_eq!(
            moves(&out),
            [
                "a@0:inactive->pending",
                "a@0:pending->firing",
                "a@75:firing->resolved"
            ]
        );
    }

    #[test]
    fn ticks_promote_and_expire_instances_checked_on_write() {
        let t = timing(10, 5);
        let mut r = RuleInstances::default();
        let mut out = Vec::new();
        r.seen("r", &t, 0, obs("a"), &mut out);
        r.tick(&t, 5 * S, &mut out);
        r.tick(&t, 10 * S, &mut out);
        r.unseen(&t, 12 * S, &fingerprint(&obs("a").labels), &mut out);
        r.tick(&t, 16 * S, &mut out);
        r.tick(&t, 17 * S, &mut out);
        assert_eq!(
            moves(&out),
            [
                "a@0:inactive->pending",
                "a@10:pending->firing",
                "a@17:firing->resolved"
            ]
        );
    }

    #[test]
    fn fingerprints_depend_on_every_label() {
        let a = obs("a").labels;
        let mut b = a.clone();
        b.insert("x".into(), "".into());
        assert_ne!(fingerprint(&a), fingerprint(&b));
        assert_eq!(fingerprint(&a), fingerprint(&obs("a").labels));
        assert_eq!(fingerprint(&a).len(), 16);
    }
}
