//! `/api/v1/databases/{db}/rollups`: continuous aggregates (admin makes and drops
//! them; a reader of the database lists them).

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::{Extension, Json};
use citytsdb_query::rollup::RollupError;
use citytsdb_storage::rollup::{RollupDef, RollupStatus};
use citytsdb_storage::units::{format_duration, parse_duration, rfc3339};
use serde_json::{json, Map, Value};

use super::error::ApiError;
use super::write::{check_db_name, read_body};
use super::{require, AppState};
use crate::auth::Caller;

/// Largest definition body.
const MAX_DEFINITION_BODY: usize = 64 << 10;
/// Longest rollup name.
const MAX_NAME: usize = 255;

impl From<RollupError> for ApiError {
    fn from(e: RollupError) -> Self {
        match e {
            RollupError::Query(q) => q.into(),
            RollupError::Storage(s) => s.into(),
        }
    }
}

fn describe(s: &RollupStatus) -> Value {
    let def = &s.rollup.def;
    let mut aggregates = Map::new();
    for c in &def.columns {
        let entry = aggregates
            .entry(c.field.clone())
            .or_insert_with(|| Value::Array(Vec::new()));
        if let Value::Array(a) = entry {
            a.push(Value::from(c.aggregate.name()));
        }
    }
    let dirty: Vec<Value> = s
        .dirty
        .iter()
        .map(|d| json!({"start": rfc3339(d.lo.into()), "end": rfc3339(d.hi.into())}))
        .collect();
    json!({
        "name": def.name,
        "source": def.source,
        "interval": format_duration(Duration::from_nanos(def.interval as u64)),
        "tags": def.tags,
        "aggregates": aggregates,
        "columns": def.columns.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
        "retention": s.retention.map(format_duration),
        "as_of": s.rollup.as_of,
        "materialised": s.dirty.is_empty(),
        "dirty": dirty,
    })
}

/// `GET /api/v1/databases/{db}/rollups`.
pub async fn list(
    State(app): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(db): Path<String>,
) -> Result<Json<Value>, ApiError> {
    require(&caller, caller.can_read(&db), &format!("read:{db}"))?;
    known_database(&app, &db)?;
    let rollups: Vec<Value> = app
        .storage
        .rollup_statuses(&db)
        .iter()
        .map(describe)
        .collect();
    Ok(Json(json!({ "rollups": rollups })))
}

/// `GET /api/v1/databases/{db}/rollups/{name}`.
pub async fn get(
    State(app): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path((db, name)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    require(&caller, caller.can_read(&db), &format!("read:{db}"))?;
    known_database(&app, &db)?;
    app.storage
        .rollup_statuses(&db)
        .iter()
        .find(|s| s.rollup.def.name == name)
        .map(|s| Json(describe(s)))
        .ok_or_else(|| not_found(&db, &name))
}

/// `DELETE /api/v1/databases/{db}/rollups/{name}`: the rollup and its table.
pub async fn delete(
    State(app): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path((db, name)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    require(&caller, caller.is_admin(), "admin")?;
    known_database(&app, &db)?;
    if app.storage.rollup(&db, &name).is_none() {
        return Err(not_found(&db, &name));
    }
    app.query.drop_rollup(&db, &name).await?;
    Ok(Json(json!({"dropped": name})))
}

/// `POST /api/v1/databases/{db}/rollups` with `{"name", "source", "interval",
/// "aggregates": {field: [aggregate, ...]}, "retention"}`: answers `201` with the
/// rollup. It is queryable at once; the refresher materialises it in the
/// background.
pub async fn create(
    State(app): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(db): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<impl IntoResponse, ApiError> {
    require(&caller, caller.is_admin(), "admin")?;
    check_db_name(&db)?;
    known_database(&app, &db)?;
    let body = read_body(&headers, body, MAX_DEFINITION_BODY).await?;
    let request = Request::parse(&body)?;
    let snapshot = app
        .storage
        .snapshot(&db)
        .ok_or_else(|| citytsdb_storage::StorageError::DatabaseNotFound(db.clone()))?;
    let Some(source) = snapshot.schemas.get(&request.source) else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "field 'source': table '{}' not found in database '{db}'",
                request.source
            ),
        ));
    };
    let def = RollupDef::new(
        &request.name,
        &request.source,
        source,
        request.interval,
        &request.aggregates,
    )
    .map_err(|m| match m.split_once(": ") {
        Some((path, why)) => ApiError::bad_request(format!("field '{path}': {why}")),
        None => ApiError::bad_request(m),
    })?;
    drop(snapshot);
    app.storage
        .create_rollup(&db, def, request.retention)
        .await?;
    let status = app
        .storage
        .rollup_statuses(&db)
        .into_iter()
        .find(|s| s.rollup.def.name == request.name)
        .ok_or_else(|| not_found(&db, &request.name))?;
    Ok((StatusCode::CREATED, Json(describe(&status))))
}

fn known_database(app: &AppState, db: &str) -> Result<(), ApiError> {
    if app.storage.databases().iter().any(|d| d == db) {
        Ok(())
    } else {
        Err(citytsdb_storage::StorageError::DatabaseNotFound(db.to_string()).into())
    }
}

fn not_found(db: &str, name: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("rollup '{name}' not found in database '{db}'"),
    )
}

/// A checked definition request.
#[derive(Debug)]
struct Request {
    name: String,
    source: String,
    interval: Duration,
    aggregates: Vec<(String, Vec<String>)>,
    retention: Option<Duration>,
}

impl Request {
    fn parse(body: &[u8]) -> Result<Self, ApiError> {
        let what = "the body is not a rollup ({\"name\", \"source\", \"interval\", \"aggregates\": {field: [aggregate, ...]}, \"retention\"})";
        let fields = ["name", "source", "interval", "aggregates", "retention"];
        let map = super::databases::json_object(body, what, &fields)?;
        let text = |field: &str| -> Result<String, ApiError> {
            match map.get(field) {
                Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
                Some(Value::String(_)) => {
                    Err(ApiError::bad_request(format!("field '{field}' is empty")))
                }
                Some(other) => Err(ApiError::bad_request(format!(
                    "field '{field}': {other} is not a string"
                ))),
                None => Err(ApiError::bad_request(format!(
                    "{what}: field '{field}' is missing"
                ))),
            }
        };
        let name = text("name")?;
        if name.chars().count() > MAX_NAME || name.chars().any(char::is_control) {
            return Err(ApiError::bad_request(format!(
                "field 'name': a table name has at most {MAX_NAME} characters and no control characters"
            )));
        }
        let source = text("source")?;
        if source == name {
            return Err(ApiError::bad_request(
                "field 'name': a rollup is named apart from its source",
            ));
        }
        let interval = parse_duration(&text("interval")?)
            .map_err(|e| ApiError::bad_request(format!("field 'interval': {e}")))?;
        let aggregates = match map.get("aggregates") {
            Some(Value::Object(fields)) => fields
                .iter()
                .map(|(field, list)| match list {
                    Value::Array(items) => items
                        .iter()
                        .map(|a| match a {
                            Value::String(s) => Ok(s.to_ascii_lowercase()),
                            other => Err(ApiError::bad_request(format!(
                                "field 'aggregates.{field}': {other} is not an aggregate name"
                            ))),
                        })
                        .collect::<Result<Vec<_>, _>>()
                        .map(|a| (field.clone(), a)),
                    other => Err(ApiError::bad_request(format!(
                        "field 'aggregates.{field}': {other} is not a list like [\"min\", \"max\"]"
                    ))),
                })
                .collect::<Result<Vec<_>, _>>()?,
            Some(other) => {
                return Err(ApiError::bad_request(format!(
                    "field 'aggregates': {other} is not an object like {{\"water_level_cm\": [\"max\"]}}"
                )))
            }
            None => {
                return Err(ApiError::bad_request(format!(
                    "{what}: field 'aggregates' is missing"
                )))
            }
        };
        let retention = match map.get("retention") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(
                parse_duration(s)
                    .map_err(|e| ApiError::bad_request(format!("field 'retention': {e}")))?,
            ),
            Some(other) => {
                return Err(ApiError::bad_request(format!(
                    "field 'retention': {other} is not a duration like \"3650d\" or null"
                )))
            }
        };
        Ok(Self {
            name,
            source,
            interval,
            aggregates,
            retention,
        })
    }
}
