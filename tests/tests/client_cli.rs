//! End-to-end tests of the `leasehold` command line, as child processes against a real server.

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use anyhow::{Context, Result};
use leasehold_tests::{Api, EtcdCluster, TestServer};
use tokio::process::Command;
use tokio::time::Instant;

fn cli(server: &TestServer) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_test-leasehold-cli"));
    command
        .env("LEASEHOLD_ENDPOINTS", server.url())
        .kill_on_drop(true);
    command
}

async fn run(server: &TestServer, args: &[&str]) -> Result<Output> {
    Ok(cli(server).args(args).output().await?)
}

/// Two concurrent loops of `leasehold lock` doing a read-modify-write on one counter file never
/// interleave: the final count equals the number of runs.
#[tokio::test]
async fn concurrent_lock_runs_never_interleave() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let server = TestServer::start(&etcd).await?;
    let dir = tempfile::tempdir()?;
    let counter = dir.path().join("counter");
    std::fs::write(&counter, "0\n")?;
    const RUNS: usize = 8;
    let script = format!(
        "n=$(cat {0}); sleep 0.05; echo $((n+1)) > {0}",
        counter.display()
    );
    let worker = |server: &TestServer| {
        let (mut commands, script) = (Vec::new(), script.clone());
        for _ in 0..RUNS {
            let mut command = cli(server);
            command.args([
                "lock", "counter", "--ttl", "5s", "--wait", "25s", "--", "sh", "-c", &script,
            ]);
            commands.push(command);
        }
        async move {
            for mut command in commands {
                let output = command.output().await?;
                anyhow::ensure!(
                    output.status.success(),
                    "{output:?}: {}",
                    String::from_utf8_lossy(&output.stderr)
                );
            }
            anyhow::Ok(())
        }
    };
    let (a, b) = tokio::join!(worker(&server), worker(&server));
    a?;
    b?;
    assert_eq!(
        std::fs::read_to_string(&counter)?.trim(),
        (2 * RUNS).to_string()
    );
    Ok(())
}

/// CMD's exit code is passed through, CMD sees its lock and token, and a lock not acquired
/// within `--wait` exits with the documented code 75.
#[tokio::test]
async fn exit_codes_and_environment() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let server = TestServer::start(&etcd).await?;
    let output = run(
        &server,
        &[
            "lock",
            "env/x",
            "--",
            "sh",
            "-c",
            "echo $LEASEHOLD_LOCK $LEASEHOLD_TOKEN; exit 7",
        ],
    )
    .await?;
    assert_eq!(output.status.code(), Some(7), "{output:?}");
    let stdout = String::from_utf8(output.stdout)?;
    let (lock, token) = stdout.trim().split_once(' ').context("two words")?;
    assert_eq!(lock, "env/x");
    token.parse::<u64>()?;
    // Released afterwards.
    let (_, status) = Api::new(server.url()).get("/v1/locks/env%2Fx").await?;
    assert!(status["holder"].is_null(), "{status}");

    let (status, _) = Api::new(server.url())
        .acquire_ttl("busy", "10s", "0s")
        .await?;
    assert_eq!(status, 200);
    let started = Instant::now();
    let output = run(&server, &["lock", "busy", "--wait", "1s", "--", "true"]).await?;
    assert_eq!(output.status.code(), Some(75), "{output:?}");
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("not acquired within 1s"));

    let output = run(&server, &["--output", "json", "status", "busy"]).await?;
    let status: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    assert_eq!(status["waiters"], 0);
    assert!(status["holder"]["token"].is_u64(), "{status}");
    Ok(())
}

/// Revoking the lease out of band while CMD runs gets CMD and its children terminated within
/// the TTL (checked by their process ids: both are gone), and `leasehold` exits with the
/// documented code 76.
#[tokio::test]
async fn lost_hold_kills_the_command_promptly() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let server = TestServer::start(&etcd).await?;
    let api = Api::new(server.url());
    let dir = tempfile::tempdir()?;
    let pids_file = dir.path().join("pids");
    let handle_file = dir.path().join("handle");
    // CMD (a shell) starts a child and writes both process ids, then waits for the child. It
    // also hands the lease's handle (from its environment) to this test, which revokes. The
    // child's output goes elsewhere, so that a child left running does not hold leasehold's
    // stderr open: it is found by its pid.
    let script = format!(
        "sleep 30 >/dev/null 2>&1 & echo $$ $! > {pids}.tmp && mv {pids}.tmp {pids}; echo $LEASEHOLD_HANDLE > {handle}; wait",
        pids = pids_file.display(),
        handle = handle_file.display(),
    );
    let child = cli(&server)
        .args([
            "lock",
            "victim",
            "--ttl",
            "2s",
            "--kill-grace",
            "1s",
            "--",
            "sh",
            "-c",
            &script,
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let lease = wait_for_holder(&api, "victim").await?;
    let handle = wait_for_line(&handle_file).await?;
    let pids: Vec<i32> = wait_for_line(&pids_file)
        .await?
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    anyhow::ensure!(pids.len() == 2, "pids: {pids:?}");
    for &pid in &pids {
        anyhow::ensure!(
            is_alive(pid),
            "process {pid} is not running before the revoke"
        );
    }
    Api::remember_handle(&lease, &handle);
    let (status, _) = api.delete(&format!("/v1/leases/{lease}")).await?;
    assert_eq!(status, 204);
    let revoked_at = Instant::now();
    let output = tokio::time::timeout(Duration::from_secs(5), child.wait_with_output())
        .await
        .context("leasehold did not exit after losing the lock")??;
    assert!(
        revoked_at.elapsed() < Duration::from_secs(2),
        "{:?}",
        revoked_at.elapsed()
    );
    assert_eq!(output.status.code(), Some(76), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("lost lock \"victim\""), "{stderr}");
    // CMD (the shell) and its child (`sleep 30`) are both gone: not running, at most a zombie
    // nobody has reaped yet.
    let deadline = Instant::now() + Duration::from_secs(2);
    while pids.iter().any(|&pid| is_alive(pid)) {
        anyhow::ensure!(
            Instant::now() < deadline,
            "still running after leasehold exited: {:?}",
            pids.iter()
                .filter(|&&pid| is_alive(pid))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// True if process `pid` exists and is not a zombie.
fn is_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name in parentheses: `pid (comm) S ...`.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// The first line of `path` once it has been written completely (ends with a newline).
async fn wait_for_line(path: &Path) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match std::fs::read_to_string(path) {
            Ok(text) if text.ends_with('\n') => return Ok(text.trim().to_owned()),
            _ => {
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "{} was never written",
                    path.display()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

async fn wait_for_holder(api: &Api, name: &str) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, status) = api.get(&format!("/v1/locks/{name}")).await?;
        if let Some(lease) = status["holder"]["lease_id"].as_str() {
            return Ok(lease.to_owned());
        }
        anyhow::ensure!(Instant::now() < deadline, "never held: {status}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `lease grant|show|keepalive|revoke`, `status` and `release --token` against a live server,
/// in JSON for scripts and in text for people.
#[tokio::test]
async fn lease_status_and_release_commands() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let server = TestServer::start(&etcd).await?;
    let api = Api::new(server.url());
    let json = |output: &Output| -> Result<serde_json::Value> {
        anyhow::ensure!(output.status.success(), "{output:?}");
        serde_json::from_slice(&output.stdout).context("JSON output")
    };

    let granted = json(
        &run(
            &server,
            &["--output", "json", "lease", "grant", "--ttl", "30s"],
        )
        .await?,
    )?;
    let lease = granted["lease_id"].as_str().context("lease_id")?.to_owned();
    let handle = granted["handle"].as_str().context("handle")?.to_owned();
    Api::remember_handle(&lease, &handle);
    let with_handle = |args: &[&str]| {
        let mut command = cli(&server);
        command.args(args).env("LEASEHOLD_HANDLE", &handle);
        command
    };
    let (status, _) = api.get(&format!("/v1/leases/{lease}")).await?;
    assert_eq!(status, 200, "the CLI granted a real lease");

    let (_, held) = api
        .post(
            "/v1/locks/cli%2Fjob/acquire",
            serde_json::json!({"lease_id": lease}),
        )
        .await?;
    let shown = json(&run(&server, &["--output", "json", "lease", "show", &lease]).await?)?;
    assert_eq!(shown["locks"], serde_json::json!(["cli/job"]));
    assert!(
        with_handle(&["lease", "keepalive", &lease])
            .output()
            .await?
            .status
            .success()
    );
    let no_handle = run(&server, &["lease", "keepalive", &lease]).await?;
    assert!(!no_handle.status.success(), "keepalive needs the handle");

    let status = json(&run(&server, &["--output", "json", "status", "cli/job"]).await?)?;
    assert_eq!(status["holder"]["token"], held["token"]);
    let text = run(&server, &["status", "cli/job"]).await?;
    assert!(String::from_utf8_lossy(&text.stdout).contains(&held["token"].to_string()));

    let token = held["token"].to_string();
    let wrong = with_handle(&["release", "cli/job", "--token", "1"])
        .output()
        .await?;
    assert!(!wrong.status.success(), "a wrong token must not release");
    let no_handle = run(&server, &["release", "cli/job", "--token", &token]).await?;
    assert!(!no_handle.status.success(), "a release needs the handle");
    assert!(
        with_handle(&["release", "cli/job", "--token", &token])
            .output()
            .await?
            .status
            .success()
    );
    let (_, lock) = api.get("/v1/locks/cli%2Fjob").await?;
    assert_eq!(lock["holder"], serde_json::Value::Null);

    assert!(
        with_handle(&["lease", "revoke", &lease])
            .output()
            .await?
            .status
            .success()
    );
    let (status, _) = api.get(&format!("/v1/leases/{lease}")).await?;
    assert_eq!(status, 404);
    assert!(
        !run(&server, &["lease", "show", &lease])
            .await?
            .status
            .success()
    );
    Ok(())
}
