//! The server answers an analyst's questions as DuckDB does over the same rows,
//! wherever the rows live: in the write buffer, in flushed segments, after a
//! graceful restart, and after overwrites replayed from the WAL over segments.
//!
//! 1,000 covers report every 5 minutes for a day (288,000 rows, plus retries and
//! late readings), written over HTTP in chunks of 20,000 lines.

use citytsdb_tests::oracle::{assert_answers, duckdb_answers, Query};
use citytsdb_tests::workload::{chunks, Workload};
use citytsdb_tests::Server;

const DB: &str = "city";
const LINES_PER_CHUNK: usize = 20_000;

/// The same question for DuckDB, whose name for `date_bin` is `time_bucket`.
fn binned(sql: &str) -> Query {
    Query::pair(sql, &sql.replace("date_bin(", "time_bucket("))
}

/// What analysts ask of the manhole table. Every computed column has an alias
/// (the engines name expressions differently) and every `ORDER BY` is a total
/// order on exact values (never on a float sum or average, whose last bits
/// depend on the order of addition), so answers are deterministic.
fn queries() -> Vec<Query> {
    vec![
        Query::same("SELECT count(*) AS n FROM manhole"),
        Query::same("SELECT device, count(*) AS n FROM manhole GROUP BY device HAVING count(*) <> 288 ORDER BY device"),
        Query::same("SELECT district, count(*) AS n FROM manhole GROUP BY district ORDER BY district"),
        Query::same("SELECT * FROM manhole WHERE device = 'mh-00042' ORDER BY time"),
        Query::same(
            "SELECT time, device, district, tilt_deg, water_level_cm, battery_pct, cover_open FROM manhole \
             WHERE device = 'mh-00999' AND time >= '2025-12-01T20:00:00Z' ORDER BY time DESC",
        ),
        Query::same(
            "SELECT device, time, water_level_cm FROM manhole WHERE district = '金水区' \
             AND time >= '2025-12-01T06:00:00Z' AND time < '2025-12-01T07:00:00Z' ORDER BY device, time",
        ),
        Query::same("SELECT device, time, tilt_deg, cover_open FROM manhole WHERE tilt_deg > 15 ORDER BY device, time"),
        Query::same(
            "SELECT device, time, battery_pct FROM manhole WHERE battery_pct BETWEEN 60 AND 62 \
             AND time BETWEEN '2025-12-01T12:00:00Z' AND '2025-12-01T12:30:00Z' ORDER BY device, time",
        ),
        Query::same(
            "SELECT device, district, water_level_cm FROM manhole WHERE district IN ('二七区', 'high tech') \
             AND time = '2025-12-01T18:00:00Z' ORDER BY device",
        ),
        Query::same("SELECT device, time FROM manhole WHERE NOT cover_open = false ORDER BY device, time"),
        Query::same(
            "SELECT device, time, tilt_deg, water_level_cm FROM manhole \
             WHERE (tilt_deg > 10 OR water_level_cm > 115) AND district <> 'zhengdong' ORDER BY device, time",
        ),
        Query::same(
            "SELECT device, time, water_level_cm / 100.0 AS water_level_m, tilt_deg * 2 + 1 AS tilt_score, \
             100 - battery_pct AS battery_used FROM manhole \
             WHERE device IN ('mh-00001', 'mh-00500') AND time < '2025-12-01T02:00:00Z' ORDER BY device, time",
        ),
        Query::same(
            "SELECT district, avg(water_level_cm) AS avg_level, min(water_level_cm) AS min_level, \
             max(water_level_cm) AS max_level FROM manhole GROUP BY district ORDER BY district",
        ),
        Query::same("SELECT district, sum(battery_pct) AS battery_total, count(*) AS n FROM manhole GROUP BY district"),
        binned(
            "SELECT date_bin(INTERVAL '1 hour', time) AS hour, avg(water_level_cm) AS avg_level, \
             count(*) AS n FROM manhole GROUP BY date_bin(INTERVAL '1 hour', time) ORDER BY hour",
        ),
        binned(
            "SELECT district, date_bin(INTERVAL '1 hour', time) AS hour, count(*) AS n, max(tilt_deg) AS max_tilt, \
             sum(water_level_cm) AS level_sum FROM manhole \
             WHERE time >= '2025-12-01T08:00:00Z' AND time < '2025-12-01T12:00:00Z' \
             GROUP BY district, date_bin(INTERVAL '1 hour', time) ORDER BY district, hour",
        ),
        binned(
            "SELECT date_bin(INTERVAL '15 minutes', time) AS bucket, \
             sum(CASE WHEN cover_open THEN 1 ELSE 0 END) AS opened FROM manhole \
             GROUP BY date_bin(INTERVAL '15 minutes', time) ORDER BY bucket",
        ),
        binned(
            "SELECT district, date_bin(INTERVAL '1 day', time) AS day, count(*) AS n, \
             avg(battery_pct) AS avg_battery FROM manhole \
             GROUP BY district, date_bin(INTERVAL '1 day', time) ORDER BY district, day",
        ),
        Query::same(
            "SELECT device, time, water_level_cm FROM manhole ORDER BY water_level_cm DESC, device, time LIMIT 20",
        ),
        Query::same(
            "SELECT device, max(tilt_deg) AS max_tilt FROM manhole GROUP BY device \
             HAVING max(tilt_deg) > 15 ORDER BY max_tilt DESC, device",
        ),
        Query::same(
            "SELECT device, min(battery_pct) AS min_battery FROM manhole GROUP BY device \
             ORDER BY min_battery, device LIMIT 10",
        ),
        Query::same("SELECT count(DISTINCT device) AS devices FROM manhole WHERE water_level_cm > 100"),
        Query::same(
            "SELECT district, count(*) AS n, min(device) AS first_device FROM manhole \
             WHERE device LIKE 'mh-009%' GROUP BY district ORDER BY district",
        ),
        Query::same(
            "SELECT device, time, water_level_cm FROM manhole \
             WHERE time > '2025-12-01T23:00:00Z' AND device BETWEEN 'mh-00100' AND 'mh-00110' \
             ORDER BY time DESC, device LIMIT 50 OFFSET 5",
        ),
        Query::same(
            "SELECT device, max(water_level_cm) AS peak, avg(water_level_cm) AS avg_level FROM manhole \
             WHERE district = 'high tech' AND time BETWEEN '2025-12-01T00:00:00Z' AND '2025-12-01T05:59:59Z' \
             GROUP BY device ORDER BY peak DESC, device LIMIT 15",
        ),
        Query::same(
            "SELECT time, count(*) AS n FROM manhole WHERE cover_open OR tilt_deg > 15 GROUP BY time ORDER BY time",
        ),
        binned(
            "WITH hourly AS (SELECT device, date_bin(INTERVAL '1 hour', time) AS hour, \
             max(water_level_cm) AS peak FROM manhole WHERE district <> 'zhengdong' \
             GROUP BY device, date_bin(INTERVAL '1 hour', time)) \
             SELECT hour, count(*) AS flooded FROM hourly WHERE peak > 90 GROUP BY hour ORDER BY hour",
        ),
        Query::same(
            "SELECT device, time, water_level_cm - 50 AS above_50 FROM manhole \
             WHERE NOT (district = '管城区' OR district = 'zhengdong') AND water_level_cm >= 95 \
             ORDER BY device, time",
        ),
        Query::same(
            "SELECT min(time) AS first_time, max(time) AS last_time, count(*) AS n FROM manhole \
             WHERE device = 'mh-00777'",
        ),
        Query::same(
            "SELECT device, time, cover_open, battery_pct FROM manhole \
             WHERE time IN (TIMESTAMP '2025-12-01 00:00:00', TIMESTAMP '2025-12-01 12:00:00') \
             AND device < 'mh-00010' ORDER BY device, time",
        ),
        Query::same(
            "SELECT district, avg(battery_pct) AS avg_battery, max(battery_pct) - min(battery_pct) AS spread \
             FROM manhole WHERE time >= TIMESTAMP '2025-12-01 20:00:00' GROUP BY district ORDER BY district",
        ),
        Query::same(
            "SELECT device, time, water_level_cm FROM manhole \
             WHERE device = 'mh-00321' AND (water_level_cm < 30 OR water_level_cm > 60) \
             AND NOT cover_open ORDER BY time LIMIT 40",
        ),
        // first(x)/last(x): the value at the group's earliest/latest time where x is
        // not NULL; DuckDB says it with arg_min/arg_max.
        Query::pair(
            "SELECT device, first(tilt_deg) AS f_tilt, last(tilt_deg) AS l_tilt, \
             first(battery_pct) AS f_battery, last(cover_open) AS l_open, last(water_level_cm) AS l_level \
             FROM manhole WHERE device < 'mh-00100' GROUP BY device ORDER BY device",
            "SELECT device, arg_min(tilt_deg, time) FILTER (WHERE tilt_deg IS NOT NULL) AS f_tilt, \
             arg_max(tilt_deg, time) FILTER (WHERE tilt_deg IS NOT NULL) AS l_tilt, \
             arg_min(battery_pct, time) FILTER (WHERE battery_pct IS NOT NULL) AS f_battery, \
             arg_max(cover_open, time) FILTER (WHERE cover_open IS NOT NULL) AS l_open, \
             arg_max(water_level_cm, time) FILTER (WHERE water_level_cm IS NOT NULL) AS l_level \
             FROM manhole WHERE device < 'mh-00100' GROUP BY device ORDER BY device",
        ),
        Query::pair(
            "SELECT device, date_bin(INTERVAL '6 hours', time) AS quarter, last(water_level_cm) AS level \
             FROM manhole WHERE device >= 'mh-00950' GROUP BY device, date_bin(INTERVAL '6 hours', time) \
             ORDER BY device, quarter",
            "SELECT device, time_bucket(INTERVAL '6 hours', time) AS quarter, \
             arg_max(water_level_cm, time) FILTER (WHERE water_level_cm IS NOT NULL) AS level \
             FROM manhole WHERE device >= 'mh-00950' GROUP BY device, time_bucket(INTERVAL '6 hours', time) \
             ORDER BY device, quarter",
        ),
        // Latest per device: answered from the series registry, checked against a scan.
        Query::same(
            "SELECT DISTINCT ON (device) device, district, time, tilt_deg, water_level_cm, battery_pct, cover_open \
             FROM manhole ORDER BY device, time DESC",
        ),
        Query::same(
            "SELECT DISTINCT ON (device) device, time, water_level_cm FROM manhole \
             WHERE district = '金水区' AND time >= '2025-12-01T12:00:00Z' ORDER BY device, time DESC",
        ),
        // Gap filling: 150-second buckets over 5-minute readings leave every other
        // bucket empty; DuckDB fills them with a series of buckets and a window.
        Query::pair(
            "SELECT date_bin_gapfill(INTERVAL '150 seconds', time) AS bucket, device, \
             avg(water_level_cm) AS level, locf(avg(water_level_cm)) AS carried, count(*) AS n \
             FROM manhole WHERE device IN ('mh-00001', 'mh-00002', 'mh-00003') \
             AND time >= '2025-12-01T01:00:00Z' AND time < '2025-12-01T03:00:00Z' \
             GROUP BY bucket, device ORDER BY device, bucket",
            "WITH buckets AS (SELECT unnest(generate_series(TIMESTAMP '2025-12-01 01:00:00', \
             TIMESTAMP '2025-12-01 02:57:30', INTERVAL '150 seconds')) AS bucket), \
             devices AS (SELECT DISTINCT device FROM manhole WHERE device IN ('mh-00001', 'mh-00002', 'mh-00003') \
             AND time >= TIMESTAMP '2025-12-01 01:00:00' AND time < TIMESTAMP '2025-12-01 03:00:00'), \
             agg AS (SELECT time_bucket(INTERVAL '150 seconds', time) AS bucket, device, \
             avg(water_level_cm) AS level, count(*) AS n FROM manhole \
             WHERE device IN ('mh-00001', 'mh-00002', 'mh-00003') \
             AND time >= TIMESTAMP '2025-12-01 01:00:00' AND time < TIMESTAMP '2025-12-01 03:00:00' GROUP BY 1, 2) \
             SELECT b.bucket, d.device, a.level, \
             last_value(a.level IGNORE NULLS) OVER (PARTITION BY d.device ORDER BY b.bucket \
             ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) AS carried, a.n \
             FROM buckets b CROSS JOIN devices d LEFT JOIN agg a ON a.bucket = b.bucket AND a.device = d.device \
             ORDER BY d.device, b.bucket",
        ),
    ]
}

#[test]
fn answers_match_duckdb_in_buffer_segments_restart_and_wal_replay() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let workload = Workload::default();
    let queries = queries();
    assert!(queries.len() >= 25);

    let writes = workload.writes();
    let mut expected = workload.expected();
    assert_eq!(expected.len() as u64, workload.rows());
    let answers = duckdb_answers(expected.values(), &queries);
    // Only the duplicate check (`HAVING count(*) <> 288`) may be empty: a
    // question with no rows would prove little.
    let empty = answers.iter().filter(|a| a.is_empty()).count();
    assert_eq!(
        empty, 1,
        "queries with an empty oracle answer; adjust them to the workload"
    );

    // (a) Straight after writing: every row is in the write buffer.
    let server = Server::start(&data);
    for body in chunks(&writes, LINES_PER_CHUNK) {
        server.write_ok(DB, "s", body);
    }
    assert_answers(
        &server,
        DB,
        "(a) rows in the write buffer",
        &queries,
        &answers,
    );

    // (b) After a flush: every row is in Parquet segments.
    let segments = server.flush(DB);
    assert!(
        segments >= 1,
        "a flush of 288,000 rows wrote {segments} segments"
    );
    assert_answers(
        &server,
        DB,
        "(b) rows in flushed segments",
        &queries,
        &answers,
    );

    // (c) After a graceful restart.
    server.stop();
    let server = Server::start(&data);
    assert_answers(
        &server,
        DB,
        "(c) after a graceful restart",
        &queries,
        &answers,
    );

    // (d) Overwrites of flushed rows (some carrying every field, some only a
    // few), first from the buffer, then replayed from the WAL after kill -9.
    let overwrites = workload.overwrites(&mut expected, 5_000, 7);
    let answers = duckdb_answers(expected.values(), &queries);
    for body in chunks(&overwrites, LINES_PER_CHUNK) {
        server.write_ok(DB, "s", body);
    }
    assert_answers(
        &server,
        DB,
        "(d1) overwrites in the buffer over segments",
        &queries,
        &answers,
    );
    server.kill9();
    let server = Server::start(&data);
    assert_answers(
        &server,
        DB,
        "(d2) overwrites replayed from the WAL after kill -9",
        &queries,
        &answers,
    );
    server.stop();
}
