//! The object store failing and coming back (faults injected through
//! `CITYTSDB_STORE_FAULTS`, see `server/src/faults.rs`).
//!
//! While every store call fails, writes are still acknowledged from the WAL until
//! `--max-buffer-size` is reached, then refused with a 503 and `Retry-After`; a
//! flush fails with an error that says why; queries answer or fail with a clear
//! error, never hang. Once the store is back, every acknowledged row is persisted,
//! none doubled. An upload whose answer is lost (the object stored, the call
//! failed) leaves nothing doubled. A crash after all that loses nothing.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use citytsdb_tests::Server;
use serde_json::Value;

const DB: &str = "city";
const LINES: u32 = 500;

/// Rows as (device, minute) -> level.
type Rows = Vec<((u32, u32), f64)>;

/// Batch `i`: one reading of `LINES` gauges at minute `i`.
fn batch(i: u32) -> (String, Rows) {
    let mut body = String::new();
    let mut rows = Vec::new();
    for d in 0..LINES {
        let v = f64::from(i * 1000 + d) / 4.0;
        body.push_str(&format!(
            "gauge,device=g{d:04} level={v} {}\n",
            1_764_547_200 + u64::from(i) * 60
        ));
        rows.push(((d, i), v));
    }
    (body, rows)
}

fn agent() -> ureq::Agent {
    ureq::Agent::new_with_config(
        ureq::config::Config::builder()
            .timeout_global(Some(Duration::from_secs(30)))
            .http_status_as_error(false)
            .build(),
    )
}

/// Writes batch `i`; the status and the `Retry-After` header.
fn write(server: &Server, i: u32) -> (u16, Option<String>, Rows) {
    let (body, rows) = batch(i);
    let r = agent()
        .post(format!("{}/api/v1/write?db={DB}&precision=s", server.url()))
        .send(body)
        .unwrap();
    let retry = r
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    (r.status().as_u16(), retry, rows)
}

/// Every row the server holds equals the acknowledged ones, none twice.
fn check(server: &Server, acked: &BTreeMap<(u32, u32), f64>, what: &str) {
    let rows = server.query_json(
        DB,
        "SELECT count(*) AS n, count(DISTINCT device || '/' || CAST(time AS VARCHAR)) AS keys, \
         sum(level) AS total FROM gauge",
    );
    let want: f64 = acked.values().sum();
    assert_eq!(rows[0]["n"], acked.len() as u64, "{what}: rows");
    assert_eq!(rows[0]["keys"], acked.len() as u64, "{what}: no row twice");
    let total = rows[0]["total"].as_f64().unwrap();
    assert!(
        (total - want).abs() < 1e-6 * want,
        "{what}: sum {total} != {want}"
    );
}

/// Flushes until a flush succeeds (a background one may be running), within 30 s.
fn flush_when_back(server: &Server) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = server.client().flush(DB).unwrap();
        if status == 200 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no flush succeeded after the store came back: {status} {body}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn writes_are_kept_while_the_store_fails_and_persisted_when_it_is_back() {
    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("faults");
    let data = dir.path().join("data");
    let control_env = control.to_str().unwrap().to_string();
    let args = ["--max-buffer-size", "2MiB", "--flush-interval", "1s"];
    let env = [("CITYTSDB_STORE_FAULTS", control_env.as_str())];
    let server = Server::start_with_env(&data, &args, &env);
    let mut acked: BTreeMap<(u32, u32), f64> = BTreeMap::new();
    let (status, _, rows) = write(&server, 0);
    assert_eq!(status, 204);
    acked.extend(rows);
    server.flush(DB);

    // The store fails: writes go on from the WAL until the buffer is full.
    std::fs::write(&control, "fail").unwrap();
    let mut refused = None;
    for i in 1..=400 {
        let (status, retry, rows) = write(&server, i);
        match status {
            204 => acked.extend(rows),
            503 => {
                refused = Some((i, retry));
                break;
            }
            other => panic!("write {i} while the store fails answered {other}"),
        }
    }
    let (at, retry) = refused.expect("writes were refused once the buffer was full");
    assert!(
        at > 5,
        "several writes were acknowledged from the WAL first ({at})"
    );
    let retry: u64 = retry
        .expect("a 503 says when to retry")
        .parse()
        .expect("Retry-After in seconds");
    assert!((1..=60).contains(&retry), "{retry}");
    let (status, body) = server.client().flush(DB).unwrap();
    assert!(
        status >= 500,
        "a flush while the store fails: {status} {body}"
    );
    let message: Value = serde_json::from_str(&body).unwrap();
    assert!(
        message["error"]
            .as_str()
            .is_some_and(|m| m.contains("injected failure")),
        "{body}"
    );
    let (status, body) = server.query_raw(DB, "SELECT count(*) AS n FROM gauge", "json");
    assert!(
        status == 200 || serde_json::from_str::<Value>(&body).is_ok_and(|v| v["error"].is_string()),
        "a query while the store fails: {status} {body}"
    );

    // The store is back: everything acknowledged is persisted, nothing doubled.
    std::fs::remove_file(&control).unwrap();
    flush_when_back(&server);
    check(&server, &acked, "after the store came back");
    let (status, _, rows) = write(&server, 1000);
    assert_eq!(status, 204, "writes are taken again");
    acked.extend(rows);

    // Uploads whose answers are lost: stored, yet reported failed; nothing doubles.
    std::fs::write(&control, "tear").unwrap();
    let (status, _, rows) = write(&server, 1001);
    assert_eq!(status, 204);
    acked.extend(rows);
    let (status, _) = server.client().flush(DB).unwrap();
    assert!(status >= 500, "a flush whose uploads report failures fails");
    std::fs::remove_file(&control).unwrap();
    flush_when_back(&server);
    check(&server, &acked, "after lost answers");

    // Some calls failing now and then: retried until done.
    std::fs::write(&control, "fail-every 3").unwrap();
    for i in 1002..1006 {
        let (status, _, rows) = write(&server, i);
        assert_eq!(status, 204);
        acked.extend(rows);
    }
    std::fs::remove_file(&control).unwrap();
    flush_when_back(&server);
    check(&server, &acked, "after intermittent failures");

    // A crash loses nothing either.
    server.kill9();
    let server = Server::start(&data);
    check(&server, &acked, "after kill -9");
    server.compact();
    check(&server, &acked, "after compaction");
    server.stop();
}
