//! `/v1/locks/{name}` routes. `{name}` is the percent-encoded lock name.

use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::AppState;
use super::error::{ApiError, ErrorBody};
use super::extract::{Caller, Fields, JsonObject, LockNamePath, MaybeHandle};
use crate::keys::{LeaseId, LockName};
use crate::lock::{AcquireRequest, LeaseChoice};
use crate::metrics::{self, AcquireResult};
use crate::service::ServiceError;

/// Adds the lock and token to the request's span (see `http::request_span`).
fn record_lock(name: &LockName, token: u64) {
    let span = tracing::Span::current();
    span.record("lock", name.as_str());
    span.record("token", token);
}

/// `success`, `not_holder` or `error`, for the renew and release counters.
fn outcome_label<T>(outcome: &Result<T, ServiceError>, success: &'static str) -> &'static str {
    match outcome {
        Ok(_) => success,
        Err(ServiceError::NotHolder) => "not_holder",
        Err(_) => "error",
    }
}

/// Body of `POST /v1/locks/{name}/acquire`: exactly one of `lease_id` or `ttl`.
#[derive(Debug, Deserialize, ToSchema)]
#[allow(dead_code)] // documents the body; it is read field by field for precise error codes
pub struct AcquireBody {
    /// Hold the lock under this existing lease (kept alive by you); send its handle in the
    /// `Leasehold-Handle` header.
    lease_id: Option<String>,
    /// Or: the server grants a lease of this TTL for the lock (humantime, e.g. `"10s"`).
    #[schema(example = "10s")]
    ttl: Option<String>,
    /// How long to wait in line (humantime); default `"0s"`: try once.
    #[schema(example = "5s")]
    wait: Option<String>,
    /// Who is asking (shown to others while held).
    owner: Option<String>,
    /// A semaphore: up to this many holders at once (every acquirer must give the same).
    #[schema(example = 3)]
    limit: Option<u32>,
    /// A read-write lock: `"shared"` (readers hold together) or `"exclusive"` (a writer).
    #[schema(example = "shared")]
    mode: Option<String>,
    /// Lock-delay (humantime, 0 to 60 s, rounded up to whole seconds; default `"0s"`: none).
    /// After this hold's lease *expires* (not after a release or a revoke), the lock (for a
    /// semaphore, one of its slots) is not granted to anyone for this long. Mutexes and
    /// semaphores only; anything else is `400 invalid_lock_delay`.
    #[schema(example = "5s")]
    lock_delay: Option<String>,
}

/// Body of `renew` and `release` (with the lease's handle in the `Leasehold-Handle` header).
#[derive(Debug, Deserialize, ToSchema)]
#[allow(dead_code)] // documents the body; it is read field by field for precise error codes
pub struct TokenBody {
    /// The fencing token the lock was granted with.
    token: u64,
}

/// A granted lock.
#[derive(Debug, Serialize, ToSchema)]
pub struct AcquireResponse {
    /// The lock name.
    pub name: String,
    /// Fencing token: strictly greater than every token issued before for this lock.
    pub token: u64,
    /// The lease the hold is attached to.
    pub lease_id: String,
    /// For a `ttl` acquire, the new lease's secret handle: renew and release need it (in the
    /// `Leasehold-Handle` header). Shown only here, once.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub handle: Option<String>,
    /// The lease's TTL, in milliseconds.
    pub ttl_ms: u64,
    /// Who holds it.
    pub owner: Option<String>,
}

/// A renewed hold.
#[derive(Debug, Serialize, ToSchema)]
pub struct RenewResponse {
    /// The lock name.
    pub name: String,
    /// The token that still holds it.
    pub token: u64,
    /// The lease that was refreshed.
    pub lease_id: String,
    /// The TTL it was refreshed to, in milliseconds.
    pub ttl_ms: u64,
}

/// A released lock.
#[derive(Debug, Serialize, ToSchema)]
pub struct ReleaseResponse {
    /// Always `true`.
    pub released: bool,
}

/// The holder as shown by `GET /v1/locks/{name}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct HolderResponse {
    /// Who holds it.
    pub owner: Option<String>,
    /// Its fencing token.
    pub token: u64,
    /// The lease it is held under.
    pub lease_id: String,
}

/// One place in a lock's queue (never a handle).
#[derive(Debug, Serialize, ToSchema)]
pub struct QueueEntryResponse {
    /// Its place: 0 for the first holder; waiters count up from the number of holders.
    pub position: usize,
    /// Its token (the one it holds with, or will get when granted).
    pub token: u64,
    /// The lease it waits or holds under.
    pub lease_id: String,
    /// Who, if they said.
    pub owner: Option<String>,
    /// `shared` or `exclusive` for a read-write lock.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// A candidate's value (elections).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// True if it holds now.
    pub holds: bool,
}

/// Who holds a lock and who waits, in order.
#[derive(Debug, Serialize, ToSchema)]
pub struct LockStatusResponse {
    /// The lock name.
    pub name: String,
    /// The (first) holder, or `null`.
    pub holder: Option<HolderResponse>,
    /// Waiters queued behind the holders.
    pub waiters: u64,
    /// The semaphore limit (1: a mutex); absent for a read-write lock or a free lock.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    /// Holders, then waiters, in order (at most 1,000).
    pub queue: Vec<QueueEntryResponse>,
}

impl LockStatusResponse {
    /// The JSON form of a status.
    pub fn from_status(status: crate::lock::LockStatus) -> Self {
        Self {
            name: status.name.to_string(),
            holder: status.holder.map(|h| HolderResponse {
                owner: h.owner,
                token: h.token,
                lease_id: h.lease_id.to_string(),
            }),
            waiters: status.waiters,
            limit: status.limit,
            queue: status
                .queue
                .into_iter()
                .enumerate()
                .map(|(position, e)| QueueEntryResponse {
                    position,
                    token: e.token,
                    lease_id: e.lease_id.to_string(),
                    owner: e.owner,
                    mode: e.mode,
                    value: e.value,
                    holds: e.holds,
                })
                .collect(),
        }
    }
}

/// The lease an acquire names: an existing one (`lease_id` with its handle) or a new one
/// (`ttl`), exactly one of the two.
pub(crate) fn lease_choice(
    fields: &Fields,
    limits: &super::Limits,
    tenant: &crate::tenants::Tenant,
    handle: MaybeHandle,
) -> Result<LeaseChoice, ApiError> {
    let lease_id = fields.string("lease_id", ApiError::InvalidRequest)?;
    let ttl = fields.ttl(limits)?;
    match (lease_id, ttl) {
        (Some(id), None) => {
            let id = id
                .parse::<LeaseId>()
                .map_err(|()| ApiError::LeaseNotFound)?;
            Ok(LeaseChoice::Existing(handle.require_for(tenant, id)?))
        }
        (None, Some(ttl)) => {
            // A lease of its own: a new session, let in after the work of open ones.
            crate::admission::opens_session();
            Ok(LeaseChoice::New { ttl })
        }
        (Some(_), Some(_)) => Err(ApiError::InvalidRequest(
            "give either `lease_id` or `ttl`, not both".into(),
        )),
        (None, None) => Err(ApiError::InvalidRequest(
            "give `lease_id` (an existing lease) or `ttl` (a new one)".into(),
        )),
    }
}

/// Counts an acquire's outcome.
pub(crate) fn count_acquire<T>(outcome: &Result<T, ServiceError>, started: std::time::Instant) {
    metrics::acquire_finished(
        match outcome {
            Ok(_) => AcquireResult::Granted,
            Err(ServiceError::LockHeld { .. }) => AcquireResult::TimedOut,
            Err(_) => AcquireResult::Error,
        },
        started.elapsed(),
    );
}

/// Acquires a lock, waiting in line up to `wait`.
#[utoipa::path(post, path = "/v1/locks/{name}/acquire", tag = "locks",
    params(("name" = String, Path, description = "Lock name, percent-encoded"), ("Leasehold-Handle" = Option<String>, Header, description = "The handle of `lease_id` (required with `lease_id`)")),
    request_body = AcquireBody,
    responses(
        (status = 200, description = "Lock granted", body = AcquireResponse),
        (status = 400, description = "invalid_json, invalid_name, invalid_ttl, invalid_wait, invalid_lock_delay or invalid_request", body = ErrorBody),
        (status = 401, description = "unauthorized", body = ErrorBody),
        (status = 403, description = "forbidden (missing or wrong handle, name outside the tenant's prefix)", body = ErrorBody),
        (status = 404, description = "lease_not_found", body = ErrorBody),
        (status = 409, description = "lock_held (with `holder`, absent while the lock is in a lock-delay), limit_mismatch or mode_mismatch", body = ErrorBody),
        (status = 413, description = "body_too_large", body = ErrorBody),
        (status = 429, description = "quota_exceeded", body = ErrorBody),
        (status = 503, description = "store_unavailable, overloaded (with Retry-After) or shutting_down", body = ErrorBody),
    ))]
pub async fn acquire_lock(
    State(state): State<AppState>,
    Caller(tenant): Caller,
    LockNamePath(name): LockNamePath,
    handle: MaybeHandle,
    JsonObject(body): JsonObject,
) -> Result<Json<AcquireResponse>, ApiError> {
    let fields = Fields(&body);
    let kind = fields.kind()?;
    let wait = fields.wait(&state.limits)?;
    let lock_delay = fields.lock_delay(Some(kind))?;
    crate::admission::be_patient(wait);
    let owner = fields.owner()?;
    let lease = lease_choice(&fields, &state.limits, &tenant, handle)?;
    let started = std::time::Instant::now();
    let outcome = state
        .service
        .acquire(AcquireRequest {
            name,
            kind,
            lease,
            wait,
            owner,
            value: None,
            lock_delay,
            tenant,
        })
        .await;
    count_acquire(&outcome, started);
    let grant = outcome?;
    record_lock(&grant.name, grant.token);
    tracing::Span::current().record("lease_id", grant.lease_id.to_string());
    Ok(Json(AcquireResponse {
        name: grant.name.to_string(),
        token: grant.token,
        lease_id: grant.lease_id.to_string(),
        handle: grant.handle.map(|h| h.reveal().to_owned()),
        ttl_ms: grant.ttl_ms,
        owner: grant.owner,
    }))
}

/// Keeps the holder's lease alive, if `token` still holds the lock.
#[utoipa::path(post, path = "/v1/locks/{name}/renew", tag = "locks",
    params(("name" = String, Path, description = "Lock name, percent-encoded"), ("Leasehold-Handle" = Option<String>, Header, description = "The lease's secret handle (required)")),
    request_body = TokenBody,
    responses(
        (status = 200, description = "Hold renewed", body = RenewResponse),
        (status = 400, description = "invalid_json, invalid_name or invalid_request", body = ErrorBody),
        (status = 401, description = "unauthorized", body = ErrorBody),
        (status = 403, description = "forbidden (missing or wrong handle, name outside the tenant's prefix)", body = ErrorBody),
        (status = 409, description = "not_holder", body = ErrorBody),
        (status = 503, description = "store_unavailable or overloaded (with Retry-After)", body = ErrorBody),
    ))]
pub async fn renew_lock(
    State(state): State<AppState>,
    Caller(tenant): Caller,
    LockNamePath(name): LockNamePath,
    handle: MaybeHandle,
    JsonObject(body): JsonObject,
) -> Result<Json<RenewResponse>, ApiError> {
    let token = Fields(&body).token()?;
    let auth = handle.require(&tenant)?;
    record_lock(&name, token);
    let outcome = state.service.renew(&tenant, &name, token, &auth).await;
    metrics::renewal_finished(outcome_label(&outcome, "renewed"));
    let renewal = outcome?;
    Ok(Json(RenewResponse {
        name: renewal.name.to_string(),
        token: renewal.token,
        lease_id: renewal.lease_id.to_string(),
        ttl_ms: renewal.ttl_ms,
    }))
}

/// Releases the lock, if `token` holds it; deletes nothing otherwise.
#[utoipa::path(post, path = "/v1/locks/{name}/release", tag = "locks",
    params(("name" = String, Path, description = "Lock name, percent-encoded"), ("Leasehold-Handle" = Option<String>, Header, description = "The lease's secret handle (required)")),
    request_body = TokenBody,
    responses(
        (status = 200, description = "Released", body = ReleaseResponse),
        (status = 400, description = "invalid_json, invalid_name or invalid_request", body = ErrorBody),
        (status = 401, description = "unauthorized", body = ErrorBody),
        (status = 403, description = "forbidden (missing or wrong handle, name outside the tenant's prefix)", body = ErrorBody),
        (status = 409, description = "not_holder", body = ErrorBody),
        (status = 503, description = "store_unavailable or overloaded (with Retry-After)", body = ErrorBody),
    ))]
pub async fn release_lock(
    State(state): State<AppState>,
    Caller(tenant): Caller,
    LockNamePath(name): LockNamePath,
    handle: MaybeHandle,
    JsonObject(body): JsonObject,
) -> Result<Json<ReleaseResponse>, ApiError> {
    let token = Fields(&body).token()?;
    let auth = handle.require(&tenant)?;
    record_lock(&name, token);
    let outcome = state.service.release(&tenant, &name, token, &auth).await;
    metrics::release_finished(outcome_label(&outcome, "released"));
    outcome?;
    Ok(Json(ReleaseResponse { released: true }))
}

/// Shows who holds a lock and who waits, in order.
#[utoipa::path(get, path = "/v1/locks/{name}", tag = "locks",
    params(("name" = String, Path, pattern = "^(?!(acquire|release)$).+$",
        description = "Lock name, percent-encoded. The locks named `acquire` and `release` have their own GET routes: their paths are also the group routes")),
    responses(
        (status = 200, description = "Lock status", body = LockStatusResponse),
        (status = 400, description = "invalid_name", body = ErrorBody),
        (status = 401, description = "unauthorized", body = ErrorBody),
        (status = 403, description = "forbidden (name outside the tenant's prefix)", body = ErrorBody),
        (status = 503, description = "store_unavailable or overloaded (with Retry-After)", body = ErrorBody),
    ))]
pub async fn lock_status(
    State(state): State<AppState>,
    Caller(tenant): Caller,
    LockNamePath(name): LockNamePath,
) -> Result<Json<LockStatusResponse>, ApiError> {
    let status = state.service.lock_status(&tenant, &name).await?;
    Ok(Json(LockStatusResponse::from_status(status)))
}

/// One lock in `GET /v1/locks`.
#[derive(Debug, Serialize, ToSchema)]
pub struct LockSummaryResponse {
    /// The lock name.
    pub name: String,
    /// Keys in its queue, holders included.
    pub queued: u64,
    /// The head of its queue (the first holder).
    pub holder: Option<HolderBrief>,
}

/// A holder in a lock list: token and owner.
#[derive(Debug, Serialize, ToSchema)]
pub struct HolderBrief {
    /// Its fencing token.
    pub token: u64,
    /// Who, if they said.
    pub owner: Option<String>,
}

/// The locks of the caller's tenant that someone holds or waits for.
#[derive(Debug, Serialize, ToSchema)]
pub struct LockListResponse {
    /// Sorted by name, at most 1,000.
    pub locks: Vec<LockSummaryResponse>,
    /// The etcd revision of this list: follow `GET /v1/events` with `Last-Event-ID` set to it to
    /// miss no change after it.
    pub revision: i64,
}

/// Lists the locks someone holds or waits for (sorted by name, at most 1,000).
#[utoipa::path(get, path = "/v1/locks", tag = "locks",
    responses(
        (status = 200, description = "The locks in use", body = LockListResponse),
        (status = 401, description = "unauthorized", body = ErrorBody),
        (status = 503, description = "store_unavailable or overloaded", body = ErrorBody),
    ))]
pub async fn list_locks(
    State(state): State<AppState>,
    Caller(tenant): Caller,
) -> Result<Json<LockListResponse>, ApiError> {
    let (locks, revision) = state.service.list_locks(&tenant, 1000).await?;
    Ok(Json(LockListResponse {
        revision,
        locks: locks
            .into_iter()
            .map(|l| LockSummaryResponse {
                name: l.name.to_string(),
                queued: l.queued,
                holder: l.head.map(|(token, owner)| HolderBrief { token, owner }),
            })
            .collect(),
    }))
}
