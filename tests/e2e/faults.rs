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
    assert_eq!(status, 503, "a flush while the store fails: {body}");
    let message: Value = serde_json::from_str(&body).unwrap();
    assert!(
        message["error"]
            .as_str()
            .is_some_and(|m| m.contains("injected failure")),
        "{body}"
    );
    let (status, body) = server.query_raw(DB, "SELECT count(*) AS n FROM gauge", "json");
    assert!(
        status == 200
            || status == 503
                && serde_json::from_str::<Value>(&body).is_ok_and(|v| v["error"].is_string()),
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
    assert_eq!(status, 503, "a flush whose uploads report failures fails");
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

/// A small tmpfs the test mounts (as root), unmounted when dropped.
struct SmallDisk {
    path: std::path::PathBuf,
}

impl SmallDisk {
    fn mount(path: &std::path::Path, size: &str) -> SmallDisk {
        std::fs::create_dir_all(path).unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .status();
        assert!(
            matches!(status, Ok(s) if s.success()),
            "mounting a {size} tmpfs at {} failed ({status:?}): the full-disk test runs as root, as the README's test command does",
            path.display()
        );
        SmallDisk {
            path: path.to_path_buf(),
        }
    }

    /// Gives the disk `size` of room in all.
    fn resize(&self, size: &str) {
        let status = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.path)
            .status()
            .unwrap();
        assert!(status.success(), "resizing the tmpfs to {size}");
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.path)
            .status();
    }
}

/// The data directory's disk fills up: writes are refused with a 503 that says
/// the disk is full and when to retry (never a 500), queries still answer with
/// every acknowledged row, a flush fails cleanly; once there is room again, writes
/// are taken and persisted, and a crash after all that finds every acknowledged
/// row with its value and none of the refused ones: the WAL was not corrupted.
#[test]
fn a_full_disk_refuses_writes_cleanly_and_recovers_when_space_returns() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("disk");
    let disk = SmallDisk::mount(&data, "3m");
    // No flush of its own: only the WAL fills the disk until the test flushes.
    let args = ["--flush-interval", "1h", "--flush-rows", "100000000"];
    let server = Server::start_with(&data, &args);
    let mut acked: BTreeMap<(u32, u32), f64> = BTreeMap::new();
    let mut refused = 0;
    let mut i = 0;
    while refused < 3 {
        assert!(i < 2000, "the 3 MiB disk never filled up");
        let (status, retry, rows) = write(&server, i);
        match status {
            204 => {
                assert_eq!(refused, 0, "write {i} was taken after one was refused");
                acked.extend(rows);
            }
            503 => {
                refused += 1;
                assert_eq!(retry.as_deref(), Some("1"), "a 503 says when to retry");
            }
            other => panic!("write {i} on a full disk answered {other}"),
        }
        i += 1;
    }
    assert!(acked.len() > 10 * LINES as usize, "{} rows", acked.len());
    let (status, body) = server.write(DB, "s", batch(i).0);
    assert_eq!(status, 503);
    assert!(body.contains("No space left on device"), "{body}");
    check(&server, &acked, "on a full disk");
    let (status, body) = server.client().flush(DB).unwrap();
    assert_eq!(status, 503, "a flush on a full disk: {body}");

    // Room again: writes are taken, persisted, and survive a crash.
    disk.resize("64m");
    let (status, _, rows) = write(&server, i + 1);
    assert_eq!(status, 204, "writes are taken once there is room");
    acked.extend(rows);
    flush_when_back(&server);
    let (status, _, rows) = write(&server, i + 2);
    assert_eq!(status, 204);
    acked.extend(rows);
    check(&server, &acked, "after space returned");
    server.kill9();
    let server = Server::start_with(&data, &args);
    check(&server, &acked, "after a crash");
    // Every value, not only the sums.
    let rows = server.query_json(
        DB,
        "SELECT device, CAST(time AS BIGINT) / 1000000000 AS t, level FROM gauge",
    );
    let got: BTreeMap<(u32, u32), f64> = rows
        .iter()
        .map(|r| {
            let d: u32 = r["device"].as_str().unwrap()[1..].parse().unwrap();
            let minute = ((r["t"].as_i64().unwrap() - 1_764_547_200) / 60) as u32;
            ((d, minute), r["level"].as_f64().unwrap())
        })
        .collect();
    assert!(
        got == acked,
        "the rows after a crash differ from the acknowledged ones"
    );
    server.stop();
    drop(disk);
}
