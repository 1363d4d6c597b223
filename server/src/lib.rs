//! The citytsdb server: configuration, the HTTP API, and the `citytsdb` binary.
//!
//! 0. `cli.rs` is `citytsdb query`, a client of a running server; `import.rs` is
//!    `citytsdb import`, which loads files into a server or a data directory.
//! 1. `config.rs` resolves flags, `CITYTSDB_*` variables and the TOML file.
//! 2. `store.rs` opens the object store the `--store` URL names.
//! 3. `http/` serves API.md: `write.rs` (line protocol in), `query.rs` (SQL out,
//!    rendered by `format.rs`), `error.rs` (every error to one status and body).
//! 4. `alerts/` is the alert-rule engine: rules, their evaluation, the fast path on
//!    written batches, and notifications from a persisted outbox.
//! 5. [`serve`] wires the storage engine, the query engine and the router, and
//!    shuts down cleanly on SIGINT/SIGTERM: stop accepting, finish requests in
//!    flight, flush, exit.
//! 6. `mqtt.rs` subscribes to a broker when `--mqtt` is given and writes its
//!    messages through the same path as HTTP writes.

pub mod alerts;
pub mod auth;
pub mod cli;
pub mod config;
pub mod format;
pub mod gen;
pub mod http;
pub mod import;
pub mod mqtt;
pub mod store;

use std::sync::Arc;

use citytsdb_query::QueryEngine;
use citytsdb_storage::{Engine, EngineConfig};

use crate::alerts::{AlertEngine, AlertTables};
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
    let alert_tables = Arc::new(AlertTables::default());
    let query = QueryEngine::new(storage.clone(), config.query_limits)
        .map_err(|e| e.to_string())?
        .with_alerts(alert_tables.clone());
    let alerts = AlertEngine::open(
        &config.data_dir,
        query.clone(),
        storage.clone(),
        &alert_tables,
    )
    .await
    .map_err(|e| format!("opening the alert engine: {e}"))?;
    let auth = match &config.admin_token {
        Some(t) => Some(Arc::new(auth::Auth::open(&config.data_dir, t)?)),
        None => None,
    };
    let state = Arc::new(AppState {
        auth,
        storage: storage.clone(),
        query,
        max_body_size: config.max_body_size,
        alerts: alerts.clone(),
        mqtt: config.mqtt.as_ref().map(|_| Arc::default()),
    });
    let subscriber = match (&config.mqtt, &state.mqtt) {
        (Some(m), Some(stats)) => Some(mqtt::spawn(m.clone(), state.clone(), stats.clone())),
        _ => None,
    };
    let listener = tokio::net::TcpListener::bind(config.http_bind)
        .await
        .map_err(|e| format!("binding {}: {e}", config.http_bind))?;
    // Answers are written in pieces (headers, then the body as it is produced): without
    // TCP_NODELAY, Nagle's algorithm holds the last piece until the client's delayed
    // ACK, about 40 ms on every request of a kept-alive connection.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::warn!(error = %e, "cannot set TCP_NODELAY on a connection");
        }
    });
    tracing::info!(addr = %config.http_bind, data_dir = %config.data_dir.display(), store = %config.store, "citytsdb is serving");
    axum::serve(listener, http::router(state))
        .with_graceful_shutdown(shutdown_signal())
        .await
        .map_err(|e| format!("serving: {e}"))?;
    if let Some(subscriber) = subscriber {
        subscriber.stop();
    }
    alerts.shutdown();
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
