//! `leasehold observe NAME`: the leader of an election now, then each new leader, one line each,
//! until interrupted (as `etcdctl elect -l NAME`).

use serde_json::json;
use tokio::signal::unix::{SignalKind, signal};

use super::EXIT_ERROR;
use super::output::Out;
use crate::{ClientBuilder, Leader};

/// Runs `leasehold observe`; returns the exit code: 128+N when signal N ends it (130 for
/// Ctrl-C), or the code of an error that ends the stream.
pub(super) async fn run(builder: ClientBuilder, name: &str, out: &Out) -> u8 {
    let (mut int, mut term) = match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(int), Ok(term)) => (int, term),
        (Err(err), _) | (_, Err(err)) => {
            eprintln!("leasehold: cannot handle signals: {err}");
            return EXIT_ERROR;
        }
    };
    let client = match builder.build() {
        Ok(client) => client,
        Err(err) => return out.fail(&err),
    };
    let mut leaders = client.election(name).observe();
    loop {
        let item = tokio::select! {
            item = leaders.next() => item,
            _ = int.recv() => return 130,
            _ = term.recv() => return 143,
        };
        match item {
            Some(Ok(leader)) => out.result(
                &line(name, leader.as_ref()),
                &json!({"name": name, "leader": leader, "revision": leaders.revision()}),
            ),
            // No server answers for now: say so, and keep trying (the stream resumes).
            Some(Err(err)) if err.is_retryable() => out.event(
                &format!("{err}; still trying"),
                json!({"event": "unavailable", "name": name, "message": err.to_string()}),
            ),
            Some(Err(err)) => return out.fail(&err),
            None => return EXIT_ERROR,
        }
    }
}

/// One leader, for people.
fn line(name: &str, leader: Option<&Leader>) -> String {
    match leader {
        None => format!("{name}: no leader"),
        Some(l) => format!(
            "{name}: leader {} (epoch {}, owner {}, lease {})",
            l.value.as_deref().unwrap_or("-"),
            l.epoch,
            l.owner.as_deref().unwrap_or("-"),
            l.lease_id
        ),
    }
}
