//! A client waiting in line longer than its TTL keeps its lease alive meanwhile.

use std::time::Duration;

use anyhow::Result;
use leasehold::Client;
use leasehold_tests::{EtcdCluster, TestServer};

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
