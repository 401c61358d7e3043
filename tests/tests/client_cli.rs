//! End-to-end tests of the `leasehold` command line, as child processes against a real server.

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use anyhow::{Context, Result};
use leasehold_tests::{Api, EtcdCluster, TestServer};
use tokio::process::Command;
use tokio::time::Instant;

fn cli(server: &TestServer) -> Command {
    let mut command = Command::new(leasehold_tests::cli_bin!());
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
            "0.5s",
            "--",
            "sh",
            "-c",
            &script,
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let lease = api.wait_for_holder("victim").await?;
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

/// The habits of `flock`, `etcdctl lock` and `consul lock`: CMD right after the name (no `--`),
/// or `-c STRING` run by `sh`; `-n` fails at once, `-w SECONDS` bounds the wait, `-E CODE` picks
/// the conflict exit code; by default the wait has no limit: it outlasts the server's
/// `--max-wait` (2 s here) by chaining requests, keeps its one place in line, and is granted
/// when the holder lets go.
#[tokio::test]
async fn waits_like_flock() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let server = leasehold_tests::ServerProcess::spawn(
        &leasehold_tests::server_bin!(),
        &etcd.endpoints(),
        &["--max-wait", "2s"],
    )
    .await?;
    let api = Api::new(server.url());
    let dir = tempfile::tempdir()?;
    let marker = dir.path().join("ran");
    let touch = format!("touch {}", marker.display());
    let cli = || {
        let mut command = Command::new(leasehold_tests::cli_bin!());
        command
            .env("LEASEHOLD_ENDPOINTS", server.url())
            .kill_on_drop(true);
        command
    };

    let output = cli().args(["lock", "free", "echo", "ran"]).output().await?;
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    assert_eq!(String::from_utf8_lossy(&output.stdout), "ran\n");
    let output = cli()
        .args(["lock", "free", "-c", "echo $LEASEHOLD_LOCK"])
        .output()
        .await?;
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "free\n",
        "{output:?}"
    );

    let (status, held) = api.acquire_ttl("busy", "30s", "0s").await?;
    assert_eq!(status, 200, "{held}");
    let started = Instant::now();
    let output = cli()
        .args(["lock", "-n", "busy", "sh", "-c", &touch])
        .output()
        .await?;
    assert_eq!(output.status.code(), Some(75), "{output:?}");
    assert!(started.elapsed() < Duration::from_secs(2));
    let output = cli()
        .args(["lock", "-n", "-E", "0", "busy", "sh", "-c", &touch])
        .output()
        .await?;
    assert_eq!(output.status.code(), Some(0), "-E 0: {output:?}");
    assert!(!marker.exists(), "CMD ran without the lock");
    let started = Instant::now();
    let output = cli()
        .args(["lock", "-w", "1", "busy", "true"])
        .output()
        .await?;
    assert_eq!(output.status.code(), Some(75), "{output:?}");
    assert!(started.elapsed() >= Duration::from_secs(1));

    // No --wait: as long as it takes, across several of the server's 2 s waits.
    let waiting = cli()
        .args(["lock", "busy", "sh", "-c", &touch])
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let queued_at = Instant::now();
    while queued_at.elapsed() < Duration::from_secs(5) {
        let (_, status) = api.get("/v1/locks/busy").await?;
        assert_eq!(status["holder"]["token"], held["token"], "{status}");
        anyhow::ensure!(
            status["waiters"] == 1 || queued_at.elapsed() < Duration::from_secs(1),
            "the waiter left the line (or queued twice): {status}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!marker.exists());
    let (status, body) = api
        .post(
            "/v1/locks/busy/release",
            serde_json::json!({"token": held["token"]}),
        )
        .await?;
    assert_eq!(status, 200, "{body}");
    let output = tokio::time::timeout(Duration::from_secs(10), waiting.wait_with_output())
        .await
        .context("the waiter was not granted")??;
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    assert!(marker.exists());

    // `--wait forever` says the same explicitly; `--timeout` is flock's spelling of -w.
    let output = cli()
        .args(["lock", "--wait", "forever", "free", "true"])
        .output()
        .await?;
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    let output = cli()
        .args(["lock", "--timeout", "0.5", "free", "true"])
        .output()
        .await?;
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    Ok(())
}

/// `--output json` covers every command: results on stdout, errors on stderr (with their stable
/// code and the exit code), and `lock` reports its grant (token, lease) and its end on stderr,
/// leaving stdout to CMD. Endpoints may be bare `host:port`; lease ids are checked before
/// anything is sent; revoking a lease twice succeeds twice.
#[tokio::test]
async fn json_output_bare_endpoints_and_checked_ids() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let server = TestServer::start(&etcd).await?;
    let api = Api::new(server.url());
    let bare = server.url().trim_start_matches("http://").to_owned();
    let json_cli = || {
        let mut command = Command::new(leasehold_tests::cli_bin!());
        command
            .args(["--endpoints", &bare, "--output", "json"])
            .kill_on_drop(true);
        command
    };
    let lines = |bytes: &[u8]| -> Result<Vec<serde_json::Value>> {
        String::from_utf8_lossy(bytes)
            .lines()
            .map(|l| serde_json::from_str(l).with_context(|| format!("not JSON: {l}")))
            .collect()
    };

    let output = json_cli()
        .args(["lock", "job", "sh", "-c", "echo cmd-output"])
        .output()
        .await?;
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    assert_eq!(String::from_utf8_lossy(&output.stdout), "cmd-output\n");
    let events = lines(&output.stderr)?;
    assert_eq!(events[0]["event"], "acquired", "{events:?}");
    assert_eq!(events[0]["name"], "job");
    assert!(events[0]["token"].is_u64(), "{events:?}");
    assert!(events[0]["lease_id"].is_string(), "{events:?}");
    assert_eq!(events.last().context("events")?["event"], "released");

    let (status, held) = api.acquire_ttl("job", "30s", "0s").await?;
    assert_eq!(status, 200, "{held}");
    let output = json_cli()
        .args(["lock", "-n", "job", "true"])
        .output()
        .await?;
    assert_eq!(output.status.code(), Some(75), "{output:?}");
    let error = &lines(&output.stderr)?[0];
    assert_eq!(error["error"]["code"], "lock_held", "{error}");
    assert_eq!(error["error"]["holder"]["token"], held["token"], "{error}");
    assert_eq!(error["exit_code"], 75);

    let output = json_cli().args(["status", "job"]).output().await?;
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    assert_eq!(lines(&output.stdout)?[0]["holder"]["token"], held["token"]);

    let output = json_cli()
        .args(["lease", "show", "../../healthz"])
        .output()
        .await?;
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    assert_eq!(lines(&output.stderr)?[0]["error"]["code"], "usage");

    let granted = json_cli()
        .args(["lease", "grant", "--ttl", "30s"])
        .output()
        .await?;
    let granted = &lines(&granted.stdout)?[0];
    let (id, handle) = (
        granted["lease_id"].as_str().context("lease_id")?,
        granted["handle"].as_str().context("handle")?,
    );
    for _ in 0..2 {
        let output = json_cli()
            .args(["lease", "revoke", id])
            .env("LEASEHOLD_HANDLE", handle)
            .output()
            .await?;
        assert_eq!(output.status.code(), Some(0), "{output:?}");
        assert_eq!(lines(&output.stdout)?[0]["revoked"], true);
    }
    let output = json_cli().args(["lease", "show", id]).output().await?;
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let error = &lines(&output.stderr)?[0];
    assert_eq!(error["error"]["code"], "lease_not_found", "{error}");
    assert_eq!(error["exit_code"], 1);

    let output = Command::new(leasehold_tests::cli_bin!())
        .args([
            "--endpoints",
            &format!("127.0.0.1:{}", leasehold_tests::free_port()?),
        ])
        .args(["--output", "json", "status", "job"])
        .output()
        .await?;
    assert_eq!(output.status.code(), Some(69), "{output:?}");
    assert_eq!(lines(&output.stderr)?[0]["error"]["code"], "transport");
    Ok(())
}

/// `lock --lease ID` holds the lock under a lease granted before (its handle from
/// `LEASEHOLD_HANDLE`), keeps the lease alive while CMD runs, releases the lock at the end and
/// leaves the lease alive for its owner.
#[tokio::test]
async fn lock_under_an_existing_lease() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let server = TestServer::start(&etcd).await?;
    let api = Api::new(server.url());
    let granted = run(
        &server,
        &["--output", "json", "lease", "grant", "--ttl", "2s"],
    )
    .await?;
    let granted: serde_json::Value = serde_json::from_slice(&granted.stdout)?;
    let (id, handle) = (
        granted["lease_id"].as_str().context("lease_id")?,
        granted["handle"].as_str().context("handle")?,
    );
    Api::remember_handle(id, handle);
    // CMD outlives the 2 s TTL: leasehold keeps the lease alive meanwhile.
    let output = cli(&server)
        .args(["lock", "--lease", id, "step", "sh", "-c"])
        .arg("sleep 3; echo $LEASEHOLD_LEASE_ID")
        .env("LEASEHOLD_HANDLE", handle)
        .output()
        .await?;
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), id);
    let (_, lock) = api.get("/v1/locks/step").await?;
    assert!(lock["holder"].is_null(), "released at the end: {lock}");
    let (status, lease) = api.get(&format!("/v1/leases/{id}")).await?;
    assert_eq!(status, 200, "the caller's lease is left alive: {lease}");

    let output = run(&server, &["lock", "--lease", id, "step", "true"]).await?;
    assert_eq!(output.status.code(), Some(1), "no handle: {output:?}");
    assert!(String::from_utf8_lossy(&output.stderr).contains("LEASEHOLD_HANDLE"));
    Ok(())
}

/// `-v` shows on stderr what a run does in the background: the fail-over from a dead endpoint
/// listed first, and each renewal.
#[tokio::test]
async fn verbose_shows_renewals_and_fail_overs() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let server = TestServer::start(&etcd).await?;
    let dead = format!("http://127.0.0.1:{}", leasehold_tests::free_port()?);
    let output = Command::new(leasehold_tests::cli_bin!())
        .args(["--endpoints", &format!("{dead},{}", server.url()), "-v"])
        .args(["lock", "--ttl", "2s", "chatty", "sleep", "1.6"])
        .kill_on_drop(true)
        .output()
        .await?;
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("attempt failed") && stderr.contains(&dead),
        "no fail-over shown: {stderr}"
    );
    assert!(stderr.contains("answered after fail-over"), "{stderr}");
    assert!(
        stderr.matches("renewed").count() >= 2,
        "renewals not shown: {stderr}"
    );
    // Without -v: quiet.
    let quiet = run(&server, &["lock", "--ttl", "2s", "quiet", "true"]).await?;
    assert!(quiet.stderr.is_empty(), "{quiet:?}");
    Ok(())
}

/// `lease grant --wait`: against a server whose waiting room is full, `--wait 0s` is turned
/// away at once, and a longer wait gets the place a revoke frees.
#[tokio::test]
async fn lease_grant_waits_for_a_place_in_a_full_waiting_room() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let server = TestServer::start_with_max_sessions(&etcd, 1).await?;
    let api = Api::new(server.url());
    let first = api.grant("30s").await?;

    let started = Instant::now();
    let turned_away = run(&server, &["lease", "grant", "--ttl", "30s", "--wait", "0s"]).await?;
    anyhow::ensure!(
        !turned_away.status.success()
            && String::from_utf8_lossy(&turned_away.stderr).contains("overloaded"),
        "a grant that would not wait, in a full room: {turned_away:?}"
    );
    anyhow::ensure!(
        started.elapsed() < leasehold_server::WAITING_ROOM,
        "--wait 0s waited {:?}",
        started.elapsed()
    );

    let waiting = cli(&server)
        .args([
            "--output", "json", "lease", "grant", "--ttl", "30s", "--wait", "20s",
        ])
        .output();
    let waiting = tokio::spawn(waiting);
    tokio::time::sleep(leasehold_server::WAITING_ROOM + Duration::from_secs(1)).await;
    anyhow::ensure!(!waiting.is_finished(), "--wait 20s gave up early");
    let (status, body) = api.delete(&format!("/v1/leases/{first}")).await?;
    anyhow::ensure!(status == 204, "revoke: {status} {body}");
    let granted = waiting.await??;
    anyhow::ensure!(granted.status.success(), "{granted:?}");
    let lease: serde_json::Value = serde_json::from_slice(&granted.stdout)?;
    let id = lease["lease_id"].as_str().context("lease_id")?;
    Api::remember_handle(id, lease["handle"].as_str().context("handle")?);
    let (status, body) = api.delete(&format!("/v1/leases/{id}")).await?;
    anyhow::ensure!(
        status == 204,
        "revoke the waited-for lease: {status} {body}"
    );
    Ok(())
}
