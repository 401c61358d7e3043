//! The connection to etcd and what its failures mean to us.
//!
//! Every etcd call goes through [`Store::call`], which bounds it by the request timeout and
//! sorts its error into [`StoreError`]. A timeout or a lost connection is never a grant: callers
//! turn [`StoreError::Unavailable`] into `503 store_unavailable`.
//!
//! **Any request we sent may be applied later, or never, whatever answer we gave.** A timed-out
//! call may sit in a stalled member and be applied seconds later. So the store also tracks the
//! highest etcd revision it has seen ([`Store::known_revision`]): a write that must not land
//! after something else happened compares `mod_revision <= known revision at send time`, and
//! whatever must invalidate it writes the key it compares (see `docs/design.md`, "Late writes").

use std::future::Future;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use etcd_client::{
    Client, ConnectOptions, GetOptions, GetResponse, LeaseGrantResponse, LeaseTimeToLiveOptions,
    LeaseTimeToLiveResponse, PutOptions, Txn, TxnResponse,
};
use tokio::time::Instant;
use tracing::Instrument;

use crate::batch::Batcher;
use crate::keys::LeaseId;
use crate::metrics;
use crate::txn_channel::{TxnChannel, TxnRoute};

/// Why etcd did not do what we asked.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// etcd says the lease does not exist (expired or revoked).
    #[error("lease not found")]
    LeaseNotFound,
    /// etcd says a lease with the requested id exists already (a retried grant).
    #[error("lease already exists")]
    LeaseExists,
    /// etcd could not be reached, timed out, or failed; nothing may be concluded.
    #[error("etcd unavailable: {0}")]
    Unavailable(String),
    /// Not sent: admission control shed the request, or etcd refused it unapplied ("too many
    /// requests"). Retry later.
    #[error("overloaded: {0}")]
    Overloaded(String),
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
            E::GRpcStatus(status) if status.message().contains("lease already exists") => {
                StoreError::LeaseExists
            }
            // etcd refuses before proposing when its apply loop lags: nothing was applied.
            E::GRpcStatus(status) if status.message().contains("too many requests") => {
                StoreError::Overloaded(status.message().to_owned())
            }
            _ => StoreError::Unavailable(err.to_string()),
        }
    }
}

/// How long an endpoint whose call failed is passed over (unless every endpoint is).
const SUSPECT_FOR: Duration = Duration::from_secs(5);

/// HTTP/2 keep-alive ping interval towards etcd: twice etcd's default minimum of 5 s.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);

/// How long a keep-alive ping may go unanswered before the connection counts as dead.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// A cloneable handle on the etcd cluster (clones share the connections).
///
/// One client per endpoint, used in turn, skipping endpoints whose last call failed within
/// five seconds. etcd-client's own balancing cannot tell a stalled member (`SIGSTOP`, a
/// frozen VM: TCP still connects, nothing answers) from a healthy one, so a third of all calls
/// would wait for the timeout while one member of three is stalled. Every member serves the same
/// linearizable cluster, so which one answers does not matter for correctness.
#[derive(Clone)]
pub struct Store {
    admission: crate::admission::Admission,
    endpoints: Arc<[Endpoint]>,
    next: Arc<AtomicUsize>,
    request_timeout: Duration,
    /// The highest revision any etcd answer (or the watch) has shown us.
    known_revision: Arc<AtomicI64>,
    /// Whether [`Store::batched_txn`] batches (`--group-commit`); off: every txn alone.
    group_commit: bool,
    /// Whether txns take an endpoint's lean channel where it has one (`--lean-etcd-channel`).
    lean_channel: bool,
}

struct Endpoint {
    client: Client,
    /// The lean channel for this endpoint's txns (`txn_channel.rs`), where it serves it (no etcd
    /// user; `http://`, or `https://` with etcd's CA).
    lean: Option<Arc<TxnChannel>>,
    /// Group commit of lock txns sent to this endpoint (`batch.rs`), started on first use: never
    /// while group commit is off.
    batcher: OnceLock<Batcher>,
    /// Until when this endpoint is passed over, as an offset from `since` in milliseconds.
    suspect_until_ms: AtomicU64,
    since: std::time::Instant,
}

impl Endpoint {
    fn is_suspect(&self) -> bool {
        self.since.elapsed().as_millis() < u128::from(self.suspect_until_ms.load(Ordering::Relaxed))
    }

    fn suspect(&self) {
        let until = self.since.elapsed() + SUSPECT_FOR;
        self.suspect_until_ms.store(
            until.as_millis().try_into().unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }
}

impl Store {
    /// Connects lazily: this succeeds even when etcd is down, so the server can start and report
    /// itself not ready until etcd answers.
    pub async fn connect(
        endpoints: &[String],
        request_timeout: Duration,
        security: &crate::EtcdSecurity,
    ) -> Result<Self, StoreError> {
        let connect_timeout = request_timeout.min(Duration::from_secs(2));
        let mut options = ConnectOptions::new()
            .with_connect_timeout(connect_timeout)
            .with_timeout(request_timeout)
            // Detect a stalled member (paused, partitioned) on long-lived watch streams. Not more
            // often than etcd's default `--grpc-keepalive-min-time` (5 s): a client that pings
            // faster gets GOAWAY ("too many pings"), which tears down the connection and every
            // call and watch on it.
            .with_keep_alive(KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT)
            .with_keep_alive_while_idle(true)
            // A member cut off from its leader must not serve our watch: etcd cancels it and we
            // re-establish it elsewhere.
            .with_require_leader(true)
            .with_auto_token_refresh(true);
        if let Some(tls) = tls_options(security)? {
            options = options.with_tls(tls);
        }
        // etcd's token authentication stays with etcd-client, which keeps the token fresh: no
        // lean channel then, and no TLS set up for one.
        let lean_tls = match security.user {
            None => crate::txn_channel::client_tls(security).map_err(StoreError::Unavailable)?,
            Some(_) => None,
        };
        let mut clients = Vec::with_capacity(endpoints.len());
        for endpoint in endpoints {
            let client = Client::connect([endpoint], Some(options.clone()))
                .await
                .map_err(StoreError::from)?;
            // etcd authenticates at connect time, which would fail while etcd is down; the
            // server must start anyway (not ready until etcd answers). So the credentials are
            // given in the background, retried until etcd accepts them; until then every call
            // is refused and answered 503.
            if let Some(user) = security.user.clone() {
                let mut authenticating = client.clone();
                tokio::spawn(async move {
                    let mut pause = Duration::from_millis(100);
                    while let Err(err) = authenticating.update_user(Some(user.clone())).await {
                        tracing::debug!(error = %err, "etcd authentication failed; retrying");
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_secs(2));
                    }
                });
            }
            let lean = match security.user {
                None => TxnChannel::new(endpoint, connect_timeout, lean_tls.clone()).map(Arc::new),
                Some(_) => None,
            };
            clients.push(Endpoint {
                batcher: OnceLock::new(),
                lean,
                client,
                suspect_until_ms: AtomicU64::new(0),
                since: std::time::Instant::now(),
            });
        }
        if clients.is_empty() {
            return Err(StoreError::Unavailable("no etcd endpoint given".into()));
        }
        Ok(Self {
            admission: crate::admission::Admission::default(),
            endpoints: clients.into(),
            next: Arc::new(AtomicUsize::new(0)),
            request_timeout,
            known_revision: Arc::new(AtomicI64::new(0)),
            group_commit: false,
            lean_channel: true,
        })
    }

    /// The same store, sending txns over the lean channel (where it serves an endpoint) or not.
    pub fn with_lean_channel(mut self, on: bool) -> Self {
        self.lean_channel = on;
        self
    }

    /// Where txns to `endpoint` go.
    fn txn_route(&self, endpoint: &Endpoint) -> TxnRoute {
        match &endpoint.lean {
            Some(channel) if self.lean_channel => TxnRoute::Lean(channel.clone()),
            _ => TxnRoute::Client(Box::new(endpoint.client.clone())),
        }
    }

    /// The same store, with group commit on or off (`batch.rs`; off unless asked for).
    pub fn with_group_commit(mut self, on: bool) -> Self {
        self.group_commit = on;
        self
    }

    /// The highest etcd revision seen so far. Every write applied after a request is sent gets a
    /// higher revision than the value read before sending it, which is what late-write fences
    /// compare against.
    pub fn known_revision(&self) -> i64 {
        self.known_revision.load(Ordering::Acquire)
    }

    /// Notes a revision read from an etcd answer or watch event.
    pub fn saw_revision(&self, revision: i64) {
        self.known_revision.fetch_max(revision, Ordering::AcqRel);
    }

    /// How many endpoints there are: how many attempts reach each of them once.
    pub fn endpoint_count(&self) -> usize {
        self.endpoints.len()
    }

    /// The next endpoint in turn that is not suspect (any, if all are).
    fn pick(&self) -> usize {
        let n = self.endpoints.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .map(|i| (start + i) % n)
            .find(|&i| !self.endpoints[i].is_suspect())
            .unwrap_or(start % n)
    }

    /// A raw client on a healthy endpoint, with the endpoint's index for
    /// [`Store::suspect`]: for the long-lived watch. One-shot calls go through the typed methods
    /// below, which bound, classify, trace and time them.
    pub fn pick_client(&self) -> (usize, Client) {
        let at = self.pick();
        (at, self.endpoints[at].client.clone())
    }

    /// Passes over endpoint `at` for a while (its watch broke, or a call to it failed).
    pub fn suspect(&self, at: usize) {
        if self.endpoints.len() > 1 {
            self.endpoints[at].suspect();
        }
    }

    /// Runs one etcd call, bounded by the request timeout, with its error classified, inside an
    /// `etcd` span, and timed into `leasehold_etcd_request_duration_seconds{op}`.
    async fn call<T, E, F, Fut>(
        &self,
        at: usize,
        op: &'static str,
        target: &str,
        call: F,
    ) -> Result<T, StoreError>
    where
        T: AtRevision,
        F: FnOnce(&Endpoint) -> Fut,
        Fut: Future<Output = Result<T, E>>,
        StoreError: From<E>,
    {
        let span = tracing::info_span!(
            "etcd",
            otel.name = %format!("etcd {op}"),
            otel.kind = "client",
            db.system = "etcd",
            op,
            target,
            revision = tracing::field::Empty,
        );
        let record = span.clone();
        let permit = self
            .admission
            .admit()
            .await
            .map_err(|shed| StoreError::Overloaded(shed.to_string()))?;
        let started = Instant::now();
        // Boxed: etcd-client's futures are tens of KiB, and every future awaiting this one would
        // otherwise carry that inline. A queued acquire then costs ~165 KiB instead of a few KiB.
        // The call is made (and its client cloned) only here, once admitted: a call queued under
        // the admission limit holds just its arguments.
        let call = Box::pin(call(&self.endpoints[at]).instrument(span));
        let result = match tokio::time::timeout(self.request_timeout, call).await {
            Ok(result) => result.map_err(StoreError::from),
            Err(_) => Err(StoreError::Unavailable(format!(
                "no answer within {}",
                humantime::format_duration(self.request_timeout)
            ))),
        };
        if let Some(revision) = result.as_ref().ok().and_then(AtRevision::revision) {
            record.record("revision", revision);
            self.saw_revision(revision);
        }
        let answered = !matches!(result, Err(StoreError::Unavailable(_)));
        if !answered {
            self.suspect(at);
        }
        if matches!(result, Err(StoreError::Overloaded(_))) {
            metrics::etcd_overloaded();
        }
        // A timeout or "too many requests" is etcd pushing back: the limit halves.
        permit.finish(matches!(
            result,
            Err(StoreError::Unavailable(_) | StoreError::Overloaded(_))
        ));
        metrics::etcd_call(op, started.elapsed(), answered);
        result
    }

    /// A transaction; `target` names the key or prefix it is about, for traces.
    pub async fn txn(&self, target: &str, txn: Txn) -> Result<TxnResponse, StoreError> {
        let at = self.pick();
        self.call(at, "txn", target, |endpoint: &Endpoint| {
            let route = self.txn_route(endpoint);
            async move { route.txn(txn).await }
        })
        .await
    }

    /// A txn about `group` alone (one lock, or one lease), which may share one etcd request
    /// with txns about other groups when group commit is on (`batch.rs`, where the rule for what
    /// may be sent this way is). Its answer and its guarantees are those of [`Store::txn`].
    pub async fn batched_txn(
        &self,
        group: &str,
        target: &str,
        txn: Txn,
    ) -> Result<TxnResponse, StoreError> {
        if !self.group_commit {
            return self.txn(target, txn).await;
        }
        let at = self.pick();
        let timeout = self.request_timeout;
        self.call(at, "txn", target, move |endpoint| {
            let batcher = endpoint
                .batcher
                .get_or_init(|| Batcher::start(self.txn_route(endpoint), timeout))
                .clone();
            let group = group.to_owned();
            async move { batcher.txn(group, txn).await }
        })
        .await
    }

    /// A range read.
    pub async fn get(
        &self,
        key: &str,
        options: Option<GetOptions>,
    ) -> Result<GetResponse, StoreError> {
        let at = self.pick();
        let owned = key.to_owned();
        self.call(
            at,
            "get",
            key,
            with_client(move |mut client| async move { client.get(owned, options).await }),
        )
        .await
    }

    /// A write.
    pub async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        options: Option<PutOptions>,
    ) -> Result<(), StoreError> {
        let at = self.pick();
        let owned = key.to_owned();
        self.call(
            at,
            "put",
            key,
            with_client(move |mut client| async move { client.put(owned, value, options).await }),
        )
        .await
        .map(drop)
    }

    /// Grants lease `id` for `ttl_secs` seconds (etcd may raise it to its minimum); `LeaseExists`
    /// if it exists already.
    pub async fn lease_grant(
        &self,
        id: LeaseId,
        ttl_secs: i64,
    ) -> Result<LeaseGrantResponse, StoreError> {
        let at = self.pick();
        let options = etcd_client::LeaseGrantOptions::new().with_id(id.as_i64());
        self.call(
            at,
            "lease_grant",
            &id.to_string(),
            with_client(move |mut client| async move {
                client.lease_grant(ttl_secs, Some(options)).await
            }),
        )
        .await
    }

    /// A txn retried on the next endpoint while etcd gives no answer, up to `rounds` times over
    /// every endpoint: for writes whose outcome we must learn (clean-ups, releases). Only for txns
    /// that are harmless when applied twice or late (every attempt may still land). With a
    /// `group`, each attempt is a [`Store::batched_txn`] of that group.
    pub async fn txn_until_answered(
        &self,
        group: Option<&str>,
        target: &str,
        txn: Txn,
        rounds: usize,
    ) -> Result<TxnResponse, StoreError> {
        let attempts = self.endpoints.len() * rounds.max(1);
        let mut last = None;
        for _ in 0..attempts {
            let attempt = match group {
                Some(group) => self.batched_txn(group, target, txn.clone()).await,
                None => self.txn(target, txn.clone()).await,
            };
            match attempt {
                Err(err @ StoreError::Unavailable(_)) => last = Some(err),
                other => return other,
            }
        }
        Err(last.expect("at least one attempt"))
    }

    /// Revokes a lease and, with it, every key attached to it.
    pub async fn lease_revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        let at = self.pick();
        self.call(
            at,
            "lease_revoke",
            &lease.to_string(),
            with_client(move |mut client| async move { client.lease_revoke(lease.as_i64()).await }),
        )
        .await
        .map(drop)
    }

    /// Refreshes a lease once. etcd-client sends one keep-alive and waits for its answer; a TTL
    /// of 0 (lease gone) comes back as `LeaseNotFound`.
    pub async fn lease_keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        let at = self.pick();
        self.call(
            at,
            "lease_keepalive",
            &lease.to_string(),
            with_client(
                move |mut client| async move { client.lease_keep_alive(lease.as_i64()).await },
            ),
        )
        .await
        .map(drop)
    }

    /// A lease's granted and remaining TTL (`ttl() < 0`: no such lease), with its keys if asked.
    pub async fn lease_time_to_live(
        &self,
        lease: LeaseId,
        with_keys: bool,
    ) -> Result<LeaseTimeToLiveResponse, StoreError> {
        let at = self.pick();
        let options = with_keys.then(|| LeaseTimeToLiveOptions::new().with_keys());
        self.call(
            at,
            "lease_ttl",
            &lease.to_string(),
            with_client(move |mut client| async move {
                client.lease_time_to_live(lease.as_i64(), options).await
            }),
        )
        .await
    }
}

/// Adapts a call on an etcd client to [`Store::call`], which picks the endpoint.
fn with_client<T, F, Fut>(call: F) -> impl FnOnce(&Endpoint) -> Fut
where
    F: FnOnce(Client) -> Fut,
    Fut: Future<Output = Result<T, etcd_client::Error>>,
{
    move |endpoint| call(endpoint.client.clone())
}

/// etcd-client's TLS options for `security`, if it asks for TLS.
fn tls_options(
    security: &crate::EtcdSecurity,
) -> Result<Option<etcd_client::TlsOptions>, StoreError> {
    if security.ca_file.is_none() && security.client_cert.is_none() {
        return Ok(None);
    }
    let read = |path: &std::path::Path| {
        std::fs::read(path)
            .map_err(|err| StoreError::Unavailable(format!("reading {}: {err}", path.display())))
    };
    let mut tls = etcd_client::TlsOptions::new();
    if let Some(ca) = &security.ca_file {
        tls = tls.ca_certificate(etcd_client::Certificate::from_pem(read(ca)?));
    }
    if let Some((cert, key)) = &security.client_cert {
        tls = tls.identity(etcd_client::Identity::from_pem(read(cert)?, read(key)?));
    }
    Ok(Some(tls))
}

/// The etcd revision an answer was read or written at, for the call's span.
trait AtRevision {
    fn revision(&self) -> Option<i64> {
        None
    }
}

macro_rules! at_header_revision {
    ($($response:ty),*) => {$(
        impl AtRevision for $response {
            fn revision(&self) -> Option<i64> {
                self.header().map(|h| h.revision())
            }
        }
    )*};
}

at_header_revision!(
    TxnResponse,
    GetResponse,
    etcd_client::PutResponse,
    LeaseGrantResponse,
    etcd_client::LeaseRevokeResponse,
    LeaseTimeToLiveResponse
);

/// A keep-alive answer carries no revision.
impl AtRevision for (etcd_client::LeaseKeeper, etcd_client::LeaseKeepAliveStream) {}
