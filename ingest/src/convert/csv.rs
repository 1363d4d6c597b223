//! CSV in: RFC 4180 records, a header naming the columns, rows as line protocol.
//!
//! The header names `time`, the tags and the fields. A column whose name ends in
//! `:TYPE` has that type: `float`, `int`, `uint`, `bool`, `string` or `tag`
//! (`count:int`, `ok:bool`, `device:tag`); the suffix is not part of the name. The
//! columns given with `--tags` are tags. Other columns are fields whose type is
//! read from each value: a number is a float (so a column never flips between
//! integer and float), `true`/`false` a boolean, anything else a string. A `table`
//! column (or, without one, `measurement`) names each row's table; `--table` is
//! the default. An empty cell leaves its tag or field out of the row.

use std::io::BufRead;

use crate::write::Precision;

use super::line::{parse_bool, parse_float, parse_time, LineBuilder, Value};
use super::{read_line, Batcher, ReadOptions, Stop};

/// A record whose quoted field runs on past this many bytes is taken as one whose
/// closing quote is missing, so one stray quote cannot swallow a whole file.
const MAX_RECORD: usize = 1 << 20;

/// One record: its fields, or why it could not be read.
#[derive(Debug, PartialEq)]
pub(super) struct Record {
    /// The record's first physical line (1-based).
    pub line: usize,
    /// The record as written (its physical lines joined by `\n`).
    pub raw: String,
    pub fields: Result<Vec<String>, String>,
}

/// Reads RFC 4180 records: fields separated by commas, optionally in double quotes
/// (which may hold commas, line breaks and `""` for a quote); records end at a line
/// break outside quotes. Blank lines are skipped; a UTF-8 byte-order mark at the
/// start is dropped.
pub(super) struct CsvReader<R> {
    input: R,
    line: usize,
    buf: Vec<u8>,
}

#[derive(Clone, Copy, PartialEq)]
enum State {
    /// At the start of a field.
    Start,
    Unquoted,
    Quoted,
    /// Just after a quote inside a quoted field: the end of the field, or `""`.
    QuoteInQuoted,
}

impl<R: BufRead> CsvReader<R> {
    pub(super) fn new(input: R) -> Self {
        Self {
            input,
            line: 0,
            buf: Vec::new(),
        }
    }

    /// The next record, `None` at the end of the input; `Err` only when reading fails.
    pub(super) fn next_record(&mut self) -> Result<Option<Record>, String> {
        loop {
            if !read_line(&mut self.input, &mut self.buf)? {
                return Ok(None);
            }
            self.line += 1;
            if self.line == 1 && self.buf.starts_with(b"\xEF\xBB\xBF") {
                self.buf.drain(..3);
            }
            if !self.buf.is_empty() {
                break;
            }
        }
        let first_line = self.line;
        let mut raw: Vec<u8> = Vec::new();
        let mut fields = Vec::new();
        let mut field: Vec<u8> = Vec::new();
        let mut state = State::Start;
        let mut error: Option<String> = None;
        loop {
            for &b in &self.buf {
                if error.is_some() {
                    break;
                }
                state = match (state, b) {
                    (State::Start, b'"') => State::Quoted,
                    (State::Start | State::Unquoted, b',') | (State::QuoteInQuoted, b',') => {
                        fields.push(std::mem::take(&mut field));
                        State::Start
                    }
                    // A quote inside an unquoted field is taken as it is.
                    (State::Start | State::Unquoted, _) => {
                        field.push(b);
                        State::Unquoted
                    }
                    (State::Quoted, b'"') => State::QuoteInQuoted,
                    (State::Quoted, _) => {
                        field.push(b);
                        State::Quoted
                    }
                    (State::QuoteInQuoted, b'"') => {
                        field.push(b'"');
                        State::Quoted
                    }
                    (State::QuoteInQuoted, _) => {
                        error = Some(format!(
                            "text after the closing quote of field {}",
                            fields.len() + 1
                        ));
                        state
                    }
                };
            }
            raw.extend_from_slice(&self.buf);
            if state != State::Quoted || error.is_some() {
                break;
            }
            if raw.len() > MAX_RECORD {
                error = Some(format!(
                    "a quoted field runs on past {} KiB (through line {}): is its closing quote missing?",
                    MAX_RECORD >> 10,
                    self.line
                ));
                break;
            }
            // A line break inside quotes is part of the field.
            if !read_line(&mut self.input, &mut self.buf)? {
                error = Some(format!(
                    "the quoted field {} is not closed before the end of the file",
                    fields.len() + 1
                ));
                break;
            }
            self.line += 1;
            field.push(b'\n');
            raw.push(b'\n');
        }
        fields.push(field);
        let raw_text = String::from_utf8_lossy(&raw).into_owned();
        let fields = match error {
            Some(e) => Err(e),
            None => fields
                .into_iter()
                .enumerate()
                .map(|(i, f)| {
                    String::from_utf8(f).map_err(|_| format!("field {} is not valid UTF-8", i + 1))
                })
                .collect(),
        };
        Ok(Some(Record {
            line: first_line,
            raw: raw_text,
            fields,
        }))
    }
}

/// A field's type as the header gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum FieldType {
    /// From each value: a number is a float, `true`/`false` a boolean, else a string.
    Inferred,
    Float,
    Integer,
    UInteger,
    Boolean,
    String,
}

/// What a column holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Role {
    Time,
    Table,
    Tag,
    Field(FieldType),
}

/// The columns of a file, from its header row and the flags.
#[derive(Debug)]
pub(super) struct Header {
    columns: Vec<(String, Role)>,
    table: Option<String>,
    precision: Precision,
}

impl Header {
    /// Reads a header row; `Err` says why it cannot be used.
    pub(super) fn parse(
        names: &[String],
        tags: &[String],
        table: Option<&str>,
        precision: Precision,
    ) -> Result<Self, String> {
        let mut columns: Vec<(String, Role)> = Vec::with_capacity(names.len());
        for (i, raw) in names.iter().enumerate() {
            let raw = raw.trim();
            let (name, typed) = match raw.rsplit_once(':') {
                Some((name, ty)) => match type_role(ty) {
                    Some(role) => (name.trim(), Some(role)),
                    None => (raw, None),
                },
                None => (raw, None),
            };
            if name.is_empty() {
                return Err(format!("the header's column {} has no name", i + 1));
            }
            if columns.iter().any(|(n, _)| n == name) {
                return Err(format!("the header names column {name} twice"));
            }
            let listed = tags.iter().any(|t| t == name);
            let role = match (name, typed) {
                ("time", None) => Role::Time,
                ("time", Some(_)) => {
                    return Err(
                        "the time column takes no type: integers in --precision or RFC 3339".into(),
                    )
                }
                (_, Some(Role::Field(_))) if listed => {
                    return Err(format!(
                        "column {raw} is typed as a field but listed in --tags"
                    ))
                }
                (_, Some(role)) => role,
                (_, None) if listed => Role::Tag,
                ("table", None) => Role::Table,
                ("measurement", None) if !names.iter().any(|n| n.trim() == "table") => Role::Table,
                (_, None) => Role::Field(FieldType::Inferred),
            };
            columns.push((name.to_string(), role));
        }
        if !columns.iter().any(|(_, r)| *r == Role::Time) {
            return Err("the header has no time column".into());
        }
        if let Some(missing) = tags.iter().find(|t| !columns.iter().any(|(n, _)| n == *t)) {
            return Err(format!("--tags names {missing}, which is not a column"));
        }
        if table.is_none() && !columns.iter().any(|(_, r)| *r == Role::Table) {
            return Err("no table: give --table, or a table column".into());
        }
        Ok(Self {
            columns,
            table: table.map(str::to_string),
            precision,
        })
    }

    /// A row as a line of line protocol.
    pub(super) fn convert(&self, row: &[String]) -> Result<String, String> {
        if row.len() != self.columns.len() {
            return Err(format!(
                "{} columns, the header has {}",
                row.len(),
                self.columns.len()
            ));
        }
        let cells = || self.columns.iter().zip(row).map(|((n, r), v)| (n, *r, v));
        let mut time = None;
        let mut table = self.table.as_deref();
        for (_, role, value) in cells() {
            match role {
                Role::Time => time = Some(parse_time(value, self.precision)?),
                Role::Table if !value.is_empty() => table = Some(value),
                _ => {}
            }
        }
        let table = table.ok_or("no table: the table column is empty and no --table was given")?;
        let mut line = LineBuilder::new(table)?;
        for (name, role, value) in cells() {
            if role == Role::Tag {
                line.tag(name, value)?;
            }
        }
        for (name, role, value) in cells() {
            if let Role::Field(ty) = role {
                if !value.is_empty() {
                    line.field(name, typed(name, ty, value)?)?;
                }
            }
        }
        // The time column is required by `parse`.
        line.finish(time.unwrap_or_default())
    }
}

fn type_role(ty: &str) -> Option<Role> {
    Some(match ty.trim().to_ascii_lowercase().as_str() {
        "float" | "double" => Role::Field(FieldType::Float),
        "int" | "integer" => Role::Field(FieldType::Integer),
        "uint" | "unsigned" => Role::Field(FieldType::UInteger),
        "bool" | "boolean" => Role::Field(FieldType::Boolean),
        "string" | "str" => Role::Field(FieldType::String),
        "tag" => Role::Tag,
        _ => return None,
    })
}

/// A cell's value as its column's type says.
fn typed<'a>(name: &str, ty: FieldType, text: &'a str) -> Result<Value<'a>, String> {
    let not = |what: &str| format!("column {name}: '{text}' is not {what}");
    Ok(match ty {
        FieldType::Inferred => {
            if let Some(v) = parse_float(text) {
                Value::Float(v)
            } else if text.eq_ignore_ascii_case("true") {
                Value::Boolean(true)
            } else if text.eq_ignore_ascii_case("false") {
                Value::Boolean(false)
            } else {
                Value::String(text)
            }
        }
        FieldType::Float => Value::Float(parse_float(text).ok_or_else(|| not("a number"))?),
        FieldType::Integer => Value::Integer(text.trim().parse().map_err(|_| not("an integer"))?),
        FieldType::UInteger => Value::UInteger(
            text.trim()
                .parse()
                .map_err(|_| not("an unsigned integer"))?,
        ),
        FieldType::Boolean => Value::Boolean(parse_bool(text).ok_or_else(|| not("a boolean"))?),
        FieldType::String => Value::String(text),
    })
}

/// Reads one CSV file into batches.
pub(super) fn read(
    reader: Box<dyn BufRead + Send>,
    options: &ReadOptions,
    out: &mut Batcher<'_>,
) -> Result<(), Stop> {
    let mut records = CsvReader::new(reader);
    let Some(first) = records.next_record()? else {
        return Ok(());
    };
    let names = first
        .fields
        .map_err(|e| format!("line {}: the header: {e}", first.line))?;
    let header = Header::parse(
        &names,
        options.tags.as_deref().unwrap_or_default(),
        options.table.as_deref(),
        options.precision,
    )
    .map_err(|e| format!("line {}: {e}", first.line))?;
    while let Some(record) = records.next_record()? {
        match record.fields.and_then(|row| header.convert(&row)) {
            Ok(lp) => out.push(record.line, lp.as_bytes())?,
            Err(reason) => out.reject(record.line, reason, &record.raw),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(text: &str) -> Vec<Record> {
        let mut r = CsvReader::new(text.as_bytes());
        let mut out = Vec::new();
        while let Some(rec) = r.next_record().unwrap() {
            out.push(rec);
        }
        out
    }

    fn fields(text: &str) -> Vec<(usize, Result<Vec<String>, String>)> {
        records(text)
            .into_iter()
            .map(|r| (r.line, r.fields))
            .collect()
    }

    fn ok(v: &[&str]) -> Result<Vec<String>, String> {
        Ok(v.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn quoting_follows_rfc_4180() {
        let text = "\u{feff}a,b,c\r\n\"x, y\",\"say \"\"hi\"\"\",\n\n,\"\",z\n";
        assert_eq!(
            fields(text),
            [
                (1, ok(&["a", "b", "c"])),
                (2, ok(&["x, y", "say \"hi\"", ""])),
                (4, ok(&["", "", "z"])),
            ]
        );
    }

    #[test]
    fn a_quoted_line_break_joins_lines_and_the_record_keeps_its_first_line() {
        let recs = records("h\n\"two\r\nlines\",x\nnext");
        assert_eq!(recs[1].line, 2);
        assert_eq!(recs[1].fields, ok(&["two\nlines", "x"]));
        assert_eq!(recs[1].raw, "\"two\nlines\",x");
        assert_eq!(recs[2].line, 4);
        assert_eq!(recs[2].fields, ok(&["next"]));
    }

    #[test]
    fn malformed_quoting_rejects_the_record_and_reading_goes_on() {
        let got = fields("a,\"b\"c,d\nok\n5\" pipe,1\nx,\"open");
        assert!(got[0]
            .1
            .as_ref()
            .unwrap_err()
            .contains("after the closing quote of field 2"));
        assert_eq!(got[1], (2, ok(&["ok"])));
        assert_eq!(got[2], (3, ok(&["5\" pipe", "1"])));
        assert_eq!(got[3].0, 4);
        assert!(got[3].1.as_ref().unwrap_err().contains("not closed"));
    }

    #[test]
    fn invalid_utf8_is_a_bad_record() {
        let mut r = CsvReader::new(&b"a,\xff\nb\n"[..]);
        let rec = r.next_record().unwrap().unwrap();
        assert_eq!(rec.fields, Err("field 2 is not valid UTF-8".into()));
        assert_eq!(r.next_record().unwrap().unwrap().fields, ok(&["b"]));
    }

    fn header(names: &[&str], tags: &[&str], table: Option<&str>) -> Result<Header, String> {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let tags: Vec<String> = tags.iter().map(|s| s.to_string()).collect();
        Header::parse(&names, &tags, table, Precision::Second)
    }

    fn row(h: &Header, cells: &[&str]) -> Result<String, String> {
        let cells: Vec<String> = cells.iter().map(|s| s.to_string()).collect();
        h.convert(&cells)
    }

    #[test]
    fn rows_become_line_protocol_by_the_header() {
        let h = header(
            &[
                "time",
                "device",
                "district:tag",
                "tilt",
                "count:int",
                "ok:bool",
                "note:string",
                "a:b",
            ],
            &["device"],
            Some("manhole"),
        )
        .unwrap();
        assert_eq!(
            row(&h, &["10", "mh 1", "金水区", "1", "7", "yes", "3", "x"]).unwrap(),
            "manhole,device=mh\\ 1,district=金水区 tilt=1.0,count=7i,ok=true,note=\"3\",a:b=\"x\" 10000000000"
        );
        // Empty cells leave tags and fields out; inferred types per value.
        assert_eq!(
            row(
                &h,
                &["2025-12-01T00:00:00Z", "", "", "", "", "", "", "TRUE"]
            )
            .unwrap(),
            "manhole a:b=true 1764547200000000000"
        );
        assert_eq!(
            row(&h, &["1", "d", "", "", "1.5", "", "", ""]).unwrap_err(),
            "column count: '1.5' is not an integer"
        );
        assert_eq!(
            row(&h, &["1", "d", ""]).unwrap_err(),
            "3 columns, the header has 8"
        );
        assert!(row(&h, &["noon", "d", "", "1", "", "", "", ""])
            .unwrap_err()
            .contains("neither an integer"));
        assert_eq!(
            row(&h, &["1", "d", "", "", "", "", "", ""]).unwrap_err(),
            "no fields: every value is empty or a tag"
        );
    }

    #[test]
    fn the_table_comes_from_a_column_or_the_flag() {
        let h = header(&["measurement", "time", "v"], &[], None).unwrap();
        assert_eq!(row(&h, &["t1", "1", "2"]).unwrap(), "t1 v=2.0 1000000000");
        assert!(row(&h, &["", "1", "2"])
            .unwrap_err()
            .starts_with("no table"));
        let h = header(&["table", "measurement", "time"], &[], Some("d")).unwrap();
        assert_eq!(
            row(&h, &["", "m", "1"]).unwrap(),
            "d measurement=\"m\" 1000000000"
        );
    }

    #[test]
    fn unusable_headers_are_refused() {
        assert!(header(&["t", "v"], &[], Some("x"))
            .unwrap_err()
            .contains("no time"));
        assert!(header(&["time", "v"], &[], None)
            .unwrap_err()
            .contains("--table"));
        assert!(header(&["time", "v", "v:int"], &[], Some("x"))
            .unwrap_err()
            .contains("twice"));
        assert!(header(&["time", "v"], &["dev"], Some("x"))
            .unwrap_err()
            .contains("--tags names dev"));
        assert!(header(&["time", "v:int"], &["v"], Some("x"))
            .unwrap_err()
            .contains("listed in --tags"));
        assert!(header(&["time", ""], &[], Some("x"))
            .unwrap_err()
            .contains("column 2"));
    }
}
