//! The query crate's errors, classified by whose fault they are.

use citytsdb_storage::StorageError;
use datafusion::arrow::error::ArrowError;
use datafusion::common::DataFusionError;
use datafusion::sql::sqlparser::parser::ParserError;

/// Where in the SQL text a problem is (1-based).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Position {
    /// Line, from 1.
    pub line: u64,
    /// Column, from 1.
    pub column: u64,
}

/// Why a query failed.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// The SQL is wrong: does not parse, is not read-only, names unknown tables or
    /// columns, or fails on the data (a bad cast, a division by zero).
    #[error("{message}")]
    Invalid {
        /// What is wrong.
        message: String,
        /// Where, when known.
        position: Option<Position>,
    },
    /// The database does not exist.
    #[error("database not found: {0}")]
    DatabaseNotFound(String),
    /// The query needed more memory than it may use.
    #[error("{0}")]
    ResourcesExhausted(String),
    /// The query ran past its time limit.
    #[error("{0}")]
    Timeout(String),
    /// The storage could not be read now (the object store or the local disk
    /// failed); the same query may succeed later.
    #[error("{0}")]
    Unavailable(String),
    /// The server failed: a bug.
    #[error("{0}")]
    Internal(String),
}

impl QueryError {
    /// A user error without a known position.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::Invalid {
            message: message.into(),
            position: None,
        }
    }

    /// Classifies a DataFusion error, finding the position of the problem in `sql`.
    pub fn from_datafusion(e: DataFusionError, sql: &str) -> Self {
        let position = e.diagnostic().and_then(|d| d.span).map(|s| Position {
            line: s.start.line,
            column: s.start.column,
        });
        let root = e.find_root();
        let message = strip_prefixes(&root.to_string());
        match root {
            DataFusionError::SQL(p, _) => Self::Invalid {
                position: position
                    .or_else(|| parser_position(p))
                    .or_else(|| p.to_string().contains("found: EOF").then(|| end_of(sql))),
                message: parser_message(p),
            },
            DataFusionError::Plan(_)
            | DataFusionError::SchemaError(..)
            | DataFusionError::NotImplemented(_) => {
                let position = position.or_else(|| quoted_position(&message, sql));
                Self::Invalid {
                    position,
                    message: user_message(&message),
                }
            }
            // A function given arguments it takes no signature for is the SQL's
            // fault, though some planning paths report it as DataFusion's own bug.
            DataFusionError::Internal(m) if m.contains("failed to match any signature") => {
                Self::Invalid {
                    position: position.or_else(|| quoted_position(&message, sql)),
                    message: user_message(&message),
                }
            }
            DataFusionError::ResourcesExhausted(m)
                if m.contains(crate::memory::SHARED_POOL_FULL) =>
            {
                Self::Unavailable(message)
            }
            DataFusionError::ResourcesExhausted(_) => Self::ResourcesExhausted(message),
            DataFusionError::ArrowError(a, _) if user_arrow_error(a) => Self::invalid(message),
            DataFusionError::Execution(_) => Self::invalid(message),
            DataFusionError::ObjectStore(_) | DataFusionError::IoError(_) => {
                Self::Unavailable(message)
            }
            DataFusionError::ParquetError(p) if parquet_io_error(p) => Self::Unavailable(message),
            DataFusionError::External(x)
                if x.downcast_ref::<StorageError>()
                    .is_some_and(StorageError::is_transient) =>
            {
                Self::Unavailable(message)
            }
            _ => Self::Internal(message),
        }
    }
}

/// A Parquet reader's error that is the store's failing, not the file's: an
/// object store or I/O error in its chain of sources, or (where the reader kept
/// only the text of one) in its message.
fn parquet_io_error(e: &datafusion::parquet::errors::ParquetError) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if c.is::<object_store::Error>() || c.is::<std::io::Error>() {
            return true;
        }
        cause = c.source();
    }
    e.to_string().contains("Object Store error")
}

fn user_arrow_error(e: &ArrowError) -> bool {
    matches!(
        e,
        ArrowError::DivideByZero
            | ArrowError::CastError(_)
            | ArrowError::ParseError(_)
            | ArrowError::InvalidArgumentError(_)
            | ArrowError::ComputeError(_)
            | ArrowError::ArithmeticOverflow(_)
    )
}

/// DataFusion's messages start with the error kind ("Error during planning: ");
/// users want the sentence after it.
fn strip_prefixes(s: &str) -> String {
    let mut s = s.trim();
    for p in [
        "Error during planning: ",
        "Schema error: ",
        "Execution error: ",
        "This feature is not implemented: ",
        "SQL error: ",
        "Arrow error: ",
    ] {
        s = s.strip_prefix(p).unwrap_or(s);
    }
    s.to_string()
}

/// A planning error DataFusion words as its own bug ("Internal error: ... filing a
/// bug report ...") when the user's SQL is at fault, as with a function called
/// with arguments it does not take: keep the part that speaks to the user.
fn user_message(message: &str) -> String {
    const REPORT: &str = "https://github.com/apache/datafusion/issues.";
    if let Some(at) = message.find(REPORT) {
        let rest = message[at + REPORT.len()..].trim();
        if !rest.is_empty() {
            return rest.to_string();
        }
    }
    // Nothing after the request to file a bug: the message is the part before it.
    let message = message
        .find("This issue was likely caused by a bug")
        .map_or(message, |at| message[..at].trim_end());
    message
        .strip_prefix("Internal error: ")
        .unwrap_or(message)
        .to_string()
}

/// The position just past the end of `sql`, where an unfinished statement stops.
fn end_of(sql: &str) -> Position {
    let trimmed = sql.trim_end();
    let line = trimmed.matches('\n').count() as u64 + 1;
    let column = trimmed.rsplit('\n').next().map_or(0, |l| l.chars().count()) as u64 + 1;
    Position { line, column }
}

fn parser_message(p: &ParserError) -> String {
    let s = match p {
        ParserError::TokenizerError(s) | ParserError::ParserError(s) => s.clone(),
        ParserError::RecursionLimitExceeded => {
            "the query nests too deeply (recursion limit exceeded)".to_string()
        }
    };
    format!("SQL does not parse: {s}")
}

/// sqlparser ends its messages with "at Line: L, Column: C".
fn parser_position(p: &ParserError) -> Option<Position> {
    let s = p.to_string();
    let at = s.rfind("Line: ")?;
    let rest = &s[at + 6..];
    let (line, rest) = rest.split_once(", Column: ")?;
    let column: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    Some(Position {
        line: line.trim().parse().ok()?,
        column: column.parse().ok()?,
    })
}

/// The position of the first name quoted in `message` (`'x'` or `"x"`) within `sql`.
fn quoted_position(message: &str, sql: &str) -> Option<Position> {
    let name = ['\'', '"'].iter().find_map(|&q| {
        let start = message.find(q)? + 1;
        let len = message[start..].find(q)?;
        Some(&message[start..start + len])
    })?;
    // "citytsdb.public.x" names the table as the user wrote "x".
    let name = name.rsplit('.').next()?;
    if name.is_empty() {
        return None;
    }
    // Compare ASCII case-insensitively on the original bytes, so offsets stay offsets
    // into `sql` (lowercasing can change a string's length).
    let (hay, needle) = (sql.as_bytes(), name.as_bytes());
    let byte = (0..=hay.len().checked_sub(needle.len())?).find(|&i| {
        sql.is_char_boundary(i) && hay[i..i + needle.len()].eq_ignore_ascii_case(needle)
    })?;
    let before = sql.get(..byte)?;
    let line = before.matches('\n').count() as u64 + 1;
    let column = before
        .rsplit('\n')
        .next()
        .map(|l| l.chars().count())
        .unwrap_or(0) as u64
        + 1;
    Some(Position { line, column })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_found() {
        let p = ParserError::ParserError(
            "Expected: an expression, found: FROM at Line: 2, Column: 8".into(),
        );
        assert_eq!(parser_position(&p), Some(Position { line: 2, column: 8 }));
        let q = quoted_position(
            "table 'citytsdb.public.nope' not found",
            "SELECT *\nFROM nope",
        );
        assert_eq!(q, Some(Position { line: 2, column: 6 }));
        assert_eq!(
            end_of("SELECT x\nFROM t WHERE  \n"),
            Position {
                line: 2,
                column: 13
            }
        );
        assert_eq!(
            user_message("Internal error: f failed.\nThis issue was likely caused by a bug in DataFusion's code. Please help us to resolve this by filing a bug report in our issue tracker: https://github.com/apache/datafusion/issues. No function matches 'f(Utf8)'."),
            "No function matches 'f(Utf8)'."
        );
    }

    /// A regression case of `engine::fuzz`: `EXPLAIN ANALYZE SELECT time FROM
    /// manhole ORDER BY date_trunc('hour', tilt_deg)` was answered as DataFusion's
    /// internal error (a 500) asking for a bug report.
    #[test]
    fn a_function_without_a_matching_signature_is_the_users_error() {
        let sql = "EXPLAIN ANALYZE SELECT time FROM manhole ORDER BY date_trunc('hour', tilt_deg)";
        let e = DataFusionError::Internal(
            "Function 'date_trunc' failed to match any signature, errors: Error during planning: Function 'date_trunc' requires Timestamp, but received Float64 (DataType: Float64).".into(),
        );
        let got = QueryError::from_datafusion(e, sql);
        let QueryError::Invalid { message, position } = got else {
            panic!("{got:?} is not the user's error");
        };
        assert!(
            message.starts_with("Function 'date_trunc' failed to match any signature"),
            "{message}"
        );
        assert!(!message.contains("bug"), "{message}");
        assert_eq!(
            position,
            Some(Position {
                line: 1,
                column: 51
            })
        );
    }
}
