//! `portico-dataplane`: started by `portico` (the control plane), which passes the name of the
//! shared-memory segment holding the configuration. Not meant to be started by hand, but it
//! can be, against a segment a running `portico` created.

use clap::Parser;
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(name = "portico-dataplane", version, about = "Portico's packet engine")]
struct Args {
    /// Shared-memory object created by `portico` (e.g. /portico-0123456789abcdef).
    #[arg(long)]
    shm: String,
    /// Log filter when RUST_LOG is not set.
    #[arg(long, default_value = "info")]
    log_level: String,
}

fn main() {
    let args = Args::parse();
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&args.log_level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .init();
    if let Err(e) = portico_dataplane::runtime::run(&args.shm) {
        tracing::error!("{e}");
        eprintln!("portico-dataplane: {e}");
        std::process::exit(1);
    }
}
