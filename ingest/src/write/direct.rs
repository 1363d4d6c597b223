//! Direct writes: a body whose every line has its table's usual shape, parsed
//! straight into the table's columns.
//!
//! A city's devices write the same keys line after line: a table's lines carry the
//! same tags and the same fields of the same types, all of them columns the table
//! already has. For such a body the general path (every line parsed into a list of
//! [`ParsedLine`](crate::line_protocol::ParsedLine)s of hundreds of bytes, each then
//! validated under the schema lock and copied into Arrow builders) does most of
//! its work for nothing. Here a table's first line in the body fixes its shape
//! (keys, their columns and types), and every line is read against that shape,
//! its values appended to the columns as they are found: nothing per line is
//! kept but the values themselves, and the schema lock is not taken.
//!
//! Anything else gives up, and the caller takes the general path, which then does
//! all the work (and says what is wrong where): a line that does not parse, a key
//! or type the shape does not have, a table or column not yet in the schema, a
//! rollup, an escaped name, a limit reached. So the batches made here are always
//! the ones the general path would make, which the tests check on both paths.

use std::sync::Arc;

use citytsdb_storage::schema::{arrow_field, ColumnDef, TIME_COLUMN};
use citytsdb_storage::{ColumnKind, FieldType, TableSchema};
use datafusion::arrow::array::{ArrayRef, TimestampNanosecondArray};
use datafusion::arrow::datatypes::Schema;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::common::HashMap as FastMap;

use super::{field_type, Builder, Limits, Precision};
use crate::line_protocol::{
    is_space, parse_line, parse_unquoted, scan, unescape, FieldValue, KEY_END, KEY_ESCAPES,
    MEASUREMENT_END, STRING_ESCAPES,
};

/// What a direct write needs to know of a table the database has.
#[derive(Debug, Clone)]
pub struct KnownTable {
    /// Its schema now.
    pub schema: Arc<TableSchema>,
    /// How many series it has now.
    pub series: usize,
}

/// A body written directly: its batches and how many data lines it had.
#[derive(Debug)]
pub struct DirectWrite {
    /// One batch per table, in table-name order (as [`build_batches`](super::build_batches)).
    pub tables: Vec<(String, RecordBatch)>,
    /// Lines that were neither blank nor comments (every one of them is in `tables`).
    pub data_lines: usize,
}

/// The batches of `body` if every data line has its table's shape, else `None`
/// (the general path must then be taken). `table` says what the database knows of
/// a table, or `None` where a write to it must take the general path (a table
/// that does not exist, or that takes no writes). Lines without a timestamp get
/// `now_ns`.
pub fn build_direct(
    body: &[u8],
    precision: Precision,
    now_ns: i64,
    limits: &Limits,
    mut table: impl FnMut(&str) -> Option<KnownTable>,
) -> Option<DirectWrite> {
    // Offsets into the body are kept as u32 and string columns take i32 offsets.
    if body.len() > i32::MAX as usize {
        return None;
    }
    let text = simdutf8::basic::from_utf8(body).ok()?;

    // First pass: the data lines and their tables, and each table's shape from its
    // first line; the columns are then sized exactly.
    let mut tables: Vec<Shape<'_>> = Vec::new();
    let mut by_name: FastMap<&str, u32> = FastMap::default();
    let mut lines: Vec<LineSpan> = Vec::new();
    let mut last = u32::MAX;
    let mut start = 0;
    let ends = memchr::memchr_iter(b'\n', body).chain(std::iter::once(body.len()));
    for (i, end) in ends.enumerate() {
        let raw = &body[start..end];
        let line_start = start;
        start = end + 1;
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        match raw.iter().find(|&&b| b != b' ' && b != b'\t') {
            None | Some(b'#') => continue,
            Some(_) => {}
        }
        // Leading or trailing blanks, and long lines, are the general path's.
        if is_space(raw[0]) || is_space(raw[raw.len() - 1]) || raw.len() > limits.max_line_bytes {
            return None;
        }
        let (m_end, escaped) = scan(raw, 0, raw.len(), MEASUREMENT_END);
        if escaped || m_end == 0 {
            return None;
        }
        let line_text = &text[line_start..line_start + raw.len()];
        let name = &line_text[..m_end];
        let t = if last != u32::MAX && tables[last as usize].name == name {
            last
        } else if let Some(&t) = by_name.get(name) {
            t
        } else {
            let known = table(name)?;
            let shape = Shape::of(name, line_text, i + 1, known, limits)?;
            let t = tables.len() as u32;
            tables.push(shape);
            by_name.insert(name, t);
            t
        };
        tables[t as usize].rows += 1;
        lines.push(LineSpan {
            start: line_start as u32,
            len: raw.len() as u32,
            fields_at: m_end as u32,
            table: t,
        });
        last = t;
    }
    for shape in &tables {
        if shape.known.series.saturating_add(shape.rows) > limits.max_series {
            return None;
        }
    }

    // Second pass: each line's values onto its table's columns.
    let mut columns: Vec<Columns> = tables.iter().map(Columns::new).collect();
    for line in &lines {
        let start = line.start as usize;
        let s = &text[start..start + line.len as usize];
        let t = line.table as usize;
        let ts = append_line(
            s,
            line.fields_at as usize,
            &tables[t],
            &mut columns[t],
            limits,
        )?;
        let ts = match ts {
            Some(ts) => ts.checked_mul(precision.nanos_for(ts))?,
            None => now_ns,
        };
        columns[t].times.push(ts);
    }
    let mut out: Vec<(String, RecordBatch)> = tables
        .iter()
        .zip(columns)
        .map(|(shape, cols)| Some((shape.name.to_string(), cols.finish(shape).ok()?)))
        .collect::<Option<_>>()?;
    out.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    Some(DirectWrite {
        tables: out,
        data_lines: lines.len(),
    })
}

/// Where a data line lies in the body, and its table.
struct LineSpan {
    start: u32,
    len: u32,
    /// Where the measurement name ends.
    fields_at: u32,
    table: u32,
}

/// The keys of a table's lines in one body, fixed by its first line.
struct Shape<'a> {
    name: &'a str,
    known: KnownTable,
    /// Tag keys, as written, each with the index of its column in `columns`.
    tags: Vec<(&'a str, usize)>,
    /// Field keys, as written, each with the index of its column (whose builder
    /// takes only values of the field's type).
    fields: Vec<(&'a str, usize)>,
    /// The schema columns the lines carry, in schema order.
    columns: Vec<usize>,
    rows: usize,
}

impl<'a> Shape<'a> {
    /// The shape of `line` (number `line_number`), if its keys are columns of the
    /// table of the kinds it gives them, and none needs unescaping or repeats.
    fn of(
        name: &'a str,
        line: &'a str,
        line_number: usize,
        known: KnownTable,
        limits: &Limits,
    ) -> Option<Self> {
        let parsed = parse_line(line.as_bytes(), line_number).ok()?;
        if parsed.tags.len() > limits.max_tags {
            return None;
        }
        let schema = &known.schema;
        let mut at: Vec<(usize, usize)> = Vec::new(); // (schema column, key index)
        let mut keys: Vec<(&'a str, Option<FieldType>)> = Vec::new();
        let borrowed = |k: &std::borrow::Cow<'a, str>| match k {
            std::borrow::Cow::Borrowed(k) if !k.contains('\\') => Some(*k),
            _ => None,
        };
        for (k, _) in &parsed.tags {
            let k = borrowed(k)?;
            let (c, ColumnKind::Tag) = schema.position(k)? else {
                return None;
            };
            at.push((c, keys.len()));
            keys.push((k, None));
        }
        for (k, v) in &parsed.fields {
            let k = borrowed(k)?;
            let ty = field_type(v);
            match schema.position(k)? {
                (c, ColumnKind::Field(t)) if t == ty => {
                    at.push((c, keys.len()));
                    keys.push((k, Some(ty)));
                }
                _ => return None,
            }
        }
        // A key repeated (a field written twice) is the general path's.
        at.sort_unstable();
        if at.windows(2).any(|w| w[0].0 == w[1].0) {
            return None;
        }
        let mut slot = vec![0; keys.len()];
        for (i, &(_, key)) in at.iter().enumerate() {
            slot[key] = i;
        }
        let mut tags = Vec::new();
        let mut fields = Vec::new();
        for ((k, ty), slot) in keys.into_iter().zip(slot) {
            match ty {
                None => tags.push((k, slot)),
                Some(_) => fields.push((k, slot)),
            }
        }
        Some(Self {
            name,
            known,
            tags,
            fields,
            columns: at.into_iter().map(|(c, _)| c).collect(),
            rows: 0,
        })
    }
}

/// One table's columns while its lines are appended (the general path's builders).
struct Columns {
    builders: Vec<Builder>,
    times: Vec<i64>,
}

impl Columns {
    fn new(shape: &Shape<'_>) -> Self {
        let columns = shape.known.schema.columns();
        Self {
            builders: shape
                .columns
                .iter()
                .map(|&c| Builder::new(columns[c].kind, shape.rows))
                .collect(),
            times: Vec::with_capacity(shape.rows),
        }
    }

    /// The table's batch: `time`, then the columns in schema order.
    fn finish(
        self,
        shape: &Shape<'_>,
    ) -> Result<RecordBatch, datafusion::arrow::error::ArrowError> {
        let defs = shape.known.schema.columns();
        let time_def = ColumnDef {
            name: TIME_COLUMN.to_string(),
            kind: ColumnKind::Time,
        };
        let mut fields = vec![arrow_field(&time_def)];
        fields.extend(shape.columns.iter().map(|&c| arrow_field(&defs[c])));
        let mut arrays: Vec<ArrayRef> = vec![Arc::new(
            TimestampNanosecondArray::from(self.times).with_timezone("UTC"),
        )];
        arrays.extend(self.builders.into_iter().map(Builder::finish));
        RecordBatch::try_new(Arc::new(Schema::new(fields)), arrays)
    }
}

/// Reads line `s` from `pos` (where its measurement ends) as `shape` says it is,
/// appending its tags and fields to `cols`; returns its timestamp as written.
/// `None` where the line is not of the shape, or where the general parser would
/// reject it or read it otherwise. Every test below is the one `parse_str` makes
/// at the same place, with its failure sending the body to the general path.
#[inline]
fn append_line(
    s: &str,
    mut pos: usize,
    shape: &Shape<'_>,
    cols: &mut Columns,
    limits: &Limits,
) -> Option<Option<i64>> {
    let b = s.as_bytes();
    let end = b.len();
    // `key=` at `pos`: the key holds no delimiter or backslash (see `Shape::of`),
    // so the general parser's key ends just where this one does.
    let key_at = |pos: usize, key: &str| -> Option<usize> {
        let key_end = pos + key.len();
        (key_end < end && &b[pos..key_end] == key.as_bytes() && b[key_end] == b'=')
            .then_some(key_end + 1)
    };
    for &(key, slot) in &shape.tags {
        if pos >= end || b[pos] != b',' {
            return None;
        }
        let val_start = key_at(pos + 1, key)?;
        let (val_end, escaped) = scan(b, val_start, end, KEY_END);
        if val_end == val_start || (val_end < end && b[val_end] == b'=') {
            return None;
        }
        let Builder::Tag(builder) = &mut cols.builders[slot] else {
            return None;
        };
        builder.append_value(unescape(&s[val_start..val_end], escaped, KEY_ESCAPES));
        pos = val_end;
    }
    // The tag section ends with a space (another tag is not of the shape).
    if pos >= end || b[pos] != b' ' {
        return None;
    }
    while pos < end && b[pos] == b' ' {
        pos += 1;
    }
    for (j, &(key, slot)) in shape.fields.iter().enumerate() {
        if j > 0 {
            if pos >= end || b[pos] != b',' {
                return None;
            }
            pos += 1;
        }
        let val_start = key_at(pos, key)?;
        let quoted = val_start < end && b[val_start] == b'"';
        let column = &mut cols.builders[slot];
        if quoted {
            let (close, escaped) = scan(b, val_start + 1, end, [b'"']);
            if close == end {
                return None;
            }
            let value = unescape(&s[val_start + 1..close], escaped, STRING_ESCAPES);
            pos = close + 1;
            if (pos < end && b[pos] != b',' && b[pos] != b' ')
                || value.len() > limits.max_string_bytes
            {
                return None;
            }
            let Builder::String(builder) = column else {
                return None;
            };
            builder.append_value(value);
            continue;
        }
        let val_end = memchr::memchr2(b',', b' ', &b[val_start..]).map_or(end, |n| val_start + n);
        if val_end == val_start {
            return None;
        }
        let value = parse_unquoted(&s[val_start..val_end], key).ok()?;
        match (column, value) {
            (Builder::Float(c), FieldValue::Float(v)) => c.append_value(v),
            (Builder::Integer(c), FieldValue::Integer(v)) => c.append_value(v),
            (Builder::UInteger(c), FieldValue::UInteger(v)) => c.append_value(v),
            (Builder::Boolean(c), FieldValue::Boolean(v)) => c.append_value(v),
            _ => return None,
        }
        pos = val_end;
    }
    // Another field is not of the shape.
    if pos < end && b[pos] == b',' {
        return None;
    }
    while pos < end && b[pos] == b' ' {
        pos += 1;
    }
    if pos == end {
        return Some(None);
    }
    // The timestamp runs to the end of the line: trailing blanks were ruled out,
    // so a space inside it is text after the timestamp.
    let ts = &s[pos..];
    if ts.starts_with('+') || ts.contains(' ') {
        return None;
    }
    ts.parse::<i64>().ok().map(Some)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;
    use crate::line_protocol::fuzz::{config, model_line, mutate, mutation, ModelLine};
    use crate::write::{build_batches, parse_body, validate_with};

    const NOW: i64 = 1_767_225_600_000_000_000;

    /// The general path's batches of `body`, and what it rejected.
    fn general(
        body: &[u8],
        precision: Precision,
        schemas: &mut BTreeMap<String, TableSchema>,
        limits: &Limits,
    ) -> (Vec<(String, RecordBatch)>, usize) {
        let parsed = parse_body(body);
        let v = validate_with(parsed.lines, precision, schemas, limits);
        let rejected = parsed.rejected.len() + v.rejected.len();
        (build_batches(&v, NOW).expect("batches"), rejected)
    }

    fn direct(
        body: &[u8],
        precision: Precision,
        schemas: &BTreeMap<String, TableSchema>,
        limits: &Limits,
    ) -> Option<DirectWrite> {
        build_direct(body, precision, NOW, limits, |t| {
            Some(KnownTable {
                schema: Arc::new(schemas.get(t)?.clone()),
                series: 0,
            })
        })
    }

    const CITY: &str = "manhole,device=mh-00001,district=金水区 tilt_deg=0.26,water_level_cm=-100.6,battery_pct=99i,cover_open=false 1767225600
parking,device=pk-00002,district=二七区,street=Zhongzhou\\ Ave occupied=51i,capacity=174u 1767225600
# a comment, and a blank line

traffic,device=tr-00003,district=中原区 flow=28i,speed_kmh=67.2,note=\"a \\\"quoted\\\" word\" 1767225601\r
manhole,device=mh-00005,district=中原区 tilt_deg=1.45,water_level_cm=-141.4,battery_pct=95i,cover_open=T
parking,device=pk-00006,district=二七区,street=Songshan\\,Rd  occupied=3i,capacity=10u   1767225602";

    #[test]
    fn city_lines_are_written_directly_as_the_general_path_writes_them() {
        let limits = Limits::default();
        for precision in [Precision::Second, Precision::Auto, Precision::Nanosecond] {
            let mut schemas = BTreeMap::new();
            general(CITY.as_bytes(), precision, &mut schemas, &limits);
            let before = schemas.clone();
            let (expected, rejected) = general(CITY.as_bytes(), precision, &mut schemas, &limits);
            assert_eq!((rejected, &schemas), (0, &before));
            let got = direct(CITY.as_bytes(), precision, &schemas, &limits)
                .expect("city lines are written directly");
            assert_eq!(got.data_lines, 5);
            assert_eq!(got.tables, expected);
            let manhole = &got.tables[0].1;
            assert_eq!(manhole.num_rows(), 2);
            assert_eq!(
                manhole
                    .column(0)
                    .as_any()
                    .downcast_ref::<TimestampNanosecondArray>()
                    .unwrap()
                    .value(1),
                NOW,
                "a line without a timestamp is written at now"
            );
        }
    }

    #[test]
    fn bodies_the_general_path_must_see_are_left_to_it() {
        let limits = Limits::default();
        let mut schemas = BTreeMap::new();
        general(CITY.as_bytes(), Precision::Second, &mut schemas, &limits);
        let line = "traffic,device=tr-1,district=d flow=1i,speed_kmh=2.5,note=\"n\" 17";
        assert!(direct(line.as_bytes(), Precision::Second, &schemas, &limits).is_some());
        let cases = [
            ("a new table", "bus,device=b f=1 1"),
            ("a new column", "traffic,device=tr-1,district=d flow=1i,lanes=2i 1"),
            ("a tag that is a field", "traffic,device=tr-1,flow=d speed_kmh=1 1"),
            ("a field of another type", "traffic,device=tr-1,district=d flow=1.5 1"),
            ("a line unlike its table's first", &format!("{line}\ntraffic,device=tr-2 flow=1i 1")),
            ("an extra tag", &format!("{line}\ntraffic,device=tr-2,district=d,street=s flow=1i,speed_kmh=2.5,note=\"n\" 1")),
            ("an extra field", &format!("{line}\ntraffic,device=tr-2,district=d flow=1i,speed_kmh=2.5,note=\"n\",flow=2i 1")),
            ("a missing field", &format!("{line}\ntraffic,device=tr-2,district=d flow=1i,speed_kmh=2.5 1")),
            ("fields in another order", &format!("{line}\ntraffic,device=tr-2,district=d speed_kmh=2.5,flow=1i,note=\"n\" 1")),
            ("a bad value", &format!("{line}\ntraffic,device=tr-2,district=d flow=1x,speed_kmh=2.5,note=\"n\" 1")),
            ("a string unterminated", &format!("{line}\ntraffic,device=tr-2,district=d flow=1i,speed_kmh=2.5,note=\"n 1")),
            ("an unquoted string", &format!("{line}\ntraffic,device=tr-2,district=d flow=1i,speed_kmh=2.5,note=n 1")),
            ("a field written twice", "traffic,device=tr-1,district=d flow=1i,flow=2i 1"),
            ("an escaped measurement", "traf\\ fic,device=tr-1 flow=1i 1"),
            ("an escaped key", "traffic,dev\\ ice=tr-1 flow=1i 1"),
            ("an empty tag value", &format!("{line}\ntraffic,device=,district=d flow=1i,speed_kmh=2.5,note=\"n\" 1")),
            ("an '=' in a tag value", &format!("{line}\ntraffic,device=a=b,district=d flow=1i,speed_kmh=2.5,note=\"n\" 1")),
            ("a leading blank", &format!(" {line}")),
            ("a trailing blank", &format!("{line} ")),
            ("a timestamp with a plus", &format!("{line}\ntraffic,device=tr-2,district=d flow=1i,speed_kmh=2.5,note=\"n\" +1")),
            ("text after the timestamp", &format!("{line} 2")),
            ("a timestamp past nanoseconds", "traffic,device=tr-1,district=d flow=1i,speed_kmh=2.5,note=\"n\" 9223372036854775"),
            ("invalid UTF-8", "traffic,device=tr-\u{FFFD} flow=1i 1"),
        ];
        for (what, body) in cases {
            let mut body = body.as_bytes().to_vec();
            if what == "invalid UTF-8" {
                body[18] = 0xff;
            }
            assert!(
                direct(&body, Precision::Second, &schemas, &limits).is_none(),
                "{what}: {}",
                String::from_utf8_lossy(&body)
            );
        }
        let tight = |l: Limits| direct(line.as_bytes(), Precision::Second, &schemas, &l).is_none();
        assert!(
            tight(Limits {
                max_line_bytes: 20,
                ..limits
            }),
            "a long line"
        );
        assert!(
            tight(Limits {
                max_tags: 1,
                ..limits
            }),
            "too many tags"
        );
        assert!(
            tight(Limits {
                max_string_bytes: 0,
                ..limits
            }),
            "a long string"
        );
        assert!(
            tight(Limits {
                max_series: 0,
                ..limits
            }),
            "too many series"
        );
        let unknown = build_direct(line.as_bytes(), Precision::Second, NOW, &limits, |_| None);
        assert!(
            unknown.is_none(),
            "a table the caller leaves to the general path"
        );
    }

    proptest! {
        #![proptest_config(config(300))]

        /// Whatever the body, a direct write is the general path's write: the same
        /// batches, nothing rejected, no schema changed.
        #[test]
        fn a_direct_write_is_the_general_paths_write(
            first in prop::collection::vec(model_line(), 1..5),
            picks in prop::collection::vec(any::<prop::sample::Index>(), 1..12),
            mutations in prop::collection::vec(mutation(), 0..2),
            precision in prop::sample::select(&[
                Precision::Nanosecond, Precision::Millisecond, Precision::Second, Precision::Auto,
            ][..]),
            canonical in any::<bool>(),
        ) {
            let limits = Limits::default();
            // Half the bodies are as a device writes them (no blanks around a line,
            // names without escapes, timestamps of this century), so that most of
            // them are written directly; the others mostly are not.
            let plain = |k: &str| {
                let k: String = k.chars().filter(|c| !",= \\\"".contains(*c)).collect();
                if k.is_empty() { "k".to_string() } else { k }
            };
            let text = |l: &ModelLine| {
                let mut l = l.clone();
                if canonical {
                    (l.lead, l.gap, l.trail) = ("", " ", "");
                    l.measurement = plain(&l.measurement);
                    l.tags.iter_mut().for_each(|(k, _)| *k = plain(k));
                    l.fields.iter_mut().for_each(|(k, _)| *k = plain(k));
                    l.timestamp = l.timestamp.map(|t| t.rem_euclid(2_000_000_000));
                }
                l.write()
            };
            let mut schemas = BTreeMap::new();
            let template: Vec<String> = first.iter().map(text).collect();
            general(template.join("\n").as_bytes(), precision, &mut schemas, &limits);
            let lines: Vec<&str> = picks.iter().map(|i| template[i.index(template.len())].as_str()).collect();
            let mut body = lines.join("\n").into_bytes();
            mutate(&mut body, &mutations);
            let before = schemas.clone();
            if let Some(got) = direct(&body, precision, &schemas, &limits) {
                let (expected, rejected) = general(&body, precision, &mut schemas, &limits);
                prop_assert_eq!(rejected, 0, "{}", String::from_utf8_lossy(&body));
                prop_assert_eq!(&schemas, &before);
                prop_assert_eq!(got.tables, expected, "{}", String::from_utf8_lossy(&body));
            }
        }
    }
}
