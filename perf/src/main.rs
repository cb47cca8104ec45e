//! `portico-perf`: see the crate docs and perf/README.md.

use std::io::Write as _;
use std::net::IpAddr;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use portico_perf::{
    bench_report, echo_server, media_load, register_load, sk_lookup_probe, stun_load, turn_load,
    turn_scale, uclient_run, udp,
};

#[derive(Parser)]
#[command(
    name = "portico-perf",
    version,
    about = "Load generators and benchmark helpers for Portico"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// STUN Binding load: throughput, loss, round-trip latency, server CPU per request.
    /// Exit status 3 when not a single transaction succeeded.
    Stun(stun_load::StunArgs),
    /// TURN relay load: allocations/s, relayed packets/s each way, loss, reordering,
    /// one-way latency, server CPU per relayed packet and RSS per allocation.
    /// Exit status 3 when not a single allocation succeeded.
    Turn(turn_load::TurnArgs),
    /// TURN at scale: grows the allocations held through levels (10k, 50k, 100k) with a
    /// light keep-alive, measures the server's RSS, kernel memory, CPU, Allocate latency
    /// and failed refreshes at each, churn at one level, then CPU while everything expires.
    TurnScale(turn_scale::ScaleArgs),
    /// Feasibility of relays without a descriptor each: an eBPF sk_lookup program steers a
    /// whole relay port range on loopback addresses to one socket (IP_RECVORIGDSTADDR), and
    /// answers leave from the relayed port through a raw socket. Needs CAP_BPF/CAP_SYS_ADMIN,
    /// CAP_NET_ADMIN and CAP_NET_RAW.
    SkLookupProbe(sk_lookup_probe::ProbeArgs),
    /// H.323 RRQ / SIP REGISTER through the reverse proxy (a new connection each, or kept),
    /// against a fake PBX in this process: registrations/s, latency, proxy CPU per
    /// registration. Exit status 3 when not a single registration succeeded.
    Register(register_load::RegisterArgs),
    /// Media relay load: sessions created through the API, RTP both ways per session;
    /// relayed packets, loss, dataplane CPU per million packets, RSS per 1000 sessions.
    Media(media_load::MediaArgs),
    /// Runs coturn's turnutils_uclient (the command after `--`) bounded in time, with the
    /// server's CPU and RSS sampled around it; parses its summary into a report.
    Uclient(uclient_run::UclientArgs),
    /// Minimal STUN Binding responder (and UDP echo), to measure the generator's ceiling.
    EchoServer(echo_server::EchoArgs),
    /// Summarises a directory of JSON run reports as Markdown (scripts/bench.sh uses it).
    BenchReport(bench_report::BenchReportArgs),
    /// Prints a port free for both UDP and TCP on --ip (for scripts).
    FreePort {
        #[arg(long, default_value = "127.0.0.1")]
        ip: IpAddr,
        /// Below the kernel's ephemeral port range, for a port bound again between runs
        /// that open many connections.
        #[arg(long)]
        not_ephemeral: bool,
    },
}

/// Exit status when a load run completed no transaction at all (scripts probe with it).
const EXIT_NOTHING_COMPLETED: u8 = 3;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Stun(args) => stun_load::run(&args).map(|r| {
            print!("{}", r.text());
            if r.completed == 0 {
                ExitCode::from(EXIT_NOTHING_COMPLETED)
            } else {
                ExitCode::SUCCESS
            }
        }),
        Cmd::Turn(args) => turn_load::run(&args).map(|r| {
            print!("{}", r.text());
            if r.allocated_any() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_NOTHING_COMPLETED)
            }
        }),
        Cmd::TurnScale(args) => turn_scale::run(&args).and_then(|r| {
            let json = serde_json::to_string_pretty(&r).map_err(|e| e.to_string())?;
            if let Some(p) = &args.json {
                std::fs::write(p, &json).map_err(|e| format!("{}: {e}", p.display()))?;
            }
            for row in turn_scale::markdown_rows(&r) {
                println!("{row}");
            }
            println!("{}", turn_scale::expiry_line(&r));
            Ok(if r.levels.iter().any(|l| l.held > 0) {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_NOTHING_COMPLETED)
            })
        }),
        Cmd::SkLookupProbe(args) => sk_lookup_probe::run(&args).and_then(|r| {
            println!(
                "{}",
                serde_json::to_string_pretty(&r).map_err(|e| e.to_string())?
            );
            Ok(if r.orig_dst_ok > 0 && r.orig_dst_ok == r.sent {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }),
        Cmd::Register(args) => register_load::run(&args).map(|r| {
            print!("{}", r.text());
            if r.completed == 0 {
                ExitCode::from(EXIT_NOTHING_COMPLETED)
            } else {
                ExitCode::SUCCESS
            }
        }),
        Cmd::Media(args) => media_load::run(&args).map(|r| {
            println!("{}", r.text());
            if let Some(path) = &args.json {
                if let Err(e) = std::fs::write(path, r.json().to_string()) {
                    eprintln!("portico-perf media: {}: {e}", path.display());
                }
            }
            if r.received == 0 {
                ExitCode::from(EXIT_NOTHING_COMPLETED)
            } else {
                ExitCode::SUCCESS
            }
        }),
        Cmd::Uclient(args) => uclient_run::run(&args).map(|r| {
            print!("{}", r.text());
            ExitCode::SUCCESS
        }),
        Cmd::EchoServer(args) => echo_server::EchoServer::start(&args).and_then(|s| {
            println!("listening on {}", s.local);
            let _ = std::io::stdout().flush();
            s.wait().map(|n| {
                println!("answered {n} datagrams");
                ExitCode::SUCCESS
            })
        }),
        Cmd::BenchReport(args) => bench_report::run(&args).map(|()| ExitCode::SUCCESS),
        Cmd::FreePort { ip, not_ephemeral } => if not_ephemeral {
            udp::free_port_outside_ephemeral(ip)
        } else {
            udp::free_port(ip)
        }
        .map(|p| {
            println!("{p}");
            ExitCode::SUCCESS
        })
        .map_err(|e| e.to_string()),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("portico-perf: {e}");
            ExitCode::FAILURE
        }
    }
}
