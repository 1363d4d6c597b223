//! `GET /metrics`: Prometheus' text format, checked line by line and scraped by a
//! real Prometheus (Debian's package, on loopback) whose query API then returns the
//! server's counters.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use citytsdb_tests::prometheus::Prometheus;
use citytsdb_tests::Server;

const DB: &str = "city";

/// `name{labels}` -> value of every sample; fails on a line that is not one.
fn samples(text: &str) -> HashMap<String, f64> {
    let mut out = HashMap::new();
    for line in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (key, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("not a sample: {line:?}"));
        assert!(key.starts_with("citytsdb_"), "{line:?}");
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("not a number: {line:?}"));
        assert!(value.is_finite() && value >= 0.0, "{line:?}");
        out.insert(key.to_string(), value);
    }
    out
}

/// `text` without terminal colour codes.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[test]
fn metrics_are_served_and_scraped_by_prometheus() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"));
    let (status, body) = server.write(
        DB,
        "s",
        "manhole,device=a tilt_deg=1 1764547200\nmanhole,device=b tilt_deg=2 1764547200\n\
         manhole,device=c tilt_deg=\"x\" 1764547200\nmanhole,device=d tilt_deg=3 1764547260",
    );
    assert_eq!(status, 400, "{body}");
    server.write_ok(DB, "s", "manhole,device=e tilt_deg=4 1764547200");
    server.flush(DB);
    for _ in 0..3 {
        server.query_json(DB, "SELECT count(*) AS n FROM manhole");
    }
    let (status, _) = server.query_raw(DB, "SELECT nope FROM manhole", "json");
    assert_eq!(status, 400);

    let (status, text) = server.get("/metrics");
    assert_eq!(status, 200, "{text}");
    let m = samples(&text);
    let get = |k: &str| *m.get(k).unwrap_or_else(|| panic!("no {k} in\n{text}"));
    assert_eq!(get("citytsdb_writes_total"), 2.0);
    assert_eq!(
        get("citytsdb_rows_written_total"),
        4.0,
        "the partial write's 3 rows and 1"
    );
    assert_eq!(get("citytsdb_rejected_lines_total"), 1.0);
    assert!(get("citytsdb_write_bytes_total") > 100.0);
    assert!(get("citytsdb_queries_total") >= 3.0);
    // The same statement thrice: planned once, then run from its kept plan.
    assert!(get("citytsdb_plan_cache_hits_total") >= 2.0);
    assert!(get("citytsdb_plan_cache_misses_total") >= 1.0);
    assert!(get("citytsdb_plan_cache_entries") >= 1.0);
    assert!(get("citytsdb_plan_cache_whole_hits_total") <= get("citytsdb_plan_cache_hits_total"));
    assert_eq!(
        get("citytsdb_query_duration_seconds_count"),
        get("citytsdb_queries_total")
    );
    assert_eq!(
        get("citytsdb_query_duration_seconds_bucket{le=\"+Inf\"}"),
        get("citytsdb_queries_total")
    );
    let mut buckets: Vec<(f64, f64)> = m
        .iter()
        .filter_map(|(k, v)| {
            let le = k.strip_prefix("citytsdb_query_duration_seconds_bucket{le=\"")?;
            Some((
                le.trim_end_matches("\"}").parse().unwrap_or(f64::INFINITY),
                *v,
            ))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    assert!(buckets.windows(2).all(|w| w[0].1 <= w[1].1), "{buckets:?}");
    assert_eq!(get("citytsdb_flushes_total"), 1.0);
    assert_eq!(get("citytsdb_flushed_rows_total"), 4.0);
    assert_eq!(get("citytsdb_buffer_rows"), 0.0);
    assert!(get("citytsdb_segments{db=\"city\",table=\"manhole\"}") >= 1.0);
    assert!(get("citytsdb_segment_bytes{db=\"city\",table=\"manhole\"}") > 0.0);
    assert!(get("citytsdb_object_store_operations_total{operation=\"put\"}") >= 2.0);
    assert!(m.contains_key("citytsdb_wal_bytes"));
    assert!(m.contains_key("citytsdb_rule_evaluations_total"));
    assert!(m.contains_key("citytsdb_notifications_failed_total"));
    assert_eq!(get("citytsdb_notifications_dropped_total"), 0.0);
    assert_eq!(get("citytsdb_alert_outbox_notifications"), 0.0);
    assert!(m.contains_key("citytsdb_compactions_total"));

    // A real Prometheus scrapes it, and its query API returns the counters.
    let target = server.url().trim_start_matches("http://").to_string();
    let prometheus = Prometheus::start(&target);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let rows = prometheus.query("citytsdb_rows_written_total");
        let up = prometheus.query("up{job=\"citytsdb\"}");
        if rows.len() == 1 && rows[0].1 == 4.0 && up.first().map(|u| u.1) == Some(1.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus did not scrape the counters within 30 s: {rows:?} {up:?}\n{}",
            prometheus.log()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let segments = prometheus.query("citytsdb_segments");
    assert_eq!(segments.len(), 1, "{segments:?}");
    assert_eq!(segments[0].0["table"], "manhole");
    let latency = prometheus.query("citytsdb_query_duration_seconds_count");
    assert!(latency.first().is_some_and(|l| l.1 >= 3.0), "{latency:?}");
    server.stop();
}

/// Every answer carries a request id (the client's, or a new one); a query past
/// `--slow-query-time` is logged with its SQL, its time and that id.
#[test]
fn requests_have_ids_and_slow_queries_are_logged() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(&dir.path().join("data"), &["--slow-query-time", "0s"]);
    server.write_ok(DB, "s", "manhole,device=a tilt_deg=1 1764547200");
    let agent = ureq::Agent::new_with_config(
        ureq::config::Config::builder()
            .timeout_global(Some(Duration::from_secs(30)))
            .http_status_as_error(false)
            .build(),
    );
    let sql = "SELECT device, tilt_deg FROM manhole WHERE tilt_deg > 0.5";
    let url = format!(
        "{}/api/v1/query?db={DB}&sql={}",
        server.url(),
        sql.replace(' ', "%20").replace('>', "%3E")
    );
    let r = agent
        .get(&url)
        .header("X-Request-Id", "dashboard-42")
        .call()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(
        r.headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok()),
        Some("dashboard-42")
    );
    let r = agent
        .get(format!("{}/health", server.url()))
        .call()
        .unwrap();
    let made = r
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert!(!made.is_empty() && made != "dashboard-42", "{made:?}");
    // An id that is not a short token is replaced.
    let r = agent
        .get(format!("{}/health", server.url()))
        .header("X-Request-Id", "has spaces and {braces}")
        .call()
        .unwrap();
    let replaced = r
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok());
    assert!(replaced.is_some_and(|v| !v.contains(' ')), "{replaced:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = strip_ansi(&server.log());
        let slow = log
            .lines()
            .find(|l| l.contains("slow query") && l.contains("dashboard-42"));
        if let Some(line) = slow {
            assert!(line.contains(sql), "{line}");
            assert!(line.contains("ms="), "{line}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no slow-query line with the request id:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    server.stop();
}
