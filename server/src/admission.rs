//! Admission control: a bound on etcd work in flight that adapts to etcd's latency, so that the
//! server queues briefly or sheds early, with `503 overloaded` and `Retry-After`, before etcd is
//! pushed into its own "too many requests".
//!
//! Every etcd call takes a permit ([`Admission::admit`]). While fewer calls are in flight than
//! the *limit*, a call goes at once; otherwise it queues. What happens in the queue depends on
//! the call's class:
//!
//! - the first etcd call of a new request that *adds* work (an acquire, a lease grant)
//!   ([`Class::NewRequest`]) waits at most [`QUEUE_TIMEOUT`] (an acquire that asked to wait in
//!   line: up to its wait, [`be_patient`]); past it, or at once when the calls queued ahead
//!   would take longer than that to get their slots at etcd's recent latency, the request is
//!   shed: nothing was sent to etcd, so the answer `503 overloaded` is exact;
//! - requests that *finish* work (release, renew, keep-alive, revoke), the clean-up of a wait
//!   that ended, and background work (clean-ups, keep-alives, the watch) ([`Class::Finishing`])
//!   are never shed, and go first: shedding a release would keep a lock held for a whole TTL and
//!   turn away everyone waiting for it, and a wait's clean-up unblocks the line behind it;
//! - every later call of an admitted request ([`Class::Admitted`]) waits for its turn, after
//!   finishing work and before new requests: it must not fail halfway through an operation that
//!   already wrote to etcd, and a request halfway through is closer to an answer than a new one.
//!
//! Why finishing work goes first: in a line of waiters with short waits (the 5x flash sale's
//! last seat: hundreds of buyers, each waiting 250 ms, then queueing again), the head of the line
//! is granted only once the keys of everyone who gave up before it are gone. When those
//! clean-ups queued behind new enqueues, the head was always the key of someone who had left,
//! each waiter in turn gave up before its turn came, and the lock went to nobody for seconds.
//!
//! New sessions wait for everything else. A request that opens a lease (a lease grant, an
//! acquire with `ttl`) ([`Class::NewSession`]) gets a slot only when no other call is queued:
//! in a stampede, each session let in adds its own locks, keep-alives and revoke to etcd's work
//! and slows every buyer already halfway through a purchase, so the work of sessions already
//! open goes first, and new ones are let in as fast as that work leaves room (session-based
//! admission control, as commercial web sites use at peak load). A new session that cannot get
//! in within its queue timeout is shed, before it cost etcd anything.
//!
//! A parked waiter holds no permit: it takes one only for each read it makes when woken.
//!
//! The limit follows etcd's latency, as Netflix's `Gradient2` limiter does: the ratio of a
//! long-term latency baseline to the recent latency says whether etcd is queueing; the limit
//! shrinks in proportion when it is, grows by about its square root when it is not, and halves at
//! once when etcd answers "too many requests" or times out.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::metrics;

/// How long a new request may queue for its first etcd call before it is shed.
pub const QUEUE_TIMEOUT: Duration = Duration::from_millis(500);

/// What a shed request is told to wait before retrying, in whole seconds (`Retry-After`).
pub const RETRY_AFTER_SECS: u64 = 1;

/// Bounds of the adaptive limit (calls in flight towards etcd, per server).
const MIN_LIMIT: f64 = 16.0;
const MAX_LIMIT: f64 = 1024.0;
const INITIAL_LIMIT: f64 = 64.0;

/// Latency above `TOLERANCE` × baseline counts as etcd queueing, once it is above
/// `QUEUEING_FLOOR` too: etcd needs calls in flight to fill its raft batches (at 128 calls in
/// flight it commits more than at 16, each call then taking tens of milliseconds), so a few tens
/// of milliseconds queued inside etcd buy throughput; beyond that, calls wait better here, where
/// finishing work goes first and new work can be shed.
const TOLERANCE: f64 = 2.0;
const QUEUEING_FLOOR: f64 = 0.2;

/// How fast the short-term latency average moves (per sample).
const SHORT_WEIGHT: f64 = 0.1;

/// The baseline is the lowest short-term average over the last one or two windows of this
/// length: what etcd answers in when nothing queues in it. (A slow average of every sample is
/// no baseline: at thousands of calls a second it follows a sustained overload up within a
/// second or two, the limit grows with it, and etcd's own queue fills.)
const BASELINE_WINDOW: Duration = Duration::from_secs(10);

/// The most calls that may queue, whatever the estimate of their wait (a bound on memory).
const MAX_QUEUE: usize = 4 * MAX_LIMIT as usize;

/// Which queueing rule applies to a call. The classes are tiers, first served first: a call
/// queues behind every call of its own tier and of the tiers above it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Work that ends or keeps up what is held or queued: calls of a request that finishes work,
    /// a wait's clean-up, background work. Queue until served, first.
    Finishing,
    /// A later call of an admitted request: queue until served, after finishing work.
    Admitted,
    /// The first etcd call of a new request under an existing lease: shed if it would queue too
    /// long.
    NewRequest,
    /// The first etcd call of a new request that opens a lease: served only when no other call
    /// waits, shed if it would queue too long.
    NewSession,
}

impl Class {
    /// Whether a call of this class may be shed (the first call of a new request) rather than
    /// queue until served.
    fn may_be_shed(self) -> bool {
        matches!(self, Class::NewRequest | Class::NewSession)
    }
}

/// How many tiers ([`Class`]) there are.
const TIERS: usize = 4;

/// What a request does to etcd's work, which decides how its calls queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    /// It adds work (an acquire, a lease grant): its first call may be shed.
    AddsWork,
    /// It finishes or keeps up work (release, renew, keep-alive, revoke): never shed, first.
    FinishesWork,
    /// Anything else (reads of status): never shed, in turn with admitted work.
    Other,
}

/// The request was shed: nothing was sent to etcd.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the server is overloaded; retry after {RETRY_AFTER_SECS} s")]
pub struct Shed;

/// The most a patient request (an acquire that asked to wait) queues for its first call.
pub const MAX_PATIENCE: Duration = Duration::from_secs(10);

/// What admission knows of the request the current task serves.
#[derive(Debug, Clone, Copy)]
struct RequestState {
    /// True until its first etcd call is admitted, if it may be shed at all.
    first_call_pending: bool,
    /// How long that first call may queue.
    patience: Duration,
    /// The request opens a lease (a new session).
    opens_session: bool,
    /// Its calls are finishing work.
    finishing: bool,
}

tokio::task_local! {
    /// Set for the duration of an HTTP request.
    static REQUEST: std::cell::Cell<RequestState>;
}

/// Runs `request` (an HTTP handler) of this kind: if it adds work, its first etcd call may be
/// shed, later ones not. Requests that finish work are never shed, and go first.
pub async fn request_scope<F: Future>(kind: RequestKind, request: F) -> F::Output {
    let state = RequestState {
        first_call_pending: kind == RequestKind::AddsWork,
        patience: QUEUE_TIMEOUT,
        opens_session: false,
        finishing: kind == RequestKind::FinishesWork,
    };
    REQUEST.scope(std::cell::Cell::new(state), request).await
}

/// Runs `work` (the clean-up of a wait that ended) as finishing work: never shed, first.
pub async fn finishing<F: Future>(work: F) -> F::Output {
    request_scope(RequestKind::FinishesWork, work).await
}

/// The current request asked to wait up to `wait` (an acquire in line): its first etcd call may
/// queue that long (at most [`MAX_PATIENCE`]) rather than be shed. A parked waiter costs etcd
/// nothing, so queueing it is better than failing it.
pub fn be_patient(wait: Duration) {
    update_request(|now| now.patience = wait.clamp(QUEUE_TIMEOUT, MAX_PATIENCE));
}

/// The current request opens a lease (a lease grant, an acquire with `ttl`): its first etcd
/// call waits until no other call is queued.
pub fn opens_session() {
    update_request(|now| now.opens_session = true);
}

/// Changes what admission knows of the current request (nothing outside a request).
fn update_request(change: impl FnOnce(&mut RequestState)) {
    let _ = REQUEST.try_with(|state| {
        let mut now = state.get();
        change(&mut now);
        state.set(now);
    });
}

/// The class of the etcd call about to be made by the current task, and its patience.
fn current_class() -> (Class, Duration) {
    REQUEST
        .try_with(|state| {
            let state = state.get();
            if state.first_call_pending && state.opens_session {
                (Class::NewSession, state.patience)
            } else if state.first_call_pending {
                (Class::NewRequest, state.patience)
            } else if state.finishing {
                (Class::Finishing, Duration::ZERO)
            } else {
                (Class::Admitted, Duration::ZERO)
            }
        })
        // Outside a request: background work (clean-ups, keep-alives, the watch).
        .unwrap_or((Class::Finishing, Duration::ZERO))
}

/// Marks the current request as admitted: its later calls queue instead of being shed.
fn mark_admitted() {
    update_request(|now| now.first_call_pending = false);
}

/// The shared limiter. Cheap to clone.
#[derive(Clone)]
pub struct Admission {
    inner: Arc<Mutex<State>>,
}

struct State {
    limit: f64,
    in_flight: usize,
    /// Waiting calls, one queue per tier (indexed by [`Class`], first served first), oldest
    /// first in each; a sender is dropped when its waiter gave up.
    queues: [VecDeque<oneshot::Sender<()>>; TIERS],
    /// Short-term average latency of etcd calls, in seconds (0 before the first).
    short_rtt: f64,
    /// The lowest `short_rtt` of the current baseline window, and of the one before.
    window_min: f64,
    previous_min: f64,
    window_started: Instant,
}

/// An admitted call; dropping it frees the slot (and wakes the next waiter).
pub struct Permit {
    admission: Admission,
    started: Instant,
}

impl Default for Admission {
    fn default() -> Self {
        Self {
            inner: Arc::new(Mutex::new(State {
                limit: INITIAL_LIMIT,
                in_flight: 0,
                queues: Default::default(),
                short_rtt: 0.0,
                window_min: f64::INFINITY,
                previous_min: f64::INFINITY,
                window_started: Instant::now(),
            })),
        }
    }
}

impl Admission {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.lock().expect("admission lock")
    }

    /// Waits for a slot for one etcd call of the current task's class.
    pub async fn admit(&self) -> Result<Permit, Shed> {
        let (class, patience) = current_class();
        let waiting = {
            let mut state = self.state();
            let free = state.in_flight < state.limit as usize;
            // Calls a new arrival of this class would queue behind: its tier and those above.
            let ahead: usize = state.queues[..=class as usize]
                .iter()
                .map(VecDeque::len)
                .sum();
            if free && ahead == 0 {
                state.in_flight += 1;
                None
            } else if class.may_be_shed()
                && (ahead >= MAX_QUEUE || state.drain_time(ahead) > patience)
            {
                // The queue ahead would take longer to drain than the request may wait.
                drop(state);
                metrics::shed();
                return Err(Shed);
            } else {
                let (tx, rx) = oneshot::channel();
                state.queues[class as usize].push_back(tx);
                metrics::admission(state.limit, state.queued());
                Some(rx)
            }
        };
        if let Some(mut turn) = waiting {
            if !class.may_be_shed() {
                let _ = turn.await;
            } else if tokio::time::timeout(patience, &mut turn).await.is_err() {
                turn.close();
                // A slot handed over just as we gave up is ours: give it back.
                if turn.try_recv().is_ok() {
                    self.release();
                }
                metrics::shed();
                return Err(Shed);
            }
        }
        mark_admitted();
        Ok(Permit {
            admission: self.clone(),
            started: Instant::now(),
        })
    }

    /// Frees a slot: hands it to the oldest live waiter of the first tier that has one
    /// (finishing work, admitted requests, new requests, new sessions), or returns it.
    fn release(&self) {
        let mut state = self.state();
        for queue in &mut state.queues {
            while let Some(next) = queue.pop_front() {
                if next.send(()).is_ok() {
                    return; // the slot passes on; in_flight is unchanged
                }
            }
        }
        state.in_flight = state.in_flight.saturating_sub(1);
    }

    /// Folds one completed call's latency (and whether etcd pushed back) into the limit.
    fn observe(&self, rtt: Duration, pushed_back: bool) {
        let mut state = self.state();
        let rtt = rtt.as_secs_f64().max(1e-5);
        if pushed_back {
            state.limit = (state.limit / 2.0).max(MIN_LIMIT);
        } else {
            if state.short_rtt == 0.0 {
                state.short_rtt = rtt;
            }
            state.short_rtt += SHORT_WEIGHT * (rtt - state.short_rtt);
            let now = Instant::now();
            if now.duration_since(state.window_started) >= BASELINE_WINDOW {
                (state.previous_min, state.window_min) = (state.window_min, state.short_rtt);
                state.window_started = now;
            } else {
                state.window_min = state.window_min.min(state.short_rtt);
            }
            let baseline = state.window_min.min(state.previous_min);
            let tolerated = (TOLERANCE * baseline).max(QUEUEING_FLOOR);
            let gradient = (tolerated / state.short_rtt).clamp(0.5, 1.0);
            // Grow only while the limit is actually used: an idle server learns nothing.
            let used = state.in_flight as f64 >= state.limit / 2.0 || state.queued() > 0;
            let headroom = if used { state.limit.sqrt() } else { 0.0 };
            let target = state.limit * gradient + headroom;
            state.limit = (0.8 * state.limit + 0.2 * target).clamp(MIN_LIMIT, MAX_LIMIT);
        }
        metrics::admission(state.limit, state.queued());
    }

    /// The current limit (rounded down) and queue length.
    #[cfg(test)]
    fn snapshot(&self) -> (usize, usize) {
        let state = self.state();
        (state.limit as usize, state.queued())
    }
}

impl State {
    /// Calls queued, of every class.
    fn queued(&self) -> usize {
        self.queues.iter().map(VecDeque::len).sum()
    }

    /// About how long `ahead` queued calls take to get their slots: the limit's worth of calls
    /// completes every `short_rtt`.
    fn drain_time(&self, ahead: usize) -> Duration {
        Duration::from_secs_f64(ahead as f64 * self.short_rtt / self.limit.max(1.0))
    }
}

impl Permit {
    /// Ends the call: records its latency and whether etcd pushed back.
    pub fn finish(self, pushed_back: bool) {
        self.admission.observe(self.started.elapsed(), pushed_back);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.admission.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn new_requests_are_shed_when_the_queue_is_full_admitted_ones_wait() {
        let admission = Admission::default();
        let limit = admission.snapshot().0;
        let held: Vec<Permit> = futures_held(&admission, limit).await;
        // A new request now queues, then is shed after the queue timeout.
        let started = Instant::now();
        let shed = request_scope(RequestKind::AddsWork, admission.admit()).await;
        assert!(shed.is_err());
        assert!(started.elapsed() >= QUEUE_TIMEOUT);
        // Background work waits for a slot instead.
        let waiting = tokio::spawn({
            let admission = admission.clone();
            async move { admission.admit().await.map(drop) }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished());
        drop(held);
        assert!(waiting.await.unwrap().is_ok());
        assert_eq!(admission.state().in_flight, 0);
    }

    #[tokio::test]
    async fn a_request_is_shed_at_once_when_the_queue_would_outlast_its_patience() {
        let admission = Admission::default();
        // etcd answers in 20 ms: the limit's worth of queued calls takes 20 ms to drain.
        for _ in 0..50 {
            admission.observe(Duration::from_millis(20), false);
        }
        let limit = admission.snapshot().0;
        let _held = futures_held(&admission, limit).await;
        // Thirty limits' worth queued: 600 ms ahead, more than a new request's 500 ms.
        let mut queued = Vec::new();
        for _ in 0..30 * limit {
            let admission = admission.clone();
            queued.push(tokio::spawn(
                async move { admission.admit().await.map(drop) },
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        let started = Instant::now();
        assert!(
            request_scope(RequestKind::AddsWork, admission.admit())
                .await
                .is_err()
        );
        // A request that finishes work queues instead.
        let finishing = tokio::spawn({
            let admission = admission.clone();
            async move {
                request_scope(RequestKind::FinishesWork, admission.admit())
                    .await
                    .map(drop)
            }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!finishing.is_finished(), "queued, not shed");
        assert!(started.elapsed() < QUEUE_TIMEOUT, "shed without queueing");
    }

    #[test]
    fn the_limit_shrinks_when_etcd_slows_and_halves_on_push_back() {
        let admission = Admission::default();
        admission.state().in_flight = 64; // in use
        for _ in 0..200 {
            admission.observe(Duration::from_millis(2), false);
        }
        let steady = admission.snapshot().0;
        assert!(
            steady > 64,
            "grows while latency is steady and the limit used: {steady}"
        );
        for _ in 0..50 {
            admission.observe(Duration::from_millis(400), false);
        }
        let slowed = admission.snapshot().0;
        assert!(
            slowed < steady / 2,
            "shrinks when latency rises: {steady} -> {slowed}"
        );
        admission.observe(Duration::from_millis(2), true);
        assert!(admission.snapshot().0 <= (slowed / 2 + 1).max(MIN_LIMIT as usize));
        for _ in 0..10_000 {
            admission.observe(Duration::from_secs(5), true);
        }
        assert_eq!(admission.snapshot().0, MIN_LIMIT as usize);
    }

    /// The labels of the calls served, in order.
    type Served = Arc<Mutex<Vec<&'static str>>>;

    /// Spawns one call of a request of `kind` (opening a session if `opens`) that waits for a
    /// slot, then records `label` in `served` and holds its permit until the task is awaited.
    fn queue_call(
        admission: &Admission,
        served: &Served,
        label: &'static str,
        kind: RequestKind,
        opens: bool,
    ) -> tokio::task::JoinHandle<Result<Permit, Shed>> {
        let (admission, served) = (admission.clone(), served.clone());
        tokio::spawn(request_scope(kind, async move {
            if opens {
                opens_session();
            }
            let permit = admission.admit().await?;
            served.lock().unwrap().push(label);
            Ok(permit)
        }))
    }

    /// A freed slot goes to queued work of open sessions before a new session that queued
    /// earlier; the new session gets the next one.
    #[tokio::test]
    async fn new_sessions_wait_for_the_work_of_open_ones() {
        let admission = Admission::default();
        let limit = admission.snapshot().0;
        let mut held = futures_held(&admission, limit).await;
        let served = Served::default();
        let session = queue_call(
            &admission,
            &served,
            "new session",
            RequestKind::AddsWork,
            true,
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
        let acquire = queue_call(&admission, &served, "acquire", RequestKind::AddsWork, false);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(admission.snapshot().1, 2, "both queued");
        drop(held.pop());
        let _acquire = acquire.await.unwrap().expect("served");
        assert_eq!(*served.lock().unwrap(), ["acquire"]);
        drop(held.pop());
        let _session = session.await.unwrap().expect("served next");
        assert_eq!(*served.lock().unwrap(), ["acquire", "new session"]);
    }

    /// Freed slots go to finishing work first (a release, a wait's clean-up), then to later
    /// calls of admitted requests, then to new requests, whatever order they queued in.
    #[tokio::test]
    async fn finishing_work_goes_first_then_admitted_then_new() {
        let admission = Admission::default();
        let limit = admission.snapshot().0;
        let mut held = futures_held(&admission, limit).await;
        let served = Served::default();
        let new = queue_call(
            &admission,
            &served,
            "new acquire",
            RequestKind::AddsWork,
            false,
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
        let admitted = queue_call(
            &admission,
            &served,
            "status read",
            RequestKind::Other,
            false,
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
        let clean_up = tokio::spawn({
            let (admission, served) = (admission.clone(), served.clone());
            async move {
                // Inside an acquire that was admitted: its clean-up is finishing work.
                request_scope(
                    RequestKind::AddsWork,
                    finishing(async {
                        let permit = admission.admit().await?;
                        served.lock().unwrap().push("wait's clean-up");
                        Ok::<_, Shed>(permit)
                    }),
                )
                .await
            }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        let release = queue_call(
            &admission,
            &served,
            "release",
            RequestKind::FinishesWork,
            false,
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(admission.snapshot().1, 4, "all queued");
        // One slot at a time, each handed over before the next is freed.
        for _ in 0..4 {
            drop(held.pop());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for task in [clean_up, release, admitted, new] {
            let served = tokio::time::timeout(Duration::from_secs(5), task).await;
            assert!(matches!(served, Ok(Ok(Ok(_)))), "every call served");
        }
        assert_eq!(
            *served.lock().unwrap(),
            ["wait's clean-up", "release", "status read", "new acquire"]
        );
    }

    /// A sustained overload does not become the baseline: however many slow answers come in,
    /// the limit stays down until etcd answers fast again.
    #[test]
    fn a_sustained_slowdown_keeps_the_limit_down() {
        let admission = Admission::default();
        admission.state().in_flight = 1024; // in use
        for _ in 0..200 {
            admission.observe(Duration::from_millis(2), false);
        }
        for _ in 0..20_000 {
            admission.observe(Duration::from_millis(400), false);
        }
        assert_eq!(admission.snapshot().0, MIN_LIMIT as usize);
        for _ in 0..200 {
            admission.observe(Duration::from_millis(2), false);
        }
        assert!(
            admission.snapshot().0 > 2 * MIN_LIMIT as usize,
            "grows again once etcd is fast"
        );
    }

    async fn futures_held(admission: &Admission, n: usize) -> Vec<Permit> {
        let mut held = Vec::new();
        for _ in 0..n {
            held.push(admission.admit().await.unwrap());
        }
        held
    }
}
