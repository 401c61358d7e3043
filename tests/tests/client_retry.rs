//! Clients that do not make an overload worse: `Retry-After` honoured per endpoint, exponential
//! backoff with full jitter between rounds, and a retry budget that keeps retries a fraction of
//! requests. Against a small in-test HTTP stub that answers what each test needs (`503
//! overloaded` with `Retry-After`, as the servers answer when they shed load).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use leasehold::{Client, Error, RetryBudget, RetryPolicy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

/// What the stub answers to its `n`th request (from 0): status, `Retry-After`, JSON body.
type Answer = Arc<dyn Fn(usize) -> (u16, Option<&'static str>, &'static str) + Send + Sync>;

const OVERLOADED: &str = r#"{"error":{"code":"overloaded","message":"shedding load"}}"#;
const UNAVAILABLE: &str = r#"{"error":{"code":"store_unavailable","message":"etcd down"}}"#;
const STATUS: &str = r#"{"name":"x","holder":null,"waiters":0}"#;
const GRANTED: &str = r#"{"lease_id":"1a2b","ttl_ms":30000}"#;
const MAX_WAIT_2S: &str =
    r#"{"error":{"code":"invalid_wait","message":"`wait` is above the maximum of 2s."}}"#;
/// A stub answer that never comes.
const HANG: u16 = 0;

/// A one-route HTTP/1.1 server that records when each request came.
struct Stub {
    url: String,
    arrivals: Arc<Mutex<Vec<Instant>>>,
    /// Each request's method and path ("post /v1/leases"), lowercased.
    requests: Arc<Mutex<Vec<String>>>,
    /// Connections accepted.
    connections: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Stub {
    async fn start(answer: Answer) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let arrivals = Arc::new(Mutex::new(Vec::new()));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn({
            let (arrivals, requests) = (arrivals.clone(), requests.clone());
            let connections = connections.clone();
            async move {
                while let Ok((stream, _)) = listener.accept().await {
                    connections.fetch_add(1, Ordering::Relaxed);
                    tokio::spawn(serve(
                        stream,
                        arrivals.clone(),
                        requests.clone(),
                        answer.clone(),
                    ));
                }
            }
        });
        Ok(Self {
            url,
            arrivals,
            requests,
            connections,
            task,
        })
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().expect("lock").clone()
    }

    fn arrivals(&self) -> Vec<Instant> {
        self.arrivals.lock().expect("lock").clone()
    }
}

impl Drop for Stub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves one keep-alive connection: reads each request (headers, then `content-length` bytes)
/// and writes the answer for it.
async fn serve(
    mut stream: TcpStream,
    arrivals: Arc<Mutex<Vec<Instant>>>,
    requests: Arc<Mutex<Vec<String>>>,
    answer: Answer,
) {
    let mut buf = Vec::new();
    loop {
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        while buf.len() < head_end + length {
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        buf.drain(..head_end + length);
        let line = head.lines().next().unwrap_or_default();
        requests.lock().expect("lock").push(
            line.split_whitespace()
                .take(2)
                .collect::<Vec<_>>()
                .join(" "),
        );
        let n = {
            let mut arrivals = arrivals.lock().expect("lock");
            arrivals.push(Instant::now());
            arrivals.len() - 1
        };
        let (status, retry_after, body) = answer(n);
        if status == HANG {
            // Never answers (a long wait in line): the client may give up on this connection.
            return std::future::pending().await;
        }
        let retry_after = retry_after
            .map(|s| format!("retry-after: {s}\r\n"))
            .unwrap_or_default();
        let response = format!(
            "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{retry_after}\r\n{body}",
            body.len()
        );
        if stream.write_all(response.as_bytes()).await.is_err() {
            return;
        }
    }
}

fn gaps(arrivals: &[Instant]) -> Vec<Duration> {
    arrivals.windows(2).map(|w| w[1] - w[0]).collect()
}

/// `503 overloaded` with `Retry-After: 1`: the client asks that endpoint again no sooner than a
/// second later (then succeeds); meanwhile another endpoint is asked at once, and the paced one
/// is not asked again by later calls while its pause lasts.
#[tokio::test]
async fn retry_after_is_honoured_per_endpoint() -> Result<()> {
    let once = Stub::start(Arc::new(|n| match n {
        0 => (503, Some("1"), OVERLOADED),
        _ => (200, None, STATUS),
    }))
    .await?;
    let client = Client::new(&once.url)?;
    client.status("x").await?;
    let arrivals = once.arrivals();
    assert_eq!(arrivals.len(), 2);
    let gap = gaps(&arrivals)[0];
    assert!(
        gap >= Duration::from_secs(1) && gap < Duration::from_millis(1500),
        "{gap:?}"
    );

    let paced = Stub::start(Arc::new(|_| (503, Some("30"), OVERLOADED))).await?;
    let healthy = Stub::start(Arc::new(|n| match n {
        0 => (200, None, STATUS),
        _ => (503, None, UNAVAILABLE),
    }))
    .await?;
    let client = Client::builder()
        .endpoints([paced.url.clone(), healthy.url.clone()])
        .retry_budget(RetryBudget::unlimited())
        .build()?;
    let started = Instant::now();
    client.status("x").await?;
    assert!(started.elapsed() < Duration::from_millis(500));
    // The healthy one fails now; the paced one is still not to be asked.
    let err = client.status("x").await.unwrap_err();
    assert!(matches!(err, Error::Unavailable { .. }), "{err:?}");
    assert_eq!(
        paced.arrivals().len(),
        1,
        "asked again within its Retry-After"
    );
    assert!(healthy.arrivals().len() >= 3);
    Ok(())
}

/// Clients sharing a retry budget facing a server that sheds everything: retries stay within
/// the budget's share of requests (10 % here, plus 2 saved), not 3 per request as the attempt
/// limit alone would allow. Each call ends with `Overloaded`.
#[tokio::test]
async fn retry_budget_bounds_retries() -> Result<()> {
    let stub = Stub::start(Arc::new(|_| (503, None, OVERLOADED))).await?;
    let policy = RetryPolicy {
        max_attempts: 4,
        backoff: Duration::ZERO,
        max_backoff: Duration::ZERO,
    };
    let budget = RetryBudget::new(0.1, 0.0, 2.0);
    let clients: Vec<Client> = (0..5)
        .map(|_| {
            Client::builder()
                .endpoint(&stub.url)
                .retry_policy(policy.clone())
                .retry_budget(budget.clone())
                .build()
        })
        .collect::<Result<_, _>>()?;
    for round in 0..20 {
        for client in &clients {
            let err = client.status("x").await.unwrap_err();
            assert!(matches!(err, Error::Overloaded { .. }), "{round}: {err:?}");
        }
    }
    let requests = stub.arrivals().len();
    assert!(
        (100..=112).contains(&requests),
        "{requests} requests for 100 calls"
    );

    let unbudgeted = Client::builder()
        .endpoint(&stub.url)
        .retry_policy(policy)
        .retry_budget(RetryBudget::unlimited())
        .build()?;
    let before = stub.arrivals().len();
    unbudgeted.status("x").await.unwrap_err();
    assert_eq!(
        stub.arrivals().len() - before,
        4,
        "without a budget: every attempt"
    );
    Ok(())
}

/// A refused connection never reached a server, so moving on to the next endpoint spends no
/// retry budget: many callers whose replica was just killed all fail over, even with an empty
/// budget (the demo's 200 buyers sharing one client, after a `kill -9`). A `503` retry still
/// needs a token, so the budget is really empty here.
#[tokio::test]
async fn refused_connections_fail_over_without_spending_the_budget() -> Result<()> {
    let dead = format!("http://127.0.0.1:{}", leasehold_tests::free_port()?);
    let live = Stub::start(Arc::new(|_| (200, None, STATUS))).await?;
    let empty = || RetryBudget::new(0.0, 0.0, 1.0);
    let budget = empty();
    assert!(budget.balance() >= 1.0);
    // Spend the one saved token on a shed request, so the budget is empty.
    let shedding = Stub::start(Arc::new(|_| (503, None, OVERLOADED))).await?;
    let spender = Client::builder()
        .endpoint(&shedding.url)
        .retry_policy(RetryPolicy {
            max_attempts: 4,
            backoff: Duration::ZERO,
            max_backoff: Duration::ZERO,
        })
        .retry_budget(budget.clone())
        .build()?;
    spender.status("x").await.unwrap_err();
    assert_eq!(
        shedding.arrivals().len(),
        2,
        "one try and one budgeted retry"
    );
    assert!(budget.balance() < 1.0, "the budget is spent");

    for _ in 0..50 {
        // A new client each time, so none has learnt to prefer the live endpoint.
        let client = Client::builder()
            .endpoint(&dead)
            .endpoint(&live.url)
            .retry_budget(budget.clone())
            .build()?;
        client
            .status("x")
            .await
            .context("failing over from a refused connection")?;
    }
    assert_eq!(live.arrivals().len(), 50);
    Ok(())
}

/// A replica was killed while the other one, overloaded, asked for a pause: the client waits
/// for the live one rather than spending its attempts on the port that refuses, and if it must
/// give up, it reports what the live one answered, not "could not connect".
#[tokio::test]
async fn a_refusing_endpoint_is_set_aside_while_a_live_one_asks_for_a_pause() -> Result<()> {
    let dead = format!("http://127.0.0.1:{}", leasehold_tests::free_port()?);
    // Overloaded at first (pause 1 s), then serving.
    let live = Stub::start(Arc::new(|n| match n {
        0 => (503, Some("1"), OVERLOADED),
        _ => (200, None, STATUS),
    }))
    .await?;
    // Two attempts per call, as for requests the client does not resend by itself.
    let client = Client::builder()
        .endpoint(&dead)
        .endpoint(&live.url)
        .retry_policy(RetryPolicy {
            max_attempts: 1,
            ..RetryPolicy::default()
        })
        .retry_budget(RetryBudget::unlimited())
        .build()?;
    // Refused, then shed: the error is the live server's.
    let err = client.status("x").await.unwrap_err();
    assert!(matches!(err, Error::Overloaded { .. }), "{err:?}");
    // The dead one is set aside: the second call waits out the pause and is served.
    let started = Instant::now();
    client
        .status("x")
        .await
        .context("the live endpoint, after its pause")?;
    assert!(started.elapsed() >= Duration::from_millis(500));
    assert_eq!(live.arrivals().len(), 2);
    Ok(())
}

/// Between rounds over the endpoints the client pauses a random time up to the backoff ("full
/// jitter"): spread over the whole range, so clients that failed together do not retry together.
#[tokio::test]
async fn backoff_between_rounds_has_full_jitter() -> Result<()> {
    let stub = Stub::start(Arc::new(|_| (503, None, UNAVAILABLE))).await?;
    let client = Client::builder()
        .endpoint(&stub.url)
        .retry_policy(RetryPolicy {
            max_attempts: 2,
            backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
        })
        .retry_budget(RetryBudget::unlimited())
        .build()?;
    let mut pauses = Vec::new();
    for _ in 0..20 {
        let before = stub.arrivals().len();
        client.status("x").await.unwrap_err();
        let arrivals = stub.arrivals();
        pauses.push(arrivals[before + 1] - arrivals[before]);
    }
    // At most the first round's 100 ms (not the 1 s cap), give or take a loaded machine.
    assert!(
        pauses.iter().all(|p| *p < Duration::from_millis(300)),
        "{pauses:?}"
    );
    assert!(
        pauses.iter().any(|p| *p < Duration::from_millis(40)),
        "{pauses:?}"
    );
    assert!(
        pauses.iter().any(|p| *p > Duration::from_millis(60)),
        "{pauses:?}"
    );
    Ok(())
}

/// The CLI honours `Retry-After` too, and reports an overload that outlasts its retries as
/// `overloaded` (exit 69) with the server's `Retry-After`.
#[tokio::test]
async fn cli_honours_retry_after() -> Result<()> {
    let once = Stub::start(Arc::new(|n| match n {
        0 => (503, Some("1"), OVERLOADED),
        _ => (200, None, STATUS),
    }))
    .await?;
    let started = Instant::now();
    let output = tokio::process::Command::new(leasehold_tests::cli_bin!())
        .args(["--endpoints", &once.url, "status", "x"])
        .output()
        .await?;
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    assert!(started.elapsed() >= Duration::from_secs(1));

    let always = Stub::start(Arc::new(|_| (503, Some("0.2"), OVERLOADED))).await?;
    let output = tokio::process::Command::new(leasehold_tests::cli_bin!())
        .args([
            "--endpoints",
            &always.url,
            "--output",
            "json",
            "status",
            "x",
        ])
        .output()
        .await?;
    assert_eq!(output.status.code(), Some(69), "{output:?}");
    let error: serde_json::Value =
        serde_json::from_slice(&output.stderr).context("a JSON error")?;
    assert_eq!(error["error"]["code"], "overloaded", "{error}");
    assert_eq!(error["error"]["retry_after_ms"], 200, "{error}");
    let arrivals = always.arrivals();
    assert_eq!(arrivals.len(), 4, "the default policy's four attempts");
    assert!(
        gaps(&arrivals)
            .iter()
            .all(|g| *g >= Duration::from_millis(200))
    );
    Ok(())
}

/// `Client::failovers` counts calls another endpoint answered after one failed: a refused
/// connection (a bound-then-dropped port) then a live stub is one per call until the client
/// prefers the live endpoint; a call answered at once, a retry answered by the same endpoint,
/// and a call that fails everywhere are none. Clones share the count.
#[tokio::test]
async fn failovers_count_calls_answered_by_another_endpoint() -> Result<()> {
    let dead = format!("http://127.0.0.1:{}", leasehold_tests::free_port()?);
    let live = Stub::start(Arc::new(|_| (200, None, STATUS))).await?;
    let client = Client::builder()
        .endpoint(&dead)
        .endpoint(&live.url)
        .retry_budget(RetryBudget::unlimited())
        .build()?;
    assert_eq!(client.failovers(), 0);
    client.status("x").await?;
    assert_eq!(
        client.failovers(),
        1,
        "the dead endpoint refused, the live one answered"
    );
    // The client now starts at the live endpoint: answered at once, no fail-over.
    client.status("x").await?;
    client.clone().status("x").await?;
    assert_eq!(client.failovers(), 1);

    // A fresh client fails over again; its count is its own.
    let other = Client::builder()
        .endpoint(&dead)
        .endpoint(&live.url)
        .build()?;
    other.status("x").await?;
    assert_eq!((other.failovers(), client.failovers()), (1, 1));

    // One endpoint that sheds once, then answers: a retry at the same endpoint, not a
    // fail-over.
    let once = Stub::start(Arc::new(|n| match n {
        0 => (503, Some("0"), OVERLOADED),
        _ => (200, None, STATUS),
    }))
    .await?;
    let single = Client::builder()
        .endpoint(&once.url)
        .retry_budget(RetryBudget::unlimited())
        .build()?;
    single.status("x").await?;
    assert_eq!(once.arrivals().len(), 2);
    assert_eq!(single.failovers(), 0);

    // An endpoint that sheds, then another that answers: a fail-over.
    let shedding = Stub::start(Arc::new(|_| (503, None, OVERLOADED))).await?;
    let failing_over = Client::builder()
        .endpoint(&shedding.url)
        .endpoint(&live.url)
        .retry_budget(RetryBudget::unlimited())
        .build()?;
    failing_over.status("x").await?;
    assert_eq!(failing_over.failovers(), 1);

    // Every endpoint fails: no answer, no fail-over.
    let nowhere = Client::builder()
        .endpoint(&dead)
        .endpoint(&shedding.url)
        .retry_policy(RetryPolicy::once_per_endpoint())
        .retry_budget(RetryBudget::unlimited())
        .build()?;
    nowhere.status("x").await.unwrap_err();
    assert_eq!(nowhere.failovers(), 0);
    Ok(())
}

/// `Client::warm_up` opens a connection ahead of need with one `GET /healthz` and keeps it: the
/// next request goes over it (no second connection). Past a dead endpoint it fails over, and
/// the client then starts at the endpoint that answered. With no endpoint up it fails.
#[tokio::test]
async fn warm_up_opens_the_connection_the_next_request_uses() -> Result<()> {
    let live = Stub::start(Arc::new(|_| (200, None, STATUS))).await?;
    let client = Client::new(&live.url)?;
    client.warm_up().await?;
    assert_eq!(live.connections.load(Ordering::Relaxed), 1);
    client.status("x").await?;
    assert_eq!(
        live.requests(),
        ["get /healthz", "get /v1/locks/x"],
        "one health check, then the real request"
    );
    assert_eq!(
        live.connections.load(Ordering::Relaxed),
        1,
        "the request after the warm-up reused its connection"
    );

    let dead = format!("http://127.0.0.1:{}", leasehold_tests::free_port()?);
    let other = Stub::start(Arc::new(|_| (200, None, STATUS))).await?;
    let failing_over = Client::builder()
        .endpoint(&dead)
        .endpoint(&other.url)
        .build()?;
    failing_over.warm_up().await?;
    assert_eq!(failing_over.failovers(), 1);
    failing_over.status("x").await?;
    assert_eq!(
        (
            failing_over.failovers(),
            other.connections.load(Ordering::Relaxed)
        ),
        (1, 1),
        "after warming up past the dead endpoint, requests start at the live one, connected"
    );

    let nowhere = Client::builder()
        .endpoint(&dead)
        .retry_policy(RetryPolicy::once_per_endpoint())
        .build()?;
    assert!(nowhere.warm_up().await.is_err());
    Ok(())
}

/// An acquire under a lease that every attempt found shed reached no server's etcd: the client
/// sends nothing after it (no status read to look for a grant to clean up), so that a stampede
/// of shed acquires does not turn into a stampede of reads that no server may shed.
#[tokio::test]
async fn an_acquire_shed_on_every_attempt_is_not_followed_by_a_clean_up() -> Result<()> {
    let requests = shed_acquire(Arc::new(|n| match n {
        0 => (201, None, GRANTED),
        _ => (503, None, OVERLOADED),
    }))
    .await?;
    assert!(
        requests
            .iter()
            .skip(1)
            .all(|r| r.starts_with("post /v1/locks/seat/acquire")),
        "only acquire attempts after the grant: {requests:?}"
    );
    // An attempt that may have acted (a 503 other than shedding) is followed by the clean-up.
    let requests = shed_acquire(Arc::new(|n| match n {
        0 => (201, None, GRANTED),
        1 => (503, None, UNAVAILABLE),
        _ => (503, None, OVERLOADED),
    }))
    .await?;
    assert!(
        requests.iter().any(|r| r.starts_with("get /v1/locks/seat")),
        "the clean-up reads the lock after an attempt that may have acted: {requests:?}"
    );
    Ok(())
}

/// A wait longer than a server allows is a chain of requests; when the next one is shed, the
/// one still waiting on a server is cut off, and it may have been granted: the client checks.
#[tokio::test]
async fn an_acquire_shed_while_an_earlier_link_waits_is_cleaned_up() -> Result<()> {
    let requests = shed_acquire_waiting(Arc::new(|n| match n {
        0 => (201, None, GRANTED),
        1 => (400, None, MAX_WAIT_2S),
        2 => (HANG, None, ""),
        _ => (503, None, OVERLOADED),
    }))
    .await?;
    assert!(
        requests.iter().any(|r| r.starts_with("get /v1/locks/seat")),
        "the clean-up reads the lock after cutting off a waiting link: {requests:?}"
    );
    Ok(())
}

/// Against a stub answering `answer` (a lease grant first): grants a lease, acquires under it
/// until the last attempt is shed, and returns every request the stub saw by half a second later.
async fn shed_acquire(answer: Answer) -> Result<Vec<String>> {
    shed_acquire_for(answer, None).await
}

/// [`shed_acquire`] with a wait of 10 s in line.
async fn shed_acquire_waiting(answer: Answer) -> Result<Vec<String>> {
    shed_acquire_for(answer, Some(Duration::from_secs(10))).await
}

async fn shed_acquire_for(answer: Answer, wait: Option<Duration>) -> Result<Vec<String>> {
    let stub = Stub::start(answer).await?;
    let client = Client::builder()
        .endpoints([stub.url.clone()])
        .retry_budget(RetryBudget::unlimited())
        .build()?;
    let lease = client
        .grant_lease_for(Duration::from_secs(30), None)
        .await?;
    let mut lock = client.lock("seat").lease(&lease);
    if let Some(wait) = wait {
        lock = lock.wait(wait);
    }
    let err = lock.acquire().await.unwrap_err();
    assert!(matches!(err, Error::Overloaded { .. }), "{err:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(stub.requests())
}
