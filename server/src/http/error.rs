//! The one place errors become HTTP statuses and JSON bodies.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use citytsdb_query::{Position, QueryError};
use citytsdb_storage::StorageError;
use serde_json::json;

/// An error answer: a status and a message, with a position for SQL errors.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// What is wrong.
    pub message: String,
    /// Where in the SQL, when known.
    pub position: Option<Position>,
}

impl ApiError {
    /// A 400 with `message`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            position: None,
        }
    }

    /// Any status with `message`.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            position: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(status = %self.status, error = %self.message, "request failed");
        }
        let body = match self.position {
            Some(p) => json!({"error": self.message, "position": p}),
            None => json!({"error": self.message}),
        };
        (self.status, Json(body)).into_response()
    }
}

impl From<QueryError> for ApiError {
    fn from(e: QueryError) -> Self {
        match e {
            QueryError::Invalid { message, position } => Self {
                status: StatusCode::BAD_REQUEST,
                message,
                position,
            },
            QueryError::DatabaseNotFound(db) => {
                Self::new(StatusCode::NOT_FOUND, format!("database not found: {db}"))
            }
            QueryError::ResourcesExhausted(m) => Self::new(StatusCode::PAYLOAD_TOO_LARGE, m),
            QueryError::Timeout(m) => Self::new(StatusCode::REQUEST_TIMEOUT, m),
            QueryError::Internal(m) => Self::new(StatusCode::INTERNAL_SERVER_ERROR, m),
        }
    }
}

impl From<StorageError> for ApiError {
    fn from(e: StorageError) -> Self {
        let status = match &e {
            StorageError::InvalidInput(_) => StatusCode::BAD_REQUEST,
            StorageError::DatabaseNotFound(_) => StatusCode::NOT_FOUND,
            StorageError::ShuttingDown | StorageError::BufferFull(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self::new(status, e.to_string())
    }
}
