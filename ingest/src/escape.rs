//! Writing line protocol: escaping names and values so that the parser in
//! `line_protocol.rs` reads back exactly what was written.
//!
//! Used by the converters that turn other formats (MQTT JSON payloads, CSV and
//! JSON-lines imports) into line protocol.

/// Appends a measurement name: commas, spaces and backslashes are escaped.
pub fn push_measurement(out: &mut String, name: &str) {
    push_escaped(out, name, &[',', ' ', '\\']);
}

/// Appends a tag key, tag value or field key: commas, equals signs, spaces and
/// backslashes are escaped.
pub fn push_key(out: &mut String, key: &str) {
    push_escaped(out, key, &[',', '=', ' ', '\\']);
}

/// Appends a string field value in double quotes, escaping quotes and backslashes.
pub fn push_string_value(out: &mut String, value: &str) {
    out.push('"');
    push_escaped(out, value, &['"', '\\']);
    out.push('"');
}

/// Appends a float field value so that it parses back to the same `f64`.
/// Returns false, appending nothing, for NaN and infinities, which line protocol
/// cannot carry.
pub fn push_float(out: &mut String, v: f64) -> bool {
    if !v.is_finite() {
        return false;
    }
    // `{:?}` is the shortest representation that reads back exactly.
    out.push_str(&format!("{v:?}"));
    true
}

/// Why a name or value cannot be written as line protocol, if it cannot: line
/// protocol has no escape for a line break, and tag values cannot be empty.
pub fn unwritable(text: &str) -> Option<&'static str> {
    if text.is_empty() {
        Some("is empty")
    } else if text.contains(['\n', '\r']) {
        Some("contains a line break")
    } else {
        None
    }
}

fn push_escaped(out: &mut String, text: &str, special: &[char]) {
    for c in text.chars() {
        if special.contains(&c) {
            out.push('\\');
        }
        out.push(c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{parse_body, FieldValue};

    #[test]
    fn escaped_line_parses_back_to_the_same_names_and_values() {
        let mut line = String::new();
        push_measurement(&mut line, "man hole,x\\");
        line.push(',');
        push_key(&mut line, "dis=trict");
        line.push('=');
        push_key(&mut line, "Nan Shan, 南山\\");
        line.push(' ');
        push_key(&mut line, "tilt deg");
        line.push('=');
        assert!(push_float(&mut line, 0.1 + 0.2));
        line.push(',');
        push_key(&mut line, "note");
        line.push('=');
        push_string_value(&mut line, "say \"hi\" \\o/");
        line.push_str(" 1700000000000000000");

        let parsed = parse_body(line.as_bytes());
        assert!(parsed.rejected.is_empty(), "{:?}", parsed.rejected);
        let l = &parsed.lines[0].1;
        assert_eq!(l.measurement, "man hole,x\\");
        assert_eq!(l.tags[0].0, "dis=trict");
        assert_eq!(l.tags[0].1, "Nan Shan, 南山\\");
        assert_eq!(l.fields[0].0, "tilt deg");
        assert!(matches!(l.fields[0].1, FieldValue::Float(v) if v == 0.1 + 0.2));
        assert!(matches!(&l.fields[1].1, FieldValue::String(s) if s == "say \"hi\" \\o/"));
    }

    #[test]
    fn non_finite_floats_and_line_breaks_are_refused() {
        let mut s = String::new();
        assert!(!push_float(&mut s, f64::NAN));
        assert!(!push_float(&mut s, f64::INFINITY));
        assert!(s.is_empty());
        assert_eq!(unwritable(""), Some("is empty"));
        assert_eq!(unwritable("a\nb"), Some("contains a line break"));
        assert_eq!(unwritable("ok"), None);
    }
}
