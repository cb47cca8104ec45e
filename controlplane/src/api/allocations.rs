//! `GET /api/v1/turn/allocations`, `DELETE /api/v1/turn/allocations/{id}`: the TURN
//! allocations the dataplane publishes in shared memory, and tearing one down.

use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use portico_shared::shm::AllocInfo;
use serde_json::{json, Value};

use super::{ApiError, AppState};

/// How long a delete waits for the owning worker (it polls every 100 ms).
const DELETE_WAIT: Duration = Duration::from_secs(2);

fn describe(a: &AllocInfo) -> Value {
    json!({
        "id": a.id,
        "client": a.client.to_string(),
        "transport": "udp",
        "relayed": a.relay.to_string(),
        "user": a.username,
        "created_at": a.created_unix,
        "expires_at": a.expires_unix,
        "lifetime_remaining": a.expires_unix.saturating_sub(unix_now()),
        "permissions": a.permissions,
        "channels": a.channels,
        "to_peer": { "packets": a.packets_to_peer, "bytes": a.bytes_to_peer },
        "to_client": { "packets": a.packets_to_client, "bytes": a.bytes_to_client },
    })
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub async fn list(State(control): State<AppState>) -> Json<Value> {
    let mut all = control.shm.segment().allocations();
    all.sort_by_key(|a| a.id);
    let list: Vec<Value> = all.iter().map(describe).collect();
    Json(json!({ "allocations": list }))
}

pub async fn remove(
    State(control): State<AppState>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id: u64 = id
        .parse()
        .map_err(|_| ApiError::bad_request(format!("\"{id}\" is not an allocation id")))?;
    let seg = control.shm.segment();
    let exists = |id| seg.allocations().iter().any(|a| a.id == id);
    if !exists(id) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no allocation {id}"),
        ));
    }
    if !seg.request_delete(id) {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many deletes pending; try again",
        ));
    }
    let deadline = tokio::time::Instant::now() + DELETE_WAIT;
    while exists(id) {
        if tokio::time::Instant::now() > deadline {
            seg.done_delete(id);
            return Err(ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                format!("the dataplane did not delete allocation {id} in time"),
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tracing::info!(id, "allocation deleted through the API");
    Ok(StatusCode::NO_CONTENT)
}
