//! JSON lines in: one object per line, each a row of line protocol.
//!
//! `time` is an integer in `--precision` or RFC 3339 text; `table` (or, without
//! it, `measurement`) names the row's table, `--table` being the default. Without
//! `--tags`, every other key with a string value is a tag; with it, the keys it
//! names are tags and other strings are string fields. Numbers are float fields (so
//! a key never flips between integer and float), booleans boolean fields, and a
//! `null` leaves its key out. Nested objects and arrays are refused.

use std::io::BufRead;

use crate::write::Precision;
use serde_json::Value as Json;

use super::line::{integer_time, parse_time, LineBuilder, Value};
use super::{read_line, Batcher, ReadOptions, Stop};

/// How objects map to rows.
pub(super) struct Mapping<'a> {
    /// Keys that are tags; `None`: every string value is a tag.
    pub tags: Option<&'a [String]>,
    pub table: Option<&'a str>,
    pub precision: Precision,
}

impl Mapping<'_> {
    /// One line of JSON as a line of line protocol.
    pub(super) fn convert(&self, text: &str) -> Result<String, String> {
        let value: Json = serde_json::from_str(text).map_err(json_error)?;
        let Json::Object(object) = value else {
            return Err("not a JSON object".into());
        };
        let table_key = if object.contains_key("table") {
            "table"
        } else {
            "measurement"
        };
        let table = match object.get(table_key) {
            Some(Json::String(t)) if !t.is_empty() => t.as_str(),
            None | Some(Json::Null) => self
                .table
                .ok_or("no table: the object has no table key and no --table was given")?,
            Some(Json::String(_)) => {
                return Err(format!("{table_key} is empty"));
            }
            Some(_) => return Err(format!("{table_key} is not a string")),
        };
        let time = match object.get("time") {
            None | Some(Json::Null) => return Err("no time".into()),
            Some(Json::String(s)) => parse_time(s, self.precision)?,
            Some(Json::Number(n)) => match n.as_i64() {
                Some(n) => integer_time(n, self.precision)?,
                None => return Err(format!("time {n} is not an integer")),
            },
            Some(_) => return Err("time is neither an integer nor RFC 3339 text".into()),
        };
        let mut line = LineBuilder::new(table)?;
        let keys = || {
            object
                .iter()
                .filter(|(k, _)| k.as_str() != "time" && k.as_str() != table_key)
        };
        let mut tag_text = String::new();
        for (key, value) in keys() {
            if !self.is_tag(key, value) {
                continue;
            }
            tag_text.clear();
            let text = match value {
                Json::String(s) => s.as_str(),
                Json::Null => continue,
                Json::Number(n) => {
                    tag_text.push_str(&n.to_string());
                    &tag_text
                }
                Json::Bool(b) => {
                    tag_text.push_str(if *b { "true" } else { "false" });
                    &tag_text
                }
                Json::Array(_) | Json::Object(_) => {
                    return Err(format!("{key}: a tag cannot be an array or an object"))
                }
            };
            line.tag(key, text)?;
        }
        for (key, value) in keys() {
            if self.is_tag(key, value) {
                continue;
            }
            let value = match value {
                Json::Null => continue,
                Json::Number(n) => Value::Float(
                    n.as_f64()
                        .ok_or_else(|| format!("{key}: {n} is not a number"))?,
                ),
                Json::Bool(b) => Value::Boolean(*b),
                Json::String(s) => Value::String(s),
                Json::Array(_) | Json::Object(_) => {
                    return Err(format!(
                        "{key}: nested arrays and objects are not supported"
                    ))
                }
            };
            line.field(key, value)?;
        }
        line.finish(time)
    }

    fn is_tag(&self, key: &str, value: &Json) -> bool {
        match self.tags {
            Some(tags) => tags.iter().any(|t| t == key),
            None => value.is_string(),
        }
    }
}

/// serde_json's message without its "at line 1" (every object is one line).
fn json_error(e: serde_json::Error) -> String {
    let text = e.to_string();
    let message = match text.rfind(" at line ") {
        Some(at) => &text[..at],
        None => &text,
    };
    format!("invalid JSON at column {}: {message}", e.column())
}

/// Reads one JSON-lines file into batches.
pub(super) fn read(
    mut reader: Box<dyn BufRead + Send>,
    options: &ReadOptions,
    out: &mut Batcher<'_>,
) -> Result<(), Stop> {
    let mapping = Mapping {
        tags: options.tags.as_deref(),
        table: options.table.as_deref(),
        precision: options.precision,
    };
    let mut buf = Vec::new();
    let mut line = 0;
    while read_line(reader.as_mut(), &mut buf)? {
        line += 1;
        if line == 1 && buf.starts_with(b"\xEF\xBB\xBF") {
            buf.drain(..3);
        }
        if buf.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let converted = std::str::from_utf8(&buf)
            .map_err(|_| "line is not valid UTF-8".to_string())
            .and_then(|text| mapping.convert(text));
        match converted {
            Ok(lp) => out.push(line, lp.as_bytes())?,
            Err(reason) => out.reject(line, reason, &String::from_utf8_lossy(&buf)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mapping(tags: Option<&[String]>) -> Mapping<'_> {
        Mapping {
            tags,
            table: Some("manhole"),
            precision: Precision::Second,
        }
    }

    #[test]
    fn strings_are_tags_numbers_floats_without_tags_given() {
        let m = mapping(None);
        assert_eq!(
            m.convert(r#"{"time": 1, "device": "mh 1", "tilt": 2, "ok": true, "gone": null}"#)
                .unwrap(),
            "manhole,device=mh\\ 1 ok=true,tilt=2.0 1000000000"
        );
        assert_eq!(
            m.convert(r#"{"table": "parking", "time": "2025-12-01T00:00:00Z", "free": 1.5}"#)
                .unwrap(),
            "parking free=1.5 1764547200000000000"
        );
    }

    #[test]
    fn tags_given_make_other_strings_fields() {
        let tags = ["device".to_string(), "floor".to_string()];
        let m = mapping(Some(&tags));
        assert_eq!(
            m.convert(r#"{"time": 2, "device": "d", "floor": 3, "note": "a \"b\""}"#)
                .unwrap(),
            "manhole,device=d,floor=3 note=\"a \\\"b\\\"\" 2000000000"
        );
    }

    #[test]
    fn bad_objects_say_why() {
        let m = mapping(None);
        let err = |s: &str| m.convert(s).unwrap_err();
        assert!(err(r#"{"time": 1, "v": }"#).starts_with("invalid JSON at column 18: "));
        assert_eq!(err("[1]"), "not a JSON object");
        assert_eq!(err(r#"{"v": 1}"#), "no time");
        assert_eq!(
            err(r#"{"time": 1.5, "v": 1}"#),
            "time 1.5 is not an integer"
        );
        assert_eq!(
            err(r#"{"time": 1, "v": [1]}"#),
            "v: nested arrays and objects are not supported"
        );
        assert_eq!(
            err(r#"{"time": 1, "d": "x"}"#),
            "no fields: every value is empty or a tag"
        );
        let no_table = Mapping {
            tags: None,
            table: None,
            precision: Precision::Second,
        };
        assert!(no_table
            .convert(r#"{"time": 1, "v": 1}"#)
            .unwrap_err()
            .starts_with("no table"));
    }
}
