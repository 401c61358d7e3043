//! The queue core every primitive shares: enqueue, the decisive read, waking, clean-up, and the
//! one-txn release and renew. Mutexes and semaphores (`lock.rs`), read-write locks (`rwlock.rs`),
//! groups (`group.rs`) and elections (`election.rs`) differ only in the [`Kind`] of their waiters
//! and in how many names one acquire takes.
//!
//! A lock named `N` is the set of waiter keys under `P/locks/{N}/q/` (see `keys.rs`), one per
//! lease, each attached to its lease, ordered by `create_revision`. That revision is the fencing
//! token. Since etcd's revision only grows, and a new waiter key is always created after every key
//! already in the queue, each newly granted holder's token is greater than every token granted
//! before for that lock, across replicas and restarts, with no counter of our own.
//!
//! - **Enqueue** puts the waiter keys (one per name, all in one txn, hence with one revision) and
//!   reads what the decision needs: one round trip when a mutex is free. Retrying with the same
//!   lease finds the same keys (same token, same place in line) and takes them over.
//! - **Decide**: a waiter is granted when, for every name, [`Kind::rule`] finds its way clear:
//!   no key ahead (mutex, exclusive), fewer than `limit` keys ahead (semaphore), no exclusive key
//!   ahead (shared). The decisive read confirms our own keys still exist in the same txn, so a
//!   waiter whose lease died is never granted (etcd issues 11456 and 19597).
//! - **Wait**: a waiter watches only the keys that block it (the nearest ones ahead) and its own,
//!   through the shared watch in `wakeups.rs`, and re-reads when one goes.
//! - **Abandon**: a wait that times out, whose HTTP client goes away, or that shutdown cancels
//!   deletes its waiter keys if they are still its own (or revokes the lease it granted for this
//!   request), retrying on other endpoints until etcd confirms; until then it answers `503`.
//! - **Release** and **renew** are one txn each: the handle names the lease, hence the waiter key,
//!   and the txn compares the handle's digest and the token in the step that acts.
//! - **Lock-delay** (`delay.rs`): a hold granted with `lock_delay` leaves a tombstone that
//!   outlives its lease by the delay. A tombstone whose lease has no key in the queue (an
//!   *orphan*) takes a slot: the enqueue and the decisive read count orphans in the txn that
//!   decides, and a waiter held off by one watches it.
//!
//! **Late writes.** Any request we send may be applied later, or never, whatever we answered. So
//! a write that must not land after something else happened carries a *fence*: `mod_revision <=
//! R`, where `R` is the highest revision this server had seen when it sent the write
//! (`Store::known_revision`). Whatever must invalidate it writes the key it compares, at a higher
//! revision: a clean-up after an enqueue whose outcome is unknown rewrites the lease's `auth` key;
//! a retry that resumes a key rewrites it; a re-acquire rewrites the key a late release compares.
//! `docs/design.md` ("Late writes") goes through every write.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Compare, CompareOp, GetOptions, PutOptions, SortOrder, SortTarget, Txn, TxnOp};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::delay::{self, DelayedHold, Installed};
use crate::handle::Handle;
use crate::keys::{KeySchema, LeaseId, LeaseMeta, LockName, WaiterValue};
use crate::lease::{
    auth_matches, head_options, parse_meta, seconds_to_ms, ttl_to_etcd_seconds, txn_gets,
};
use crate::metrics;
use crate::service::{Holder, LeaseAuth, Service, ServiceError, authorize_name};
use crate::store::StoreError;
use crate::tenants::Tenant;
use crate::wakeups::Subscription;

/// How often a waiter re-reads even without a wakeup: a backstop against a missed event, not
/// the way handoffs normally happen (those take one watch event).
const BACKSTOP_RECHECK: Duration = Duration::from_secs(10);

/// How long a waiter waits before retrying a read that etcd failed.
const RETRY_AFTER_STORE_ERROR: Duration = Duration::from_millis(200);

/// How often an enqueue is retried after its fence was refused because this server had not yet
/// seen a recent write of the lease (a fresh view then makes it pass).
pub(crate) const FENCE_RETRIES: usize = 4;

/// How long a clean-up that etcd could not confirm is retried in the background.
const CLEANUP_RETRY_FOR: Duration = Duration::from_secs(600);

/// Largest semaphore limit accepted.
pub const MAX_LIMIT: u32 = 10_000;

/// What kind of lock a name is. Every waiter of a name must agree (`limit_mismatch`,
/// `mode_mismatch` otherwise).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Up to `limit` holders at once (1: a mutex). Mutexes and semaphores.
    Counted(u32),
    /// A read-write lock's reader: holds alongside other readers, after every writer ahead.
    Shared,
    /// A read-write lock's writer: holds alone, after everyone ahead.
    Exclusive,
}

impl Kind {
    /// A plain mutex.
    pub const MUTEX: Kind = Kind::Counted(1);

    /// The kind a stored waiter value declares.
    fn of(value: &WaiterValue) -> Self {
        match value.mode.as_deref() {
            Some("shared") => Kind::Shared,
            Some("exclusive") => Kind::Exclusive,
            _ => Kind::Counted(value.limit.unwrap_or(1)),
        }
    }

    /// Writes this kind into a waiter value.
    fn store(self, value: &mut WaiterValue) {
        match self {
            Kind::Counted(1) => {}
            Kind::Counted(limit) => value.limit = Some(limit),
            Kind::Shared => value.mode = Some("shared".into()),
            Kind::Exclusive => value.mode = Some("exclusive".into()),
        }
    }

    /// Why a waiter of kind `self` may not join a queue whose waiters are of kind `other`.
    fn conflict(self, other: Kind) -> Option<ServiceError> {
        match (self, other) {
            (Kind::Counted(a), Kind::Counted(b)) if a != b => Some(ServiceError::Mismatch {
                code: "limit_mismatch",
                message: format!(
                    "this lock takes {b} holder(s) at once; every acquire must give the same limit (this one gave {a})"
                ),
            }),
            (Kind::Counted(_), Kind::Shared | Kind::Exclusive)
            | (Kind::Shared | Kind::Exclusive, Kind::Counted(_)) => Some(ServiceError::Mismatch {
                code: "mode_mismatch",
                message: "this name is used both as a read-write lock (with `mode`) and as a mutex or semaphore (without)".into(),
            }),
            _ => None,
        }
    }

    /// The read, in a waiter's decisive txn, that finds what may keep it from holding `name`:
    /// the nearest keys ahead of revision `my_rev` that count against it.
    fn blockers(self, keys: &crate::keys::KeySchema, name: &LockName, my_rev: i64) -> TxnOp {
        let (prefix, limit) = match self {
            Kind::Counted(limit) => (keys.queue_prefix(name), limit),
            Kind::Exclusive => (keys.queue_prefix(name), 1),
            Kind::Shared => (keys.exclusive_prefix(name), 1),
        };
        TxnOp::get(
            prefix,
            Some(
                GetOptions::new()
                    .with_prefix()
                    .with_max_create_revision(my_rev - 1)
                    .with_sort(SortTarget::Create, SortOrder::Descend)
                    .with_limit(i64::from(limit))
                    .with_keys_only(),
            ),
        )
    }

    /// How many holders the lock takes at once: each orphan tombstone takes one of them. A
    /// read-write lock counts as one: any orphan holds it off (lock-delay is asked for by mutexes
    /// and semaphores; a tombstone on a read-write name is left from its use as one).
    fn slots(self) -> usize {
        match self {
            Kind::Counted(limit) => limit as usize,
            Kind::Shared | Kind::Exclusive => 1,
        }
    }

    /// How many tombstones a decisive read looks at: enough that a read cut short at this many
    /// holds off (at most `slots` tombstones belong to live holders, since holders and orphans
    /// never exceed the slots), plus the waiter's own.
    fn tombstone_limit(self) -> usize {
        2 * self.slots() + 2
    }

    /// Whether the keys [`Kind::blockers`] found leave the way clear. If every one of the
    /// nearest `limit` keys ahead still exists, at least `limit` are ahead: so watching those is
    /// enough to learn when the way may clear.
    fn clear(self, found: usize) -> bool {
        match self {
            Kind::Counted(limit) => found < limit as usize,
            Kind::Shared | Kind::Exclusive => found == 0,
        }
    }
}

/// Which lease an acquire is held under.
#[derive(Debug, Clone)]
pub enum LeaseChoice {
    /// An existing lease, named and authorized by the caller's handle.
    Existing(LeaseAuth),
    /// A lease the server grants for this request; the grant returns its handle.
    New {
        /// Its TTL.
        ttl: Duration,
    },
}

/// An acquire of one name (a lock, a semaphore slot, a read-write lock, a leadership) or of
/// several at once (a group).
#[derive(Debug, Clone)]
pub struct Enqueue {
    /// The names, in any order; one (a lock) or more (a group: all or none).
    pub names: Vec<LockName>,
    /// What kind of waiter this is.
    pub kind: Kind,
    /// The lease to hold under.
    pub lease: LeaseChoice,
    /// How long to wait in line; zero means try once.
    pub wait: Duration,
    /// Who is asking (shown to others).
    pub owner: Option<String>,
    /// A candidate's value (elections), shown while it holds.
    pub value: Option<String>,
    /// After the hold's lease *expires*, keep the names from being granted for this long
    /// (`delay.rs`); zero: no delay. Whole seconds (rounded up), at most
    /// [`delay::MAX_LOCK_DELAY`].
    pub lock_delay: Duration,
    /// The tenant asking.
    pub tenant: Arc<Tenant>,
}

/// A granted acquire.
#[derive(Debug, Clone)]
pub struct Granted {
    /// The names held, as asked.
    pub names: Vec<LockName>,
    /// The fencing token (the same for every name of a group: their keys share one revision).
    pub token: u64,
    /// The lease the hold is attached to.
    pub lease_id: LeaseId,
    /// The handle of a lease granted for this acquire (`ttl`); `None` for an existing lease.
    pub handle: Option<Handle>,
    /// The lease's TTL, in milliseconds.
    pub ttl_ms: u64,
    /// Who holds it.
    pub owner: Option<String>,
    /// The lock-delay installed for the hold, in milliseconds (0: none).
    pub lock_delay_ms: u64,
}

/// One name's part of an acquire.
struct Seat {
    name: LockName,
    waiter_key: String,
    /// The `x/` key of an exclusive read-write waiter.
    exclusive_key: Option<String>,
}

/// Where a waiter stands after a read.
enum Turn {
    /// Every name is clear, and our keys exist: granted.
    Granted,
    /// These keys stand in the way; any of them going may clear it.
    Behind(Vec<Vec<u8>>),
    /// One of our keys is gone (lease expired or revoked, or the wait was cancelled elsewhere).
    Gone,
}

/// How a wait for a wakeup ended.
enum Woken {
    Recheck,
    Deadline,
    Shutdown,
}

/// What the enqueue txn found.
struct Enqueued {
    /// Our keys' `create_revision` (one revision: one txn).
    my_rev: i64,
    /// True when the txn itself shows every name clear (keys created now, nobody ahead): no
    /// decisive read needed.
    clear: bool,
    /// For a single created key: the key just ahead of it (what to watch).
    predecessor: Option<Vec<u8>>,
    /// The queue's head, when the txn read it (a mutex try without a wait, to name the holder).
    head: Option<etcd_client::KeyValue>,
    /// Keys in the queue of each name, holder included, when a waiter quota asked for counts.
    queue_lens: Vec<u64>,
    /// True when some name has a tombstone of another lease (`delay.rs`): the queue alone does
    /// not say who holds, so the head read decides nothing.
    tombstones: bool,
    /// The lease's granted TTL and owner, from its meta key.
    meta: Option<LeaseMeta>,
}

/// The lease an acquire runs under, once decided.
struct AcquireLease {
    auth: LeaseAuth,
    /// For a lease granted by this request: its handle and granted TTL.
    new: Option<(Handle, u64)>,
}

impl Service {
    /// Acquires every name of `req` (all or none), waiting in line up to `req.wait`.
    ///
    /// Cancellation-safe: if this future is dropped (the HTTP client went away) the waiter keys
    /// are removed in the background.
    pub(crate) async fn enqueue_and_wait(&self, req: Enqueue) -> Result<Granted, ServiceError> {
        let Enqueue {
            mut names,
            kind,
            lease,
            wait,
            owner,
            value: candidate,
            lock_delay,
            tenant,
        } = req;
        names.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        names.dedup();
        for name in &names {
            authorize_name(&tenant, name)?;
        }
        let new_ttl = match &lease {
            LeaseChoice::New { ttl } => {
                Self::check_ttl_quota(&tenant, *ttl)?;
                Some(*ttl)
            }
            LeaseChoice::Existing(_) => None,
        };
        let (auth, new_handle) = match lease {
            LeaseChoice::Existing(auth) => (auth, None),
            LeaseChoice::New { .. } => {
                let handle = Handle::generate();
                (LeaseAuth::new(&tenant, &handle), Some(handle))
            }
        };
        let seats: Vec<Seat> = names
            .iter()
            .map(|name| Seat {
                name: name.clone(),
                waiter_key: self.keys.waiter_key(name, auth.lease),
                exclusive_key: (kind == Kind::Exclusive)
                    .then(|| self.keys.exclusive_key(name, auth.lease)),
            })
            .collect();
        let mut stored = WaiterValue {
            owner: owner.clone(),
            nonce: Some(uuid::Uuid::new_v4().to_string()),
            value: candidate,
            group: (seats.len() > 1).then_some(seats.len() as u32),
            ..WaiterValue::default()
        };
        kind.store(&mut stored);
        let value = serde_json::to_vec(&stored).expect("waiter value serializes");
        // A lock-delay's tombstone is written only while our key still carries this value.
        let delay_value = value.clone();
        // Armed before anything is written: dropped at any await below, it cleans up.
        let mut abandon = Abandon {
            service: self.clone(),
            seats: seats
                .iter()
                .map(|s| (s.waiter_key.clone(), s.exclusive_key.clone()))
                .collect(),
            value: value.clone(),
            auth: auth.clone(),
            own_lease: new_handle.is_some(),
            enqueue_confirmed: false,
            tombstones: if lock_delay.is_zero() {
                Vec::new()
            } else {
                names
                    .iter()
                    .map(|name| {
                        (
                            self.keys.tombstone_key(name, auth.lease),
                            self.keys.lease_delay_key(auth.lease, name),
                        )
                    })
                    .collect()
            },
            armed: true,
        };
        let mut lease = AcquireLease { auth, new: None };
        if let (Some(handle), Some(ttl)) = (new_handle, new_ttl) {
            let ttl_ms = match self.grant_for_acquire(&tenant, lease.auth.lease, ttl).await {
                Ok(ttl_ms) => ttl_ms,
                // Shed (or refused by etcd) before anything was applied: nothing to clean up.
                Err(err @ ServiceError::Overloaded(_)) => {
                    abandon.disarm();
                    return Err(err);
                }
                Err(err) => {
                    abandon.now().await;
                    return Err(err);
                }
            };
            lease.new = Some((handle, ttl_ms));
        }
        // While we wait, nobody else keeps a lease we granted alive.
        let _keepalive = match &lease.new {
            Some((_, ttl_ms)) if !wait.is_zero() => {
                Some(self.keep_alive_while_waiting(lease.auth.lease, *ttl_ms))
            }
            _ => None,
        };
        // Subscribe, and mark, before the first read, so no deletion after it can be missed.
        let lock_prefixes: Vec<String> = names.iter().map(|n| self.keys.lock_prefix(n)).collect();
        let mut wakeups = (!wait.is_zero()).then(|| self.wakeups.subscribe(&lock_prefixes));
        let mut mark = wakeups.as_ref().map(Subscription::mark).unwrap_or_default();
        let deadline = Instant::now() + wait;

        let read_head = wait.is_zero() && seats.len() == 1 && kind == Kind::MUTEX;
        let enqueued = match self
            .enqueue(
                &seats,
                kind,
                &tenant,
                &lease,
                owner.clone(),
                value,
                read_head,
            )
            .await
        {
            Ok(enqueued) => enqueued,
            // Shed, refused by etcd unapplied, or a try refused by a txn that wrote nothing: no
            // enqueue of ours exists or can land. Only a lease granted for this request is left
            // to revoke.
            Err(err @ (ServiceError::Overloaded(_) | ServiceError::LockHeld { .. })) => {
                abandon.enqueue_confirmed = true;
                if abandon.own_lease {
                    abandon.now().await;
                } else {
                    abandon.disarm();
                }
                return Err(err);
            }
            Err(err @ ServiceError::Mismatch { .. }) => {
                abandon.enqueue_confirmed = true;
                let cleaned = abandon.now().await;
                return Err(unconfirmed_if(err, cleaned));
            }
            Err(err) => {
                let cleaned = abandon.now().await;
                return Err(unconfirmed_if(err, cleaned));
            }
        };
        abandon.enqueue_confirmed = true;
        let ttl_ms = match (&lease.new, &enqueued.meta) {
            (Some((_, ttl_ms)), _) => *ttl_ms,
            (None, Some(meta)) => meta.ttl_ms,
            (None, None) => self.etcd_granted_ttl_ms(lease.auth.lease).await?,
        };
        let mut granted = Granted {
            names: names.clone(),
            token: enqueued.my_rev as u64,
            lease_id: lease.auth.lease,
            handle: lease.new.as_ref().map(|(handle, _)| handle.clone()),
            ttl_ms,
            owner: owner
                .clone()
                .or_else(|| enqueued.meta.as_ref().and_then(|m| m.owner.clone())),
            lock_delay_ms: 0,
        };
        // What a grant owes before its answer: the lock-delay it asked for, if any. The lease
        // needs a refresh first unless this request just granted (or refreshed) it.
        let settle = |granted: &Granted, refresh_lease: bool| {
            let hold = DelayedHold {
                names: &names,
                auth: &lease.auth,
                token: granted.token,
                value: &delay_value,
                ttl_ms: granted.ttl_ms,
                delay: lock_delay,
                refresh_lease,
            };
            let service = self.clone();
            let lease_id = lease.auth.lease;
            let name = names[0].clone();
            Box::pin(async move {
                if hold.delay.is_zero() {
                    return Ok(0);
                }
                match service.install_lock_delay(hold).await? {
                    Installed::Done(ms) => Ok(ms),
                    Installed::HoldGone => Err(service.why_gone(&name, lease_id).await),
                }
            })
        };
        if enqueued.clear {
            match settle(&granted, lease.new.is_none()).await {
                Ok(ms) => granted.lock_delay_ms = ms,
                Err(err) => {
                    let cleaned = abandon.now().await;
                    return Err(unconfirmed_if(err, cleaned));
                }
            }
            abandon.disarm();
            return Ok(granted);
        }
        if let Some(max) = tenant.quotas.max_waiters_per_lock
            && enqueued
                .queue_lens
                .iter()
                .any(|len| len.saturating_sub(1) > max)
        {
            let cleaned = abandon.now().await;
            return Err(unconfirmed_if(
                ServiceError::QuotaExceeded(format!(
                    "at most {max} waiters may queue for one lock of this tenant"
                )),
                cleaned,
            ));
        }
        let Some(wakeups) = wakeups.as_mut() else {
            // A try without a wait. A mutex's head read in the txn says whether our (resumed)
            // key holds; otherwise one decisive read says.
            let holds = match &enqueued.head {
                Some(head) if !enqueued.tombstones => head.key() == seats[0].waiter_key.as_bytes(),
                _ => match self
                    .check_turn(&seats, kind, enqueued.my_rev, lease.auth.lease)
                    .await
                {
                    Ok(turn) => matches!(turn, Turn::Granted),
                    Err(err) => {
                        let cleaned = abandon.now().await;
                        return Err(unconfirmed_if(err.into(), cleaned));
                    }
                },
            };
            if holds {
                match settle(&granted, lease.new.is_none()).await {
                    Ok(ms) => granted.lock_delay_ms = ms,
                    Err(err) => {
                        let cleaned = abandon.now().await;
                        return Err(unconfirmed_if(err, cleaned));
                    }
                }
                abandon.disarm();
                return Ok(granted);
            }
            let cleaned = abandon.now().await;
            if !cleaned {
                return Err(still_cleaning_up());
            }
            // With tombstones about, the head may be nobody's hold (a lock in lock-delay).
            let holder = match enqueued.head {
                Some(kv) if !enqueued.tombstones => self.holder_of(&kv).await,
                _ => self.first_holder(&names).await?,
            };
            return Err(ServiceError::LockHeld { holder });
        };

        let _in_flight = metrics::wait_started();
        let queued_at = Instant::now();
        // Set once the deadline has passed: the read that follows is the last look.
        let mut last_look = false;
        let mut turn = match enqueued.predecessor {
            Some(predecessor) => Ok(Turn::Behind(vec![predecessor])),
            None => {
                mark = wakeups.mark();
                self.check_turn(&seats, kind, enqueued.my_rev, lease.auth.lease)
                    .await
            }
        };
        loop {
            // Some(error) when etcd failed the re-read: pause, then try again (within the wait).
            let retry_after = match turn {
                Ok(Turn::Granted) => {
                    // Our keep-alives ran every TTL/3 while we waited, so the lease may have
                    // only two thirds of its TTL left, or have died while a keep-alive was
                    // stuck; the answer promises `ttl_ms` from now. So: answer only after a
                    // confirmed refresh.
                    if lease.new.is_some()
                        && let Err(err) = self.refresh_lease_everywhere(lease.auth.lease).await
                    {
                        let cleaned = abandon.now().await;
                        return Err(unconfirmed_if(err, cleaned));
                    }
                    // The lease was just refreshed if it is this request's own.
                    match settle(&granted, lease.new.is_none()).await {
                        Ok(ms) => granted.lock_delay_ms = ms,
                        Err(err) => {
                            let cleaned = abandon.now().await;
                            return Err(unconfirmed_if(err, cleaned));
                        }
                    }
                    abandon.disarm();
                    metrics::waited_for_grant(queued_at.elapsed());
                    return Ok(granted);
                }
                Ok(Turn::Gone) => {
                    abandon.now().await;
                    return Err(self.why_gone(&names[0], lease.auth.lease).await);
                }
                Ok(Turn::Behind(_)) if last_look => {
                    if !abandon.now().await {
                        return Err(still_cleaning_up());
                    }
                    // Say who holds it; if etcd cannot say, that is an outage (503), not a
                    // lock we know to be held.
                    return Err(match self.first_holder(&names).await {
                        Ok(holder) => ServiceError::LockHeld { holder },
                        Err(err) => err,
                    });
                }
                Ok(Turn::Behind(ref blockers)) => {
                    // A blocker going, or one of our own keys going (lease died), means re-read.
                    let mut watched: Vec<&[u8]> = blockers.iter().map(Vec::as_slice).collect();
                    watched.extend(seats.iter().map(|s| s.waiter_key.as_bytes()));
                    wakeups.watch(&watched, &mark);
                    match self.wait_for_wakeup(wakeups, deadline).await {
                        Woken::Recheck => None,
                        Woken::Deadline => {
                            // One last decisive read before giving up. Our turn may have come
                            // while its wake-up (or our enqueue's answer) was still on its way:
                            // under load that takes longer than a short wait, and if no waiter
                            // looked again at its deadline, each head of a busy line would give
                            // up before learning it was the head, and the lock would go to
                            // nobody for as long as the line stayed busy (seen in the 5x flash
                            // sale: one seat's lock granted to no one for 13 s).
                            last_look = true;
                            None
                        }
                        Woken::Shutdown => {
                            abandon.now().await;
                            return Err(ServiceError::ShuttingDown);
                        }
                    }
                }
                Err(StoreError::LeaseNotFound) => {
                    abandon.now().await;
                    return Err(ServiceError::LeaseNotFound);
                }
                Err(ref err) => {
                    tracing::debug!(error = %err, lock = %names[0], "waiter re-read failed; retrying");
                    Some(err.clone())
                }
            };
            if let Some(store_error) = retry_after {
                tokio::select! {
                    _ = tokio::time::sleep(RETRY_AFTER_STORE_ERROR) => {}
                    _ = tokio::time::sleep_until(deadline) => {
                        let cleaned = abandon.now().await;
                        // etcd never confirmed our turn: that is an outage, not a held lock.
                        return Err(unconfirmed_if(store_error.into(), cleaned));
                    }
                    _ = self.shutdown.cancelled() => {
                        abandon.now().await;
                        return Err(ServiceError::ShuttingDown);
                    }
                }
            }
            mark = wakeups.mark();
            turn = self
                .check_turn(&seats, kind, enqueued.my_rev, lease.auth.lease)
                .await;
        }
    }

    /// Grants the lease of a `ttl` acquire, under the id its fresh handle names. Its keys are
    /// written by the enqueue txn.
    async fn grant_for_acquire(
        &self,
        tenant: &Tenant,
        lease: LeaseId,
        ttl: Duration,
    ) -> Result<u64, ServiceError> {
        self.check_lease_quota(tenant).await?;
        match self
            .store
            .lease_grant(lease, ttl_to_etcd_seconds(ttl))
            .await
        {
            Ok(granted) => {
                metrics::lease_granted();
                Ok(seconds_to_ms(granted.ttl()))
            }
            Err(StoreError::LeaseExists) => {
                Err(ServiceError::Unavailable("lease id clash; retry".into()))
            }
            Err(err) => Err(err.into()),
        }
    }

    /// A txn about the locks `names`: one about a single lock may share an etcd request with
    /// txns about other locks (group commit, `batch.rs`; its group is the lock's queue prefix),
    /// one about several goes alone.
    async fn txn_on_locks<'a>(
        &self,
        mut names: impl Iterator<Item = &'a LockName>,
        target: &str,
        txn: Txn,
    ) -> Result<etcd_client::TxnResponse, StoreError> {
        match (names.next(), names.next()) {
            (Some(name), None) => {
                let group = self.keys.queue_prefix(name);
                self.store.batched_txn(&group, target, txn).await
            }
            _ => self.store.txn(target, txn).await,
        }
    }

    /// Waits until a watched key is deleted, a resync or the backstop asks for a re-read, the
    /// deadline passes, or shutdown begins.
    async fn wait_for_wakeup(&self, wakeups: &mut Subscription, deadline: Instant) -> Woken {
        tokio::select! {
            _ = wakeups.next() => Woken::Recheck,
            _ = tokio::time::sleep(BACKSTOP_RECHECK) => Woken::Recheck,
            _ = tokio::time::sleep_until(deadline) => Woken::Deadline,
            _ = self.shutdown.cancelled() => Woken::Shutdown,
        }
    }

    /// Puts our waiter keys (creating them, or taking over the ones a previous attempt under the
    /// same lease made) and reads what the decision needs, in one txn.
    ///
    /// Fenced against landing late (see the module doc): the txn compares the lease's `auth` key
    /// (the handle's digest, and no rewrite since this server's known revision) and each waiter
    /// key (no write since then). A fence refused because this server had not seen a recent write
    /// yet is retried with the revision the refusal showed.
    #[allow(clippy::too_many_arguments)]
    async fn enqueue(
        &self,
        seats: &[Seat],
        kind: Kind,
        tenant: &Tenant,
        lease: &AcquireLease,
        owner: Option<String>,
        value: Vec<u8>,
        read_head: bool,
    ) -> Result<Enqueued, ServiceError> {
        let id = lease.auth.lease;
        let auth_key = self.keys.auth_key(id);
        let meta_key = self.keys.lease_meta_key(id);
        let on_lease = || Some(PutOptions::new().with_lease(id.as_i64()));
        let newest_two = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Create, SortOrder::Descend)
            .with_limit(2);
        let count_queue = tenant.quotas.max_waiters_per_lock.is_some();
        let mut fence = self.store.known_revision();
        // A mutex try (no wait) enqueues only into an empty queue: a lock someone holds or waits
        // for refuses it from the txn's reads, writing nothing. (Putting a key and deleting it
        // again, as etcd's `TryLock` does, costs two writes per refusal, and tries that overlap
        // refuse each other for as long as they keep coming: each sees the other's key ahead.)
        // Our own key already in the queue (an acquire resumed under the same lease) is the
        // exception: that path takes it over as before.
        let mut only_if_free = read_head;
        for _ in 0..FENCE_RETRIES {
            let mut ops = Vec::new();
            let mut compares = match &lease.new {
                // A lease this request just granted: its keys go in with the waiter keys.
                Some((_, ttl_ms)) => {
                    let meta = serde_json::to_vec(&LeaseMeta {
                        owner: owner.clone(),
                        ttl_ms: *ttl_ms,
                        tenant: tenant.name.clone(),
                    })
                    .expect("meta serializes");
                    ops.push(TxnOp::put(
                        auth_key.as_str(),
                        lease.auth.digest.live(),
                        on_lease(),
                    ));
                    ops.push(TxnOp::put(meta_key.as_str(), meta, on_lease()));
                    ops.push(TxnOp::put(
                        self.keys.tenant_lease_key(&tenant.name, id),
                        Vec::new(),
                        on_lease(),
                    ));
                    vec![Compare::create_revision(
                        auth_key.as_str(),
                        CompareOp::Equal,
                        0,
                    )]
                }
                None => vec![
                    auth_matches(&auth_key, &lease.auth),
                    Compare::mod_revision(auth_key.as_str(), CompareOp::Less, fence + 1),
                ],
            };
            ops.push(TxnOp::get(meta_key.as_str(), None));
            for seat in seats {
                if lease.new.is_none() {
                    compares.push(Compare::mod_revision(
                        seat.waiter_key.as_str(),
                        CompareOp::Less,
                        fence + 1,
                    ));
                }
                let queue = self.keys.queue_prefix(&seat.name);
                ops.push(TxnOp::get(seat.waiter_key.as_str(), None));
                ops.push(TxnOp::put(
                    seat.waiter_key.as_str(),
                    value.clone(),
                    on_lease(),
                ));
                if let Some(exclusive) = &seat.exclusive_key {
                    ops.push(TxnOp::put(exclusive.as_str(), Vec::new(), on_lease()));
                }
                ops.push(TxnOp::get(queue.as_str(), Some(newest_two.clone())));
                // Tombstones, for the lock-delay rule: one range read, empty unless lock-delay is
                // in use on this name.
                ops.push(delay::tombstone_read(
                    &self.keys,
                    &seat.name,
                    kind.tombstone_limit(),
                ));
                if count_queue {
                    ops.push(TxnOp::get(
                        queue.as_str(),
                        Some(GetOptions::new().with_prefix().with_count_only()),
                    ));
                }
            }
            if read_head {
                ops.push(TxnOp::get(
                    self.keys.queue_prefix(&seats[0].name),
                    Some(head_options()),
                ));
            }
            let target = &seats[0].waiter_key;
            let mut otherwise = vec![
                TxnOp::get(auth_key.as_str(), None),
                TxnOp::get(target.as_str(), None),
            ];
            if only_if_free {
                let queue = self.keys.queue_prefix(&seats[0].name);
                // True only while no key at all is in the queue (etcd compares every key of a
                // range; an empty range compares as a key never created).
                compares.push(
                    Compare::create_revision(queue.as_str(), CompareOp::Equal, 0).with_prefix(),
                );
                otherwise.push(TxnOp::get(queue.as_str(), Some(head_options())));
                otherwise.push(delay::tombstone_read(
                    &self.keys,
                    &seats[0].name,
                    kind.tombstone_limit(),
                ));
            }
            let txn = Txn::new().when(compares).and_then(ops).or_else(otherwise);
            let resp = self
                .txn_on_locks(seats.iter().map(|seat| &seat.name), target, txn)
                .await?;
            let gets = txn_gets(&resp);
            if !resp.succeeded() && only_if_free {
                let new_lease_had_keys = lease.new.is_some() && !gets[0].kvs().is_empty();
                if lease.new.is_none()
                    && let Some(problem) = self.auth_problem(&gets[0], &lease.auth)
                {
                    return Err(problem);
                }
                if !gets[1].kvs().is_empty() {
                    // Our own key is queued: take it over on the usual path.
                    only_if_free = false;
                    continue;
                }
                if let (false, Some(head)) = (new_lease_had_keys, gets[2].kvs().first()) {
                    // Refused, and nothing was written. A queue of another kind (a semaphore,
                    // a read-write lock) says so, as an enqueue would have.
                    let theirs: WaiterValue =
                        serde_json::from_slice(head.value()).unwrap_or_default();
                    if let Some(conflict) = kind.conflict(Kind::of(&theirs)) {
                        return Err(conflict);
                    }
                    // With tombstones about, the head may be nobody's hold (a lock in
                    // lock-delay): read who holds, if anyone.
                    let holder = if gets[3].kvs().is_empty() {
                        self.holder_of(head).await
                    } else {
                        self.first_holder(std::slice::from_ref(&seats[0].name))
                            .await?
                    };
                    return Err(ServiceError::LockHeld { holder });
                }
            }
            if !resp.succeeded() {
                if lease.new.is_some() {
                    return Err(ServiceError::Unavailable(
                        "a new lease already had keys; retry".into(),
                    ));
                }
                if let Some(problem) = self.auth_problem(&gets[0], &lease.auth) {
                    return Err(problem);
                }
                // The fence refused: a write this server had not seen yet (or a clean-up or
                // resume after this server last looked). Retry from the revision etcd showed.
                fence = resp.header().map_or(fence, |h| h.revision());
                tracing::debug!(lock = %seats[0].name, fence, "enqueue fence refused; retrying with a fresh revision");
                continue;
            }
            return self.read_enqueued(seats, kind, id, &gets, count_queue, read_head);
        }
        Err(ServiceError::Unavailable(
            "the lease kept changing while enqueueing; retry".into(),
        ))
    }

    /// Interprets the gets of a successful enqueue txn: per seat `[prior, newest two,
    /// tombstones, (count)]` after the meta read, then the head.
    fn read_enqueued(
        &self,
        seats: &[Seat],
        kind: Kind,
        own: LeaseId,
        gets: &[etcd_client::GetResponse],
        count_queue: bool,
        read_head: bool,
    ) -> Result<Enqueued, ServiceError> {
        let meta = parse_meta(gets[0].kvs().first().map(|kv| kv.value()));
        let per_seat = 3 + usize::from(count_queue);
        let mut revisions = Vec::new();
        let mut created_all = true;
        let mut predecessors = Vec::new();
        let mut queue_lens = Vec::new();
        // Per seat, the other leases' tombstones: when our key is the only one in its queue,
        // every one of them is an orphan.
        let mut orphans_if_alone = Vec::new();
        for (i, seat) in seats.iter().enumerate() {
            let at = 1 + i * per_seat;
            let (prior, newest) = (gets[at].kvs().first(), gets[at + 1].kvs());
            let mine = newest
                .iter()
                .find(|kv| kv.key() == seat.waiter_key.as_bytes());
            let my_rev = match (prior, mine) {
                (Some(existing), _) => {
                    created_all = false;
                    let was: WaiterValue =
                        serde_json::from_slice(existing.value()).unwrap_or_default();
                    if let Some(conflict) = kind.conflict(Kind::of(&was)) {
                        return Err(conflict);
                    }
                    existing.create_revision()
                }
                (None, Some(mine)) => mine.create_revision(),
                (None, None) => {
                    return Err(ServiceError::Unavailable(
                        "enqueue read did not see its own put".into(),
                    ));
                }
            };
            revisions.push(my_rev);
            // The key just ahead of a key created now is the second newest; every waiter of a
            // name must be of one kind.
            let ahead = newest
                .iter()
                .find(|kv| kv.key() != seat.waiter_key.as_bytes());
            if let Some(ahead) = ahead.filter(|kv| kv.create_revision() < my_rev) {
                let theirs: WaiterValue = serde_json::from_slice(ahead.value()).unwrap_or_default();
                if let Some(conflict) = kind.conflict(Kind::of(&theirs)) {
                    return Err(conflict);
                }
                predecessors.push(ahead.key().to_vec());
            }
            orphans_if_alone.push(delay::others(&gets[at + 2], own).len());
            if count_queue {
                queue_lens.push(u64::try_from(gets[at + 3].count()).unwrap_or(u64::MAX));
            }
        }
        let my_rev = revisions[0];
        if revisions.iter().any(|r| *r != my_rev) {
            // Some names were already waited for under this lease by another acquire: the
            // group's keys would not share one revision, which is what keeps groups from
            // deadlocking. Refuse (the clean-up removes what this request wrote).
            return Err(ServiceError::Mismatch {
                code: "invalid_request",
                message: "this lease already waits for some of these names in another acquire"
                    .into(),
            });
        }
        let head = if read_head {
            gets.last().and_then(|g| g.kvs().first().cloned())
        } else {
            None
        };
        // Created now with nobody ahead on any name: clear for every kind, unless orphan
        // tombstones take every slot (with nobody else in the queue, every tombstone of another
        // lease is an orphan).
        let tombstones = orphans_if_alone.iter().any(|n| *n > 0);
        let delayed = orphans_if_alone.iter().any(|n| *n >= kind.slots());
        let clear = created_all && predecessors.is_empty() && !delayed;
        let predecessor = (created_all && seats.len() == 1 && kind == Kind::MUTEX)
            .then(|| predecessors.first().cloned())
            .flatten();
        Ok(Enqueued {
            my_rev,
            clear,
            predecessor,
            head,
            queue_lens,
            tombstones,
            meta,
        })
    }

    /// The decisive read: in one txn, confirm our keys are still the ones we created and look
    /// for what may block each of them: the nearest keys ahead, and orphan tombstones
    /// (lock-delay, `delay.rs`), each of which takes a slot.
    ///
    /// A tombstone is an orphan when its lease has no waiter key in the queue. Its lease's key,
    /// if it exists, holds (a tombstone is written only for a granted key, and a holder stays
    /// one until its key goes), so it is either among the keys ahead, which the read returns
    /// whole whenever fewer than the slots are ahead, or behind us within the first slots of the
    /// queue. Only a semaphore can have a holder behind a waiter, so only there, and only when
    /// the count matters, a second read (one txn again, deciding alone) looks behind us too.
    async fn check_turn(
        &self,
        seats: &[Seat],
        kind: Kind,
        my_rev: i64,
        own: LeaseId,
    ) -> Result<Turn, StoreError> {
        let compares: Vec<Compare> = seats
            .iter()
            .map(|s| Compare::create_revision(s.waiter_key.as_str(), CompareOp::Equal, my_rev))
            .collect();
        let mut look_behind = false;
        'read: loop {
            let mut reads = Vec::new();
            for seat in seats {
                reads.push(kind.blockers(&self.keys, &seat.name, my_rev));
                reads.push(delay::tombstone_read(
                    &self.keys,
                    &seat.name,
                    kind.tombstone_limit(),
                ));
                if look_behind {
                    reads.push(TxnOp::get(
                        self.keys.queue_prefix(&seat.name),
                        Some(
                            GetOptions::new()
                                .with_prefix()
                                .with_min_create_revision(my_rev + 1)
                                .with_sort(SortTarget::Create, SortOrder::Ascend)
                                .with_limit(kind.slots() as i64)
                                .with_keys_only(),
                        ),
                    ));
                }
            }
            let target = &seats[0].waiter_key;
            let decisive = Txn::new().when(compares.clone()).and_then(reads);
            // Alone, never in a group-commit batch: a read-only txn is served by etcd's read
            // path, beside its apply loop, with no raft entry; inside a batch with writes it
            // would wait for the fsync and run in the serial apply loop, where reading a long
            // queue holds up every write behind it (`docs/performance.md`, "Decisive reads
            // alone").
            let resp = self.store.txn(target, decisive).await?;
            if !resp.succeeded() {
                return Ok(Turn::Gone);
            }
            let gets = txn_gets(&resp);
            let per_seat = 2 + usize::from(look_behind);
            let mut blockers = Vec::new();
            let mut held_off = false;
            for found in gets.chunks(per_seat) {
                let ahead = found[0].kvs();
                let slots = kind.slots();
                if !kind.clear(ahead.len()) {
                    blockers.extend(ahead.iter().map(|kv| kv.key().to_vec()));
                    continue;
                }
                // Keys that hold: every key ahead (all of them were read: fewer than the
                // slots), and, on a second read, the first ones behind us.
                let mut alive: Vec<LeaseId> = ahead
                    .iter()
                    .filter_map(|kv| KeySchema::lease_of_key(kv.key()))
                    .collect();
                if look_behind {
                    alive.extend(
                        found[2]
                            .kvs()
                            .iter()
                            .filter_map(|kv| KeySchema::lease_of_key(kv.key())),
                    );
                }
                let unresolved: Vec<Vec<u8>> = delay::others(&found[1], own)
                    .into_iter()
                    .filter(|(_, lease)| !alive.contains(lease))
                    .map(|(key, _)| key)
                    .collect();
                // Which kind of key ahead the count is of: a shared waiter's read is of the
                // exclusive marks, and any tombstone holds it off.
                let taken = match kind {
                    Kind::Counted(_) => ahead.len(),
                    Kind::Shared | Kind::Exclusive => 0,
                };
                if taken + unresolved.len() < slots {
                    continue; // clear, even if every unresolved tombstone is an orphan
                }
                if matches!(kind, Kind::Counted(n) if n > 1) && !look_behind {
                    // Some of them may belong to holders behind us: read again, looking there.
                    look_behind = true;
                    continue 'read;
                }
                held_off = true;
                blockers.extend(ahead.iter().map(|kv| kv.key().to_vec()));
                blockers.extend(unresolved);
            }
            if held_off {
                crate::metrics::lock_delay_held_off();
            }
            return Ok(if blockers.is_empty() {
                Turn::Granted
            } else {
                Turn::Behind(blockers)
            });
        }
    }

    /// The holder of the first of `names` that is held, if any: who stands in a group's way.
    async fn first_holder(&self, names: &[LockName]) -> Result<Option<Holder>, ServiceError> {
        for name in names {
            if let Some(holder) = self.current_holder(name).await? {
                return Ok(Some(holder));
            }
        }
        Ok(None)
    }

    /// Our waiter key vanished while we waited: because the lease died (tell the caller), or
    /// because another request for the same lease cancelled the wait.
    async fn why_gone(&self, name: &LockName, lease: LeaseId) -> ServiceError {
        match self.store.lease_time_to_live(lease, false).await {
            Ok(ttl) if ttl.ttl() < 0 => ServiceError::LeaseNotFound,
            Ok(_) => ServiceError::LockHeld {
                holder: self.current_holder(name).await.ok().flatten(),
            },
            Err(err) => err.into(),
        }
    }

    /// Keeps a lease the server granted for a waiting request alive until the returned task is
    /// dropped.
    fn keep_alive_while_waiting(&self, lease: LeaseId, ttl_ms: u64) -> AbortOnDrop {
        let store = self.store.clone();
        let period = Duration::from_millis((ttl_ms / 3).max(500));
        AbortOnDrop(tokio::spawn(async move {
            loop {
                tokio::time::sleep(period).await;
                if let Err(err) = store.lease_keep_alive(lease).await {
                    tracing::debug!(error = %err, %lease, "keep-alive of waiting lease failed");
                }
            }
        }))
    }

    /// Releases every name of `names` held with `token` under the handle's lease, in one txn;
    /// deletes nothing unless all of them hold it.
    ///
    /// The txn compares handle digest, token (each key's `create_revision`) and a fence (no write
    /// to the keys since this server's known revision) in the step that deletes. The fence makes
    /// a late release harmless: a holder that re-acquires under the same lease (same key, same
    /// token) rewrites the key, so an earlier release landing afterwards deletes nothing. Retried
    /// on other endpoints while etcd gives no answer; a retry that finds the keys gone after an
    /// unanswered attempt counts as released.
    ///
    /// A release is a deliberate end: the same txn deletes the hold's lock-delay tombstone and
    /// index entry (`delay.rs`), so no delay follows, and the spent shadow lease is revoked in the
    /// background. (Only a single name can carry a lock-delay: groups cannot ask for one.)
    pub(crate) async fn release_names(
        &self,
        tenant: &Tenant,
        names: &[LockName],
        token: u64,
        auth: &LeaseAuth,
    ) -> Result<(), ServiceError> {
        for name in names {
            authorize_name(tenant, name)?;
        }
        let waiter_keys: Vec<String> = names
            .iter()
            .map(|n| self.keys.waiter_key(n, auth.lease))
            .collect();
        let auth_key = self.keys.auth_key(auth.lease);
        let mut fence = self.store.known_revision();
        let mut unanswered = false;
        for _ in 0..FENCE_RETRIES + self.store.endpoint_count() {
            let mut compares = vec![auth_matches(&auth_key, auth)];
            let mut deletes = Vec::new();
            for (name, key) in names.iter().zip(&waiter_keys) {
                compares.push(Compare::create_revision(
                    key.as_str(),
                    CompareOp::Equal,
                    token_rev(token),
                ));
                compares.push(Compare::mod_revision(
                    key.as_str(),
                    CompareOp::Less,
                    fence + 1,
                ));
                deletes.push(TxnOp::delete(key.as_str(), None));
                // A read-write lock's exclusive mark goes with its waiter key.
                deletes.push(TxnOp::delete(
                    self.keys.exclusive_key(name, auth.lease),
                    None,
                ));
            }
            if let [name] = names {
                let index = self.keys.lease_delay_key(auth.lease, name);
                deletes.push(TxnOp::get(index.as_str(), None));
                deletes.push(TxnOp::delete(index.as_str(), None));
                deletes.push(TxnOp::delete(
                    self.keys.tombstone_key(name, auth.lease),
                    None,
                ));
            }
            let mut diagnose = vec![TxnOp::get(auth_key.as_str(), None)];
            for (name, key) in names.iter().zip(&waiter_keys) {
                diagnose.push(TxnOp::get(key.as_str(), None));
                diagnose.push(TxnOp::get(
                    self.keys.queue_prefix(name),
                    Some(head_options()),
                ));
            }
            let txn = Txn::new()
                .when(compares)
                .and_then(deletes)
                .or_else(diagnose);
            let resp = match self.txn_on_locks(names.iter(), &waiter_keys[0], txn).await {
                Ok(resp) => resp,
                Err(StoreError::Unavailable(msg)) => {
                    unanswered = true;
                    tracing::debug!(%msg, lock = %names[0], "release unanswered; trying another endpoint");
                    continue;
                }
                Err(err) => return Err(err.into()),
            };
            if resp.succeeded() {
                if let Some(index) = txn_gets(&resp).first() {
                    self.revoke_shadows_later(delay::shadows_in(index));
                }
                return Ok(());
            }
            let gets = txn_gets(&resp);
            match self.auth_problem(&gets[0], auth) {
                None => {}
                Some(err @ ServiceError::Forbidden(_)) => return Err(err),
                // The lease is gone or being revoked: so is the hold. If an unanswered attempt
                // of ours may have released it first, that is what happened as far as anyone
                // can tell.
                Some(_) if unanswered => return Ok(()),
                Some(_) => return Err(held_under_another_lease(&gets[2], token, auth)),
            }
            let mut only_fence = true;
            let mut all_gone = true;
            for i in 0..names.len() {
                let (mine, head) = (&gets[1 + 2 * i], &gets[2 + 2 * i]);
                match mine.kvs().first() {
                    Some(kv) if kv.create_revision() == token_rev(token) => all_gone = false,
                    Some(_) => {
                        all_gone = false;
                        only_fence = false;
                    }
                    None => {
                        only_fence = false;
                        if !unanswered {
                            return Err(held_under_another_lease(head, token, auth));
                        }
                    }
                }
            }
            if all_gone && unanswered {
                return Ok(());
            }
            if !only_fence {
                return Err(held_under_another_lease(&gets[2], token, auth));
            }
            // Only the fence refused: a write this server had not seen. Retry from the revision
            // etcd showed.
            fence = resp.header().map_or(fence, |h| h.revision());
        }
        Err(ServiceError::Unavailable(
            "etcd did not confirm the release; it may still happen; retry".into(),
        ))
    }

    /// Confirms `token` still holds `name` under the handle's lease, and keeps the lease alive:
    /// etcd cannot keep a lease alive inside a txn, so the keep-alive and the confirming txn run
    /// side by side; the answer is a renewal only if both succeed. Returns the lease's TTL.
    ///
    /// The confirming txn also reads the lease's lock-delay index; once the keep-alive is
    /// confirmed, the shadow leases it names are refreshed too (`delay.rs`).
    pub(crate) async fn renew_hold(
        &self,
        tenant: &Tenant,
        name: &LockName,
        token: u64,
        auth: &LeaseAuth,
    ) -> Result<u64, ServiceError> {
        authorize_name(tenant, name)?;
        let waiter_key = self.keys.waiter_key(name, auth.lease);
        let auth_key = self.keys.auth_key(auth.lease);
        let confirm = Txn::new()
            .when([
                auth_matches(&auth_key, auth),
                Compare::create_revision(waiter_key.as_str(), CompareOp::Equal, token_rev(token)),
            ])
            .and_then([
                TxnOp::get(self.keys.lease_meta_key(auth.lease), None),
                delay::index_read(&self.keys, auth.lease),
            ])
            .or_else([
                TxnOp::get(auth_key.as_str(), None),
                TxnOp::get(self.keys.queue_prefix(name), Some(head_options())),
            ]);
        let (refreshed, confirmed) = tokio::join!(
            self.store.lease_keep_alive(auth.lease),
            self.txn_on_locks(std::iter::once(name), &waiter_key, confirm)
        );
        let confirmed = confirmed?;
        if !confirmed.succeeded() {
            let gets = txn_gets(&confirmed);
            return Err(match self.auth_problem(&gets[0], auth) {
                Some(err @ ServiceError::Forbidden(_)) => err,
                _ => held_under_another_lease(&gets[1], token, auth),
            });
        }
        match refreshed {
            Err(StoreError::LeaseNotFound) => return Err(ServiceError::NotHolder),
            other => other?,
        }
        let gets = txn_gets(&confirmed);
        self.refresh_shadows(auth.lease, &gets[1]).await;
        match parse_meta(gets[0].kvs().first().map(|kv| kv.value())) {
            Some(meta) => Ok(meta.ttl_ms),
            None => self.etcd_granted_ttl_ms(auth.lease).await,
        }
    }
}

/// The refusal of a renew or release whose token is not held under the handle's lease: `403
/// forbidden` if the token does hold the lock, under another lease (the caller has the token,
/// which is public, but not the holder's handle); `409 not_holder` otherwise.
fn held_under_another_lease(
    head: &etcd_client::GetResponse,
    token: u64,
    auth: &LeaseAuth,
) -> ServiceError {
    match head.kvs().first() {
        Some(kv)
            if kv.create_revision() == token_rev(token) && kv.lease() != auth.lease.as_i64() =>
        {
            ServiceError::Forbidden("this token is held under another lease; wrong handle".into())
        }
        _ => ServiceError::NotHolder,
    }
}

/// A token as the `create_revision` it is; a token no revision can equal compares with -1.
fn token_rev(token: u64) -> i64 {
    i64::try_from(token).unwrap_or(-1)
}

/// The answer when a clean-up could not be confirmed: something of this request may remain (or
/// still land) in etcd, so the server cannot say "nothing was granted" or "held by someone else".
fn still_cleaning_up() -> ServiceError {
    ServiceError::Unavailable(
        "etcd did not confirm the clean-up of this wait; the server keeps retrying it; retry later"
            .into(),
    )
}

/// `err`, unless the clean-up was not confirmed: then the outcome is unknown (503).
fn unconfirmed_if(err: ServiceError, cleaned: bool) -> ServiceError {
    if cleaned { err } else { still_cleaning_up() }
}

/// Aborts a background task when dropped.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Removes an abandoned acquire's traces: its waiter keys (only while still the ones this request
/// created or took over), or the whole lease when the server granted it for this request.
///
/// Armed until the acquire is granted. Dropped while armed (the request future was dropped
/// because the HTTP client went away), it cleans up in a background task that shutdown waits for.
/// A clean-up etcd does not confirm is retried on other endpoints, in the background after the
/// request answered, until confirmed or the lease is gone.
struct Abandon {
    service: Service,
    /// Per name: the waiter key and, for an exclusive read-write waiter, its `x/` key.
    seats: Vec<(String, Option<String>)>,
    /// The value this request wrote (unique: it carries a nonce). Comparing it recognises our
    /// keys even when the enqueue txn's answer was lost, and stops recognising them once a retry
    /// of the same acquire has taken them over.
    value: Vec<u8>,
    auth: LeaseAuth,
    /// True when the lease was granted for this request (revoke it instead).
    own_lease: bool,
    /// True once etcd answered the enqueue: no late enqueue of ours can land any more.
    enqueue_confirmed: bool,
    /// Per name, the lock-delay tombstone and index key this request may have written (empty
    /// without a lock-delay): a clean-up is a deliberate end, so no delay follows it.
    tombstones: Vec<(String, String)>,
    armed: bool,
}

impl Abandon {
    fn disarm(&mut self) {
        self.armed = false;
    }

    /// Cleans up now, before answering; true once etcd confirmed it. If it could not, retries
    /// continue in the background.
    async fn now(&mut self) -> bool {
        self.armed = false;
        let job = self.job();
        // Finishing work: the line behind our keys waits for them to go.
        if crate::admission::finishing(job.attempt(2)).await {
            return true;
        }
        self.service.tasks.spawn(job.until_confirmed());
        false
    }

    fn job(&self) -> CleanUp {
        CleanUp {
            service: self.service.clone(),
            seats: self.seats.clone(),
            value: self.value.clone(),
            auth: self.auth.clone(),
            own_lease: self.own_lease,
            enqueue_confirmed: self.enqueue_confirmed,
            tombstones: self.tombstones.clone(),
        }
    }
}

impl Drop for Abandon {
    fn drop(&mut self) {
        if self.armed {
            self.service.tasks.spawn(self.job().until_confirmed());
        }
    }
}

/// One abandoned acquire's clean-up, detached from the request.
struct CleanUp {
    service: Service,
    seats: Vec<(String, Option<String>)>,
    value: Vec<u8>,
    auth: LeaseAuth,
    own_lease: bool,
    enqueue_confirmed: bool,
    tombstones: Vec<(String, String)>,
}

impl CleanUp {
    /// The txn that removes our waiter keys while they are still ours. When the enqueue's outcome
    /// is unknown it also rewrites the lease's `auth` key (same value): that moves its
    /// `mod_revision` past every fence a late enqueue of ours carries, so the late enqueue is
    /// refused whenever it lands (it cannot create a waiter nobody waits for, nor take over a key
    /// a retry resumed). Harmless when applied twice or late: it deletes only keys carrying this
    /// request's nonce, and rewrites `auth` only while it still holds the live digest.
    fn txn(&self) -> Txn {
        let deletes: Vec<TxnOp> = self
            .seats
            .iter()
            .enumerate()
            .map(|(i, (key, exclusive))| {
                let mut ops = vec![TxnOp::delete(key.as_str(), None)];
                if let Some(x) = exclusive {
                    ops.push(TxnOp::delete(x.as_str(), None));
                }
                // A lock-delay installed for this hold goes with it (in the same step, under
                // the same compare: only while the hold is still this request's).
                if let Some((tombstone, index)) = self.tombstones.get(i) {
                    ops.push(TxnOp::delete(tombstone.as_str(), None));
                    ops.push(TxnOp::delete(index.as_str(), None));
                }
                TxnOp::txn(
                    Txn::new()
                        .when([Compare::value(
                            key.as_str(),
                            CompareOp::Equal,
                            self.value.clone(),
                        )])
                        .and_then(ops),
                )
            })
            .collect();
        if self.enqueue_confirmed {
            return Txn::new().and_then(deletes);
        }
        let auth_key = self.service.keys.auth_key(self.auth.lease);
        let mut then = vec![TxnOp::put(
            auth_key.as_str(),
            self.auth.digest.live(),
            Some(PutOptions::new().with_lease(self.auth.lease.as_i64())),
        )];
        then.extend(deletes.iter().cloned());
        Txn::new()
            .when([auth_matches(&auth_key, &self.auth)])
            .and_then(then)
            .or_else(deletes)
    }

    /// Tries `rounds` times over every endpoint; true once etcd confirmed (or the lease is gone,
    /// which took everything with it).
    async fn attempt(&self, rounds: usize) -> bool {
        let store = &self.service.store;
        let result = if self.own_lease {
            let mut result = Err(StoreError::Unavailable("not tried".into()));
            for _ in 0..store.endpoint_count() * rounds {
                result = store.lease_revoke(self.auth.lease).await;
                if !matches!(result, Err(StoreError::Unavailable(_))) {
                    break;
                }
            }
            // The revoke takes the waiter keys, not a tombstone (it is on its shadow lease):
            // delete it too. Once the lease is gone no tombstone of it can be written any more
            // (the install txn compares its waiter key), so this delete is final whenever it
            // lands, and harmless (the lease id was fresh: no other hold has that tombstone).
            if matches!(result, Ok(()) | Err(StoreError::LeaseNotFound))
                && !self.tombstones.is_empty()
            {
                let deletes: Vec<TxnOp> = self
                    .tombstones
                    .iter()
                    .map(|(tombstone, _)| TxnOp::delete(tombstone.as_str(), None))
                    .collect();
                if let Err(err) = store
                    .txn_until_answered(
                        None,
                        &self.tombstones[0].0,
                        Txn::new().and_then(deletes),
                        rounds,
                    )
                    .await
                {
                    result = Err(err);
                }
            }
            result
        } else {
            // A confirmed enqueue's clean-up of one lock compares and deletes that lock's keys
            // only: group commit may carry it (`batch.rs`). The other kind rewrites `auth`.
            let waiter_key = self.seats[0].0.as_str();
            let group = (self.enqueue_confirmed && self.seats.len() == 1)
                .then(|| KeySchema::queue_of_waiter_key(waiter_key));
            store
                .txn_until_answered(group, waiter_key, self.txn(), rounds)
                .await
                .map(drop)
        };
        match result {
            Ok(()) | Err(StoreError::LeaseNotFound) => true,
            Err(err) => {
                tracing::warn!(error = %err, key = %self.seats[0].0, "clean-up of an abandoned wait not confirmed yet; retrying");
                false
            }
        }
    }

    /// Retries with backoff until confirmed, for at most [`CLEANUP_RETRY_FOR`].
    async fn until_confirmed(self) {
        let give_up = Instant::now() + CLEANUP_RETRY_FOR;
        let mut pause = Duration::from_millis(200);
        while !self.attempt(1).await {
            if Instant::now() > give_up {
                tracing::error!(key = %self.seats[0].0, "gave up cleaning up an abandoned wait; its lease will remove it");
                return;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(5));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip_through_waiter_values() {
        for kind in [Kind::MUTEX, Kind::Counted(5), Kind::Shared, Kind::Exclusive] {
            let mut value = WaiterValue::default();
            kind.store(&mut value);
            assert_eq!(Kind::of(&value), kind);
        }
    }

    #[test]
    fn mixing_kinds_is_refused() {
        assert!(Kind::MUTEX.conflict(Kind::MUTEX).is_none());
        assert!(Kind::Shared.conflict(Kind::Exclusive).is_none());
        assert!(matches!(
            Kind::Counted(3).conflict(Kind::Counted(2)),
            Some(ServiceError::Mismatch {
                code: "limit_mismatch",
                ..
            })
        ));
        assert!(matches!(
            Kind::MUTEX.conflict(Kind::Shared),
            Some(ServiceError::Mismatch {
                code: "mode_mismatch",
                ..
            })
        ));
    }

    #[test]
    fn the_way_is_clear_below_the_limit() {
        assert!(Kind::Counted(3).clear(2));
        assert!(!Kind::Counted(3).clear(3));
        assert!(Kind::MUTEX.clear(0) && !Kind::MUTEX.clear(1));
        assert!(Kind::Shared.clear(0) && !Kind::Shared.clear(1));
    }
}
