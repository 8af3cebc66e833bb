//! Tasks through the relay over real sockets, with a protocol-level stand-in for the agent: routing, the
//! sequenced event log (exactly once across re-sends and a relay restart), lost tasks, cancel, approvals and
//! follow-ups.

use std::time::Duration;

use crate::support::{expect_ack, handshake, pair, recv, send_event, TestRelay};
use ct_protocol::message::{AgentMessage, RelayMessage};
use ct_protocol::task::{Decision, FinalState, TaskEvent, TaskOptions};
use ct_protocol::Transport;
use ct_relay::store::TaskState;
use ct_relay::tasks::{ReplyOutcome, Submit, TaskError};

fn submit(user: &str, prompt: &str) -> Submit {
    Submit {
        user: user.into(),
        project: "web".into(),
        prompt: prompt.into(),
        ..Default::default()
    }
}

fn text(t: &str) -> TaskEvent {
    TaskEvent::Text { text: t.into() }
}

#[tokio::test]
async fn refusals_say_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let relay = TestRelay::start(dir.path()).await;
    assert!(matches!(
        relay.core.submit_task(submit("1", "hi")).await,
        Err(TaskError::NoAgent)
    ));
    let _key = pair(&relay, Transport::Quic, "1").await;
    crate::support::eventually_async(Duration::from_secs(5), async || {
        relay.core.online().await == 0
    })
    .await;
    let err = relay.core.submit_task(submit("1", "hi")).await.unwrap_err();
    assert!(matches!(err, TaskError::Offline { .. }), "{err}");
    assert!(
        err.to_string().contains("ct-agent run") && err.to_string().contains("last seen"),
        "{err}"
    );
    let huge = "x".repeat(ct_protocol::task::MAX_PROMPT_LEN + 1);
    assert!(matches!(
        relay.core.submit_task(submit("1", &huge)).await,
        Err(TaskError::PromptTooLong { .. })
    ));
    assert!(matches!(
        relay.core.submit_task(submit("1", "  ")).await,
        Err(TaskError::EmptyPrompt)
    ));
    let _second = pair(&relay, Transport::Quic, "1").await;
    let err = relay.core.submit_task(submit("1", "hi")).await.unwrap_err();
    assert!(matches!(err, TaskError::WhichAgent(_)), "{err}");
}

#[tokio::test]
async fn a_task_reaches_its_agent_and_every_event_is_stored_once_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let relay = TestRelay::start(dir.path()).await;
    let key = pair(&relay, Transport::WebSocket, "1").await;
    let mut agent = handshake(
        Transport::WebSocket,
        relay.addr,
        &key,
        relay.fingerprint,
        None,
    )
    .await
    .unwrap();
    crate::support::eventually_async(Duration::from_secs(5), async || {
        relay.core.online().await == 1
    })
    .await;

    let rec = relay
        .core
        .submit_task(submit("1", "fix the build"))
        .await
        .unwrap();
    let id = rec.spec.task.clone();
    let RelayMessage::StartTask(spec) = recv(&mut agent).await else {
        panic!("expected StartTask")
    };
    assert_eq!(
        (
            spec.task.as_str(),
            spec.prompt.as_str(),
            spec.project.as_str()
        ),
        (id.as_str(), "fix the build", "web")
    );
    let (_, before, mut live) = relay.core.follow(&id).await.unwrap();
    assert!(before.is_empty());

    send_event(
        &mut agent,
        &id,
        1,
        TaskEvent::Started {
            cwd: "/src/web".into(),
        },
    )
    .await;
    expect_ack(&mut agent, &id, 1).await;
    send_event(&mut agent, &id, 2, text("hello")).await;
    expect_ack(&mut agent, &id, 2).await;
    // A re-send of something already stored (its ack was lost): acknowledged again, not stored twice.
    agent.acked.clear();
    send_event(&mut agent, &id, 2, text("hello")).await;
    expect_ack(&mut agent, &id, 2).await;
    // A gap is not acknowledged: the agent will re-send from the first unacknowledged event.
    send_event(&mut agent, &id, 4, text("too early")).await;
    send_event(
        &mut agent,
        &id,
        3,
        TaskEvent::Finished {
            state: FinalState::Done,
            message: None,
        },
    )
    .await;
    expect_ack(&mut agent, &id, 3).await;
    assert_eq!(agent.acked[&id], 3, "the early event 4 is not acknowledged");

    let stored = relay.core.store().events(&id, 0).unwrap();
    assert_eq!(
        stored.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    assert_eq!(stored[1].1, text("hello"));
    for want in 1..=3 {
        let (seq, _) = tokio::time::timeout(Duration::from_secs(5), live.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(seq, want, "followers see each event once, in order");
    }
    assert_eq!(relay.core.task(&id).await.unwrap().state, TaskState::Done);
}

/// Output arrives in bursts and is stored a burst at a time: the same rules hold inside one. Events after a
/// gap wait for it, re-sent ones are acknowledged and not stored twice.
#[tokio::test]
async fn a_burst_of_events_is_stored_up_to_its_first_gap() {
    let dir = tempfile::tempdir().unwrap();
    let relay = TestRelay::start(dir.path()).await;
    let (mut agent, id) = running_task(&relay).await;
    let seqs = |relay: &TestRelay| {
        let stored = relay.core.store().events(&id, 0).unwrap();
        stored.iter().map(|(s, _)| *s).collect::<Vec<_>>()
    };

    for seq in (1..=50).chain(52..=60) {
        send_event(&mut agent, &id, seq, text(&format!("line {seq}"))).await;
    }
    expect_ack(&mut agent, &id, 50).await;
    // Give the relay time to read all of it: nothing past the gap may be acknowledged or stored.
    tokio::time::sleep(Duration::from_millis(300)).await;
    while let Ok(Ok(Some(msg))) = tokio::time::timeout(
        Duration::from_millis(100),
        agent.reader.recv::<RelayMessage>(),
    )
    .await
    {
        assert!(
            matches!(msg, RelayMessage::Heartbeat),
            "nothing past the gap is acknowledged: {msg:?}"
        );
    }
    assert_eq!(agent.acked[&id], 50);
    assert_eq!(seqs(&relay), (1..=50).collect::<Vec<_>>());

    for seq in 51..=60 {
        send_event(&mut agent, &id, seq, text(&format!("line {seq}"))).await;
    }
    expect_ack(&mut agent, &id, 60).await;
    agent.acked.clear();
    for seq in 10..=20 {
        send_event(&mut agent, &id, seq, text("again")).await;
    }
    expect_ack(&mut agent, &id, 60).await;
    let stored = relay.core.store().events(&id, 0).unwrap();
    assert_eq!(
        stored.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        (1..=60).collect::<Vec<_>>()
    );
    assert_eq!(
        stored[14].1,
        text("line 15"),
        "a re-send does not overwrite"
    );
}

/// A paired, connected agent with one task started on it.
/// The agent reports the task's Claude Code session, then that the task is done: a task a reply can resume.
async fn finish_in_session(agent: &mut crate::support::Session, id: &str, session: &str) {
    let session = TaskEvent::Session {
        session_id: session.into(),
        model: None,
        claude_version: None,
    };
    crate::support::event_acked(agent, id, 1, session).await;
    crate::support::event_acked(agent, id, 2, crate::support::finished(FinalState::Done)).await;
}

async fn running_task(relay: &TestRelay) -> (crate::support::Session, String) {
    let (_, mut agent) = crate::support::agent(relay, "1").await;
    let id = relay
        .core
        .submit_task(submit("1", "stream"))
        .await
        .unwrap()
        .spec
        .task;
    assert_eq!(crate::support::expect_start(&mut agent).await.task, id);
    (agent, id)
}

#[tokio::test]
async fn across_a_relay_restart_nothing_is_lost_or_duplicated() {
    let dir = tempfile::tempdir().unwrap();
    let relay = TestRelay::start(dir.path()).await;
    let (addr, fp) = (relay.addr, relay.fingerprint);
    let key = pair(&relay, Transport::Quic, "1").await;
    let mut agent = handshake(Transport::Quic, addr, &key, fp, None)
        .await
        .unwrap();
    crate::support::eventually_async(Duration::from_secs(5), async || {
        relay.core.online().await == 1
    })
    .await;
    let id = relay
        .core
        .submit_task(submit("1", "long job"))
        .await
        .unwrap()
        .spec
        .task;
    let other = relay
        .core
        .submit_task(submit("1", "short job"))
        .await
        .unwrap()
        .spec
        .task;
    assert!(matches!(recv(&mut agent).await, RelayMessage::StartTask(_)));
    assert!(matches!(recv(&mut agent).await, RelayMessage::StartTask(_)));
    send_event(&mut agent, &id, 1, TaskEvent::Started { cwd: "/p".into() }).await;
    expect_ack(&mut agent, &id, 1).await;
    send_event(&mut agent, &id, 2, text("two")).await;
    expect_ack(&mut agent, &id, 2).await;

    relay.stop().await;
    let relay = TestRelay::start_with(ct_relay::RelayConfig::new(dir.path().into(), addr)).await;
    let mut agent = handshake(Transport::Quic, addr, &key, fp, None)
        .await
        .unwrap();
    // The agent still runs `id` (not `other`, which it finished or never started) and re-sends what it
    // cannot know was stored: event 2 again, then what came after.
    agent
        .writer
        .send(&AgentMessage::Running {
            tasks: vec![id.clone()],
        })
        .await
        .unwrap();
    for (seq, ev) in [
        (2, text("two")),
        (3, text("three")),
        (
            4,
            TaskEvent::Finished {
                state: FinalState::Done,
                message: None,
            },
        ),
    ] {
        send_event(&mut agent, &id, seq, ev).await;
    }
    for seq in [2, 3, 4] {
        expect_ack(&mut agent, &id, seq).await;
    }
    let stored = relay.core.store().events(&id, 0).unwrap();
    assert_eq!(
        stored.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        vec![1, 2, 3, 4],
        "{stored:?}"
    );
    assert_eq!(relay.core.task(&id).await.unwrap().state, TaskState::Done);
    let lost = relay.core.task(&other).await.unwrap();
    assert_eq!(
        lost.state,
        TaskState::Lost,
        "a task the agent no longer runs is marked lost"
    );
    assert!(lost.message.unwrap().contains("start it again"));
}

#[tokio::test]
async fn only_the_owner_decides_approvals_and_cancels_reach_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let relay = TestRelay::start(dir.path()).await;
    let key = pair(&relay, Transport::Quic, "1").await;
    let mut agent = handshake(Transport::Quic, relay.addr, &key, relay.fingerprint, None)
        .await
        .unwrap();
    crate::support::eventually_async(Duration::from_secs(5), async || {
        relay.core.online().await == 1
    })
    .await;
    let id = relay
        .core
        .submit_task(submit("1", "edit"))
        .await
        .unwrap()
        .spec
        .task;
    assert!(matches!(recv(&mut agent).await, RelayMessage::StartTask(_)));
    send_event(
        &mut agent,
        &id,
        1,
        TaskEvent::ApprovalRequested {
            approval: "a1".into(),
            tool: "Write".into(),
            summary: "Write src/main.rs".into(),
            input: serde_json::json!({"file_path": "src/main.rs"}),
            question: false,
            description: None,
            session: None,
            input_cut: false,
        },
    )
    .await;
    expect_ack(&mut agent, &id, 1).await;
    assert_eq!(
        relay.core.task(&id).await.unwrap().state,
        TaskState::WaitingApproval
    );

    let stranger = relay
        .core
        .decide("666", &id, "a1", Decision::AllowSession)
        .await
        .unwrap_err();
    assert!(matches!(stranger, TaskError::NotYours(_)), "{stranger}");
    assert!(matches!(
        relay.core.cancel_task("666", &id).await,
        Err(TaskError::NotYours(_))
    ));
    relay
        .core
        .decide(
            "1",
            &id,
            "a1",
            Decision::Deny {
                reason: "not that file".into(),
            },
        )
        .await
        .unwrap();
    assert_eq!(
        recv(&mut agent).await,
        RelayMessage::Decide {
            task: id.clone(),
            approval: "a1".into(),
            decision: Decision::Deny {
                reason: "not that file".into()
            }
        }
    );
    relay.core.cancel_task("1", &id).await.unwrap();
    assert_eq!(
        recv(&mut agent).await,
        RelayMessage::CancelTask { task: id.clone() }
    );
    send_event(
        &mut agent,
        &id,
        2,
        TaskEvent::Finished {
            state: FinalState::Cancelled,
            message: None,
        },
    )
    .await;
    expect_ack(&mut agent, &id, 2).await;
    assert!(matches!(
        relay.core.cancel_task("1", &id).await,
        Err(TaskError::Ended { .. })
    ));
}

#[tokio::test]
async fn an_agent_cannot_write_events_into_another_agents_task() {
    let dir = tempfile::tempdir().unwrap();
    let relay = TestRelay::start(dir.path()).await;
    let victim_key = pair(&relay, Transport::Quic, "1").await;
    let attacker_key = pair(&relay, Transport::Quic, "2").await;
    let mut victim = handshake(
        Transport::Quic,
        relay.addr,
        &victim_key,
        relay.fingerprint,
        None,
    )
    .await
    .unwrap();
    let mut attacker = handshake(
        Transport::Quic,
        relay.addr,
        &attacker_key,
        relay.fingerprint,
        None,
    )
    .await
    .unwrap();
    crate::support::eventually_async(Duration::from_secs(5), async || {
        relay.core.online().await == 2
    })
    .await;
    let id = relay
        .core
        .submit_task(submit("1", "work"))
        .await
        .unwrap()
        .spec
        .task;
    assert!(matches!(
        recv(&mut victim).await,
        RelayMessage::StartTask(_)
    ));
    send_event(&mut attacker, &id, 1, text("forged")).await;
    attacker
        .writer
        .send(&AgentMessage::Running { tasks: vec![] })
        .await
        .unwrap();
    // The victim's own event still gets sequence 1: the forged one was never stored.
    send_event(&mut victim, &id, 1, text("real")).await;
    expect_ack(&mut victim, &id, 1).await;
    assert_eq!(
        relay.core.store().events(&id, 0).unwrap(),
        vec![(1, text("real"))]
    );
    assert_eq!(
        relay.core.task(&id).await.unwrap().state,
        TaskState::Queued,
        "the attacker's Running{{}} did not mark it lost"
    );
}

#[tokio::test]
async fn an_operator_submits_through_the_admin_socket_and_follows_to_the_end() {
    use ct_relay::admin::{call_stream, Reply, Request};
    let dir = tempfile::tempdir().unwrap();
    let relay = TestRelay::start(dir.path()).await;
    let key = pair(&relay, Transport::Quic, "31").await;
    let mut agent = handshake(Transport::Quic, relay.addr, &key, relay.fingerprint, None)
        .await
        .unwrap();
    crate::support::eventually_async(Duration::from_secs(5), async || {
        relay.core.online().await == 1
    })
    .await;

    let data_dir = dir.path().to_path_buf();
    let operator = tokio::spawn(async move {
        let mut replies = Vec::new();
        let req = Request::Task {
            user: "31".into(),
            agent: None,
            project: "web".into(),
            prompt: "say hi".into(),
            options: TaskOptions::default(),
            target: None,
            name: None,
        };
        call_stream(&data_dir, &req, |r| {
            let end = matches!(r, Reply::End { .. } | Reply::Error { .. });
            replies.push(r);
            !end
        })
        .await
        .unwrap();
        replies
    });
    let RelayMessage::StartTask(spec) = recv(&mut agent).await else {
        panic!("expected StartTask")
    };
    let events = [
        TaskEvent::Started { cwd: "/p".into() },
        text("hi"),
        TaskEvent::Finished {
            state: FinalState::Done,
            message: None,
        },
    ];
    for (i, ev) in events.iter().enumerate() {
        send_event(&mut agent, &spec.task, i as u64 + 1, ev.clone()).await;
        expect_ack(&mut agent, &spec.task, i as u64 + 1).await;
    }
    let replies = tokio::time::timeout(Duration::from_secs(10), operator)
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(&replies[0], Reply::Task { task, .. } if *task == spec.task),
        "{replies:?}"
    );
    let got: Vec<TaskEvent> = replies
        .iter()
        .filter_map(|r| {
            if let Reply::Event { event, .. } = r {
                Some(event.clone())
            } else {
                None
            }
        })
        .collect();
    assert_eq!(got, events.to_vec());
    assert!(
        matches!(
            replies.last(),
            Some(Reply::End {
                state: TaskState::Done,
                ..
            })
        ),
        "{replies:?}"
    );
    let text = ct_relay::cli::render_event(&events[1]);
    assert_eq!(text, "hi\n");
}

#[tokio::test]
async fn a_reply_goes_to_a_running_task_and_resumes_a_finished_one() {
    let dir = tempfile::tempdir().unwrap();
    let relay = TestRelay::start(dir.path()).await;
    let (_key, mut agent) = crate::support::agent(&relay, "1").await;
    let id = relay
        .core
        .submit_task(submit("1", "start"))
        .await
        .unwrap()
        .spec
        .task;
    crate::support::expect_start(&mut agent).await;
    assert!(matches!(
        relay.core.reply("2", &id, "me too".into(), None).await,
        Err(TaskError::NotYours(_))
    ));
    assert!(matches!(
        relay.core.reply("1", &id, " ".into(), None).await,
        Err(TaskError::EmptyPrompt)
    ));
    let outcome = relay
        .core
        .reply("1", &id, "and the tests".into(), None)
        .await
        .unwrap();
    assert!(
        matches!(outcome, ReplyOutcome::Sent(ref r) if r.spec.task == id),
        "{outcome:?}"
    );
    assert_eq!(
        recv(&mut agent).await,
        RelayMessage::TaskInput {
            task: id.clone(),
            prompt: "and the tests".into()
        }
    );
    finish_in_session(&mut agent, &id, "0b7e-sess").await;

    let ReplyOutcome::Resumed(new) = relay
        .core
        .reply("1", &id, "one more thing".into(), Some("Ann".into()))
        .await
        .unwrap()
    else {
        panic!("expected a resumed task")
    };
    assert_eq!(new.follows.as_deref(), Some(id.as_str()));
    let spec = crate::support::expect_start(&mut agent).await;
    assert_eq!(spec.task, new.spec.task);
    assert_eq!(spec.resume.as_deref(), Some("0b7e-sess"));
    assert_eq!(
        (spec.project.as_str(), spec.prompt.as_str()),
        ("web", "one more thing")
    );
    assert_eq!(spec.requester.name.as_deref(), Some("Ann"));
}

#[tokio::test]
async fn a_reply_cannot_continue_what_it_should_not() {
    use ct_relay::store::ShareLevel;
    let dir = tempfile::tempdir().unwrap();
    let mut config = ct_relay::RelayConfig::new(dir.path().into(), "127.0.0.1:0".parse().unwrap());
    config.core.max_running_per_agent = 2;
    let relay = TestRelay::start_with(config).await;
    let core = &relay.core;
    let (_key, mut agent) = crate::support::agent(&relay, "1").await;

    // Ended before Claude Code started a session: nothing to resume.
    let early = core.submit_task(submit("1", "x")).await.unwrap().spec.task;
    crate::support::expect_start(&mut agent).await;
    crate::support::event_acked(
        &mut agent,
        &early,
        1,
        crate::support::finished(FinalState::Failed),
    )
    .await;
    let err = core
        .reply("1", &early, "again".into(), None)
        .await
        .unwrap_err();
    assert!(matches!(err, TaskError::NoSession(_)), "{err}");
    assert!(err.to_string().contains("/task"), "{err}");

    // A grantee's finished task, with a session.
    core.share_add("1", "2", None, ShareLevel::Standard)
        .await
        .unwrap();
    let grantee = Submit {
        target: Some("1".into()),
        ..submit("2", "theirs")
    };
    let theirs = core.submit_task(grantee.clone()).await.unwrap().spec.task;
    crate::support::expect_start(&mut agent).await;
    let session = |id: &str| TaskEvent::Session {
        session_id: id.into(),
        model: None,
        claude_version: None,
    };
    crate::support::event_acked(&mut agent, &theirs, 1, session("grantee-sess")).await;
    crate::support::event_acked(
        &mut agent,
        &theirs,
        2,
        crate::support::finished(FinalState::Done),
    )
    .await;
    // The owner's own finished task, with a session the grantee must not be able to resume (and read).
    let mine = core
        .submit_task(submit("1", "private"))
        .await
        .unwrap()
        .spec
        .task;
    crate::support::expect_start(&mut agent).await;
    crate::support::event_acked(&mut agent, &mine, 1, session("owner-sess")).await;
    crate::support::event_acked(
        &mut agent,
        &mine,
        2,
        crate::support::finished(FinalState::Done),
    )
    .await;
    assert!(matches!(
        core.reply("2", &mine, "show me".into(), None).await,
        Err(TaskError::NotYours(_))
    ));
    let err = core
        .submit_task(Submit {
            resume: Some("owner-sess".into()),
            ..grantee.clone()
        })
        .await
        .unwrap_err();
    assert!(matches!(err, TaskError::ResumeNotYours { .. }), "{err}");
    assert!(matches!(
        core.submit_task(Submit {
            resume: Some("../../etc".into()),
            ..grantee.clone()
        })
        .await,
        Err(TaskError::BadResume)
    ));
    // Their own session they may resume, directly or by replying.
    let resumed = core
        .submit_task(Submit {
            resume: Some("grantee-sess".into()),
            ..grantee.clone()
        })
        .await
        .unwrap()
        .spec
        .task;
    assert_eq!(
        crate::support::expect_start(&mut agent)
            .await
            .resume
            .as_deref(),
        Some("grantee-sess")
    );

    // Still queued: no session to talk to yet.
    let blocker = core
        .submit_task(submit("1", "busy"))
        .await
        .unwrap()
        .spec
        .task;
    crate::support::expect_start(&mut agent).await;
    let queued = core
        .submit_task(submit("1", "later"))
        .await
        .unwrap()
        .spec
        .task;
    let err = core
        .reply("1", &queued, "hi".into(), None)
        .await
        .unwrap_err();
    assert!(matches!(err, TaskError::NotStarted(_)), "{err}");

    // Once the share is gone, the grantee can neither talk to their running task nor resume a finished one.
    core.share_remove("1", "2").await.unwrap();
    assert_eq!(
        recv(&mut agent).await,
        RelayMessage::CancelTask {
            task: resumed.clone()
        }
    );
    let err = core
        .reply("2", &resumed, "still there?".into(), None)
        .await
        .unwrap_err();
    assert!(matches!(err, TaskError::NotShared { .. }), "{err}");
    let err = core
        .reply("2", &theirs, "again".into(), None)
        .await
        .unwrap_err();
    assert!(matches!(err, TaskError::NotShared { .. }), "{err}");
    // Its end frees a slot for the queued task. The owner may continue the grantee's task, as the owner.
    crate::support::event_acked(
        &mut agent,
        &resumed,
        1,
        crate::support::finished(FinalState::Cancelled),
    )
    .await;
    assert_eq!(crate::support::expect_start(&mut agent).await.task, queued);
    crate::support::event_acked(
        &mut agent,
        &blocker,
        1,
        crate::support::finished(FinalState::Done),
    )
    .await;
    let ReplyOutcome::Resumed(new) = core
        .reply("1", &theirs, "finish it".into(), None)
        .await
        .unwrap()
    else {
        panic!("expected a resumed task")
    };
    assert_eq!(new.spec.requester.role, ct_protocol::task::Role::Owner);
    assert_eq!(new.spec.resume.as_deref(), Some("grantee-sess"));
}

#[tokio::test]
async fn an_operator_replies_through_the_admin_socket() {
    use ct_relay::admin::{call, call_stream, Reply, Request};
    let dir = tempfile::tempdir().unwrap();
    let relay = TestRelay::start(dir.path()).await;
    let (_key, mut agent) = crate::support::agent(&relay, "31").await;
    let id = relay
        .core
        .submit_task(submit("31", "go"))
        .await
        .unwrap()
        .spec
        .task;
    crate::support::expect_start(&mut agent).await;
    let req = |prompt: &str| Request::Reply {
        user: "31".into(),
        task: id.clone(),
        prompt: prompt.into(),
        name: None,
    };
    let reply = call(dir.path(), &req("more")).await.unwrap();
    assert!(matches!(reply, Reply::Done { .. }), "{reply:?}");
    assert!(matches!(
        recv(&mut agent).await,
        RelayMessage::TaskInput { .. }
    ));
    finish_in_session(&mut agent, &id, "s1").await;

    let data_dir = dir.path().to_path_buf();
    let request = req("resume it");
    let operator = tokio::spawn(async move {
        let mut replies = Vec::new();
        call_stream(&data_dir, &request, |r| {
            let end = matches!(r, Reply::End { .. } | Reply::Error { .. });
            replies.push(r);
            !end
        })
        .await
        .unwrap();
        replies
    });
    let spec = crate::support::expect_start(&mut agent).await;
    assert_eq!(spec.resume.as_deref(), Some("s1"));
    crate::support::event_acked(
        &mut agent,
        &spec.task,
        1,
        crate::support::finished(FinalState::Done),
    )
    .await;
    let replies = tokio::time::timeout(Duration::from_secs(10), operator)
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(&replies[0], Reply::Task { task, follows: Some(f), .. } if *task == spec.task && *f == id),
        "{replies:?}"
    );
    assert!(
        matches!(
            replies.last(),
            Some(Reply::End {
                state: TaskState::Done,
                ..
            })
        ),
        "{replies:?}"
    );
}

/// The bot's thread marks (where a task's output goes in Discord, and how far it got) outlive the relay, so
/// its threads carry on after a restart; reading them drops the marks of tasks that no longer exist.
#[tokio::test]
async fn thread_marks_outlive_a_restart_and_marks_of_gone_tasks_are_dropped() {
    use ct_bot::backend::{Backend, ThreadMark};
    use ct_relay::discord::CoreBackend;

    let dir = tempfile::tempdir().unwrap();
    let relay = TestRelay::start(dir.path()).await;
    let (_agent, id) = running_task(&relay).await;
    let mark = |task: &str, posted: u64| ThreadMark {
        task: task.into(),
        thread: 42,
        progress: Some(43),
        posted,
        upload_limit: 8 << 20,
        approvals: [("a1".to_string(), 44)].into(),
        turn: Some((3, vec![45, 0])),
        opening: None,
    };
    let backend = CoreBackend::new(relay.core.clone());
    backend.mark_thread(&mark(&id, 1)).await.unwrap();
    backend.mark_thread(&mark(&id, 2)).await.unwrap();
    backend.mark_thread(&mark("t_gone", 5)).await.unwrap();
    let addr = relay.addr;
    drop(backend);
    relay.stop().await;

    let relay = TestRelay::start_with(ct_relay::RelayConfig::new(dir.path().into(), addr)).await;
    let backend = CoreBackend::new(relay.core.clone());
    let marks = backend.thread_marks().await.unwrap();
    assert_eq!(marks.len(), 1, "{marks:?}");
    assert_eq!(marks[0].0, mark(&id, 2), "the newest mark, as written");
    assert_eq!(marks[0].1.id, id);
    assert_eq!(backend.thread_mark(&id).await.unwrap(), Some(mark(&id, 2)));
    assert_eq!(backend.thread_mark("t_none").await.unwrap(), None);
    let left: Vec<(String, ThreadMark)> = relay.core.store().thread_marks().unwrap();
    assert_eq!(left.len(), 1, "the mark of a task that is gone was dropped");

    backend.forget_thread(&id).await.unwrap();
    assert!(backend.thread_marks().await.unwrap().is_empty());
}
