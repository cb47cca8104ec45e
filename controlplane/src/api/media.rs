//! Media relay sessions (`/api/v1/media/sessions`) and static NAT maps (`/api/v1/nat/maps`).
//!
//! A session is asked of the dataplane through a record in shared memory: the API writes the
//! request, the worker it names binds the two legs' RTP/RTCP pairs and publishes the session
//! with its local addresses, and the API answers with them (201) once that happened, within
//! [`CREATE_WAIT`]. Counters and latched sources are read from the same record. NAT maps are
//! configuration (`[[nat.maps]]`): they change through the one configuration path.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use portico_shared::config::PortRange;
use portico_shared::media_config::NatMap;
use portico_shared::shm::{MediaFailure, MediaInfo, SrtpMaster, MEDIA_ACTIVE, MEDIA_FAILED};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{ApiError, AppState};
use crate::control::ChangeError;

/// How long a create or delete waits for the dataplane (a worker looks every loop turn, at
/// least every 100 ms).
const CREATE_WAIT: Duration = Duration::from_secs(3);
/// Longest session label, in bytes.
const LABEL_MAX: usize = 32;

/// Creates are serialised, so two concurrent calls cannot both take the last session.
static CREATING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
static NEXT: AtomicU64 = AtomicU64::new(0);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LegRequest {
    #[serde(default)]
    address: Option<String>,
    #[serde(default)]
    srtp: Option<SrtpRequest>,
}

/// A leg's SRTP master key: a new source is learned only when its packets' authentication
/// tag verifies with it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SrtpRequest {
    suite: String,
    /// base64 of the 16-byte master key and 14-byte master salt (SDP `a=crypto` `inline:`).
    key: String,
}

/// The one SRTP suite the relay checks.
const SRTP_SUITE: &str = "AES_CM_128_HMAC_SHA1_80";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SessionRequest {
    legs: Vec<LegRequest>,
    #[serde(default)]
    label: Option<String>,
}

fn opt(a: Option<SocketAddr>) -> Value {
    a.map_or(Value::Null, |a| json!(a.to_string()))
}

fn describe(m: &MediaInfo) -> Value {
    let legs: Vec<Value> = m
        .legs
        .iter()
        .map(|l| {
            let rtcp = l
                .local
                .map(|a| SocketAddr::new(a.ip(), a.port().wrapping_add(1)));
            json!({
                "local": opt(l.local),
                "rtcp_local": opt(rtcp),
                "address": opt(l.address),
                "latched": opt(l.latched),
                // The key is never shown: only that the leg checks SRTP.
                "srtp": if l.srtp { json!({"suite": SRTP_SUITE}) } else { Value::Null },
                "packets_in": l.counters.packets_in,
                "bytes_in": l.counters.bytes_in,
                "packets_out": l.counters.packets_out,
                "bytes_out": l.counters.bytes_out,
                "foreign_dropped": l.counters.foreign_dropped,
            })
        })
        .collect();
    json!({
        "id": m.id.to_string(),
        "label": m.label,
        "created_at": m.created_unix,
        "legs": legs,
    })
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// 503 unless the relay is on and a dataplane with workers runs.
fn check_on(control: &AppState) -> Result<(usize, u64), ApiError> {
    let config = control.config();
    if config.media.ports.is_none() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "media relay is off",
        ));
    }
    let workers = control.shm.segment().header.workers.load(Ordering::Relaxed);
    if workers == 0 {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no dataplane worker runs (turn.listen is empty, or the dataplane is down)",
        ));
    }
    Ok((config.media.max_sessions, u64::from(workers)))
}

type Parsed = (String, [Option<SocketAddr>; 2], [Option<SrtpMaster>; 2]);

fn parse(body: &[u8]) -> Result<Parsed, ApiError> {
    let req: SessionRequest =
        serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_slice(body))
            .map_err(|e| {
                let path = e.path().to_string();
                if path.is_empty() || path == "." {
                    ApiError::bad_request(format!(
                        "the body must be {{\"legs\": [{{\"address\": \"IP:port\"}}, {{...}}], \"label\": \"...\"}}: {}",
                        e.inner()
                    ))
                } else {
                    ApiError::bad_request(format!("{path}: {}", e.inner()))
                }
            })?;
    if req.legs.len() != 2 {
        return Err(ApiError::bad_request(format!(
            "legs: a session has exactly 2 legs, not {}",
            req.legs.len()
        )));
    }
    let mut addresses = [None, None];
    for (i, leg) in req.legs.iter().enumerate() {
        if let Some(text) = &leg.address {
            let a: SocketAddr = text.parse().map_err(|_| {
                ApiError::bad_request(format!("legs[{i}].address: \"{text}\" is not IP:port"))
            })?;
            let ip = a.ip().to_canonical();
            if ip.is_unspecified() || ip.is_multicast() || a.port() == 0 {
                return Err(ApiError::bad_request(format!(
                    "legs[{i}].address: {a} is not a unicast address with a port"
                )));
            }
            addresses[i] = Some(SocketAddr::new(ip, a.port()));
        }
    }
    let mut srtp = [None, None];
    for (i, leg) in req.legs.iter().enumerate() {
        if let Some(k) = &leg.srtp {
            if k.suite != SRTP_SUITE {
                return Err(ApiError::bad_request(format!(
                    "legs[{i}].srtp.suite: \"{}\" is not supported (only {SRTP_SUITE})",
                    k.suite
                )));
            }
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(k.key.trim())
                .ok()
                .and_then(|b| SrtpMaster::try_from(b.as_slice()).ok())
                .ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "legs[{i}].srtp.key: not base64 of 30 bytes (16-byte master key and 14-byte master salt)"
                    ))
                })?;
            srtp[i] = Some(bytes);
        }
    }
    let label = req.label.unwrap_or_default();
    if label.len() > LABEL_MAX || label.chars().any(char::is_control) {
        return Err(ApiError::bad_request(format!(
            "label: at most {LABEL_MAX} bytes, no control characters"
        )));
    }
    Ok((label, addresses, srtp))
}

pub async fn create(State(control): State<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let (max, workers) = check_on(&control)?;
    let (label, addresses, srtp) = parse(&body)?;
    let seg = control.shm.segment();
    let (index, id) = {
        let _one = CREATING.lock().await;
        if seg.media_in_use() >= max {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("media.max_sessions ({max}) sessions are active"),
            ));
        }
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        // Unique across control-plane restarts: the time, and a counter within the process.
        let id = (unix_ms() << 16 | (n & 0xffff)).max(1);
        let worker = n % workers;
        let index = seg
            .media_request(id, worker, unix_ms() / 1000, &label, addresses, srtp)
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "no free media session record",
                )
            })?;
        (index, id)
    };
    let deadline = tokio::time::Instant::now() + CREATE_WAIT;
    loop {
        let Some(r) = seg.media_record(index) else {
            return Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "lost record",
            ));
        };
        match r.state() {
            MEDIA_ACTIVE if r.id() == id => {
                let info = r.read(index).ok_or_else(|| {
                    ApiError::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "session record unreadable",
                    )
                })?;
                tracing::info!(id, label = %info.label, "media session created");
                return Ok((StatusCode::CREATED, Json(describe(&info))).into_response());
            }
            MEDIA_FAILED if r.id() == id => {
                let why = r.read(index).map(|i| i.error).unwrap_or(0);
                r.free();
                return Err(match MediaFailure::from_u64(why) {
                    Some(MediaFailure::Leg0Denied) | Some(MediaFailure::Leg1Denied) => {
                        let leg = usize::from(why == MediaFailure::Leg1Denied as u64);
                        ApiError::new(
                            StatusCode::FORBIDDEN,
                            format!(
                                "legs[{leg}].address: refused by the peer policy (turn.allow_peers / turn.deny_peers)"
                            ),
                        )
                    }
                    Some(MediaFailure::NoRelayAddress) => {
                        ApiError::bad_request("no turn.relay_ip of the family a leg address needs")
                    }
                    Some(MediaFailure::Full) => ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("media.max_sessions ({max}) sessions are active"),
                    ),
                    _ => ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "no free RTP/RTCP port pair in media.ports",
                    ),
                });
            }
            _ => {}
        }
        if tokio::time::Instant::now() > deadline {
            if !seg.media_withdraw(index) && r.id() == id {
                // A worker took it up at the last moment: it settles within its loop turn;
                // undo what it made.
                for _ in 0..200 {
                    match r.state() {
                        MEDIA_ACTIVE => {
                            seg.media_delete(index, id);
                            break;
                        }
                        MEDIA_FAILED => {
                            r.free();
                            break;
                        }
                        _ => tokio::time::sleep(Duration::from_millis(5)).await,
                    }
                }
            }
            return Err(ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "the dataplane did not create the session in time",
            ));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn active(control: &AppState) -> Vec<MediaInfo> {
    let mut all: Vec<MediaInfo> = control
        .shm
        .segment()
        .media_sessions()
        .into_iter()
        .filter(|m| m.state == MEDIA_ACTIVE)
        .collect();
    all.sort_by_key(|m| m.id);
    all
}

fn find(control: &AppState, id: &str) -> Result<MediaInfo, ApiError> {
    let not_found = || ApiError::new(StatusCode::NOT_FOUND, format!("no media session {id}"));
    let n: u64 = id.parse().map_err(|_| not_found())?;
    active(control)
        .into_iter()
        .find(|m| m.id == n)
        .ok_or_else(not_found)
}

/// The list: empty when the relay is off (there is no session then).
pub async fn list(State(control): State<AppState>) -> Json<Value> {
    Json(Value::Array(
        active(&control).iter().map(describe).collect(),
    ))
}

pub async fn get(
    State(control): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(describe(&find(&control, &id)?)))
}

pub async fn remove(
    State(control): State<AppState>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let m = find(&control, &id)?;
    let seg = control.shm.segment();
    if !seg.media_delete(m.index, m.id) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no media session {id}"),
        ));
    }
    let deadline = tokio::time::Instant::now() + CREATE_WAIT;
    while seg
        .media_record(m.index)
        .is_some_and(|r| r.id() == m.id && r.state() != 0)
    {
        if tokio::time::Instant::now() > deadline {
            return Err(ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                format!("the dataplane did not delete media session {id} in time"),
            ));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tracing::info!(id = m.id, "media session deleted through the API");
    Ok(StatusCode::NO_CONTENT)
}

// --- NAT maps ----------------------------------------------------------------------------

fn describe_map(m: &NatMap) -> Value {
    json!({
        "public_ports": m.public_ports.to_string(),
        "internal": m.internal.to_string(),
        "max_bindings": m.max_bindings,
        "idle_timeout": m.idle_timeout.to_string(),
    })
}

pub async fn list_maps(State(control): State<AppState>) -> Json<Value> {
    Json(Value::Array(
        control.config().nat.maps.iter().map(describe_map).collect(),
    ))
}

/// The body of `POST /api/v1/nat/maps`: a `[[nat.maps]]` entry; `public_ports` may be one
/// port.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MapRequest {
    public_ports: serde_json::Value,
    internal: String,
    #[serde(default)]
    max_bindings: Option<usize>,
    #[serde(default)]
    idle_timeout: Option<String>,
}

pub async fn create_map(
    State(control): State<AppState>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req: MapRequest =
        serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_slice(&body))
            .map_err(|e| {
                ApiError::bad_request(format!(
            "the body must be {{\"public_ports\": \"5004-5005\", \"internal\": \"IP:port\"}}: {}",
            e
        ))
            })?;
    let public_ports = match &req.public_ports {
        Value::String(s) if !s.contains('-') => PortRange::parse(&format!("{s}-{s}")),
        Value::String(s) => PortRange::parse(s),
        Value::Number(n) => n
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .ok_or_else(|| format!("{n} is not a port"))
            .and_then(|p| PortRange::new(p, p)),
        other => Err(format!("{other} is not a port range")),
    }
    .map_err(|e| ApiError::bad_request(format!("public_ports: {e}")))?;
    let internal: SocketAddr = req.internal.parse().map_err(|_| {
        ApiError::bad_request(format!("internal: \"{}\" is not IP:port", req.internal))
    })?;
    let idle_timeout = match &req.idle_timeout {
        Some(t) => portico_shared::config::Duration::parse(t)
            .map_err(|e| ApiError::bad_request(format!("idle_timeout: {e}")))?,
        None => portico_shared::config::Duration::from_secs(120),
    };
    let map = NatMap {
        public_ports,
        internal,
        max_bindings: req.max_bindings.unwrap_or(1024),
        idle_timeout,
    };
    let shown = describe_map(&map);
    let applied = control
        .change("api", move |c| {
            let overlaps = |o: &NatMap| {
                o.public_ports.low() <= map.public_ports.high()
                    && map.public_ports.low() <= o.public_ports.high()
            };
            if let Some(o) = c.nat.maps.iter().find(|o| overlaps(o)) {
                return Err(ChangeError::Conflict(format!(
                    "nat.maps: public ports {} overlap the map of {}",
                    map.public_ports, o.public_ports
                )));
            }
            c.nat.maps.push(map);
            Ok(())
        })
        .await?;
    let mut body = shown;
    body["generation"] = json!(applied.generation);
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

pub async fn remove_map(
    State(control): State<AppState>,
    Path(port): Path<String>,
) -> Result<StatusCode, ApiError> {
    let not_found = || {
        ChangeError::NotFound(format!(
            "nat.maps: no map whose first public port is {port}"
        ))
    };
    let first: u16 = port.parse().map_err(|_| ApiError::from(not_found()))?;
    control
        .change("api", move |c| {
            let before = c.nat.maps.len();
            c.nat.maps.retain(|m| m.public_ports.low() != first);
            if c.nat.maps.len() == before {
                return Err(not_found());
            }
            Ok(())
        })
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
