//! One session on an established [`Link`]: heartbeats out, relay messages in through one dispatch point,
//! the dead-link timer, and (when there is another node to go to) the watch on the transport itself.
//!
//! The session ends with a [`SessionEnd`] saying why; what to do next (reconnect, stop, report) is the run
//! loop's decision, not the session's.

use std::time::Duration;

use ct_protocol::link::{TransportSilence, SILENCE_POLL};
use ct_protocol::message::CloseReason;
use ct_protocol::{AgentMessage, FrameError, RelayMessage};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::connect::Link;
use crate::tasks::Tasks;

/// The relay may ask for heartbeats more often than the transport default, but not absurdly often.
const MIN_HEARTBEAT: Duration = Duration::from_millis(100);

/// Why a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEnd {
    /// Our shutdown token fired; the caller says goodbye.
    Shutdown,
    /// The relay is restarting or shutting down: reconnect at once.
    RelayRestarting,
    /// The link failed (dead, closed, transport error, malformed frame): reconnect with backoff.
    Lost(String),
    /// Another connection with this agent's key took over this session.
    Replaced(String),
    /// The relay revoked this agent's key.
    Revoked(String),
}

/// What the dispatcher wants after handling one message.
enum Flow {
    Continue,
    End(SessionEnd),
}

/// Runs the session until it ends. Cancel-safe: dropping this future (to switch transports) loses nothing
/// that the next session needs: task events stay in the outbox until acknowledged, and the next session
/// sends them again.
///
/// `elsewhere`: the agent knows another relay node to go to. Then a QUIC link whose transport has received
/// nothing for `suspect_after` ends the session at once (a node that died sends no reset; its agents should
/// not wait out `dead_after` on it). Without another node, only `dead_after` ends a silent session.
pub async fn run_session(
    link: &mut Link,
    shutdown: &CancellationToken,
    tasks: &Tasks,
    elsewhere: bool,
) -> SessionEnd {
    let timing = link.transport.timing();
    // Bounded like every write: a relay that stops reading is a dead link.
    macro_rules! send {
        ($msg:expr) => {
            match tokio::time::timeout(timing.dead_after, link.writer.send($msg)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    let lost = SessionEnd::Lost(format!("sending to the relay failed: {e}"));
                    return said_before_closing(link, tasks, lost).await;
                }
                Err(_) => return SessionEnd::Lost("the relay stopped reading".into()),
            }
        };
    }
    tasks.welcomed(&link.welcome);
    for msg in tasks.hello() {
        send!(&msg);
    }
    let requested = Duration::from_millis(link.welcome.heartbeat_ms).max(MIN_HEARTBEAT);
    let heartbeat_every = timing.heartbeat.min(requested);
    let mut heartbeat = tokio::time::interval_at(Instant::now() + heartbeat_every, heartbeat_every);
    heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut last_heard = Instant::now();
    let watching = elsewhere && link.datagrams_received().is_some();
    let mut silence = TransportSilence::new(timing.suspect_after, Instant::now());
    let mut poll = tokio::time::interval(SILENCE_POLL);
    poll.set_missed_tick_behavior(MissedTickBehavior::Delay);

    loop {
        let dead_at = last_heard + timing.dead_after;
        tokio::select! {
            biased;
            () = shutdown.cancelled() => return SessionEnd::Shutdown,
            _ = poll.tick(), if watching => {
                let received = link.datagrams_received().unwrap_or_default();
                if silence.silent(received, Instant::now()) {
                    return SessionEnd::Lost(format!(
                        "no packet from relay node {} for {:?} (the node or the path to it is gone); \
                         moving to another node",
                        link.relay_addr, timing.suspect_after
                    ));
                }
            }
            () = tokio::time::sleep_until(dead_at) => {
                return SessionEnd::Lost(format!(
                    "nothing heard from the relay for {:?}: the link is dead",
                    timing.dead_after
                ));
            }
            _ = heartbeat.tick() => send!(&AgentMessage::Heartbeat),
            out = tasks.outgoing() => {
                for msg in &out {
                    send!(msg);
                }
            }
            received = link.reader.recv::<RelayMessage>() => {
                last_heard = Instant::now();
                match received {
                    Ok(Some(msg)) => match dispatch(msg, tasks) {
                        Flow::Continue => {}
                        Flow::End(end) => return end,
                    },
                    Ok(None) => return SessionEnd::Lost("the relay closed the connection".into()),
                    Err(FrameError::Malformed(e)) => {
                        // A newer relay's message we do not know, or garbage: the stream itself is still in
                        // sync, but we cannot tell what we missed, so start a fresh session.
                        tracing::warn!(error = %e, "malformed message from the relay; reconnecting");
                        return SessionEnd::Lost(format!("malformed message from the relay: {e}"));
                    }
                    Err(e) => return SessionEnd::Lost(e.to_string()),
                }
            }
        }
    }
}

/// The relay may have said why it closed (`Closing{Replaced}`, `Revoked`) just before our write failed: read
/// what is already buffered, briefly, so that is acted on (not reconnecting into a fight with another agent)
/// rather than treated as a lost link.
async fn said_before_closing(link: &mut Link, tasks: &Tasks, lost: SessionEnd) -> SessionEnd {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
    while let Ok(Ok(Some(msg))) =
        tokio::time::timeout_at(deadline, link.reader.recv::<RelayMessage>()).await
    {
        if let Flow::End(end) = dispatch(msg, tasks) {
            return end;
        }
    }
    lost
}

/// The one place relay messages are handled: link control here, task and project messages to [`Tasks`].
fn dispatch(msg: RelayMessage, tasks: &Tasks) -> Flow {
    match msg {
        RelayMessage::StartTask(_)
        | RelayMessage::FilePart(_)
        | RelayMessage::TaskInput { .. }
        | RelayMessage::CancelTask { .. }
        | RelayMessage::Decide { .. }
        | RelayMessage::Ack { .. }
        | RelayMessage::Project { .. }
        | RelayMessage::Worktree { .. } => {
            tasks.handle(msg);
            Flow::Continue
        }
        RelayMessage::Heartbeat => Flow::Continue,
        RelayMessage::Closing { reason, message } => {
            tracing::info!(?reason, %message, "relay is closing this session");
            Flow::End(match reason {
                CloseReason::Shutdown => SessionEnd::RelayRestarting,
                CloseReason::Replaced => SessionEnd::Replaced(message),
                CloseReason::Revoked => SessionEnd::Revoked(message),
            })
        }
    }
}
