//! Buyers: the crowd's shopping loop, and the chaos scenario of a buyer who stalls past its
//! lease while another takes the seat over.
//!
//! The rule every buyer follows is the safe one: lock the seat, check in the ledger that it is
//! unsold, sell it *with the fencing token*, release. The lock makes buyers take turns; the token
//! is what lets the ledger refuse a buyer whose turn ended while it was not looking.

use std::path::Path;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use leasehold::{Client, Error, FencingToken, Lease, LockGuard};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::Options;
use crate::ledger::{Ledger, SaleOutcome};

/// SQLite connections shared by the buyers (WAL: readers do not block each other).
const LEDGER_CONNECTIONS: usize = 4;

/// How many attempts (seat picks) a buyer makes before going home.
const ATTEMPTS: u32 = 8;

/// What one buyer ended with.
#[derive(Debug, Clone, Copy, Default)]
pub struct BuyerOutcome {
    /// Seats this buyer bought.
    pub seats_bought: u32,
}

/// Shared state of a run: endpoints, ledger connections, counters, progress.
pub struct Shop {
    ledgers: Vec<Mutex<Ledger>>,
    endpoints: Vec<String>,
    bearer_token: Option<String>,
    run_id: String,
    hot_seats: u32,
    seats_per_buyer: u32,
    ttl: Duration,
    stall_ttl: Duration,
    wait: Duration,
    seed: u64,
    finished: AtomicU32,
    /// Notified when a buyer finishes or a seat sells.
    progressed: Notify,
    /// Latency of every granted acquire (refusals are bounded by the buyer's wait).
    pub(crate) latencies: Mutex<Vec<Duration>>,
    /// Locks granted.
    pub(crate) acquisitions: AtomicU64,
    /// Acquires answered "held by someone else" within the buyer's wait.
    pub(crate) refusals: AtomicU64,
    /// Acquires that failed otherwise (server killed mid-request, etcd hiccup): retried.
    pub(crate) errors: AtomicU64,
    /// Buyers who could not get a session lease and went home.
    pub(crate) gave_up: AtomicU64,
    /// Sales the ledger accepted.
    pub(crate) sales: AtomicU64,
    progress: ProgressBar,
}

impl Shop {
    /// A shop over the ledger at `ledger_path`, selling through `endpoints`.
    pub fn new(options: &Options, ledger_path: &Path, endpoints: Vec<String>) -> Result<Self> {
        let ledgers = (0..LEDGER_CONNECTIONS)
            .map(|_| Ledger::open(ledger_path).map(Mutex::new))
            .collect::<rusqlite::Result<_>>()?;
        let progress = if options.progress {
            let bar = ProgressBar::new(u64::from(options.buyers));
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} [{bar:40}] {pos}/{len} buyers done · {msg}",
                )
                .expect("static template")
                .progress_chars("=> "),
            );
            bar.enable_steady_tick(Duration::from_millis(100));
            bar
        } else {
            ProgressBar::hidden()
        };
        Ok(Self {
            ledgers,
            endpoints,
            bearer_token: options.bearer_token.clone(),
            run_id: uuid::Uuid::new_v4().simple().to_string()[..8].to_owned(),
            hot_seats: options.hot_seats,
            seats_per_buyer: options.seats_per_buyer.max(1),
            ttl: options.ttl,
            stall_ttl: options.stall_ttl,
            wait: options.wait,
            seed: options.seed,
            finished: AtomicU32::new(0),
            progressed: Notify::new(),
            latencies: Mutex::new(Vec::new()),
            acquisitions: AtomicU64::new(0),
            refusals: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            gave_up: AtomicU64::new(0),
            sales: AtomicU64::new(0),
            progress,
        })
    }

    /// The lock guarding `seat` in this run.
    fn lock_name(&self, seat: u32) -> String {
        format!("concert-{}/seat-{seat}", self.run_id)
    }

    /// A client for buyer `id`: every replica, starting with its own (buyers spread evenly).
    fn client_for(&self, id: u32) -> Result<Client> {
        let n = self.endpoints.len();
        let first = id as usize % n;
        let rotated = (0..n).map(|i| self.endpoints[(first + i) % n].clone());
        let mut builder = Client::builder()
            .endpoints(rotated)
            .request_timeout(Duration::from_secs(5));
        if let Some(token) = &self.bearer_token {
            builder = builder.bearer_token(token);
        }
        Ok(builder.build()?)
    }

    /// Runs `f` on a ledger connection, off the async threads.
    async fn ledger<T: Send + 'static>(
        self: &Arc<Self>,
        id: u32,
        f: impl FnOnce(&mut Ledger) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T> {
        let shop = self.clone();
        tokio::task::spawn_blocking(move || {
            let mut ledger = shop.ledgers[id as usize % LEDGER_CONNECTIONS]
                .lock()
                .expect("ledger mutex poisoned");
            f(&mut ledger)
        })
        .await?
        .context("ledger")
    }

    /// Acquires the lock of `seat` under the buyer's session `lease` (or, without one, under a
    /// lease of its own, with the stalled buyers' short TTL), counting the outcome and latency.
    async fn acquire(
        &self,
        client: &Client,
        lease: Option<&Lease>,
        seat: u32,
        owner: String,
        wait: Duration,
    ) -> Result<LockGuard, Error> {
        let started = Instant::now();
        let lock = client.lock(self.lock_name(seat)).wait(wait).owner(owner);
        let lock = match lease {
            Some(lease) => lock.lease(lease),
            None => lock.ttl(self.stall_ttl),
        };
        let result = lock.acquire().await;
        match &result {
            Ok(_) => {
                self.acquisitions.fetch_add(1, Ordering::Relaxed);
                self.latencies
                    .lock()
                    .expect("latencies mutex poisoned")
                    .push(started.elapsed());
            }
            Err(Error::LockHeld { .. }) => {
                self.refusals.fetch_add(1, Ordering::Relaxed);
            }
            Err(err) => {
                tracing::warn!(error = %err, seat, "acquire failed");
                self.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        result
    }

    /// Sells `seat` to `buyer` with `token`, counting accepted sales.
    async fn sell(
        self: &Arc<Self>,
        id: u32,
        seat: u32,
        buyer: String,
        token: FencingToken,
    ) -> Result<SaleOutcome> {
        let outcome = self
            .ledger(id, move |l| l.sell(seat, &buyer, token.get()))
            .await?;
        if outcome == SaleOutcome::Accepted {
            let sold = self.sales.fetch_add(1, Ordering::Relaxed) + 1;
            self.progress.set_message(format!("{sold} seats sold"));
            self.progressed.notify_waiters();
        }
        Ok(outcome)
    }

    /// Buyers done so far.
    pub fn finished(&self) -> u32 {
        self.finished.load(Ordering::Relaxed)
    }

    /// Seats sold so far.
    pub fn sold(&self) -> u64 {
        self.sales.load(Ordering::Relaxed)
    }

    /// Waits until `done(self)` holds, re-checking whenever a buyer finishes or a seat sells.
    pub async fn wait_until(&self, done: impl Fn(&Self) -> bool) {
        loop {
            let changed = self.progressed.notified();
            if done(self) {
                return;
            }
            changed.await;
        }
    }

    fn buyer_done(&self) {
        self.finished.fetch_add(1, Ordering::Relaxed);
        self.progressed.notify_waiters();
        self.progress.inc(1);
    }

    /// Removes the progress bar.
    pub fn finish_progress(&self) {
        self.progress.finish_and_clear();
    }
}

/// Starts every buyer at once; resolves to their outcomes.
pub fn release_the_crowd(
    shop: &Arc<Shop>,
    options: &Options,
) -> JoinHandle<Result<Vec<BuyerOutcome>>> {
    let tasks: Vec<_> = (0..options.buyers)
        .map(|id| {
            let shop = shop.clone();
            tokio::spawn(async move {
                let outcome = buyer(&shop, id).await;
                shop.buyer_done();
                outcome
            })
        })
        .collect();
    tokio::spawn(async move {
        let mut outcomes = Vec::with_capacity(tasks.len());
        for task in tasks {
            outcomes.push(task.await??);
        }
        Ok(outcomes)
    })
}

/// Grants a buyer's session lease, trying again while the replicas cannot serve: one died under
/// the request (a grant is not idempotent, so the client does not resend it by itself; a lease
/// granted by a lost attempt just expires, since nobody keeps it alive) or they shed the rush
/// of buyers arriving at once. Between tries it waits what the server asked (`Retry-After`) or
/// an exponential backoff, each with full jitter, so that the buyers turned away together do
/// not all come back together.
async fn grant_session(client: &Client, ttl: Duration, name: &str) -> Result<Lease, Error> {
    const TRIES: u32 = 10;
    let mut backoff = Duration::from_millis(100);
    for attempt in 1.. {
        match client.grant_lease_for(ttl, Some(name.to_owned())).await {
            Ok(lease) => return Ok(lease),
            Err(err) if err.is_retryable() && attempt < TRIES => {
                tracing::debug!(error = %err, "granting a session lease failed; trying again");
                let pause = match &err {
                    Error::Overloaded {
                        retry_after: Some(asked),
                        ..
                    } => *asked + backoff.mul_f64(rand::random::<f64>()),
                    _ => backoff.mul_f64(rand::random::<f64>()),
                };
                tokio::time::sleep(pause).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
            Err(err) => return Err(err),
        }
    }
    unreachable!("the loop returns")
}

/// One buyer: wants one or more seats, front row first; locks a seat, checks it is unsold,
/// sells it with the token, releases; tries another seat when one is taken.
async fn buyer(shop: &Arc<Shop>, id: u32) -> Result<BuyerOutcome> {
    let mut rng =
        StdRng::seed_from_u64(shop.seed ^ u64::from(id).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let wants = rng.random_range(1..=shop.seats_per_buyer);
    let client = shop.client_for(id)?;
    let name = format!("buyer-{id}");
    // One lease for the whole visit, as an application keeps one session: each seat lock is
    // held under it, and it is revoked when the buyer leaves.
    let mut outcome = BuyerOutcome::default();
    let session = match grant_session(&client, shop.ttl, &name).await {
        Ok(session) => session,
        Err(err) => {
            // The replicas could not serve this buyer even after waiting: it goes home without
            // a seat (counted as turned away), as a shopper does when the site stays down.
            tracing::warn!(error = %err, buyer = id, "no session; the buyer gives up");
            shop.gave_up.fetch_add(1, Ordering::Relaxed);
            return Ok(outcome);
        }
    };
    for _ in 0..ATTEMPTS {
        if outcome.seats_bought >= wants {
            break;
        }
        let unsold = shop.ledger(id, |l| l.unsold()).await?;
        if unsold.is_empty() {
            break; // sold out: go home
        }
        let hot: Vec<u32> = unsold
            .iter()
            .copied()
            .filter(|&s| s < shop.hot_seats)
            .collect();
        let seat = if !hot.is_empty() && rng.random_bool(0.7) {
            hot[rng.random_range(0..hot.len())]
        } else {
            unsold[rng.random_range(0..unsold.len())]
        };
        if !session.is_alive() {
            break; // our session expired (we could not renew it): nothing is safe to sell
        }
        let guard = match shop
            .acquire(&client, Some(&session), seat, name.clone(), shop.wait)
            .await
        {
            Ok(guard) => guard,
            Err(Error::LockHeld { .. }) => continue,
            Err(_) => {
                // A replica died under us or etcd hiccupped: the client already failed over;
                // pause briefly and shop on.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let sold = shop.ledger(id, move |l| l.owner(seat)).await?.is_some();
        if !sold && guard.is_held() {
            let token = guard.token();
            if shop.sell(id, seat, name.clone(), token).await? == SaleOutcome::Accepted {
                outcome.seats_bought += 1;
            }
        }
        let _ = guard.release().await;
    }
    let _ = session.revoke().await;
    Ok(outcome)
}

/// Chaos (a): for each of a few front-row seats, a buyer locks it, checks it is unsold, and then
/// stalls (a GC pause: it stops renewing) for longer than its TTL. Another buyer, queued for the
/// seat, is granted it when the lease runs out and buys it. Then the stalled buyer wakes up and
/// writes its sale with its old token: the ledger must refuse it.
///
/// Returns once every stalled buyer holds its seat; each task resolves to a line for the report.
pub async fn start_stalls(
    shop: &Arc<Shop>,
    options: &Options,
) -> Result<Vec<JoinHandle<Result<String>>>> {
    let count = (options.buyers / 250)
        .clamp(1, 4)
        .min(options.hot_seats.max(1));
    let mut tasks = Vec::new();
    for k in 0..count {
        let seat = k;
        // Ids past the crowd's, so the crowd's random choices do not depend on chaos.
        let (stalled_id, taker_id) = (options.buyers + 2 * k, options.buyers + 2 * k + 1);
        let stalled = shop.client_for(stalled_id)?;
        let guard = shop
            .acquire(
                &stalled,
                None,
                seat,
                format!("stalled-buyer-{k}"),
                Duration::ZERO,
            )
            .await
            .with_context(|| format!("the stalled buyer could not lock seat {seat}"))?;
        let unsold = shop
            .ledger(stalled_id, move |l| l.owner(seat))
            .await?
            .is_none();
        anyhow::ensure!(unsold, "seat {seat} was sold before the run started");
        // The pause begins: no renewal from here on, but the buyer still has its token.
        let (_, stale_token, _) = guard.detach();
        let paused_at = Instant::now();
        let shop = shop.clone();
        let ttl = options.stall_ttl;
        tasks.push(tokio::spawn(async move {
            let taker = shop.client_for(taker_id)?;
            let taker_name = format!("buyer-who-takes-over-{k}");
            let mut taker_token = None;
            let session = grant_session(&taker, shop.ttl, &taker_name).await?;
            let taken = shop
                .acquire(&taker, Some(&session), seat, taker_name.clone(), 4 * ttl)
                .await;
            let why_not = taken.as_ref().err().map(ToString::to_string);
            if let Ok(guard) = taken {
                let sold = shop.ledger(taker_id, move |l| l.owner(seat)).await?.is_some();
                if !sold {
                    shop.sell(taker_id, seat, taker_name, guard.token()).await?;
                }
                taker_token = Some(guard.token());
                let _ = guard.release().await;
            }
            let _ = session.revoke().await;
            // The stalled buyer wakes up, unaware, and writes with its old token.
            let pause = paused_at.elapsed();
            let late = shop
                .sell(stalled_id, seat, format!("stalled-buyer-{k}"), stale_token)
                .await?;
            let verdict = match late {
                SaleOutcome::StaleToken => "REJECTED by the ledger",
                SaleOutcome::Accepted => "accepted (no newer token had reached the ledger)",
            };
            let taken = match taker_token {
                Some(token) => format!("another buyer was granted token {token}"),
                None => format!("nobody else could take the seat over ({})", why_not.unwrap_or_default()),
            };
            Ok(format!(
                "seat {seat}: a buyer stalled {:.1}s holding token {stale_token} (TTL {}); {taken}; the stalled buyer's late write was {verdict}",
                pause.as_secs_f64(),
                humantime::format_duration(ttl)
            ))
        }));
    }
    Ok(tasks)
}
