//! A simulated agent: one real connection with a real handshake, heartbeats on the agent's timing, and
//! synthetic Claude Code output for every task the relay starts. It keeps task events in `ct-agent`'s own
//! outbox (sent again after a reconnect until acknowledged), reports its running tasks after each
//! handshake, and reconnects with `ct-agent`'s own backoff, so the relay cannot tell it from a real agent
//! except by how little it costs to run ten thousand of them. Given a cluster's nodes, it tries them in turn as
//! `ct-agent` tries the addresses of its pairing token: the node it last held a session on goes last and the
//! others are shuffled, and a QUIC node whose transport falls silent is left after `suspect_after` as
//! `ct-agent` leaves it.
//!
//! What it observed goes out as [`Note`]s on a channel; scenarios turn those into figures.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ct_agent::backoff::Backoff;
use ct_agent::outbox::Outbox;
use ct_protocol::handshake::HANDSHAKE_TIMEOUT;
use ct_protocol::link::{watches_transport, TransportSilence, SILENCE_POLL};
use ct_protocol::message::CloseReason;
use ct_protocol::project::ProjectsReport;
use ct_protocol::task::{FinalState, TaskEvent};
use ct_protocol::{AgentMessage, FrameError, RelayMessage, Transport};
use tokio::sync::{mpsc, Semaphore};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::dial::{dial, Dial, Identity, Link, Target};

/// Messages sent per turn of the session loop before it looks at what arrived, so a long burst of task output
/// never stops us reading the acknowledgements the relay sends back.
const SEND_BATCH: usize = 64;

/// The Claude Code output every task produces: `Started`, `Session`, `texts` Text events of `text_bytes`
/// bytes each, `TurnFinished`, `Finished`.
#[derive(Debug, Clone)]
pub struct Output {
    pub texts: usize,
    pub text_bytes: usize,
    /// Time between Text events; zero produces everything at once (bounded by the outbox).
    pub pace: Duration,
}

impl Output {
    /// Events per task, all kinds included.
    pub fn events(&self) -> u64 {
        self.texts as u64 + 4
    }

    fn event(&self, seq: u64, filler: &str) -> TaskEvent {
        let texts = self.texts as u64;
        match seq {
            1 => TaskEvent::Started {
                cwd: "/srv/bench".into(),
            },
            2 => TaskEvent::Session {
                session_id: "00000000-0000-4000-8000-000000000000".into(),
                model: Some("synthetic".into()),
                claude_version: None,
            },
            s if s <= texts + 2 => TaskEvent::Text {
                text: filler.into(),
            },
            s if s == texts + 3 => TaskEvent::TurnFinished {
                is_error: false,
                subtype: "success".into(),
                text: None,
                cost_usd: Some(0.0),
                turns: Some(1),
                input_tokens: Some(1),
                output_tokens: Some(texts),
                duration_ms: None,
            },
            _ => TaskEvent::Finished {
                state: FinalState::Done,
                message: None,
            },
        }
    }

    /// When event `seq` of a task started at `start` is due.
    fn due(&self, seq: u64, start: Instant) -> Instant {
        let texts_before = seq.saturating_sub(2).min(self.texts as u64) as u32;
        start + self.pace * texts_before
    }
}

/// What an agent saw, for the scenario that runs it.
#[derive(Debug, Clone)]
pub enum Note {
    /// A session was established.
    Online {
        agent: usize,
        transport: Transport,
        /// The relay (node) the session is with.
        relay: SocketAddr,
        at: Instant,
    },
    /// The session ended (the agent reconnects unless it was told to stop).
    Offline { agent: usize, at: Instant },
    /// A `StartTask` arrived.
    Started {
        agent: usize,
        task: String,
        at: Instant,
    },
    /// Every event of the task, `Finished` included, was acknowledged.
    Done {
        agent: usize,
        task: String,
        events: u64,
        at: Instant,
    },
    /// The agent stopped for good (refused by the relay); scenarios treat this as a failure.
    Refused { agent: usize, error: String },
}

/// How one simulated agent behaves.
#[derive(Debug, Clone)]
pub struct Behaviour {
    pub dial: Dial,
    pub output: Output,
    /// Reconnect after a lost session (with `ct-agent`'s backoff), or stop.
    pub reconnect: bool,
    /// Caps first connections in flight across a fleet, so a benchmark's start does not arrive as one burst
    /// of 10,000 handshakes (real fleets come online over minutes). Reconnects never wait for it: a
    /// reconnect storm is one of the things measured.
    pub dial_limit: Option<Arc<Semaphore>>,
}

/// A task being "run": its output comes out over time, into the outbox.
#[derive(Debug)]
struct Running {
    start: Instant,
    produced: u64,
}

/// Why a session ended.
enum End {
    Shutdown,
    RelayRestarting,
    Lost,
    /// Another session with this key took over.
    Replaced(String),
    Refused(String),
}

/// Runs agent `index` until `shutdown`, or until the relay refuses it for good. `targets` are the relay's
/// nodes in the order this agent tries them first (one, for a relay of one).
pub async fn run(
    index: usize,
    who: Arc<Identity>,
    mut targets: Vec<Arc<Target>>,
    how: Behaviour,
    notes: mpsc::UnboundedSender<Note>,
    shutdown: CancellationToken,
) {
    let mut agent = Agent {
        index,
        how,
        notes,
        outbox: Outbox::default(),
        running: HashMap::new(),
        filler: String::new(),
    };
    agent.filler = filler(agent.how.output.text_bytes);
    let mut backoff = Backoff::default();
    let mut first = true;
    loop {
        let attempt = {
            let _permit = match (&agent.how.dial_limit, first) {
                (Some(limit), true) => Some(limit.clone().acquire_owned().await),
                _ => None,
            };
            tokio::select! {
                () = shutdown.cancelled() => return,
                r = dial_any(&targets, &who, agent.how.dial) => r,
            }
        };
        match attempt {
            Err(e) if e.permanent => {
                let _ = agent.notes.send(Note::Refused {
                    agent: index,
                    error: e.to_string(),
                });
                return;
            }
            Err(e) => tracing::debug!(agent = index, error = %e, "dial failed"),
            Ok((at, link)) => {
                first = false;
                // As `ct-agent` does: the node of this session goes last, so when it goes away the next
                // attempt goes to the others at once, and the others are shuffled, so a dead node's agents
                // spread over the survivors instead of all landing on the next one in the list.
                let relay = targets.remove(at);
                let addr = relay.addr;
                {
                    use rand::seq::SliceRandom as _;
                    targets.shuffle(&mut rand::thread_rng());
                }
                targets.push(relay);
                let elsewhere = watches_transport(targets.len());
                let connected = Instant::now();
                let _ = agent.notes.send(Note::Online {
                    agent: index,
                    transport: link.transport,
                    relay: addr,
                    at: connected,
                });
                let raced = link.raced;
                let end = match agent.session(link, &shutdown, elsewhere).await {
                    // Our own losing race attempt completed at the relay after the winner, as `ct-agent`
                    // knows can happen: reconnect, as it does.
                    End::Replaced(_) if raced && connected.elapsed() < 2 * HANDSHAKE_TIMEOUT => {
                        End::Lost
                    }
                    End::Replaced(message) => End::Refused(message),
                    other => other,
                };
                let _ = agent.notes.send(Note::Offline {
                    agent: index,
                    at: Instant::now(),
                });
                backoff.session_ended(connected.elapsed());
                match end {
                    End::Shutdown => return,
                    End::Refused(error) | End::Replaced(error) => {
                        let _ = agent.notes.send(Note::Refused {
                            agent: index,
                            error,
                        });
                        return;
                    }
                    End::RelayRestarting => backoff.reset(),
                    End::Lost => {}
                }
                if !agent.how.reconnect {
                    return;
                }
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(backoff.next_delay()) => {}
        }
    }
}

/// One connection attempt over every node in turn, as `ct-agent`'s `connect_any`: the first that answers
/// wins (with its position in `targets`); a refusal ends the attempt, since every node would refuse alike.
async fn dial_any(
    targets: &[Arc<Target>],
    who: &Identity,
    how: Dial,
) -> Result<(usize, Link), crate::dial::DialError> {
    let mut last = None;
    for (at, target) in targets.iter().enumerate() {
        match dial(target, who, how, None).await {
            Ok(link) => return Ok((at, link)),
            Err(e) if e.permanent => return Err(e),
            Err(e) => last = Some(e),
        }
    }
    Err(last.expect("a relay has at least one node"))
}

struct Agent {
    index: usize,
    how: Behaviour,
    notes: mpsc::UnboundedSender<Note>,
    outbox: Outbox,
    running: HashMap<String, Running>,
    /// The text every Text event carries: plain ASCII, so JSON does not inflate it.
    filler: String,
}

impl Agent {
    /// One session: what `ct-agent` sends after a handshake (unacknowledged events again, then its running
    /// tasks and its projects), then heartbeats, task output and acknowledgements until the link ends.
    /// `elsewhere`: there is another node to go to, so a silent QUIC transport ends the session after
    /// `suspect_after`, as in `ct-agent`'s `run_session`.
    async fn session(
        &mut self,
        mut link: Link,
        shutdown: &CancellationToken,
        elsewhere: bool,
    ) -> End {
        let timing = link.transport.timing();
        macro_rules! send {
            ($msg:expr) => {
                match tokio::time::timeout(timing.dead_after, link.writer.send($msg)).await {
                    Ok(Ok(())) => {}
                    _ => return End::Lost,
                }
            };
        }
        self.outbox.rewind();
        let mut hello = self.outbox.take_unsent();
        hello.push(AgentMessage::Running {
            tasks: self.outbox.running(),
        });
        hello.push(AgentMessage::Projects(ProjectsReport::default()));
        for msg in &hello {
            send!(msg);
        }
        let every = Duration::from_millis(link.welcome.heartbeat_ms)
            .max(Duration::from_millis(100))
            .min(timing.heartbeat);
        let mut heartbeat = tokio::time::interval_at(Instant::now() + every, every);
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut last_heard = Instant::now();
        let mut unsent = Vec::new();
        let watching = elsewhere && link.datagrams_received().is_some();
        let mut silence = TransportSilence::new(timing.suspect_after, Instant::now());
        let mut poll = tokio::time::interval(SILENCE_POLL);
        poll.set_missed_tick_behavior(MissedTickBehavior::Delay);

        loop {
            if unsent.is_empty() {
                self.produce(Instant::now());
                unsent = self.outbox.take_unsent();
                unsent.reverse();
            }
            let next_due = self.next_due();
            tokio::select! {
                biased;
                () = shutdown.cancelled() => {
                    link.close("load generator stopping").await;
                    return End::Shutdown;
                }
                received = link.reader.recv::<RelayMessage>() => {
                    last_heard = Instant::now();
                    match received {
                        Ok(Some(msg)) => {
                            if let Some(end) = self.handle(msg) {
                                return end;
                            }
                        }
                        Ok(None) | Err(FrameError::Malformed(_)) | Err(_) => return End::Lost,
                    }
                }
                () = std::future::ready(()), if !unsent.is_empty() => {
                    for _ in 0..SEND_BATCH {
                        let Some(msg) = unsent.pop() else { break };
                        send!(&msg);
                    }
                }
                _ = heartbeat.tick() => send!(&AgentMessage::Heartbeat),
                _ = poll.tick(), if watching => {
                    let received = link.datagrams_received().unwrap_or_default();
                    if silence.silent(received, Instant::now()) {
                        // Dropping the link closes the QUIC connection before the next dial, as `ct-agent`.
                        return End::Lost;
                    }
                }
                () = tokio::time::sleep_until(next_due.unwrap_or_else(far_future)), if next_due.is_some() => {}
                () = tokio::time::sleep_until(last_heard + timing.dead_after) => return End::Lost,
            }
        }
    }

    /// Handles one relay message; `Some` ends the session.
    fn handle(&mut self, msg: RelayMessage) -> Option<End> {
        match msg {
            RelayMessage::StartTask(spec) => {
                let at = Instant::now();
                let _ = self.notes.send(Note::Started {
                    agent: self.index,
                    task: spec.task.clone(),
                    at,
                });
                self.running.entry(spec.task).or_insert(Running {
                    start: at,
                    produced: 0,
                });
            }
            RelayMessage::Ack { task, seq } => {
                self.outbox.ack(&task, seq);
                let total = self.how.output.events();
                if seq >= total && !self.outbox.knows(&task) && self.running.remove(&task).is_some()
                {
                    let _ = self.notes.send(Note::Done {
                        agent: self.index,
                        task,
                        events: total,
                        at: Instant::now(),
                    });
                }
            }
            RelayMessage::CancelTask { task } => {
                if let Some(run) = self.running.get_mut(&task) {
                    // Stop producing output and end the task as cancelled, as Claude Code would be interrupted.
                    run.produced = self.how.output.events();
                    self.outbox.push(
                        &task,
                        TaskEvent::Finished {
                            state: FinalState::Cancelled,
                            message: None,
                        },
                    );
                }
            }
            RelayMessage::Closing { reason, message } => {
                return Some(match reason {
                    CloseReason::Shutdown => End::RelayRestarting,
                    CloseReason::Replaced => End::Replaced(message),
                    CloseReason::Revoked => End::Refused(message),
                });
            }
            RelayMessage::Heartbeat
            | RelayMessage::FilePart(_)
            | RelayMessage::TaskInput { .. }
            | RelayMessage::Decide { .. }
            | RelayMessage::Project { .. }
            | RelayMessage::Worktree { .. } => {}
        }
        None
    }

    /// Moves every event that is due into the outbox, unless the outbox is full (as a real agent stops
    /// reading Claude Code's output until acknowledgements arrive).
    fn produce(&mut self, now: Instant) {
        let output = &self.how.output;
        for (task, run) in &mut self.running {
            while run.produced < output.events()
                && output.due(run.produced + 1, run.start) <= now
                && !self.outbox.is_full()
            {
                run.produced += 1;
                self.outbox
                    .push(task, output.event(run.produced, &self.filler));
            }
        }
    }

    /// When the next paced event is due, if any task is still producing.
    fn next_due(&self) -> Option<Instant> {
        let output = &self.how.output;
        self.running
            .values()
            .filter(|r| r.produced < output.events())
            .map(|r| output.due(r.produced + 1, r.start))
            .min()
    }
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(3600)
}

fn filler(len: usize) -> String {
    const LINE: &str =
        "the quick brown fox jumps over the lazy dog; fn main() { println!(\"ok\") }\\n";
    LINE.bytes()
        .filter(|b| *b != b'\\' && *b != b'"')
        .cycle()
        .take(len)
        .map(char::from)
        .collect()
}
