//! Server configuration: flags win over `CITYTSDB_*` environment variables, which win
//! over the TOML file given by `--config`, which wins over the built-in defaults.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use serde::Deserialize;

/// Flags of `citytsdb serve` (each also settable as `CITYTSDB_<FLAG>`).
#[derive(Debug, Clone, Default, Args)]
pub struct ServeArgs {
    /// Directory for the WAL and, by default, the segments [default: ./data]
    #[arg(long, env = "CITYTSDB_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Address to serve HTTP on [default: 127.0.0.1:8181]
    #[arg(long, env = "CITYTSDB_HTTP_BIND")]
    pub http_bind: Option<String>,
    /// Object store for segments: file:///path, memory://, or s3://bucket/prefix [default: file://<data-dir>/store]
    #[arg(long, env = "CITYTSDB_STORE")]
    pub store: Option<String>,
    /// TOML file with any of these settings (keys in snake_case)
    #[arg(long, env = "CITYTSDB_CONFIG")]
    pub config: Option<PathBuf>,
    /// Flush buffered rows to segments at least this often, e.g. 30s, 5m [default: 60s]
    #[arg(long, env = "CITYTSDB_FLUSH_INTERVAL")]
    pub flush_interval: Option<String>,
    /// Flush once this many rows are buffered [default: 1000000]
    #[arg(long, env = "CITYTSDB_FLUSH_ROWS")]
    pub flush_rows: Option<usize>,
    /// Largest write body accepted, in bytes after decompression [default: 67108864]
    #[arg(long, env = "CITYTSDB_MAX_BODY_SIZE")]
    pub max_body_size: Option<usize>,
    /// Refuse writes with a 503 while more than this waits in memory for a flush, e.g. 2GiB [default: 2GiB]
    #[arg(long, env = "CITYTSDB_MAX_BUFFER_SIZE")]
    pub max_buffer_size: Option<String>,
    /// A query running longer is stopped with a 408, e.g. 30s [default: 60s]
    #[arg(long, env = "CITYTSDB_QUERY_TIMEOUT")]
    pub query_timeout: Option<String>,
    /// Memory one query may hold, e.g. 512MiB; past it a 413 [default: 1GiB]
    #[arg(long, env = "CITYTSDB_QUERY_MEMORY_LIMIT")]
    pub query_memory_limit: Option<String>,
    /// Turns auth on with this admin token (at least 16 characters); without it
    /// auth is off and the server binds loopback addresses only
    #[arg(long, env = "CITYTSDB_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Subscribe to this MQTT broker and write every message, e.g. mqtt://127.0.0.1:1883
    /// (user and password may go in the URL)
    #[arg(long, env = "CITYTSDB_MQTT")]
    pub mqtt: Option<String>,
    /// MQTT topic filter to subscribe to with QoS 1; repeat for more
    /// [default: the pattern's filter, or #]
    #[arg(long, env = "CITYTSDB_MQTT_TOPIC", value_delimiter = ',')]
    pub mqtt_topic: Vec<String>,
    /// How topics name the table and tags of JSON payloads, e.g.
    /// city/{district}/{table}/{device}
    #[arg(long, env = "CITYTSDB_MQTT_PATTERN")]
    pub mqtt_pattern: Option<String>,
    /// Database that MQTT messages are written to [default: city]
    #[arg(long, env = "CITYTSDB_MQTT_DB")]
    pub mqtt_db: Option<String>,
    /// MQTT client id; the broker keeps the session (and messages sent while
    /// citytsdb is away) under it [default: citytsdb-<hash of the data directory>]
    #[arg(long, env = "CITYTSDB_MQTT_CLIENT_ID")]
    pub mqtt_client_id: Option<String>,
    /// Precision of timestamps in line-protocol MQTT payloads: ns, us, ms, s or auto [default: ns]
    #[arg(long, env = "CITYTSDB_MQTT_PRECISION")]
    pub mqtt_precision: Option<String>,
}

/// The same settings as read from the TOML file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    data_dir: Option<PathBuf>,
    http_bind: Option<String>,
    store: Option<String>,
    flush_interval: Option<String>,
    flush_rows: Option<usize>,
    max_body_size: Option<usize>,
    query_timeout: Option<String>,
    query_memory_limit: Option<String>,
    max_buffer_size: Option<String>,
    admin_token: Option<String>,
    mqtt: Option<String>,
    mqtt_topic: Option<Vec<String>>,
    mqtt_pattern: Option<String>,
    mqtt_db: Option<String>,
    mqtt_client_id: Option<String>,
    mqtt_precision: Option<String>,
}

/// The resolved configuration of a server.
#[derive(Debug, Clone, PartialEq)]
pub struct ServeConfig {
    /// WAL (and default store) directory.
    pub data_dir: PathBuf,
    /// HTTP address.
    pub http_bind: SocketAddr,
    /// The admin token; auth is on when it is set.
    pub admin_token: Option<String>,
    /// Object store URL.
    pub store: String,
    /// Age-based flush period.
    pub flush_interval: Duration,
    /// Size-based flush trigger, in rows.
    pub flush_rows: usize,
    /// Write body limit, bytes.
    pub max_body_size: usize,
    /// Per-query limits.
    pub query_limits: citytsdb_query::QueryLimits,
    /// Most bytes buffered before writes are refused.
    pub max_buffer_size: usize,
    /// The MQTT subscriber, when `--mqtt` is given.
    pub mqtt: Option<crate::mqtt::MqttConfig>,
}

impl ServeArgs {
    /// Resolves flags and environment (already merged by clap), the config file and defaults.
    pub fn resolve(self) -> Result<ServeConfig, String> {
        let file = match &self.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        let data_dir = self
            .data_dir
            .or(file.data_dir)
            .unwrap_or_else(|| PathBuf::from("data"));
        let bind = self
            .http_bind
            .or(file.http_bind)
            .unwrap_or_else(|| "127.0.0.1:8181".to_string());
        let http_bind: SocketAddr = bind
            .parse()
            .map_err(|_| format!("http-bind: '{bind}' is not an address like 127.0.0.1:8181"))?;
        let admin_token = self.admin_token.or(file.admin_token);
        if !http_bind.ip().is_loopback() && admin_token.is_none() {
            return Err(format!(
                "http-bind: {http_bind} is not a loopback address; without auth the server binds loopback only"
            ));
        }
        let store = self.store.or(file.store).unwrap_or_else(|| {
            let dir = citytsdb_storage::paths::local_store_dir(&data_dir);
            format!("file://{}", absolute(&dir).display())
        });
        let interval = self
            .flush_interval
            .or(file.flush_interval)
            .unwrap_or_else(|| "60s".to_string());
        let flush_interval =
            parse_duration(&interval).map_err(|e| format!("flush-interval: {e}"))?;
        let flush_rows = self.flush_rows.or(file.flush_rows).unwrap_or(1_000_000);
        if flush_rows == 0 {
            return Err("flush-rows: must be at least 1".into());
        }
        let max_body_size = self
            .max_body_size
            .or(file.max_body_size)
            .unwrap_or(64 << 20);
        let timeout = self
            .query_timeout
            .or(file.query_timeout)
            .unwrap_or_else(|| "60s".to_string());
        let timeout = parse_duration(&timeout).map_err(|e| format!("query-timeout: {e}"))?;
        let memory = self
            .query_memory_limit
            .or(file.query_memory_limit)
            .unwrap_or_else(|| "1GiB".to_string());
        let memory_bytes = parse_size(&memory).map_err(|e| format!("query-memory-limit: {e}"))?;
        let query_limits = citytsdb_query::QueryLimits {
            timeout,
            memory_bytes,
        };
        let buffer = self
            .max_buffer_size
            .or(file.max_buffer_size)
            .unwrap_or_else(|| "2GiB".to_string());
        let max_buffer_size = parse_size(&buffer).map_err(|e| format!("max-buffer-size: {e}"))?;
        let mqtt = match self.mqtt.or(file.mqtt) {
            None => None,
            Some(url) => {
                let topics = if self.mqtt_topic.is_empty() {
                    file.mqtt_topic.unwrap_or_default()
                } else {
                    self.mqtt_topic
                };
                let precision = match self.mqtt_precision.or(file.mqtt_precision) {
                    None => citytsdb_ingest::Precision::Nanosecond,
                    Some(p) => citytsdb_ingest::Precision::parse_v3(&p).ok_or_else(|| {
                        format!("mqtt-precision: '{p}' is not one of ns, us, ms, s, auto")
                    })?,
                };
                let client_id = self
                    .mqtt_client_id
                    .or(file.mqtt_client_id)
                    .unwrap_or_else(|| default_client_id(&data_dir));
                Some(crate::mqtt::MqttConfig::resolve(
                    &url,
                    topics,
                    self.mqtt_pattern.or(file.mqtt_pattern).as_deref(),
                    self.mqtt_db
                        .or(file.mqtt_db)
                        .unwrap_or_else(|| "city".to_string()),
                    client_id,
                    precision,
                )?)
            }
        };
        Ok(ServeConfig {
            data_dir,
            http_bind,
            admin_token,
            store,
            flush_interval,
            flush_rows,
            max_body_size,
            query_limits,
            max_buffer_size,
            mqtt,
        })
    }
}

/// A client id that stays the same across restarts of the server on one data
/// directory, so the broker finds the session again.
fn default_client_id(data_dir: &Path) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(absolute(data_dir).to_string_lossy().as_bytes());
    let hex: String = digest[..6].iter().map(|b| format!("{b:02x}")).collect();
    format!("citytsdb-{hex}")
}

fn read_file(path: &Path) -> Result<FileConfig, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("config file {}: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| format!("config file {}: {e}", path.display()))
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Parses `500ms`, `30s`, `5m`, `1h`, `2d`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a duration like 30s or 5m"))?;
    let secs = match unit {
        "ms" => return Ok(Duration::from_millis(n)),
        "s" | "" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => {
            return Err(format!(
                "'{s}': unknown unit '{unit}' (use ms, s, m, h or d)"
            ))
        }
    };
    n.checked_mul(secs)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("'{s}' is too long"))
}

/// Parses a size: `1048576`, `512KiB`, `64MiB`, `1GiB` (also `KB`, `MB`, `GB` as powers of 1024).
pub fn parse_size(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: usize = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size like 512MiB"))?;
    let mult: usize = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "KB" | "K" => 1 << 10,
        "MiB" | "MB" | "M" => 1 << 20,
        "GiB" | "GB" | "G" => 1 << 30,
        u => {
            return Err(format!(
                "'{s}': unknown unit '{u}' (use B, KiB, MiB or GiB)"
            ))
        }
    };
    n.checked_mul(mult)
        .filter(|&b| b > 0)
        .ok_or_else(|| format!("'{s}' is not a usable size"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_file_and_flags_layer() {
        let c = ServeArgs::default().resolve().unwrap();
        assert_eq!(c.http_bind.to_string(), "127.0.0.1:8181");
        assert_eq!(c.data_dir, PathBuf::from("data"));
        assert!(c.store.starts_with("file://") && c.store.ends_with("data/store"));

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "flush_rows = 5\nhttp_bind = \"127.0.0.1:9000\"\n").unwrap();
        let args = ServeArgs {
            config: Some(file.clone()),
            http_bind: Some("127.0.0.1:9001".into()),
            ..Default::default()
        };
        let c = args.resolve().unwrap();
        assert_eq!(c.flush_rows, 5);
        assert_eq!(c.http_bind.port(), 9001, "the flag wins over the file");

        std::fs::write(&file, "flush_rowz = 5\n").unwrap();
        let err = ServeArgs {
            config: Some(file),
            ..Default::default()
        }
        .resolve()
        .unwrap_err();
        assert!(err.contains("unknown field"), "{err}");
        let err = ServeArgs {
            http_bind: Some("0.0.0.0:1".into()),
            ..Default::default()
        }
        .resolve()
        .unwrap_err();
        assert!(err.contains("loopback"), "{err}");
        let with_auth = ServeArgs {
            http_bind: Some("0.0.0.0:1".into()),
            admin_token: Some("0123456789abcdef".into()),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        assert!(
            !with_auth.http_bind.ip().is_loopback(),
            "auth on: any address"
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512KiB"), Ok(512 << 10));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("0").is_err());
        assert!(parse_size("5 furlongs").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert!(parse_duration("5 parsecs").is_err());
    }
}
