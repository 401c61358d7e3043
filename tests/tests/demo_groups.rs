//! The concert demo's groups of friends and queue positions (issue 16): some buyers come as a
//! group of 2-4 wanting adjacent seats in one row, taken with one all-or-nothing group lock and
//! sold in one ledger transaction; waiting buyers are shown their place in line.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::Result;
use concert::ledger::{ROW_SEATS, adjacent_in_a_row};
use concert::{Ledger, Options, Servers};
use leasehold_tests::{EtcdCluster, server_bin};

/// 80 seats (8 rows of 10), 160 buyers of whom about 30 % come as groups, waiting up to a second
/// in line and shown their place: no seat sold twice; every group that bought has exactly its
/// size in seats, side by side in one row (read back from the ledger here, not only from the
/// audit); no group seat was sold to anyone else; and buyers saw their place count down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_sit_together_and_waiting_buyers_see_their_place() -> Result<()> {
    leasehold_tests::init_logging();
    let etcd = EtcdCluster::start(1).await?;
    let dir = tempfile::tempdir()?;
    let ledger = dir.path().join("ledger.db");
    let options = Options::default()
        .with_seats(80, 10)
        .with_buyers(160)
        .with_servers(Servers::Spawn {
            count: 2,
            etcd_endpoints: etcd.endpoints(),
            bin: server_bin!(),
        })
        .with_seed(16)
        .with_groups(30)
        .with_show_queue(true)
        .with_wait(Duration::from_secs(1))
        .with_ledger(ledger.clone());
    let report = concert::run(options).await?;
    println!("{report}");
    assert_eq!(report.audit.double_sold, 0, "a seat was sold twice");
    assert_eq!(report.audit.owner_mismatches, 0);
    assert_eq!(report.audit.groups_split, 0, "a group was split");
    assert!(report.is_clean());
    assert!(report.groups >= 20, "{} groups came", report.groups);
    assert!(report.audit.groups_seated > 0, "no group got seats");

    let groups = Ledger::open(&ledger)?.groups()?;
    assert_eq!(groups.len() as u64, report.audit.groups_seated);
    let mut group_seats = BTreeSet::new();
    for (buyer, size, seats) in &groups {
        assert!((2..=4).contains(size), "{buyer}: size {size}");
        assert_eq!(seats.len(), *size as usize, "{buyer} got {seats:?}");
        assert!(adjacent_in_a_row(seats), "{buyer} got {seats:?}");
        assert_eq!(seats[0] / ROW_SEATS, seats[seats.len() - 1] / ROW_SEATS);
        group_seats.extend(seats.iter().copied());
    }
    // Each group seat's owner is its group (the audit's double-sold count covers the sales; the
    // seats table says who has it now).
    let ledger = Ledger::open(&ledger)?;
    for (buyer, _, seats) in &groups {
        for seat in seats {
            assert_eq!(ledger.owner(*seat)?.as_deref(), Some(buyer.as_str()));
        }
    }

    assert!(
        report.buyers_shown_place > 0,
        "nobody was shown a place in line: {report}"
    );
    assert!(
        report.buyers_saw_countdown > 0,
        "nobody saw their place count down: {report}"
    );
    Ok(())
}
