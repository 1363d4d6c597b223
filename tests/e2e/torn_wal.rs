//! A torn WAL tail is cut off on start, never a reason to refuse to start.
//!
//! Three acknowledged writes, then `kill -9`, then the newest WAL file is damaged
//! as a crash can leave it: (a) its last record cut mid-payload, (a') cut inside
//! the last record's 8-byte header, (b) garbage appended after the last record.
//! The server must start healthy with exactly the writes whose records are whole,
//! and must have cut the tail: a write after the restart survives another
//! `kill -9`, and every WAL file then reads cleanly to its end.

use std::path::{Path, PathBuf};

use citytsdb_tests::wal::{self, RECORD_HEADER};
use citytsdb_tests::workload::{rfc3339, XorShift, DEFAULT_START};
use citytsdb_tests::Server;

const DB: &str = "city";
const ROWS_PER_WRITE: u32 = 5;

/// The time of write `n` (1-based); each write is its own rows at its own time.
fn write_time(n: u32) -> i64 {
    DEFAULT_START + i64::from(n) * 60
}

fn write_body(n: u32) -> String {
    (1..=ROWS_PER_WRITE)
        .map(|d| {
            format!(
                "manhole,device=mh-{d:05},district=二七区 tilt_deg=0.5{d},water_level_cm={n}{d}.5,battery_pct={}i,cover_open=false {}\n",
                90 - n,
                write_time(n)
            )
        })
        .collect()
}

/// Rows of write `n` the server holds (0 or ROWS_PER_WRITE when all is well).
fn rows_of(server: &Server, n: u32) -> u64 {
    let sql = format!(
        "SELECT count(*) AS n FROM manhole WHERE time = '{}'",
        rfc3339(write_time(n))
    );
    let rows = server.query_json(DB, &sql);
    rows[0]["n"]
        .as_u64()
        .unwrap_or_else(|| panic!("count in {rows:?}"))
}

fn assert_writes(server: &Server, present: &[u32], absent: &[u32], stage: &str) {
    for &n in present {
        let found = rows_of(server, n);
        if found != u64::from(ROWS_PER_WRITE) {
            server.fail(&format!(
                "{stage}: write {n} has {found} of {ROWS_PER_WRITE} rows"
            ));
        }
    }
    for &n in absent {
        let found = rows_of(server, n);
        if found != 0 {
            server.fail(&format!(
                "{stage}: write {n}, whose record was torn, has {found} rows"
            ));
        }
    }
}

/// Writes 1..=3 acknowledged, then kill -9. Returns the newest WAL file holding
/// a record and that file's last record.
fn three_writes_then_crash(data: &Path) -> (PathBuf, wal::Record) {
    let server = Server::start(data);
    for n in 1..=3 {
        server.write_ok(DB, "s", write_body(n));
    }
    server.kill9();

    let files = wal::wal_files(data);
    let scans: Vec<_> = files.iter().map(|f| (f.clone(), wal::scan(f))).collect();
    let records: usize = scans.iter().map(|(_, s)| s.records.len()).sum();
    for (file, found) in &scans {
        assert_eq!(
            found.trailing_bytes(),
            0,
            "{} does not read as [u32 len][u32 crc32][payload] records to its end",
            file.display()
        );
    }
    assert_eq!(
        records, 3,
        "three acknowledged writes should be three WAL records, found {records} in {files:?}"
    );
    let (file, found) = scans
        .into_iter()
        .rev()
        .find(|(_, s)| !s.records.is_empty())
        .expect("a WAL file with records");
    let last = *found.records.last().expect("a last record");
    (file, last)
}

/// After the damage: restart, check, write 4, crash again, check again, and
/// check the WAL now reads cleanly (the damaged tail was really cut off).
fn restart_and_check(data: &Path, survivors: &[u32], torn: &[u32], stage: &str) {
    let server = Server::start(data);
    assert!(server.is_healthy());
    assert_writes(&server, survivors, torn, stage);
    server.write_ok(DB, "s", write_body(4));
    server.kill9();

    let server = Server::start(data);
    let mut all: Vec<u32> = survivors.to_vec();
    all.push(4);
    assert_writes(
        &server,
        &all,
        torn,
        &format!("{stage}, then write 4 and kill -9"),
    );
    server.kill9();
    for file in wal::wal_files(data) {
        let found = wal::scan(&file);
        assert_eq!(
            found.trailing_bytes(),
            0,
            "{stage}: {} still has {} bytes of damaged tail after a restart",
            file.display(),
            found.trailing_bytes()
        );
    }
    let server = Server::start(data);
    assert_writes(&server, &all, torn, &format!("{stage}, final restart"));
    server.stop();
}

#[test]
fn last_record_cut_mid_payload() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let (file, last) = three_writes_then_crash(&data);
    assert!(last.len >= 2, "the last record has a payload to cut");
    wal::truncate(&file, last.offset + RECORD_HEADER + last.len / 2);
    restart_and_check(&data, &[1, 2], &[3], "last record cut mid-payload");
}

#[test]
fn last_record_cut_inside_its_header() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let (file, last) = three_writes_then_crash(&data);
    wal::truncate(&file, last.offset + 3);
    restart_and_check(&data, &[1, 2], &[3], "last record cut inside its header");
}

#[test]
fn garbage_after_the_last_record() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let (file, _) = three_writes_then_crash(&data);
    // A plausible header (a length that fits, a wrong checksum), then noise.
    let mut rng = XorShift::new(99);
    let mut garbage = Vec::new();
    garbage.extend_from_slice(&40u32.to_le_bytes());
    garbage.extend_from_slice(&0xDEAD_BEEFu32.to_le_bytes());
    garbage.extend((0..56).map(|_| rng.next_u64() as u8));
    wal::append(&file, &garbage);
    restart_and_check(&data, &[1, 2, 3], &[], "garbage after the last record");
}
