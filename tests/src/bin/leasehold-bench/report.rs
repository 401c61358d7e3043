//! Every figure of a run, as JSON (`--json`) or as Markdown tables.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::Serialize;

use crate::workloads::{CyclePhase, HandoffPhase, MemoryPhase};

/// What was measured, and how: printed with the figures, so a figure never travels without them.
pub const DEFINITIONS: &[(&str, &str)] = &[
    (
        "window",
        "each phase warms up, then measures a window; an operation counts if it completes inside \
         the window; rate = operations counted / window length",
    ),
    (
        "uncontended",
        "each task has its own lease, granted before the phase (the same for both systems), and \
         acquires then releases a fresh lock name every cycle, with no wait; latency = the whole \
         acquire + release, as the client sees it",
    ),
    (
        "etcd_lock_service",
        "etcd-client's lock(name, lease) and unlock(key) (etcd's v3lock service), each task with \
         its own etcd-client connection",
    ),
    (
        "leasehold",
        "POST /v1/locks/{name}/acquire {lease_id} then /release {token}, with the lease's handle, \
         over HTTP/1.1 keep-alive connections (one per task in practice: a shared pool) to one \
         leasehold-server process, which uses one connection to etcd",
    ),
    (
        "handoff",
        "N contenders, each with its own lease, loop on one lock: acquire (waiting in the FIFO \
         queue), release at once, queue again; the warm-up starts once all N are queued and each \
         has been granted once; handoff \
         latency = from the moment the holder's client sends its release to the moment the next \
         holder's client receives its grant; rate = grants received per second",
    ),
    (
        "queue_ratio",
        "handoff rate with the long queue divided by the rate with the first contender count",
    ),
    (
        "overload",
        "the uncontended workload at N x the largest concurrency; goodput = successful cycles per \
         second; ratio = goodput at N x / goodput at 1x; failed cycles are listed by cause",
    ),
    (
        "costs",
        "per successful operation, between the window's start and end: CPU (utime + stime from \
         /proc/PID/stat) of the server, etcd and this benchmark process; etcd calls the server \
         made (leasehold_etcd_request_duration_seconds_count, by op); gRPC messages etcd \
         received (grpc_server_msg_received_total); raft entries etcd committed \
         (etcd_server_proposals_committed_total); for etcd's lock service the server is idle; \
         other cores = the machine's CPU busy in processes (/proc/stat: user, nice, system, \
         steal) minus the three processes: interference from anything else running; interrupt \
         cores = irq + softirq, where loopback networking (ours too) is charged to no process",
    ),
    (
        "memory",
        "a fresh server; leases granted 64 at a time, then every lease renewed once (keep-alive \
         with its handle) spread evenly over TTL/3, while lock tasks cycle; RSS = VmRSS sampled \
         every 100 ms",
    ),
];

#[derive(Serialize, Default, Debug)]
pub struct Config {
    pub etcd_version: String,
    pub etcd_members: usize,
    pub etcd_data: String,
    pub server: String,
    pub server_log: String,
    pub cores: usize,
    pub warmup_s: f64,
    pub window_s: f64,
    pub quick: bool,
    /// `/proc/loadavg` (1, 5, 15 min) when the run started and ended.
    pub load_before: [f64; 3],
    pub load_after: [f64; 3],
    #[serde(skip_serializing_if = "Option::is_none")]
    pub perf: Option<String>,
}

#[derive(Serialize, Debug)]
pub struct Uncontended {
    pub tasks: usize,
    pub leasehold: CyclePhase,
    pub etcd: CyclePhase,
    /// Leasehold's rate / etcd's rate.
    pub ratio: f64,
    /// Leasehold's p50 - etcd's p50, in ms.
    pub p50_added_ms: f64,
}

#[derive(Serialize, Debug)]
pub struct Overload {
    pub base_tasks: usize,
    pub tasks: usize,
    pub leasehold: CyclePhase,
    pub etcd: CyclePhase,
    /// Goodput at `tasks` / goodput at `base_tasks`.
    pub leasehold_goodput_ratio: f64,
    pub etcd_goodput_ratio: f64,
    /// Leasehold's goodput / etcd's at `tasks`.
    pub ratio: f64,
}

#[derive(Serialize, Debug)]
pub struct Handoff {
    pub contenders: usize,
    pub leasehold: HandoffPhase,
    pub etcd: HandoffPhase,
}

#[derive(Serialize, Debug)]
pub struct Queue {
    pub queued: usize,
    pub versus: usize,
    pub leasehold_rate_ratio: f64,
    pub etcd_rate_ratio: f64,
}

#[derive(Serialize, Default, Debug)]
pub struct Report {
    pub config: Config,
    pub definitions: BTreeMap<&'static str, &'static str>,
    pub uncontended: Vec<Uncontended>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub overload: Option<Overload>,
    pub handoff: Vec<Handoff>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue: Option<Queue>,
    /// The main server's RSS after every phase above, and its peak (VmHWM).
    pub server_rss_mib: f64,
    pub server_peak_rss_mib: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemoryPhase>,
}

impl Report {
    pub fn add_uncontended(&mut self, tasks: usize, leasehold: CyclePhase, etcd: CyclePhase) {
        if self.definitions.is_empty() {
            self.definitions = DEFINITIONS.iter().copied().collect();
        }
        self.uncontended.push(Uncontended {
            tasks,
            ratio: leasehold.latency.rate_per_s / etcd.latency.rate_per_s,
            p50_added_ms: leasehold.latency.p50_ms - etcd.latency.p50_ms,
            leasehold,
            etcd,
        });
    }

    pub fn add_overload(&mut self, base_tasks: usize, leasehold: CyclePhase, etcd: CyclePhase) {
        let base = self.uncontended.iter().find(|u| u.tasks == base_tasks);
        let goodput = |p: &CyclePhase| p.latency.rate_per_s;
        let (lh_base, etcd_base) = base.map_or((f64::NAN, f64::NAN), |b| {
            (goodput(&b.leasehold), goodput(&b.etcd))
        });
        self.overload = Some(Overload {
            base_tasks,
            tasks: leasehold.tasks,
            leasehold_goodput_ratio: goodput(&leasehold) / lh_base,
            etcd_goodput_ratio: goodput(&etcd) / etcd_base,
            ratio: goodput(&leasehold) / goodput(&etcd),
            leasehold,
            etcd,
        });
    }

    pub fn add_handoff(&mut self, leasehold: HandoffPhase, etcd: HandoffPhase) {
        self.handoff.push(Handoff {
            contenders: leasehold.contenders,
            leasehold,
            etcd,
        });
    }

    pub fn add_queue(&mut self, queued: usize, versus: usize) {
        let rate = |n: usize| {
            self.handoff
                .iter()
                .find(|h| h.contenders == n)
                .map(|h| (h.leasehold.latency.rate_per_s, h.etcd.latency.rate_per_s))
        };
        if let (Some(long), Some(short)) = (rate(queued), rate(versus)) {
            self.queue = Some(Queue {
                queued,
                versus,
                leasehold_rate_ratio: long.0 / short.0,
                etcd_rate_ratio: long.1 / short.1,
            });
        }
    }

    /// The Markdown rendering.
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let c = &self.config;
        let _ = writeln!(
            out,
            "etcd {} ({} member, data on {}); server: {}; {} cores shared by etcd, the server and \
             this benchmark; {} s warm-up, then a {} s window per phase; load average {} at start, \
             {} at end{}",
            c.etcd_version,
            c.etcd_members,
            c.etcd_data,
            c.server,
            c.cores,
            c.warmup_s,
            c.window_s,
            load(&c.load_before),
            load(&c.load_after),
            if c.quick {
                " (--quick: the figures mean nothing)"
            } else {
                ""
            }
        );
        if let Some(perf) = &c.perf {
            let _ = writeln!(out, "{perf}");
        }

        let _ = writeln!(
            out,
            "\n### Uncontended acquire + release\n\n{}.\n",
            DEFINITIONS[1].1
        );
        let _ = writeln!(
            out,
            "| tasks | system | cycles | rate | p50 | p99 | max | Leasehold / etcd | other cores |\n\
             |---|---|---|---|---|---|---|---|---|"
        );
        for u in &self.uncontended {
            let _ = writeln!(
                out,
                "{}",
                cycle_row(u.tasks, "etcd lock service", &u.etcd, "")
            );
            let _ = writeln!(
                out,
                "{}",
                cycle_row(
                    u.tasks,
                    "Leasehold HTTP",
                    &u.leasehold,
                    &format!("**{:.2}x** ({:+.2} ms p50)", u.ratio, u.p50_added_ms)
                )
            );
        }

        let _ = writeln!(
            out,
            "\nPer uncontended cycle (CPU in microseconds; cores = average busy cores in the window; \
             interrupts = irq + softirq; other = every other process on the machine, i.e. \
             interference):\n"
        );
        let _ = writeln!(
            out,
            "| tasks | system | server CPU | etcd CPU | bench CPU | server's etcd calls | etcd requests | etcd writes | cores server / etcd / bench / interrupts / other |\n\
             |---|---|---|---|---|---|---|---|---|"
        );
        for u in &self.uncontended {
            for (name, p) in [
                ("etcd lock service", &u.etcd),
                ("Leasehold HTTP", &u.leasehold),
            ] {
                let _ = writeln!(out, "{}", cost_row(u.tasks, name, p));
            }
        }

        if let Some(o) = &self.overload {
            let _ = writeln!(
                out,
                "\n### Overload: goodput at {}x\n\n{}.\n",
                o.tasks / o.base_tasks.max(1),
                DEFINITIONS[6].1
            );
            let _ = writeln!(
                out,
                "| system | goodput at {} tasks | at {} tasks | ratio | p50 / p99 at {} | failed cycles at {} |\n\
                 |---|---|---|---|---|---|",
                o.base_tasks, o.tasks, o.tasks, o.tasks
            );
            let base = self.uncontended.iter().find(|u| u.tasks == o.base_tasks);
            for (name, p, b, ratio) in [
                (
                    "etcd lock service",
                    &o.etcd,
                    base.map(|b| &b.etcd),
                    o.etcd_goodput_ratio,
                ),
                (
                    "Leasehold HTTP",
                    &o.leasehold,
                    base.map(|b| &b.leasehold),
                    o.leasehold_goodput_ratio,
                ),
            ] {
                let _ = writeln!(
                    out,
                    "| {name} | {} | {} | {ratio:.2}x | {} / {} | {} |",
                    b.map_or("-".into(), |b| rate(b.latency.rate_per_s)),
                    rate(p.latency.rate_per_s),
                    ms(p.latency.p50_ms),
                    ms(p.latency.p99_ms),
                    errors(&p.errors)
                );
            }
        }

        let _ = writeln!(out, "\n### Handoff\n\n{}.\n", DEFINITIONS[4].1);
        let _ = writeln!(
            out,
            "| contenders | system | handoffs | rate | p50 | p99 | max | server CPU | etcd CPU | server's etcd calls | etcd writes | other cores |\n\
             |---|---|---|---|---|---|---|---|---|---|---|---|"
        );
        for h in &self.handoff {
            for (name, p) in [
                ("etcd lock service", &h.etcd),
                ("Leasehold HTTP", &h.leasehold),
            ] {
                let l = &p.latency;
                let _ = writeln!(
                    out,
                    "| {} | {name} | {} | {} | {} | {} | {} | {} | {} | {} | {:.2} | {:.2} |{}",
                    h.contenders,
                    int(l.count as f64),
                    rate(l.rate_per_s),
                    ms(l.p50_ms),
                    ms(l.p99_ms),
                    ms(l.max_ms),
                    us(p.costs.server_cpu_us),
                    us(p.costs.etcd_cpu_us),
                    calls(p),
                    p.costs.etcd_writes,
                    p.costs.other_cores,
                    if p.errors.is_empty() {
                        String::new()
                    } else {
                        format!(" errors: {}", errors(&p.errors))
                    }
                );
            }
        }
        if let Some(q) = &self.queue {
            let _ = writeln!(
                out,
                "\nHandoff rate with {} queued / with {}: Leasehold **{:.2}x**, etcd lock service {:.2}x.",
                q.queued, q.versus, q.leasehold_rate_ratio, q.etcd_rate_ratio
            );
        }

        let _ = writeln!(
            out,
            "\nServer RSS after the phases above: {:.1} MiB (peak {:.1} MiB).",
            self.server_rss_mib, self.server_peak_rss_mib
        );
        if let Some(m) = &self.memory {
            let _ = writeln!(
                out,
                "\n### Memory\n\n{}. {} leases (TTL {} s, renewed every {:.1} s), {} lock tasks.\n",
                DEFINITIONS[8].1, m.leases, m.lease_ttl_s, m.renew_period_s, m.lock_tasks
            );
            let _ = writeln!(
                out,
                "| leases | granted | renewals | renewal errors | lock cycles meanwhile | server cores | RSS idle | after grants | **peak** | end |\n\
                 |---|---|---|---|---|---|---|---|---|---|\n\
                 | {} | {} | {} ({}) | {} | {} ({} errors) | {:.2} | {:.1} MiB | {:.1} MiB | **{:.1} MiB** | {:.1} MiB |",
                int(m.leases as f64),
                rate(m.grants_per_s),
                int(m.renewals as f64),
                rate(m.renewals_per_s),
                m.renewal_errors,
                rate(m.lock_cycles_per_s),
                m.lock_errors,
                m.server_cores,
                m.rss_idle_mib,
                m.rss_after_grants_mib,
                m.rss_peak_mib,
                m.rss_end_mib
            );
        }
        let _ = writeln!(
            out,
            "\nCosts: {}.\nWindows: {}.",
            DEFINITIONS[7].1, DEFINITIONS[0].1
        );
        out
    }
}

fn load(l: &[f64; 3]) -> String {
    format!("{:.2} {:.2} {:.2}", l[0], l[1], l[2])
}

/// A count with thousands separators.
fn int(v: f64) -> String {
    let digits = format!("{:.0}", v);
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 && ch.is_ascii_digit() {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

fn rate(v: f64) -> String {
    format!("{}/s", int(v))
}

fn ms(v: f64) -> String {
    format!("{v:.2} ms")
}

fn us(v: f64) -> String {
    format!("{} us", int(v))
}

fn errors(errors: &BTreeMap<String, u64>) -> String {
    if errors.is_empty() {
        return "none".into();
    }
    errors
        .iter()
        .map(|(what, n)| format!("{what} x{n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn calls(p: &HandoffPhase) -> String {
    by_op(p.costs.server_etcd_calls, &p.costs.server_etcd_calls_by_op)
}

fn by_op(total: f64, ops: &BTreeMap<String, f64>) -> String {
    if total < 0.005 {
        return "0".into();
    }
    let parts: Vec<String> = ops.iter().map(|(op, n)| format!("{op} {n:.2}")).collect();
    format!("{total:.2} ({})", parts.join(", "))
}

fn cycle_row(tasks: usize, name: &str, p: &CyclePhase, ratio: &str) -> String {
    let l = &p.latency;
    let mut row = format!(
        "| {tasks} | {name} | {} | {} | {} | {} | {} | {ratio} | {:.2} |",
        int(l.count as f64),
        rate(l.rate_per_s),
        ms(l.p50_ms),
        ms(l.p99_ms),
        ms(l.max_ms),
        p.costs.other_cores,
    );
    if !p.errors.is_empty() {
        let _ = write!(row, " errors: {}", errors(&p.errors));
    }
    if p.perf.is_some() {
        row.push_str(" (perf attached)");
    }
    row
}

fn cost_row(tasks: usize, name: &str, p: &CyclePhase) -> String {
    let c = &p.costs;
    format!(
        "| {tasks} | {name} | {} | {} | {} | {} | {:.2} | {:.2} | {:.2} / {:.2} / {:.2} / {:.2} / {:.2} |",
        us(c.server_cpu_us),
        us(c.etcd_cpu_us),
        us(c.bench_cpu_us),
        by_op(c.server_etcd_calls, &c.server_etcd_calls_by_op),
        c.etcd_requests,
        c.etcd_writes,
        c.server_cores,
        c.etcd_cores,
        c.bench_cores,
        c.interrupt_cores,
        c.other_cores
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands() {
        assert_eq!(int(0.0), "0");
        assert_eq!(int(999.4), "999");
        assert_eq!(int(1000.0), "1,000");
        assert_eq!(int(1234567.0), "1,234,567");
    }
}
