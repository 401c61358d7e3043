//! Locks: the acquire builder, the guard that renews and releases, and lock status.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use reqwest::Method;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::time::Instant;

use crate::client::{Client, encode, humantime_ms};
use crate::error::Error;
use crate::hold::{HoldWatch, Keeper, LostReason, RenewFn};
use crate::lease::{Handle, Lease, LeaseId, Slot};
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
            wait: Some(Duration::ZERO),
            owner: None,
            lease: None,
        }
    }

    /// Who holds lock `name` and how many wait.
    pub async fn status(&self, name: &str) -> Result<LockStatus, Error> {
        let path = format!("/v1/locks/{}", encode(name));
        self.call(Method::GET, &path, None, None, || (None, Duration::ZERO))
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
        self.call::<serde_json::Value>(Method::POST, &path, Some(handle), None, || {
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
        self.renew_before(name, token, handle, None).await
    }

    /// [`Client::renew`], confirmed before `deadline` or not at all.
    async fn renew_before(
        &self,
        name: &str,
        token: FencingToken,
        handle: &Handle,
        deadline: Option<Instant>,
    ) -> Result<Duration, Error> {
        let path = format!("/v1/locks/{}/renew", encode(name));
        let body = json!({ "token": token });
        let renewed: Renewed = self
            .call(Method::POST, &path, Some(handle), deadline, || {
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
    /// `None`: wait as long as it takes.
    wait: Option<Duration>,
    owner: Option<String>,
    lease: Option<&'a Lease>,
}

/// One acquire request in flight.
type Link<'b> = Pin<Box<dyn Future<Output = Result<Acquired, Error>> + Send + 'b>>;

impl<'a> LockBuilder<'a> {
    /// The TTL of the lease this lock gets (default [`DEFAULT_TTL`]; etcd's minimum is 2 s).
    /// Not with [`LockBuilder::lease`].
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// How long to wait in line if the lock is held (default: don't wait). Any length: a wait
    /// longer than a server grants in one request (its `--max-wait`) is chained from several
    /// requests that keep the same place in line.
    pub fn wait(mut self, wait: Duration) -> Self {
        self.wait = Some(wait);
        self
    }

    /// Wait in line as long as it takes (as `flock`, `etcdctl lock` and `consul lock` do by
    /// default). Cancel by dropping the future; a lease granted for the acquire is revoked.
    pub fn wait_forever(mut self) -> Self {
        self.wait = None;
        self
    }

    /// Who is asking, shown to others who find the lock held.
    pub fn owner(mut self, owner: impl Into<String>) -> Self {
        self.owner = Some(owner.into());
        self
    }

    /// Hold the lock under this existing lease instead of a new one: the hold ends when the
    /// lease does. Not with [`LockBuilder::ttl`].
    ///
    /// One guard per lock and lease: while a guard of this lease holds (or acquires) the lock,
    /// another acquire of it under the same lease fails with [`Error::AlreadyHeld`] (the server
    /// would answer it with the same hold, and releasing either guard would end both); while a
    /// dropped guard's release is under way, it waits for the release.
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
    /// call granted is revoked, so nothing is left queued. Under a shared lease, an acquire
    /// that is cancelled (its future dropped) or ends without an answer releases in the
    /// background whatever the server may have granted it.
    pub async fn acquire(self) -> Result<LockGuard, Error> {
        if self.ttl.is_some() && self.lease.is_some() {
            return Err(Error::client_input(
                "give either a ttl or a lease, not both",
            ));
        }
        if self.name.is_empty() {
            return Err(Error::client_input("lock name is empty"));
        }
        let (lease_id, handle, lease_watch, mut owned, slots) = match self.lease {
            Some(lease) => (
                lease.id().clone(),
                lease.handle().clone(),
                lease.watch(),
                None,
                lease.slots.clone(),
            ),
            None => {
                let lease = self
                    .client
                    .grant_lease_for(self.ttl.unwrap_or(DEFAULT_TTL), self.owner.clone())
                    .await?;
                let slots = lease.slots.clone();
                (
                    lease.id().clone(),
                    lease.handle().clone(),
                    lease.watch(),
                    Some(lease),
                    slots,
                )
            }
        };
        let mut pending = PendingAcquire {
            slot: Some(slots.take(&self.name).await?),
            // A lease granted for this acquire alone is revoked on failure, which frees all.
            clean_up: owned.is_none().then(|| CleanUp {
                client: self.client.clone(),
                name: self.name.clone(),
                lease_id: lease_id.clone(),
                handle: handle.clone(),
            }),
        };
        let result = tokio::select! {
            result = self.request(&lease_id, &handle) => result,
            // Our lease died while we waited: nothing granted now could be kept anyway.
            reason = lease_watch.lost() => Err(Error::LeaseLost(reason)),
        };
        let acquired = match result {
            Ok(acquired) => acquired,
            Err(err) => {
                // An answer from the server means it left nothing of ours in the queue; without
                // one (timeouts, 503s), it may have granted: the pending acquire cleans up.
                if !(err.is_retryable() || matches!(err, Error::Unexpected { .. })) {
                    pending.clean_up = None;
                }
                drop(pending);
                if let Some(lease) = owned.take()
                    && let Err(revoke) = lease.revoke().await
                {
                    tracing::warn!(error = %revoke, "could not revoke the lease of a failed acquire; it will expire");
                }
                return Err(err);
            }
        };
        pending.clean_up = None;
        let slot = pending.slot.take();
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
            move |deadline| {
                let (client, name, handle) = (client.clone(), name.clone(), handle.clone());
                Box::pin(async move {
                    client
                        .renew_before(&name, token, &handle, Some(deadline))
                        .await
                })
            }
        });
        let keeper = Keeper::start(
            lease_state.confirmed_at,
            lease_state.ttl.min(Duration::from_millis(acquired.ttl_ms)),
            self.client.inner.safety_margin,
            renew,
            format!("lock {:?} token {}", self.name, acquired.token),
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
            slot,
            released: false,
        })
    }

    /// The acquire request: resent (with the wait left) after timeouts and fail-overs, and
    /// after the one early `lock_held` a resumed wait can get when the server cleans up an
    /// abandoned attempt.
    ///
    /// A wait longer than one request may ask of a server is a chain of requests ("links"): the
    /// next link is sent while the previous one still waits, so that it takes over the same
    /// waiter key (same place in line) before the previous link's server gives up and deletes
    /// the key. Only the latest link's answer counts; an earlier link's answer is ignored (its
    /// clean-up no longer matches the key, which the later link rewrote).
    async fn request(&self, lease_id: &LeaseId, handle: &Handle) -> Result<Acquired, Error> {
        let path = format!("/v1/locks/{}/acquire", encode(&self.name));
        // `None`: wait as long as it takes.
        let until = self.wait.and_then(|wait| Instant::now().checked_add(wait));
        let start_link = |now: Instant| -> (Link<'_>, Instant, Duration) {
            let longest = self.client.inner.server_max_wait();
            let end = match until {
                Some(until) if until <= now + longest => until,
                _ => now + longest,
            };
            let link = Box::pin(self.link(&path, lease_id, handle, end));
            (link, end, end - now)
        };
        let (mut current, mut current_end, mut current_wait) = start_link(Instant::now());
        let mut previous: Option<Link<'_>> = None;
        loop {
            let chained = until.is_none_or(|until| until > current_end);
            // Time enough for the next link to reach the server before this one's wait ends.
            let next_at = current_end - (current_wait / 4).min(CHAIN_OVERLAP);
            tokio::select! {
                result = &mut current => match result {
                    Err(Error::LockHeld { .. })
                        if until.is_none_or(|until| {
                            until.saturating_duration_since(Instant::now()) > Duration::from_millis(200)
                        }) =>
                    {
                        tracing::debug!(lock = %self.name, "lock_held before the wait ran out; asking again");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        previous = None;
                        (current, current_end, current_wait) = start_link(Instant::now());
                    }
                    Err(Error::InvalidInput { code, message })
                        if code == "invalid_wait" && current_wait > MIN_LINK_WAIT =>
                    {
                        // The server allows shorter waits than we asked: learn its maximum (or
                        // halve), and ask again; the refused request changed nothing.
                        let max = server_max_wait(&message)
                            .filter(|max| *max < current_wait)
                            .unwrap_or(current_wait / 2)
                            .max(MIN_LINK_WAIT);
                        tracing::debug!(lock = %self.name, max = ?max, "the server's --max-wait is shorter; chaining shorter waits");
                        self.client.inner.lower_server_max_wait(max);
                        previous = None;
                        (current, current_end, current_wait) = start_link(Instant::now());
                    }
                    other => return other,
                },
                () = settle(&mut previous), if previous.is_some() => previous = None,
                () = tokio::time::sleep_until(next_at), if chained && previous.is_none() => {
                    tracing::debug!(lock = %self.name, "still waiting: asking again before the server's wait ends");
                    let (next, end, wait) = start_link(Instant::now());
                    previous = Some(std::mem::replace(&mut current, next));
                    (current_end, current_wait) = (end, wait);
                }
            }
        }
    }

    /// One acquire request, waiting on the server until `until`.
    async fn link(
        &self,
        path: &str,
        lease_id: &LeaseId,
        handle: &Handle,
        until: Instant,
    ) -> Result<Acquired, Error> {
        self.client
            .call(Method::POST, path, Some(handle), None, || {
                let remaining = until.saturating_duration_since(Instant::now());
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
            .await
    }
}

/// How long a chained wait's next request overlaps the previous one at most.
const CHAIN_OVERLAP: Duration = Duration::from_secs(5);

/// The shortest wait one request of a chain asks for.
const MIN_LINK_WAIT: Duration = Duration::from_secs(1);

/// Runs an earlier link of a chained wait to its end (its answer no longer counts).
async fn settle(link: &mut Option<Link<'_>>) {
    match link {
        Some(link) => drop(link.await),
        None => std::future::pending().await,
    }
}

/// The longest wait a server allows, from its `invalid_wait` message ("`wait` is above the
/// maximum of 5m").
fn server_max_wait(message: &str) -> Option<Duration> {
    let (_, rest) = message.split_once("maximum of ")?;
    humantime::parse_duration(rest.trim().trim_end_matches('.')).ok()
}

/// An acquire under a shared lease between sending and answer: dropped before it is finished
/// (the caller cancelled, or no answer came), it releases in the background whatever the server
/// may have granted, since the shared lease lives on and would keep such a hold for nobody.
struct PendingAcquire {
    slot: Option<Slot>,
    clean_up: Option<CleanUp>,
}

struct CleanUp {
    client: Client,
    name: String,
    lease_id: LeaseId,
    handle: Handle,
}

impl Drop for PendingAcquire {
    fn drop(&mut self) {
        let (Some(clean_up), Ok(runtime)) =
            (self.clean_up.take(), tokio::runtime::Handle::try_current())
        else {
            return;
        };
        // Until the clean-up is over, a new acquire of this lock under this lease waits.
        let slot = self.slot.take().map(Slot::releasing);
        runtime.spawn(async move {
            let CleanUp {
                client,
                name,
                lease_id,
                handle,
            } = clean_up;
            // A waiter key that did not become the holder is the server's to delete (it does
            // when the request ends without a grant); a grant is ours to release.
            match client.status(&name).await {
                Ok(LockStatus {
                    holder: Some(holder),
                    ..
                }) if holder.lease_id.as_ref() == Some(&lease_id) => {
                    tracing::debug!(lock = %name, token = %holder.token, "releasing the grant of an abandoned acquire");
                    if let Err(err) = client.release(&name, holder.token, &handle).await {
                        tracing::warn!(lock = %name, error = %err, "could not release the grant of an abandoned acquire");
                    }
                }
                Ok(_) => {}
                Err(err) => {
                    tracing::warn!(lock = %name, error = %err, "could not check for the grant of an abandoned acquire");
                }
            }
            drop(slot);
        });
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
    /// This lock's place among the lease's holds (one guard per lock and lease).
    slot: Option<Slot>,
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
        // Only now may another guard take this lock under the same lease.
        drop(self.slot.take());
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
            // A new acquire of this lock under the shared lease waits for this release: if it
            // went first, this release would end its hold (same lease, same key).
            let slot = self.slot.take().map(Slot::releasing);
            runtime.spawn(async move {
                if let Err(err) = client.release(&name, token, &handle).await {
                    tracing::debug!(error = %err, lock = %name, "releasing a dropped guard failed");
                }
                drop(slot);
            });
        }
    }
}
