//! CPU time and peak memory of processes, from `/proc`, and of the generator itself.
//!
//! Throughput on a 2-core box shared with the generator says more about the box than about
//! the server; CPU seconds the server spent per transaction at a fixed offered rate is the
//! figure that compares servers fairly, so the generator samples it itself, exactly around
//! its load window.

use std::fs;
use std::io;

/// Kernel clock ticks per second (`USER_HZ`), the unit of `/proc/<pid>/stat` CPU times.
pub fn ticks_per_second() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

/// utime + stime of process `pid` (all its threads, dead ones included), in seconds.
pub fn cpu_seconds(pid: u32) -> io::Result<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_cpu_ticks(&stat)
        .map(|t| t as f64 / ticks_per_second() as f64)
        .ok_or_else(|| io::Error::other(format!("/proc/{pid}/stat: unexpected format")))
}

/// Fields 14 (utime) and 15 (stime) of a `/proc/<pid>/stat` line. The command name (field
/// 2) may contain spaces and parentheses, so counting starts after its last `)`.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Peak resident set size (`VmHWM`) of process `pid`, in KiB.
pub fn peak_rss_kib(pid: u32) -> io::Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    parse_status_kib(&status, "VmHWM:")
        .ok_or_else(|| io::Error::other(format!("/proc/{pid}/status: no VmHWM")))
}

/// Current resident set size (`VmRSS`) of process `pid`, in KiB.
pub fn rss_kib(pid: u32) -> io::Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    parse_status_kib(&status, "VmRSS:")
        .ok_or_else(|| io::Error::other(format!("/proc/{pid}/status: no VmRSS")))
}

fn parse_status_kib(status: &str, key: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(key))?;
    line[key.len()..]
        .split_ascii_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Idle CPU seconds of the whole machine (all cores) since boot, and the number of cores
/// online, from `/proc/stat`. Busy time over a window is cores × wall time − idle time.
/// Idle (+ iowait) is used rather than summing user/system because this kernel samples
/// user/system on its 250 Hz tick, which misses much of the time of processes that sleep
/// and wake thousands of times a second (a load generator, a UDP server), while idle time
/// is measured exactly on entry to and exit from idle.
///
/// Compared with what the generator and the server used over the same window, it shows how
/// much other work (other engineers' builds and tests) shared the box.
pub fn machine_idle_seconds() -> io::Result<(f64, usize)> {
    let stat = fs::read_to_string("/proc/stat")?;
    parse_machine_idle_ticks(&stat)
        .map(|(t, n)| (t as f64 / ticks_per_second() as f64, n))
        .ok_or_else(|| io::Error::other("/proc/stat: unexpected format"))
}

/// idle + iowait of the `cpu` line, and the count of `cpuN` lines.
fn parse_machine_idle_ticks(stat: &str) -> Option<(u64, usize)> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let mut f = line.split_ascii_whitespace().skip(4);
    let idle: u64 = f.next()?.parse().ok()?;
    let iowait: u64 = f.next()?.parse().ok()?;
    let cores = stat
        .lines()
        .filter(|l| l.starts_with("cpu") && !l.starts_with("cpu "))
        .count();
    Some((idle + iowait, cores.max(1)))
}

/// Idle (+ iowait) seconds since boot of the CPUs numbered `cpus`, from their `cpuN` lines
/// of `/proc/stat` (an error names a CPU that is not listed). With the servers' processes and
/// their interface's receive work pinned to these CPUs, their busy time is the servers' side
/// of a run, softirq included, whatever process the kernel would have charged it to.
pub fn cpus_idle_seconds(cpus: &[usize]) -> io::Result<f64> {
    let stat = fs::read_to_string("/proc/stat")?;
    parse_cpus_idle_ticks(&stat, cpus)
        .map(|t| t as f64 / ticks_per_second() as f64)
        .map_err(io::Error::other)
}

fn parse_cpus_idle_ticks(stat: &str, cpus: &[usize]) -> Result<u64, String> {
    let mut sum = 0;
    for cpu in cpus {
        let tag = format!("cpu{cpu}");
        let line = stat
            .lines()
            .find(|l| l.split_ascii_whitespace().next() == Some(tag.as_str()))
            .ok_or_else(|| format!("/proc/stat has no {tag}"))?;
        let mut f = line.split_ascii_whitespace().skip(4);
        let mut next = || -> Result<u64, String> {
            f.next()
                .and_then(|x| x.parse().ok())
                .ok_or_else(|| format!("/proc/stat: unexpected {tag} line"))
        };
        sum += next()? + next()?;
    }
    Ok(sum)
}

/// CPU seconds (user + system) this process has used so far, all threads.
pub fn self_cpu_seconds() -> f64 {
    // SAFETY: rusage is plain old data and getrusage only writes into it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a rusage.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_of_chosen_cpus() {
        let stat = "cpu  10 0 5 900 7 0 0 0 0 0\ncpu0 5 0 2 400 3 0 0 0 0 0\n\
                    cpu1 5 0 3 500 4 0 1 0 0 0\nintr 1\n";
        assert_eq!(parse_cpus_idle_ticks(stat, &[1]), Ok(504));
        assert_eq!(parse_cpus_idle_ticks(stat, &[0, 1]), Ok(907));
        assert!(parse_cpus_idle_ticks(stat, &[2]).is_err());
        assert!(parse_cpus_idle_ticks("cpu1 5 0\n", &[1]).is_err());
    }

    #[test]
    fn parses_stat_with_awkward_command_names() {
        let line = "4242 (my (odd) prog) S 1 4242 4242 0 -1 4194560 500 0 0 0 \
                    1234 567 0 0 20 0 3 0 100 1000000 250 18446744073709551615";
        assert_eq!(parse_cpu_ticks(line), Some(1234 + 567));
        assert_eq!(parse_cpu_ticks("garbage"), None);
    }

    #[test]
    fn parses_machine_idle_time() {
        let stat = "cpu  100 5 50 1000 7 3 2 1 40 0\ncpu0 50 2 25 500 3 1 1 0 20 0\n\
                    cpu1 50 3 25 500 4 2 1 1 20 0\nintr 5\n";
        assert_eq!(parse_machine_idle_ticks(stat), Some((1007, 2)));
        assert_eq!(parse_machine_idle_ticks("intr 1 2 3\n"), None);
        let (idle, cores) = machine_idle_seconds().unwrap();
        assert!(idle > 0.0);
        assert_eq!(
            cores,
            std::thread::available_parallelism().unwrap().get(),
            "all cores online"
        );
    }

    #[test]
    fn parses_status_fields() {
        let s = "Name:\tx\nVmPeak:\t  9000 kB\nVmHWM:\t    5120 kB\nVmRSS:\t 4000 kB\n";
        assert_eq!(parse_status_kib(s, "VmHWM:"), Some(5120));
        assert_eq!(parse_status_kib(s, "VmSwap:"), None);
    }

    #[test]
    fn measures_this_process() {
        let pid = std::process::id();
        let before = cpu_seconds(pid).unwrap();
        let mut x = 1u64;
        let t = std::time::Instant::now();
        while t.elapsed().as_millis() < 150 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        let after = cpu_seconds(pid).unwrap();
        assert!(after - before >= 0.05, "{before} -> {after}");
        assert!(self_cpu_seconds() >= after - 0.02);
        assert!(peak_rss_kib(pid).unwrap() > 100);
        let rss = rss_kib(pid).unwrap();
        assert!(rss > 100 && rss <= peak_rss_kib(pid).unwrap());
    }
}
