//! Leasehold beside etcd's own lock service, on the same etcd, in one run.
//!
//! Starts a single-member etcd (data dir on disk by default, as users run it; `--shm` for tmpfs)
//! and one in-process Leasehold server, then measures for both:
//! - uncontended acquire + release cycles, sequentially;
//! - contended handoff: N contenders on one lock; each handoff is timed from the moment the holder
//!   sends its release to the moment the next holder has its grant.
//!
//! Run: `cargo run --release -p leasehold-tests --bin leasehold-bench -- [--handoffs 400]
//! [--contenders 8] [--cycles 1000] [--shm]`

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use etcd_client::LockOptions;
use leasehold_tests::{Api, EtcdCluster, TestServer};
use serde_json::json;
use tokio::sync::Mutex;

struct Args {
    handoffs: usize,
    contenders: usize,
    cycles: usize,
    shm: bool,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        handoffs: 400,
        contenders: 8,
        cycles: 1000,
        shm: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || -> Result<usize> {
            it.next()
                .context("missing value")?
                .parse()
                .context("not a number")
        };
        match flag.as_str() {
            "--handoffs" => args.handoffs = value()?,
            "--contenders" => args.contenders = value()?,
            "--cycles" => args.cycles = value()?,
            "--shm" => args.shm = true,
            "--help" | "-h" => {
                println!("leasehold-bench [--handoffs N] [--contenders N] [--cycles N] [--shm]");
                std::process::exit(0);
            }
            other => anyhow::bail!("unknown flag {other}"),
        }
    }
    Ok(args)
}

/// Latency summary of a set of samples.
fn summary(name: &str, mut samples: Vec<Duration>, elapsed: Duration) -> String {
    samples.sort();
    let pick = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    format!(
        "| {name} | {} | {:.0}/s | {:.2} ms | {:.2} ms | {:.2} ms |",
        samples.len(),
        samples.len() as f64 / elapsed.as_secs_f64(),
        ms(pick(0.50)),
        ms(pick(0.99)),
        ms(*samples.last().unwrap()),
    )
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = parse_args()?;
    println!(
        "etcd data dir: {}",
        if args.shm {
            "/dev/shm (tmpfs)".to_owned()
        } else {
            format!("disk ({})", std::env::temp_dir().display())
        }
    );
    let etcd = if args.shm {
        EtcdCluster::start(1).await?
    } else {
        EtcdCluster::start_on_disk(1).await?
    };
    let server = TestServer::start(&etcd).await?;
    let api = Api::new(server.url());

    println!("\n| what | samples | rate | p50 | p99 | max |\n|---|---|---|---|---|---|");
    println!("{}", etcd_cycles(&etcd, args.cycles).await?);
    println!("{}", leasehold_cycles(&api, args.cycles).await?);
    println!(
        "{}",
        etcd_handoffs(&etcd, args.contenders, args.handoffs).await?
    );
    println!(
        "{}",
        leasehold_handoffs(&api, args.contenders, args.handoffs).await?
    );
    println!(
        "\n({} contenders for handoffs; cycles are sequential acquire+release)",
        args.contenders
    );
    Ok(())
}

async fn etcd_cycles(etcd: &EtcdCluster, cycles: usize) -> Result<String> {
    let mut client = etcd.client().await?;
    let lease = client.lease_grant(30, None).await?.id();
    let mut samples = Vec::with_capacity(cycles);
    let start = Instant::now();
    for _ in 0..cycles {
        let t = Instant::now();
        let lock = client
            .lock(
                "bench-etcd-cycle",
                Some(LockOptions::new().with_lease(lease)),
            )
            .await?;
        client.unlock(lock.key()).await?;
        samples.push(t.elapsed());
    }
    Ok(summary(
        "etcd lock+unlock, sequential",
        samples,
        start.elapsed(),
    ))
}

async fn leasehold_cycles(api: &Api, cycles: usize) -> Result<String> {
    let lease = api.grant("30s").await?;
    let mut samples = Vec::with_capacity(cycles);
    let start = Instant::now();
    for _ in 0..cycles {
        let t = Instant::now();
        let (status, body) = api
            .post("/v1/locks/bench-cycle/acquire", json!({"lease_id": lease}))
            .await?;
        anyhow::ensure!(status == 200, "{body}");
        let (status, body) = api
            .post(
                "/v1/locks/bench-cycle/release",
                json!({"token": body["token"]}),
            )
            .await?;
        anyhow::ensure!(status == 200, "{body}");
        samples.push(t.elapsed());
    }
    Ok(summary(
        "Leasehold acquire+release over HTTP, sequential",
        samples,
        start.elapsed(),
    ))
}

/// Shared by contenders: when the last release was sent, and the handoff samples.
#[derive(Default)]
struct Handoffs {
    release_sent: Option<Instant>,
    samples: Vec<Duration>,
    finished: Option<Instant>,
}

impl Handoffs {
    /// Records a grant; returns true once enough handoffs were seen (every contender then stops
    /// after its release, so all tasks end).
    fn granted(&mut self, wanted: usize) -> bool {
        if let Some(sent) = self.release_sent.take() {
            self.samples.push(sent.elapsed());
        }
        if self.samples.len() >= wanted && self.finished.is_none() {
            self.finished = Some(Instant::now());
        }
        self.release_sent = Some(Instant::now());
        self.finished.is_some()
    }
}

/// Waits for every contender, then summarises.
async fn finish(
    name: String,
    state: Arc<Mutex<Handoffs>>,
    tasks: Vec<tokio::task::JoinHandle<Result<()>>>,
    start: Instant,
) -> Result<String> {
    for task in tasks {
        task.await??;
    }
    let mut s = state.lock().await;
    let elapsed = s.finished.context("never finished")? - start;
    Ok(summary(&name, std::mem::take(&mut s.samples), elapsed))
}

async fn etcd_handoffs(etcd: &EtcdCluster, contenders: usize, handoffs: usize) -> Result<String> {
    let state = Arc::new(Mutex::new(Handoffs::default()));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..contenders {
        let mut client = etcd.client().await?;
        let state = state.clone();
        tasks.push(tokio::spawn(async move {
            let lease = client.lease_grant(30, None).await?.id();
            loop {
                let lock = client
                    .lock(
                        "bench-etcd-handoff",
                        Some(LockOptions::new().with_lease(lease)),
                    )
                    .await?;
                let done = state.lock().await.granted(handoffs);
                client.unlock(lock.key()).await?;
                if done {
                    return anyhow::Ok(());
                }
            }
        }));
    }
    finish(
        format!("etcd lock handoff, {contenders} contenders"),
        state,
        tasks,
        start,
    )
    .await
}

async fn leasehold_handoffs(api: &Api, contenders: usize, handoffs: usize) -> Result<String> {
    let state = Arc::new(Mutex::new(Handoffs::default()));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..contenders {
        let api = api.clone();
        let state = state.clone();
        tasks.push(tokio::spawn(async move {
            let lease = api.grant("30s").await?;
            loop {
                let (status, body) = api
                    .post(
                        "/v1/locks/bench-handoff/acquire",
                        json!({"lease_id": lease, "wait": "60s"}),
                    )
                    .await?;
                anyhow::ensure!(status == 200, "{body}");
                let done = state.lock().await.granted(handoffs);
                let (status, body) = api
                    .post(
                        "/v1/locks/bench-handoff/release",
                        json!({"token": body["token"]}),
                    )
                    .await?;
                anyhow::ensure!(status == 200, "{body}");
                if done {
                    return anyhow::Ok(());
                }
            }
        }));
    }
    finish(
        format!("Leasehold handoff over HTTP, {contenders} contenders"),
        state,
        tasks,
        start,
    )
    .await
}
