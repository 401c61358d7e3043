//! `/metrics`: Prometheus text that moves with the traffic, and that promtool accepts.
//! (Its own test binary: the metrics recorder is process-wide.)

use std::collections::HashMap;

use anyhow::{Context, Result};
use leasehold_tests::{Api, EtcdCluster, TestServer};
use serde_json::json;

/// Parses `name{labels} value` lines into a map (histogram buckets included).
fn samples(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            Some((key.to_owned(), value.parse().ok()?))
        })
        .collect()
}

async fn scrape(api: &Api) -> Result<(String, HashMap<String, f64>)> {
    let response = api
        .http()
        .get(format!("{}/metrics", api.base()))
        .send()
        .await?;
    anyhow::ensure!(response.status() == 200);
    let content_type = response.headers()["content-type"].to_str()?.to_owned();
    anyhow::ensure!(content_type.starts_with("text/plain"), "{content_type}");
    let text = response.text().await?;
    let parsed = samples(&text);
    Ok((text, parsed))
}

fn delta(before: &HashMap<String, f64>, after: &HashMap<String, f64>, key: &str) -> f64 {
    after.get(key).copied().unwrap_or(0.0) - before.get(key).copied().unwrap_or(0.0)
}

/// Counters move as expected after a scripted set of acquires, renewals and releases, and the
/// histograms and gauges the alerts rely on are exported.
#[tokio::test]
async fn counters_follow_traffic() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let server = TestServer::start(&etcd).await?;
    let api = Api::new(server.url());
    // Traffic before the first scrape counts too (the recorder is installed at start-up).
    let (_, early) = api.acquire_ttl("m0", "10s", "0s").await?;
    api.post("/v1/locks/m0/release", json!({"token": early["token"]}))
        .await?;
    let (_, first) = scrape(&api).await?;
    assert_eq!(
        first.get(r#"leasehold_acquires_total{result="granted"}"#),
        Some(&1.0)
    );
    let before = first;

    let (_, a) = api.acquire_ttl("m1", "10s", "0s").await?;
    let (_, b) = api.acquire_ttl("m2", "10s", "0s").await?;
    let (status, _) = api.acquire_ttl("m1", "10s", "0s").await?; // held: timed_out
    assert_eq!(status, 409);
    let (status, _) = api.acquire_ttl("m1", "10s", "200ms").await?; // waits, times out
    assert_eq!(status, 409);
    api.post("/v1/locks/m1/renew", json!({"token": a["token"]}))
        .await?;
    api.post_with_handle(
        "/v1/locks/m1/renew",
        json!({"token": 1}),
        a["handle"].as_str(),
    )
    .await?; // not_holder
    api.post("/v1/locks/m1/release", json!({"token": a["token"]}))
        .await?;
    api.post("/v1/locks/m2/release", json!({"token": b["token"]}))
        .await?;
    api.post("/v1/locks/m2/release", json!({"token": b["token"]}))
        .await?; // not_holder now
    let lease = api.grant("10s").await?;
    api.delete(&format!("/v1/leases/{lease}")).await?;
    // A waiter granted after a release records its time in line.
    let (_, c) = api.acquire_ttl("m3", "10s", "0s").await?;
    let waiter = tokio::spawn({
        let api = api.clone();
        async move { api.acquire_ttl("m3", "10s", "10s").await }
    });
    while api.get("/v1/locks/m3").await?.1["waiters"] != 1 {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    api.post("/v1/locks/m3/release", json!({"token": c["token"]}))
        .await?;
    assert_eq!(waiter.await??.0, 200);

    let (text, after) = scrape(&api).await?;
    let expect = [
        (r#"leasehold_acquires_total{result="granted"}"#, 4.0),
        (r#"leasehold_acquires_total{result="timed_out"}"#, 2.0),
        (r#"leasehold_renewals_total{result="renewed"}"#, 1.0),
        (r#"leasehold_renewals_total{result="not_holder"}"#, 1.0),
        (r#"leasehold_releases_total{result="released"}"#, 3.0),
        (r#"leasehold_releases_total{result="not_holder"}"#, 1.0),
        ("leasehold_stale_token_rejections_total", 2.0),
        ("leasehold_holds_lost_total", 1.0),
        // Six server-granted leases for the ttl acquires, plus one granted directly.
        ("leasehold_lease_grants_total", 7.0),
        ("leasehold_lease_revocations_total", 1.0),
        ("leasehold_acquire_duration_seconds_count", 6.0),
        ("leasehold_acquire_wait_seconds_count", 1.0),
    ];
    for (key, want) in expect {
        assert_eq!(delta(&before, &after, key), want, "{key}\n{text}");
    }
    for present in [
        "leasehold_etcd_request_duration_seconds_bucket{op=\"txn\"",
        "leasehold_waits_in_flight",
        "leasehold_admission_limit",
        "leasehold_admission_queue",
        "leasehold_etcd_up 1",
        "leasehold_build_info{version=",
        "leasehold_http_requests_total{method=\"POST\",route=\"/v1/locks/{name}/acquire\",status=\"200\"}",
    ] {
        assert!(text.contains(present), "missing {present}\n{text}");
    }
    promtool_accepts(&text)?;
    Ok(())
}

/// `promtool check metrics` (Debian's `prometheus` package) accepts the exposition. Required
/// unless `LEASEHOLD_SKIP_PROMTOOL=1`, so that a missing tool cannot pass silently.
fn promtool_accepts(text: &str) -> Result<()> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    if std::env::var("LEASEHOLD_SKIP_PROMTOOL").as_deref() == Ok("1") {
        eprintln!("LEASEHOLD_SKIP_PROMTOOL=1: not running promtool");
        return Ok(());
    }
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("promtool not found: apt-get install prometheus (scripts/test does)")?;
    child.stdin.take().unwrap().write_all(text.as_bytes())?;
    let out = child.wait_with_output()?;
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // promtool exits non-zero for lint warnings too; only real problems fail the test. Our
    // counters end in _total and histograms carry units, so it should print nothing.
    anyhow::ensure!(out.status.success(), "promtool check metrics:\n{report}");
    Ok(())
}
