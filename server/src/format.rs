//! Query answers as JSON, JSON lines, CSV and an aligned text table.
//!
//! Timestamps are RFC 3339 in UTC with a `Z` and only as many fraction digits as
//! needed; NULL is `null` in JSON and empty in CSV and tables; floats print in their
//! shortest exact form.

use std::fmt::Write as _;

use chrono::NaiveDate;
use citytsdb_storage::units::Rfc3339Printer;
use datafusion::arrow::array::{Array, ArrayRef, AsArray};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{
    DataType, Date32Type, Float32Type, Float64Type, Int16Type, Int32Type, Int64Type, Int8Type,
    SchemaRef, TimeUnit, TimestampMicrosecondType, TimestampMillisecondType,
    TimestampNanosecondType, TimestampSecondType, UInt16Type, UInt32Type, UInt64Type, UInt8Type,
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

/// What kind of value a printed cell holds.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Null,
    /// Printed bare in JSON (numbers, booleans).
    Raw,
    /// Printed quoted in JSON.
    Text,
    /// Printed quoted in JSON, and known to need no escaping (times, dates).
    Plain,
}

/// One column's printed values for every row of a batch, in one buffer. Printing
/// a column at a time looks at its type once, not once per value, and allocates
/// nothing per value.
#[derive(Default)]
struct ColumnText {
    text: String,
    /// Each value's kind and end offset in `text`.
    cells: Vec<(Kind, usize)>,
}

impl ColumnText {
    /// The printed value of `row`.
    fn cell(&self, row: usize) -> (Kind, &str) {
        let start = match row {
            0 => 0,
            _ => self.cells[row - 1].1,
        };
        let (kind, end) = self.cells[row];
        (kind, &self.text[start..end])
    }
}

/// Writes an answer in one format batch by batch, so a long answer streams out
/// without being held whole. Only `pretty`, whose column widths depend on every
/// row, keeps its rows until [`Encoder::finish`].
pub struct Encoder {
    format: Format,
    names: Vec<String>,
    /// Each column's `"name":`, escaped once.
    json_keys: Vec<String>,
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
            .map(|n| {
                let mut key = String::new();
                push_json_string(&mut key, n);
                key.push(':');
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
                let mut header = String::new();
                for (i, n) in enc.names.iter().enumerate() {
                    if i > 0 {
                        header.push(',');
                    }
                    push_csv_field(&mut header, n);
                }
                header.push('\n');
                header.into_bytes()
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
        let mut out = String::new();
        let keys = &self.json_keys;
        let rows_written = &mut self.rows_written;
        let pretty_rows = &mut self.pretty_rows;
        match self.format {
            Format::Json | Format::JsonLines => {
                let json = self.format == Format::Json;
                let columns = print_columns(batch)?;
                let bytes: usize = columns.iter().map(|c| c.text.len()).sum::<usize>()
                    + batch.num_rows() * (keys.iter().map(|k| k.len() + 3).sum::<usize>() + 3);
                out.reserve(bytes);
                for row in 0..batch.num_rows() {
                    if json && *rows_written > 0 {
                        out.push(',');
                    }
                    *rows_written += 1;
                    out.push('{');
                    for (i, (key, column)) in keys.iter().zip(&columns).enumerate() {
                        if i > 0 {
                            out.push(',');
                        }
                        out.push_str(key);
                        match column.cell(row) {
                            (Kind::Null, _) => out.push_str("null"),
                            (Kind::Raw, value) => out.push_str(value),
                            (Kind::Plain, value) => {
                                out.push('"');
                                out.push_str(value);
                                out.push('"');
                            }
                            (Kind::Text, value) => push_json_string(&mut out, value),
                        }
                    }
                    out.push('}');
                    if !json {
                        out.push('\n');
                    }
                }
            }
            Format::Csv => {
                let columns = print_columns(batch)?;
                out.reserve(columns.iter().map(|c| c.text.len() + c.cells.len()).sum());
                for row in 0..batch.num_rows() {
                    for (i, column) in columns.iter().enumerate() {
                        if i > 0 {
                            out.push(',');
                        }
                        push_csv_field(&mut out, column.cell(row).1);
                    }
                    out.push('\n');
                }
            }
            Format::Pretty => {
                let columns = print_columns(batch)?;
                for row in 0..batch.num_rows() {
                    pretty_rows.push(
                        columns
                            .iter()
                            .map(|c| c.cell(row).1.replace('\n', "\\n"))
                            .collect(),
                    )
                }
            }
            Format::Arrow | Format::Parquet => {}
        }
        Ok(out.into_bytes())
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

/// Every column of `batch`, printed.
fn print_columns(batch: &RecordBatch) -> Result<Vec<ColumnText>, ArrowError> {
    let options = FormatOptions::default();
    batch
        .columns()
        .iter()
        .map(|c| {
            let c = normalize(c)?;
            let fmt = match needs_formatter(c.data_type()) {
                true => Some(ArrayFormatter::try_new(c.as_ref(), &options)?),
                false => None,
            };
            let mut text = ColumnText::default();
            print_column(&c, fmt.as_ref(), &mut text);
            Ok(text)
        })
        .collect()
}

/// Dictionary columns print as their values.
fn normalize(c: &ArrayRef) -> Result<ArrayRef, ArrowError> {
    match c.data_type() {
        DataType::Dictionary(_, value) => cast(c, value),
        _ => Ok(c.clone()),
    }
}

fn needs_formatter(t: &DataType) -> bool {
    !matches!(
        t,
        DataType::Null
            | DataType::Boolean
            | DataType::Int8
            | DataType::Int16
            | DataType::Int32
            | DataType::Int64
            | DataType::UInt8
            | DataType::UInt16
            | DataType::UInt32
            | DataType::UInt64
            | DataType::Float32
            | DataType::Float64
            | DataType::Utf8
            | DataType::LargeUtf8
            | DataType::Utf8View
            | DataType::Timestamp(_, _)
            | DataType::Date32
    )
}

/// Prints every value of `c` onto `out`.
fn print_column(c: &ArrayRef, fmt: Option<&ArrayFormatter<'_>>, out: &mut ColumnText) {
    out.cells.reserve(c.len());
    // One loop per type: `$value` is bound to each non-null value in turn.
    macro_rules! each {
        ($array:expr, |$value:ident, $text:ident| $print:expr) => {{
            let array = $array;
            for row in 0..array.len() {
                let kind = if array.is_null(row) {
                    Kind::Null
                } else {
                    let $value = array.value(row);
                    let $text = &mut out.text;
                    $print
                };
                out.cells.push((kind, out.text.len()));
            }
        }};
    }
    macro_rules! int {
        ($t:ty) => {
            each!(c.as_primitive::<$t>(), |v, text| {
                text.push_str(itoa::Buffer::new().format(v));
                Kind::Raw
            })
        };
    }
    macro_rules! time {
        ($t:ty, $nanos_per:expr) => {{
            let mut printer = Rfc3339Printer::default();
            each!(c.as_primitive::<$t>(), |v, text| {
                printer.push(text, v as i128 * $nanos_per);
                Kind::Plain
            })
        }};
    }
    match c.data_type() {
        DataType::Null => out.cells.extend((0..c.len()).map(|_| (Kind::Null, 0))),
        DataType::Boolean => each!(c.as_boolean(), |v, text| {
            text.push_str(if v { "true" } else { "false" });
            Kind::Raw
        }),
        DataType::Int8 => int!(Int8Type),
        DataType::Int16 => int!(Int16Type),
        DataType::Int32 => int!(Int32Type),
        DataType::Int64 => int!(Int64Type),
        DataType::UInt8 => int!(UInt8Type),
        DataType::UInt16 => int!(UInt16Type),
        DataType::UInt32 => int!(UInt32Type),
        DataType::UInt64 => int!(UInt64Type),
        DataType::Float32 => each!(c.as_primitive::<Float32Type>(), |v, text| float(
            v as f64, text
        )),
        DataType::Float64 => each!(c.as_primitive::<Float64Type>(), |v, text| float(v, text)),
        DataType::Utf8 => each!(c.as_string::<i32>(), |v, text| string(v, text)),
        DataType::LargeUtf8 => each!(c.as_string::<i64>(), |v, text| string(v, text)),
        DataType::Utf8View => each!(c.as_string_view(), |v, text| string(v, text)),
        DataType::Timestamp(TimeUnit::Second, _) => time!(TimestampSecondType, 1_000_000_000),
        DataType::Timestamp(TimeUnit::Millisecond, _) => {
            time!(TimestampMillisecondType, 1_000_000)
        }
        DataType::Timestamp(TimeUnit::Microsecond, _) => time!(TimestampMicrosecondType, 1_000),
        DataType::Timestamp(TimeUnit::Nanosecond, _) => time!(TimestampNanosecondType, 1),
        DataType::Date32 => each!(c.as_primitive::<Date32Type>(), |days, text| {
            // 719,163 days lie between 0001-01-01 and 1970-01-01.
            match days
                .checked_add(719_163)
                .and_then(NaiveDate::from_num_days_from_ce_opt)
            {
                Some(d) => {
                    let _ = write!(text, "{}", d.format("%Y-%m-%d"));
                }
                None => {
                    let _ = write!(text, "{days}");
                }
            }
            Kind::Plain
        }),
        data_type => {
            let kind = match data_type {
                DataType::Decimal128(..) | DataType::Decimal256(..) => Kind::Raw,
                _ => Kind::Text,
            };
            for row in 0..c.len() {
                let kind = match fmt {
                    Some(f) if !c.is_null(row) => {
                        let _ = write!(out.text, "{}", f.value(row));
                        kind
                    }
                    _ => Kind::Null,
                };
                out.cells.push((kind, out.text.len()));
            }
        }
    }
}

fn string(s: &str, out: &mut String) -> Kind {
    out.push_str(s);
    Kind::Text
}

fn float(v: f64, out: &mut String) -> Kind {
    // The shortest representation that reads back exactly, as serde_json prints it
    // (with the same printer).
    if !v.is_finite() {
        return Kind::Null;
    }
    out.push_str(zmij::Buffer::new().format_finite(v));
    Kind::Raw
}

fn push_json_string(out: &mut String, s: &str) {
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.push('"');
        out.push_str(s);
        out.push('"');
    } else {
        // serde_json's escaping never fails for a &str.
        out.push_str(&serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_string()));
    }
}

fn push_csv_field(out: &mut String, s: &str) {
    if s.contains([',', '"', '\n', '\r']) {
        out.push('"');
        out.push_str(&s.replace('"', "\"\""));
        out.push('"');
    } else {
        out.push_str(s);
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
            let mut out = String::new();
            push_json_string(&mut out, s);
            assert_eq!(out, serde_json::to_string(s).unwrap());
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
