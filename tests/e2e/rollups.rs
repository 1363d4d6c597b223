//! Rollups: `POST /api/v1/databases/{db}/rollups` and the tables they keep.
//!
//! Three days of covers (timestamps around the real `now`), written in small
//! flushes; then an hourly rollup of every aggregate over float, integer and
//! boolean fields. Every question to the rollup table is answered as DuckDB's
//! `GROUP BY time_bucket(...)` over the raw rows answers it:
//!
//! - at once, before anything is materialised (the refresher is held off: the
//!   buckets are computed from the raw rows on the fly);
//! - after late rows (buffered, then flushed) and deletes by device and by value,
//!   still unmaterialised, and through `kill -9`;
//! - once the refresher has materialised every bucket (the listing says so), after
//!   more late rows and deletes that it recomputes, after compaction, and after
//!   `kill -9` again;
//! - with the source's retention cutting its oldest day, the rollup's buckets
//!   before the cutoff keep their values; rows written before the cutoff stay out.
//!
//! Gap filling over the rollup answers what gap filling over the raw rows answers;
//! an alert rule reading the rollup fires on a late row; writes and deletes to the
//! rollup table are refused; bad definitions get a 4xx naming the field; a dropped
//! rollup's table is gone. Local store and S3 protocol endpoint.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use citytsdb_tests::oracle::{assert_answers, duckdb_answers, Query};
use citytsdb_tests::receiver::Receiver;
use citytsdb_tests::s3::{S3Endpoint, BUCKET};
use citytsdb_tests::workload::{apply, chunks, sql_timestamp, Reading, Workload, DAY};
use citytsdb_tests::{Expected, Server};
use serde_json::{json, Value};

const DB: &str = "city";
const HOUR: i64 = 3600;

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn definition() -> Value {
    json!({
        "name": "manhole_1h",
        "source": "manhole",
        "interval": "1h",
        "aggregates": {
            "water_level_cm": ["min", "max", "avg", "sum", "count", "first", "last"],
            "battery_pct": ["sum", "avg", "count", "min"],
            "cover_open": ["count", "last"],
            "tilt_deg": ["max"]
        },
        "retention": "3650d"
    })
}

/// The rollup's columns, and DuckDB's spelling of each over the raw rows.
const COLUMNS: [(&str, &str); 14] = [
    ("water_level_cm_min", "min(water_level_cm)"),
    ("water_level_cm_max", "max(water_level_cm)"),
    ("water_level_cm_avg", "avg(water_level_cm)"),
    ("water_level_cm_sum", "sum(water_level_cm)"),
    ("water_level_cm_count", "count(water_level_cm)"),
    (
        "water_level_cm_first",
        "arg_min(water_level_cm, time) FILTER (WHERE water_level_cm IS NOT NULL)",
    ),
    (
        "water_level_cm_last",
        "arg_max(water_level_cm, time) FILTER (WHERE water_level_cm IS NOT NULL)",
    ),
    ("battery_pct_sum", "sum(battery_pct)"),
    ("battery_pct_avg", "avg(battery_pct)"),
    ("battery_pct_count", "count(battery_pct)"),
    ("battery_pct_min", "min(battery_pct)"),
    ("cover_open_count", "count(cover_open)"),
    (
        "cover_open_last",
        "arg_max(cover_open, time) FILTER (WHERE cover_open IS NOT NULL)",
    ),
    ("tilt_deg_max", "max(tilt_deg)"),
];

fn queries(start: i64) -> Vec<Query> {
    let ours: Vec<String> = COLUMNS.iter().map(|(c, _)| c.to_string()).collect();
    let theirs: Vec<String> = COLUMNS.iter().map(|(c, d)| format!("{d} AS {c}")).collect();
    let afternoon = sql_timestamp(start + DAY + 13 * HOUR);
    vec![
        // Every bucket of every series.
        Query::pair(
            &format!(
                "SELECT time, device, district, {} FROM manhole_1h ORDER BY device, time",
                ours.join(", ")
            ),
            &format!(
                "SELECT time_bucket(INTERVAL 1 hour, time) AS time, device, district, {} \
                 FROM manhole GROUP BY ALL ORDER BY device, time",
                theirs.join(", ")
            ),
        ),
        // A dashboard's question: district totals from one afternoon on.
        Query::pair(
            &format!(
                "SELECT district, max(water_level_cm_max) AS top, sum(water_level_cm_count) AS n, \
                 sum(battery_pct_sum) AS battery FROM manhole_1h WHERE time >= '{afternoon}' \
                 GROUP BY district ORDER BY district"
            ),
            &format!(
                "SELECT district, max(water_level_cm) AS top, count(water_level_cm) AS n, \
                 sum(battery_pct) AS battery FROM manhole WHERE time >= '{afternoon}' \
                 GROUP BY district ORDER BY district"
            ),
        ),
        // One device's day of hours.
        Query::pair(
            &format!(
                "SELECT time, water_level_cm_avg, water_level_cm_last FROM manhole_1h \
                 WHERE device = 'mh-00004' AND time >= '{}' AND time < '{}' ORDER BY time",
                sql_timestamp(start + DAY),
                sql_timestamp(start + 2 * DAY)
            ),
            &format!(
                "SELECT time_bucket(INTERVAL 1 hour, time) AS time, avg(water_level_cm) AS \
                 water_level_cm_avg, arg_max(water_level_cm, time) FILTER (WHERE water_level_cm \
                 IS NOT NULL) AS water_level_cm_last FROM manhole WHERE device = 'mh-00004' AND \
                 time >= '{}' AND time < '{}' GROUP BY 1 ORDER BY time",
                sql_timestamp(start + DAY),
                sql_timestamp(start + 2 * DAY)
            ),
        ),
    ]
}

fn call(server: &Server, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
    let client = server.client();
    let body_text = body.map(|b| b.to_string()).unwrap_or_default();
    let (status, text) = match method {
        "POST" => client.post(path, body_text.as_bytes()),
        "DELETE" => client.delete(path),
        _ => client.get(path),
    }
    .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, value)
}

fn status(server: &Server) -> Value {
    let (code, body) = call(
        server,
        "GET",
        &format!("/api/v1/databases/{DB}/rollups/manhole_1h"),
        None,
    );
    assert_eq!(code, 200, "{body}");
    body
}

fn wait_materialised(server: &Server, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while status(server)["materialised"] != true {
        assert!(
            Instant::now() < deadline,
            "{what}: the rollup was not materialised within 60 s: {}",
            status(server)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn delete(server: &Server, sql: &str) -> u64 {
    let (status, body) = server.query_post(DB, sql, "json");
    assert_eq!(status, 200, "{sql}: {body}");
    serde_json::from_str::<Value>(&body).unwrap()["deleted"]
        .as_u64()
        .unwrap_or_else(|| panic!("{sql}: {body}"))
}

/// Late readings: `count` rows for existing (device, time) slots and new ones in
/// the past, some with a level far above the rest.
fn late_rows(w: &Workload, expected: &mut Expected, seed: u32, count: u32) -> String {
    let mut lines = Vec::new();
    for i in 0..count {
        let device = 1 + (seed * 7 + i * 5) % w.devices;
        let step = ((seed * 31 + i * 17) as u64) % w.steps();
        let mut r: Reading = w.reading(device, step);
        // Between two regular readings: a new row, not an overwrite.
        r.time += 60 + i as i64;
        r.water_level_cm = Some(500.0 + (seed * 100 + i) as f64);
        apply(expected, &r);
        lines.push(r.line());
    }
    lines.join("\n")
}

fn rollup_cycle(data: &Path, store_args: &[&str], env: &[(&str, &str)]) {
    let held = {
        let mut a = vec!["--compaction-settle", "1h", "--rollup-interval", "1h"];
        a.extend_from_slice(store_args);
        a
    };
    let live = {
        let mut a = vec!["--compaction-settle", "1h", "--rollup-interval", "200ms"];
        a.extend_from_slice(store_args);
        a
    };
    let server = Server::start_with_env(data, &held, env);
    let now = now_secs();
    let w = Workload {
        devices: 12,
        days: 3,
        interval_secs: 1200,
        start: now.div_euclid(DAY) * DAY - 2 * DAY,
        ..Workload::default()
    }
    .clean();
    let mut expected = w.expected();
    for body in chunks(&w.writes(), 700) {
        server.write_ok(DB, "s", body);
        server.flush(DB);
    }
    let (code, made) = call(
        &server,
        "POST",
        &format!("/api/v1/databases/{DB}/rollups"),
        Some(&definition()),
    );
    assert_eq!(code, 201, "{made}");
    assert_eq!(made["materialised"], false, "{made}");
    assert_eq!(made["tags"], json!(["device", "district"]));
    assert_eq!(made["retention"], "3650d");
    let qs = queries(w.start);
    let check = |server: &Server, expected: &Expected, what: &str| {
        let answers = duckdb_answers(expected.values(), &qs);
        assert_answers(server, DB, what, &qs, &answers);
    };
    check(&server, &expected, "computed from the raw rows at once");

    // Late rows (buffered, then some flushed) and deletes, none materialised.
    let late = late_rows(&w, &mut expected, 1, 15);
    server.write_ok(DB, "s", late);
    check(&server, &expected, "late rows in the buffer");
    server.flush(DB);
    let (from, to) = (w.start + DAY / 3, w.start + DAY);
    delete(
        &server,
        &format!(
            "DELETE FROM manhole WHERE device = 'mh-00003' AND time >= '{}' AND time < '{}'",
            sql_timestamp(from),
            sql_timestamp(to)
        ),
    );
    expected.retain(|_, r| !(r.device == 3 && r.time >= from && r.time < to));
    check(&server, &expected, "after a device's day is deleted");
    server.kill9();
    let server = Server::start_with_env(data, &live, env);
    check(&server, &expected, "after kill -9, as the refresher starts");
    wait_materialised(&server, "first refresh");
    check(&server, &expected, "materialised");

    // Changes to materialised buckets are recomputed.
    let late = late_rows(&w, &mut expected, 2, 20);
    server.write_ok(DB, "s", late);
    server.flush(DB);
    let n = delete(&server, "DELETE FROM manhole WHERE water_level_cm > 515");
    let before = expected.len();
    expected.retain(|_, r| r.water_level_cm.is_none_or(|l| l <= 515.0));
    assert_eq!(n, (before - expected.len()) as u64, "rows deleted by value");
    let gone = w.start + 2 * DAY + 5 * HOUR;
    delete(
        &server,
        &format!(
            "DELETE FROM manhole WHERE device = 'mh-00005' AND time >= '{}' AND time < '{}'",
            sql_timestamp(gone),
            sql_timestamp(gone + 3 * HOUR)
        ),
    );
    expected.retain(|_, r| !(r.device == 5 && r.time >= gone && r.time < gone + 3 * HOUR));
    check(
        &server,
        &expected,
        "late rows and deletes over materialised buckets",
    );
    wait_materialised(&server, "after late rows and deletes");
    check(&server, &expected, "recomputed");
    let stored = server.query_json(
        DB,
        "SELECT count(*) AS n FROM system.segments WHERE table_name = 'manhole_1h'",
    );
    assert!(
        stored[0]["n"].as_u64() > Some(0),
        "materialised rows are in segments"
    );

    // Gap filling over the rollup: the same answer as over the raw rows.
    let (a, b) = (
        sql_timestamp(gone - 2 * HOUR),
        sql_timestamp(gone + 6 * HOUR),
    );
    let over = |table: &str, high: &str, low: &str| {
        server.query_json(
            DB,
            &format!(
                "SELECT date_bin_gapfill(INTERVAL '1 hour', time) AS t, \
                 locf(max({high})) AS level, interpolate(min({low})) AS low \
                 FROM {table} WHERE device = 'mh-00005' AND time >= '{a}' AND time < '{b}' \
                 GROUP BY 1 ORDER BY 1"
            ),
        )
    };
    let filled = over("manhole_1h", "water_level_cm_max", "water_level_cm_min");
    assert_eq!(
        filled.len(),
        8,
        "every hour, the deleted ones filled: {filled:?}"
    );
    assert_eq!(filled, over("manhole", "water_level_cm", "water_level_cm"));

    // An alert rule reading the rollup fires on a late row.
    let hook = Receiver::start();
    let (code, body) = call(
        &server,
        "POST",
        "/api/v1/rules",
        Some(&json!({
            "name": "flooded-hour", "department": "water", "db": DB,
            "sql": "SELECT device, district, water_level_cm_max AS level FROM manhole_1h \
                    WHERE water_level_cm_max > 900",
            "every": "1s", "for": "0s", "severity": "critical",
            "annotations": {"summary": "{{device}} reached {{level}} cm"},
            "webhook": hook.url()
        })),
    );
    assert_eq!(code, 201, "{body}");
    let mut flood = w.reading(8, 30);
    flood.time += 90;
    flood.water_level_cm = Some(950.0);
    apply(&mut expected, &flood);
    server.write_ok(DB, "s", flood.line());
    hook.wait_for(
        |requests| {
            requests.iter().filter(|r| r.delivered()).any(|r| {
                r.alerts()
                    .iter()
                    .any(|a| a["status"] == "firing" && a["labels"]["device"] == "mh-00008")
            })
        },
        Duration::from_secs(30),
    );

    // Compaction changes nothing; a crash loses nothing.
    server.flush(DB);
    server.compact();
    check(&server, &expected, "after compaction");
    server.kill9();
    let server = Server::start_with_env(data, &live, env);
    check(&server, &expected, "after kill -9");
    wait_materialised(&server, "after the restart");

    // The source's retention cuts its first day: the rollup keeps those buckets.
    let cutoff = w.start + DAY + 2 * HOUR;
    let retention = now_secs() - cutoff;
    let (code, body) = server
        .client()
        .put(
            &format!("/api/v1/databases/{DB}/tables/manhole"),
            format!("{{\"retention\": \"{retention}s\"}}").as_bytes(),
        )
        .unwrap();
    assert_eq!(code, 200, "{body}");
    let raw = server.query_json(
        DB,
        &format!(
            "SELECT count(*) AS n FROM manhole WHERE time < '{}'",
            sql_timestamp(cutoff - HOUR)
        ),
    );
    assert_eq!(raw[0]["n"], 0, "the raw rows before the cutoff are gone");
    // An expired late row changes nothing; a retained one is counted.
    let mut expired = w.reading(2, 3);
    expired.time += 100;
    expired.water_level_cm = Some(777.0);
    server.write_ok(DB, "s", expired.line());
    let mut kept = w.reading(2, 3 * 40);
    assert!(kept.time > cutoff + HOUR);
    kept.time += 100;
    kept.water_level_cm = Some(666.0);
    apply(&mut expected, &kept);
    server.write_ok(DB, "s", kept.line());
    server.flush(DB);
    server.compact();
    check(
        &server,
        &expected,
        "buckets before the source's cutoff keep their values",
    );
    wait_materialised(&server, "after retention");
    check(&server, &expected, "materialised after retention");
    server.stop();
}

#[test]
fn rollups_answer_as_group_by_over_the_raw_rows() {
    let dir = tempfile::tempdir().unwrap();
    rollup_cycle(&dir.path().join("data"), &[], &[]);
}

#[test]
fn rollups_on_an_s3_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let s3 = S3Endpoint::start(&dir.path().join("moto.log"));
    let store = format!("s3://{BUCKET}/rollups");
    rollup_cycle(
        &dir.path().join("data"),
        &["--store", store.as_str()],
        &s3.env(),
    );
}

#[test]
fn rollups_are_defined_listed_refused_and_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"));
    server.write_ok(
        DB,
        "s",
        "manhole,device=mh-1,district=a water_level_cm=1.5,note=\"x\" 1764547200\n\
         manhole,device=mh-1,district=a water_level_cm=2.5 1764550800",
    );
    let path = format!("/api/v1/databases/{DB}/rollups");
    let refused = |patch: Value, code: u16, want: &str| {
        let mut body = definition();
        for (k, v) in patch.as_object().unwrap() {
            if v.is_null() {
                body.as_object_mut().unwrap().remove(k);
            } else {
                body[k] = v.clone();
            }
        }
        let (status, answer) = call(&server, "POST", &path, Some(&body));
        assert_eq!(status, code, "{body} should be refused: {answer}");
        let message = answer["error"].as_str().unwrap_or_default();
        assert!(message.contains(want), "{message:?} should say {want:?}");
    };
    let level_only = json!({"water_level_cm": ["max"]});
    refused(json!({"source": "sewers"}), 404, "table 'sewers' not found");
    refused(
        json!({"aggregates": {"depth": ["max"]}}),
        400,
        "field 'aggregates.depth': table 'manhole' has no field 'depth'",
    );
    refused(
        json!({"aggregates": {"note": ["avg"]}}),
        400,
        "avg does not apply to a string field",
    );
    refused(
        json!({"aggregates": {"water_level_cm": ["median"]}}),
        400,
        "unknown aggregate 'median'",
    );
    refused(
        json!({"aggregates": {"device": ["max"]}}),
        400,
        "not a field",
    );
    refused(json!({"aggregates": {}}), 400, "at least one field");
    refused(
        json!({"interval": "10ms", "aggregates": level_only}),
        400,
        "field 'interval'",
    );
    refused(
        json!({"interval": "an hour", "aggregates": level_only}),
        400,
        "field 'interval'",
    );
    refused(json!({"name": null}), 400, "field 'name' is missing");
    refused(json!({"name": "manhole"}), 400, "apart from its source");
    refused(json!({"intervl": "1h"}), 400, "unknown field 'intervl'");
    refused(json!({"retention": 5}), 400, "field 'retention'");
    let (status, answer) = call(&server, "POST", &path, Some(&json!([1])));
    assert_eq!(status, 400, "{answer}");
    let (status, answer) = call(
        &server,
        "POST",
        "/api/v1/databases/nowhere/rollups",
        Some(&definition()),
    );
    assert_eq!(status, 404, "{answer}");

    let mut def = definition();
    def["aggregates"] = json!({"water_level_cm": ["max", "count"]});
    let (status, made) = call(&server, "POST", &path, Some(&def));
    assert_eq!(status, 201, "{made}");
    assert_eq!(
        made["columns"],
        json!(["water_level_cm_max", "water_level_cm_count"])
    );
    let (status, again) = call(&server, "POST", &path, Some(&def));
    assert_eq!(status, 409, "{again}");
    let (status, listed) = call(&server, "GET", &path, None);
    assert_eq!(status, 200);
    assert_eq!(listed["rollups"][0]["name"], "manhole_1h", "{listed}");
    let rows = server.query_json(
        DB,
        "SELECT time, water_level_cm_max AS m, water_level_cm_count AS n FROM manhole_1h ORDER BY time",
    );
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(rows[1]["m"], 2.5);
    assert_eq!(
        server.query_json(
            DB,
            "SELECT count(*) AS n FROM system.tables WHERE table_name = 'manhole_1h'"
        )[0]["n"],
        1
    );

    // Its rows are computed: writes and deletes go to the source.
    let (status, body) = server.write(
        DB,
        "s",
        "manhole_1h,device=mh-1 water_level_cm_max=9 1764547200",
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("is a rollup of manhole"), "{body}");
    let (status, body) = server.query_post(DB, "DELETE FROM manhole_1h WHERE true", "json");
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("delete from 'manhole' instead"), "{body}");

    let (status, _) = call(&server, "GET", &format!("{path}/nothing"), None);
    assert_eq!(status, 404);
    let (status, _) = call(&server, "DELETE", &format!("{path}/nothing"), None);
    assert_eq!(status, 404);
    let (status, body) = call(&server, "DELETE", &format!("{path}/manhole_1h"), None);
    assert_eq!(status, 200, "{body}");
    let (status, body) = server.query_raw(DB, "SELECT * FROM manhole_1h", "json");
    assert_eq!(status, 400, "the dropped rollup's table is gone: {body}");
    // The name is free again, and a restart keeps what was dropped dropped.
    let (status, made) = call(&server, "POST", &path, Some(&def));
    assert_eq!(status, 201, "{made}");
    let (status, body) = call(&server, "DELETE", &format!("{path}/manhole_1h"), None);
    assert_eq!(status, 200, "{body}");
    server.kill9();
    let server = Server::start(&dir.path().join("data"));
    let (_, listed) = call(&server, "GET", &path, None);
    assert_eq!(listed["rollups"], json!([]), "{listed}");
    let (status, _) = server.query_raw(DB, "SELECT * FROM manhole_1h", "json");
    assert_eq!(status, 400);
    server.stop();
}
