//! Group commit (`server/src/batch.rs`): lock txns about different locks go to etcd as one
//! request, each with its own answer; txns about one lock never share one.
//! (Its own test binary: it reads the process-wide metrics recorder.)

use std::collections::HashSet;
use std::time::Duration;

use anyhow::Result;
use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp, TxnOpResponse, TxnResponse};
use leasehold_server::StoreError;
use leasehold_server::batch::commit;
use leasehold_server::txn_channel::{TxnChannel, TxnRoute};
use leasehold_tests::{Api, EtcdCluster, TestServer, revision};
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(5);

/// Held by every test here: the metrics recorder is process-wide, and a batch another test formed
/// meanwhile (`commit` counts its batches too) must not count as the server's.
static METRICS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Creates `key` if it does not exist, reading it back either way.
fn create(key: &str, lease: Option<i64>) -> Txn {
    let options = lease.map(|id| PutOptions::new().with_lease(id));
    Txn::new()
        .when([Compare::create_revision(key, CompareOp::Equal, 0)])
        .and_then([TxnOp::put(key, "v", options), TxnOp::get(key, None)])
        .or_else([TxnOp::get(key, None)])
}

/// Both ways a txn reaches etcd: the lean channel and etcd-client.
async fn routes(etcd: &EtcdCluster) -> Result<[(&'static str, TxnRoute); 2]> {
    let lean = TxnChannel::new(&etcd.endpoint(0), TIMEOUT, None).expect("plain text");
    Ok([
        ("lean channel", TxnRoute::Lean(std::sync::Arc::new(lean))),
        (
            "etcd-client",
            TxnRoute::Client(Box::new(etcd.client().await?)),
        ),
    ])
}

fn created_at(answer: &TxnResponse) -> i64 {
    match answer.op_responses().last() {
        Some(TxnOpResponse::Get(get)) => get.kvs()[0].create_revision(),
        other => panic!("no read in {other:?}"),
    }
}

#[tokio::test]
async fn txns_about_different_locks_commit_as_one_request_with_their_own_answers() -> Result<()> {
    let _metrics = METRICS.lock().await;
    let etcd = EtcdCluster::start(1).await?;
    let mut client = etcd.client().await?;
    for (route_name, route) in routes(&etcd).await? {
        let key = |name: &str| format!("{route_name}/{name}");
        client.put(key("taken"), "x", None).await?;
        let before = revision(&mut client).await?;

        let answers = commit(
            &route,
            vec![
                create(&key("a"), None),
                create(&key("taken"), None),
                create(&key("b"), None),
            ],
            TIMEOUT,
        )
        .await;
        let answers: Vec<TxnResponse> = answers.into_iter().collect::<Result<_, _>>()?;

        // Each txn took its own branch...
        let taken: Vec<bool> = answers.iter().map(TxnResponse::succeeded).collect();
        assert_eq!(taken, [true, false, true], "{route_name}");
        // ...in one request: one revision for both writes, which every answer's header carries.
        assert_eq!(revision(&mut client).await?, before + 1, "{route_name}");
        for answer in &answers {
            assert_eq!(answer.header().map(|h| h.revision()), Some(before + 1));
        }
        assert_eq!(created_at(&answers[0]), before + 1);
        assert_eq!(created_at(&answers[2]), before + 1);
        assert_eq!(created_at(&answers[1]), before);
    }
    Ok(())
}

#[tokio::test]
async fn a_batch_etcd_refuses_whole_is_run_txn_by_txn() -> Result<()> {
    let _metrics = METRICS.lock().await;
    let etcd = EtcdCluster::start(1).await?;
    let mut client = etcd.client().await?;
    for (route_name, route) in routes(&etcd).await? {
        let key = |name: &str| format!("{route_name}/{name}");
        // A put on a lease that does not exist makes etcd refuse the whole request, applying
        // nothing: the other txns must not share that refusal.
        let before = revision(&mut client).await?;
        let answers = commit(
            &route,
            vec![
                create(&key("a"), None),
                create(&key("orphan"), Some(0x7eed)),
                create(&key("b"), None),
            ],
            TIMEOUT,
        )
        .await;
        assert!(
            matches!(answers[1], Err(StoreError::LeaseNotFound)),
            "{:?}",
            answers[1]
        );
        for answer in [&answers[0], &answers[2]] {
            assert!(
                answer.as_ref().is_ok_and(TxnResponse::succeeded),
                "{answer:?}"
            );
        }
        assert_eq!(
            revision(&mut client).await?,
            before + 2,
            "two requests of their own"
        );
        assert!(client.get(key("orphan"), None).await?.kvs().is_empty());

        // So is one that etcd finds malformed as a whole (`InvalidArgument`): the same key put by
        // two of its txns, which group commit never sends but must survive.
        let before = revision(&mut client).await?;
        let answers = commit(
            &route,
            vec![create(&key("c"), None), create(&key("c"), None)],
            TIMEOUT,
        )
        .await;
        let taken: Vec<bool> = answers
            .into_iter()
            .map(|answer| answer.map(|a| a.succeeded()))
            .collect::<Result<_, _>>()?;
        assert_eq!(taken.iter().filter(|&&t| t).count(), 1, "{taken:?}");
        assert_eq!(revision(&mut client).await?, before + 1);
    }
    Ok(())
}

/// Through the server: many acquires at once, on one semaphore and on names of their own, form
/// batches, and no two holders of the semaphore ever get one token (two of its waiter keys in
/// one batch would share a revision).
#[tokio::test]
async fn acquires_of_one_lock_never_share_a_batch() -> Result<()> {
    let _metrics = METRICS.lock().await;
    let etcd = EtcdCluster::start(1).await?;
    let mut config = leasehold_server::Config::default().with_etcd_endpoints(etcd.endpoints());
    config.group_commit = true;
    let server = TestServer::start_with(config).await?;
    let api = Api::new(server.url());
    let batches_before = api.metric("leasehold_etcd_batches_total").await?;

    const TASKS: usize = 24;
    let mut leases = Vec::new();
    for _ in 0..2 * TASKS {
        leases.push(api.grant("30s").await?);
    }
    for round in 0..10 {
        let acquires = leases.iter().enumerate().map(|(i, lease)| {
            let api = api.clone();
            let (name, body) = if i % 2 == 0 {
                ("pool".to_owned(), json!({"lease_id": lease, "limit": 1000}))
            } else {
                (format!("own-{round}-{i}"), json!({"lease_id": lease}))
            };
            async move {
                let (status, body) = api.post(&format!("/v1/locks/{name}/acquire"), body).await?;
                anyhow::ensure!(status == 200, "{name}: {status} {body}");
                let token = body["token"].as_u64().expect("a token");
                let (status, body) = api
                    .post(
                        &format!("/v1/locks/{name}/release"),
                        json!({"token": token}),
                    )
                    .await?;
                anyhow::ensure!(status == 200, "{name} release: {status} {body}");
                Ok::<_, anyhow::Error>((name, token))
            }
        });
        let held = futures::future::try_join_all(acquires).await?;
        let pool: Vec<u64> = held
            .iter()
            .filter(|(name, _)| name == "pool")
            .map(|&(_, token)| token)
            .collect();
        let distinct: HashSet<u64> = pool.iter().copied().collect();
        assert_eq!(distinct.len(), pool.len(), "round {round}: tokens {pool:?}");
    }
    let batches = api.metric("leasehold_etcd_batches_total").await? - batches_before;
    assert!(batches > 0.0, "no batch formed: the test proves nothing");
    Ok(())
}
