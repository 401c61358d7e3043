//! The lean txn channel (`server/src/txn_channel.rs`) against a real etcd: the same answers as
//! etcd-client, answers larger than a flow-control window, TLS with client certificates, and a
//! connection that survives a stalled member and comes back after a killed one; and the server's
//! choice of channel (`--lean-etcd-channel`). Its refusals keep etcd-client's error shape:
//! `group_commit.rs` runs its "refused whole" cases over both channels.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use etcd_client::{GetOptions, Txn, TxnOp, TxnResponse};
use leasehold_server::EtcdSecurity;
use leasehold_server::txn_channel::{TxnChannel, client_tls};
use leasehold_tests::{Api, EtcdCluster, ServerProcess, TestPki, server_bin};
use serde_json::json;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

fn channel(etcd: &EtcdCluster) -> Arc<TxnChannel> {
    Arc::new(TxnChannel::new(&etcd.endpoint(0), CONNECT_TIMEOUT, None).expect("plain text"))
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

/// Through the server: lock txns take the lean channel by default (a connection to etcd of its
/// own, beside etcd-client's, which carries the watch and the leases), and
/// `--lean-etcd-channel=false` keeps them on etcd-client's.
#[tokio::test]
async fn the_server_sends_lock_txns_over_the_lean_channel_unless_told_not_to() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let etcd_port: u16 = etcd
        .endpoint(0)
        .rsplit(':')
        .next()
        .context("port")?
        .parse()?;
    for (args, connections) in [(&[][..], 2), (&["--lean-etcd-channel=false"][..], 1)] {
        let server = ServerProcess::spawn(&server_bin!(), &etcd.endpoints(), args).await?;
        let api = Api::new(server.url());
        let lease = api.grant("30s").await?;
        let (status, grant) = api
            .post("/v1/locks/lean/acquire", json!({"lease_id": lease}))
            .await?;
        assert_eq!(status, 200, "{args:?}: {grant}");
        let (status, released) = api
            .post("/v1/locks/lean/release", json!({"token": grant["token"]}))
            .await?;
        assert_eq!(status, 200, "{args:?}: {released}");
        let pid = server.pid().context("server pid")?;
        assert_eq!(
            connections_to(pid, etcd_port)?,
            connections,
            "{args:?}: the server's connections to etcd"
        );
    }
    Ok(())
}

/// Established TCP connections of process `pid` to local port `port` (from `/proc`).
fn connections_to(pid: u32, port: u16) -> Result<usize> {
    let mut sockets = std::collections::HashSet::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let target = std::fs::read_link(fd?.path()).unwrap_or_default();
        if let Some(inode) = target
            .to_str()
            .and_then(|t| t.strip_prefix("socket:["))
            .and_then(|t| t.strip_suffix(']'))
        {
            sockets.insert(inode.to_owned());
        }
    }
    let mut count = 0;
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}"))?;
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(remote), Some(state), Some(inode)) =
                (fields.get(2), fields.get(3), fields.get(9))
            else {
                continue;
            };
            let remote_port = remote
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            if *state == "01" && remote_port == Some(port) && sockets.contains(*inode) {
                count += 1;
            }
        }
    }
    Ok(count)
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
            TxnChannel::new(endpoint, CONNECT_TIMEOUT, None).is_none(),
            "{endpoint}"
        );
    }
    assert!(TxnChannel::new("http://127.0.0.1:2379", CONNECT_TIMEOUT, None).is_some());
}

fn revision(answer: &TxnResponse) -> i64 {
    answer.header().map(|h| h.revision()).unwrap_or_default()
}
