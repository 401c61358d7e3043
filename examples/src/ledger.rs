//! The fenced ledger: the ticketing system's storage, in SQLite.
//!
//! It knows nothing about locks. It enforces one rule, Kleppmann's fencing check: a sale of a
//! seat is accepted only if its fencing token is greater than every token the ledger has accepted
//! for that seat, in one statement (`UPDATE ... WHERE last_token < ?`). A buyer whose lock ran out
//! while it was paused carries an old token, so its late write is rejected.
//!
//! Every accepted sale is also appended to `sales`, and every rejected write to `rejected`, so
//! that the audit can count double sales independently of any counter the buyers keep.
//!
//! Seats are numbered from 0 in rows of [`ROW_SEATS`] (seat `s` is in row `s / ROW_SEATS`). A
//! group of friends buys adjacent seats of one row in one transaction ([`Ledger::sell_group`]),
//! fenced seat by seat, all or none; the `groups` table records each group's size so that the
//! audit can check every group sat together.

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, params};

/// Seats per row: seats `r * ROW_SEATS .. (r + 1) * ROW_SEATS` are row `r`, side by side.
pub const ROW_SEATS: u32 = 10;

/// True if `seats` (sorted or not) are side by side in one row, with no gap.
pub fn adjacent_in_a_row(seats: &[u32]) -> bool {
    let mut sorted = seats.to_vec();
    sorted.sort_unstable();
    !sorted.is_empty()
        && sorted.windows(2).all(|w| w[1] == w[0] + 1)
        && sorted[0] / ROW_SEATS == sorted[sorted.len() - 1] / ROW_SEATS
}

/// What the ledger did with a sale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaleOutcome {
    /// Recorded: the token was newer than any seen for the seat.
    Accepted,
    /// Refused: a sale with an equal or newer token was already accepted for this seat.
    StaleToken,
}

/// The result of an independent audit of the ledger.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Audit {
    /// Seats with at least one accepted sale.
    pub seats_sold: u64,
    /// Seats with more than one accepted sale: sold twice. Must be 0.
    pub double_sold: u64,
    /// Seats whose current owner is not the buyer of their one recorded sale. Must be 0.
    pub owner_mismatches: u64,
    /// Writes the ledger refused because their token was stale (a refused group sale counts
    /// one per seat).
    pub stale_writes_rejected: u64,
    /// Groups of friends who bought their seats.
    pub groups_seated: u64,
    /// Groups whose sold seats are not exactly their size, side by side in one row: split or
    /// partly sold. Must be 0.
    pub groups_split: u64,
}

/// A handle on the ledger database (one connection; open one per thread).
pub struct Ledger {
    db: Connection,
}

impl Ledger {
    /// Opens (creating if needed) the ledger at `path`.
    pub fn open(path: &Path) -> rusqlite::Result<Self> {
        let db = Connection::open(path)?;
        // WAL lets buyers on other connections read while one writes; the busy timeout makes
        // concurrent writers queue instead of failing.
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.pragma_update(None, "synchronous", "NORMAL")?;
        db.busy_timeout(std::time::Duration::from_secs(30))?;
        db.execute_batch(
            "CREATE TABLE IF NOT EXISTS seats (
                 seat       INTEGER PRIMARY KEY,
                 last_token INTEGER NOT NULL DEFAULT 0,
                 owner      TEXT
             );
             CREATE TABLE IF NOT EXISTS sales (
                 id    INTEGER PRIMARY KEY,
                 seat  INTEGER NOT NULL,
                 buyer TEXT NOT NULL,
                 token INTEGER NOT NULL
             );
             CREATE TABLE IF NOT EXISTS rejected (
                 id    INTEGER PRIMARY KEY,
                 seat  INTEGER NOT NULL,
                 buyer TEXT NOT NULL,
                 token INTEGER NOT NULL
             );
             CREATE TABLE IF NOT EXISTS groups (
                 buyer TEXT PRIMARY KEY,
                 size  INTEGER NOT NULL
             );",
        )?;
        Ok(Self { db })
    }

    /// Creates a fresh venue of `seats` unsold seats (numbered from 0), dropping any previous
    /// run's data.
    pub fn reset(&mut self, seats: u32) -> rusqlite::Result<()> {
        let tx = self.db.transaction()?;
        tx.execute_batch(
            "DELETE FROM seats; DELETE FROM sales; DELETE FROM rejected; DELETE FROM groups;",
        )?;
        {
            let mut insert = tx.prepare("INSERT INTO seats (seat) VALUES (?1)")?;
            for seat in 0..seats {
                insert.execute([seat])?;
            }
        }
        tx.commit()
    }

    /// Who bought `seat`, if anyone.
    pub fn owner(&self, seat: u32) -> rusqlite::Result<Option<String>> {
        self.db
            .query_row("SELECT owner FROM seats WHERE seat = ?1", [seat], |row| {
                row.get(0)
            })
            .optional()
            .map(Option::flatten)
    }

    /// Seats nobody has bought yet, in seat order.
    pub fn unsold(&self) -> rusqlite::Result<Vec<u32>> {
        let mut query = self
            .db
            .prepare_cached("SELECT seat FROM seats WHERE owner IS NULL ORDER BY seat")?;
        query.query_map([], |row| row.get(0))?.collect()
    }

    /// Sells `seat` to `buyer` under fencing `token`: accepted only if `token` is greater than
    /// the last token accepted for the seat. The fence check and the write are one statement.
    pub fn sell(&mut self, seat: u32, buyer: &str, token: u64) -> rusqlite::Result<SaleOutcome> {
        let token = i64::try_from(token).unwrap_or(i64::MAX);
        let tx = self.db.transaction()?;
        let changed = tx.execute(
            "UPDATE seats SET owner = ?1, last_token = ?2 WHERE seat = ?3 AND last_token < ?2",
            params![buyer, token, seat],
        )?;
        let outcome = if changed == 1 {
            tx.execute(
                "INSERT INTO sales (seat, buyer, token) VALUES (?1, ?2, ?3)",
                params![seat, buyer, token],
            )?;
            SaleOutcome::Accepted
        } else {
            tx.execute(
                "INSERT INTO rejected (seat, buyer, token) VALUES (?1, ?2, ?3)",
                params![seat, buyer, token],
            )?;
            SaleOutcome::StaleToken
        };
        tx.commit()?;
        Ok(outcome)
    }

    /// Sells `seats` (seat, token) to the group `buyer` in one transaction: every seat's sale is
    /// fenced as in [`Ledger::sell`], and either all are accepted (and the group's size
    /// recorded) or none is (each seat's write is then recorded as rejected).
    pub fn sell_group(
        &mut self,
        buyer: &str,
        seats: &[(u32, u64)],
    ) -> rusqlite::Result<SaleOutcome> {
        let token = |t: u64| i64::try_from(t).unwrap_or(i64::MAX);
        let tx = self.db.transaction()?;
        let mut all = true;
        for &(seat, t) in seats {
            let changed = tx.execute(
                "UPDATE seats SET owner = ?1, last_token = ?2 WHERE seat = ?3 AND last_token < ?2",
                params![buyer, token(t), seat],
            )?;
            if changed != 1 {
                all = false;
                break;
            }
        }
        if all {
            for &(seat, t) in seats {
                tx.execute(
                    "INSERT INTO sales (seat, buyer, token) VALUES (?1, ?2, ?3)",
                    params![seat, buyer, token(t)],
                )?;
            }
            tx.execute(
                "INSERT INTO groups (buyer, size) VALUES (?1, ?2)",
                params![buyer, seats.len() as i64],
            )?;
            tx.commit()?;
            return Ok(SaleOutcome::Accepted);
        }
        tx.rollback()?;
        let tx = self.db.transaction()?;
        for &(seat, t) in seats {
            tx.execute(
                "INSERT INTO rejected (seat, buyer, token) VALUES (?1, ?2, ?3)",
                params![seat, buyer, token(t)],
            )?;
        }
        tx.commit()?;
        Ok(SaleOutcome::StaleToken)
    }

    /// Audits the ledger from its tables alone.
    pub fn audit(&self) -> rusqlite::Result<Audit> {
        let count = |sql: &str| -> rusqlite::Result<u64> {
            self.db
                .query_row(sql, [], |row| row.get::<_, i64>(0))
                .map(|n| n as u64)
        };
        Ok(Audit {
            seats_sold: count("SELECT COUNT(DISTINCT seat) FROM sales")?,
            double_sold: count(
                "SELECT COUNT(*) FROM (SELECT seat FROM sales GROUP BY seat HAVING COUNT(*) > 1)",
            )?,
            owner_mismatches: count(
                "SELECT COUNT(*) FROM seats s
                 WHERE s.owner IS NOT NULL
                   AND s.owner IS NOT (SELECT buyer FROM sales WHERE seat = s.seat ORDER BY token DESC LIMIT 1)",
            )?,
            stale_writes_rejected: count("SELECT COUNT(*) FROM rejected")?,
            groups_seated: count("SELECT COUNT(*) FROM groups")?,
            groups_split: self.groups_split()?,
        })
    }

    /// Every group of friends that bought: its buyer, its size, and the seats sold to it (in
    /// seat order), read back from the `groups` and `sales` tables.
    pub fn groups(&self) -> rusqlite::Result<Vec<(String, u32, Vec<u32>)>> {
        let mut groups = self
            .db
            .prepare("SELECT buyer, size FROM groups ORDER BY buyer")?;
        let groups: Vec<(String, u32)> = groups
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        let mut seats = self
            .db
            .prepare("SELECT seat FROM sales WHERE buyer = ?1 ORDER BY seat")?;
        groups
            .into_iter()
            .map(|(buyer, size)| {
                let sold = seats
                    .query_map([&buyer], |row| row.get(0))?
                    .collect::<rusqlite::Result<Vec<u32>>>()?;
                Ok((buyer, size, sold))
            })
            .collect()
    }

    /// Groups whose sales are not exactly their size in seats side by side in one row.
    fn groups_split(&self) -> rusqlite::Result<u64> {
        Ok(self
            .groups()?
            .iter()
            .filter(|(_, size, sold)| sold.len() != *size as usize || !adjacent_in_a_row(sold))
            .count() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ledger(seats: u32) -> (tempfile::TempDir, Ledger) {
        let dir = tempfile::tempdir().unwrap();
        let mut ledger = Ledger::open(&dir.path().join("ledger.db")).unwrap();
        ledger.reset(seats).unwrap();
        (dir, ledger)
    }

    #[test]
    fn a_newer_token_is_accepted() {
        let (_dir, mut ledger) = ledger(3);
        assert_eq!(ledger.sell(1, "ann", 10).unwrap(), SaleOutcome::Accepted);
        assert_eq!(ledger.owner(1).unwrap().as_deref(), Some("ann"));
        assert_eq!(ledger.owner(2).unwrap(), None);
    }

    #[test]
    fn a_lower_or_equal_token_is_rejected() {
        let (_dir, mut ledger) = ledger(3);
        assert_eq!(ledger.sell(1, "bob", 20).unwrap(), SaleOutcome::Accepted);
        assert_eq!(
            ledger.sell(1, "stale", 10).unwrap(),
            SaleOutcome::StaleToken
        );
        assert_eq!(ledger.sell(1, "same", 20).unwrap(), SaleOutcome::StaleToken);
        assert_eq!(ledger.owner(1).unwrap().as_deref(), Some("bob"));
        let audit = ledger.audit().unwrap();
        assert_eq!(audit.stale_writes_rejected, 2);
        assert_eq!(audit.double_sold, 0);
        assert_eq!(audit.seats_sold, 1);
    }

    #[test]
    fn the_audit_catches_a_double_sale() {
        // Two writers whose tokens arrive in increasing order both get through: fencing alone
        // does not prevent this, the lock does. The audit must see it.
        let (_dir, mut ledger) = ledger(3);
        ledger.sell(2, "first", 5).unwrap();
        ledger.sell(2, "second", 6).unwrap();
        let audit = ledger.audit().unwrap();
        assert_eq!(audit.double_sold, 1);
        assert_eq!(audit.owner_mismatches, 0);
    }

    #[test]
    fn a_group_is_sold_whole_or_not_at_all() {
        let (_dir, mut ledger) = ledger(30);
        assert_eq!(
            ledger
                .sell_group("friends", &[(3, 5), (4, 5), (5, 5)])
                .unwrap(),
            SaleOutcome::Accepted
        );
        ledger.sell(12, "single", 9).unwrap();
        // Seat 12 already went with a newer token: none of 11, 12, 13 is sold to the group.
        assert_eq!(
            ledger
                .sell_group("late", &[(11, 8), (12, 8), (13, 8)])
                .unwrap(),
            SaleOutcome::StaleToken
        );
        assert_eq!(ledger.owner(11).unwrap(), None);
        assert_eq!(ledger.owner(12).unwrap().as_deref(), Some("single"));
        let audit = ledger.audit().unwrap();
        assert_eq!(audit.groups_seated, 1);
        assert_eq!(audit.groups_split, 0);
        assert_eq!(audit.stale_writes_rejected, 3);
        assert_eq!(audit.double_sold, 0);
    }

    #[test]
    fn the_audit_catches_a_split_group() {
        let (_dir, mut ledger) = ledger(30);
        // Seats 9 and 10 are numbered side by side but in two rows.
        ledger.sell_group("apart", &[(9, 1), (10, 1)]).unwrap();
        ledger.sell_group("gap", &[(20, 2), (22, 2)]).unwrap();
        ledger.sell_group("together", &[(5, 3), (6, 3)]).unwrap();
        let audit = ledger.audit().unwrap();
        assert_eq!((audit.groups_seated, audit.groups_split), (3, 2));
        assert!(adjacent_in_a_row(&[7, 6, 8]));
        assert!(!adjacent_in_a_row(&[]));
    }

    #[test]
    fn unsold_lists_seats_without_owner() {
        let (_dir, mut ledger) = ledger(4);
        ledger.sell(1, "a", 1).unwrap();
        assert_eq!(ledger.unsold().unwrap(), vec![0, 2, 3]);
    }

    #[test]
    fn reset_clears_a_previous_run() {
        let (_dir, mut ledger) = ledger(3);
        ledger.sell(0, "x", 1).unwrap();
        ledger.reset(5).unwrap();
        assert_eq!(ledger.audit().unwrap(), Audit::default());
        assert_eq!(ledger.owner(4).unwrap(), None);
    }
}
