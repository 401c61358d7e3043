//! End-to-end tests of the `leasehold` command line beyond the mutex: `lock --limit` / `-n N`,
//! `--shared` / `--exclusive`, `elect`, `observe`, and `status` with the queue, as child
//! processes against a real server.

use std::path::Path;
use std::process::{Output, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use leasehold::Client;
use leasehold_tests::{Api, EtcdCluster, TestServer};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{ChildStdout, Command};
use tokio::time::Instant;

const TTL: Duration = Duration::from_secs(3);

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

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The first line of `path` once it has been written completely (ends with a newline).
async fn wait_for_line(path: &Path) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match std::fs::read_to_string(path) {
            Ok(text) if text.ends_with('\n') => return Ok(text.trim().to_owned()),
            _ => {
                ensure!(
                    Instant::now() < deadline,
                    "{} was never written",
                    path.display()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// `lock --limit N` and consul's `-n N`: CMD runs beside another holder of a semaphore, a full
/// semaphore answers 75 (with `-w 0` or with `--nb` after `-n N`), a disagreeing limit is an
/// error that names `limit_mismatch`, `status` shows the limit; flock's `-n NAME` still fails at
/// once on a held mutex.
#[tokio::test]
async fn lock_limit_and_dash_n_n() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let server = TestServer::start(&etcd).await?;
    let client = Client::new(server.url())?;
    let first = client.lock("enc").limit(2).ttl(TTL).acquire().await?;

    let output = run(
        &server,
        &[
            "lock",
            "-n",
            "2",
            "enc",
            "sh",
            "-c",
            "echo $LEASEHOLD_TOKEN",
        ],
    )
    .await?;
    ensure!(output.status.success(), "{output:?}");
    let token: u64 = String::from_utf8(output.stdout)?.trim().parse()?;
    ensure!(token > first.token().get(), "a second holder of its own");

    let second = client.lock("enc").limit(2).ttl(TTL).acquire().await?;
    for args in [
        &["lock", "--limit", "2", "-w", "0", "enc", "true"][..],
        &["lock", "-n", "2", "--nb", "enc", "true"],
        &["lock", "-n=2", "-w", "0", "enc", "true"],
    ] {
        let output = run(&server, args).await?;
        ensure!(output.status.code() == Some(75), "{args:?}: {output:?}");
    }
    let output = run(&server, &["lock", "-n", "3", "--nb", "enc", "true"]).await?;
    ensure!(output.status.code() == Some(1), "{output:?}");
    ensure!(
        stderr(&output).contains("limit_mismatch"),
        "{}",
        stderr(&output)
    );
    let output = run(&server, &["--output", "json", "status", "enc"]).await?;
    let status: Value = serde_json::from_slice(&output.stdout)?;
    ensure!(
        status["limit"] == 2 && status["queue"].as_array().map(Vec::len) == Some(2),
        "{status}"
    );
    drop((first, second));

    let _held = client.lock("mutex").ttl(TTL).acquire().await?;
    let output = run(&server, &["lock", "-n", "mutex", "true"]).await?;
    ensure!(output.status.code() == Some(75), "{output:?}");
    Ok(())
}

/// `--shared` holds beside a reader; `--exclusive` does not.
#[tokio::test]
async fn lock_shared_and_exclusive() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let server = TestServer::start(&etcd).await?;
    let client = Client::new(server.url())?;
    let _reader = client.lock("catalog").shared().ttl(TTL).acquire().await?;
    let output = run(&server, &["lock", "--shared", "-w", "0", "catalog", "true"]).await?;
    ensure!(output.status.success(), "{output:?}");
    let output = run(
        &server,
        &["lock", "--exclusive", "-w", "0", "catalog", "true"],
    )
    .await?;
    ensure!(output.status.code() == Some(75), "{output:?}");
    Ok(())
}

/// `elect NAME --value V CMD`: CMD runs as the leader, with its election, epoch and value in its
/// environment, and others see the leader; `elect -n` fails at once while it leads; revoking the
/// leadership's lease stops CMD and exits 76; a CMD that ends resigns, and the next leadership
/// has a greater epoch.
#[tokio::test]
async fn elect_runs_cmd_while_leading() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let server = TestServer::start(&etcd).await?;
    let client = Client::new(server.url())?;
    let dir = tempfile::tempdir()?;
    let (env_file, handle_file) = (dir.path().join("env"), dir.path().join("handle"));
    let script = format!(
        "echo $LEASEHOLD_ELECTION $LEASEHOLD_EPOCH $LEASEHOLD_VALUE $LEASEHOLD_TOKEN > {env}.tmp && mv {env}.tmp {env}; \
         echo $LEASEHOLD_HANDLE > {handle}.tmp && mv {handle}.tmp {handle}; exec sleep 30",
        env = env_file.display(),
        handle = handle_file.display(),
    );
    let leading = cli(&server)
        .args([
            "elect",
            "primary",
            "--value",
            "10.0.0.7",
            "--ttl",
            "2s",
            "--kill-grace",
            "0.5s",
            "--",
            "sh",
            "-c",
            &script,
        ])
        .stderr(Stdio::piped())
        .spawn()?;
    let env = wait_for_line(&env_file).await?;
    let words: Vec<&str> = env.split_whitespace().collect();
    ensure!(
        words.len() == 4 && words[0] == "primary" && words[2] == "10.0.0.7",
        "{env}"
    );
    ensure!(words[1] == words[3], "the epoch is the token: {env}");
    let epoch: u64 = words[1].parse()?;
    let leader = client
        .election("primary")
        .leader()
        .await?
        .context("a leader")?;
    ensure!(
        leader.epoch.get() == epoch && leader.value.as_deref() == Some("10.0.0.7"),
        "{leader:?}"
    );
    let output = run(&server, &["elect", "-n", "primary", "true"]).await?;
    ensure!(output.status.code() == Some(75), "{output:?}");

    let handle = wait_for_line(&handle_file).await?;
    client
        .revoke_lease(&leader.lease_id, &leasehold::Handle::new(handle))
        .await?;
    let output = tokio::time::timeout(Duration::from_secs(5), leading.wait_with_output())
        .await
        .context("leasehold elect did not exit after losing the leadership")??;
    ensure!(output.status.code() == Some(76), "{output:?}");
    ensure!(
        stderr(&output).contains("lost leadership of \"primary\""),
        "{}",
        stderr(&output)
    );

    let output = run(
        &server,
        &[
            "elect",
            "primary",
            "--",
            "sh",
            "-c",
            "echo $LEASEHOLD_EPOCH",
        ],
    )
    .await?;
    ensure!(output.status.success(), "{output:?}");
    let next: u64 = String::from_utf8(output.stdout)?.trim().parse()?;
    ensure!(next > epoch, "{next} after {epoch}");
    ensure!(
        client.election("primary").leader().await?.is_none(),
        "resigned when CMD ended"
    );
    Ok(())
}

/// The next line `observe` prints, within 5 s.
async fn next_line(lines: &mut Lines<BufReader<ChildStdout>>) -> Result<String> {
    tokio::time::timeout(Duration::from_secs(5), lines.next_line())
        .await
        .context("no line in time")??
        .context("observe ended")
}

/// `observe NAME`: the leader now, then one line per new leader (not per candidate), in text
/// and in JSON, until Ctrl-C (exit 130).
#[tokio::test]
async fn observe_prints_each_new_leader_until_interrupted() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let server = TestServer::start(&etcd).await?;
    let client = Client::new(server.url())?;
    let election = client.election("svc").ttl(TTL);

    let mut observing = cli(&server)
        .args(["observe", "svc"])
        .stdout(Stdio::piped())
        .spawn()?;
    let mut lines = BufReader::new(observing.stdout.take().context("stdout")?).lines();
    ensure!(next_line(&mut lines).await? == "svc: no leader");
    let first = election.clone().owner("node-1").campaign("a:1").await?;
    let line = next_line(&mut lines).await?;
    ensure!(
        line == format!(
            "svc: leader a:1 (epoch {}, owner node-1, lease {})",
            first.epoch(),
            first.lease_id()
        ),
        "{line}"
    );
    let waiting = tokio::spawn({
        let election = election.clone();
        async move { election.campaign("b:2").await }
    });
    Api::new(server.url()).wait_for_waiters("svc", 1).await?;
    first.resign().await?;
    let second = tokio::time::timeout(Duration::from_secs(5), waiting).await???;
    let line = next_line(&mut lines).await?;
    ensure!(
        line.starts_with(&format!("svc: leader b:2 (epoch {},", second.epoch())),
        "the new leader, with no line for the candidate before: {line}"
    );

    let mut json = cli(&server)
        .args(["--output", "json", "observe", "svc"])
        .stdout(Stdio::piped())
        .spawn()?;
    let mut json_lines = BufReader::new(json.stdout.take().context("stdout")?).lines();
    let now: Value = serde_json::from_str(&next_line(&mut json_lines).await?)?;
    ensure!(
        now["name"] == "svc"
            && now["leader"]["value"] == "b:2"
            && now["leader"]["epoch"] == second.epoch().get(),
        "{now}"
    );
    second.resign().await?;
    ensure!(next_line(&mut lines).await? == "svc: no leader");
    let gone: Value = serde_json::from_str(&next_line(&mut json_lines).await?)?;
    ensure!(gone["leader"].is_null(), "{gone}");

    for child in [&mut observing, &mut json] {
        kill(
            Pid::from_raw(child.id().context("running")? as i32),
            Signal::SIGINT,
        )?;
        let status = tokio::time::timeout(Duration::from_secs(5), child.wait()).await??;
        ensure!(status.code() == Some(130), "{status:?}");
    }
    Ok(())
}

/// `status NAME` lists the holder and the waiters in order, with position, state, token and
/// owner; in JSON too.
#[tokio::test]
async fn status_shows_the_queue_in_order() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let server = TestServer::start(&etcd).await?;
    let api = Api::new(server.url());
    let client = Client::new(server.url())?;
    let holder = client.lock("q").ttl(TTL).owner("alice").acquire().await?;
    let mut waiting = Vec::new();
    for (n, owner) in ["bob", "carol"].into_iter().enumerate() {
        waiting.push(tokio::spawn({
            let client = client.clone();
            async move {
                client
                    .lock("q")
                    .ttl(TTL)
                    .owner(owner)
                    .wait(Duration::from_secs(20))
                    .acquire()
                    .await
            }
        }));
        api.wait_for_waiters("q", n as u64 + 1).await?;
    }

    let output = run(&server, &["status", "q"]).await?;
    ensure!(output.status.success(), "{output:?}");
    let text = String::from_utf8(output.stdout)?;
    let rows: Vec<Vec<&str>> = text
        .lines()
        .skip_while(|l| !l.starts_with("queue:"))
        .skip(2)
        .map(|l| l.split_whitespace().collect())
        .collect();
    let summary: Vec<(&str, &str, &str)> = rows.iter().map(|r| (r[0], r[1], r[3])).collect();
    ensure!(
        summary
            == [
                ("0", "holds", "alice"),
                ("1", "waits", "bob"),
                ("2", "waits", "carol")
            ],
        "{text}"
    );
    ensure!(
        rows[0][2] == holder.token().to_string(),
        "the holder's token: {text}"
    );

    let output = run(&server, &["--output", "json", "status", "q"]).await?;
    let status: Value = serde_json::from_slice(&output.stdout)?;
    let queue = status["queue"].as_array().context("queue")?;
    let owners: Vec<(u64, &str, bool)> = queue
        .iter()
        .map(|e| {
            (
                e["position"].as_u64().unwrap_or(99),
                e["owner"].as_str().unwrap_or("-"),
                e["holds"].as_bool().unwrap_or(false),
            )
        })
        .collect();
    ensure!(
        owners == [(0, "alice", true), (1, "bob", false), (2, "carol", false)],
        "{status}"
    );
    ensure!(
        queue.iter().all(|e| e.get("handle").is_none()),
        "no handles"
    );
    drop(holder);
    for task in waiting {
        drop(task.await??);
    }
    Ok(())
}
