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
    let schema_url = schema.clone();
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
    // It really ran: every operation of the document was tested, in every phase, with many
    // generated cases, all of which passed.
    let document: serde_json::Value = reqwest::get(&schema_url).await?.json().await?;
    // Schemathesis leaves out the operation that serves the document it tests.
    let operations = document["paths"]
        .as_object()
        .context("paths")?
        .iter()
        .filter(|(path, _)| path.as_str() != "/openapi.json")
        .map(|(_, item)| {
            item.as_object().map_or(0, |methods| {
                methods
                    .keys()
                    .filter(|m| {
                        ["get", "put", "post", "delete", "patch", "head", "options"]
                            .contains(&m.as_str())
                    })
                    .count()
            })
        })
        .sum::<usize>();
    let checked = check_report(&report, operations)
        .with_context(|| format!("schemathesis did not test what it should:\n{report}"))?;
    println!("fuzz_openapi: {checked}");
    Ok(())
}

/// What a schemathesis report must show for `operations` operations: all selected and tested,
/// the four phases run and passed, at least 25 generated cases per operation, all passed.
fn check_report(report: &str, operations: usize) -> Result<String> {
    let after = |label: &str| -> Result<&str> {
        let at = report
            .find(label)
            .with_context(|| format!("no `{label}` in the report"))?;
        Ok(report[at + label.len()..].trim_start())
    };
    let selected = after("Selected:")?
        .split_whitespace()
        .next()
        .context("Selected")?;
    anyhow::ensure!(
        selected == format!("{operations}/{operations}"),
        "selected {selected}, the document has {operations} operations"
    );
    let tested: usize = after("Tested:")?
        .split_whitespace()
        .next()
        .context("Tested")?
        .parse()?;
    anyhow::ensure!(
        tested == operations,
        "tested {tested} of {operations} operations"
    );
    let phases = after("Test Phases:")?;
    for phase in ["Examples", "Coverage", "Fuzzing", "Stateful"] {
        anyhow::ensure!(
            phases
                .lines()
                .take(4)
                .any(|l| l.trim() == format!("\u{2705} {phase}")),
            "phase {phase} did not run and pass"
        );
    }
    let cases = after("Test cases:")?
        .lines()
        .next()
        .context("Test cases")?
        .trim();
    let (generated, passed) = cases
        .split_once(" generated, ")
        .with_context(|| format!("test cases: {cases}"))?;
    let generated: usize = generated.parse()?;
    anyhow::ensure!(
        passed == format!("{generated} passed"),
        "not every case passed: {cases}"
    );
    anyhow::ensure!(
        generated >= 25 * operations,
        "only {generated} cases for {operations} operations"
    );
    Ok(format!(
        "{tested} of {operations} operations tested in 4 phases, {generated} cases, all passed"
    ))
}

#[test]
fn a_report_that_tested_too_little_is_refused() {
    let good = "API Operations:\n  Selected: 11/11\n  Tested: 11\n\nTest Phases:\n  \u{2705} Examples\n  \u{2705} Coverage\n  \u{2705} Fuzzing\n  \u{2705} Stateful\n\nTest cases:\n  898 generated, 898 passed\n";
    assert!(check_report(good, 11).is_ok());
    for (bad, why) in [
        (
            good.replace("Tested: 11", "Tested: 5"),
            "operations left out",
        ),
        (
            good.replace("Selected: 11/11", "Selected: 5/11"),
            "a filter",
        ),
        (
            good.replace("\u{2705} Fuzzing", "\u{23ed} Fuzzing (skipped)"),
            "a phase skipped",
        ),
        (
            good.replace("898 generated, 898 passed", "40 generated, 40 passed"),
            "too few",
        ),
        (
            good.replace("898 passed", "897 passed, 1 failed"),
            "a failure",
        ),
        (good.replace("Test cases:", "Cases:"), "no count"),
    ] {
        assert!(check_report(&bad, 11).is_err(), "{why}");
    }
    // A document with more operations than were tested.
    assert!(check_report(good, 12).is_err());
}

/// `LEASEHOLD_SCHEMATHESIS`, else `schemathesis` on `PATH`. Missing is a failure (scripts/test
/// installs it) unless `LEASEHOLD_SKIP_SCHEMATHESIS=1`.
fn schemathesis() -> Result<Option<String>> {
    if std::env::var("LEASEHOLD_SKIP_SCHEMATHESIS").as_deref() == Ok("1") {
        leasehold_tests::report_skip(
            "fuzz_openapi: OpenAPI fuzzing (LEASEHOLD_SKIP_SCHEMATHESIS=1)",
        );
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
