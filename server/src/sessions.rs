//! A bound on the sessions (leases granted with `POST /v1/leases`) open through this replica at
//! once: `--max-sessions`, off by default. Past it, a new session waits, in arrival order and
//! costing etcd nothing, for a place to free (a session revoked, or expired unrenewed) for up
//! to what its grant asked (`wait`, default [`WAITING_ROOM`]); one that gets no place in that
//! time is answered `503 overloaded` with `Retry-After`, before anything reached etcd. A
//! ticketing site's waiting room lets buyers in as others leave in the same way.
//!
//! A place is taken when the grant starts, not when it ends: a stampede of grants arriving
//! together cannot all see room before the first is counted. Waiting, rather than shedding at
//! once, keeps the room full: a buyer turned away sleeps out its `Retry-After` and backoff
//! (seconds), while the places that free meanwhile would stay empty.
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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::keys::LeaseId;

/// How long a new session waits for a place before it is shed, unless its grant says (`wait`).
/// Inside a client's usual request timeout (5 s in the Rust client), leaving it time for the
/// grant itself. Longer is cheaper for everyone: each buyer turned away comes back after its
/// `Retry-After` and backoff, and in the 5x flash sale those returns cost the two cores more CPU
/// at 2 s than at 3.5 s (`docs/performance.md`, "Sixth pass"); a client that can wait longer
/// (a buyer in an on-sale) says so with `wait`, and comes back fewer times.
pub const WAITING_ROOM: Duration = Duration::from_millis(3500);

/// How often, at most, open sessions are checked for expiry: a session whose client vanished
/// without revoking it frees its place within this much of its TTL running out, once someone
/// waits for a place.
const SWEEP_EVERY: Duration = Duration::from_millis(250);

/// The sessions open through this replica, and how many may be. Cheap to clone.
#[derive(Clone, Default)]
pub struct SessionCap {
    /// `None`: no bound (and nothing is tracked).
    inner: Option<Arc<Cap>>,
}

struct Cap {
    /// One permit per place; waiters are served in arrival order (tokio's semaphore is fair).
    places: Arc<Semaphore>,
    state: Mutex<Open>,
    /// Whether a waiter is on sweeping duty.
    sweeper: AtomicBool,
}

/// Sweeping duty, held by one waiting session at a time; given up when dropped.
struct Sweeper<'a>(&'a AtomicBool);

impl<'a> Sweeper<'a> {
    fn take(duty: &'a AtomicBool) -> Option<Self> {
        (!duty.swap(true, Ordering::AcqRel)).then_some(Self(duty))
    }
}

impl Drop for Sweeper<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

#[derive(Default)]
struct Open {
    /// Open sessions: when each stops counting unless renewed, and the place it holds.
    sessions: HashMap<LeaseId, (Instant, OwnedSemaphorePermit)>,
    /// When expired sessions were last let go.
    swept: Option<Instant>,
}

/// A place taken for a session being granted: it becomes the session's with
/// [`SessionCap::opened`]; dropped (the grant failed), it is free again.
pub struct Place(Option<OwnedSemaphorePermit>);

impl SessionCap {
    /// At most `max` sessions open at once; 0: no bound.
    pub fn new(max: usize) -> Self {
        Self {
            inner: (max > 0).then(|| {
                Arc::new(Cap {
                    places: Arc::new(Semaphore::new(max)),
                    state: Mutex::new(Open::default()),
                    sweeper: AtomicBool::new(false),
                })
            }),
        }
    }

    /// A place for a new session: at once if one is free, else the first to free within
    /// `patience`, in arrival order; `None` if none did (shed the session).
    pub async fn admit(&self, patience: Duration) -> Option<Place> {
        let Some(cap) = &self.inner else {
            return Some(Place(None));
        };
        let deadline = Instant::now() + patience;
        if let Ok(place) = Arc::clone(&cap.places).try_acquire_owned() {
            return Some(Place(Some(place)));
        }
        // Expired sessions free their places when someone needs one (a background task would
        // do the same work when nobody does).
        cap.sweep();
        crate::metrics::session_waited();
        // In line: the wait keeps its place in the semaphore's queue until it is let in or
        // gives up, so a place freed goes to the first in line, whoever freed it.
        let wait = Arc::clone(&cap.places).acquire_owned();
        tokio::pin!(wait);
        // One waiter at a time wakes every SWEEP_EVERY to let expired sessions go; the others
        // sleep until a place is theirs or their patience is out (thousands of waiters polling
        // would cost the CPU that etcd and the open sessions need).
        let sweeper = Sweeper::take(&cap.sweeper);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let slice = if sweeper.is_some() {
                left.min(SWEEP_EVERY)
            } else {
                left
            };
            if let Ok(place) = tokio::time::timeout(slice, &mut wait).await {
                return Some(Place(Some(place.expect("the semaphore is never closed"))));
            }
            if Instant::now() >= deadline {
                return None;
            }
            cap.sweep();
        }
    }

    /// The session granted in `place` is `lease`, with `ttl`: it holds the place until revoked,
    /// or until `ttl` passes unrenewed.
    pub fn opened(&self, place: Place, lease: LeaseId, ttl: Duration) {
        if let (Some(cap), Place(Some(permit))) = (&self.inner, place) {
            let mut open = cap.state.lock().expect("session cap lock");
            open.sessions.insert(lease, (Instant::now() + ttl, permit));
            crate::metrics::sessions_open(open.sessions.len());
        }
    }

    /// `lease` was kept alive for `ttl` more: it counts that much longer, if it counts here.
    pub fn renewed(&self, lease: LeaseId, ttl: Duration) {
        if let Some(cap) = &self.inner
            && let Some((until, _)) = cap
                .state
                .lock()
                .expect("session cap lock")
                .sessions
                .get_mut(&lease)
        {
            *until = Instant::now() + ttl;
        }
    }

    /// `lease` was revoked: its place is free.
    pub fn closed(&self, lease: LeaseId) {
        if let Some(cap) = &self.inner {
            let mut open = cap.state.lock().expect("session cap lock");
            open.sessions.remove(&lease);
            crate::metrics::sessions_open(open.sessions.len());
        }
    }
}

impl Cap {
    /// Frees the places of sessions whose TTL ran out unrenewed, unless that was done less than
    /// [`SWEEP_EVERY`] ago.
    fn sweep(&self) {
        let mut open = self.state.lock().expect("session cap lock");
        let now = Instant::now();
        if open.swept.is_some_and(|at| now < at + SWEEP_EVERY) {
            return;
        }
        open.swept = Some(now);
        open.sessions.retain(|_, (until, _)| *until > now);
        crate::metrics::sessions_open(open.sessions.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(id: i64) -> LeaseId {
        LeaseId::from_etcd(id).expect("a positive id")
    }

    /// Opens `lease` in a place taken at once.
    async fn open(cap: &SessionCap, id: i64, ttl: Duration) {
        let place = cap.admit(Duration::ZERO).await.expect("a free place");
        cap.opened(place, lease(id), ttl);
    }

    #[tokio::test(start_paused = true)]
    async fn a_session_counts_until_revoked_or_expired_unrenewed() {
        let cap = SessionCap::new(2);
        let ttl = Duration::from_secs(10);
        open(&cap, 1, ttl).await;
        open(&cap, 2, ttl).await;
        assert!(cap.admit(Duration::ZERO).await.is_none(), "two open of two");
        cap.closed(lease(1));
        open(&cap, 3, ttl).await; // a revoke frees its place
        assert!(cap.admit(Duration::ZERO).await.is_none());
        tokio::time::advance(Duration::from_secs(6)).await;
        cap.renewed(lease(2), ttl);
        tokio::time::advance(Duration::from_secs(6)).await;
        // Lease 3 ran out unrenewed; lease 2 was renewed and still counts.
        open(&cap, 4, ttl).await;
        assert!(
            cap.admit(Duration::ZERO).await.is_none(),
            "the renewed session still counts"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_place_is_taken_when_the_grant_starts_and_freed_if_it_fails() {
        let cap = SessionCap::new(1);
        let granting = cap.admit(Duration::ZERO).await.expect("a free place");
        assert!(
            cap.admit(Duration::ZERO).await.is_none(),
            "a grant under way holds its place"
        );
        drop(granting); // the grant failed
        assert!(cap.admit(Duration::ZERO).await.is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn new_sessions_wait_in_arrival_order_for_a_place_to_free() {
        let cap = SessionCap::new(1);
        open(&cap, 1, Duration::from_secs(60)).await;
        let (order, _) = tokio::sync::broadcast::channel::<u8>(4);
        let mut waiters = Vec::new();
        for n in 1..=2u8 {
            let (cap, order) = (cap.clone(), order.clone());
            waiters.push(tokio::spawn(async move {
                let place = cap.admit(WAITING_ROOM).await;
                if place.is_some() {
                    let _ = order.send(n);
                }
                // Holds its place a moment, then lets the next one in.
                tokio::time::sleep(Duration::from_millis(100)).await;
                place.is_some()
            }));
            tokio::time::sleep(Duration::from_millis(10)).await; // arrival order
        }
        let mut admitted = order.subscribe();
        tokio::time::sleep(Duration::from_millis(50)).await;
        cap.closed(lease(1));
        assert_eq!(admitted.recv().await.unwrap(), 1, "first come, first in");
        assert_eq!(admitted.recv().await.unwrap(), 2);
        for waiter in waiters {
            assert!(waiter.await.unwrap());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_session_that_finds_no_place_in_the_waiting_room_is_shed() {
        let cap = SessionCap::new(1);
        open(&cap, 1, Duration::from_secs(60)).await;
        let started = Instant::now();
        assert!(cap.admit(WAITING_ROOM).await.is_none());
        assert!(started.elapsed() >= WAITING_ROOM);
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_session_gets_the_place_of_one_that_expires() {
        let cap = SessionCap::new(1);
        open(&cap, 1, Duration::from_secs(1)).await;
        let started = Instant::now();
        assert!(cap.admit(WAITING_ROOM).await.is_some());
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(1) && waited <= Duration::from_secs(1) + SWEEP_EVERY,
            "waited {waited:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn one_waiter_sweeps_and_the_first_in_line_gets_the_freed_place() {
        let cap = SessionCap::new(1);
        open(&cap, 1, Duration::from_secs(1)).await;
        // Each keeps the place it gets (a session granted in it).
        let waiter = |cap: SessionCap| async move { cap.admit(WAITING_ROOM).await };
        let first = tokio::spawn(waiter(cap.clone()));
        tokio::time::sleep(Duration::from_millis(10)).await;
        let second = tokio::spawn(waiter(cap.clone()));
        // The expired session's place goes to the first in line, whoever noticed the expiry;
        // the second waits on and is shed when its patience is out.
        let first = first.await.unwrap();
        assert!(first.is_some(), "the first in line was let in");
        assert!(second.await.unwrap().is_none(), "no second place freed");
    }

    #[tokio::test]
    async fn no_bound_by_default() {
        let cap = SessionCap::default();
        for id in 1..=1000 {
            open(&cap, id, Duration::from_secs(60)).await;
        }
        assert!(SessionCap::new(0).admit(Duration::ZERO).await.is_some());
    }
}
