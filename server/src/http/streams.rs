//! Server-Sent Events: `GET /v1/locks/{name}/watch`, `GET /v1/events` (every lock, for the status
//! page) and `GET /v1/elections/{name}/observe`. Each event's `id` is the etcd revision it shows;
//! a client that reconnects with `Last-Event-ID` is sent every change after it.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::Stream;
use serde::Serialize;
use tokio::sync::mpsc;
use utoipa::ToSchema;

use super::AppState;
use super::elections::LeadershipResponse;
use super::error::{ApiError, ErrorBody};
use super::extract::{Caller, LockNamePath};
use super::locks::LockStatusResponse;
use crate::election::Leadership;
use crate::watch::LockEvent;

/// The `Last-Event-ID` a reconnecting client sends: the last revision it saw.
fn last_event_id(headers: &HeaderMap) -> Result<Option<i64>, ApiError> {
    let Some(value) = headers.get("last-event-id") else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse::<i64>().ok())
        .filter(|r| *r >= 0)
        .map(Some)
        .ok_or_else(|| {
            ApiError::InvalidRequest("Last-Event-ID must be a revision (an integer)".into())
        })
}

/// An SSE response over `rx`, each event rendered by `render` (which may skip one).
fn sse<F>(
    mut rx: mpsc::Receiver<LockEvent>,
    mut render: F,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>>
where
    F: FnMut(LockEvent) -> Option<Event> + Send + 'static,
{
    let stream = async_stream(move |tx| async move {
        while let Some(event) = rx.recv().await {
            if let Some(event) = render(event)
                && tx.send(Ok(event)).await.is_err()
            {
                return;
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

/// A stream fed by `produce` through a small channel (keeps the SSE plumbing free of any
/// stream-building crate).
fn async_stream<F, Fut>(produce: F) -> impl Stream<Item = Result<Event, Infallible>>
where
    F: FnOnce(mpsc::Sender<Result<Event, Infallible>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(produce(tx));
    futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    })
}

fn status_event(event: LockEvent) -> Option<Event> {
    let body = LockStatusResponse::from_status(event.status);
    Event::default()
        .id(event.revision.to_string())
        .event(if event.reset { "reset" } else { "status" })
        .json_data(body)
        .ok()
}

/// Streams a lock's status: now, then at every change (Server-Sent Events, `id` = etcd revision;
/// reconnect with `Last-Event-ID` to miss nothing).
#[utoipa::path(get, path = "/v1/locks/{name}/watch", tag = "locks",
    params(("name" = String, Path, description = "Lock name, percent-encoded"),
           ("Last-Event-ID" = Option<String>, Header, description = "The last revision seen: resume after it")),
    responses(
        (status = 200, description = "`status` events (a lock status as JSON), `reset` after lost history", content_type = "text/event-stream", body = LockStatusResponse),
        (status = 400, description = "invalid_name or invalid_request", body = ErrorBody),
        (status = 401, description = "unauthorized", body = ErrorBody),
        (status = 403, description = "forbidden", body = ErrorBody),
        (status = 503, description = "store_unavailable or overloaded (too many streams; Retry-After)", body = ErrorBody),
    ))]
pub async fn watch_lock(
    State(state): State<AppState>,
    Caller(tenant): Caller,
    LockNamePath(name): LockNamePath,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let after = last_event_id(&headers)?;
    let rx = state.service.watch_lock(&tenant, &name, after).await?;
    Ok(sse(rx, status_event))
}

/// One event of `GET /v1/events`: a lock's status after a change.
#[derive(Debug, Serialize, ToSchema)]
pub struct AnyLockEvent {
    /// The lock's status at the event's revision.
    #[serde(flatten)]
    pub status: LockStatusResponse,
}

/// Streams the status of every lock of the caller's tenant, at every change from now (or after
/// `Last-Event-ID`): what the status page at `/ui` follows.
#[utoipa::path(get, path = "/v1/events", tag = "locks",
    params(("Last-Event-ID" = Option<String>, Header, description = "The last revision seen: resume after it")),
    responses(
        (status = 200, description = "`status` events, one per changed lock and revision", content_type = "text/event-stream", body = AnyLockEvent),
        (status = 400, description = "invalid_request", body = ErrorBody),
        (status = 401, description = "unauthorized", body = ErrorBody),
        (status = 503, description = "overloaded (too many streams; Retry-After)", body = ErrorBody),
    ))]
pub async fn watch_all(
    State(state): State<AppState>,
    Caller(tenant): Caller,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let after = last_event_id(&headers)?;
    let rx = state.service.watch_all(tenant, after).await?;
    Ok(sse(rx, status_event))
}

/// Streams who leads an election: now, then at every change of leader (`id` = etcd revision).
#[utoipa::path(get, path = "/v1/elections/{name}/observe", tag = "elections",
    params(("name" = String, Path, description = "Election name, percent-encoded"),
           ("Last-Event-ID" = Option<String>, Header, description = "The last revision seen: resume after it")),
    responses(
        (status = 200, description = "`leader` events (the leadership as JSON), one per change of leader", content_type = "text/event-stream", body = LeadershipResponse),
        (status = 400, description = "invalid_name or invalid_request", body = ErrorBody),
        (status = 401, description = "unauthorized", body = ErrorBody),
        (status = 403, description = "forbidden", body = ErrorBody),
        (status = 503, description = "store_unavailable or overloaded", body = ErrorBody),
    ))]
pub async fn observe(
    State(state): State<AppState>,
    Caller(tenant): Caller,
    LockNamePath(name): LockNamePath,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let after = last_event_id(&headers)?;
    let rx = state.service.watch_lock(&tenant, &name, after).await?;
    // Only changes of leader: a new candidate queueing is not news to an observer.
    let mut last_epoch: Option<Option<u64>> = None;
    Ok(sse(rx, move |event| {
        let leadership = Leadership::of(&event.status);
        let epoch = leadership.leader.as_ref().map(|l| l.epoch);
        if last_epoch == Some(epoch) && !event.reset {
            return None;
        }
        last_epoch = Some(epoch);
        Event::default()
            .id(event.revision.to_string())
            .event("leader")
            .json_data(LeadershipResponse::from(leadership))
            .ok()
    }))
}

/// Makes the document say what an event stream carries. The route annotations name the JSON
/// each event's `data` holds (utoipa can say no more); in OpenAPI 3.1 a `text/event-stream`
/// schema describes one event, `{event, id, data}`, so each becomes such an event whose `data`
/// is a string of JSON (`contentMediaType`) matching the named schema (`contentSchema`), which
/// validators such as schemathesis check.
pub(super) fn describe_event_streams(document: &mut serde_json::Value) {
    let Some(paths) = document["paths"].as_object_mut() else {
        return;
    };
    let operations = paths
        .values_mut()
        .filter_map(|item| item.as_object_mut())
        .flat_map(|methods| methods.values_mut());
    for operation in operations {
        let Some(responses) = operation["responses"].as_object_mut() else {
            continue;
        };
        for response in responses.values_mut() {
            let Some(stream) = response
                .get_mut("content")
                .and_then(|content| content.get_mut("text/event-stream"))
            else {
                continue;
            };
            let Some(payload) = stream.get("schema").cloned() else {
                continue;
            };
            stream["schema"] = serde_json::json!({
                "type": "object",
                "description": "One Server-Sent Event",
                "required": ["data"],
                "properties": {
                    "event": {"type": "string", "description": "The event's kind"},
                    "id": {"type": "string", "description": "The etcd revision it reports (resume after it with `Last-Event-ID`)"},
                    "retry": {"type": "integer", "minimum": 0},
                    "data": {
                        "type": "string",
                        "contentMediaType": "application/json",
                        "contentSchema": payload,
                    },
                },
            });
        }
    }
}
