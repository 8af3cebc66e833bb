//! A task's events as they happen, over server-sent events: what is stored after the page's last event first,
//! then each new one. Each event carries its sequence number as the SSE id, so a browser that reconnects
//! (EventSource does by itself) resumes after the last one it saw, from the store; nothing falls between.
//!
//! Streams are bounded per session ([`MAX_STREAMS`]); one that falls behind the live feed ends, and the
//! browser's reconnect reads what it missed from the store rather than the relay buffering for it.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use ct_protocol::task::TaskEvent;
use futures_util::stream;
use serde::Deserialize;
use tokio::sync::broadcast::error::RecvError;

use super::api::Params;
use super::guard::{backend_err, ApiError, Signed};
use super::Web;

/// Live streams one session may hold open at once (a few tabs' worth). Each holds a connection and a
/// subscription; more are refused with 429.
pub const MAX_STREAMS: usize = 6;

/// A comment line this often keeps proxies from closing an idle stream.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

#[derive(Debug, Deserialize)]
pub struct After {
    after: Option<u64>,
}

/// `GET /api/tasks/{id}/live?after=SEQ` (or `Last-Event-ID` on a reconnect).
pub async fn events(
    State(web): State<Web>,
    Signed(s): Signed,
    Path(id): Path<String>,
    Params(q): Params<After>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let resumed = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let after = resumed.or(q.after).unwrap_or(0);
    let slot = StreamSlot::take(&web, &s.id)?;
    let feed = match web.backend().watch(&s.user, &id).await {
        Ok(feed) => feed,
        Err(ct_bot::backend::BackendError::Refused(_)) => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "There is no task with that id that you can see.",
            ))
        }
        Err(e) => return Err(backend_err(e)),
    };
    let ended = matches!(
        feed.task.state.as_str(),
        "done" | "failed" | "cancelled" | "lost"
    );
    let state = Pump {
        past: feed
            .past
            .into_iter()
            .filter(|(seq, _)| *seq > after)
            .collect::<Vec<_>>()
            .into_iter(),
        live: feed.live,
        last: after,
        ended,
        done: false,
        shutdown: web.inner.shutdown.clone(),
        _slot: slot,
    };
    let stream = stream::unfold(state, Pump::next);
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response())
}

/// One stream's place: the stored events still to send, then the live feed.
struct Pump {
    past: std::vec::IntoIter<(u64, TaskEvent)>,
    live: tokio::sync::broadcast::Receiver<(u64, TaskEvent)>,
    /// The last sequence number sent (or the page already had).
    last: u64,
    /// The task had ended when the stream began: only the stored events follow.
    ended: bool,
    /// The task's `finished` event went out: the stream ends.
    done: bool,
    shutdown: tokio_util::sync::CancellationToken,
    _slot: StreamSlot,
}

impl Pump {
    async fn next(mut self) -> Option<(Result<Event, Infallible>, Self)> {
        if self.done {
            return None;
        }
        if let Some((seq, event)) = self.past.next() {
            return Some((Ok(self.sent(seq, &event)), self));
        }
        if self.ended {
            return None;
        }
        loop {
            let received = tokio::select! {
                r = self.live.recv() => r,
                () = self.shutdown.cancelled() => return None,
            };
            match received {
                Ok((seq, event)) if seq > self.last => {
                    return Some((Ok(self.sent(seq, &event)), self))
                }
                Ok(_) => continue,
                // Behind the live feed, or the task's feed closed: end here; the browser reconnects with
                // the last id it has and reads the rest from the store.
                Err(RecvError::Lagged(_) | RecvError::Closed) => return None,
            }
        }
    }

    fn sent(&mut self, seq: u64, event: &TaskEvent) -> Event {
        self.last = seq;
        self.done = matches!(event, TaskEvent::Finished { .. });
        let data = serde_json::json!({ "seq": seq, "event": event });
        Event::default()
            .id(seq.to_string())
            .event("task")
            .data(data.to_string())
    }
}

/// One of a session's [`MAX_STREAMS`], given back when its stream is dropped (ended, or the browser left).
struct StreamSlot {
    web: Web,
    session: String,
}

impl StreamSlot {
    fn take(web: &Web, session: &str) -> Result<Self, ApiError> {
        let mut open = web.inner.streams.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(session.to_string()).or_insert(0);
        if *n >= MAX_STREAMS {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "This browser is already following {MAX_STREAMS} tasks live: close some of the dashboard's \
                     tabs and reload."
                ),
            ));
        }
        *n += 1;
        Ok(Self {
            web: web.clone(),
            session: session.to_string(),
        })
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut open = self
            .web
            .inner
            .streams
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.session) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.session);
            }
        }
    }
}
