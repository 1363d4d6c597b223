//! `citytsdb import`: line protocol, CSV and JSON lines (gzipped too) into a running
//! server and straight into a stopped server's data directory; bad lines named by
//! FILE:LINE with exit code 2 while the good ones are written; the data-directory
//! lock; errors that stop an import with exit code 1.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use citytsdb_tests::server::binary;
use citytsdb_tests::{Row, Server};
use serde_json::{json, Value};

/// Runs `citytsdb import ARGS` with `stdin` on standard input; exit code and stderr.
fn import(args: &[&str], stdin: &[u8]) -> (i32, String) {
    let mut child = Command::new(binary())
        .arg("import")
        .args(args)
        .env_remove("CITYTSDB_URL")
        .env_remove("CITYTSDB_TOKEN")
        .env_remove("CITYTSDB_DB")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run citytsdb import");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin)
        .expect("write stdin");
    let out = child.wait_with_output().expect("wait for citytsdb import");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.code().expect("an exit code"), stderr)
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write an input file");
    path.display().to_string()
}

fn write_gz(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    let file = std::fs::File::create(&path).expect("create a .gz input");
    let mut gz = flate2::write::GzEncoder::new(file, flate2::Compression::default());
    gz.write_all(text.as_bytes()).expect("gzip");
    gz.finish().expect("finish gzip");
    path.display().to_string()
}

/// The rows of `sql` with each value as JSON.
fn rows(server: &Server, db: &str, sql: &str) -> Vec<Value> {
    server
        .query_json(db, sql)
        .into_iter()
        .map(Value::Object)
        .collect::<Vec<_>>()
}

/// Asserts a row's columns; numbers compare as f64, so `2` and `2.0` are equal.
fn assert_row(row: &Value, expected: Value) {
    let expected = expected.as_object().expect("expected row is an object");
    for (k, want) in expected {
        let got = &row[k];
        let same = match (got.as_f64(), want.as_f64()) {
            (Some(g), Some(w)) => g == w,
            _ => got == want,
        };
        assert!(same, "column {k}: got {got}, want {want} in {row}");
    }
}

#[test]
fn each_format_is_imported_with_exact_values() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&tmp.path().join("data"));
    let url = server.url().to_string();
    let dir = tmp.path();

    let lp = write(
        dir,
        "covers.lp",
        "# covers, in seconds\n\
         manhole,device=mh-00001,district=金水区 tilt_deg=0.4,battery_pct=97i,cover_open=false 1764547200\r\n\
         \n\
         manhole,device=mh\\ 2,district=high\\ tech tilt_deg=17.25,battery_pct=88i,cover_open=true 1764547260\n",
    );
    let (code, err) = import(
        &[&lp, "--db", "city", "--url", &url, "--precision", "s"],
        b"",
    );
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("2 rows written, 0 lines rejected"), "{err}");
    let got = rows(
        &server,
        "city",
        "SELECT time, device, district, tilt_deg, battery_pct, cover_open FROM manhole ORDER BY device",
    );
    assert_eq!(got.len(), 2, "{got:?}");
    assert_row(
        &got[0],
        json!({"time": "2025-12-01T00:01:00Z", "device": "mh 2", "district": "high tech",
               "tilt_deg": 17.25, "battery_pct": 88, "cover_open": true}),
    );
    assert_row(
        &got[1],
        json!({"time": "2025-12-01T00:00:00Z", "device": "mh-00001", "district": "金水区",
               "tilt_deg": 0.4, "battery_pct": 97, "cover_open": false}),
    );

    let csv = write(
        dir,
        "parking.csv",
        "time,device,street,occupied:int,rate,note:string,open:bool\r\n\
         2025-12-01T00:00:00Z,pk-1,\"Huayuan Rd, north\",12,1.5,\"say \"\"hi\"\"\",true\r\n\
         1764547260,pk-2,文化路,,2,\"two\nlines? no: two, parts\",false\r\n",
    );
    let (code, err) = import(
        &[
            &csv,
            "--db",
            "city",
            "--url",
            &url,
            "--precision",
            "s",
            "--tags",
            "device,street",
            "--table",
            "parking",
            "--no-progress",
        ],
        b"",
    );
    // The quoted line break cannot go into line protocol: that row is rejected.
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("parking.csv:3: field note contains a line break"),
        "{err}"
    );
    let csv = write(
        dir,
        "parking.csv",
        "time,device,street,occupied:int,rate,note:string,open:bool\r\n\
         2025-12-01T00:00:00Z,pk-1,\"Huayuan Rd, north\",12,1.5,\"say \"\"hi\"\"\",true\r\n\
         1764547260,pk-2,文化路,,2,\"two, parts\",false\r\n",
    );
    let (code, err) = import(
        &[
            &csv,
            "--db",
            "city",
            "--url",
            &url,
            "--precision",
            "s",
            "--tags",
            "device,street",
            "--table",
            "parking",
        ],
        b"",
    );
    assert_eq!(code, 0, "{err}");
    let got = rows(
        &server,
        "city",
        "SELECT time, device, street, occupied, rate, note, open FROM parking ORDER BY device",
    );
    assert_eq!(got.len(), 2, "{got:?}");
    assert_row(
        &got[0],
        json!({"time": "2025-12-01T00:00:00Z", "device": "pk-1", "street": "Huayuan Rd, north",
               "occupied": 12, "rate": 1.5, "note": "say \"hi\"", "open": true}),
    );
    assert_row(
        &got[1],
        json!({"time": "2025-12-01T00:01:00Z", "device": "pk-2", "street": "文化路",
               "occupied": null, "rate": 2.0, "note": "two, parts", "open": false}),
    );

    let jsonl = write(
        dir,
        "sewage.ndjson",
        "{\"table\": \"sewage\", \"time\": \"2025-12-01T00:00:00Z\", \"device\": \"sw-1\", \"district\": \"二七区\", \"flow_lps\": 12.5, \"alarm\": false}\n\
         \n\
         {\"time\": 1764547260000, \"device\": \"sw-2\", \"flow_lps\": 3, \"cod_mgl\": null}\n",
    );
    let (code, err) = import(
        &[
            &jsonl,
            "--db",
            "city",
            "--url",
            &url,
            "--precision",
            "ms",
            "--table",
            "sewage",
        ],
        b"",
    );
    assert_eq!(code, 0, "{err}");
    let got = rows(
        &server,
        "city",
        "SELECT time, device, district, flow_lps, alarm FROM sewage ORDER BY device",
    );
    assert_eq!(got.len(), 2, "{got:?}");
    assert_row(
        &got[0],
        json!({"time": "2025-12-01T00:00:00Z", "device": "sw-1", "district": "二七区",
               "flow_lps": 12.5, "alarm": false}),
    );
    assert_row(
        &got[1],
        json!({"time": "2025-12-01T00:01:00Z", "device": "sw-2", "district": null,
               "flow_lps": 3.0, "alarm": null}),
    );

    // Gzipped files, several in one run, and standard input, each in its own format.
    let gz = write_gz(
        dir,
        "traffic.jsonl.gz",
        "{\"time\": 1764547200, \"device\": \"tr-1\", \"flow\": 40}\n",
    );
    let gz_lp = write_gz(
        dir,
        "more.lp.gz",
        "traffic,device=tr-2 flow=41 1764547200\n",
    );
    let (code, err) = import(
        &[
            &gz,
            &gz_lp,
            "-",
            "--db",
            "city",
            "--url",
            &url,
            "--precision",
            "s",
            "--table",
            "traffic",
        ],
        b"traffic,device=tr-3 flow=42 1764547200\n",
    );
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("imported 3 files"), "{err}");
    assert!(err.contains("3 rows written"), "{err}");
    let got = rows(
        &server,
        "city",
        "SELECT device, flow FROM traffic ORDER BY device",
    );
    let flows: Vec<(String, f64)> = got
        .iter()
        .map(|r| {
            (
                r["device"].as_str().unwrap().to_string(),
                r["flow"].as_f64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        flows,
        [
            ("tr-1".to_string(), 40.0),
            ("tr-2".to_string(), 41.0),
            ("tr-3".to_string(), 42.0)
        ]
    );
    server.stop();
}

#[test]
fn bad_lines_are_named_by_file_and_line_and_the_good_ones_written() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&tmp.path().join("data"));
    let dir = tmp.path();
    let lp = write(
        dir,
        "bad.lp",
        "m,device=a v=1 1\nm,device=b v=oops 2\nm,device=c v=3 3\n",
    );
    let csv = write(
        dir,
        "bad.csv",
        "time,device,v,flag:bool\n\
         4,d,4,true\n\
         5,e,5\n\
         6,f,six,\n\
         7,g,7,maybe\n\
         8,h,8,false\n",
    );
    let jsonl = write(
        dir,
        "bad.jsonl",
        "{\"time\": 9, \"device\": \"i\", \"v\": 9}\n\
         {\"time\": 10, \"device\": \"j\", \"v\": }\n\
         {\"time\": 11, \"device\": \"k\", \"v\": 11}\n",
    );
    // Small batches, so rejections come back from several writes.
    let (code, err) = import(
        &[
            &lp,
            &csv,
            &jsonl,
            "--db",
            "city",
            "--url",
            server.url(),
            "--precision",
            "s",
            "--tags",
            "device",
            "--table",
            "m",
            "--batch-lines",
            "2",
        ],
        b"",
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("6 rows written, 5 lines rejected"), "{err}");
    let expected = [
        format!("{lp}:2: "),
        format!("{csv}:3: 3 columns, the header has 4: 5,e,5"),
        format!("{csv}:4: field v is float in table m, got string"),
        format!("{csv}:5: column flag: 'maybe' is not a boolean: 7,g,7,maybe"),
        format!("{jsonl}:2: invalid JSON at column"),
    ];
    let mut at = 0;
    for e in &expected {
        let found = err[at..]
            .find(e.as_str())
            .unwrap_or_else(|| panic!("{e:?} not in the summary (in order):\n{err}"));
        at += found + e.len();
    }
    let got: Vec<(String, f64)> = server
        .query_json("city", "SELECT device, v FROM m ORDER BY time")
        .iter()
        .map(|r: &Row| {
            (
                r["device"].as_str().unwrap().to_string(),
                r["v"].as_f64().unwrap(),
            )
        })
        .collect();
    let want: Vec<(String, f64)> = [
        ("a", 1.0),
        ("c", 3.0),
        ("d", 4.0),
        ("h", 8.0),
        ("i", 9.0),
        ("k", 11.0),
    ]
    .iter()
    .map(|(d, v)| (d.to_string(), *v))
    .collect();
    assert_eq!(got, want);
    server.stop();
}

#[test]
fn a_stopped_servers_data_directory_is_imported_into() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let server = Server::start(&data);
    server.write_ok("city", "s", "manhole,device=mh-1 tilt_deg=1 1764547200\n");
    // While it runs, its data directory is locked.
    let lp = write(
        tmp.path(),
        "late.lp",
        "manhole,device=mh-2 tilt_deg=2 1764547200\n",
    );
    let data_arg = data.display().to_string();
    let (code, err) = import(&[&lp, "--db", "city", "--data-dir", &data_arg], b"");
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!(
            "data directory {data_arg} is in use by another citytsdb process"
        )),
        "{err}"
    );
    assert!(server.is_healthy());
    assert_eq!(
        server.query_json("city", "SELECT count(*) AS n FROM manhole")[0]["n"],
        1
    );
    server.stop();

    let csv = write(
        tmp.path(),
        "late.csv",
        "time,device,tilt_deg\n2025-12-01T00:01:00Z,mh-3,3.5\n",
    );
    let (code, err) = import(
        &[
            &lp,
            &csv,
            "--db",
            "city",
            "--data-dir",
            &data_arg,
            "--precision",
            "s",
            "--tags",
            "device",
            "--table",
            "manhole",
        ],
        b"",
    );
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("2 rows written"), "{err}");

    let server = Server::start(&data);
    let got: Vec<(String, String, f64)> = server
        .query_json(
            "city",
            "SELECT time, device, tilt_deg FROM manhole ORDER BY device",
        )
        .iter()
        .map(|r| {
            (
                r["time"].as_str().unwrap().to_string(),
                r["device"].as_str().unwrap().to_string(),
                r["tilt_deg"].as_f64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("2025-12-01T00:00:00Z".to_string(), "mh-1".to_string(), 1.0),
            ("2025-12-01T00:00:00Z".to_string(), "mh-2".to_string(), 2.0),
            ("2025-12-01T00:01:00Z".to_string(), "mh-3".to_string(), 3.5),
        ]
    );
    server.stop();
}

#[test]
fn errors_that_stop_an_import_exit_1() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let lp = write(tmp.path(), "a.lp", "m v=1 1\n");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let nobody = format!("http://127.0.0.1:{port}");
    let (code, err) = import(&[&lp, "--db", "city", "--url", &nobody], b"");
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("cannot reach the server"), "{err}");

    let missing = tmp.path().join("missing.lp").display().to_string();
    let (code, err) = import(&[&lp, &missing, "--db", "city", "--url", &nobody], b"");
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("missing.lp"), "{err}");

    let odd = write(tmp.path(), "a.parquet", "x");
    let (code, err) = import(&[&odd, "--db", "city", "--url", &nobody], b"");
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("--format"), "{err}");

    let admin = "admin-secret-0123456789";
    let server = Server::start_with(
        &tmp.path().join("data"),
        &["--admin-token", admin, "--max-body-size", "500"],
    );
    let (code, err) = import(&[&lp, "--db", "city", "--url", server.url()], b"");
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("wants a token"), "{err}");
    let (code, err) = import(
        &[&lp, "--db", "city", "--url", server.url(), "--token", admin],
        b"",
    );
    assert_eq!(code, 0, "{err}");

    // A batch past the server's body limit stops the import with what to do.
    let lines: String = (0..100).map(|i| format!("m v={i} {i}\n")).collect();
    let big = write(tmp.path(), "big.lp", &lines);
    let (code, err) = import(
        &[
            &big,
            "--db",
            "city",
            "--url",
            server.url(),
            "--token",
            admin,
        ],
        b"",
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("lower --batch-lines"), "{err}");
    let (code, err) = import(
        &[
            &big,
            "--db",
            "city",
            "--url",
            server.url(),
            "--token",
            admin,
            "--batch-lines",
            "20",
        ],
        b"",
    );
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("100 rows written"), "{err}");

    // A file that breaks off (a gzip stream cut short) stops the import; the lines
    // before the break are written.
    let lines: String = (0..2000)
        .map(|i| format!("cut,device=d{i} v={i} {i}\n"))
        .collect();
    let whole = write_gz(tmp.path(), "whole.lp.gz", &lines);
    let bytes = std::fs::read(&whole).expect("read the gzip file");
    let cut = write(tmp.path(), "cut.lp", "");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).expect("write the cut file");
    let (code, err) = import(
        &[
            &cut,
            "--db",
            "city",
            "--url",
            server.url(),
            "--token",
            admin,
            "--batch-lines",
            "10",
        ],
        b"",
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("cut.lp: reading"), "{err}");
    let (_, answer) = server.get(&format!(
        "/api/v1/query?db=city&sql=SELECT%20count(*)%20AS%20n%20FROM%20cut&p={admin}"
    ));
    let n = serde_json::from_str::<Value>(&answer).expect("JSON")[0]["n"]
        .as_u64()
        .unwrap_or_else(|| panic!("{answer}"));
    assert!(n > 0 && n < 2000, "{n} rows of the cut file written");

    // A CSV header without a time column stops the import after the files before it.
    let csv = write(tmp.path(), "nohead.csv", "device,v\nd,1\n");
    let (code, err) = import(
        &[
            &lp,
            &csv,
            "--db",
            "city",
            "--url",
            server.url(),
            "--token",
            admin,
            "--table",
            "m",
        ],
        b"",
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("1 rows written"), "{err}");
    assert!(
        err.contains("nohead.csv: line 1: the header has no time column"),
        "{err}"
    );
    server.stop();
}
