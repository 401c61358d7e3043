//! Memory after bursts: thousands of connections arrive at once, each takes and releases a lock,
//! and go away; twelve times. What the server holds afterwards must not keep growing. Two checks,
//! on the resident memory once idle after each burst (both printed):
//! - issue 17's: after the tenth burst within 1.2x of after the first;
//! - a leak grows with every burst, while the allocator's working set settles: the least of the
//!   last three within 1.1x of the most of bursts two to four.
//!
//! The server runs with the allocator configuration it ships with (`.cargo/config.toml`).
//! Sensitivity, measured by planting leaks in the acquire handler: 1 KiB leaked per acquire fails
//! it; 400 B per acquire hides in the allocator's noise (about 2 MiB either way).

use std::time::Duration;

use anyhow::Result;
use futures::StreamExt;
use leasehold_tests::{EtcdCluster, ServerProcess, server_bin};
use serde_json::json;

/// Connections per burst (each from its own client, so each is a new TCP connection).
const CONNECTIONS: usize = 2_000;
const BURSTS: usize = 12;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_after_bursts_does_not_grow() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let server = ServerProcess::spawn(&server_bin!(), &etcd.endpoints(), &[]).await?;
    let url = server.url();
    let before = server.rss_kib()?;
    // No connection reuse: every request opens (and then closes) its own connection.
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(0)
        .build()?;
    let mut after = Vec::new();
    let mut refused = 0;
    for burst in 0..BURSTS {
        let outcomes: Vec<u16> = futures::stream::iter(0..CONNECTIONS)
            .map(|i| {
                let (url, http) = (url.clone(), http.clone());
                async move {
                    let Ok(response) = http
                        .post(format!("{url}/v1/locks/burst-{}/acquire", i % 500))
                        .json(&json!({"ttl": "10s", "wait": "0s"}))
                        .send()
                        .await
                    else {
                        return anyhow::Ok(0); // not accepted in time: the kernel's backlog
                    };
                    let status = response.status().as_u16();
                    let body: serde_json::Value = response.json().await?;
                    if status == 200 {
                        http.post(format!("{url}/v1/locks/burst-{}/release", i % 500))
                            .header(
                                leasehold_tests::HANDLE_HEADER,
                                body["handle"].as_str().unwrap_or(""),
                            )
                            .json(&json!({"token": body["token"]}))
                            .send()
                            .await?;
                    }
                    anyhow::Ok(status)
                }
            })
            .buffer_unordered(CONNECTIONS)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<_>>()?;
        anyhow::ensure!(
            outcomes.iter().all(|s| matches!(s, 0 | 200 | 409 | 503)),
            "burst {burst}: unexpected answers"
        );
        refused += outcomes.iter().filter(|s| **s == 0).count();
        // Idle: connections closed, clean-ups done; what stays resident once the allocator has
        // settled (the least of a few samples over three seconds).
        let mut settled = u64::MAX;
        for _ in 0..12 {
            tokio::time::sleep(Duration::from_millis(250)).await;
            settled = settled.min(server.rss_kib()?);
        }
        after.push(settled);
    }
    eprintln!(
        "burst memory: before {before} KiB; after each of {BURSTS} bursts of {CONNECTIONS} connections: {after:?} KiB; peak {} KiB; {refused} connections not accepted in time",
        server.peak_rss_kib()?
    );
    let (first, tenth) = (after[0], after[9]);
    anyhow::ensure!(
        tenth as f64 <= first as f64 * 1.2,
        "RSS grew: {first} KiB after the first burst, {tenth} KiB after the tenth"
    );
    let settled = after[1..4]
        .iter()
        .copied()
        .max()
        .expect("bursts two to four");
    let last = after[BURSTS - 3..]
        .iter()
        .copied()
        .min()
        .expect("the last bursts");
    anyhow::ensure!(
        last as f64 <= settled as f64 * 1.1,
        "RSS keeps growing: {settled} KiB once settled (bursts two to four), still {last} KiB after the last three"
    );
    Ok(())
}
