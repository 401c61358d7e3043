//! Client for Leasehold, a distributed lock and lease service: acquire a lock, get a fencing
//! token, keep the hold renewed in the background, and learn *before* anyone else can be granted
//! the lock that the hold is gone.
//!
//! # Layout
//! - `client`: [`Client`], its builder, endpoint fail-over and per-attempt timeouts.
//! - `retry`: [`RetryPolicy`] (backoff with full jitter), [`RetryBudget`], `Retry-After` pacing.
//! - `lock`: [`LockBuilder`] (acquire a mutex, a semaphore or a read-write lock), [`LockGuard`]
//!   (renews, releases), [`LockStatus`] (holders and waiters in order).
//! - `group`: [`GroupBuilder`] and [`GroupGuard`]: several locks, all or none.
//! - `election`: [`Election`] (campaign, leader, observe) and [`Leadership`] (a fenced epoch).
//! - `watch`: [`Watch`], a resumable stream of lock statuses or leaders (Server-Sent Events).
//! - `acquire`: what every kind of hold shares: the acquire (chained waits, clean-up) and the
//!   renewing hold behind every guard.
//! - `lease`: [`Lease`]: a TTL lease kept alive in the background, shareable by several locks.
//! - `hold`: the client-side lease timer and renewal loop behind guards and leases.
//! - `token`: [`FencingToken`].
//! - `error`: [`Error`], mapped from the server's stable error codes.
//! - `trace`: the W3C `traceparent` sent with each request (feature `otel`).
//! - [`blocking`]: the same API for programs without an async runtime.
//! - `cli`: the `leasehold` command line (feature `cli`, on by default).
//!
//! # Usage
//! ```no_run
//! # async fn example() -> Result<(), leasehold::Error> {
//! use std::time::Duration;
//! let client = leasehold::Client::new("http://127.0.0.1:7070")?;
//! let guard = client
//!     .lock("reports/nightly")
//!     .ttl(Duration::from_secs(10))
//!     .wait(Duration::from_secs(30))
//!     .acquire()
//!     .await?;
//! // Pass the token with every write; the resource rejects tokens older than one it saw.
//! println!("holding {} with token {}", guard.name(), guard.token());
//! tokio::select! {
//!     _ = async { /* the work */ } => {}
//!     reason = guard.lost() => eprintln!("lost the lock: {reason}; stopping"),
//! }
//! guard.release().await?;
//! # Ok(()) }
//! ```
//!
//! Beyond the mutex, with the same guards, renewal and fencing: [`LockBuilder::limit`]
//! (a semaphore), [`LockBuilder::shared`] / [`LockBuilder::exclusive`] (a read-write lock),
//! [`Client::lock_group`] (several locks, all or none), [`Client::election`] (campaign, leader,
//! observe), [`Client::watch`] (a resumable stream of a lock's status),
//! [`LockBuilder::on_position`] (your place in line while you wait), and `run_while_held` on
//! every guard (work cancelled when the hold is lost).
#![warn(missing_docs)]

mod acquire;
pub mod blocking;
#[cfg(feature = "cli")]
pub mod cli;
mod client;
mod election;
mod error;
mod group;
mod hold;
mod lease;
mod lock;
mod retry;
mod token;
mod trace;
mod watch;

pub use client::{Client, ClientBuilder};
pub use election::{Election, Leader, Leadership};
pub use error::Error;
pub use group::{GroupBuilder, GroupGuard};
pub use hold::LostReason;
pub use lease::{Handle, Lease, LeaseId, LeaseInfo};
pub use lock::{DEFAULT_TTL, Holder, LockBuilder, LockGuard, LockStatus, QueueEntry};
pub use retry::{RetryBudget, RetryPolicy};
pub use token::FencingToken;
pub use watch::Watch;
