//! The HTTP API of API.md: routes, shared state, and the server loop.

pub mod error;
pub mod query;
pub mod rules;
pub mod write;

use std::sync::Arc;

use crate::alerts::AlertEngine;
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{Method, StatusCode, Uri};
use axum::routing::{get, post};
use axum::{Json, Router};
use citytsdb_query::QueryEngine;
use citytsdb_storage::Engine;
use serde::Deserialize;
use serde_json::json;

use self::error::ApiError;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    /// The storage engine.
    pub storage: Engine,
    /// The SQL engine over it.
    pub query: QueryEngine,
    /// Largest write body, bytes after decompression.
    pub max_body_size: usize,
    /// The alert-rule engine.
    pub alerts: AlertEngine,
}

/// All routes.
pub fn router(state: Arc<AppState>) -> Router {
    // Bodies are limited by the handlers, which answer with a JSON 413.
    Router::new()
        .route("/health", get(health))
        .route("/api/v1/write", post(write::write_v1))
        .route(
            "/api/v1/query",
            get(query::query_get).post(query::query_post),
        )
        .route(
            "/api/v3/query_sql",
            get(query::query_get).post(query::query_post),
        )
        .route("/api/v1/flush", post(flush))
        .route("/api/v1/rules", get(rules::list).post(rules::create))
        .route(
            "/api/v1/rules/{id}",
            get(rules::get).put(rules::replace).delete(rules::delete),
        )
        .route("/api/v1/alerts", get(rules::alerts))
        .route("/api/v1/alerts/history", get(rules::history))
        .fallback(not_found)
        .layer(DefaultBodyLimit::disable())
        .with_state(state)
}

async fn health() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
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
    Query(p): Query<FlushParams>,
) -> Result<Json<serde_json::Value>, ApiError> {
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

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no such endpoint: {method} {}", uri.path()),
    )
}
