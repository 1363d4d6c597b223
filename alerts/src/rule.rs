//! A rule as departments register it: what to ask, how often, how long before it
//! fires, and where to send the news.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use citytsdb_storage::units::parse_duration;

/// What a client sends to register or replace a rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    /// Short name, the `alertname` label.
    pub name: String,
    /// The department that owns the rule (`rules:DEPARTMENT` tokens manage it).
    pub department: String,
    /// The question: each row it returns is one alert instance.
    pub sql: String,
    /// Database the SQL runs against.
    pub db: String,
    /// How often the rule is evaluated (default `15s`).
    #[serde(default = "default_every")]
    pub every: String,
    /// How long an instance must keep being returned before it fires (default `0s`).
    #[serde(default = "zero", rename = "for")]
    pub for_: String,
    /// How long a firing instance keeps firing after it stops being returned.
    #[serde(default = "zero")]
    pub keep_firing_for: String,
    /// The `severity` label (default `warning`).
    #[serde(default = "default_severity")]
    pub severity: String,
    /// Extra labels; values may use `{{column}}` templates.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Annotations; values may use `{{column}}` templates.
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// Where to POST Alertmanager webhook messages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<String>,
    /// A Prometheus Alertmanager to post alerts to (its base URL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alertmanager: Option<String>,
}

fn default_every() -> String {
    "15s".into()
}

fn zero() -> String {
    "0s".into()
}

fn default_severity() -> String {
    "warning".into()
}

/// The rule's durations, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// Evaluation interval.
    pub every: Duration,
    /// Pending time before firing.
    pub for_: Duration,
    /// Time a firing instance keeps firing once no longer returned.
    pub keep_firing_for: Duration,
}

/// Labels the engine sets itself; a rule's `labels` may not name them.
const RESERVED_LABELS: [&str; 3] = ["alertname", "department", "severity"];

/// Shortest evaluation interval.
const MIN_EVERY: Duration = Duration::from_secs(1);
/// Longest evaluation interval: the rule's task adds it to the clock, and a
/// duration near `u64::MAX` seconds would overflow it.
const MAX_EVERY: Duration = Duration::from_secs(366 * 86_400);

/// Every field of a rule with the type its JSON value must have.
const FIELDS: [(&str, JsonType); 12] = [
    ("name", JsonType::String),
    ("department", JsonType::String),
    ("sql", JsonType::String),
    ("db", JsonType::String),
    ("every", JsonType::String),
    ("for", JsonType::String),
    ("keep_firing_for", JsonType::String),
    ("severity", JsonType::String),
    ("labels", JsonType::StringMap),
    ("annotations", JsonType::StringMap),
    ("webhook", JsonType::OptionalString),
    ("alertmanager", JsonType::OptionalString),
];

#[derive(Clone, Copy)]
enum JsonType {
    String,
    OptionalString,
    StringMap,
}

impl JsonType {
    fn admits(self, v: &serde_json::Value) -> bool {
        match self {
            Self::String => v.is_string(),
            Self::OptionalString => v.is_string() || v.is_null(),
            Self::StringMap => v
                .as_object()
                .is_some_and(|m| m.values().all(serde_json::Value::is_string)),
        }
    }
}

impl RuleSpec {
    /// Reads a rule from a request body. Every mistake says where it is: the line
    /// and column of JSON that does not parse, the field that is missing, unknown,
    /// repeated or of the wrong type, or that the body is not a JSON object.
    pub fn from_json(body: &[u8]) -> Result<Self, String> {
        serde_json::from_slice(body).map_err(|e| {
            let message = e.to_string();
            // serde names missing, unknown and repeated fields itself, but not one
            // whose value has the wrong type: find it.
            if !e.is_data() || !message.starts_with("invalid ") {
                return message;
            }
            match serde_json::from_slice::<serde_json::Value>(body) {
                Ok(serde_json::Value::Object(fields)) => {
                    let wrong: Vec<&str> = FIELDS
                        .iter()
                        .filter(|(name, ty)| fields.get(*name).is_some_and(|v| !ty.admits(v)))
                        .map(|(name, _)| *name)
                        .collect();
                    match wrong.as_slice() {
                        [] => message,
                        [one] => format!("{one}: {message}"),
                        many => format!("{}: {message}", many.join(", ")),
                    }
                }
                Ok(_) => format!("the rule must be a JSON object of its fields: {message}"),
                Err(_) => message,
            }
        })
    }

    /// Checks everything but the SQL; returns the parsed durations or what is wrong.
    pub fn check(&self) -> Result<Timing, String> {
        if self.name.trim().is_empty() {
            return Err("name must not be empty".into());
        }
        if self.department.is_empty()
            || !self
                .department
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(format!(
                "department '{}' must be letters, digits, '-' or '_' (it names a token scope, rules:DEPARTMENT)",
                self.department
            ));
        }
        if self.db.is_empty() {
            return Err("db must not be empty".into());
        }
        if self.sql.trim().is_empty() {
            return Err("sql must not be empty".into());
        }
        let duration =
            |field: &str, value: &str| parse_duration(value).map_err(|e| format!("{field}: {e}"));
        let timing = Timing {
            every: duration("every", &self.every)?,
            for_: duration("for", &self.for_)?,
            keep_firing_for: duration("keep_firing_for", &self.keep_firing_for)?,
        };
        if timing.every < MIN_EVERY {
            return Err(format!(
                "every must be at least {}s, got {}",
                MIN_EVERY.as_secs(),
                self.every
            ));
        }
        if timing.every > MAX_EVERY {
            return Err(format!(
                "every must be at most {}d, got {}",
                MAX_EVERY.as_secs() / 86_400,
                self.every
            ));
        }
        for key in self.labels.keys() {
            if RESERVED_LABELS.contains(&key.as_str()) {
                return Err(format!(
                    "labels may not set '{key}': the engine sets alertname, department and severity"
                ));
            }
            if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!(
                    "labels: the name '{key}' must be letters, digits and '_'"
                ));
            }
        }
        for (field, url) in [
            ("webhook", &self.webhook),
            ("alertmanager", &self.alertmanager),
        ] {
            if let Some(url) = url {
                let parsed = url::Url::parse(url).map_err(|e| format!("{field}: '{url}' {e}"))?;
                if !matches!(parsed.scheme(), "http" | "https") || parsed.host().is_none() {
                    return Err(format!(
                        "{field}: '{url}' must be an http:// or https:// URL"
                    ));
                }
            }
        }
        Ok(timing)
    }
}

/// A registered rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    /// Its id, given at registration.
    pub id: String,
    /// What was registered.
    #[serde(flatten)]
    pub spec: RuleSpec,
    /// Whether it is also checked against every written batch (a plain filter on
    /// one table).
    pub fast_path: bool,
    /// When it was registered or last replaced, RFC 3339.
    pub updated_at: String,
}

#[cfg(test)]
mod fuzz;

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> RuleSpec {
        serde_json::from_str(
            r#"{"name": "cover-displaced", "department": "city-management", "db": "city",
                "sql": "SELECT device FROM manhole WHERE tilt_deg > 15", "for": "1m"}"#,
        )
        .unwrap()
    }

    #[test]
    fn defaults_and_checks() {
        let s = spec();
        assert_eq!((s.every.as_str(), s.severity.as_str()), ("15s", "warning"));
        let t = s.check().unwrap();
        assert_eq!(t.for_, Duration::from_secs(60));
        assert_eq!(t.keep_firing_for, Duration::ZERO);

        let bad = |f: &dyn Fn(&mut RuleSpec), want: &str| {
            let mut s = spec();
            f(&mut s);
            let err = s.check().unwrap_err();
            assert!(err.contains(want), "{err} should say {want}");
        };
        bad(&|s| s.every = "0s".into(), "every must be at least");
        bad(&|s| s.for_ = "soon".into(), "for:");
        bad(&|s| s.department = "water dept".into(), "department");
        bad(&|s| s.webhook = Some("ftp://x".into()), "webhook");
        bad(&|s| s.webhook = Some("not a url".into()), "webhook");
        bad(
            &|s| {
                s.labels.insert("severity".into(), "x".into());
            },
            "may not set 'severity'",
        );
        bad(&|s| s.name = " ".into(), "name");
        let unknown = RuleSpec::from_json(
            br#"{"name": "x", "department": "d", "db": "c", "sql": "SELECT 1", "evry": "1s"}"#,
        );
        assert!(unknown.unwrap_err().contains("evry"));
    }

    /// A regression case of `rule::fuzz`: an `every` of hundreds of billions of
    /// days passed the checks, and the rule's task panicked adding it to the clock
    /// after its first evaluation, so the rule was never evaluated again.
    #[tokio::test]
    async fn every_is_at_most_a_year_so_the_schedule_can_add_it() {
        let mut s = spec();
        s.every = "213503982334601d".into();
        let err = s.check().unwrap_err();
        assert_eq!(err, "every must be at most 366d, got 213503982334601d");
        s.every = "366d".into();
        let timing = s.check().unwrap();
        let mut interval = tokio::time::interval(timing.every);
        interval.tick().await;
    }

    /// A regression case of `rule::fuzz`: a field of the wrong type was refused
    /// with serde's "invalid type" and a column, without naming the field.
    #[test]
    fn a_field_of_the_wrong_type_is_named() {
        let err =
            RuleSpec::from_json(br#"{"name": 5, "department": "d", "db": "c", "sql": "SELECT 1"}"#)
                .unwrap_err();
        assert!(err.starts_with("name: invalid type: integer `5`"), "{err}");
        let err = RuleSpec::from_json(br#"{"name": "n", "department": "d", "db": "c", "sql": "SELECT 1", "labels": {"a": 1}}"#)
            .unwrap_err();
        assert!(err.starts_with("labels: invalid type"), "{err}");
        let err = RuleSpec::from_json(b"[1]").unwrap_err();
        assert!(err.starts_with("the rule must be a JSON object"), "{err}");
        let err = RuleSpec::from_json(br#"{"name": "n""#).unwrap_err();
        assert!(err.contains("line 1 column 12"), "{err}");
    }
}
