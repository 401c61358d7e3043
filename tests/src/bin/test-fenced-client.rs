//! A lock client as a separate process, so a test can `SIGSTOP` it while it holds a lock (a
//! real pause: GC, swap, a stopped VM) and `SIGCONT` it later.
//!
//! `test-fenced-client ENDPOINTS LOCK LEDGER SEAT TTL_MS WORK_MS`: acquires `LOCK` (trying without
//! waiting in line, for up to 20 s) on the comma-separated `ENDPOINTS`, prints `granted TOKEN MS`
//! (MS: how long the successful attempt took), checks the hold and prints
//! `held true|false`, "works" for `WORK_MS` (the test stops it here), then writes `SEAT` of the
//! concert ledger at `LEDGER` with its token *without checking again*, as a paused process that
//! wakes up does, and prints `outcome accepted|stale` and `held_after true|false`.

use std::io::Write;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::time::Instant;

/// Between attempts: a held lock is retried soon, anything else a little later.
async fn pause_after(err: &leasehold::Error) {
    let pause = if matches!(err, leasehold::Error::LockHeld { .. }) {
        30
    } else {
        200
    };
    tokio::time::sleep(Duration::from_millis(pause)).await;
}

fn say(line: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()?;
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [endpoints, lock, ledger, seat, ttl_ms, work_ms] = args.as_slice() else {
        anyhow::bail!("usage: test-fenced-client ENDPOINTS LOCK LEDGER SEAT TTL_MS WORK_MS");
    };
    let client = leasehold::Client::builder()
        .endpoints(endpoints.split(','))
        .request_timeout(Duration::from_secs(3))
        .build()?;
    // Never waits in line: a waiter's lease is renewed while it waits, so its hold's timer
    // would start from a keep-alive sent before the grant, unknown to the test. A fresh lease
    // per attempt starts the timer within the attempt, whose duration is printed.
    let ttl = Duration::from_millis(ttl_ms.parse()?);
    let give_up = Instant::now() + Duration::from_secs(20);
    let (guard, attempt) = loop {
        let started = Instant::now();
        match client
            .lock(lock.as_str())
            .ttl(ttl)
            .owner("paused-process")
            .try_acquire()
            .await
        {
            Ok(guard) => break (guard, started.elapsed()),
            Err(err) if Instant::now() < give_up => {
                pause_after(&err).await;
            }
            Err(err) => return Err(err).context("acquire"),
        }
    };
    let token = guard.token().get();
    // `granted TOKEN MS`: MS is how long the successful attempt took; the hold's timer started
    // within it.
    say(&format!("granted {token} {}", attempt.as_millis()))?;
    say(&format!("held {}", guard.is_held()))?;
    tokio::time::sleep(Duration::from_millis(work_ms.parse()?)).await;
    let mut ledger = concert::Ledger::open(ledger.as_ref())?;
    let outcome = match ledger.sell(seat.parse()?, "paused-process", token)? {
        concert::SaleOutcome::Accepted => "accepted",
        concert::SaleOutcome::StaleToken => "stale",
    };
    say(&format!("outcome {outcome}"))?;
    say(&format!("held_after {}", guard.is_held()))?;
    // The hold is gone by now if the test stopped us past the TTL; releasing tells the server
    // anyway (it answers not_holder then).
    let _ = guard.release().await;
    Ok(())
}
