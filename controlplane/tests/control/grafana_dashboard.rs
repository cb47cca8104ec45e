//! The Grafana dashboard in packaging/grafana is checked against a real Portico: after
//! representative traffic (TURN relay both ways, proxied requests, failed logins through the
//! proxy, a TURN brute force that gets blacklisted), a real Prometheus scrapes Portico every
//! second and every panel's query is evaluated through Prometheus' HTTP API; each must
//! succeed and return data. Every metric a query names must be one `/metrics` exports.

use std::collections::BTreeSet;
use std::net::{SocketAddr, UdpSocket};
use std::process::Command;
use std::time::Duration;

use portico_testkit::fixtures::{Nginx, WRONG_LOGIN};
use portico_testkit::http::{get_from, get_with, http, http_from, url_encode, Answer};
use portico_testkit::process::require;
use portico_testkit::turn::{wrong_passwords, TurnClient, PASSWORD, USER};
use portico_testkit::{free_port, v4, wait_until, Portico, Proc, Spec, ANSWER_WAIT, LOCAL4};

const DASHBOARD: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../packaging/grafana/portico-dashboard.json"
);

fn dashboard() -> serde_json::Value {
    let text = std::fs::read_to_string(DASHBOARD).unwrap_or_else(|e| panic!("{DASHBOARD}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{DASHBOARD}: {e}"))
}

/// (panel title, expr) of every query of every panel, rows included.
fn queries(d: &serde_json::Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut stack: Vec<&serde_json::Value> = d["panels"].as_array().into_iter().flatten().collect();
    while let Some(p) = stack.pop() {
        stack.extend(p["panels"].as_array().into_iter().flatten());
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().unwrap_or_default().to_string();
            out.push((p["title"].as_str().unwrap_or_default().to_string(), expr));
        }
    }
    out
}

/// `portico_...` names in a PromQL expression.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let b = expr.as_bytes();
    let mut i = 0;
    while let Some(pos) = expr[i..].find("portico_") {
        let start = i + pos;
        let mut end = start;
        while end < b.len() && (b[end].is_ascii_alphanumeric() || b[end] == b'_') {
            end += 1;
        }
        names.insert(expr[start..end].to_string());
        i = end;
    }
    names
}

/// Sample names `/metrics` exports (Prometheus text format).
fn exported(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

/// Grafana's variables as a dashboard user with "All" instances would have them.
fn substitute(expr: &str) -> String {
    expr.replace("$__rate_interval", "20s")
        .replace("$__range", "5m")
        .replace("$instance", ".*")
}

#[test]
fn every_dashboard_query_returns_data_from_a_real_prometheus() {
    let d = dashboard();
    // The data source is an input of the dashboard, and every panel uses the variable.
    assert_eq!(d["__inputs"][0]["type"], "datasource", "{}", d["__inputs"]);
    assert_eq!(d["__inputs"][0]["pluginId"], "prometheus");
    let vars = d["templating"]["list"].as_array().expect("templating.list");
    assert!(vars
        .iter()
        .any(|v| v["name"] == "datasource" && v["type"] == "datasource"));
    let qs = queries(&d);
    assert!(qs.len() >= 15, "{qs:?}");
    for (title, expr) in &qs {
        assert!(!expr.is_empty(), "panel {title:?} has a query without expr");
    }

    // Representative traffic.
    let nginx = Nginx::start("grafana");
    let site = Portico::start(
        "grafana",
        Spec::new()
            .turn_users()
            .loopback_peers()
            .http_proxy_to(nginx.alpha)
            .fraud("suspicious_per_minute = 5"),
    );
    let proxy = site.proxy();
    for _ in 0..3 {
        assert_eq!(get_from(v4(127, 0, 0, 10), proxy, "/"), Answer::Status(200));
    }
    assert_eq!(
        get_with(v4(127, 0, 0, 11), proxy, "/private", &[WRONG_LOGIN]),
        Answer::Status(401)
    );
    // A name no service has: the proxy's own 421, counted for service "unknown".
    let r = http_from(v4(127, 0, 0, 14), proxy, "GET", "/", &[], b"")
        .unwrap_or_else(|e| panic!("request naming no service: {e}"));
    assert_eq!(r.status, 421);
    // Requests by service and status, as the proxy followed the responses.
    for (service, status, n) in [("app.test", "2xx", 3.0), ("app.test", "4xx", 1.0)] {
        let labels = [("service", service), ("type", "http"), ("status", status)];
        assert_eq!(
            site.metric("portico_proxy_requests_total", &labels),
            n,
            "{labels:?}"
        );
    }
    let unknown = [("service", "unknown"), ("type", "http"), ("status", "4xx")];
    assert_eq!(site.metric("portico_proxy_requests_total", &unknown), 1.0);
    let mut client = TurnClient::from(v4(127, 0, 0, 12), site.udp4(), USER, PASSWORD);
    let relayed = client.allocate();
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
    peer.set_read_timeout(Some(ANSWER_WAIT))
        .unwrap_or_else(|e| panic!("{e}"));
    let peer_addr = peer.local_addr().unwrap_or_else(|e| panic!("{e}"));
    let r = client.permit(&[peer_addr]);
    assert!(r.is_success(), "{:?}", r.code());
    client.send_indication(peer_addr, b"to the peer");
    let mut buf = [0u8; 1500];
    let (n, from) = peer.recv_from(&mut buf).expect("the peer got relayed data");
    assert_eq!((&buf[..n], from), (&b"to the peer"[..], relayed));
    peer.send_to(b"to the client", relayed)
        .unwrap_or_else(|e| panic!("{e}"));
    client
        .sock
        .set_read_timeout(Some(ANSWER_WAIT))
        .unwrap_or_else(|e| panic!("{e}"));
    let got = client.sock.recv(&mut buf).expect("a Data indication");
    assert!(got > 20);
    // A brute force, blacklisted.
    wrong_passwords(v4(127, 0, 0, 13), site.udp4(), 6);
    assert!(
        site.wait_metric(
            "portico_fraud_entries",
            &[("kind", "black")],
            1.0,
            Duration::from_secs(3)
        ) >= 1.0
    );

    // Metric names: every one a query uses is exported.
    let text = site.metrics();
    let have = exported(&text);
    for (title, expr) in &qs {
        for name in metric_names(expr) {
            assert!(
                have.contains(&name),
                "panel {title:?} queries {name}, which /metrics does not export:\n{text}"
            );
        }
    }
    // The checker can fail.
    assert!(!have.contains("portico_proxy_no_such_metric_total"));

    // A real Prometheus scraping Portico every second.
    let dir = site.dir.join("prometheus");
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    let web = SocketAddr::new(LOCAL4, free_port());
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: portico\n    static_configs:\n      - targets: [\"{}\"]\n",
            site.api
        ),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let _prometheus = Proc::spawn(
        "prometheus",
        Command::new(require("prometheus", "prometheus"))
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={web}")),
        &dir.join("prometheus.log"),
    );
    let query = |q: &str| -> Option<serde_json::Value> {
        let path = format!("/api/v1/query?query={}", url_encode(q));
        let r = http(web, "GET", &path, &[], b"").ok()?;
        serde_json::from_slice(&r.body).ok()
    };
    // Rates need two scrapes within their window: wait for a few.
    let scraped = wait_until(Duration::from_secs(60), || {
        query("count_over_time(up{job=\"portico\"}[1m])")
            .and_then(|v| {
                v["data"]["result"][0]["value"][1]
                    .as_str()?
                    .parse::<f64>()
                    .ok()
            })
            .is_some_and(|n| n >= 4.0)
    });
    assert!(
        scraped,
        "Prometheus did not scrape Portico; log:\n{}",
        std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default()
    );
    for (title, expr) in &qs {
        let q = substitute(expr);
        let mut last = None;
        let ok = wait_until(Duration::from_secs(10), || {
            last = query(&q);
            last.as_ref().is_some_and(|v| {
                v["status"] == "success"
                    && v["data"]["result"]
                        .as_array()
                        .is_some_and(|r| !r.is_empty())
            })
        });
        assert!(ok, "panel {title:?}: {q} gave {last:?}");
    }
    // And one that cannot return data does not pass.
    let none = query("sum by (type) (rate(portico_proxy_no_such_metric_total[20s]))");
    assert!(none.is_some_and(|v| v["data"]["result"].as_array().is_some_and(|r| r.is_empty())));
}
