//! Operation histories and a safety checker for locks and fenced resources.
//!
//! Clients record every operation they run as an *invoke* event and a *completion* event
//! (acquire, renew, release, fenced write), each stamped from one monotonic clock (an
//! [`Instant`] shared by every clone of a [`Recorder`]; every client of a test runs on this
//! machine). Faults injected by a nemesis are recorded too. [`check`] then verifies, per lock:
//!
//! 1. **Token order**: tokens strictly increase in grant order (grants ordered by the time the
//!    acquire completed).
//! 2. **Mutual exclusion**: no two holds overlap. A hold runs from its acquire's completion to
//!    the earlier of its release's invocation and the moment its client learnt the hold was lost
//!    (the client-side lease timer ran out, or the server refused a renewal). A hold with no end
//!    recorded is open: it overlaps every later grant.
//! 3. **Fencing**: the lock's fenced resource never accepted a write whose token is lower than
//!    one it had already accepted (writes are checked in the order they were recorded, which is
//!    the resource's order: they are recorded while the resource is locked).
//! 4. **No stale success**: a renew or release of token `t` that was invoked after a grant of a
//!    larger token had completed did not succeed (that grant proves `t`'s hold was gone).
//! 5. **Nothing without quorum**: no acquire, renew or release both invoked and completed while
//!    an etcd quorum was known to be lost succeeded.
//!
//! A violation prints the minimal history involved (only the events that prove it).

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What happened, with the tokens involved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// An acquire was sent.
    AcquireInvoke,
    /// The acquire returned a hold with this token.
    AcquireOk {
        /// The fencing token granted.
        token: u64,
    },
    /// The acquire failed (nothing held).
    AcquireFail {
        /// Why, in short (`unavailable(store_unavailable)`, `lock_held`, ...).
        error: String,
    },
    /// An explicit renewal of `token` was sent.
    RenewInvoke {
        /// The token renewed.
        token: u64,
    },
    /// The server confirmed `token` still holds.
    RenewOk {
        /// The token renewed.
        token: u64,
    },
    /// The renewal failed.
    RenewFail {
        /// The token renewed.
        token: u64,
        /// Why, in short.
        error: String,
    },
    /// A release of `token` was sent: from here on the client no longer counts on the hold.
    ReleaseInvoke {
        /// The token released.
        token: u64,
    },
    /// The server released the lock.
    ReleaseOk {
        /// The token released.
        token: u64,
    },
    /// The release failed (`not_holder` after a lost hold, or unavailable).
    ReleaseFail {
        /// The token released.
        token: u64,
        /// Why, in short.
        error: String,
    },
    /// The client learnt (or, for a stopped process, is known by its timer to have lost) that
    /// the hold of `token` is over.
    HoldLost {
        /// The token whose hold ended.
        token: u64,
        /// Why (`Expired`, `NotHolder`, ... or an estimate for a stopped process).
        reason: String,
    },
    /// A write carrying `token` was sent to the lock's fenced resource.
    WriteInvoke {
        /// The fencing token carried.
        token: u64,
    },
    /// The resource accepted it.
    WriteAccepted {
        /// The fencing token carried.
        token: u64,
    },
    /// The resource refused it as stale.
    WriteRejected {
        /// The fencing token carried.
        token: u64,
    },
    /// A fault began.
    FaultStart {
        /// What (`kill server 1`, `pause etcd m2`, ...).
        fault: String,
        /// True if no etcd quorum exists from this event to its `FaultEnd` (rule 5 applies).
        quorum_lost: bool,
    },
    /// The fault with the same op ended (healed).
    FaultEnd {
        /// What.
        fault: String,
    },
}

impl Kind {
    /// True for the first event of an operation.
    pub fn is_invoke(&self) -> bool {
        matches!(
            self,
            Kind::AcquireInvoke
                | Kind::RenewInvoke { .. }
                | Kind::ReleaseInvoke { .. }
                | Kind::WriteInvoke { .. }
        )
    }

    fn succeeded_with_token(&self) -> Option<u64> {
        match self {
            Kind::AcquireOk { token } | Kind::RenewOk { token } | Kind::ReleaseOk { token } => {
                Some(*token)
            }
            _ => None,
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Kind::AcquireInvoke => write!(f, "acquire invoke"),
            Kind::AcquireOk { token } => write!(f, "acquire ok token={token}"),
            Kind::AcquireFail { error } => write!(f, "acquire fail: {error}"),
            Kind::RenewInvoke { token } => write!(f, "renew invoke token={token}"),
            Kind::RenewOk { token } => write!(f, "renew ok token={token}"),
            Kind::RenewFail { token, error } => write!(f, "renew fail token={token}: {error}"),
            Kind::ReleaseInvoke { token } => write!(f, "release invoke token={token}"),
            Kind::ReleaseOk { token } => write!(f, "release ok token={token}"),
            Kind::ReleaseFail { token, error } => {
                write!(f, "release fail token={token}: {error}")
            }
            Kind::HoldLost { token, reason } => write!(f, "hold lost token={token} ({reason})"),
            Kind::WriteInvoke { token } => write!(f, "fenced write invoke token={token}"),
            Kind::WriteAccepted { token } => write!(f, "fenced write ACCEPTED token={token}"),
            Kind::WriteRejected { token } => write!(f, "fenced write rejected token={token}"),
            Kind::FaultStart { fault, quorum_lost } => write!(
                f,
                "fault start: {fault}{}",
                if *quorum_lost { " (no quorum)" } else { "" }
            ),
            Kind::FaultEnd { fault } => write!(f, "fault end: {fault}"),
        }
    }
}

/// One recorded event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Position in the history (recording order).
    pub index: usize,
    /// Time since the recorder started, on its monotonic clock.
    pub at: Duration,
    /// Pairs an invoke with its completion (and a fault's start with its end).
    pub op: u64,
    /// Who (`c3`, `nemesis`, `paused-process`).
    pub client: String,
    /// The lock, which also names its fenced resource (empty for faults).
    pub lock: String,
    /// What happened.
    pub kind: Kind,
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:>9.3}s  #{:<5} op {:<5} {:<14} {:<8} {}",
            self.at.as_secs_f64(),
            self.index,
            self.op,
            self.client,
            self.lock,
            self.kind
        )
    }
}

/// An operation in progress: complete it with [`Recorder::complete`].
#[derive(Debug, Clone)]
pub struct Op {
    id: u64,
    client: String,
    lock: String,
}

impl Op {
    /// The op id shared by the invoke and its completion.
    pub fn id(&self) -> u64 {
        self.id
    }
}

#[derive(Debug, Default)]
struct Log {
    events: Vec<Event>,
    next_op: u64,
}

/// Records events from many tasks on one clock. Cheap to clone; clones share the history.
#[derive(Debug, Clone)]
pub struct Recorder {
    start: Instant,
    log: Arc<Mutex<Log>>,
}

impl Default for Recorder {
    fn default() -> Self {
        Self::new()
    }
}

impl Recorder {
    /// A recorder whose clock starts now.
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
            log: Arc::default(),
        }
    }

    /// Time since the recorder started.
    pub fn now(&self) -> Duration {
        self.start.elapsed()
    }

    /// `instant` on this recorder's clock (zero if before its start).
    pub fn at(&self, instant: Instant) -> Duration {
        instant.saturating_duration_since(self.start)
    }

    fn log(&self) -> std::sync::MutexGuard<'_, Log> {
        // A panicking recorder thread leaves a consistent Vec; keep recording.
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, at: Option<Duration>, op: u64, client: &str, lock: &str, kind: Kind) {
        let mut log = self.log();
        // The clock is read under the lock, so recording order is time order (except for
        // events given an explicit time).
        let at = at.unwrap_or_else(|| self.now());
        let index = log.events.len();
        log.events.push(Event {
            index,
            at,
            op,
            client: client.to_owned(),
            lock: lock.to_owned(),
            kind,
        });
    }

    fn next_op(&self) -> u64 {
        let mut log = self.log();
        log.next_op += 1;
        log.next_op
    }

    /// Records the start of an operation (or a fault) and returns its handle.
    pub fn invoke(&self, client: &str, lock: &str, kind: Kind) -> Op {
        let op = Op {
            id: self.next_op(),
            client: client.to_owned(),
            lock: lock.to_owned(),
        };
        self.push(None, op.id, client, lock, kind);
        op
    }

    /// Records the completion of `op`.
    pub fn complete(&self, op: &Op, kind: Kind) {
        self.push(None, op.id, &op.client, &op.lock, kind);
    }

    /// Records the completion of `op` at an explicit time (an estimate made later).
    pub fn complete_at(&self, op: &Op, at: Duration, kind: Kind) {
        self.push(Some(at), op.id, &op.client, &op.lock, kind);
    }

    /// Records a standalone event (a hold lost) now.
    pub fn record(&self, client: &str, lock: &str, kind: Kind) {
        let op = self.next_op();
        self.push(None, op, client, lock, kind);
    }

    /// Records a standalone event with an explicit time: for facts learnt after the fact, such
    /// as the timer expiry of a process that was stopped.
    pub fn record_at(&self, at: Duration, client: &str, lock: &str, kind: Kind) {
        let op = self.next_op();
        self.push(Some(at), op, client, lock, kind);
    }

    /// Records the start of a fault; end it with [`Recorder::fault_end`].
    pub fn fault_start(&self, fault: impl Into<String>, quorum_lost: bool) -> Op {
        self.invoke(
            "nemesis",
            "",
            Kind::FaultStart {
                fault: fault.into(),
                quorum_lost,
            },
        )
    }

    /// Records the end (heal) of a fault.
    pub fn fault_end(&self, op: &Op) {
        let fault = {
            let log = self.log();
            log.events
                .iter()
                .find_map(|e| match &e.kind {
                    Kind::FaultStart { fault, .. } if e.op == op.id => Some(fault.clone()),
                    _ => None,
                })
                .unwrap_or_default()
        };
        self.complete(op, Kind::FaultEnd { fault });
    }

    /// A copy of the history so far.
    pub fn events(&self) -> Vec<Event> {
        self.log().events.clone()
    }

    /// Checks the history so far; see [`check`].
    pub fn check(&self) -> Result<Summary, Violations> {
        check(&self.events())
    }
}

/// Which rule a violation breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// Rule 1: a grant completed later carries a token not above an earlier grant's.
    TokenOrder,
    /// Rule 2: two holds of one lock overlap.
    Overlap,
    /// Rule 3: the fenced resource accepted a token lower than one it had accepted.
    StaleWriteAccepted,
    /// Rule 4: a renew or release succeeded for a token superseded before it was invoked.
    StaleTokenSucceeded,
    /// Rule 5: an operation succeeded while etcd had no quorum.
    SuccessWithoutQuorum,
}

/// One violation with the minimal history that shows it.
#[derive(Debug, Clone)]
pub struct Violation {
    /// The rule broken.
    pub rule: Rule,
    /// What is wrong, in one sentence.
    pub what: String,
    /// The events involved, in time order.
    pub events: Vec<Event>,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{:?}: {}", self.rule, self.what)?;
        for e in &self.events {
            writeln!(f, "    {e}")?;
        }
        Ok(())
    }
}

/// Every violation found (at least one).
#[derive(Debug, Clone)]
pub struct Violations(pub Vec<Violation>);

impl Violations {
    /// True if some violation breaks `rule`.
    pub fn has(&self, rule: Rule) -> bool {
        self.0.iter().any(|v| v.rule == rule)
    }
}

impl fmt::Display for Violations {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{} safety violation(s):", self.0.len())?;
        for v in self.0.iter().take(10) {
            write!(f, "{v}")?;
        }
        if self.0.len() > 10 {
            writeln!(f, "... and {} more", self.0.len() - 10)?;
        }
        Ok(())
    }
}

impl std::error::Error for Violations {}

/// The figures of a history that passed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Operations invoked (acquire, renew, release, fenced write).
    pub operations: usize,
    /// Acquires that returned a hold.
    pub grants: usize,
    /// Acquires that failed.
    pub failed_acquires: usize,
    /// Faults injected.
    pub faults: usize,
    /// Holds that ended by loss (timer, `not_holder`) rather than release.
    pub holds_lost: usize,
    /// Fenced writes accepted.
    pub writes_accepted: usize,
    /// Fenced writes rejected as stale.
    pub writes_rejected: usize,
    /// Lock operations invoked and completed inside a no-quorum window (all failed).
    pub ops_without_quorum: usize,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "operations {}, grants {}, faults injected {}, violations: 0 \
             (failed acquires {}, holds lost {}, fenced writes accepted {} / rejected {}, \
             ops during no quorum {})",
            self.operations,
            self.grants,
            self.faults,
            self.failed_acquires,
            self.holds_lost,
            self.writes_accepted,
            self.writes_rejected,
            self.ops_without_quorum
        )
    }
}

fn by_time(mut events: Vec<Event>) -> Vec<Event> {
    events.sort_by_key(|e| (e.at, e.index));
    events
}

struct Hold<'a> {
    grant: &'a Event,
    token: u64,
    end_event: Option<&'a Event>,
}

impl Hold<'_> {
    fn end(&self) -> Duration {
        self.end_event.map_or(Duration::MAX, |e| e.at)
    }

    fn events(&self) -> Vec<Event> {
        std::iter::once(self.grant)
            .chain(self.end_event)
            .cloned()
            .collect()
    }
}

/// Checks a history against the five rules of this module; returns its figures or every
/// violation with the events that show it.
pub fn check(events: &[Event]) -> Result<Summary, Violations> {
    let mut violations = Vec::new();
    let invokes: HashMap<u64, &Event> = events
        .iter()
        .filter(|e| e.kind.is_invoke())
        .map(|e| (e.op, e))
        .collect();
    let locks: BTreeSet<&str> = events
        .iter()
        .filter(|e| !e.lock.is_empty())
        .map(|e| e.lock.as_str())
        .collect();

    for lock in locks {
        let of_lock: Vec<&Event> = events.iter().filter(|e| e.lock == lock).collect();
        let mut grants: Vec<(&Event, u64)> = of_lock
            .iter()
            .filter_map(|e| match e.kind {
                Kind::AcquireOk { token } => Some((*e, token)),
                _ => None,
            })
            .collect();
        grants.sort_by_key(|(e, _)| (e.at, e.index));

        // 1. Tokens strictly increase in grant order.
        for pair in grants.windows(2) {
            let ((a, ta), (b, tb)) = (pair[0], pair[1]);
            if tb <= ta {
                violations.push(Violation {
                    rule: Rule::TokenOrder,
                    what: format!(
                        "lock {lock}: token {tb} was granted after token {ta}, not above it"
                    ),
                    events: vec![a.clone(), b.clone()],
                });
            }
        }

        // 2. Holds do not overlap.
        let mut holds: Vec<Hold> = grants
            .iter()
            .map(|&(grant, token)| {
                let end_event = of_lock
                    .iter()
                    .filter(|e| e.client == grant.client && e.at >= grant.at)
                    .filter(|e| match &e.kind {
                        Kind::ReleaseInvoke { token: t } | Kind::HoldLost { token: t, .. } => {
                            *t == token
                        }
                        _ => false,
                    })
                    .min_by_key(|e| (e.at, e.index))
                    .copied();
                Hold {
                    grant,
                    token,
                    end_event,
                }
            })
            .collect();
        holds.sort_by_key(|h| (h.grant.at, h.grant.index));
        let mut latest: Option<&Hold> = None; // the hold seen so far that ends last
        for hold in &holds {
            if let Some(prev) = latest
                && hold.grant.at < prev.end()
            {
                let mut involved = prev.events();
                involved.extend(hold.events());
                violations.push(Violation {
                    rule: Rule::Overlap,
                    what: format!(
                        "lock {lock}: {} was granted token {} while {} still held token {}{}",
                        hold.grant.client,
                        hold.token,
                        prev.grant.client,
                        prev.token,
                        if prev.end_event.is_none() {
                            " (its hold never ended)"
                        } else {
                            ""
                        }
                    ),
                    events: by_time(involved),
                });
            }
            if latest.is_none_or(|prev| hold.end() > prev.end()) {
                latest = Some(hold);
            }
        }

        // 3. The fenced resource never accepts a token below one it accepted (resource order =
        // recording order).
        let mut highest: Option<(&Event, u64)> = None;
        for e in &of_lock {
            if let Kind::WriteAccepted { token } = e.kind {
                match highest {
                    Some((prev, top)) if token < top => violations.push(Violation {
                        rule: Rule::StaleWriteAccepted,
                        what: format!(
                            "resource {lock} accepted token {token} after it had accepted {top}"
                        ),
                        events: vec![prev.clone(), (*e).clone()],
                    }),
                    Some((_, top)) if token <= top => {}
                    _ => highest = Some((e, token)),
                }
            }
        }

        // 4. No renew or release of a token succeeds once a larger token's grant had completed
        // before it was invoked.
        for e in &of_lock {
            let token = match e.kind {
                Kind::RenewOk { token } | Kind::ReleaseOk { token } => token,
                _ => continue,
            };
            let Some(invoke) = invokes.get(&e.op) else {
                continue;
            };
            if let Some(&(later, newer)) =
                grants.iter().find(|(g, t)| *t > token && g.at <= invoke.at)
            {
                violations.push(Violation {
                    rule: Rule::StaleTokenSucceeded,
                    what: format!(
                        "lock {lock}: token {token} was still honoured after token {newer} had \
                         been granted"
                    ),
                    events: by_time(vec![later.clone(), (*invoke).clone(), (*e).clone()]),
                });
            }
        }
    }

    // 5. Nothing succeeds while quorum is lost.
    let mut ops_without_quorum = 0;
    for start in events {
        let Kind::FaultStart {
            quorum_lost: true, ..
        } = start.kind
        else {
            continue;
        };
        let end = events
            .iter()
            .find(|e| e.op == start.op && matches!(e.kind, Kind::FaultEnd { .. }));
        let until = end.map_or(Duration::MAX, |e| e.at);
        for done in events {
            let Some(invoke) = invokes.get(&done.op) else {
                continue;
            };
            if done.kind.is_invoke()
                || matches!(invoke.kind, Kind::WriteInvoke { .. })
                || invoke.at < start.at
                || done.at > until
            {
                continue;
            }
            ops_without_quorum += 1;
            if done.kind.succeeded_with_token().is_some() {
                let mut involved = vec![start.clone(), (*invoke).clone(), done.clone()];
                involved.extend(end.cloned());
                violations.push(Violation {
                    rule: Rule::SuccessWithoutQuorum,
                    what: format!(
                        "{} succeeded on lock {} while etcd had no quorum",
                        done.client, done.lock
                    ),
                    events: by_time(involved),
                });
            }
        }
    }

    if !violations.is_empty() {
        return Err(Violations(violations));
    }
    let count = |f: fn(&Kind) -> bool| events.iter().filter(|e| f(&e.kind)).count();
    Ok(Summary {
        operations: count(Kind::is_invoke),
        grants: count(|k| matches!(k, Kind::AcquireOk { .. })),
        failed_acquires: count(|k| matches!(k, Kind::AcquireFail { .. })),
        faults: count(|k| matches!(k, Kind::FaultStart { .. })),
        holds_lost: count(|k| matches!(k, Kind::HoldLost { .. })),
        writes_accepted: count(|k| matches!(k, Kind::WriteAccepted { .. })),
        writes_rejected: count(|k| matches!(k, Kind::WriteRejected { .. })),
        ops_without_quorum,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a history by hand with explicit times in milliseconds.
    #[derive(Default)]
    struct Hand {
        events: Vec<Event>,
    }

    impl Hand {
        fn at(mut self, ms: u64, op: u64, client: &str, lock: &str, kind: Kind) -> Self {
            self.events.push(Event {
                index: self.events.len(),
                at: Duration::from_millis(ms),
                op,
                client: client.into(),
                lock: lock.into(),
                kind,
            });
            self
        }

        /// A whole hold: acquire invoke/ok at `from`, a write, then release at `to`.
        fn hold(self, from: u64, to: u64, op: u64, client: &str, lock: &str, token: u64) -> Self {
            self.at(
                from.saturating_sub(5),
                op,
                client,
                lock,
                Kind::AcquireInvoke,
            )
            .at(from, op, client, lock, Kind::AcquireOk { token })
            .at(from + 1, op + 1, client, lock, Kind::WriteInvoke { token })
            .at(
                from + 2,
                op + 1,
                client,
                lock,
                Kind::WriteAccepted { token },
            )
            .at(to, op + 2, client, lock, Kind::ReleaseInvoke { token })
            .at(to + 3, op + 2, client, lock, Kind::ReleaseOk { token })
        }
    }

    #[test]
    fn a_correct_history_passes() {
        let h = Hand::default()
            .hold(10, 100, 1, "a", "x", 5)
            .hold(110, 200, 10, "b", "x", 9)
            // Another lock overlapping in time is fine.
            .hold(50, 150, 20, "c", "y", 6)
            // A stale write rejected is fine.
            .at(210, 30, "a", "x", Kind::WriteInvoke { token: 5 })
            .at(211, 30, "a", "x", Kind::WriteRejected { token: 5 })
            // A hold that ended by the timer before the next grant.
            .at(300, 40, "c", "x", Kind::AcquireInvoke)
            .at(305, 40, "c", "x", Kind::AcquireOk { token: 12 })
            .at(
                900,
                41,
                "c",
                "x",
                Kind::HoldLost {
                    token: 12,
                    reason: "Expired".into(),
                },
            )
            .at(950, 50, "a", "x", Kind::AcquireInvoke)
            .at(1000, 50, "a", "x", Kind::AcquireOk { token: 14 })
            .at(1010, 51, "a", "x", Kind::ReleaseInvoke { token: 14 });
        let summary = check(&h.events).expect("passes");
        assert_eq!(summary.grants, 5);
        assert_eq!(summary.writes_accepted, 3);
        assert_eq!(summary.writes_rejected, 1);
        assert_eq!(summary.holds_lost, 1);
        assert!(
            summary
                .to_string()
                .starts_with("operations 13, grants 5, faults injected 0, violations: 0")
        );
    }

    #[test]
    fn overlapping_holds_fail_with_just_those_events() {
        let h = Hand::default()
            .hold(10, 100, 1, "a", "x", 5)
            .hold(90, 200, 10, "b", "x", 9) // granted before a released
            .hold(300, 400, 20, "c", "x", 11);
        let err = check(&h.events).unwrap_err();
        // a's release also succeeded after b's grant: rule 4 sees that too.
        assert_eq!(err.0.len(), 2, "{err}");
        assert!(err.has(Rule::StaleTokenSucceeded), "{err}");
        let overlap = err
            .0
            .iter()
            .find(|v| v.rule == Rule::Overlap)
            .expect("overlap");
        let shown: Vec<_> = overlap.events.iter().map(|e| e.index).collect();
        // a's grant (1) and release invoke (4), b's grant (7): sorted by time, then b's end (10).
        assert_eq!(shown, [1, 7, 4, 10], "{err}");
        let printed = err.to_string();
        assert!(printed.contains("b was granted token 9 while a still held token 5"));
        assert!(!printed.contains("token=11"), "unrelated events: {printed}");
    }

    #[test]
    fn a_hold_that_never_ends_overlaps_the_next_grant() {
        let h = Hand::default()
            .at(0, 1, "a", "x", Kind::AcquireInvoke)
            .at(10, 1, "a", "x", Kind::AcquireOk { token: 5 })
            .hold(5000, 5100, 10, "b", "x", 9);
        let err = check(&h.events).unwrap_err();
        assert!(err.has(Rule::Overlap));
        assert!(err.to_string().contains("never ended"), "{err}");
    }

    #[test]
    fn a_token_that_does_not_increase_fails() {
        let h = Hand::default()
            .hold(10, 100, 1, "a", "x", 9)
            .hold(200, 300, 10, "b", "x", 5);
        let err = check(&h.events).unwrap_err();
        assert!(err.has(Rule::TokenOrder), "{err}");
        // Equal is not increasing either.
        let h = Hand::default()
            .hold(10, 100, 1, "a", "x", 9)
            .hold(200, 300, 10, "b", "x", 9);
        assert!(check(&h.events).unwrap_err().has(Rule::TokenOrder));
    }

    #[test]
    fn an_accepted_stale_write_fails() {
        let h = Hand::default()
            .hold(10, 100, 1, "a", "x", 5)
            .hold(200, 300, 10, "b", "x", 9)
            // a, paused, writes late with its old token and the resource takes it.
            .at(400, 20, "a", "x", Kind::WriteInvoke { token: 5 })
            .at(401, 20, "a", "x", Kind::WriteAccepted { token: 5 });
        let err = check(&h.events).unwrap_err();
        assert!(err.has(Rule::StaleWriteAccepted), "{err}");
        assert_eq!(err.0.len(), 1);
        let printed = err.to_string();
        assert!(printed.contains("accepted token 5 after it had accepted 9"));
        assert_eq!(err.0[0].events.len(), 2);
    }

    #[test]
    fn a_release_succeeding_after_a_newer_grant_fails() {
        let h = Hand::default()
            .at(0, 1, "a", "x", Kind::AcquireInvoke)
            .at(10, 1, "a", "x", Kind::AcquireOk { token: 5 })
            .at(
                3000,
                2,
                "a",
                "x",
                Kind::HoldLost {
                    token: 5,
                    reason: "Expired".into(),
                },
            )
            .hold(4000, 4100, 10, "b", "x", 9)
            .at(4050, 20, "a", "x", Kind::ReleaseInvoke { token: 5 })
            .at(4060, 20, "a", "x", Kind::ReleaseOk { token: 5 });
        let err = check(&h.events).unwrap_err();
        assert!(err.has(Rule::StaleTokenSucceeded), "{err}");
    }

    #[test]
    fn a_grant_without_quorum_fails() {
        let h = Hand::default()
            .hold(10, 100, 1, "a", "x", 5)
            .at(
                200,
                10,
                "nemesis",
                "",
                Kind::FaultStart {
                    fault: "kill 2 of 3".into(),
                    quorum_lost: true,
                },
            )
            .at(300, 11, "b", "x", Kind::AcquireInvoke)
            .at(
                350,
                11,
                "b",
                "x",
                Kind::AcquireFail {
                    error: "503".into(),
                },
            )
            .hold(400, 500, 20, "c", "x", 9)
            .at(
                900,
                10,
                "nemesis",
                "",
                Kind::FaultEnd {
                    fault: "kill 2 of 3".into(),
                },
            );
        let err = check(&h.events).unwrap_err();
        assert!(err.has(Rule::SuccessWithoutQuorum), "{err}");
        // Only c's acquire is blamed (its release too), not b's failure.
        assert!(
            err.0
                .iter()
                .all(|v| v.events.iter().all(|e| e.client != "b"))
        );
    }
}
