//! The summary a run prints: what was sold, how fast, what chaos did, and the audit.

use std::fmt;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::Options;
use crate::buyers::{BuyerOutcome, Leave, Shop};
use crate::ledger::Audit;

/// The outcome of a run.
#[derive(Debug, Clone)]
pub struct Report {
    /// Seats in the venue.
    pub seats: u32,
    /// Buyers in the crowd.
    pub buyers: u32,
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
    /// Buyers who went home because the servers shed them (or could not be reached) for longer
    /// than their patience, counted whether or not they had bought a seat before.
    pub buyers_gave_up: u64,
    /// Buyers turned away (no seat bought) because of overload: shed past their patience.
    pub turned_away_shed: u32,
    /// Buyers turned away because the seats ran out (for a group: no block of adjacent seats
    /// of its size in one row was left).
    pub turned_away_sold_out: u32,
    /// Seats still unsold at the end of a run in which a buyer was turned away because of
    /// overload: seats those buyers should have had. Must be 0.
    pub unsold_while_turned_away: u64,
    /// Goodput: seats sold per second, from the doors' opening to the last sale.
    pub seats_per_second: f64,
    /// Goodput: locks granted per second over the same time (grants up to the last sale).
    pub grants_per_second: f64,
    /// From the doors' opening to the last sale.
    pub selling_time: Duration,
    /// How long the buyers took to connect before the doors opened; `None` on a cold start
    /// (they connected as the doors opened, within the selling time).
    pub connect_time: Option<Duration>,
    /// Requests another replica answered after one failed, summed over every buyer's client.
    pub failovers: u64,
    /// Buyers who came as a group of friends.
    pub groups: u32,
    /// Whether buyers were shown their place in line.
    pub show_queue: bool,
    /// Buyers shown their place in a seat's line.
    pub buyers_shown_place: u64,
    /// Buyers who saw their place in line count down.
    pub buyers_saw_countdown: u64,
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
        let turned_away = |why: Leave| {
            outcomes
                .iter()
                .filter(|o| o.seats_bought == 0 && o.left == why)
                .count() as u32
        };
        let (shed, sold_out) = (turned_away(Leave::Shed), turned_away(Leave::SoldOut));
        let unsold = u64::from(options.seats).saturating_sub(audit.seats_sold);
        let opened_at = shop.opened_at.get().copied();
        let last_sale = *shop.last_sale.lock().expect("last sale mutex poisoned");
        let (selling_time, grants_by_last_sale) = match (opened_at, last_sale) {
            (Some(opened), Some((at, grants))) => (at.saturating_duration_since(opened), grants),
            _ => (Duration::ZERO, 0),
        };
        let per_second = |n: u64| {
            if selling_time.is_zero() {
                0.0
            } else {
                n as f64 / selling_time.as_secs_f64()
            }
        };
        Self {
            seats: options.seats,
            buyers: options.buyers,
            buyers_served: served,
            buyers_turned_away: outcomes.len() as u32 - served,
            acquisitions: shop.acquisitions.load(Ordering::Relaxed),
            refusals: shop.refusals.load(Ordering::Relaxed),
            acquire_errors: shop.errors.load(Ordering::Relaxed),
            buyers_gave_up: shop.gave_up.load(Ordering::Relaxed),
            turned_away_shed: shed,
            turned_away_sold_out: sold_out,
            unsold_while_turned_away: if shed > 0 { unsold } else { 0 },
            seats_per_second: per_second(shop.sold()),
            grants_per_second: per_second(grants_by_last_sale),
            selling_time,
            connect_time: (!options.cold_start)
                .then(|| shop.connect_time.get().copied().unwrap_or_default()),
            failovers: shop.failovers.load(Ordering::Relaxed),
            groups: outcomes.iter().filter(|o| o.group.is_some()).count() as u32,
            show_queue: options.show_queue,
            buyers_shown_place: shop.shown_place.load(Ordering::Relaxed),
            buyers_saw_countdown: shop.counted_down.load(Ordering::Relaxed),
            acquire_p50: pick(0.50),
            acquire_p99: pick(0.99),
            elapsed,
            chaos_events,
            audit,
        }
    }

    /// True when the audit found no seat sold twice, every owner matches its sale, and every
    /// group of friends sat together.
    pub fn is_clean(&self) -> bool {
        self.audit.double_sold == 0
            && self.audit.owner_mismatches == 0
            && self.audit.groups_split == 0
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
            (
                "  of them: overload (shed)",
                self.turned_away_shed.to_string(),
            ),
            (
                "  of them: seats ran out",
                self.turned_away_sold_out.to_string(),
            ),
            (
                "groups of friends seated",
                format!("{} of {}", self.audit.groups_seated, self.groups),
            ),
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
                "fail-overs (requests answered by another replica)",
                self.failovers.to_string(),
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
            (
                "goodput: seats sold / s",
                format!(
                    "{:.0} (in {:.1} s to the last sale)",
                    self.seats_per_second,
                    self.selling_time.as_secs_f64()
                ),
            ),
            (
                "goodput: lock grants / s",
                format!("{:.0}", self.grants_per_second),
            ),
            (
                "buyers connected before the doors opened",
                connected(self.connect_time),
            ),
            ("run time", format!("{:.1} s", self.elapsed.as_secs_f64())),
            ("owner mismatches", self.audit.owner_mismatches.to_string()),
            ("double-sold seats", self.audit.double_sold.to_string()),
            (
                "groups split or partly sold",
                self.audit.groups_split.to_string(),
            ),
            (
                "seats unsold while buyers were turned away",
                self.unsold_while_turned_away.to_string(),
            ),
        ];
        let queue = [
            (
                "buyers shown their place in line",
                self.buyers_shown_place.to_string(),
            ),
            (
                "buyers who saw their place count down",
                self.buyers_saw_countdown.to_string(),
            ),
        ];
        let shown = if self.show_queue { &queue[..] } else { &[] };
        writeln!(f, "\n  Concert summary (audited from the ledger)")?;
        writeln!(f, "  {:-<62}", "")?;
        for (label, value) in rows.iter().chain(shown) {
            writeln!(f, "  {label:<50} {value:>11}")?;
        }
        if !self.chaos_events.is_empty() {
            writeln!(f, "\n  Chaos")?;
            for event in &self.chaos_events {
                writeln!(f, "  - {event}")?;
            }
        }
        let verdict = if self.is_clean() {
            "every sold seat has exactly one owner"
        } else if self.audit.groups_split > 0 {
            "AUDIT FAILED: a group of friends was split"
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

/// Whether (and in how long) the buyers connected before the doors opened.
fn connected(connect_time: Option<Duration>) -> String {
    match connect_time {
        Some(time) => format!("yes, in {:.1} s", time.as_secs_f64()),
        None => "no (cold start)".into(),
    }
}

/// The same sale run twice with the same seed, at 1x and at 5x the buyers (`--compare`).
#[derive(Debug, Clone)]
pub struct Comparison {
    /// The run with the buyers asked for.
    pub single: Report,
    /// The run with five times as many.
    pub fivefold: Report,
}

impl Comparison {
    /// Goodput (seats sold per second) at 5x over goodput at 1x.
    pub fn goodput_ratio(&self) -> f64 {
        if self.single.seats_per_second == 0.0 {
            0.0
        } else {
            self.fivefold.seats_per_second / self.single.seats_per_second
        }
    }

    /// True when both runs' audits are clean.
    pub fn is_clean(&self) -> bool {
        self.single.is_clean() && self.fivefold.is_clean()
    }
}

impl fmt::Display for Comparison {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1000.0);
        let (a, b) = (&self.single, &self.fivefold);
        let row = |label: &str, of: &dyn Fn(&Report) -> String| {
            format!("  {label:<44} {:>14} {:>14}", of(a), of(b))
        };
        let rows = [
            row("buyers", &|r| r.buyers.to_string()),
            row("seats sold", &|r| {
                format!("{} of {}", r.audit.seats_sold, r.seats)
            }),
            row("goodput: seats sold / s", &|r| {
                format!("{:.0}", r.seats_per_second)
            }),
            row("goodput: lock grants / s", &|r| {
                format!("{:.0}", r.grants_per_second)
            }),
            row("time to the last sale", &|r| {
                format!("{:.1} s", r.selling_time.as_secs_f64())
            }),
            row("buyers served", &|r| r.buyers_served.to_string()),
            row("turned away: overload (shed)", &|r| {
                r.turned_away_shed.to_string()
            }),
            row("turned away: seats ran out", &|r| {
                r.turned_away_sold_out.to_string()
            }),
            row("acquire latency p50", &|r| ms(r.acquire_p50)),
            row("acquire latency p99", &|r| ms(r.acquire_p99)),
            row("connected before the doors opened", &|r| {
                connected(r.connect_time)
            }),
            row("run time", &|r| format!("{:.1} s", r.elapsed.as_secs_f64())),
            row("seats unsold while buyers were turned away", &|r| {
                r.unsold_while_turned_away.to_string()
            }),
            row("double-sold seats", &|r| r.audit.double_sold.to_string()),
        ];
        writeln!(
            f,
            "\n  Flash sale: 1x vs 5x buyers, same seed (audited from the ledger)"
        )?;
        writeln!(f, "  {:<44} {:>14} {:>14}", "", "1x", "5x")?;
        writeln!(f, "  {:-<74}", "")?;
        for row in rows {
            writeln!(f, "{row}")?;
        }
        writeln!(
            f,
            "\n  goodput at 5x: {:.2}x that at 1x; double-sold seats: {} and {}",
            self.goodput_ratio(),
            a.audit.double_sold,
            b.audit.double_sold
        )
    }
}
