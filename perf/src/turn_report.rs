//! The TURN section of `perf/RESULTS.md` (`bench-report --kind turn`), from the JSON reports
//! of `scripts/bench.sh turn`: one file per server, load point and round, named
//! `<server>__<point>__<round>.json`, where the point is `ramp<streams>`, `flat`,
//! `sustained`, `churn` or `uclient`.
//!
//! Besides the tables (medians and min–max spreads over the rounds) it checks the figures
//! against issue 7's goals, finds each server's saturation point on the ramp, and writes the
//! SVG charts ([`crate::svg`]) beside the document.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde_json::Value;

use crate::bench_report::{
    int, num, one, pct, server_order, two, BenchReportArgs, Runs, Spread, RUN_KEY,
};
use crate::svg::{BarChart, LineChart, Series};

/// Loss above which a ramp step counts as saturated (issue 7: "until loss > 0.1%").
pub const SATURATION_LOSS: f64 = 0.001;

/// Reads one figure from a run report.
type Getter = fn(&Value) -> Option<f64>;

struct Metric {
    title: &'static str,
    get: Getter,
    fmt: fn(f64) -> String,
}

fn mib(kib: Option<f64>) -> Option<f64> {
    kib.map(|k| k / 1024.0)
}

fn per_window(v: &Value, key: &str, window: &str) -> Option<f64> {
    Some(num(v, &[key])? / num(v, &[window])?.max(1e-9))
}

/// The worse (higher) of the two directions' latency quantile `q`.
fn worst(v: &Value, q: &str) -> Option<f64> {
    let a = num(v, &["data", "up", "latency_us", q]);
    let b = num(v, &["data", "down", "latency_us", q]);
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

const RELAYED: Metric = Metric {
    title: "relayed pkt/s",
    get: |v| num(v, &["data", "relayed_pps"]),
    fmt: int,
};
const LOSS: Metric = Metric {
    title: "loss",
    get: |v| num(v, &["data", "round_trip_loss_ratio"]),
    fmt: pct,
};
const CPU_M: Metric = Metric {
    title: "server CPU-s / M pkt",
    get: |v| num(v, &["server_usage", "cpu_s_per_million_relayed"]),
    fmt: two,
};
const GEN_US: Metric = Metric {
    title: "generator µs / pkt",
    get: |v| num(v, &["generator_cpu_us_per_packet"]),
    fmt: two,
};
const OTHERS: Metric = Metric {
    title: "others' CPU, cores",
    get: |v| {
        per_window(v, "others_cpu_s", "window_s")
            .or_else(|| per_window(v, "others_cpu_s", "wall_s"))
    },
    fmt: two,
};

const DATA_METRICS: &[Metric] = &[
    RELAYED,
    LOSS,
    Metric {
        title: "c→p p50 µs",
        get: |v| num(v, &["data", "up", "latency_us", "p50"]),
        fmt: one,
    },
    Metric {
        title: "c→p p99 µs",
        get: |v| num(v, &["data", "up", "latency_us", "p99"]),
        fmt: one,
    },
    Metric {
        title: "c→p p99.9 µs",
        get: |v| num(v, &["data", "up", "latency_us", "p999"]),
        fmt: one,
    },
    Metric {
        title: "p→c p50 µs",
        get: |v| num(v, &["data", "down", "latency_us", "p50"]),
        fmt: one,
    },
    Metric {
        title: "p→c p99 µs",
        get: |v| num(v, &["data", "down", "latency_us", "p99"]),
        fmt: one,
    },
    Metric {
        title: "p→c p99.9 µs",
        get: |v| num(v, &["data", "down", "latency_us", "p999"]),
        fmt: one,
    },
    CPU_M,
    GEN_US,
    OTHERS,
];

const SUSTAINED_EXTRA: &[Metric] = &[
    Metric {
        title: "setup allocations/s",
        get: |v| num(v, &["setup", "allocations_per_s"]),
        fmt: int,
    },
    Metric {
        title: "peak RSS MiB",
        get: |v| mib(num(v, &["server_usage", "peak_rss_kib"])),
        fmt: one,
    },
    Metric {
        title: "RSS / 1000 alloc MiB",
        get: |v| mib(num(v, &["server_usage", "rss_per_1000_allocations_kib"])),
        fmt: two,
    },
    Metric {
        title: "… after traffic MiB",
        get: |v| {
            mib(num(
                v,
                &["server_usage", "rss_per_1000_allocations_loaded_kib"],
            ))
        },
        fmt: two,
    },
    Metric {
        title: "reordered",
        get: |v| {
            Some(num(v, &["data", "up", "reordered"])? + num(v, &["data", "down", "reordered"])?)
        },
        fmt: int,
    },
];

const CHURN_METRICS: &[Metric] = &[
    Metric {
        title: "allocations/s",
        get: |v| num(v, &["churn", "allocations_per_s"]),
        fmt: int,
    },
    Metric {
        title: "failed cycles",
        get: |v| num(v, &["churn", "failed"]),
        fmt: int,
    },
    Metric {
        title: "cycle p50 µs",
        get: |v| num(v, &["churn", "cycle_us", "p50"]),
        fmt: one,
    },
    Metric {
        title: "cycle p99 µs",
        get: |v| num(v, &["churn", "cycle_us", "p99"]),
        fmt: one,
    },
    Metric {
        title: "server CPU µs / cycle",
        get: |v| num(v, &["server_usage", "cpu_us_per_cycle"]),
        fmt: one,
    },
    Metric {
        title: "peak RSS MiB",
        get: |v| mib(num(v, &["server_usage", "peak_rss_kib"])),
        fmt: one,
    },
    OTHERS,
];

const UCLIENT_METRICS: &[Metric] = &[
    Metric {
        title: "messages sent",
        get: |v| num(v, &["messages_sent"]),
        fmt: int,
    },
    Metric {
        title: "lost (its figure)",
        get: |v| num(v, &["lost_percent"]).map(|p| p / 100.0),
        fmt: pct,
    },
    Metric {
        title: "RTT avg ms",
        get: |v| num(v, &["rtt_avg_ms"]),
        fmt: two,
    },
    Metric {
        title: "RTT max ms",
        get: |v| num(v, &["rtt_max_ms"]),
        fmt: one,
    },
    Metric {
        title: "jitter avg ms",
        get: |v| num(v, &["jitter_avg_ms"]),
        fmt: two,
    },
    Metric {
        title: "server CPU-s / M pkt",
        get: |v| num(v, &["server_usage", "cpu_s_per_million_relayed"]),
        fmt: two,
    },
    Metric {
        title: "peak RSS MiB",
        get: |v| mib(num(v, &["server_usage", "peak_rss_kib"])),
        fmt: one,
    },
    Metric {
        title: "wall s",
        get: |v| num(v, &["wall_s"]),
        fmt: one,
    },
    OTHERS,
];

fn spread(runs: &[Value], get: fn(&Value) -> Option<f64>) -> Option<Spread> {
    let v: Vec<f64> = runs.iter().filter_map(get).collect();
    Spread::of(&v)
}

fn median(runs: Option<&Vec<Value>>, get: fn(&Value) -> Option<f64>) -> Option<f64> {
    spread(runs?, get).map(|s| s.median)
}

fn header(md: &mut String, first: &[&str], metrics: &[Metric]) {
    md.push('|');
    for f in first {
        let _ = write!(md, " {f} |");
    }
    for m in metrics {
        let _ = write!(md, " {} |", m.title);
    }
    md.push_str("\n|");
    for _ in 0..first.len() + metrics.len() {
        md.push_str("---|");
    }
    md.push('\n');
}

fn row(md: &mut String, first: &[String], runs: &[Value], metrics: &[Metric]) {
    md.push('|');
    for f in first {
        let _ = write!(md, " {f} |");
    }
    for m in metrics {
        let cell = spread(runs, m.get).map_or("–".to_string(), |s| s.show(m.fmt));
        let _ = write!(md, " {cell} |");
    }
    md.push('\n');
}

/// Ramp points (`ramp<streams>`) in order of streams.
fn ramp_points(runs: &Runs) -> Vec<(u64, String)> {
    let mut v: Vec<(u64, String)> = runs
        .keys()
        .filter_map(|p| Some((p.strip_prefix("ramp")?.parse().ok()?, p.clone())))
        .collect();
    v.sort();
    v
}

fn round_of(v: &Value) -> String {
    v.get(RUN_KEY)
        .and_then(Value::as_str)
        .and_then(|k| k.rsplit("__").next())
        .unwrap_or("?")
        .to_string()
}

/// Per round: the highest stream count whose run, and every lower one, stayed within
/// [`SATURATION_LOSS`] (0 if even the first step lost more), and whether a step beyond it
/// was lossy (false: the ramp ended without saturating the server).
fn saturation(runs: &Runs, server: &str) -> Vec<(String, u64, bool)> {
    let mut by_round: BTreeMap<String, Vec<(u64, f64)>> = BTreeMap::new();
    for (streams, p) in ramp_points(runs) {
        for v in runs
            .get(&p)
            .and_then(|m| m.get(server))
            .into_iter()
            .flatten()
        {
            if let Some(loss) = (LOSS.get)(v) {
                by_round
                    .entry(round_of(v))
                    .or_default()
                    .push((streams, loss));
            }
        }
    }
    by_round
        .into_iter()
        .map(|(round, mut steps)| {
            steps.sort_by_key(|s| s.0);
            let mut best = 0;
            let mut saturated = false;
            for (streams, loss) in steps {
                if loss > SATURATION_LOSS {
                    saturated = true;
                    break;
                }
                best = streams;
            }
            (round, best, saturated)
        })
        .collect()
}

fn offered_both_ways(by_server: &BTreeMap<String, Vec<Value>>, streams: u64) -> f64 {
    let rate = by_server
        .values()
        .flatten()
        .find_map(|v| num(v, &["rate_per_stream"]))
        .unwrap_or(50.0);
    streams as f64 * rate * 2.0
}

/// Writes the charts; returns the Markdown that links them.
fn charts(runs: &Runs, servers: &[String], out_dir: &Path, dir: &Path) -> Result<String, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let ramp = ramp_points(runs);
    let mut through = Vec::new();
    let mut latency = Vec::new();
    let mut cpu = Vec::new();
    let mut max_offered = 0f64;
    for (k, s) in servers.iter().enumerate() {
        let mut t = Vec::new();
        let mut p99 = Vec::new();
        let mut p50 = Vec::new();
        let mut c = Vec::new();
        for (streams, p) in &ramp {
            let Some(by_server) = runs.get(p) else {
                continue;
            };
            let x = offered_both_ways(by_server, *streams);
            max_offered = max_offered.max(x);
            let rs = by_server.get(s);
            if let Some(y) = median(rs, RELAYED.get) {
                t.push((x, y));
            }
            if let Some(y) = median(rs, |v| worst(v, "p99")) {
                p99.push((x, y));
            }
            if let Some(y) = median(rs, |v| worst(v, "p50")) {
                p50.push((x, y));
            }
            if let Some(y) = median(rs, CPU_M.get) {
                c.push((x, y));
            }
        }
        let series = |name: String, points, dashed| Series {
            name,
            points,
            color: k,
            dashed,
        };
        through.push(series(s.clone(), t, false));
        latency.push(series(format!("{s} p99"), p99, false));
        latency.push(series(format!("{s} p50"), p50, true));
        cpu.push(series(s.clone(), c, false));
    }
    through.push(Series {
        name: "offered".into(),
        points: vec![(0.0, 0.0), (max_offered, max_offered)],
        color: 5,
        dashed: true,
    });
    let write = |name: &str, svg: String| -> Result<String, String> {
        let path = dir.join(name);
        std::fs::write(&path, svg).map_err(|e| format!("{}: {e}", path.display()))?;
        let rel = path
            .strip_prefix(out_dir)
            .map_or_else(|_| path.display().to_string(), |p| p.display().to_string());
        Ok(rel)
    };
    let mut md = String::new();
    if !ramp.is_empty() {
        let a = write(
            "turn-ramp-throughput.svg",
            LineChart {
                title: "TURN ramp: relayed packets/s against offered load".into(),
                x_label: "offered packets/s (both directions; 50 pkt/s per stream)".into(),
                y_label: "relayed packets/s (median)".into(),
                log_y: false,
                series: through,
            }
            .render(),
        )?;
        let b = write(
            "turn-ramp-latency.svg",
            LineChart {
                title: "TURN ramp: one-way latency (worse direction)".into(),
                x_label: "offered packets/s (both directions)".into(),
                y_label: "µs (median of runs; log scale)".into(),
                log_y: true,
                series: latency,
            }
            .render(),
        )?;
        let c = write(
            "turn-ramp-cpu.svg",
            LineChart {
                title: "TURN ramp: server CPU per relayed packet".into(),
                x_label: "offered packets/s (both directions)".into(),
                y_label: "CPU-seconds per million relayed packets".into(),
                log_y: false,
                series: cpu,
            }
            .render(),
        )?;
        let _ = writeln!(md, "![relayed packets/s against offered load]({a})\n");
        let _ = writeln!(md, "![one-way latency against offered load]({b})\n");
        let _ = writeln!(
            md,
            "![server CPU per relayed packet against offered load]({c})\n"
        );
    }
    if let Some(by_server) = runs.get("sustained") {
        let qs: [(&str, [&str; 2]); 6] = [
            ("c→p p50", ["up", "p50"]),
            ("c→p p99", ["up", "p99"]),
            ("c→p p99.9", ["up", "p999"]),
            ("p→c p50", ["down", "p50"]),
            ("p→c p99", ["down", "p99"]),
            ("p→c p99.9", ["down", "p999"]),
        ];
        let series = servers
            .iter()
            .filter_map(|s| {
                let rs = by_server.get(s)?;
                let vals = qs
                    .iter()
                    .map(|(_, [dir, q])| {
                        let v: Vec<f64> = rs
                            .iter()
                            .filter_map(|r| num(r, &["data", dir, "latency_us", q]))
                            .collect();
                        Spread::of(&v).map(|x| x.median)
                    })
                    .collect();
                Some((s.clone(), vals))
            })
            .collect();
        let d = write(
            "turn-sustained-latency.svg",
            BarChart {
                title: "TURN, 1000 streams × 50 pkt/s: one-way latency".into(),
                y_label: "µs (median of runs; log scale)".into(),
                log_y: true,
                groups: qs.iter().map(|(g, _)| g.to_string()).collect(),
                series,
            }
            .render(),
        )?;
        let _ = writeln!(md, "![latency percentiles at 1000 streams]({d})\n");
    }
    Ok(md)
}

/// The verdict on issue 7's goals, Portico (`ours`) against coturn (`theirs`).
fn goals(runs: &Runs, ours: &str, theirs: &str) -> String {
    let mut md = String::from(
        "### Against the goals (issue 7)\n\n| goal | Portico | coturn | ratio | met? |\n|---|---|---|---|---|\n",
    );
    let get = |p: &str, s: &str, m: fn(&Value) -> Option<f64>| {
        median(runs.get(p).and_then(|x| x.get(s)), m)
    };
    let yes = |b: bool| if b { "**yes**" } else { "**no**" };
    // 1. Packets per CPU-second.
    for (p, label) in [
        ("sustained", "1000 streams × 50 pkt/s"),
        ("flat", "flat out"),
    ] {
        if let (Some(a), Some(b)) = (get(p, ours, CPU_M.get), get(p, theirs, CPU_M.get)) {
            let x = b / a.max(1e-9);
            let _ = writeln!(
                md,
                "| relayed packets per CPU-second ≥ 2× coturn's ({label}) | {} CPU-s / M pkt | {} CPU-s / M pkt | {x:.2}× | {} |",
                two(a),
                two(b),
                yes(x >= 2.0)
            );
        }
    }
    // 2. No loss where coturn loses; 3. p99 below coturn's at every load.
    let mut levels = Vec::new();
    for (streams, p) in ramp_points(runs) {
        levels.push((format!("{streams} streams"), p));
    }
    levels.push(("sustained 1000 streams".into(), "sustained".into()));
    let mut compared = 0;
    let mut loss_bad = Vec::new();
    let mut coturn_lossy = Vec::new();
    let mut p99_bad = Vec::new();
    let mut p99_ratios = Vec::new();
    for (label, p) in &levels {
        let (Some(lo), Some(lt)) = (get(p, ours, LOSS.get), get(p, theirs, LOSS.get)) else {
            continue;
        };
        compared += 1;
        if lt > SATURATION_LOSS {
            coturn_lossy.push(format!("{label} ({})", pct(lt)));
        }
        if lo > SATURATION_LOSS {
            loss_bad.push(format!("{label} ({})", pct(lo)));
        }
        if let (Some(a), Some(b)) = (
            get(p, ours, |v| worst(v, "p99")),
            get(p, theirs, |v| worst(v, "p99")),
        ) {
            p99_ratios.push(a / b.max(1e-9));
            if a >= b {
                p99_bad.push(format!("{label} ({} vs {} µs)", one(a), one(b)));
            }
        }
    }
    if compared > 0 {
        let _ = writeln!(
            md,
            "| no loss where coturn loses (loss ≤ 0.1% at every load level coturn was measured at) | lossy at: {} | lossy at: {} | – | {} |",
            if loss_bad.is_empty() { "none".into() } else { loss_bad.join(", ") },
            if coturn_lossy.is_empty() { "none".into() } else { coturn_lossy.join(", ") },
            yes(loss_bad.is_empty())
        );
        let worst_ratio = p99_ratios.iter().copied().fold(0.0, f64::max);
        let _ = writeln!(
            md,
            "| p99 one-way latency (worse direction) below coturn's at every load level | higher at: {} | – | worst {:.2}× | {} |",
            if p99_bad.is_empty() { "none".into() } else { p99_bad.join(", ") },
            worst_ratio,
            yes(p99_bad.is_empty() && !p99_ratios.is_empty())
        );
    }
    // 4. RSS per 1000 allocations.
    let rss = |v: &Value| mib(num(v, &["server_usage", "rss_per_1000_allocations_kib"]));
    let rss_loaded = |v: &Value| {
        mib(num(
            v,
            &["server_usage", "rss_per_1000_allocations_loaded_kib"],
        ))
    };
    for (label, f) in [
        ("after setup", rss as fn(&Value) -> Option<f64>),
        ("after traffic", rss_loaded),
    ] {
        if let (Some(a), Some(b)) = (get("sustained", ours, f), get("sustained", theirs, f)) {
            let x = a / b.max(1e-9);
            let _ = writeln!(
                md,
                "| RSS per 1000 allocations ≤ 1/10 of coturn's ({label}) | {} MiB | {} MiB | {x:.3} | {} |",
                two(a),
                two(b),
                yes(x <= 0.1)
            );
        }
    }
    md.push('\n');
    md
}

/// Runs with something the medians hide.
fn anomalies(runs: &Runs, servers: &[String]) -> String {
    let mut lines = Vec::new();
    for (p, by_server) in runs {
        for s in servers {
            for v in by_server.get(s).into_iter().flatten() {
                let g = |path: &[&str]| num(v, path).unwrap_or(0.0);
                let mut what = Vec::new();
                if g(&["setup", "failed"]) > 0.0 {
                    let reasons = v
                        .get("setup")
                        .and_then(|x| x.get("failures"))
                        .map(|f| f.to_string())
                        .unwrap_or_default();
                    what.push(format!(
                        "{} clients failed setup {reasons}",
                        int(g(&["setup", "failed"]))
                    ));
                }
                for (key, label) in [
                    (&["delete_failed"][..], "allocations not deleted"),
                    (
                        &["data", "generator_behind"][..],
                        "packets the generator fell behind on",
                    ),
                    (&["data", "send_errors"][..], "client send errors"),
                    (&["data", "bad"][..], "bad datagrams"),
                    (&["data", "misrouted"][..], "misrouted packets"),
                    (&["data", "up", "duplicates"][..], "duplicates client→peer"),
                    (
                        &["data", "down", "duplicates"][..],
                        "duplicates peer→client",
                    ),
                    (&["churn", "failed"][..], "failed churn cycles"),
                ] {
                    if g(key) > 0.0 {
                        what.push(format!("{} {label}", int(g(key))));
                    }
                }
                if v.get("timed_out").and_then(Value::as_bool) == Some(true) {
                    what.push("turnutils_uclient timed out".into());
                }
                if what.is_empty() {
                    continue;
                }
                let run = v.get(RUN_KEY).and_then(Value::as_str).unwrap_or("?");
                let others = (OTHERS.get)(v).map_or("?".into(), two);
                lines.push(format!(
                    "- `{run}` ({p}): {} (others' CPU {others} cores)\n",
                    what.join("; ")
                ));
            }
        }
    }
    let mut md = String::from("#### Anomalies\n\n");
    if lines.is_empty() {
        md += "None: every client set up and deleted its allocation, no packet was \
               misrouted, duplicated or bad, and the generator never fell behind its \
               schedule.\n";
    } else {
        for l in lines {
            md += &l;
        }
    }
    md.push('\n');
    md
}

const NOTES: &str = "### What the TURN figures mean\n\n\
- **Streams**: each client is one allocation with one permission and (channel mode) one \
channel to the generator's own UDP peer, from its own loopback source address (127.128.0.0/9: \
every client is a distinct 5-tuple, yet the generator sends for all of them with one batched \
`sendmmsg`). A stream sends 172-byte payloads at 50 packets/s; the peer echoes every packet \
back through the relay, so a stream is 100 relayed packets/s.\n\
- **relayed pkt/s** counts packets delivered by the relay in both directions per second of \
sending. **loss** is round trip: 1 − echoes back at the clients ÷ packets sent (each \
direction's own loss is in the JSON reports). Packets still missing 1 s after the last send \
are lost.\n\
- **c→p / p→c latency** is one-way: client to peer measured at the peer from the client's \
send stamp, peer to client measured at the client from the peer's echo stamp. One process, \
one monotonic clock, so the stamps compare directly. It includes both kernels' loopback paths \
and queueing in socket buffers. Log-linear histogram, ≤ 3.2% bucket error.\n\
- **server CPU-s / M pkt** is utime+stime of the server's processes (`/proc/<pid>/stat`) over \
the data phase (setup and teardown excluded) per million relayed packets. It includes the \
kernel's UDP work done in the server's context. At 50 pkt/s per stream a server wakes for a \
few packets at a time, so this is dominated by per-wakeup costs on this virtual machine; flat \
out, batches amortise them (compare with `turn-stub`, the least any relay can spend).\n\
- **RSS / 1000 alloc**: (VmRSS of the server's processes after setup − VmRSS before it) per \
1000 allocations, on a server started fresh for the run; \"after traffic\" is the same after \
the data phase (it includes buffers that traffic touched, not only allocation state). For \
Portico the processes are controlplane + dataplane.\n\
- **saturation point**: the highest step of the ramp whose loss stayed ≤ 0.1%, that step and \
all below it; each server's ramp stops after its first lossy step.\n\
- **turnutils_uclient** figures are coturn's client's own: it prints round-trip times in \
whole milliseconds, so sub-millisecond averages come from rounding; its server CPU per \
million relayed packets counts each message twice (to the peer and back) and includes the \
client's slow setup phase. All its clients share 127.0.0.1, and Portico answers at most \
`turn.error_rate` (default 10) error responses per second per source address, 401 \
challenges included (its defence against reflection), so with 100 clients its connect phase \
takes about 8 s longer than against coturn, which has no such limit: hence Portico's longer \
wall time in (d). `portico-perf turn` gives every client its own address and is not \
affected.\n";

/// Builds the TURN section; writes the charts into `charts_dir`.
pub fn render(
    args: &BenchReportArgs,
    runs: &Runs,
    out_dir: &Path,
    charts_dir: &Path,
) -> Result<String, String> {
    let servers = server_order(runs, &args.servers);
    let (ours, theirs) = args
        .ratios
        .first()
        .and_then(|r| r.split_once('/'))
        .map_or(("portico", "coturn"), |(a, b)| (a, b));
    let mut md = String::from("## TURN relay: Portico vs coturn\n\n");
    md += "From the runs of the command below; rerun it to refresh this section.\n\n";
    let _ = writeln!(
        md,
        "### Setup\n\n| | |\n|---|---|\n| command | `{}` |",
        args.command
    );
    for f in &args.facts {
        let (k, v) = f.split_once('=').unwrap_or((f.as_str(), ""));
        let _ = writeln!(md, "| {k} | {v} |");
    }
    md.push('\n');
    md += &goals(runs, ours, theirs);

    let ramp = ramp_points(runs);
    if !ramp.is_empty() {
        md += "### (a) Ramp: offered load rising until loss > 0.1%\n\n";
        md += "Saturation point (highest loss-free step) per round, and its median:\n\n\
                | server | per round | median streams | median offered pkt/s |\n|---|---|---|---|\n";
        for s in &servers {
            let sat = saturation(runs, s);
            if sat.is_empty() {
                continue;
            }
            let cells: Vec<String> = sat
                .iter()
                .map(|(r, n, saturated)| format!("{r}: {}{n}", if *saturated { "" } else { "≥ " }))
                .collect();
            let vals: Vec<f64> = sat.iter().map(|x| x.1 as f64).collect();
            let m = Spread::of(&vals).map_or(0.0, |x| x.median);
            let never_saturated = sat.iter().all(|x| !x.2);
            let _ = writeln!(
                md,
                "| {s} | {} | {}{} | {} |",
                cells.join(", "),
                if never_saturated { "≥ " } else { "" },
                int(m),
                int(m * 100.0)
            );
        }
        md += "\n\"≥\": the ramp ended without loss, so the server was not saturated by the \
               highest step it ran (the steps ran out). The median carries \"≥\" only when no \
               round saturated.\n\n";
        md += &charts(runs, &servers, out_dir, charts_dir)?;
        md += "Median (min–max) over the rounds; a round stops a server's ramp after its \
               first lossy step, so higher steps can have fewer runs.\n\n";
        header(
            &mut md,
            &["server", "streams", "offered pkt/s", "runs"],
            DATA_METRICS,
        );
        for (streams, p) in &ramp {
            let Some(by_server) = runs.get(p) else {
                continue;
            };
            let offered = offered_both_ways(by_server, *streams);
            for s in &servers {
                if let Some(rs) = by_server.get(s) {
                    row(
                        &mut md,
                        &[
                            s.clone(),
                            int(*streams as f64),
                            int(offered),
                            rs.len().to_string(),
                        ],
                        rs,
                        DATA_METRICS,
                    );
                }
            }
        }
        md.push('\n');
    } else {
        md += &charts(runs, &servers, out_dir, charts_dir)?;
    }

    if let Some(by_server) = runs.get("flat") {
        let first = by_server.values().flatten().next();
        let clients = first.and_then(|v| num(v, &["clients"])).unwrap_or(0.0);
        let window = first.and_then(|v| num(v, &["window"])).unwrap_or(0.0);
        let _ = writeln!(
            md,
            "### Flat out: {} streams, {} packets in flight each\n\nHow far each server gets \
             on this box, and (against `turn-stub`) the generator's own ceiling.\n",
            int(clients),
            int(window)
        );
        header(&mut md, &["server", "runs"], DATA_METRICS);
        for s in &servers {
            if let Some(rs) = by_server.get(s) {
                row(
                    &mut md,
                    &[s.clone(), rs.len().to_string()],
                    rs,
                    DATA_METRICS,
                );
            }
        }
        md.push('\n');
        if let Some(rs) = args.reference.as_ref().and_then(|r| by_server.get(r)) {
            let relayed = spread(rs, RELAYED.get).map_or(0.0, |x| x.median);
            let gen = spread(rs, GEN_US.get).map_or(0.0, |x| x.median);
            let _ = writeln!(
                md,
                "Generator ceiling: against `{}` (a relay that does nothing but forward, with \
                 batched syscalls) the generator and its peer moved {} relayed packets/s, \
                 spending {} µs of their own CPU per relayed packet; with the relay's own CPU \
                 that is what two cores give. A server relaying near that rate is limited by \
                 the box, not by itself: compare CPU per packet, not packets/s.\n",
                args.reference.as_deref().unwrap_or("?"),
                int(relayed),
                two(gen)
            );
        }
    }

    if let Some(by_server) = runs.get("sustained") {
        let first = by_server.values().flatten().next();
        let clients = first.and_then(|v| num(v, &["clients"])).unwrap_or(0.0);
        let secs = first.and_then(|v| num(v, &["duration_s"])).unwrap_or(0.0);
        let _ = writeln!(
            md,
            "### (b) {} simultaneous streams at 50 packets/s for {} s\n\nEach run on a \
             freshly started server. Median (min–max) over the rounds.\n",
            int(clients),
            int(secs)
        );
        header(&mut md, &["server", "runs"], DATA_METRICS);
        for s in &servers {
            if let Some(rs) = by_server.get(s) {
                row(
                    &mut md,
                    &[s.clone(), rs.len().to_string()],
                    rs,
                    DATA_METRICS,
                );
            }
        }
        md.push('\n');
        header(&mut md, &["server", "runs"], SUSTAINED_EXTRA);
        for s in &servers {
            if let Some(rs) = by_server.get(s) {
                row(
                    &mut md,
                    &[s.clone(), rs.len().to_string()],
                    rs,
                    SUSTAINED_EXTRA,
                );
            }
        }
        md.push('\n');
    }

    if let Some(by_server) = runs.get("churn") {
        let first = by_server.values().flatten().next();
        let clients = first.and_then(|v| num(v, &["clients"])).unwrap_or(0.0);
        let secs = first.and_then(|v| num(v, &["duration_s"])).unwrap_or(0.0);
        let _ = writeln!(
            md,
            "### (c) Allocation churn: {} clients allocate, refresh and delete as fast as \
             answered for {} s\n\nEvery cycle is a new client (fresh source address): \
             Allocate, 401, Allocate with credentials, Refresh, Refresh(0). Each run on a \
             freshly started server.\n",
            int(clients),
            int(secs)
        );
        header(&mut md, &["server", "runs"], CHURN_METRICS);
        for s in &servers {
            if let Some(rs) = by_server.get(s) {
                row(
                    &mut md,
                    &[s.clone(), rs.len().to_string()],
                    rs,
                    CHURN_METRICS,
                );
            }
        }
        md.push('\n');
    }

    if let Some(by_server) = runs.get("uclient") {
        let cmd = by_server
            .values()
            .flatten()
            .find_map(|v| v.get("command").and_then(Value::as_str))
            .unwrap_or("?");
        let _ = writeln!(
            md,
            "### (d) coturn's own client: `turnutils_uclient` with `turnutils_peer`\n\n\
             The same fixed load against both servers, so the comparison does not rest on our \
             generator alone. Command (server port varies): `{cmd}`\n"
        );
        header(&mut md, &["server", "runs"], UCLIENT_METRICS);
        for s in &servers {
            if let Some(rs) = by_server.get(s) {
                row(
                    &mut md,
                    &[s.clone(), rs.len().to_string()],
                    rs,
                    UCLIENT_METRICS,
                );
            }
        }
        md.push('\n');
    }

    // Ratios of medians at every point.
    let mut points: Vec<String> = ramp.iter().map(|x| x.1.clone()).collect();
    points.extend(
        ["flat", "sustained", "churn", "uclient"]
            .iter()
            .filter(|p| runs.contains_key(**p))
            .map(|p| p.to_string()),
    );
    let ratio_metrics: [(&str, Getter); 6] = [
        ("relayed pkt/s", RELAYED.get),
        ("server CPU-s / M pkt", |v| {
            num(v, &["server_usage", "cpu_s_per_million_relayed"])
        }),
        ("p99 µs (worse direction)", |v| worst(v, "p99")),
        ("p99.9 µs (worse direction)", |v| worst(v, "p999")),
        ("allocations/s", |v| {
            num(v, &["churn", "allocations_per_s"])
                .or_else(|| num(v, &["setup", "allocations_per_s"]))
        }),
        ("server CPU µs / churn cycle", |v| {
            num(v, &["server_usage", "cpu_us_per_cycle"])
        }),
    ];
    let _ = writeln!(
        md,
        "### Ratios {ours} / {theirs} (medians)\n\nBelow 1 is better for CPU and latency; above \
         1 for packets/s and allocations/s.\n"
    );
    md += "| load point |";
    for (t, _) in &ratio_metrics {
        let _ = write!(md, " {t} |");
    }
    md += "\n|---|";
    for _ in &ratio_metrics {
        md += "---|";
    }
    md.push('\n');
    for p in &points {
        let (Some(a), Some(b)) = (
            runs.get(p).and_then(|m| m.get(ours)),
            runs.get(p).and_then(|m| m.get(theirs)),
        ) else {
            continue;
        };
        let _ = write!(md, "| {p} |");
        for (_, f) in &ratio_metrics {
            let cell = match (spread(a, *f), spread(b, *f)) {
                (Some(x), Some(y)) if y.median > 0.0 => format!("{:.2}", x.median / y.median),
                _ => "–".into(),
            };
            let _ = write!(md, " {cell} |");
        }
        md.push('\n');
    }
    md.push('\n');

    // Noise.
    let others: Vec<f64> = runs
        .values()
        .flat_map(|m| m.values().flatten())
        .filter_map(OTHERS.get)
        .collect();
    md += "### Noise\n\n";
    if let Some(o) = Spread::of(&others) {
        let _ = writeln!(
            md,
            "Other processes (not the generator, its peer or the measured server) kept {} \
             cores busy during a run (median; min {}, max {}) out of {}: this box is shared \
             with other engineers' builds and tests. Servers alternate within every round so \
             drift hits both alike; distrust differences inside the min–max spreads.\n",
            two(o.median),
            two(o.min),
            two(o.max),
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
    }
    md += &anomalies(runs, &servers);
    let profile = out_dir.join("profile");
    if let Ok(entries) = std::fs::read_dir(&profile) {
        let mut files: Vec<String> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("turn") && n.ends_with(".md"))
            .collect();
        files.sort();
        if !files.is_empty() {
            md += "### Profile\n\nWhere Portico's relay spends its CPU per packet:\n\n";
            for f in files {
                let _ = writeln!(md, "- [profile/{f}](profile/{f})");
            }
            md.push('\n');
        }
    }
    md += NOTES;
    Ok(md)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench_report::{self, Kind};
    use serde_json::json;

    fn turn(clients: u64, relayed: f64, loss: f64, cpu: f64, p99: f64) -> Value {
        json!({
            "scenario": "turn", "clients": clients, "rate_per_stream": 50.0,
            "duration_s": 60.0, "window_s": 61.0, "window": null,
            "setup": {"allocations_per_s": 5000.0, "failed": 0, "failures": {}},
            "data": {
                "relayed_pps": relayed, "round_trip_loss_ratio": loss,
                "up": {"latency_us": {"p50": 50.0, "p99": p99, "p999": p99 * 2.0}, "reordered": 0, "duplicates": 0},
                "down": {"latency_us": {"p50": 60.0, "p99": p99 / 2.0, "p999": p99}, "reordered": 1, "duplicates": 0},
                "generator_behind": 0, "send_errors": 0, "bad": 0, "misrouted": 0
            },
            "server_usage": {"cpu_s_per_million_relayed": cpu, "peak_rss_kib": 40960.0,
                "rss_per_1000_allocations_kib": if cpu < 5.0 { 1024.0 } else { 20480.0 },
                "rss_per_1000_allocations_loaded_kib": 2048.0},
            "generator_cpu_us_per_packet": 6.0, "others_cpu_s": 6.1, "delete_failed": 0
        })
    }

    #[test]
    fn renders_goals_saturation_tables_and_charts() {
        let dir = std::env::temp_dir().join(format!("portico-turn-report-{}", std::process::id()));
        let runs_dir = dir.join("runs");
        std::fs::create_dir_all(&runs_dir).unwrap();
        let put = |name: &str, v: Value| {
            std::fs::write(runs_dir.join(format!("{name}.json")), v.to_string()).unwrap()
        };
        for r in 1..=3 {
            put(
                &format!("portico__ramp100__r{r}"),
                turn(100, 10_000.0, 0.0, 4.0, 300.0),
            );
            put(
                &format!("portico__ramp1000__r{r}"),
                turn(1000, 100_000.0, 0.0, 4.0, 900.0),
            );
            put(
                &format!("coturn__ramp100__r{r}"),
                turn(100, 10_000.0, 0.0, 9.0, 500.0),
            );
            // coturn saturates at 1000 streams in two rounds of three.
            let loss = if r < 3 { 0.05 } else { 0.0 };
            put(
                &format!("coturn__ramp1000__r{r}"),
                turn(1000, 95_000.0, loss, 9.0, 8000.0),
            );
            put(
                &format!("portico__sustained__r{r}"),
                turn(1000, 100_000.0, 0.0, 4.0, 800.0),
            );
            put(
                &format!("coturn__sustained__r{r}"),
                turn(1000, 100_000.0, 0.0, 9.0, 700.0),
            );
        }
        let mut churn = json!({"clients": 32, "duration_s": 10.0, "window_s": 11.0, "others_cpu_s": 1.0,
            "churn": {"allocations_per_s": 9000.0, "failed": 2, "cycle_us": {"p50": 900.0, "p99": 3000.0}},
            "server_usage": {"cpu_us_per_cycle": 40.0, "peak_rss_kib": 30000}});
        put("portico__churn__r1", churn.clone());
        churn["churn"]["allocations_per_s"] = json!(3000.0);
        churn["churn"]["failed"] = json!(0);
        put("coturn__churn__r1", churn);
        let out = dir.join("RESULTS.md");
        let args = BenchReportArgs {
            kind: Kind::Turn,
            dir: Some(runs_dir),
            markdown: None,
            out: out.clone(),
            charts: None,
            command: "scripts/bench.sh turn".into(),
            facts: vec!["kernel=6.18".into()],
            servers: vec!["portico".into(), "coturn".into()],
            ratios: vec!["portico/coturn".into()],
            reference: None,
        };
        bench_report::run(&args).unwrap();
        let md = std::fs::read_to_string(&out).unwrap();
        assert!(md.contains("<!-- section:turn -->"));
        assert!(md.contains("| kernel | 6.18 |"));
        assert!(
            md.contains("| relayed packets per CPU-second ≥ 2× coturn's (1000 streams × 50 pkt/s) | 4.00 CPU-s / M pkt | 9.00 CPU-s / M pkt | 2.25× | **yes** |"),
            "{md}"
        );
        assert!(
            md.contains("lossy at: none | lossy at: 1000 streams (5.000%) | – | **yes** |"),
            "{md}"
        );
        assert!(
            md.contains("higher at: sustained 1000 streams (800.0 vs 700.0 µs) | – | worst 1.14× | **no** |"),
            "{md}"
        );
        assert!(
            md.contains("(after setup) | 1.00 MiB | 20.00 MiB | 0.050 | **yes** |"),
            "{md}"
        );
        assert!(
            md.contains("| portico | r1: ≥ 1000, r2: ≥ 1000, r3: ≥ 1000 | ≥ 1,000 | 100,000 |"),
            "{md}"
        );
        assert!(
            md.contains("| coturn | r1: 100, r2: 100, r3: ≥ 1000 | 100 | 10,000 |"),
            "{md}"
        );
        assert!(
            md.contains("| portico | 1,000 | 100,000 | 3 | 100,000 | 0.000% | 50.0 | 900.0 |"),
            "{md}"
        );
        assert!(
            md.contains("| churn | – | – | – | – | 3.00 | 1.00 |"),
            "{md}"
        );
        assert!(
            md.contains("- `portico__churn__r1` (churn): 2 failed churn cycles"),
            "{md}"
        );
        for chart in [
            "turn-ramp-throughput",
            "turn-ramp-latency",
            "turn-ramp-cpu",
            "turn-sustained-latency",
        ] {
            assert!(
                md.contains(&format!("](charts/{chart}.svg)")),
                "{chart} linked"
            );
            let svg =
                std::fs::read_to_string(dir.join("charts").join(format!("{chart}.svg"))).unwrap();
            assert!(svg.contains("portico") && svg.contains("coturn"), "{chart}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
