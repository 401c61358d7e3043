//! The connection to etcd and what its failures mean to us.
//!
//! Every etcd call goes through [`Store::call`], which bounds it by the request timeout and
//! sorts its error into [`StoreError`]. A timeout or a lost connection is never a grant: callers
//! turn [`StoreError::Unavailable`] into `503 store_unavailable`.

use std::future::Future;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions};

/// Why etcd did not do what we asked.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// etcd says the lease does not exist (expired or revoked).
    #[error("lease not found")]
    LeaseNotFound,
    /// etcd could not be reached, timed out, or failed; nothing may be concluded.
    #[error("etcd unavailable: {0}")]
    Unavailable(String),
}

impl From<etcd_client::Error> for StoreError {
    fn from(err: etcd_client::Error) -> Self {
        use etcd_client::Error as E;
        match &err {
            // etcd answers `NotFound: etcdserver: requested lease not found`.
            E::GRpcStatus(status) if status.message().contains("lease not found") => {
                StoreError::LeaseNotFound
            }
            E::LeaseKeepAliveError(msg) if msg.contains("lease not found") => {
                StoreError::LeaseNotFound
            }
            _ => StoreError::Unavailable(err.to_string()),
        }
    }
}

/// A cloneable handle on the etcd cluster (clones share one pool of connections).
#[derive(Clone)]
pub struct Store {
    client: Client,
    request_timeout: Duration,
}

impl Store {
    /// Connects lazily: this succeeds even when etcd is down, so the server can start and report
    /// itself not ready until etcd answers.
    pub async fn connect(
        endpoints: &[String],
        request_timeout: Duration,
    ) -> Result<Self, StoreError> {
        let options = ConnectOptions::new()
            .with_connect_timeout(request_timeout.min(Duration::from_secs(2)))
            .with_timeout(request_timeout)
            // Detect a stalled member (paused, partitioned) on long-lived watch streams.
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
            .with_keep_alive_while_idle(true)
            // A member cut off from its leader must not serve our watch: etcd cancels it and we
            // re-establish it elsewhere.
            .with_require_leader(true);
        let client = Client::connect(endpoints, Some(options))
            .await
            .map_err(StoreError::from)?;
        Ok(Self {
            client,
            request_timeout,
        })
    }

    /// A client to issue calls with (cheap to clone).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// The bound on every single etcd call.
    pub fn request_timeout(&self) -> Duration {
        self.request_timeout
    }

    /// Runs one etcd call, bounded by the request timeout, with its error classified.
    pub async fn call<T, F>(&self, call: F) -> Result<T, StoreError>
    where
        F: Future<Output = Result<T, etcd_client::Error>>,
    {
        match tokio::time::timeout(self.request_timeout, call).await {
            Ok(result) => result.map_err(StoreError::from),
            Err(_) => Err(StoreError::Unavailable(format!(
                "no answer within {}",
                humantime::format_duration(self.request_timeout)
            ))),
        }
    }
}
