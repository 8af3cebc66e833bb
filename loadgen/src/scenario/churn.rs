//! Reconnect churn: agents connect, handshake, say what an agent says after a handshake, and leave, again and
//! again, half of them politely (Goodbye, close) and half abruptly (the connection dropped). The relay's
//! memory and open descriptors are read before, after the first tenth (when pools and caches have warmed up),
//! and at the end once every session is gone. Flat means nothing leaks per connection.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use ct_protocol::project::ProjectsReport;
use ct_protocol::AgentMessage;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::dial::{dial, Identity, Target};
use crate::procfs::Stats;
use crate::relay::RelayProcess;
use crate::scenario::idle::transport_for;

/// What the run measured.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub cycles: usize,
    /// Cycles whose handshake failed (the agent simply tried again).
    pub failures: usize,
    pub start: Stats,
    pub warm: Stats,
    pub end: Stats,
    /// Sessions the relay still counted when the run ended.
    pub online_at_end: usize,
    pub elapsed: Duration,
}

/// `ids` agents make `cycles` reconnect cycles between them on a freshly restarted relay.
pub async fn run(
    relay: &mut RelayProcess,
    ids: &[Arc<Identity>],
    cycles: usize,
    quic_share: f64,
) -> Result<Outcome> {
    relay.stop().await?;
    relay.restart().await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let start_stats = relay.stats()?;

    let next = Arc::new(AtomicUsize::new(0));
    let completed = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(AtomicUsize::new(0));
    let warm_point = Arc::new(Notify::new());
    let warm_at = (cycles / 10).max(1);
    let started = Instant::now();
    let mut workers = JoinSet::new();
    for who in ids {
        let (who, target) = (who.clone(), relay.target.clone());
        let (next, completed, failures, warm_point) = (
            next.clone(),
            completed.clone(),
            failures.clone(),
            warm_point.clone(),
        );
        workers.spawn(async move {
            loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                if k >= cycles {
                    return;
                }
                if !cycle(&target, &who, k, cycles, quic_share).await {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
                if completed.fetch_add(1, Ordering::Relaxed) + 1 == warm_at {
                    warm_point.notify_one();
                }
            }
        });
    }
    warm_point.notified().await;
    let warm = relay.stats()?;
    while let Some(joined) = workers.join_next().await {
        joined?;
    }
    let elapsed = started.elapsed();
    let online_at_end = settle(relay).await?;
    let end = relay.stats()?;
    Ok(Outcome {
        cycles,
        failures: failures.load(Ordering::Relaxed),
        start: start_stats,
        warm,
        end,
        online_at_end,
        elapsed,
    })
}

/// One reconnect: handshake, the post-handshake reports and a heartbeat, then leave. True if it connected.
async fn cycle(target: &Target, who: &Identity, k: usize, cycles: usize, quic_share: f64) -> bool {
    let how = transport_for(k, cycles, quic_share);
    let mut link = match dial(target, who, how, None).await {
        Ok(link) => link,
        Err(e) => {
            tracing::debug!(error = %e, "churn dial failed");
            return false;
        }
    };
    for msg in [
        AgentMessage::Running { tasks: vec![] },
        AgentMessage::Projects(ProjectsReport::default()),
        AgentMessage::Heartbeat,
    ] {
        if link.writer.send(&msg).await.is_err() {
            return true;
        }
    }
    // Even cycles leave politely, odd ones abruptly.
    if k & 1 == 0 {
        link.close("churn").await;
    } else {
        // Abrupt: no Goodbye, no close handshake; the connection is simply dropped.
        drop(link);
    }
    true
}

/// Waits until the relay counts no session and its descriptor count has stopped moving (abruptly dropped
/// connections are noticed by their dead-link timers), up to 20 s. Returns the sessions still counted.
async fn settle(relay: &RelayProcess) -> Result<usize> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last_fds = usize::MAX;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let online = relay.status().await?.agents_online;
        let fds = relay.stats()?.fds;
        if (online == 0 && fds == last_fds) || Instant::now() > deadline {
            return Ok(online);
        }
        last_fds = fds;
    }
}
