//! `GET/POST /api/v1/turn/users`, `DELETE /api/v1/turn/users/{name}`: the long-term TURN
//! credentials in `turn.users`. Passwords and keys are write-only: listing shows only which
//! form a user has, so the API never hands a secret back out.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use portico_shared::config::TurnUser;
use serde_json::{json, Value};

use super::{ApiError, AppState};
use crate::control::ChangeError;

fn describe(u: &TurnUser) -> Value {
    json!({
        "name": u.name,
        "credential": if u.key.is_some() { "key" } else { "password" },
    })
}

pub async fn list(State(control): State<AppState>) -> Json<Value> {
    let users: Vec<Value> = control.config().turn.users.iter().map(describe).collect();
    Json(json!({ "users": users }))
}

pub async fn create(State(control): State<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let user: TurnUser =
        serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_slice(&body))
            .map_err(|e| {
                let path = e.path().to_string();
                if path.is_empty() || path == "." {
                    ApiError::bad_request(format!(
                        "the body must be {{\"name\", \"password\"}} or {{\"name\", \"key\"}}: {}",
                        e.inner()
                    ))
                } else {
                    ApiError::bad_request(format!("{path}: {}", e.inner()))
                }
            })?;
    let shown = describe(&user);
    let name = user.name.clone();
    let shared = user.clone();
    let applied = control
        .change("api", move |c| {
            if c.turn.users.iter().any(|u| u.name == user.name) {
                return Err(ChangeError::Conflict(format!(
                    "turn.users: user \"{}\" already exists; delete it first to change its password",
                    user.name
                )));
            }
            c.turn.users.push(user);
            Ok(())
        })
        .await?;
    crate::fleet::user_changed(crate::fleet::UserOp::Put(shared));
    tracing::info!(user = %name, "TURN user added");
    let mut body = shown;
    body["generation"] = json!(applied.generation);
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

pub async fn remove(
    State(control): State<AppState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    let who = name.clone();
    control
        .change("api", move |c| {
            let before = c.turn.users.len();
            c.turn.users.retain(|u| u.name != name);
            if c.turn.users.len() == before {
                return Err(ChangeError::NotFound(format!(
                    "turn.users: no user \"{name}\""
                )));
            }
            Ok(())
        })
        .await?;
    crate::fleet::user_changed(crate::fleet::UserOp::Delete(who.clone()));
    tracing::info!(user = %who, "TURN user deleted");
    Ok(StatusCode::NO_CONTENT)
}
