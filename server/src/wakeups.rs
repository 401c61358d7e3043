//! Wakes waiting acquires when a key they watch is deleted.
//!
//! One etcd watch per server process covers every lock queue (`P/locks/`, deletions only). Each
//! deletion is routed, in memory, to the waiters that registered interest in that key: a waiter
//! watches its predecessor and its own key. So etcd sees one watch per server and one read per
//! handoff, and a deletion wakes only the waiter it concerns, however long the queue (no
//! thundering herd, on etcd or in the server).
//!
//! This is routing, not state: no decision is taken from an event. A woken waiter re-reads etcd,
//! and that read decides.
//!
//! Nothing may fall between a waiter's read and its registration. So each waiter takes a
//! [`Subscription::mark`] (the lock's deletion count) *before* its read, and registers with that
//! mark *after* it: registering replays the lock's recent deletions newer than the mark, and
//! wakes the waiter at once if one concerns it (or if the log no longer reaches back that far).
//!
//! The watch starts "from now" (no start revision) because etcd serves watches that start at a
//! past revision in ~100 ms batches (see `docs/design.md`). When it breaks it is re-created on
//! another member and every waiter is told to re-read ([`Wakeup::Resync`]), since events may have
//! been missed in between.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{EventType, WatchFilterType, WatchOptions};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use crate::keys::KeySchema;
use crate::store::Store;

/// Deletions remembered per lock, for waiters registering after their read. Far more than can
/// happen between a waiter's mark and its registration (one etcd round trip).
const RECENT_DELETIONS: usize = 1024;

/// Why a waiter was woken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wakeup {
    /// A key it watches was deleted.
    Watched,
    /// Events may have been missed (the watch was re-created): re-read.
    Resync,
}

/// Routes deletions seen by the shared watch to the waiters watching those keys.
#[derive(Clone, Default)]
pub struct Wakeups {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Queue prefix → that lock's routes on this server.
    locks: Mutex<HashMap<Vec<u8>, LockRoutes>>,
    /// Bumped each time the watch is (re-)established; waiters re-read when it changes.
    generation: watch::Sender<u64>,
    /// Numbers subscriptions.
    next_id: std::sync::atomic::AtomicU64,
    /// Fault injection ([`Wakeups::miss_every_wakeup`]).
    deaf: std::sync::atomic::AtomicBool,
}

/// One lock's deletions and the waiters interested in them.
#[derive(Default)]
struct LockRoutes {
    /// How many deletions were routed for this lock so far.
    seq: u64,
    /// The last [`RECENT_DELETIONS`] deletions, `(seq, key)`, oldest first.
    recent: VecDeque<(u64, Vec<u8>)>,
    /// Key → the subscriptions watching its deletion.
    interested: HashMap<Vec<u8>, Vec<(u64, Arc<Notify>)>>,
    /// Subscriptions to this lock; the entry goes when the last one does.
    subscribers: usize,
}

impl LockRoutes {
    /// Stops routing deletions of `keys` to subscription `id`.
    fn forget(&mut self, id: u64, keys: &[Vec<u8>]) {
        for key in keys {
            if let Some(watchers) = self.interested.get_mut(key) {
                watchers.retain(|(watcher, _)| *watcher != id);
                if watchers.is_empty() {
                    self.interested.remove(key);
                }
            }
        }
    }
}

/// A waiter's subscription to the deletions of one or more locks (several for a group acquire).
/// Dropping it unsubscribes.
pub struct Subscription {
    /// The lock prefixes subscribed to.
    locks: Vec<Vec<u8>>,
    id: u64,
    notify: Arc<Notify>,
    /// The keys watched now.
    watching: Vec<Vec<u8>>,
    generation: watch::Receiver<u64>,
    wakeups: Wakeups,
}

/// The deletion counts of a subscription's locks, taken before a read.
#[derive(Debug, Clone, Default)]
pub struct Mark(Vec<u64>);

impl Subscription {
    /// The locks' deletion counts: take them *before* the read whose result you will watch.
    pub fn mark(&self) -> Mark {
        let locks = self.wakeups.routes();
        Mark(
            self.locks
                .iter()
                .map(|lock| locks.get(lock).map_or(0, |routes| routes.seq))
                .collect(),
        )
    }

    /// Watches `keys` (of the subscribed locks) from now on, replacing what was watched before,
    /// and wakes this waiter at once if one of them was deleted after `mark` (or if that is no
    /// longer known).
    pub fn watch(&mut self, keys: &[&[u8]], mark: &Mark) {
        let mut locks = self.wakeups.routes();
        for key in std::mem::take(&mut self.watching) {
            if let Some(routes) = KeySchema::lock_of_key(&key).and_then(|l| locks.get_mut(l)) {
                routes.forget(self.id, std::slice::from_ref(&key));
            }
        }
        let mut wake = false;
        for key in keys {
            let Some(lock) = KeySchema::lock_of_key(key) else {
                continue;
            };
            let Some(at) = self.locks.iter().position(|l| l.as_slice() == lock) else {
                continue; // not a key of a subscribed lock
            };
            let since = mark.0.get(at).copied().unwrap_or(0);
            let routes = locks.entry(lock.to_vec()).or_default();
            routes
                .interested
                .entry(key.to_vec())
                .or_default()
                .push((self.id, self.notify.clone()));
            self.watching.push(key.to_vec());
            let log_reaches_mark = routes
                .recent
                .front()
                .is_none_or(|(seq, _)| *seq <= since + 1);
            let missed = routes
                .recent
                .iter()
                .any(|(seq, deleted)| *seq > since && deleted.as_slice() == *key);
            wake |= missed || !log_reaches_mark;
        }
        if wake {
            self.notify.notify_one();
        }
    }

    /// Waits until a watched key is deleted, or the watch was re-established.
    pub async fn next(&mut self) -> Wakeup {
        if self
            .wakeups
            .inner
            .deaf
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            return std::future::pending().await;
        }
        tokio::select! {
            _ = self.notify.notified() => Wakeup::Watched,
            changed = self.generation.changed() => {
                if changed.is_err() {
                    // The watch task is gone (server shutting down): only the timers are left.
                    std::future::pending::<()>().await;
                }
                Wakeup::Resync
            }
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut locks = self.wakeups.routes();
        for lock in &self.locks {
            let Some(routes) = locks.get_mut(lock) else {
                continue;
            };
            routes.forget(self.id, &self.watching);
            routes.subscribers -= 1;
            if routes.subscribers == 0 {
                locks.remove(lock);
            }
        }
    }
}

impl Wakeups {
    /// Fault injection, for tests: from now on no subscription hears a wake-up (a waiter finds
    /// its turn only when it re-reads), as when wake-ups come later than waiters' deadlines.
    pub fn miss_every_wakeup(&self) {
        self.inner
            .deaf
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Every lock's routes on this server, locked. Held only for map updates, never across an
    /// await.
    fn routes(&self) -> std::sync::MutexGuard<'_, HashMap<Vec<u8>, LockRoutes>> {
        self.inner.locks.lock().expect("wakeups lock poisoned")
    }

    /// Subscribes to deletions of the locks at `lock_prefixes` (`P/locks/{name}/` each); call
    /// [`Subscription::watch`] to say which keys matter.
    pub fn subscribe(&self, lock_prefixes: &[String]) -> Subscription {
        let locks: Vec<Vec<u8>> = lock_prefixes
            .iter()
            .map(|p| p.as_bytes().to_vec())
            .collect();
        {
            let mut routes = self.routes();
            for lock in &locks {
                routes.entry(lock.clone()).or_default().subscribers += 1;
            }
        }
        let mut generation = self.inner.generation.subscribe();
        generation.mark_unchanged();
        Subscription {
            locks,
            id: self
                .inner
                .next_id
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            notify: Arc::new(Notify::new()),
            watching: Vec::new(),
            generation,
            wakeups: self.clone(),
        }
    }

    /// Routes a deletion to the waiters watching that key, and logs it for late registrations.
    fn deliver(&self, key: &[u8]) {
        let Some(lock) = KeySchema::lock_of_key(key) else {
            return;
        };
        let mut locks = self.routes();
        let Some(routes) = locks.get_mut(lock) else {
            return; // nobody waits for this lock here
        };
        routes.seq += 1;
        let seq = routes.seq;
        routes.recent.push_back((seq, key.to_vec()));
        if routes.recent.len() > RECENT_DELETIONS {
            routes.recent.pop_front();
        }
        if let Some(watchers) = routes.interested.get(key) {
            for (_, notify) in watchers {
                notify.notify_one();
            }
        }
    }

    /// Keeps the shared watch on `keys.locks_root()` running until `stop` is cancelled,
    /// re-creating it (and telling every waiter to re-read) whenever it breaks.
    pub async fn run(self, store: Store, keys: KeySchema, stop: CancellationToken) {
        let root = keys.locks_root();
        let mut backoff = Duration::from_millis(50);
        // Warn when the watch breaks, not once per retry while etcd stays down.
        let mut broken = false;
        // The endpoint the watch runs on: passed over for a while when the watch breaks, so the
        // next one is made on another member (a stalled member would break it again).
        let mut watched_on = 0;
        loop {
            let session = async {
                let options = WatchOptions::new()
                    .with_prefix()
                    .with_filters([WatchFilterType::NoPut]);
                let (at, mut client) = store.pick_client();
                watched_on = at;
                let mut stream = client.watch(root.as_bytes(), Some(options)).await?;
                // Wait for etcd to confirm the watch before telling waiters to re-read: only
                // then are deletions after their read guaranteed to reach them.
                match stream.message().await? {
                    Some(resp) if resp.created() => {}
                    other => {
                        return Err(etcd_client::Error::WatchError(format!(
                            "watch not created: {other:?}"
                        )));
                    }
                }
                self.inner.generation.send_modify(|g| *g += 1);
                tracing::debug!(prefix = %root, "lock watch established");
                if std::mem::take(&mut broken) {
                    tracing::info!("lock watch re-established; waiters re-read");
                }
                loop {
                    let Some(resp) = stream.message().await? else {
                        return Err(etcd_client::Error::WatchError("watch stream ended".into()));
                    };
                    if let Some(header) = resp.header() {
                        store.saw_revision(header.revision());
                    }
                    if resp.canceled() {
                        return Err(etcd_client::Error::WatchError(format!(
                            "watch cancelled by etcd: {}",
                            resp.cancel_reason()
                        )));
                    }
                    for event in resp.events() {
                        if event.event_type() == EventType::Delete
                            && let Some(kv) = event.kv()
                        {
                            self.deliver(kv.key());
                        }
                    }
                }
                #[allow(unreachable_code)]
                Ok::<(), etcd_client::Error>(())
            };
            let started = tokio::time::Instant::now();
            tokio::select! {
                _ = stop.cancelled() => return,
                result = session => {
                    if let Err(err) = result {
                        store.suspect(watched_on);
                        crate::metrics::watch_restarted();
                        if broken {
                            tracing::debug!(error = %err, "lock watch still broken; retrying");
                        } else {
                            tracing::warn!(error = %err, "lock watch broken; re-creating it");
                        }
                        broken = true;
                    }
                }
            }
            if started.elapsed() > Duration::from_secs(5) {
                backoff = Duration::from_millis(50);
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A0: &[u8] = b"/p/locks/a/q/0000000000000001";
    const A1: &[u8] = b"/p/locks/a/q/0000000000000002";
    const B0: &[u8] = b"/p/locks/b/x/0000000000000001";
    const LOCK_A: &str = "/p/locks/a/";
    const LOCK_B: &str = "/p/locks/b/";

    async fn woken(sub: &mut Subscription) -> bool {
        tokio::time::timeout(Duration::from_millis(20), sub.next())
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn a_deletion_wakes_only_who_watches_it() {
        let wakeups = Wakeups::default();
        let mut first = wakeups.subscribe(&[LOCK_A.into()]);
        let mut second = wakeups.subscribe(&[LOCK_A.into()]);
        let mut other_lock = wakeups.subscribe(&["/p/locks/a%2Fb/".into()]);
        let (m1, m2) = (first.mark(), second.mark());
        first.watch(&[A0], &m1);
        second.watch(&[A1], &m2);
        other_lock.watch(&[A0], &Mark::default());
        wakeups.deliver(A0);
        assert!(woken(&mut first).await);
        assert!(!woken(&mut second).await, "not its predecessor");
        assert!(
            !woken(&mut other_lock).await,
            "lock a/b never sees lock a's keys"
        );
    }

    #[tokio::test]
    async fn a_deletion_between_read_and_registration_is_not_missed() {
        let wakeups = Wakeups::default();
        let mut sub = wakeups.subscribe(&[LOCK_A.into()]);
        let mark = sub.mark(); // before the read
        wakeups.deliver(A0); // after the read, before we registered
        sub.watch(&[A0], &mark);
        assert!(woken(&mut sub).await);
    }

    #[tokio::test]
    async fn deletions_before_the_mark_are_ignored() {
        let wakeups = Wakeups::default();
        let mut sub = wakeups.subscribe(&[LOCK_A.into()]);
        wakeups.deliver(A0); // the read will already have seen this
        let mark = sub.mark();
        sub.watch(&[A0], &mark);
        assert!(!woken(&mut sub).await);
    }

    #[tokio::test]
    async fn a_log_that_no_longer_reaches_the_mark_means_recheck() {
        let wakeups = Wakeups::default();
        let mut sub = wakeups.subscribe(&[LOCK_A.into()]);
        let mark = sub.mark();
        for i in 0..(RECENT_DELETIONS + 2) {
            wakeups.deliver(format!("/p/locks/a/q/{i:016x}x").as_bytes());
        }
        sub.watch(&[A0], &mark);
        assert!(
            woken(&mut sub).await,
            "missed deletions may have included ours"
        );
    }

    #[tokio::test]
    async fn rewatching_replaces_the_keys() {
        let wakeups = Wakeups::default();
        let mut sub = wakeups.subscribe(&[LOCK_A.into()]);
        sub.watch(&[A0], &sub.mark());
        sub.watch(&[A1], &sub.mark());
        wakeups.deliver(A0);
        assert!(!woken(&mut sub).await, "A0 is no longer watched");
        wakeups.deliver(A1);
        assert!(woken(&mut sub).await);
    }

    #[tokio::test]
    async fn dropping_the_last_subscriber_forgets_the_lock() {
        let wakeups = Wakeups::default();
        let mut first = wakeups.subscribe(&[LOCK_A.into()]);
        let second = wakeups.subscribe(&[LOCK_A.into()]);
        first.watch(&[A0], &Mark::default());
        drop(first);
        {
            let locks = wakeups.inner.locks.lock().unwrap();
            assert!(locks[LOCK_A.as_bytes()].interested.is_empty());
        }
        drop(second);
        assert!(wakeups.inner.locks.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn one_subscription_watches_keys_of_several_locks() {
        let wakeups = Wakeups::default();
        let mut group = wakeups.subscribe(&[LOCK_A.into(), LOCK_B.into()]);
        let mark = group.mark();
        group.watch(&[A0, B0], &mark);
        wakeups.deliver(A1);
        assert!(!woken(&mut group).await, "not watched");
        wakeups.deliver(B0);
        assert!(woken(&mut group).await, "an exclusive key of lock b");
        drop(group);
        assert!(wakeups.inner.locks.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_new_watch_generation_means_resync() {
        let wakeups = Wakeups::default();
        let mut sub = wakeups.subscribe(&[LOCK_A.into()]);
        wakeups.inner.generation.send_modify(|g| *g += 1);
        assert_eq!(sub.next().await, Wakeup::Resync);
    }
}
