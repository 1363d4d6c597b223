//! `citytsdb query`: SQL from a terminal against a running server.

use std::io::Write;
use std::time::Duration;

use clap::Args;

use crate::error::{Error, Result};

/// Flags of `citytsdb query`.
#[derive(Debug, Clone, Args)]
pub struct QueryArgs {
    /// The SQL to run
    pub sql: String,
    /// Database to query
    #[arg(long, env = "CITYTSDB_DB")]
    pub db: String,
    /// pretty, csv, json or jsonl
    #[arg(long, default_value = "pretty")]
    pub format: String,
    /// The server
    #[arg(long, env = "CITYTSDB_URL", default_value = "http://127.0.0.1:8181")]
    pub url: String,
    /// A token with read:DB, when the server has auth on
    #[arg(long, env = "CITYTSDB_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

/// Runs the query and prints the answer to stdout; an error answer becomes `Err`
/// with the server's message and, for SQL errors, where in the SQL.
pub fn query(args: &QueryArgs) -> Result<()> {
    if !matches!(args.format.as_str(), "pretty" | "csv" | "json" | "jsonl") {
        return Err(Error::setting(
            "--format",
            format!(
                "unknown format '{}': use pretty, csv, json or jsonl",
                args.format
            ),
        ));
    }
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(3600)))
        .build()
        .into();
    let url = format!("{}/api/v1/query", args.url.trim_end_matches('/'));
    let mut request = agent.get(&url);
    if let Some(token) = &args.token {
        request = request.header("Authorization", &format!("Bearer {token}"));
    }
    let mut response = request
        .query("db", &args.db)
        .query("sql", &args.sql)
        .query("format", &args.format)
        .call()
        .map_err(|e| Error::Unreachable {
            url: args.url.clone(),
            source: Box::new(e),
        })?;
    let status = response.status();
    let body = response
        .body_mut()
        .with_config()
        .limit(u64::MAX)
        .read_to_vec()
        .map_err(|e| Error::Unreachable {
            url: args.url.clone(),
            source: Box::new(e),
        })?;
    if status.is_success() {
        std::io::stdout()
            .write_all(&body)
            .map_err(|e| Error::io("writing the answer", e))?;
        return Ok(());
    }
    Err(Error::Refused(error_message(status.as_u16(), &body)))
}

/// The server's error body as one line for a terminal.
fn error_message(status: u16, body: &[u8]) -> String {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return format!("{status}: {}", String::from_utf8_lossy(body));
    };
    let message = v["error"].as_str().unwrap_or("(no message)");
    match (
        v["position"]["line"].as_u64(),
        v["position"]["column"].as_u64(),
    ) {
        (Some(l), Some(c)) => format!("{message} (line {l}, column {c})"),
        _ => message.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_bodies_read_as_one_line() {
        let body = br#"{"error": "no field tilt", "position": {"line": 1, "column": 8}}"#;
        assert_eq!(error_message(400, body), "no field tilt (line 1, column 8)");
        assert_eq!(error_message(502, b"bad gateway"), "502: bad gateway");
    }
}
