//! The summary a run prints: what was sold, how fast, what chaos did, and the audit.

use std::fmt;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::Options;
use crate::buyers::{BuyerOutcome, Shop};
use crate::ledger::Audit;

/// The outcome of a run.
#[derive(Debug, Clone)]
pub struct Report {
    /// Seats in the venue.
    pub seats: u32,
    /// Buyers who bought at least one seat.
    pub buyers_served: u32,
    /// Buyers who went home with nothing (sold out, or every try taken).
    pub buyers_turned_away: u32,
    /// Locks granted.
    pub acquisitions: u64,
    /// Acquires that found the seat's lock held for the whole wait.
    pub refusals: u64,
    /// Acquires that failed and were retried (a killed replica, an etcd hiccup).
    pub acquire_errors: u64,
    /// Buyers who went home because the replicas could not serve them even after waiting (no
    /// session lease could be granted); counted among the turned away too.
    pub buyers_gave_up: u64,
    /// Acquire latency of granted acquires (refusals are bounded by the buyer's wait), median.
    pub acquire_p50: Duration,
    /// Latency of granted acquires, 99th percentile.
    pub acquire_p99: Duration,
    /// Wall time of the run.
    pub elapsed: Duration,
    /// What chaos did, one line per event.
    pub chaos_events: Vec<String>,
    /// The independent audit of the ledger.
    pub audit: Audit,
}

impl Report {
    pub(crate) fn new(
        options: &Options,
        shop: &Shop,
        outcomes: &[BuyerOutcome],
        audit: Audit,
        chaos_events: Vec<String>,
        elapsed: Duration,
    ) -> Self {
        let mut latencies = shop
            .latencies
            .lock()
            .expect("latencies mutex poisoned")
            .clone();
        latencies.sort();
        let pick = |q: f64| {
            latencies
                .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
                .copied()
                .unwrap_or_default()
        };
        let served = outcomes.iter().filter(|o| o.seats_bought > 0).count() as u32;
        Self {
            seats: options.seats,
            buyers_served: served,
            buyers_turned_away: outcomes.len() as u32 - served,
            acquisitions: shop.acquisitions.load(Ordering::Relaxed),
            refusals: shop.refusals.load(Ordering::Relaxed),
            acquire_errors: shop.errors.load(Ordering::Relaxed),
            buyers_gave_up: shop.gave_up.load(Ordering::Relaxed),
            acquire_p50: pick(0.50),
            acquire_p99: pick(0.99),
            elapsed,
            chaos_events,
            audit,
        }
    }

    /// True when the audit found no seat sold twice and every owner matches its sale.
    pub fn is_clean(&self) -> bool {
        self.audit.double_sold == 0 && self.audit.owner_mismatches == 0
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1000.0);
        let rows = [
            (
                "seats sold",
                format!("{} of {}", self.audit.seats_sold, self.seats),
            ),
            ("buyers served", self.buyers_served.to_string()),
            ("buyers turned away", self.buyers_turned_away.to_string()),
            ("lock acquisitions", self.acquisitions.to_string()),
            ("acquires refused (seat locked)", self.refusals.to_string()),
            (
                "acquires retried after errors",
                self.acquire_errors.to_string(),
            ),
            (
                "buyers who gave up (unserved)",
                self.buyers_gave_up.to_string(),
            ),
            (
                "stale writes rejected",
                self.audit.stale_writes_rejected.to_string(),
            ),
            (
                "acquire latency p50 / p99",
                format!("{} / {}", ms(self.acquire_p50), ms(self.acquire_p99)),
            ),
            (
                "sales per second",
                format!(
                    "{:.0}",
                    self.audit.seats_sold as f64 / self.elapsed.as_secs_f64()
                ),
            ),
            ("run time", format!("{:.1} s", self.elapsed.as_secs_f64())),
            ("owner mismatches", self.audit.owner_mismatches.to_string()),
            ("double-sold seats", self.audit.double_sold.to_string()),
        ];
        writeln!(f, "\n  Concert summary (audited from the ledger)")?;
        writeln!(f, "  {:-<46}", "")?;
        for (label, value) in rows {
            writeln!(f, "  {label:<32} {value:>13}")?;
        }
        if !self.chaos_events.is_empty() {
            writeln!(f, "\n  Chaos")?;
            for event in &self.chaos_events {
                writeln!(f, "  - {event}")?;
            }
        }
        let verdict = if self.is_clean() {
            "every sold seat has exactly one owner"
        } else {
            "AUDIT FAILED: a seat was sold twice"
        };
        writeln!(
            f,
            "\n  double-sold seats: {} ({verdict})",
            self.audit.double_sold
        )
    }
}
