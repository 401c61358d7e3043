//! Fail-over and retry safety of the `leasehold` client, with real server processes killed
//! with `kill -9` or hung with `SIGSTOP`.

use std::time::Duration;

use anyhow::{Context, Result};
use leasehold::{Client, LostReason, RetryPolicy};
use leasehold_tests::{Api, EtcdCluster, ServerProcess};
use serde_json::json;
use tokio::process::Command;
use tokio::time::Instant;

const TTL: Duration = Duration::from_secs(2);

async fn two_servers(etcd: &EtcdCluster) -> Result<(ServerProcess, ServerProcess)> {
    let bin = leasehold_tests::server_bin!();
    Ok((
        ServerProcess::spawn(&bin, &etcd.endpoints(), &[]).await?,
        ServerProcess::spawn(&bin, &etcd.endpoints(), &[]).await?,
    ))
}

fn client(a: &ServerProcess, b: &ServerProcess) -> Result<Client> {
    Ok(Client::builder()
        .endpoint(a.url())
        .endpoint(b.url())
        .request_timeout(Duration::from_secs(1))
        .retry_policy(RetryPolicy::default())
        .build()?)
}

/// Killing the server a holder talks to mid-hold keeps the hold (renewals move to the other
/// server), and new acquires succeed on the survivor.
#[tokio::test]
async fn hold_survives_the_death_of_its_server() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let (mut first, second) = two_servers(&etcd).await?;
    let client = client(&first, &second)?;
    let guard = client.lock("failover").ttl(TTL).acquire().await?;
    first.kill().await?;

    tokio::time::sleep(3 * TTL).await;
    assert!(guard.is_held(), "the hold was lost when its server died");
    let (_, status) = Api::new(second.url()).get("/v1/locks/failover").await?;
    assert_eq!(status["holder"]["token"], json!(guard.token().get()));

    let other = client.lock("failover/other").ttl(TTL).try_acquire().await?;
    assert!(other.is_held());
    other.release().await?;
    guard.release().await?;
    Ok(())
}

/// An acquire waiting in line whose server dies mid-wait is resent to the other server and
/// resumes the same place in line: never two waiters, and it is granted with the token of the
/// waiter key its first attempt created.
#[tokio::test]
async fn retried_acquire_does_not_queue_twice() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let (mut first, second) = two_servers(&etcd).await?;
    let api = Api::new(second.url());
    let (status, held) = api.acquire_ttl("queue", "10s", "0s").await?;
    assert_eq!(status, 200, "{held}");
    let client = client(&first, &second)?;

    let waiting = tokio::spawn({
        let client = client.clone();
        async move {
            client
                .lock("queue")
                .ttl(TTL)
                .wait(Duration::from_secs(20))
                .acquire()
                .await
        }
    });
    api.wait_for_waiters("queue", 1).await?;
    let queued = waiter_token(&etcd, held["token"].as_u64().context("token")?).await?;

    // The server holding the waiting request dies; the client resends to the survivor.
    first.kill().await?;
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (_, status) = api.get("/v1/locks/queue").await?;
        assert_eq!(status["waiters"], 1, "{status}");
    }
    assert_eq!(
        waiter_token(&etcd, held["token"].as_u64().context("token")?).await?,
        queued
    );
    let (status, body) = api
        .post("/v1/locks/queue/release", json!({"token": held["token"]}))
        .await?;
    assert_eq!(status, 200, "{body}");
    let guard = tokio::time::timeout(Duration::from_secs(5), waiting).await???;
    assert_eq!(guard.token().get(), queued);
    guard.release().await?;
    Ok(())
}

/// The token (create revision) of the one waiter key that is not the holder's.
async fn waiter_token(etcd: &EtcdCluster, holder: u64) -> Result<u64> {
    let mut etcd = etcd.client().await?;
    let resp = etcd
        .get(
            "/leasehold/locks/",
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await?;
    let waiters: Vec<u64> = resp
        .kvs()
        .iter()
        .filter(|kv| String::from_utf8_lossy(kv.key()).contains("/q/"))
        .map(|kv| kv.create_revision() as u64)
        .filter(|rev| *rev != holder)
        .collect();
    anyhow::ensure!(waiters.len() == 1, "waiter keys: {waiters:?}");
    Ok(waiters[0])
}

/// Every call fails over from a *hung* replica listed first (SIGSTOP: it accepts connections
/// and answers nothing): the idempotent lease grant, the acquire, status, lease calls, renewals
/// and the release, each after at most one request timeout.
#[tokio::test]
async fn every_call_fails_over_from_a_hung_replica() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let (hung, live) = two_servers(&etcd).await?;
    hung.pause()?;
    let client = client(&hung, &live)?;
    let started = Instant::now();
    let lease = client.grant_lease(TTL).await?;
    let guard = client.lock("hung/a").ttl(TTL).acquire().await?;
    let under_lease = client.lock("hung/b").lease(&lease).acquire().await?;
    assert_eq!(
        client.status("hung/a").await?.holder.context("held")?.token,
        guard.token()
    );
    assert_eq!(lease.info().await?.locks, ["hung/b"]);
    client.keep_lease_alive(lease.id(), lease.handle()).await?;
    tokio::time::sleep(2 * TTL).await;
    assert!(guard.is_held() && under_lease.is_held() && lease.is_alive());
    guard.release().await?;
    under_lease.release().await?;
    lease.revoke().await?;
    // The first call waited one request timeout (1 s) for the hung replica; the rest went to
    // the live one first.
    assert!(started.elapsed() < 2 * TTL + Duration::from_secs(4));
    assert_eq!(
        Api::new(live.url()).get("/v1/locks/hung%2Fa").await?.1["holder"],
        json!(null)
    );
    Ok(())
}

/// A hold renewed through a replica that then hangs survives on the other one: each renewal
/// attempt gets at most its share of the time left before the client timer runs out (not the
/// 5 s request timeout), so the second replica is still tried in time.
#[tokio::test]
async fn renewal_fails_over_in_time_from_a_replica_that_hangs() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let (first, second) = two_servers(&etcd).await?;
    // Default request timeout (5 s): longer than the whole 2 s TTL.
    let client = Client::builder()
        .endpoints([first.url(), second.url()])
        .build()?;
    let guard = client.lock("hangs").ttl(TTL).acquire().await?;
    let lease = client.grant_lease(TTL).await?;
    first.pause()?;
    let lost = tokio::time::timeout(3 * TTL, async {
        tokio::select! {
            reason = guard.lost() => Some(reason),
            reason = lease.lost() => Some(reason),
        }
    })
    .await
    .unwrap_or(None);
    assert_eq!(lost, None::<LostReason>, "a hold was lost");
    assert!(guard.is_held() && lease.is_alive());
    let (_, status) = Api::new(second.url()).get("/v1/locks/hangs").await?;
    assert_eq!(status["holder"]["token"], json!(guard.token().get()));
    first.resume()?;
    guard.release().await?;
    Ok(())
}

/// The CLI: `lock` works with a hung replica listed first (issue 14, case 1), and a hold taken
/// through a replica that then hangs survives on the other (case 2: `--ttl 3s`, default 5 s
/// request timeout), CMD running to its end.
#[tokio::test]
async fn cli_fails_over_from_a_hung_replica() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let (r2, r1) = two_servers(&etcd).await?;
    let endpoints = format!("{},{}", r2.url(), r1.url());
    let cli = || {
        let mut command = Command::new(leasehold_tests::cli_bin!());
        command
            .env("LEASEHOLD_ENDPOINTS", &endpoints)
            .kill_on_drop(true);
        command
    };

    let dir = tempfile::tempdir()?;
    let go = dir.path().join("go");
    let holding = cli()
        .args(["lock", "--ttl", "3s", "fo3", "--", "sh", "-c"])
        .arg(format!(
            "while [ ! -e {} ]; do sleep 0.05; done",
            go.display()
        ))
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    Api::new(r1.url()).wait_for_holder("fo3").await?;
    r2.pause()?;
    // More than a TTL with the preferred replica hung: renewals must go to r1 in time.
    tokio::time::sleep(Duration::from_secs(4)).await;
    std::fs::write(&go, "")?;
    let output = tokio::time::timeout(Duration::from_secs(10), holding.wait_with_output())
        .await
        .context("leasehold did not finish")??;
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    let output = cli()
        .args([
            "--request-timeout",
            "1s",
            "lock",
            "fo2",
            "--",
            "echo",
            "ran",
        ])
        .output()
        .await?;
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    assert_eq!(String::from_utf8_lossy(&output.stdout), "ran\n");
    Ok(())
}
