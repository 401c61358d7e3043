//! `/v1/leases` routes.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::AppState;
use super::error::{ApiError, ErrorBody};
use super::extract::{Caller, Fields, JsonObject, LeaseIdPath, MaybeHandle};
use crate::keys::LeaseId;
use crate::service::ServiceError;

/// Adds the lease id to the request's span.
fn record_lease(lease: LeaseId) {
    tracing::Span::current().record("lease_id", lease.to_string());
}

/// Body of `POST /v1/leases`.
#[derive(Debug, Deserialize, ToSchema)]
#[allow(dead_code)] // documents the body; it is read field by field for precise error codes
pub struct GrantLeaseBody {
    /// TTL as a humantime duration (`"10s"`, `"1m30s"`); raised to etcd's minimum if lower.
    #[schema(example = "10s")]
    ttl: String,
    /// Who holds the lease (free text).
    owner: Option<String>,
    /// How long to wait for a place when the server's waiting room is full (`--max-sessions`),
    /// as a humantime duration, at most the server's `--max-wait`; past it the grant is
    /// answered `503 overloaded`. Default 3.5 s; ignored when the server has no waiting room.
    #[schema(example = "10s")]
    wait: Option<String>,
}

/// A lease.
#[derive(Debug, Serialize, ToSchema)]
pub struct LeaseResponse {
    /// Opaque lease id (16 hex digits).
    pub lease_id: String,
    /// The lease's secret handle: every operation on the lease, and on locks held under it,
    /// needs it in the `Leasehold-Handle` header. Keep it secret; the server stores only a
    /// digest. The same value you sent, if you chose it.
    pub handle: String,
    /// The TTL etcd granted, in milliseconds.
    pub ttl_ms: u64,
    /// Who holds it.
    pub owner: Option<String>,
}

/// A refreshed lease.
#[derive(Debug, Serialize, ToSchema)]
pub struct KeepAliveResponse {
    /// The lease.
    pub lease_id: String,
    /// The TTL it was refreshed to, in milliseconds.
    pub ttl_ms: u64,
}

/// Everything known about a lease.
#[derive(Debug, Serialize, ToSchema)]
pub struct LeaseInfoResponse {
    /// The lease.
    pub lease_id: String,
    /// The TTL etcd granted, in milliseconds.
    pub ttl_ms: u64,
    /// Time left before expiry, in milliseconds (whole seconds, as etcd counts).
    pub remaining_ms: u64,
    /// Who holds it.
    pub owner: Option<String>,
    /// Names of the locks held under this lease now.
    pub locks: Vec<String>,
}

/// Grants a lease. Send a `Leasehold-Handle` header of your own (at least 128 random bits) to
/// make the grant idempotent: a retry with the same handle answers the same lease.
#[utoipa::path(post, path = "/v1/leases", tag = "leases",
    params(("Leasehold-Handle" = Option<String>, Header, description = "A handle of your own (at least 128 random bits) makes the grant idempotent; else the server makes one")),
    request_body = GrantLeaseBody,
    responses(
        (status = 201, description = "Lease granted", body = LeaseResponse),
        (status = 400, description = "invalid_json, invalid_ttl, invalid_wait or invalid_request", body = ErrorBody),
        (status = 401, description = "unauthorized", body = ErrorBody),
        (status = 403, description = "forbidden (the handle names a lease being revoked)", body = ErrorBody),
        (status = 413, description = "body_too_large", body = ErrorBody),
        (status = 429, description = "quota_exceeded", body = ErrorBody),
        (status = 503, description = "store_unavailable or overloaded (with Retry-After)", body = ErrorBody),
    ))]
pub async fn grant_lease(
    State(state): State<AppState>,
    Caller(tenant): Caller,
    MaybeHandle(handle): MaybeHandle,
    JsonObject(body): JsonObject,
) -> Result<(StatusCode, Json<LeaseResponse>), ApiError> {
    let fields = Fields(&body);
    let ttl = fields
        .ttl(&state.limits)?
        .ok_or_else(|| ApiError::InvalidTtl("`ttl` is required".into()))?;
    let owner = fields.owner()?;
    let patience = fields
        .wait_if_given(&state.limits)?
        .unwrap_or(crate::sessions::WAITING_ROOM);
    // A new session: let in after the work of open ones, and only while fewer than
    // `--max-sessions` are open here (it may wait, as long as it said, for one to close).
    crate::admission::opens_session();
    let Some(place) = state.sessions.admit(patience).await else {
        crate::metrics::shed();
        return Err(ServiceError::Overloaded(
            "this server has its --max-sessions open; retry later".into(),
        )
        .into());
    };
    let lease = state
        .service
        .grant_lease(&tenant, ttl, owner, handle)
        .await?;
    state
        .sessions
        .opened(place, lease.lease_id, Duration::from_millis(lease.ttl_ms));
    record_lease(lease.lease_id);
    Ok((
        StatusCode::CREATED,
        Json(LeaseResponse {
            lease_id: lease.lease_id.to_string(),
            handle: lease.handle.reveal().to_owned(),
            ttl_ms: lease.ttl_ms,
            owner: lease.owner,
        }),
    ))
}

/// Refreshes a lease to its full TTL.
#[utoipa::path(post, path = "/v1/leases/{lease_id}/keepalive", tag = "leases",
    params(("lease_id" = String, Path, description = "Lease id"), ("Leasehold-Handle" = Option<String>, Header, description = "The lease's secret handle (required)")),
    responses(
        (status = 200, description = "Lease refreshed", body = KeepAliveResponse),
        (status = 400, description = "invalid_request (malformed handle)", body = ErrorBody),
        (status = 401, description = "unauthorized", body = ErrorBody),
        (status = 403, description = "forbidden (missing or wrong handle)", body = ErrorBody),
        (status = 404, description = "lease_not_found", body = ErrorBody),
        (status = 503, description = "store_unavailable or overloaded (with Retry-After)", body = ErrorBody),
    ))]
pub async fn keep_lease_alive(
    State(state): State<AppState>,
    Caller(tenant): Caller,
    LeaseIdPath(lease): LeaseIdPath,
    handle: MaybeHandle,
) -> Result<Json<KeepAliveResponse>, ApiError> {
    record_lease(lease);
    let auth = handle.require_for(&tenant, lease)?;
    let ttl_ms = state.service.keep_lease_alive(&auth).await?;
    state.sessions.renewed(lease, Duration::from_millis(ttl_ms));
    Ok(Json(KeepAliveResponse {
        lease_id: lease.to_string(),
        ttl_ms,
    }))
}

/// Shows a lease: TTL, time left, owner, locks held.
#[utoipa::path(get, path = "/v1/leases/{lease_id}", tag = "leases",
    params(("lease_id" = String, Path, description = "Lease id")),
    responses(
        (status = 200, description = "The lease", body = LeaseInfoResponse),
        (status = 401, description = "unauthorized", body = ErrorBody),
        (status = 404, description = "lease_not_found (also for another tenant's lease)", body = ErrorBody),
        (status = 503, description = "store_unavailable or overloaded (with Retry-After)", body = ErrorBody),
    ))]
pub async fn show_lease(
    State(state): State<AppState>,
    Caller(tenant): Caller,
    LeaseIdPath(lease): LeaseIdPath,
) -> Result<Json<LeaseInfoResponse>, ApiError> {
    record_lease(lease);
    let info = state.service.lease_info(&tenant, lease).await?;
    Ok(Json(LeaseInfoResponse {
        lease_id: info.lease_id.to_string(),
        ttl_ms: info.ttl_ms,
        remaining_ms: info.remaining_ms,
        owner: info.owner,
        locks: info.locks,
    }))
}

/// Revokes a lease: every lock held or awaited under it is freed at once.
#[utoipa::path(delete, path = "/v1/leases/{lease_id}", tag = "leases",
    params(("lease_id" = String, Path, description = "Lease id"), ("Leasehold-Handle" = Option<String>, Header, description = "The lease's secret handle (required)")),
    responses(
        (status = 204, description = "Lease revoked"),
        (status = 400, description = "invalid_request (malformed handle)", body = ErrorBody),
        (status = 401, description = "unauthorized", body = ErrorBody),
        (status = 403, description = "forbidden (missing or wrong handle)", body = ErrorBody),
        (status = 404, description = "lease_not_found", body = ErrorBody),
        (status = 503, description = "store_unavailable or overloaded (with Retry-After)", body = ErrorBody),
    ))]
pub async fn revoke_lease(
    State(state): State<AppState>,
    Caller(tenant): Caller,
    LeaseIdPath(lease): LeaseIdPath,
    handle: MaybeHandle,
) -> Result<StatusCode, ApiError> {
    record_lease(lease);
    let auth = handle.require_for(&tenant, lease)?;
    state.service.revoke_lease(&auth).await?;
    state.sessions.closed(lease);
    Ok(StatusCode::NO_CONTENT)
}

/// One lease in `GET /v1/leases`.
#[derive(Debug, Serialize, ToSchema)]
pub struct LeaseSummaryResponse {
    /// The lease.
    pub lease_id: String,
    /// Who holds it.
    pub owner: Option<String>,
    /// The TTL etcd granted, in milliseconds.
    pub ttl_ms: u64,
}

/// The live leases of the caller's tenant.
#[derive(Debug, Serialize, ToSchema)]
pub struct LeaseListResponse {
    /// At most 1,000.
    pub leases: Vec<LeaseSummaryResponse>,
}

/// Lists the tenant's live leases (at most 1,000; no handles).
#[utoipa::path(get, path = "/v1/leases", tag = "leases",
    responses(
        (status = 200, description = "The live leases", body = LeaseListResponse),
        (status = 401, description = "unauthorized", body = ErrorBody),
        (status = 503, description = "store_unavailable or overloaded", body = ErrorBody),
    ))]
pub async fn list_leases(
    State(state): State<AppState>,
    Caller(tenant): Caller,
) -> Result<Json<LeaseListResponse>, ApiError> {
    let leases = state.service.list_leases(&tenant, 1000).await?;
    Ok(Json(LeaseListResponse {
        leases: leases
            .into_iter()
            .map(|(id, meta)| LeaseSummaryResponse {
                lease_id: id.to_string(),
                owner: meta.owner,
                ttl_ms: meta.ttl_ms,
            })
            .collect(),
    }))
}
