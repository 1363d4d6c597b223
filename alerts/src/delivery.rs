//! The outbox and the thread that empties it.
//!
//! Every notification waits in the outbox, which `state.json` stores with the
//! instance states. An entry is posted only once a stored `state.json` holds it,
//! so a crash can neither lose it nor leave it told but unrecorded (which would
//! tell it again after the restart). Per target, only the oldest entry may go:
//! receivers see firing before resolved. A refused entry is tried again after
//! [`backoff`]; an accepted one leaves the outbox (and the stored one with the
//! next store, so a crash in between sends it again: at least once).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use crate::engine::{lock, Inner, Shared};
use crate::notify::{backoff, Notification, Target};
use crate::store::Persisted;

/// The longest the delivery thread sleeps without looking at the outbox.
const IDLE: Duration = Duration::from_secs(1);

/// Adds a notification to the outbox, due at `now`.
pub(crate) fn enqueue(state: &mut Persisted, rule_id: &str, target: Target, body: Value, now: i64) {
    let id = state.next_id;
    state.next_id += 1;
    state.outbox.insert(
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

/// The oldest entry of each target that a stored `state.json` holds.
fn heads(inner: &Inner) -> Vec<&Notification> {
    let mut heads: BTreeMap<&Target, &Notification> = BTreeMap::new();
    for n in inner.state.outbox.values() {
        heads.entry(&n.target).or_insert(n);
    }
    heads
        .into_values()
        .filter(|n| inner.unsaved.holds(n))
        .collect()
}

impl Shared {
    /// Posts due entries until none is due; returns how many posts were tried.
    pub(crate) fn deliver_due(&self) -> usize {
        let mut tried = 0;
        loop {
            let due: Vec<Notification> = {
                let inner = lock(&self.inner);
                let now = self.clock.now_nanos();
                heads(&inner)
                    .into_iter()
                    .filter(|n| n.next_attempt <= now)
                    .cloned()
                    .collect()
            };
            if due.is_empty() || self.stopping.load(Ordering::SeqCst) {
                return tried;
            }
            for n in due {
                tried += 1;
                let result = self.notifier.post(&n.target, &n.body);
                let now = self.clock.now_nanos();
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
                            entry.next_attempt = now + backoff(entry.attempts).as_nanos() as i64;
                            tracing::warn!(target = %n.target.post_url(), attempts = entry.attempts, error = %e, "notification not delivered; will retry");
                            entry.last_error = Some(e.to_string());
                        }
                    }
                }
                self.mark_changed(&mut inner);
            }
        }
    }
}

/// The delivery thread: sleeps until an entry is due (or [`IDLE`]), posts, and
/// again, until the engine stops.
pub(crate) fn run(shared: Arc<Shared>) {
    loop {
        {
            let mut inner = lock(&shared.inner);
            loop {
                if shared.stopping.load(Ordering::SeqCst) {
                    return;
                }
                let now = shared.clock.now_nanos();
                let next = heads(&inner).iter().map(|n| n.next_attempt).min();
                let wait = match next {
                    Some(t) if t <= now => break,
                    Some(t) => Duration::from_nanos((t - now) as u64).min(IDLE),
                    None => IDLE,
                };
                inner = shared
                    .outbox_wake
                    .wait_timeout(inner, wait)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        }
        shared.deliver_due();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use crate::testing::{answer, rule, Harness, HOOK, S, T0, TILTED};

    #[tokio::test]
    async fn nothing_is_posted_before_the_outbox_is_stored() {
        let h = Harness::new().await;
        let id = h.create(rule("tilted", TILTED, "0s", "0s")).await.unwrap();
        h.queries
            .set_answer(TILTED, vec![answer(&[("mh-1", 20.0)])]);
        h.engine.evaluate_now(&id).await;
        assert_eq!(h.engine.deliver_due(), 0, "not stored yet");
        assert!(h.notifier.posts().is_empty());
        assert!(h.engine.store_now());
        assert_eq!(
            h.stored_state()["outbox"]["0"]["body"]["alerts"][0]["labels"]["device"],
            "mh-1",
            "stored before it is sent"
        );
        assert_eq!(h.engine.deliver_due(), 1);
        assert_eq!(h.notifier.accepted().len(), 1);
    }

    #[tokio::test]
    async fn a_refused_notification_is_retried_with_backoff_and_order_is_kept() {
        let h = Harness::new().await;
        let id = h.create(rule("tilted", TILTED, "0s", "0s")).await.unwrap();
        h.notifier.set_failing(true);
        h.queries
            .set_answer(TILTED, vec![answer(&[("mh-1", 20.0)])]);
        h.engine.evaluate_now(&id).await;
        h.advance(5.0);
        h.queries.set_answer(TILTED, vec![]);
        h.engine.evaluate_now(&id).await;

        // Only the oldest entry of the target is tried; it is refused.
        assert_eq!(h.store_and_deliver(), 1);
        assert!(h.engine.store_now());
        let outbox = h.stored_state()["outbox"].clone();
        assert_eq!(outbox.as_object().map(|o| o.len()), Some(2));
        assert_eq!(outbox["0"]["attempts"], 1);
        assert_eq!(outbox["0"]["next_attempt"], T0 + 6 * S);
        assert_eq!(
            outbox["0"]["last_error"],
            format!("POST {HOOK}: answered 503")
        );
        assert_eq!(outbox["1"]["attempts"], 0);

        h.advance(0.5);
        assert_eq!(h.engine.deliver_due(), 0, "waits out 1 s");
        h.advance(0.5);
        assert_eq!(h.engine.deliver_due(), 1, "refused again");
        h.notifier.set_failing(false);
        h.advance(1.0);
        assert_eq!(h.engine.deliver_due(), 0, "waits out 2 s");
        h.advance(1.0);
        assert_eq!(h.engine.deliver_due(), 2, "the head, then the next");

        let attempts: Vec<(String, bool)> = h
            .notifier
            .posts()
            .iter()
            .map(|p| {
                (
                    p.body["status"].as_str().unwrap_or_default().to_string(),
                    p.accepted,
                )
            })
            .collect();
        assert_eq!(
            attempts,
            [
                ("firing".to_string(), false),
                ("firing".to_string(), false),
                ("firing".to_string(), true),
                ("resolved".to_string(), true),
            ]
        );
        let stats = h.engine.stats();
        assert_eq!(stats.notifications_failed.load(Ordering::Relaxed), 2);
        assert_eq!(stats.notifications_sent.load(Ordering::Relaxed), 2);
        assert!(h.engine.store_now());
        assert_eq!(h.stored_state()["outbox"], serde_json::json!({}));
        assert_eq!(h.stored_state()["next_id"], 2);
    }
}
