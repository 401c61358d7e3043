//! The lock algorithm: a FIFO queue of leased waiter keys in etcd, and fencing tokens.
//!
//! A lock named `N` is the set of waiter keys under `P/locks/{N}/q/` (see `keys.rs`), one per
//! lease, each attached to its lease. The holder is the key with the smallest `create_revision`,
//! and that revision is the fencing token. Since etcd's revision only grows, and a new waiter key
//! is always created after every key already in the queue, each new holder's token is strictly
//! greater than every token issued before for that lock, across replicas and restarts, with no
//! counter of our own.
//!
//! - **Acquire** ([`Service::acquire`]) puts the waiter key if absent and reads the queue head in
//!   one txn: one round trip when the lock is free. Retrying with the same lease finds the same key
//!   (same token, same place in line).
//! - **Wait**: a waiter watches only its predecessor (the key just ahead of it) and its own key,
//!   through the shared watch in `wakeups.rs`. When either is deleted it re-reads, and that one
//!   txn both confirms its own key still exists and looks for a predecessor: a waiter whose lease
//!   died is never granted (etcd issues 11456 and 19597).
//! - **Abandon**: a wait that times out, whose HTTP client goes away, or that shutdown cancels
//!   deletes its waiter key if the key is still the one it created (or revokes the lease it
//!   granted for this request). A server killed mid-wait leaves the key until a retry resumes it
//!   or its lease expires.
//! - **Release** and **renew** compare the key's `create_revision` with the token in the same txn
//!   that acts, so a stale token never touches someone else's hold.

use std::time::Duration;

use etcd_client::{Compare, CompareOp, GetOptions, PutOptions, SortOrder, SortTarget, Txn, TxnOp};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::keys::{LeaseId, LockName, WaiterValue};
use crate::lease::{head_options, parse_meta, txn_gets};
use crate::metrics;
use crate::service::{Holder, Service, ServiceError};
#[cfg(test)]
use crate::store::Store;
use crate::store::StoreError;
use crate::wakeups::Subscription;

/// How often a waiter re-reads even without a wakeup: a backstop against a missed event, not
/// the way handoffs normally happen (those take one watch event).
const BACKSTOP_RECHECK: Duration = Duration::from_secs(10);

/// How long a waiter waits before retrying a read that etcd failed.
const RETRY_AFTER_STORE_ERROR: Duration = Duration::from_millis(200);

/// Which lease an acquire is held under.
#[derive(Debug, Clone)]
pub enum LeaseChoice {
    /// An existing lease, kept alive by the caller.
    Existing(LeaseId),
    /// A lease the server grants for this request; the caller keeps it alive after the grant.
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
    /// The queue's first key.
    head: Option<etcd_client::KeyValue>,
    /// The key just ahead of ours, when our key was created by this txn (else: not known).
    predecessor: Option<Vec<u8>>,
    /// Our owner: as stored in our key, else the lease's.
    owner: Option<String>,
    /// The lease's granted TTL, if its meta key says.
    ttl_ms: Option<u64>,
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
        } = req;
        let (lease_id, granted_ttl_ms) = match lease {
            LeaseChoice::Existing(id) => (id, None),
            LeaseChoice::New { ttl } => {
                let lease = self.grant_lease(ttl, owner.clone()).await?;
                (lease.lease_id, Some(lease.ttl_ms))
            }
        };
        let waiter_key = self.keys.waiter_key(&name, lease_id);
        let value = serde_json::to_vec(&WaiterValue {
            owner: owner.clone(),
            nonce: Some(uuid::Uuid::new_v4().to_string()),
        })
        .expect("waiter value serializes");
        let mut abandon = Abandon {
            service: self.clone(),
            waiter_key: waiter_key.clone(),
            value: value.clone(),
            own_lease: granted_ttl_ms.map(|_| lease_id),
            armed: true,
        };
        // While we wait, nobody else keeps a lease we granted alive.
        let _keepalive = match granted_ttl_ms {
            Some(ttl_ms) if !wait.is_zero() => {
                Some(self.keep_alive_while_waiting(lease_id, ttl_ms))
            }
            _ => None,
        };
        // Subscribe, and mark, before the first read, so no deletion after it can be missed.
        let queue = self.keys.queue_prefix(&name);
        let mut wakeups = (!wait.is_zero()).then(|| self.wakeups.subscribe(&queue));
        let mut mark = wakeups.as_ref().map_or(0, Subscription::mark);
        let deadline = Instant::now() + wait;

        let enqueued = match self.enqueue(&name, lease_id, value).await {
            Ok(enqueued) => enqueued,
            Err(err) => {
                abandon.now().await;
                return Err(err.into());
            }
        };
        let ttl_ms = match granted_ttl_ms.or(enqueued.ttl_ms) {
            Some(ttl_ms) => ttl_ms,
            None => self.etcd_granted_ttl_ms(lease_id).await?,
        };
        let grant = Grant {
            name: name.clone(),
            token: enqueued.my_rev as u64,
            lease_id,
            ttl_ms,
            owner: enqueued.owner.clone(),
        };
        let head_is_ours = enqueued
            .head
            .as_ref()
            .is_some_and(|kv| kv.key() == waiter_key.as_bytes());
        if head_is_ours {
            abandon.disarm();
            return Ok(grant);
        }
        let Some(wakeups) = wakeups.as_mut() else {
            abandon.now().await;
            let holder = match enqueued.head {
                Some(kv) => self.holder_of(&kv).await,
                None => None,
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
                    if granted_ttl_ms.is_some() {
                        // Our keep-alives ran every TTL/3 while we waited, so the lease may have
                        // only two thirds of its TTL left; the answer promises `ttl_ms` from now.
                        // Best effort: if this fails, the caller's first renewal refreshes it.
                        let _ = self.store.lease_keep_alive(lease_id).await;
                    }
                    abandon.disarm();
                    metrics::waited_for_grant(queued_at.elapsed());
                    return Ok(grant);
                }
                Ok(Turn::Gone) => {
                    abandon.now().await;
                    return Err(self.why_gone(&name, lease_id).await);
                }
                Ok(Turn::Behind(ref predecessor)) => {
                    // Our predecessor going, or our own key going (lease died), means re-read.
                    wakeups.watch(&[predecessor, waiter_key.as_bytes()], mark);
                    match self.wait_for_wakeup(wakeups, deadline).await {
                        Woken::Recheck => None,
                        Woken::Deadline => {
                            abandon.now().await;
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
                Err(ref err @ StoreError::Unavailable(_)) => {
                    tracing::debug!(error = %err, lock = %name, "waiter re-read failed; retrying");
                    Some(err.clone())
                }
            };
            if let Some(store_error) = retry_after {
                tokio::select! {
                    _ = tokio::time::sleep(RETRY_AFTER_STORE_ERROR) => {}
                    _ = tokio::time::sleep_until(deadline) => {
                        abandon.now().await;
                        // etcd never confirmed our turn: that is an outage, not a held lock.
                        return Err(store_error.into());
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

    /// Puts our waiter key if absent and reads the queue, in one txn (one round trip).
    async fn enqueue(
        &self,
        name: &LockName,
        lease: LeaseId,
        value: Vec<u8>,
    ) -> Result<Enqueued, StoreError> {
        let waiter_key = self.keys.waiter_key(name, lease);
        let queue = self.keys.queue_prefix(name);
        let meta_key = self.keys.lease_meta_key(lease);
        let newest_two = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Create, SortOrder::Descend)
            .with_limit(2);
        let txn = Txn::new()
            .when([Compare::create_revision(
                waiter_key.as_str(),
                CompareOp::Equal,
                0,
            )])
            .and_then([
                TxnOp::put(
                    waiter_key.as_str(),
                    value.clone(),
                    Some(PutOptions::new().with_lease(lease.as_i64())),
                ),
                TxnOp::get(queue.as_str(), Some(head_options())),
                TxnOp::get(meta_key.as_str(), None),
                TxnOp::get(queue.as_str(), Some(newest_two)),
            ])
            // A retry resumes the key (same create_revision: same token, same place in line)
            // and takes it over: rewriting the value with this request's nonce means the
            // abandoned request's clean-up no longer recognises the key as its own.
            .or_else([
                TxnOp::put(
                    waiter_key.as_str(),
                    value,
                    Some(PutOptions::new().with_lease(lease.as_i64())),
                ),
                TxnOp::get(queue.as_str(), Some(head_options())),
                TxnOp::get(meta_key.as_str(), None),
                TxnOp::get(waiter_key.as_str(), None),
            ]);
        let resp = self.store.txn(&waiter_key, txn).await?;
        let gets = txn_gets(&resp);
        let head = gets[0].kvs().first().cloned();
        let meta = parse_meta(gets[1].kvs().first().map(|kv| kv.value()));
        let (my_rev, predecessor, mine) = if resp.succeeded() {
            // Our key was created by this txn, so it is the newest in the queue.
            let newest = gets[2].kvs();
            let mine = newest
                .first()
                .filter(|kv| kv.key() == waiter_key.as_bytes());
            let Some(mine) = mine else {
                return Err(StoreError::Unavailable(
                    "enqueue read did not see its own put".into(),
                ));
            };
            (
                mine.create_revision(),
                newest.get(1).map(|kv| kv.key().to_vec()),
                mine.clone(),
            )
        } else {
            let Some(mine) = gets[2].kvs().first() else {
                return Err(StoreError::Unavailable(
                    "waiter key vanished inside a txn".into(),
                ));
            };
            (mine.create_revision(), None, mine.clone())
        };
        let stored: WaiterValue = serde_json::from_slice(mine.value()).unwrap_or_default();
        Ok(Enqueued {
            my_rev,
            head,
            predecessor,
            owner: stored
                .owner
                .or_else(|| meta.as_ref().and_then(|m| m.owner.clone())),
            ttl_ms: meta.map(|m| m.ttl_ms),
        })
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
            .with_limit(1);
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

    /// Extends the holder's lease if `token` still holds `name`.
    pub async fn renew(&self, name: &LockName, token: u64) -> Result<Renewal, ServiceError> {
        let head = self.holder_key(name, token).await?;
        let lease_id = LeaseId::from_etcd(head.lease()).ok_or(ServiceError::NotHolder)?;
        match self.store.lease_keep_alive(lease_id).await {
            Err(StoreError::LeaseNotFound) => return Err(ServiceError::NotHolder),
            other => other?,
        };
        // Confirm after extending: if the hold ended meanwhile (a concurrent release), the
        // extension is harmless to others, but we must not report a hold that is gone.
        let txn = Txn::new()
            .when([Compare::create_revision(
                head.key(),
                CompareOp::Equal,
                token as i64,
            )])
            .and_then([TxnOp::get(self.keys.lease_meta_key(lease_id), None)]);
        let resp = self
            .store
            .txn(&String::from_utf8_lossy(head.key()), txn)
            .await?;
        if !resp.succeeded() {
            return Err(ServiceError::NotHolder);
        }
        let ttl_ms = match parse_meta(txn_gets(&resp)[0].kvs().first().map(|kv| kv.value())) {
            Some(meta) => meta.ttl_ms,
            None => self.etcd_granted_ttl_ms(lease_id).await?,
        };
        Ok(Renewal {
            name: name.clone(),
            token,
            lease_id,
            ttl_ms,
        })
    }

    /// Releases `name` if `token` holds it; deletes nothing otherwise.
    pub async fn release(&self, name: &LockName, token: u64) -> Result<(), ServiceError> {
        let head = self.holder_key(name, token).await?;
        // Deleting only if the key is still the one that carries this token: a key that expired
        // and was re-created by the same lease has a new create_revision and is left alone.
        let txn = Txn::new()
            .when([Compare::create_revision(
                head.key(),
                CompareOp::Equal,
                token as i64,
            )])
            .and_then([TxnOp::delete(head.key(), None)]);
        let resp = self
            .store
            .txn(&String::from_utf8_lossy(head.key()), txn)
            .await?;
        if resp.succeeded() {
            Ok(())
        } else {
            Err(ServiceError::NotHolder)
        }
    }

    /// Who holds `name` and how many wait, from one consistent read.
    pub async fn lock_status(&self, name: &LockName) -> Result<LockStatus, ServiceError> {
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

    /// The queue head, if its token is `token`; else `NotHolder`.
    async fn holder_key(
        &self,
        name: &LockName,
        token: u64,
    ) -> Result<etcd_client::KeyValue, ServiceError> {
        let head = self
            .store
            .get(&self.keys.queue_prefix(name), Some(head_options()))
            .await?;
        match head.kvs().first() {
            Some(kv) if i64::try_from(token) == Ok(kv.create_revision()) => Ok(kv.clone()),
            _ => Err(ServiceError::NotHolder),
        }
    }

    /// The current holder of `name`, if any.
    async fn current_holder(&self, name: &LockName) -> Result<Option<Holder>, ServiceError> {
        Ok(self.lock_status(name).await?.holder)
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

/// Aborts a background task when dropped.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Removes an abandoned acquire's traces: its waiter key (only if still the one this request
/// created or resumed), or the whole lease when the server granted it for this request.
///
/// Armed until the acquire is granted. Dropped while armed (the request future was dropped
/// because the HTTP client went away), it cleans up in a background task that shutdown waits for.
struct Abandon {
    service: Service,
    waiter_key: String,
    /// The value this request wrote (unique: it carries a nonce). Comparing it recognises our
    /// key even when the enqueue txn's answer was lost, and stops recognising it once a retry of
    /// the same acquire has resumed (and rewritten) it.
    value: Vec<u8>,
    own_lease: Option<LeaseId>,
    armed: bool,
}

impl Abandon {
    fn disarm(&mut self) {
        self.armed = false;
    }

    /// Cleans up now, before answering.
    async fn now(&mut self) {
        self.armed = false;
        self.clean_up().await;
    }

    fn clean_up(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let store = self.service.store.clone();
        let key = self.waiter_key.clone();
        let value = self.value.clone();
        let own_lease = self.own_lease;
        async move {
            let result = if let Some(lease) = own_lease {
                store.lease_revoke(lease).await
            } else {
                // The value carries this request's nonce: it matches only while the key is the
                // one this request wrote or resumed (not a later retry's, not a re-created key).
                let txn = Txn::new()
                    .when([Compare::value(key.as_str(), CompareOp::Equal, value)])
                    .and_then([TxnOp::delete(key.as_str(), None)]);
                store.txn(&key, txn).await.map(drop)
            };
            match result {
                Ok(()) | Err(StoreError::LeaseNotFound) => {}
                Err(err) => {
                    tracing::warn!(error = %err, key = %key, "could not remove an abandoned waiter; its lease will")
                }
            }
        }
    }
}

impl Drop for Abandon {
    fn drop(&mut self) {
        if self.armed {
            self.service.tasks.spawn(self.clean_up());
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
        let store = Store::connect(&["http://127.0.0.1:1".to_owned()], Duration::from_secs(1))
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
        });
        let size = std::mem::size_of_val(&acquire);
        assert!(size < 12 * 1024, "an acquire future takes {size} bytes");
        // The handler state is cloned per request and kept by parked waiters: a handle.
        assert_eq!(std::mem::size_of::<Service>(), std::mem::size_of::<usize>());
    }
}
