//! End-to-end tests of the `leasehold` client library's locks and leases, against real etcd and
//! real servers.

use std::time::Duration;

use anyhow::{Context, Result};
use leasehold::{Client, Error, LostReason};
use leasehold_tests::delay::DelayProxy;
use leasehold_tests::{Api, EtcdCluster, ServerProcess, TestServer};
use tokio::time::Instant;

const TTL: Duration = Duration::from_secs(2);

/// A guard renews itself past several TTLs, reports its token, and frees the lock on release;
/// a dropped guard frees it too, so another client then acquires quickly.
#[tokio::test]
async fn guard_renews_releases_and_frees_on_drop() -> Result<()> {
    leasehold_tests::init_logging();
    let etcd = EtcdCluster::start(1).await?;
    let server = TestServer::start(&etcd).await?;
    let (alice, bob) = (Client::new(server.url())?, Client::new(server.url())?);

    let guard = alice
        .lock("jobs/nightly")
        .ttl(TTL)
        .owner("alice")
        .acquire()
        .await?;
    assert!(guard.is_held());
    assert_eq!(guard.name(), "jobs/nightly");
    assert_eq!(guard.owner(), Some("alice"));
    assert_eq!(guard.ttl(), TTL);
    let first = guard.token();

    // Three TTLs later it is still held, by the same token, thanks to background renewal.
    tokio::time::sleep(3 * TTL).await;
    assert!(guard.is_held());
    let status = bob.status("jobs/nightly").await?;
    let holder = status.holder.context("a holder")?;
    assert_eq!(
        (holder.token, holder.owner.as_deref()),
        (first, Some("alice"))
    );
    assert_eq!(holder.lease_id.as_ref(), Some(guard.lease_id()));
    match bob.lock("jobs/nightly").try_acquire().await {
        Err(Error::LockHeld { holder: Some(h) }) => assert_eq!(h.token, first),
        other => panic!("expected lock_held, got {other:?}"),
    }

    let first_lease = guard.lease_id().clone();
    guard.release().await?;
    let second = bob.lock("jobs/nightly").ttl(TTL).try_acquire().await?;
    assert!(second.token() > first);
    // Releasing also revoked the lease the acquire granted for it: nothing is left behind.
    assert!(matches!(
        alice.lease_info(&first_lease).await,
        Err(Error::LeaseNotFound)
    ));

    // Dropping frees it in the background: a waiter gets it long before the TTL.
    let second_token = second.token();
    let started = Instant::now();
    let waiter = tokio::spawn({
        let alice = alice.clone();
        async move {
            alice
                .lock("jobs/nightly")
                .ttl(TTL)
                .wait(Duration::from_secs(10))
                .acquire()
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(second);
    let third = waiter.await??;
    assert!(third.token() > second_token);
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "drop did not free the lock promptly: {:?}",
        started.elapsed()
    );
    third.release().await?;
    assert_eq!(bob.status("jobs/nightly").await?.holder, None);
    Ok(())
}

/// Revoking the guard's lease out of band makes `lost()` resolve and `is_held()` turn false
/// within the TTL (the next renewal hears `not_holder`).
#[tokio::test]
async fn revoked_lease_is_noticed_within_the_ttl() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let server = TestServer::start(&etcd).await?;
    let client = Client::new(server.url())?;
    let guard = client.lock("revoked").ttl(TTL).acquire().await?;
    let revoked_at = Instant::now();
    Api::remember_handle(guard.lease_id().as_str(), guard.handle().reveal());
    let (status, _) = Api::new(server.url())
        .delete(&format!("/v1/leases/{}", guard.lease_id()))
        .await?;
    assert_eq!(status, 204);
    let reason = tokio::time::timeout(TTL, guard.lost())
        .await
        .context("lost() did not resolve within the TTL")?;
    assert!(
        matches!(reason, LostReason::NotHolder | LostReason::LeaseNotFound),
        "{reason:?}"
    );
    assert!(!guard.is_held());
    assert!(revoked_at.elapsed() < TTL);
    assert!(matches!(guard.release().await, Err(Error::NotHolder)));
    Ok(())
}

/// When renewals stop getting through (the only server the holder knows is killed), the
/// client-side timer ends the hold before the lease expires in etcd, so `lost()` resolves before
/// a waiter on another server is granted the lock.
#[tokio::test]
async fn client_timer_fires_before_anyone_else_is_granted() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let mut lonely =
        ServerProcess::spawn(&leasehold_tests::server_bin!(), &etcd.endpoints(), &[]).await?;
    let other = TestServer::start(&etcd).await?;
    let holder = Client::new(lonely.url())?;
    let waiter = Client::new(other.url())?;

    let guard = holder.lock("timer").ttl(TTL).acquire().await?;
    tokio::time::sleep(Duration::from_millis(800)).await; // at least one renewal went through
    lonely.kill().await?;
    let killed_at = Instant::now();
    let waiting = tokio::spawn(async move {
        let guard = waiter
            .lock("timer")
            .ttl(TTL)
            .wait(Duration::from_secs(10))
            .acquire()
            .await;
        (guard, Instant::now())
    });
    let reason = tokio::time::timeout(TTL, guard.lost())
        .await
        .context("lost() did not resolve within the TTL")?;
    let lost_at = Instant::now();
    assert_eq!(reason, LostReason::Expired);
    assert!(!guard.is_held());
    let (next, granted_at) = waiting.await?;
    let next = next?;
    assert!(next.token() > guard.token());
    assert!(
        lost_at < granted_at,
        "the old holder learnt of its loss {:?} after the new holder was granted",
        lost_at - granted_at
    );
    assert!(lost_at - killed_at < TTL);
    Ok(())
}

/// Several locks share one lease: it is kept alive in the background past several TTLs, and
/// dropping it frees every lock under it and ends their guards.
#[tokio::test]
async fn shared_lease_holds_several_locks_and_drop_frees_them() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let server = TestServer::start(&etcd).await?;
    let client = Client::new(server.url())?;
    let lease = client.grant_lease(TTL).await?;
    let a = client.lock("shared/a").lease(&lease).acquire().await?;
    let b = client.lock("shared/b").lease(&lease).acquire().await?;
    assert_eq!(a.lease_id(), lease.id());
    tokio::time::sleep(3 * TTL).await;
    assert!(lease.is_alive() && a.is_held() && b.is_held());
    let mut locks = lease.info().await?.locks;
    locks.sort();
    assert_eq!(locks, ["shared/a", "shared/b"]);

    // A lock with both a ttl and a lease is refused before anything is sent.
    assert!(matches!(
        client
            .lock("shared/c")
            .lease(&lease)
            .ttl(TTL)
            .acquire()
            .await,
        Err(Error::InvalidInput { .. })
    ));

    drop(lease);
    tokio::time::timeout(TTL, a.lost()).await?;
    assert!(!b.is_held());
    let other = Client::new(server.url())?;
    let again = other
        .lock("shared/b")
        .ttl(TTL)
        .wait(Duration::from_secs(3))
        .acquire()
        .await?;
    assert!(again.token() > b.token());
    Ok(())
}

/// A detached guard neither renews nor releases: the lock stays held (and renewable by hand
/// with its token) until its lease runs out, then a waiter gets it with a larger token.
#[tokio::test]
async fn detached_guard_holds_until_its_lease_expires() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let server = TestServer::start(&etcd).await?;
    let (alice, bob) = (Client::new(server.url())?, Client::new(server.url())?);
    let guard = alice.lock("detached").ttl(TTL).acquire().await?;
    let (name, token, handle) = guard.detach();
    assert_eq!(name, "detached");
    assert_eq!(
        bob.status("detached").await?.holder.context("held")?.token,
        token
    );
    alice.renew("detached", token, &handle).await?;

    let renewed_at = Instant::now();
    let next = bob
        .lock("detached")
        .ttl(TTL)
        .wait(Duration::from_secs(10))
        .acquire()
        .await?;
    let waited = renewed_at.elapsed();
    assert!(
        waited >= TTL - Duration::from_millis(500),
        "freed after {waited:?}, before the TTL"
    );
    assert!(next.token() > token);
    assert!(matches!(
        alice.renew("detached", token, &handle).await,
        Err(Error::NotHolder)
    ));
    Ok(())
}

/// One guard per lock and lease: a second acquire of a lock this lease holds is refused with
/// `AlreadyHeld` (the server would hand back the same hold, and releasing either guard would end
/// both). After a guard is dropped, a new acquire under the lease waits for the drop's release,
/// so that release cannot end the new hold.
#[tokio::test]
async fn one_guard_per_lock_and_lease() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let server = TestServer::start(&etcd).await?;
    let client = Client::new(server.url())?;
    let lease = client.grant_lease(TTL).await?;
    let first = client.lock("once").lease(&lease).acquire().await?;
    match client.lock("once").lease(&lease).acquire().await {
        Err(Error::AlreadyHeld { name }) => assert_eq!(name, "once"),
        other => panic!("expected AlreadyHeld, got {other:?}"),
    }
    assert!(first.is_held(), "the refused acquire ended the first guard");
    // Another lease is another holder: ordinary contention.
    assert!(matches!(
        client.lock("once").ttl(TTL).try_acquire().await,
        Err(Error::LockHeld { .. })
    ));

    drop(first);
    let second = client.lock("once").lease(&lease).acquire().await?;
    // Past the dropped guard's background release: the new hold stands, renewals confirm it.
    tokio::time::sleep(TTL).await;
    assert!(second.is_held());
    client
        .renew("once", second.token(), second.handle())
        .await
        .context("the new hold was ended by the old guard's release")?;
    assert_eq!(
        client.status("once").await?.holder.context("held")?.token,
        second.token()
    );
    second.release().await?;
    assert_eq!(client.status("once").await?.holder, None);
    Ok(())
}

/// An acquire under a shared lease that is cancelled after the server granted it (the answer is
/// held back by a proxy until the caller gave up) does not leave a hold nobody owns: the client
/// releases it in the background, while the lease lives on. A new acquire of the lock under the
/// same lease then works.
#[tokio::test]
async fn cancelled_acquire_under_a_shared_lease_releases_its_grant() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let server = TestServer::start(&etcd).await?;
    let proxy = DelayProxy::start(&server.url()).await?;
    let client = Client::new(proxy.url())?;
    let lease = client.grant_lease(Duration::from_secs(10)).await?;
    proxy.set_answer_delay(Duration::from_millis(1500));
    let cancelled = tokio::time::timeout(
        Duration::from_millis(500),
        client.lock("abandoned").lease(&lease).try_acquire(),
    )
    .await;
    assert!(cancelled.is_err(), "the acquire was meant to be cut off");
    // The clean-up's own answers are still held back here, so it cannot be over yet.
    let api = Api::new(server.url());
    let (_, status) = api.get("/v1/locks/abandoned").await?;
    assert_eq!(
        status["holder"]["lease_id"],
        serde_json::json!(lease.id()),
        "the server granted the cancelled acquire: {status}"
    );
    proxy.set_answer_delay(Duration::ZERO);
    api.wait_for_lock("abandoned", |s| s["holder"].is_null())
        .await
        .context("the grant of the cancelled acquire was never released")?;
    assert!(lease.is_alive());
    let again = client.lock("abandoned").lease(&lease).try_acquire().await?;
    assert!(again.is_held());
    again.release().await?;
    Ok(())
}
