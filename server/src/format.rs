//! Query answers as JSON, JSON lines, CSV and an aligned text table.
//!
//! Timestamps are RFC 3339 in UTC with a `Z` and only as many fraction digits as
//! needed; NULL is `null` in JSON and empty in CSV and tables; floats print in their
//! shortest exact form.

use std::fmt::Write as _;
use std::io::Write as _;

use chrono::NaiveDate;
use citytsdb_storage::units::Rfc3339Printer;
use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, Date32Array, Float64Array, GenericStringArray,
    Int64Array, LargeStringArray, OffsetSizeTrait, StringArray, StringViewArray, UInt64Array,
};
use datafusion::arrow::buffer::NullBuffer;
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{
    DataType, SchemaRef, TimeUnit, TimestampMicrosecondType, TimestampMillisecondType,
    TimestampNanosecondType, TimestampSecondType,
};
use datafusion::arrow::error::ArrowError;
use datafusion::arrow::ipc::writer::StreamWriter;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};
use datafusion::parquet::arrow::ArrowWriter;
use datafusion::parquet::basic::{Compression, ZstdLevel};
use datafusion::parquet::errors::ParquetError;
use datafusion::parquet::file::properties::WriterProperties;
use unicode_width::UnicodeWidthStr;

/// An output format of the query API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// An array of row objects.
    Json,
    /// One row object per line.
    JsonLines,
    /// A header line, then rows.
    Csv,
    /// An aligned text table.
    Pretty,
    /// An Arrow IPC stream.
    Arrow,
    /// A Parquet file.
    Parquet,
}

impl Format {
    /// Parses the `format` parameter.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "json" => Self::Json,
            "jsonl" => Self::JsonLines,
            "csv" => Self::Csv,
            "pretty" => Self::Pretty,
            "arrow" => Self::Arrow,
            "parquet" => Self::Parquet,
            _ => return None,
        })
    }

    /// The `Content-Type` of an answer in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Json => "application/json",
            Self::JsonLines => "application/jsonl",
            Self::Csv => "text/csv; charset=utf-8",
            Self::Pretty => "text/plain; charset=utf-8",
            Self::Arrow => "application/vnd.apache.arrow.stream",
            Self::Parquet => "application/vnd.apache.parquet",
        }
    }
}

/// The most a batch's text reserves ahead on a guess from its first row.
const RESERVE_CAP: usize = 8 << 20;

/// How a cell is printed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Style {
    /// A JSON value: text and times quoted and escaped, NULL as `null`.
    Json,
    /// A CSV field: quoted when it holds a comma, a quote or a line break; NULL
    /// empty.
    Csv,
    /// Bare text, for the aligned table; NULL empty.
    Bare,
}

/// Writes an answer in one format batch by batch, so a long answer streams out
/// without being held whole. Only `pretty`, whose column widths depend on every
/// row, keeps its rows until [`Encoder::finish`].
pub struct Encoder {
    format: Format,
    names: Vec<String>,
    /// Each column's `"name":`, escaped once, after the `{` or `,` before it.
    json_keys: Vec<Vec<u8>>,
    rows_written: usize,
    /// Bytes the Arrow and Parquet writers have produced and not yet handed out.
    sink: SharedBuf,
    arrow: Option<StreamWriter<SharedBuf>>,
    parquet: Option<ArrowWriter<SharedBuf>>,
    pretty_rows: Vec<Vec<String>>,
}

/// A byte buffer two owners share: the Arrow and Parquet writers write to it and
/// the encoder drains it after every batch.
#[derive(Clone, Default)]
struct SharedBuf(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl SharedBuf {
    fn take(&self) -> Vec<u8> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl std::io::Write for SharedBuf {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn parquet_error(e: ParquetError) -> ArrowError {
    ArrowError::ExternalError(Box::new(e))
}

impl Encoder {
    /// Starts an answer of `schema`; returns the encoder and the answer's first bytes.
    pub fn new(format: Format, schema: &SchemaRef) -> Result<(Self, Vec<u8>), ArrowError> {
        let names: Vec<String> = schema.fields().iter().map(|f| f.name().clone()).collect();
        let sink = SharedBuf::default();
        let json_keys = names
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let mut key = vec![if i == 0 { b'{' } else { b',' }];
                push_json_string(&mut key, n);
                key.push(b':');
                key
            })
            .collect();
        let mut enc = Self {
            format,
            names,
            json_keys,
            rows_written: 0,
            sink: sink.clone(),
            arrow: None,
            parquet: None,
            pretty_rows: Vec::new(),
        };
        let head = match format {
            Format::Json => b"[".to_vec(),
            Format::JsonLines | Format::Pretty => Vec::new(),
            Format::Csv => {
                let mut header = Vec::new();
                for (i, n) in enc.names.iter().enumerate() {
                    if i > 0 {
                        header.push(b',');
                    }
                    push_csv_field(&mut header, n);
                }
                header.push(b'\n');
                header
            }
            Format::Arrow => {
                enc.arrow = Some(StreamWriter::try_new(sink, schema)?);
                enc.sink.take()
            }
            Format::Parquet => {
                let props = WriterProperties::builder()
                    .set_compression(Compression::ZSTD(ZstdLevel::default()))
                    .build();
                enc.parquet = Some(
                    ArrowWriter::try_new(sink, schema.clone(), Some(props))
                        .map_err(parquet_error)?,
                );
                enc.sink.take()
            }
        };
        Ok((enc, head))
    }

    /// For the formats that print row by row (JSON, JSON lines, CSV): an encoder
    /// for rows `rows` further on in the same answer, to print them on another
    /// thread while this one prints those before (then [`Encoder::skip`] them
    /// here). `None` for the formats whose writers carry state from row to row.
    pub fn ahead(&self, rows: usize) -> Option<Encoder> {
        self.prints_by_row().then(|| Encoder {
            format: self.format,
            names: self.names.clone(),
            json_keys: self.json_keys.clone(),
            rows_written: self.rows_written + rows,
            sink: SharedBuf::default(),
            arrow: None,
            parquet: None,
            pretty_rows: Vec::new(),
        })
    }

    /// Whether rows print one by one with no state carried between them (JSON,
    /// JSON lines, CSV), so that [`Encoder::ahead`] can print some elsewhere.
    pub fn prints_by_row(&self) -> bool {
        matches!(self.format, Format::Json | Format::JsonLines | Format::Csv)
    }

    /// Counts `rows` printed by encoders from [`Encoder::ahead`].
    pub fn skip(&mut self, rows: usize) {
        self.rows_written += rows;
    }

    /// The bytes of one more batch of rows.
    pub fn batch(&mut self, batch: &RecordBatch) -> Result<Vec<u8>, ArrowError> {
        if let Some(w) = &mut self.arrow {
            w.write(batch)?;
            return Ok(self.sink.take());
        }
        if let Some(w) = &mut self.parquet {
            w.write(batch).map_err(parquet_error)?;
            return Ok(self.sink.take());
        }
        let rows = batch.num_rows();
        let arrays = batch
            .columns()
            .iter()
            .map(normalize)
            .collect::<Result<Vec<_>, _>>()?;
        let style = match self.format {
            Format::Json | Format::JsonLines => Style::Json,
            Format::Csv => Style::Csv,
            _ => Style::Bare,
        };
        let options = FormatOptions::default();
        let mut columns = arrays
            .iter()
            .map(|a| Cells::new(a, style, &options))
            .collect::<Result<Vec<_>, _>>()?;
        let mut out = Vec::new();
        let mut scratch = String::new();
        for row in 0..rows {
            match self.format {
                Format::Json | Format::JsonLines => {
                    if self.format == Format::Json && self.rows_written > 0 {
                        out.push(b',');
                    }
                    for (key, column) in self.json_keys.iter().zip(&mut columns) {
                        out.extend_from_slice(key);
                        column.write(row, style, &mut out, &mut scratch);
                    }
                    out.push(b'}');
                    if self.format == Format::JsonLines {
                        out.push(b'\n');
                    }
                }
                Format::Csv => {
                    for (i, column) in columns.iter_mut().enumerate() {
                        if i > 0 {
                            out.push(b',');
                        }
                        column.write(row, style, &mut out, &mut scratch);
                    }
                    out.push(b'\n');
                }
                _ => {
                    let cells = columns
                        .iter_mut()
                        .map(|column| {
                            let mut cell = Vec::new();
                            column.write(row, style, &mut cell, &mut scratch);
                            String::from_utf8_lossy(&cell).replace('\n', "\\n")
                        })
                        .collect();
                    self.pretty_rows.push(cells);
                }
            }
            self.rows_written += 1;
            if row == 0 {
                // Rows of one answer mostly print to about the same length: one
                // allocation for the batch, not a doubling series of copies. At
                // most RESERVE_CAP on a guess, so that one long first row (a
                // large text value) does not ask for that much per row.
                let guess = out.len().saturating_mul(rows.saturating_sub(1)) / 8 * 9;
                out.reserve(guess.min(RESERVE_CAP));
            }
        }
        Ok(out)
    }

    /// The answer's last bytes.
    pub fn finish(mut self) -> Result<Vec<u8>, ArrowError> {
        if let Some(mut w) = self.arrow.take() {
            w.finish()?;
            drop(w);
            return Ok(self.sink.take());
        }
        if let Some(w) = self.parquet.take() {
            w.close().map_err(parquet_error)?;
            return Ok(self.sink.take());
        }
        Ok(match self.format {
            Format::Json => b"]".to_vec(),
            Format::Pretty => {
                let mut out = String::new();
                let names: Vec<&str> = self.names.iter().map(String::as_str).collect();
                pretty_table(&mut out, &names, &self.pretty_rows);
                out.into_bytes()
            }
            _ => Vec::new(),
        })
    }
}

/// Renders a whole answer in `format`.
pub fn render(
    format: Format,
    schema: &SchemaRef,
    batches: &[RecordBatch],
) -> Result<Vec<u8>, ArrowError> {
    let (mut enc, mut out) = Encoder::new(format, schema)?;
    for b in batches {
        out.extend(enc.batch(b)?);
    }
    out.extend(enc.finish()?);
    Ok(out)
}

/// Dictionary columns print as their values; integers and floats are widened
/// to 64 bits, so one printer serves each family.
fn normalize(c: &ArrayRef) -> Result<ArrayRef, ArrowError> {
    match c.data_type() {
        DataType::Dictionary(_, value) => normalize(&cast(c, value)?),
        DataType::Int8 | DataType::Int16 | DataType::Int32 => cast(c, &DataType::Int64),
        DataType::UInt8 | DataType::UInt16 | DataType::UInt32 => cast(c, &DataType::UInt64),
        DataType::Float32 => cast(c, &DataType::Float64),
        _ => Ok(c.clone()),
    }
}

/// A text column.
enum Text<'a> {
    Utf8(&'a StringArray),
    Large(&'a LargeStringArray),
    View(&'a StringViewArray),
}

/// One column of a batch, looked at once and then printed a cell at a time, row
/// by row, straight into the answer.
enum Cells<'a> {
    Null,
    Bool(&'a BooleanArray),
    Int(&'a Int64Array),
    UInt(&'a UInt64Array),
    Float(&'a Float64Array),
    Text {
        array: Text<'a>,
        /// No value of the column needs quoting or escaping in the style: each
        /// is copied as it is.
        clean: bool,
    },
    Time {
        values: &'a [i64],
        nulls: Option<&'a NullBuffer>,
        nanos_per: i64,
        printer: Rfc3339Printer,
    },
    Date(&'a Date32Array),
    /// Any other type, through arrow's display; `raw` ones are JSON numbers.
    Other {
        array: &'a dyn Array,
        display: ArrayFormatter<'a>,
        raw: bool,
    },
}

impl<'a> Cells<'a> {
    fn new(c: &'a ArrayRef, style: Style, options: &'a FormatOptions) -> Result<Self, ArrowError> {
        macro_rules! time {
            ($t:ty, $nanos_per:expr) => {{
                let a = c.as_primitive::<$t>();
                Cells::Time {
                    values: a.values(),
                    nulls: a.nulls(),
                    nanos_per: $nanos_per,
                    printer: Rfc3339Printer::default(),
                }
            }};
        }
        Ok(match c.data_type() {
            DataType::Null => Cells::Null,
            DataType::Boolean => Cells::Bool(c.as_boolean()),
            DataType::Int64 => Cells::Int(c.as_primitive()),
            DataType::UInt64 => Cells::UInt(c.as_primitive()),
            DataType::Float64 => Cells::Float(c.as_primitive()),
            DataType::Utf8 => Cells::Text {
                array: Text::Utf8(c.as_string()),
                clean: clean(used_bytes(c.as_string::<i32>()), style),
            },
            DataType::LargeUtf8 => Cells::Text {
                array: Text::Large(c.as_string()),
                clean: clean(used_bytes(c.as_string::<i64>()), style),
            },
            DataType::Utf8View => Cells::Text {
                array: Text::View(c.as_string_view()),
                clean: false,
            },
            DataType::Timestamp(TimeUnit::Second, _) => time!(TimestampSecondType, 1_000_000_000),
            DataType::Timestamp(TimeUnit::Millisecond, _) => {
                time!(TimestampMillisecondType, 1_000_000)
            }
            DataType::Timestamp(TimeUnit::Microsecond, _) => {
                time!(TimestampMicrosecondType, 1_000)
            }
            DataType::Timestamp(TimeUnit::Nanosecond, _) => time!(TimestampNanosecondType, 1),
            DataType::Date32 => Cells::Date(c.as_primitive()),
            data_type => Cells::Other {
                array: c.as_ref(),
                display: ArrayFormatter::try_new(c.as_ref(), options)?,
                raw: matches!(
                    data_type,
                    DataType::Decimal128(..) | DataType::Decimal256(..)
                ),
            },
        })
    }

    /// Appends the cell of `row` to `out`; `scratch` is room for text on its way.
    fn write(&mut self, row: usize, style: Style, out: &mut Vec<u8>, scratch: &mut String) {
        let null = |out: &mut Vec<u8>| {
            if style == Style::Json {
                out.extend_from_slice(b"null");
            }
        };
        match self {
            Cells::Null => null(out),
            Cells::Bool(a) if a.is_null(row) => null(out),
            Cells::Bool(a) => out.extend_from_slice(match a.value(row) {
                true => b"true",
                false => b"false",
            }),
            Cells::Int(a) if a.is_null(row) => null(out),
            Cells::Int(a) => {
                out.extend_from_slice(itoa::Buffer::new().format(a.value(row)).as_bytes())
            }
            Cells::UInt(a) if a.is_null(row) => null(out),
            Cells::UInt(a) => {
                out.extend_from_slice(itoa::Buffer::new().format(a.value(row)).as_bytes())
            }
            Cells::Float(a) => {
                let v = a.value(row);
                // NaN and the infinities have no JSON number: NULL.
                if a.is_null(row) || !v.is_finite() {
                    null(out)
                } else {
                    push_float(out, v)
                }
            }
            Cells::Text { array, clean } => {
                let value = match array {
                    Text::Utf8(a) => (!a.is_null(row)).then(|| a.value(row)),
                    Text::Large(a) => (!a.is_null(row)).then(|| a.value(row)),
                    Text::View(a) => (!a.is_null(row)).then(|| a.value(row)),
                };
                match (value, style, *clean) {
                    (None, ..) => null(out),
                    (Some(v), Style::Json, true) => {
                        out.push(b'"');
                        out.extend_from_slice(v.as_bytes());
                        out.push(b'"');
                    }
                    (Some(v), Style::Json, false) => push_json_string(out, v),
                    (Some(v), Style::Csv, false) => push_csv_field(out, v),
                    (Some(v), _, _) => out.extend_from_slice(v.as_bytes()),
                }
            }
            Cells::Time {
                values,
                nulls,
                nanos_per,
                printer,
            } => {
                if nulls.is_some_and(|n| n.is_null(row)) {
                    return null(out);
                }
                let nanos = match values[row].checked_mul(*nanos_per) {
                    Some(n) => n as i128,
                    None => values[row] as i128 * *nanos_per as i128,
                };
                quoted(out, style, |out| printer.write(out, nanos));
            }
            Cells::Date(a) if a.is_null(row) => null(out),
            Cells::Date(a) => {
                let days = a.value(row);
                quoted(out, style, |out| {
                    // 719,163 days lie between 0001-01-01 and 1970-01-01.
                    let _ = match days
                        .checked_add(719_163)
                        .and_then(NaiveDate::from_num_days_from_ce_opt)
                    {
                        Some(d) => write!(out, "{}", d.format("%Y-%m-%d")),
                        None => write!(out, "{days}"),
                    };
                })
            }
            Cells::Other { array, .. } if array.is_null(row) => null(out),
            Cells::Other { display, raw, .. } => {
                scratch.clear();
                let _ = write!(scratch, "{}", display.value(row));
                match style {
                    Style::Json if !*raw => push_json_string(out, scratch),
                    Style::Csv => push_csv_field(out, scratch),
                    _ => out.extend_from_slice(scratch.as_bytes()),
                }
            }
        }
    }
}

/// The bytes of every value of `a`, end to end.
fn used_bytes<O: OffsetSizeTrait>(a: &GenericStringArray<O>) -> &[u8] {
    let offsets = a.value_offsets();
    &a.value_data()[offsets[0].as_usize()..offsets[a.len()].as_usize()]
}

/// Whether `text` (a column's values, end to end) holds no byte that needs
/// quoting or escaping in `style`. Checked a block at a time with no early exit
/// inside a block, so the compiler tests many bytes per instruction.
fn clean(text: &[u8], style: Style) -> bool {
    fn none(text: &[u8], bad: impl Fn(u8) -> bool) -> bool {
        text.chunks(64)
            .all(|block| !block.iter().fold(false, |any, &b| any | bad(b)))
    }
    match style {
        Style::Json => none(text, |b| (b < 0x20) | (b == b'"') | (b == b'\\')),
        Style::Csv => none(text, |b| {
            (b == b',') | (b == b'"') | (b == b'\n') | (b == b'\r')
        }),
        Style::Bare => true,
    }
}

/// A finite float in its shortest form that reads back exactly, as serde_json
/// prints it (with the same printer, `zmij`), or more quickly for a value that is
/// a decimal of at most three places below 10^12, as sensors report them.
fn push_float(out: &mut Vec<u8>, v: f64) {
    if !push_short_decimal(out, v) {
        out.extend_from_slice(zmij::Buffer::new().format_finite(v).as_bytes());
    }
}

/// Prints `v` if it is the double nearest to a decimal `d` of at most three
/// places, 0 < |v| < 10^12. Then `d` (trailing zeros dropped, at least one place)
/// is the shortest decimal that reads back as `v`: any other decimal of at most
/// three places is 0.001 or more away, and the doubles there are less than 0.001
/// apart, so no other decimal that short reads back as `v`; and a decimal of more
/// places has more digits.
fn push_short_decimal(out: &mut Vec<u8>, v: f64) -> bool {
    let scaled = v.abs() * 1000.0;
    if v == 0.0 || scaled >= 1e15 {
        return false;
    }
    // Rounded to the nearest integer by hand (`f64::round` is a call into libm
    // on x86-64's baseline); the test below is what makes it right.
    let thousandths = (scaled + 0.5) as u64;
    // Both exact: below 2^53 the integer converts exactly, and the division
    // rounds once, to the double nearest the decimal.
    if thousandths as f64 / 1000.0 != v.abs() {
        return false;
    }
    if v < 0.0 {
        out.push(b'-');
    }
    out.extend_from_slice(itoa::Buffer::new().format(thousandths / 1000).as_bytes());
    let frac = (thousandths % 1000) as usize;
    let digits = [
        b'0' + (frac / 100) as u8,
        b'0' + (frac / 10 % 10) as u8,
        b'0' + (frac % 10) as u8,
    ];
    let places = match frac {
        f if f % 100 == 0 => 1,
        f if f % 10 == 0 => 2,
        _ => 3,
    };
    out.push(b'.');
    out.extend_from_slice(&digits[..places]);
    true
}

/// What `print` writes, in quotes for JSON. Times and dates need no escaping.
fn quoted(out: &mut Vec<u8>, style: Style, print: impl FnOnce(&mut Vec<u8>)) {
    if style == Style::Json {
        out.push(b'"');
        print(out);
        out.push(b'"');
    } else {
        print(out);
    }
}

fn push_json_string(out: &mut Vec<u8>, s: &str) {
    if clean(s.as_bytes(), Style::Json) {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        // serde_json's escaping never fails for a &str into a Vec.
        let _ = serde_json::to_writer(&mut *out, s);
    }
}

fn push_csv_field(out: &mut Vec<u8>, s: &str) {
    if clean(s.as_bytes(), Style::Csv) {
        out.extend_from_slice(s.as_bytes());
    } else {
        out.push(b'"');
        out.extend_from_slice(s.replace('"', "\"\"").as_bytes());
        out.push(b'"');
    }
}

fn pretty_table(out: &mut String, names: &[&str], rows: &[Vec<String>]) {
    // Display width, so Chinese district names line up in a terminal.
    let mut widths: Vec<usize> = names.iter().map(|n| n.width()).collect();
    for row in rows {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.width());
        }
    }
    let rule: String = widths
        .iter()
        .map(|w| format!("+{}", "-".repeat(w + 2)))
        .collect::<String>()
        + "+\n";
    let line = |out: &mut String, cells: &mut dyn Iterator<Item = &str>| {
        for (c, w) in cells.zip(&widths) {
            let pad = w - c.width();
            let _ = write!(out, "| {c}{} ", " ".repeat(pad));
        }
        out.push_str("|\n");
    };
    out.push_str(&rule);
    line(out, &mut names.iter().copied());
    out.push_str(&rule);
    for row in rows {
        line(out, &mut row.iter().map(String::as_str));
    }
    out.push_str(&rule);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_decimals_print_as_the_shortest_form_does() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut values = vec![
            0.001,
            0.01,
            0.1,
            0.5,
            1.0,
            99.0,
            100.0,
            -0.001,
            -98.5,
            0.36,
            1e11,
            999_999_999_999.999,
            999_999_999_999.99,
            1e12,
            123_456_789.125,
            0.0,
            -0.0,
            1e-7,
            0.0005,
            1e15,
            4503599627370497.0,
            f64::MIN_POSITIVE,
            f64::MAX,
            0.1 + 0.2,
            1.0 / 3.0,
        ];
        for _ in 0..200_000 {
            let r = next();
            // Decimals of 0 to 4 places across the magnitudes, and arbitrary doubles.
            let places = (r % 5) as i32;
            let digits = (r >> 8) % 10u64.pow((r >> 40) as u32 % 16);
            let sign = if r & 0x80 == 0 { 1.0 } else { -1.0 };
            values.push(sign * digits as f64 / 10f64.powi(places));
            values.push(f64::from_bits(next()));
        }
        let mut fast = 0;
        for v in values.into_iter().filter(|v| v.is_finite()) {
            let mut out = Vec::new();
            push_float(&mut out, v);
            let expected = zmij::Buffer::new().format_finite(v).to_string();
            assert_eq!(String::from_utf8(out).unwrap(), expected, "{v:e}");
            fast += push_short_decimal(&mut Vec::new(), v) as usize;
        }
        assert!(fast > 100_000, "{fast} values took the short way");
    }
    use datafusion::arrow::array::{
        Float64Array, Int64Array, StringArray, TimestampNanosecondArray,
    };
    use datafusion::arrow::datatypes::{Field, Schema};
    use std::sync::Arc;

    fn batch() -> (SchemaRef, RecordBatch) {
        let schema = Arc::new(Schema::new(vec![
            Field::new(
                "time",
                DataType::Timestamp(TimeUnit::Nanosecond, Some("UTC".into())),
                false,
            ),
            Field::new("district", DataType::Utf8, true),
            Field::new("tilt", DataType::Float64, true),
            Field::new("count(*)", DataType::Int64, false),
        ]));
        let b = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(
                    TimestampNanosecondArray::from(vec![
                        1_764_547_200_000_000_000,
                        1_764_547_200_500_000_000,
                    ])
                    .with_timezone("UTC"),
                ),
                Arc::new(StringArray::from(vec![Some("金水区"), Some("a,\"b\"")])),
                Arc::new(Float64Array::from(vec![Some(0.1), None])),
                Arc::new(Int64Array::from(vec![3, 4])),
            ],
        )
        .unwrap();
        (schema, b)
    }

    #[test]
    fn dates_print_whole_at_any_year() {
        use datafusion::arrow::array::Date32Array;
        let schema = Arc::new(Schema::new(vec![Field::new("d", DataType::Date32, true)]));
        let b = RecordBatch::try_new(
            schema.clone(),
            vec![Arc::new(Date32Array::from(vec![
                Some(20423),
                Some(3_000_000),
                None,
            ]))],
        )
        .unwrap();
        let csv = String::from_utf8(render(Format::Csv, &schema, &[b]).unwrap()).unwrap();
        assert_eq!(
            csv, "d\n2025-12-01\n+10183-09-21\n\n",
            "ISO 8601 expanded years past 9999"
        );
    }

    #[test]
    fn json_strings_escape_as_serde_json_does() {
        for s in [
            "",
            "金水区",
            "a\"b",
            "back\\slash",
            "line\nbreak",
            "\u{1}",
            "del\u{7f}",
        ] {
            let mut out = Vec::new();
            push_json_string(&mut out, s);
            assert_eq!(
                String::from_utf8(out).unwrap(),
                serde_json::to_string(s).unwrap()
            );
        }
    }

    #[test]
    fn every_column_type_prints_in_json() {
        use datafusion::arrow::array::{
            BooleanArray, Decimal128Array, DictionaryArray, Float32Array, ListArray, NullArray,
            StringViewArray, TimestampSecondArray, UInt8Array,
        };
        use datafusion::arrow::datatypes::Int32Type as I32;
        let dict: DictionaryArray<I32> = vec![Some("a"), None].into_iter().collect();
        let list =
            ListArray::from_iter_primitive::<I32, _, _>(vec![Some(vec![Some(1), Some(2)]), None]);
        let columns: Vec<(&str, ArrayRef)> = vec![
            ("b", Arc::new(BooleanArray::from(vec![Some(true), None]))),
            ("n", Arc::new(NullArray::new(2))),
            ("u", Arc::new(UInt8Array::from(vec![255, 0]))),
            ("f", Arc::new(Float32Array::from(vec![1.5, f32::NAN]))),
            ("d", Arc::new(dict)),
            ("v", Arc::new(StringViewArray::from(vec!["x\"y", "z"]))),
            (
                "s",
                Arc::new(TimestampSecondArray::from(vec![Some(86_400), None])),
            ),
            (
                "m",
                Arc::new(
                    Decimal128Array::from(vec![Some(12_345), None])
                        .with_precision_and_scale(10, 2)
                        .unwrap(),
                ),
            ),
            ("l", Arc::new(list)),
        ];
        let batch = RecordBatch::try_from_iter(columns).unwrap();
        let text = String::from_utf8(render(Format::JsonLines, &batch.schema(), &[batch]).unwrap())
            .unwrap();
        assert_eq!(
            text,
            concat!(
                r#"{"b":true,"n":null,"u":255,"f":1.5,"d":"a","v":"x\"y","s":"1970-01-02T00:00:00Z","m":123.45,"l":"[1, 2]"}"#,
                "\n",
                r#"{"b":null,"n":null,"u":0,"f":null,"d":null,"v":"z","s":null,"m":null,"l":null}"#,
                "\n"
            )
        );
    }

    #[test]
    fn text_columns_escape_wherever_a_value_needs_it() {
        // A slice of a column (its values start past offset 0) whose clean part
        // is printed as is and whose other values are escaped, over two batches.
        let values = vec![
            Some("a\"b"),
            Some("金水区"),
            None,
            Some("x,y"),
            Some("tab\there"),
            Some(""),
        ];
        let batch = RecordBatch::try_from_iter(vec![
            ("s", Arc::new(StringArray::from(values.clone())) as ArrayRef),
            ("n", Arc::new(Int64Array::from_iter(0..6)) as ArrayRef),
        ])
        .unwrap();
        let parts = [batch.slice(1, 2), batch.slice(3, 3)];
        let json = render(Format::Json, &batch.schema(), &parts).unwrap();
        let rows: Vec<serde_json::Value> = serde_json::from_slice(&json).unwrap();
        let expected: Vec<serde_json::Value> = values[1..]
            .iter()
            .zip(1..)
            .map(|(s, n)| serde_json::json!({"s": s, "n": n}))
            .collect();
        assert_eq!(rows, expected);
        // The clean slice alone: no value needed escaping, printed as is.
        let clean = render(Format::JsonLines, &batch.schema(), &[batch.slice(1, 2)]).unwrap();
        assert_eq!(
            String::from_utf8(clean).unwrap(),
            "{\"s\":\"金水区\",\"n\":1}\n{\"s\":null,\"n\":2}\n"
        );
        let csv = render(Format::Csv, &batch.schema(), &parts).unwrap();
        assert_eq!(
            String::from_utf8(csv).unwrap(),
            "s,n\n金水区,1\n,2\n\"x,y\",3\ntab\there,4\n,5\n"
        );
    }

    #[test]
    fn a_long_first_row_does_not_reserve_for_every_row() {
        // 4 MiB in the first row and 100,000 short rows: reserving the first
        // row's length for each would ask for ~400 GB.
        let mut values = vec!["x".repeat(4 << 20)];
        values.extend((0..100_000).map(|i| i.to_string()));
        let batch = RecordBatch::try_from_iter(vec![(
            "s",
            Arc::new(StringArray::from(values)) as ArrayRef,
        )])
        .unwrap();
        let out = render(Format::JsonLines, &batch.schema(), &[batch]).unwrap();
        assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), 100_001);
    }

    #[test]
    fn times_print_in_every_unit_and_past_nanosecond_range() {
        use datafusion::arrow::array::{TimestampMillisecondArray, TimestampSecondArray};
        let batch = RecordBatch::try_from_iter(vec![
            (
                "s",
                Arc::new(TimestampSecondArray::from(vec![
                    Some(-1),
                    Some(253_402_300_799),
                    None,
                ])) as ArrayRef,
            ),
            (
                "ms",
                Arc::new(TimestampMillisecondArray::from(vec![
                    Some(1_764_547_200_001),
                    Some(10_000_000_000_000),
                    // Past what chrono holds: the nanoseconds, as a number.
                    Some(i64::MIN),
                ])) as ArrayRef,
            ),
        ])
        .unwrap();
        let csv =
            String::from_utf8(render(Format::Csv, &batch.schema(), &[batch]).unwrap()).unwrap();
        assert_eq!(
            csv,
            "s,ms\n\
             1969-12-31T23:59:59Z,2025-12-01T00:00:00.001Z\n\
             9999-12-31T23:59:59Z,2286-11-20T17:46:40Z\n\
             ,-9223372036854775808000000\n"
        );
    }

    #[test]
    fn every_format() {
        let (s, b) = batch();
        let text = |f| String::from_utf8(render(f, &s, std::slice::from_ref(&b)).unwrap()).unwrap();
        assert_eq!(
            text(Format::Json),
            r#"[{"time":"2025-12-01T00:00:00Z","district":"金水区","tilt":0.1,"count(*)":3},{"time":"2025-12-01T00:00:00.5Z","district":"a,\"b\"","tilt":null,"count(*)":4}]"#
        );
        assert_eq!(text(Format::JsonLines).lines().count(), 2);
        assert_eq!(
            text(Format::Csv),
            "time,district,tilt,count(*)\n2025-12-01T00:00:00Z,金水区,0.1,3\n2025-12-01T00:00:00.5Z,\"a,\"\"b\"\"\",,4\n"
        );
        let pretty = text(Format::Pretty);
        let expected = "\
+------------------------+----------+------+----------+
| time                   | district | tilt | count(*) |
+------------------------+----------+------+----------+
| 2025-12-01T00:00:00Z   | 金水区   | 0.1  | 3        |
| 2025-12-01T00:00:00.5Z | a,\"b\"    |      | 4        |
+------------------------+----------+------+----------+
";
        assert_eq!(pretty, expected);
    }
}
