//! The client: endpoints, timeouts, retries and fail-over, over one pooled HTTP/1.1 client.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use reqwest::Method;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::time::Instant;

use crate::error::{Error, from_response};
use crate::lease::Handle;
use crate::retry::{Pacing, RetryBudget, RetryPolicy, jitter, parse_retry_after};

/// The request header that carries a lease's handle.
pub(crate) const HANDLE_HEADER: &str = "Leasehold-Handle";

/// Configures a [`Client`]; start from [`Client::builder`].
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    endpoints: Vec<String>,
    request_timeout: Duration,
    connect_timeout: Duration,
    retry: RetryPolicy,
    budget: Option<RetryBudget>,
    safety_margin: Option<Duration>,
    bearer_token: Option<Secret>,
    root_certificates: Vec<Vec<u8>>,
}

impl Default for ClientBuilder {
    fn default() -> Self {
        Self {
            endpoints: Vec::new(),
            request_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(1),
            retry: RetryPolicy::default(),
            budget: None,
            safety_margin: None,
            bearer_token: None,
            root_certificates: Vec::new(),
        }
    }
}

/// A string that must not show up in logs: `Debug` prints a placeholder.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Secret(pub(crate) String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<secret>")
    }
}

impl ClientBuilder {
    /// Adds a server endpoint (`http://host:port`, `https://host:port`, or a bare `host:port`,
    /// which means `http://`); add several for fail-over, in order of preference.
    pub fn endpoint(mut self, url: impl Into<String>) -> Self {
        let url = url.into();
        let url = url.trim().trim_end_matches('/');
        let url = if url.contains("://") {
            url.to_owned()
        } else {
            format!("http://{url}")
        };
        self.endpoints.push(url);
        self
    }

    /// The bearer token sent as `Authorization: Bearer <token>` (servers with an auth file
    /// require one).
    pub fn bearer_token(mut self, token: impl Into<String>) -> Self {
        self.bearer_token = Some(Secret(token.into().trim().to_owned()));
        self
    }

    /// Trusts this CA certificate (PEM) for `https://` endpoints, besides nothing else: for
    /// servers with a certificate of a private CA.
    pub fn root_certificate_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.root_certificates.push(pem.into());
        self
    }

    /// Adds several endpoints.
    pub fn endpoints(mut self, urls: impl IntoIterator<Item = impl Into<String>>) -> Self {
        for url in urls {
            self = self.endpoint(url);
        }
        self
    }

    /// Bound on one HTTP attempt, not counting an acquire's deliberate wait in line (default
    /// 5 s). Past it the attempt is abandoned and retried on the next endpoint. Renewals and
    /// keep-alives use less when their hold's timer is closer: each attempt gets at most its
    /// share of the time left, so a hung replica never uses up the time the next one needs.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Bound on opening a connection (default 1 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How to retry (default [`RetryPolicy::default`]).
    pub fn retry_policy(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// The retry budget (default: a [`RetryBudget::default`] of this client's own). Give
    /// several clients clones of one budget to bound their retries together.
    pub fn retry_budget(mut self, budget: RetryBudget) -> Self {
        self.budget = Some(budget);
        self
    }

    /// The client-side lease timer's safety margin: a hold counts as lost at `send time of the
    /// last confirmed renewal + TTL - margin`. Default: a tenth of the TTL, at least 250 ms, at
    /// most half the TTL.
    pub fn safety_margin(mut self, margin: Duration) -> Self {
        self.safety_margin = Some(margin);
        self
    }

    /// Builds the client. Fails on no endpoints or a URL that is not `http(s)://...`.
    pub fn build(self) -> Result<Client, Error> {
        if self.endpoints.is_empty() {
            return Err(Error::client_input("no endpoints given"));
        }
        let mut tls = false;
        for url in &self.endpoints {
            let parsed = reqwest::Url::parse(url)
                .map_err(|err| Error::client_input(format!("endpoint {url:?}: {err}")))?;
            if !matches!(parsed.scheme(), "http" | "https") {
                return Err(Error::client_input(format!(
                    "endpoint {url:?}: scheme must be http or https"
                )));
            }
            tls |= parsed.scheme() == "https";
        }
        // One pooled HTTP/1.1 client: connections stay open between renewals (no handshake
        // per request), and a request can be abandoned by closing its connection, which the
        // server takes as "stop waiting".
        let mut http = reqwest::Client::builder()
            .http1_only()
            .connect_timeout(self.connect_timeout)
            .pool_idle_timeout(Duration::from_secs(60))
            .tcp_nodelay(true);
        for pem in &self.root_certificates {
            let certificate = reqwest::Certificate::from_pem(pem)
                .map_err(|err| Error::client_input(format!("CA certificate: {err}")))?;
            http = http.tls_certs_only([certificate]);
        }
        if self.root_certificates.is_empty() && !tls {
            // No TLS will be spoken: skip loading the system's CA certificates, which costs
            // about 3 ms a client (a program with thousands of clients, such as the demo's
            // flash sale, would spend seconds of CPU on it).
            http = http.tls_certs_only([]);
        }
        let http = http
            .build()
            .map_err(|err| Error::client_input(format!("HTTP client: {err}")))?;
        Ok(Client {
            inner: Arc::new(Inner {
                http,
                pacing: Pacing::new(self.endpoints.len()),
                endpoints: self.endpoints,
                preferred: AtomicUsize::new(0),
                request_timeout: self.request_timeout,
                retry: self.retry,
                budget: self.budget.unwrap_or_default(),
                safety_margin: self.safety_margin,
                bearer_token: self.bearer_token,
                server_max_wait_ms: AtomicU64::new(DEFAULT_SERVER_WAIT.as_millis() as u64),
                failovers: AtomicU64::new(0),
            }),
        })
    }
}

/// A Leasehold client. Cheap to clone; clones share connections and the preferred endpoint.
#[derive(Debug, Clone)]
pub struct Client {
    pub(crate) inner: Arc<Inner>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    http: reqwest::Client,
    endpoints: Vec<String>,
    /// The endpoint that answered last: requests start there, so a client sticks to a live
    /// replica instead of re-probing a dead one each time.
    preferred: AtomicUsize,
    pub(crate) request_timeout: Duration,
    retry: RetryPolicy,
    budget: RetryBudget,
    /// When each endpoint may be asked again (`Retry-After`).
    pacing: Pacing,
    pub(crate) safety_margin: Option<Duration>,
    bearer_token: Option<Secret>,
    /// The longest wait one acquire request asks of a server: longer waits are chained from
    /// several requests. Lowered when a server answers that its `--max-wait` is smaller.
    server_max_wait_ms: AtomicU64,
    /// Calls answered by an endpoint after an attempt at another one failed.
    failovers: AtomicU64,
}

/// The longest wait one acquire request asks for at first (servers allow 5 min by default).
/// Shorter than the servers' limit on purpose: a replica that hangs in the middle of a wait is
/// noticed, and the wait moved to another, within this time plus the request timeout.
pub(crate) const DEFAULT_SERVER_WAIT: Duration = Duration::from_secs(30);

/// An attempt with less time than this before its deadline is not worth sending.
const MIN_ATTEMPT: Duration = Duration::from_millis(20);

impl Inner {
    /// The longest wait to ask of a server in one request.
    pub(crate) fn server_max_wait(&self) -> Duration {
        Duration::from_millis(self.server_max_wait_ms.load(Ordering::Relaxed))
    }

    /// A server said its longest wait is `max`.
    pub(crate) fn lower_server_max_wait(&self, max: Duration) {
        let ms = (max.as_millis() as u64).max(1);
        self.server_max_wait_ms.fetch_min(ms, Ordering::Relaxed);
    }
}

impl Client {
    /// A client for one endpoint with default settings, e.g. `Client::new("http://127.0.0.1:7070")`.
    pub fn new(endpoint: impl Into<String>) -> Result<Self, Error> {
        Self::builder().endpoint(endpoint).build()
    }

    /// A builder for endpoints, timeouts and retries.
    pub fn builder() -> ClientBuilder {
        ClientBuilder::default()
    }

    /// The endpoints, in order of preference.
    pub fn endpoints(&self) -> &[String] {
        &self.inner.endpoints
    }

    /// Fail-overs so far: calls (of this client and its clones, background renewals and
    /// keep-alives included) that an endpoint answered with success after an attempt of the
    /// same call at *another* endpoint had failed (refused connection, timeout, reset, `503`,
    /// overload). A call that succeeds on a second try at the same endpoint is not one, nor is
    /// a call that fails everywhere, nor a final error answer (`lock_held`, ...) from the
    /// second endpoint: only requests another replica actually served.
    pub fn failovers(&self) -> u64 {
        self.inner.failovers.load(Ordering::Relaxed)
    }

    /// Opens a connection ahead of need: asks the preferred endpoint's `/healthz` (failing over
    /// like any call) and keeps the connection pooled, so that the next request, on that
    /// endpoint, skips the TCP (and TLS) handshake. For a program that must act the instant
    /// something happens, such as a buyer waiting on an on-sale's page, or a fleet of clients
    /// whose connects would otherwise all land in the same second. Answered by the server
    /// process alone: it costs etcd nothing.
    pub async fn warm_up(&self) -> Result<(), Error> {
        let _: Value = self
            .call(Method::GET, "/healthz", None, None, || {
                (None, Duration::ZERO)
            })
            .await?;
        Ok(())
    }

    /// A call succeeded at endpoint `index` after failed attempts at `failed`: count a
    /// fail-over if any of those was another endpoint.
    fn note_answer(&self, index: usize, failed: &[usize]) {
        if failed.iter().any(|&f| f != index) {
            self.inner.failovers.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Sends a request with fail-over and returns the decoded 2xx body.
    ///
    /// `attempt` gives each attempt's body and extra timeout (an acquire's remaining wait), so
    /// retries can shrink the wait. With a `deadline` (a renewal must be confirmed before its
    /// hold's timer runs out), no attempt starts too late to finish before it, and each gets at
    /// most its share of the time left, so that every endpoint can still be tried.
    pub(crate) async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        handle: Option<&Handle>,
        deadline: Option<Instant>,
        attempt: impl Fn() -> (Option<Value>, Duration),
    ) -> Result<T, Error> {
        self.call_noting(method, path, handle, deadline, attempt, None)
            .await
    }

    /// [`Client::call`], also noting in `maybe_acted` (when given) whether any attempt may have
    /// acted on a server: one that timed out or lost its connection after sending, or was
    /// answered with a 5xx other than shedding. An attempt shed (`overloaded`), refused (4xx), or
    /// refused its connection did nothing.
    pub(crate) async fn call_noting<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        handle: Option<&Handle>,
        deadline: Option<Instant>,
        attempt: impl Fn() -> (Option<Value>, Duration),
        maybe_acted: Option<&AtomicBool>,
    ) -> Result<T, Error> {
        let bytes = self
            .call_raw(method, path, handle, deadline, attempt, maybe_acted)
            .await?;
        let bytes = if bytes.is_empty() {
            &b"null"[..]
        } else {
            &bytes[..]
        };
        serde_json::from_slice(bytes).map_err(|err| Error::Unexpected {
            status: 200,
            code: None,
            message: format!("undecodable answer to {path}: {err}"),
        })
    }

    async fn call_raw(
        &self,
        method: Method,
        path: &str,
        handle: Option<&Handle>,
        deadline: Option<Instant>,
        attempt: impl Fn() -> (Option<Value>, Duration),
        maybe_acted: Option<&AtomicBool>,
    ) -> Result<Vec<u8>, Error> {
        let note_acted = || {
            if let Some(flag) = maybe_acted {
                flag.store(true, Ordering::Relaxed);
            }
        };
        let inner = &self.inner;
        let n = inner.endpoints.len();
        let attempts = (inner.retry.max_attempts as usize).max(n);
        inner.budget.deposit();
        let mut cursor = inner.preferred.load(Ordering::Relaxed);
        let (mut round, mut tried_in_round) = (0u32, 0usize);
        let mut last_error = None;
        let mut last_error_refused = false;
        // Whether the last attempt failed before its request left this client (connection
        // refused, TLS handshake failed): its retry costs no server any work, so, like gRPC's
        // transparent retries, it spends no budget. A fleet of callers whose replica was just
        // killed must all be able to move to another one.
        let mut last_never_sent = false;
        // The endpoints whose attempts failed, to count a fail-over when another answers.
        let mut failed = Vec::new();
        for i in 0..attempts {
            let (index, not_before) = inner.pacing.pick(cursor);
            cursor = index + 1;
            let now = Instant::now();
            // An endpoint that asked for a pause gets it, plus a jitter so that the clients it
            // told the same do not all come back in the same instant.
            let mut pause = not_before.map_or(Duration::ZERO, |t| {
                t.saturating_duration_since(now) + jitter(inner.retry.backoff)
            });
            if tried_in_round == n {
                round += 1;
                tried_in_round = 0;
                pause = pause.max(inner.retry.pause_before_round(round));
            }
            tried_in_round += 1;
            if let Some(deadline) = deadline
                && now + pause + MIN_ATTEMPT > deadline
            {
                tracing::debug!(%path, "no time left for another attempt before the deadline");
                break;
            }
            if i > 0 && !last_never_sent && !inner.budget.try_withdraw() {
                tracing::info!(%path, "retry budget spent: not retrying");
                break;
            }
            if !pause.is_zero() {
                tracing::debug!(%path, pause = ?pause, "pausing before the next attempt");
                tokio::time::sleep(pause).await;
            }
            let endpoint = &inner.endpoints[index];
            let (body, extra) = attempt();
            let mut timeout = inner.request_timeout + extra;
            if let Some(deadline) = deadline {
                // Leave each endpoint not yet tried in this round an equal share.
                let left = deadline.saturating_duration_since(Instant::now());
                let sharing = (n + 1 - tried_in_round).min(attempts - i).max(1);
                timeout = timeout.min(left / sharing as u32);
            }
            let mut request = inner
                .http
                .request(method.clone(), format!("{endpoint}{path}"))
                .timeout(timeout);
            if let Some(body) = body {
                request = request.json(&body);
            }
            if let Some(handle) = handle {
                request = request.header(HANDLE_HEADER, handle.reveal());
            }
            request = self.authorize(request);
            let sent = Instant::now();
            let mut never_sent = false;
            let outcome = async {
                let response = request.send().await?;
                let status = response.status().as_u16();
                let retry_after = retry_after_of(&response);
                Ok::<_, reqwest::Error>((status, retry_after, response.bytes().await?))
            }
            .await;
            if outcome.is_ok() {
                inner.pacing.answered(index);
            }
            let error = match outcome {
                Ok((status, _, bytes)) if (200..300).contains(&status) => {
                    inner.preferred.store(index, Ordering::Relaxed);
                    if i > 0 {
                        tracing::info!(%endpoint, %path, attempt = i + 1, "answered after fail-over");
                    }
                    self.note_answer(index, &failed);
                    return Ok(bytes.to_vec());
                }
                Ok((status, retry_after, bytes)) => {
                    let error = from_response(status, &bytes, retry_after);
                    // A 4xx is a refusal (nothing done); a 5xx other than shedding may have
                    // acted before it failed.
                    if status >= 500 && !matches!(error, Error::Overloaded { .. }) {
                        note_acted();
                    }
                    if !(status == 503 || matches!(error, Error::Overloaded { .. })) {
                        inner.preferred.store(index, Ordering::Relaxed);
                        return Err(error);
                    }
                    // This replica cannot serve now (etcd down for it, shutting down, or
                    // shedding load); another may. One that asked for a pause gets it.
                    if let Some(retry_after) = retry_after {
                        inner.pacing.defer(index, Instant::now() + retry_after);
                    }
                    error
                }
                // Every request this client sends is safe to resend, even after a timeout or a
                // reset mid-answer that may have acted: lease grants carry the client's handle
                // (a resend finds the same lease), acquires resume the same waiter, and the
                // server fences releases against later re-acquires.
                Err(err) => {
                    never_sent = err.is_connect();
                    if !never_sent {
                        note_acted();
                    }
                    if never_sent {
                        // Nothing listens there (a killed replica): the next attempts go to the
                        // others, even to one that asked for a pause, rather than back to a port
                        // that refuses at once.
                        inner.pacing.refused(index);
                    }
                    Error::Transport {
                        endpoint: endpoint.clone(),
                        message: if err.is_timeout() {
                            format!(
                                "timed out after {}",
                                humantime::format_duration(round_ms(sent.elapsed()))
                            )
                        } else {
                            describe(&err)
                        },
                        source: Box::new(err),
                    }
                }
            };
            last_never_sent = never_sent;
            failed.push(index);
            tracing::info!(%endpoint, %path, error = %error, "attempt failed");
            // What a server answered (overloaded, etcd unavailable) says more than a refused
            // connection to another: it is the error reported if no attempt succeeds.
            if !(never_sent && last_error.is_some() && !last_error_refused) {
                last_error = Some(error);
                last_error_refused = never_sent;
            }
        }
        Err(last_error.unwrap_or_else(|| Error::Transport {
            endpoint: inner.endpoints[cursor % n].clone(),
            message: "no time left to send the request before its deadline".into(),
            source: Box::new(std::io::Error::from(std::io::ErrorKind::TimedOut)),
        }))
    }
}

impl Client {
    /// Adds the bearer token and the caller's trace to a request.
    fn authorize(&self, mut request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        if let Some(token) = &self.inner.bearer_token {
            request = request.bearer_auth(&token.0);
        }
        if let Some(traceparent) = crate::trace::traceparent() {
            request = request.header("traceparent", traceparent);
        }
        request
    }

    /// Opens the Server-Sent Events stream at `path`, resuming after `last_event_id`: on the
    /// first endpoint that answers 200, starting at the preferred one and trying each once. Each
    /// gets the request timeout to answer with its headers; the body then streams unbounded (the
    /// reader bounds the silence between events). An answer other than 200, 503 or an overload
    /// is returned at once; otherwise the last error, after every endpoint was tried.
    pub(crate) async fn open_stream(
        &self,
        path: &str,
        last_event_id: Option<i64>,
    ) -> Result<reqwest::Response, Error> {
        let inner = &self.inner;
        let n = inner.endpoints.len();
        let start = inner.preferred.load(Ordering::Relaxed);
        let mut last_error = None;
        let mut failed = Vec::new();
        for k in 0..n {
            let index = (start + k) % n;
            let endpoint = &inner.endpoints[index];
            let mut request = inner
                .http
                .get(format!("{endpoint}{path}"))
                .header(reqwest::header::ACCEPT, "text/event-stream");
            if let Some(id) = last_event_id {
                request = request.header("Last-Event-ID", id.to_string());
            }
            request = self.authorize(request);
            let error = match tokio::time::timeout(inner.request_timeout, request.send()).await {
                Ok(Ok(response)) if response.status().is_success() => {
                    inner.preferred.store(index, Ordering::Relaxed);
                    self.note_answer(index, &failed);
                    return Ok(response);
                }
                Ok(Ok(response)) => {
                    let status = response.status().as_u16();
                    let retry_after = retry_after_of(&response);
                    let bytes = response.bytes().await.unwrap_or_default();
                    let error = from_response(status, &bytes, retry_after);
                    if !(status == 503 || matches!(error, Error::Overloaded { .. })) {
                        return Err(error);
                    }
                    if let Some(retry_after) = retry_after {
                        inner.pacing.defer(index, Instant::now() + retry_after);
                    }
                    error
                }
                Ok(Err(err)) => Error::Transport {
                    endpoint: endpoint.clone(),
                    message: describe(&err),
                    source: Box::new(err),
                },
                Err(_) => Error::Transport {
                    endpoint: endpoint.clone(),
                    message: format!(
                        "timed out after {}",
                        humantime::format_duration(round_ms(inner.request_timeout))
                    ),
                    source: Box::new(std::io::Error::from(std::io::ErrorKind::TimedOut)),
                },
            };
            tracing::info!(%endpoint, %path, error = %error, "could not open the stream");
            failed.push(index);
            last_error = Some(error);
        }
        Err(last_error.expect("a client has at least one endpoint"))
    }
}

/// The pause a response asked for in its `Retry-After` header, if any.
fn retry_after_of(response: &reqwest::Response) -> Option<Duration> {
    response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_retry_after)
}

/// A duration rounded to the millisecond, for messages.
fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64)
}

fn describe(err: &reqwest::Error) -> String {
    if err.is_connect() {
        "could not connect".into()
    } else {
        let mut message = err.to_string();
        let mut source = std::error::Error::source(err);
        while let Some(s) = source {
            message = format!("{message}: {s}");
            source = s.source();
        }
        message
    }
}

/// Percent-encodes a lock name as one path segment (`/` too).
pub(crate) fn encode(name: &str) -> String {
    percent_encoding::utf8_percent_encode(name, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// A duration as the humantime string the server parses, to the millisecond.
pub(crate) fn humantime_ms(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}
