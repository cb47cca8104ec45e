//! The REST API over a real socket against a running Portico: authentication, status,
//! configuration changes (validated, stored, applied live to the dataplane), TURN users, TURN
//! REST API credentials, and the OpenAPI document against the routes actually served.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use portico_testkit::http::http;
use portico_testkit::stun::rest_password;
use portico_testkit::{wait_until, Portico};
use serde_json::Value;

use crate::site;

#[test]
fn authentication_is_required_except_for_healthz_and_metrics() {
    let site = site("api-auth", "");
    let _cp = site.launch();

    let r = site.get("/healthz", false).unwrap();
    assert_eq!((r.status, r.json()["status"].clone()), (200, "ok".into()));
    let r = site.get("/metrics", false).unwrap();
    assert_eq!(r.status, 200);
    assert!(r.text().contains("portico_build_info"));

    // No token, a wrong token, another scheme, and an unknown path without a token.
    let cases: [(&str, Vec<(String, String)>); 4] = [
        ("/api/v1/status", vec![]),
        (
            "/api/v1/status",
            vec![("Authorization".into(), format!("Bearer {}x", site.token()))],
        ),
        (
            "/api/v1/config",
            vec![("Authorization".into(), format!("Basic {}", site.token()))],
        ),
        ("/api/v1/no-such-thing", vec![]),
    ];
    for (path, headers) in &cases {
        let r = http(site.api, "GET", path, headers, b"").unwrap();
        assert_eq!(r.status, 401, "{path} {headers:?}");
        assert!(r.json()["error"].as_str().unwrap().contains("Bearer"));
        assert_eq!(
            r.header("www-authenticate"),
            Some("Bearer realm=\"portico\"")
        );
    }
    let r = http(
        site.api,
        "GET",
        "/api/v1/status",
        &[("authorization".into(), format!("bearer {}", site.token()))],
        b"",
    )
    .unwrap();
    assert_eq!(r.status, 200, "the scheme is case-insensitive");

    assert!(wait_until(Duration::from_secs(2), || site
        .log()
        .matches("API authentication failed")
        .count()
        == 4));
    assert!(site.log().contains("source=127.0.0.1:"), "{}", site.log());
    assert!(site.metrics().contains("portico_api_auth_failures_total 4"));
}

#[test]
fn status_reports_the_running_system() {
    let site = site("api-status", "");
    let _cp = site.launch();
    let st = site.status();
    assert_eq!(st["version"], env!("CARGO_PKG_VERSION"));
    assert!(
        ["io_uring", "epoll"].contains(&st["driver"].as_str().unwrap()),
        "{st}"
    );
    assert_eq!(st["workers"], 1);
    let pid = st["dataplane"]["pid"].as_u64().unwrap() as u32;
    assert_eq!(site.dataplane_pids(), vec![pid]);
    assert_eq!(st["dataplane"]["running"], true);
    assert_eq!(st["dataplane"]["restarts"], 0);
    assert!(st["uptime_seconds"].is_u64());
    assert!(st["dataplane"]["heartbeat_age_ms"].as_u64().unwrap() < 2000);
    assert_eq!(
        st["config"]["file"],
        site.config_path.canonicalize().unwrap().to_str().unwrap()
    );
    assert_eq!(
        st["config"]["generation"],
        st["config"]["applied_generation"]
    );
}

#[test]
fn config_changes_are_validated_stored_and_applied_live() {
    let site = site("api-config", "");
    let _cp = site.launch();

    // GET as JSON and as TOML agree with the file.
    let c = site.json("GET", "/api/v1/config", "", 200);
    assert_eq!(c["turn"]["listen"][0], site.udp4().to_string());
    let r = site.get("/api/v1/config?format=toml", true).unwrap();
    assert_eq!(r.header("content-type"), Some("application/toml"));
    let from_toml = portico_shared::config::Config::from_toml(&r.text()).unwrap();
    assert_eq!(from_toml, site.file_config());

    // PATCH: one key, applied live: the dataplane's STUN answers carry the new SOFTWARE.
    assert_ne!(site.software_now().as_deref(), Some("Portico-API-test"));
    let g0 = site.config_generation();
    let a = site.json(
        "PATCH",
        "/api/v1/config",
        r#"{"stun": {"software": "Portico-API-test"}}"#,
        200,
    );
    assert_eq!(a["generation"], g0 + 1);
    assert_eq!(a["dataplane_applied"], true);
    assert_eq!(a["restart_required"], serde_json::json!([]));
    assert_eq!(site.file_config().stun.software, "Portico-API-test");
    assert_eq!(site.software_now().as_deref(), Some("Portico-API-test"));
    assert!(site.log().contains("configuration applied source=\"api\""));

    // Invalid changes: 400 naming key, value and rule; nothing written, nothing published.
    let before = std::fs::read(&site.config_path).unwrap();
    let bad: [(&str, &str, &str); 5] = [
        (
            "PATCH",
            r#"{"turn": {"relay_ports": "70000-80000"}}"#,
            "turn.relay_ports: \"70000-80000\" is not a port range (1-65535)",
        ),
        (
            "PATCH",
            r#"{"turn": {"relay_portz": "1-2"}}"#,
            "turn.relay_portz: unknown field",
        ),
        (
            "PATCH",
            r#"{"turn": {"workers": "many"}}"#,
            "turn.workers: ",
        ),
        (
            "PATCH",
            r#"{"state_dir": "/elsewhere"}"#,
            "state_dir: \"/elsewhere\" differs",
        ),
        ("PUT", r#"[1, 2]"#, "the body must be a JSON object"),
    ];
    for (method, body, want) in bad {
        let r = site
            .request(
                method,
                "/api/v1/config",
                true,
                &[("Content-Type", "application/json")],
                body.as_bytes(),
            )
            .unwrap();
        assert_eq!(r.status, 400, "{body}: {}", r.text());
        let e = r.json()["error"].as_str().unwrap().to_string();
        assert!(e.starts_with(want), "{body}: got {e:?}, want {want:?}");
    }
    let r = site.put_config_toml("[turn]\nrelay_ports = \"5-4\"\n");
    assert_eq!(r.status, 400);
    assert!(r.json()["error"]
        .as_str()
        .unwrap()
        .starts_with("turn.relay_ports: "));
    assert_eq!(
        std::fs::read(&site.config_path).unwrap(),
        before,
        "file changed"
    );
    assert_eq!(
        site.config_generation(),
        g0 + 1,
        "a rejected change was published"
    );

    // PUT replaces the whole configuration (TOML body); keys left out take defaults.
    let text = site.config_text("realm = \"put-realm\"\n");
    let r = site.put_config_toml(&text);
    assert_eq!(r.status, 200, "{}", r.text());
    let file = site.file_config();
    assert_eq!(file.turn.realm, "put-realm");
    assert_eq!(
        file.stun.software,
        portico_shared::config::Config::default().stun.software
    );
    assert_ne!(site.software_now().as_deref(), Some("Portico-API-test"));

    // A change the dataplane cannot take live says so.
    let a = site.json(
        "PATCH",
        "/api/v1/config",
        r#"{"turn": {"workers": 2}}"#,
        200,
    );
    assert_eq!(a["restart_required"], serde_json::json!(["turn.workers"]));
    // PUT as JSON of what GET returned is accepted as is.
    let current = site.json("GET", "/api/v1/config", "", 200);
    site.json("PUT", "/api/v1/config", &current.to_string(), 200);
}

#[test]
fn turn_users_are_added_listed_and_deleted_persistently() {
    let site = site("api-users", "");
    let _cp = site.launch();
    let list = |s: &Portico| s.json("GET", "/api/v1/turn/users", "", 200)["users"].clone();
    assert_eq!(list(&site), serde_json::json!([]));

    let a = site.json(
        "POST",
        "/api/v1/turn/users",
        r#"{"name": "alice", "password": "wonder"}"#,
        201,
    );
    assert_eq!(a["name"], "alice");
    site.json(
        "POST",
        "/api/v1/turn/users",
        r#"{"name": "bob", "key": "0123456789abcdef0123456789abcdef"}"#,
        201,
    );
    assert_eq!(
        list(&site),
        serde_json::json!([
            {"name": "alice", "credential": "password"},
            {"name": "bob", "credential": "key"}
        ])
    );
    let file = site.file_config();
    assert_eq!(file.turn.users.len(), 2);
    assert_eq!(file.turn.users[0].password.as_deref(), Some("wonder"));
    assert!(!site
        .get("/api/v1/turn/users", true)
        .unwrap()
        .text()
        .contains("wonder"));

    let e = site.json(
        "POST",
        "/api/v1/turn/users",
        r#"{"name": "alice", "password": "x"}"#,
        409,
    );
    assert!(e["error"].as_str().unwrap().contains("already exists"));
    let e = site.json("POST", "/api/v1/turn/users", r#"{"name": "carol"}"#, 400);
    assert_eq!(e["error"], "turn.users[2]: needs a password or a key");
    let e = site.json(
        "POST",
        "/api/v1/turn/users",
        r#"{"name": "dave", "key": "zz"}"#,
        400,
    );
    assert!(e["error"]
        .as_str()
        .unwrap()
        .starts_with("turn.users[2].key: "));
    let e = site.json(
        "POST",
        "/api/v1/turn/users",
        r#"{"name": "eve", "pasword": "x"}"#,
        400,
    );
    assert!(
        e["error"]
            .as_str()
            .unwrap()
            .starts_with("pasword: unknown field"),
        "{e}"
    );

    site.json("DELETE", "/api/v1/turn/users/alice", "", 204);
    let e = site.json("DELETE", "/api/v1/turn/users/alice", "", 404);
    assert_eq!(e["error"], "turn.users: no user \"alice\"");
    assert_eq!(
        list(&site),
        serde_json::json!([{"name": "bob", "credential": "key"}])
    );
    let file = site.file_config();
    assert_eq!(file.turn.users.len(), 1);
    assert_eq!(file.turn.users[0].name, "bob");
    assert!(site.log().contains("TURN user deleted user=alice"));
}

#[test]
fn turn_rest_api_credentials() {
    let site = site("api-creds", "");
    let _cp = site.launch();
    let e = site.json(
        "POST",
        "/api/v1/turn/credentials",
        r#"{"name": "alice"}"#,
        409,
    );
    assert!(e["error"]
        .as_str()
        .unwrap()
        .starts_with("turn.shared_secret"));

    site.json(
        "PATCH",
        "/api/v1/config",
        r#"{"turn": {"shared_secret": ["new-secret", "old-secret"]}}"#,
        200,
    );
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let c = site.json(
        "POST",
        "/api/v1/turn/credentials",
        r#"{"name": "alice", "ttl_seconds": 3600}"#,
        200,
    );
    let username = c["username"].as_str().unwrap();
    let (expiry, name) = username.split_once(':').unwrap();
    let expiry: u64 = expiry.parse().unwrap();
    assert_eq!(name, "alice");
    assert!(
        expiry >= now + 3600 && expiry <= now + 3602,
        "{expiry} vs {now}"
    );
    assert_eq!(c["ttl"], 3600);
    assert_eq!(c["expires_at"], expiry);
    // Signed with the first secret.
    let want = rest_password(b"new-secret", username.as_bytes());
    assert_eq!(c["password"], want);
    assert_eq!(
        c["uris"],
        serde_json::json!([
            format!("turn:{}?transport=udp", site.udp4()),
            format!("turn:{}?transport=tcp", site.udp4()),
        ])
    );

    let c = site.json("POST", "/api/v1/turn/credentials", "", 200);
    assert_eq!(c["ttl"], 86400);
    assert!(!c["username"].as_str().unwrap().contains(':'));
    for bad in [
        r#"{"ttl_seconds": 0}"#,
        r#"{"ttl_seconds": 99999999}"#,
        r#"{"nam": "x"}"#,
    ] {
        site.json("POST", "/api/v1/turn/credentials", bad, 400);
    }
}

/// Every (path, method) in the OpenAPI document is served, and nothing else under /api/v1.
#[test]
fn openapi_document_is_true() {
    let site = site("api-openapi", "");
    let _cp = site.launch();
    let doc = site.json("GET", "/api/v1/openapi.json", "", 200);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.len() >= 8);
    let mut checked = 0;
    for (path, item) in paths {
        let concrete = path.replace("{name}", "nobody").replace("{id}", "0");
        for method in item.as_object().unwrap().keys() {
            let m = method.to_ascii_uppercase();
            // A body no handler accepts: handlers must answer with their own error, never
            // the router's "no such endpoint" or 405.
            let body: &[u8] = if m == "GET" || m == "DELETE" {
                b""
            } else {
                b"{"
            };
            let r = site
                .request(
                    &m,
                    &concrete,
                    true,
                    &[("Content-Type", "application/json")],
                    body,
                )
                .unwrap();
            let text = r.text();
            assert_ne!(r.status, 405, "{m} {path}: {text}");
            assert!(!text.contains("no such endpoint"), "{m} {path}: {text}");
            if m == "GET" && !path.contains('{') {
                assert_eq!(r.status, 200, "{m} {path}: {text}");
            } else if m == "GET" {
                // One item named by a path parameter that names nothing: the handler's 404.
                assert_eq!(r.status, 404, "{m} {path}: {text}");
            }
            checked += 1;
        }
    }
    assert!(checked >= 10);
    // The same probe does fail for what is not served.
    let r = site.get("/api/v1/turn/nothing", true).unwrap();
    assert_eq!(r.status, 404);
    assert!(r.text().contains("no such endpoint"));
    let r = site
        .request("DELETE", "/api/v1/status", true, &[], b"")
        .unwrap();
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("GET"));
    let _: Value = r.json();
}
