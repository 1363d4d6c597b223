//! A webhook receiver for alert notifications: a tiny HTTP/1.1 server on
//! 127.0.0.1 that records every request it is sent.
//!
//! [`Receiver::start`] binds a free port and serves from background threads (one
//! accepting, one per connection). Each request is read whole (a `Content-Length`
//! body or a `Transfer-Encoding: chunked` one, keep-alive or `Connection: close`,
//! `Expect: 100-continue` honoured), recorded as a [`Received`] in arrival order,
//! and answered as the receiver's [`Mode`] says: `200` by default, or a failure
//! (`503`, another status, a dropped connection, or no answer at all) to play a
//! receiver that is down. Tests wait for what they expect with
//! [`Receiver::wait_for`], which fails the test with everything received when the
//! time is up.
//!
//! Everything is bounded: at most [`MAX_STORED`] requests are kept, at most
//! [`MAX_CONNECTIONS`] connections are served at once, headers and bodies have
//! size limits, sockets have timeouts, and dropping the [`Receiver`] stops every
//! thread within a fraction of a second (5 s at worst, for an answer a client
//! does not read).

use std::fmt::Write as _;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;

/// Most requests a receiver keeps; later ones are still answered (and counted in
/// [`Receiver::not_stored`] and [`Receiver::failed_attempts`]) but not recorded.
pub const MAX_STORED: usize = 10_000;
/// Most connections served at once; further ones are closed at once.
pub const MAX_CONNECTIONS: usize = 64;
/// Largest request head (request line and headers) accepted.
const MAX_HEAD: usize = 64 * 1024;
/// Largest request body accepted; a larger one is answered 413 and the
/// connection closed.
const MAX_BODY: usize = 16 * 1024 * 1024;
/// How often a connection thread looks at the shutdown flag while it waits.
const POLL: Duration = Duration::from_millis(50);
/// How long an idle keep-alive connection is kept open between requests.
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long one request may take to arrive once its first byte has.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long writing an answer may take.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a [`Mode::Stall`] connection is held without an answer.
const STALL_LIMIT: Duration = Duration::from_secs(300);
/// Most requests shown in a [`Receiver::wait_for`] failure message.
const SHOWN_IN_FAILURE: usize = 50;
/// Most characters of one body shown in a failure message.
const BODY_SHOWN: usize = 2_000;

/// How the receiver answers the requests it reads (each is recorded either way).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// `200 OK`: the notification was delivered. The default.
    Accept,
    /// This status (e.g. 503 or 500) with a short text body; the connection is
    /// kept open as the request asked.
    Status(u16),
    /// Read the request, then close the connection without any answer.
    Drop,
    /// Read the request and never answer; the connection is held until the client
    /// gives up (closes it), the receiver is dropped, or 300 s pass.
    Stall,
}

/// A request body: JSON when it parses as JSON, else text (lossy UTF-8).
#[derive(Clone, Debug, PartialEq)]
pub enum Body {
    /// The body parsed as JSON (whatever its `Content-Type`).
    Json(Value),
    /// The body as text, invalid UTF-8 replaced; empty for no body.
    Text(String),
}

/// One request the receiver read, with how it was answered.
#[derive(Clone, Debug)]
pub struct Received {
    /// Position in arrival order, from 0.
    pub seq: usize,
    /// Which connection it came on (numbered from 0 in accept order), to tell
    /// keep-alive reuse from new connections.
    pub connection: u64,
    /// When the request had been read whole (its last body byte).
    pub at: Instant,
    /// The wall-clock time of [`Received::at`].
    pub wall_time: SystemTime,
    /// The request method, e.g. `POST`.
    pub method: String,
    /// The request target as sent: path and query, e.g. `/hook?x=1`.
    pub path: String,
    /// Header fields in the order sent, names as sent.
    pub headers: Vec<(String, String)>,
    /// The body, de-chunked.
    pub body: Body,
    /// The status answered, or `None` when the receiver dropped or stalled the
    /// connection instead ([`Mode::Drop`], [`Mode::Stall`]).
    pub status: Option<u16>,
}

impl Received {
    /// The first header of this name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The JSON body, if the body was JSON.
    pub fn json(&self) -> Option<&Value> {
        match &self.body {
            Body::Json(value) => Some(value),
            Body::Text(_) => None,
        }
    }

    /// The body as text: the JSON re-serialised, or the text itself.
    pub fn text(&self) -> String {
        match &self.body {
            Body::Json(value) => value.to_string(),
            Body::Text(text) => text.clone(),
        }
    }

    /// The `alerts` array of an Alertmanager-style webhook body; empty when there
    /// is none.
    pub fn alerts(&self) -> &[Value] {
        self.json()
            .and_then(|v| v.get("alerts"))
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// Whether the receiver answered it with a 2xx status.
    pub fn delivered(&self) -> bool {
        matches!(self.status, Some(200..=299))
    }
}

/// Everything the connection threads share with the [`Receiver`].
struct Shared {
    state: Mutex<State>,
    /// Signalled whenever a request is recorded.
    arrived: Condvar,
    shutdown: AtomicBool,
    next_connection: AtomicU64,
    limit: usize,
}

struct State {
    requests: Vec<Received>,
    /// Requests read in all, stored or not.
    total: usize,
    not_stored: usize,
    failed: usize,
    mode: Mode,
    connections: Vec<JoinHandle<()>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking connection thread must not take the whole harness down.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn stopping(&self) -> bool {
        self.shutdown.load(Ordering::SeqCst)
    }
}

/// A running webhook receiver on 127.0.0.1; stopped when dropped.
pub struct Receiver {
    addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl Receiver {
    /// Starts a receiver on a free port of 127.0.0.1 that answers 200.
    pub fn start() -> Receiver {
        Receiver::start_with_limit(MAX_STORED)
    }

    /// Like [`Receiver::start`], keeping at most `limit` requests (capped at
    /// [`MAX_STORED`]).
    pub fn start_with_limit(limit: usize) -> Receiver {
        let listener =
            TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0 for the webhook receiver");
        let addr = listener
            .local_addr()
            .expect("local address of the webhook receiver");
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                requests: Vec::new(),
                total: 0,
                not_stored: 0,
                failed: 0,
                mode: Mode::Accept,
                connections: Vec::new(),
            }),
            arrived: Condvar::new(),
            shutdown: AtomicBool::new(false),
            next_connection: AtomicU64::new(0),
            limit: limit.min(MAX_STORED),
        });
        let acceptor = {
            let shared = Arc::clone(&shared);
            thread::Builder::new()
                .name(format!("receiver-{}", addr.port()))
                .spawn(move || accept_loop(listener, shared))
                .expect("spawn the webhook receiver thread")
        };
        Receiver {
            addr,
            shared,
            acceptor: Some(acceptor),
        }
    }

    /// The webhook URL to hand out: `http://127.0.0.1:PORT/hook`. (Any path is
    /// accepted and recorded.)
    pub fn url(&self) -> String {
        format!("{}/hook", self.base_url())
    }

    /// `http://127.0.0.1:PORT`, to build URLs with other paths.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The address listened on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every recorded request so far, in arrival order (failed ones included).
    pub fn requests(&self) -> Vec<Received> {
        self.shared.lock().requests.clone()
    }

    /// The recorded requests that were answered 2xx, in arrival order.
    pub fn delivered(&self) -> Vec<Received> {
        self.shared
            .lock()
            .requests
            .iter()
            .filter(|r| r.delivered())
            .cloned()
            .collect()
    }

    /// How many requests were read in all, stored or not.
    pub fn count(&self) -> usize {
        self.shared.lock().total
    }

    /// Waits until `done` holds over all recorded requests and returns them;
    /// fails the test, listing what was received, if it does not within
    /// `timeout`. `done` is checked at once and again after every new request.
    #[track_caller]
    pub fn wait_for(
        &self,
        done: impl FnMut(&[Received]) -> bool,
        timeout: Duration,
    ) -> Vec<Received> {
        match self.try_wait_for(done, timeout) {
            Some(requests) => requests,
            None => panic!(
                "webhook receiver {}: the awaited requests did not arrive within {timeout:?}\n{}",
                self.url(),
                self.describe()
            ),
        }
    }

    /// Like [`Receiver::wait_for`], but `None` on timeout instead of failing
    /// (for tests that check something does *not* arrive).
    pub fn try_wait_for(
        &self,
        mut done: impl FnMut(&[Received]) -> bool,
        timeout: Duration,
    ) -> Option<Vec<Received>> {
        let deadline = Instant::now() + timeout;
        let mut state = self.shared.lock();
        loop {
            if done(&state.requests) {
                return Some(state.requests.clone());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            state = self
                .shared
                .arrived
                .wait_timeout(state, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Waits until at least `n` requests were recorded; returns them all. Fails
    /// the test after `timeout`.
    #[track_caller]
    pub fn wait_for_count(&self, n: usize, timeout: Duration) -> Vec<Received> {
        self.wait_for(|requests| requests.len() >= n, timeout)
    }

    /// `true`: answer every request 503 (a receiver that is down); `false`:
    /// answer 200 again.
    pub fn set_failing(&self, failing: bool) {
        self.set_mode(if failing {
            Mode::Status(503)
        } else {
            Mode::Accept
        });
    }

    /// Sets how requests read from now on are answered.
    pub fn set_mode(&self, mode: Mode) {
        self.shared.lock().mode = mode;
    }

    /// How requests are answered now.
    pub fn mode(&self) -> Mode {
        self.shared.lock().mode
    }

    /// How many requests were not answered 2xx (a failure status, dropped or
    /// stalled), stored or not.
    pub fn failed_attempts(&self) -> usize {
        self.shared.lock().failed
    }

    /// How many requests were read but not stored because [`MAX_STORED`] (or
    /// the receiver's limit) had been reached.
    pub fn not_stored(&self) -> usize {
        self.shared.lock().not_stored
    }

    /// A readable account of everything received, for failure messages: the
    /// last 50 requests, bodies cut at 2,000 characters.
    pub fn describe(&self) -> String {
        let state = self.shared.lock();
        let mut out = format!(
            "received {} request(s) ({} failed, {} not stored), mode now {:?}",
            state.total, state.failed, state.not_stored, state.mode
        );
        let shown = state.requests.len().saturating_sub(SHOWN_IN_FAILURE);
        if shown > 0 {
            let _ = write!(out, "; the first {shown} are left out");
        }
        let first_at = state.requests.first().map(|r| r.at);
        for request in &state.requests[shown..] {
            let since = first_at.map(|t| request.at - t).unwrap_or_default();
            let mut body = request.text();
            if body.len() > BODY_SHOWN {
                let cut = (0..=BODY_SHOWN)
                    .rev()
                    .find(|&i| body.is_char_boundary(i))
                    .unwrap_or(0);
                body.truncate(cut);
                body.push_str("...");
            }
            let status = request
                .status
                .map(|s| s.to_string())
                .unwrap_or_else(|| "no answer".into());
            let _ = write!(
                out,
                "\n  #{} (+{:.3}s, conn {}) {} {} -> {status}: {body}",
                request.seq,
                since.as_secs_f64(),
                request.connection,
                request.method,
                request.path,
            );
        }
        out
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        // Wake the acceptor out of accept(); if even that fails, leave the thread
        // (it holds nothing the test needs) rather than risk hanging here.
        let woken = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1)).is_ok();
        if let Some(acceptor) = self.acceptor.take() {
            if woken {
                let _ = acceptor.join();
            }
        }
        // Connection threads see the flag within POLL (or a write timeout).
        let connections = std::mem::take(&mut self.shared.lock().connections);
        for connection in connections {
            let _ = connection.join();
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    for stream in listener.incoming() {
        if shared.stopping() {
            return;
        }
        let Ok(stream) = stream else {
            // E.g. too many open files: back off a little rather than spin.
            thread::sleep(POLL);
            continue;
        };
        let mut state = shared.lock();
        state.connections.retain(|c| !c.is_finished());
        if state.connections.len() >= MAX_CONNECTIONS {
            drop(state);
            let _ = stream.shutdown(Shutdown::Both);
            continue;
        }
        let id = shared.next_connection.fetch_add(1, Ordering::SeqCst);
        let worker = {
            let shared = Arc::clone(&shared);
            thread::Builder::new()
                .name(format!("receiver-conn-{id}"))
                .spawn(move || {
                    let _ = serve_connection(stream, id, &shared);
                })
        };
        match worker {
            Ok(worker) => state.connections.push(worker),
            Err(_) => thread::sleep(POLL),
        }
    }
}

/// Why reading a request stopped short.
enum ReadError {
    /// The client closed the connection, the receiver is shutting down, or the
    /// connection idled out: close quietly.
    Gone,
    /// A malformed or oversized request: answer with this status, then close.
    Bad(u16, &'static str),
}

impl From<io::Error> for ReadError {
    fn from(_: io::Error) -> ReadError {
        ReadError::Gone
    }
}

/// One request as parsed off the wire.
struct Request {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    keep_alive: bool,
}

/// A connection with the bytes read but not yet consumed.
struct Conn<'a> {
    stream: TcpStream,
    buf: Vec<u8>,
    shared: &'a Shared,
}

impl Conn<'_> {
    /// Reads more bytes into `buf`, waiting until `deadline`. `Gone` on EOF,
    /// shutdown or deadline.
    fn fill(&mut self, deadline: Instant) -> Result<(), ReadError> {
        let mut chunk = [0u8; 16 * 1024];
        loop {
            if self.shared.stopping() || Instant::now() >= deadline {
                return Err(ReadError::Gone);
            }
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(ReadError::Gone),
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    return Ok(());
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Takes one line (up to CRLF or LF, without it), reading as needed.
    fn line(&mut self, deadline: Instant, max: usize) -> Result<String, ReadError> {
        loop {
            if let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = self.buf.drain(..=end).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Ok(String::from_utf8_lossy(&line).into_owned());
            }
            if self.buf.len() > max {
                return Err(ReadError::Bad(431, "request line or header too long"));
            }
            self.fill(deadline)?;
        }
    }

    /// Takes exactly `n` bytes, reading as needed.
    fn take(&mut self, n: usize, deadline: Instant) -> Result<Vec<u8>, ReadError> {
        while self.buf.len() < n {
            self.fill(deadline)?;
        }
        Ok(self.buf.drain(..n).collect())
    }

    /// Reads one whole request; `Gone` when the connection ends cleanly before it.
    fn request(&mut self) -> Result<Request, ReadError> {
        // Wait (idle) for the first byte of the next request.
        let idle_deadline = Instant::now() + IDLE_TIMEOUT;
        // Tolerate stray empty lines between requests (RFC 9112 2.2).
        loop {
            while self.buf.is_empty() {
                self.fill(idle_deadline)?;
            }
            match self.buf.first() {
                Some(b'\r' | b'\n') => {
                    self.buf.remove(0);
                }
                _ => break,
            }
        }
        let deadline = Instant::now() + REQUEST_TIMEOUT;
        let mut head_len = 0;
        let request_line = self.line(deadline, MAX_HEAD)?;
        head_len += request_line.len();
        let mut parts = request_line.split_whitespace();
        let (Some(method), Some(path), Some(version), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(ReadError::Bad(400, "malformed request line"));
        };
        let http10 = match version {
            "HTTP/1.1" => false,
            "HTTP/1.0" => true,
            _ => return Err(ReadError::Bad(505, "only HTTP/1.0 and HTTP/1.1")),
        };
        let mut headers = Vec::new();
        loop {
            let line = self.line(deadline, MAX_HEAD.saturating_sub(head_len))?;
            head_len += line.len() + 2;
            if head_len > MAX_HEAD {
                return Err(ReadError::Bad(431, "request head too large"));
            }
            if line.is_empty() {
                break;
            }
            let Some((name, value)) = line.split_once(':') else {
                return Err(ReadError::Bad(400, "malformed header line"));
            };
            headers.push((name.trim().to_string(), value.trim().to_string()));
        }
        let header = |name: &'static str| header_values(&headers, name);
        let connection_tokens: Vec<String> = header("connection")
            .flat_map(|v| v.split(','))
            .map(|t| t.trim().to_ascii_lowercase())
            .collect();
        let keep_alive = if http10 {
            connection_tokens.iter().any(|t| t == "keep-alive")
        } else {
            !connection_tokens.iter().any(|t| t == "close")
        };
        let chunked = header("transfer-encoding")
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("chunked"));
        let lengths: Vec<&str> = header("content-length").collect();
        let length = if chunked {
            None
        } else {
            match lengths.as_slice() {
                [] => Some(0),
                [one] => match one.parse::<usize>() {
                    Ok(n) if n <= MAX_BODY => Some(n),
                    Ok(_) => return Err(ReadError::Bad(413, "body too large")),
                    Err(_) => return Err(ReadError::Bad(400, "invalid Content-Length")),
                },
                _ => return Err(ReadError::Bad(400, "more than one Content-Length")),
            }
        };
        let expects_continue = header("expect").any(|v| v.eq_ignore_ascii_case("100-continue"));
        if expects_continue && length != Some(0) && self.buf.is_empty() {
            self.stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
        }
        let body = match length {
            Some(n) => self.take(n, deadline)?,
            None => self.chunked_body(deadline)?,
        };
        Ok(Request {
            method: method.to_string(),
            path: path.to_string(),
            headers,
            body,
            keep_alive,
        })
    }

    /// Reads a chunked body, trailers included (and dropped).
    fn chunked_body(&mut self, deadline: Instant) -> Result<Vec<u8>, ReadError> {
        let mut body = Vec::new();
        loop {
            let size_line = self.line(deadline, 1024)?;
            let size = size_line.split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(size, 16)
                .map_err(|_| ReadError::Bad(400, "invalid chunk size"))?;
            if size == 0 {
                break;
            }
            if body.len() + size > MAX_BODY {
                return Err(ReadError::Bad(413, "body too large"));
            }
            body.extend(self.take(size, deadline)?);
            if !self.line(deadline, 2)?.is_empty() {
                return Err(ReadError::Bad(400, "chunk not followed by CRLF"));
            }
        }
        // Trailer fields, up to the empty line.
        let mut trailer_len = 0;
        loop {
            let line = self.line(deadline, MAX_HEAD)?;
            if line.is_empty() {
                return Ok(body);
            }
            trailer_len += line.len();
            if trailer_len > MAX_HEAD {
                return Err(ReadError::Bad(431, "trailers too large"));
            }
        }
    }

    /// Writes a response with a text body.
    fn respond(&mut self, status: u16, body: &str, keep_alive: bool) -> io::Result<()> {
        let connection = if keep_alive { "keep-alive" } else { "close" };
        let response = format!(
            "HTTP/1.1 {status} {}\r\nContent-Type: text/plain; charset=utf-8\r\n\
             Content-Length: {}\r\nConnection: {connection}\r\n\r\n{body}",
            reason(status),
            body.len(),
        );
        self.stream.write_all(response.as_bytes())?;
        self.stream.flush()
    }

    /// Holds a stalled connection until the client closes it, shutdown, or
    /// [`STALL_LIMIT`].
    fn stall(&mut self) {
        let deadline = Instant::now() + STALL_LIMIT;
        while self.fill(deadline).is_ok() {
            // Whatever else the client sends is ignored.
            self.buf.clear();
        }
    }
}

fn serve_connection(stream: TcpStream, id: u64, shared: &Shared) -> io::Result<()> {
    stream.set_read_timeout(Some(POLL))?;
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let _ = stream.set_nodelay(true);
    let mut conn = Conn {
        stream,
        buf: Vec::new(),
        shared,
    };
    loop {
        let request = match conn.request() {
            Ok(request) => request,
            Err(ReadError::Gone) => return Ok(()),
            Err(ReadError::Bad(status, why)) => {
                let _ = conn.respond(status, &format!("{why}\n"), false);
                return Ok(());
            }
        };
        let at = Instant::now();
        let wall_time = SystemTime::now();
        let body = match serde_json::from_slice::<Value>(&request.body) {
            Ok(value) => Body::Json(value),
            Err(_) => Body::Text(String::from_utf8_lossy(&request.body).into_owned()),
        };
        let mode = {
            let mut state = shared.lock();
            let mode = state.mode;
            let status = match mode {
                Mode::Accept => Some(200),
                Mode::Status(status) => Some(status),
                Mode::Drop | Mode::Stall => None,
            };
            let seq = state.total;
            state.total += 1;
            if !matches!(status, Some(200..=299)) {
                state.failed += 1;
            }
            if state.requests.len() < shared.limit {
                state.requests.push(Received {
                    seq,
                    connection: id,
                    at,
                    wall_time,
                    method: request.method,
                    path: request.path,
                    headers: request.headers,
                    body,
                    status,
                });
            } else {
                state.not_stored += 1;
            }
            shared.arrived.notify_all();
            mode
        };
        match mode {
            Mode::Accept => conn.respond(200, "ok\n", request.keep_alive)?,
            Mode::Status(status) => conn.respond(
                status,
                "the test receiver is failing on purpose\n",
                request.keep_alive,
            )?,
            Mode::Drop => {
                let _ = conn.stream.shutdown(Shutdown::Both);
                return Ok(());
            }
            Mode::Stall => {
                conn.stall();
                return Ok(());
            }
        }
        if !request.keep_alive {
            let _ = conn.stream.shutdown(Shutdown::Write);
            return Ok(());
        }
    }
}

/// The values of every header named `name` (case-insensitive), in order.
fn header_values<'a>(
    headers: &'a [(String, String)],
    name: &'a str,
) -> impl Iterator<Item = &'a str> + 'a {
    headers
        .iter()
        .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// The reason phrase of the statuses a test is likely to use.
fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        413 => "Content Too Large",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "Status",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const T: Duration = Duration::from_secs(10);

    fn agent() -> ureq::Agent {
        ureq::Agent::config_builder()
            .timeout_global(Some(T))
            .http_status_as_error(false)
            .build()
            .into()
    }

    /// Sends raw bytes on a new connection and reads until the server closes it
    /// (or 5 s pass).
    fn raw_exchange(receiver: &Receiver, bytes: &[u8]) -> String {
        let mut stream = TcpStream::connect(receiver.addr()).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        stream.write_all(bytes).unwrap();
        let mut out = Vec::new();
        let _ = stream.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    }

    /// Reads one response with a Content-Length body off a kept-alive stream.
    fn read_response(stream: &mut TcpStream) -> String {
        let mut out = Vec::new();
        let mut byte = [0u8; 1];
        while !out.ends_with(b"\r\n\r\n") {
            assert_eq!(stream.read(&mut byte).unwrap(), 1, "EOF inside a response");
            out.push(byte[0]);
        }
        let head = String::from_utf8(out.clone()).unwrap();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let mut body = vec![0u8; length];
        stream.read_exact(&mut body).unwrap();
        out.extend(body);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn receiver_records_json_posts_in_order() {
        let receiver = Receiver::start();
        assert!(receiver.url().starts_with("http://127.0.0.1:"));
        assert!(receiver.url().ends_with("/hook"));
        let agent = agent();
        let before = Instant::now();
        for i in 0..3 {
            let response = agent
                .post(receiver.url())
                .send_json(json!({"version": "4", "status": "firing", "alerts": [{"n": i}]}))
                .unwrap();
            assert_eq!(response.status(), 200);
        }
        let requests = receiver.wait_for_count(3, T);
        assert_eq!(requests.len(), 3);
        for (i, request) in requests.iter().enumerate() {
            assert_eq!(request.seq, i);
            assert_eq!(request.method, "POST");
            assert_eq!(request.path, "/hook");
            assert_eq!(request.status, Some(200));
            assert!(request.delivered());
            assert!(request.at >= before);
            assert!(request
                .header("content-type")
                .unwrap()
                .starts_with("application/json"));
            assert_eq!(request.json().unwrap()["status"], "firing");
            assert_eq!(request.alerts(), &[json!({"n": i})]);
        }
        assert!(requests[0].at <= requests[1].at && requests[1].at <= requests[2].at);
        assert_eq!(receiver.failed_attempts(), 0);
        assert_eq!(receiver.delivered().len(), 3);
    }

    #[test]
    fn receiver_reads_chunked_bodies_and_keeps_connections_alive() {
        let receiver = Receiver::start();
        let mut stream = TcpStream::connect(receiver.addr()).unwrap();
        stream.set_read_timeout(Some(T)).unwrap();
        // A chunked body with a chunk extension and a trailer, then a
        // Content-Length one on the same connection, the second pipelined.
        let body = br#"{"version":"4","alerts":[{"labels":{"alertname":"x"}}]}"#;
        let (a, b) = body.split_at(10);
        let mut bytes = format!(
            "POST /hook/chunked?x=1 HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\
             Content-Type: application/json\r\n\r\n{:x};ext=1\r\n",
            a.len()
        )
        .into_bytes();
        bytes.extend_from_slice(a);
        bytes.extend_from_slice(format!("\r\n{:X}\r\n", b.len()).as_bytes());
        bytes.extend_from_slice(b);
        bytes.extend_from_slice(b"\r\n0\r\nX-Trailer: yes\r\n\r\n");
        bytes.extend_from_slice(
            b"POST /second HTTP/1.1\r\nHost: test\r\nContent-Length: 5\r\n\r\nhello",
        );
        // Written in two halves with a pause, so a request spans several reads.
        let (first, second) = bytes.split_at(bytes.len() / 2);
        stream.write_all(first).unwrap();
        thread::sleep(Duration::from_millis(120));
        stream.write_all(second).unwrap();
        let answer = read_response(&mut stream);
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        assert!(answer.contains("Connection: keep-alive"), "{answer}");
        let answer = read_response(&mut stream);
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        let requests = receiver.wait_for_count(2, T);
        assert_eq!(requests[0].path, "/hook/chunked?x=1");
        assert_eq!(
            requests[0].body,
            Body::Json(serde_json::from_slice(body).unwrap())
        );
        assert_eq!(requests[0].alerts()[0]["labels"]["alertname"], "x");
        assert_eq!(requests[1].path, "/second");
        assert_eq!(requests[1].body, Body::Text("hello".into()));
        assert_eq!(requests[0].connection, requests[1].connection);
        // Still open: a third request on the same connection.
        stream
            .write_all(b"POST /third HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}")
            .unwrap();
        assert!(read_response(&mut stream).starts_with("HTTP/1.1 200"));
        let third = &receiver.wait_for_count(3, T)[2];
        assert_eq!(third.json(), Some(&json!({})));
        assert_eq!(third.connection, requests[0].connection);
    }

    #[test]
    fn receiver_closes_on_connection_close_and_http10() {
        let receiver = Receiver::start();
        let answer = raw_exchange(
            &receiver,
            b"POST /hook HTTP/1.1\r\nConnection: close\r\nContent-Length: 3\r\n\r\nabc",
        );
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        assert!(answer.contains("Connection: close"), "{answer}");
        assert!(answer.ends_with("ok\n"), "{answer}");
        let answer = raw_exchange(
            &receiver,
            b"POST /old HTTP/1.0\r\nContent-Length: 0\r\n\r\n",
        );
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        let requests = receiver.wait_for_count(2, T);
        assert_eq!(requests[0].body, Body::Text("abc".into()));
        assert_eq!(requests[1].body, Body::Text(String::new()));
        assert_ne!(requests[0].connection, requests[1].connection);
    }

    #[test]
    fn receiver_answers_100_continue() {
        let receiver = Receiver::start();
        let mut stream = TcpStream::connect(receiver.addr()).unwrap();
        stream.set_read_timeout(Some(T)).unwrap();
        stream
            .write_all(b"POST /hook HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n")
            .unwrap();
        let mut interim = [0u8; 25];
        stream.read_exact(&mut interim).unwrap();
        assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
        stream.write_all(b"null").unwrap();
        assert!(read_response(&mut stream).starts_with("HTTP/1.1 200"));
        assert_eq!(receiver.wait_for_count(1, T)[0].json(), Some(&Value::Null));
    }

    #[test]
    fn receiver_fails_on_demand_and_recovers() {
        let receiver = Receiver::start();
        let agent = agent();
        receiver.set_failing(true);
        assert_eq!(receiver.mode(), Mode::Status(503));
        let response = agent.post(receiver.url()).send("one").unwrap();
        assert_eq!(response.status(), 503);
        receiver.set_mode(Mode::Drop);
        assert!(
            agent.post(receiver.url()).send("two").is_err(),
            "a dropped connection is an error for the client"
        );
        receiver.set_failing(false);
        let response = agent.post(receiver.url()).send("three").unwrap();
        assert_eq!(response.status(), 200);
        let requests = receiver.wait_for_count(3, T);
        let statuses: Vec<_> = requests.iter().map(|r| r.status).collect();
        // ureq may retry the dropped POST? It must not (POST is not idempotent);
        // every attempt is recorded either way.
        assert_eq!(
            statuses,
            [Some(503), None, Some(200)],
            "{}",
            receiver.describe()
        );
        assert_eq!(receiver.failed_attempts(), 2);
        assert_eq!(receiver.delivered().len(), 1);
        assert_eq!(receiver.delivered()[0].text(), "three");
    }

    #[test]
    fn receiver_stall_holds_the_answer_until_the_client_gives_up() {
        let receiver = Receiver::start();
        receiver.set_mode(Mode::Stall);
        let impatient: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_millis(300)))
            .build()
            .into();
        let started = Instant::now();
        assert!(impatient.post(receiver.url()).send("x").is_err());
        assert!(started.elapsed() >= Duration::from_millis(250));
        let requests = receiver.wait_for_count(1, T);
        assert_eq!(requests[0].status, None);
        assert_eq!(receiver.failed_attempts(), 1);
    }

    #[test]
    fn receiver_rejects_malformed_requests() {
        let receiver = Receiver::start();
        let answer = raw_exchange(&receiver, b"nonsense\r\n\r\n");
        assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
        let answer = raw_exchange(
            &receiver,
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        );
        assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
        let answer = raw_exchange(
            &receiver,
            b"POST / HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n",
        );
        assert!(answer.starts_with("HTTP/1.1 413 "), "{answer}");
        assert_eq!(receiver.count(), 0);
        // And it still works.
        assert_eq!(
            agent().post(receiver.url()).send("ok").unwrap().status(),
            200
        );
    }

    #[test]
    fn receiver_keeps_at_most_its_limit() {
        let receiver = Receiver::start_with_limit(2);
        let agent = agent();
        for i in 0..4 {
            let response = agent.post(receiver.url()).send(format!("{i}")).unwrap();
            assert_eq!(response.status(), 200);
        }
        assert_eq!(receiver.count(), 4);
        assert_eq!(receiver.not_stored(), 2);
        let bodies: Vec<_> = receiver.requests().iter().map(Received::text).collect();
        assert_eq!(bodies, ["0", "1"]);
    }

    #[test]
    fn receiver_wait_for_fails_with_what_was_received() {
        let receiver = Receiver::start();
        agent()
            .post(receiver.url())
            .send_json(json!({"status": "resolved"}))
            .unwrap();
        receiver.wait_for_count(1, T);
        assert!(receiver
            .try_wait_for(|r| r.len() >= 2, Duration::from_millis(100))
            .is_none());
        let failure = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            receiver.wait_for(
                |r| r.iter().any(|r| r.json().unwrap()["status"] == "firing"),
                Duration::from_millis(100),
            )
        }))
        .unwrap_err();
        let message = failure.downcast_ref::<String>().unwrap();
        assert!(message.contains("did not arrive within"), "{message}");
        assert!(message.contains(r#""status":"resolved""#), "{message}");
        assert!(message.contains("POST /hook -> 200"), "{message}");
    }

    #[test]
    fn receiver_wait_for_wakes_on_arrival() {
        let receiver = Receiver::start();
        let url = receiver.url();
        let sender = thread::spawn(move || {
            thread::sleep(Duration::from_millis(200));
            agent().post(url).send("late").unwrap().status()
        });
        let started = Instant::now();
        let requests = receiver.wait_for(|r| !r.is_empty(), T);
        assert_eq!(requests[0].text(), "late");
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(sender.join().unwrap(), 200);
    }

    #[test]
    fn receiver_drop_is_prompt_with_open_connections() {
        let receiver = Receiver::start();
        let addr = receiver.addr();
        // An idle keep-alive connection and a half-sent request.
        let _idle = TcpStream::connect(addr).unwrap();
        let mut partial = TcpStream::connect(addr).unwrap();
        partial
            .write_all(b"POST /hook HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc")
            .unwrap();
        receiver.set_mode(Mode::Stall);
        let mut stalled = TcpStream::connect(addr).unwrap();
        stalled
            .write_all(b"POST /hook HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
            .unwrap();
        receiver.wait_for_count(1, T);
        let started = Instant::now();
        drop(receiver);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "drop took {:?}",
            started.elapsed()
        );
        assert!(TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err());
    }
}
