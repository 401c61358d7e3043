//! Group commit: txns about different locks (or leases) that arrive together go to etcd as one txn.
//!
//! etcd (3.3 and later) takes txns nested in a txn's success branch, each with its own compares
//! and branches, and applies the whole as one raft entry at one revision. Per request, etcd
//! spends far more CPU on the gRPC call, the proposal and its apply than on the few keys a lock
//! txn touches, so sending many as one cuts its CPU per lock operation several times over
//! (`docs/performance.md`, "Group commit").
//!
//! Each etcd endpoint has a [`Batcher`]: at most [`IN_FLIGHT`] batches are outstanding at a time,
//! and whatever arrives while they are becomes the next batch. A lone txn goes out at once and
//! unchanged, so sequential latency does not move; batches form only when txns would otherwise
//! queue inside etcd.
//!
//! **What may be batched.** etcd evaluates the compares of every nested txn against the state
//! before the batch, then applies the parts in order. So a batch equals its parts run one after
//! another only if no part compares a key that another part writes. Each txn names its
//! *group*, and the txns sent here keep to that rule by construction:
//! - lock txns (acquire of one name, release, a hold's confirming read, the
//!   clean-up of a confirmed enqueue; group: the lock) compare their lock's keys and their
//!   lease's `auth` key, and write only their lock's keys and the lease's lock-delay entry for
//!   that lock (which nothing compares); the one that writes an `auth` key creates a lease nobody
//!   else knows yet;
//! - a lease keep-alive's check (group: the lease's `auth` key) writes nothing.
//!
//! Txns that rewrite an existing lease's `auth` key (a revoke's first step, the clean-up of an
//! enqueue whose outcome is unknown) or span several locks go to etcd alone (`Store::txn`).
//!
//! What keeps every per-operation guarantee (`docs/design.md`, "Group commit"):
//! - Each nested txn keeps its own compares and branches: a batch that lands late, or not at
//!   all, is as harmless as its parts would be, since each part is (the "Late writes" rules).
//! - Two txns of one group never share a batch: two waiter keys of one lock would share a
//!   revision, hence a token. A txn whose group is already in the batch is sent on its own, as it
//!   was before group commit.
//! - Each txn's answer is its own branch's answer, under the batch's header (revision): nested
//!   answers carry no header of their own.
//! - A batch etcd refuses whole and unapplied (a duplicate key, too many operations, too large,
//!   a lease not found) is resent txn by txn, so that one txn cannot fail the others.
//! - A batch that gets no answer leaves each of its txns unanswered, as each would be alone.
//! - A txn whose caller gave up before its batch left is not sent.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::proto::PbTxnOpResponse;
use etcd_client::{Txn, TxnOp, TxnResponse};
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::metrics;
use crate::store::StoreError;
use crate::txn_channel::TxnRoute;

/// Batches outstanding per endpoint at a time. Two keeps etcd busy while the next batch forms:
/// one alone leaves it idle between an answer and the next request (measured: 2 sustains about
/// 5 % more than 1 at 16 tasks, 4 less than 2).
pub const IN_FLIGHT: usize = 2;

/// Most txns in one batch. etcd refuses a txn with more than `--max-txn-ops` (default 128)
/// operations in a list, counting a nested txn's lists against what its parents use: 64 leaves
/// 64 for each lock txn, several times what one holds.
pub const MAX_BATCH: usize = 64;

/// Group commit towards one etcd endpoint. Clones share the queue.
#[derive(Clone)]
pub struct Batcher {
    jobs: mpsc::UnboundedSender<Job>,
}

struct Job {
    /// The lock or lease the txn is about: two jobs of one group never share a batch.
    group: String,
    txn: Txn,
    reply: oneshot::Sender<Result<TxnResponse, StoreError>>,
}

impl Batcher {
    /// Starts the batcher's task, which ends when the last clone is dropped. Each etcd request
    /// is bounded by `timeout`, as a lone call is.
    pub fn start(route: TxnRoute, timeout: Duration) -> Self {
        let (jobs, queue) = mpsc::unbounded_channel();
        tokio::spawn(dispatch(route, queue, timeout));
        Self { jobs }
    }

    /// Runs `txn`, which is about `group` alone (see the module doc), possibly inside a batch.
    pub async fn txn(&self, group: String, txn: Txn) -> Result<TxnResponse, StoreError> {
        let (reply, answer) = oneshot::channel();
        let job = Job { group, txn, reply };
        if self.jobs.send(job).is_err() {
            return Err(StoreError::Unavailable(
                "the server is shutting down".into(),
            ));
        }
        answer
            .await
            .unwrap_or_else(|_| Err(StoreError::Unavailable("batch dropped".into())))
    }
}

/// Forms batches: waits for a free slot, then takes every job queued (up to [`MAX_BATCH`]).
async fn dispatch(route: TxnRoute, mut queue: mpsc::UnboundedReceiver<Job>, timeout: Duration) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    loop {
        let slot = Arc::clone(&slots)
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let Some(first) = queue.recv().await else {
            return;
        };
        if first.reply.is_closed() {
            // Its caller timed out or went away and answered for it already: never sent.
            continue;
        }
        let (batch, alone) = take_batch(first, &mut queue);
        for job in alone {
            tokio::spawn(send_alone(route.clone(), job, timeout));
        }
        let route = route.clone();
        tokio::spawn(async move {
            send(route, batch, timeout).await;
            drop(slot);
        });
    }
}

/// The batch that starts with `first`: the jobs queued behind it, up to [`MAX_BATCH`], one per
/// group. Jobs of a group already in the batch are returned apart, to be sent alone at once.
/// Jobs whose callers gave up are dropped.
fn take_batch(first: Job, queue: &mut mpsc::UnboundedReceiver<Job>) -> (Vec<Job>, Vec<Job>) {
    let mut groups = HashSet::from([first.group.clone()]);
    let mut batch = vec![first];
    let mut alone = Vec::new();
    while batch.len() < MAX_BATCH {
        let Ok(job) = queue.try_recv() else { break };
        if job.reply.is_closed() {
            continue;
        }
        if groups.insert(job.group.clone()) {
            batch.push(job);
        } else {
            alone.push(job);
        }
    }
    (batch, alone)
}

/// Sends `batch` as one etcd request and answers each job.
async fn send(route: TxnRoute, batch: Vec<Job>, timeout: Duration) {
    let (txns, replies): (Vec<Txn>, Vec<_>) =
        batch.into_iter().map(|job| (job.txn, job.reply)).unzip();
    for (reply, answer) in replies.into_iter().zip(commit(&route, txns, timeout).await) {
        let _ = reply.send(answer);
    }
}

/// Sends one job's txn as a request of its own.
async fn send_alone(route: TxnRoute, job: Job, timeout: Duration) {
    let _ = job.reply.send(commit_alone(route, job.txn, timeout).await);
}

/// Runs `txns`, each of a different group, as one etcd request (a lone txn as itself), and
/// gives each its own answer: its branch's answer under the request's header. What etcd refuses
/// whole for one txn's sake is run txn by txn.
pub async fn commit(
    route: &TxnRoute,
    mut txns: Vec<Txn>,
    timeout: Duration,
) -> Vec<Result<TxnResponse, StoreError>> {
    if txns.len() == 1 {
        let txn = txns.pop().expect("one txn");
        return vec![commit_alone(route.clone(), txn, timeout).await];
    }
    metrics::etcd_batch(txns.len());
    let nested: Vec<TxnOp> = txns.iter().map(|txn| TxnOp::txn(txn.clone())).collect();
    match call(route.clone(), Txn::new().and_then(nested), timeout).await {
        Ok(answer) => {
            let header = answer.0.header;
            let mut answers: Vec<_> = answer
                .0
                .responses
                .into_iter()
                .map(|op| match op.response {
                    Some(PbTxnOpResponse::ResponseTxn(mut own)) => {
                        own.header.clone_from(&header);
                        Ok(TxnResponse(own))
                    }
                    // etcd answers a nested txn with its txn's answer; anything else is a bug
                    // there, and nothing may be concluded from it.
                    _ => Err(unexpected_shape()),
                })
                .collect();
            answers.resize_with(txns.len(), || Err(unexpected_shape()));
            answers
        }
        Err(failed) if failed.refused_whole => {
            let alone = txns
                .into_iter()
                .map(|txn| commit_alone(route.clone(), txn, timeout));
            futures::future::join_all(alone).await
        }
        Err(failed) => txns.iter().map(|_| Err(failed.error.clone())).collect(),
    }
}

fn unexpected_shape() -> StoreError {
    StoreError::Unavailable("etcd answered a batch in an unexpected shape".into())
}

async fn commit_alone(
    route: TxnRoute,
    txn: Txn,
    timeout: Duration,
) -> Result<TxnResponse, StoreError> {
    call(route, txn, timeout)
        .await
        .map_err(|failed| failed.error)
}

/// A txn that got no answer to use.
struct Failed {
    error: StoreError,
    /// etcd refused it whole, before applying any of it, for something one of its parts holds.
    refused_whole: bool,
}

async fn call(route: TxnRoute, txn: Txn, timeout: Duration) -> Result<TxnResponse, Failed> {
    match tokio::time::timeout(timeout, route.txn(txn)).await {
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(err)) => Err(Failed {
            refused_whole: refused_whole(&err),
            error: err.into(),
        }),
        Err(_) => Err(Failed {
            error: StoreError::Unavailable(format!(
                "no answer within {}",
                humantime::format_duration(timeout)
            )),
            refused_whole: false,
        }),
    }
}

/// etcd's refusals of a whole txn for what one of its parts holds, checked before anything is
/// applied: `InvalidArgument` (duplicate key, too many operations, request too large) and a put
/// on a lease that does not exist (checked in the apply step, which then applies nothing).
fn refused_whole(err: &etcd_client::Error) -> bool {
    match err {
        etcd_client::Error::GRpcStatus(status) => {
            status.code() == tonic::Code::InvalidArgument
                || status.message().contains("lease not found")
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(group: &str) -> (Job, oneshot::Receiver<Result<TxnResponse, StoreError>>) {
        let (reply, answer) = oneshot::channel();
        let job = Job {
            group: group.to_owned(),
            txn: Txn::new(),
            reply,
        };
        (job, answer)
    }

    #[test]
    fn a_batch_takes_one_txn_per_lock_and_skips_the_abandoned() {
        let (sender, mut queue) = mpsc::unbounded_channel();
        let (first, _a) = job("a");
        let mut waiting = Vec::new();
        for group in ["b", "a", "gone", "c", "b"] {
            let (job, answer) = job(group);
            sender.send(job).unwrap();
            waiting.push(answer);
        }
        drop(waiting.remove(2)); // the caller of "gone" gave up
        let (batch, alone) = take_batch(first, &mut queue);
        let groups = |jobs: &[Job]| jobs.iter().map(|j| j.group.clone()).collect::<Vec<_>>();
        assert_eq!(groups(&batch), ["a", "b", "c"]);
        assert_eq!(groups(&alone), ["a", "b"]);
    }

    #[test]
    fn a_batch_stops_at_its_size_limit() {
        let (sender, mut queue) = mpsc::unbounded_channel();
        let (first, _first) = job("0");
        let mut answers = Vec::new();
        for i in 1..MAX_BATCH + 10 {
            let (job, answer) = job(&i.to_string());
            sender.send(job).unwrap();
            answers.push(answer);
        }
        let (batch, alone) = take_batch(first, &mut queue);
        assert_eq!((batch.len(), alone.len()), (MAX_BATCH, 0));
        assert_eq!(queue.len(), 10, "the rest wait for the next batch");
    }
}
