//! Each rule's evaluation task: every `every`, run the rule's query and move its
//! instances on. A rule checked on write (`fast_path.rs`) only lets time pass
//! here, which is what `for` and `keep_firing_for` need.
//!
//! Firing alerts are also posted again to a rule's Alertmanager every
//! [`ALERTMANAGER_RESEND`]: it forgets alerts not heard of for its
//! `resolve_timeout` (5 minutes by default).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Mutex, Weak};
use std::time::Duration;

use serde_json::Value;
use tokio::task::JoinHandle;

use crate::delivery;
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
            delivery::enqueue(
                &mut inner.state,
                &rule.id,
                Target::Alertmanager(url.clone()),
                Value::Array(firing),
                now,
            );
            self.mark_changed(inner);
        }
    }
}
