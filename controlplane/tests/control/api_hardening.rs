//! The API against callers that send nonsense or guess tokens, over a real socket:
//!
//! * manual fraud entries: `ttl_seconds` bounded (1 s to ten years), notes printable and at
//!   most 256 characters;
//! * every error is JSON, axum's own rejections included (a 3 MB body, a path parameter
//!   that does not decode);
//! * a source that fails authentication 10 times within a minute gets 429 without its token
//!   being looked at, until the minute is over; other sources are not affected.

use std::io::{Read, Write};
use std::net::IpAddr;
use std::time::Duration;

use portico_testkit::http::{http_from, parse_response, HttpResponse};
use portico_testkit::{v4, Portico};

use crate::site;

#[test]
fn manual_fraud_entries_are_bounded() {
    let site = site("api-fraud-bounds", "");
    let _cp = site.launch();
    let post = |body: &str| {
        site.request(
            "POST",
            "/api/v1/fraud/entries",
            true,
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        )
        .unwrap()
    };
    let bad = [
        (
            r#"{"ip": "192.0.2.1", "kind": "black", "ttl_seconds": 18446744073709551615}"#
                .to_string(),
            "ttl_seconds: ",
        ),
        (
            r#"{"ip": "192.0.2.1", "kind": "black", "ttl_seconds": 0}"#.to_string(),
            "ttl_seconds: ",
        ),
        (
            r#"{"ip": "192.0.2.1", "kind": "black", "ttl_seconds": 315360001}"#.to_string(),
            "ttl_seconds: ",
        ),
        (
            r#"{"ip": "192.0.2.1", "kind": "black", "note": "line\nbreak"}"#.to_string(),
            "note: ",
        ),
        (
            r#"{"ip": "192.0.2.1", "kind": "white", "note": "\u001b[2Jcleared"}"#.to_string(),
            "note: ",
        ),
        (
            format!(
                r#"{{"ip": "192.0.2.1", "kind": "black", "note": "{}"}}"#,
                "x".repeat(257)
            ),
            "note: ",
        ),
    ];
    for (body, want) in &bad {
        let r = post(body);
        assert_eq!(r.status, 400, "{body}: {}", r.text());
        let e = r.json()["error"].as_str().unwrap().to_string();
        assert!(e.starts_with(want), "{body}: {e}");
    }
    let entries = site.json("GET", "/api/v1/fraud/entries", "", 200);
    assert_eq!(entries["entries"], serde_json::json!([]), "{entries}");

    // The limits themselves are accepted: ten years, 256 characters (of two bytes each).
    let note = "\u{e9}".repeat(256);
    let body = format!(
        r#"{{"ip": "192.0.2.1", "kind": "black", "ttl_seconds": 315360000, "note": "{note}"}}"#
    );
    let e = site.json("POST", "/api/v1/fraud/entries", &body, 201);
    assert_eq!(e["note"], note.as_str());
    let expires = e["expires_at"].as_u64().unwrap();
    let created = e["created_at"].as_u64().unwrap();
    assert!(
        (315_360_000..=315_360_002).contains(&(expires - created)),
        "{e}"
    );
    // Without ttl_seconds: until removed.
    let e = site.json(
        "POST",
        "/api/v1/fraud/entries",
        r#"{"ip": "192.0.2.2", "kind": "white"}"#,
        201,
    );
    assert!(e["expires_at"].is_null(), "{e}");
}

/// Sends `size` body bytes on a thread while the answer is read: a server that refuses a body
/// over its limit answers (and may close) before the rest is written.
fn big_body(site: &Portico, method: &str, path: &str, size: usize) -> HttpResponse {
    let mut s = std::net::TcpStream::connect(site.api).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n",
        site.api,
        site.token()
    );
    let mut w = s.try_clone().unwrap();
    w.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    let writer = std::thread::spawn(move || {
        let _ = w.write_all(head.as_bytes());
        // Fails once the server has answered and closed; that is expected.
        let _ = w.write_all(&vec![b' '; size]);
    });
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
    }
    let _ = s.shutdown(std::net::Shutdown::Both);
    let _ = writer.join();
    parse_response(&raw).unwrap_or_else(|| panic!("no HTTP answer: {raw:?}"))
}

#[test]
fn every_error_is_json() {
    let site = site("api-json-errors", "");
    let _cp = site.launch();

    // A 3 MB configuration, and a 3 MB user: 413, as JSON.
    for (method, path) in [("PUT", "/api/v1/config"), ("POST", "/api/v1/turn/users")] {
        let r = big_body(&site, method, path, 3 * 1024 * 1024);
        assert_eq!(r.status, 413, "{method} {path}: {}", r.text());
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert!(r.json()["error"].as_str().unwrap().contains("length limit"));
    }

    // A path parameter that is not UTF-8: axum's 400, as JSON.
    let r = site
        .request("DELETE", "/api/v1/turn/users/%FF%FE", true, &[], b"")
        .unwrap();
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert!(r.json()["error"].is_string());

    // Bad JSON, an unknown path, a wrong method: JSON too.
    for (method, path, body, status) in [
        ("POST", "/api/v1/fraud/entries", &b"{nope"[..], 400),
        ("PUT", "/api/v1/config", b"\xff\xfe", 400),
        ("GET", "/api/v1/nothing", b"", 404),
        ("DELETE", "/api/v1/config", b"", 405),
    ] {
        let r = site
            .request(
                method,
                path,
                true,
                &[("Content-Type", "application/json")],
                body,
            )
            .unwrap();
        assert_eq!(r.status, status, "{method} {path}: {}", r.text());
        assert_eq!(
            r.header("content-type"),
            Some("application/json"),
            "{method} {path}"
        );
        assert!(r.json()["error"].is_string(), "{method} {path}");
    }
}

#[test]
fn failed_authentications_are_rate_limited_per_source() {
    let site = site("api-auth-limit", "");
    let _cp = site.launch();
    let guesser = v4(127, 0, 0, 2);
    let other = v4(127, 0, 0, 3);
    let token = site.token();
    let call = |src: IpAddr, t: &str| {
        http_from(
            src,
            site.api,
            "GET",
            "/api/v1/status",
            &[("Authorization".into(), format!("Bearer {t}"))],
            b"",
        )
        .unwrap()
    };
    for i in 0..10 {
        let r = call(guesser, &format!("guess-{i}"));
        assert_eq!(r.status, 401, "guess {i}: {}", r.text());
    }
    // The 11th attempt is refused before the token is looked at: even the right one.
    let r = call(guesser, &token);
    assert_eq!(r.status, 429, "{}", r.text());
    assert!(r.json()["error"].as_str().unwrap().contains("try again"));
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "Retry-After {retry}");
    // It did not count as another failure.
    assert!(site
        .metrics()
        .contains("portico_api_auth_failures_total 10"));
    // Another source, and the public paths, are unaffected.
    assert_eq!(call(other, &token).status, 200);
    let r = http_from(guesser, site.api, "GET", "/healthz", &[], b"").unwrap();
    assert_eq!(r.status, 200);
    assert!(site
        .log()
        .contains("failed API authentications within 60 s"));
}
