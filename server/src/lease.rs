//! TTL leases: grant, keep alive, inspect, revoke.
//!
//! A lease is an etcd lease; Leasehold adds only a `meta` key attached to it (owner and granted
//! TTL, see `keys.rs`). Locks are held under a lease: when it expires or is revoked, etcd deletes
//! every key attached to it, which frees every lock it held or waited for, at once.

use std::time::Duration;

use etcd_client::{GetOptions, PutOptions, Txn, TxnOp, TxnResponse};

use crate::keys::{LeaseId, LeaseMeta, LockName};
use crate::metrics;
use crate::service::{Service, ServiceError};

/// A lease just granted.
#[derive(Debug, Clone)]
pub struct GrantedLease {
    /// The new lease.
    pub lease_id: LeaseId,
    /// The TTL etcd granted (at least etcd's minimum), in milliseconds.
    pub ttl_ms: u64,
    /// Who holds it, as given.
    pub owner: Option<String>,
}

/// What `GET /v1/leases/{id}` reports.
#[derive(Debug, Clone)]
pub struct LeaseInfo {
    /// The lease.
    pub lease_id: LeaseId,
    /// The TTL etcd granted, in milliseconds.
    pub ttl_ms: u64,
    /// Time left before it expires, in milliseconds (etcd counts in whole seconds).
    pub remaining_ms: u64,
    /// Who holds it, if they said.
    pub owner: Option<String>,
    /// Names of the locks this lease holds now.
    pub locks: Vec<String>,
}

/// etcd counts TTLs in whole seconds: round up, so a holder never gets less than it asked for.
pub fn ttl_to_etcd_seconds(ttl: Duration) -> i64 {
    let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    i64::try_from(secs.max(1)).unwrap_or(i64::MAX)
}

/// Converts etcd's seconds to our milliseconds.
pub(crate) fn seconds_to_ms(secs: i64) -> u64 {
    u64::try_from(secs).unwrap_or(0).saturating_mul(1000)
}

/// The `Get` results of a txn, in order.
pub(crate) fn txn_gets(resp: &TxnResponse) -> Vec<etcd_client::GetResponse> {
    resp.op_responses()
        .into_iter()
        .filter_map(|op| match op {
            etcd_client::TxnOpResponse::Get(get) => Some(get),
            _ => None,
        })
        .collect()
}

/// Decodes a lease's meta value; a missing or foreign value reads as "no meta".
pub(crate) fn parse_meta(value: Option<&[u8]>) -> Option<LeaseMeta> {
    value.and_then(|v| serde_json::from_slice(v).ok())
}

impl Service {
    /// Grants a lease of at least `ttl` (etcd may raise it to its minimum) for `owner`.
    pub async fn grant_lease(
        &self,
        ttl: Duration,
        owner: Option<String>,
    ) -> Result<GrantedLease, ServiceError> {
        let granted = self.store.lease_grant(ttl_to_etcd_seconds(ttl)).await?;
        let lease_id = LeaseId::from_etcd(granted.id())
            .ok_or_else(|| ServiceError::Unavailable("etcd granted an invalid lease id".into()))?;
        let ttl_ms = seconds_to_ms(granted.ttl());
        let meta = LeaseMeta {
            owner: owner.clone(),
            ttl_ms,
        };
        let value = serde_json::to_vec(&meta).expect("meta serializes");
        let meta_key = self.keys.lease_meta_key(lease_id);
        let put = self.store.put(
            &meta_key,
            value,
            Some(PutOptions::new().with_lease(lease_id.as_i64())),
        );
        if let Err(err) = put.await {
            // Don't leave a lease nobody was told about; it would expire anyway.
            let _ = self.store.lease_revoke(lease_id).await;
            return Err(err.into());
        }
        metrics::lease_granted();
        Ok(GrantedLease {
            lease_id,
            ttl_ms,
            owner,
        })
    }

    /// Refreshes a lease to its full TTL; returns that TTL in milliseconds.
    pub async fn keep_lease_alive(&self, lease: LeaseId) -> Result<u64, ServiceError> {
        self.store.lease_keep_alive(lease).await?;
        self.granted_ttl_ms(lease).await
    }

    /// The TTL granted to `lease`, in milliseconds: from its meta key, or from etcd for a lease
    /// granted outside Leasehold.
    pub(crate) async fn granted_ttl_ms(&self, lease: LeaseId) -> Result<u64, ServiceError> {
        let meta = self
            .store
            .get(&self.keys.lease_meta_key(lease), None)
            .await?;
        match parse_meta(meta.kvs().first().map(|kv| kv.value())) {
            Some(meta) => Ok(meta.ttl_ms),
            None => self.etcd_granted_ttl_ms(lease).await,
        }
    }

    /// The TTL etcd granted to `lease`, in milliseconds, asked of etcd: for callers that already
    /// read the lease's meta key and found none (a lease granted outside Leasehold).
    pub(crate) async fn etcd_granted_ttl_ms(&self, lease: LeaseId) -> Result<u64, ServiceError> {
        let ttl = self.store.lease_time_to_live(lease, false).await?;
        if ttl.ttl() < 0 {
            return Err(ServiceError::LeaseNotFound);
        }
        Ok(seconds_to_ms(ttl.granted_ttl()))
    }

    /// Everything known about a lease, including the locks it holds now.
    pub async fn lease_info(&self, lease: LeaseId) -> Result<LeaseInfo, ServiceError> {
        let ttl = self.store.lease_time_to_live(lease, true).await?;
        if ttl.ttl() < 0 {
            return Err(ServiceError::LeaseNotFound);
        }
        // The lease's own key list names every queue it is in: no index of our own needed.
        let waiting_in: Vec<LockName> = ttl
            .keys()
            .iter()
            .filter_map(|key| {
                let key = std::str::from_utf8(key).ok()?;
                let rest = key.strip_prefix(&self.keys.locks_root())?;
                let (encoded, lease_part) = rest.split_once("/q/")?;
                (lease_part == lease.to_string()).then_some(())?;
                LockName::from_encoded(encoded)
            })
            .collect();

        let mut reads = vec![TxnOp::get(self.keys.lease_meta_key(lease), None)];
        reads.extend(
            waiting_in
                .iter()
                .map(|name| TxnOp::get(self.keys.queue_prefix(name), Some(head_options()))),
        );
        let resp = self
            .store
            .txn(&self.keys.lease_meta_key(lease), Txn::new().and_then(reads))
            .await?;
        let gets = txn_gets(&resp);
        let meta = parse_meta(gets[0].kvs().first().map(|kv| kv.value()));
        let locks = waiting_in
            .iter()
            .zip(&gets[1..])
            .filter(|(name, head)| {
                head.kvs().first().map(|kv| kv.key())
                    == Some(self.keys.waiter_key(name, lease).as_bytes())
            })
            .map(|(name, _)| name.as_str().to_owned())
            .collect();
        Ok(LeaseInfo {
            lease_id: lease,
            ttl_ms: seconds_to_ms(ttl.granted_ttl()),
            remaining_ms: seconds_to_ms(ttl.ttl()),
            owner: meta.and_then(|m| m.owner),
            locks,
        })
    }

    /// Revokes a lease: every lock it held or waited for is freed at once.
    pub async fn revoke_lease(&self, lease: LeaseId) -> Result<(), ServiceError> {
        self.store.lease_revoke(lease).await?;
        metrics::lease_revoked();
        Ok(())
    }
}

/// Read options for the head of a queue: the key with the smallest `create_revision`.
pub(crate) fn head_options() -> GetOptions {
    GetOptions::new()
        .with_prefix()
        .with_sort(
            etcd_client::SortTarget::Create,
            etcd_client::SortOrder::Ascend,
        )
        .with_limit(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttls_round_up_to_whole_seconds() {
        assert_eq!(ttl_to_etcd_seconds(Duration::from_millis(1)), 1);
        assert_eq!(ttl_to_etcd_seconds(Duration::from_millis(1500)), 2);
        assert_eq!(ttl_to_etcd_seconds(Duration::from_secs(10)), 10);
    }
}
