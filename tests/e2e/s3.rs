//! Segments and the catalog on a real S3-protocol endpoint (moto's server from
//! PyPI, on loopback): written by a flush, found again after `kill -9` once the
//! WAL that held the rows is gone.

use citytsdb_tests::s3::{S3Endpoint, BUCKET};
use citytsdb_tests::Server;

const DB: &str = "city";

#[test]
fn segments_and_catalog_live_on_s3() {
    let dir = tempfile::tempdir().unwrap();
    let s3 = S3Endpoint::start(&dir.path().join("moto.log"));
    let env = s3.env();
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
