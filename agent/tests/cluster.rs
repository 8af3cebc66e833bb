//! The relay as a cluster: three nodes on one PostgreSQL database and one nats-server (both real, started by
//! the test support), with the real agent and the real Claude Code CLI on the fake Messages API.
//!
//! The agent pairs with (and connects to) one node; tasks are submitted, followed, decided and cancelled on
//! the others, which reach it only through the shared store and the bus.

use std::path::Path;

use ct_agent::{LinkStatus, RunError};
use ct_protocol::handshake::VerifiedAgent;
use ct_protocol::project::ProjectOp;
use ct_protocol::task::{Decision, FinalState, TaskEvent, TaskOptions};
use ct_protocol::Transport;
use ct_relay::cluster::Seal;
use ct_relay::core::CoreError;
use ct_relay::relay::ClusterConfig;
use ct_relay::store::TaskState;
use ct_relay::tasks::ReplyOutcome;
use ct_relay::RelayConfig;
use ct_testkit::nats::NatsServer;
use ct_testkit::postgres::PgServer;
use ct_testkit::{eventually, eventually_async, LongJob, Reply, UdpProxy};
use serde_json::json;

use crate::support::{TestAgent, TestRelay};
use crate::tasks::{
    allow_if_asked_until, prompts_in_last_request, submit, world, world_with, write, Follow, Opts,
    World, OWNER, T,
};

/// Where a test's cluster keeps its state: a database of its own on the shared PostgreSQL server, and the
/// shared nats-server (subjects name agents and tasks, which no two tests share).
pub(crate) struct SharedState {
    pub(crate) database_url: String,
    pub(crate) nats_url: String,
}

pub(crate) fn shared_state() -> SharedState {
    let name = format!("cluster_{}", rand::random::<u64>());
    SharedState {
        database_url: PgServer::shared()
            .create_database(&name)
            .expect("a database for the test's cluster"),
        nats_url: NatsServer::shared().url(),
    }
}

impl SharedState {
    /// The settings of node `i`, with its data directory (certificate, admin socket) in `dir`.
    pub(crate) fn node(&self, dir: &Path, i: usize) -> RelayConfig {
        let mut config = RelayConfig::new(dir.to_path_buf(), "127.0.0.1:0".parse().unwrap());
        config.core.node_id = format!("node-{i}");
        config.cluster = Some(ClusterConfig {
            database_url: self.database_url.clone(),
            nats_url: self.nats_url.clone(),
        });
        config
    }
}

async fn cluster() -> World {
    let w = world_with(Opts {
        cluster: Some(3),
        ..Opts::default()
    })
    .await;
    // Its pairing names every node that was up when it paired (each node registers itself before it serves,
    // and the token is minted from the store's list, not the minting node's last heartbeat), so it can move
    // when its node goes.
    let pairing = w.agent_config.load_pairing().unwrap().unwrap();
    assert_eq!(pairing.relays.len(), 3, "{:?}", pairing.relays);
    // Every node sees the agent online (through its heartbeat's view of the others) before tests use them.
    for node in &w.nodes {
        eventually_async(T, async || {
            node.core
                .agents()
                .await
                .unwrap()
                .iter()
                .any(|a| a.online && a.node.as_deref() == Some("node-1"))
        })
        .await;
    }
    w
}

async fn follow_on(node: &TestRelay, task: &str) -> Follow {
    let (_, stored, rx) = node.core.follow(task).await.expect("follow");
    Follow::new(task, stored, rx)
}

/// Submits on `on` a task whose Bash tool runs `job` (Claude then says `then`), follows it on `follow`, and
/// lets the job run: allowed from `follow`'s node if the CLI asks, which is its own business.
async fn run_job(
    w: &World,
    on: &TestRelay,
    follow: &TestRelay,
    job: &LongJob,
    then: &str,
) -> Follow {
    w.fake.push(Reply::tool_use(
        "Bash",
        json!({ "command": job.command(), "description": "Run the long job" }),
    ));
    w.fake.push(Reply::text(then));
    let rec = on
        .core
        .submit_task(submit(
            OWNER,
            "app",
            "run the long job",
            TaskOptions::default(),
        ))
        .await
        .unwrap();
    let mut f = follow_on(follow, &rec.spec.task).await;
    allow_if_asked_until(follow, &mut f, || {
        job.child_below(std::process::id()).is_some()
    })
    .await;
    f
}

#[tokio::test]
async fn a_task_submitted_on_one_node_runs_on_an_agent_held_by_another_and_a_third_decides() {
    let w = cluster().await;
    let (a, c) = (&w.nodes[0], &w.nodes[1]);
    let file = w.project.join("cluster.txt");
    w.fake
        .push(Reply::tool_use("Write", write(&file, "from node-0")));
    w.fake.push(Reply::text("written"));
    let options = TaskOptions {
        permission_mode: Some("default".into()),
        ..TaskOptions::default()
    };
    let rec = a
        .core
        .submit_task(submit(OWNER, "app", "write a file", options))
        .await
        .expect("node-0 accepts a task for an agent on node-1");
    // Followed on node-0 and node-2; neither holds the agent.
    let mut on_a = follow_on(a, &rec.spec.task).await;
    let mut on_c = follow_on(c, &rec.spec.task).await;
    let approval = match on_c
        .until("the approval request", |e| {
            matches!(e, TaskEvent::ApprovalRequested { .. })
        })
        .await
    {
        TaskEvent::ApprovalRequested { approval, .. } => approval,
        _ => unreachable!(),
    };
    // A stranger on the deciding node is refused there.
    let allow = Decision::AllowOnce {
        updated_input: None,
    };
    assert!(c
        .core
        .decide("999", &rec.spec.task, &approval, allow.clone())
        .await
        .is_err());
    c.core
        .decide(OWNER, &rec.spec.task, &approval, allow)
        .await
        .expect("node-2 passes the owner's decision to node-1");
    let (state, message) = on_a.finished().await;
    assert_eq!(state, FinalState::Done, "{message:?}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "from node-0");
    on_c.finished().await;
    // Every node's follower saw each event once, in order, as the log has them.
    let (_, log, _) = w.relay.core.follow(&rec.spec.task).await.unwrap();
    let seqs: Vec<u64> = log.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, (1..=log.len() as u64).collect::<Vec<_>>());
    assert_eq!(on_a.seqs(), seqs, "node-0's follower");
    assert_eq!(on_c.seqs(), seqs, "node-2's follower");
    assert_eq!(
        a.core.task(&rec.spec.task).await.unwrap().state,
        TaskState::Done
    );
}

#[tokio::test]
async fn a_cancel_from_another_node_stops_the_task_on_the_agent() {
    let w = cluster().await;
    let (a, c) = (&w.nodes[0], &w.nodes[1]);
    let job = LongJob::write(&w.project, 300);
    // Submitted on node-0, followed and allowed from node-2: neither holds the agent.
    let mut f = run_job(&w, a, c, &job, "stopped").await;
    a.core
        .cancel_task(OWNER, &f.task)
        .await
        .expect("node-0 sends the cancel to node-1's agent");
    let (state, _) = f.finished().await;
    assert_eq!(state, FinalState::Cancelled);
    ct_testkit::process::poll_until(T, "the job to stop", || {
        job.child_below(std::process::id()).is_none()
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_revocation_on_one_node_drops_the_agent_held_by_another() {
    let mut w = cluster().await;
    let agent = w.nodes[0]
        .core
        .agents()
        .await
        .unwrap()
        .into_iter()
        .next()
        .expect("the agent");
    w.nodes[0]
        .core
        .revoke(&agent.fingerprint.to_string(), OWNER)
        .await
        .unwrap();
    let ended = tokio::time::timeout(T, w.take_agent().wait())
        .await
        .expect("the agent's run ends when node-1 closes it");
    assert!(matches!(ended, Err(RunError::Revoked { .. })), "{ended:?}");
    eventually_async(T, async || w.relay.core.online().await == 0).await;
}

/// A revocation that lands while an agent's session is being admitted on another node (after its record was
/// read, before the session could hear other nodes' notices) still ends it: the registration reads the
/// record again once the session is subscribed.
#[tokio::test]
async fn a_revocation_between_an_admission_and_its_registration_ends_the_session() {
    let mut w = cluster().await;
    let agent = w.nodes[0].core.agents().await.unwrap().remove(0);
    w.take_agent().stop().await.unwrap();
    eventually_async(T, async || w.relay.core.online().await == 0).await;
    let node = &w.nodes.last().unwrap().core;
    // What the handshake hands the core once the agent proved its key (the admission reads only the
    // fingerprint and the pairing request).
    let verified = VerifiedAgent {
        key: ed25519_dalek::SigningKey::from_bytes(&[1; 32]).verifying_key(),
        fingerprint: agent.fingerprint,
        protocol: ct_protocol::version::PROTOCOL_VERSION,
        software: "test".into(),
        pair: None,
    };
    let welcome = node
        .admit(&verified, "127.0.0.1".parse().unwrap())
        .await
        .expect("admitted: nothing is revoked yet");
    w.nodes[0]
        .core
        .revoke(&agent.fingerprint.to_string(), OWNER)
        .await
        .unwrap();
    let registered = node
        .register_session(
            agent.fingerprint,
            Transport::Quic,
            "127.0.0.1:9".parse().unwrap(),
            "test",
            welcome.owner,
        )
        .await;
    match registered {
        Err(CoreError::Revoked(_)) => {}
        Ok(_) => panic!("a session was registered for a revoked key"),
        Err(e) => panic!("refused for another reason: {e}"),
    }
    assert_eq!(node.online().await, 0);
}

/// Whoever can reach NATS but is not a node (no relay key) cannot act on an agent through the bus: a forged,
/// a foreign-keyed or a re-addressed message is dropped; only a message the cluster's key sealed for that
/// agent's subject is acted on.
#[tokio::test]
async fn a_message_on_the_bus_that_no_node_sealed_is_ignored() {
    let mut w = cluster().await;
    let agent = w.nodes[0].core.agents().await.unwrap().remove(0);
    let subject = ct_relay::cluster::agent_subject(&agent.fingerprint.0);
    let nats = async_nats::connect(NatsServer::shared().url())
        .await
        .expect("the test reaches NATS as an outsider would");
    let revoke = br#"{"kind":"close","reason":"revoked"}"#;
    let cluster = Seal::from_relay_secret(&w.relay.core.relay_key().to_bytes());
    let forgeries = [
        // Unsealed, as the bus carried messages before they were sealed.
        bytes::Bytes::from_static(revoke),
        // Sealed, but with a key that is not the cluster's.
        Seal::from_relay_secret(&[9; 32]).seal(&subject, revoke),
        // Sealed by the cluster's key for another agent's subject, moved to this one.
        cluster.seal("ct.agent.00", revoke),
    ];
    for forged in forgeries {
        nats.publish(subject.clone(), forged).await.unwrap();
    }
    // The same connection's messages arrive in order: once this one is acted on (its node closes the session
    // as on a drain, and the agent moves), the forgeries before it were refused, or the agent would have been
    // dropped as revoked and never connect again.
    nats.publish(
        subject.clone(),
        cluster.seal(&subject, br#"{"kind":"close","reason":"shutdown"}"#),
    )
    .await
    .unwrap();
    nats.flush().await.unwrap();
    let mut agent = w.take_agent();
    agent.disconnected(T).await;
    agent.connected(T).await;
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn a_node_that_drains_mid_task_hands_its_agent_to_another_and_no_event_is_lost_or_doubled() {
    let w = cluster().await;
    let job = LongJob::gated(&w.project);
    let a = &w.nodes[0];
    let mut f = run_job(&w, a, a, &job, "slept well").await;
    let task = f.task.clone();
    // node-1 (the agent's) drains: it says Closing{Shutdown}, and the agent moves to another address.
    w.relay.begin_stop();
    job.release();
    let (state, message) = f.finished().await;
    assert_eq!(state, FinalState::Done, "{message:?}: {:#?}", f.seen);
    let (rec, stored, _) = a.core.follow(&task).await.unwrap();
    let seqs: Vec<u64> = stored.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, (1..=stored.len() as u64).collect::<Vec<_>>());
    assert_eq!(f.seqs(), seqs, "the follower on node-0 saw each event once");
    assert_eq!(rec.state, TaskState::Done);
    // The agent is back, on a node that is still up.
    eventually_async(T, async || {
        a.core
            .agents()
            .await
            .unwrap()
            .iter()
            .any(|v| v.online && v.node.as_deref() != Some("node-1"))
    })
    .await;
}

/// An agent whose pairing names one node (it paired before the others joined, or before its relay became a
/// cluster) learns the others from its Welcome, remembers them, and moves to one when its node drains.
#[tokio::test]
async fn an_agent_that_knows_one_node_learns_the_others_and_moves_to_one() {
    let mut w = cluster().await;
    let mut pairing = w.agent_config.load_pairing().unwrap().unwrap();
    pairing.relays.truncate(1);
    w.agent_config.store_pairing(&pairing).unwrap();
    w.restart_agent().await;
    eventually_async(T, async || {
        w.agent_config.load_pairing().unwrap().unwrap().relays.len() == 3
    })
    .await;
    let learned = w.agent_config.load_pairing().unwrap().unwrap().relays;
    assert_eq!(learned[0], pairing.relays[0], "what it knew stays first");
    w.relay.begin_stop();
    let a = &w.nodes[0];
    eventually_async(T, async || {
        a.core
            .agents()
            .await
            .unwrap()
            .iter()
            .any(|v| v.online && v.node.as_deref() != Some("node-1"))
    })
    .await;
}

/// Waits until every node says ready (`/readyz`'s answer) or not.
async fn all_ready(w: &World, ready: bool) {
    let nodes: Vec<&TestRelay> = std::iter::once(&w.relay).chain(&w.nodes).collect();
    eventually_async(T, async || {
        nodes.iter().all(|n| n.core.cluster_ready() == ready)
    })
    .await;
}

#[tokio::test]
async fn the_cluster_rides_out_nats_and_postgresql_restarts_without_losing_an_acknowledged_event() {
    let pg = PgServer::start().expect("a PostgreSQL of this test's own");
    let mut nats = NatsServer::start().expect("a nats-server of this test's own");
    let state = SharedState {
        database_url: pg.create_database("recovery").unwrap(),
        nats_url: nats.url(),
    };
    let w = world_with(Opts {
        cluster: Some(2),
        cluster_state: Some(state),
        ..Opts::default()
    })
    .await;
    let a = &w.nodes[0];
    eventually_async(T, async || {
        a.core.agents().await.unwrap().iter().any(|v| v.online)
    })
    .await;
    let job = LongJob::gated(&w.project);
    let mut f = run_job(&w, a, a, &job, "slept well").await;
    let task = f.task.clone();

    // NATS goes away: every node says it is not ready; it comes back: ready again, by itself.
    nats.kill();
    all_ready(&w, false).await;
    nats.restart().expect("nats-server starts again");
    all_ready(&w, true).await;

    // PostgreSQL goes away (SIGKILL) while the job ends and the agent reports; nodes say not ready, and
    // nothing is acknowledged that is not stored. It comes back: the events arrive, each once.
    pg.kill();
    all_ready(&w, false).await;
    job.release();
    eventually(T, || w.fake.main_requests().len() >= 2).await;
    pg.restart().expect("PostgreSQL starts again");
    all_ready(&w, true).await;
    let (state, message) = f.finished().await;
    assert_eq!(state, FinalState::Done, "{message:?}: {:#?}", f.seen);
    let (rec, stored, _) = a.core.follow(&task).await.unwrap();
    let seqs: Vec<u64> = stored.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, (1..=stored.len() as u64).collect::<Vec<_>>());
    assert_eq!(f.seqs(), seqs, "the follower on node-0 saw each event once");
    assert_eq!(rec.state, TaskState::Done);
    // Routing works again after both restarts: a decision-free task from node-0 runs on node-1's agent.
    w.fake.push(Reply::text("still here"));
    let again = a
        .core
        .submit_task(submit(OWNER, "app", "say hello", TaskOptions::default()))
        .await
        .unwrap();
    let mut g = follow_on(a, &again.spec.task).await;
    assert_eq!(g.finished().await.0, FinalState::Done);
}

#[tokio::test]
async fn follow_ups_and_project_requests_from_other_nodes_reach_the_agent() {
    let w = cluster().await;
    let (a, c) = (&w.nodes[0], &w.nodes[1]);
    // A project request from node-2 is answered by the agent on node-1 (request and reply over the bus).
    let added = w.project.parent().unwrap().join("lib");
    std::fs::create_dir(&added).unwrap();
    let report = c
        .core
        .project(
            OWNER,
            None,
            ProjectOp::Add {
                name: "lib".into(),
                path: added.display().to_string(),
            },
        )
        .await
        .expect("node-2 asks the agent held by node-1");
    assert!(
        report.projects.iter().any(|p| p.name == "lib"),
        "{report:?}"
    );
    // A stranger's request is refused on the node that was asked, before anything crosses.
    assert!(c.core.project("999", None, ProjectOp::List).await.is_err());

    // A follow-up sent from node-0 while the turn runs goes into the same session on node-1's agent.
    let job = LongJob::gated(&w.project);
    w.fake.push(Reply::tool_use(
        "Bash",
        json!({ "command": job.command(), "description": "Think" }),
    ));
    w.fake.push(Reply::text("first answer"));
    w.fake.push(Reply::text("second answer"));
    let rec = c
        .core
        .submit_task(submit(
            OWNER,
            "app",
            "first question",
            TaskOptions::default(),
        ))
        .await
        .unwrap();
    let mut f = follow_on(a, &rec.spec.task).await;
    allow_if_asked_until(a, &mut f, || job.child_below(std::process::id()).is_some()).await;
    let sent = a
        .core
        .reply(OWNER, &rec.spec.task, "second question".into(), None)
        .await
        .unwrap();
    assert!(matches!(sent, ReplyOutcome::Sent(_)), "{sent:?}");
    job.release();
    assert_eq!(f.finished().await.0, FinalState::Done);
    let turns = f
        .seen
        .iter()
        .filter(|(_, e)| matches!(e, TaskEvent::TurnFinished { .. }))
        .count();
    assert_eq!(turns, 2, "{:#?}", f.seen);
    assert!(prompts_in_last_request(&w.fake).contains("second question"));
}

#[tokio::test]
async fn a_task_for_an_agent_between_nodes_waits_and_runs_once_when_it_is_back() {
    let mut w = cluster().await;
    // The agent goes away (as when its node drains and it has not reached another yet).
    w.take_agent().stop().await.unwrap();
    let a = &w.nodes[0];
    eventually_async(T, async || {
        !a.core.agents().await.unwrap().iter().any(|v| v.online)
    })
    .await;
    w.fake.push(Reply::text("ran once"));
    let rec = a
        .core
        .submit_task(submit(OWNER, "app", "wait for me", TaskOptions::default()))
        .await
        .expect("queued, not refused: the agent left moments ago");
    assert_eq!(rec.state, TaskState::Queued);
    let mut f = follow_on(a, &rec.spec.task).await;
    w.restart_agent().await;
    assert_eq!(f.finished().await.0, FinalState::Done);
    let started = f
        .seen
        .iter()
        .filter(|(_, e)| matches!(e, TaskEvent::Started { .. }))
        .count();
    assert_eq!(started, 1, "{:#?}", f.seen);
    assert_eq!(w.fake.main_requests().len(), 1, "Claude was asked once");
}

/// Points the agent's pairing at `relays` only (it still learns a cluster's nodes from its Welcome), restarts
/// it, and checks it is held through `proxy`, over QUIC (the proxy forwards UDP only). Returns the agent.
async fn restart_through(w: &mut World, proxy: &UdpProxy, relays: Vec<String>) -> TestAgent {
    let mut pairing = w.agent_config.load_pairing().unwrap().unwrap();
    pairing.relays = relays;
    w.agent_config.store_pairing(&pairing).unwrap();
    w.restart_agent().await;
    let agent = w.take_agent();
    let status = agent.status.borrow().clone();
    match status {
        LinkStatus::Connected {
            transport,
            relay_addr,
            ..
        } => {
            assert_eq!(
                relay_addr,
                proxy.addr().to_string(),
                "held through the proxy"
            );
            assert_eq!(transport, Transport::Quic);
        }
        other => panic!("not connected: {other:?}"),
    }
    agent
}

/// The reason the agent's last session ended, as `status.json` keeps it (and `ct-agent status` shows it).
fn last_error(w: &World) -> String {
    let report = ct_agent::status::gather(w.agent_dir()).unwrap();
    report
        .status
        .and_then(|s| s.last_error)
        .expect("a session ended, so status.json says why")
}

/// A node that dies without a word (SIGKILL, a cut cable) sends no reset: the agent's QUIC link just falls
/// silent. Here node-1 stays up and registered behind a UDP proxy that starts dropping everything; the agent,
/// which knows other nodes, leaves it because its transport heard nothing for `suspect_after`, before the
/// app-level `dead_after` (or QUIC's idle timeout, both 4 s) could have said the link was dead, and is held by
/// another node's address. What is asserted is the reason it left, which only the transport watch gives (no
/// timing: the machine is shared).
#[tokio::test]
async fn an_agent_leaves_a_node_whose_transport_falls_silent_for_another() {
    let mut w = world_with(Opts {
        cluster: Some(2),
        ..Opts::default()
    })
    .await;
    let proxy = UdpProxy::start(w.relay.addr).await.unwrap();
    let node0 = w.nodes[0].addr.to_string();
    let mut agent = restart_through(
        &mut w,
        &proxy,
        vec![proxy.addr().to_string(), node0.clone()],
    )
    .await;

    proxy.black_hole();
    let behind = proxy.addr().to_string();
    let moved = tokio::time::timeout(
        T,
        agent.status.wait_for(
            |s| matches!(s, LinkStatus::Connected { relay_addr, .. } if *relay_addr != behind),
        ),
    )
    .await
    .expect("the agent is held by another node's address")
    .expect("the agent runs")
    .clone();
    // node-0, or node-1 at its own address (learned from the Welcome): either way, not through the silent path.
    let LinkStatus::Connected { relay_addr, .. } = moved else {
        unreachable!()
    };
    assert!(
        [node0.as_str(), w.relay.addr.to_string().as_str()].contains(&relay_addr.as_str()),
        "{relay_addr}"
    );
    let why = last_error(&w);
    assert!(
        why.contains(&format!("no packet from relay node {behind}"))
            && why.contains("moving to another node"),
        "left for another reason than transport silence: {why}"
    );
    agent.stop().await.expect(
        "the agent ran on until stopped (its own new session was not taken for another agent)",
    );
}

/// With one relay address there is nowhere else to go: the transport watch stays off, and a silent link is
/// left the way it always was, when nothing has been heard for `dead_after` (or QUIC's idle timeout fires).
#[tokio::test]
async fn an_agent_with_one_relay_does_not_leave_it_for_transport_silence() {
    let mut w = world().await;
    let proxy = UdpProxy::start(w.relay.addr).await.unwrap();
    let mut agent = restart_through(&mut w, &proxy, vec![proxy.addr().to_string()]).await;

    proxy.black_hole();
    agent.disconnected(T).await;
    // Read at once: the next attempt, through the same black hole, takes ATTEMPT_TIMEOUT (25 s) to fail and
    // replace this reason.
    let why = last_error(&w);
    assert!(
        !why.contains("moving to another node"),
        "a single relay was left for transport silence: {why}"
    );
    agent.stop().await.unwrap();
}

/// One request to a node's HTTPS port, as the dashboard page makes it (the cluster's certificate is
/// self-signed).
async fn web(
    node: &TestRelay,
    method: reqwest::Method,
    path: &str,
    cookie: Option<&str>,
    csrf: Option<&str>,
    body: Option<serde_json::Value>,
) -> (u16, Option<String>, String) {
    let client = reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .build()
        .unwrap();
    let origin = format!("https://{}", node.addr);
    let mut req = client
        .request(method, format!("{origin}{path}"))
        .header("origin", &origin);
    if let Some(c) = cookie {
        req = req.header("cookie", c);
    }
    if let Some(t) = csrf {
        req = req.header("x-csrf-token", t);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.expect("the node answers");
    let status = resp.status().as_u16();
    let cookie = resp
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(str::to_string);
    (status, cookie, resp.text().await.unwrap())
}

/// The dashboard on a cluster: a link minted on one node signs in on another; the session, its CSRF token
/// and the task it starts work on a third, whose live stream follows the task on the agent another node holds.
#[tokio::test]
async fn the_dashboard_signs_in_on_one_node_and_works_on_every_other() {
    let w = cluster().await;
    let (a, b, c) = (&w.nodes[0], &w.relay, &w.nodes[1]);
    // As `/dashboard` mints it on node A.
    let token = a
        .core
        .read(|store| ct_relay::sessions::mint_link(store, OWNER, ct_relay::store::now()))
        .await
        .unwrap()
        .unwrap();
    let token = token.as_str();
    let (status, cookie, body) = web(
        b,
        reqwest::Method::POST,
        "/dashboard/api/signin",
        None,
        None,
        Some(json!({ "token": token })),
    )
    .await;
    assert_eq!(status, 204, "{body}");
    let cookie = cookie.expect("a session cookie");
    // Spent on B, so refused on C.
    let (status, _, _) = web(
        c,
        reqwest::Method::POST,
        "/dashboard/api/signin",
        None,
        None,
        Some(json!({ "token": token })),
    )
    .await;
    assert_eq!(status, 410);
    let (status, _, me) = web(
        c,
        reqwest::Method::GET,
        "/dashboard/api/me",
        Some(&cookie),
        None,
        None,
    )
    .await;
    assert_eq!(status, 200, "{me}");
    let me: serde_json::Value = serde_json::from_str(&me).unwrap();
    let csrf = me["csrf"].as_str().unwrap().to_string();
    let (_, _, agents) = web(
        c,
        reqwest::Method::GET,
        "/dashboard/api/agents",
        Some(&cookie),
        None,
        None,
    )
    .await;
    assert!(agents.contains("\"online\":true"), "{agents}");

    w.fake
        .push(Reply::text("hello from the agent another node holds"));
    let (status, _, task) = web(
        c,
        reqwest::Method::POST,
        "/dashboard/api/tasks",
        Some(&cookie),
        Some(&csrf),
        Some(json!({ "prompt": "say hello", "project": "app" })),
    )
    .await;
    assert_eq!(status, 201, "{task}");
    let task: serde_json::Value = serde_json::from_str(&task).unwrap();
    let id = task["id"].as_str().unwrap();
    // The live stream on A ends with the task's last event, every event on it once.
    let (status, _, stream) = web(
        a,
        reqwest::Method::GET,
        &format!("/dashboard/api/tasks/{id}/live"),
        Some(&cookie),
        None,
        None,
    )
    .await;
    assert_eq!(status, 200, "{stream}");
    assert!(
        stream.contains("hello from the agent another node holds")
            && stream.contains("\"kind\":\"finished\""),
        "{stream}"
    );
    let ids: Vec<&str> = stream
        .lines()
        .filter_map(|l| l.strip_prefix("id: "))
        .collect();
    let mut unique = ids.clone();
    unique.dedup();
    assert_eq!(ids, unique, "no event twice: {stream}");

    // Signing out everywhere from one node ends the session on all of them.
    let ended = b
        .core
        .read(|store| ct_relay::sessions::end_all(store, OWNER))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ended, 1);
    for node in [a, b, c] {
        let (status, _, _) = web(
            node,
            reqwest::Method::GET,
            "/dashboard/api/me",
            Some(&cookie),
            None,
            None,
        )
        .await;
        assert_eq!(status, 401);
    }
}
