//! The citytsdb server: configuration, the HTTP API, and the `citytsdb` binary.
//!
//! 0. `cli.rs` is `citytsdb query`, a client of a running server; `import.rs` is
//!    `citytsdb import`, which loads files into a server or a data directory.
//! 1. `config.rs` declares every setting once: flag, `CITYTSDB_*` variable and
//!    TOML key, with its default.
//! 2. `store.rs` opens the object store the `--store` URL names.
//! 3. `http/` serves API.md: `write.rs` (line protocol in), `query.rs` (SQL out,
//!    rendered by `format.rs`), `error.rs` (every error to one status and body).
//! 4. [`serve`] wires the storage engine, the ingestor (`citytsdb_ingest`, which
//!    every write goes through, MQTT's included), the query engine, the alert
//!    engine (`citytsdb_alerts`, told of every write for its fast path) and the
//!    router, and shuts down cleanly on SIGINT/SIGTERM: stop accepting, finish
//!    requests in flight, flush, exit.
//! 5. `error.rs` is every failure of this crate, kept with its source;
//!    `http/error.rs` maps them (and the other crates' errors) to statuses.

pub mod auth;
pub mod cli;
pub mod config;
pub mod error;
pub mod faults;
pub mod format;
pub mod gen;
pub mod http;
pub mod import;
pub mod metrics;
pub mod store;

use std::sync::Arc;

use citytsdb_alerts::{AlertEngine, AlertTables};
use citytsdb_ingest::{Ingestor, WriteListener};
use citytsdb_query::QueryEngine;
use citytsdb_storage::Engine;
use datafusion::arrow::record_batch::RecordBatch;

use crate::config::ServeArgs;
use crate::error::{Error, Result};
use crate::http::AppState;

/// Runs the server until SIGINT or SIGTERM.
pub async fn serve(config: ServeArgs) -> Result<()> {
    let store_url = config.store_url();
    let store_metrics = Arc::new(metrics::StoreMetrics::default());
    let store: Arc<dyn object_store::ObjectStore> = Arc::new(metrics::MeteredStore::new(
        faults::FaultyStore::from_env(store::open(&store_url)?),
        store_metrics.clone(),
    ));
    if store_url.starts_with("memory:") {
        tracing::warn!("the memory:// store keeps segments in this process only: rows flushed to it are gone after a restart");
    }
    let mqtt = config.mqtt_config()?;
    let storage = Engine::open(config.engine_config(store, &store_url))
        .await
        .map_err(|e| {
            Error::storage(
                format!(
                    "opening the storage engine in {}",
                    config.data_dir.display()
                ),
                e,
            )
        })?;
    let alert_tables = Arc::new(AlertTables::default());
    let query =
        QueryEngine::new(storage.clone(), config.query_limits())?.with_alerts(alert_tables.clone());
    let alerts = AlertEngine::open(
        &config.data_dir,
        query.clone(),
        storage.clone(),
        config.max_alert_outbox,
        &alert_tables,
    )
    .await?;
    let refresher = query.spawn_rollup_refresher(config.rollup_interval);
    let ingestor = Ingestor::new(storage.clone())
        .with_limits(config.write_limits())
        .with_listener(Arc::new(FastPath(alerts.clone())));
    let auth = match &config.admin_token {
        Some(t) => Some(Arc::new(auth::Auth::open(&config.data_dir, t)?)),
        None => None,
    };
    let state = Arc::new(AppState {
        auth,
        storage: storage.clone(),
        ingestor: ingestor.clone(),
        query,
        max_body_size: config.max_body_size,
        sweep_grace: config.sweep_grace,
        alerts: alerts.clone(),
        mqtt: mqtt.as_ref().map(|_| Arc::default()),
        store_metrics: Some(store_metrics),
    });
    let subscriber = match (mqtt, &state.mqtt) {
        (Some(m), Some(stats)) => Some(citytsdb_ingest::mqtt::spawn(
            m,
            faults::FaultyWrites::from_env(ingestor),
            config.max_body_size,
            stats.clone(),
        )),
        _ => None,
    };
    let listener = tokio::net::TcpListener::bind(config.http_bind)
        .await
        .map_err(|e| Error::io(format!("binding {}", config.http_bind), e))?;
    // The address bound: with port 0, the port the system chose.
    let addr = listener
        .local_addr()
        .map_err(|e| Error::io(format!("the address bound for {}", config.http_bind), e))?;
    // Answers are written in pieces (headers, then the body as it is produced): without
    // TCP_NODELAY, Nagle's algorithm holds the last piece until the client's delayed
    // ACK, about 40 ms on every request of a kept-alive connection.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::warn!(error = %e, "cannot set TCP_NODELAY on a connection");
        }
    });
    tracing::info!(addr = %addr, data_dir = %config.data_dir.display(), store = %store_url, "citytsdb is serving");
    axum::serve(listener, http::router(state))
        .with_graceful_shutdown(shutdown_signal())
        .await
        .map_err(|e| Error::io("serving", e))?;
    if let Some(subscriber) = subscriber {
        subscriber.stop();
    }
    alerts.shutdown().await;
    refresher.abort();
    tracing::info!("shutting down: flushing buffered rows");
    storage
        .shutdown()
        .await
        .map_err(|e| Error::storage("final flush failed (rows stay in the WAL)", e))
}

/// The alert engine's fast path, told of every write.
struct FastPath(AlertEngine);

impl WriteListener for FastPath {
    fn written(&self, db: &str, tables: &[(String, RecordBatch)]) {
        self.0.on_write(db, tables);
    }
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
