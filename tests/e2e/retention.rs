//! Retention: how long a table's or a database's rows are kept.
//!
//! Readings over the last six days (timestamps generated around the real `now`),
//! written in small flushes; then a table retention of about two and a half days,
//! set over HTTP. From the answer on, every query answers what DuckDB answers over
//! the rows younger than the cutoff (segments, the write buffer, `system.devices`,
//! `system.tables`); a compaction drops the expired days from the catalog and the
//! store (the background compactor by itself, woken by a flush) and trims the day
//! the cutoff cuts; the setting survives `kill -9`. A
//! database's retention applies to its tables. Bad settings get a 400 that names
//! the field, an unknown table a 404. Local store and S3 protocol endpoint.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use citytsdb_tests::oracle::{assert_answers, duckdb_answers, Query};
use citytsdb_tests::s3::{S3Endpoint, BUCKET};
use citytsdb_tests::workload::{chunks, sql_timestamp, Reading, Workload, DAY};
use citytsdb_tests::{Expected, Server};
use serde_json::Value;

const DB: &str = "city";
/// A device that reported only on the first day, long expired.
const GHOST: u32 = 9_999;

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn queries(cutoff: i64) -> Vec<Query> {
    let near = sql_timestamp(cutoff + 3 * 3600);
    vec![
        Query::same("SELECT count(*) AS n FROM manhole"),
        Query::same(
            "SELECT device, count(*) AS n, min(time) AS first, sum(water_level_cm) AS level \
             FROM manhole GROUP BY device ORDER BY device",
        ),
        Query::same("SELECT * FROM manhole WHERE device = 'mh-00003' ORDER BY time"),
        Query::same(&format!(
            "SELECT device, time, tilt_deg, battery_pct FROM manhole WHERE time < '{near}' \
             ORDER BY device, time"
        )),
    ]
}

fn kept(expected: &Expected, cutoff: i64) -> Vec<Reading> {
    expected
        .values()
        .filter(|r| r.time >= cutoff)
        .cloned()
        .collect()
}

fn put(server: &Server, path: &str, body: &str) -> (u16, Value) {
    let (status, text) = server.client().put(path, body.as_bytes()).unwrap();
    let value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("PUT {path}: not JSON ({e}): {text}"));
    (status, value)
}

/// `system.tables`' retention of `table`.
fn shown_retention(server: &Server, table: &str) -> Value {
    let rows = server.query_json(
        DB,
        &format!("SELECT retention FROM system.tables WHERE table_name = '{table}'"),
    );
    rows[0]["retention"].clone()
}

/// The days (unix seconds / DAY) of the segment files under a local store.
fn stored_days(store: &Path) -> Vec<i64> {
    let mut days = Vec::new();
    let mut dirs = vec![store.join("segments")];
    while let Some(d) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                dirs.push(e.path());
            } else if e.path().extension().is_some_and(|x| x == "parquet") {
                let day = e.path().parent().unwrap().file_name().unwrap().to_owned();
                days.push(day.to_string_lossy().parse::<i64>().unwrap());
            }
        }
    }
    days.sort_unstable();
    days.dedup();
    days
}

/// Sends `PUT path` announcing a 200,000-byte body without sending it; the
/// status line of the answer.
fn announce_big_body(server: &Server, path: &str) -> String {
    use std::io::{BufRead, BufReader, Write};
    let addr = server.url().trim_start_matches("http://").to_string();
    let mut stream = std::net::TcpStream::connect(&addr).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "PUT {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: 200000\r\n\r\n"
    )
    .unwrap();
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).unwrap();
    line
}

fn retention_cycle(data: &Path, store_args: &[&str], env: &[(&str, &str)], local: bool) {
    let mut args = vec!["--compaction-settle", "1h"];
    args.extend_from_slice(store_args);
    let server = Server::start_with_env(data, &args, env);
    let now = now_secs();
    let w = Workload {
        devices: 24,
        days: 6,
        interval_secs: 1800,
        start: now.div_euclid(DAY) * DAY - 5 * DAY,
        ..Workload::default()
    }
    .clean();
    let mut expected = w.expected();
    for body in chunks(&w.writes(), 1_500) {
        server.write_ok(DB, "s", body);
        server.flush(DB);
    }
    let mut ghost = w.reading(1, 3);
    ghost.device = GHOST;
    citytsdb_tests::workload::apply(&mut expected, &ghost);
    server.write_ok(DB, "s", ghost.line());
    server.flush(DB);
    let all = server.query_json(DB, "SELECT count(*) AS n FROM manhole");
    assert_eq!(
        all[0]["n"],
        expected.len() as u64,
        "every row before retention"
    );

    // A cutoff half-way between two readings, about 2.5 days back: it stays
    // between the same two readings for a quarter of an hour.
    let step = (now - 5 * DAY / 2 - w.start) / 1800;
    let target = w.start + step * 1800 + 900;
    let retention = now_secs() - target;
    let (status, answer) = put(
        &server,
        &format!("/api/v1/databases/{DB}/tables/manhole"),
        &format!("{{\"retention\": \"{retention}s\"}}"),
    );
    assert_eq!(status, 200, "{answer}");
    let shown = answer["retention"].clone();
    assert!(shown.is_string(), "{answer}");
    let cutoff = target;

    // Expired rows written now stay invisible too (the write buffer).
    let mut late = w.reading(5, 2);
    late.water_level_cm = Some(-77.0);
    citytsdb_tests::workload::apply(&mut expected, &late);
    server.write_ok(DB, "s", late.line());

    let qs = queries(cutoff);
    let answers = duckdb_answers(kept(&expected, cutoff).iter(), &qs);
    assert_answers(
        &server,
        DB,
        "rows past retention are invisible at once",
        &qs,
        &answers,
    );
    assert_eq!(shown_retention(&server, "manhole"), shown);
    let devices = server.query_json(
        DB,
        "SELECT device, first_time FROM system.devices WHERE table_name = 'manhole' ORDER BY device",
    );
    assert_eq!(devices.len(), 24, "the ghost device is gone: {devices:?}");
    let (status, listed) = server.get("/api/v1/databases");
    assert_eq!(status, 200, "{listed}");
    let listed: Value = serde_json::from_str(&listed).unwrap();
    let city = listed["databases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == DB)
        .unwrap_or_else(|| panic!("{listed}"));
    assert_eq!(city["retention"], Value::Null, "{listed}");
    assert_eq!(city["tables"]["manhole"]["retention"], shown, "{listed}");

    // The background compactor (woken by a flush) drops the expired segments by
    // itself; a forced compaction then trims the day the cutoff cuts.
    let before = local.then(|| stored_days(&data.join("store")));
    let expired_segments = format!(
        "SELECT count(*) AS n FROM system.segments WHERE table_name = 'manhole' \
         AND max_time < '{}'",
        sql_timestamp(cutoff)
    );
    assert!(server.query_json(DB, &expired_segments)[0]["n"].as_u64() > Some(0));
    server.flush(DB);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while server.query_json(DB, &expired_segments)[0]["n"] != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the compactor did not expire segments within 30 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    server.compact();
    let reaching_back = server.query_json(
        DB,
        &format!(
            "SELECT count(*) AS n FROM system.segments WHERE table_name = 'manhole' \
             AND min_time < '{}'",
            sql_timestamp(cutoff)
        ),
    );
    assert_eq!(
        reaching_back[0]["n"], 0,
        "no segment reaches back past the cutoff"
    );
    assert_answers(&server, DB, "after compaction", &qs, &answers);
    if let Some(before) = before {
        let after = stored_days(&data.join("store"));
        assert!(
            before.first() < Some(&cutoff.div_euclid(DAY)),
            "days before the cutoff were stored: {before:?}"
        );
        assert!(
            after.iter().all(|&d| d >= cutoff.div_euclid(DAY)),
            "expired days left the store: {before:?} -> {after:?}"
        );
    }

    // The setting is in the catalog, durable once acknowledged: a crash keeps it.
    server.kill9();
    let server = Server::start_with_env(data, &args, env);
    assert_eq!(shown_retention(&server, "manhole"), shown);
    assert_answers(&server, DB, "after a restart", &qs, &answers);

    // A database's retention applies to its tables without their own.
    let (status, answer) = put(&server, "/api/v1/databases/yard", r#"{"retention": "1d"}"#);
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["retention"], "1d");
    let old = now - 2 * DAY;
    server.write_ok(
        "yard",
        "s",
        format!("lamp,pole=p1 lux=1 {old}\nlamp,pole=p1 lux=2 {now}\n"),
    );
    let rows = server.query_json("yard", "SELECT lux FROM lamp");
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["lux"], 2.0);
    let (_, listed) = server.get("/api/v1/databases");
    assert!(listed.contains("\"yard\""), "{listed}");
    server.stop();
}

#[test]
fn retention_hides_expired_rows_at_once_and_compaction_drops_them() {
    let dir = tempfile::tempdir().unwrap();
    retention_cycle(&dir.path().join("data"), &[], &[], true);
}

#[test]
fn retention_on_an_s3_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let s3 = S3Endpoint::start(&dir.path().join("moto.log"));
    let store = format!("s3://{BUCKET}/retention");
    retention_cycle(
        &dir.path().join("data"),
        &["--store", store.as_str()],
        &s3.env(),
        false,
    );
}

#[test]
fn bad_retention_settings_are_refused_with_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"));
    server.write_ok(DB, "s", "manhole,device=a tilt_deg=1 1764547200\n");
    let table = format!("/api/v1/databases/{DB}/tables/manhole");
    for (body, needle) in [
        (r#"{"retention": "30 parsecs"}"#, "retention"),
        (r#"{"retention": "0s"}"#, "longer than 0"),
        (r#"{"retention": 30}"#, "not a duration"),
        (r#"{"keep": "30d"}"#, "unknown field 'keep'"),
        (r#"{}"#, "'retention' is missing"),
        (r#"[1]"#, "not a JSON object"),
        ("{\"retention\": ", "line 1, column"),
        (r#"{"retention": "999999d"}"#, "longest accepted"),
    ] {
        let (status, answer) = put(&server, &table, body);
        assert_eq!(status, 400, "{body}: {answer}");
        let message = answer["error"].as_str().unwrap_or_default();
        assert!(message.contains(needle), "{body}: {message}");
    }
    let (status, answer) = put(
        &server,
        &format!("/api/v1/databases/{DB}/tables/nothing"),
        r#"{"retention": "1d"}"#,
    );
    assert_eq!(status, 404, "{answer}");
    let (status, answer) = put(
        &server,
        "/api/v1/databases/nowhere/tables/manhole",
        r#"{"retention": "1d"}"#,
    );
    assert_eq!(status, 404, "{answer}");
    let (status, answer) = put(
        &server,
        "/api/v1/databases/bad%0Aname",
        r#"{"retention": "1d"}"#,
    );
    assert_eq!(status, 400, "{answer}");
    // A body past the limit is refused from its announced length, unread.
    let status_line = announce_big_body(&server, &table);
    assert!(status_line.starts_with("HTTP/1.1 413"), "{status_line}");
    assert_eq!(shown_retention(&server, "manhole"), Value::Null);
    server.stop();
}
