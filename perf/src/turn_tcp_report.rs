//! The "TURN over TCP and TLS" section of RESULTS.md (`bench-report --kind turn-tcp`): per
//! transport (the load point: `tcp`, `tls`, and Portico's one-port-443 variants), per server,
//! the figures issue 13 sets goals on (server CPU per million relayed packets, p99 latency,
//! RSS per 1000 allocations) with loss and readiness beside them, and the Portico / coturn
//! ratios against the goals (CPU ≤ 0.6, RSS ≤ 0.2).

use std::fmt::Write as _;

use serde_json::Value;

use crate::bench_report::{
    int, num, one, pct, server_order, server_table, spread, two, BenchReportArgs, Metric, Runs,
    Spread,
};

const METRICS: &[Metric] = &[
    Metric {
        title: "streams ready",
        get: |v| num(v, &["setup", "ready"]),
        fmt: int,
    },
    Metric {
        title: "relayed pkt/s",
        get: |v| num(v, &["data", "relayed_pps"]),
        fmt: int,
    },
    Metric {
        title: "round-trip loss",
        get: |v| num(v, &["data", "round_trip_loss_ratio"]),
        fmt: pct,
    },
    Metric {
        title: "p99 latency ms (peer → client)",
        get: |v| num(v, &["data", "down", "latency_us", "p99"]).map(|u| u / 1000.0),
        fmt: two,
    },
    Metric {
        title: "p99 latency ms (client → peer)",
        get: |v| num(v, &["data", "up", "latency_us", "p99"]).map(|u| u / 1000.0),
        fmt: two,
    },
    Metric {
        title: "server CPU-s per million relayed",
        get: |v| num(v, &["server_usage", "cpu_s_per_million_relayed"]),
        fmt: two,
    },
    Metric {
        title: "RSS MiB per 1000 allocations",
        get: |v| num(v, &["server_usage", "rss_per_1000_allocations_kib"]).map(|k| k / 1024.0),
        fmt: one,
    },
    Metric {
        title: "others' CPU, cores",
        get: |v| Some(num(v, &["others_cpu_s"])? / num(v, &["window_s"])?),
        fmt: two,
    },
];

const CPU: usize = 5;
const RSS: usize = 6;
const P99_DOWN: usize = 3;

pub fn render(args: &BenchReportArgs, runs: &Runs) -> String {
    let servers = server_order(runs, &args.servers);
    let mut md = String::new();
    let _ = writeln!(
        md,
        "## TURN over TCP and TLS: Portico vs coturn\n\nFrom the runs of the command below; \
         rerun it to refresh this section.\n"
    );
    let _ = writeln!(md, "### Setup\n\n| | |\n|---|---|");
    let _ = writeln!(md, "| command | `{}` |", args.command);
    for f in &args.facts {
        let (k, v) = f.split_once('=').unwrap_or((f.as_str(), ""));
        let _ = writeln!(md, "| {k} | {v} |");
    }
    md.push('\n');
    for (point, by_server) in runs {
        let _ = writeln!(md, "### {point}\n\nMedian (min–max) over the rounds.\n");
        server_table(&mut md, &servers, by_server, METRICS);
    }
    if !args.ratios.is_empty() {
        let _ = writeln!(
            md,
            "### Against the goals (issue 13): ratios of medians\n\nGoal: CPU per packet ≤ 0.6 × \
             coturn's, RSS per allocation ≤ 0.2 × coturn's.\n\n\
             | ratio | transport | CPU per relayed packet | goal met | RSS per allocation | goal met | p99 latency (peer → client) |\n\
             |---|---|---|---|---|---|---|"
        );
        for r in &args.ratios {
            let Some((a, b)) = r.split_once('/') else {
                continue;
            };
            for (point, by_server) in runs {
                let (Some(ra), Some(rb)) = (by_server.get(a), by_server.get(b)) else {
                    continue;
                };
                let ratio = |i: usize| match (spread(ra, &METRICS[i]), spread(rb, &METRICS[i])) {
                    (Some(x), Some(y)) if y.median > 0.0 => Some(x.median / y.median),
                    _ => None,
                };
                let show = |x: Option<f64>| x.map_or("–".to_string(), |x| format!("{x:.2}"));
                let met = |x: Option<f64>, goal: f64| match x {
                    Some(x) if x <= goal => "yes",
                    Some(_) => "no",
                    None => "–",
                };
                let (cpu, rss, p99) = (ratio(CPU), ratio(RSS), ratio(P99_DOWN));
                let _ = writeln!(
                    md,
                    "| {a} / {b} | {point} | {} | {} | {} | {} | {} |",
                    show(cpu),
                    met(cpu, 0.6),
                    show(rss),
                    met(rss, 0.2),
                    show(p99)
                );
            }
        }
        md.push('\n');
    }
    md += &noise(runs);
    md
}

/// How loaded the box was and how far the generator fell behind its schedule: at 1000
/// streams a starved generator offers less than 50 pkt/s per stream, and every figure above
/// is then a measurement at that lower load.
fn noise(runs: &Runs) -> String {
    let all: Vec<&Value> = runs.values().flat_map(|m| m.values().flatten()).collect();
    let others: Vec<f64> = all
        .iter()
        .filter_map(|v| Some(num(v, &["others_cpu_s"])? / num(v, &["window_s"])?))
        .collect();
    let behind: Vec<f64> = all
        .iter()
        .filter_map(|v| {
            let b = num(v, &["data", "generator_behind"])?;
            let sent = num(v, &["data", "up", "sent"])?;
            Some(b / (b + sent).max(1.0))
        })
        .collect();
    let (Some(o), Some(b)) = (Spread::of(&others), Spread::of(&behind)) else {
        return String::new();
    };
    format!(
        "### Noise\n\nOther processes kept {} cores busy during a run (median; min {}, max {}) \
         out of {}; the generator fell behind its schedule by {} of the packets it should have \
         sent (median; min {}, max {}), so the offered load was below the nominal 50 pkt/s per \
         stream by that much, alike for both servers (they alternate within every round). \
         Where the time goes, and what decided where the stream side runs: docs/DESIGN.md, \
         \"TURN over TCP and TLS\".\n\n",
        two(o.median),
        two(o.min),
        two(o.max),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        pct(b.median),
        pct(b.min),
        pct(b.max)
    )
}
