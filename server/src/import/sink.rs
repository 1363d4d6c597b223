//! Where batches go: a running server's `/api/v1/write`, or a storage engine
//! opened on a data directory through the same path the server writes with.

use std::path::Path;
use std::time::Duration;

use citytsdb_ingest::convert::Batch;
use citytsdb_ingest::{check_db_name, IngestError, Ingestor, Precision, WriteOptions};
use citytsdb_storage::{Engine, EngineConfig, StorageError};

use crate::error::{Error, Result};

/// A write of a busy store (a 503, a full buffer) is tried again after these waits.
const RETRY_WAITS: [Duration; 6] = [
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(4),
    Duration::from_secs(8),
    Duration::from_secs(16),
];

/// What a write did with a batch's lines.
#[derive(Debug, Default)]
pub(super) struct Outcome {
    /// Lines rejected.
    pub rejected: usize,
    /// The rejected lines named, by their 1-based line in the batch (the server
    /// names at most 100 per write).
    pub listed: Vec<Listed>,
}

/// A rejected line of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Listed {
    pub line: usize,
    pub reason: String,
    pub text: String,
}

/// A place batches are written to, one at a time, in order.
pub(super) trait Sink {
    /// Whether batch bodies should come gzipped.
    fn wants_gzip(&self) -> bool;
    /// Writes one batch; `Err` stops the import.
    fn write(&mut self, batch: &Batch) -> Result<Outcome>;
    /// Makes everything written durable where it is not yet.
    fn finish(&mut self) -> Result<()>;
}

/// A running server, over HTTP.
pub(super) struct HttpSink {
    agent: ureq::Agent,
    base: String,
    token: Option<String>,
    db: String,
}

impl HttpSink {
    /// Checks that the server answers, so an import never starts against nothing.
    pub(super) fn connect(url: &str, token: Option<&str>, db: &str) -> Result<Self> {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(600)))
            .build()
            .into();
        let base = url.trim_end_matches('/').to_string();
        let mut health =
            agent
                .get(format!("{base}/health"))
                .call()
                .map_err(|e| Error::Unreachable {
                    url: format!("the server at {url}"),
                    source: Box::new(e),
                })?;
        if health.status() != 200 {
            let body = health.body_mut().read_to_string().unwrap_or_default();
            return Err(Error::Refused(format!(
                "{url}/health answered {}: is this a citytsdb server? {}",
                health.status().as_u16(),
                body.trim()
            )));
        }
        Ok(Self {
            agent,
            base,
            token: token.map(str::to_string),
            db: db.to_string(),
        })
    }

    fn post(&self, batch: &Batch) -> Result<(u16, Vec<u8>)> {
        let mut request = self
            .agent
            .post(format!("{}/api/v1/write", self.base))
            .query("db", &self.db)
            .query("precision", precision_param(batch.precision))
            .header("Content-Type", "text/plain; charset=utf-8");
        if batch.gzipped {
            request = request.header("Content-Encoding", "gzip");
        }
        if let Some(token) = &self.token {
            request = request.header("Authorization", &format!("Bearer {token}"));
        }
        let unreachable = |e| Error::Unreachable {
            url: format!("the server at {}", self.base),
            source: Box::new(e),
        };
        let mut response = request.send(&batch.body[..]).map_err(unreachable)?;
        let status = response.status().as_u16();
        let body = response
            .body_mut()
            .with_config()
            .limit(16 << 20)
            .read_to_vec()
            .map_err(unreachable)?;
        Ok((status, body))
    }
}

impl Sink for HttpSink {
    fn wants_gzip(&self) -> bool {
        true
    }

    fn write(&mut self, batch: &Batch) -> Result<Outcome> {
        let mut waits = RETRY_WAITS.iter();
        loop {
            let (status, body) = self.post(batch)?;
            match status {
                200..=299 => return Ok(Outcome::default()),
                400 => return partial_write(&body, batch.origins.len()),
                503 => match waits.next() {
                    Some(wait) => std::thread::sleep(*wait),
                    None => {
                        return Err(Error::Refused(format!(
                            "the server is still refusing writes after {} tries: {}",
                            RETRY_WAITS.len() + 1,
                            message(&body)
                        )))
                    }
                },
                401 => {
                    return Err(Error::Refused(format!(
                        "the server wants a token (--token or CITYTSDB_TOKEN): {}",
                        message(&body)
                    )))
                }
                403 => {
                    return Err(Error::Refused(format!(
                        "the token may not write here: {}",
                        message(&body)
                    )))
                }
                413 => {
                    return Err(Error::Refused(format!(
                    "the server refused a batch of {} lines as too large; lower --batch-lines: {}",
                    batch.origins.len(),
                    message(&body)
                )))
                }
                other => {
                    return Err(Error::Refused(format!(
                        "the server answered {other} to a write: {}",
                        message(&body)
                    )))
                }
            }
        }
    }

    fn finish(&mut self) -> Result<()> {
        Ok(())
    }
}

fn precision_param(p: Precision) -> &'static str {
    match p {
        Precision::Microsecond => "us",
        Precision::Millisecond => "ms",
        Precision::Second => "s",
        Precision::Nanosecond | Precision::Auto => "ns",
    }
}

/// The server's error message, or the body as it is.
fn message(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(body).trim().to_string())
}

/// Reads a 400: a partial write lists its rejected lines; anything else is an error
/// in the request itself (a bad database name, say), which stops the import.
fn partial_write(body: &[u8], lines: usize) -> Result<Outcome> {
    let refused = || Error::Refused(format!("the server refused a write: {}", message(body)));
    let answer: serde_json::Value = serde_json::from_slice(body).map_err(|_| refused())?;
    let Some(listed) = answer["lines"].as_array() else {
        return Err(refused());
    };
    let listed: Vec<Listed> = listed
        .iter()
        .map(|l| Listed {
            line: l["line"].as_u64().unwrap_or(0) as usize,
            reason: l["error"].as_str().unwrap_or("rejected").to_string(),
            text: l["text"].as_str().unwrap_or_default().to_string(),
        })
        .collect();
    // "partial write: N of M lines rejected" counts the lines past the 100 listed.
    let counted = answer["error"]
        .as_str()
        .and_then(|m| m.strip_prefix("partial write: "))
        .and_then(|m| m.split_once(" of "))
        .and_then(|(n, _)| n.parse::<usize>().ok());
    let rejected = counted.unwrap_or(listed.len()).max(listed.len()).min(lines);
    Ok(Outcome { rejected, listed })
}

/// A storage engine on a data directory no server is running on.
pub(super) struct DataDirSink {
    runtime: tokio::runtime::Runtime,
    ingestor: Option<Ingestor>,
    db: String,
}

impl DataDirSink {
    /// Opens the engine as `serve` would, taking the data directory's lock.
    pub(super) fn open(data_dir: &Path, store: Option<&str>, db: &str) -> Result<Self> {
        check_db_name(db)?;
        let store_url = match store {
            Some(s) => s.to_string(),
            None => {
                let dir = citytsdb_storage::paths::local_store_dir(data_dir);
                let dir = std::path::absolute(&dir).unwrap_or(dir);
                format!("file://{}", dir.display())
            }
        };
        if store_url.starts_with("memory:") {
            return Err(Error::setting(
                "--store",
                "memory:// would keep nothing once the import ends",
            ));
        }
        let store = crate::store::open(&store_url)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| Error::io("cannot start the runtime", e))?;
        let engine = runtime
            .block_on(Engine::open({
                let mut config = EngineConfig::new(data_dir.to_path_buf(), store);
                config.local_store = crate::store::local_dir(&store_url);
                config
            }))
            .map_err(|e| match e {
                StorageError::DataDirInUse(_) => Error::Invalid(format!(
                    "{e}: stop the server first, or import through it with --url"
                )),
                e => Error::storage(
                    format!("opening the data directory {}", data_dir.display()),
                    e,
                ),
            })?;
        Ok(Self {
            runtime,
            ingestor: Some(Ingestor::new(engine)),
            db: db.to_string(),
        })
    }
}

impl Sink for DataDirSink {
    fn wants_gzip(&self) -> bool {
        false
    }

    fn write(&mut self, batch: &Batch) -> Result<Outcome> {
        let Some(ingestor) = self.ingestor.as_ref() else {
            return Err(Error::Invalid("the storage engine is closed".into()));
        };
        let options = WriteOptions {
            precision: batch.precision,
            ..WriteOptions::default()
        };
        let mut waits = RETRY_WAITS.iter();
        let outcome = loop {
            let body = bytes::Bytes::copy_from_slice(&batch.body);
            match self
                .runtime
                .block_on(ingestor.write(&self.db, body, options))
            {
                Ok(outcome) => break outcome,
                Err(IngestError::Storage(StorageError::BufferFull(m))) => match waits.next() {
                    Some(wait) => std::thread::sleep(*wait),
                    None => return Err(Error::storage("writing", StorageError::BufferFull(m))),
                },
                Err(e) => return Err(e.into()),
            }
        };
        let listed: Vec<Listed> = outcome
            .rejected
            .iter()
            .map(|e| Listed {
                line: e.line,
                reason: e.message.clone(),
                text: e.text.clone(),
            })
            .collect();
        Ok(Outcome {
            rejected: listed.len(),
            listed,
        })
    }

    fn finish(&mut self) -> Result<()> {
        match self.ingestor.take() {
            Some(ingestor) => self
                .runtime
                .block_on(ingestor.storage().clone().shutdown())
                .map_err(|e| {
                    Error::storage("flushing the data directory (the rows stay in its WAL)", e)
                }),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpListener;

    /// A server on 127.0.0.1 that answers requests in turn with `answers`
    /// (status, body), closing each connection; the request lines it saw come back
    /// from the thread.
    fn scripted(
        answers: Vec<(u16, &'static str)>,
    ) -> (String, std::thread::JoinHandle<Vec<String>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let thread = std::thread::spawn(move || {
            let mut seen = Vec::new();
            for (status, body) in answers {
                let (stream, _) = listener.accept().unwrap();
                let mut reader = BufReader::new(stream);
                let mut request_line = String::new();
                reader.read_line(&mut request_line).unwrap();
                let mut length = 0;
                loop {
                    let mut header = String::new();
                    reader.read_line(&mut header).unwrap();
                    if header.trim().is_empty() {
                        break;
                    }
                    if let Some((k, v)) = header.split_once(':') {
                        if k.eq_ignore_ascii_case("content-length") {
                            length = v.trim().parse().unwrap();
                        }
                    }
                }
                let mut request_body = vec![0; length];
                reader.read_exact(&mut request_body).unwrap();
                seen.push(request_line.trim().to_string());
                let answer = format!(
                    "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                reader.get_mut().write_all(answer.as_bytes()).unwrap();
            }
            seen
        });
        (url, thread)
    }

    fn batch(lines: usize) -> Batch {
        Batch {
            body: "m v=1 1\n".repeat(lines).into_bytes(),
            origins: (1..=lines).collect(),
            precision: Precision::Second,
            ..Batch::default()
        }
    }

    #[test]
    fn a_busy_server_is_tried_again_and_other_refusals_stop_the_import() {
        let (url, server) = scripted(vec![
            (200, r#"{"status": "ok"}"#),
            (503, r#"{"error": "write buffer full"}"#),
            (204, ""),
            (401, r#"{"error": "missing token"}"#),
        ]);
        let mut sink = HttpSink::connect(&url, None, "city").unwrap();
        let outcome = sink.write(&batch(2)).unwrap();
        assert_eq!(outcome.rejected, 0);
        let err = sink.write(&batch(1)).unwrap_err().to_string();
        assert!(
            err.contains("wants a token") && err.contains("missing token"),
            "{err}"
        );
        let seen = server.join().unwrap();
        assert_eq!(seen[0], "GET /health HTTP/1.1");
        assert_eq!(seen[1], seen[2], "the same write, tried again");
        assert!(
            seen[1].starts_with("POST /api/v1/write?db=city&precision=s "),
            "{seen:?}"
        );
    }

    #[test]
    fn partial_writes_count_lines_past_the_listed_ones() {
        let body = br#"{"error": "partial write: 150 of 5000 lines rejected",
            "lines": [{"line": 17, "column": 3, "error": "bad", "text": "m x"}]}"#;
        let o = partial_write(body, 5000).unwrap();
        assert_eq!(o.rejected, 150);
        assert_eq!(
            o.listed,
            [Listed {
                line: 17,
                reason: "bad".into(),
                text: "m x".into()
            }]
        );
        let refused = partial_write(br#"{"error": "invalid database name"}"#, 1)
            .unwrap_err()
            .to_string();
        assert_eq!(refused, "the server refused a write: invalid database name");
        assert!(partial_write(b"<html>", 1)
            .unwrap_err()
            .to_string()
            .contains("<html>"));
    }
}
