//! Locks: the acquire builder, the guard that renews and releases, and lock status.

use std::sync::Arc;
use std::time::Duration;

use reqwest::Method;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::time::Instant;

use crate::client::{Client, encode, humantime_ms};
use crate::error::Error;
use crate::hold::{HoldWatch, Keeper, LostReason, RenewFn};
use crate::lease::{Handle, Lease, LeaseId};
use crate::token::FencingToken;

/// The TTL of the lease a lock gets when neither `.ttl()` nor `.lease()` is given.
pub const DEFAULT_TTL: Duration = Duration::from_secs(10);

/// Who holds a lock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    /// Who holds it, if they said.
    pub owner: Option<String>,
    /// The holder's fencing token.
    pub token: FencingToken,
    /// The lease it is held under (not reported in `lock_held` errors).
    #[serde(default)]
    pub lease_id: Option<LeaseId>,
}

/// Who holds a lock and how many wait (`GET /v1/locks/{name}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockStatus {
    /// The lock name.
    pub name: String,
    /// The holder, if any.
    pub holder: Option<Holder>,
    /// Waiters queued behind the holder.
    pub waiters: u64,
}

#[derive(Deserialize)]
struct Acquired {
    token: FencingToken,
    ttl_ms: u64,
    owner: Option<String>,
}

#[derive(Deserialize)]
struct Renewed {
    ttl_ms: u64,
}

impl Client {
    /// Starts acquiring lock `name`; finish with [`LockBuilder::acquire`] or
    /// [`LockBuilder::try_acquire`].
    pub fn lock<'a>(&self, name: impl Into<String>) -> LockBuilder<'a> {
        LockBuilder {
            client: self.clone(),
            name: name.into(),
            ttl: None,
            wait: Duration::ZERO,
            owner: None,
            lease: None,
        }
    }

    /// Who holds lock `name` and how many wait.
    pub async fn status(&self, name: &str) -> Result<LockStatus, Error> {
        let path = format!("/v1/locks/{}", encode(name));
        self.call(Method::GET, &path, None, || (None, Duration::ZERO))
            .await
    }

    /// Releases lock `name` if `token` holds it under the lease `handle` names (for tools; a
    /// [`LockGuard`] releases itself).
    pub async fn release(
        &self,
        name: &str,
        token: FencingToken,
        handle: &Handle,
    ) -> Result<(), Error> {
        let path = format!("/v1/locks/{}/release", encode(name));
        let body = json!({ "token": token });
        // Resending is safe: the server fences a release against a later re-acquire, and a
        // release whose first attempt went unanswered and then finds the hold gone succeeds.
        self.call::<serde_json::Value>(Method::POST, &path, Some(handle), || {
            (Some(body.clone()), Duration::ZERO)
        })
        .await
        .map(drop)
    }

    /// Extends the lease holding `name` if `token` still holds it; returns the TTL.
    pub async fn renew(
        &self,
        name: &str,
        token: FencingToken,
        handle: &Handle,
    ) -> Result<Duration, Error> {
        let path = format!("/v1/locks/{}/renew", encode(name));
        let body = json!({ "token": token });
        let renewed: Renewed = self
            .call(Method::POST, &path, Some(handle), || {
                (Some(body.clone()), Duration::ZERO)
            })
            .await?;
        Ok(Duration::from_millis(renewed.ttl_ms))
    }
}

/// How to acquire a lock; from [`Client::lock`].
#[derive(Debug)]
#[must_use = "call .acquire() or .try_acquire()"]
pub struct LockBuilder<'a> {
    client: Client,
    name: String,
    ttl: Option<Duration>,
    wait: Duration,
    owner: Option<String>,
    lease: Option<&'a Lease>,
}

impl<'a> LockBuilder<'a> {
    /// The TTL of the lease this lock gets (default [`DEFAULT_TTL`]; etcd's minimum is 2 s).
    /// Not with [`LockBuilder::lease`].
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// How long to wait in line if the lock is held (default: don't wait).
    pub fn wait(mut self, wait: Duration) -> Self {
        self.wait = wait;
        self
    }

    /// Who is asking, shown to others who find the lock held.
    pub fn owner(mut self, owner: impl Into<String>) -> Self {
        self.owner = Some(owner.into());
        self
    }

    /// Hold the lock under this existing lease instead of a new one: the hold ends when the
    /// lease does. Not with [`LockBuilder::ttl`].
    pub fn lease(mut self, lease: &'a Lease) -> Self {
        self.lease = Some(lease);
        self
    }

    /// Tries once, without waiting in line.
    pub async fn try_acquire(self) -> Result<LockGuard, Error> {
        self.wait(Duration::ZERO).acquire().await
    }

    /// Acquires the lock, waiting in line up to the wait.
    ///
    /// Safe to retry and to fail over: the lock is asked for under a lease id (the client grants
    /// its own lease first unless one is given), and the server treats a repeated acquire under
    /// the same lease as the same place in line. If the acquire finally fails, the lease this
    /// call granted is revoked, so nothing is left queued.
    pub async fn acquire(self) -> Result<LockGuard, Error> {
        if self.ttl.is_some() && self.lease.is_some() {
            return Err(Error::client_input(
                "give either a ttl or a lease, not both",
            ));
        }
        if self.name.is_empty() {
            return Err(Error::client_input("lock name is empty"));
        }
        let (lease_id, handle, lease_watch, mut owned) = match self.lease {
            Some(lease) => (
                lease.id().clone(),
                lease.handle().clone(),
                lease.watch(),
                None,
            ),
            None => {
                let lease = self
                    .client
                    .grant_lease_for(self.ttl.unwrap_or(DEFAULT_TTL), self.owner.clone())
                    .await?;
                (
                    lease.id().clone(),
                    lease.handle().clone(),
                    lease.watch(),
                    Some(lease),
                )
            }
        };
        let result = tokio::select! {
            result = self.request(&lease_id, &handle) => result,
            // Our lease died while we waited: nothing granted now could be kept anyway.
            reason = lease_watch.lost() => Err(Error::LeaseLost(reason)),
        };
        let acquired = match result {
            Ok(acquired) => acquired,
            Err(err) => {
                if let Some(lease) = owned.take()
                    && let Err(revoke) = lease.revoke().await
                {
                    tracing::warn!(error = %revoke, "could not revoke the lease of a failed acquire; it will expire");
                }
                return Err(err);
            }
        };
        // The hold is as fresh as the lease's last confirmed keep-alive; from now on lock
        // renewals (which also refresh the lease) keep both.
        let lease_state = lease_watch.state();
        if let Some(lease) = owned.as_mut() {
            lease.pause_keepalive();
        }
        let renew: RenewFn = Arc::new({
            let (client, name, token, handle) = (
                self.client.clone(),
                self.name.clone(),
                acquired.token,
                handle.clone(),
            );
            move || {
                let (client, name, handle) = (client.clone(), name.clone(), handle.clone());
                Box::pin(async move { client.renew(&name, token, &handle).await })
            }
        });
        let keeper = Keeper::start(
            lease_state.confirmed_at,
            lease_state.ttl.min(Duration::from_millis(acquired.ttl_ms)),
            self.client.inner.safety_margin,
            renew,
        );
        Ok(LockGuard {
            client: self.client.clone(),
            name: self.name,
            token: acquired.token,
            lease_id,
            handle,
            owner: acquired.owner,
            keeper,
            shared_lease: owned.is_none().then_some(lease_watch),
            owned_lease: owned,
            released: false,
        })
    }

    /// The acquire request, resent (with the wait left) after timeouts, fail-overs, and the one
    /// early `lock_held` a resumed wait can get when the server cleans up the abandoned attempt.
    async fn request(&self, lease_id: &LeaseId, handle: &Handle) -> Result<Acquired, Error> {
        let path = format!("/v1/locks/{}/acquire", encode(&self.name));
        let deadline = Instant::now() + self.wait;
        loop {
            let result = self
                .client
                .call(Method::POST, &path, Some(handle), || {
                    let remaining = deadline.saturating_duration_since(Instant::now());
                    let mut body = json!({
                        "lease_id": lease_id,
                        "wait": humantime_ms(remaining),
                    });
                    if let Some(owner) = &self.owner {
                        body["owner"] = owner.clone().into();
                    }
                    // The attempt may take the whole wait before the server answers.
                    (Some(body), remaining)
                })
                .await;
            match result {
                Err(Error::LockHeld { .. })
                    if deadline.saturating_duration_since(Instant::now())
                        > Duration::from_millis(200) =>
                {
                    tracing::debug!(lock = %self.name, "lock_held before the wait ran out; asking again");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                other => return other,
            }
        }
    }
}

/// A held lock. Renews itself in the background while it lives; released on
/// [`LockGuard::release`] or, in the background, on drop.
///
/// Check [`LockGuard::is_held`] (or await [`LockGuard::lost`]) before acting on the protected
/// resource, and pass [`LockGuard::token`] along with every write.
#[derive(Debug)]
pub struct LockGuard {
    client: Client,
    name: String,
    token: FencingToken,
    lease_id: LeaseId,
    handle: Handle,
    owner: Option<String>,
    keeper: Keeper,
    /// The caller's lease, when the lock was taken under one: its loss is ours.
    shared_lease: Option<HoldWatch>,
    /// The lease the acquire granted for this lock alone: revoked with the lock.
    owned_lease: Option<Lease>,
    released: bool,
}

impl LockGuard {
    /// The fencing token of this hold.
    pub fn token(&self) -> FencingToken {
        self.token
    }

    /// The lock name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The lease the lock is held under.
    pub fn lease_id(&self) -> &LeaseId {
        &self.lease_id
    }

    /// The handle of that lease (secret): with it and the token, another process can renew or
    /// release this hold.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// Who holds it, as the server recorded.
    pub fn owner(&self) -> Option<&str> {
        self.owner.as_deref()
    }

    /// The TTL the server last confirmed.
    pub fn ttl(&self) -> Duration {
        self.keeper.watch().state().ttl
    }

    /// True while the hold is safe to act on: not lost by the client-side timer (no renewal
    /// confirmed within `TTL - safety margin` of its sending), not refused by the server, not
    /// released, and (if taken under a shared lease) that lease is alive too.
    pub fn is_held(&self) -> bool {
        self.keeper.watch().is_held() && self.shared_lease.as_ref().is_none_or(|l| l.is_held())
    }

    /// Resolves when the hold is lost, with the reason. Stop touching the protected resource.
    pub async fn lost(&self) -> LostReason {
        let own = self.keeper.watch();
        match &self.shared_lease {
            None => own.lost().await,
            Some(lease) => tokio::select! {
                reason = own.lost() => reason,
                reason = lease.lost() => reason,
            },
        }
    }

    /// Releases the lock now and reports the outcome (`NotHolder` if the hold had already
    /// ended). A lease granted for this lock alone is revoked too.
    pub async fn release(mut self) -> Result<(), Error> {
        self.released = true;
        self.keeper.end(LostReason::Released);
        let result = self
            .client
            .release(&self.name, self.token, &self.handle)
            .await;
        if let Some(lease) = self.owned_lease.take() {
            // Also frees the lock if the release could not get through.
            if let Err(err) = lease.revoke().await {
                tracing::debug!(error = %err, "revoking the lock's lease failed; it will expire");
            }
        }
        result
    }

    /// Stops renewing and forgets the lock *without* releasing it: the hold ends when its lease
    /// expires (one TTL from the last renewal), unless someone renews it by hand with
    /// [`Client::renew`] and the returned token. For handing a hold to another process, and for
    /// simulating a holder that stalls (a GC pause): its token is still the one to fence with.
    pub fn detach(mut self) -> (String, FencingToken, Handle) {
        self.released = true;
        self.keeper.end(LostReason::Released);
        if let Some(lease) = self.owned_lease.take() {
            let _ = lease.detach();
        }
        (
            std::mem::take(&mut self.name),
            self.token,
            self.handle.clone(),
        )
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        self.keeper.end(LostReason::Released);
        if self.released {
            return;
        }
        // An owned lease revokes itself when dropped just after this, which frees the lock.
        if self.owned_lease.is_some() {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (client, name, token, handle) = (
                self.client.clone(),
                self.name.clone(),
                self.token,
                self.handle.clone(),
            );
            runtime.spawn(async move {
                if let Err(err) = client.release(&name, token, &handle).await {
                    tracing::debug!(error = %err, lock = %name, "releasing a dropped guard failed");
                }
            });
        }
    }
}
