//! The REST API on `api.listen`: JSON under `/api/v1/`, plus `/healthz` and `/metrics`.
//!
//! Every call but `/healthz` and `/metrics` needs `Authorization: Bearer <admin token>`; the
//! check runs in front of the router, so unknown paths answer 401 too and reveal nothing to a
//! caller without the token. A source that fails authentication [`AUTH_FAILURES`] times
//! within [`AUTH_WINDOW`] gets 429 for the rest of that window, its token not even looked at.
//! Errors are always `{"error": "..."}`, axum's own rejections (a body over [`BODY_LIMIT`], a
//! path parameter that does not decode) included. The routes are one table,
//! [`routes`], so the OpenAPI document (`openapi.json`, served at `/api/v1/openapi.json`) can
//! be checked against it. The admin page ([`admin`], at `/admin/`) is served beside them; its
//! session cookie is the alternative to the bearer token (with a CSRF token on every change).

mod admin;
mod allocations;
mod config;
mod credentials;
mod fraud;
mod media;
mod status;
mod users;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, MethodRouter};
use axum::{Json, Router};
use serde_json::json;

use crate::control::{ChangeError, Control};

/// The OpenAPI 3 description of this API, kept beside the code it describes.
pub const OPENAPI: &str = include_str!("openapi.json");

/// Paths answered without the admin token.
const PUBLIC: [&str; 2] = ["/healthz", "/metrics"];

/// Largest request body: a configuration is far smaller (shared memory holds at most
/// `CONFIG_CAPACITY` bytes of it); a larger body gets 413.
pub const BODY_LIMIT: usize = 2 * 1024 * 1024;

/// Failed authentications one source may have within [`AUTH_WINDOW`]; after that, 429.
pub const AUTH_FAILURES: u32 = 10;
pub const AUTH_WINDOW: Duration = Duration::from_secs(60);
/// Sources whose failures are tracked at once. When full, expired windows go first, then the
/// oldest window: a flood from many addresses can only end other sources' penalties early.
const AUTH_SOURCES: usize = 4096;

/// An error answer: a status and `{"error": message}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({ "error": self.message }))).into_response()
    }
}

impl From<ChangeError> for ApiError {
    fn from(e: ChangeError) -> ApiError {
        let status = match &e {
            ChangeError::Invalid(_) => StatusCode::BAD_REQUEST,
            ChangeError::Conflict(_) => StatusCode::CONFLICT,
            ChangeError::NotFound(_) => StatusCode::NOT_FOUND,
            ChangeError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, e.to_string())
    }
}

type AppState = Arc<Control>;

/// One route: its path (axum and OpenAPI spell parameters the same, `{name}`), the methods it
/// answers, and the handlers.
pub struct Route {
    pub path: &'static str,
    pub methods: &'static [&'static str],
    handler: MethodRouter<AppState>,
}

fn route(
    path: &'static str,
    methods: &'static [&'static str],
    handler: MethodRouter<AppState>,
) -> Route {
    Route {
        path,
        methods,
        handler,
    }
}

/// Every route of the API.
pub fn routes() -> Vec<Route> {
    vec![
        route("/healthz", &["get"], get(status::healthz)),
        route("/metrics", &["get"], get(status::metrics)),
        route("/api/v1/status", &["get"], get(status::status)),
        route("/api/v1/openapi.json", &["get"], get(openapi)),
        route(
            "/api/v1/config",
            &["get", "put", "patch"],
            get(config::get_config)
                .put(config::put_config)
                .patch(config::patch_config),
        ),
        route(
            "/api/v1/turn/users",
            &["get", "post"],
            get(users::list).post(users::create),
        ),
        route(
            "/api/v1/turn/users/{name}",
            &["delete"],
            delete(users::remove),
        ),
        route(
            "/api/v1/turn/credentials",
            &["post"],
            post(credentials::create),
        ),
        route("/api/v1/turn/allocations", &["get"], get(allocations::list)),
        route(
            "/api/v1/turn/allocations/{id}",
            &["delete"],
            delete(allocations::remove),
        ),
        route(
            "/api/v1/media/sessions",
            &["get", "post"],
            get(media::list).post(media::create),
        ),
        route(
            "/api/v1/media/sessions/{id}",
            &["get", "delete"],
            get(media::get).delete(media::remove),
        ),
        route(
            "/api/v1/nat/maps",
            &["get", "post"],
            get(media::list_maps).post(media::create_map),
        ),
        route(
            "/api/v1/nat/maps/{port}",
            &["delete"],
            delete(media::remove_map),
        ),
        route(
            "/api/v1/fraud/entries",
            &["get", "post"],
            get(fraud::list).post(fraud::create),
        ),
        route(
            "/api/v1/fraud/entries/{ip}",
            &["delete"],
            delete(fraud::remove),
        ),
        route(
            "/api/v1/fraud/entries/{ip}/whitelist",
            &["post"],
            post(fraud::whitelist),
        ),
    ]
}

pub fn router(control: AppState) -> Router {
    let mut r = Router::new();
    for route in routes() {
        r = r.route(route.path, route.handler);
    }
    let limiter = Arc::new(AuthLimiter::default());
    let sessions = Arc::new(admin::Sessions::default());
    r = r.merge(admin::router(
        Arc::clone(&control),
        Arc::clone(&sessions),
        Arc::clone(&limiter),
    ));
    r.fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(middleware::from_fn_with_state(
            (Arc::clone(&control), limiter, sessions),
            auth,
        ))
        .layer(middleware::from_fn(json_errors))
        .with_state(control)
}

/// Turns any error answer that is not JSON yet (axum's rejections are plain text: a body over
/// the limit, a path parameter that is not UTF-8) into `{"error": text}`, keeping the status
/// and headers such as `Allow` and `Retry-After`.
async fn json_errors(req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    // Rejection texts are one line; anything longer is cut, not buffered whole.
    let text = match axum::body::to_bytes(body, 4096).await {
        Ok(b) => String::from_utf8_lossy(&b).trim().to_string(),
        Err(_) => String::new(),
    };
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_string()
    } else {
        text
    };
    let mut out = ApiError::new(status, message).into_response();
    for (k, v) in &parts.headers {
        if k != header::CONTENT_TYPE && k != header::CONTENT_LENGTH {
            out.headers_mut().append(k.clone(), v.clone());
        }
    }
    out
}

/// Failed API authentications per source, in fixed windows of [`AUTH_WINDOW`].
#[derive(Default)]
pub struct AuthLimiter {
    table: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

/// The key a source is counted under: IPv4 addresses one by one, IPv6 per /64 (one
/// subscriber usually holds a whole /64).
fn auth_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(bits.into())
        }
        v4 => v4,
    }
}

impl AuthLimiter {
    /// How long `source` must still wait, when it has used up its failures.
    pub fn blocked(&self, source: IpAddr, now: Instant) -> Option<Duration> {
        let t = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        let (start, count) = t.get(&auth_key(source))?;
        let end = *start + AUTH_WINDOW;
        (*count >= AUTH_FAILURES && now < end).then(|| end - now)
    }

    /// Counts a failure; returns the failures of the source in its current window.
    pub fn failed(&self, source: IpAddr, now: Instant) -> u32 {
        let mut t = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        let key = auth_key(source);
        if !t.contains_key(&key) && t.len() >= AUTH_SOURCES {
            t.retain(|_, (start, _)| now < *start + AUTH_WINDOW);
            if t.len() >= AUTH_SOURCES {
                if let Some(oldest) = t
                    .iter()
                    .min_by_key(|(_, (start, _))| *start)
                    .map(|(k, _)| *k)
                {
                    t.remove(&oldest);
                }
            }
        }
        let e = t.entry(key).or_insert((now, 0));
        if now >= e.0 + AUTH_WINDOW {
            *e = (now, 0);
        }
        e.1 = e.1.saturating_add(1);
        e.1
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.table
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

async fn openapi() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        OPENAPI,
    )
        .into_response()
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no such endpoint: {method} {}", uri.path()),
    )
}

/// Whether a concrete path matches a route template (`{x}` matches one segment).
fn matches(template: &str, path: &str) -> bool {
    let (t, p): (Vec<&str>, Vec<&str>) = (template.split('/').collect(), path.split('/').collect());
    t.len() == p.len()
        && t.iter()
            .zip(&p)
            .all(|(t, p)| (t.starts_with('{') && t.ends_with('}') && !p.is_empty()) || t == p)
}

/// 405 with the `Allow` header HTTP requires, taken from the route table.
async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    let allowed: Vec<String> = routes()
        .iter()
        .filter(|r| matches(r.path, uri.path()))
        .flat_map(|r| r.methods.iter().map(|m| m.to_ascii_uppercase()))
        .collect();
    let allow = allowed.join(", ");
    let mut resp = ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!(
            "{method} is not allowed on {}; allowed: {allow}",
            uri.path()
        ),
    )
    .into_response();
    if let Ok(v) = HeaderValue::from_str(&allow) {
        resp.headers_mut().insert(header::ALLOW, v);
    }
    resp
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

/// Compares without an early exit, so the time taken does not tell how much of a guessed
/// token was right.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

type AuthState = (AppState, Arc<AuthLimiter>, Arc<admin::Sessions>);

async fn auth(
    State((control, limiter, sessions)): State<AuthState>,
    req: Request,
    next: Next,
) -> Response {
    if PUBLIC.contains(&req.uri().path()) || admin::is_public(req.uri().path()) {
        return next.run(req).await;
    }
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(a)| *a);
    let now = Instant::now();
    if let Some(wait) = peer.and_then(|p| limiter.blocked(p.ip(), now)) {
        let secs = wait.as_secs().max(1);
        let mut resp = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!("too many failed authentications from this address; try again in {secs} s"),
        )
        .into_response();
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        return resp;
    }
    let presented = bearer(req.headers());
    if presented.is_some_and(|t| same_secret(t.as_bytes(), control.token.as_bytes())) {
        return next.run(req).await;
    }
    // Without a bearer token, the admin page's session cookie (and CSRF token) will do.
    let cookie = match presented {
        Some(_) => admin::CookieAuth::Absent,
        None => admin::check(&sessions, req.method(), req.headers(), now),
    };
    match cookie {
        admin::CookieAuth::Valid => return next.run(req).await,
        admin::CookieAuth::Forbidden(why) => {
            tracing::warn!(
                source = %peer.map(|a| a.to_string()).unwrap_or_else(|| "unknown".into()),
                method = %req.method(),
                path = req.uri().path(),
                "API change refused: {why}"
            );
            return ApiError::new(StatusCode::FORBIDDEN, why).into_response();
        }
        admin::CookieAuth::Absent | admin::CookieAuth::Unknown => {}
    }
    control.metrics.api_auth_failures.inc();
    if let Some(p) = peer {
        if limiter.failed(p.ip(), now) == AUTH_FAILURES {
            tracing::warn!(
                source = %p.ip(),
                "{AUTH_FAILURES} failed API authentications within {} s: answering 429 until the window ends",
                AUTH_WINDOW.as_secs()
            );
        }
    }
    let source = peer
        .map(|a| a.to_string())
        .unwrap_or_else(|| "unknown".into());
    let reason = match (presented, cookie) {
        (Some(_), _) => "wrong token",
        (None, admin::CookieAuth::Unknown) => "unknown or expired admin page session",
        (None, _) => "no bearer token",
    };
    tracing::warn!(
        %source,
        method = %req.method(),
        path = req.uri().path(),
        reason,
        "API authentication failed"
    );
    let mut resp = ApiError::new(
        StatusCode::UNAUTHORIZED,
        "this call needs the header Authorization: Bearer <token from admin.token in the state dir>",
    )
    .into_response();
    resp.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"portico\""),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_is_parsed_case_insensitively() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), None);
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer abc"),
        );
        assert_eq!(bearer(&h), Some("abc"));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("bearer  abc "),
        );
        assert_eq!(bearer(&h), Some("abc"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(bearer(&h), None);
    }

    #[test]
    fn templates_match_one_segment_per_parameter() {
        assert!(matches(
            "/api/v1/turn/users/{name}",
            "/api/v1/turn/users/bob"
        ));
        assert!(!matches("/api/v1/turn/users/{name}", "/api/v1/turn/users/"));
        assert!(!matches(
            "/api/v1/turn/users/{name}",
            "/api/v1/turn/users/a/b"
        ));
        assert!(matches("/api/v1/config", "/api/v1/config"));
        assert!(!matches("/api/v1/config", "/api/v1/status"));
    }

    #[test]
    fn auth_failures_are_limited_per_source_and_window() {
        let l = AuthLimiter::default();
        let t0 = Instant::now();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        for i in 1..AUTH_FAILURES {
            assert_eq!(l.failed(a, t0), i);
            assert_eq!(l.blocked(a, t0), None);
        }
        assert_eq!(l.failed(a, t0), AUTH_FAILURES);
        assert_eq!(l.blocked(a, t0), Some(AUTH_WINDOW));
        let later = t0 + Duration::from_secs(59);
        assert_eq!(l.blocked(a, later), Some(Duration::from_secs(1)));
        assert_eq!(l.blocked(b, later), None, "another source is not affected");
        let after = t0 + AUTH_WINDOW;
        assert_eq!(l.blocked(a, after), None, "the window passed");
        assert_eq!(l.failed(a, after), 1, "a new window starts from zero");
        // IPv6 counts per /64; a v4-mapped address counts as the IPv4 address.
        let v6a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let v6b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        for _ in 0..AUTH_FAILURES {
            l.failed(v6a, t0);
        }
        assert!(l.blocked(v6b, t0).is_some());
        assert!(l.blocked("2001:db8:1:3::1".parse().unwrap(), t0).is_none());
        let mapped: IpAddr = "::ffff:192.0.2.2".parse().unwrap();
        for _ in 0..AUTH_FAILURES {
            l.failed(mapped, t0);
        }
        assert!(l.blocked(b, t0).is_some());
    }

    #[test]
    fn auth_table_is_bounded() {
        let l = AuthLimiter::default();
        let t0 = Instant::now();
        for i in 0..(AUTH_SOURCES as u32 + 100) {
            l.failed(IpAddr::V4((0x0a00_0000u32 + i).into()), t0);
        }
        assert_eq!(l.len(), AUTH_SOURCES);
        // Expired windows are dropped before anything live is evicted.
        let later = t0 + AUTH_WINDOW;
        l.failed("192.0.2.7".parse().unwrap(), later);
        assert_eq!(l.len(), 1);
    }

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abc", b"abd"));
        assert!(!same_secret(b"abc", b"abcd"));
        assert!(!same_secret(b"", b"a"));
    }

    /// The OpenAPI document and the router describe the same set of (path, method) pairs.
    #[test]
    fn openapi_document_matches_the_routes() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).unwrap();
        assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
        let paths = doc["paths"].as_object().unwrap();
        let mut documented: Vec<(String, String)> = Vec::new();
        for (path, item) in paths {
            for method in item.as_object().unwrap().keys() {
                if ["get", "put", "post", "delete", "patch", "head", "options"]
                    .contains(&method.as_str())
                {
                    documented.push((path.clone(), method.clone()));
                }
            }
        }
        let mut routed: Vec<(String, String)> = routes()
            .iter()
            .flat_map(|r| {
                r.methods
                    .iter()
                    .map(|m| (r.path.to_string(), m.to_string()))
            })
            .collect();
        documented.sort();
        routed.sort();
        assert_eq!(documented, routed);
    }
}
