//! The one place errors become HTTP statuses and JSON bodies: the client's
//! mistakes are 4xx with what and where, a busy store is 503, ours is 500.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use citytsdb_alerts::RuleError;
use citytsdb_ingest::{Fault, IngestError};
use citytsdb_query::{Position, QueryError};
use citytsdb_storage::StorageError;
use serde_json::json;

use crate::error::Error;

/// What a 503 answer tells the client to wait, seconds.
const RETRY_AFTER_SECS: &str = "1";

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
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    /// Any status with `message`.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            position: None,
        }
    }

    /// A blocking task of a request that did not finish (a bug): 500.
    pub fn task(e: tokio::task::JoinError) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("a task of the request failed: {e}"),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            // Back-pressure or a store that is down for now: the client retries.
            tracing::warn!(status = %self.status, error = %self.message, "request refused for now");
        } else if self.status.is_server_error() {
            tracing::error!(status = %self.status, error = %self.message, "request failed");
        }
        let body = match self.position {
            Some(p) => json!({"error": self.message, "position": p}),
            None => json!({"error": self.message}),
        };
        let mut response = (self.status, Json(body)).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            // Busy (the buffer full while the store catches up, a shutdown): retry soon.
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static(RETRY_AFTER_SECS),
            );
        }
        response
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
            QueryError::Unavailable(m) => Self::new(StatusCode::SERVICE_UNAVAILABLE, m),
            QueryError::Internal(m) => Self::new(StatusCode::INTERNAL_SERVER_ERROR, m),
        }
    }
}

fn storage_status(e: &StorageError) -> StatusCode {
    match e {
        StorageError::InvalidInput(_) => StatusCode::BAD_REQUEST,
        StorageError::DatabaseNotFound(_) | StorageError::TableNotFound(_) => StatusCode::NOT_FOUND,
        e if e.is_transient() => StatusCode::SERVICE_UNAVAILABLE,
        StorageError::Fenced(_) => StatusCode::SERVICE_UNAVAILABLE,
        StorageError::Conflict(_) => StatusCode::CONFLICT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl From<StorageError> for ApiError {
    fn from(e: StorageError) -> Self {
        Self::new(storage_status(&e), e.to_string())
    }
}

impl From<citytsdb_query::delete::DeleteError> for ApiError {
    fn from(e: citytsdb_query::delete::DeleteError) -> Self {
        match e {
            citytsdb_query::delete::DeleteError::Query(q) => q.into(),
            citytsdb_query::delete::DeleteError::Storage(s) => s.into(),
        }
    }
}

impl From<IngestError> for ApiError {
    fn from(e: IngestError) -> Self {
        // The class comes from the fault, which the MQTT subscriber goes by too: a
        // 4xx is refused for good, a 503 or 500 of the store is worth retrying.
        let status = match (&e, e.fault()) {
            (IngestError::Storage(s), Fault::Client | Fault::Store) => storage_status(s),
            (IngestError::TooManyLines { .. }, _) => StatusCode::PAYLOAD_TOO_LARGE,
            (_, Fault::Client) => StatusCode::BAD_REQUEST,
            (_, Fault::Retry) => StatusCode::SERVICE_UNAVAILABLE,
            (_, Fault::Store | Fault::Bug) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self::new(status, e.to_string())
    }
}

impl From<RuleError> for ApiError {
    fn from(e: RuleError) -> Self {
        let status = match &e {
            RuleError::Invalid(_) => StatusCode::BAD_REQUEST,
            RuleError::NotFound(_) => StatusCode::NOT_FOUND,
            RuleError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self::new(status, e.to_string())
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        match e {
            Error::Query(e) => e.into(),
            Error::Ingest(e) => e.into(),
            Error::Rules(e) => e.into(),
            Error::Storage { ref source, .. } => Self::new(storage_status(source), e.to_string()),
            Error::Invalid(m) => Self::bad_request(m),
            e @ (Error::Setting { .. }
            | Error::ConfigFile { .. }
            | Error::Io { .. }
            | Error::Store { .. }
            | Error::Unreachable { .. }
            | Error::Refused(_)) => Self::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::error::ArrowError;

    use super::*;

    /// A write error's status class is its fault's: what HTTP calls the client's
    /// (4xx) is what the MQTT subscriber dead-letters.
    #[test]
    fn write_errors_status_follows_their_fault() {
        let io = || std::io::Error::other("disk");
        let errors = [
            IngestError::InvalidDatabase,
            IngestError::TooManyLines { lines: 3, max: 2 },
            IngestError::Task("panicked".into()),
            IngestError::Batches(ArrowError::ComputeError("bad".into())),
            IngestError::Storage(StorageError::InvalidInput("too large".into())),
            IngestError::Storage(StorageError::DatabaseNotFound("city".into())),
            IngestError::Storage(StorageError::TableNotFound("city.t".into())),
            IngestError::Storage(StorageError::Conflict("replaced".into())),
            IngestError::Storage(StorageError::BufferFull("full".into())),
            IngestError::Storage(StorageError::ShuttingDown),
            IngestError::Storage(StorageError::Fenced("epoch 2".into())),
            IngestError::Storage(StorageError::Io(io())),
            IngestError::Storage(StorageError::Corrupt("crc".into())),
            IngestError::Storage(StorageError::Internal("the WAL is unusable".into())),
        ];
        let full = IngestError::Storage(StorageError::Io(std::io::Error::new(
            std::io::ErrorKind::StorageFull,
            "WAL append failed",
        )));
        assert_eq!(ApiError::from(full).status, StatusCode::SERVICE_UNAVAILABLE);
        for e in errors {
            let fault = e.fault();
            let what = format!("{e:?}");
            let status = ApiError::from(e).status;
            match fault {
                Fault::Client => assert!(status.is_client_error(), "{what}: {status}"),
                Fault::Retry => assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{what}"),
                // A disk or object store failing is worth a retry; corrupt data a 500.
                Fault::Store => assert!(
                    status == StatusCode::SERVICE_UNAVAILABLE
                        || status == StatusCode::INTERNAL_SERVER_ERROR,
                    "{what}: {status}"
                ),
                Fault::Bug => assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{what}"),
            }
        }
    }
}
