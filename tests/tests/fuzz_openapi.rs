//! Hostile input from the API's own OpenAPI document: schemathesis (PyPI) generates requests
//! for every operation (examples, boundary values, random fuzzing, stateful sequences) against a
//! live server on real etcd.

use std::process::Command;

use anyhow::{Context, Result};
use leasehold_tests::{EtcdCluster, TestServer};

/// The event-stream operations, which schemathesis tests in a run of their own: it reads an
/// endless stream until its request timeout, so they get a short timeout and fewer cases, and
/// no stateful phase (nothing links from a stream's answer).
const STREAMS: &str = "/watch$|/observe$|^/v1/events$";

/// No request makes the server answer a 5xx (etcd is up, so not even 503), and every response
/// matches the OpenAPI document: status codes, content types, body schemas, and each event of
/// a stream (its `data` against the document's `contentSchema`).
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
    let requests_and_answers = run(
        &schemathesis,
        &schema,
        &["--exclude-path-regex", STREAMS],
        &["--max-examples", "50", "--request-timeout", "10"],
    );
    let streams = run(
        &schemathesis,
        &schema,
        &["--include-path-regex", STREAMS],
        &[
            "--max-examples",
            "10",
            "--request-timeout",
            "1",
            "--phases",
            "examples,coverage,fuzzing",
        ],
    );
    // Concurrently: the stream run mostly waits for its streams to time out. (Its examples
    // phase finds no documented examples to run, so it is not required to pass.)
    let (requests_and_answers, streams) = tokio::try_join!(requests_and_answers, streams)?;
    let (requests_and_answers, streams) = (requests_and_answers?, streams?);

    // It really ran: every operation of the document was tested, in every phase, with many
    // generated cases, all of which passed.
    let document: serde_json::Value = reqwest::get(&schema).await?.json().await?;
    let (mut plain, mut streaming) = (0, 0);
    // Schemathesis leaves out the operation that serves the document it tests.
    for (path, item) in document["paths"].as_object().context("paths")? {
        if path == "/openapi.json" {
            continue;
        }
        let methods = item.as_object().map_or(0, |methods| {
            methods
                .keys()
                .filter(|m| {
                    ["get", "put", "post", "delete", "patch", "head", "options"]
                        .contains(&m.as_str())
                })
                .count()
        });
        // What STREAMS matches.
        if path.ends_with("/watch") || path.ends_with("/observe") || path == "/v1/events" {
            streaming += methods;
        } else {
            plain += methods;
        }
    }
    anyhow::ensure!(
        streaming == 3,
        "{streaming} stream operations: update STREAMS"
    );
    let checked = check_report(
        &requests_and_answers,
        plain,
        plain + streaming,
        &ALL_PHASES,
        25,
    )
    .with_context(|| {
        format!("schemathesis did not test what it should:\n{requests_and_answers}")
    })?;
    let checked_streams =
        check_report(&streams, streaming, plain + streaming, &ALL_PHASES[1..3], 5).with_context(
            || format!("schemathesis did not test the streams as it should:\n{streams}"),
        )?;
    println!("fuzz_openapi: {checked}; streams: {checked_streams}");
    Ok(())
}

const ALL_PHASES: [&str; 4] = ["Examples", "Coverage", "Fuzzing", "Stateful"];

/// Runs schemathesis on `operations` (a filter) with `settings`; its report if it found
/// nothing, else an error holding the report.
async fn run(
    bin: &str,
    schema: &str,
    operations: &[&str],
    settings: &[&str],
) -> Result<Result<String>> {
    let mut command = Command::new(bin);
    command
        .args(["run", schema])
        .args(operations)
        .args(settings)
        .args(["--generation-deterministic"])
        .args(["--exclude-checks", "positive_data_acceptance"])
        .env("NO_COLOR", "1");
    let output = tokio::task::spawn_blocking(move || command.output()).await??;
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    println!("{report}");
    Ok(if output.status.success() {
        Ok(report)
    } else {
        Err(anyhow::anyhow!("schemathesis found failures:\n{report}"))
    })
}

/// What a schemathesis report must show for `operations` operations (of `of_total` in the
/// document, the others left to another run): all selected and tested,
/// `phases` run and passed, at least `per_operation` generated cases per operation, all passed.
fn check_report(
    report: &str,
    operations: usize,
    of_total: usize,
    phases: &[&str],
    per_operation: usize,
) -> Result<String> {
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
        selected == format!("{operations}/{of_total}"),
        "selected {selected}, expected {operations} of the document's {of_total} operations"
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
    let run = after("Test Phases:")?;
    for phase in phases {
        anyhow::ensure!(
            run.lines()
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
        generated >= per_operation * operations,
        "only {generated} cases for {operations} operations"
    );
    Ok(format!(
        "{tested} of {operations} operations tested in {} phases, {generated} cases, all passed",
        phases.len()
    ))
}

#[test]
fn a_report_that_tested_too_little_is_refused() {
    let good = "API Operations:\n  Selected: 11/11\n  Tested: 11\n\nTest Phases:\n  \u{2705} Examples\n  \u{2705} Coverage\n  \u{2705} Fuzzing\n  \u{2705} Stateful\n\nTest cases:\n  898 generated, 898 passed\n";
    assert!(check_report(good, 11, 11, &ALL_PHASES, 25).is_ok());
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
        assert!(
            check_report(&bad, 11, 11, &ALL_PHASES, 25).is_err(),
            "{why}"
        );
    }
    // A document with more operations than were tested.
    assert!(check_report(good, 12, 12, &ALL_PHASES, 25).is_err());
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
