//! The alert API: `/api/v1/rules` (register, list, read, replace, delete) and
//! `/api/v1/alerts` (active instances and their history).

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::Value;

use super::error::ApiError;
use super::write::read_body;
use super::{require, AppState};

/// Largest rule definition.
const MAX_RULE_BODY: usize = 256 << 10;
use crate::auth::Caller;
use axum::Extension;
use citytsdb_alerts::rule::RuleSpec;
use citytsdb_alerts::RuleError;
use citytsdb_storage::units::parse_rfc3339;

fn spec(body: &[u8]) -> Result<RuleSpec, ApiError> {
    RuleSpec::from_json(body)
        .map_err(|e| ApiError::bad_request(format!("the rule is not valid JSON of a rule: {e}")))
}

/// `POST /api/v1/rules`: 201 with the stored rule.
pub async fn create(
    State(app): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let body = read_body(&headers, body, MAX_RULE_BODY).await?;
    let spec = spec(&body)?;
    may_manage(&caller, &spec.department)?;
    let rule = app.alerts.create(spec).await?;
    Ok((StatusCode::CREATED, Json(rule)).into_response())
}

/// `GET /api/v1/rules[?department=]`.
pub async fn list(
    State(app): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Query(p): Query<HashMap<String, String>>,
) -> Json<Value> {
    let rules = app
        .alerts
        .list(p.get("department").map(String::as_str))
        .into_iter()
        .filter(|r| caller.can_manage(r["department"].as_str().unwrap_or("")))
        .collect();
    Json(Value::Array(rules))
}

fn may_manage(caller: &Caller, department: &str) -> Result<(), ApiError> {
    require(
        caller,
        caller.can_manage(department),
        &format!("rules:{department}"),
    )
}

/// The rule's department must be one the caller manages.
fn may_manage_rule(app: &AppState, caller: &Caller, id: &str) -> Result<(), ApiError> {
    let department = app
        .alerts
        .department_of(id)
        .ok_or_else(|| ApiError::from(RuleError::NotFound(id.to_string())))?;
    may_manage(caller, &department)
}

/// `GET /api/v1/rules/{id}`.
pub async fn get(
    State(app): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    may_manage_rule(&app, &caller, &id)?;
    app.alerts
        .get(&id)
        .map(Json)
        .ok_or_else(|| RuleError::NotFound(id).into())
}

/// `PUT /api/v1/rules/{id}`: replaces the definition, keeps the id.
pub async fn replace(
    State(app): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    may_manage_rule(&app, &caller, &id)?;
    let body = read_body(&headers, body, MAX_RULE_BODY).await?;
    let spec = spec(&body)?;
    may_manage(&caller, &spec.department)?;
    Ok(Json(app.alerts.replace(&id, spec).await?))
}

/// `DELETE /api/v1/rules/{id}`: 204.
pub async fn delete(
    State(app): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    may_manage_rule(&app, &caller, &id)?;
    app.alerts.delete(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /api/v1/alerts?state=pending|firing&department=&rule=`.
pub async fn alerts(
    State(app): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Query(p): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let state = p.get("state").map(String::as_str).filter(|s| !s.is_empty());
    if let Some(s) = state {
        if s != "pending" && s != "firing" {
            return Err(ApiError::bad_request(format!(
                "invalid state '{s}': use pending or firing"
            )));
        }
    }
    let department = p
        .get("department")
        .map(String::as_str)
        .filter(|s| !s.is_empty());
    let rule = p.get("rule").map(String::as_str).filter(|s| !s.is_empty());
    let alerts = app
        .alerts
        .alerts(state, department, rule)
        .into_iter()
        .filter(|a| caller.can_manage(a["department"].as_str().unwrap_or("")))
        .collect();
    Ok(Json(Value::Array(alerts)))
}

fn time_param(p: &HashMap<String, String>, name: &str) -> Result<Option<i64>, ApiError> {
    let Some(v) = p.get(name).filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    parse_rfc3339(v).map(Some).map_err(|_| {
        ApiError::bad_request(format!(
            "invalid {name} '{v}': use an RFC 3339 time such as 2025-12-01T00:00:00Z"
        ))
    })
}

/// `GET /api/v1/alerts/history?since=&until=&department=`: state changes, oldest first.
pub async fn history(
    State(app): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Query(p): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let since = time_param(&p, "since")?;
    let until = time_param(&p, "until")?;
    let department = p
        .get("department")
        .map(String::as_str)
        .filter(|s| !s.is_empty());
    let events = app
        .alerts
        .history(since, until, department)
        .into_iter()
        .filter(|e| caller.can_manage(e["department"].as_str().unwrap_or("")))
        .collect();
    Ok(Json(Value::Array(events)))
}
