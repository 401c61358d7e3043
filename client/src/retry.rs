//! Retrying without making an overload worse: the per-request policy (attempts, exponential
//! backoff with full jitter), the retry budget that keeps retries to a fraction of requests, and
//! the `Retry-After` pacing of each endpoint.
//!
//! A request moves to the next endpoint at once after a connection error, a timeout or a `503`:
//! another replica may well answer. After a full round over the endpoints it pauses for a random
//! time between zero and an exponentially growing bound ("full jitter", which spreads retries of
//! many clients best; see the AWS Architecture Blog, "Exponential Backoff And Jitter"). An
//! endpoint that answered with `Retry-After` is not asked again before that time, by any request
//! of the client, and the wait gets a jitter on top so that clients told the same delay do not come
//! back together. Every attempt after a request's first spends one token of a [`RetryBudget`]
//! (Finagle's retry budgets, gRPC's retry throttling): retries stay a bounded fraction of requests
//! however long an outage lasts. The one exception is a retry after a connection that failed
//! before the request left the client (refused, TLS handshake failed): it costs no server any
//! work, so, like gRPC's transparent retries, it is free; a killed replica's callers all move on.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

/// How hard to retry one request before giving up.
///
/// A request moves to the next endpoint after a connection error, a timeout, a `503` or an
/// overload `429`; after a full round over the endpoints it pauses a random time in
/// `[0, min(max_backoff, backoff × 2^(round - 1))]` (exponential backoff with full jitter). Each
/// attempt after the first also needs a token of the client's [`RetryBudget`], unless the one
/// before it could not connect at all.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Attempts in all, across endpoints (raised to the number of endpoints, so every endpoint
    /// is tried at least once).
    pub max_attempts: u32,
    /// Upper bound of the random pause after the first full round over the endpoints; it doubles
    /// with each further round.
    pub backoff: Duration,
    /// Largest upper bound of a pause between rounds.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 4,
            backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
        }
    }
}

impl RetryPolicy {
    /// One attempt per endpoint, no pauses.
    pub fn once_per_endpoint() -> Self {
        Self {
            max_attempts: 1,
            ..Self::default()
        }
    }

    /// The random pause before round `round` (1 for the second round over the endpoints).
    pub(crate) fn pause_before_round(&self, round: u32) -> Duration {
        let bound = self
            .backoff
            .saturating_mul(1u32 << round.saturating_sub(1).min(16))
            .min(self.max_backoff);
        jitter(bound)
    }
}

/// A budget for retries shared by every request of a client (or of several clients, when they
/// are built with clones of one budget): each request deposits `ratio` of a token, the budget
/// also refills by `min_per_second` tokens a second, it holds at most `burst` tokens, and each
/// retry spends one. When the budget is empty a failed request fails at once with its last
/// error instead of retrying.
///
/// So over any stretch of time, retries are at most `ratio` × requests + `min_per_second` ×
/// seconds + `burst`: a fleet of clients facing an overloaded or failing service adds at most
/// that fraction to the load, instead of multiplying it by the attempt count. The floor keeps a
/// quiet client (one lock renewing every few seconds) able to fail over.
///
/// Cheap to clone; clones share the balance.
#[derive(Debug, Clone)]
pub struct RetryBudget {
    ratio: f64,
    min_per_second: f64,
    burst: f64,
    state: Arc<Mutex<BudgetState>>,
}

#[derive(Debug)]
struct BudgetState {
    balance: f64,
    refilled_at: Instant,
}

impl Default for RetryBudget {
    /// 20 % of requests (Finagle's default), plus one retry a second, at most 10 at once.
    fn default() -> Self {
        Self::new(0.2, 1.0, 10.0)
    }
}

impl RetryBudget {
    /// A budget allowing retries of `ratio` of the requests, plus `min_per_second` retries a
    /// second, with at most `burst` retries saved up (and available at the start). Negative or
    /// non-finite rates count as zero; `burst` is at least one, and an infinite one means no
    /// limit.
    pub fn new(ratio: f64, min_per_second: f64, burst: f64) -> Self {
        let rate = |x: f64| if x.is_finite() { x.max(0.0) } else { 0.0 };
        let burst = if burst.is_nan() { 1.0 } else { burst.max(1.0) };
        Self {
            ratio: rate(ratio),
            min_per_second: rate(min_per_second),
            burst,
            state: Arc::new(Mutex::new(BudgetState {
                balance: burst,
                refilled_at: Instant::now(),
            })),
        }
    }

    /// A budget that never runs out (retries bounded only by [`RetryPolicy::max_attempts`]).
    pub fn unlimited() -> Self {
        Self::new(0.0, 0.0, f64::INFINITY)
    }

    /// Tokens available now (one is one retry).
    pub fn balance(&self) -> f64 {
        let mut state = self.state();
        self.refill(&mut state);
        state.balance
    }

    /// A request is starting: deposit its share.
    pub(crate) fn deposit(&self) {
        let mut state = self.state();
        self.refill(&mut state);
        state.balance = (state.balance + self.ratio).min(self.burst);
    }

    /// A retry wants to go: spend one token, or refuse.
    pub(crate) fn try_withdraw(&self) -> bool {
        if self.burst.is_infinite() {
            return true;
        }
        let mut state = self.state();
        self.refill(&mut state);
        if state.balance >= 1.0 {
            state.balance -= 1.0;
            true
        } else {
            false
        }
    }

    fn refill(&self, state: &mut BudgetState) {
        let now = Instant::now();
        let seconds = now.duration_since(state.refilled_at).as_secs_f64();
        state.balance = (state.balance + seconds * self.min_per_second).min(self.burst);
        state.refilled_at = now;
    }

    fn state(&self) -> std::sync::MutexGuard<'_, BudgetState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// How long an endpoint that refused a connection is set aside: asked only when no other
/// endpoint can be, since most likely nothing listens there (a killed replica) and the others can
/// serve. Short, because a restarted replica should get traffic again soon.
pub(crate) const REFUSED_SET_ASIDE: Duration = Duration::from_secs(2);

/// What this client knows about each endpoint between calls: when it may be asked again (after
/// it answered with `Retry-After`) and when it last refused a connection.
#[derive(Debug)]
pub(crate) struct Pacing {
    endpoints: Mutex<Vec<EndpointState>>,
}

#[derive(Debug, Clone, Copy, Default)]
struct EndpointState {
    not_before: Option<Instant>,
    refused_at: Option<Instant>,
}

impl Pacing {
    pub fn new(endpoints: usize) -> Self {
        Self {
            endpoints: Mutex::new(vec![EndpointState::default(); endpoints]),
        }
    }

    fn endpoints(&self) -> std::sync::MutexGuard<'_, Vec<EndpointState>> {
        self.endpoints.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Endpoint `index` asked not to be called before `until`.
    pub fn defer(&self, index: usize, until: Instant) {
        let slot = &mut self.endpoints()[index].not_before;
        *slot = Some(slot.map_or(until, |t| t.max(until)));
    }

    /// Endpoint `index` refused a connection just now.
    pub fn refused(&self, index: usize) {
        self.endpoints()[index].refused_at = Some(Instant::now());
    }

    /// Endpoint `index` answered: whatever refused before listens again.
    pub fn answered(&self, index: usize) {
        self.endpoints()[index].refused_at = None;
    }

    /// The endpoint to try next, starting the rotation at `from`, with the time it may be asked
    /// (`None`: now). Preferred, in order: one that may be asked now; one that asked for a
    /// pause (the soonest free), since waiting for a server that answers beats knocking at a
    /// port that just refused; only then one that refused within [`REFUSED_SET_ASIDE`].
    pub fn pick(&self, from: usize) -> (usize, Option<Instant>) {
        let endpoints = self.endpoints();
        let n = endpoints.len();
        let now = Instant::now();
        let mut best: Option<(bool, Instant, usize)> = None;
        for k in 0..n {
            let index = (from + k) % n;
            let state = endpoints[index];
            let set_aside = state
                .refused_at
                .is_some_and(|t| now.saturating_duration_since(t) < REFUSED_SET_ASIDE);
            let free_at = state.not_before.filter(|t| *t > now).unwrap_or(now);
            if !set_aside && free_at == now {
                return (index, None);
            }
            if best.is_none_or(|b| (set_aside, free_at) < (b.0, b.1)) {
                best = Some((set_aside, free_at, index));
            }
        }
        let (_, free_at, index) = best.expect("at least one endpoint");
        (index, (free_at > now).then_some(free_at))
    }
}

/// The longest `Retry-After` honoured: a larger value (or a date, which we do not parse) is
/// taken as this, so a confused proxy cannot park a client for hours.
pub(crate) const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// Parses a `Retry-After` header in seconds (`"2"`, also `"0.5"`). An HTTP date, which servers
/// rarely send for overload, counts as [`MAX_RETRY_AFTER`] rather than being ignored.
pub(crate) fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if value.is_empty() {
        return None;
    }
    match value.parse::<f64>() {
        Ok(seconds) if seconds.is_finite() && seconds >= 0.0 => Some(Duration::from_secs_f64(
            seconds.min(MAX_RETRY_AFTER.as_secs_f64()),
        )),
        Ok(_) => None,
        Err(_) => Some(MAX_RETRY_AFTER),
    }
}

/// A uniformly random duration in `[0, bound]`.
pub(crate) fn jitter(bound: Duration) -> Duration {
    if bound.is_zero() {
        return bound;
    }
    let mut bytes = [0u8; 8];
    aws_lc_rs::rand::fill(&mut bytes).expect("the system random source works");
    let unit = (u64::from_le_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64;
    bound.mul_f64(unit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_parses_seconds_and_bounds_the_rest() {
        assert_eq!(parse_retry_after("2"), Some(Duration::from_secs(2)));
        assert_eq!(parse_retry_after(" 0.5 "), Some(Duration::from_millis(500)));
        assert_eq!(parse_retry_after("86400"), Some(MAX_RETRY_AFTER));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2026 07:28:00 GMT"),
            Some(MAX_RETRY_AFTER)
        );
        assert_eq!(parse_retry_after("-1"), None);
        assert_eq!(parse_retry_after(""), None);
    }

    #[test]
    fn pauses_are_random_and_bounded_by_a_doubling_cap() {
        let policy = RetryPolicy {
            max_attempts: 10,
            backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(350),
        };
        let samples = |round| {
            (0..200)
                .map(|_| policy.pause_before_round(round))
                .collect::<Vec<_>>()
        };
        assert!(samples(1).iter().all(|d| *d <= Duration::from_millis(100)));
        assert!(samples(2).iter().all(|d| *d <= Duration::from_millis(200)));
        let late = samples(9);
        assert!(late.iter().all(|d| *d <= Duration::from_millis(350)));
        // Full jitter: spread over the whole range, not clustered at the bound.
        assert!(late.iter().any(|d| *d < Duration::from_millis(100)));
        assert!(late.iter().any(|d| *d > Duration::from_millis(250)));
    }

    /// Retries are at most `ratio` of requests plus the burst, when no time passes.
    #[tokio::test(start_paused = true)]
    async fn budget_allows_a_fraction_of_requests() {
        let budget = RetryBudget::new(0.1, 0.0, 5.0);
        let mut retries = 0;
        for _ in 0..1000 {
            budget.deposit();
            while budget.try_withdraw() {
                retries += 1;
            }
        }
        // 5 saved at the start, then one per ten requests.
        assert!((100..=105).contains(&retries), "{retries}");
        let clone = budget.clone();
        assert!(!clone.try_withdraw(), "clones share the balance");
    }

    /// The floor refills an idle budget with time, up to the burst.
    #[tokio::test(start_paused = true)]
    async fn budget_floor_refills_with_time() {
        let budget = RetryBudget::new(0.0, 2.0, 3.0);
        while budget.try_withdraw() {}
        tokio::time::advance(Duration::from_millis(600)).await;
        assert!(budget.try_withdraw());
        assert!(!budget.try_withdraw());
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!((budget.balance() - 3.0).abs() < 1e-9);
        assert!(RetryBudget::unlimited().try_withdraw());
    }

    #[tokio::test(start_paused = true)]
    async fn pacing_prefers_endpoints_that_may_be_asked() {
        let pacing = Pacing::new(3);
        let now = Instant::now();
        assert_eq!(pacing.pick(1), (1, None));
        pacing.defer(1, now + Duration::from_secs(2));
        assert_eq!(pacing.pick(1), (2, None));
        pacing.defer(2, now + Duration::from_secs(1));
        pacing.defer(0, now + Duration::from_secs(3));
        assert_eq!(pacing.pick(1), (2, Some(now + Duration::from_secs(1))));
        tokio::time::advance(Duration::from_millis(1500)).await;
        assert_eq!(pacing.pick(1), (2, None));
    }
}
