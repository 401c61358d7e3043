//! Every error the HTTP API returns, and its stable `code` and status, in one `match`.
//!
//! The body is always `{"error":{"code":"...","message":"..."}}` (plus `holder` for
//! `lock_held`). Internal details (etcd's own messages) are logged, not sent.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::service::{Holder, ServiceError};

/// An error answered to an HTTP client.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The body is not JSON.
    #[error("request body is not valid JSON: {0}")]
    InvalidJson(String),
    /// The lock name is empty, too long, or contains control characters.
    #[error("invalid lock name: {0}")]
    InvalidName(String),
    /// `ttl` is missing, unparseable, zero, or above the maximum.
    #[error("invalid ttl: {0}")]
    InvalidTtl(String),
    /// `wait` is unparseable or above the maximum.
    #[error("invalid wait: {0}")]
    InvalidWait(String),
    /// `lock_delay` is not a duration, is above 60 s, or was given where it does not apply.
    #[error("invalid lock_delay: {0}")]
    InvalidLockDelay(String),
    /// Any other malformed request (wrong field types, both or neither of `lease_id`/`ttl`...).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The body is over the size limit.
    #[error("request body is larger than {0} bytes")]
    BodyTooLarge(usize),
    /// The lease does not exist (expired, revoked, or never granted).
    #[error("lease not found (expired, revoked or never granted)")]
    LeaseNotFound,
    /// No such route.
    #[error("no such route: {0}")]
    NotFound(String),
    /// The route exists but not with this method.
    #[error("method not allowed on this route")]
    MethodNotAllowed,
    /// The lock was not acquired within the wait.
    #[error("lock is held by someone else")]
    LockHeld(Option<Holder>),
    /// The token does not hold the lock.
    #[error("this token does not hold the lock (released, expired, or never granted)")]
    NotHolder,
    /// etcd did not answer or failed. No lock is granted by a request that gets this answer, and
    /// what it may have queued is removed by the server; retry (the `leasehold` crate does).
    #[error("the lock store (etcd) did not confirm this request; no lock was granted; retry later")]
    StoreUnavailable(String),
    /// The server is shutting down; retry on another replica.
    #[error("server is shutting down; retry on another replica")]
    ShuttingDown,
    /// No valid bearer token (only when the server runs with an auth file).
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    /// A wrong or missing lease handle, or a lock name outside the tenant's prefix. Nothing
    /// changed in etcd.
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// A tenant quota would be exceeded. Nothing was granted.
    #[error("quota exceeded: {0}")]
    QuotaExceeded(String),
    /// The acquire disagrees with the lock's other waiters (`limit_mismatch`, `mode_mismatch`).
    #[error("{1}")]
    Conflict(&'static str, String),
    /// Shed by admission control (or etcd refused unapplied): nothing was done. Comes with
    /// `Retry-After`.
    #[error("the server is overloaded; nothing was done; retry after the Retry-After delay")]
    Overloaded(String),
}

/// The JSON body of every error.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: ErrorDetail,
    /// For `lock_held`: who holds the lock now (`null` if it was freed meanwhile).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub holder: Option<Option<HolderBrief>>,
}

/// A stable machine-readable code and a human message.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable snake_case code, e.g. `lock_held`.
    pub code: &'static str,
    /// Human-readable explanation.
    pub message: String,
}

/// The holder as shown in a `lock_held` error.
#[derive(Debug, Serialize, ToSchema)]
pub struct HolderBrief {
    /// Who holds the lock, if they said.
    pub owner: Option<String>,
    /// The holder's fencing token.
    pub token: u64,
}

impl ApiError {
    /// The status and stable code of this error.
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        use ApiError as E;
        match self {
            E::InvalidJson(_) => (StatusCode::BAD_REQUEST, "invalid_json"),
            E::InvalidName(_) => (StatusCode::BAD_REQUEST, "invalid_name"),
            E::InvalidTtl(_) => (StatusCode::BAD_REQUEST, "invalid_ttl"),
            E::InvalidWait(_) => (StatusCode::BAD_REQUEST, "invalid_wait"),
            E::InvalidLockDelay(_) => (StatusCode::BAD_REQUEST, "invalid_lock_delay"),
            E::InvalidRequest(_) => (StatusCode::BAD_REQUEST, "invalid_request"),
            E::BodyTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large"),
            E::LeaseNotFound => (StatusCode::NOT_FOUND, "lease_not_found"),
            E::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            E::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            E::LockHeld(_) => (StatusCode::CONFLICT, "lock_held"),
            E::NotHolder => (StatusCode::CONFLICT, "not_holder"),
            E::StoreUnavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable"),
            E::ShuttingDown => (StatusCode::SERVICE_UNAVAILABLE, "shutting_down"),
            E::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            E::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            E::QuotaExceeded(_) => (StatusCode::TOO_MANY_REQUESTS, "quota_exceeded"),
            E::Overloaded(_) => (StatusCode::SERVICE_UNAVAILABLE, "overloaded"),
            E::Conflict(code, _) => (StatusCode::CONFLICT, code),
        }
    }
}

impl From<ServiceError> for ApiError {
    fn from(err: ServiceError) -> Self {
        match err {
            ServiceError::LeaseNotFound => ApiError::LeaseNotFound,
            ServiceError::LockHeld { holder } => ApiError::LockHeld(holder),
            ServiceError::NotHolder => ApiError::NotHolder,
            ServiceError::Unavailable(msg) => ApiError::StoreUnavailable(msg),
            ServiceError::ShuttingDown => ApiError::ShuttingDown,
            ServiceError::Forbidden(msg) => ApiError::Forbidden(msg),
            ServiceError::QuotaExceeded(msg) => ApiError::QuotaExceeded(msg),
            ServiceError::Overloaded(msg) => ApiError::Overloaded(msg),
            ServiceError::Mismatch {
                code: "invalid_request",
                message,
            } => ApiError::InvalidRequest(message),
            ServiceError::Mismatch { code, message } => ApiError::Conflict(code, message),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        if let ApiError::StoreUnavailable(detail) = &self {
            tracing::warn!(%detail, "answering store_unavailable");
        }
        let holder = match &self {
            ApiError::LockHeld(holder) => Some(holder.as_ref().map(|h| HolderBrief {
                owner: h.owner.clone(),
                token: h.token,
            })),
            _ => None,
        };
        let body = ErrorBody {
            error: ErrorDetail {
                code,
                message: self.to_string(),
            },
            holder,
        };
        let mut response = (status, Json(body)).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        if matches!(self, ApiError::Overloaded(_)) {
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(crate::admission::RETRY_AFTER_SECS),
            );
        }
        response
    }
}
