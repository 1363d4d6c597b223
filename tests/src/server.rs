//! The `citytsdb` process under test and an HTTP client for it.
//!
//! [`Server`] owns one running `citytsdb serve` child: it is killed when the value
//! is dropped, so no server outlives its test. Every HTTP call is bounded by a
//! global timeout, and 4xx/5xx answers are returned as values, never as errors:
//! an `Err` from a [`Client`] means the server could not be reached at all.

use std::collections::HashMap;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::plan;
use crate::Row;

/// Longest any single HTTP call may take, body included.
const HTTP_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a started server has to answer `GET /health`.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How often `GET /health` is tried while waiting for a server.
const READY_POLL: Duration = Duration::from_millis(50);
/// How long a graceful stop (SIGTERM) may take before the test fails.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest response body read: query answers of the tests stay far below it.
const MAX_BODY: u64 = 1 << 30;
/// Flags every test server gets unless the test passes them itself: flushes
/// happen only when a test asks for them.
const DEFAULT_FLAGS: [(&str, &str); 2] =
    [("--flush-interval", "3600s"), ("--flush-rows", "100000000")];

/// The workspace root: this crate's parent directory.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives inside the workspace")
        .to_path_buf()
}

/// Cargo's target directory: `$CARGO_TARGET_DIR` (relative to the workspace
/// root when relative) or `<workspace root>/target`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => workspace_root().join(dir),
        _ => workspace_root().join("target"),
    }
}

/// The `citytsdb` binary, built once per test process.
///
/// `$CITYTSDB_BIN`, when set, names a binary to use as it is (the test command
/// sets it to the binary of its one build). Otherwise `cargo build -p
/// citytsdb-server --bin citytsdb` runs the first time this is called (a no-op
/// when the binary is up to date; output shown, the test fails if the build
/// does), and the binary is `<target dir>/debug/citytsdb`: after an edit, only
/// the binary is rebuilt and relinked, not every test and benchmark.
pub fn binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        if let Some(bin) = std::env::var_os("CITYTSDB_BIN").filter(|b| !b.is_empty()) {
            return PathBuf::from(bin);
        }
        let cargo = std::env::var_os("CARGO")
            .or_else(|| option_env!("CARGO").map(Into::into))
            .unwrap_or_else(|| "cargo".into());
        let args = ["build", "-p", "citytsdb-server", "--bin", "citytsdb"];
        let mut build = Command::new(&cargo);
        build
            .args(args)
            .current_dir(workspace_root())
            .stdin(Stdio::null());
        // Cargo runs this test with its package's variables set; a dependency whose
        // build script watches one (ring watches CARGO_MANIFEST_DIR) would be seen
        // as changed, and with it most of the stack rebuilt.
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            let set_by_cargo = key.starts_with("CARGO_PKG_")
                || key.starts_with("CARGO_MANIFEST_")
                || key.starts_with("CARGO_BIN_")
                || matches!(
                    key.as_ref(),
                    "CARGO_CRATE_NAME"
                        | "CARGO_PRIMARY_PACKAGE"
                        | "CARGO_TARGET_TMPDIR"
                        | "CARGO_RUSTC_CURRENT_DIR"
                        | "OUT_DIR"
                );
            if set_by_cargo {
                build.env_remove(key.as_ref());
            }
        }
        let status = build.status().unwrap_or_else(|e| {
            panic!("could not run {cargo:?} build for the citytsdb binary: {e}")
        });
        assert!(
            status.success(),
            "`cargo {}` failed ({status}); see its output above",
            args.join(" ")
        );
        let bin = target_dir().join("debug").join("citytsdb");
        assert!(
            bin.is_file(),
            "cargo build succeeded but {} does not exist",
            bin.display()
        );
        bin
    })
}

/// An HTTP agent with the given global timeout that returns 4xx/5xx as values.
fn agent(timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .http_status_as_error(false)
        .build()
        .into()
}

/// Status and body (lossily decoded as UTF-8) of a response.
fn answer(mut response: ureq::http::Response<ureq::Body>) -> Result<(u16, String), ureq::Error> {
    let status = response.status().as_u16();
    let bytes = response
        .body_mut()
        .with_config()
        .limit(MAX_BODY)
        .read_to_vec()?;
    Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
}

/// A cheap, cloneable HTTP client of one server, usable from many threads.
///
/// Every method returns `(status, body)`; `Err` only when the server could not be
/// reached or the call passed its timeout (as when the server was killed).
#[derive(Clone)]
pub struct Client {
    agent: ureq::Agent,
    base: String,
}

impl Client {
    /// A client of the server at `base` (`http://127.0.0.1:PORT`).
    pub fn new(base: impl Into<String>) -> Client {
        Client {
            agent: agent(HTTP_TIMEOUT),
            base: base.into(),
        }
    }

    /// The server's base URL, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> &str {
        &self.base
    }

    /// `GET path` (path starts with `/`).
    pub fn get(&self, path: &str) -> Result<(u16, String), ureq::Error> {
        answer(self.agent.get(format!("{}{path}", self.base)).call()?)
    }

    /// `POST /api/v1/write?db=DB&precision=P` with a line-protocol body.
    pub fn write(
        &self,
        db: &str,
        precision: &str,
        body: &[u8],
    ) -> Result<(u16, String), ureq::Error> {
        self.write_params(&[("db", db), ("precision", precision)], body)
    }

    /// `POST /api/v1/write` with the given query parameters and raw body.
    pub fn write_params(
        &self,
        params: &[(&str, &str)],
        body: &[u8],
    ) -> Result<(u16, String), ureq::Error> {
        let request = self
            .agent
            .post(format!("{}/api/v1/write", self.base))
            .query_pairs(params.iter().copied());
        answer(request.send(body)?)
    }

    /// `GET /api/v1/query?db=DB&sql=SQL&format=FORMAT`.
    pub fn query(&self, db: &str, sql: &str, format: &str) -> Result<(u16, String), ureq::Error> {
        let request = self
            .agent
            .get(format!("{}/api/v1/query", self.base))
            .query("db", db)
            .query("sql", sql)
            .query("format", format);
        answer(request.call()?)
    }

    /// `POST /api/v1/query` with the JSON body `{"db", "sql", "format"}`.
    pub fn query_post(
        &self,
        db: &str,
        sql: &str,
        format: &str,
    ) -> Result<(u16, String), ureq::Error> {
        let body = serde_json::json!({"db": db, "sql": sql, "format": format});
        answer(
            self.agent
                .post(format!("{}/api/v1/query", self.base))
                .send_json(&body)?,
        )
    }

    /// `POST /api/v1/query` with a raw body (for malformed-request tests).
    pub fn query_post_raw(&self, body: &[u8]) -> Result<(u16, String), ureq::Error> {
        let request = self
            .agent
            .post(format!("{}/api/v1/query", self.base))
            .content_type("application/json");
        answer(request.send(body)?)
    }

    /// `POST /api/v1/flush?db=DB`.
    pub fn flush(&self, db: &str) -> Result<(u16, String), ureq::Error> {
        answer(
            self.agent
                .post(format!("{}/api/v1/flush", self.base))
                .query("db", db)
                .send_empty()?,
        )
    }

    /// `POST path` with a raw body.
    pub fn post(&self, path: &str, body: &[u8]) -> Result<(u16, String), ureq::Error> {
        let request = self
            .agent
            .post(format!("{}{path}", self.base))
            .content_type("application/json");
        answer(request.send(body)?)
    }

    /// `PUT path` with a raw body.
    pub fn put(&self, path: &str, body: &[u8]) -> Result<(u16, String), ureq::Error> {
        let request = self
            .agent
            .put(format!("{}{path}", self.base))
            .content_type("application/json");
        answer(request.send(body)?)
    }

    /// `DELETE path`.
    pub fn delete(&self, path: &str) -> Result<(u16, String), ureq::Error> {
        answer(self.agent.delete(format!("{}{path}", self.base)).call()?)
    }

    /// `POST /api/v1/compact`.
    pub fn compact(&self) -> Result<(u16, String), ureq::Error> {
        answer(
            self.agent
                .post(format!("{}/api/v1/compact", self.base))
                .send_empty()?,
        )
    }
}

/// A running `citytsdb serve` process; killed (SIGKILL) when dropped.
pub struct Server {
    child: Option<Child>,
    client: Client,
    data_dir: PathBuf,
    log_path: PathBuf,
}

impl Server {
    /// Starts a server on `data_dir` (created if missing) with the test defaults:
    /// `--flush-interval 3600s --flush-rows 100000000`, so nothing is flushed
    /// unless the test asks. Returns once `GET /health` answers 200.
    pub fn start(data_dir: &Path) -> Server {
        Server::start_with(data_dir, &[])
    }

    /// Like [`Server::start`] with extra command-line arguments; a default flag
    /// the extra arguments name themselves is left out.
    pub fn start_with(data_dir: &Path, extra_args: &[&str]) -> Server {
        Server::start_with_env(data_dir, extra_args, &[])
    }

    /// Like [`Server::start_with`], with extra environment variables for the server.
    pub fn start_with_env(data_dir: &Path, extra_args: &[&str], env: &[(&str, &str)]) -> Server {
        let bin = binary();
        fs::create_dir_all(data_dir)
            .unwrap_or_else(|e| panic!("create data dir {}: {e}", data_dir.display()));
        let log_path = log_path_for(data_dir);
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .unwrap_or_else(|e| panic!("open server log {}: {e}", log_path.display()));
        // Port 0: the server binds a free port itself and logs it. A port found free
        // here and handed to the server could be taken by a parallel test's server
        // first, which would then answer this one's health checks.
        let mut args: Vec<String> = vec![
            "serve".into(),
            "--data-dir".into(),
            data_dir.display().to_string(),
            "--http-bind".into(),
            "127.0.0.1:0".into(),
        ];
        for (flag, value) in DEFAULT_FLAGS {
            if !extra_args.contains(&flag) {
                args.push(flag.into());
                args.push(value.into());
            }
        }
        args.extend(extra_args.iter().map(|a| a.to_string()));
        writeln!(
            log,
            "=== test harness: {} {}",
            bin.display(),
            args.join(" ")
        )
        .expect("write to the server log");
        // This start's lines of the log (which earlier starts on the directory share)
        // begin here.
        let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
        let stdout = log.try_clone().expect("clone the server log handle");
        let child = Command::new(bin)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(log)
            .env("RUST_BACKTRACE", "1")
            .envs(env.iter().copied())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
        let mut server = Server {
            child: Some(child),
            client: Client::new("http://127.0.0.1:0".to_string()),
            data_dir: data_dir.to_path_buf(),
            log_path,
        };
        if let Err(exit) = server.wait_ready(log_start) {
            server.fail(&format!("citytsdb exited before it was ready ({exit})"));
        }
        server
    }

    /// Waits for the server to log the address it serves on (after byte
    /// `log_start` of its log), then polls `GET /health` there until it answers
    /// 200 `{"status":"ok"}`; `Err` with the exit status if the process died first.
    /// Fails the test after 60 s.
    fn wait_ready(&mut self, log_start: u64) -> Result<(), ExitStatus> {
        let probe = agent(Duration::from_secs(5));
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut url = None;
        loop {
            if let Some(status) = self
                .child_mut()
                .try_wait()
                .expect("poll the server process")
            {
                return Err(status);
            }
            if url.is_none() {
                if let Some(port) = self.served_port(log_start) {
                    self.client = Client::new(format!("http://127.0.0.1:{port}"));
                    url = Some(format!("{}/health", self.client.url()));
                }
            }
            if let Some(Ok(response)) = url.as_ref().map(|u| probe.get(u).call()) {
                if let Ok((200, body)) = answer(response) {
                    let ok = serde_json::from_str::<Value>(&body)
                        .map(|v| v["status"] == "ok")
                        .unwrap_or(false);
                    if ok {
                        return Ok(());
                    }
                    self.fail(&format!(
                        "GET /health answered 200 with {body:?}, not {{\"status\":\"ok\"}}"
                    ));
                }
            }
            if Instant::now() > deadline {
                self.fail(&format!(
                    "GET /health did not answer 200 within {READY_TIMEOUT:?}"
                ));
            }
            thread::sleep(READY_POLL);
        }
    }

    /// The port in the server's "citytsdb is serving addr=127.0.0.1:PORT" line,
    /// once it is in the log after byte `log_start`.
    fn served_port(&self, log_start: u64) -> Option<u16> {
        let log = fs::read(&self.log_path).ok()?;
        let text = String::from_utf8_lossy(log.get(log_start as usize..)?);
        let line = text.lines().find(|l| l.contains("citytsdb is serving"))?;
        let after = &line[line.find("127.0.0.1:")? + "127.0.0.1:".len()..];
        let digits: String = after.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    }

    fn child_mut(&mut self) -> &mut Child {
        self.child
            .as_mut()
            .expect("the server process is held until stop or kill")
    }

    /// The base URL, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> &str {
        self.client.url()
    }

    /// A cloneable client for other threads.
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// The data directory the server was started on.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("server process").id()
    }

    /// Everything the server (and earlier servers on this data dir) logged.
    pub fn log(&self) -> String {
        fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_else(|e| format!("<no server log at {}: {e}>", self.log_path.display()))
    }

    /// Fails the test with `message` and the tail of the server log.
    pub fn fail(&self, message: &str) -> ! {
        let log = self.log();
        let tail_start = log.len().saturating_sub(20_000);
        let tail_start = (tail_start..log.len())
            .find(|&i| log.is_char_boundary(i))
            .unwrap_or(0);
        panic!(
            "{message}\n--- server log {} (tail) ---\n{}\n--- end of server log ---",
            self.log_path.display(),
            &log[tail_start..]
        );
    }

    /// Unwraps an HTTP result, failing the test with the server log if the server
    /// could not be reached.
    fn reached<T>(&self, what: &str, result: Result<T, ureq::Error>) -> T {
        result.unwrap_or_else(|e| self.fail(&format!("{what}: the server did not answer: {e}")))
    }

    /// `GET /health` answers 200 `{"status":"ok"}`.
    pub fn is_healthy(&self) -> bool {
        match self.client.get("/health") {
            Ok((200, body)) => serde_json::from_str::<Value>(&body)
                .map(|v| v["status"] == "ok")
                .unwrap_or(false),
            _ => false,
        }
    }

    /// `GET path` as `(status, body)`.
    pub fn get(&self, path: &str) -> (u16, String) {
        self.reached(&format!("GET {path}"), self.client.get(path))
    }

    /// Writes line protocol; `(status, body)`.
    pub fn write(&self, db: &str, precision: &str, body: impl AsRef<[u8]>) -> (u16, String) {
        self.reached("write", self.client.write(db, precision, body.as_ref()))
    }

    /// Writes line protocol with arbitrary query parameters; `(status, body)`.
    pub fn write_params(&self, params: &[(&str, &str)], body: impl AsRef<[u8]>) -> (u16, String) {
        self.reached("write", self.client.write_params(params, body.as_ref()))
    }

    /// Writes line protocol and fails the test unless the answer is 204.
    pub fn write_ok(&self, db: &str, precision: &str, body: impl AsRef<[u8]>) {
        let (status, answer) = self.write(db, precision, body);
        if status != 204 {
            self.fail(&format!(
                "write to {db} answered {status}, expected 204: {answer}"
            ));
        }
    }

    /// `GET /api/v1/query` with any format; `(status, body)`.
    pub fn query_raw(&self, db: &str, sql: &str, format: &str) -> (u16, String) {
        self.reached(&format!("query {sql}"), self.client.query(db, sql, format))
    }

    /// `POST /api/v1/query` with any format; `(status, body)`.
    pub fn query_post(&self, db: &str, sql: &str, format: &str) -> (u16, String) {
        self.reached(
            &format!("query {sql}"),
            self.client.query_post(db, sql, format),
        )
    }

    /// Runs `sql` with `format=json`; fails the test with the server's error on
    /// anything but 200 with a JSON array of objects.
    pub fn query_json(&self, db: &str, sql: &str) -> Vec<Row> {
        let (status, body) = self.query_raw(db, sql, "json");
        if status != 200 {
            self.fail(&format!(
                "query answered {status}: {body}\n  db: {db}\n  sql: {sql}"
            ));
        }
        parse_json_rows(&body).unwrap_or_else(|e| {
            self.fail(&format!(
                "query answer is not rows ({e}): {body}\n  sql: {sql}"
            ))
        })
    }

    /// Flushes the database's write buffer to segments; the `segments_written`
    /// count of the answer.
    pub fn flush(&self, db: &str) -> u64 {
        let (status, body) = self.reached("flush", self.client.flush(db));
        if status != 200 {
            self.fail(&format!("flush of {db} answered {status}: {body}"));
        }
        serde_json::from_str::<Value>(&body)
            .ok()
            .and_then(|v| v["segments_written"].as_u64())
            .unwrap_or_else(|| self.fail(&format!("flush answer lacks segments_written: {body}")))
    }

    /// Compacts every day into one run, collects garbage and sweeps
    /// (`POST /api/v1/compact`); the answer's counters.
    pub fn compact(&self) -> Value {
        let (status, body) = self.reached("compact", self.client.compact());
        if status != 200 {
            self.fail(&format!("compact answered {status}: {body}"));
        }
        serde_json::from_str(&body)
            .unwrap_or_else(|e| self.fail(&format!("compact answer is not JSON ({e}): {body}")))
    }

    /// Runs `EXPLAIN ANALYZE <sql>` and returns the numeric `key=value` pairs of
    /// its `CityScanExec:` line (segments_total, segments_opened, rows_total,
    /// rows_selected, rows_decoded, ...).
    pub fn explain_analyze_metrics(&self, db: &str, sql: &str) -> HashMap<String, u64> {
        let text = self.explain_analyze_text(db, sql);
        plan::scan_metrics(&text).unwrap_or_else(|| {
            self.fail(&format!(
                "no CityScanExec line in EXPLAIN ANALYZE of {sql}:\n{text}"
            ))
        })
    }

    /// The whole plan text of `EXPLAIN ANALYZE <sql>`: every row's `plan`, joined.
    pub fn explain_analyze_text(&self, db: &str, sql: &str) -> String {
        let rows = self.query_json(db, &format!("EXPLAIN ANALYZE {sql}"));
        rows.iter()
            .map(|row| match row.get("plan") {
                Some(Value::String(plan)) => plan.clone(),
                other => self.fail(&format!(
                    "EXPLAIN ANALYZE row without a plan string: {other:?} in {row:?}"
                )),
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Graceful stop: SIGTERM, then wait (at most 30 s) for exit code 0.
    pub fn stop(mut self) {
        let pid = self.pid();
        let sent = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        if !matches!(sent, Ok(s) if s.success()) {
            self.fail(&format!("could not send SIGTERM to {pid}: {sent:?}"));
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Some(status) = self
                .child_mut()
                .try_wait()
                .expect("poll the server process")
            {
                self.child = None;
                if status.code() != Some(0) {
                    self.fail(&format!(
                        "after SIGTERM citytsdb exited with {status}, expected exit code 0"
                    ));
                }
                return;
            }
            if Instant::now() > deadline {
                self.fail(&format!(
                    "citytsdb did not exit within {STOP_TIMEOUT:?} of SIGTERM"
                ));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Crash: SIGKILL, and wait for the process to be gone.
    pub fn kill9(mut self) {
        if let Some(mut child) = self.child.take() {
            // `Child::kill` is SIGKILL on Unix.
            child.kill().expect("SIGKILL the server");
            child.wait().expect("reap the killed server");
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Where a server on `data_dir` logs: `<parent>/<data dir name>.server.log`.
fn log_path_for(data_dir: &Path) -> PathBuf {
    let name = data_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "data".into());
    data_dir
        .parent()
        .unwrap_or(data_dir)
        .join(format!("{name}.server.log"))
}

/// Parses a `format=json` answer: an array of row objects.
pub fn parse_json_rows(body: &str) -> Result<Vec<Row>, String> {
    let value: Value = serde_json::from_str(body).map_err(|e| format!("invalid JSON: {e}"))?;
    let Value::Array(items) = value else {
        return Err("not a JSON array".into());
    };
    items
        .into_iter()
        .map(|item| match item {
            Value::Object(row) => Ok(row),
            other => Err(format!("array element is not an object: {other}")),
        })
        .collect()
}
