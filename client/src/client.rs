//! The client: endpoints, timeouts, retries and fail-over, over one pooled HTTP/1.1 client.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use reqwest::Method;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::error::{Error, from_response};
use crate::lease::Handle;

/// The request header that carries a lease's handle.
pub(crate) const HANDLE_HEADER: &str = "Leasehold-Handle";

/// How hard to retry a request before giving up.
///
/// A request moves to the next endpoint after a connection error, a timeout or a `503`; after a
/// full round over the endpoints it pauses (`backoff`, doubling up to `max_backoff`).
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Attempts in all, across endpoints (raised to the number of endpoints, so every endpoint
    /// is tried at least once).
    pub max_attempts: u32,
    /// Pause after the first full round over the endpoints.
    pub backoff: Duration,
    /// Longest pause between rounds.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 4,
            backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
        }
    }
}

impl RetryPolicy {
    /// One attempt per endpoint, no pauses.
    pub fn once_per_endpoint() -> Self {
        Self {
            max_attempts: 1,
            ..Self::default()
        }
    }
}

/// Configures a [`Client`]; start from [`Client::builder`].
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    endpoints: Vec<String>,
    request_timeout: Duration,
    connect_timeout: Duration,
    retry: RetryPolicy,
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
    /// 5 s). Past it the attempt is abandoned and retried on the next endpoint.
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
        for url in &self.endpoints {
            let parsed = reqwest::Url::parse(url)
                .map_err(|err| Error::client_input(format!("endpoint {url:?}: {err}")))?;
            if !matches!(parsed.scheme(), "http" | "https") {
                return Err(Error::client_input(format!(
                    "endpoint {url:?}: scheme must be http or https"
                )));
            }
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
        let http = http
            .build()
            .map_err(|err| Error::client_input(format!("HTTP client: {err}")))?;
        Ok(Client {
            inner: Arc::new(Inner {
                http,
                endpoints: self.endpoints,
                preferred: AtomicUsize::new(0),
                request_timeout: self.request_timeout,
                retry: self.retry,
                safety_margin: self.safety_margin,
                bearer_token: self.bearer_token,
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
    pub(crate) safety_margin: Option<Duration>,
    bearer_token: Option<Secret>,
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

    /// Sends a request with fail-over and returns the decoded 2xx body.
    ///
    /// `attempt` gives each attempt's body and extra timeout (an acquire's remaining wait), so
    /// retries can shrink the wait.
    pub(crate) async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        handle: Option<&Handle>,
        attempt: impl Fn() -> (Option<Value>, Duration),
    ) -> Result<T, Error> {
        let bytes = self.call_raw(method, path, handle, attempt).await?;
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
        attempt: impl Fn() -> (Option<Value>, Duration),
    ) -> Result<Vec<u8>, Error> {
        let inner = &self.inner;
        let n = inner.endpoints.len();
        let attempts = (inner.retry.max_attempts as usize).max(n);
        let start = inner.preferred.load(Ordering::Relaxed);
        let mut backoff = inner.retry.backoff;
        let mut last_error = None;
        for i in 0..attempts {
            if i > 0 && i % n == 0 {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(inner.retry.max_backoff);
            }
            let index = (start + i) % n;
            let endpoint = &inner.endpoints[index];
            let (body, extra) = attempt();
            let mut request = inner
                .http
                .request(method.clone(), format!("{endpoint}{path}"))
                .timeout(inner.request_timeout + extra);
            if let Some(body) = body {
                request = request.json(&body);
            }
            if let Some(handle) = handle {
                request = request.header(HANDLE_HEADER, handle.reveal());
            }
            if let Some(token) = &inner.bearer_token {
                request = request.bearer_auth(&token.0);
            }
            if let Some(traceparent) = crate::trace::traceparent() {
                request = request.header("traceparent", traceparent);
            }
            let outcome = async {
                let response = request.send().await?;
                let status = response.status().as_u16();
                Ok::<_, reqwest::Error>((status, response.bytes().await?))
            }
            .await;
            match outcome {
                Ok((status, bytes)) if (200..300).contains(&status) => {
                    inner.preferred.store(index, Ordering::Relaxed);
                    return Ok(bytes.to_vec());
                }
                Ok((503, bytes)) => {
                    // This replica cannot serve (etcd down for it, or shutting down); another may.
                    tracing::debug!(%endpoint, %path, "503; trying the next endpoint");
                    last_error = Some(from_response(503, &bytes));
                }
                Ok((status, bytes)) => {
                    inner.preferred.store(index, Ordering::Relaxed);
                    return Err(from_response(status, &bytes));
                }
                Err(err) => {
                    // Every request this client sends is safe to resend, even after a timeout
                    // or a reset mid-answer that may have acted: lease grants carry the
                    // client's handle (a resend finds the same lease), acquires resume the same
                    // waiter, and the server fences releases against later re-acquires.
                    tracing::debug!(%endpoint, %path, error = %err, "request failed; trying the next endpoint");
                    last_error = Some(Error::Transport {
                        endpoint: endpoint.clone(),
                        message: describe(&err),
                        source: Box::new(err),
                    });
                }
            }
        }
        Err(last_error.expect("at least one attempt"))
    }
}

fn describe(err: &reqwest::Error) -> String {
    if err.is_timeout() {
        "timed out".into()
    } else if err.is_connect() {
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
