//! Watch streams (Server-Sent Events) and leader election, against real etcd.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use leasehold_tests::{Api, EtcdCluster, TestServer};
use serde_json::{Value, json};

/// A minimal SSE reader over a streaming response.
struct Events {
    response: reqwest::Response,
    buffer: String,
}

/// One event: id, type and JSON data.
#[derive(Debug)]
struct Event {
    id: i64,
    kind: String,
    data: Value,
}

impl Events {
    async fn open(api: &Api, path: &str, last_event_id: Option<i64>) -> Result<Self> {
        let mut request = api.http().get(format!("{}{path}", api.base()));
        if let Some(id) = last_event_id {
            request = request.header("Last-Event-ID", id.to_string());
        }
        let response = request.send().await?;
        ensure!(response.status() == 200, "{path}: {}", response.status());
        let content_type = response.headers()["content-type"].to_str()?.to_owned();
        ensure!(
            content_type.starts_with("text/event-stream"),
            "{content_type}"
        );
        Ok(Self {
            response,
            buffer: String::new(),
        })
    }

    /// The next event (keep-alive comments skipped), within `within`.
    async fn next(&mut self, within: Duration) -> Result<Event> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let (mut id, mut kind, mut data) = (None, String::from("message"), String::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id:") {
                        id = v.trim().parse().ok();
                    } else if let Some(v) = line.strip_prefix("event:") {
                        kind = v.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim());
                    }
                }
                if data.is_empty() {
                    continue; // a comment (keep-alive)
                }
                return Ok(Event {
                    id: id.context("event without id")?,
                    kind,
                    data: serde_json::from_str(&data)?,
                });
            }
            let chunk = tokio::time::timeout_at(deadline, self.response.chunk())
                .await
                .context("no event in time")??
                .context("the stream ended")?;
            self.buffer.push_str(&String::from_utf8_lossy(&chunk));
        }
    }
}

fn holder_token(status: &Value) -> Option<u64> {
    status["holder"]["token"].as_u64()
}

/// A watch sends the status now, then one event per change, ids growing; a client that
/// reconnects with `Last-Event-ID` is sent every change it missed, in order, none twice.
#[tokio::test]
async fn a_reconnecting_watcher_misses_no_change() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let server = TestServer::start(&etcd).await?;
    let api = Api::new(server.url());
    let mut watch = Events::open(&api, "/v1/locks/w/watch", None).await?;
    let first = watch.next(Duration::from_secs(5)).await?;
    ensure!(
        first.kind == "status" && first.data["holder"].is_null(),
        "{first:?}"
    );

    let (_, held) = api.acquire_ttl("w", "30s", "0s").await?;
    let granted = watch.next(Duration::from_secs(5)).await?;
    ensure!(
        granted.id > first.id && holder_token(&granted.data) == held["token"].as_u64(),
        "{granted:?}"
    );
    drop(watch); // the client goes away...

    // ...and misses a release, a new holder with a waiter, and its release.
    api.post("/v1/locks/w/release", json!({"token": held["token"]}))
        .await?;
    let (_, second) = api.acquire_ttl("w", "30s", "0s").await?;
    let waiter = tokio::spawn({
        let api = api.clone();
        async move { api.acquire_ttl("w", "30s", "10s").await }
    });
    while api.get("/v1/locks/w").await?.1["waiters"] != 1 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    api.post("/v1/locks/w/release", json!({"token": second["token"]}))
        .await?;
    let (_, third) = waiter.await??;

    let mut watch = Events::open(&api, "/v1/locks/w/watch", Some(granted.id)).await?;
    let mut seen = Vec::new();
    let mut last_id = granted.id;
    while seen.last() != Some(&third["token"].as_u64()) {
        let event = watch.next(Duration::from_secs(5)).await?;
        ensure!(
            event.id > last_id,
            "ids grow, none twice: {event:?} after {last_id}"
        );
        last_id = event.id;
        seen.push(holder_token(&event.data));
    }
    // Every holder change, in order: released (none), second, (second + waiter), third.
    let holders: Vec<Option<u64>> = seen.iter().copied().fold(Vec::new(), |mut v, t| {
        if v.last() != Some(&t) {
            v.push(t);
        }
        v
    });
    ensure!(
        holders == [None, second["token"].as_u64(), third["token"].as_u64()],
        "{holders:?}"
    );
    Ok(())
}

/// An election: the first candidate leads with an epoch; observers see it; when the leader's
/// lease dies (its process is gone), the next candidate leads with a larger epoch, and at no
/// moment do two lead.
#[tokio::test]
async fn one_leader_at_a_time_through_a_leader_death() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let server = TestServer::start(&etcd).await?;
    let api = Api::new(server.url());
    let (status, leader) = api
        .post(
            "/v1/elections/primary/campaign",
            json!({"ttl": "2s", "value": "node-a"}),
        )
        .await?;
    ensure!(status == 200, "{leader}");
    let epoch = leader["epoch"].as_u64().context("epoch")?;
    let mut observe = Events::open(&api, "/v1/elections/primary/observe", None).await?;
    let now = observe.next(Duration::from_secs(5)).await?;
    ensure!(
        now.kind == "leader"
            && now.data["leader"]["value"] == "node-a"
            && now.data["leader"]["epoch"] == epoch,
        "{now:?}"
    );

    let (status, busy) = api
        .post(
            "/v1/elections/primary/campaign",
            json!({"ttl": "5s", "value": "node-b"}),
        )
        .await?;
    ensure!(status == 409, "only one leader: {busy}");
    let candidate = tokio::spawn({
        let api = api.clone();
        async move {
            api.post(
                "/v1/elections/primary/campaign",
                json!({"ttl": "30s", "value": "node-b", "wait": "20s"}),
            )
            .await
        }
    });
    // Nobody keeps node-a's 2 s lease alive (its process is "dead"): node-b takes over.
    let (status, next) = candidate.await??;
    ensure!(
        status == 200 && next["epoch"].as_u64() > Some(epoch),
        "{next}"
    );
    let changed = observe.next(Duration::from_secs(10)).await?;
    ensure!(changed.data["leader"]["value"] == "node-b", "{changed:?}");
    let (_, leadership) = api.get("/v1/elections/primary").await?;
    ensure!(
        leadership["leader"]["value"] == "node-b" && leadership["leader"]["epoch"] == next["epoch"],
        "{leadership}"
    );

    let (status, body) = api
        .post(
            "/v1/elections/primary/resign",
            json!({"token": next["token"]}),
        )
        .await?;
    ensure!(status == 200, "{body}");
    let gone = observe.next(Duration::from_secs(5)).await?;
    ensure!(gone.data["leader"].is_null(), "{gone:?}");
    Ok(())
}

/// The list routes the status page reads: locks in use with their holders, and live leases;
/// and the page itself is served, with nothing from elsewhere.
#[tokio::test]
async fn the_status_page_and_its_lists() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let server = TestServer::start(&etcd).await?;
    let api = Api::new(server.url());
    let (_, held) = api
        .post(
            "/v1/locks/page%2Fa/acquire",
            json!({"ttl": "30s", "owner": "ann"}),
        )
        .await?;
    api.post("/v1/leases", json!({"ttl": "30s", "owner": "bob"}))
        .await?;
    let (_, locks) = api.get("/v1/locks").await?;
    ensure!(
        locks["locks"][0]["name"] == "page/a"
            && locks["locks"][0]["holder"]["token"] == held["token"]
            && locks["locks"][0]["holder"]["owner"] == "ann",
        "{locks}"
    );
    ensure!(locks["revision"].as_i64() > Some(0));
    let (_, leases) = api.get("/v1/leases").await?;
    let owners: Vec<&str> = leases["leases"]
        .as_array()
        .context("leases")?
        .iter()
        .filter_map(|l| l["owner"].as_str())
        .collect();
    ensure!(
        owners.contains(&"bob") && owners.contains(&"ann"),
        "{leases}"
    );
    ensure!(
        !leases
            .to_string()
            .contains(held["handle"].as_str().unwrap()),
        "no handles listed"
    );

    let page = api.http().get(format!("{}/ui", api.base())).send().await?;
    ensure!(page.status() == 200);
    let csp = page.headers()["content-security-policy"]
        .to_str()?
        .to_owned();
    ensure!(
        csp.contains("default-src 'none'") && csp.contains("connect-src 'self'"),
        "{csp}"
    );
    let html = page.text().await?;
    ensure!(
        html.contains("/v1/events") && !html.contains("http://") && !html.contains("https://"),
        "the page loads nothing from elsewhere"
    );
    Ok(())
}
