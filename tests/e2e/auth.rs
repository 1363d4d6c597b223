//! Auth end to end: with an admin token the server wants a token on every request
//! but `/health`; tokens made through `/api/v1/tokens` carry scopes (`write:DB`,
//! `read:DB`, `rules:DEPARTMENT`), and a department's token sees and changes only
//! its own rules and alerts. Secrets are shown once and stored only hashed.

use std::time::Duration;

use citytsdb_tests::Server;
use serde_json::{json, Value};

const DB: &str = "city";
const ADMIN: &str = "admin-secret-0123456789";

fn call(
    server: &Server,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<String>,
) -> (u16, Value) {
    let agent = ureq::Agent::new_with_config(
        ureq::config::Config::builder()
            .timeout_global(Some(Duration::from_secs(30)))
            .http_status_as_error(false)
            .build(),
    );
    let url = format!("{}{path}", server.url());
    let auth = token.map(|t| format!("Bearer {t}"));
    let response = match method {
        "POST" | "PUT" => {
            let mut r = if method == "POST" {
                agent.post(&url)
            } else {
                agent.put(&url)
            };
            if let Some(a) = &auth {
                r = r.header("Authorization", a);
            }
            r.send(body.unwrap_or_default())
        }
        _ => {
            let mut r = if method == "DELETE" {
                agent.delete(&url)
            } else {
                agent.get(&url)
            };
            if let Some(a) = &auth {
                r = r.header("Authorization", a);
            }
            r.call()
        }
    };
    let mut response = response.unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let status = response.status().as_u16();
    let text = response.body_mut().read_to_string().unwrap_or_default();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn token(server: &Server, scopes: &[&str]) -> (String, String) {
    let (status, body) = call(
        server,
        "POST",
        "/api/v1/tokens",
        Some(ADMIN),
        Some(json!({"name": scopes.join(" "), "scopes": scopes}).to_string()),
    );
    assert_eq!(status, 201, "{body}");
    (
        body["id"].as_str().unwrap().to_string(),
        body["token"].as_str().unwrap().to_string(),
    )
}

fn rule(department: &str, threshold: u32) -> String {
    json!({"name": format!("{department}-rule"), "department": department, "db": DB, "every": "1s",
           "sql": format!("SELECT device, tilt_deg FROM manhole WHERE tilt_deg > {threshold}")})
    .to_string()
}

#[test]
fn departments_own_their_rules() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let server = Server::start_with(&data, &["--admin-token", ADMIN]);
    let line = "manhole,device=mh-1 tilt_deg=1.0".to_string();
    let write = |token: Option<&str>, query: &str| {
        call(
            &server,
            "POST",
            &format!("/api/v1/write?db={DB}{query}"),
            token,
            Some(line.clone()),
        )
        .0
    };
    let query = |token: Option<&str>| {
        call(
            &server,
            "GET",
            &format!("/api/v1/query?db={DB}&sql=SELECT%20count(*)%20AS%20n%20FROM%20manhole"),
            token,
            None,
        )
    };

    assert_eq!(call(&server, "GET", "/health", None, None).0, 200);
    let (status, body) = query(None);
    assert_eq!(status, 401, "{body}");
    assert!(body["error"]
        .as_str()
        .unwrap()
        .contains("Authorization: Bearer"));
    assert_eq!(query(Some("wrong-token-value")).0, 401);
    assert_eq!(write(None, ""), 401);
    assert_eq!(write(Some(ADMIN), ""), 204);

    let (_, writer) = token(&server, &["write:city"]);
    let (_, reader) = token(&server, &["read:city"]);
    let (water_id, water) = token(&server, &["rules:water", "read:city"]);
    let (_, covers) = token(&server, &["rules:covers"]);
    assert_eq!(write(Some(&writer), ""), 204);
    assert_eq!(
        write(None, &format!("&p={writer}")),
        204,
        "the 1.x p= parameter"
    );
    let (status, body) = query(Some(&writer));
    assert_eq!(status, 403);
    assert!(
        body["error"].as_str().unwrap().contains("read:city"),
        "{body}"
    );
    assert_eq!(query(Some(&reader)).0, 200);
    assert_eq!(write(Some(&reader), ""), 403);
    assert_eq!(
        call(&server, "POST", "/api/v1/flush", Some(&reader), None).0,
        403
    );

    // Only admin manages tokens; scopes are checked.
    let (status, _) = call(
        &server,
        "POST",
        "/api/v1/tokens",
        Some(&water),
        Some(json!({"scopes": ["admin"]}).to_string()),
    );
    assert_eq!(status, 403);
    let (status, body) = call(
        &server,
        "POST",
        "/api/v1/tokens",
        Some(ADMIN),
        Some(json!({"scopes": ["root"]}).to_string()),
    );
    assert_eq!(status, 400, "{body}");
    let (status, body) = call(&server, "GET", "/api/v1/tokens", Some(ADMIN), None);
    assert_eq!(status, 200);
    assert_eq!(body.as_array().unwrap().len(), 4);
    assert!(!body.to_string().contains(&water), "no secret is listed");
    let stored = std::fs::read_to_string(data.join("auth/tokens.json")).expect("token file");
    for secret in [&writer, &reader, &water, &covers] {
        assert!(!stored.contains(secret.as_str()), "only hashes are stored");
    }

    // Departments and their rules.
    let (status, body) = call(
        &server,
        "POST",
        "/api/v1/rules",
        Some(&water),
        Some(rule("water", 50)),
    );
    assert_eq!(status, 201, "{body}");
    let water_rule = body["id"].as_str().unwrap().to_string();
    let (status, body) = call(
        &server,
        "POST",
        "/api/v1/rules",
        Some(&water),
        Some(rule("covers", 15)),
    );
    assert_eq!(status, 403, "{body}");
    assert!(body["error"].as_str().unwrap().contains("rules:covers"));
    let (status, body) = call(
        &server,
        "POST",
        "/api/v1/rules",
        Some(&covers),
        Some(rule("covers", 15)),
    );
    assert_eq!(status, 201, "{body}");
    let covers_rule = body["id"].as_str().unwrap().to_string();

    let (_, listed) = call(&server, "GET", "/api/v1/rules", Some(&water), None);
    let names: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["department"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["water"]);
    let (_, listed) = call(&server, "GET", "/api/v1/rules", Some(ADMIN), None);
    assert_eq!(listed.as_array().unwrap().len(), 2);
    let covers_path = format!("/api/v1/rules/{covers_rule}");
    assert_eq!(
        call(&server, "GET", &covers_path, Some(&water), None).0,
        403
    );
    assert_eq!(
        call(
            &server,
            "PUT",
            &covers_path,
            Some(&water),
            Some(rule("covers", 20))
        )
        .0,
        403
    );
    assert_eq!(
        call(
            &server,
            "PUT",
            &covers_path,
            Some(&covers),
            Some(rule("water", 20))
        )
        .0,
        403,
        "cannot hand a rule to another department"
    );
    assert_eq!(
        call(&server, "DELETE", &covers_path, Some(&water), None).0,
        403
    );
    assert_eq!(
        call(&server, "GET", &covers_path, Some(&covers), None).0,
        200
    );

    // Alerts: each department sees its own.
    call(
        &server,
        "POST",
        &format!("/api/v1/write?db={DB}"),
        Some(&writer),
        Some("manhole,device=mh-2 tilt_deg=30".into()),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (_, alerts) = call(&server, "GET", "/api/v1/alerts", Some(&covers), None);
        if alerts.as_array().is_some_and(|a| a.len() == 1) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the covers alert did not appear: {alerts}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (_, alerts) = call(&server, "GET", "/api/v1/alerts", Some(&water), None);
    assert_eq!(alerts, json!([]), "water sees no covers alert");
    let (_, history) = call(&server, "GET", "/api/v1/alerts/history", Some(&water), None);
    assert_eq!(history, json!([]));

    // Tokens survive a restart; a deleted token stops working.
    server.stop();
    let server = Server::start_with(&data, &["--admin-token", ADMIN]);
    assert_eq!(
        call(
            &server,
            "GET",
            &format!("/api/v1/rules/{water_rule}"),
            Some(&water),
            None
        )
        .0,
        200
    );
    assert_eq!(
        call(
            &server,
            "DELETE",
            &format!("/api/v1/tokens/{water_id}"),
            Some(ADMIN),
            None
        )
        .0,
        204
    );
    assert_eq!(
        call(
            &server,
            "GET",
            &format!("/api/v1/rules/{water_rule}"),
            Some(&water),
            None
        )
        .0,
        401
    );
    assert_eq!(
        call(
            &server,
            "DELETE",
            &format!("/api/v1/tokens/{water_id}"),
            Some(ADMIN),
            None
        )
        .0,
        404
    );
    server.stop();
}

#[test]
fn deletes_need_write_and_retention_needs_admin() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = Server::start_with(&tmp.path().join("data"), &["--admin-token", ADMIN]);
    let (_, reader) = token(&server, &[&format!("read:{DB}")]);
    let (_, writer) = token(&server, &[&format!("write:{DB}")]);
    let (status, body) = call(
        &server,
        "POST",
        &format!("/api/v1/write?db={DB}&precision=s"),
        Some(&writer),
        Some(
            "manhole,device=a tilt_deg=1 1764547200\nmanhole,device=b tilt_deg=2 1764547200\n"
                .into(),
        ),
    );
    assert_eq!(status, 204, "{body}");
    let delete = |token: &str, device: &str| {
        call(
            &server,
            "POST",
            "/api/v1/query",
            Some(token),
            Some(
                json!({"db": DB, "sql": format!("DELETE FROM manhole WHERE device = '{device}'")})
                    .to_string(),
            ),
        )
    };
    let (status, body) = delete(&reader, "a");
    assert_eq!(status, 403, "{body}");
    assert!(body.to_string().contains(&format!("write:{DB}")), "{body}");
    let (status, body) = delete(&writer, "a");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["deleted"], 1);
    let (status, body) = call(
        &server,
        "POST",
        &format!("/api/v2/delete?bucket={DB}"),
        Some(&reader),
        Some(r#"{"start": "2025-01-01T00:00:00Z", "stop": "2027-01-01T00:00:00Z"}"#.into()),
    );
    assert_eq!(status, 403, "{body}");
    for token in [&reader, &writer] {
        let (status, body) = call(
            &server,
            "PUT",
            &format!("/api/v1/databases/{DB}"),
            Some(token),
            Some(r#"{"retention": "30d"}"#.into()),
        );
        assert_eq!(status, 403, "{body}");
    }
    let (status, body) = call(
        &server,
        "PUT",
        &format!("/api/v1/databases/{DB}"),
        Some(ADMIN),
        Some(r#"{"retention": "30d"}"#.into()),
    );
    assert_eq!(status, 200, "{body}");
    // The database list shows only what the caller may read.
    let (status, body) = call(&server, "GET", "/api/v1/databases", Some(&reader), None);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["databases"][0]["name"], DB, "{body}");
    assert_eq!(body["databases"][0]["retention"], "30d", "{body}");
    server.stop();
}
