//! `leasehold lock`'s CMD as a process, against real servers: it never outlives a lost hold (nor
//! a killed `leasehold`), it is stopped and the lock released on Ctrl-C or SIGTERM even when it
//! ignores them, and in a terminal it reads input and gets Ctrl-C as under `flock`.
//!
//! Several tests have two CMDs append to one log file, A while it (believes it) holds the lock and
//! B once granted: a line of A's after B's is a CMD that outlived its hold.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result};
use leasehold_tests::{Api, EtcdCluster, ServerProcess, TestServer};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};
use tokio::time::Instant;

fn cli(endpoints: &str) -> Command {
    let mut command = Command::new(leasehold_tests::cli_bin!());
    command
        .env("LEASEHOLD_ENDPOINTS", endpoints)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    command
}

/// A shell script in `dir`, run by `sh`: keeps quoting out of the command lines.
fn script(dir: &Path, name: &str, body: &str) -> Result<PathBuf> {
    let path = dir.join(name);
    std::fs::write(&path, body)?;
    Ok(path)
}

/// A's CMD: records its pid, ignores SIGTERM (and SIGINT), and appends `A` to `log` every 20 ms
/// for as long as it lives.
fn stubborn_writer(dir: &Path, log: &Path) -> Result<PathBuf> {
    script(
        dir,
        "a.sh",
        &format!(
            "trap '' TERM INT\necho $$ > {dir}/a.pid\nwhile :; do echo A >> {log}; sleep 0.02; done\n",
            dir = dir.display(),
            log = log.display()
        ),
    )
}

async fn wait_for_file(path: &Path) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(text) = std::fs::read_to_string(path)
            && text.ends_with('\n')
        {
            return Ok(text.trim().to_owned());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{} never written",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Kills a CMD that outlived its test (a regression must not leave it writing forever).
struct Reap(i32);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.0), Signal::SIGKILL);
    }
}

/// True while `pid` runs (a zombie has ended).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            stat.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .is_some_and(|zombie| !zombie)
}

/// No `A` line after the first `B` line.
fn assert_a_stopped_before_b(log: &Path) -> Result<()> {
    let text = std::fs::read_to_string(log)?;
    let lines: Vec<&str> = text.lines().collect();
    let b = lines
        .iter()
        .position(|l| *l == "B")
        .context("B never ran")?;
    let late = lines[b..].iter().filter(|l| **l == "A").count();
    assert_eq!(
        late, 0,
        "A's CMD wrote {late} times after B was granted the lock"
    );
    assert!(b > 0, "A never wrote");
    Ok(())
}

async fn finish(child: Child, within: Duration) -> Result<std::process::Output> {
    tokio::time::timeout(within, child.wait_with_output())
        .await
        .context("leasehold did not exit in time")?
        .map_err(Into::into)
}

/// `kill -9` of `leasehold` (as the OOM killer does) kills CMD at once (the parent-death signal),
/// so CMD is not still at work when the lease expires and B is granted the lock.
#[tokio::test]
async fn kill_9_of_leasehold_kills_cmd() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let server = TestServer::start(&etcd).await?;
    let dir = tempfile::tempdir()?;
    let log = dir.path().join("log");
    let a = stubborn_writer(dir.path(), &log)?;
    let mut holder = cli(&server.url())
        .args(["lock", "--ttl", "2s", "oom", "--", "sh"])
        .arg(&a)
        .spawn()?;
    let cmd_pid: i32 = wait_for_file(&dir.path().join("a.pid")).await?.parse()?;
    let _reap = Reap(cmd_pid);
    let b = cli(&server.url())
        .args(["lock", "--ttl", "2s", "oom", "--", "sh", "-c"])
        .arg(format!("echo B >> {}", log.display()))
        .spawn()?;
    holder.kill().await?;
    let output = finish(b, Duration::from_secs(10)).await?;
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    assert!(!alive(cmd_pid), "CMD outlived leasehold");
    assert_a_stopped_before_b(&log)
}

/// When renewals stop getting through (A's only server is killed), A's CMD (which ignores
/// SIGTERM) is killed before B, waiting on another server, is granted the lock: with the default
/// `--kill-grace`, SIGKILL comes before the lease can expire. A grace that cannot fit in the TTL
/// is refused.
#[tokio::test]
async fn cmd_is_dead_before_anyone_else_is_granted() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let bin = leasehold_tests::server_bin!();
    let mut lonely = ServerProcess::spawn(&bin, &etcd.endpoints(), &[]).await?;
    let other = TestServer::start(&etcd).await?;
    let dir = tempfile::tempdir()?;
    let log = dir.path().join("log");

    let a = stubborn_writer(dir.path(), &log)?;
    let holder = cli(&lonely.url())
        .args(["lock", "--ttl", "2s", "grace", "--", "sh"])
        .arg(&a)
        .stderr(Stdio::piped())
        .spawn()?;
    let cmd_pid: i32 = wait_for_file(&dir.path().join("a.pid")).await?.parse()?;
    let _reap = Reap(cmd_pid);
    let b = cli(&other.url())
        .args(["lock", "--ttl", "2s", "grace", "--", "sh", "-c"])
        .arg(format!("echo B >> {}", log.display()))
        .spawn()?;
    lonely.kill().await?;
    let output = finish(holder, Duration::from_secs(10)).await?;
    assert_eq!(output.status.code(), Some(76), "{output:?}");
    assert!(!alive(cmd_pid), "CMD outlived the hold");
    let output = finish(b, Duration::from_secs(10)).await?;
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    assert_a_stopped_before_b(&log)?;

    let refused = cli(&other.url())
        .args([
            "lock",
            "--ttl",
            "2s",
            "--kill-grace",
            "5s",
            "grace",
            "--",
            "true",
        ])
        .output()
        .await?;
    assert_eq!(refused.status.code(), Some(2), "{refused:?}");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("does not fit"));
    Ok(())
}

/// SIGTERM to `leasehold` is passed on to CMD; a CMD that ignores it gets SIGKILL after
/// `--kill-grace`, and the lock is released.
#[tokio::test]
async fn sigterm_is_forwarded_then_escalated_and_the_lock_released() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let server = TestServer::start(&etcd).await?;
    let api = Api::new(server.url());
    let dir = tempfile::tempdir()?;
    let log = dir.path().join("log");
    let a = stubborn_writer(dir.path(), &log)?;
    let holder = cli(&server.url())
        .args(["lock", "--kill-grace", "0.5s", "term", "--", "sh"])
        .arg(&a)
        .stderr(Stdio::piped())
        .spawn()?;
    let cmd_pid: i32 = wait_for_file(&dir.path().join("a.pid")).await?.parse()?;
    let _reap = Reap(cmd_pid);
    let pid = Pid::from_raw(holder.id().context("running")? as i32);
    kill(pid, Signal::SIGTERM)?;
    let sent = Instant::now();
    let output = finish(holder, Duration::from_secs(5)).await?;
    assert_eq!(output.status.code(), Some(128 + 9), "{output:?}");
    assert!(sent.elapsed() >= Duration::from_millis(500), "no grace");
    assert!(!alive(cmd_pid));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("SIGTERM") && stderr.contains("killing"),
        "{stderr}"
    );
    let (_, status) = api.get("/v1/locks/term").await?;
    assert!(status["holder"].is_null(), "not released: {status}");
    Ok(())
}

/// `leasehold` in a terminal (a pty from `script`), as a user runs it: an interactive CMD reads
/// the terminal (it stays in the foreground process group, as under flock), and Ctrl-C reaches
/// CMD; one that ignores it is killed after `--kill-grace` and the lock is released.
#[tokio::test]
async fn interactive_cmd_gets_the_terminal_and_ctrl_c() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let server = TestServer::start(&etcd).await?;
    let api = Api::new(server.url());
    let dir = tempfile::tempdir()?;
    let cli_bin = leasehold_tests::cli_bin!();
    let in_terminal = |args: &str| -> Result<Child> {
        // `script` gives its command a new session on a pty, as a terminal emulator does, and
        // copies our bytes to it as keystrokes.
        Command::new("script")
            .args(["-q", "-e", "-f", "-c"])
            .arg(format!("exec {} {args}", cli_bin.display()))
            .arg("/dev/null")
            .env("LEASEHOLD_ENDPOINTS", server.url())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("running `script` (util-linux)")
    };

    let reader = script(dir.path(), "read.sh", "read a\necho \"got $a\"\n")?;
    let mut session = in_terminal(&format!("lock tty1 -- sh {}", reader.display()))?;
    session
        .stdin
        .as_mut()
        .context("stdin")?
        .write_all(b"hello\n")
        .await?;
    let output = finish(session, Duration::from_secs(10)).await?;
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("got hello"),
        "{output:?}"
    );

    let stubborn = script(
        dir.path(),
        "stubborn.sh",
        "trap '' INT TERM\necho ready\nwhile :; do sleep 0.05; done\n",
    )?;
    let mut session = in_terminal(&format!(
        "lock --kill-grace 0.5s tty2 -- sh {}",
        stubborn.display()
    ))?;
    let mut stdout = session.stdout.take().context("stdout")?;
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !String::from_utf8_lossy(&seen).contains("ready") {
        let mut buf = [0u8; 256];
        let n = tokio::time::timeout_at(deadline, stdout.read(&mut buf))
            .await
            .context("CMD never started")??;
        anyhow::ensure!(n > 0, "terminal closed: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    session
        .stdin
        .as_mut()
        .context("stdin")?
        .write_all(b"\x03")
        .await?;
    let status = tokio::time::timeout(Duration::from_secs(5), session.wait())
        .await
        .context("Ctrl-C did not end leasehold")??;
    assert_eq!(status.code(), Some(128 + 9));
    let (_, lock) = api.get("/v1/locks/tty2").await?;
    assert!(lock["holder"].is_null(), "not released: {lock}");
    Ok(())
}

/// Ctrl-C (SIGINT) while waiting in line gives up the wait: exit 130, nothing left queued, and a
/// lease given with `--lease` is left alive for its owner.
#[tokio::test]
async fn interrupt_while_waiting_leaves_nothing_queued() -> Result<()> {
    let etcd = EtcdCluster::start(1).await?;
    let server = TestServer::start(&etcd).await?;
    let api = Api::new(server.url());
    let (status, held) = api.acquire_ttl("queue", "30s", "0s").await?;
    assert_eq!(status, 200, "{held}");
    let granted = cli(&server.url())
        .args(["--output", "json", "lease", "grant", "--ttl", "10s"])
        .output()
        .await?;
    let granted: serde_json::Value = serde_json::from_slice(&granted.stdout)?;
    let (id, handle) = (
        granted["lease_id"].as_str().context("lease_id")?,
        granted["handle"].as_str().context("handle")?,
    );
    let waiting = cli(&server.url())
        .args(["lock", "--lease", id, "queue", "--", "true"])
        .env("LEASEHOLD_HANDLE", handle)
        .stderr(Stdio::piped())
        .spawn()?;
    api.wait_for_waiters("queue", 1).await?;
    kill(
        Pid::from_raw(waiting.id().context("running")? as i32),
        Signal::SIGINT,
    )?;
    let output = finish(waiting, Duration::from_secs(5)).await?;
    assert_eq!(output.status.code(), Some(130), "{output:?}");
    api.wait_for_waiters("queue", 0).await?;
    let (status, lease) = api.get(&format!("/v1/leases/{id}")).await?;
    assert_eq!(status, 200, "the caller's lease was revoked: {lease}");
    Ok(())
}
