//! The workloads, each run the same way against Leasehold (HTTP) and etcd's lock service
//! (etcd-client's `lock`/`unlock` with an existing lease).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use etcd_client::{GetOptions, LockOptions};
use futures::StreamExt;
use leasehold_tests::{Api, HANDLE_HEADER};
use serde::Serialize;
use serde_json::json;

use crate::measure::{Costs, Latency, Probes, Window, status_kib};

/// Requests in flight while granting or revoking the leases a phase needs (outside windows).
const SETUP_IN_FLIGHT: usize = 64;
/// TTL of the leases a phase's tasks hold (they are revoked when the phase ends).
const PHASE_LEASE_TTL_SECS: i64 = 600;

/// Which lock service a phase measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum System {
    /// Leasehold over HTTP (one `leasehold-server` process).
    Leasehold,
    /// etcd's own lock service (`v3lockpb.Lock/Lock` and `Unlock`) on the same etcd.
    Etcd,
}

impl System {
    pub fn describe(self) -> &'static str {
        match self {
            System::Leasehold => "Leasehold HTTP",
            System::Etcd => "etcd lock service",
        }
    }
}

/// A `perf record` of the server to take during one Leasehold uncontended phase.
#[derive(Clone, Debug)]
pub struct PerfRequest {
    pub out: PathBuf,
    pub tasks: usize,
}

/// What every phase needs.
pub struct Ctx {
    /// The Leasehold server under test.
    pub api: Api,
    /// etcd-client on the same etcd, without a request timeout (waits on etcd's lock can be long),
    /// for setup and queue counts.
    pub etcd: etcd_client::Client,
    /// etcd's client URLs: each task of etcd's lock service connects its own client.
    pub etcd_endpoints: Vec<String>,
    pub probes: Probes,
    /// The server's key prefix (its `--prefix`).
    pub key_prefix: String,
    /// Unique per run: lock names never repeat across runs or phases.
    pub run: String,
    pub warmup: Duration,
    pub window: Duration,
    pub perf: Option<PerfRequest>,
    /// Set when `perf record` ran during a phase (its figures are perturbed).
    pub perf_note: Mutex<Option<String>>,
}

/// A lease granted through Leasehold, with the handle that proves it is ours.
#[derive(Clone)]
pub struct LeaseholdLease {
    pub id: String,
    pub handle: String,
}

/// Grants `n` Leasehold leases (TTL `ttl`), `SETUP_IN_FLIGHT` at a time.
pub async fn leasehold_leases(api: &Api, n: usize, ttl: &str) -> Result<Vec<LeaseholdLease>> {
    futures::stream::iter(0..n)
        .map(|i| {
            let api = api.clone();
            let ttl = ttl.to_owned();
            async move {
                // Set-up is not measured: a grant the server sheds (`503 overloaded`, on a busy
                // machine) is asked again, as a well-behaved client does.
                let (status, body) = api
                    .post_setup(
                        "/v1/leases",
                        json!({"ttl": ttl, "owner": format!("bench-{i}")}),
                    )
                    .await?;
                anyhow::ensure!(status == 201, "lease grant: {status} {body}");
                Ok(LeaseholdLease {
                    id: body["lease_id"].as_str().context("lease_id")?.to_owned(),
                    handle: body["handle"].as_str().context("handle")?.to_owned(),
                })
            }
        })
        .buffer_unordered(SETUP_IN_FLIGHT)
        .collect::<Vec<Result<_>>>()
        .await
        .into_iter()
        .collect()
}

/// Revokes Leasehold leases (best effort: they expire anyway).
async fn revoke_leasehold(api: &Api, leases: Vec<LeaseholdLease>) {
    futures::stream::iter(leases)
        .for_each_concurrent(SETUP_IN_FLIGHT, |lease| {
            let api = api.clone();
            async move {
                let _ = api
                    .http()
                    .delete(format!("{}/v1/leases/{}", api.base(), lease.id))
                    .header(HANDLE_HEADER, lease.handle)
                    .send()
                    .await;
            }
        })
        .await;
}

/// Grants `n` etcd leases.
async fn etcd_leases(client: &etcd_client::Client, n: usize) -> Result<Vec<i64>> {
    futures::stream::iter(0..n)
        .map(|_| {
            let mut client = client.clone();
            async move { Ok(client.lease_grant(PHASE_LEASE_TTL_SECS, None).await?.id()) }
        })
        .buffer_unordered(SETUP_IN_FLIGHT)
        .collect::<Vec<Result<_>>>()
        .await
        .into_iter()
        .collect()
}

/// `n` etcd clients, each its own connection (as `n` separate users of etcd's lock would have;
/// on Leasehold's side each task has its own HTTP keep-alive connection). One connection shared
/// by 1,000 blocked `Lock` calls stalled: the holder's `Unlock` never got through.
async fn etcd_clients(endpoints: &[String], n: usize) -> Result<Vec<etcd_client::Client>> {
    futures::stream::iter(0..n)
        .map(|_| async move {
            let options =
                etcd_client::ConnectOptions::new().with_connect_timeout(Duration::from_secs(2));
            Ok(etcd_client::Client::connect(endpoints, Some(options)).await?)
        })
        .buffer_unordered(SETUP_IN_FLIGHT)
        .collect::<Vec<Result<_>>>()
        .await
        .into_iter()
        .collect()
}

/// Revokes etcd leases (best effort).
async fn revoke_etcd(client: &etcd_client::Client, leases: Vec<i64>) {
    futures::stream::iter(leases)
        .for_each_concurrent(SETUP_IN_FLIGHT, |lease| {
            let mut client = client.clone();
            async move {
                let _ = client.lease_revoke(lease).await;
            }
        })
        .await;
}

/// What one task saw inside the window.
#[derive(Default)]
struct TaskLog {
    samples: Vec<Duration>,
    errors: BTreeMap<String, u64>,
}

impl TaskLog {
    /// Counts a cycle that began at `started` and ended just now, if it ended inside `window`:
    /// its latency if it succeeded, its cause if not.
    fn record(&mut self, window: &Window, started: Instant, outcome: Result<(), String>) {
        let ended = Instant::now();
        if window.contains(ended) {
            match outcome {
                Ok(()) => self.samples.push(ended - started),
                Err(what) => self.error(what),
            }
        }
    }

    fn error(&mut self, what: String) {
        *self.errors.entry(what).or_insert(0) += 1;
    }

    fn merge(logs: Vec<TaskLog>) -> TaskLog {
        let mut all = TaskLog::default();
        for log in logs {
            all.samples.extend(log.samples);
            for (what, n) in log.errors {
                *all.errors.entry(what).or_insert(0) += n;
            }
        }
        all
    }
}

/// A short, bounded description of an HTTP answer that was not the expected one.
fn http_error(step: &str, status: u16, body: &serde_json::Value) -> String {
    let code = body["error"]["code"].as_str().unwrap_or("");
    format!("{step}: HTTP {status} {code}")
        .trim_end()
        .to_owned()
}

/// A short description of an etcd-client error.
fn etcd_error(step: &str, err: &etcd_client::Error) -> String {
    match err {
        etcd_client::Error::GRpcStatus(status) => format!("{step}: gRPC {:?}", status.code()),
        other => {
            let text = other.to_string();
            format!("{step}: {}", text.chars().take(60).collect::<String>())
        }
    }
}

/// One Leasehold acquire (existing lease, no wait) + release on `name`.
async fn leasehold_cycle(api: &Api, name: &str, lease: &LeaseholdLease) -> Result<(), String> {
    let (status, body) = api
        .post_with_handle(
            &format!("/v1/locks/{name}/acquire"),
            json!({"lease_id": lease.id}),
            Some(&lease.handle),
        )
        .await
        .map_err(|_| "acquire: transport error".to_owned())?;
    if status != 200 {
        return Err(http_error("acquire", status, &body));
    }
    let (status, body) = api
        .post_with_handle(
            &format!("/v1/locks/{name}/release"),
            json!({"token": body["token"]}),
            Some(&lease.handle),
        )
        .await
        .map_err(|_| "release: transport error".to_owned())?;
    if status != 200 {
        return Err(http_error("release", status, &body));
    }
    Ok(())
}

/// One etcd lock (existing lease) + unlock on `name`.
async fn etcd_cycle(
    client: &mut etcd_client::Client,
    name: &str,
    lease: i64,
) -> Result<(), String> {
    let lock = client
        .lock(name, Some(LockOptions::new().with_lease(lease)))
        .await
        .map_err(|e| etcd_error("lock", &e))?;
    client
        .unlock(lock.key())
        .await
        .map_err(|e| etcd_error("unlock", &e))?;
    Ok(())
}

/// An uncontended (or overload) phase.
#[derive(Serialize, Clone, Debug)]
pub struct CyclePhase {
    pub tasks: usize,
    /// Successful cycles: count, rate (goodput), latency of a whole acquire + release.
    pub latency: Latency,
    /// Failed cycles by what failed (empty when none).
    pub errors: BTreeMap<String, u64>,
    /// Per successful cycle.
    pub costs: Costs,
    /// Set if `perf record` was attached to the server during this phase.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub perf: Option<String>,
}

/// `tasks` tasks, each with its own lease granted before the phase, cycle acquire + release
/// on a fresh lock name every time, as fast as they can.
pub async fn cycles(ctx: &Ctx, system: System, tasks: usize, label: &str) -> Result<CyclePhase> {
    let base = format!("{}-{label}-t{tasks}", ctx.run);
    let mut handles = Vec::with_capacity(tasks);
    let mut leasehold_leases_held = Vec::new();
    let mut etcd_leases_held = Vec::new();
    match system {
        System::Leasehold => {
            leasehold_leases_held =
                leasehold_leases(&ctx.api, tasks, &format!("{PHASE_LEASE_TTL_SECS}s")).await?;
        }
        System::Etcd => etcd_leases_held = etcd_leases(&ctx.etcd, tasks).await?,
    }
    let mut etcd_clients_held = match system {
        System::Etcd => etcd_clients(&ctx.etcd_endpoints, tasks).await?,
        System::Leasehold => Vec::new(),
    };
    // The warm-up starts once the leases exist.
    let window = Window::after(ctx.warmup, ctx.window);
    for task in 0..tasks {
        match system {
            System::Leasehold => {
                let api = ctx.api.clone();
                let lease = leasehold_leases_held[task].clone();
                let base = base.clone();
                handles.push(tokio::spawn(async move {
                    let mut log = TaskLog::default();
                    let mut i = 0;
                    while !window.closed() {
                        let started = Instant::now();
                        let outcome =
                            leasehold_cycle(&api, &format!("{base}-{task}-{i}"), &lease).await;
                        i += 1;
                        log.record(&window, started, outcome);
                    }
                    log
                }));
            }
            System::Etcd => {
                let mut client = etcd_clients_held.pop().context("client")?;
                let lease = etcd_leases_held[task];
                let base = base.clone();
                handles.push(tokio::spawn(async move {
                    let mut log = TaskLog::default();
                    let mut i = 0;
                    while !window.closed() {
                        let started = Instant::now();
                        let outcome =
                            etcd_cycle(&mut client, &format!("{base}-{task}-{i}"), lease).await;
                        i += 1;
                        log.record(&window, started, outcome);
                    }
                    log
                }));
            }
        }
    }
    let snapshots = tokio::spawn(window.snapshots(ctx.probes.clone()));
    let perf = match &ctx.perf {
        Some(request) if system == System::Leasehold && request.tasks == tasks => Some(
            tokio::spawn(perf_record(request.clone(), ctx.probes.server_pid, window)),
        ),
        _ => None,
    };
    let mut logs = Vec::with_capacity(tasks);
    for handle in handles {
        logs.push(handle.await?);
    }
    let (before, after) = snapshots.await??;
    let perf = match perf {
        Some(task) => {
            let note = task.await?;
            *ctx.perf_note.lock().unwrap_or_else(|e| e.into_inner()) = Some(note.clone());
            Some(note)
        }
        None => None,
    };
    let log = TaskLog::merge(logs);
    let latency = Latency::of(log.samples, window.length())
        .with_context(|| format!("{} with {tasks} tasks", system.describe()))?;
    let costs = Costs::between(&before, &after, latency.count);
    revoke_leasehold(&ctx.api, leasehold_leases_held).await;
    revoke_etcd(&ctx.etcd, etcd_leases_held).await;
    Ok(CyclePhase {
        tasks,
        latency,
        errors: log.errors,
        costs,
        perf,
    })
}

/// Runs `perf record` on the server for the window; returns a note on what happened.
async fn perf_record(request: PerfRequest, pid: u32, window: Window) -> String {
    tokio::time::sleep_until(window.from.into()).await;
    let secs = format!("{:.1}", window.length().as_secs_f64());
    let result = tokio::process::Command::new("perf")
        .args(["record", "-F", "999", "-g", "-p", &pid.to_string(), "-o"])
        .arg(&request.out)
        .args(["--", "sleep", &secs])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .output()
        .await;
    match result {
        Ok(out) if out.status.success() => format!(
            "perf record attached to the server during this window: {}",
            request.out.display()
        ),
        Ok(out) => format!(
            "perf record failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(err) => format!("perf unavailable: {err}"),
    }
}

/// A handoff phase.
#[derive(Serialize, Clone, Debug)]
pub struct HandoffPhase {
    pub contenders: usize,
    /// Handoffs whose grant arrived in the window: rate, and handoff latency (see the
    /// definitions in the report).
    pub latency: Latency,
    pub errors: BTreeMap<String, u64>,
    /// Per handoff.
    pub costs: Costs,
    /// Seconds from the first acquire until every contender was queued.
    pub queue_filled_s: f64,
    /// Seconds from then until every contender had been granted once (steady state), after
    /// which the warm-up and the window ran.
    pub cycled_once_s: f64,
}

/// The baton passed from holder to holder: when the last release was sent.
struct Handoffs {
    release_sent: Mutex<Option<Instant>>,
    samples: Mutex<Vec<Duration>>,
    errors: Mutex<BTreeMap<String, u64>>,
    window: OnceLock<Window>,
    started: AtomicUsize,
    grants: AtomicUsize,
    /// The last error seen, in or out of the window (for progress messages).
    last_error: Mutex<Option<String>>,
    /// Set when the window closed: each contender leaves after its next release.
    stop: AtomicBool,
}

impl Handoffs {
    /// A contender's client received its grant at `at`.
    fn granted(&self, at: Instant) {
        self.grants.fetch_add(1, Ordering::SeqCst);
        let sent = self
            .release_sent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let (Some(sent), Some(window)) = (sent, self.window.get())
            && window.contains(at)
        {
            self.samples
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(at - sent);
        }
    }

    /// The holder's client is about to send its release.
    fn releasing(&self) {
        *self.release_sent.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    }

    fn error(&self, what: String) {
        if let Ok(mut last) = self.last_error.lock() {
            *last = Some(what.clone());
        }
        if self
            .window
            .get()
            .is_some_and(|w| w.contains(Instant::now()))
        {
            *self
                .errors
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(what)
                .or_insert(0) += 1;
        }
    }
}

/// `contenders` tasks, each with its own lease, loop on one lock: acquire (waiting in the FIFO
/// queue), release at once, queue again. The warm-up starts once every contender is queued and
/// has been granted once.
pub async fn handoffs(
    ctx: &Ctx,
    system: System,
    contenders: usize,
    label: &str,
) -> Result<HandoffPhase> {
    let lock = format!("{}-{label}-c{contenders}", ctx.run);
    let state = Arc::new(Handoffs {
        release_sent: Mutex::new(None),
        samples: Mutex::new(Vec::new()),
        errors: Mutex::new(BTreeMap::new()),
        window: OnceLock::new(),
        started: AtomicUsize::new(0),
        grants: AtomicUsize::new(0),
        last_error: Mutex::new(None),
        stop: AtomicBool::new(false),
    });
    let mut tasks = Vec::with_capacity(contenders);
    let mut leasehold_leases_held = Vec::new();
    let mut etcd_leases_held = Vec::new();
    let queue_prefix = match system {
        System::Leasehold => {
            leasehold_leases_held =
                leasehold_leases(&ctx.api, contenders, &format!("{PHASE_LEASE_TTL_SECS}s")).await?;
            for lease in leasehold_leases_held.iter().cloned() {
                let (api, state) = (ctx.api.clone(), state.clone());
                let lock = lock.clone();
                tasks.push(tokio::spawn(async move {
                    state.started.fetch_add(1, Ordering::SeqCst);
                    loop {
                        let (status, body) = match api
                            .post_with_handle(
                                &format!("/v1/locks/{lock}/acquire"),
                                json!({"lease_id": lease.id, "wait": "50s"}),
                                Some(&lease.handle),
                            )
                            .await
                        {
                            Ok(answer) => answer,
                            Err(_) => {
                                state.error("acquire: transport error".into());
                                tokio::time::sleep(Duration::from_millis(10)).await;
                                continue;
                            }
                        };
                        if status != 200 {
                            state.error(http_error("acquire", status, &body));
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        }
                        state.granted(Instant::now());
                        state.releasing();
                        match api
                            .post_with_handle(
                                &format!("/v1/locks/{lock}/release"),
                                json!({"token": body["token"]}),
                                Some(&lease.handle),
                            )
                            .await
                        {
                            Ok((200, _)) => {}
                            Ok((status, body)) => state.error(http_error("release", status, &body)),
                            Err(_) => state.error("release: transport error".into()),
                        }
                        if state.stop.load(Ordering::SeqCst) {
                            return;
                        }
                    }
                }));
            }
            format!("{}/locks/{lock}/q/", ctx.key_prefix)
        }
        System::Etcd => {
            etcd_leases_held = etcd_leases(&ctx.etcd, contenders).await?;
            let clients = etcd_clients(&ctx.etcd_endpoints, contenders).await?;
            for (lease, mut client) in etcd_leases_held.iter().copied().zip(clients) {
                let state = state.clone();
                let lock = lock.clone();
                tasks.push(tokio::spawn(async move {
                    state.started.fetch_add(1, Ordering::SeqCst);
                    loop {
                        let key = match client
                            .lock(lock.as_str(), Some(LockOptions::new().with_lease(lease)))
                            .await
                        {
                            Ok(answer) => answer.key().to_vec(),
                            Err(err) => {
                                state.error(etcd_error("lock", &err));
                                tokio::time::sleep(Duration::from_millis(10)).await;
                                continue;
                            }
                        };
                        state.granted(Instant::now());
                        state.releasing();
                        if let Err(err) = client.unlock(key).await {
                            state.error(etcd_error("unlock", &err));
                        }
                        if state.stop.load(Ordering::SeqCst) {
                            return;
                        }
                    }
                }));
            }
            format!("{lock}/")
        }
    };

    // Wait until every contender is queued: the queue's keys in etcd (holder included).
    let filling = Instant::now();
    let deadline = filling + Duration::from_secs(120);
    let mut etcd = ctx.etcd.clone();
    loop {
        let queued = etcd
            .get(
                queue_prefix.as_str(),
                Some(GetOptions::new().with_prefix().with_count_only()),
            )
            .await?
            .count() as usize;
        if state.started.load(Ordering::SeqCst) == contenders && queued + 1 >= contenders {
            break;
        }
        if Instant::now() > deadline {
            for task in &tasks {
                task.abort();
            }
            anyhow::bail!(
                "{}: only {queued} of {contenders} contenders queued within 120 s",
                system.describe()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let queue_filled = filling.elapsed();
    // Steady state: every contender has been granted once since the queue filled (so each has
    // queued again behind the others), then the warm-up.
    let grants_at_fill = state.grants.load(Ordering::SeqCst);
    let mut told = Instant::now();
    while state.grants.load(Ordering::SeqCst) < grants_at_fill + contenders {
        if told.elapsed() >= Duration::from_secs(10) {
            told = Instant::now();
            eprintln!(
                "leasehold-bench:   queue filled in {:.1} s; {} of {contenders} granted since; \
                 last error: {:?}",
                queue_filled.as_secs_f64(),
                state.grants.load(Ordering::SeqCst) - grants_at_fill,
                state.last_error.lock().ok().and_then(|e| e.clone())
            );
        }
        if Instant::now() > deadline {
            for task in &tasks {
                task.abort();
            }
            anyhow::bail!(
                "{}: {contenders} contenders did not all cycle once within 120 s",
                system.describe()
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let cycled_once = filling.elapsed() - queue_filled;
    let window = Window::after(ctx.warmup, ctx.window);
    let _ = state.window.set(window);
    let (before, after) = window.snapshots(ctx.probes.clone()).await?;
    // Drain: every contender leaves after its next release, so the queue empties in order.
    // (Aborting 100 waiting etcd `Lock` calls instead left etcd's lock service stuck for the
    // next phase: its 1,000 waiters were never granted.)
    state.stop.store(true, Ordering::SeqCst);
    let drain = async {
        for task in &mut tasks {
            let _ = task.await;
        }
    };
    if tokio::time::timeout(Duration::from_secs(120), drain)
        .await
        .is_err()
    {
        eprintln!("leasehold-bench:   the queue did not drain within 120 s; aborting the rest");
        for task in &tasks {
            task.abort();
        }
    }
    let samples = std::mem::take(&mut *state.samples.lock().unwrap_or_else(|e| e.into_inner()));
    let latency = Latency::of(samples, window.length()).with_context(|| {
        format!(
            "{} handoffs with {contenders} contenders",
            system.describe()
        )
    })?;
    let costs = Costs::between(&before, &after, latency.count);
    let errors = std::mem::take(&mut *state.errors.lock().unwrap_or_else(|e| e.into_inner()));
    revoke_leasehold(&ctx.api, leasehold_leases_held).await;
    revoke_etcd(&ctx.etcd, etcd_leases_held).await;
    Ok(HandoffPhase {
        contenders,
        latency,
        errors,
        costs,
        queue_filled_s: queue_filled.as_secs_f64(),
        cycled_once_s: cycled_once.as_secs_f64(),
    })
}

/// The memory phase, on a fresh server.
#[derive(Serialize, Clone, Debug)]
pub struct MemoryPhase {
    pub leases: usize,
    pub lease_ttl_s: u64,
    /// Leases granted per second (`SETUP_IN_FLIGHT` requests in flight).
    pub grants_per_s: f64,
    /// Every lease is renewed (keep-alive over HTTP, with its handle) once per period (TTL/3),
    /// the renewals spread evenly over the period, while lock tasks cycle.
    pub renew_period_s: f64,
    pub renewals: usize,
    pub renewal_errors: usize,
    pub renewals_per_s: f64,
    pub lock_tasks: usize,
    pub lock_cycles: u64,
    pub lock_cycles_per_s: f64,
    pub lock_errors: u64,
    /// Server resident memory (VmRSS) before any lease, after the grants, the highest sample
    /// (every 100 ms) while the leases were granted and renewed, and at the end.
    pub rss_idle_mib: f64,
    pub rss_after_grants_mib: f64,
    pub rss_peak_mib: f64,
    pub rss_end_mib: f64,
    /// The server's CPU while renewing and cycling, in cores.
    pub server_cores: f64,
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// `leases` leases granted through the server at `api` (process `pid`), then all renewed in the
/// background, spread over TTL/3, while `lock_tasks` tasks cycle acquire + release.
pub async fn memory(
    api: &Api,
    pid: u32,
    run: &str,
    leases: usize,
    ttl_secs: u64,
    lock_tasks: usize,
) -> Result<MemoryPhase> {
    let rss = || status_kib(pid, "VmRSS");
    let rss_idle = rss()?;
    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(rss_idle));
    let sampler = {
        let (stop, peak) = (stop.clone(), peak.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                if let Ok(kib) = status_kib(pid, "VmRSS") {
                    peak.fetch_max(kib, Ordering::SeqCst);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    let granting = Instant::now();
    let held = leasehold_leases(api, leases, &format!("{ttl_secs}s")).await?;
    let grants_per_s = leases as f64 / granting.elapsed().as_secs_f64();
    let rss_after_grants = rss()?;

    let lock_leases =
        leasehold_leases(api, lock_tasks, &format!("{PHASE_LEASE_TTL_SECS}s")).await?;
    let period = Duration::from_secs(ttl_secs).div_f64(3.0);
    let start = Instant::now();
    let cpu_before = crate::measure::cpu_seconds(&pid.to_string())?;
    let cycling = Arc::new(AtomicBool::new(true));
    let cycles_done = Arc::new(AtomicU64::new(0));
    let cycle_errors = Arc::new(AtomicU64::new(0));
    let cyclers: Vec<_> = lock_leases
        .iter()
        .cloned()
        .enumerate()
        .map(|(task, lease)| {
            let (api, cycling) = (api.clone(), cycling.clone());
            let (done, errors) = (cycles_done.clone(), cycle_errors.clone());
            let run = run.to_owned();
            tokio::spawn(async move {
                let mut i = 0u64;
                while cycling.load(Ordering::SeqCst) {
                    let name = format!("{run}-memory-{task}-{i}");
                    i += 1;
                    match leasehold_cycle(&api, &name, &lease).await {
                        Ok(()) => done.fetch_add(1, Ordering::SeqCst),
                        Err(_) => errors.fetch_add(1, Ordering::SeqCst),
                    };
                }
            })
        })
        .collect();
    let n = held.len().max(1);
    let renewed: Vec<bool> = futures::stream::iter(held.iter().enumerate())
        .map(|(i, lease)| {
            let api = api.clone();
            let due = start + period.mul_f64(i as f64 / n as f64);
            async move {
                tokio::time::sleep_until(due.into()).await;
                matches!(
                    api.post_with_handle(
                        &format!("/v1/leases/{}/keepalive", lease.id),
                        json!({}),
                        Some(&lease.handle),
                    )
                    .await,
                    Ok((200, _))
                )
            }
        })
        .buffer_unordered(256)
        .collect()
        .await;
    // At least one full period, even if the renewals kept up early.
    tokio::time::sleep_until((start + period).into()).await;
    let elapsed = start.elapsed();
    cycling.store(false, Ordering::SeqCst);
    for cycler in cyclers {
        cycler.await?;
    }
    let server_cores =
        (crate::measure::cpu_seconds(&pid.to_string())? - cpu_before) / elapsed.as_secs_f64();
    let rss_end = rss()?;
    stop.store(true, Ordering::SeqCst);
    sampler.await?;
    let renewal_errors = renewed.iter().filter(|ok| !**ok).count();
    let lock_cycles = cycles_done.load(Ordering::SeqCst);
    revoke_leasehold(api, lock_leases).await;
    Ok(MemoryPhase {
        leases,
        lease_ttl_s: ttl_secs,
        grants_per_s,
        renew_period_s: period.as_secs_f64(),
        renewals: renewed.len() - renewal_errors,
        renewal_errors,
        renewals_per_s: (renewed.len() - renewal_errors) as f64 / elapsed.as_secs_f64(),
        lock_tasks,
        lock_cycles,
        lock_cycles_per_s: lock_cycles as f64 / elapsed.as_secs_f64(),
        lock_errors: cycle_errors.load(Ordering::SeqCst),
        rss_idle_mib: mib(rss_idle),
        rss_after_grants_mib: mib(rss_after_grants),
        rss_peak_mib: mib(peak.load(Ordering::SeqCst).max(rss_end)),
        rss_end_mib: mib(rss_end),
        server_cores,
    })
}
