//! Dispatch latency: from the moment a front end calls `Core::submit_task` to the moment the agent has decoded
//! the `StartTask`, at a steady submission rate spread over many connected agents.
//!
//! The relay library runs in this process so both instants are read from one clock. Its agents still reach it
//! over real loopback QUIC and WebSocket connections; the submitter is a thread of its own, as a Discord
//! front end's handler would be.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Result};
use ct_relay::tasks::Submit;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::agent::{Behaviour, Note, Output};
use crate::fleet::{self, Fleet};
use crate::relay::InProcessRelay;
use crate::scenario::idle::{transport_for, DIAL_LIMIT};
use crate::stats::Summary;

/// What the run measured.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub agents: usize,
    pub submitted: usize,
    pub refused: usize,
    /// Tasks whose `StartTask` reached their agent.
    pub started: usize,
    /// Tasks whose every event the relay acknowledged.
    pub done: usize,
    /// Submissions per second actually achieved (the submitter falls behind if a submit is slow).
    pub achieved_rate: f64,
    /// Submit call → `StartTask` decoded by the agent.
    pub latency: Summary,
    /// The `submit_task` call alone (store writes and the flush included).
    pub submit_call: Summary,
}

/// Runs `agents` agents (a `quic_share` over QUIC) on an in-process relay and submits `rate` tasks per second
/// for `duration`, round robin.
pub async fn run(
    dir: &Path,
    agents: usize,
    rate: u32,
    duration: Duration,
    quic_share: f64,
) -> Result<Outcome> {
    let relay = InProcessRelay::start(dir).await?;
    let core = relay.core.clone();
    let ids = fleet::pair(&relay.target, 0, agents, crate::dial::Dial::Quic, |user| {
        let core = core.clone();
        async move { Ok(core.mint_pairing_token(&user).await?.0) }
    })
    .await?;
    let mut fleet = Fleet::default();
    let limit = Arc::new(Semaphore::new(DIAL_LIMIT));
    for (i, who) in ids.iter().enumerate() {
        let how = Behaviour {
            dial: transport_for(i, agents, quic_share),
            output: Output {
                texts: 3,
                text_bytes: 200,
                pace: Duration::ZERO,
            },
            reconnect: true,
            dial_limit: Some(limit.clone()),
        };
        fleet.spawn(i, who.clone(), relay.target.clone(), how);
    }
    fleet
        .wait_online(agents, Duration::from_secs(60 + agents as u64 / 50))
        .await?;
    // Let the connect burst's handshakes and reports drain before timing anything.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let total = (rate as f64 * duration.as_secs_f64()).round() as usize;
    let users: Vec<String> = ids.iter().map(|w| w.user.clone()).collect();
    let submit_core = relay.core.clone();
    // Submits at a steady rate, as front ends would: each submit awaits the core (and its task's flush).
    let submitter = tokio::spawn(async move {
        let start = Instant::now();
        let every = Duration::from_secs_f64(1.0 / rate as f64);
        let mut sent = Vec::with_capacity(total);
        let mut refused = 0;
        for k in 0..total {
            tokio::time::sleep_until(start + every * k as u32).await;
            let t0 = Instant::now();
            let req = Submit {
                user: users[k % users.len()].clone(),
                project: "/srv/bench".into(),
                prompt: format!("benchmark task {k}"),
                ..Default::default()
            };
            match submit_core.submit_task(req).await {
                Ok(rec) => sent.push((rec.spec.task, t0, t0.elapsed())),
                Err(e) => {
                    refused += 1;
                    tracing::warn!(error = %e, "submit refused");
                }
            }
        }
        (sent, refused, start.elapsed())
    });

    let mut started: HashMap<String, Instant> = HashMap::new();
    let mut done = 0;
    let deadline = Instant::now() + duration + Duration::from_secs(30);
    // Submission ends within `duration` (plus any lag); every task is short, so all should be done soon after.
    while done < total {
        match fleet.next_note(deadline).await {
            Some(Note::Started { task, at, .. }) => {
                started.insert(task, at);
            }
            Some(Note::Done { .. }) => done += 1,
            Some(Note::Refused { error, .. }) => anyhow::bail!("an agent was refused: {error}"),
            Some(_) => {}
            None => break,
        }
    }
    let (sent, refused, took) = submitter.await?;
    fleet.stop().await;
    relay.stop().await?;

    let latency = sent
        .iter()
        .filter_map(|(task, t0, _)| started.get(task).map(|at| at.duration_since(*t0)))
        .collect();
    ensure!(refused == 0, "{refused} submissions were refused");
    Ok(Outcome {
        agents,
        submitted: sent.len(),
        refused,
        started: sent
            .iter()
            .filter(|(t, _, _)| started.contains_key(t))
            .count(),
        done,
        achieved_rate: sent.len() as f64 / took.as_secs_f64(),
        latency: Summary::of(latency),
        submit_call: Summary::of(sent.iter().map(|(_, _, d)| *d).collect()),
    })
}
