//! Differential test: hundreds of random analyst queries answered by citytsdb and
//! by DuckDB over the same rows must give the same answers, wherever the rows
//! live: (a) in the write buffer, (b) in flushed Parquet segments, (c) partly
//! overwritten by partial writes still in the buffer over those segments, and
//! (d) after those overwrites are flushed too.
//!
//! What it proves: over the manhole workload (200 covers every 5 minutes for a
//! day from noon UTC, so two UTC-day segments, retries and late readings
//! included), plus 10 covers that send only some fields (so NULL fields and
//! partial-write merges take part) and 3 written without a district tag (so NULL
//! tags do too), citytsdb's filters (tags, fields, time; AND/OR/NOT; NULL logic),
//! projections, aggregates, time buckets, GROUP BY, HAVING, ORDER BY,
//! LIMIT/OFFSET, DISTINCT [ON], subqueries, joins, unions and window functions
//! agree with an engine we did not write — through the real binary over HTTP, with
//! segment and tag-index pruning and the buffer/segment merge in play. The
//! queries come from `citytsdb_tests::sqlgen`, which writes each one for both
//! dialects and keeps answers deterministic (aliases, total orders over exact
//! values, multiset comparison otherwise; floats equal within a relative 1e-9).
//!
//! Seed and size: `CITYTSDB_DIFF_SEED` (decimal, or hex with `0x`) picks the
//! queries (default [`DEFAULT_SEED`], printed at the start and on failure, so any
//! run can be repeated exactly), `CITYTSDB_DIFF_QUERIES` how many (default
//! [`DEFAULT_QUERIES`]). The data does not depend on the seed.
//! `CITYTSDB_DIFF_DUMP=DIR` also writes the rows (as the oracle's CSV) and both
//! spellings of every query under DIR, to replay them by hand.
//!
//! On a mismatch every query still runs; the test then fails with the number of
//! mismatches per stage and, for the first few, both SQL strings and both answers.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use citytsdb_tests::oracle::{duckdb_answers, write_rows_csv};
use citytsdb_tests::sqlgen::{
    chunks, compare_answers, generate, partial_overwrites, sparse_writes, GenQuery, Universe,
};
use citytsdb_tests::workload::{apply, Expected, Reading, Workload, DAY, DEFAULT_START};
use citytsdb_tests::{Client, Row, Server};
use serde_json::Value;

const DB: &str = "city";
/// Covers of the regular workload.
const DEVICES: u32 = 200;
/// Covers that send only some fields (numbered after the regular ones).
const SPARSE_DEVICES: u32 = 10;
/// Covers written without a district tag (numbered after the sparse ones).
const UNTAGGED_DEVICES: u32 = 3;
/// Queries drawn when `CITYTSDB_DIFF_SEED` is not set.
const DEFAULT_SEED: u64 = 20_251_201;
/// Queries per run when `CITYTSDB_DIFF_QUERIES` is not set.
const DEFAULT_QUERIES: usize = 600;
/// Lines per write request.
const LINES_PER_CHUNK: usize = 20_000;
/// Concurrent HTTP clients sending the queries.
const CLIENTS: usize = 4;
/// Mismatches shown in full in the failure message.
const SHOWN: usize = 5;
/// Rows of each answer shown for a mismatch.
const SHOWN_ROWS: usize = 8;

fn seed() -> u64 {
    match std::env::var("CITYTSDB_DIFF_SEED") {
        Ok(text) if !text.trim().is_empty() => {
            let text = text.trim();
            let parsed = match text.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => text.parse(),
            };
            parsed.unwrap_or_else(|e| panic!("CITYTSDB_DIFF_SEED={text:?} is not a u64: {e}"))
        }
        _ => DEFAULT_SEED,
    }
}

fn query_count() -> usize {
    match std::env::var("CITYTSDB_DIFF_QUERIES") {
        Ok(text) if !text.trim().is_empty() => text
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("CITYTSDB_DIFF_QUERIES={text:?} is not a count: {e}")),
        _ => DEFAULT_QUERIES,
    }
}

/// The server's answer to one query: rows, or what went wrong.
type Answer = Result<Vec<Row>, String>;

/// Runs every query on the server (JSON format) from [`CLIENTS`] threads; the
/// answers in query order. Fails the test if the server cannot be reached.
fn server_answers(server: &Server, queries: &[GenQuery]) -> Vec<(Answer, Duration)> {
    let mut answers: Vec<Option<(Answer, Duration)>> = vec![None; queries.len()];
    type Outcome = (usize, Result<Answer, String>, Duration);
    let results: Vec<Vec<Outcome>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..CLIENTS)
            .map(|worker| {
                let client: Client = server.client();
                scope.spawn(move || {
                    (worker..queries.len())
                        .step_by(CLIENTS)
                        .map(|i| {
                            let sent = Instant::now();
                            let outcome = match client.query(DB, &queries[i].query.sql, "json") {
                                Err(e) => Err(e.to_string()),
                                Ok((200, body)) => {
                                    Ok(citytsdb_tests::server::parse_json_rows(&body))
                                }
                                Ok((status, body)) => {
                                    Ok(Err(format!("server answered {status}: {body}")))
                                }
                            };
                            (i, outcome, sent.elapsed())
                        })
                        .collect()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a query thread panicked"))
            .collect()
    });
    for (i, outcome, took) in results.into_iter().flatten() {
        match outcome {
            Ok(answer) => answers[i] = Some((answer, took)),
            Err(e) => server.fail(&format!(
                "query {i} got no answer, the server is unreachable: {e}\n  {}",
                queries[i].query.sql
            )),
        }
    }
    answers
        .into_iter()
        .map(|a| a.expect("every query was sent"))
        .collect()
}

/// At most [`SHOWN_ROWS`] rows as JSON lines, and how many there were.
fn show_rows(rows: &[Row]) -> String {
    let mut out = format!("{} rows", rows.len());
    for row in rows.iter().take(SHOWN_ROWS) {
        out.push_str("\n        ");
        out.push_str(&Value::from(row.clone()).to_string());
    }
    if rows.len() > SHOWN_ROWS {
        out.push_str("\n        ...");
    }
    out
}

/// Compares every answer; the descriptions of the mismatches (all of them are
/// counted, the first [`SHOWN`] described in full).
fn mismatches(
    stage: &str,
    queries: &[GenQuery],
    got: &[Answer],
    want: &[Vec<Row>],
) -> (usize, Vec<String>) {
    let mut count = 0;
    let mut shown = Vec::new();
    for (i, ((query, got), want)) in queries.iter().zip(got).zip(want).enumerate() {
        let outcome = match got {
            Ok(rows) => compare_answers(rows, want, query.ordered),
            Err(e) => Err(e.clone()),
        };
        let Err(why) = outcome else { continue };
        count += 1;
        if shown.len() < SHOWN {
            let server = match got {
                Ok(rows) => show_rows(rows),
                Err(e) => e.clone(),
            };
            shown.push(format!(
                "  [{stage}] query {i} ({}, {}):\n    citytsdb SQL: {}\n    duckdb SQL:   {}\n    {why}\n    \
                 citytsdb answer: {server}\n    duckdb answer:   {}",
                query.kind,
                if query.ordered { "ordered" } else { "unordered" },
                query.query.sql,
                query.query.duckdb_sql,
                show_rows(want),
            ));
        }
    }
    (count, shown)
}

/// Tallies and reports of the stages run so far.
#[derive(Default)]
struct Outcome {
    /// (stage, mismatches) per stage.
    counts: Vec<(&'static str, usize)>,
    /// The first mismatches of every stage, described in full.
    shown: Vec<String>,
}

impl Outcome {
    /// Runs every query on the server and compares with the oracle's answers.
    fn stage(
        &mut self,
        name: &'static str,
        server: &Server,
        queries: &[GenQuery],
        want: &[Vec<Row>],
        began: Instant,
    ) {
        let answered = server_answers(server, queries);
        let mut slowest: Vec<(Duration, usize)> = answered
            .iter()
            .enumerate()
            .map(|(i, (_, took))| (*took, i))
            .collect();
        slowest.sort_unstable_by(|a, b| b.cmp(a));
        let got: Vec<Answer> = answered.into_iter().map(|(a, _)| a).collect();
        let (count, shown) = mismatches(name, queries, &got, want);
        println!(
            "differential: {name}: {count} mismatches of {}; at {:.1?}; slowest {:?}",
            queries.len(),
            began.elapsed(),
            slowest
                .iter()
                .take(3)
                .map(|(took, i)| format!("query {i} ({}) {took:.1?}", queries[*i].kind))
                .collect::<Vec<_>>()
        );
        self.counts.push((name, count));
        self.shown.extend(shown);
    }
}

/// `CITYTSDB_DIFF_DUMP`: where to write a run's rows and queries, if anywhere.
fn dump_dir() -> Option<PathBuf> {
    std::env::var_os("CITYTSDB_DIFF_DUMP")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
}

/// Writes the rows and queries of a run under `dir` for reproducing by hand:
/// `manhole.csv` (the rows of stages a and b) and `duckdb.json` (the oracle's
/// input: `python3 tests/oracle/duckdb_oracle.py manhole.csv duckdb.json`) and
/// `citytsdb.json` (the server's SQL, in the same order); the rows of stages c
/// and d go to `manhole_overwritten.csv` later.
fn dump(dir: &Path, expected: &Expected, queries: &[GenQuery]) {
    std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    write_rows_csv(&dir.join("manhole.csv"), expected.values());
    let duck: Vec<&str> = queries
        .iter()
        .map(|q| q.query.duckdb_sql.as_str())
        .collect();
    let city: Vec<&str> = queries.iter().map(|q| q.query.sql.as_str()).collect();
    for (name, list) in [("duckdb.json", duck), ("citytsdb.json", city)] {
        let text = serde_json::to_string_pretty(&list).expect("queries as JSON");
        std::fs::write(dir.join(name), text).unwrap_or_else(|e| panic!("write {name}: {e}"));
    }
    println!(
        "differential: rows and queries written to {}",
        dir.display()
    );
}

/// DuckDB's answers, checked to be mostly non-empty: a generator whose filters
/// match nothing would prove little.
fn oracle_answers(expected: &Expected, queries: &[GenQuery]) -> Vec<Vec<Row>> {
    let oracle: Vec<_> = queries.iter().map(|q| q.query.clone()).collect();
    let want = duckdb_answers(expected.values(), &oracle);
    let non_empty = want.iter().filter(|a| !a.is_empty()).count();
    assert!(
        non_empty * 10 >= queries.len() * 7,
        "only {non_empty} of {} queries have a non-empty answer; adjust the generator to the data",
        queries.len()
    );
    want
}

#[test]
fn random_queries_match_duckdb_in_buffer_and_segments() {
    let began = Instant::now();
    let seed = seed();
    let count = query_count();
    println!("differential: seed {seed}, {count} queries; repeat with CITYTSDB_DIFF_SEED={seed}");

    // The rows: the regular workload as its gateways send it, then the sparse
    // covers' partial writes. The day starts at noon UTC, so the rows span two
    // UTC days and flush into two segments.
    let workload = Workload {
        devices: DEVICES,
        start: DEFAULT_START + DAY / 2,
        ..Workload::default()
    };
    let second_day = DEFAULT_START + DAY;
    let mut writes = workload.writes();
    writes.extend(sparse_writes(
        &workload,
        DEVICES + 1,
        SPARSE_DEVICES,
        2,
        workload.seed,
    ));
    writes.extend(
        sparse_writes(
            &workload,
            DEVICES + SPARSE_DEVICES + 1,
            UNTAGGED_DEVICES,
            3,
            workload.seed + 1,
        )
        .into_iter()
        .map(|w| Reading { district: "", ..w }),
    );
    let mut expected = Expected::new();
    for write in &writes {
        apply(&mut expected, write);
    }

    let universe = Universe {
        devices: DEVICES + SPARSE_DEVICES + UNTAGGED_DEVICES,
        start: workload.start,
        end: workload.end(),
    };
    let queries = generate(&universe, seed, count);
    assert!(queries.len() >= 500, "too few queries: {}", queries.len());
    let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
    for q in &queries {
        *kinds.entry(q.kind).or_default() += 1;
    }
    if let Some(dir) = dump_dir() {
        dump(&dir, &expected, &queries);
    }
    let want = oracle_answers(&expected, &queries);
    println!(
        "differential: {} writes, {} rows; queries by kind {kinds:?}; oracle answered at {:.1?}",
        writes.len(),
        expected.len(),
        began.elapsed()
    );

    let tmp = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&tmp.path().join("data"));
    for body in chunks(&writes, LINES_PER_CHUNK) {
        server.write_ok(DB, "s", body);
    }
    let mut outcome = Outcome::default();

    // (a) Every row in the write buffer.
    outcome.stage("(a) buffer", &server, &queries, &want, began);

    // (b) Every row in Parquet segments, one per UTC day.
    let segments = server.flush(DB);
    assert!(
        segments >= 2,
        "the flush wrote {segments} segments, not one per day"
    );
    outcome.stage("(b) segments", &server, &queries, &want, began);

    // (c) Partial overwrites of second-day rows (regular and sparse covers) in
    // the buffer, over the segments: the first day's segment is read alone, the
    // second's merged with the buffer, newest fields winning.
    let mut scratch = expected.clone();
    let mut late: Vec<Reading> = workload
        .overwrites(&mut scratch, 4_000, 7)
        .into_iter()
        .filter(|w| w.time >= second_day)
        .collect();
    late.extend(partial_overwrites(
        &expected,
        DEVICES + 1,
        second_day,
        workload.seed,
    ));
    for write in &late {
        apply(&mut expected, write);
    }
    if let Some(dir) = dump_dir() {
        let path = dir.join("manhole_overwritten.csv");
        write_rows_csv(&path, expected.values());
    }
    let want = oracle_answers(&expected, &queries);
    for body in chunks(&late, LINES_PER_CHUNK) {
        server.write_ok(DB, "s", body);
    }
    outcome.stage(
        "(c) overwrites in the buffer over segments",
        &server,
        &queries,
        &want,
        began,
    );

    // (d) The overwrites flushed: the second day's segment rewritten.
    server.flush(DB);
    outcome.stage("(d) overwrites flushed", &server, &queries, &want, began);
    server.stop();

    let total: usize = outcome.counts.iter().map(|(_, n)| n).sum();
    assert!(
        total == 0,
        "citytsdb and DuckDB disagree (seed {seed}, {count} queries; repeat with \
         CITYTSDB_DIFF_SEED={seed}). Mismatches per stage: {:?}. First ones:\n{}",
        outcome.counts,
        outcome.shown.join("\n")
    );
}
