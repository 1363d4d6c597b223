//! The MQTT subscriber: `citytsdb serve --mqtt mqtt://HOST:PORT --mqtt-topic 'city/#'`.
//!
//! 1. One connection to the broker with a persistent session (`clean_session`
//!    false, a client id stable across restarts) and QoS 1 subscriptions, so the
//!    broker keeps what arrives while citytsdb is away and sends it again after a
//!    reconnect.
//! 2. Messages are acknowledged to the broker by hand, and only once the rows they
//!    carry are durable (the write's fsync): a crash before that makes the broker
//!    deliver the message again, never lose it. A redelivered message writes the
//!    same series and timestamps again, which merges into the first write.
//! 3. A payload is line protocol as it is, or JSON — an object or an array of
//!    objects — mapped to a line by the topic pattern ([`TopicPattern`]): the
//!    pattern's `{table}` names the table, its other `{name}` levels become tags.
//! 4. Messages that arrive together are written together (one fsync for many). A bad
//!    message is counted, logged with the reason, and acknowledged (it would only
//!    fail again).
//! 5. A write the store fails (busy, stopping, its disk failing) is retried,
//!    unacknowledged, until it succeeds: the message is not at fault. A write refused
//!    as a whole ([`IngestError::is_transient`] false) is split in halves, each
//!    written again, until the messages it is refused for stand alone; those are
//!    dead-lettered (`mqtt/dead_letter.rs`: logged, counted, kept in a file) and
//!    acknowledged, so one message cannot hold up the ones after it.

mod dead_letter;

use std::fmt::Write as _;
use std::future::Future;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use citytsdb_storage::units::{now_nanos, parse_rfc3339};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, Publish, QoS};
use serde_json::{json, Value};

pub use dead_letter::{DeadLetter, DeadLetterFile, DEAD_LETTER_CAP};

use crate::escape::{push_float, push_key, push_measurement, unwritable};
use crate::ingestor::{check_db_name, IngestError, Ingestor, Outcome, WriteOptions};
use crate::line_protocol::LineError;
use crate::write::Precision;

/// At most this many messages go into one write.
const MAX_BATCH_MESSAGES: usize = 2048;
/// A write stops taking messages once their payloads reach this many bytes (a
/// batch holds at least one message, whatever its size).
const MAX_BATCH_BYTES: usize = 16 << 20;
/// Messages read from the broker and waiting for the writer.
const QUEUE_DEPTH: usize = 4096;
/// Longest wait between reconnection attempts or write retries.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// A `--mqtt*` setting that cannot be used; the message names the setting.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct MqttSettingError(String);

impl From<String> for MqttSettingError {
    fn from(message: String) -> Self {
        Self(message)
    }
}

/// The subscriber's settings, resolved from `serve`'s `--mqtt*` flags.
#[derive(Debug, Clone, PartialEq)]
pub struct MqttConfig {
    /// Broker host.
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// User name and password, from the URL's user info.
    pub credentials: Option<(String, String)>,
    /// Topic filters subscribed to with QoS 1.
    pub topics: Vec<String>,
    /// How topics map to a table and tags for JSON payloads.
    pub pattern: Option<TopicPattern>,
    /// The database every message is written to.
    pub db: String,
    /// The client id: the broker keeps the session under it.
    pub client_id: String,
    /// The precision of line-protocol payloads' timestamps.
    pub precision: Precision,
    /// Where messages no write would take are kept.
    pub dead_letters: PathBuf,
}

impl MqttConfig {
    /// Resolves the flags. `url` is `mqtt://[user:password@]host[:port]`; without
    /// topics, the pattern's filter (or `#`) is subscribed to. Dead letters go under
    /// `data_dir`.
    pub fn resolve(
        url: &str,
        topics: Vec<String>,
        pattern: Option<&str>,
        db: String,
        client_id: String,
        precision: Precision,
        data_dir: &Path,
    ) -> Result<Self, MqttSettingError> {
        let parsed = url::Url::parse(url)
            .map_err(|e| format!("mqtt: '{url}' is not a URL like mqtt://127.0.0.1:1883: {e}"))?;
        match parsed.scheme() {
            "mqtt" | "tcp" => {}
            "mqtts" | "ssl" | "tls" => {
                return Err(format!(
                    "mqtt: '{url}': TLS connections are not supported; use mqtt:// (a TLS-terminating proxy on loopback can carry it further)"
                ).into())
            }
            s => return Err(format!("mqtt: '{url}': unknown scheme '{s}', use mqtt://").into()),
        }
        let host = parsed
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| format!("mqtt: '{url}' names no host"))?
            .trim_matches(|c| c == '[' || c == ']')
            .to_string();
        let port = parsed.port().unwrap_or(1883);
        let credentials = (!parsed.username().is_empty()).then(|| {
            let decode = |s: &str| {
                percent_encoding::percent_decode_str(s)
                    .decode_utf8_lossy()
                    .into_owned()
            };
            (
                decode(parsed.username()),
                decode(parsed.password().unwrap_or("")),
            )
        });
        let pattern = pattern.map(TopicPattern::parse).transpose()?;
        let topics = if topics.is_empty() {
            vec![pattern
                .as_ref()
                .map(TopicPattern::filter)
                .unwrap_or_else(|| "#".to_string())]
        } else {
            topics
        };
        for t in &topics {
            check_filter(t)?;
        }
        if db.is_empty() || check_db_name(&db).is_err() {
            return Err(format!(
                "mqtt-db: '{db}' is not a database name (1 to 255 characters, no control characters)"
            )
            .into());
        }
        if client_id.is_empty() || client_id.len() > 65_535 {
            return Err("mqtt-client-id: must be 1 to 65535 bytes"
                .to_string()
                .into());
        }
        Ok(Self {
            host,
            port,
            credentials,
            topics,
            pattern,
            db,
            client_id,
            precision,
            dead_letters: citytsdb_storage::paths::mqtt_dead_letter_file(data_dir),
        })
    }
}

/// Checks an MQTT topic filter: `+` fills a whole level, `#` only the last.
fn check_filter(filter: &str) -> Result<(), String> {
    if filter.is_empty() {
        return Err("mqtt-topic: a topic filter cannot be empty".into());
    }
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        let wild = level.contains(['+', '#']);
        if wild && *level != "+" && *level != "#" {
            return Err(format!(
                "mqtt-topic: '{filter}': level {} ('{level}') mixes a wildcard with other characters",
                i + 1
            ));
        }
        if *level == "#" && i + 1 != levels.len() {
            return Err(format!(
                "mqtt-topic: '{filter}': '#' may only be the last level"
            ));
        }
    }
    Ok(())
}

/// One level of a topic pattern.
#[derive(Debug, Clone, PartialEq)]
enum Level {
    /// Must equal this text.
    Literal(String),
    /// Any text, captured under this name.
    Capture(String),
    /// `+`: any text, ignored.
    Any,
    /// `#`: this and any further levels, ignored.
    Rest,
}

/// Maps a topic like `city/futian/manhole/MH-001` to a table and tags through a
/// pattern like `city/{district}/{table}/{device}`: `{table}` names the table, other
/// `{name}` levels become tags, `+` skips a level and a final `#` the rest.
#[derive(Debug, Clone, PartialEq)]
pub struct TopicPattern {
    text: String,
    levels: Vec<Level>,
}

impl TopicPattern {
    /// Parses a pattern; a `{name}` must fill a whole level.
    pub fn parse(text: &str) -> Result<Self, MqttSettingError> {
        let err = |why: String| MqttSettingError(format!("mqtt-pattern: '{text}': {why}"));
        let parts: Vec<&str> = text.split('/').collect();
        let mut levels = Vec::with_capacity(parts.len());
        let mut names: Vec<&str> = Vec::new();
        for (i, part) in parts.iter().enumerate() {
            let level = match *part {
                "+" => Level::Any,
                "#" if i + 1 == parts.len() => Level::Rest,
                "#" => return Err(err("'#' may only be the last level".into())),
                p if p.starts_with('{') && p.ends_with('}') && p.len() > 2 => {
                    let name = &p[1..p.len() - 1];
                    if name.contains(['{', '}', '+', '#']) || unwritable(name).is_some() {
                        return Err(err(format!("level {} ('{p}') is not a valid name", i + 1)));
                    }
                    if names.contains(&name) {
                        return Err(err(format!("'{{{name}}}' appears twice")));
                    }
                    names.push(name);
                    Level::Capture(name.to_string())
                }
                p if p.contains(['{', '}', '+', '#']) => {
                    return Err(err(format!(
                        "level {} ('{p}'): a placeholder or wildcard must fill a whole level",
                        i + 1
                    )))
                }
                p => Level::Literal(p.to_string()),
            };
            levels.push(level);
        }
        Ok(Self {
            text: text.to_string(),
            levels,
        })
    }

    /// The topic filter that subscribes to every topic the pattern can match.
    pub fn filter(&self) -> String {
        self.levels
            .iter()
            .map(|l| match l {
                Level::Literal(s) => s.as_str(),
                Level::Capture(_) | Level::Any => "+",
                Level::Rest => "#",
            })
            .collect::<Vec<_>>()
            .join("/")
    }

    /// The captured `(name, value)` pairs of a topic, or why it does not match.
    fn captures<'t>(&self, topic: &'t str) -> Result<Vec<(&str, &'t str)>, String> {
        let mismatch = || format!("topic '{topic}' does not match the pattern '{}'", self.text);
        let mut out = Vec::new();
        let mut parts = topic.split('/');
        for level in &self.levels {
            if *level == Level::Rest {
                return Ok(out);
            }
            let part = parts.next().ok_or_else(mismatch)?;
            match level {
                Level::Literal(s) if s != part => return Err(mismatch()),
                Level::Capture(name) => out.push((name.as_str(), part)),
                _ => {}
            }
        }
        match parts.next() {
            Some(_) => Err(mismatch()),
            None => Ok(out),
        }
    }
}

/// What the subscriber has done, for `GET /health` and the log.
#[derive(Debug, Default)]
pub struct MqttStats {
    connected: AtomicBool,
    connects: AtomicU64,
    messages: AtomicU64,
    rows: AtomicU64,
    rejected_messages: AtomicU64,
    rejected_lines: AtomicU64,
    write_retries: AtomicU64,
    dead_letters: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl MqttStats {
    /// The counters as JSON.
    pub fn to_json(&self) -> Value {
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        json!({
            "connected": self.connected.load(Ordering::Relaxed),
            "connects": n(&self.connects),
            "messages": n(&self.messages),
            "rows_written": n(&self.rows),
            "rejected_messages": n(&self.rejected_messages),
            "rejected_lines": n(&self.rejected_lines),
            "write_retries": n(&self.write_retries),
            "dead_letters": n(&self.dead_letters),
            "last_error": self.last_error.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        })
    }

    /// The counters as metrics: name (without prefix), help, value.
    pub fn counters(&self) -> [(&'static str, &'static str, u64); 7] {
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        [
            (
                "mqtt_connects_total",
                "Connections made to the MQTT broker.",
                n(&self.connects),
            ),
            (
                "mqtt_messages_total",
                "MQTT messages received.",
                n(&self.messages),
            ),
            (
                "mqtt_rows_written_total",
                "Rows written from MQTT messages.",
                n(&self.rows),
            ),
            (
                "mqtt_rejected_messages_total",
                "MQTT messages rejected whole (no line could be written).",
                n(&self.rejected_messages),
            ),
            (
                "mqtt_rejected_lines_total",
                "Lines of MQTT messages rejected.",
                n(&self.rejected_lines),
            ),
            (
                "mqtt_write_retries_total",
                "MQTT writes retried because the store was busy or failing.",
                n(&self.write_retries),
            ),
            (
                "mqtt_dead_letters_total",
                "MQTT messages no write takes, kept in the dead-letter file and acknowledged.",
                n(&self.dead_letters),
            ),
        ]
    }

    /// Whether the subscriber is connected to its broker.
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    fn note_error(&self, e: String) {
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
    }
}

/// The running subscriber: its two tasks.
pub struct Subscriber {
    reader: tokio::task::JoinHandle<()>,
    writer: tokio::task::JoinHandle<()>,
}

impl Subscriber {
    /// Stops reading and writing. Messages not yet acknowledged come again from
    /// the broker on the next start.
    pub fn stop(self) {
        self.reader.abort();
        self.writer.abort();
    }
}

/// Where the subscriber's bodies are written: an [`Ingestor`], or a twin in tests.
pub trait Sink: Send + Sync + 'static {
    /// Writes a body as [`Ingestor::write`] does, with the same promise.
    fn write(
        &self,
        db: &str,
        body: Bytes,
        options: WriteOptions,
    ) -> impl Future<Output = Result<Outcome, IngestError>> + Send;
}

impl Sink for Ingestor {
    fn write(
        &self,
        db: &str,
        body: Bytes,
        options: WriteOptions,
    ) -> impl Future<Output = Result<Outcome, IngestError>> + Send {
        Ingestor::write(self, db, body, options)
    }
}

/// Starts the subscriber on the current runtime, writing through `sink`;
/// messages larger than `max_message` bytes are refused by the connection.
pub fn spawn(
    config: MqttConfig,
    sink: impl Sink,
    max_message: usize,
    stats: Arc<MqttStats>,
) -> Subscriber {
    let mut options = MqttOptions::new(config.client_id.clone(), config.host.clone(), config.port);
    options
        .set_clean_session(false)
        .set_manual_acks(true)
        .set_keep_alive(Duration::from_secs(30))
        .set_max_packet_size(max_message, 1 << 16);
    if let Some((user, password)) = &config.credentials {
        options.set_credentials(user.clone(), password.clone());
    }
    let (client, eventloop) = AsyncClient::new(options, QUEUE_DEPTH);
    let (tx, rx) = tokio::sync::mpsc::channel(QUEUE_DEPTH);
    let config = Arc::new(config);
    let writer = tokio::spawn(write_loop(
        rx,
        client.clone(),
        sink,
        config.clone(),
        stats.clone(),
    ));
    let reader = tokio::spawn(read_loop(eventloop, client, tx, config, stats));
    Subscriber { reader, writer }
}

/// Polls the connection: connects, subscribes on a new session, passes messages on,
/// and reconnects with backoff after any error.
async fn read_loop(
    mut eventloop: rumqttc::EventLoop,
    client: AsyncClient,
    tx: tokio::sync::mpsc::Sender<Publish>,
    config: Arc<MqttConfig>,
    stats: Arc<MqttStats>,
) {
    let broker = format!("{}:{}", config.host, config.port);
    let mut backoff = Duration::from_millis(100);
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                stats.connected.store(true, Ordering::Relaxed);
                stats.connects.fetch_add(1, Ordering::Relaxed);
                backoff = Duration::from_millis(100);
                tracing::info!(%broker, client_id = %config.client_id, session_present = ack.session_present, "MQTT connected");
                if !ack.session_present {
                    for topic in &config.topics {
                        if let Err(e) = client.try_subscribe(topic.clone(), QoS::AtLeastOnce) {
                            tracing::error!(%topic, error = %e, "MQTT subscribe could not be queued");
                        }
                    }
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                for code in &ack.return_codes {
                    if matches!(code, rumqttc::SubscribeReasonCode::Failure) {
                        let e = format!("the broker refused a subscription of {:?}", config.topics);
                        tracing::error!("{e}");
                        stats.note_error(e);
                    }
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                if tx.send(p).await.is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(e) => {
                let was_connected = stats.connected.swap(false, Ordering::Relaxed);
                let e = format!("MQTT connection to {broker}: {e}");
                if was_connected {
                    tracing::warn!("{e}; reconnecting");
                } else {
                    tracing::debug!("{e}; retrying in {backoff:?}");
                }
                stats.note_error(e);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// Takes messages as they come, writes those waiting together, and acknowledges
/// them once written or dead-lettered.
async fn write_loop(
    mut rx: tokio::sync::mpsc::Receiver<Publish>,
    client: AsyncClient,
    sink: impl Sink,
    config: Arc<MqttConfig>,
    stats: Arc<MqttStats>,
) {
    let dead_letters = DeadLetterFile::new(config.dead_letters.clone(), DEAD_LETTER_CAP);
    while let Some(first) = rx.recv().await {
        let batch = take_batch(first, &mut rx, MAX_BATCH_MESSAGES, MAX_BATCH_BYTES);
        stats
            .messages
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        let bodies = Bodies::build(&batch, &config, now_nanos());
        for m in &bodies.failed {
            reject(&stats, &batch[m.0], &m.1);
        }
        let mut refused = Vec::new();
        let mut written = 0;
        for (body, precision, spans) in [
            (bodies.lp, config.precision, bodies.lp_spans),
            (bodies.json, Precision::Nanosecond, bodies.json_spans),
        ] {
            if spans.is_empty() {
                continue;
            }
            let options = WriteOptions {
                precision,
                ..WriteOptions::default()
            };
            let piece = Piece {
                body: Bytes::from(body),
                spans,
            };
            let w = Writer {
                sink: &sink,
                db: &config.db,
                options,
                stats: &stats,
            };
            written += w.write_isolating(piece, &batch, &mut refused).await;
        }
        stats.rows.fetch_add(written as u64, Ordering::Relaxed);
        if !refused.is_empty() {
            let letters = dead_letter_all(&stats, &config.db, &batch, refused);
            keep(&dead_letters, letters, &stats).await;
        }
        for p in &batch {
            // A lost connection drops the acknowledgement; the broker then sends the
            // message again, which writes the same rows again.
            if let Err(e) = client.ack(p).await {
                tracing::warn!(error = %e, "MQTT acknowledgement could not be queued");
            }
        }
    }
}

/// Writes bodies of one kind (line protocol or converted JSON) to the database.
struct Writer<'a, S> {
    sink: &'a S,
    db: &'a str,
    options: WriteOptions,
    stats: &'a MqttStats,
}

impl<S: Sink> Writer<'_, S> {
    /// Writes `piece` and returns the rows written. A body refused as a whole is cut
    /// in halves, each written again, until a message refused alone is found: its
    /// index in `batch` and the reason go to `refused`. Bisecting costs two writes a
    /// level: about 2 log2(n) writes for one bad message among n.
    async fn write_isolating(
        &self,
        piece: Piece,
        batch: &[Publish],
        refused: &mut Vec<(usize, String)>,
    ) -> usize {
        let mut written = 0;
        let mut pending = vec![piece];
        while let Some(piece) = pending.pop() {
            match self.write_retrying(&piece.body).await {
                Ok(outcome) => {
                    written += outcome.rows_written();
                    note_rejected_lines(self.stats, batch, &piece.spans, &outcome.rejected);
                }
                Err(e) => match piece.halves() {
                    Some((first, second)) => {
                        tracing::debug!(
                            messages = piece.spans.0.len(),
                            "MQTT write refused ({e}); writing its halves apart"
                        );
                        pending.push(second);
                        pending.push(first);
                    }
                    None => refused.push((
                        piece.spans.0[0].message,
                        format!("the write to database '{}' was refused: {e}", self.db),
                    )),
                },
            }
        }
        written
    }

    /// Writes `body`, retrying with backoff while the store fails it
    /// ([`IngestError::is_transient`]); returns the outcome or why it was refused.
    async fn write_retrying(&self, body: &Bytes) -> Result<Outcome, IngestError> {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.sink.write(self.db, body.clone(), self.options).await {
                Err(e) if e.is_transient() => {
                    // Not the message's fault: keep it unacknowledged and try again.
                    let e = format!("MQTT write to database '{}' failed: {e}", self.db);
                    tracing::warn!("{e}; retrying in {backoff:?}");
                    self.stats.note_error(e);
                    self.stats.write_retries.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                result => return result,
            }
        }
    }
}

/// Counts and logs the lines a write rejected, by the message they came from; a
/// message whose every line was rejected is a rejected message.
fn note_rejected_lines(
    stats: &MqttStats,
    batch: &[Publish],
    spans: &Spans,
    rejected: &[LineError],
) {
    for (span, errors) in spans.attribute(rejected) {
        let msg = &batch[span.message];
        stats
            .rejected_lines
            .fetch_add(errors.len() as u64, Ordering::Relaxed);
        let first = &errors[0];
        let why = format!(
            "{} of its lines rejected; line {}, column {}: {}",
            errors.len(),
            first.line - span.first_line + 1,
            first.column,
            first.message
        );
        if errors.len() == span.lines {
            reject(stats, msg, &why);
        } else {
            tracing::warn!(topic = %msg.topic, "MQTT message partly written: {why}");
            stats.note_error(format!("topic {}: {why}", msg.topic));
        }
    }
}

/// Counts and logs each refused message, and makes its dead letter.
fn dead_letter_all(
    stats: &MqttStats,
    db: &str,
    batch: &[Publish],
    refused: Vec<(usize, String)>,
) -> Vec<DeadLetter> {
    let now = now_nanos();
    refused
        .into_iter()
        .map(|(i, reason)| {
            let msg = &batch[i];
            stats.dead_letters.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                topic = %msg.topic,
                payload = %preview(&msg.payload),
                "MQTT message dead-lettered: {reason}"
            );
            stats.note_error(format!("topic {}: dead-lettered: {reason}", msg.topic));
            DeadLetter {
                time: now,
                db: db.to_string(),
                topic: msg.topic.clone(),
                reason,
                payload: msg.payload.to_vec(),
            }
        })
        .collect()
}

/// Appends `letters` to the dead-letter file, retrying with backoff until they are
/// durable: their messages are acknowledged only after.
async fn keep(file: &DeadLetterFile, letters: Vec<DeadLetter>, stats: &MqttStats) {
    let letters = Arc::new(letters);
    let mut backoff = Duration::from_millis(100);
    loop {
        let (f, l) = (file.clone(), letters.clone());
        let e = match tokio::task::spawn_blocking(move || f.append(&l)).await {
            Ok(Ok(())) => return,
            Ok(Err(e)) => e.to_string(),
            Err(e) => e.to_string(),
        };
        let e = format!(
            "cannot append to the MQTT dead-letter file {}: {e}",
            file.path().display()
        );
        tracing::error!("{e}; retrying in {backoff:?}");
        stats.note_error(e);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// `first` and the messages already waiting after it, up to `max_messages` and
/// until their payloads reach `max_bytes`.
fn take_batch(
    first: Publish,
    rx: &mut tokio::sync::mpsc::Receiver<Publish>,
    max_messages: usize,
    max_bytes: usize,
) -> Vec<Publish> {
    let mut bytes = first.payload.len();
    let mut batch = vec![first];
    while batch.len() < max_messages && bytes < max_bytes {
        match rx.try_recv() {
            Ok(p) => {
                bytes += p.payload.len();
                batch.push(p);
            }
            Err(_) => break,
        }
    }
    batch
}

fn reject(stats: &MqttStats, msg: &Publish, why: &str) {
    stats.rejected_messages.fetch_add(1, Ordering::Relaxed);
    let preview = preview(&msg.payload);
    tracing::warn!(topic = %msg.topic, payload = %preview, "MQTT message rejected: {why}");
    stats.note_error(format!("topic {}: {why}", msg.topic));
}

/// The start of a payload, for the log.
fn preview(payload: &[u8]) -> String {
    String::from_utf8_lossy(payload).chars().take(120).collect()
}

/// Where one message's lines sit in a combined body.
#[derive(Debug, Clone, PartialEq)]
struct Span {
    message: usize,
    first_line: usize,
    lines: usize,
    bytes: Range<usize>,
}

/// A body and where its messages sit in it.
#[derive(Debug)]
struct Piece {
    body: Bytes,
    spans: Spans,
}

impl Piece {
    /// The first and second half of its messages, each a body of its own (slices
    /// of this one), or `None` for a single message.
    fn halves(&self) -> Option<(Piece, Piece)> {
        let spans = &self.spans.0;
        if spans.len() < 2 {
            return None;
        }
        let mid = spans.len() / 2;
        let (cut, line) = (spans[mid].bytes.start, spans[mid].first_line);
        let second = spans[mid..]
            .iter()
            .map(|s| Span {
                message: s.message,
                first_line: s.first_line - line + 1,
                lines: s.lines,
                bytes: s.bytes.start - cut..s.bytes.end - cut,
            })
            .collect();
        Some((
            Piece {
                body: self.body.slice(..cut),
                spans: Spans(spans[..mid].to_vec()),
            },
            Piece {
                body: self.body.slice(cut..),
                spans: Spans(second),
            },
        ))
    }
}

/// The spans of one body, in line order.
#[derive(Debug, Default)]
struct Spans(Vec<Span>);

impl Spans {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Groups rejected lines (sorted by line) by the message they came from.
    fn attribute<'e>(&self, rejected: &'e [LineError]) -> Vec<(&Span, Vec<&'e LineError>)> {
        let mut out: Vec<(&Span, Vec<&LineError>)> = Vec::new();
        for e in rejected {
            let i = self.0.partition_point(|s| s.first_line + s.lines <= e.line);
            let Some(span) = self.0.get(i) else { continue };
            match out.last_mut() {
                Some((s, errors)) if std::ptr::eq(*s, span) => errors.push(e),
                _ => out.push((span, vec![e])),
            }
        }
        out
    }
}

/// A batch of messages as two line-protocol bodies: payloads that were line
/// protocol (in the configured precision) and JSON payloads converted to lines (in
/// nanoseconds).
#[derive(Debug, Default)]
struct Bodies {
    lp: Vec<u8>,
    lp_spans: Spans,
    json: Vec<u8>,
    json_spans: Spans,
    /// Messages that could not be converted: index and reason.
    failed: Vec<(usize, String)>,
}

impl Bodies {
    fn build(batch: &[Publish], config: &MqttConfig, now: i64) -> Self {
        let mut out = Bodies::default();
        for (i, msg) in batch.iter().enumerate() {
            let payload: &[u8] = &msg.payload;
            let start = payload.iter().position(|b| !b.is_ascii_whitespace());
            let Some(start) = start else {
                out.failed.push((i, "the payload is empty".into()));
                continue;
            };
            if matches!(payload[start], b'{' | b'[') {
                match json_lines(&msg.topic, payload, config.pattern.as_ref(), now) {
                    Ok(text) => push_span(&mut out.json, &mut out.json_spans, i, text.as_bytes()),
                    Err(why) => out.failed.push((i, why)),
                }
            } else {
                push_span(&mut out.lp, &mut out.lp_spans, i, payload);
            }
        }
        out
    }
}

fn push_span(body: &mut Vec<u8>, spans: &mut Spans, message: usize, text: &[u8]) {
    let first_line = spans.0.last().map_or(1, |s| s.first_line + s.lines);
    let start = body.len();
    let mut lines = text.iter().filter(|&&b| b == b'\n').count();
    body.extend_from_slice(text);
    if text.last() != Some(&b'\n') {
        body.push(b'\n');
        lines += 1;
    }
    spans.0.push(Span {
        message,
        first_line,
        lines,
        bytes: start..body.len(),
    });
}

/// Converts a JSON payload — an object, or an array of objects — to line protocol
/// with nanosecond timestamps.
///
/// - The table is the pattern's `{table}` or the object's `table` key.
/// - Tags: the pattern's other captures, and every string value (a payload's own
///   value wins over the topic's).
/// - Fields: numbers (always floats, since JSON cannot tell `1` from `1.0`) and
///   booleans; `null` is no value.
/// - `time`: an integer or float whose unit goes by its magnitude (seconds,
///   milliseconds, microseconds or nanoseconds, like InfluxDB 3's `auto`), or an
///   RFC 3339 string; without it, the time the message arrived.
fn json_lines(
    topic: &str,
    payload: &[u8],
    pattern: Option<&TopicPattern>,
    now: i64,
) -> Result<String, String> {
    let value: Value = serde_json::from_slice(payload).map_err(|e| format!("bad JSON: {e}"))?;
    let captures = match pattern {
        Some(p) => p.captures(topic)?,
        None => Vec::new(),
    };
    let objects = match &value {
        Value::Array(items) if items.is_empty() => return Err("the JSON array is empty".into()),
        Value::Array(items) => items.iter().collect(),
        v => vec![v],
    };
    let mut out = String::new();
    for (i, object) in objects.iter().enumerate() {
        let at = if objects.len() > 1 || matches!(value, Value::Array(_)) {
            format!("element {i}: ")
        } else {
            String::new()
        };
        json_line(object, &captures, now, &mut out).map_err(|e| format!("{at}{e}"))?;
    }
    Ok(out)
}

fn json_line(
    object: &Value,
    captures: &[(&str, &str)],
    now: i64,
    out: &mut String,
) -> Result<(), String> {
    let Value::Object(map) = object else {
        return Err(format!(
            "expected a JSON object, found {}",
            json_kind(object)
        ));
    };
    let table = match captures.iter().find(|(k, _)| *k == "table") {
        Some((_, t)) => (*t).to_string(),
        None => match map.get("table") {
            Some(Value::String(t)) => t.clone(),
            Some(v) => return Err(format!("'table' must be a string, found {}", json_kind(v))),
            None => {
                return Err(
                    "no table: give the pattern a {table} level or the object a 'table' key".into(),
                )
            }
        },
    };
    if let Some(why) = unwritable(&table) {
        return Err(format!("the table name {why}"));
    }
    let mut tags: Vec<(&str, &str)> = captures
        .iter()
        .filter(|(k, _)| *k != "table")
        .map(|(k, v)| (*k, *v))
        .collect();
    let mut fields: Vec<(&str, &Value)> = Vec::new();
    let mut time = None;
    for (key, v) in map {
        match key.as_str() {
            "time" => time = Some(v),
            "table" => {}
            _ => match v {
                Value::String(s) => {
                    if let Some(why) = unwritable(key) {
                        return Err(format!("a key {why}"));
                    }
                    if let Some(why) = unwritable(s) {
                        return Err(format!("the value of '{key}' {why}"));
                    }
                    match tags.iter_mut().find(|(k, _)| *k == key) {
                        Some(t) => t.1 = s,
                        None => tags.push((key, s)),
                    }
                }
                Value::Number(_) | Value::Bool(_) => {
                    if let Some(why) = unwritable(key) {
                        return Err(format!("a key {why}"));
                    }
                    fields.push((key, v));
                }
                Value::Null => {}
                Value::Array(_) | Value::Object(_) => {
                    return Err(format!(
                        "'{key}' is {}: only strings (tags), numbers and booleans (fields) can be written",
                        json_kind(v)
                    ))
                }
            },
        }
    }
    if fields.is_empty() {
        return Err("no fields: the object has no number or boolean values".into());
    }
    for (k, v) in &tags {
        if let Some(why) = unwritable(v) {
            return Err(format!("the tag '{k}' {why}"));
        }
    }
    tags.sort_unstable();
    push_measurement(out, &table);
    for (k, v) in &tags {
        out.push(',');
        push_key(out, k);
        out.push('=');
        push_key(out, v);
    }
    for (i, (k, v)) in fields.iter().enumerate() {
        out.push(if i == 0 { ' ' } else { ',' });
        push_key(out, k);
        out.push('=');
        match v {
            Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Value::Number(n) => {
                let f = n
                    .as_f64()
                    .ok_or_else(|| format!("'{k}': the number {n} is out of range"))?;
                if !push_float(out, f) {
                    return Err(format!("'{k}': the number {n} is out of range"));
                }
            }
            _ => unreachable!("only numbers and booleans are fields"),
        }
    }
    let ns = match time {
        None | Some(Value::Null) => now,
        Some(v) => json_time(v)?,
    };
    let _ = writeln!(out, " {ns}");
    Ok(())
}

/// A JSON `time` in nanoseconds since the epoch.
fn json_time(v: &Value) -> Result<i64, String> {
    let out_of_range = || format!("'time' {v} is out of range");
    match v {
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                i.checked_mul(Precision::Auto.nanos_for(i))
                    .ok_or_else(out_of_range)
            } else {
                let f = n.as_f64().ok_or_else(out_of_range)?;
                let unit = Precision::Auto.nanos_for(f as i64) as f64;
                let ns = (f * unit).round();
                if ns.is_finite() && ns.abs() < 9.2e18 {
                    Ok(ns as i64)
                } else {
                    Err(out_of_range())
                }
            }
        }
        Value::String(s) => parse_rfc3339(s).map_err(|e| match e {
            citytsdb_storage::units::InvalidUnit::Time { reason, .. } => {
                format!("'time' \"{s}\" is not an RFC 3339 time: {reason}")
            }
            _ => out_of_range(),
        }),
        other => Err(format!(
            "'time' must be a number or an RFC 3339 string, found {}",
            json_kind(other)
        )),
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {

    #[tokio::test]
    async fn a_batch_is_bounded_in_messages_and_bytes() {
        let (tx, mut rx) = tokio::sync::mpsc::channel(64);
        let msg = |n: usize| Publish::new("t", QoS::AtLeastOnce, vec![b'x'; n]);
        for n in [10, 10, 10, 10, 10] {
            tx.send(msg(n)).await.unwrap();
        }
        // By count.
        let first = rx.recv().await.unwrap();
        assert_eq!(take_batch(first, &mut rx, 3, 1 << 20).len(), 3);
        // By bytes: messages are taken until their payloads reach the cap.
        let first = rx.recv().await.unwrap();
        assert_eq!(take_batch(first, &mut rx, 100, 15).len(), 2);
        assert!(rx.try_recv().is_err(), "nothing left");
        // One message larger than the cap is a batch of its own.
        tx.send(msg(1000)).await.unwrap();
        tx.send(msg(1)).await.unwrap();
        let first = rx.recv().await.unwrap();
        assert_eq!(take_batch(first, &mut rx, 100, 100).len(), 1);
        let first = rx.recv().await.unwrap();
        assert_eq!(take_batch(first, &mut rx, 100, 100).len(), 1);
    }
    use super::*;

    const NOW: i64 = 1_800_000_000_000_000_000;

    /// A sink that refuses every body holding `poison` as a bad request, fails the
    /// first `busy` writes as a full buffer, and keeps the bodies it wrote.
    #[derive(Default)]
    struct Twin {
        busy: AtomicU64,
        written: Mutex<Vec<String>>,
        calls: AtomicU64,
    }

    impl Sink for Twin {
        fn write(
            &self,
            _db: &str,
            body: Bytes,
            _options: WriteOptions,
        ) -> impl Future<Output = Result<Outcome, IngestError>> + Send {
            self.calls.fetch_add(1, Ordering::Relaxed);
            let text = String::from_utf8(body.to_vec()).unwrap();
            let busy = self
                .busy
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok();
            let result = if busy {
                Err(IngestError::Storage(
                    citytsdb_storage::StorageError::BufferFull("full".into()),
                ))
            } else if text.contains("poison") {
                Err(IngestError::Storage(
                    citytsdb_storage::StorageError::InvalidInput("refused".into()),
                ))
            } else {
                let (rejected, data_lines) = {
                    let parsed = crate::parse_body(text.as_bytes());
                    (parsed.rejected, parsed.data_lines)
                };
                let outcome = Outcome {
                    rejected,
                    data_lines,
                    written: true,
                };
                self.written.lock().unwrap().push(text);
                Ok(outcome)
            };
            std::future::ready(result)
        }
    }

    /// Messages as one body, with their spans.
    fn piece(payloads: &[&str]) -> (Vec<Publish>, Piece) {
        let batch: Vec<Publish> = payloads
            .iter()
            .map(|p| Publish::new("city/t", QoS::AtLeastOnce, p.as_bytes().to_vec()))
            .collect();
        let mut body = Vec::new();
        let mut spans = Spans::default();
        for (i, p) in payloads.iter().enumerate() {
            push_span(&mut body, &mut spans, i, p.as_bytes());
        }
        let body = Bytes::from(body);
        (batch, Piece { body, spans })
    }

    async fn write_all(sink: &Twin, stats: &MqttStats, payloads: &[&str]) -> (usize, Vec<usize>) {
        let (batch, piece) = piece(payloads);
        let writer = Writer {
            sink,
            db: "city",
            options: WriteOptions::default(),
            stats,
        };
        let mut refused = Vec::new();
        let rows = writer.write_isolating(piece, &batch, &mut refused).await;
        (rows, refused.into_iter().map(|(i, _)| i).collect())
    }

    #[tokio::test]
    async fn a_refused_batch_is_split_until_only_its_bad_messages_are_left() {
        let sink = Twin::default();
        let stats = MqttStats::default();
        let payloads: Vec<String> = (0..16)
            .map(|i| match i {
                5 => "m,d=poison x=5 5".to_string(),
                // A bad line in a half: still counted against its own message.
                9 => "m,d=d9 x=9 9\nm x=oops 9".to_string(),
                12 => "m,d=poison x=12 12".to_string(),
                i => format!("m,d=d{i} x={i} {i}"),
            })
            .collect();
        let payloads: Vec<&str> = payloads.iter().map(String::as_str).collect();
        let (rows, refused) = write_all(&sink, &stats, &payloads).await;
        assert_eq!(refused, vec![5, 12], "only the bad messages are refused");
        assert_eq!(rows, 14, "every line of the other messages but the bad one");
        let written = sink.written.lock().unwrap().concat();
        for i in (0..16).filter(|i| ![5, 12].contains(i)) {
            assert!(written.contains(&format!("d=d{i} ")), "message {i} written");
        }
        assert_eq!(stats.rejected_lines.load(Ordering::Relaxed), 1);
        assert_eq!(stats.rejected_messages.load(Ordering::Relaxed), 0);
        let last = stats.last_error.lock().unwrap().clone().unwrap();
        assert!(last.contains("line 2, column"), "{last}");
        // Two bad messages among 16: far fewer writes than one each.
        assert!(sink.calls.load(Ordering::Relaxed) <= 16, "{:?}", sink.calls);
        assert_eq!(stats.write_retries.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn a_busy_store_is_retried_and_nothing_is_refused() {
        let sink = Twin {
            busy: AtomicU64::new(2),
            ..Twin::default()
        };
        let stats = MqttStats::default();
        let (rows, refused) = write_all(&sink, &stats, &["m x=1 1", "m x=2 2"]).await;
        assert_eq!((rows, refused), (2, vec![]));
        assert_eq!(stats.write_retries.load(Ordering::Relaxed), 2);
        assert_eq!(
            sink.calls.load(Ordering::Relaxed),
            3,
            "the whole body, 3 times"
        );
        // A single bad message is refused without a split.
        let (rows, refused) = write_all(&sink, &stats, &["m,d=poison x=1 1"]).await;
        assert_eq!((rows, refused), (0, vec![0]));
    }

    #[test]
    fn halves_are_slices_with_lines_counted_from_one() {
        let (_, whole) = piece(&["a x=1 1", "b x=1 1\nb x=2 2\n", "c x=1 1", "d x=1 1"]);
        let (first, second) = whole.halves().unwrap();
        assert_eq!(&first.body[..], b"a x=1 1\nb x=1 1\nb x=2 2\n");
        assert_eq!(&second.body[..], b"c x=1 1\nd x=1 1\n");
        assert_eq!(second.spans.0[0].first_line, 1);
        assert_eq!(second.spans.0[1].first_line, 2);
        assert_eq!(second.spans.0[1].message, 3);
        assert_eq!(second.spans.0[1].bytes, 8..16);
        let (_, one) = piece(&["a x=1 1"]);
        assert!(one.halves().is_none());
    }

    fn pattern() -> TopicPattern {
        TopicPattern::parse("city/{district}/{table}/{device}").unwrap()
    }

    #[test]
    fn pattern_maps_topics_and_gives_its_filter() {
        let p = pattern();
        assert_eq!(p.filter(), "city/+/+/+");
        assert_eq!(
            p.captures("city/futian/manhole/MH-1").unwrap(),
            vec![
                ("district", "futian"),
                ("table", "manhole"),
                ("device", "MH-1")
            ]
        );
        assert!(p.captures("city/futian/manhole").is_err());
        assert!(p.captures("city/futian/manhole/MH-1/x").is_err());
        assert!(p.captures("town/futian/manhole/MH-1").is_err());
        let rest = TopicPattern::parse("sensors/+/{table}/#").unwrap();
        assert_eq!(rest.filter(), "sensors/+/+/#");
        assert_eq!(
            rest.captures("sensors/a/parking/x/y").unwrap(),
            vec![("table", "parking")]
        );
        for bad in [
            "city/{a}{b}",
            "city/#/x",
            "city/x{table}",
            "{a}/{a}",
            "city/{}",
        ] {
            assert!(TopicPattern::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn json_maps_to_escaped_line_protocol() {
        let payload = br#"{"device": "MH 1", "district": "Nan,Shan", "time": 1700000000123, "tilt_deg": 3, "ok": true, "note": null}"#;
        let lines = json_lines(
            "city/futian/manhole/ignored",
            payload,
            Some(&pattern()),
            NOW,
        )
        .unwrap();
        assert_eq!(
            lines,
            "manhole,device=MH\\ 1,district=Nan\\,Shan ok=true,tilt_deg=3.0 1700000000123000000\n"
        );
        let parsed = crate::parse_body(lines.as_bytes());
        assert!(parsed.rejected.is_empty());
    }

    #[test]
    fn json_times_go_by_magnitude_or_rfc3339_and_default_to_arrival() {
        let t = |v: &str| {
            let payload = format!(r#"{{"table": "t", "x": 1, "time": {v}}}"#);
            json_lines("a", payload.as_bytes(), None, NOW)
        };
        let want = " 1700000000000000000\n";
        for v in [
            "1700000000",
            "1700000000000",
            "1700000000000000",
            "1700000000000000000",
            "1700000000.0",
            "\"2023-11-14T22:13:20Z\"",
        ] {
            assert!(t(v).unwrap().ends_with(want), "{v}: {:?}", t(v));
        }
        assert!(t("null").unwrap().ends_with(&format!(" {NOW}\n")));
        assert!(t("\"yesterday\"").unwrap_err().contains("RFC 3339"));
        assert!(t("[1]").unwrap_err().contains("found an array"));
        assert!(t("1e30").unwrap_err().contains("out of range"));
    }

    #[test]
    fn arrays_give_one_line_each_and_bad_objects_say_why() {
        let payload = br#"[{"table": "parking", "device": "P1", "occupied": 3}, {"table": "parking", "device": "P2", "occupied": 4}]"#;
        let lines = json_lines("x", payload, None, NOW).unwrap();
        assert_eq!(lines.lines().count(), 2);
        let err = |p: &[u8]| json_lines("city/a/manhole/d", p, Some(&pattern()), NOW).unwrap_err();
        assert!(err(b"{not json").starts_with("bad JSON"));
        assert!(err(b"[]").contains("empty"));
        assert!(err(b"[1]").contains("element 0: expected a JSON object, found a number"));
        assert!(err(br#"{"device": "d"}"#).contains("no fields"));
        assert!(err(br#"{"x": {"y": 1}}"#).contains("'x' is an object"));
        assert!(err(br#"{"x": 1, "device": "a\nb"}"#).contains("line break"));
        assert!(err(br#"{"x": 1, "device": ""}"#).contains("is empty"));
        assert!(json_lines("a", br#"{"x": 1}"#, None, NOW)
            .unwrap_err()
            .contains("no table"));
        assert!(json_lines("town/a", br#"{"x": 1}"#, Some(&pattern()), NOW)
            .unwrap_err()
            .contains("does not match"));
    }

    #[test]
    fn rejected_lines_are_attributed_to_their_message() {
        let mut body = Vec::new();
        let mut spans = Spans::default();
        push_span(&mut body, &mut spans, 0, b"a x=1 1\na x=2 2\n");
        push_span(&mut body, &mut spans, 1, b"bad line");
        push_span(&mut body, &mut spans, 2, b"a x=3 3");
        assert_eq!(body, b"a x=1 1\na x=2 2\nbad line\na x=3 3\n");
        let parsed = crate::parse_body(&body);
        let groups = spans.attribute(&parsed.rejected);
        assert_eq!(groups.len(), 1);
        assert_eq!(groups[0].0.message, 1);
        assert_eq!(groups[0].0.first_line, 3);
        assert_eq!(groups[0].1.len(), 1);
    }

    #[test]
    fn urls_and_filters_are_checked() {
        let ok = MqttConfig::resolve(
            "mqtt://user:p%40ss@127.0.0.1:1884",
            vec![],
            Some("city/{district}/{table}/{device}"),
            "city".into(),
            "c".into(),
            Precision::Nanosecond,
            Path::new("/data"),
        )
        .unwrap();
        assert_eq!(
            ok.dead_letters,
            Path::new("/data/mqtt/dead-letter.jsonl"),
            "dead letters live in the data directory"
        );
        assert_eq!((ok.host.as_str(), ok.port), ("127.0.0.1", 1884));
        assert_eq!(ok.credentials, Some(("user".into(), "p@ss".into())));
        assert_eq!(ok.topics, vec!["city/+/+/+"]);
        let resolve = |url: &str, topic: &str| {
            MqttConfig::resolve(
                url,
                vec![topic.into()],
                None,
                "city".into(),
                "c".into(),
                Precision::Nanosecond,
                Path::new("/data"),
            )
            .map_err(|e| e.to_string())
        };
        assert_eq!(resolve("mqtt://localhost", "city/#").unwrap().port, 1883);
        assert!(resolve("mqtts://localhost", "#")
            .unwrap_err()
            .contains("TLS"));
        assert!(resolve("http://localhost", "#")
            .unwrap_err()
            .contains("scheme"));
        assert!(resolve("mqtt://localhost", "city/#/x")
            .unwrap_err()
            .contains("last level"));
        assert!(resolve("mqtt://localhost", "city/a+")
            .unwrap_err()
            .contains("wildcard"));
        // A database no write could reach is refused at start, not message by message.
        let long_db = MqttConfig::resolve(
            "mqtt://localhost",
            vec![],
            None,
            "d".repeat(256),
            "c".into(),
            Precision::Nanosecond,
            Path::new("/data"),
        );
        assert!(long_db.unwrap_err().to_string().contains("mqtt-db"));
    }
}
