//! `POST /api/v1/turn/credentials`: time-limited TURN credentials from the shared secret, as
//! in the "TURN REST API" draft (draft-uberti-behave-turn-rest): the username is
//! `<expiry unix time>:<name>` and the password is base64(HMAC-SHA1(secret, username)), so any
//! Portico box holding the same secret accepts them without shared state.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use portico_dataplane::turn::auth::rest_password;
use portico_shared::config::Config;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{ApiError, AppState};

const DEFAULT_TTL: u64 = 86_400;
/// Longest lifetime handed out: a leaked credential must not stay good for long.
const MAX_TTL: u64 = 30 * 86_400;
/// STUN caps USERNAME at 513 bytes (RFC 8489 section 14.3).
const MAX_USERNAME: usize = 513;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Request {
    #[serde(default)]
    name: String,
    #[serde(default = "default_ttl")]
    ttl_seconds: u64,
}

fn default_ttl() -> u64 {
    DEFAULT_TTL
}

pub async fn create(State(control): State<AppState>, body: Bytes) -> Result<Json<Value>, ApiError> {
    let req: Request = if body.iter().all(u8::is_ascii_whitespace) {
        Request {
            name: String::new(),
            ttl_seconds: DEFAULT_TTL,
        }
    } else {
        serde_json::from_slice(&body).map_err(|e| ApiError::bad_request(format!("body: {e}")))?
    };
    if req.ttl_seconds == 0 || req.ttl_seconds > MAX_TTL {
        return Err(ApiError::bad_request(format!(
            "ttl_seconds: {} is not between 1 and {MAX_TTL}",
            req.ttl_seconds
        )));
    }
    let config = control.config();
    let Some(secret) = config.turn.shared_secret.first() else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "turn.shared_secret is not set: TURN REST API credentials need it",
        ));
    };
    let expiry = portico_dataplane::runtime::unix_ms() / 1000 + req.ttl_seconds;
    let username = if req.name.is_empty() {
        expiry.to_string()
    } else {
        format!("{expiry}:{}", req.name)
    };
    if username.len() > MAX_USERNAME {
        return Err(ApiError::bad_request(format!(
            "name: the username would be {} bytes, STUN allows {MAX_USERNAME}",
            username.len()
        )));
    }
    let password = rest_password(secret.as_bytes(), username.as_bytes());
    Ok(Json(json!({
        "username": username,
        "password": password,
        "ttl": req.ttl_seconds,
        "expires_at": expiry,
        "uris": uris(&config),
    })))
}

/// The address a client should use for each listen address: the external (NAT) address when
/// one of the same family is configured, else the listen address, else the relay address;
/// a wildcard listen address with nothing specific to advertise falls back to the host name.
fn uris(config: &Config) -> Vec<String> {
    let t = &config.turn;
    let same_family =
        |a: Option<IpAddr>, like: &SocketAddr| a.filter(|ip| ip.is_ipv4() == like.is_ipv4());
    let mut hosts: BTreeSet<(String, u16)> = BTreeSet::new();
    for l in &t.listen {
        let ip = same_family(t.external_ip, l)
            .or_else(|| (!l.ip().is_unspecified()).then_some(l.ip()))
            .or_else(|| {
                t.relay_ip
                    .iter()
                    .copied()
                    .find(|ip| ip.is_ipv4() == l.is_ipv4() && !ip.is_unspecified())
            });
        match ip {
            Some(IpAddr::V6(v6)) => hosts.insert((format!("[{v6}]"), l.port())),
            Some(IpAddr::V4(v4)) => hosts.insert((v4.to_string(), l.port())),
            None => false,
        };
    }
    if hosts.is_empty() {
        let name = nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "localhost".into());
        if let Some(l) = t.listen.first() {
            hosts.insert((name, l.port()));
        }
    }
    let mut out = Vec::new();
    for (host, port) in &hosts {
        for transport in ["udp", "tcp"] {
            out.push(format!("turn:{host}:{port}?transport={transport}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_prefer_external_then_listen_address() {
        let mut c = Config::default();
        c.turn.listen = vec![
            "192.0.2.1:3478".parse().unwrap(),
            "[2001:db8::1]:3479".parse().unwrap(),
        ];
        assert_eq!(
            uris(&c),
            vec![
                "turn:192.0.2.1:3478?transport=udp",
                "turn:192.0.2.1:3478?transport=tcp",
                "turn:[2001:db8::1]:3479?transport=udp",
                "turn:[2001:db8::1]:3479?transport=tcp",
            ]
        );
        c.turn.external_ip = Some("203.0.113.7".parse().unwrap());
        c.turn.listen = vec![
            "0.0.0.0:3478".parse().unwrap(),
            "[::]:3478".parse().unwrap(),
        ];
        assert_eq!(
            uris(&c),
            vec![
                "turn:203.0.113.7:3478?transport=udp",
                "turn:203.0.113.7:3478?transport=tcp",
            ]
        );
    }
}
