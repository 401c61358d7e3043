//! The HTTP API v1: routes, state and the service routes (`/healthz`, `/readyz`,
//! `/openapi.json`). Handlers translate HTTP to calls on [`Service`] and back; they decide
//! nothing about locks.

pub mod elections;
pub mod error;
pub mod extract;
pub mod groups;
pub mod leases;
pub mod locks;
pub mod serve;
pub mod streams;
pub mod tls;
pub mod ui;

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::{OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::admission::RequestKind;
use crate::metrics;
use crate::service::Service;
use axum::extract::MatchedPath;
use error::ApiError;
pub use extract::{Limits, MAX_BODY_BYTES};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// What every handler gets.
#[derive(Clone)]
pub struct AppState {
    /// The lease-and-lock service.
    pub service: Service,
    /// Bounds on TTLs and waits.
    pub limits: Limits,
    /// Who may call, by bearer token (open when the server has no auth file).
    pub tenants: crate::tenants::Tenants,
    /// The bound on sessions open through this replica (`--max-sessions`).
    pub(crate) sessions: crate::sessions::SessionCap,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Leasehold",
        description = "Fencing-token locks and TTL leases, kept in etcd. Errors are `{\"error\":{\"code\",\"message\"}}` with a stable code. Operations on a lease, and on locks held under it, need the lease's secret handle (returned when the lease is granted) in the `Leasehold-Handle` header. With an auth file, every request needs `Authorization: Bearer <token>`."
    ),
    tags(
        (name = "leases", description = "TTL leases that locks are held under"),
        (name = "locks", description = "FIFO locks with fencing tokens: mutexes, semaphores, read-write locks, groups"),
        (name = "elections", description = "Leader election on the lock queue; the leader's token is its epoch"),
        (name = "service", description = "Health, readiness and this document"),
    )
)]
struct ApiDoc;

/// The router and the OpenAPI document generated from the same route list.
pub fn router_and_openapi(state: AppState) -> (Router, serde_json::Value) {
    // Install the recorder now: metrics recorded before it exists are lost.
    metrics::handle();
    let (router, openapi) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(leases::grant_lease, leases::list_leases))
        .routes(routes!(locks::list_locks))
        .routes(routes!(ui::status_page))
        .routes(routes!(leases::keep_lease_alive))
        .routes(routes!(leases::show_lease, leases::revoke_lease))
        .routes(routes!(
            groups::acquire_group,
            groups::status_of_lock_named_acquire
        ))
        .routes(routes!(
            groups::release_group,
            groups::status_of_lock_named_release
        ))
        .routes(routes!(locks::acquire_lock))
        .routes(routes!(locks::renew_lock))
        .routes(routes!(locks::release_lock))
        .routes(routes!(locks::lock_status))
        .routes(routes!(streams::watch_lock))
        .routes(routes!(streams::watch_all))
        .routes(routes!(elections::campaign))
        .routes(routes!(elections::resign))
        .routes(routes!(elections::leader))
        .routes(routes!(streams::observe))
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(openapi_json))
        .routes(routes!(prometheus_metrics))
        .split_for_parts();
    let mut openapi = serde_json::to_value(&openapi).expect("the OpenAPI document is JSON");
    streams::describe_event_streams(&mut openapi);
    let document = Arc::new(openapi.clone());
    let router = router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(reject_large_bodies))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn(observe))
        .layer(axum::Extension(document))
        .with_state(state);
    (router, openapi)
}

/// The HTTP application.
pub fn app(state: AppState) -> Router {
    router_and_openapi(state).0
}

/// Rejects a declared body over the limit before any handler runs, whether or not the route
/// reads a body (streamed bodies are cut by [`DefaultBodyLimit`] in the extractor).
async fn reject_large_bodies(request: Request, next: Next) -> Response {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > MAX_BODY_BYTES as u64) {
        return ApiError::BodyTooLarge(MAX_BODY_BYTES).into_response();
    }
    next.run(request).await
}

async fn not_found(request: Request) -> ApiError {
    let path = request.uri().path();
    // `/v1/locks//acquire`: the empty name matches no route, but it is a bad name, not a bad
    // route.
    if let Some(rest) = path.strip_prefix("/v1/locks/")
        && (rest.is_empty() || rest.starts_with('/'))
    {
        return ApiError::InvalidName("lock name must not be empty".into());
    }
    ApiError::NotFound(path.to_owned())
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// One span per request (method, route template, status, latency; handlers add lock, lease and
/// token), and the HTTP metrics.
async fn observe(request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |path| path.as_str())
        .to_owned();
    let span = tracing::info_span!(
        "http_request",
        otel.name = %format!("{method} {route}"),
        otel.kind = "server",
        http.method = %method,
        http.route = %route,
        http.status = tracing::field::Empty,
        latency_ms = tracing::field::Empty,
        lock = tracing::field::Empty,
        lease_id = tracing::field::Empty,
        token = tracing::field::Empty,
    );
    // Continue the caller's trace when it sent a W3C `traceparent` (a no-op unless OTLP export
    // is on: the default propagator extracts nothing).
    let parent = opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.extract(&HeaderExtractor(request.headers()))
    });
    let _ = span.set_parent(parent);
    let started = std::time::Instant::now();
    // Only requests that add work may be shed; releases, renewals, keep-alives and revokes
    // finish it, and go first.
    let kind = if method == axum::http::Method::POST
        && (route == "/v1/leases" || route.ends_with("/acquire"))
    {
        RequestKind::AddsWork
    } else if method == axum::http::Method::DELETE
        || (method == axum::http::Method::POST
            && ["/release", "/renew", "/keepalive", "/resign"]
                .iter()
                .any(|end| route.ends_with(end)))
    {
        RequestKind::FinishesWork
    } else {
        RequestKind::Other
    };
    let response =
        crate::admission::request_scope(kind, next.run(request).instrument(span.clone())).await;
    let status = response.status().as_u16();
    let elapsed = started.elapsed();
    span.record("http.status", status);
    span.record("latency_ms", elapsed.as_secs_f64() * 1000.0);
    span.in_scope(|| tracing::debug!(status, "answered"));
    metrics::http_request(method.as_str(), &route, status, elapsed);
    response
}

/// Reads propagation headers (`traceparent`, `tracestate`) from a request.
struct HeaderExtractor<'a>(&'a axum::http::HeaderMap);

impl opentelemetry::propagation::Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|key| key.as_str()).collect()
    }
}

/// Prometheus text exposition of the server's metrics.
#[utoipa::path(get, path = "/metrics", tag = "service",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
async fn prometheus_metrics() -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        metrics::render(),
    )
}

/// Health and readiness answers.
#[derive(Debug, Serialize, ToSchema)]
pub struct StatusBody {
    /// `ok`, `ready` or `not_ready`.
    pub status: &'static str,
}

/// The process is up.
#[utoipa::path(get, path = "/healthz", tag = "service",
    responses((status = 200, description = "Process is up", body = StatusBody)))]
async fn healthz() -> Json<StatusBody> {
    Json(StatusBody { status: "ok" })
}

/// etcd answers a linearizable read, so locks can be granted.
#[utoipa::path(get, path = "/readyz", tag = "service",
    responses(
        (status = 200, description = "etcd answers", body = StatusBody),
        (status = 503, description = "etcd does not answer", body = StatusBody),
    ))]
async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<StatusBody>) {
    if state.service.is_ready().await {
        (StatusCode::OK, Json(StatusBody { status: "ready" }))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(StatusBody {
                status: "not_ready",
            }),
        )
    }
}

/// This OpenAPI 3 document, generated from the routes the server serves.
#[utoipa::path(get, path = "/openapi.json", tag = "service",
    responses((status = 200, description = "OpenAPI 3 document")))]
async fn openapi_json(
    axum::Extension(document): axum::Extension<Arc<serde_json::Value>>,
) -> Json<serde_json::Value> {
    Json((*document).clone())
}
