//! Process life of the dataplane: attach to shared memory, start one worker per core and the
//! TCP thread, then watch signals, the configuration generation and the heartbeat until told
//! to stop. Whatever the protocol core needs from the system beyond packets (the default
//! routes, the random secret) is looked up here and handed to it.
//!
//! With `turn.listen = []` (a proxy-only box) STUN/TURN is off: no worker or TCP thread starts
//! and no socket is opened, but the process still runs its main loop (heartbeat, configuration
//! generations applied), so the control plane supervises it, and reports it, as usual; a
//! later `turn.listen` takes effect at its next start, like any listen change.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use portico_shared::config::{Config, IoMode, RelayMode};
use portico_shared::counters::Counter;
use portico_shared::shm::{Driver, SharedMemory, MAX_WORKERS};

use crate::fdlimit;
use crate::io::{self, relay, Shared};
use crate::server::Settings;
use crate::turn::{DefaultRoutes, TurnShared};

/// Waits this long for the control plane to publish a first configuration.
const CONFIG_WAIT: Duration = Duration::from_secs(10);

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn read_config(shm: &SharedMemory) -> Result<Option<(u64, Config)>, String> {
    match shm.segment().read_config() {
        None => Ok(None),
        Some((generation, text)) => {
            let text = String::from_utf8(text)
                .map_err(|_| "configuration in shared memory is not UTF-8".to_string())?;
            let config = Config::from_toml(&text)
                .map_err(|e| format!("configuration in shared memory: {e}"))?;
            Ok(Some((generation, config)))
        }
    }
}

/// The local address of the interface the default route of a family leaves from. A UDP
/// `connect` only consults the routing table; nothing is sent.
fn route_source(probe: SocketAddr) -> Option<IpAddr> {
    let any: SocketAddr = if probe.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let s = UdpSocket::bind(any).ok()?;
    s.connect(probe).ok()?;
    Some(s.local_addr().ok()?.ip()).filter(|ip| !ip.is_unspecified())
}

/// Looks up the default routes' source addresses, towards documentation addresses
/// (RFC 5737, RFC 3849) that no route singles out.
pub fn default_routes() -> DefaultRoutes {
    DefaultRoutes {
        v4: route_source(SocketAddr::from((Ipv4Addr::new(192, 0, 2, 1), 9))),
        v6: route_source(SocketAddr::from((
            Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1),
            9,
        ))),
    }
}

/// Settings for a configuration, with the routes looked up now (they may have changed since
/// the last configuration).
fn settings_for(config: &Config, secret: &[u8; 32]) -> Settings {
    Settings::from_config(config, secret, &default_routes())
}

/// Chooses the driver, honouring `turn.io`.
fn choose_driver(mode: IoMode) -> Result<Driver, String> {
    match mode {
        IoMode::Epoll => Ok(Driver::Epoll),
        IoMode::IoUring => io::io_uring_available()
            .map(|_| Driver::IoUring)
            .map_err(|e| format!("turn.io = \"io_uring\": {e}")),
        IoMode::Auto => match io::io_uring_available() {
            Ok(()) => Ok(Driver::IoUring),
            Err(e) => {
                tracing::warn!("{e}; using the epoll driver");
                Ok(Driver::Epoll)
            }
        },
    }
}

fn pin_to_core(worker: usize) {
    let cores = thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mut set = nix::sched::CpuSet::new();
    if set.set(worker % cores).is_ok() {
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
    }
}

/// Raises `RLIMIT_NOFILE` to what `turn.max_allocations` and the TCP limits need (see
/// [`fdlimit`]), logging what was set in one line; refuses the start when not even one relay
/// socket per allocation can be had.
fn raise_fd_limit(
    config: &Config,
    settings: &Settings,
    workers: usize,
    listen: usize,
    steered: bool,
) -> Result<(), String> {
    let t = &config.turn;
    let v6 = settings.turn.relay_ip(false).is_some();
    let dual = settings.turn.relay_ip(true).is_some() && v6;
    let mut budget = fdlimit::FdBudget::new(
        t.max_allocations,
        dual,
        t.tcp_max_connections,
        listen,
        t.listen_tls.len(),
        workers,
    )
    .with_media(media_sockets(config));
    if steered {
        budget = budget.steered(workers, v6);
    }
    let r = fdlimit::raise(&budget, t.max_allocations)?;
    if r.all_wanted {
        tracing::info!(
            soft = r.after.0,
            hard = r.after.1,
            was = format!("{}/{}", r.before.0, r.before.1),
            needed = budget.wanted(),
            max_allocations = t.max_allocations,
            "file descriptor limit (RLIMIT_NOFILE) set"
        );
    } else {
        tracing::warn!(
            soft = r.after.0,
            hard = r.after.1,
            was = format!("{}/{}", r.before.0, r.before.1),
            needed = budget.wanted(),
            max_allocations = t.max_allocations,
            "file descriptor limit (RLIMIT_NOFILE) covers one relay per allocation but not {} more for dual-family allocations and EVEN-PORT reservations: past {} descriptors those get 508",
            budget.second_relays,
            r.after.0
        );
    }
    Ok(())
}

/// Sets up `turn.relay_mode = "shared"` (see [`crate::io::steer`]): `"shared"` refuses the
/// start when it cannot, `"auto"` says why in one line and relays with a socket each.
fn start_steering(
    config: &Config,
    settings: &Settings,
    driver: Driver,
    workers: usize,
) -> Result<Option<Arc<io::steer::Steering>>, String> {
    let mode = config.turn.relay_mode;
    if mode == RelayMode::Socket {
        return Ok(None);
    }
    let attempt = || -> Result<io::steer::Steering, String> {
        if driver != Driver::IoUring {
            return Err("it needs the io_uring driver".into());
        }
        let Some(IpAddr::V4(ip)) = settings.turn.relay_ip(true) else {
            return Err("it needs an IPv4 relay address".into());
        };
        io::steer::Steering::start(workers, config.turn.max_allocations, ip)
    };
    match (attempt(), mode) {
        (Ok(s), _) => {
            tracing::info!(
                workers,
                capacity = config.turn.max_allocations,
                "relay ports steered by sk_lookup (turn.relay_mode): IPv4 UDP relays hold no descriptor"
            );
            Ok(Some(Arc::new(s)))
        }
        (Err(e), RelayMode::Shared) => Err(format!("turn.relay_mode = \"shared\": {e}")),
        (Err(e), _) => {
            tracing::warn!(
                "turn.relay_mode = \"auto\": steered relays unavailable ({e}); a socket per relay"
            );
            Ok(None)
        }
    }
}

/// Sockets the media relay and the static NAT maps may hold at once: four per media session
/// (never more than `media.ports` has), and per NAT map its public ports and its bindings.
fn media_sockets(config: &Config) -> usize {
    let media = match config.media.ports {
        Some(p) => (config.media.max_sessions * 4).min(p.len()),
        None => 0,
    };
    let nat: usize = config
        .nat
        .maps
        .iter()
        .map(|m| m.public_ports.len() + m.max_bindings)
        .sum();
    media + nat
}

/// Runs the dataplane attached to the named segment until SIGTERM or SIGINT.
pub fn run(shm_name: &str) -> Result<(), String> {
    // Block the signals before any thread starts so that only the signalfd sees them.
    let mut mask = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        mask.add(s);
    }
    mask.thread_block()
        .map_err(|e| format!("blocking signals: {e}"))?;
    let sfd = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
        .map_err(|e| format!("signalfd: {e}"))?;

    let shm = SharedMemory::attach(shm_name).map_err(|e| e.to_string())?;
    let deadline = std::time::Instant::now() + CONFIG_WAIT;
    let (mut generation, config) = loop {
        if let Some(c) = read_config(&shm)? {
            break c;
        }
        if std::time::Instant::now() > deadline {
            return Err(format!(
                "no configuration appeared in shared memory {shm_name} within {}s",
                CONFIG_WAIT.as_secs()
            ));
        }
        thread::sleep(Duration::from_millis(20));
    };

    let driver = choose_driver(config.turn.io)?;
    let serving = !config.turn.listen.is_empty();
    let workers = if serving {
        config.worker_count().clamp(1, MAX_WORKERS)
    } else {
        0
    };
    let secret: [u8; 32] = io::random_bytes().map_err(|e| e.to_string())?;
    let meter_seed = u64::from_ne_bytes(io::random_bytes().map_err(|e| e.to_string())?);
    let settings = settings_for(&config, &secret);
    let addrs = settings.endpoints.addrs().to_vec();
    let steering = if serving {
        start_steering(&config, &settings, driver, workers)?
    } else {
        None
    };
    if serving {
        raise_fd_limit(&config, &settings, workers, addrs.len(), steering.is_some())?;
    }
    // Bind everything before starting any thread, so a bad address fails the start cleanly.
    let tcp_listeners = io::tcp::bind_listeners(&addrs, &config.turn.listen_tls)?;
    // Where the proxy hands over TURN connections from its HTTPS port (proxy.turn_on_https);
    // bound whenever TURN is served, so the switch works without restarting the dataplane.
    let handoff = if serving {
        match io::handoff::bind(&config.state_dir) {
            Ok(h) => Some(h),
            Err(e) => {
                tracing::error!("{e}; proxy.turn_on_https cannot hand connections over");
                None
            }
        }
    } else {
        None
    };
    let mut sockets: Vec<Vec<UdpSocket>> = Vec::with_capacity(workers);
    for _ in 0..workers {
        sockets.push(io::bind_all(&addrs)?);
    }
    if serving {
        tracing::info!(
            driver = driver.name(),
            workers,
            listen = ?addrs,
            "dataplane started"
        );
    } else {
        tracing::info!(
            "dataplane started with STUN/TURN off (turn.listen is empty): no socket opened"
        );
    }

    // After the binds, before the workers: "on" fails the start here.
    let fast_path = if serving {
        crate::fastpath::start(&config, &settings)?
    } else {
        None
    };
    let shared = Arc::new(Shared {
        shm,
        stop: AtomicBool::new(false),
        settings_generation: AtomicU64::new(0),
        settings: Mutex::new(Arc::new(settings)),
        turn: Arc::new(TurnShared::new(meter_seed)),
        reservations: Arc::new(match steering {
            Some(s) => relay::Reservations::with_steering(s),
            None => relay::Reservations::default(),
        }),
        secret,
        workers,
        fast_path,
    });
    io::media::forget_dead_sessions(&shared);
    let seg = shared.shm.segment();
    seg.header.driver.store(driver as u32, Ordering::Relaxed);
    seg.header.workers.store(workers as u32, Ordering::Relaxed);
    seg.header
        .dataplane_pid
        .store(std::process::id(), Ordering::Relaxed);
    seg.header
        .dataplane_started_ms
        .store(unix_ms(), Ordering::Relaxed);
    seg.header
        .dataplane_heartbeat_ms
        .store(unix_ms(), Ordering::Relaxed);
    seg.header
        .config_applied
        .store(generation, Ordering::Release);

    let mut handles = Vec::new();
    let pin = config.turn.pin_workers;
    for (i, socks) in sockets.into_iter().enumerate() {
        let sh = Arc::clone(&shared);
        let h = thread::Builder::new()
            .name(format!("portico-w{i}"))
            .spawn(move || {
                if pin {
                    pin_to_core(i);
                }
                let r = match driver {
                    Driver::IoUring => io::uring::run(i, Arc::clone(&sh), socks),
                    _ => io::epoll::run(i, Arc::clone(&sh), socks),
                };
                if let Err(e) = r {
                    tracing::error!(worker = i, "worker failed: {e}");
                    // A dead worker would silently black-hole its share of flows: stop the
                    // whole dataplane so the supervisor restarts it.
                    sh.stop.store(true, Ordering::Relaxed);
                }
            })
            .map_err(|e| format!("spawning worker {i}: {e}"))?;
        handles.push(h);
    }
    if serving {
        let sh = Arc::clone(&shared);
        let h = thread::Builder::new()
            .name("portico-tcp".into())
            .spawn(move || {
                let uring = driver == Driver::IoUring;
                if let Err(e) =
                    io::tcp::run(MAX_WORKERS, Arc::clone(&sh), tcp_listeners, handoff, uring)
                {
                    tracing::error!("tcp thread failed: {e}");
                    sh.stop.store(true, Ordering::Relaxed);
                }
            })
            .map_err(|e| format!("spawning tcp thread: {e}"))?;
        handles.push(h);
    }

    let mut exit_reason = "stopped";
    while !shared.stopping() {
        match sfd.read_signal() {
            Ok(Some(info)) => {
                let sig = info.ssi_signo as i32;
                if sig == Signal::SIGHUP as i32 {
                    // The control plane owns the configuration file; it re-publishes on
                    // its own SIGHUP. Here a HUP only re-reads shared memory, below.
                    tracing::info!("SIGHUP: re-reading configuration from shared memory");
                    generation = 0;
                } else {
                    exit_reason = "signal";
                    shared.stop.store(true, Ordering::Relaxed);
                    break;
                }
            }
            Ok(None) => {}
            Err(e) => tracing::warn!("signalfd read: {e}"),
        }
        seg.header
            .dataplane_heartbeat_ms
            .store(unix_ms(), Ordering::Relaxed);
        if seg.config_generation() != generation {
            match read_config(&shared.shm) {
                Ok(Some((g, c))) => {
                    generation = g;
                    apply(&shared, &config, &c, g);
                }
                Ok(None) => {}
                Err(e) => {
                    // Keep running on the last good configuration.
                    generation = seg.config_generation();
                    tracing::error!("{e}; keeping the running configuration");
                }
            }
        }
        thread::sleep(Duration::from_millis(50));
    }
    for h in handles {
        let _ = h.join();
    }
    let seg = shared.shm.segment();
    seg.header.dataplane_pid.store(0, Ordering::Relaxed);
    seg.header.workers.store(0, Ordering::Relaxed);
    tracing::info!(reason = exit_reason, "dataplane stopped");
    Ok(())
}

/// Applies a new configuration to the running workers. Settings that need new sockets or
/// threads (listen addresses, worker count, driver) apply only at the next start; say so.
fn apply(shared: &Shared, started_with: &Config, new: &Config, generation: u64) {
    let needs_restart = started_with.turn.listen != new.turn.listen
        || started_with.turn.listen_tls != new.turn.listen_tls
        || started_with.turn.workers != new.turn.workers
        || started_with.turn.pin_workers != new.turn.pin_workers
        || started_with.turn.io != new.turn.io
        || started_with.turn.fast_path != new.turn.fast_path
        || started_with.turn.relay_mode != new.turn.relay_mode
        || started_with.stun.alternate_ip != new.stun.alternate_ip
        || started_with.stun.alternate_port != new.stun.alternate_port;
    if needs_restart {
        tracing::warn!(
            generation,
            "turn.listen, turn.listen_tls, turn.workers, turn.pin_workers, turn.io, turn.fast_path, turn.relay_mode and stun.alternate_* take effect when the dataplane restarts"
        );
    }
    let mut settings = settings_for(new, &shared.secret);
    // Keep the socket table the workers were started with.
    settings.endpoints = shared.current_settings().endpoints.clone();
    if shared.workers > 0 && new.turn.max_allocations > started_with.turn.max_allocations {
        // A raised quota needs its descriptors now; the limit is never lowered.
        let listen = settings.endpoints.addrs().len();
        let steered = shared.reservations.steering().is_some();
        if let Err(e) = raise_fd_limit(new, &settings, shared.workers, listen, steered) {
            tracing::error!(generation, "{e}; Allocates past the limit will get 508");
        }
    }
    shared.publish_settings(settings);
    let seg = shared.shm.segment();
    seg.counters(MAX_WORKERS).incr(Counter::ConfigApplied);
    seg.header
        .config_applied
        .store(generation, Ordering::Release);
    tracing::info!(generation, "configuration applied");
}
