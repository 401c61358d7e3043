//! TTL leases: granted by the server, kept alive here in the background, revoked on drop.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use reqwest::Method;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::time::Instant;

use crate::client::{Client, Idempotent, humantime_ms};
use crate::error::Error;
use crate::hold::{HoldWatch, Keeper, LostReason, RenewFn};

/// A lease id: 16 hex digits, opaque.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct LeaseId(String);

impl LeaseId {
    /// Wraps an id as printed by the server or the CLI.
    pub fn new(id: impl Into<String>) -> Self {
        Self(id.into())
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What the server knows about a lease (`GET /v1/leases/{id}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseInfo {
    /// The lease.
    pub lease_id: LeaseId,
    /// The granted TTL, in milliseconds.
    pub ttl_ms: u64,
    /// Time left before it expires, in milliseconds (etcd counts whole seconds).
    pub remaining_ms: u64,
    /// Who holds it, if they said.
    pub owner: Option<String>,
    /// Names of the locks held under it now.
    pub locks: Vec<String>,
}

#[derive(Deserialize)]
pub(crate) struct Granted {
    pub lease_id: LeaseId,
    pub ttl_ms: u64,
}

#[derive(Deserialize)]
struct KeptAlive {
    ttl_ms: u64,
}

/// A lease kept alive in the background while this handle lives.
///
/// Several locks may be held under one lease ([`crate::LockBuilder::lease`]); they all end with
/// it. Dropping the handle revokes the lease in the background (when a Tokio runtime is
/// running), which frees every lock held or awaited under it; [`Lease::revoke`] does the same
/// and reports errors.
#[derive(Debug)]
pub struct Lease {
    client: Client,
    id: LeaseId,
    keeper: Keeper,
    /// False once revoked or detached: nothing left to do on drop.
    armed: bool,
}

impl Client {
    /// Grants a lease of at least `ttl` (the server may raise it to etcd's 2 s minimum) and
    /// keeps it alive in the background, at about a third of the TTL.
    pub async fn grant_lease(&self, ttl: Duration) -> Result<Lease, Error> {
        self.grant_lease_for(ttl, None).await
    }

    /// [`Client::grant_lease`] with an owner label, shown to others who find the lock held.
    pub async fn grant_lease_for(
        &self,
        ttl: Duration,
        owner: Option<String>,
    ) -> Result<Lease, Error> {
        let sent = Instant::now();
        let mut body = json!({ "ttl": humantime_ms(ttl) });
        if let Some(owner) = owner {
            body["owner"] = owner.into();
        }
        // Not idempotent: a resent grant may create a second lease. One nobody keeps alive
        // expires by itself after its TTL, so that is tolerable; a refused connection is not
        // even that.
        let granted: Granted = self
            .call(Method::POST, "/v1/leases", Idempotent::No, || {
                (Some(body.clone()), Duration::ZERO)
            })
            .await?;
        Ok(self.keep(granted, sent))
    }

    /// Starts keeping a just-granted lease alive.
    fn keep(&self, granted: Granted, sent: Instant) -> Lease {
        let renew: RenewFn = Arc::new({
            let (client, id) = (self.clone(), granted.lease_id.clone());
            move || {
                let (client, id) = (client.clone(), id.clone());
                Box::pin(async move {
                    client
                        .keep_lease_alive(&id)
                        .await
                        .map(Duration::from_millis)
                })
            }
        });
        let keeper = Keeper::start(
            sent,
            Duration::from_millis(granted.ttl_ms),
            self.inner.safety_margin,
            renew,
        );
        Lease {
            client: self.clone(),
            id: granted.lease_id,
            keeper,
            armed: true,
        }
    }

    /// Refreshes lease `id` once; returns its TTL in milliseconds.
    pub async fn keep_lease_alive(&self, id: &LeaseId) -> Result<u64, Error> {
        let path = format!("/v1/leases/{}/keepalive", id.as_str());
        let kept: KeptAlive = self
            .call(Method::POST, &path, Idempotent::Yes, || {
                (None, Duration::ZERO)
            })
            .await?;
        Ok(kept.ttl_ms)
    }

    /// What the server knows about lease `id`.
    pub async fn lease_info(&self, id: &LeaseId) -> Result<LeaseInfo, Error> {
        let path = format!("/v1/leases/{}", id.as_str());
        self.call(Method::GET, &path, Idempotent::Yes, || {
            (None, Duration::ZERO)
        })
        .await
    }

    /// Revokes lease `id`, freeing every lock held or awaited under it.
    pub async fn revoke_lease(&self, id: &LeaseId) -> Result<(), Error> {
        let path = format!("/v1/leases/{}", id.as_str());
        self.call::<serde_json::Value>(Method::DELETE, &path, Idempotent::Yes, || {
            (None, Duration::ZERO)
        })
        .await
        .map(drop)
    }
}

impl Lease {
    /// The lease id.
    pub fn id(&self) -> &LeaseId {
        &self.id
    }

    /// The TTL the server last confirmed.
    pub fn ttl(&self) -> Duration {
        self.keeper.watch().state().ttl
    }

    /// True until the lease is lost: by the client-side timer (no keep-alive confirmed within
    /// `TTL - safety margin` of its sending), or because the server said it is gone.
    pub fn is_alive(&self) -> bool {
        self.keeper.watch().is_held()
    }

    /// Resolves when the lease is lost, with the reason.
    pub async fn lost(&self) -> LostReason {
        self.keeper.watch().lost().await
    }

    pub(crate) fn watch(&self) -> HoldWatch {
        self.keeper.watch()
    }

    /// Stops the background keep-alive but keeps the timer (a lock guard renews instead).
    pub(crate) fn pause_keepalive(&mut self) {
        self.keeper.pause();
    }

    /// What the server knows about this lease now.
    pub async fn info(&self) -> Result<LeaseInfo, Error> {
        self.client.lease_info(&self.id).await
    }

    /// Revokes the lease now, freeing every lock held or awaited under it.
    pub async fn revoke(mut self) -> Result<(), Error> {
        self.armed = false;
        self.keeper.end(LostReason::Released);
        match self.client.revoke_lease(&self.id).await {
            Err(Error::LeaseNotFound) => Ok(()),
            other => other,
        }
    }

    /// Stops keeping the lease alive and forgets it without revoking: it expires after its TTL
    /// unless someone else (e.g. `leasehold lease keepalive`) refreshes it.
    pub fn detach(mut self) -> LeaseId {
        self.armed = false;
        self.keeper.end(LostReason::Released);
        self.id.clone()
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.keeper.end(LostReason::Released);
        if !self.armed {
            return;
        }
        // Revoke in the background so dropping frees the locks now, not after the TTL. Without
        // a runtime the lease simply expires.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (client, id) = (self.client.clone(), self.id.clone());
            runtime.spawn(async move {
                if let Err(err) = client.revoke_lease(&id).await {
                    tracing::debug!(error = %err, lease = %id, "revoking a dropped lease failed");
                }
            });
        }
    }
}
