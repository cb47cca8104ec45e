//! `/api/v1/fraud/entries`: the blacklist and whitelist shared by the reverse proxy and the
//! TURN server (reference: "Blacklist/Whitelist Details").

use std::net::IpAddr;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{ApiError, AppState};
use crate::fraud::{Entry, Kind};
use portico_shared::shm::BLACKLIST_V6_PREFIXES;

fn describe(e: &Entry) -> Value {
    json!({
        "source": e.source.to_string(),
        "kind": e.kind,
        "origin": e.origin,
        "created_at": e.created_unix,
        "expires_at": e.expires_unix,
        "note": e.note,
    })
}

fn parse_ip(s: &str) -> Result<IpAddr, ApiError> {
    // Accept "2001:db8::/64" as its address: the entry is found by the address.
    let addr = s.split('/').next().unwrap_or(s);
    addr.parse()
        .map_err(|_| ApiError::bad_request(format!("\"{s}\" is not an IP address")))
}

pub async fn list(State(control): State<AppState>) -> Json<Value> {
    let entries: Vec<Value> = control.fraud.entries().iter().map(describe).collect();
    Json(json!({ "entries": entries }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewEntry {
    /// An address; for IPv6 optionally with a prefix length ("2001:db8::/64").
    ip: String,
    kind: Kind,
    /// Seconds from now, 1 to [`MAX_TTL`]; absent: until removed.
    #[serde(default)]
    ttl_seconds: Option<u64>,
    #[serde(default)]
    note: String,
}

/// Longest `ttl_seconds` of a manual entry: ten years. A longer one is a mistake (or an
/// overflow waiting to happen); an entry meant to stay is made without `ttl_seconds`.
pub const MAX_TTL: u64 = 10 * 365 * 86_400;

/// Longest note, in characters.
pub const MAX_NOTE_CHARS: usize = 256;

/// `ttl_seconds`: 0 is refused rather than read as "permanent" or "already expired", since
/// either reading would surprise someone; absent means permanent.
fn check_ttl(ttl: u64) -> Result<u64, ApiError> {
    if ttl == 0 || ttl > MAX_TTL {
        return Err(ApiError::bad_request(format!(
            "ttl_seconds: {ttl} is not between 1 and {MAX_TTL} (ten years); leave it out for an entry that stays until removed"
        )));
    }
    Ok(ttl)
}

/// Notes end up in logs, the API and the state file: printable text of bounded length.
fn check_note(note: &str) -> Result<(), ApiError> {
    if note.chars().count() > MAX_NOTE_CHARS {
        return Err(ApiError::bad_request(format!(
            "note: at most {MAX_NOTE_CHARS} characters"
        )));
    }
    if let Some(c) = note.chars().find(|c| c.is_control()) {
        return Err(ApiError::bad_request(format!(
            "note: control character U+{:04X} is not allowed",
            u32::from(c)
        )));
    }
    Ok(())
}

pub async fn create(State(control): State<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let e: NewEntry = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(format!(
            "the body must be {{\"ip\", \"kind\": \"black\"|\"white\", \"ttl_seconds\"?, \"note\"?}}: {e}"
        ))
    })?;
    let ip = parse_ip(&e.ip)?;
    let prefix = match e.ip.split_once('/') {
        Some((_, p)) => Some(entry_prefix(&e.ip, ip, p, e.kind)?),
        None => None,
    };
    if e.kind == Kind::White {
        if let Some(p) = prefix {
            let (used, max) = control.fraud.white_ranges();
            let is_range = !is_probed(ip, p);
            if is_range && used >= max && control.fraud.exact(ip, p).is_none() {
                return Err(ApiError::bad_request(format!(
                    "\"{}\": at most {max} whitelist entries may be ranges",
                    e.ip
                )));
            }
        }
    }
    check_note(&e.note)?;
    let ttl = e.ttl_seconds.map(check_ttl).transpose()?;
    // Rounded up to the next second, so the entry lasts at least `ttl_seconds`.
    let expires = ttl.map(|t| unix_now().saturating_add(t).saturating_add(1));
    let entry = control.fraud.add(ip, prefix, e.kind, expires, e.note);
    Ok((StatusCode::CREATED, Json(describe(&entry))).into_response())
}

pub async fn remove(
    State(control): State<AppState>,
    Path(ip): Path<String>,
) -> Result<StatusCode, ApiError> {
    let addr = parse_ip(&ip)?;
    // "ip/prefix" names exactly that entry (a whitelist range); a bare address finds the
    // entry that covers it.
    let found = match ip.split_once('/').map(|(_, p)| p.parse::<u8>()) {
        Some(Ok(p)) => control.fraud.remove_exact(addr, p),
        Some(Err(_)) => {
            return Err(ApiError::bad_request(format!(
                "\"{ip}\": the prefix length is not a number"
            )))
        }
        None => control.fraud.remove(addr),
    };
    match found {
        Some(_) => Ok(StatusCode::NO_CONTENT),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no entry for {ip}"),
        )),
    }
}

pub async fn whitelist(
    State(control): State<AppState>,
    Path(ip): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let addr = parse_ip(&ip)?;
    match control.fraud.whitelist(addr) {
        Some(e) => Ok(Json(describe(&e))),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no entry for {ip}"),
        )),
    }
}

/// Whether the dataplane's blacklist probes this prefix (IPv4: single addresses).
fn is_probed(ip: IpAddr, prefix: u8) -> bool {
    if ip.to_canonical().is_ipv4() {
        prefix == 32
    } else {
        BLACKLIST_V6_PREFIXES.contains(&prefix)
    }
}

/// The prefix length of a new entry. Blacklist entries: only prefixes the dataplane probes on
/// its packet path (IPv4 single addresses; IPv6 /48, /56, /64, /128). Whitelist entries: any
/// block (an office's public /28), but not wider than /8 (IPv4) or /16 (IPv6) — to switch
/// automatic blacklisting off, set `fraud.suspicious_per_minute = 0` instead.
fn entry_prefix(text: &str, ip: IpAddr, p: &str, kind: Kind) -> Result<u8, ApiError> {
    let v4 = ip.to_canonical().is_ipv4();
    let len = p.parse::<u8>().ok();
    match kind {
        Kind::Black => {
            let allowed: &[u8] = if v4 { &[32] } else { &BLACKLIST_V6_PREFIXES };
            len.filter(|p| allowed.contains(p)).ok_or_else(|| {
                ApiError::bad_request(format!(
                    "\"{text}\": a blacklist entry's prefix length must be one of {allowed:?}"
                ))
            })
        }
        Kind::White => {
            let (min, max) = if v4 { (8, 32) } else { (16, 128) };
            len.filter(|p| (min..=max).contains(p)).ok_or_else(|| {
                ApiError::bad_request(format!(
                    "\"{text}\": a whitelist entry's prefix length must be {min}..={max}"
                ))
            })
        }
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_is_bounded_and_zero_refused() {
        assert!(check_ttl(0).is_err());
        assert_eq!(check_ttl(1).unwrap(), 1);
        assert_eq!(check_ttl(MAX_TTL).unwrap(), MAX_TTL);
        assert!(check_ttl(MAX_TTL + 1).is_err());
        let e = check_ttl(u64::MAX).unwrap_err();
        assert!(e.message.starts_with("ttl_seconds: "), "{}", e.message);
    }

    #[test]
    fn notes_are_printable_and_short() {
        check_note("").unwrap();
        check_note("brute force from a hotel; ticket #42 \u{e9}").unwrap();
        check_note(&"\u{e9}".repeat(MAX_NOTE_CHARS)).unwrap();
        assert!(check_note(&"a".repeat(MAX_NOTE_CHARS + 1)).is_err());
        for bad in [
            "a\nb",
            "\u{1b}[31mred",
            "tab\there",
            "nul\0",
            "\u{7f}",
            "\u{85}",
        ] {
            let e = check_note(bad).unwrap_err();
            assert!(e.message.starts_with("note: control character"), "{bad:?}");
        }
    }
}
