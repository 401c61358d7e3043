//! The lease-and-lock service that the HTTP layer calls: shared context and outcome types.
//!
//! Its operations live beside their subject: leases in `lease.rs`, the lock algorithm in
//! `lock.rs`. The service keeps no lock state: everything it decides, it reads from etcd.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::handle::{AuthDigest, Handle};
use crate::keys::{KeySchema, LeaseId, LockName};
use crate::store::{Store, StoreError};
use crate::tenants::Tenant;
use crate::wakeups::Wakeups;

/// What it takes to act on a lease: its id and the digest its `auth` key must hold, both
/// derived from the caller's tenant and handle (see `handle.rs`).
#[derive(Debug, Clone)]
pub struct LeaseAuth {
    /// The lease the handle names.
    pub lease: LeaseId,
    /// What its `auth` key holds while it is usable.
    pub digest: AuthDigest,
}

impl LeaseAuth {
    /// The lease `handle` names for `tenant`.
    pub fn new(tenant: &Tenant, handle: &Handle) -> Self {
        Self {
            lease: handle.lease_id(&tenant.name),
            digest: handle.digest(&tenant.name),
        }
    }
}

/// Refuses a lock name outside the tenant's prefix.
pub(crate) fn authorize_name(tenant: &Tenant, name: &LockName) -> Result<(), ServiceError> {
    if tenant.may_use(name) {
        Ok(())
    } else {
        Err(ServiceError::Forbidden(format!(
            "lock names of this tenant start with {:?}",
            tenant.lock_prefix
        )))
    }
}

/// Where every Leasehold deployment on an etcd records its `--prefix` (one key each, kept while
/// the deployment exists), so that a deployment whose prefix nests with another's refuses to
/// start.
pub const PREFIX_REGISTRY: &str = "/leasehold-registry/prefixes";

/// The current holder of a lock, as reported to others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// The holder's fencing token (its waiter key's `create_revision`).
    pub token: u64,
    /// The lease the hold is attached to.
    pub lease_id: LeaseId,
    /// Who holds it, if they said.
    pub owner: Option<String>,
}

/// Why a lease or lock operation did not succeed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ServiceError {
    /// The lease does not exist (never did, expired, or was revoked).
    #[error("lease not found (expired, revoked or never granted)")]
    LeaseNotFound,
    /// The lock was not acquired within the wait.
    #[error("lock is held by someone else")]
    LockHeld {
        /// Who holds it now, if anyone (it may have been freed in the meantime).
        holder: Option<Holder>,
    },
    /// The token does not hold the lock (never did, or the hold ended).
    #[error("this token does not hold the lock")]
    NotHolder,
    /// etcd could not confirm; nothing was granted.
    #[error("etcd unavailable: {0}")]
    Unavailable(String),
    /// The server is shutting down; the wait was abandoned and cleaned up.
    #[error("server is shutting down")]
    ShuttingDown,
    /// The handle does not match the lease, or the tenant may not use this name.
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// A tenant quota would be exceeded; nothing was granted.
    #[error("quota exceeded: {0}")]
    QuotaExceeded(String),
    /// The server or etcd is overloaded; nothing was sent or applied. Retry after a pause.
    #[error("overloaded: {0}")]
    Overloaded(String),
    /// The acquire disagrees with the lock's other waiters (semaphore limit, read-write mode),
    /// or is otherwise inconsistent with what the lease already waits for.
    #[error("{message}")]
    Mismatch {
        /// The stable code (`limit_mismatch`, `mode_mismatch`, `invalid_request`).
        code: &'static str,
        /// Why.
        message: String,
    },
}

impl From<StoreError> for ServiceError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::LeaseNotFound => ServiceError::LeaseNotFound,
            StoreError::LeaseExists => {
                ServiceError::Unavailable("etcd reported an unexpected lease id clash".into())
            }
            StoreError::Unavailable(msg) => ServiceError::Unavailable(msg),
            StoreError::Overloaded(msg) => ServiceError::Overloaded(msg),
        }
    }
}

/// Shared context of every operation. A handle: cloning it is one reference count.
///
/// It matters: axum clones the handler's state for every request, and a parked waiter keeps
/// those clones alive, so a by-value context (the etcd client alone is kilobytes) cost ~40 KiB
/// per queued acquire.
#[derive(Clone)]
pub struct Service {
    inner: Arc<ServiceInner>,
}

/// What a [`Service`] handle shares.
pub struct ServiceInner {
    pub(crate) store: Store,
    pub(crate) keys: KeySchema,
    pub(crate) wakeups: Wakeups,
    /// Clean-ups of abandoned acquires run here, so shutdown can wait for them.
    pub(crate) tasks: TaskTracker,
    /// Cancelled when the server shuts down: waits stop and clean up.
    pub(crate) shutdown: CancellationToken,
    /// Slots for watch streams (`watch.rs`).
    pub(crate) streams: Arc<tokio::sync::Semaphore>,
}

impl std::ops::Deref for Service {
    type Target = ServiceInner;

    fn deref(&self) -> &ServiceInner {
        &self.inner
    }
}

impl Service {
    /// A service over `store`, with keys under `prefix`. Call [`Service::start`] to run the
    /// shared watch that wakes waiters.
    pub fn new(store: Store, prefix: &str) -> Self {
        Self {
            inner: Arc::new(ServiceInner {
                store,
                keys: KeySchema::new(prefix),
                wakeups: Wakeups::default(),
                tasks: TaskTracker::new(),
                shutdown: CancellationToken::new(),
                streams: Arc::new(tokio::sync::Semaphore::new(crate::watch::MAX_STREAMS)),
            }),
        }
    }

    /// Starts the background watch that wakes waiters; it stops at [`Service::begin_shutdown`].
    pub fn start(&self) {
        let wakeups = self.wakeups.clone();
        tokio::spawn(wakeups.run(self.store.clone(), self.keys.clone(), self.shutdown.clone()));
    }

    /// Cancels every wait (each cleans up after itself) and stops the watch.
    pub fn begin_shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Waits (at most `timeout`) for clean-ups still running to finish.
    pub async fn finish_shutdown(&self, timeout: Duration) {
        self.tasks.close();
        if tokio::time::timeout(timeout, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("clean-ups still running at exit; their leases will expire them");
        }
    }

    /// Records this deployment's prefix in etcd's registry of Leasehold prefixes, after checking
    /// that no other deployment's prefix nests with it (`/a` and `/a/b` would read each other's
    /// keys). `Forbidden` names the clash. Equal prefixes are one deployment's replicas.
    pub async fn register_prefix(&self) -> Result<(), ServiceError> {
        let ours = format!("{}/", self.keys.prefix());
        let others = self
            .store
            .get(
                PREFIX_REGISTRY,
                Some(
                    etcd_client::GetOptions::new()
                        .with_prefix()
                        .with_keys_only(),
                ),
            )
            .await?;
        for kv in others.kvs() {
            let Some(theirs) = kv
                .key()
                .strip_prefix(PREFIX_REGISTRY.as_bytes())
                .and_then(|p| std::str::from_utf8(p).ok())
            else {
                continue;
            };
            if theirs != ours && (theirs.starts_with(&ours) || ours.starts_with(theirs)) {
                return Err(ServiceError::Forbidden(format!(
                    "--prefix {:?} nests with the prefix {:?} of another Leasehold deployment on this etcd; \
                     give each deployment a prefix where neither is a prefix of the other (to retire a \
                     deployment: etcdctl del {PREFIX_REGISTRY}{theirs})",
                    self.keys.prefix(),
                    theirs.trim_end_matches('/')
                )));
            }
        }
        self.store
            .put(&format!("{PREFIX_REGISTRY}{ours}"), Vec::new(), None)
            .await?;
        Ok(())
    }

    /// True when etcd answers a linearizable read (so it has a leader and quorum).
    pub async fn is_ready(&self) -> bool {
        let options = etcd_client::GetOptions::new().with_count_only();
        self.store
            .get(&self.keys.locks_root(), Some(options))
            .await
            .is_ok()
    }
}
