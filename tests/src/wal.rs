//! The write-ahead log as the contract describes it, read (and torn) from outside.
//!
//! Files are `<data-dir>/wal/<sequence as 20 digits>.wal`; each acknowledged write
//! request is one record `[u32 LE payload length][u32 LE crc32 of payload][payload]`.
//! The storage crate opens each file with the 8-byte magic [`FILE_MAGIC`]; a file
//! without it is read as records from its first byte.

use std::fs;
use std::path::{Path, PathBuf};

/// Length of a record's header: payload length and checksum.
pub const RECORD_HEADER: u64 = 8;

/// The magic a WAL file may start with, before its first record.
pub const FILE_MAGIC: &[u8; 8] = b"CTSDBWAL";

/// CRC-32 (IEEE 802.3, the `crc32fast` polynomial) of `data`.
pub fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0xEDB8_8320 & mask);
        }
    }
    !crc
}

/// The WAL files of a data directory, oldest first. Fails the test if a file in
/// `wal/` is not named `<20 digits>.wal`.
pub fn wal_files(data_dir: &Path) -> Vec<PathBuf> {
    let dir = data_dir.join("wal");
    let entries =
        fs::read_dir(&dir).unwrap_or_else(|e| panic!("read WAL dir {}: {e}", dir.display()));
    let mut files: Vec<PathBuf> = entries
        .map(|entry| entry.expect("WAL dir entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "wal"))
        .collect();
    for path in &files {
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        assert!(
            stem.len() == 20 && stem.bytes().all(|b| b.is_ascii_digit()),
            "WAL file {} is not named <sequence as 20 digits>.wal",
            path.display()
        );
    }
    files.sort();
    files
}

/// One record found in a WAL file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    /// Byte offset of the record's header in the file.
    pub offset: u64,
    /// Payload length in bytes.
    pub len: u64,
}

/// What a scan of one WAL file found.
#[derive(Debug, Clone)]
pub struct Scan {
    /// The records whose header and checksum are intact, in file order.
    pub records: Vec<Record>,
    /// Where the intact records end: the file length when nothing follows them.
    pub clean_end: u64,
    /// The file's length.
    pub file_len: u64,
}

impl Scan {
    /// Bytes after the last intact record (a torn tail, or garbage).
    pub fn trailing_bytes(&self) -> u64 {
        self.file_len - self.clean_end
    }
}

/// Reads a WAL file record by record, stopping at the first record that is cut
/// short or fails its checksum.
pub fn scan(path: &Path) -> Scan {
    let bytes = fs::read(path).unwrap_or_else(|e| panic!("read WAL file {}: {e}", path.display()));
    let mut records = Vec::new();
    let mut at = if bytes.starts_with(FILE_MAGIC) {
        FILE_MAGIC.len()
    } else {
        0
    };
    while bytes.len() - at >= RECORD_HEADER as usize {
        let word =
            |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
        let len = word(at) as usize;
        let crc = word(at + 4);
        let start = at + RECORD_HEADER as usize;
        if bytes.len() - start < len || crc32(&bytes[start..start + len]) != crc {
            break;
        }
        records.push(Record {
            offset: at as u64,
            len: len as u64,
        });
        at = start + len;
    }
    Scan {
        records,
        clean_end: at as u64,
        file_len: bytes.len() as u64,
    }
}

/// Cuts a file to `len` bytes, as a crash mid-write would leave it.
pub fn truncate(path: &Path, len: u64) {
    let file = fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {} to truncate: {e}", path.display()));
    file.set_len(len)
        .unwrap_or_else(|e| panic!("truncate {}: {e}", path.display()));
    file.sync_all().expect("sync the truncated WAL file");
}

/// Appends `bytes` to a file, as garbage after the last good record.
pub fn append(path: &Path, bytes: &[u8]) {
    use std::io::Write;
    let mut file = fs::OpenOptions::new()
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {} to append: {e}", path.display()));
    file.write_all(bytes).expect("append to the WAL file");
    file.sync_all().expect("sync the WAL file");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn scan_stops_at_a_torn_record() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("00000000000000000001.wal");
        let mut bytes = FILE_MAGIC.to_vec();
        for payload in [&b"first"[..], b"second record"] {
            bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            bytes.extend_from_slice(&crc32(payload).to_le_bytes());
            bytes.extend_from_slice(payload);
        }
        let whole = bytes.len() as u64;
        bytes.extend_from_slice(&[9, 0, 0, 0, 1, 2]);
        fs::write(&path, &bytes).expect("write");
        let found = scan(&path);
        assert_eq!(
            found.records,
            vec![
                Record { offset: 8, len: 5 },
                Record {
                    offset: 21,
                    len: 13
                }
            ]
        );
        assert_eq!(found.clean_end, whole);
        assert_eq!(found.trailing_bytes(), 6);
    }
}
