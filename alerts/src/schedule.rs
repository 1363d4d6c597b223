//! Each rule's evaluation task: every `every`, run the rule's query and move its
//! instances on. A rule checked on write (`fast_path.rs`) only lets time pass
//! here, which is what `for` and `keep_firing_for` need.
//!
//! Firing alerts are also posted again to a rule's Alertmanager every
//! [`ALERTMANAGER_RESEND`]: it forgets alerts not heard of for its
//! `resolve_timeout` (5 minutes by default). While it is down, a re-send merges
//! into the one still waiting (`outbox.rs`), so the outbox holds one
//! notification per firing alert however long the outage.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Mutex, Weak};
use std::time::Duration;

use serde_json::Value;
use tokio::task::JoinHandle;

use crate::engine::{lock, Inner, Shared};
use crate::notify::{self, Target};
use crate::rows;
use crate::rule::Rule;
use crate::state::State;

/// How often firing alerts are posted to an Alertmanager again.
const ALERTMANAGER_RESEND: Duration = Duration::from_secs(60);

/// The running evaluation tasks, by rule id.
#[derive(Default)]
pub(crate) struct Schedule {
    tasks: Mutex<HashMap<String, JoinHandle<()>>>,
}

impl Schedule {
    /// Starts the task of `rule_id` (stopping the one it had): a first evaluation
    /// now, then one every `every`. A late tick is not made up for.
    pub fn start(&self, shared: Weak<Shared>, rule_id: String, every: Duration) {
        let id = rule_id.clone();
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
                shared.evaluate_now(&rule_id).await;
            }
        });
        if let Some(old) = lock(&self.tasks).insert(id, task) {
            old.abort();
        }
    }

    /// Stops the task of `rule_id`.
    pub fn stop(&self, rule_id: &str) {
        if let Some(task) = lock(&self.tasks).remove(rule_id) {
            task.abort();
        }
    }

    /// Stops every task.
    pub fn stop_all(&self) {
        for (_, task) in lock(&self.tasks).drain() {
            task.abort();
        }
    }
}

impl Shared {
    /// Evaluates one rule now. A failed query keeps the instances as they are and
    /// shows in the rule's `last_error`.
    pub(crate) async fn evaluate_now(&self, rule_id: &str) {
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
            match self.queries.query(&rule.spec.db, &rule.spec.sql).await {
                Ok(batches) => Some(rows::observations(&rule, &batches)),
                Err(e) => {
                    self.stats
                        .evaluation_failures
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(rule = %rule.spec.name, error = %e, "rule evaluation failed; instance states are kept");
                    let now = self.clock.now_nanos();
                    let mut inner = lock(&self.inner);
                    if let Some(entry) = inner.rules.get_mut(rule_id) {
                        entry.last_error = Some(e.to_string());
                        entry.last_evaluation = Some(now);
                    }
                    return;
                }
            }
        };
        let now = self.clock.now_nanos();
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

    /// Queues the rule's firing alerts for its Alertmanager again, when the last
    /// time is [`ALERTMANAGER_RESEND`] ago (the first evaluation only starts the
    /// count: new firing alerts were just told).
    fn resend_to_alertmanager(&self, inner: &mut Inner, rule: &Rule, now: i64) {
        let Some(url) = &rule.spec.alertmanager else {
            return;
        };
        let last = *inner.last_resend.entry(rule.id.clone()).or_insert(now);
        if now - last < ALERTMANAGER_RESEND.as_nanos() as i64 {
            return;
        }
        inner.last_resend.insert(rule.id.clone(), now);
        let firing: Vec<(String, Value)> = inner
            .state
            .instances
            .get(&rule.id)
            .map(|r| {
                r.active
                    .values()
                    .filter(|i| i.state == State::Firing)
                    .map(|i| (i.fingerprint.clone(), notify::alertmanager_alert(i, None)))
                    .collect()
            })
            .unwrap_or_default();
        if !firing.is_empty() {
            let dropped =
                inner
                    .outbox
                    .resend(&rule.id, Target::Alertmanager(url.clone()), firing, now);
            self.outbox_changed(dropped);
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use crate::testing::{answer, at, rule, Harness, TILTED};

    fn state(
        device: &str,
        state: &str,
        active_at: i64,
        fired_at: Option<i64>,
    ) -> (String, String, String, Option<String>) {
        (
            device.to_string(),
            state.to_string(),
            at(active_at),
            fired_at.map(at),
        )
    }

    fn told(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(s, d)| (s.to_string(), d.to_string()))
            .collect()
    }

    #[tokio::test]
    async fn pending_then_firing_after_for() {
        let h = Harness::new().await;
        let id = h.create(rule("tilted", TILTED, "1m", "0s")).await.unwrap();
        h.queries
            .set_answer(TILTED, vec![answer(&[("mh-1", 17.25)])]);

        h.engine.evaluate_now(&id).await;
        assert_eq!(h.states(), [state("mh-1", "pending", 0, None)]);
        h.advance(30.0);
        h.engine.evaluate_now(&id).await;
        assert_eq!(h.states(), [state("mh-1", "pending", 0, None)]);
        assert_eq!(h.store_and_deliver(), 0, "pending is not told");

        h.advance(30.0);
        h.engine.evaluate_now(&id).await;
        assert_eq!(h.states(), [state("mh-1", "firing", 0, Some(60))]);
        assert_eq!(h.store_and_deliver(), 1);
        let posted = h.notifier.posts();
        assert_eq!(posted.len(), 1);
        assert_eq!(posted[0].target.post_url(), crate::testing::HOOK);
        let body = &posted[0].body;
        assert_eq!(body["status"], "firing");
        assert_eq!(body["version"], "4");
        let alert = &body["alerts"][0];
        assert_eq!(
            alert["labels"],
            json!({"alertname": "tilted", "department": "covers", "severity": "warning", "device": "mh-1"})
        );
        assert_eq!(alert["annotations"]["summary"], "mh-1 tilted 17.25 degrees");
        assert_eq!(alert["startsAt"], at(60));
        assert_eq!(alert["endsAt"], "0001-01-01T00:00:00Z");
        assert_eq!(
            h.moves(),
            ["mh-1:inactive->pending", "mh-1:pending->firing"]
        );
        let shown = h.engine.get(&id).unwrap();
        assert_eq!(
            (shown["pending"].clone(), shown["firing"].clone()),
            (json!(0), json!(1))
        );
        assert_eq!(shown["last_evaluation"], at(60));
    }

    #[tokio::test]
    async fn a_pending_instance_no_longer_returned_is_dropped_untold() {
        let h = Harness::new().await;
        let id = h.create(rule("tilted", TILTED, "1m", "0s")).await.unwrap();
        h.queries
            .set_answer(TILTED, vec![answer(&[("mh-1", 17.0), ("mh-2", 18.0)])]);
        h.engine.evaluate_now(&id).await;
        h.advance(15.0);
        h.queries
            .set_answer(TILTED, vec![answer(&[("mh-1", 17.0)])]);
        h.engine.evaluate_now(&id).await;
        assert_eq!(h.states(), [state("mh-1", "pending", 0, None)]);
        let mut moves = h.moves();
        assert_eq!(moves.pop().as_deref(), Some("mh-2:pending->inactive"));
        moves.sort();
        assert_eq!(moves, ["mh-1:inactive->pending", "mh-2:inactive->pending"]);
        h.store_and_deliver();
        assert!(h.notifier.posts().is_empty(), "nothing fired, nothing told");
    }

    #[tokio::test]
    async fn firing_then_resolved_when_no_longer_returned() {
        let h = Harness::new().await;
        let id = h.create(rule("tilted", TILTED, "0s", "0s")).await.unwrap();
        h.queries
            .set_answer(TILTED, vec![answer(&[("mh-1", 20.0)])]);
        h.engine.evaluate_now(&id).await;
        assert_eq!(h.states(), [state("mh-1", "firing", 0, Some(0))]);
        h.advance(15.0);
        h.queries.set_answer(TILTED, vec![]);
        h.engine.evaluate_now(&id).await;
        assert!(h.states().is_empty());
        assert_eq!(h.store_and_deliver(), 2);
        assert_eq!(h.told(), told(&[("firing", "mh-1"), ("resolved", "mh-1")]));
        let resolved = &h.notifier.accepted()[1];
        assert_eq!(resolved["status"], "resolved");
        assert_eq!(resolved["alerts"][0]["startsAt"], at(0));
        assert_eq!(resolved["alerts"][0]["endsAt"], at(15));
        assert_eq!(
            h.moves(),
            [
                "mh-1:inactive->pending",
                "mh-1:pending->firing",
                "mh-1:firing->resolved"
            ]
        );
    }

    #[tokio::test]
    async fn keep_firing_for_holds_a_firing_instance_then_resolves_it() {
        let h = Harness::new().await;
        let id = h.create(rule("tilted", TILTED, "0s", "30s")).await.unwrap();
        h.queries
            .set_answer(TILTED, vec![answer(&[("mh-1", 20.0)])]);
        h.engine.evaluate_now(&id).await;
        h.queries.set_answer(TILTED, vec![]);
        for second in [15, 30] {
            h.advance(15.0);
            h.engine.evaluate_now(&id).await;
            assert_eq!(
                h.states(),
                [state("mh-1", "firing", 0, Some(0))],
                "still firing at {second}s: not returned since 15s"
            );
        }
        h.advance(15.0);
        h.engine.evaluate_now(&id).await;
        assert!(
            h.states().is_empty(),
            "resolved 30s after it stopped being returned"
        );
        h.store_and_deliver();
        assert_eq!(h.told(), told(&[("firing", "mh-1"), ("resolved", "mh-1")]));
        assert_eq!(h.notifier.accepted()[1]["alerts"][0]["endsAt"], at(45));
    }

    #[tokio::test]
    async fn a_failed_evaluation_keeps_the_instances_and_shows_why() {
        let h = Harness::new().await;
        let id = h.create(rule("tilted", TILTED, "0s", "0s")).await.unwrap();
        h.queries
            .set_answer(TILTED, vec![answer(&[("mh-1", 20.0)])]);
        h.engine.evaluate_now(&id).await;
        h.advance(15.0);
        h.queries
            .set_failure(TILTED, "the segment store is unreachable");
        h.engine.evaluate_now(&id).await;
        assert_eq!(h.states(), [state("mh-1", "firing", 0, Some(0))]);
        let shown = h.engine.get(&id).unwrap();
        assert!(
            shown["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("the segment store is unreachable")),
            "{shown}"
        );
        assert_eq!(shown["last_evaluation"], at(15));
        let stats = h.engine.stats();
        assert_eq!(
            (
                stats.evaluations.load(std::sync::atomic::Ordering::Relaxed),
                stats
                    .evaluation_failures
                    .load(std::sync::atomic::Ordering::Relaxed)
            ),
            (2, 1)
        );
        h.advance(15.0);
        h.queries
            .set_answer(TILTED, vec![answer(&[("mh-1", 20.0)])]);
        h.engine.evaluate_now(&id).await;
        assert_eq!(h.engine.get(&id).unwrap()["last_error"], json!(null));
    }

    #[tokio::test]
    async fn firing_alerts_are_posted_to_alertmanager_again_every_minute() {
        let h = Harness::new().await;
        let mut spec = rule("tilted", TILTED, "0s", "0s");
        spec["alertmanager"] = json!("http://am.test:9093/");
        spec.as_object_mut().unwrap().remove("webhook");
        let id = h.create(spec).await.unwrap();
        h.queries
            .set_answer(TILTED, vec![answer(&[("mh-1", 20.0)])]);
        let mut posts = Vec::new();
        for _ in 0..6 {
            h.engine.evaluate_now(&id).await;
            h.store_and_deliver();
            posts.push(h.notifier.posts().len());
            h.advance(15.0);
        }
        // Told at 0s when it fired, again at 60s; not at 15, 30, 45 or 75.
        assert_eq!(posts, [1, 1, 1, 1, 2, 2]);
        let again = &h.notifier.posts()[1];
        assert_eq!(again.target.post_url(), "http://am.test:9093/api/v2/alerts");
        assert_eq!(again.body[0]["labels"]["device"], "mh-1");
        assert!(again.body[0].get("endsAt").is_none(), "still firing");
    }

    #[tokio::test]
    async fn an_alertmanager_outage_leaves_one_notification_per_firing_alert() {
        let h = Harness::new().await;
        let mut spec = rule("tilted", TILTED, "0s", "0s");
        spec["alertmanager"] = json!("http://am.test:9093/");
        spec.as_object_mut().unwrap().remove("webhook");
        let id = h.create(spec).await.unwrap();
        h.queries
            .set_answer(TILTED, vec![answer(&[("mh-1", 20.0)])]);
        h.engine.evaluate_now(&id).await;
        assert_eq!(h.store_and_deliver(), 1, "mh-1 fired and was told");
        // The Alertmanager goes down; mh-2 fires during the outage.
        h.notifier.set_failing(true);
        h.advance(15.0);
        h.queries
            .set_answer(TILTED, vec![answer(&[("mh-1", 20.0), ("mh-2", 30.0)])]);
        // Half an hour of evaluations: 30 re-sends of both.
        for _ in 0..120 {
            h.engine.evaluate_now(&id).await;
            h.store_and_deliver();
            h.advance(15.0);
        }
        assert_eq!(
            h.engine.outbox_len(),
            2,
            "mh-2's firing message and one re-send"
        );
        let stored = h.stored_outbox();
        let waiting: Vec<(bool, Vec<Value>)> = stored
            .as_object()
            .unwrap()
            .values()
            .map(|n| {
                let devices = n["body"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|a| a["labels"]["device"].clone())
                    .collect();
                (n["resend"] == true, devices)
            })
            .collect();
        assert_eq!(
            waiting,
            [(false, vec![json!("mh-2")]), (true, vec![json!("mh-1")])],
            "one notification per alert instance: {stored}"
        );
        assert_eq!(
            h.engine
                .stats()
                .notifications_dropped
                .load(std::sync::atomic::Ordering::Relaxed),
            0
        );

        // Back up: both go, and the outbox is empty.
        h.notifier.set_failing(false);
        h.advance(60.0);
        assert_eq!(h.store_and_deliver(), 2);
        assert!(h.engine.store_now());
        assert_eq!(h.stored_outbox(), json!({}));
        let last: Vec<Value> = h.notifier.accepted()[1..]
            .iter()
            .flat_map(|b| b.as_array().cloned().unwrap_or_default())
            .map(|a| a["labels"]["device"].clone())
            .collect();
        assert_eq!(last, [json!("mh-2"), json!("mh-1")]);
    }
}
