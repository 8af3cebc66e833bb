//! The relay killed (SIGKILL: no drain, no flush) and started again while agents are connected and tasks are
//! streaming output. Agents reconnect as `ct-agent` does (its backoff; QUIC first with WebSocket raced after
//! 500 ms, or WebSocket only where UDP is blocked), re-send what was not acknowledged, and finish their tasks.
//!
//! Figures: when each agent is back, counted from the moment the new relay answers its admin socket; and,
//! read back through the admin socket, whether every task's stored log is complete and contiguous.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Result};
use ct_protocol::task::TaskEvent;
use ct_protocol::Transport;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::agent::{Behaviour, Note, Output};
use crate::dial::{Dial, Identity};
use crate::fleet::Fleet;
use crate::procfs::{self, NetDrops};
use crate::relay::RelayProcess;
use crate::scenario::idle::{transport_for, DIAL_LIMIT};
use crate::stats::Summary;

/// How long after the restart agents and tasks have to come back before the run gives up on them.
const RECOVERY_LIMIT: Duration = Duration::from_secs(60);

/// What the run measured.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub agents: usize,
    /// Kill → new relay answering its admin socket.
    pub restart_time: Duration,
    /// Kill → the agent noticed its session had ended, per transport.
    pub noticed_quic: Summary,
    pub noticed_websocket: Summary,
    /// Relay ready → agent back online (a new session established).
    pub back: Summary,
    pub not_back: usize,
    /// Transports the agents came back on.
    pub back_quic: usize,
    pub back_websocket: usize,
    pub tasks: usize,
    /// Tasks whose every event was acknowledged after the restart.
    pub tasks_done: usize,
    pub events_expected: u64,
    /// Events in the stored logs (distinct sequence numbers).
    pub events_stored: u64,
    /// Tasks whose stored log is not all of 1..=N ending in Finished, with the task done: what was lost.
    pub incomplete: Vec<String>,
    /// Stored logs that are not a contiguous run 1, 2, ..., k (a hole, a repeat, out of order). Losing the
    /// tail of a log is `incomplete`; a log with holes would mean the relay stored events it should not have.
    pub gapped: usize,
    /// What the kernel dropped from the kill until every agent was back (system-wide counters): whether a slow
    /// return was connection attempts lost in the kernel or handshakes slow in the relay.
    pub drops: NetDrops,
}

impl Outcome {
    pub fn events_lost(&self) -> u64 {
        self.events_expected.saturating_sub(self.events_stored)
    }
}

/// Submits a task, retrying for a while if the relay says the agent is offline: an agent whose QUIC and
/// WebSocket attempts both completed sees its losing attempt replace the winner and reconnects at once (as
/// `ct-agent` does), and a submission in that moment is refused, as it would be for a person.
async fn submit_when_online(relay: &RelayProcess, user: &str) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match relay.submit(user, "stream through a restart").await {
            Err(e) if e.to_string().contains("offline") && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => return other,
        }
    }
}

/// Runs `ids` agents (a `quic_share` of them racing QUIC first, the rest WebSocket only) on a freshly started
/// relay, starts `tasks` tasks that stream `texts` Text events `pace` apart, and kills and restarts the relay
/// while they run.
pub async fn run(
    relay: &mut RelayProcess,
    ids: &[Arc<Identity>],
    tasks: usize,
    texts: usize,
    pace: Duration,
    quic_share: f64,
) -> Result<Outcome> {
    relay.stop().await?;
    relay.restart().await?;
    let output = Output {
        texts,
        text_bytes: 120,
        pace,
    };
    let mut fleet = Fleet::default();
    let limit = Arc::new(Semaphore::new(DIAL_LIMIT));
    for (i, who) in ids.iter().enumerate() {
        let dial = match transport_for(i, ids.len(), quic_share) {
            Dial::Quic => Dial::Race,
            other => other,
        };
        let how = Behaviour {
            dial,
            output: output.clone(),
            reconnect: true,
            dial_limit: Some(limit.clone()),
        };
        fleet.spawn(i, who.clone(), relay.target.clone(), how);
    }
    let mut transport = fleet
        .wait_online(ids.len(), Duration::from_secs(60 + ids.len() as u64 / 50))
        .await?;

    // Tasks go in through the admin socket, as an operator (or the bot) would submit them.
    let mut task_ids = Vec::new();
    for who in ids.iter().take(tasks) {
        task_ids.push(submit_when_online(relay, &who.user).await?);
    }
    let mut started = HashSet::new();
    let mut done = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while started.len() < tasks {
        match fleet.next_note(deadline).await {
            Some(Note::Started { task, .. }) => {
                started.insert(task);
            }
            Some(Note::Online {
                agent,
                transport: t,
                ..
            }) => {
                transport.insert(agent, t);
            }
            Some(_) => {}
            None => bail!("only {} of {tasks} tasks started", started.len()),
        }
    }
    // Kill mid-stream: every task has output stored, acknowledged, and still to come.
    let run_for = pace * texts as u32;
    tokio::time::sleep(run_for / 3).await;

    let drops_before = procfs::net_drops()?;
    let killed = Instant::now();
    relay.kill().await?;
    let ready = relay.restart().await?;

    let mut noticed: HashMap<usize, Instant> = HashMap::new();
    let mut back: HashMap<usize, (Instant, Transport)> = HashMap::new();
    let mut deadline = ready + RECOVERY_LIMIT;
    let mut drops = None;
    while back.len() < ids.len() || done.len() < tasks {
        if back.len() == ids.len() {
            // Everyone is back: the tasks need at most their remaining output time. One that does not finish
            // by then has a gap in its log that nobody can fill; waiting longer would not change that.
            deadline = deadline.min(Instant::now().max(ready + run_for) + Duration::from_secs(5));
        }
        match fleet.next_note(deadline).await {
            Some(Note::Offline { agent, at }) if at >= killed => {
                noticed.entry(agent).or_insert(at);
            }
            Some(Note::Online {
                agent,
                transport: t,
                at,
                ..
            }) if at >= killed => {
                back.entry(agent).or_insert((at, t));
            }
            Some(Note::Done { task, .. }) => {
                done.insert(task);
            }
            Some(Note::Refused { agent, error }) => bail!("agent {agent} was refused: {error}"),
            Some(_) => {}
            None => break,
        }
        if back.len() == ids.len() && drops.is_none() {
            drops = Some(procfs::net_drops()?.since(&drops_before));
        }
    }
    // Not everyone came back: the window ran to the deadline.
    let drops = match drops {
        Some(d) => d,
        None => procfs::net_drops()?.since(&drops_before),
    };

    let mut events_stored = 0;
    let mut incomplete = Vec::new();
    let mut gapped = 0;
    for task in &task_ids {
        let (events, state) = relay.follow(task, Duration::from_secs(2)).await?;
        let seqs: Vec<u64> = events.iter().map(|(s, _)| *s).collect();
        let distinct: HashSet<u64> = seqs.iter().copied().collect();
        events_stored += distinct.len() as u64;
        if seqs != (1..=seqs.len() as u64).collect::<Vec<_>>() {
            gapped += 1;
        }
        let complete = seqs == (1..=output.events()).collect::<Vec<_>>()
            && matches!(events.last(), Some((_, TaskEvent::Finished { .. })))
            && state.as_deref() == Some("Done");
        if !complete {
            incomplete.push(format!(
                "{task}: {} events stored (expected {}), state {}",
                distinct.len(),
                output.events(),
                state.as_deref().unwrap_or("not ended")
            ));
        }
    }
    fleet.stop().await;

    let noticed_by = |want: Transport| {
        Summary::of(
            noticed
                .iter()
                .filter(|(a, _)| transport.get(a) == Some(&want))
                .map(|(_, at)| at.duration_since(killed))
                .collect(),
        )
    };
    Ok(Outcome {
        agents: ids.len(),
        restart_time: ready.duration_since(killed),
        noticed_quic: noticed_by(Transport::Quic),
        noticed_websocket: noticed_by(Transport::WebSocket),
        back: Summary::of(
            back.values()
                .map(|(at, _)| at.saturating_duration_since(ready))
                .collect(),
        ),
        not_back: ids.len() - back.len(),
        back_quic: back.values().filter(|(_, t)| *t == Transport::Quic).count(),
        back_websocket: back
            .values()
            .filter(|(_, t)| *t == Transport::WebSocket)
            .count(),
        tasks,
        tasks_done: done.len(),
        events_expected: output.events() * tasks as u64,
        events_stored,
        incomplete,
        gapped,
        drops,
    })
}
