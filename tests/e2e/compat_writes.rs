//! The InfluxDB-compatible write paths, written to by clients nobody here wrote:
//! InfluxDB 2's official Python client through `/api/v2/write`, the 1.x Python
//! client through `/write`, and curl through `/api/v3/write_lp`; each then read
//! back with SQL. Also each path's error bodies, gzip, 3's `auto` precision and
//! `accept_partial=false`, and the tokens each client sends when auth is on.

use std::io::Write;
use std::process::Command;

use citytsdb_tests::Server;
use serde_json::Value;

const ADMIN: &str = "admin-secret-0123456789";

fn clients_script() -> std::path::PathBuf {
    citytsdb_tests::server::workspace_root().join("tests/clients/influx_clients.py")
}

fn curl(args: &[&str]) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-s", "-m", "30", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, status) = text.rsplit_once('\n').expect("status line");
    (status.trim().parse().expect("status"), body.to_string())
}

#[test]
fn python_clients_and_curl_write_through_their_own_paths() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = Server::start_with(&tmp.path().join("data"), &["--admin-token", ADMIN]);
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let out = Command::new(&python)
        .arg(clients_script())
        .arg(server.url())
        .arg(ADMIN)
        .output()
        .expect("run the Python clients");
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("ok"),
        "the InfluxDB clients failed (run tests/run.sh, which installs them):\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let auth = format!("Authorization: Token {ADMIN}");
    let query = |db: &str, sql: &str| -> Vec<Value> {
        let (status, body) = curl(&[
            "-G",
            &format!("{}/api/v1/query", server.url()),
            "-H",
            &auth,
            "--data-urlencode",
            &format!("db={db}"),
            "--data-urlencode",
            &format!("sql={sql}"),
        ]);
        assert_eq!(status, 200, "{body}");
        serde_json::from_str::<Value>(&body)
            .expect("json")
            .as_array()
            .cloned()
            .unwrap()
    };
    let rows = query(
        "city2",
        "SELECT time, device, district, tilt_deg, battery_pct FROM manhole ORDER BY device",
    );
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[2]["device"], "mh-2");
    assert_eq!(rows[2]["district"], "金水区");
    assert_eq!(rows[2]["tilt_deg"], 3.0);
    assert_eq!(rows[2]["battery_pct"], 88);
    assert_eq!(rows[2]["time"], "2025-12-01T00:02:00Z");
    let rows = query(
        "city1",
        "SELECT time, device, tilt_deg, cover_open FROM manhole ORDER BY device",
    );
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[1]["cover_open"], true);
    assert_eq!(rows[1]["time"], "2025-12-01T00:01:00Z");

    // InfluxDB 3 through curl: `auto` precision reads each timestamp's magnitude.
    let v3 = format!("{}/api/v3/write_lp?db=city3", server.url());
    let body = "manhole,device=mh-1 tilt_deg=1 1764547200\n\
                manhole,device=mh-2 tilt_deg=2 1764547200000\n\
                manhole,device=mh-3 tilt_deg=3 1764547200000000\n\
                manhole,device=mh-4 tilt_deg=4 1764547200000000000\n";
    let (status, text) = curl(&["-XPOST", &v3, "-H", &auth, "--data-binary", body]);
    assert_eq!(status, 204, "{text}");
    let rows = query("city3", "SELECT DISTINCT time FROM manhole");
    assert_eq!(rows.len(), 1, "four spellings of one instant: {rows:?}");
    assert_eq!(rows[0]["time"], "2025-12-01T00:00:00Z");

    // A bad line: partial by default, nothing written with accept_partial=false.
    let bad = "manhole,device=mh-5 tilt_deg=5 1764547260\nmanhole,device=mh-6 tilt_deg=\"high\" 1764547260\n";
    let (status, text) = curl(&[
        "-XPOST",
        &format!("{v3}&accept_partial=false"),
        "-H",
        &auth,
        "--data-binary",
        bad,
    ]);
    assert_eq!(status, 400);
    let answer: Value = serde_json::from_str(&text).expect("json");
    assert_eq!(answer["error"], "parsing failed for write_lp endpoint");
    assert_eq!(answer["data"][0]["line_number"], 2);
    assert!(answer["data"][0]["error_message"]
        .as_str()
        .unwrap()
        .contains("tilt_deg"));
    assert_eq!(
        query("city3", "SELECT count(*) AS n FROM manhole")[0]["n"],
        4,
        "nothing written"
    );
    let (status, text) = curl(&["-XPOST", &v3, "-H", &auth, "--data-binary", bad]);
    assert_eq!(status, 400);
    let answer: Value = serde_json::from_str(&text).expect("json");
    assert_eq!(answer["error"], "partial write of line protocol occurred");
    assert_eq!(
        answer["data"][0]["original_line"],
        "manhole,device=mh-6 tilt_deg=\"high\" 1764547260"
    );
    assert_eq!(
        query("city3", "SELECT count(*) AS n FROM manhole")[0]["n"],
        5,
        "the good line written"
    );
    let (status, _) = curl(&[
        "-XPOST",
        &format!("{v3}&precision=fortnight"),
        "-H",
        &auth,
        "--data-binary",
        body,
    ]);
    assert_eq!(status, 400);

    // 1.x and 2.x error bodies, gzip, and their credentials.
    let (status, text) = curl(&[
        "-XPOST",
        &format!("{}/write?db=city1&precision=s&p={ADMIN}", server.url()),
        "--data-binary",
        "manhole,device=mh-9 tilt_deg=\"x\" 1\n",
    ]);
    assert_eq!(status, 400);
    assert!(
        text.contains("\"error\":\"partial write: unable to parse"),
        "{text}"
    );
    let (status, text) = curl(&[
        "-XPOST",
        &format!("{}/write?precision=s", server.url()),
        "-H",
        &auth,
        "--data-binary",
        "m f=1 1\n",
    ]);
    assert_eq!(
        (status, text.contains("database is required")),
        (400, true),
        "{text}"
    );
    let v2 = format!(
        "{}/api/v2/write?org=x&bucket=city2&precision=s",
        server.url()
    );
    let (status, text) = curl(&[
        "-XPOST",
        &v2,
        "-H",
        &auth,
        "--data-binary",
        "manhole,device=mh-9 tilt_deg=\"x\" 1\n",
    ]);
    assert_eq!(status, 400);
    let answer: Value = serde_json::from_str(&text).expect("json");
    assert_eq!(answer["code"], "invalid");
    assert!(answer["message"].as_str().unwrap().contains("tilt_deg"));
    let (status, text) = curl(&["-XPOST", &v2, "--data-binary", "m f=1 1\n"]);
    assert_eq!(status, 401);
    let answer: Value = serde_json::from_str(&text).expect("json");
    assert!(
        answer["error"].as_str().is_some() || answer["code"].as_str().is_some(),
        "{text}"
    );
    let (status, text) = curl(&[
        "-XPOST",
        &format!("{}/api/v2/write?org=x&precision=s", server.url()),
        "-H",
        &auth,
        "--data-binary",
        "m f=1 1\n",
    ]);
    assert_eq!(status, 400);
    assert!(text.contains("bucket is required"), "{text}");
    let gz = gzip("manhole,device=mh-7 tilt_deg=7 1764547200\n");
    let gz_path = tmp.path().join("body.gz");
    std::fs::File::create(&gz_path)
        .and_then(|mut f| f.write_all(&gz))
        .expect("write gzip body");
    let (status, text) = curl(&[
        "-XPOST",
        &v2,
        "-H",
        &auth,
        "-H",
        "Content-Encoding: gzip",
        "--data-binary",
        &format!("@{}", gz_path.display()),
    ]);
    assert_eq!(status, 204, "{text}");
    assert_eq!(
        query(
            "city2",
            "SELECT count(*) AS n FROM manhole WHERE device = 'mh-7'"
        )[0]["n"],
        1
    );
    server.stop();
}

/// Gzips `text` with the system's gzip (the tests crate has no compression crate).
fn gzip(text: &str) -> Vec<u8> {
    let mut child = Command::new("gzip")
        .arg("-c")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run gzip");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("feed gzip");
    child.wait_with_output().expect("gzip output").stdout
}
