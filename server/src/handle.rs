//! Lease handles: the secret that proves a client owns a lease, and everything held under it.
//!
//! A lease id is public (it shows in lock status), so it cannot be what release, renew,
//! keep-alive and revoke ask for. A *handle* is: at least 128 random bits, returned once when the
//! lease is granted, required by every operation that acts on the lease or on a hold under it.
//!
//! - The server never stores a handle. It stores only [`AuthDigest`] (a SHA-256 of tenant and
//!   handle) in the lease's `auth` key (see `keys.rs`), and every txn that acts compares that key
//!   in the same txn, so a wrong handle changes nothing.
//! - The handle also *names* its lease: the lease id is derived from tenant and handle
//!   ([`Handle::lease_id`]), and etcd grants the lease under exactly that id. So a request that
//!   carries a handle needs no lookup to find its lease, and a grant retried with the same
//!   (client-chosen) handle finds the lease its first attempt made: lease grants are idempotent.
//! - Tenants are part of both derivations: a handle used by another tenant names another lease
//!   (which does not exist) and matches no digest.

use std::fmt;

use aws_lc_rs::digest::{Context, SHA256};

use crate::keys::LeaseId;

/// Random bytes in a server-made handle (192 bits, above the 128 the threat model asks for).
const GENERATED_BYTES: usize = 24;

/// Shortest client-chosen handle accepted: 22 characters of base64url carry 128 bits.
pub const MIN_HANDLE_CHARS: usize = 22;

/// Longest handle accepted.
pub const MAX_HANDLE_CHARS: usize = 128;

/// A lease handle. Its `Debug` never shows the secret, so it cannot leak into logs by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct Handle(String);

/// Why a string is not an acceptable handle.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "a handle is {MIN_HANDLE_CHARS} to {MAX_HANDLE_CHARS} characters of A-Z a-z 0-9 - _ (at least 128 random bits)"
)]
pub struct InvalidHandle;

impl Handle {
    /// A new random handle.
    pub fn generate() -> Self {
        let mut bytes = [0u8; GENERATED_BYTES];
        aws_lc_rs::rand::fill(&mut bytes).expect("the system random source works");
        Self(base64url(&bytes))
    }

    /// A handle given by a client: checked for shape (length and alphabet). Its randomness is
    /// the client's business; the `leasehold` crate makes 192-bit ones.
    pub fn parse(text: &str) -> Result<Self, InvalidHandle> {
        let ok_len = (MIN_HANDLE_CHARS..=MAX_HANDLE_CHARS).contains(&text.len());
        let ok_chars = text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        (ok_len && ok_chars)
            .then(|| Self(text.to_owned()))
            .ok_or(InvalidHandle)
    }

    /// The secret itself, to hand to the client once.
    pub fn reveal(&self) -> &str {
        &self.0
    }

    /// The lease this handle names for `tenant`: 63 bits of SHA-256, never 0.
    pub fn lease_id(&self, tenant: &str) -> LeaseId {
        let digest = sha256(&[
            b"leasehold lease id v1\0",
            tenant.as_bytes(),
            b"\0",
            self.0.as_bytes(),
        ]);
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        let id = (u64::from_be_bytes(first) & (i64::MAX as u64)) as i64;
        LeaseId::from_etcd(id.max(1)).expect("positive")
    }

    /// What the lease's `auth` key must hold for this handle and tenant.
    pub fn digest(&self, tenant: &str) -> AuthDigest {
        let digest = sha256(&[
            b"leasehold auth v1\0",
            tenant.as_bytes(),
            b"\0",
            self.0.as_bytes(),
        ]);
        AuthDigest(hex(&digest))
    }
}

impl fmt::Debug for Handle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Handle(<secret>)")
    }
}

/// The value of a lease's `auth` key: hex SHA-256 of tenant and handle. Safe to store and log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthDigest(String);

impl AuthDigest {
    /// The value stored while the lease is usable.
    pub fn live(&self) -> Vec<u8> {
        self.0.as_bytes().to_vec()
    }

    /// The value stored once a revoke has begun: every operation but a retried revoke compares
    /// against [`AuthDigest::live`] and so refuses from then on.
    pub fn revoking(&self) -> Vec<u8> {
        format!("revoking:{}", self.0).into_bytes()
    }
}

pub(crate) fn sha256(parts: &[&[u8]]) -> [u8; 32] {
    let mut context = Context::new(&SHA256);
    for part in parts {
        context.update(part);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(context.finish().as_ref());
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len() * 4 / 3 + 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_handles_are_long_random_and_valid() {
        let (a, b) = (Handle::generate(), Handle::generate());
        assert_ne!(a, b);
        assert_eq!(a.reveal().len(), 32);
        assert_eq!(Handle::parse(a.reveal()), Ok(a));
    }

    #[test]
    fn derivations_depend_on_tenant_and_handle() {
        let h = Handle::parse("aaaaaaaaaaaaaaaaaaaaaaaa").unwrap();
        let g = Handle::parse("aaaaaaaaaaaaaaaaaaaaaaab").unwrap();
        assert_eq!(h.lease_id("t"), h.lease_id("t"));
        assert_ne!(h.lease_id("t"), g.lease_id("t"));
        assert_ne!(h.lease_id("t"), h.lease_id("u"));
        assert_ne!(h.digest("t"), h.digest("u"));
        assert_ne!(h.digest("t").live(), h.digest("t").revoking());
        assert!(h.lease_id("t").as_i64() > 0);
    }

    #[test]
    fn bad_handles_are_refused() {
        for bad in [
            "",
            "short",
            &"x".repeat(129),
            "aaaaaaaaaaaaaaaaaaaaaa/",
            "aaaaaaaaaaaaaaaaaaaaa é",
        ] {
            assert_eq!(Handle::parse(bad), Err(InvalidHandle), "{bad:?}");
        }
    }

    #[test]
    fn debug_hides_the_secret() {
        let h = Handle::generate();
        assert!(!format!("{h:?}").contains(h.reveal()));
    }

    #[test]
    fn base64url_matches_the_rfc_vectors() {
        assert_eq!(base64url(b"foo"), "Zm9v");
        assert_eq!(base64url(b"foob"), "Zm9vYg");
        assert_eq!(base64url(&[0xfb, 0xff]), "-_8");
    }
}
