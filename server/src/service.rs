//! The lease-and-lock service that the HTTP layer calls: shared context and outcome types.
//!
//! Its operations live beside their subject: leases in `lease.rs`, the lock algorithm in
//! `lock.rs`. The service keeps no lock state: everything it decides, it reads from etcd.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::keys::{KeySchema, LeaseId};
use crate::store::{Store, StoreError};
use crate::wakeups::Wakeups;

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
}

impl From<StoreError> for ServiceError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::LeaseNotFound => ServiceError::LeaseNotFound,
            StoreError::Unavailable(msg) => ServiceError::Unavailable(msg),
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

    /// True when etcd answers a linearizable read (so it has a leader and quorum).
    pub async fn is_ready(&self) -> bool {
        let options = etcd_client::GetOptions::new().with_count_only();
        self.store
            .get(&self.keys.locks_root(), Some(options))
            .await
            .is_ok()
    }
}
