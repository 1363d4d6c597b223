//! A sqllogictest-style runner of golden SQL files against the real server.
//!
//! Every `tests/slt/*.slt` file is run on a fresh `citytsdb serve` (a temporary data
//! directory, 127.0.0.1) loaded with the fixed dataset `tests/slt/data/city.lp`
//! (database `city`, written with `precision=s`), once per [`Layout`] of that
//! dataset: all of it in the write buffer, partly in Parquet segments (the lines
//! before `# @flush` flushed, the rest not), or all of it in segments. The answers
//! must be the same in every layout; the layouts run in parallel. Queries go to
//! `GET /api/v1/query` with `format=json`; the server keeps the column order in its
//! JSON objects and this module reads them in order, duplicate names included.
//!
//! # The file format
//!
//! Records are separated by blank lines. A line starting with `#` between records is
//! a comment. The records:
//!
//! ```text
//! # a comment
//! statement ok
//! EXPLAIN SELECT * FROM manhole
//!
//! statement error 400 @1:8 No field named nope
//! SELECT nope FROM manhole
//!
//! query TIR rowsort
//! SELECT device, battery_pct, tilt_deg FROM manhole WHERE tilt_deg > 17
//! ----
//! mh-001 97 18.0
//! mh-003 65 22.5
//!
//! control flush
//! ```
//!
//! - `statement ok [db=NAME]` + SQL: the query must answer 200 (rows ignored).
//! - `statement error [db=NAME] [STATUS] [@LINE:COLUMN] [TEXT]` + SQL (`query error`
//!   is the same): the query must fail with a 4xx status (a 5xx always fails the
//!   record), equal to `STATUS` when given; the answer's `position` must be
//!   `LINE:COLUMN` when given; and `TEXT`, when given, must be a substring of the
//!   server's `error` message (plain text, not a pattern).
//! - `query TYPES [rowsort] [db=NAME]` + SQL + `----` + the expected rows. `TYPES`
//!   has one letter per column: `T` text, `I` integer, `R` float, `B` boolean, `D`
//!   timestamp (an RFC 3339 string); the count must match and every non-NULL value
//!   must be of its column's type. `rowsort` sorts the rendered rows (as strings)
//!   before comparing; without it the order must match.
//! - `control flush` flushes the write buffer into segments
//!   (`POST /api/v1/flush?db=city`); `control restart` stops the server gracefully
//!   and starts it again on the same data directory.
//! - `halt` ends the file there.
//!
//! The SQL runs up to the `----` line, or the blank line ending the record. `db=NAME`
//! sends the query to another database (default `city`).
//!
//! # How answers are printed
//!
//! One row per line, columns separated by a single space (values are printed as is,
//! so a value with a space in it is not quoted; rows are compared as whole lines,
//! trailing whitespace ignored):
//!
//! - NULL is `NULL`; the empty string is `(empty)`; in strings a newline, tab or
//!   carriage return is printed as `\n`, `\t`, `\r`.
//! - Integers are printed in full, booleans as `true` / `false`, timestamps as the
//!   server prints them (`2025-12-01T00:00:00Z`, fraction digits only when needed).
//! - Floats are rounded to 9 significant digits, then printed in the shortest form
//!   that reads back as the rounded value, without an exponent, with `.0` added to a
//!   whole number: `17.2`, `-182.5`, `3.0`, `0.333333333`, `6.03333333`. `-0` is
//!   `0.0`. (The server prints NaN and infinities as `null`.)
//!
//! # Completion
//!
//! With [`Options::complete`] the files are rewritten in place from the server's
//! answers in the first layout run (comments, SQL and record order untouched): the
//! rows and the `TYPES` of every `query` record (a `query` record without `----` gets
//! one), and the status and text of every error record whose expectation does not
//! match or that names no `TEXT` (the text becomes the first line of the error
//! message, with the answer's status and position). The other layouts
//! are then checked against the completed files. Records that fail in a way that
//! cannot be completed (a `statement ok` that errors, an error record that
//! succeeds) are reported as failures.
//!
//! # Running
//!
//! `tests/tests/slt.rs` runs every file (`CITYTSDB_SLT_FILES=a.slt,b.slt` picks some,
//! `CITYTSDB_SLT_COMPLETE=1` completes them); `tests/src/bin/slt.rs` is the same as a
//! program: `cargo run -p citytsdb-tests --bin slt -- [--complete] [--layout L]...
//! [FILES...]`. Both use `$CITYTSDB_BIN` as the server when set (see
//! [`crate::server::binary`]). `tests/slt/README.md` has the details, and
//! `tests/slt/tools/duckdb_check.py` checks the answers against DuckDB.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::Value;

use crate::server::{workspace_root, Client, Server};

/// The database the dataset is written to and queries run against by default.
pub const DB: &str = "city";

/// The line of `city.lp` where the runner may flush between writing its chunks.
pub const FLUSH_MARKER: &str = "# @flush";

/// The directory of the golden files: `tests/slt`.
pub fn slt_dir() -> PathBuf {
    workspace_root().join("tests").join("slt")
}

/// The dataset every file runs on: `tests/slt/data/city.lp`.
pub fn dataset() -> PathBuf {
    slt_dir().join("data").join("city.lp")
}

/// Every `tests/slt/*.slt` file, sorted by name.
pub fn default_files() -> Vec<PathBuf> {
    let dir = slt_dir();
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "slt"))
        .collect();
    files.sort();
    files
}

/// Where the dataset is when a file starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// All of `city.lp` written in one request and left in the write buffer.
    Memory,
    /// The chunk before `# @flush` flushed into segments, the rest in the buffer.
    Mixed,
    /// Both chunks written and flushed one after the other: all in segments.
    Flushed,
}

impl Layout {
    /// Every layout, in the order they run.
    pub const ALL: [Layout; 3] = [Layout::Memory, Layout::Mixed, Layout::Flushed];

    /// The layout's name: `memory`, `mixed` or `flushed`.
    pub fn name(self) -> &'static str {
        match self {
            Layout::Memory => "memory",
            Layout::Mixed => "mixed",
            Layout::Flushed => "flushed",
        }
    }

    /// The layout named `name`.
    pub fn parse(name: &str) -> Option<Layout> {
        Layout::ALL.into_iter().find(|l| l.name() == name)
    }
}

/// How to run the files.
#[derive(Debug, Clone)]
pub struct Options {
    /// Rewrite the expected answers from the actual ones (completion mode).
    pub complete: bool,
    /// The layouts each file runs in, in order; completion uses the first.
    pub layouts: Vec<Layout>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            complete: false,
            layouts: Layout::ALL.to_vec(),
        }
    }
}

/// One record that did not pass.
#[derive(Debug, Clone)]
pub struct Failure {
    /// `file:line` of the record's first line.
    pub location: String,
    /// The layout it failed in.
    pub layout: Layout,
    /// What went wrong: the SQL, expected and actual.
    pub message: String,
}

/// What a run did.
#[derive(Debug, Default)]
pub struct Report {
    /// Records run, over all files and layouts.
    pub records: usize,
    /// `query` records run, over all files and layouts.
    pub queries: usize,
    /// Files rewritten by completion.
    pub completed: Vec<PathBuf>,
    /// Every failure, in the order found.
    pub failures: Vec<Failure>,
}

impl Report {
    /// Every failure, printed for a human.
    pub fn failures_text(&self) -> String {
        let mut out = String::new();
        for f in &self.failures {
            let _ = writeln!(out, "{} [{}]: {}\n", f.location, f.layout.name(), f.message);
        }
        let _ = write!(
            out,
            "{} of {} records failed",
            self.failures.len(),
            self.records
        );
        out
    }
}

/// Runs `files` (each in every layout of `options`, the layouts in parallel) and
/// reports what failed.
///
/// Panics only when the harness itself cannot go on: a file that does not parse or
/// cannot be written, a server that does not start, a dataset the server refuses.
pub fn run(files: &[PathBuf], options: &Options) -> Report {
    let mut report = Report::default();
    let mut layouts = options.layouts.as_slice();
    if options.complete {
        // Completion rewrites the files in the first layout, before any other
        // layout reads them.
        if let Some((&first, rest)) = layouts.split_first() {
            for file in files {
                run_one(file, first, true, &mut report);
            }
            layouts = rest;
        }
    }
    // The other layouts check the files independently, each on its own servers.
    let reports: Vec<Report> = std::thread::scope(|scope| {
        let workers: Vec<_> = layouts
            .iter()
            .map(|&layout| {
                scope.spawn(move || {
                    let mut report = Report::default();
                    for file in files {
                        run_one(file, layout, false, &mut report);
                    }
                    report
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| {
                w.join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect()
    });
    for r in reports {
        report.records += r.records;
        report.queries += r.queries;
        report.failures.extend(r.failures);
    }
    report
}

/// Runs one file in one layout, completing it in place when `complete`.
fn run_one(file: &Path, layout: Layout, complete: bool, report: &mut Report) {
    let started = Instant::now();
    let text = fs::read_to_string(file).unwrap_or_else(|e| panic!("read {}: {e}", file.display()));
    let records = parse(&text).unwrap_or_else(|e| panic!("{}:{e}", display(file)));
    let before = report.failures.len();
    let edits = run_file(file, &records, layout, complete, report);
    if complete && !edits.is_empty() {
        let new_text = apply_edits(&text, edits);
        if new_text != text {
            fs::write(file, &new_text).unwrap_or_else(|e| panic!("write {}: {e}", file.display()));
            report.completed.push(file.to_path_buf());
        }
    }
    eprintln!(
        "slt: {} [{}]: {} records, {} failed, {:.1}s{}",
        display(file),
        layout.name(),
        records.len(),
        report.failures.len() - before,
        started.elapsed().as_secs_f64(),
        if complete { " (completed)" } else { "" }
    );
}

/// A path as shown in messages: relative to the workspace root when inside it.
fn display(path: &Path) -> String {
    let root = workspace_root();
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|d| d.join(path))
            .unwrap_or_else(|_| path.to_path_buf())
    };
    abs.strip_prefix(&root)
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| path.display().to_string())
}

// ---------------------------------------------------------------------------------
// Parsing

/// What an error record expects.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ErrorSpec {
    /// `statement` or `query`, as written.
    keyword: String,
    status: Option<u16>,
    /// `@LINE:COLUMN`: where the server must place the error.
    position: Option<(u64, u64)>,
    text: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    StatementOk,
    Error(ErrorSpec),
    Query {
        types: String,
        rowsort: bool,
        /// The expected rows and the line range (0-based, end exclusive) they fill;
        /// `None` when the record has no `----` line.
        expected: Option<(Vec<String>, usize, usize)>,
    },
    Flush,
    Restart,
}

#[derive(Debug, Clone)]
struct Record {
    /// 0-based index of the header line.
    header: usize,
    /// 0-based index one past the SQL's last line.
    sql_end: usize,
    db: Option<String>,
    sql: String,
    kind: Kind,
}

impl Record {
    fn db(&self) -> &str {
        self.db.as_deref().unwrap_or(DB)
    }
}

/// Parses a file into records; `Err("LINE: message")` for a malformed one.
fn parse(text: &str) -> Result<Vec<Record>, String> {
    let lines: Vec<&str> = text.lines().collect();
    let mut records = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i].trim_end();
        if line.trim().is_empty() || line.starts_with('#') {
            i += 1;
            continue;
        }
        let header = i;
        let err = |m: String| format!("{}: {m}", header + 1);
        let tokens: Vec<&str> = line.split_whitespace().collect();
        let mut db = None;
        let kind = match tokens[0] {
            "halt" => break,
            "control" => {
                let kind = match tokens.get(1..) {
                    Some(["flush"]) => Kind::Flush,
                    Some(["restart"]) => Kind::Restart,
                    _ => return Err(err(format!("unknown control directive: {line}"))),
                };
                records.push(Record {
                    header,
                    sql_end: header + 1,
                    db: None,
                    sql: String::new(),
                    kind,
                });
                i += 1;
                continue;
            }
            "statement" | "query" if tokens.get(1) == Some(&"error") => {
                Kind::Error(parse_error_spec(tokens[0], line, &mut db).map_err(err)?)
            }
            "statement" if tokens.get(1) == Some(&"ok") => {
                for option in &tokens[2..] {
                    match option.strip_prefix("db=") {
                        Some(name) if !name.is_empty() => db = Some(name.to_string()),
                        _ => return Err(err(format!("unknown option {option:?}"))),
                    }
                }
                Kind::StatementOk
            }
            "query" if tokens.len() >= 2 => {
                let types = tokens[1].to_string();
                if let Some(bad) = types.chars().find(|c| !"TIRBD".contains(*c)) {
                    return Err(err(format!(
                        "unknown column type {bad:?} in {types:?} (use T, I, R, B, D)"
                    )));
                }
                let mut rowsort = false;
                for option in &tokens[2..] {
                    match *option {
                        "rowsort" => rowsort = true,
                        "nosort" => rowsort = false,
                        o => match o.strip_prefix("db=") {
                            Some(name) if !name.is_empty() => db = Some(name.to_string()),
                            _ => return Err(err(format!("unknown option {o:?}"))),
                        },
                    }
                }
                Kind::Query {
                    types,
                    rowsort,
                    expected: None,
                }
            }
            _ => return Err(err(format!("unknown record: {line}"))),
        };
        i += 1;
        let sql_start = i;
        while i < lines.len() && !lines[i].trim().is_empty() && lines[i].trim_end() != "----" {
            i += 1;
        }
        let sql_end = i;
        if sql_end == sql_start {
            return Err(err("the record has no SQL".into()));
        }
        let sql = lines[sql_start..sql_end].join("\n");
        let kind = match kind {
            Kind::Query { types, rowsort, .. } => {
                let mut expected = None;
                if i < lines.len() && lines[i].trim_end() == "----" {
                    i += 1;
                    let start = i;
                    while i < lines.len() && !lines[i].trim().is_empty() {
                        i += 1;
                    }
                    let rows = lines[start..i]
                        .iter()
                        .map(|l| l.trim_end().to_string())
                        .collect();
                    expected = Some((rows, start, i));
                }
                Kind::Query {
                    types,
                    rowsort,
                    expected,
                }
            }
            other => {
                if i < lines.len() && lines[i].trim_end() == "----" {
                    return Err(err("only query records have a ---- line".into()));
                }
                other
            }
        };
        records.push(Record {
            header,
            sql_end,
            db,
            sql,
            kind,
        });
    }
    Ok(records)
}

/// `statement error [db=NAME] [STATUS] [TEXT]`.
fn parse_error_spec(
    keyword: &str,
    line: &str,
    db: &mut Option<String>,
) -> Result<ErrorSpec, String> {
    // Past "statement" / "query" and "error".
    let mut rest = line.trim_start()[keyword.len()..].trim_start()["error".len()..].trim_start();
    let mut status = None;
    let mut position = None;
    loop {
        let (token, after) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
        if let Some(name) = token.strip_prefix("db=") {
            if name.is_empty() {
                return Err("db= needs a database name".into());
            }
            *db = Some(name.to_string());
        } else if status.is_none() && token.len() == 3 && token.bytes().all(|b| b.is_ascii_digit())
        {
            let code: u16 = token.parse().map_err(|e| format!("status {token}: {e}"))?;
            if !(400..500).contains(&code) {
                return Err(format!("an error record expects a 4xx status, not {code}"));
            }
            status = Some(code);
        } else if let Some(at) = token.strip_prefix('@') {
            let parsed = at
                .split_once(':')
                .and_then(|(l, c)| Some((l.parse().ok()?, c.parse().ok()?)));
            match parsed {
                Some(p) if position.is_none() => position = Some(p),
                _ => return Err(format!("a position is @LINE:COLUMN, not {token}")),
            }
        } else {
            break;
        }
        rest = after.trim_start();
    }
    Ok(ErrorSpec {
        keyword: keyword.to_string(),
        status,
        position,
        text: rest.trim().to_string(),
    })
}

fn error_header(spec: &ErrorSpec, db: Option<&str>) -> String {
    let mut out = format!("{} error", spec.keyword);
    if let Some(db) = db {
        let _ = write!(out, " db={db}");
    }
    if let Some(status) = spec.status {
        let _ = write!(out, " {status}");
    }
    if let Some((line, column)) = spec.position {
        let _ = write!(out, " @{line}:{column}");
    }
    if !spec.text.is_empty() {
        let _ = write!(out, " {}", spec.text);
    }
    out
}

fn query_header(types: &str, rowsort: bool, db: Option<&str>) -> String {
    let mut out = format!("query {types}");
    if rowsort {
        out.push_str(" rowsort");
    }
    if let Some(db) = db {
        let _ = write!(out, " db={db}");
    }
    out
}

// ---------------------------------------------------------------------------------
// Running

/// A change completion makes: replace lines `start..end` (0-based) with `lines`.
struct Edit {
    start: usize,
    end: usize,
    lines: Vec<String>,
}

fn apply_edits(text: &str, mut edits: Vec<Edit>) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    edits.sort_by_key(|e| (e.start, e.end));
    for edit in edits.into_iter().rev() {
        lines.splice(edit.start..edit.end, edit.lines);
    }
    let mut out = lines.join("\n");
    out.push('\n');
    out
}

/// One server running a file: the data directory outlives restarts.
struct Session {
    _dir: tempfile::TempDir,
    data: PathBuf,
    server: Option<Server>,
}

impl Session {
    fn start(layout: Layout) -> Session {
        let dir = tempfile::tempdir().expect("create a temporary directory");
        let data = dir.path().join("data");
        let server = Server::start(&data);
        let lp = fs::read_to_string(dataset())
            .unwrap_or_else(|e| panic!("read {}: {e}", dataset().display()));
        let (first, second) = match lp.find(&format!("\n{FLUSH_MARKER}\n")) {
            Some(at) => lp.split_at(at + 1),
            None => (lp.as_str(), ""),
        };
        match layout {
            Layout::Memory => server.write_ok(DB, "s", &lp),
            Layout::Mixed | Layout::Flushed => {
                server.write_ok(DB, "s", first);
                server.flush(DB);
                server.write_ok(DB, "s", second);
                if layout == Layout::Flushed {
                    server.flush(DB);
                }
            }
        }
        Session {
            _dir: dir,
            data,
            server: Some(server),
        }
    }

    fn server(&self) -> &Server {
        self.server.as_ref().expect("a server between restarts")
    }

    fn client(&self) -> Client {
        self.server().client()
    }

    fn restart(&mut self) {
        if let Some(server) = self.server.take() {
            server.stop();
        }
        self.server = Some(Server::start(&self.data));
    }
}

/// A server's answer to one query.
enum Answer {
    Rows {
        columns: usize,
        rows: Vec<Vec<Cell>>,
    },
    Error {
        status: u16,
        /// The `position` of the answer, as (line, column).
        position: Option<(u64, u64)>,
        text: String,
    },
}

/// Runs one file in one layout; with `complete`, returns the edits that make the
/// file match the answers.
fn run_file(
    file: &Path,
    records: &[Record],
    layout: Layout,
    complete: bool,
    report: &mut Report,
) -> Vec<Edit> {
    let name = display(file);
    let mut session = Session::start(layout);
    let mut edits = Vec::new();
    for record in records {
        report.records += 1;
        let location = format!("{name}:{}", record.header + 1);
        let failure = match &record.kind {
            Kind::Flush => match session.client().flush(DB) {
                Ok((200, _)) => None,
                Ok((status, body)) => Some(format!("control flush answered {status}: {body}")),
                Err(e) => session.server().fail(&format!("{location}: flush: {e}")),
            },
            Kind::Restart => {
                session.restart();
                None
            }
            _ => match ask(&session.client(), record.db(), &record.sql) {
                Ok(answer) => {
                    if matches!(record.kind, Kind::Query { .. }) {
                        report.queries += 1;
                    }
                    check(record, answer, complete, &mut edits)
                }
                Err(e) => {
                    if !session.server().is_healthy() {
                        session
                            .server()
                            .fail(&format!("{location}: the server died: {e}"));
                    }
                    Some(format!("{e}\n  SQL:\n{}", indent(&record.sql)))
                }
            },
        };
        if let Some(message) = failure {
            report.failures.push(Failure {
                location,
                layout,
                message,
            });
        }
    }
    if let Some(server) = session.server.take() {
        server.stop();
    }
    edits
}

/// Compares one answer with its record: `Some(message)` when it fails; with
/// `complete`, pushes the edits that make the record match instead where it can.
fn check(record: &Record, answer: Answer, complete: bool, edits: &mut Vec<Edit>) -> Option<String> {
    let sql = indent(&record.sql);
    match (&record.kind, answer) {
        (_, Answer::Error { status, text, .. }) if status >= 500 => Some(format!(
            "the server failed with {status} (never acceptable): {}\n  SQL:\n{sql}",
            text.replace('\n', "\n    ")
        )),
        (Kind::StatementOk, Answer::Rows { .. }) => None,
        (Kind::StatementOk, Answer::Error { status, text, .. }) => Some(format!(
            "expected success, got {status}: {}\n  SQL:\n{sql}",
            text.replace('\n', "\n    ")
        )),
        (Kind::Error(spec), Answer::Rows { rows, .. }) => Some(format!(
            "expected an error{}, got {} rows\n  SQL:\n{sql}",
            spec.status.map(|s| format!(" {s}")).unwrap_or_default(),
            rows.len()
        )),
        (
            Kind::Error(spec),
            Answer::Error {
                status,
                position,
                text,
            },
        ) => {
            let matches = spec.status.is_none_or(|s| s == status)
                && (spec.position.is_none() || spec.position == position)
                && text.contains(&spec.text);
            // Completion also fills in the message of a record that names none.
            if matches && !(complete && spec.text.is_empty()) {
                return None;
            }
            let actual = ErrorSpec {
                keyword: spec.keyword.clone(),
                status: Some(status),
                position,
                text: text.lines().next().unwrap_or("").trim().to_string(),
            };
            if !complete {
                return Some(format!(
                    "wrong error\n  SQL:\n{sql}\n  expected: {}\n  actual:   {}\n  message:  {text}",
                    error_header(spec, None),
                    error_header(&actual, None),
                ));
            }
            let new = actual;
            edits.push(Edit {
                start: record.header,
                end: record.header + 1,
                lines: vec![error_header(&new, record.db.as_deref())],
            });
            None
        }
        (Kind::Query { .. }, Answer::Error { status, text, .. }) => Some(format!(
            "expected rows, got {status}: {}\n  SQL:\n{sql}",
            text.replace('\n', "\n    ")
        )),
        (
            Kind::Query {
                types,
                rowsort,
                expected,
            },
            Answer::Rows { columns, rows },
        ) => {
            let mut actual: Vec<String> = rows.iter().map(|r| render_row(r)).collect();
            let mut wanted: Vec<String> = expected
                .as_ref()
                .map(|(rows, _, _)| rows.clone())
                .unwrap_or_default();
            if *rowsort {
                actual.sort();
                wanted.sort();
            }
            let type_error = check_types(types, columns, &rows);
            let rows_ok = expected.is_some() && wanted == actual;
            if rows_ok && type_error.is_none() {
                return None;
            }
            if complete {
                let new_types = infer_types(types, columns, &rows);
                edits.push(Edit {
                    start: record.header,
                    end: record.header + 1,
                    lines: vec![query_header(&new_types, *rowsort, record.db.as_deref())],
                });
                edits.push(match expected {
                    Some((_, start, end)) => Edit {
                        start: *start,
                        end: *end,
                        lines: actual,
                    },
                    None => Edit {
                        start: record.sql_end,
                        end: record.sql_end,
                        lines: std::iter::once("----".to_string()).chain(actual).collect(),
                    },
                });
                return None;
            }
            let mut message = String::new();
            if let Some(e) = type_error {
                let _ = writeln!(message, "{e}");
            }
            if !rows_ok {
                message.push_str(if expected.is_none() {
                    "no expected rows (no ---- line): run with completion to fill them\n"
                } else {
                    "wrong rows\n"
                });
            }
            let _ = write!(
                message,
                "  SQL:\n{sql}\n  expected:\n{}\n  actual:\n{}",
                indent(&wanted.join("\n")),
                indent(&actual.join("\n"))
            );
            Some(message)
        }
        (Kind::Flush | Kind::Restart, _) => unreachable!("control records are not queries"),
    }
}

fn indent(text: &str) -> String {
    text.lines()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Runs `sql` with `format=json` (and, for an empty answer, `format=csv` to count
/// the columns); `Err` when the server could not be reached or answered nonsense.
fn ask(client: &Client, db: &str, sql: &str) -> Result<Answer, String> {
    let (status, body) = client
        .query(db, sql, "json")
        .map_err(|e| format!("the server did not answer: {e}"))?;
    if status != 200 {
        let (text, position) = match serde_json::from_str::<Value>(&body) {
            Ok(v) => (
                v["error"].as_str().unwrap_or(&body).to_string(),
                v["position"]["line"]
                    .as_u64()
                    .zip(v["position"]["column"].as_u64()),
            ),
            Err(_) => (body, None),
        };
        return Ok(Answer::Error {
            status,
            position,
            text,
        });
    }
    let rows = parse_json_rows(&body).map_err(|e| format!("unreadable answer ({e}): {body}"))?;
    let columns = match rows.first() {
        Some(row) => row.len(),
        None => {
            let (status, csv) = client
                .query(db, sql, "csv")
                .map_err(|e| format!("the server did not answer: {e}"))?;
            if status != 200 {
                return Err(format!(
                    "the json answer was 200, the csv one {status}: {csv}"
                ));
            }
            csv_header_len(csv.lines().next().unwrap_or(""))
        }
    };
    if let Some(bad) = rows.iter().position(|r| r.len() != columns) {
        return Err(format!(
            "row {bad} has {} columns, the first {columns}",
            rows[bad].len()
        ));
    }
    Ok(Answer::Rows {
        columns,
        rows: rows
            .into_iter()
            .map(|r| r.into_iter().map(|(_, c)| c).collect())
            .collect(),
    })
}

/// The number of fields of a CSV header line (quoted fields may hold commas).
fn csv_header_len(line: &str) -> usize {
    if line.is_empty() {
        return 0;
    }
    let mut fields = 1;
    let mut quoted = false;
    for c in line.chars() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => fields += 1,
            _ => {}
        }
    }
    fields
}

// ---------------------------------------------------------------------------------
// Values

/// One value of a JSON answer.
#[derive(Debug, Clone, PartialEq)]
enum Cell {
    Null,
    Bool(bool),
    /// An integer, as the server printed it.
    Int(String),
    Float(f64),
    Str(String),
}

/// Parses a `format=json` answer into rows of `(column name, value)` in the order
/// the server printed them, duplicate names kept.
fn parse_json_rows(body: &str) -> Result<Vec<Vec<(String, Cell)>>, String> {
    let mut p = JsonParser {
        text: body,
        bytes: body.as_bytes(),
        at: 0,
    };
    let mut rows = Vec::new();
    p.expect(b'[')?;
    if !p.eat(b']') {
        loop {
            rows.push(p.object()?);
            if p.eat(b']') {
                break;
            }
            p.expect(b',')?;
        }
    }
    p.skip_ws();
    if p.at != p.bytes.len() {
        return Err(format!("trailing text at byte {}", p.at));
    }
    Ok(rows)
}

struct JsonParser<'a> {
    text: &'a str,
    bytes: &'a [u8],
    at: usize,
}

impl JsonParser<'_> {
    fn skip_ws(&mut self) {
        while self.at < self.bytes.len() && self.bytes[self.at].is_ascii_whitespace() {
            self.at += 1;
        }
    }

    fn eat(&mut self, b: u8) -> bool {
        self.skip_ws();
        if self.bytes.get(self.at) == Some(&b) {
            self.at += 1;
            true
        } else {
            false
        }
    }

    fn expect(&mut self, b: u8) -> Result<(), String> {
        if self.eat(b) {
            Ok(())
        } else {
            Err(format!("expected {:?} at byte {}", b as char, self.at))
        }
    }

    fn object(&mut self) -> Result<Vec<(String, Cell)>, String> {
        self.expect(b'{')?;
        let mut row = Vec::new();
        if self.eat(b'}') {
            return Ok(row);
        }
        loop {
            self.skip_ws();
            let key = self.string()?;
            self.expect(b':')?;
            row.push((key, self.value()?));
            if self.eat(b'}') {
                return Ok(row);
            }
            self.expect(b',')?;
        }
    }

    fn string(&mut self) -> Result<String, String> {
        let start = self.at;
        if self.bytes.get(start) != Some(&b'"') {
            return Err(format!("expected a string at byte {start}"));
        }
        let mut i = start + 1;
        while i < self.bytes.len() {
            match self.bytes[i] {
                b'\\' => i += 2,
                b'"' => {
                    self.at = i + 1;
                    return serde_json::from_str(&self.text[start..=i])
                        .map_err(|e| format!("string at byte {start}: {e}"));
                }
                _ => i += 1,
            }
        }
        Err(format!("unterminated string at byte {start}"))
    }

    fn value(&mut self) -> Result<Cell, String> {
        self.skip_ws();
        let rest = &self.text[self.at..];
        for (word, cell) in [
            ("null", Cell::Null),
            ("true", Cell::Bool(true)),
            ("false", Cell::Bool(false)),
        ] {
            if rest.starts_with(word) {
                self.at += word.len();
                return Ok(cell);
            }
        }
        match self.bytes.get(self.at) {
            Some(b'"') => self.string().map(Cell::Str),
            Some(b'-' | b'0'..=b'9') => {
                let len = rest
                    .find(|c: char| !matches!(c, '-' | '+' | '.' | 'e' | 'E' | '0'..='9'))
                    .unwrap_or(rest.len());
                let token = &rest[..len];
                self.at += len;
                if token.contains(['.', 'e', 'E']) {
                    token
                        .parse()
                        .map(Cell::Float)
                        .map_err(|e| format!("number {token}: {e}"))
                } else {
                    Ok(Cell::Int(token.to_string()))
                }
            }
            _ => Err(format!(
                "unexpected value at byte {} (nested values are not supported)",
                self.at
            )),
        }
    }
}

/// A row as one line: values separated by single spaces.
fn render_row(row: &[Cell]) -> String {
    row.iter().map(render).collect::<Vec<_>>().join(" ")
}

fn render(cell: &Cell) -> String {
    match cell {
        Cell::Null => "NULL".into(),
        Cell::Bool(b) => b.to_string(),
        Cell::Int(s) => s.clone(),
        Cell::Float(f) => format_float(*f),
        Cell::Str(s) if s.is_empty() => "(empty)".into(),
        Cell::Str(s) => s
            .replace('\n', "\\n")
            .replace('\t', "\\t")
            .replace('\r', "\\r"),
    }
}

/// A float rounded to 9 significant digits, in its shortest form without an
/// exponent, `.0` added to whole numbers.
pub fn format_float(v: f64) -> String {
    if v == 0.0 || !v.is_finite() {
        return if v.is_finite() {
            "0.0".into()
        } else {
            v.to_string()
        };
    }
    let rounded: f64 = format!("{v:.8e}").parse().unwrap_or(v);
    let s = format!("{rounded}");
    if s.contains('.') {
        s
    } else {
        s + ".0"
    }
}

/// `2025-12-01T00:00:00Z`, with an optional fraction.
fn is_timestamp(s: &str) -> bool {
    let b = s.as_bytes();
    let digits =
        |r: std::ops::Range<usize>| b.get(r).is_some_and(|d| d.iter().all(u8::is_ascii_digit));
    if b.len() < 20 || !s.ends_with('Z') {
        return false;
    }
    let shape = digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && b[10] == b'T'
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19);
    let tail = &b[19..b.len() - 1];
    shape
        && (tail.is_empty()
            || (tail[0] == b'.' && tail.len() > 1 && tail[1..].iter().all(u8::is_ascii_digit)))
}

fn fits(letter: char, cell: &Cell) -> bool {
    match (letter, cell) {
        (_, Cell::Null) => true,
        ('T', Cell::Str(_)) => true,
        ('D', Cell::Str(s)) => is_timestamp(s),
        ('I', Cell::Int(_)) => true,
        ('R', Cell::Float(_)) => true,
        ('B', Cell::Bool(_)) => true,
        _ => false,
    }
}

fn check_types(types: &str, columns: usize, rows: &[Vec<Cell>]) -> Option<String> {
    let letters: Vec<char> = types.chars().collect();
    if letters.len() != columns {
        return Some(format!(
            "the record declares {} columns ({types}), the answer has {columns}",
            letters.len()
        ));
    }
    for (r, row) in rows.iter().enumerate() {
        for (c, (letter, cell)) in letters.iter().zip(row).enumerate() {
            if !fits(*letter, cell) {
                return Some(format!(
                    "column {} is declared {letter}, but row {} holds {}",
                    c + 1,
                    r + 1,
                    describe(cell)
                ));
            }
        }
    }
    None
}

fn describe(cell: &Cell) -> String {
    match cell {
        Cell::Null => "NULL".into(),
        Cell::Bool(b) => format!("the boolean {b}"),
        Cell::Int(s) => format!("the integer {s}"),
        Cell::Float(f) => format!("the float {f}"),
        Cell::Str(s) => format!("the string {s:?}"),
    }
}

/// The types of an answer's columns: the letter of the values (`D` for strings
/// that are all timestamps, else `T`), or the declared letter when every value fits
/// it and it is not a `T` that could be a `D`; an all-NULL column keeps its letter
/// (or becomes `T`).
fn infer_types(declared: &str, columns: usize, rows: &[Vec<Cell>]) -> String {
    let declared: Vec<char> = declared.chars().collect();
    (0..columns)
        .map(|c| {
            let values: Vec<&Cell> = rows
                .iter()
                .map(|r| &r[c])
                .filter(|v| **v != Cell::Null)
                .collect();
            let dates = !values.is_empty() && values.iter().all(|v| fits('D', v));
            if declared.len() == columns
                && values.iter().all(|v| fits(declared[c], v))
                && !(declared[c] == 'T' && dates)
            {
                return declared[c];
            }
            match values.first() {
                None => 'T',
                Some(Cell::Bool(_)) => 'B',
                Some(Cell::Int(_)) => 'I',
                Some(Cell::Float(_)) => 'R',
                Some(_) if dates => 'D',
                Some(_) => 'T',
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_print_with_nine_significant_digits() {
        assert_eq!(format_float(17.2), "17.2");
        assert_eq!(format_float(-182.5), "-182.5");
        assert_eq!(format_float(3.0), "3.0");
        assert_eq!(format_float(1.0 / 3.0), "0.333333333");
        assert_eq!(format_float(6.033333333333332), "6.03333333");
        assert_eq!(format_float(6.033333333333333), "6.03333333");
        assert_eq!(format_float(-0.0), "0.0");
        assert_eq!(format_float(123456789012.0), "123456789000.0");
        assert_eq!(format_float(0.1 + 0.2), "0.3");
    }

    #[test]
    fn json_rows_keep_order_and_duplicates() {
        let rows =
            parse_json_rows(r#"[{"b":1,"a":"x\"y","b":2.5,"n":null,"t":true,"e":""}]"#).unwrap();
        let names: Vec<&str> = rows[0].iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["b", "a", "b", "n", "t", "e"]);
        let cells: Vec<Cell> = rows[0].iter().map(|(_, c)| c.clone()).collect();
        assert_eq!(render_row(&cells), "1 x\"y 2.5 NULL true (empty)");
        assert_eq!(parse_json_rows("[]").unwrap().len(), 0);
    }

    #[test]
    fn records_parse_and_complete() {
        let text = "# c\nquery IT rowsort\nSELECT 1\n----\n1 a\n\nstatement error db=x 404 @1:2 not found\nSELECT 1\n\ncontrol flush\n\nquery I\nSELECT 2\n";
        let records = parse(text).unwrap();
        assert_eq!(records.len(), 4);
        assert_eq!(records[1].db.as_deref(), Some("x"));
        assert_eq!(
            records[1].kind,
            Kind::Error(ErrorSpec {
                keyword: "statement".into(),
                status: Some(404),
                position: Some((1, 2)),
                text: "not found".into()
            })
        );
        let edits = vec![Edit {
            start: records[3].sql_end,
            end: records[3].sql_end,
            lines: vec!["----".into(), "2".into()],
        }];
        assert!(apply_edits(text, edits).ends_with("query I\nSELECT 2\n----\n2\n"));
        assert_eq!(csv_header_len("a,\"b,c\",d"), 3);
        assert!(is_timestamp("2025-12-01T00:00:00Z"));
        assert!(is_timestamp("2025-12-01T00:00:00.5Z"));
        assert!(!is_timestamp("2025-12-01"));
    }
}
