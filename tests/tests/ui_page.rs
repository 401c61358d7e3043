//! The live status page in a real headless browser (Debian's Chromium, driven by playwright-core
//! from Node.js; `scripts/test` installs both): a lock taken by the test shows up on the page
//! with its holder, and disappears from the page, without a reload, when it is released.
//! Screenshots are saved as `target/ui-held.png` and `target/ui-free.png`.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use leasehold_tests::{Api, EtcdCluster, TestServer};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;

fn target_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_a_holder_appear_and_disappear() -> Result<()> {
    let Ok(modules) = std::env::var("LEASEHOLD_PLAYWRIGHT_DIR") else {
        anyhow::bail!(
            "LEASEHOLD_PLAYWRIGHT_DIR is not set: run scripts/test (it installs Chromium and playwright-core)"
        );
    };
    let etcd = EtcdCluster::start(1).await?;
    let server = TestServer::start(&etcd).await?;
    let api = Api::new(server.url());
    let (status, held) = api
        .post(
            "/v1/locks/ui%2Fseat-1/acquire",
            json!({"ttl": "60s", "owner": "page-tester"}),
        )
        .await?;
    ensure!(status == 200, "{held}");
    let shots = target_dir();
    std::fs::create_dir_all(&shots)?;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("ui/page.mjs");
    let mut browser = Command::new("node")
        .arg(&script)
        .args([&server.url(), "ui/seat-1", "page-tester"])
        .arg(&shots)
        .env("NODE_PATH", &modules)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .context("starting node (scripts/test installs it)")?;
    let mut lines = BufReader::new(browser.stdout.take().context("stdout")?).lines();
    let held_line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
        .await
        .context("the page never showed the holder")??
        .context("the browser script ended")?;
    ensure!(
        held_line.starts_with("HELD")
            && held_line.contains("page-tester")
            && held_line.contains(&held["token"].to_string()),
        "{held_line}"
    );
    let (status, body) = api
        .post(
            "/v1/locks/ui%2Fseat-1/release",
            json!({"token": held["token"]}),
        )
        .await?;
    ensure!(status == 200, "{body}");
    let mut stdin = browser.stdin.take().context("stdin")?;
    stdin.write_all(b"released\n").await?;
    drop(stdin);
    let free_line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .context("the page never showed the lock free")??
        .context("the browser script ended")?;
    ensure!(free_line == "FREE", "{free_line}");
    let exit = browser.wait().await?;
    ensure!(exit.success(), "the browser script failed: {exit}");
    for shot in ["ui-held.png", "ui-free.png"] {
        ensure!(
            std::fs::metadata(shots.join(shot))?.len() > 1000,
            "{shot} is empty"
        );
    }
    Ok(())
}
