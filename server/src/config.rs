//! The settings of `citytsdb serve`, each declared once in [`ServeArgs`]: a flag,
//! a `CITYTSDB_<FLAG>` variable, and a key (in snake_case) of the TOML file given
//! by `--config`, with its default in one place, shown by `--help`.
//!
//! Flags win over variables, which win over the file, which wins over the
//! defaults. The file works by becoming the defaults: each of its keys replaces
//! the default of its setting before the flags and variables are read again, so
//! every value, wherever it comes from, goes through the same parser.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use citytsdb_ingest::mqtt::MqttConfig;
use citytsdb_ingest::Precision;
use citytsdb_storage::units::{parse_duration, parse_size, InvalidUnit};
use clap::{ArgMatches, Args, Command, FromArgMatches};

use crate::error::{Error, Result};

/// Settings of `citytsdb serve` (each also settable as `CITYTSDB_<FLAG>` and in
/// the `--config` file).
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Directory for the WAL and, by default, the segments
    #[arg(long, env = "CITYTSDB_DATA_DIR", default_value = "data")]
    pub data_dir: PathBuf,
    /// Address to serve HTTP on; without auth, a loopback address (port 0: a free
    /// port, which the "citytsdb is serving" log line names)
    #[arg(long, env = "CITYTSDB_HTTP_BIND", default_value = "127.0.0.1:8181", value_parser = bind_address)]
    pub http_bind: SocketAddr,
    /// Object store for segments: file:///path, memory://, or s3://bucket/prefix [default: file://<data-dir>/store]
    #[arg(long, env = "CITYTSDB_STORE")]
    pub store: Option<String>,
    /// TOML file with any of these settings (keys in snake_case, e.g. flush_rows = 500000)
    #[arg(long, env = "CITYTSDB_CONFIG")]
    pub config: Option<PathBuf>,
    /// Flush buffered rows to segments at least this often, e.g. 30s, 5m
    #[arg(long, env = "CITYTSDB_FLUSH_INTERVAL", default_value = "60s", value_parser = duration)]
    pub flush_interval: Duration,
    /// Flush once this many rows are buffered
    #[arg(long, env = "CITYTSDB_FLUSH_ROWS", default_value = "1000000", value_parser = at_least_one)]
    pub flush_rows: usize,
    /// Largest write body accepted, after decompression, e.g. 64MiB or 67108864
    #[arg(long, env = "CITYTSDB_MAX_BODY_SIZE", default_value = "64MiB", value_parser = size)]
    pub max_body_size: usize,
    /// Longest line of line protocol accepted, e.g. 1MiB
    #[arg(long, env = "CITYTSDB_MAX_LINE_LENGTH", default_value = "1MiB", value_parser = size)]
    pub max_line_length: usize,
    /// Longest string field value accepted, e.g. 64KiB
    #[arg(long, env = "CITYTSDB_MAX_STRING_FIELD", default_value = "64KiB", value_parser = size)]
    pub max_string_field: usize,
    /// Most tables a database may have; a line that would make one more is rejected
    #[arg(long, env = "CITYTSDB_MAX_TABLES", default_value = "10000", value_parser = at_least_one)]
    pub max_tables: usize,
    /// Most columns (time, tags, fields) a table may have
    #[arg(long, env = "CITYTSDB_MAX_COLUMNS", default_value = "1024", value_parser = at_least_one)]
    pub max_columns: usize,
    /// Most series (distinct tag sets) a table may have; a line making one more is refused
    #[arg(long, env = "CITYTSDB_MAX_SERIES_PER_TABLE", default_value = "2000000", value_parser = at_least_one)]
    pub max_series_per_table: usize,
    /// Most lines one write request may hold; a larger one is refused whole with a 413
    #[arg(long, env = "CITYTSDB_MAX_LINES_PER_REQUEST", default_value = "100000", value_parser = at_least_one)]
    pub max_lines_per_request: usize,
    /// Most tags one line may carry; a line with more is rejected
    #[arg(long, env = "CITYTSDB_MAX_TAGS", default_value = "128", value_parser = at_least_one)]
    pub max_tags: usize,
    /// Refuse writes with a 503 while more than this waits in memory for a flush, e.g. 2GiB
    #[arg(long, env = "CITYTSDB_MAX_BUFFER_SIZE", default_value = "2GiB", value_parser = size)]
    pub max_buffer_size: usize,
    /// Most notifications the alert outbox holds while their receivers are down;
    /// past it one is dropped for each new one (counted in /metrics)
    #[arg(long, env = "CITYTSDB_MAX_ALERT_OUTBOX", default_value_t = citytsdb_alerts::OUTBOX_LIMIT, value_parser = at_least_one)]
    pub max_alert_outbox: usize,
    /// A query running longer is stopped with a 408, e.g. 30s
    #[arg(long, env = "CITYTSDB_QUERY_TIMEOUT", default_value = "60s", value_parser = duration)]
    pub query_timeout: Duration,
    /// Memory one query may hold, e.g. 512MiB; past it a 413
    #[arg(long, env = "CITYTSDB_QUERY_MEMORY_LIMIT", default_value = "1GiB", value_parser = size)]
    pub query_memory_limit: usize,
    /// Memory all running queries may hold together, e.g. 8GiB; past it queries spill
    /// or get a 503
    #[arg(long, env = "CITYTSDB_QUERY_MEMORY_TOTAL", default_value = "4GiB", value_parser = size)]
    pub query_memory_total: usize,
    /// A query taking at least this long is logged (a warning with its SQL, time
    /// and request id), e.g. 1s
    #[arg(long, env = "CITYTSDB_SLOW_QUERY_TIME", default_value = "1s", value_parser = duration)]
    pub slow_query_time: Duration,
    /// Compaction cuts merged segments at about this size, e.g. 128MiB
    #[arg(long, env = "CITYTSDB_COMPACTION_TARGET_SIZE", default_value = "128MiB", value_parser = size)]
    pub compaction_target_size: usize,
    /// A day with no new segment for this long is compacted into one run, e.g. 1m
    #[arg(long, env = "CITYTSDB_COMPACTION_SETTLE", default_value = "60s", value_parser = duration)]
    pub compaction_settle: Duration,
    /// Rows per data page (every column but time) in a settled day's compacted
    /// segments: fewer make one device's read decode less, more compress better
    #[arg(long, env = "CITYTSDB_COMPACTION_PAGE_ROWS", default_value = "16384",
          value_parser = clap::value_parser!(u32).range(64..=131_072))]
    pub compaction_page_rows: u32,
    /// How often rollups are brought up to date (queries of a rollup are exact
    /// meanwhile: what is not materialised yet is computed from the raw rows), e.g. 5s
    #[arg(long, env = "CITYTSDB_ROLLUP_INTERVAL", default_value = "5s", value_parser = duration)]
    pub rollup_interval: Duration,
    /// Objects no catalog version refers to (left by an interrupted flush or
    /// compaction) are deleted once this old, e.g. 1h
    #[arg(long, env = "CITYTSDB_SWEEP_GRACE", default_value = "1h", value_parser = duration)]
    pub sweep_grace: Duration,
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
    /// Database that MQTT messages are written to
    #[arg(long, env = "CITYTSDB_MQTT_DB", default_value = "city")]
    pub mqtt_db: String,
    /// MQTT client id; the broker keeps the session (and messages sent while
    /// citytsdb is away) under it [default: citytsdb-<hash of the data directory>]
    #[arg(long, env = "CITYTSDB_MQTT_CLIENT_ID")]
    pub mqtt_client_id: Option<String>,
    /// Precision of timestamps in line-protocol MQTT payloads: ns, us, ms, s or auto
    #[arg(long, env = "CITYTSDB_MQTT_PRECISION", default_value = "ns", value_parser = mqtt_precision)]
    pub mqtt_precision: Precision,
}

fn duration(s: &str) -> std::result::Result<Duration, InvalidUnit> {
    parse_duration(s)
}

fn size(s: &str) -> std::result::Result<usize, InvalidUnit> {
    parse_size(s)
}

fn at_least_one(s: &str) -> std::result::Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("'{s}' is not a whole number")),
    }
}

fn bind_address(s: &str) -> std::result::Result<SocketAddr, String> {
    s.parse()
        .map_err(|_| format!("'{s}' is not an address like 127.0.0.1:8181"))
}

fn mqtt_precision(s: &str) -> std::result::Result<Precision, String> {
    Precision::parse_v3(s).ok_or_else(|| format!("'{s}' is not one of ns, us, ms, s, auto"))
}

impl ServeArgs {
    /// Reads the settings from `argv` (what follows `serve` on the command line),
    /// the environment and the config file, and checks them together.
    pub fn load<I, T>(argv: I) -> Result<Self>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let argv: Vec<OsString> = std::iter::once(OsString::from("serve"))
            .chain(argv.into_iter().map(Into::into))
            .collect();
        let command = Self::augment_args(Command::new("serve"));
        let first = parse(command.clone(), &argv)?;
        let args = match &first.config {
            None => first,
            Some(path) => parse(with_file_defaults(command, path)?, &argv)?,
        };
        args.check()?;
        Ok(args)
    }

    /// What no single setting's parser can tell.
    fn check(&self) -> Result<()> {
        if !self.http_bind.ip().is_loopback() && self.admin_token.is_none() {
            return Err(Error::setting(
                "http-bind",
                format!(
                    "{} is not a loopback address; without auth the server binds loopback only",
                    self.http_bind
                ),
            ));
        }
        Ok(())
    }

    /// The object store's URL: `--store`, or the `store` directory of the data
    /// directory.
    pub fn store_url(&self) -> String {
        self.store.clone().unwrap_or_else(|| {
            let dir = citytsdb_storage::paths::local_store_dir(&self.data_dir);
            format!("file://{}", absolute(&dir).display())
        })
    }

    /// The storage engine's settings over `store`, opened from `store_url`.
    pub fn engine_config(
        &self,
        store: std::sync::Arc<dyn object_store::ObjectStore>,
        store_url: &str,
    ) -> citytsdb_storage::EngineConfig {
        let mut config = citytsdb_storage::EngineConfig::new(self.data_dir.clone(), store);
        config.flush_rows = self.flush_rows;
        config.flush_interval = self.flush_interval;
        config.max_buffer_bytes = self.max_buffer_size;
        config.compaction.target_bytes = self.compaction_target_size as u64;
        config.compaction.settle = self.compaction_settle;
        config.compaction.page_rows = self.compaction_page_rows as usize;
        config.sweep_grace = self.sweep_grace;
        config.local_store = crate::store::local_dir(store_url);
        config
    }

    /// What one write may hold.
    pub fn write_limits(&self) -> citytsdb_ingest::Limits {
        citytsdb_ingest::Limits {
            max_line_bytes: self.max_line_length,
            max_string_bytes: self.max_string_field,
            max_tables: self.max_tables,
            max_columns: self.max_columns,
            max_series: self.max_series_per_table,
            max_lines: self.max_lines_per_request,
            max_tags: self.max_tags,
        }
    }

    /// Per-query limits.
    pub fn query_limits(&self) -> citytsdb_query::QueryLimits {
        citytsdb_query::QueryLimits {
            timeout: self.query_timeout,
            memory_bytes: self.query_memory_limit,
            total_memory_bytes: self.query_memory_total,
            slow: self.slow_query_time,
        }
    }

    /// The MQTT subscriber's settings, when `--mqtt` is given.
    pub fn mqtt_config(&self) -> Result<Option<MqttConfig>> {
        let Some(url) = &self.mqtt else {
            return Ok(None);
        };
        let client_id = self
            .mqtt_client_id
            .clone()
            .unwrap_or_else(|| default_client_id(&self.data_dir));
        MqttConfig::resolve(
            url,
            self.mqtt_topic.clone(),
            self.mqtt_pattern.as_deref(),
            self.mqtt_db.clone(),
            client_id,
            self.mqtt_precision,
            &self.data_dir,
        )
        .map(Some)
        .map_err(|e| Error::Invalid(e.to_string()))
    }
}

fn parse(command: Command, argv: &[OsString]) -> Result<ServeArgs> {
    let matches: ArgMatches = command
        .try_get_matches_from(argv)
        .map_err(|e| Error::Invalid(e.render().to_string().trim_end().to_string()))?;
    ServeArgs::from_arg_matches(&matches).map_err(|e| Error::Invalid(e.to_string()))
}

/// The command with the config file's values as its defaults. Every key must be
/// a setting, and every value must parse as that setting's flag would.
fn with_file_defaults(mut command: Command, path: &Path) -> Result<Command> {
    let file_error = |message: String| Error::ConfigFile {
        path: path.to_path_buf(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| file_error(e.to_string()))?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| file_error(e.to_string()))?;
    for (key, value) in table {
        let known = command
            .get_arguments()
            .find(|a| a.get_id() == key.as_str() && a.get_id() != "config")
            .cloned();
        let Some(arg) = known else {
            return Err(file_error(format!(
                "unknown field `{key}`: use the name of a serve flag in snake_case, e.g. flush_rows"
            )));
        };
        let values: Vec<String> = match value {
            toml::Value::Array(items) => items.iter().map(scalar).collect(),
            other => vec![scalar(&other)],
        };
        let flag = format!("--{}", key.replace('_', "-"));
        let mut check = Command::new("serve").arg(arg.clone().env(None::<&str>));
        check = check.no_binary_name(true);
        for v in &values {
            check
                .clone()
                .try_get_matches_from([flag.as_str(), v.as_str()])
                .map_err(|e| file_error(format!("{key}: {}", first_line(&e))))?;
        }
        command = command.mut_arg(key.as_str(), |a| a.default_values(values));
    }
    Ok(command)
}

/// A TOML value as the text a flag would carry.
fn scalar(value: &toml::Value) -> String {
    match value {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn first_line(e: &clap::Error) -> String {
    let text = e.render().to_string();
    text.lines()
        .next()
        .unwrap_or_default()
        .trim_start_matches("error: ")
        .to_string()
}

/// A client id that stays the same across restarts of the server on one data
/// directory, so the broker finds the session again.
fn default_client_id(data_dir: &Path) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(absolute(data_dir).to_string_lossy().as_bytes());
    let hex: String = digest[..6].iter().map(|b| format!("{b:02x}")).collect();
    format!("citytsdb-{hex}")
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(argv: &[&str]) -> std::result::Result<ServeArgs, String> {
        ServeArgs::load(argv).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_file_and_flags_layer() {
        let c = load(&[]).unwrap();
        assert_eq!(c.http_bind.to_string(), "127.0.0.1:8181");
        assert_eq!(c.data_dir, PathBuf::from("data"));
        assert!(c.store_url().starts_with("file://") && c.store_url().ends_with("data/store"));

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "flush_rows = 5\nhttp_bind = \"127.0.0.1:9000\"\n").unwrap();
        let config = file.to_str().unwrap();
        let c = load(&["--config", config, "--http-bind", "127.0.0.1:9001"]).unwrap();
        assert_eq!(c.flush_rows, 5);
        assert_eq!(c.http_bind.port(), 9001, "the flag wins over the file");

        std::fs::write(&file, "flush_rowz = 5\n").unwrap();
        let err = load(&["--config", config]).unwrap_err();
        assert!(err.contains("unknown field"), "{err}");
        let err = load(&["--http-bind", "0.0.0.0:1"]).unwrap_err();
        assert!(err.contains("loopback"), "{err}");
        let with_auth = load(&[
            "--http-bind",
            "0.0.0.0:1",
            "--admin-token",
            "0123456789abcdef",
        ])
        .unwrap();
        assert!(
            !with_auth.http_bind.ip().is_loopback(),
            "auth on: any address"
        );
    }

    #[test]
    fn file_values_go_through_the_flags_parsers() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        let config = file.to_str().unwrap();
        std::fs::write(
            &file,
            "flush_interval = \"5m\"\nmax_body_size = 1024\nmqtt_topic = [\"a/#\", \"b/+\"]\n",
        )
        .unwrap();
        let c = load(&["--config", config]).unwrap();
        assert_eq!(c.flush_interval, Duration::from_secs(300));
        assert_eq!(c.max_body_size, 1024);
        assert_eq!(c.mqtt_topic, vec!["a/#", "b/+"]);
        let c = load(&["--config", config, "--mqtt-topic", "c"]).unwrap();
        assert_eq!(c.mqtt_topic, vec!["c"], "the flag replaces the file's list");

        std::fs::write(&file, "flush_interval = \"5 parsecs\"\n").unwrap();
        let err = load(&["--config", config]).unwrap_err();
        assert!(
            err.contains("config file") && err.contains("flush_interval"),
            "{err}"
        );
        assert!(err.contains("unknown unit"), "{err}");
        std::fs::write(&file, "flush_rows = 0\n").unwrap();
        let err = load(&["--config", config]).unwrap_err();
        assert!(err.contains("at least 1"), "{err}");
        std::fs::write(&file, "compaction_page_rows = 8192\n").unwrap();
        assert_eq!(
            load(&["--config", config]).unwrap().compaction_page_rows,
            8192
        );
        let err = load(&["--compaction-page-rows", "10"]).unwrap_err();
        assert!(
            err.contains("compaction-page-rows") && err.contains("64..=131072"),
            "{err}"
        );
        std::fs::write(&file, "config = \"other.toml\"\n").unwrap();
        assert!(load(&["--config", config])
            .unwrap_err()
            .contains("unknown field"));
    }
}
