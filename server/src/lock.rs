//! Locks by name: mutexes, semaphores (`limit`) and read-write locks (`mode`), over the queue
//! core in `queue.rs`, and what a lock's status shows.
//!
//! - A **mutex** grants the head of the queue; its token is the head's `create_revision`.
//! - A **semaphore** with limit `N` grants the first `N` keys of the queue, each with its own
//!   token; every acquirer of the name must give the same `N` (`409 limit_mismatch`).
//! - A **read-write lock** grants a shared waiter when no exclusive waiter is ahead of it, and an
//!   exclusive waiter when nobody is ahead: a writer waits for the readers ahead and blocks the
//!   readers behind, so a stream of readers cannot starve it (`rwlock.rs`).

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{GetOptions, SortOrder, SortTarget, Txn, TxnOp};

use crate::handle::Handle;
use crate::keys::{KeySchema, LeaseId, LockName, WaiterValue};
use crate::lease::{head_options, parse_meta, txn_gets};
pub use crate::queue::LeaseChoice;
use crate::queue::{Enqueue, Kind};
use crate::service::{Holder, LeaseAuth, Service, ServiceError, authorize_name};
#[cfg(test)]
use crate::store::Store;
use crate::tenants::Tenant;

/// Most queue entries a status lists (the count is always exact).
pub const STATUS_LIST_MAX: usize = 1000;

/// Most keys the lock list reads.
const LIST_KEYS_MAX: usize = 10_000;

/// One lock in the list of locks: its queue length and its head.
#[derive(Debug, Clone)]
pub struct LockSummary {
    /// The lock.
    pub name: LockName,
    /// Keys in its queue, holders included.
    pub queued: u64,
    /// The head's token and owner.
    pub head: Option<(u64, Option<String>)>,
}

/// What to acquire and how long to wait for it.
#[derive(Debug, Clone)]
pub struct AcquireRequest {
    /// The lock.
    pub name: LockName,
    /// Mutex, semaphore slot, or read-write lock side.
    pub kind: Kind,
    /// The lease to hold it under.
    pub lease: LeaseChoice,
    /// How long to wait in line; zero means try once.
    pub wait: Duration,
    /// Who is asking (reported to others while the lock is held).
    pub owner: Option<String>,
    /// A candidate's value (elections), shown while it holds.
    pub value: Option<String>,
    /// After the hold's lease *expires* (not after a release or revoke), keep the lock from
    /// being granted for this long (`delay.rs`); zero: none. Mutexes and semaphores only.
    pub lock_delay: Duration,
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

/// One key of a lock's queue, as its status shows it (never a handle).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueEntry {
    /// Its token (the one it holds with, or will when granted).
    pub token: u64,
    /// The lease it waits or holds under.
    pub lease_id: LeaseId,
    /// Who, if they said.
    pub owner: Option<String>,
    /// `shared` or `exclusive` for a read-write lock.
    pub mode: Option<String>,
    /// A candidate's value (elections).
    pub value: Option<String>,
    /// True if it holds now.
    pub holds: bool,
}

/// Who holds a lock and who waits, in order.
#[derive(Debug, Clone)]
pub struct LockStatus {
    /// The lock.
    pub name: LockName,
    /// The first holder (the only one for a mutex), if any.
    pub holder: Option<Holder>,
    /// Waiters queued behind the holders.
    pub waiters: u64,
    /// The semaphore limit (1 for a mutex); `None` for a read-write lock or a free lock.
    pub limit: Option<u32>,
    /// The queue in order, holders first, at most 1,000 entries.
    pub queue: Vec<QueueEntry>,
}

impl Service {
    /// Acquires `req.name`, waiting in line up to `req.wait`.
    ///
    /// Cancellation-safe: if this future is dropped (the HTTP client went away) the waiter key is
    /// removed in the background.
    pub async fn acquire(&self, req: AcquireRequest) -> Result<Grant, ServiceError> {
        let granted = self
            .enqueue_and_wait(Enqueue {
                names: vec![req.name.clone()],
                kind: req.kind,
                lease: req.lease,
                wait: req.wait,
                owner: req.owner,
                value: req.value,
                lock_delay: req.lock_delay,
                tenant: req.tenant,
            })
            .await?;
        Ok(Grant {
            name: req.name,
            token: granted.token,
            lease_id: granted.lease_id,
            handle: granted.handle,
            ttl_ms: granted.ttl_ms,
            owner: granted.owner,
        })
    }

    /// Extends the holder's lease if `token` still holds `name` under the handle's lease.
    pub async fn renew(
        &self,
        tenant: &Tenant,
        name: &LockName,
        token: u64,
        auth: &LeaseAuth,
    ) -> Result<Renewal, ServiceError> {
        let ttl_ms = self.renew_hold(tenant, name, token, auth).await?;
        Ok(Renewal {
            name: name.clone(),
            token,
            lease_id: auth.lease,
            ttl_ms,
        })
    }

    /// Releases `name` if `token` holds it under the handle's lease; deletes nothing otherwise.
    pub async fn release(
        &self,
        tenant: &Tenant,
        name: &LockName,
        token: u64,
        auth: &LeaseAuth,
    ) -> Result<(), ServiceError> {
        self.release_names(tenant, std::slice::from_ref(name), token, auth)
            .await
    }

    /// Who holds `name` and who waits, in order, from one consistent read.
    pub async fn lock_status(
        &self,
        tenant: &Tenant,
        name: &LockName,
    ) -> Result<LockStatus, ServiceError> {
        authorize_name(tenant, name)?;
        Ok(self.lock_status_at(name, None).await?.0)
    }

    /// [`Service::lock_status`] as of etcd revision `at` (etcd keeps history until it
    /// compacts), or now; also returns the revision read. The caller was authorized for `name`.
    pub(crate) async fn lock_status_at(
        &self,
        name: &LockName,
        at: Option<i64>,
    ) -> Result<(LockStatus, i64), ServiceError> {
        let queue = self.keys.queue_prefix(name);
        let at_revision = |options: GetOptions| match at {
            Some(revision) => options.with_revision(revision),
            None => options,
        };
        let in_order = at_revision(
            GetOptions::new()
                .with_prefix()
                .with_sort(SortTarget::Create, SortOrder::Ascend)
                .with_limit(STATUS_LIST_MAX as i64),
        );
        let count = at_revision(GetOptions::new().with_prefix().with_count_only());
        // Lock-delay tombstones (`delay.rs`), to tell how many slots orphans take.
        let tombstones = at_revision(
            GetOptions::new()
                .with_prefix()
                .with_keys_only()
                .with_limit(STATUS_LIST_MAX as i64),
        );
        let txn = Txn::new().and_then([
            TxnOp::get(queue.as_str(), Some(in_order)),
            TxnOp::get(queue.as_str(), Some(count)),
            TxnOp::get(self.keys.delay_prefix(name), Some(tombstones)),
        ]);
        let resp = self.store.txn(&queue, txn).await?;
        let revision = at.unwrap_or_else(|| resp.header().map_or(0, |h| h.revision()));
        let gets = txn_gets(&resp);
        let keys = gets[0].kvs();
        let total = u64::try_from(gets[1].count()).unwrap_or(0);
        let values: Vec<WaiterValue> = keys
            .iter()
            .map(|kv| serde_json::from_slice(kv.value()).unwrap_or_default())
            .collect();
        let head_kind = values
            .first()
            .map(|v| (v.mode.clone(), v.limit.unwrap_or(1)));
        // Orphan tombstones: a lock-delay after a holder's lease expired, each taking a slot
        // (the whole lock, for a read-write lock) until it goes.
        let listed: Vec<i64> = keys.iter().map(|kv| kv.lease()).collect();
        let orphans = gets[2]
            .kvs()
            .iter()
            .filter_map(|kv| KeySchema::lease_of_key(kv.key()))
            .filter(|lease| !listed.contains(&lease.as_i64()))
            .count();
        // Who holds: the first `limit` keys (mutex, semaphore) but one per orphan; for a
        // read-write lock (no orphan) the first key, and if it is shared, every shared key
        // before the first exclusive one.
        let holding = match &head_kind {
            None => 0,
            Some((None, limit)) => (*limit as usize).saturating_sub(orphans).min(keys.len()),
            Some(_) if orphans > 0 => 0,
            Some((Some(mode), _)) if mode == "exclusive" => 1,
            Some((Some(_), _)) => values
                .iter()
                .take_while(|v| v.mode.as_deref() != Some("exclusive"))
                .count(),
        };
        let queue_entries = keys
            .iter()
            .zip(&values)
            .enumerate()
            .filter_map(|(i, (kv, value))| {
                Some(QueueEntry {
                    token: kv.create_revision() as u64,
                    lease_id: LeaseId::from_etcd(kv.lease())?,
                    owner: value.owner.clone(),
                    mode: value.mode.clone(),
                    value: value.value.clone(),
                    holds: i < holding,
                })
            })
            .collect();
        let holder = match keys.first() {
            Some(kv) if holding > 0 => self.holder_of(kv).await,
            _ => None,
        };
        let status = LockStatus {
            name: name.clone(),
            waiters: total.saturating_sub(holding as u64),
            holder,
            limit: head_kind.and_then(|(mode, limit)| mode.is_none().then_some(limit)),
            queue: queue_entries,
        };
        Ok((status, revision))
    }

    /// Every lock of `tenant` with someone in its queue (at most `max`), sorted by name: the
    /// status page's list. One range read over every queue.
    pub async fn list_locks(
        &self,
        tenant: &Tenant,
        max: usize,
    ) -> Result<(Vec<LockSummary>, i64), ServiceError> {
        let root = self.keys.locks_root();
        let all = self
            .store
            .get(
                &root,
                Some(
                    GetOptions::new()
                        .with_prefix()
                        .with_limit(LIST_KEYS_MAX as i64),
                ),
            )
            .await?;
        let mut locks: std::collections::BTreeMap<String, LockSummary> = Default::default();
        for kv in all.kvs() {
            let Some(name) = self.keys.name_of_key(kv.key()) else {
                continue;
            };
            if !tenant.may_use(&name)
                || !kv
                    .key()
                    .starts_with(self.keys.queue_prefix(&name).as_bytes())
            {
                continue;
            }
            let stored: WaiterValue = serde_json::from_slice(kv.value()).unwrap_or_default();
            let entry = locks
                .entry(name.as_str().to_owned())
                .or_insert_with(|| LockSummary {
                    name: name.clone(),
                    queued: 0,
                    head: None,
                });
            entry.queued += 1;
            let token = kv.create_revision() as u64;
            if entry.head.as_ref().is_none_or(|(t, _)| token < *t) {
                entry.head = Some((token, stored.owner));
            }
        }
        let revision = all.header().map_or(0, |h| h.revision());
        Ok((locks.into_values().take(max).collect(), revision))
    }

    /// The current holder of `name`, if any (the caller was authorized for `name`): the head of
    /// its queue, but for a mutex in lock-delay. There, a tombstone of another lease than the
    /// head's is an orphan (a mutex's only tombstone with a live waiter key is its holder's), so
    /// the head is a waiter and nobody holds the lock. Head and tombstones are read in one txn.
    pub(crate) async fn current_holder(
        &self,
        name: &LockName,
    ) -> Result<Option<Holder>, ServiceError> {
        let queue = self.keys.queue_prefix(name);
        let txn = Txn::new().and_then([
            TxnOp::get(queue.as_str(), Some(head_options())),
            crate::delay::tombstone_read(&self.keys, name, 2),
        ]);
        let resp = self.store.txn(&queue, txn).await?;
        let gets = txn_gets(&resp);
        let Some(kv) = gets[0].kvs().first() else {
            return Ok(None);
        };
        let stored: WaiterValue = serde_json::from_slice(kv.value()).unwrap_or_default();
        let mutex = stored.limit.unwrap_or(1) == 1 && stored.mode.is_none();
        if let Some(head_lease) = LeaseId::from_etcd(kv.lease())
            && mutex
            && !crate::delay::others(&gets[1], head_lease).is_empty()
        {
            return Ok(None);
        }
        Ok(self.holder_of(kv).await)
    }

    /// Describes the holder whose waiter key is `kv`; the owner falls back to its lease's.
    pub(crate) async fn holder_of(&self, kv: &etcd_client::KeyValue) -> Option<Holder> {
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
            kind: Kind::MUTEX,
            lease: LeaseChoice::New {
                ttl: Duration::from_secs(10),
            },
            wait: Duration::from_secs(1),
            owner: None,
            value: None,
            lock_delay: Duration::ZERO,
            tenant: Arc::new(Tenant::open()),
        });
        let size = std::mem::size_of_val(&acquire);
        assert!(size < 12 * 1024, "an acquire future takes {size} bytes");
        // The handler state is cloned per request and kept by parked waiters: a handle.
        assert_eq!(std::mem::size_of::<Service>(), std::mem::size_of::<usize>());
    }
}
