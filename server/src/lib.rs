//! The citytsdb server: configuration, the HTTP API, and the `citytsdb` binary.
//!
//! 0. `cli.rs` is `citytsdb query`, a client of a running server.
//! 1. `config.rs` resolves flags, `CITYTSDB_*` variables and the TOML file.
//! 2. `store.rs` opens the object store the `--store` URL names.
//! 3. `http/` serves API.md: `write.rs` (line protocol in), `query.rs` (SQL out,
//!    rendered by `format.rs`), `error.rs` (every error to one status and body).
//! 4. [`serve`] wires the storage engine, the query engine and the router, and
//!    shuts down cleanly on SIGINT/SIGTERM: stop accepting, finish requests in
//!    flight, flush, exit.

pub mod cli;
pub mod config;
pub mod format;
pub mod http;
pub mod store;

use std::sync::Arc;

use citytsdb_query::QueryEngine;
use citytsdb_storage::{Engine, EngineConfig};

use crate::config::ServeConfig;
use crate::http::AppState;

/// Runs the server until SIGINT or SIGTERM.
pub async fn serve(config: ServeConfig) -> Result<(), String> {
    let store = store::open(&config.store)?;
    if config.store.starts_with("memory:") {
        tracing::warn!("the memory:// store keeps segments in this process only: rows flushed to it are gone after a restart");
    }
    let storage = Engine::open(EngineConfig {
        data_dir: config.data_dir.clone(),
        store,
        flush_rows: config.flush_rows,
        flush_interval: config.flush_interval,
        max_buffer_bytes: config.max_buffer_size,
    })
    .await
    .map_err(|e| {
        format!(
            "opening the storage engine in {}: {e}",
            config.data_dir.display()
        )
    })?;
    let query =
        QueryEngine::new(storage.clone(), config.query_limits).map_err(|e| e.to_string())?;
    let state = Arc::new(AppState {
        storage: storage.clone(),
        query,
        max_body_size: config.max_body_size,
    });
    let listener = tokio::net::TcpListener::bind(config.http_bind)
        .await
        .map_err(|e| format!("binding {}: {e}", config.http_bind))?;
    tracing::info!(addr = %config.http_bind, data_dir = %config.data_dir.display(), store = %config.store, "citytsdb is serving");
    axum::serve(listener, http::router(state))
        .with_graceful_shutdown(shutdown_signal())
        .await
        .map_err(|e| format!("serving: {e}"))?;
    tracing::info!("shutting down: flushing buffered rows");
    storage
        .shutdown()
        .await
        .map_err(|e| format!("final flush failed (rows stay in the WAL): {e}"))
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
