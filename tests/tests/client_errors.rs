//! Live checks that server errors surface as the matching `leasehold::Error` variants (the full
//! code-to-variant mapping is unit-tested in the client crate).

use std::time::Duration;

use anyhow::Result;
use leasehold::{Client, Error, FencingToken, Handle, LeaseId, RetryPolicy};
use leasehold_tests::{EtcdCluster, TestServer, free_port};

/// `invalid_name`, `invalid_ttl`, `lock_held` (with its holder), `not_holder`,
/// `lease_not_found`, `store_unavailable` and a dead endpoint each give their variant.
#[tokio::test]
async fn server_errors_map_to_variants() -> Result<()> {
    let mut etcd = EtcdCluster::start(1).await?;
    let config = leasehold_server::Config::default()
        .with_etcd_endpoints(etcd.endpoints())
        .with_etcd_timeout(Duration::from_millis(500));
    let server = TestServer::start_with(config).await?;
    let client = Client::builder()
        .endpoint(server.url())
        .retry_policy(RetryPolicy::once_per_endpoint())
        .build()?;

    let long = "x".repeat(300);
    assert!(matches!(
        client.lock(long.as_str()).try_acquire().await,
        Err(Error::InvalidInput { code, .. }) if code == "invalid_name"
    ));
    assert!(matches!(
        client.grant_lease(Duration::from_secs(100_000)).await,
        Err(Error::InvalidInput { code, .. }) if code == "invalid_ttl"
    ));
    let held = client.lock("held").owner("alice").try_acquire().await?;
    match client.lock("held").try_acquire().await {
        Err(Error::LockHeld { holder: Some(h) }) => {
            assert_eq!((h.token, h.owner.as_deref()), (held.token(), Some("alice")))
        }
        other => panic!("expected lock_held, got {other:?}"),
    }
    assert!(matches!(
        client
            .release("held", FencingToken::new(1), held.handle())
            .await,
        Err(Error::NotHolder)
    ));
    // Someone else's handle (or a guessed one) is refused, and changes nothing.
    assert!(matches!(
        client
            .release("held", held.token(), &Handle::generate())
            .await,
        Err(Error::Forbidden { .. })
    ));
    let gone = client.grant_lease(Duration::from_secs(5)).await?;
    let (id, handle) = (gone.id().clone(), gone.handle().clone());
    gone.revoke().await?;
    assert!(matches!(
        client.keep_lease_alive(&id, &handle).await,
        Err(Error::LeaseNotFound)
    ));
    assert!(matches!(
        client
            .keep_lease_alive(&LeaseId::new("00000000000000ff"), &handle)
            .await,
        Err(Error::Forbidden { .. })
    ));
    assert!(matches!(
        client
            .keep_lease_alive(&LeaseId::new("../../healthz"), &handle)
            .await,
        Err(Error::InvalidInput { .. })
    ));

    let dead = Client::new(format!("http://127.0.0.1:{}", free_port()?))?;
    let err = dead.status("held").await.unwrap_err();
    assert!(matches!(err, Error::Transport { .. }), "{err:?}");
    assert!(std::error::Error::source(&err).is_some());

    etcd.kill(0).await?;
    let err = client.status("held").await.unwrap_err();
    assert!(
        matches!(&err, Error::Unavailable { code, .. } if code == "store_unavailable"),
        "{err:?}"
    );
    assert!(err.is_retryable());
    Ok(())
}
