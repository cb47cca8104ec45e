//! `portico-perf bench-report`: turns the JSON reports of a benchmark run (one file per
//! server, load point and round) into one section of `perf/RESULTS.md` (see
//! [`crate::results_doc`]): STUN here, TURN in [`crate::turn_report`], and the reverse-proxy
//! table `scripts/bench-proxy.sh` writes, merged as it is; registrations through the proxy in
//! [`crate::register_report`].
//!
//! Medians with min–max spreads rather than means: on a shared 2-core box a single run can
//! be disturbed by someone else's build, and the spread shows how much that happened.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::report::thousands;

/// Which section of RESULTS.md to (re)write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    Stun,
    Turn,
    /// The Markdown of `scripts/bench-proxy.sh` (`--markdown`), merged as it is.
    Proxy,
    /// Brute-force reaction: the lines "<what>, threshold N: M wrong passwords answered
    /// before the cut" that the fraud tests print (`--markdown` names the captured output).
    Fraud,
    /// H.323 and SIP registrations through the reverse proxy (`portico-perf register`
    /// reports in `--dir`), see [`crate::register_report`].
    Register,
    /// Allocations held at scale: `portico-perf turn-scale` JSON reports in `--dir` (one
    /// per server), and `--markdown` notes appended (the limits met), see
    /// [`crate::turn_scale::section`].
    Scale,
    /// TURN over TCP and TLS vs coturn (`portico-perf turn --transport tcp|tls` reports in
    /// `--dir`), see [`crate::turn_tcp_report`].
    TurnTcp,
}

impl Kind {
    fn section(self) -> &'static str {
        match self {
            Kind::Stun => "stun",
            Kind::Turn => "turn",
            Kind::Proxy => "proxy",
            Kind::Fraud => "fraud",
            Kind::Register => "register",
            Kind::Scale => "scale",
            Kind::TurnTcp => "turn-tcp",
        }
    }
}

#[derive(clap::Args, Debug, Clone)]
pub struct BenchReportArgs {
    #[arg(long, value_enum, default_value = "stun")]
    pub kind: Kind,
    /// Directory of `<server>__<point>__<round>.json` reports (`portico-perf stun|turn|uclient
    /// --json`); not for `--kind proxy`.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// `--kind proxy`: the Markdown file bench-proxy.sh wrote.
    #[arg(long)]
    pub markdown: Option<PathBuf>,
    /// Markdown file whose section is replaced (created if missing).
    #[arg(long)]
    pub out: PathBuf,
    /// Where charts go (default: `charts/` beside `--out`); linked relative to `--out`.
    #[arg(long)]
    pub charts: Option<PathBuf>,
    /// The command that produced the runs, recorded verbatim.
    #[arg(long)]
    pub command: String,
    /// `key=value` lines for the setup table (repeatable).
    #[arg(long = "fact")]
    pub facts: Vec<String>,
    /// Server order in the tables (repeatable); others follow alphabetically.
    #[arg(long = "server")]
    pub servers: Vec<String>,
    /// `A/B`: ratios of server A's medians to server B's (repeatable).
    #[arg(long = "ratio")]
    pub ratios: Vec<String>,
    /// The trivial responder whose flat-out rate is the generator's ceiling.
    #[arg(long)]
    pub reference: Option<String>,
}

/// Median, min and max of a set of runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    pub fn of(values: &[f64]) -> Option<Spread> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Spread {
            median,
            min: v[0],
            max: v[n - 1],
        })
    }

    /// `median (min–max)`, or just the value when every run gave the same figure.
    pub fn show(&self, fmt: fn(f64) -> String) -> String {
        let (median, min, max) = (fmt(self.median), fmt(self.min), fmt(self.max));
        if min == max {
            median
        } else {
            format!("{median} ({min}–{max})")
        }
    }
}

pub(crate) fn int(x: f64) -> String {
    thousands(x.round().max(0.0) as u64)
}
pub(crate) fn one(x: f64) -> String {
    format!("{x:.1}")
}
pub(crate) fn two(x: f64) -> String {
    format!("{x:.2}")
}
pub(crate) fn pct(x: f64) -> String {
    format!("{:.3}%", x * 100.0)
}

/// One figure of a run report.
/// A column of a server × metric table: its title, how to read it from a run's JSON, how to
/// print it.
pub(crate) struct Metric {
    pub(crate) title: &'static str,
    pub(crate) get: fn(&Value) -> Option<f64>,
    pub(crate) fmt: fn(f64) -> String,
}

pub(crate) fn num(v: &Value, path: &[&str]) -> Option<f64> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_f64()
}

const METRICS: &[Metric] = &[
    Metric {
        title: "tx/s",
        get: |v| num(v, &["tx_per_s"]),
        fmt: int,
    },
    Metric {
        title: "lost",
        get: |v| num(v, &["loss_ratio"]),
        fmt: pct,
    },
    Metric {
        title: "bad",
        get: |v| num(v, &["bad"]),
        fmt: int,
    },
    Metric {
        title: "RTT p50 µs",
        get: |v| num(v, &["rtt_us", "p50"]),
        fmt: one,
    },
    Metric {
        title: "RTT p99 µs",
        get: |v| num(v, &["rtt_us", "p99"]),
        fmt: one,
    },
    Metric {
        title: "server CPU µs/tx",
        get: |v| num(v, &["server", "cpu_us_per_tx"]),
        fmt: two,
    },
    Metric {
        title: "peak RSS MiB",
        get: |v| num(v, &["server", "peak_rss_kib"]).map(|k| k / 1024.0),
        fmt: one,
    },
    Metric {
        title: "generator CPU µs/tx",
        get: |v| num(v, &["generator_cpu_us_per_tx"]),
        fmt: two,
    },
    Metric {
        title: "generator busy, cores",
        get: |v| Some(num(v, &["generator_cpu_s"])? / num(v, &["elapsed_s"])?),
        fmt: two,
    },
    Metric {
        title: "others' CPU, cores",
        get: |v| Some(num(v, &["others_cpu_s"])? / num(v, &["elapsed_s"])?),
        fmt: two,
    },
];

const TX_PER_S: usize = 0;
const P99: usize = 4;
const SERVER_US: usize = 5;
const GENERATOR_US: usize = 7;
const GENERATOR_CORES: usize = 8;
const OTHERS: usize = 9;

/// Metric indexes that ratios are given for.
const RATIO_METRICS: &[usize] = &[0, 3, 4, 5, 6];

/// Key under which each loaded report remembers its file name (server__point__round).
pub(crate) const RUN_KEY: &str = "_run";

/// Max RTT from which a run is listed as an anomaly: far beyond any scheduling hiccup a
/// healthy server shows on this box.
const STALL_US: f64 = 200_000.0;

/// Runs grouped as point -> server -> reports.
pub(crate) type Runs = BTreeMap<String, BTreeMap<String, Vec<Value>>>;

pub(crate) fn load(dir: &Path) -> Result<Runs, String> {
    let mut runs = Runs::new();
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for e in entries {
        let path = e.map_err(|e| e.to_string())?.path();
        if path.extension().and_then(|x| x.to_str()) != Some("json") {
            continue;
        }
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default()
            .to_string();
        let parts: Vec<&str> = stem.split("__").collect();
        let [server, point, _round] = parts[..] else {
            return Err(format!(
                "{}: name is not <server>__<point>__<round>.json",
                path.display()
            ));
        };
        let text =
            std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut v: Value =
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        if let Some(o) = v.as_object_mut() {
            o.insert(RUN_KEY.into(), Value::String(stem.clone()));
        }
        runs.entry(point.to_string())
            .or_default()
            .entry(server.to_string())
            .or_default()
            .push(v);
    }
    if runs.is_empty() {
        return Err(format!("{}: no reports", dir.display()));
    }
    Ok(runs)
}

/// Fixed-rate points first (by rate), flat-out last.
fn point_order(runs: &Runs) -> Vec<String> {
    let mut points: Vec<(f64, String)> = runs
        .iter()
        .map(|(p, by_server)| {
            let rate = by_server
                .values()
                .flatten()
                .find_map(|v| num(v, &["offered_rate"]))
                .unwrap_or(f64::INFINITY);
            (rate, p.clone())
        })
        .collect();
    points.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    points.into_iter().map(|(_, p)| p).collect()
}

pub(crate) fn server_order(runs: &Runs, preferred: &[String]) -> Vec<String> {
    let mut all: Vec<String> = runs
        .values()
        .flat_map(|m| m.keys().cloned())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut out: Vec<String> = preferred
        .iter()
        .filter(|s| all.contains(s))
        .cloned()
        .collect();
    all.retain(|s| !out.contains(s));
    out.extend(all);
    out
}

pub(crate) fn spread(runs: &[Value], m: &Metric) -> Option<Spread> {
    let v: Vec<f64> = runs.iter().filter_map(|r| (m.get)(r)).collect();
    Spread::of(&v)
}

/// One load point's table: a row per server (in `servers` order) with its run count and the
/// median (min–max) of each of `metrics`, then a blank line.
pub(crate) fn server_table(
    md: &mut String,
    servers: &[String],
    by_server: &BTreeMap<String, Vec<Value>>,
    metrics: &[Metric],
) {
    let _ = write!(md, "| server | runs |");
    for m in metrics {
        let _ = write!(md, " {} |", m.title);
    }
    let _ = write!(md, "\n|---|---|");
    for _ in metrics {
        md.push_str("---|");
    }
    md.push('\n');
    for s in servers {
        let Some(rs) = by_server.get(s) else { continue };
        let _ = write!(md, "| {s} | {} |", rs.len());
        for m in metrics {
            let cell = spread(rs, m).map_or("–".to_string(), |sp| sp.show(m.fmt));
            let _ = write!(md, " {cell} |");
        }
        md.push('\n');
    }
    md.push('\n');
}

fn point_title(by_server: &BTreeMap<String, Vec<Value>>) -> String {
    let Some(first) = by_server.values().flatten().next() else {
        return String::new();
    };
    let sockets = num(first, &["sockets"]).unwrap_or(0.0);
    let duration = num(first, &["elapsed_s"]).unwrap_or(0.0);
    match num(first, &["offered_rate"]) {
        Some(rate) => format!(
            "Fixed offered rate: {} Binding requests/s ({} sockets, ~{:.0} s per run)",
            int(rate),
            sockets,
            duration
        ),
        None => format!(
            "Flat out: {} requests outstanding per socket × {} sockets (~{:.0} s per run)",
            num(first, &["window"]).unwrap_or(0.0),
            sockets,
            duration
        ),
    }
}

/// Builds the Markdown document.
pub fn render(args: &BenchReportArgs, runs: &Runs) -> String {
    let points = point_order(runs);
    let servers = server_order(runs, &args.servers);
    let mut md = String::new();
    let _ = writeln!(
        md,
        "## STUN Binding: Portico (io_uring, epoll) vs coturn\n\nFrom the runs of the command \
         below; rerun it to refresh this section.\n"
    );
    let _ = writeln!(md, "### Setup\n\n| | |\n|---|---|");
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
    let _ = writeln!(md, "| rounds per server and load point | {rounds} |\n");

    for p in &points {
        let Some(by_server) = runs.get(p) else {
            continue;
        };
        let _ = writeln!(md, "### {}\n", point_title(by_server));
        let _ = writeln!(md, "Median (min–max) over the rounds.\n");
        server_table(&mut md, &servers, by_server, METRICS);
    }

    if !args.ratios.is_empty() {
        let _ = writeln!(
            md,
            "### Ratios of medians\n\nBelow 1 is better for CPU, RTT and RSS; above 1 is \
             better for tx/s.\n"
        );
        let _ = write!(md, "| ratio | load point |");
        for &i in RATIO_METRICS {
            let _ = write!(md, " {} |", METRICS[i].title);
        }
        let _ = write!(md, "\n|---|---|");
        for _ in RATIO_METRICS {
            let _ = write!(md, "---|");
        }
        md.push('\n');
        for r in &args.ratios {
            let Some((a, b)) = r.split_once('/') else {
                continue;
            };
            for p in &points {
                let (Some(ra), Some(rb)) = (
                    runs.get(p).and_then(|m| m.get(a)),
                    runs.get(p).and_then(|m| m.get(b)),
                ) else {
                    continue;
                };
                let _ = write!(md, "| {a} / {b} | {p} |");
                for &i in RATIO_METRICS {
                    let m = &METRICS[i];
                    let cell = match (spread(ra, m), spread(rb, m)) {
                        (Some(x), Some(y)) if y.median > 0.0 => {
                            format!("{:.2}", x.median / y.median)
                        }
                        _ => "–".into(),
                    };
                    let _ = write!(md, " {cell} |");
                }
                md.push('\n');
            }
        }
        md.push('\n');
    }

    md += &ceiling_and_noise(args, runs, &points, &servers);
    md
}

/// The generated paragraph on the generator's ceiling and on how busy the box was.
fn ceiling_and_noise(
    args: &BenchReportArgs,
    runs: &Runs,
    points: &[String],
    servers: &[String],
) -> String {
    let mut md = String::from("### Generator ceiling and noise\n\n");
    let flat = points.iter().find(|p| {
        runs.get(*p)
            .and_then(|m| m.values().flatten().next())
            .is_some_and(|v| v.get("offered_rate").is_some_and(Value::is_null))
    });
    if let (Some(reference), Some(flat)) = (&args.reference, flat) {
        let at = |s: &str, i: usize| {
            runs.get(flat)
                .and_then(|m| m.get(s))
                .and_then(|r| spread(r, &METRICS[i]))
        };
        if let (Some(tps), Some(us), Some(cores)) = (
            at(reference, TX_PER_S),
            at(reference, GENERATOR_US),
            at(reference, GENERATOR_CORES),
        ) {
            let busy: Vec<f64> = runs
                .get(flat)
                .into_iter()
                .flat_map(|m| m.values().flatten())
                .filter_map(|v| Some(num(v, &["machine_busy_cpu_s"])? / num(v, &["elapsed_s"])?))
                .collect();
            let _ = writeln!(
                md,
                "- Against `{reference}` (a trivial responder with as many threads as the \
                 servers have workers), flat out, the generator completed {} tx/s (median), \
                 itself busy {} cores at {} µs of its own CPU per transaction. It is one \
                 thread, so it could not exceed ~{} tx/s even with a core to itself.",
                int(tps.median),
                two(cores.median),
                two(us.median),
                int(1e6 / us.median.max(0.01)),
            );
            if let Some(b) = Spread::of(&busy) {
                let _ = writeln!(
                    md,
                    "- In the flat-out runs the whole machine was busy {} of {} cores (median; \
                     min {}): flat-out rates show how the shared cores were split between \
                     generator, server and other people's work more than any server's own \
                     limit. A server's flat-out rate relative to `{reference}`'s:",
                    two(b.median),
                    std::thread::available_parallelism().map_or(0, |n| n.get()),
                    two(b.min),
                );
            }
            for s in servers.iter().filter(|s| *s != reference) {
                if let Some(x) = at(s, TX_PER_S) {
                    let _ = writeln!(
                        md,
                        "  - `{s}`: {:.0}%",
                        100.0 * x.median / tps.median.max(1.0)
                    );
                }
            }
        }
    }
    let others: Vec<f64> = runs
        .values()
        .flat_map(|m| m.values().flatten())
        .filter_map(|v| (METRICS[OTHERS].get)(v))
        .collect();
    if let Some(o) = Spread::of(&others) {
        let _ = writeln!(
            md,
            "- Other processes (not the generator, not the measured server) kept {} cores \
             busy on average during a run (median; min {}, max {}) out of {} — this box is \
             shared with other engineers' builds and tests, so every figure here carries that \
             noise. Runs are interleaved (server A, B, C, … then again) so drift hits all \
             servers alike; compare medians, and distrust differences inside the min–max \
             spreads.",
            two(o.median),
            two(o.min),
            two(o.max),
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
    }
    md.push('\n');
    md += &anomalies(runs, points, servers);
    md += &least_disturbed(runs, points, servers);
    md += NOTES;
    md
}

/// Runs that lost requests, got bad or late answers, fell behind the schedule, or saw a
/// round trip beyond [`STALL_US`]: the medians hide these, so they are listed one by one.
fn anomalies(runs: &Runs, points: &[String], servers: &[String]) -> String {
    let mut lines = Vec::new();
    for p in points {
        for s in servers {
            for v in runs.get(p).and_then(|m| m.get(s)).into_iter().flatten() {
                let get = |k: &str| num(v, &[k]).unwrap_or(0.0);
                let max_ms = num(v, &["rtt_us", "max"]).unwrap_or(0.0) / 1000.0;
                let mut what = Vec::new();
                if get("lost") > 0.0 {
                    what.push(format!(
                        "{} lost ({} of them answered after the timeout)",
                        int(get("lost")),
                        int(get("unmatched"))
                    ));
                } else if get("unmatched") > 0.0 {
                    what.push(format!(
                        "{} late or duplicate answers",
                        int(get("unmatched"))
                    ));
                }
                if get("bad") > 0.0 {
                    what.push(format!("{} bad answers", int(get("bad"))));
                }
                if get("generator_behind") > 0.0 {
                    what.push(format!(
                        "generator fell behind by {} requests",
                        int(get("generator_behind"))
                    ));
                }
                if max_ms * 1000.0 >= STALL_US {
                    what.push(format!("max RTT {max_ms:.0} ms"));
                }
                if what.is_empty() {
                    continue;
                }
                let run = v.get(RUN_KEY).and_then(Value::as_str).unwrap_or("?");
                let others = (METRICS[OTHERS].get)(v).map_or("?".into(), two);
                lines.push(format!(
                    "- `{run}`: {} (others' CPU {others} cores)\n",
                    what.join("; ")
                ));
            }
        }
    }
    let mut md = String::from("#### Anomalies\n\n");
    if lines.is_empty() {
        md += "None: no run lost a request, got a bad or late answer, fell behind its \
               schedule, or saw a round trip of 200 ms or more.\n";
    } else {
        md += "Runs that lost requests, got bad or late answers, fell behind the schedule, or \
               saw a round trip of 200 ms or more (stalls far beyond a scheduling hiccup):\n\n";
        for l in lines {
            md += &l;
        }
    }
    md.push('\n');
    md
}

/// For each server and load point, the run with the least CPU taken by other processes:
/// the closest this shared box came to a quiet measurement.
fn least_disturbed(runs: &Runs, points: &[String], servers: &[String]) -> String {
    const SHOWN: [usize; 4] = [OTHERS, SERVER_US, TX_PER_S, P99];
    let mut md = String::from(
        "#### Least-disturbed run of each server\n\nThe run with the least CPU taken by \
         other processes, per server and load point. Quiet is not always cheaper per \
         transaction: on an idle box a server sleeps and wakes for nearly every datagram \
         (in a virtual machine each wakeup from idle is costly), while on a busy one \
         datagrams queue up and are handled in batches.\n\n| server | load point |",
    );
    for i in SHOWN {
        let _ = write!(md, " {} |", METRICS[i].title);
    }
    md += "\n|---|---|";
    for _ in SHOWN {
        md += "---|";
    }
    md.push('\n');
    for p in points {
        for s in servers {
            let Some(rs) = runs.get(p).and_then(|m| m.get(s)) else {
                continue;
            };
            let quiet = rs
                .iter()
                .filter_map(|v| Some(((METRICS[OTHERS].get)(v)?, v)))
                .min_by(|a, b| a.0.total_cmp(&b.0));
            let Some((_, v)) = quiet else { continue };
            let _ = write!(md, "| {s} | {p} |");
            for i in SHOWN {
                let m = &METRICS[i];
                let cell = (m.get)(v).map_or("–".to_string(), m.fmt);
                let _ = write!(md, " {cell} |");
            }
            md.push('\n');
        }
    }
    md.push('\n');
    md
}

const NOTES: &str = "### What the numbers mean\n\n\
- **server CPU µs/tx at the fixed rate is the headline comparison.** It is utime+stime of the \
server's processes (from `/proc/<pid>/stat`, 10 ms ticks) over the load window divided by the \
transactions completed, at the same offered load for every server, so it does not depend on \
who wins the race for the two cores. It includes the kernel's UDP receive and send work done \
in the server's context (most of the cost on loopback: ~3–4 µs per packet per side, per \
FACTS.md). Flat out, the echo server's figure is about the floor for a userspace UDP server \
(batched syscalls, nothing else). At a moderate fixed rate every server, the echo server \
included, wakes for one or a few datagrams at a time, so the figure is dominated by the cost \
of those wakeups (high in a virtual machine) and differences between servers shrink; flat out, batches \
amortise it.\n\
- **tx/s flat out** is bounded by the generator and by the two cores it shares with the \
server; it ranks servers only when they are well below the generator's ceiling.\n\
- **RTT** is measured by the generator from just before `sendmmsg` to just after `recvmmsg`, \
so it includes both kernels' loopback paths and the time requests wait in socket buffers; \
flat-out RTT is mostly queueing (window × sockets requests in flight). Percentiles come from a \
log-linear histogram (≤ 3.2% bucket error, upper bucket edge reported).\n\
- **lost** counts requests unanswered after 1 s; **bad** counts responses that did not parse \
or lacked an XOR-MAPPED-ADDRESS equal to the client's address.\n\
- **peak RSS** is VmHWM of the server processes (for Portico: controlplane + dataplane, each \
started fresh for every run).\n\
- **generator CPU µs/tx** and **others' CPU** show how the cores were shared: a jump in \
others' CPU marks a run disturbed by someone else's work.\n";

/// Builds the section `args.kind` asks for and splices it into `args.out`.
pub fn run(args: &BenchReportArgs) -> Result<(), String> {
    let dir = || {
        args.dir
            .as_deref()
            .ok_or("--dir is required for this --kind")
    };
    let section = match args.kind {
        Kind::Stun => render(args, &load(dir()?)?),
        Kind::Turn => {
            let out_dir = args
                .out
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            let charts = args
                .charts
                .clone()
                .unwrap_or_else(|| out_dir.join("charts"));
            crate::turn_report::render(args, &load(dir()?)?, out_dir, &charts)?
        }
        Kind::Proxy => {
            let path = args
                .markdown
                .as_ref()
                .ok_or("--markdown is required for --kind proxy")?;
            let text =
                std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
            proxy_section(args, &text)
        }
        Kind::Fraud => {
            let path = args
                .markdown
                .as_ref()
                .ok_or("--markdown is required for --kind fraud")?;
            let text =
                std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
            fraud_section(args, &text)?
        }
        Kind::Register => crate::register_report::render(args, &load(dir()?)?),
        Kind::Scale => {
            let notes = match &args.markdown {
                Some(p) => {
                    std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?
                }
                None => String::new(),
            };
            crate::turn_scale::section(args, dir()?, &notes)?
        }
        Kind::TurnTcp => crate::turn_tcp_report::render(args, &load(dir()?)?),
    };
    let existing = match std::fs::read_to_string(&args.out) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(format!("{}: {e}", args.out.display())),
    };
    let doc = crate::results_doc::splice(&existing, args.kind.section(), &section);
    std::fs::write(&args.out, doc).map_err(|e| format!("{}: {e}", args.out.display()))
}

/// The reverse-proxy section: bench-proxy.sh's own tables under our heading, with the
/// command and facts that produced them.
fn proxy_section(args: &BenchReportArgs, text: &str) -> String {
    let mut md = String::from("## Reverse proxy: Portico vs HAProxy\n\n");
    let _ = writeln!(md, "| | |\n|---|---|\n| command | `{}` |", args.command);
    for f in &args.facts {
        let (k, v) = f.split_once('=').unwrap_or((f.as_str(), ""));
        let _ = writeln!(md, "| {k} | {v} |");
    }
    md.push('\n');
    // bench-proxy.sh's title becomes a sub-heading of this section.
    for line in text.lines() {
        match line.strip_prefix("## ") {
            Some(t) => {
                let _ = writeln!(md, "### {t}");
            }
            None => {
                let _ = writeln!(md, "{line}");
            }
        }
    }
    md
}

/// One brute force as the fraud tests print it.
#[derive(Debug, Clone, PartialEq)]
struct Reaction {
    what: String,
    threshold: u32,
    answered: u32,
}

/// Parses "<what>, threshold N: M wrong passwords answered before the cut[ (...)]".
fn parse_reaction(line: &str) -> Option<Reaction> {
    // `cargo test -q` prints a dot per finished test on the line the next output joins.
    let line = line.trim_start_matches(['.', ' ']);
    let (head, rest) = line.split_once(": ")?;
    let (what, threshold) = head.rsplit_once(", threshold ")?;
    let (answered, _) = rest.split_once(" wrong passwords answered before the cut")?;
    Some(Reaction {
        what: what.trim().to_string(),
        threshold: threshold.trim().parse().ok()?,
        answered: answered.trim().parse().ok()?,
    })
}

/// The fraud-reaction section: per brute force and threshold, the attempts answered before
/// the source was cut (best, median and worst over the rounds).
fn fraud_section(args: &BenchReportArgs, text: &str) -> Result<String, String> {
    let mut runs: BTreeMap<(String, u32), Vec<f64>> = BTreeMap::new();
    for r in text.lines().filter_map(parse_reaction) {
        runs.entry((r.what, r.threshold))
            .or_default()
            .push(f64::from(r.answered));
    }
    if runs.is_empty() {
        return Err("no brute-force results in the captured test output".into());
    }
    let mut md = String::from(
        "## Fraud detection reaction: attempts answered before the cut

",
    );
    let _ = writeln!(md, "| | |\n|---|---|\n| command | `{}` |", args.command);
    for f in &args.facts {
        let (k, v) = f.split_once('=').unwrap_or((f.as_str(), ""));
        let _ = writeln!(md, "| {k} | {v} |");
    }
    md.push_str(
        "\nA brute force with wrong passwords at the speed the loopback allows (each guess sent \
         as soon as the previous one was answered), against default settings but for the \
         threshold (`fraud.suspicious_per_minute`). The guess that takes a source over the \
         threshold is the (threshold + 1)-th; every answered guess past it is one the engine \
         was too late to stop. For comparison: when the engine polled the dataplane's event \
         rings every 25 ms (before the futex doorbell), a TURN brute force at a threshold of 5 \
         was answered 53-64 times.\n\n",
    );
    md.push_str("| brute force | threshold | answered (median) | min | max | rounds |\n");
    md.push_str("|---|---:|---:|---:|---:|---:|\n");
    for ((what, threshold), v) in &runs {
        if let Some(s) = Spread::of(v) {
            let _ = writeln!(
                md,
                "| {what} | {threshold} | {} | {} | {} | {} |",
                s.median,
                s.min,
                s.max,
                v.len()
            );
        }
    }
    Ok(md)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reaction_lines_parse() {
        assert_eq!(
            parse_reaction(
                "SIP brute force over one connection, threshold 5: 6 wrong passwords answered \
                 before the cut"
            ),
            Some(Reaction {
                what: "SIP brute force over one connection".into(),
                threshold: 5,
                answered: 6
            })
        );
        assert_eq!(
            parse_reaction(
                "TURN brute force over UDP, threshold 20: 21 wrong passwords answered before \
                 the cut (12ms including the last 200 ms wait)"
            )
            .map(|r| r.answered),
            Some(21)
        );
        assert_eq!(parse_reaction("test foo ... ok"), None);
        assert_eq!(
            parse_reaction(
                "..HTTP Basic brute force, threshold 5: 6 wrong passwords answered before the cut"
            )
            .map(|r| r.what),
            Some("HTTP Basic brute force".to_string())
        );
    }

    #[test]
    fn spread_of_odd_and_even_counts() {
        assert_eq!(
            Spread::of(&[3.0, 1.0, 2.0]),
            Some(Spread {
                median: 2.0,
                min: 1.0,
                max: 3.0
            })
        );
        assert_eq!(Spread::of(&[4.0, 1.0, 2.0, 3.0]).unwrap().median, 2.5);
        assert_eq!(Spread::of(&[]), None);
        assert_eq!(Spread::of(&[f64::NAN]), None);
        assert_eq!(Spread::of(&[7.0, 7.0]).unwrap().show(int), "7");
        assert_eq!(
            Spread::of(&[1000.0, 3000.0, 2000.0]).unwrap().show(int),
            "2,000 (1,000–3,000)"
        );
    }

    fn report(tps: f64, cpu: f64, rate: Option<u64>) -> Value {
        json!({
            "sockets": 16, "window": 64, "offered_rate": rate, "elapsed_s": 8.0,
            "tx_per_s": tps, "loss_ratio": 0.0, "bad": 0,
            "rtt_us": {"p50": 30.0, "p99": 90.0},
            "server": {"cpu_us_per_tx": cpu, "peak_rss_kib": 10240},
            "generator_cpu_us_per_tx": 4.0, "generator_cpu_s": 4.0, "others_cpu_s": 0.8,
            "machine_busy_cpu_s": 12.0
        })
    }

    #[test]
    fn renders_tables_ratios_and_ceiling() {
        let dir = std::env::temp_dir().join(format!("portico-bench-report-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let runs = [
            ("a", "rate20000", 20000.0, 5.0, Some(20000)),
            ("b", "rate20000", 20000.0, 10.0, Some(20000)),
            ("a", "flat", 90000.0, 4.0, None),
            ("b", "flat", 45000.0, 9.0, None),
            ("echo", "flat", 100000.0, 2.0, None),
        ];
        let mut stalled = report(50000.0, 4.0, None);
        stalled["lost"] = json!(512);
        stalled["unmatched"] = json!(512);
        stalled["rtt_us"]["max"] = json!(850_000.0);
        stalled["others_cpu_s"] = json!(16.0);
        std::fs::write(dir.join("a__flat__r9.json"), stalled.to_string()).unwrap();
        for (round, (s, p, tps, cpu, rate)) in runs.iter().enumerate() {
            let v = report(*tps, *cpu, *rate);
            std::fs::write(dir.join(format!("{s}__{p}__r{round}.json")), v.to_string()).unwrap();
        }
        let args = BenchReportArgs {
            kind: Kind::Stun,
            dir: Some(dir.clone()),
            markdown: None,
            charts: None,
            out: dir.join("RESULTS.md"),
            command: "scripts/bench.sh stun".into(),
            facts: vec!["kernel=6.18".into()],
            servers: vec!["b".into()],
            ratios: vec!["a/b".into()],
            reference: Some("echo".into()),
        };
        run(&args).unwrap();
        let md = std::fs::read_to_string(dir.join("RESULTS.md")).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(md.contains("| kernel | 6.18 |"));
        let rate_at = md.find("Fixed offered rate: 20,000").unwrap();
        let flat_at = md.find("Flat out: 64").unwrap();
        assert!(rate_at < flat_at, "fixed-rate table first");
        assert!(
            md.contains("| b | 1 | 20,000 | 0.000% | 0 | 30.0 |"),
            "{md}"
        );
        assert!(md.find("| b | 1 |").unwrap() < md.find("| a | 1 |").unwrap());
        assert!(md.contains("| a / b | rate20000 | 1.00 | 1.00 | 1.00 | 0.50 | 1.00 |"));
        assert!(
            md.contains("| a / b | flat | 1.56 |"),
            "median of 90k and 50k: {md}"
        );
        assert!(md.contains(
            "- `a__flat__r9`: 512 lost (512 of them answered after the timeout); \
             max RTT 850 ms (others' CPU 2.00 cores)"
        ));
        assert!(md.contains("completed 100,000 tx/s"));
        assert!(md.contains("busy 0.50 cores at 4.00 µs"), "{md}");
        assert!(md.contains("could not exceed ~250,000 tx/s"));
        assert!(md.contains("machine was busy 1.50 of"), "{md}");
        assert!(md.contains("  - `a`: 70%\n"), "{md}");
        assert!(md.contains("0.10 cores"));
        assert!(
            md.contains("| a | flat | 0.10 | 4.00 | 90,000 | 90.0 |"),
            "least-disturbed table: {md}"
        );
    }

    #[test]
    fn rejects_misnamed_reports() {
        let dir = std::env::temp_dir().join(format!("portico-bench-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("oops.json"), "{}").unwrap();
        let err = load(&dir).unwrap_err();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(err.contains("oops.json"), "{err}");
    }
}
