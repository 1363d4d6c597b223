//! DuckDB as the oracle: the same rows and the same questions, answered by an
//! engine we did not write, and compared with the server's answers.
//!
//! The expected rows go to a CSV file, the queries (in DuckDB's dialect) to a JSON
//! file, and `oracle/duckdb_oracle.py` prints DuckDB's answers as JSON. If the
//! Python package `duckdb` is missing the script exits non-zero and the test
//! fails: an oracle that silently skips would prove nothing.

use std::fmt::Write as _;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::server::Server;
use crate::workload::{sql_timestamp, Reading};
use crate::Row;

/// Relative tolerance for floating-point answers (sums and averages may be
/// added up in a different order).
pub const FLOAT_TOLERANCE: f64 = 1e-9;

/// One analyst question, in the server's SQL and in DuckDB's where they differ.
#[derive(Debug, Clone)]
pub struct Query {
    /// The SQL sent to citytsdb.
    pub sql: String,
    /// The same question for DuckDB (`time_bucket` for `date_bin`, say).
    pub duckdb_sql: String,
}

impl Query {
    /// A question both engines read the same way.
    pub fn same(sql: &str) -> Query {
        Query {
            sql: sql.to_string(),
            duckdb_sql: sql.to_string(),
        }
    }

    /// A question whose DuckDB spelling differs.
    pub fn pair(sql: &str, duckdb_sql: &str) -> Query {
        Query {
            sql: sql.to_string(),
            duckdb_sql: duckdb_sql.to_string(),
        }
    }

    /// Whether the answer's row order is part of the answer (the query sorts).
    pub fn ordered(&self) -> bool {
        self.sql.to_ascii_uppercase().contains("ORDER BY")
    }
}

/// `tests/oracle/duckdb_oracle.py`.
pub fn script_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("oracle")
        .join("duckdb_oracle.py")
}

/// Writes the rows as the oracle's CSV: a header, then one row a line, time as
/// `YYYY-MM-DD HH:MM:SS` (UTC), a missing field as an empty cell.
pub fn write_rows_csv<'a>(path: &Path, rows: impl IntoIterator<Item = &'a Reading>) {
    let file =
        std::fs::File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    let mut out = BufWriter::new(file);
    let mut line = String::new();
    writeln!(
        out,
        "time,device,district,tilt_deg,water_level_cm,battery_pct,cover_open"
    )
    .expect("write CSV");
    for row in rows {
        line.clear();
        let cell = |v: Option<String>| v.unwrap_or_default();
        let _ = writeln!(
            line,
            "{},{},{},{},{},{},{}",
            sql_timestamp(row.time),
            row.device_name(),
            row.district,
            cell(row.tilt_deg.map(|v| v.to_string())),
            cell(row.water_level_cm.map(|v| v.to_string())),
            cell(row.battery_pct.map(|v| v.to_string())),
            cell(row.cover_open.map(|v| v.to_string())),
        );
        out.write_all(line.as_bytes()).expect("write CSV");
    }
    out.flush().expect("flush CSV");
}

/// DuckDB's answers to `queries` over `rows` (loaded as table `manhole`), one
/// list of row objects per query. Fails the test if the oracle cannot run.
pub fn duckdb_answers<'a>(
    rows: impl IntoIterator<Item = &'a Reading>,
    queries: &[Query],
) -> Vec<Vec<Row>> {
    let dir = tempfile::tempdir().expect("tempdir for the oracle");
    let csv = dir.path().join("manhole.csv");
    let sql = dir.path().join("queries.json");
    write_rows_csv(&csv, rows);
    let list: Vec<&str> = queries.iter().map(|q| q.duckdb_sql.as_str()).collect();
    std::fs::write(&sql, serde_json::to_vec(&list).expect("queries as JSON"))
        .expect("write queries");

    let python = std::env::var_os("PYTHON").unwrap_or_else(|| "python3".into());
    let output = Command::new(&python)
        .arg(script_path())
        .arg(&csv)
        .arg(&sql)
        .output()
        .unwrap_or_else(|e| panic!("could not run the DuckDB oracle with {python:?}: {e}; run the test command in README.md"));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the DuckDB oracle failed ({}):\n{stderr}",
        output.status
    );
    let answers: Vec<Vec<Row>> = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("the DuckDB oracle printed no answer list ({e}):\n{stderr}"));
    assert_eq!(
        answers.len(),
        queries.len(),
        "the oracle answered a different number of queries"
    );
    answers
}

/// Two JSON values are the same answer: equal, or numbers within
/// [`FLOAT_TOLERANCE`] (integers on both sides must be equal exactly).
pub fn same_value(got: &Value, want: &Value) -> bool {
    match (got, want) {
        (Value::Number(g), Value::Number(w)) => {
            if let (Some(g), Some(w)) = (g.as_i64(), w.as_i64()) {
                return g == w;
            }
            if let (Some(g), Some(w)) = (g.as_u64(), w.as_u64()) {
                return g == w;
            }
            match (g.as_f64(), w.as_f64()) {
                (Some(g), Some(w)) => {
                    let diff = (g - w).abs();
                    diff <= FLOAT_TOLERANCE * g.abs().max(w.abs()) || diff <= f64::MIN_POSITIVE
                }
                _ => false,
            }
        }
        _ => got == want,
    }
}

/// A sort key for comparing unordered answers: the row's values in column order,
/// floats at 6 significant digits (only a tie-breaker: group keys are strings,
/// integers or times).
fn row_key(row: &Row) -> String {
    let mut key = String::new();
    for (column, value) in row {
        let _ = match value {
            Value::Number(n) if n.is_f64() => {
                write!(key, "{column}={:.6e}\u{1}", n.as_f64().unwrap_or_default())
            }
            other => write!(key, "{column}={other}\u{1}"),
        };
    }
    key
}

/// Compares the server's rows with the oracle's; `Err` says where they differ.
/// Row order counts only when `ordered`.
pub fn compare_rows(got: &[Row], want: &[Row], ordered: bool) -> Result<(), String> {
    let (mut got, mut want) = (got.to_vec(), want.to_vec());
    if !ordered {
        got.sort_by_cached_key(row_key);
        want.sort_by_cached_key(row_key);
    }
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        let same_columns = g.len() == w.len() && g.keys().all(|k| w.contains_key(k));
        let same = same_columns && g.iter().all(|(k, v)| same_value(v, &w[k]));
        if !same {
            return Err(format!(
                "row {i} differs:\n      server: {}\n      duckdb: {}",
                Value::from(g.clone()),
                Value::from(w.clone())
            ));
        }
    }
    if got.len() != want.len() {
        let extra = if got.len() > want.len() {
            format!(
                "first extra server row: {}",
                Value::from(got[want.len()].clone())
            )
        } else {
            format!(
                "first missing row: {}",
                Value::from(want[got.len()].clone())
            )
        };
        return Err(format!(
            "server returned {} rows, duckdb {}; {extra}",
            got.len(),
            want.len()
        ));
    }
    Ok(())
}

/// Runs every query on the server and compares with the oracle's answers;
/// fails the test listing every query that differs, labelled with `stage`.
pub fn assert_answers(
    server: &Server,
    db: &str,
    stage: &str,
    queries: &[Query],
    answers: &[Vec<Row>],
) {
    let mut failures = Vec::new();
    for (i, (query, want)) in queries.iter().zip(answers).enumerate() {
        let (status, body) = server.query_raw(db, &query.sql, "json");
        let outcome = if status != 200 {
            Err(format!("server answered {status}: {body}"))
        } else {
            crate::server::parse_json_rows(&body)
                .and_then(|got| compare_rows(&got, want, query.ordered()))
        };
        if let Err(why) = outcome {
            failures.push(format!("  query {i}: {}\n    {why}", query.sql));
        }
    }
    assert!(
        failures.is_empty(),
        "{stage}: {} of {} queries differ from DuckDB:\n{}",
        failures.len(),
        queries.len(),
        failures.join("\n")
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rows(v: Value) -> Vec<Row> {
        serde_json::from_value(v).expect("rows")
    }

    #[test]
    fn floats_within_tolerance_ints_exact() {
        assert!(same_value(&json!(1.0), &json!(1.0000000000001)));
        assert!(!same_value(&json!(1.0), &json!(1.001)));
        assert!(same_value(&json!(3), &json!(3.0)));
        assert!(!same_value(&json!(3), &json!(4)));
        assert!(same_value(&json!(null), &json!(null)));
        assert!(!same_value(&json!("a"), &json!("b")));
    }

    #[test]
    fn order_matters_only_when_asked() {
        let a = rows(json!([{"d": "x", "n": 1}, {"d": "y", "n": 2}]));
        let b = rows(json!([{"d": "y", "n": 2}, {"d": "x", "n": 1}]));
        assert!(compare_rows(&a, &b, false).is_ok());
        assert!(compare_rows(&a, &b, true).is_err());
        assert!(compare_rows(&a, &b[..1], false).is_err());
        let c = rows(json!([{"d": "x", "m": 1}, {"d": "y", "n": 2}]));
        assert!(compare_rows(&a, &c, true).is_err());
    }
}
