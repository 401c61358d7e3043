//! The client-side lease timer and the background renewal loop behind every guard and lease.
//!
//! As in Chubby's clients, a hold is counted lost at `send time of the last confirmed renewal +
//! TTL - safety margin`, by this process's monotonic clock. The server's lease started counting
//! no earlier than that send, so this is a lower bound on when the server may give the lock to
//! someone else; the margin absorbs clock-rate drift between the two machines. The application
//! therefore learns of the loss *before* another holder can exist, not after the server notices.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::error::Error;

/// Why a hold (a lock guard or a lease) ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum LostReason {
    /// No renewal was confirmed in time: the client-side timer ran out (server unreachable, or
    /// this process was paused). The server may free the lock at any moment now, if not already.
    Expired,
    /// The server said this token no longer holds the lock (`not_holder`).
    NotHolder,
    /// The server said the lease is gone (`lease_not_found`): expired or revoked.
    LeaseNotFound,
    /// This process ended it: released, revoked, or dropped.
    Released,
}

impl fmt::Display for LostReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LostReason::Expired => {
                "no renewal was confirmed before the client-side lease timer ran out"
            }
            LostReason::NotHolder => "the server says this token no longer holds the lock",
            LostReason::LeaseNotFound => "the server says the lease is gone (expired or revoked)",
            LostReason::Released => "released by this process",
        })
    }
}

/// The state of one hold, shared between its renewal task and its observers.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HoldState {
    /// Send time of the last confirmed renewal (or of the grant).
    pub confirmed_at: Instant,
    /// The TTL the server last confirmed.
    pub ttl: Duration,
    /// When the hold counts as lost if nothing else is confirmed.
    pub deadline: Instant,
    /// Set once the hold ended for another reason than the timer.
    pub ended: Option<LostReason>,
}

/// The safety margin subtracted from the TTL: a tenth of it, at least 250 ms, at most half.
pub(crate) fn default_margin(ttl: Duration) -> Duration {
    (ttl / 10).max(Duration::from_millis(250)).min(ttl / 2)
}

/// A read-only view of a hold: is it held, and a future that resolves when it is lost.
#[derive(Debug, Clone)]
pub(crate) struct HoldWatch {
    rx: watch::Receiver<HoldState>,
}

impl HoldWatch {
    pub fn state(&self) -> HoldState {
        *self.rx.borrow()
    }

    /// Held while not ended and the timer has not run out. Reads the clock itself, so it is
    /// right even if the renewal task is starved.
    pub fn is_held(&self) -> bool {
        let state = self.state();
        state.ended.is_none() && Instant::now() < state.deadline
    }

    /// Resolves when the hold is lost, with why. Uses its own timer for the deadline, for the
    /// same reason as [`HoldWatch::is_held`].
    pub async fn lost(&self) -> LostReason {
        let mut rx = self.rx.clone();
        loop {
            let state = *rx.borrow_and_update();
            if let Some(reason) = state.ended {
                return reason;
            }
            if Instant::now() >= state.deadline {
                return LostReason::Expired;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(state.deadline) => {}
                changed = rx.changed() => {
                    if changed.is_err() {
                        // The keeper is gone; the state is final. Only the timer is left.
                        tokio::time::sleep_until(state.deadline).await;
                    }
                }
            }
        }
    }
}

/// One renewal (with fail-over inside), to be confirmed before the given deadline: resolves to
/// the confirmed TTL.
pub(crate) type RenewFn = Arc<
    dyn Fn(Instant) -> Pin<Box<dyn Future<Output = Result<Duration, Error>> + Send>> + Send + Sync,
>;

/// Owns a hold's state and its background renewal task; stopping or dropping it ends the hold
/// (as [`LostReason::Released`]) and stops renewing.
#[derive(Debug)]
pub(crate) struct Keeper {
    tx: Arc<watch::Sender<HoldState>>,
    task: Option<JoinHandle<()>>,
}

impl Keeper {
    /// Starts renewing a hold confirmed at `confirmed_at` for `ttl`, with `renew`, at about a
    /// third of the TTL. `label` names the hold in log events (`lock "x" token 7`). Needs a
    /// Tokio runtime.
    pub fn start(
        confirmed_at: Instant,
        ttl: Duration,
        margin: Option<Duration>,
        renew: RenewFn,
        label: String,
    ) -> Self {
        let margin_of = move |ttl: Duration| margin.unwrap_or_else(|| default_margin(ttl)).min(ttl);
        let state = HoldState {
            confirmed_at,
            ttl,
            deadline: confirmed_at + ttl - margin_of(ttl),
            ended: None,
        };
        let tx = Arc::new(watch::Sender::new(state));
        let task = tokio::spawn(renew_loop(tx.clone(), renew, margin_of, label));
        Self {
            tx,
            task: Some(task),
        }
    }

    pub fn watch(&self) -> HoldWatch {
        HoldWatch {
            rx: self.tx.subscribe(),
        }
    }

    /// Stops renewing without ending the hold: its timer keeps running (used when another
    /// keeper takes over renewing the same server-side lease).
    pub fn pause(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }

    /// Ends the hold for `reason` (if not ended already) and stops renewing.
    pub fn end(&mut self, reason: LostReason) {
        self.pause();
        self.tx.send_if_modified(|s| {
            let first = s.ended.is_none();
            if first {
                s.ended = Some(reason);
            }
            first
        });
    }
}

impl Drop for Keeper {
    fn drop(&mut self) {
        self.end(LostReason::Released);
    }
}

async fn renew_loop(
    tx: Arc<watch::Sender<HoldState>>,
    renew: RenewFn,
    margin_of: impl Fn(Duration) -> Duration,
    label: String,
) {
    let end = |reason: LostReason| {
        tracing::warn!(hold = %label, %reason, "hold lost");
        tx.send_modify(|s| {
            s.ended.get_or_insert(reason);
        })
    };
    let first = *tx.borrow();
    let mut next_attempt = first.confirmed_at + first.ttl / 3;
    loop {
        let state = *tx.borrow();
        if state.ended.is_some() {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep_until(next_attempt) => {}
            _ = tokio::time::sleep_until(state.deadline) => return end(LostReason::Expired),
        }
        let sent = Instant::now();
        let result = tokio::select! {
            result = renew(state.deadline) => result,
            // A renewal still in flight at the deadline cannot save the hold any more.
            _ = tokio::time::sleep_until(state.deadline) => return end(LostReason::Expired),
        };
        match result {
            Ok(ttl) => {
                let deadline = sent + ttl - margin_of(ttl);
                tx.send_modify(|s| {
                    s.confirmed_at = sent;
                    s.ttl = ttl;
                    s.deadline = s.deadline.max(deadline);
                });
                next_attempt = sent + ttl / 3;
                tracing::debug!(
                    hold = %label,
                    ttl = %humantime::format_duration(ttl),
                    took = ?sent.elapsed(),
                    "renewed"
                );
            }
            Err(Error::NotHolder) => return end(LostReason::NotHolder),
            Err(Error::LeaseNotFound) => return end(LostReason::LeaseNotFound),
            Err(err) => {
                // Every endpoint was tried already; try again soon, while the timer allows.
                tracing::warn!(
                    hold = %label,
                    error = %err,
                    left = ?state.deadline.saturating_duration_since(Instant::now()),
                    "renewal failed; retrying"
                );
                next_attempt = Instant::now() + (state.ttl / 10).min(Duration::from_secs(1));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn margin_is_a_tenth_with_bounds() {
        assert_eq!(
            default_margin(Duration::from_secs(2)),
            Duration::from_millis(250)
        );
        assert_eq!(
            default_margin(Duration::from_secs(30)),
            Duration::from_secs(3)
        );
        assert_eq!(
            default_margin(Duration::from_millis(400)),
            Duration::from_millis(200)
        );
    }

    /// With renewals that never succeed, the hold is lost at `confirmed_at + ttl - margin`.
    #[tokio::test]
    async fn timer_expires_without_confirmed_renewals() {
        let start = Instant::now();
        let renew: RenewFn = Arc::new(|_| {
            Box::pin(async {
                Err(Error::Unavailable {
                    code: "store_unavailable".into(),
                    message: "down".into(),
                })
            })
        });
        let keeper = Keeper::start(start, Duration::from_secs(1), None, renew, "test".into());
        let watch = keeper.watch();
        assert!(watch.is_held());
        assert_eq!(watch.lost().await, LostReason::Expired);
        let elapsed = start.elapsed();
        assert!(elapsed >= Duration::from_millis(750), "{elapsed:?}");
        assert!(elapsed < Duration::from_millis(950), "{elapsed:?}");
        assert!(!watch.is_held());
    }

    /// Confirmed renewals push the deadline; `not_holder` ends the hold at once.
    #[tokio::test]
    async fn renewals_extend_and_not_holder_ends() {
        let start = Instant::now();
        let calls = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let renew: RenewFn = Arc::new({
            let calls = calls.clone();
            move |_| {
                let n = calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Box::pin(async move {
                    if n < 5 {
                        Ok(Duration::from_millis(600))
                    } else {
                        Err(Error::NotHolder)
                    }
                })
            }
        });
        let keeper = Keeper::start(
            start,
            Duration::from_millis(600),
            None,
            renew,
            "test".into(),
        );
        assert_eq!(keeper.watch().lost().await, LostReason::NotHolder);
        // Six renewals at a third of the TTL each: well past the first TTL, so renewals worked.
        let elapsed = start.elapsed();
        assert!(elapsed >= Duration::from_millis(1100), "{elapsed:?}");
        assert!(elapsed < Duration::from_millis(2000), "{elapsed:?}");
    }
}
