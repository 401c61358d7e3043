//! Streams of changes over Server-Sent Events: a lock's status ([`Client::watch`]) and an
//! election's leader ([`crate::Election::observe`]), resumed with `Last-Event-ID` after a
//! broken connection so that no change is missed.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::client::{Client, encode};
use crate::error::Error;
use crate::lock::LockStatus;
use crate::retry::jitter;

/// Longest silence on an open stream before it counts as broken and is reopened: servers send a
/// keep-alive comment every 15 s, so this is three missed ones (a replica that hangs).
const IDLE_TIMEOUT: Duration = Duration::from_secs(45);

/// Pauses between attempts to reopen a stream: full jitter up to a bound that doubles from
/// this...
const FIRST_BACKOFF: Duration = Duration::from_millis(100);

/// ...to this.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Turns one event (its type and data) into an item, or skips it (`None`).
pub(crate) type Decode<T> = Box<dyn FnMut(&str, &str) -> Option<Result<T, Error>> + Send>;

/// A stream of changes, each item as of one etcd revision, in order, none missed and none
/// twice, across reconnects. From [`Client::watch`] (lock statuses) and
/// [`crate::Election::observe`] (leaders).
///
/// Read it with [`Watch::next`], or as a [`futures_core::Stream`]. The first item is the state
/// now, then one per change. A connection that breaks (a replica dies, a proxy cuts it, 45 s
/// without a byte) is reopened, on another endpoint if need be, with `Last-Event-ID`, so the
/// changes made meanwhile still come, in order. Items that are `Err`:
///
/// - [`Error::is_retryable`] (no server could be reached, every one answered 503): the watch
///   keeps trying, with backoff, and resumes where it left off; the error says why nothing
///   comes. Skip it or stop, as you prefer.
/// - [`Error::Unexpected`] for one event this client could not decode (a newer server): that
///   event is skipped and the watch goes on.
/// - anything else (a bad name, no permission): the watch ends after it.
///
/// A watch runs in a task of its own on the Tokio runtime, so it must be made inside one; the
/// task ends when the `Watch` is dropped. It buffers at most two items ahead of you; a server
/// cuts a reader that falls far behind, and the watch then resumes where it left off.
#[derive(Debug)]
pub struct Watch<T> {
    rx: mpsc::Receiver<Result<(i64, T), Error>>,
    revision: Option<i64>,
    task: JoinHandle<()>,
}

impl<T: Send + 'static> Watch<T> {
    pub(crate) fn start(client: &Client, path: String, decode: Decode<T>) -> Self {
        let (tx, rx) = mpsc::channel(1);
        let task = tokio::spawn(follow(client.clone(), path, decode, tx));
        Self {
            rx,
            revision: None,
            task,
        }
    }
}

impl<T> Watch<T> {
    /// The next change; `None` once the watch has ended (after an error that is not
    /// retryable).
    pub async fn next(&mut self) -> Option<Result<T, Error>> {
        std::future::poll_fn(|cx| self.poll_item(cx)).await
    }

    /// The etcd revision of the last item returned (the server's event id); `None` before the
    /// first.
    pub fn revision(&self) -> Option<i64> {
        self.revision
    }

    fn poll_item(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<T, Error>>> {
        self.rx.poll_recv(cx).map(|item| {
            item.map(|result| {
                result.map(|(revision, value)| {
                    self.revision = Some(revision);
                    value
                })
            })
        })
    }
}

impl<T> Drop for Watch<T> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl<T> futures_core::Stream for Watch<T> {
    type Item = Result<T, Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().poll_item(cx)
    }
}

impl Client {
    /// Follows lock `name`: its status now (holders and waiters, in order), then after every
    /// change, as a [`Watch`] (`GET /v1/locks/{name}/watch`). Must be called inside a Tokio
    /// runtime.
    pub fn watch(&self, name: &str) -> Watch<LockStatus> {
        let path = format!("/v1/locks/{}/watch", encode(name));
        Watch::start(
            self,
            path,
            Box::new(|event, data| match event {
                // `reset`: etcd compacted the history the watch resumed from; the status is
                // the current one, as after a fresh start.
                "status" | "reset" => Some(decode_json(data)),
                _ => None,
            }),
        )
    }
}

/// Decodes an event's JSON data.
pub(crate) fn decode_json<T: serde::de::DeserializeOwned>(data: &str) -> Result<T, Error> {
    serde_json::from_str(data).map_err(|err| Error::Unexpected {
        status: 200,
        code: None,
        message: format!("undecodable event: {err}"),
    })
}

/// The watch's task: opens the stream, reads events, reopens after `Last-Event-ID` when the
/// connection breaks, until the `Watch` is dropped or an error that is not retryable.
async fn follow<T>(
    client: Client,
    path: String,
    mut decode: Decode<T>,
    tx: mpsc::Sender<Result<(i64, T), Error>>,
) {
    let mut last_id: Option<i64> = None;
    let mut failures: u32 = 0;
    loop {
        let pause = match client.open_stream(&path, last_id).await {
            Ok(mut response) => {
                let mut parser = SseParser::default();
                let broke = loop {
                    let chunk = match tokio::time::timeout(IDLE_TIMEOUT, response.chunk()).await {
                        Ok(Ok(Some(chunk))) => chunk,
                        Ok(Ok(None)) => break "the server ended the stream".to_owned(),
                        Ok(Err(err)) => break format!("reading the stream: {err}"),
                        Err(_) => break format!("nothing for {IDLE_TIMEOUT:?}"),
                    };
                    for event in parser.feed(&chunk) {
                        let Some(id) = event.id.as_deref().and_then(|id| id.parse::<i64>().ok())
                        else {
                            continue;
                        };
                        last_id = Some(id);
                        failures = 0;
                        let item = match decode(&event.kind, &event.data) {
                            None => continue,
                            Some(item) => item,
                        };
                        if tx.send(item.map(|value| (id, value))).await.is_err() {
                            return;
                        }
                    }
                };
                tracing::info!(%path, why = %broke, "stream broken; resuming");
                // A broken stream is reopened at once, the first time.
                backoff(failures)
            }
            Err(err) if !err.is_retryable() => {
                let _ = tx.send(Err(err)).await;
                return;
            }
            Err(err) => {
                let pause = match &err {
                    Error::Overloaded {
                        retry_after: Some(after),
                        ..
                    } => backoff(failures.max(1)).max(*after),
                    _ => backoff(failures.max(1)),
                };
                tracing::info!(%path, error = %err, pause = ?pause, "no endpoint serves the stream now; trying again");
                if tx.send(Err(err)).await.is_err() {
                    return;
                }
                pause
            }
        };
        failures = failures.saturating_add(1);
        tokio::time::sleep(pause).await;
    }
}

/// The pause before reopening after `failures` failures in a row (none: at once).
fn backoff(failures: u32) -> Duration {
    if failures == 0 {
        return Duration::ZERO;
    }
    let bound = FIRST_BACKOFF
        .saturating_mul(1u32 << (failures - 1).min(16))
        .min(MAX_BACKOFF);
    jitter(bound)
}

/// One Server-Sent Event.
#[derive(Debug, PartialEq, Eq)]
struct SseEvent {
    /// The last event id set (it carries over to later events, as the spec says).
    id: Option<String>,
    /// Its type (`message` if none was given).
    kind: String,
    data: String,
}

/// An incremental Server-Sent Events parser (the `text/event-stream` format): fed chunks that
/// may split lines and characters anywhere, returns the events completed.
#[derive(Debug, Default)]
struct SseParser {
    buffer: Vec<u8>,
    id: Option<String>,
    kind: Option<String>,
    data: Option<String>,
}

impl SseParser {
    fn feed(&mut self, chunk: &[u8]) -> Vec<SseEvent> {
        self.buffer.extend_from_slice(chunk);
        let mut events = Vec::new();
        while let Some(end) = self.buffer.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.buffer.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line);
            let line = line.trim_end_matches('\n').trim_end_matches('\r');
            if line.is_empty() {
                // A blank line ends an event (one without data is nothing).
                let kind = self.kind.take();
                if let Some(data) = self.data.take() {
                    events.push(SseEvent {
                        id: self.id.clone(),
                        kind: kind.unwrap_or_else(|| "message".to_owned()),
                        data,
                    });
                }
                continue;
            }
            if line.starts_with(':') {
                continue; // a comment: the server's keep-alive
            }
            let (field, value) = match line.split_once(':') {
                Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
                None => (line, ""),
            };
            match field {
                "id" if !value.contains('\0') => self.id = Some(value.to_owned()),
                "event" => self.kind = Some(value.to_owned()),
                "data" => match &mut self.data {
                    Some(data) => {
                        data.push('\n');
                        data.push_str(value);
                    }
                    None => self.data = Some(value.to_owned()),
                },
                _ => {}
            }
        }
        events
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_anywhere_are_put_together() {
        let text = ": keep-alive\n\nid: 7\nevent: status\ndata: {\"a\":\ndata: 1}\n\r\nid:8\r\nevent:leader\r\ndata:x\r\n\r\n";
        for split in 0..text.len() {
            let mut parser = SseParser::default();
            let (a, b) = text.as_bytes().split_at(split);
            let mut events = parser.feed(a);
            events.extend(parser.feed(b));
            assert_eq!(
                events,
                [
                    SseEvent {
                        id: Some("7".into()),
                        kind: "status".into(),
                        data: "{\"a\":\n1}".into()
                    },
                    SseEvent {
                        id: Some("8".into()),
                        kind: "leader".into(),
                        data: "x".into()
                    }
                ],
                "split at {split}"
            );
        }
    }

    #[test]
    fn a_character_split_between_chunks_survives() {
        let mut parser = SseParser::default();
        let text = "id: 1\ndata: é\n\n".as_bytes();
        let at = text.iter().position(|&b| b == 0xc3).expect("é") + 1;
        assert!(parser.feed(&text[..at]).is_empty());
        let events = parser.feed(&text[at..]);
        assert_eq!(events[0].data, "é");
    }

    #[test]
    fn backoff_starts_at_once_and_stays_bounded() {
        assert_eq!(backoff(0), Duration::ZERO);
        for failures in 1..40 {
            assert!(backoff(failures) <= MAX_BACKOFF);
        }
    }
}
