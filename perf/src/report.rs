//! Report pieces every scenario shares: latency summaries, server resource usage, the live
//! progress line and JSON output.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;

use serde::Serialize;

use crate::histogram::Histogram;
use crate::proc_stats;

/// Round-trip latency quantiles in microseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct LatencyUs {
    pub samples: u64,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl LatencyUs {
    /// From a histogram of nanoseconds.
    pub fn from_ns(h: &Histogram) -> Self {
        let us = |ns: u64| ns as f64 / 1000.0;
        LatencyUs {
            samples: h.count(),
            mean: h.mean() / 1000.0,
            p50: us(h.quantile(0.50)),
            p90: us(h.quantile(0.90)),
            p99: us(h.quantile(0.99)),
            p999: us(h.quantile(0.999)),
            max: us(h.max()),
        }
    }

    pub fn line(&self) -> String {
        format!(
            "p50 {:.1}  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}  (mean {:.1})",
            self.p50, self.p90, self.p99, self.p999, self.max, self.mean
        )
    }
}

/// CPU used by one server process over the load window, and its lifetime peak RSS.
#[derive(Debug, Clone, Serialize)]
pub struct ProcessUsage {
    pub pid: u32,
    pub cpu_s: f64,
    pub peak_rss_kib: u64,
}

/// Samples the CPU time of a set of processes at the start of a load window.
pub struct UsageProbe {
    start: Vec<(u32, f64)>,
}

impl UsageProbe {
    /// Fails if a process cannot be read: a benchmark that silently measured nothing is
    /// worse than one that stops.
    pub fn start(pids: &[u32]) -> Result<Self, String> {
        let start = pids
            .iter()
            .map(|&pid| {
                proc_stats::cpu_seconds(pid)
                    .map(|c| (pid, c))
                    .map_err(|e| format!("server pid {pid}: {e}"))
            })
            .collect::<Result<_, _>>()?;
        Ok(UsageProbe { start })
    }

    pub fn finish(&self) -> Result<Vec<ProcessUsage>, String> {
        self.start
            .iter()
            .map(|&(pid, before)| {
                let after = proc_stats::cpu_seconds(pid)
                    .map_err(|e| format!("server pid {pid} (did it exit?): {e}"))?;
                let peak_rss_kib =
                    proc_stats::peak_rss_kib(pid).map_err(|e| format!("server pid {pid}: {e}"))?;
                Ok(ProcessUsage {
                    pid,
                    cpu_s: after - before,
                    peak_rss_kib,
                })
            })
            .collect()
    }
}

/// Writes `report` as pretty JSON.
pub fn write_json<T: Serialize>(path: &Path, report: &T) -> Result<(), String> {
    let text = serde_json::to_string_pretty(report).map_err(|e| e.to_string())?;
    std::fs::write(path, text + "\n").map_err(|e| format!("{}: {e}", path.display()))
}

/// `1234567` -> `1,234,567`.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The `\r`-rewritten status line on stderr. Pads to the previous line's width so a shorter
/// line leaves no stale characters behind.
pub struct ProgressLine {
    enabled: bool,
    last_width: usize,
}

impl ProgressLine {
    pub fn new(enabled: bool) -> Self {
        ProgressLine {
            enabled,
            last_width: 0,
        }
    }

    pub fn update(&mut self, text: &str) {
        if !self.enabled {
            return;
        }
        let mut line = String::with_capacity(text.len() + 8);
        let _ = write!(line, "\r{text}");
        let width = text.chars().count();
        for _ in width..self.last_width {
            line.push(' ');
        }
        self.last_width = width;
        let mut err = std::io::stderr().lock();
        let _ = err.write_all(line.as_bytes());
        let _ = err.flush();
    }

    /// Ends the line so the final report starts on a fresh one.
    pub fn finish(&mut self) {
        if self.enabled && self.last_width > 0 {
            let _ = writeln!(std::io::stderr());
            self.last_width = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }

    #[test]
    fn latency_from_nanoseconds() {
        let mut h = Histogram::new();
        for v in 1..=1000u64 {
            h.record(v * 1000);
        }
        let l = LatencyUs::from_ns(&h);
        assert_eq!(l.samples, 1000);
        assert!((l.p50 - 500.0).abs() <= 500.0 / 32.0);
        assert!((l.p99 - 990.0).abs() <= 990.0 / 32.0);
        assert_eq!(l.max, 1000.0);
    }

    #[test]
    fn usage_probe_reports_a_live_process_and_fails_on_a_missing_one() {
        let me = std::process::id();
        let probe = UsageProbe::start(&[me]).unwrap();
        let u = probe.finish().unwrap();
        assert_eq!(u.len(), 1);
        assert_eq!(u[0].pid, me);
        assert!(u[0].cpu_s >= 0.0);
        assert!(u[0].peak_rss_kib > 0);
        assert!(UsageProbe::start(&[u32::MAX - 1]).is_err());
    }
}
