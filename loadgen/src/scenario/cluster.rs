//! The relay as a cluster (issue 15): three `ct-relay` processes with distinct node ids on one PostgreSQL
//! database and one nats-server (both real, started as the cluster tests start them), beside a single
//! `ct-relay` process on sled measured the same way in the same run.
//!
//! - **Held**: agents spread over the nodes (agent `i` dials node `i % nodes` first), each node's memory before
//!   and after.
//! - **Dispatch**: a task submitted through the admin socket of the node after the one holding the agent (on
//!   a single node, its only node) → the agent has decoded `StartTask`. Both instants are read in this
//!   process; the admin round trip is part of the figure, on both sides alike.
//! - **Failover** (cluster only): one node SIGKILLed while agents stream task output; its agents come back on
//!   the survivors (counted from the kill: no node restarts); every task's stored log is read back from a
//!   survivor and counted against what the agents sent.
//! - **Events persisted**: the events scenario on an in-process node whose store is PostgreSQL, beside sled.
//!
//! Every fleet agent knows every node, as a pairing token carries every node's address, and tries them the way
//! `ct-agent` does: the node it last held a session on goes last.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use ct_protocol::task::TaskEvent;
use ct_protocol::Transport;
use ct_relay::relay::ClusterConfig;
use ct_testkit::nats::NatsServer;
use ct_testkit::postgres::PgServer;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::agent::{Behaviour, Note, Output};
use crate::delay::DelayProxy;
use crate::dial::{Dial, Identity, Target};
use crate::fleet::{self, Fleet};
use crate::procfs::{self, Stats};
use crate::relay::{Program, RelayProcess};
use crate::scenario::events;
use crate::scenario::idle::{transport_for, DIAL_LIMIT};
use crate::scenario::{Plan, Tools};
use crate::stats::Summary;

/// Nodes in the cluster.
pub const NODES: usize = 3;
/// How long after the kill the failed node's agents and the tasks have to come back before the run gives up.
const RECOVERY_LIMIT: Duration = Duration::from_secs(60);

/// What the whole scenario measured: one side per relay shape, and the events figure on each store.
#[derive(Debug, Default)]
pub struct Outcome {
    pub single: Side,
    pub cluster: Side,
    /// The events scenario on sled, then on PostgreSQL (in-process node).
    pub events_sled: Option<events::Outcome>,
    pub events_postgres: Option<events::Outcome>,
    /// Parts that could not finish, with why; the others still ran.
    pub failed: Vec<(String, String)>,
}

/// One relay shape: a single node on sled, or three nodes on PostgreSQL and NATS.
#[derive(Debug, Default)]
pub struct Side {
    pub nodes: usize,
    /// Agents paired (spread over the nodes) and how long it took.
    pub pairing: Option<(usize, Duration)>,
    pub held: Option<Held>,
    pub dispatch: Option<Dispatch>,
    pub failover: Option<Failover>,
}

/// Agents held by the nodes.
#[derive(Debug, Clone)]
pub struct Held {
    pub agents: usize,
    pub quic: usize,
    pub websocket: usize,
    /// First dial → the last agent online.
    pub connect_time: Duration,
    pub per_node: Vec<NodeHeld>,
    pub loadgen_rss_kib: u64,
}

#[derive(Debug, Clone)]
pub struct NodeHeld {
    /// Agents whose session is with this node (as they saw it), and the node's own count.
    pub agents: usize,
    pub online_by_node: usize,
    pub before: Stats,
    pub after: Stats,
}

impl NodeHeld {
    pub fn per_agent_kib(&self) -> f64 {
        (self.after.rss_kib as f64 - self.before.rss_kib as f64) / self.agents.max(1) as f64
    }
}

/// Admin-submitted dispatch latency.
#[derive(Debug, Clone)]
pub struct Dispatch {
    pub agents: usize,
    /// Submissions accepted, and refused (the agent looked offline to the submitting node).
    pub submitted: usize,
    pub refused: usize,
    pub started: usize,
    /// Submissions whose node held the agent (0 on a cluster unless an agent moved).
    pub same_node: usize,
    pub achieved_rate: f64,
    /// Admin call begun → `StartTask` decoded by the agent.
    pub latency: Summary,
    /// The admin call alone (the task queued and, on a cluster, sent towards the holding node).
    pub submit_call: Summary,
}

/// A node SIGKILLed under load.
#[derive(Debug, Clone)]
pub struct Failover {
    pub agents: usize,
    /// Agents held by the killed node at the kill.
    pub on_victim: usize,
    pub tasks: usize,
    /// Tasks whose agent was on the killed node.
    pub tasks_on_victim: usize,
    pub noticed_quic: Summary,
    pub noticed_websocket: Summary,
    /// Kill → back online on a survivor, for the killed node's agents.
    pub back: Summary,
    pub not_back: usize,
    /// Agents of the killed node per survivor they came back on.
    pub back_per_node: Vec<usize>,
    pub tasks_done: usize,
    pub events_expected: u64,
    pub events_stored: u64,
    pub incomplete: Vec<String>,
    pub gapped: usize,
}

impl Failover {
    pub fn events_lost(&self) -> u64 {
        self.events_expected.saturating_sub(self.events_stored)
    }
}

/// PostgreSQL and nats-server on loopback, with temporary data directories; both die with this process.
struct Backends {
    pg: PgServer,
    nats: NatsServer,
    /// Between the relays and PostgreSQL, with `--pg-rtt-ms`.
    delay: Option<DelayProxy>,
}

impl Backends {
    async fn start(pg_rtt: Duration) -> Result<Self> {
        let mut backends = tokio::task::spawn_blocking(|| {
            Ok::<_, anyhow::Error>(Self {
                pg: PgServer::start().context("starting PostgreSQL (Debian's postgresql)")?,
                nats: NatsServer::start().context("starting nats-server")?,
                delay: None,
            })
        })
        .await??;
        if !pg_rtt.is_zero() {
            let upstream = SocketAddr::from(([127, 0, 0, 1], backends.pg.port()));
            backends.delay = Some(DelayProxy::start(upstream, pg_rtt).await?);
        }
        Ok(backends)
    }

    /// A fresh database on the server, for one cluster.
    async fn cluster(&self, name: &str) -> Result<ClusterConfig> {
        let url = {
            let name = name.to_string();
            let pg = &self.pg;
            tokio::task::block_in_place(|| pg.create_database(&name))?
        };
        // The relays reach the database through the delaying proxy when there is one.
        let url = match &self.delay {
            Some(proxy) => url.replace(
                &format!("127.0.0.1:{}/", self.pg.port()),
                &format!("{}/", proxy.addr),
            ),
            None => url,
        };
        Ok(ClusterConfig {
            database_url: url,
            nats_url: self.nats.url(),
        })
    }
}

/// Runs both sides and the events figures at the plan's sizes; with `events_only`, the events figures alone.
pub async fn run(plan: &Plan, tools: &Tools, events_only: bool) -> Result<Outcome> {
    let dir = tools.work_dir.join("cluster");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let backends = Backends::start(plan.pg_rtt).await?;
    let mut out = Outcome::default();

    // In-process first, for the reason bench.rs gives: the 10,000-agent parts leave this process's heap large.
    let (texts, bytes) = (plan.small_events, plan.small_bytes);
    progress(&format!(
        "cluster: events, {} tasks × {texts} × {bytes} B, sled",
        plan.event_tasks
    ));
    let run = events::run_on(
        &fresh(&dir, "events-sled")?,
        None,
        plan.event_tasks,
        texts,
        bytes,
        Dial::Quic,
    )
    .await;
    out.events_sled = out.keep("cluster: events on sled", run);
    progress("cluster: events, the same on PostgreSQL");
    let run = async {
        let cluster = backends.cluster("ct_bench_events").await?;
        events::run_on(
            &fresh(&dir, "events-pg")?,
            Some(cluster),
            plan.event_tasks,
            texts,
            bytes,
            Dial::Quic,
        )
        .await
    }
    .await;
    out.events_postgres = out.keep("cluster: events on PostgreSQL", run);
    if events_only {
        return Ok(out);
    }

    progress("cluster: a single node on sled");
    let single = side(plan, &tools.relay, &fresh(&dir, "single")?, None, 1).await;
    out.single = single.0;
    out.failed.extend(single.1);

    progress(&format!("cluster: {NODES} nodes on PostgreSQL and NATS"));
    let cluster = backends.cluster("ct_bench_cluster").await?;
    let three = side(
        plan,
        &tools.relay,
        &fresh(&dir, "three")?,
        Some(&cluster),
        NODES,
    )
    .await;
    out.cluster = three.0;
    out.failed.extend(three.1);
    drop(backends);
    Ok(out)
}

impl Outcome {
    fn keep<T>(&mut self, part: &str, result: Result<T>) -> Option<T> {
        keep(&mut self.failed, part, result)
    }
}

fn keep<T>(failed: &mut Vec<(String, String)>, part: &str, result: Result<T>) -> Option<T> {
    match result {
        Ok(t) => Some(t),
        Err(e) => {
            progress(&format!("{part} failed: {e:#}"));
            failed.push((part.into(), format!("{e:#}")));
            None
        }
    }
}

/// One side: `n` nodes (on `cluster`'s database, or one on sled), agents paired and held, dispatch, and with
/// several nodes the failover.
async fn side(
    plan: &Plan,
    program: &Program,
    dir: &Path,
    cluster: Option<&ClusterConfig>,
    n: usize,
) -> (Side, Vec<(String, String)>) {
    let mut failed = Vec::new();
    let name = if n == 1 { "single node" } else { "cluster" };
    let mut side = Side {
        nodes: n,
        ..Side::default()
    };
    let nodes = start_nodes(program, dir, cluster, n).await;
    let Some(mut nodes) = keep(&mut failed, &format!("{name}: start"), nodes) else {
        return (side, failed);
    };
    let agents = plan
        .cluster_agents
        .max(plan.dispatch_agents)
        .max(plan.restart_agents);
    progress(&format!(
        "{name}: pairing {agents} agents through the admin sockets"
    ));
    let started = Instant::now();
    let targets: Vec<&Target> = nodes.iter().map(|r| &*r.target).collect();
    let ids = fleet::pair_on(&targets, 0, agents, Dial::Quic, |node, user| {
        let relay = &nodes[node];
        async move { relay.pair_code(&user).await }
    })
    .await;
    let Some(ids) = keep(&mut failed, &format!("{name}: pairing"), ids) else {
        return (side, failed);
    };
    side.pairing = Some((agents, started.elapsed()));

    progress(&format!("{name}: {} agents held", plan.cluster_agents));
    let run = held(&nodes, &ids[..plan.cluster_agents], plan).await;
    side.held = keep(&mut failed, &format!("{name}: agents held"), run);

    progress(&format!(
        "{name}: dispatch, {} agents, {} tasks/s for {:?}",
        plan.dispatch_agents, plan.dispatch_rate, plan.dispatch_duration
    ));
    let run = dispatch(&nodes, &ids[..plan.dispatch_agents], plan).await;
    side.dispatch = keep(&mut failed, &format!("{name}: dispatch"), run);

    if n > 1 {
        progress(&format!(
            "{name}: a node SIGKILLed under {} agents and {} streaming tasks",
            plan.restart_agents, plan.restart_tasks
        ));
        let run = failover(&mut nodes, &ids[..plan.restart_agents], plan).await;
        side.failover = keep(&mut failed, &format!("{name}: failover"), run);
    }
    for node in &mut nodes {
        if let Err(e) = node.stop().await {
            failed.push((format!("{name}: stop"), format!("{e:#}")));
        }
    }
    (side, failed)
}

/// Starts `n` relay processes, one after another (the first creates the schema and the cluster's relay key).
async fn start_nodes(
    program: &Program,
    dir: &Path,
    cluster: Option<&ClusterConfig>,
    n: usize,
) -> Result<Vec<RelayProcess>> {
    let mut nodes = Vec::new();
    for i in 0..n {
        // A benchmark submits thousands of tasks for a few users: the abuse limits are for strangers.
        let mut args: Vec<OsString> = [
            "--tasks-per-minute",
            "1000000",
            "--max-tasks-per-user",
            "1000000",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        if let Some(c) = cluster {
            for (flag, value) in [
                ("--database-url", c.database_url.clone()),
                ("--nats-url", c.nats_url.clone()),
                ("--node-id", format!("node-{i}")),
            ] {
                args.push(flag.into());
                args.push(value.into());
            }
        }
        let node_dir: PathBuf = dir.join(format!("node-{i}"));
        let relay = RelayProcess::start_with(program, &node_dir, &args)
            .await
            .with_context(|| format!("starting node-{i}"))?;
        nodes.push(relay);
    }
    if let Some(first) = nodes.first() {
        anyhow::ensure!(
            nodes.iter().all(|r| r.target.relay == first.target.relay),
            "the nodes answer for different relay keys"
        );
    }
    Ok(nodes)
}

/// Node `home` first, then the others in order: the order agent `i` tries the nodes in.
fn targets_from(nodes: &[RelayProcess], home: usize) -> Vec<Arc<Target>> {
    (0..nodes.len())
        .map(|k| nodes[(home + k) % nodes.len()].target.clone())
        .collect()
}

/// Which node an address belongs to.
fn node_of(nodes: &[RelayProcess], addr: SocketAddr) -> Option<usize> {
    nodes.iter().position(|r| r.target.addr == addr)
}

/// Agents `ids` held by the nodes, each dialling node `i % nodes` first, a mix of transports.
async fn held(nodes: &[RelayProcess], ids: &[Arc<Identity>], plan: &Plan) -> Result<Held> {
    let before: Vec<Stats> = nodes
        .iter()
        .map(RelayProcess::stats)
        .collect::<Result<_>>()?;
    let mut fleet = Fleet::default();
    let limit = Arc::new(Semaphore::new(DIAL_LIMIT));
    let (mut quic, mut websocket) = (0, 0);
    let start = Instant::now();
    for (i, who) in ids.iter().enumerate() {
        let dial = transport_for(i, ids.len(), plan.quic_share);
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
        fleet.spawn_on(i, who.clone(), targets_from(nodes, i % nodes.len()), how);
    }
    let on = online_where(
        &mut fleet,
        ids.len(),
        Duration::from_secs(120 + ids.len() as u64 / 50),
    )
    .await?;
    let connect_time = start.elapsed();
    tokio::time::sleep(plan.idle_settle).await;
    let mut per_node = Vec::new();
    for (k, node) in nodes.iter().enumerate() {
        let agents = on
            .values()
            .filter(|(addr, _)| node_of(nodes, *addr) == Some(k))
            .count();
        per_node.push(NodeHeld {
            agents,
            online_by_node: node.status().await?.agents_online,
            before: before[k],
            after: node.stats()?,
        });
    }
    let loadgen_rss_kib = procfs::own()?.rss_kib;
    fleet.stop().await;
    Ok(Held {
        agents: ids.len(),
        quic,
        websocket,
        connect_time,
        per_node,
        loadgen_rss_kib,
    })
}

/// Waits until `n` agents are online at once; returns where each is (node address, transport).
async fn online_where(
    fleet: &mut Fleet,
    n: usize,
    limit: Duration,
) -> Result<HashMap<usize, (SocketAddr, Transport)>> {
    let deadline = Instant::now() + limit;
    let mut online = HashMap::new();
    while online.len() < n {
        match fleet.next_note(deadline).await {
            Some(Note::Online {
                agent,
                transport,
                relay,
                ..
            }) => {
                online.insert(agent, (relay, transport));
            }
            Some(Note::Offline { agent, .. }) => {
                online.remove(&agent);
            }
            Some(Note::Refused { agent, error }) => bail!("agent {agent} was refused: {error}"),
            Some(_) => {}
            None => bail!("only {} of {n} agents online after {limit:?}", online.len()),
        }
    }
    Ok(online)
}

/// Submits through the admin socket in `data_dir`, retrying for a while if the agent is offline at that
/// moment (its losing race attempt replaced its session, as `restart` explains).
async fn submit_when_online(data_dir: &Path, user: &str, prompt: &str) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match RelayProcess::submit_in(data_dir, user, prompt).await {
            Err(e) if e.to_string().contains("offline") && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => return other,
        }
    }
}

/// Tasks submitted at a steady rate, each through the node after the one holding its agent.
async fn dispatch(nodes: &[RelayProcess], ids: &[Arc<Identity>], plan: &Plan) -> Result<Dispatch> {
    let mut fleet = Fleet::default();
    let limit = Arc::new(Semaphore::new(DIAL_LIMIT));
    for (i, who) in ids.iter().enumerate() {
        let how = Behaviour {
            dial: transport_for(i, ids.len(), plan.quic_share),
            output: Output {
                texts: 3,
                text_bytes: 200,
                pace: Duration::ZERO,
            },
            reconnect: true,
            dial_limit: Some(limit.clone()),
        };
        fleet.spawn_on(i, who.clone(), targets_from(nodes, i % nodes.len()), how);
    }
    let on = online_where(
        &mut fleet,
        ids.len(),
        Duration::from_secs(60 + ids.len() as u64 / 50),
    )
    .await?;
    // Let the connect burst's handshakes, reports and presence writes drain before timing anything.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let total = (plan.dispatch_rate as f64 * plan.dispatch_duration.as_secs_f64()).round() as usize;
    let mut plan_k = Vec::with_capacity(total);
    let mut same_node = 0;
    for k in 0..total {
        let a = k % ids.len();
        let holder = on
            .get(&a)
            .and_then(|(addr, _)| node_of(nodes, *addr))
            .context("an agent on no known node")?;
        let via = (holder + 1) % nodes.len();
        if via == holder {
            same_node += 1;
        }
        plan_k.push((ids[a].user.clone(), nodes[via].data_dir.clone()));
    }
    let every = Duration::from_secs_f64(1.0 / plan.dispatch_rate as f64);
    // Open loop: each submission is its own task at its own time, so a slow one does not delay the next.
    let submitter = tokio::spawn(async move {
        let start = Instant::now();
        let mut calls = JoinSet::new();
        for (k, (user, via)) in plan_k.into_iter().enumerate() {
            tokio::time::sleep_until(start + every * k as u32).await;
            calls.spawn(async move {
                let t0 = Instant::now();
                let r = RelayProcess::submit_in(&via, &user, &format!("benchmark task {k}")).await;
                r.map(|task| (task, t0, t0.elapsed()))
            });
        }
        let issued = start.elapsed();
        let (mut sent, mut refused) = (Vec::new(), Vec::new());
        while let Some(joined) = calls.join_next().await {
            match joined? {
                Ok(one) => sent.push(one),
                // Counted, not fatal: a refusal is one of the figures.
                Err(e) => refused.push(format!("{e:#}")),
            }
        }
        anyhow::Ok((sent, refused, issued))
    });

    let mut started: HashMap<String, Instant> = HashMap::new();
    let mut done = 0;
    let deadline = Instant::now() + plan.dispatch_duration + Duration::from_secs(30);
    // Ends early only if every submission was accepted; refused ones never start.
    while done < total {
        match fleet.next_note(deadline).await {
            Some(Note::Started { task, at, .. }) => {
                started.insert(task, at);
            }
            Some(Note::Done { .. }) => done += 1,
            Some(Note::Refused { error, .. }) => bail!("an agent was refused: {error}"),
            Some(_) => {}
            None => break,
        }
    }
    let (sent, refused, issued) = submitter.await??;
    for e in refused.iter().take(3) {
        progress(&format!("dispatch: a submission was refused: {e}"));
    }
    fleet.stop().await;
    let latency = sent
        .iter()
        .filter_map(|(task, t0, _)| started.get(task).map(|at| at.duration_since(*t0)))
        .collect();
    Ok(Dispatch {
        agents: ids.len(),
        submitted: sent.len(),
        refused: refused.len(),
        started: sent
            .iter()
            .filter(|(t, _, _)| started.contains_key(t))
            .count(),
        same_node,
        achieved_rate: (sent.len() + refused.len()) as f64 / issued.as_secs_f64(),
        latency: Summary::of(latency),
        submit_call: Summary::of(sent.iter().map(|(_, _, d)| *d).collect()),
    })
}

/// The node after node 0 is killed (SIGKILL) while `plan.restart_tasks` tasks stream output; returns when its
/// agents are back on the survivors and the tasks are done (or the recovery limit passed).
async fn failover(
    nodes: &mut [RelayProcess],
    ids: &[Arc<Identity>],
    plan: &Plan,
) -> Result<Failover> {
    let victim = 1 % nodes.len();
    let output = Output {
        texts: plan.restart_texts,
        text_bytes: 120,
        pace: plan.restart_pace,
    };
    let mut fleet = Fleet::default();
    let limit = Arc::new(Semaphore::new(DIAL_LIMIT));
    for (i, who) in ids.iter().enumerate() {
        // As `restart`: QUIC agents race WebSocket after 500 ms, as `ct-agent run` does.
        let dial = match transport_for(i, ids.len(), plan.quic_share) {
            Dial::Quic => Dial::Race,
            other => other,
        };
        let how = Behaviour {
            dial,
            output: output.clone(),
            reconnect: true,
            dial_limit: Some(limit.clone()),
        };
        fleet.spawn_on(i, who.clone(), targets_from(nodes, i % nodes.len()), how);
    }
    let mut on = online_where(
        &mut fleet,
        ids.len(),
        Duration::from_secs(60 + ids.len() as u64 / 50),
    )
    .await?;

    let tasks = plan.restart_tasks.min(ids.len());
    let mut task_ids = Vec::new();
    let mut task_agent = HashMap::new();
    for (a, who) in ids.iter().enumerate().take(tasks) {
        let holder = on
            .get(&a)
            .and_then(|(addr, _)| node_of(nodes, *addr))
            .context("an agent on no known node")?;
        let via = &nodes[(holder + 1) % nodes.len()].data_dir;
        let task = submit_when_online(via, &who.user, "stream through a failover").await?;
        task_agent.insert(task.clone(), a);
        task_ids.push(task);
    }
    let mut started = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while started.len() < tasks {
        match fleet.next_note(deadline).await {
            Some(Note::Started { task, .. }) => {
                started.insert(task);
            }
            Some(Note::Online {
                agent,
                transport,
                relay,
                ..
            }) => {
                on.insert(agent, (relay, transport));
            }
            Some(_) => {}
            None => bail!("only {} of {tasks} tasks started", started.len()),
        }
    }
    // Kill mid-stream: every task has output stored, acknowledged, and still to come.
    let run_for = output.pace * output.texts as u32;
    tokio::time::sleep(run_for / 3).await;

    let victim_addr = nodes[victim].target.addr;
    let on_victim: HashSet<usize> = on
        .iter()
        .filter(|(_, (addr, _))| *addr == victim_addr)
        .map(|(a, _)| *a)
        .collect();
    let tasks_on_victim = task_agent
        .values()
        .filter(|a| on_victim.contains(a))
        .count();
    let killed = Instant::now();
    nodes[victim].kill().await?;

    let mut noticed: HashMap<usize, Instant> = HashMap::new();
    let mut back: HashMap<usize, (Instant, SocketAddr)> = HashMap::new();
    let mut done = HashSet::new();
    let mut deadline = killed + RECOVERY_LIMIT;
    while back.len() < on_victim.len() || done.len() < tasks {
        if back.len() == on_victim.len() {
            // Everyone is back: the tasks need at most their remaining output time.
            deadline = deadline.min(Instant::now().max(killed + run_for) + Duration::from_secs(5));
        }
        match fleet.next_note(deadline).await {
            Some(Note::Offline { agent, at }) if at >= killed && on_victim.contains(&agent) => {
                noticed.entry(agent).or_insert(at);
            }
            Some(Note::Online {
                agent, relay, at, ..
            }) if at >= killed && on_victim.contains(&agent) && relay != victim_addr => {
                back.entry(agent).or_insert((at, relay));
            }
            Some(Note::Done { task, .. }) => {
                done.insert(task);
            }
            Some(Note::Refused { agent, error }) => bail!("agent {agent} was refused: {error}"),
            Some(_) => {}
            None => break,
        }
    }

    // Read back from a survivor.
    let reader = &nodes[(victim + 1) % nodes.len()];
    let mut events_stored = 0;
    let mut incomplete = Vec::new();
    let mut gapped = 0;
    for task in &task_ids {
        let (events, state) = reader.follow(task, Duration::from_secs(2)).await?;
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
                .filter(|(a, _)| on.get(a).map(|(_, t)| *t) == Some(want))
                .map(|(_, at)| at.duration_since(killed))
                .collect(),
        )
    };
    let mut back_per_node = vec![0; nodes.len()];
    for (_, addr) in back.values() {
        if let Some(k) = node_of(nodes, *addr) {
            back_per_node[k] += 1;
        }
    }
    Ok(Failover {
        agents: ids.len(),
        on_victim: on_victim.len(),
        tasks,
        tasks_on_victim,
        noticed_quic: noticed_by(Transport::Quic),
        noticed_websocket: noticed_by(Transport::WebSocket),
        back: Summary::of(
            back.values()
                .map(|(at, _)| at.duration_since(killed))
                .collect(),
        ),
        not_back: on_victim.len() - back.len(),
        back_per_node,
        tasks_done: done.len(),
        events_expected: output.events() * tasks as u64,
        events_stored,
        incomplete,
        gapped,
    })
}

fn fresh(dir: &Path, name: &str) -> Result<PathBuf> {
    let dir = dir.join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn progress(what: &str) {
    eprintln!("ct-loadgen: {what}");
}
