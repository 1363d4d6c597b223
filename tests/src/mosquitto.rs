//! A real Mosquitto broker for the MQTT tests, and its own publisher client.
//!
//! [`Mosquitto::start`] runs Debian's `mosquitto` (2.0; `tests/run.sh` installs
//! it) on 127.0.0.1 and a free port with persistence on in a temporary
//! directory, so that a graceful restart ([`Mosquitto::restart`]) keeps persistent
//! sessions, their subscriptions and their queued QoS 1 messages, as a production
//! broker would. The offline queue is raised from its default of 1,000 messages
//! (past which Mosquitto silently drops QoS 1 messages for a client) so that a test
//! can queue more. The process is killed when the value is dropped.
//!
//! [`Mosquitto::publish_lines`] publishes with `mosquitto_pub` (package
//! `mosquitto-clients`), each line of its input one message, QoS 1: it returns
//! once the broker has acknowledged every message.

use std::fs;
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// Where Debian's `mosquitto` package puts the broker.
pub const BROKER: &str = "/usr/sbin/mosquitto";
/// Where Debian's `mosquitto-clients` package puts the publisher.
pub const PUBLISHER: &str = "/usr/bin/mosquitto_pub";
/// How long a started broker has to accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Longest one `mosquitto_pub` run may take.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(60);

/// A running broker.
pub struct Mosquitto {
    child: Option<Child>,
    port: u16,
    dir: TempDir,
}

impl Mosquitto {
    /// Starts a broker on a free loopback port; fails the test, saying how to
    /// install it, when Debian's package is missing.
    pub fn start() -> Mosquitto {
        for bin in [BROKER, PUBLISHER] {
            assert!(
                std::path::Path::new(bin).exists(),
                "{bin} is missing: install Debian's mosquitto and mosquitto-clients (tests/run.sh does)"
            );
        }
        let dir = tempfile::tempdir().expect("tempdir for mosquitto");
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let config = format!(
            "listener {port} 127.0.0.1\n\
             allow_anonymous true\n\
             user root\n\
             persistence true\n\
             persistence_location {dir}/\n\
             max_queued_messages 1000000\n\
             max_queued_bytes 0\n\
             log_dest file {dir}/mosquitto.log\n\
             log_type all\n",
            dir = dir.path().display()
        );
        fs::write(dir.path().join("mosquitto.conf"), config).expect("write mosquitto.conf");
        let mut broker = Mosquitto {
            child: None,
            port,
            dir,
        };
        broker.spawn();
        broker
    }

    fn spawn(&mut self) {
        let child = Command::new(BROKER)
            .arg("-c")
            .arg(self.dir.path().join("mosquitto.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {BROKER}: {e}"));
        self.child = Some(child);
        let deadline = Instant::now() + READY_TIMEOUT;
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("mosquitto exited with {status}:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "mosquitto did not listen on port {} in {READY_TIMEOUT:?}:\n{}",
                self.port,
                self.log()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// The broker's URL for `citytsdb serve --mqtt`.
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// The broker's log.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }

    /// Stops the broker gracefully (SIGTERM, so it saves its sessions and queued
    /// messages) and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("mosquitto did not stop on SIGTERM within 20 s");
                }
                thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Starts the broker again on the same port and persistence directory.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "the broker is still running");
        self.spawn();
    }

    /// Stops and starts the broker.
    pub fn restart(&mut self) {
        self.stop();
        self.start_again();
    }

    /// Publishes each line of `lines` as one QoS 1 message to `topic` with
    /// `mosquitto_pub`, returning once the broker acknowledged all of them.
    pub fn publish_lines(&self, topic: &str, lines: &str) {
        self.run_pub(&["-t", topic, "-l"], lines.as_bytes());
    }

    /// Publishes one QoS 1 message (which may span lines) to `topic`.
    pub fn publish(&self, topic: &str, payload: &str) {
        self.run_pub(&["-t", topic, "-s"], payload.as_bytes());
    }

    fn run_pub(&self, args: &[&str], stdin: &[u8]) {
        let port = self.port.to_string();
        let mut child = Command::new(PUBLISHER)
            .args(["-h", "127.0.0.1", "-p", &port, "-q", "1", "-i"])
            .arg(format!("test-pub-{}", std::process::id()))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {PUBLISHER}: {e}"));
        let mut input = child.stdin.take().expect("stdin of mosquitto_pub");
        let data = stdin.to_vec();
        let writer = thread::spawn(move || {
            let _ = input.write_all(&data);
        });
        let deadline = Instant::now() + PUBLISH_TIMEOUT;
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait for mosquitto_pub") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("mosquitto_pub took longer than {PUBLISH_TIMEOUT:?}");
            }
            thread::sleep(Duration::from_millis(10));
        };
        writer.join().expect("stdin writer");
        let out = child.wait_with_output().expect("mosquitto_pub output");
        assert!(
            status.success(),
            "mosquitto_pub {args:?} failed ({status}): {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The persistence directory (for diagnostics).
    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
