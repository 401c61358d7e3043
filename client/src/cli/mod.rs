//! The `leasehold` command line: run a command under a lock, inspect locks, manage leases.
//!
//! Enabled by the default `cli` feature; `src/main.rs` calls [`main`].
//!
//! # Layout
//! - `mod.rs`: the arguments, and the commands other than `lock`.
//! - `lock.rs`: `leasehold lock` and `leasehold elect`: acquire (or campaign), run CMD, stop it
//!   in time, release (or resign).
//! - `observe.rs`: `leasehold observe`: print each new leader of an election.
//! - `child.rs`: CMD as a process: the parent-death signal, its process group or the terminal's,
//!   signalling it and everything it started.
//! - `output.rs`: text and JSON output (results, events, errors) and `-v` logging.

mod child;
mod lock;
mod observe;
mod output;

use std::ffi::OsString;
use std::time::Duration;

use clap::{ArgAction, Args, CommandFactory, Parser, Subcommand, ValueEnum};
use serde_json::json;

use crate::{Client, ClientBuilder, Error, FencingToken, Handle, LeaseId, RetryPolicy};
use output::Out;

/// `lock`: CMD could not be started.
pub const EXIT_CMD_NOT_STARTED: u8 = 127;
/// `lock`: the lock was not acquired within `--wait` (the default for `-E`).
pub const EXIT_NOT_ACQUIRED: u8 = 75;
/// `lock`: the hold was lost while CMD ran; CMD was terminated.
pub const EXIT_LOST: u8 = 76;
/// No server could be reached, or every server answered 503 (or shed the request).
pub const EXIT_UNAVAILABLE: u8 = 69;
/// Any other error (the server refused the request, bad input).
pub const EXIT_ERROR: u8 = 1;
/// A usage error: bad flags or values (also from the argument parser).
pub const EXIT_USAGE: u8 = 2;

const AFTER_HELP: &str = "\
Exit codes:
  lock, elect: CMD's own exit code (128+N if CMD died of signal N) when CMD ran to the end
  75    lock, elect: not acquired (not elected) within --wait; -E CODE changes it
  76    lock, elect: the hold (the leadership) was lost while CMD ran; CMD was terminated before
        anyone else could be granted
  127   lock, elect: CMD could not be started
  128+N lock, elect, observe: interrupted by signal N (130 for Ctrl-C) before CMD ran
  69    no server reachable, or every server answered 503 or shed the request
  1     any other error (e.g. release: this token does not hold the lock)
  2     usage error

Examples:
  leasehold lock nightly-backup ./backup.sh --full          # waits as long as it takes, like flock
  leasehold lock -n nightly-backup ./backup.sh              # fail at once (exit 75) if held
  leasehold lock -w 30 -E 0 nightly-backup ./backup.sh      # wait 30 s; if still held, exit 0
  leasehold lock -n 3 encoders ./encode.sh                  # a semaphore: up to 3 at once
  leasehold lock --shared catalog ./read.sh                 # readers share; --exclusive writes
  leasehold elect db-primary --value 10.0.0.7 ./serve.sh    # run while leader; LEASEHOLD_EPOCH
  leasehold observe db-primary                              # print each new leader
  leasehold --endpoints 10.0.0.1:7070,10.0.0.2:7070 status nightly-backup
  leasehold --output json status nightly-backup
  eval \"$(leasehold lease grant --ttl 60s)\"; leasehold lock --lease \"$LEASEHOLD_LEASE_ID\" job -- ./step1
  LEASEHOLD_HANDLE=... leasehold release nightly-backup --token 1234";

/// Client for the Leasehold lock service: run a command while holding a lock, inspect and release
/// locks, manage leases.
#[derive(Debug, Parser)]
#[command(name = "leasehold", version, after_help = AFTER_HELP)]
pub struct Cli {
    /// Server URLs (`http://`, `https://`, or a bare `host:port`), comma-separated; tried in
    /// order, failing over on errors, timeouts and 503s.
    #[arg(
        long,
        env = "LEASEHOLD_ENDPOINTS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:7070",
        global = true
    )]
    pub endpoints: Vec<String>,
    /// Output format: results on stdout; errors (and `lock`'s events) on stderr.
    #[arg(long, value_enum, default_value_t = Output::Text, global = true)]
    pub output: Output,
    /// Bound on each HTTP attempt (not counting the wait in line); seconds or a duration.
    #[arg(long, default_value = "5s", value_parser = parse_duration, global = true)]
    pub request_timeout: Duration,
    /// File holding the bearer token for servers that require one (the server's auth, not a
    /// fencing token).
    #[arg(long, env = "LEASEHOLD_TOKEN_FILE", global = true, value_name = "PATH")]
    pub token_file: Option<std::path::PathBuf>,
    /// PEM file of the CA that signed the servers' certificates (for https:// endpoints).
    #[arg(long, env = "LEASEHOLD_CA_FILE", global = true, value_name = "PATH")]
    pub ca_file: Option<std::path::PathBuf>,
    /// Log acquires, renewals, fail-overs and retries to stderr (-vv: more).
    #[arg(short, long, action = ArgAction::Count, global = true)]
    pub verbose: u8,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// For people.
    Text,
    /// One JSON object per line, for scripts.
    Json,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run CMD while holding lock NAME, like `flock NAME CMD` (a mutex; a semaphore with --limit
    /// N or -n N; a read-write lock with --shared or --exclusive); CMD gets LEASEHOLD_LOCK,
    /// LEASEHOLD_TOKEN, LEASEHOLD_LEASE_ID and LEASEHOLD_HANDLE in its environment. If the hold
    /// is lost, CMD is stopped before anyone else can be granted the lock.
    #[command(after_help = lock::AFTER_HELP)]
    Lock(LockArgs),
    /// Run CMD while leading election NAME, like `etcdctl elect NAME PROPOSAL`: campaign (as long
    /// as it takes, by default), then run CMD with LEASEHOLD_ELECTION, LEASEHOLD_EPOCH (the
    /// fencing token), LEASEHOLD_VALUE, LEASEHOLD_LEASE_ID and LEASEHOLD_HANDLE in its
    /// environment. If the leadership is lost, CMD is stopped before anyone else can lead; when
    /// CMD ends, leasehold resigns.
    #[command(after_help = lock::ELECT_AFTER_HELP)]
    Elect(ElectArgs),
    /// Print the leader of election NAME, then each new leader, one line each (one JSON object
    /// with --output json), until interrupted, like `etcdctl elect -l NAME`. Resumes after a
    /// lost connection without missing a leader.
    Observe {
        /// The election name.
        name: String,
    },
    /// Show lock NAME: its holders and waiters in order (position, token, owner, lease, mode).
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

/// How long `lock` waits in line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// As long as it takes.
    Forever,
    /// At most this long (zero: try once).
    For(Duration),
}

/// `leasehold lock`.
#[derive(Debug, Args)]
pub struct LockArgs {
    /// The lock name.
    pub name: String,
    /// A semaphore: up to N holders at once, each with its own token (everyone must give the
    /// same N). `-n N`, a whole number right after `-n`, means the same (as consul lock -n);
    /// `-n` followed by anything else is flock's "fail at once".
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=10_000),
          conflicts_with_all = ["shared", "exclusive"])]
    pub limit: Option<u32>,
    /// A read-write lock, as a reader: readers hold together; a writer (--exclusive) waits for
    /// the readers ahead and blocks the readers behind.
    #[arg(short = 's', long, conflicts_with = "exclusive")]
    pub shared: bool,
    /// A read-write lock, as a writer: holds alone (see --shared).
    #[arg(short = 'x', long)]
    pub exclusive: bool,
    /// Lock-delay: if this hold's lease expires (not on release), nobody gets the lock (that
    /// slot of a semaphore) for this long afterwards, e.g. `5s`; at most 60 s. Mutexes and
    /// semaphores only.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration,
          conflicts_with_all = ["shared", "exclusive"])]
    pub lock_delay: Option<Duration>,
    /// How to wait, hold and run CMD.
    #[command(flatten)]
    pub run: RunArgs,
}

/// `leasehold elect`.
#[derive(Debug, Args)]
pub struct ElectArgs {
    /// The election name.
    pub name: String,
    /// What the others learn of the leader (an address, an id); default `HOSTNAME:PID`.
    #[arg(long)]
    pub value: Option<String>,
    /// How to wait, hold and run CMD.
    #[command(flatten)]
    pub run: RunArgs,
}

/// What `lock` and `elect` share: the lease, the wait, and CMD.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Lease TTL: the longest the lock outlives this process if it dies (etcd minimum 2s;
    /// default 10s). Not with --lease.
    #[arg(long, value_parser = parse_duration)]
    pub ttl: Option<Duration>,
    /// How long to wait in line if the lock is held (elect: if another leads): seconds (`5`),
    /// a duration (`1m30s`), or `forever` (the default, as flock, etcdctl lock and consul lock
    /// do).
    #[arg(
        short = 'w',
        long,
        visible_alias = "timeout",
        value_name = "SECONDS|DURATION|forever",
        default_value = "forever",
        value_parser = parse_wait
    )]
    pub wait: Wait,
    /// Fail at once if the lock is held (elect: if another leads); same as --wait 0. For
    /// `lock`, `-n N` with a whole number N is --limit N instead.
    #[arg(short = 'n', long, visible_aliases = ["nonblock", "nb"], conflicts_with = "wait")]
    pub no_wait: bool,
    /// Exit code when the lock is held by someone else past the wait (as flock's -E).
    #[arg(short = 'E', long, value_name = "CODE", default_value_t = EXIT_NOT_ACQUIRED)]
    pub conflict_exit_code: u8,
    /// Who holds the lock, shown to others (default: none).
    #[arg(long)]
    pub owner: Option<String>,
    /// How long CMD has between SIGTERM and SIGKILL when it must stop (hold lost, or leasehold
    /// interrupted); the hold counts as lost this much earlier, so that CMD is dead before the
    /// server could grant the lock to anyone else. Default: a tenth of the TTL, at most 1s.
    #[arg(long, value_parser = parse_duration)]
    pub kill_grace: Option<Duration>,
    /// Hold the lock under this existing lease (from `leasehold lease grant`) instead of a new
    /// one; its handle comes from LEASEHOLD_HANDLE or --handle-file. The lease is kept alive while
    /// CMD runs, and left alive (not revoked) at the end.
    #[arg(long, value_name = "ID", conflicts_with = "ttl", value_parser = parse_lease_id)]
    pub lease: Option<LeaseId>,
    /// Where the handle of --lease is.
    #[command(flatten)]
    pub handle: HandleArgs,
    /// Run this command line with `sh -c` (as flock's -c), instead of CMD.
    #[arg(
        short = 'c',
        long = "command",
        value_name = "STRING",
        conflicts_with = "command"
    )]
    pub shell_command: Option<String>,
    /// The command and its arguments. `--` before it is needed only when CMD starts with `-`.
    #[arg(
        required_unless_present = "shell_command",
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CMD"
    )]
    pub command: Vec<String>,
}

impl RunArgs {
    /// The program and arguments to run: CMD, or `sh -c STRING`.
    pub fn program(&self) -> Vec<String> {
        match &self.shell_command {
            Some(line) => vec!["sh".into(), "-c".into(), line.clone()],
            None => self.command.clone(),
        }
    }
}

impl Cli {
    /// Parses a command line (`args[0]` is the program), after reading consul's `lock -n N`:
    /// in `leasehold lock`'s options (before the lock name), `-n` followed by a whole number N
    /// (`-n 3`, `-n=3`, `-n3`) is `--limit N`; `-n` followed by anything else stays flock's
    /// `-n` (fail at once). A lock whose name is all digits is made to fail at once with `--nb`
    /// or `-w 0`.
    pub fn parse_args<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString>,
    {
        Self::try_parse_from(consul_limit(args.into_iter().map(Into::into).collect()))
    }
}

/// Rewrites consul's `-n N` (in `lock`'s options) to `--limit N`; see [`Cli::parse_args`].
fn consul_limit(args: Vec<OsString>) -> Vec<OsString> {
    let mut command = Cli::command();
    command.build();
    let lock = command
        .find_subcommand("lock")
        .expect("the lock subcommand exists")
        .clone();
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let mut out = Vec::with_capacity(args.len() + 1);
    let mut args = args.into_iter();
    out.extend(args.next()); // the program
    let mut in_lock = false;
    while let Some(arg) = args.next() {
        let Some(text) = arg.to_str().map(str::to_owned) else {
            out.push(arg);
            out.extend(args);
            break;
        };
        let scope = if in_lock { &lock } else { &command };
        if in_lock {
            if text == "-n" {
                let next = args.next();
                match next.as_ref().and_then(|n| n.to_str()) {
                    Some(n) if digits(n) => {
                        out.push("--limit".into());
                        out.push(n.into());
                    }
                    _ => {
                        out.push(arg);
                        // Not a limit: the lock name (or another option); look at it again.
                        if let Some(next) = next {
                            args = std::iter::once(next)
                                .chain(args)
                                .collect::<Vec<_>>()
                                .into_iter();
                        }
                    }
                }
                continue;
            }
            if let Some(n) = text
                .strip_prefix("-n=")
                .or_else(|| text.strip_prefix("-n"))
                .filter(|n| digits(n))
            {
                out.push("--limit".into());
                out.push(n.into());
                continue;
            }
        }
        if text == "--" {
            out.push(arg);
            out.extend(args);
            break;
        }
        if let Some(long) = text.strip_prefix("--") {
            out.push(arg.clone());
            if !long.contains('=') && takes_value(scope, |a| a.get_long() == Some(long)) {
                out.extend(args.next());
            }
            continue;
        }
        if let Some(shorts) = text.strip_prefix('-').filter(|s| !s.is_empty()) {
            out.push(arg.clone());
            // A cluster (`-vw 5`, `-w5`): the first flag that takes a value takes the rest of
            // the word, or the next word if nothing is left.
            for (i, c) in shorts.char_indices() {
                if takes_value(scope, |a| a.get_short() == Some(c)) {
                    if i + c.len_utf8() == shorts.len() {
                        out.extend(args.next());
                    }
                    break;
                }
            }
            continue;
        }
        out.push(arg);
        if in_lock {
            // The lock name: CMD follows, untouched.
            out.extend(args);
            break;
        }
        if text == "lock" {
            in_lock = true;
        } else {
            out.extend(args);
            break;
        }
    }
    out
}

/// True if the option of `command` that `matches` takes a value.
fn takes_value(command: &clap::Command, matches: impl Fn(&clap::Arg) -> bool) -> bool {
    command
        .get_arguments()
        .find(|a| matches(a))
        .is_some_and(|a| a.get_action().takes_values())
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
        #[arg(long, default_value = "60s", value_parser = parse_duration)]
        ttl: Duration,
        /// Who holds it.
        #[arg(long)]
        owner: Option<String>,
        /// How long to wait for a place if the server's waiting room is full (a server run
        /// with --max-sessions); without it, the server's default (3.5s).
        #[arg(long, value_parser = parse_duration)]
        wait: Option<Duration>,
    },
    /// Refresh a lease to its full TTL once.
    Keepalive {
        /// The lease id.
        #[arg(value_parser = parse_lease_id)]
        id: LeaseId,
        /// Where the lease's handle is.
        #[command(flatten)]
        handle: HandleArgs,
    },
    /// Revoke a lease, freeing every lock held or awaited under it. Revoking a lease that is
    /// already gone succeeds.
    Revoke {
        /// The lease id.
        #[arg(value_parser = parse_lease_id)]
        id: LeaseId,
        /// Where the lease's handle is.
        #[command(flatten)]
        handle: HandleArgs,
    },
    /// Show a lease: TTL, time left, owner, locks held.
    Show {
        /// The lease id.
        #[arg(value_parser = parse_lease_id)]
        id: LeaseId,
    },
}

/// A duration: bare seconds (`5`, `0.5`) or humantime (`30s`, `1m30s`, `250ms`).
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if let Ok(seconds) = text.parse::<f64>() {
        return if seconds.is_finite() && seconds >= 0.0 {
            Ok(Duration::from_secs_f64(seconds))
        } else {
            Err("expected a non-negative number of seconds".into())
        };
    }
    humantime::parse_duration(text).map_err(|err| {
        format!("{err}; expected seconds (`5`, `0.5`) or a duration (`30s`, `1m30s`, `250ms`)")
    })
}

/// A wait: a duration, or `forever`.
fn parse_wait(text: &str) -> Result<Wait, String> {
    match text.trim() {
        "forever" | "infinity" | "inf" => Ok(Wait::Forever),
        other => parse_duration(other)
            .map(Wait::For)
            .map_err(|err| format!("{err}, or `forever`")),
    }
}

/// A lease id: 1 to 16 hex digits.
fn parse_lease_id(text: &str) -> Result<LeaseId, String> {
    LeaseId::parse(text).map_err(|_| "a lease id is 1 to 16 hex digits".to_owned())
}

/// Entry point of the `leasehold` binary.
pub fn main() -> std::process::ExitCode {
    // `lock` starts CMD through this same binary, which sets up the child and becomes CMD.
    if let Some(code) = child::exec_child_if_asked() {
        return std::process::ExitCode::from(code);
    }
    let cli = match Cli::parse_args(std::env::args_os()) {
        Ok(cli) => cli,
        Err(err) => return std::process::ExitCode::from(output::usage_error(err)),
    };
    output::init_logging(cli.verbose, cli.output);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("leasehold: cannot start the runtime: {err}");
            return std::process::ExitCode::from(EXIT_ERROR);
        }
    };
    std::process::ExitCode::from(runtime.block_on(run(cli)))
}

/// Runs a parsed command line; returns the exit code. `lock` starts CMD through the current
/// executable, which must call [`main`] (that is how CMD gets its parent-death signal).
pub async fn run(cli: Cli) -> u8 {
    let out = Out::new(cli.output);
    let builder = match client_builder(&cli) {
        Ok(builder) => builder,
        Err(err) => return out.fail(&err),
    };
    match cli.command {
        Command::Lock(args) => {
            let job = lock::Job::Lock {
                name: args.name,
                limit: args.limit,
                shared: args.shared,
                exclusive: args.exclusive,
                lock_delay: args.lock_delay.unwrap_or_default(),
            };
            return lock::run(builder, job, args.run, &out).await;
        }
        Command::Elect(args) => {
            let value = args.value.unwrap_or_else(default_value);
            let job = lock::Job::Elect {
                name: args.name,
                value,
            };
            return lock::run(builder, job, args.run, &out).await;
        }
        Command::Observe { name } => return observe::run(builder, &name, &out).await,
        _ => {}
    }
    let client = match builder.build() {
        Ok(client) => client,
        Err(err) => return out.fail(&err),
    };
    let result = match cli.command {
        Command::Lock(_) | Command::Elect(_) | Command::Observe { .. } => {
            unreachable!("handled above")
        }
        Command::Status { name } => client
            .status(&name)
            .await
            .map(|s| (status_text(&s), json!(s))),
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
        .map(|()| {
            (
                format!("released {name} (token {token})"),
                json!({"name": name, "token": token, "released": true}),
            )
        }),
        Command::Lease(command) => lease(&client, command).await,
    };
    match result {
        Ok((text, value)) => {
            out.result(&text, &value);
            0
        }
        Err(err) => out.fail(&err),
    }
}

/// `status` for people: the holder, the waiters' count, then the queue in order.
fn status_text(s: &crate::LockStatus) -> String {
    let holder = match &s.holder {
        None => "none".to_owned(),
        Some(h) => format!(
            "token {}, owner {}, lease {}",
            h.token,
            h.owner.as_deref().unwrap_or("-"),
            h.lease_id.as_ref().map_or("-", |l| l.as_str())
        ),
    };
    let mut text = format!(
        "lock:    {}\nholder:  {holder}\nwaiters: {}",
        s.name, s.waiters
    );
    if let Some(limit) = s.limit.filter(|l| *l > 1) {
        text.push_str(&format!("\nlimit:   {limit}"));
    }
    if !s.queue.is_empty() {
        text.push_str(
            "\nqueue:\n  POS  STATE    TOKEN        OWNER                LEASE             MODE",
        );
        for e in &s.queue {
            text.push_str(&format!(
                "\n  {:<4} {:<8} {:<12} {:<20} {:<17} {}",
                e.position,
                if e.holds { "holds" } else { "waits" },
                e.token,
                e.owner.as_deref().unwrap_or("-"),
                e.lease_id,
                e.mode.as_deref().unwrap_or("-"),
            ));
        }
    }
    text
}

/// `elect`'s value when none is given: `HOSTNAME:PID`.
fn default_value() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "localhost".to_owned());
    format!("{host}:{}", std::process::id())
}

/// A `lease` command: its text and JSON results.
async fn lease(
    client: &Client,
    command: LeaseCommand,
) -> Result<(String, serde_json::Value), Error> {
    match command {
        LeaseCommand::Grant { ttl, owner, wait } => {
            let lease = match wait {
                Some(wait) => client.grant_lease_waiting(ttl, owner.clone(), wait).await?,
                None => client.grant_lease_for(ttl, owner.clone()).await?,
            };
            let ttl_ms = lease.ttl().as_millis() as u64;
            // The lease must outlive this process: stop keeping it alive, don't revoke it.
            let (id, handle) = lease.detach();
            Ok((
                format!(
                    "export LEASEHOLD_LEASE_ID={id}\nexport LEASEHOLD_HANDLE={}",
                    handle.reveal()
                ),
                json!({
                    "lease_id": id,
                    "handle": handle.reveal(),
                    "ttl_ms": ttl_ms,
                    "owner": owner
                }),
            ))
        }
        LeaseCommand::Keepalive { id, handle } => {
            let ttl_ms = client.keep_lease_alive(&id, &handle.handle()?).await?;
            Ok((
                format!("{id} refreshed to {ttl_ms} ms"),
                json!({"lease_id": id, "ttl_ms": ttl_ms}),
            ))
        }
        LeaseCommand::Revoke { id, handle } => {
            client.revoke_lease(&id, &handle.handle()?).await?;
            Ok((
                format!("revoked {id}"),
                json!({"lease_id": id, "revoked": true}),
            ))
        }
        LeaseCommand::Show { id } => {
            let info = client.lease_info(&id).await?;
            Ok((
                format!(
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
                json!(info),
            ))
        }
    }
}

/// The client the global flags describe (`lock` adds its safety margin).
fn client_builder(cli: &Cli) -> Result<ClientBuilder, Error> {
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
    Ok(builder)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::parse_args(std::iter::once("leasehold").chain(args.iter().copied()))
    }

    fn lock_args(args: &[&str]) -> LockArgs {
        match parse(args).expect("parses").command {
            Command::Lock(lock) => lock,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn waits_parse_as_seconds_durations_or_forever() {
        assert_eq!(lock_args(&["lock", "x", "true"]).run.wait, Wait::Forever);
        for (text, wait) in [
            ("5", Wait::For(Duration::from_secs(5))),
            ("0.5", Wait::For(Duration::from_millis(500))),
            ("1m30s", Wait::For(Duration::from_secs(90))),
            ("forever", Wait::Forever),
        ] {
            assert_eq!(
                lock_args(&["lock", "x", "--wait", text, "true"]).run.wait,
                wait
            );
            assert_eq!(lock_args(&["lock", "-w", text, "x", "true"]).run.wait, wait);
        }
        assert_eq!(
            lock_args(&["lock", "--timeout", "3", "x", "true"]).run.wait,
            Wait::For(Duration::from_secs(3))
        );
        assert!(lock_args(&["lock", "-n", "x", "true"]).run.no_wait);
        assert!(parse(&["lock", "-n", "-w", "3", "x", "true"]).is_err());
        assert!(parse(&["lock", "--wait", "soon", "x", "true"]).is_err());
        assert!(parse(&["lock", "--wait", "-1", "x", "true"]).is_err());
    }

    /// CMD needs no `--`: everything from its first word on is CMD's, flags included.
    #[test]
    fn cmd_follows_the_name_with_or_without_dashes() {
        let args = lock_args(&["lock", "x", "--ttl", "5", "echo", "-n", "--ttl", "hi"]);
        assert_eq!(args.run.ttl, Some(Duration::from_secs(5)));
        assert_eq!(args.run.command, ["echo", "-n", "--ttl", "hi"]);
        let args = lock_args(&["lock", "-E", "0", "x", "--", "-weird", "arg"]);
        assert_eq!(args.run.command, ["-weird", "arg"]);
        assert_eq!(args.run.conflict_exit_code, 0);
        let args = lock_args(&["-v", "lock", "x", "sh", "-c", "exit 3"]);
        assert_eq!(args.run.command, ["sh", "-c", "exit 3"]);
        assert!(parse(&["lock", "x"]).is_err(), "CMD is required");
        let args = lock_args(&["lock", "-c", "echo $LEASEHOLD_TOKEN", "x"]);
        assert_eq!(args.run.program(), ["sh", "-c", "echo $LEASEHOLD_TOKEN"]);
        assert!(parse(&["lock", "-c", "true", "x", "echo"]).is_err());
        assert!(lock_args(&["lock", "--nb", "x", "true"]).run.no_wait);
    }

    /// consul's `-n N` is a limit; flock's `-n` (followed by anything but a whole number) fails
    /// at once; nothing after the lock name is touched.
    #[test]
    fn dash_n_with_a_number_is_a_limit_otherwise_fail_at_once() {
        for args in [
            &["lock", "-n", "3", "enc", "./run"][..],
            &["lock", "-n=3", "enc", "./run"],
            &["lock", "-n3", "enc", "./run"],
            &["lock", "--limit", "3", "enc", "./run"],
            &["lock", "--ttl", "5s", "-n", "3", "enc", "./run"],
            &[
                "--endpoints",
                "h:1",
                "lock",
                "-w",
                "5",
                "-n",
                "3",
                "enc",
                "./run",
            ],
            &["-v", "lock", "-E", "0", "-n", "3", "enc", "./run"],
        ] {
            let parsed = lock_args(args);
            assert_eq!(parsed.limit, Some(3), "{args:?}");
            assert!(!parsed.run.no_wait, "{args:?}");
            assert_eq!(
                (parsed.name.as_str(), &parsed.run.command[..]),
                ("enc", &["./run".to_owned()][..]),
                "{args:?}"
            );
        }
        for args in [
            &["lock", "-n", "enc", "./run"][..],
            &["lock", "-n", "enc", "echo", "-n", "3"],
            &["lock", "--owner=-n", "-n", "enc", "./run"],
        ] {
            let parsed = lock_args(args);
            assert_eq!(parsed.limit, None, "{args:?}");
            assert_eq!(parsed.name, "enc", "{args:?}");
        }
        let parsed = lock_args(&["lock", "-n", "enc", "echo", "-n", "3"]);
        assert!(parsed.run.no_wait);
        assert_eq!(
            parsed.run.command,
            ["echo", "-n", "3"],
            "CMD's own -n is CMD's"
        );
        let parsed = lock_args(&["lock", "--owner", "7", "-n", "enc", "./run"]);
        assert_eq!(
            parsed.run.owner.as_deref(),
            Some("7"),
            "a value is not a name"
        );
        assert!(parsed.run.no_wait && parsed.limit.is_none());
        // Both: a limit, and fail at once.
        let parsed = lock_args(&["lock", "-n", "2", "--nb", "enc", "./run"]);
        assert_eq!((parsed.limit, parsed.run.no_wait), (Some(2), true));
        // A lock named by digits fails at once with --nb.
        let parsed = lock_args(&["lock", "--nb", "42", "./run"]);
        assert_eq!(
            (parsed.name.as_str(), parsed.limit, parsed.run.no_wait),
            ("42", None, true)
        );
        assert!(
            parse(&["lock", "-n", "0", "enc", "./run"]).is_err(),
            "a limit is at least 1"
        );
        assert!(parse(&["lock", "-n", "2", "--shared", "enc", "./run"]).is_err());
        assert!(parse(&["lock", "--shared", "--exclusive", "enc", "./run"]).is_err());
        let parsed = lock_args(&["lock", "-s", "enc", "./run"]);
        assert!(parsed.shared && !parsed.exclusive);
        let parsed = lock_args(&["lock", "-x", "--nb", "enc", "./run"]);
        assert!(parsed.exclusive && parsed.run.no_wait);
        // -n 2 is a limit whatever comes before it, and a limit is not a writer.
        assert!(parse(&["lock", "-x", "-n", "2", "enc", "./run"]).is_err());
        // Other commands are left alone.
        assert!(parse(&["status", "-n"]).is_err());
        match parse(&["elect", "-n", "e", "./run"])
            .expect("parses")
            .command
        {
            Command::Elect(args) => assert!(args.run.no_wait && args.name == "e"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn lease_ids_are_checked_before_anything_is_sent() {
        assert!(parse(&["lease", "show", "../../healthz"]).is_err());
        assert!(parse(&["lease", "show", "0123456789abcdef0"]).is_err());
        assert!(parse(&["lease", "show", "2040a2132dde5f3f"]).is_ok());
        assert!(parse(&["lock", "--lease", "zz", "x", "true"]).is_err());
        assert!(parse(&["lock", "--lease", "ab", "--ttl", "5", "x", "true"]).is_err());
    }
}
