//! `GET|POST /api/v1/query` and `/api/v3/query_sql` (InfluxDB 3's path, which
//! names the SQL `q`): SQL in, rows out in the asked-for format.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::error::ApiError;
use super::AppState;
use crate::format::{render, Format};

/// The parameters of a query, from the URL or a JSON body.
#[derive(Debug, Default, Deserialize)]
pub struct QueryParams {
    /// Database.
    pub db: Option<String>,
    /// The SQL.
    pub sql: Option<String>,
    /// `q`, the InfluxDB spelling of `sql`.
    pub q: Option<String>,
    /// Output format; `json` by default.
    pub format: Option<String>,
}

/// `GET /api/v1/query?db=&sql=&format=`.
pub async fn query_get(
    State(app): State<Arc<AppState>>,
    Query(p): Query<QueryParams>,
) -> Result<Response, ApiError> {
    run(&app, p).await
}

/// `POST /api/v1/query` with `{"db", "sql", "format"}`.
pub async fn query_post(
    State(app): State<Arc<AppState>>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let p: QueryParams = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(format!(
            "body is not a JSON object with db, sql and format: {e} (line {}, column {})",
            e.line(),
            e.column()
        ))
    })?;
    run(&app, p).await
}

async fn run(app: &AppState, p: QueryParams) -> Result<Response, ApiError> {
    let db =
        p.db.filter(|d| !d.is_empty())
            .ok_or_else(|| ApiError::bad_request("missing parameter db"))?;
    let sql = p
        .sql
        .or(p.q)
        .filter(|s| !s.trim().is_empty())
        .ok_or_else(|| ApiError::bad_request("missing parameter sql"))?;
    let format = match p.format.as_deref() {
        None | Some("") => Format::Json,
        Some(f) => Format::parse(f).ok_or_else(|| {
            ApiError::bad_request(format!(
                "unknown format '{f}': use json, jsonl, csv, pretty, arrow or parquet"
            ))
        })?,
    };
    let out = app.query.query(&db, &sql).await?;
    let body = render(format, &out.schema, &out.batches).map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("rendering the answer: {e}"),
        )
    })?;
    Ok(([(CONTENT_TYPE, format.content_type())], body).into_response())
}
