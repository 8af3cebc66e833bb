//! The relay-wide settings the core enforces: limits per agent, per user and per address, timeouts, retention.

use std::time::Duration;

/// Relay-wide settings the core needs.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// This node's name in a cluster (and in a relay of one): in presence records, logs, metrics and
    /// `ct-relay admin cluster`.
    pub node_id: String,
    /// Addresses put into pairing tokens (this node's; a cluster's tokens carry every live node's).
    pub public_addrs: Vec<String>,
    /// Where people reach the web dashboard (`https://name`, without `/dashboard`), when that is not the first
    /// public address: a relay behind a reverse proxy with a certificate of its own.
    pub dashboard_url: Option<String>,
    pub pair_code_ttl: Duration,
    /// Pairing attempts per address: burst, then one per this interval.
    pub pair_burst: u32,
    pub pair_refill: Duration,
    /// Connections (QUIC and TCP together, agents and HTTP alike) served at once; more are refused at
    /// accept, so a flood of idle sockets cannot exhaust memory or file descriptors.
    pub max_connections: usize,
    /// Connections one address (IPv6: one /64) may hold at once, so one party cannot take every slot of
    /// `max_connections`. Agents behind one NAT share an address: keep this above the agents one office runs.
    pub max_connections_per_address: usize,
    /// Time a TCP client has for its TLS handshake, and then for each HTTP request's headers and for the
    /// whole request (body included) to be read and answered. A client trickling bytes is cut off after it.
    pub request_timeout: Duration,
    /// Tasks one agent runs at once (sent to it and not finished); more wait in its queue. At least 1.
    pub max_running_per_agent: usize,
    /// Tasks waiting in one agent's queue; beyond this a submit is refused rather than left waiting for hours.
    pub max_queued_per_agent: usize,
    /// How long a project request waits for the agent's answer.
    pub project_timeout: Duration,
    /// Tasks one person may start per minute, on average (new tasks and replies that start one)...
    pub tasks_per_minute: u32,
    /// ...and at once after a quiet spell (the token bucket's size).
    pub task_burst: u32,
    /// Tasks one person may have queued or running at once, across all agents (their own and shared ones).
    pub max_tasks_per_user: usize,
    /// Agents one person may have paired (not revoked). Each agent costs a stored record, a live session and
    /// its reports; pairing is refused past this, with what to do.
    pub max_agents_per_user: usize,
    /// Project reports one agent may send per minute (after a burst of as many). Each report rewrites the
    /// agent's stored record; reports past the rate are dropped (the next one in time is kept).
    pub project_reports_per_minute: u32,
    /// Bytes of task output one person's tasks may keep in the store, counted over the tasks they asked for.
    /// Past it new tasks are refused until retention deletes old ones; running tasks finish (each within
    /// `max_task_output`).
    pub max_stored_per_user: u64,
    /// Pairing codes one user may hold that could still pair an agent. Minting another supersedes the
    /// oldest rather than refusing: a person who lost a token can always get a working one, and fewer live
    /// bearer secrets is the safer side.
    pub max_pair_codes_per_user: usize,
    /// Bytes of events kept per task. Past it the relay keeps acknowledging, but stores only the events that
    /// change the task's course (approvals, turn results, the end) and one marker saying output was dropped.
    pub max_task_output: u64,
    /// How long a task and its events are kept after it ended.
    pub task_retention: Duration,
    /// How long audit entries are kept.
    pub audit_retention: Duration,
    /// Keys (users, addresses) one rate limiter remembers at most; see [`RateLimiter`].
    pub rate_limit_keys: usize,
    /// Threads that write task events while the core's thread goes on (see `core::writers`); 0: the core's
    /// thread writes them itself. A relay sets it for a cluster, where each write is a round trip to
    /// PostgreSQL; on sled a write is a memory copy, and a hop to another thread would only add to it.
    pub event_writers: usize,
}

impl Default for CoreConfig {
    fn default() -> Self {
        Self {
            node_id: "relay".into(),
            public_addrs: Vec::new(),
            dashboard_url: None,
            pair_code_ttl: Duration::from_secs(600),
            pair_burst: 10,
            pair_refill: Duration::from_secs(6),
            max_connections: 50_000,
            max_connections_per_address: 128,
            request_timeout: Duration::from_secs(10),
            max_running_per_agent: 2,
            max_queued_per_agent: 20,
            project_timeout: Duration::from_secs(10),
            tasks_per_minute: 20,
            task_burst: 10,
            max_tasks_per_user: 8,
            max_agents_per_user: 20,
            project_reports_per_minute: 12,
            max_stored_per_user: 512 * 1024 * 1024,
            max_pair_codes_per_user: 5,
            max_task_output: 32 * 1024 * 1024,
            task_retention: Duration::from_secs(30 * 86_400),
            audit_retention: Duration::from_secs(180 * 86_400),
            rate_limit_keys: 100_000,
            event_writers: 0,
        }
    }
}
