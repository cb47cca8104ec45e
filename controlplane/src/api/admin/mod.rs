//! The admin page at `/admin/`: a login form that takes the admin token, then status, live
//! traffic charts, allocations, the fraud lists, the services and the configuration, all
//! through the `/api/v1` endpoints.
//!
//! A login opens a session ([`session`]): the browser holds its id in the cookie
//! [`COOKIE`] (HttpOnly, SameSite=Strict, Path=/, Secure when the request came over TLS
//! through a proxy that says so with `X-Forwarded-Proto: https`), the page holds the session's
//! CSRF token in memory. The API takes the cookie instead of `Authorization: Bearer`; a
//! request that changes anything (any method but GET and HEAD) must also carry the token in
//! [`CSRF_HEADER`], or it gets 403. The page, its script and style are compiled into the
//! binary and served with a Content-Security-Policy that allows nothing but them and calls to
//! this origin.

pub mod session;

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use std::net::SocketAddr;

use super::{same_secret, ApiError, AppState, AuthLimiter, AUTH_FAILURES};
pub use session::Sessions;

/// The session cookie's name.
pub const COOKIE: &str = "portico_session";
/// The header that carries the CSRF token on every change made with the cookie.
pub const CSRF_HEADER: &str = "x-csrf-token";

const PAGE: &str = include_str!("assets/index.html");
const SCRIPT: &str = include_str!("assets/admin.js");
const STYLE: &str = include_str!("assets/admin.css");

/// Nothing but this origin's script, style and API; no inline script, no framing.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    img-src 'self' data:; connect-src 'self'; form-action 'none'; frame-ancestors 'none'; \
    base-uri 'none'";

/// Largest login body: a token and some JSON around it.
const LOGIN_BODY_LIMIT: usize = 4096;

/// Paths answered without the API's authentication: the page itself, its assets, the login,
/// and the session check (which looks at the cookie itself: a page opened without a session
/// is not a failed authentication).
const PUBLIC: [&str; 6] = [
    "/admin",
    "/admin/",
    "/admin/admin.js",
    "/admin/admin.css",
    "/admin/login",
    "/admin/session",
];

pub fn is_public(path: &str) -> bool {
    PUBLIC.contains(&path)
}

#[derive(Clone)]
struct Admin {
    control: AppState,
    sessions: Arc<Sessions>,
    limiter: Arc<AuthLimiter>,
}

pub fn router<S>(
    control: AppState,
    sessions: Arc<Sessions>,
    limiter: Arc<AuthLimiter>,
) -> Router<S> {
    Router::new()
        .route("/admin", get(redirect))
        .route("/admin/", get(page))
        .route("/admin/admin.js", get(script))
        .route("/admin/admin.css", get(style))
        .route("/admin/login", post(login))
        .route("/admin/logout", post(logout))
        .route("/admin/session", get(current))
        .with_state(Admin {
            control,
            sessions,
            limiter,
        })
}

/// The session id in the request's cookies, if any.
pub fn session_id(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.trim())
        .filter(|v| !v.is_empty())
}

/// How a request without a bearer token fares with its session cookie.
#[derive(Clone, Copy)]
pub enum CookieAuth {
    /// No session cookie.
    Absent,
    /// A cookie naming no live session (unknown, expired, logged out).
    Unknown,
    /// A live session, but a change without its CSRF token or with another one.
    Forbidden(&'static str),
    Valid,
}

pub fn check(
    sessions: &Sessions,
    method: &Method,
    headers: &HeaderMap,
    now: Instant,
) -> CookieAuth {
    let Some(id) = session_id(headers) else {
        return CookieAuth::Absent;
    };
    let Some(csrf) = sessions.check(id, now) else {
        return CookieAuth::Unknown;
    };
    if method == Method::GET || method == Method::HEAD {
        return CookieAuth::Valid;
    }
    match headers.get(CSRF_HEADER).map(HeaderValue::as_bytes) {
        None => CookieAuth::Forbidden(
            "a change made with the admin page's session cookie needs the X-CSRF-Token header",
        ),
        Some(t) if same_secret(t, csrf.as_bytes()) => CookieAuth::Valid,
        Some(_) => CookieAuth::Forbidden("the X-CSRF-Token header does not match the session"),
    }
}

/// The security headers of every admin response.
fn secured(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

fn asset(ctype: &'static str, body: &'static str) -> Response {
    secured(
        (
            [(header::CONTENT_TYPE, HeaderValue::from_static(ctype))],
            body,
        )
            .into_response(),
    )
}

async fn redirect() -> Response {
    secured(
        (
            StatusCode::MOVED_PERMANENTLY,
            [(header::LOCATION, "/admin/")],
        )
            .into_response(),
    )
}

async fn page() -> Response {
    asset("text/html; charset=utf-8", PAGE)
}

async fn script() -> Response {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

async fn style() -> Response {
    asset("text/css; charset=utf-8", STYLE)
}

/// Whether the browser reached us over TLS (through a proxy in front of the API listener,
/// which itself speaks plain HTTP): then the cookie is marked Secure.
fn over_tls(headers: &HeaderMap) -> bool {
    headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("https"))
}

fn cookie(value: &str, max_age: u64, secure: bool) -> HeaderValue {
    let secure = if secure { "; Secure" } else { "" };
    let text =
        format!("{COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}");
    // The value is hex digits or empty: always a valid header value.
    HeaderValue::from_str(&text)
        .unwrap_or_else(|_| HeaderValue::from_static("portico_session=; Path=/; Max-Age=0"))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Login {
    token: String,
}

async fn login(State(admin): State<Admin>, req: Request) -> Result<Response, ApiError> {
    let source = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(a)| *a);
    let (parts, body) = req.into_parts();
    let headers = parts.headers;
    let body = axum::body::to_bytes(body, LOGIN_BODY_LIMIT)
        .await
        .map_err(|e| ApiError::bad_request(format!("reading the body: {e}")))?;
    let now = Instant::now();
    if let Some(wait) = source.and_then(|p| admin.limiter.blocked(p.ip(), now)) {
        let secs = wait.as_secs().max(1);
        let mut resp = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!("too many failed authentications from this address; try again in {secs} s"),
        )
        .into_response();
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        return Ok(resp);
    }
    // JSON only: a form on another site cannot send it without the browser asking first.
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().starts_with("application/json"));
    if !is_json {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "the login takes Content-Type: application/json with {\"token\": \"...\"}",
        ));
    }
    let l: Login = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(format!("the body must be {{\"token\": \"...\"}}: {e}"))
    })?;
    if !same_secret(l.token.trim().as_bytes(), admin.control.token.as_bytes()) {
        admin.control.metrics.api_auth_failures.inc();
        if let Some(p) = source {
            if admin.limiter.failed(p.ip(), now) == AUTH_FAILURES {
                tracing::warn!(source = %p.ip(), "{AUTH_FAILURES} failed API authentications: answering 429 until the window ends");
            }
        }
        tracing::warn!(
            source = %source.map(|a| a.to_string()).unwrap_or_else(|| "unknown".into()),
            "admin page login failed: wrong token"
        );
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "wrong token: the admin token is in admin.token in the state directory",
        ));
    }
    // A session the browser still held is replaced, not left behind.
    if let Some(old) = session_id(&headers) {
        admin.sessions.remove(old);
    }
    let Some(s) = admin.sessions.create(now) else {
        return Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "no random numbers for a session id",
        ));
    };
    tracing::info!(
        source = %source.map(|a| a.to_string()).unwrap_or_else(|| "unknown".into()),
        "admin page login"
    );
    let mut resp = Json(json!({
        "csrf_token": s.csrf,
        "idle_seconds": session::IDLE.as_secs(),
    }))
    .into_response();
    resp.headers_mut().insert(
        header::SET_COOKIE,
        cookie(&s.id, session::LIFETIME.as_secs(), over_tls(&headers)),
    );
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(resp)
}

/// Ends the session (the API's authentication checked the cookie and the CSRF token) and
/// clears the cookie.
async fn logout(State(admin): State<Admin>, headers: HeaderMap) -> Response {
    if let Some(id) = session_id(&headers) {
        if admin.sessions.remove(id) {
            tracing::info!("admin page logout");
        }
    }
    let mut resp = StatusCode::NO_CONTENT.into_response();
    resp.headers_mut()
        .insert(header::SET_COOKIE, cookie("", 0, over_tls(&headers)));
    resp
}

/// The page's CSRF token after a reload (the page keeps it in memory only); 401 without a live
/// session.
async fn current(State(admin): State<Admin>, headers: HeaderMap) -> Result<Response, ApiError> {
    let csrf = session_id(&headers).and_then(|id| admin.sessions.check(id, Instant::now()));
    match csrf {
        Some(csrf) => {
            let mut resp = Json(json!({
                "csrf_token": csrf,
                "idle_seconds": session::IDLE.as_secs(),
            }))
            .into_response();
            resp.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            Ok(resp)
        }
        None => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "no admin page session: log in with POST /admin/login",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn the_session_cookie_is_found_among_others() {
        assert_eq!(session_id(&headers(&[])), None);
        assert_eq!(
            session_id(&headers(&[("cookie", "a=1; portico_session=abc; b=2")])),
            Some("abc")
        );
        assert_eq!(
            session_id(&headers(&[
                ("cookie", "a=1"),
                ("cookie", "portico_session=x")
            ])),
            Some("x")
        );
        assert_eq!(
            session_id(&headers(&[("cookie", "portico_session=")])),
            None
        );
        assert_eq!(
            session_id(&headers(&[("cookie", "xportico_session=abc")])),
            None
        );
    }

    #[test]
    fn changes_need_the_csrf_token_reads_do_not() {
        let s = Sessions::default();
        let now = Instant::now();
        let n = s.create(now).unwrap();
        let c = format!("{COOKIE}={}", n.id);
        assert!(matches!(
            check(&s, &Method::GET, &headers(&[]), now),
            CookieAuth::Absent
        ));
        assert!(matches!(
            check(
                &s,
                &Method::GET,
                &headers(&[("cookie", "portico_session=00")]),
                now
            ),
            CookieAuth::Unknown
        ));
        assert!(matches!(
            check(&s, &Method::GET, &headers(&[("cookie", &c)]), now),
            CookieAuth::Valid
        ));
        for m in [Method::POST, Method::PUT, Method::PATCH, Method::DELETE] {
            assert!(matches!(
                check(&s, &m, &headers(&[("cookie", &c)]), now),
                CookieAuth::Forbidden(_)
            ));
            assert!(matches!(
                check(
                    &s,
                    &m,
                    &headers(&[("cookie", &c), ("x-csrf-token", &n.id)]),
                    now
                ),
                CookieAuth::Forbidden(_)
            ));
            assert!(matches!(
                check(
                    &s,
                    &m,
                    &headers(&[("cookie", &c), ("x-csrf-token", &n.csrf)]),
                    now
                ),
                CookieAuth::Valid
            ));
        }
    }

    #[test]
    fn cookie_attributes() {
        let c = cookie("ab12", 60, false);
        assert_eq!(
            c.to_str().unwrap(),
            "portico_session=ab12; Path=/; HttpOnly; SameSite=Strict; Max-Age=60"
        );
        let c = cookie("ab12", 60, true);
        assert!(c.to_str().unwrap().ends_with("; Secure"));
        assert!(over_tls(&headers(&[("x-forwarded-proto", "HTTPS")])));
        assert!(!over_tls(&headers(&[("x-forwarded-proto", "http")])));
    }
}
