//! Slow and abusive clients: the server keeps answering everyone else, with limits and clear
//! errors.

use std::time::Duration;

use anyhow::{Context, Result};
use leasehold_tests::{Api, EtcdCluster, TestServer};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};

async fn server_with_limits(etcd: &EtcdCluster, max_connections: usize) -> Result<TestServer> {
    let config = leasehold_server::Config::default()
        .with_etcd_endpoints(etcd.endpoints())
        .with_connection_limits(max_connections, Duration::from_secs(1));
    TestServer::start_with(config).await
}

fn addr(server: &TestServer) -> String {
    server.url().trim_start_matches("http://").to_owned()
}

/// Reads until the peer closes (or `within` passes); returns what was read.
async fn read_to_close(stream: &mut TcpStream, within: Duration) -> Result<String> {
    let mut out = Vec::new();
    timeout(within, stream.read_to_end(&mut out)).await??;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// A client that sends half a request and stalls (slowloris), or connects and sends nothing, is
/// disconnected after the header timeout, while others are answered meanwhile.
#[tokio::test]
async fn stalled_clients_are_disconnected() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let server = server_with_limits(&etcd, 100).await?;
    let api = Api::new(server.url());
    let mut slow = TcpStream::connect(addr(&server)).await?;
    slow.write_all(b"POST /v1/locks/x/acquire HTTP/1.1\r\nHost: x\r\n")
        .await?;
    let mut silent = TcpStream::connect(addr(&server)).await?;

    assert_eq!(
        api.get("/healthz").await?.0,
        200,
        "others are answered meanwhile"
    );
    let started = Instant::now();
    read_to_close(&mut slow, Duration::from_secs(5)).await?;
    read_to_close(&mut silent, Duration::from_secs(5)).await?;
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "closed after the 1 s header timeout"
    );
    Ok(())
}

/// Past the connection cap, a new connection gets an immediate `503 too_many_connections`
/// JSON answer; once the idle connections time out, service is back.
#[tokio::test]
async fn connection_flood_gets_a_clear_503() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let server = server_with_limits(&etcd, 20).await?;
    let mut flood = Vec::new();
    for _ in 0..20 {
        flood.push(TcpStream::connect(addr(&server)).await?);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut extra = TcpStream::connect(addr(&server)).await?;
    let answer = read_to_close(&mut extra, Duration::from_secs(2)).await?;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    let body: serde_json::Value =
        serde_json::from_str(answer.split("\r\n\r\n").nth(1).unwrap_or_default())?;
    assert_eq!(body["error"]["code"], "too_many_connections");

    // The idle connections are cut at the header timeout; then requests get through again.
    let api = Api::new(server.url());
    let deadline = Instant::now() + Duration::from_secs(10);
    while !matches!(api.get("/healthz").await, Ok((200, _))) {
        anyhow::ensure!(Instant::now() < deadline, "never recovered from the flood");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(flood);
    Ok(())
}

/// A thousand idle connections under the default cap do not slow anyone else down.
#[tokio::test]
async fn many_idle_connections_do_not_starve_others() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let server = TestServer::start(&etcd).await?;
    let mut idle = Vec::new();
    for _ in 0..1000 {
        idle.push(TcpStream::connect(addr(&server)).await?);
    }
    let api = Api::new(server.url());
    let started = Instant::now();
    let (status, _) = api.acquire_ttl("busy", "10s", "0s").await?;
    assert_eq!(status, 200);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "took {:?}",
        started.elapsed()
    );
    drop(idle);
    Ok(())
}

/// A waiter that never reads its answer blocks nobody: other locks are served, and when it is
/// granted the grant is simply queued on its socket.
#[tokio::test]
async fn a_waiter_that_never_reads_blocks_nobody() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let server = TestServer::start(&etcd).await?;
    let api = Api::new(server.url());
    let (_, held) = api.acquire_ttl("held", "30s", "0s").await?;
    let body = json!({"ttl": "30s", "wait": "20s", "owner": "deaf"}).to_string();
    let mut deaf = TcpStream::connect(addr(&server)).await?;
    deaf.write_all(
        format!(
            "POST /v1/locks/held/acquire HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await?;
    while api.get("/v1/locks/held").await?.1["waiters"] != 1 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for i in 0..20 {
        let (status, _) = api.acquire_ttl(&format!("other-{i}"), "10s", "0s").await?;
        assert_eq!(status, 200);
    }
    api.post("/v1/locks/held/release", json!({"token": held["token"]}))
        .await?;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, status) = api.get("/v1/locks/held").await?;
        if status["holder"]["owner"] == "deaf" {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the deaf waiter was never granted: {status}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(deaf);
    Ok(())
}

/// Sends `request` on a new connection and reads until the server closes it, within 5 s. The
/// server must refuse it: with a 4xx answer, or by closing the connection without one (possibly
/// while the request is still being written). Returns what it answered. A server that neither
/// answers nor closes (it hangs) fails, and so does any other answer.
async fn refused(server: &TestServer, request: &[u8]) -> Result<String> {
    let closed = |err: &std::io::Error| {
        matches!(
            err.kind(),
            std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
        )
    };
    let mut raw = TcpStream::connect(addr(server)).await?;
    let answer = timeout(Duration::from_secs(5), async {
        if let Err(err) = raw.write_all(request).await {
            // It closed before reading it all: a refusal, as long as that is all it did.
            anyhow::ensure!(closed(&err), "writing the request: {err}");
        }
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match raw.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
                Err(err) if closed(&err) => break,
                Err(err) => anyhow::bail!("reading the answer: {err}"),
            }
        }
        anyhow::Ok(String::from_utf8_lossy(&answer).into_owned())
    })
    .await
    .map_err(|_| anyhow::anyhow!("the server neither answered nor closed within 5 s"))??;
    anyhow::ensure!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 4"),
        "expected a 4xx or a closed connection, got: {}",
        &answer[..answer.len().min(80)]
    );
    Ok(answer)
}

/// A very long URL or header is refused with a 4xx (or a closed connection), promptly, and the
/// server keeps answering.
#[tokio::test]
async fn oversized_urls_and_headers_are_refused() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let server = TestServer::start(&etcd).await?;
    let api = Api::new(server.url());

    // reqwest refuses to send such a URL, so write it by hand.
    let long_path = format!("/v1/locks/{}", "a".repeat(100_000));
    let answer = refused(
        &server,
        format!("GET {long_path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
    )
    .await
    .context("a 100 KB URL")?;
    println!(
        "100 KB URL: {}",
        answer.lines().next().unwrap_or("(closed)")
    );

    let answer = refused(
        &server,
        format!(
            "GET /healthz HTTP/1.1\r\nHost: x\r\nx-junk: {}\r\n\r\n",
            "j".repeat(1 << 20)
        )
        .as_bytes(),
    )
    .await
    .context("a 1 MiB header")?;
    println!(
        "1 MiB header: {}",
        answer.lines().next().unwrap_or("(closed)")
    );
    assert_eq!(api.get("/healthz").await?.0, 200);
    Ok(())
}
