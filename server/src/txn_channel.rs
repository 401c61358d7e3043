//! A lean gRPC channel for etcd's `KV.Txn`, the call every lock operation makes.
//!
//! etcd-client sends each call through tonic: a tower buffer task, hyper's HTTP/2 dispatch task,
//! a task that pipes the request body, and a task that awaits the answer, before h2's connection
//! task writes to the socket. Because the body pipe waits for flow-control capacity that only
//! the connection task assigns, each request leaves in three writes (headers, the message, an
//! empty end-of-stream frame), each a wake-up of etcd's reader. Here the caller's own task
//! queues the headers and the whole message (end of stream set) on the h2 stream and awaits the
//! answer: one write, and one task hop to the connection task and back (`docs/performance.md`,
//! "A lean etcd channel").
//!
//! It serves `http://` endpoints, and `https://` ones when the server is given etcd's CA
//! (`--etcd-ca-file`, with `--etcd-cert` and `--etcd-key` if they are set). An etcd user and
//! password (etcd's token authentication), or an endpoint without a scheme, keeps every call on
//! etcd-client (`Store::connect`); so does `--lean-etcd-channel=false`. Errors keep
//! etcd-client's shape (`GRpcStatus` for etcd's answers, `IoError` for the transport), so
//! [`crate::store::StoreError`]'s mapping and group commit's "refused whole" rule see the same
//! thing either way.
//!
//! No keep-alive pings: etcd counts pings on a connection without an open stream against the
//! client, and the txns here are all short. A member that stops answering holds each call until
//! the caller's timeout (the store then passes over it for a while); a connection that fails is
//! replaced on the next call.

use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use etcd_client::proto::{PbTxnRequest, PbTxnResponse};
use etcd_client::{Client, Txn, TxnResponse};
use h2::client::SendRequest;
use http::{HeaderValue, Request, Uri};
use prost::Message;
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use rustls::pki_types::pem::PemObject;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// What `require_leader` adds to every call (as etcd-client does): a member that has lost its
/// leader refuses at once instead of waiting.
const REQUIRE_LEADER: (&str, &str) = ("hasleader", "true");

/// Receive windows: an answer of a few MiB (a long queue read whole) flows without a stop.
const STREAM_WINDOW: u32 = 1 << 20;
const CONNECTION_WINDOW: u32 = 1 << 22;

/// A connection to one etcd endpoint for txns, made on first use and again after it fails.
pub struct TxnChannel {
    uri: Uri,
    address: String,
    /// The live connection and its generation (which connection a failure was on).
    connection: std::sync::Mutex<Option<(u64, SendRequest<Bytes>)>>,
    /// Held while connecting (one connection attempt at a time); counts the connections made,
    /// which numbers their generations.
    connecting: tokio::sync::Mutex<u64>,
    connect_timeout: std::time::Duration,
    /// For `https://`: the connector and the name etcd's certificate must carry.
    tls: Option<(TlsConnector, ServerName<'static>)>,
}

impl TxnChannel {
    /// A channel to `endpoint`: `http://host:port`, or `https://host:port` with `tls` (see
    /// [`client_tls`]). `None` for an endpoint it does not serve.
    pub fn new(
        endpoint: &str,
        connect_timeout: std::time::Duration,
        tls: Option<Arc<ClientConfig>>,
    ) -> Option<Self> {
        let uri: Uri = endpoint.parse().ok()?;
        let authority = uri.authority()?.clone();
        let tls = match (uri.scheme_str()?, tls) {
            ("http", _) => None,
            ("https", Some(config)) => {
                let host = authority
                    .host()
                    .trim_start_matches('[')
                    .trim_end_matches(']');
                let name = ServerName::try_from(host.to_owned()).ok()?;
                Some((TlsConnector::from(config), name))
            }
            _ => return None,
        };
        let uri = Uri::builder()
            .scheme(uri.scheme_str()?)
            .authority(authority.clone())
            .path_and_query("/etcdserverpb.KV/Txn")
            .build()
            .ok()?;
        Some(Self {
            uri,
            address: authority.to_string(),
            connection: std::sync::Mutex::new(None),
            connecting: tokio::sync::Mutex::new(0),
            connect_timeout,
            tls,
        })
    }

    /// Runs `txn` (unbounded in time: the caller bounds it).
    pub async fn txn(&self, txn: Txn) -> Result<TxnResponse, etcd_client::Error> {
        let request = PbTxnRequest::from(txn);
        let len = request.encoded_len();
        let mut frame = BytesMut::with_capacity(5 + len);
        frame.put_u8(0); // not compressed
        frame.put_u32(u32::try_from(len).map_err(|_| too_large())?);
        request.encode(&mut frame).expect("BytesMut grows");
        let (generation, sender) = self.sender().await?;
        let answer = self.send(sender, frame.freeze()).await;
        if let Err(etcd_client::Error::IoError(_)) = &answer {
            self.forget(generation);
        }
        answer.map(TxnResponse)
    }

    async fn send(
        &self,
        sender: SendRequest<Bytes>,
        frame: Bytes,
    ) -> Result<PbTxnResponse, etcd_client::Error> {
        let mut sender = sender.ready().await.map_err(transport)?;
        let request = Request::post(self.uri.clone())
            .header("content-type", HeaderValue::from_static("application/grpc"))
            .header("te", HeaderValue::from_static("trailers"))
            .header(REQUIRE_LEADER.0, HeaderValue::from_static(REQUIRE_LEADER.1))
            .body(())
            .expect("a valid request");
        let (answer, mut body) = sender.send_request(request, false).map_err(transport)?;
        // Queued with the headers before the connection task next writes: one write.
        body.send_data(frame, true).map_err(transport)?;
        let answer = answer.await.map_err(transport)?;
        let (head, mut body) = answer.into_parts();
        // An error may come as headers alone ("trailers-only").
        status_of(&head.headers)?;
        if head.status != http::StatusCode::OK {
            return Err(etcd_client::Error::GRpcStatus(tonic::Status::unknown(
                format!("etcd answered HTTP {}", head.status),
            )));
        }
        let mut message = BytesMut::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.map_err(transport)?;
            let _ = body.flow_control().release_capacity(chunk.len());
            message.extend_from_slice(&chunk);
        }
        if let Some(trailers) = body.trailers().await.map_err(transport)? {
            status_of(&trailers)?;
        }
        let mut message = message.freeze();
        if message.len() < 5 || message[0] != 0 {
            return Err(malformed());
        }
        message.advance(1);
        let len = message.get_u32() as usize;
        if message.len() < len {
            return Err(malformed());
        }
        PbTxnResponse::decode(message.slice(..len)).map_err(|_| malformed())
    }

    /// The live connection, or a new one.
    async fn sender(&self) -> Result<(u64, SendRequest<Bytes>), etcd_client::Error> {
        if let Some(live) = self.connection.lock().expect("not poisoned").clone() {
            return Ok(live);
        }
        let mut connections_made = self.connecting.lock().await;
        if let Some(live) = self.connection.lock().expect("not poisoned").clone() {
            return Ok(live);
        }
        let connect = async {
            let stream = TcpStream::connect(&self.address).await?;
            stream.set_nodelay(true)?;
            Ok::<_, std::io::Error>(stream)
        };
        let connected = tokio::time::timeout(self.connect_timeout, async {
            let stream = connect.await?;
            match &self.tls {
                None => handshake(stream).await,
                Some((connector, name)) => {
                    handshake(connector.connect(name.clone(), stream).await?).await
                }
            }
        });
        let sender = connected
            .await
            .map_err(|_| {
                etcd_client::Error::IoError(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "connecting to etcd timed out",
                ))
            })?
            .map_err(etcd_client::Error::IoError)?;
        *connections_made += 1;
        let generation = *connections_made;
        *self.connection.lock().expect("not poisoned") = Some((generation, sender.clone()));
        Ok((generation, sender))
    }

    /// Drops connection `failed` (if it is still the live one), so that the next call reconnects.
    fn forget(&self, failed: u64) {
        let mut live = self.connection.lock().expect("not poisoned");
        if live
            .as_ref()
            .is_some_and(|(generation, _)| *generation == failed)
        {
            *live = None;
        }
    }
}

/// An HTTP/2 connection over `io`, its connection task spawned.
async fn handshake<T>(io: T) -> Result<SendRequest<Bytes>, std::io::Error>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = h2::client::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .handshake(io)
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            tracing::debug!(error = %err, "etcd txn connection ended");
        }
    });
    Ok(sender)
}

/// TLS towards etcd for the lean channel: etcd's CA, and the client certificate if `security`
/// has one. `None` without a CA (etcd-client then serves `https://` endpoints as before).
pub fn client_tls(security: &crate::EtcdSecurity) -> Result<Option<Arc<ClientConfig>>, String> {
    let Some(ca) = &security.ca_file else {
        return Ok(None);
    };
    let mut roots = rustls::RootCertStore::empty();
    for certificate in crate::http::tls::read_chain(ca)? {
        roots
            .add(certificate)
            .map_err(|err| format!("etcd CA {}: {err}", ca.display()))?;
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|err| format!("TLS: {err}"))?
        .with_root_certificates(roots);
    let mut config = match &security.client_cert {
        Some((cert, key)) => {
            let key = rustls::pki_types::PrivateKeyDer::from_pem_file(key)
                .map_err(|err| format!("etcd client key {}: {err}", key.display()))?;
            builder
                .with_client_auth_cert(crate::http::tls::read_chain(cert)?, key)
                .map_err(|err| format!("etcd client certificate {}: {err}", cert.display()))?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Some(Arc::new(config)))
}

/// Where a txn goes: the lean channel where it serves, else etcd-client.
#[derive(Clone)]
pub enum TxnRoute {
    /// The lean channel.
    Lean(Arc<TxnChannel>),
    /// etcd-client (boxed: its client is several KiB).
    Client(Box<Client>),
}

impl TxnRoute {
    /// Runs `txn` (unbounded in time: the caller bounds it).
    pub async fn txn(&self, txn: Txn) -> Result<TxnResponse, etcd_client::Error> {
        match self {
            TxnRoute::Lean(channel) => channel.txn(txn).await,
            TxnRoute::Client(client) => client.clone().txn(txn).await,
        }
    }
}

/// The gRPC status in `headers`, if it is an error.
fn status_of(headers: &http::HeaderMap) -> Result<(), etcd_client::Error> {
    let Some(code) = headers.get("grpc-status") else {
        return Ok(());
    };
    let code: i32 = code
        .to_str()
        .ok()
        .and_then(|code| code.parse().ok())
        .unwrap_or(tonic::Code::Unknown as i32);
    if code == 0 {
        return Ok(());
    }
    let message = headers
        .get("grpc-message")
        .map(|message| {
            percent_encoding::percent_decode(message.as_bytes())
                .decode_utf8_lossy()
                .into_owned()
        })
        .unwrap_or_default();
    Err(etcd_client::Error::GRpcStatus(tonic::Status::new(
        tonic::Code::from(code),
        message,
    )))
}

fn transport(err: h2::Error) -> etcd_client::Error {
    etcd_client::Error::IoError(std::io::Error::other(err))
}

fn malformed() -> etcd_client::Error {
    etcd_client::Error::GRpcStatus(tonic::Status::internal(
        "etcd's answer is not a gRPC message",
    ))
}

fn too_large() -> etcd_client::Error {
    etcd_client::Error::InvalidArgs("txn too large".into())
}
