//! The write paths of InfluxDB 1.x, 2.x and 3, for clients, gateways and agents
//! that already speak them. Each takes the same line protocol (gzip too) and
//! answers with the status codes and error bodies its original does:
//!
//! - `POST /write?db=&precision=n|ns|u|us|ms|s` (1.x; `u`/`p` carry credentials):
//!   204, or 400 `{"error": "partial write: ..."}`.
//! - `POST /api/v2/write?bucket=&org=&precision=ns|us|ms|s` (2.x): 204, or 400
//!   `{"code": "invalid", "message": "..."}`; other errors use 2.x's codes.
//! - `POST /api/v3/write_lp?db=&precision=auto|nanosecond|...&accept_partial=&no_sync=`
//!   (3): 204, or 400 `{"error": "partial write of line protocol occurred", "data":
//!   [{"original_line", "line_number", "error_message"}]}`; with
//!   `accept_partial=false` a body with a bad line writes nothing and answers
//!   `{"error": "parsing failed for write_lp endpoint", ...}`.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use citytsdb_ingest::{Outcome, Precision, WriteOptions};
use serde_json::{json, Value};

use super::error::ApiError;
use super::write::{check_db_name, read_body, MAX_LISTED};
use super::{require, AppState};
use crate::auth::Caller;

fn param<'a>(p: &'a HashMap<String, String>, name: &str) -> Option<&'a str> {
    p.get(name).map(String::as_str).filter(|v| !v.is_empty())
}

fn boolean(p: &HashMap<String, String>, name: &str, default: bool) -> Result<bool, ApiError> {
    match param(p, name) {
        None => Ok(default),
        Some("true") => Ok(true),
        Some("false") => Ok(false),
        Some(v) => Err(ApiError::bad_request(format!(
            "invalid {name} '{v}': use true or false"
        ))),
    }
}

/// Writes a body through the ingestor.
async fn ingest(
    app: &AppState,
    db: &str,
    body: axum::body::Bytes,
    precision: Precision,
    sync: bool,
    accept_partial: bool,
) -> Result<Outcome, ApiError> {
    let options = WriteOptions {
        precision,
        sync,
        accept_partial,
    };
    Ok(app.ingestor.write(db, body, options).await?)
}

/// The database a write names in parameter `name`, checked and writable by the caller.
fn writable_db(
    p: &HashMap<String, String>,
    name: &str,
    missing: &str,
    caller: &Caller,
) -> Result<String, ApiError> {
    let db = param(p, name)
        .ok_or_else(|| ApiError::bad_request(missing))?
        .to_string();
    check_db_name(&db)?;
    require(caller, caller.can_write(&db), &format!("write:{db}"))?;
    Ok(db)
}

/// `POST /write` (InfluxDB 1.x).
pub async fn write_v1x(
    State(app): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Query(p): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let db = writable_db(&p, "db", "database is required", &caller)?;
    let precision = match param(&p, "precision") {
        None => Precision::Nanosecond,
        Some(v) => Precision::parse(v).ok_or_else(|| {
            ApiError::bad_request(format!(
                "invalid precision '{v}': use n, ns, u, us, ms or s"
            ))
        })?,
    };
    let body = read_body(&headers, body, app.max_body_size).await?;
    let outcome = ingest(&app, &db, body, precision, true, true).await?;
    let Some(first) = outcome.rejected.first() else {
        return Ok(StatusCode::NO_CONTENT.into_response());
    };
    let message = format!(
        "partial write: unable to parse '{}': {} (line {}); {} of {} lines rejected",
        first.text,
        first.message,
        first.line,
        outcome.rejected.len(),
        outcome.data_lines
    );
    Ok((StatusCode::BAD_REQUEST, Json(json!({"error": message}))).into_response())
}

fn v2_error(status: StatusCode, code: &str, message: String) -> Response {
    (status, Json(json!({"code": code, "message": message}))).into_response()
}

/// `POST /api/v2/write` (InfluxDB 2.x): the bucket is the database, the org is
/// accepted and ignored.
pub async fn write_v2(
    State(app): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Query(p): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = async {
        let db = writable_db(&p, "bucket", "bucket is required", &caller)?;
        let precision = match param(&p, "precision") {
            None => Precision::Nanosecond,
            Some(v @ ("ns" | "us" | "ms" | "s")) => Precision::parse(v).unwrap_or_default(),
            Some(v) => {
                return Err(ApiError::bad_request(format!(
                    "invalid precision '{v}': use ns, us, ms or s"
                )))
            }
        };
        let body = read_body(&headers, body, app.max_body_size).await?;
        ingest(&app, &db, body, precision, true, true).await
    }
    .await;
    match result {
        Ok(outcome) => match outcome.rejected.first() {
            None => StatusCode::NO_CONTENT.into_response(),
            Some(first) => v2_error(
                StatusCode::BAD_REQUEST,
                "invalid",
                format!(
                    "partial write error ({} of {} lines rejected): line {}: {}",
                    outcome.rejected.len(),
                    outcome.data_lines,
                    first.line,
                    first.message
                ),
            ),
        },
        Err(e) => v2_failure(e),
    }
}

/// An error in InfluxDB 2's shape.
fn v2_failure(e: ApiError) -> Response {
    let code = match e.status {
        StatusCode::BAD_REQUEST => "invalid",
        StatusCode::UNAUTHORIZED => "unauthorized",
        StatusCode::FORBIDDEN => "forbidden",
        StatusCode::NOT_FOUND => "not found",
        StatusCode::PAYLOAD_TOO_LARGE => "request too large",
        StatusCode::SERVICE_UNAVAILABLE => "unavailable",
        _ => "internal error",
    };
    v2_error(e.status, code, e.message)
}

/// Largest `/api/v2/delete` body.
const MAX_DELETE_BODY: usize = 64 << 10;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct DeleteV2 {
    start: String,
    stop: String,
    #[serde(default)]
    predicate: String,
}

/// `POST /api/v2/delete?bucket=&org=` (InfluxDB 2.x) with `{"start", "stop",
/// "predicate"}`: deletes the rows with `start <= time <= stop` whose tags match
/// the predicate, of the measurement `_measurement` names (of every table without
/// one); 204. A predicate on a tag a table lacks matches none of its rows.
pub async fn delete_v2(
    State(app): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Query(p): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = async {
        let db = writable_db(&p, "bucket", "bucket is required", &caller)?;
        let body = read_body(&headers, body, MAX_DELETE_BODY).await?;
        let req: DeleteV2 = serde_json::from_slice(&body).map_err(|e| {
            ApiError::bad_request(format!(
                "the body is not {{\"start\", \"stop\", \"predicate\"}}: {e} (line {}, column {})",
                e.line(),
                e.column()
            ))
        })?;
        let time = |name: &str, v: &str| {
            citytsdb_storage::units::parse_rfc3339(v)
                .map_err(|e| ApiError::bad_request(format!("field '{name}': {e}")))
        };
        let (start, stop) = (time("start", &req.start)?, time("stop", &req.stop)?);
        let terms = citytsdb_query::delete::parse_influx_predicate(&req.predicate)?;
        let mut measurement = None;
        for t in terms.iter().filter(|t| t.key == "_measurement") {
            if !t.equal || measurement.replace(t.value.clone()).is_some() {
                return Err(ApiError::bad_request(
                    "predicate: name one _measurement with = (or none for every one)",
                ));
            }
        }
        let Some(snapshot) = app.storage.snapshot(&db) else {
            return Err(citytsdb_storage::StorageError::DatabaseNotFound(db).into());
        };
        let tables: Vec<String> = snapshot
            .schemas
            .iter()
            .filter(|(name, _)| measurement.as_ref().is_none_or(|m| m == *name))
            .filter(|(_, schema)| {
                terms
                    .iter()
                    .filter(|t| t.key != "_measurement")
                    .all(|t| schema.kind(&t.key).is_some())
            })
            .map(|(name, _)| name.clone())
            .collect();
        drop(snapshot);
        // Its own task, as SQL deletes run: a client that goes away does not cut it
        // short.
        let query = app.query.clone();
        tokio::spawn(async move {
            for table in tables {
                let delete = citytsdb_query::delete::Delete::influx(&table, start, stop, &terms);
                query.delete(&db, &delete).await?;
            }
            Ok::<(), citytsdb_query::delete::DeleteError>(())
        })
        .await
        .map_err(ApiError::task)??;
        Ok(())
    }
    .await;
    match result {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => v2_failure(e),
    }
}

/// `POST /api/v3/write_lp` (InfluxDB 3).
pub async fn write_v3(
    State(app): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Query(p): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let db = writable_db(&p, "db", "missing query parameter db", &caller)?;
    let precision = match param(&p, "precision") {
        None => Precision::Auto,
        Some(v) => Precision::parse_v3(v).ok_or_else(|| {
            ApiError::bad_request(format!(
                "invalid precision '{v}': use auto, nanosecond, microsecond, millisecond or second"
            ))
        })?,
    };
    let accept_partial = boolean(&p, "accept_partial", true)?;
    let no_sync = boolean(&p, "no_sync", false)?;
    let body = read_body(&headers, body, app.max_body_size).await?;
    let outcome = ingest(&app, &db, body, precision, !no_sync, accept_partial).await?;
    if outcome.rejected.is_empty() {
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    let data: Vec<Value> = outcome
        .rejected
        .iter()
        .take(MAX_LISTED)
        .map(
            |e| json!({"original_line": e.text, "line_number": e.line, "error_message": e.message}),
        )
        .collect();
    let error = if accept_partial {
        "partial write of line protocol occurred"
    } else {
        "parsing failed for write_lp endpoint"
    };
    Ok((
        StatusCode::BAD_REQUEST,
        Json(json!({"error": error, "data": data})),
    )
        .into_response())
}
