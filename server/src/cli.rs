//! The `leasehold-server` command line: flags (each also read from the environment), logging,
//! signals.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use crate::Config;
use crate::telemetry::Telemetry;
use clap::{Parser, ValueEnum};

/// Stateless HTTP lease and fencing-token lock server; every lease, lock and token lives in etcd.
#[derive(Debug, Parser)]
#[command(
    name = "leasehold-server",
    version,
    after_help = "Example:\n  leasehold-server --listen 127.0.0.1:7070 --etcd-endpoints http://127.0.0.1:2379 --prefix /leasehold"
)]
pub struct Args {
    /// Address to serve HTTP on.
    #[arg(long, env = "LEASEHOLD_LISTEN", default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,
    /// etcd client URLs, comma-separated.
    #[arg(
        long,
        env = "LEASEHOLD_ETCD_ENDPOINTS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:2379"
    )]
    pub etcd_endpoints: Vec<String>,
    /// Root of every key written in etcd.
    #[arg(long, env = "LEASEHOLD_PREFIX", default_value = "/leasehold")]
    pub prefix: String,
    /// Longest lease TTL granted (humantime, e.g. 1h).
    #[arg(long, env = "LEASEHOLD_MAX_TTL", default_value = "1h", value_parser = humantime::parse_duration)]
    pub max_ttl: Duration,
    /// Longest acquire wait accepted (humantime, e.g. 5m).
    #[arg(long, env = "LEASEHOLD_MAX_WAIT", default_value = "5m", value_parser = humantime::parse_duration)]
    pub max_wait: Duration,
    /// Bound on each etcd call; past it requests answer 503 store_unavailable.
    #[arg(long, env = "LEASEHOLD_ETCD_TIMEOUT", default_value = "3s", value_parser = humantime::parse_duration)]
    pub etcd_timeout: Duration,
    /// Send txns about different locks to etcd as one txn when they arrive together (group
    /// commit): less etcd CPU per lock operation under load. On by default; `--group-commit=false`
    /// (or LEASEHOLD_GROUP_COMMIT=0) sends every txn alone.
    #[arg(
        long,
        env = "LEASEHOLD_GROUP_COMMIT",
        default_value_t = true,
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        action = clap::ArgAction::Set,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub group_commit: bool,
    /// Send lock txns to etcd over Leasehold's own HTTP/2 channel (one write per txn; see
    /// docs/design.md, "The lean txn channel"). On by default; `--lean-etcd-channel=false` (or
    /// LEASEHOLD_LEAN_ETCD_CHANNEL=0) sends them through etcd-client like every other call.
    #[arg(
        long,
        env = "LEASEHOLD_LEAN_ETCD_CHANNEL",
        default_value_t = true,
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        action = clap::ArgAction::Set,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub lean_etcd_channel: bool,
    /// A waiting room: sessions (leases granted with POST /v1/leases) open through this server
    /// at once. Past it, a new one waits in line for a place (as long as its grant's "wait",
    /// default 3.5s), then is answered 503 overloaded with Retry-After. 0: no bound.
    #[arg(long, env = "LEASEHOLD_MAX_SESSIONS", default_value_t = 0)]
    pub max_sessions: usize,
    /// Open connections at most; more are answered 503 too_many_connections.
    #[arg(long, env = "LEASEHOLD_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub max_connections: usize,
    /// Time a client has to send its request headers (humantime).
    #[arg(long, env = "LEASEHOLD_HEADER_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub header_timeout: Duration,
    /// Bearer tokens and tenants (JSON; re-read on SIGHUP). Without it, authentication is off:
    /// anyone who can reach the server may use every lock name (fine on loopback).
    #[arg(long, env = "LEASEHOLD_AUTH_FILE")]
    pub auth_file: Option<std::path::PathBuf>,
    /// Serve HTTPS with this PEM certificate chain (with --tls-key); re-read on SIGHUP.
    #[arg(
        long,
        env = "LEASEHOLD_TLS_CERT",
        requires = "tls_key",
        value_name = "PATH"
    )]
    pub tls_cert: Option<std::path::PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(
        long,
        env = "LEASEHOLD_TLS_KEY",
        requires = "tls_cert",
        value_name = "PATH"
    )]
    pub tls_key: Option<std::path::PathBuf>,
    /// PEM CA that signed etcd's certificates (for https:// etcd endpoints).
    #[arg(long, env = "LEASEHOLD_ETCD_CA_FILE", value_name = "PATH")]
    pub etcd_ca_file: Option<std::path::PathBuf>,
    /// PEM client certificate for etcd's --client-cert-auth (with --etcd-key).
    #[arg(
        long,
        env = "LEASEHOLD_ETCD_CERT",
        requires = "etcd_key",
        value_name = "PATH"
    )]
    pub etcd_cert: Option<std::path::PathBuf>,
    /// The PEM private key of --etcd-cert.
    #[arg(
        long,
        env = "LEASEHOLD_ETCD_KEY",
        requires = "etcd_cert",
        value_name = "PATH"
    )]
    pub etcd_key: Option<std::path::PathBuf>,
    /// etcd user (with --etcd-password-file), when etcd has auth enabled.
    #[arg(long, env = "LEASEHOLD_ETCD_USER", requires = "etcd_password_file")]
    pub etcd_user: Option<String>,
    /// File holding the etcd user's password (never on the command line).
    #[arg(
        long,
        env = "LEASEHOLD_ETCD_PASSWORD_FILE",
        requires = "etcd_user",
        value_name = "PATH"
    )]
    pub etcd_password_file: Option<std::path::PathBuf>,
    /// Log format. Filter with RUST_LOG (default: info). Traces are exported over OTLP when
    /// OTEL_EXPORTER_OTLP_ENDPOINT is set (OTEL_SERVICE_NAME defaults to leasehold-server).
    #[arg(long, env = "LEASEHOLD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// How logs are written to stderr.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

impl Args {
    /// The server configuration these flags describe (reads the etcd password file).
    pub fn config(&self) -> Result<Config, String> {
        let mut config = Config::default()
            .with_etcd_endpoints(self.etcd_endpoints.iter().cloned())
            .with_prefix(self.prefix.clone())
            .with_etcd_timeout(self.etcd_timeout)
            .with_limits(self.max_ttl, self.max_wait)
            .with_connection_limits(self.max_connections, self.header_timeout);
        config.group_commit = self.group_commit;
        config.lean_etcd_channel = self.lean_etcd_channel;
        config.max_sessions = self.max_sessions;
        if let Some(path) = &self.auth_file {
            config = config.with_auth_file(path);
        }
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            config = config.with_tls(cert, key);
        }
        let mut security = crate::EtcdSecurity {
            ca_file: self.etcd_ca_file.clone(),
            ..Default::default()
        };
        if let (Some(cert), Some(key)) = (&self.etcd_cert, &self.etcd_key) {
            security.client_cert = Some((cert.clone(), key.clone()));
        }
        if let (Some(user), Some(path)) = (&self.etcd_user, &self.etcd_password_file) {
            let password = std::fs::read_to_string(path)
                .map_err(|err| format!("reading {}: {err}", path.display()))?;
            security.user = Some((
                user.clone(),
                password.trim_end_matches(['\r', '\n']).to_owned(),
            ));
        }
        Ok(config.with_etcd_security(security))
    }
}

/// Entry point of the `leasehold-server` binary.
pub fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("leasehold-server: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    // The OTLP exporter must be created inside the runtime.
    let telemetry = {
        let _runtime = runtime.enter();
        Telemetry::init(args.log_format)
    };
    let outcome = runtime.block_on(serve(args));
    telemetry.shutdown();
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = %err, "leasehold-server failed");
            eprintln!("leasehold-server: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: Args) -> std::io::Result<()> {
    let config = args
        .config()
        .map_err(|err| std::io::Error::new(std::io::ErrorKind::InvalidInput, err))?;
    let listener = listen(args.listen)?;
    crate::run(listener, config, shutdown_signal()).await
}

/// Connections the kernel may hold for the server before it accepts them (the kernel caps it
/// at `net.core.somaxconn`, 4,096 on current Linux). tokio's default, 1,024, overflows when a
/// crowd connects at once (5,000 buyers in the flash sale, 1,500 clients in the storm test):
/// the kernel then drops handshakes, which clients see as a second's wait for a SYN retransmit,
/// or, with SYN cookies, as a connection reset on their first request.
const LISTEN_BACKLOG: u32 = 8192;

/// A listener on `addr` with [`LISTEN_BACKLOG`].
fn listen(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_listener_holds_a_crowd_that_connects_at_once() {
        let listener = listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        // More than tokio's default backlog (1,024), all connecting before the server accepts
        // any: each handshake must complete at once, none wait for a SYN retransmit. (Where the
        // kernel allows fewer, as many as it allows.)
        let somaxconn: usize = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(4096);
        let crowd = 1100.min(somaxconn.saturating_sub(10));
        let mut clients = Vec::with_capacity(crowd);
        for n in 0..crowd {
            let connect = tokio::net::TcpStream::connect(addr);
            match tokio::time::timeout(std::time::Duration::from_millis(500), connect).await {
                Ok(Ok(client)) => clients.push(client),
                other => panic!("connection {n} of {crowd} not taken at once: {other:?}"),
            }
        }
        drop(listener);
    }

    #[test]
    fn group_commit_is_on_unless_turned_off() {
        if std::env::var_os("LEASEHOLD_GROUP_COMMIT").is_none() {
            let default = Args::try_parse_from(["leasehold-server"]).unwrap();
            assert!(default.config().unwrap().group_commit);
        }
        let bare = Args::try_parse_from(["leasehold-server", "--group-commit"]).unwrap();
        assert!(bare.config().unwrap().group_commit);
        let off = Args::try_parse_from(["leasehold-server", "--group-commit=false"]).unwrap();
        assert!(!off.config().unwrap().group_commit);
    }

    #[test]
    fn the_lean_etcd_channel_is_on_unless_turned_off() {
        if std::env::var_os("LEASEHOLD_LEAN_ETCD_CHANNEL").is_none() {
            let default = Args::try_parse_from(["leasehold-server"]).unwrap();
            assert!(default.config().unwrap().lean_etcd_channel);
        }
        let off = Args::try_parse_from(["leasehold-server", "--lean-etcd-channel=false"]).unwrap();
        assert!(!off.config().unwrap().lean_etcd_channel);
    }
}
