//! `/api/v1/databases`: databases with their settings, and how long their rows are
//! kept (`PUT` a retention; admin only).

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::{Extension, Json};
use serde_json::{json, Value};

use super::error::ApiError;
use super::write::{check_db_name, read_body};
use super::{require, AppState};
use crate::auth::Caller;
use citytsdb_storage::units::{format_duration, parse_duration};

/// Largest settings body.
const MAX_SETTINGS_BODY: usize = 64 << 10;

/// `GET /api/v1/databases`: every database the caller may read, with its
/// retention and its tables' own retentions.
pub async fn list(
    State(app): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
) -> Json<Value> {
    let databases: Vec<Value> = app
        .storage
        .database_settings()
        .into_iter()
        .filter(|d| caller.can_read(&d.name))
        .map(|d| {
            let tables: serde_json::Map<String, Value> = d
                .tables
                .into_iter()
                .map(|(t, r)| (t, json!({"retention": format_duration(r)})))
                .collect();
            json!({
                "name": d.name,
                "retention": d.retention.map(format_duration),
                "tables": tables,
            })
        })
        .collect();
    Json(json!({ "databases": databases }))
}

/// `PUT /api/v1/databases/{db}` with `{"retention": "400d"}` (or `null`, forever):
/// creates the database if new.
pub async fn put_database(
    State(app): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(db): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let retention = settings(&caller, &db, &headers, body).await?;
    app.storage.set_retention(&db, None, retention).await?;
    Ok(Json(
        json!({"name": db, "retention": retention.map(format_duration)}),
    ))
}

/// `PUT /api/v1/databases/{db}/tables/{table}` with `{"retention": "30d"}` (or
/// `null`: as the database says). The table must exist.
pub async fn put_table(
    State(app): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path((db, table)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let retention = settings(&caller, &db, &headers, body).await?;
    if !app.storage.databases().contains(&db) {
        return Err(citytsdb_storage::StorageError::DatabaseNotFound(db).into());
    }
    app.storage
        .set_retention(&db, Some(&table), retention)
        .await?;
    Ok(Json(
        json!({"database": db, "name": table, "retention": retention.map(format_duration)}),
    ))
}

/// The retention a settings request for `db` asks for, once the caller may.
async fn settings(
    caller: &Caller,
    db: &str,
    headers: &HeaderMap,
    body: Body,
) -> Result<Option<Duration>, ApiError> {
    require(caller, caller.is_admin(), "admin")?;
    check_db_name(db)?;
    retention_of(&read_body(headers, body, MAX_SETTINGS_BODY).await?)
}

/// A body that must be a JSON object with no fields but `fields`; the 400s say
/// `what` the body should be, and where the JSON broke.
pub(super) fn json_object(
    body: &[u8],
    what: &str,
    fields: &[&str],
) -> Result<serde_json::Map<String, Value>, ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!(
            "{what}: {e} (line {}, column {})",
            e.line(),
            e.column()
        ))
    })?;
    let Value::Object(map) = value else {
        return Err(ApiError::bad_request(format!("{what}: not a JSON object")));
    };
    if let Some(other) = map.keys().find(|k| !fields.contains(&k.as_str())) {
        return Err(ApiError::bad_request(format!(
            "{what}: unknown field '{other}'"
        )));
    }
    Ok(map)
}

/// The `retention` of a settings body: a duration (`30d`, `12h`) or `null`.
fn retention_of(body: &[u8]) -> Result<Option<Duration>, ApiError> {
    let what = "the body is not {\"retention\": \"30d\"} (or null to keep rows forever)";
    let map = json_object(body, what, &["retention"])?;
    match map.get("retention") {
        None => Err(ApiError::bad_request(format!(
            "{what}: field 'retention' is missing"
        ))),
        Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => parse_duration(s)
            .map(Some)
            .map_err(|e| ApiError::bad_request(format!("field 'retention': {e}"))),
        Some(other) => Err(ApiError::bad_request(format!(
            "field 'retention': {other} is not a duration like \"30d\" or null"
        ))),
    }
}
