//! Every Prometheus metric the server exports, named once, and the `/metrics` renderer.
//!
//! Names and labels here are a contract with `compose/` (alert rules, the Grafana dashboard):
//! change them together.

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Latency buckets in seconds: from sub-millisecond handoffs to multi-minute waits.
const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 300.0,
];

/// The process-wide recorder's handle, installed on first use. One per process: servers started
/// in the same process (tests) share it.
pub fn handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets(BUCKETS)
            .expect("static buckets are valid")
            .build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("a metrics recorder was already installed; /metrics may be empty");
        }
        describe();
        gauge!("leasehold_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
        handle
    })
}

/// HELP texts (and units) of every metric.
fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "leasehold_acquires_total",
        "Acquire requests by result: granted, timed_out (not granted within the wait) or error."
    );
    describe_counter!(
        "leasehold_releases_total",
        "Release requests by result: released, not_holder or error."
    );
    describe_counter!(
        "leasehold_renewals_total",
        "Renew requests by result: renewed, not_holder or error."
    );
    describe_counter!(
        "leasehold_lease_grants_total",
        "Leases granted (directly, or for an acquire with a ttl)."
    );
    describe_counter!(
        "leasehold_lease_revocations_total",
        "Leases revoked through the API."
    );
    describe_counter!(
        "leasehold_holds_lost_total",
        "Renewals that found their hold already gone (expired or taken over)."
    );
    describe_counter!(
        "leasehold_stale_token_rejections_total",
        "Renewals and releases refused because the token does not hold the lock."
    );
    describe_histogram!(
        "leasehold_acquire_duration_seconds",
        Unit::Seconds,
        "Whole acquire requests, waiting included."
    );
    describe_histogram!(
        "leasehold_acquire_wait_seconds",
        Unit::Seconds,
        "Time granted acquires spent queued behind other holders."
    );
    describe_histogram!(
        "leasehold_etcd_request_duration_seconds",
        Unit::Seconds,
        "etcd calls by operation."
    );
    describe_counter!(
        "leasehold_etcd_batches_total",
        "etcd requests that carried several lock txns at once (group commit)."
    );
    describe_counter!(
        "leasehold_etcd_batched_txns_total",
        "Lock txns sent inside those requests: divided by the batches, the mean batch size."
    );
    describe_histogram!(
        "leasehold_http_request_duration_seconds",
        Unit::Seconds,
        "HTTP requests by method and route template."
    );
    describe_counter!(
        "leasehold_http_requests_total",
        "HTTP requests by method, route template and status."
    );
    describe_gauge!(
        "leasehold_waits_in_flight",
        "Acquires currently waiting in a lock's queue on this server."
    );
    describe_gauge!(
        "leasehold_sessions_open",
        "Sessions open through this server, counted against --max-sessions (tracked only with it)."
    );
    describe_counter!(
        "leasehold_session_waits_total",
        "New sessions that found the waiting room (--max-sessions) full and waited for a place."
    );
    describe_gauge!(
        "leasehold_etcd_up",
        "1 if the last etcd call got an answer, else 0."
    );
    describe_counter!(
        "leasehold_requests_shed_total",
        "Requests answered 503 overloaded by admission control, before anything reached etcd."
    );
    describe_counter!(
        "leasehold_etcd_overloaded_total",
        "etcd calls etcd refused with \"too many requests\" (admission control keeps this at 0)."
    );
    describe_gauge!(
        "leasehold_admission_limit",
        "Adaptive bound on etcd calls in flight from this server."
    );
    describe_gauge!(
        "leasehold_admission_queue",
        "etcd calls waiting for a slot under the admission limit."
    );
    describe_counter!(
        "leasehold_watch_restarts_total",
        "Times the shared lock watch broke and was re-created (every waiter then re-reads)."
    );
    describe_counter!(
        "leasehold_lock_delays_installed_total",
        "Holds granted with a lock-delay (a tombstone and its shadow lease written)."
    );
    describe_counter!(
        "leasehold_lock_delay_refresh_failures_total",
        "Shadow-lease refreshes etcd did not confirm (that lock-delay may end early)."
    );
    describe_counter!(
        "leasehold_lock_delay_held_off_total",
        "Decisive reads that found a waiter held off by a lock-delay (an orphan tombstone)."
    );
    describe_gauge!(
        "leasehold_build_info",
        "Always 1; the version label says which build runs."
    );
}

/// The Prometheus text exposition of every metric.
pub fn render() -> String {
    let handle = handle();
    handle.run_upkeep();
    handle.render()
}

/// How an acquire request ended.
#[derive(Debug, Clone, Copy)]
pub enum AcquireResult {
    /// The lock was granted.
    Granted,
    /// Not granted within the wait (including try-locks that found it held).
    TimedOut,
    /// Anything else (etcd unavailable, lease gone, shutdown).
    Error,
}

/// Records an acquire's outcome and total duration.
pub fn acquire_finished(result: AcquireResult, elapsed: Duration) {
    let result = match result {
        AcquireResult::Granted => "granted",
        AcquireResult::TimedOut => "timed_out",
        AcquireResult::Error => "error",
    };
    counter!("leasehold_acquires_total", "result" => result).increment(1);
    histogram!("leasehold_acquire_duration_seconds").record(elapsed.as_secs_f64());
}

/// Records how long a granted acquire stood in line.
pub fn waited_for_grant(waited: Duration) {
    histogram!("leasehold_acquire_wait_seconds").record(waited.as_secs_f64());
}

/// Counts a wait in flight while the returned guard lives.
pub fn wait_started() -> WaitInFlight {
    gauge!("leasehold_waits_in_flight").increment(1.0);
    WaitInFlight
}

/// Decrements `leasehold_waits_in_flight` when dropped.
pub struct WaitInFlight;

impl Drop for WaitInFlight {
    fn drop(&mut self) {
        gauge!("leasehold_waits_in_flight").decrement(1.0);
    }
}

/// Records a release's outcome (`released`, `not_holder`, `error`).
pub fn release_finished(result: &'static str) {
    counter!("leasehold_releases_total", "result" => result).increment(1);
    if result == "not_holder" {
        counter!("leasehold_stale_token_rejections_total").increment(1);
    }
}

/// Records a renewal's outcome (`renewed`, `not_holder`, `error`). A renewal that finds its hold
/// gone is a lost hold observed.
pub fn renewal_finished(result: &'static str) {
    counter!("leasehold_renewals_total", "result" => result).increment(1);
    if result == "not_holder" {
        counter!("leasehold_stale_token_rejections_total").increment(1);
        counter!("leasehold_holds_lost_total").increment(1);
    }
}

/// Counts a lease granted.
pub fn lease_granted() {
    counter!("leasehold_lease_grants_total").increment(1);
}

/// Counts a lease revoked.
pub fn lease_revoked() {
    counter!("leasehold_lease_revocations_total").increment(1);
}

/// Records one etcd call: its latency by operation, and whether etcd answered.
pub fn etcd_call(op: &'static str, elapsed: Duration, answered: bool) {
    histogram!("leasehold_etcd_request_duration_seconds", "op" => op).record(elapsed.as_secs_f64());
    gauge!("leasehold_etcd_up").set(if answered { 1.0 } else { 0.0 });
}

/// Records a group-commit batch of `txns` lock txns sent as one etcd request.
pub fn etcd_batch(txns: usize) {
    counter!("leasehold_etcd_batches_total").increment(1);
    counter!("leasehold_etcd_batched_txns_total").increment(txns as u64);
}

/// Records a request shed by admission control.
pub fn shed() {
    counter!("leasehold_requests_shed_total").increment(1);
}

/// Records an etcd call refused by etcd with "too many requests".
pub fn etcd_overloaded() {
    counter!("leasehold_etcd_overloaded_total").increment(1);
}

/// Records how many sessions are open through this server (`--max-sessions`).
pub fn sessions_open(open: usize) {
    gauge!("leasehold_sessions_open").set(open as f64);
}

/// Counts a new session that found the waiting room full and waited in line.
pub fn session_waited() {
    counter!("leasehold_session_waits_total").increment(1);
}

/// Records the admission limit and queue length.
pub fn admission(limit: f64, queued: usize) {
    gauge!("leasehold_admission_limit").set(limit.floor());
    gauge!("leasehold_admission_queue").set(queued as f64);
}

/// Records that the shared lock watch broke and is being re-created.
pub fn watch_restarted() {
    counter!("leasehold_watch_restarts_total").increment(1);
}

/// Counts a hold granted with a lock-delay.
pub fn lock_delay_installed() {
    counter!("leasehold_lock_delays_installed_total").increment(1);
}

/// Counts a shadow-lease refresh etcd did not confirm.
pub fn lock_delay_refresh_failed() {
    counter!("leasehold_lock_delay_refresh_failures_total").increment(1);
}

/// Counts a decisive read that found a waiter held off by a lock-delay.
pub fn lock_delay_held_off() {
    counter!("leasehold_lock_delay_held_off_total").increment(1);
}

/// Records one HTTP request by method, route template and status.
pub fn http_request(method: &str, route: &str, status: u16, elapsed: Duration) {
    let (method, route) = (method.to_owned(), route.to_owned());
    counter!("leasehold_http_requests_total", "method" => method.clone(), "route" => route.clone(), "status" => status.to_string())
        .increment(1);
    histogram!("leasehold_http_request_duration_seconds", "method" => method, "route" => route)
        .record(elapsed.as_secs_f64());
}
