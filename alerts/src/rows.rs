//! From a rule's answer to alert instances: identity, values and templates.
//!
//! Each row is one instance. Its identity is the rule plus the values of its
//! string columns (tags and text fields; never `time`); its numeric columns are
//! its values. Labels and annotations fill `{{column}}` templates from the row,
//! numbers in their shortest exact form.

use std::collections::{BTreeMap, BTreeSet};

use datafusion::arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{
    DataType, Float32Type, Float64Type, Int16Type, Int32Type, Int64Type, Int8Type, Schema,
    TimestampNanosecondType, UInt16Type, UInt32Type, UInt64Type, UInt8Type,
};
use serde_json::Value;

use crate::rule::{Rule, RuleSpec};
use crate::state::{fingerprint, Observation};
use citytsdb_storage::units::rfc3339;

/// Whether a column of this type identifies an instance (strings do).
pub fn is_identity(name: &str, t: &DataType) -> bool {
    name != "time"
        && match t {
            DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => true,
            DataType::Dictionary(_, v) => is_identity(name, v),
            _ => false,
        }
}

/// The identity columns of an answer's schema.
pub fn identity_columns(schema: &Schema) -> Vec<String> {
    schema
        .fields()
        .iter()
        .filter(|f| is_identity(f.name(), f.data_type()))
        .map(|f| f.name().clone())
        .collect()
}

/// The `{{name}}` references of a template.
pub fn references(template: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        let Some(len) = rest[start + 2..].find("}}") else {
            break;
        };
        out.push(rest[start + 2..start + 2 + len].trim().to_string());
        rest = &rest[start + 2 + len + 2..];
    }
    out
}

/// Checks that every `{{name}}` of the spec's labels and annotations is a column
/// of the rule's answer; says which is not, and what the columns are.
pub fn check_templates(spec: &RuleSpec, answer: &Schema) -> Result<(), String> {
    let columns: BTreeSet<&String> = answer.fields().iter().map(|f| f.name()).collect();
    for (kind, map) in [("labels", &spec.labels), ("annotations", &spec.annotations)] {
        for (key, template) in map {
            for name in references(template) {
                if !columns.contains(&name) {
                    return Err(format!(
                        "{kind}.{key} uses {{{{{name}}}}}, which the query does not return (its columns: {})",
                        columns
                            .iter()
                            .map(|c| c.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Fills a template's `{{name}}` references from `row` (an unknown name stays as
/// written, so a mistake shows).
pub fn render(template: &str, row: &BTreeMap<String, String>) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        let Some(len) = rest[start + 2..].find("}}") else {
            break;
        };
        out.push_str(&rest[..start]);
        let name = rest[start + 2..start + 2 + len].trim();
        match row.get(name) {
            Some(v) => out.push_str(v),
            None => out.push_str(&rest[start..start + 2 + len + 2]),
        }
        rest = &rest[start + 2 + len + 2..];
    }
    out.push_str(rest);
    out
}

/// An instance's fingerprint: the rule and its identity values.
pub fn instance_fingerprint(rule_id: &str, identity: &BTreeMap<String, String>) -> String {
    let mut key = identity.clone();
    key.insert("__rule__".into(), rule_id.into());
    fingerprint(&key)
}

/// One cell as JSON: numbers as numbers, NULL as null, the rest as text.
fn cell(column: &ArrayRef, row: usize) -> Value {
    if column.is_null(row) {
        return Value::Null;
    }
    macro_rules! int {
        ($t:ty) => {
            Value::from(column.as_primitive::<$t>().value(row))
        };
    }
    match column.data_type() {
        DataType::Int8 => int!(Int8Type),
        DataType::Int16 => int!(Int16Type),
        DataType::Int32 => int!(Int32Type),
        DataType::Int64 => int!(Int64Type),
        DataType::UInt8 => int!(UInt8Type),
        DataType::UInt16 => int!(UInt16Type),
        DataType::UInt32 => int!(UInt32Type),
        DataType::UInt64 => int!(UInt64Type),
        DataType::Float32 => {
            serde_json::Number::from_f64(f64::from(column.as_primitive::<Float32Type>().value(row)))
                .map_or(Value::Null, Value::Number)
        }
        DataType::Float64 => {
            serde_json::Number::from_f64(column.as_primitive::<Float64Type>().value(row))
                .map_or(Value::Null, Value::Number)
        }
        DataType::Boolean => Value::from(column.as_boolean().value(row)),
        DataType::Utf8 => Value::from(column.as_string::<i32>().value(row)),
        DataType::Timestamp(_, _) => match cast(
            column,
            &DataType::Timestamp(datafusion::arrow::datatypes::TimeUnit::Nanosecond, None),
        ) {
            Ok(c) => Value::from(rfc3339(i128::from(
                c.as_primitive::<TimestampNanosecondType>().value(row),
            ))),
            Err(_) => Value::Null,
        },
        _ => match cast(column, &DataType::Utf8) {
            Ok(c) if c.is_valid(row) => Value::from(c.as_string::<i32>().value(row)),
            _ => Value::Null,
        },
    }
}

/// A value as templates print it: numbers in their shortest exact form (`25`,
/// `17.25`, `0.1`), NULL as nothing.
fn text(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() && f.fract() == 0.0 && f.abs() < 1e15 => format!("{}", f as i64),
            _ => n.to_string(),
        },
        other => other.to_string(),
    }
}

/// The instances an answer describes, one per row (a repeated identity keeps its
/// last row).
pub fn observations(rule: &Rule, batches: &[RecordBatch]) -> Vec<Observation> {
    let mut out: BTreeMap<String, Observation> = BTreeMap::new();
    for batch in batches {
        let schema = batch.schema();
        let columns: Vec<ArrayRef> = batch
            .columns()
            .iter()
            .map(|c| match c.data_type() {
                DataType::Dictionary(_, v) => cast(c, v).unwrap_or_else(|_| c.clone()),
                DataType::LargeUtf8 | DataType::Utf8View => {
                    cast(c, &DataType::Utf8).unwrap_or_else(|_| c.clone())
                }
                _ => c.clone(),
            })
            .collect();
        for row in 0..batch.num_rows() {
            let mut identity = BTreeMap::new();
            let mut values = BTreeMap::new();
            let mut all = BTreeMap::new();
            for (field, column) in schema.fields().iter().zip(&columns) {
                let v = cell(column, row);
                if is_identity(field.name(), field.data_type()) {
                    identity.insert(field.name().clone(), text(&v));
                } else if v.is_number() {
                    values.insert(field.name().clone(), v.clone());
                }
                all.insert(field.name().clone(), text(&v));
            }
            let mut labels: BTreeMap<String, String> = rule
                .spec
                .labels
                .iter()
                .map(|(k, t)| (k.clone(), render(t, &all)))
                .collect();
            labels.extend(identity.clone());
            labels.insert("alertname".into(), rule.spec.name.clone());
            labels.insert("department".into(), rule.spec.department.clone());
            labels.insert("severity".into(), rule.spec.severity.clone());
            let annotations = rule
                .spec
                .annotations
                .iter()
                .map(|(k, t)| (k.clone(), render(t, &all)))
                .collect();
            let fp = instance_fingerprint(&rule.id, &identity);
            out.insert(
                fp.clone(),
                Observation {
                    fingerprint: fp,
                    labels,
                    annotations,
                    values,
                },
            );
        }
    }
    out.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{Float64Array, Int64Array, StringArray};
    use datafusion::arrow::datatypes::Field;
    use std::sync::Arc;

    #[test]
    fn templates() {
        let row: BTreeMap<String, String> = [
            ("device".to_string(), "mh-1".to_string()),
            ("tilt".to_string(), "17.5".to_string()),
        ]
        .into();
        assert_eq!(
            render("cover {{device}} tilted {{ tilt }}° ({{nope}})", &row),
            "cover mh-1 tilted 17.5° ({{nope}})"
        );
        assert_eq!(render("no {{ end", &row), "no {{ end");
        assert_eq!(text(&Value::from(25.0)), "25");
        assert_eq!(text(&Value::from(-0.5)), "-0.5");
        assert_eq!(text(&Value::from(1e20)), "1e+20");
        assert_eq!(references("{{a}} and {{ b }}"), ["a", "b"]);
    }

    #[test]
    fn rows_become_instances() {
        let spec: RuleSpec = serde_json::from_str(
            r#"{"name": "tilt", "department": "covers", "db": "city", "sql": "SELECT 1",
                "labels": {"team": "covers"},
                "annotations": {"summary": "cover {{device}} in {{district}} tilted {{tilt}} degrees, battery {{battery}}"}}"#,
        )
        .unwrap();
        let rule = Rule {
            id: "r1".into(),
            spec,
            fast_path: false,
            updated_at: String::new(),
        };
        let schema = Arc::new(Schema::new(vec![
            Field::new("device", DataType::Utf8, true),
            Field::new("district", DataType::Utf8, true),
            Field::new("tilt", DataType::Float64, true),
            Field::new("battery", DataType::Int64, true),
        ]));
        let batch = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(vec!["mh-1", "mh-2"])),
                Arc::new(StringArray::from(vec![Some("金水区"), None])),
                Arc::new(Float64Array::from(vec![17.25, 0.1])),
                Arc::new(Int64Array::from(vec![Some(80), None])),
            ],
        )
        .unwrap();
        let obs = observations(&rule, &[batch]);
        assert_eq!(obs.len(), 2);
        let one = obs.iter().find(|o| o.labels["device"] == "mh-1").unwrap();
        assert_eq!(one.labels["alertname"], "tilt");
        assert_eq!(one.labels["district"], "金水区");
        assert_eq!(one.labels["team"], "covers");
        assert_eq!(one.labels["severity"], "warning");
        assert_eq!(
            one.annotations["summary"],
            "cover mh-1 in 金水区 tilted 17.25 degrees, battery 80"
        );
        assert_eq!(one.values["tilt"], Value::from(17.25));
        let two = obs.iter().find(|o| o.labels["device"] == "mh-2").unwrap();
        assert_eq!(two.labels["district"], "");
        assert_eq!(
            two.annotations["summary"],
            "cover mh-2 in  tilted 0.1 degrees, battery "
        );
        assert_ne!(one.fingerprint, two.fingerprint);
    }
}
