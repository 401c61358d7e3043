//! `leasehold lock NAME CMD...`: acquire, run CMD while the hold lasts, stop CMD in time, release;
//! and `leasehold elect NAME CMD...`: the same with a campaign, a leadership and a resignation.
//!
//! **When CMD is stopped.** The client counts a hold lost at `last confirmed renewal + TTL −
//! margin`, where the margin is the clock allowance (a tenth of the TTL, 250 ms to half the TTL)
//! plus `--kill-grace`. At that moment CMD gets SIGTERM, and SIGKILL `--kill-grace` later: so CMD
//! is dead a whole clock allowance before the server could give the lock to anyone else. If the
//! server says the hold is gone (revoked, not the holder), someone else may hold it already:
//! CMD gets SIGKILL at once. A `--kill-grace` that does not fit (allowance + grace above half the
//! TTL) is refused.
//!
//! **Signals.** SIGINT, SIGTERM, SIGHUP and SIGQUIT to `leasehold` while waiting in line cancel
//! the wait. While CMD runs they are passed on to CMD (in the terminal's foreground group, CMD got
//! Ctrl-C, Ctrl-\ and hang-ups from the terminal itself, so only SIGTERM is passed on), CMD gets
//! `--kill-grace` to exit, then SIGKILL (a second signal: SIGKILL at once), and the lock is
//! released. The lease stays renewed meanwhile.

use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::json;
use tokio::signal::unix::{SignalKind, signal};
use tokio::time::Instant;

use super::child::{Cmd, exit_code};
use super::output::Out;
use super::{EXIT_CMD_NOT_STARTED, EXIT_ERROR, EXIT_LOST, RunArgs, Wait};
use crate::hold::default_margin;
use crate::{
    Client, ClientBuilder, DEFAULT_TTL, Error, FencingToken, Handle, Leadership, Lease, LeaseId,
    LockGuard, LostReason,
};

pub(super) const AFTER_HELP: &str = "\
CMD may follow NAME directly (as with flock); use -- before a CMD that starts with `-`.
CMD stays in the terminal's foreground process group when leasehold runs in one, so an
interactive CMD reads the terminal and gets Ctrl-C as it would under flock; otherwise CMD gets a
process group of its own, and signals reach everything it started.

Stopping CMD: when the hold is about to be lost (no renewal confirmed in time), CMD gets SIGTERM,
then SIGKILL after --kill-grace, early enough to be dead before the server could grant the lock
to anyone else; if the server says the hold is gone, SIGKILL at once. If leasehold itself is
killed (even with kill -9), the kernel kills CMD. Ctrl-C or SIGTERM to leasehold: CMD gets the
signal, SIGKILL after --kill-grace (a second Ctrl-C: at once), then the lock is released.

Examples:
  leasehold lock reports ./make-reports                      # wait as long as it takes
  leasehold lock -n reports ./make-reports                   # held? exit 75 at once
  leasehold lock -w 30 -E 0 reports -c 'echo \"token $LEASEHOLD_TOKEN\"; ./make-reports'
  leasehold --output json lock reports ./make-reports        # the grant as JSON on stderr
  leasehold lock -n 3 encoders ./encode.sh                   # a semaphore: up to 3 hold at once
  leasehold lock --limit 3 encoders ./encode.sh              # the same
  leasehold lock --shared catalog ./read-catalog             # readers together...
  leasehold lock --exclusive catalog ./rebuild-catalog       # ...a writer alone

-n: followed by a whole number N (-n 3, -n=3, -n3) it is --limit N, as consul lock's -n; followed
by anything else it is flock's -n (fail at once). To fail at once on a lock named by digits, use
--nb or -w 0.";

pub(super) const ELECT_AFTER_HELP: &str = "\
CMD runs while this process leads, and is stopped as `leasehold lock` stops it: when the
leadership is about to be lost (no renewal confirmed in time), CMD gets SIGTERM, then SIGKILL
after --kill-grace, dead before anyone else can lead; if the server says the leadership is gone,
SIGKILL at once. When CMD ends, leasehold resigns and the next candidate leads.

Examples:
  leasehold elect db-primary --value 10.0.0.7:5432 ./serve-primary   # campaign as long as it takes
  leasehold elect -n db-primary ./serve-primary                      # someone leads? exit 75 at once
  leasehold observe db-primary                                       # who leads, and each change";

/// What `run` acquires.
pub(super) enum Job {
    /// A lock (a mutex unless told otherwise).
    Lock {
        name: String,
        limit: Option<u32>,
        shared: bool,
        exclusive: bool,
        /// Lock-delay (zero: none).
        lock_delay: Duration,
    },
    /// The leadership of an election.
    Elect { name: String, value: String },
}

impl Job {
    fn name(&self) -> &str {
        match self {
            Job::Lock { name, .. } | Job::Elect { name, .. } => name,
        }
    }

    /// What is held, for messages: `lock "x"` or `leadership of "x"`.
    fn what(&self) -> String {
        match self {
            Job::Lock { name, .. } => format!("lock {name:?}"),
            Job::Elect { name, .. } => format!("leadership of {name:?}"),
        }
    }

    /// Asks for it under `lease`, waiting as `run` says.
    async fn acquire(&self, client: &Client, lease: &Lease, run: &RunArgs) -> Result<Held, Error> {
        let wait = match (run.no_wait, run.wait) {
            (true, _) => Some(Duration::ZERO),
            (false, Wait::Forever) => None,
            (false, Wait::For(wait)) => Some(wait),
        };
        match self {
            Job::Lock {
                name,
                limit,
                shared,
                exclusive,
                lock_delay,
            } => {
                let mut request = client.lock(name).lease(lease).lock_delay(*lock_delay);
                if let Some(owner) = &run.owner {
                    request = request.owner(owner);
                }
                request = match wait {
                    Some(wait) => request.wait(wait),
                    None => request.wait_forever(),
                };
                if let Some(limit) = limit {
                    request = request.limit(*limit);
                }
                if *shared {
                    request = request.shared();
                }
                if *exclusive {
                    request = request.exclusive();
                }
                request.acquire().await.map(Held::Lock)
            }
            Job::Elect { name, value } => {
                let mut election = client.election(name).lease(lease);
                if let Some(owner) = &run.owner {
                    election = election.owner(owner);
                }
                election = match wait {
                    Some(wait) => election.wait(wait),
                    None => election.wait_forever(),
                };
                election.campaign(value).await.map(Held::Leader)
            }
        }
    }
}

/// A lock held, or a leadership.
enum Held {
    Lock(LockGuard),
    Leader(Leadership),
}

impl Held {
    fn token(&self) -> FencingToken {
        match self {
            Held::Lock(guard) => guard.token(),
            Held::Leader(leader) => leader.epoch(),
        }
    }

    fn lease_id(&self) -> &LeaseId {
        match self {
            Held::Lock(guard) => guard.lease_id(),
            Held::Leader(leader) => leader.lease_id(),
        }
    }

    fn handle(&self) -> &Handle {
        match self {
            Held::Lock(guard) => guard.handle(),
            Held::Leader(leader) => leader.handle(),
        }
    }

    async fn lost(&self) -> LostReason {
        match self {
            Held::Lock(guard) => guard.lost().await,
            Held::Leader(leader) => leader.lost().await,
        }
    }

    /// Releases the lock, or resigns.
    async fn release(self) -> Result<(), Error> {
        match self {
            Held::Lock(guard) => guard.release().await,
            Held::Leader(leader) => leader.resign().await,
        }
    }

    /// The grant, as `--output json` reports it.
    fn grant_event(&self) -> serde_json::Value {
        match self {
            Held::Lock(guard) => json!({
                "event": "acquired",
                "name": guard.name(),
                "token": guard.token(),
                "lease_id": guard.lease_id(),
                "ttl_ms": guard.ttl().as_millis() as u64,
                "owner": guard.owner(),
            }),
            Held::Leader(leader) => json!({
                "event": "elected",
                "name": leader.name(),
                "epoch": leader.epoch(),
                "token": leader.epoch(),
                "value": leader.value(),
                "lease_id": leader.lease_id(),
                "ttl_ms": leader.ttl().as_millis() as u64,
            }),
        }
    }

    /// What CMD finds in its environment.
    fn env(&self) -> Vec<(&'static str, String)> {
        let mut env = match self {
            Held::Lock(guard) => vec![("LEASEHOLD_LOCK", guard.name().to_owned())],
            Held::Leader(leader) => vec![
                ("LEASEHOLD_ELECTION", leader.name().to_owned()),
                ("LEASEHOLD_EPOCH", leader.epoch().to_string()),
                ("LEASEHOLD_VALUE", leader.value().to_owned()),
            ],
        };
        env.extend([
            ("LEASEHOLD_TOKEN", self.token().to_string()),
            ("LEASEHOLD_LEASE_ID", self.lease_id().to_string()),
            ("LEASEHOLD_HANDLE", self.handle().reveal().to_owned()),
        ]);
        env
    }
}

/// The largest default `--kill-grace`.
const MAX_DEFAULT_GRACE: Duration = Duration::from_secs(1);

/// How long the clean-up after a lost hold, or after a wait cut short, may take.
const CLEANUP_AFTER_LOSS: Duration = Duration::from_secs(1);

/// Runs `leasehold lock` or `leasehold elect`; returns the exit code.
pub(super) async fn run(builder: ClientBuilder, job: Job, args: RunArgs, out: &Out) -> u8 {
    // From now on signals are ours: while waiting in line one cancels the wait (and the lease is
    // revoked); while CMD runs they are passed on.
    let mut signals = match Signals::new() {
        Ok(signals) => signals,
        Err(err) => {
            eprintln!("leasehold: cannot handle signals: {err}");
            return EXIT_ERROR;
        }
    };
    let handle = match &args.lease {
        Some(_) => match args.handle.handle() {
            Ok(handle) => Some(handle),
            Err(err) => return out.fail(&err),
        },
        None => None,
    };
    let ttl = match (&args.lease, &handle) {
        (Some(id), Some(handle)) => {
            // The lease's TTL decides the margin: ask once before building the real client.
            let probe = match builder.clone().build() {
                Ok(probe) => probe,
                Err(err) => return out.fail(&err),
            };
            match probe.keep_lease_alive(id, handle).await {
                Ok(ttl_ms) => Duration::from_millis(ttl_ms),
                Err(err) => return out.fail(&err),
            }
        }
        _ => args.ttl.unwrap_or(DEFAULT_TTL),
    };
    let grace = args
        .kill_grace
        .unwrap_or_else(|| (ttl / 10).min(MAX_DEFAULT_GRACE));
    let allowance = default_margin(ttl);
    if allowance + grace > ttl / 2 {
        return out.usage(&format!(
            "--kill-grace {} does not fit in a TTL of {}: CMD must be dead before the lease can \
             expire on the server, so the grace plus the {} clock allowance may be at most half \
             the TTL; raise --ttl or lower --kill-grace",
            fmt(grace),
            fmt(ttl),
            fmt(allowance)
        ));
    }
    let client = match builder.safety_margin(allowance + grace).build() {
        Ok(client) => client,
        Err(err) => return out.fail(&err),
    };
    // The lease: our own (revoked at the end), or the caller's (kept alive, left alive).
    let (lease, ours) = match (args.lease.clone(), handle) {
        (Some(id), Some(handle)) => (client.attach_lease(id, handle).await, false),
        _ => (client.grant_lease_for(ttl, args.owner.clone()).await, true),
    };
    let lease = match lease {
        Ok(lease) => lease,
        Err(err) => return out.fail(&err),
    };
    tracing::debug!(what = %job.what(), lease = %lease.id(), "asking");
    let acquired = tokio::select! {
        result = job.acquire(&client, &lease, &args) => result,
        signal = signals.recv() => {
            out.event(
                &format!("{signal} while waiting for {}; gave up", job.what()),
                json!({"event": "interrupted", "name": job.name(), "signal": signal.as_str()}),
            );
            // Had the server granted the cancelled acquire, that grant is being released in the
            // background (the caller's lease would keep it for nobody): let that finish.
            let _ = tokio::time::timeout(CLEANUP_AFTER_LOSS, lease.settled(job.name())).await;
            let _ = end_lease(lease, ours, None).await;
            return 128u8.saturating_add(signal as u8);
        }
    };
    let guard = match acquired {
        Ok(guard) => guard,
        Err(err) => {
            let _ = end_lease(lease, ours, None).await;
            if !matches!(err, Error::LockHeld { .. }) {
                return out.fail(&err);
            }
            let context = match (args.no_wait, args.wait) {
                (false, Wait::For(wait)) if !wait.is_zero() => {
                    format!("{} not acquired within {}", job.what(), fmt(wait))
                }
                _ => format!("{} not acquired", job.what()),
            };
            return out.fail_with(&err, args.conflict_exit_code, Some(&context));
        }
    };
    let (name, what, token) = (job.name().to_owned(), job.what(), guard.token());
    if out.is_json() {
        out.event("", guard.grant_event());
    }
    tracing::info!(%what, %token, lease = %guard.lease_id(), "acquired; starting CMD");
    let env = guard.env();
    let program = args.program();
    let mut cmd = match Cmd::spawn(&program, &env) {
        Ok(cmd) => cmd,
        Err(err) => {
            out.event(
                &format!("cannot start {:?}: {err}", program[0]),
                json!({"event": "not_started", "name": name, "message": err.to_string()}),
            );
            let _ = end(guard, lease, ours, None).await;
            return EXIT_CMD_NOT_STARTED;
        }
    };

    let mut lost: Option<LostReason> = None;
    let mut stopping = false;
    let mut kill_at: Option<Instant> = None;
    let status = loop {
        tokio::select! {
            status = cmd.wait() => break status,
            reason = guard.lost(), if lost.is_none() => {
                lost = Some(reason);
                // Past the client timer the server may not grant anyone before the allowance is
                // over: SIGTERM now, SIGKILL when the grace ends. If the server said the hold is
                // gone, someone else may hold the lock already: SIGKILL now.
                let kill_now = reason != LostReason::Expired;
                out.event(
                    &format!(
                        "lost {what} (token {token}): {reason}; {}",
                        if kill_now {
                            "killing CMD".to_owned()
                        } else {
                            format!("terminating CMD (SIGKILL in {})", fmt(grace))
                        }
                    ),
                    json!({"event": "lost", "name": name, "token": token, "reason": reason.to_string()}),
                );
                if kill_now {
                    cmd.signal(Signal::SIGKILL);
                    kill_at = None;
                } else {
                    cmd.signal(Signal::SIGTERM);
                    let at = Instant::now() + grace;
                    kill_at = Some(kill_at.map_or(at, |t| t.min(at)));
                }
            }
            signal = signals.recv() => {
                if stopping || lost.is_some() {
                    out.event(
                        &format!("{signal} again; killing CMD"),
                        json!({"event": "killing", "name": name, "signal": signal.as_str()}),
                    );
                    cmd.signal(Signal::SIGKILL);
                    kill_at = None;
                } else {
                    stopping = true;
                    if cmd.should_forward(signal) {
                        cmd.signal(signal);
                    }
                    kill_at = Some(Instant::now() + grace);
                    out.event(
                        &format!("{signal}: CMD has {} to exit before SIGKILL", fmt(grace)),
                        json!({"event": "stopping", "name": name, "signal": signal.as_str(), "kill_after_ms": grace.as_millis() as u64}),
                    );
                }
            }
            () = sleep_until(kill_at), if kill_at.is_some() => {
                out.event(
                    &format!("CMD still running {} later; killing it", fmt(grace)),
                    json!({"event": "killing", "name": name}),
                );
                cmd.signal(Signal::SIGKILL);
                kill_at = None;
            }
        }
    };
    let code = match status {
        Ok(status) => exit_code(status),
        Err(err) => {
            eprintln!("leasehold: waiting for CMD: {err}");
            EXIT_ERROR
        }
    };
    if lost.is_some() {
        let _ = end(guard, lease, ours, Some(CLEANUP_AFTER_LOSS)).await;
        return EXIT_LOST;
    }
    match end(guard, lease, ours, None).await {
        Ok(()) => {
            if out.is_json() {
                out.event(
                    "",
                    json!({"event": "released", "name": name, "token": token, "exit_code": code}),
                );
            }
            tracing::info!(%what, %token, code, "CMD exited; released");
            code
        }
        // CMD ran to its end: its exit code still decides ours.
        Err(err) => out.fail_with(
            &err,
            code,
            Some(&format!("releasing {what} (token {token})")),
        ),
    }
}

/// Releases the lock (resigns), then revokes our lease (or leaves the caller's alone), within
/// `bound`.
async fn end(guard: Held, lease: Lease, ours: bool, bound: Option<Duration>) -> Result<(), Error> {
    let work = async {
        let released = guard.release().await;
        end_lease(lease, ours, None).await?;
        released
    };
    within(bound, work).await
}

/// Revokes our lease, or stops keeping the caller's alive without revoking it.
async fn end_lease(lease: Lease, ours: bool, bound: Option<Duration>) -> Result<(), Error> {
    if ours {
        within(bound, lease.revoke()).await
    } else {
        let _ = lease.detach();
        Ok(())
    }
}

async fn within(
    bound: Option<Duration>,
    work: impl std::future::Future<Output = Result<(), Error>>,
) -> Result<(), Error> {
    match bound {
        None => work.await,
        Some(bound) => tokio::time::timeout(bound, work)
            .await
            .unwrap_or_else(|_| Err(Error::client_input(format!("gave up after {}", fmt(bound))))),
    }
}

/// Sleeps until `at` (forever for `None`).
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn fmt(d: Duration) -> humantime::FormattedDuration {
    humantime::format_duration(Duration::from_millis(d.as_millis() as u64))
}

/// The signals `leasehold lock` handles itself.
struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
    quit: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> std::io::Result<Self> {
        Ok(Self {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
            hup: signal(SignalKind::hangup())?,
            quit: signal(SignalKind::quit())?,
        })
    }

    async fn recv(&mut self) -> Signal {
        tokio::select! {
            _ = self.int.recv() => Signal::SIGINT,
            _ = self.term.recv() => Signal::SIGTERM,
            _ = self.hup.recv() => Signal::SIGHUP,
            _ = self.quit.recv() => Signal::SIGQUIT,
        }
    }
}
