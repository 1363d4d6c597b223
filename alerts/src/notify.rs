//! Notifications: what is told, to whom, in which form, and how long to wait
//! before trying again.
//!
//! A state change that must be told (firing, resolved) becomes one outbox entry
//! per target of its rule: a webhook gets Alertmanager's webhook message (version
//! "4"), an Alertmanager gets its `/api/v2/alerts` list. `delivery.rs` posts them
//! and retries a failure with [`backoff`] (1 s doubling to 60 s) until accepted.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::rule::Rule;
use crate::state::{Change, Instance};
use citytsdb_storage::units::rfc3339;

/// Where a notification goes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "kind", content = "url", rename_all = "lowercase")]
pub enum Target {
    /// An Alertmanager-style webhook receiver: one POST of version-4 JSON.
    Webhook(String),
    /// A Prometheus Alertmanager: `POST {url}/api/v2/alerts`.
    Alertmanager(String),
}

impl Target {
    /// The URL posted to.
    pub fn post_url(&self) -> String {
        match self {
            Self::Webhook(u) => u.clone(),
            Self::Alertmanager(u) => format!("{}/api/v2/alerts", u.trim_end_matches('/')),
        }
    }
}

/// One message waiting in the outbox.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Notification {
    /// Outbox order.
    pub id: u64,
    /// The rule whose instances changed.
    pub rule_id: String,
    /// Where it goes.
    pub target: Target,
    /// The JSON to post.
    pub body: Value,
    /// Attempts made so far.
    pub attempts: u32,
    /// When to try next, Unix nanoseconds.
    pub next_attempt: i64,
    /// Why the last attempt failed.
    pub last_error: Option<String>,
    /// The fingerprints of the alerts it tells are firing: a re-send of one of
    /// them while this waits would say nothing new.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub firing: Vec<String>,
    /// A re-send of a rule's firing alerts to its Alertmanager: the next re-send
    /// replaces it rather than waiting behind it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub resend: bool,
}

/// Delay before retry number `attempts` (1 s, 2 s, 4 s ... at most 60 s).
pub fn backoff(attempts: u32) -> Duration {
    Duration::from_secs(1u64 << attempts.saturating_sub(1).min(6)).min(Duration::from_secs(60))
}

/// Alertmanager's "no end" time, as its webhook messages carry it.
const ZERO_TIME: &str = "0001-01-01T00:00:00Z";

fn time(nanos: i64) -> String {
    rfc3339(i128::from(nanos))
}

fn alert_json(status: &str, i: &Instance, ends_at: Option<i64>) -> Value {
    json!({
        "status": status,
        "labels": i.labels,
        "annotations": i.annotations,
        "startsAt": time(i.fired_at.unwrap_or(i.active_at)),
        "endsAt": ends_at.map(time).unwrap_or_else(|| ZERO_TIME.to_string()),
        "generatorURL": "",
        "fingerprint": i.fingerprint,
    })
}

fn common(maps: &[&BTreeMap<String, String>]) -> BTreeMap<String, String> {
    let Some((first, rest)) = maps.split_first() else {
        return BTreeMap::new();
    };
    first
        .iter()
        .filter(|(k, v)| rest.iter().all(|m| m.get(*k) == Some(*v)))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// The notifications of one rule's changes at one moment: firing and resolved
/// instances (other changes are not told), one message per target.
pub fn messages(rule: &Rule, changes: &[Change]) -> Vec<(Target, Value)> {
    let told: Vec<&Change> = changes
        .iter()
        .filter(|c| c.to == "firing" || c.to == "resolved")
        .collect();
    if told.is_empty() {
        return Vec::new();
    }
    let mut out = Vec::new();
    if let Some(url) = &rule.spec.webhook {
        let alerts: Vec<Value> = told
            .iter()
            .map(|c| match c.to.as_str() {
                "firing" => alert_json("firing", &c.instance, None),
                _ => alert_json("resolved", &c.instance, Some(c.time)),
            })
            .collect();
        let labels: Vec<&BTreeMap<String, String>> =
            told.iter().map(|c| &c.instance.labels).collect();
        let annotations: Vec<&BTreeMap<String, String>> =
            told.iter().map(|c| &c.instance.annotations).collect();
        let status = if told.iter().any(|c| c.to == "firing") {
            "firing"
        } else {
            "resolved"
        };
        out.push((
            Target::Webhook(url.clone()),
            json!({
                "version": "4",
                "groupKey": format!("{{}}:{{alertname=\"{}\"}}", rule.spec.name),
                "truncatedAlerts": 0,
                "status": status,
                "receiver": "citytsdb",
                "groupLabels": {"alertname": rule.spec.name},
                "commonLabels": common(&labels),
                "commonAnnotations": common(&annotations),
                "externalURL": "",
                "alerts": alerts,
            }),
        ));
    }
    if let Some(url) = &rule.spec.alertmanager {
        let alerts: Vec<Value> = told
            .iter()
            .map(|c| alertmanager_alert(&c.instance, (c.to == "resolved").then_some(c.time)))
            .collect();
        out.push((Target::Alertmanager(url.clone()), Value::Array(alerts)));
    }
    out
}

/// One alert in Alertmanager's `/api/v2/alerts` form: without `endsAt` while
/// firing (Alertmanager then keeps it for its `resolve_timeout`, so firing alerts
/// are sent again from time to time), with it once resolved.
pub fn alertmanager_alert(i: &Instance, resolved_at: Option<i64>) -> Value {
    let mut a = json!({
        "labels": i.labels,
        "annotations": i.annotations,
        "startsAt": time(i.fired_at.unwrap_or(i.active_at)),
        "generatorURL": "",
    });
    if let Some(t) = resolved_at {
        a["endsAt"] = Value::from(time(t));
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rule::RuleSpec;
    use crate::state::State;

    #[test]
    fn backoff_doubles_to_a_minute() {
        let secs: Vec<u64> = (1..=9).map(|a| backoff(a).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
    }

    #[test]
    fn webhook_message_is_alertmanager_version_4() {
        let spec: RuleSpec = serde_json::from_str(
            r#"{"name": "tilt", "department": "covers", "db": "city", "sql": "SELECT 1",
                "webhook": "http://127.0.0.1:9/hook", "alertmanager": "http://127.0.0.1:9093/"}"#,
        )
        .unwrap();
        let rule = Rule {
            id: "r1".into(),
            spec,
            fast_path: false,
            updated_at: String::new(),
        };
        let instance = |device: &str| Instance {
            rule_id: "r1".into(),
            fingerprint: "00000000000000aa".into(),
            labels: [("alertname", "tilt"), ("device", device)]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            annotations: BTreeMap::new(),
            values: BTreeMap::new(),
            state: State::Firing,
            active_at: 1_764_547_200_000_000_000,
            fired_at: Some(1_764_547_260_000_000_000),
            last_seen: 0,
            keep_firing_since: None,
        };
        let changes = vec![
            Change {
                time: 1_764_547_260_000_000_000,
                from: "pending".into(),
                to: "firing".into(),
                instance: instance("a"),
            },
            Change {
                time: 1_764_547_260_000_000_000,
                from: "firing".into(),
                to: "resolved".into(),
                instance: instance("b"),
            },
            Change {
                time: 1_764_547_260_000_000_000,
                from: "inactive".into(),
                to: "pending".into(),
                instance: instance("c"),
            },
        ];
        let msgs = messages(&rule, &changes);
        assert_eq!(msgs.len(), 2);
        let (target, body) = &msgs[0];
        assert_eq!(target.post_url(), "http://127.0.0.1:9/hook");
        assert_eq!(body["version"], "4");
        assert_eq!(body["status"], "firing");
        assert_eq!(body["alerts"].as_array().unwrap().len(), 2);
        assert_eq!(body["alerts"][0]["startsAt"], "2025-12-01T00:01:00Z");
        assert_eq!(body["alerts"][0]["endsAt"], ZERO_TIME);
        assert_eq!(body["alerts"][1]["status"], "resolved");
        assert_eq!(body["alerts"][1]["endsAt"], "2025-12-01T00:01:00Z");
        assert_eq!(body["commonLabels"], json!({"alertname": "tilt"}));
        let (target, body) = &msgs[1];
        assert_eq!(target.post_url(), "http://127.0.0.1:9093/api/v2/alerts");
        assert!(body[0].get("endsAt").is_none());
        assert!(body[1].get("endsAt").is_some());
    }
}
