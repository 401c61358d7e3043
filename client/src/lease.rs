//! TTL leases: granted by the server, kept alive here in the background, revoked on drop.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::Method;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::client::{Client, Secret, humantime_ms};
use crate::error::Error;
use crate::hold::{HoldWatch, Keeper, LostReason, RenewFn};

/// A lease's handle: the secret that every operation on the lease, and on locks held under it,
/// needs. The lease id is public (others see it in lock status); the handle is not. `Debug`
/// never prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handle(Secret);

impl Handle {
    /// A new random handle (192 bits). Granting a lease with a handle chosen here is what makes
    /// the grant safe to retry on another replica after a timeout.
    pub fn generate() -> Self {
        let mut bytes = [0u8; 24];
        aws_lc_rs::rand::fill(&mut bytes).expect("the system random source works");
        const ALPHABET: &[u8; 64] =
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut text = String::with_capacity(32);
        for chunk in bytes.chunks(3) {
            let n = u32::from(chunk[0]) << 16 | u32::from(chunk[1]) << 8 | u32::from(chunk[2]);
            for shift in [18, 12, 6, 0] {
                text.push(ALPHABET[(n >> shift & 63) as usize] as char);
            }
        }
        Self(Secret(text))
    }

    /// Wraps a handle as printed by `leasehold lease grant` or returned by the server.
    pub fn new(handle: impl Into<String>) -> Self {
        Self(Secret(handle.into().trim().to_owned()))
    }

    /// The secret itself, to pass to another process (keep it out of logs and command lines).
    pub fn reveal(&self) -> &str {
        &self.0.0
    }
}

/// A lease id: 16 hex digits, opaque.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct LeaseId(String);

impl LeaseId {
    /// Wraps an id as printed by the server or the CLI. Not checked here: calls that put it in
    /// a request path refuse anything but 1 to 16 hex digits ([`LeaseId::parse`] checks first).
    pub fn new(id: impl Into<String>) -> Self {
        Self(id.into())
    }

    /// An id, checked: 1 to 16 hex digits (so that an id such as `../../healthz` never turns
    /// into another request).
    pub fn parse(id: &str) -> Result<Self, Error> {
        let id = LeaseId(id.trim().to_owned());
        path_segment(&id)?;
        Ok(id)
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
    handle: Handle,
    keeper: Keeper,
    /// The locks this process holds or is acquiring under the lease: one guard per lock.
    pub(crate) slots: Arc<Slots>,
    /// False once revoked or detached: nothing left to do on drop.
    armed: bool,
}

/// The locks held, being acquired, or being released under one lease by this process.
///
/// The server knows one hold per (lock, lease): a second acquire under the same lease answers
/// the same hold, with the same token, and a release by either ends it for both. So this process
/// allows one [`crate::LockGuard`] per (lock, lease): a second acquire is refused with
/// [`Error::AlreadyHeld`] while the first is held or being acquired, and waits while it is being
/// released, so that a late release never ends a hold acquired after it.
#[derive(Debug, Default)]
pub(crate) struct Slots {
    map: Mutex<HashMap<String, SlotState>>,
}

#[derive(Debug)]
enum SlotState {
    /// A guard holds the lock, or an acquire for it is under way.
    Busy,
    /// A release (or the clean-up of an abandoned acquire) is under way; the channel closes when
    /// it is over.
    Releasing(watch::Receiver<()>),
}

/// One lock's place in [`Slots`]: freed when dropped.
#[derive(Debug)]
pub(crate) struct Slot {
    slots: Arc<Slots>,
    name: String,
    /// While releasing: dropped with the slot, which wakes acquires waiting for the release.
    _releasing: Option<watch::Sender<()>>,
}

impl Slots {
    /// Takes lock `name` for one guard: refused while another guard holds or acquires it,
    /// waits while it is being released.
    pub async fn take(self: &Arc<Self>, name: &str) -> Result<Slot, Error> {
        loop {
            let mut released = {
                let mut map = self.map();
                match map.get(name) {
                    None => {
                        map.insert(name.to_owned(), SlotState::Busy);
                        return Ok(Slot {
                            slots: self.clone(),
                            name: name.to_owned(),
                            _releasing: None,
                        });
                    }
                    Some(SlotState::Busy) => {
                        return Err(Error::AlreadyHeld {
                            name: name.to_owned(),
                        });
                    }
                    Some(SlotState::Releasing(rx)) => rx.clone(),
                }
            };
            // Resolves (with an error) when the releasing side drops its sender.
            let _ = released.changed().await;
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, SlotState>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Slot {
    /// The hold is being released from now on: a new acquire of the lock under this lease waits
    /// until this slot is dropped, instead of being refused.
    pub fn releasing(mut self) -> Self {
        let (tx, rx) = watch::channel(());
        self.slots
            .map()
            .insert(self.name.clone(), SlotState::Releasing(rx));
        self._releasing = Some(tx);
        self
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.slots.map().remove(&self.name);
    }
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
        self.grant(ttl, owner, None).await
    }

    /// [`Client::grant_lease_for`] that waits up to `wait` for a place when the server's waiting
    /// room is full (a server run with `--max-sessions`; others grant at once), instead of the
    /// server's default 3.5 s: for a crowd arriving at once (an on-sale), where one long wait in
    /// line costs everyone less than coming back again and again. The request's timeout grows by
    /// `wait`. Past it the server answers [`Error::Overloaded`].
    pub async fn grant_lease_waiting(
        &self,
        ttl: Duration,
        owner: Option<String>,
        wait: Duration,
    ) -> Result<Lease, Error> {
        self.grant(ttl, owner, Some(wait)).await
    }

    async fn grant(
        &self,
        ttl: Duration,
        owner: Option<String>,
        wait: Option<Duration>,
    ) -> Result<Lease, Error> {
        let sent = Instant::now();
        let mut body = json!({ "ttl": humantime_ms(ttl) });
        if let Some(owner) = owner {
            body["owner"] = owner.into();
        }
        if let Some(wait) = wait {
            body["wait"] = humantime_ms(wait).into();
        }
        // Idempotent: the handle is chosen here and names the lease, so a grant resent after a
        // timeout (on any replica) finds the lease its first attempt made.
        let handle = Handle::generate();
        let granted: Granted = self
            .call(Method::POST, "/v1/leases", Some(&handle), None, || {
                (Some(body.clone()), wait.unwrap_or_default())
            })
            .await?;
        Ok(self.keep(granted, handle, sent))
    }

    /// Takes over keeping alive a lease granted elsewhere (by `leasehold lease grant`, or
    /// another process), given its id and handle: refreshes it once to learn its TTL, then keeps
    /// it alive in the background like a lease granted here. Dropping the returned [`Lease`]
    /// revokes it; [`Lease::detach`] leaves it to its owner.
    pub async fn attach_lease(&self, id: LeaseId, handle: Handle) -> Result<Lease, Error> {
        let sent = Instant::now();
        let ttl_ms = self.keep_lease_alive(&id, &handle).await?;
        Ok(self.keep(
            Granted {
                lease_id: id,
                ttl_ms,
            },
            handle,
            sent,
        ))
    }

    /// Starts keeping a just-granted lease alive.
    fn keep(&self, granted: Granted, handle: Handle, sent: Instant) -> Lease {
        let renew: RenewFn = Arc::new({
            let (client, id, handle) = (self.clone(), granted.lease_id.clone(), handle.clone());
            move |deadline| {
                let (client, id, handle) = (client.clone(), id.clone(), handle.clone());
                Box::pin(async move {
                    client
                        .keep_alive_before(&id, &handle, Some(deadline))
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
            format!("lease {}", granted.lease_id),
        );
        Lease {
            client: self.clone(),
            id: granted.lease_id,
            handle,
            keeper,
            slots: Arc::default(),
            armed: true,
        }
    }

    /// Refreshes lease `id` once; returns its TTL in milliseconds.
    pub async fn keep_lease_alive(&self, id: &LeaseId, handle: &Handle) -> Result<u64, Error> {
        self.keep_alive_before(id, handle, None).await
    }

    /// [`Client::keep_lease_alive`], confirmed before `deadline` or not at all.
    async fn keep_alive_before(
        &self,
        id: &LeaseId,
        handle: &Handle,
        deadline: Option<Instant>,
    ) -> Result<u64, Error> {
        let path = format!("/v1/leases/{}/keepalive", path_segment(id)?);
        let kept: KeptAlive = self
            .call(Method::POST, &path, Some(handle), deadline, || {
                (None, Duration::ZERO)
            })
            .await?;
        Ok(kept.ttl_ms)
    }

    /// What the server knows about lease `id`.
    pub async fn lease_info(&self, id: &LeaseId) -> Result<LeaseInfo, Error> {
        let path = format!("/v1/leases/{}", path_segment(id)?);
        self.call(Method::GET, &path, None, None, || (None, Duration::ZERO))
            .await
    }

    /// Revokes lease `id`, freeing every lock held or awaited under it. A lease that is already
    /// gone counts as revoked (a retried revoke must not fail).
    pub async fn revoke_lease(&self, id: &LeaseId, handle: &Handle) -> Result<(), Error> {
        let path = format!("/v1/leases/{}", path_segment(id)?);
        match self
            .call::<serde_json::Value>(Method::DELETE, &path, Some(handle), None, || {
                (None, Duration::ZERO)
            })
            .await
        {
            Err(Error::LeaseNotFound) => Ok(()),
            other => other.map(drop),
        }
    }
}

/// A lease id as a path segment: 1 to 16 hex digits, refused otherwise (so that an id such as
/// `../../healthz` never turns into another request).
fn path_segment(id: &LeaseId) -> Result<&str, Error> {
    let text = id.as_str();
    if (1..=16).contains(&text.len()) && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(text)
    } else {
        Err(Error::client_input(format!(
            "{text:?} is not a lease id (1 to 16 hex digits)"
        )))
    }
}

impl Lease {
    /// The lease id.
    pub fn id(&self) -> &LeaseId {
        &self.id
    }

    /// The lease's handle (secret): what another process needs to renew or release holds under
    /// it, or to keep it alive.
    pub fn handle(&self) -> &Handle {
        &self.handle
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

    /// Waits until no acquire, release or clean-up of lock `name` under this lease is under way
    /// in this process (the clean-up of a cancelled acquire runs in the background). Only the
    /// CLI needs it.
    #[cfg(feature = "cli")]
    pub(crate) async fn settled(&self, name: &str) {
        drop(self.slots.take(name).await);
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
        self.client.revoke_lease(&self.id, &self.handle).await
    }

    /// Stops keeping the lease alive and forgets it without revoking: it expires after its TTL
    /// unless someone else (e.g. `leasehold lease keepalive`) refreshes it with the handle.
    pub fn detach(mut self) -> (LeaseId, Handle) {
        self.armed = false;
        self.keeper.end(LostReason::Released);
        (self.id.clone(), self.handle.clone())
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
            let (client, id, handle) = (self.client.clone(), self.id.clone(), self.handle.clone());
            runtime.spawn(async move {
                if let Err(err) = client.revoke_lease(&id, &handle).await {
                    tracing::debug!(error = %err, lease = %id, "revoking a dropped lease failed");
                }
            });
        }
    }
}
