//! End-to-end tests of the `leasehold` crate beyond the mutex: semaphores, read-write locks,
//! groups, elections, watches, queue positions and `run_while_held`, against real etcd and real
//! servers.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use leasehold::{Client, Error, Leader, LockStatus, LostReason, Watch};
use leasehold_tests::cut::CutProxy;
use leasehold_tests::{Api, EtcdCluster, TestServer};
use tokio::sync::mpsc;

const TTL: Duration = Duration::from_secs(3);

/// How long a test waits for something that should happen at once.
const SOON: Duration = Duration::from_secs(5);

/// The next item of a watch that is not a retryable error (a cut link reports those while it
/// tries again), within [`SOON`].
async fn next_ok<T>(watch: &mut Watch<T>) -> Result<T> {
    let deadline = tokio::time::Instant::now() + SOON;
    loop {
        match tokio::time::timeout_at(deadline, watch.next()).await {
            Err(_) => bail!("no item in time"),
            Ok(None) => bail!("the watch ended"),
            Ok(Some(Ok(item))) => return Ok(item),
            Ok(Some(Err(err))) if err.is_retryable() => continue,
            Ok(Some(Err(err))) => bail!("the watch failed: {err}"),
        }
    }
}

/// The value of a leader, or `None`.
fn value(leader: &Option<Leader>) -> Option<&str> {
    leader.as_ref().and_then(|l| l.value.as_deref())
}

/// `.limit(n)`: n holders with their own growing tokens, the next one refused, a disagreeing
/// limit refused with `limit_mismatch`; `.shared()` / `.exclusive()`: readers together, a writer
/// alone, a waiting writer blocks later readers, a mutex on the name is `mode_mismatch`.
#[tokio::test]
async fn semaphores_and_read_write_locks_from_the_builder() -> Result<()> {
    leasehold_tests::init_logging();
    let etcd = EtcdCluster::start(1).await?;
    let server = TestServer::start(&etcd).await?;
    let client = Client::new(server.url())?;

    let a = client.lock("sem").limit(2).ttl(TTL).acquire().await?;
    let b = client.lock("sem").limit(2).ttl(TTL).acquire().await?;
    ensure!(b.token() > a.token(), "{} then {}", a.token(), b.token());
    match client.lock("sem").limit(2).try_acquire().await {
        Err(Error::LockHeld { .. }) => {}
        other => bail!("a third holder of a semaphore of 2: {other:?}"),
    }
    match client.lock("sem").limit(3).try_acquire().await {
        Err(err @ Error::Mismatch { .. }) => ensure!(err.code() == "limit_mismatch", "{err}"),
        other => bail!("a limit of 3 on a semaphore of 2: {other:?}"),
    }
    let status = client.status("sem").await?;
    ensure!(status.limit == Some(2), "{status:?}");
    let holders: Vec<_> = status.queue.iter().map(|e| (e.token, e.holds)).collect();
    ensure!(
        holders == [(a.token(), true), (b.token(), true)],
        "{holders:?}"
    );
    a.release().await?;
    let c = client.lock("sem").limit(2).ttl(TTL).try_acquire().await?;
    ensure!(c.token() > b.token() && c.is_held());

    let r1 = client.lock("rw").shared().ttl(TTL).acquire().await?;
    let r2 = client.lock("rw").shared().ttl(TTL).acquire().await?;
    ensure!(r1.is_held() && r2.is_held());
    match client.lock("rw").exclusive().try_acquire().await {
        Err(Error::LockHeld { .. }) => {}
        other => bail!("a writer beside readers: {other:?}"),
    }
    match client.lock("rw").try_acquire().await {
        Err(err @ Error::Mismatch { .. }) => ensure!(err.code() == "mode_mismatch", "{err}"),
        other => bail!("a mutex on a read-write lock: {other:?}"),
    }
    let writer = tokio::spawn({
        let client = client.clone();
        async move {
            client
                .lock("rw")
                .exclusive()
                .ttl(TTL)
                .wait(Duration::from_secs(20))
                .acquire()
                .await
        }
    });
    Api::new(server.url()).wait_for_waiters("rw", 1).await?;
    match client.lock("rw").shared().try_acquire().await {
        Err(Error::LockHeld { .. }) => {}
        other => bail!("a reader after a waiting writer: {other:?}"),
    }
    let last_reader = r2.token();
    r1.release().await?;
    r2.release().await?;
    let w = tokio::time::timeout(SOON, writer).await???;
    ensure!(w.token() > last_reader);
    let status = client.status("rw").await?;
    ensure!(
        status.queue.len() == 1 && status.queue[0].mode.as_deref() == Some("exclusive"),
        "{status:?}"
    );
    Ok(())
}

/// `.on_position(f)`: a waiter behind a holder and another waiter is told 2, then 1 when the
/// holder lets go, then is granted when the one ahead lets go: the count goes down, in order,
/// and nothing is reported after the grant.
#[tokio::test]
async fn a_waiter_is_told_its_place_and_it_counts_down() -> Result<()> {
    leasehold_tests::init_logging();
    let etcd = EtcdCluster::start(1).await?;
    let server = TestServer::start(&etcd).await?;
    let api = Api::new(server.url());
    let client = Client::new(server.url())?;

    let holder = client.lock("line").ttl(TTL).acquire().await?;
    let first = tokio::spawn({
        let client = client.clone();
        async move {
            client
                .lock("line")
                .ttl(TTL)
                .wait(Duration::from_secs(20))
                .acquire()
                .await
        }
    });
    api.wait_for_waiters("line", 1).await?;
    let (tx, mut positions) = mpsc::unbounded_channel();
    let me = tokio::spawn({
        let client = client.clone();
        async move {
            client
                .lock("line")
                .ttl(TTL)
                .wait(Duration::from_secs(20))
                .on_position(move |ahead| {
                    let _ = tx.send(ahead);
                })
                .acquire()
                .await
        }
    });
    ensure!(next(&mut positions).await == Some(2), "two ahead at first");
    holder.release().await?;
    let first = tokio::time::timeout(SOON, first).await???;
    ensure!(next(&mut positions).await == Some(1), "then one");
    first.release().await?;
    let me = tokio::time::timeout(SOON, me).await???;
    ensure!(me.is_held());
    // The callback went with the acquire: the channel is closed, with nothing more in it.
    ensure!(positions.recv().await.is_none(), "nothing after the grant");
    Ok(())
}

/// `lock_group(names)`: every name with one token each (duplicates once, sorted); a name held
/// elsewhere makes a group get nothing, and leaves no partial hold; one release frees all; a
/// revoked lease makes the group lost, and `run_while_held` stops its work.
#[tokio::test]
async fn groups_take_all_or_nothing_and_are_lost_as_one() -> Result<()> {
    leasehold_tests::init_logging();
    let etcd = EtcdCluster::start(1).await?;
    let server = TestServer::start(&etcd).await?;
    let client = Client::new(server.url())?;

    let group = client
        .lock_group(["g/b", "g/a", "g/a"])
        .ttl(TTL)
        .owner("friends")
        .acquire()
        .await?;
    ensure!(group.names() == ["g/a", "g/b"], "{:?}", group.names());
    ensure!(group.token_of("g/a") == Some(group.token()));
    ensure!(group.token_of("g/b") == Some(group.token()));
    ensure!(group.token_of("g/c").is_none());
    for name in ["g/a", "g/b"] {
        let holder = client.status(name).await?.holder.context("held")?;
        ensure!(
            holder.token == group.token() && holder.owner.as_deref() == Some("friends"),
            "{name}: {holder:?}"
        );
    }
    match client.lock("g/b").try_acquire().await {
        Err(Error::LockHeld { .. }) => {}
        other => bail!("g/b is the group's: {other:?}"),
    }
    match client.lock_group(["g/c", "g/b"]).try_acquire().await {
        Err(Error::LockHeld { .. }) => {}
        other => bail!("a group overlapping a held name: {other:?}"),
    }
    let free = client.status("g/c").await?;
    ensure!(
        free.holder.is_none() && free.queue.is_empty(),
        "no partial hold: {free:?}"
    );
    group.release().await?;
    for name in ["g/a", "g/b"] {
        let status = client.status(name).await?;
        ensure!(status.queue.is_empty(), "{status:?}");
    }

    let group = client.lock_group(["g/x", "g/y"]).ttl(TTL).acquire().await?;
    let cancelled = Arc::new(AtomicBool::new(false));
    let work = {
        let cancelled = cancelled.clone();
        async move {
            let _on_drop = SetOnDrop(cancelled);
            std::future::pending::<()>().await
        }
    };
    client
        .revoke_lease(group.lease_id(), group.handle())
        .await?;
    let outcome = tokio::time::timeout(TTL, group.run_while_held(work))
        .await
        .context("the loss was noticed within the TTL")?;
    ensure!(
        matches!(
            outcome,
            Err(LostReason::NotHolder | LostReason::LeaseNotFound)
        ),
        "{outcome:?}"
    );
    ensure!(cancelled.load(Ordering::SeqCst), "the work was cancelled");
    ensure!(!group.is_held());
    Ok(())
}

/// The next position reported, within [`SOON`].
async fn next(positions: &mut mpsc::UnboundedReceiver<u64>) -> Option<u64> {
    tokio::time::timeout(SOON, positions.recv())
        .await
        .ok()
        .flatten()
}

/// Sets a flag when dropped: tells that a future was cancelled.
struct SetOnDrop(Arc<AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// `LockGuard::run_while_held`: the work's output while held; cancelled with the reason when the
/// hold is lost; not even started on a hold already lost.
#[tokio::test]
async fn run_while_held_cancels_the_work_when_the_lock_is_lost() -> Result<()> {
    leasehold_tests::init_logging();
    let etcd = EtcdCluster::start(1).await?;
    let server = TestServer::start(&etcd).await?;
    let client = Client::new(server.url())?;

    let guard = client.lock("job").ttl(TTL).acquire().await?;
    ensure!(guard.run_while_held(async { 42 }).await == Ok(42));
    let cancelled = Arc::new(AtomicBool::new(false));
    let work = {
        let cancelled = cancelled.clone();
        async move {
            let _on_drop = SetOnDrop(cancelled);
            std::future::pending::<()>().await
        }
    };
    client
        .revoke_lease(guard.lease_id(), guard.handle())
        .await?;
    let outcome = tokio::time::timeout(TTL, guard.run_while_held(work))
        .await
        .context("the loss was noticed within the TTL")?;
    ensure!(outcome.is_err(), "{outcome:?}");
    ensure!(cancelled.load(Ordering::SeqCst), "the work was cancelled");
    let started = Arc::new(AtomicBool::new(false));
    let outcome = guard
        .run_while_held({
            let started = started.clone();
            async move { started.store(true, Ordering::SeqCst) }
        })
        .await;
    ensure!(outcome.is_err() && !started.load(Ordering::SeqCst));
    Ok(())
}

/// An election: the first candidate leads with an epoch, observers and `leader()` see it; a
/// second candidate waits (observers are not told of it), then leads with a larger epoch when
/// the first resigns; a campaign that may not wait is refused; a leadership whose lease is
/// revoked is lost, and `run_while_held` stops the leader's work.
#[tokio::test]
async fn elections_campaign_lead_resign_and_observe() -> Result<()> {
    leasehold_tests::init_logging();
    let etcd = EtcdCluster::start(1).await?;
    let server = TestServer::start(&etcd).await?;
    let client = Client::new(server.url())?;
    let election = client.election("db").ttl(TTL);
    let mut observed = election.observe();
    ensure!(next_ok(&mut observed).await?.is_none(), "nobody leads yet");
    ensure!(election.leader().await?.is_none());

    let a = election
        .clone()
        .owner("node-a")
        .campaign("10.0.0.1")
        .await?;
    ensure!(a.value() == "10.0.0.1" && a.name() == "db" && a.is_held());
    let seen = next_ok(&mut observed).await?;
    ensure!(value(&seen) == Some("10.0.0.1"), "{seen:?}");
    let leader = election.leader().await?.context("a leader")?;
    ensure!(
        leader.epoch == a.epoch() && leader.owner.as_deref() == Some("node-a"),
        "{leader:?}"
    );
    ensure!(&leader.lease_id == a.lease_id());

    let b = tokio::spawn({
        let election = election.clone();
        async move { election.campaign("10.0.0.2").await }
    });
    Api::new(server.url()).wait_for_waiters("db", 1).await?;
    match election
        .clone()
        .wait(Duration::ZERO)
        .campaign("10.0.0.3")
        .await
    {
        Err(Error::LockHeld { holder: Some(h) }) => ensure!(h.token == a.epoch()),
        other => bail!("a campaign that may not wait: {other:?}"),
    }
    let a_epoch = a.epoch();
    a.resign().await?;
    let b = tokio::time::timeout(SOON, b).await???;
    ensure!(b.epoch() > a_epoch, "{} after {a_epoch}", b.epoch());
    // The next leader is the news, not the candidates that queued meanwhile.
    let seen = next_ok(&mut observed).await?;
    ensure!(value(&seen) == Some("10.0.0.2"), "{seen:?}");
    ensure!(seen.as_ref().map(|l| l.epoch) == Some(b.epoch()));

    let cancelled = Arc::new(AtomicBool::new(false));
    let work = {
        let cancelled = cancelled.clone();
        async move {
            let _on_drop = SetOnDrop(cancelled);
            std::future::pending::<()>().await
        }
    };
    client.revoke_lease(b.lease_id(), b.handle()).await?;
    let outcome = tokio::time::timeout(TTL, b.run_while_held(work))
        .await
        .context("the loss was noticed within the TTL")?;
    ensure!(outcome.is_err() && cancelled.load(Ordering::SeqCst));
    ensure!(!b.is_held());
    let seen = next_ok(&mut observed).await?;
    ensure!(seen.is_none(), "{seen:?}");
    Ok(())
}

/// A watch and an observer whose connection is cut (through a proxy that then refuses every
/// connection) resume with `Last-Event-ID` when the link is back: they report what happened
/// while they were cut off, in order, not just the state at the reconnect.
#[tokio::test]
async fn watches_resume_after_a_cut_without_missing_a_change() -> Result<()> {
    leasehold_tests::init_logging();
    let etcd = EtcdCluster::start(1).await?;
    let server = TestServer::start(&etcd).await?;
    let proxy = CutProxy::start(&server.url()).await?;
    let direct = Client::new(server.url())?;
    let through_proxy = Client::new(proxy.url())?;

    // A leader, and two candidates in line behind it.
    let election = direct.election("cut/e").ttl(TTL);
    let a = election.campaign("a").await?;
    let api = Api::new(server.url());
    let b = tokio::spawn({
        let election = election.clone();
        async move { election.campaign("b").await }
    });
    api.wait_for_waiters("cut/e", 1).await?;
    let c = tokio::spawn({
        let election = election.clone();
        async move { election.campaign("c").await }
    });
    api.wait_for_waiters("cut/e", 2).await?;
    let mut observed = through_proxy.election("cut/e").observe();
    ensure!(value(&next_ok(&mut observed).await?) == Some("a"));

    let mut watched = through_proxy.watch("cut/w");
    let first: LockStatus = next_ok(&mut watched).await?;
    ensure!(first.holder.is_none(), "{first:?}");

    proxy.cut();
    // While cut off: b leads, then c; w is held by one holder, then another.
    a.resign().await?;
    let b = tokio::time::timeout(SOON, b).await???;
    b.resign().await?;
    let c = tokio::time::timeout(SOON, c).await???;
    let h1 = direct.lock("cut/w").ttl(TTL).acquire().await?;
    let h1_token = h1.token();
    h1.release().await?;
    let h2 = direct.lock("cut/w").ttl(TTL).acquire().await?;
    proxy.restore();

    ensure!(
        value(&next_ok(&mut observed).await?) == Some("b"),
        "b led while cut off"
    );
    let seen = next_ok(&mut observed).await?;
    ensure!(
        value(&seen) == Some("c") && seen.as_ref().map(|l| l.epoch) == Some(c.epoch()),
        "{seen:?}"
    );
    let mut holders = Vec::new();
    while holders.last() != Some(&Some(h2.token())) {
        let status = next_ok(&mut watched).await?;
        let token = status.holder.map(|h| h.token);
        if holders.last() != Some(&token) {
            holders.push(token);
        }
    }
    ensure!(
        holders == [Some(h1_token), None, Some(h2.token())],
        "every holder, in order: {holders:?}"
    );
    ensure!(watched.revision().is_some());
    Ok(())
}

/// Every kind of hold is renewed in the background past its TTL: a semaphore's second holder, a
/// reader, a group (renewed through one name) and a leadership (renewed as its lock) all still
/// hold, with the same tokens, two TTLs later.
#[tokio::test]
async fn every_kind_of_hold_renews_past_its_ttl() -> Result<()> {
    leasehold_tests::init_logging();
    let etcd = EtcdCluster::start(1).await?;
    let server = TestServer::start(&etcd).await?;
    let client = Client::new(server.url())?;
    const SHORT: Duration = Duration::from_secs(2);

    let _first = client.lock("r/sem").limit(2).ttl(SHORT).acquire().await?;
    let second = client.lock("r/sem").limit(2).ttl(SHORT).acquire().await?;
    let reader = client.lock("r/rw").shared().ttl(SHORT).acquire().await?;
    let group = client
        .lock_group(["r/g1", "r/g2"])
        .ttl(SHORT)
        .acquire()
        .await?;
    let leader = client.election("r/e").ttl(SHORT).campaign("me").await?;
    // Time passing is the point here: two TTLs, so only renewals can keep the holds.
    tokio::time::sleep(2 * SHORT).await;
    ensure!(second.is_held() && reader.is_held() && group.is_held() && leader.is_held());
    let held = |status: &LockStatus, lease, token| {
        status
            .queue
            .iter()
            .any(|e| &e.lease_id == lease && e.token == token && e.holds)
    };
    ensure!(held(
        &client.status("r/sem").await?,
        second.lease_id(),
        second.token()
    ));
    ensure!(held(
        &client.status("r/rw").await?,
        reader.lease_id(),
        reader.token()
    ));
    for name in ["r/g1", "r/g2"] {
        ensure!(
            held(&client.status(name).await?, group.lease_id(), group.token()),
            "{name}"
        );
    }
    let shown = client.election("r/e").leader().await?.context("a leader")?;
    ensure!(shown.epoch == leader.epoch());
    Ok(())
}
