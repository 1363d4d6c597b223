//! What comes back: the four text formats of one small answer, UTF-8 tags,
//! NULLs, and the merge rule for a series written twice at the same time,
//! wherever the first copy lives (buffer, segment, WAL replayed after a crash).

use serde_json::{json, Value};

use citytsdb_tests::oracle::same_value;
use citytsdb_tests::server::parse_json_rows;
use citytsdb_tests::Server;

/// Three covers; mh-00003 reports no water level and reports half a second past
/// the minute (written with precision=ms).
const ROWS_MS: &str = "\
manhole,device=mh-00001,district=金水区 tilt_deg=0.51,water_level_cm=23.4,battery_pct=87i,cover_open=false 1764547200000
manhole,device=mh-00002,district=high\\ tech tilt_deg=1.25,water_level_cm=30.2,battery_pct=90i,cover_open=true 1764547500000
manhole,device=mh-00003,district=二七区 tilt_deg=0.49,battery_pct=55i,cover_open=false 1764547800500
";

const QUERY: &str =
    "SELECT time, device, district, water_level_cm, battery_pct, cover_open FROM manhole ORDER BY device";
const COLUMNS: [&str; 6] = [
    "time",
    "device",
    "district",
    "water_level_cm",
    "battery_pct",
    "cover_open",
];

fn expected_rows() -> Value {
    json!([
        {"time": "2025-12-01T00:00:00Z", "device": "mh-00001", "district": "金水区",
         "water_level_cm": 23.4, "battery_pct": 87, "cover_open": false},
        {"time": "2025-12-01T00:05:00Z", "device": "mh-00002", "district": "high tech",
         "water_level_cm": 30.2, "battery_pct": 90, "cover_open": true},
        {"time": "2025-12-01T00:10:00.5Z", "device": "mh-00003", "district": "二七区",
         "water_level_cm": null, "battery_pct": 55, "cover_open": false},
    ])
}

/// The columns appear in the object's text in SELECT order.
fn assert_column_order(object_text: &str) {
    let positions: Vec<usize> = COLUMNS
        .iter()
        .map(|c| {
            object_text
                .find(&format!("\"{c}\""))
                .unwrap_or_else(|| panic!("no {c} in {object_text}"))
        })
        .collect();
    assert!(
        positions.windows(2).all(|w| w[0] < w[1]),
        "columns out of SELECT order: {object_text}"
    );
}

fn ok(server: &Server, sql: &str, format: &str) -> String {
    let (status, body) = server.query_raw("fmt", sql, format);
    assert_eq!(status, 200, "format={format}: {body}");
    body
}

#[test]
fn four_formats_utf8_and_nulls() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&tmp.path().join("data"));
    server.write_ok("fmt", "ms", ROWS_MS);

    // json: an array of row objects, NULL as null, fraction digits only as needed.
    let body = ok(&server, QUERY, "json");
    let value: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("json ({e}): {body}"));
    assert_eq!(value, expected_rows(), "{body}");
    assert_column_order(&body[..body.find('}').unwrap_or(body.len())]);

    // jsonl: one object a line.
    let body = ok(&server, QUERY, "jsonl");
    let lines: Vec<&str> = body.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 3, "{body}");
    for (line, want) in lines
        .iter()
        .zip(expected_rows().as_array().into_iter().flatten())
    {
        let got: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("jsonl line ({e}): {line}"));
        assert_eq!(&got, want);
        assert_column_order(line);
    }

    // csv: a header, then rows; NULL is an empty cell.
    let body = ok(&server, QUERY, "csv");
    assert_eq!(
        body.trim_end_matches('\n'),
        "time,device,district,water_level_cm,battery_pct,cover_open\n\
         2025-12-01T00:00:00Z,mh-00001,金水区,23.4,87,false\n\
         2025-12-01T00:05:00Z,mh-00002,high tech,30.2,90,true\n\
         2025-12-01T00:10:00.5Z,mh-00003,二七区,,55,false",
        "csv answer:\n{body}"
    );
    let (status, posted) = server.query_post("fmt", QUERY, "csv");
    assert_eq!((status, posted), (200, body), "POST answers as GET does");

    // pretty: an aligned text table (its border style is not part of the
    // contract): every line equally wide, header and values in order.
    let sql = "SELECT device, battery_pct, cover_open FROM manhole ORDER BY device";
    let body = ok(&server, sql, "pretty");
    let lines: Vec<&str> = body.lines().filter(|l| !l.trim().is_empty()).collect();
    let width = lines.first().map(|l| l.chars().count()).unwrap_or(0);
    assert!(
        lines.iter().all(|l| l.chars().count() == width),
        "pretty table is not aligned:\n{body}"
    );
    let in_order = |line: &str, words: &[&str]| {
        let mut at = 0;
        words.iter().all(|w| match line[at..].find(w) {
            Some(i) => {
                at += i + w.len();
                true
            }
            None => false,
        })
    };
    assert!(
        lines
            .iter()
            .any(|l| in_order(l, &["device", "battery_pct", "cover_open"])),
        "{body}"
    );
    for want in [
        ["mh-00001", "87", "false"],
        ["mh-00002", "90", "true"],
        ["mh-00003", "55", "false"],
    ] {
        assert!(
            lines.iter().any(|l| in_order(l, &want)),
            "no row {want:?} in:\n{body}"
        );
    }

    // UTF-8 tags round-trip through SQL literals, GET and POST; strings sort by
    // their UTF-8 bytes.
    let sql = "SELECT device, district FROM manhole WHERE district = '金水区'";
    assert_eq!(
        Value::Array(
            server
                .query_json("fmt", sql)
                .into_iter()
                .map(Value::Object)
                .collect()
        ),
        json!([{"device": "mh-00001", "district": "金水区"}])
    );
    let (status, body) = server.query_post(
        "fmt",
        "SELECT device FROM manhole WHERE district LIKE '二%'",
        "json",
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).ok(),
        Some(json!([{"device": "mh-00003"}]))
    );
    let sql = "SELECT district, count(*) AS n FROM manhole GROUP BY district ORDER BY district";
    let rows = server.query_json("fmt", sql);
    let districts: Vec<&str> = rows.iter().filter_map(|r| r["district"].as_str()).collect();
    assert_eq!(districts, ["high tech", "二七区", "金水区"]);

    // NULL: a field a row never had.
    let rows = server.query_json(
        "fmt",
        "SELECT device, water_level_cm FROM manhole WHERE water_level_cm IS NULL",
    );
    assert_eq!(
        Value::Array(rows.into_iter().map(Value::Object).collect()),
        json!([{"device": "mh-00003", "water_level_cm": null}])
    );
    server.stop();
}

const T: i64 = 1_764_547_200;
const SERIES: &str = "manhole,device=mh-00009,district=zhengdong";

/// The three rows of the merge database, ordered by device, district, time:
/// the series under test at T, the same series at T + 300, and the same device
/// in another district (another series) at T.
fn merge_rows(server: &Server) -> Vec<Value> {
    let sql = "SELECT time, device, district, tilt_deg, water_level_cm, battery_pct, cover_open \
               FROM manhole ORDER BY device, district, time";
    let (status, body) = server.query_raw("merge", sql, "json");
    assert_eq!(status, 200, "{body}");
    parse_json_rows(&body)
        .unwrap_or_else(|e| panic!("{e}: {body}"))
        .into_iter()
        .map(Value::Object)
        .collect()
}

fn assert_merged(server: &Server, stage: &str, at_t: (f64, f64, i64, bool), at_t2_level: f64) {
    let row = |time: &str, district: &str, (tilt, level, battery, open): (f64, f64, i64, bool)| {
        json!({"time": time, "device": "mh-00009", "district": district, "tilt_deg": tilt,
               "water_level_cm": level, "battery_pct": battery, "cover_open": open})
    };
    let want = [
        row("2025-12-01T00:00:00Z", "zhengdong", at_t),
        row(
            "2025-12-01T00:05:00Z",
            "zhengdong",
            (0.6, at_t2_level, 79, false),
        ),
        row("2025-12-01T00:00:00Z", "二七区", (9.99, 99.9, 1, true)),
    ];
    let got = merge_rows(server);
    let same = got.len() == want.len()
        && got.iter().zip(&want).all(|(g, w)| {
            let (g, w) = (g.as_object().expect("row"), w.as_object().expect("row"));
            g.len() == w.len()
                && w.iter()
                    .all(|(k, v)| g.get(k).is_some_and(|gv| same_value(gv, v)))
        });
    if !same {
        server.fail(&format!(
            "{stage}:\n  got  {}\n  want {}",
            json!(got),
            json!(want)
        ));
    }
}

#[test]
fn same_series_and_time_merges_in_buffer_segments_and_wal() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let server = Server::start(&data);
    let write = |server: &Server, body: String| server.write_ok("merge", "s", body);

    write(&server, format!(
        "{SERIES} tilt_deg=0.5,water_level_cm=40.1,battery_pct=80i,cover_open=false {T}\n\
         {SERIES} tilt_deg=0.6,water_level_cm=41.1,battery_pct=79i,cover_open=false {}\n\
         manhole,device=mh-00009,district=二七区 tilt_deg=9.99,water_level_cm=99.9,battery_pct=1i,cover_open=true {T}\n",
        T + 300
    ));
    assert_merged(&server, "first writes", (0.5, 40.1, 80, false), 41.1);

    // Over a copy in the buffer: only the water level changes.
    write(&server, format!("{SERIES} water_level_cm=55.5 {T}"));
    assert_merged(
        &server,
        "merge over the buffer",
        (0.5, 55.5, 80, false),
        41.1,
    );
    server.flush("merge");
    assert_merged(&server, "after a flush", (0.5, 55.5, 80, false), 41.1);

    // Over a copy in a segment.
    write(
        &server,
        format!("{SERIES} battery_pct=78i,cover_open=true {T}"),
    );
    assert_merged(&server, "merge over a segment", (0.5, 55.5, 78, true), 41.1);
    server.flush("merge");
    assert_merged(
        &server,
        "two segments hold the row",
        (0.5, 55.5, 78, true),
        41.1,
    );

    // Within one request the later line wins.
    write(
        &server,
        format!(
            "{SERIES} water_level_cm=1.1 {}\n{SERIES} water_level_cm=2.2 {}\n",
            T + 300,
            T + 300
        ),
    );
    assert_merged(
        &server,
        "two lines of one request",
        (0.5, 55.5, 78, true),
        2.2,
    );

    // Across a graceful restart.
    write(&server, format!("{SERIES} tilt_deg=3.25 {T}"));
    server.stop();
    let server = Server::start(&data);
    assert_merged(
        &server,
        "after a graceful restart",
        (3.25, 55.5, 78, true),
        2.2,
    );

    // Replayed from the WAL over segments after kill -9.
    write(&server, format!("{SERIES} water_level_cm=60.2 {T}"));
    server.kill9();
    let server = Server::start(&data);
    assert_merged(
        &server,
        "WAL replay after kill -9",
        (3.25, 60.2, 78, true),
        2.2,
    );

    // A write carrying every field replaces them all.
    write(
        &server,
        format!("{SERIES} tilt_deg=0.45,water_level_cm=12.3,battery_pct=77i,cover_open=false {T}"),
    );
    server.kill9();
    let server = Server::start(&data);
    assert_merged(
        &server,
        "full overwrite after kill -9",
        (0.45, 12.3, 77, false),
        2.2,
    );
    server.stop();
}
