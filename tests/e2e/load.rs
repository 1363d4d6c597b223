//! Under load: concurrent writers, readers and alert rules on loopback for a few
//! seconds, bounded in requests and time. Every answer is a success or a 503 with
//! `Retry-After` (back-pressure, honoured by sending the same batch again), never
//! another error; every acknowledged row is there afterwards with its value; the
//! server's peak memory stays bounded; alerts reach their webhook meanwhile. The
//! write latencies are printed (the figures on a release build are in
//! BENCHMARKS.md, from `benches/load_bench.py`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use citytsdb_tests::receiver::Receiver;
use citytsdb_tests::Server;
use serde_json::{json, Value};

const DB: &str = "city";
const WRITERS: u32 = 6;
const READERS: u32 = 3;
/// Covers per writer; each batch is one reading of each.
const COVERS: u32 = 200;
/// How long the load lasts, and the most requests a thread sends.
const LOAD_FOR: Duration = Duration::from_secs(6);
const MAX_REQUESTS: u32 = 400;
/// The server's peak resident memory must stay under this (a debug build holding
/// a few hundred thousand rows, a write buffer of at most `--max-buffer-size`).
const MAX_PEAK_RSS_MIB: u64 = 1024;

fn agent() -> ureq::Agent {
    ureq::Agent::new_with_config(
        ureq::config::Config::builder()
            .timeout_global(Some(Duration::from_secs(30)))
            .http_status_as_error(false)
            .build(),
    )
}

/// What all threads saw.
#[derive(Default)]
struct Seen {
    write_latencies: Mutex<Vec<Duration>>,
    query_latencies: Mutex<Vec<Duration>>,
    /// Unexpected answers, with what was asked.
    errors: Mutex<Vec<String>>,
    back_pressure: AtomicU64,
    /// Acknowledged rows and the sum of their tilts (in thousandths, exact).
    rows: AtomicU64,
    tilt_milli: AtomicU64,
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Writer `w`'s batch `i`: one reading of each of its covers, a second apart per
/// batch ending now; one cover in a hundred tilted past 15 degrees.
fn batch(w: u32, i: u32, start: u64) -> (String, u64) {
    let mut body = String::new();
    let mut tilt_milli = 0;
    for c in 0..COVERS {
        let milli = u64::from((w * 7919 + i * 104_729 + c * 31) % 12_000) + 100;
        let milli = if (i + c).is_multiple_of(100) {
            20_000 + milli
        } else {
            milli
        };
        tilt_milli += milli;
        body.push_str(&format!(
            "manhole,device=w{w}-c{c:03},district=d{} tilt_deg={}.{:03},water_level_cm={}i {}\n",
            c % 8,
            milli / 1000,
            milli % 1000,
            c % 50,
            start + u64::from(i)
        ));
    }
    (body, tilt_milli)
}

fn writer(url: String, w: u32, start: u64, deadline: Instant, seen: Arc<Seen>) {
    let agent = agent();
    for i in 0..MAX_REQUESTS {
        if Instant::now() > deadline {
            break;
        }
        let (body, tilt) = batch(w, i, start);
        // Back-pressure: the same batch again after `Retry-After`, a few times.
        for attempt in 0.. {
            let began = Instant::now();
            let answer = agent
                .post(format!("{url}/api/v1/write?db={DB}&precision=s"))
                .send(body.as_str());
            let mut r = match answer {
                Ok(r) => r,
                Err(e) => {
                    seen.errors
                        .lock()
                        .unwrap()
                        .push(format!("write {w}/{i}: {e}"));
                    return;
                }
            };
            let status = r.status().as_u16();
            seen.write_latencies.lock().unwrap().push(began.elapsed());
            match status {
                204 => {
                    seen.rows.fetch_add(u64::from(COVERS), Ordering::Relaxed);
                    seen.tilt_milli.fetch_add(tilt, Ordering::Relaxed);
                    break;
                }
                503 if attempt < 20 => {
                    seen.back_pressure.fetch_add(1, Ordering::Relaxed);
                    let retry = r
                        .headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<u64>().ok());
                    let Some(retry) = retry else {
                        seen.errors
                            .lock()
                            .unwrap()
                            .push(format!("write {w}/{i}: 503 without Retry-After"));
                        return;
                    };
                    thread::sleep(Duration::from_secs(retry.min(2)));
                }
                _ => {
                    let text = r.body_mut().read_to_string().unwrap_or_default();
                    seen.errors
                        .lock()
                        .unwrap()
                        .push(format!("write {w}/{i}: {status} {text}"));
                    return;
                }
            }
        }
    }
}

fn reader(url: String, r: u32, deadline: Instant, seen: Arc<Seen>) {
    let agent = agent();
    let queries = [
        "SELECT time, tilt_deg, water_level_cm FROM manhole WHERE device = 'w1-c007' AND time > now() - INTERVAL '1 hour' ORDER BY time",
        "SELECT date_bin(INTERVAL '1 minute', time) AS minute, avg(tilt_deg) AS tilt FROM manhole WHERE district = 'd3' AND time > now() - INTERVAL '1 hour' GROUP BY 1 ORDER BY 1",
        "SELECT DISTINCT ON (device) device, time, tilt_deg FROM manhole ORDER BY device, time DESC",
        "SELECT district, count(*) AS n, max(tilt_deg) AS worst FROM manhole GROUP BY district ORDER BY district",
    ];
    for i in 0..MAX_REQUESTS {
        if Instant::now() > deadline {
            break;
        }
        let sql = queries[((r + i) as usize) % queries.len()];
        let began = Instant::now();
        let answer = agent
            .post(format!("{url}/api/v1/query"))
            .send(json!({"db": DB, "sql": sql, "format": "json"}).to_string());
        let mut answer = match answer {
            Ok(a) => a,
            Err(e) => {
                seen.errors
                    .lock()
                    .unwrap()
                    .push(format!("query {sql}: {e}"));
                return;
            }
        };
        let status = answer.status().as_u16();
        seen.query_latencies.lock().unwrap().push(began.elapsed());
        if status != 200 {
            let text = answer.body_mut().read_to_string().unwrap_or_default();
            seen.errors
                .lock()
                .unwrap()
                .push(format!("query {sql}: {status} {text}"));
            return;
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn peak_rss_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/PID/status");
    kib / 1024
}

#[test]
fn concurrent_writers_readers_and_rules_see_no_errors_and_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    // A small write buffer and frequent flushes: back-pressure is possible.
    let args = ["--max-buffer-size", "2MiB", "--flush-interval", "1s"];
    let server = Server::start_with(&dir.path().join("data"), &args);
    let hook = Receiver::start();
    // A table first, so rules can be checked against it.
    let start = now_s() - 600;
    server.write_ok(DB, "s", batch(99, 0, start - 10).0);
    let base_rows = u64::from(COVERS);
    let base_tilt = batch(99, 0, start - 10).1;
    let rules = [
        // Plain filters: checked against every written batch.
        ("tilted", "SELECT device, district, tilt_deg FROM manhole WHERE tilt_deg > 15", "0s"),
        ("flooded", "SELECT device, district, water_level_cm FROM manhole WHERE water_level_cm > 48", "0s"),
        // Aggregates: evaluated every second.
        ("district-tilt", "SELECT district, max(tilt_deg) AS tilt FROM manhole WHERE time > now() - INTERVAL '1 hour' GROUP BY district HAVING max(tilt_deg) > 15", "0s"),
        ("silent", "SELECT device, district FROM system.devices WHERE table_name = 'manhole' AND last_time < now() - INTERVAL '1 hour'", "1m"),
    ];
    for (name, sql, for_) in rules {
        let rule = json!({
            "name": name, "department": "covers", "db": DB, "sql": sql,
            "every": "1s", "for": for_, "severity": "warning",
            "webhook": hook.url(),
        });
        let mut r = agent()
            .post(format!("{}/api/v1/rules", server.url()))
            .send(rule.to_string())
            .unwrap();
        let status = r.status().as_u16();
        assert_eq!(
            status,
            201,
            "{}",
            r.body_mut().read_to_string().unwrap_or_default()
        );
    }

    let seen = Arc::new(Seen::default());
    let deadline = Instant::now() + LOAD_FOR;
    let mut threads = Vec::new();
    for w in 0..WRITERS {
        let (url, seen) = (server.url().to_string(), seen.clone());
        threads.push(thread::spawn(move || writer(url, w, start, deadline, seen)));
    }
    for r in 0..READERS {
        let (url, seen) = (server.url().to_string(), seen.clone());
        threads.push(thread::spawn(move || reader(url, r, deadline, seen)));
    }
    for t in threads {
        t.join().unwrap();
    }
    let errors = seen.errors.lock().unwrap().clone();
    assert!(errors.is_empty(), "errors under load: {errors:#?}");

    let mut writes = seen.write_latencies.lock().unwrap().clone();
    let mut queries = seen.query_latencies.lock().unwrap().clone();
    writes.sort();
    queries.sort();
    let rows = seen.rows.load(Ordering::Relaxed);
    eprintln!(
        "load: {} writes ({rows} rows, {} answered 503), write p50 {:?} p99 {:?} max {:?}; {} queries, p50 {:?} p99 {:?}",
        writes.len(),
        seen.back_pressure.load(Ordering::Relaxed),
        percentile(&writes, 0.5),
        percentile(&writes, 0.99),
        percentile(&writes, 1.0),
        queries.len(),
        percentile(&queries, 0.5),
        percentile(&queries, 0.99),
    );
    assert!(
        writes.len() >= WRITERS as usize * 5,
        "{} writes",
        writes.len()
    );
    assert!(
        queries.len() >= READERS as usize * 3,
        "{} queries",
        queries.len()
    );

    // Every acknowledged row, with its value.
    let got = server.query_json(
        DB,
        "SELECT count(*) AS n, CAST(round(sum(tilt_deg) * 1000) AS BIGINT) AS tilt FROM manhole",
    );
    assert_eq!(got[0]["n"], json!(rows + base_rows));
    assert_eq!(
        got[0]["tilt"],
        json!(seen.tilt_milli.load(Ordering::Relaxed) + base_tilt)
    );
    // Alerts were delivered meanwhile (the tilted covers fire at once).
    let waited = Instant::now();
    while hook.count() == 0 {
        assert!(
            waited.elapsed() < Duration::from_secs(20),
            "no alert reached the webhook"
        );
        thread::sleep(Duration::from_millis(100));
    }
    let (status, health) = server.get("/health");
    assert_eq!(status, 200, "{health}");
    let health: Value = serde_json::from_str(&health).unwrap();
    assert_eq!(health["status"], "ok", "{health}");
    let peak = peak_rss_mib(server.pid());
    eprintln!("load: server peak RSS {peak} MiB");
    assert!(peak < MAX_PEAK_RSS_MIB, "peak RSS {peak} MiB");
    server.stop();
}
