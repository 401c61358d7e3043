//! Wakes waiting acquires when a key ahead of them is deleted.
//!
//! One etcd watch per server process covers every lock queue (`P/locks/`, deletions only). Each
//! deletion is handed to the waiters of that one lock, in memory; each waiter ignores every
//! deletion but its predecessor's and its own. So etcd sees one watch per server and one read per
//! handoff, however many waiters there are (no thundering herd on etcd).
//!
//! This is routing, not state: no decision is taken from an event. A woken waiter re-reads etcd,
//! and that read decides.
//!
//! The watch starts "from now" (no start revision) because etcd serves watches that start at a
//! past revision in ~100 ms batches (see `docs/design.md`); a waiter subscribes *before* its
//! decision read, so any deletion after that read reaches it. When the watch breaks it is
//! re-created and every waiter is told to re-read ([`Wakeup::Resync`]), since events may have been
//! missed in between.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{EventType, WatchFilterType, WatchOptions};
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

use crate::keys::KeySchema;
use crate::store::Store;

/// Deletions buffered per lock before a slow waiter is told it lagged (and re-reads).
const CHANNEL_CAPACITY: usize = 256;

/// Something a waiter must look at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wakeup {
    /// This key was deleted from the lock's queue.
    Deleted(Vec<u8>),
    /// Events may have been missed: re-read.
    Resync,
}

/// Routes deletions seen by the shared watch to the waiters of each lock.
#[derive(Clone, Default)]
pub struct Wakeups {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Queue prefix → channel to that lock's waiters on this server.
    locks: Mutex<HashMap<Vec<u8>, broadcast::Sender<Wakeup>>>,
    /// Bumped each time the watch is (re-)established; waiters re-read when it changes.
    generation: watch::Sender<u64>,
}

/// A waiter's subscription to the deletions of one lock's queue. Dropping it unsubscribes.
pub struct Subscription {
    queue: Vec<u8>,
    events: broadcast::Receiver<Wakeup>,
    generation: watch::Receiver<u64>,
    wakeups: Wakeups,
}

impl Subscription {
    /// Waits for the next wakeup. A lagged receiver, or a re-established watch, yields
    /// [`Wakeup::Resync`].
    pub async fn next(&mut self) -> Wakeup {
        tokio::select! {
            event = self.events.recv() => match event {
                Ok(wakeup) => wakeup,
                Err(_) => {
                    // Lagged: drop the backlog; one re-read covers it.
                    self.events = self.events.resubscribe();
                    Wakeup::Resync
                }
            },
            changed = self.generation.changed() => {
                if changed.is_err() {
                    // The watch task is gone (server shutting down); re-reading is still right.
                    std::future::pending::<()>().await;
                }
                Wakeup::Resync
            }
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut locks = self
            .wakeups
            .inner
            .locks
            .lock()
            .expect("wakeups lock poisoned");
        // Our receiver is still counted until this drop finishes, hence `<= 1`.
        if locks
            .get(&self.queue)
            .is_some_and(|tx| tx.receiver_count() <= 1)
        {
            locks.remove(&self.queue);
        }
    }
}

impl Wakeups {
    /// Subscribes to deletions in the queue at `queue_prefix`.
    pub fn subscribe(&self, queue_prefix: &str) -> Subscription {
        let queue = queue_prefix.as_bytes().to_vec();
        let events = {
            let mut locks = self.inner.locks.lock().expect("wakeups lock poisoned");
            locks
                .entry(queue.clone())
                .or_insert_with(|| broadcast::channel(CHANNEL_CAPACITY).0)
                .subscribe()
        };
        let mut generation = self.inner.generation.subscribe();
        generation.mark_unchanged();
        Subscription {
            queue,
            events,
            generation,
            wakeups: self.clone(),
        }
    }

    /// Delivers a deletion to the waiters of the lock it belongs to, if any are here.
    fn deliver(&self, key: &[u8]) {
        let Some(queue) = KeySchema::queue_of_waiter_key(key) else {
            return;
        };
        let locks = self.inner.locks.lock().expect("wakeups lock poisoned");
        if let Some(tx) = locks.get(queue) {
            let _ = tx.send(Wakeup::Deleted(key.to_vec()));
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

    #[tokio::test]
    async fn deletions_reach_only_their_lock() {
        let wakeups = Wakeups::default();
        let mut a = wakeups.subscribe("/p/locks/a/q/");
        let mut ab = wakeups.subscribe("/p/locks/a%2Fb/q/");
        wakeups.deliver(b"/p/locks/a/q/0000000000000001");
        assert_eq!(
            a.next().await,
            Wakeup::Deleted(b"/p/locks/a/q/0000000000000001".to_vec())
        );
        let nothing = tokio::time::timeout(Duration::from_millis(20), ab.next()).await;
        assert!(nothing.is_err(), "lock a/b must not see lock a's deletions");
    }

    #[tokio::test]
    async fn dropping_the_last_subscriber_forgets_the_lock() {
        let wakeups = Wakeups::default();
        let first = wakeups.subscribe("/p/locks/a/q/");
        let second = wakeups.subscribe("/p/locks/a/q/");
        drop(first);
        assert_eq!(wakeups.inner.locks.lock().unwrap().len(), 1);
        drop(second);
        assert!(wakeups.inner.locks.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_new_watch_generation_means_resync() {
        let wakeups = Wakeups::default();
        let mut sub = wakeups.subscribe("/p/locks/a/q/");
        wakeups.inner.generation.send_modify(|g| *g += 1);
        assert_eq!(sub.next().await, Wakeup::Resync);
    }

    #[tokio::test]
    async fn lagging_means_resync() {
        let wakeups = Wakeups::default();
        let mut sub = wakeups.subscribe("/p/locks/a/q/");
        for i in 0..(CHANNEL_CAPACITY + 5) {
            wakeups.deliver(format!("/p/locks/a/q/{i}").as_bytes());
        }
        assert_eq!(sub.next().await, Wakeup::Resync);
    }
}
