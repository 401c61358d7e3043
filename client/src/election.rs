//! Leader election: campaign, lead (a fenced epoch, renewed in the background), resign; who
//! leads now; a stream of leaders.

use std::future::Future;
use std::time::Duration;

use reqwest::Method;
use serde::{Deserialize, Serialize};

use crate::acquire::{self, Hold, Options, Target};
use crate::client::{Client, encode};
use crate::error::Error;
use crate::hold::LostReason;
use crate::lease::{Handle, Lease, LeaseId};
use crate::token::FencingToken;
use crate::watch::{Watch, decode_json};

/// The leader of an election, as others see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Leader {
    /// The value it campaigned with (an address, an id).
    pub value: Option<String>,
    /// Its epoch: strictly greater than every earlier leader's. Resources fence with it.
    pub epoch: FencingToken,
    /// Who, if it said.
    pub owner: Option<String>,
    /// The lease it leads under.
    pub lease_id: LeaseId,
}

/// `GET /v1/elections/{name}` and each `leader` event of its observe stream.
#[derive(Deserialize)]
struct ElectionStatus {
    leader: Option<Leader>,
}

impl Client {
    /// Election `name`: campaign to lead it ([`Election::campaign`]), see who leads
    /// ([`Election::leader`]), follow its leaders ([`Election::observe`]). An election shares its
    /// name's queue with the lock of that name (the leader is that lock's holder), so give
    /// elections names of their own.
    pub fn election<'a>(&self, name: impl Into<String>) -> Election<'a> {
        Election {
            // Campaigning is waiting to lead: as long as it takes, unless told otherwise.
            options: Options::new(self, None),
            name: name.into(),
        }
    }
}

/// An election; from [`Client::election`]. The options (`ttl`, `wait`, `owner`, `lease`) apply
/// to [`Election::campaign`].
#[derive(Debug, Clone)]
pub struct Election<'a> {
    options: Options<'a>,
    name: String,
}

impl<'a> Election<'a> {
    /// The election's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The TTL of the lease a leadership gets (default [`crate::DEFAULT_TTL`]): how long the
    /// others wait for a leader that died. Not with [`Election::lease`].
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.options.ttl = Some(ttl);
        self
    }

    /// How long a campaign waits to lead before it gives up with [`Error::LockHeld`] (whose
    /// holder is the leader). Default: as long as it takes (as `etcdctl elect` does).
    pub fn wait(mut self, wait: Duration) -> Self {
        self.options.wait = Some(wait);
        self
    }

    /// Campaign as long as it takes (the default).
    pub fn wait_forever(mut self) -> Self {
        self.options.wait = None;
        self
    }

    /// Who is campaigning, shown to others.
    pub fn owner(mut self, owner: impl Into<String>) -> Self {
        self.options.owner = Some(owner.into());
        self
    }

    /// Lead under this existing lease (see [`crate::LockBuilder::lease`]). Not with
    /// [`Election::ttl`].
    pub fn lease(mut self, lease: &'a Lease) -> Self {
        self.options.lease = Some(lease);
        self
    }

    /// Campaigns with `value` (what the others learn of the leader: an address, an id): waits
    /// in line behind the leader and the candidates before it, then leads, with an epoch
    /// greater than every earlier leader's. Cancel by dropping the future. Retries, fail-over
    /// and clean-up as for [`crate::LockBuilder::acquire`].
    pub async fn campaign(&self, value: impl Into<String>) -> Result<Leadership, Error> {
        let value = value.into();
        let target = Target::Election {
            name: self.name.clone(),
            value: Some(value.clone()),
        };
        let hold = acquire::acquire(&self.options, target, None).await?;
        Ok(Leadership { hold, value })
    }

    /// Who leads now (`None`: nobody).
    pub async fn leader(&self) -> Result<Option<Leader>, Error> {
        let path = format!("/v1/elections/{}", encode(&self.name));
        let status: ElectionStatus = self
            .options
            .client
            .call(Method::GET, &path, None, None, || (None, Duration::ZERO))
            .await?;
        Ok(status.leader)
    }

    /// Follows who leads: the leader now, then each new leader (`None` while nobody leads), as a
    /// [`Watch`] that resumes after a broken connection without missing a leader. A leader
    /// is reported once, however many candidates come and go behind it. Must be called inside a
    /// Tokio runtime.
    pub fn observe(&self) -> Watch<Option<Leader>> {
        let path = format!("/v1/elections/{}/observe", encode(&self.name));
        // The server sends one event per change of leader; after a reconnect, its first event
        // may repeat the leader already reported: skipped here.
        let mut last: Option<Option<FencingToken>> = None;
        Watch::start(
            &self.options.client,
            path,
            Box::new(move |event, data| {
                if event != "leader" {
                    return None;
                }
                let leader = decode_json::<ElectionStatus>(data).map(|s| s.leader);
                if let Ok(leader) = &leader {
                    let epoch = leader.as_ref().map(|l| l.epoch);
                    if last == Some(epoch) {
                        return None;
                    }
                    last = Some(epoch);
                }
                Some(leader)
            }),
        )
    }
}

/// Leadership of an election, won by [`Election::campaign`]. Renews in the background while it
/// lives; ends with [`Leadership::resign`], or on drop (resigned in the background), or when
/// lost (the lease expired or was revoked: see [`Leadership::lost`]).
///
/// Fence the leader's work with [`Leadership::epoch`], as a lock's token: a deposed leader that
/// wakes up from a pause carries a smaller epoch than the leader after it.
#[derive(Debug)]
pub struct Leadership {
    hold: Hold,
    value: String,
}

impl Leadership {
    /// The election's name.
    pub fn name(&self) -> &str {
        &self.hold.target().names()[0]
    }

    /// The epoch of this leadership: strictly greater than every earlier leader's (a fencing
    /// token).
    pub fn epoch(&self) -> FencingToken {
        self.hold.token()
    }

    /// The value this leader campaigned with.
    pub fn value(&self) -> &str {
        &self.value
    }

    /// The lease the leadership is held under.
    pub fn lease_id(&self) -> &LeaseId {
        self.hold.lease_id()
    }

    /// The handle of that lease (secret).
    pub fn handle(&self) -> &Handle {
        self.hold.handle()
    }

    /// The TTL the server last confirmed.
    pub fn ttl(&self) -> Duration {
        self.hold.ttl()
    }

    /// True while this process may act as the leader (see [`crate::LockGuard::is_held`]).
    pub fn is_held(&self) -> bool {
        self.hold.is_held()
    }

    /// Resolves when the leadership is lost, with the reason: stop acting as the leader.
    pub async fn lost(&self) -> LostReason {
        self.hold.lost().await
    }

    /// Runs `work` while this process leads; cancels it and answers the reason when the
    /// leadership is lost (see [`crate::LockGuard::run_while_held`]).
    pub async fn run_while_held<F: Future>(&self, work: F) -> Result<F::Output, LostReason> {
        self.hold.run_while_held(work).await
    }

    /// Resigns: the next candidate leads, with a greater epoch. A lease granted for this
    /// campaign alone is revoked too.
    pub async fn resign(self) -> Result<(), Error> {
        self.hold.release().await
    }
}
