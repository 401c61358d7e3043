//! `concert`: the Leasehold showcase. A sold-out concert, a thousand buyers racing for seats
//! through Leasehold locks over two server replicas, every sale written to a fenced ledger, and
//! an audit that no seat was sold twice, even with `--chaos` (buyers stalling past their lease, a
//! replica killed mid-run).
//!
//! Run it with `scripts/demo` (which starts etcd), or by hand against a running etcd:
//! `cargo run --release -p leasehold-examples --bin concert -- --chaos`
//!
//! A flash sale (`--compare`) runs the same sale at 1x and 5x the buyers and prints both
//! goodputs side by side; `--patience` is how long a buyer the servers shed keeps trying;
//! `--groups` sets the share of buyers who come as friends wanting adjacent seats; `--show-queue`
//! shows waiting buyers their place in line. Buyers connect before the doors open (as a crowd
//! waits on a sale's page) unless `--cold-start` says they connect as the sale starts.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use concert::{Options, Servers};

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// A sold-out concert: buyers race for seats through Leasehold, and not one seat is sold twice.
#[derive(Debug, Parser)]
#[command(
    name = "concert",
    version,
    after_help = "Examples:\n  concert                         # 500 seats, 1000 buyers, 2 replicas on etcd at 127.0.0.1:2379\n  concert --chaos --seed 7        # stalled buyers and a killed replica, reproducibly\n  concert --endpoints http://127.0.0.1:7070,http://127.0.0.1:7071   # servers already running\n  concert --seats 200 --buyers 1000 --compare   # flash sale: the same sale at 1x and 5x the buyers\n  concert --show-queue --wait 2s   # waiting buyers see their place in line\n\nExit status: 0 when the audit finds every sold seat with exactly one owner and every group of friends seated together, 1 otherwise, 2 on errors."
)]
struct Args {
    /// Seats in the venue.
    #[arg(long, default_value_t = 500)]
    seats: u32,
    /// Front-row seats everyone wants first.
    #[arg(long, default_value_t = 20)]
    hot_seats: u32,
    /// Buyers, all shopping at once.
    #[arg(long, default_value_t = 1000)]
    buyers: u32,
    /// At most this many seats per buyer.
    #[arg(long, default_value_t = 2)]
    seats_per_buyer: u32,
    /// Server replicas the demo starts (and may kill with --chaos).
    #[arg(long, default_value_t = 2)]
    servers: usize,
    /// etcd client URLs for the replicas the demo starts.
    #[arg(
        long,
        env = "LEASEHOLD_ETCD_ENDPOINTS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:2379"
    )]
    etcd_endpoints: Vec<String>,
    /// The leasehold-server binary (default: next to this one, else on PATH).
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// Use already-running servers instead of starting replicas (chaos then cannot kill one).
    #[arg(long, value_delimiter = ',')]
    endpoints: Vec<String>,
    /// File holding the bearer token, for servers that require one (e.g. scripts/cluster's).
    #[arg(long, env = "LEASEHOLD_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Chaos: some buyers stall past their TTL while holding a seat, and a replica is killed.
    #[arg(long)]
    chaos: bool,
    /// Seed for every random choice.
    #[arg(long, default_value_t = 2026)]
    seed: u64,
    /// The ledger database (SQLite); a temporary file by default.
    #[arg(long)]
    ledger: Option<PathBuf>,
    /// Lease TTL of buyers' sessions (humantime); renewed every third of it.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    ttl: Duration,
    /// Lease TTL of the buyers who stall in --chaos; they stall for longer (humantime).
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    stall_ttl: Duration,
    /// How long a buyer waits for a seat's lock before trying another (humantime).
    #[arg(long, default_value = "250ms", value_parser = humantime::parse_duration)]
    wait: Duration,
    /// How long a buyer keeps trying while the servers shed it: it waits what they ask
    /// (Retry-After, with jitter), then gives up and is counted turned away (humantime).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    patience: Duration,
    /// Percent of buyers who come as a group of 2-4 friends wanting adjacent seats in a row.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(0..=100))]
    groups: u32,
    /// Show waiting buyers their place in line ("you are number N"); the report counts who saw
    /// it count down.
    #[arg(long)]
    show_queue: bool,
    /// Buyers connect only when the doors open: the crowd's connects then land in the sale's
    /// first second, on the cores the servers and etcd share. By default every buyer's client
    /// connects before the doors open (buyers waiting on the sale's page) and the sale's clock
    /// starts when they open.
    #[arg(long)]
    cold_start: bool,
    /// Flash sale: run the sale twice with the same seed, with --buyers and with 5x as many,
    /// and print both goodputs side by side.
    #[arg(long)]
    compare: bool,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .with_writer(std::io::stderr)
        .init();
    let servers = if args.endpoints.is_empty() {
        Servers::Spawn {
            count: args.servers,
            etcd_endpoints: args.etcd_endpoints,
            bin: args.server_bin.unwrap_or_else(concert::default_server_bin),
        }
    } else {
        Servers::Existing(args.endpoints)
    };
    let mut options = Options::default()
        .with_seats(args.seats, args.hot_seats)
        .with_buyers(args.buyers)
        .with_servers(servers)
        .with_chaos(args.chaos)
        .with_seed(args.seed)
        .with_ttls(args.ttl, args.stall_ttl)
        .with_progress(!args.quiet && std::io::IsTerminal::is_terminal(&std::io::stderr()));
    options.seats_per_buyer = args.seats_per_buyer;
    options = options
        .with_wait(args.wait)
        .with_patience(args.patience)
        .with_groups(args.groups)
        .with_show_queue(args.show_queue)
        .with_cold_start(args.cold_start);
    if let Some(path) = &args.token_file {
        match std::fs::read_to_string(path) {
            Ok(token) => options.bearer_token = Some(token.trim().to_owned()),
            Err(err) => {
                eprintln!("concert: reading the token file {}: {err}", path.display());
                return ExitCode::from(2);
            }
        }
    }
    if let Some(path) = args.ledger {
        options = options.with_ledger(path);
    }
    println!(
        "Concert: {} seats ({} in the front row), {} buyers{}, seed {}{}",
        options.seats,
        options.hot_seats,
        options.buyers,
        if args.compare { " then 5x as many" } else { "" },
        options.seed,
        if options.chaos { ", chaos on" } else { "" }
    );
    let compare = args.compare;
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    // On Ctrl-C or SIGTERM the run is dropped, which kills the replicas it started.
    let outcome = runtime.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        // What to print, and whether the audits were clean.
        let run = async {
            if compare {
                let comparison = concert::compare(options).await?;
                anyhow::Ok((comparison.to_string(), comparison.is_clean()))
            } else {
                let report = concert::run(options).await?;
                anyhow::Ok((report.to_string(), report.is_clean()))
            }
        };
        tokio::select! {
            outcome = run => Some(outcome),
            _ = tokio::signal::ctrl_c() => None,
            _ = term.recv() => None,
        }
    });
    let Some(outcome) = outcome else {
        eprintln!("concert: interrupted; stopped the replicas it started");
        return ExitCode::from(130);
    };
    match outcome {
        Ok((text, clean)) => {
            println!("{text}");
            if clean {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(err) => {
            eprintln!("concert: {err:#}");
            ExitCode::from(2)
        }
    }
}
