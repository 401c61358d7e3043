//! The `leasehold-server` replicas of a run: started by the demo (so chaos can kill one), or
//! given as endpoints.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::process::{Child, Command};

use crate::Servers;

/// `leasehold-server` next to this executable (where `cargo build` puts both), else on `PATH`.
pub fn default_server_bin() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.join("leasehold-server")))
        .filter(|path| path.exists())
        .unwrap_or_else(|| PathBuf::from("leasehold-server"))
}

/// A thousand buyers keep a thousand connections open: lift the soft open-file limit to the hard
/// one (servers started by the demo inherit it).
pub fn raise_open_file_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
    {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

struct Replica {
    url: String,
    process: Option<Child>,
}

/// The replicas of this run.
pub struct Replicas {
    replicas: Vec<Replica>,
}

impl Replicas {
    /// Starts the replicas (or adopts the given endpoints) and waits until each accepts
    /// connections.
    pub async fn start(servers: &Servers) -> Result<Self> {
        let replicas = match servers {
            Servers::Existing(urls) => urls
                .iter()
                .map(|url| Replica {
                    url: url.clone(),
                    process: None,
                })
                .collect(),
            Servers::Spawn {
                count,
                etcd_endpoints,
                bin,
            } => {
                let mut replicas = Vec::new();
                for _ in 0..*count {
                    let port = std::net::TcpListener::bind("127.0.0.1:0")?
                        .local_addr()?
                        .port();
                    let child = Command::new(bin)
                        .args(["--listen", &format!("127.0.0.1:{port}")])
                        .args(["--etcd-endpoints", &etcd_endpoints.join(",")])
                        .env(
                            "RUST_LOG",
                            std::env::var("RUST_LOG").unwrap_or_else(|_| "error".into()),
                        )
                        .stdin(Stdio::null())
                        .kill_on_drop(true)
                        .spawn()
                        .with_context(|| {
                            format!(
                                "starting {} (build it, or pass --server-bin)",
                                bin.display()
                            )
                        })?;
                    replicas.push(Replica {
                        url: format!("http://127.0.0.1:{port}"),
                        process: Some(child),
                    });
                }
                replicas
            }
        };
        let replicas = Self { replicas };
        for replica in &replicas.replicas {
            wait_for_port(&replica.url).await?;
        }
        Ok(replicas)
    }

    /// The replicas' base URLs.
    pub fn urls(&self) -> Vec<String> {
        self.replicas.iter().map(|r| r.url.clone()).collect()
    }

    /// A replica the demo may kill: one it started, and never the only one.
    pub fn killable(&self) -> Option<usize> {
        let owned = self.replicas.iter().filter(|r| r.process.is_some()).count();
        (owned >= 2).then(|| self.replicas.len() - 1)
    }

    /// `kill -9` replica `i`; returns its URL.
    pub async fn kill(&mut self, i: usize) -> Result<String> {
        let replica = &mut self.replicas[i];
        if let Some(mut child) = replica.process.take() {
            child.kill().await?;
        }
        Ok(replica.url.clone())
    }
}

async fn wait_for_port(url: &str) -> Result<()> {
    let addr = url.trim_start_matches("http://").to_owned();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(&addr).await.is_err() {
        if tokio::time::Instant::now() > deadline {
            bail!("no Leasehold server answers at {url}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}
