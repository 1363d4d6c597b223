//! `POST /api/v1/write`: line protocol in, durable rows out.
//!
//! 1. Read the body (gunzipped if `Content-Encoding: gzip`), refusing it past the limit.
//! 2. Hand it to the [`Ingestor`](citytsdb_ingest::Ingestor), which parses and
//!    validates it off the async threads, writes the good lines and returns once
//!    they are durable, listing the bad ones with line, column and reason.
//! 3. 204 if every line was written; 400 listing the rejected lines otherwise.

use std::collections::HashMap;
use std::io::Read;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use citytsdb_ingest::{Precision, WriteOptions};
use serde_json::json;

use super::error::ApiError;
use super::AppState;

/// At most this many rejected lines are listed in an answer.
pub const MAX_LISTED: usize = 100;

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
    let options = WriteOptions {
        precision,
        sync,
        accept_partial: true,
    };
    let outcome = app.ingestor.write(db, body, options).await?;
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

/// Refuses database names no store can hold, before anything else is read.
pub fn check_db_name(db: &str) -> Result<(), ApiError> {
    Ok(citytsdb_ingest::check_db_name(db)?)
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
