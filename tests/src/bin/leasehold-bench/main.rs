//! Leasehold beside etcd's own lock service, on the same etcd, in one run.
//!
//! Starts a single-member etcd (data dir on disk by default, as users run it; `--shm` for tmpfs)
//! and one `leasehold-server` as a separate process (by default this very binary, re-executed as
//! the server: the same release build of the same server code), then measures, for Leasehold over
//! HTTP and for etcd's lock service (etcd-client's `lock`/`unlock` with an existing lease):
//! - uncontended acquire + release at 1, 16 and 128 tasks: rate, p50, p99, the ratio, and per
//!   cycle the CPU of the server, of etcd and of this process, the server's etcd calls and etcd's
//!   requests and writes;
//! - overload: the same at 5x the largest concurrency; goodput (successful cycles/s) against 1x;
//! - handoff with 8, 100 and 1,000 contenders on one lock (the rate with 1,000 queued against 8);
//! - memory: a fresh server, 10,000 leases renewed in the background while locks cycle.
//!
//! See `--help` and `docs/performance.md`.

mod measure;
mod report;
mod workloads;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use leasehold_tests::{Api, EtcdCluster, ServerProcess};

use crate::measure::Probes;
use crate::report::{Config, Report};
use crate::workloads::{Ctx, PerfRequest, System};

/// When set, this binary is the server: `leasehold_server::cli::main()`, nothing added.
const SERVE_ENV: &str = "LEASEHOLD_BENCH_SERVE";

const HELP: &str = "\
leasehold-bench: Leasehold beside etcd's own lock service, on the same etcd, in one run

USAGE: leasehold-bench [OPTIONS]

  --quick               tiny counts and windows (seconds, for the smoke test); figures meaningless
  --json                print every figure as one JSON document (progress goes to stderr)
  --json-out PATH       also write that JSON document to PATH
  --shm                 etcd's data dir on /dev/shm (tmpfs) instead of disk
  --seconds S           measured window per phase [5]
  --warmup S            warm-up before each window [1]
  --concurrency LIST    uncontended tasks [1,16,128]
  --overload N          overload phase at N x the largest concurrency, 0 to skip [5]
  --contenders LIST     handoff contenders [8,100]
  --queued N            handoff with N queued waiters, compared with the first contenders [1000]
  --leases N            live leases in the memory phase, 0 to skip [10000]
  --lease-ttl S         their TTL; each is renewed once per TTL/3 [60]
  --server-bin PATH     run this leasehold-server instead of this binary re-executed as one
  --perf PATH           perf record -g the server during the Leasehold phase at --perf-tasks
  --perf-tasks N        [16]
";

struct Args {
    quick: bool,
    json: bool,
    json_out: Option<PathBuf>,
    shm: bool,
    seconds: f64,
    warmup: f64,
    concurrency: Vec<usize>,
    overload: usize,
    contenders: Vec<usize>,
    queued: usize,
    leases: usize,
    lease_ttl: u64,
    server_bin: Option<PathBuf>,
    perf: Option<PathBuf>,
    perf_tasks: usize,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        quick: false,
        json: false,
        json_out: None,
        shm: false,
        seconds: 5.0,
        warmup: 1.0,
        concurrency: vec![1, 16, 128],
        overload: 5,
        contenders: vec![8, 100],
        queued: 1000,
        leases: 10_000,
        lease_ttl: 60,
        server_bin: None,
        perf: None,
        perf_tasks: 16,
    };
    let raw: Vec<String> = std::env::args().skip(1).collect();
    // --quick sets small defaults first; explicit flags still win.
    if raw.iter().any(|a| a == "--quick") {
        args.quick = true;
        args.seconds = 0.5;
        args.warmup = 0.1;
        args.concurrency = vec![1, 4];
        args.contenders = vec![3, 6];
        args.queued = 20;
        args.leases = 200;
        args.lease_ttl = 3;
    }
    let mut it = raw.into_iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        let list = |v: String| -> Result<Vec<usize>> {
            v.split(',')
                .map(|n| n.trim().parse().context("not a number"))
                .collect()
        };
        match flag.as_str() {
            "--quick" => {}
            "--json" => args.json = true,
            "--json-out" => args.json_out = Some(value()?.into()),
            "--shm" => args.shm = true,
            "--seconds" => args.seconds = value()?.parse()?,
            "--warmup" => args.warmup = value()?.parse()?,
            "--concurrency" => args.concurrency = list(value()?)?,
            "--overload" => args.overload = value()?.parse()?,
            "--contenders" => args.contenders = list(value()?)?,
            "--queued" => args.queued = value()?.parse()?,
            "--leases" => args.leases = value()?.parse()?,
            "--lease-ttl" => args.lease_ttl = value()?.parse()?,
            "--server-bin" => args.server_bin = Some(value()?.into()),
            "--perf" => args.perf = Some(value()?.into()),
            "--perf-tasks" => args.perf_tasks = value()?.parse()?,
            "--help" | "-h" => {
                print!("{HELP}");
                std::process::exit(0);
            }
            other => bail!("unknown flag {other} (see --help)"),
        }
    }
    if args.concurrency.is_empty() || args.contenders.is_empty() {
        bail!("--concurrency and --contenders need at least one value");
    }
    if args.concurrency.contains(&0) || args.contenders.iter().any(|&c| c < 2) || args.queued == 1 {
        bail!("concurrency must be >= 1, contenders and --queued >= 2 (or --queued 0 to skip)");
    }
    if args.seconds <= 0.0 || args.warmup < 0.0 {
        bail!("--seconds must be > 0 and --warmup >= 0");
    }
    if args.lease_ttl < 3 {
        bail!("--lease-ttl must be at least 3 (etcd's minimum TTL is 2 s)");
    }
    Ok(args)
}

fn main() -> ExitCode {
    if std::env::var_os(SERVE_ENV).is_some() {
        return leasehold_server::cli::main();
    }
    let args = match parse_args() {
        Ok(args) => args,
        Err(err) => {
            eprintln!("leasehold-bench: {err:#}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("leasehold-bench: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("leasehold-bench: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Progress, on stderr.
macro_rules! progress {
    ($($arg:tt)*) => { eprintln!("leasehold-bench: {}", format!($($arg)*)) };
}

/// How the server under test is started.
struct ServerCommand {
    bin: PathBuf,
    env: Vec<(&'static str, &'static str)>,
    /// What the report says about it.
    describe: String,
}

/// The server process to run: `--server-bin`, else this binary with [`SERVE_ENV`] set.
fn server_command(args: &Args) -> Result<ServerCommand> {
    // The server's own default log level, as users run it (the kit's default is `warn`).
    let mut env = vec![("RUST_LOG", "info")];
    match &args.server_bin {
        Some(bin) => Ok(ServerCommand {
            bin: bin.clone(),
            env,
            describe: format!("{} (--server-bin)", bin.display()),
        }),
        None => {
            let me = std::env::current_exe().context("locating this binary")?;
            env.push((SERVE_ENV, "1"));
            Ok(ServerCommand {
                describe: format!(
                    "{} re-executed as leasehold-server (same build, same server code)",
                    me.display()
                ),
                bin: me,
                env,
            })
        }
    }
}

async fn spawn_server(
    args: &Args,
    etcd: &EtcdCluster,
    log: &std::path::Path,
) -> Result<ServerProcess> {
    let command = server_command(args)?;
    ServerProcess::spawn_full(
        &command.bin,
        &etcd.endpoints(),
        &[],
        &command.env,
        Some(log),
        None,
    )
    .await
}

/// The etcd binary's version line.
fn etcd_version() -> String {
    let bin = std::env::var_os("LEASEHOLD_ETCD_BIN").unwrap_or_else(|| "etcd".into());
    std::process::Command::new(bin)
        .arg("--version")
        .output()
        .ok()
        .and_then(|out| {
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .find_map(|l| l.strip_prefix("etcd Version:").map(|v| v.trim().to_owned()))
        })
        .unwrap_or_else(|| "unknown".into())
}

/// The filesystem type of the mount that holds `path` (from /proc/mounts).
fn filesystem_of(path: &std::path::Path) -> String {
    let path = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (_, at, fs) = (fields.next()?, fields.next()?, fields.next()?);
            path.starts_with(at).then(|| (at.len(), fs.to_owned()))
        })
        .max()
        .map(|(_, fs)| fs)
        .unwrap_or_else(|| "unknown".into())
}

async fn run(args: Args) -> Result<()> {
    let load_before = measure::loadavg();
    let (data_root, etcd) = if args.shm {
        (
            PathBuf::from("/dev/shm"),
            EtcdCluster::start(1).await.context("starting etcd")?,
        )
    } else {
        (
            std::env::temp_dir(),
            EtcdCluster::start_on_disk(1)
                .await
                .context("starting etcd")?,
        )
    };
    let etcd_data = format!(
        "{} ({}: {})",
        if args.shm { "tmpfs" } else { "disk" },
        data_root.display(),
        filesystem_of(&data_root)
    );
    let logs = tempfile::Builder::new()
        .prefix("leasehold-bench-")
        .tempdir()?;
    let server = spawn_server(&args, &etcd, &logs.path().join("server.log")).await?;
    let server_pid = server.pid().context("server pid")?;
    let etcd_pid = etcd.pid(0).context("etcd pid")?;
    let server_text = server_command(&args)?.describe;
    progress!(
        "etcd {} (pid {etcd_pid}, data {etcd_data}), server pid {server_pid}, load average {:?}",
        etcd_version(),
        load_before
    );

    let http = reqwest::Client::new();
    let probes = Probes {
        http,
        server_pid,
        server_metrics: format!("{}/metrics", server.url()),
        etcd_pid,
        etcd_metrics: format!("{}/metrics", etcd.endpoint(0)),
    };
    let etcd_client = etcd_client::Client::connect(
        etcd.endpoints(),
        Some(etcd_client::ConnectOptions::new().with_connect_timeout(Duration::from_secs(2))),
    )
    .await?;
    let run_id = format!(
        "bench{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis()
    );
    let ctx = Ctx {
        api: Api::new(server.url()),
        etcd: etcd_client,
        etcd_endpoints: etcd.endpoints(),
        probes,
        key_prefix: "/leasehold".into(),
        run: run_id.clone(),
        warmup: Duration::from_secs_f64(args.warmup),
        window: Duration::from_secs_f64(args.seconds),
        perf: args.perf.clone().map(|out| PerfRequest {
            out,
            tasks: args.perf_tasks,
        }),
        perf_note: Default::default(),
    };

    let mut report = Report::default();
    for &tasks in &args.concurrency {
        let mut pair = Vec::new();
        for system in [System::Etcd, System::Leasehold] {
            progress!("uncontended, {tasks} tasks, {}", system.describe());
            pair.push(workloads::cycles(&ctx, system, tasks, "u").await?);
        }
        let leasehold = pair.pop().context("leasehold")?;
        let etcd = pair.pop().context("etcd")?;
        report.add_uncontended(tasks, leasehold, etcd);
    }

    if args.overload > 0 {
        let base = *args.concurrency.iter().max().context("concurrency")?;
        let tasks = base * args.overload;
        let mut pair = Vec::new();
        for system in [System::Etcd, System::Leasehold] {
            progress!("overload, {tasks} tasks, {}", system.describe());
            pair.push(workloads::cycles(&ctx, system, tasks, "o").await?);
        }
        let leasehold = pair.pop().context("leasehold")?;
        let etcd = pair.pop().context("etcd")?;
        report.add_overload(base, leasehold, etcd);
    }

    let mut contenders = args.contenders.clone();
    if args.queued > 0 && !contenders.contains(&args.queued) {
        contenders.push(args.queued);
    }
    for &n in &contenders {
        let mut pair = Vec::new();
        for system in [System::Etcd, System::Leasehold] {
            progress!("handoff, {n} contenders, {}", system.describe());
            pair.push(workloads::handoffs(&ctx, system, n, "h").await?);
        }
        let leasehold = pair.pop().context("leasehold")?;
        let etcd = pair.pop().context("etcd")?;
        report.add_handoff(leasehold, etcd);
    }
    if args.queued > 0 {
        report.add_queue(args.queued, args.contenders[0]);
    }
    report.server_rss_mib = measure::status_kib(server_pid, "VmRSS")? as f64 / 1024.0;
    report.server_peak_rss_mib = measure::status_kib(server_pid, "VmHWM")? as f64 / 1024.0;
    drop(server);

    if args.leases > 0 {
        progress!(
            "memory, {} leases renewed while locks cycle, fresh server",
            args.leases
        );
        let fresh = spawn_server(&args, &etcd, &logs.path().join("server-memory.log")).await?;
        let lock_tasks = if args.quick { 4 } else { 16 };
        report.memory = Some(
            workloads::memory(
                &Api::new(fresh.url()),
                fresh.pid().context("server pid")?,
                &run_id,
                args.leases,
                args.lease_ttl,
                lock_tasks,
            )
            .await?,
        );
    }

    report.config = Config {
        etcd_version: etcd_version(),
        etcd_members: 1,
        etcd_data,
        server: server_text,
        server_log: "info (the server's default)".into(),
        cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
        warmup_s: args.warmup,
        window_s: args.seconds,
        quick: args.quick,
        load_before,
        load_after: measure::loadavg(),
        perf: ctx
            .perf_note
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone(),
    };
    let json = serde_json::to_string_pretty(&report)?;
    if let Some(path) = &args.json_out {
        std::fs::write(path, format!("{json}\n"))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if args.json {
        println!("{json}");
    } else {
        print!("{}", report.markdown());
    }
    Ok(())
}
