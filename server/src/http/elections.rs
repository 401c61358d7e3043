//! `/v1/elections/{name}`: leader election on the lock queue. Campaign (wait to lead, with a
//! value), resign, who leads, and observe (`streams.rs`). The leader's token is its epoch.

use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::AppState;
use super::error::{ApiError, ErrorBody};
use super::extract::{Caller, Fields, JsonObject, LockNamePath, MaybeHandle};
use super::locks::{ReleaseResponse, count_acquire, lease_choice};
use crate::election::Leadership;
use crate::lock::AcquireRequest;
use crate::queue::Kind;

/// Body of `POST /v1/elections/{name}/campaign`: the candidate's value, and exactly one of
/// `lease_id` or `ttl`.
#[derive(Debug, Deserialize, ToSchema)]
#[allow(dead_code)] // documents the body; it is read field by field for precise error codes
pub struct CampaignBody {
    /// What the candidate stands with (an address, an id), shown while it leads.
    #[schema(example = "10.0.0.7:8080")]
    value: Option<String>,
    /// Lead under this existing lease; its handle in `Leasehold-Handle`.
    lease_id: Option<String>,
    /// Or: a new lease of this TTL (humantime).
    ttl: Option<String>,
    /// How long to wait to lead (humantime); default `"0s"`.
    wait: Option<String>,
    /// Who is campaigning.
    owner: Option<String>,
}

/// Leadership won.
#[derive(Debug, Serialize, ToSchema)]
pub struct CampaignResponse {
    /// The election.
    pub name: String,
    /// The leadership's epoch: strictly greater than every earlier leader's. Fence with it.
    pub epoch: u64,
    /// The same number under the name every lock uses (resign with it).
    pub token: u64,
    /// The lease the leadership is attached to; it ends with it.
    pub lease_id: String,
    /// For a `ttl` campaign, the new lease's secret handle.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub handle: Option<String>,
    /// The lease's TTL, in milliseconds.
    pub ttl_ms: u64,
    /// The value it leads with.
    pub value: Option<String>,
}

/// The leader, as others see it.
#[derive(Debug, Serialize, ToSchema)]
pub struct LeaderResponse {
    /// Its value.
    pub value: Option<String>,
    /// Its epoch.
    pub epoch: u64,
    /// Who, if it said.
    pub owner: Option<String>,
    /// The lease it leads under.
    pub lease_id: String,
}

/// Who leads an election.
#[derive(Debug, Serialize, ToSchema)]
pub struct LeadershipResponse {
    /// The election.
    pub name: String,
    /// The leader, or `null`.
    pub leader: Option<LeaderResponse>,
    /// Candidates waiting behind it.
    pub candidates: u64,
}

impl From<Leadership> for LeadershipResponse {
    fn from(l: Leadership) -> Self {
        Self {
            name: l.name.to_string(),
            leader: l.leader.map(|leader| LeaderResponse {
                value: leader.value,
                epoch: leader.epoch,
                owner: leader.owner,
                lease_id: leader.lease_id.to_string(),
            }),
            candidates: l.candidates,
        }
    }
}

/// Campaigns: waits up to `wait` to lead election `name`, standing with `value`.
#[utoipa::path(post, path = "/v1/elections/{name}/campaign", tag = "elections",
    params(("name" = String, Path, description = "Election name, percent-encoded"),
           ("Leasehold-Handle" = Option<String>, Header, description = "The handle of `lease_id` (required with `lease_id`)")),
    request_body = CampaignBody,
    responses(
        (status = 200, description = "Leading", body = CampaignResponse),
        (status = 400, description = "invalid_json, invalid_name, invalid_ttl, invalid_wait or invalid_request", body = ErrorBody),
        (status = 401, description = "unauthorized", body = ErrorBody),
        (status = 403, description = "forbidden", body = ErrorBody),
        (status = 404, description = "lease_not_found", body = ErrorBody),
        (status = 409, description = "lock_held (someone else leads; with `holder`), limit_mismatch or mode_mismatch", body = ErrorBody),
        (status = 413, description = "body_too_large", body = ErrorBody),
        (status = 429, description = "quota_exceeded", body = ErrorBody),
        (status = 503, description = "store_unavailable, overloaded (with Retry-After) or shutting_down", body = ErrorBody),
    ))]
pub async fn campaign(
    State(state): State<AppState>,
    Caller(tenant): Caller,
    LockNamePath(name): LockNamePath,
    handle: MaybeHandle,
    JsonObject(body): JsonObject,
) -> Result<Json<CampaignResponse>, ApiError> {
    let fields = Fields(&body);
    let value = fields.short_text("value")?;
    let wait = fields.wait(&state.limits)?;
    fields.lock_delay(None)?;
    crate::admission::be_patient(wait);
    let owner = fields.owner()?;
    let lease = lease_choice(&fields, &state.limits, &tenant, handle)?;
    let started = std::time::Instant::now();
    let outcome = state
        .service
        .acquire(AcquireRequest {
            name,
            kind: Kind::MUTEX,
            lease,
            wait,
            owner,
            value: value.clone(),
            lock_delay: std::time::Duration::ZERO,
            tenant,
        })
        .await;
    count_acquire(&outcome, started);
    let grant = outcome?;
    Ok(Json(CampaignResponse {
        name: grant.name.to_string(),
        epoch: grant.token,
        token: grant.token,
        lease_id: grant.lease_id.to_string(),
        handle: grant.handle.map(|h| h.reveal().to_owned()),
        ttl_ms: grant.ttl_ms,
        value,
    }))
}

/// Body of `POST /v1/elections/{name}/resign` (with the lease's handle in `Leasehold-Handle`).
#[derive(Debug, Deserialize, ToSchema)]
#[allow(dead_code)] // documents the body; it is read field by field for precise error codes
pub struct ResignBody {
    /// The leadership's epoch (token).
    token: u64,
}

/// Resigns the leadership held with `token`; the next candidate leads, with a larger epoch.
#[utoipa::path(post, path = "/v1/elections/{name}/resign", tag = "elections",
    params(("name" = String, Path, description = "Election name, percent-encoded"),
           ("Leasehold-Handle" = Option<String>, Header, description = "The lease's secret handle (required)")),
    request_body = ResignBody,
    responses(
        (status = 200, description = "Resigned", body = ReleaseResponse),
        (status = 400, description = "invalid_json, invalid_name or invalid_request", body = ErrorBody),
        (status = 401, description = "unauthorized", body = ErrorBody),
        (status = 403, description = "forbidden", body = ErrorBody),
        (status = 409, description = "not_holder", body = ErrorBody),
        (status = 503, description = "store_unavailable or overloaded", body = ErrorBody),
    ))]
pub async fn resign(
    State(state): State<AppState>,
    Caller(tenant): Caller,
    LockNamePath(name): LockNamePath,
    handle: MaybeHandle,
    JsonObject(body): JsonObject,
) -> Result<Json<ReleaseResponse>, ApiError> {
    let token = Fields(&body).token()?;
    let auth = handle.require(&tenant)?;
    state.service.release(&tenant, &name, token, &auth).await?;
    Ok(Json(ReleaseResponse { released: true }))
}

/// Who leads election `name`, with what value and epoch.
#[utoipa::path(get, path = "/v1/elections/{name}", tag = "elections",
    params(("name" = String, Path, description = "Election name, percent-encoded")),
    responses(
        (status = 200, description = "The leadership", body = LeadershipResponse),
        (status = 400, description = "invalid_name", body = ErrorBody),
        (status = 401, description = "unauthorized", body = ErrorBody),
        (status = 403, description = "forbidden", body = ErrorBody),
        (status = 503, description = "store_unavailable or overloaded", body = ErrorBody),
    ))]
pub async fn leader(
    State(state): State<AppState>,
    Caller(tenant): Caller,
    LockNamePath(name): LockNamePath,
) -> Result<Json<LeadershipResponse>, ApiError> {
    Ok(Json(state.service.leadership(&tenant, &name).await?.into()))
}
