//! Waiting in line: longer than the TTL (the client keeps its lease alive meanwhile), and
//! longer than a server allows one request to wait (the client chains requests).

use std::time::Duration;

use anyhow::Result;
use leasehold::Client;
use leasehold_tests::{Api, EtcdCluster, ServerProcess, TestServer};
use tokio::time::Instant;

/// An acquire that waits for three TTLs (its lease kept alive by the client all along) is
/// granted when the holder releases.
#[tokio::test]
async fn waiting_longer_than_the_ttl_keeps_the_lease() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let server = TestServer::start(&etcd).await?;
    let (alice, bob) = (Client::new(server.url())?, Client::new(server.url())?);
    let ttl = Duration::from_secs(2);
    let held = alice.lock("long-wait").ttl(ttl).acquire().await?;
    let waiter = tokio::spawn(async move {
        bob.lock("long-wait")
            .ttl(ttl)
            .wait(Duration::from_secs(20))
            .acquire()
            .await
    });
    tokio::time::sleep(3 * ttl).await;
    held.release().await?;
    let granted = waiter.await??;
    assert!(granted.is_held());
    Ok(())
}

/// A wait longer than the server's `--max-wait` (2 s here) is chained from several requests
/// that keep one place in line: a waiter queued first, waiting without limit, is granted before
/// one queued after it, however many times both re-asked, and neither ever queues twice.
#[tokio::test]
async fn unlimited_waits_keep_their_place_in_line() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let server = ServerProcess::spawn(
        &leasehold_tests::server_bin!(),
        &etcd.endpoints(),
        &["--max-wait", "2s"],
    )
    .await?;
    let api = Api::new(server.url());
    let ttl = Duration::from_secs(2);
    let holder = Client::new(server.url())?;
    let held = holder.lock("line").ttl(ttl).acquire().await?;
    let waiter = |name: &'static str| {
        let client = Client::new(server.url()).expect("client");
        tokio::spawn(async move {
            let guard = client
                .lock("line")
                .ttl(ttl)
                .owner(name)
                .wait_forever()
                .acquire()
                .await?;
            let token = guard.token();
            guard.release().await?;
            anyhow::Ok((name, token, Instant::now()))
        })
    };
    let first = waiter("first");
    api.wait_for_waiters("line", 1).await?;
    let second = waiter("second");
    api.wait_for_waiters("line", 2).await?;
    // Three server waits long: both re-ask (chained) several times meanwhile.
    let queued = Instant::now();
    while queued.elapsed() < Duration::from_secs(6) {
        let (_, status) = api.get("/v1/locks/line").await?;
        assert_eq!(
            status["waiters"], 2,
            "a waiter left the line or queued twice: {status}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    held.release().await?;
    let (a, b) = (first.await??, second.await??);
    assert_eq!((a.0, b.0), ("first", "second"));
    assert!(a.1 < b.1, "tokens out of order: {a:?} {b:?}");
    assert!(a.2 <= b.2, "the second waiter was granted first");
    Ok(())
}
