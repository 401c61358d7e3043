//! All-or-nothing groups: one acquire of several names that holds every one of them or none,
//! like Redisson's `MultiLock`, but FIFO and without deadlocks.
//!
//! The group's waiter keys are put by one txn, so they all carry that txn's revision, which is
//! also the group's token on every name. Every waiter of every lock waits only for keys with a
//! smaller revision, so the "waits for" relation follows revisions downwards and can never close
//! a cycle: two groups asking for the same names in opposite orders cannot deadlock, and the
//! older one is served first. A group is granted when every name is clear at once, in one
//! decisive read; a wait that runs out removes every key of the group in one txn, so no partial
//! hold is ever left behind. Release takes the names back in one txn.

use std::sync::Arc;
use std::time::Duration;

use crate::keys::LockName;
use crate::queue::{Enqueue, Granted, Kind, LeaseChoice};
use crate::service::{LeaseAuth, Service, ServiceError};
use crate::tenants::Tenant;

/// Most names one group may take.
pub const MAX_GROUP: usize = 64;

impl Service {
    /// Acquires every one of `names` or none, waiting in line up to `wait`.
    pub async fn acquire_group(
        &self,
        names: Vec<LockName>,
        lease: LeaseChoice,
        wait: Duration,
        owner: Option<String>,
        tenant: Arc<Tenant>,
    ) -> Result<Granted, ServiceError> {
        self.enqueue_and_wait(Enqueue {
            names,
            kind: Kind::MUTEX,
            lease,
            wait,
            owner,
            value: None,
            // A group's release takes back every name in one txn; lock-delay is per name and
            // asked for by single-name acquires only.
            lock_delay: Duration::ZERO,
            tenant,
        })
        .await
    }

    /// Releases every one of `names` held with `token` under the handle's lease, in one txn;
    /// nothing if any of them is not held so.
    pub async fn release_group(
        &self,
        tenant: &Tenant,
        names: &[LockName],
        token: u64,
        auth: &LeaseAuth,
    ) -> Result<(), ServiceError> {
        self.release_names(tenant, names, token, auth).await
    }
}
