//! Lock-delay (issue 16; `server/src/delay.rs`): after a holder's lease *expires*, its lock (for
//! a semaphore, one slot) is not granted again for the delay; after a release or a revoke it is
//! granted at once. The delay lives in etcd (a tombstone on a shadow lease), so every replica
//! honours it, and the txn that writes the tombstone is fenced, so landing late it does nothing.
//!
//! Times are measured from the moment the holder's lease is seen gone (its `GET /v1/leases/{id}`
//! answers 404, polled every 20 ms): a waiter must not be granted before `delay - 1 s` after
//! that (etcd checks lease expiry every 500 ms, and the shadow lease was granted a few ms after
//! the holder's last refresh), and must be granted within `delay + 3 s`.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use leasehold_server::{KeySchema, LeaseId, LockName};
use leasehold_tests::{Api, EtcdCluster, ServerProcess, TestServer, revision, server_bin};
use serde_json::{Value, json};
use tokio::time::Instant;

/// The default key prefix of a server.
const PREFIX: &str = "/leasehold";

fn acquire_path(name: &str) -> String {
    format!("/v1/locks/{name}/acquire")
}

/// Acquires `name` with `body`; expects 200 and returns the body.
async fn must_acquire(api: &Api, name: &str, body: Value) -> Result<Value> {
    let (status, grant) = api.post(&acquire_path(name), body).await?;
    ensure!(status == 200, "acquire {name} answered {status}: {grant}");
    Ok(grant)
}

/// Polls the lease of `grant` until it is gone (404); returns when that was seen.
async fn expiry_of(api: &Api, grant: &Value) -> Result<Instant> {
    let id = grant["lease_id"].as_str().context("lease_id")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = api.get(&format!("/v1/leases/{id}")).await?;
        match status {
            404 => return Ok(Instant::now()),
            200 => {}
            other => anyhow::bail!("lease status answered {other}: {body}"),
        }
        ensure!(Instant::now() < deadline, "lease {id} never expired");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Starts a waiting acquire of `name` with `body` in the background; resolves to the status,
/// the body and when the answer came.
fn waiter(
    api: &Api,
    name: &str,
    body: Value,
) -> tokio::task::JoinHandle<Result<(u16, Value, Instant)>> {
    let (api, path) = (api.clone(), acquire_path(name));
    tokio::spawn(async move {
        let (status, grant) = api.post(&path, body).await?;
        Ok((status, grant, Instant::now()))
    })
}

/// Keys under the lock's tombstone prefix right now.
async fn tombstones(etcd: &EtcdCluster, name: &str) -> Result<Vec<String>> {
    let mut client = etcd.client().await?;
    let keys = KeySchema::new(PREFIX);
    leasehold_tests::keys_under(&mut client, &keys.delay_prefix(&LockName::new(name)?)).await
}

/// Asserts a grant at `granted` came no sooner than `delay - 1 s` after `expired` and no later
/// than `delay + 3 s`.
fn granted_after_the_delay(expired: Instant, granted: Instant, delay: Duration) -> Result<()> {
    let after = granted.saturating_duration_since(expired);
    ensure!(
        after + Duration::from_secs(1) >= delay,
        "granted {after:?} after the holder's lease expired: before the lock-delay of {delay:?}"
    );
    ensure!(
        after <= delay + Duration::from_secs(3),
        "granted only {after:?} after the holder's lease expired (lock-delay {delay:?})"
    );
    Ok(())
}

/// A mutex: a holder's lease expires (TTL 2 s, never renewed) with `lock_delay` 5 s. A waiter
/// queued before the expiry and a try-lock during the delay are both held off; the waiter is
/// granted once the delay is over; the status shows no holder meanwhile.
#[tokio::test]
async fn an_expired_holder_leaves_the_lock_delayed() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let server = TestServer::start(&etcd).await?;
    let api = Api::new(server.url());
    let delay = Duration::from_secs(5);

    let a = must_acquire(&api, "m", json!({"ttl": "2s", "lock_delay": "5s"})).await?;
    ensure!(
        tombstones(&etcd, "m").await?.len() == 1,
        "tombstone written"
    );
    let b = waiter(&api, "m", json!({"ttl": "30s", "wait": "30s"}));
    api.wait_for_waiters("m", 1).await?;
    let expired = expiry_of(&api, &a).await?;

    tokio::time::sleep(Duration::from_secs(1)).await;
    let (status, body) = api
        .post(&acquire_path("m"), json!({"ttl": "30s", "wait": "0s"}))
        .await?;
    ensure!(
        status == 409 && body["error"]["code"] == "lock_held",
        "a try-lock during the lock-delay answered {status}: {body}"
    );
    // Nobody holds it: the refusal does not name the first waiter as the holder.
    ensure!(
        body.get("holder").is_some_and(Value::is_null),
        "a try-lock during the lock-delay named a holder: {body}"
    );
    let (_, lock) = api.get("/v1/locks/m").await?;
    ensure!(
        lock["holder"].is_null() && lock["queue"][0]["holds"] == false,
        "nobody holds during the delay: {lock}"
    );
    ensure!(!b.is_finished(), "the waiter was granted during the delay");

    let (status, grant, granted) = b.await??;
    ensure!(status == 200, "the waiter answered {status}: {grant}");
    granted_after_the_delay(expired, granted, delay)?;
    ensure!(grant["token"].as_u64() > a["token"].as_u64());
    ensure!(
        tombstones(&etcd, "m").await?.is_empty(),
        "the tombstone went with its shadow lease"
    );
    Ok(())
}

/// A delay is kept up by the holder's refreshes: a lease kept alive (keepalive route, then lock
/// renew) for longer than its TTL plus the delay still leaves the full delay when it expires.
#[tokio::test]
async fn refreshes_keep_the_delay_alive() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let server = TestServer::start(&etcd).await?;
    let api = Api::new(server.url());
    let delay = Duration::from_secs(3);

    let a = must_acquire(&api, "k", json!({"ttl": "2s", "lock_delay": "3s"})).await?;
    let id = a["lease_id"].as_str().context("lease_id")?.to_owned();
    let token = a["token"].as_u64().context("token")?;
    // 8 s of refreshes: the shadow lease's first TTL (2 s + 3 s) runs out long before.
    for i in 0..16 {
        let (status, body) = if i % 2 == 0 {
            api.post(&format!("/v1/leases/{id}/keepalive"), json!({}))
                .await?
        } else {
            api.post("/v1/locks/k/renew", json!({"token": token}))
                .await?
        };
        ensure!(status == 200, "refresh {i} answered {status}: {body}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let b = waiter(&api, "k", json!({"ttl": "30s", "wait": "30s"}));
    let expired = expiry_of(&api, &a).await?;
    let (status, grant, granted) = b.await??;
    ensure!(status == 200, "the waiter answered {status}: {grant}");
    granted_after_the_delay(expired, granted, delay)
}

/// A release, and a revoke of the holder's lease, are deliberate ends: the next acquirer is
/// granted at once, and no tombstone is left.
#[tokio::test]
async fn no_delay_after_a_release_or_a_revoke() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let server = TestServer::start(&etcd).await?;
    let api = Api::new(server.url());

    // Release.
    let a = must_acquire(&api, "r", json!({"ttl": "30s", "lock_delay": "20s"})).await?;
    ensure!(tombstones(&etcd, "r").await?.len() == 1);
    let b = waiter(&api, "r", json!({"ttl": "30s", "wait": "30s"}));
    api.wait_for_waiters("r", 1).await?;
    let released = Instant::now();
    let (status, body) = api
        .post("/v1/locks/r/release", json!({"token": a["token"]}))
        .await?;
    ensure!(status == 200, "release answered {status}: {body}");
    let (status, grant, granted) = b.await??;
    ensure!(status == 200, "the waiter answered {status}: {grant}");
    let after = granted - released;
    ensure!(
        after < Duration::from_secs(2),
        "granted {after:?} after a release"
    );
    ensure!(
        tombstones(&etcd, "r").await?.is_empty(),
        "no tombstone left"
    );

    // Revoke (a lease of the caller's, with two holds with a delay on it).
    let lease = api.grant("30s").await?;
    for name in ["v1", "v2"] {
        must_acquire(
            &api,
            name,
            json!({"lease_id": lease, "lock_delay": "20s", "limit": 2}),
        )
        .await?;
        ensure!(tombstones(&etcd, name).await?.len() == 1);
    }
    let (status, body) = api.delete(&format!("/v1/leases/{lease}")).await?;
    ensure!(status == 204, "revoke answered {status}: {body}");
    let revoked = Instant::now();
    for name in ["v1", "v2"] {
        must_acquire(&api, name, json!({"ttl": "30s", "limit": 2})).await?;
        must_acquire(&api, name, json!({"ttl": "30s", "limit": 2})).await?;
        ensure!(
            tombstones(&etcd, name).await?.is_empty(),
            "no tombstone left"
        );
    }
    ensure!(revoked.elapsed() < Duration::from_secs(2));
    Ok(())
}

/// The delay is in etcd: a second server process, which never saw the hold, honours it.
#[tokio::test]
async fn another_replica_honours_the_delay() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let one = ServerProcess::spawn(&server_bin!(), &etcd.endpoints(), &[]).await?;
    let two = ServerProcess::spawn(&server_bin!(), &etcd.endpoints(), &[]).await?;
    let (api1, api2) = (Api::new(one.url()), Api::new(two.url()));
    let delay = Duration::from_secs(4);

    let a = must_acquire(&api1, "rep", json!({"ttl": "2s", "lock_delay": "4s"})).await?;
    let expired = expiry_of(&api1, &a).await?;
    let (status, body) = api2
        .post(&acquire_path("rep"), json!({"ttl": "30s", "wait": "0s"}))
        .await?;
    ensure!(
        status == 409,
        "the other replica granted during the delay ({status}: {body})"
    );
    let (status, grant, granted) =
        waiter(&api2, "rep", json!({"ttl": "30s", "wait": "30s"})).await??;
    ensure!(status == 200, "the waiter answered {status}: {grant}");
    granted_after_the_delay(expired, granted, delay)
}

/// Everything in etcd under `prefix`, keys with values and lease.
async fn dump(etcd: &EtcdCluster, prefix: &str) -> Result<Vec<(String, Vec<u8>, i64)>> {
    let mut client = etcd.client().await?;
    let resp = client
        .get(prefix, Some(etcd_client::GetOptions::new().with_prefix()))
        .await?;
    Ok(resp
        .kvs()
        .iter()
        .map(|kv| {
            (
                String::from_utf8_lossy(kv.key()).into_owned(),
                kv.value().to_vec(),
                kv.lease(),
            )
        })
        .collect())
}

/// Bad `lock_delay` values are refused with 400 `invalid_lock_delay` before anything reaches
/// etcd: over 60 s, not a duration, negative, not a string, or on a lock kind that takes none.
#[tokio::test]
async fn bad_lock_delays_are_rejected_without_touching_etcd() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let server = TestServer::start(&etcd).await?;
    let api = Api::new(server.url());
    let lease = api.grant("30s").await?;
    let mut client = etcd.client().await?;
    let before = (revision(&mut client).await?, dump(&etcd, PREFIX).await?);

    let cases = [
        json!({"ttl": "10s", "lock_delay": "61s"}),
        json!({"ttl": "10s", "lock_delay": "abc"}),
        json!({"ttl": "10s", "lock_delay": -1}),
        json!({"ttl": "10s", "lock_delay": "-1s"}),
        json!({"ttl": "10s", "lock_delay": "1h"}),
        json!({"ttl": "10s", "lock_delay": 5}),
        json!({"lease_id": lease, "lock_delay": "2m", "wait": "5s"}),
        json!({"ttl": "10s", "lock_delay": "5s", "mode": "shared"}),
        json!({"ttl": "10s", "lock_delay": "5s", "limit": 3, "wait": "nope"}),
    ];
    for (i, body) in cases.iter().enumerate() {
        let (status, answer) = api.post(&acquire_path("bad"), body.clone()).await?;
        let want = if i == cases.len() - 1 {
            "invalid_wait" // the other field's own code; still nothing written
        } else {
            "invalid_lock_delay"
        };
        ensure!(
            status == 400 && answer["error"]["code"] == want,
            "{body} answered {status}: {answer}"
        );
    }
    for (path, body) in [
        (
            "/v1/locks/acquire",
            json!({"names": ["g1", "g2"], "ttl": "10s", "lock_delay": "5s"}),
        ),
        (
            "/v1/elections/e/campaign",
            json!({"ttl": "10s", "value": "me", "lock_delay": "5s"}),
        ),
    ] {
        let (status, answer) = api.post(path, body.clone()).await?;
        ensure!(
            status == 400 && answer["error"]["code"] == "invalid_lock_delay",
            "{path} {body} answered {status}: {answer}"
        );
    }
    let after = (revision(&mut client).await?, dump(&etcd, PREFIX).await?);
    ensure!(before == after, "etcd changed: {before:?} -> {after:?}");
    // The bounds themselves are accepted.
    must_acquire(&api, "ok", json!({"ttl": "10s", "lock_delay": "60s"})).await?;
    must_acquire(&api, "ok0", json!({"ttl": "10s", "lock_delay": "0s"})).await?;
    ensure!(
        tombstones(&etcd, "ok0").await?.is_empty(),
        "0s: no tombstone"
    );
    Ok(())
}

/// The tombstone txn is fenced: sent again after the hold was released (as a request etcd
/// applies late would be), it changes nothing and no delay follows. The same txn sent while the
/// hold lasts does write (so the fence, not a malformed txn, is what refuses).
#[tokio::test]
async fn a_late_tombstone_txn_changes_nothing() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let server = TestServer::start(&etcd).await?;
    let api = Api::new(server.url());
    let keys = KeySchema::new(PREFIX);
    let name = LockName::new("late")?;
    let mut client = etcd.client().await?;

    let a = must_acquire(&api, "late", json!({"ttl": "30s", "lock_delay": "10s"})).await?;
    let token = a["token"].as_u64().context("token")?;
    let lease: LeaseId = a["lease_id"]
        .as_str()
        .context("lease_id")?
        .parse()
        .map_err(|()| anyhow::anyhow!("lease id"))?;
    // What the server wrote and compares: the waiter value (with its nonce) and the live digest.
    let waiter = client.get(keys.waiter_key(&name, lease), None).await?;
    let value = waiter.kvs().first().context("waiter key")?.value().to_vec();
    let auth = client.get(keys.auth_key(lease), None).await?;
    let auth_live = auth.kvs().first().context("auth key")?.value().to_vec();
    let shadow = leasehold_server::shadow_lease_id(lease, &name, token, 10);
    let txn = || {
        leasehold_server::tombstone_txn(
            &keys,
            lease,
            &auth_live,
            &value,
            token,
            &[(name.clone(), shadow)],
            10,
        )
    };
    // While the hold lasts, the txn (resent: a retry) succeeds.
    ensure!(client.txn(txn()).await?.succeeded(), "the live txn applies");

    let (status, body) = api
        .post("/v1/locks/late/release", json!({"token": token}))
        .await?;
    ensure!(status == 200, "release answered {status}: {body}");
    ensure!(tombstones(&etcd, "late").await?.is_empty());

    // The shadow lease may still exist (its revoke after a release is best-effort): give the
    // late txn every chance by making sure it does.
    let _ = client
        .lease_grant(
            30,
            Some(etcd_client::LeaseGrantOptions::new().with_id(shadow.as_i64())),
        )
        .await;
    let before = (revision(&mut client).await?, dump(&etcd, PREFIX).await?);
    let late = client.txn(txn()).await?;
    ensure!(!late.succeeded(), "the late tombstone txn applied");
    let after = (revision(&mut client).await?, dump(&etcd, PREFIX).await?);
    ensure!(before == after, "the late txn changed etcd");

    let started = Instant::now();
    must_acquire(&api, "late", json!({"ttl": "30s", "wait": "0s"})).await?;
    ensure!(started.elapsed() < Duration::from_secs(1));
    Ok(())
}

/// A semaphore of 3: one holder's lease expires with a lock-delay, so its orphan tombstone takes
/// one slot until the delay is over. Two others hold meanwhile (one of them granted during the
/// delay); a third is held off until the delay passes.
#[tokio::test]
async fn an_orphan_takes_one_semaphore_slot() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let server = TestServer::start(&etcd).await?;
    let api = Api::new(server.url());
    let delay = Duration::from_secs(5);
    let slot = |ttl: &str| json!({"ttl": ttl, "limit": 3, "wait": "0s"});

    let a = must_acquire(
        &api,
        "s",
        json!({"ttl": "2s", "limit": 3, "lock_delay": "5s"}),
    )
    .await?;
    let b = must_acquire(&api, "s", slot("30s")).await?;
    let c = must_acquire(&api, "s", slot("30s")).await?;
    let expired = expiry_of(&api, &a).await?;

    // Two slots left beside the orphan: c gives one back, d takes it at once.
    let (status, body) = api
        .post("/v1/locks/s/release", json!({"token": c["token"]}))
        .await?;
    ensure!(status == 200, "release answered {status}: {body}");
    let d = must_acquire(&api, "s", slot("30s")).await?;
    let (status, body) = api.post(&acquire_path("s"), slot("30s")).await?;
    ensure!(
        status == 409,
        "a third holder beside the orphan: {status}: {body}"
    );
    let (_, lock) = api.get("/v1/locks/s").await?;
    let holding: Vec<u64> = lock["queue"]
        .as_array()
        .context("queue")?
        .iter()
        .filter(|e| e["holds"] == true)
        .filter_map(|e| e["token"].as_u64())
        .collect();
    ensure!(
        holding == [b["token"].as_u64().unwrap(), d["token"].as_u64().unwrap()],
        "the status shows the two holders: {lock}"
    );

    let (status, grant, granted) =
        waiter(&api, "s", json!({"ttl": "30s", "limit": 3, "wait": "30s"})).await??;
    ensure!(status == 200, "the waiter answered {status}: {grant}");
    granted_after_the_delay(expired, granted, delay)?;
    // b and d still hold.
    for held in [&b, &d] {
        let (status, body) = api
            .post("/v1/locks/s/renew", json!({"token": held["token"]}))
            .await?;
        ensure!(status == 200, "renew answered {status}: {body}");
    }
    Ok(())
}

/// The client crate sends `.lock_delay(..)` (a detached guard, which stops renewing, leaves the
/// delay when its lease expires) and the CLI's `lock --lock-delay` passes it on (a tombstone
/// exists while CMD runs, and is gone once the CLI released the lock).
#[tokio::test]
async fn the_client_and_the_cli_ask_for_a_lock_delay() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let server = TestServer::start(&etcd).await?;
    let api = Api::new(server.url());
    let client = leasehold::Client::new(server.url())?;

    let guard = client
        .lock("cl")
        .ttl(Duration::from_secs(2))
        .lock_delay(Duration::from_millis(2500))
        .acquire()
        .await?;
    ensure!(
        tombstones(&etcd, "cl").await?.len() == 1,
        "tombstone written"
    );
    let lease = guard.lease_id().to_string();
    let (_, token, _) = guard.detach();
    let expired = expiry_of(&api, &json!({"lease_id": lease})).await?;
    let next = client
        .lock("cl")
        .ttl(Duration::from_secs(10))
        .wait(Duration::from_secs(20))
        .acquire()
        .await?;
    // 2.5 s is rounded up to 3 s.
    granted_after_the_delay(expired, Instant::now(), Duration::from_secs(3))?;
    ensure!(next.token() > token);
    next.release().await?;

    let mut cli = tokio::process::Command::new(leasehold_tests::cli_bin!())
        .env("LEASEHOLD_ENDPOINTS", server.url())
        .args(["lock", "--lock-delay", "5s", "cli-lock", "sleep", "3"])
        .kill_on_drop(true)
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while tombstones(&etcd, "cli-lock").await?.is_empty() {
        ensure!(Instant::now() < deadline, "the CLI's hold has no tombstone");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = cli.wait().await?;
    ensure!(status.success(), "the CLI exited with {status}");
    ensure!(
        tombstones(&etcd, "cli-lock").await?.is_empty(),
        "released: no tombstone"
    );
    let (status, body) = api
        .post(&acquire_path("cli-lock"), json!({"ttl": "10s"}))
        .await?;
    ensure!(
        status == 200,
        "no delay after the CLI released: {status} {body}"
    );
    Ok(())
}
