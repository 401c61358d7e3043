//! Buyers: the crowd's shopping loop, and the chaos scenario of a buyer who stalls past its
//! lease while another takes the seat over.
//!
//! The rule every buyer follows is the safe one: lock the seat, check in the ledger that it is
//! unsold, sell it *with the fencing token*, release. The lock makes buyers take turns; the token
//! is what lets the ledger refuse a buyer whose turn ended while it was not looking.
//!
//! Some buyers come as a group of friends wanting adjacent seats: they lock a block of seats
//! with one all-or-nothing group acquire and sell them with their tokens in one ledger
//! transaction. Every buyer's client shares the run's one [`RetryBudget`], so the crowd's
//! retries stay a bounded fraction of its requests however hard the servers shed; a buyer the
//! servers shed waits what they ask and asks again, for as long as its patience lasts.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use leasehold::{Client, Error, FencingToken, GroupGuard, Lease, LockGuard, RetryBudget};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::{Notify, Semaphore, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::Options;
use crate::ledger::{Ledger, ROW_SEATS, SaleOutcome};

/// SQLite connections shared by the buyers (WAL: readers do not block each other).
const LEDGER_CONNECTIONS: usize = 4;

/// Why a buyer went home.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Leave {
    /// It bought every seat it wanted.
    #[default]
    Satisfied,
    /// No seat (for a group: no block of adjacent seats of its size in one row) was left.
    SoldOut,
    /// The servers shed it (or could not be reached, or did not keep its session alive) for
    /// longer than its patience.
    Shed,
}

/// What one buyer ended with.
#[derive(Debug, Clone, Copy, Default)]
pub struct BuyerOutcome {
    /// Seats this buyer bought.
    pub seats_bought: u32,
    /// Why it went home.
    pub left: Leave,
    /// The size of its group of friends, if it came as one.
    pub group: Option<u32>,
}

/// Shared state of a run: endpoints, ledger connections, counters, progress.
pub struct Shop {
    ledgers: Vec<Mutex<Ledger>>,
    /// The seat map buyers browse, as a ticketing site shows it: the seats not sold yet, updated
    /// after each sale the ledger accepts. It may show a seat sold a moment ago as free (a buyer
    /// then finds it sold when it checks the ledger under the seat's lock), never a sold seat's
    /// sale as missing, so "nothing left" on it is true. Browsing it costs the ledger nothing.
    seat_map: Mutex<std::collections::BTreeSet<u32>>,
    endpoints: Vec<String>,
    bearer_token: Option<String>,
    run_id: String,
    hot_seats: u32,
    seats_per_buyer: u32,
    ttl: Duration,
    stall_ttl: Duration,
    wait: Duration,
    seed: u64,
    patience: Duration,
    group_percent: u32,
    show_queue: bool,
    /// The one retry budget every buyer's client shares.
    budget: RetryBudget,
    finished: AtomicU32,
    /// Notified when a buyer finishes or a seat sells.
    progressed: Notify,
    /// Turns true once, when the last seat sells: buyers still waiting in a server's waiting
    /// room then leave it, as a ticketing site announces "sold out" to its queue.
    sold_out: watch::Sender<bool>,
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
    /// Seats the ledger sold (a group's sale counts its seats).
    pub(crate) sales: AtomicU64,
    /// When the doors opened to the crowd: the sale's clock starts here.
    pub(crate) opened_at: OnceLock<Instant>,
    /// How long the buyers took to connect before the doors opened (zero on a cold start).
    pub(crate) connect_time: OnceLock<Duration>,
    /// When the last seat was sold, and how many locks had been granted by then.
    pub(crate) last_sale: Mutex<Option<(Instant, u64)>>,
    /// Requests another replica answered after one failed, summed over the buyers' clients.
    pub(crate) failovers: AtomicU64,
    /// Buyers shown their place in a seat's line (`--show-queue`).
    pub(crate) shown_place: AtomicU64,
    /// Buyers who saw their place in line count down.
    pub(crate) counted_down: AtomicU64,
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
            seat_map: Mutex::new((0..options.seats).collect()),
            endpoints,
            bearer_token: options.bearer_token.clone(),
            run_id: uuid::Uuid::new_v4().simple().to_string()[..8].to_owned(),
            hot_seats: options.hot_seats,
            seats_per_buyer: options.seats_per_buyer.max(1),
            ttl: options.ttl,
            stall_ttl: options.stall_ttl,
            wait: options.wait,
            seed: options.seed,
            patience: options.patience,
            group_percent: options.group_percent.min(100),
            show_queue: options.show_queue,
            // Finagle's default: retries up to 20 % of the crowd's requests, plus one a second,
            // ten saved up. Shared, so a thousand buyers retry no more than one client would
            // for the same number of requests.
            budget: RetryBudget::default(),
            finished: AtomicU32::new(0),
            progressed: Notify::new(),
            sold_out: watch::Sender::new(false),
            latencies: Mutex::new(Vec::new()),
            acquisitions: AtomicU64::new(0),
            refusals: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            gave_up: AtomicU64::new(0),
            sales: AtomicU64::new(0),
            opened_at: OnceLock::new(),
            connect_time: OnceLock::new(),
            last_sale: Mutex::new(None),
            failovers: AtomicU64::new(0),
            shown_place: AtomicU64::new(0),
            counted_down: AtomicU64::new(0),
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
            .request_timeout(Duration::from_secs(5))
            .retry_budget(self.budget.clone());
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
    /// `positions`, if given, is told the buyer's place in line while it waits.
    async fn acquire(
        &self,
        client: &Client,
        lease: Option<&Lease>,
        seat: u32,
        owner: String,
        wait: Duration,
        positions: Option<Box<dyn FnMut(u64) + Send>>,
    ) -> Result<LockGuard, Error> {
        let started = Instant::now();
        let mut lock = client.lock(self.lock_name(seat)).wait(wait).owner(owner);
        lock = match lease {
            Some(lease) => lock.lease(lease),
            None => lock.ttl(self.stall_ttl),
        };
        if let Some(positions) = positions {
            lock = lock.on_position(positions);
        }
        let result = lock.acquire().await;
        self.count(started, &result, &[seat]);
        result
    }

    /// Acquires the locks of every seat of `seats` at once, or none, under `lease`.
    async fn acquire_group(
        &self,
        client: &Client,
        lease: &Lease,
        seats: &[u32],
        owner: String,
        wait: Duration,
    ) -> Result<GroupGuard, Error> {
        let started = Instant::now();
        let names = seats.iter().map(|&s| self.lock_name(s));
        let result = client
            .lock_group(names)
            .lease(lease)
            .wait(wait)
            .owner(owner)
            .acquire()
            .await;
        self.count(started, &result, seats);
        result
    }

    /// Counts an acquire's outcome, and its latency if granted.
    fn count<T>(&self, started: Instant, result: &Result<T, Error>, seats: &[u32]) {
        match result {
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
                tracing::warn!(error = %err, ?seats, "acquire failed");
                self.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
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
            self.sold_seats(&[seat]);
        }
        Ok(outcome)
    }

    /// Sells the seats of `guard` (a group's block) to `buyer` with their tokens, in one ledger
    /// transaction: all or none.
    async fn sell_group(
        self: &Arc<Self>,
        id: u32,
        seats: &[u32],
        buyer: String,
        guard: &GroupGuard,
    ) -> Result<SaleOutcome> {
        let mut sales = Vec::with_capacity(seats.len());
        for &seat in seats {
            let token = guard
                .token_of(&self.lock_name(seat))
                .with_context(|| format!("no token for seat {seat} in the group"))?;
            sales.push((seat, token.get()));
        }
        let outcome = self
            .ledger(id, move |l| l.sell_group(&buyer, &sales))
            .await?;
        if outcome == SaleOutcome::Accepted {
            self.sold_seats(seats);
        }
        Ok(outcome)
    }

    /// `seats` were sold just now.
    fn sold_seats(&self, seats: &[u32]) {
        let mut map = self.seat_map.lock().expect("seat map mutex poisoned");
        for seat in seats {
            map.remove(seat);
        }
        if map.is_empty() {
            self.sold_out.send_replace(true);
        }
        drop(map);
        let n = seats.len() as u64;
        let sold = self.sales.fetch_add(n, Ordering::Relaxed) + n;
        *self.last_sale.lock().expect("last sale mutex poisoned") =
            Some((Instant::now(), self.acquisitions.load(Ordering::Relaxed)));
        self.progress.set_message(format!("{sold} seats sold"));
        self.progressed.notify_waiters();
    }

    /// A place-in-line reporter for buyer `id` waiting for `seat`: shows "you are number N" and
    /// counts the buyers shown a place and those who saw it count down.
    fn place_in_line(
        self: &Arc<Self>,
        id: u32,
        seat: u32,
        shown: &Arc<AtomicBool>,
        counted_down: &Arc<AtomicBool>,
    ) -> Box<dyn FnMut(u64) + Send> {
        let (shop, shown, counted_down) = (self.clone(), shown.clone(), counted_down.clone());
        let mut last = None;
        Box::new(move |ahead: u64| {
            if !shown.swap(true, Ordering::Relaxed) {
                shop.shown_place.fetch_add(1, Ordering::Relaxed);
            }
            if last.is_some_and(|l| ahead < l) && !counted_down.swap(true, Ordering::Relaxed) {
                shop.counted_down.fetch_add(1, Ordering::Relaxed);
            }
            last = Some(ahead);
            let line = format!("buyer-{id}: you are number {ahead} in line for seat {seat}");
            if shop.progress.is_hidden() {
                eprintln!("{line}");
            } else {
                shop.progress
                    .set_message(format!("{} seats sold · {line}", shop.sold()));
            }
        })
    }

    /// The seats the seat map shows unsold, in order: what buyers choose from.
    fn unsold(&self) -> Vec<u32> {
        let map = self.seat_map.lock().expect("seat map mutex poisoned");
        map.iter().copied().collect()
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

/// Lets the whole crowd in at once; resolves to the buyers' outcomes.
///
/// Unless the run is a cold start, every buyer's client first opens its connection (the
/// buyers wait on the sale's page), and the doors open, starting the sale's clock, once all
/// have: the servers then face every buyer's first request in the same instant, without the
/// crowd's TCP handshakes in the way on the cores this machine shares.
pub fn release_the_crowd(
    shop: &Arc<Shop>,
    options: &Options,
) -> JoinHandle<Result<Vec<BuyerOutcome>>> {
    let doors = watch::Sender::new(false);
    let ready = Arc::new(Semaphore::new(0));
    let arrived = Instant::now();
    let tasks: Vec<_> = (0..options.buyers)
        .map(|id| {
            let (shop, ready, mut opened) = (shop.clone(), ready.clone(), doors.subscribe());
            let warm = !options.cold_start;
            tokio::spawn(async move {
                let client = shop.client_for(id);
                if warm
                    && let Ok(client) = &client
                    && let Err(err) = client.warm_up().await
                {
                    // Its first real request connects (or fails over) instead.
                    tracing::debug!(buyer = id, error = %err, "could not connect before the doors opened");
                }
                ready.add_permits(1);
                let _ = opened.wait_for(|&open| open).await;
                let outcome = match client {
                    Ok(client) => buyer(&shop, id, &client).await,
                    Err(err) => Err(err),
                };
                shop.buyer_done();
                outcome
            })
        })
        .collect();
    let (shop, buyers) = (shop.clone(), options.buyers);
    tokio::spawn(async move {
        let _everyone = ready.acquire_many(buyers).await?;
        if shop.opened_at.set(Instant::now()).is_ok() {
            let _ = shop.connect_time.set(arrived.elapsed());
        }
        doors.send_replace(true);
        let mut outcomes = Vec::with_capacity(tasks.len());
        for task in tasks {
            outcomes.push(task.await??);
        }
        Ok(outcomes)
    })
}

/// A buyer's patience with servers that do not serve it: it waits what they ask
/// (`Retry-After`, the least it waits) or a backoff, doubled each time they turn it away again,
/// with full jitter on top so that the buyers turned away together do not all come back
/// together; it gives up once it has gone unserved for longer than its patience.
struct Patience {
    limit: Duration,
    /// When the servers stopped serving this buyer (`None`: they serve it).
    unserved_since: Option<Instant>,
    /// Times in a row the servers did not serve it.
    strikes: u32,
}

impl Patience {
    const FIRST_BACKOFF: Duration = Duration::from_millis(100);
    const MAX_BACKOFF: Duration = Duration::from_secs(8);

    fn new(limit: Duration) -> Self {
        Self {
            limit,
            unserved_since: None,
            strikes: 0,
        }
    }

    /// What is left of it: all of it while the servers serve the buyer.
    fn left(&self) -> Duration {
        self.unserved_since.map_or(self.limit, |since| {
            self.limit.saturating_sub(since.elapsed())
        })
    }

    /// The servers have not served the buyer since `at` (a request that waited in their line,
    /// then was turned away).
    fn unserved_from(&mut self, at: Instant) {
        let since = self.unserved_since.get_or_insert(at);
        *since = (*since).min(at);
    }

    /// A server answered (a grant, or "held by someone else"): patience starts over.
    fn served(&mut self) {
        self.unserved_since = None;
        self.strikes = 0;
    }

    /// The servers could not serve the buyer; they asked for a pause of `asked` (`Retry-After`)
    /// or said nothing. Waits before the next try and answers true, or answers false at once if
    /// that try would come after the patience ran out.
    async fn wait_out(&mut self, asked: Option<Duration>) -> bool {
        let since = *self.unserved_since.get_or_insert_with(Instant::now);
        let base = asked
            .unwrap_or(Self::FIRST_BACKOFF)
            .max(Self::FIRST_BACKOFF);
        let backoff = base
            .saturating_mul(1 << self.strikes.min(10))
            .min(Self::MAX_BACKOFF.max(base));
        self.strikes += 1;
        let pause = backoff + backoff.mul_f64(rand::random::<f64>());
        if since.elapsed() + pause > self.limit {
            return false;
        }
        tracing::debug!(?pause, "not served; waiting before asking again");
        tokio::time::sleep(pause).await;
        true
    }
}

/// Grants a session lease, waiting out the servers while they cannot serve (one died under the
/// request, or they shed the rush of buyers arriving at once) as long as `patience` lasts. A
/// grant is not idempotent for the servers' load, so the client does not resend it by itself
/// beyond its retry budget; a lease granted by a lost attempt just expires.
async fn grant_session(
    client: &Client,
    ttl: Duration,
    name: &str,
    patience: &mut Patience,
) -> Result<Lease, Error> {
    loop {
        match client.grant_lease_for(ttl, Some(name.to_owned())).await {
            Ok(lease) => {
                patience.served();
                return Ok(lease);
            }
            Err(err) if err.is_retryable() && patience.wait_out(asked(&err)).await => {}
            Err(err) => return Err(err),
        }
    }
}

/// The seats a buyer goes for this time: one seat, or a group's block of adjacent seats in one
/// row; `None` when nothing suitable is left.
fn pick(rng: &mut StdRng, unsold: &[u32], hot_seats: u32, group: Option<u32>) -> Option<Vec<u32>> {
    let size = group.unwrap_or(1) as usize;
    if size == 1 {
        // Most buyers: the choice `pick_block` makes, without listing every block (5,000 buyers
        // arriving at once would spend the CPU that the servers and etcd need).
        if unsold.is_empty() {
            return None;
        }
        let hot = unsold.partition_point(|&seat| seat < hot_seats);
        let seat = if hot > 0 && rng.random_bool(0.7) {
            unsold[rng.random_range(0..hot)]
        } else {
            unsold[rng.random_range(0..unsold.len())]
        };
        return Some(vec![seat]);
    }
    pick_block(rng, unsold, hot_seats, size)
}

/// A block of `size` adjacent unsold seats in one row, a front-row one seven times in ten if
/// any is left.
fn pick_block(rng: &mut StdRng, unsold: &[u32], hot_seats: u32, size: usize) -> Option<Vec<u32>> {
    // Blocks of `size` unsold seats side by side in one row, by their first seat (`unsold` is
    // sorted, so consecutive numbers mean no gap).
    let blocks: Vec<&[u32]> = unsold
        .windows(size)
        .filter(|w| {
            w[size - 1] == w[0] + size as u32 - 1 && w[0] / ROW_SEATS == w[size - 1] / ROW_SEATS
        })
        .collect();
    if blocks.is_empty() {
        return None;
    }
    let hot: Vec<&[u32]> = blocks
        .iter()
        .copied()
        .filter(|b| b[0] < hot_seats)
        .collect();
    let block = if !hot.is_empty() && rng.random_bool(0.7) {
        hot[rng.random_range(0..hot.len())]
    } else {
        blocks[rng.random_range(0..blocks.len())]
    };
    Some(block.to_vec())
}

/// One buyer: its client shares the run's retry budget; the fail-overs it saw are added to the
/// shop's count when it leaves.
async fn buyer(shop: &Arc<Shop>, id: u32, client: &Client) -> Result<BuyerOutcome> {
    let outcome = visit(shop, id, client).await;
    shop.failovers
        .fetch_add(client.failovers(), Ordering::Relaxed);
    outcome
}

/// One buyer's visit: wants one or more seats, front row first (or, in a group of friends, a
/// block of adjacent seats); locks them, checks they are unsold, sells them with the tokens,
/// releases; tries other seats when they are taken, until it has what it wants, nothing
/// suitable is left, or the servers have not served it for longer than its patience.
///
/// It shops under a session lease (as an application keeps one session), granted when it first
/// needs one: each seat lock is held under it. Before each try it checks the ledger: a buyer who
/// finds nothing suitable left goes home without asking the servers for anything. Seats are
/// chosen on the seat map; whether one is still unsold is checked in the ledger under its lock.
async fn visit(shop: &Arc<Shop>, id: u32, client: &Client) -> Result<BuyerOutcome> {
    let mut rng =
        StdRng::seed_from_u64(shop.seed ^ u64::from(id).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    // Whether the buyer comes with friends: from a stream of its own, so that the crowd's other
    // choices are the same with or without groups.
    let mut friends = StdRng::seed_from_u64(
        shop.seed ^ u64::from(id).wrapping_mul(0xC2B2_AE3D_27D4_EB4F) ^ 0x6A09_E667,
    );
    let group =
        (friends.random_range(0..100) < shop.group_percent).then(|| friends.random_range(2..=4u32));
    let wants = match group {
        Some(size) => size,
        None => rng.random_range(1..=shop.seats_per_buyer),
    };
    let name = format!("buyer-{id}");
    let mut outcome = BuyerOutcome {
        group,
        ..BuyerOutcome::default()
    };
    let mut patience = Patience::new(shop.patience);
    let (shown, counted_down) = (Arc::default(), Arc::default());
    let mut session: Option<Lease> = None;
    // Front-row seats first; once turned down for a seat, any seat will do.
    let mut hot_seats = shop.hot_seats;
    while outcome.seats_bought < wants {
        let unsold = shop.unsold();
        let Some(seats) = pick(&mut rng, &unsold, hot_seats, group) else {
            outcome.left = Leave::SoldOut;
            break;
        };
        if session.as_ref().is_some_and(|s| !s.is_alive()) {
            // The servers did not confirm our session's keep-alives in time: nothing under it
            // is safe to sell. Step out, and come back with a new one.
            drop(session.take());
            if !patience.wait_out(None).await {
                outcome.left = Leave::Shed;
                break;
            }
            continue;
        }
        let lease = match &session {
            Some(lease) => lease,
            None => {
                // In a full waiting room, the buyer waits what is left of its patience in line,
                // once, rather than coming back every few seconds (each return costs the
                // servers' cores); time in line counts against its patience.
                let asked_at = Instant::now();
                let grant =
                    client.grant_lease_waiting(shop.ttl, Some(name.clone()), patience.left());
                let mut sold_out = shop.sold_out.subscribe();
                let granted = tokio::select! {
                    granted = grant => granted,
                    // Sold out while it waited: it leaves the line. Dropping the request
                    // closes its connection; a server still holding it in the waiting room
                    // takes no place for it (a grant already under way is left to expire).
                    _ = sold_out.wait_for(|&sold_out| sold_out) => {
                        outcome.left = Leave::SoldOut;
                        break;
                    }
                };
                match granted {
                    Ok(lease) => {
                        // Let in, perhaps after seconds in line: look at the seat map again
                        // before asking for a seat it may show sold by now.
                        patience.served();
                        session = Some(lease);
                        continue;
                    }
                    Err(err) => {
                        if err.is_retryable() {
                            patience.unserved_from(asked_at);
                            if patience.wait_out(asked(&err)).await {
                                continue;
                            }
                        }
                        tracing::warn!(error = %err, buyer = id, "no session; the buyer gives up");
                        outcome.left = Leave::Shed;
                        break;
                    }
                }
            }
        };
        let bought = if group.is_some() {
            match shop
                .acquire_group(client, lease, &seats, name.clone(), shop.wait)
                .await
            {
                Ok(guard) => {
                    let bought = buy_group(shop, id, &seats, &name, &guard).await?;
                    let _ = guard.release().await;
                    Ok(bought)
                }
                Err(err) => Err(err),
            }
        } else {
            let seat = seats[0];
            let positions = shop
                .show_queue
                .then(|| shop.place_in_line(id, seat, &shown, &counted_down));
            match shop
                .acquire(
                    client,
                    Some(lease),
                    seat,
                    name.clone(),
                    shop.wait,
                    positions,
                )
                .await
            {
                Ok(guard) => {
                    let sold = shop.ledger(id, move |l| l.owner(seat)).await?.is_some();
                    let mut bought = 0;
                    if !sold
                        && guard.is_held()
                        && shop.sell(id, seat, name.clone(), guard.token()).await?
                            == SaleOutcome::Accepted
                    {
                        bought = 1;
                    }
                    let _ = guard.release().await;
                    Ok(bought)
                }
                Err(err) => Err(err),
            }
        };
        match bought {
            Ok(n) => {
                patience.served();
                outcome.seats_bought += n;
            }
            // Taken: the servers answered; try another, not necessarily in the front row.
            Err(Error::LockHeld { .. }) => {
                patience.served();
                hot_seats = 0;
            }
            Err(err) => {
                // Shed, a replica died under us (the client already failed over), etcd
                // hiccupped, or the session was lost (then it is dropped, and revoked in the
                // background, and a new one granted next time). Wait as the servers ask, and
                // shop on while patience lasts. The session is kept while waiting: its
                // keep-alives cost the servers less than granting a new one.
                if matches!(err, Error::LeaseLost(_)) {
                    drop(session.take());
                }
                if !patience.wait_out(asked(&err)).await {
                    tracing::warn!(error = %err, buyer = id, "not served for too long; the buyer gives up");
                    outcome.left = Leave::Shed;
                    break;
                }
            }
        }
    }
    if outcome.left == Leave::Shed {
        shop.gave_up.fetch_add(1, Ordering::Relaxed);
    }
    if let Some(session) = session {
        let _ = session.revoke().await;
    }
    Ok(outcome)
}

/// The pause a server asked for with its answer, if any.
fn asked(err: &Error) -> Option<Duration> {
    match err {
        Error::Overloaded { retry_after, .. } => *retry_after,
        _ => None,
    }
}

/// A group holding the locks of `seats`: if all are still unsold and the hold is safe, sells them
/// together; answers how many seats it bought (all or none).
async fn buy_group(
    shop: &Arc<Shop>,
    id: u32,
    seats: &[u32],
    name: &str,
    guard: &GroupGuard,
) -> Result<u32> {
    let check = seats.to_vec();
    let any_sold = shop
        .ledger(id, move |l| {
            for seat in check {
                if l.owner(seat)?.is_some() {
                    return Ok(true);
                }
            }
            Ok(false)
        })
        .await?;
    if any_sold || !guard.is_held() {
        return Ok(0);
    }
    let outcome = shop.sell_group(id, seats, name.to_owned(), guard).await?;
    Ok(if outcome == SaleOutcome::Accepted {
        seats.len() as u32
    } else {
        0
    })
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
                None,
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
            let mut patience = Patience::new(shop.patience.max(Duration::from_secs(10)));
            let session = grant_session(&taker, shop.ttl, &taker_name, &mut patience).await?;
            // It waits in line up to four TTLs; if a replica dies under the wait (chaos kills
            // one), it asks again for the rest of it, as the crowd's buyers shop on.
            let deadline = Instant::now() + 4 * ttl;
            let taken = loop {
                let wait = deadline.saturating_duration_since(Instant::now());
                let taken = shop
                    .acquire(&taker, Some(&session), seat, taker_name.clone(), wait, None)
                    .await;
                match &taken {
                    Err(err)
                        if err.is_retryable()
                            && Instant::now() < deadline
                            && patience.wait_out(asked(err)).await => {}
                    _ => break taken,
                }
            };
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
            shop.failovers
                .fetch_add(stalled.failovers() + taker.failovers(), Ordering::Relaxed);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_single_seat_is_picked_as_the_block_of_one_would_be() {
        let unsold: Vec<u32> = (0..400).filter(|s| s % 3 != 0).collect();
        for seed in 0..200 {
            for hot_seats in [0, 1, 50, 1000] {
                let fast = pick(&mut StdRng::seed_from_u64(seed), &unsold, hot_seats, None);
                let blocks = pick_block(&mut StdRng::seed_from_u64(seed), &unsold, hot_seats, 1);
                assert_eq!(fast, blocks, "seed {seed}, {hot_seats} hot");
            }
        }
        assert_eq!(pick(&mut StdRng::seed_from_u64(1), &[], 50, None), None);
    }
}
