//! `portico-perf uclient -- turnutils_uclient ARGS...`: runs coturn's own TURN test client
//! against a server and measures it the way `portico-perf turn` measures itself, so the
//! comparison between servers does not rest on our generator alone.
//!
//! The command runs bounded by `--timeout`; its output goes to `--log`; the server's CPU
//! (from `/proc/<pid>/stat`) and peak RSS, the client's own CPU (and that of helper
//! processes such as `turnutils_peer`), and how busy the whole machine was are sampled around
//! it. The client's summary lines are parsed into a JSON report: messages sent and received,
//! lost packets, and its round-trip and jitter figures (whole milliseconds in its output).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::proc_stats;
use crate::report::{self, ProcessUsage, UsageProbe};

#[derive(clap::Args, Debug, Clone)]
pub struct UclientArgs {
    /// Server process to charge CPU time to (repeatable).
    #[arg(long = "server-pid")]
    pub server_pids: Vec<u32>,
    /// Helper process whose CPU counts as the generator's, e.g. turnutils_peer (repeatable).
    #[arg(long = "helper-pid")]
    pub helper_pids: Vec<u32>,
    /// The client's output goes here.
    #[arg(long)]
    pub log: PathBuf,
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Kill the client after this many seconds.
    #[arg(long, default_value_t = 300.0)]
    pub timeout: f64,
    /// The client command and its arguments (after `--`).
    #[arg(trailing_var_arg = true, required = true, num_args = 1..)]
    pub command: Vec<String>,
}

/// What `turnutils_uclient` printed at the end of a run.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct UclientSummary {
    pub messages_sent: Option<u64>,
    pub messages_received: Option<u64>,
    pub lost_packets: Option<u64>,
    pub lost_percent: Option<f64>,
    pub send_dropped: Option<u64>,
    pub rtt_avg_ms: Option<f64>,
    pub rtt_min_ms: Option<f64>,
    pub rtt_max_ms: Option<f64>,
    pub jitter_avg_ms: Option<f64>,
    pub jitter_max_ms: Option<f64>,
    pub connect_time_s: Option<f64>,
    pub transmit_time_s: Option<f64>,
}

/// The number right after `key` in `line`.
fn num_after(line: &str, key: &str) -> Option<f64> {
    let rest = &line[line.find(key)? + key.len()..];
    let rest = rest.trim_start_matches([' ', '=', '(']);
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// Reads the summary lines of a `turnutils_uclient` output.
pub fn parse(text: &str) -> UclientSummary {
    let mut s = UclientSummary::default();
    for line in text.lines() {
        if line.contains("start_mclient: tot_send_msgs=") && !line.contains("msz=") {
            s.messages_sent = num_after(line, "tot_send_msgs").map(|x| x as u64);
            s.messages_received = num_after(line, "tot_recv_msgs").map(|x| x as u64);
        } else if line.contains("Total lost packets") {
            s.lost_packets = num_after(line, "Total lost packets").map(|x| x as u64);
            s.lost_percent = line.find('(').and_then(|i| num_after(&line[i..], "("));
            s.send_dropped = num_after(line, "total send dropped").map(|x| x as u64);
        } else if line.contains("Average round trip delay") {
            s.rtt_avg_ms = num_after(line, "Average round trip delay");
            s.rtt_min_ms = num_after(line, "min");
            s.rtt_max_ms = num_after(line, "max");
        } else if line.contains("Average jitter") {
            s.jitter_avg_ms = num_after(line, "Average jitter");
            s.jitter_max_ms = num_after(line, "max");
        } else if line.contains("Total connect time is") {
            s.connect_time_s = num_after(line, "Total connect time is");
        } else if line.contains("Total transmit time is") {
            s.transmit_time_s = num_after(line, "Total transmit time is");
        }
    }
    s
}

#[derive(Debug, Clone, Serialize)]
pub struct UclientServerUsage {
    pub processes: Vec<ProcessUsage>,
    pub cpu_s: f64,
    /// Per million relayed packets, counting each message twice (to the peer and back).
    pub cpu_s_per_million_relayed: Option<f64>,
    pub peak_rss_kib: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct UclientReport {
    pub scenario: &'static str,
    pub command: String,
    pub exit_code: Option<i32>,
    pub timed_out: bool,
    pub wall_s: f64,
    #[serde(flatten)]
    pub summary: UclientSummary,
    /// Messages sent plus messages received back (what the server relayed, if nothing was
    /// lost on the way to the peer).
    pub relayed_packets: u64,
    pub server_usage: Option<UclientServerUsage>,
    /// The client's and the helpers' CPU.
    pub generator_cpu_s: f64,
    pub machine_busy_cpu_s: f64,
    pub others_cpu_s: f64,
}

/// CPU seconds of this process's waited-for children.
fn children_cpu_seconds() -> f64 {
    // SAFETY: rusage is plain old data and getrusage only writes into it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a rusage.
    if unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) } != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn cpu_of(pids: &[u32]) -> Result<f64, String> {
    pids.iter()
        .map(|&p| proc_stats::cpu_seconds(p).map_err(|e| format!("pid {p}: {e}")))
        .sum()
}

pub fn run(args: &UclientArgs) -> Result<UclientReport, String> {
    if !(args.timeout > 0.0 && args.timeout <= 3600.0) {
        return Err("--timeout must be in (0, 3600] seconds".into());
    }
    let (program, rest) = args.command.split_first().ok_or("no command given")?;
    let log =
        std::fs::File::create(&args.log).map_err(|e| format!("{}: {e}", args.log.display()))?;
    let log2 = log.try_clone().map_err(|e| e.to_string())?;
    let probe = UsageProbe::start(&args.server_pids)?;
    let helpers_before = cpu_of(&args.helper_pids)?;
    let children_before = children_cpu_seconds();
    let (idle_before, cores) = proc_stats::machine_idle_seconds().map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    let mut child = Command::new(program)
        .args(rest)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .spawn()
        .map_err(|e| format!("{program}: {e}"))?;
    let deadline = t0 + Duration::from_secs_f64(args.timeout);
    let mut timed_out = false;
    let status = loop {
        match child.try_wait().map_err(|e| e.to_string())? {
            Some(s) => break s,
            None if Instant::now() >= deadline => {
                timed_out = true;
                let _ = child.kill();
                break child.wait().map_err(|e| e.to_string())?;
            }
            None => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    let wall_s = t0.elapsed().as_secs_f64();
    let processes = probe.finish()?;
    let generator_cpu_s =
        children_cpu_seconds() - children_before + cpu_of(&args.helper_pids)? - helpers_before;
    let (idle_after, _) = proc_stats::machine_idle_seconds().map_err(|e| e.to_string())?;
    let machine_busy_cpu_s = (cores as f64 * wall_s - (idle_after - idle_before)).max(0.0);
    let text =
        std::fs::read_to_string(&args.log).map_err(|e| format!("{}: {e}", args.log.display()))?;
    let summary = parse(&text);
    let relayed_packets =
        summary.messages_sent.unwrap_or(0) + summary.messages_received.unwrap_or(0);
    let server_usage = (!processes.is_empty()).then(|| {
        let cpu_s: f64 = processes.iter().map(|p| p.cpu_s).sum();
        UclientServerUsage {
            cpu_s,
            cpu_s_per_million_relayed: (relayed_packets > 0)
                .then(|| cpu_s * 1e6 / relayed_packets as f64),
            peak_rss_kib: processes.iter().map(|p| p.peak_rss_kib).sum(),
            processes,
        }
    });
    let server_cpu = server_usage.as_ref().map_or(0.0, |u| u.cpu_s);
    let report = UclientReport {
        scenario: "uclient",
        command: args.command.join(" "),
        exit_code: status.code(),
        timed_out,
        wall_s,
        summary,
        relayed_packets,
        server_usage,
        generator_cpu_s,
        others_cpu_s: (machine_busy_cpu_s - generator_cpu_s - server_cpu).max(0.0),
        machine_busy_cpu_s,
    };
    if let Some(path) = &args.json {
        report::write_json(path, &report)?;
    }
    Ok(report)
}

impl UclientReport {
    pub fn text(&self) -> String {
        let s = &self.summary;
        let opt = |x: Option<f64>| x.map_or("?".to_string(), |v| format!("{v}"));
        let mut t = format!(
            "{}\n  exit {:?}{}, {:.1} s; sent {}  received {}  lost {} ({}%)\n  rtt ms avg {} min {} max {}; jitter ms avg {}\n  client CPU {:.2} s; machine busy {:.2} CPU-s, others {:.2}\n",
            self.command,
            self.exit_code,
            if self.timed_out { " (timed out)" } else { "" },
            self.wall_s,
            s.messages_sent.unwrap_or(0),
            s.messages_received.unwrap_or(0),
            s.lost_packets.unwrap_or(0),
            opt(s.lost_percent),
            opt(s.rtt_avg_ms),
            opt(s.rtt_min_ms),
            opt(s.rtt_max_ms),
            opt(s.jitter_avg_ms),
            self.generator_cpu_s,
            self.machine_busy_cpu_s,
            self.others_cpu_s,
        );
        if let Some(u) = &self.server_usage {
            t += &format!(
                "  server CPU {:.2} s ({} CPU-s per million relayed), peak RSS {:.1} MiB\n",
                u.cpu_s,
                opt(u
                    .cpu_s_per_million_relayed
                    .map(|x| (x * 100.0).round() / 100.0)),
                u.peak_rss_kib as f64 / 1024.0
            );
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OUTPUT: &str = "\
0: : Total connect time is 1
8: : start_mclient: msz=10, tot_send_msgs=918, tot_recv_msgs=917, tot_send_bytes ~ 157896, tot_recv_bytes ~ 157724
8: : start_mclient: tot_send_msgs=1000, tot_recv_msgs=998
8: : start_mclient: tot_send_bytes ~ 172000, tot_recv_bytes ~ 172000
8: : Total transmit time is 8
8: : Total lost packets 2 (0.200000%), total send dropped 0 (0.000000%)
8: : Average round trip delay 0.003000 ms; min = 0 ms, max = 3 ms
8: : Average jitter 0.753000 ms; min = 0 ms, max = 5 ms
";

    #[test]
    fn parses_the_summary() {
        let s = parse(OUTPUT);
        assert_eq!(
            s,
            UclientSummary {
                messages_sent: Some(1000),
                messages_received: Some(998),
                lost_packets: Some(2),
                lost_percent: Some(0.2),
                send_dropped: Some(0),
                rtt_avg_ms: Some(0.003),
                rtt_min_ms: Some(0.0),
                rtt_max_ms: Some(3.0),
                jitter_avg_ms: Some(0.753),
                jitter_max_ms: Some(5.0),
                connect_time_s: Some(1.0),
                transmit_time_s: Some(8.0),
            }
        );
        assert_eq!(parse("garbage\n"), UclientSummary::default());
    }

    #[test]
    fn runs_a_bounded_command_and_reads_its_output() {
        let dir = std::env::temp_dir().join(format!("portico-uclient-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let script = dir.join("fake.sh");
        std::fs::write(
            &script,
            format!("#!/bin/sh\ncat <<'EOF'\n{OUTPUT}EOF\nexec sleep 30\n"),
        )
        .unwrap();
        let args = UclientArgs {
            server_pids: vec![std::process::id()],
            helper_pids: vec![],
            log: dir.join("log"),
            json: Some(dir.join("r.json")),
            timeout: 1.0,
            command: vec!["sh".into(), script.display().to_string()],
        };
        let r = run(&args).unwrap();
        assert!(r.timed_out, "killed at the timeout");
        assert!(r.wall_s >= 1.0 && r.wall_s < 10.0);
        assert_eq!(r.summary.messages_received, Some(998));
        assert_eq!(r.relayed_packets, 1998);
        assert!(r.server_usage.as_ref().unwrap().peak_rss_kib > 0);
        let json = std::fs::read_to_string(dir.join("r.json")).unwrap();
        assert!(json.contains("\"lost_packets\": 2"), "{json}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
