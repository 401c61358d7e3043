//! Overload: far more clients than etcd can serve, all at once, for a bounded time, on loopback.
//! The server must shed early and cleanly: every answer is a grant, a conflict, or `503
//! overloaded` with `Retry-After` (never another 5xx, never a timeout; a `503 store_unavailable`
//! from an etcd call slowed by other processes on the machine at most once in 1,000 answers),
//! and etcd never answers "too many requests". Goodput is printed, never asserted (speed is for the benchmark).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use leasehold_tests::{Api, EtcdCluster, ServerProcess, server_bin};
use serde_json::{Value, json};
use tokio::sync::Mutex;
use tokio::time::Instant;

/// Clients hammering at once.
const CLIENTS: usize = 1500;
/// Distinct lock names (hot enough to conflict, many enough to write a lot).
const LOCKS: usize = 300;
/// The TTL of each hold's lease.
const TTL: Duration = Duration::from_secs(5);
/// How long the storm lasts.
const STORM: Duration = Duration::from_secs(12);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_is_shed_cleanly() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let server = ServerProcess::spawn(&server_bin!(), &etcd.endpoints(), &[]).await?;
    let url = server.url();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(CLIENTS)
        .build()?;
    let outcomes: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for client in 0..CLIENTS {
        let (http, url, outcomes) = (http.clone(), url.clone(), outcomes.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = client;
            while started.elapsed() < STORM {
                n = n.wrapping_mul(2_654_435_761).wrapping_add(12_345);
                let lock = format!("storm-{}", n % LOCKS);
                let outcome = cycle(&http, &url, &lock).await;
                let key = match &outcome {
                    Ok(key) => key.clone(),
                    Err(err) => format!("client error: {err:#}"),
                };
                *outcomes.lock().await.entry(key).or_default() += 1;
                if let Ok(Some(pause)) = outcome.map(|k| retry_after(&k)) {
                    // Full jitter over the server's Retry-After, as well-behaved clients do.
                    let jitter = (n % 1000) as f64 / 1000.0;
                    tokio::time::sleep(pause.mul_f64(jitter)).await;
                }
            }
        }));
    }
    for task in tasks {
        task.await?;
    }
    let elapsed = started.elapsed();
    let outcomes = outcomes.lock().await.clone();
    let granted = outcomes.get("200 granted").copied().unwrap_or(0);
    eprintln!(
        "storm: {CLIENTS} clients, {LOCKS} locks, {:.1}s: {outcomes:?}; goodput {:.0} grants/s",
        elapsed.as_secs_f64(),
        granted as f64 / elapsed.as_secs_f64()
    );
    let answers: u64 = outcomes.values().sum();
    for (outcome, count) in &outcomes {
        // An etcd call slower than `--etcd-timeout` for reasons outside the server (other
        // processes starving etcd of CPU on a shared machine) is answered `503
        // store_unavailable`, honestly; shedding must keep that rare: at most 1 in 1,000.
        let rare_timeout = outcome == "503 store_unavailable" && *count * 1000 <= answers;
        ensure!(
            outcome.starts_with("200 granted") && !outcome.contains("release answered")
                || outcome == "409 lock_held"
                || outcome == "503 overloaded retry-after=1"
                || outcome == "404 lease_not_found, after the acquire's own TTL"
                || rare_timeout,
            "{count} answers of an undocumented kind (of {answers}): {outcome}"
        );
    }
    ensure!(granted > 0, "nothing was granted: {outcomes:?}");
    let refused = Api::new(url.clone())
        .metric("leasehold_etcd_overloaded_total")
        .await?;
    ensure!(
        refused == 0.0,
        "etcd answered \"too many requests\" {refused} times"
    );
    Ok(())
}

/// One acquire (and release, when granted); returns what happened, as "STATUS code".
async fn cycle(http: &reqwest::Client, url: &str, lock: &str) -> Result<String> {
    let sent = Instant::now();
    let response = http
        .post(format!("{url}/v1/locks/{lock}/acquire"))
        .json(&json!({"ttl": format!("{}s", TTL.as_secs()), "wait": "0s"}))
        .send()
        .await?;
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body: Value = response.json().await?;
    if status != 200 {
        let code = body["error"]["code"].as_str().unwrap_or("?");
        if status == 404 && code == "lease_not_found" && sent.elapsed() >= TTL {
            // The acquire's own TTL lease ran out before etcd decided (a machine starved by other
            // processes): the documented answer, as for a release that comes too late.
            return Ok("404 lease_not_found, after the acquire's own TTL".to_owned());
        }
        return Ok(match retry_after {
            Some(after) => format!("{status} {code} retry-after={after}"),
            None => format!("{status} {code}"),
        });
    }
    let handle = body["handle"].as_str().context("handle")?;
    let released = http
        .post(format!("{url}/v1/locks/{lock}/release"))
        .header(leasehold_tests::HANDLE_HEADER, handle)
        .json(&json!({"token": body["token"]}))
        .send()
        .await?;
    // A release is never shed (it frees capacity), so anything but 200 is a failure.
    Ok(match released.status().as_u16() {
        200 => "200 granted".to_owned(),
        // The hold's 5 s lease ran out before the release came: the documented answer.
        409 if sent.elapsed() >= TTL => "200 granted, lease expired before the release".to_owned(),
        other => {
            let body: Value = released.json().await.unwrap_or(Value::Null);
            format!(
                "200 granted, release answered {other} {}",
                body["error"]["code"].as_str().unwrap_or("?")
            )
        }
    })
}

/// The pause a shed answer asked for.
fn retry_after(outcome: &str) -> Option<Duration> {
    let secs = outcome.split("retry-after=").nth(1)?.parse().ok()?;
    Some(Duration::from_secs(secs))
}

/// `--max-sessions`: past the bound, a new session waits in the server's waiting room (costing
/// etcd nothing) and gets the place a revoke frees; one that finds no place in time is shed
/// (`503 overloaded` with `Retry-After`) before anything reached etcd.
#[tokio::test]
async fn sessions_past_the_bound_wait_for_a_place_or_are_shed() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let server = leasehold_tests::TestServer::start_with_max_sessions(&etcd, 2).await?;
    let api = Api::new(server.url());
    let first = api.grant("30s").await?;
    api.grant("30s").await?;
    let mut etcd_client = etcd.client().await?;
    let before = leasehold_tests::revision(&mut etcd_client).await?;

    let (status, body, retry_after) = api.post_once("/v1/leases", json!({"ttl": "30s"})).await?;
    ensure!(
        status == 503 && body["error"]["code"] == "overloaded",
        "a third session, no place freed: {status} {body}"
    );
    ensure!(retry_after.is_some(), "shed without Retry-After");
    ensure!(
        leasehold_tests::revision(&mut etcd_client).await? == before,
        "a shed session wrote to etcd"
    );

    // A fourth waits for a place; the revoke of the first lets it in.
    let waiting = tokio::spawn({
        let api = api.clone();
        async move { api.post_once("/v1/leases", json!({"ttl": "30s"})).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    ensure!(
        !waiting.is_finished(),
        "a session past the bound was answered at once"
    );
    ensure!(
        leasehold_tests::revision(&mut etcd_client).await? == before,
        "a waiting session wrote to etcd"
    );
    let (status, body) = api.delete(&format!("/v1/leases/{first}")).await?;
    ensure!(status == 204, "revoke: {status} {body}");
    let (status, body, _) = waiting.await??;
    ensure!(
        status == 201,
        "the waiting session after a revoke: {status} {body}"
    );
    Ok(())
}

/// A grant's `wait` says how long it waits for a place in a full waiting room: `0s` is shed at
/// once, a bad one is refused before anything reaches etcd, and the Rust client's
/// `grant_lease_waiting` waits past both the server's default and its own request timeout.
#[tokio::test]
async fn a_grant_waits_for_a_place_as_long_as_it_asked() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let server = leasehold_tests::TestServer::start_with_max_sessions(&etcd, 1).await?;
    let api = Api::new(server.url());
    let first = api.grant("30s").await?;
    let mut etcd_client = etcd.client().await?;
    let before = leasehold_tests::revision(&mut etcd_client).await?;

    // Sent once: the test kit's `post` would resend a shed request until it got in.
    let started = Instant::now();
    let (status, body, _) = api
        .post_once("/v1/leases", json!({"ttl": "30s", "wait": "0s"}))
        .await?;
    ensure!(
        status == 503 && body["error"]["code"] == "overloaded",
        "a grant that would not wait: {status} {body}"
    );
    ensure!(
        started.elapsed() < leasehold_server::WAITING_ROOM,
        "a grant that asked not to wait waited {:?}",
        started.elapsed()
    );
    for wait in [json!("soon"), json!(5), json!("1h")] {
        let (status, body, _) = api
            .post_once("/v1/leases", json!({"ttl": "30s", "wait": wait}))
            .await?;
        ensure!(
            status == 400 && body["error"]["code"] == "invalid_wait",
            "wait {wait}: {status} {body}"
        );
    }
    ensure!(
        leasehold_tests::revision(&mut etcd_client).await? == before,
        "a grant without a place wrote to etcd"
    );

    let client = leasehold::Client::builder()
        .endpoint(server.url())
        .request_timeout(Duration::from_secs(1))
        .build()?;
    let waiting = tokio::spawn(async move {
        client
            .grant_lease_waiting(Duration::from_secs(30), None, Duration::from_secs(8))
            .await
    });
    let past_default = leasehold_server::WAITING_ROOM + Duration::from_secs(1);
    tokio::time::sleep(past_default).await;
    ensure!(
        !waiting.is_finished(),
        "the grant stopped waiting before its wait was out"
    );
    let (status, body) = api.delete(&format!("/v1/leases/{first}")).await?;
    ensure!(status == 204, "revoke: {status} {body}");
    let lease = waiting.await?.context("the waiting grant after a revoke")?;
    lease.revoke().await?;
    Ok(())
}
