//! The buffer reaches segments on its own, by size and by age; the WAL files it
//! covered go once the catalog lists the segments; late rows for a day already
//! persisted merge into that day's segment instead of overlapping it.

use std::time::{Duration, Instant};

use citytsdb_tests::wal;
use citytsdb_tests::Server;

const DB: &str = "city";
const DAY: i64 = 1_764_547_200; // 2025-12-01T00:00:00Z

fn readings(devices: u32, minutes: u32, tilt: f64) -> String {
    let mut out = String::new();
    for d in 1..=devices {
        for m in 0..minutes {
            out.push_str(&format!(
                "manhole,device=mh-{d:05},district=中原区 tilt_deg={tilt},water_level_cm=-{m}.5 {}\n",
                DAY + i64::from(m) * 60
            ));
        }
    }
    out
}

fn segments(server: &Server) -> u64 {
    server.explain_analyze_metrics(DB, "SELECT * FROM manhole")["segments_total"]
}

/// Polls until `f` holds, for at most `limit`.
fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

#[test]
fn buffer_flushes_by_size_and_wal_files_go_after() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = Server::start_with(&data, &["--flush-rows", "1000"]);
    server.write_ok(DB, "s", readings(20, 60, 0.5));
    assert!(
        eventually(Duration::from_secs(30), || segments(&server) == 1),
        "1,200 buffered rows with --flush-rows 1000 were not flushed"
    );
    // The flush rotated the WAL and deleted the file that held the rows.
    assert!(
        eventually(Duration::from_secs(10), || wal::wal_files(&data).len() == 1),
        "old WAL files remain: {:?}",
        wal::wal_files(&data)
    );
    let rows = server.query_json(DB, "SELECT count(*) AS n FROM manhole");
    assert_eq!(rows[0]["n"], 1200);
    // After a crash, the rows come back from the segment alone.
    server.kill9();
    let server = Server::start(&data);
    let rows = server.query_json(DB, "SELECT count(*) AS n FROM manhole");
    assert_eq!(rows[0]["n"], 1200);
    assert_eq!(
        server.explain_analyze_metrics(DB, "SELECT * FROM manhole")["buffer_rows"],
        0
    );
}

#[test]
fn buffer_flushes_by_age() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(&dir.path().join("data"), &["--flush-interval", "1s"]);
    server.write_ok(DB, "s", readings(2, 3, 0.5));
    assert!(
        eventually(Duration::from_secs(30), || segments(&server) == 1),
        "rows older than --flush-interval 1s were not flushed"
    );
}

#[test]
fn late_rows_are_merged_at_query_time_then_folded_in_by_compaction() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"));
    server.write_ok(DB, "s", readings(3, 10, 0.5));
    assert_eq!(server.flush(DB), 1);
    // A retry of minute 5 of device 2 with a new tilt only, and a late reading.
    let late = format!(
        "manhole,device=mh-00002,district=中原区 tilt_deg=9.5 {}\nmanhole,device=mh-00003,district=中原区 tilt_deg=1.5 {}\n",
        DAY + 5 * 60,
        DAY + 30 * 60
    );
    server.write_ok(DB, "s", late);
    let m = server.explain_analyze_metrics(DB, "SELECT * FROM manhole WHERE device = 'mh-00002'");
    assert_eq!(
        m["segments_merged"], 1,
        "buffered rows overlapping a segment are merged at query time"
    );
    assert_eq!(server.flush(DB), 1);
    let m = server.explain_analyze_metrics(DB, "SELECT * FROM manhole");
    assert_eq!(
        (m["segments_total"], m["segments_merged"]),
        (2, 2),
        "a flush only adds a segment; the day's two are merged at query time"
    );
    assert_eq!(
        m["rows_total"], 32,
        "the retry is stored twice until compaction"
    );
    let stats = server.compact();
    assert_eq!(stats["segments_in"], 2, "{stats}");
    let m = server.explain_analyze_metrics(DB, "SELECT * FROM manhole");
    assert_eq!(
        (m["segments_total"], m["segments_merged"]),
        (1, 0),
        "compaction folded the late rows into the day's segment"
    );
    assert_eq!(m["rows_total"], 31);
    let rows = server.query_json(
        DB,
        "SELECT tilt_deg, water_level_cm FROM manhole WHERE device = 'mh-00002' AND time = '2025-12-01T00:05:00Z'",
    );
    assert_eq!(rows.len(), 1);
    assert_eq!(
        rows[0]["tilt_deg"], 9.5,
        "the retry's field replaced the old value"
    );
    assert_eq!(
        rows[0]["water_level_cm"], -5.5,
        "the field the retry did not carry kept its value"
    );
}

#[test]
fn writes_are_refused_not_lost_while_the_buffer_is_full() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(&dir.path().join("data"), &["--max-buffer-size", "4KiB"]);
    server.write_ok(DB, "s", readings(10, 20, 0.5));
    let (status, body) = server.write(DB, "s", readings(1, 1, 7.5).replace("mh-00001", "mh-00099"));
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("write buffer full"), "{body}");
    let rows = server.query_json(
        DB,
        "SELECT count(*) AS n FROM manhole WHERE device = 'mh-00099'",
    );
    assert_eq!(rows[0]["n"], 0, "a refused write is not written");
    server.flush(DB);
    server.write_ok(DB, "s", readings(1, 1, 7.5).replace("mh-00001", "mh-00099"));
    let rows = server.query_json(DB, "SELECT count(*) AS n FROM manhole");
    assert_eq!(rows[0]["n"], 201);
}
