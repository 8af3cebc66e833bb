//! Each agent's queue, through the relay core with a protocol-level stand-in for the agent: the concurrency
//! limit, first in first out, queued tasks across reconnects, cancelling without the agent, the queue's bound,
//! and which agent a user with several gets.

use std::time::Duration;

use crate::support::{agent, connect, event_acked, expect_ack, expect_start, finished, TestRelay};
use ct_protocol::message::{AgentMessage, RelayMessage};
use ct_protocol::task::{FinalState, TaskEvent};
use ct_relay::store::{ShareLevel, TaskState};
use ct_relay::tasks::{Submit, TaskError};
use ct_relay::RelayConfig;

fn own(user: &str) -> Submit {
    Submit {
        user: user.into(),
        project: "web".into(),
        prompt: "do it".into(),
        ..Default::default()
    }
}

async fn relay_with(dir: &std::path::Path, running: usize, queued: usize) -> TestRelay {
    let mut config = RelayConfig::new(dir.into(), "127.0.0.1:0".parse().unwrap());
    config.core.max_running_per_agent = running;
    config.core.max_queued_per_agent = queued;
    TestRelay::start_with(config).await
}

#[tokio::test]
async fn with_one_slot_the_second_task_waits_until_the_first_ends() {
    let dir = tempfile::tempdir().unwrap();
    let relay = relay_with(dir.path(), 1, 20).await;
    let (_key, mut agent) = agent(&relay, "1").await;
    let first = relay.core.submit_task(own("1")).await.unwrap();
    assert!(first.dispatched_at.is_some());
    assert_eq!(expect_start(&mut agent).await.task, first.spec.task);
    let second = relay.core.submit_task(own("1")).await.unwrap();
    assert_eq!(
        (second.state, second.dispatched_at),
        (TaskState::Queued, None)
    );
    let (first, second) = (first.spec.task, second.spec.task);

    // The agent was never given the queued task: an event for it is not stored or acknowledged (the next
    // acknowledgement is for the running task).
    crate::support::send_event(
        &mut agent,
        &second,
        1,
        TaskEvent::Text {
            text: "forged".into(),
        },
    )
    .await;
    event_acked(
        &mut agent,
        &first,
        1,
        TaskEvent::Started { cwd: "/w".into() },
    )
    .await;
    assert!(relay.core.store().events(&second, 0).unwrap().is_empty());

    event_acked(&mut agent, &first, 2, finished(FinalState::Done)).await;
    assert_eq!(expect_start(&mut agent).await.task, second);
    assert!(relay
        .core
        .task(&second)
        .await
        .unwrap()
        .dispatched_at
        .is_some());
}

#[tokio::test]
async fn tasks_leave_the_queue_in_the_order_they_came() {
    let dir = tempfile::tempdir().unwrap();
    let relay = relay_with(dir.path(), 1, 20).await;
    let (_key, mut agent) = agent(&relay, "1").await;
    let mut ids: Vec<String> = Vec::new();
    for _ in 0..5 {
        ids.push(relay.core.submit_task(own("1")).await.unwrap().spec.task);
    }
    for id in &ids {
        assert_eq!(&expect_start(&mut agent).await.task, id);
        event_acked(&mut agent, id, 1, finished(FinalState::Done)).await;
    }
}

#[tokio::test]
async fn queued_tasks_survive_a_reconnect_and_are_not_marked_lost() {
    let dir = tempfile::tempdir().unwrap();
    let relay = relay_with(dir.path(), 1, 20).await;
    let (key, mut agent) = agent(&relay, "1").await;
    let running = relay.core.submit_task(own("1")).await.unwrap().spec.task;
    expect_start(&mut agent).await;
    let queued = relay.core.submit_task(own("1")).await.unwrap().spec.task;
    drop(agent);
    crate::support::eventually_async(Duration::from_secs(5), async || {
        !crate::support::is_online(&relay, &key).await
    })
    .await;
    let err = relay.core.submit_task(own("1")).await.unwrap_err();
    assert!(
        matches!(err, TaskError::Offline { .. }) && err.to_string().contains("last seen"),
        "{err}"
    );

    // Back, still running the first task: the queued one stays queued (the slot is taken).
    let mut agent = connect(&relay, &key).await;
    agent
        .writer
        .send(&AgentMessage::Running {
            tasks: vec![running.clone()],
        })
        .await
        .unwrap();
    event_acked(
        &mut agent,
        &running,
        1,
        TaskEvent::Started { cwd: "/w".into() },
    )
    .await;
    let rec = relay.core.task(&queued).await.unwrap();
    assert_eq!((rec.state, rec.dispatched_at), (TaskState::Queued, None));

    // Back again, having lost the first task: that one is lost, the queued one is sent, not lost.
    drop(agent);
    crate::support::eventually_async(Duration::from_secs(5), async || {
        !crate::support::is_online(&relay, &key).await
    })
    .await;
    let mut agent = connect(&relay, &key).await;
    agent
        .writer
        .send(&AgentMessage::Running { tasks: vec![] })
        .await
        .unwrap();
    assert_eq!(expect_start(&mut agent).await.task, queued);
    assert_eq!(
        relay.core.task(&running).await.unwrap().state,
        TaskState::Lost
    );
    assert_eq!(
        relay.core.task(&queued).await.unwrap().state,
        TaskState::Queued
    );

    // A second report in the same session cannot make the task just sent lost.
    agent
        .writer
        .send(&AgentMessage::Running { tasks: vec![] })
        .await
        .unwrap();
    event_acked(
        &mut agent,
        &queued,
        1,
        TaskEvent::Started { cwd: "/w".into() },
    )
    .await;
    assert_eq!(
        relay.core.task(&queued).await.unwrap().state,
        TaskState::Running
    );
}

#[tokio::test]
async fn a_task_sent_before_the_agents_running_report_is_not_lost_by_it() {
    let dir = tempfile::tempdir().unwrap();
    let relay = TestRelay::start(dir.path()).await;
    let (_key, mut agent) = agent(&relay, "1").await;
    // The report was written before the agent saw this task, so it does not list it.
    let id = relay.core.submit_task(own("1")).await.unwrap().spec.task;
    agent
        .writer
        .send(&AgentMessage::Running { tasks: vec![] })
        .await
        .unwrap();
    expect_start(&mut agent).await;
    event_acked(&mut agent, &id, 1, TaskEvent::Started { cwd: "/w".into() }).await;
    assert_eq!(
        relay.core.store().events(&id, 0).unwrap(),
        vec![(1, TaskEvent::Started { cwd: "/w".into() })],
        "no 'lost' event was written"
    );
    assert_eq!(
        relay.core.task(&id).await.unwrap().state,
        TaskState::Running
    );
}

#[tokio::test]
async fn a_queued_task_is_cancelled_without_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let relay = relay_with(dir.path(), 1, 20).await;
    let (_key, mut agent) = agent(&relay, "1").await;
    let running = relay.core.submit_task(own("1")).await.unwrap().spec.task;
    expect_start(&mut agent).await;
    let queued = relay.core.submit_task(own("1")).await.unwrap().spec.task;
    assert!(matches!(
        relay.core.cancel_task("2", &queued).await,
        Err(TaskError::NotYours(_))
    ));
    let (_, _, mut follower) = relay.core.follow(&queued).await.unwrap();
    relay.core.cancel_task("1", &queued).await.unwrap();
    let rec = relay.core.task(&queued).await.unwrap();
    assert_eq!((rec.state, rec.dispatched_at), (TaskState::Cancelled, None));
    let (_, event) = follower.recv().await.unwrap();
    assert!(matches!(
        event,
        TaskEvent::Finished {
            state: FinalState::Cancelled,
            ..
        }
    ));
    assert!(matches!(
        relay.core.cancel_task("1", &queued).await,
        Err(TaskError::Ended { .. })
    ));
    // Nor can the agent write into it: it never had it.
    crate::support::send_event(
        &mut agent,
        &queued,
        2,
        TaskEvent::Text {
            text: "forged".into(),
        },
    )
    .await;
    // The agent never hears of it: the next message it gets is the acknowledgement, then the next task.
    crate::support::send_event(&mut agent, &running, 1, finished(FinalState::Done)).await;
    expect_ack(&mut agent, &running, 1).await;
    let next = relay.core.submit_task(own("1")).await.unwrap().spec.task;
    assert_eq!(expect_start(&mut agent).await.task, next);
    assert_eq!(relay.core.store().events(&queued, 0).unwrap().len(), 1);
}

#[tokio::test]
async fn a_full_queue_refuses_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let relay = relay_with(dir.path(), 1, 2).await;
    let (_key, mut agent) = agent(&relay, "1").await;
    relay.core.submit_task(own("1")).await.unwrap();
    expect_start(&mut agent).await;
    relay.core.submit_task(own("1")).await.unwrap();
    relay.core.submit_task(own("1")).await.unwrap();
    let err = relay.core.submit_task(own("1")).await.unwrap_err();
    assert!(
        matches!(err, TaskError::QueueFull { queued: 2, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("wait for some to finish"), "{err}");
}

#[tokio::test]
async fn a_user_with_several_agents_gets_their_default() {
    let dir = tempfile::tempdir().unwrap();
    let relay = TestRelay::start(dir.path()).await;
    let core = &relay.core;
    let (_k1, mut first) = agent(&relay, "1").await;
    let (_k2, mut second) = agent(&relay, "1").await;
    let err = core.submit_task(own("1")).await.unwrap_err();
    assert!(matches!(err, TaskError::WhichAgent(_)), "{err}");
    assert!(
        err.to_string().contains("test-agent, test-agent-2") && err.to_string().contains("default"),
        "{err}"
    );
    // Sharing does not pick one either.
    core.share_add("1", "3", None, ShareLevel::Standard)
        .await
        .unwrap();
    let grantee = Submit {
        target: Some("1".into()),
        ..own("3")
    };
    let err = core.submit_task(grantee.clone()).await.unwrap_err();
    assert!(matches!(err, TaskError::WhichSharedAgent { .. }), "{err}");

    let chosen = core.set_default_agent("1", "test-agent-2").await.unwrap();
    assert_eq!(chosen.name, "test-agent-2");
    assert_eq!(
        core.default_agent("1").await.unwrap().unwrap().name,
        "test-agent-2"
    );
    let id = core.submit_task(own("1")).await.unwrap().spec.task;
    assert_eq!(expect_start(&mut second).await.task, id);
    let id = core.submit_task(grantee).await.unwrap().spec.task;
    assert_eq!(expect_start(&mut second).await.task, id);
    // Naming one still wins over the default.
    let id = core
        .submit_task(Submit {
            agent: Some("test-agent".into()),
            ..own("1")
        })
        .await
        .unwrap()
        .spec
        .task;
    assert_eq!(expect_start(&mut first).await.task, id);

    // Nobody sets a default to an agent that is not theirs.
    assert!(matches!(
        core.set_default_agent("2", "test-agent").await,
        Err(TaskError::NoAgent)
    ));
    let (_k3, _third) = agent(&relay, "2").await;
    let err = core
        .set_default_agent("2", &chosen.fingerprint.to_string())
        .await
        .unwrap_err();
    assert!(matches!(err, TaskError::UnknownAgent { .. }), "{err}");
    assert!(core.default_agent("2").await.unwrap().is_none());
    let err = core
        .submit_task(Submit {
            agent: Some("nope".into()),
            ..own("1")
        })
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("no agent called \"nope\""),
        "{err}"
    );
}

#[tokio::test]
async fn revoking_an_agent_ends_its_tasks() {
    let dir = tempfile::tempdir().unwrap();
    let relay = relay_with(dir.path(), 1, 20).await;
    let (_key, mut agent) = agent(&relay, "1").await;
    let running = relay.core.submit_task(own("1")).await.unwrap().spec.task;
    expect_start(&mut agent).await;
    let queued = relay.core.submit_task(own("1")).await.unwrap().spec.task;
    relay.core.revoke("test-agent", "1").await.unwrap();
    for id in [running, queued] {
        let rec = relay.core.task(&id).await.unwrap();
        assert_eq!(rec.state, TaskState::Lost, "{id}");
        assert!(rec.message.unwrap().contains("revoked"));
    }
    assert!(matches!(
        relay.core.submit_task(own("1")).await,
        Err(TaskError::NoAgent)
    ));
    // The session is closed with the reason.
    assert!(matches!(
        crate::support::recv(&mut agent).await,
        RelayMessage::Closing { .. }
    ));
}

#[tokio::test]
async fn a_user_sees_their_own_tasks_and_those_on_their_agents_newest_first() {
    let dir = tempfile::tempdir().unwrap();
    let relay = TestRelay::start(dir.path()).await;
    let core = &relay.core;
    let (_k1, mut one) = agent(&relay, "1").await;
    let (_k2, mut two) = agent(&relay, "2").await;
    core.share_add("1", "3", None, ShareLevel::Standard)
        .await
        .unwrap();
    let first = core.submit_task(own("1")).await.unwrap().spec.task;
    let theirs = core
        .submit_task(Submit {
            target: Some("1".into()),
            ..own("3")
        })
        .await
        .unwrap()
        .spec
        .task;
    let other = core.submit_task(own("2")).await.unwrap().spec.task;
    expect_start(&mut one).await;
    expect_start(&mut two).await;
    let ids = async |user: &str, limit| -> Vec<String> {
        core.tasks_for(user, limit)
            .await
            .unwrap()
            .into_iter()
            .map(|t| t.spec.task)
            .collect()
    };
    assert_eq!(ids("1", 10).await, vec![theirs.clone(), first.clone()]);
    assert_eq!(ids("1", 1).await, vec![theirs.clone()]);
    assert_eq!(ids("3", 10).await, vec![theirs]);
    assert_eq!(ids("2", 10).await, vec![other]);
    assert!(ids("4", 10).await.is_empty());
}
