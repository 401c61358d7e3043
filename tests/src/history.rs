//! Operation histories and a safety checker for locks, leases and fenced resources.
//!
//! Clients record every operation they run as an *invoke* event and a *completion* event
//! (acquire, renew, release, lease grant and revoke, status read, fenced write), each stamped
//! from one monotonic clock (an [`Instant`] shared by every clone of a [`Recorder`]; every client
//! of a test runs on this machine). Faults injected by a nemesis are recorded too.
//!
//! # Holds as clients were told them
//!
//! A *hold* runs from the completion of a successful acquire (the client was told "granted") to
//! the first of: its client invokes the release; its client learns the hold is lost
//! ([`Kind::HoldLost`]: the client-side lease timer ran out, or the server refused a renewal);
//! for a hold under an explicit lease, the lease's revoke is invoked or its client stops keeping
//! the lease ([`Kind::LeaseEnded`]). Those events are recorded when the client notices, so a hold
//! end is never earlier than the truth. A hold with no end recorded is open.
//!
//! # Unknown outcomes
//!
//! An acquire that failed with `unavailable` (503), a transport error, a lost lease, or anything
//! else that does not prove nothing was granted, is *indeterminate* ([`is_indeterminate`]): the
//! server may have written a waiter key that becomes the holder, and no client knows its token.
//! It is not a hold (nobody was told), but it may explain a holder nobody was told of, for a
//! bounded time (rule 7).
//!
//! # Rules
//!
//! [`check`] verifies, per lock:
//!
//! 1. **Token order**: tokens strictly increase in grant order (grants ordered by the time the
//!    acquire completed). For a semaphore ([`Kind::Semaphore`]), whose holders are granted
//!    side by side and whose grants may complete out of token order: no token is granted twice,
//!    and a grant's token is above every token whose grant completed before its acquire was
//!    invoked.
//! 2. **Mutual exclusion**: no two holds overlap; for a semaphore of N, no more than N holds
//!    overlap at any time ([`Rule::OverLimit`]).
//! 3. **Fencing**: (a) the lock's fenced resource never accepted a write whose token is lower than
//!    one it had already accepted (writes are checked in the order they were recorded, which is
//!    the resource's order: they are recorded while the resource is locked); (b) a write the
//!    client sent after checking its hold ([`Kind::WriteInvoke`]) and the resource accepted was
//!    sent inside that client's hold of that token. Writes sent without a check (a process that
//!    was stopped between its check and its write, [`Kind::UncheckedWriteInvoke`]) are subject
//!    to (a) only: fencing is what protects the resource from them.
//! 4. **No stale success**: a renew or release of token `t` that was invoked after a grant of a
//!    larger token had completed did not succeed (that grant proves `t`'s hold was gone). Not
//!    for a semaphore (a larger token's grant proves nothing there).
//! 5. **Nothing without quorum**: no acquire, renew, release, lease grant, revoke or status read
//!    both invoked and completed while an etcd quorum was known to be lost succeeded.
//! 6. **Nothing under a dead lease**: no acquire or renew under a lease succeeded if it was
//!    invoked after the lease was known dead: its revoke was confirmed, the server had answered
//!    `lease_not_found` for it, or its client had stopped keeping it alive more than
//!    [`Limits::expiry_bound`] earlier.
//! 7. **No untold holder** (no phantom): every holder a client observed (the holder named in a
//!    `lock_held` answer, or by a status read) is explained. A holder token `t`, read at some
//!    moment between the observing operation's invoke and completion, is explained if some
//!    acquire of that lock (by the client the holder's owner label names, when it has one) may
//!    have had a waiter key then: from the acquire's invoke until its key is certainly gone.
//!    - The told key (token `t` of a grant) is gone once its release was confirmed, else when its
//!      lease is: a confirmed revoke, `lease_not_found`, or one expiry bound after its client
//!      stopped keeping the lease alive (for a lease of its own, the hold's end).
//!    - Any other key of the acquire is gone (every acquire, granted or not, may have sent
//!      attempts that got no answer before its last one, and the history cannot tell): under a
//!      lease of its own, one expiry bound after the client gave that lease up (the failure, or
//!      the hold's end: the client revokes it then, or leaves it to expire); under a
//!      shared lease, at the lease's death or, unless a server replica was killed meanwhile,
//!      [`Limits::clean_up_within`] after the acquire's end (the server retries the clean-up of
//!      an abandoned attempt until etcd confirms it).
//!
//!    Every bound waits for quiet first: a request sent while a fault is active may land when
//!    the fault heals (a stalled member applies what it held), and an etcd leader change
//!    re-arms every lease, so a bound that would fall in or after a fault restarts at its end.
//!    Unexplained means a hold nobody was told of blocked others past every such bound.
//!
//! A violation prints the minimal history involved (only the events that prove it).

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What happened, with the tokens involved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// An acquire was sent under a lease of its own (the client grants it first and revokes it
    /// when the acquire fails or the lock is released).
    AcquireInvoke,
    /// An acquire was sent under the explicit lease `lease` (granted earlier, possibly shared by
    /// several locks).
    AcquireUnder {
        /// The lease id.
        lease: String,
    },
    /// The acquire returned a hold with this token.
    AcquireOk {
        /// The fencing token granted.
        token: u64,
    },
    /// The acquire failed with `lock_held`: nothing of it remains. The server named the holder
    /// it read (at some moment between invoke and completion), if any.
    AcquireHeld {
        /// The holder's token, if the answer named one.
        holder: Option<u64>,
        /// The holder's owner label, if it had one (clients label their acquires with their
        /// name, so it says whose acquire made the key).
        owner: Option<String>,
    },
    /// The acquire failed otherwise; [`is_indeterminate`] says whether it may have granted.
    AcquireFail {
        /// Why, in short (`unavailable(store_unavailable)`, `lease_not_found`, ...).
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
    /// A lease grant was sent (recorded with an empty lock).
    LeaseGrantInvoke,
    /// The lease was granted.
    LeaseGrantOk {
        /// The lease id.
        lease: String,
        /// The TTL the server granted.
        ttl_ms: u64,
    },
    /// The lease grant failed.
    LeaseGrantFail {
        /// Why, in short.
        error: String,
    },
    /// A revoke of `lease` was sent: from here on its client no longer counts on holds under it.
    RevokeInvoke {
        /// The lease id.
        lease: String,
    },
    /// The server confirmed the revoke (or that the lease was gone already).
    RevokeOk {
        /// The lease id.
        lease: String,
    },
    /// The revoke failed.
    RevokeFail {
        /// The lease id.
        lease: String,
        /// Why, in short.
        error: String,
    },
    /// The client stopped keeping `lease` alive and no longer counts on it: its timer ran out,
    /// the server said it is gone, or the client revoked, detached or dropped it.
    LeaseEnded {
        /// The lease id.
        lease: String,
        /// Why, in short.
        reason: String,
    },
    /// A lock status read was sent.
    StatusInvoke,
    /// The status named this holder (`None`: free).
    StatusOk {
        /// The holder's token.
        holder: Option<u64>,
        /// The holder's owner label, if it had one.
        owner: Option<String>,
    },
    /// The status read failed.
    StatusFail {
        /// Why, in short.
        error: String,
    },
    /// A write carrying `token` was sent to the lock's fenced resource by a client that had just
    /// checked its hold (`is_held()`) with nothing in between.
    WriteInvoke {
        /// The fencing token carried.
        token: u64,
    },
    /// A write carrying `token` was sent without checking the hold first: a process stopped
    /// between its check and its write, writing when it wakes up.
    UncheckedWriteInvoke {
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
        /// True if a server replica was killed (its background clean-ups die with it).
        server_killed: bool,
    },
    /// The fault with the same op ended (healed).
    FaultEnd {
        /// What.
        fault: String,
    },
    /// Lock `lock` is a semaphore of `limit` holders (every acquire of it gives that limit).
    /// Recorded once, before its first acquire; a lock without it is a mutex.
    Semaphore {
        /// Holders at once.
        limit: u32,
    },
}

impl Kind {
    /// True for the first event of an operation.
    pub fn is_invoke(&self) -> bool {
        matches!(
            self,
            Kind::AcquireInvoke
                | Kind::AcquireUnder { .. }
                | Kind::RenewInvoke { .. }
                | Kind::ReleaseInvoke { .. }
                | Kind::LeaseGrantInvoke
                | Kind::RevokeInvoke { .. }
                | Kind::StatusInvoke
                | Kind::WriteInvoke { .. }
                | Kind::UncheckedWriteInvoke { .. }
        )
    }

    fn is_acquire_invoke(&self) -> bool {
        matches!(self, Kind::AcquireInvoke | Kind::AcquireUnder { .. })
    }

    fn is_write_invoke(&self) -> bool {
        matches!(
            self,
            Kind::WriteInvoke { .. } | Kind::UncheckedWriteInvoke { .. }
        )
    }

    /// True for a completion that says the operation succeeded against etcd.
    fn succeeded(&self) -> bool {
        matches!(
            self,
            Kind::AcquireOk { .. }
                | Kind::RenewOk { .. }
                | Kind::ReleaseOk { .. }
                | Kind::LeaseGrantOk { .. }
                | Kind::RevokeOk { .. }
                | Kind::StatusOk { .. }
        )
    }
}

/// True if an acquire that failed with `error` may still have granted (or queued) at the server:
/// everything except the answers that prove nothing of it remains (`lock_held` is its own event,
/// [`Kind::AcquireHeld`]). Unknown errors count as indeterminate.
pub fn is_indeterminate(error: &str) -> bool {
    const NOTHING_REMAINS: &[&str] = &[
        "lock_held",
        "lease_not_found",
        "not_holder",
        "forbidden",
        "invalid",
        "quota",
        "unauthorized",
    ];
    !NOTHING_REMAINS.iter().any(|p| error.starts_with(p))
}

fn lease_not_found(error: &str) -> bool {
    error.starts_with("lease_not_found") || error.contains("LeaseNotFound")
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Kind::AcquireInvoke => write!(f, "acquire invoke"),
            Kind::AcquireUnder { lease } => write!(f, "acquire invoke under lease {lease}"),
            Kind::AcquireOk { token } => write!(f, "acquire ok token={token}"),
            Kind::AcquireHeld { holder, owner } => match holder {
                Some(token) => write!(
                    f,
                    "acquire fail: lock_held by token={token}{}",
                    owner
                        .as_ref()
                        .map(|o| format!(" ({o})"))
                        .unwrap_or_default()
                ),
                None => write!(f, "acquire fail: lock_held"),
            },
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
            Kind::LeaseGrantInvoke => write!(f, "lease grant invoke"),
            Kind::LeaseGrantOk { lease, ttl_ms } => {
                write!(f, "lease grant ok lease={lease} ttl={ttl_ms}ms")
            }
            Kind::LeaseGrantFail { error } => write!(f, "lease grant fail: {error}"),
            Kind::RevokeInvoke { lease } => write!(f, "revoke invoke lease={lease}"),
            Kind::RevokeOk { lease } => write!(f, "revoke ok lease={lease}"),
            Kind::RevokeFail { lease, error } => write!(f, "revoke fail lease={lease}: {error}"),
            Kind::LeaseEnded { lease, reason } => write!(f, "lease ended lease={lease} ({reason})"),
            Kind::StatusInvoke => write!(f, "status invoke"),
            Kind::StatusOk { holder, owner } => match holder {
                Some(token) => write!(
                    f,
                    "status ok: held by token={token}{}",
                    owner
                        .as_ref()
                        .map(|o| format!(" ({o})"))
                        .unwrap_or_default()
                ),
                None => write!(f, "status ok: free"),
            },
            Kind::StatusFail { error } => write!(f, "status fail: {error}"),
            Kind::WriteInvoke { token } => write!(f, "fenced write invoke token={token}"),
            Kind::UncheckedWriteInvoke { token } => {
                write!(f, "fenced write invoke (unchecked) token={token}")
            }
            Kind::WriteAccepted { token } => write!(f, "fenced write ACCEPTED token={token}"),
            Kind::WriteRejected { token } => write!(f, "fenced write rejected token={token}"),
            Kind::FaultStart {
                fault, quorum_lost, ..
            } => write!(
                f,
                "fault start: {fault}{}",
                if *quorum_lost { " (no quorum)" } else { "" }
            ),
            Kind::FaultEnd { fault } => write!(f, "fault end: {fault}"),
            Kind::Semaphore { limit } => write!(f, "semaphore of {limit} holders"),
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
    /// The lock, which also names its fenced resource (empty for faults and lease operations).
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
        self.invoke_at(None, client, lock, kind)
    }

    fn invoke_at(&self, at: Option<Duration>, client: &str, lock: &str, kind: Kind) -> Op {
        let op = Op {
            id: self.next_op(),
            client: client.to_owned(),
            lock: lock.to_owned(),
        };
        self.push(at, op.id, client, lock, kind);
        op
    }

    /// Records the start of an operation at an explicit time (known only after the fact).
    pub fn invoke_earlier(&self, at: Duration, client: &str, lock: &str, kind: Kind) -> Op {
        self.invoke_at(Some(at), client, lock, kind)
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
                server_killed: false,
            },
        )
    }

    /// Records the start of a fault that kills a server replica (its in-memory work, such as
    /// clean-ups it was retrying, dies with it); end it with [`Recorder::fault_end`].
    pub fn server_kill_start(&self, fault: impl Into<String>) -> Op {
        self.invoke(
            "nemesis",
            "",
            Kind::FaultStart {
                fault: fault.into(),
                quorum_lost: false,
                server_killed: true,
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Rule {
    /// Rule 1: a grant completed later carries a token not above an earlier grant's.
    TokenOrder,
    /// Rule 2: two holds of one lock overlap.
    Overlap,
    /// Rule 2 for a semaphore of N: more than N holds of one lock overlap.
    OverLimit,
    /// Rule 3a: the fenced resource accepted a token lower than one it had accepted.
    StaleWriteAccepted,
    /// Rule 3b: the resource accepted a checked write sent outside its writer's hold.
    WriteOutsideHold,
    /// Rule 4: a renew or release succeeded for a token superseded before it was invoked.
    StaleTokenSucceeded,
    /// Rule 5: an operation succeeded while etcd had no quorum.
    SuccessWithoutQuorum,
    /// Rule 6: an acquire or renew under a lease known to be dead succeeded.
    DeadLeaseGranted,
    /// Rule 7: a client saw a holder that no acquire can explain (a phantom holder).
    UntoldHolder,
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

    /// The set of rules broken.
    pub fn rules(&self) -> BTreeSet<Rule> {
        self.0.iter().map(|v| v.rule).collect()
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
    /// Operations invoked (acquire, renew, release, lease grant, revoke, status, fenced write).
    pub operations: usize,
    /// Acquires that returned a hold.
    pub grants: usize,
    /// Acquires that failed (any reason).
    pub failed_acquires: usize,
    /// Acquires whose outcome is unknown (503, transport error, lost lease...), or that never
    /// completed.
    pub indeterminate: usize,
    /// Faults injected.
    pub faults: usize,
    /// Holds that ended by loss (timer, `not_holder`) rather than release.
    pub holds_lost: usize,
    /// Fenced writes accepted.
    pub writes_accepted: usize,
    /// Fenced writes rejected as stale.
    pub writes_rejected: usize,
    /// Operations invoked and completed inside a no-quorum window (all failed).
    pub ops_without_quorum: usize,
    /// Explicit leases granted.
    pub leases_granted: usize,
    /// Lease revokes confirmed.
    pub leases_revoked: usize,
    /// Holders observed by clients (named by `lock_held` answers and status reads).
    pub holders_seen: usize,
    /// Of those, tokens no client was ever told (explained by acquires of unknown outcome).
    pub untold_seen: usize,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "operations {}, grants {}, indeterminate {}, faults injected {}, violations: 0 \
             (failed acquires {}, holds lost {}, fenced writes accepted {} / rejected {}, \
             ops during no quorum {}, leases granted {} / revoked {}, holders seen {} ({} never \
             told))",
            self.operations,
            self.grants,
            self.indeterminate,
            self.faults,
            self.failed_acquires,
            self.holds_lost,
            self.writes_accepted,
            self.writes_rejected,
            self.ops_without_quorum,
            self.leases_granted,
            self.leases_revoked,
            self.holders_seen,
            self.untold_seen
        )
    }
}

/// The timing assumptions of rules 6 and 7 (see the module doc).
#[derive(Debug, Clone)]
pub struct Limits {
    /// The TTL of a lease the history does not name (a lock acquired under a lease of its own).
    pub ttl: Duration,
    /// Added to every "certainly gone by" bound: a new etcd leader extends every lease by an
    /// election timeout (1 s), etcd checks for expired leases every 500 ms and commits their
    /// revocation through raft, and processes on a loaded machine are scheduled late.
    pub slack: Duration,
    /// How long after answering an acquire of unknown outcome (once no fault is active) a server
    /// has confirmed its clean-up: retries back off to 5 s, each bounded by `--etcd-timeout`.
    pub clean_up_within: Duration,
}

impl Default for Limits {
    /// TTL 2 s, slack 3 s, clean-up within 8 s.
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(2),
            slack: Duration::from_secs(3),
            clean_up_within: Duration::from_secs(8),
        }
    }
}

impl Limits {
    /// How long after its client stopped keeping a lease of `ttl` alive (with no fault active)
    /// the lease is certainly gone: `ttl + slack`.
    pub fn expiry_bound(&self, ttl: Duration) -> Duration {
        ttl + self.slack
    }
}

fn by_time(mut events: Vec<Event>) -> Vec<Event> {
    events.sort_by_key(|e| (e.at, e.index));
    events.dedup_by_key(|e| e.index);
    events
}

/// A fault window on the history's clock.
struct Fault<'a> {
    start: &'a Event,
    end: Option<&'a Event>,
    quorum_lost: bool,
    server_killed: bool,
}

impl Fault<'_> {
    fn until(&self) -> Duration {
        self.end.map_or(Duration::MAX, |e| e.at)
    }
}

/// What the history says about one explicit lease.
#[derive(Default)]
struct LeaseFacts<'a> {
    ttl: Option<Duration>,
    /// The first confirmed revoke.
    revoked: Option<&'a Event>,
    /// The first answer saying the lease is gone.
    not_found: Option<&'a Event>,
    /// The first `RevokeInvoke` or `LeaseEnded`: the client stops counting on holds under it.
    given_up: Option<&'a Event>,
    /// The first `LeaseEnded`: its keeper stopped.
    ended: Option<&'a Event>,
}

/// One acquire operation.
struct Acquire<'a> {
    invoke: &'a Event,
    done: Option<&'a Event>,
    lease: Option<&'a str>,
}

impl Acquire<'_> {
    fn granted(&self) -> Option<u64> {
        match self.done.map(|e| &e.kind) {
            Some(Kind::AcquireOk { token }) => Some(*token),
            _ => None,
        }
    }

    fn unknown(&self) -> bool {
        match self.done.map(|e| &e.kind) {
            None => true,
            Some(Kind::AcquireFail { error }) => is_indeterminate(error),
            _ => false,
        }
    }
}

struct Hold<'a> {
    grant: &'a Event,
    token: u64,
    lease: Option<&'a str>,
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

/// The whole history, indexed.
struct History<'a> {
    events: &'a [Event],
    limits: &'a Limits,
    invokes: HashMap<u64, &'a Event>,
    completions: HashMap<u64, &'a Event>,
    faults: Vec<Fault<'a>>,
    leases: HashMap<&'a str, LeaseFacts<'a>>,
}

impl<'a> History<'a> {
    fn new(events: &'a [Event], limits: &'a Limits) -> Self {
        let mut invokes = HashMap::new();
        let mut completions = HashMap::new();
        for e in events {
            if e.kind.is_invoke() {
                invokes.insert(e.op, e);
            } else if !matches!(e.kind, Kind::FaultStart { .. }) {
                completions.entry(e.op).or_insert(e);
            }
        }
        let faults = events
            .iter()
            .filter_map(|start| match start.kind {
                Kind::FaultStart {
                    quorum_lost,
                    server_killed,
                    ..
                } => Some(Fault {
                    start,
                    end: events
                        .iter()
                        .find(|e| e.op == start.op && matches!(e.kind, Kind::FaultEnd { .. })),
                    quorum_lost,
                    server_killed,
                }),
                _ => None,
            })
            .collect();
        let mut history = Self {
            events,
            limits,
            invokes,
            completions,
            faults,
            leases: HashMap::new(),
        };
        history.leases = history.lease_facts();
        history
    }

    /// The lease an acquire op ran under, if explicit.
    fn lease_of_acquire(&self, op: u64) -> Option<&'a str> {
        match self.invokes.get(&op).map(|e| &e.kind) {
            Some(Kind::AcquireUnder { lease }) => Some(lease.as_str()),
            _ => None,
        }
    }

    fn lease_facts(&self) -> HashMap<&'a str, LeaseFacts<'a>> {
        let mut leases: HashMap<&'a str, LeaseFacts<'a>> = HashMap::new();
        let first = |slot: &mut Option<&'a Event>, e: &'a Event| {
            if slot.is_none_or(|s| (e.at, e.index) < (s.at, s.index)) {
                *slot = Some(e);
            }
        };
        for e in self.events {
            match &e.kind {
                Kind::LeaseGrantOk { lease, ttl_ms } => {
                    leases.entry(lease).or_default().ttl = Some(Duration::from_millis(*ttl_ms));
                }
                Kind::RevokeOk { lease } => first(&mut leases.entry(lease).or_default().revoked, e),
                Kind::RevokeInvoke { lease } => {
                    first(&mut leases.entry(lease).or_default().given_up, e)
                }
                Kind::LeaseEnded { lease, reason } => {
                    let facts = leases.entry(lease).or_default();
                    first(&mut facts.given_up, e);
                    first(&mut facts.ended, e);
                    if lease_not_found(reason) {
                        first(&mut facts.not_found, e);
                    }
                }
                Kind::AcquireFail { error } if lease_not_found(error) => {
                    if let Some(lease) = self.lease_of_acquire(e.op) {
                        first(&mut leases.entry(lease).or_default().not_found, e);
                    }
                }
                _ => {}
            }
        }
        leases
    }

    /// The earliest time by which something that needs `quiet` without faults after `t` (a
    /// lease expiring, a clean-up being confirmed) is certainly done: a fault active at `t`
    /// postpones the start to its end, and a fault starting before the time is up starts it over.
    fn settled(&self, t: Duration, quiet: Duration) -> Duration {
        let mut from = t;
        loop {
            if from == Duration::MAX {
                return Duration::MAX;
            }
            if let Some(f) = self
                .faults
                .iter()
                .filter(|f| f.start.at <= from && from < f.until())
                .max_by_key(|f| f.until())
            {
                from = f.until();
                continue;
            }
            let done = from.saturating_add(quiet);
            match self
                .faults
                .iter()
                .filter(|f| from < f.start.at && f.start.at < done)
                .min_by_key(|f| f.start.at)
            {
                Some(f) => from = f.start.at,
                None => return done,
            }
        }
    }

    fn expiry(&self, ttl: Option<Duration>) -> Duration {
        self.limits.expiry_bound(ttl.unwrap_or(self.limits.ttl))
    }

    /// When lease `lease` is known dead, from what the history shows: a confirmed revoke, a
    /// `lease_not_found`, or one expiry bound after everything that kept it alive stopped (its
    /// keeper, and every hold under it that began before). `holds` are every hold of the
    /// history.
    fn lease_dead_at(&self, lease: &str, holds: &[Hold<'_>]) -> Duration {
        let Some(facts) = self.leases.get(lease) else {
            return Duration::MAX;
        };
        let certain = [facts.revoked, facts.not_found]
            .into_iter()
            .flatten()
            .map(|e| e.at)
            .min()
            .unwrap_or(Duration::MAX);
        let expired = match facts.ended {
            None => Duration::MAX,
            Some(ended) => {
                let kept_until = holds
                    .iter()
                    .filter(|h| h.lease == Some(lease) && h.grant.at <= ended.at)
                    .map(Hold::end)
                    .fold(ended.at, Duration::max);
                self.settled(kept_until, self.expiry(facts.ttl))
            }
        };
        certain.min(expired)
    }

    fn acquires_of(&self, of_lock: &[&'a Event]) -> Vec<Acquire<'a>> {
        of_lock
            .iter()
            .filter(|e| e.kind.is_acquire_invoke())
            .map(|invoke| Acquire {
                invoke,
                done: self.completions.get(&invoke.op).copied(),
                lease: self.lease_of_acquire(invoke.op),
            })
            .collect()
    }

    /// Every hold of lock `lock` (events `of_lock`), as its client was told it.
    fn holds_of(&self, of_lock: &[&'a Event]) -> Vec<Hold<'a>> {
        let mut holds: Vec<Hold<'a>> = of_lock
            .iter()
            .filter_map(|grant| {
                let Kind::AcquireOk { token } = grant.kind else {
                    return None;
                };
                let lease = self.lease_of_acquire(grant.op);
                let own_end = of_lock
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
                // The client stops counting on every hold under a lease it revokes or gives up,
                // even one whose grant it hears of afterwards.
                let lease_end = lease
                    .and_then(|l| self.leases.get(l))
                    .and_then(|facts| facts.given_up);
                let end_event = [own_end, lease_end]
                    .into_iter()
                    .flatten()
                    .min_by_key(|e| (e.at, e.index));
                Some(Hold {
                    grant,
                    token,
                    lease,
                    end_event,
                })
            })
            .collect();
        holds.sort_by_key(|h| (h.grant.at, h.grant.index));
        holds
    }
}

/// Checks a history against the rules of this module with the default [`Limits`]; returns its
/// figures or every violation with the events that show it.
pub fn check(events: &[Event]) -> Result<Summary, Violations> {
    check_with(events, &Limits::default())
}

/// [`check`] with explicit timing assumptions.
pub fn check_with(events: &[Event], limits: &Limits) -> Result<Summary, Violations> {
    let history = History::new(events, limits);
    let mut violations = Vec::new();
    let locks: BTreeSet<&str> = events
        .iter()
        .filter(|e| !e.lock.is_empty())
        .map(|e| e.lock.as_str())
        .collect();
    let per_lock: Vec<(&str, Vec<&Event>)> = locks
        .iter()
        .map(|lock| (*lock, events.iter().filter(|e| e.lock == *lock).collect()))
        .collect();
    let all_holds: Vec<Hold> = per_lock
        .iter()
        .flat_map(|(_, of_lock)| history.holds_of(of_lock))
        .collect();
    let mut holders_seen = 0;
    let mut untold_seen = 0;

    for (lock, of_lock) in &per_lock {
        let lock = *lock;
        let holds = history.holds_of(of_lock);
        match semaphore_limit(of_lock) {
            None => {
                token_order(lock, &holds, &mut violations);
                mutual_exclusion(lock, &holds, &mut violations);
                stale_success(&history, lock, of_lock, &holds, &mut violations);
            }
            // Holders overlap and hold different tokens, so a renew of a smaller token after a
            // larger one's grant is normal (no rule 4), and grants may complete out of token
            // order: rule 1 compares a grant only with the holds granted before its acquire
            // was invoked.
            Some(limit) => {
                semaphore_token_order(&history, lock, &holds, &mut violations);
                holder_limit(lock, &holds, limit, &mut violations);
            }
        }
        fencing(&history, lock, of_lock, &holds, &mut violations);
        dead_lease(&history, lock, of_lock, &holds, &all_holds, &mut violations);
        let (seen, untold) =
            untold_holders(&history, lock, of_lock, &holds, &all_holds, &mut violations);
        holders_seen += seen;
        untold_seen += untold;
    }
    let ops_without_quorum = no_quorum(&history, &mut violations);

    if !violations.is_empty() {
        return Err(Violations(violations));
    }
    let count = |f: fn(&Kind) -> bool| events.iter().filter(|e| f(&e.kind)).count();
    let acquires: Vec<Acquire> = events
        .iter()
        .filter(|e| e.kind.is_acquire_invoke())
        .map(|invoke| Acquire {
            invoke,
            done: history.completions.get(&invoke.op).copied(),
            lease: None,
        })
        .collect();
    Ok(Summary {
        operations: count(Kind::is_invoke),
        grants: count(|k| matches!(k, Kind::AcquireOk { .. })),
        failed_acquires: count(|k| {
            matches!(k, Kind::AcquireFail { .. } | Kind::AcquireHeld { .. })
        }),
        indeterminate: acquires.iter().filter(|a| a.unknown()).count(),
        faults: count(|k| matches!(k, Kind::FaultStart { .. })),
        holds_lost: count(|k| matches!(k, Kind::HoldLost { .. })),
        writes_accepted: count(|k| matches!(k, Kind::WriteAccepted { .. })),
        writes_rejected: count(|k| matches!(k, Kind::WriteRejected { .. })),
        ops_without_quorum,
        leases_granted: count(|k| matches!(k, Kind::LeaseGrantOk { .. })),
        leases_revoked: count(|k| matches!(k, Kind::RevokeOk { .. })),
        holders_seen,
        untold_seen,
    })
}

/// The most holds of one lock that overlapped at once, holds as the checker sees them (from
/// the grant to the first end its client recorded: release invoke, loss, lease given up): how
/// much a semaphore workload actually exercised its limit.
pub fn most_holds_at_once(events: &[Event]) -> usize {
    let limits = Limits::default();
    let history = History::new(events, &limits);
    let locks: BTreeSet<&str> = events
        .iter()
        .filter(|e| !e.lock.is_empty())
        .map(|e| e.lock.as_str())
        .collect();
    let mut most = 0;
    for lock in locks {
        let of_lock: Vec<&Event> = events.iter().filter(|e| e.lock == lock).collect();
        let holds = history.holds_of(&of_lock);
        for hold in &holds {
            let at_once = holds
                .iter()
                .filter(|h| h.grant.at <= hold.grant.at && hold.grant.at < h.end())
                .count();
            most = most.max(at_once);
        }
    }
    most
}

/// Rule 1: tokens strictly increase in grant order (`holds` are sorted by grant).
fn token_order(lock: &str, holds: &[Hold], violations: &mut Vec<Violation>) {
    for pair in holds.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        if b.token <= a.token {
            violations.push(Violation {
                rule: Rule::TokenOrder,
                what: format!(
                    "lock {lock}: token {} was granted after token {}, not above it",
                    b.token, a.token
                ),
                events: vec![a.grant.clone(), b.grant.clone()],
            });
        }
    }
}

/// Rule 2: holds do not overlap.
fn mutual_exclusion(lock: &str, holds: &[Hold], violations: &mut Vec<Violation>) {
    let mut latest: Option<&Hold> = None; // the hold seen so far that ends last
    for hold in holds {
        if let Some(prev) = latest
            && hold.grant.at < prev.end()
            && hold.grant.at < hold.end()
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
}

/// The limit a lock was declared with ([`Kind::Semaphore`]), if above 1.
fn semaphore_limit(of_lock: &[&Event]) -> Option<usize> {
    of_lock
        .iter()
        .find_map(|e| match e.kind {
            Kind::Semaphore { limit } => Some(limit as usize),
            _ => None,
        })
        .filter(|limit| *limit > 1)
}

/// Rule 1 for a semaphore: tokens are never granted twice, and a grant's token is above every
/// token whose grant had completed before this grant's acquire was invoked (its key was created
/// after that invoke, hence after every key already granted).
fn semaphore_token_order(
    history: &History,
    lock: &str,
    holds: &[Hold],
    violations: &mut Vec<Violation>,
) {
    for (i, hold) in holds.iter().enumerate() {
        let invoked = history
            .invokes
            .get(&hold.grant.op)
            .map_or(hold.grant.at, |e| e.at);
        if let Some(earlier) = holds[..i]
            .iter()
            .find(|e| e.token == hold.token || (e.grant.at < invoked && e.token > hold.token))
        {
            violations.push(Violation {
                rule: Rule::TokenOrder,
                what: format!(
                    "lock {lock}: token {} was granted after token {} had been, not above it",
                    hold.token, earlier.token
                ),
                events: vec![earlier.grant.clone(), hold.grant.clone()],
            });
        }
    }
}

/// Rule 2 for a semaphore of `limit`: at no time do more than `limit` holds overlap. Reports
/// each grant that made one too many, with the holds it overlapped.
fn holder_limit(lock: &str, holds: &[Hold], limit: usize, violations: &mut Vec<Violation>) {
    for (i, hold) in holds.iter().enumerate() {
        if hold.end() <= hold.grant.at {
            continue; // ended as it began
        }
        // Holds granted before this one (sorted by grant) that had not ended when it began.
        let live: Vec<&Hold> = holds[..i]
            .iter()
            .filter(|h| hold.grant.at < h.end() && h.grant.at < h.end())
            .collect();
        if live.len() >= limit {
            let mut involved: Vec<Event> = live.iter().flat_map(|h| h.events()).collect();
            involved.extend(hold.events());
            violations.push(Violation {
                rule: Rule::OverLimit,
                what: format!(
                    "lock {lock} (a semaphore of {limit}): {} was granted token {} while {} \
                     others held (tokens {:?})",
                    hold.grant.client,
                    hold.token,
                    live.len(),
                    live.iter().map(|h| h.token).collect::<Vec<_>>()
                ),
                events: by_time(involved),
            });
        }
    }
}

/// Rule 3: (a) the fenced resource never accepts a token below one it accepted (resource order =
/// recording order); (b) an accepted checked write lies inside its writer's hold.
fn fencing(
    history: &History,
    lock: &str,
    of_lock: &[&Event],
    holds: &[Hold],
    violations: &mut Vec<Violation>,
) {
    let mut highest: Option<(&Event, u64)> = None;
    for e in of_lock {
        let Kind::WriteAccepted { token } = e.kind else {
            continue;
        };
        match highest {
            Some((prev, top)) if token < top => violations.push(Violation {
                rule: Rule::StaleWriteAccepted,
                what: format!("resource {lock} accepted token {token} after it had accepted {top}"),
                events: vec![prev.clone(), (*e).clone()],
            }),
            Some((_, top)) if token <= top => {}
            _ => highest = Some((e, token)),
        }
        let Some(invoke) = history.invokes.get(&e.op) else {
            continue;
        };
        if !matches!(invoke.kind, Kind::WriteInvoke { .. }) {
            continue; // unchecked: fencing alone protects the resource from it
        }
        let mine: Vec<&Hold> = holds
            .iter()
            .filter(|h| h.token == token && h.grant.client == invoke.client)
            .collect();
        if mine
            .iter()
            .any(|h| h.grant.at <= invoke.at && invoke.at <= h.end())
        {
            continue;
        }
        let mut involved: Vec<Event> = mine.iter().flat_map(|h| h.events()).collect();
        involved.extend([(*invoke).clone(), (*e).clone()]);
        violations.push(Violation {
            rule: Rule::WriteOutsideHold,
            what: format!(
                "resource {lock} accepted a write of {} with token {token} sent {}",
                invoke.client,
                if mine.is_empty() {
                    "with a token it was never granted"
                } else {
                    "outside its hold"
                }
            ),
            events: by_time(involved),
        });
    }
}

/// Rule 4: no renew or release of a token succeeds once a larger token's grant had completed before
/// it was invoked.
fn stale_success(
    history: &History,
    lock: &str,
    of_lock: &[&Event],
    holds: &[Hold],
    violations: &mut Vec<Violation>,
) {
    for e in of_lock {
        let token = match e.kind {
            Kind::RenewOk { token } | Kind::ReleaseOk { token } => token,
            _ => continue,
        };
        let Some(invoke) = history.invokes.get(&e.op) else {
            continue;
        };
        if let Some(later) = holds
            .iter()
            .find(|h| h.token > token && h.grant.at <= invoke.at)
        {
            violations.push(Violation {
                rule: Rule::StaleTokenSucceeded,
                what: format!(
                    "lock {lock}: token {token} was still honoured after token {} had been \
                     granted",
                    later.token
                ),
                events: by_time(vec![later.grant.clone(), (*invoke).clone(), (*e).clone()]),
            });
        }
    }
}

/// Rule 5: nothing succeeds while quorum is lost. Returns how many operations ran inside such a
/// window.
fn no_quorum(history: &History, violations: &mut Vec<Violation>) -> usize {
    let mut ops_without_quorum = 0;
    for fault in history.faults.iter().filter(|f| f.quorum_lost) {
        for done in history.events {
            let Some(invoke) = history.invokes.get(&done.op) else {
                continue;
            };
            if done.kind.is_invoke()
                || invoke.kind.is_write_invoke()
                || invoke.at < fault.start.at
                || done.at > fault.until()
            {
                continue;
            }
            ops_without_quorum += 1;
            if done.kind.succeeded() {
                let mut involved = vec![fault.start.clone(), (*invoke).clone(), done.clone()];
                involved.extend(fault.end.cloned());
                violations.push(Violation {
                    rule: Rule::SuccessWithoutQuorum,
                    what: format!(
                        "{} succeeded{} while etcd had no quorum",
                        done.client,
                        if done.lock.is_empty() {
                            String::new()
                        } else {
                            format!(" on lock {}", done.lock)
                        }
                    ),
                    events: by_time(involved),
                });
            }
        }
    }
    ops_without_quorum
}

/// Rule 6: no acquire or renew under a lease succeeds if invoked after the lease was known dead.
fn dead_lease(
    history: &History,
    lock: &str,
    of_lock: &[&Event],
    holds: &[Hold],
    all_holds: &[Hold],
    violations: &mut Vec<Violation>,
) {
    for e in of_lock {
        let (lease, what) = match e.kind {
            Kind::AcquireOk { token } => (
                history.lease_of_acquire(e.op),
                format!("granted token {token}"),
            ),
            Kind::RenewOk { token } => (
                holds
                    .iter()
                    .find(|h| h.token == token && h.grant.client == e.client)
                    .and_then(|h| h.lease),
                format!("renewed token {token}"),
            ),
            _ => continue,
        };
        let (Some(lease), Some(invoke)) = (lease, history.invokes.get(&e.op)) else {
            continue;
        };
        let dead_at = history.lease_dead_at(lease, all_holds);
        if invoke.at <= dead_at {
            continue;
        }
        let facts = &history.leases[lease];
        let mut involved: Vec<Event> = [facts.revoked, facts.not_found, facts.ended]
            .into_iter()
            .flatten()
            .filter(|d| d.at <= invoke.at)
            .cloned()
            .collect();
        involved.extend([(*invoke).clone(), (*e).clone()]);
        violations.push(Violation {
            rule: Rule::DeadLeaseGranted,
            what: format!(
                "lock {lock}: {} was {what} under lease {lease}, asked for after the lease was \
                 known dead (at {:.3}s)",
                e.client,
                dead_at.as_secs_f64()
            ),
            events: by_time(involved),
        });
    }
}

/// How long an acquire's key may have existed.
struct Explanation<'a> {
    acquire: &'a Acquire<'a>,
    /// Any token, until here (keys of attempts that got no answer).
    any_until: Duration,
    /// The told token, until here.
    told: Option<(u64, Duration)>,
}

impl Explanation<'_> {
    /// Until when this acquire may have had a key with token `token`.
    fn until(&self, token: u64) -> Duration {
        match self.told {
            // That key itself: gone once its release is confirmed.
            Some((t, gone)) if t == token => gone,
            _ => self.any_until,
        }
    }
}

/// Rule 7: every holder a client observed is explained by an acquire that may have had its key then.
/// Returns (holders observed, of which never told).
fn untold_holders(
    history: &History,
    lock: &str,
    of_lock: &[&Event],
    holds: &[Hold],
    all_holds: &[Hold],
    violations: &mut Vec<Violation>,
) -> (usize, usize) {
    let limits = history.limits;
    // For every acquire of this lock: its key (whatever its token) may exist from its invoke
    // until its completion; a granted key (the told token) or a key of unknown outcome, until
    // it is certainly gone.
    let acquires = history.acquires_of(of_lock);
    let mut explanations: Vec<Explanation> = Vec::new();
    for acquire in &acquires {
        let done_at = acquire.done.map_or(Duration::MAX, |e| e.at);
        let lease_dead = acquire
            .lease
            .map_or(Duration::MAX, |l| history.lease_dead_at(l, all_holds));
        // Any acquire may have run attempts that got no answer before its final one (the
        // client retries after a 503 or a timeout), so any of its keys may outlive it like a
        // key of unknown outcome: under its own lease, until that lease is gone (the client
        // revokes it after a failure, or lets it expire); under a shared lease, until the
        // server's clean-up is certainly confirmed (unless a replica was killed) or the lease
        // is gone.
        let unknown_gone = match acquire.lease {
            None => history.settled(done_at, history.expiry(None)),
            Some(_) => {
                let cleaned = history.settled(done_at, limits.clean_up_within + limits.slack);
                let replica_killed = history.faults.iter().any(|f| {
                    f.server_killed && acquire.invoke.at <= f.start.at && f.start.at <= cleaned
                });
                if replica_killed {
                    lease_dead
                } else {
                    lease_dead.min(cleaned)
                }
            }
        };
        let (any_until, told) = match acquire.granted() {
            None => (unknown_gone.max(done_at), None),
            Some(token) => {
                let hold = holds
                    .iter()
                    .find(|h| h.grant.op == acquire.invoke.op && h.token == token);
                let (told_gone, lease_gone) = match hold.and_then(|h| h.end_event.map(|e| (h, e))) {
                    None => (Duration::MAX, Duration::MAX), // held until the end of the history
                    Some((hold, end)) => {
                        let released = of_lock
                            .iter()
                            .filter(|e| e.client == hold.grant.client && e.at >= hold.grant.at)
                            .filter(
                                |e| matches!(e.kind, Kind::ReleaseOk { token: t } if t == token),
                            )
                            .map(|e| e.at)
                            .min()
                            .unwrap_or(Duration::MAX);
                        let lease_gone = match acquire.lease {
                            Some(_) => lease_dead,
                            None => history.settled(end.at, history.expiry(None)),
                        };
                        (released.min(lease_gone).max(done_at), lease_gone)
                    }
                };
                let any_until = match acquire.lease {
                    None => lease_gone,
                    Some(_) => unknown_gone,
                };
                (any_until.max(done_at), Some((token, told_gone)))
            }
        };
        explanations.push(Explanation {
            acquire,
            any_until,
            told,
        });
    }
    let told: BTreeSet<u64> = holds.iter().map(|h| h.token).collect();
    let (mut seen, mut untold) = (0, 0);
    for e in of_lock {
        let (token, owner) = match &e.kind {
            Kind::AcquireHeld {
                holder: Some(t),
                owner,
            }
            | Kind::StatusOk {
                holder: Some(t),
                owner,
            } => (*t, owner.as_deref()),
            _ => continue,
        };
        // The holder's owner label names the client whose acquire wrote the key.
        let candidate = |x: &&Explanation| {
            x.acquire.invoke.op != e.op // not its own key: that would be a grant
                && x.acquire.invoke.at <= e.at
                && owner.is_none_or(|o| o == x.acquire.invoke.client)
        };
        let Some(invoke) = history.invokes.get(&e.op) else {
            continue;
        };
        seen += 1;
        if !told.contains(&token) {
            untold += 1;
        }
        // The holder was read at some moment in [invoke, completion]; it is explained if some
        // acquire's key may have existed at one of those moments (and, if granted, is that token).
        let explained = explanations
            .iter()
            .filter(candidate)
            .any(|x| x.until(token) >= invoke.at);
        if explained {
            continue;
        }
        let mut involved = vec![(*invoke).clone(), (*e).clone()];
        // Show how the last candidates ended.
        for x in explanations.iter().filter(candidate).rev().take(3) {
            involved.push(x.acquire.invoke.clone());
            involved.extend(x.acquire.done.cloned());
        }
        violations.push(Violation {
            rule: Rule::UntoldHolder,
            what: format!(
                "lock {lock}: {} saw token {token} hold the lock, which no acquire explains \
                 then ({})",
                e.client,
                if told.contains(&token) {
                    "its hold had ended and its key should have been gone"
                } else {
                    "no client was told this token and no acquire of unknown outcome was recent \
                     enough"
                }
            ),
            events: by_time(involved),
        });
    }
    (seen, untold)
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

        /// An acquire invoked at `from` that failed at `to` with `error`.
        fn failed(
            self,
            from: u64,
            to: u64,
            op: u64,
            client: &str,
            lock: &str,
            error: &str,
        ) -> Self {
            self.at(from, op, client, lock, Kind::AcquireInvoke).at(
                to,
                op,
                client,
                lock,
                Kind::AcquireFail {
                    error: error.into(),
                },
            )
        }

        /// An acquire invoked at `from` that found the lock held by `holder` at `to`.
        fn held_by(
            self,
            from: u64,
            to: u64,
            op: u64,
            client: &str,
            lock: &str,
            holder: u64,
        ) -> Self {
            self.at(from, op, client, lock, Kind::AcquireInvoke).at(
                to,
                op,
                client,
                lock,
                Kind::AcquireHeld {
                    holder: Some(holder),
                    owner: None,
                },
            )
        }

        /// A lease granted at `at` with a 2 s TTL.
        fn lease(self, at: u64, op: u64, client: &str, lease: &str) -> Self {
            self.at(at.saturating_sub(3), op, client, "", Kind::LeaseGrantInvoke)
                .at(
                    at,
                    op,
                    client,
                    "",
                    Kind::LeaseGrantOk {
                        lease: lease.into(),
                        ttl_ms: 2000,
                    },
                )
        }

        /// A fault from `from` to `to`.
        fn fault(
            self,
            from: u64,
            to: u64,
            op: u64,
            quorum_lost: bool,
            server_killed: bool,
        ) -> Self {
            self.at(
                from,
                op,
                "nemesis",
                "",
                Kind::FaultStart {
                    fault: "a fault".into(),
                    quorum_lost,
                    server_killed,
                },
            )
            .at(
                to,
                op,
                "nemesis",
                "",
                Kind::FaultEnd {
                    fault: "a fault".into(),
                },
            )
        }

        fn rules(&self) -> BTreeSet<Rule> {
            match check(&self.events) {
                Ok(_) => BTreeSet::new(),
                Err(violations) => violations.rules(),
            }
        }
    }

    fn set(rules: &[Rule]) -> BTreeSet<Rule> {
        rules.iter().copied().collect()
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
            .at(1010, 51, "a", "x", Kind::ReleaseInvoke { token: 14 })
            // Someone saw the holder a was told of.
            .held_by(1002, 1008, 60, "d", "x", 14)
            .at(1004, 61, "d", "x", Kind::StatusInvoke)
            .at(
                1006,
                61,
                "d",
                "x",
                Kind::StatusOk {
                    holder: Some(14),
                    owner: Some("a".into()),
                },
            );
        let summary = check(&h.events).expect("passes");
        assert_eq!(summary.grants, 5);
        assert_eq!(summary.writes_accepted, 3);
        assert_eq!(summary.writes_rejected, 1);
        assert_eq!(summary.holds_lost, 1);
        assert_eq!(summary.holders_seen, 2);
        assert_eq!(summary.untold_seen, 0);
        assert!(
            summary.to_string().starts_with(
                "operations 15, grants 5, indeterminate 0, faults injected 0, violations: 0"
            ),
            "{summary}"
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
        assert_eq!(
            err.rules(),
            set(&[Rule::Overlap, Rule::StaleTokenSucceeded]),
            "{err}"
        );
        assert_eq!(err.0.len(), 2, "{err}");
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

    /// Lock `x` declared a semaphore of 3.
    fn semaphore_of_3() -> Hand {
        Hand::default().at(0, 999, "", "x", Kind::Semaphore { limit: 3 })
    }

    #[test]
    fn three_overlapping_holders_of_a_semaphore_of_three_pass() {
        let h = semaphore_of_3()
            .hold(10, 100, 1, "a", "x", 5)
            .hold(20, 110, 10, "b", "x", 6)
            .hold(30, 120, 20, "c", "x", 7)
            // Granted as a's hold ended (100): never more than three at once.
            .hold(105, 200, 30, "d", "x", 8);
        let summary = check(&h.events).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(summary.grants, 4);
    }

    /// The planted violation: a fourth holder while three hold.
    #[test]
    fn a_fourth_overlapping_holder_of_a_semaphore_of_three_fails() {
        let h = semaphore_of_3()
            .hold(10, 100, 1, "a", "x", 5)
            .hold(20, 110, 10, "b", "x", 6)
            .hold(30, 120, 20, "c", "x", 7)
            .hold(40, 130, 30, "d", "x", 8)
            .hold(300, 400, 40, "e", "x", 11);
        let err = check(&h.events).unwrap_err();
        assert_eq!(err.rules(), set(&[Rule::OverLimit]), "{err}");
        assert_eq!(err.0.len(), 1, "{err}");
        let printed = err.to_string();
        assert!(
            printed.contains("d was granted token 8 while 3 others held (tokens [5, 6, 7])"),
            "{printed}"
        );
        assert!(!printed.contains("token=11"), "unrelated events: {printed}");
        // The same history as a mutex breaks mutual exclusion.
        let as_mutex: Vec<Event> = h.events[1..].to_vec();
        assert!(check(&as_mutex).unwrap_err().has(Rule::Overlap));
    }

    #[test]
    fn semaphore_tokens_grow_from_one_invoke_to_the_next() {
        // b's acquire was invoked (5) before a's grant completed (10): b's smaller token,
        // granted later (20), is fine.
        let ok = semaphore_of_3()
            .at(1, 1, "a", "x", Kind::AcquireInvoke)
            .at(5, 2, "b", "x", Kind::AcquireInvoke)
            .at(10, 1, "a", "x", Kind::AcquireOk { token: 9 })
            .at(20, 2, "b", "x", Kind::AcquireOk { token: 7 })
            .at(50, 3, "a", "x", Kind::ReleaseInvoke { token: 9 })
            .at(55, 3, "a", "x", Kind::ReleaseOk { token: 9 })
            .at(60, 4, "b", "x", Kind::ReleaseInvoke { token: 7 })
            .at(65, 4, "b", "x", Kind::ReleaseOk { token: 7 });
        check(&ok.events).unwrap_or_else(|e| panic!("{e}"));
        // c's acquire was invoked (15) after a's grant (10): a token below a's is a violation,
        // and so is a token granted twice.
        let bad = ok
            .at(15, 5, "c", "x", Kind::AcquireInvoke)
            .at(30, 5, "c", "x", Kind::AcquireOk { token: 8 })
            .at(31, 6, "d", "x", Kind::AcquireInvoke)
            .at(35, 7, "c", "x", Kind::ReleaseInvoke { token: 8 })
            .at(40, 6, "d", "x", Kind::AcquireOk { token: 7 })
            .at(45, 8, "d", "x", Kind::ReleaseInvoke { token: 7 });
        let err = check(&bad.events).unwrap_err();
        assert_eq!(err.rules(), set(&[Rule::TokenOrder]), "{err}");
        assert_eq!(err.0.len(), 2, "{err}");
    }

    #[test]
    fn a_hold_that_never_ends_overlaps_the_next_grant() {
        let h = Hand::default()
            .at(0, 1, "a", "x", Kind::AcquireInvoke)
            .at(10, 1, "a", "x", Kind::AcquireOk { token: 5 })
            .hold(5000, 5100, 10, "b", "x", 9);
        let err = check(&h.events).unwrap_err();
        assert_eq!(err.rules(), set(&[Rule::Overlap]), "{err}");
        assert!(err.to_string().contains("never ended"), "{err}");
    }

    #[test]
    fn a_token_that_does_not_increase_fails() {
        // b's lower token is granted after a's; the resource then takes b's lower token too, and
        // b's release of it succeeds although 9 was granted before.
        let h = Hand::default()
            .hold(10, 100, 1, "a", "x", 9)
            .hold(200, 300, 10, "b", "x", 5);
        assert_eq!(
            h.rules(),
            set(&[
                Rule::TokenOrder,
                Rule::StaleWriteAccepted,
                Rule::StaleTokenSucceeded
            ])
        );
        // Equal is not increasing either (the resource refuses nothing it has not seen lower).
        let h = Hand::default()
            .hold(10, 100, 1, "a", "x", 9)
            .hold(200, 300, 10, "b", "x", 9);
        assert_eq!(h.rules(), set(&[Rule::TokenOrder]));
    }

    #[test]
    fn an_accepted_stale_write_fails() {
        let h = Hand::default()
            .hold(10, 100, 1, "a", "x", 5)
            .hold(200, 300, 10, "b", "x", 9)
            // a, paused, writes late with its old token (without checking) and the resource
            // takes it.
            .at(400, 20, "a", "x", Kind::UncheckedWriteInvoke { token: 5 })
            .at(401, 20, "a", "x", Kind::WriteAccepted { token: 5 });
        let err = check(&h.events).unwrap_err();
        assert_eq!(err.rules(), set(&[Rule::StaleWriteAccepted]), "{err}");
        assert_eq!(err.0.len(), 1);
        let printed = err.to_string();
        assert!(printed.contains("accepted token 5 after it had accepted 9"));
        assert_eq!(err.0[0].events.len(), 2);

        // The same write sent as a checked one was also sent outside a's hold.
        let h = Hand::default()
            .hold(10, 100, 1, "a", "x", 5)
            .hold(200, 300, 10, "b", "x", 9)
            .at(400, 20, "a", "x", Kind::WriteInvoke { token: 5 })
            .at(401, 20, "a", "x", Kind::WriteAccepted { token: 5 });
        assert_eq!(
            h.rules(),
            set(&[Rule::StaleWriteAccepted, Rule::WriteOutsideHold])
        );
    }

    #[test]
    fn an_accepted_write_outside_its_writers_hold_fails() {
        // a released at 100, then wrote (checked) at 150; nobody else wrote, so the resource's
        // token order alone cannot see it.
        let h = Hand::default()
            .hold(10, 100, 1, "a", "x", 5)
            .at(150, 20, "a", "x", Kind::WriteInvoke { token: 5 })
            .at(151, 20, "a", "x", Kind::WriteAccepted { token: 5 });
        let err = check(&h.events).unwrap_err();
        assert_eq!(err.rules(), set(&[Rule::WriteOutsideHold]), "{err}");
        assert!(err.to_string().contains("outside its hold"), "{err}");
        // After its timer ran out, likewise.
        let h = Hand::default()
            .at(0, 1, "a", "x", Kind::AcquireInvoke)
            .at(10, 1, "a", "x", Kind::AcquireOk { token: 5 })
            .at(
                1750,
                2,
                "a",
                "x",
                Kind::HoldLost {
                    token: 5,
                    reason: "Expired".into(),
                },
            )
            .at(1800, 3, "a", "x", Kind::WriteInvoke { token: 5 })
            .at(1801, 3, "a", "x", Kind::WriteAccepted { token: 5 });
        assert_eq!(h.rules(), set(&[Rule::WriteOutsideHold]));
        // A token its writer was never granted.
        let h = Hand::default()
            .hold(10, 100, 1, "a", "x", 5)
            .at(50, 20, "b", "x", Kind::WriteInvoke { token: 7 })
            .at(51, 20, "b", "x", Kind::WriteAccepted { token: 7 });
        let err = check(&h.events).unwrap_err();
        assert_eq!(err.rules(), set(&[Rule::WriteOutsideHold]), "{err}");
        assert!(err.to_string().contains("never granted"), "{err}");
        // A rejected one is fine; so is an unchecked one the resource accepted (rule 3a only).
        let h = Hand::default()
            .hold(10, 100, 1, "a", "x", 5)
            .at(150, 20, "a", "x", Kind::WriteInvoke { token: 5 })
            .at(151, 20, "a", "x", Kind::WriteRejected { token: 5 })
            .at(160, 21, "a", "x", Kind::UncheckedWriteInvoke { token: 5 })
            .at(161, 21, "a", "x", Kind::WriteRejected { token: 5 });
        assert_eq!(h.rules(), set(&[]));
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
        assert_eq!(h.rules(), set(&[Rule::StaleTokenSucceeded]));
    }

    #[test]
    fn a_grant_without_quorum_fails() {
        let h = Hand::default()
            .hold(10, 100, 1, "a", "x", 5)
            .fault(200, 900, 10, true, false)
            .failed(300, 350, 11, "b", "x", "unavailable(store_unavailable)")
            .hold(400, 500, 20, "c", "x", 9)
            // A lease granted in the window is no better.
            .lease(600, 30, "d", "L1");
        let err = check(&h.events).unwrap_err();
        assert_eq!(err.rules(), set(&[Rule::SuccessWithoutQuorum]), "{err}");
        // c's acquire and release, d's lease grant; not b's failure.
        assert_eq!(err.0.len(), 3, "{err}");
        assert!(
            err.0
                .iter()
                .all(|v| v.events.iter().all(|e| e.client != "b"))
        );
    }

    /// A lease's revoke ends its holds; an acquire under it asked after the revoke was confirmed
    /// must not succeed.
    #[test]
    fn a_grant_under_a_revoked_lease_fails() {
        let base = Hand::default()
            .lease(10, 1, "a", "L1")
            .at(20, 2, "a", "x", Kind::AcquireUnder { lease: "L1".into() })
            .at(30, 2, "a", "x", Kind::AcquireOk { token: 5 })
            .at(100, 3, "a", "", Kind::RevokeInvoke { lease: "L1".into() })
            .at(110, 3, "a", "", Kind::RevokeOk { lease: "L1".into() });
        // The revoke ended a's hold: b may hold from 120 on.
        let ok = Hand {
            events: base.events.clone(),
        }
        .hold(120, 200, 10, "b", "x", 9);
        assert_eq!(ok.rules(), set(&[]));
        // An acquire under L1 invoked after the confirmed revoke is granted: dead lease.
        let h = Hand {
            events: base.events.clone(),
        }
        .at(300, 20, "a", "y", Kind::AcquireUnder { lease: "L1".into() })
        .at(310, 20, "a", "y", Kind::AcquireOk { token: 12 });
        let err = check(&h.events).unwrap_err();
        assert_eq!(err.rules(), set(&[Rule::DeadLeaseGranted]), "{err}");
        assert!(err.to_string().contains("revoke ok lease=L1"), "{err}");
        // One invoked before the revoke was confirmed may legitimately succeed (the grant may
        // have come first); the hold counts as ended at the revoke's invoke.
        let h = Hand {
            events: base.events.clone(),
        }
        .at(105, 20, "a", "y", Kind::AcquireUnder { lease: "L1".into() })
        .at(130, 20, "a", "y", Kind::AcquireOk { token: 12 })
        .hold(140, 200, 30, "b", "y", 14);
        assert_eq!(h.rules(), set(&[]));
    }

    /// A lease its client stopped keeping alive is dead one expiry bound later (longer if a
    /// fault intervenes); and `lease_not_found` is proof at once.
    #[test]
    fn a_grant_under_an_expired_lease_fails() {
        let lost = |at: u64| {
            Hand::default().lease(10, 1, "a", "L1").at(
                at,
                2,
                "a",
                "",
                Kind::LeaseEnded {
                    lease: "L1".into(),
                    reason: "Expired".into(),
                },
            )
        };
        // Stopped keeping it at 1000: dead by 1000 + 2000 + 3000.
        let h = lost(1000)
            .at(7000, 3, "b", "x", Kind::AcquireUnder { lease: "L1".into() })
            .at(7010, 3, "b", "x", Kind::AcquireOk { token: 5 });
        assert_eq!(h.rules(), set(&[Rule::DeadLeaseGranted]));
        let h = lost(1000)
            .at(4000, 3, "b", "x", Kind::AcquireUnder { lease: "L1".into() })
            .at(4010, 3, "b", "x", Kind::AcquireOk { token: 5 });
        assert_eq!(h.rules(), set(&[]), "not certainly dead yet");
        // A fault active when it was given up postpones its expiry past the fault's end.
        let h = lost(1000)
            .fault(500, 3000, 9, false, false)
            .at(7000, 3, "b", "x", Kind::AcquireUnder { lease: "L1".into() })
            .at(7010, 3, "b", "x", Kind::AcquireOk { token: 5 });
        assert_eq!(h.rules(), set(&[]));
        // lease_not_found is proof at once.
        let h = Hand::default()
            .lease(10, 1, "a", "L1")
            .at(20, 2, "a", "x", Kind::AcquireUnder { lease: "L1".into() })
            .at(
                30,
                2,
                "a",
                "x",
                Kind::AcquireFail {
                    error: "lease_not_found".into(),
                },
            )
            .at(40, 3, "a", "y", Kind::AcquireUnder { lease: "L1".into() })
            .at(50, 3, "a", "y", Kind::AcquireOk { token: 5 });
        assert_eq!(h.rules(), set(&[Rule::DeadLeaseGranted]));
    }

    /// An acquire that answered 503 may have left a key nobody knows of; it may hold the lock
    /// for a bounded time, not longer.
    #[test]
    fn an_untold_holder_past_its_bound_is_a_phantom() {
        // a's acquire (own lease) failed with 503 at 1000: its key is gone by 1000 + 2000 + 3000.
        let base =
            || Hand::default().failed(0, 1000, 1, "a", "x", "unavailable(store_unavailable)");
        // b finds token 77, never told to anyone, holding the lock at 3000: legit.
        let h = base().held_by(3000, 3100, 10, "b", "x", 77);
        let summary = check(&h.events).expect("passes");
        assert_eq!((summary.indeterminate, summary.untold_seen), (1, 1));
        // At 7000: a phantom.
        let h = base().held_by(7000, 7100, 10, "b", "x", 77);
        let err = check(&h.events).unwrap_err();
        assert_eq!(err.rules(), set(&[Rule::UntoldHolder]), "{err}");
        assert!(
            err.to_string().contains("no client was told this token"),
            "{err}"
        );
        // A status read sees it just as well.
        let h = base().at(7000, 10, "b", "x", Kind::StatusInvoke).at(
            7010,
            10,
            "b",
            "x",
            Kind::StatusOk {
                holder: Some(77),
                owner: None,
            },
        );
        assert_eq!(h.rules(), set(&[Rule::UntoldHolder]));
        // A fault active at 1000 (a stalled member holds the enqueue until 4000) postpones it.
        let h = base()
            .fault(900, 4000, 9, false, false)
            .held_by(7000, 7100, 10, "b", "x", 77);
        assert_eq!(h.rules(), set(&[]));
        // A holder labelled with the name of a client that never asked for the lock is a
        // phantom at once (the owner label says whose acquire wrote the key).
        let h = base().at(1500, 10, "b", "x", Kind::AcquireInvoke).at(
            1600,
            10,
            "b",
            "x",
            Kind::AcquireHeld {
                holder: Some(77),
                owner: Some("z".into()),
            },
        );
        assert_eq!(h.rules(), set(&[Rule::UntoldHolder]));
        // Labelled with a's name, it is a's key of unknown outcome: explained.
        let h = base().at(1500, 10, "b", "x", Kind::AcquireInvoke).at(
            1600,
            10,
            "b",
            "x",
            Kind::AcquireHeld {
                holder: Some(77),
                owner: Some("a".into()),
            },
        );
        assert_eq!(h.rules(), set(&[]));
        // A waiter may be the head for a moment before its clean-up: seen during its acquire,
        // it is explained.
        let h = Hand::default()
            .at(0, 1, "a", "x", Kind::AcquireInvoke)
            .held_by(500, 600, 10, "b", "x", 77)
            .at(
                1000,
                1,
                "a",
                "x",
                Kind::AcquireHeld {
                    holder: Some(70),
                    owner: None,
                },
            )
            .hold(0, 300, 20, "c", "x", 70);
        assert_eq!(h.rules(), set(&[]));
    }

    /// Under a shared lease, an unknown outcome's key lasts until the server's clean-up (or the
    /// lease) is certainly done; a killed replica takes its clean-ups with it.
    #[test]
    fn an_untold_holder_under_a_shared_lease() {
        let base = || {
            Hand::default()
                .lease(10, 1, "a", "L1")
                .at(20, 2, "a", "x", Kind::AcquireUnder { lease: "L1".into() })
                .at(
                    1000,
                    2,
                    "a",
                    "x",
                    Kind::AcquireFail {
                        error: "unavailable(store_unavailable)".into(),
                    },
                )
        };
        // Clean-up within 8 s + 3 s slack after 1000: 12000.
        assert_eq!(
            base().held_by(10000, 10100, 10, "b", "x", 77).rules(),
            set(&[])
        );
        assert_eq!(
            base().held_by(13000, 13100, 10, "b", "x", 77).rules(),
            set(&[Rule::UntoldHolder])
        );
        // A replica killed meanwhile: only the lease bounds it (still alive here).
        assert_eq!(
            base()
                .fault(5000, 5500, 9, false, true)
                .held_by(20000, 20100, 10, "b", "x", 77)
                .rules(),
            set(&[])
        );
        // ...until the lease's revoke is confirmed.
        assert_eq!(
            base()
                .fault(5000, 5500, 9, false, true)
                .at(15000, 3, "a", "", Kind::RevokeInvoke { lease: "L1".into() })
                .at(15010, 3, "a", "", Kind::RevokeOk { lease: "L1".into() })
                .held_by(20000, 20100, 10, "b", "x", 77)
                .rules(),
            set(&[Rule::UntoldHolder])
        );
    }

    /// A hold whose client gave up on it (a release that failed) may linger until its lease is
    /// gone, not longer.
    #[test]
    fn a_told_hold_lingering_past_its_lease_is_a_phantom() {
        let base = || {
            Hand::default()
                .at(0, 1, "a", "x", Kind::AcquireInvoke)
                .at(10, 1, "a", "x", Kind::AcquireOk { token: 5 })
                .at(100, 2, "a", "x", Kind::ReleaseInvoke { token: 5 })
                .at(
                    1100,
                    2,
                    "a",
                    "x",
                    Kind::ReleaseFail {
                        token: 5,
                        error: "unavailable(store_unavailable)".into(),
                    },
                )
        };
        assert_eq!(
            base().held_by(3000, 3100, 10, "b", "x", 5).rules(),
            set(&[])
        );
        let err = check(&base().held_by(10000, 10100, 10, "b", "x", 5).events).unwrap_err();
        assert_eq!(err.rules(), set(&[Rule::UntoldHolder]), "{err}");
        assert!(err.to_string().contains("its hold had ended"), "{err}");
        // A confirmed release: gone at once.
        let h = Hand::default()
            .hold(10, 100, 1, "a", "x", 5)
            .held_by(200, 300, 10, "b", "x", 5);
        assert_eq!(h.rules(), set(&[Rule::UntoldHolder]));
    }

    #[test]
    fn indeterminate_errors() {
        for error in [
            "unavailable(store_unavailable)",
            "transport",
            "lease_lost(Expired)",
            "unexpected answer",
        ] {
            assert!(is_indeterminate(error), "{error}");
        }
        for error in ["lock_held", "lease_not_found", "not_holder", "forbidden: x"] {
            assert!(!is_indeterminate(error), "{error}");
        }
    }
}
