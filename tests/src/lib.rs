//! Test kit for Leasehold: real etcd processes and real servers, cleaned up on drop.
//!
//! # Layout
//! - [`EtcdCluster`]: 1 or 3 etcd members on free loopback ports with temporary data dirs; kill,
//!   restart, pause and resume a member.
//! - [`TestServer`]: a `leasehold-server` in this process, on a free port.
//! - [`ServerProcess`]: a `leasehold-server` as a child process, for `kill -9` and `SIGTERM`.
//! - [`Api`]: a small JSON-over-HTTP helper for black-box assertions.
//! - [`delay::DelayProxy`] (requests that land late) and [`cut::CutProxy`] (a link cut and
//!   restored at will), TCP proxies for fault tests.
//!
//! Everything started here is killed when its handle drops, including when a test panics.
//! etcd comes from `LEASEHOLD_ETCD_BIN`, else `etcd` on `PATH`.
//!
//! # Usage
//! ```no_run
//! # async fn example() -> anyhow::Result<()> {
//! use leasehold_tests::{Api, EtcdCluster, TestServer};
//! let etcd = EtcdCluster::start(1).await?;
//! let server = TestServer::start(&etcd).await?;
//! let (status, body) = Api::new(server.url()).post("/v1/locks/a/acquire", serde_json::json!({"ttl": "5s"})).await?;
//! assert_eq!(status, 200);
//! # Ok(()) }
//! ```

pub mod cut;
pub mod delay;
pub mod history;
pub mod nemesis;

use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;
use tempfile::TempDir;
use tokio::process::{Child, Command};

/// The path of the test build of `leasehold-server` (a binary of this crate that runs
/// `leasehold_server::cli::main`), or `LEASEHOLD_SERVER_BIN` if set. Only usable from this
/// crate's integration tests, where Cargo sets `CARGO_BIN_EXE_*`.
#[macro_export]
macro_rules! server_bin {
    () => {
        std::env::var_os("LEASEHOLD_SERVER_BIN")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| {
                std::path::PathBuf::from(env!("CARGO_BIN_EXE_test-leasehold-server"))
            })
    };
}

/// The path of the `leasehold` CLI under test (`test-leasehold-cli`, a binary of this crate that
/// runs `leasehold::cli::main`), or `LEASEHOLD_CLI_BIN` if set: run a suite against another
/// build (e.g. the previous one, to see a regression test fail). Only usable from this crate's
/// integration tests.
#[macro_export]
macro_rules! cli_bin {
    () => {
        std::env::var_os("LEASEHOLD_CLI_BIN")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| std::path::PathBuf::from(env!("CARGO_BIN_EXE_test-leasehold-cli")))
    };
}

/// Installs a test log subscriber once (`RUST_LOG` filters; off by default).
pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// Reports that a check did not run (a `LEASEHOLD_SKIP_*` variable allowed its missing tool):
/// on stderr, and appended as one line to the file `LEASEHOLD_SKIP_LOG` names, if set.
/// `scripts/test` sets it and prints the file at the end of its output, so a skip shows even
/// when the test passed and its output was captured.
pub fn report_skip(what: &str) {
    use std::io::Write;
    eprintln!("!!! SKIPPED: {what}");
    if let Some(path) = std::env::var_os("LEASEHOLD_SKIP_LOG")
        && let Ok(mut log) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
    {
        let _ = writeln!(log, "{what}");
    }
}

/// A free TCP port on 127.0.0.1 (bound then released; a collision is unlikely, not impossible).
pub fn free_port() -> Result<u16> {
    Ok(StdListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn etcd_bin() -> PathBuf {
    std::env::var_os("LEASEHOLD_ETCD_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("etcd"))
}

/// Where etcd data dirs go: `/dev/shm` when it exists (fsync is free there, tests run twice as
/// fast), else the system temp dir.
fn scratch_root() -> PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

fn signal(child: &Child, sig: Signal) -> Result<()> {
    let pid = child.id().context("process already exited")?;
    kill(Pid::from_raw(pid as i32), sig).with_context(|| format!("sending {sig} to {pid}"))
}

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    data_dir: PathBuf,
    log: PathBuf,
    process: Option<Child>,
}

/// A CA and certificates signed by it, as PEM files in a temp dir: for HTTPS servers and etcd
/// with TLS. The server certificate names `127.0.0.1` and `localhost`.
pub struct TestPki {
    /// The CA certificate.
    pub ca: PathBuf,
    /// A server certificate for 127.0.0.1 / localhost.
    pub cert: PathBuf,
    /// Its key.
    pub key: PathBuf,
    /// A client certificate with common name `root` (for etcd's `--client-cert-auth`; with
    /// auth on, etcd takes a certificate's common name as the user): the kit's own.
    pub client_cert: PathBuf,
    /// Its key.
    pub client_key: PathBuf,
    /// A client certificate for the server under test, named after no etcd user: with auth on
    /// it gets nothing without its user and password.
    pub app_cert: PathBuf,
    /// Its key.
    pub app_key: PathBuf,
    _dir: TempDir,
}

impl TestPki {
    /// A fresh CA with a server and a client certificate.
    pub fn generate() -> Result<Self> {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
        let dir = tempfile::tempdir()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "leasehold test CA");
        let ca_key = KeyPair::generate()?;
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf = |name: &str| -> Result<(String, String)> {
            let mut params = CertificateParams::new(vec!["localhost".to_owned()])?;
            params
                .subject_alt_names
                .push(SanType::IpAddress(std::net::IpAddr::from([127, 0, 0, 1])));
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, name);
            let key = KeyPair::generate()?;
            let cert = params.signed_by(&key, &issuer)?;
            Ok((cert.pem(), key.serialize_pem()))
        };
        let (server_cert, server_key) = leaf("server")?;
        let (client_cert, client_key) = leaf("root")?;
        let (app_cert, app_key) = leaf("leasehold-app")?;
        let write = |name: &str, text: &str| -> Result<PathBuf> {
            let path = dir.path().join(name);
            std::fs::write(&path, text)?;
            Ok(path)
        };
        Ok(Self {
            ca: write("ca.pem", &ca_cert.pem())?,
            cert: write("server.pem", &server_cert)?,
            key: write("server-key.pem", &server_key)?,
            client_cert: write("client.pem", &client_cert)?,
            client_key: write("client-key.pem", &client_key)?,
            app_cert: write("app.pem", &app_cert)?,
            app_key: write("app-key.pem", &app_key)?,
            _dir: dir,
        })
    }
}

/// A real etcd cluster of 1 or more members on loopback.
pub struct EtcdCluster {
    members: Vec<Member>,
    initial_cluster: String,
    token: String,
    /// Client URLs are `https://`, with these certificates and client-certificate auth.
    tls: Option<(PathBuf, PathBuf, PathBuf, PathBuf, PathBuf)>,
    /// The root user's credentials once [`EtcdCluster::enable_auth`] ran.
    root: Option<(String, String)>,
    _dir: TempDir,
}

impl EtcdCluster {
    /// Starts `size` members and waits until the cluster answers linearizable reads. Data dirs
    /// go to `/dev/shm` where it exists (tests run twice as fast there).
    pub async fn start(size: usize) -> Result<Self> {
        Self::start_in(size, &scratch_root()).await
    }

    /// Like [`EtcdCluster::start`], with data dirs on disk (the system temp dir), as users run
    /// etcd: for benchmarks.
    pub async fn start_on_disk(size: usize) -> Result<Self> {
        Self::start_in(size, &std::env::temp_dir()).await
    }

    /// Like [`EtcdCluster::start`], with TLS on the client URLs (certificates from `pki`) and
    /// client-certificate authentication, as a hardened etcd runs.
    pub async fn start_secure(size: usize, pki: &TestPki) -> Result<Self> {
        let tls = (
            pki.ca.clone(),
            pki.cert.clone(),
            pki.key.clone(),
            pki.client_cert.clone(),
            pki.client_key.clone(),
        );
        Self::start_with(size, &scratch_root(), Some(tls)).await
    }

    async fn start_in(size: usize, root: &Path) -> Result<Self> {
        Self::start_with(size, root, None).await
    }

    /// Starts the cluster; when a member exits at start because another process took one of its
    /// ports between [`free_port`] choosing it and etcd binding it (a busy machine), starts again
    /// on fresh ports, up to three times.
    async fn start_with(
        size: usize,
        root: &Path,
        tls: Option<(PathBuf, PathBuf, PathBuf, PathBuf, PathBuf)>,
    ) -> Result<Self> {
        let mut tries = 0;
        loop {
            tries += 1;
            match Self::start_once(size, root, tls.clone()).await {
                Err(err) if tries < 3 && err.to_string().contains("address already in use") => {
                    eprintln!("etcd could not bind a port chosen for it; starting again: {err:#}");
                }
                result => return result,
            }
        }
    }

    async fn start_once(
        size: usize,
        root: &Path,
        tls: Option<(PathBuf, PathBuf, PathBuf, PathBuf, PathBuf)>,
    ) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("leasehold-etcd-")
            .tempdir_in(root)?;
        let mut members = Vec::new();
        for i in 0..size {
            members.push(Member {
                name: format!("m{i}"),
                client_port: free_port()?,
                peer_port: free_port()?,
                data_dir: dir.path().join(format!("m{i}.etcd")),
                log: dir.path().join(format!("m{i}.log")),
                process: None,
            });
        }
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = Self {
            members,
            initial_cluster,
            token: format!("leasehold-test-{}", std::process::id()),
            tls,
            root: None,
            _dir: dir,
        };
        for i in 0..size {
            cluster.spawn(i)?;
        }
        cluster.wait_ready(Duration::from_secs(30)).await?;
        Ok(cluster)
    }

    fn spawn(&mut self, i: usize) -> Result<()> {
        let (initial_cluster, token) = (self.initial_cluster.clone(), self.token.clone());
        let m = &mut self.members[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&m.log)?;
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let client_url = format!("{scheme}://127.0.0.1:{}", m.client_port);
        let peer_url = format!("http://127.0.0.1:{}", m.peer_port);
        let mut command = Command::new(etcd_bin());
        if let Some((ca, cert, key, _, _)) = &self.tls {
            command
                .arg("--cert-file")
                .arg(cert)
                .arg("--key-file")
                .arg(key)
                .arg("--trusted-ca-file")
                .arg(ca)
                .arg("--client-cert-auth");
        }
        let child = command
            .args(["--name", &m.name])
            .arg("--data-dir")
            .arg(&m.data_dir)
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &initial_cluster])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", &token])
            .args(["--logger", "zap", "--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| {
                format!(
                    "starting {} (set LEASEHOLD_ETCD_BIN?)",
                    etcd_bin().display()
                )
            })?;
        m.process = Some(child);
        Ok(())
    }

    /// Client URLs of all members, comma-free list.
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.members.len()).map(|i| self.endpoint(i)).collect()
    }

    /// The client URL of member `i`.
    pub fn endpoint(&self, i: usize) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.members[i].client_port)
    }

    /// Connect options for the kit's own clients: TLS with the client certificate when the
    /// cluster is secure, and the root user once auth is on.
    fn connect_options(&self) -> Result<etcd_client::ConnectOptions> {
        let mut options = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(3));
        if let Some((ca, _, _, client_cert, client_key)) = &self.tls {
            options = options.with_tls(
                etcd_client::TlsOptions::new()
                    .ca_certificate(etcd_client::Certificate::from_pem(std::fs::read(ca)?))
                    .identity(etcd_client::Identity::from_pem(
                        std::fs::read(client_cert)?,
                        std::fs::read(client_key)?,
                    )),
            );
        }
        if let Some((user, password)) = &self.root {
            options = options.with_user(user, password);
        }
        Ok(options)
    }

    /// An etcd client on every member, for reading etcd directly in assertions.
    pub async fn client(&self) -> Result<etcd_client::Client> {
        Ok(etcd_client::Client::connect(self.endpoints(), Some(self.connect_options()?)).await?)
    }

    /// Turns on etcd's authentication: a root user, and a user `leasehold` whose role may read
    /// and write every key under each of `prefixes`. Returns that user's name and password.
    pub async fn enable_auth(&mut self, prefixes: &[&str]) -> Result<(String, String)> {
        use etcd_client::Permission;
        let mut client = self.client().await?;
        let (root, user, password) = ("root", "leasehold", "leasehold-secret");
        client.user_add(root, "root-secret", None).await?;
        client.user_grant_role(root, "root").await?;
        client.role_add("leasehold").await?;
        for prefix in prefixes {
            client
                .role_grant_permission("leasehold", Permission::read_write(*prefix).with_prefix())
                .await?;
        }
        client.user_add(user, password, None).await?;
        client.user_grant_role(user, "leasehold").await?;
        client.auth_enable().await?;
        self.root = Some((root.to_owned(), "root-secret".to_owned()));
        Ok((user.to_owned(), password.to_owned()))
    }

    /// Waits until a linearizable read succeeds (the cluster has a leader and quorum).
    pub async fn wait_ready(&mut self, within: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Ok(mut client) = self.client().await
                && client.get("/", None).await.is_ok()
            {
                return Ok(());
            }
            // A member that exited will not become ready: say why at once.
            for m in &mut self.members {
                if let Some(child) = &mut m.process
                    && let Ok(Some(status)) = child.try_wait()
                {
                    let log = std::fs::read_to_string(&m.log).unwrap_or_default();
                    let tail: Vec<&str> = log.lines().rev().take(3).collect();
                    bail!(
                        "etcd member {} exited ({status}) before the cluster was ready: {}",
                        m.name,
                        tail.into_iter().rev().collect::<Vec<_>>().join(" / ")
                    );
                }
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "etcd did not become ready within {within:?}; logs in {}",
                    self.members[0].log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The index of the current leader: the running member whose status names itself leader.
    pub async fn leader(&self) -> Result<usize> {
        for (i, m) in self.members.iter().enumerate() {
            if m.process.is_none() {
                continue;
            }
            let options = etcd_client::ConnectOptions::new().with_timeout(Duration::from_secs(2));
            let Ok(mut client) =
                etcd_client::Client::connect([self.endpoint(i)], Some(options)).await
            else {
                continue;
            };
            if let Ok(status) = client.status().await
                && status.header().map(|h| h.member_id()) == Some(status.leader())
            {
                return Ok(i);
            }
        }
        bail!("no running member is the leader")
    }

    /// `kill -9` member `i`.
    pub async fn kill(&mut self, i: usize) -> Result<()> {
        if let Some(mut child) = self.members[i].process.take() {
            child.kill().await?;
        }
        Ok(())
    }

    /// Restarts a killed member `i` on its old data dir and ports.
    pub fn restart(&mut self, i: usize) -> Result<()> {
        if self.members[i].process.is_some() {
            bail!("member {i} is running");
        }
        self.spawn(i)
    }

    /// `SIGSTOP` member `i`: it keeps its sockets but answers nothing (a stalled node).
    pub fn pause(&self, i: usize) -> Result<()> {
        signal(
            self.members[i]
                .process
                .as_ref()
                .context("member not running")?,
            Signal::SIGSTOP,
        )
    }

    /// `SIGCONT` member `i`.
    pub fn resume(&self, i: usize) -> Result<()> {
        signal(
            self.members[i]
                .process
                .as_ref()
                .context("member not running")?,
            Signal::SIGCONT,
        )
    }

    /// The process id of member `i`, while it runs (to read its CPU time and memory).
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.members[i].process.as_ref().and_then(|c| c.id())
    }

    /// The number of members.
    pub fn size(&self) -> usize {
        self.members.len()
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for m in &mut self.members {
            if let Some(child) = m.process.as_mut() {
                // SIGKILL works on stopped processes too; kill_on_drop reaps.
                let _ = child.start_kill();
            }
        }
    }
}

/// A `leasehold-server` running inside the test process.
pub struct TestServer {
    addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl TestServer {
    /// Starts a server on a free port against `etcd`, with default limits.
    pub async fn start(etcd: &EtcdCluster) -> Result<Self> {
        Self::start_with(leasehold_server::Config::default().with_etcd_endpoints(etcd.endpoints()))
            .await
    }

    /// Starts a server on `etcd` with a waiting room of `max_sessions` places
    /// (`--max-sessions`).
    pub async fn start_with_max_sessions(etcd: &EtcdCluster, max_sessions: usize) -> Result<Self> {
        let mut config = leasehold_server::Config::default().with_etcd_endpoints(etcd.endpoints());
        config.max_sessions = max_sessions;
        Self::start_with(config).await
    }

    /// Starts a server with this configuration.
    pub async fn start_with(config: leasehold_server::Config) -> Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(leasehold_server::run(listener, config, async move {
            let _ = rx.await;
        }));
        let server = Self {
            addr,
            shutdown: Some(tx),
            task: Some(task),
        };
        // Serving means start-up (the prefix check and its registry write) is over: tests that
        // compare etcd's revision before and after a request see only the request's writes.
        let api = Api::new(server.url());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !matches!(api.get("/healthz").await, Ok((200, _))) {
            if server.task.as_ref().is_some_and(|t| t.is_finished()) {
                bail!("the server stopped during start-up");
            }
            if tokio::time::Instant::now() > deadline {
                bail!("server did not come up on {addr}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(server)
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Graceful shutdown, as on SIGTERM; returns when the server has stopped.
    pub async fn shutdown(mut self) -> Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(20), task)
                .await
                .context("server did not stop within 20 s")???;
        }
        Ok(())
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// A `leasehold-server` child process.
pub struct ServerProcess {
    addr: SocketAddr,
    child: Option<Child>,
}

impl ServerProcess {
    /// Spawns `bin` (see [`server_bin!`]) against `endpoints` with extra `args`, and waits until
    /// it serves `/healthz`.
    pub async fn spawn(bin: &Path, endpoints: &[String], args: &[&str]) -> Result<Self> {
        Self::spawn_with_env(bin, endpoints, args, &[]).await
    }

    /// [`ServerProcess::spawn`] with extra environment variables (e.g. `OTEL_*`).
    pub async fn spawn_with_env(
        bin: &Path,
        endpoints: &[String],
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Self> {
        Self::spawn_full(bin, endpoints, args, env, None, None).await
    }

    /// The general form: extra environment, stderr (the logs) to `log` instead of the test's,
    /// and, for a server on HTTPS, the CA that signed its certificate (it is polled over HTTPS
    /// until it serves).
    pub async fn spawn_full(
        bin: &Path,
        endpoints: &[String],
        args: &[&str],
        env: &[(&str, &str)],
        log: Option<&Path>,
        https_ca: Option<&Path>,
    ) -> Result<Self> {
        let port = free_port()?;
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let mut command = Command::new(bin);
        command
            .args(["--listen", &addr.to_string()])
            .args(["--etcd-endpoints", &endpoints.join(",")])
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .kill_on_drop(true);
        if let Some(log) = log {
            command.stderr(std::fs::File::create(log)?);
        }
        let child = command
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let server = Self {
            addr,
            child: Some(child),
        };
        let api = match https_ca {
            None => Api::new(server.url()),
            Some(ca) => Api::with_ca(format!("https://{addr}"), ca)?,
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !matches!(api.get("/healthz").await, Ok((200, _))) {
            if tokio::time::Instant::now() > deadline {
                bail!("server process did not come up on {addr}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(server)
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.id())
    }

    /// Peak resident memory so far (`VmHWM`), in KiB.
    pub fn peak_rss_kib(&self) -> Result<u64> {
        self.status_kib("VmHWM:")
    }

    /// Resident memory now (`VmRSS`), in KiB.
    pub fn rss_kib(&self) -> Result<u64> {
        self.status_kib("VmRSS:")
    }

    fn status_kib(&self, field: &str) -> Result<u64> {
        let pid = self.pid().context("not running")?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("no {field} in /proc/PID/status"))
    }

    /// `kill -9`: no clean-up runs.
    pub async fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().await?;
        }
        Ok(())
    }

    /// `SIGSTOP`: the process keeps its socket (the kernel still accepts connections) but
    /// answers nothing, as a hung replica does.
    pub fn pause(&self) -> Result<()> {
        signal(self.child.as_ref().context("not running")?, Signal::SIGSTOP)
    }

    /// `SIGCONT` after [`ServerProcess::pause`].
    pub fn resume(&self) -> Result<()> {
        signal(self.child.as_ref().context("not running")?, Signal::SIGCONT)
    }

    /// `SIGTERM`, then waits for the exit status.
    pub async fn terminate(&mut self) -> Result<std::process::ExitStatus> {
        let mut child = self.child.take().context("not running")?;
        signal(&child, Signal::SIGTERM)?;
        Ok(tokio::time::timeout(Duration::from_secs(20), child.wait())
            .await
            .context("server did not exit within 20 s of SIGTERM")??)
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
    }
}

/// The lease handles a test's clients were given, shared by every [`Api`] of the process: as a
/// real client keeps the handle it was granted and sends it with every operation on that lease
/// (whichever replica it talks to), [`Api`] remembers handles from grant and `ttl`-acquire
/// answers and sends the right one with each request that names a lease or a hold.
#[derive(Default)]
struct Handles {
    /// Lease id → handle.
    by_lease: std::collections::HashMap<String, String>,
    /// (encoded lock name, token) → lease id, from acquire answers.
    by_hold: std::collections::HashMap<(String, u64), String>,
}

fn handles() -> std::sync::MutexGuard<'static, Handles> {
    static HANDLES: std::sync::OnceLock<std::sync::Mutex<Handles>> = std::sync::OnceLock::new();
    HANDLES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

/// A path segment, percent-decoded (clients encode names differently).
fn decoded(segment: &str) -> String {
    percent_encoding::percent_decode_str(segment)
        .decode_utf8_lossy()
        .into_owned()
}

/// The header that carries a lease handle.
pub const HANDLE_HEADER: &str = "Leasehold-Handle";

/// JSON over HTTP against one server, returning `(status, body)` for assertions.
#[derive(Clone)]
pub struct Api {
    base: String,
    http: reqwest::Client,
    /// Send remembered handles (see [`Handles`]); off for requests that must go without.
    send_handles: bool,
    /// `Authorization: Bearer` token, if any.
    bearer: Option<String>,
}

impl Api {
    /// A helper for the server at `base` (`http://host:port`).
    pub fn new(base: impl Into<String>) -> Self {
        Self {
            base: base.into(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .expect("reqwest client"),
            send_handles: true,
            bearer: None,
        }
    }

    /// A helper for an HTTPS server whose certificate `ca` signed.
    pub fn with_ca(base: impl Into<String>, ca: &Path) -> Result<Self> {
        let certificate = reqwest::Certificate::from_pem(&std::fs::read(ca)?)?;
        Ok(Self {
            base: base.into(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .tls_certs_only([certificate])
                .build()?,
            send_handles: true,
            bearer: None,
        })
    }

    /// The same helper, but it never sends a handle: a client that knows only what is public.
    pub fn without_handles(&self) -> Self {
        Self {
            send_handles: false,
            ..self.clone()
        }
    }

    /// The same helper, sending `Authorization: Bearer <token>`.
    pub fn with_bearer(&self, token: &str) -> Self {
        Self {
            bearer: Some(token.to_owned()),
            ..self.clone()
        }
    }

    /// The remembered handle of lease `lease_id`.
    pub fn handle_of(lease_id: &str) -> Option<String> {
        handles().by_lease.get(lease_id).cloned()
    }

    /// Remembers a handle learnt elsewhere (from the `leasehold` crate or CLI).
    pub fn remember_handle(lease_id: &str, handle: &str) {
        handles()
            .by_lease
            .insert(lease_id.to_owned(), handle.to_owned());
    }

    /// The handle a request to `path` with `body` needs, if one is remembered.
    fn handle_for(path: &str, body: Option<&Value>) -> Option<String> {
        let handles = handles();
        if let Some(rest) = path.strip_prefix("/v1/leases/") {
            let id = rest.split('/').next().unwrap_or_default();
            return handles.by_lease.get(id).cloned();
        }
        let rest = path
            .strip_prefix("/v1/locks/")
            .or_else(|| path.strip_prefix("/v1/elections/"))?;
        let (name, action) = rest.rsplit_once('/')?;
        let name = decoded(name);
        let body = body?;
        let lease = match action {
            "acquire" | "campaign" => body["lease_id"].as_str()?.to_owned(),
            "release" | "renew" | "resign" => handles
                .by_hold
                .get(&(name, body["token"].as_u64()?))?
                .clone(),
            _ => return None,
        };
        handles.by_lease.get(&lease).cloned()
    }

    /// Remembers the handle (and the hold) an answer to `path` gave.
    fn remember(path: &str, status: u16, answer: &Value) {
        let (Some(lease), true) = (answer["lease_id"].as_str(), (200..300).contains(&status))
        else {
            return;
        };
        let mut handles = handles();
        if let Some(handle) = answer["handle"].as_str() {
            handles.by_lease.insert(lease.to_owned(), handle.to_owned());
        }
        let rest = path
            .strip_prefix("/v1/locks/")
            .or_else(|| path.strip_prefix("/v1/elections/"));
        if let (Some(rest), Some(token)) = (rest, answer["token"].as_u64())
            && let Some((name, "acquire" | "campaign")) = rest.rsplit_once('/')
        {
            handles
                .by_hold
                .insert((decoded(name), token), lease.to_owned());
        }
    }

    /// `request` (to `path`, with `body`) with the remembered handle and the bearer token.
    fn authorized(
        &self,
        path: &str,
        body: Option<&Value>,
        mut request: reqwest::RequestBuilder,
    ) -> reqwest::RequestBuilder {
        if self.send_handles
            && let Some(handle) = Self::handle_for(path, body)
        {
            request = request.header(HANDLE_HEADER, handle);
        }
        if let Some(token) = &self.bearer {
            request = request.bearer_auth(token);
        }
        request
    }

    /// Sends `request` (to `path`, with `body`) with the remembered handle and the bearer token.
    async fn send(
        &self,
        path: &str,
        body: Option<&Value>,
        request: reqwest::RequestBuilder,
    ) -> Result<(u16, Value)> {
        let request = self.authorized(path, body, request);
        let (status, answer) = Self::send_through_shedding(request).await?;
        Self::remember(path, status, &answer);
        Ok((status, answer))
    }

    /// Sends `request`; a shed answer (503 overloaded) did nothing, so it is sent again after a
    /// jittered pause, as every well-behaved client does, for up to half a minute.
    async fn send_through_shedding(mut request: reqwest::RequestBuilder) -> Result<(u16, Value)> {
        let give_up = tokio::time::Instant::now() + Duration::from_secs(30);
        let mut attempt = 0u32;
        loop {
            let retry = request.try_clone();
            let (status, answer) = Self::answer(request.send().await?).await?;
            match retry {
                Some(again)
                    if status == 503
                        && answer["error"]["code"] == "overloaded"
                        && tokio::time::Instant::now() < give_up =>
                {
                    attempt += 1;
                    let jitter = u64::from(attempt.wrapping_mul(2_654_435_761) % 900) + 100;
                    tokio::time::sleep(Duration::from_millis(jitter)).await;
                    request = again;
                }
                _ => return Ok((status, answer)),
            }
        }
    }

    /// `POST path` with a JSON body for set-up work (a benchmark's leases): rides out shedding
    /// as [`Api::post`] does, but sends and remembers no handle.
    pub async fn post_setup(&self, path: &str, body: Value) -> Result<(u16, Value)> {
        let mut request = self.http.post(format!("{}{path}", self.base)).json(&body);
        if let Some(token) = &self.bearer {
            request = request.bearer_auth(token);
        }
        Self::send_through_shedding(request).await
    }

    /// `POST path` with a JSON body and an explicit handle (or none), remembering nothing.
    pub async fn post_with_handle(
        &self,
        path: &str,
        body: Value,
        handle: Option<&str>,
    ) -> Result<(u16, Value)> {
        let mut request = self.http.post(format!("{}{path}", self.base)).json(&body);
        if let Some(handle) = handle {
            request = request.header(HANDLE_HEADER, handle);
        }
        if let Some(token) = &self.bearer {
            request = request.bearer_auth(token);
        }
        Self::answer(request.send().await?).await
    }

    /// The underlying HTTP client (for raw requests).
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// The server's base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// The sum of every sample of metric `name` on the server's `/metrics` (whatever its
    /// labels; 0 when absent).
    pub async fn metric(&self, name: &str) -> Result<f64> {
        self.metric_where(name, "").await
    }

    /// The sum of the samples of metric `name` whose labels include `label` (such as
    /// `route="/healthz"`; "" for every sample); 0 when none.
    pub async fn metric_where(&self, name: &str, label: &str) -> Result<f64> {
        let text = self.metrics_text().await?;
        Ok(text
            .lines()
            .filter_map(|line| {
                let rest = line.strip_prefix(name)?;
                let (labels, value) = match rest.as_bytes().first()? {
                    b' ' => ("", rest),
                    b'{' => rest.split_at(rest.find('}')? + 1),
                    _ => return None,
                };
                if !labels.contains(label) {
                    return None;
                }
                value.trim().parse::<f64>().ok()
            })
            .sum())
    }

    /// The server's `/metrics` page.
    pub async fn metrics_text(&self) -> Result<String> {
        Ok(self
            .http
            .get(format!("{}/metrics", self.base))
            .send()
            .await?
            .text()
            .await?)
    }

    /// `POST path` with a JSON body.
    pub async fn post(&self, path: &str, body: Value) -> Result<(u16, Value)> {
        let request = self.http.post(format!("{}{path}", self.base)).json(&body);
        self.send(path, Some(&body), request).await
    }

    /// `POST path` with a raw body.
    pub async fn post_raw(
        &self,
        path: &str,
        body: impl Into<reqwest::Body>,
    ) -> Result<(u16, Value)> {
        let request = self
            .http
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(body);
        self.send(path, None, request).await
    }

    /// `GET path`.
    pub async fn get(&self, path: &str) -> Result<(u16, Value)> {
        let request = self.http.get(format!("{}{path}", self.base));
        self.send(path, None, request).await
    }

    /// `POST path` with a JSON body, sent once: a shed answer (`503 overloaded`) is returned,
    /// not resent as [`Api::post`] does. Also returns the `Retry-After` header, if any.
    pub async fn post_once(&self, path: &str, body: Value) -> Result<(u16, Value, Option<String>)> {
        let request = self.http.post(format!("{}{path}", self.base)).json(&body);
        let response = self.authorized(path, Some(&body), request).send().await?;
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned);
        let (status, answer) = Self::answer(response).await?;
        Self::remember(path, status, &answer);
        Ok((status, answer, retry_after))
    }

    /// `DELETE path`.
    pub async fn delete(&self, path: &str) -> Result<(u16, Value)> {
        let request = self.http.delete(format!("{}{path}", self.base));
        self.send(path, None, request).await
    }

    async fn answer(response: reqwest::Response) -> Result<(u16, Value)> {
        let status = response.status().as_u16();
        let bytes = response.bytes().await?;
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).with_context(|| {
                format!(
                    "non-JSON body ({status}): {}",
                    String::from_utf8_lossy(&bytes)
                )
            })?
        };
        Ok((status, body))
    }

    /// Acquires `name` with a fresh server-granted lease; returns the body on 200.
    pub async fn acquire_ttl(&self, name: &str, ttl: &str, wait: &str) -> Result<(u16, Value)> {
        self.post(
            &format!("/v1/locks/{}/acquire", encode(name)),
            serde_json::json!({"ttl": ttl, "wait": wait}),
        )
        .await
    }

    /// Waits (up to 10 s) until lock `name` has a holder; returns the holder's lease id.
    pub async fn wait_for_holder(&self, name: &str) -> Result<String> {
        let status = self
            .wait_for_lock(name, |s| s["holder"]["lease_id"].is_string())
            .await?;
        Ok(status["holder"]["lease_id"]
            .as_str()
            .unwrap_or_default()
            .to_owned())
    }

    /// Waits (up to 10 s) until `n` waiters queue behind the holder of lock `name`.
    pub async fn wait_for_waiters(&self, name: &str, n: u64) -> Result<()> {
        self.wait_for_lock(name, |s| s["waiters"] == n)
            .await
            .map(drop)
    }

    /// Polls lock `name`'s status (every 20 ms, up to 10 s) until `done` says so; returns it.
    pub async fn wait_for_lock(&self, name: &str, done: impl Fn(&Value) -> bool) -> Result<Value> {
        let path = format!("/v1/locks/{}", encode(name));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let (_, status) = self.get(&path).await?;
            if done(&status) {
                return Ok(status);
            }
            if tokio::time::Instant::now() > deadline {
                bail!("lock {name:?} never reached the expected state: {status}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Grants a lease; returns its id.
    pub async fn grant(&self, ttl: &str) -> Result<String> {
        let (status, body) = self
            .post("/v1/leases", serde_json::json!({"ttl": ttl}))
            .await?;
        if status != 201 {
            bail!("lease grant answered {status}: {body}");
        }
        Ok(body["lease_id"].as_str().context("lease_id")?.to_owned())
    }
}

/// Percent-encodes a lock name for a URL path segment.
pub fn encode(name: &str) -> String {
    percent_encoding::utf8_percent_encode(name, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// Keys under `prefix` in etcd right now.
pub async fn keys_under(client: &mut etcd_client::Client, prefix: &str) -> Result<Vec<String>> {
    let resp = client
        .get(
            prefix,
            Some(
                etcd_client::GetOptions::new()
                    .with_prefix()
                    .with_keys_only(),
            ),
        )
        .await?;
    Ok(resp
        .kvs()
        .iter()
        .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
        .collect())
}

/// etcd's current revision (changes on every write).
pub async fn revision(client: &mut etcd_client::Client) -> Result<i64> {
    let resp = client
        .get("/", Some(etcd_client::GetOptions::new().with_count_only()))
        .await?;
    Ok(resp.header().context("header")?.revision())
}
