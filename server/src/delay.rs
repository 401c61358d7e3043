//! Lock-delay (Chubby's, Consul's): after a holder's lease *expires*, its lock is not granted
//! again for a while, so a holder that was cut off (paused, partitioned, its lease run out under
//! it) has time to notice and stop before the next holder starts. A release or a revoke is a
//! deliberate end and is followed by no delay.
//!
//! Nothing of it lives in a server. Time comes from etcd leases, never from a server's clock:
//!
//! - A hold granted with `lock_delay` gets a **shadow lease** `S` (its id derived from the
//!   holder's lease, the lock name, the token and the delay, as handles derive lease ids: a retry
//!   finds the same one) whose TTL is the holder lease's TTL plus the delay, granted only after
//!   the holder's lease was refreshed; and a **tombstone** `P/locks/{name}/delay/{lease}` attached
//!   to `S`, written with an index entry `P/leases/{lease}/delays/{name}` (value: `S`) attached
//!   to the holder's lease, by one fenced txn. The acquire answers only once that txn is
//!   confirmed.
//! - Every refresh of the holder's lease (lease keep-alive, lock renew) reads the index in the
//!   txn that confirms it and, once the lease's keep-alive is confirmed, refreshes each `S`: so
//!   `S` always ends at least the delay after the holder's lease.
//! - Release (and a revoke by the owner, and a clean-up) deletes the tombstone: no delay.
//! - Expiry: etcd deletes the holder's waiter key and index entry with its lease, the tombstone
//!   stays until `S` expires. A tombstone whose lease has no waiter key in the queue is an
//!   **orphan**: it takes one of the lock's slots (the lock, for a mutex) until it goes. Waiters
//!   that only the tombstone holds off watch it (it is under `P/locks/`, so the shared watch in
//!   `wakeups.rs` sees it go) and re-read then. The enqueue and the decisive read count orphans
//!   in the read that decides (`queue.rs`).
//!
//! If a refresh of `S` is not confirmed, `S` may end before the delay is over: the delay is then
//! shorter, never longer than asked by more than a refresh's lateness; either way it never makes
//! two holders, since it only ever holds a grant back.

use std::time::Duration;

use etcd_client::{Compare, CompareOp, GetOptions, GetResponse, PutOptions, Txn, TxnOp};

use crate::handle::sha256;
use crate::keys::{KeySchema, LeaseId, LockName, TombstoneValue};
use crate::lease::{ttl_to_etcd_seconds, txn_gets};
use crate::metrics;
use crate::service::{LeaseAuth, Service, ServiceError};
use crate::store::StoreError;

/// The longest lock-delay accepted.
pub const MAX_LOCK_DELAY: Duration = Duration::from_secs(60);

/// Most tombstone deletes sent in one txn (etcd refuses txns of more than 128 operations).
const DELETES_PER_TXN: usize = 64;

/// etcd counts lease TTLs in whole seconds: a delay is rounded up to them.
pub fn delay_seconds(delay: Duration) -> u64 {
    delay.as_secs() + u64::from(delay.subsec_nanos() > 0)
}

/// The shadow lease of the hold of `name` with `token` under `lease` and a delay of
/// `delay_secs`: 63 bits of SHA-256, never 0. Derived, not chosen by etcd, so that a retried
/// acquire finds the lease its first attempt granted. Unique per hold: a token is never granted
/// twice on a lock, so once the hold is released its shadow lease is never used again.
pub fn shadow_lease_id(lease: LeaseId, name: &LockName, token: u64, delay_secs: u64) -> LeaseId {
    let digest = sha256(&[
        b"leasehold shadow lease v1\0",
        lease.to_string().as_bytes(),
        b"\0",
        name.encoded().as_bytes(),
        b"\0",
        token.to_string().as_bytes(),
        b"\0",
        delay_secs.to_string().as_bytes(),
    ]);
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    let id = (u64::from_be_bytes(first) & (i64::MAX as u64)) as i64;
    LeaseId::from_etcd(id.max(1)).expect("positive")
}

/// The read, in an enqueue or decisive txn, of a lock's tombstones: keys only, at most `limit`.
pub(crate) fn tombstone_read(keys: &KeySchema, name: &LockName, limit: usize) -> TxnOp {
    TxnOp::get(
        keys.delay_prefix(name),
        Some(
            GetOptions::new()
                .with_prefix()
                .with_keys_only()
                .with_limit(i64::try_from(limit).unwrap_or(i64::MAX)),
        ),
    )
}

/// The tombstones a read found, but those of lease `own` (the waiter's own lease: its key is in
/// the queue, so its tombstone is never an orphan): `(key, lease)` each.
pub(crate) fn others(read: &GetResponse, own: LeaseId) -> Vec<(Vec<u8>, LeaseId)> {
    read.kvs()
        .iter()
        .filter_map(|kv| Some((kv.key().to_vec(), KeySchema::lease_of_key(kv.key())?)))
        .filter(|(_, lease)| *lease != own)
        .collect()
}

/// The shadow leases a lease's delay index names (`P/leases/{lease}/delays/`, read with values).
pub(crate) fn shadows_in(index: &GetResponse) -> Vec<LeaseId> {
    index
        .kvs()
        .iter()
        .filter_map(|kv| std::str::from_utf8(kv.value()).ok()?.parse().ok())
        .collect()
}

/// The read of a lease's delay index, for the txns that confirm a refresh or begin a revoke.
pub(crate) fn index_read(keys: &KeySchema, lease: LeaseId) -> TxnOp {
    TxnOp::get(
        keys.lease_delays_prefix(lease),
        Some(GetOptions::new().with_prefix()),
    )
}

/// The fenced txn that writes the tombstone and index entry of each `(name, shadow lease)` of
/// the hold of `lease` granted with `token` (its waiter keys carry `value`), for a delay of
/// `delay_secs`. Its compares: the lease's `auth` key holds `auth_live` (a revoke disables it
/// first), and each waiter key holds `value` (the nonce of the acquire that was granted) with
/// `create_revision == token`. So, landing late or twice, it writes only while that very hold
/// lasts; once the hold ended (release, revoke, clean-up, expiry) it changes nothing. Its
/// else branch reads the `auth` key, then each waiter key, to tell why.
///
/// Public so that tests can send it late and see it do nothing (`tests/tests/lock_delay.rs`).
pub fn tombstone_txn(
    keys: &KeySchema,
    lease: LeaseId,
    auth_live: &[u8],
    value: &[u8],
    token: u64,
    holds: &[(LockName, LeaseId)],
    delay_secs: u64,
) -> Txn {
    let auth_key = keys.auth_key(lease);
    let token_rev = i64::try_from(token).unwrap_or(-1);
    let mut compares = vec![Compare::value(
        auth_key.as_str(),
        CompareOp::Equal,
        auth_live.to_vec(),
    )];
    let mut writes = Vec::new();
    let mut diagnose = vec![TxnOp::get(auth_key.as_str(), None)];
    for (name, shadow) in holds {
        let waiter = keys.waiter_key(name, lease);
        compares.push(Compare::value(
            waiter.as_str(),
            CompareOp::Equal,
            value.to_vec(),
        ));
        compares.push(Compare::create_revision(
            waiter.as_str(),
            CompareOp::Equal,
            token_rev,
        ));
        let tombstone = serde_json::to_vec(&TombstoneValue {
            delay_ms: delay_secs * 1000,
            shadow: shadow.to_string(),
            token,
        })
        .expect("tombstone serializes");
        writes.push(TxnOp::put(
            keys.tombstone_key(name, lease),
            tombstone,
            Some(PutOptions::new().with_lease(shadow.as_i64())),
        ));
        writes.push(TxnOp::put(
            keys.lease_delay_key(lease, name),
            shadow.to_string(),
            Some(PutOptions::new().with_lease(lease.as_i64())),
        ));
        diagnose.push(TxnOp::get(waiter, None));
    }
    Txn::new().when(compares).and_then(writes).or_else(diagnose)
}

/// What installing a lock-delay came to.
pub(crate) enum Installed {
    /// The tombstone and index entry are written; the delay, in milliseconds.
    Done(u64),
    /// The hold was gone before the tombstone could be written: answer as for a hold lost
    /// before the answer.
    HoldGone,
}

/// One hold to install a lock-delay for.
pub(crate) struct DelayedHold<'a> {
    /// The names held (one, for a lock).
    pub names: &'a [LockName],
    /// The lease and handle digest.
    pub auth: &'a LeaseAuth,
    /// The token granted.
    pub token: u64,
    /// The waiter value this request wrote (its nonce makes it unique).
    pub value: &'a [u8],
    /// The holder lease's granted TTL, in milliseconds.
    pub ttl_ms: u64,
    /// The delay asked for.
    pub delay: Duration,
    /// Refresh the holder's lease first (a lease the request did not just grant or refresh).
    pub refresh_lease: bool,
}

impl Service {
    /// Installs the lock-delay of a hold just granted, before it is answered: refreshes the
    /// holder's lease (unless the request just did), grants each name's shadow lease, then one
    /// txn writes each tombstone and index entry.
    ///
    /// The txn is fenced so that it is harmless whenever it lands: it compares the lease's
    /// `auth` key with the live digest (a revoke disables it first) and each waiter key with the
    /// very value this request wrote (a nonce no other request has) and with the token. So it
    /// writes only while the hold is exactly the one this request was granted; a release, a
    /// clean-up, or another request taking the key over all change or delete that key first,
    /// and each of them deletes the tombstone in the same step.
    pub(crate) async fn install_lock_delay(
        &self,
        hold: DelayedHold<'_>,
    ) -> Result<Installed, ServiceError> {
        let lease = hold.auth.lease;
        let secs = delay_seconds(hold.delay);
        if hold.refresh_lease {
            // The shadow lease must not start before the holder lease's last refresh, or it
            // could end less than the delay after it.
            self.refresh_lease_everywhere(lease).await?;
        }
        let holder_secs = u64::try_from(ttl_to_etcd_seconds(Duration::from_millis(hold.ttl_ms)))
            .unwrap_or(u64::MAX);
        let shadow_ttl = i64::try_from(holder_secs.saturating_add(secs)).unwrap_or(i64::MAX);
        let mut shadows = Vec::with_capacity(hold.names.len());
        for name in hold.names {
            let shadow = shadow_lease_id(lease, name, hold.token, secs);
            match self.store.lease_grant(shadow, shadow_ttl).await {
                Ok(_) => {}
                // Granted by an earlier attempt of this acquire: start its TTL over.
                Err(StoreError::LeaseExists) => match self.store.lease_keep_alive(shadow).await {
                    Ok(()) => {}
                    Err(StoreError::LeaseNotFound) => {
                        return Err(ServiceError::Unavailable(
                            "a lock-delay lease expired while it was set up; retry".into(),
                        ));
                    }
                    Err(err) => return Err(err.into()),
                },
                Err(err) => return Err(err.into()),
            }
            shadows.push(shadow);
        }
        let holds: Vec<(LockName, LeaseId)> = hold.names.iter().cloned().zip(shadows).collect();
        let txn = tombstone_txn(
            &self.keys,
            lease,
            &hold.auth.digest.live(),
            hold.value,
            hold.token,
            &holds,
            secs,
        );
        let token_rev = i64::try_from(hold.token).unwrap_or(-1);
        let target = self.keys.tombstone_key(&hold.names[0], lease);
        let resp = match self.store.txn_until_answered(None, &target, txn, 1).await {
            Ok(resp) => resp,
            // One of the two leases is gone: the holder's (the hold is gone), or, oddly, the
            // shadow lease just granted.
            Err(StoreError::LeaseNotFound) => {
                return match self.store.lease_time_to_live(lease, false).await {
                    Ok(ttl) if ttl.ttl() < 0 => Ok(Installed::HoldGone),
                    Ok(_) => Err(ServiceError::Unavailable(
                        "a lock-delay lease expired while it was set up; retry".into(),
                    )),
                    Err(err) => Err(err.into()),
                };
            }
            Err(err) => return Err(err.into()),
        };
        if !resp.succeeded() {
            let gets = txn_gets(&resp);
            if let Some(problem) = self.auth_problem(&gets[0], hold.auth) {
                return Err(problem);
            }
            for get in &gets[1..] {
                match get.kvs().first() {
                    Some(kv) if kv.create_revision() == token_rev => {}
                    _ => return Ok(Installed::HoldGone),
                }
            }
            // Same key, same token, another value: a newer acquire under this lease took the
            // hold over; its own answer is the one that counts.
            return Err(ServiceError::Unavailable(
                "another acquire under this lease took this hold over; retry".into(),
            ));
        }
        metrics::lock_delay_installed();
        Ok(Installed::Done(secs * 1000))
    }

    /// Refreshes `lease` once, trying every endpoint: `LeaseNotFound` if it is gone.
    pub(crate) async fn refresh_lease_everywhere(
        &self,
        lease: LeaseId,
    ) -> Result<(), ServiceError> {
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

    /// Refreshes the shadow leases a lease's delay index names, after the lease itself was
    /// refreshed (so each still ends at least its delay after the lease). A refresh etcd does not
    /// confirm is counted and logged, not retried: that delay may end early.
    pub(crate) async fn refresh_shadows(&self, lease: LeaseId, index: &GetResponse) {
        let shadows = shadows_in(index);
        if shadows.is_empty() {
            return;
        }
        let refreshes = shadows
            .iter()
            .map(|shadow| async move { (*shadow, self.store.lease_keep_alive(*shadow).await) });
        for (shadow, outcome) in futures::future::join_all(refreshes).await {
            match outcome {
                Ok(()) => {}
                // Gone: its tombstone went with it (a release revoked it, or it ran out).
                Err(StoreError::LeaseNotFound) => {
                    tracing::debug!(%lease, %shadow, "lock-delay lease already gone");
                }
                Err(err) => {
                    metrics::lock_delay_refresh_failed();
                    tracing::warn!(error = %err, %lease, %shadow, "lock-delay lease not refreshed; that delay may end early");
                }
            }
        }
    }

    /// Deletes the tombstones of `lease` its delay index (read at `revision`, after the lease was
    /// disabled) names: a revoke by the owner, like a release, is followed by no delay. Each
    /// delete is fenced by `mod_revision <= revision`: landing late, it cannot remove a tombstone
    /// written afterwards (by a new lease under the same id, granted again with the same handle).
    pub(crate) async fn drop_tombstones(
        &self,
        lease: LeaseId,
        index: &GetResponse,
        revision: i64,
    ) -> Result<(), ServiceError> {
        let prefix = self.keys.lease_delays_prefix(lease);
        let tombstones: Vec<String> = index
            .kvs()
            .iter()
            .filter_map(|kv| {
                let encoded = std::str::from_utf8(kv.key()).ok()?.strip_prefix(&prefix)?;
                Some(
                    self.keys
                        .tombstone_key(&LockName::from_encoded(encoded)?, lease),
                )
            })
            .collect();
        for chunk in tombstones.chunks(DELETES_PER_TXN) {
            let deletes: Vec<TxnOp> = chunk
                .iter()
                .map(|key| {
                    TxnOp::txn(
                        Txn::new()
                            .when([Compare::mod_revision(
                                key.as_str(),
                                CompareOp::Less,
                                revision + 1,
                            )])
                            .and_then([TxnOp::delete(key.as_str(), None)]),
                    )
                })
                .collect();
            self.store
                .txn_until_answered(None, &chunk[0], Txn::new().and_then(deletes), 2)
                .await?;
        }
        Ok(())
    }

    /// Revokes shadow leases that carry nothing any more (their holds were released or their
    /// lease revoked), in the background. Harmless whenever it lands: a shadow lease belongs to
    /// one hold, whose token is never granted again. If it fails, the lease expires by itself.
    pub(crate) fn revoke_shadows_later(&self, shadows: Vec<LeaseId>) {
        if shadows.is_empty() {
            return;
        }
        let store = self.store.clone();
        self.tasks.spawn(async move {
            for shadow in shadows {
                if let Err(err) = store.lease_revoke(shadow).await {
                    tracing::debug!(error = %err, %shadow, "revoke of a spent lock-delay lease failed; it will expire");
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_round_up_to_whole_seconds() {
        assert_eq!(delay_seconds(Duration::ZERO), 0);
        assert_eq!(delay_seconds(Duration::from_millis(1)), 1);
        assert_eq!(delay_seconds(Duration::from_millis(1500)), 2);
        assert_eq!(delay_seconds(Duration::from_secs(15)), 15);
    }

    #[test]
    fn shadow_leases_are_one_per_hold() {
        let lease = LeaseId::from_etcd(42).unwrap();
        let (a, b) = (LockName::new("a").unwrap(), LockName::new("b").unwrap());
        let s = shadow_lease_id(lease, &a, 7, 5);
        assert_eq!(s, shadow_lease_id(lease, &a, 7, 5), "a retry finds it");
        assert_ne!(s, shadow_lease_id(lease, &b, 7, 5));
        assert_ne!(s, shadow_lease_id(lease, &a, 8, 5));
        assert_ne!(s, shadow_lease_id(lease, &a, 7, 6));
        assert_ne!(
            s,
            shadow_lease_id(LeaseId::from_etcd(43).unwrap(), &a, 7, 5)
        );
        assert_ne!(s, lease);
    }
}
