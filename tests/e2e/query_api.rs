//! The query API beyond JSON: Arrow IPC and Parquet answers (decoded by pyarrow and
//! compared with the JSON answer), InfluxDB 3's `/api/v3/query_sql`, the
//! `citytsdb query` command, and the per-query time and memory limits.

use std::process::Command;
use std::time::Duration;

use citytsdb_tests::server::binary;
use citytsdb_tests::Server;
use serde_json::Value;

const DB: &str = "city";
const SQL: &str = "SELECT time, device, district, tilt_deg, battery_pct FROM manhole WHERE device IN ('mh-00001', 'mh-00003') ORDER BY device, time LIMIT 50";

fn city(server: &Server, devices: u32, minutes: u32) {
    let mut body = String::new();
    for d in 1..=devices {
        for m in 0..minutes {
            body.push_str(&format!(
                "manhole,device=mh-{d:05},district=管城区 tilt_deg={}.{},battery_pct={}i {}\n",
                m % 20,
                d % 10,
                90 + d % 7,
                1_764_547_200 + i64::from(m) * 60
            ));
        }
    }
    server.write_ok(DB, "s", body);
}

fn get_bytes(server: &Server, path: &str, params: &[(&str, &str)]) -> (u16, String, Vec<u8>) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .into();
    let mut req = agent.get(format!("{}{path}", server.url()));
    for (k, v) in params {
        req = req.query(*k, *v);
    }
    let mut resp = req.call().expect("the server answers");
    let status = resp.status().as_u16();
    let ctype = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = resp.body_mut().read_to_vec().expect("read the body");
    (status, ctype, body)
}

/// Decodes an Arrow IPC stream or Parquet file with pyarrow into JSON rows shaped like
/// the server's `json` format.
fn pyarrow_rows(kind: &str, bytes: &[u8]) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("answer");
    std::fs::write(&file, bytes).unwrap();
    let script = r#"
import json, sys
import pyarrow as pa, pyarrow.ipc, pyarrow.parquet
kind, path = sys.argv[1], sys.argv[2]
table = pa.ipc.open_stream(open(path, 'rb')).read_all() if kind == 'arrow' else pa.parquet.read_table(path)
def value(v):
    if hasattr(v, 'isoformat'):
        s = v.strftime('%Y-%m-%dT%H:%M:%S')
        return s + 'Z'
    return v
print(json.dumps([{k: value(v) for k, v in row.items()} for row in table.to_pylist()]))
"#;
    let out = Command::new("python3")
        .args(["-c", script, kind, file.to_str().unwrap()])
        .output()
        .expect("run python3 (python3 -m pip install -r tests/requirements.txt)");
    assert!(
        out.status.success(),
        "pyarrow could not read the {kind} answer: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn arrow_parquet_and_query_sql_answer_like_json() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"));
    city(&server, 5, 30);
    let (status, _, json) = get_bytes(
        &server,
        "/api/v1/query",
        &[("db", DB), ("sql", SQL), ("format", "json")],
    );
    assert_eq!(status, 200);
    let json: Value = serde_json::from_slice(&json).unwrap();
    assert_eq!(json.as_array().unwrap().len(), 50);

    for (format, ctype) in [
        ("arrow", "application/vnd.apache.arrow.stream"),
        ("parquet", "application/vnd.apache.parquet"),
    ] {
        let (status, got_type, body) = get_bytes(
            &server,
            "/api/v1/query",
            &[("db", DB), ("sql", SQL), ("format", format)],
        );
        assert_eq!((status, got_type.as_str()), (200, ctype));
        assert_eq!(
            pyarrow_rows(format, &body),
            json,
            "{format} answer differs from the json one"
        );
    }

    let (status, _, v3) = get_bytes(
        &server,
        "/api/v3/query_sql",
        &[("db", DB), ("q", SQL), ("format", "json")],
    );
    assert_eq!(status, 200);
    assert_eq!(serde_json::from_slice::<Value>(&v3).unwrap(), json);
    let (status, body) = server
        .client()
        .query_post_raw(format!(r#"{{"db": "{DB}", "q": "{SQL}", "format": "json"}}"#).as_bytes())
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let (status, body) = {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        let mut r = agent
            .post(format!("{}/api/v3/query_sql", server.url()))
            .content_type("application/json")
            .send(format!(
                r#"{{"db": "{DB}", "q": "{SQL}", "format": "json"}}"#
            ))
            .unwrap();
        (r.status().as_u16(), r.body_mut().read_to_string().unwrap())
    };
    assert_eq!(status, 200, "{body}");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap(), json);
    let (status, _, body) = get_bytes(
        &server,
        "/api/v1/query",
        &[("db", DB), ("sql", SQL), ("format", "xml")],
    );
    assert_eq!(status, 400);
    assert!(String::from_utf8_lossy(&body).contains("unknown format 'xml'"));
}

#[test]
fn time_bucket_buckets_like_date_bin() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"));
    city(&server, 4, 45);
    let by = |f: &str| {
        server.query_json(
            DB,
            &format!("SELECT {f}(INTERVAL '10 minutes', time) AS bucket, count(*) AS n, avg(tilt_deg) AS tilt FROM manhole GROUP BY bucket ORDER BY bucket"),
        )
    };
    let buckets = by("time_bucket");
    assert_eq!(buckets, by("date_bin"));
    assert_eq!(buckets.len(), 5);
    assert_eq!(buckets[0]["bucket"], "2025-12-01T00:00:00Z");
    assert_eq!(buckets[4]["bucket"], "2025-12-01T00:40:00Z");
    assert_eq!(buckets[4]["n"], 20);
}

#[test]
fn the_query_command_prints_a_table_and_explains_errors() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"));
    city(&server, 3, 2);
    let run = |args: &[&str]| {
        Command::new(binary())
            .arg("query")
            .args(args)
            .args(["--db", DB, "--url", server.url()])
            .output()
            .expect("run citytsdb query")
    };
    let out = run(&["SELECT device, count(*) AS n FROM manhole GROUP BY device ORDER BY device"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "+----------+---+\n| device   | n |\n+----------+---+\n| mh-00001 | 2 |\n| mh-00002 | 2 |\n| mh-00003 | 2 |\n+----------+---+\n"
    );
    let out = run(&[
        "SELECT device FROM manhole ORDER BY device LIMIT 1",
        "--format",
        "csv",
    ]);
    assert_eq!(String::from_utf8(out.stdout).unwrap(), "device\nmh-00001\n");
    let out = run(&["SELECT nope FROM manhole"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("nope") && err.contains("line 1, column 8"),
        "{err}"
    );
}

#[test]
fn a_query_past_its_time_limit_is_stopped_and_others_carry_on() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(&dir.path().join("data"), &["--query-timeout", "300ms"]);
    city(&server, 200, 100);
    // Ten billion rows from a table function: far past the limit, and, as a scan, it
    // yields to the scheduler so the abort lands.
    let (status, body) = server.query_raw(
        DB,
        "SELECT count(*) FROM generate_series(1, 10000000000)",
        "json",
    );
    assert_eq!(status, 408, "{body}");
    assert!(body.contains("time limit of 300ms"), "{body}");
    // The runaway join was cancelled: an ordinary query fits in the same limit at once.
    assert!(server.is_healthy());
    let rows = server.query_json(DB, "SELECT count(*) AS n FROM manhole");
    assert_eq!(rows[0]["n"], 20_000);
}

#[test]
fn a_query_past_its_memory_limit_is_stopped_and_others_carry_on() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(
        &dir.path().join("data"),
        &["--query-memory-limit", "256KiB"],
    );
    city(&server, 200, 100);
    let (status, body) = server.query_raw(
        DB,
        "SELECT count(*) FROM manhole a JOIN manhole b ON a.device = b.device AND a.district = b.district",
        "json",
    );
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("memory limit of 262144 bytes"), "{body}");
    assert!(server.is_healthy());
    let rows = server.query_json(DB, "SELECT count(*) AS n FROM manhole");
    assert_eq!(rows[0]["n"], 20_000);
}

/// All running queries share `--query-memory-total`: a query that needs more than
/// is left of it is refused as the server's being busy (503, `Retry-After`), not as
/// its own fault, while it fits its own `--query-memory-limit`.
#[test]
fn queries_past_the_shared_memory_are_told_to_come_back() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(
        &dir.path().join("data"),
        &[
            "--query-memory-limit",
            "64MiB",
            "--query-memory-total",
            "256KiB",
        ],
    );
    city(&server, 200, 100);
    let r = ureq::Agent::new_with_config(
        ureq::config::Config::builder()
            .http_status_as_error(false)
            .build(),
    )
    .post(format!("{}/api/v1/query", server.url()))
    .send(
        serde_json::json!({
            "db": DB,
            "sql": "SELECT count(*) FROM manhole a JOIN manhole b ON a.device = b.device AND a.district = b.district",
        })
        .to_string(),
    );
    let mut r = r.unwrap();
    let status = r.status().as_u16();
    let retry = r
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    let body = r.body_mut().read_to_string().unwrap();
    assert_eq!(status, 503, "{body}");
    assert_eq!(retry.as_deref(), Some("1"));
    assert!(body.contains("--query-memory-total"), "{body}");
    assert!(server.is_healthy());
    let rows = server.query_json(DB, "SELECT count(*) AS n FROM manhole");
    assert_eq!(rows[0]["n"], 20_000);
}
