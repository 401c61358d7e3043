//! Watching locks: a stream of status snapshots, one for every etcd revision that changed a
//! lock, resumable from a revision (the SSE `Last-Event-ID`).
//!
//! Each stream runs one etcd watch on the lock's keys (or on every lock, for the status page).
//! For each revision the watch reports, the stream reads the lock's status *as of that revision*
//! (etcd keeps its history until it compacts it), so a client that reconnects with the last
//! revision it saw is sent every change after it, none missed and none twice. If that revision
//! was compacted away, the client gets the current status marked as a reset. Nothing here
//! decides anything: these are observations, like the `GET` they replace.
//!
//! Bounded: at most [`MAX_STREAMS`] streams per server (more are answered `503 overloaded`), and
//! each buffers at most [`STREAM_BUFFER`] events for a slow client, which is then disconnected
//! (it resumes from its last revision).

use std::collections::BTreeSet;
use std::time::Duration;

use etcd_client::{WatchOptions, WatchResponse};
use tokio::sync::{OwnedSemaphorePermit, mpsc};

use crate::keys::LockName;
use crate::lock::LockStatus;
use crate::service::{Service, ServiceError, authorize_name};
use crate::tenants::Tenant;

/// Streams one server serves at once.
pub const MAX_STREAMS: usize = 256;

/// Events buffered per stream before a slow client is disconnected.
pub const STREAM_BUFFER: usize = 64;

/// One change: a lock's status as of `revision`.
#[derive(Debug, Clone)]
pub struct LockEvent {
    /// The etcd revision the status is read at (the SSE event id).
    pub revision: i64,
    /// The status at that revision.
    pub status: LockStatus,
    /// True when the stream could not resume where asked (compacted history) and starts over
    /// from the current status.
    pub reset: bool,
}

/// Which locks a stream follows.
#[derive(Debug, Clone)]
enum Scope {
    One(LockName),
    /// Every lock the tenant may use (the status page).
    All(std::sync::Arc<Tenant>),
}

impl Service {
    /// Streams the status of `name` at every change after revision `after` (or, without it,
    /// its status now and every change from now).
    pub async fn watch_lock(
        &self,
        tenant: &Tenant,
        name: &LockName,
        after: Option<i64>,
    ) -> Result<mpsc::Receiver<LockEvent>, ServiceError> {
        authorize_name(tenant, name)?;
        self.start_stream(Scope::One(name.clone()), after).await
    }

    /// Streams the status of every lock of `tenant` that changes after `after` (or from now).
    pub async fn watch_all(
        &self,
        tenant: std::sync::Arc<Tenant>,
        after: Option<i64>,
    ) -> Result<mpsc::Receiver<LockEvent>, ServiceError> {
        self.start_stream(Scope::All(tenant), after).await
    }

    async fn start_stream(
        &self,
        scope: Scope,
        after: Option<i64>,
    ) -> Result<mpsc::Receiver<LockEvent>, ServiceError> {
        let permit = self.streams.clone().try_acquire_owned().map_err(|_| {
            ServiceError::Overloaded(format!(
                "this server already serves {MAX_STREAMS} watch streams"
            ))
        })?;
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let mut from = after.map(|revision| revision + 1);
        if from.is_none()
            && let Scope::One(name) = &scope
        {
            // The current status first, so a client sees where things stand at once.
            let (status, revision) = self.lock_status_at(name, None).await?;
            from = Some(revision + 1);
            let _ = tx.try_send(LockEvent {
                revision,
                status,
                reset: false,
            });
        }
        let service = self.clone();
        tokio::spawn(async move {
            service.follow(scope, from, tx, permit).await;
        });
        Ok(rx)
    }

    /// Feeds `tx` until the client goes away (or is too slow), re-creating the etcd watch from
    /// the last revision sent whenever it breaks.
    async fn follow(
        &self,
        scope: Scope,
        mut from: Option<i64>,
        tx: mpsc::Sender<LockEvent>,
        _permit: OwnedSemaphorePermit,
    ) {
        let prefix = match &scope {
            Scope::One(name) => self.keys.lock_prefix(name),
            Scope::All(_) => self.keys.locks_root(),
        };
        let mut pause = Duration::from_millis(100);
        while !tx.is_closed() {
            let mut options = WatchOptions::new().with_prefix();
            if let Some(revision) = from {
                options = options.with_start_revision(revision);
            }
            let (at, mut client) = self.store.pick_client();
            let watched = tokio::select! {
                watched = client.watch(prefix.as_bytes(), Some(options)) => watched,
                _ = tx.closed() => return,
                _ = self.shutdown.cancelled() => return,
            };
            let mut stream = match watched {
                Ok(stream) => stream,
                Err(err) => {
                    tracing::debug!(error = %err, "watch stream: etcd watch not created; retrying");
                    self.store.suspect(at);
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(2));
                    continue;
                }
            };
            loop {
                let message = tokio::select! {
                    message = stream.message() => message,
                    _ = tx.closed() => return,
                    _ = self.shutdown.cancelled() => return,
                };
                let response = match message {
                    Ok(Some(response)) => response,
                    Ok(None) | Err(_) => break,
                };
                if response.canceled() {
                    if response.compact_revision() > 0 {
                        // The history we were to resume from is gone: start over from now.
                        if !self.send_reset(&scope, &tx).await {
                            return;
                        }
                        from = None;
                    }
                    break;
                }
                pause = Duration::from_millis(100);
                match self.send_changes(&scope, &response, &tx).await {
                    Some(0) => {} // a progress notice, no event
                    Some(last) => from = Some(last + 1).max(from),
                    None => return, // the client is gone or too slow
                }
            }
            tokio::time::sleep(pause).await;
        }
    }

    /// Sends the status of every lock `response` changed, at each revision it changed; the last
    /// revision sent, or `None` if the client is gone or too slow.
    async fn send_changes(
        &self,
        scope: &Scope,
        response: &WatchResponse,
        tx: &mpsc::Sender<LockEvent>,
    ) -> Option<i64> {
        let mut changes = BTreeSet::new();
        // Resume after the last event seen, relevant or not (never after the header's revision:
        // events up to it may still be on their way).
        let mut last = 0;
        for event in response.events() {
            let Some(kv) = event.kv() else { continue };
            last = last.max(kv.mod_revision());
            let Some(name) = self.keys.name_of_key(kv.key()) else {
                continue;
            };
            if let Scope::All(tenant) = scope
                && !tenant.may_use(&name)
            {
                continue;
            }
            changes.insert((kv.mod_revision(), name.as_str().to_owned()));
        }
        for (revision, name) in changes {
            let name = LockName::new(name).expect("decoded from a key");
            let status = match self.lock_status_at(&name, Some(revision)).await {
                Ok((status, _)) => status,
                Err(err) => {
                    tracing::debug!(error = %err, "watch stream: status read failed");
                    return None;
                }
            };
            let event = LockEvent {
                revision,
                status,
                reset: false,
            };
            if tx.try_send(event).is_err() {
                return None;
            }
            last = last.max(revision);
        }
        Some(last)
    }

    /// After a compaction: the current status of the followed lock (nothing for the page, which
    /// re-reads everything on a reset of its own).
    async fn send_reset(&self, scope: &Scope, tx: &mpsc::Sender<LockEvent>) -> bool {
        let Scope::One(name) = scope else {
            return true;
        };
        match self.lock_status_at(name, None).await {
            Ok((status, revision)) => tx
                .try_send(LockEvent {
                    revision,
                    status,
                    reset: true,
                })
                .is_ok(),
            Err(_) => false,
        }
    }
}
