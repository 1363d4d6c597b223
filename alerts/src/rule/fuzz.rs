//! Property-based fuzzing of a rule's body: any JSON, any bytes and mutated valid
//! rules never panic, every mistake names the field (or the line and column of
//! JSON that does not parse), and a rule that passes its checks can be scheduled.
//!
//! `CITYTSDB_FUZZ_CASES` sets the cases per property (the long mode:
//! `CITYTSDB_FUZZ_CASES=1000000 cargo test -p citytsdb-alerts --lib fuzz`).

use proptest::prelude::*;
use proptest::test_runner::Config;
use serde_json::{Map, Value};

use super::*;

/// Cases per property: `CITYTSDB_FUZZ_CASES`, else `quick`.
fn config(quick: u32) -> Config {
    let cases = std::env::var("CITYTSDB_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(quick);
    Config {
        cases,
        max_local_rejects: u32::MAX,
        max_global_rejects: u32::MAX,
        ..Config::default()
    }
}

/// Strings a rule's fields are made of, valid and not: durations, URLs, names,
/// departments, SQL, label names.
const WORDS: &[&str] = &[
    "",
    " ",
    "15s",
    "0s",
    "1s",
    "999ms",
    "1000ms",
    "5m",
    "1h",
    "366d",
    "367d",
    "1d",
    "-1s",
    " 5m ",
    "5 m",
    "1.5s",
    "1e3s",
    "18446744073709551615",
    "18446744073709551615s",
    "213503982334601d",
    "99999999999999999999s",
    "1w",
    "s",
    "http://127.0.0.1:9000/hook",
    "https://[::1]:9093",
    "http://",
    "ftp://x",
    "not a url",
    "http://a b",
    "file:///etc",
    "cover-displaced",
    "city-management",
    "water dept",
    "金水区",
    "city",
    "SELECT 1",
    "SELECT device FROM manhole WHERE tilt_deg > 15",
    "severity",
    "alertname",
    "a_b",
    "x-y",
    "{{device}}",
    "{{",
    "critical",
    "\u{0}",
    "\u{FEFF}",
];

fn word() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(WORDS).prop_map(str::to_string),
        1 => any::<String>(),
    ]
}

/// Any JSON value, nested a few levels.
fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|x| serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number)),
        word().prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 32, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(word(), inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A rule that passes every check.
fn valid_rule() -> impl Strategy<Value = Map<String, Value>> {
    (
        prop::sample::select(&["cover-displaced", "a", "金水区 covers"][..]),
        prop::sample::select(&["city-management", "water", "A_1"][..]),
        prop::sample::select(&["1s", "15s", "5m", "1h", "366d", "1000ms"][..]),
        prop::option::of(prop::sample::select(&["0s", "1m", "90d"][..])),
        prop::option::of(prop::sample::select(&["0s", "5m"][..])),
        prop::option::of(prop::sample::select(&["warning", "critical"][..])),
        prop::collection::btree_map(
            prop::sample::select(&["team", "a_b", "Zone1"][..]),
            word(),
            0..3,
        ),
        prop::option::of(Just("http://127.0.0.1:9000/hook")),
        prop::option::of(Just("https://[::1]:9093")),
    )
        .prop_map(
            |(name, department, every, for_, keep, severity, labels, webhook, alertmanager)| {
                let mut rule = Map::new();
                rule.insert("name".into(), name.into());
                rule.insert("department".into(), department.into());
                rule.insert("db".into(), "city".into());
                rule.insert(
                    "sql".into(),
                    "SELECT device FROM manhole WHERE tilt_deg > 15".into(),
                );
                rule.insert("every".into(), every.into());
                let optional = [
                    ("for", for_),
                    ("keep_firing_for", keep),
                    ("severity", severity),
                    ("webhook", webhook),
                    ("alertmanager", alertmanager),
                ];
                for (key, value) in optional {
                    if let Some(v) = value {
                        rule.insert(key.into(), v.into());
                    }
                }
                let labels: Map<String, Value> = labels
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v.into()))
                    .collect();
                rule.insert("labels".into(), labels.clone().into());
                rule.insert("annotations".into(), labels.into());
                rule
            },
        )
}

/// One change to a rule's fields.
#[derive(Debug, Clone)]
enum Edit {
    Remove(usize),
    Set(usize, Value),
    Add(String, Value),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        any::<usize>().prop_map(Edit::Remove),
        (any::<usize>(), json()).prop_map(|(i, v)| Edit::Set(i, v)),
        (any::<usize>(), word().prop_map(Value::from)).prop_map(|(i, v)| Edit::Set(i, v)),
        (word(), json()).prop_map(|(k, v)| Edit::Add(k, v)),
    ]
}

fn apply(rule: &mut Map<String, Value>, edit: &Edit) {
    match edit {
        Edit::Remove(i) => {
            let (key, _) = FIELDS[i % FIELDS.len()];
            rule.remove(key);
        }
        Edit::Set(i, v) => {
            let (key, _) = FIELDS[i % FIELDS.len()];
            rule.insert(key.to_string(), v.clone());
        }
        Edit::Add(k, v) => {
            rule.insert(k.clone(), v.clone());
        }
    }
}

/// One change to a body's bytes, for JSON that does not parse.
#[derive(Debug, Clone)]
enum ByteEdit {
    Truncate(usize),
    Flip(usize, u8),
    Insert(usize, &'static str),
}

fn byte_edit() -> impl Strategy<Value = ByteEdit> {
    prop_oneof![
        any::<usize>().prop_map(ByteEdit::Truncate),
        (any::<usize>(), 0u8..8).prop_map(|(i, b)| ByteEdit::Flip(i, b)),
        (
            any::<usize>(),
            prop::sample::select(
                &["\"", ",", "{", "}", "[", ":", "\\", "\\u0000", "\u{FFFF}", "1e999", "null"][..]
            )
        )
            .prop_map(|(i, s)| ByteEdit::Insert(i, s)),
    ]
}

fn apply_bytes(body: &mut Vec<u8>, edit: &ByteEdit) {
    let len = body.len();
    match *edit {
        ByteEdit::Truncate(i) => body.truncate(i % (len + 1)),
        ByteEdit::Flip(i, bit) if len > 0 => body[i % len] ^= 1 << bit,
        ByteEdit::Insert(i, s) => {
            let at = i % (len + 1);
            body.splice(at..at, s.bytes());
        }
        ByteEdit::Flip(..) => {}
    }
}

/// Reads `body` as the server does and checks what every answer promises: no
/// panic; a mistake names a field of the body or of a rule, the line and column of
/// JSON that does not parse, or that a rule is an object; a rule that passes its
/// checks has an interval the clock can add.
fn read(body: &[u8]) -> Result<(), TestCaseError> {
    let keys: Vec<String> = match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => m.keys().cloned().collect(),
        _ => Vec::new(),
    };
    // As the messages put it: `name: ...`, `name must ...`, `name, sql: ...`, or
    // serde's "missing field `name`".
    let names_a_field = |message: &str| {
        FIELDS.iter().any(|(f, _)| {
            [":", " ", ","]
                .iter()
                .any(|after| message.starts_with(&format!("{f}{after}")))
                || message.contains(&format!("`{f}`"))
        }) || keys.iter().any(|k| message.contains(&format!("`{k}`")))
    };
    let spec = match RuleSpec::from_json(body) {
        Ok(spec) => spec,
        Err(e) => {
            let where_ = names_a_field(&e)
                || (e.contains(" line ") && e.contains(" column "))
                || e.contains("JSON object");
            prop_assert!(
                where_,
                "{:?} says not where: {}",
                String::from_utf8_lossy(body),
                e
            );
            return Ok(());
        }
    };
    match spec.check() {
        Ok(timing) => {
            prop_assert!(timing.every >= MIN_EVERY && timing.every <= MAX_EVERY);
            // The rule's task adds `every` to the clock at each tick.
            let two = timing.every.checked_mul(2);
            prop_assert!(two
                .and_then(|d| std::time::Instant::now().checked_add(d))
                .is_some());
        }
        Err(e) => prop_assert!(names_a_field(&e), "{:?} names no field", e),
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(1000))]

    #[test]
    fn any_json_value_is_read_or_refused_naming_the_field(value in json()) {
        read(value.to_string().as_bytes())?;
    }

    #[test]
    fn any_bytes_are_read_or_refused_saying_where(body in prop::collection::vec(any::<u8>(), 0..64)) {
        read(&body)?;
    }

    #[test]
    fn mutated_rules_are_read_or_refused_naming_the_field(
        rule in valid_rule(),
        edits in prop::collection::vec(edit(), 0..4),
        byte_edits in prop::collection::vec(byte_edit(), 0..2),
    ) {
        let mut rule = rule;
        for e in &edits {
            apply(&mut rule, e);
        }
        let mut body = Value::Object(rule).to_string().into_bytes();
        for e in &byte_edits {
            apply_bytes(&mut body, e);
        }
        read(&body)?;
    }

    #[test]
    fn a_valid_rule_reads_back_as_written(rule in valid_rule()) {
        let body = Value::Object(rule).to_string();
        let spec = RuleSpec::from_json(body.as_bytes())
            .map_err(|e| TestCaseError::fail(format!("{body}: {e}")))?;
        prop_assert!(spec.check().is_ok(), "{}: {:?}", body, spec.check());
        let again = serde_json::to_vec(&spec).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(RuleSpec::from_json(&again), Ok(spec));
    }
}
