//! `GET/PUT/PATCH /api/v1/config`: the whole configuration, as JSON or TOML.
//!
//! `PUT` replaces the configuration: keys left out take their defaults, except `state_dir`,
//! which keeps the running value (it cannot change while Portico runs). `PATCH` is a JSON
//! merge patch (RFC 7396) on the running configuration, for changing one key with one line of
//! curl. Either way the result is validated whole before anything is written.
//!
//! Secrets (TURN users' passwords and keys, `turn.shared_secret`) are never shown: GET and
//! the answers to PUT/PATCH carry `"<redacted>"` ([`portico_shared::config::REDACTED`]) in
//! their place, and that placeholder sent back keeps the current value, so a GET-edit-PUT
//! round trip loses no secret.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use portico_shared::config::Config;
use serde_json::{json, Value};

use super::{ApiError, AppState};
use crate::control::{Applied, ChangeError};

const TOML_TYPE: &str = "application/toml";

fn wants_toml(value: Option<&HeaderValue>) -> bool {
    value.and_then(|v| v.to_str().ok()).is_some_and(|v| {
        let v = v.to_ascii_lowercase();
        v.contains("application/toml") || v.contains("text/toml") || v.contains("text/x-toml")
    })
}

pub async fn get_config(
    State(control): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let config = control.config().redacted();
    if q.get("format").map(String::as_str) == Some("toml")
        || wants_toml(headers.get(header::ACCEPT))
    {
        (
            [(header::CONTENT_TYPE, HeaderValue::from_static(TOML_TYPE))],
            config.to_toml(),
        )
            .into_response()
    } else {
        Json(config).into_response()
    }
}

pub async fn put_config(
    State(control): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let running_state_dir = control.config().state_dir;
    let new = if wants_toml(headers.get(header::CONTENT_TYPE)) {
        from_toml(&body, &running_state_dir)?
    } else {
        let mut value: Value = serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad_request(format!("the body is not JSON: {e}")))?;
        let Some(obj) = value.as_object_mut() else {
            return Err(ApiError::bad_request(
                "the body must be a JSON object holding the configuration",
            ));
        };
        obj.entry("state_dir")
            .or_insert_with(|| json!(running_state_dir));
        from_json(value)?
    };
    let applied = control
        .change("api", move |c| {
            let mut new = new;
            new.restore_secrets(c)
                .map_err(|e| ChangeError::Invalid(e.to_string()))?;
            *c = new;
            Ok(())
        })
        .await?;
    Ok(Json(applied_json(&applied)))
}

pub async fn patch_config(
    State(control): State<AppState>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let patch: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("the body is not JSON: {e}")))?;
    if !patch.is_object() {
        return Err(ApiError::bad_request(
            "the body must be a JSON object (a JSON merge patch, RFC 7396)",
        ));
    }
    let applied = control
        .change("api", move |c| {
            let mut value = serde_json::to_value(&*c).map_err(|e| {
                ChangeError::Internal(format!("serialising the configuration: {e}"))
            })?;
            merge_patch(&mut value, &patch);
            let mut new = from_json(value).map_err(|e| ChangeError::Invalid(e.message))?;
            new.restore_secrets(c)
                .map_err(|e| ChangeError::Invalid(e.to_string()))?;
            *c = new;
            Ok(())
        })
        .await?;
    Ok(Json(applied_json(&applied)))
}

pub fn applied_json(a: &Applied) -> Value {
    json!({
        "generation": a.generation,
        "dataplane_applied": a.dataplane_applied,
        "restart_required": a.restart_required,
        "config": a.config.redacted(),
    })
}

/// Deserialises with the path of the offending key in the message (`turn.relay_ports: ...`).
fn from_json(value: Value) -> Result<Config, ApiError> {
    serde_path_to_error::deserialize(value).map_err(|e| key_error(e.path().to_string(), e.inner()))
}

fn from_toml(body: &[u8], running_state_dir: &std::path::Path) -> Result<Config, ApiError> {
    let text = std::str::from_utf8(body)
        .map_err(|_| ApiError::bad_request("the TOML body is not UTF-8"))?;
    let mut table: toml::Table = toml::from_str(text)
        .map_err(|e| ApiError::bad_request(e.to_string().trim_end().to_string()))?;
    if !table.contains_key("state_dir") {
        table.insert(
            "state_dir".into(),
            toml::Value::String(running_state_dir.display().to_string()),
        );
    }
    serde_path_to_error::deserialize(toml::Value::Table(table))
        .map_err(|e| key_error(e.path().to_string(), e.inner()))
}

fn key_error(path: String, e: &impl std::fmt::Display) -> ApiError {
    if path.is_empty() || path == "." {
        ApiError::bad_request(e.to_string())
    } else {
        ApiError::bad_request(format!("{path}: {e}"))
    }
}

/// RFC 7396: objects merge key by key, `null` removes a key (so it takes its default), any
/// other value replaces.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Default::default());
    }
    if let Value::Object(t) = target {
        for (k, v) in p {
            if v.is_null() {
                t.remove(k);
            } else {
                merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_patch_follows_rfc_7396() {
        let mut v = json!({"a": 1, "b": {"c": 2, "d": 3}, "e": [1, 2]});
        merge_patch(
            &mut v,
            &json!({"b": {"c": null, "x": 9}, "e": [3], "f": "new"}),
        );
        assert_eq!(
            v,
            json!({"a": 1, "b": {"d": 3, "x": 9}, "e": [3], "f": "new"})
        );
    }

    #[test]
    fn json_errors_name_the_key() {
        let e = from_json(json!({"turn": {"listen_on": []}})).unwrap_err();
        assert!(
            e.message.starts_with("turn.listen_on: unknown field"),
            "{}",
            e.message
        );
        let e = from_json(json!({"turn": {"workers": "many"}})).unwrap_err();
        assert!(e.message.starts_with("turn.workers: "), "{}", e.message);
    }

    /// CIDR lists, port ranges and durations are checked by deserialising them, from JSON
    /// as from TOML, and the canonical form the API shows reads back as the same value.
    #[test]
    fn typed_values_from_json_name_the_key_and_round_trip() {
        let e = from_json(json!({"fraud": {"whitelist": ["192.0.2.1", "nope"]}})).unwrap_err();
        assert_eq!(
            e.message,
            "fraud.whitelist[1]: \"nope\" is not an IP address or CIDR block"
        );
        let e = from_json(json!({"turn": {"relay_ports": "70000-80000"}})).unwrap_err();
        assert_eq!(
            e.message,
            "turn.relay_ports: \"70000-80000\" is not a port range (1-65535)"
        );
        let e = from_json(json!({"proxy": {"limits": {"idle_timeout": "soon"}}})).unwrap_err();
        assert!(
            e.message
                .starts_with("proxy.limits.idle_timeout: \"soon\" is not a duration"),
            "{}",
            e.message
        );
        let c = from_json(json!({
            "turn": {"nonce_lifetime": 120, "max_lifetime": "2h", "allow_peers": ["10.1.2.3/16"]},
            "fraud": {"blacklist_minutes": 5},
        }))
        .unwrap();
        assert_eq!(c.turn.nonce_lifetime.as_secs(), 120);
        assert_eq!(c.turn.max_lifetime.as_secs(), 7200);
        assert_eq!(c.fraud.blacklist_minutes.as_secs(), 300);
        let shown = serde_json::to_value(&c).unwrap();
        assert_eq!(shown["turn"]["nonce_lifetime"], "2m");
        assert_eq!(shown["turn"]["allow_peers"], json!(["10.1.0.0/16"]));
        assert_eq!(shown["fraud"]["blacklist_minutes"], "5m");
        assert_eq!(from_json(shown).unwrap(), c);
    }

    #[test]
    fn toml_body_keeps_the_running_state_dir() {
        let c = from_toml(b"[turn]\nrealm = \"r\"\n", std::path::Path::new("/x/state")).unwrap();
        assert_eq!(c.state_dir, std::path::PathBuf::from("/x/state"));
        assert_eq!(c.turn.realm, "r");
        let e = from_toml(b"[turn]\nbogus = 1\n", std::path::Path::new("/x")).unwrap_err();
        assert!(e.message.starts_with("turn.bogus: "), "{}", e.message);
    }
}
