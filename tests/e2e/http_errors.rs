//! Bad input gets a 4xx that says what is wrong and where; nothing gets a 5xx,
//! and the server keeps serving afterwards.

use serde_json::Value;

use citytsdb_tests::Server;

const DB: &str = "city";

/// Rows every test starts from; they establish the manhole schema (tilt_deg and
/// water_level_cm float, battery_pct integer, cover_open boolean).
const SEED_ROWS: &str = "\
manhole,device=mh-00101,district=zhengdong tilt_deg=0.5,water_level_cm=20.1,battery_pct=80i,cover_open=false 1764547200
manhole,device=mh-00102,district=金水区 tilt_deg=0.61,water_level_cm=33.3,battery_pct=77i,cover_open=true 1764547200
manhole,device=mh-00103,district=high\\ tech tilt_deg=0.42,water_level_cm=41,battery_pct=90i,cover_open=false 1764547200
";

fn seeded_server(data: &std::path::Path) -> Server {
    let server = Server::start(data);
    server.write_ok(DB, "s", SEED_ROWS);
    server
}

/// Fails the test on a 5xx; passes the answer through otherwise.
fn no_5xx(server: &Server, what: &str, answer: (u16, String)) -> (u16, String) {
    if answer.0 >= 500 {
        server.fail(&format!("{what}: answered {}: {}", answer.0, answer.1));
    }
    answer
}

/// The `error` message of a JSON error body; fails if there is none.
fn error_of(server: &Server, what: &str, body: &str) -> (String, Value) {
    let value: Value = serde_json::from_str(body)
        .unwrap_or_else(|e| server.fail(&format!("{what}: error body is not JSON ({e}): {body}")));
    match value.get("error") {
        Some(Value::String(message)) if !message.is_empty() => (message.clone(), value),
        _ => server.fail(&format!(
            "{what}: error body has no \"error\" message: {body}"
        )),
    }
}

/// Asserts `sql` is refused with `status` and a JSON error; returns the body.
fn refused(server: &Server, db: &str, sql: &str, status: u16) -> (String, Value) {
    let (got, body) = no_5xx(server, sql, server.query_raw(db, sql, "json"));
    if got != status {
        server.fail(&format!(
            "{sql:?} on db {db} answered {got}, expected {status}: {body}"
        ));
    }
    error_of(server, sql, &body)
}

/// A partial write's rejected lines: (line, column, error).
fn line_errors(body: &str) -> Vec<(u64, u64, String)> {
    let value: Value = serde_json::from_str(body).unwrap();
    value["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["line"].as_u64().unwrap(),
                l["column"].as_u64().unwrap(),
                l["error"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn count(server: &Server, sql: &str) -> u64 {
    let rows = server.query_json(DB, sql);
    rows[0]["n"]
        .as_u64()
        .unwrap_or_else(|| panic!("count in {rows:?} for {sql}"))
}

fn assert_still_serving(server: &Server) {
    assert!(
        server.is_healthy(),
        "GET /health failed after the bad requests"
    );
    assert_eq!(
        count(
            server,
            "SELECT count(*) AS n FROM manhole WHERE time = '2025-12-01T00:00:00Z'"
        ),
        3
    );
}

#[test]
fn bad_sql_is_a_400_with_its_position() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = seeded_server(&tmp.path().join("data"));

    // The parser knows where: the second `>` stands at line 1, column 45.
    let sql = "SELECT device FROM manhole WHERE tilt_deg > > 1";
    let (_, body) = refused(&server, DB, sql, 400);
    assert_eq!(
        body["position"],
        serde_json::json!({"line": 1, "column": 45}),
        "{body}"
    );
    let sql = "SELECT device\nFROM manhole\nWHERE tilt_deg > > 1";
    let (_, body) = refused(&server, DB, sql, 400);
    assert_eq!(
        body["position"],
        serde_json::json!({"line": 3, "column": 18}),
        "{body}"
    );
    let (status, body) = no_5xx(&server, "POST bad SQL", server.query_post(DB, sql, "json"));
    assert_eq!(status, 400, "{body}");
    for sql in [
        "SELEC device FROM manhole",
        "SELECT FROM WHERE",
        "SELECT (1",
        "",
        "   ",
    ] {
        refused(&server, DB, sql, 400);
    }

    let (message, _) = refused(&server, DB, "SELECT * FROM no_such_table", 400);
    assert!(message.contains("no_such_table"), "{message}");
    let (message, _) = refused(&server, DB, "SELECT no_such_column FROM manhole", 400);
    assert!(message.contains("no_such_column"), "{message}");
    refused(
        &server,
        DB,
        "SELECT device FROM manhole WHERE no_such_column > 1",
        400,
    );

    // Read-only: nothing but SELECT, EXPLAIN and SHOW.
    for sql in [
        "DELETE FROM manhole",
        "DELETE FROM manhole WHERE device = 'mh-00101'",
        "INSERT INTO manhole (time, device, district, tilt_deg) VALUES ('2025-12-01T00:00:00Z', 'mh-9', 'x', 1.0)",
        "UPDATE manhole SET tilt_deg = 0",
        "CREATE TABLE t (x INT)",
        "CREATE EXTERNAL TABLE t STORED AS CSV LOCATION '/etc/passwd'",
        "DROP TABLE manhole",
        "COPY manhole TO '/tmp/citytsdb-copy.csv'",
        "SELECT 1; DROP TABLE manhole",
    ] {
        refused(&server, DB, sql, 400);
    }
    let (status, body) = no_5xx(
        &server,
        "POST DELETE",
        server.query_post(DB, "DELETE FROM manhole", "json"),
    );
    assert_eq!(status, 400, "{body}");

    // Unknown database: 404, over GET and POST.
    refused(&server, "no_such_db", "SELECT * FROM manhole", 404);
    let (status, body) = no_5xx(
        &server,
        "POST unknown db",
        server.query_post("no_such_db", "SELECT 1 AS x", "json"),
    );
    assert_eq!(status, 404, "{body}");

    // Malformed requests.
    let (status, _) = no_5xx(
        &server,
        "unknown format",
        server.query_raw(DB, "SELECT 1 AS x", "xml"),
    );
    assert_eq!(status, 400);
    let client = server.client();
    for body in [
        &b"{not json"[..],
        b"[]",
        b"{\"db\": \"city\"}",
        b"{\"db\": 5, \"sql\": \"SELECT 1\"}",
    ] {
        let answer = client.query_post_raw(body).expect("server answers");
        let (status, text) = no_5xx(&server, "malformed POST query", answer);
        assert!((400..500).contains(&status), "{status} {text}");
    }
    let (status, _) = no_5xx(
        &server,
        "query without sql",
        server.get("/api/v1/query?db=city"),
    );
    assert!((400..500).contains(&status));
    assert_still_serving(&server);
    server.stop();
}

#[test]
fn bad_lines_are_rejected_one_by_one() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = seeded_server(&tmp.path().join("data"));

    // Seven lines, counted as written: a comment (1) and a blank line (3) count.
    let lines = [
        "# readings of the east gate",
        "manhole,device=mh-00001,district=zhengdong tilt_deg=0.5,water_level_cm=20.1,battery_pct=80i,cover_open=false 1764550800",
        "",
        "this is not line protocol",
        "manhole,device=mh-00002,district=zhengdong tilt_deg=1i,water_level_cm=20.2 1764550800",
        "manhole,device=mh-00003,district=zhengdong tilt_deg=0.7,water_level_cm=21.5,battery_pct=81i,cover_open=true 1764550800",
        "manhole,device=mh-00004,district=zhengdong tilt_deg=NaN,battery_pct=70i 1764550800",
    ];
    let (status, body) = no_5xx(
        &server,
        "partial write",
        server.write(DB, "s", lines.join("\n")),
    );
    assert_eq!(status, 400, "{body}");
    let value: Value =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("partial write body ({e}): {body}"));
    let object = value
        .as_object()
        .unwrap_or_else(|| panic!("partial write body is not an object: {body}"));
    // The contract's fields must be there; fields added later are allowed.
    assert!(
        object.contains_key("error") && object.contains_key("lines"),
        "{body}"
    );
    // "M" counts every line of the body or only the data lines: the contract's
    // example does not say which, so both are accepted.
    let message = value["error"].as_str().unwrap_or_default();
    assert!(
        message == "partial write: 3 of 7 lines rejected"
            || message == "partial write: 3 of 5 lines rejected",
        "{message}"
    );
    let rejected = value["lines"]
        .as_array()
        .unwrap_or_else(|| panic!("lines is not a list: {body}"));
    let numbers: Vec<u64> = rejected
        .iter()
        .map(|l| l["line"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(numbers, [4, 5, 7], "{body}");
    for entry in rejected {
        let n = entry["line"].as_u64().unwrap_or(0) as usize;
        let fields = entry.as_object();
        assert!(
            fields.is_some_and(|o| ["error", "line", "text"].iter().all(|k| o.contains_key(*k))),
            "a rejected line has error, line and text: {entry}"
        );
        assert_eq!(entry["text"], lines[n - 1], "{entry}");
        assert!(
            !entry["error"].as_str().unwrap_or_default().is_empty(),
            "{entry}"
        );
    }
    assert!(
        rejected[1]["error"]
            .as_str()
            .unwrap_or_default()
            .contains("tilt_deg"),
        "{body}"
    );
    // The valid lines were written; the rejected ones were not.
    let devices = server.query_json(
        DB,
        "SELECT device FROM manhole WHERE time = '2025-12-01T01:00:00Z' ORDER BY device",
    );
    let devices: Vec<&str> = devices
        .iter()
        .filter_map(|r| r["device"].as_str())
        .collect();
    assert_eq!(devices, ["mh-00001", "mh-00003"]);

    // Type conflicts against the established schema, one line each.
    for (field, line) in [
        (
            "tilt_deg",
            "manhole,device=mh-00005,district=zhengdong tilt_deg=1i 1764550860",
        ),
        (
            "tilt_deg",
            "manhole,device=mh-00005,district=zhengdong tilt_deg=\"tilted\" 1764550860",
        ),
        (
            "battery_pct",
            "manhole,device=mh-00005,district=zhengdong battery_pct=55.5 1764550860",
        ),
        (
            "cover_open",
            "manhole,device=mh-00005,district=zhengdong cover_open=\"yes\" 1764550860",
        ),
        (
            "cover_open",
            "manhole,device=mh-00005,district=zhengdong cover_open=1i 1764550860",
        ),
    ] {
        let (status, body) = no_5xx(&server, line, server.write(DB, "s", line));
        assert_eq!(status, 400, "{line}: {body}");
        let (_, value) = error_of(&server, line, &body);
        assert_eq!(value["lines"][0]["line"], 1, "{body}");
        let why = value["lines"][0]["error"].as_str().unwrap_or_default();
        assert!(
            why.contains(field),
            "{line}: the error should name {field}: {body}"
        );
    }

    // Line protocol has no NaN or infinity.
    for value in ["NaN", "nan", "inf", "-inf", "Infinity", "1e999", "-1e999"] {
        let line =
            format!("manhole,device=mh-00006,district=zhengdong water_level_cm={value} 1764550920");
        let (status, body) = no_5xx(&server, &line, server.write(DB, "s", &line));
        assert_eq!(status, 400, "{line}: {body}");
        error_of(&server, &line, &body);
    }
    assert_eq!(
        count(
            &server,
            "SELECT count(*) AS n FROM manhole WHERE device IN ('mh-00005', 'mh-00006')"
        ),
        0
    );

    // Bad parameters.
    for params in [
        vec![("precision", "s")],
        vec![("db", DB), ("precision", "minutes")],
        vec![("db", ""), ("precision", "s")],
    ] {
        let line = "manhole,device=mh-00007,district=zhengdong tilt_deg=0.5 1764550980";
        let (status, body) = no_5xx(
            &server,
            &format!("write with {params:?}"),
            server.write_params(&params, line),
        );
        assert_eq!(status, 400, "write with {params:?}: {body}");
    }
    assert_still_serving(&server);
    server.stop();
}

#[test]
fn hostile_inputs_never_get_a_5xx() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = seeded_server(&tmp.path().join("data"));

    // Not UTF-8.
    let body = b"manhole,device=mh-00008,district=\xff\xfe tilt_deg=0.5 1764550800\n";
    let (status, text) = no_5xx(&server, "invalid UTF-8", server.write(DB, "s", &body[..]));
    assert!(
        (400..500).contains(&status),
        "invalid UTF-8 answered {status}: {text}"
    );
    let body =
        b"manhole,device=mh-00008,district=zhengdong tilt_deg=0.5 1764550800\n\xc3\x28\x80 x=1 1\n";
    no_5xx(
        &server,
        "partly invalid UTF-8",
        server.write(DB, "s", &body[..]),
    );

    // Empty bodies: nothing to write is fine or a 400, never an error.
    for body in ["", "\n", "\n\n# only a comment\n"] {
        let (status, text) = no_5xx(&server, "empty body", server.write(DB, "s", body));
        assert!(
            status == 204 || status == 400,
            "{body:?} answered {status}: {text}"
        );
    }

    // Ten thousand fields on one line.
    let fields: Vec<String> = (0..10_000).map(|i| format!("f{i}={i}.5")).collect();
    let line = format!("wide,device=mh-00001 {} 1764547200", fields.join(","));
    let (status, text) = no_5xx(&server, "10,000 columns", server.write(DB, "s", &line));
    assert!(
        matches!(status, 204 | 400 | 413),
        "10,000 columns answered {status}: {text}"
    );
    if status == 204 {
        let rows = server.query_json(DB, "SELECT f0, f9999 FROM wide");
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0]["f9999"], 9999.5);
    }

    // Ten thousand tags, and a very long tag value.
    let tags: Vec<String> = (0..10_000).map(|i| format!("t{i}=v")).collect();
    let line = format!("manytags,{} x=1 1764547200", tags.join(","));
    no_5xx(&server, "10,000 tags", server.write(DB, "s", &line));
    let line = format!(
        "manhole,device={},district=x tilt_deg=1 1764547300",
        "d".repeat(100_000)
    );
    no_5xx(&server, "a 100 kB tag value", server.write(DB, "s", &line));

    // Deep nesting: refused with a 4xx, not a stack overflow.
    let deep = format!("SELECT {}1{}", "(".repeat(10_000), ")".repeat(10_000));
    let (status, text) = no_5xx(
        &server,
        "10,000 nested parentheses",
        server.query_post(DB, &deep, "json"),
    );
    assert!(
        (400..500).contains(&status),
        "nested parentheses answered {status}: {text}"
    );
    let deep_where = format!(
        "SELECT count(*) AS n FROM manhole WHERE {}true{}",
        "(".repeat(5_000),
        ")".repeat(5_000)
    );
    let (status, text) = no_5xx(
        &server,
        "nested WHERE",
        server.query_post(DB, &deep_where, "json"),
    );
    assert!(
        (400..500).contains(&status),
        "nested WHERE answered {status}: {text}"
    );

    // A long flat chain of operators may be answered or refused, never crash.
    let chain = format!("SELECT {} AS n", vec!["1"; 5_000].join(" + "));
    let (status, text) = no_5xx(
        &server,
        "5,000-term sum",
        server.query_post(DB, &chain, "json"),
    );
    if status == 200 {
        assert!(text.contains("5000"), "{text}");
    }
    // Ten times as long: refused before the planner, whose walk of the chain
    // would take more stack than a thread has, with where it went too far.
    let chain = format!("SELECT {} AS n", vec!["1"; 50_000].join(" + "));
    let (status, text) = no_5xx(
        &server,
        "50,000-term sum",
        server.query_post(DB, &chain, "json"),
    );
    assert_eq!(status, 400, "{text}");
    let (message, body) = error_of(&server, "50,000-term sum", &text);
    assert!(message.contains("more than 10000 operators"), "{message}");
    assert_eq!(body["position"]["line"], 1, "{text}");
    assert!(body["position"]["column"].as_u64() > Some(40_000), "{text}");
    let chain = format!(
        "SELECT count(*) AS n FROM manhole WHERE {}",
        (0..3_000)
            .map(|i| format!("device = 'mh-{i:05}'"))
            .collect::<Vec<_>>()
            .join(" OR ")
    );
    no_5xx(
        &server,
        "3,000-term OR",
        server.query_post(DB, &chain, "json"),
    );

    // Garbage in the query string.
    for path in [
        "/api/v1/query?db=city&sql=%FF%FE&format=json",
        "/api/v1/query?db=%00&sql=SELECT%201&format=json",
        "/api/v1/query?db=city&sql=SELECT%201&format=json&format=csv",
        "/api/v1/query",
        "/api/v1/flush",
    ] {
        let (status, text) = no_5xx(&server, path, server.get(path));
        assert!(status < 500, "{path}: {status} {text}");
    }
    assert_still_serving(&server);
    server.stop();
}

/// Gap filling with bounds and rows at the very ends of the timestamp range
/// (1677-09-21 and 2262-04-11): every bucket is made, or the query is refused with
/// a 400 saying why; no arithmetic overflows.
#[test]
fn gap_filling_at_the_ends_of_the_timestamp_range() {
    let dir = tempfile::tempdir().unwrap();
    let server = seeded_server(&dir.path().join("data"));
    let (min, max) = (i64::MIN + 1, i64::MAX - 1);
    server.write_ok(
        DB,
        "ns",
        format!(
            "edge,device=a v=1 {min}\nedge,device=a v=2 {}\nedge,device=a v=3 {max}\n",
            max - 86_400_000_000_000 * 3
        ),
    );
    let (first, last) = (
        "1677-09-21T00:12:43.145224193Z",
        "2262-04-11T23:47:16.854775806Z",
    );
    let gapfill = |stride: &str, origin: &str, lo: &str, op: &str, hi: &str| {
        format!(
            "SELECT date_bin_gapfill(INTERVAL '{stride}', time{origin}) AS t, device, locf(max(v)) AS v, \
             interpolate(min(v)) AS i FROM edge WHERE time >= '{lo}' AND time {op} '{hi}' GROUP BY 1, 2 ORDER BY 1"
        )
    };
    // The last days: every day to the end, none past it.
    let sql = gapfill("1 day", "", "2262-04-01T00:00:00Z", "<=", last);
    let (status, body) = no_5xx(&server, &sql, server.query_raw(DB, &sql, "json"));
    assert_eq!(status, 200, "{sql}: {body}");
    let rows: Vec<Value> = serde_json::from_str(&body).unwrap();
    assert_eq!(rows.len(), 11, "{body}");
    assert_eq!(rows.last().unwrap()["t"], "2262-04-11T00:00:00Z", "{body}");
    assert_eq!(rows.last().unwrap()["v"], 3.0, "{body}");
    // The first days, with `<` the range's exclusive end.
    let sql = gapfill(
        "1 day",
        ", '1677-09-22T00:00:00Z'",
        first,
        "<",
        "1677-09-25T00:00:00Z",
    );
    let (status, body) = no_5xx(&server, &sql, server.query_raw(DB, &sql, "json"));
    assert!(status == 200 || status == 400, "{sql}: {status} {body}");
    // The whole range in strides too wide or an origin far away: answered or refused.
    for (stride, origin, lo, op, hi) in [
        ("100000 days", "", first, "<=", last),
        (
            "1 day",
            ", '2262-04-11T00:00:00Z'",
            first,
            "<",
            "1677-09-25T00:00:00Z",
        ),
        (
            "1 day",
            ", '1677-09-21T00:12:43.145224193Z'",
            "2262-04-01T00:00:00Z",
            "<=",
            last,
        ),
        ("1 day", "", first, "<", first),
        ("106751 days", "", first, "<=", last),
    ] {
        let sql = gapfill(stride, origin, lo, op, hi);
        let (status, body) = no_5xx(&server, &sql, server.query_raw(DB, &sql, "json"));
        assert!(status == 200 || status == 400, "{sql}: {status} {body}");
        if status == 400 {
            error_of(&server, &sql, &body);
        }
    }
    assert_still_serving(&server);
}

/// Sends `method path` announcing a `len`-byte body (and, with `chunked`, sends a
/// chunked body of `len` bytes instead); the answer's status code.
fn oversized(
    server: &Server,
    method: &str,
    path: &str,
    token: &str,
    len: usize,
    chunked: bool,
) -> u16 {
    use std::io::{BufRead, BufReader, Write};
    let addr = server.url().trim_start_matches("http://").to_string();
    let mut stream = std::net::TcpStream::connect(&addr).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    stream
        .set_write_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let length = if chunked {
        "Transfer-Encoding: chunked".to_string()
    } else {
        format!("Content-Length: {len}")
    };
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\n{length}\r\n\r\n"
    )
    .unwrap();
    if chunked {
        // Sent until the server answers and stops reading; a refused write is fine.
        let chunk = vec![b' '; 64 << 10];
        let mut sent = 0;
        while sent < len {
            let head = format!("{:x}\r\n", chunk.len());
            if stream.write_all(head.as_bytes()).is_err()
                || stream.write_all(&chunk).is_err()
                || stream.write_all(b"\r\n").is_err()
            {
                break;
            }
            sent += chunk.len();
        }
    }
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .unwrap_or_else(|e| panic!("{method} {path}: no answer to an oversized body ({e})"));
    line.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("{method} {path}: not an HTTP answer: {line:?}"))
}

/// Every route that reads a body has a limit: a body announced or streamed past it
/// gets a 413 without the server waiting for (or keeping) the rest.
#[test]
fn every_body_has_a_limit() {
    const ADMIN: &str = "admin-secret-0123456789";
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(&dir.path().join("data"), &["--admin-token", ADMIN]);
    let agent = ureq::Agent::new_with_config(
        ureq::config::Config::builder()
            .timeout_global(Some(std::time::Duration::from_secs(30)))
            .http_status_as_error(false)
            .build(),
    );
    let post = |path: &str, body: String| {
        let mut r = agent
            .post(format!("{}{path}", server.url()))
            .header("Authorization", &format!("Bearer {ADMIN}"))
            .send(body)
            .unwrap();
        (r.status().as_u16(), r.body_mut().read_to_string().unwrap())
    };
    let (status, body) = post("/api/v1/write?db=city&precision=s", SEED_ROWS.to_string());
    assert_eq!(status, 204, "{body}");
    let rule = serde_json::json!({"name": "tilted", "department": "covers", "db": DB,
        "sql": "SELECT device FROM manhole WHERE tilt_deg > 15", "every": "1m",
        "webhook": "http://127.0.0.1:9/hook"});
    let (status, body) = post("/api/v1/rules", rule.to_string());
    assert_eq!(status, 201, "{body}");
    let id: Value = serde_json::from_str(&body).unwrap();
    let replace = format!("/api/v1/rules/{}", id["id"].as_str().unwrap());
    let routes = [
        ("POST", "/api/v1/query"),
        ("POST", "/api/v3/query_sql"),
        ("POST", "/api/v1/rules"),
        ("PUT", replace.as_str()),
        ("POST", "/api/v1/tokens"),
        ("POST", "/api/v1/databases/city/rollups"),
        ("PUT", "/api/v1/databases/city"),
        ("POST", "/api/v2/delete?bucket=city"),
        ("POST", "/api/v1/write?db=city"),
    ];
    for (method, path) in routes {
        assert_eq!(
            oversized(&server, method, path, ADMIN, 1 << 30, false),
            413,
            "{method} {path} with 1 GiB announced"
        );
    }
    for (method, path) in [
        ("POST", "/api/v1/query"),
        ("POST", "/api/v1/rules"),
        ("POST", "/api/v1/tokens"),
    ] {
        assert_eq!(
            oversized(&server, method, path, ADMIN, 64 << 20, true),
            413,
            "{method} {path} with 64 MiB streamed"
        );
    }
    let (status, _) = server.get("/health");
    assert_eq!(status, 200);
    server.stop();
}

/// A line whose tags make a new series in a table at `--max-series-per-table` is
/// rejected saying so, while lines of known series (and new series of other
/// tables) are written; the limit counts the series known before a restart too.
#[test]
fn the_series_limit_rejects_new_series_only() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let args = ["--max-series-per-table", "3"];
    let server = Server::start_with(&data, &args);
    server.write_ok(
        DB,
        "s",
        "manhole,device=a tilt_deg=1 1764547200\nmanhole,device=b tilt_deg=1 1764547200",
    );
    let lines = [
        "manhole,device=a tilt_deg=2 1764547260",
        "manhole,device=c tilt_deg=2 1764547260",
        "manhole,device=d tilt_deg=2 1764547260",
        "manhole,device=c,district=x tilt_deg=2 1764547260",
        "manhole,device=c tilt_deg=3 1764547320",
        "parking,device=d occupied=t 1764547260",
    ];
    let (status, body) = no_5xx(&server, "series", server.write(DB, "s", lines.join("\n")));
    assert_eq!(status, 400, "{body}");
    let got = line_errors(&body);
    let lines_rejected: Vec<u64> = got.iter().map(|g| g.0).collect();
    assert_eq!(lines_rejected, [3, 4], "{body}");
    assert_eq!(got[0].1, 1);
    assert!(
        got[0].2.contains(
            "table manhole has 3 series, the most allowed (3 with --max-series-per-table)"
        ),
        "{got:?}"
    );
    let written = "SELECT device, count(*) AS n FROM manhole GROUP BY device ORDER BY device";
    let rows = |server: &Server| {
        server
            .query_json(DB, written)
            .iter()
            .map(|r| format!("{}={}", r["device"].as_str().unwrap(), r["n"]))
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert_eq!(rows(&server), "a=2 b=1 c=2");
    assert_eq!(count(&server, "SELECT count(*) AS n FROM parking"), 1);
    server.flush(DB);
    server.stop();
    // After a restart the persisted registry still counts three series.
    let server = Server::start_with(&data, &args);
    let (status, body) = no_5xx(
        &server,
        "series after restart",
        server.write(
            DB,
            "s",
            "manhole,device=e tilt_deg=1 1764547380\nmanhole,device=b tilt_deg=4 1764547380",
        ),
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("this line's tags make a new one"), "{body}");
    assert_eq!(rows(&server), "a=2 b=2 c=2");
    server.stop();
}

/// Lines past the write limits (line length, string size, tables per database,
/// columns per table; each configurable) are rejected one by one with what and
/// where; the other lines are written.
#[test]
fn write_limits_reject_lines_saying_which() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(
        &dir.path().join("data"),
        &[
            "--max-line-length",
            "200",
            "--max-string-field",
            "16",
            "--max-tables",
            "2",
            "--max-columns",
            "6",
            "--max-tags",
            "5",
            "--max-lines-per-request",
            "8",
        ],
    );
    server.write_ok(DB, "s", "manhole,device=a tilt_deg=1 1764547200");
    let long = format!("manhole,device=b tilt_deg={} 1764547200", "1".repeat(200));
    let lines = [
        "gauge,device=a v=1 1764547200".to_string(),
        "pumps,device=a v=1 1764547200".to_string(),
        "manhole,device=c note=\"far longer than sixteen bytes\" 1764547200".to_string(),
        long,
        "gauge,device=a,x=1,y=2,z=3,w=4 v=2 1764547260".to_string(),
        "manhole,device=d note=\"short\" 1764547200".to_string(),
        "manhole,device=e,a=1,b=2,c=3,d=4,f=5 tilt_deg=1 1764547200".to_string(),
    ];
    let (status, body) = no_5xx(&server, "limits", server.write(DB, "s", lines.join("\n")));
    assert_eq!(status, 400, "{body}");
    let got = line_errors(&body);
    assert_eq!(got.len(), 5, "{body}");
    assert_eq!((got[0].0, got[0].1), (2, 1));
    assert!(
        got[0].2.contains("table pumps is not created") && got[0].2.contains("--max-tables"),
        "{got:?}"
    );
    assert_eq!((got[1].0, got[1].1), (3, 18));
    assert!(
        got[1]
            .2
            .contains("field note is a string of 29 bytes, longer than the limit of 16"),
        "{got:?}"
    );
    assert_eq!((got[2].0, got[2].1), (4, 1));
    assert!(
        got[2]
            .2
            .contains("line is 237 bytes, longer than the limit of 200"),
        "{got:?}"
    );
    assert_eq!((got[3].0, got[3].1), (5, 16));
    assert!(
        got[3]
            .2
            .contains("table gauge would have 7 columns, more than the limit of 6"),
        "{got:?}"
    );
    assert_eq!((got[4].0, got[4].1), (7, 34));
    assert!(
        got[4]
            .2
            .contains("line has 6 tags, more than the limit of 5 (--max-tags)"),
        "{got:?}"
    );
    // More lines than a request may hold: refused whole, nothing written.
    let nine: String = (0..9)
        .map(|i| format!("gauge,device=z v={i} 1764547{i}00\n"))
        .collect();
    let (status, body) = no_5xx(&server, "lines", server.write(DB, "s", nine));
    assert_eq!(status, 413, "{body}");
    assert!(
        body.contains("the body has 9 lines, more than the limit of 8 per request"),
        "{body}"
    );
    assert_eq!(
        count(
            &server,
            "SELECT count(*) AS n FROM gauge WHERE device = 'z'"
        ),
        0
    );
    // The good lines are written (a partial write writes what is valid).
    assert_eq!(count(&server, "SELECT count(*) AS n FROM gauge"), 1);
    assert_eq!(
        count(
            &server,
            "SELECT count(*) AS n FROM manhole WHERE note = 'short'"
        ),
        1
    );
    assert!(server.is_healthy());
}
