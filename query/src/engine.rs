//! The query engine: SQL text in, Arrow batches out.
//!
//! 1. The SQL is parsed (PostgreSQL dialect) and refused unless it is one read-only
//!    statement: `SELECT` (with CTEs), `EXPLAIN [ANALYZE]`, or `SHOW`.
//! 2. A DataFusion session is made over a snapshot of the database: its tables are
//!    [`CityTable`](crate::provider::CityTable)s reading that snapshot's segments and
//!    buffered rows, and DataFusion plans, optimizes and executes the statement.
//! 3. Errors are classified (`error.rs`): the user's fault with a position, or ours.

use std::sync::Arc;

use citytsdb_storage::Engine;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::catalog::{CatalogProvider, MemoryCatalogProvider};
use datafusion::execution::context::SQLOptions;
use datafusion::execution::runtime_env::{RuntimeEnv, RuntimeEnvBuilder};
use datafusion::execution::SendableRecordBatchStream;
use datafusion::prelude::{SessionConfig, SessionContext};
use datafusion::sql::parser::{DFParser, Statement as DfStatement};
use datafusion::sql::sqlparser::ast::Statement as SqlStatement;
use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;

use crate::error::{Position, QueryError};
use crate::provider::{DatabaseSchema, IndexCache, STORE_URL};

/// The catalog name DataFusion sees; the database's tables are in its `public` schema.
const CATALOG: &str = "citytsdb";
/// Nesting depth at which the parser refuses SQL, well before any stack is at risk.
const RECURSION_LIMIT: usize = 64;

/// A query's answer, fully collected.
#[derive(Debug)]
pub struct QueryOutput {
    /// Column names and types.
    pub schema: SchemaRef,
    /// The rows.
    pub batches: Vec<RecordBatch>,
}

/// Runs SQL over a storage engine's databases. Cheap to clone.
#[derive(Clone)]
pub struct QueryEngine {
    storage: Engine,
    runtime: Arc<RuntimeEnv>,
    indexes: Arc<IndexCache>,
}

impl QueryEngine {
    /// A query engine over `storage`, reading segments from its object store.
    pub fn new(storage: Engine) -> Result<Self, QueryError> {
        let runtime = RuntimeEnvBuilder::new()
            .build_arc()
            .map_err(|e| QueryError::Internal(e.to_string()))?;
        let url = url::Url::parse(STORE_URL).map_err(|e| QueryError::Internal(e.to_string()))?;
        runtime.register_object_store(&url, storage.store().clone());
        Ok(Self {
            storage,
            runtime,
            indexes: Arc::new(IndexCache::default()),
        })
    }

    /// Runs one read-only statement against `db` and collects the answer.
    pub async fn query(&self, db: &str, sql: &str) -> Result<QueryOutput, QueryError> {
        let stream = self.query_stream(db, sql).await?;
        let schema = stream.schema();
        let batches = datafusion::physical_plan::common::collect(stream)
            .await
            .map_err(|e| QueryError::from_datafusion(e, sql))?;
        Ok(QueryOutput { schema, batches })
    }

    /// Plans one read-only statement against `db` and starts executing it.
    pub async fn query_stream(
        &self,
        db: &str,
        sql: &str,
    ) -> Result<SendableRecordBatchStream, QueryError> {
        check_read_only(sql)?;
        let ctx = self.context(db)?;
        let options = SQLOptions::new()
            .with_allow_ddl(false)
            .with_allow_dml(false)
            .with_allow_statements(false);
        let df = ctx
            .sql_with_options(sql, options)
            .await
            .map_err(|e| QueryError::from_datafusion(e, sql))?;
        df.execute_stream()
            .await
            .map_err(|e| QueryError::from_datafusion(e, sql))
    }

    fn context(&self, db: &str) -> Result<SessionContext, QueryError> {
        let snapshot = self
            .storage
            .snapshot(db)
            .ok_or_else(|| QueryError::DatabaseNotFound(db.to_string()))?;
        let config = SessionConfig::new()
            .with_information_schema(true)
            .with_create_default_catalog_and_schema(false)
            .with_default_catalog_and_schema(CATALOG, "public")
            .set_str("datafusion.sql_parser.dialect", "PostgreSQL")
            .set_str("datafusion.sql_parser.collect_spans", "true")
            .set_str(
                "datafusion.sql_parser.recursion_limit",
                &RECURSION_LIMIT.to_string(),
            )
            .set_str("datafusion.execution.time_zone", "+00:00");
        let ctx = SessionContext::new_with_config_rt(config, self.runtime.clone());
        let catalog = MemoryCatalogProvider::new();
        let schema = DatabaseSchema::new(
            Arc::new(snapshot),
            self.storage.store().clone(),
            self.indexes.clone(),
        );
        catalog
            .register_schema("public", Arc::new(schema))
            .map_err(|e| QueryError::Internal(e.to_string()))?;
        ctx.register_catalog(CATALOG, Arc::new(catalog));
        Ok(ctx)
    }
}

/// Refuses anything but exactly one SELECT, EXPLAIN or SHOW statement.
fn check_read_only(sql: &str) -> Result<(), QueryError> {
    let statements = DFParser::parse_sql_with_dialect(sql, &PostgreSqlDialect {})
        .map_err(|e| QueryError::from_datafusion(e, sql))?;
    let mut iter = statements.iter();
    let Some(first) = iter.next() else {
        return Err(QueryError::invalid(
            "the query is empty: send one SELECT, EXPLAIN or SHOW statement",
        ));
    };
    if iter.next().is_some() {
        return Err(QueryError::invalid("send one statement per query"));
    }
    if !is_read_only(first) {
        return Err(QueryError::Invalid {
            message: format!(
                "only SELECT, EXPLAIN and SHOW statements are allowed; got {}",
                statement_keyword(sql)
            ),
            position: first_token_position(sql),
        });
    }
    Ok(())
}

fn is_read_only(s: &DfStatement) -> bool {
    match s {
        DfStatement::Statement(s) => match s.as_ref() {
            SqlStatement::Query(_)
            | SqlStatement::ShowTables { .. }
            | SqlStatement::ShowColumns { .. }
            | SqlStatement::ShowFunctions { .. } => true,
            SqlStatement::Explain { statement, .. } => {
                matches!(statement.as_ref(), SqlStatement::Query(_))
            }
            _ => false,
        },
        DfStatement::Explain(e) => is_read_only(&e.statement),
        _ => false,
    }
}

fn statement_keyword(sql: &str) -> String {
    sql.split_whitespace().next().unwrap_or("").to_uppercase()
}

fn first_token_position(sql: &str) -> Option<Position> {
    let mut line = 1;
    let mut column = 1;
    for c in sql.chars() {
        if !c.is_whitespace() {
            return Some(Position { line, column });
        }
        if c == '\n' {
            line += 1;
            column = 1;
        } else {
            column += 1;
        }
    }
    None
}
