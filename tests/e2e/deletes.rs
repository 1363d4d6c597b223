//! Deletes: `DELETE FROM table WHERE predicate` over `POST /api/v1/query`.
//!
//! Two days of covers written in small flushes, with later overwrites (so a row
//! has copies in several segments); then deletes by device and time range and by
//! a field value, each answered with the number of rows it removed. From the
//! answer on, every query answers what DuckDB answers over the remaining rows:
//! SQL over segments and the buffer, the latest-per-device path and
//! `system.devices` (also for a device whose newest rows, or all rows, were
//! deleted). A later write of a deleted (series, time) starts a new row. The
//! deletes survive `kill -9`; compaction removes the rows from storage. Bad
//! statements get a 400 saying what is wrong. Local store and S3 endpoint.

use std::path::Path;

use citytsdb_tests::oracle::{assert_answers, duckdb_answers, Query};
use citytsdb_tests::s3::{S3Endpoint, BUCKET};
use citytsdb_tests::workload::{apply, chunks, sql_timestamp, Workload, DAY};
use citytsdb_tests::{Expected, Server};
use serde_json::Value;

const DB: &str = "city";

fn delete(server: &Server, sql: &str) -> u64 {
    let (status, body) = server.query_post(DB, sql, "json");
    assert_eq!(status, 200, "{sql}: {body}");
    let answer: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{body}: {e}"));
    answer["deleted"]
        .as_u64()
        .unwrap_or_else(|| panic!("{sql}: {body}"))
}

fn queries() -> Vec<Query> {
    vec![
        Query::same("SELECT count(*) AS n FROM manhole"),
        Query::same(
            "SELECT device, count(*) AS n, max(time) AS last, sum(water_level_cm) AS level, \
             sum(battery_pct) AS battery FROM manhole GROUP BY device ORDER BY device",
        ),
        Query::same(
            "SELECT * FROM manhole WHERE device IN ('mh-00007', 'mh-00009') ORDER BY device, time",
        ),
        // The latest-per-device path (answered from the series registry).
        Query::same(
            "SELECT DISTINCT ON (device) device, time, water_level_cm, battery_pct FROM manhole \
             ORDER BY device, time DESC",
        ),
        Query::pair(
            "SELECT device, last_time AS last FROM system.devices WHERE table_name = 'manhole' \
             ORDER BY device",
            "SELECT device, max(time) AS last FROM manhole GROUP BY device ORDER BY device",
        ),
    ]
}

fn remove_where(expected: &mut Expected, keep: impl Fn(&citytsdb_tests::Reading) -> bool) -> u64 {
    let before = expected.len();
    expected.retain(|_, r| keep(r));
    (before - expected.len()) as u64
}

fn delete_cycle(data: &Path, store_args: &[&str], env: &[(&str, &str)]) {
    let mut args = vec!["--flush-rows", "2000", "--compaction-settle", "1h"];
    args.extend_from_slice(store_args);
    let server = Server::start_with_env(data, &args, env);
    let w = Workload {
        devices: 30,
        days: 2,
        interval_secs: 900,
        ..Workload::default()
    }
    .clean();
    let mut expected = w.expected();
    for body in chunks(&w.writes(), 1_000) {
        server.write_ok(DB, "s", body);
        server.flush(DB);
    }
    let later = w.overwrites(&mut expected, 400, 3);
    server.write_ok(DB, "s", chunks(&later, 10_000).concat());

    // One device's afternoon.
    let (from, to) = (w.start + DAY / 2, w.start + DAY);
    let n = delete(
        &server,
        &format!(
            "DELETE FROM manhole WHERE device = 'mh-00007' AND time >= '{}' AND time < '{}'",
            sql_timestamp(from),
            sql_timestamp(to)
        ),
    );
    let want = remove_where(&mut expected, |r| {
        !(r.device == 7 && r.time >= from && r.time < to)
    });
    assert_eq!(n, want, "rows deleted");
    assert!(n > 0);
    // A field's value, on the merged rows: the lowest tenth of the levels.
    let mut levels: Vec<f64> = expected.values().filter_map(|r| r.water_level_cm).collect();
    levels.sort_by(f64::total_cmp);
    let low = levels[levels.len() / 10];
    let n = delete(
        &server,
        &format!("DELETE FROM manhole WHERE water_level_cm < {low}"),
    );
    let want = remove_where(&mut expected, |r| r.water_level_cm.is_none_or(|l| l >= low));
    assert_eq!(n, want, "rows deleted by value");
    assert!(n > 0);
    // The newest rows of one device, and every row of another.
    let last_day = w.start + DAY + DAY / 2;
    delete(
        &server,
        &format!(
            "DELETE FROM manhole WHERE device = 'mh-00009' AND time >= '{}'",
            sql_timestamp(last_day)
        ),
    );
    remove_where(&mut expected, |r| !(r.device == 9 && r.time >= last_day));
    let n = delete(&server, "DELETE FROM manhole WHERE device = 'mh-00011'");
    assert_eq!(n, remove_where(&mut expected, |r| r.device != 11));
    assert_eq!(
        delete(&server, "DELETE FROM manhole WHERE device = 'mh-00011'"),
        0
    );

    // A later write of a deleted (series, time) is a new row: no old field returns.
    let mut again = w.reading(7, 60);
    assert!(again.time >= from && again.time < to);
    again.tilt_deg = None;
    again.water_level_cm = Some(12.5);
    again.battery_pct = None;
    again.cover_open = None;
    apply(&mut expected, &again);
    server.write_ok(DB, "s", again.line());

    let qs = queries();
    let answers = duckdb_answers(expected.values(), &qs);
    assert_answers(&server, DB, "after the deletes", &qs, &answers);

    // Durable: a crash keeps every delete.
    server.kill9();
    let server = Server::start_with_env(data, &args, env);
    assert_answers(&server, DB, "after kill -9", &qs, &answers);

    // Compaction removes the deleted rows from storage.
    server.flush(DB);
    server.compact();
    assert_answers(&server, DB, "after compaction", &qs, &answers);
    let stored = server.query_json(
        DB,
        "SELECT sum(rows) AS n FROM system.segments WHERE table_name = 'manhole'",
    );
    assert_eq!(
        stored[0]["n"],
        expected.len() as u64,
        "every stored row is a remaining row"
    );
    server.stop();
}

#[test]
fn deletes_match_duckdb_through_flushes_crashes_and_compaction() {
    let dir = tempfile::tempdir().unwrap();
    delete_cycle(&dir.path().join("data"), &[], &[]);
}

#[test]
fn deletes_on_an_s3_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let s3 = S3Endpoint::start(&dir.path().join("moto.log"));
    let store = format!("s3://{BUCKET}/deletes");
    delete_cycle(
        &dir.path().join("data"),
        &["--store", store.as_str()],
        &s3.env(),
    );
}

#[test]
fn bad_deletes_are_refused_with_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"));
    server.write_ok(DB, "s", "manhole,device=a tilt_deg=1 1764547200\n");
    for (sql, needle) in [
        ("DELETE FROM manhole", "WHERE true"),
        ("DELETE FROM manhole WHERE nope = 1", "nope"),
        ("DELETE FROM nothing WHERE true", "nothing"),
        (
            "DELETE FROM manhole WHERE tilt_deg > 1 RETURNING *",
            "RETURNING",
        ),
        ("DELETE FROM a USING b WHERE a.x = b.x", "USING"),
        ("DELETE FROM manhole WHERE (", ""),
    ] {
        let (status, body) = server.query_post(DB, sql, "json");
        assert_eq!(status, 400, "{sql}: {body}");
        assert!(body.contains(needle), "{sql}: {body}");
    }
    let (status, body) = server.query_raw(DB, "DELETE FROM manhole WHERE true", "json");
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("POST"), "{body}");
    let (status, body) = server.query_post("nowhere", "DELETE FROM manhole WHERE true", "json");
    assert_eq!(status, 404, "{body}");
    let rows = server.query_json(DB, "SELECT count(*) AS n FROM manhole");
    assert_eq!(rows[0]["n"], 1, "nothing was deleted");
    assert_eq!(delete(&server, "DELETE FROM manhole WHERE true"), 1);
    let rows = server.query_json(DB, "SELECT count(*) AS n FROM manhole");
    assert_eq!(rows[0]["n"], 0);
    // A day of one segment is rewritten too: its deleted rows leave storage.
    let segments = "SELECT count(*) AS n FROM system.segments";
    assert_eq!(server.query_json(DB, segments)[0]["n"], 1);
    server.compact();
    assert_eq!(server.query_json(DB, segments)[0]["n"], 0);
    server.stop();
}

#[test]
fn influxdb_2_deletes_by_time_range_and_tags() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"));
    let t0 = 1_764_547_200i64;
    let mut body = String::new();
    for i in 0..5 {
        for device in ["a", "b"] {
            body.push_str(&format!(
                "manhole,device={device} tilt_deg={i} {}\n",
                t0 + i * 60
            ));
            body.push_str(&format!(
                "parking,device={device} occupied={i}i {}\n",
                t0 + i * 60
            ));
        }
    }
    server.write_ok(DB, "s", &body);
    let client = server.client();
    let range = |predicate: &str| {
        serde_json::json!({
            "start": citytsdb_tests::workload::rfc3339(t0 + 60),
            "stop": citytsdb_tests::workload::rfc3339(t0 + 180),
            "predicate": predicate,
        })
        .to_string()
    };
    // Both bounds inclusive, one measurement, one device.
    let (status, answer) = client
        .post(
            "/api/v2/delete?bucket=city&org=x",
            range(r#"_measurement="manhole" AND device="a""#).as_bytes(),
        )
        .unwrap();
    assert_eq!(status, 204, "{answer}");
    let left = |table: &str| {
        server
            .query_json(
                DB,
                &format!(
                    "SELECT device, count(*) AS n FROM {table} GROUP BY device ORDER BY device"
                ),
            )
            .iter()
            .map(|r| r["n"].as_u64().unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(left("manhole"), vec![2, 5]);
    assert_eq!(left("parking"), vec![5, 5]);
    let times = server.query_json(
        DB,
        "SELECT CAST(time AS VARCHAR) AS t FROM manhole WHERE device = 'a' ORDER BY time",
    );
    assert_eq!(times.len(), 2, "{times:?}");
    // Without a measurement: every table with that tag.
    let (status, answer) = client
        .post(
            "/api/v2/delete?bucket=city",
            range(r#"device="b""#).as_bytes(),
        )
        .unwrap();
    assert_eq!(status, 204, "{answer}");
    assert_eq!(left("manhole"), vec![2, 2]);
    assert_eq!(left("parking"), vec![5, 2]);
    // A tag no table has matches nothing.
    let (status, _) = client
        .post(
            "/api/v2/delete?bucket=city",
            range(r#"nope="a""#).as_bytes(),
        )
        .unwrap();
    assert_eq!(status, 204);
    assert_eq!(left("parking"), vec![5, 2]);

    for (path, body, needle) in [
        (
            "/api/v2/delete?bucket=city",
            range(r#"device="a" OR device="b""#),
            "OR is not supported",
        ),
        (
            "/api/v2/delete?bucket=city",
            range(r#"_measurement!="manhole""#),
            "_measurement",
        ),
        (
            "/api/v2/delete?bucket=city",
            r#"{"start": "yesterday", "stop": "2026-01-01T00:00:00Z"}"#.to_string(),
            "start",
        ),
        (
            "/api/v2/delete?bucket=city",
            r#"{"stop": "2026-01-01T00:00:00Z"}"#.to_string(),
            "start",
        ),
        ("/api/v2/delete", range(""), "bucket"),
    ] {
        let (status, answer) = client.post(path, body.as_bytes()).unwrap();
        assert_eq!(status, 400, "{body}: {answer}");
        let answer: Value = serde_json::from_str(&answer).unwrap();
        assert_eq!(answer["code"], "invalid", "{answer}");
        assert!(
            answer["message"]
                .as_str()
                .unwrap_or_default()
                .contains(needle),
            "{body}: {answer}"
        );
    }
    let (status, _) = client
        .post("/api/v2/delete?bucket=nowhere", range("").as_bytes())
        .unwrap();
    assert_eq!(status, 404);
    server.stop();
}
