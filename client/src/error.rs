//! The one error type, mapped from the server's stable error codes.

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
    /// True for errors worth retrying later or elsewhere (`Unavailable`, `Transport`).
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Unavailable { .. } | Error::Transport { .. })
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

/// Maps a non-2xx answer (`status`, raw `body`) to an [`Error`], by the server's stable `code`.
pub(crate) fn from_response(status: u16, body: &[u8]) -> Error {
    let Ok(parsed) = serde_json::from_slice::<ErrorBody>(body) else {
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
            from_response(502, b"<html>bad gateway</html>"),
            Error::Unexpected { code: None, .. }
        ));
    }

    #[test]
    fn lock_held_carries_the_holder() {
        let err = from_response(
            409,
            br#"{"error":{"code":"lock_held","message":"m"},"holder":{"owner":"w1","token":42}}"#,
        );
        let Error::LockHeld { holder: Some(h) } = &err else {
            panic!("{err:?}")
        };
        assert_eq!((h.owner.as_deref(), h.token.get()), (Some("w1"), 42));
        assert_eq!(err.to_string(), "lock is held by token 42 (owner w1)");
    }
}
