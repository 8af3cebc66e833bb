//! Task events through the relay: agents stream synthetic Claude Code output as fast as the protocol lets
//! them (cumulative acknowledgements, `ct-agent`'s outbox bound), the relay stores every event, and a follower
//! per task (`Core::follow`, as the Discord bot will use it) receives every one, in order.
//!
//! The clock starts when the first task is submitted and stops when the last follower has the last event.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use ct_protocol::task::TaskEvent;
use ct_relay::core::Core;
use ct_relay::relay::ClusterConfig;
use ct_relay::tasks::Submit;
use tokio::sync::broadcast::error::RecvError;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::agent::{Behaviour, Output};
use crate::dial::Dial;
use crate::fleet::{self, Fleet};
use crate::relay::InProcessRelay;

/// What one run measured.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub dial: Dial,
    pub tasks: usize,
    /// Events every follower received, all kinds.
    pub events: u64,
    /// Bytes of Text the followers received.
    pub text_bytes: u64,
    pub elapsed: Duration,
    /// Whether every follower saw sequence numbers 1, 2, 3, ... with none missing or repeated.
    pub contiguous: bool,
}

impl Outcome {
    pub fn events_per_s(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64()
    }

    pub fn mb_per_s(&self) -> f64 {
        self.text_bytes as f64 / 1e6 / self.elapsed.as_secs_f64()
    }
}

/// `tasks` agents over `dial`, one task each, `texts` Text events of `text_bytes` bytes per task.
pub async fn run(
    dir: &Path,
    tasks: usize,
    texts: usize,
    text_bytes: usize,
    dial: Dial,
) -> Result<Outcome> {
    run_on(dir, None, tasks, texts, text_bytes, dial).await
}

/// [`run`] on a relay node whose state is in PostgreSQL (`cluster`), or on sled (`None`).
pub async fn run_on(
    dir: &Path,
    cluster: Option<ClusterConfig>,
    tasks: usize,
    texts: usize,
    text_bytes: usize,
    dial: Dial,
) -> Result<Outcome> {
    let relay = InProcessRelay::start_node(dir, cluster).await?;
    let core = relay.core.clone();
    let ids = fleet::pair(&relay.target, 0, tasks, dial, |user| {
        let core = core.clone();
        async move { Ok(core.mint_pairing_token(&user).await?.0) }
    })
    .await?;
    let output = Output {
        texts,
        text_bytes,
        pace: Duration::ZERO,
    };
    let mut fleet = Fleet::default();
    for (i, who) in ids.iter().enumerate() {
        let how = Behaviour {
            dial,
            output: output.clone(),
            reconnect: false,
            dial_limit: None,
        };
        fleet.spawn(i, who.clone(), relay.target.clone(), how);
    }
    fleet.wait_online(tasks, Duration::from_secs(60)).await?;

    let start = Instant::now();
    let mut followers = JoinSet::new();
    for who in &ids {
        let rec = core
            .submit_task(Submit {
                user: who.user.clone(),
                project: "/srv/bench".into(),
                prompt: "stream output".into(),
                ..Default::default()
            })
            .await
            .context("submitting")?;
        followers.spawn(follow(core.clone(), rec.spec.task));
    }
    let (mut events, mut text_bytes, mut contiguous, mut end) = (0, 0, true, start);
    let limit = Duration::from_secs(120);
    while let Some(joined) = tokio::time::timeout(limit, followers.join_next())
        .await
        .context("a follower did not finish within two minutes")?
    {
        let f = joined??;
        events += f.events;
        text_bytes += f.text_bytes;
        contiguous &= f.contiguous && f.events == output.events();
        end = end.max(f.last_at);
    }
    fleet.stop().await;
    relay.stop().await?;
    ensure!(
        events == output.events() * tasks as u64,
        "followers received {events} events, expected {}",
        output.events() * tasks as u64
    );
    Ok(Outcome {
        dial,
        tasks,
        events,
        text_bytes,
        elapsed: end.duration_since(start),
        contiguous,
    })
}

/// What one follower received.
struct Followed {
    events: u64,
    text_bytes: u64,
    contiguous: bool,
    last_seq: u64,
    last_at: Instant,
}

impl Followed {
    /// Counts one event; true when it ends the task.
    fn take(&mut self, seq: u64, event: &TaskEvent) -> bool {
        if seq <= self.last_seq {
            // Already had it from the store: a live copy of an event read in the catch-up.
            return false;
        }
        self.contiguous &= seq == self.last_seq + 1;
        self.last_seq = seq;
        self.events += 1;
        if let TaskEvent::Text { text } = event {
            self.text_bytes += text.len() as u64;
        }
        self.last_at = Instant::now();
        matches!(event, TaskEvent::Finished { .. })
    }
}

/// Follows a task to its end as a front end does: the stored log first, then live events; a follower that
/// falls behind the live channel reads the gap back from the store.
async fn follow(core: Core, task: String) -> Result<Followed> {
    let (_, stored, mut live) = core.follow(&task).await?;
    let mut f = Followed {
        events: 0,
        text_bytes: 0,
        contiguous: true,
        last_seq: 0,
        last_at: Instant::now(),
    };
    for (seq, event) in &stored {
        if f.take(*seq, event) {
            return Ok(f);
        }
    }
    loop {
        let batch = match live.recv().await {
            Ok(one) => vec![one],
            Err(RecvError::Lagged(_)) => {
                let (task, after) = (task.clone(), f.last_seq);
                core.read(move |store| store.events(&task, after)).await??
            }
            Err(RecvError::Closed) => bail!("the relay stopped publishing {task}"),
        };
        for (seq, event) in &batch {
            if f.take(*seq, event) {
                return Ok(f);
            }
        }
    }
}
