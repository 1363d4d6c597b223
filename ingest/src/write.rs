//! Validation of parsed lines against table schemas, and their conversion to Arrow.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use citytsdb_storage::schema::{arrow_field, ColumnDef, TIME_COLUMN};
use citytsdb_storage::{ColumnKind, FieldType, TableSchema};
use datafusion::arrow::array::{
    ArrayRef, BooleanBuilder, Float64Builder, Int64Builder, StringBuilder,
    TimestampNanosecondArray, UInt64Builder,
};
use datafusion::arrow::datatypes::Schema;
use datafusion::arrow::error::ArrowError;
use datafusion::arrow::record_batch::RecordBatch;
/// hashbrown's map with its default hasher: looked up per tag and field of every
/// written line, where SipHash showed in profiles.
use datafusion::common::HashMap as FastMap;

use crate::line_protocol::{parse_line_onto, FieldValue, LineError, ParsedLine};

/// The unit of the timestamps in a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// Nanoseconds (the default).
    #[default]
    Nanosecond,
    /// Microseconds.
    Microsecond,
    /// Milliseconds.
    Millisecond,
    /// Seconds.
    Second,
    /// Each timestamp by its magnitude, as InfluxDB 3's `auto`: below 5e9 seconds,
    /// below 5e12 milliseconds, below 5e15 microseconds, else nanoseconds.
    Auto,
}

impl Precision {
    /// Parses a `precision` parameter: `ns`/`n`, `us`/`u`, `ms`, `s`.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "ns" | "n" => Self::Nanosecond,
            "us" | "u" | "µ" | "µs" => Self::Microsecond,
            "ms" => Self::Millisecond,
            "s" => Self::Second,
            _ => return None,
        })
    }

    /// Parses InfluxDB 3's spellings: `auto`, `nanosecond`, `microsecond`,
    /// `millisecond`, `second` (and the short ones).
    pub fn parse_v3(s: &str) -> Option<Self> {
        Some(match s {
            "auto" => Self::Auto,
            "nanosecond" => Self::Nanosecond,
            "microsecond" => Self::Microsecond,
            "millisecond" => Self::Millisecond,
            "second" => Self::Second,
            other => return Self::parse(other),
        })
    }

    /// Nanoseconds per unit of timestamp `ts`.
    pub fn nanos_for(self, ts: i64) -> i64 {
        match self {
            Self::Nanosecond => 1,
            Self::Microsecond => 1_000,
            Self::Millisecond => 1_000_000,
            Self::Second => 1_000_000_000,
            Self::Auto => match ts.unsigned_abs() {
                m if m < 5_000_000_000 => 1_000_000_000,
                m if m < 5_000_000_000_000 => 1_000_000,
                m if m < 5_000_000_000_000_000 => 1_000,
                _ => 1,
            },
        }
    }

    /// Nanoseconds per unit (`auto` reads "now" in nanoseconds).
    pub fn nanos(self) -> i64 {
        match self {
            Self::Auto => 1,
            other => other.nanos_for(1),
        }
    }
}

/// A body split into parsed lines and rejected ones.
#[derive(Debug, Default)]
pub struct ParsedBody<'a> {
    /// Lines that parsed, in body order, with their raw text.
    pub lines: Vec<(&'a [u8], ParsedLine<'a>)>,
    /// Lines that did not parse.
    pub rejected: Vec<LineError>,
    /// Data lines in the body (not blank, not comments).
    pub data_lines: usize,
}

/// Parses every line of a body. Blank and `#` comment lines are skipped but counted
/// in line numbers.
///
/// Allocates the list of parsed lines once, sized by the most lines that can parse
/// (the body's line count, or its length over the shortest line's, if fewer); the
/// lines themselves borrow from the body (see `line_protocol.rs`).
pub fn parse_body(body: &[u8]) -> ParsedBody<'_> {
    parse_body_into(body, Vec::new())
}

/// [`parse_body`], filling `spare` (emptied first; see [`spare_lines`]) rather than a
/// new list when it has room.
pub fn parse_body_into<'a>(body: &'a [u8], spare: Vec<Line<'static>>) -> ParsedBody<'a> {
    // The shortest line that parses, `m f=1`, and its newline: a body holds no more
    // lines that parse than this allows, however many blank lines it has (each
    // reserved entry weighs hundreds of bytes).
    const SHORTEST_LINE: usize = 6;
    let physical_lines = memchr::memchr_iter(b'\n', body).count() + 1;
    let mut lines = relabel(spare);
    lines.reserve_exact(physical_lines.min(body.len() / SHORTEST_LINE + 1));
    let mut out = ParsedBody {
        lines,
        ..ParsedBody::default()
    };
    // The lines' ends, found a vector at a time (as `body.split` on `\n`).
    let ends = memchr::memchr_iter(b'\n', body).chain(std::iter::once(body.len()));
    let mut start = 0;
    for (i, end) in ends.enumerate() {
        let raw = &body[start..end];
        start = end + 1;
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        let trimmed = raw
            .iter()
            .position(|&b| b != b' ' && b != b'\t')
            .map(|p| &raw[p..]);
        match trimmed {
            None => continue,
            Some(t) if t[0] == b'#' => continue,
            Some(_) => {}
        }
        out.data_lines += 1;
        if let Err(e) = parse_line_onto(raw, i + 1, &mut out.lines) {
            out.rejected.push(e);
        }
    }
    out
}

/// A parsed line with its raw text.
pub type Line<'a> = (&'a [u8], ParsedLine<'a>);

/// Spare lists of parsed lines, kept between writes: a body of 10,000 lines needs a
/// list of megabytes, and the allocator hands a fresh one out as fresh pages, each
/// zeroed by the kernel on first touch (a tenth of an ingest's time). At most
/// [`SPARE_LISTS`] lists of at most [`SPARE_LINES`] entries are kept.
static SPARES: std::sync::Mutex<Vec<Vec<Line<'static>>>> = std::sync::Mutex::new(Vec::new());
/// Spare lists kept at most (about one per concurrent writer).
pub const SPARE_LISTS: usize = 8;
/// The longest spare list kept, in lines (a few MB).
pub const SPARE_LINES: usize = 10_000;

/// A spare list of parsed lines for [`parse_body_into`], or an empty one.
pub fn spare_lines() -> Vec<Line<'static>> {
    SPARES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .pop()
        .unwrap_or_default()
}

/// Keeps `lines`' allocation for a later write (see [`spare_lines`]), if there is
/// room for it.
pub fn return_lines(lines: Vec<Line<'_>>) {
    if lines.capacity() == 0 || lines.capacity() > SPARE_LINES {
        return;
    }
    let lines = relabel(lines);
    let mut spares = SPARES.lock().unwrap_or_else(|e| e.into_inner());
    if spares.len() < SPARE_LISTS {
        spares.push(lines);
    }
}

/// The allocation of `lines`, emptied, as a list of another lifetime. (Collecting
/// an emptied vector's iterator into one of the same layout reuses its
/// allocation.)
fn relabel<'b>(mut lines: Vec<Line<'_>>) -> Vec<Line<'b>> {
    lines.clear();
    lines
        .into_iter()
        .map(|_| unreachable!("the list is empty"))
        .collect()
}

/// Lines accepted for writing, grouped by table, with each table's schema as validated.
#[derive(Debug, Default)]
pub struct ValidatedWrite<'a> {
    /// Every line that parsed, in body order, with its raw text (timestamps in
    /// nanoseconds once validated). Lines stay where they are: a line weighs
    /// hundreds of bytes, and moving them into groups was a tenth of a write.
    pub lines: Vec<(&'a [u8], ParsedLine<'a>)>,
    /// Table -> (schema at validation, the indexes in `lines` of its accepted
    /// lines, in body order).
    pub tables: BTreeMap<String, (TableSchema, Vec<usize>)>,
    /// Lines rejected by validation.
    pub rejected: Vec<LineError>,
    /// For each key of each accepted line (its tags, then its fields, as written),
    /// the key's column in its table's schema; a line's start here is in `col_at`.
    pub cols: Vec<u32>,
    /// Where each line's keys start in `cols` (by index in `lines`; meaningful for
    /// accepted lines only).
    pub col_at: Vec<u32>,
}

impl ValidatedWrite<'_> {
    /// The schema columns of an accepted line's keys: its tags, then its fields.
    fn columns_of(&self, index: usize) -> &[u32] {
        let line = &self.lines[index].1;
        let start = self.col_at[index] as usize;
        &self.cols[start..start + line.tags.len() + line.fields.len()]
    }
}

/// What a write may hold; past a limit, the line is rejected saying which.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest line, bytes.
    pub max_line_bytes: usize,
    /// Longest string field value, bytes.
    pub max_string_bytes: usize,
    /// Most tables a database may have.
    pub max_tables: usize,
    /// Most columns (time, tags and fields) a table may have.
    pub max_columns: usize,
    /// Most series (distinct tag sets) a table may have.
    pub max_series: usize,
    /// Most lines one request may hold (every physical line counts); past it the
    /// whole request is refused. It bounds what parsing one body holds: a parsed
    /// line takes a few hundred bytes however short its text.
    pub max_lines: usize,
    /// Most tags one line may carry.
    pub max_tags: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_line_bytes: 1 << 20,
            max_string_bytes: 64 << 10,
            max_tables: 10_000,
            max_columns: 1_024,
            max_series: 2_000_000,
            max_lines: 100_000,
            max_tags: 128,
        }
    }
}

/// [`validate_with`] under the default [`Limits`].
pub fn validate<'a>(
    lines: Vec<(&'a [u8], ParsedLine<'a>)>,
    precision: Precision,
    schemas: &mut BTreeMap<String, TableSchema>,
) -> ValidatedWrite<'a> {
    validate_with(lines, precision, schemas, &Limits::default())
}

/// Why a line breaks `limits` before its table is looked at, if it does.
fn over_limit(raw: &[u8], line: &ParsedLine<'_>, limits: &Limits) -> Option<LineError> {
    if raw.len() > limits.max_line_bytes {
        return Some(at(
            raw,
            line,
            1,
            format!(
                "line is {} bytes, longer than the limit of {} bytes",
                raw.len(),
                limits.max_line_bytes
            ),
        ));
    }
    if line.tags.len() > limits.max_tags {
        let (first_past, _) = &line.tags[limits.max_tags];
        return Some(at(
            raw,
            line,
            column_of(raw, first_past),
            format!(
                "line has {} tags, more than the limit of {} (--max-tags)",
                line.tags.len(),
                limits.max_tags
            ),
        ));
    }
    line.fields.iter().find_map(|(name, v)| match v {
        FieldValue::String(s) if s.len() > limits.max_string_bytes => Some(at(
            raw,
            line,
            column_of(raw, name),
            format!(
                "field {name} is a string of {} bytes, longer than the limit of {} bytes",
                s.len(),
                limits.max_string_bytes
            ),
        )),
        _ => None,
    })
}

/// The series a database already has, as the series limit needs them.
pub trait KnownSeries {
    /// How many series `table` has.
    fn count(&self, table: &str) -> usize;
    /// Whether `table` has a series with exactly these tags.
    fn knows(&self, table: &str, tags: &[(&str, &str)]) -> bool;
}

/// A database without series (every tag set is new): the series limit then
/// bounds what one write brings.
pub struct NoSeries;

impl KnownSeries for NoSeries {
    fn count(&self, _: &str) -> usize {
        0
    }
    fn knows(&self, _: &str, _: &[(&str, &str)]) -> bool {
        false
    }
}

/// Per table of one write: the series it had and the new ones the write brings.
struct SeriesGate {
    known: usize,
    /// Lines of the write for the table: while `known` plus these fit the limit,
    /// no line needs looking up.
    lines: usize,
    new: HashSet<String>,
}

impl SeriesGate {
    /// Whether `line` may be written under `max` series, counting its series if new.
    fn admit(&mut self, known: &dyn KnownSeries, line: &ParsedLine<'_>, max: usize) -> bool {
        if self.known.saturating_add(self.lines) <= max {
            return true;
        }
        let mut tags: Vec<(&str, &str)> = line
            .tags
            .iter()
            .map(|(k, v)| (k.as_ref(), v.as_ref()))
            .collect();
        tags.sort_unstable();
        let table = line.measurement.as_ref();
        if known.knows(table, &tags) {
            return true;
        }
        let mut key = String::new();
        for (k, v) in &tags {
            key.push_str(&format!("{}:{k}{}:{v}", k.len(), v.len()));
        }
        if self.new.contains(&key) {
            return true;
        }
        if self.known + self.new.len() >= max {
            return false;
        }
        self.new.insert(key);
        true
    }
}

/// Checks each line against its table's schema, adding new tables and columns, and
/// rejecting lines whose tags or fields conflict with the schema, whose timestamp
/// does not fit in nanoseconds, or that break `limits` (the series limit counting
/// only the series this write brings: see [`validate_against`]).
///
/// Call it with the engine's schema lock held (`Engine::update_schemas`), so schema
/// growth is serialized; it does no allocation-heavy work.
pub fn validate_with<'a>(
    lines: Vec<(&'a [u8], ParsedLine<'a>)>,
    precision: Precision,
    schemas: &mut BTreeMap<String, TableSchema>,
    limits: &Limits,
) -> ValidatedWrite<'a> {
    validate_against(lines, precision, schemas, limits, &NoSeries)
}

/// [`validate_with`], the series limit counting the series `known` already has:
/// a line whose series is new to a table at `limits.max_series` is rejected.
/// Writes validated together count each other's new series only once applied, so
/// concurrent writes may pass the limit by the new series each of them brings.
pub fn validate_against<'a>(
    mut lines: Vec<(&'a [u8], ParsedLine<'a>)>,
    precision: Precision,
    schemas: &mut BTreeMap<String, TableSchema>,
    limits: &Limits,
    known: &dyn KnownSeries,
) -> ValidatedWrite<'a> {
    let mut out = ValidatedWrite::default();
    let (mut tables, table_of) = tables_of(&lines, known);
    out.col_at = vec![0; lines.len()];
    // Each accepted line's keys take a place in `cols`: sized once for all of them,
    // as the body's lines mostly have as many keys as its first.
    let keys_per_line = lines
        .first()
        .map_or(0, |(_, l)| l.tags.len() + l.fields.len());
    out.cols.reserve(lines.len() * keys_per_line);
    let mut table_count = schemas.len();
    for index in 0..lines.len() {
        let (before, rest) = lines.split_at_mut(index);
        let (raw, line) = &mut rest[0];
        let raw: &[u8] = raw;
        if let Some(e) = over_limit(raw, line, limits) {
            out.rejected.push(e);
            continue;
        }
        let work = &mut tables[table_of[index] as usize];
        let table = work.name.as_str();
        // A table's schema is taken out of `schemas` at its first line (and put back
        // at the end), so a line finds its table without a lookup by name.
        let schema = match &mut work.schema {
            Some(schema) => schema,
            None => match schemas.remove(table) {
                Some(schema) => work.schema.insert(schema),
                None if table_count >= limits.max_tables => {
                    let message = format!(
                        "table {table} is not created: the database has {table_count} tables, the most allowed ({} with --max-tables)",
                        limits.max_tables
                    );
                    out.rejected.push(at(raw, line, 1, message));
                    continue;
                }
                None => {
                    table_count += 1;
                    work.schema.insert(TableSchema::default())
                }
            },
        };
        let start = out.cols.len();
        out.col_at[index] = start as u32;
        let mut new_columns: Vec<(&str, ColumnKind)> = Vec::new();
        let mut error = None;
        match work.memo {
            // The table's last accepted line had the same keys of the same kinds:
            // their columns exist and are where they were.
            Some(m) if same_shape(&before[m].1, line) => {
                let from = out.col_at[m] as usize;
                let n = line.tags.len() + line.fields.len();
                out.cols.extend_from_within(from..from + n);
            }
            _ => {
                let wanted = line
                    .tags
                    .iter()
                    .map(|(k, _)| (k.as_ref(), ColumnKind::Tag))
                    .chain(
                        line.fields
                            .iter()
                            .map(|(k, v)| (k.as_ref(), ColumnKind::Field(field_type(v)))),
                    );
                for (name, kind) in wanted {
                    match schema.position(name) {
                        Some((i, existing)) if existing == kind => out.cols.push(i as u32),
                        Some((_, existing)) => {
                            error = Some(conflict(raw, line, table, name, existing, kind));
                            break;
                        }
                        None => {
                            // A field written twice in one line with two types: the last one counts.
                            new_columns.retain(|(n, _)| *n != name);
                            new_columns.push((name, kind));
                            out.cols.push(u32::MAX);
                        }
                    }
                }
            }
        }
        if error.is_none() {
            if let Some(ts) = line.timestamp {
                match ts.checked_mul(precision.nanos_for(ts)) {
                    Some(ns) => line.timestamp = Some(ns),
                    None => {
                        error = Some(at(
                            raw,
                            line,
                            1,
                            format!("timestamp {ts} is out of range for precision"),
                        ))
                    }
                }
            }
        }
        if error.is_none() && schema.columns().len() + new_columns.len() > limits.max_columns {
            let first = new_columns.first().map(|c| c.0).unwrap_or_default();
            error = Some(at(
                raw,
                line,
                column_of(raw, first),
                format!(
                    "table {table} would have {} columns, more than the limit of {} (--max-columns)",
                    schema.columns().len() + new_columns.len(),
                    limits.max_columns
                ),
            ));
        }
        if error.is_none() && !work.gate.admit(known, line, limits.max_series) {
            error = Some(at(
                raw,
                line,
                1,
                format!(
                    "table {table} has {} series, the most allowed ({} with --max-series-per-table): this line's tags make a new one",
                    work.gate.known + work.gate.new.len(),
                    limits.max_series
                ),
            ));
        }
        if error.is_none() && !new_columns.is_empty() {
            for (name, kind) in new_columns {
                if let Err(msg) = schema.add_column(name, kind) {
                    error = Some(at(
                        raw,
                        line,
                        column_of(raw, name),
                        format!("{msg} (table {table})"),
                    ));
                    break;
                }
            }
            if error.is_none() {
                // The new columns' places, now that they have them.
                let keys = line
                    .tags
                    .iter()
                    .map(|(k, _)| k.as_ref())
                    .chain(line.fields.iter().map(|(k, _)| k.as_ref()));
                for (c, name) in out.cols[start..].iter_mut().zip(keys) {
                    if *c == u32::MAX {
                        *c = schema.position(name).map_or(u32::MAX, |(i, _)| i as u32);
                    }
                }
            }
        }
        match error {
            Some(e) => {
                out.cols.truncate(start);
                out.rejected.push(e);
            }
            None => {
                work.accepted.push(index);
                work.memo = Some(index);
            }
        }
    }
    out.lines = lines;
    for work in tables {
        let Some(schema) = work.schema else { continue };
        if !work.accepted.is_empty() {
            out.tables
                .insert(work.name.clone(), (schema.clone(), work.accepted));
        }
        schemas.insert(work.name, schema);
    }
    // A table whose every line was rejected is not created.
    schemas.retain(|name, s| s.columns().len() > 1 || out.tables.contains_key(name));
    out.rejected.sort_by_key(|e| e.line);
    out
}

/// One table of a write while it is validated.
struct TableWork {
    name: String,
    /// Its schema, taken out of the database's at the table's first line.
    schema: Option<TableSchema>,
    gate: SeriesGate,
    /// Indexes in the write's lines of its accepted lines, in body order.
    accepted: Vec<usize>,
    /// The table's last accepted line: the next one nearly always has the same keys.
    memo: Option<usize>,
}

/// The tables of a write in order of first appearance, and each line's table.
fn tables_of(lines: &[Line<'_>], known: &dyn KnownSeries) -> (Vec<TableWork>, Vec<u32>) {
    let mut tables: Vec<TableWork> = Vec::new();
    let mut by_name: FastMap<&str, u32> = FastMap::default();
    let mut table_of = Vec::with_capacity(lines.len());
    let mut last = u32::MAX;
    for (_, line) in lines {
        let name = line.measurement.as_ref();
        let t = if last != u32::MAX && tables[last as usize].name == name {
            last
        } else if let Some(&t) = by_name.get(name) {
            t
        } else {
            let t = tables.len() as u32;
            by_name.insert(name, t);
            tables.push(TableWork {
                name: name.to_string(),
                schema: None,
                gate: SeriesGate {
                    known: known.count(name),
                    lines: 0,
                    new: HashSet::new(),
                },
                accepted: Vec::new(),
                memo: None,
            });
            t
        };
        tables[t as usize].gate.lines += 1;
        table_of.push(t);
        last = t;
    }
    for t in &mut tables {
        t.accepted.reserve_exact(t.gate.lines);
    }
    (tables, table_of)
}

/// Whether two lines have the same tag keys and the same field keys of the same
/// types, in the same order.
fn same_shape(a: &ParsedLine<'_>, b: &ParsedLine<'_>) -> bool {
    a.tags.len() == b.tags.len()
        && a.fields.len() == b.fields.len()
        && a.tags.iter().zip(&b.tags).all(|((x, _), (y, _))| x == y)
        && a.fields
            .iter()
            .zip(&b.fields)
            .all(|((x, u), (y, v))| x == y && field_type(u) == field_type(v))
}

fn field_type(v: &FieldValue<'_>) -> FieldType {
    match v {
        FieldValue::Float(_) => FieldType::Float,
        FieldValue::Integer(_) => FieldType::Integer,
        FieldValue::UInteger(_) => FieldType::UInteger,
        FieldValue::Boolean(_) => FieldType::Boolean,
        FieldValue::String(_) => FieldType::String,
    }
}

fn conflict(
    raw: &[u8],
    line: &ParsedLine<'_>,
    table: &str,
    name: &str,
    existing: ColumnKind,
    got: ColumnKind,
) -> LineError {
    let message = match (existing, got) {
        (ColumnKind::Field(e), ColumnKind::Field(g)) => {
            format!(
                "field {name} is {} in table {table}, got {}",
                e.name(),
                g.name()
            )
        }
        (ColumnKind::Tag, ColumnKind::Field(g)) => {
            format!(
                "column {name} is a tag in table {table}, got a {} field",
                g.name()
            )
        }
        (ColumnKind::Field(e), ColumnKind::Tag) => {
            format!(
                "column {name} is a {} field in table {table}, got a tag",
                e.name()
            )
        }
        (e, g) => format!(
            "column {name} is {} in table {table}, got {}",
            e.describe(),
            g.describe()
        ),
    };
    at(raw, line, column_of(raw, name), message)
}

/// The 1-based character column where `name=` first appears after the measurement.
fn column_of(raw: &[u8], name: &str) -> usize {
    let text = String::from_utf8_lossy(raw);
    let needle = format!("{name}=");
    let byte = text
        .match_indices(&needle)
        .find(|(i, _)| *i > 0 && matches!(text.as_bytes()[i - 1], b',' | b' '))
        .map(|(i, _)| i)
        .unwrap_or(0);
    text[..byte].chars().count() + 1
}

pub(crate) fn at(raw: &[u8], line: &ParsedLine<'_>, column: usize, message: String) -> LineError {
    let mut text: String = String::from_utf8_lossy(raw).chars().take(200).collect();
    if raw.len() > text.len() {
        text.push_str("...");
    }
    LineError {
        line: line.line_number,
        column,
        message,
        text,
    }
}

/// Builds one Arrow batch per table from validated lines, with only the columns the
/// lines carry (`time` first, then schema order). A line without a timestamp gets
/// `now_ns`. When a field repeats within a line, the last value wins.
///
/// The lines are read once, in body order, each appended to its table's builders:
/// a body's parsed lines weigh megabytes, and reading them table by table (every
/// few hundred bytes, a line of another table skipped) stalled on memory for a
/// third of the building.
pub fn build_batches(
    write: &ValidatedWrite<'_>,
    now_ns: i64,
) -> Result<Vec<(String, RecordBatch)>, ArrowError> {
    const NONE: u32 = u32::MAX;
    let mut table_of = vec![NONE; write.lines.len()];
    let mut tables = Vec::with_capacity(write.tables.len());
    for (t, (table, (schema, rows))) in write.tables.iter().enumerate() {
        for &r in rows {
            table_of[r] = t as u32;
        }
        tables.push((table, TableBuilder::new(schema, write, rows)));
    }
    for (r, &t) in table_of.iter().enumerate() {
        if t != NONE {
            tables[t as usize].1.append(write, r, now_ns);
        }
    }
    tables
        .into_iter()
        .map(|(table, b)| Ok((table.clone(), b.finish()?)))
        .collect()
}

enum Builder {
    Tag(StringBuilder),
    Float(Float64Builder),
    Integer(Int64Builder),
    UInteger(UInt64Builder),
    Boolean(BooleanBuilder),
    String(StringBuilder),
}

impl Builder {
    fn new(kind: ColumnKind, rows: usize) -> Self {
        match kind {
            ColumnKind::Tag | ColumnKind::Time => {
                Self::Tag(StringBuilder::with_capacity(rows, rows * 8))
            }
            ColumnKind::Field(FieldType::Float) => Self::Float(Float64Builder::with_capacity(rows)),
            ColumnKind::Field(FieldType::Integer) => {
                Self::Integer(Int64Builder::with_capacity(rows))
            }
            ColumnKind::Field(FieldType::UInteger) => {
                Self::UInteger(UInt64Builder::with_capacity(rows))
            }
            ColumnKind::Field(FieldType::Boolean) => {
                Self::Boolean(BooleanBuilder::with_capacity(rows))
            }
            ColumnKind::Field(FieldType::String) => {
                Self::String(StringBuilder::with_capacity(rows, rows * 8))
            }
        }
    }

    fn append_null(&mut self) {
        match self {
            Self::Tag(b) | Self::String(b) => b.append_null(),
            Self::Float(b) => b.append_null(),
            Self::Integer(b) => b.append_null(),
            Self::UInteger(b) => b.append_null(),
            Self::Boolean(b) => b.append_null(),
        }
    }

    fn append_field(&mut self, v: &FieldValue<'_>) {
        match (self, v) {
            (Self::Float(b), FieldValue::Float(x)) => b.append_value(*x),
            (Self::Integer(b), FieldValue::Integer(x)) => b.append_value(*x),
            (Self::UInteger(b), FieldValue::UInteger(x)) => b.append_value(*x),
            (Self::Boolean(b), FieldValue::Boolean(x)) => b.append_value(*x),
            (Self::String(b), FieldValue::String(x)) => b.append_value(x),
            // Validation guarantees types match; a mismatch would be a bug, stored as null.
            (b, _) => b.append_null(),
        }
    }

    fn finish(self) -> ArrayRef {
        match self {
            Self::Tag(mut b) | Self::String(mut b) => Arc::new(b.finish()),
            Self::Float(mut b) => Arc::new(b.finish()),
            Self::Integer(mut b) => Arc::new(b.finish()),
            Self::UInteger(mut b) => Arc::new(b.finish()),
            Self::Boolean(mut b) => Arc::new(b.finish()),
        }
    }
}

/// One table's batch while its lines are appended.
struct TableBuilder<'s> {
    /// The builder of each schema column the lines carry (by schema column), or
    /// `UNUSED`.
    slot_of: Vec<usize>,
    /// The columns built, in schema order.
    defs: Vec<&'s ColumnDef>,
    builders: Vec<Builder>,
    /// Which builders the line being appended has filled.
    filled: Vec<bool>,
    times: Vec<i64>,
}

/// No builder: the table's lines do not carry the column.
const UNUSED: usize = usize::MAX;

impl<'s> TableBuilder<'s> {
    /// Builders for the columns that `rows` (the table's accepted lines) carry.
    fn new(schema: &'s TableSchema, write: &ValidatedWrite<'_>, rows: &[usize]) -> Self {
        let mut slot_of = vec![UNUSED; schema.columns().len()];
        for &r in rows {
            for &c in write.columns_of(r) {
                if let Some(s) = slot_of.get_mut(c as usize) {
                    *s = 0;
                }
            }
        }
        let mut defs: Vec<&ColumnDef> = Vec::new();
        for (c, def) in schema.columns().iter().enumerate() {
            if slot_of[c] != UNUSED && def.kind != ColumnKind::Time {
                slot_of[c] = defs.len();
                defs.push(def);
            } else {
                slot_of[c] = UNUSED;
            }
        }
        let builders = defs
            .iter()
            .map(|c| Builder::new(c.kind, rows.len()))
            .collect();
        Self {
            slot_of,
            filled: vec![false; defs.len()],
            defs,
            builders,
            times: Vec::with_capacity(rows.len()),
        }
    }

    /// Appends accepted line `r` of `write`.
    fn append(&mut self, write: &ValidatedWrite<'_>, r: usize, now_ns: i64) {
        let line = &write.lines[r].1;
        let cols = write.columns_of(r);
        let (tag_cols, field_cols) = cols.split_at(line.tags.len());
        self.times.push(line.timestamp.unwrap_or(now_ns));
        self.filled.iter_mut().for_each(|f| *f = false);
        for ((_, v), &c) in line.tags.iter().zip(tag_cols) {
            let i = self.slot_of.get(c as usize).copied().unwrap_or(UNUSED);
            if let Some(Builder::Tag(b)) = self.builders.get_mut(i) {
                b.append_value(v);
                self.filled[i] = true;
            }
        }
        // Last value of a repeated field wins: walk backwards, skip filled columns.
        for ((_, v), &c) in line.fields.iter().zip(field_cols).rev() {
            let i = self.slot_of.get(c as usize).copied().unwrap_or(UNUSED);
            if i != UNUSED && !self.filled[i] {
                self.builders[i].append_field(v);
                self.filled[i] = true;
            }
        }
        for (b, filled) in self.builders.iter_mut().zip(&self.filled) {
            if !filled {
                b.append_null();
            }
        }
    }

    fn finish(self) -> Result<RecordBatch, ArrowError> {
        let time_def = ColumnDef {
            name: TIME_COLUMN.to_string(),
            kind: ColumnKind::Time,
        };
        let mut fields = vec![arrow_field(&time_def)];
        fields.extend(self.defs.iter().map(|c| arrow_field(c)));
        let mut columns: Vec<ArrayRef> = vec![Arc::new(
            TimestampNanosecondArray::from(self.times).with_timezone("UTC"),
        )];
        columns.extend(self.builders.into_iter().map(Builder::finish));
        RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)
    }
}

mod direct;
pub use direct::{build_direct, DirectWrite, KnownTable};

#[cfg(test)]
mod fuzz;

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::util::pretty::pretty_format_batches;

    #[test]
    fn a_spare_list_keeps_its_allocation_and_parses_like_a_new_one() {
        let body = "m,d=a f=1 1\nbad line\nm,d=b f=2 2\n";
        let first = parse_body(body.as_bytes());
        let (ptr, cap) = (first.lines.as_ptr() as usize, first.lines.capacity());
        assert!(cap >= 2);
        let spare = relabel(first.lines);
        assert_eq!((spare.as_ptr() as usize, spare.capacity()), (ptr, cap));
        // Another body (its own lifetime) fills the same allocation.
        let other = String::from(body);
        let again = parse_body_into(other.as_bytes(), spare);
        assert_eq!(again.lines.as_ptr() as usize, ptr);
        let fresh = parse_body(body.as_bytes());
        assert_eq!(format!("{:?}", again.lines), format!("{:?}", fresh.lines));
        assert_eq!(again.rejected.len(), 1);
        assert_eq!(again.data_lines, 3);
    }

    fn run(body: &str, schemas: &mut BTreeMap<String, TableSchema>) -> (String, Vec<LineError>) {
        let parsed = parse_body(body.as_bytes());
        let mut rejected = parsed.rejected;
        let v = validate(parsed.lines, Precision::Second, schemas);
        rejected.extend(v.rejected.iter().cloned());
        rejected.sort_by_key(|e| e.line);
        let batches = build_batches(&v, 42_000_000_000).unwrap();
        let text = batches
            .iter()
            .map(|(t, b)| {
                format!(
                    "{t}\n{}",
                    pretty_format_batches(std::slice::from_ref(b)).unwrap()
                )
            })
            .collect::<Vec<_>>()
            .join("\n");
        (text, rejected)
    }

    #[test]
    fn interleaved_tables_keep_their_lines_in_body_order() {
        let mut schemas = BTreeMap::new();
        let body = "a,d=x v=1 1\nb w=1i 2\na,d=y v=2 3\nb,e=z w=2i 4\na,d=x v=3,u=true 5";
        let (text, rejected) = run(body, &mut schemas);
        assert!(rejected.is_empty(), "{rejected:?}");
        let expected = [
            "a",
            "+----------------------+---+-----+------+",
            "| time                 | d | v   | u    |",
            "+----------------------+---+-----+------+",
            "| 1970-01-01T00:00:01Z | x | 1.0 |      |",
            "| 1970-01-01T00:00:03Z | y | 2.0 |      |",
            "| 1970-01-01T00:00:05Z | x | 3.0 | true |",
            "+----------------------+---+-----+------+",
            "b",
            "+----------------------+---+---+",
            "| time                 | w | e |",
            "+----------------------+---+---+",
            "| 1970-01-01T00:00:02Z | 1 |   |",
            "| 1970-01-01T00:00:04Z | 2 | z |",
            "+----------------------+---+---+",
        ]
        .join("\n");
        assert_eq!(text, expected);
    }

    /// Series known to a fake registry: `manhole` has devices a and b.
    struct TwoCovers;

    impl KnownSeries for TwoCovers {
        fn count(&self, table: &str) -> usize {
            if table == "manhole" {
                2
            } else {
                0
            }
        }
        fn knows(&self, table: &str, tags: &[(&str, &str)]) -> bool {
            table == "manhole" && matches!(tags, [("device", "a" | "b")])
        }
    }

    #[test]
    fn the_series_limit_counts_known_and_new_series_once() {
        let limits = Limits {
            max_series: 3,
            ..Limits::default()
        };
        let body = "manhole,device=c v=1 1\nmanhole,device=a v=1 1\nmanhole,device=d v=1 1\nmanhole,device=c v=2 2\nmanhole,district=x,device=b v=1 1\ngauge,device=d v=1 1";
        let parsed = parse_body(body.as_bytes());
        let mut schemas = BTreeMap::new();
        let v = validate_against(
            parsed.lines,
            Precision::Second,
            &mut schemas,
            &limits,
            &TwoCovers,
        );
        let rejected: Vec<(usize, &str)> = v
            .rejected
            .iter()
            .map(|e| (e.line, e.message.as_str()))
            .collect();
        let why = "table manhole has 3 series, the most allowed (3 with --max-series-per-table): this line's tags make a new one";
        assert_eq!(rejected, [(3, why), (5, why)]);
        assert_eq!(v.tables["manhole"].1.len(), 3);
        assert_eq!(v.tables["gauge"].1.len(), 1);
        // Without a registry, one write alone is held to the limit.
        let many: String = (0..5)
            .map(|i| format!("gauge,device=g{i} v=1 1\n"))
            .collect();
        let parsed = parse_body(many.as_bytes());
        let v = validate_against(
            parsed.lines,
            Precision::Second,
            &mut BTreeMap::new(),
            &limits,
            &NoSeries,
        );
        assert_eq!(
            v.rejected.iter().map(|e| e.line).collect::<Vec<_>>(),
            [4, 5]
        );
    }

    #[test]
    fn lines_become_per_table_batches_in_schema_order() {
        let mut schemas = BTreeMap::new();
        let body = "# covers\nmanhole,device=mh-1,district=金水区 tilt_deg=0.5,battery=90i 1\n\nparking,device=pk-1 occupied=t 2\nmanhole,device=mh-2 tilt_deg=1.5,tilt_deg=2.5\n";
        let (text, rejected) = run(body, &mut schemas);
        assert!(rejected.is_empty(), "{rejected:?}");
        let expected = "manhole
+----------------------+--------+----------+----------+---------+
| time                 | device | district | tilt_deg | battery |
+----------------------+--------+----------+----------+---------+
| 1970-01-01T00:00:01Z | mh-1   | 金水区   | 0.5      | 90      |
| 1970-01-01T00:00:42Z | mh-2   |          | 2.5      |         |
+----------------------+--------+----------+----------+---------+
parking
+----------------------+--------+----------+
| time                 | device | occupied |
+----------------------+--------+----------+
| 1970-01-01T00:00:02Z | pk-1   | true     |
+----------------------+--------+----------+";
        assert_eq!(text, expected);
        let m = &schemas["manhole"];
        assert_eq!(
            m.kind("tilt_deg"),
            Some(ColumnKind::Field(FieldType::Float))
        );
    }

    #[test]
    fn conflicts_reject_only_their_line_and_name_the_field() {
        let mut schemas = BTreeMap::new();
        let body = "manhole,device=a tilt_deg=1\nmanhole,device=a tilt_deg=\"x\"\nmanhole,device=b tilt_deg=2i\nmanhole tilt_deg=3,device=1\nmanhole,tilt_deg=x v=1\nmanhole,device=c tilt_deg=4 9223372036854775807";
        let (_, rejected) = run(body, &mut schemas);
        let got: Vec<(usize, usize, &str)> = rejected
            .iter()
            .map(|e| (e.line, e.column, e.message.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![
                (
                    2,
                    18,
                    "field tilt_deg is float in table manhole, got string"
                ),
                (
                    3,
                    18,
                    "field tilt_deg is float in table manhole, got integer"
                ),
                (
                    4,
                    20,
                    "column device is a tag in table manhole, got a float field"
                ),
                (
                    5,
                    9,
                    "column tilt_deg is a float field in table manhole, got a tag"
                ),
                (
                    6,
                    1,
                    "timestamp 9223372036854775807 is out of range for precision"
                ),
            ]
        );
        assert_eq!(rejected[0].text, "manhole,device=a tilt_deg=\"x\"");
    }

    /// A line of the same keys as its table's last accepted line takes that line's
    /// columns; one whose keys differ in order, type or set does not, and tables
    /// interleaved line by line each keep their own.
    #[test]
    fn lines_of_a_repeated_shape_find_their_columns() {
        let mut schemas = BTreeMap::new();
        let body = "m,d=a,e=x f=1,g=2i 1\n\
                    n,d=z v=t 1\n\
                    m,d=b,e=y f=2,g=3i 2\n\
                    m,e=w,d=c g=4i,f=3 3\n\
                    n,d=z v=f 2\n\
                    m,d=d,e=v f=4i,g=5i 4\n\
                    m,d=e,e=u f=5,g=6i,h=\"s\" 5\n\
                    m,d=f,e=t f=6,g=7i 6\n";
        let (text, rejected) = run(body, &mut schemas);
        let got: Vec<(usize, &str)> = rejected
            .iter()
            .map(|e| (e.line, e.message.as_str()))
            .collect();
        assert_eq!(got, vec![(6, "field f is float in table m, got integer")]);
        let expected = "m
+----------------------+---+---+-----+---+---+
| time                 | d | e | f   | g | h |
+----------------------+---+---+-----+---+---+
| 1970-01-01T00:00:01Z | a | x | 1.0 | 2 |   |
| 1970-01-01T00:00:02Z | b | y | 2.0 | 3 |   |
| 1970-01-01T00:00:03Z | c | w | 3.0 | 4 |   |
| 1970-01-01T00:00:05Z | e | u | 5.0 | 6 | s |
| 1970-01-01T00:00:06Z | f | t | 6.0 | 7 |   |
+----------------------+---+---+-----+---+---+
n
+----------------------+---+-------+
| time                 | d | v     |
+----------------------+---+-------+
| 1970-01-01T00:00:01Z | z | true  |
| 1970-01-01T00:00:02Z | z | false |
+----------------------+---+-------+";
        assert_eq!(text, expected);
    }

    #[test]
    fn a_table_whose_lines_all_fail_is_not_created() {
        let mut schemas = BTreeMap::new();
        let (text, rejected) = run("parking occupied=t 9223372036854775807\n", &mut schemas);
        assert_eq!(rejected.len(), 1);
        assert_eq!(text, "");
        assert!(schemas.is_empty(), "{schemas:?}");
    }

    #[test]
    fn auto_precision_reads_magnitudes() {
        let p = Precision::parse_v3("auto").unwrap();
        assert_eq!(p.nanos_for(1_764_547_200), 1_000_000_000);
        assert_eq!(p.nanos_for(1_764_547_200_000), 1_000_000);
        assert_eq!(p.nanos_for(1_764_547_200_000_000), 1_000);
        assert_eq!(p.nanos_for(1_764_547_200_000_000_000), 1);
        assert_eq!(
            Precision::parse_v3("millisecond"),
            Some(Precision::Millisecond)
        );
        assert_eq!(Precision::parse_v3("ms"), Some(Precision::Millisecond));
        assert_eq!(Precision::parse_v3("fortnight"), None);
    }

    #[test]
    fn precision_names() {
        assert_eq!(Precision::parse("ms"), Some(Precision::Millisecond));
        assert_eq!(Precision::parse("n"), Some(Precision::Nanosecond));
        assert_eq!(Precision::parse("h"), None);
    }
}
