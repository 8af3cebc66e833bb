//! Every benchmark scenario at a tiny size, so they keep working between benchmark runs. Each must really
//! happen — agents connected and counted by the relay, tasks started and finished, stored logs complete and
//! contiguous — but nothing here looks at how fast (that is what `scripts/bench` prints).
//!
//! The relay and the agent run as processes of this package's own binary (`ct-loadgen relay ...` and
//! `ct-loadgen agent ...` call the same libraries as `ct-relay` and `ct-agent`), so the test needs no other
//! binary built first.

use std::collections::BTreeSet;
use std::time::Duration;

use ct_loadgen::bench;
use ct_loadgen::dial::{self, Dial};
use ct_loadgen::relay::{Program, RelayProcess};
use ct_loadgen::scenario::{Plan, Tools};
use ct_protocol::AgentMessage;

fn tools(work_dir: &std::path::Path) -> Tools {
    let me = env!("CARGO_BIN_EXE_ct-loadgen");
    Tools {
        relay: Program::with_prefix(me, &["relay"]),
        agent: Program::with_prefix(me, &["agent"]),
        sizes: Vec::new(),
        rathole: None,
        work_dir: work_dir.to_path_buf(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_happens_at_a_tiny_size() {
    let dir = tempfile::tempdir().unwrap();
    let plan = Plan::tiny();
    // The cluster scenario has a test of its own (below): it needs PostgreSQL and nats-server.
    let only: BTreeSet<String> = bench::SCENARIOS
        .iter()
        .filter(|s| **s != "cluster")
        .map(|s| s.to_string())
        .collect();
    let out = bench::run(&plan, &tools(dir.path()), &only)
        .await
        .expect("the run completes");
    assert!(out.failed.is_empty(), "failed scenarios: {:?}", out.failed);

    let f = out.footprint.as_ref().expect("footprint ran");
    assert!(f.transport.is_some(), "the agent connected");
    assert!(f.end.rss_kib > 0 && f.end.threads > 0);

    let (n, _) = out.pairing.expect("agents were paired");
    assert!(n >= plan.idle_agents);
    let labels: Vec<_> = out.idle.iter().map(|o| o.label).collect();
    assert_eq!(labels, ["QUIC", "WebSocket", "mixed"]);
    for o in &out.idle {
        assert_eq!(
            o.online, plan.idle_agents,
            "{}: the relay counts them all",
            o.label
        );
        assert!(o.after.fds > 0 && o.after.rss_kib > 0);
    }
    assert_eq!(out.idle[0].quic, plan.idle_agents);
    assert_eq!(out.idle[1].websocket, plan.idle_agents);
    assert!(out.idle[2].quic > 0 && out.idle[2].websocket > 0);

    let c = out.churn.as_ref().expect("churn ran");
    assert_eq!(c.cycles, plan.churn_cycles);
    assert_eq!(c.failures, 0, "every reconnect handshake succeeded");
    assert_eq!(c.online_at_end, 0, "every churned session is gone");

    let r = out.restart.as_ref().expect("restart ran");
    assert_eq!(r.not_back, 0, "every agent came back after the restart");
    assert_eq!(r.back.count, plan.restart_agents);
    assert_eq!(r.tasks, plan.restart_tasks);
    assert!(r.events_expected > 0);
    // Every stored log was read back, and each is a contiguous run from 1. Whether each is also complete is
    // the benchmark's figure, not asserted here: today a SIGKILL can lose an event the relay had already
    // acknowledged, which leaves that task's log stopped short (BENCHMARKS.md, "relay restart").
    assert_eq!(r.gapped, 0, "a stored log has a hole or a repeat");
    assert!(r.events_stored > 0 && r.events_stored <= r.events_expected);
    assert!(r.tasks_done + r.incomplete.len() >= r.tasks);

    let d = out.dispatch.as_ref().expect("dispatch ran");
    let expected = (plan.dispatch_rate as f64 * plan.dispatch_duration.as_secs_f64()) as usize;
    assert_eq!(d.submitted, expected);
    assert_eq!(d.started, d.submitted, "every task reached its agent");
    assert_eq!(d.done, d.submitted, "every task's output was acknowledged");
    assert_eq!(d.latency.count, d.submitted);

    assert_eq!(out.events.len(), 3);
    for (label, e) in &out.events {
        assert!(e.contiguous, "{label}: every follower saw 1, 2, 3, ...");
        assert_eq!(e.tasks, plan.event_tasks);
        assert!(e.text_bytes > 0);
    }

    let h = out.history.as_ref().expect("history ran");
    assert_eq!(
        h.stored, plan.history_tasks,
        "the whole history was written"
    );
    assert_eq!(h.users, plan.history_users);
    for (figure, s) in [
        ("autocomplete", &h.autocomplete),
        ("submit", &h.submit),
        ("resume", &h.resume),
        ("share added", &h.share_add),
        ("share removed", &h.share_remove),
    ] {
        assert_eq!(s.count, plan.history_calls, "{figure}: every call was made");
    }
    assert_eq!(
        h.autocomplete_found,
        ct_loadgen::scenario::history::AUTOCOMPLETE,
        "autocomplete found a full page of the user's tasks"
    );
    assert_eq!(
        h.finished,
        2 * plan.history_calls,
        "every submitted and resumed task finished"
    );

    assert!(out.rathole.is_none(), "no rathole binary was given");
    // The table renders with a row per figure.
    let table = bench::report(&out, &plan).to_string();
    assert!(table.contains("relay RSS per agent, QUIC"), "{table}");
    assert!(table.contains("task-id autocomplete"), "{table}");
}

/// The cluster scenario at a tiny size, on a real PostgreSQL and nats-server: three relay processes and one
/// beside them hold their agents, run tasks submitted on other nodes, and a node is killed under streaming
/// tasks whose agents come back on the survivors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_scenario_happens_at_a_tiny_size() {
    let dir = tempfile::tempdir().unwrap();
    let plan = Plan::tiny();
    let only = BTreeSet::from(["cluster".to_string()]);
    let out = bench::run(&plan, &tools(dir.path()), &only)
        .await
        .expect("the run completes");
    assert!(out.failed.is_empty(), "failed parts: {:?}", out.failed);
    let c = out.cluster.as_ref().expect("the cluster scenario ran");
    for (side, nodes) in [(&c.single, 1), (&c.cluster, 3)] {
        assert_eq!(side.nodes, nodes);
        let h = side.held.as_ref().expect("agents held");
        assert_eq!(h.per_node.len(), nodes);
        let held: usize = h.per_node.iter().map(|n| n.agents).sum();
        assert_eq!(held, plan.cluster_agents, "every agent was online at once");
        assert!(
            h.per_node.iter().all(|n| n.agents > 0),
            "each node held some"
        );
        let d = side.dispatch.as_ref().expect("dispatch ran");
        assert_eq!(d.started, d.submitted, "every task reached its agent");
        if nodes > 1 {
            assert_eq!(d.same_node, 0, "every task went through another node");
        }
    }
    assert!(c.single.failover.is_none());
    let f = c.cluster.failover.as_ref().expect("failover ran");
    assert!(f.on_victim > 0, "the killed node held agents");
    assert_eq!(f.not_back, 0, "its agents came back on the survivors");
    assert_eq!(f.back_per_node[1], 0, "none on the killed node");
    // Whether every event was kept is the benchmark's figure; here the logs must be readable and whole runs.
    assert_eq!(f.gapped, 0, "a stored log has a hole or a repeat");
    assert!(f.events_stored > 0 && f.events_stored <= f.events_expected);
    for e in [&c.events_sled, &c.events_postgres] {
        let e = e.as_ref().expect("events ran");
        assert!(e.contiguous && e.events > 0);
    }
    let table = bench::report(&out, &plan).to_string();
    assert!(table.contains("kill → back on a survivor"), "{table}");
}

/// The restart figures depend on this: a relay started again on the same data directory answers an agent's
/// old QUIC connection with a stateless reset, instead of leaving the agent to find out at its idle timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_relay_resets_old_quic_connections() {
    let dir = tempfile::tempdir().unwrap();
    let relay_program = tools(dir.path()).relay;
    let mut relay = RelayProcess::start(&relay_program, &dir.path().join("relay"))
        .await
        .unwrap();
    let target = relay.target.clone();
    let who = ct_loadgen::fleet::pair(&target, 0, 1, Dial::Quic, |user| {
        let relay = &relay;
        async move { relay.pair_code(&user).await }
    })
    .await
    .unwrap()
    .remove(0);
    let mut link = dial::dial(&target, &who, Dial::Quic, None).await.unwrap();
    let conn = link.quic_connection().expect("a QUIC link").clone();

    relay.kill().await.unwrap();
    relay.restart().await.unwrap();
    // The next packet from the agent reaches the new process, which has never heard of this connection.
    let _ = link.writer.send(&AgentMessage::Heartbeat).await;
    let reason = tokio::time::timeout(Duration::from_secs(10), conn.closed())
        .await
        .expect("the connection ends");
    assert!(
        matches!(reason, quinn::ConnectionError::Reset),
        "expected a stateless reset, got {reason:?}"
    );
    relay.stop().await.unwrap();
}
