//! The same client for programs without an async runtime, as `reqwest::blocking` is for
//! `reqwest`.
//!
//! A [`Client`] runs a small Tokio runtime of its own (one worker thread), which renews holds
//! and keeps leases alive in the background while your threads work; each call blocks the
//! calling thread until it is done. Dropping a [`LockGuard`] releases the lock, and dropping a
//! [`Lease`] revokes it, before the drop returns.
//!
//! Like `reqwest::blocking`, these calls must not be made from inside an async runtime (they
//! panic there); use the async [`crate::Client`] instead.
//!
//! Besides plain locks: semaphores and read-write locks through the [`LockBuilder`]
//! (`.limit(n)`, `.shared()`, `.exclusive()`), and leader election ([`Client::election`]:
//! campaign, leader). Groups, watches and `run_while_held` need futures: use the async client.
//!
//! ```no_run
//! # fn example() -> Result<(), leasehold::Error> {
//! use std::time::Duration;
//! let client = leasehold::blocking::Client::new("http://127.0.0.1:7070")?;
//! let guard = client
//!     .lock("reports/nightly")
//!     .ttl(Duration::from_secs(10))
//!     .wait(Duration::from_secs(30))
//!     .acquire()?;
//! // Pass the token with every write; check is_held() before each step.
//! while guard.is_held() {
//!     /* one step of the work, fenced with guard.token() */
//!     # break;
//! }
//! guard.release()?;
//! # Ok(()) }
//! ```

use std::sync::Arc;
use std::time::Duration;

use crate::{
    ClientBuilder, Error, FencingToken, Handle, Leader, LeaseId, LeaseInfo, LockStatus, LostReason,
};

/// The runtime behind a blocking client, shared by its guards and leases. Shut down without
/// waiting when the last of them goes (so that dropping one inside an async context, which is a
/// misuse, does not also panic).
#[derive(Debug)]
struct Runtime(Option<tokio::runtime::Runtime>);

impl Runtime {
    fn block_on<F: std::future::Future>(&self, future: F) -> F::Output {
        self.0
            .as_ref()
            .expect("the runtime lives until dropped")
            .block_on(future)
    }

    fn handle(&self) -> &tokio::runtime::Handle {
        self.0
            .as_ref()
            .expect("the runtime lives until dropped")
            .handle()
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// A blocking Leasehold client. Cheap to clone; clones share connections and the runtime.
#[derive(Debug, Clone)]
pub struct Client {
    inner: crate::Client,
    runtime: Arc<Runtime>,
}

impl Client {
    /// A client for one endpoint with default settings, e.g. `Client::new("http://127.0.0.1:7070")`.
    pub fn new(endpoint: impl Into<String>) -> Result<Self, Error> {
        Self::from_builder(crate::Client::builder().endpoint(endpoint))
    }

    /// A client configured with the async client's builder (endpoints, timeouts, retries).
    pub fn from_builder(builder: ClientBuilder) -> Result<Self, Error> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("leasehold-blocking")
            .enable_all()
            .build()
            .map_err(|err| Error::client_input(format!("cannot start a runtime: {err}")))?;
        // The HTTP client is built inside the runtime, as reqwest expects.
        let inner = {
            let _entered = runtime.enter();
            builder.build()?
        };
        Ok(Self {
            inner,
            runtime: Arc::new(Runtime(Some(runtime))),
        })
    }

    /// The async client underneath (for code that has both worlds).
    pub fn as_async(&self) -> &crate::Client {
        &self.inner
    }

    /// The endpoints, in order of preference.
    pub fn endpoints(&self) -> &[String] {
        self.inner.endpoints()
    }

    /// Calls another endpoint answered after one failed (see [`crate::Client::failovers`]).
    pub fn failovers(&self) -> u64 {
        self.inner.failovers()
    }

    /// Opens a connection ahead of need (see [`crate::Client::warm_up`]).
    pub fn warm_up(&self) -> Result<(), Error> {
        self.runtime.block_on(self.inner.warm_up())
    }

    /// Starts acquiring lock `name`; finish with [`LockBuilder::acquire`] or
    /// [`LockBuilder::try_acquire`].
    pub fn lock<'a>(&self, name: impl Into<String>) -> LockBuilder<'a> {
        LockBuilder {
            inner: self.inner.lock(name),
            runtime: self.runtime.clone(),
        }
    }

    /// Election `name`: campaign to lead it, or see who leads (see
    /// [`crate::Client::election`]).
    pub fn election<'a>(&self, name: impl Into<String>) -> Election<'a> {
        Election {
            inner: self.inner.election(name),
            runtime: self.runtime.clone(),
        }
    }

    /// Who holds lock `name` and who waits, in order.
    pub fn status(&self, name: &str) -> Result<LockStatus, Error> {
        self.runtime.block_on(self.inner.status(name))
    }

    /// Releases lock `name` if `token` holds it under the lease `handle` names.
    pub fn release(&self, name: &str, token: FencingToken, handle: &Handle) -> Result<(), Error> {
        self.runtime
            .block_on(self.inner.release(name, token, handle))
    }

    /// Extends the lease holding `name` if `token` still holds it; returns the TTL.
    pub fn renew(
        &self,
        name: &str,
        token: FencingToken,
        handle: &Handle,
    ) -> Result<Duration, Error> {
        self.runtime.block_on(self.inner.renew(name, token, handle))
    }

    /// Grants a lease of at least `ttl` and keeps it alive in the background.
    pub fn grant_lease(&self, ttl: Duration) -> Result<Lease, Error> {
        self.grant_lease_for(ttl, None)
    }

    /// [`Client::grant_lease`] with an owner label.
    pub fn grant_lease_for(&self, ttl: Duration, owner: Option<String>) -> Result<Lease, Error> {
        let lease = self
            .runtime
            .block_on(self.inner.grant_lease_for(ttl, owner))?;
        Ok(self.wrap_lease(lease))
    }

    /// [`Client::grant_lease_for`] that waits up to `wait` for a place in a full waiting room
    /// (see [`crate::Client::grant_lease_waiting`]).
    pub fn grant_lease_waiting(
        &self,
        ttl: Duration,
        owner: Option<String>,
        wait: Duration,
    ) -> Result<Lease, Error> {
        let lease = self
            .runtime
            .block_on(self.inner.grant_lease_waiting(ttl, owner, wait))?;
        Ok(self.wrap_lease(lease))
    }

    /// Takes over keeping alive a lease granted elsewhere (see
    /// [`crate::Client::attach_lease`]).
    pub fn attach_lease(&self, id: LeaseId, handle: Handle) -> Result<Lease, Error> {
        let lease = self.runtime.block_on(self.inner.attach_lease(id, handle))?;
        Ok(self.wrap_lease(lease))
    }

    fn wrap_lease(&self, lease: crate::Lease) -> Lease {
        Lease {
            inner: Some(lease),
            runtime: self.runtime.clone(),
        }
    }

    /// Refreshes lease `id` once; returns its TTL in milliseconds.
    pub fn keep_lease_alive(&self, id: &LeaseId, handle: &Handle) -> Result<u64, Error> {
        self.runtime
            .block_on(self.inner.keep_lease_alive(id, handle))
    }

    /// What the server knows about lease `id`.
    pub fn lease_info(&self, id: &LeaseId) -> Result<LeaseInfo, Error> {
        self.runtime.block_on(self.inner.lease_info(id))
    }

    /// Revokes lease `id`; a lease already gone counts as revoked.
    pub fn revoke_lease(&self, id: &LeaseId, handle: &Handle) -> Result<(), Error> {
        self.runtime.block_on(self.inner.revoke_lease(id, handle))
    }
}

/// How to acquire a lock; from [`Client::lock`]. The options are those of
/// [`crate::LockBuilder`].
#[derive(Debug)]
#[must_use = "call .acquire() or .try_acquire()"]
pub struct LockBuilder<'a> {
    inner: crate::LockBuilder<'a>,
    runtime: Arc<Runtime>,
}

impl<'a> LockBuilder<'a> {
    /// The TTL of the lease this lock gets (see [`crate::LockBuilder::ttl`]).
    pub fn ttl(self, ttl: Duration) -> Self {
        self.map(|b| b.ttl(ttl))
    }

    /// How long to wait in line (see [`crate::LockBuilder::wait`]).
    pub fn wait(self, wait: Duration) -> Self {
        self.map(|b| b.wait(wait))
    }

    /// Wait in line as long as it takes.
    pub fn wait_forever(self) -> Self {
        self.map(|b| b.wait_forever())
    }

    /// Who is asking, shown to others who find the lock held.
    pub fn owner(self, owner: impl Into<String>) -> Self {
        self.map(|b| b.owner(owner))
    }

    /// Hold the lock under this lease (see [`crate::LockBuilder::lease`]).
    pub fn lease(self, lease: &'a Lease) -> Self {
        self.map(|b| b.lease(lease.inner()))
    }

    /// A semaphore of up to `limit` holders (see [`crate::LockBuilder::limit`]).
    pub fn limit(self, limit: u32) -> Self {
        self.map(|b| b.limit(limit))
    }

    /// A read-write lock's reader (see [`crate::LockBuilder::shared`]).
    pub fn shared(self) -> Self {
        self.map(|b| b.shared())
    }

    /// A read-write lock's writer (see [`crate::LockBuilder::exclusive`]).
    pub fn exclusive(self) -> Self {
        self.map(|b| b.exclusive())
    }

    /// While waiting, tell `on_position` how many are ahead in line (see
    /// [`crate::LockBuilder::on_position`]); it runs on the client's background thread.
    pub fn on_position(self, on_position: impl FnMut(u64) + Send + 'static) -> Self {
        self.map(|b| b.on_position(on_position))
    }

    fn map(self, f: impl FnOnce(crate::LockBuilder<'a>) -> crate::LockBuilder<'a>) -> Self {
        Self {
            inner: f(self.inner),
            runtime: self.runtime,
        }
    }

    /// Tries once, without waiting in line.
    pub fn try_acquire(self) -> Result<LockGuard, Error> {
        self.wait(Duration::ZERO).acquire()
    }

    /// Acquires the lock, waiting in line up to the wait; blocks until then.
    pub fn acquire(self) -> Result<LockGuard, Error> {
        let guard = self.runtime.block_on(self.inner.acquire())?;
        Ok(LockGuard {
            inner: Some(guard),
            runtime: self.runtime,
        })
    }
}

/// A held lock, renewed in the background; released by [`LockGuard::release`] or on drop.
#[derive(Debug)]
pub struct LockGuard {
    /// `None` once released or detached.
    inner: Option<crate::LockGuard>,
    runtime: Arc<Runtime>,
}

impl LockGuard {
    fn inner(&self) -> &crate::LockGuard {
        self.inner.as_ref().expect("present until consumed")
    }

    /// The fencing token of this hold.
    pub fn token(&self) -> FencingToken {
        self.inner().token()
    }

    /// The lock name.
    pub fn name(&self) -> &str {
        self.inner().name()
    }

    /// The lease the lock is held under.
    pub fn lease_id(&self) -> &LeaseId {
        self.inner().lease_id()
    }

    /// The handle of that lease (secret).
    pub fn handle(&self) -> &Handle {
        self.inner().handle()
    }

    /// Who holds it, as the server recorded.
    pub fn owner(&self) -> Option<&str> {
        self.inner().owner()
    }

    /// The TTL the server last confirmed.
    pub fn ttl(&self) -> Duration {
        self.inner().ttl()
    }

    /// True while the hold is safe to act on (see [`crate::LockGuard::is_held`]).
    pub fn is_held(&self) -> bool {
        self.inner().is_held()
    }

    /// Blocks until the hold is lost, and says why.
    pub fn lost(&self) -> LostReason {
        self.runtime.block_on(self.inner().lost())
    }

    /// Blocks until the hold is lost or `timeout` passes: `Some(reason)` if it was lost.
    pub fn lost_within(&self, timeout: Duration) -> Option<LostReason> {
        // The timer must be made inside the runtime.
        self.runtime
            .block_on(async { tokio::time::timeout(timeout, self.inner().lost()).await })
            .ok()
    }

    /// Releases the lock now and reports the outcome.
    pub fn release(mut self) -> Result<(), Error> {
        let guard = self.inner.take().expect("present until consumed");
        self.runtime.block_on(guard.release())
    }

    /// Stops renewing and forgets the lock without releasing it (see
    /// [`crate::LockGuard::detach`]).
    pub fn detach(mut self) -> (String, FencingToken, Handle) {
        self.inner.take().expect("present until consumed").detach()
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if let Some(guard) = self.inner.take() {
            release_on(&self.runtime, guard.release());
        }
    }
}

/// Runs the release of a dropped guard or lease: to the end, before the drop returns, unless
/// the drop happens inside an async runtime (where blocking would panic): then in the
/// background on our runtime.
fn release_on(
    runtime: &Runtime,
    release: impl std::future::Future<Output = Result<(), Error>> + Send + 'static,
) {
    if tokio::runtime::Handle::try_current().is_ok() {
        runtime.handle().spawn(release);
    } else if let Err(err) = runtime.block_on(release) {
        tracing::debug!(error = %err, "releasing on drop failed");
    }
}

/// An election; from [`Client::election`]. The options apply to [`Election::campaign`]; they
/// are those of [`crate::Election`].
#[derive(Debug, Clone)]
pub struct Election<'a> {
    inner: crate::Election<'a>,
    runtime: Arc<Runtime>,
}

impl<'a> Election<'a> {
    fn map(self, f: impl FnOnce(crate::Election<'a>) -> crate::Election<'a>) -> Self {
        Self {
            inner: f(self.inner),
            runtime: self.runtime,
        }
    }

    /// The TTL of the lease a leadership gets.
    pub fn ttl(self, ttl: Duration) -> Self {
        self.map(|e| e.ttl(ttl))
    }

    /// How long a campaign waits to lead (default: as long as it takes).
    pub fn wait(self, wait: Duration) -> Self {
        self.map(|e| e.wait(wait))
    }

    /// Who is campaigning, shown to others.
    pub fn owner(self, owner: impl Into<String>) -> Self {
        self.map(|e| e.owner(owner))
    }

    /// Lead under this lease (see [`crate::Election::lease`]).
    pub fn lease(self, lease: &'a Lease) -> Self {
        self.map(|e| e.lease(lease.inner()))
    }

    /// Campaigns with `value` and blocks until this process leads (or the wait runs out: see
    /// [`crate::Election::campaign`]).
    pub fn campaign(&self, value: impl Into<String>) -> Result<Leadership, Error> {
        let leadership = self.runtime.block_on(self.inner.campaign(value))?;
        Ok(Leadership {
            inner: Some(leadership),
            runtime: self.runtime.clone(),
        })
    }

    /// Who leads now (`None`: nobody).
    pub fn leader(&self) -> Result<Option<Leader>, Error> {
        self.runtime.block_on(self.inner.leader())
    }
}

/// Leadership of an election, renewed in the background; resigned by [`Leadership::resign`] or
/// on drop.
#[derive(Debug)]
pub struct Leadership {
    /// `None` once resigned.
    inner: Option<crate::Leadership>,
    runtime: Arc<Runtime>,
}

impl Leadership {
    fn inner(&self) -> &crate::Leadership {
        self.inner.as_ref().expect("present until consumed")
    }

    /// The election's name.
    pub fn name(&self) -> &str {
        self.inner().name()
    }

    /// The epoch: strictly greater than every earlier leader's (fence with it).
    pub fn epoch(&self) -> FencingToken {
        self.inner().epoch()
    }

    /// The value this leader campaigned with.
    pub fn value(&self) -> &str {
        self.inner().value()
    }

    /// The lease the leadership is held under.
    pub fn lease_id(&self) -> &LeaseId {
        self.inner().lease_id()
    }

    /// True while this process may act as the leader.
    pub fn is_held(&self) -> bool {
        self.inner().is_held()
    }

    /// Blocks until the leadership is lost or `timeout` passes: `Some(reason)` if it was lost.
    pub fn lost_within(&self, timeout: Duration) -> Option<LostReason> {
        self.runtime
            .block_on(async { tokio::time::timeout(timeout, self.inner().lost()).await })
            .ok()
    }

    /// Resigns now: the next candidate leads.
    pub fn resign(mut self) -> Result<(), Error> {
        let leadership = self.inner.take().expect("present until consumed");
        self.runtime.block_on(leadership.resign())
    }
}

impl Drop for Leadership {
    fn drop(&mut self) {
        if let Some(leadership) = self.inner.take() {
            release_on(&self.runtime, leadership.resign());
        }
    }
}

/// A lease kept alive in the background; revoked by [`Lease::revoke`] or on drop.
#[derive(Debug)]
pub struct Lease {
    /// `None` once revoked or detached.
    inner: Option<crate::Lease>,
    runtime: Arc<Runtime>,
}

impl Lease {
    fn inner(&self) -> &crate::Lease {
        self.inner.as_ref().expect("present until consumed")
    }

    /// The lease id.
    pub fn id(&self) -> &LeaseId {
        self.inner().id()
    }

    /// The lease's handle (secret).
    pub fn handle(&self) -> &Handle {
        self.inner().handle()
    }

    /// The TTL the server last confirmed.
    pub fn ttl(&self) -> Duration {
        self.inner().ttl()
    }

    /// True until the lease is lost (see [`crate::Lease::is_alive`]).
    pub fn is_alive(&self) -> bool {
        self.inner().is_alive()
    }

    /// Blocks until the lease is lost or `timeout` passes: `Some(reason)` if it was lost.
    pub fn lost_within(&self, timeout: Duration) -> Option<LostReason> {
        // The timer must be made inside the runtime.
        self.runtime
            .block_on(async { tokio::time::timeout(timeout, self.inner().lost()).await })
            .ok()
    }

    /// What the server knows about this lease now.
    pub fn info(&self) -> Result<LeaseInfo, Error> {
        self.runtime.block_on(self.inner().info())
    }

    /// Revokes the lease now, freeing every lock held or awaited under it.
    pub fn revoke(mut self) -> Result<(), Error> {
        let lease = self.inner.take().expect("present until consumed");
        self.runtime.block_on(lease.revoke())
    }

    /// Stops keeping the lease alive and forgets it without revoking (see
    /// [`crate::Lease::detach`]).
    pub fn detach(mut self) -> (LeaseId, Handle) {
        self.inner.take().expect("present until consumed").detach()
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(lease) = self.inner.take() {
            release_on(&self.runtime, lease.revoke());
        }
    }
}
