//! One agent session, whatever carries it: handshake, admission, then heartbeats and messages until the
//! link dies, the agent leaves, or the core closes it (revoked, replaced, shutdown).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use ct_protocol::frame::{FrameError, FrameReader, FrameWriter};
use ct_protocol::handshake::{self, HandshakeError, Rejection, Verdict};
use ct_protocol::message::{AgentMessage, CloseReason, RelayMessage};
use ct_protocol::Transport;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::{interval_at, sleep_until, Instant, Interval, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use crate::core::{Core, CoreError, SessionGuard};
use crate::durable::Ticket;

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
pub async fn run<R, W>(core: Core, reader: R, writer: W, link: Link, shutdown: CancellationToken)
where
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
            core.metrics()
                .handshake(link.transport, handshake_result(&e));
            info!(peer = %link.peer, transport = %link.transport, error = %e, "handshake failed");
            return;
        }
    };
    let welcome = match core.admit(&verified, link.peer.ip()).await {
        Ok(w) => w,
        Err((reason, message)) => {
            core.metrics().handshake(link.transport, "rejected");
            info!(peer = %link.peer, fingerprint = %verified.fingerprint, ?reason, "agent refused");
            let _ = writer.send(&Verdict::Rejected { reason, message }).await;
            close_gently(&mut writer).await;
            return;
        }
    };
    let timing = link.transport.timing();
    let welcome = ct_protocol::handshake::Welcome {
        heartbeat_ms: timing.heartbeat.as_millis() as u64,
        // This relay stores tool results whole (within the task's output cap) and its bot shows them.
        tool_output: true,
        ..welcome
    };
    // The agent counts itself connected the moment it reads the Welcome (`ct-agent status` says so, and its
    // owner may submit a task at once), so it must already be in the live table by then: registered first, a
    // task submitted in between is queued for this session and goes out after the Welcome. If the Welcome
    // cannot be sent, dropping the guard takes the session out again.
    let guard = match core
        .register_session(
            verified.fingerprint,
            link.transport,
            link.peer,
            &verified.software,
            welcome.owner.clone(),
        )
        .await
    {
        Ok(guard) => guard,
        Err(e) => {
            let message = e.to_string();
            let reason = match e {
                CoreError::Revoked(_) => Rejection::Revoked,
                _ => Rejection::Unavailable,
            };
            let _ = writer.send(&Verdict::Rejected { reason, message }).await;
            close_gently(&mut writer).await;
            return;
        }
    };
    if let Err(e) = writer.send(&Verdict::Welcome(welcome.clone())).await {
        info!(peer = %link.peer, error = %e, "agent left during the handshake");
        return;
    }
    core.metrics().handshake(link.transport, "ok");
    let span = tracing::info_span!("agent", name = %welcome.agent_name, owner = %welcome.owner, transport = %link.transport);
    info!(parent: &span, peer = %link.peer, fingerprint = %verified.fingerprint, paired = welcome.paired, "agent connected");
    live(
        core,
        reader,
        writer,
        link,
        guard,
        verified.fingerprint,
        shutdown,
    )
    .instrument(span)
    .await
}

/// The established session: heartbeats out, messages in, until something ends it.
async fn live<R, W>(
    core: Core,
    mut reader: FrameReader<R>,
    mut writer: FrameWriter<W>,
    link: Link,
    mut guard: SessionGuard,
    fingerprint: ct_protocol::Fingerprint,
    shutdown: CancellationToken,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let timing = link.transport.timing();
    // Tasks queued while the agent was away go out now, as far as its free slots allow.
    core.agent_connected(fingerprint).await;
    let (frames_in, frames_out) = core.metrics().frames(link.transport);
    let mut heartbeat = interval_at(Instant::now() + timing.heartbeat, timing.heartbeat);
    heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut deadline = Instant::now() + timing.dead_after;
    let mut acks = Acks::default();

    let ended = loop {
        acks.seal();
        let flushing = acks.flushing();
        tokio::select! {
            msg = reader.recv::<AgentMessage>() => match msg {
                Ok(Some(msg)) => {
                    frames_in.inc();
                    deadline = Instant::now() + timing.dead_after;
                    // Task output comes in bursts: the events that have already arrived whole are stored
                    // together, one write per task, before whatever message follows them.
                    let mut events = Vec::new();
                    let mut next = Some(msg);
                    let mut failed = None;
                    while let Some(AgentMessage::Event { task, seq, event }) = next.take_if(is_event) {
                        events.push((task, seq, event));
                        if events.len() >= MAX_BURST {
                            break;
                        }
                        match reader.recv_buffered::<AgentMessage>() {
                            Ok(Some(more)) => {
                                frames_in.inc();
                                next = Some(more);
                            }
                            Ok(None) => {}
                            Err(e) => failed = Some(e),
                        }
                    }
                    let stored = store_events(&core, fingerprint, events, &mut acks);
                    match beating(&mut writer, &mut heartbeat, stored).await {
                        Ok(((), spent)) => deadline += spent,
                        Err(e) => break Ended::LinkError(e),
                    }
                    if let Some(e) = failed {
                        break Ended::LinkError(e);
                    }
                    match next {
                        None | Some(AgentMessage::Heartbeat) => {}
                        Some(AgentMessage::Goodbye { reason }) => break Ended::AgentLeft(reason),
                        Some(other) => {
                            let handled = handle(&core, fingerprint, other);
                            match beating(&mut writer, &mut heartbeat, handled).await {
                                Ok(((), spent)) => deadline += spent,
                                Err(e) => break Ended::LinkError(e),
                            }
                        }
                    }
                }
                Ok(None) => break Ended::AgentLeft("closed the connection".into()),
                Err(e) => break Ended::LinkError(e),
            },
            flushed = durable(&core, flushing), if flushing.is_some() => {
                if flushed.is_err() {
                    // The events were not kept: the agent sends them again on its next connection.
                    break Ended::Closed(CloseReason::Shutdown);
                }
                let mut failed = None;
                for (task, seq) in acks.released() {
                    if let Err(e) = writer.send(&RelayMessage::Ack { task, seq }).await {
                        failed = Some(e);
                        break;
                    }
                    frames_out.inc();
                }
                if let Some(e) = failed {
                    break Ended::LinkError(e);
                }
            }
            _ = heartbeat.tick() => {
                if let Err(e) = writer.send(&RelayMessage::Heartbeat).await {
                    break Ended::LinkError(e);
                }
                frames_out.inc();
                if guard.dispatch_waiting() {
                    match beating(&mut writer, &mut heartbeat, core.retry_dispatch(fingerprint)).await {
                        Ok(((), spent)) => deadline += spent,
                        Err(e) => break Ended::LinkError(e),
                    }
                }
            }
            Some(mut out) = guard.outbound_rx.recv() => {
                // A task start waits until the record saying it was sent is on disk (see `Outbound`).
                if let Some(ticket) = out.after {
                    if core.commit().durable(ticket).await.is_err() {
                        // Never sent: after the restart the agent's report decides what became of it.
                        break Ended::Closed(CloseReason::Shutdown);
                    }
                }
                // Files first, in order, on the same stream: the agent hands them to the message that follows.
                let mut sent = Ok(());
                let had_files = !out.parts.is_empty();
                for part in std::mem::take(&mut out.parts).into_iter().map(RelayMessage::FilePart) {
                    sent = writer.send(&part).await;
                    if sent.is_err() {
                        break;
                    }
                    frames_out.inc();
                }
                if let Err(e) = sent {
                    break Ended::LinkError(e);
                }
                if let Err(e) = writer.send(&out.msg).await {
                    break Ended::LinkError(e);
                }
                frames_out.inc();
                if let (RelayMessage::StartTask(spec), true) = (&out.msg, had_files) {
                    core.files_delivered(spec.task.clone()).await;
                }
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

/// Awaits `work`, a call into the core, while still sending the agent its heartbeats. An overloaded node can
/// take seconds to answer; without heartbeats meanwhile its agents took it for dead and reconnected, and every
/// reconnect added to the load (BENCHMARKS.md, runs K and L: 20-31 links dropped under load). Returns how long
/// it took: the caller adds that to the agent's deadline, since nothing the agent sent was read meanwhile.
async fn beating<W: AsyncWrite + Unpin, T>(
    writer: &mut FrameWriter<W>,
    heartbeat: &mut Interval,
    work: impl std::future::Future<Output = T>,
) -> Result<(T, Duration), FrameError> {
    let began = Instant::now();
    tokio::pin!(work);
    loop {
        tokio::select! {
            biased;
            out = &mut work => return Ok((out, began.elapsed())),
            _ = heartbeat.tick() => writer.send(&RelayMessage::Heartbeat).await?,
        }
    }
}

/// Events stored in one go at most. What one read brought bounds a burst's bytes already; this bounds the
/// time between two looks at the rest of the session (heartbeats, the core's messages).
const MAX_BURST: usize = 512;

fn is_event(msg: &mut AgentMessage) -> bool {
    matches!(msg, AgentMessage::Event { .. })
}

/// Hands a burst of events to the core, each task's consecutive run together, and notes what to acknowledge.
async fn store_events(
    core: &Core,
    agent: ct_protocol::Fingerprint,
    events: Vec<(String, u64, ct_protocol::task::TaskEvent)>,
    acks: &mut Acks,
) {
    let mut runs: Vec<crate::core::events::Run> = Vec::new();
    for (task, seq, event) in events {
        match runs.last_mut() {
            Some((last, run)) if *last == task => run.push((seq, event)),
            _ => runs.push((task, vec![(seq, event)])),
        }
    }
    match core.record_events(agent, runs).await {
        Ok(recorded) => acks.stored(recorded),
        // Not acknowledged, so the agent sends them again later; nothing is lost.
        Err(e) => tracing::error!(error = %e, "could not store task events"),
    }
}

/// Acknowledgements of stored events, sent only once the store has flushed them (see [`crate::durable`]):
/// an agent forgets what is acknowledged, so an acknowledgement the relay could still lose in a crash would
/// lose output. Events that arrive while one flush is under way are acknowledged together after the next.
#[derive(Debug, Default)]
struct Acks {
    /// Stored, not yet waited for: task → highest sequence number stored.
    next: HashMap<String, u64>,
    /// The ticket covering everything in `next` (the latest the core gave: tickets only grow).
    next_ticket: Option<Ticket>,
    /// Covered by a ticket, waiting for its flush.
    waiting: Option<(Ticket, HashMap<String, u64>)>,
}

impl Acks {
    fn stored(&mut self, recorded: crate::core::events::Recorded) {
        for (task, seq) in recorded.acks {
            let top = self.next.entry(task).or_default();
            *top = (*top).max(seq);
        }
        self.next_ticket = self.next_ticket.max(recorded.ticket);
    }

    /// Starts waiting for what was stored since the last wait, if nothing is waiting already. The core took
    /// the ticket after those writes, so its flush covers them.
    fn seal(&mut self) {
        if self.waiting.is_some() || self.next.is_empty() {
            return;
        }
        if let Some(ticket) = self.next_ticket.take() {
            self.waiting = Some((ticket, std::mem::take(&mut self.next)));
        }
    }

    fn flushing(&self) -> Option<Ticket> {
        self.waiting.as_ref().map(|(t, _)| *t)
    }

    /// The acknowledgements whose flush completed.
    fn released(&mut self) -> impl Iterator<Item = (String, u64)> {
        self.waiting.take().into_iter().flat_map(|(_, acks)| acks)
    }
}

/// Resolves when `ticket` is durable (or never will be); never without one (its `select!` branch is disabled
/// then).
async fn durable(core: &Core, ticket: Option<Ticket>) -> Result<(), crate::durable::Broken> {
    match ticket {
        Some(t) => core.commit().durable(t).await,
        None => std::future::pending().await,
    }
}

/// Other traffic from the agent: its running tasks and projects, handed to the core.
async fn handle(core: &Core, agent: ct_protocol::Fingerprint, msg: AgentMessage) {
    match msg {
        AgentMessage::Running { tasks } => {
            if let Err(e) = core.agent_running(agent, tasks).await {
                tracing::error!(error = %e, "could not reconcile the agent's running tasks");
            }
        }
        AgentMessage::Projects(report) => core.projects_reported(agent, report).await,
        AgentMessage::ProjectReply { id, reply } => {
            core.answer(agent, id, crate::projects::Answer::Project(reply))
                .await
        }
        AgentMessage::WorktreeReply { id, outcome } => {
            core.answer(agent, id, crate::projects::Answer::Worktree(outcome))
                .await
        }
        // The session loop itself deals with these.
        AgentMessage::Event { .. } | AgentMessage::Heartbeat | AgentMessage::Goodbye { .. } => {}
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

#[cfg(test)]
mod tests {
    use super::*;

    /// While the core takes its time, the agent still hears a heartbeat every period, and the time spent is
    /// handed back so it is not counted as the agent's silence.
    #[tokio::test(start_paused = true)]
    async fn a_slow_core_call_does_not_silence_the_session() {
        let (ours, theirs) = tokio::io::duplex(4096);
        let mut writer = FrameWriter::new(ours);
        let mut reader = FrameReader::new(theirs);
        let every = Duration::from_secs(1);
        let mut heartbeat = interval_at(Instant::now() + every, every);
        let slow = async {
            tokio::time::sleep(Duration::from_millis(3500)).await;
            7
        };
        let (out, spent) = beating(&mut writer, &mut heartbeat, slow).await.unwrap();
        assert_eq!(out, 7);
        assert_eq!(spent, Duration::from_millis(3500));
        drop(writer);
        let mut beats = 0;
        while let Some(msg) = reader.recv::<RelayMessage>().await.unwrap() {
            assert!(matches!(msg, RelayMessage::Heartbeat), "{msg:?}");
            beats += 1;
        }
        assert_eq!(beats, 3, "one at 1 s, 2 s and 3 s");
    }
}
