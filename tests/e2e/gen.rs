//! `citytsdb gen` writes the city workload, the same for the same seed, and every
//! line of it is accepted by the server: four tables, quirks and all.

use std::process::Command;

use citytsdb_tests::server::binary;
use citytsdb_tests::Server;

fn gen(seed: &str) -> String {
    let out = Command::new(binary())
        .args([
            "gen",
            "--devices",
            "60",
            "--days",
            "1",
            "--interval",
            "10m",
            "--seed",
            seed,
        ])
        .output()
        .expect("run citytsdb gen");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 line protocol")
}

#[test]
fn gen_is_deterministic_and_every_line_is_written() {
    let text = gen("11");
    assert_eq!(text, gen("11"), "the same seed gives the same workload");
    assert_ne!(text, gen("12"));
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&tmp.path().join("data"));
    server.write_ok("city", "s", &text);
    let rows = server.query_json(
        "city",
        "SELECT table_name, count(*) AS devices FROM system.devices GROUP BY table_name ORDER BY table_name",
    );
    let tables: Vec<(String, u64)> = rows
        .iter()
        .map(|r| {
            (
                r["table_name"].as_str().unwrap().to_string(),
                r["devices"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        tables,
        [
            ("manhole".to_string(), 24),
            ("parking".to_string(), 12),
            ("sewage".to_string(), 12),
            ("traffic".to_string(), 12)
        ]
    );
    let streets = server.query_json(
        "city",
        "SELECT DISTINCT street FROM parking ORDER BY street",
    );
    assert!(
        streets.iter().any(|r| r["street"] == "Huayuan Rd, north"),
        "{streets:?}"
    );
    let (status, body) = Command::new(binary())
        .args(["gen", "--start", "yesterday"])
        .output()
        .map(|o| {
            (
                o.status.success(),
                String::from_utf8_lossy(&o.stderr).to_string(),
            )
        })
        .expect("run citytsdb gen");
    assert!(!status && body.contains("RFC 3339"), "{body}");
    server.stop();
}
