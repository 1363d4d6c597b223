//! Why something the server or a command of the `citytsdb` binary did failed,
//! with its source kept. `http/error.rs` is the one place these become HTTP
//! statuses; a command prints them and exits 1.

use std::path::PathBuf;

use citytsdb_alerts::RuleError;
use citytsdb_ingest::IngestError;
use citytsdb_query::QueryError;
use citytsdb_storage::StorageError;

/// A failure of the server crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A setting (flag, `CITYTSDB_*` variable or config-file key) cannot be used.
    #[error("{setting}: {message}")]
    Setting {
        /// The setting, as its flag is spelled without dashes.
        setting: String,
        /// What is wrong with it.
        message: String,
    },
    /// The config file cannot be read or has a key or value that cannot be used.
    #[error("config file {}: {message}", path.display())]
    ConfigFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A request or input is wrong; sending it again fails again.
    #[error("{0}")]
    Invalid(String),
    /// A local file or directory failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The failure.
        #[source]
        source: std::io::Error,
    },
    /// The object store a `--store` URL names cannot be opened.
    #[error("store '{url}': {message}")]
    Store {
        /// The URL.
        url: String,
        /// Why.
        message: String,
    },
    /// The storage engine failed.
    #[error("{context}: {source}")]
    Storage {
        /// What was being done.
        context: String,
        /// The failure.
        #[source]
        source: StorageError,
    },
    /// A query failed.
    #[error(transparent)]
    Query(#[from] QueryError),
    /// A write failed.
    #[error(transparent)]
    Ingest(#[from] IngestError),
    /// A rule operation failed.
    #[error(transparent)]
    Rules(#[from] RuleError),
    /// A server this command talks to could not be reached.
    #[error("cannot reach {url}: {source}")]
    Unreachable {
        /// The server.
        url: String,
        /// Why.
        #[source]
        source: Box<ureq::Error>,
    },
    /// A server this command talks to answered with an error.
    #[error("{0}")]
    Refused(String),
}

/// The server crate's results.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A setting that cannot be used.
    pub fn setting(setting: &str, message: impl std::fmt::Display) -> Self {
        Self::Setting {
            setting: setting.to_string(),
            message: message.to_string(),
        }
    }

    /// A local file or directory that failed while doing `context`.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }

    /// The storage engine failed while doing `context`.
    pub fn storage(context: impl Into<String>, source: StorageError) -> Self {
        Self::Storage {
            context: context.into(),
            source,
        }
    }
}
