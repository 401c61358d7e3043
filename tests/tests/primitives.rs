//! The primitives beyond the mutex, over HTTP against real etcd: semaphores, read-write locks,
//! all-or-nothing groups, and the ordered queue a status shows.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use leasehold_tests::{Api, EtcdCluster, TestServer, keys_under};
use serde_json::{Value, json};

fn token(body: &Value) -> Result<u64> {
    body["token"]
        .as_u64()
        .with_context(|| format!("no token: {body}"))
}

async fn acquire(api: &Api, name: &str, body: Value) -> Result<(u16, Value)> {
    api.post(&format!("/v1/locks/{name}/acquire"), body).await
}

async fn release(api: &Api, name: &str, held: &Value) -> Result<(u16, Value)> {
    api.post(
        &format!("/v1/locks/{name}/release"),
        json!({"token": held["token"]}),
    )
    .await
}

/// Waits until `name`'s status has `n` entries in its queue, holders included.
async fn wait_queue(api: &Api, name: &str, n: usize) -> Result<Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, status) = api.get(&format!("/v1/locks/{name}")).await?;
        if status["queue"].as_array().map_or(0, Vec::len) == n {
            return Ok(status);
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "never {n} queued: {status}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A semaphore of 3: three holders at once, each with its own token; the fourth waits until one
/// releases; every acquirer must give the same limit.
#[tokio::test]
async fn a_semaphore_holds_up_to_its_limit() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let server = TestServer::start(&etcd).await?;
    let api = Api::new(server.url());
    let mut held = Vec::new();
    for i in 0..3 {
        let (status, body) = acquire(
            &api,
            "pool",
            json!({"ttl": "30s", "limit": 3, "owner": format!("w{i}")}),
        )
        .await?;
        ensure!(status == 200, "holder {i}: {body}");
        held.push(body);
    }
    let tokens: Vec<u64> = held.iter().map(token).collect::<Result<_>>()?;
    ensure!(
        tokens.windows(2).all(|w| w[0] < w[1]),
        "distinct, increasing: {tokens:?}"
    );
    let (status, body) = acquire(&api, "pool", json!({"ttl": "30s", "limit": 3})).await?;
    ensure!(
        status == 409 && body["error"]["code"] == "lock_held",
        "the 4th: {body}"
    );
    for bad in [json!({"ttl": "30s", "limit": 2}), json!({"ttl": "30s"})] {
        let (status, body) = acquire(&api, "pool", bad).await?;
        ensure!(
            status == 409 && body["error"]["code"] == "limit_mismatch",
            "{body}"
        );
    }
    let fourth = tokio::spawn({
        let api = api.clone();
        async move {
            acquire(
                &api,
                "pool",
                json!({"ttl": "30s", "limit": 3, "wait": "10s"}),
            )
            .await
        }
    });
    let status = wait_queue(&api, "pool", 4).await?;
    ensure!(status["limit"] == 3 && status["waiters"] == 1, "{status}");
    let holds: Vec<bool> = status["queue"]
        .as_array()
        .context("queue")?
        .iter()
        .map(|e| e["holds"] == true)
        .collect();
    ensure!(holds == [true, true, true, false], "{status}");
    release(&api, "pool", &held[1]).await?;
    let (status, body) = fourth.await??;
    ensure!(status == 200 && token(&body)? > tokens[2], "{body}");
    Ok(())
}

/// Readers share; a writer waits for the readers ahead of it and is not starved by readers that
/// come after it: they queue behind it. Tokens grow in grant order.
#[tokio::test]
async fn a_writer_is_not_starved_by_readers() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let server = TestServer::start(&etcd).await?;
    let api = Api::new(server.url());
    let shared = json!({"ttl": "30s", "mode": "shared"});
    let (_, r1) = acquire(&api, "doc", shared.clone()).await?;
    let (_, r2) = acquire(&api, "doc", shared.clone()).await?;
    ensure!(token(&r1)? < token(&r2)?, "{r1} {r2}");
    let writer = tokio::spawn({
        let api = api.clone();
        async move {
            acquire(
                &api,
                "doc",
                json!({"ttl": "30s", "mode": "exclusive", "wait": "10s"}),
            )
            .await
        }
    });
    wait_queue(&api, "doc", 3).await?;
    // A reader arriving now waits behind the writer, though readers hold.
    let (status, body) = acquire(&api, "doc", shared.clone()).await?;
    ensure!(status == 409, "a late reader jumped the writer: {body}");
    let late_reader = tokio::spawn({
        let api = api.clone();
        async move {
            acquire(
                &api,
                "doc",
                json!({"ttl": "30s", "mode": "shared", "wait": "10s"}),
            )
            .await
        }
    });
    wait_queue(&api, "doc", 4).await?;
    let (status, body) = acquire(&api, "doc", json!({"ttl": "30s"})).await?;
    ensure!(
        status == 409 && body["error"]["code"] == "mode_mismatch",
        "{body}"
    );
    release(&api, "doc", &r1).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    ensure!(
        !writer.is_finished(),
        "the writer was granted while a reader held"
    );
    release(&api, "doc", &r2).await?;
    let (status, w) = writer.await??;
    ensure!(status == 200 && token(&w)? > token(&r2)?, "{w}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    ensure!(
        !late_reader.is_finished(),
        "a reader was granted while the writer held"
    );
    release(&api, "doc", &w).await?;
    let (status, r3) = late_reader.await??;
    ensure!(status == 200 && token(&r3)? > token(&w)?, "{r3}");
    Ok(())
}

/// A group takes every name or none: granted with one token on every name; a group that
/// overlaps a held name gets nothing and leaves no key behind; group release frees them all.
#[tokio::test]
async fn a_group_takes_all_or_nothing() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let server = TestServer::start(&etcd).await?;
    let api = Api::new(server.url());
    let (status, group) = api
        .post(
            "/v1/locks/acquire",
            json!({"names": ["s1", "s2", "s3"], "ttl": "30s", "owner": "friends"}),
        )
        .await?;
    ensure!(status == 200, "{group}");
    let t = token(&group)?;
    ensure!(
        group["tokens"] == json!({"s1": t, "s2": t, "s3": t}),
        "{group}"
    );
    for name in ["s1", "s2", "s3"] {
        let (_, status) = api.get(&format!("/v1/locks/{name}")).await?;
        ensure!(status["holder"]["token"] == t && status["holder"]["owner"] == "friends");
    }
    let mut client = etcd.client().await?;
    let before = keys_under(&mut client, "/leasehold/locks/").await?;
    let (status, body) = api
        .post(
            "/v1/locks/acquire",
            json!({"names": ["s4", "s3"], "ttl": "30s"}),
        )
        .await?;
    ensure!(status == 409 && body["holder"]["token"] == t, "{body}");
    ensure!(
        keys_under(&mut client, "/leasehold/locks/").await? == before,
        "a refused group left keys (s4 must not stay held)"
    );
    let (status, free) = acquire(&api, "s4", json!({"ttl": "30s"})).await?;
    ensure!(status == 200, "s4 is free: {free}");
    let handle = group["handle"].as_str().context("handle")?;
    let (status, body) = api
        .post_with_handle(
            "/v1/locks/release",
            json!({"names": ["s1", "s2", "s3"], "token": t}),
            Some(handle),
        )
        .await?;
    ensure!(status == 200, "{body}");
    for name in ["s1", "s2", "s3"] {
        let (_, status) = api.get(&format!("/v1/locks/{name}")).await?;
        ensure!(status["holder"].is_null(), "{status}");
    }
    Ok(())
}

/// Two groups asking for the same names in opposite orders, while a third party holds one of
/// them, never deadlock: both are granted, the older first.
#[tokio::test]
async fn groups_in_opposite_orders_do_not_deadlock() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let server = TestServer::start(&etcd).await?;
    let api = Api::new(server.url());
    for round in 0..3 {
        let (a, b) = (format!("left-{round}"), format!("right-{round}"));
        let (_, blocker) = acquire(&api, &b, json!({"ttl": "30s"})).await?;
        let first = tokio::spawn({
            let (api, a, b) = (api.clone(), a.clone(), b.clone());
            async move {
                api.post(
                    "/v1/locks/acquire",
                    json!({"names": [a, b], "ttl": "30s", "wait": "20s"}),
                )
                .await
            }
        });
        wait_queue(&api, &b, 2).await?;
        let second = tokio::spawn({
            let (api, a, b) = (api.clone(), a.clone(), b.clone());
            async move {
                api.post(
                    "/v1/locks/acquire",
                    json!({"names": [b, a], "ttl": "30s", "wait": "20s"}),
                )
                .await
            }
        });
        wait_queue(&api, &b, 3).await?;
        release(&api, &b, &blocker).await?;
        let (status, g1) = first.await??;
        ensure!(status == 200, "round {round}: the older group: {g1}");
        let handle = g1["handle"].as_str().context("handle")?;
        api.post_with_handle(
            "/v1/locks/release",
            json!({"names": [a, b], "token": g1["token"]}),
            Some(handle),
        )
        .await?;
        let (status, g2) = second.await??;
        ensure!(
            status == 200 && token(&g2)? > token(&g1)?,
            "round {round}: {g2}"
        );
    }
    Ok(())
}

/// A status lists the queue in order, with owners and positions, and never a handle; positions
/// count down as holders go.
#[tokio::test]
async fn status_lists_the_queue_in_order() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let server = TestServer::start(&etcd).await?;
    let api = Api::new(server.url());
    let (_, first) = acquire(&api, "line", json!({"ttl": "30s", "owner": "ann"})).await?;
    let mut waiters = Vec::new();
    for (i, owner) in ["bob", "cat", "dan"].iter().enumerate() {
        waiters.push(tokio::spawn({
            let (api, owner) = (api.clone(), owner.to_string());
            async move {
                acquire(
                    &api,
                    "line",
                    json!({"ttl": "30s", "owner": owner, "wait": "10s"}),
                )
                .await
            }
        }));
        wait_queue(&api, "line", i + 2).await?;
    }
    let status = wait_queue(&api, "line", 4).await?;
    let owners: Vec<&str> = status["queue"]
        .as_array()
        .context("queue")?
        .iter()
        .map(|e| e["owner"].as_str().unwrap_or(""))
        .collect();
    ensure!(owners == ["ann", "bob", "cat", "dan"], "{status}");
    let positions: Vec<u64> = status["queue"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["position"].as_u64().unwrap())
        .collect();
    ensure!(
        positions == [0, 1, 2, 3] && status["waiters"] == 3,
        "{status}"
    );
    ensure!(
        !status
            .to_string()
            .contains(first["handle"].as_str().unwrap()),
        "a handle in the status"
    );
    release(&api, "line", &first).await?;
    let (_, bob) = waiters.remove(0).await??;
    let status = wait_queue(&api, "line", 3).await?;
    ensure!(
        status["queue"][0]["owner"] == "bob"
            && status["queue"][2]["owner"] == "dan"
            && status["queue"][2]["position"] == 2,
        "{status}"
    );
    release(&api, "line", &bob).await?;
    for w in waiters {
        w.abort();
    }
    Ok(())
}
