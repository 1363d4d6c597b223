//! `citytsdb serve --mqtt`: a real Mosquitto broker, messages published with
//! `mosquitto_pub` at QoS 1, and every acknowledged message found in citytsdb —
//! across a broker restart with messages still queued, and across a `kill -9` of
//! citytsdb while messages keep arriving at the broker (which then restarts too).

use std::collections::BTreeMap;
use std::thread;
use std::time::{Duration, Instant};

use citytsdb_tests::mosquitto::Mosquitto;
use citytsdb_tests::Server;
use serde_json::Value;

const PATTERN: &str = "city/{district}/{table}/{device}";
/// 2026-01-01T00:00:00Z in seconds.
const T0: i64 = 1_767_225_600;

fn start(data_dir: &std::path::Path, broker: &Mosquitto) -> Server {
    let url = broker.url();
    let server = Server::start_with(
        data_dir,
        &[
            "--mqtt",
            &url,
            "--mqtt-topic",
            "city/#",
            "--mqtt-pattern",
            PATTERN,
        ],
    );
    wait_for(&server, "the MQTT subscriber to connect", |s| {
        mqtt_stats(s)["connected"] == true
    });
    server
}

fn mqtt_stats(server: &Server) -> Value {
    let (status, body) = server.get("/health");
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).expect("health JSON");
    v["mqtt"].clone()
}

fn wait_for(server: &Server, what: &str, done: impl Fn(&Server) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done(server) {
        if Instant::now() > deadline {
            server.fail(&format!("timed out waiting for {what}"));
        }
        thread::sleep(Duration::from_millis(100));
    }
}

fn count(server: &Server, table: &str) -> i64 {
    let (status, body) = server.query_raw(
        "city",
        &format!("SELECT count(*) AS n FROM {table}"),
        "json",
    );
    if status != 200 {
        // The table appears with its first message.
        return 0;
    }
    let rows: Vec<Value> = serde_json::from_str(&body).expect("rows");
    rows[0]["n"].as_i64().expect("count")
}

fn wait_for_count(server: &Server, table: &str, n: i64) {
    wait_for(server, &format!("{n} rows in {table}"), |s| {
        count(s, table) >= n
    });
    assert_eq!(
        count(server, table),
        n,
        "{table} holds more rows than were published"
    );
}

/// `n` line-protocol messages, one line each, devices `{prefix}{i}`.
fn lp_messages(prefix: &str, n: usize) -> String {
    (0..n)
        .map(|i| {
            format!(
                "manhole,device={prefix}{i},district=north tilt_deg={i}.5,water_cm=-{i} {}\n",
                (T0 + i as i64) * 1_000_000_000
            )
        })
        .collect()
}

/// `n` JSON messages, one object each; the device and table come from the topic,
/// so each message goes to its own topic (published one call per topic would be
/// slow, so the device is in the payload and the topic carries the district).
fn json_messages(prefix: &str, n: usize) -> String {
    (0..n)
        .map(|i| {
            format!(
                "{{\"device\": \"{prefix}{i}\", \"time\": {}, \"occupied\": {i}, \"camera_ok\": true}}\n",
                (T0 + i as i64) * 1000
            )
        })
        .collect()
}

#[test]
fn every_qos1_message_arrives_across_broker_restart_and_crash() {
    let mut broker = Mosquitto::start();
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let server = start(&data, &broker);

    // Line protocol as it is, JSON mapped through the topic pattern, and one
    // message of several lines.
    broker.publish_lines("city/gateway/lp/raw", &lp_messages("A", 200));
    broker.publish_lines("city/south/parking/cam", &json_messages("P", 200));
    broker.publish("city/gateway/lp/raw", &lp_messages("M", 3));
    wait_for_count(&server, "manhole", 203);
    wait_for_count(&server, "parking", 200);

    // The pattern's levels became tags; the payload's own device won over the topic's.
    let rows = server.query_json(
        "city",
        "SELECT device, district, occupied, camera_ok, time FROM parking WHERE device = 'P7'",
    );
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["district"], "south");
    assert_eq!(rows[0]["occupied"].as_f64(), Some(7.0));
    assert_eq!(rows[0]["camera_ok"], true);
    assert_eq!(rows[0]["time"], "2026-01-01T00:00:07Z");

    // Restart the broker right after it acknowledged 3,000 more messages: whatever
    // citytsdb had not yet taken is kept by the broker and delivered after the
    // reconnect.
    broker.publish_lines("city/gateway/lp/raw", &lp_messages("B", 3000));
    broker.restart();
    wait_for_count(&server, "manhole", 3203);
    wait_for(&server, "the subscriber to reconnect", |s| {
        mqtt_stats(s)["connects"].as_u64() >= Some(2)
    });

    // Crash citytsdb; the broker queues what arrives meanwhile for its session,
    // and keeps it across a restart of its own.
    server.kill9();
    broker.publish_lines("city/north/parking/cam", &json_messages("Q", 500));
    broker.restart();
    let server = start(&data, &broker);
    wait_for_count(&server, "parking", 700);

    // Bad messages are counted and logged, and the subscriber carries on.
    broker.publish("city/gateway/lp/raw", "manhole,device=X tilt_deg=oops 1");
    broker.publish("city/south/parking/cam", "{\"occupied\": ");
    broker.publish("city/south/parking/cam", "{\"device\": \"no fields\"}");
    broker.publish("city/elsewhere", "{\"occupied\": 1}");
    broker.publish("city/gateway/lp/raw", &lp_messages("Z", 1));
    wait_for_count(&server, "manhole", 3204);
    wait_for(&server, "4 rejected messages", |s| {
        mqtt_stats(s)["rejected_messages"] == 4
    });
    let log = server.log();
    for reason in [
        "invalid float",
        "bad JSON",
        "no fields",
        "does not match the pattern",
    ] {
        assert!(
            log.contains("MQTT message rejected") && log.contains(reason),
            "the log names the reason '{reason}':\n{log}"
        );
    }

    // Every message exactly once, with its values.
    let rows = server.query_json(
        "city",
        "SELECT device, tilt_deg, water_cm FROM manhole ORDER BY device",
    );
    let got: BTreeMap<String, (f64, f64)> = rows
        .iter()
        .map(|r| {
            (
                r["device"].as_str().unwrap().to_string(),
                (
                    r["tilt_deg"].as_f64().unwrap(),
                    r["water_cm"].as_f64().unwrap(),
                ),
            )
        })
        .collect();
    let mut want = BTreeMap::new();
    for (prefix, n) in [("A", 200), ("M", 3), ("B", 3000), ("Z", 1)] {
        for i in 0..n {
            want.insert(format!("{prefix}{i}"), (i as f64 + 0.5, -(i as f64)));
        }
    }
    assert_eq!(got, want);
    let per_prefix = server.query_json(
        "city",
        "SELECT substr(device, 1, 1) AS p, count(*) AS n, count(DISTINCT device) AS d, \
         sum(occupied) AS s FROM parking GROUP BY 1 ORDER BY 1",
    );
    assert_eq!(per_prefix.len(), 2, "{per_prefix:?}");
    assert_eq!(per_prefix[0]["n"], 200);
    assert_eq!(per_prefix[0]["d"], 200);
    assert_eq!(
        per_prefix[0]["s"].as_f64(),
        Some((0..200).sum::<i64>() as f64)
    );
    assert_eq!(per_prefix[1]["n"], 500);
    assert_eq!(
        per_prefix[1]["s"].as_f64(),
        Some((0..500).sum::<i64>() as f64)
    );
    let districts = server.query_json(
        "city",
        "SELECT district, count(*) AS n FROM parking GROUP BY 1 ORDER BY 1",
    );
    assert_eq!(districts[0]["district"], "north");
    assert_eq!(districts[0]["n"], 500);
    assert_eq!(districts[1]["district"], "south");
    server.stop();
}

#[test]
fn a_bad_broker_url_or_pattern_stops_the_server_with_a_clear_message() {
    let tmp = tempfile::tempdir().expect("tempdir");
    for (args, message) in [
        (
            vec!["--mqtt", "mqtts://127.0.0.1:8883"],
            "TLS connections are not supported",
        ),
        (
            vec![
                "--mqtt",
                "mqtt://127.0.0.1:1883",
                "--mqtt-topic",
                "city/#/x",
            ],
            "'#' may only be the last level",
        ),
        (
            vec![
                "--mqtt",
                "mqtt://127.0.0.1:1883",
                "--mqtt-pattern",
                "city/x{table}",
            ],
            "must fill a whole level",
        ),
        (
            vec![
                "--mqtt",
                "mqtt://127.0.0.1:1883",
                "--mqtt-precision",
                "hours",
            ],
            "mqtt-precision",
        ),
    ] {
        let out = std::process::Command::new(citytsdb_tests::server::binary())
            .arg("serve")
            .arg("--data-dir")
            .arg(tmp.path().join("d"))
            .arg("--http-bind")
            .arg("127.0.0.1:0")
            .args(&args)
            .output()
            .expect("run citytsdb serve");
        assert!(!out.status.success(), "{args:?} should fail");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(message), "{args:?}: {stderr}");
    }
}

#[test]
fn the_subscriber_waits_for_a_broker_that_is_not_up_yet() {
    let mut broker = Mosquitto::start();
    broker.stop();
    let tmp = tempfile::tempdir().expect("tempdir");
    let url = broker.url();
    let server = Server::start_with(
        &tmp.path().join("data"),
        &["--mqtt", &url, "--mqtt-pattern", PATTERN],
    );
    thread::sleep(Duration::from_millis(500));
    assert_eq!(mqtt_stats(&server)["connected"], false);
    assert!(
        server.is_healthy(),
        "the server serves while the broker is away"
    );
    broker.start_again();
    wait_for(&server, "the subscriber to connect", |s| {
        mqtt_stats(s)["connected"] == true
    });
    broker.publish(
        "city/east/traffic/J1",
        "{\"flow\": 12, \"time\": \"2026-01-01T08:00:00Z\"}",
    );
    wait_for_count(&server, "traffic", 1);
    let rows = server.query_json("city", "SELECT device, district, flow FROM traffic");
    assert_eq!(rows[0]["device"], "J1");
    assert_eq!(rows[0]["district"], "east");
    assert_eq!(rows[0]["flow"].as_f64(), Some(12.0));
}

#[test]
fn a_message_no_write_takes_is_dead_lettered_and_the_ones_after_it_are_written() {
    let broker = Mosquitto::start();
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    // Faults injected into the subscriber's writes (server/src/faults.rs). First a
    // busy store: writes fail, are retried, and the messages queue up behind.
    let faults = tmp.path().join("faults");
    let set_faults = |text: &str| std::fs::write(&faults, text).expect("write the faults file");
    set_faults("busy\n");
    let url = broker.url();
    let faults_env = faults.display().to_string();
    let server = Server::start_with_env(
        &data,
        &[
            "--mqtt",
            &url,
            "--mqtt-topic",
            "city/#",
            "--mqtt-pattern",
            PATTERN,
        ],
        &[
            ("CITYTSDB_MQTT_WRITE_FAULTS", &faults_env),
            ("CITYTSDB_LOG", "info,citytsdb_ingest::mqtt=debug"),
        ],
    );
    wait_for(&server, "the MQTT subscriber to connect", |s| {
        mqtt_stats(s)["connected"] == true
    });
    let mut messages = lp_messages("G", 40);
    messages.push_str("manhole,device=poison,district=north tilt_deg=1 1767225600000000000\n");
    messages.push_str(&lp_messages("H", 40));
    broker.publish_lines("city/gateway/lp/raw", &messages);
    broker.publish("city/gateway/lp/raw", &lp_messages("after", 1));
    wait_for(&server, "the busy write to be retried", |s| {
        mqtt_stats(s)["write_retries"].as_u64() >= Some(2)
    });
    assert_eq!(
        count(&server, "manhole"),
        0,
        "nothing is written while busy"
    );
    assert_eq!(
        mqtt_stats(&server)["dead_letters"],
        0,
        "busy is not refused"
    );

    // Then a store that refuses any body holding "poison" as it would a bad
    // request. The queued messages are written together; the one refused is found
    // by halving, dead-lettered, and the rest written. Before dead letters, the
    // subscriber retried that write forever and wrote nothing after it.
    set_faults("refuse poison\n");
    wait_for_count(&server, "manhole", 81);
    wait_for(&server, "one dead letter", |s| {
        mqtt_stats(s)["dead_letters"] == 1
    });
    let rows = server.query_json(
        "city",
        "SELECT count(*) AS n FROM manhole WHERE device IN ('G0', 'G39', 'H0', 'after0')",
    );
    assert_eq!(
        rows[0]["n"], 4,
        "the messages around and after the bad one are written"
    );
    let stats = mqtt_stats(&server);
    assert_eq!(stats["rejected_messages"], 0, "{stats}");
    assert!(
        stats["last_error"]
            .as_str()
            .unwrap_or_default()
            .contains("dead-lettered"),
        "{stats}"
    );

    // It is kept for an operator, and the log says why.
    let kept = std::fs::read_to_string(data.join("mqtt").join("dead-letter.jsonl"))
        .expect("the dead-letter file");
    let letters: Vec<Value> = kept
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(letters.len(), 1, "{kept}");
    assert_eq!(letters[0]["topic"], "city/gateway/lp/raw");
    assert_eq!(letters[0]["db"], "city");
    assert!(
        letters[0]["payload"]
            .as_str()
            .unwrap()
            .starts_with("manhole,device=poison,"),
        "{kept}"
    );
    assert!(
        letters[0]["reason"]
            .as_str()
            .unwrap()
            .contains("injected refusal"),
        "{kept}"
    );
    let log = server.log();
    assert!(
        log.contains("writing its halves apart"),
        "the refused batch held more than the bad message:\n{log}"
    );
    assert!(
        log.contains("MQTT message dead-lettered") && log.contains("device=poison"),
        "the log names the message:\n{log}"
    );

    // Later messages go on being written.
    set_faults("");
    broker.publish("city/gateway/lp/raw", &lp_messages("later", 1));
    wait_for_count(&server, "manhole", 82);
    assert_eq!(mqtt_stats(&server)["dead_letters"], 1);
    // The same counts in GET /metrics.
    let (status, metrics) = server.get("/metrics");
    assert_eq!(status, 200);
    for line in [
        "citytsdb_mqtt_dead_letters_total 1",
        "citytsdb_mqtt_connected 1",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "no `{line}` in:\n{metrics}"
        );
    }
    server.stop();
}
