//! `/metrics` passes `promtool check metrics`, and a real Prometheus server scraping Portico on
//! loopback reads back the number of STUN requests this test sent.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use portico_testkit::http::{http, url_encode};
use portico_testkit::metrics::metric;
use portico_testkit::net::bindings;
use portico_testkit::process::require;
use portico_testkit::{free_port, wait_until, Portico, Proc};

const REQUESTS: u64 = 37;

fn run_promtool(metrics: &str) -> (bool, String) {
    let mut child = Command::new(require("promtool", "prometheus"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus) must be installed");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(metrics.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn metrics_pass_promtool_and_are_scraped_by_prometheus() {
    // Quiet: the start sends no STUN request of its own, so every one counted is the test's.
    let site = Portico::new("prom", crate::spec().quiet());
    let _cp = site.launch();
    assert_eq!(bindings(site.udp4(), REQUESTS), REQUESTS);

    let text = site.metrics();
    for l in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        assert!(l.starts_with("portico_"), "{l}");
    }
    assert_eq!(
        metric(
            &text,
            "portico_stun_requests_total",
            &[("result", "success")]
        ),
        REQUESTS as f64,
        "{text}"
    );
    assert!(text.contains("portico_stun_requests_total{result=\"success\",worker=\"0\"}"));
    assert!(text.contains("worker=\"tcp\""));
    assert!(text.contains("portico_dataplane_up 1"));
    assert!(text.contains("portico_dataplane_restarts_total 0"));

    // A lint that can fail: promtool rejects what it does not like, and says so.
    let (ok, out) = run_promtool("# TYPE portico_bad counter\nportico_bad 1\n");
    assert!(!ok, "promtool accepted a counter without _total: {out}");
    let (ok, out) = run_promtool(&text);
    assert!(
        ok && out.trim().is_empty(),
        "promtool check metrics:\n{out}\n{text}"
    );

    // A real Prometheus server scrapes Portico and answers a query about it.
    let dir = site.dir.join("prometheus");
    std::fs::create_dir_all(&dir).unwrap();
    let web = format!("127.0.0.1:{}", free_port());
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: portico\n    static_configs:\n      - targets: [\"{}\"]\n",
            site.api
        ),
    )
    .unwrap();
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
    let web_addr = web.parse().unwrap();
    let query = |q: &str| -> Option<serde_json::Value> {
        let path = format!("/api/v1/query?query={}", url_encode(q));
        let r = http(web_addr, "GET", &path, &[], b"").ok()?;
        (r.status == 200).then(|| r.json())
    };
    let value = |v: &serde_json::Value| -> Option<f64> {
        v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
    };
    let q = "sum(portico_stun_requests_total{result=\"success\"})";
    let mut last = None;
    let got = wait_until(Duration::from_secs(60), || {
        last = query(q);
        last.as_ref().and_then(value) == Some(REQUESTS as f64)
    });
    assert!(
        got,
        "Prometheus never read {REQUESTS}; last answer {last:?}; log:\n{}",
        std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default()
    );
    // Prometheus scrapes OpenMetrics (it asks for it); it must have taken in every sample the
    // Prometheus text format shows, so neither format drops or mangles a family.
    let samples = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .count();
    let scraped = query("scrape_samples_scraped{job=\"portico\"}").unwrap();
    assert_eq!(value(&scraped), Some(samples as f64), "{scraped}");
    let up = query("up{job=\"portico\"}").unwrap();
    assert_eq!(value(&up), Some(1.0), "{up}");
    let info = query("portico_build_info").unwrap();
    assert_eq!(
        info["data"]["result"][0]["metric"]["version"],
        env!("CARGO_PKG_VERSION")
    );
}
