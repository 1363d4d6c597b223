//! The write-ahead log: length-prefixed, checksummed records in numbered local files.
//!
//! A file starts with an 8-byte magic; each record is
//! `[u32 LE payload length][u32 LE crc32 of payload][payload]`. One record holds one
//! acknowledged write: a database name and an Arrow IPC stream per table.
//!
//! Promise: a record is durable once [`WalWriter::sync`] returns after it was
//! appended. On open, a torn tail (a record cut short, or bytes that fail the
//! checksum) is cut off and logged; the records before it are replayed.

use std::fs::{self, File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use datafusion::arrow::buffer::Buffer;
use datafusion::arrow::error::ArrowError;
use datafusion::arrow::ipc::reader::StreamDecoder;
use datafusion::arrow::ipc::writer::StreamWriter;
use datafusion::arrow::record_batch::RecordBatch;

use crate::error::{Result, StorageError};
use crate::files::sync_dir;
use crate::paths;

const MAGIC: &[u8; 8] = b"CTSDBWAL";
const HEADER_LEN: usize = 8;
const FORMAT_VERSION: u8 = 1;

/// One write as the WAL records it.
#[derive(Debug, Clone)]
pub struct WalEntry {
    /// The database written to.
    pub db: String,
    /// Table name and its rows.
    pub tables: Vec<(String, RecordBatch)>,
}

impl WalEntry {
    /// Encodes the entry as a record payload.
    ///
    /// Each table's Arrow IPC stream is written straight after its length, which is
    /// filled in once known, into a payload sized up front by the batches' memory:
    /// the payload of a large write is neither regrown nor copied.
    pub fn encode(&self) -> Result<Vec<u8>> {
        let arrays: usize = self
            .tables
            .iter()
            .map(|(_, b)| b.get_array_memory_size())
            .sum();
        let mut out = Vec::with_capacity(256 + arrays + 1024 * self.tables.len());
        out.push(FORMAT_VERSION);
        put_bytes(&mut out, self.db.as_bytes());
        out.extend_from_slice(&(self.tables.len() as u32).to_le_bytes());
        for (name, batch) in &self.tables {
            put_bytes(&mut out, name.as_bytes());
            let at = out.len();
            out.extend_from_slice(&[0; 4]);
            {
                let mut w = StreamWriter::try_new(&mut out, batch.schema_ref())?;
                w.write(batch)?;
                w.finish()?;
            }
            let len = u32::try_from(out.len() - at - 4).map_err(|_| {
                StorageError::InvalidInput(format!(
                    "table {name} of the write is too large for one WAL record"
                ))
            })?;
            out[at..at + 4].copy_from_slice(&len.to_le_bytes());
        }
        Ok(out)
    }

    /// Decodes a record payload.
    pub fn decode(payload: &[u8]) -> Result<Self> {
        let mut r = Reader { buf: payload };
        let version = r.take(1)?[0];
        if version != FORMAT_VERSION {
            return Err(StorageError::Corrupt(format!(
                "WAL record format {version}, expected {FORMAT_VERSION}"
            )));
        }
        let db = r.string()?;
        let n = u32::from_le_bytes(r.take(4)?.try_into().expect("4 bytes")) as usize;
        let mut tables = Vec::with_capacity(n.min(1024));
        for _ in 0..n {
            let name = r.string()?;
            for batch in decode_ipc(r.bytes()?)? {
                tables.push((name.clone(), batch));
            }
        }
        Ok(Self { db, tables })
    }
}

/// The batches of one Arrow IPC stream, or why it is corrupt.
///
/// A push decoder, not a `StreamReader`: the reader allocates the lengths a
/// message's header states before reading it, so a corrupt length would ask for
/// gigabytes; the decoder only ever holds the bytes it was given. Arrow's IPC
/// decoding trusts the offsets and types in a message and panics on some corrupt
/// ones (a buffer past the body's end, say); a record is only decoded once its
/// checksum held, so such a panic means corruption the checksum missed, and it is
/// reported as that rather than taking the process down.
fn decode_ipc(ipc: &[u8]) -> Result<Vec<RecordBatch>> {
    let corrupt = |e: ArrowError| StorageError::Corrupt(format!("WAL record's rows: {e}"));
    let decode = || -> Result<Vec<RecordBatch>> {
        let mut decoder = StreamDecoder::new();
        let mut buffer = Buffer::from(ipc);
        let mut batches = Vec::new();
        while let Some(batch) = decoder.decode(&mut buffer).map_err(corrupt)? {
            batches.push(batch);
        }
        decoder.finish().map_err(corrupt)?;
        Ok(batches)
    };
    // Nothing outlives the closure but its answer, so no state is left half-changed.
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(decode)).unwrap_or_else(|_| {
        Err(StorageError::Corrupt(
            "WAL record's rows do not decode (Arrow refused them)".into(),
        ))
    })
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.buf.len() < n {
            return Err(StorageError::Corrupt(
                "WAL record shorter than it says".into(),
            ));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    fn bytes(&mut self) -> Result<&'a [u8]> {
        let n = u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")) as usize;
        self.take(n)
    }
    fn string(&mut self) -> Result<String> {
        String::from_utf8(self.bytes()?.to_vec())
            .map_err(|_| StorageError::Corrupt("WAL record has a non-UTF-8 name".into()))
    }
}

/// Appends records to the newest WAL file.
///
/// Not thread-safe by itself: the engine's single WAL thread owns it, which is what
/// makes group commit possible (many appends, one [`WalWriter::sync`]). After a
/// failed append or sync, [`WalWriter::discard_unsynced`] cuts the file back to
/// its last durable length, so no later record follows a broken one.
pub struct WalWriter {
    dir: PathBuf,
    seq: u64,
    file: File,
    buf: Vec<u8>,
    /// Bytes of the file holding acknowledged records: written out, and fsynced
    /// unless the writes asked for no sync.
    acked_len: u64,
    /// Bytes written to the file so far (durable or not).
    written_len: u64,
}

/// Appended bytes are handed to the OS once this many are waiting.
const WRITE_CHUNK: usize = 1 << 20;
/// A record payload this large is handed to the OS without being buffered.
const WRITE_DIRECT: usize = 64 << 10;

impl WalWriter {
    /// Creates WAL file `seq` in `dir` (which must exist) and makes its name durable.
    /// A file left half-made by a failed attempt is removed first.
    pub fn create(dir: &Path, seq: u64) -> Result<Self> {
        let path = paths::wal_file(dir, seq);
        let made = (|| -> Result<File> {
            let mut file = OpenOptions::new()
                .create_new(true)
                .write(true)
                .open(&path)?;
            file.write_all(MAGIC)?;
            file.sync_all()?;
            sync_dir(dir)?;
            Ok(file)
        })();
        let file = match made {
            Ok(f) => f,
            Err(e) => {
                if path.exists() {
                    let _ = fs::remove_file(&path);
                }
                return Err(e);
            }
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            seq,
            file,
            buf: Vec::with_capacity(WRITE_CHUNK),
            acked_len: HEADER_LEN as u64,
            written_len: HEADER_LEN as u64,
        })
    }

    /// Sequence number of the file being written.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Bytes in the current file, appended records included.
    pub fn bytes(&self) -> u64 {
        self.written_len + self.buf.len() as u64
    }

    /// Appends one record. Not durable until [`WalWriter::sync`].
    pub fn append(&mut self, payload: &[u8]) -> Result<()> {
        let len = u32::try_from(payload.len())
            .map_err(|_| StorageError::InvalidInput("write too large for one WAL record".into()))?;
        self.buf.extend_from_slice(&len.to_le_bytes());
        self.buf
            .extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
        if payload.len() >= WRITE_DIRECT {
            // A large payload goes to the OS as it is, after what is waiting
            // (its header included), not copied into the buffer first.
            self.write_out()?;
            self.file.write_all(payload)?;
            self.written_len += payload.len() as u64;
            return Ok(());
        }
        self.buf.extend_from_slice(payload);
        if self.buf.len() >= WRITE_CHUNK {
            self.write_out()?;
        }
        Ok(())
    }

    fn write_out(&mut self) -> Result<()> {
        self.file.write_all(&self.buf)?;
        self.written_len += self.buf.len() as u64;
        self.buf.clear();
        Ok(())
    }

    /// Writes out appended records; with `fsync`, also makes them durable.
    pub fn sync(&mut self, fsync: bool) -> Result<()> {
        self.write_out()?;
        if fsync {
            self.file.sync_data()?;
        }
        self.acked_len = self.written_len;
        Ok(())
    }

    /// Drops every record appended since the last successful [`WalWriter::sync`],
    /// from memory and from the file. Call it after a failed append or sync: those
    /// records were not acknowledged, and a later record must never follow a broken one.
    pub fn discard_unsynced(&mut self) -> Result<()> {
        self.buf.clear();
        self.file.set_len(self.acked_len)?;
        self.file.seek(SeekFrom::Start(self.acked_len))?;
        self.file.sync_data()?;
        self.written_len = self.acked_len;
        Ok(())
    }

    /// Closes the current file (durably) and starts the next; returns the closed file's sequence.
    pub fn rotate(&mut self) -> Result<u64> {
        self.sync(true)?;
        let closed = self.seq;
        *self = Self::create(&self.dir, closed + 1)?;
        Ok(closed)
    }
}

/// The WAL files present in `dir`, oldest first.
pub fn list_files(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if let Some(seq) = entry.file_name().to_str().and_then(paths::wal_seq) {
            out.push((seq, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// What replaying one file found.
#[derive(Debug, Default)]
pub struct ReplayedFile {
    /// The decoded entries, in write order.
    pub entries: Vec<WalEntry>,
    /// Bytes cut off the end because they did not form a whole, valid record.
    pub torn_bytes: u64,
}

/// Reads every whole record of one WAL file, cutting off a torn tail.
pub fn replay_file(path: &Path) -> Result<ReplayedFile> {
    let data = fs::read(path)?;
    let mut out = ReplayedFile::default();
    if data.len() < HEADER_LEN || &data[..HEADER_LEN] != MAGIC {
        // Created but its header never reached the disk: nothing in it was acknowledged.
        out.torn_bytes = data.len() as u64;
        truncate(path, 0)?;
        return Ok(out);
    }
    let mut pos = HEADER_LEN;
    while pos < data.len() {
        let Some(good) = next_record(&data[pos..]) else {
            break;
        };
        match WalEntry::decode(good) {
            Ok(entry) => out.entries.push(entry),
            // Its checksum held, so the records after it are sound: skip only this one.
            Err(e) => {
                tracing::error!(file = %path.display(), offset = pos, error = %e, "skipping a WAL record that does not decode")
            }
        }
        pos += 8 + good.len();
    }
    if pos < data.len() {
        out.torn_bytes = (data.len() - pos) as u64;
        tracing::warn!(file = %path.display(), offset = pos, bytes = out.torn_bytes, "cut off a torn WAL tail");
        truncate(path, pos as u64)?;
    }
    Ok(out)
}

/// The payload of the record at the start of `data`, if it is whole and its checksum holds.
fn next_record(data: &[u8]) -> Option<&[u8]> {
    let len = u32::from_le_bytes(data.get(0..4)?.try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(data.get(4..8)?.try_into().ok()?);
    let payload = data.get(8..8 + len)?;
    (crc32fast::hash(payload) == crc).then_some(payload)
}

fn truncate(path: &Path, len: u64) -> Result<()> {
    let f = OpenOptions::new().write(true).open(path)?;
    f.set_len(len)?;
    f.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod fuzz;

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{Float64Array, StringArray};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use std::sync::Arc;

    fn entry(v: f64) -> WalEntry {
        let schema = Arc::new(Schema::new(vec![
            Field::new("device", DataType::Utf8, true),
            Field::new("tilt", DataType::Float64, true),
        ]));
        let batch = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(vec!["mh-1"])),
                Arc::new(Float64Array::from(vec![v])),
            ],
        )
        .unwrap();
        WalEntry {
            db: "city".into(),
            tables: vec![("manhole".into(), batch)],
        }
    }

    fn write_three(dir: &Path) -> PathBuf {
        let mut w = WalWriter::create(dir, 1).unwrap();
        for v in [1.0, 2.0, 3.0] {
            w.append(&entry(v).encode().unwrap()).unwrap();
        }
        w.sync(true).unwrap();
        paths::wal_file(dir, 1)
    }

    #[test]
    fn records_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_three(dir.path());
        let r = replay_file(&path).unwrap();
        assert_eq!(r.entries.len(), 3);
        assert_eq!(r.torn_bytes, 0);
        assert_eq!(r.entries[2].tables[0].1.num_rows(), 1);
    }

    #[test]
    fn every_cut_point_keeps_the_whole_records_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_three(dir.path());
        let full = fs::read(&path).unwrap();
        let record_len = (full.len() - HEADER_LEN) / 3;
        for cut in 0..full.len() {
            fs::write(&path, &full[..cut]).unwrap();
            let r = replay_file(&path).unwrap();
            let whole = cut.saturating_sub(HEADER_LEN) / record_len;
            assert_eq!(r.entries.len(), whole, "cut at {cut}");
            let kept = fs::metadata(&path).unwrap().len() as usize;
            let expect = if cut < HEADER_LEN {
                0
            } else {
                HEADER_LEN + whole * record_len
            };
            assert_eq!(kept, expect, "file truncated to whole records at cut {cut}");
        }
    }

    #[test]
    fn unsynced_records_are_discarded_after_a_failure() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = WalWriter::create(dir.path(), 1).unwrap();
        w.append(&entry(1.0).encode().unwrap()).unwrap();
        w.sync(true).unwrap();
        let durable = w.bytes();
        w.append(&entry(2.0).encode().unwrap()).unwrap();
        // Written out by a chunk-sized append, say, but never acknowledged.
        w.write_out().unwrap();
        w.discard_unsynced().unwrap();
        assert_eq!(w.bytes(), durable);
        w.append(&entry(3.0).encode().unwrap()).unwrap();
        w.sync(true).unwrap();
        let r = replay_file(&paths::wal_file(dir.path(), 1)).unwrap();
        let values: Vec<f64> = r
            .entries
            .iter()
            .map(|e| {
                e.tables[0]
                    .1
                    .column(1)
                    .as_any()
                    .downcast_ref::<Float64Array>()
                    .unwrap()
                    .value(0)
            })
            .collect();
        assert_eq!(
            values,
            vec![1.0, 3.0],
            "the discarded record is gone and nothing follows a broken one"
        );
        assert_eq!(r.torn_bytes, 0);
    }

    /// An entry of `rows` rows, every value `v`.
    fn entry_of(rows: usize, v: f64) -> WalEntry {
        let mut e = entry(v);
        let device = StringArray::from(vec!["mh-1"; rows]);
        let tilt = Float64Array::from(vec![v; rows]);
        e.tables[0].1 = RecordBatch::try_new(
            e.tables[0].1.schema(),
            vec![Arc::new(device), Arc::new(tilt)],
        )
        .unwrap();
        e
    }

    #[test]
    fn large_records_skip_the_buffer_and_keep_their_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = WalWriter::create(dir.path(), 1).unwrap();
        let sizes = [1, 20_000, 2, 30_000, 3];
        for (i, &rows) in sizes.iter().enumerate() {
            let payload = entry_of(rows, i as f64).encode().unwrap();
            assert_eq!(payload.len() >= WRITE_DIRECT, rows > 10, "record {i}");
            w.append(&payload).unwrap();
        }
        w.sync(true).unwrap();
        let durable = w.bytes();
        // A large record appended and written out, then discarded: it is cut.
        w.append(&entry_of(20_000, 9.0).encode().unwrap()).unwrap();
        w.discard_unsynced().unwrap();
        assert_eq!(w.bytes(), durable);
        w.append(&entry_of(1, 5.0).encode().unwrap()).unwrap();
        w.sync(true).unwrap();
        let r = replay_file(&paths::wal_file(dir.path(), 1)).unwrap();
        assert_eq!(r.torn_bytes, 0);
        let got: Vec<(usize, f64)> = r
            .entries
            .iter()
            .map(|e| {
                let b = &e.tables[0].1;
                let tilt = b.column(1).as_any().downcast_ref::<Float64Array>().unwrap();
                (b.num_rows(), tilt.value(b.num_rows() - 1))
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (1, 0.0),
                (20_000, 1.0),
                (2, 2.0),
                (30_000, 3.0),
                (3, 4.0),
                (1, 5.0)
            ]
        );
    }

    #[test]
    fn a_failed_create_leaves_no_file_behind() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no-such-dir");
        assert!(WalWriter::create(&missing, 1).is_err());
        assert!(!paths::wal_file(&missing, 1).exists());
    }

    #[test]
    fn garbage_after_the_last_record_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_three(dir.path());
        let mut data = fs::read(&path).unwrap();
        let good = data.len();
        data.extend_from_slice(&[0xAB; 37]);
        fs::write(&path, &data).unwrap();
        let r = replay_file(&path).unwrap();
        assert_eq!(r.entries.len(), 3);
        assert_eq!(r.torn_bytes, 37);
        assert_eq!(fs::metadata(&path).unwrap().len() as usize, good);
    }

    /// Found by `wal::fuzz`: one flipped bit in a record's Arrow IPC (past the
    /// checksum, as a collision would be) made Arrow panic slicing a buffer past
    /// the body's end; and a length field holding a huge value made the stream
    /// reader allocate it before reading. Every bit and every such length of a
    /// small record now decodes or is reported corrupt.
    #[test]
    fn a_corrupt_record_decodes_or_is_corrupt_but_never_panics() {
        use datafusion::arrow::array::{TimestampNanosecondArray, UInt64Array};
        let schema = Arc::new(Schema::new(vec![
            Field::new(
                "c0",
                DataType::Timestamp(
                    datafusion::arrow::datatypes::TimeUnit::Nanosecond,
                    Some("UTC".into()),
                ),
                true,
            ),
            Field::new("c1", DataType::UInt64, true),
        ]));
        let batch = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(TimestampNanosecondArray::from(vec![165_007_687]).with_timezone("UTC")),
                Arc::new(UInt64Array::from(vec![14_418_234_286_687_530_938])),
            ],
        )
        .unwrap();
        let payload = WalEntry {
            db: "金aa_金".into(),
            tables: vec![(",  金a".into(), batch)],
        }
        .encode()
        .unwrap();
        let check = |damaged: &[u8]| match WalEntry::decode(damaged) {
            Ok(_) | Err(StorageError::Corrupt(_)) => {}
            Err(e) => panic!("not reported as corrupt: {e:?}"),
        };
        for i in 0..payload.len() {
            for bit in 0..8 {
                let mut damaged = payload.clone();
                damaged[i] ^= 1 << bit;
                check(&damaged);
            }
        }
        for i in 0..payload.len() - 3 {
            for huge in [u32::MAX, i32::MAX as u32, 0x8000_0000] {
                let mut damaged = payload.clone();
                damaged[i..i + 4].copy_from_slice(&huge.to_le_bytes());
                check(&damaged);
            }
        }
    }

    #[test]
    fn a_flipped_bit_fails_the_checksum() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_three(dir.path());
        let mut data = fs::read(&path).unwrap();
        let last = data.len() - 3;
        data[last] ^= 1;
        fs::write(&path, &data).unwrap();
        assert_eq!(replay_file(&path).unwrap().entries.len(), 2);
    }
}
