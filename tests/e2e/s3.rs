//! Segments and the catalog on a real S3-protocol endpoint (moto's server from
//! PyPI, on loopback): written by a flush, found again after `kill -9` once the
//! WAL that held the rows is gone.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use citytsdb_tests::Server;

const DB: &str = "city";
const BUCKET: &str = "citytsdb-test";

/// A moto S3 server on loopback, killed on drop.
struct S3Endpoint {
    child: Child,
    url: String,
}

impl S3Endpoint {
    fn start(log: &std::path::Path) -> Self {
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

impl Drop for S3Endpoint {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn segments_and_catalog_live_on_s3() {
    let dir = tempfile::tempdir().unwrap();
    let s3 = S3Endpoint::start(&dir.path().join("moto.log"));
    let env = [
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("AWS_REGION", "us-east-1"),
        ("AWS_ENDPOINT", s3.url.as_str()),
        ("AWS_ALLOW_HTTP", "true"),
    ];
    let store = format!("s3://{BUCKET}/zhengzhou");
    let data = dir.path().join("data");
    let args = ["--store", store.as_str()];
    let server = Server::start_with_env(&data, &args, &env);
    let mut body = String::new();
    for d in 1..=50 {
        for m in 0..20 {
            body.push_str(&format!(
                "manhole,device=mh-{d:05},district=金水区 tilt_deg=0.{m},water_level_cm=-1{d}.5 {}\n",
                1_764_547_200 + m * 60
            ));
        }
    }
    server.write_ok(DB, "s", &body);
    assert_eq!(server.flush(DB), 1);
    // Two flushes: the second commits catalog version 2 beside version 1.
    server.write_ok(
        DB,
        "s",
        "manhole,device=mh-00001,district=金水区 tilt_deg=3.5 1764633600\n",
    );
    assert_eq!(server.flush(DB), 1);
    server.kill9();

    // The WAL is gone; everything must come back from the bucket.
    let server = Server::start_with_env(&data, &args, &env);
    let rows = server.query_json(
        DB,
        "SELECT count(*) AS n, max(tilt_deg) AS top FROM manhole",
    );
    assert_eq!(rows[0]["n"], 1001);
    assert_eq!(rows[0]["top"], 3.5);
    let m = server.explain_analyze_metrics(DB, "SELECT * FROM manhole WHERE device = 'mh-00007'");
    assert_eq!(
        (
            m["segments_total"],
            m["segments_opened"],
            m["rows_selected"]
        ),
        (2, 1, 20)
    );
    server.stop();
}
