//! Alert latency under load: how long after a write's acknowledgement the webhook
//! of a fast-path rule hears of the alert it raised, while the city workload is
//! being written at a steady rate (DESIGN.md target: p99 < 50 ms).
//!
//! The benchmark starts the real server binary on a temporary data directory and
//! a free port of 127.0.0.1, runs its own webhook receiver (std networking, one
//! thread per connection), registers a plain-filter rule
//! (`SELECT device, tilt_deg FROM manhole WHERE tilt_deg > 80`, which the fast
//! path checks against every written batch), and starts several writer threads
//! posting 5,000-line batches of the city workload paced to the target rate. The
//! workload never tilts a cover past 40 degrees, so the load raises no alert.
//!
//! Each probe then writes one reading of a new device `probe-<n>` tilted 85
//! degrees, notes when the `204` arrives, and waits (at most 10 s) until the
//! receiver has read a "firing" notification naming that device. The latency is
//! the time between the two instants, both taken in this process.
//!
//! The server's log gives a breakdown: its "alert state changed" line for the
//! probe's fingerprint is written after the batch check and before the state is
//! persisted and posted, which splits the latency into "ack -> state change"
//! (fast-path queue and check) and "state change -> receipt" (persisting the
//! state and outbox, waking the delivery thread, the POST).
//!
//! ```text
//! target/debug/alert_latency [--bin PATH] [--probes N] [--rate ROWS_PER_S]
//!     [--writers N] [--batch LINES] [--duration SECS] [--warmup SECS] [--csv FILE]
//! ```
//!
//! Everything is bounded in time, and the server is killed when the benchmark
//! ends, panics included.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use citytsdb_workload::manhole::{self as workload, Workload, DAY};
use serde_json::{json, Value};

/// Database written to.
const DB: &str = "city";
/// The rule's threshold; the workload's tilt stays below 40.05 degrees.
const THRESHOLD_DEG: f64 = 80.0;
/// The probes' tilt.
const PROBE_TILT_DEG: f64 = 85.0;
/// How long a probe waits for its notification before it counts as lost.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between a probe's receipt and the next probe.
const PROBE_GAP: Duration = Duration::from_millis(50);
/// The DESIGN.md target for the p99, in milliseconds.
const TARGET_P99_MS: f64 = 50.0;
/// How long the server may take to answer `/health` after it was started.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
/// Timeout of every HTTP call the benchmark makes.
const HTTP_TIMEOUT: Duration = Duration::from_secs(60);
/// Devices and time steps of the pre-generated load: 10,000 covers, 60
/// readings each over one day (plus the workload's retries and late readings).
const LOAD_DEVICES: u32 = 10_000;
const LOAD_INTERVAL_SECS: u32 = 1_440;
/// Largest request head and body the receiver reads.
const MAX_HEAD: usize = 64 * 1024;
const MAX_BODY: usize = 16 * 1024 * 1024;
/// How often receiver threads look at their stop flag.
const POLL: Duration = Duration::from_millis(100);

const USAGE: &str = "\
usage: alert_latency [--bin PATH] [--probes N] [--rate ROWS_PER_S] [--writers N]
                     [--batch LINES] [--duration SECS] [--warmup SECS] [--csv FILE]

  --bin PATH       server binary (default: target/release/citytsdb if it exists,
                   else target/debug/citytsdb)
  --probes N       alert probes (default 200)
  --rate R         background load in rows/s, 0 for none (default 100000)
  --writers N      concurrent load writers (default 4)
  --batch LINES    lines per load batch (default 5000)
  --duration SECS  longest the probing may last; probing stops early when it
                   is over (default 45)
  --warmup SECS    load before the first probe (default 3)
  --csv FILE       also write every probe's timings to FILE";

/// Command-line options.
#[derive(Debug, Clone)]
struct Options {
    bin: PathBuf,
    probes: usize,
    rate: u64,
    writers: usize,
    batch: usize,
    duration: Duration,
    warmup: Duration,
    csv: Option<PathBuf>,
}

fn parse_args() -> Result<Options, String> {
    let default_bin = ["target/release/citytsdb", "target/debug/citytsdb"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("target/debug/citytsdb"));
    let mut o = Options {
        bin: default_bin,
        probes: 200,
        rate: 100_000,
        writers: 4,
        batch: 5_000,
        duration: Duration::from_secs(45),
        warmup: Duration::from_secs(3),
        csv: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        if flag == "--help" || flag == "-h" {
            println!("{USAGE}");
            std::process::exit(0);
        }
        let (name, inline) = match flag.split_once('=') {
            Some((n, v)) => (n.to_string(), Some(v.to_string())),
            None => (flag.clone(), None),
        };
        let value = match inline.or_else(|| args.next()) {
            Some(v) => v,
            None => return Err(format!("{name} needs a value\n{USAGE}")),
        };
        let number = |v: &str| -> Result<u64, String> {
            v.replace('_', "")
                .parse::<u64>()
                .map_err(|e| format!("{name}: '{v}' is not a whole number: {e}"))
        };
        let seconds = |v: &str| -> Result<Duration, String> {
            v.trim_end_matches('s')
                .parse::<f64>()
                .ok()
                .filter(|s| s.is_finite() && *s >= 0.0)
                .map(Duration::from_secs_f64)
                .ok_or_else(|| format!("{name}: '{v}' is not a number of seconds"))
        };
        match name.as_str() {
            "--bin" => o.bin = PathBuf::from(value),
            "--probes" => o.probes = number(&value)? as usize,
            "--rate" => o.rate = number(&value)?,
            "--writers" => o.writers = (number(&value)? as usize).max(1),
            "--batch" => o.batch = (number(&value)? as usize).max(1),
            "--duration" => o.duration = seconds(&value)?,
            "--warmup" => o.warmup = seconds(&value)?,
            "--csv" => o.csv = Some(PathBuf::from(value)),
            _ => return Err(format!("unknown option {name}\n{USAGE}")),
        }
    }
    Ok(o)
}

fn main() {
    let options = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(&options) {
        eprintln!("alert_latency: {e}");
        std::process::exit(1);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn unix_nanos(t: SystemTime) -> i128 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_nanos() as i128,
        Err(e) => -(e.duration().as_nanos() as i128),
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(HTTP_TIMEOUT))
        .http_status_as_error(false)
        .build()
        .into()
}

/// Status and body text of a response.
fn answer(mut response: ureq::http::Response<ureq::Body>) -> Result<(u16, String), String> {
    let status = response.status().as_u16();
    let body = response
        .body_mut()
        .with_config()
        .limit(MAX_BODY as u64)
        .read_to_vec()
        .map_err(|e| format!("reading an answer: {e}"))?;
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

// ---------------------------------------------------------------------------
// The server under test.

/// The running server; killed (and its data directory removed) when dropped.
struct Server {
    child: Child,
    base: String,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn start(bin: &Path) -> Result<Server, String> {
        if !bin.is_file() {
            return Err(format!(
                "server binary {} not found: build it with `cargo build --workspace --all-targets` or pass --bin",
                bin.display()
            ));
        }
        let dir = tempfile::Builder::new()
            .prefix("citytsdb-alert-latency-")
            .tempdir()
            .map_err(|e| format!("creating a temporary directory: {e}"))?;
        let data = dir.path().join("data");
        let log = dir.path().join("server.log");
        let log_file =
            fs::File::create(&log).map_err(|e| format!("creating {}: {e}", log.display()))?;
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("finding a port: {e}"))?;
            l.local_addr()
                .map_err(|e| format!("finding a port: {e}"))?
                .port()
        };
        let bind = format!("127.0.0.1:{port}");
        let mut command = Command::new(bin);
        command
            .arg("serve")
            .arg("--data-dir")
            .arg(&data)
            .arg("--http-bind")
            .arg(&bind)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log_file))
            .env("NO_COLOR", "1")
            .env("CITYTSDB_LOG", "info");
        // Settings of the caller's environment (a token, a config file) would
        // change what is measured.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("CITYTSDB_") && key != "CITYTSDB_LOG" {
                command.env_remove(&key);
            }
        }
        let child = command
            .spawn()
            .map_err(|e| format!("starting {}: {e}", bin.display()))?;
        let mut server = Server {
            child,
            base: format!("http://{bind}"),
            log,
            _dir: dir,
        };
        let health: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(2)))
            .http_status_as_error(false)
            .build()
            .into();
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            if let Ok(Some(status)) = server.child.try_wait() {
                return Err(format!(
                    "the server exited at startup ({status}); its log:\n{}",
                    server.log_tail(40)
                ));
            }
            if let Ok(r) = health.get(format!("{}/health", server.base)).call() {
                if r.status().as_u16() == 200 {
                    return Ok(server);
                }
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the server did not answer /health within {STARTUP_TIMEOUT:?}; its log:\n{}",
                    server.log_tail(40)
                ));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn log_tail(&self, lines: usize) -> String {
        let text = self.log_text();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    fn write_url(&self) -> String {
        format!("{}/api/v1/write?db={DB}&precision=s", self.base)
    }
}

// ---------------------------------------------------------------------------
// The webhook receiver.

/// What a probe's notification brought.
#[derive(Debug, Clone, Copy)]
struct Receipt {
    /// When the request had been read whole.
    at: Instant,
    /// The same moment on the wall clock (to compare with the server's log).
    wall: SystemTime,
}

#[derive(Default)]
struct Received {
    /// First "firing" receipt per device label.
    firing: HashMap<String, Receipt>,
    /// Fingerprint of each device's alert.
    fingerprints: HashMap<String, String>,
    /// Requests read.
    requests: u64,
    /// Firing alerts naming a device that is not a probe (the load must raise none).
    unexpected: u64,
    /// Bodies that were not webhook JSON.
    malformed: u64,
}

struct ReceiverShared {
    received: Mutex<Received>,
    arrived: Condvar,
    stop: AtomicBool,
    connections: Mutex<Vec<JoinHandle<()>>>,
}

/// A minimal HTTP/1.1 webhook receiver on 127.0.0.1; stopped when dropped.
struct Receiver {
    addr: SocketAddr,
    shared: Arc<ReceiverShared>,
    acceptor: Option<JoinHandle<()>>,
}

impl Receiver {
    fn start() -> Result<Receiver, String> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .map_err(|e| format!("binding the webhook receiver: {e}"))?;
        let addr = listener
            .local_addr()
            .map_err(|e| format!("binding the webhook receiver: {e}"))?;
        let shared = Arc::new(ReceiverShared {
            received: Mutex::new(Received::default()),
            arrived: Condvar::new(),
            stop: AtomicBool::new(false),
            connections: Mutex::new(Vec::new()),
        });
        let acceptor = {
            let shared = Arc::clone(&shared);
            thread::Builder::new()
                .name("receiver-accept".into())
                .spawn(move || {
                    for stream in listener.incoming() {
                        if shared.stop.load(Ordering::SeqCst) {
                            return;
                        }
                        let Ok(stream) = stream else {
                            thread::sleep(POLL);
                            continue;
                        };
                        let conn_shared = Arc::clone(&shared);
                        let handle =
                            thread::Builder::new()
                                .name("receiver-conn".into())
                                .spawn(move || {
                                    let _ = serve_connection(stream, &conn_shared);
                                });
                        let mut connections = lock(&shared.connections);
                        connections.retain(|c| !c.is_finished());
                        if let Ok(h) = handle {
                            connections.push(h);
                        }
                    }
                })
                .map_err(|e| format!("starting the webhook receiver: {e}"))?
        };
        Ok(Receiver {
            addr,
            shared,
            acceptor: Some(acceptor),
        })
    }

    fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    /// Waits until a firing notification for `device` has arrived, at most
    /// until `deadline`.
    fn wait_for(&self, device: &str, deadline: Instant) -> Option<Receipt> {
        let mut received = lock(&self.shared.received);
        loop {
            if let Some(r) = received.firing.get(device) {
                return Some(*r);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            received = self
                .shared
                .arrived
                .wait_timeout(received, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn lock(&self) -> MutexGuard<'_, Received> {
        lock(&self.shared.received)
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the acceptor out of accept().
        let woken = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1)).is_ok();
        if let Some(acceptor) = self.acceptor.take() {
            if woken {
                let _ = acceptor.join();
            }
        }
        let connections = std::mem::take(&mut *lock(&self.shared.connections));
        for c in connections {
            let _ = c.join();
        }
    }
}

/// Reads requests off one connection until it closes or the receiver stops.
fn serve_connection(mut stream: TcpStream, shared: &ReceiverShared) -> io::Result<()> {
    stream.set_read_timeout(Some(POLL))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    stream.set_nodelay(true)?;
    let mut buf: Vec<u8> = Vec::with_capacity(16 * 1024);
    let mut chunk = [0u8; 16 * 1024];
    // Appends what arrives to `buf`; `false` once the peer closed or the
    // receiver stops.
    let mut fill = |stream: &mut TcpStream, buf: &mut Vec<u8>| -> io::Result<bool> {
        loop {
            if shared.stop.load(Ordering::SeqCst) {
                return Ok(false);
            }
            match stream.read(&mut chunk) {
                Ok(0) => return Ok(false),
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    return Ok(true);
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    };
    loop {
        // The head.
        let head_end = loop {
            if let Some(i) = find(&buf, b"\r\n\r\n") {
                break i + 4;
            }
            if buf.len() > MAX_HEAD || !fill(&mut stream, &mut buf)? {
                return Ok(());
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        buf.drain(..head_end);
        let mut lines = head.split("\r\n");
        let request_line = lines.next().unwrap_or_default().to_string();
        let mut length = 0usize;
        let mut chunked = false;
        let mut close = request_line.ends_with("HTTP/1.0");
        let mut expect_continue = false;
        for line in lines {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
            match name.as_str() {
                "content-length" => length = value.parse().unwrap_or(usize::MAX),
                "transfer-encoding" => chunked = value.to_ascii_lowercase().contains("chunked"),
                "connection" => close = value.eq_ignore_ascii_case("close"),
                "expect" => expect_continue = value.eq_ignore_ascii_case("100-continue"),
                _ => {}
            }
        }
        if expect_continue {
            stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
        }
        // The body.
        let body = if chunked {
            let mut body = Vec::new();
            loop {
                let line_end = loop {
                    if let Some(i) = find(&buf, b"\r\n") {
                        break i;
                    }
                    if !fill(&mut stream, &mut buf)? {
                        return Ok(());
                    }
                };
                let size_text = String::from_utf8_lossy(&buf[..line_end]).into_owned();
                let size_hex = size_text.split(';').next().unwrap_or_default().trim();
                let Ok(size) = usize::from_str_radix(size_hex, 16) else {
                    return respond(&mut stream, 400, true);
                };
                if body.len() + size > MAX_BODY {
                    return respond(&mut stream, 413, true);
                }
                if size == 0 {
                    // Trailers, up to the empty line.
                    let end = loop {
                        if let Some(i) = find(&buf[line_end..], b"\r\n\r\n") {
                            break line_end + i + 4;
                        }
                        if !fill(&mut stream, &mut buf)? {
                            return Ok(());
                        }
                    };
                    buf.drain(..end);
                    break body;
                }
                let need = line_end + 2 + size + 2;
                while buf.len() < need {
                    if !fill(&mut stream, &mut buf)? {
                        return Ok(());
                    }
                }
                body.extend_from_slice(&buf[line_end + 2..line_end + 2 + size]);
                buf.drain(..need);
            }
        } else {
            if length > MAX_BODY {
                return respond(&mut stream, 413, true);
            }
            while buf.len() < length {
                if !fill(&mut stream, &mut buf)? {
                    return Ok(());
                }
            }
            buf.drain(..length).collect()
        };
        let receipt = Receipt {
            at: Instant::now(),
            wall: SystemTime::now(),
        };
        record(shared, &body, receipt);
        respond(&mut stream, 200, close)?;
        if close {
            return Ok(());
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn respond(stream: &mut TcpStream, status: u16, close: bool) -> io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        _ => "Content Too Large",
    };
    let connection = if close { "close" } else { "keep-alive" };
    let answer = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Length: 0\r\nConnection: {connection}\r\n\r\n"
    );
    stream.write_all(answer.as_bytes())?;
    stream.flush()
}

/// Records the firing alerts of one webhook message.
fn record(shared: &ReceiverShared, body: &[u8], receipt: Receipt) {
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    let mut received = lock(&shared.received);
    received.requests += 1;
    let Some(alerts) = parsed
        .as_ref()
        .and_then(|v| v.get("alerts"))
        .and_then(Value::as_array)
    else {
        received.malformed += 1;
        return;
    };
    for alert in alerts {
        if alert.get("status").and_then(Value::as_str) != Some("firing") {
            continue;
        }
        let Some(device) = alert
            .pointer("/labels/device")
            .and_then(Value::as_str)
            .map(str::to_string)
        else {
            continue;
        };
        if !device.starts_with("probe-") {
            received.unexpected += 1;
            continue;
        }
        if let Some(fp) = alert.get("fingerprint").and_then(Value::as_str) {
            received
                .fingerprints
                .entry(device.clone())
                .or_insert_with(|| fp.to_string());
        }
        received.firing.entry(device).or_insert(receipt);
    }
    shared.arrived.notify_all();
}

// ---------------------------------------------------------------------------
// The background load.

/// One load batch: its lines without their timestamps, and the timestamps.
struct PoolBatch {
    /// Every line up to and including the space before its timestamp.
    text: String,
    /// (end of the line's part in `text`, timestamp in seconds) per line.
    lines: Vec<(usize, i64)>,
}

/// Pre-generated load batches, replayed with timestamps one day later on each
/// pass so that every row written is a new one.
struct Pool {
    batches: Vec<PoolBatch>,
    period_secs: i64,
}

impl Pool {
    fn generate(batch_lines: usize) -> Pool {
        let w = Workload {
            devices: LOAD_DEVICES,
            days: 1,
            interval_secs: LOAD_INTERVAL_SECS,
            ..Workload::default()
        };
        let writes = w.writes();
        let batches = writes
            .chunks(batch_lines)
            .map(|chunk| {
                let mut text = String::with_capacity(chunk.len() * 100);
                let mut lines = Vec::with_capacity(chunk.len());
                for reading in chunk {
                    let line = reading.line();
                    let cut = line.rfind(' ').map_or(line.len(), |i| i + 1);
                    text.push_str(&line[..cut]);
                    lines.push((text.len(), reading.time));
                }
                PoolBatch { text, lines }
            })
            .collect();
        Pool {
            batches,
            period_secs: i64::from(w.days) * DAY,
        }
    }

    /// The body of load batch number `k` and its line count.
    fn body(&self, k: u64) -> (String, usize) {
        let n = self.batches.len() as u64;
        let batch = &self.batches[(k % n) as usize];
        let shift = (k / n) as i64 * self.period_secs;
        let mut body = String::with_capacity(batch.text.len() + batch.lines.len() * 12);
        let mut start = 0;
        for &(end, time) in &batch.lines {
            body.push_str(&batch.text[start..end]);
            let _ = writeln!(body, "{}", time + shift);
            start = end;
        }
        (body, batch.lines.len())
    }
}

/// One acknowledged (or refused) load batch.
struct BatchResult {
    /// When the answer arrived.
    done: Instant,
    latency: Duration,
    rows: usize,
    status: u16,
}

#[derive(Default)]
struct LoadResults {
    batches: Vec<BatchResult>,
    /// The first failure seen, for the report.
    first_error: Option<String>,
    /// Batches that failed without an answer (timeouts, refused connections).
    transport_errors: u64,
}

/// The load writers; stopped (and joined) by [`Load::stop`] or on drop.
struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    results: Arc<Mutex<LoadResults>>,
    started: Instant,
    sent_batches: Arc<AtomicU64>,
}

impl Load {
    fn start(options: &Options, server: &Server, pool: Arc<Pool>) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let results = Arc::new(Mutex::new(LoadResults::default()));
        let sent_batches = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let mut threads = Vec::new();
        if options.rate > 0 {
            // Batch k is due at started + k * batch / rate; writer w sends the
            // batches k = w, w + writers, ...
            let per_batch = Duration::from_secs_f64(options.batch as f64 / options.rate as f64);
            for w in 0..options.writers {
                let (stop, results, pool, sent) = (
                    Arc::clone(&stop),
                    Arc::clone(&results),
                    Arc::clone(&pool),
                    Arc::clone(&sent_batches),
                );
                let url = server.write_url();
                let writers = options.writers as u64;
                let handle = thread::Builder::new()
                    .name(format!("load-{w}"))
                    .spawn(move || {
                        let agent = agent();
                        let mut k = w as u64;
                        while !stop.load(Ordering::SeqCst) {
                            let due = started + per_batch.mul_f64(k as f64);
                            let now = Instant::now();
                            if due > now {
                                // Sleep in slices, to notice the stop flag.
                                thread::sleep((due - now).min(Duration::from_millis(100)));
                                continue;
                            }
                            let (body, rows) = pool.body(k);
                            let sent_at = Instant::now();
                            let outcome = agent
                                .post(&url)
                                .content_type("text/plain; charset=utf-8")
                                .send(body.as_bytes())
                                .map_err(|e| e.to_string())
                                .and_then(answer);
                            let done = Instant::now();
                            sent.fetch_add(1, Ordering::Relaxed);
                            let mut r = lock(&results);
                            match outcome {
                                Ok((status, text)) => {
                                    if status != 204 && r.first_error.is_none() {
                                        r.first_error = Some(format!(
                                            "load batch answered {status}: {}",
                                            text.chars().take(300).collect::<String>()
                                        ));
                                    }
                                    r.batches.push(BatchResult {
                                        done,
                                        latency: done - sent_at,
                                        rows,
                                        status,
                                    });
                                }
                                Err(e) => {
                                    r.transport_errors += 1;
                                    if r.first_error.is_none() {
                                        r.first_error = Some(format!("load batch failed: {e}"));
                                    }
                                    drop(r);
                                    thread::sleep(Duration::from_millis(100));
                                }
                            }
                            k += writers;
                        }
                    });
                if let Ok(h) = handle {
                    threads.push(h);
                }
            }
        }
        Load {
            stop,
            threads,
            results,
            started,
            sent_batches,
        }
    }

    /// Stops the writers (each finishes the batch it is sending).
    fn stop(&mut self) -> Instant {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        Instant::now()
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------------------------------------------------------------------------
// Statistics and the report.

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn fmt_ms(v: f64) -> String {
    if v.is_nan() {
        "-".into()
    } else if v.abs() >= 100.0 {
        format!("{v:.0} ms")
    } else {
        format!("{v:.1} ms")
    }
}

fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let head = digits.len() % 3;
    let mut groups: Vec<&str> = Vec::new();
    if head > 0 {
        groups.push(&digits[..head]);
    }
    groups.extend(
        digits.as_bytes()[head..]
            .chunks(3)
            .map(|c| std::str::from_utf8(c).unwrap_or("")),
    );
    groups.join(",")
}

/// A row of the results table: `| what | n | p50 | p90 | p99 | max | lost | target | met? |`.
fn table_row(what: &str, values: &[f64], lost: &str, target: &str, met: &str) -> String {
    let s = sorted(values.to_vec());
    format!(
        "| {what} | {} | {} | {} | {} | {} | {lost} | {target} | {met} |",
        s.len(),
        fmt_ms(percentile(&s, 50.0)),
        fmt_ms(percentile(&s, 90.0)),
        fmt_ms(percentile(&s, 99.0)),
        fmt_ms(s.last().copied().unwrap_or(f64::NAN)),
    )
}

/// Unix nanoseconds of an RFC 3339 UTC time as the server logs it
/// (`2026-11-24T16:17:13.123456Z`).
fn parse_log_time(s: &str) -> Option<i128> {
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>().ok());
    let (y, mo, day) = (d.next()??, d.next()??, d.next()??);
    let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
    let mut t = hms.split(':').map(|x| x.parse::<i64>().ok());
    let (h, mi, sec) = (t.next()??, t.next()??, t.next()??);
    let frac_nanos = if frac.is_empty() {
        0
    } else {
        let digits: String = frac.chars().take(9).collect();
        digits.parse::<i64>().ok()? * 10i64.pow(9 - digits.len() as u32)
    };
    // Days from civil (Howard Hinnant).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * DAY + h * 3600 + mi * 60 + sec;
    Some(secs as i128 * 1_000_000_000 + frac_nanos as i128)
}

/// When the server logged each fingerprint's change to "firing".
fn firing_log_times(log: &str) -> HashMap<String, i128> {
    let mut out = HashMap::new();
    for line in log.lines() {
        if !line.contains("alert state changed") || !line.contains("to=firing") {
            continue;
        }
        let Some(time) = line.split_whitespace().next().and_then(parse_log_time) else {
            continue;
        };
        let Some(fp) = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("fingerprint="))
        else {
            continue;
        };
        out.entry(fp.trim_matches('"').to_string()).or_insert(time);
    }
    out
}

fn cpu_model() -> String {
    fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

fn profile_of(bin: &Path) -> &'static str {
    let parts: Vec<String> = bin
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts.iter().any(|p| p == "release") {
        "release profile (opt-level 3)"
    } else if parts.iter().any(|p| p == "debug") {
        "dev profile (the workspace sets opt-level 1 for it)"
    } else {
        "unknown profile"
    }
}

/// One probe's outcome.
struct Probe {
    /// Write ack -> receipt in ms; negative when the notification arrived
    /// before the client had read the 204 (the fast path runs beside the ack).
    latency_ms: Option<f64>,
    /// The probe write's own latency (send -> 204).
    write_ms: f64,
    device: String,
    ack_wall: SystemTime,
}

fn run(options: &Options) -> Result<(), String> {
    let run_started = Instant::now();
    let cpus = thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "alert_latency: server {} ({}), {cpus} CPUs ({}), {}",
        options.bin.display(),
        profile_of(&options.bin),
        cpu_model(),
        workload::rfc3339((unix_nanos(SystemTime::now()) / 1_000_000_000) as i64)
    );

    // Generated first, so that the load costs the client nothing but sending.
    let t = Instant::now();
    let pool = Arc::new(Pool::generate(options.batch));
    let pool_rows: usize = pool.batches.iter().map(|b| b.lines.len()).sum();
    eprintln!(
        "generated {} load rows in {} batches ({:.1} s)",
        thousands(pool_rows as u64),
        pool.batches.len(),
        t.elapsed().as_secs_f64()
    );

    let receiver = Receiver::start()?;
    let server = Server::start(&options.bin)?;
    eprintln!(
        "server up at {} (log {})",
        server.base,
        server.log.display()
    );
    let http = agent();

    // The table must exist before a rule over it plans: one normal reading, a
    // day before the load's first.
    let first = Workload::default().reading(1, 0);
    let seed = workload::Reading {
        time: first.time - DAY,
        ..first
    };
    let (status, text) = http
        .post(server.write_url())
        .send(seed.line())
        .map_err(|e| e.to_string())
        .and_then(answer)?;
    if status != 204 {
        return Err(format!("the first write answered {status}: {text}"));
    }
    let rule = json!({
        "name": "probe-tilt",
        "department": "bench",
        "db": DB,
        "every": "1m",
        "sql": format!("SELECT device, tilt_deg FROM manhole WHERE tilt_deg > {THRESHOLD_DEG}"),
        "webhook": receiver.url(),
    });
    let (status, text) = http
        .post(format!("{}/api/v1/rules", server.base))
        .send_json(&rule)
        .map_err(|e| e.to_string())
        .and_then(answer)?;
    if status != 201 {
        return Err(format!("registering the rule answered {status}: {text}"));
    }
    let fast_path = serde_json::from_str::<Value>(&text)
        .ok()
        .and_then(|v| v.get("fast_path").and_then(Value::as_bool));
    if fast_path == Some(false) {
        return Err(format!("the rule is not on the fast path: {text}"));
    }

    let mut load = Load::start(options, &server, Arc::clone(&pool));
    thread::sleep(options.warmup);

    // The probes.
    let probe_agent = agent();
    let write_url = server.write_url();
    let probing_started = Instant::now();
    let deadline = probing_started + options.duration;
    let mut probes: Vec<Probe> = Vec::with_capacity(options.probes);
    let mut probe_errors: Vec<String> = Vec::new();
    for n in 0..options.probes {
        if Instant::now() >= deadline {
            break;
        }
        let device = format!("probe-{n}");
        let now_secs = unix_nanos(SystemTime::now()) / 1_000_000_000;
        let line = format!(
            "manhole,device={device},district=bench tilt_deg={PROBE_TILT_DEG:.1} {now_secs}"
        );
        let sent = Instant::now();
        let outcome = probe_agent
            .post(&write_url)
            .content_type("text/plain; charset=utf-8")
            .send(line.as_bytes())
            .map_err(|e| e.to_string())
            .and_then(answer);
        let ack = Instant::now();
        let ack_wall = SystemTime::now();
        match outcome {
            Ok((204, _)) => {}
            Ok((status, text)) => {
                probe_errors.push(format!("{device}: write answered {status}: {text}"));
                thread::sleep(PROBE_GAP);
                continue;
            }
            Err(e) => {
                probe_errors.push(format!("{device}: write failed: {e}"));
                thread::sleep(PROBE_GAP);
                continue;
            }
        }
        let receipt = receiver.wait_for(&device, ack + PROBE_TIMEOUT);
        let latency_ms = receipt.map(|r| {
            if r.at >= ack {
                ms(r.at - ack)
            } else {
                -ms(ack - r.at)
            }
        });
        probes.push(Probe {
            latency_ms,
            write_ms: ms(ack - sent),
            device,
            ack_wall,
        });
        thread::sleep(PROBE_GAP);
    }
    let probing_ended = Instant::now();
    let load_ended = load.stop();
    // Late notifications of lost probes, for the report.
    thread::sleep(Duration::from_millis(200));

    // ---- The report.
    let load_results = std::mem::take(&mut *lock(&load.results));
    let load_secs = (load_ended - load.started).as_secs_f64();
    let acked: Vec<&BatchResult> = load_results
        .batches
        .iter()
        .filter(|b| b.status == 204)
        .collect();
    let acked_rows: usize = acked.iter().map(|b| b.rows).sum();
    let in_window_rows: usize = acked
        .iter()
        .filter(|b| b.done >= probing_started && b.done <= probing_ended)
        .map(|b| b.rows)
        .sum();
    let window_secs = (probing_ended - probing_started).as_secs_f64();
    let achieved = if load_secs > 0.0 {
        acked_rows as f64 / load_secs
    } else {
        0.0
    };
    let achieved_window = if window_secs > 0.0 {
        in_window_rows as f64 / window_secs
    } else {
        0.0
    };
    let failed_batches = load_results.batches.len() - acked.len();

    let latencies: Vec<f64> = probes.iter().filter_map(|p| p.latency_ms).collect();
    let lost: Vec<&Probe> = probes.iter().filter(|p| p.latency_ms.is_none()).collect();
    let before_ack = latencies.iter().filter(|&&v| v < 0.0).count();
    let s = sorted(latencies.clone());
    let p99 = percentile(&s, 99.0);
    let met = !s.is_empty() && lost.is_empty() && p99 < TARGET_P99_MS;

    let log = server.log_text();
    let fast_path_behind = log.matches("the alert fast path is behind").count();
    let not_delivered = log.matches("notification not delivered").count();
    let (requests, unexpected, malformed, late_receipts, fingerprints) = {
        let r = receiver.lock();
        let late = lost
            .iter()
            .filter(|p| r.firing.contains_key(&p.device))
            .count();
        (
            r.requests,
            r.unexpected,
            r.malformed,
            late,
            r.fingerprints.clone(),
        )
    };

    // Breakdown from the server's log: ack -> state change -> receipt.
    let logged = firing_log_times(&log);
    // Per probe: (ack -> state change, state change -> receipt) in ms.
    let breakdown: Vec<Option<(f64, f64)>> = {
        let r = receiver.lock();
        probes
            .iter()
            .map(|p| {
                let fp = fingerprints.get(&p.device)?;
                let receipt = r.firing.get(&p.device)?;
                let changed = *logged.get(fp)?;
                Some((
                    (changed - unix_nanos(p.ack_wall)) as f64 / 1e6,
                    (unix_nanos(receipt.wall) - changed) as f64 / 1e6,
                ))
            })
            .collect()
    };
    let to_change: Vec<f64> = breakdown.iter().flatten().map(|b| b.0).collect();
    let to_receipt: Vec<f64> = breakdown.iter().flatten().map(|b| b.1).collect();
    if let Some(path) = &options.csv {
        let mut csv = String::from(
            "probe,write_ms,latency_ms,ack_to_state_change_ms,state_change_to_receipt_ms\n",
        );
        let opt = |v: Option<f64>| v.map(|v| format!("{v:.3}")).unwrap_or_default();
        for (p, b) in probes.iter().zip(&breakdown) {
            let _ = writeln!(
                csv,
                "{},{:.3},{},{},{}",
                p.device,
                p.write_ms,
                opt(p.latency_ms),
                opt(b.map(|b| b.0)),
                opt(b.map(|b| b.1)),
            );
        }
        fs::write(path, csv).map_err(|e| format!("writing {}: {e}", path.display()))?;
    }

    let mut out = String::new();
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "alert latency (write ack -> webhook receipt), fast-path rule, {} probes, under {} rows/s (achieved {} rows/s; {} rows/s while probing)",
        probes.len(),
        thousands(options.rate),
        thousands(achieved.round() as u64),
        thousands(achieved_window.round() as u64),
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "| metric | n | p50 | p90 | p99 | max | lost | target | met? |"
    );
    let _ = writeln!(
        out,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |"
    );
    let _ = writeln!(
        out,
        "{}",
        table_row(
            "alert latency: write ack -> webhook receipt",
            &latencies,
            &lost.len().to_string(),
            "DESIGN.md: p99 < 50 ms",
            if met { "yes" } else { "no" },
        )
    );
    if !to_change.is_empty() {
        let _ = writeln!(
            out,
            "{}",
            table_row(
                "  of which ack -> state change logged (fast-path queue + batch check)",
                &to_change,
                "",
                "",
                ""
            )
        );
        let _ = writeln!(
            out,
            "{}",
            table_row(
                "  of which state change logged -> receipt (persist state + outbox, POST)",
                &to_receipt,
                "",
                "",
                ""
            )
        );
    }
    let probe_writes: Vec<f64> = probes.iter().map(|p| p.write_ms).collect();
    let _ = writeln!(
        out,
        "{}",
        table_row(
            "probe write latency (1 line, send -> 204)",
            &probe_writes,
            &probe_errors.len().to_string(),
            "",
            ""
        )
    );
    let load_latencies: Vec<f64> = acked.iter().map(|b| ms(b.latency)).collect();
    let _ = writeln!(
        out,
        "{}",
        table_row(
            &format!(
                "load write latency ({}-line batch, send -> 204)",
                thousands(options.batch as u64)
            ),
            &load_latencies,
            &(failed_batches as u64 + load_results.transport_errors).to_string(),
            "",
            ""
        )
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "load: {} writers, {}-line batches, {} rows acknowledged in {:.1} s ({} batches sent, {} failed, {} without an answer); pool of {} rows replayed a day later on each pass",
        options.writers,
        thousands(options.batch as u64),
        thousands(acked_rows as u64),
        load_secs,
        load.sent_batches.load(Ordering::Relaxed),
        failed_batches,
        load_results.transport_errors,
        thousands(pool_rows as u64),
    );
    if let Some(e) = &load_results.first_error {
        let _ = writeln!(out, "first load failure: {e}");
    }
    let _ = writeln!(
        out,
        "probes: {} sent over {:.1} s (warm-up {:.1} s, {} ms apart){}; {} notified before the client read the 204 (counted as 0 ms or less); {} lost, {} of them notified after the {} s timeout",
        probes.len() + probe_errors.len(),
        window_secs,
        options.warmup.as_secs_f64(),
        PROBE_GAP.as_millis(),
        if probes.len() + probe_errors.len() < options.probes {
            format!(", stopped by --duration before {}", options.probes)
        } else {
            String::new()
        },
        before_ack,
        lost.len(),
        late_receipts,
        PROBE_TIMEOUT.as_secs(),
    );
    for e in probe_errors.iter().take(5) {
        let _ = writeln!(out, "probe failure: {e}");
    }
    let _ = writeln!(
        out,
        "receiver: {requests} webhook requests, {unexpected} firing alerts for load devices (should be 0), {malformed} not webhook JSON; server log: {fast_path_behind} fast-path drops, {not_delivered} failed deliveries"
    );
    let _ = writeln!(
        out,
        "binary: {} ({}); machine: {cpus} CPUs, {}; date: {}; run took {:.0} s",
        options.bin.display(),
        profile_of(&options.bin),
        cpu_model(),
        workload::rfc3339((unix_nanos(SystemTime::now()) / 1_000_000_000) as i64),
        run_started.elapsed().as_secs_f64(),
    );
    print!("{out}");
    drop(load);
    drop(server);
    drop(receiver);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=200).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 100.0);
        assert_eq!(percentile(&v, 99.0), 198.0);
        assert_eq!(percentile(&v, 100.0), 200.0);
        assert!(percentile(&[], 50.0).is_nan());
    }

    #[test]
    fn thousands_are_grouped() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_000), "1,000");
        assert_eq!(thousands(100_000), "100,000");
        assert_eq!(thousands(1_509_818), "1,509,818");
    }

    #[test]
    fn log_times_parse() {
        assert_eq!(
            parse_log_time("2025-12-01T00:00:00.000001Z"),
            Some(i128::from(workload::DEFAULT_START) * 1_000_000_000 + 1_000)
        );
        assert_eq!(
            parse_log_time("2000-02-29T00:00:00Z"),
            Some(951_782_400_000_000_000)
        );
        let log = "2026-11-24T16:17:13.500000Z  INFO citytsdb_server::alerts: alert state changed rule=probe-tilt fingerprint=00ab from=pending to=firing\n";
        let t = firing_log_times(log);
        assert_eq!(t.len(), 1);
        assert!(t.contains_key("00ab"));
    }

    #[test]
    fn pool_bodies_shift_a_day_per_pass() {
        let pool = Pool {
            batches: vec![PoolBatch {
                text: "a x=1 b y=2 ".into(),
                lines: vec![(6, 10), (12, 20)],
            }],
            period_secs: 100,
        };
        assert_eq!(pool.body(0), ("a x=1 10\nb y=2 20\n".to_string(), 2));
        assert_eq!(pool.body(2), ("a x=1 210\nb y=2 220\n".to_string(), 2));
    }
}
