//! The lock algorithm: a FIFO queue of leased waiter keys in etcd, and fencing tokens.
//!
//! A lock named `N` is the set of waiter keys under `P/locks/{N}/q/` (see `keys.rs`), one per
//! lease, each attached to its lease. The holder is the key with the smallest `create_revision`,
//! and that revision is the fencing token. Since etcd's revision only grows, and a new waiter key
//! is always created after every key already in the queue, each new holder's token is strictly
//! greater than every token issued before for that lock, across replicas and restarts, with no
//! counter of our own.
//!
//! - **Acquire** ([`Service::acquire`]) puts the waiter key and reads what the decision needs in
//!   one txn: one round trip when the lock is free. Retrying with the same lease finds the same
//!   key (same token, same place in line) and takes it over.
//! - **Wait**: a waiter watches only its predecessor (the key just ahead of it) and its own key,
//!   through the shared watch in `wakeups.rs`. When either is deleted it re-reads, and that one
//!   txn both confirms its own key still exists and looks for a predecessor: a waiter whose lease
//!   died is never granted (etcd issues 11456 and 19597).
//! - **Abandon**: a wait that times out, whose HTTP client goes away, or that shutdown cancels
//!   deletes its waiter key if the key is still its own (or revokes the lease it granted for this
//!   request), retrying on other endpoints until etcd confirms; until then it answers `503`, never
//!   "nothing is left".
//! - **Release** and **renew** are one txn each: the handle names the lease, hence the waiter key,
//!   and the txn compares the handle's digest and the token with the key in the same step that
//!   acts.
//!
//! **Late writes.** Any request we send may be applied later, or never, whatever we answered
//! (a member stalls, the call times out, the member applies it seconds later). So a write that
//! must not land after something else happened carries a *fence*: `mod_revision <= R`, where `R`
//! is the highest revision this server had seen when it sent the write (`Store::known_revision`).
//! Anything that must invalidate the write writes the key it compares, at a revision above `R`:
//! - the enqueue compares the lease's `auth` key and its own waiter key: a clean-up after an
//!   enqueue whose outcome is unknown rewrites `auth`, and a retry that resumes the key rewrites
//!   the key, so a late enqueue can neither create a phantom waiter nor take over a key a retry
//!   resumed;
//! - the release compares its waiter key: a re-acquire under the same lease rewrites the key, so a
//!   release that lands after the holder was told "you hold it again" deletes nothing.
//!
//! `docs/design.md` ("Late writes") goes through every write.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Compare, CompareOp, GetOptions, PutOptions, SortOrder, SortTarget, Txn, TxnOp};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::handle::Handle;
use crate::keys::{LeaseId, LeaseMeta, LockName, WaiterValue};
use crate::lease::{
    auth_matches, head_options, parse_meta, seconds_to_ms, ttl_to_etcd_seconds, txn_gets,
};
use crate::metrics;
use crate::service::{Holder, LeaseAuth, Service, ServiceError, authorize_name};
#[cfg(test)]
use crate::store::Store;
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
const FENCE_RETRIES: usize = 4;

/// How long a clean-up that etcd could not confirm is retried in the background.
const CLEANUP_RETRY_FOR: Duration = Duration::from_secs(600);

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

/// What to acquire and how long to wait for it.
#[derive(Debug, Clone)]
pub struct AcquireRequest {
    /// The lock.
    pub name: LockName,
    /// The lease to hold it under.
    pub lease: LeaseChoice,
    /// How long to wait in line; zero means try once.
    pub wait: Duration,
    /// Who is asking (reported to others while the lock is held).
    pub owner: Option<String>,
    /// The tenant asking.
    pub tenant: Arc<Tenant>,
}

/// A granted lock.
#[derive(Debug, Clone)]
pub struct Grant {
    /// The lock.
    pub name: LockName,
    /// The fencing token: pass it to every resource the lock protects.
    pub token: u64,
    /// The lease the hold is attached to; keep it alive to keep the lock.
    pub lease_id: LeaseId,
    /// The handle of a lease granted for this acquire (`ttl`); `None` for an existing lease.
    pub handle: Option<Handle>,
    /// The lease's TTL, in milliseconds.
    pub ttl_ms: u64,
    /// Who holds it.
    pub owner: Option<String>,
}

/// A renewed hold.
#[derive(Debug, Clone)]
pub struct Renewal {
    /// The lock.
    pub name: LockName,
    /// The token that still holds it.
    pub token: u64,
    /// The lease that was kept alive.
    pub lease_id: LeaseId,
    /// The TTL it was refreshed to, in milliseconds.
    pub ttl_ms: u64,
}

/// Who holds a lock and how many wait.
#[derive(Debug, Clone)]
pub struct LockStatus {
    /// The lock.
    pub name: LockName,
    /// The holder, if any.
    pub holder: Option<Holder>,
    /// Waiters queued behind the holder.
    pub waiters: u64,
}

/// Where a waiter stands after a read.
enum Turn {
    /// No key ahead of ours, and ours exists: the lock is ours.
    Granted,
    /// This key is just ahead of ours.
    Behind(Vec<u8>),
    /// Our key is gone (lease expired or revoked, or the wait was cancelled elsewhere).
    Gone,
}

/// How a wait for a wakeup ended.
enum Woken {
    /// Something may have changed: re-read.
    Recheck,
    /// The acquire's wait ran out.
    Deadline,
    /// The server is shutting down.
    Shutdown,
}

/// What the enqueue txn found.
struct Enqueued {
    /// Our key's `create_revision`: the token if we hold.
    my_rev: i64,
    /// When our key was created by this txn: the key just ahead of ours (`None`: we hold).
    /// `None` also when the key existed (a resumed acquire); then [`Enqueued::created`] is false.
    predecessor: Option<Vec<u8>>,
    /// True if this txn created our key (false: it resumed an existing one).
    created: bool,
    /// The queue's head, when the txn read it (tries without a wait, to name the holder).
    head: Option<etcd_client::KeyValue>,
    /// Keys in the queue, holder included, when a waiter quota asked for the count.
    queue_len: Option<u64>,
    /// The lease's granted TTL and owner, from its meta key.
    meta: Option<LeaseMeta>,
}

impl Enqueued {
    /// True when the txn itself shows our key at the head.
    fn holds(&self) -> bool {
        self.created && self.predecessor.is_none()
    }
}

/// The lease an acquire runs under, once decided.
struct AcquireLease {
    auth: LeaseAuth,
    /// For a lease granted by this request: its handle and granted TTL.
    new: Option<(Handle, u64)>,
}

impl Service {
    /// Acquires `req.name`, waiting in line up to `req.wait`.
    ///
    /// Cancellation-safe: if this future is dropped (the HTTP client went away) the waiter key is
    /// removed in the background.
    pub async fn acquire(&self, req: AcquireRequest) -> Result<Grant, ServiceError> {
        let AcquireRequest {
            name,
            lease,
            wait,
            owner,
            tenant,
        } = req;
        authorize_name(&tenant, &name)?;
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
        let waiter_key = self.keys.waiter_key(&name, auth.lease);
        let value = serde_json::to_vec(&WaiterValue {
            owner: owner.clone(),
            nonce: Some(uuid::Uuid::new_v4().to_string()),
        })
        .expect("waiter value serializes");
        // Armed before anything is written: dropped at any await below, it cleans up.
        let mut abandon = Abandon {
            service: self.clone(),
            waiter_key: waiter_key.clone(),
            value: value.clone(),
            auth: auth.clone(),
            own_lease: new_handle.is_some(),
            enqueue_confirmed: false,
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
        let queue = self.keys.queue_prefix(&name);
        let mut wakeups = (!wait.is_zero()).then(|| self.wakeups.subscribe(&queue));
        let mut mark = wakeups.as_ref().map_or(0, Subscription::mark);
        let deadline = Instant::now() + wait;

        let enqueued = match self
            .enqueue(&name, &tenant, &lease, owner.clone(), value, wait.is_zero())
            .await
        {
            Ok(enqueued) => enqueued,
            // Shed, or refused by etcd unapplied: no enqueue of ours exists or can land. Only a
            // lease granted for this request is left to revoke.
            Err(err @ ServiceError::Overloaded(_)) => {
                abandon.enqueue_confirmed = true;
                if abandon.own_lease {
                    abandon.now().await;
                } else {
                    abandon.disarm();
                }
                return Err(err);
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
        let stored_owner = owner
            .clone()
            .or_else(|| enqueued.meta.as_ref().and_then(|m| m.owner.clone()));
        let grant = Grant {
            name: name.clone(),
            token: enqueued.my_rev as u64,
            lease_id: lease.auth.lease,
            handle: lease.new.as_ref().map(|(handle, _)| handle.clone()),
            ttl_ms,
            owner: stored_owner,
        };
        if enqueued.holds() {
            abandon.disarm();
            return Ok(grant);
        }
        if let (Some(max), Some(len)) = (tenant.quotas.max_waiters_per_lock, enqueued.queue_len)
            && len.saturating_sub(1) > max
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
            // A try without a wait. A resumed key may hold already: one decisive read says.
            if !enqueued.created {
                match self.check_turn(&name, &waiter_key, enqueued.my_rev).await {
                    Ok(Turn::Granted) => {
                        abandon.disarm();
                        return Ok(grant);
                    }
                    Ok(_) => {}
                    Err(err) => {
                        let cleaned = abandon.now().await;
                        return Err(unconfirmed_if(err.into(), cleaned));
                    }
                }
            }
            let cleaned = abandon.now().await;
            if !cleaned {
                return Err(still_cleaning_up());
            }
            let holder = match enqueued.head {
                Some(kv) if enqueued.created => self.holder_of(&kv).await,
                _ => self.current_holder(&name).await?,
            };
            return Err(ServiceError::LockHeld { holder });
        };

        let _in_flight = metrics::wait_started();
        let queued_at = Instant::now();
        // Our key was created earlier (a retried acquire): find our place in line.
        let mut turn = match enqueued.predecessor {
            Some(predecessor) => Ok(Turn::Behind(predecessor)),
            None => {
                mark = wakeups.mark();
                self.check_turn(&name, &waiter_key, enqueued.my_rev).await
            }
        };
        loop {
            // Some(error) when etcd failed the re-read: pause, then try again (within the wait).
            let retry_after = match turn {
                Ok(Turn::Granted) => {
                    let grant = match &lease.new {
                        // Our keep-alives ran every TTL/3 while we waited, so the lease may have
                        // only two thirds of its TTL left, or have died while a keep-alive was
                        // stuck; the answer promises `ttl_ms` from now. So: answer only after a
                        // confirmed refresh.
                        Some(_) => match self.refresh_before_answer(lease.auth.lease).await {
                            Ok(()) => grant,
                            Err(err) => {
                                let cleaned = abandon.now().await;
                                return Err(unconfirmed_if(err, cleaned));
                            }
                        },
                        None => grant,
                    };
                    abandon.disarm();
                    metrics::waited_for_grant(queued_at.elapsed());
                    return Ok(grant);
                }
                Ok(Turn::Gone) => {
                    abandon.now().await;
                    return Err(self.why_gone(&name, lease.auth.lease).await);
                }
                Ok(Turn::Behind(ref predecessor)) => {
                    // Our predecessor going, or our own key going (lease died), means re-read.
                    wakeups.watch(&[predecessor, waiter_key.as_bytes()], mark);
                    match self.wait_for_wakeup(wakeups, deadline).await {
                        Woken::Recheck => None,
                        Woken::Deadline => {
                            if !abandon.now().await {
                                return Err(still_cleaning_up());
                            }
                            // Say who holds it; if etcd cannot say, that is an outage (503),
                            // not a lock we know to be held.
                            return Err(match self.current_holder(&name).await {
                                Ok(holder) => ServiceError::LockHeld { holder },
                                Err(err) => err,
                            });
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
                    tracing::debug!(error = %err, lock = %name, "waiter re-read failed; retrying");
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
            turn = self.check_turn(&name, &waiter_key, enqueued.my_rev).await;
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

    /// Refreshes the lease of a waited `ttl` grant, trying every endpoint, before answering.
    async fn refresh_before_answer(&self, lease: LeaseId) -> Result<(), ServiceError> {
        let mut last = None;
        for _ in 0..self.store.endpoint_count() {
            match self.store.lease_keep_alive(lease).await {
                Ok(()) => return Ok(()),
                Err(StoreError::LeaseNotFound) => return Err(ServiceError::LeaseNotFound),
                Err(err) => last = Some(err),
            }
        }
        Err(last.expect("at least one attempt").into())
    }

    /// Waits until a watched key (our predecessor, our own key) is deleted, a resync or the
    /// backstop asks for a re-read, the deadline passes, or shutdown begins.
    async fn wait_for_wakeup(&self, wakeups: &mut Subscription, deadline: Instant) -> Woken {
        tokio::select! {
            _ = wakeups.next() => Woken::Recheck,
            _ = tokio::time::sleep(BACKSTOP_RECHECK) => Woken::Recheck,
            _ = tokio::time::sleep_until(deadline) => Woken::Deadline,
            _ = self.shutdown.cancelled() => Woken::Shutdown,
        }
    }

    /// Puts our waiter key (creating it, or taking over the one a previous attempt under the same
    /// lease made) and reads what the decision needs, in one txn.
    ///
    /// Fenced against landing late (see the module doc): the txn compares the lease's `auth` key
    /// (the handle's digest, and no rewrite since this server's known revision) and our waiter
    /// key (no write since then). A refused fence because this server simply had not seen a
    /// recent write yet is retried with the revision the refusal showed.
    async fn enqueue(
        &self,
        name: &LockName,
        tenant: &Tenant,
        lease: &AcquireLease,
        owner: Option<String>,
        value: Vec<u8>,
        read_head: bool,
    ) -> Result<Enqueued, ServiceError> {
        let id = lease.auth.lease;
        let waiter_key = self.keys.waiter_key(name, id);
        let auth_key = self.keys.auth_key(id);
        let meta_key = self.keys.lease_meta_key(id);
        let queue = self.keys.queue_prefix(name);
        let on_lease = || Some(PutOptions::new().with_lease(id.as_i64()));
        let newest_two = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Create, SortOrder::Descend)
            .with_limit(2);
        let mut fence = self.store.known_revision();
        for _ in 0..FENCE_RETRIES {
            let mut ops = vec![TxnOp::get(waiter_key.as_str(), None)];
            let compares = match &lease.new {
                // A lease this request just granted: its keys go in with the waiter key.
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
                    Compare::mod_revision(waiter_key.as_str(), CompareOp::Less, fence + 1),
                ],
            };
            ops.push(TxnOp::put(waiter_key.as_str(), value.clone(), on_lease()));
            ops.push(TxnOp::get(queue.as_str(), Some(newest_two.clone())));
            ops.push(TxnOp::get(meta_key.as_str(), None));
            if read_head {
                ops.push(TxnOp::get(queue.as_str(), Some(head_options())));
            }
            if tenant.quotas.max_waiters_per_lock.is_some() {
                ops.push(TxnOp::get(
                    queue.as_str(),
                    Some(GetOptions::new().with_prefix().with_count_only()),
                ));
            }
            let txn = Txn::new().when(compares).and_then(ops).or_else([
                TxnOp::get(auth_key.as_str(), None),
                TxnOp::get(waiter_key.as_str(), None),
            ]);
            let resp = self.store.txn(&waiter_key, txn).await?;
            let gets = txn_gets(&resp);
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
                tracing::debug!(lock = %name, fence, "enqueue fence refused; retrying with a fresh revision");
                continue;
            }
            let prior = gets[0].kvs().first();
            let newest = gets[1].kvs();
            let meta = parse_meta(gets[2].kvs().first().map(|kv| kv.value()));
            let mut rest = gets[3..].iter();
            let head = if read_head {
                rest.next().and_then(|g| g.kvs().first().cloned())
            } else {
                None
            };
            let queue_len = rest
                .next()
                .map(|g| u64::try_from(g.count()).unwrap_or(u64::MAX));
            let enqueued = match prior {
                None => {
                    // Our key was created by this txn, so it is the newest in the queue.
                    let Some(mine) = newest
                        .first()
                        .filter(|kv| kv.key() == waiter_key.as_bytes())
                    else {
                        return Err(ServiceError::Unavailable(
                            "enqueue read did not see its own put".into(),
                        ));
                    };
                    Enqueued {
                        my_rev: mine.create_revision(),
                        predecessor: newest.get(1).map(|kv| kv.key().to_vec()),
                        created: true,
                        head,
                        queue_len,
                        meta,
                    }
                }
                Some(existing) => Enqueued {
                    my_rev: existing.create_revision(),
                    predecessor: None,
                    created: false,
                    head,
                    queue_len,
                    meta,
                },
            };
            return Ok(enqueued);
        }
        Err(ServiceError::Unavailable(
            "the lease kept changing while enqueueing; retry".into(),
        ))
    }

    /// The decisive read: in one txn, confirm our key is still the one we created and look for
    /// the key just ahead of it.
    async fn check_turn(
        &self,
        name: &LockName,
        waiter_key: &str,
        my_rev: i64,
    ) -> Result<Turn, StoreError> {
        let just_ahead = GetOptions::new()
            .with_prefix()
            .with_max_create_revision(my_rev - 1)
            .with_sort(SortTarget::Create, SortOrder::Descend)
            .with_limit(1)
            .with_keys_only();
        let txn = Txn::new()
            .when([Compare::create_revision(
                waiter_key,
                CompareOp::Equal,
                my_rev,
            )])
            .and_then([TxnOp::get(self.keys.queue_prefix(name), Some(just_ahead))]);
        let resp = self.store.txn(waiter_key, txn).await?;
        if !resp.succeeded() {
            return Ok(Turn::Gone);
        }
        Ok(match txn_gets(&resp)[0].kvs().first() {
            None => Turn::Granted,
            Some(kv) => Turn::Behind(kv.key().to_vec()),
        })
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

    /// Extends the holder's lease if `token` still holds `name` under the handle's lease.
    ///
    /// etcd cannot keep a lease alive inside a txn, so the keep-alive and the confirming txn
    /// (handle digest and token, compared together) run side by side; the answer is a renewal
    /// only if both succeed. Extending the lease harms no one else, even if the hold had ended.
    pub async fn renew(
        &self,
        tenant: &Tenant,
        name: &LockName,
        token: u64,
        auth: &LeaseAuth,
    ) -> Result<Renewal, ServiceError> {
        authorize_name(tenant, name)?;
        let waiter_key = self.keys.waiter_key(name, auth.lease);
        let auth_key = self.keys.auth_key(auth.lease);
        let confirm = Txn::new()
            .when([
                auth_matches(&auth_key, auth),
                Compare::create_revision(waiter_key.as_str(), CompareOp::Equal, token_rev(token)),
            ])
            .and_then([TxnOp::get(self.keys.lease_meta_key(auth.lease), None)])
            .or_else([
                TxnOp::get(auth_key.as_str(), None),
                TxnOp::get(self.keys.queue_prefix(name), Some(head_options())),
            ]);
        let (refreshed, confirmed) = tokio::join!(
            self.store.lease_keep_alive(auth.lease),
            self.store.txn(&waiter_key, confirm)
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
        let ttl_ms = match parse_meta(txn_gets(&confirmed)[0].kvs().first().map(|kv| kv.value())) {
            Some(meta) => meta.ttl_ms,
            None => self.etcd_granted_ttl_ms(auth.lease).await?,
        };
        Ok(Renewal {
            name: name.clone(),
            token,
            lease_id: auth.lease,
            ttl_ms,
        })
    }

    /// Releases `name` if `token` holds it under the handle's lease; deletes nothing otherwise.
    ///
    /// One txn: handle digest, token (the key's `create_revision`) and a fence (no write to the
    /// key since this server's known revision) are compared in the step that deletes. The fence
    /// is what makes a late release harmless: a holder that re-acquires under the same lease
    /// (same key, same token) rewrites the key, so an earlier release that lands afterwards finds
    /// a newer `mod_revision` and deletes nothing. Retried on other endpoints while etcd gives no
    /// answer; a retry that finds the key gone after an unanswered attempt counts as released.
    pub async fn release(
        &self,
        tenant: &Tenant,
        name: &LockName,
        token: u64,
        auth: &LeaseAuth,
    ) -> Result<(), ServiceError> {
        authorize_name(tenant, name)?;
        let waiter_key = self.keys.waiter_key(name, auth.lease);
        let auth_key = self.keys.auth_key(auth.lease);
        let mut fence = self.store.known_revision();
        let mut unanswered = false;
        for _ in 0..FENCE_RETRIES + self.store.endpoint_count() {
            let txn = Txn::new()
                .when([
                    auth_matches(&auth_key, auth),
                    Compare::create_revision(
                        waiter_key.as_str(),
                        CompareOp::Equal,
                        token_rev(token),
                    ),
                    Compare::mod_revision(waiter_key.as_str(), CompareOp::Less, fence + 1),
                ])
                .and_then([TxnOp::delete(waiter_key.as_str(), None)])
                .or_else([
                    TxnOp::get(auth_key.as_str(), None),
                    TxnOp::get(waiter_key.as_str(), None),
                    TxnOp::get(self.keys.queue_prefix(name), Some(head_options())),
                ]);
            let resp = match self.store.txn(&waiter_key, txn).await {
                Ok(resp) => resp,
                Err(StoreError::Unavailable(msg)) => {
                    unanswered = true;
                    tracing::debug!(%msg, lock = %name, "release unanswered; trying another endpoint");
                    continue;
                }
                Err(err) => return Err(err.into()),
            };
            if resp.succeeded() {
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
            match gets[1].kvs().first() {
                Some(kv) if kv.create_revision() == token_rev(token) => {
                    // Only the fence refused: a write this server had not seen. Retry from the
                    // revision etcd showed.
                    fence = resp.header().map_or(fence, |h| h.revision());
                }
                // Gone: if an unanswered attempt of ours may have deleted it, it is released.
                None if unanswered => return Ok(()),
                _ => return Err(held_under_another_lease(&gets[2], token, auth)),
            }
        }
        Err(ServiceError::Unavailable(
            "etcd did not confirm the release; it may still happen; retry".into(),
        ))
    }

    /// Who holds `name` and how many wait, from one consistent read.
    pub async fn lock_status(
        &self,
        tenant: &Tenant,
        name: &LockName,
    ) -> Result<LockStatus, ServiceError> {
        authorize_name(tenant, name)?;
        let queue = self.keys.queue_prefix(name);
        let txn = Txn::new().and_then([
            TxnOp::get(queue.as_str(), Some(head_options())),
            TxnOp::get(
                queue.as_str(),
                Some(GetOptions::new().with_prefix().with_count_only()),
            ),
        ]);
        let resp = self.store.txn(&queue, txn).await?;
        let gets = txn_gets(&resp);
        let holder = match gets[0].kvs().first() {
            Some(kv) => self.holder_of(kv).await,
            None => None,
        };
        let queued = u64::try_from(gets[1].count()).unwrap_or(0);
        Ok(LockStatus {
            name: name.clone(),
            waiters: queued.saturating_sub(u64::from(holder.is_some())),
            holder,
        })
    }

    /// The current holder of `name`, if any (the caller was authorized for `name`).
    async fn current_holder(&self, name: &LockName) -> Result<Option<Holder>, ServiceError> {
        let head = self
            .store
            .get(&self.keys.queue_prefix(name), Some(head_options()))
            .await?;
        Ok(match head.kvs().first() {
            Some(kv) => self.holder_of(kv).await,
            None => None,
        })
    }

    /// Describes the holder whose waiter key is `kv`; the owner falls back to its lease's.
    async fn holder_of(&self, kv: &etcd_client::KeyValue) -> Option<Holder> {
        let lease_id = LeaseId::from_etcd(kv.lease())?;
        let stored: WaiterValue = serde_json::from_slice(kv.value()).unwrap_or_default();
        let owner = match stored.owner {
            Some(owner) => Some(owner),
            None => {
                let meta = self
                    .store
                    .get(&self.keys.lease_meta_key(lease_id), None)
                    .await
                    .ok()?;
                parse_meta(meta.kvs().first().map(|kv| kv.value())).and_then(|m| m.owner)
            }
        };
        Some(Holder {
            token: kv.create_revision() as u64,
            lease_id,
            owner,
        })
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

/// Removes an abandoned acquire's traces: its waiter key (only if still the one this request
/// created or took over), or the whole lease when the server granted it for this request.
///
/// Armed until the acquire is granted. Dropped while armed (the request future was dropped
/// because the HTTP client went away), it cleans up in a background task that shutdown waits for.
/// A clean-up etcd does not confirm is retried on other endpoints, in the background after the
/// request answered, until confirmed or the lease is gone.
struct Abandon {
    service: Service,
    waiter_key: String,
    /// The value this request wrote (unique: it carries a nonce). Comparing it recognises our
    /// key even when the enqueue txn's answer was lost, and stops recognising it once a retry of
    /// the same acquire has taken it over.
    value: Vec<u8>,
    auth: LeaseAuth,
    /// True when the lease was granted for this request (revoke it instead).
    own_lease: bool,
    /// True once etcd answered the enqueue: no late enqueue of ours can land any more.
    enqueue_confirmed: bool,
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
        if job.attempt(2).await {
            return true;
        }
        self.service.tasks.spawn(job.until_confirmed());
        false
    }

    fn job(&self) -> CleanUp {
        CleanUp {
            service: self.service.clone(),
            waiter_key: self.waiter_key.clone(),
            value: self.value.clone(),
            auth: self.auth.clone(),
            own_lease: self.own_lease,
            enqueue_confirmed: self.enqueue_confirmed,
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
    waiter_key: String,
    value: Vec<u8>,
    auth: LeaseAuth,
    own_lease: bool,
    enqueue_confirmed: bool,
}

impl CleanUp {
    /// The txn that removes our waiter key if it is still ours. When the enqueue's outcome is
    /// unknown it also rewrites the lease's `auth` key (same value): that moves its
    /// `mod_revision` past every fence a late enqueue of ours carries, so the late enqueue is
    /// refused whenever it lands (it cannot create a waiter nobody waits for, nor take over a key
    /// a retry resumed). Harmless when applied twice or late: it deletes only a key carrying this
    /// request's nonce, and rewrites `auth` only while it still holds the live digest.
    fn txn(&self) -> Txn {
        let delete_if_ours = Txn::new()
            .when([Compare::value(
                self.waiter_key.as_str(),
                CompareOp::Equal,
                self.value.clone(),
            )])
            .and_then([TxnOp::delete(self.waiter_key.as_str(), None)]);
        if self.enqueue_confirmed {
            return delete_if_ours;
        }
        let auth_key = self.service.keys.auth_key(self.auth.lease);
        Txn::new()
            .when([auth_matches(&auth_key, &self.auth)])
            .and_then([
                TxnOp::put(
                    auth_key.as_str(),
                    self.auth.digest.live(),
                    Some(PutOptions::new().with_lease(self.auth.lease.as_i64())),
                ),
                TxnOp::txn(delete_if_ours.clone()),
            ])
            .or_else([TxnOp::txn(delete_if_ours)])
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
            result
        } else {
            store
                .txn_until_answered(&self.waiter_key, self.txn(), rounds)
                .await
                .map(drop)
        };
        match result {
            Ok(()) | Err(StoreError::LeaseNotFound) => true,
            Err(err) => {
                tracing::warn!(error = %err, key = %self.waiter_key, "clean-up of an abandoned wait not confirmed yet; retrying");
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
                tracing::error!(key = %self.waiter_key, "gave up cleaning up an abandoned wait; its lease will remove it");
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

    /// A queued acquire is a parked task; its future's size is its memory. Keep it small (the
    /// etcd calls inside are boxed by `Store::call`), so 1,000 waiters cost megabytes, not
    /// hundreds of them.
    #[tokio::test]
    async fn an_acquire_future_is_small() {
        let store = Store::connect(
            &["http://127.0.0.1:1".to_owned()],
            Duration::from_secs(1),
            &crate::EtcdSecurity::default(),
        )
        .await
        .unwrap();
        let service = Service::new(store, "/test");
        let acquire = service.acquire(AcquireRequest {
            name: LockName::new("a").unwrap(),
            lease: LeaseChoice::New {
                ttl: Duration::from_secs(10),
            },
            wait: Duration::from_secs(1),
            owner: None,
            tenant: Arc::new(Tenant::open()),
        });
        let size = std::mem::size_of_val(&acquire);
        assert!(size < 12 * 1024, "an acquire future takes {size} bytes");
        // The handler state is cloned per request and kept by parked waiters: a handle.
        assert_eq!(std::mem::size_of::<Service>(), std::mem::size_of::<usize>());
    }
}
