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
    args: Vec<String>,
    child: Option<Child>,
}

impl Replica {
    /// Spawns `bin` against `etcd` with `--etcd-timeout 2s` on a free port and waits until it
    /// serves `/healthz`.
    pub async fn spawn(bin: &Path, etcd: &[String]) -> Result<Self> {
        Self::spawn_with(bin, etcd, &["--etcd-timeout", "2s"]).await
    }

    /// Like [`Replica::spawn`], with exactly these etcd endpoints, in this order (a server tries
    /// the first one first), and these extra arguments instead of `--etcd-timeout 2s`. Restarts
    /// use the same.
    pub async fn spawn_with(bin: &Path, etcd: &[String], args: &[&str]) -> Result<Self> {
        let mut replica = Self {
            bin: bin.to_owned(),
            port: free_port()?,
            etcd: etcd.to_vec(),
            args: args.iter().map(|a| a.to_string()).collect(),
            child: None,
        };
        replica.restart().await?;
        Ok(replica)
    }

    /// The etcd endpoints it was given, in order.
    pub fn etcd_endpoints(&self) -> &[String] {
        &self.etcd
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
                .args(&self.args)
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
    /// The TTL of each hold (and of each session lease).
    pub ttl: Duration,
    /// How long an acquire waits in line.
    pub wait: Duration,
    /// One acquire in four waits only up to this long instead, and mostly gives up (`lock_held`):
    /// its server must clean its waiter key up.
    pub short_wait: Duration,
    /// Holds last up to this long (some past a third of the TTL, so background renewals run).
    pub max_hold: Duration,
    /// One hold in five lasts up to this long instead: past the TTL, so it lives on background
    /// renewals, and a fault in the middle can make its timer run out.
    pub long_hold: Duration,
    /// The client's bound on one HTTP attempt.
    pub request_timeout: Duration,
    /// After an acquire of unknown outcome, its client leaves that lock alone this long, so that
    /// a key it may have left behind is seen only by others (rule 7 of the checker).
    pub avoid_after_unknown: Duration,
    /// Every lock is a semaphore of this many holders (declared to the checker); `None`:
    /// mutexes.
    pub limit: Option<u32>,
    /// One acquire in two asks for this lock-delay (an expired hold then holds its slot back).
    pub lock_delay: Option<Duration>,
}

impl WorkloadConfig {
    /// `clients` clients on locks `l0..l{locks}`, TTL 2 s (etcd's minimum), wait 1 s (short
    /// waits up to 300 ms), holds up to 1.2 s, one in five up to 4 s.
    pub fn new(clients: usize, locks: usize) -> Self {
        Self {
            clients,
            locks: (0..locks).map(|i| format!("l{i}")).collect(),
            ttl: Duration::from_secs(2),
            wait: Duration::from_secs(1),
            short_wait: Duration::from_millis(300),
            max_hold: Duration::from_millis(1200),
            long_hold: Duration::from_secs(4),
            request_timeout: Duration::from_secs(3),
            avoid_after_unknown: Duration::from_secs(12),
            limit: None,
            lock_delay: None,
        }
    }
}

/// Contending clients running until stopped.
pub struct Workload {
    /// Start no new round; a client in a session keeps its lease (alive) until `stop`.
    quiesce: CancellationToken,
    stop: CancellationToken,
    tasks: Vec<JoinHandle<Result<()>>>,
}

impl Workload {
    /// Starts `config.clients` client tasks on `endpoints` (client `i` prefers endpoint
    /// `i % endpoints.len()`, then the next ones in order), recording into `recorder` and writing
    /// to `ledger`; client `i` is named `c{i}` and draws from `seed + i`.
    ///
    /// Each client loops over three kinds of rounds:
    /// - a lock under a lease of its own (`.ttl()`): acquire, hold, maybe renew, write if still
    ///   held, release (which revokes the lease);
    /// - a session: grant a lease, take one to three locks in turn under it (one session in three:
    ///   six to twelve), each released or the last one ended by revoking the lease while held,
    ///   then revoke the lease; one session in six instead revokes the lease by id and handle
    ///   while the client still has it and asks for a lock under it once more, which must fail;
    /// - a status read of a lock.
    ///
    /// One acquire in four waits only [`WorkloadConfig::short_wait`] and mostly gives up.
    pub fn start(
        endpoints: &[String],
        config: WorkloadConfig,
        recorder: &Recorder,
        ledger: &FencedLedger,
        seed: u64,
    ) -> Result<Self> {
        let (quiesce, stop) = (CancellationToken::new(), CancellationToken::new());
        if let Some(limit) = config.limit {
            for lock in &config.locks {
                recorder.record("", lock, Kind::Semaphore { limit });
            }
        }
        let config = Arc::new(config);
        let mut tasks = Vec::new();
        for i in 0..config.clients {
            let mut mine = endpoints.to_vec();
            mine.rotate_left(i % endpoints.len().max(1));
            let client = leasehold::Client::builder()
                .endpoints(mine)
                .request_timeout(config.request_timeout)
                .build()?;
            let worker = Worker {
                me: format!("c{i}"),
                client,
                config: config.clone(),
                rec: recorder.clone(),
                ledger: ledger.clone(),
                rng: Rng::new(seed.wrapping_add(i as u64)),
                quiesce: quiesce.clone(),
                stop: stop.clone(),
                avoid: Vec::new(),
            };
            tasks.push(tokio::spawn(worker.run()));
        }
        Ok(Self {
            quiesce,
            stop,
            tasks,
        })
    }

    /// Lets every client finish its current operation and release what it holds, but a client
    /// in a session keeps that lease alive (unrevoked) until [`Workload::stop`]: whatever a
    /// lock's holder is from then on, no client was told it. A key of unknown outcome left
    /// under such a lease is removed only by the server's clean-up.
    pub fn quiesce(&self) {
        self.quiesce.cancel();
    }

    /// Stops every client after its current operation (each releases what it holds and revokes
    /// its session) and waits for them.
    pub async fn stop(self) -> Result<()> {
        self.quiesce.cancel();
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
        leasehold::Error::Forbidden { .. } => "forbidden".into(),
        other => other.to_string(),
    }
}

/// The history event for an acquire's outcome.
pub fn acquired(result: &Result<leasehold::LockGuard, leasehold::Error>) -> Kind {
    match result {
        Ok(guard) => Kind::AcquireOk {
            token: guard.token().get(),
        },
        Err(leasehold::Error::LockHeld { holder }) => Kind::AcquireHeld {
            holder: holder.as_ref().map(|h| h.token.get()),
            owner: holder.as_ref().and_then(|h| h.owner.clone()),
        },
        Err(err) => Kind::AcquireFail { error: brief(err) },
    }
}

/// One client of the workload.
struct Worker {
    me: String,
    client: leasehold::Client,
    config: Arc<WorkloadConfig>,
    rec: Recorder,
    ledger: FencedLedger,
    rng: Rng,
    quiesce: CancellationToken,
    stop: CancellationToken,
    /// Locks to leave alone until then (after an acquire of unknown outcome).
    avoid: Vec<(usize, Instant)>,
}

impl Worker {
    async fn run(mut self) -> Result<()> {
        while !self.quiesce.is_cancelled() {
            match self.rng.below(6) {
                0..=2 => self.own_lease_round().await?,
                3 | 4 => self.session().await?,
                _ => self.status_read().await,
            }
            tokio::time::sleep(self.rng.between(Duration::ZERO, Duration::from_millis(50))).await;
        }
        Ok(())
    }

    /// A lock to use: random, but not one this client got no answer about recently.
    fn pick_lock(&mut self) -> usize {
        let now = Instant::now();
        self.avoid.retain(|(_, until)| *until > now);
        let n = self.config.locks.len();
        let first = self.rng.below(n);
        (0..n)
            .map(|k| (first + k) % n)
            .find(|seat| !self.avoid.iter().any(|(l, _)| l == seat))
            .unwrap_or(first)
    }

    /// The kind of lock the workload uses (a semaphore with `limit`), and one time in two its
    /// lock-delay.
    fn shape<'a>(&mut self, builder: leasehold::LockBuilder<'a>) -> leasehold::LockBuilder<'a> {
        let builder = match self.config.limit {
            Some(limit) => builder.limit(limit),
            None => builder,
        };
        match self.config.lock_delay {
            Some(delay) if self.rng.one_in(2) => builder.lock_delay(delay),
            _ => builder,
        }
    }

    fn wait(&mut self) -> Duration {
        if self.rng.one_in(4) {
            self.rng
                .between(Duration::from_millis(50), self.config.short_wait)
        } else {
            self.config.wait
        }
    }

    /// Records the outcome of an acquire; after an unknown one, leaves the lock alone a while
    /// and pauses.
    async fn record_acquire(
        &mut self,
        op: &crate::history::Op,
        seat: usize,
        result: &Result<leasehold::LockGuard, leasehold::Error>,
    ) {
        let kind = acquired(result);
        let unknown =
            matches!(&kind, Kind::AcquireFail { error } if crate::history::is_indeterminate(error));
        self.rec.complete(op, kind);
        if unknown {
            self.avoid
                .push((seat, Instant::now() + self.config.avoid_after_unknown));
        }
        if result.is_err() {
            let pause = self
                .rng
                .between(Duration::from_millis(20), self.config.wait / 4);
            tokio::time::sleep(pause).await;
        }
    }

    /// A lock under a lease of its own: the crate grants the lease, and revokes it on failure
    /// and on release.
    async fn own_lease_round(&mut self) -> Result<()> {
        let seat = self.pick_lock();
        let lock = self.config.locks[seat].clone();
        let wait = self.wait();
        let op = self.rec.invoke(&self.me, &lock, Kind::AcquireInvoke);
        let builder = self.client.lock(lock.as_str());
        let result = self
            .shape(builder)
            .ttl(self.config.ttl)
            .wait(wait)
            .owner(&self.me)
            .acquire()
            .await;
        self.record_acquire(&op, seat, &result).await;
        let Ok(guard) = result else {
            return Ok(());
        };
        self.hold(&lock, seat, &guard, None).await?;
        self.release(&lock, guard).await;
        Ok(())
    }

    /// A session: one lease, up to three locks in turn under it, then the lease revoked.
    async fn session(&mut self) -> Result<()> {
        let op = self.rec.invoke(&self.me, "", Kind::LeaseGrantInvoke);
        let lease = match self
            .client
            .grant_lease_for(self.config.ttl, Some(self.me.clone()))
            .await
        {
            Ok(lease) => {
                self.rec.complete(
                    &op,
                    Kind::LeaseGrantOk {
                        lease: lease.id().to_string(),
                        ttl_ms: lease.ttl().as_millis() as u64,
                    },
                );
                lease
            }
            Err(err) => {
                self.rec
                    .complete(&op, Kind::LeaseGrantFail { error: brief(&err) });
                tokio::time::sleep(Duration::from_millis(100)).await;
                return Ok(());
            }
        };
        let id = lease.id().to_string();
        // One session in three is long (6 to 12 locks in turn): a key of unknown outcome left
        // under it outlives the short sessions, and only the server's clean-up removes it.
        let rounds = if self.rng.one_in(3) {
            6 + self.rng.below(7)
        } else {
            1 + self.rng.below(3)
        };
        let mut kept = None;
        for round in 0..rounds {
            if self.quiesce.is_cancelled() {
                break;
            }
            if !lease.is_alive() {
                let reason = lease.lost().await;
                self.rec.record(
                    &self.me,
                    "",
                    Kind::LeaseEnded {
                        lease: id.clone(),
                        reason: format!("{reason:?}"),
                    },
                );
                break;
            }
            let seat = self.pick_lock();
            let lock = self.config.locks[seat].clone();
            let wait = self.wait();
            let op = self
                .rec
                .invoke(&self.me, &lock, Kind::AcquireUnder { lease: id.clone() });
            let builder = self.client.lock(lock.as_str());
            let result = self
                .shape(builder)
                .lease(&lease)
                .wait(wait)
                .owner(&self.me)
                .acquire()
                .await;
            self.record_acquire(&op, seat, &result).await;
            let Ok(guard) = result else {
                continue;
            };
            let last = round + 1 == rounds;
            let keep = last && self.rng.one_in(4);
            if self.hold(&lock, seat, &guard, Some(keep)).await? {
                kept = Some(guard);
            } else {
                self.release(&lock, guard).await;
            }
        }
        if self.quiesce.is_cancelled() && kept.is_none() {
            // Keep the lease (kept alive in the background) until the run stops.
            self.stop.cancelled().await;
        }
        if self.rng.one_in(6) && kept.is_none() && lease.is_alive() {
            return self.revoke_and_probe(lease).await;
        }
        // Ends every hold under it (a kept one included).
        self.revoke(lease).await;
        if let Some(guard) = kept {
            // Its lease is revoked: forget it without a release.
            let _ = guard.detach();
        }
        Ok(())
    }

    /// Revokes `lease` through the crate (which stops keeping it alive first).
    async fn revoke(&mut self, lease: leasehold::Lease) {
        let id = lease.id().to_string();
        self.rec.record(
            &self.me,
            "",
            Kind::LeaseEnded {
                lease: id.clone(),
                reason: "revoked".into(),
            },
        );
        let op = self
            .rec
            .invoke(&self.me, "", Kind::RevokeInvoke { lease: id.clone() });
        let revoked = lease.revoke().await;
        self.rec.complete(
            &op,
            match revoked {
                Ok(()) => Kind::RevokeOk { lease: id },
                Err(err) => Kind::RevokeFail {
                    lease: id,
                    error: brief(&err),
                },
            },
        );
    }

    /// Revokes `lease` by id and handle (as another process holding the handle would) while
    /// this client still has it, then asks for a lock under it: a confirmed revoke must make
    /// that fail.
    async fn revoke_and_probe(&mut self, lease: leasehold::Lease) -> Result<()> {
        let id = lease.id().to_string();
        let op = self
            .rec
            .invoke(&self.me, "", Kind::RevokeInvoke { lease: id.clone() });
        let confirmed = match self.client.revoke_lease(lease.id(), lease.handle()).await {
            Ok(()) => {
                self.rec.complete(&op, Kind::RevokeOk { lease: id.clone() });
                true
            }
            Err(err) => {
                self.rec.complete(
                    &op,
                    Kind::RevokeFail {
                        lease: id.clone(),
                        error: brief(&err),
                    },
                );
                false
            }
        };
        let seat = self.pick_lock();
        let lock = self.config.locks[seat].clone();
        let op = self
            .rec
            .invoke(&self.me, &lock, Kind::AcquireUnder { lease: id.clone() });
        let builder = self.client.lock(lock.as_str());
        let result = self
            .shape(builder)
            .lease(&lease)
            .owner(&self.me)
            .try_acquire()
            .await;
        self.record_acquire(&op, seat, &result).await;
        if let Ok(guard) = result {
            // Legitimate only if the revoke was not confirmed (the checker says): release it.
            self.release(&lock, guard).await;
        }
        if confirmed {
            self.rec.record(
                &self.me,
                "",
                Kind::LeaseEnded {
                    lease: id,
                    reason: "revoked by id, then detached".into(),
                },
            );
            let _ = lease.detach();
        } else {
            self.revoke(lease).await;
        }
        Ok(())
    }

    /// Reads the status of a lock.
    async fn status_read(&mut self) {
        let seat = self.rng.below(self.config.locks.len());
        let lock = self.config.locks[seat].clone();
        let op = self.rec.invoke(&self.me, &lock, Kind::StatusInvoke);
        match self.client.status(&lock).await {
            Ok(status) => self.rec.complete(
                &op,
                Kind::StatusOk {
                    holder: status.holder.as_ref().map(|h| h.token.get()),
                    owner: status.holder.and_then(|h| h.owner),
                },
            ),
            Err(err) => self
                .rec
                .complete(&op, Kind::StatusFail { error: brief(&err) }),
        }
    }

    /// Holds `guard` a while (renewing explicitly one time in three), then writes its seat in
    /// the fenced ledger if the hold is still held at that moment. A hold lost meanwhile is
    /// recorded. `keep`: for a hold under a session lease, whether to end it by revoking the
    /// lease rather than releasing it; true if it is to be kept (and still held).
    async fn hold(
        &mut self,
        lock: &str,
        seat: usize,
        guard: &leasehold::LockGuard,
        keep: Option<bool>,
    ) -> Result<bool> {
        let token = guard.token().get();
        let longest = if self.rng.one_in(5) {
            self.config.long_hold
        } else {
            self.config.max_hold
        };
        let hold = self.rng.between(Duration::ZERO, longest);
        let renew = self.rng.one_in(3);
        let (me, rec, client, ledger) = (&self.me, &self.rec, &self.client, &self.ledger);
        let work = async {
            tokio::time::sleep(hold / 2).await;
            if renew {
                // An explicit renewal, so renewals are in the history too (the guard's own
                // background renewals are not visible from outside).
                let op = rec.invoke(me, lock, Kind::RenewInvoke { token });
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
                .write_if(me, lock, seat as u32, token, || guard.is_held())
                .await
        };
        tokio::select! {
            biased;
            // The hold ends here for the checker: the client timer ran out or the server
            // refused a renewal. Recorded when noticed, which is at or after the timer's
            // deadline (conservative: the hold looks longer, never shorter).
            reason = guard.lost() => rec.record(
                me,
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
        Ok(keep == Some(true) && guard.is_held())
    }

    async fn release(&mut self, lock: &str, guard: leasehold::LockGuard) {
        let token = guard.token().get();
        let op = self
            .rec
            .invoke(&self.me, lock, Kind::ReleaseInvoke { token });
        match guard.release().await {
            Ok(()) => self.rec.complete(&op, Kind::ReleaseOk { token }),
            Err(err) => self.rec.complete(
                &op,
                Kind::ReleaseFail {
                    token,
                    error: brief(&err),
                },
            ),
        }
    }
}

/// Reads the status of every lock in `locks` through a client over `urls`, recording each read
/// into `recorder` as client `observer`; returns the holders seen (lock, token, owner). The
/// checker must explain each (rule 7).
pub async fn observe_holders(
    urls: &[String],
    locks: &[String],
    recorder: &Recorder,
) -> Result<Vec<(String, u64, Option<String>)>> {
    let client = leasehold::Client::builder()
        .endpoints(urls.iter().cloned())
        .request_timeout(Duration::from_secs(3))
        .build()?;
    let mut held = Vec::new();
    for lock in locks {
        let op = recorder.invoke("observer", lock, Kind::StatusInvoke);
        match client.status(lock).await {
            Ok(status) => {
                let holder = status.holder;
                recorder.complete(
                    &op,
                    Kind::StatusOk {
                        holder: holder.as_ref().map(|h| h.token.get()),
                        owner: holder.as_ref().and_then(|h| h.owner.clone()),
                    },
                );
                if let Some(h) = holder {
                    held.push((lock.clone(), h.token.get(), h.owner));
                }
            }
            Err(err) => recorder.complete(&op, Kind::StatusFail { error: brief(&err) }),
        }
    }
    Ok(held)
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
