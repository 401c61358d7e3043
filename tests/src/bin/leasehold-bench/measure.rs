//! What the benchmark reads around each measured window: CPU time of the processes (from
//! `/proc/PID/stat`), the Leasehold server's etcd call counters (its `/metrics`), etcd's own
//! request and write counters (etcd's `/metrics`), memory (`/proc/PID/status`) and the load
//! average; and latency summaries.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;

/// Clock ticks per second of `/proc/PID/stat` times.
fn ticks_per_second() -> f64 {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(ticks)) if ticks > 0 => ticks as f64,
        _ => 100.0,
    }
}

/// User + system CPU seconds `pid` (`"self"` for this process) has used, all threads.
pub fn cpu_seconds(pid: &str) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name (field 2) is in parentheses and may contain spaces: count from after it.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("malformed stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 (utime) and 15 (stime) of proc(5); `rest` starts at field 3.
    let utime: u64 = fields.get(11).context("no utime")?.parse()?;
    let stime: u64 = fields.get(12).context("no stime")?.parse()?;
    Ok((utime + stime) as f64 / ticks_per_second())
}

/// A line of `/proc/PID/status` in KiB (`VmRSS`, `VmHWM`).
pub fn status_kib(pid: u32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

/// The 1-minute load average.
pub fn load1() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

/// CPU seconds the whole machine spent busy, from the first line of `/proc/stat`: in processes
/// (user, nice, system, steal) and in interrupts (irq, softirq; loopback networking is done
/// there, and the kernel charges it to no process).
pub fn machine_busy_seconds() -> Result<(f64, f64)> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("empty /proc/stat")?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    let field = |i: usize| fields.get(i).copied().unwrap_or(0);
    // user nice system idle iowait irq softirq steal
    let processes = field(0) + field(1) + field(2) + field(7);
    let interrupts = field(5) + field(6);
    Ok((
        processes as f64 / ticks_per_second(),
        interrupts as f64 / ticks_per_second(),
    ))
}

/// `/proc/loadavg`'s three averages, as `uptime` shows them.
pub fn loadavg() -> [f64; 3] {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut it = text
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(f64::NAN));
    [
        it.next().unwrap_or(f64::NAN),
        it.next().unwrap_or(f64::NAN),
        it.next().unwrap_or(f64::NAN),
    ]
}

/// Where the counters are read.
#[derive(Clone)]
pub struct Probes {
    pub http: reqwest::Client,
    pub server_pid: u32,
    pub server_metrics: String,
    pub etcd_pid: u32,
    pub etcd_metrics: String,
}

/// Every counter at one moment.
#[derive(Clone, Debug)]
pub struct Snapshot {
    at: Instant,
    server_cpu: f64,
    etcd_cpu: f64,
    bench_cpu: f64,
    machine_busy: f64,
    machine_interrupts: f64,
    /// `leasehold_etcd_request_duration_seconds_count` by `op`.
    server_calls: BTreeMap<String, f64>,
    /// `grpc_server_msg_received_total` summed over methods: requests (and stream messages)
    /// etcd received.
    etcd_requests: f64,
    /// `etcd_server_proposals_committed_total`: raft entries committed, i.e. writes.
    etcd_writes: f64,
    load1: f64,
}

/// Sums metric `name`'s samples in Prometheus text, by the value of `label` (or "" for all).
fn sum_by_label(text: &str, name: &str, label: &str) -> BTreeMap<String, f64> {
    let mut sums = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        // Exactly this metric: labels or a space follow the name.
        if !(rest.starts_with('{') || rest.starts_with(' ')) {
            continue;
        }
        let Some(value) = rest
            .rsplit_once(' ')
            .and_then(|(_, v)| v.trim().parse::<f64>().ok())
        else {
            continue;
        };
        let key = if label.is_empty() {
            String::new()
        } else {
            let pattern = format!("{label}=\"");
            rest.split_once(&pattern)
                .and_then(|(_, v)| v.split_once('"'))
                .map(|(v, _)| v.to_owned())
                .unwrap_or_default()
        };
        *sums.entry(key).or_insert(0.0) += value;
    }
    sums
}

impl Probes {
    async fn scrape(&self, url: &str) -> Result<String> {
        Ok(self
            .http
            .get(url)
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?)
    }

    /// Reads every counter now.
    pub async fn snapshot(&self) -> Result<Snapshot> {
        let (server_text, etcd_text) = tokio::try_join!(
            self.scrape(&self.server_metrics),
            self.scrape(&self.etcd_metrics)
        )?;
        let etcd_sum = |name: &str| sum_by_label(&etcd_text, name, "").values().sum::<f64>();
        let (busy, interrupts) = machine_busy_seconds()?;
        Ok(Snapshot {
            at: Instant::now(),
            server_cpu: cpu_seconds(&self.server_pid.to_string())?,
            etcd_cpu: cpu_seconds(&self.etcd_pid.to_string())?,
            bench_cpu: cpu_seconds("self")?,
            machine_busy: busy,
            machine_interrupts: interrupts,
            server_calls: sum_by_label(
                &server_text,
                "leasehold_etcd_request_duration_seconds_count",
                "op",
            ),
            etcd_requests: etcd_sum("grpc_server_msg_received_total"),
            etcd_writes: etcd_sum("etcd_server_proposals_committed_total"),
            load1: load1(),
        })
    }
}

/// What a window cost, per operation (cycle or handoff) and per second.
#[derive(Serialize, Clone, Debug)]
pub struct Costs {
    /// CPU time of the Leasehold server process per operation, in microseconds.
    pub server_cpu_us: f64,
    /// CPU time of etcd per operation.
    pub etcd_cpu_us: f64,
    /// CPU time of the benchmark process itself (the clients) per operation.
    pub bench_cpu_us: f64,
    /// Cores busy on average during the window: server, etcd, benchmark.
    pub server_cores: f64,
    pub etcd_cores: f64,
    pub bench_cores: f64,
    /// Cores busy in any other process on the machine: the interference the window suffered.
    pub other_cores: f64,
    /// Cores busy in interrupts (mostly softirq: loopback networking, ours included).
    pub interrupt_cores: f64,
    /// etcd calls the Leasehold server made per operation (its own metrics), in all and by op.
    pub server_etcd_calls: f64,
    pub server_etcd_calls_by_op: BTreeMap<String, f64>,
    /// gRPC messages etcd received per operation (etcd's metrics): every client's requests.
    pub etcd_requests: f64,
    /// Raft entries etcd committed per operation: durable writes.
    pub etcd_writes: f64,
    /// The 1-minute load average when the window opened and when it closed.
    pub load_before: f64,
    pub load_after: f64,
}

impl Costs {
    /// The difference between two snapshots, divided by `operations`.
    pub fn between(before: &Snapshot, after: &Snapshot, operations: usize) -> Self {
        let n = operations.max(1) as f64;
        let secs = (after.at - before.at).as_secs_f64().max(1e-9);
        let by_op: BTreeMap<String, f64> = after
            .server_calls
            .iter()
            .map(|(op, count)| {
                let delta = count - before.server_calls.get(op).copied().unwrap_or(0.0);
                (op.clone(), delta / n)
            })
            .filter(|(_, per)| *per > 0.0)
            .collect();
        Self {
            server_cpu_us: (after.server_cpu - before.server_cpu) / n * 1e6,
            etcd_cpu_us: (after.etcd_cpu - before.etcd_cpu) / n * 1e6,
            bench_cpu_us: (after.bench_cpu - before.bench_cpu) / n * 1e6,
            server_cores: (after.server_cpu - before.server_cpu) / secs,
            etcd_cores: (after.etcd_cpu - before.etcd_cpu) / secs,
            bench_cores: (after.bench_cpu - before.bench_cpu) / secs,
            other_cores: ((after.machine_busy - before.machine_busy)
                - (after.server_cpu - before.server_cpu)
                - (after.etcd_cpu - before.etcd_cpu)
                - (after.bench_cpu - before.bench_cpu))
                .max(0.0)
                / secs,
            interrupt_cores: (after.machine_interrupts - before.machine_interrupts) / secs,
            server_etcd_calls: by_op.values().sum(),
            server_etcd_calls_by_op: by_op,
            etcd_requests: (after.etcd_requests - before.etcd_requests) / n,
            etcd_writes: (after.etcd_writes - before.etcd_writes) / n,
            load_before: before.load1,
            load_after: after.load1,
        }
    }
}

/// A measured window: operations that *completed* inside it count.
#[derive(Clone, Copy, Debug)]
pub struct Window {
    pub from: Instant,
    pub until: Instant,
}

impl Window {
    /// A window that opens after `warmup` from now and lasts `length`.
    pub fn after(warmup: Duration, length: Duration) -> Self {
        let from = Instant::now() + warmup;
        Self {
            from,
            until: from + length,
        }
    }

    pub fn contains(&self, t: Instant) -> bool {
        t >= self.from && t < self.until
    }

    pub fn closed(&self) -> bool {
        Instant::now() >= self.until
    }

    pub fn length(&self) -> Duration {
        self.until - self.from
    }

    /// Snapshots taken when the window opens and when it closes (run it beside the workload).
    pub async fn snapshots(self, probes: Probes) -> Result<(Snapshot, Snapshot)> {
        tokio::time::sleep_until(self.from.into()).await;
        let before = probes.snapshot().await?;
        tokio::time::sleep_until(self.until.into()).await;
        let after = probes.snapshot().await?;
        Ok((before, after))
    }
}

/// Latency and rate of the operations that completed in a window.
#[derive(Serialize, Clone, Debug)]
pub struct Latency {
    /// Operations completed in the window.
    pub count: usize,
    /// Operations per second.
    pub rate_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    pub fn of(mut samples: Vec<Duration>, window: Duration) -> Result<Self> {
        anyhow::ensure!(
            !samples.is_empty(),
            "no operation completed in the {window:?} window"
        );
        samples.sort();
        let pick = |q: f64| {
            let i = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1;
            samples[i].as_secs_f64() * 1000.0
        };
        Ok(Self {
            count: samples.len(),
            rate_per_s: samples.len() as f64 / window.as_secs_f64(),
            p50_ms: pick(0.50),
            p99_ms: pick(0.99),
            max_ms: pick(1.0),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_prometheus_samples_by_label() {
        let text = "# HELP x\n\
            leasehold_etcd_request_duration_seconds_count{op=\"txn\"} 10\n\
            leasehold_etcd_request_duration_seconds_count{op=\"get\"} 2\n\
            leasehold_etcd_request_duration_seconds_count{op=\"txn\",x=\"y\"} 1\n\
            leasehold_etcd_request_duration_seconds_sum{op=\"txn\"} 99\n";
        let sums = sum_by_label(text, "leasehold_etcd_request_duration_seconds_count", "op");
        assert_eq!(sums["txn"], 11.0);
        assert_eq!(sums["get"], 2.0);
        assert_eq!(sums.len(), 2);
        let all = sum_by_label(
            "etcd_server_proposals_committed_total 42\n",
            "etcd_server_proposals_committed_total",
            "",
        );
        assert_eq!(all[""], 42.0);
    }

    #[test]
    fn percentiles_pick_a_sample() {
        let samples = (1..=100).map(Duration::from_millis).collect();
        let l = Latency::of(samples, Duration::from_secs(1)).unwrap();
        assert_eq!(l.count, 100);
        assert_eq!(l.p50_ms, 50.0);
        assert_eq!(l.p99_ms, 99.0);
        assert_eq!(l.max_ms, 100.0);
    }

    #[test]
    fn reads_own_cpu_time() {
        assert!(cpu_seconds("self").unwrap() >= 0.0);
    }
}
