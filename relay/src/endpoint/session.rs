//! One agent session, whatever carries it: handshake, admission, then heartbeats and messages until the
//! link dies, the agent leaves, or the core closes it (revoked, replaced, shutdown).

use std::net::SocketAddr;
use std::sync::Arc;

use ct_protocol::frame::{FrameError, FrameReader, FrameWriter};
use ct_protocol::handshake::{self, HandshakeError, Verdict};
use ct_protocol::message::{AgentMessage, CloseReason, RelayMessage};
use ct_protocol::Transport;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::{interval_at, sleep_until, Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use crate::core::Core;

/// What the endpoint knows about a connection before the handshake.
#[derive(Debug, Clone, Copy)]
pub struct Link {
    pub transport: Transport,
    pub peer: SocketAddr,
    /// TLS keying-material exporter output for this connection.
    pub channel_binding: [u8; handshake::CHANNEL_BINDING_LEN],
}

/// How a session ended, for the log line.
#[derive(Debug)]
pub enum Ended {
    AgentLeft(String),
    Closed(CloseReason),
    LinkDead,
    LinkError(FrameError),
}

/// Runs a session to its end. Errors a peer causes are logged here and end only this connection.
pub async fn run<R, W>(
    core: Arc<Core>,
    reader: R,
    writer: W,
    link: Link,
    shutdown: CancellationToken,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (mut reader, mut writer) = (FrameReader::new(reader), FrameWriter::new(writer));
    let verified = match handshake::server(
        &mut reader,
        &mut writer,
        core.relay_key(),
        &link.channel_binding,
    )
    .await
    {
        Ok(v) => v,
        Err(e) => {
            core.metrics.handshake(link.transport, handshake_result(&e));
            info!(peer = %link.peer, transport = %link.transport, error = %e, "handshake failed");
            return;
        }
    };
    let welcome = match core.admit(&verified, link.peer.ip()) {
        Ok(w) => w,
        Err((reason, message)) => {
            core.metrics.handshake(link.transport, "rejected");
            info!(peer = %link.peer, fingerprint = %verified.fingerprint, ?reason, "agent refused");
            let _ = writer.send(&Verdict::Rejected { reason, message }).await;
            close_gently(&mut writer).await;
            return;
        }
    };
    let timing = link.transport.timing();
    let welcome = ct_protocol::handshake::Welcome {
        heartbeat_ms: timing.heartbeat.as_millis() as u64,
        ..welcome
    };
    if let Err(e) = writer.send(&Verdict::Welcome(welcome.clone())).await {
        info!(peer = %link.peer, error = %e, "agent left during the handshake");
        return;
    }
    core.metrics.handshake(link.transport, "ok");
    let span = tracing::info_span!("agent", name = %welcome.agent_name, owner = %welcome.owner, transport = %link.transport);
    info!(parent: &span, peer = %link.peer, fingerprint = %verified.fingerprint, paired = welcome.paired, "agent connected");
    live(core, reader, writer, link, verified.fingerprint, shutdown)
        .instrument(span)
        .await
}

/// The established session: heartbeats out, messages in, until something ends it.
async fn live<R, W>(
    core: Arc<Core>,
    mut reader: FrameReader<R>,
    mut writer: FrameWriter<W>,
    link: Link,
    fingerprint: ct_protocol::Fingerprint,
    shutdown: CancellationToken,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let timing = link.transport.timing();
    let mut guard = core.register_session(fingerprint, link.transport, link.peer);
    // Tasks queued while the agent was away go out now, as far as its free slots allow.
    core.agent_connected(&fingerprint);
    let (frames_in, frames_out) = core.metrics.frames(link.transport);
    let mut heartbeat = interval_at(Instant::now() + timing.heartbeat, timing.heartbeat);
    heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut deadline = Instant::now() + timing.dead_after;

    let ended = loop {
        tokio::select! {
            msg = reader.recv::<AgentMessage>() => match msg {
                Ok(Some(msg)) => {
                    frames_in.inc();
                    deadline = Instant::now() + timing.dead_after;
                    let reply = match msg {
                        AgentMessage::Heartbeat => None,
                        AgentMessage::Goodbye { reason } => break Ended::AgentLeft(reason),
                        other => handle(&core, &fingerprint, other),
                    };
                    if let Some(reply) = reply {
                        if let Err(e) = writer.send(&reply).await {
                            break Ended::LinkError(e);
                        }
                        frames_out.inc();
                    }
                }
                Ok(None) => break Ended::AgentLeft("closed the connection".into()),
                Err(e) => break Ended::LinkError(e),
            },
            _ = heartbeat.tick() => {
                if let Err(e) = writer.send(&RelayMessage::Heartbeat).await {
                    break Ended::LinkError(e);
                }
                frames_out.inc();
                core.retry_dispatch(&fingerprint);
            }
            Some(msg) = guard.outbound_rx.recv() => {
                if let Err(e) = writer.send(&msg).await {
                    break Ended::LinkError(e);
                }
                frames_out.inc();
            }
            () = sleep_until(deadline) => break Ended::LinkDead,
            reason = guard.close_rx.recv() => break Ended::Closed(reason.unwrap_or(CloseReason::Shutdown)),
            () = shutdown.cancelled() => break Ended::Closed(CloseReason::Shutdown),
        }
    };

    if let Ended::Closed(reason) = ended {
        let message = match reason {
            CloseReason::Shutdown => "the relay is restarting; reconnect",
            CloseReason::Replaced => "another connection with this agent's key took over",
            CloseReason::Revoked => "this agent's key was revoked; pair again to reconnect",
        };
        let _ = writer
            .send(&RelayMessage::Closing {
                reason,
                message: message.into(),
            })
            .await;
        frames_out.inc();
        close_gently(&mut writer).await;
    }
    match &ended {
        Ended::LinkError(e) => warn!(error = %e, "agent link failed"),
        Ended::LinkDead => warn!(after = ?timing.dead_after, "agent link went silent; dropping it"),
        other => debug!(?other, "session ended"),
    }
    info!("agent disconnected");
}

/// Task traffic from the agent: stored by the core, answered with an acknowledgement when there is one.
fn handle(
    core: &Core,
    agent: &ct_protocol::Fingerprint,
    msg: AgentMessage,
) -> Option<RelayMessage> {
    match msg {
        AgentMessage::Event { task, seq, event } => {
            match core.record_event(agent, &task, seq, event) {
                Ok(Some(seq)) => Some(RelayMessage::Ack { task, seq }),
                Ok(None) => None,
                Err(e) => {
                    // Not acknowledged, so the agent sends it again later; nothing is lost.
                    tracing::error!(%task, seq, error = %e, "could not store a task event");
                    None
                }
            }
        }
        AgentMessage::Running { tasks } => {
            if let Err(e) = core.agent_running(agent, &tasks) {
                tracing::error!(error = %e, "could not reconcile the agent's running tasks");
            }
            None
        }
        AgentMessage::Projects(report) => {
            core.projects_reported(agent, report);
            None
        }
        AgentMessage::ProjectReply { id, reply } => {
            core.project_reply(agent, id, reply);
            None
        }
        AgentMessage::Heartbeat | AgentMessage::Goodbye { .. } => None,
    }
}

/// Ends our sending side. A WebSocket close waits on the peer, which may never answer: bound it.
async fn close_gently<W: AsyncWrite + Unpin>(writer: &mut FrameWriter<W>) {
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), writer.shutdown()).await;
}

fn handshake_result(e: &HandshakeError) -> &'static str {
    match e {
        HandshakeError::Timeout(_) => "timeout",
        HandshakeError::Incompatible(_) => "incompatible",
        HandshakeError::BadSignature(_) | HandshakeError::InvalidKey => "bad_signature",
        HandshakeError::Frame(_) | HandshakeError::Closed => "malformed",
        _ => "failed",
    }
}
