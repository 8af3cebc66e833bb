//! The nodes of a cluster: each one's heartbeat in the shared store, which nodes count as alive (their
//! agents' presence is trusted, their addresses go into pairing tokens), readiness, and what
//! `ct-relay admin cluster` shows.
//!
//! Liveness of a node is only used for those two things. Nothing expires an agent's presence while its session
//! lives: routing to an agent goes to its subject on the bus, and a node that is gone has no subscription
//! there, which the bus says at once ("no responders").

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::remote::NODE_STALE;
use super::Core;
use crate::store::{now, NodeRecord};

/// How often a node writes its heartbeat and reads the others'.
pub const HEARTBEAT: Duration = Duration::from_secs(2);

/// One node as `ct-relay admin cluster` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeView {
    pub id: String,
    pub public_addrs: Vec<String>,
    pub version: String,
    pub started_at: u64,
    /// Seconds since its last heartbeat.
    pub seen_secs_ago: u64,
    pub agents: usize,
    pub alive: bool,
    pub draining: bool,
    /// The node that answered.
    pub this: bool,
}

/// Whether the shared store answered this node's last heartbeat.
#[derive(Debug, Default)]
pub(crate) struct Health {
    store_ok: AtomicBool,
}

impl Core {
    /// This node's id.
    pub fn node_id(&self) -> &str {
        &self.config().node_id
    }

    /// Whether this node can serve: without a cluster, always; in one, while NATS is connected and the shared
    /// store answered the last heartbeat (`/readyz` says 503 otherwise, and the node keeps retrying).
    pub fn cluster_ready(&self) -> bool {
        match self.bus() {
            None => true,
            Some(bus) => bus.connected() && self.shared.health.store_ok.load(Ordering::Relaxed),
        }
    }

    /// Every node of the cluster as the shared store knows it, this one included.
    pub async fn cluster_nodes(&self) -> Result<Vec<NodeView>, super::CoreError> {
        let nodes = self.read(|store| store.nodes()).await??;
        let me = self.node_id().to_string();
        let t = now();
        let mut views: Vec<NodeView> = nodes
            .into_iter()
            .map(|n| NodeView {
                alive: is_alive(&n, t),
                seen_secs_ago: t.saturating_sub(n.seen_at),
                this: n.id == me,
                id: n.id,
                public_addrs: n.public_addrs,
                version: n.version,
                started_at: n.started_at,
                agents: n.agents,
                draining: n.draining,
            })
            .collect();
        views.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(views)
    }

    /// Writes this node's heartbeat every [`HEARTBEAT`] and learns which nodes are alive, until `shutdown`;
    /// then says it is draining. Runs on every relay: a relay of one is a cluster of one.
    pub async fn heartbeat(&self, shutdown: CancellationToken) {
        let started_at = now();
        let mut tick = tokio::time::interval(HEARTBEAT);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            self.beat(started_at, false).await;
        }
        self.beat(started_at, true).await;
    }

    /// Writes this node's first heartbeat and learns the live nodes, before the node serves anyone: a pairing
    /// token minted the moment it is up already names the other nodes, and they know of this one.
    pub async fn join_cluster(&self) {
        self.beat(now(), false).await;
    }

    /// Forgets this node in the shared store: the last thing a node that shut down cleanly does.
    pub async fn leave_cluster(&self) {
        let me = self.node_id().to_string();
        let _ = self.read(move |store| store.remove_node(&me)).await;
    }

    async fn beat(&self, started_at: u64, draining: bool) {
        let rec = NodeRecord {
            id: self.node_id().to_string(),
            public_addrs: self.config().public_addrs.clone(),
            version: ct_protocol::version::SOFTWARE_VERSION.to_string(),
            started_at,
            seen_at: now(),
            agents: self.online().await,
            draining,
        };
        let result = self
            .read(move |store| {
                store.put_node(&rec)?;
                store.nodes()
            })
            .await;
        let nodes = match result {
            Ok(Ok(nodes)) => nodes,
            Ok(Err(e)) => {
                if self.shared.health.store_ok.swap(false, Ordering::Relaxed) {
                    tracing::error!(error = %e, "the shared store does not answer; not ready until it does");
                }
                return;
            }
            Err(_) => return,
        };
        if !self.shared.health.store_ok.swap(true, Ordering::Relaxed) {
            tracing::info!("the shared store answers");
        }
        let t = now();
        let me = self.node_id().to_string();
        let ids: HashSet<String> = nodes
            .iter()
            .filter(|n| is_alive(n, t))
            .map(|n| n.id.clone())
            .chain([me.clone()])
            .collect();
        let addrs = cluster_addrs(&me, &self.config().public_addrs, &nodes, t);
        let _ = self
            .call(move |state| {
                state.alive_nodes = ids;
                state.cluster_addrs = addrs;
            })
            .await;
    }
}

/// The addresses an agent may reach the cluster at, as of `nodes` at `now`: this node's own first (an agent
/// paired or connected here tries here first), then every other live node's.
pub(crate) fn cluster_addrs(
    me: &str,
    own: &[String],
    nodes: &[NodeRecord],
    now: u64,
) -> Vec<String> {
    let mut addrs = own.to_vec();
    for n in nodes.iter().filter(|n| n.id != me && is_alive(n, now)) {
        for a in &n.public_addrs {
            if !addrs.contains(a) {
                addrs.push(a.clone());
            }
        }
    }
    addrs
}

fn is_alive(n: &NodeRecord, now: u64) -> bool {
    !n.draining && now.saturating_sub(n.seen_at) <= NODE_STALE.as_secs()
}
