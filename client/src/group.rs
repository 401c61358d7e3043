//! All-or-nothing groups of locks: every name or none, in one request, released in one.

use std::collections::BTreeSet;
use std::future::Future;
use std::time::Duration;

use crate::acquire::{self, Hold, Options, Target};
use crate::client::Client;
use crate::error::Error;
use crate::hold::LostReason;
use crate::lease::{Handle, Lease, LeaseId};
use crate::token::FencingToken;

impl Client {
    /// Starts acquiring every lock of `names` at once, or none (the seats of a group of friends,
    /// the accounts of a transfer); finish with [`GroupBuilder::acquire`]. The server takes them
    /// in one step whatever order they come in, so two groups overlapping in opposite orders
    /// never deadlock, and a wait that runs out leaves no partial hold. Duplicates count once.
    pub fn lock_group<'a>(
        &self,
        names: impl IntoIterator<Item = impl Into<String>>,
    ) -> GroupBuilder<'a> {
        let names: BTreeSet<String> = names.into_iter().map(Into::into).collect();
        GroupBuilder {
            options: Options::new(self, Some(Duration::ZERO)),
            names: names.into_iter().collect(),
        }
    }
}

/// How to acquire a group of locks; from [`Client::lock_group`]. The options are those of
/// [`crate::LockBuilder`].
#[derive(Debug)]
#[must_use = "call .acquire() or .try_acquire()"]
pub struct GroupBuilder<'a> {
    options: Options<'a>,
    names: Vec<String>,
}

impl<'a> GroupBuilder<'a> {
    /// The TTL of the lease the group gets (default [`crate::DEFAULT_TTL`]). Not with
    /// [`GroupBuilder::lease`].
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.options.ttl = Some(ttl);
        self
    }

    /// How long to wait until every name is free (default: don't wait); any length, as
    /// [`crate::LockBuilder::wait`].
    pub fn wait(mut self, wait: Duration) -> Self {
        self.options.wait = Some(wait);
        self
    }

    /// Wait as long as it takes.
    pub fn wait_forever(mut self) -> Self {
        self.options.wait = None;
        self
    }

    /// Who is asking, shown to others who find the locks held.
    pub fn owner(mut self, owner: impl Into<String>) -> Self {
        self.options.owner = Some(owner.into());
        self
    }

    /// Hold the group under this existing lease (see [`crate::LockBuilder::lease`]; one guard
    /// per lock and lease applies to each name). Not with [`GroupBuilder::ttl`].
    pub fn lease(mut self, lease: &'a Lease) -> Self {
        self.options.lease = Some(lease);
        self
    }

    /// Tries once, without waiting.
    pub async fn try_acquire(self) -> Result<GroupGuard, Error> {
        self.wait(Duration::ZERO).acquire().await
    }

    /// Acquires every name, waiting in line (FIFO) up to the wait; `Error::LockHeld` (with a
    /// holder of a name in the way) if they were not all free in time, and then nothing is
    /// held. Retries, fail-over and clean-up as for [`crate::LockBuilder::acquire`].
    pub async fn acquire(self) -> Result<GroupGuard, Error> {
        let target = Target::Group { names: self.names };
        let hold = acquire::acquire(&self.options, target, None).await?;
        Ok(GroupGuard { hold })
    }
}

/// Every lock of a group, held together under one lease. Renews in the background (one renewal
/// keeps the whole group); released in one request by [`GroupGuard::release`] or, in the
/// background, on drop. The group is lost as a whole: when its lease is.
#[derive(Debug)]
pub struct GroupGuard {
    hold: Hold,
}

impl GroupGuard {
    /// The names held, sorted.
    pub fn names(&self) -> &[String] {
        self.hold.target().names()
    }

    /// The group's fencing token. The server puts every name in one step, so every name's
    /// token is this one ([`GroupGuard::token_of`]).
    pub fn token(&self) -> FencingToken {
        self.hold.token()
    }

    /// The fencing token of lock `name`, to pass to the resource that name protects; `None` if
    /// `name` is not in the group.
    pub fn token_of(&self, name: &str) -> Option<FencingToken> {
        self.hold.token_of(name)
    }

    /// The lease the group is held under.
    pub fn lease_id(&self) -> &LeaseId {
        self.hold.lease_id()
    }

    /// The handle of that lease (secret).
    pub fn handle(&self) -> &Handle {
        self.hold.handle()
    }

    /// Who holds it, as the server recorded.
    pub fn owner(&self) -> Option<&str> {
        self.hold.owner()
    }

    /// The TTL the server last confirmed.
    pub fn ttl(&self) -> Duration {
        self.hold.ttl()
    }

    /// True while the group is safe to act on (see [`crate::LockGuard::is_held`]).
    pub fn is_held(&self) -> bool {
        self.hold.is_held()
    }

    /// Resolves when the group is lost, with the reason.
    pub async fn lost(&self) -> LostReason {
        self.hold.lost().await
    }

    /// Runs `work` while the group is held; cancels it and answers the reason when the hold is
    /// lost (see [`crate::LockGuard::run_while_held`]).
    pub async fn run_while_held<F: Future>(&self, work: F) -> Result<F::Output, LostReason> {
        self.hold.run_while_held(work).await
    }

    /// Releases every name in one request and reports the outcome; a lease granted for this
    /// group alone is revoked too.
    pub async fn release(self) -> Result<(), Error> {
        self.hold.release().await
    }
}
