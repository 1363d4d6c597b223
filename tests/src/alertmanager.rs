//! A real Prometheus Alertmanager for the alert tests: the reference our webhook
//! notifications and alert wire format are checked against.
//!
//! [`Alertmanager::start`] runs the Debian package's binary
//! (`/usr/bin/prometheus-alertmanager`, version 0.25; `tests/run.sh` installs it)
//! on 127.0.0.1 with a free port, a temporary storage directory, clustering off
//! and a minimal configuration, and returns once `GET /-/ready` answers 200. The
//! process is killed when the value is dropped. [`Alertmanager::start_with_webhook`]
//! routes every alert to a webhook (e.g. a [`crate::receiver::Receiver`]) so a test
//! can see Alertmanager's own notifications: no group wait, a 1 s group interval,
//! resolved notifications on.
//!
//! What Alertmanager 0.25's v2 API does that a test may not expect:
//! - `POST /api/v2/alerts` answers `200` with an empty body (not 201/204), and
//!   `415` unless the `Content-Type` is `application/json`; the body must be a
//!   JSON array, every alert needs at least one label, and times must be full
//!   RFC 3339 (`2020-01-01` alone is a 400).
//! - An alert without `startsAt` starts now; one without `endsAt` gets
//!   `now + resolve_timeout` (5 minutes), so it resolves by itself unless re-sent.
//! - `GET /api/v2/alerts` lists only alerts whose `endsAt` is in the future:
//!   resolving an alert (re-posting it with a past `endsAt`) makes it vanish from
//!   the list; no filter brings it back. Times come back in UTC with milliseconds
//!   (`2020-01-01T00:00:00.000Z`), and each alert carries `fingerprint`,
//!   `receivers`, `status.state` (`active`, `suppressed`, `unprocessed`) and
//!   `updatedAt`.
//!
//! And its webhook notifications (the format citytsdb's own must match):
//! `{"receiver", "status", "alerts": [{"status", "labels", "annotations",
//! "startsAt", "endsAt", "generatorURL", "fingerprint"}], "groupLabels",
//! "commonLabels", "commonAnnotations", "externalURL", "version": "4",
//! "groupKey", "truncatedAlerts"}`. Times there are Go's RFC3339Nano, trailing
//! zeros of the fraction dropped (`…:59.69Z`, where the v2 API writes `…:59.690Z`):
//! compare them parsed ([`parse_rfc3339`]), never as strings. A firing alert's
//! `endsAt` is Go's zero time `0001-01-01T00:00:00Z`; `generatorURL` is `""` when
//! none was posted; `externalURL` is `http://<hostname>:<port>`.

use std::env;
use std::ffi::OsString;
use std::fs::{self, File};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use tempfile::TempDir;

/// Where Debian's `prometheus-alertmanager` package puts the binary.
pub const DEBIAN_BINARY: &str = "/usr/bin/prometheus-alertmanager";
/// The environment variable that names another Alertmanager binary to use.
pub const BINARY_ENV: &str = "ALERTMANAGER_BIN";
/// How long a started Alertmanager has to answer `GET /-/ready` with 200.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How often readiness is probed.
const READY_POLL: Duration = Duration::from_millis(50);
/// Longest one HTTP call to Alertmanager may take.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest response body read from Alertmanager.
const MAX_BODY: u64 = 64 << 20;

/// The Alertmanager binary: `$ALERTMANAGER_BIN` if set, else
/// `/usr/bin/prometheus-alertmanager`, else `prometheus-alertmanager` or
/// `alertmanager` on `PATH`. Fails the test, saying how to install it, when there
/// is none.
pub fn binary() -> &'static Path {
    static BINARY: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match BINARY.get_or_init(|| {
        locate(
            env::var_os(BINARY_ENV).filter(|b| !b.is_empty()),
            Path::new(DEBIAN_BINARY),
            env::var_os("PATH"),
        )
    }) {
        Ok(path) => path,
        Err(message) => panic!("{message}"),
    }
}

/// Finds the binary from an explicit override, the Debian path, and `PATH`.
fn locate(
    explicit: Option<OsString>,
    debian: &Path,
    path_var: Option<OsString>,
) -> Result<PathBuf, String> {
    const HOW: &str = "The alert tests need a real Prometheus Alertmanager: tests/run.sh \
        installs it (Debian package prometheus-alertmanager; by hand: `apt-get install -y \
        prometheus-alertmanager`), or set ALERTMANAGER_BIN to an alertmanager binary.";
    if let Some(explicit) = explicit {
        let path = PathBuf::from(explicit);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(format!(
                "{BINARY_ENV}={} is not a file. {HOW}",
                path.display()
            ))
        };
    }
    if debian.is_file() {
        return Ok(debian.to_path_buf());
    }
    let on_path = path_var.iter().flat_map(env::split_paths).find_map(|dir| {
        ["prometheus-alertmanager", "alertmanager"]
            .iter()
            .map(|name| dir.join(name))
            .find(|candidate| candidate.is_file())
    });
    on_path.ok_or_else(|| {
        format!(
            "Prometheus Alertmanager not found: no {}, and neither prometheus-alertmanager \
             nor alertmanager on PATH. {HOW}",
            debian.display()
        )
    })
}

/// The configuration [`Alertmanager::start`] (`webhook: None`: every alert goes to
/// a receiver that notifies nobody) and [`Alertmanager::start_with_webhook`] use.
///
/// Alerts are grouped by `alertname`; a new group is notified at once
/// (`group_wait: 0s`), changes to it after 1 s (`group_interval`), repeats after
/// an hour; resolved alerts are notified too.
pub fn config_yaml(webhook: Option<&str>) -> String {
    let (receiver, webhook_receiver) = match webhook {
        None => ("\"null\"", String::new()),
        Some(url) => (
            "webhook",
            format!(
                "  - name: webhook\n    webhook_configs:\n      - url: {}\n        \
                 send_resolved: true\n        max_alerts: 0\n",
                // A JSON string is a valid YAML double-quoted scalar.
                Value::String(url.to_string())
            ),
        ),
    };
    format!(
        "route:\n  receiver: {receiver}\n  group_by: ['alertname']\n  group_wait: 0s\n  \
         group_interval: 1s\n  repeat_interval: 1h\nreceivers:\n  - name: \"null\"\n\
         {webhook_receiver}"
    )
}

/// A free port on 127.0.0.1, a moment ago.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0 to find a free port")
        .port()
}

/// A running Prometheus Alertmanager on 127.0.0.1; killed when dropped.
pub struct Alertmanager {
    child: Option<Child>,
    base: String,
    agent: ureq::Agent,
    log_path: PathBuf,
    /// Holds the config, the storage directory and the log; removed on drop,
    /// after the process is gone (fields drop after [`Drop::drop`]).
    dir: TempDir,
}

impl Alertmanager {
    /// Starts an Alertmanager that routes every alert to a receiver notifying
    /// nobody; returns once it is ready.
    pub fn start() -> Alertmanager {
        Alertmanager::start_with_config(&config_yaml(None))
    }

    /// Starts an Alertmanager that notifies `webhook_url` of every alert
    /// (Alertmanager's webhook JSON, version "4"), firing and resolved.
    pub fn start_with_webhook(webhook_url: &str) -> Alertmanager {
        Alertmanager::start_with_config(&config_yaml(Some(webhook_url)))
    }

    /// Starts an Alertmanager with this configuration file text (YAML); returns
    /// once `GET /-/ready` answers 200, failing the test with Alertmanager's log
    /// if that takes over 30 s or the process exits.
    pub fn start_with_config(config: &str) -> Alertmanager {
        let bin = binary();
        let mut dir = tempfile::Builder::new()
            .prefix("alertmanager-")
            .tempdir()
            .expect("create a temporary directory for Alertmanager");
        let config_path = dir.path().join("alertmanager.yml");
        fs::write(&config_path, config).expect("write the Alertmanager config");
        let storage = dir.path().join("data");
        let log_path = dir.path().join("alertmanager.log");
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(HTTP_TIMEOUT))
            .http_status_as_error(false)
            .build()
            .into();
        // The port found free may be taken before Alertmanager binds it; only that
        // failure is retried, on a new port.
        for attempt in 1..=3 {
            let port = free_port();
            let log = File::create(&log_path).expect("create the Alertmanager log");
            let stderr = log.try_clone().expect("clone the Alertmanager log handle");
            let child = Command::new(bin)
                .arg(format!("--config.file={}", config_path.display()))
                .arg(format!("--storage.path={}", storage.display()))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .arg("--cluster.listen-address=")
                .arg("--log.level=debug")
                .current_dir(dir.path())
                .stdin(Stdio::null())
                .stdout(log)
                .stderr(stderr)
                .spawn()
                .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
            let mut am = Alertmanager {
                child: Some(child),
                base: format!("http://127.0.0.1:{port}"),
                agent: agent.clone(),
                log_path: log_path.clone(),
                dir,
            };
            match am.wait_ready() {
                Ok(()) => return am,
                Err(exit) => {
                    let port_taken = am.log().contains("address already in use");
                    if attempt < 3 && port_taken {
                        // Take the directory back for the next attempt.
                        dir = std::mem::replace(
                            &mut am.dir,
                            TempDir::new().expect("create a placeholder temporary directory"),
                        );
                        continue;
                    }
                    am.fail(&format!("Alertmanager exited before it was ready ({exit})"));
                }
            }
        }
        unreachable!("the last attempt returns or fails the test")
    }

    /// Polls `GET /-/ready`; `Err` with the exit status if the process died.
    fn wait_ready(&mut self) -> Result<(), std::process::ExitStatus> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let child = self.child.as_mut().expect("the Alertmanager process");
            if let Some(status) = child.try_wait().expect("poll the Alertmanager process") {
                self.child = None;
                return Err(status);
            }
            if let Ok((200, _)) = self.try_get("/-/ready") {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.fail(&format!(
                    "Alertmanager did not answer 200 to GET /-/ready within {READY_TIMEOUT:?}"
                ));
            }
            thread::sleep(READY_POLL);
        }
    }

    /// The base URL, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> &str {
        &self.base
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the Alertmanager process").id()
    }

    /// The configuration file Alertmanager was started with.
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("alertmanager.yml")
    }

    /// Everything Alertmanager logged (debug level).
    pub fn log(&self) -> String {
        fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_else(|e| format!("<no log at {}: {e}>", self.log_path.display()))
    }

    /// Fails the test with `message` and the tail of Alertmanager's log.
    pub fn fail(&self, message: &str) -> ! {
        let log = self.log();
        let start = log.len().saturating_sub(20_000);
        let start = (start..log.len())
            .find(|&i| log.is_char_boundary(i))
            .unwrap_or(0);
        panic!(
            "{message}\n--- Alertmanager log (tail) ---\n{}\n--- end of Alertmanager log ---",
            &log[start..]
        );
    }

    fn try_get(&self, path: &str) -> Result<(u16, String), ureq::Error> {
        let mut response = self.agent.get(format!("{}{path}", self.base)).call()?;
        let status = response.status().as_u16();
        let body = response
            .body_mut()
            .with_config()
            .limit(MAX_BODY)
            .read_to_string()?;
        Ok((status, body))
    }

    /// `GET path` (starting with `/`) as `(status, body)`; fails the test if
    /// Alertmanager does not answer.
    pub fn get(&self, path: &str) -> (u16, String) {
        self.try_get(path)
            .unwrap_or_else(|e| self.fail(&format!("GET {path}: no answer: {e}")))
    }

    /// `GET path` that must answer 200 with JSON; the parsed body.
    pub fn get_json(&self, path: &str) -> Value {
        let (status, body) = self.get(path);
        if status != 200 {
            self.fail(&format!("GET {path} answered {status}: {body}"));
        }
        serde_json::from_str(&body)
            .unwrap_or_else(|e| self.fail(&format!("GET {path}: not JSON ({e}): {body}")))
    }

    /// The active alerts, `GET /api/v2/alerts` (resolved ones are never listed).
    pub fn alerts(&self) -> Vec<Value> {
        match self.get_json("/api/v2/alerts") {
            Value::Array(alerts) => alerts,
            other => self.fail(&format!("GET /api/v2/alerts is not an array: {other}")),
        }
    }

    /// The alert groups, `GET /api/v2/alerts/groups`.
    pub fn alert_groups(&self) -> Vec<Value> {
        match self.get_json("/api/v2/alerts/groups") {
            Value::Array(groups) => groups,
            other => self.fail(&format!(
                "GET /api/v2/alerts/groups is not an array: {other}"
            )),
        }
    }

    /// `POST /api/v2/alerts` with this JSON (an array of alerts, each with
    /// `labels` and optionally `annotations`, `startsAt`, `endsAt`,
    /// `generatorURL`) as `(status, body)`.
    pub fn post_alerts(&self, alerts: &Value) -> (u16, String) {
        let url = format!("{}/api/v2/alerts", self.base);
        let answer = self.agent.post(&url).send_json(alerts).and_then(|mut r| {
            let status = r.status().as_u16();
            let body = r
                .body_mut()
                .with_config()
                .limit(MAX_BODY)
                .read_to_string()?;
            Ok((status, body))
        });
        answer.unwrap_or_else(|e| self.fail(&format!("POST /api/v2/alerts: no answer: {e}")))
    }

    /// [`Alertmanager::post_alerts`] that must answer 200.
    pub fn post_alerts_ok(&self, alerts: &Value) {
        let (status, body) = self.post_alerts(alerts);
        if status != 200 {
            self.fail(&format!(
                "POST /api/v2/alerts answered {status}: {body}\n  alerts: {alerts}"
            ));
        }
    }
}

impl Drop for Alertmanager {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `t` in RFC 3339 UTC with milliseconds, as Alertmanager writes times:
/// `2024-05-01T12:00:00.123Z`. Times before 1970 are written as 1970.
pub fn rfc3339(t: SystemTime) -> String {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days as i64);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60,
        since.subsec_millis()
    )
}

/// Parses an RFC 3339 time (`Z` or `±hh:mm` offset, any fraction of a second,
/// `T` or space between date and time); `None` if it is not one or is before 1970.
pub fn parse_rfc3339(text: &str) -> Option<SystemTime> {
    let b = text.as_bytes();
    let digits = |range: std::ops::Range<usize>| -> Option<u64> {
        let part = text.get(range)?;
        part.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| part.parse().ok())?
    };
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let (year, month, day) = (digits(0..4)?, digits(5..7)?, digits(8..10)?);
    let (hour, minute, second) = (digits(11..13)?, digits(14..16)?, digits(17..19)?);
    if !(1..=12).contains(&month) || day == 0 || day > 31 || hour > 23 || minute > 59 {
        return None;
    }
    if second > 60 {
        return None;
    }
    let mut i = 19;
    let mut nanos = 0u64;
    if b[i] == b'.' {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            if i - start < 9 {
                nanos = nanos * 10 + u64::from(b[i] - b'0');
            }
            i += 1;
        }
        if i == start {
            return None;
        }
        for _ in (i - start)..9 {
            nanos *= 10;
        }
    }
    let offset: i64 = match text.get(i..)? {
        "Z" | "z" => 0,
        zone if zone.len() == 6 && matches!(zone.as_bytes()[0], b'+' | b'-') => {
            if zone.as_bytes()[3] != b':' {
                return None;
            }
            let minutes = (digits(i + 1..i + 3)? * 60 + digits(i + 4..i + 6)?) as i64;
            if zone.starts_with('-') {
                -minutes
            } else {
                minutes
            }
        }
        _ => return None,
    };
    let days = days_from_civil(year as i64, month as u32, day as u32);
    let secs = days * 86_400 + (hour * 3600 + minute * 60 + second) as i64 - offset * 60;
    let secs = u64::try_from(secs).ok()?;
    Some(UNIX_EPOCH + Duration::new(secs, nanos as u32))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
/// `days_from_civil`).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let yoe = year.rem_euclid(400);
    let mp = (i64::from(month) + 9) % 12;
    let doy = (153 * mp + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day number since 1970-01-01 (`civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::receiver::Receiver;
    use serde_json::json;

    const T: Duration = Duration::from_secs(20);

    /// Now, truncated to whole milliseconds (what Alertmanager keeps).
    fn now_ms() -> SystemTime {
        let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        UNIX_EPOCH + Duration::from_millis(since.as_millis() as u64)
    }

    #[test]
    fn alertmanager_rfc3339_round_trips() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_709_251_199_123);
        assert_eq!(rfc3339(t), "2024-02-29T23:59:59.123Z");
        assert_eq!(parse_rfc3339("2024-02-29T23:59:59.123Z"), Some(t));
        assert_eq!(parse_rfc3339("2024-03-01T01:59:59.123+02:00"), Some(t));
        assert_eq!(parse_rfc3339("2024-02-29T20:59:59.123-03:00"), Some(t));
        assert_eq!(
            parse_rfc3339("2024-02-29T23:59:59.123456789Z"),
            Some(t + Duration::from_nanos(456_789))
        );
        assert_eq!(
            parse_rfc3339("2024-02-29T23:59:59Z"),
            Some(t - Duration::from_millis(123))
        );
        for bad in [
            "",
            "2024-02-29",
            "2024-02-29T23:59:59",
            "2024-02-29T23:59:59.Z",
            "2024-13-01T00:00:00Z",
            "2024-02-29T23:59:59+0200",
            "1969-12-31T23:59:59Z",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
        let now = now_ms();
        assert_eq!(parse_rfc3339(&rfc3339(now)), Some(now));
        for days in [0i64, 59, 365, 10_957, 19_782, 100_000] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }

    #[test]
    fn alertmanager_missing_binary_says_how_to_install_it() {
        let nowhere = Path::new("/nonexistent/prometheus-alertmanager");
        let message = locate(None, nowhere, Some("/nonexistent-dir".into())).unwrap_err();
        assert!(message.contains("tests/run.sh installs it"), "{message}");
        assert!(message.contains("apt-get install"), "{message}");
        let message = locate(Some("/nonexistent/am".into()), nowhere, None).unwrap_err();
        assert!(
            message.contains("ALERTMANAGER_BIN=/nonexistent/am"),
            "{message}"
        );
        assert!(message.contains("tests/run.sh"), "{message}");
    }

    #[test]
    fn alertmanager_config_quotes_the_webhook() {
        let config = config_yaml(Some("http://127.0.0.1:1/hook?a=\"b\""));
        assert!(
            config.contains(r#"url: "http://127.0.0.1:1/hook?a=\"b\"""#),
            "{config}"
        );
        assert!(config.contains("receiver: webhook"), "{config}");
        assert!(config_yaml(None).contains("receiver: \"null\""));
    }

    #[test]
    fn alertmanager_accepts_lists_and_resolves_a_posted_alert() {
        let am = Alertmanager::start();
        assert!(am.url().starts_with("http://127.0.0.1:"));
        assert!(am.alerts().is_empty());
        let status = am.get_json("/api/v2/status");
        assert_eq!(status["cluster"]["status"], "disabled", "{status}");
        assert!(
            status["versionInfo"]["version"]
                .as_str()
                .unwrap()
                .starts_with("0."),
            "{status}"
        );

        let starts = now_ms() - Duration::from_secs(60);
        let posted_at = SystemTime::now();
        am.post_alerts_ok(&json!([{
            "labels": {"alertname": "x", "device": "m-1"},
            "annotations": {"summary": "cover m-1 tilted"},
            "startsAt": rfc3339(starts),
        }]));
        let alerts = am.alerts();
        assert_eq!(alerts.len(), 1, "{alerts:?}");
        let alert = &alerts[0];
        assert_eq!(alert["labels"], json!({"alertname": "x", "device": "m-1"}));
        assert_eq!(alert["annotations"], json!({"summary": "cover m-1 tilted"}));
        assert_eq!(alert["startsAt"], rfc3339(starts));
        assert_eq!(alert["status"]["state"], "active", "{alert}");
        assert_eq!(alert["receivers"], json!([{"name": "null"}]));
        assert!(!alert["fingerprint"].as_str().unwrap().is_empty());
        // No endsAt sent: Alertmanager sets now + resolve_timeout (5 minutes).
        let ends = parse_rfc3339(alert["endsAt"].as_str().unwrap()).unwrap();
        let timeout = ends.duration_since(posted_at).unwrap();
        assert!(
            timeout > Duration::from_secs(290) && timeout < Duration::from_secs(310),
            "{alert}"
        );

        // The v2 API's input checks.
        let (status, body) = am.post_alerts(&json!([{"labels": {}}]));
        assert_eq!(status, 400, "{body}");
        let (status, body) = am.post_alerts(&json!({"labels": {"alertname": "x"}}));
        assert_eq!(status, 400, "{body}");

        // Resolving (a past endsAt) takes the alert off the list.
        am.post_alerts_ok(&json!([{
            "labels": {"alertname": "x", "device": "m-1"},
            "annotations": {},
            "startsAt": rfc3339(starts),
            "endsAt": rfc3339(now_ms() - Duration::from_secs(1)),
        }]));
        assert_eq!(am.alerts(), Vec::<Value>::new());
    }

    #[test]
    fn alertmanager_notifies_a_webhook_receiver() {
        let receiver = Receiver::start();
        let am = Alertmanager::start_with_webhook(&receiver.url());
        let starts = now_ms() - Duration::from_secs(5);
        let alert = json!({
            "labels": {"alertname": "cover-displaced", "device": "m-7", "severity": "critical"},
            "annotations": {"summary": "cover m-7 tilted 20 degrees"},
            "startsAt": rfc3339(starts),
        });
        am.post_alerts_ok(&json!([alert]));
        let fingerprint = am.alerts()[0]["fingerprint"].clone();
        let firing = receiver.wait_for(
            |r| {
                r.iter()
                    .any(|r| r.json().is_some_and(|b| b["status"] == "firing"))
            },
            T,
        );
        let notification = firing.last().unwrap();
        assert_eq!(notification.method, "POST");
        assert_eq!(notification.path, "/hook");
        let body = notification.json().unwrap();
        assert_eq!(body["version"], "4", "{body}");
        assert_eq!(body["receiver"], "webhook", "{body}");
        assert_eq!(body["groupLabels"], json!({"alertname": "cover-displaced"}));
        assert_eq!(body["commonLabels"], alert["labels"], "{body}");
        assert_eq!(body["commonAnnotations"], alert["annotations"], "{body}");
        assert_eq!(body["truncatedAlerts"], 0, "{body}");
        assert_eq!(
            body["groupKey"], "{}:{alertname=\"cover-displaced\"}",
            "{body}"
        );
        let sent = &notification.alerts()[0];
        assert_eq!(sent["status"], "firing", "{body}");
        assert_eq!(sent["labels"], alert["labels"], "{body}");
        assert_eq!(sent["annotations"], alert["annotations"], "{body}");
        // The webhook writes times as Go's RFC3339Nano: trailing zeros of the
        // fraction dropped (`.69Z`, not `.690Z` as the v2 API writes them).
        let time = |v: &Value| v.as_str().and_then(parse_rfc3339);
        assert_eq!(time(&sent["startsAt"]), Some(starts), "{body}");
        // A firing alert's endsAt in the webhook is Go's zero time.
        assert_eq!(sent["endsAt"], "0001-01-01T00:00:00Z", "{body}");
        assert_eq!(sent["fingerprint"], fingerprint, "{body}");
        assert_eq!(sent["generatorURL"], "", "{body}");

        let ends = now_ms() - Duration::from_secs(1);
        let mut resolved = alert.clone();
        resolved["endsAt"] = json!(rfc3339(ends));
        am.post_alerts_ok(&json!([resolved]));
        let all = receiver.wait_for(
            |r| {
                r.iter()
                    .any(|r| r.json().is_some_and(|b| b["status"] == "resolved"))
            },
            T,
        );
        let notification = all.last().unwrap();
        let body = notification.json().unwrap();
        let sent = &notification.alerts()[0];
        assert_eq!(sent["status"], "resolved", "{body}");
        assert_eq!(time(&sent["endsAt"]), Some(ends), "{body}");
        assert_eq!(sent["fingerprint"], fingerprint, "{body}");
        assert!(all.iter().all(|r| r.delivered()), "{}", receiver.describe());
    }
}
