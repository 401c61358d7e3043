//! Leasehold server: fencing-token locks and TTL leases over HTTP, with every piece of state in
//! etcd. Any replica answers any request; a killed replica loses nothing.
//!
//! # Layout
//! - `keys`: the etcd key schema and lock-name encoding (every key we write, in one place).
//! - `queue`: the queue core every primitive shares (enqueue, decisive read, waking, clean-up,
//!   one-txn release and renew) and the late-write fences.
//! - `lock`: mutexes, semaphores and read-write locks by name, and lock status.
//! - `group`: all-or-nothing acquires of several names.
//! - `election`: leader election on the same queue; the leader's token is its epoch.
//! - `lease`: TTL leases (grant, keep alive, inspect, revoke).
//! - `handle`: lease handles, the secrets that authorize acting on a lease and its holds.
//! - `tenants`: bearer tokens, tenants, their lock-name prefixes and quotas.
//! - `wakeups`: the one shared etcd watch that wakes waiters.
//! - `watch`: status streams for clients (Server-Sent Events), resumable by revision.
//! - `store`: the etcd connection: every call typed, bounded, classified, traced and timed.
//! - `admission`: the adaptive bound on etcd calls in flight; sheds new requests early.
//! - `metrics`: every Prometheus metric, named once, and the `/metrics` renderer.
//! - `service`: the shared context and outcome types of the operations above.
//! - `http`: the HTTP API v1 (routes, extractors, the error-to-status mapping).
//! - `cli`: the `leasehold-server` command line and process lifecycle.
//! - `telemetry`: logs, and OTLP trace export when `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
//!
//! # Usage
//! ```no_run
//! # async fn example() -> std::io::Result<()> {
//! let config = leasehold_server::Config::default(); // etcd at 127.0.0.1:2379
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:7070").await?;
//! leasehold_server::run(listener, config, async {
//!     let _ = tokio::signal::ctrl_c().await;
//! })
//! .await
//! # }
//! ```

mod admission;
pub mod batch;
pub mod cli;
mod delay;
mod election;
pub mod group;
mod handle;
pub mod http;
mod keys;
mod lease;
mod lock;
pub mod metrics;
mod queue;
mod service;
mod sessions;
mod store;
mod telemetry;
mod tenants;
pub mod txn_channel;
mod wakeups;
mod watch;

use std::future::Future;
use std::time::Duration;

pub use delay::{MAX_LOCK_DELAY, shadow_lease_id, tombstone_txn};
pub use election::{Leader, Leadership};
pub use handle::{AuthDigest, Handle, InvalidHandle};
pub use http::tls::TlsFiles;
pub use http::{AppState, Limits, app, router_and_openapi};
pub use keys::{
    InvalidName, KeySchema, LeaseId, LeaseMeta, LockName, MAX_NAME_BYTES, TombstoneValue,
    WaiterValue,
};
pub use lease::{GrantedLease, LeaseInfo};
pub use lock::{AcquireRequest, Grant, LeaseChoice, LockStatus, LockSummary, QueueEntry, Renewal};
pub use queue::{Granted, Kind};
pub use service::{Holder, LeaseAuth, Service, ServiceError, ServiceInner};
pub use sessions::WAITING_ROOM;
pub use store::{Store, StoreError};
pub use tenants::{Quotas, Tenant, Tenants};

/// The allocator `leasehold-server` runs with (`#[global_allocator]` in its `main`).
///
/// jemalloc, built with background threads that purge memory freed more than a second ago
/// (`.cargo/config.toml`): after a burst of thousands of connections, glibc's allocator kept most of
/// the burst's peak resident, RSS growing burst after burst (50 to 97 MB over ten bursts of 2,000
/// connections); mimalloc held 65-110 MB however long the server idled; jemalloc with background
/// purging is back to ~20 MB within seconds of each burst (`tests/tests/burst_memory.rs`).
pub type Allocator = tikv_jemallocator::Jemalloc;

/// How long shutdown waits for background clean-ups (abandoned waits) to finish.
const CLEANUP_GRACE: Duration = Duration::from_secs(5);

/// How long shutdown waits for open connections (cancelled waits answer at once).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Server configuration.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Config {
    /// etcd client URLs, e.g. `http://127.0.0.1:2379`.
    pub etcd_endpoints: Vec<String>,
    /// Root of every key we write in etcd.
    pub prefix: String,
    /// Longest lease TTL granted.
    pub max_ttl: Duration,
    /// Longest acquire wait accepted.
    pub max_wait: Duration,
    /// Bound on every etcd call; past it the answer is `503 store_unavailable`.
    pub etcd_timeout: Duration,
    /// Open connections at most; more are answered `503 too_many_connections`.
    pub max_connections: usize,
    /// Time a client has to send its request headers before it is disconnected.
    pub header_read_timeout: Duration,
    /// Bearer tokens and tenants (JSON, see `tenants.rs`); `None`: no authentication.
    pub auth_file: Option<std::path::PathBuf>,
    /// Serve the API over HTTPS with this certificate and key (re-read on SIGHUP).
    pub tls: Option<http::tls::TlsFiles>,
    /// How to reach etcd securely: TLS (CA, client certificate) and user/password.
    pub etcd_security: EtcdSecurity,
    /// Group commit (`batch.rs`): send txns about different locks as one etcd txn. On by
    /// default: see `docs/performance.md`, "Group commit".
    pub group_commit: bool,
    /// Lock txns go to etcd over the lean channel (`txn_channel.rs`) where it serves the
    /// endpoint; off: through etcd-client. On by default.
    pub lean_etcd_channel: bool,
    /// Sessions (leases granted with `POST /v1/leases`) open through this replica at once; past
    /// it new ones wait for a place, then are shed (`sessions.rs`). 0: no bound.
    pub max_sessions: usize,
    /// Fault injection, for tests only (no command-line flag): waiters hear no wake-up, and find
    /// their turn only by re-reading, as when wake-ups arrive after a waiter's deadline under
    /// load.
    #[doc(hidden)]
    pub fault_waiters_miss_wakeups: bool,
}

/// TLS and authentication towards etcd.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct EtcdSecurity {
    /// PEM CA that signed etcd's certificates (for `https://` endpoints).
    pub ca_file: Option<std::path::PathBuf>,
    /// PEM client certificate and key, for etcd's `--client-cert-auth`.
    pub client_cert: Option<(std::path::PathBuf, std::path::PathBuf)>,
    /// etcd user and password (etcd's `auth enable`).
    pub user: Option<(String, String)>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            etcd_endpoints: vec!["http://127.0.0.1:2379".into()],
            prefix: "/leasehold".into(),
            max_ttl: Duration::from_secs(3600),
            max_wait: Duration::from_secs(300),
            etcd_timeout: Duration::from_secs(3),
            max_connections: 10_000,
            header_read_timeout: Duration::from_secs(10),
            auth_file: None,
            tls: None,
            etcd_security: EtcdSecurity::default(),
            group_commit: true,
            lean_etcd_channel: true,
            max_sessions: 0,
            fault_waiters_miss_wakeups: false,
        }
    }
}

impl Config {
    /// The same configuration with these etcd endpoints.
    pub fn with_etcd_endpoints(
        mut self,
        endpoints: impl IntoIterator<Item = impl Into<String>>,
    ) -> Self {
        self.etcd_endpoints = endpoints.into_iter().map(Into::into).collect();
        self
    }

    /// The same configuration with this key prefix.
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The same configuration with this etcd call timeout.
    pub fn with_etcd_timeout(mut self, timeout: Duration) -> Self {
        self.etcd_timeout = timeout;
        self
    }

    /// The same configuration with these connection limits.
    pub fn with_connection_limits(
        mut self,
        max_connections: usize,
        header_read_timeout: Duration,
    ) -> Self {
        self.max_connections = max_connections;
        self.header_read_timeout = header_read_timeout;
        self
    }

    /// The same configuration with this auth file (bearer tokens and tenants).
    pub fn with_auth_file(mut self, path: impl Into<std::path::PathBuf>) -> Self {
        self.auth_file = Some(path.into());
        self
    }

    /// The same configuration, serving HTTPS with this certificate chain and key (PEM).
    pub fn with_tls(
        mut self,
        cert: impl Into<std::path::PathBuf>,
        key: impl Into<std::path::PathBuf>,
    ) -> Self {
        self.tls = Some(http::tls::TlsFiles {
            cert: cert.into(),
            key: key.into(),
        });
        self
    }

    /// The same configuration with this way of reaching etcd securely.
    pub fn with_etcd_security(mut self, security: EtcdSecurity) -> Self {
        self.etcd_security = security;
        self
    }

    /// The same configuration with these TTL and wait maxima.
    pub fn with_limits(mut self, max_ttl: Duration, max_wait: Duration) -> Self {
        self.max_ttl = max_ttl;
        self.max_wait = max_wait;
        self
    }
}

/// Serves the API on `listener` until `shutdown` completes, then cancels every wait (each cleans
/// up its waiter key), finishes in-flight requests and waits for background clean-ups.
///
/// Starts even when etcd is down: `/readyz` says so until etcd answers.
pub async fn run(
    listener: tokio::net::TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let invalid = |err: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, err);
    let tenants = match &config.auth_file {
        Some(path) => Tenants::from_file(path).map_err(invalid)?,
        None => {
            tracing::warn!(
                "authentication is off (no --auth-file): anyone who can reach this server may use every lock name; fine on loopback, not on a network"
            );
            Tenants::open()
        }
    };
    let tls = config
        .tls
        .clone()
        .map(http::tls::ReloadableTls::load)
        .transpose()
        .map_err(invalid)?;
    let store = Store::connect(
        &config.etcd_endpoints,
        config.etcd_timeout,
        &config.etcd_security,
    )
    .await
    .map_err(|err| invalid(err.to_string()))?
    .with_group_commit(config.group_commit)
    .with_lean_channel(config.lean_etcd_channel);
    let service = Service::new(store, &config.prefix);
    if config.fault_waiters_miss_wakeups {
        tracing::warn!("fault injection: waiters miss every wake-up");
        service.wakeups.miss_every_wakeup();
    }
    // Two deployments whose prefixes nest would read each other's keys: refuse to start. If etcd
    // does not answer now, the check runs again until it does.
    let conflict = tokio_util::sync::CancellationToken::new();
    match service.register_prefix().await {
        Ok(()) => {}
        Err(ServiceError::Forbidden(why)) => return Err(invalid(why)),
        Err(err) => {
            tracing::warn!(error = %err, "etcd did not answer the prefix check; retrying in the background");
            let (service, conflict) = (service.clone(), conflict.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    match service.register_prefix().await {
                        Ok(()) => return,
                        Err(ServiceError::Forbidden(why)) => {
                            tracing::error!("{why}; shutting down");
                            conflict.cancel();
                            return;
                        }
                        Err(_) => {}
                    }
                }
            });
        }
    }
    service.start();
    let state = AppState {
        service: service.clone(),
        limits: Limits {
            max_ttl: config.max_ttl,
            max_wait: config.max_wait,
        },
        tenants: tenants.clone(),
        sessions: sessions::SessionCap::new(config.max_sessions),
    };
    let reload = tokio::spawn(reload_on_sighup(tenants, tls.clone()));
    let stopped_by_conflict = conflict.clone();
    let shutdown = async move {
        tokio::select! {
            () = shutdown => {}
            () = conflict.cancelled() => {}
        }
    };
    let stopping = service.clone();
    // Histogram samples wait in the recorder until upkeep folds them in; without scrapes they
    // would only accumulate.
    let upkeep = tokio::spawn(async {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            metrics::handle().run_upkeep();
        }
    });
    tracing::info!(addr = %listener.local_addr()?, etcd = ?config.etcd_endpoints, prefix = %config.prefix, "leasehold-server listening");
    let limits = http::serve::ConnectionLimits {
        max_connections: config.max_connections.max(1),
        header_read_timeout: config.header_read_timeout,
    };
    http::serve::serve(
        listener,
        app(state),
        limits,
        tls,
        shutdown,
        move || {
            tracing::info!("shutting down: cancelling waits");
            stopping.begin_shutdown();
        },
        SHUTDOWN_GRACE,
    )
    .await;
    upkeep.abort();
    reload.abort();
    service.finish_shutdown(CLEANUP_GRACE).await;
    tracing::info!("stopped");
    if stopped_by_conflict.is_cancelled() {
        return Err(invalid(format!(
            "another deployment's --prefix nests with {:?}",
            config.prefix
        )));
    }
    Ok(())
}

/// Re-reads the auth file and the TLS certificate on SIGHUP; what fails to load leaves the old
/// one in force.
async fn reload_on_sighup(tenants: Tenants, tls: Option<http::tls::ReloadableTls>) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hangups) = signal(SignalKind::hangup()) else {
        return;
    };
    while hangups.recv().await.is_some() {
        match tenants.reload() {
            Ok(count) if tenants.required() => {
                tracing::info!(tokens = count, "auth file reloaded")
            }
            Ok(_) => {}
            Err(err) => {
                tracing::error!(error = %err, "auth file not reloaded; the old one stays in force")
            }
        }
        if let Some(tls) = &tls {
            match tls.reload() {
                Ok(()) => tracing::info!("TLS certificate reloaded"),
                Err(err) => {
                    tracing::error!(error = %err, "TLS certificate not reloaded; the old one stays in force")
                }
            }
        }
    }
}
