//! `/healthz`, `/metrics` and `/api/v1/status`: how the box is doing.

use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use portico_shared::shm::Driver;
use serde_json::{json, Value};

use super::{ApiError, AppState};
use crate::supervisor;

/// 200 while the dataplane runs with a fresh heartbeat, 503 otherwise (for example during the
/// second a crashed dataplane takes to restart), so a load balancer or DNS health check can
/// steer clients away from a box that is not relaying.
pub async fn healthz(State(control): State<AppState>) -> Response {
    match supervisor::live_dataplane(&control.shm) {
        Some(_) => Json(json!({ "status": "ok" })).into_response(),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "degraded", "error": "the dataplane is not running" })),
        )
            .into_response(),
    }
}

pub async fn metrics(State(control): State<AppState>, headers: HeaderMap) -> Response {
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    match control.metrics.render(accept) {
        Ok((text, ctype)) => (
            [(header::CONTENT_TYPE, HeaderValue::from_static(ctype))],
            text,
        )
            .into_response(),
        Err(_) => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "encoding the metrics failed",
        )
        .into_response(),
    }
}

pub async fn status(State(control): State<AppState>) -> Json<Value> {
    let seg = control.shm.segment();
    let h = &seg.header;
    let now_ms = portico_dataplane::runtime::unix_ms();
    let live = supervisor::live_dataplane(&control.shm);
    let started_ms = h.dataplane_started_ms.load(Ordering::Relaxed);
    let heartbeat_ms = h.dataplane_heartbeat_ms.load(Ordering::Relaxed);
    let driver = Driver::from_u32(h.driver.load(Ordering::Relaxed));
    let workers = h.workers.load(Ordering::Relaxed);
    Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": control.started.elapsed().as_secs(),
        "driver": driver.name(),
        "workers": workers,
        "controlplane": {
            "pid": std::process::id(),
            "uptime_seconds": control.started.elapsed().as_secs(),
        },
        "dataplane": {
            "running": live.is_some(),
            "pid": h.dataplane_pid.load(Ordering::Relaxed),
            "restarts": control.metrics.dataplane_restarts.get(),
            "uptime_seconds": if live.is_some() { now_ms.saturating_sub(started_ms) / 1000 } else { 0 },
            "heartbeat_age_ms": now_ms.saturating_sub(heartbeat_ms),
            "driver": driver.name(),
            "workers": workers,
        },
        "config": {
            "file": control.config_path.display().to_string(),
            "generation": seg.config_generation(),
            "applied_generation": h.config_applied.load(Ordering::Acquire),
        },
    }))
}
