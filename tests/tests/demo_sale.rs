//! The concert demo as a flash sale (issue 17): the same sale with the same seed at 1x and at 5x
//! the buyers, all arriving at once. The servers shed what they cannot take; every buyer's
//! client shares one retry budget and honours `Retry-After` with jitter for as long as its
//! patience lasts. Every seat must sell, none twice, in either run; the goodput ratio is printed
//! (docs/performance.md has measured release figures).

use std::time::Duration;

use anyhow::Result;
use concert::{Options, Servers};
use leasehold_tests::{EtcdCluster, server_bin};

/// 200 seats; 150 buyers, then 750, on two replicas, the buyers connecting only as the doors
/// open (`--cold-start`, the crowd's handshakes inside the sale). Both runs: every seat sold once, and
/// no seat left unsold while a buyer was turned away by overload; every buyer who went home
/// empty-handed has a reason. The goodput ratio (5x over 1x, seats sold per second to the last
/// sale) is printed, never asserted: issue 17 asks for it printed by the benchmark, not asserted
/// as a time in a test, and here the servers and the crowd are debug builds sharing two cores
/// with etcd. The release figures are in docs/performance.md.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flash_sale_sells_every_seat_once_at_five_times_the_buyers() -> Result<()> {
    leasehold_tests::init_logging();
    let etcd = EtcdCluster::start(1).await?;
    let options = Options::default()
        .with_seats(200, 20)
        .with_buyers(150)
        .with_servers(Servers::Spawn {
            count: 2,
            etcd_endpoints: etcd.endpoints(),
            bin: server_bin!(),
        })
        .with_seed(17)
        .with_patience(Duration::from_secs(10))
        .with_cold_start(true);
    let comparison = concert::compare(options).await?;
    println!("{comparison}");
    let (single, fivefold) = (&comparison.single, &comparison.fivefold);
    assert_eq!((single.buyers, fivefold.buyers), (150, 750));
    for report in [single, fivefold] {
        assert_eq!(
            report.audit.double_sold, 0,
            "a seat was sold twice: {report}"
        );
        assert!(report.is_clean(), "{report}");
        assert_eq!(report.audit.seats_sold, 200, "{report}");
        assert_eq!(
            report.unsold_while_turned_away, 0,
            "a buyer was turned away while seats stayed unsold: {report}"
        );
        assert_eq!(
            report.buyers_served + report.buyers_turned_away,
            report.buyers
        );
        assert_eq!(
            report.turned_away_shed + report.turned_away_sold_out,
            report.buyers_turned_away,
            "every buyer who went home empty-handed has a reason: {report}"
        );
        assert!(report.seats_per_second > 0.0 && report.grants_per_second > 0.0);
        assert_eq!(
            report.connect_time, None,
            "a cold start connects no one early"
        );
    }
    Ok(())
}

/// The same sale through servers with a waiting room (`--max-sessions 30` each, as
/// `scripts/cluster` runs 150): buyers wait in line for a place, costing etcd nothing, and
/// the invariants hold as without one: every seat sells once, none stays unsold while a buyer
/// was turned away. The rooms must really have been full (some grant waited). The buyers
/// connect before the doors open (the default): every one asked a server's `/healthz` first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flash_sale_through_a_waiting_room_sells_every_seat_once() -> Result<()> {
    leasehold_tests::init_logging();
    let etcd = EtcdCluster::start(1).await?;
    let mut replicas = Vec::new();
    for _ in 0..2 {
        replicas.push(
            leasehold_tests::ServerProcess::spawn(
                &server_bin!(),
                &etcd.endpoints(),
                &["--max-sessions", "30"],
            )
            .await?,
        );
    }
    let urls: Vec<String> = replicas.iter().map(|r| r.url()).collect();
    let options = Options::default()
        .with_seats(200, 20)
        .with_buyers(150)
        .with_servers(Servers::Existing(urls.clone()))
        .with_seed(17)
        .with_patience(Duration::from_secs(20));
    let comparison = concert::compare(options).await?;
    println!("{comparison}");
    for report in [&comparison.single, &comparison.fivefold] {
        assert!(report.connect_time.is_some(), "{report}");
        assert!(report.is_clean(), "{report}");
        assert_eq!(report.audit.seats_sold, 200, "{report}");
        assert_eq!(
            report.unsold_while_turned_away, 0,
            "a buyer was turned away while seats stayed unsold: {report}"
        );
    }
    let (mut waited, mut health_checks) = (0.0, 0.0);
    for url in &urls {
        let api = leasehold_tests::Api::new(url.clone());
        waited += api.metric("leasehold_session_waits_total").await?;
        health_checks += api
            .metric_where("leasehold_http_requests_total", r#"route="/healthz""#)
            .await?;
    }
    assert!(
        health_checks >= 150.0 + 750.0,
        "{health_checks} health checks: every buyer of both runs connects before the doors open"
    );
    println!("waiting room: {waited} new sessions waited for a place");
    anyhow::ensure!(
        waited > 0.0,
        "nobody waited: the rooms were never full, so this sale did not test them"
    );
    Ok(())
}
