//! A TCP proxy in front of an etcd member that can hold requests back: the deterministic way to
//! make a request land *late*.
//!
//! A stalled member (`SIGSTOP`, GC, a slow disk or link) keeps the bytes a client sent and acts on
//! them when it continues, after the client gave up. With `SIGSTOP` the member reads the request
//! and the client's cancellation at the same moment, so whether it still applies the request is a
//! race (the issues that found these bugs saw it in 2 of 6 to 11 of 41 tries). This proxy keeps
//! the timing instead: while a delay is set, every chunk the client sends reaches the member that
//! much later, *in order and with the same spacing*, so a request times out at the client, then
//! reaches etcd (and is applied) before the cancellation that followed it. Answers flow back at
//! once, unless an answer delay is set: then the server has acted and answered, and the client
//! gives up before it hears (the way to abandon a request *after* it was granted).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Result;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// A delaying proxy to one address; stops when dropped.
pub struct DelayProxy {
    addr: SocketAddr,
    delay_ms: Arc<AtomicU64>,
    answer_delay_ms: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl DelayProxy {
    /// Starts a proxy to `target` (`http://127.0.0.1:PORT` or `127.0.0.1:PORT`), no delay yet.
    pub async fn start(target: &str) -> Result<Self> {
        let target: SocketAddr = target
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .parse()?;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let delay_ms = Arc::new(AtomicU64::new(0));
        let answer_delay_ms = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn({
            let (delay_ms, answer_delay_ms) = (delay_ms.clone(), answer_delay_ms.clone());
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    let (delay_ms, answer_delay_ms) = (delay_ms.clone(), answer_delay_ms.clone());
                    tokio::spawn(async move {
                        if let Ok(server) = TcpStream::connect(target).await {
                            let _ = client.set_nodelay(true);
                            let _ = server.set_nodelay(true);
                            relay(client, server, delay_ms, answer_delay_ms).await;
                        }
                    });
                }
            }
        });
        Ok(Self {
            addr,
            delay_ms,
            answer_delay_ms,
            task,
        })
    }

    /// The proxy's URL, to give a server as an etcd endpoint.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// From now on, bytes the client sends reach etcd `delay` later (zero: at once). Bytes already
    /// held keep their delay.
    pub fn set_delay(&self, delay: Duration) {
        self.delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// From now on, bytes the server sends reach the client `delay` later (zero: at once).
    pub fn set_answer_delay(&self, delay: Duration) {
        self.answer_delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// How long the member side stays open after the last held-back bytes of a client that hung up
/// were delivered. A client gives up on a stalled connection (its keep-alive pings go unanswered)
/// and closes it; a member that reads a request and, in the same instant, the connection's end
/// may drop the request. The member of a real stall reads the request first and the hang-up
/// later, so the proxy waits before passing the hang-up on.
const LINGER: Duration = Duration::from_secs(2);

/// Relays one connection: client → server through a delay line, server → client after the answer
/// delay (at once by default). When the client hangs up, what it sent before is still delivered,
/// at its time, as a stalled member would still read it.
async fn relay(
    client: TcpStream,
    server: TcpStream,
    delay_ms: Arc<AtomicU64>,
    answer_delay_ms: Arc<AtomicU64>,
) {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let (line, mut due) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let inbound = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n) = client_read.read(&mut buf).await {
            if n == 0 {
                break;
            }
            let at = Instant::now() + Duration::from_millis(delay_ms.load(Ordering::SeqCst));
            if line.send((at, buf[..n].to_vec())).is_err() {
                break;
            }
        }
    });
    let deliver = tokio::spawn(async move {
        while let Some((at, bytes)) = due.recv().await {
            tokio::time::sleep_until(at).await;
            if server_write.write_all(&bytes).await.is_err() {
                break;
            }
        }
        tokio::time::sleep(LINGER).await;
        let _ = server_write.shutdown().await;
    });
    let outbound = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n) = server_read.read(&mut buf).await {
            if n == 0 {
                break;
            }
            let delay = Duration::from_millis(answer_delay_ms.load(Ordering::SeqCst));
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            if client_write.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = client_write.shutdown().await;
    });
    let _ = inbound.await;
    let _ = deliver.await;
    outbound.abort();
}
