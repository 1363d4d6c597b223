//! A store that lives: many small flushes, compaction in the background, garbage
//! collected, crashes at any moment, and a second process taking the store over.
//!
//! - Compaction under concurrent writes and queries: a settled day answers the
//!   same at every moment while later days are written and compacted, and at the
//!   end every answer matches DuckDB's over the same rows.
//! - Late rows land as new segments beside a compacted day, answer correctly at
//!   once, and are folded in by the next compaction.
//! - `kill -9` at random moments of flushes and compactions, 20 rounds: every
//!   acknowledged row is there, once, with its values; the store opens cleanly;
//!   and after a sweep nothing is left that the catalog does not refer to.
//! - A second server on the same store fences the first: exactly one commits.
//! - The same on an S3-protocol endpoint.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use citytsdb_tests::oracle::{assert_answers, compare_rows, duckdb_answers, same_value, Query};
use citytsdb_tests::s3::{S3Endpoint, BUCKET};
use citytsdb_tests::workload::{chunks, device_name, Reading, Workload, DAY, DEFAULT_START};
use citytsdb_tests::{Client, Row, Server};
use serde_json::Value;

const DB: &str = "city";

/// Flags of a server that flushes every few thousand rows and compacts a day
/// soon after it stops changing.
const LIVING: [&str; 6] = [
    "--flush-rows",
    "3000",
    "--compaction-settle",
    "2s",
    "--sweep-grace",
    "1h",
];

fn binned(sql: &str) -> Query {
    Query::pair(sql, &sql.replace("date_bin(", "time_bucket("))
}

/// Questions over several days of covers.
fn queries() -> Vec<Query> {
    vec![
        Query::same("SELECT count(*) AS n FROM manhole"),
        Query::same("SELECT device, count(*) AS n, sum(battery_pct) AS b FROM manhole GROUP BY device ORDER BY device"),
        Query::same(
            "SELECT * FROM manhole WHERE device = 'mh-00042' AND time >= '2025-12-02T00:00:00Z' \
             AND time < '2025-12-03T00:00:00Z' ORDER BY time",
        ),
        binned(
            "SELECT district, date_bin(INTERVAL '1 hour', time) AS hour, count(*) AS n, \
             max(water_level_cm) AS top FROM manhole WHERE time >= '2025-12-03T06:00:00Z' \
             AND time < '2025-12-03T12:00:00Z' GROUP BY district, date_bin(INTERVAL '1 hour', time) \
             ORDER BY district, hour",
        ),
        Query::same("SELECT device, time, tilt_deg FROM manhole WHERE tilt_deg > 15 ORDER BY device, time"),
    ]
}

/// Segments per (table, day), from `system.segments`.
fn segments_per_day(server: &Server) -> BTreeMap<(String, String), u64> {
    server
        .query_json(
            DB,
            "SELECT table_name, CAST(day AS VARCHAR) AS day, count(*) AS n FROM system.segments \
         GROUP BY table_name, day",
        )
        .iter()
        .map(|r| {
            (
                (
                    r["table_name"].as_str().unwrap_or_default().to_string(),
                    r["day"].as_str().unwrap_or_default().to_string(),
                ),
                r["n"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

/// DuckDB reads the table's segment files as one dataset (`read_parquet` over the
/// list, which takes the first file's column types for all) and finds what the
/// server finds.
fn segments_read_as_one_dataset(server: &Server) {
    let store = server.data_dir().join("store");
    let files: Vec<String> = server
        .query_json(
            DB,
            "SELECT path FROM system.segments WHERE table_name = 'manhole' ORDER BY path",
        )
        .iter()
        .filter_map(|r| r["path"].as_str())
        .map(|p| store.join(p).display().to_string())
        .collect();
    assert!(
        files.len() > 1,
        "several segments to read together: {files:?}"
    );
    let script = "import duckdb, json, sys\n\
                  files = json.loads(sys.argv[1])\n\
                  row = duckdb.sql(f'SELECT count(*), sum(water_level_cm)::DOUBLE, \
                  sum(tilt_deg)::DOUBLE FROM read_parquet({files!r})').fetchall()[0]\n\
                  print(json.dumps(list(row)))";
    let python = std::env::var_os("PYTHON").unwrap_or_else(|| "python3".into());
    let out = std::process::Command::new(&python)
        .args(["-c", script, &serde_json::to_string(&files).unwrap()])
        .output()
        .unwrap_or_else(|e| panic!("could not run DuckDB with {python:?}: {e}"));
    assert!(
        out.status.success(),
        "DuckDB could not read the segments as one dataset:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let duck: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let ours = server.query_json(
        DB,
        "SELECT count(*) AS n, sum(water_level_cm) AS level, sum(tilt_deg) AS tilt FROM manhole",
    );
    let ours = &ours[0];
    assert_eq!(duck[0], ours["n"], "rows: DuckDB {duck:?}, server {ours:?}");
    assert!(
        same_value(&duck[1], &ours["level"]),
        "DuckDB {duck:?}, server {ours:?}"
    );
    assert!(
        same_value(&duck[2], &ours["tilt"]),
        "DuckDB {duck:?}, server {ours:?}"
    );
}

/// Segments of each (table, day), in order.
fn day_counts(server: &Server) -> Vec<u64> {
    segments_per_day(server).into_values().collect()
}

#[test]
fn compaction_under_concurrent_writes_and_queries_matches_duckdb() {
    let dir = tempfile::tempdir().unwrap();
    compaction_under_load(&dir.path().join("data"), &[], &[]);
}

/// A settled day asked about and compacted again and again while the rest is
/// written, then every day compacted, checked against DuckDB before and after a
/// restart. With `env`, the store is on the S3 endpoint.
fn compaction_under_load(data: &Path, store_args: &[&str], env: &[(&str, &str)]) {
    let flags: Vec<&str> = LIVING.iter().chain(store_args).copied().collect();
    let server = Server::start_with_env(data, &flags, env);
    let w = Workload {
        devices: 150,
        days: 4,
        ..Workload::default()
    };
    let writes = w.writes();
    let expected = w.expected();
    let bodies = chunks(&writes, 2_000);
    // The first day is written whole (late and retried lines come within minutes).
    let first = bodies.len() * 2 / 5;
    for body in &bodies[..first] {
        server.write_ok(DB, "s", body);
    }
    let day_one: Vec<&Reading> = expected
        .values()
        .filter(|r| r.time < DEFAULT_START + DAY)
        .collect();
    let settled = vec![Query::same(
        "SELECT device, count(*) AS n, sum(water_level_cm) AS level, max(tilt_deg) AS tilt \
         FROM manhole WHERE time < '2025-12-02T00:00:00Z' GROUP BY device ORDER BY device",
    )];
    let settled_answer = duckdb_answers(day_one.iter().copied(), &settled).remove(0);

    // The rest goes in on another thread while the first day is asked about,
    // and compacted, again and again.
    let done = Arc::new(AtomicBool::new(false));
    let writer = {
        let client = server.client();
        let rest: Vec<String> = bodies[first..].to_vec();
        let done = done.clone();
        thread::spawn(move || {
            for body in rest {
                let (status, answer) = client.write(DB, "s", body.as_bytes()).unwrap();
                assert_eq!(status, 204, "{answer}");
            }
            done.store(true, Ordering::SeqCst);
        })
    };
    let mut asked = 0;
    let mut compactions = 0;
    while !done.load(Ordering::SeqCst) || asked < 3 {
        let (status, body) = server.query_raw(DB, &settled[0].sql, "json");
        assert_eq!(status, 200, "{body}");
        let got = citytsdb_tests::server::parse_json_rows(&body).unwrap();
        if let Err(why) = compare_rows(&got, &settled_answer, true) {
            panic!("query {asked}: the settled day answered differently: {why}");
        }
        asked += 1;
        if asked % 4 == 0 {
            compactions += server.compact()["compactions"].as_u64().unwrap_or(0);
        }
    }
    writer.join().unwrap();
    assert!(asked >= 3);
    server.flush(DB);
    let stats = server.compact();
    compactions += stats["compactions"].as_u64().unwrap_or(0);
    assert!(compactions > 0, "something was compacted");
    for ((table, day), n) in segments_per_day(&server) {
        assert_eq!(n, 1, "{table} {day}: a settled day is one segment");
    }
    let queries = queries();
    let answers = duckdb_answers(expected.values(), &queries);
    assert_answers(&server, DB, "after compaction", &queries, &answers);
    if store_args.is_empty() {
        segments_read_as_one_dataset(&server);
    }
    server.stop();
    let server = Server::start_with_env(data, &flags, env);
    assert_answers(&server, DB, "after a restart", &queries, &answers);
    server.stop();
}

#[test]
fn late_rows_sit_beside_a_compacted_day_until_compaction_folds_them_in() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(&dir.path().join("data"), &["--compaction-settle", "1h"]);
    let w = Workload {
        devices: 40,
        days: 1,
        ..Workload::default()
    }
    .clean();
    let mut expected = w.expected();
    for body in chunks(&w.writes(), 1_000) {
        server.write_ok(DB, "s", body);
        server.flush(DB);
    }
    assert!(segments_per_day(&server).values().all(|&n| n > 1));
    server.compact();
    assert_eq!(day_counts(&server), vec![1]);

    // Late readings: new times, and new values for times already written.
    let mut late = Vec::new();
    for device in (1..=40).step_by(3) {
        let mut r = w.reading(device, 7);
        r.water_level_cm = Some(-1.5);
        r.battery_pct = None;
        late.push(r);
        let mut new = w.reading(device, 7);
        new.time += 17;
        late.push(new);
    }
    for r in &late {
        citytsdb_tests::workload::apply(&mut expected, r);
    }
    server.write_ok(DB, "s", chunks(&late, 10_000).concat());
    let flushed = server.client().flush(DB).unwrap();
    let answer: Value = serde_json::from_str(&flushed.1).unwrap();
    assert_eq!(
        answer["segments_replaced"], 0,
        "a flush never rewrites a segment"
    );
    assert_eq!(day_counts(&server), vec![2]);
    let queries = vec![
        Query::same("SELECT count(*) AS n FROM manhole"),
        Query::same("SELECT * FROM manhole WHERE device IN ('mh-00001', 'mh-00004') ORDER BY device, time"),
        Query::same("SELECT device, sum(water_level_cm) AS level FROM manhole GROUP BY device ORDER BY device"),
    ];
    let answers = duckdb_answers(expected.values(), &queries);
    assert_answers(&server, DB, "late rows beside the day", &queries, &answers);
    let stats = server.compact();
    assert_eq!(stats["segments_in"], 2, "{stats}");
    assert_eq!(day_counts(&server), vec![1]);
    assert_answers(&server, DB, "late rows folded in", &queries, &answers);
    server.stop();
}

/// One batch of the crash test: 50 devices at one instant, values a function of
/// the batch and device.
fn batch_body(batch: u32) -> (i64, String, f64) {
    let time = DEFAULT_START + i64::from(batch % 3) * DAY + i64::from(batch) * 7;
    let mut body = String::new();
    let mut sum = 0.0;
    for d in 1..=50u32 {
        let level = f64::from((batch * 31 + d * 7) % 997) / 10.0;
        sum += level;
        body.push_str(&format!(
            "manhole,device={},district=金水区 water_level_cm={level},battery_pct={}i {time}\n",
            device_name(d),
            batch % 100
        ));
    }
    (time, body, sum)
}

/// Every file under a local store, as its key.
fn stored_keys(store: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut dirs = vec![store.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                dirs.push(e.path());
            } else {
                let rel = e.path().strip_prefix(store).unwrap().to_path_buf();
                out.push(rel.to_string_lossy().replace('\\', "/"));
            }
        }
    }
    out.sort();
    out
}

/// Writes batches from several threads until the server dies or `stop`; the
/// batches it acknowledged.
fn write_until_killed(client: &Client, next: &Mutex<u32>, acked: &Mutex<BTreeSet<u32>>) {
    loop {
        let batch = {
            let mut n = next.lock().unwrap();
            *n += 1;
            *n
        };
        let (_, body, _) = batch_body(batch);
        match client.write(DB, "s", body.as_bytes()) {
            Ok((204, _)) => {
                acked.lock().unwrap().insert(batch);
            }
            Ok((status, answer)) => panic!("batch {batch} answered {status}: {answer}"),
            Err(_) => return,
        }
    }
}

/// Checks that every acknowledged batch is there whole and once, and that any
/// other batch is there whole or not at all.
fn check_batches(server: &Server, acked: &BTreeSet<u32>, written: u32, round: u32) {
    let rows = server.query_json(
        DB,
        "SELECT CAST(time AS BIGINT) / 1000000000 AS t, count(*) AS n, \
         count(DISTINCT device) AS d, sum(water_level_cm) AS level FROM manhole GROUP BY time",
    );
    let by_time: BTreeMap<i64, &Row> = rows
        .iter()
        .map(|r| (r["t"].as_i64().unwrap_or(i64::MIN), r))
        .collect();
    for batch in 1..=written {
        let (time, _, sum) = batch_body(batch);
        match by_time.get(&time).copied() {
            Some(r) => {
                assert_eq!(
                    r["n"], 50,
                    "round {round}: batch {batch} is there twice or in part: {r:?}"
                );
                assert_eq!(r["d"], 50, "round {round}: batch {batch}: {r:?}");
                assert!(
                    same_value(&r["level"], &Value::from(sum)),
                    "round {round}: batch {batch} has other values: {r:?}"
                );
            }
            None => assert!(
                !acked.contains(&batch),
                "round {round}: acknowledged batch {batch} is lost"
            ),
        }
    }
}

/// Rounds of writing with tiny flushes and eager compaction, each ended by
/// `kill -9` at a random moment; then a sweep must leave only what the catalog
/// refers to. With `env`, the store is on the S3 endpoint.
fn crash_rounds(data: &Path, store_args: &[&str], env: &[(&str, &str)], rounds: u32) {
    let flags: Vec<&str> = [
        "--flush-rows",
        "400",
        "--compaction-settle",
        "0s",
        "--sweep-grace",
        "0s",
    ]
    .into_iter()
    .chain(store_args.iter().copied())
    .collect();
    let acked = Arc::new(Mutex::new(BTreeSet::new()));
    let next = Arc::new(Mutex::new(0u32));
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    for round in 1..=rounds {
        let server = Server::start_with_env(data, &flags, env);
        let writers: Vec<_> = (0..3)
            .map(|_| {
                let (client, next, acked) = (server.client(), next.clone(), acked.clone());
                thread::spawn(move || write_until_killed(&client, &next, &acked))
            })
            .collect();
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        thread::sleep(Duration::from_millis(150 + rng % 600));
        server.kill9();
        for w in writers {
            w.join().unwrap();
        }
        let server = Server::start_with_env(data, &flags, env);
        let written = *next.lock().unwrap();
        check_batches(&server, &acked.lock().unwrap(), written, round);
        server.kill9();
    }
    let server = Server::start_with_env(data, &flags, env);
    server.flush(DB);
    let stats = server.compact();
    assert!(stats["compactions"].as_u64().is_some(), "{stats}");
    let written = *next.lock().unwrap();
    check_batches(&server, &acked.lock().unwrap(), written, rounds + 1);
    server.stop();
}

#[test]
fn kill_9_during_flushes_and_compactions_loses_nothing_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    crash_rounds(&data, &[], &[], 20);
    // What is left in the store is what the catalog refers to, and its log.
    let server = Server::start_with(&data, &["--sweep-grace", "0s"]);
    server.compact();
    let referenced: HashSet<String> = server
        .query_json(DB, "SELECT path FROM system.segments")
        .iter()
        .filter_map(|r| r["path"].as_str().map(str::to_string))
        .collect();
    let store = data.join("store");
    let keys = stored_keys(&store);
    for key in &keys {
        let part_of_a_segment = referenced.contains(key)
            || key
                .strip_suffix(".index")
                .is_some_and(|k| referenced.contains(&format!("{k}.parquet")));
        let kept = part_of_a_segment || key.starts_with("catalog/") || key.starts_with("series/");
        assert!(
            kept,
            "{key} is in the store but not in the catalog; all: {keys:?}"
        );
        assert!(
            !key.contains('#'),
            "an interrupted upload's staging file is left: {key}"
        );
    }
    let series: Vec<&String> = keys.iter().filter(|k| k.starts_with("series/")).collect();
    assert_eq!(
        series.len(),
        1,
        "one folded registry for the one table: {series:?}"
    );
    let records = keys
        .iter()
        .filter(|k| k.starts_with("catalog/log/"))
        .count();
    assert!(
        records < 200,
        "{records} catalog records are left; the log is not folded"
    );
    server.stop();
}

#[test]
fn a_second_server_on_the_same_store_fences_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("file://{}", dir.path().join("shared-store").display());
    let args = ["--store", store.as_str()];
    let a = Server::start_with(&dir.path().join("a"), &args);
    let (_, first, _) = batch_body(1);
    a.write_ok(DB, "s", &first);
    a.flush(DB);
    let b = Server::start_with(&dir.path().join("b"), &args);
    let (_, second, _) = batch_body(2);
    a.write_ok(DB, "s", &second);
    let (status, body) = a.client().flush(DB).unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("fenced"), "{body}");
    let (_, third, _) = batch_body(3);
    b.write_ok(DB, "s", &third);
    b.flush(DB);
    let rows = b.query_json(
        DB,
        "SELECT count(*) AS n, count(DISTINCT time) AS t FROM manhole",
    );
    assert_eq!(
        (rows[0]["n"].as_u64(), rows[0]["t"].as_u64()),
        (Some(100), Some(2))
    );
    // The fenced server lost nothing: its rows are in its WAL, for when it takes
    // the store back.
    a.kill9();
    b.stop();
    let a = Server::start_with(&dir.path().join("a"), &args);
    a.flush(DB);
    let rows = a.query_json(DB, "SELECT count(*) AS n FROM manhole");
    assert_eq!(rows[0]["n"], 150);
    a.stop();
}

#[test]
fn the_same_on_an_s3_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let s3 = S3Endpoint::start(&dir.path().join("moto.log"));
    let env = s3.env();
    let store = format!("s3://{BUCKET}/lived");
    let compacted = format!("s3://{BUCKET}/compacted");
    compaction_under_load(
        &dir.path().join("compacted"),
        &["--store", compacted.as_str()],
        &env,
    );
    let args = ["--store", store.as_str()];
    crash_rounds(&dir.path().join("data"), &args, &env, 4);
    // Fencing on S3: a second data directory on the same prefix takes over.
    let b = Server::start_with_env(&dir.path().join("b"), &args, &env);
    let a = Server::start_with_env(&dir.path().join("c"), &args, &env);
    let (_, body, _) = batch_body(100_000);
    b.write_ok(DB, "s", &body);
    let (status, answer) = b.client().flush(DB).unwrap();
    assert_eq!(status, 503, "{answer}");
    assert!(answer.contains("fenced"), "{answer}");
    a.write_ok(DB, "s", &body);
    a.flush(DB);
    a.stop();
    b.kill9();
}
