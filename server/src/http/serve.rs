//! The accept loop: HTTP/1.1 and HTTP/2 connections with the limits a lock service exposed to
//! many clients needs, and graceful shutdown.
//!
//! `axum::serve` has neither of the two limits, hence this loop:
//! - a header read timeout, so a client that opens a connection and trickles (or never sends)
//!   its request headers is disconnected instead of holding a connection forever (slowloris;
//!   hyper times out slow headers, and a connection that sends nothing is cut here);
//! - a cap on open connections; past it, a new connection gets an immediate
//!   `503 too_many_connections` JSON answer and is closed, rather than waiting unseen in the
//!   kernel's backlog.
//!
//! Waiting acquires are long-lived requests by design; they are not affected by the header
//! timeout (it only covers reading the headers) and count once each against the cap.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::ServiceExt;

/// Limits on connections.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Open connections at most; more are answered 503 and closed.
    pub max_connections: usize,
    /// Time allowed to send a request's headers (from the connection's start or the end of the
    /// previous response).
    pub header_read_timeout: Duration,
}

/// What a connection over the cap is told before it is closed.
const TOO_MANY_CONNECTIONS: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
content-type: application/json\r\nconnection: close\r\nretry-after: 1\r\ncontent-length: 91\r\n\r\n\
{\"error\":{\"code\":\"too_many_connections\",\"message\":\"connection limit reached; retry later\"}}";

/// Serves `app` on `listener` until `shutdown` completes; then stops accepting, runs `on_stop`
/// (which cancels waits), and waits up to `grace` for open connections to finish.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    tls: Option<super::tls::ReloadableTls>,
    shutdown: impl Future<Output = ()>,
    on_stop: impl FnOnce(),
    grace: Duration,
) {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    builder.http2().timer(TokioTimer::new());
    let builder = Arc::new(builder);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);

    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, max = limits.max_connections, "connection limit reached");
            let plain = tls.is_none();
            tokio::spawn(async move {
                let mut stream = stream;
                // Over TLS a plaintext answer means nothing to the client: just close.
                if plain {
                    let _ = tokio::time::timeout(
                        Duration::from_secs(1),
                        stream.write_all(TOO_MANY_CONNECTIONS),
                    )
                    .await;
                }
                let _ = stream.shutdown().await;
            });
            continue;
        };
        let service = TowerToHyperService::new(
            app.clone()
                .map_request(|request: hyper::Request<Incoming>| request.map(Body::new)),
        );
        let (builder, watcher) = (builder.clone(), graceful.watcher());
        let first_byte_timeout = limits.header_read_timeout;
        let acceptor = tls.as_ref().map(super::tls::ReloadableTls::acceptor);
        tokio::spawn(async move {
            // hyper waits for a connection's first bytes (to tell HTTP/1 from HTTP/2) with no
            // timeout: a client that connects and sends nothing would keep its slot forever.
            let mut probe = [0u8; 1];
            match tokio::time::timeout(first_byte_timeout, stream.peek(&mut probe)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return, // silent, closed or broken: drop it (and its slot)
            }
            let result = match acceptor {
                None => {
                    let connection = builder
                        .serve_connection_with_upgrades(TokioIo::new(stream), service)
                        .into_owned();
                    watcher.watch(connection).await
                }
                Some(acceptor) => {
                    // The handshake is bounded like the headers: a slow one holds a slot.
                    let Ok(Ok(stream)) =
                        tokio::time::timeout(first_byte_timeout, acceptor.accept(stream)).await
                    else {
                        tracing::debug!(%peer, "TLS handshake failed or timed out");
                        return;
                    };
                    let connection = builder
                        .serve_connection_with_upgrades(TokioIo::new(stream), service)
                        .into_owned();
                    watcher.watch(connection).await
                }
            };
            if let Err(err) = result {
                tracing::debug!(%peer, error = %err, "connection ended with an error");
            }
            drop(slot);
        });
    }

    drop(listener);
    on_stop();
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after the shutdown grace period; closing them");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_overflow_answer_is_well_formed() {
        let text = std::str::from_utf8(TOO_MANY_CONNECTIONS).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(body.len(), length);
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["error"]["code"], "too_many_connections");
    }
}
