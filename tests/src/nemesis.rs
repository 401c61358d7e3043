//! Fault-run helpers: a seeded random source, server replicas that can be killed and restarted
//! on the same port, a fenced resource (the concert demo's SQLite ledger) that records into a
//! [`Recorder`], and a contending workload of clients that record every operation.
//!
//! # Usage
//! ```no_run
//! # async fn example() -> anyhow::Result<()> {
//! use leasehold_tests::{EtcdCluster, history::Recorder, nemesis::*};
//! let seed = seed("example");
//! let etcd = EtcdCluster::start(3).await?;
//! let bin = std::path::PathBuf::from("target/debug/test-leasehold-server");
//! let servers = vec![Replica::spawn(&bin, &etcd.endpoints()).await?];
//! let recorder = Recorder::new();
//! let dir = tempfile::tempdir()?;
//! let ledger = FencedLedger::open(&dir.path().join("ledger.db"), 2, &recorder)?;
//! let config = WorkloadConfig::new(4, 2);
//! let run = Workload::start(&urls(&servers), config.clone(), &recorder, &ledger, seed)?;
//! tokio::time::sleep(std::time::Duration::from_secs(5)).await;
//! run.stop().await?;
//! println!("{}", recorder.check()?);
//! # Ok(()) }
//! ```

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use concert::{Ledger, SaleOutcome};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::history::{Kind, Recorder};
use crate::{Api, encode, free_port};

/// The run's seed: `LEASEHOLD_SEED` if set, else fresh. Printed with the line that replays it.
pub fn seed(test: &str) -> u64 {
    let seed = std::env::var("LEASEHOLD_SEED")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
                % 1_000_000_000
        });
    println!(
        "{test}: seed {seed} (replay: LEASEHOLD_SEED={seed} cargo test -p leasehold-tests --test safety_faults {test} -- --nocapture)"
    );
    seed
}

/// A small deterministic random source (SplitMix64): same seed, same choices.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A source seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// A duration uniform in `lo..=hi`, to the millisecond.
    pub fn between(&mut self, lo: Duration, hi: Duration) -> Duration {
        let (lo, hi) = (lo.as_millis() as u64, hi.as_millis() as u64);
        Duration::from_millis(lo + self.next_u64() % (hi.saturating_sub(lo) + 1))
    }

    /// True with probability `1/n`.
    pub fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }
}

/// A `leasehold-server` process that can be `kill -9`ed and restarted on the same port, so
/// clients configured with its URL find it again.
pub struct Replica {
    bin: PathBuf,
    port: u16,
    etcd: Vec<String>,
    child: Option<Child>,
}

impl Replica {
    /// Spawns `bin` against `etcd` with `--etcd-timeout 2s` on a free port and waits until it
    /// serves `/healthz`.
    pub async fn spawn(bin: &Path, etcd: &[String]) -> Result<Self> {
        let mut replica = Self {
            bin: bin.to_owned(),
            port: free_port()?,
            etcd: etcd.to_vec(),
            child: None,
        };
        replica.restart().await?;
        Ok(replica)
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// True unless killed.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// `kill -9`: no clean-up runs.
    pub async fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().await?;
        }
        Ok(())
    }

    /// Starts it again on its port (retrying while the port is still being released).
    pub async fn restart(&mut self) -> Result<()> {
        if self.child.is_some() {
            bail!("replica on port {} is running", self.port);
        }
        let api = Api::new(self.url());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let mut child = Command::new(&self.bin)
                .args(["--listen", &format!("127.0.0.1:{}", self.port)])
                .args(["--etcd-endpoints", &self.etcd.join(",")])
                .args(["--etcd-timeout", "2s"])
                .env(
                    "RUST_LOG",
                    std::env::var("RUST_LOG").unwrap_or_else(|_| "error".into()),
                )
                .stdin(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("starting {}", self.bin.display()))?;
            loop {
                if matches!(api.get("/healthz").await, Ok((200, _))) {
                    self.child = Some(child);
                    return Ok(());
                }
                if child.try_wait()?.is_some() {
                    break; // could not bind yet; try again
                }
                if Instant::now() > deadline {
                    bail!("server did not come up on port {}", self.port);
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            if Instant::now() > deadline {
                bail!("server kept exiting on port {}", self.port);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The URLs of `replicas`.
pub fn urls(replicas: &[Replica]) -> Vec<String> {
    replicas.iter().map(Replica::url).collect()
}

/// The concert demo's fenced SQLite ledger as the fenced resource of every lock (lock `i` is
/// seat `i`), recording each write into the history while it holds the ledger, so that the
/// recording order of a seat's writes is the order the ledger saw them.
#[derive(Clone)]
pub struct FencedLedger {
    db: Arc<tokio::sync::Mutex<Ledger>>,
    path: PathBuf,
    recorder: Recorder,
}

impl FencedLedger {
    /// Opens (creates) the ledger at `path` with `seats` unsold seats.
    pub fn open(path: &Path, seats: u32, recorder: &Recorder) -> Result<Self> {
        let mut ledger = Ledger::open(path)?;
        ledger.reset(seats)?;
        Ok(Self {
            db: Arc::new(tokio::sync::Mutex::new(ledger)),
            path: path.to_owned(),
            recorder: recorder.clone(),
        })
    }

    /// The database file (for another process to write to).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes seat `seat` with `token` for `client` if `still_held()` says so at the moment the
    /// ledger is ours (check-then-write with nothing in between, as a careful client does).
    /// `None` if the hold was gone and nothing was written.
    pub async fn write_if(
        &self,
        client: &str,
        lock: &str,
        seat: u32,
        token: u64,
        still_held: impl FnOnce() -> bool,
    ) -> Result<Option<SaleOutcome>> {
        let mut db = self.db.lock().await;
        if !still_held() {
            return Ok(None);
        }
        let op = self
            .recorder
            .invoke(client, lock, Kind::WriteInvoke { token });
        let outcome = db.sell(seat, client, token)?;
        self.recorder.complete(&op, written(outcome, token));
        Ok(Some(outcome))
    }

    /// Holds the ledger (no in-process write gets in) while another process writes to it, so
    /// that write's place in the order is known.
    pub async fn exclusive(&self) -> tokio::sync::OwnedMutexGuard<Ledger> {
        self.db.clone().lock_owned().await
    }

    /// The ledger's own audit (counts from its tables).
    pub async fn audit(&self) -> Result<concert::Audit> {
        Ok(self.db.lock().await.audit()?)
    }
}

/// The history event for a ledger outcome.
pub fn written(outcome: SaleOutcome, token: u64) -> Kind {
    match outcome {
        SaleOutcome::Accepted => Kind::WriteAccepted { token },
        SaleOutcome::StaleToken => Kind::WriteRejected { token },
    }
}

/// How the contending clients behave.
#[derive(Debug, Clone)]
pub struct WorkloadConfig {
    /// Client tasks, each with its own `leasehold::Client` over every server.
    pub clients: usize,
    /// Lock names; lock `i` guards seat `i`.
    pub locks: Vec<String>,
    /// The TTL of each hold.
    pub ttl: Duration,
    /// How long an acquire waits in line.
    pub wait: Duration,
    /// Holds last up to this long (some past a third of the TTL, so background renewals run).
    pub max_hold: Duration,
    /// One hold in five lasts up to this long instead: past the TTL, so it lives on background
    /// renewals, and a fault in the middle can make its timer run out.
    pub long_hold: Duration,
    /// The client's bound on one HTTP attempt.
    pub request_timeout: Duration,
}

impl WorkloadConfig {
    /// `clients` clients on locks `l0..l{locks}`, TTL 2 s (etcd's minimum), wait 1 s, holds up
    /// to 1.2 s, one in five up to 4 s.
    pub fn new(clients: usize, locks: usize) -> Self {
        Self {
            clients,
            locks: (0..locks).map(|i| format!("l{i}")).collect(),
            ttl: Duration::from_secs(2),
            wait: Duration::from_secs(1),
            max_hold: Duration::from_millis(1200),
            long_hold: Duration::from_secs(4),
            request_timeout: Duration::from_secs(3),
        }
    }
}

/// Contending clients running until stopped.
pub struct Workload {
    stop: CancellationToken,
    tasks: Vec<JoinHandle<Result<()>>>,
}

impl Workload {
    /// Starts `config.clients` client tasks on `endpoints` (each client prefers a different
    /// one), recording into `recorder` and writing to `ledger`; client `i` draws from
    /// `seed + i`.
    pub fn start(
        endpoints: &[String],
        config: WorkloadConfig,
        recorder: &Recorder,
        ledger: &FencedLedger,
        seed: u64,
    ) -> Result<Self> {
        let stop = CancellationToken::new();
        let config = Arc::new(config);
        let mut tasks = Vec::new();
        for i in 0..config.clients {
            let mut mine = endpoints.to_vec();
            mine.rotate_left(i % endpoints.len().max(1));
            let client = leasehold::Client::builder()
                .endpoints(mine)
                .request_timeout(config.request_timeout)
                .build()?;
            tasks.push(tokio::spawn(worker(
                format!("c{i}"),
                client,
                config.clone(),
                recorder.clone(),
                ledger.clone(),
                Rng::new(seed.wrapping_add(i as u64)),
                stop.clone(),
            )));
        }
        Ok(Self { stop, tasks })
    }

    /// Stops every client after its current operation (each releases what it holds) and waits
    /// for them.
    pub async fn stop(self) -> Result<()> {
        self.stop.cancel();
        let deadline = Instant::now() + Duration::from_secs(40);
        for task in self.tasks {
            tokio::time::timeout_at(deadline, task)
                .await
                .context("a client did not stop within 40 s")???;
        }
        Ok(())
    }
}

/// A short name for a client error, for the history.
pub fn brief(err: &leasehold::Error) -> String {
    match err {
        leasehold::Error::Unavailable { code, .. } => format!("unavailable({code})"),
        leasehold::Error::Transport { .. } => "transport".into(),
        leasehold::Error::LockHeld { .. } => "lock_held".into(),
        leasehold::Error::NotHolder => "not_holder".into(),
        leasehold::Error::LeaseNotFound => "lease_not_found".into(),
        leasehold::Error::LeaseLost(reason) => format!("lease_lost({reason:?})"),
        other => other.to_string(),
    }
}

async fn worker(
    me: String,
    client: leasehold::Client,
    config: Arc<WorkloadConfig>,
    rec: Recorder,
    ledger: FencedLedger,
    mut rng: Rng,
    stop: CancellationToken,
) -> Result<()> {
    while !stop.is_cancelled() {
        let seat = rng.below(config.locks.len());
        let lock = config.locks[seat].as_str();
        let op = rec.invoke(&me, lock, Kind::AcquireInvoke);
        let acquired = client
            .lock(lock)
            .ttl(config.ttl)
            .wait(config.wait)
            .owner(&me)
            .acquire()
            .await;
        let guard = match acquired {
            Ok(guard) => {
                rec.complete(
                    &op,
                    Kind::AcquireOk {
                        token: guard.token().get(),
                    },
                );
                guard
            }
            Err(err) => {
                rec.complete(&op, Kind::AcquireFail { error: brief(&err) });
                tokio::time::sleep(rng.between(Duration::from_millis(20), config.wait / 4)).await;
                continue;
            }
        };
        let token = guard.token().get();
        let longest = if rng.one_in(5) {
            config.long_hold
        } else {
            config.max_hold
        };
        let hold = rng.between(Duration::ZERO, longest);
        let renew = rng.one_in(3);
        let work = async {
            tokio::time::sleep(hold / 2).await;
            if renew {
                // An explicit renewal, so renewals are in the history too (the guard's own
                // background renewals are not visible from outside).
                let op = rec.invoke(&me, lock, Kind::RenewInvoke { token });
                match client.renew(lock, guard.token(), guard.handle()).await {
                    Ok(_) => rec.complete(&op, Kind::RenewOk { token }),
                    Err(err) => rec.complete(
                        &op,
                        Kind::RenewFail {
                            token,
                            error: brief(&err),
                        },
                    ),
                }
            }
            tokio::time::sleep(hold / 2).await;
            ledger
                .write_if(&me, lock, seat as u32, token, || guard.is_held())
                .await
        };
        tokio::select! {
            biased;
            // The hold ends here for the checker: the client timer ran out or the server
            // refused a renewal. Recorded when noticed, which is at or after the timer's
            // deadline (conservative: the hold looks longer, never shorter).
            reason = guard.lost() => rec.record(
                &me,
                lock,
                Kind::HoldLost {
                    token,
                    reason: format!("{reason:?}"),
                },
            ),
            written = work => {
                written?;
            }
        }
        let op = rec.invoke(&me, lock, Kind::ReleaseInvoke { token });
        match guard.release().await {
            Ok(()) => rec.complete(&op, Kind::ReleaseOk { token }),
            Err(err) => rec.complete(
                &op,
                Kind::ReleaseFail {
                    token,
                    error: brief(&err),
                },
            ),
        }
        tokio::time::sleep(rng.between(Duration::ZERO, Duration::from_millis(50))).await;
    }
    Ok(())
}

/// Waits (up to `within`) until no lock in `locks` has a holder, asking any server in `urls`
/// that answers; returns how long that took. Run it once the clients have stopped: a holder
/// left then is a phantom (only orphaned leases of killed requests may linger, for one TTL).
pub async fn wait_no_holders(
    urls: &[String],
    locks: &[String],
    within: Duration,
) -> Result<Duration> {
    let started = Instant::now();
    let mut last = String::new();
    loop {
        let mut free = 0;
        'locks: for lock in locks {
            for url in urls {
                if let Ok((200, body)) = Api::new(url.clone())
                    .get(&format!("/v1/locks/{}", encode(lock)))
                    .await
                {
                    if body["holder"].is_null() {
                        free += 1;
                    } else {
                        last = body.to_string();
                    }
                    continue 'locks;
                }
            }
        }
        if free == locks.len() {
            return Ok(started.elapsed());
        }
        if started.elapsed() > within {
            bail!("phantom holder: still held {within:?} after the clients stopped: {last}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
