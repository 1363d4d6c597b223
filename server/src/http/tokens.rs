//! `/api/v1/tokens` (admin only): create a token (its secret shown once), list
//! tokens, delete one.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::ApiError;
use super::write::read_body;
use super::{require, AppState};

/// Largest token request.
const MAX_TOKEN_BODY: usize = 64 << 10;
use crate::auth::{Auth, Caller};
use citytsdb_storage::units::{now_nanos, rfc3339};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewToken {
    #[serde(default)]
    name: String,
    scopes: Vec<String>,
}

fn auth(app: &AppState, caller: &Caller) -> Result<Arc<Auth>, ApiError> {
    require(caller, caller.is_admin(), "admin")?;
    app.auth.clone().ok_or_else(|| {
        ApiError::bad_request("auth is off: start the server with --admin-token to use tokens")
    })
}

/// Runs a change of the token file on a blocking thread.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> crate::error::Result<T> + Send + 'static,
) -> Result<T, ApiError> {
    Ok(tokio::task::spawn_blocking(f)
        .await
        .map_err(ApiError::task)??)
}

/// `POST /api/v1/tokens` with `{"name", "scopes": [...]}`: 201 with the secret.
pub async fn create(
    State(app): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let auth = auth(&app, &caller)?;
    let body = read_body(&headers, body, MAX_TOKEN_BODY).await?;
    let req: NewToken = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(format!(
            "the body is not {{\"name\": ..., \"scopes\": [...]}}: {e} (line {}, column {})",
            e.line(),
            e.column()
        ))
    })?;
    let now = rfc3339(i128::from(now_nanos()));
    let (token, secret) = blocking(move || auth.create(&req.name, &req.scopes, now)).await?;
    Ok((
        StatusCode::CREATED,
        Json(
            json!({"id": token.id, "name": token.name, "scopes": token.scopes,
                    "created_at": token.created_at, "token": secret}),
        ),
    )
        .into_response())
}

/// `GET /api/v1/tokens`: every token, without secrets.
pub async fn list(
    State(app): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Value>, ApiError> {
    let auth = auth(&app, &caller)?;
    let tokens: Vec<Value> = auth
        .list()
        .into_iter()
        .map(
            |t| json!({"id": t.id, "name": t.name, "scopes": t.scopes, "created_at": t.created_at}),
        )
        .collect();
    Ok(Json(Value::Array(tokens)))
}

/// `DELETE /api/v1/tokens/{id}`: 204.
pub async fn delete(
    State(app): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let auth = auth(&app, &caller)?;
    let deleted = {
        let id = id.clone();
        blocking(move || auth.delete(&id)).await?
    };
    if deleted {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no token with id {id}"),
        ))
    }
}
