//! The REST API on `api.listen`: JSON under `/api/v1/`, plus `/healthz` and `/metrics`.
//!
//! Every call but `/healthz` and `/metrics` needs `Authorization: Bearer <admin token>`; the
//! check runs in front of the router, so unknown paths answer 401 too and reveal nothing to a
//! caller without the token. Errors are always `{"error": "..."}`. The routes are one table,
//! [`routes`], so the OpenAPI document (`openapi.json`, served at `/api/v1/openapi.json`) can
//! be checked against it.

mod allocations;
mod config;
mod credentials;
mod fraud;
mod status;
mod users;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Request, State};
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
    r.fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(Arc::clone(&control), auth))
        .with_state(control)
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

async fn auth(State(control): State<AppState>, req: Request, next: Next) -> Response {
    if PUBLIC.contains(&req.uri().path()) {
        return next.run(req).await;
    }
    let presented = bearer(req.headers());
    if presented.is_some_and(|t| same_secret(t.as_bytes(), control.token.as_bytes())) {
        return next.run(req).await;
    }
    control.metrics.api_auth_failures.inc();
    let source = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(a)| a.to_string())
        .unwrap_or_else(|| "unknown".into());
    let reason = if presented.is_some() {
        "wrong token"
    } else {
        "no bearer token"
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
