//! Other formats in: CSV and JSON lines become line protocol, and files of line
//! protocol are cut into batches, each line remembering where it came from.
//!
//! 1. [`open`] looks through gzip (by its magic bytes, whatever the file's name).
//! 2. [`read`] reads one input in its [`Format`] (`csv.rs`, `jsonl.rs`, line
//!    protocol as it is), building each line with `line.rs`; a record that cannot
//!    be converted becomes a [`Rejection`] naming its line.
//! 3. A [`Batcher`] cuts the lines into [`Batch`]es of `batch_lines` lines (and
//!    at most [`MAX_BATCH_BYTES`]) and sends them on, in file order, for an
//!    [`Ingestor`](crate::Ingestor) or a server to write.

mod csv;
mod jsonl;
mod line;

use std::io::{self, BufRead, BufReader, Read};
use std::path::Path;
use std::sync::mpsc::SyncSender;

use crate::write::Precision;

/// Batches are also cut at this many bytes of line protocol, far below the
/// server's default body limit, so a file of very long lines still fits.
pub const MAX_BATCH_BYTES: usize = 8 << 20;
/// Longest text of a rejected line kept.
pub const MAX_TEXT: usize = 200;

/// The formats read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// InfluxDB line protocol, passed on as it is.
    Lp,
    /// A header row, then one row per reading.
    Csv,
    /// One JSON object per line.
    Jsonl,
}

impl Format {
    /// The format a file name's extension says, looking through a `.gz`.
    pub fn of(path: &Path) -> Option<Format> {
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

/// How records become lines, and how lines are batched.
#[derive(Debug, Clone)]
pub struct ReadOptions {
    /// The unit of line protocol's timestamps and of integer times in CSV and JSON.
    pub precision: Precision,
    /// CSV: the columns that are tags; JSON lines: the keys that are tags (`None`:
    /// every key with a string value).
    pub tags: Option<Vec<String>>,
    /// The table of rows that do not name one.
    pub table: Option<String>,
    /// Lines per batch.
    pub batch_lines: usize,
    /// Gzip each batch's body.
    pub gzip: bool,
}

/// A line that was not written: where, why, and what it said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// Index of the input it came from.
    pub file: usize,
    /// 1-based line in that input (a CSV record's first line).
    pub line: usize,
    /// Why.
    pub reason: String,
    /// The line, cut to [`MAX_TEXT`] characters.
    pub text: String,
}

impl Rejection {
    /// A rejection of `text`, shortened.
    pub fn new(file: usize, line: usize, reason: impl Into<String>, text: &str) -> Self {
        Self {
            file,
            line,
            reason: reason.into(),
            text: shorten(text),
        }
    }
}

/// Cuts a line to [`MAX_TEXT`] characters.
pub fn shorten(text: &str) -> String {
    let text = text.trim_end_matches(['\n', '\r']);
    match text.char_indices().nth(MAX_TEXT) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text.to_string(),
    }
}

/// Line protocol on its way to a write, with where each line came from.
#[derive(Debug, Default)]
pub struct Batch {
    /// Index of the input the lines come from.
    pub file: usize,
    /// The unit of the lines' timestamps.
    pub precision: Precision,
    /// Lines of line protocol, each ended by `\n`; gzipped when `gzipped`.
    pub body: Vec<u8>,
    /// Whether `body` is gzipped.
    pub gzipped: bool,
    /// The source line of each line of `body`.
    pub origins: Vec<usize>,
    /// Records of the input that could not be turned into line protocol.
    pub rejected: Vec<Rejection>,
}

/// An input that cannot be read on (an I/O error, a CSV header that cannot be
/// used); what came before it was sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConvertError(String);

/// Why reading an input stopped early.
#[derive(Debug, PartialEq, Eq)]
pub enum Stop {
    /// The receiver of the batches is gone (it stopped on an error of its own).
    ReceiverGone,
    /// The input cannot be read on.
    Failed(ConvertError),
}

impl From<String> for ConvertError {
    fn from(message: String) -> Self {
        Self(message)
    }
}

impl From<String> for Stop {
    fn from(e: String) -> Self {
        Stop::Failed(ConvertError(e))
    }
}

/// Where batches go.
pub type BatchSender = SyncSender<Result<Batch, ConvertError>>;

/// An input as lines: gunzipped if it starts with gzip's magic bytes.
pub fn open(raw: Box<dyn Read + Send>) -> io::Result<Box<dyn BufRead + Send>> {
    let mut reader = BufReader::with_capacity(256 << 10, raw);
    let head = reader.fill_buf()?;
    if head.starts_with(&[0x1f, 0x8b]) {
        let decoder = flate2::read::MultiGzDecoder::new(reader);
        Ok(Box::new(BufReader::with_capacity(256 << 10, decoder)))
    } else {
        Ok(Box::new(reader))
    }
}

/// Reads input number `file` in `format` and sends its batches to `tx`, the last
/// one included. On [`Stop::Failed`] the lines read before the error have been
/// sent, and the error is for the caller to report.
pub fn read(
    reader: Box<dyn BufRead + Send>,
    format: Format,
    file: usize,
    options: &ReadOptions,
    tx: &BatchSender,
) -> Result<(), Stop> {
    let mut out = Batcher::new(file, options, tx);
    let result = match format {
        Format::Lp => {
            out.precision = options.precision;
            read_lp(reader, &mut out)
        }
        Format::Csv => csv::read(reader, options, &mut out),
        Format::Jsonl => jsonl::read(reader, options, &mut out),
    };
    let flushed = out.flush();
    result.and(flushed)
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

/// Line protocol goes through as it is: the ingestor checks it.
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

/// Cuts one input's lines into batches and sends them.
struct Batcher<'a> {
    batch: Batch,
    precision: Precision,
    batch_lines: usize,
    gzip: bool,
    tx: &'a BatchSender,
}

impl<'a> Batcher<'a> {
    fn new(file: usize, options: &ReadOptions, tx: &'a BatchSender) -> Self {
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
        self.tx.send(Ok(batch)).map_err(|_| Stop::ReceiverGone)
    }
}

fn gzip(body: &[u8]) -> io::Result<Vec<u8>> {
    use std::io::Write;
    let mut encoder = flate2::write::GzEncoder::new(
        Vec::with_capacity(body.len() / 4),
        flate2::Compression::fast(),
    );
    encoder.write_all(body)?;
    encoder.finish()
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc::sync_channel;

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
}
