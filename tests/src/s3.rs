//! A real S3-protocol endpoint for the tests: moto's server from PyPI, on loopback.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The bucket every endpoint starts with.
pub const BUCKET: &str = "citytsdb-test";

/// A moto S3 server on loopback, killed on drop.
pub struct S3Endpoint {
    child: Child,
    /// Its base URL.
    pub url: String,
}

impl S3Endpoint {
    /// Starts moto's server, logging to `log`, and creates [`BUCKET`].
    pub fn start(log: &std::path::Path) -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = std::fs::File::create(log).unwrap();
        let child = Command::new("python3")
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start moto's S3 server (python3 -m pip install -r tests/requirements.txt)");
        let url = format!("http://127.0.0.1:{port}");
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(5)))
            .build()
            .into();
        let start = Instant::now();
        loop {
            // Moto accepts unsigned requests: create the bucket the plain way.
            if let Ok(r) = agent.put(&format!("{url}/{BUCKET}")).send_empty() {
                assert!(
                    r.status().is_success(),
                    "creating the bucket answered {}",
                    r.status()
                );
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "moto's S3 server did not come up at {url}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        Self { child, url }
    }
}

impl S3Endpoint {
    /// The `AWS_*` variables a server needs to use the endpoint.
    pub fn env(&self) -> [(&'static str, &str); 5] {
        [
            ("AWS_ACCESS_KEY_ID", "test"),
            ("AWS_SECRET_ACCESS_KEY", "test"),
            ("AWS_REGION", "us-east-1"),
            ("AWS_ENDPOINT", self.url.as_str()),
            ("AWS_ALLOW_HTTP", "true"),
        ]
    }
}

impl Drop for S3Endpoint {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
