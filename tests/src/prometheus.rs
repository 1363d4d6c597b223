//! A real Prometheus (Debian's `prometheus` package) on loopback, scraping one
//! target, for the `/metrics` tests. Killed and its files removed on drop.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

/// Where Debian installs it.
const DEBIAN_BINARY: &str = "/usr/bin/prometheus";

/// The Prometheus binary: `$PROMETHEUS_BIN`, else Debian's, else `prometheus` on
/// `PATH`; fails the test saying how to install it.
pub fn binary() -> PathBuf {
    if let Some(b) = std::env::var_os("PROMETHEUS_BIN").filter(|b| !b.is_empty()) {
        return PathBuf::from(b);
    }
    if Path::new(DEBIAN_BINARY).is_file() {
        return PathBuf::from(DEBIAN_BINARY);
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join("prometheus"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "Prometheus not found: tests/run.sh installs it (Debian package prometheus), \
                 or set PROMETHEUS_BIN"
            )
        })
}

/// A running Prometheus.
pub struct Prometheus {
    child: Option<Child>,
    base: String,
    agent: ureq::Agent,
    dir: TempDir,
}

impl Prometheus {
    /// Starts Prometheus scraping `target` (`127.0.0.1:PORT`) every second;
    /// returns once it is ready.
    pub fn start(target: &str) -> Prometheus {
        let dir = tempfile::Builder::new()
            .prefix("prometheus-")
            .tempdir()
            .expect("a temporary directory for Prometheus");
        let config = dir.path().join("prometheus.yml");
        fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n\
                 scrape_configs:\n  - job_name: citytsdb\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .expect("write the Prometheus config");
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(10)))
            .http_status_as_error(false)
            .build()
            .into();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let log = File::create(dir.path().join("prometheus.log")).expect("the Prometheus log");
        let child = Command::new(binary())
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("the log"))
            .stderr(log)
            .spawn()
            .expect("spawn Prometheus");
        let mut p = Prometheus {
            child: Some(child),
            base: format!("http://127.0.0.1:{port}"),
            agent,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = p.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("Prometheus exited ({status}):\n{}", p.log());
            }
            if p.get("/-/ready").map(|(s, _)| s == 200).unwrap_or(false) {
                return p;
            }
            assert!(
                Instant::now() < deadline,
                "Prometheus was not ready within 30 s:\n{}",
                p.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn get(&self, path: &str) -> Result<(u16, String), ureq::Error> {
        let mut r = self.agent.get(format!("{}{path}", self.base)).call()?;
        let status = r.status().as_u16();
        Ok((status, r.body_mut().read_to_string()?))
    }

    /// Prometheus' own log.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// The instant vector `query` evaluates to: (labels, value) pairs.
    pub fn query(&self, query: &str) -> Vec<(Value, f64)> {
        let q: String = query
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        let (status, body) = self
            .get(&format!("/api/v1/query?query={q}"))
            .unwrap_or_else(|e| panic!("query {query}: {e}"));
        assert_eq!(status, 200, "query {query}: {body}");
        let v: Value = serde_json::from_str(&body).expect("JSON");
        v["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .map(|r| {
                let value = r["value"][1]
                    .as_str()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(f64::NAN);
                (r["metric"].clone(), value)
            })
            .collect()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
