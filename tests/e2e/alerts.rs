//! The alert-rule engine end to end: rules registered over HTTP against the real
//! server, notifications caught by a webhook receiver on loopback and by a real
//! Prometheus Alertmanager.
//!
//! Time is scaled down (rules evaluate every second, windows are seconds), but
//! every transition is the real one: pending, firing after `for`, resolved after
//! `keep_firing_for`; the fast path on written batches; silent devices from
//! `system.devices`; retries while the receiver is down; and `kill -9` in the
//! middle of a firing alert.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use citytsdb_tests::alertmanager::Alertmanager;
use citytsdb_tests::receiver::{Received, Receiver};
use citytsdb_tests::Server;
use serde_json::{json, Value};

const DB: &str = "city";
const WAIT: Duration = Duration::from_secs(30);

fn agent() -> ureq::Agent {
    ureq::Agent::new_with_config(
        ureq::config::Config::builder()
            .timeout_global(Some(Duration::from_secs(30)))
            .http_status_as_error(false)
            .build(),
    )
}

fn call(server: &Server, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
    let url = format!("{}{path}", server.url());
    let agent = agent();
    let response = match (method, body) {
        ("POST", Some(b)) => agent.post(&url).send(b.to_string()),
        ("PUT", Some(b)) => agent.put(&url).send(b.to_string()),
        ("DELETE", _) => agent.delete(&url).call(),
        _ => agent.get(&url).call(),
    };
    let mut response = response.unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let status = response.status().as_u16();
    let text = response.body_mut().read_to_string().unwrap_or_default();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn register(server: &Server, rule: Value) -> String {
    let (status, body) = call(server, "POST", "/api/v1/rules", Some(&rule));
    assert_eq!(status, 201, "registering {rule}: {body}");
    body["id"].as_str().expect("id").to_string()
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as i64
}

/// Writes readings `(device, district, fields)` at the current time.
fn write_now(server: &Server, readings: &[(&str, &str, &str)]) {
    let t = now_ms();
    let body: String = readings
        .iter()
        .map(|(device, district, fields)| {
            format!("manhole,device={device},district={district} {fields} {t}\n")
        })
        .collect();
    server.write_ok(DB, "ms", body);
}

fn alerts(server: &Server, query: &str) -> Vec<Value> {
    let (status, body) = call(server, "GET", &format!("/api/v1/alerts{query}"), None);
    assert_eq!(status, 200, "{body}");
    body.as_array().cloned().unwrap_or_default()
}

/// Every alert of every delivered webhook message, as (status, device label).
fn told(requests: &[Received]) -> Vec<(String, String)> {
    requests
        .iter()
        .filter(|r| r.delivered())
        .flat_map(|r| r.alerts().to_vec())
        .map(|a| {
            (
                a["status"].as_str().unwrap_or("").to_string(),
                a["labels"]["device"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

fn has(requests: &[Received], status: &str, device: &str) -> bool {
    told(requests)
        .iter()
        .any(|(s, d)| s == status && d == device)
}

fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn rules_are_checked_stored_replaced_and_deleted() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let server = Server::start(&data);
    write_now(&server, &[("mh-1", "a", "tilt_deg=1.0")]);
    let good = json!({
        "name": "cover-displaced", "department": "covers", "db": DB,
        "sql": "SELECT device, district, max(tilt_deg) AS tilt FROM manhole WHERE time > now() - INTERVAL '2 minutes' GROUP BY device, district HAVING max(tilt_deg) > 15",
        "every": "15s", "for": "1m", "keep_firing_for": "0s", "severity": "critical",
        "labels": {"team": "covers"},
        "annotations": {"summary": "cover {{device}} in {{district}} tilted {{tilt}} degrees"},
        "webhook": "http://127.0.0.1:9/hook"
    });
    let bad = |patch: Value, want: &str| {
        let mut rule = good.clone();
        for (k, v) in patch.as_object().expect("object") {
            rule[k] = v.clone();
        }
        let (status, body) = call(&server, "POST", "/api/v1/rules", Some(&rule));
        assert_eq!(status, 400, "{rule} should be refused: {body}");
        let message = body["error"].as_str().unwrap_or_default();
        assert!(message.contains(want), "{message:?} should say {want:?}");
    };
    bad(
        json!({"sql": "SELECT nope FROM manhole"}),
        "line 1, column 8",
    );
    bad(
        json!({"sql": "SELEC device FROM manhole"}),
        "does not parse",
    );
    bad(json!({"sql": "SELECT * FROM sewers"}), "sewers");
    bad(json!({"sql": "DELETE FROM manhole"}), "only SELECT");
    bad(json!({"db": "nowhere"}), "database nowhere does not exist");
    bad(
        json!({"annotations": {"summary": "{{level}}"}}),
        "annotations.summary uses {{level}}",
    );
    bad(json!({"for": "a minute"}), "for:");
    bad(json!({"every": "0s"}), "every must be at least");
    bad(
        json!({"labels": {"alertname": "x"}}),
        "may not set 'alertname'",
    );
    bad(json!({"webhook": "gopher://x"}), "webhook");
    bad(json!({"department": ""}), "department");
    bad(json!({"evry": "1s"}), "unknown field `evry`");
    let (status, body) = call(
        &server,
        "POST",
        "/api/v1/rules",
        Some(&json!("not an object")),
    );
    assert_eq!(status, 400, "{body}");
    let (_, listed) = call(&server, "GET", "/api/v1/rules", None);
    assert_eq!(listed, json!([]), "refused rules are not stored");

    let id = register(&server, good.clone());
    let (_, rule) = call(&server, "GET", &format!("/api/v1/rules/{id}"), None);
    assert_eq!(rule["name"], "cover-displaced");
    assert_eq!(
        rule["fast_path"], false,
        "an aggregate is evaluated on a schedule"
    );
    let filter = register(
        &server,
        json!({"name": "tilt-now", "department": "water", "db": DB,
               "sql": "SELECT device, tilt_deg FROM manhole WHERE tilt_deg > 15"}),
    );
    let (_, rule) = call(&server, "GET", &format!("/api/v1/rules/{filter}"), None);
    assert_eq!(
        rule["fast_path"], true,
        "a plain filter is checked on write"
    );
    assert_eq!(
        (rule["every"].clone(), rule["for"].clone()),
        (json!("15s"), json!("0s"))
    );
    let (_, water) = call(&server, "GET", "/api/v1/rules?department=water", None);
    assert_eq!(water.as_array().map(Vec::len), Some(1));

    let mut replaced = good.clone();
    replaced["severity"] = json!("warning");
    let (status, body) = call(
        &server,
        "PUT",
        &format!("/api/v1/rules/{id}"),
        Some(&replaced),
    );
    assert_eq!(
        (status, body["severity"].clone(), body["id"].clone()),
        (200, json!("warning"), json!(id))
    );
    let mut broken = good.clone();
    broken["sql"] = json!("SELECT");
    let (status, _) = call(
        &server,
        "PUT",
        &format!("/api/v1/rules/{id}"),
        Some(&broken),
    );
    assert_eq!(status, 400);
    let (status, _) = call(&server, "GET", "/api/v1/rules/0000", None);
    assert_eq!(status, 404);
    let (status, _) = call(&server, "DELETE", "/api/v1/rules/0000", None);
    assert_eq!(status, 404);
    let (status, _) = call(&server, "PUT", "/api/v1/rules/0000", Some(&good));
    assert_eq!(status, 404);

    // Rules survive a crash.
    server.kill9();
    let server = Server::start(&data);
    let (_, rule) = call(&server, "GET", &format!("/api/v1/rules/{id}"), None);
    assert_eq!(
        rule["severity"], "warning",
        "the replacement is what was stored"
    );
    let (status, _) = call(&server, "DELETE", &format!("/api/v1/rules/{id}"), None);
    assert_eq!(status, 204);
    let (_, listed) = call(&server, "GET", "/api/v1/rules", None);
    assert_eq!(listed.as_array().map(Vec::len), Some(1));
    let rules = server.query_json(DB, "SELECT name, department FROM system.rules");
    assert_eq!(rules.len(), 1);
    assert_eq!(rules[0]["name"], "tilt-now");
    let (status, body) = call(&server, "GET", "/api/v1/alerts?state=asleep", None);
    assert_eq!(status, 400, "{body}");
    let (status, body) = call(
        &server,
        "GET",
        "/api/v1/alerts/history?since=yesterday",
        None,
    );
    assert_eq!(status, 400, "{body}");
    server.stop();
}

#[test]
fn pending_firing_resolved_with_for_and_templates() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&tmp.path().join("data"));
    let hook = Receiver::start();
    write_now(
        &server,
        &[
            ("mh-1", "金水区", "tilt_deg=1.0"),
            ("mh-2", "二七区", "tilt_deg=2.0"),
        ],
    );
    let id = register(
        &server,
        json!({
            "name": "cover-displaced", "department": "covers", "db": DB,
            "sql": "SELECT device, district, max(tilt_deg) AS tilt FROM manhole WHERE time > now() - INTERVAL '6 seconds' GROUP BY device, district HAVING max(tilt_deg) > 15",
            "every": "1s", "for": "2s", "severity": "critical",
            "labels": {"team": "covers"},
            "annotations": {"summary": "cover {{device}} in {{district}} tilted {{tilt}} degrees"},
            "webhook": hook.url()
        }),
    );
    write_now(
        &server,
        &[
            ("mh-1", "金水区", "tilt_deg=17.25"),
            ("mh-2", "二七区", "tilt_deg=2.0"),
        ],
    );
    wait_until("the instance to be pending", WAIT, || {
        alerts(&server, "?state=pending").len() == 1
    });
    let pending = alerts(&server, "?state=pending");
    assert_eq!(pending[0]["labels"]["device"], "mh-1");
    assert!(hook.requests().is_empty(), "pending is not told");

    let firing = hook.wait_for(|r| has(r, "firing", "mh-1"), WAIT);
    let message = firing
        .iter()
        .find(|r| r.delivered())
        .expect("a delivered message");
    let body = message.json().expect("JSON");
    assert_eq!(body["version"], "4");
    assert_eq!(body["status"], "firing");
    let alert = &body["alerts"][0];
    assert_eq!(
        alert["labels"],
        json!({"alertname": "cover-displaced", "department": "covers", "severity": "critical",
               "team": "covers", "device": "mh-1", "district": "金水区"})
    );
    assert_eq!(
        alert["annotations"]["summary"],
        "cover mh-1 in 金水区 tilted 17.25 degrees"
    );
    let now = alerts(&server, "?state=firing");
    assert_eq!(now.len(), 1);
    let active_at = now[0]["active_at"].as_str().unwrap().to_string();
    let fired_at = now[0]["fired_at"].as_str().unwrap().to_string();
    assert!(
        fired_at > active_at,
        "fires only after `for`: {active_at} then {fired_at}"
    );
    assert_eq!(
        alerts(&server, &format!("?rule={id}&department=covers")).len(),
        1
    );
    assert!(alerts(&server, "?department=water").is_empty());

    // The reading leaves the 6-second window: resolved.
    let all = hook.wait_for(|r| has(r, "resolved", "mh-1"), WAIT);
    let resolved = all
        .iter()
        .flat_map(|r| r.alerts().to_vec())
        .find(|a| a["status"] == "resolved")
        .expect("resolved alert");
    assert_ne!(resolved["endsAt"], "0001-01-01T00:00:00Z");
    assert_eq!(resolved["fingerprint"], alert["fingerprint"]);
    assert!(alerts(&server, "").is_empty());
    assert!(
        !told(&all).iter().any(|(_, d)| d == "mh-2"),
        "mh-2 never matched"
    );

    let (_, history) = call(
        &server,
        "GET",
        "/api/v1/alerts/history?since=2000-01-01T00:00:00Z",
        None,
    );
    let moves: Vec<String> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            format!(
                "{}->{}",
                e["from"].as_str().unwrap(),
                e["to"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        moves,
        ["inactive->pending", "pending->firing", "firing->resolved"]
    );
    let events = server.query_json(
        DB,
        "SELECT from_state, to_state FROM system.alert_events ORDER BY time",
    );
    assert_eq!(events.len(), 3);
    server.stop();
}

#[test]
fn fast_path_fires_on_write_and_resolves_on_the_next_reading() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&tmp.path().join("data"));
    let hook = Receiver::start();
    write_now(
        &server,
        &[("mh-1", "a", "tilt_deg=1.0"), ("mh-2", "a", "tilt_deg=1.0")],
    );
    // Evaluated every 10 minutes: only the fast path can tell within the test.
    register(
        &server,
        json!({"name": "tilted", "department": "covers", "db": DB, "every": "10m",
               "sql": "SELECT device, district, tilt_deg FROM manhole WHERE tilt_deg > 15",
               "annotations": {"summary": "{{device}} at {{tilt_deg}}"},
               "webhook": hook.url()}),
    );
    std::thread::sleep(Duration::from_millis(300));
    let written = Instant::now();
    write_now(
        &server,
        &[
            ("mh-1", "a", "tilt_deg=19.5"),
            ("mh-2", "a", "tilt_deg=2.0"),
        ],
    );
    let got = hook.wait_for(|r| has(r, "firing", "mh-1"), WAIT);
    assert!(
        written.elapsed() < Duration::from_secs(60),
        "long before the next evaluation"
    );
    assert_eq!(got[0].alerts()[0]["annotations"]["summary"], "mh-1 at 19.5");
    // Another series' reading changes nothing; the same series' next one resolves.
    write_now(&server, &[("mh-2", "a", "tilt_deg=3.0")]);
    write_now(&server, &[("mh-1", "a", "tilt_deg=0.5")]);
    let got = hook.wait_for(|r| has(r, "resolved", "mh-1"), WAIT);
    assert_eq!(
        told(&got),
        [
            ("firing".into(), "mh-1".into()),
            ("resolved".into(), "mh-1".into())
        ]
    );
    assert!(alerts(&server, "").is_empty());
    server.stop();
}

#[test]
fn keep_firing_for_holds_a_cleared_alert() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&tmp.path().join("data"));
    let hook = Receiver::start();
    write_now(&server, &[("mh-1", "a", "water_level_cm=-100")]);
    register(
        &server,
        json!({"name": "high-water", "department": "water", "db": DB, "every": "1s",
               "keep_firing_for": "3s",
               "sql": "SELECT device, water_level_cm FROM manhole WHERE water_level_cm > -20",
               "webhook": hook.url()}),
    );
    write_now(&server, &[("mh-1", "a", "water_level_cm=-10")]);
    hook.wait_for(|r| has(r, "firing", "mh-1"), WAIT);
    let cleared = Instant::now();
    write_now(&server, &[("mh-1", "a", "water_level_cm=-90")]);
    std::thread::sleep(Duration::from_millis(1_500));
    assert_eq!(
        alerts(&server, "?state=firing").len(),
        1,
        "still firing within keep_firing_for"
    );
    hook.wait_for(|r| has(r, "resolved", "mh-1"), WAIT);
    assert!(
        cleared.elapsed() >= Duration::from_secs(3),
        "resolved only after keep_firing_for"
    );
    server.stop();
}

#[test]
fn silent_devices_fire_and_a_device_that_never_reported_does_not() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&tmp.path().join("data"));
    let hook = Receiver::start();
    write_now(
        &server,
        &[("mh-1", "a", "tilt_deg=1.0"), ("mh-2", "b", "tilt_deg=1.0")],
    );
    server.write_ok(
        DB,
        "ms",
        format!("parking,device=mh-3 occupied=1i {}\n", now_ms()),
    );
    register(
        &server,
        json!({"name": "cover-silent", "department": "covers", "db": DB, "every": "1s",
               "sql": "SELECT device, district FROM system.devices WHERE table_name = 'manhole' AND last_time < now() - INTERVAL '3 seconds'",
               "annotations": {"summary": "cover {{device}} in {{district}} is silent"},
               "webhook": hook.url()}),
    );
    // mh-1 keeps reporting; mh-2 goes silent; mh-3 never reported to manhole.
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(6) {
        write_now(&server, &[("mh-1", "a", "tilt_deg=1.0")]);
        std::thread::sleep(Duration::from_millis(500));
    }
    let got = hook.wait_for(|r| has(r, "firing", "mh-2"), WAIT);
    assert_eq!(told(&got), [("firing".to_string(), "mh-2".to_string())]);
    assert_eq!(
        got[0].alerts()[0]["annotations"]["summary"],
        "cover mh-2 in b is silent"
    );
    write_now(&server, &[("mh-2", "b", "tilt_deg=1.0")]);
    let got = hook.wait_for(|r| has(r, "resolved", "mh-2"), WAIT);
    assert!(
        !told(&got).iter().any(|(_, d)| d == "mh-1" || d == "mh-3"),
        "{:?}",
        told(&got)
    );
    server.stop();
}

#[test]
fn notifications_are_retried_until_delivered_and_survive_a_crash() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let server = Server::start(&data);
    let hook = Receiver::start();
    hook.set_failing(true);
    write_now(&server, &[("mh-1", "a", "tilt_deg=1.0")]);
    register(
        &server,
        json!({"name": "tilted", "department": "covers", "db": DB, "every": "1s",
               "sql": "SELECT device, tilt_deg FROM manhole WHERE tilt_deg > 15",
               "webhook": hook.url()}),
    );
    write_now(&server, &[("mh-1", "a", "tilt_deg=30.0")]);
    hook.wait_for(|r| r.len() >= 2, WAIT);
    assert!(hook.failed_attempts() >= 2);
    // The receiver is still down when the server crashes: the outbox keeps it.
    server.kill9();
    let server = Server::start(&data);
    hook.set_failing(false);
    let got = hook.wait_for(|r| has(r, "firing", "mh-1"), Duration::from_secs(90));
    let attempts = got.iter().filter(|r| !r.alerts().is_empty()).count();
    assert!(attempts >= 3, "retried: {attempts} attempts");
    let firing = alerts(&server, "?state=firing");
    assert_eq!(firing.len(), 1, "still firing after the restart");
    server.stop();
}

/// The ids of the notifications `alerts/outbox.jsonl` holds: those enqueued and
/// not yet delivered or dropped. `None` before the journal exists.
fn stored_outbox(data: &std::path::Path) -> Option<Vec<u64>> {
    let text = std::fs::read_to_string(data.join("alerts/outbox.jsonl")).ok()?;
    let mut ids = std::collections::BTreeSet::new();
    for record in text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
    {
        match record["op"].as_str() {
            Some("enqueued") => ids.insert(record["notification"]["id"].as_u64()?),
            Some("delivered" | "dropped") => ids.remove(&record["id"].as_u64()?),
            _ => true,
        };
    }
    Some(ids.into_iter().collect())
}

/// How many active instances `alerts/state.json` holds, over all rules.
fn stored_instances(data: &std::path::Path) -> Option<usize> {
    let text = std::fs::read_to_string(data.join("alerts/state.json")).ok()?;
    let state: Value = serde_json::from_str(&text).ok()?;
    let rules = state["instances"].as_object()?;
    Some(
        rules
            .values()
            .filter_map(|r| r["active"].as_object().map(|a| a.len()))
            .sum(),
    )
}

/// Active instances as "rule/device" -> (state, active_at).
fn states(server: &Server) -> BTreeMap<String, (String, String)> {
    alerts(server, "")
        .into_iter()
        .map(|a| {
            let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
            let key = format!("{}/{}", text(&a["rule"]), text(&a["labels"]["device"]));
            (key, (text(&a["state"]), text(&a["active_at"])))
        })
        .collect()
}

#[test]
fn a_restart_keeps_firing_and_pending_instances_without_new_messages() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let server = Server::start(&data);
    let hook = Receiver::start();
    write_now(
        &server,
        &[("mh-1", "a", "tilt_deg=1.0"), ("mh-2", "a", "tilt_deg=1.0")],
    );
    register(
        &server,
        json!({"name": "tilted", "department": "covers", "db": DB, "every": "1s",
               "sql": "SELECT device, tilt_deg FROM manhole WHERE tilt_deg > 15",
               "webhook": hook.url()}),
    );
    register(
        &server,
        json!({"name": "tilted-long", "department": "covers", "db": DB, "every": "1s", "for": "1h",
               "sql": "SELECT device, tilt_deg FROM manhole WHERE tilt_deg > 40",
               "webhook": hook.url()}),
    );
    write_now(
        &server,
        &[
            ("mh-1", "a", "tilt_deg=20.0"),
            ("mh-2", "a", "tilt_deg=45.0"),
        ],
    );
    hook.wait_for(
        |r| has(r, "firing", "mh-1") && has(r, "firing", "mh-2"),
        WAIT,
    );
    // Both rules check the same batch, one after the other.
    wait_until("three active instances", WAIT, || {
        states(&server).len() == 3
    });
    let before = states(&server);
    assert_eq!(before["tilted-long/mh-2"].0, "pending");
    assert_eq!(before["tilted/mh-1"].0, "firing");
    let told_before = hook.count();
    // Delivered and recorded as delivered: an entry still in the stored outbox
    // would (rightly, at least once) be sent again after the crash.
    wait_until("the stored outbox to be empty", WAIT, || {
        stored_outbox(&data).is_some_and(|ids| ids.is_empty())
    });
    // The store thread writes state.json after the evaluation that changed it:
    // what is in memory has reached the disk once all three are in the file.
    wait_until("state.json to hold the three instances", WAIT, || {
        stored_instances(&data) == Some(3)
    });

    server.kill9();
    let server = Server::start(&data);
    std::thread::sleep(Duration::from_secs(3));
    let after = states(&server);
    assert_eq!(after, before, "states and their active_at survive kill -9");
    assert_eq!(
        hook.count(),
        told_before,
        "no new message after the restart"
    );
    let (_, history) = call(&server, "GET", "/api/v1/alerts/history", None);
    assert_eq!(
        history.as_array().map(Vec::len),
        Some(5),
        "the history survives too (three pending, two firing): {history}"
    );
    server.stop();
}

#[test]
fn alerts_reach_a_real_alertmanager() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&tmp.path().join("data"));
    let am = Alertmanager::start();
    write_now(&server, &[("mh-1", "金水区", "tilt_deg=1.0")]);
    register(
        &server,
        json!({"name": "cover-displaced", "department": "covers", "db": DB, "every": "1s",
               "severity": "critical",
               "sql": "SELECT device, district, tilt_deg FROM manhole WHERE tilt_deg > 15",
               "annotations": {"summary": "cover {{device}} tilted {{tilt_deg}}"},
               "alertmanager": am.url()}),
    );
    write_now(&server, &[("mh-1", "金水区", "tilt_deg=25.0")]);
    wait_until("Alertmanager to list the alert", WAIT, || {
        !am.alerts().is_empty()
    });
    let listed = am.alerts();
    assert_eq!(listed.len(), 1);
    let a = &listed[0];
    assert_eq!(a["labels"]["alertname"], "cover-displaced");
    assert_eq!(a["labels"]["device"], "mh-1");
    assert_eq!(a["labels"]["district"], "金水区");
    assert_eq!(a["labels"]["severity"], "critical");
    assert_eq!(a["annotations"]["summary"], "cover mh-1 tilted 25");
    assert_eq!(a["status"]["state"], "active");
    write_now(&server, &[("mh-1", "金水区", "tilt_deg=0.5")]);
    wait_until("Alertmanager to drop the resolved alert", WAIT, || {
        am.alerts().is_empty()
    });
    server.stop();
}

/// The seed scenario: covers report every half second; one tilts past 15
/// degrees, one goes silent, one's water stays within 20 cm of the road for the
/// rule's `for`; exactly those three alerts fire, and all three resolve.
#[test]
fn seed_scenario_three_covers_three_alerts() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&tmp.path().join("data"));
    let hook = Receiver::start();
    let covers: Vec<String> = (1..=12).map(|i| format!("mh-{i:02}")).collect();
    let normal = |d: &str| (d.to_string(), "tilt_deg=0.5,water_level_cm=-150");
    let report = |readings: &[(String, &str)]| {
        let t = now_ms();
        let body: String = readings
            .iter()
            .map(|(d, f)| format!("manhole,device={d},district=金水区 {f} {t}\n"))
            .collect();
        server.write_ok(DB, "ms", body);
    };
    report(&covers.iter().map(|d| normal(d)).collect::<Vec<_>>());
    for rule in [
        json!({"name": "cover-displaced", "department": "city-management", "db": DB, "every": "1s", "for": "1s",
               "sql": "SELECT device, district, max(tilt_deg) AS tilt FROM manhole WHERE time > now() - INTERVAL '3 seconds' GROUP BY device, district HAVING max(tilt_deg) > 15",
               "annotations": {"summary": "cover {{device}} tilted {{tilt}} degrees"}, "webhook": hook.url()}),
        json!({"name": "cover-silent", "department": "city-management", "db": DB, "every": "1s",
               "sql": "SELECT device, district FROM system.devices WHERE table_name = 'manhole' AND last_time < now() - INTERVAL '3 seconds'",
               "webhook": hook.url()}),
        json!({"name": "water-high", "department": "water", "db": DB, "every": "1s", "for": "2s",
               "sql": "SELECT device, district, min(water_level_cm) AS level FROM manhole WHERE time > now() - INTERVAL '2 seconds' GROUP BY device, district HAVING min(water_level_cm) > -20",
               "webhook": hook.url()}),
    ] {
        register(&server, rule);
    }
    // Phase 1 (8 s): mh-03 tilted, mh-07 silent, mh-11 water 15 cm below the road.
    let phase = |seconds: u64, odd: bool| {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(seconds) {
            let readings: Vec<(String, &str)> = covers
                .iter()
                .filter(|d| !(odd && *d == "mh-07"))
                .map(|d| match (odd, d.as_str()) {
                    (true, "mh-03") => (d.clone(), "tilt_deg=22.5,water_level_cm=-150"),
                    (true, "mh-11") => (d.clone(), "tilt_deg=0.5,water_level_cm=-15"),
                    _ => normal(d),
                })
                .collect();
            report(&readings);
            std::thread::sleep(Duration::from_millis(500));
        }
    };
    phase(8, true);
    let got = hook.wait_for(
        |r| has(r, "firing", "mh-03") && has(r, "firing", "mh-07") && has(r, "firing", "mh-11"),
        WAIT,
    );
    let mut fired: Vec<(String, String)> = told(&got);
    fired.sort();
    fired.dedup();
    assert_eq!(
        fired,
        [
            ("firing".to_string(), "mh-03".to_string()),
            ("firing".to_string(), "mh-07".to_string()),
            ("firing".to_string(), "mh-11".to_string())
        ],
        "exactly the three covers fire"
    );
    // Phase 2: every cover back to normal; all three resolve.
    phase(6, false);
    let got = hook.wait_for(
        |r| {
            has(r, "resolved", "mh-03")
                && has(r, "resolved", "mh-07")
                && has(r, "resolved", "mh-11")
        },
        WAIT,
    );
    let devices: std::collections::BTreeSet<String> =
        told(&got).into_iter().map(|(_, d)| d).collect();
    assert_eq!(
        devices.into_iter().collect::<Vec<_>>(),
        ["mh-03", "mh-07", "mh-11"]
    );
    assert!(alerts(&server, "").is_empty());
    server.stop();
}
