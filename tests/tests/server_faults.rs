//! The server under faults: abandoned waits, waiters whose lease dies, etcd going away, killed
//! replicas and etcd members. Every test reads etcd directly to check what was left behind.

use std::time::Duration;

use anyhow::{Context, Result};
use leasehold_tests::{Api, EtcdCluster, ServerProcess, TestServer, keys_under, server_bin};
use serde_json::{Value, json};
use tokio::time::Instant;

fn token(body: &Value) -> u64 {
    body["token"]
        .as_u64()
        .unwrap_or_else(|| panic!("no token in {body}"))
}

/// Polls etcd until the queue of `lock` holds exactly `n` keys.
async fn wait_for_queue(etcd: &EtcdCluster, lock: &str, n: usize) -> Result<Vec<String>> {
    let mut client = etcd.client().await?;
    let prefix = format!("/leasehold/locks/{lock}/q/");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let keys = keys_under(&mut client, &prefix).await?;
        if keys.len() == n {
            return Ok(keys);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "queue of {lock} is {keys:?}, wanted {n} keys"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A wait that times out answers 409 with the holder and leaves no waiter key, and the lease the
/// server granted for it is revoked.
#[tokio::test]
async fn timed_out_wait_leaves_nothing() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let server = TestServer::start(&etcd).await?;
    let api = Api::new(server.url());
    let (_, held) = api.acquire_ttl("t", "30s", "0s").await?;

    let started = Instant::now();
    let (status, body) = api
        .post(
            "/v1/locks/t/acquire",
            json!({"ttl": "30s", "wait": "500ms", "owner": "late"}),
        )
        .await?;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "lock_held");
    assert_eq!(body["holder"]["token"], held["token"]);
    assert!(started.elapsed() >= Duration::from_millis(500));
    assert!(started.elapsed() < Duration::from_secs(3));

    let queue = wait_for_queue(&etcd, "t", 1).await?;
    assert!(queue[0].ends_with(held["lease_id"].as_str().unwrap()));
    // Only the holder's lease and its meta key remain.
    let mut client = etcd.client().await?;
    assert_eq!(
        client.leases().await?.leases().len(),
        1,
        "the waiter's lease was revoked"
    );

    // A waiter on its own lease: only its key goes, its lease stays.
    let lease = api.grant("30s").await?;
    let (status, _) = api
        .post(
            "/v1/locks/t/acquire",
            json!({"lease_id": lease, "wait": "300ms"}),
        )
        .await?;
    assert_eq!(status, 409);
    wait_for_queue(&etcd, "t", 1).await?;
    let (status, _) = api.get(&format!("/v1/leases/{lease}")).await?;
    assert_eq!(status, 200);
    Ok(())
}

/// An HTTP client that disconnects mid-wait leaves no waiter key and never becomes a phantom
/// holder: when the holder releases, the lock is free.
#[tokio::test]
async fn client_disconnect_mid_wait_leaves_nothing() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let server = TestServer::start(&etcd).await?;
    let api = Api::new(server.url());
    let (_, held) = api.acquire_ttl("d", "30s", "0s").await?;
    let lease = api.grant("30s").await?;

    for body in [
        json!({"ttl": "30s", "wait": "20s"}),
        json!({"lease_id": lease, "wait": "20s"}),
    ] {
        let impatient = reqwest::Client::builder()
            .timeout(Duration::from_millis(400))
            .build()?;
        let mut request = impatient
            .post(format!("{}/v1/locks/d/acquire", server.url()))
            .json(&body);
        if body.get("lease_id").is_some() {
            let handle = Api::handle_of(&lease).context("the lease's handle")?;
            request = request.header(leasehold_tests::HANDLE_HEADER, handle);
        }
        let gave_up = request.send().await;
        assert!(gave_up.is_err(), "the request should time out client-side");
        wait_for_queue(&etcd, "d", 1).await?;
    }
    let (_, status) = api
        .post("/v1/locks/d/release", json!({"token": token(&held)}))
        .await?;
    assert_eq!(status["released"], true);
    let (_, status) = api.get("/v1/locks/d").await?;
    assert_eq!(status["holder"], Value::Null, "no phantom holder");
    wait_for_queue(&etcd, "d", 0).await?;
    Ok(())
}

/// Graceful shutdown mid-wait answers the waiter 503 `shutting_down` and removes its key.
#[tokio::test]
async fn shutdown_mid_wait_leaves_nothing() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let holder_server = TestServer::start(&etcd).await?;
    let (_, held) = Api::new(holder_server.url())
        .acquire_ttl("s", "30s", "0s")
        .await?;

    // An in-process server shut down gracefully...
    let server = TestServer::start(&etcd).await?;
    let api = Api::new(server.url());
    let waiter = tokio::spawn(async move { api.acquire_ttl("s", "30s", "30s").await });
    wait_for_queue(&etcd, "s", 2).await?;
    server.shutdown().await?;
    let (status, body) = waiter.await??;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (503, Some("shutting_down"))
    );
    wait_for_queue(&etcd, "s", 1).await?;

    // ...and a server process sent SIGTERM.
    let mut process = ServerProcess::spawn(&server_bin!(), &etcd.endpoints(), &[]).await?;
    let api = Api::new(process.url());
    let lease = api.grant("30s").await?;
    let waiter = tokio::spawn({
        let api = api.clone();
        async move {
            api.post(
                "/v1/locks/s/acquire",
                json!({"lease_id": lease, "wait": "30s"}),
            )
            .await
        }
    });
    wait_for_queue(&etcd, "s", 2).await?;
    let exit = process.terminate().await?;
    assert!(exit.success(), "{exit}");
    let (status, _) = waiter.await??;
    assert_eq!(status, 503);
    let queue = wait_for_queue(&etcd, "s", 1).await?;
    assert!(queue[0].ends_with(held["lease_id"].as_str().unwrap()));
    Ok(())
}

/// A server killed with `kill -9` mid-wait cleans nothing; the waiter key it leaves is bounded
/// by its lease: it is gone within the TTL, and it never holds beyond that.
#[tokio::test]
async fn killed_server_leaves_a_key_bounded_by_its_lease() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let survivor = TestServer::start(&etcd).await?;
    let api = Api::new(survivor.url());
    let (_, held) = api.acquire_ttl("k", "30s", "0s").await?;

    let mut doomed = ServerProcess::spawn(&server_bin!(), &etcd.endpoints(), &[]).await?;
    let doomed_api = Api::new(doomed.url());
    let waiter = tokio::spawn(async move { doomed_api.acquire_ttl("k", "2s", "30s").await });
    wait_for_queue(&etcd, "k", 2).await?;
    doomed.kill().await?;
    assert!(waiter.await?.is_err(), "the killed server cannot answer");
    // The orphan waiter is still queued right after the kill, then its lease expires.
    let (_, status) = api.get("/v1/locks/k").await?;
    assert_eq!(status["waiters"], 1);
    let killed_at = Instant::now();
    wait_for_queue(&etcd, "k", 1).await?;
    assert!(
        killed_at.elapsed() < Duration::from_secs(5),
        "bounded by the 2 s TTL"
    );
    api.post("/v1/locks/k/release", json!({"token": token(&held)}))
        .await?;
    let (_, status) = api.get("/v1/locks/k").await?;
    assert_eq!(status["holder"], Value::Null);
    Ok(())
}

/// A waiter whose lease is revoked stops waiting at once with `lease_not_found`, and is never
/// granted, even when the holder releases right after the revoke was confirmed (etcd issue 11456:
/// a waiter whose session had ended was granted). Each round: the waiter queues behind the
/// holder, its lease's revoke is answered 204, then the holder releases; the waiter must answer
/// 404, and the lock must be free.
#[tokio::test]
async fn waiter_with_revoked_lease_is_never_granted() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let server = TestServer::start(&etcd).await?;
    let api = Api::new(server.url());
    for round in 0..5 {
        let (_, held) = api.acquire_ttl("r", "30s", "0s").await?;
        let lease = api.grant("30s").await?;
        let waiter = tokio::spawn({
            let (api, lease) = (api.clone(), lease.clone());
            async move {
                let answer = api
                    .post(
                        "/v1/locks/r/acquire",
                        json!({"lease_id": lease, "wait": "20s"}),
                    )
                    .await;
                (answer, Instant::now())
            }
        });
        wait_for_queue(&etcd, "r", 2).await?;
        let (status, body) = api.delete(&format!("/v1/leases/{lease}")).await?;
        assert_eq!(status, 204, "round {round}: revoke: {body}");
        let revoked_at = Instant::now();
        // In odd rounds the release follows at once: a server that does not confirm the
        // waiter's own key in its decisive read would grant it now.
        if round % 2 == 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (status, body) = api
            .post("/v1/locks/r/release", json!({"token": token(&held)}))
            .await?;
        assert_eq!(status, 200, "round {round}: release: {body}");
        let (answer, answered_at) = waiter.await?;
        let (status, body) = answer?;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (404, Some("lease_not_found")),
            "round {round}: a waiter whose lease was revoked was answered {status} {body}"
        );
        assert!(
            answered_at.saturating_duration_since(revoked_at) < Duration::from_secs(2),
            "round {round}: stopped waiting at once"
        );
        let (_, status) = api.get("/v1/locks/r").await?;
        assert_eq!(status["holder"], Value::Null, "round {round}: {status}");
    }
    Ok(())
}

/// A waiter whose lease expires while it waits stops at the expiry, not when its predecessor
/// goes, and is never granted (etcd issue 19597).
#[tokio::test]
async fn waiter_with_expired_lease_stops_at_once() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let server = TestServer::start(&etcd).await?;
    let api = Api::new(server.url());
    let (_, held) = api.acquire_ttl("e", "30s", "0s").await?;
    let lease = api.grant("2s").await?; // nobody keeps it alive
    let started = Instant::now();
    let (status, body) = api
        .post(
            "/v1/locks/e/acquire",
            json!({"lease_id": lease, "wait": "25s"}),
        )
        .await?;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("lease_not_found"))
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    let (_, status) = api.get("/v1/locks/e").await?;
    assert_eq!(status["holder"]["token"], held["token"]);
    assert_eq!(status["waiters"], 0);
    Ok(())
}

/// With etcd stopped, acquire, renew and release answer 503 `store_unavailable` within the
/// request timeout and `/readyz` is 503; when etcd is back everything works without a restart.
#[tokio::test]
async fn etcd_down_means_503_then_recovery() -> Result<()> {
    let mut etcd = EtcdCluster::start(1).await?;
    let config = leasehold_server::Config::default()
        .with_etcd_endpoints(etcd.endpoints())
        .with_etcd_timeout(Duration::from_secs(2));
    let server = TestServer::start_with(config).await?;
    let api = Api::new(server.url());
    let (_, held) = api.acquire_ttl("down", "30s", "0s").await?;
    assert_eq!(api.get("/readyz").await?.0, 200);

    etcd.kill(0).await?;
    let t = token(&held);
    let calls = [
        ("/v1/locks/down/acquire", json!({"ttl": "5s", "wait": "1s"})),
        ("/v1/locks/down/renew", json!({"token": t})),
        ("/v1/locks/down/release", json!({"token": t})),
        ("/v1/leases", json!({"ttl": "5s"})),
    ];
    for (path, body) in &calls {
        let started = Instant::now();
        let (status, answer) = api.post(path, body.clone()).await?;
        assert_eq!(
            (status, answer["error"]["code"].as_str()),
            (503, Some("store_unavailable")),
            "{path}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{path} took {:?}",
            started.elapsed()
        );
    }
    assert_eq!(api.get("/readyz").await?.0, 503);
    assert_eq!(api.get("/healthz").await?.0, 200);

    etcd.restart(0)?;
    etcd.wait_ready(Duration::from_secs(20)).await?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while api.get("/readyz").await?.0 != 200 {
        anyhow::ensure!(Instant::now() < deadline, "never ready again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The hold survived (etcd keeps leases across restarts) and can be released.
    let (status, body) = api
        .post("/v1/locks/down/release", json!({"token": t}))
        .await?;
    assert_eq!(status, 200, "{body}");
    // A waiter is woken by the re-established watch.
    let (_, next) = api.acquire_ttl("down", "30s", "0s").await?;
    let waiter = tokio::spawn({
        let api = api.clone();
        async move { api.acquire_ttl("down", "30s", "20s").await }
    });
    wait_for_queue(&etcd, "down", 2).await?;
    let released_at = Instant::now();
    api.post("/v1/locks/down/release", json!({"token": token(&next)}))
        .await?;
    let (status, _) = waiter.await??;
    assert_eq!(status, 200);
    assert!(
        released_at.elapsed() < Duration::from_secs(2),
        "woken by the watch, not the backstop"
    );
    Ok(())
}

/// On a 3-member cluster, killing the leader or pausing a member does not break exclusion or
/// token order; while quorum is lost nothing is granted.
#[tokio::test]
async fn three_members_leader_kill_pause_and_quorum_loss() -> Result<()> {
    let mut etcd = EtcdCluster::start(3).await?;
    let config = leasehold_server::Config::default()
        .with_etcd_endpoints(etcd.endpoints())
        .with_etcd_timeout(Duration::from_secs(2));
    let server = TestServer::start_with(config).await?;
    let api = Api::new(server.url());
    let mut last = 0;

    // Acquire and release, retrying 503s for a bounded time: while etcd elects a leader, and
    // while a member is paused (a call routed to it times out after the 2 s etcd timeout).
    let cycle = |api: Api| async move {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (status, body) = api.acquire_ttl("q", "10s", "2s").await?;
            if status == 200 {
                let t = token(&body);
                let mut timed_out_before = false;
                loop {
                    let (s, b) = api.post("/v1/locks/q/release", json!({"token": t})).await?;
                    // A release that timed out may still have been applied by etcd; its retry
                    // then finds the token no longer holding. Either way the lock is not ours.
                    if s == 200 || (s == 409 && timed_out_before) {
                        return anyhow::Ok(t);
                    }
                    anyhow::ensure!(s == 503 && Instant::now() < deadline, "release: {s} {b}");
                    timed_out_before = true;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            anyhow::ensure!(
                status == 503 && Instant::now() < deadline,
                "acquire: {status} {body}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    for _ in 0..5 {
        let t = cycle(api.clone()).await?;
        assert!(t > last);
        last = t;
    }
    let leader = etcd.leader().await?;
    etcd.kill(leader).await?;
    for _ in 0..5 {
        let t = cycle(api.clone()).await?;
        assert!(t > last);
        last = t;
    }
    etcd.restart(leader)?;
    etcd.wait_ready(Duration::from_secs(30)).await?;
    let paused = (leader + 1) % 3;
    etcd.pause(paused)?;
    for _ in 0..3 {
        let t = cycle(api.clone()).await?;
        assert!(t > last);
        last = t;
    }
    etcd.resume(paused)?;

    // Lose quorum: stop two of three. Nothing may be granted.
    etcd.kill((paused + 1) % 3).await?;
    etcd.kill(paused).await?;
    for _ in 0..3 {
        let (status, body) = api.acquire_ttl("q", "10s", "0s").await?;
        assert_eq!(status, 503, "granted without quorum: {body}");
    }
    assert_eq!(api.get("/readyz").await?.0, 503);
    etcd.restart(paused)?;
    etcd.wait_ready(Duration::from_secs(30)).await?;
    let t = cycle(api.clone()).await?;
    assert!(t > last);
    Ok(())
}

/// A retried acquire that resumed the waiter key keeps it when the original request is
/// abandoned: the original's clean-up no longer recognises the key, so the retry stays in line
/// with the same token and is granted.
#[tokio::test]
async fn resumed_wait_survives_the_abandoned_original() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let (s1, s2) = (
        TestServer::start(&etcd).await?,
        TestServer::start(&etcd).await?,
    );
    let a2 = Api::new(s2.url());
    let (_, held) = a2.acquire_ttl("resume", "30s", "0s").await?;
    let lease = a2.grant("30s").await?;

    // The original request waits on server 1, through a client that will give up.
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(1500))
        .build()?;
    let handle = Api::handle_of(&lease).expect("the lease's handle");
    let original = tokio::spawn({
        let (url, lease) = (s1.url(), lease.clone());
        async move {
            impatient
                .post(format!("{url}/v1/locks/resume/acquire"))
                .header(leasehold_tests::HANDLE_HEADER, handle)
                .json(&json!({"lease_id": lease, "wait": "20s"}))
                .send()
                .await
        }
    });
    let queued = wait_for_queue(&etcd, "resume", 2).await?;
    let mut client = etcd.client().await?;
    let waiter_key = queued
        .iter()
        .find(|k| k.ends_with(&lease))
        .context("the original's waiter key")?
        .clone();
    let written_by_original = client.get(waiter_key.as_str(), None).await?.kvs()[0].mod_revision();
    // The retry resumes the same key on server 2 while the original still waits.
    let retry = tokio::spawn({
        let (a2, lease) = (a2.clone(), lease.clone());
        async move {
            a2.post(
                "/v1/locks/resume/acquire",
                json!({"lease_id": lease, "wait": "20s"}),
            )
            .await
        }
    });
    // The retry has taken the key over once it rewrote it (with its own nonce).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let kvs = client.get(waiter_key.as_str(), None).await?;
        let kv = kvs.kvs().first().context("the waiter key vanished")?;
        if kv.mod_revision() > written_by_original {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "the retry never resumed the key");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(original.await?.is_err(), "the original gave up");
    // Server 1 shuts down gracefully, which waits for every clean-up it started (the
    // abandoned original's included): once it has stopped, that clean-up has run.
    s1.shutdown().await?;
    assert_eq!(
        wait_for_queue(&etcd, "resume", 2).await?,
        queued,
        "the resumed key is still queued"
    );

    a2.post("/v1/locks/resume/release", json!({"token": token(&held)}))
        .await?;
    let (status, body) = retry.await??;
    assert_eq!(status, 200, "{body}");
    assert!(token(&body) > token(&held));
    Ok(())
}

/// etcd going away while a waiter waits: the waiter keeps its place, and is granted once etcd is
/// back and the holder releases (its watch re-created, it re-reads). If etcd stays away until the
/// wait ends, the answer is 503 `store_unavailable`, never a grant and never `lock_held`.
#[tokio::test]
async fn waiter_survives_an_etcd_restart() -> Result<()> {
    let mut etcd = EtcdCluster::start(1).await?;
    let config = leasehold_server::Config::default()
        .with_etcd_endpoints(etcd.endpoints())
        .with_etcd_timeout(Duration::from_secs(1));
    let server = TestServer::start_with(config).await?;
    let api = Api::new(server.url());
    let (_, held) = api.acquire_ttl("restart", "60s", "0s").await?;
    let lease = api.grant("60s").await?;
    let waiter = tokio::spawn({
        let api = api.clone();
        async move {
            api.post(
                "/v1/locks/restart/acquire",
                json!({"lease_id": lease, "wait": "30s"}),
            )
            .await
        }
    });
    wait_for_queue(&etcd, "restart", 2).await?;
    etcd.kill(0).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    etcd.restart(0)?;
    etcd.wait_ready(Duration::from_secs(20)).await?;
    let (status, body) = api
        .post("/v1/locks/restart/release", json!({"token": token(&held)}))
        .await?;
    assert_eq!(status, 200, "{body}");
    let (status, granted) = waiter.await??;
    assert_eq!(status, 200, "{granted}");
    assert!(token(&granted) > token(&held));

    // Now etcd goes away for longer than another waiter's wait.
    let other = api.grant("60s").await?;
    let waiter = tokio::spawn({
        let api = api.clone();
        async move {
            api.post(
                "/v1/locks/restart/acquire",
                json!({"lease_id": other, "wait": "2s"}),
            )
            .await
        }
    });
    wait_for_queue(&etcd, "restart", 2).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    etcd.kill(0).await?;
    let (status, body) = waiter.await??;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (503, Some("store_unavailable")),
        "{body}"
    );
    Ok(())
}

/// With one of three etcd members stalled (SIGSTOP: it accepts connections but never answers),
/// the server stops sending it calls after the first one times out: nearly every acquire and
/// release still succeeds, promptly, instead of a third of them waiting for the etcd timeout.
#[tokio::test]
async fn a_stalled_member_is_avoided() -> Result<()> {
    let etcd = EtcdCluster::start(3).await?;
    let config = leasehold_server::Config::default()
        .with_etcd_endpoints(etcd.endpoints())
        .with_etcd_timeout(Duration::from_secs(1));
    let server = TestServer::start_with(config).await?;
    let api = Api::new(server.url());
    // Stall a follower (a stalled leader is replaced by an election; a follower stays stalled).
    let leader = etcd.leader().await?;
    let stalled = (leader + 1) % 3;
    etcd.pause(stalled)?;
    let started = Instant::now();
    let mut unavailable = 0;
    for i in 0..20 {
        // A lock per cycle: a release that failed must not make the next acquire find it held.
        let (status, body) = api.acquire_ttl(&format!("stall-{i}"), "10s", "0s").await?;
        if status != 200 {
            assert_eq!(status, 503, "{body}");
            unavailable += 1;
            continue;
        }
        let release = format!("/v1/locks/stall-{i}/release");
        let (status, body) = api.post(&release, json!({"token": token(&body)})).await?;
        if status != 200 {
            assert_eq!(status, 503, "{body}");
            unavailable += 1;
        }
    }
    let elapsed = started.elapsed();
    etcd.resume(stalled)?;
    assert!(
        unavailable <= 3,
        "{unavailable} of 20 cycles hit the stalled member"
    );
    assert!(
        elapsed < Duration::from_secs(10),
        "20 cycles took {elapsed:?}"
    );
    Ok(())
}

/// An idle server's one etcd watch stays up on an etcd with default settings: its HTTP/2
/// keep-alive pings stay within etcd's default policy (at least 5 s apart), so etcd never
/// answers "too many pings" and tears the connection down (with 2 s pings it broke every ~8 s).
#[tokio::test]
async fn idle_watch_survives_a_minute_on_a_default_etcd() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let server = ServerProcess::spawn(&server_bin!(), &etcd.endpoints(), &[]).await?;
    let api = Api::new(server.url());
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(api.metric("leasehold_watch_restarts_total").await?, 0.0);
    // And the watch still works: a waiter is woken by a release.
    let (_, held) = api.acquire_ttl("idle", "10s", "0s").await?;
    let waiter = tokio::spawn({
        let api = api.clone();
        async move { api.acquire_ttl("idle", "10s", "5s").await }
    });
    wait_for_queue(&etcd, "idle", 2).await?;
    let released = Instant::now();
    api.post("/v1/locks/idle/release", json!({"token": token(&held)}))
        .await?;
    assert_eq!(waiter.await??.0, 200);
    assert!(
        released.elapsed() < Duration::from_secs(2),
        "woken by the watch"
    );
    Ok(())
}

/// A `ttl` acquire whose client hangs up while the server is still granting its lease leaves
/// no lease behind (the server revokes it), even when the grant itself lands late.
#[tokio::test]
async fn hang_up_during_the_lease_grant_leaves_no_lease() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let proxy = leasehold_tests::delay::DelayProxy::start(&etcd.endpoint(0)).await?;
    let server =
        ServerProcess::spawn(&server_bin!(), &[proxy.url()], &["--etcd-timeout", "3s"]).await?;
    let api = Api::new(server.url());
    api.get("/readyz").await?; // a live connection, so the grant goes out at once
    proxy.set_delay(Duration::from_millis(1500));
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()?;
    let gave_up = impatient
        .post(format!("{}/v1/locks/hangup/acquire", server.url()))
        .json(&json!({"ttl": "30s", "wait": "10s"}))
        .send()
        .await;
    assert!(gave_up.is_err(), "the client hung up during the grant");
    proxy.set_delay(Duration::ZERO);
    // The grant lands at 1.5 s; the revoke the server sent on hang-up lands right after it.
    let mut client = etcd.client().await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let leases = client.leases().await?;
        if leases.leases().is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a lease nobody was told of is still there: {:?}",
            leases.leases()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}
