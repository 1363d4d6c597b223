//! The alert-rule engine: departments register SQL rules; each row a rule returns
//! is an alert instance, pending, then firing, then resolved; firing and resolved
//! instances are posted to the rule's webhook and Alertmanager.
//!
//! The path of a rule and of an alert, each step in its file:
//!
//! 1. `rule.rs` — a rule and its checks. `engine.rs` ([`AlertEngine::create`])
//!    also plans the SQL ([`RuleQueries::describe`]): a rule that does not plan is
//!    refused, not stored. `store.rs` writes `<data-dir>/alerts/rules.json` before
//!    the API answers.
//! 2. `schedule.rs` — each rule has a task that evaluates it every `every`;
//!    `rows.rs` turns the answer into observations, `state.rs` moves instances
//!    through pending, firing and resolved.
//! 3. `fast_path.rs` — a rule that is a plain filter on one table is instead
//!    checked against every written batch, on a task of its own so a write's
//!    acknowledgement never waits for it: an instance is returned when a reading of
//!    its series matches, and no longer returned when the series' newest reading
//!    in a batch does not. Its scheduled task still runs, for `for` and
//!    `keep_firing_for`.
//! 4. `notify.rs` — changes worth telling become notifications (webhook version-4
//!    JSON, Alertmanager `/api/v2/alerts`) in the bounded outbox (`outbox.rs`),
//!    where a re-send to an Alertmanager merges into the one still waiting.
//! 5. `store.rs` — a thread of its own appends the outbox's records to
//!    `<data-dir>/alerts/outbox.jsonl` (one fsync per batch), then writes the
//!    states to `state.json` (write, fsync, rename) when they changed, and appends
//!    the history to `history.jsonl`, so no async worker waits on the disk.
//! 6. `delivery.rs` — a thread posts each notification once the store holds it,
//!    oldest first per target, retrying with backoff until accepted: a restart
//!    finds rules, states (with their `active_at`) and the outbox as they were,
//!    and a firing instance stays firing without a second "firing" message.
//! 7. `views.rs` — what `/api/v1/rules` and `/api/v1/alerts` show, and the
//!    `system.rules`, `system.alerts` and `system.alert_events` tables.
//!
//! The engine reaches the rest of the world through three small traits, each with
//! the real thing and an in-memory twin for tests: [`RuleQueries`] (the data),
//! [`Clock`] (time) and [`Notifier`] (the receivers).

pub mod clock;
mod delivery;
pub mod engine;
pub mod error;
mod fast_path;
pub mod notifier;
pub mod notify;
mod outbox;
pub mod queries;
pub mod rows;
pub mod rule;
mod schedule;
pub mod state;
mod store;
#[cfg(test)]
mod testing;
pub mod views;

pub use clock::{Clock, ManualClock, SystemClock};
pub use engine::{AlertEngine, AlertStats, Driver, Seams};
pub use error::RuleError;
pub use notifier::{DeliveryError, HttpNotifier, Notifier, RecordingNotifier};
pub use outbox::OUTBOX_LIMIT;
pub use queries::{EngineQueries, MemoryQueries, RuleQueries};
pub use views::AlertTables;
