//! `/v1/locks/acquire` and `/v1/locks/release`: all-or-nothing groups of locks.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::AppState;
use super::error::{ApiError, ErrorBody};
use super::extract::{Caller, Fields, JsonObject, MaybeHandle};
use super::locks::{LockStatusResponse, ReleaseResponse, count_acquire, lease_choice};
use crate::keys::LockName;

/// Body of `POST /v1/locks/acquire`: the names, and exactly one of `lease_id` or `ttl`.
#[derive(Debug, Deserialize, ToSchema)]
#[allow(dead_code)] // documents the body; it is read field by field for precise error codes
pub struct GroupAcquireBody {
    /// Every lock to take, in any order (1 to 64): all of them, or none.
    #[schema(example = json!(["concert/seat-7", "concert/seat-8"]))]
    names: Vec<String>,
    /// Hold them under this existing lease; its handle in `Leasehold-Handle`.
    lease_id: Option<String>,
    /// Or: a new lease of this TTL (humantime).
    ttl: Option<String>,
    /// How long to wait for all of them (humantime); default `"0s"`.
    wait: Option<String>,
    /// Who is asking.
    owner: Option<String>,
}

/// Body of `POST /v1/locks/release` (with the lease's handle in `Leasehold-Handle`).
#[derive(Debug, Deserialize, ToSchema)]
#[allow(dead_code)] // documents the body; it is read field by field for precise error codes
pub struct GroupReleaseBody {
    /// The names of the group.
    names: Vec<String>,
    /// The group's token.
    token: u64,
}

/// A granted group.
#[derive(Debug, Serialize, ToSchema)]
pub struct GroupGrantResponse {
    /// The names held, sorted.
    pub names: Vec<String>,
    /// The fencing token of each name (one txn put every key, so they are equal).
    pub tokens: BTreeMap<String, u64>,
    /// That token.
    pub token: u64,
    /// The lease every hold is attached to.
    pub lease_id: String,
    /// For a `ttl` acquire, the new lease's secret handle.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub handle: Option<String>,
    /// The lease's TTL, in milliseconds.
    pub ttl_ms: u64,
    /// Who holds them.
    pub owner: Option<String>,
}

/// Acquires every name or none, waiting in line (FIFO, deadlock-free) up to `wait`.
#[utoipa::path(post, path = "/v1/locks/acquire", tag = "locks",
    params(("Leasehold-Handle" = Option<String>, Header, description = "The handle of `lease_id` (required with `lease_id`)")),
    request_body = GroupAcquireBody,
    responses(
        (status = 200, description = "Every lock granted", body = GroupGrantResponse),
        (status = 400, description = "invalid_json, invalid_name, invalid_ttl, invalid_wait or invalid_request", body = ErrorBody),
        (status = 401, description = "unauthorized", body = ErrorBody),
        (status = 403, description = "forbidden", body = ErrorBody),
        (status = 404, description = "lease_not_found", body = ErrorBody),
        (status = 409, description = "lock_held (with the `holder` of a name in the way); nothing is held", body = ErrorBody),
        (status = 413, description = "body_too_large", body = ErrorBody),
        (status = 429, description = "quota_exceeded", body = ErrorBody),
        (status = 503, description = "store_unavailable, overloaded (with Retry-After) or shutting_down", body = ErrorBody),
    ))]
pub async fn acquire_group(
    State(state): State<AppState>,
    Caller(tenant): Caller,
    handle: MaybeHandle,
    JsonObject(body): JsonObject,
) -> Result<Json<GroupGrantResponse>, ApiError> {
    let fields = Fields(&body);
    let names = fields.names()?;
    let wait = fields.wait(&state.limits)?;
    fields.lock_delay(None)?;
    crate::admission::be_patient(wait);
    let owner = fields.owner()?;
    let lease = lease_choice(&fields, &state.limits, &tenant, handle)?;
    let started = std::time::Instant::now();
    let outcome = state
        .service
        .acquire_group(names, lease, wait, owner, tenant)
        .await;
    count_acquire(&outcome, started);
    let granted = outcome?;
    let names: Vec<String> = granted.names.iter().map(LockName::to_string).collect();
    Ok(Json(GroupGrantResponse {
        tokens: names.iter().map(|n| (n.clone(), granted.token)).collect(),
        names,
        token: granted.token,
        lease_id: granted.lease_id.to_string(),
        handle: granted.handle.map(|h| h.reveal().to_owned()),
        ttl_ms: granted.ttl_ms,
        owner: granted.owner,
    }))
}

/// Releases every name of a group at once, if `token` holds each of them; nothing otherwise.
#[utoipa::path(post, path = "/v1/locks/release", tag = "locks",
    params(("Leasehold-Handle" = Option<String>, Header, description = "The lease's secret handle (required)")),
    request_body = GroupReleaseBody,
    responses(
        (status = 200, description = "Released", body = ReleaseResponse),
        (status = 400, description = "invalid_json, invalid_name or invalid_request", body = ErrorBody),
        (status = 401, description = "unauthorized", body = ErrorBody),
        (status = 403, description = "forbidden", body = ErrorBody),
        (status = 409, description = "not_holder", body = ErrorBody),
        (status = 503, description = "store_unavailable or overloaded (with Retry-After)", body = ErrorBody),
    ))]
pub async fn release_group(
    State(state): State<AppState>,
    Caller(tenant): Caller,
    handle: MaybeHandle,
    JsonObject(body): JsonObject,
) -> Result<Json<ReleaseResponse>, ApiError> {
    let fields = Fields(&body);
    let names = fields.names()?;
    let token = fields.token()?;
    let auth = handle.require(&tenant)?;
    state
        .service
        .release_group(&tenant, &names, token, &auth)
        .await?;
    Ok(Json(ReleaseResponse { released: true }))
}

/// The status of the lock named `acquire` (the group route takes the POST).
#[utoipa::path(get, path = "/v1/locks/acquire", tag = "locks",
    responses((status = 200, description = "Status of the lock named `acquire`", body = LockStatusResponse)))]
pub async fn status_of_lock_named_acquire(
    state: State<AppState>,
    caller: Caller,
) -> Result<Json<LockStatusResponse>, ApiError> {
    named_status(state, caller, "acquire").await
}

/// The status of the lock named `release` (the group route takes the POST).
#[utoipa::path(get, path = "/v1/locks/release", tag = "locks",
    responses((status = 200, description = "Status of the lock named `release`", body = LockStatusResponse)))]
pub async fn status_of_lock_named_release(
    state: State<AppState>,
    caller: Caller,
) -> Result<Json<LockStatusResponse>, ApiError> {
    named_status(state, caller, "release").await
}

async fn named_status(
    State(state): State<AppState>,
    Caller(tenant): Caller,
    name: &str,
) -> Result<Json<LockStatusResponse>, ApiError> {
    let name = LockName::new(name).expect("a valid name");
    let status = state.service.lock_status(&tenant, &name).await?;
    Ok(Json(LockStatusResponse::from_status(status)))
}
