//! `DELETE FROM table WHERE predicate`.
//!
//! The statement is checked here (one table, a `WHERE`, nothing else), then run in
//! a storage [`citytsdb_storage::DeleteTurn`]: the rows `SELECT <tags>, time FROM
//! table WHERE predicate` answers over the persisted rows (merged, pruned by time
//! and tags like any query) are the ones deleted, every stored copy of each.

use datafusion::sql::parser::{DFParser, Statement as DfStatement};
use datafusion::sql::sqlparser::ast::{FromTable, Statement as SqlStatement, TableFactor};
use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use citytsdb_storage::merge::align;
use citytsdb_storage::schema::TIME_COLUMN;
use citytsdb_storage::TableSchema;
use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, RecordBatch, StringArray, TimestampNanosecondArray,
};
use datafusion::arrow::compute::{cast, filter_record_batch};
use datafusion::arrow::datatypes::{DataType, Field, Schema, TimestampNanosecondType};

use crate::engine::QueryEngine;
use crate::error::QueryError;

/// A checked `DELETE` statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delete {
    /// The table's name, as stored.
    pub table: String,
    /// The table as written, with its alias (for the `SELECT` of the rows).
    pub relation: String,
    /// The `WHERE` predicate as SQL.
    pub predicate: String,
}

/// Why a delete failed: the statement or its predicate, or the storage.
#[derive(Debug, thiserror::Error)]
pub enum DeleteError {
    /// The statement or its predicate is wrong, or the query of the rows failed.
    #[error(transparent)]
    Query(#[from] QueryError),
    /// Flushing or committing failed.
    #[error(transparent)]
    Storage(#[from] citytsdb_storage::StorageError),
}

/// `Some` when `sql` is one `DELETE` statement (checked), `None` for anything else
/// (which the query path then judges).
pub fn parse_delete(sql: &str) -> Result<Option<Delete>, QueryError> {
    let starts_with_delete = sql
        .split_whitespace()
        .next()
        .is_some_and(|w| w.eq_ignore_ascii_case("delete"));
    if !starts_with_delete {
        return Ok(None);
    }
    let statements = DFParser::parse_sql_with_dialect(sql, &PostgreSqlDialect {})
        .map_err(|e| QueryError::from_datafusion(e, sql))?;
    if statements.len() != 1 {
        return Err(QueryError::invalid("send one statement per query"));
    }
    let DfStatement::Statement(s) = &statements[0] else {
        return Ok(None);
    };
    let SqlStatement::Delete(d) = s.as_ref() else {
        return Ok(None);
    };
    let unsupported = |what: &str| {
        Err(QueryError::invalid(format!(
            "DELETE supports one table and a WHERE clause; {what} is not supported"
        )))
    };
    if !d.tables.is_empty() {
        return unsupported("naming tables before FROM");
    }
    if d.using.is_some() {
        return unsupported("USING");
    }
    if d.returning.is_some() || d.output.is_some() {
        return unsupported("RETURNING");
    }
    if !d.order_by.is_empty() || d.limit.is_some() {
        return unsupported("ORDER BY or LIMIT");
    }
    let (FromTable::WithFromKeyword(from) | FromTable::WithoutKeyword(from)) = &d.from;
    let [only] = from.as_slice() else {
        return unsupported("deleting from several tables");
    };
    if !only.joins.is_empty() {
        return unsupported("a join");
    }
    let TableFactor::Table { name, .. } = &only.relation else {
        return unsupported("deleting from anything but a table");
    };
    let parts: Vec<String> = name
        .0
        .iter()
        .filter_map(|p| p.as_ident().map(|i| i.value.clone()))
        .collect();
    let table = match parts.as_slice() {
        [t] => t.clone(),
        [schema, t] if schema == "public" => t.clone(),
        _ => {
            return Err(QueryError::invalid(format!(
                "DELETE FROM {name}: name a table of the database"
            )))
        }
    };
    let Some(predicate) = &d.selection else {
        return Err(QueryError::invalid(
            "DELETE without WHERE would delete every row of the table; say WHERE true to mean it",
        ));
    };
    Ok(Some(Delete {
        table,
        relation: only.relation.to_string(),
        predicate: predicate.to_string(),
    }))
}

impl Delete {
    /// The `SELECT` of the keys (`tags` and `time`) of the rows to delete.
    pub fn select_keys<'a>(&self, tags: impl Iterator<Item = &'a str>) -> String {
        let columns: Vec<String> = tags
            .chain([citytsdb_storage::schema::TIME_COLUMN])
            .map(|c| format!("\"{}\"", c.replace('"', "\"\"")))
            .collect();
        format!(
            "SELECT {} FROM {} WHERE {}",
            columns.join(", "),
            self.relation,
            self.predicate
        )
    }
}

/// One term of an InfluxDB 2 delete predicate: `key = "value"` or `key != "value"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfluxTerm {
    /// The tag (or `_measurement`).
    pub key: String,
    /// `=` (true) or `!=` (false).
    pub equal: bool,
    /// The value.
    pub value: String,
}

/// Parses an InfluxDB 2 delete predicate: terms `key="value"` (or `!=`) joined by
/// `AND`, keys bare or double-quoted, values double-quoted with `\"` and `\\`
/// escapes. Errors say at which character (from 1) the text went wrong.
pub fn parse_influx_predicate(text: &str) -> Result<Vec<InfluxTerm>, QueryError> {
    let chars: Vec<char> = text.chars().collect();
    let mut i = 0;
    let mut terms = Vec::new();
    let fail = |at: usize, what: &str| {
        Err(QueryError::invalid(format!(
            "predicate: {what} at character {} of {text:?}",
            at + 1
        )))
    };
    let skip = |i: &mut usize| {
        while *i < chars.len() && chars[*i].is_whitespace() {
            *i += 1;
        }
    };
    let quoted = |i: &mut usize| -> Option<String> {
        let mut out = String::new();
        *i += 1;
        while *i < chars.len() {
            match chars[*i] {
                '\\' if *i + 1 < chars.len() => {
                    out.push(chars[*i + 1]);
                    *i += 2;
                }
                '"' => {
                    *i += 1;
                    return Some(out);
                }
                c => {
                    out.push(c);
                    *i += 1;
                }
            }
        }
        None
    };
    loop {
        skip(&mut i);
        if i >= chars.len() {
            if terms.is_empty() {
                return Ok(terms);
            }
            return fail(i, "expected a term after AND");
        }
        let key = if chars[i] == '"' {
            match quoted(&mut i) {
                Some(k) => k,
                None => return fail(i, "unterminated quoted key"),
            }
        } else {
            let start = i;
            while i < chars.len() && (chars[i].is_alphanumeric() || "_-.".contains(chars[i])) {
                i += 1;
            }
            if start == i {
                return fail(i, "expected a tag key");
            }
            chars[start..i].iter().collect()
        };
        skip(&mut i);
        let equal = if text_at(&chars, i, "!=") {
            i += 2;
            false
        } else if text_at(&chars, i, "=") {
            i += 1;
            true
        } else {
            return fail(
                i,
                "expected = or != (OR and regular expressions are not supported)",
            );
        };
        skip(&mut i);
        if i >= chars.len() || chars[i] != '"' {
            return fail(i, "expected a double-quoted value");
        }
        let Some(value) = quoted(&mut i) else {
            return fail(i, "unterminated quoted value");
        };
        terms.push(InfluxTerm { key, equal, value });
        skip(&mut i);
        if i >= chars.len() {
            return Ok(terms);
        }
        let word: String = chars[i..chars.len().min(i + 3)].iter().collect();
        if !word.eq_ignore_ascii_case("and") {
            return fail(i, "expected AND (OR is not supported)");
        }
        i += 3;
    }
}

fn text_at(chars: &[char], i: usize, what: &str) -> bool {
    what.chars()
        .enumerate()
        .all(|(k, c)| chars.get(i + k) == Some(&c))
}

impl Delete {
    /// The delete of an InfluxDB 2 `/api/v2/delete` request on `table`: rows with
    /// `start <= time <= stop` (nanoseconds) whose tags match `terms` (a term on
    /// `_measurement` is left to the caller).
    pub fn influx(table: &str, start: i64, stop: i64, terms: &[InfluxTerm]) -> Delete {
        let quote = |c: &str| format!("\"{}\"", c.replace('"', "\"\""));
        let mut predicate = format!(
            "{t} >= to_timestamp_nanos({start}) AND {t} <= to_timestamp_nanos({stop})",
            t = quote(TIME_COLUMN)
        );
        for term in terms.iter().filter(|t| t.key != "_measurement") {
            predicate.push_str(&format!(
                " AND {} {} '{}'",
                quote(&term.key),
                if term.equal { "=" } else { "<>" },
                term.value.replace('\'', "''")
            ));
        }
        Delete {
            table: table.to_string(),
            relation: quote(table),
            predicate,
        }
    }
}

/// A series: its tag values in the table's tag order.
type SeriesKey = Vec<Option<String>>;

/// The series and times of `batch`'s rows (columns found by name; a missing tag is
/// null).
fn keys_of(batch: &RecordBatch, tags: &[String]) -> Result<Vec<(SeriesKey, i64)>, QueryError> {
    let internal = |e: datafusion::arrow::error::ArrowError| QueryError::Internal(e.to_string());
    let columns: Vec<Option<ArrayRef>> = tags
        .iter()
        .map(|t| {
            batch
                .column_by_name(t)
                .map(|c| cast(c, &DataType::Utf8))
                .transpose()
        })
        .collect::<Result<_, _>>()
        .map_err(internal)?;
    let Some(times) = batch
        .column_by_name(TIME_COLUMN)
        .and_then(|c| c.as_primitive_opt::<TimestampNanosecondType>())
    else {
        return Err(QueryError::Internal("rows without a time column".into()));
    };
    Ok((0..batch.num_rows())
        .map(|i| {
            let key = columns
                .iter()
                .map(|c| {
                    c.as_ref()
                        .map(|c| c.as_string::<i32>())
                        .filter(|c| c.is_valid(i))
                        .map(|c| c.value(i).to_string())
                })
                .collect();
            (key, times.value(i))
        })
        .collect())
}

/// After a delete: the series whose newest row it took get their newest remaining
/// row (or leave, with none) in the series registry, which answers the
/// latest-per-device path and `system.devices`.
pub(crate) async fn correct_latest(
    engine: &QueryEngine,
    db: &str,
    table: &str,
    schema: &TableSchema,
    deleted: &[RecordBatch],
) -> Result<(), DeleteError> {
    let tags: Vec<String> = schema.tag_names().map(str::to_string).collect();
    let Some(rows) = engine.storage().series_rows(db, table) else {
        return Ok(());
    };
    let rows = rows?;
    let newest: HashMap<SeriesKey, i64> = keys_of(&rows.latest, &tags)?.into_iter().collect();
    let mut affected: BTreeSet<SeriesKey> = BTreeSet::new();
    for b in deleted {
        for (key, time) in keys_of(b, &tags)? {
            if newest.get(&key) == Some(&time) {
                affected.insert(key);
            }
        }
    }
    if affected.is_empty() {
        return Ok(());
    }
    let quote = |c: &str| format!("\"{}\"", c.replace('"', "\"\""));
    let literal = |v: &str| format!("'{}'", v.replace('\'', "''"));
    let columns: Vec<String> = schema.columns().iter().map(|c| quote(&c.name)).collect();
    // Narrow the scan to the affected series' tag values (a tag some of them lack
    // cannot narrow it: NULL is in no list).
    let mut narrow = Vec::new();
    for (i, t) in tags.iter().enumerate() {
        let values: BTreeSet<&str> = affected.iter().filter_map(|k| k[i].as_deref()).collect();
        if affected.iter().all(|k| k[i].is_some()) {
            let list: Vec<String> = values.into_iter().map(literal).collect();
            narrow.push(format!("{} IN ({})", quote(t), list.join(", ")));
        }
    }
    let partition = if tags.is_empty() {
        String::new()
    } else {
        format!(
            "PARTITION BY {}",
            tags.iter().map(|t| quote(t)).collect::<Vec<_>>().join(", ")
        )
    };
    let sql = format!(
        "SELECT {cols} FROM (SELECT {cols}, row_number() OVER ({partition} ORDER BY {time} DESC) \
         AS \"__newest\" FROM {table} {filter}) WHERE \"__newest\" = 1",
        cols = columns.join(", "),
        time = quote(TIME_COLUMN),
        table = quote(table),
        filter = if narrow.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", narrow.join(" AND "))
        },
    );
    let found = engine.query(db, &sql).await?;
    let arrow = schema.arrow_schema();
    let mut latest = Vec::new();
    let mut still: BTreeSet<SeriesKey> = BTreeSet::new();
    for b in &found.batches {
        let b = align(b, &arrow).map_err(DeleteError::Storage)?;
        let keys = keys_of(&b, &tags)?;
        let keep: BooleanArray = keys
            .iter()
            .map(|(k, _)| Some(affected.contains(k)))
            .collect();
        still.extend(
            keys.into_iter()
                .map(|(k, _)| k)
                .filter(|k| affected.contains(k)),
        );
        latest
            .push(filter_record_batch(&b, &keep).map_err(|e| QueryError::Internal(e.to_string()))?);
    }
    let gone: Vec<&SeriesKey> = affected.iter().filter(|k| !still.contains(*k)).collect();
    let mut gone_batches = Vec::new();
    if !gone.is_empty() {
        let mut fields: Vec<Field> = tags
            .iter()
            .map(|t| Field::new(t, DataType::Utf8, true))
            .collect();
        fields.push(Field::new(
            TIME_COLUMN,
            DataType::Timestamp(
                datafusion::arrow::datatypes::TimeUnit::Nanosecond,
                Some("UTC".into()),
            ),
            false,
        ));
        let mut columns: Vec<ArrayRef> = (0..tags.len())
            .map(|i| {
                Arc::new(StringArray::from_iter(gone.iter().map(|k| k[i].as_deref()))) as ArrayRef
            })
            .collect();
        columns.push(Arc::new(
            TimestampNanosecondArray::from_iter_values(gone.iter().map(|_| 0)).with_timezone("UTC"),
        ));
        let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)
            .map_err(|e| QueryError::Internal(e.to_string()))?;
        gone_batches.push(align(&batch, &arrow).map_err(DeleteError::Storage)?);
    }
    engine
        .storage()
        .correct_series(db, table, &latest, &gone_batches)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(sql: &str) -> String {
        parse_delete(sql).unwrap_err().to_string()
    }

    #[test]
    fn influx_predicates_parse() {
        let terms = parse_influx_predicate(
            r#"_measurement="manhole" AND device = "mh-\"1" and "odd key"!="x""#,
        )
        .unwrap();
        assert_eq!(
            terms,
            vec![
                InfluxTerm {
                    key: "_measurement".into(),
                    equal: true,
                    value: "manhole".into()
                },
                InfluxTerm {
                    key: "device".into(),
                    equal: true,
                    value: "mh-\"1".into()
                },
                InfluxTerm {
                    key: "odd key".into(),
                    equal: false,
                    value: "x".into()
                },
            ]
        );
        assert!(parse_influx_predicate("").unwrap().is_empty());
        for (bad, needle) in [
            (r#"a="1" OR b="2""#, "character 7"),
            (r#"a=~/x/"#, "character 3"),
            (r#"a="1"#, "unterminated"),
            (r#"a=1"#, "double-quoted"),
            (r#"a="1" AND"#, "after AND"),
        ] {
            let e = parse_influx_predicate(bad).unwrap_err().to_string();
            assert!(e.contains(needle), "{bad}: {e}");
        }
        let d = Delete::influx("manhole", 5, 9, &terms);
        assert_eq!(d.relation, "\"manhole\"");
        assert!(
            d.predicate.contains("\"device\" = 'mh-\"1'"),
            "{}",
            d.predicate
        );
        assert!(
            d.predicate.contains("\"odd key\" <> 'x'"),
            "{}",
            d.predicate
        );
        assert!(!d.predicate.contains("_measurement"));
    }

    #[test]
    fn deletes_are_checked() {
        let d = parse_delete("DELETE FROM manhole WHERE device = 'mh-1' AND time < '2025-01-01'")
            .unwrap()
            .unwrap();
        assert_eq!(d.table, "manhole");
        assert_eq!(d.predicate, "device = 'mh-1' AND time < '2025-01-01'");
        assert_eq!(
            d.select_keys(["device", "dis\"trict"].into_iter()),
            "SELECT \"device\", \"dis\"\"trict\", \"time\" FROM manhole WHERE device = 'mh-1' AND time < '2025-01-01'"
        );
        let d = parse_delete("delete from \"Odd Table\" AS o where o.x > 1")
            .unwrap()
            .unwrap();
        assert_eq!(d.table, "Odd Table");
        assert_eq!(d.relation, "\"Odd Table\" AS o");
        assert!(parse_delete("SELECT 1").unwrap().is_none());
        assert!(error("DELETE FROM manhole").contains("WHERE true"));
        assert!(error("DELETE FROM a USING b WHERE a.x = b.x").contains("USING"));
        assert!(error("DELETE FROM a WHERE x = 1 RETURNING *").contains("RETURNING"));
        assert!(error("DELETE FROM other.a WHERE true").contains("name a table"));
        assert!(error("DELETE FROM a WHERE x = 1; SELECT 1").contains("one statement"));
        let broken = parse_delete("DELETE FROM manhole WHERE (");
        assert!(
            matches!(broken, Err(QueryError::Invalid { .. })),
            "{broken:?}"
        );
    }
}
