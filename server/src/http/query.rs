//! `GET|POST /api/v1/query` and `/api/v3/query_sql` (InfluxDB 3's path, which
//! names the SQL `q`): SQL in, rows out in the asked-for format, streamed as the
//! query makes them.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use citytsdb_query::QueryStream;
use datafusion::arrow::error::ArrowError;
use datafusion::arrow::record_batch::RecordBatch;
use serde::Deserialize;

use super::error::ApiError;
use super::AppState;

/// Largest `POST /api/v1/query` body (a statement and its parameters).
const MAX_QUERY_BODY: usize = 4 << 20;
use crate::auth::Caller;
use crate::format::{Encoder, Format};
use axum::{Extension, Json};
use serde_json::json;

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
    Extension(caller): Extension<Caller>,
    Query(p): Query<QueryParams>,
) -> Result<Response, ApiError> {
    run(&app, &caller, p, false).await
}

/// `POST /api/v1/query` with `{"db", "sql", "format"}`.
pub async fn query_post(
    State(app): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    headers: axum::http::HeaderMap,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    let body = super::write::read_body(&headers, body, MAX_QUERY_BODY).await?;
    let p: QueryParams = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(format!(
            "body is not a JSON object with db, sql and format: {e} (line {}, column {})",
            e.line(),
            e.column()
        ))
    })?;
    run(&app, &caller, p, true).await
}

async fn run(
    app: &AppState,
    caller: &Caller,
    p: QueryParams,
    post: bool,
) -> Result<Response, ApiError> {
    let db =
        p.db.filter(|d| !d.is_empty())
            .ok_or_else(|| ApiError::bad_request("missing parameter db"))?;
    let sql = p
        .sql
        .or(p.q)
        .filter(|s| !s.trim().is_empty())
        .ok_or_else(|| ApiError::bad_request("missing parameter sql"))?;
    if let Some(delete) = citytsdb_query::delete::parse_delete(&sql)? {
        super::require(caller, caller.can_write(&db), &format!("write:{db}"))?;
        if !post {
            return Err(ApiError::bad_request(
                "DELETE changes data: send it with POST /api/v1/query",
            ));
        }
        // Its own task: a client that goes away does not cut a delete short between
        // its commit and the registry correction that follows it.
        let query = app.query.clone();
        let deleted = tokio::spawn(async move { query.delete(&db, &delete).await })
            .await
            .map_err(ApiError::task)??;
        return Ok(Json(json!({ "deleted": deleted })).into_response());
    }
    super::require(caller, caller.can_read(&db), &format!("read:{db}"))?;
    let format = match p.format.as_deref() {
        None | Some("") => Format::Json,
        Some(f) => Format::parse(f).ok_or_else(|| {
            ApiError::bad_request(format!(
                "unknown format '{f}': use json, jsonl, csv, pretty, arrow or parquet"
            ))
        })?,
    };
    let mut stream = app.query.stream(&db, &sql).await?;
    // The first batch decides the status: an error before any row is a clean 4xx.
    let first = match stream.next().await {
        Some(Err(e)) => return Err(e.into()),
        Some(Ok(batch)) => Some(batch),
        None => None,
    };
    let (encoder, head) = Encoder::new(format, &stream.schema).map_err(render_error)?;
    let body = Body {
        head: Some(head),
        first,
        stream,
        encoder: Some(encoder),
    };
    let chunks = futures::stream::unfold(Some(body), |body| async move {
        let mut body = body?;
        let (chunk, more) = body.next_chunk().await;
        Some((chunk, more.then_some(body)))
    });
    Ok((
        [(CONTENT_TYPE, format.content_type())],
        axum::body::Body::from_stream(chunks),
    )
        .into_response())
}

fn render_error(e: ArrowError) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        format!("rendering the answer: {e}"),
    )
}

/// An answer on its way out: encoded batch by batch as the client reads.
struct Body {
    head: Option<Vec<u8>>,
    first: Option<RecordBatch>,
    stream: QueryStream,
    encoder: Option<Encoder>,
}

impl Body {
    /// The next bytes, and whether more follow. A failure after the status went
    /// out can only cut the answer short: the connection is closed mid-body, so
    /// no client mistakes a partial answer for a whole one.
    async fn next_chunk(&mut self) -> (Result<Bytes, std::io::Error>, bool) {
        if let Some(head) = self.head.take() {
            return (Ok(head.into()), true);
        }
        let item = match self.first.take() {
            Some(batch) => Some(Ok(batch)),
            None => self.stream.next().await,
        };
        let Some(encoder) = self.encoder.as_mut() else {
            return (Ok(Bytes::new()), false);
        };
        match item {
            Some(Ok(batch)) => match encoder.batch(&batch) {
                Ok(bytes) => (Ok(bytes.into()), true),
                Err(e) => (Err(cut_short(e.to_string())), false),
            },
            Some(Err(e)) => (Err(cut_short(e.to_string())), false),
            None => match self.encoder.take().map(Encoder::finish) {
                Some(Ok(bytes)) => (Ok(bytes.into()), false),
                Some(Err(e)) => (Err(cut_short(e.to_string())), false),
                None => (Ok(Bytes::new()), false),
            },
        }
    }
}

fn cut_short(why: String) -> std::io::Error {
    tracing::warn!(error = %why, "a query failed while its answer was streaming; the answer was cut short");
    std::io::Error::other(why)
}
