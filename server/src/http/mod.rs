//! The HTTP API of API.md: routes, shared state, and the server loop.

pub mod compat;
pub mod databases;
pub mod error;
pub mod query;
pub mod rollups;
pub mod rules;
pub mod tokens;
pub mod write;

use std::sync::Arc;

use crate::auth::{token_of, Auth, Caller};
use axum::extract::Request;
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{Method, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Extension;
use axum::{Json, Router};
use citytsdb_alerts::AlertEngine;
use citytsdb_ingest::mqtt::MqttStats;
use citytsdb_ingest::Ingestor;
use citytsdb_query::QueryEngine;
use citytsdb_storage::Engine;
use serde::Deserialize;
use serde_json::json;

use self::error::ApiError;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    /// Tokens, when auth is on.
    pub auth: Option<Arc<Auth>>,
    /// The storage engine.
    pub storage: Engine,
    /// Every write goes through it.
    pub ingestor: Ingestor,
    /// The SQL engine over it.
    pub query: QueryEngine,
    /// Largest write body, bytes after decompression.
    pub max_body_size: usize,
    /// Leftover objects younger than this are not swept.
    pub sweep_grace: std::time::Duration,
    /// The alert-rule engine.
    pub alerts: AlertEngine,
    /// The MQTT subscriber's counters, when it runs.
    pub mqtt: Option<Arc<MqttStats>>,
    /// Object-store calls, when the store is counted.
    pub store_metrics: Option<Arc<crate::metrics::StoreMetrics>>,
}

/// All routes.
pub fn router(state: Arc<AppState>) -> Router {
    // Bodies are limited by the handlers, which answer with a JSON 413.
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/api/v1/write", post(write::write_v1))
        .route("/write", post(compat::write_v1x))
        .route("/api/v2/write", post(compat::write_v2))
        .route("/api/v2/delete", post(compat::delete_v2))
        .route("/api/v3/write_lp", post(compat::write_v3))
        .route(
            "/api/v1/query",
            get(query::query_get).post(query::query_post),
        )
        .route(
            "/api/v3/query_sql",
            get(query::query_get).post(query::query_post),
        )
        .route("/api/v1/flush", post(flush))
        .route("/api/v1/compact", post(compact))
        .route("/api/v1/rules", get(rules::list).post(rules::create))
        .route(
            "/api/v1/rules/{id}",
            get(rules::get).put(rules::replace).delete(rules::delete),
        )
        .route("/api/v1/alerts", get(rules::alerts))
        .route("/api/v1/alerts/history", get(rules::history))
        .route("/api/v1/tokens", get(tokens::list).post(tokens::create))
        .route("/api/v1/databases", get(databases::list))
        .route(
            "/api/v1/databases/{db}",
            axum::routing::put(databases::put_database),
        )
        .route(
            "/api/v1/databases/{db}/tables/{table}",
            axum::routing::put(databases::put_table),
        )
        .route(
            "/api/v1/databases/{db}/rollups",
            get(rollups::list).post(rollups::create),
        )
        .route(
            "/api/v1/databases/{db}/rollups/{name}",
            get(rollups::get).delete(rollups::delete),
        )
        .route("/api/v1/tokens/{id}", axum::routing::delete(tokens::delete))
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            authenticate,
        ))
        .layer(axum::middleware::from_fn(request_id))
        .layer(DefaultBodyLimit::disable())
        .with_state(state)
}

/// `GET /metrics`: Prometheus' text format.
async fn metrics(State(app): State<Arc<AppState>>) -> Response {
    let text = crate::metrics::render(&app);
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// The header carrying a request's id, taken from the client or made here.
pub const REQUEST_ID: &str = "x-request-id";

/// Gives every request an id (the client's `X-Request-Id` if it is a short
/// printable token, else a new one), logs what happens while it is served inside a
/// `request` span with that id, method and path, and answers with the id.
async fn request_id(mut req: Request, next: Next) -> Response {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let given = req
        .headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= 64
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
        })
        .map(str::to_string);
    let id = given.unwrap_or_else(|| {
        format!(
            "{:x}-{:x}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        )
    });
    let span =
        tracing::info_span!("request", id = %id, method = %req.method(), path = %req.uri().path());
    if let Ok(v) = axum::http::HeaderValue::from_str(&id) {
        req.headers_mut().insert(REQUEST_ID, v.clone());
        let mut response = tracing::Instrument::instrument(next.run(req), span).await;
        response.headers_mut().insert(REQUEST_ID, v);
        return response;
    }
    tracing::Instrument::instrument(next.run(req), span).await
}

/// Finds the request's caller: everyone is admin while auth is off; with auth on,
/// a request without a known token gets a 401 (but `GET /health`).
async fn authenticate(
    State(app): State<Arc<AppState>>,
    mut req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let caller = match &app.auth {
        None => Caller::admin(),
        Some(_) if req.uri().path() == "/health" => Caller::admin(),
        Some(auth) => {
            let header = req
                .headers()
                .get(axum::http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok());
            let Some(token) = token_of(header, req.uri().query()) else {
                return Err(ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "auth is on: send a token as Authorization: Bearer <token>",
                ));
            };
            auth.caller(&token)
                .ok_or_else(|| ApiError::new(StatusCode::UNAUTHORIZED, "the token is not valid"))?
        }
    };
    req.extensions_mut().insert(caller);
    Ok(next.run(req).await)
}

/// A 403 unless `allowed`, naming what was needed.
pub fn require(caller: &Caller, allowed: bool, needed: &str) -> Result<(), ApiError> {
    if allowed {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "the token's scopes ({}) do not include {needed}",
                caller.describe()
            ),
        ))
    }
}

async fn health(State(app): State<Arc<AppState>>) -> Json<serde_json::Value> {
    match &app.mqtt {
        Some(stats) => Json(json!({"status": "ok", "mqtt": stats.to_json()})),
        None => Json(json!({"status": "ok"})),
    }
}

#[derive(Debug, Deserialize)]
struct FlushParams {
    db: Option<String>,
}

/// `POST /api/v1/flush`: persists every buffered row now. The `db` parameter, if
/// given, must name an existing database; the flush covers all of them, because
/// the WAL they share is released only as a whole.
async fn flush(
    State(app): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Query(p): Query<FlushParams>,
) -> Result<Json<serde_json::Value>, ApiError> {
    require(&caller, caller.is_admin(), "admin")?;
    if let Some(db) = p.db {
        if app.storage.snapshot(&db).is_none() {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!("database not found: {db}"),
            ));
        }
    }
    let stats = app.storage.flush().await?;
    Ok(Json(json!({
        "segments_written": stats.segments_written,
        "segments_replaced": stats.segments_replaced,
        "rows": stats.rows,
    })))
}

/// `POST /api/v1/compact` (admin): merges every day's segments into one run now,
/// settled or not, deletes what no version refers to any more, and sweeps
/// leftovers older than `--sweep-grace`. For operators (before a backup, say) and
/// for tests; the same runs by itself in the background.
async fn compact(
    State(app): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<serde_json::Value>, ApiError> {
    require(&caller, caller.is_admin(), "admin")?;
    let compacted = app.storage.compact(true).await?;
    let folded_tables = app.storage.fold_series(1).await?;
    let collected = app.storage.collect_garbage().await?;
    let swept = app.storage.sweep(app.sweep_grace).await?;
    Ok(Json(json!({
        "compactions": compacted.compactions,
        "segments_in": compacted.segments_in,
        "segments_out": compacted.segments_out,
        "rows": compacted.rows,
        "bytes_in": compacted.bytes_in,
        "bytes_out": compacted.bytes_out,
        "segments_expired": compacted.segments_expired,
        "series_folded": folded_tables,
        "collected": collected.collected,
        "folded": collected.folded,
        "swept": swept,
    })))
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no such endpoint: {method} {}", uri.path()),
    )
}
