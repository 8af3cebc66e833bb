//! The fake gateway: plain `ws://`, JSON text frames, the part of the protocol a bot needs: HELLO (op 10),
//! IDENTIFY (op 2) answered with READY, heartbeats (op 1) answered with ACKs (op 11), RESUME (op 6) answered
//! with INVALID_SESSION so the client identifies again, and dispatches (op 0) pushed by the test.
//!
//! Wrong tokens close the socket with 4004 and a disallowed privileged intent with 4014, as Discord does.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::Shared;

/// GUILD_MESSAGES | DIRECT_MESSAGES | MESSAGE_CONTENT... only MESSAGE_CONTENT matters here: privileged.
const MESSAGE_CONTENT: u64 = 1 << 15;

/// Something the bot sent on the gateway.
#[derive(Debug, Clone)]
pub struct GatewayEvent {
    pub at: Instant,
    /// Which connection (from 1, in connection order).
    pub session: u64,
    pub op: u64,
    pub data: Value,
}

enum Outgoing {
    Dispatch { event: String, data: Value },
    Close { code: u16, reason: String },
}

struct Session {
    id: u64,
    identified: bool,
    tx: mpsc::UnboundedSender<Outgoing>,
}

/// The connected sessions and what they sent.
#[derive(Default)]
pub(crate) struct Hub {
    sessions: Mutex<Vec<Session>>,
    received: Mutex<Vec<GatewayEvent>>,
    next_session: AtomicU64,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("sessions", &lock(&self.sessions).len())
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Hub {
    pub(crate) fn identified(&self) -> usize {
        lock(&self.sessions).iter().filter(|s| s.identified).count()
    }

    pub(crate) fn received(&self) -> Vec<GatewayEvent> {
        lock(&self.received).clone()
    }

    /// Sends a dispatch to every identified session; returns how many got it.
    pub(crate) fn dispatch(&self, event: &str, data: &Value) -> usize {
        lock(&self.sessions)
            .iter()
            .filter(|s| s.identified)
            .filter(|s| {
                s.tx.send(Outgoing::Dispatch {
                    event: event.to_string(),
                    data: data.clone(),
                })
                .is_ok()
            })
            .count()
    }

    /// Closes every session with `code` (e.g. 4000 to make the client reconnect).
    pub(crate) fn close_all(&self, code: u16, reason: &str) {
        for s in lock(&self.sessions).iter() {
            let _ = s.tx.send(Outgoing::Close {
                code,
                reason: reason.into(),
            });
        }
    }
}

/// Accepts connections until `cancel`; each connection runs on `tracker`.
pub(crate) async fn serve(
    sh: Arc<Shared>,
    listener: TcpListener,
    cancel: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let stream = tokio::select! {
            () = cancel.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(err) => {
                    tracing::warn!(%err, "simulated gateway accept failed");
                    continue;
                }
            },
        };
        let (sh, cancel) = (sh.clone(), cancel.clone());
        tracker.spawn(async move {
            if let Err(err) = connection(&sh, stream, cancel).await {
                tracing::debug!(%err, "simulated gateway connection ended");
            }
        });
    }
}

async fn connection(
    sh: &Arc<Shared>,
    stream: TcpStream,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let ws = tokio_tungstenite::accept_async(stream).await?;
    let (mut sink, mut source) = ws.split();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let id = sh.gateway.next_session.fetch_add(1, Ordering::Relaxed) + 1;
    lock(&sh.gateway.sessions).push(Session {
        id,
        identified: false,
        tx: tx.clone(),
    });
    let interval = sh.lock().settings.heartbeat_interval.as_millis() as u64;
    let hello = json!({"op": 10, "d": {"heartbeat_interval": interval}, "s": null, "t": null});
    let result = async {
        sink.send(Message::text(hello.to_string())).await?;
        let mut seq: u64 = 0;
        loop {
            tokio::select! {
                () = cancel.cancelled() => {
                    let _ = sink.send(close(1001, "simulator shutting down")).await;
                    return Ok(());
                }
                out = rx.recv() => match out {
                    Some(Outgoing::Dispatch { event, data }) => {
                        seq += 1;
                        let frame = json!({"op": 0, "t": event, "s": seq, "d": data});
                        sink.send(Message::text(frame.to_string())).await?;
                    }
                    Some(Outgoing::Close { code, reason }) => {
                        let _ = sink.send(close(code, &reason)).await;
                        return Ok(());
                    }
                    None => return Ok(()),
                },
                msg = source.next() => {
                    let text = match msg {
                        Some(Ok(Message::Text(t))) => t.to_string(),
                        Some(Ok(Message::Close(_))) | None => return Ok(()),
                        Some(Ok(_)) => continue,
                        Some(Err(e)) => return Err(e.into()),
                    };
                    let Ok(payload) = serde_json::from_str::<Value>(&text) else {
                        let _ = sink.send(close(4002, "Error while decoding payload.")).await;
                        return Ok(());
                    };
                    let op = payload["op"].as_u64().unwrap_or(u64::MAX);
                    lock(&sh.gateway.received).push(GatewayEvent {
                        at: Instant::now(),
                        session: id,
                        op,
                        data: payload["d"].clone(),
                    });
                    sh.bump();
                    match op {
                        1 => sink.send(Message::text(json!({"op": 11}).to_string())).await?,
                        2 => {
                            if let Some((code, reason)) = refuse_identify(sh, &payload["d"]) {
                                let _ = sink.send(close(code, reason)).await;
                                return Ok(());
                            }
                            seq += 1;
                            let ready = json!({"op": 0, "t": "READY", "s": seq, "d": sh.ready_json(id)});
                            sink.send(Message::text(ready.to_string())).await?;
                            if let Some(s) = lock(&sh.gateway.sessions).iter_mut().find(|s| s.id == id) {
                                s.identified = true;
                            }
                            sh.bump();
                        }
                        // We keep no session history to replay: a resuming client must identify again.
                        6 => sink.send(Message::text(json!({"op": 9, "d": false}).to_string())).await?,
                        _ => {}
                    }
                }
            }
        }
    }
    .await;
    lock(&sh.gateway.sessions).retain(|s| s.id != id);
    sh.bump();
    result
}

fn refuse_identify(sh: &Shared, d: &Value) -> Option<(u16, &'static str)> {
    let token = d["token"].as_str().unwrap_or_default();
    if token.strip_prefix("Bot ").unwrap_or(token) != sh.cfg.token {
        return Some((4004, "Authentication failed."));
    }
    let intents = d["intents"].as_u64().unwrap_or(0);
    if intents & MESSAGE_CONTENT != 0 && !sh.lock().settings.message_content_allowed {
        return Some((4014, "Disallowed intent(s)."));
    }
    None
}

fn close(code: u16, reason: &str) -> Message {
    Message::Close(Some(CloseFrame {
        code: CloseCode::from(code),
        reason: reason.to_string().into(),
    }))
}
