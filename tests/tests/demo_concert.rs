//! The concert demo, small, with chaos: the audit must find no seat sold twice, and the ledger
//! must have rejected the stalled buyers' late writes.

use std::time::Duration;

use anyhow::Result;
use concert::{Options, Servers};
use leasehold_tests::{EtcdCluster, server_bin};

/// 50 seats, 200 buyers, two replicas (one killed mid-run), stalled buyers: 0 double sales,
/// every sold seat has exactly one owner, and at least one stale write was rejected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_run_sells_no_seat_twice() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let dir = tempfile::tempdir()?;
    let options = Options::default()
        .with_seats(50, 10)
        .with_buyers(200)
        .with_servers(Servers::Spawn {
            count: 2,
            etcd_endpoints: etcd.endpoints(),
            bin: server_bin!(),
        })
        .with_chaos(true)
        .with_seed(7)
        .with_ttls(Duration::from_secs(10), Duration::from_secs(2))
        .with_ledger(dir.path().join("ledger.db"));
    let report = concert::run(options).await?;
    println!("{report}");

    assert_eq!(report.audit.double_sold, 0, "a seat was sold twice");
    assert_eq!(report.audit.owner_mismatches, 0);
    assert!(report.is_clean());
    assert_eq!(
        report.audit.seats_sold, 50,
        "a sold-out concert sells every seat"
    );
    assert!(
        report.audit.stale_writes_rejected >= 1,
        "no stale write was rejected"
    );
    assert!(
        report
            .chaos_events
            .iter()
            .any(|e| e.starts_with("killed server replica")),
        "{:?}",
        report.chaos_events
    );
    assert!(report.chaos_events.iter().any(|e| e.contains("REJECTED")));
    assert_eq!(report.buyers_served + report.buyers_turned_away, 200);

    // The audit is independent of the run's counters: reading the ledger again agrees.
    let audit = concert::Ledger::open(&dir.path().join("ledger.db"))?.audit()?;
    assert_eq!(audit, report.audit);
    Ok(())
}

/// Without chaos, the same seed makes the same choices: the audit is clean and every seat sells.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calm_run_sells_out_cleanly() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let options = Options::default()
        .with_seats(30, 5)
        .with_buyers(60)
        .with_servers(Servers::Spawn {
            count: 2,
            etcd_endpoints: etcd.endpoints(),
            bin: server_bin!(),
        });
    let report = concert::run(options).await?;
    assert!(report.is_clean(), "{report}");
    assert_eq!(report.audit.seats_sold, 30);
    assert_eq!(
        report.audit.stale_writes_rejected, 0,
        "nobody stalled, nothing stale"
    );
    assert!(report.chaos_events.is_empty());
    Ok(())
}
