//! The benchmark scenarios, one module each. Every scenario returns a typed outcome (counts the smoke test
//! checks, figures the report prints); none asserts a timing.
//!
//! - [`idle`]: agents held by one relay process; its memory per agent, per transport.
//! - [`dispatch`]: task submitted → agent has `StartTask`, under a steady submission rate.
//! - [`events`]: task output through the relay, stored and delivered to a follower.
//! - [`history`]: the relay's hot paths (autocomplete, submit, resume check, share changes) with 100,000 tasks
//!   stored.
//! - [`restart`]: the relay killed and restarted under load; how fast agents return; no event lost.
//! - [`churn`]: thousands of reconnect cycles; the relay's memory and descriptors before and after.
//! - [`footprint`]: the real `ct-agent` binary idling: memory, CPU between keep-alives, binary sizes.
//! - [`cluster`]: three relay nodes on PostgreSQL and NATS beside one on sled: agents held, cross-node
//!   dispatch, events persisted, a node killed under load.
//! - [`rathole`]: the same machine, the same run: rathole's client, server and tunnel throughput.

pub mod churn;
pub mod cluster;
pub mod dispatch;
pub mod events;
pub mod footprint;
pub mod history;
pub mod idle;
pub mod rathole;
pub mod restart;

use std::path::PathBuf;
use std::time::Duration;

use crate::relay::Program;

/// Sizes of every scenario.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Agents held in the idle scenario (each transport alone, then mixed).
    pub idle_agents: usize,
    /// Share of QUIC agents wherever transports are mixed.
    pub quic_share: f64,
    /// How long agents sit connected before the relay's memory is read.
    pub idle_settle: Duration,
    pub dispatch_agents: usize,
    /// Tasks submitted per second.
    pub dispatch_rate: u32,
    pub dispatch_duration: Duration,
    /// Concurrent tasks (one per agent) in the event scenarios.
    pub event_tasks: usize,
    /// Text events per task, and their size, for the events/s figure.
    pub small_events: usize,
    pub small_bytes: usize,
    /// The same for the bulk output figure. A task's output stays under the relay's per-task cap (32 MiB by
    /// default), past which it stops storing Text and the figure would no longer mean stored output.
    pub bulk_events: usize,
    pub bulk_bytes: usize,
    /// Finished tasks stored before the relay starts in the history scenario, spread evenly over
    /// `history_users` users, and the calls each of its figures is taken over (fewer if they are slow).
    pub history_tasks: usize,
    pub history_users: usize,
    pub history_calls: usize,
    pub restart_agents: usize,
    /// Tasks producing output while the relay is killed.
    pub restart_tasks: usize,
    /// Each restart task's Text events and the time between them (the task must outlive the restart).
    pub restart_texts: usize,
    pub restart_pace: Duration,
    /// Agents reconnecting in turn, and the reconnect cycles they make together.
    pub churn_agents: usize,
    pub churn_cycles: usize,
    /// How long the real agent idles while its CPU time is measured.
    pub agent_idle: Duration,
    /// rathole: control channels (services) held by the server, client processes they are spread over, and
    /// bytes pushed through the tunnel.
    pub rathole_services: usize,
    pub rathole_clients: usize,
    pub rathole_bytes: u64,
    /// Agents held across the cluster's nodes (and by the single node beside it). The cluster's dispatch
    /// and failover reuse `dispatch_*` and `restart_*`, and its events figure the small-events sizes.
    pub cluster_agents: usize,
    /// A round trip added between the cluster's relays and PostgreSQL (zero: none), as when the database is
    /// on another host; see [`crate::delay`].
    pub pg_rtt: Duration,
}

impl Plan {
    /// The sizes of issue 6.
    pub fn full() -> Self {
        Self {
            idle_agents: 10_000,
            quic_share: 0.5,
            idle_settle: Duration::from_secs(10),
            dispatch_agents: 1_000,
            dispatch_rate: 200,
            dispatch_duration: Duration::from_secs(30),
            event_tasks: 4,
            small_events: 25_000,
            small_bytes: 100,
            bulk_events: 450,
            bulk_bytes: 64 * 1024,
            history_tasks: 100_000,
            history_users: 100,
            history_calls: 300,
            restart_agents: 1_000,
            restart_tasks: 200,
            restart_texts: 500,
            restart_pace: Duration::from_millis(20),
            churn_agents: 100,
            churn_cycles: 10_000,
            agent_idle: Duration::from_secs(60),
            rathole_services: 1_000,
            rathole_clients: 10,
            rathole_bytes: 2 << 30,
            cluster_agents: 10_000,
            pg_rtt: Duration::ZERO,
        }
    }

    /// A few minutes on a laptop: the same scenarios, a tenth of the size or less.
    pub fn quick() -> Self {
        Self {
            idle_agents: 1_000,
            idle_settle: Duration::from_secs(5),
            dispatch_agents: 200,
            dispatch_duration: Duration::from_secs(5),
            small_events: 5_000,
            bulk_events: 200,
            history_tasks: 10_000,
            history_calls: 100,
            restart_agents: 200,
            restart_tasks: 40,
            restart_texts: 250,
            churn_agents: 20,
            churn_cycles: 1_000,
            agent_idle: Duration::from_secs(10),
            rathole_services: 100,
            rathole_clients: 2,
            rathole_bytes: 256 << 20,
            cluster_agents: 1_000,
            ..Self::full()
        }
    }

    /// Seconds, for the smoke test: every scenario really happens, at a size that proves nothing about speed.
    pub fn tiny() -> Self {
        Self {
            idle_agents: 20,
            idle_settle: Duration::from_millis(500),
            dispatch_agents: 10,
            dispatch_rate: 50,
            dispatch_duration: Duration::from_secs(1),
            event_tasks: 2,
            small_events: 200,
            bulk_events: 10,
            bulk_bytes: 16 * 1024,
            history_tasks: 500,
            history_users: 10,
            history_calls: 10,
            restart_agents: 20,
            restart_tasks: 5,
            restart_texts: 100,
            churn_agents: 5,
            churn_cycles: 100,
            agent_idle: Duration::from_secs(1),
            rathole_services: 4,
            rathole_clients: 1,
            rathole_bytes: 4 << 20,
            cluster_agents: 30,
            ..Self::quick()
        }
    }
}

/// The programs under test and where scenarios keep their files.
#[derive(Debug, Clone)]
pub struct Tools {
    pub relay: Program,
    pub agent: Program,
    /// Release binaries whose sizes are reported (absent when running through passthroughs).
    pub sizes: Vec<(String, PathBuf)>,
    pub rathole: Option<PathBuf>,
    pub work_dir: PathBuf,
}
