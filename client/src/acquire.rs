//! What every kind of hold shares (a lock of any kind, a group, a leadership): asking for it
//! under a lease, with chained waits, fail-over and clean-up, then a [`Hold`] that renews in the
//! background, tells when it is lost, and is released by one request.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use reqwest::Method;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::client::{Client, encode, humantime_ms};
use crate::error::Error;
use crate::hold::{HoldWatch, Keeper, LostReason, RenewFn};
use crate::lease::{Handle, Lease, LeaseId, Slot};
use crate::lock::DEFAULT_TTL;
use crate::token::FencingToken;

/// What kind of lock a name is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LockKind {
    /// One holder.
    Mutex,
    /// A semaphore: up to this many holders.
    Limit(u32),
    /// A read-write lock's reader.
    Shared,
    /// A read-write lock's writer.
    Exclusive,
}

/// What an acquire asks for.
#[derive(Debug, Clone)]
pub(crate) enum Target {
    /// One lock, of some kind, with its lock-delay (zero: none).
    Lock {
        name: String,
        kind: LockKind,
        lock_delay: Duration,
    },
    /// Every name or none (sorted, without duplicates).
    Group { names: Vec<String> },
    /// The leadership of an election, standing with a value.
    Election { name: String, value: Option<String> },
}

impl Target {
    /// The lock names this hold is made of (one, except for a group).
    pub fn names(&self) -> &[String] {
        match self {
            Target::Lock { name, .. } | Target::Election { name, .. } => std::slice::from_ref(name),
            Target::Group { names } => names,
        }
    }

    fn acquire_path(&self) -> String {
        match self {
            Target::Lock { name, .. } => format!("/v1/locks/{}/acquire", encode(name)),
            Target::Group { .. } => "/v1/locks/acquire".to_owned(),
            Target::Election { name, .. } => format!("/v1/elections/{}/campaign", encode(name)),
        }
    }

    /// Adds what this target needs to an acquire body.
    fn add_fields(&self, body: &mut Value) {
        match self {
            Target::Lock {
                kind, lock_delay, ..
            } => {
                match kind {
                    LockKind::Mutex => {}
                    LockKind::Limit(limit) => body["limit"] = (*limit).into(),
                    LockKind::Shared => body["mode"] = "shared".into(),
                    LockKind::Exclusive => body["mode"] = "exclusive".into(),
                }
                // Sent only when asked for: an older server ignores nothing it was not sent.
                if !lock_delay.is_zero() {
                    body["lock_delay"] = format!("{}ms", lock_delay.as_millis()).into();
                }
            }
            Target::Group { names } => body["names"] = json!(names),
            Target::Election { value, .. } => {
                if let Some(value) = value {
                    body["value"] = value.clone().into();
                }
            }
        }
    }

    /// Names the hold in log events.
    fn label(&self, token: FencingToken) -> String {
        match self {
            Target::Lock { name, .. } => format!("lock {name:?} token {token}"),
            Target::Group { names } => format!("group {names:?} token {token}"),
            Target::Election { name, .. } => format!("election {name:?} epoch {token}"),
        }
    }

    /// Ends the hold `token` under the lease `handle` names, in one request: a lock's release,
    /// a group's release of every name, a leader's resignation.
    pub async fn release(
        &self,
        client: &Client,
        token: FencingToken,
        handle: &Handle,
    ) -> Result<(), Error> {
        let (path, body) = match self {
            Target::Lock { name, .. } => return client.release(name, token, handle).await,
            Target::Group { names } => (
                "/v1/locks/release".to_owned(),
                json!({ "names": names, "token": token }),
            ),
            Target::Election { name, .. } => (
                format!("/v1/elections/{}/resign", encode(name)),
                json!({ "token": token }),
            ),
        };
        // Resending is safe for the same reasons as a lock's release (the server fences it).
        client
            .call::<Value>(Method::POST, &path, Some(handle), None, || {
                (Some(body.clone()), Duration::ZERO)
            })
            .await
            .map(drop)
    }
}

/// The options every acquire has: lease, wait, owner.
#[derive(Debug, Clone)]
pub(crate) struct Options<'a> {
    pub client: Client,
    pub ttl: Option<Duration>,
    /// `None`: wait as long as it takes.
    pub wait: Option<Duration>,
    pub owner: Option<String>,
    pub lease: Option<&'a Lease>,
}

impl<'a> Options<'a> {
    pub fn new(client: &Client, wait: Option<Duration>) -> Self {
        Self {
            client: client.clone(),
            ttl: None,
            wait,
            owner: None,
            lease: None,
        }
    }
}

/// A callback told the number of queue entries ahead of a waiting acquire.
pub(crate) struct PositionFn(pub Box<dyn FnMut(u64) + Send>);

impl std::fmt::Debug for PositionFn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PositionFn")
    }
}

/// A grant, as every acquire route answers it.
#[derive(Deserialize)]
struct Acquired {
    token: FencingToken,
    ttl_ms: u64,
    #[serde(default)]
    owner: Option<String>,
    /// A group's token per name.
    #[serde(default)]
    tokens: Option<BTreeMap<String, FencingToken>>,
}

/// One acquire request in flight.
type Link<'b> = Pin<Box<dyn Future<Output = Result<Acquired, Error>> + Send + 'b>>;

/// Acquires `target` with `options`: grants a lease unless one is given, takes the target's
/// names for this lease in this process (one hold per lock and lease), asks (waits chained past
/// a server's `--max-wait`), and on a grant starts renewing. On failure the lease this call
/// granted is revoked; under a shared lease an acquire cancelled or left without an answer
/// releases in the background what the server may have granted. `positions`, for a lock, is told
/// how many queue entries are ahead while it waits.
pub(crate) async fn acquire(
    options: &Options<'_>,
    target: Target,
    positions: Option<PositionFn>,
) -> Result<Hold, Error> {
    if options.ttl.is_some() && options.lease.is_some() {
        return Err(Error::client_input(
            "give either a ttl or a lease, not both",
        ));
    }
    if target.names().is_empty() {
        return Err(Error::client_input("no lock names given"));
    }
    if target.names().iter().any(String::is_empty) {
        return Err(Error::client_input("lock name is empty"));
    }
    if let Target::Lock {
        kind: LockKind::Limit(0),
        ..
    } = target
    {
        return Err(Error::client_input("a semaphore's limit is at least 1"));
    }
    let client = &options.client;
    let (lease_id, handle, lease_watch, mut owned, slots) = match options.lease {
        Some(lease) => (
            lease.id().clone(),
            lease.handle().clone(),
            lease.watch(),
            None,
            lease.slots.clone(),
        ),
        None => {
            let lease = client
                .grant_lease_for(options.ttl.unwrap_or(DEFAULT_TTL), options.owner.clone())
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
    let mut taken = Vec::with_capacity(target.names().len());
    for name in target.names() {
        taken.push(slots.take(name).await?);
    }
    let mut pending = PendingAcquire {
        slots: taken,
        // A lease granted for this acquire alone is revoked on failure, which frees all.
        clean_up: owned.is_none().then(|| CleanUp {
            client: client.clone(),
            target: target.clone(),
            lease_id: lease_id.clone(),
            handle: handle.clone(),
        }),
    };
    let asking = Asking {
        client,
        target: &target,
        owner: options.owner.as_deref(),
        wait: options.wait,
        path: target.acquire_path(),
        maybe_acted: AtomicBool::new(false),
    };
    let report = async {
        match (positions, &target) {
            (Some(positions), Target::Lock { name, .. }) => {
                report_positions(client, name, &lease_id, positions).await
            }
            _ => std::future::pending().await,
        }
    };
    let result = tokio::select! {
        result = asking.request(&lease_id, &handle) => result,
        // Our lease died while we waited: nothing granted now could be kept anyway.
        reason = lease_watch.lost() => Err(Error::LeaseLost(reason)),
        never = report => match never {},
    };
    let maybe_acted = asking.maybe_acted.load(Ordering::Relaxed);
    drop(asking);
    let acquired = match result {
        Ok(acquired) => acquired,
        Err(err) => {
            // An answer from the server means it left nothing of ours in the queue; without
            // one (timeouts, 503s), it may have granted: the pending acquire cleans up. Shed
            // every time it was sent, it reached etcd nowhere: nothing to clean up (a stampede
            // of shed acquires must not turn into a stampede of status reads).
            let shed_everywhere = matches!(err, Error::Overloaded { .. }) && !maybe_acted;
            if shed_everywhere || !(err.is_retryable() || matches!(err, Error::Unexpected { .. })) {
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
    let slots = std::mem::take(&mut pending.slots);
    // The hold is as fresh as the lease's last confirmed keep-alive; from now on renewals (which
    // also refresh the lease) keep both.
    let lease_state = lease_watch.state();
    if let Some(lease) = owned.as_mut() {
        lease.pause_keepalive();
    }
    let renew: RenewFn = Arc::new({
        let (client, name, token, handle) = (
            client.clone(),
            // Every name of a group is held under the one lease with the one token: renewing
            // one confirms the hold and keeps the lease (so all of them) alive.
            target.names()[0].clone(),
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
        client.inner.safety_margin,
        renew,
        target.label(acquired.token),
    );
    Ok(Hold {
        client: client.clone(),
        token: acquired.token,
        tokens: acquired.tokens.unwrap_or_default(),
        target,
        lease_id,
        handle,
        owner: acquired.owner,
        keeper,
        shared_lease: owned.is_none().then_some(lease_watch),
        owned_lease: owned,
        slots,
        released: false,
    })
}

/// Follows lock `name` and tells `positions` how many queue entries are ahead of the entry of
/// `lease`, each time that number changes while the entry waits. Never returns: the acquire
/// ends it. Positions are advice: if the watch cannot be had, nothing more is reported.
async fn report_positions(
    client: &Client,
    name: &str,
    lease: &LeaseId,
    mut positions: PositionFn,
) -> Infallible {
    let mut watch = client.watch(name);
    let mut last = None;
    while let Some(item) = watch.next().await {
        match item {
            Ok(status) => {
                let waiting = status
                    .queue
                    .iter()
                    .find(|e| &e.lease_id == lease)
                    .filter(|e| !e.holds)
                    .map(|e| e.position);
                if let Some(ahead) = waiting
                    && last != Some(ahead)
                {
                    last = Some(ahead);
                    (positions.0)(ahead);
                }
            }
            Err(err) => {
                tracing::debug!(lock = %name, error = %err, "no queue position for now");
            }
        }
    }
    std::future::pending::<Infallible>().await
}

/// One acquire, being asked.
struct Asking<'r> {
    client: &'r Client,
    target: &'r Target,
    owner: Option<&'r str>,
    /// `None`: wait as long as it takes.
    wait: Option<Duration>,
    path: String,
    /// Whether any attempt may have acted on a server (see [`Client::call_noting`]).
    maybe_acted: AtomicBool,
}

impl Asking<'_> {
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
        let label = self.target.names().join(",");
        // `None`: wait as long as it takes.
        let until = self.wait.and_then(|wait| Instant::now().checked_add(wait));
        let start_link = |now: Instant| -> (Link<'_>, Instant, Duration) {
            let longest = self.client.inner.server_max_wait();
            let end = match until {
                Some(until) if until <= now + longest => until,
                _ => now + longest,
            };
            let link = Box::pin(self.link(lease_id, handle, end));
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
                        tracing::debug!(lock = %label, "lock_held before the wait ran out; asking again");
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
                        tracing::debug!(lock = %label, max = ?max, "the server's --max-wait is shorter; chaining shorter waits");
                        self.client.inner.lower_server_max_wait(max);
                        previous = None;
                        (current, current_end, current_wait) = start_link(Instant::now());
                    }
                    other => {
                        // An earlier link still waiting on a server is cut off here: it may
                        // have been granted just now, whatever this link was answered.
                        if previous.is_some() {
                            self.maybe_acted.store(true, Ordering::Relaxed);
                        }
                        return other;
                    }
                },
                () = settle(&mut previous), if previous.is_some() => previous = None,
                () = tokio::time::sleep_until(next_at), if chained && previous.is_none() => {
                    tracing::debug!(lock = %label, "still waiting: asking again before the server's wait ends");
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
        lease_id: &LeaseId,
        handle: &Handle,
        until: Instant,
    ) -> Result<Acquired, Error> {
        self.client
            .call_noting(
                Method::POST,
                &self.path,
                Some(handle),
                None,
                || {
                    let remaining = until.saturating_duration_since(Instant::now());
                    let mut body = json!({
                        "lease_id": lease_id,
                        "wait": humantime_ms(remaining),
                    });
                    if let Some(owner) = self.owner {
                        body["owner"] = owner.into();
                    }
                    self.target.add_fields(&mut body);
                    // The attempt may take the whole wait before the server answers.
                    (Some(body), remaining)
                },
                Some(&self.maybe_acted),
            )
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
    slots: Vec<Slot>,
    clean_up: Option<CleanUp>,
}

struct CleanUp {
    client: Client,
    target: Target,
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
        // Until the clean-up is over, a new acquire of these locks under this lease waits.
        let slots: Vec<Slot> = std::mem::take(&mut self.slots)
            .into_iter()
            .map(Slot::releasing)
            .collect();
        runtime.spawn(async move {
            let CleanUp {
                client,
                target,
                lease_id,
                handle,
            } = clean_up;
            // A waiter key that did not become a holder is the server's to delete (it does when
            // the request ends without a grant); a grant is ours to release. A group's grant
            // holds every name, so its first name tells.
            let name = &target.names()[0];
            match client.status(name).await {
                Ok(status) => {
                    if let Some(token) = status.held_by(&lease_id) {
                        tracing::debug!(lock = %name, %token, "releasing the grant of an abandoned acquire");
                        if let Err(err) = target.release(&client, token, &handle).await {
                            tracing::warn!(lock = %name, error = %err, "could not release the grant of an abandoned acquire");
                        }
                    }
                }
                Err(err) => {
                    tracing::warn!(lock = %name, error = %err, "could not check for the grant of an abandoned acquire");
                }
            }
            drop(slots);
        });
    }
}

/// A granted hold of any kind: renews itself in the background while it lives; released by
/// [`Hold::release`] or, in the background, on drop. The public guards wrap it.
#[derive(Debug)]
pub(crate) struct Hold {
    client: Client,
    target: Target,
    token: FencingToken,
    /// A group's token per name (empty otherwise).
    tokens: BTreeMap<String, FencingToken>,
    lease_id: LeaseId,
    handle: Handle,
    owner: Option<String>,
    keeper: Keeper,
    /// The caller's lease, when the hold was taken under one: its loss is ours.
    shared_lease: Option<HoldWatch>,
    /// The lease the acquire granted for this hold alone: revoked with it.
    owned_lease: Option<Lease>,
    /// The hold's places among the lease's holds (one guard per lock and lease).
    slots: Vec<Slot>,
    released: bool,
}

impl Hold {
    pub fn target(&self) -> &Target {
        &self.target
    }

    pub fn token(&self) -> FencingToken {
        self.token
    }

    /// The token of each name (for a group; the one token otherwise).
    pub fn token_of(&self, name: &str) -> Option<FencingToken> {
        match self.tokens.get(name) {
            Some(token) => Some(*token),
            None => self
                .target
                .names()
                .iter()
                .any(|n| n == name)
                .then_some(self.token),
        }
    }

    pub fn lease_id(&self) -> &LeaseId {
        &self.lease_id
    }

    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    pub fn owner(&self) -> Option<&str> {
        self.owner.as_deref()
    }

    pub fn ttl(&self) -> Duration {
        self.keeper.watch().state().ttl
    }

    pub fn is_held(&self) -> bool {
        self.keeper.watch().is_held() && self.shared_lease.as_ref().is_none_or(|l| l.is_held())
    }

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

    /// Runs `work` while the hold lasts: its output, or, as soon as the hold is lost, the reason
    /// (and `work` is dropped, i.e. cancelled, at that point). A hold already lost does not
    /// start `work` at all.
    pub async fn run_while_held<F: Future>(&self, work: F) -> Result<F::Output, LostReason> {
        tokio::select! {
            biased;
            reason = self.lost() => Err(reason),
            output = work => Ok(output),
        }
    }

    /// Ends the hold in one request, then revokes the lease granted for it alone.
    pub async fn release(mut self) -> Result<(), Error> {
        self.released = true;
        self.keeper.end(LostReason::Released);
        let result = self
            .target
            .release(&self.client, self.token, &self.handle)
            .await;
        if let Some(lease) = self.owned_lease.take() {
            // Also frees the hold if the release could not get through.
            if let Err(err) = lease.revoke().await {
                tracing::debug!(error = %err, "revoking the hold's lease failed; it will expire");
            }
        }
        // Only now may another guard take these locks under the same lease.
        self.slots.clear();
        result
    }

    /// Stops renewing and forgets the hold without releasing it.
    pub fn detach(mut self) -> (FencingToken, Handle) {
        self.released = true;
        self.keeper.end(LostReason::Released);
        if let Some(lease) = self.owned_lease.take() {
            let _ = lease.detach();
        }
        (self.token, self.handle.clone())
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.keeper.end(LostReason::Released);
        if self.released {
            return;
        }
        // An owned lease revokes itself when dropped just after this, which frees the hold.
        if self.owned_lease.is_some() {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (client, target, token, handle) = (
                self.client.clone(),
                self.target.clone(),
                self.token,
                self.handle.clone(),
            );
            // A new acquire of these locks under the shared lease waits for this release: if it
            // went first, this release would end its hold (same lease, same key).
            let slots: Vec<Slot> = std::mem::take(&mut self.slots)
                .into_iter()
                .map(Slot::releasing)
                .collect();
            runtime.spawn(async move {
                if let Err(err) = target.release(&client, token, &handle).await {
                    tracing::debug!(error = %err, hold = ?target.names(), "releasing a dropped guard failed");
                }
                drop(slots);
            });
        }
    }
}
