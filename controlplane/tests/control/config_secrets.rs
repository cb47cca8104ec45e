//! `GET /api/v1/config` never shows a secret (TURN users' passwords and keys, the TURN REST API
//! shared secrets): it shows `"<redacted>"`, and that placeholder sent back in a PUT or PATCH
//! keeps the current value. Checked end to end: after GET and PUT of the same document, the
//! file still holds the secrets and a TURN Allocate with the old password, and with REST API
//! credentials signed by the old shared secret, still succeeds over a real socket.

use portico_testkit::turn::{
    udp_transport, TurnClient, PASSWORD, PASSWORD2, PREVIOUS_SECRET, SHARED_SECRET, USER,
};
use portico_testkit::Portico;
use serde_json::{json, Value};

const KEY: &str = "0123456789abcdef0123456789abcdef";

/// Every secret value the site holds, none of which may appear in what the API shows.
const SECRETS: [&str; 4] = [SHARED_SECRET, PREVIOUS_SECRET, PASSWORD2, KEY];

fn allocates(site: &Portico, user: &str, password: &str) -> bool {
    let mut c = TurnClient::new(site.udp4(), user, password);
    let r = c.allocate_with(&udp_transport);
    let ok = r.is_success();
    if ok {
        c.refresh(0);
    }
    ok
}

/// TURN REST API credentials from the API, used for an Allocate.
fn rest_credentials_allocate(site: &Portico) -> bool {
    let c = site.json(
        "POST",
        "/api/v1/turn/credentials",
        r#"{"name": "rest"}"#,
        200,
    );
    allocates(
        site,
        c["username"].as_str().unwrap(),
        c["password"].as_str().unwrap(),
    )
}

fn assert_hidden(what: &str, text: &str) {
    for s in SECRETS {
        assert!(!text.contains(s), "{what} shows the secret {s:?}:\n{text}");
    }
    assert!(
        !text.contains(&format!("\"{PASSWORD}\"")),
        "{what} shows alice's password:\n{text}"
    );
}

#[test]
fn secrets_are_redacted_and_kept_through_a_round_trip() {
    let site = Portico::new("cfg-secrets", crate::spec().turn_users().loopback_peers());
    let _cp = site.launch();
    site.json(
        "POST",
        "/api/v1/turn/users",
        &format!(r#"{{"name": "kim", "key": "{KEY}"}}"#),
        201,
    );
    let before = site.file_config().turn;
    assert!(allocates(&site, USER, PASSWORD));
    assert!(rest_credentials_allocate(&site));

    // GET, as JSON and as TOML: placeholders, never the values.
    let got = site.json("GET", "/api/v1/config", "", 200);
    assert_hidden("GET /api/v1/config", &got.to_string());
    assert_eq!(
        got["turn"]["shared_secret"],
        json!(["<redacted>", "<redacted>"])
    );
    assert_eq!(
        got["turn"]["users"],
        json!([
            {"name": "alice", "password": "<redacted>"},
            {"name": "bob", "password": "<redacted>"},
            {"name": "kim", "key": "<redacted>"},
        ])
    );
    let toml = site.get("/api/v1/config?format=toml", true).unwrap();
    assert_eq!(toml.status, 200);
    assert_hidden("GET /api/v1/config?format=toml", &toml.text());

    // PUT the same document back: accepted, its answer redacted too, the secrets unchanged.
    let a = site.json("PUT", "/api/v1/config", &got.to_string(), 200);
    assert_hidden("the PUT answer", &a.to_string());
    assert_eq!(site.file_config().turn, before);
    assert!(allocates(&site, USER, PASSWORD), "old password refused");
    assert!(rest_credentials_allocate(&site), "old shared secret lost");

    // The TOML form round-trips the same way.
    let r = site.put_config_toml(&toml.text());
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(site.file_config().turn, before);

    // Rollover by PATCH: a new secret first, the placeholders keep the old ones in order.
    site.json(
        "PATCH",
        "/api/v1/config",
        r#"{"turn": {"shared_secret": ["next-secret", "<redacted>", "<redacted>"]}}"#,
        200,
    );
    assert_eq!(
        site.file_config().turn.shared_secret,
        vec!["next-secret", SHARED_SECRET, "previous-secret"]
    );
    // Users matched by name: alice kept, bob dropped, carol new.
    site.json(
        "PATCH",
        "/api/v1/config",
        r#"{"turn": {"users": [{"name": "carol", "password": "sea"}, {"name": "alice", "password": "<redacted>"}]}}"#,
        200,
    );
    let users = site.file_config().turn.users;
    assert_eq!(users.len(), 2);
    assert_eq!(users[1].password.as_deref(), Some(PASSWORD));
    assert!(allocates(&site, USER, PASSWORD));
    assert!(allocates(&site, "carol", "sea"));
    assert!(!allocates(&site, "bob", "builder"));

    // A placeholder that stands for nothing is refused, naming the key; nothing changes.
    let file = std::fs::read(&site.config_path).unwrap();
    for (patch, key) in [
        (
            r#"{"turn": {"users": [{"name": "zed", "password": "<redacted>"}]}}"#,
            "turn.users[0]",
        ),
        (
            r#"{"turn": {"shared_secret": ["<redacted>", "<redacted>", "<redacted>", "<redacted>"]}}"#,
            "turn.shared_secret",
        ),
    ] {
        let e: Value = site.json("PATCH", "/api/v1/config", patch, 400);
        let msg = e["error"].as_str().unwrap();
        assert!(msg.starts_with(key), "{patch}: {msg}");
    }
    let e = site.json(
        "POST",
        "/api/v1/turn/users",
        r#"{"name": "dan", "password": "<redacted>"}"#,
        400,
    );
    assert!(e["error"].as_str().unwrap().contains("placeholder"), "{e}");
    assert_eq!(std::fs::read(&site.config_path).unwrap(), file);
}
