//! The etcd key schema: every key Leasehold writes, in one place.
//!
//! All keys live under a configurable prefix `P` (default `/leasehold`, no trailing slash):
//!
//! | key | value | attached to lease |
//! |---|---|---|
//! | `P/locks/{name}/q/{lease}` | JSON [`WaiterValue`] | `{lease}` |
//! | `P/locks/{name}/x/{lease}` | empty: an exclusive waiter of a read-write lock | `{lease}` |
//! | `P/locks/{name}/delay/{lease}` | JSON [`TombstoneValue`]: `{lease}`'s hold asked for a lock-delay | the shadow lease it names |
//! | `P/leases/{lease}/auth` | hex SHA-256 of tenant and handle (`handle.rs`) | `{lease}` |
//! | `P/leases/{lease}/meta` | JSON [`LeaseMeta`] | `{lease}` |
//! | `P/leases/{lease}/delays/{name}` | the shadow lease id (16 hex digits) of `{lease}`'s tombstone on `{name}` | `{lease}` |
//! | `P/tenants/{tenant}/leases/{lease}` | empty | `{lease}` |
//!
//! - `{name}` is the lock name percent-encoded by [`LockName::encoded`]: every byte outside
//!   `[A-Za-z0-9._~-]` becomes `%XX`, so the encoded name never contains `/` and lock `a` can
//!   never share a key prefix with lock `a/b` (`a/` vs `a%2Fb/`).
//! - `{lease}` is the etcd lease id as 16 lowercase hex digits ([`LeaseId`]'s `Display`). Leases
//!   are granted under an id derived from their handle (see `handle.rs`).
//! - The `auth` key is the lease's lock: every txn acting on the lease or a hold under it
//!   compares it, and writing it (same value) is how a clean-up fences off a late request of the
//!   lease (see `docs/design.md`, "Late writes"). A revoke first turns its value into the
//!   "revoking" form, which every other operation refuses.
//! - `{tenant}` is the tenant name, percent-encoded like lock names. The tenant's lease keys are
//!   counted for its live-lease quota.
//! - The waiter keys under `P/locks/{name}/q/` form the lock's FIFO queue, ordered by
//!   `create_revision`; the first one holds the lock and its `create_revision` is the fencing
//!   token. See `queue.rs` for the algorithm and `docs/design.md` for the argument.
//! - An exclusive waiter of a read-write lock also writes `P/locks/{name}/x/{lease}`, in the same
//!   txn and so with the same `create_revision`: a shared waiter needs to know only whether an
//!   exclusive key is ahead of it, and finds the nearest one with one bounded read of `x/`.
//! - All the keys of one acquire (several names for a group) are put by one txn and share its
//!   revision: that common revision orders groups, so waits never form a cycle.
//!
//! - A hold granted with a lock-delay (`delay.rs`) writes a *tombstone* under `P/locks/{name}/delay/`
//!   attached to a *shadow lease* that ends the delay after the holder's lease, and an index entry
//!   under the holder's lease naming that shadow lease (so every refresh of the lease refreshes
//!   it too). A release, a revoke or a clean-up deletes the tombstone; an expiry leaves it, and
//!   while its holder's waiter key is gone (an *orphan*) it holds the name (or one semaphore slot).
//!
//! Every key is attached to a lease, so revoking or expiring a lease removes all of its keys at
//! once: nothing Leasehold writes outlives the lease that owns it. The one key that outlives its
//! holder's lease, on purpose, is a tombstone: by its delay, and no longer.

use std::fmt;
use std::str::FromStr;

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode, utf8_percent_encode};
use serde::{Deserialize, Serialize};

/// Bytes left readable in encoded lock names: RFC 3986 "unreserved" characters. Everything
/// else, `/` and `%` included, is percent-encoded, which makes the encoding injective and free of
/// `/`.
const NAME_ESCAPES: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Longest lock name accepted, in bytes of UTF-8.
pub const MAX_NAME_BYTES: usize = 256;

/// A validated lock name: 1 to [`MAX_NAME_BYTES`] bytes of UTF-8 without control characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LockName(String);

/// Why a string is not a valid [`LockName`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidName {
    /// The name is the empty string.
    #[error("lock name must not be empty")]
    Empty,
    /// The name is longer than [`MAX_NAME_BYTES`].
    #[error("lock name is {0} bytes long; at most {MAX_NAME_BYTES} are allowed")]
    TooLong(usize),
    /// The name contains a control character (C0, DEL or C1).
    #[error("lock name contains the control character U+{0:04X}")]
    ControlCharacter(u32),
}

impl LockName {
    /// Validates `name` as a lock name.
    pub fn new(name: impl Into<String>) -> Result<Self, InvalidName> {
        let name = name.into();
        if name.is_empty() {
            return Err(InvalidName::Empty);
        }
        if name.len() > MAX_NAME_BYTES {
            return Err(InvalidName::TooLong(name.len()));
        }
        if let Some(c) = name.chars().find(|c| c.is_control()) {
            return Err(InvalidName::ControlCharacter(c as u32));
        }
        Ok(Self(name))
    }

    /// The name as given.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name as it appears inside etcd keys: percent-encoded, never containing `/`.
    pub fn encoded(&self) -> String {
        utf8_percent_encode(&self.0, NAME_ESCAPES).to_string()
    }

    /// Reverses [`LockName::encoded`]; `None` if `encoded` is not the encoding of a valid name.
    pub fn from_encoded(encoded: &str) -> Option<Self> {
        let decoded = percent_decode(encoded.as_bytes()).decode_utf8().ok()?;
        let name = Self::new(decoded.into_owned()).ok()?;
        // Only the canonical encoding maps back: keys we did not write are not lock names.
        (name.encoded() == encoded).then_some(name)
    }
}

impl fmt::Display for LockName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An etcd lease id. Shown (in keys and in the HTTP API) as 16 lowercase hex digits.
///
/// Valid ids are 1..=`i64::MAX`: etcd treats lease 0 as "no lease", so accepting it would write
/// keys that never expire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseId(i64);

impl LeaseId {
    /// Wraps an id that etcd returned; `None` for ids etcd never hands out (0 or negative).
    pub fn from_etcd(id: i64) -> Option<Self> {
        (id > 0).then_some(Self(id))
    }

    /// The id as etcd's API takes it.
    pub fn as_i64(self) -> i64 {
        self.0
    }
}

impl fmt::Display for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl FromStr for LeaseId {
    type Err = ();

    /// Parses 1 to 16 hex digits (either case) naming a positive id.
    fn from_str(s: &str) -> Result<Self, ()> {
        if s.is_empty() || s.len() > 16 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(());
        }
        let id = u64::from_str_radix(s, 16).map_err(|_| ())?;
        i64::try_from(id).ok().and_then(Self::from_etcd).ok_or(())
    }
}

/// The value stored in a waiter key.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaiterValue {
    /// Who asked for the lock, as given in the acquire request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// Unique per acquire request, so that a request whose enqueue answer was lost can still
    /// recognise (and remove) the key it wrote, and nothing else.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nonce: Option<String>,
    /// A semaphore's limit (absent: 1, a mutex). Every waiter of a name must agree.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    /// `"shared"` or `"exclusive"` for a read-write lock (absent: a mutex or semaphore).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// A candidate's value (leader election: an address, an id), shown while it leads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// How many names the acquire took together (groups), when more than one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<u32>,
}

/// The value stored in a lease's `meta` key.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseMeta {
    /// Who holds the lease, as given when it was granted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// The TTL etcd granted, in milliseconds. Kept so that an acquire on this lease can answer
    /// with the TTL in the same single round trip.
    pub ttl_ms: u64,
    /// The tenant the lease belongs to.
    #[serde(default)]
    pub tenant: String,
}

/// The value stored in a lock-delay tombstone (`P/locks/{name}/delay/{lease}`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TombstoneValue {
    /// The delay asked for, rounded up to whole seconds, in milliseconds.
    pub delay_ms: u64,
    /// The shadow lease the tombstone is attached to, as 16 hex digits.
    pub shadow: String,
    /// The token of the hold that asked for it.
    pub token: u64,
}

/// Builds every etcd key Leasehold uses, under one prefix.
#[derive(Debug, Clone)]
pub struct KeySchema {
    prefix: String,
}

impl KeySchema {
    /// A schema rooted at `prefix`; a trailing `/` is ignored, so `/leasehold` and
    /// `/leasehold/` are the same. Two deployments must not use nested prefixes.
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.trim_end_matches('/').to_owned(),
        }
    }

    /// `P/locks/`: the root of every lock queue (watched for deletions to wake waiters).
    pub fn locks_root(&self) -> String {
        format!("{}/locks/", self.prefix)
    }

    /// `P/locks/{name}/`: every key of one lock (its queue, its exclusive marks).
    pub fn lock_prefix(&self, name: &LockName) -> String {
        format!("{}/locks/{}/", self.prefix, name.encoded())
    }

    /// `P/locks/{name}/q/`: the lock's waiter queue.
    pub fn queue_prefix(&self, name: &LockName) -> String {
        format!("{}q/", self.lock_prefix(name))
    }

    /// `P/locks/{name}/q/{lease}`: the waiter key of `lease` in the lock's queue.
    pub fn waiter_key(&self, name: &LockName, lease: LeaseId) -> String {
        format!("{}{lease}", self.queue_prefix(name))
    }

    /// `P/locks/{name}/x/`: the exclusive waiters of a read-write lock.
    pub fn exclusive_prefix(&self, name: &LockName) -> String {
        format!("{}x/", self.lock_prefix(name))
    }

    /// `P/locks/{name}/x/{lease}`: `lease` waits for (or holds) the lock exclusively.
    pub fn exclusive_key(&self, name: &LockName, lease: LeaseId) -> String {
        format!("{}{lease}", self.exclusive_prefix(name))
    }

    /// `P/locks/{name}/delay/`: the lock's lock-delay tombstones.
    pub fn delay_prefix(&self, name: &LockName) -> String {
        format!("{}delay/", self.lock_prefix(name))
    }

    /// `P/locks/{name}/delay/{lease}`: the tombstone of `lease`'s hold of the lock, attached to
    /// its shadow lease.
    pub fn tombstone_key(&self, name: &LockName, lease: LeaseId) -> String {
        format!("{}{lease}", self.delay_prefix(name))
    }

    /// The lease whose key `key` is (its last path segment): a waiter, exclusive or tombstone key.
    pub fn lease_of_key(key: &[u8]) -> Option<LeaseId> {
        let last = key.iter().rposition(|&b| b == b'/')?;
        std::str::from_utf8(&key[last + 1..]).ok()?.parse().ok()
    }

    /// The lock name a key under `P/locks/` belongs to.
    pub fn name_of_key(&self, key: &[u8]) -> Option<LockName> {
        let key = std::str::from_utf8(key).ok()?;
        let rest = key.strip_prefix(&self.locks_root())?;
        let (encoded, _) = rest.split_once('/')?;
        LockName::from_encoded(encoded)
    }

    /// `P/leases/{lease}/meta`: owner, tenant and granted TTL of a lease.
    pub fn lease_meta_key(&self, lease: LeaseId) -> String {
        format!("{}/leases/{lease}/meta", self.prefix)
    }

    /// `P/leases/{lease}/auth`: the digest of the lease's handle, compared by every txn that
    /// acts on the lease.
    pub fn auth_key(&self, lease: LeaseId) -> String {
        format!("{}/leases/{lease}/auth", self.prefix)
    }

    /// `P/leases/{lease}/delays/`: the lease's lock-delay index, one key per lock whose hold
    /// under it has a tombstone; the value is the shadow lease id.
    pub fn lease_delays_prefix(&self, lease: LeaseId) -> String {
        format!("{}/leases/{lease}/delays/", self.prefix)
    }

    /// `P/leases/{lease}/delays/{name}`.
    pub fn lease_delay_key(&self, lease: LeaseId, name: &LockName) -> String {
        format!("{}{}", self.lease_delays_prefix(lease), name.encoded())
    }

    /// `P/tenants/{tenant}/leases/`: the tenant's live leases, one key each (for its quota).
    pub fn tenant_leases_prefix(&self, tenant: &str) -> String {
        format!(
            "{}/tenants/{}/leases/",
            self.prefix,
            utf8_percent_encode(tenant, NAME_ESCAPES)
        )
    }

    /// `P/tenants/{tenant}/leases/{lease}`.
    pub fn tenant_lease_key(&self, tenant: &str, lease: LeaseId) -> String {
        format!("{}{lease}", self.tenant_leases_prefix(tenant))
    }

    /// The prefix itself (no trailing slash).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The lock prefix (`P/locks/{name}/`) a key of that lock belongs to: everything up to its
    /// second-to-last `/`. Used to route a deletion seen by the shared watch to the waiters of
    /// that lock.
    pub fn lock_of_key(key: &[u8]) -> Option<&[u8]> {
        let last = key.iter().rposition(|&b| b == b'/')?;
        let second = key[..last].iter().rposition(|&b| b == b'/')?;
        Some(&key[..=second])
    }

    /// The queue prefix (`P/locks/{name}/q/`) of a waiter key (`P/locks/{name}/q/{lease}`):
    /// everything up to its last `/`. It names the lock's group in group commit (`batch.rs`).
    pub fn queue_of_waiter_key(waiter_key: &str) -> &str {
        waiter_key
            .rfind('/')
            .map_or(waiter_key, |slash| &waiter_key[..=slash])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Strings that are valid lock names: any non-control chars, 1..=256 bytes.
    fn valid_name() -> impl Strategy<Value = String> {
        proptest::collection::vec(
            any::<char>().prop_filter("no control", |c| !c.is_control()),
            1..80,
        )
        .prop_map(|chars| {
            let mut s = String::new();
            for c in chars {
                if s.len() + c.len_utf8() > MAX_NAME_BYTES {
                    break;
                }
                s.push(c);
            }
            s
        })
    }

    proptest! {
        /// Encoding then decoding gives the name back, and the encoding never contains `/`.
        #[test]
        fn encoding_round_trips(name in valid_name()) {
            let name = LockName::new(name).unwrap();
            let enc = name.encoded();
            prop_assert!(!enc.contains('/'));
            prop_assert_eq!(LockName::from_encoded(&enc), Some(name));
        }

        /// No lock's keys lie under another lock's queue prefix.
        #[test]
        fn queue_prefixes_are_prefix_free(a in valid_name(), b in valid_name()) {
            prop_assume!(a != b);
            let keys = KeySchema::new("/leasehold");
            let (a, b) = (LockName::new(a).unwrap(), LockName::new(b).unwrap());
            let lease = LeaseId::from_etcd(7).unwrap();
            prop_assert!(!keys.waiter_key(&b, lease).starts_with(&keys.queue_prefix(&a)));
            prop_assert!(!keys.queue_prefix(&b).starts_with(&keys.queue_prefix(&a)));
        }

        /// Lease ids survive Display/FromStr.
        #[test]
        fn lease_ids_round_trip(id in 1..=i64::MAX) {
            let lease = LeaseId::from_etcd(id).unwrap();
            prop_assert_eq!(lease.to_string().parse::<LeaseId>(), Ok(lease));
        }
    }

    #[test]
    fn a_waiter_key_names_its_queue() {
        let keys = KeySchema::new("/leasehold/");
        let name = LockName::new("a/b%c").unwrap();
        let lease = LeaseId::from_etcd(0x1234).unwrap();
        assert_eq!(
            KeySchema::queue_of_waiter_key(&keys.waiter_key(&name, lease)),
            keys.queue_prefix(&name)
        );
    }

    #[test]
    fn slash_and_percent_names_are_distinct() {
        let keys = KeySchema::new("/leasehold/");
        let q = |n: &str| keys.queue_prefix(&LockName::new(n).unwrap());
        assert_eq!(q("a"), "/leasehold/locks/a/q/");
        assert_eq!(q("a/b"), "/leasehold/locks/a%2Fb/q/");
        assert_eq!(q("a%2Fb"), "/leasehold/locks/a%252Fb/q/");
        assert!(!q("a/b").starts_with(&q("a")));
    }

    #[test]
    fn invalid_names_are_rejected() {
        assert_eq!(LockName::new(""), Err(InvalidName::Empty));
        assert_eq!(
            LockName::new("x".repeat(257)),
            Err(InvalidName::TooLong(257))
        );
        assert!(LockName::new("é".repeat(128)).is_ok()); // 256 bytes
        assert_eq!(
            LockName::new("a\nb"),
            Err(InvalidName::ControlCharacter(10))
        );
        assert_eq!(
            LockName::new("a\u{7f}"),
            Err(InvalidName::ControlCharacter(0x7f))
        );
        assert_eq!(
            LockName::new("a\u{85}"),
            Err(InvalidName::ControlCharacter(0x85))
        );
    }

    #[test]
    fn lease_id_parsing_rejects_what_etcd_never_issues() {
        assert!("0".parse::<LeaseId>().is_err());
        assert!("".parse::<LeaseId>().is_err());
        assert!("ffffffffffffffff".parse::<LeaseId>().is_err()); // negative as i64
        assert!("+1".parse::<LeaseId>().is_err());
        assert!("10000000000000000".parse::<LeaseId>().is_err());
        assert_eq!(
            "694d7a1f2b3c4d5e".parse::<LeaseId>().unwrap().to_string(),
            "694d7a1f2b3c4d5e"
        );
        assert_eq!(
            "A".parse::<LeaseId>().unwrap().to_string(),
            "000000000000000a"
        );
    }

    #[test]
    fn keys_route_to_their_lock() {
        let keys = KeySchema::new("/p");
        let name = LockName::new("a/b").unwrap();
        let lease = LeaseId::from_etcd(9).unwrap();
        for key in [
            keys.waiter_key(&name, lease),
            keys.exclusive_key(&name, lease),
            keys.tombstone_key(&name, lease),
        ] {
            assert_eq!(
                KeySchema::lock_of_key(key.as_bytes()),
                Some(keys.lock_prefix(&name).as_bytes())
            );
            assert_eq!(keys.name_of_key(key.as_bytes()), Some(name.clone()));
            assert_eq!(KeySchema::lease_of_key(key.as_bytes()), Some(lease));
        }
        assert_eq!(
            keys.lease_delay_key(lease, &name),
            "/p/leases/0000000000000009/delays/a%2Fb"
        );
    }

    #[test]
    fn non_canonical_encodings_are_not_names() {
        assert!(LockName::from_encoded("a%2fb").is_none()); // lowercase hex is not ours
        assert!(LockName::from_encoded("a/b").is_none());
        assert!(LockName::from_encoded("%FF").is_none()); // not UTF-8
    }
}
