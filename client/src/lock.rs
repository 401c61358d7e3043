//! Locks: the acquire builder (mutex, semaphore, read-write), the guard that renews and
//! releases, and lock status.

use std::future::Future;
use std::time::Duration;

use reqwest::Method;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::time::Instant;

use crate::acquire::{self, Hold, LockKind, Options, PositionFn, Target};
use crate::client::{Client, encode};
use crate::error::Error;
use crate::hold::LostReason;
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

/// One entry of a lock's queue: a holder or a waiter (never its handle).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueEntry {
    /// How many entries are ahead of it: 0 for the first holder.
    pub position: u64,
    /// Its fencing token (the one it holds with, or will get when granted).
    pub token: FencingToken,
    /// The lease it holds or waits under.
    pub lease_id: LeaseId,
    /// Who, if they said.
    pub owner: Option<String>,
    /// `shared` or `exclusive` for a read-write lock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// A candidate's value, in an election.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// True if it holds now.
    pub holds: bool,
}

/// Who holds a lock and who waits, in order (`GET /v1/locks/{name}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockStatus {
    /// The lock name.
    pub name: String,
    /// The (first) holder, if any.
    pub holder: Option<Holder>,
    /// Waiters queued behind the holders.
    pub waiters: u64,
    /// A semaphore's limit (1 for a mutex); absent for a read-write lock or a free lock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    /// Holders, then waiters, in order (the server lists at most 1,000).
    #[serde(default)]
    pub queue: Vec<QueueEntry>,
}

impl LockStatus {
    /// How many queue entries are ahead of the one of lease `lease` (0: it is first), or
    /// `None` if that lease holds or waits for nothing here.
    pub fn position_of(&self, lease: &LeaseId) -> Option<u64> {
        self.queue
            .iter()
            .find(|e| &e.lease_id == lease)
            .map(|e| e.position)
    }

    /// The token with which lease `lease` holds this lock now, if it does.
    pub(crate) fn held_by(&self, lease: &LeaseId) -> Option<FencingToken> {
        match self.queue.iter().find(|e| &e.lease_id == lease) {
            Some(entry) => entry.holds.then_some(entry.token),
            None => self
                .holder
                .as_ref()
                .filter(|h| h.lease_id.as_ref() == Some(lease))
                .map(|h| h.token),
        }
    }
}

#[derive(Deserialize)]
struct Renewed {
    ttl_ms: u64,
}

impl Client {
    /// Starts acquiring lock `name`; finish with [`LockBuilder::acquire`] or
    /// [`LockBuilder::try_acquire`]. A mutex unless [`LockBuilder::limit`] (a semaphore) or
    /// [`LockBuilder::shared`] / [`LockBuilder::exclusive`] (a read-write lock) say otherwise.
    pub fn lock<'a>(&self, name: impl Into<String>) -> LockBuilder<'a> {
        LockBuilder {
            options: Options::new(self, Some(Duration::ZERO)),
            name: name.into(),
            kind: LockKind::Mutex,
            lock_delay: Duration::ZERO,
            positions: None,
        }
    }

    /// Who holds lock `name` and who waits, in order.
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
    pub(crate) async fn renew_before(
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
    options: Options<'a>,
    name: String,
    kind: LockKind,
    lock_delay: Duration,
    positions: Option<PositionFn>,
}

impl<'a> LockBuilder<'a> {
    /// The TTL of the lease this lock gets (default [`DEFAULT_TTL`]; etcd's minimum is 2 s).
    /// Not with [`LockBuilder::lease`].
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.options.ttl = Some(ttl);
        self
    }

    /// How long to wait in line if the lock is held (default: don't wait). Any length: a wait
    /// longer than a server grants in one request (its `--max-wait`) is chained from several
    /// requests that keep the same place in line.
    pub fn wait(mut self, wait: Duration) -> Self {
        self.options.wait = Some(wait);
        self
    }

    /// Wait in line as long as it takes (as `flock`, `etcdctl lock` and `consul lock` do by
    /// default). Cancel by dropping the future; a lease granted for the acquire is revoked.
    pub fn wait_forever(mut self) -> Self {
        self.options.wait = None;
        self
    }

    /// Who is asking, shown to others who find the lock held.
    pub fn owner(mut self, owner: impl Into<String>) -> Self {
        self.options.owner = Some(owner.into());
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
        self.options.lease = Some(lease);
        self
    }

    /// A **semaphore**: up to `limit` holders at once, each with its own token; the next waits
    /// in line (FIFO) as for a mutex. Everyone acquiring this name must give the same limit
    /// (otherwise [`Error::Mismatch`] with code `limit_mismatch`). `limit(1)` is a mutex.
    pub fn limit(mut self, limit: u32) -> Self {
        self.kind = LockKind::Limit(limit);
        self
    }

    /// **Lock-delay** (Chubby's, Consul's): if this hold's lease *expires* (the process was
    /// paused or cut off and could not renew), the server grants the lock (a semaphore: that
    /// slot) to nobody else for `delay` afterwards, so a holder that lost its lease unawares
    /// has time to notice and stop before the next one starts. A release, or a revoke of the
    /// lease, is followed by no delay. At most 60 s, rounded up to whole seconds by the server;
    /// default zero (none). Mutexes and semaphores only: with [`LockBuilder::shared`] or
    /// [`LockBuilder::exclusive`] the server refuses it (`invalid_lock_delay`).
    pub fn lock_delay(mut self, delay: Duration) -> Self {
        self.lock_delay = delay;
        self
    }

    /// A **read-write lock**, as a reader: shared holders hold together; an exclusive request
    /// waits for the readers ahead of it and blocks the readers behind it (writers do not
    /// starve). A name used as a plain mutex refuses it ([`Error::Mismatch`], `mode_mismatch`).
    pub fn shared(mut self) -> Self {
        self.kind = LockKind::Shared;
        self
    }

    /// A **read-write lock**, as a writer: holds alone (see [`LockBuilder::shared`]).
    pub fn exclusive(mut self) -> Self {
        self.kind = LockKind::Exclusive;
        self
    }

    /// While the acquire waits in line, tell `on_position` how many queue entries (holders
    /// and waiters) are ahead of it, each time that number changes: "3 ahead of you", then 2,
    /// then 1, then the grant. It runs on the runtime's threads, so keep it short (send the
    /// number to a channel, print it). The count comes from a watch of the lock's queue
    /// ([`Client::watch`]) opened for the wait; if no watch can be had, positions are simply
    /// not reported, and the acquire is not affected.
    pub fn on_position(mut self, on_position: impl FnMut(u64) + Send + 'static) -> Self {
        self.positions = Some(PositionFn(Box::new(on_position)));
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
        let target = Target::Lock {
            name: self.name,
            kind: self.kind,
            lock_delay: self.lock_delay,
        };
        let hold = acquire::acquire(&self.options, target, self.positions).await?;
        Ok(LockGuard { hold })
    }
}

/// A held lock (a mutex, one of a semaphore's holders, or a read-write lock's reader or
/// writer). Renews itself in the background while it lives; released on
/// [`LockGuard::release`] or, in the background, on drop.
///
/// Check [`LockGuard::is_held`] (or await [`LockGuard::lost`], or run the work with
/// [`LockGuard::run_while_held`]) before acting on the protected resource, and pass
/// [`LockGuard::token`] along with every write.
#[derive(Debug)]
pub struct LockGuard {
    hold: Hold,
}

impl LockGuard {
    /// The fencing token of this hold.
    pub fn token(&self) -> FencingToken {
        self.hold.token()
    }

    /// The lock name.
    pub fn name(&self) -> &str {
        &self.hold.target().names()[0]
    }

    /// The lease the lock is held under.
    pub fn lease_id(&self) -> &LeaseId {
        self.hold.lease_id()
    }

    /// The handle of that lease (secret): with it and the token, another process can renew or
    /// release this hold.
    pub fn handle(&self) -> &Handle {
        self.hold.handle()
    }

    /// Who holds it, as the server recorded.
    pub fn owner(&self) -> Option<&str> {
        self.hold.owner()
    }

    /// The TTL the server last confirmed.
    pub fn ttl(&self) -> Duration {
        self.hold.ttl()
    }

    /// True while the hold is safe to act on: not lost by the client-side timer (no renewal
    /// confirmed within `TTL - safety margin` of its sending), not refused by the server, not
    /// released, and (if taken under a shared lease) that lease is alive too.
    pub fn is_held(&self) -> bool {
        self.hold.is_held()
    }

    /// Resolves when the hold is lost, with the reason. Stop touching the protected resource.
    pub async fn lost(&self) -> LostReason {
        self.hold.lost().await
    }

    /// Runs `work` while the lock is held: `Ok` with its output if it finishes first; as soon as
    /// the hold is lost (by the client-side timer, before anyone else can be granted), `work` is
    /// dropped, so cancelled at its next `.await`, and the answer is `Err` with the reason. A
    /// hold already lost does not start `work`. The guard stays yours: release it afterwards.
    ///
    /// ```no_run
    /// # async fn example(client: leasehold::Client) -> Result<(), Box<dyn std::error::Error>> {
    /// let guard = client.lock("reports/nightly").wait_forever().acquire().await?;
    /// let token = guard.token();
    /// match guard.run_while_held(async move { /* write, fenced with token */ token }).await {
    ///     Ok(_) => guard.release().await?,
    ///     Err(reason) => eprintln!("stopped: the lock was lost ({reason})"),
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn run_while_held<F: Future>(&self, work: F) -> Result<F::Output, LostReason> {
        self.hold.run_while_held(work).await
    }

    /// Releases the lock now and reports the outcome (`NotHolder` if the hold had already
    /// ended). A lease granted for this lock alone is revoked too.
    pub async fn release(self) -> Result<(), Error> {
        self.hold.release().await
    }

    /// Stops renewing and forgets the lock *without* releasing it: the hold ends when its lease
    /// expires (one TTL from the last renewal), unless someone renews it by hand with
    /// [`Client::renew`] and the returned token. For handing a hold to another process, and for
    /// simulating a holder that stalls (a GC pause): its token is still the one to fence with.
    pub fn detach(self) -> (String, FencingToken, Handle) {
        let name = self.name().to_owned();
        let (token, handle) = self.hold.detach();
        (name, token, handle)
    }
}
