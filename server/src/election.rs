//! Leader election over the same queue: campaigning is waiting for a lock with a value (an
//! address, an id), the leader is its holder, resigning is releasing it, and the leader's fencing
//! token is its *epoch*: strictly greater for every new leader, so a deposed leader's late writes
//! can be refused by anything that checks it (etcd's own `elect` has no such number).

use crate::keys::{LeaseId, LockName};
use crate::lock::LockStatus;
use crate::service::{Service, ServiceError};
use crate::tenants::Tenant;

/// Who leads an election, and how many stand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leadership {
    /// The election.
    pub name: LockName,
    /// The leader, if any.
    pub leader: Option<Leader>,
    /// Candidates waiting behind the leader.
    pub candidates: u64,
}

/// The current leader.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leader {
    /// What it campaigned with.
    pub value: Option<String>,
    /// Its epoch: the fencing token of its leadership.
    pub epoch: u64,
    /// Who, if it said.
    pub owner: Option<String>,
    /// The lease it leads under.
    pub lease_id: LeaseId,
}

impl Leadership {
    /// The leadership a lock status describes.
    pub fn of(status: &LockStatus) -> Self {
        let leader = status.queue.first().filter(|e| e.holds).map(|e| Leader {
            value: e.value.clone(),
            epoch: e.token,
            owner: e.owner.clone(),
            lease_id: e.lease_id,
        });
        Self {
            name: status.name.clone(),
            candidates: status.waiters,
            leader,
        }
    }
}

impl Service {
    /// Who leads election `name`.
    pub async fn leadership(
        &self,
        tenant: &Tenant,
        name: &LockName,
    ) -> Result<Leadership, ServiceError> {
        Ok(Leadership::of(&self.lock_status(tenant, name).await?))
    }
}
