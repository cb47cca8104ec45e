//! The `register` section of `perf/RESULTS.md` (`bench-report --kind register`): H.323 and
//! SIP registrations through the reverse proxy, from the JSON reports of
//! `portico-perf register` named `<client>__<point>__<round>.json`, where the client is
//! `<proto>-<transport>` (`h323-tcp`, `sip-tls`, …; `-direct` for runs straight to the fake
//! PBX, the generator's ceiling).

use std::fmt::Write as _;

use serde_json::Value;

use crate::bench_report::{
    int, num, one, server_order, two, BenchReportArgs, Runs, Spread, RUN_KEY,
};

struct Metric {
    title: &'static str,
    get: fn(&Value) -> Option<f64>,
    fmt: fn(f64) -> String,
}

const METRICS: &[Metric] = &[
    Metric {
        title: "reg/s",
        get: |v| num(v, &["reg_per_s"]),
        fmt: int,
    },
    Metric {
        title: "failed (all runs)",
        get: |v| Some(num(v, &["failed"])? + num(v, &["bad"])?),
        fmt: int,
    },
    Metric {
        title: "latency p50 µs",
        get: |v| num(v, &["latency_us", "p50"]),
        fmt: int,
    },
    Metric {
        title: "latency p99 µs",
        get: |v| num(v, &["latency_us", "p99"]),
        fmt: int,
    },
    Metric {
        title: "Portico CPU µs/reg",
        get: |v| num(v, &["server", "cpu_us_per_reg"]),
        fmt: one,
    },
    Metric {
        title: "generator + fake PBX CPU µs/reg",
        get: |v| num(v, &["generator_cpu_us_per_reg"]),
        fmt: one,
    },
    Metric {
        title: "others' CPU, cores",
        get: |v| Some(num(v, &["others_cpu_s"])? / num(v, &["elapsed_s"])?),
        fmt: two,
    },
];

const REG_PER_S: usize = 0;
/// Summed over the runs rather than a median: one failure is worth seeing.
const FAILED: usize = 1;
const P50: usize = 2;
const PORTICO_US: usize = 4;

fn first(runs: &Runs, point: &str) -> Option<Value> {
    runs.get(point)?.values().flatten().next().cloned()
}

/// New connections before kept ones; fixed rates (ascending) before flat out.
fn point_order(runs: &Runs) -> Vec<String> {
    let mut points: Vec<(bool, f64, String)> = runs
        .keys()
        .map(|p| {
            let v = first(runs, p).unwrap_or(Value::Null);
            (
                v.get("mode").and_then(Value::as_str) == Some("kept"),
                num(&v, &["offered_rate"]).unwrap_or(f64::INFINITY),
                p.clone(),
            )
        })
        .collect();
    points.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)).then(a.2.cmp(&b.2)));
    points.into_iter().map(|(_, _, p)| p).collect()
}

fn point_title(v: &Value) -> String {
    let conns = num(v, &["connections"]).unwrap_or(0.0);
    let secs = num(v, &["duration_s"]).unwrap_or(0.0);
    let how = if v.get("mode").and_then(Value::as_str) == Some("kept") {
        format!("Over {conns} kept connections")
    } else {
        format!("A new connection per registration, {conns} at a time")
    };
    match num(v, &["offered_rate"]) {
        Some(r) => format!(
            "{how}: fixed offered rate of {} registrations/s ({secs} s per run)",
            int(r)
        ),
        None => format!("{how}: flat out ({secs} s per run)"),
    }
}

fn spread(rs: &[Value], m: &Metric) -> Option<Spread> {
    Spread::of(&rs.iter().filter_map(|v| (m.get)(v)).collect::<Vec<_>>())
}

fn median(runs: &Runs, point: &str, client: &str, m: usize) -> Option<f64> {
    spread(runs.get(point)?.get(client)?, &METRICS[m]).map(|s| s.median)
}

pub fn render(args: &BenchReportArgs, runs: &Runs) -> String {
    let points = point_order(runs);
    let clients = server_order(runs, &args.servers);
    let mut md = String::from(
        "## H.323 and SIP registrations through the reverse proxy\n\nWhat a registration \
         costs Portico's proxy: a new TCP connection (with or without a TLS handshake), the \
         first message read and decoded to find the service (H.323: TPKT, Q.931 and the \
         H.225.0 RAS tunnelled per H.460.17, in aligned PER; SIP: the REGISTER's head), a \
         connection to the target, the message forwarded and the answer relayed back. From \
         the runs of the command below; rerun it to refresh this section.\n\n### Setup\n\n\
         | | |\n|---|---|\n",
    );
    let _ = writeln!(md, "| command | `{}` |", args.command);
    for f in &args.facts {
        let (k, v) = f.split_once('=').unwrap_or((f.as_str(), ""));
        let _ = writeln!(md, "| {k} | {v} |");
    }
    let rounds = runs
        .values()
        .flat_map(|m| m.values().map(Vec::len))
        .max()
        .unwrap_or(0);
    let _ = writeln!(md, "| rounds per client and load point | {rounds} |\n");

    for p in &points {
        let (Some(by_client), Some(v)) = (runs.get(p), first(runs, p)) else {
            continue;
        };
        let _ = writeln!(
            md,
            "### {}\n\nMedian (min–max) over the rounds; `-direct`: straight to the fake \
             PBX, no proxy.\n",
            point_title(&v)
        );
        let _ = write!(md, "| client → proxy | runs |");
        for m in METRICS {
            let _ = write!(md, " {} |", m.title);
        }
        md += "\n|---|---|";
        for _ in METRICS {
            md += "---|";
        }
        md.push('\n');
        for c in &clients {
            let Some(rs) = by_client.get(c) else { continue };
            let _ = write!(md, "| {c} | {} |", rs.len());
            for (i, m) in METRICS.iter().enumerate() {
                let cell = if i == FAILED {
                    int(rs.iter().filter_map(|v| (m.get)(v)).sum())
                } else {
                    spread(rs, m).map_or("–".to_string(), |s| s.show(m.fmt))
                };
                let _ = write!(md, " {cell} |");
            }
            md.push('\n');
        }
        md.push('\n');
    }

    md += "### H.323 beside SIP\n\nRatios of medians, H.323 / SIP, same load point and \
           transport (below 1: H.323 cheaper or faster).\n\n\
           | load point | transport | reg/s | latency p50 | Portico CPU per registration |\n\
           |---|---|---|---|---|\n";
    for p in &points {
        for t in ["tcp", "tls", "direct"] {
            let (a, b) = (format!("h323-{t}"), format!("sip-{t}"));
            let ratio = |m: usize| match (median(runs, p, &a, m), median(runs, p, &b, m)) {
                (Some(x), Some(y)) if y > 0.0 => format!("{:.2}", x / y),
                _ => "–".into(),
            };
            if median(runs, p, &a, REG_PER_S).is_none() || median(runs, p, &b, REG_PER_S).is_none()
            {
                continue;
            }
            let _ = writeln!(
                md,
                "| {p} | {t} | {} | {} | {} |",
                ratio(REG_PER_S),
                ratio(P50),
                ratio(PORTICO_US)
            );
        }
    }
    md.push('\n');
    md += &anomalies(runs, &points, &clients);
    md += NOTES;
    md
}

/// Runs with failed or wrong answers, late starts or requests the fake PBX did not get as
/// sent: the medians hide them.
fn anomalies(runs: &Runs, points: &[String], clients: &[String]) -> String {
    let mut lines = Vec::new();
    for p in points {
        for c in clients {
            for v in runs.get(p).and_then(|m| m.get(c)).into_iter().flatten() {
                let get = |path: &[&str]| num(v, path).unwrap_or(0.0);
                let mut what = Vec::new();
                if get(&["failed"]) + get(&["bad"]) > 0.0 {
                    what.push(format!(
                        "{} failed and {} wrongly answered registrations ({})",
                        int(get(&["failed"])),
                        int(get(&["bad"])),
                        v.get("errors").map_or(String::new(), Value::to_string)
                    ));
                }
                if get(&["late"]) > 0.0 {
                    what.push(format!(
                        "{} registrations started more than one interval late",
                        int(get(&["late"]))
                    ));
                }
                if get(&["fake_pbx", "mismatched"]) > 0.0 {
                    what.push(format!(
                        "{} requests reached the fake PBX altered",
                        int(get(&["fake_pbx", "mismatched"]))
                    ));
                }
                if !what.is_empty() {
                    let run = v.get(RUN_KEY).and_then(Value::as_str).unwrap_or("?");
                    lines.push(format!("- `{run}`: {}\n", what.join("; ")));
                }
            }
        }
    }
    let mut md = String::from("#### Anomalies\n\n");
    if lines.is_empty() {
        md += "None: every registration was answered with the fake PBX's answer, every \
               request reached it unchanged, and no fixed-rate registration started late.\n";
    } else {
        for l in lines {
            md += &l;
        }
    }
    md.push('\n');
    md
}

const NOTES: &str = "### What the numbers mean\n\n\
- **Portico CPU µs/reg** is utime+stime of Portico's processes (`/proc/PID/stat`: the control \
plane, where the proxy runs, and the idle dataplane) over the run divided by the registrations \
answered. The kernel scales utime+stime to the scheduler's exact run time, so the sum is exact \
to a 10 ms tick; it includes the kernel's TCP work done in Portico's context (accept, two \
connections set up and torn down per registration, loopback sends). At the fixed rate it \
compares H.323 with SIP at equal load; flat out, batching on a busy box lowers it.\n\
- **reg/s flat out** is bounded by the two cores the proxy shares with the generator, the fake \
PBX and other people's work, and by the generator's own ceiling (the `-direct` rows: the same \
registrations straight to the fake PBX).\n\
- **latency** runs from the connect (or, over kept connections, the send) to the whole answer \
read: TCP handshake, TLS handshake, the proxy's connect to the target, both hops of the \
request and of the answer. Percentiles from a log-linear histogram (≤ 3.2% bucket error).\n\
- **failed** (summed over the runs) counts registrations that got no whole, correct answer within the timeout \
(connect, TLS, read) or got a wrong one (H.323: not byte for byte the fake PBX's RCF; SIP: not \
`200` for the REGISTER's Call-ID).\n\
- Messages: H.323 is pycrate's RegistrationRequest (controlplane/tests/proxy/seeds.txt, the \
gatekeeper id `hq@example.com/branch` and four aliases) in a Q.931 FACILITY per H.460.17, \
answered with pycrate's RegistrationConfirm likewise; SIP is a REGISTER with Via, From, To, \
Call-ID, CSeq, Contact and Expires, answered `200 OK`.\n";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench_report::{load, run, Kind};
    use serde_json::json;

    fn report(mode: &str, rate: Option<f64>, regs: f64, cpu: Option<f64>) -> Value {
        let mut v = json!({
            "scenario": "register", "mode": mode, "offered_rate": rate, "connections": 8,
            "duration_s": 4.0, "elapsed_s": 4.0, "reg_per_s": regs, "failed": 0, "bad": 0,
            "late": 0, "errors": {}, "latency_us": {"p50": 400.0, "p99": 900.0},
            "generator_cpu_us_per_reg": 50.0, "others_cpu_s": 0.4,
            "fake_pbx": {"connections": 10, "answered": 10, "mismatched": 0}
        });
        if let Some(c) = cpu {
            v["server"] = json!({"cpu_us_per_reg": c});
        }
        v
    }

    #[test]
    fn renders_points_ratios_and_anomalies() {
        let dir = std::env::temp_dir().join(format!("portico-reg-report-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let files = [
            (
                "h323-tcp",
                "rate300",
                report("new", Some(300.0), 300.0, Some(90.0)),
            ),
            (
                "sip-tcp",
                "rate300",
                report("new", Some(300.0), 300.0, Some(60.0)),
            ),
            ("h323-tcp", "flat", report("new", None, 2000.0, Some(70.0))),
            ("sip-tcp", "flat", report("new", None, 2500.0, Some(50.0))),
            ("sip-direct", "flat", report("new", None, 9000.0, None)),
            ("h323-tcp", "kept", report("kept", None, 8000.0, Some(20.0))),
        ];
        for (i, (c, p, v)) in files.iter().enumerate() {
            std::fs::write(dir.join(format!("{c}__{p}__r{i}.json")), v.to_string()).unwrap();
        }
        let mut bad = report("new", None, 1800.0, Some(80.0));
        bad["failed"] = json!(3);
        bad["errors"] = json!({"timed out": 3});
        std::fs::write(dir.join("h323-tcp__flat__r9.json"), bad.to_string()).unwrap();
        assert_eq!(
            point_order(&load(&dir).unwrap()),
            ["rate300", "flat", "kept"]
        );
        let args = BenchReportArgs {
            kind: Kind::Register,
            dir: Some(dir.clone()),
            markdown: None,
            charts: None,
            out: dir.join("RESULTS.md"),
            command: "scripts/bench.sh register".into(),
            facts: vec!["kernel=6.18".into()],
            servers: vec!["h323-tcp".into(), "sip-tcp".into()],
            ratios: vec![],
            reference: None,
        };
        run(&args).unwrap();
        let md = std::fs::read_to_string(dir.join("RESULTS.md")).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(md.contains("<!-- section:register -->"), "{md}");
        let rate = md
            .find("A new connection per registration, 8 at a time: fixed offered rate of 300")
            .unwrap();
        let flat = md.find("8 at a time: flat out (4 s per run)").unwrap();
        let kept = md.find("Over 8 kept connections: flat out").unwrap();
        assert!(rate < flat && flat < kept, "{md}");
        assert!(
            md.contains("| h323-tcp | 1 | 300 | 0 | 400 | 900 | 90.0 | 50.0 | 0.10 |"),
            "{md}"
        );
        assert!(
            md.contains("| sip-direct | 1 | 9,000 | 0 | 400 | 900 | – |"),
            "{md}"
        );
        assert!(
            md.contains("| h323-tcp | 2 | 1,900 (1,800–2,000) | 3 |"),
            "{md}"
        );
        assert!(
            md.contains("| rate300 | tcp | 1.00 | 1.00 | 1.50 |"),
            "{md}"
        );
        assert!(md.contains("| flat | tcp | 0.76 | 1.00 | 1.50 |"), "{md}");
        assert!(
            md.contains("- `h323-tcp__flat__r9`: 3 failed and 0 wrongly answered registrations ({\"timed out\":3})"),
            "{md}"
        );
    }
}
