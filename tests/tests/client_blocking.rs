//! `leasehold::blocking`, from plain threads with no async runtime of their own, against real
//! etcd and a real server (which the test kit runs on a runtime of its own).

use std::time::Duration;

use anyhow::{Context, Result};
use leasehold::blocking::Client;
use leasehold::{Error, LostReason};
use leasehold_tests::{Api, EtcdCluster, ServerProcess};

const TTL: Duration = Duration::from_secs(2);

/// Etcd and a server process, started on the kit's runtime.
struct Rig {
    kit: tokio::runtime::Runtime,
    server: ServerProcess,
    _etcd: EtcdCluster,
}

impl Rig {
    fn start() -> Result<Self> {
        let kit = tokio::runtime::Runtime::new()?;
        let (etcd, server) = kit.block_on(async {
            let etcd = EtcdCluster::start(1).await?;
            let server =
                ServerProcess::spawn(&leasehold_tests::server_bin!(), &etcd.endpoints(), &[])
                    .await?;
            anyhow::Ok((etcd, server))
        })?;
        Ok(Self {
            kit,
            server,
            _etcd: etcd,
        })
    }

    fn status(&self, name: &str) -> Result<serde_json::Value> {
        let api = Api::new(self.server.url());
        Ok(self
            .kit
            .block_on(api.get(&format!("/v1/locks/{}", leasehold_tests::encode(name))))?
            .1)
    }
}

/// A guard from the blocking client is renewed in the background while the thread does other
/// things (here: sleeps for three TTLs), reports contention, and frees the lock on release and,
/// before `drop` returns, on drop. A waiter blocked in another thread is granted on release.
#[test]
fn blocking_guard_renews_and_releases() -> Result<()> {
    let rig = Rig::start()?;
    let client = Client::new(rig.server.url())?;
    let guard = client
        .lock("blocking/a")
        .ttl(TTL)
        .owner("thread")
        .acquire()?;
    std::thread::sleep(3 * TTL);
    assert!(guard.is_held(), "not renewed while the thread slept");
    assert_eq!(guard.lost_within(Duration::from_millis(10)), None);
    assert_eq!(
        rig.status("blocking/a")?["holder"]["token"],
        serde_json::json!(guard.token().get())
    );
    let other = Client::new(rig.server.url())?;
    assert!(matches!(
        other.lock("blocking/a").try_acquire(),
        Err(Error::LockHeld { .. })
    ));

    let waiter = std::thread::spawn(move || {
        other
            .lock("blocking/a")
            .ttl(TTL)
            .wait_forever()
            .acquire()
            .map(|g| g.token())
    });
    rig.kit
        .block_on(Api::new(rig.server.url()).wait_for_waiters("blocking/a", 1))?;
    let first = guard.token();
    guard.release()?;
    let second = waiter.join().expect("waiter thread")?;
    assert!(second > first);

    // The waiter's guard was dropped in its thread: released before the drop returned.
    assert!(rig.status("blocking/a")?["holder"].is_null());
    let dropped = client.lock("blocking/b").ttl(TTL).acquire()?;
    drop(dropped);
    assert!(rig.status("blocking/b")?["holder"].is_null());
    Ok(())
}

/// Leases: several locks under one, kept alive in the background, revoked on drop (freeing
/// their locks); a revoked lease is reported lost by its guards.
#[test]
fn blocking_leases_hold_locks_and_revoke_on_drop() -> Result<()> {
    let rig = Rig::start()?;
    let client = Client::new(rig.server.url())?;
    let lease = client.grant_lease(TTL)?;
    let a = client.lock("blocking/x").lease(&lease).acquire()?;
    let b = client.lock("blocking/y").lease(&lease).acquire()?;
    assert!(matches!(
        client.lock("blocking/x").lease(&lease).try_acquire(),
        Err(Error::AlreadyHeld { .. })
    ));
    std::thread::sleep(2 * TTL);
    let mut locks = lease.info()?.locks;
    locks.sort();
    assert_eq!(locks, ["blocking/x", "blocking/y"]);
    assert!(lease.is_alive() && a.is_held() && b.is_held());

    drop(lease);
    assert!(rig.status("blocking/x")?["holder"].is_null());
    assert!(rig.status("blocking/y")?["holder"].is_null());
    let reason = a.lost_within(TTL).context("not lost within the TTL")?;
    assert_eq!(reason, LostReason::Released);
    Ok(())
}

/// From plain threads: a semaphore of 2 and a read-write lock through the builder, and an
/// election: campaign, leader, a campaign that may not wait refused, a second candidate blocked
/// in another thread leads once the first resigns, and a dropped leadership is resigned before
/// `drop` returns.
#[test]
fn blocking_semaphores_read_write_locks_and_elections() -> Result<()> {
    let rig = Rig::start()?;
    let client = Client::new(rig.server.url())?;
    let a = client.lock("blocking/sem").limit(2).ttl(TTL).acquire()?;
    let b = client.lock("blocking/sem").limit(2).ttl(TTL).acquire()?;
    assert!(b.token() > a.token());
    assert!(matches!(
        client.lock("blocking/sem").limit(2).try_acquire(),
        Err(Error::LockHeld { .. })
    ));
    assert_eq!(rig.status("blocking/sem")?["limit"], 2);
    let reader = client.lock("blocking/rw").shared().ttl(TTL).acquire()?;
    assert!(matches!(
        client.lock("blocking/rw").exclusive().try_acquire(),
        Err(Error::LockHeld { .. })
    ));
    reader.release()?;
    client
        .lock("blocking/rw")
        .exclusive()
        .try_acquire()?
        .release()?;

    let election = client.election("blocking/e").ttl(TTL);
    let leader = election.campaign("first")?;
    assert_eq!(leader.value(), "first");
    let shown = election.leader()?.context("a leader")?;
    assert_eq!(
        (shown.value.as_deref(), shown.epoch),
        (Some("first"), leader.epoch())
    );
    assert!(matches!(
        election.clone().wait(Duration::ZERO).campaign("third"),
        Err(Error::LockHeld { .. })
    ));
    let second = std::thread::spawn({
        let election = election.clone();
        move || election.campaign("second")
    });
    rig.kit
        .block_on(Api::new(rig.server.url()).wait_for_waiters("blocking/e", 1))?;
    let first_epoch = leader.epoch();
    leader.resign()?;
    let second = second.join().expect("the thread ran")?;
    assert!(second.epoch() > first_epoch);
    assert!(second.is_held());
    drop(second);
    assert_eq!(election.leader()?, None, "resigned before drop returned");
    Ok(())
}
