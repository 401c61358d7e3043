//! A bound on the sessions (leases granted with `POST /v1/leases`) open through this replica at
//! once: `--max-sessions`, off by default. Past it, a new session is answered `503 overloaded`
//! with `Retry-After` before anything reaches etcd, as a ticketing site's waiting room lets
//! buyers in as others leave.
//!
//! Why a count of sessions and not only the admission limit on etcd calls in flight
//! (`admission.rs`): a session admitted in a quiet moment goes on adding work for its whole life
//! (acquires, renewals, its revoke). In a flash sale at five times capacity, new sessions came in
//! whenever the etcd queue briefly emptied, then their acquires were shed or refused, and every
//! seat's line filled with buyers who could not be served in time (`docs/performance.md`,
//! "Fifth pass"). Bounding the sessions open at once keeps the crowd inside to what the servers
//! can serve.
//!
//! The count is this replica's own, and soft: a session counts from its grant here until its
//! revoke here, or until its TTL runs out with no keep-alive through this replica. A session
//! revoked through another replica counts here until then; one kept alive through another
//! replica stops counting here early. Nothing about a lease's validity rests on it, and a
//! restarted replica starts from zero.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::keys::LeaseId;

/// The sessions open through this replica, and how many may be. Cheap to clone.
#[derive(Clone, Default)]
pub struct SessionCap {
    /// `None`: no bound (and nothing is tracked).
    inner: Option<Arc<Cap>>,
}

struct Cap {
    max: usize,
    /// Open sessions and when each stops counting unless renewed.
    open: Mutex<HashMap<LeaseId, Instant>>,
}

impl SessionCap {
    /// At most `max` sessions open at once; 0: no bound.
    pub fn new(max: usize) -> Self {
        Self {
            inner: (max > 0).then(|| {
                Arc::new(Cap {
                    max,
                    open: Mutex::new(HashMap::new()),
                })
            }),
        }
    }

    /// Whether a new session may open now.
    pub fn has_room(&self) -> bool {
        let Some(cap) = &self.inner else {
            return true;
        };
        let mut open = cap.open.lock().expect("session cap lock");
        if open.len() >= cap.max {
            let now = Instant::now();
            open.retain(|_, until| *until > now);
        }
        crate::metrics::sessions_open(open.len());
        open.len() < cap.max
    }

    /// `lease` was granted with `ttl`: it counts until revoked, or until `ttl` passes unrenewed.
    pub fn opened(&self, lease: LeaseId, ttl: Duration) {
        if let Some(cap) = &self.inner {
            let mut open = cap.open.lock().expect("session cap lock");
            open.insert(lease, Instant::now() + ttl);
            crate::metrics::sessions_open(open.len());
        }
    }

    /// `lease` was kept alive for `ttl` more: it counts that much longer, if it counts here.
    pub fn renewed(&self, lease: LeaseId, ttl: Duration) {
        if let Some(cap) = &self.inner
            && let Some(until) = cap.open.lock().expect("session cap lock").get_mut(&lease)
        {
            *until = Instant::now() + ttl;
        }
    }

    /// `lease` was revoked: it no longer counts.
    pub fn closed(&self, lease: LeaseId) {
        if let Some(cap) = &self.inner {
            let mut open = cap.open.lock().expect("session cap lock");
            open.remove(&lease);
            crate::metrics::sessions_open(open.len());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(id: i64) -> LeaseId {
        LeaseId::from_etcd(id).expect("a positive id")
    }

    #[tokio::test(start_paused = true)]
    async fn a_session_counts_until_revoked_or_expired_unrenewed() {
        let cap = SessionCap::new(2);
        let ttl = Duration::from_secs(10);
        cap.opened(lease(1), ttl);
        assert!(cap.has_room());
        cap.opened(lease(2), ttl);
        assert!(!cap.has_room(), "two open of two");
        cap.closed(lease(1));
        assert!(cap.has_room(), "a revoke frees its place");
        cap.opened(lease(3), ttl);
        assert!(!cap.has_room());
        tokio::time::advance(Duration::from_secs(6)).await;
        cap.renewed(lease(2), ttl);
        tokio::time::advance(Duration::from_secs(6)).await;
        // Lease 3 ran out unrenewed; lease 2 was renewed and still counts.
        assert!(cap.has_room(), "an expired session frees its place");
        cap.opened(lease(4), ttl);
        assert!(!cap.has_room(), "the renewed session still counts");
    }

    #[test]
    fn no_bound_by_default() {
        let cap = SessionCap::default();
        for id in 1..=1000 {
            cap.opened(lease(id), Duration::from_secs(60));
        }
        assert!(cap.has_room());
        assert!(SessionCap::new(0).has_room());
    }
}
