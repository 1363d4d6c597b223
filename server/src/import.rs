//! `citytsdb import`: files of line protocol, CSV or JSON lines into a running
//! server or straight into a data directory.
//!
//! 1. Every file is checked before anything is written: it opens, its format is
//!    known (from `--format` or its extension), and the server answers.
//! 2. A reader thread reads the files in order (gunzipping any that start with
//!    gzip's magic bytes), turns CSV records and JSON objects into line protocol
//!    (`citytsdb_ingest::convert`), and cuts the lines into batches of
//!    `--batch-lines`, remembering each line's FILE:LINE. A record that cannot be
//!    converted is a rejection; the import goes on.
//! 3. The main thread writes the batches one at a time, in order, so a later line
//!    wins over an earlier one exactly as in one big write (`import/sink.rs`): to
//!    `/api/v1/write` (gzipped), or through the server's own
//!    [`Ingestor`](citytsdb_ingest::Ingestor) into a storage engine opened on the
//!    data directory, which is flushed and closed at the end.
//! 4. Each rejected line the server or engine names is mapped back to its FILE:LINE;
//!    a summary on stderr gives the rows written, the lines rejected and the first
//!    of them. Exit code 0: everything written; 1: stopped by an error; 2: some
//!    lines rejected.

mod sink;

use std::fs::File;
use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::mpsc::{sync_channel, Receiver};
use std::time::{Duration, Instant};

use citytsdb_ingest::convert::{
    self, Batch, BatchSender, ConvertError, ReadOptions, Rejection, Stop,
};
use citytsdb_ingest::Precision;
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::error::{Error, Result};

use self::sink::{DataDirSink, HttpSink, Sink};

/// Rejected lines named in the summary.
const SHOWN_REJECTIONS: usize = 10;
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

impl From<Format> for convert::Format {
    fn from(f: Format) -> Self {
        match f {
            Format::Lp => convert::Format::Lp,
            Format::Csv => convert::Format::Csv,
            Format::Jsonl => convert::Format::Jsonl,
        }
    }
}

/// One input, checked before the import starts.
struct Input {
    /// As the user named it; `-` is standard input.
    path: PathBuf,
    format: convert::Format,
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
    let sink: Result<Box<dyn Sink>> = match &args.data_dir {
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
            .map_err(|_| Error::Invalid("the reader thread panicked".into()));
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
fn check_inputs(args: &ImportArgs) -> Result<Vec<Input>> {
    if args.db.is_empty() {
        return Err(Error::setting("--db", "the database name is empty"));
    }
    if args.files.iter().filter(|p| p.as_os_str() == "-").count() > 1 {
        return Err(Error::Invalid(
            "standard input (-) can be named only once".into(),
        ));
    }
    args.files
        .iter()
        .map(|path| {
            if path.as_os_str() == "-" {
                return Ok(Input {
                    path: path.clone(),
                    format: args.format.unwrap_or(Format::Lp).into(),
                    size: None,
                });
            }
            let file = File::open(path).map_err(|e| Error::io(path.display().to_string(), e))?;
            let meta = file
                .metadata()
                .map_err(|e| Error::io(path.display().to_string(), e))?;
            if meta.is_dir() {
                return Err(Error::Invalid(format!("{}: is a directory", path.display())));
            }
            let format = args
                .format
                .map(convert::Format::from)
                .or_else(|| convert::Format::of(path))
                .ok_or_else(|| {
                    Error::Invalid(format!(
                        "{}: cannot tell the format from the extension; give --format lp, csv or jsonl",
                        path.display()
                    ))
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

/// Reads every input in order and sends its batches, then the error that stopped
/// it, if one did.
fn read_all(inputs: &[Input], options: &ReadOptions, bar: &ProgressBar, tx: BatchSender) {
    for (index, input) in inputs.iter().enumerate() {
        let raw: Box<dyn Read + Send> = if input.is_stdin() {
            Box::new(std::io::stdin())
        } else {
            match File::open(&input.path) {
                Ok(f) => Box::new(f),
                Err(e) => {
                    let _ = tx.send(Err(ConvertError::from(format!("{}: {e}", input.name()))));
                    return;
                }
            }
        };
        let result = match convert::open(Box::new(bar.wrap_read(raw))) {
            Ok(reader) => convert::read(reader, input.format, index, options, &tx),
            Err(e) => Err(Stop::from(e.to_string())),
        };
        match result {
            Ok(()) => {}
            // The writer has stopped; it reports why.
            Err(Stop::ReceiverGone) => return,
            Err(Stop::Failed(e)) => {
                // The lines read before the error were sent; the writer reports it.
                let _ = tx.send(Err(ConvertError::from(format!("{}: {e}", input.name()))));
                return;
            }
        }
    }
}

/// Writes the batches in order, tallying what was written and rejected.
fn write_all(
    sink: &mut dyn Sink,
    rx: Receiver<std::result::Result<Batch, ConvertError>>,
    tally: &mut Tally,
    bar: &ProgressBar,
    started: Instant,
) -> Result<()> {
    for batch in rx {
        let batch = batch.map_err(|e| Error::Invalid(e.to_string()))?;
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
    fn summary_names_file_and_line() {
        let inputs = [Input {
            path: "a.csv".into(),
            format: convert::Format::Csv,
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
