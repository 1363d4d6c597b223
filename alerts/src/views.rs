//! What the engine shows: rules, active alerts and their history as the API's
//! JSON, and as the `system.rules`, `system.alerts` and `system.alert_events`
//! tables.

use std::sync::{Arc, OnceLock, Weak};

use citytsdb_query::system::{alert_events_schema, alerts_schema, rules_schema, AlertSource};
use citytsdb_storage::units::rfc3339;
use datafusion::arrow::array::{ArrayRef, RecordBatch, StringArray, TimestampNanosecondArray};
use serde::Serialize;
use serde_json::{json, Value};

use crate::engine::{lock, AlertEngine, Entry, Shared};
use crate::rule::Rule;
use crate::state::{RuleInstances, State};
use crate::store::Event;

fn time(nanos: i64) -> String {
    rfc3339(i128::from(nanos))
}

/// A rule as the API shows it: its definition, how its last evaluation went, and
/// how many instances are pending and firing.
fn rule_json(e: &Entry, active: Option<&RuleInstances>) -> Value {
    let mut v = serde_json::to_value(&e.rule).unwrap_or(Value::Null);
    let count = |s: State| active.map_or(0, |a| a.active.values().filter(|i| i.state == s).count());
    v["last_error"] = e.last_error.clone().map_or(Value::Null, Value::from);
    v["last_evaluation"] = e
        .last_evaluation
        .map_or(Value::Null, |t| Value::from(time(t)));
    v["pending"] = Value::from(count(State::Pending));
    v["firing"] = Value::from(count(State::Firing));
    v
}

impl AlertEngine {
    /// One rule, as the API shows it.
    pub fn get(&self, id: &str) -> Option<Value> {
        let inner = lock(&self.shared.inner);
        let e = inner.rules.get(id)?;
        Some(rule_json(e, inner.state.instances.get(id)))
    }

    /// Every rule (of `department`, if given).
    pub fn list(&self, department: Option<&str>) -> Vec<Value> {
        let inner = lock(&self.shared.inner);
        inner
            .rules
            .values()
            .filter(|e| department.is_none_or(|d| e.rule.spec.department == d))
            .map(|e| rule_json(e, inner.state.instances.get(&e.rule.id)))
            .collect()
    }

    /// The department owning a rule.
    pub fn department_of(&self, id: &str) -> Option<String> {
        lock(&self.shared.inner)
            .rules
            .get(id)
            .map(|e| e.rule.spec.department.clone())
    }

    /// Active instances, filtered by state, department and rule (id or name).
    pub fn alerts(
        &self,
        state: Option<&str>,
        department: Option<&str>,
        rule: Option<&str>,
    ) -> Vec<Value> {
        let inner = lock(&self.shared.inner);
        let mut out = Vec::new();
        for (rule_id, instances) in &inner.state.instances {
            let Some(e) = inner.rules.get(rule_id) else {
                continue;
            };
            let spec = &e.rule.spec;
            if department.is_some_and(|d| spec.department != d)
                || rule.is_some_and(|r| r != rule_id && r != spec.name)
            {
                continue;
            }
            for i in instances.active.values() {
                if state.is_some_and(|s| s != i.state.name()) {
                    continue;
                }
                out.push(json!({
                    "rule_id": rule_id,
                    "rule": spec.name,
                    "department": spec.department,
                    "db": spec.db,
                    "state": i.state.name(),
                    "fingerprint": i.fingerprint,
                    "labels": i.labels,
                    "annotations": i.annotations,
                    "values": i.values,
                    "active_at": time(i.active_at),
                    "fired_at": i.fired_at.map(time),
                    "last_seen": time(i.last_seen),
                }));
            }
        }
        out
    }

    /// State changes between `since` and `until` (Unix nanoseconds), oldest first.
    pub fn history(
        &self,
        since: Option<i64>,
        until: Option<i64>,
        department: Option<&str>,
    ) -> Vec<Value> {
        let inner = lock(&self.shared.inner);
        inner
            .history
            .events()
            .filter(|e| since.is_none_or(|s| e.time >= s) && until.is_none_or(|u| e.time <= u))
            .filter(|e| department.is_none_or(|d| e.department == d))
            .map(|e| {
                json!({
                    "time": time(e.time),
                    "rule_id": e.rule_id,
                    "rule": e.rule_name,
                    "department": e.department,
                    "fingerprint": e.fingerprint,
                    "from": e.from,
                    "to": e.to,
                    "labels": e.labels,
                })
            })
            .collect()
    }
}

/// The alert tables of the `system` schema, served from a running
/// [`AlertEngine`] (empty until one is attached).
#[derive(Default)]
pub struct AlertTables {
    engine: OnceLock<Weak<Shared>>,
}

impl std::fmt::Debug for AlertTables {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlertTables").finish_non_exhaustive()
    }
}

impl AlertTables {
    /// Serves `shared` from now on (the first engine attached stays).
    pub(crate) fn attach(&self, shared: &Arc<Shared>) {
        let _ = self.engine.set(Arc::downgrade(shared));
    }

    fn shared(&self) -> Option<Arc<Shared>> {
        self.engine.get()?.upgrade()
    }
}

fn strings<I: IntoIterator<Item = Option<String>>>(values: I) -> ArrayRef {
    Arc::new(StringArray::from_iter(values))
}

fn times<I: IntoIterator<Item = Option<i64>>>(values: I) -> ArrayRef {
    Arc::new(TimestampNanosecondArray::from_iter(values).with_timezone("UTC"))
}

fn json_text<T: Serialize>(v: &T) -> Option<String> {
    serde_json::to_string(v).ok()
}

type DfResult<T> = datafusion::common::Result<T>;

impl AlertSource for AlertTables {
    fn rules(&self, db: &str) -> DfResult<RecordBatch> {
        let Some(shared) = self.shared() else {
            return Ok(RecordBatch::new_empty(rules_schema()));
        };
        let inner = lock(&shared.inner);
        let rules: Vec<&Rule> = inner
            .rules
            .values()
            .map(|e| &e.rule)
            .filter(|r| r.spec.db == db)
            .collect();
        let col = |f: &dyn Fn(&Rule) -> Option<String>| strings(rules.iter().map(|r| f(r)));
        Ok(RecordBatch::try_new(
            rules_schema(),
            vec![
                col(&|r| Some(r.id.clone())),
                col(&|r| Some(r.spec.name.clone())),
                col(&|r| Some(r.spec.department.clone())),
                col(&|r| Some(r.spec.db.clone())),
                col(&|r| Some(r.spec.sql.clone())),
                col(&|r| Some(r.spec.every.clone())),
                col(&|r| Some(r.spec.for_.clone())),
                col(&|r| Some(r.spec.keep_firing_for.clone())),
                col(&|r| Some(r.spec.severity.clone())),
                col(&|r| json_text(&r.spec.labels)),
                col(&|r| json_text(&r.spec.annotations)),
                col(&|r| r.spec.webhook.clone()),
            ],
        )?)
    }

    fn alerts(&self, db: &str) -> DfResult<RecordBatch> {
        let Some(shared) = self.shared() else {
            return Ok(RecordBatch::new_empty(alerts_schema()));
        };
        let inner = lock(&shared.inner);
        let mut rows = Vec::new();
        for (rule_id, instances) in &inner.state.instances {
            let Some(e) = inner.rules.get(rule_id) else {
                continue;
            };
            if e.rule.spec.db != db {
                continue;
            }
            for i in instances.active.values() {
                rows.push((&e.rule, i));
            }
        }
        Ok(RecordBatch::try_new(
            alerts_schema(),
            vec![
                strings(rows.iter().map(|(r, _)| Some(r.id.clone()))),
                strings(rows.iter().map(|(r, _)| Some(r.spec.name.clone()))),
                strings(rows.iter().map(|(r, _)| Some(r.spec.department.clone()))),
                strings(rows.iter().map(|(_, i)| Some(i.fingerprint.clone()))),
                strings(rows.iter().map(|(_, i)| Some(i.state.name().to_string()))),
                strings(rows.iter().map(|(_, i)| json_text(&i.labels))),
                strings(rows.iter().map(|(_, i)| json_text(&i.annotations))),
                times(rows.iter().map(|(_, i)| Some(i.active_at))),
                times(rows.iter().map(|(_, i)| i.fired_at)),
            ],
        )?)
    }

    fn alert_events(&self, db: &str) -> DfResult<RecordBatch> {
        let Some(shared) = self.shared() else {
            return Ok(RecordBatch::new_empty(alert_events_schema()));
        };
        let inner = lock(&shared.inner);
        let events: Vec<&Event> = inner.history.events().filter(|e| e.db == db).collect();
        let col = |f: &dyn Fn(&Event) -> Option<String>| strings(events.iter().map(|e| f(e)));
        Ok(RecordBatch::try_new(
            alert_events_schema(),
            vec![
                times(events.iter().map(|e| Some(e.time))),
                col(&|e| Some(e.rule_id.clone())),
                col(&|e| Some(e.rule_name.clone())),
                col(&|e| Some(e.department.clone())),
                col(&|e| Some(e.fingerprint.clone())),
                col(&|e| Some(e.from.clone())),
                col(&|e| Some(e.to.clone())),
                col(&|e| json_text(&e.labels)),
            ],
        )?)
    }
}
