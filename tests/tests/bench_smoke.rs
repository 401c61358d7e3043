//! `leasehold-bench --quick --json` runs end to end and reports every figure, well-formed. Only
//! the presence and shape of the figures are checked, never their values: timings on a shared
//! machine prove nothing, and the benchmark is for people to read.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::Value;

/// A finite, non-negative number at `path` (`a.b.c`) of `v`.
fn number(v: &Value, path: &str) -> Result<f64> {
    let mut at = v;
    for part in path.split('.') {
        at = at
            .get(part)
            .with_context(|| format!("missing {path} (no {part})"))?;
    }
    let n = at
        .as_f64()
        .with_context(|| format!("{path} is not a number: {at}"))?;
    ensure!(n.is_finite() && n >= 0.0, "{path} is not well-formed: {n}");
    Ok(n)
}

fn object<'a>(v: &'a Value, path: &str) -> Result<&'a serde_json::Map<String, Value>> {
    v.pointer(&format!("/{}", path.replace('.', "/")))
        .and_then(Value::as_object)
        .with_context(|| format!("missing object {path}"))
}

const LATENCY: &[&str] = &[
    "latency.count",
    "latency.rate_per_s",
    "latency.p50_ms",
    "latency.p99_ms",
    "latency.max_ms",
];

const COSTS: &[&str] = &[
    "costs.server_cpu_us",
    "costs.etcd_cpu_us",
    "costs.bench_cpu_us",
    "costs.server_cores",
    "costs.etcd_cores",
    "costs.bench_cores",
    "costs.other_cores",
    "costs.interrupt_cores",
    "costs.server_etcd_calls",
    "costs.etcd_requests",
    "costs.etcd_writes",
    "costs.load_before",
    "costs.load_after",
];

/// A cycle or handoff phase: latency, costs, the error map.
fn phase(v: &Value, what: &str) -> Result<()> {
    for field in LATENCY.iter().chain(COSTS) {
        number(v, field).with_context(|| what.to_owned())?;
    }
    ensure!(
        number(v, "latency.count")? >= 1.0,
        "{what}: no operation counted"
    );
    object(v, "costs.server_etcd_calls_by_op").with_context(|| what.to_owned())?;
    object(v, "errors").with_context(|| what.to_owned())?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quick_json_run_reports_every_figure() -> Result<()> {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_leasehold-bench"));
    command
        .args(["--quick", "--json", "--shm"])
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .context("leasehold-bench --quick did not finish within 60 s")??;
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(output.status.success(), "{}\n{stderr}", output.status);
    let report: Value = serde_json::from_slice(&output.stdout)
        .with_context(|| format!("stdout is not JSON; stderr:\n{stderr}"))?;

    for field in ["etcd_version", "etcd_data", "server", "server_log"] {
        ensure!(
            report["config"][field]
                .as_str()
                .is_some_and(|s| !s.is_empty()),
            "config.{field} missing"
        );
    }
    for field in ["cores", "warmup_s", "window_s", "etcd_members"] {
        number(&report, &format!("config.{field}"))?;
    }
    ensure!(report["config"]["quick"] == true);
    for field in ["load_before", "load_after"] {
        ensure!(
            report["config"][field]
                .as_array()
                .is_some_and(|a| a.len() == 3),
            "config.{field}"
        );
    }
    for key in [
        "window",
        "uncontended",
        "etcd_lock_service",
        "leasehold",
        "handoff",
        "queue_ratio",
        "overload",
        "costs",
        "memory",
    ] {
        ensure!(
            report["definitions"][key]
                .as_str()
                .is_some_and(|s| !s.is_empty()),
            "definitions.{key} missing"
        );
    }

    let uncontended = report["uncontended"].as_array().context("uncontended")?;
    ensure!(uncontended.len() == 2, "--quick measures two concurrencies");
    for u in uncontended {
        number(u, "tasks")?;
        number(u, "ratio")?;
        ensure!(u["p50_added_ms"].as_f64().is_some_and(f64::is_finite));
        phase(&u["leasehold"], "uncontended leasehold")?;
        phase(&u["etcd"], "uncontended etcd")?;
    }

    let overload = &report["overload"];
    for field in [
        "base_tasks",
        "tasks",
        "leasehold_goodput_ratio",
        "etcd_goodput_ratio",
        "ratio",
    ] {
        number(overload, field)?;
    }
    phase(&overload["leasehold"], "overload leasehold")?;
    phase(&overload["etcd"], "overload etcd")?;

    let handoff = report["handoff"].as_array().context("handoff")?;
    ensure!(
        handoff.len() == 3,
        "two contender counts and the long queue"
    );
    for h in handoff {
        number(h, "contenders")?;
        for system in ["leasehold", "etcd"] {
            phase(&h[system], &format!("handoff {system}"))?;
            number(&h[system], "queue_filled_s")?;
            number(&h[system], "cycled_once_s")?;
        }
    }
    for field in [
        "queued",
        "versus",
        "leasehold_rate_ratio",
        "etcd_rate_ratio",
    ] {
        number(&report["queue"], field)?;
    }

    number(&report, "server_rss_mib")?;
    number(&report, "server_peak_rss_mib")?;
    for field in [
        "leases",
        "lease_ttl_s",
        "grants_per_s",
        "renew_period_s",
        "renewals",
        "renewal_errors",
        "renewals_per_s",
        "lock_tasks",
        "lock_cycles",
        "lock_cycles_per_s",
        "lock_errors",
        "rss_idle_mib",
        "rss_after_grants_mib",
        "rss_peak_mib",
        "rss_end_mib",
        "server_cores",
    ] {
        number(&report["memory"], field)?;
    }
    Ok(())
}

/// `--help` names the flags the README and docs/performance.md use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn help_lists_the_flags() -> Result<()> {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_leasehold-bench"))
        .arg("--help")
        .output()
        .await?;
    ensure!(output.status.success());
    let text = String::from_utf8_lossy(&output.stdout);
    for flag in [
        "--quick",
        "--json",
        "--shm",
        "--concurrency",
        "--queued",
        "--leases",
    ] {
        ensure!(text.contains(flag), "--help does not mention {flag}");
    }
    Ok(())
}
