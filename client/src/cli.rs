//! The `leasehold` command line: run a command under a lock, inspect locks, manage leases.
//!
//! Enabled by the default `cli` feature; `src/main.rs` calls [`main`].

use std::os::unix::process::ExitStatusExt;
use std::process::{ExitCode, ExitStatus};
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::json;

use crate::{Client, Error, FencingToken, Handle, LeaseId, LockGuard, RetryPolicy};

/// `lock`: CMD could not be started.
pub const EXIT_CMD_NOT_STARTED: u8 = 127;
/// `lock`: the lock was not acquired within `--wait`.
pub const EXIT_NOT_ACQUIRED: u8 = 75;
/// `lock`: the hold was lost while CMD ran; CMD was terminated.
pub const EXIT_LOST: u8 = 76;
/// No server could be reached, or every server answered 503.
pub const EXIT_UNAVAILABLE: u8 = 69;
/// Any other error (the server refused the request, bad input).
pub const EXIT_ERROR: u8 = 1;

const AFTER_HELP: &str = "\
Exit codes:
  lock: CMD's own exit code (128+N if CMD died of signal N) when CMD ran to the end
  75    lock: not acquired within --wait (someone else holds it)
  76    lock: the hold was lost while CMD ran; CMD was sent SIGTERM (SIGKILL after --kill-grace)
  127   lock: CMD could not be started
  69    no server reachable, or every server answered 503
  1     any other error (e.g. release: this token does not hold the lock)
  2     usage error

Examples:
  leasehold lock nightly-backup --ttl 30s --wait 1m -- ./backup.sh --full
  leasehold --endpoints http://10.0.0.1:7070,http://10.0.0.2:7070 status nightly-backup
  leasehold --output json status nightly-backup
  leasehold release nightly-backup --token 1234
  ID=$(leasehold lease grant --ttl 60s); leasehold lease keepalive \"$ID\"; leasehold lease revoke \"$ID\"";

/// Client for the Leasehold lock service: run a command while holding a lock, inspect and release
/// locks, manage leases.
#[derive(Debug, Parser)]
#[command(name = "leasehold", version, after_help = AFTER_HELP)]
pub struct Cli {
    /// Server URLs, comma-separated; tried in order, failing over on errors and 503s.
    #[arg(
        long,
        env = "LEASEHOLD_ENDPOINTS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:7070",
        global = true
    )]
    pub endpoints: Vec<String>,
    /// Output format of status and lease commands.
    #[arg(long, value_enum, default_value_t = Output::Text, global = true)]
    pub output: Output,
    /// Bound on each HTTP attempt (not counting the wait in line).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration, global = true)]
    pub request_timeout: Duration,
    /// File holding the bearer token for servers that require one (the server's auth, not a
    /// fencing token).
    #[arg(long, env = "LEASEHOLD_TOKEN_FILE", global = true, value_name = "PATH")]
    pub token_file: Option<std::path::PathBuf>,
    /// PEM file of the CA that signed the servers' certificates (for https:// endpoints).
    #[arg(long, env = "LEASEHOLD_CA_FILE", global = true, value_name = "PATH")]
    pub ca_file: Option<std::path::PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// For people.
    Text,
    /// One JSON object, for scripts.
    Json,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run CMD while holding lock NAME; CMD gets LEASEHOLD_LOCK, LEASEHOLD_TOKEN,
    /// LEASEHOLD_LEASE_ID and LEASEHOLD_HANDLE in its environment. If the hold is lost, CMD is
    /// terminated.
    #[command(
        after_help = "Example:\n  leasehold lock reports --ttl 10s --wait 30s -- sh -c 'echo \"token $LEASEHOLD_TOKEN\"; ./make-reports'"
    )]
    Lock(LockArgs),
    /// Show who holds lock NAME, with what token, and how many wait.
    Status {
        /// The lock name.
        name: String,
    },
    /// Release lock NAME held with token N under the lease whose handle is in LEASEHOLD_HANDLE
    /// (or --handle-file).
    Release {
        /// The lock name.
        name: String,
        /// The holder's fencing token.
        #[arg(long)]
        token: u64,
        /// Where the lease's handle is.
        #[command(flatten)]
        handle: HandleArgs,
    },
    /// Grant, refresh, revoke or show a lease.
    #[command(subcommand)]
    Lease(LeaseCommand),
}

/// `leasehold lock`.
#[derive(Debug, Args)]
pub struct LockArgs {
    /// The lock name.
    pub name: String,
    /// Lease TTL: the longest the lock outlives this process if it dies (etcd minimum 2s).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub ttl: Duration,
    /// How long to wait in line if the lock is held (0s: try once).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub wait: Duration,
    /// Who holds the lock, shown to others (default: none).
    #[arg(long)]
    pub owner: Option<String>,
    /// After the hold is lost and CMD got SIGTERM, how long before SIGKILL.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub kill_grace: Duration,
    /// The command and its arguments (after `--`).
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<String>,
}

/// Where a lease's handle comes from: never the command line.
#[derive(Debug, Args)]
pub struct HandleArgs {
    /// File holding the lease's handle (default: the LEASEHOLD_HANDLE environment variable).
    #[arg(long, value_name = "PATH")]
    pub handle_file: Option<std::path::PathBuf>,
}

impl HandleArgs {
    /// The handle, from the file or `LEASEHOLD_HANDLE`.
    pub fn handle(&self) -> Result<Handle, Error> {
        let text = match &self.handle_file {
            Some(path) => std::fs::read_to_string(path).map_err(|err| {
                Error::client_input(format!("reading the handle from {}: {err}", path.display()))
            })?,
            None => std::env::var("LEASEHOLD_HANDLE").map_err(|_| {
                Error::client_input(
                    "this needs the lease's handle: set LEASEHOLD_HANDLE or pass --handle-file",
                )
            })?,
        };
        Ok(Handle::new(text))
    }
}

/// `leasehold lease ...`.
#[derive(Debug, Subcommand)]
pub enum LeaseCommand {
    /// Grant a lease and print `export LEASEHOLD_LEASE_ID=...` and `export LEASEHOLD_HANDLE=...`
    /// (for `eval`); it expires after TTL unless kept alive.
    Grant {
        /// The TTL (etcd minimum 2s).
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// Who holds it.
        #[arg(long)]
        owner: Option<String>,
    },
    /// Refresh a lease to its full TTL once.
    Keepalive {
        /// The lease id.
        id: String,
        /// Where the lease's handle is.
        #[command(flatten)]
        handle: HandleArgs,
    },
    /// Revoke a lease, freeing every lock held or awaited under it. Revoking a lease that is
    /// already gone succeeds.
    Revoke {
        /// The lease id.
        id: String,
        /// Where the lease's handle is.
        #[command(flatten)]
        handle: HandleArgs,
    },
    /// Show a lease: TTL, time left, owner, locks held.
    Show {
        /// The lease id.
        id: String,
    },
}

/// Entry point of the `leasehold` binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("leasehold: cannot start the runtime: {err}");
            return ExitCode::from(EXIT_ERROR);
        }
    };
    ExitCode::from(runtime.block_on(run(cli)))
}

/// Runs a parsed command line; returns the exit code.
pub async fn run(cli: Cli) -> u8 {
    let client = match build_client(&cli) {
        Ok(client) => client,
        Err(err) => return fail(&err),
    };
    let output = cli.output;
    let result = match cli.command {
        Command::Lock(args) => return lock(&client, args).await,
        Command::Status { name } => client.status(&name).await.map(|s| {
            if output == Output::Json {
                return json!(s).to_string();
            }
            let holder = match &s.holder {
                None => "none".to_owned(),
                Some(h) => format!(
                    "token {}, owner {}, lease {}",
                    h.token,
                    h.owner.as_deref().unwrap_or("-"),
                    h.lease_id.as_ref().map_or("-", |l| l.as_str())
                ),
            };
            format!(
                "lock:    {}\nholder:  {holder}\nwaiters: {}",
                s.name, s.waiters
            )
        }),
        Command::Release {
            name,
            token,
            handle,
        } => async {
            client
                .release(&name, FencingToken::new(token), &handle.handle()?)
                .await
        }
        .await
        .map(|()| match output {
            Output::Json => json!({"name": name, "token": token, "released": true}).to_string(),
            Output::Text => format!("released {name} (token {token})"),
        }),
        Command::Lease(command) => lease(&client, command, output).await,
    };
    match result {
        Ok(text) => {
            println!("{text}");
            0
        }
        Err(err) => fail(&err),
    }
}

async fn lease(client: &Client, command: LeaseCommand, output: Output) -> Result<String, Error> {
    match command {
        LeaseCommand::Grant { ttl, owner } => {
            let lease = client.grant_lease_for(ttl, owner.clone()).await?;
            let ttl_ms = lease.ttl().as_millis() as u64;
            // The lease must outlive this process: stop keeping it alive, don't revoke it.
            let (id, handle) = lease.detach();
            Ok(match output {
                Output::Json => json!({
                    "lease_id": id,
                    "handle": handle.reveal(),
                    "ttl_ms": ttl_ms,
                    "owner": owner
                })
                .to_string(),
                Output::Text => format!(
                    "export LEASEHOLD_LEASE_ID={id}\nexport LEASEHOLD_HANDLE={}",
                    handle.reveal()
                ),
            })
        }
        LeaseCommand::Keepalive { id, handle } => {
            let ttl_ms = client
                .keep_lease_alive(&LeaseId::new(&id), &handle.handle()?)
                .await?;
            Ok(match output {
                Output::Json => json!({"lease_id": id, "ttl_ms": ttl_ms}).to_string(),
                Output::Text => format!("{id} refreshed to {ttl_ms} ms"),
            })
        }
        LeaseCommand::Revoke { id, handle } => {
            client
                .revoke_lease(&LeaseId::new(&id), &handle.handle()?)
                .await?;
            Ok(match output {
                Output::Json => json!({"lease_id": id, "revoked": true}).to_string(),
                Output::Text => format!("revoked {id}"),
            })
        }
        LeaseCommand::Show { id } => {
            let info = client.lease_info(&LeaseId::new(&id)).await?;
            Ok(match output {
                Output::Json => json!(info).to_string(),
                Output::Text => format!(
                    "lease:     {}\nttl:       {} ms\nremaining: {} ms\nowner:     {}\nlocks:     {}",
                    info.lease_id,
                    info.ttl_ms,
                    info.remaining_ms,
                    info.owner.as_deref().unwrap_or("-"),
                    if info.locks.is_empty() {
                        "-".to_owned()
                    } else {
                        info.locks.join(", ")
                    }
                ),
            })
        }
    }
}

/// The client the global flags describe.
fn build_client(cli: &Cli) -> Result<Client, Error> {
    let mut builder = Client::builder()
        .endpoints(cli.endpoints.iter().filter(|e| !e.is_empty()))
        .request_timeout(cli.request_timeout)
        .retry_policy(RetryPolicy::default());
    if let Some(path) = &cli.token_file {
        let token = std::fs::read_to_string(path).map_err(|err| {
            Error::client_input(format!("reading the token file {}: {err}", path.display()))
        })?;
        builder = builder.bearer_token(token);
    }
    if let Some(path) = &cli.ca_file {
        let pem = std::fs::read(path).map_err(|err| {
            Error::client_input(format!("reading the CA file {}: {err}", path.display()))
        })?;
        builder = builder.root_certificate_pem(pem);
    }
    builder.build()
}

/// Prints `err` and picks its exit code.
fn fail(err: &Error) -> u8 {
    eprintln!("leasehold: {err}");
    if err.is_retryable() {
        EXIT_UNAVAILABLE
    } else {
        EXIT_ERROR
    }
}

async fn lock(client: &Client, args: LockArgs) -> u8 {
    let mut builder = client.lock(&args.name).ttl(args.ttl).wait(args.wait);
    if let Some(owner) = &args.owner {
        builder = builder.owner(owner);
    }
    let guard = match builder.acquire().await {
        Ok(guard) => guard,
        Err(err @ Error::LockHeld { .. }) => {
            eprintln!(
                "leasehold: lock {:?} not acquired within {}: {err}",
                args.name,
                humantime::format_duration(args.wait)
            );
            return EXIT_NOT_ACQUIRED;
        }
        Err(err) => return fail(&err),
    };
    let (program, rest) = args.command.split_first().expect("clap requires CMD");
    // CMD gets its own process group, so a lost hold stops everything it started (a shell's
    // children too), not just its first process.
    let child = tokio::process::Command::new(program)
        .args(rest)
        .env("LEASEHOLD_LOCK", &args.name)
        .env("LEASEHOLD_TOKEN", guard.token().to_string())
        .env("LEASEHOLD_LEASE_ID", guard.lease_id().as_str())
        .env("LEASEHOLD_HANDLE", guard.handle().reveal())
        .process_group(0)
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(err) => {
            eprintln!("leasehold: cannot start {program:?}: {err}");
            release(guard).await;
            return EXIT_CMD_NOT_STARTED;
        }
    };
    let group = Pid::from_raw(child.id().expect("running child has a pid") as i32);
    tokio::select! {
        status = child.wait() => {
            let code = match status {
                Ok(status) => exit_code(status),
                Err(err) => {
                    eprintln!("leasehold: waiting for CMD: {err}");
                    EXIT_ERROR
                }
            };
            release(guard).await;
            code
        }
        reason = guard.lost() => {
            // Stop CMD now: by the client-side timer, another holder may be granted the lock
            // soon, and CMD must not be touching the protected resource by then.
            eprintln!(
                "leasehold: lost lock {:?} (token {}): {reason}; terminating CMD",
                args.name,
                guard.token()
            );
            let _ = killpg(group, Signal::SIGTERM);
            if tokio::time::timeout(args.kill_grace, child.wait()).await.is_err() {
                eprintln!("leasehold: CMD still running after {}; killing it", humantime::format_duration(args.kill_grace));
                let _ = killpg(group, Signal::SIGKILL);
                let _ = child.wait().await;
            }
            drop(guard);
            EXIT_LOST
        }
        _ = forward_signals(group) => unreachable!("forwarding never ends"),
    }
}

/// Releases and reports a failure (CMD already ran; its exit code still decides ours).
async fn release(guard: LockGuard) {
    let (name, token) = (guard.name().to_owned(), guard.token());
    if let Err(err) = guard.release().await {
        eprintln!("leasehold: releasing lock {name:?} (token {token}): {err}");
    }
}

/// The shell convention: the code, or 128 + the signal that killed it.
fn exit_code(status: ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(code), _) => code as u8,
        (None, Some(signal)) => 128u8.saturating_add(signal as u8),
        (None, None) => EXIT_ERROR,
    }
}

/// Passes SIGINT, SIGTERM and SIGHUP on to CMD's process group (in its own group, CMD does not
/// get the terminal's Ctrl-C directly). We keep waiting for CMD, and release when it exits.
async fn forward_signals(group: Pid) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term), Ok(mut hup)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    ) else {
        return std::future::pending().await;
    };
    loop {
        let sig = tokio::select! {
            _ = int.recv() => Signal::SIGINT,
            _ = term.recv() => Signal::SIGTERM,
            _ = hup.recv() => Signal::SIGHUP,
        };
        let _ = killpg(group, sig);
    }
}
