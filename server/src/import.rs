//! `citytsdb import`: files of line protocol, CSV or JSON lines into a running
//! server or straight into a data directory.
//!
//! 1. Every file is checked before anything is written: it opens, its format is
//!    known (from `--format` or its extension), and the server answers.
//! 2. A reader thread reads the files in order (gunzipping any that start with
//!    gzip's magic bytes), turns CSV records and JSON objects into line protocol
//!    (`import/csv.rs`, `import/jsonl.rs`, both through `import/line.rs`), and cuts
//!    the lines into batches of `--batch-lines`, remembering each line's FILE:LINE.
//!    A record that cannot be converted is a rejection; the import goes on.
//! 3. The main thread writes the batches one at a time, in order, so a later line
//!    wins over an earlier one exactly as in one big write (`import/sink.rs`): to
//!    `/api/v1/write` (gzipped), or through the same parse, validate and build
//!    path as the server (`http::write::prepare`) into a storage engine opened on
//!    the data directory, which is flushed and closed at the end.
//! 4. Each rejected line the server or engine names is mapped back to its FILE:LINE;
//!    a summary on stderr gives the rows written, the lines rejected and the first
//!    of them. Exit code 0: everything written; 1: stopped by an error; 2: some
//!    lines rejected.

mod csv;
mod jsonl;
mod line;
mod sink;

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::time::{Duration, Instant};

use citytsdb_ingest::Precision;
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use self::sink::{DataDirSink, HttpSink, Sink};

/// Batches are also cut at this many bytes of line protocol, far below the
/// server's default body limit, so a file of very long lines still fits.
const MAX_BATCH_BYTES: usize = 8 << 20;
/// Rejected lines named in the summary.
const SHOWN_REJECTIONS: usize = 10;
/// Longest text of a rejected line shown.
const MAX_TEXT: usize = 200;
/// Batches converted ahead of the one being written.
const READ_AHEAD: usize = 2;

const EXIT_CODES: &str = "\
Exit status: 0 when every line was written; 1 when the import stopped on an error
(an unreadable file, a CSV header it cannot use, an unreachable server, a refused
token; lines before it may be written); 2 when it finished but some lines were
rejected (the summary names the first of them as FILE:LINE: reason: text).";

/// Flags of `citytsdb import`.
#[derive(Debug, Clone, Args)]
#[command(after_help = EXIT_CODES)]
pub struct ImportArgs {
    /// Files to load, in order; `-` reads standard input. Gzipped files (and input)
    /// are gunzipped.
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
    /// Database to write to (created on the first write)
    #[arg(long, env = "CITYTSDB_DB")]
    pub db: String,
    /// Format of every file [default: from each file's extension: .lp/.txt line
    /// protocol, .csv, .jsonl/.ndjson/.json; a trailing .gz is looked through;
    /// standard input: lp]
    #[arg(long, value_enum)]
    pub format: Option<Format>,
    /// The server to write to; also CITYTSDB_URL [default: http://127.0.0.1:8181]
    // The variables are read in `run`, so that one set for other commands does
    // not conflict with --data-dir.
    #[arg(long)]
    pub url: Option<String>,
    /// A token with write:DB, when the server has auth on; also CITYTSDB_TOKEN
    #[arg(long)]
    pub token: Option<String>,
    /// Write straight into this data directory instead of a server; no server may
    /// be running on it
    #[arg(long, conflicts_with_all = ["url", "token"])]
    pub data_dir: Option<PathBuf>,
    /// With --data-dir: the object store the server uses, as serve's --store
    /// [default: file://<data-dir>/store]
    #[arg(long, requires = "data_dir")]
    pub store: Option<String>,
    /// Unit of line-protocol timestamps and of integer times in CSV and JSON lines
    #[arg(long, default_value = "ns", value_parser = ["ns", "us", "ms", "s"])]
    pub precision: String,
    /// CSV: the columns that are tags. JSON lines: the keys that are tags [default:
    /// every key with a string value]
    #[arg(long, value_delimiter = ',', value_name = "COLUMNS")]
    pub tags: Option<Vec<String>>,
    /// CSV and JSON lines: the table of rows that do not name one in a `table` (or
    /// `measurement`) column or key
    #[arg(long)]
    pub table: Option<String>,
    /// Lines per write
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1..))]
    pub batch_lines: u64,
    /// No progress bar (there is none either when stderr is not a terminal)
    #[arg(long)]
    pub no_progress: bool,
}

/// The formats `citytsdb import` reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// InfluxDB line protocol, sent as it is.
    Lp,
    /// A header row, then one row per reading.
    Csv,
    /// One JSON object per line.
    Jsonl,
}

impl Format {
    /// The format a file name's extension says, looking through a `.gz`.
    fn of(path: &Path) -> Option<Format> {
        let name = path.file_name()?.to_str()?.to_ascii_lowercase();
        let name = name.strip_suffix(".gz").unwrap_or(&name);
        let ext = name.rsplit_once('.')?.1;
        match ext {
            "lp" | "txt" | "line" => Some(Format::Lp),
            "csv" => Some(Format::Csv),
            "jsonl" | "ndjson" | "json" => Some(Format::Jsonl),
            _ => None,
        }
    }
}

/// One input, checked before the import starts.
struct Input {
    /// As the user named it; `-` is standard input.
    path: PathBuf,
    format: Format,
    /// Bytes on disk, when known.
    size: Option<u64>,
}

impl Input {
    fn name(&self) -> String {
        if self.is_stdin() {
            "<stdin>".to_string()
        } else {
            self.path.display().to_string()
        }
    }

    fn is_stdin(&self) -> bool {
        self.path.as_os_str() == "-"
    }
}

/// A line the import did not write: where, why, and what it said.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rejection {
    /// Index of the file in the command line.
    file: usize,
    /// 1-based line in that file (a CSV record's first line).
    line: usize,
    reason: String,
    text: String,
}

impl Rejection {
    fn new(file: usize, line: usize, reason: impl Into<String>, text: &str) -> Self {
        Self {
            file,
            line,
            reason: reason.into(),
            text: shorten(text),
        }
    }
}

/// Cuts a line to [`MAX_TEXT`] characters for the summary.
fn shorten(text: &str) -> String {
    let text = text.trim_end_matches(['\n', '\r']);
    match text.char_indices().nth(MAX_TEXT) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text.to_string(),
    }
}

/// Line protocol on its way to a write, with where each line came from.
#[derive(Debug, Default)]
struct Batch {
    /// Index of the file the lines come from.
    file: usize,
    /// The unit of the lines' timestamps.
    precision: Precision,
    /// Lines of line protocol, each ended by `\n`; gzipped when `gzipped`.
    body: Vec<u8>,
    gzipped: bool,
    /// The source line of each line of `body`.
    origins: Vec<usize>,
    /// Records of the file that could not be turned into line protocol.
    rejected: Vec<Rejection>,
}

/// Counts and the first rejections, kept as the batches are written.
#[derive(Debug, Default)]
struct Tally {
    written: u64,
    rejected: u64,
    /// The first rejected lines in file and line order, at most [`SHOWN_REJECTIONS`].
    first: Vec<Rejection>,
}

impl Tally {
    fn reject(&mut self, r: Rejection) {
        self.rejected += 1;
        if self.first.len() == SHOWN_REJECTIONS
            && self
                .first
                .last()
                .is_some_and(|last| (last.file, last.line) <= (r.file, r.line))
        {
            return;
        }
        let at = self
            .first
            .partition_point(|x| (x.file, x.line) <= (r.file, r.line));
        self.first.insert(at, r);
        self.first.truncate(SHOWN_REJECTIONS);
    }
}

/// Runs the import and prints its summary; the exit code says how it went.
pub fn run(args: &ImportArgs) -> ExitCode {
    let started = Instant::now();
    let inputs = match check_inputs(args) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let precision = Precision::parse(&args.precision).unwrap_or_default();
    let sink: Result<Box<dyn Sink>, String> = match &args.data_dir {
        Some(dir) => DataDirSink::open(dir, args.store.as_deref(), &args.db)
            .map(|s| Box::new(s) as Box<dyn Sink>),
        None => {
            let url = args
                .url
                .clone()
                .or_else(|| std::env::var("CITYTSDB_URL").ok())
                .unwrap_or_else(|| "http://127.0.0.1:8181".to_string());
            let token = args
                .token
                .clone()
                .or_else(|| std::env::var("CITYTSDB_TOKEN").ok());
            HttpSink::connect(&url, token.as_deref(), &args.db)
                .map(|s| Box::new(s) as Box<dyn Sink>)
        }
    };
    let mut sink = match sink {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let bar = progress_bar(&inputs, args.no_progress);
    let options = ReadOptions {
        precision,
        tags: args.tags.clone(),
        table: args.table.clone(),
        batch_lines: usize::try_from(args.batch_lines).unwrap_or(usize::MAX),
        gzip: sink.wants_gzip(),
    };
    let mut tally = Tally::default();
    let (tx, rx) = sync_channel(READ_AHEAD);
    let mut failure = std::thread::scope(|scope| {
        let reader = scope.spawn(|| read_all(&inputs, &options, &bar, tx));
        let written = write_all(sink.as_mut(), rx, &mut tally, &bar, started);
        // The reader stops at its next batch once the channel is gone.
        let read = reader
            .join()
            .map_err(|_| "the reader thread panicked".to_string());
        written.err().or(read.err())
    });
    if let Err(e) = sink.finish() {
        failure.get_or_insert(e);
    }
    bar.finish_and_clear();
    eprint!(
        "{}",
        summary(&inputs, &tally, started.elapsed(), failure.is_some())
    );
    match failure {
        Some(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
        None if tally.rejected > 0 => ExitCode::from(2),
        None => ExitCode::SUCCESS,
    }
}

/// Checks every file before anything is written: each opens and has a format.
fn check_inputs(args: &ImportArgs) -> Result<Vec<Input>, String> {
    if args.db.is_empty() {
        return Err("--db: the database name is empty".into());
    }
    if args.files.iter().filter(|p| p.as_os_str() == "-").count() > 1 {
        return Err("standard input (-) can be named only once".into());
    }
    args.files
        .iter()
        .map(|path| {
            if path.as_os_str() == "-" {
                return Ok(Input {
                    path: path.clone(),
                    format: args.format.unwrap_or(Format::Lp),
                    size: None,
                });
            }
            let file = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
            let meta = file
                .metadata()
                .map_err(|e| format!("{}: {e}", path.display()))?;
            if meta.is_dir() {
                return Err(format!("{}: is a directory", path.display()));
            }
            let format = args.format.or_else(|| Format::of(path)).ok_or_else(|| {
                format!(
                    "{}: cannot tell the format from the extension; give --format lp, csv or jsonl",
                    path.display()
                )
            })?;
            Ok(Input {
                path: path.clone(),
                format,
                size: meta.is_file().then_some(meta.len()),
            })
        })
        .collect()
}

/// A bar over the bytes of every file, or a spinner when standard input is read.
fn progress_bar(inputs: &[Input], hidden: bool) -> ProgressBar {
    if hidden {
        return ProgressBar::hidden();
    }
    let total: Option<u64> = inputs.iter().map(|i| i.size).sum();
    // indicatif hides the bar itself when stderr is not a terminal.
    let bar = ProgressBar::with_draw_target(total, ProgressDrawTarget::stderr());
    let template = match total {
        Some(_) => {
            "{elapsed_precise} [{wide_bar}] {binary_bytes}/{binary_total_bytes} {msg} ETA {eta}"
        }
        None => "{spinner} {elapsed_precise} {binary_bytes} {msg}",
    };
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// What the reader needs to know besides the files.
struct ReadOptions {
    precision: Precision,
    tags: Option<Vec<String>>,
    table: Option<String>,
    batch_lines: usize,
    gzip: bool,
}

/// Reads every input in order and sends its batches, then the error that stopped
/// it, if one did.
fn read_all(
    inputs: &[Input],
    options: &ReadOptions,
    bar: &ProgressBar,
    tx: SyncSender<Result<Batch, String>>,
) {
    for (index, input) in inputs.iter().enumerate() {
        let mut out = Batcher::new(index, options, &tx);
        let result = open(input, bar).and_then(|reader| match input.format {
            Format::Lp => {
                out.precision = options.precision;
                read_lp(reader, &mut out)
            }
            Format::Csv => csv::read(reader, options, &mut out),
            Format::Jsonl => jsonl::read(reader, options, &mut out),
        });
        match result.and_then(|()| out.flush()) {
            Ok(()) => {}
            // The writer has stopped; it reports why.
            Err(Stop::WriterGone) => return,
            Err(Stop::Failed(e)) => {
                // The lines read before the error are written, then the writer
                // reports it.
                if out.flush() == Err(Stop::WriterGone) {
                    return;
                }
                let _ = tx.send(Err(format!("{}: {e}", input.name())));
                return;
            }
        }
    }
}

/// Opens an input, counting its bytes on the bar, and gunzips it if it starts
/// with gzip's magic bytes.
fn open(input: &Input, bar: &ProgressBar) -> Result<Box<dyn BufRead + Send>, Stop> {
    let raw: Box<dyn Read + Send> = if input.is_stdin() {
        Box::new(std::io::stdin())
    } else {
        Box::new(File::open(&input.path).map_err(|e| e.to_string())?)
    };
    let mut reader = BufReader::with_capacity(256 << 10, bar.wrap_read(raw));
    let head = reader.fill_buf().map_err(|e| e.to_string())?;
    if head.starts_with(&[0x1f, 0x8b]) {
        let decoder = flate2::read::MultiGzDecoder::new(reader);
        Ok(Box::new(BufReader::with_capacity(256 << 10, decoder)))
    } else {
        Ok(Box::new(reader))
    }
}

/// Reads one physical line into `buf` (without its `\n` or `\r\n`); false at the end.
fn read_line(reader: &mut dyn BufRead, buf: &mut Vec<u8>) -> Result<bool, String> {
    buf.clear();
    let n = reader
        .read_until(b'\n', buf)
        .map_err(|e| format!("reading: {e}"))?;
    if n == 0 {
        return Ok(false);
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
    }
    if buf.last() == Some(&b'\r') {
        buf.pop();
    }
    Ok(true)
}

/// Line protocol goes through as it is: the server (or engine) checks it.
fn read_lp(mut reader: Box<dyn BufRead + Send>, out: &mut Batcher<'_>) -> Result<(), Stop> {
    let mut buf = Vec::new();
    let mut line = 0;
    while read_line(reader.as_mut(), &mut buf)? {
        line += 1;
        match buf.iter().find(|&&b| !matches!(b, b' ' | b'\t')) {
            None | Some(b'#') => continue,
            Some(_) => out.push(line, &buf)?,
        }
    }
    Ok(())
}

/// Why reading a file stopped early.
#[derive(Debug, PartialEq, Eq)]
enum Stop {
    /// The writer stopped (on an error of its own): nothing more is wanted.
    WriterGone,
    /// The file cannot be read on: the import stops with this error.
    Failed(String),
}

impl From<String> for Stop {
    fn from(e: String) -> Self {
        Stop::Failed(e)
    }
}

/// Cuts one file's lines into batches and sends them.
struct Batcher<'a> {
    batch: Batch,
    precision: Precision,
    batch_lines: usize,
    gzip: bool,
    tx: &'a SyncSender<Result<Batch, String>>,
}

impl<'a> Batcher<'a> {
    fn new(file: usize, options: &ReadOptions, tx: &'a SyncSender<Result<Batch, String>>) -> Self {
        Self {
            batch: Batch {
                file,
                ..Batch::default()
            },
            // Converted formats carry nanoseconds.
            precision: Precision::Nanosecond,
            batch_lines: options.batch_lines,
            gzip: options.gzip,
            tx,
        }
    }

    /// Adds a line of line protocol (without its newline) from source line `line`.
    fn push(&mut self, line: usize, lp: &[u8]) -> Result<(), Stop> {
        self.batch.body.extend_from_slice(lp);
        self.batch.body.push(b'\n');
        self.batch.origins.push(line);
        if self.batch.origins.len() >= self.batch_lines || self.batch.body.len() >= MAX_BATCH_BYTES
        {
            self.flush()?;
        }
        Ok(())
    }

    /// Records a source record that could not be converted.
    fn reject(&mut self, line: usize, reason: impl Into<String>, text: &str) {
        self.batch
            .rejected
            .push(Rejection::new(self.batch.file, line, reason, text));
    }

    /// Sends what is gathered, if anything.
    fn flush(&mut self) -> Result<(), Stop> {
        if self.batch.origins.is_empty() && self.batch.rejected.is_empty() {
            return Ok(());
        }
        let next = Batch {
            file: self.batch.file,
            ..Batch::default()
        };
        let mut batch = std::mem::replace(&mut self.batch, next);
        batch.precision = self.precision;
        if self.gzip && !batch.body.is_empty() {
            batch.body = gzip(&batch.body).map_err(|e| format!("compressing a batch: {e}"))?;
            batch.gzipped = true;
        }
        self.tx.send(Ok(batch)).map_err(|_| Stop::WriterGone)
    }
}

fn gzip(body: &[u8]) -> std::io::Result<Vec<u8>> {
    use std::io::Write;
    let mut encoder = flate2::write::GzEncoder::new(
        Vec::with_capacity(body.len() / 4),
        flate2::Compression::fast(),
    );
    encoder.write_all(body)?;
    encoder.finish()
}

/// Writes the batches in order, tallying what was written and rejected.
fn write_all(
    sink: &mut dyn Sink,
    rx: Receiver<Result<Batch, String>>,
    tally: &mut Tally,
    bar: &ProgressBar,
    started: Instant,
) -> Result<(), String> {
    for batch in rx {
        let batch = batch?;
        for r in &batch.rejected {
            tally.reject(r.clone());
        }
        if !batch.origins.is_empty() {
            let outcome = sink.write(&batch)?;
            tally.written +=
                (batch.origins.len() - outcome.rejected.min(batch.origins.len())) as u64;
            tally.rejected += outcome.rejected.saturating_sub(outcome.listed.len()) as u64;
            for l in outcome.listed {
                let line = l
                    .line
                    .checked_sub(1)
                    .and_then(|i| batch.origins.get(i))
                    .copied()
                    .unwrap_or(0);
                tally.reject(Rejection::new(batch.file, line, l.reason, &l.text));
            }
        }
        let secs = started.elapsed().as_secs_f64().max(1e-3);
        let mut message = format!(
            "{} rows, {:.0} rows/s",
            tally.written,
            tally.written as f64 / secs
        );
        if tally.rejected > 0 {
            message.push_str(&format!(", {} rejected", tally.rejected));
        }
        bar.set_message(message);
    }
    Ok(())
}

/// The summary printed at the end; `stopped` when an error ended the import.
fn summary(inputs: &[Input], tally: &Tally, elapsed: Duration, stopped: bool) -> String {
    let secs = elapsed.as_secs_f64();
    let files = match inputs.len() {
        1 => "1 file".to_string(),
        n => format!("{n} files"),
    };
    let done = if stopped {
        "stopped importing"
    } else {
        "imported"
    };
    let mut out = format!(
        "{done} {files} after {secs:.1}s: {} rows written, {} lines rejected ({:.0} rows/s)\n",
        tally.written,
        tally.rejected,
        tally.written as f64 / secs.max(1e-3)
    );
    if !tally.first.is_empty() {
        let more = if tally.rejected > tally.first.len() as u64 {
            format!(" (first {})", tally.first.len())
        } else {
            String::new()
        };
        out.push_str(&format!("rejected lines{more}:\n"));
        for r in &tally.first {
            let name = inputs
                .get(r.file)
                .map(Input::name)
                .unwrap_or_else(|| "?".into());
            out.push_str(&format!("  {name}:{}: {}: {}\n", r.line, r.reason, r.text));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_come_from_extensions_through_gz() {
        assert_eq!(Format::of(Path::new("a/b.lp")), Some(Format::Lp));
        assert_eq!(Format::of(Path::new("b.TXT")), Some(Format::Lp));
        assert_eq!(Format::of(Path::new("b.csv.gz")), Some(Format::Csv));
        assert_eq!(Format::of(Path::new("b.ndjson")), Some(Format::Jsonl));
        assert_eq!(Format::of(Path::new("b.json.gz")), Some(Format::Jsonl));
        assert_eq!(Format::of(Path::new("b.parquet")), None);
        assert_eq!(Format::of(Path::new("noext")), None);
    }

    #[test]
    fn tally_keeps_the_first_rejections_in_file_and_line_order() {
        let mut t = Tally::default();
        for (file, line) in [(1, 5), (0, 30), (0, 2)] {
            t.reject(Rejection::new(file, line, "bad", "x"));
        }
        for line in 100..120 {
            t.reject(Rejection::new(0, line, "bad", "x"));
        }
        assert_eq!(t.rejected, 23);
        let kept: Vec<_> = t.first.iter().map(|r| (r.file, r.line)).collect();
        assert_eq!(kept.len(), SHOWN_REJECTIONS);
        assert_eq!(&kept[..3], &[(0, 2), (0, 30), (0, 100)]);
        assert_eq!(kept[9], (0, 107));
    }

    #[test]
    fn long_lines_are_shortened() {
        let long = "é".repeat(300);
        let s = shorten(&long);
        assert_eq!(s.chars().count(), MAX_TEXT + 3);
        assert!(s.ends_with("..."));
        assert_eq!(shorten("a,b\r\n"), "a,b");
    }

    #[test]
    fn line_protocol_passes_through_without_blank_and_comment_lines() {
        let (tx, rx) = sync_channel(16);
        let options = ReadOptions {
            precision: Precision::Second,
            tags: None,
            table: None,
            batch_lines: 2,
            gzip: false,
        };
        let mut out = Batcher::new(3, &options, &tx);
        out.precision = options.precision;
        let text = "m f=1 1\r\n\n# note\n  \nm f=2 2\nm f=3 3";
        read_lp(Box::new(text.as_bytes()), &mut out).unwrap();
        out.flush().unwrap();
        drop(tx);
        let batches: Vec<Batch> = rx.into_iter().map(Result::unwrap).collect();
        assert_eq!(batches.len(), 2);
        assert_eq!(batches[0].body, b"m f=1 1\nm f=2 2\n");
        assert_eq!(batches[0].origins, [1, 5]);
        assert_eq!(batches[1].origins, [6]);
        assert_eq!(batches[1].file, 3);
        assert_eq!(batches[1].precision, Precision::Second);
    }

    #[test]
    fn summary_names_file_and_line() {
        let inputs = [Input {
            path: "a.csv".into(),
            format: Format::Csv,
            size: Some(10),
        }];
        let mut tally = Tally {
            written: 7,
            ..Tally::default()
        };
        tally.reject(Rejection::new(0, 4, "3 columns, the header has 4", "1,2,3"));
        let s = summary(&inputs, &tally, Duration::from_secs(2), false);
        assert!(
            s.starts_with("imported 1 file after 2.0s: 7 rows written, 1 lines rejected"),
            "{s}"
        );
        let s = summary(&inputs, &tally, Duration::from_secs(2), true);
        assert!(s.starts_with("stopped importing 1 file after 2.0s"), "{s}");
        assert!(
            s.contains("  a.csv:4: 3 columns, the header has 4: 1,2,3\n"),
            "{s}"
        );
    }
}
