//! What citytsdb adds to DataFusion's SQL, end to end over HTTP:
//!
//! - the latest reading of each of 10,000 devices comes from the in-memory series
//!   registry (`EXPLAIN ANALYZE` shows no segment read), equals what a scan gives
//!   and what was written, and survives a flush and `kill -9`;
//! - `system.devices` names the silent devices, counts each device's readings once
//!   across flushes and WAL replay, and `system.tables`/`system.segments` describe
//!   the storage; the alert tables exist, empty until rules are registered;
//! - a 10-million-row answer streams out in bounded server memory, and a query
//!   that fails after its first rows cuts the answer short instead of ending it
//!   as if whole;
//! - `EXPLAIN ANALYZE` gives every step its time and the scan its pruning.

use std::collections::BTreeMap;
use std::io::Read;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use citytsdb_tests::oracle::same_value;
use citytsdb_tests::workload::{chunks, device_name, Workload};
use citytsdb_tests::{Row, Server};
use serde_json::Value;

const DB: &str = "city";

const LATEST: &str =
    "SELECT DISTINCT ON (device) device, district, time, tilt_deg, water_level_cm, \
     battery_pct, cover_open FROM manhole ORDER BY device, time DESC";

/// The same question with a filter on a field, which the registry cannot answer:
/// it is planned as a scan of the table.
const LATEST_BY_SCAN: &str = "SELECT DISTINCT ON (device) device, district, time, tilt_deg, \
     water_level_cm, battery_pct, cover_open FROM manhole \
     WHERE battery_pct IS NULL OR battery_pct IS NOT NULL ORDER BY device, time DESC";

fn assert_same_rows(what: &str, got: &[Row], want: &[Row]) {
    assert_eq!(got.len(), want.len(), "{what}: row count");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let same = g.len() == w.len()
            && g.iter()
                .all(|(k, v)| w.get(k).is_some_and(|x| same_value(v, x)));
        assert!(
            same,
            "{what}: row {i} differs\n  got:  {g:?}\n  want: {w:?}"
        );
    }
}

fn check_latest(server: &Server, workload: &Workload, expected: &citytsdb_tests::Expected) {
    let latest = server.query_json(DB, LATEST);
    assert_eq!(latest.len(), workload.devices as usize);
    assert_same_rows(
        "latest from the registry vs a scan",
        &latest,
        &server.query_json(DB, LATEST_BY_SCAN),
    );
    // And against what was written: each device's row with the greatest time.
    let mut newest: BTreeMap<u32, &citytsdb_tests::Reading> = BTreeMap::new();
    for ((device, _), reading) in expected {
        newest.insert(*device, reading); // BTreeMap order: the last time wins.
    }
    for row in &latest {
        let device = row["device"].as_str().expect("device");
        let number: u32 = device[3..].parse().expect("device number");
        let want = newest[&number];
        let check = |column: &str, value: Value| {
            assert!(
                same_value(&row[column], &value),
                "{device} {column}: got {} want {value}",
                row[column]
            );
        };
        check(
            "time",
            Value::from(citytsdb_tests::workload::rfc3339(want.time)),
        );
        check("district", Value::from(want.district));
        check("tilt_deg", want.tilt_deg.map_or(Value::Null, Value::from));
        check(
            "water_level_cm",
            want.water_level_cm.map_or(Value::Null, Value::from),
        );
        check(
            "battery_pct",
            want.battery_pct.map_or(Value::Null, Value::from),
        );
        check(
            "cover_open",
            want.cover_open.map_or(Value::Null, Value::from),
        );
    }
    let plan = server.explain_analyze_text(DB, LATEST);
    assert!(
        plan.contains(&format!(
            "LastValueCacheExec: table=manhole series={}",
            workload.devices
        )),
        "the latest rows must come from the registry:\n{plan}"
    );
    assert!(
        !plan.contains("CityScanExec") && !plan.contains(".parquet"),
        "no segment may be read:\n{plan}"
    );
    // Tag filters and a lower time bound keep the answer exact: still from memory.
    let district = "SELECT DISTINCT ON (device) device, time, water_level_cm FROM manhole \
         WHERE district = '金水区' AND time >= '2025-12-01T12:00:00Z' ORDER BY device, time DESC";
    let plan = server.explain_analyze_text(DB, district);
    assert!(plan.contains("LastValueCacheExec"), "{plan}");
    assert_eq!(
        server.query_json(DB, district).len(),
        workload.devices_in("金水区").len()
    );
}

#[test]
fn latest_per_device_is_read_from_memory_and_survives_a_crash() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let workload = Workload {
        devices: 10_000,
        days: 1,
        interval_secs: 4 * 3_600,
        ..Workload::default()
    };
    let mut expected = workload.expected();
    let writes = workload.writes();
    let (early, late) = writes.split_at(writes.len() / 2);

    let server = Server::start(&data);
    for body in chunks(early, 20_000) {
        server.write_ok(DB, "s", body);
    }
    server.flush(DB);
    for body in chunks(late, 20_000) {
        server.write_ok(DB, "s", body);
    }
    // Later writes of existing rows, the newest among them, merge field by field.
    let overwrites = workload.overwrites(&mut expected, 2_000, 7);
    for body in chunks(&overwrites, 20_000) {
        server.write_ok(DB, "s", body);
    }
    check_latest(&server, &workload, &expected);

    // Half the rows in segments, half only in the WAL: kill -9 and read again.
    server.kill9();
    let server = Server::start(&data);
    check_latest(&server, &workload, &expected);
    server.flush(DB);
    check_latest(&server, &workload, &expected);
    server.stop();
}

/// A device that moved districts has a series in each; "latest" must still
/// mean its latest row, and a district filter must pick among that district's
/// rows before the latest is taken, from memory as from a scan.
#[test]
fn latest_follows_a_device_that_moved_and_filters_come_first() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&tmp.path().join("data"));
    let body = "manhole,device=d1,district=A water_level_cm=1 1000\n\
                manhole,device=d1,district=A water_level_cm=2 2000\n\
                manhole,device=d2,district=A water_level_cm=3 1500\n\
                manhole,device=d1,district=B water_level_cm=4 3000\n\
                manhole,device=d3,district=B water_level_cm=5 2500\n";
    server.write_ok(DB, "s", body);
    // The same question answered by a scan: a field in the filter keeps the
    // registry out.
    let by_scan = |sql: &str| {
        sql.replace(
            "ORDER BY",
            "AND (water_level_cm IS NULL OR water_level_cm IS NOT NULL) ORDER BY",
        )
    };
    let cases = [
        (
            "SELECT DISTINCT ON (device) device, district, water_level_cm FROM manhole \
             WHERE true ORDER BY device, time DESC",
            vec![("d1", "B", 4.0), ("d2", "A", 3.0), ("d3", "B", 5.0)],
        ),
        (
            "SELECT DISTINCT ON (device) device, district, water_level_cm FROM manhole \
             WHERE district = 'A' ORDER BY device, time DESC",
            vec![("d1", "A", 2.0), ("d2", "A", 3.0)],
        ),
        (
            "SELECT DISTINCT ON (district) device, district, water_level_cm FROM manhole m \
             WHERE m.time >= '1970-01-01T00:00:01.5Z' ORDER BY district DESC, time DESC",
            vec![("d1", "B", 4.0), ("d1", "A", 2.0)],
        ),
    ];
    for round in ["buffer", "segments"] {
        for (sql, want) in &cases {
            let got: Vec<(String, String, f64)> = server
                .query_json(DB, sql)
                .iter()
                .map(|r| {
                    (
                        r["device"].as_str().expect("device").to_string(),
                        r["district"].as_str().expect("district").to_string(),
                        r["water_level_cm"].as_f64().expect("level"),
                    )
                })
                .collect();
            let want: Vec<(String, String, f64)> = want
                .iter()
                .map(|(d, k, v)| (d.to_string(), k.to_string(), *v))
                .collect();
            assert_eq!(got, want, "{round}: {sql}");
            assert_same_rows(
                &format!("{round}: registry vs scan: {sql}"),
                &server.query_json(DB, sql),
                &server.query_json(DB, &by_scan(sql)),
            );
            let plan = server.explain_analyze_text(DB, sql);
            // The rows come out of LatestPerKeyExec in the answer's order.
            assert!(
                plan.contains("LastValueCacheExec")
                    && plan.contains("LatestPerKeyExec")
                    && !plan.contains("SortExec"),
                "{round}: {sql}\n{plan}"
            );
        }
        server.flush(DB);
    }
    // A tie-break after `time` is left to DataFusion's DISTINCT ON, over the
    // registry's rows all the same.
    let tie = "SELECT DISTINCT ON (district) device, district FROM manhole \
               ORDER BY district, time DESC, device DESC";
    let plan = server.explain_analyze_text(DB, tie);
    assert!(
        plan.contains("LastValueCacheExec") && !plan.contains("LatestPerKeyExec"),
        "{plan}"
    );
    let rows = server.query_json(DB, tie);
    let got: Vec<(&str, &str)> = rows
        .iter()
        .map(|r| {
            (
                r["district"].as_str().unwrap(),
                r["device"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(got, vec![("A", "d1"), ("B", "d1")]);
    server.stop();
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64
}

#[test]
fn system_devices_finds_the_silent_ones_and_counts_once() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let now = now_secs();
    let reading = |device: u32, district: &str, age_secs: i64, level: f64| {
        format!(
            "manhole,device={},district={district} water_level_cm={level} {}\n",
            device_name(device),
            now - age_secs
        )
    };
    let server = Server::start(&data);
    // Devices 1-3 reported a minute ago, 4 and 5 half an hour ago; device 6 only
    // reports parking, and device 7 never reported at all.
    let mut body = String::new();
    for device in 1..=5 {
        let recent = if device <= 3 { 60 } else { 1_800 };
        for (i, age) in [recent + 600, recent + 300, recent].into_iter().enumerate() {
            body += &reading(device, "金水区", age, 50.0 + i as f64);
        }
    }
    body += &format!(
        "parking,device={} occupied=3i {}\n",
        device_name(6),
        now - 30
    );
    server.write_ok(DB, "s", &body);
    server.flush(DB);
    // Two more readings of device 1 after the flush (in the WAL only), one of them
    // from a new district: the device moved.
    let more = reading(1, "二七区", 30, 61.0) + &reading(1, "二七区", 20, 62.0);
    server.write_ok(DB, "s", more);
    server.kill9();
    let server = Server::start(&data);

    let silent = server.query_json(
        DB,
        "SELECT device, district FROM system.devices WHERE table_name = 'manhole' \
         AND last_time < now() - INTERVAL '10 minutes' ORDER BY device",
    );
    let names: Vec<&str> = silent
        .iter()
        .map(|r| r["device"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec![device_name(4), device_name(5)]);

    let devices = server.query_json(
        DB,
        "SELECT table_name, device, district, first_time, last_time, rows, tags FROM system.devices \
         ORDER BY table_name, device",
    );
    assert_eq!(devices.len(), 6, "{devices:?}");
    let one = &devices[0];
    assert_eq!(one["device"], device_name(1));
    assert_eq!(
        one["rows"], 5,
        "3 flushed + 2 replayed, each counted once: {one:?}"
    );
    assert_eq!(
        one["district"], "二七区",
        "the district of the latest reading"
    );
    assert_eq!(
        one["first_time"],
        citytsdb_tests::workload::rfc3339(now - 660)
    );
    assert_eq!(
        one["last_time"],
        citytsdb_tests::workload::rfc3339(now - 20)
    );
    assert_eq!(
        one["tags"],
        format!(
            "{{\"device\":\"{}\",\"district\":\"二七区\"}}",
            device_name(1)
        ),
        "the tags of the latest reading, as a JSON object with its keys in order"
    );
    assert_eq!(devices[5]["table_name"], "parking");
    assert_eq!(devices[5]["rows"], 1);

    let tables = server.query_json(
        DB,
        "SELECT table_name, tags, fields, series, segments, segment_rows, buffered_rows \
         FROM system.tables ORDER BY table_name",
    );
    assert_eq!(tables.len(), 2);
    assert_eq!(tables[0]["table_name"], "manhole");
    assert_eq!(tables[0]["tags"], "device,district");
    assert_eq!(
        tables[0]["series"], 6,
        "five devices, one of them in two districts"
    );
    assert_eq!(tables[0]["segment_rows"], 15);
    assert_eq!(tables[0]["buffered_rows"], 2);
    let segments = server.query_json(
        DB,
        "SELECT table_name, sum(rows) AS rows, count(*) AS n FROM system.segments \
         GROUP BY table_name ORDER BY table_name",
    );
    assert_eq!(segments[0]["rows"], 15);
    assert_eq!(segments[1]["rows"], 1);

    for table in ["rules", "alerts", "alert_events"] {
        let rows = server.query_json(DB, &format!("SELECT count(*) AS n FROM system.{table}"));
        assert_eq!(rows[0]["n"], 0, "system.{table}");
    }
    let columns = server.query_json(DB, "SHOW COLUMNS FROM system.devices");
    let names: Vec<&str> = columns
        .iter()
        .map(|r| r["column_name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "table_name",
            "device",
            "district",
            "first_time",
            "last_time",
            "rows",
            "tags"
        ]
    );
    server.stop();
}

fn agent() -> ureq::Agent {
    ureq::Agent::new_with_config(
        ureq::config::Config::builder()
            .timeout_global(Some(Duration::from_secs(300)))
            .http_status_as_error(false)
            .build(),
    )
}

/// Peak resident memory of a process, bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .expect("VmHWM line");
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("VmHWM value");
    kb * 1024
}

#[test]
fn ten_million_rows_stream_in_bounded_memory() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&tmp.path().join("data"));
    server.write_ok(DB, "s", "manhole,device=mh-00001 tilt_deg=1.5 1764547200\n");
    let before = peak_rss(server.pid());
    // About 330 MB of JSON lines, 240 MB as Arrow in memory if collected.
    let sql = "SELECT value, value * 2 AS doubled, 'reading-' || value AS label \
               FROM generate_series(1, 10000000)";
    let mut response = agent()
        .get(format!("{}/api/v1/query", server.url()))
        .query("db", DB)
        .query("sql", sql)
        .query("format", "jsonl")
        .call()
        .expect("query");
    assert_eq!(response.status(), 200);
    let mut reader = response.body_mut().with_config().limit(u64::MAX).reader();
    let mut buf = vec![0u8; 1 << 20];
    let (mut lines, mut bytes) = (0u64, 0u64);
    let mut last = 0u8;
    loop {
        let n = reader.read(&mut buf).expect("read the answer");
        if n == 0 {
            break;
        }
        lines += buf[..n].iter().filter(|&&b| b == b'\n').count() as u64;
        bytes += n as u64;
        last = buf[n - 1];
    }
    assert_eq!(lines, 10_000_000);
    assert_eq!(last, b'\n');
    let peak = peak_rss(server.pid());
    assert!(
        peak < before + 150 * 1024 * 1024,
        "the server's peak memory grew from {before} to {peak} bytes while streaming {bytes} bytes"
    );

    // A failure after the first rows went out: the answer must not look whole.
    let failing = "SELECT value, 100 / (value - 3000000) AS q FROM generate_series(1, 5000000)";
    let mut response = agent()
        .get(format!("{}/api/v1/query", server.url()))
        .query("db", DB)
        .query("sql", failing)
        .query("format", "json")
        .call()
        .expect("query");
    assert_eq!(
        response.status(),
        200,
        "the first rows went out before the failure"
    );
    let mut text = Vec::new();
    let read = response
        .body_mut()
        .with_config()
        .limit(u64::MAX)
        .reader()
        .read_to_end(&mut text);
    assert!(
        read.is_err() || !text.ends_with(b"]"),
        "an answer cut short by an error must not end like a whole JSON array"
    );
    assert!(server.is_healthy());
    server.stop();
}

#[test]
fn explain_analyze_times_every_step() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&tmp.path().join("data"));
    let workload = Workload {
        devices: 50,
        ..Workload::default()
    };
    for body in chunks(&workload.writes(), 20_000) {
        server.write_ok(DB, "s", body);
    }
    server.flush(DB);
    let sql =
        "SELECT district, date_bin(INTERVAL '1 hour', time) AS hour, avg(water_level_cm) AS level \
               FROM manhole WHERE device = 'mh-00007' GROUP BY district, hour ORDER BY hour";
    let plan = server.explain_analyze_text(DB, sql);
    let steps: Vec<&str> = plan.lines().filter(|l| l.contains("Exec")).collect();
    assert!(steps.len() >= 4, "{plan}");
    for step in &steps {
        if step.contains("DataSourceExec") {
            assert!(step.contains("time_elapsed_processing="), "{step}");
        } else if step.contains("CityScanExec") {
            assert!(step.contains("scan_time="), "{step}");
            assert!(step.contains("output_rows=288"), "{step}");
            assert!(step.contains("segments_opened=1"), "{step}");
        } else {
            assert!(step.contains("elapsed_compute="), "{step}");
        }
    }
    server.stop();
}
