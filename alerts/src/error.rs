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

#[cfg(test)]
mod tests {
    use citytsdb_query::Position;

    use super::*;

    #[test]
    fn plan_errors_are_the_clients_with_where() {
        let at = RuleError::from_plan(QueryError::Invalid {
            message: "column nope not found".into(),
            position: Some(Position { line: 1, column: 8 }),
        });
        assert_eq!(
            at.to_string(),
            "sql: column nope not found (line 1, column 8)"
        );
        let missing = RuleError::from_plan(QueryError::DatabaseNotFound("nowhere".into()));
        assert!(
            matches!(missing, RuleError::Invalid(m) if m.starts_with("sql: database nowhere does not exist yet"))
        );
    }
}
