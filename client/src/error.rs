//! The one error type, mapped from the server's stable error codes.

use std::time::Duration;

use serde::Deserialize;

use crate::hold::LostReason;
use crate::lock::Holder;
use crate::token::FencingToken;

/// Boxed source of a transport error (kept opaque so `reqwest` is not part of the public API).
type Source = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything that can go wrong talking to Leasehold.
///
/// Variants follow the server's stable error codes (`lock_held`, `not_holder`, ...), so callers
/// can match on what happened rather than on messages.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// `409 lock_held`: someone else holds the lock and it was not freed within the wait.
    #[error("lock is held by {}", match holder {
        Some(h) => format!("token {}{}", h.token, h.owner.as_ref().map(|o| format!(" (owner {o})")).unwrap_or_default()),
        None => "someone else (freed meanwhile)".to_owned(),
    })]
    LockHeld {
        /// The holder when the server gave up, if any (it may have been freed meanwhile).
        holder: Option<Holder>,
    },
    /// `409 limit_mismatch` or `409 mode_mismatch`: the acquire disagrees with the lock's other
    /// holders and waiters about what kind of lock the name is: another semaphore limit, or a
    /// read-write mode asked of a plain mutex (or the reverse). Nothing was queued.
    #[error("{message} ({code})")]
    Mismatch {
        /// `limit_mismatch` or `mode_mismatch`.
        code: String,
        /// The server's message.
        message: String,
    },
    /// `409 not_holder`: this token does not hold the lock (never did, or the hold ended).
    #[error("this token does not hold the lock (the hold ended or never existed)")]
    NotHolder,
    /// `404 lease_not_found`: the lease expired, was revoked, or never existed.
    #[error("lease not found (expired, revoked or never granted)")]
    LeaseNotFound,
    /// `404 not_found`: no such resource (a path the server does not serve).
    #[error("not found: {message}")]
    NotFound {
        /// The server's message.
        message: String,
    },
    /// `400` or `413`: the request was refused as invalid (bad name, TTL, wait, body...).
    #[error("invalid input ({code}): {message}")]
    InvalidInput {
        /// The server's code (`invalid_name`, `invalid_ttl`, ...), or `client` when the client
        /// refused before sending.
        code: String,
        /// What was wrong.
        message: String,
    },
    /// `401 unauthorized`: the server requires a bearer token and got none, or an unknown one.
    #[error("unauthorized: {message}")]
    Unauthorized {
        /// The server's message.
        message: String,
    },
    /// `403 forbidden`: a missing or wrong lease handle, or a lock name outside this tenant's
    /// prefix. Nothing was changed.
    #[error("forbidden: {message}")]
    Forbidden {
        /// The server's message.
        message: String,
    },
    /// `429 quota_exceeded`: a tenant quota (live leases, waiters per lock, TTL) would be
    /// exceeded. Nothing was granted.
    #[error("quota exceeded: {message}")]
    QuotaExceeded {
        /// The server's message.
        message: String,
    },
    /// `503` from every endpoint tried (etcd unreachable, or replicas shutting down).
    #[error("leasehold unavailable ({code}): {message}")]
    Unavailable {
        /// `store_unavailable` or `shutting_down`.
        code: String,
        /// The server's message.
        message: String,
    },
    /// The servers shed the request to protect themselves and etcd (`503 overloaded`,
    /// `503 too_many_connections`, or a `429` other than `quota_exceeded`), and the retries the
    /// policy, the deadline and the retry budget allowed were shed too. Nothing was done; ask
    /// again later, not at once.
    #[error("leasehold overloaded ({code}): {message}{}", retry_after.map(|d| format!(" (retry after {})", humantime::format_duration(d))).unwrap_or_default())]
    Overloaded {
        /// `overloaded`, `too_many_connections`, or the code of the `429`.
        code: String,
        /// The server's message.
        message: String,
        /// The server's `Retry-After`, if it sent one.
        retry_after: Option<Duration>,
    },
    /// This process already holds (or is acquiring, or still releasing) this lock under this
    /// lease, through another [`crate::LockGuard`]: the server would answer the second acquire
    /// with the same hold, and releasing either guard would end both. Use the first guard.
    #[error("lock {name:?} is already held or being acquired under this lease by another guard")]
    AlreadyHeld {
        /// The lock.
        name: String,
    },
    /// No endpoint answered (connection refused, reset, timed out) after every retry.
    #[error("transport error talking to {endpoint}: {message}")]
    Transport {
        /// The last endpoint tried.
        endpoint: String,
        /// What happened, in short.
        message: String,
        /// The underlying HTTP error.
        #[source]
        source: Source,
    },
    /// The lease under an acquire in progress was lost (its keep-alive stopped being confirmed
    /// in time, or the server said it is gone).
    #[error("the lease was lost while acquiring: {0}")]
    LeaseLost(LostReason),
    /// The server answered something this client does not understand (unknown code or status,
    /// malformed JSON): a version mismatch or a proxy in the way.
    #[error("unexpected answer (HTTP {status}, code {code:?}): {message}")]
    Unexpected {
        /// The HTTP status.
        status: u16,
        /// The error code, if the body had one.
        code: Option<String>,
        /// Details.
        message: String,
    },
}

impl Error {
    /// True for errors worth retrying later or elsewhere (`Unavailable`, `Overloaded`,
    /// `Transport`).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Error::Unavailable { .. } | Error::Overloaded { .. } | Error::Transport { .. }
        )
    }

    /// A stable snake_case code for this error: the server's code where it sent one
    /// (`lock_held`, `invalid_ttl`, `store_unavailable`, ...), else one of `transport`,
    /// `lease_lost`, `already_held`, `unexpected`, or `client` for input the client refused
    /// before sending. What `leasehold --output json` prints.
    pub fn code(&self) -> &str {
        match self {
            Error::LockHeld { .. } => "lock_held",
            Error::NotHolder => "not_holder",
            Error::LeaseNotFound => "lease_not_found",
            Error::NotFound { .. } => "not_found",
            Error::InvalidInput { code, .. }
            | Error::Unavailable { code, .. }
            | Error::Overloaded { code, .. }
            | Error::Mismatch { code, .. } => code,
            Error::Unauthorized { .. } => "unauthorized",
            Error::Forbidden { .. } => "forbidden",
            Error::QuotaExceeded { .. } => "quota_exceeded",
            Error::Transport { .. } => "transport",
            Error::LeaseLost(_) => "lease_lost",
            Error::AlreadyHeld { .. } => "already_held",
            Error::Unexpected { .. } => "unexpected",
        }
    }

    /// An `InvalidInput` raised by the client itself, before sending anything.
    pub(crate) fn client_input(message: impl Into<String>) -> Self {
        Error::InvalidInput {
            code: "client".into(),
            message: message.into(),
        }
    }
}

#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
    #[serde(default)]
    holder: Option<HolderBrief>,
}

#[derive(Deserialize)]
struct ErrorDetail {
    code: String,
    #[serde(default)]
    message: String,
}

#[derive(Deserialize)]
struct HolderBrief {
    owner: Option<String>,
    token: FencingToken,
}

/// Maps a non-2xx answer (`status`, raw `body`, its `Retry-After`) to an [`Error`], by the
/// server's stable `code`.
pub(crate) fn from_response(status: u16, body: &[u8], retry_after: Option<Duration>) -> Error {
    let Ok(parsed) = serde_json::from_slice::<ErrorBody>(body) else {
        // A proxy or load balancer in front of the servers answers in its own words; its 503 and
        // 429 still mean "not now".
        let message: String = String::from_utf8_lossy(body).chars().take(200).collect();
        match status {
            503 => {
                return Error::Unavailable {
                    code: "service_unavailable".into(),
                    message,
                };
            }
            429 => {
                return Error::Overloaded {
                    code: "too_many_requests".into(),
                    message,
                    retry_after,
                };
            }
            _ => {}
        }
        return Error::Unexpected {
            status,
            code: None,
            message: String::from_utf8_lossy(body).chars().take(200).collect(),
        };
    };
    let ErrorDetail { code, message } = parsed.error;
    match (status, code.as_str()) {
        (409, "lock_held") => Error::LockHeld {
            holder: parsed.holder.map(|h| Holder {
                owner: h.owner,
                token: h.token,
                lease_id: None,
            }),
        },
        (409, "not_holder") => Error::NotHolder,
        (409, "limit_mismatch" | "mode_mismatch") => Error::Mismatch { code, message },
        (401, "unauthorized") => Error::Unauthorized { message },
        (403, "forbidden") => Error::Forbidden { message },
        (429, "quota_exceeded") => Error::QuotaExceeded { message },
        (404, "lease_not_found") => Error::LeaseNotFound,
        (404, "not_found") => Error::NotFound { message },
        (
            400,
            "invalid_json" | "invalid_name" | "invalid_ttl" | "invalid_wait" | "invalid_request",
        )
        | (413, "body_too_large") => Error::InvalidInput { code, message },
        (503, "store_unavailable" | "shutting_down") => Error::Unavailable { code, message },
        (503, "overloaded" | "too_many_connections") | (429, _) => Error::Overloaded {
            code,
            message,
            retry_after,
        },
        _ => Error::Unexpected {
            status,
            code: Some(code),
            message,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(status: u16, code: &str) -> Error {
        from_response(
            status,
            format!(r#"{{"error":{{"code":"{code}","message":"m"}}}}"#).as_bytes(),
            Some(Duration::from_secs(2)),
        )
    }

    /// Every stable server code maps to its variant; anything else is `Unexpected`.
    #[test]
    fn every_server_code_maps_to_its_variant() {
        for code in [
            "invalid_json",
            "invalid_name",
            "invalid_ttl",
            "invalid_wait",
            "invalid_request",
        ] {
            assert!(
                matches!(map(400, code), Error::InvalidInput { code: c, .. } if c == code),
                "{code}"
            );
        }
        assert!(matches!(
            map(413, "body_too_large"),
            Error::InvalidInput { .. }
        ));
        assert!(matches!(map(404, "lease_not_found"), Error::LeaseNotFound));
        assert!(matches!(map(404, "not_found"), Error::NotFound { .. }));
        assert!(matches!(map(409, "not_holder"), Error::NotHolder));
        for code in ["limit_mismatch", "mode_mismatch"] {
            let err = map(409, code);
            assert!(
                matches!(&err, Error::Mismatch { code: c, .. } if c == code),
                "{code}"
            );
            assert_eq!(err.code(), code);
            assert!(!err.is_retryable());
        }
        assert!(matches!(
            map(401, "unauthorized"),
            Error::Unauthorized { .. }
        ));
        assert!(matches!(map(403, "forbidden"), Error::Forbidden { .. }));
        assert!(matches!(
            map(429, "quota_exceeded"),
            Error::QuotaExceeded { .. }
        ));
        assert!(matches!(
            map(409, "lock_held"),
            Error::LockHeld { holder: None }
        ));
        for code in ["store_unavailable", "shutting_down"] {
            let err = map(503, code);
            assert!(matches!(err, Error::Unavailable { .. }), "{code}");
            assert!(err.is_retryable());
        }
        assert!(matches!(
            map(405, "method_not_allowed"),
            Error::Unexpected {
                status: 405,
                code: Some(_),
                ..
            }
        ));
        assert!(matches!(map(409, "brand_new"), Error::Unexpected { .. }));
        assert!(matches!(
            from_response(502, b"<html>bad gateway</html>", None),
            Error::Unexpected { code: None, .. }
        ));
        for code in ["overloaded", "too_many_connections"] {
            let err = map(503, code);
            assert!(
                matches!(&err, Error::Overloaded { retry_after: Some(d), .. } if *d == Duration::from_secs(2)),
                "{err:?}"
            );
            assert!(err.is_retryable());
            assert_eq!(err.code(), code);
        }
        assert!(matches!(map(429, "overloaded"), Error::Overloaded { .. }));
        assert!(!map(429, "quota_exceeded").is_retryable());
        assert!(matches!(
            from_response(503, b"<html>busy</html>", None),
            Error::Unavailable { .. }
        ));
        assert!(matches!(
            from_response(429, b"slow down", None),
            Error::Overloaded { .. }
        ));
    }

    #[test]
    fn lock_held_carries_the_holder() {
        let err = from_response(
            409,
            br#"{"error":{"code":"lock_held","message":"m"},"holder":{"owner":"w1","token":42}}"#,
            None,
        );
        let Error::LockHeld { holder: Some(h) } = &err else {
            panic!("{err:?}")
        };
        assert_eq!((h.owner.as_deref(), h.token.get()), (Some("w1"), 42));
        assert_eq!(err.to_string(), "lock is held by token 42 (owner w1)");
        assert_eq!(err.code(), "lock_held");
    }
}
