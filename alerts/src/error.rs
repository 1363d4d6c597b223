//! What can go wrong with a rule, and whose fault it is: the server answers
//! [`RuleError::Invalid`] with 400, [`RuleError::NotFound`] with 404 and
//! [`RuleError::Internal`] with 500.

use citytsdb_query::QueryError;

/// Why a rule operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RuleError {
    /// The rule is invalid; nothing was stored.
    #[error("{0}")]
    Invalid(String),
    /// No rule has this id.
    #[error("no rule with id {0}")]
    NotFound(String),
    /// Storing or loading the rules failed: ours, not the client's.
    #[error("{0}")]
    Internal(String),
}

impl RuleError {
    /// A rule's SQL that does not plan: the client's to fix, with where it is wrong.
    pub(crate) fn from_plan(e: QueryError) -> Self {
        match e {
            QueryError::DatabaseNotFound(db) => Self::Invalid(format!(
                "sql: database {db} does not exist yet; rules are planned against its tables, so write to it first"
            )),
            QueryError::Invalid {
                message,
                position: Some(p),
            } => Self::Invalid(format!(
                "sql: {message} (line {}, column {})",
                p.line, p.column
            )),
            other => Self::Invalid(format!("sql: {other}")),
        }
    }

    /// A blocking task of ours that did not finish (a bug or a shutdown).
    pub(crate) fn task(what: &str, e: tokio::task::JoinError) -> Self {
        Self::Internal(format!("{what}: the task did not finish: {e}"))
    }
}
