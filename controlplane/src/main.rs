//! `portico`: the control plane. It loads and validates the configuration, prepares the
//! state directory, creates (or re-attaches to) the shared memory, starts and supervises the
//! dataplane, and serves the REST API and Prometheus metrics.

#![forbid(unsafe_code)]

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use portico_shared::shm::{Driver, SharedMemory, ShmError};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::oneshot;
use tracing_subscriber::EnvFilter;

use portico::control::{Control, LogReload};
use portico::{api, config, fleet, fraud, probe, proxy, state, supervisor};
use supervisor::Dataplane;

#[derive(Parser)]
#[command(
    name = "portico",
    version,
    about = "Public-access edge for IP telephony: STUN/TURN and media relay"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run Portico (the default): without --config, on the configuration kept in
    /// ./portico-state/portico.toml, created from the embedded defaults on first start.
    Run {
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Validate a configuration file and exit.
    Check {
        #[arg(value_name = "FILE")]
        config: PathBuf,
    },
    /// Test a TURN/STUN server from here: host, server-reflexive and relayed candidates over
    /// UDP, TCP and TLS, a round trip through the relay, the NAT type (RFC 5780), and a
    /// one-line conclusion. Exit status 0 on success, 1 on failure, 2 for bad arguments.
    Probe(probe::ProbeArgs),
    /// Run the packet engine (normally started by `portico run` itself).
    Dataplane {
        #[arg(long)]
        shm: String,
        #[arg(long, default_value = "info")]
        log_level: String,
    },
}

fn filter_or_info(level: &str) -> EnvFilter {
    EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"))
}

/// Logging for the dataplane subcommand: `RUST_LOG`, else the level it was given.
fn init_logging(level: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| filter_or_info(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::stdout().is_terminal())
        .init();
}

/// Logging for the control plane: like [`init_logging`], but a later change of `log_level`
/// applies at once, unless `RUST_LOG` (which wins) is set.
fn init_reloadable_logging(level: &str) -> Option<LogReload> {
    let from_env = EnvFilter::try_from_default_env().ok();
    let env_set = from_env.is_some();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(from_env.unwrap_or_else(|| filter_or_info(level)))
        .with_target(false)
        .with_ansi(std::io::stdout().is_terminal())
        .with_filter_reloading();
    let handle = builder.reload_handle();
    builder.init();
    if env_set {
        return None;
    }
    Some(Box::new(move |level: &str| {
        let filter = EnvFilter::try_new(level).map_err(|e| e.to_string())?;
        handle.reload(filter).map_err(|e| e.to_string())
    }))
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        None => run(None),
        Some(Cmd::Run { config }) => run(config.as_deref()),
        Some(Cmd::Check { config }) => config::load_file(&config).map(|_| {
            println!("{}: ok", config.display());
        }),
        Some(Cmd::Probe(args)) => std::process::exit(probe::main(&args)),
        Some(Cmd::Dataplane { shm, log_level }) => {
            init_logging(&log_level);
            portico_dataplane::runtime::run(&shm)
        }
    };
    if let Err(e) = result {
        eprintln!("portico: {e}");
        std::process::exit(1);
    }
}

fn run(config_file: Option<&Path>) -> Result<(), String> {
    let loaded = config::load(config_file)?;
    let log_reload = init_reloadable_logging(&loaded.config.log_level);
    let state = state::prepare(&loaded.config.state_dir)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting the runtime: {e}"))?;
    rt.block_on(serve(loaded, state, log_reload))
}

/// Attaches to the segment of a dataplane that outlived an earlier `portico`, or creates a
/// fresh segment. Returns the segment and the pid of the dataplane to adopt, if any.
async fn open_segment(name: &str) -> Result<(SharedMemory, Option<u32>), String> {
    match SharedMemory::attach(name) {
        Ok(shm) => {
            let other = shm
                .segment()
                .header
                .controlplane_pid
                .load(Ordering::Relaxed);
            if other != std::process::id() && supervisor::is_control_plane(other) {
                return Err(format!(
                    "another portico (pid {other}) already runs on this state dir; stop it first"
                ));
            }
            if let Some(pid) = supervisor::find_running(&shm).await {
                return Ok((shm, Some(pid)));
            }
        }
        Err(e @ ShmError::Version { .. }) => {
            tracing::warn!("{e}; replacing it with a fresh segment");
        }
        Err(_) => {}
    }
    let shm = SharedMemory::create(name).map_err(|e| e.to_string())?;
    Ok((shm, None))
}

async fn serve(
    loaded: config::Loaded,
    state: state::State,
    log_reload: Option<LogReload>,
) -> Result<(), String> {
    let config = loaded.config;
    // Absolute, so status and logs say exactly which file is the source of truth.
    let config_path = std::fs::canonicalize(&loaded.path).unwrap_or(loaded.path);
    config::store::remove_stale_temps(&config_path);
    // Bound first: a taken API port fails the start before any dataplane is touched.
    let listener = tokio::net::TcpListener::bind(config.api.listen)
        .await
        .map_err(|e| format!("api.listen {}: {e}", config.api.listen))?;
    let shm_name = SharedMemory::name_for_state_dir(&state.dir);
    // Handlers first: a signal that arrives while the dataplane starts must stop it in order,
    // not kill `portico` and leave an orphan dataplane holding the ports.
    let sig = |k: SignalKind| signal(k).map_err(|e| format!("installing signal handler: {e}"));
    let mut sigint = sig(SignalKind::interrupt())?;
    let mut sigterm = sig(SignalKind::terminate())?;
    let mut sighup = sig(SignalKind::hangup())?;
    let (shm, adopted) = open_segment(&shm_name).await?;
    let shm = Arc::new(shm);
    let seg = shm.segment();
    seg.header
        .controlplane_pid
        .store(std::process::id(), Ordering::Relaxed);
    // The file is the source of truth: publish it unless the dataplane already runs on exactly
    // this text (republishing would make it re-apply for nothing).
    let text = config.to_toml();
    if seg.read_config().map(|(_, t)| t) != Some(text.clone().into_bytes()) {
        seg.write_config(text.as_bytes())
            .map_err(|e| e.to_string())?;
    }

    let log_level = config.log_level.clone();
    let listen = if config.turn.listen.is_empty() {
        "off (turn.listen is empty)".to_string()
    } else {
        format!("on {:?}", config.turn.listen)
    };
    let api_listen = config.api.listen;
    let fraud = fraud::task::Fraud::start(Arc::clone(&shm), &state.dir, &config.fraud)?;
    let proxy_metrics = Arc::new(proxy::metrics::ProxyMetrics::default());
    let control = Arc::new(Control::new(
        Arc::clone(&shm),
        config,
        config_path.clone(),
        state.token.clone(),
        log_reload,
        fraud,
        &proxy_metrics,
    ));
    // Blacklist, whitelist and TURN users shared with the other boxes (`[fleet] redis`).
    fleet::start(&control.config().fleet, Arc::clone(&control));
    let dataplane = match adopted {
        Some(pid) => {
            tracing::info!(pid, "re-attached to the running dataplane");
            Dataplane::adopt(pid)
        }
        None => match Dataplane::start(&shm, &log_level).await {
            Ok(d) => d,
            Err(e) => {
                SharedMemory::unlink(&shm_name);
                return Err(e);
            }
        },
    };
    // Reverse proxy: follows `[proxy]` of the running configuration; its suspicious events
    // feed the fraud engine, which it asks at accept time whether a source is blocked.
    let (proxy_events, mut proxy_events_rx) = tokio::sync::mpsc::channel(4096);
    let proxy_control = Arc::clone(&control);
    let proxy_task = tokio::spawn(proxy::run(
        move || proxy_control.config().proxy,
        proxy::CertPaths {
            cert: state.cert_path.clone(),
            key: state.key_path.clone(),
        },
        proxy_events,
        Arc::clone(&proxy_metrics),
        {
            let fraud = Arc::clone(&control.fraud);
            Arc::new(move |ip| fraud.is_blocked(ip))
        },
        portico_shared::handoff::socket_path(&state.dir),
    ));
    {
        let fraud = Arc::clone(&control.fraud);
        tokio::spawn(async move {
            while let Some(e) = proxy_events_rx.recv().await {
                tracing::info!(source = %e.source, service_type = %e.service_type, "suspicious request: {}", e.reason);
                fraud.report(e.source, "proxy", e.reason.label());
            }
        });
    }
    let driver = Driver::from_u32(seg.header.driver.load(Ordering::Relaxed));
    tracing::info!(
        config = %config_path.display(),
        state_dir = %state.dir.display(),
        certificate = %state.cert_path.display(),
        private_key = %state.key_path.display(),
        dataplane_pid = dataplane.pid(),
        driver = driver.name(),
        "portico is running: STUN/TURN {listen}, API on http://{api_listen}/api/v1/"
    );
    if state.token_created {
        tracing::info!(
            "admin token (new; kept in {}): {}",
            state.token_path.display(),
            state.token
        );
    }
    tracing::info!(
        "try: curl -H \"Authorization: Bearer $(cat {})\" http://{api_listen}/api/v1/status",
        state.token_path.display()
    );

    let (stop_tx, stop_rx) = oneshot::channel();
    let supervisor = tokio::spawn(supervisor::supervise(
        Arc::clone(&control),
        dataplane,
        stop_rx,
    ));
    let app = api::router(Arc::clone(&control))
        .into_make_service_with_connect_info::<std::net::SocketAddr>();
    let mut api_server = tokio::spawn(async move { axum::serve(listener, app).await });

    let mut result = Ok(());
    loop {
        tokio::select! {
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = sighup.recv() => {
                let _ = control.reload_file().await;
            }
            r = &mut api_server => {
                let e = match r {
                    Ok(Ok(())) => "the API server stopped".to_string(),
                    Ok(Err(e)) => format!("the API server failed: {e}"),
                    Err(e) => format!("the API server task failed: {e}"),
                };
                tracing::error!("{e}");
                result = Err(e);
                break;
            }
        }
    }
    tracing::info!("stopping");
    proxy_task.abort();
    api_server.abort();
    let _ = stop_tx.send(());
    let _ = supervisor.await;
    SharedMemory::unlink(&shm_name);
    tracing::info!("stopped");
    result
}
