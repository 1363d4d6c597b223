//! Property-based fuzzing of the line-protocol parser: hostile bytes never panic, a
//! line written from a model reads back as exactly that model, and every error
//! points inside its line.
//!
//! `CITYTSDB_FUZZ_CASES` sets the cases per property (the long mode:
//! `CITYTSDB_FUZZ_CASES=1000000 cargo test -p citytsdb-ingest --lib fuzz`).

use std::borrow::Cow;

use proptest::prelude::*;
use proptest::test_runner::Config;

use super::*;
use crate::escape::{push_float, push_key, push_measurement, push_string_value};

/// Cases per property: `CITYTSDB_FUZZ_CASES`, else `quick`.
pub(crate) fn config(quick: u32) -> Config {
    let cases = std::env::var("CITYTSDB_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(quick);
    Config {
        cases,
        // Filters reject a share of every run's cases; a long run must not stop on that.
        max_local_rejects: u32::MAX,
        max_global_rejects: u32::MAX,
        ..Config::default()
    }
}

/// One line as a writer means it.
#[derive(Debug, Clone)]
pub(crate) struct ModelLine {
    pub measurement: String,
    pub tags: Vec<(String, String)>,
    pub fields: Vec<(String, ModelValue)>,
    pub timestamp: Option<i64>,
    /// Spaces and tabs before the measurement, spaces between the sections, and
    /// whitespace after the line: none of it changes what the line says.
    pub lead: &'static str,
    pub gap: &'static str,
    pub trail: &'static str,
}

/// A field value, with the spelling of a boolean.
#[derive(Debug, Clone)]
pub(crate) enum ModelValue {
    Float(f64),
    Integer(i64),
    UInteger(u64),
    Boolean(bool, &'static str),
    String(String),
}

impl ModelValue {
    fn parsed(&self) -> FieldValue<'static> {
        match self {
            Self::Float(x) => FieldValue::Float(*x),
            Self::Integer(x) => FieldValue::Integer(*x),
            Self::UInteger(x) => FieldValue::UInteger(*x),
            Self::Boolean(x, _) => FieldValue::Boolean(*x),
            Self::String(s) => FieldValue::String(Cow::Owned(s.clone())),
        }
    }
}

impl ModelLine {
    /// The line as `escape.rs` writes it, the way every converter does.
    pub fn write(&self) -> String {
        let mut line = self.lead.to_string();
        push_measurement(&mut line, &self.measurement);
        for (k, v) in &self.tags {
            line.push(',');
            push_key(&mut line, k);
            line.push('=');
            push_key(&mut line, v);
        }
        for (i, (k, v)) in self.fields.iter().enumerate() {
            line.push_str(if i == 0 { self.gap } else { "," });
            push_key(&mut line, k);
            line.push('=');
            match v {
                ModelValue::Float(x) => {
                    assert!(push_float(&mut line, *x), "finite by construction")
                }
                ModelValue::Integer(x) => line.push_str(&format!("{x}i")),
                ModelValue::UInteger(x) => line.push_str(&format!("{x}u")),
                ModelValue::Boolean(_, spelling) => line.push_str(spelling),
                ModelValue::String(s) => push_string_value(&mut line, s),
            }
        }
        if let Some(ts) = self.timestamp {
            line.push_str(self.gap);
            line.push_str(&ts.to_string());
        }
        line.push_str(self.trail);
        line
    }

    /// Asserts that `p` says exactly what this model says.
    pub fn check(&self, p: &ParsedLine<'_>, text: &str) -> Result<(), TestCaseError> {
        prop_assert_eq!(&p.measurement, &self.measurement, "{:?}", text);
        let tags: Vec<(String, String)> = p
            .tags
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        prop_assert_eq!(&tags, &self.tags, "{:?}", text);
        let fields: Vec<(String, FieldValue<'_>)> = p
            .fields
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        let want: Vec<(String, FieldValue<'_>)> = self
            .fields
            .iter()
            .map(|(k, v)| (k.clone(), v.parsed()))
            .collect();
        prop_assert_eq!(fields, want, "{:?}", text);
        prop_assert_eq!(p.timestamp, self.timestamp, "{:?}", text);
        Ok(())
    }
}

/// Pieces of names: plain letters, every character the escapes are about, and
/// multibyte ones.
const NAME_PIECES: &[&str] = &[
    "a",
    "b",
    "z9",
    "_",
    "-",
    ".",
    ",",
    "=",
    " ",
    "\\",
    "\\\\",
    "\"",
    "#",
    "\t",
    "金水区",
    "é",
    "t",
    "1",
    "i",
    "\u{FEFF}",
];

fn name() -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(NAME_PIECES), 1..6).prop_map(|p| p.concat())
}

/// A measurement: a name that neither starts like a comment nor with whitespace the
/// parser trims (line protocol has no escape for a leading tab).
fn measurement() -> impl Strategy<Value = String> {
    name().prop_filter("comment or leading whitespace", |m| {
        !m.starts_with('#') && !m.starts_with('\t')
    })
}

fn value() -> impl Strategy<Value = ModelValue> {
    prop_oneof![
        any::<f64>()
            .prop_filter("finite", |x| x.is_finite())
            .prop_map(ModelValue::Float),
        prop::sample::select(
            &[
                0.0,
                -0.0,
                1.0,
                -1.5,
                f64::MAX,
                f64::MIN,
                f64::MIN_POSITIVE,
                5e-324
            ][..]
        )
        .prop_map(ModelValue::Float),
        any::<i64>().prop_map(ModelValue::Integer),
        prop::sample::select(&[i64::MIN, i64::MAX, 0][..]).prop_map(ModelValue::Integer),
        any::<u64>().prop_map(ModelValue::UInteger),
        prop::sample::select(&[u64::MAX, 0][..]).prop_map(ModelValue::UInteger),
        prop::sample::select(&["t", "T", "true", "True", "TRUE"][..])
            .prop_map(|s| ModelValue::Boolean(true, s)),
        prop::sample::select(&["f", "F", "false", "False", "FALSE"][..])
            .prop_map(|s| ModelValue::Boolean(false, s)),
        prop::collection::vec(prop::sample::select(NAME_PIECES), 0..5)
            .prop_map(|p| ModelValue::String(p.concat())),
    ]
}

/// A valid line's model: unique tag keys, no `time`, no key both a tag and a field.
pub(crate) fn model_line() -> impl Strategy<Value = ModelLine> {
    (
        measurement(),
        prop::collection::vec((name(), name()), 0..5),
        prop::collection::vec((name(), value()), 1..6),
        prop::option::of(any::<i64>()),
        prop::sample::select(&["", " ", "\t ", "  "][..]),
        prop::sample::select(&[" ", "   "][..]),
        prop::sample::select(&["", " ", "\t", " \t "][..]),
    )
        .prop_filter_map(
            "reserved or repeated keys",
            |(measurement, tags, fields, timestamp, lead, gap, trail)| {
                let mut kept_tags: Vec<(String, String)> = Vec::new();
                for (k, v) in tags {
                    if k != "time" && !kept_tags.iter().any(|(t, _)| *t == k) {
                        kept_tags.push((k, v));
                    }
                }
                let fields: Vec<_> = fields
                    .into_iter()
                    .filter(|(k, _)| k != "time" && !kept_tags.iter().any(|(t, _)| t == k))
                    .collect();
                (!fields.is_empty()).then_some(ModelLine {
                    measurement,
                    tags: kept_tags,
                    fields,
                    timestamp,
                    lead,
                    gap,
                    trail,
                })
            },
        )
}

/// What a mutation inserts: delimiters, escapes, quotes, line breaks, numbers past
/// every range, words the parser knows, multibyte and invalid UTF-8.
const INSERTS: &[&[u8]] = &[
    b",",
    b"=",
    b" ",
    b"\"",
    b"\\",
    b"\\\"",
    b"\\\\",
    b"\\ ",
    b"\\,",
    b"\n",
    b"\r",
    b"\r\n",
    b"\t",
    b"#",
    b"i",
    b"u",
    b"e",
    b"-",
    b"+",
    b".",
    b"99999999999999999999999999999999",
    b"9223372036854775808",
    b"-9223372036854775809i",
    b"18446744073709551616u",
    b"1e999",
    b"-1e-999",
    b"NaN",
    b"-inf",
    b"tRuE",
    b"time",
    "金".as_bytes(),
    "é".as_bytes(),
    "\u{FEFF}".as_bytes(),
    b"\xff",
    b"\xc3",
    b"\x80",
    b"\x00",
];

/// One change to a line's bytes; positions are taken modulo the length.
#[derive(Debug, Clone)]
pub(crate) enum Mutation {
    Flip(usize, u8),
    Replace(usize, u8),
    Delete(usize),
    Truncate(usize),
    Insert(usize, &'static [u8]),
}

pub(crate) fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(i, b)| Mutation::Flip(i, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Replace(i, b)),
        any::<usize>().prop_map(Mutation::Delete),
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), prop::sample::select(INSERTS)).prop_map(|(i, s)| Mutation::Insert(i, s)),
        (any::<usize>(), prop::sample::select(INSERTS)).prop_map(|(i, s)| Mutation::Insert(i, s)),
    ]
}

pub(crate) fn mutate(bytes: &mut Vec<u8>, mutations: &[Mutation]) {
    for m in mutations {
        let len = bytes.len();
        match *m {
            Mutation::Flip(i, bit) if len > 0 => bytes[i % len] ^= 1 << bit,
            Mutation::Replace(i, b) if len > 0 => bytes[i % len] = b,
            Mutation::Delete(i) if len > 0 => {
                bytes.remove(i % len);
            }
            Mutation::Truncate(i) => bytes.truncate(i % (len + 1)),
            Mutation::Insert(i, s) => {
                let at = i % (len + 1);
                bytes.splice(at..at, s.iter().copied());
            }
            _ => {}
        }
    }
}

/// Near-valid bodies: a few model lines, mutated.
pub(crate) fn mutated_body() -> impl Strategy<Value = Vec<u8>> {
    (
        prop::collection::vec(model_line(), 1..4),
        prop::collection::vec(mutation(), 1..6),
    )
        .prop_map(|(lines, mutations)| {
            let text: Vec<String> = lines.iter().map(ModelLine::write).collect();
            let mut body = text.join("\n").into_bytes();
            mutate(&mut body, &mutations);
            body
        })
}

/// Bytes drawn mostly from what line protocol is made of.
pub(crate) fn protocol_soup() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(
        prop_oneof![
            prop::sample::select(INSERTS).prop_map(<[u8]>::to_vec),
            prop::sample::select(NAME_PIECES).prop_map(|s| s.as_bytes().to_vec()),
            prop::sample::select(&["m", "f", "t", "1", "0", "9"][..])
                .prop_map(|s| s.as_bytes().to_vec()),
        ],
        0..40,
    )
    .prop_map(|p| p.concat())
}

/// Every body shape the properties run on: raw bytes, protocol soup, mutated lines.
pub(crate) fn hostile_body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..200),
        protocol_soup(),
        mutated_body(),
    ]
}

/// The physical lines of a body as the parser sees them: split at `\n`, one
/// trailing `\r` dropped.
pub(crate) fn physical_lines(body: &[u8]) -> Vec<&[u8]> {
    body.split(|&c| c == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .collect()
}

/// Characters in a line as the parser counts columns (invalid bytes count one each).
pub(crate) fn chars(line: &[u8]) -> usize {
    line.iter().filter(|&&c| c & 0xC0 != 0x80).count()
}

/// The promises every result keeps, whatever the body: an error names a line of the
/// body and a column inside it (or just past its end), with a message; a parsed line
/// has a measurement, a field, no `time` key, and finite floats.
pub(crate) fn check_invariants(body: &[u8]) -> Result<(), TestCaseError> {
    let lines = physical_lines(body);
    for r in parse_lines(body) {
        match r {
            Ok(p) => {
                prop_assert!(p.line_number >= 1 && p.line_number <= lines.len());
                prop_assert!(!p.measurement.is_empty());
                prop_assert!(!p.fields.is_empty());
                for (k, v) in &p.tags {
                    prop_assert!(!k.is_empty() && !v.is_empty() && k != "time");
                }
                for (k, v) in &p.fields {
                    prop_assert!(!k.is_empty() && k != "time");
                    if let FieldValue::Float(x) = v {
                        prop_assert!(x.is_finite());
                    }
                }
            }
            Err(e) => {
                prop_assert!(e.line >= 1 && e.line <= lines.len(), "{:?}", e);
                let line = lines[e.line - 1];
                prop_assert!(
                    e.column >= 1 && e.column <= chars(line) + 1,
                    "column {} of {:?}",
                    e.column,
                    String::from_utf8_lossy(line)
                );
                prop_assert!(!e.message.is_empty());
                prop_assert!(e.text.chars().count() <= MAX_TEXT + 3);
                prop_assert!(e.message.len() <= 2 * MAX_VALUE_IN_MESSAGE + 200, "{:?}", e);
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(1000))]

    #[test]
    fn hostile_bytes_never_panic_and_errors_point_inside_their_line(body in hostile_body()) {
        check_invariants(&body)?;
    }

    #[test]
    fn a_model_line_reads_back_as_the_model(line in model_line()) {
        let text = line.write();
        let p = parse_line(text.as_bytes(), 7).map_err(|e| {
            TestCaseError::fail(format!("{text:?} does not parse: {e}"))
        })?;
        prop_assert_eq!(p.line_number, 7);
        line.check(&p, &text)?;
    }

    #[test]
    fn a_body_of_model_lines_reads_back_line_by_line(
        lines in prop::collection::vec(
            (model_line(), prop::sample::select(&["", "\n", "# a comment\n", "  \t\n"][..]), any::<bool>()),
            1..6,
        ),
    ) {
        let mut body = String::new();
        let mut numbers = Vec::new();
        for (line, before, crlf) in &lines {
            body.push_str(before);
            numbers.push(body.matches('\n').count() + 1);
            body.push_str(&line.write());
            body.push_str(if *crlf { "\r\n" } else { "\n" });
        }
        let parsed: Vec<_> = parse_lines(body.as_bytes()).collect();
        prop_assert_eq!(parsed.len(), lines.len(), "{:?}", body);
        for ((line, _, _), (p, number)) in lines.iter().zip(parsed.iter().zip(numbers)) {
            let p = p.as_ref().map_err(|e| TestCaseError::fail(format!("{body:?}: {e}")))?;
            prop_assert_eq!(p.line_number, number);
            line.check(p, &body)?;
        }
    }

    #[test]
    fn an_error_at_a_mutated_line_leaves_its_neighbours_parsed(
        before in model_line(),
        middle in model_line(),
        after in model_line(),
        mutations in prop::collection::vec(mutation(), 1..4),
    ) {
        let mut bad = middle.write().into_bytes();
        mutate(&mut bad, &mutations);
        // The mutation may have added lines of its own; those are the middle's.
        let extra = bad.iter().filter(|&&c| c == b'\n').count();
        let mut body = before.write().into_bytes();
        body.push(b'\n');
        body.extend_from_slice(&bad);
        body.push(b'\n');
        body.extend_from_slice(after.write().as_bytes());
        check_invariants(&body)?;
        let parsed: Vec<_> = parse_lines(&body).collect();
        let first = parsed.first().and_then(|r| r.as_ref().ok());
        let last = parsed.last().and_then(|r| r.as_ref().ok());
        let (Some(first), Some(last)) = (first, last) else {
            return Err(TestCaseError::fail(format!("{:?}", String::from_utf8_lossy(&body))));
        };
        prop_assert_eq!(first.line_number, 1);
        before.check(first, "before")?;
        prop_assert_eq!(last.line_number, 3 + extra);
        after.check(last, "after")?;
    }
}
