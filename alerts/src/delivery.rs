//! The thread that empties the outbox.
//!
//! A notification is posted only once the store holds it (its `outbox.jsonl`
//! record and the `state.json` of its batch), so a crash can neither lose it nor
//! leave it told but unrecorded (which would tell it again after the restart).
//! Per target, only the oldest may go: receivers see firing before resolved. A
//! refused one is tried again after [`crate::notify::backoff`]; an accepted one
//! leaves the outbox (and the journal says so with the next batch, so a crash in
//! between sends it again: at least once). Posting blocks on the receivers, so it
//! happens here, never on an async worker, and without the engine's lock.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::engine::{lock, Shared};

/// The longest the delivery thread sleeps without looking at the outbox.
const IDLE: Duration = Duration::from_secs(1);

impl Shared {
    /// Posts due notifications until none is due; returns how many posts were tried.
    pub(crate) fn deliver_due(&self) -> usize {
        let mut tried = 0;
        loop {
            let due = lock(&self.inner).outbox.due(self.clock.now_nanos());
            if due.is_empty() || self.stopping.load(Ordering::SeqCst) {
                return tried;
            }
            for posting in due {
                tried += 1;
                let n = &posting.notification;
                let result = self.notifier.post(&n.target, &n.body);
                let now = self.clock.now_nanos();
                let mut inner = lock(&self.inner);
                match result {
                    Ok(()) => {
                        self.stats
                            .notifications_sent
                            .fetch_add(1, Ordering::Relaxed);
                        inner.outbox.delivered(&posting);
                    }
                    Err(e) => {
                        self.stats
                            .notifications_failed
                            .fetch_add(1, Ordering::Relaxed);
                        if let Some(attempts) = inner.outbox.refused(n.id, e.to_string(), now) {
                            tracing::warn!(target = %n.target.post_url(), attempts, error = %e, "notification not delivered; will retry");
                        }
                    }
                }
                drop(inner);
                self.outbox_changed(Vec::new());
            }
        }
    }
}

/// The delivery thread: sleeps until a notification is due (or [`IDLE`]),
/// posts, and again, until the engine stops.
pub(crate) fn run(shared: Arc<Shared>) {
    loop {
        {
            let mut inner = lock(&shared.inner);
            loop {
                if shared.stopping.load(Ordering::SeqCst) {
                    return;
                }
                let now = shared.clock.now_nanos();
                let wait = match inner.outbox.next_due() {
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
            h.stored_outbox()["0"]["body"]["alerts"][0]["labels"]["device"],
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
        let outbox = h.stored_outbox().clone();
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
        assert_eq!(h.stored_outbox(), serde_json::json!({}));
        assert_eq!(h.engine.outbox_len(), 0);
    }

    #[tokio::test]
    async fn a_full_outbox_drops_the_oldest_and_counts_it() {
        let h = Harness::with(crate::Driver::Caller, 3).await;
        let id = h.create(rule("tilted", TILTED, "0s", "0s")).await.unwrap();
        h.notifier.set_failing(true);
        let devices = ["mh-1", "mh-2", "mh-3", "mh-4", "mh-5", "mh-6"];
        for n in 1..=devices.len() {
            let tilted: Vec<(&str, f64)> = devices[..n].iter().map(|d| (*d, 20.0)).collect();
            h.queries.set_answer(TILTED, vec![answer(&tilted)]);
            h.engine.evaluate_now(&id).await;
            h.store_and_deliver();
            h.advance(1.0);
        }
        assert_eq!(h.engine.outbox_len(), 3, "the limit holds");
        let stats = h.engine.stats();
        assert_eq!(stats.notifications_dropped.load(Ordering::Relaxed), 3);
        let stored = h.stored_outbox();
        assert_eq!(
            stored
                .as_object()
                .map(|o| o.keys().cloned().collect::<Vec<_>>()),
            Some(vec!["3".to_string(), "4".to_string(), "5".to_string()]),
            "the newest three: {stored}"
        );

        // A restart finds the same three, and they go once the receiver is back.
        let h = h.restart().await;
        assert_eq!(h.engine.outbox_len(), 3);
        h.notifier.set_failing(false);
        h.advance(120.0);
        assert_eq!(h.store_and_deliver(), 3);
        let told: Vec<String> = h.told().into_iter().map(|(_, d)| d).collect();
        assert_eq!(told, ["mh-4", "mh-5", "mh-6"]);
    }

    #[tokio::test]
    async fn delivery_records_are_appended_not_rewritten() {
        use std::os::unix::fs::MetadataExt;

        let h = Harness::new().await;
        let id = h.create(rule("tilted", TILTED, "0s", "0s")).await.unwrap();
        h.notifier.set_failing(true);
        h.queries
            .set_answer(TILTED, vec![answer(&[("mh-1", 20.0)])]);
        h.engine.evaluate_now(&id).await;
        assert!(h.engine.store_now());
        let journal = h.dir.path().join("alerts/outbox.jsonl");
        let state = h.dir.path().join("alerts/state.json");
        let inode = |p: &std::path::Path| std::fs::metadata(p).unwrap().ino();
        let (journal_inode, state_inode) = (inode(&journal), inode(&state));
        let mut before = std::fs::read_to_string(&journal).unwrap();
        assert_eq!(before.lines().count(), 1, "enqueued: {before}");

        for (accepted, op) in [
            (false, "attempted"),
            (false, "attempted"),
            (true, "delivered"),
        ] {
            h.notifier.set_failing(!accepted);
            h.advance(60.0);
            assert_eq!(h.engine.deliver_due(), 1);
            assert!(h.engine.store_now());
            let after = std::fs::read_to_string(&journal).unwrap();
            let added = after.strip_prefix(&before).expect("the file only grows");
            assert_eq!(added.lines().count(), 1, "one record: {added}");
            let record: serde_json::Value = serde_json::from_str(added).unwrap();
            assert_eq!(record["op"], op);
            assert_eq!(inode(&journal), journal_inode, "the same file, appended to");
            assert_eq!(inode(&state), state_inode, "state.json is not rewritten");
            before = after;
        }
        assert_eq!(h.stored_outbox(), serde_json::json!({}));
    }
}
