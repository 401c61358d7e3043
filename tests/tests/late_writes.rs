//! Late writes: every etcd request the server gave up on may still be applied afterwards. Each
//! test stages one interleaving on a 3-member etcd, with a server whose requests to a follower go
//! through a [`DelayProxy`]: the request times out at the server, which answers, and then reaches
//! the follower (and is applied) seconds later, exactly as with a member that stalls and continues.
//! The other steps go through a healthy server. Each names the guarantee it checks; each failed on
//! the code before the fences (`docs/design.md`, "Late writes").
//!
//! Servers run as processes (`LEASEHOLD_SERVER_BIN` may point at another build) and every request
//! is plain HTTP, sending a lease's handle when the server gave one. `LEASEHOLD_LATE_WRITE_TRIES`
//! (default 2) sets how many times each interleaving is staged; the figures in
//! `docs/reliability.md` come from 20.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use leasehold_tests::delay::DelayProxy;
use leasehold_tests::{Api, EtcdCluster, ServerProcess, server_bin};
use serde_json::{Value, json};
use tokio::time::Instant;

/// How long a server waits for etcd before answering 503.
const ETCD_TIMEOUT: &str = "1s";

fn tries() -> usize {
    std::env::var("LEASEHOLD_LATE_WRITE_TRIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2)
}

/// A 3-member etcd, a healthy server on every member, and two delaying proxies to a follower.
struct Rig {
    etcd: EtcdCluster,
    follower: usize,
    healthy: ServerProcess,
    slow_a: DelayProxy,
    slow_b: DelayProxy,
}

impl Rig {
    async fn start() -> Result<Self> {
        leasehold_tests::init_logging();
        let etcd = EtcdCluster::start(3).await?;
        let leader = etcd.leader().await?;
        let follower = (leader + 1) % 3;
        let healthy = ServerProcess::spawn(&server_bin!(), &etcd.endpoints(), &[]).await?;
        let slow_a = DelayProxy::start(&etcd.endpoint(follower)).await?;
        let slow_b = DelayProxy::start(&etcd.endpoint(follower)).await?;
        Ok(Self {
            etcd,
            follower,
            healthy,
            slow_a,
            slow_b,
        })
    }

    /// A server whose etcd endpoints are `endpoints`, answering 503 after `timeout`.
    async fn server(&self, endpoints: &[String], timeout: &str) -> Result<ServerProcess> {
        ServerProcess::spawn(&server_bin!(), endpoints, &["--etcd-timeout", timeout]).await
    }

    fn ok(&self) -> Api {
        Api::new(self.healthy.url())
    }

    /// Holds every byte sent to the follower through both proxies back by `delay` from now.
    fn stall(&self, delay: Duration) {
        self.slow_a.set_delay(delay);
        self.slow_b.set_delay(delay);
    }
}

/// Makes sure `api`'s server has live connections to each of its etcd endpoints, so that what the
/// test sends next goes out at once (into the delay line) instead of waiting for a connection
/// whose handshake the delay would hold back (a request that never left cannot land late).
async fn warm(api: &Api) -> Result<()> {
    for _ in 0..4 {
        api.get("/readyz").await?;
    }
    Ok(())
}

/// The lock's status, read through `api`. A read that etcd does not answer within the short
/// `--etcd-timeout` of these tests (a busy machine) is read again: these tests judge what the
/// status says, not whether one read got through.
async fn status(api: &Api, lock: &str) -> Result<Value> {
    let mut tries = 0;
    loop {
        let (code, body) = api.get(&format!("/v1/locks/{lock}")).await?;
        tries += 1;
        if code == 503 && body["error"]["code"] == "store_unavailable" && tries < 5 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        ensure!(code == 200, "status of {lock}: {code} {body}");
        return Ok(body);
    }
}

fn token(body: &Value) -> Result<u64> {
    body["token"]
        .as_u64()
        .with_context(|| format!("no token in {body}"))
}

async fn acquire(api: &Api, lock: &str, body: Value) -> Result<(u16, Value)> {
    api.post(&format!("/v1/locks/{lock}/acquire"), body).await
}

/// Waits until `lock` has `n` keys queued (holder included).
async fn wait_queued(api: &Api, lock: &str, n: u64) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = status(api, lock).await?;
        let queued = s["waiters"].as_u64().unwrap_or(0) + u64::from(!s["holder"].is_null());
        if queued == n {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "{lock} never had {n} queued: {s}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// 1. A 503 acquire must not become a phantom holder. The enqueue is held back; its clean-up
///    goes through the other (by then fast) endpoint and finds nothing; then the enqueue lands.
///    No key of that request may hold the lock afterwards.
#[tokio::test]
async fn late_enqueue_is_not_a_phantom_holder() -> Result<()> {
    let rig = Rig::start().await?;
    let split = rig
        .server(&[rig.slow_a.url(), rig.slow_b.url()], ETCD_TIMEOUT)
        .await?;
    let (ok, via_split) = (rig.ok(), Api::new(split.url()));
    for trial in 0..tries() {
        let lock = format!("phantom-{trial}");
        let lease = ok.grant("30s").await?;
        warm(&via_split).await?;
        rig.stall(Duration::from_millis(2500));
        let attempt = tokio::spawn({
            let (api, lock, lease) = (via_split.clone(), lock.clone(), lease.clone());
            async move { acquire(&api, &lock, json!({"lease_id": lease, "wait": "0s"})).await }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        rig.stall(Duration::ZERO); // the enqueue stays held; what follows goes through
        let (code, body) = attempt.await??;
        ensure!(
            code != 200,
            "trial {trial}: the held enqueue was answered: {body}"
        );
        tokio::time::sleep(Duration::from_millis(3000)).await; // the enqueue has landed
        let s = status(&ok, &lock).await?;
        ensure!(
            s["holder"].is_null(),
            "trial {trial}: a phantom holder nobody was granted: {s} (acquire answered {code} {body})"
        );
        let (code, body) = ok.acquire_ttl(&lock, "5s", "0s").await?;
        ensure!(
            code == 200,
            "trial {trial}: the lock is free, yet {code} {body}"
        );
    }
    Ok(())
}

/// 2. A late enqueue, and then its clean-up, must not take over or delete the hold a retry was
///    granted meanwhile. The server has only the held-back endpoint, so both its enqueue and its
///    clean-ups land late; the client's retry on a healthy server is granted before they land.
#[tokio::test]
async fn late_enqueue_and_clean_up_spare_the_retry_that_holds() -> Result<()> {
    let rig = Rig::start().await?;
    let slow = rig.server(&[rig.slow_a.url()], ETCD_TIMEOUT).await?;
    let (ok, via_slow) = (rig.ok(), Api::new(slow.url()));
    for trial in 0..tries() {
        let lock = format!("steal-{trial}");
        let lease = ok.grant("30s").await?;
        warm(&via_slow).await?;
        rig.slow_a.set_delay(Duration::from_secs(4));
        let (code, body) =
            acquire(&via_slow, &lock, json!({"lease_id": lease, "wait": "0s"})).await?;
        rig.slow_a.set_delay(Duration::ZERO);
        ensure!(
            code == 503,
            "trial {trial}: expected 503, got {code} {body}"
        );
        // The client retries on another replica, as the crate does after a 503.
        let (code, held) = acquire(&ok, &lock, json!({"lease_id": lease, "wait": "0s"})).await?;
        ensure!(
            code == 200,
            "trial {trial}: the retry was refused: {code} {held}"
        );
        tokio::time::sleep(Duration::from_secs(5)).await; // everything held back has landed
        let s = status(&ok, &lock).await?;
        ensure!(
            s["holder"]["token"].as_u64() == Some(token(&held)?),
            "trial {trial}: the retry's hold (token {}) is gone: {s}",
            token(&held)?
        );
        let (code, body) = ok
            .post(
                &format!("/v1/locks/{lock}/renew"),
                json!({"token": held["token"]}),
            )
            .await?;
        ensure!(
            code == 200,
            "trial {trial}: renew of the live hold: {code} {body}"
        );
        ok.delete(&format!("/v1/leases/{lease}")).await?;
    }
    Ok(())
}

/// 3. A waited `ttl` grant must not be answered after its lease died. The waiter's server has a
///    healthy endpoint and a held-back one, and a timeout longer than the 2 s TTL: when the
///    post-grant refresh hits the held-back endpoint, the old code answered 200 after the lease
///    had expired and the next waiter had been granted. Trials where the refresh went to the
///    healthy endpoint do not reach the race; they must still be correct.
#[tokio::test]
async fn waited_ttl_grant_is_not_answered_after_its_lease_died() -> Result<()> {
    let rig = Rig::start().await?;
    let leader = rig.etcd.leader().await?;
    let mixed = rig
        .server(&[rig.etcd.endpoint(leader), rig.slow_a.url()], "3s")
        .await?;
    let (ok, via_mixed) = (rig.ok(), Api::new(mixed.url()));
    let mut reached = 0;
    for trial in 0..tries() * 3 {
        let lock = format!("refresh-{trial}");
        let (_, x) = ok.acquire_ttl(&lock, "30s", "0s").await?;
        let w = tokio::spawn({
            let (api, lock) = (via_mixed.clone(), lock.clone());
            async move {
                let r = api.acquire_ttl(&lock, "2s", "20s").await;
                (r, Instant::now())
            }
        });
        wait_queued(&ok, &lock, 2).await?;
        let w2 = tokio::spawn({
            let (api, lock) = (ok.clone(), lock.clone());
            async move {
                let r = api.acquire_ttl(&lock, "10s", "20s").await;
                (r, Instant::now())
            }
        });
        wait_queued(&ok, &lock, 3).await?;
        warm(&via_mixed).await?;
        rig.slow_a.set_delay(Duration::from_secs(5));
        let released_at = Instant::now();
        ok.post(
            &format!("/v1/locks/{lock}/release"),
            json!({"token": x["token"]}),
        )
        .await?;
        let (w, w_at) = w.await?;
        let (w, w_body) = w?;
        rig.slow_a.set_delay(Duration::ZERO);
        let (w2, w2_at) = w2.await?;
        let (w2, w2_body) = w2?;
        if w_at - released_at >= Duration::from_millis(2500) {
            reached += 1;
        }
        if w == 200 {
            // W holds from its answer for ttl_ms (less a client's margin for the answer's
            // travel); W2, behind W in line, may not be granted before that.
            ensure!(
                w2 != 200 || w2_at >= w_at + Duration::from_millis(1500),
                "trial {trial}: W was answered 200 ({w_body}) at {:?}, W2 granted ({w2_body}) at {:?} after the release",
                w_at - released_at,
                w2_at - released_at
            );
            ensure!(
                token(&w_body)? < token(&w2_body).unwrap_or(u64::MAX),
                "trial {trial}: tokens out of order: {w_body} / {w2_body}"
            );
        }
        if reached >= tries() {
            break;
        }
    }
    eprintln!("waited_ttl_grant: {reached} trials reached the stuck refresh");
    Ok(())
}

/// 4. A release that lands late must not delete the hold its holder re-acquired after the
///    release was answered 503: the next waiter is not granted while the holder was told it holds.
///    Staged alternately through a server with only the held-back endpoint and one with a healthy
///    endpoint first (where a release that reads before it deletes may read on the healthy one and
///    delete on the held-back one); trials whose release is answered 200 do not reach the race.
#[tokio::test]
async fn late_release_spares_a_re_acquired_hold() -> Result<()> {
    let rig = Rig::start().await?;
    let leader = rig.etcd.leader().await?;
    let slow = rig.server(&[rig.slow_a.url()], ETCD_TIMEOUT).await?;
    let mixed = rig
        .server(&[rig.etcd.endpoint(leader), rig.slow_b.url()], ETCD_TIMEOUT)
        .await?;
    let ok = rig.ok();
    let mut reached = 0;
    for trial in 0..tries() * 3 {
        let via = Api::new(if trial % 2 == 0 {
            slow.url()
        } else {
            mixed.url()
        });
        let lock = format!("release-{trial}");
        let lease = ok.grant("30s").await?;
        let (code, held) = acquire(&ok, &lock, json!({"lease_id": lease})).await?;
        ensure!(code == 200, "{held}");
        let waiter = tokio::spawn({
            let (api, lock) = (ok.clone(), lock.clone());
            async move { api.acquire_ttl(&lock, "10s", "30s").await }
        });
        wait_queued(&ok, &lock, 2).await?;
        warm(&via).await?;
        // The mixed server takes its endpoints in turn: every other mixed trial shifts the turn
        // by one call, so that both orders (read or write on the held-back endpoint) are tried.
        if trial % 4 == 3 {
            via.get("/readyz").await?;
        }
        rig.stall(Duration::from_secs(8));
        let (code, body) = via
            .post(
                &format!("/v1/locks/{lock}/release"),
                json!({"token": held["token"]}),
            )
            .await?;
        rig.stall(Duration::ZERO);
        if code != 503 {
            ensure!(code == 200, "trial {trial}: release: {code} {body}");
            let (code, body) = waiter.await??;
            ensure!(
                code == 200,
                "trial {trial}: the waiter after the release: {code} {body}"
            );
            tokio::time::sleep(Duration::from_secs(8)).await; // let held-back bytes land
            continue;
        }
        reached += 1;
        // The holder acquires again under its lease: told it holds, with the same token.
        let (code, again) = acquire(&ok, &lock, json!({"lease_id": lease})).await?;
        ensure!(code == 200, "trial {trial}: re-acquire: {code} {again}");
        ensure!(again["token"] == held["token"], "{again} vs {held}");
        tokio::time::sleep(Duration::from_secs(9)).await; // the held-back release has landed
        ensure!(
            !waiter.is_finished(),
            "trial {trial}: the waiter was granted while the holder holds: {:?}",
            waiter.await?
        );
        let s = status(&ok, &lock).await?;
        ensure!(s["holder"]["token"] == held["token"], "trial {trial}: {s}");
        ok.post(
            &format!("/v1/locks/{lock}/release"),
            json!({"token": held["token"]}),
        )
        .await?;
        let (code, body) = waiter.await??;
        ensure!(
            code == 200,
            "the waiter after the real release: {code} {body}"
        );
        if reached >= tries() {
            break;
        }
    }
    eprintln!("late_release: {reached} trials reached a 503 release");
    ensure!(reached > 0, "no trial reached a release answered 503");
    Ok(())
}

/// 5. A revoke that lands late must not end a hold taken under the lease after the revoke was
///    answered 503 (the lease was confirmed alive since): the next waiter is not granted.
#[tokio::test]
async fn late_revoke_spares_holds_confirmed_after_it() -> Result<()> {
    let rig = Rig::start().await?;
    let slow = rig.server(&[rig.slow_a.url()], ETCD_TIMEOUT).await?;
    let (ok, via_slow) = (rig.ok(), Api::new(slow.url()));
    for trial in 0..tries() {
        let lock = format!("revoke-{trial}");
        let lease = ok.grant("20s").await?;
        warm(&via_slow).await?;
        rig.slow_a.set_delay(Duration::from_secs(6));
        let (code, body) = via_slow.delete(&format!("/v1/leases/{lease}")).await?;
        rig.slow_a.set_delay(Duration::ZERO);
        ensure!(
            code == 503,
            "trial {trial}: expected 503, got {code} {body}"
        );
        let (code, body) = ok
            .post(&format!("/v1/leases/{lease}/keepalive"), json!({}))
            .await?;
        ensure!(
            code == 200,
            "trial {trial}: keepalive after the 503: {code} {body}"
        );
        let (code, held) = acquire(&ok, &lock, json!({"lease_id": lease})).await?;
        ensure!(
            code == 200,
            "trial {trial}: acquire after the 503: {code} {held}"
        );
        let waiter = tokio::spawn({
            let (api, lock) = (ok.clone(), lock.clone());
            async move { api.acquire_ttl(&lock, "10s", "30s").await }
        });
        wait_queued(&ok, &lock, 2).await?;
        tokio::time::sleep(Duration::from_secs(7)).await; // the held-back revoke has landed
        ensure!(
            !waiter.is_finished(),
            "trial {trial}: the waiter was granted while the hold confirmed after the revoke lives: {:?}",
            waiter.await?
        );
        let s = status(&ok, &lock).await?;
        ensure!(s["holder"]["token"] == held["token"], "trial {trial}: {s}");
        waiter.abort();
    }
    Ok(())
}

/// 6. A wait resumed by a retry must not be poisoned by the first attempt's late enqueue: when
///    the retry's wait runs out its clean-up removes the key, and the lock is free once the holder
///    releases.
#[tokio::test]
async fn late_enqueue_does_not_poison_a_resumed_wait() -> Result<()> {
    let rig = Rig::start().await?;
    let split = rig
        .server(&[rig.slow_a.url(), rig.slow_b.url()], ETCD_TIMEOUT)
        .await?;
    let (ok, via_split) = (rig.ok(), Api::new(split.url()));
    for trial in 0..tries() {
        let lock = format!("poison-{trial}");
        let (_, x) = ok.acquire_ttl(&lock, "30s", "0s").await?;
        let lease = ok.grant("30s").await?;
        warm(&via_split).await?;
        rig.stall(Duration::from_millis(2500));
        let first = tokio::spawn({
            let (api, lock, lease) = (via_split.clone(), lock.clone(), lease.clone());
            async move { acquire(&api, &lock, json!({"lease_id": lease, "wait": "0s"})).await }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        rig.stall(Duration::ZERO);
        let (code, body) = first.await??;
        ensure!(code != 200, "trial {trial}: {code} {body}");
        // The retry waits (4 s) while the first attempt's enqueue lands (at 2.5 s).
        let (code, body) = acquire(&ok, &lock, json!({"lease_id": lease, "wait": "4s"})).await?;
        ensure!(
            code == 409,
            "trial {trial}: the retry should time out in line: {code} {body}"
        );
        ok.post(
            &format!("/v1/locks/{lock}/release"),
            json!({"token": x["token"]}),
        )
        .await?;
        let s = status(&ok, &lock).await?;
        ensure!(
            s["holder"].is_null(),
            "trial {trial}: lease {lease} holds the lock and no client knows: {s}"
        );
        ok.delete(&format!("/v1/leases/{lease}")).await?;
    }
    Ok(())
}

/// 7. A clean-up that times out must be retried elsewhere, and until it is confirmed the acquire
///    may not answer as if nothing of it remained. The server has a fast and a held-back endpoint;
///    trials where the enqueue went to the fast one and the clean-up to the held-back one reach
///    the race (the old code answered 409 and left the key, which then held the lock).
#[tokio::test]
async fn lost_clean_up_is_retried_before_answering() -> Result<()> {
    let rig = Rig::start().await?;
    let leader = rig.etcd.leader().await?;
    let mixed = rig
        .server(&[rig.etcd.endpoint(leader), rig.slow_a.url()], ETCD_TIMEOUT)
        .await?;
    let (ok, via_mixed) = (rig.ok(), Api::new(mixed.url()));
    let mut reached = 0;
    for trial in 0..tries() * 4 {
        let lock = format!("cleanup-{trial}");
        let (_, x) = ok.acquire_ttl(&lock, "30s", "0s").await?;
        let lease = ok.grant("30s").await?;
        warm(&via_mixed).await?;
        rig.slow_a.set_delay(Duration::from_secs(4));
        let started = Instant::now();
        let (code, body) =
            acquire(&via_mixed, &lock, json!({"lease_id": lease, "wait": "0s"})).await?;
        let took = started.elapsed();
        ok.post(
            &format!("/v1/locks/{lock}/release"),
            json!({"token": x["token"]}),
        )
        .await?;
        let s = status(&ok, &lock).await?;
        rig.slow_a.set_delay(Duration::ZERO);
        if code == 409 && took >= Duration::from_millis(900) {
            reached += 1; // the enqueue answered, the clean-up timed out
        }
        if code == 409 {
            ensure!(
                s["holder"].is_null(),
                "trial {trial}: answered 409 ({body}) but its waiter key took the lock: {s}"
            );
        }
        tokio::time::sleep(Duration::from_secs(4)).await; // let held-back bytes land
        ok.delete(&format!("/v1/leases/{lease}")).await?;
        if reached >= tries() {
            break;
        }
    }
    eprintln!("lost_clean_up: {reached} trials reached the timed-out clean-up");
    let _ = rig.follower;
    Ok(())
}
