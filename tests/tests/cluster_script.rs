//! `scripts/cluster` end to end: the real script brings up 3 etcd members, 2 servers and
//! Prometheus on free loopback ports in a temporary state dir; Prometheus scrapes every target;
//! a server killed with `kill -9` makes `LeaseholdServerDown` fire (from a copy of
//! `compose/prometheus/alerts.yml` with `for: 5s`, scraped and evaluated every second); `down`
//! stops every process the script started and removes the state dir.
//!
//! Needs etcd, Prometheus (Debian's `prometheus` package) and curl. A missing `prometheus` fails
//! the test unless `LEASEHOLD_SKIP_CLUSTER=1`, which skips it loudly.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use leasehold_tests::free_port;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;
use tempfile::TempDir;

const COMPONENTS: &[&str] = &[
    "etcd1",
    "etcd2",
    "etcd3",
    "leasehold-1",
    "leasehold-2",
    "prometheus",
];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Whether `name` is a file on `PATH` (or a path that exists).
fn on_path(name: &str) -> bool {
    if name.contains('/') {
        return Path::new(name).is_file();
    }
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(name).is_file()))
        .unwrap_or(false)
}

/// The kernel start time of `pid` (field 22 of /proc/PID/stat); `None` if it does not exist or
/// is a zombie.
fn start_time(pid: i32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(") ")?.1.split_whitespace().collect();
    if fields.first() == Some(&"Z") {
        return None;
    }
    fields.get(19).map(|s| s.to_string())
}

/// A process the script started: its PID and start time (so a reused PID is not mistaken for it).
#[derive(Debug, Clone)]
struct Started {
    name: String,
    pid: i32,
    start: String,
}

impl Started {
    fn alive(&self) -> bool {
        start_time(self.pid).as_deref() == Some(self.start.as_str())
    }
}

/// The cluster as this test runs it; `Drop` runs `scripts/cluster down` (also on a failed
/// assertion), then `kill -9`s anything the script started that is still there.
struct Cluster {
    root: TempDir,
    state: PathBuf,
    env: Vec<(&'static str, String)>,
    server_ports: [u16; 2],
    prometheus_port: u16,
    started: Vec<Started>,
    down_done: bool,
}

impl Cluster {
    fn new() -> Result<Self> {
        let shm = Path::new("/dev/shm");
        let root = tempfile::Builder::new()
            .prefix("leasehold-cluster-")
            .tempdir_in(if shm.is_dir() {
                shm.to_path_buf()
            } else {
                std::env::temp_dir()
            })?;
        let state = root.path().join("state");

        // Nine distinct free ports.
        let mut ports = BTreeSet::new();
        let mut picked = Vec::new();
        while picked.len() < 9 {
            let port = free_port()?;
            if ports.insert(port) {
                picked.push(port);
            }
        }
        let list = |ps: &[u16]| ps.iter().map(u16::to_string).collect::<Vec<_>>().join(",");

        // The compose rules, with every `for: 1m` shortened to 5 s.
        let alerts = std::fs::read_to_string(repo().join("compose/prometheus/alerts.yml"))?;
        let fast = alerts.replace("for: 1m", "for: 5s");
        assert_ne!(alerts, fast, "alerts.yml has no `for: 1m` to shorten");
        let rules = root.path().join("alerts-fast.yml");
        std::fs::write(&rules, fast)?;

        let env = vec![
            ("LEASEHOLD_CLUSTER_DIR", state.display().to_string()),
            ("LEASEHOLD_CLUSTER_ETCD_CLIENT_PORTS", list(&picked[0..3])),
            ("LEASEHOLD_CLUSTER_ETCD_PEER_PORTS", list(&picked[3..6])),
            ("LEASEHOLD_CLUSTER_SERVER_PORTS", list(&picked[6..8])),
            ("LEASEHOLD_CLUSTER_PROMETHEUS_PORT", picked[8].to_string()),
            ("LEASEHOLD_CLUSTER_RULES", rules.display().to_string()),
            ("LEASEHOLD_CLUSTER_SCRAPE_INTERVAL", "1s".into()),
            ("LEASEHOLD_CLUSTER_EVAL_INTERVAL", "1s".into()),
            (
                "LEASEHOLD_SERVER_BIN",
                env!("CARGO_BIN_EXE_test-leasehold-server").into(),
            ),
        ];
        Ok(Self {
            root,
            state,
            env,
            server_ports: [picked[6], picked[7]],
            prometheus_port: picked[8],
            started: Vec::new(),
            down_done: false,
        })
    }

    fn run(&self, args: &[&str]) -> Result<Output> {
        let mut command = Command::new("bash");
        command
            .arg(repo().join("scripts/cluster"))
            .args(args)
            .env_remove("LEASEHOLD_CLUSTER_BASE_PORT")
            .current_dir(self.root.path());
        for (key, value) in &self.env {
            command.env(key, value);
        }
        let output = command
            .output()
            .with_context(|| format!("running scripts/cluster {args:?}"))?;
        eprintln!(
            "--- scripts/cluster {} ({})\n{}{}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(output)
    }

    /// `up`, then records the PID and start time of each component from its pid file.
    fn up(&mut self) -> Result<()> {
        let output = self.run(&["up"])?;
        // Record whatever did start before judging, so Drop can clean up after a failed `up`.
        for name in COMPONENTS {
            let Ok(pid) = std::fs::read_to_string(self.state.join(format!("run/{name}.pid")))
            else {
                continue;
            };
            let pid: i32 = pid.trim().parse().context("pid file")?;
            if let Some(start) = start_time(pid) {
                self.started.push(Started {
                    name: name.to_string(),
                    pid,
                    start,
                });
            }
        }
        if !output.status.success() {
            bail!("scripts/cluster up failed ({})", output.status);
        }
        let names: Vec<&str> = self.started.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, COMPONENTS, "a pid file per component, each alive");
        Ok(())
    }

    fn pid_of(&self, name: &str) -> &Started {
        self.started
            .iter()
            .find(|s| s.name == name)
            .expect("component")
    }

    fn down(&mut self) -> Result<Output> {
        let output = self.run(&["down"])?;
        self.down_done = output.status.success();
        Ok(output)
    }

    fn prometheus(&self) -> String {
        format!("http://127.0.0.1:{}", self.prometheus_port)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if !self.down_done {
            let _ = self.run(&["down"]);
        }
        for s in &self.started {
            if s.alive() {
                eprintln!("{} (pid {}) outlived down: kill -9", s.name, s.pid);
                let _ = kill(Pid::from_raw(s.pid), Signal::SIGKILL);
            }
        }
    }
}

async fn get_json(http: &reqwest::Client, url: &str) -> Result<Value> {
    let response = http.get(url).send().await?.error_for_status()?;
    Ok(response.json().await?)
}

/// Polls `check` every 250 ms until it returns `Some`, for at most `within`.
async fn poll<T, F, Fut>(within: Duration, what: &str, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + within;
    let mut last = String::from("no answer yet");
    loop {
        match check().await {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(e) => last = format!("{e:#}"),
        }
        if Instant::now() > deadline {
            bail!("{what}: not within {within:?} (last error: {last})");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_script_up_alert_down() -> Result<()> {
    if std::env::var("LEASEHOLD_SKIP_CLUSTER").as_deref() == Ok("1") {
        eprintln!("SKIPPED: scripts/cluster test (LEASEHOLD_SKIP_CLUSTER=1)");
        return Ok(());
    }
    let prometheus_bin =
        std::env::var("LEASEHOLD_PROMETHEUS_BIN").unwrap_or_else(|_| "prometheus".into());
    assert!(
        on_path(&prometheus_bin),
        "{prometheus_bin} not found: apt-get install prometheus (or set LEASEHOLD_SKIP_CLUSTER=1)"
    );
    let started_at = Instant::now();
    let mut cluster = Cluster::new()?;
    cluster.up()?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()?;
    let prometheus = cluster.prometheus();

    // Authentication is on: the API wants the bearer token `up` wrote.
    let token = std::fs::read_to_string(cluster.state.join("token"))?;
    let server = format!("http://127.0.0.1:{}", cluster.server_ports[0]);
    let anonymous = leasehold_tests::Api::new(&server);
    let (status, _) = anonymous.acquire_ttl("cluster-auth", "5s", "0s").await?;
    assert_eq!(status, 401, "no token, no lock");
    let (status, body) = anonymous
        .with_bearer(token.trim())
        .acquire_ttl("cluster-auth", "5s", "0s")
        .await?;
    assert_eq!(status, 200, "{body}");

    // `up` again: says so, starts nothing.
    let again = cluster.run(&["up"])?;
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stdout).contains("already up"));

    // Every target scraped and up: both servers (job leasehold), all three etcd members.
    let targets_url = format!("{prometheus}/api/v1/targets?state=active");
    poll(Duration::from_secs(30), "all 5 targets up", || async {
        let body = get_json(&http, &targets_url).await?;
        let targets = body["data"]["activeTargets"]
            .as_array()
            .context("activeTargets")?;
        let up = |job: &str| {
            targets
                .iter()
                .filter(|t| t["labels"]["job"] == job && t["health"] == "up")
                .count()
        };
        Ok((up("leasehold") == 2 && up("etcd") == 3).then_some(()))
    })
    .await?;

    // kill -9 the second server, by the PID in its pid file.
    let victim = cluster.pid_of("leasehold-2").clone();
    kill(Pid::from_raw(victim.pid), Signal::SIGKILL)?;
    let instance = format!("127.0.0.1:{}", cluster.server_ports[1]);

    let status = cluster.run(&["status"])?;
    assert_eq!(
        status.status.code(),
        Some(3),
        "status with a component down"
    );
    let status_text = String::from_utf8_lossy(&status.stdout);
    assert!(
        status_text
            .lines()
            .any(|l| l.starts_with("leasehold-2") && l.contains("down")),
        "status shows leasehold-2 down"
    );

    // LeaseholdServerDown (up{job="leasehold"} == 0, for: 5s) fires for that instance.
    let alerts_url = format!("{prometheus}/api/v1/alerts");
    poll(
        Duration::from_secs(40),
        "LeaseholdServerDown firing",
        || async {
            let body = get_json(&http, &alerts_url).await?;
            let alerts = body["data"]["alerts"].as_array().context("alerts")?;
            Ok(alerts
                .iter()
                .any(|a| {
                    a["labels"]["alertname"] == "LeaseholdServerDown"
                        && a["labels"]["instance"] == instance.as_str()
                        && a["state"] == "firing"
                })
                .then_some(()))
        },
    )
    .await?;

    // down: every process gone, state dir removed; down again is a no-op that succeeds.
    let down = cluster.down()?;
    assert!(down.status.success(), "scripts/cluster down failed");
    for s in &cluster.started {
        assert!(
            !s.alive(),
            "{} (pid {}) still running after down",
            s.name,
            s.pid
        );
    }
    assert!(
        !cluster.state.exists(),
        "state dir {} not removed",
        cluster.state.display()
    );
    assert!(cluster.run(&["down"])?.status.success());
    eprintln!("scripts/cluster test took {:?}", started_at.elapsed());
    Ok(())
}
