//! The lean txn channel (`server/src/txn_channel.rs`) against a real etcd: the same answers as
//! etcd-client, answers larger than a flow-control window, TLS with client certificates, and a
//! connection that survives a stalled member and comes back after a killed one. (Its refusals keep etcd-client's error
//! shape: `group_commit.rs` runs its "refused whole" cases over both channels.)

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use etcd_client::{GetOptions, Txn, TxnOp, TxnResponse};
use leasehold_server::EtcdSecurity;
use leasehold_server::txn_channel::{TxnChannel, client_tls};
use leasehold_tests::{EtcdCluster, TestPki};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

fn channel(etcd: &EtcdCluster) -> Arc<TxnChannel> {
    Arc::new(TxnChannel::for_endpoint(&etcd.endpoint(0), CONNECT_TIMEOUT).expect("plain text"))
}

fn read_all(prefix: &str) -> Txn {
    Txn::new().and_then([TxnOp::get(prefix, Some(GetOptions::new().with_prefix()))])
}

#[tokio::test]
async fn answers_as_etcd_client_does_even_past_a_flow_control_window() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let mut client = etcd.client().await?;
    let lean = channel(&etcd);

    // A write, then the same read both ways: identical answers, header included.
    let put = Txn::new().and_then([TxnOp::put("k/written", "by the lean channel", None)]);
    let written = lean.txn(put).await?;
    assert!(written.succeeded());
    let (ours, theirs) = (
        lean.txn(read_all("k/")).await?,
        client.txn(read_all("k/")).await?,
    );
    assert_eq!(ours.0, theirs.0);
    assert_eq!(
        ours.0.header.as_ref().map(|h| h.revision),
        Some(revision(&written))
    );

    // 3 MiB in one answer, three times the channel's stream window: read whole.
    let value = vec![b'x'; 8 * 1024];
    for i in 0..384 {
        client
            .put(format!("big/{i:04}"), value.clone(), None)
            .await?;
    }
    let ours = tokio::time::timeout(Duration::from_secs(10), lean.txn(read_all("big/")))
        .await
        .context("a large answer stalled")??;
    let theirs = client.txn(read_all("big/")).await?;
    assert_eq!(ours.0, theirs.0);
    Ok(())
}

#[tokio::test]
async fn waits_out_a_stalled_member_and_reconnects_after_a_killed_one() -> Result<()> {
    let mut etcd = EtcdCluster::start(1).await?;
    let lean = channel(&etcd);
    let put = |value: &str| Txn::new().and_then([TxnOp::put("k", value, None)]);
    lean.txn(put("first")).await?;

    // Stalled (SIGSTOP): the call gets no answer, and the caller's bound ends it.
    etcd.pause(0)?;
    let stalled = tokio::time::timeout(Duration::from_millis(500), lean.txn(put("stalled"))).await;
    assert!(stalled.is_err(), "a stalled member answered: {stalled:?}");
    etcd.resume(0)?;
    // The same connection answers again once the member continues.
    tokio::time::timeout(Duration::from_secs(10), lean.txn(put("resumed")))
        .await
        .context("no answer after the member continued")??;

    // Killed: an error at once, never a hang; after the restart, a new connection.
    etcd.kill(0).await?;
    let refused = tokio::time::timeout(Duration::from_secs(5), lean.txn(put("killed")))
        .await
        .context("a call to a killed member hung")?;
    assert!(refused.is_err(), "a killed member answered: {refused:?}");
    etcd.restart(0)?;
    etcd.wait_ready(Duration::from_secs(20)).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match lean.txn(put("restarted")).await {
            Ok(answer) => {
                assert!(answer.succeeded());
                break;
            }
            Err(err) if tokio::time::Instant::now() < deadline => {
                tracing::debug!(error = %err, "not yet");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(err) => return Err(err).context("no answer after the restart"),
        }
    }
    let mut client = etcd.client().await?;
    let now = client.get("k", None).await?;
    assert_eq!(now.kvs()[0].value(), b"restarted");
    Ok(())
}

#[tokio::test]
async fn speaks_tls_to_an_etcd_that_checks_client_certificates() -> Result<()> {
    let pki = TestPki::generate()?;
    let etcd = EtcdCluster::start_secure(1, &pki).await?;
    let endpoint = etcd.endpoint(0);
    assert!(endpoint.starts_with("https://"), "{endpoint}");
    let security = |ca: &std::path::Path, with_certificate: bool| {
        let mut security = EtcdSecurity::default();
        security.ca_file = Some(ca.to_owned());
        security.client_cert =
            with_certificate.then(|| (pki.client_cert.clone(), pki.client_key.clone()));
        security
    };
    let channel = |security: EtcdSecurity| -> Result<TxnChannel> {
        let tls = client_tls(&security).map_err(anyhow::Error::msg)?;
        TxnChannel::new(&endpoint, CONNECT_TIMEOUT, tls).context("https with a CA is served")
    };
    let put = || Txn::new().and_then([TxnOp::put("k", "v", None)]);

    let answer = channel(security(&pki.ca, true))?.txn(put()).await?;
    assert!(answer.succeeded());
    // Without the client certificate etcd refuses the connection...
    let refused = channel(security(&pki.ca, false))?.txn(put()).await;
    assert!(refused.is_err(), "{refused:?}");
    // ...and a certificate from another CA is not etcd's.
    let stranger = TestPki::generate()?;
    let refused = channel(security(&stranger.ca, true))?.txn(put()).await;
    assert!(refused.is_err(), "{refused:?}");
    // Without a CA the lean channel leaves https to etcd-client.
    assert!(TxnChannel::new(&endpoint, CONNECT_TIMEOUT, None).is_none());
    Ok(())
}

#[test]
fn serves_http_endpoints_alone_unless_given_tls() {
    for endpoint in ["https://127.0.0.1:2379", "127.0.0.1:2379", "not a uri"] {
        assert!(
            TxnChannel::for_endpoint(endpoint, CONNECT_TIMEOUT).is_none(),
            "{endpoint}"
        );
    }
    assert!(TxnChannel::for_endpoint("http://127.0.0.1:2379", CONNECT_TIMEOUT).is_some());
}

fn revision(answer: &TxnResponse) -> i64 {
    answer.header().map(|h| h.revision()).unwrap_or_default()
}
