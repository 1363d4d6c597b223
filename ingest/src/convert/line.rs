//! Building one line of line protocol from a CSV row or a JSON object, refusing
//! what line protocol cannot carry, and reading times.

use crate::escape::{push_float, push_key, push_measurement, push_string_value};
use citytsdb_storage::units::{parse_rfc3339, InvalidUnit};

use crate::write::Precision;

/// A field's value, typed as it will be written.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Value<'a> {
    Float(f64),
    Integer(i64),
    UInteger(u64),
    Boolean(bool),
    String(&'a str),
}

/// One line under construction: the table and tags first, then the fields, then
/// the time.
#[derive(Debug)]
pub(super) struct LineBuilder {
    head: String,
    fields: String,
}

impl LineBuilder {
    /// Starts a line of table `table`.
    pub(super) fn new(table: &str) -> Result<Self, String> {
        if let Some(why) = unwritable(table) {
            return Err(format!("table name {why}"));
        }
        // The parser skips leading whitespace and reads a leading `#` as a comment.
        if table.starts_with(['#', '\t']) {
            return Err(format!(
                "table name {table:?} cannot start with '#' or a tab"
            ));
        }
        let mut head = String::with_capacity(64);
        push_measurement(&mut head, table);
        Ok(Self {
            head,
            fields: String::with_capacity(64),
        })
    }

    /// Adds a tag; an empty value means the tag is absent.
    pub(super) fn tag(&mut self, key: &str, value: &str) -> Result<(), String> {
        if value.is_empty() {
            return Ok(());
        }
        if let Some(why) = unwritable(key) {
            return Err(format!("tag name {why}"));
        }
        if let Some(why) = unwritable(value) {
            return Err(format!("tag {key} {why}"));
        }
        self.head.push(',');
        push_key(&mut self.head, key);
        self.head.push('=');
        push_key(&mut self.head, value);
        Ok(())
    }

    /// Adds a field.
    pub(super) fn field(&mut self, key: &str, value: Value<'_>) -> Result<(), String> {
        if let Some(why) = unwritable(key) {
            return Err(format!("field name {why}"));
        }
        let start = self.fields.len();
        if !self.fields.is_empty() {
            self.fields.push(',');
        }
        push_key(&mut self.fields, key);
        self.fields.push('=');
        match value {
            Value::Float(v) => {
                if !push_float(&mut self.fields, v) {
                    self.fields.truncate(start);
                    return Err(format!("field {key}: line protocol has no NaN or infinity"));
                }
            }
            Value::Integer(v) => self.fields.push_str(&format!("{v}i")),
            Value::UInteger(v) => self.fields.push_str(&format!("{v}u")),
            Value::Boolean(v) => self.fields.push_str(if v { "true" } else { "false" }),
            Value::String(s) => {
                if s.contains(['\n', '\r']) {
                    self.fields.truncate(start);
                    return Err(format!("field {key} contains a line break"));
                }
                push_string_value(&mut self.fields, s);
            }
        }
        Ok(())
    }

    /// The finished line, with its time in nanoseconds.
    pub(super) fn finish(mut self, time_ns: i64) -> Result<String, String> {
        if self.fields.is_empty() {
            return Err("no fields: every value is empty or a tag".into());
        }
        self.head.push(' ');
        self.head.push_str(&self.fields);
        self.head.push(' ');
        self.head.push_str(&time_ns.to_string());
        Ok(self.head)
    }
}

/// Why a name or value cannot go into line protocol, if it cannot.
fn unwritable(text: &str) -> Option<&'static str> {
    crate::escape::unwritable(text)
}

/// Reads a time: an integer in `precision`, or RFC 3339 text; in nanoseconds.
pub(super) fn parse_time(text: &str, precision: Precision) -> Result<i64, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("time is empty".into());
    }
    if let Ok(n) = text.parse::<i64>() {
        return integer_time(n, precision);
    }
    parse_rfc3339(text).map_err(|e| match e {
        InvalidUnit::TimeOutOfRange(_) => {
            format!("time '{text}' is out of range (years 1677 to 2262)")
        }
        _ => format!("time '{text}' is neither an integer (in --precision) nor RFC 3339"),
    })
}

/// An integer time in `precision`, in nanoseconds.
pub(super) fn integer_time(n: i64, precision: Precision) -> Result<i64, String> {
    n.checked_mul(precision.nanos())
        .ok_or_else(|| format!("time {n} is out of range for the precision"))
}

/// A number as a float field, refusing what is not one.
pub(super) fn parse_float(text: &str) -> Option<f64> {
    let t = text.trim();
    // `f64::from_str` also reads "inf" and "NaN", which are not numbers here.
    if t.is_empty()
        || !t
            .bytes()
            .all(|b| b.is_ascii_digit() || b"+-.eE".contains(&b))
    {
        return None;
    }
    t.parse().ok()
}

/// A boolean as line protocol and most exports spell it.
pub(super) fn parse_bool(text: &str) -> Option<bool> {
    match text.trim().to_ascii_lowercase().as_str() {
        "true" | "t" | "yes" | "1" => Some(true),
        "false" | "f" | "no" | "0" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{parse_body, FieldValue};

    #[test]
    fn built_lines_parse_back_to_the_same_names_and_values() {
        let mut b = LineBuilder::new("man hole,1").unwrap();
        b.tag("dis trict", "Huayuan Rd, north").unwrap();
        b.tag("empty", "").unwrap();
        b.tag("k=v", "a\\b").unwrap();
        b.field("tilt deg", Value::Float(0.1 + 0.2)).unwrap();
        b.field("n", Value::Integer(-3)).unwrap();
        b.field("u", Value::UInteger(u64::MAX)).unwrap();
        b.field("ok", Value::Boolean(false)).unwrap();
        b.field("note", Value::String("say \"hi\", \\o/ = 1"))
            .unwrap();
        let line = b.finish(-5).unwrap();
        let parsed = parse_body(line.as_bytes());
        assert!(parsed.rejected.is_empty(), "{line}: {:?}", parsed.rejected);
        let l = &parsed.lines[0].1;
        assert_eq!(l.measurement, "man hole,1");
        let tags: Vec<(&str, &str)> = l.tags.iter().map(|(k, v)| (&**k, &**v)).collect();
        assert_eq!(tags, [("dis trict", "Huayuan Rd, north"), ("k=v", "a\\b")]);
        assert_eq!(l.fields[0].1, FieldValue::Float(0.1 + 0.2));
        assert_eq!(l.fields[1].1, FieldValue::Integer(-3));
        assert_eq!(l.fields[2].1, FieldValue::UInteger(u64::MAX));
        assert_eq!(l.fields[3].1, FieldValue::Boolean(false));
        assert_eq!(
            l.fields[4].1,
            FieldValue::String("say \"hi\", \\o/ = 1".into())
        );
        assert_eq!(l.timestamp, Some(-5));
    }

    #[test]
    fn what_line_protocol_cannot_carry_is_refused() {
        assert!(LineBuilder::new("").is_err());
        assert!(LineBuilder::new("#t").is_err());
        let mut b = LineBuilder::new("t").unwrap();
        assert!(b.tag("a", "x\ny").unwrap_err().contains("line break"));
        assert!(b.field("f", Value::Float(f64::NAN)).is_err());
        assert!(b.field("s", Value::String("a\r\nb")).is_err());
        // Refused values leave nothing behind.
        assert_eq!(
            b.finish(1).unwrap_err(),
            "no fields: every value is empty or a tag"
        );
    }

    #[test]
    fn times_are_integers_in_the_precision_or_rfc3339() {
        assert_eq!(parse_time("17", Precision::Second), Ok(17_000_000_000));
        assert_eq!(parse_time(" -2 ", Precision::Millisecond), Ok(-2_000_000));
        assert_eq!(
            parse_time("2025-12-01T00:00:01.5Z", Precision::Second),
            Ok(1_764_547_201_500_000_000)
        );
        assert_eq!(
            parse_time("2025-12-01T08:00:00+08:00", Precision::Nanosecond),
            Ok(1_764_547_200_000_000_000)
        );
        assert!(parse_time("", Precision::Second)
            .unwrap_err()
            .contains("empty"));
        assert!(parse_time("yesterday", Precision::Second)
            .unwrap_err()
            .contains("neither"));
        assert!(parse_time("9223372036854775807", Precision::Second)
            .unwrap_err()
            .contains("out of range"));
    }

    #[test]
    fn numbers_and_booleans() {
        assert_eq!(parse_float(" 1.5e3 "), Some(1500.0));
        assert_eq!(parse_float("-.5"), Some(-0.5));
        assert_eq!(parse_float("NaN"), None);
        assert_eq!(parse_float("inf"), None);
        assert_eq!(parse_float("1,5"), None);
        assert_eq!(parse_float("e"), None);
        assert_eq!(parse_bool("TRUE"), Some(true));
        assert_eq!(parse_bool("0"), Some(false));
        assert_eq!(parse_bool("maybe"), None);
    }
}
