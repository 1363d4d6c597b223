//! The storage crate's errors, separated by whose fault they are.

use datafusion::arrow::error::ArrowError;
use datafusion::parquet::errors::ParquetError;

/// Result of a storage operation.
pub type Result<T, E = StorageError> = std::result::Result<T, E>;

/// Why a storage operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The caller asked for something invalid (a bad name, a schema conflict).
    #[error("{0}")]
    InvalidInput(String),
    /// The named database does not exist.
    #[error("database not found: {0}")]
    DatabaseNotFound(String),
    /// The named table does not exist (`db.table`).
    #[error("table not found: {0}")]
    TableNotFound(String),
    /// Durable data failed a check: a bad checksum, an unreadable segment or catalog.
    #[error("corrupt data: {0}")]
    Corrupt(String),
    /// The local disk (WAL) failed.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// The object store failed.
    #[error("object store error: {0}")]
    ObjectStore(#[from] object_store::Error),
    /// Arrow failed to build or convert a batch.
    #[error("arrow error: {0}")]
    Arrow(#[from] ArrowError),
    /// Parquet failed to encode or decode a segment.
    #[error("parquet error: {0}")]
    Parquet(#[from] ParquetError),
    /// Too many rows wait in memory for a flush; the write is refused, not lost.
    #[error("write buffer full: {0}")]
    BufferFull(String),
    /// Another process (a server, an import) has the data directory open.
    #[error("data directory {0} is in use by another citytsdb process")]
    DataDirInUse(String),
    /// Another writer claimed the store with a newer epoch: this one may not commit
    /// any more (its rows stay in its WAL).
    #[error("fenced: {0}")]
    Fenced(String),
    /// A change computed against one catalog version no longer fits the newest one
    /// (a compaction whose inputs were replaced meanwhile); nothing was committed.
    #[error("conflict: {0}")]
    Conflict(String),
    /// The engine is shutting down and takes no more writes.
    #[error("the storage engine is shutting down")]
    ShuttingDown,
    /// A bug: an invariant of the engine did not hold.
    #[error("internal error: {0}")]
    Internal(String),
}

impl StorageError {
    /// Whether the same request may succeed later without change: the engine is
    /// busy or stopping, or the local disk or the object store failed (a full disk,
    /// an unreachable store). Such an error is answered 503 with `Retry-After`.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::BufferFull(_) | Self::ShuttingDown | Self::Io(_) | Self::ObjectStore(_)
        )
    }
}
