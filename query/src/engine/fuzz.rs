//! Property-based fuzzing of the SQL front end: arbitrary text and mutated
//! SELECTs over a small table are planned (as a rule's SQL is) and run (as a
//! query is), and every failure is a clean error: the user's fault with a
//! position inside the text, or a limit; never a panic or an internal error.
//!
//! `CITYTSDB_FUZZ_CASES` sets the cases per property (the long mode:
//! `CITYTSDB_FUZZ_CASES=20000 cargo test -p citytsdb-query --lib fuzz`).

use std::sync::{Arc, OnceLock};

use citytsdb_ingest::{Ingestor, WriteOptions};
use proptest::prelude::*;
use proptest::test_runner::Config;

use super::*;

/// Cases per property: `CITYTSDB_FUZZ_CASES`, else `quick`.
fn config(quick: u32) -> Config {
    let cases = std::env::var("CITYTSDB_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(quick);
    Config {
        cases,
        ..Config::default()
    }
}

/// A database `city` with one small table, `manhole`, shared by every case.
struct Fixture {
    runtime: tokio::runtime::Runtime,
    engine: QueryEngine,
    _dir: tempfile::TempDir,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a runtime");
        let dir = tempfile::tempdir().expect("a temporary directory");
        let engine = runtime.block_on(async {
            let store: Arc<dyn object_store::ObjectStore> =
                Arc::new(object_store::memory::InMemory::new());
            let storage = citytsdb_storage::Engine::open(citytsdb_storage::EngineConfig::new(
                dir.path().to_path_buf(),
                store,
            ))
            .await
            .expect("the store opens");
            let body = "manhole,device=mh-1,district=金水区 tilt_deg=0.4,water_level_cm=-182.5,battery_pct=97i,cover_open=false,note=\"ok\" 1764547200000000000\n\
                        manhole,device=mh-2,district=二七区 tilt_deg=17.2,water_level_cm=-40,battery_pct=88i,cover_open=true 1764547260000000000\n\
                        manhole,device=mh-1,district=金水区 tilt_deg=0.5,battery_pct=96i 1764550800000000000";
            let out = Ingestor::new(storage.clone())
                .write("city", bytes::Bytes::from(body), WriteOptions::default())
                .await
                .expect("the rows are written");
            assert!(out.rejected.is_empty(), "{:?}", out.rejected);
            QueryEngine::new(
                storage,
                QueryLimits {
                    timeout: Duration::from_secs(20),
                    ..QueryLimits::default()
                },
            )
            .expect("a query engine")
        });
        Fixture {
            runtime,
            engine,
            _dir: dir,
        }
    })
}

/// Whether `e` is a clean answer to `sql`: the user's fault with its position
/// inside the text, a missing database, or a limit; not ours.
fn clean(e: &QueryError, sql: &str) -> Result<(), TestCaseError> {
    let message = e.to_string();
    for sign in [
        "panicked",
        "Internal error",
        "This issue was likely caused by a bug",
    ] {
        prop_assert!(!message.contains(sign), "{:?} answered {:?}", sql, message);
    }
    match e {
        QueryError::Invalid {
            position: Some(p), ..
        } => {
            let lines: Vec<&str> = sql.split('\n').collect();
            prop_assert!(
                p.line >= 1 && p.line as usize <= lines.len(),
                "{:?}: {:?} at {:?}",
                sql,
                message,
                p
            );
            let chars = lines[p.line as usize - 1].chars().count();
            prop_assert!(
                p.column >= 1 && p.column as usize <= chars + 1,
                "{:?}: {:?} at {:?}",
                sql,
                message,
                p
            );
        }
        QueryError::Internal(_) => {
            return Err(TestCaseError::fail(format!(
                "{sql:?} answered internal: {message}"
            )))
        }
        // A missing database, a limit: not the text's fault, and not a bug either.
        _ => {}
    }
    Ok(())
}

/// Plans `sql` as a rule's SQL is planned, then runs it as a query is.
fn plan_and_run(sql: &str) -> Result<(), TestCaseError> {
    let f = fixture();
    if let Err(e) = f.runtime.block_on(f.engine.describe("city", sql)) {
        clean(&e, sql)?;
    }
    if let Err(e) = f.runtime.block_on(f.engine.query("city", sql)) {
        clean(&e, sql)?;
    }
    Ok(())
}

const COLUMNS: &[&str] = &[
    "time",
    "device",
    "district",
    "tilt_deg",
    "water_level_cm",
    "battery_pct",
    "cover_open",
    "note",
    "nope",
    "\"tilt_deg\"",
    "manhole.device",
];

const LITERALS: &[&str] = &[
    "0",
    "1",
    "-1",
    "15",
    "1.5",
    "1e308",
    "1e309",
    "9223372036854775807",
    "9223372036854775808",
    "-9223372036854775809",
    "18446744073709551616",
    "NULL",
    "TRUE",
    "'mh-1'",
    "'金水区'",
    "''",
    "'it''s'",
    "'2025-12-01T00:00:00Z'",
    "TIMESTAMP '2025-12-01 00:00:00'",
    "INTERVAL '1 hour'",
    "INTERVAL '0 seconds'",
    "INTERVAL '-5 minutes'",
    "now()",
];

const FUNCTIONS: &[&str] = &[
    "avg",
    "min",
    "max",
    "sum",
    "count",
    "first",
    "last",
    "abs",
    "round",
    "upper",
    "length",
    "coalesce",
    "sqrt",
    "ln",
    "locf",
    "interpolate",
];

const BINARY: &[&str] = &[
    "+",
    "-",
    "*",
    "/",
    "%",
    "=",
    "<>",
    "<",
    ">=",
    "AND",
    "OR",
    "||",
    "LIKE",
    "IS DISTINCT FROM",
];

fn expr() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        3 => prop::sample::select(COLUMNS).prop_map(str::to_string),
        2 => prop::sample::select(LITERALS).prop_map(str::to_string),
    ];
    leaf.prop_recursive(3, 12, 3, |inner| {
        prop_oneof![
            (inner.clone(), prop::sample::select(BINARY), inner.clone())
                .prop_map(|(a, op, b)| format!("{a} {op} {b}")),
            (prop::sample::select(FUNCTIONS), inner.clone()).prop_map(|(f, a)| format!("{f}({a})")),
            inner.clone().prop_map(|a| format!("({a})")),
            inner.clone().prop_map(|a| format!("NOT {a}")),
            (
                inner.clone(),
                prop::sample::select(
                    &["DOUBLE", "BIGINT", "VARCHAR", "TIMESTAMP", "INT", "BOOLEAN"][..]
                )
            )
                .prop_map(|(a, t)| format!("CAST({a} AS {t})")),
            (inner.clone(), inner.clone(), inner.clone())
                .prop_map(|(c, a, b)| format!("CASE WHEN {c} THEN {a} ELSE {b} END")),
            (
                prop::sample::select(&["date_bin", "time_bucket", "date_bin_gapfill"][..]),
                prop::sample::select(
                    &[
                        "INTERVAL '1 hour'",
                        "INTERVAL '0 seconds'",
                        "INTERVAL '1 ms'",
                        "'x'"
                    ][..]
                ),
                inner.clone()
            )
                .prop_map(|(f, i, t)| format!("{f}({i}, {t})")),
            inner
                .clone()
                .prop_map(|a| format!("date_trunc('hour', {a})")),
            (inner.clone(), inner).prop_map(|(a, b)| format!("{a} IN ({b}, 1)")),
        ]
    })
}

/// A SELECT from a loose grammar over `manhole` and the system tables: most of
/// them do not plan, which exercises every way of refusing one.
fn loose_select() -> impl Strategy<Value = String> {
    (
        any::<bool>(),
        prop::collection::vec((expr(), prop::option::of("[a-z]{1,3}")), 1..4),
        prop::sample::select(
            &[
                "manhole",
                "manhole m",
                "system.devices",
                "system.tables",
                "nope",
                "information_schema.columns",
            ][..],
        ),
        prop::option::of(expr()),
        prop::option::of(expr()),
        prop::option::of(expr()),
        prop::option::of((expr(), any::<bool>())),
        prop::option::of(prop::sample::select(
            &["0", "1", "100", "18446744073709551615", "-1"][..],
        )),
        prop::sample::select(&["", "EXPLAIN ", "EXPLAIN ANALYZE "][..]),
    )
        .prop_map(
            |(distinct, items, from, filter, group, having, order, limit, explain)| {
                let items: Vec<String> = items
                    .into_iter()
                    .map(|(e, alias)| match alias {
                        Some(a) => format!("{e} AS {a}"),
                        None => e,
                    })
                    .collect();
                let mut sql = format!(
                    "{explain}SELECT {}{} FROM {from}",
                    if distinct { "DISTINCT " } else { "" },
                    items.join(", ")
                );
                if let Some(f) = filter {
                    sql.push_str(&format!(" WHERE {f}"));
                }
                if let Some(g) = group {
                    sql.push_str(&format!(" GROUP BY {g}"));
                }
                if let Some(h) = having {
                    sql.push_str(&format!(" HAVING {h}"));
                }
                if let Some((o, desc)) = order {
                    sql.push_str(&format!(" ORDER BY {o}{}", if desc { " DESC" } else { "" }));
                }
                if let Some(l) = limit {
                    sql.push_str(&format!(" LIMIT {l}"));
                }
                sql
            },
        )
}

fn pick(items: &'static [&'static str]) -> impl Strategy<Value = String> + Clone {
    prop::sample::select(items).prop_map(str::to_string)
}

/// A number: a numeric column, a literal (some past every range), arithmetic.
fn number() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        3 => pick(&["tilt_deg", "water_level_cm", "battery_pct"]),
        2 => pick(&["0", "1", "-1", "15", "2.5", "1e308", "9223372036854775807", "-9223372036854775808"]),
    ];
    leaf.prop_recursive(2, 8, 2, |inner| {
        prop_oneof![
            (
                inner.clone(),
                pick(&["+", "-", "*", "/", "%"]),
                inner.clone()
            )
                .prop_map(|(a, op, b)| format!("({a} {op} {b})")),
            (pick(&["abs", "round", "sqrt", "ln", "ceil"]), inner.clone())
                .prop_map(|(f, a)| format!("{f}({a})")),
            (
                inner.clone(),
                pick(&["DOUBLE", "BIGINT", "INT", "DECIMAL(9, 2)"])
            )
                .prop_map(|(a, t)| format!("CAST({a} AS {t})")),
            (inner.clone(), inner).prop_map(|(a, b)| format!("coalesce({a}, {b})")),
        ]
    })
}

/// A string: a tag or string field, a literal, a function of one.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        pick(&[
            "device",
            "district",
            "note",
            "'mh-1'",
            "'金水区'",
            "''",
            "'it''s'"
        ]),
        pick(&[
            "upper(device)",
            "device || district",
            "substr(device, 2, 3)",
            "CAST(battery_pct AS VARCHAR)",
            "lower(note)"
        ]),
    ]
}

/// A time: the column, bucketed or shifted, or a literal.
fn time() -> impl Strategy<Value = String> {
    pick(&[
        "time",
        "date_bin(INTERVAL '1 hour', time)",
        "time_bucket(INTERVAL '15 minutes', time)",
        "date_trunc('day', time)",
        "time - INTERVAL '1 day'",
        "TIMESTAMP '2025-12-01 00:00:00'",
        "now()",
    ])
}

/// A condition over the row.
fn predicate() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        (number(), pick(&["=", "<>", "<", ">=", ">"]), number())
            .prop_map(|(a, op, b)| format!("{a} {op} {b}")),
        (text(), pick(&["=", "<>", "LIKE", ">"]), text())
            .prop_map(|(a, op, b)| format!("{a} {op} {b}")),
        (
            time(),
            pick(&[">=", "<"]),
            pick(&[
                "'2025-12-01T00:00:00Z'",
                "now() - INTERVAL '10 minutes'",
                "TIMESTAMP '2025-12-01 01:00:00'"
            ])
        )
            .prop_map(|(a, op, b)| format!("{a} {op} {b}")),
        pick(&[
            "cover_open",
            "NOT cover_open",
            "note IS NULL",
            "battery_pct IN (96, 97)",
            "device IN ('mh-1', 'x')",
            "TRUE"
        ]),
    ];
    leaf.prop_recursive(2, 6, 2, |inner| {
        prop_oneof![
            (inner.clone(), pick(&["AND", "OR"]), inner.clone())
                .prop_map(|(a, op, b)| format!("({a} {op} {b})")),
            inner.prop_map(|a| format!("NOT ({a})")),
        ]
    })
}

fn aggregate() -> impl Strategy<Value = String> {
    (
        pick(&[
            "avg", "min", "max", "sum", "count", "first", "last", "stddev",
        ]),
        number(),
    )
        .prop_map(|(f, a)| format!("{f}({a})"))
}

/// A SELECT that is meant to plan: typed expressions in the shapes the city asks
/// (rows, aggregates per device, buckets, gap filling, latest per device).
fn select() -> impl Strategy<Value = String> {
    let item = prop_oneof![number(), text(), time()];
    let rows = (
        prop::collection::vec(item, 1..4),
        prop::option::of(predicate()),
        prop::option::of(pick(&["time", "device", "tilt_deg DESC", "1"])),
        prop::option::of(pick(&["0", "1", "100"])),
    )
        .prop_map(|(items, filter, order, limit)| {
            let mut sql = format!("SELECT {} FROM manhole", items.join(", "));
            if let Some(f) = filter {
                sql.push_str(&format!(" WHERE {f}"));
            }
            if let Some(o) = order {
                sql.push_str(&format!(" ORDER BY {o}"));
            }
            if let Some(l) = limit {
                sql.push_str(&format!(" LIMIT {l}"));
            }
            sql
        });
    let grouped = (
        pick(&[
            "device",
            "district",
            "date_bin(INTERVAL '1 hour', time)",
            "time_bucket(INTERVAL '1 day', time)",
        ]),
        prop::collection::vec(aggregate(), 1..3),
        prop::option::of(predicate()),
        prop::option::of((aggregate(), pick(&[">", "<="]), number())),
    )
        .prop_map(|(key, aggs, filter, having)| {
            let mut sql = format!("SELECT {key} AS k, {} FROM manhole", aggs.join(", "));
            if let Some(f) = filter {
                sql.push_str(&format!(" WHERE {f}"));
            }
            sql.push_str(" GROUP BY k");
            if let Some((a, op, n)) = having {
                sql.push_str(&format!(" HAVING {a} {op} {n}"));
            }
            sql.push_str(" ORDER BY k");
            sql
        });
    let gapfill = (
        pick(&["INTERVAL '30 minutes'", "INTERVAL '1 hour'", "INTERVAL '1 second'", "INTERVAL '0 seconds'"]),
        pick(&["avg(tilt_deg)", "locf(avg(tilt_deg))", "interpolate(max(water_level_cm))", "locf(last(battery_pct))"]),
        pick(&[
            "time >= '2025-12-01T00:00:00Z' AND time < '2025-12-01T03:00:00Z'",
            "time >= '2025-12-01T00:00:00Z' AND time < '2025-12-01T00:00:00Z'",
            "time >= '2025-12-01T03:00:00Z' AND time < '2025-12-01T00:00:00Z'",
            "time >= '1970-01-01T00:00:00Z' AND time < '2262-01-01T00:00:00Z'",
            "time >= '2025-12-01T00:00:00Z'",
        ]),
    )
        .prop_map(|(every, agg, range)| {
            format!("SELECT date_bin_gapfill({every}, time) AS b, device, {agg} AS v FROM manhole WHERE {range} GROUP BY b, device ORDER BY device, b")
        });
    let latest = (
        prop::option::of(predicate()),
        pick(&["device, time DESC", "device, time", "device"]),
    )
        .prop_map(|(filter, order)| {
            let filter = filter.map(|f| format!(" WHERE {f}")).unwrap_or_default();
            format!("SELECT DISTINCT ON (device) device, time, tilt_deg FROM manhole{filter} ORDER BY {order}")
        });
    let system = pick(&[
        "SELECT device, district FROM system.devices WHERE table_name = 'manhole' AND last_time < now() - INTERVAL '10 minutes'",
        "SELECT * FROM system.tables",
        "SELECT count(*) FROM system.segments",
        "SHOW TABLES",
        "SHOW COLUMNS FROM manhole",
    ]);
    (
        prop_oneof![3 => rows, 3 => grouped, 1 => gapfill, 1 => latest, 1 => system],
        pick(&["", "", "", "EXPLAIN ", "EXPLAIN ANALYZE "]),
    )
        .prop_map(|(sql, explain)| format!("{explain}{sql}"))
}

/// Pieces a mutation inserts: keywords, punctuation, quotes, comments, other
/// statements.
const PIECES: &[&str] = &[
    "SELECT",
    "FROM",
    "WHERE",
    "GROUP BY",
    "ORDER BY",
    "LIMIT",
    "(",
    ")",
    ",",
    "'",
    "\"",
    ";",
    "--",
    "/*",
    "*/",
    "*",
    "DROP TABLE manhole",
    "INSERT INTO manhole VALUES (1)",
    "DELETE FROM manhole",
    "UNION SELECT 1",
    "JOIN manhole USING (device)",
    "OVER ()",
    "WITH x AS (SELECT 1)",
    "\n",
    "金",
    "\u{0}",
    "$1",
    "?",
    "::",
    "[1]",
    "E'\\x'",
];

#[derive(Debug, Clone)]
enum Mutation {
    Delete(usize, usize),
    Insert(usize, &'static str),
    Truncate(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1usize..8).prop_map(|(i, n)| Mutation::Delete(i, n)),
        (any::<usize>(), prop::sample::select(PIECES)).prop_map(|(i, p)| Mutation::Insert(i, p)),
        any::<usize>().prop_map(Mutation::Truncate),
    ]
}

/// `sql` changed at character positions (never inside a character).
fn mutate(sql: &str, mutations: &[Mutation]) -> String {
    let mut chars: Vec<char> = sql.chars().collect();
    for m in mutations {
        let len = chars.len();
        match *m {
            Mutation::Delete(i, n) if len > 0 => {
                let at = i % len;
                chars.drain(at..(at + n).min(len));
            }
            Mutation::Insert(i, p) => {
                let at = i % (len + 1);
                let piece = format!(" {p} ");
                chars.splice(at..at, piece.chars());
            }
            Mutation::Truncate(i) => chars.truncate(i % (len + 1)),
            Mutation::Delete(..) => {}
        }
    }
    chars.into_iter().collect()
}

proptest! {
    // Planning and running a statement takes milliseconds in the dev profile.
    #![proptest_config(config(64))]

    #[test]
    fn arbitrary_text_is_refused_cleanly(
        sql in prop_oneof![
            any::<String>(),
            prop::collection::vec(prop::sample::select(PIECES), 0..8).prop_map(|p| p.join(" ")),
        ],
    ) {
        plan_and_run(&sql)?;
    }

    #[test]
    fn grammar_selects_plan_and_run_or_are_refused_cleanly(
        sql in prop_oneof![select(), loose_select()],
    ) {
        plan_and_run(&sql)?;
    }

    #[test]
    fn mutated_selects_plan_and_run_or_are_refused_cleanly(
        sql in select(),
        mutations in prop::collection::vec(mutation(), 1..4),
    ) {
        plan_and_run(&mutate(&sql, &mutations))?;
    }
}
