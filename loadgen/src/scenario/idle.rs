//! Idle agents held by one relay process: how much memory each costs it, per transport.
//!
//! The relay is restarted before each run, so its baseline is a fresh process with the paired agents in its
//! store; the figure is (resident memory with every agent connected and settled − baseline) / agents.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Result};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::agent::{Behaviour, Output};
use crate::dial::{Dial, Identity};
use crate::fleet::Fleet;
use crate::procfs::Stats;
use crate::relay::RelayProcess;

/// First connections in flight at once while a fleet comes up.
pub const DIAL_LIMIT: usize = 128;

/// What one run measured.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub label: &'static str,
    pub quic: usize,
    pub websocket: usize,
    /// Agents the relay counted online once all had connected.
    pub online: usize,
    pub connect_time: Duration,
    pub before: Stats,
    pub after: Stats,
    /// This load generator's own resident memory with every agent connected, for context.
    pub loadgen_rss_kib: u64,
}

impl Outcome {
    pub fn agents(&self) -> usize {
        self.quic + self.websocket
    }

    /// Relay memory per agent, KiB.
    pub fn per_agent_kib(&self) -> f64 {
        (self.after.rss_kib as f64 - self.before.rss_kib as f64) / self.agents().max(1) as f64
    }
}

/// Which transport agent `i` of `n` uses when a `quic_share` of them use QUIC: spread evenly, not in blocks.
pub fn transport_for(i: usize, n: usize, quic_share: f64) -> Dial {
    let quic_before = |k: usize| (k as f64 * quic_share).floor() as usize;
    if n > 0 && quic_before(i + 1) > quic_before(i) {
        Dial::Quic
    } else {
        Dial::WebSocket
    }
}

/// Connects every agent of `ids` (a `quic_share` of them over QUIC) to a freshly restarted relay and reads
/// its memory once they have settled.
pub async fn run(
    relay: &mut RelayProcess,
    ids: &[Arc<Identity>],
    quic_share: f64,
    settle: Duration,
    label: &'static str,
) -> Result<Outcome> {
    relay.stop().await?;
    relay.restart().await?;
    // Let the new process finish starting (store opened, tasks spawned) before the baseline.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = relay.stats()?;

    let mut fleet = Fleet::default();
    let limit = Arc::new(Semaphore::new(DIAL_LIMIT));
    let (mut quic, mut websocket) = (0, 0);
    let start = Instant::now();
    for (i, who) in ids.iter().enumerate() {
        let dial = transport_for(i, ids.len(), quic_share);
        match dial {
            Dial::Quic => quic += 1,
            _ => websocket += 1,
        }
        let how = Behaviour {
            dial,
            output: Output {
                texts: 1,
                text_bytes: 100,
                pace: Duration::ZERO,
            },
            reconnect: true,
            dial_limit: Some(limit.clone()),
        };
        fleet.spawn(i, who.clone(), relay.target.clone(), how);
    }
    fleet
        .wait_online(ids.len(), Duration::from_secs(120 + ids.len() as u64 / 50))
        .await?;
    let connect_time = start.elapsed();
    let online = wait_for_count(relay, ids.len()).await?;
    tokio::time::sleep(settle).await;
    let after = relay.stats()?;
    let loadgen_rss_kib = crate::procfs::own()?.rss_kib;
    fleet.stop().await;
    ensure!(
        online == ids.len(),
        "the relay counts {online} agents online, expected {}",
        ids.len()
    );
    Ok(Outcome {
        label,
        quic,
        websocket,
        online,
        connect_time,
        before,
        after,
        loadgen_rss_kib,
    })
}

/// Waits (briefly) until the relay counts `n` agents online, and returns its count.
async fn wait_for_count(relay: &RelayProcess, n: usize) -> Result<usize> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let online = relay.status().await?.agents_online;
        if online == n || Instant::now() > deadline {
            return Ok(online);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
