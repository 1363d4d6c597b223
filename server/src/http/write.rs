//! `POST /api/v1/write`: line protocol in, durable rows out.
//!
//! 1. Read the body (gunzipped if `Content-Encoding: gzip`), refusing it past the limit.
//! 2. Parse and validate it on a blocking thread: good lines become per-table Arrow
//!    batches; bad lines are collected with their line number, column and reason.
//! 3. Hand the batches to the storage engine, which answers once they are durable.
//! 4. 204 if every line was written; 400 listing the rejected lines otherwise.

use std::collections::HashMap;
use std::io::Read;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use citytsdb_ingest::{build_batches, parse_body, validate, LineError, Precision};
use citytsdb_storage::Engine;
use datafusion::arrow::error::ArrowError;
use datafusion::arrow::record_batch::RecordBatch;
use serde_json::json;

use super::error::ApiError;
use super::AppState;

/// At most this many rejected lines are listed in an answer.
pub const MAX_LISTED: usize = 100;

/// The outcome of parsing and validating a body: what to write, what was rejected.
pub struct Prepared {
    /// One Arrow batch per table, of the accepted lines.
    pub tables: Vec<(String, RecordBatch)>,
    /// Rejected lines, in line order.
    pub rejected: Vec<LineError>,
    /// Lines that were neither blank nor comments.
    pub data_lines: usize,
}

/// Parses a body, validates its lines against the database's schemas (adding new
/// tables and columns), and builds the batches of the accepted lines; lines without
/// a timestamp get `now_ns`. Nothing is written. Blocks on the schema lock: call it
/// off the async threads.
pub fn prepare(
    storage: &Engine,
    db: &str,
    body: &[u8],
    precision: Precision,
    now_ns: i64,
) -> Result<Prepared, ArrowError> {
    let parsed = parse_body(body);
    let mut rejected = parsed.rejected;
    let validated =
        storage.update_schemas(db, |schemas| validate(parsed.lines, precision, schemas));
    rejected.extend(validated.rejected.iter().cloned());
    rejected.sort_by_key(|e| e.line);
    let tables = build_batches(&validated, now_ns)?;
    Ok(Prepared {
        tables,
        rejected,
        data_lines: parsed.data_lines,
    })
}

/// Now, in nanoseconds since the epoch: the time of lines written without one.
pub fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// `POST /api/v1/write?db=&precision=&no_sync=`.
pub async fn write_v1(
    State(app): State<Arc<AppState>>,
    axum::Extension(caller): axum::Extension<crate::auth::Caller>,
    Query(params): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let db = params
        .get("db")
        .filter(|d| !d.is_empty())
        .ok_or_else(|| ApiError::bad_request("missing query parameter db"))?
        .clone();
    check_db_name(&db)?;
    super::require(&caller, caller.can_write(&db), &format!("write:{db}"))?;
    let precision = match params.get("precision").map(String::as_str) {
        None | Some("") => Precision::Nanosecond,
        Some(p) => Precision::parse(p).ok_or_else(|| {
            ApiError::bad_request(format!("invalid precision '{p}': use ns, us, ms or s"))
        })?,
    };
    let no_sync = match params.get("no_sync").map(String::as_str) {
        None | Some("") | Some("false") => false,
        Some("true") => true,
        Some(v) => {
            return Err(ApiError::bad_request(format!(
                "invalid no_sync '{v}': use true or false"
            )))
        }
    };
    let body = read_body(&headers, body, app.max_body_size).await?;
    let outcome = write_body(&app, &db, body, precision, !no_sync).await?;
    Ok(outcome)
}

/// Parses, validates and writes a body; answers 204 or 400 with the rejected lines.
pub async fn write_body(
    app: &AppState,
    db: &str,
    body: Bytes,
    precision: Precision,
    sync: bool,
) -> Result<Response, ApiError> {
    let outcome = ingest(app, db, body, precision, sync, true).await?;
    if outcome.rejected.is_empty() {
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    let lines: Vec<_> = outcome
        .rejected
        .iter()
        .take(MAX_LISTED)
        .map(|e| json!({"line": e.line, "column": e.column, "error": e.message, "text": e.text}))
        .collect();
    let body = json!({
        "error": format!("partial write: {} of {} lines rejected", outcome.rejected.len(), outcome.data_lines),
        "lines": lines,
    });
    Ok((StatusCode::BAD_REQUEST, Json(body)).into_response())
}

/// What a write did with a body.
pub struct Outcome {
    /// Lines rejected, in line order (none written when `accept_partial` was false).
    pub rejected: Vec<LineError>,
    /// Lines that were neither blank nor comments.
    pub data_lines: usize,
}

/// Parses and validates a body, then writes its good lines — all of them, or,
/// without `accept_partial`, only if no line was rejected.
pub async fn ingest(
    app: &AppState,
    db: &str,
    body: Bytes,
    precision: Precision,
    sync: bool,
    accept_partial: bool,
) -> Result<Outcome, ApiError> {
    let now = now_ns();
    let storage = app.storage.clone();
    let db_name = db.to_string();
    let prepared = tokio::task::spawn_blocking(move || -> Result<Prepared, ApiError> {
        prepare(&storage, &db_name, &body, precision, now).map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("building batches: {e}"),
            )
        })
    })
    .await
    .map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("write task failed: {e}"),
        )
    })??;

    let write = accept_partial || prepared.rejected.is_empty();
    if write && !prepared.tables.is_empty() {
        // Batches share their buffers: the copy for the alert fast path is cheap.
        let written = prepared.tables.clone();
        app.storage.write(db, prepared.tables, sync).await?;
        app.alerts.on_write(db, &written);
    }
    Ok(Outcome {
        rejected: prepared.rejected,
        data_lines: prepared.data_lines,
    })
}

/// Refuses database names no store can hold.
pub fn check_db_name(db: &str) -> Result<(), ApiError> {
    if db.chars().count() > 255 || db.chars().any(char::is_control) {
        return Err(ApiError::bad_request(
            "invalid database name: at most 255 characters, no control characters",
        ));
    }
    Ok(())
}

/// Reads a body up to `limit` bytes (after gunzip), answering 413 past it.
pub async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body is larger than the limit of {limit} bytes"),
        )
    };
    if let Some(len) = headers
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
    {
        if len > limit {
            return Err(too_large());
        }
    }
    let raw = axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| too_large())?;
    let encoding = headers
        .get("content-encoding")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    match encoding.trim().to_ascii_lowercase().as_str() {
        "" | "identity" => Ok(raw),
        "gzip" | "x-gzip" => {
            let mut out = Vec::new();
            let mut reader = flate2::read::MultiGzDecoder::new(&raw[..]).take(limit as u64 + 1);
            reader
                .read_to_end(&mut out)
                .map_err(|e| ApiError::bad_request(format!("body is not valid gzip: {e}")))?;
            if out.len() > limit {
                return Err(too_large());
            }
            Ok(Bytes::from(out))
        }
        other => Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("unsupported Content-Encoding '{other}': use gzip or none"),
        )),
    }
}
