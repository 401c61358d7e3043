//! A TCP proxy whose link can be cut: every connection through it is closed, and new ones are
//! closed as soon as they are accepted, until the link is restored. The deterministic way to
//! break a long-lived stream (Server-Sent Events) and keep it broken while things change.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Result;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A cuttable proxy to one address; stops when dropped.
pub struct CutProxy {
    addr: SocketAddr,
    open: Arc<AtomicBool>,
    /// Bumped by every cut: each relay ends when it changes.
    cuts: watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl CutProxy {
    /// Starts a proxy to `target` (`http://127.0.0.1:PORT` or `127.0.0.1:PORT`), open.
    pub async fn start(target: &str) -> Result<Self> {
        let target: SocketAddr = target
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .parse()?;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let open = Arc::new(AtomicBool::new(true));
        let (cuts, _) = watch::channel(0u64);
        let task = tokio::spawn({
            let (open, cuts) = (open.clone(), cuts.clone());
            async move {
                while let Ok((mut client, _)) = listener.accept().await {
                    // Subscribed before the check: a cut after the check still ends this relay.
                    let mut cut = cuts.subscribe();
                    if !open.load(Ordering::SeqCst) {
                        drop(client); // cut: closed at once
                        continue;
                    }
                    tokio::spawn(async move {
                        let Ok(mut server) = TcpStream::connect(target).await else {
                            return;
                        };
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                            _ = cut.changed() => {}
                        }
                    });
                }
            }
        });
        Ok(Self {
            addr,
            open,
            cuts,
            task,
        })
    }

    /// The proxy's URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Closes every connection through the proxy, and every new one, until [`CutProxy::restore`].
    pub fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        self.cuts.send_modify(|n| *n += 1);
    }

    /// Lets connections through again.
    pub fn restore(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.task.abort();
        self.cuts.send_modify(|n| *n += 1);
    }
}
