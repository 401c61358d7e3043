//! The concert-seat demo: a sold-out concert, buyers racing for seats through Leasehold locks,
//! every sale recorded in a fenced ledger, and an independent audit that no seat was sold twice,
//! even when buyers stall past their lease and a server replica dies mid-run.
//!
//! # Layout
//! - `ledger`: the fenced SQLite ledger and its audit (Kleppmann's token check, in one statement).
//! - `servers`: starting and killing `leasehold-server` replicas for the run.
//! - `buyers`: a buyer's shopping loop (alone or as a group of friends wanting adjacent seats,
//!   with patience for servers that shed it), and the chaos scenarios (stalled buyer and the
//!   buyer who takes the seat over).
//! - `report`: the summary table, and the side-by-side of a flash sale at 1x and 5x the buyers
//!   ([`compare`]).
//!
//! # Usage
//! ```no_run
//! # async fn example() -> anyhow::Result<()> {
//! let options = concert::Options::default(); // 500 seats, 1000 buyers, 2 replicas on etcd at :2379
//! let report = concert::run(options).await?;
//! println!("{report}");
//! assert_eq!(report.audit.double_sold, 0);
//!
//! // A flash sale: the same sale at 1x and 5x the buyers, goodputs side by side.
//! let comparison = concert::compare(concert::Options::default().with_buyers(1000)).await?;
//! println!("{comparison}");
//! # Ok(()) }
//! ```

mod buyers;
pub mod ledger;
mod report;
mod servers;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::time::Instant;

pub use buyers::Leave;
pub use ledger::{Audit, Ledger, SaleOutcome};
pub use report::{Comparison, Report};
pub use servers::default_server_bin;

/// Where the Leasehold servers come from.
#[derive(Debug, Clone)]
pub enum Servers {
    /// Start this many `leasehold-server` replicas (`bin`) against etcd at `etcd_endpoints`; the
    /// demo owns them, so `--chaos` can kill one.
    Spawn {
        /// How many replicas.
        count: usize,
        /// etcd client URLs.
        etcd_endpoints: Vec<String>,
        /// The `leasehold-server` binary.
        bin: PathBuf,
    },
    /// Use servers that are already running (chaos then cannot kill one).
    Existing(Vec<String>),
}

/// Everything a run depends on.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Options {
    /// Seats in the venue.
    pub seats: u32,
    /// Front-row seats that most buyers want first (seats `0..hot_seats`).
    pub hot_seats: u32,
    /// Buyers, all shopping at once.
    pub buyers: u32,
    /// At most this many seats per buyer.
    pub seats_per_buyer: u32,
    /// The Leasehold servers.
    pub servers: Servers,
    /// Stall some buyers past their TTL, and kill a server replica once a third of the seats
    /// are sold.
    pub chaos: bool,
    /// Seed for every random choice (same seed, same choices).
    pub seed: u64,
    /// The ledger database; a temporary file when `None`.
    pub ledger: Option<PathBuf>,
    /// Lease TTL of buyers' sessions (kept alive at a third of it).
    pub ttl: Duration,
    /// Lease TTL of the buyers who stall (chaos): the stall outlasts it.
    pub stall_ttl: Duration,
    /// How long a buyer waits in line for a seat before trying another.
    pub wait: Duration,
    /// Draw a progress bar on stderr.
    pub progress: bool,
    /// The bearer token for servers that require one.
    pub bearer_token: Option<String>,
    /// How long a buyer keeps trying while the servers shed it (or cannot be reached): it
    /// waits what they ask (`Retry-After`, with jitter) and asks again, and once the servers
    /// have not served it for this long it goes home, counted as turned away by overload.
    pub patience: Duration,
    /// Percent of the buyers (chosen with the seed) who come as a group of 2 to 4 friends
    /// wanting adjacent seats in one row, taken with one all-or-nothing group lock.
    pub group_percent: u32,
    /// Show each waiting buyer its place in line (`--show-queue`): acquires follow their lock's
    /// queue, and the report counts the buyers who saw their place count down.
    pub show_queue: bool,
    /// Buyers connect only when the doors open (`--cold-start`), so that the crowd's TCP
    /// handshakes land in the sale's first second on the cores the servers and etcd share.
    /// By default each buyer's client opens its connection before the doors open, as buyers
    /// sit on the sale's page before it starts (and as a ticket site's front ends keep pooled
    /// connections to the lock service); the sale's clock starts when the doors open.
    pub cold_start: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            seats: 500,
            hot_seats: 20,
            buyers: 1000,
            seats_per_buyer: 2,
            servers: Servers::Spawn {
                count: 2,
                etcd_endpoints: vec!["http://127.0.0.1:2379".into()],
                bin: servers::default_server_bin(),
            },
            chaos: false,
            seed: 2026,
            ledger: None,
            // Redisson's lock watchdog default; etcd's sessions default to 60 s. Each renewal costs
            // the servers two etcd calls, and in a sale at five times the servers' capacity the
            // renewals of sessions whose buyers sit out a backoff were the largest share of
            // etcd's work at 10 s (docs/performance.md, "Fifth pass").
            ttl: Duration::from_secs(30),
            stall_ttl: Duration::from_secs(2),
            wait: Duration::from_millis(250),
            progress: false,
            bearer_token: None,
            patience: Duration::from_secs(10),
            group_percent: 10,
            show_queue: false,
            cold_start: false,
        }
    }
}

impl Options {
    /// These options with `n` seats, `hot` of them hot.
    pub fn with_seats(mut self, n: u32, hot: u32) -> Self {
        self.seats = n;
        self.hot_seats = hot.min(n);
        self
    }

    /// These options with `n` buyers.
    pub fn with_buyers(mut self, n: u32) -> Self {
        self.buyers = n;
        self
    }

    /// These options with these servers.
    pub fn with_servers(mut self, servers: Servers) -> Self {
        self.servers = servers;
        self
    }

    /// These options with chaos on or off.
    pub fn with_chaos(mut self, chaos: bool) -> Self {
        self.chaos = chaos;
        self
    }

    /// These options with this seed.
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// These options with these TTLs: buyers' sessions, and stalled buyers' locks.
    pub fn with_ttls(mut self, ttl: Duration, stall_ttl: Duration) -> Self {
        self.ttl = ttl;
        self.stall_ttl = stall_ttl;
        self
    }

    /// These options with a progress bar (or not).
    pub fn with_progress(mut self, progress: bool) -> Self {
        self.progress = progress;
        self
    }

    /// These options with this patience for buyers the servers shed.
    pub fn with_patience(mut self, patience: Duration) -> Self {
        self.patience = patience;
        self
    }

    /// These options with `percent` of the buyers coming as groups of friends (0: none).
    pub fn with_groups(mut self, percent: u32) -> Self {
        self.group_percent = percent.min(100);
        self
    }

    /// These options with buyers shown their place in line (or not).
    pub fn with_show_queue(mut self, show: bool) -> Self {
        self.show_queue = show;
        self
    }

    /// These options with buyers connecting only when the doors open (or before, the default).
    pub fn with_cold_start(mut self, cold: bool) -> Self {
        self.cold_start = cold;
        self
    }

    /// These options with this wait in line for a seat before trying another.
    pub fn with_wait(mut self, wait: Duration) -> Self {
        self.wait = wait;
        self
    }

    /// These options with the ledger at `path`.
    pub fn with_ledger(mut self, path: PathBuf) -> Self {
        self.ledger = Some(path);
        self
    }
}

/// Runs the concert and audits the ledger.
pub async fn run(options: Options) -> Result<Report> {
    anyhow::ensure!(
        options.seats > 0 && options.buyers > 0,
        "need seats and buyers"
    );
    servers::raise_open_file_limit();
    let scratch = tempfile::tempdir()?;
    let ledger_path = options
        .ledger
        .clone()
        .unwrap_or_else(|| scratch.path().join("ledger.db"));
    Ledger::open(&ledger_path)
        .and_then(|mut l| l.reset(options.seats))
        .with_context(|| format!("creating the ledger at {}", ledger_path.display()))?;

    let mut replicas = servers::Replicas::start(&options.servers).await?;
    let shop = Arc::new(buyers::Shop::new(&options, &ledger_path, replicas.urls())?);
    let started = Instant::now();
    let mut events = Vec::new();

    // Chaos (a): stalled buyers take their seats before the crowd arrives.
    let stalls = if options.chaos {
        buyers::start_stalls(&shop, &options).await?
    } else {
        Vec::new()
    };

    let crowd = buyers::release_the_crowd(&shop, &options);

    // Chaos (b): kill a replica once a third of the seats are sold (or everyone is done).
    let mut killed = None;
    if options.chaos {
        match replicas.killable() {
            Some(victim) => {
                let (third, buyers) = (u64::from(options.seats / 3), options.buyers);
                shop.wait_until(|shop| shop.sold() >= third || shop.finished() >= buyers)
                    .await;
                let in_flight = options.buyers - shop.finished();
                let url = replicas.kill(victim).await?;
                // Completed with the measured fail-overs once everyone is done.
                killed = Some(events.len());
                events.push(format!(
                    "killed server replica {url} (kill -9) at {:.1}s with {in_flight} buyers still shopping",
                    started.elapsed().as_secs_f64()
                ));
            }
            None => events.push(
                "server kill skipped: the demo did not start the servers (--endpoints given) or only one runs"
                    .into(),
            ),
        }
    }

    let outcomes = crowd.await??;
    for stall in stalls {
        events.push(stall.await??);
    }
    let elapsed = started.elapsed();
    if let Some(i) = killed {
        let failovers = shop.failovers.load(std::sync::atomic::Ordering::Relaxed);
        events[i].push_str(&format!(
            "; {failovers} requests were answered by another replica after one failed (fail-overs)"
        ));
    }
    shop.finish_progress();
    let audit = Ledger::open(&ledger_path)?.audit()?;
    Ok(Report::new(
        &options, &shop, &outcomes, audit, events, elapsed,
    ))
}

/// Runs the sale twice with the same seed, once with `options.buyers` buyers and once with five
/// times as many, each on fresh servers and a fresh ledger: does goodput hold when the crowd is
/// five times what the servers can take?
pub async fn compare(options: Options) -> Result<Comparison> {
    let fivefold = options
        .buyers
        .checked_mul(5)
        .context("too many buyers to multiply by 5")?;
    let mut second = options.clone().with_buyers(fivefold);
    if let Some(path) = &options.ledger {
        // One ledger file each, so the first run's sales can be read after the second.
        second.ledger = Some(path.with_extension("5x.db"));
    }
    let single = run(options).await?;
    let fivefold = run(second).await?;
    Ok(Comparison { single, fivefold })
}
