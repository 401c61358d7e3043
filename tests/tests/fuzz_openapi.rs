//! Hostile input from the API's own OpenAPI document: schemathesis (PyPI) generates requests
//! for every operation (examples, boundary values, random fuzzing, stateful sequences) against a
//! live server on real etcd.

use std::process::Command;

use anyhow::{Context, Result};
use leasehold_tests::{EtcdCluster, TestServer};

/// No request makes the server answer a 5xx (etcd is up, so not even 503), and every response
/// matches the OpenAPI document: status codes, content types, and body schemas.
///
/// One check is left out: `positive_data_acceptance` (ST202, "schema-valid request rejected").
/// JSON Schema cannot say everything the server checks (names are at most 256 *bytes*, TTLs are
/// bounded humantime strings, exactly one of `lease_id` and `ttl`), so some schema-valid
/// requests get a correct 400 with a stable code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_fuzzing_finds_no_server_error() -> Result<()> {
    let Some(schemathesis) = schemathesis()? else {
        return Ok(());
    };
    let etcd = EtcdCluster::start(1).await?;
    let server = TestServer::start(&etcd).await?;
    let schema = format!("{}/openapi.json", server.url());
    let output = tokio::task::spawn_blocking(move || {
        Command::new(schemathesis)
            .args(["run", &schema])
            .args(["--max-examples", "50", "--generation-deterministic"])
            .args(["--exclude-checks", "positive_data_acceptance"])
            .args(["--request-timeout", "10"])
            .env("NO_COLOR", "1")
            .output()
    })
    .await??;
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    println!("{report}");
    anyhow::ensure!(
        output.status.success(),
        "schemathesis found failures:\n{report}"
    );
    anyhow::ensure!(
        report.contains("passed"),
        "schemathesis ran no test:\n{report}"
    );
    Ok(())
}

/// `LEASEHOLD_SCHEMATHESIS`, else `schemathesis` on `PATH`. Missing is a failure (scripts/test
/// installs it) unless `LEASEHOLD_SKIP_SCHEMATHESIS=1`.
fn schemathesis() -> Result<Option<String>> {
    if std::env::var("LEASEHOLD_SKIP_SCHEMATHESIS").as_deref() == Ok("1") {
        eprintln!("!!! LEASEHOLD_SKIP_SCHEMATHESIS=1: OpenAPI fuzzing SKIPPED");
        return Ok(None);
    }
    let bin = std::env::var("LEASEHOLD_SCHEMATHESIS").unwrap_or_else(|_| "schemathesis".into());
    Command::new(&bin)
        .arg("--version")
        .output()
        .with_context(|| {
            format!("{bin} not found: run scripts/test (it installs schemathesis), or set LEASEHOLD_SCHEMATHESIS")
        })?;
    Ok(Some(bin))
}
