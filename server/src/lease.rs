//! TTL leases: grant, keep alive, inspect, revoke.
//!
//! A lease is an etcd lease granted under the id its handle names (`handle.rs`), with three keys
//! attached to it (see `keys.rs`): `auth` (the handle's digest, compared by every txn that acts on
//! the lease), `meta` (owner, tenant, granted TTL) and the tenant's index entry. When the lease
//! expires or is revoked, etcd deletes every key attached to it, which frees every lock it held or
//! waited for, at once.
//!
//! Each write here is harmless if etcd applies it late (`docs/design.md`, "Late writes"):
//! - a late *grant* makes a lease with no keys that nobody keeps alive: gone within one TTL;
//! - a late *key install* rewrites the same values (its compare refuses after a revoke began);
//! - a late *keep-alive* extends a lease whose owner asked for it, or finds it gone;
//! - a *revoke* first disables the lease (its `auth` value changes, so every later operation on
//!   it is refused), and only once that is confirmed revokes it in etcd; a late disable only ends
//!   the lease's usefulness early, never a hold that someone else was told of.

use std::time::Duration;

use etcd_client::{Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp, TxnResponse};

use crate::handle::Handle;
use crate::keys::{LeaseId, LeaseMeta, LockName};
use crate::metrics;
use crate::service::{LeaseAuth, Service, ServiceError};
use crate::store::StoreError;
use crate::tenants::Tenant;

/// A lease just granted.
#[derive(Debug, Clone)]
pub struct GrantedLease {
    /// The new lease.
    pub lease_id: LeaseId,
    /// Its handle: the secret every later operation on the lease needs.
    pub handle: Handle,
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

/// The txn compare "this lease is usable with this handle".
pub(crate) fn auth_matches(auth_key: &str, auth: &LeaseAuth) -> Compare {
    Compare::value(auth_key, CompareOp::Equal, auth.digest.live())
}

impl Service {
    /// Refuses a TTL above the tenant's quota.
    pub(crate) fn check_ttl_quota(tenant: &Tenant, ttl: Duration) -> Result<(), ServiceError> {
        match tenant.quotas.max_ttl {
            Some(max) if ttl > max => Err(ServiceError::QuotaExceeded(format!(
                "this tenant's leases last at most {}",
                humantime::format_duration(max)
            ))),
            _ => Ok(()),
        }
    }

    /// Refuses a new lease when the tenant has its quota of live leases. Checked before the
    /// grant (one count read), so concurrent grants may overshoot by their number, never more.
    pub(crate) async fn check_lease_quota(&self, tenant: &Tenant) -> Result<(), ServiceError> {
        let Some(max) = tenant.quotas.max_leases else {
            return Ok(());
        };
        let live = self
            .store
            .get(
                &self.keys.tenant_leases_prefix(&tenant.name),
                Some(GetOptions::new().with_prefix().with_count_only()),
            )
            .await?
            .count();
        if u64::try_from(live).unwrap_or(u64::MAX) >= max {
            return Err(ServiceError::QuotaExceeded(format!(
                "this tenant may hold at most {max} live leases"
            )));
        }
        Ok(())
    }

    /// Grants a lease of at least `ttl` (etcd may raise it to its minimum) for `owner`.
    ///
    /// With a client-chosen `handle` the grant is idempotent: a retry (after a timeout, on any
    /// replica) finds the lease its first attempt made and answers the same.
    pub async fn grant_lease(
        &self,
        tenant: &Tenant,
        ttl: Duration,
        owner: Option<String>,
        handle: Option<Handle>,
    ) -> Result<GrantedLease, ServiceError> {
        Self::check_ttl_quota(tenant, ttl)?;
        self.check_lease_quota(tenant).await?;
        let client_chose_handle = handle.is_some();
        let handle = handle.unwrap_or_else(Handle::generate);
        let auth = LeaseAuth::new(tenant, &handle);
        let lease = auth.lease;
        let ttl_ms = match self
            .store
            .lease_grant(lease, ttl_to_etcd_seconds(ttl))
            .await
        {
            Ok(granted) => seconds_to_ms(granted.ttl()),
            // A retry of this grant (or its first attempt landing late): same lease.
            Err(StoreError::LeaseExists) => self.etcd_granted_ttl_ms(lease).await?,
            // Unknown outcome: the lease may exist, without keys; nobody keeps it alive.
            Err(err) => return Err(err.into()),
        };
        match self
            .install_lease_keys(tenant, &auth, ttl_ms, owner.clone())
            .await
        {
            Ok(ttl_ms) => {
                metrics::lease_granted();
                Ok(GrantedLease {
                    lease_id: lease,
                    handle,
                    ttl_ms,
                    owner,
                })
            }
            Err(err) => {
                // Nobody but this request knows a handle the server made: revoking the lease is
                // harmless whenever it lands. A client-chosen handle may be retried elsewhere,
                // so that lease is left to expire (it has no usable keys until a retry installs
                // them).
                if !client_chose_handle {
                    let store = self.store.clone();
                    self.tasks.spawn(async move {
                        let _ = store.lease_revoke(lease).await;
                    });
                }
                Err(err)
            }
        }
    }

    /// Writes a granted lease's `auth`, `meta` and tenant-index keys, unless a previous attempt
    /// did; returns the TTL recorded.
    async fn install_lease_keys(
        &self,
        tenant: &Tenant,
        auth: &LeaseAuth,
        ttl_ms: u64,
        owner: Option<String>,
    ) -> Result<u64, ServiceError> {
        let lease = auth.lease;
        let auth_key = self.keys.auth_key(lease);
        let meta_key = self.keys.lease_meta_key(lease);
        let meta = serde_json::to_vec(&LeaseMeta {
            owner,
            ttl_ms,
            tenant: tenant.name.clone(),
        })
        .expect("meta serializes");
        let on_lease = || Some(PutOptions::new().with_lease(lease.as_i64()));
        let txn = Txn::new()
            .when([Compare::create_revision(
                auth_key.as_str(),
                CompareOp::Equal,
                0,
            )])
            .and_then([
                TxnOp::put(auth_key.as_str(), auth.digest.live(), on_lease()),
                TxnOp::put(meta_key.as_str(), meta, on_lease()),
                TxnOp::put(
                    self.keys.tenant_lease_key(&tenant.name, lease),
                    Vec::new(),
                    on_lease(),
                ),
            ])
            .or_else([
                TxnOp::get(auth_key.as_str(), None),
                TxnOp::get(meta_key.as_str(), None),
            ]);
        let resp = self.store.txn(&auth_key, txn).await?;
        if resp.succeeded() {
            return Ok(ttl_ms);
        }
        let gets = txn_gets(&resp);
        match gets[0].kvs().first().map(|kv| kv.value()) {
            Some(value) if value == auth.digest.live() => {
                Ok(parse_meta(gets[1].kvs().first().map(|kv| kv.value()))
                    .map_or(ttl_ms, |m| m.ttl_ms))
            }
            _ => Err(ServiceError::Forbidden(
                "this handle names a lease that is being revoked; use a new handle".into(),
            )),
        }
    }

    /// Refreshes a lease to its full TTL; returns that TTL in milliseconds.
    ///
    /// The keep-alive and the handle check run side by side (etcd cannot keep a lease alive
    /// inside a txn); a refresh only ever touches the lease the handle names.
    pub async fn keep_lease_alive(&self, auth: &LeaseAuth) -> Result<u64, ServiceError> {
        let auth_key = self.keys.auth_key(auth.lease);
        // The check also reads the lease's lock-delay index: once the keep-alive is confirmed,
        // the shadow leases it names are refreshed too (`delay.rs`).
        let check = Txn::new()
            .when([auth_matches(&auth_key, auth)])
            .and_then([
                TxnOp::get(self.keys.lease_meta_key(auth.lease), None),
                crate::delay::index_read(&self.keys, auth.lease),
            ])
            .or_else([TxnOp::get(auth_key.as_str(), None)]);
        let (refreshed, checked) = tokio::join!(
            self.store.lease_keep_alive(auth.lease),
            self.store.batched_txn(&auth_key, &auth_key, check)
        );
        let checked = checked?;
        if !checked.succeeded() {
            return Err(self
                .auth_problem(&txn_gets(&checked)[0], auth)
                .unwrap_or(ServiceError::LeaseNotFound));
        }
        refreshed?;
        let gets = txn_gets(&checked);
        self.refresh_shadows(auth.lease, &gets[1]).await;
        match parse_meta(gets[0].kvs().first().map(|kv| kv.value())) {
            Some(meta) => Ok(meta.ttl_ms),
            None => self.etcd_granted_ttl_ms(auth.lease).await,
        }
    }

    /// What is wrong with the handle, from the `auth` key a failed txn read: nothing (`None`:
    /// the handle is right, another compare failed); no key (the lease is gone, or is not a
    /// Leasehold lease) or a revoke under way: "not found"; another digest: a wrong handle.
    pub(crate) fn auth_problem(
        &self,
        auth_read: &etcd_client::GetResponse,
        auth: &LeaseAuth,
    ) -> Option<ServiceError> {
        match auth_read.kvs().first() {
            Some(kv) if kv.value() == auth.digest.live() => None,
            None => Some(ServiceError::LeaseNotFound),
            Some(kv) if kv.value() == auth.digest.revoking() => Some(ServiceError::LeaseNotFound),
            Some(_) => Some(ServiceError::Forbidden(
                "wrong handle for this lease".into(),
            )),
        }
    }

    /// The TTL etcd granted to `lease`, in milliseconds.
    pub(crate) async fn etcd_granted_ttl_ms(&self, lease: LeaseId) -> Result<u64, ServiceError> {
        let ttl = self.store.lease_time_to_live(lease, false).await?;
        if ttl.ttl() < 0 {
            return Err(ServiceError::LeaseNotFound);
        }
        Ok(seconds_to_ms(ttl.granted_ttl()))
    }

    /// Everything known about a lease of `tenant`, including the locks it holds now. Another
    /// tenant's lease is "not found".
    pub async fn lease_info(
        &self,
        tenant: &Tenant,
        lease: LeaseId,
    ) -> Result<LeaseInfo, ServiceError> {
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
        let Some(meta) = parse_meta(gets[0].kvs().first().map(|kv| kv.value())) else {
            return Err(ServiceError::LeaseNotFound); // not a Leasehold lease
        };
        if meta.tenant != tenant.name {
            return Err(ServiceError::LeaseNotFound);
        }
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
            owner: meta.owner,
            locks,
        })
    }

    /// The live leases of `tenant` (at most `max`): id, owner and granted TTL, in one read of the
    /// tenant's lease index and one of their meta keys.
    pub async fn list_leases(
        &self,
        tenant: &Tenant,
        max: usize,
    ) -> Result<Vec<(LeaseId, LeaseMeta)>, ServiceError> {
        let index = self
            .store
            .get(
                &self.keys.tenant_leases_prefix(&tenant.name),
                Some(
                    GetOptions::new()
                        .with_prefix()
                        .with_keys_only()
                        .with_limit(max as i64),
                ),
            )
            .await?;
        let ids: Vec<LeaseId> = index
            .kvs()
            .iter()
            .filter_map(|kv| LeaseId::from_etcd(kv.lease()))
            .collect();
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let reads: Vec<TxnOp> = ids
            .iter()
            .map(|id| TxnOp::get(self.keys.lease_meta_key(*id), None))
            .collect();
        let resp = self
            .store
            .txn(
                &self.keys.tenant_leases_prefix(&tenant.name),
                Txn::new().and_then(reads),
            )
            .await?;
        Ok(ids
            .into_iter()
            .zip(txn_gets(&resp))
            .filter_map(|(id, get)| Some((id, parse_meta(get.kvs().first().map(|kv| kv.value()))?)))
            .collect())
    }

    /// Revokes a lease: every lock it held or waited for is freed at once.
    ///
    /// Two steps, because etcd's revoke cannot be made conditional and so must never land after
    /// the lease was confirmed alive to anyone: first the lease is disabled (its `auth` value
    /// turns into the "revoking" form, which every other operation refuses), and only once that
    /// is confirmed is the lease revoked in etcd. A retried revoke (same handle) finds the lease
    /// disabled and finishes the job.
    pub async fn revoke_lease(&self, auth: &LeaseAuth) -> Result<(), ServiceError> {
        let lease = auth.lease;
        let auth_key = self.keys.auth_key(lease);
        // Both branches read the lease's lock-delay index: once the lease is disabled no
        // tombstone can be added under it (the install txn compares the live digest), so the
        // index read in (or after) the disabling step names every tombstone to delete.
        let disable = Txn::new()
            .when([auth_matches(&auth_key, auth)])
            .and_then([
                TxnOp::put(
                    auth_key.as_str(),
                    auth.digest.revoking(),
                    Some(PutOptions::new().with_lease(lease.as_i64())),
                ),
                crate::delay::index_read(&self.keys, lease),
            ])
            .or_else([
                TxnOp::get(auth_key.as_str(), None),
                crate::delay::index_read(&self.keys, lease),
            ]);
        let resp = match self.store.txn(&auth_key, disable).await {
            Err(StoreError::LeaseNotFound) => return Err(ServiceError::LeaseNotFound),
            other => other?,
        };
        if !resp.succeeded() {
            match txn_gets(&resp)[0].kvs().first() {
                Some(kv) if kv.value() == auth.digest.revoking() => {} // a retried revoke
                Some(_) => {
                    return Err(ServiceError::Forbidden(
                        "wrong handle for this lease".into(),
                    ));
                }
                None => return Err(ServiceError::LeaseNotFound),
            }
        }
        // A revoke by the owner is a deliberate end, like a release: no lock-delay follows.
        // The tombstones go first (their index goes with the lease), fenced by the revision the
        // index was read at.
        let gets = txn_gets(&resp);
        let index = gets.last().expect("the index read");
        if !index.kvs().is_empty() {
            let revision = resp.header().map_or(0, |h| h.revision());
            self.drop_tombstones(lease, index, revision).await?;
            self.revoke_shadows_later(crate::delay::shadows_in(index));
        }
        // Disabled: nothing can be granted or confirmed under the lease any more, so the revoke
        // is harmless whenever it lands; try every endpoint before giving up.
        let mut last = None;
        for _ in 0..self.store.endpoint_count() * 2 {
            match self.store.lease_revoke(lease).await {
                Ok(()) | Err(StoreError::LeaseNotFound) => {
                    metrics::lease_revoked();
                    return Ok(());
                }
                Err(err) => last = Some(err),
            }
        }
        Err(last.expect("at least one attempt").into())
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
