//! One device's day out of 30 days of the whole city reads one segment and a
//! sliver of its pages, and a district's day is picked out by the bitmaps.
//!
//! 1,000 covers report hourly for 30 days (720,000 rows), flushed to one segment
//! per UTC day. `EXPLAIN ANALYZE` must show the time range pruning 29 of the 30
//! segments and the tag bitmaps narrowing the reads inside the one left.

use std::collections::HashMap;

use citytsdb_tests::oracle::same_value;
use citytsdb_tests::workload::{chunks, device_name, rfc3339, Workload, DAY};
use citytsdb_tests::Server;

const DB: &str = "city";

fn metric(metrics: &HashMap<String, u64>, key: &str, sql: &str) -> u64 {
    *metrics
        .get(key)
        .unwrap_or_else(|| panic!("CityScanExec has no {key}= for {sql}: {metrics:?}"))
}

#[test]
fn one_device_one_day_opens_one_segment_and_few_pages() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let workload = Workload {
        devices: 1_000,
        days: 30,
        interval_secs: 3_600,
        ..Workload::default()
    }
    .clean();
    assert_eq!(workload.rows(), 720_000);

    let server = Server::start(&data);
    for body in chunks(&workload.writes(), 20_000) {
        server.write_ok(DB, "s", body);
    }
    let segments = server.flush(DB);
    assert_eq!(
        segments, 30,
        "30 UTC days of one table flush to 30 segments"
    );
    let total = server.query_json(DB, "SELECT count(*) AS n FROM manhole");
    assert_eq!(total[0]["n"].as_u64(), Some(720_000));

    // One device, one day.
    let device = 42;
    let day_start = workload.start + 9 * DAY;
    let (from, to) = (rfc3339(day_start), rfc3339(day_start + DAY));
    assert_eq!(from, "2025-12-10T00:00:00Z");
    let sql = format!(
        "SELECT * FROM manhole WHERE device = '{}' AND time >= '{from}' AND time < '{to}'",
        device_name(device)
    );
    let m = server.explain_analyze_metrics(DB, &sql);
    let report = format!("{sql}\n  metrics: {m:?}");
    assert_eq!(metric(&m, "segments_total", &sql), 30, "{report}");
    assert_eq!(metric(&m, "segments_opened", &sql), 1, "{report}");
    assert_eq!(metric(&m, "rows_total", &sql), 720_000, "{report}");
    assert_eq!(metric(&m, "rows_selected", &sql), 24, "{report}");
    let decoded = metric(&m, "rows_decoded", &sql);
    assert!(decoded >= 24, "{report}");
    assert!(
        decoded * 200 < 720_000,
        "rows_decoded {decoded} is not well under 1% (under 0.5%) of the table: {report}"
    );

    let rows = server.query_json(DB, &format!("{sql} ORDER BY time"));
    assert_eq!(rows.len(), 24, "{sql}");
    for (hour, row) in rows.iter().enumerate() {
        let want = workload.reading(device, 9 * 24 + hour as u64);
        assert_eq!(row["device"], "mh-00042");
        assert_eq!(row["district"], want.district);
        assert_eq!(row["time"], rfc3339(want.time).as_str());
        for (field, value) in [
            ("tilt_deg", serde_json::json!(want.tilt_deg)),
            ("water_level_cm", serde_json::json!(want.water_level_cm)),
            ("battery_pct", serde_json::json!(want.battery_pct)),
            ("cover_open", serde_json::json!(want.cover_open)),
        ] {
            assert!(
                same_value(&row[field], &value),
                "hour {hour} {field}: got {}, want {value}",
                row[field]
            );
        }
    }

    // One district, one day: one segment, and the district's bitmap selects
    // exactly its rows.
    let district = "二七区";
    let day_start = workload.start + 19 * DAY;
    let (from, to) = (rfc3339(day_start), rfc3339(day_start + DAY));
    let want_rows = workload.devices_in(district).len() as u64 * 24;
    assert!(want_rows > 0);
    let filter = format!("district = '{district}' AND time >= '{from}' AND time < '{to}'");
    let sql = format!("SELECT * FROM manhole WHERE {filter}");
    let m = server.explain_analyze_metrics(DB, &sql);
    let report = format!("{sql}\n  metrics: {m:?}");
    assert_eq!(metric(&m, "segments_total", &sql), 30, "{report}");
    assert_eq!(metric(&m, "segments_opened", &sql), 1, "{report}");
    assert_eq!(metric(&m, "rows_selected", &sql), want_rows, "{report}");
    assert!(metric(&m, "rows_decoded", &sql) >= want_rows, "{report}");
    let count = server.query_json(
        DB,
        &format!("SELECT count(*) AS n FROM manhole WHERE {filter}"),
    );
    assert_eq!(count[0]["n"].as_u64(), Some(want_rows));
    server.stop();
}
