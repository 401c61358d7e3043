//! Our own extractors, so that every rejection is an [`ApiError`] with a stable code, and request
//! validation that never reaches etcd with bad input.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use serde_json::{Map, Value};

use super::AppState;
use super::error::ApiError;
use crate::handle::Handle;
use crate::keys::{LeaseId, LockName};
use crate::service::LeaseAuth;
use crate::tenants::{AuthError, Tenant};

/// The request header that carries a lease's handle.
pub const HANDLE_HEADER: &str = "leasehold-handle";

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// Longest `owner` accepted, in bytes.
pub const MAX_OWNER_BYTES: usize = 1024;

/// A JSON object body. Any content type is accepted: the body must parse as a JSON object.
#[derive(Debug)]
pub struct JsonObject(pub Map<String, Value>);

impl<S: Send + Sync> FromRequest<S> for JsonObject {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes =
            Bytes::from_request(req, state)
                .await
                .map_err(|rejection: BytesRejection| {
                    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                        ApiError::BodyTooLarge(MAX_BODY_BYTES)
                    } else {
                        ApiError::InvalidRequest(rejection.body_text())
                    }
                })?;
        match serde_json::from_slice::<Value>(&bytes) {
            Ok(Value::Object(map)) => Ok(Self(map)),
            Ok(_) => Err(ApiError::InvalidRequest(
                "the body must be a JSON object".into(),
            )),
            Err(err) => Err(ApiError::InvalidJson(err.to_string())),
        }
    }
}

/// The `{name}` path segment, percent-decoded and validated as a lock name.
#[derive(Debug)]
pub struct LockNamePath(pub LockName);

impl<S: Send + Sync> FromRequestParts<S> for LockNamePath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path(raw) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|rejection| ApiError::InvalidName(rejection.body_text()))?;
        LockName::new(raw)
            .map(Self)
            .map_err(|err| ApiError::InvalidName(err.to_string()))
    }
}

/// The `{lease_id}` path segment. An id that cannot name a lease is simply not found.
#[derive(Debug)]
pub struct LeaseIdPath(pub LeaseId);

impl<S: Send + Sync> FromRequestParts<S> for LeaseIdPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path(raw) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|_| ApiError::LeaseNotFound)?;
        raw.parse().map(Self).map_err(|()| ApiError::LeaseNotFound)
    }
}

/// The caller's tenant, from `Authorization: Bearer <token>` (or the open tenant when the
/// server runs without an auth file).
#[derive(Debug, Clone)]
pub struct Caller(pub std::sync::Arc<Tenant>);

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok());
        state
            .tenants
            .authenticate(header)
            .map(Self)
            .map_err(|AuthError::Unauthorized(why)| ApiError::Unauthorized(why.into()))
    }
}

/// The `Leasehold-Handle` header, if sent. A malformed one is refused as `invalid_request`.
#[derive(Debug, Clone)]
pub struct MaybeHandle(pub Option<Handle>);

impl<S: Send + Sync> FromRequestParts<S> for MaybeHandle {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        let Some(value) = parts.headers.get(HANDLE_HEADER) else {
            return Ok(Self(None));
        };
        let text = value.to_str().map_err(|_| {
            ApiError::InvalidRequest("the Leasehold-Handle header is not text".into())
        })?;
        Handle::parse(text.trim())
            .map(|handle| Self(Some(handle)))
            .map_err(|err| ApiError::InvalidRequest(format!("Leasehold-Handle: {err}")))
    }
}

impl MaybeHandle {
    /// The lease the handle names for `tenant`; a missing handle is `403 forbidden`.
    pub fn require(self, tenant: &Tenant) -> Result<LeaseAuth, ApiError> {
        let handle = self.0.ok_or_else(|| {
            ApiError::Forbidden(
                "this operation needs the lease's handle in the Leasehold-Handle header".into(),
            )
        })?;
        Ok(LeaseAuth::new(tenant, &handle))
    }

    /// [`MaybeHandle::require`], and the handle must name lease `expected`.
    pub fn require_for(self, tenant: &Tenant, expected: LeaseId) -> Result<LeaseAuth, ApiError> {
        let auth = self.require(tenant)?;
        if auth.lease != expected {
            return Err(ApiError::Forbidden("wrong handle for this lease".into()));
        }
        Ok(auth)
    }
}

/// Server-side bounds on what clients may ask for.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Longest TTL granted.
    pub max_ttl: Duration,
    /// Longest wait accepted.
    pub max_wait: Duration,
}

/// Typed access to a JSON object's fields, with the error code each field's problems deserve.
/// `null` counts as absent.
pub struct Fields<'a>(pub &'a Map<String, Value>);

impl Fields<'_> {
    fn get(&self, field: &str) -> Option<&Value> {
        self.0.get(field).filter(|v| !v.is_null())
    }

    /// An optional string field; anything but a string is `invalid(...)`.
    pub fn string(
        &self,
        field: &str,
        invalid: fn(String) -> ApiError,
    ) -> Result<Option<String>, ApiError> {
        match self.get(field) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(invalid(format!("`{field}` must be a string, not {other}"))),
        }
    }

    /// `owner`: optional text of bounded size.
    pub fn owner(&self) -> Result<Option<String>, ApiError> {
        self.short_text("owner")
    }

    /// `field`: optional text of at most [`MAX_OWNER_BYTES`] (an owner, a candidate's value).
    pub fn short_text(&self, field: &str) -> Result<Option<String>, ApiError> {
        let text = self.string(field, ApiError::InvalidRequest)?;
        if text.as_ref().is_some_and(|t| t.len() > MAX_OWNER_BYTES) {
            return Err(ApiError::InvalidRequest(format!(
                "`{field}` is longer than {MAX_OWNER_BYTES} bytes"
            )));
        }
        Ok(text)
    }

    /// `ttl`: a humantime duration (`"10s"`, `"1m30s"`), above zero, at most `limits.max_ttl`.
    pub fn ttl(&self, limits: &Limits) -> Result<Option<Duration>, ApiError> {
        let Some(ttl) = self.duration("ttl", ApiError::InvalidTtl)? else {
            return Ok(None);
        };
        if ttl.is_zero() {
            return Err(ApiError::InvalidTtl("`ttl` must be above zero".into()));
        }
        if ttl > limits.max_ttl {
            return Err(ApiError::InvalidTtl(format!(
                "`ttl` is above the maximum of {}",
                humantime::format_duration(limits.max_ttl)
            )));
        }
        Ok(Some(ttl))
    }

    /// `wait`: a humantime duration, default zero (try once), at most `limits.max_wait`.
    pub fn wait(&self, limits: &Limits) -> Result<Duration, ApiError> {
        Ok(self.wait_if_given(limits)?.unwrap_or(Duration::ZERO))
    }

    /// `wait`, if the body has one: a humantime duration, at most `limits.max_wait`.
    pub fn wait_if_given(&self, limits: &Limits) -> Result<Option<Duration>, ApiError> {
        let wait = self.duration("wait", ApiError::InvalidWait)?;
        if wait.is_some_and(|wait| wait > limits.max_wait) {
            return Err(ApiError::InvalidWait(format!(
                "`wait` is above the maximum of {}",
                humantime::format_duration(limits.max_wait)
            )));
        }
        Ok(wait)
    }

    /// `lock_delay`: a humantime duration from 0 to [`crate::delay::MAX_LOCK_DELAY`] (60 s),
    /// default zero (no delay). Only a mutex or a semaphore takes one (`kind`); `None` for any
    /// other acquire (a read-write lock, a group, an election): a non-zero delay there is refused.
    pub fn lock_delay(&self, kind: Option<crate::Kind>) -> Result<Duration, ApiError> {
        let delay = self
            .duration("lock_delay", ApiError::InvalidLockDelay)?
            .unwrap_or(Duration::ZERO);
        if delay > crate::delay::MAX_LOCK_DELAY {
            return Err(ApiError::InvalidLockDelay(format!(
                "`lock_delay` is above the maximum of {}",
                humantime::format_duration(crate::delay::MAX_LOCK_DELAY)
            )));
        }
        if !delay.is_zero() && !matches!(kind, Some(crate::Kind::Counted(_))) {
            return Err(ApiError::InvalidLockDelay(
                "`lock_delay` applies to mutexes and semaphores only (not to read-write locks, groups or elections)".into(),
            ));
        }
        Ok(delay)
    }

    /// The lock kind an acquire asks for: `limit` (a semaphore of that many holders, 1 to
    /// 10,000) or `mode` (`"shared"` or `"exclusive"`: a read-write lock),
    /// not both; neither: a mutex.
    pub fn kind(&self) -> Result<crate::Kind, ApiError> {
        let limit = match self.get("limit") {
            None => None,
            Some(Value::Number(n)) => match n.as_u64() {
                Some(l) if (1..=u64::from(crate::queue::MAX_LIMIT)).contains(&l) => Some(l as u32),
                _ => {
                    return Err(ApiError::InvalidRequest(format!(
                        "`limit` must be an integer from 1 to {}",
                        crate::queue::MAX_LIMIT
                    )));
                }
            },
            Some(other) => {
                return Err(ApiError::InvalidRequest(format!(
                    "`limit` must be an integer, not {other}"
                )));
            }
        };
        let mode = self.string("mode", ApiError::InvalidRequest)?;
        match (limit, mode.as_deref()) {
            (Some(_), Some(_)) => Err(ApiError::InvalidRequest(
                "give `limit` (a semaphore) or `mode` (a read-write lock), not both".into(),
            )),
            (Some(limit), None) => Ok(crate::Kind::Counted(limit)),
            (None, None) => Ok(crate::Kind::MUTEX),
            (None, Some("shared")) => Ok(crate::Kind::Shared),
            (None, Some("exclusive")) => Ok(crate::Kind::Exclusive),
            (None, Some(other)) => Err(ApiError::InvalidRequest(format!(
                "`mode` is \"shared\" or \"exclusive\", not {other:?}"
            ))),
        }
    }

    /// `names`: the lock names of a group, 1 to [`crate::group::MAX_GROUP`] of them.
    pub fn names(&self) -> Result<Vec<LockName>, ApiError> {
        let Some(Value::Array(items)) = self.get("names") else {
            return Err(ApiError::InvalidRequest(
                "`names` (an array of lock names) is required".into(),
            ));
        };
        if items.is_empty() || items.len() > crate::group::MAX_GROUP {
            return Err(ApiError::InvalidRequest(format!(
                "`names` takes 1 to {} names",
                crate::group::MAX_GROUP
            )));
        }
        items
            .iter()
            .map(|item| match item {
                Value::String(name) => LockName::new(name.clone())
                    .map_err(|err| ApiError::InvalidName(err.to_string())),
                other => Err(ApiError::InvalidRequest(format!(
                    "`names` holds strings, not {other}"
                ))),
            })
            .collect()
    }

    /// `token`: a fencing token, a non-negative JSON integer. `42.0` is an integer too (JSON
    /// Schema says so, and some encoders write whole floats that way).
    pub fn token(&self) -> Result<u64, ApiError> {
        let whole = |n: &serde_json::Number| {
            n.as_u64().or_else(|| {
                n.as_f64()
                    .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f <= u64::MAX as f64)
                    .map(|f| f as u64)
            })
        };
        match self.get("token") {
            Some(Value::Number(n)) if whole(n).is_some() => Ok(whole(n).unwrap_or_default()),
            Some(other) => Err(ApiError::InvalidRequest(format!(
                "`token` must be a non-negative integer, not {other}"
            ))),
            None => Err(ApiError::InvalidRequest("`token` is required".into())),
        }
    }

    fn duration(
        &self,
        field: &str,
        invalid: fn(String) -> ApiError,
    ) -> Result<Option<Duration>, ApiError> {
        let Some(text) = self.string(field, invalid)? else {
            return Ok(None);
        };
        humantime::parse_duration(text.trim())
            .map(Some)
            .map_err(|err| {
                invalid(format!(
                    "`{field}` must be a duration such as \"10s\" or \"1m30s\" ({err})"
                ))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    /// JSON objects whose known fields get values of every JSON type, plus unknown fields.
    fn arbitrary_json_object() -> impl Strategy<Value = Map<String, Value>> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            ".{0,12}".prop_map(Value::String),
            "[0-9]{1,4}(ms|s|m|h)".prop_map(Value::String),
        ];
        let value = leaf.prop_recursive(2, 8, 3, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
                proptest::collection::btree_map(".{0,4}", inner, 0..3)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        });
        let key = prop_oneof![
            Just("lease_id".to_owned()),
            Just("ttl".to_owned()),
            Just("wait".to_owned()),
            Just("owner".to_owned()),
            Just("token".to_owned()),
            Just("limit".to_owned()),
            Just("mode".to_owned()),
            Just("lock_delay".to_owned()),
            ".{0,6}",
        ];
        proptest::collection::btree_map(key, value, 0..6).prop_map(|m| m.into_iter().collect())
    }

    const LIMITS: Limits = Limits {
        max_ttl: Duration::from_secs(3600),
        max_wait: Duration::from_secs(300),
    };

    fn fields(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn ttl_rules() {
        let ok = fields(json!({"ttl": "1m30s"}));
        assert_eq!(
            Fields(&ok).ttl(&LIMITS).unwrap(),
            Some(Duration::from_secs(90))
        );
        for bad in [
            json!({"ttl": "abc"}),
            json!({"ttl": "0s"}),
            json!({"ttl": "2h"}),
            json!({"ttl": 10}),
        ] {
            let map = fields(bad);
            assert!(
                matches!(Fields(&map).ttl(&LIMITS), Err(ApiError::InvalidTtl(_))),
                "{map:?}"
            );
        }
        let null = fields(json!({"ttl": null}));
        assert_eq!(Fields(&null).ttl(&LIMITS).unwrap(), None);
    }

    #[test]
    fn wait_rules() {
        let none = fields(json!({}));
        assert_eq!(Fields(&none).wait(&LIMITS).unwrap(), Duration::ZERO);
        for bad in [
            json!({"wait": "abc"}),
            json!({"wait": "6m"}),
            json!({"wait": true}),
        ] {
            let map = fields(bad);
            assert!(matches!(
                Fields(&map).wait(&LIMITS),
                Err(ApiError::InvalidWait(_))
            ));
        }
    }

    #[test]
    fn lock_delay_rules() {
        let none = fields(json!({}));
        assert_eq!(
            Fields(&none).lock_delay(Some(crate::Kind::MUTEX)).unwrap(),
            Duration::ZERO
        );
        for (text, ms) in [("0s", 0), ("1500ms", 1500), ("5s", 5000), ("60s", 60_000)] {
            let map = fields(json!({ "lock_delay": text }));
            assert_eq!(
                Fields(&map)
                    .lock_delay(Some(crate::Kind::Counted(3)))
                    .unwrap(),
                Duration::from_millis(ms)
            );
        }
        for bad in [
            json!({"lock_delay": "61s"}),
            json!({"lock_delay": "1h"}),
            json!({"lock_delay": "abc"}),
            json!({"lock_delay": "-1s"}),
            json!({"lock_delay": -1}),
            json!({"lock_delay": 5}),
            json!({"lock_delay": true}),
        ] {
            let map = fields(bad.clone());
            assert!(
                matches!(
                    Fields(&map).lock_delay(Some(crate::Kind::MUTEX)),
                    Err(ApiError::InvalidLockDelay(_))
                ),
                "{bad}"
            );
        }
        let map = fields(json!({"lock_delay": "5s"}));
        for kind in [
            Some(crate::Kind::Shared),
            Some(crate::Kind::Exclusive),
            None,
        ] {
            assert!(matches!(
                Fields(&map).lock_delay(kind),
                Err(ApiError::InvalidLockDelay(_))
            ));
        }
        let zero = fields(json!({"lock_delay": "0s"}));
        assert_eq!(Fields(&zero).lock_delay(None).unwrap(), Duration::ZERO);
    }

    #[test]
    fn token_rules() {
        let ok = fields(json!({"token": 42}));
        assert_eq!(Fields(&ok).token().unwrap(), 42);
        let whole_float = fields(json!({"token": 42.0}));
        assert_eq!(Fields(&whole_float).token().unwrap(), 42);
        for bad in [
            json!({}),
            json!({"token": -1}),
            json!({"token": "42"}),
            json!({"token": 1.5}),
        ] {
            let map = fields(bad);
            assert!(matches!(
                Fields(&map).token(),
                Err(ApiError::InvalidRequest(_))
            ));
        }
    }

    proptest! {
        /// Any string is either a valid ttl within bounds or an `invalid_ttl`, never a panic.
        #[test]
        fn ttl_parsing_is_total(text in ".{0,40}") {
            let map = fields(json!({"ttl": text}));
            match Fields(&map).ttl(&LIMITS) {
                Ok(Some(ttl)) => prop_assert!(!ttl.is_zero() && ttl <= LIMITS.max_ttl),
                Ok(None) => prop_assert!(false, "a string ttl is never absent"),
                Err(err) => prop_assert!(matches!(err, ApiError::InvalidTtl(_))),
            }
        }

        /// Any JSON object decodes into a valid acquire or into one of the acquire's stable
        /// 400 codes: never a panic, never another error.
        #[test]
        fn acquire_decoding_is_total(body in arbitrary_json_object()) {
            let fields = Fields(&body);
            let decoded = fields
                .string("lease_id", ApiError::InvalidRequest)
                .and_then(|_| fields.ttl(&LIMITS))
                .and_then(|_| fields.wait(&LIMITS))
                .and_then(|_| fields.owner())
                .and_then(|_| fields.kind())
                .and_then(|kind| fields.lock_delay(Some(kind)).map(drop));
            if let Err(err) = decoded {
                prop_assert!(matches!(
                    err,
                    ApiError::InvalidRequest(_)
                        | ApiError::InvalidTtl(_)
                        | ApiError::InvalidWait(_)
                        | ApiError::InvalidLockDelay(_)
                ), "{err:?}");
            }
            // A token is either a non-negative integer or invalid_request.
            match fields.token() {
                Ok(_) | Err(ApiError::InvalidRequest(_)) => {}
                Err(other) => prop_assert!(false, "{other:?}"),
            }
        }

        /// Durations written by humantime parse back to themselves.
        #[test]
        fn durations_round_trip(ms in 1u64..3_600_000) {
            let d = Duration::from_millis(ms);
            let map = fields(json!({"wait": humantime::format_duration(d).to_string()}));
            let parsed = Fields(&map).wait(&Limits { max_ttl: LIMITS.max_ttl, max_wait: Duration::from_secs(3600) });
            prop_assert_eq!(parsed.unwrap(), d);
        }
    }
}
