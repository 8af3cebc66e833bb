//! Shares through the relay core, with a protocol-level stand-in for the agent: who may run tasks on whose
//! agents and projects, whose approvals they are, and revocation taking effect at once (also while a task is
//! being submitted, and while the agent is offline).

use std::sync::Arc;
use std::time::Duration;

use crate::support::{
    agent, connect, event_acked, expect_ack, expect_start, finished, recv, TestRelay,
};
use ct_protocol::message::{AgentMessage, RelayMessage};
use ct_protocol::task::{Decision, FinalState, Role, TaskEvent};
use ct_relay::store::{ShareLevel, TaskState};
use ct_relay::tasks::{Submit, TaskError};
use ct_relay::RelayConfig;

fn own(user: &str, project: &str) -> Submit {
    Submit {
        user: user.into(),
        project: project.into(),
        prompt: "do it".into(),
        ..Default::default()
    }
}

fn shared(user: &str, owner: &str, project: &str) -> Submit {
    Submit {
        target: Some(owner.into()),
        ..own(user, project)
    }
}

async fn relay_with_slots(dir: &std::path::Path, running: usize) -> TestRelay {
    let mut config = RelayConfig::new(dir.into(), "127.0.0.1:0".parse().unwrap());
    config.core.max_running_per_agent = running;
    // The revocation race submits dozens of tasks in a second; the per-user rate limit has its own tests.
    config.core.tasks_per_minute = 10_000;
    config.core.task_burst = 1_000;
    TestRelay::start_with(config).await
}

fn approval() -> TaskEvent {
    TaskEvent::ApprovalRequested {
        approval: "a1".into(),
        tool: "Bash".into(),
        summary: "rm -rf build".into(),
        input: serde_json::json!({"command": "rm -rf build"}),
        question: false,
        description: None,
        session: None,
        input_cut: false,
    }
}

#[tokio::test]
async fn shares_are_added_updated_listed_and_removed() {
    let dir = tempfile::tempdir().unwrap();
    let relay = TestRelay::start(dir.path()).await;
    let core = &relay.core;
    let (_key, _agent) = agent(&relay, "1").await;

    core.share_add("1", "2", None, ShareLevel::Standard)
        .await
        .unwrap();
    core.share_add("1", "3", Some(vec!["web".into()]), ShareLevel::Trusted)
        .await
        .unwrap();
    let shares = core.shares_of("1").await.unwrap();
    assert_eq!(
        shares
            .iter()
            .map(|s| (s.grantee.as_str(), s.level, s.projects.clone()))
            .collect::<Vec<_>>(),
        vec![
            ("2", ShareLevel::Standard, None),
            ("3", ShareLevel::Trusted, Some(vec!["web".to_string()]))
        ]
    );
    // Re-adding updates in place and keeps when it was first shared.
    let first = shares[0].created_at;
    let updated = core
        .share_add(
            "1",
            "2",
            Some(vec!["api".into(), " api ".into()]),
            ShareLevel::Trusted,
        )
        .await
        .unwrap();
    assert_eq!(
        (updated.projects, updated.level, updated.created_at),
        (Some(vec!["api".to_string()]), ShareLevel::Trusted, first)
    );
    assert_eq!(core.shares_of("1").await.unwrap().len(), 2);

    let available = core.shares_available("3").await.unwrap();
    assert_eq!(available.len(), 1);
    assert_eq!(
        (
            available[0].owner.as_str(),
            available[0].level,
            &available[0].projects
        ),
        ("1", ShareLevel::Trusted, &Some(vec!["web".to_string()]))
    );
    let agents = &available[0].agents;
    assert_eq!(agents.len(), 1);
    assert!(agents[0].online && agents[0].since.is_some());
    assert_eq!(agents[0].projects, vec!["web".to_string()]);
    assert!(core.shares_available("4").await.unwrap().is_empty());

    let removed = core.share_remove("1", "2").await.unwrap();
    assert_eq!(removed.share.grantee, "2");
    assert_eq!(
        core.shares_of("1")
            .await
            .unwrap()
            .iter()
            .map(|s| s.grantee.as_str())
            .collect::<Vec<_>>(),
        vec!["3"]
    );
    assert!(core.shares_available("2").await.unwrap().is_empty());
}

#[tokio::test]
async fn share_refusals_say_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let relay = TestRelay::start(dir.path()).await;
    let core = &relay.core;
    let err = core
        .share_add("1", "1", None, ShareLevel::Trusted)
        .await
        .unwrap_err();
    assert!(matches!(err, TaskError::ShareWithSelf), "{err}");
    assert!(matches!(
        core.share_add("1", "bob", None, ShareLevel::Standard).await,
        Err(TaskError::BadUser(_))
    ));
    assert!(matches!(
        core.share_add("1; drop", "2", None, ShareLevel::Standard)
            .await,
        Err(TaskError::BadUser(_))
    ));
    // An empty list must not be read as "all projects": that would widen the share.
    for empty in [vec![], vec![" ".to_string()]] {
        let err = core
            .share_add("1", "2", Some(empty), ShareLevel::Standard)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("at least one project"), "{err}");
    }
    let many: Vec<String> = (0..=ct_relay::shares::MAX_SHARE_PROJECTS)
        .map(|i| format!("p{i}"))
        .collect();
    assert!(matches!(
        core.share_add("1", "2", Some(many), ShareLevel::Standard)
            .await,
        Err(TaskError::BadShare(_))
    ));
    assert!(matches!(
        core.share_add("1", "2", Some(vec!["x".repeat(1000)]), ShareLevel::Standard)
            .await,
        Err(TaskError::BadShare(_))
    ));
    assert!(core.shares_of("1").await.unwrap().is_empty());
    let err = core.share_remove("1", "9").await.unwrap_err();
    assert!(matches!(err, TaskError::NoSuchShare(_)), "{err}");
}

#[tokio::test]
async fn only_shared_users_run_tasks_and_only_on_shared_projects() {
    let dir = tempfile::tempdir().unwrap();
    let relay = TestRelay::start(dir.path()).await;
    let core = &relay.core;
    let (_key, mut agent) = agent(&relay, "1").await;

    // No share: refused, without learning anything about the owner's agents.
    let err = core.submit_task(shared("2", "1", "web")).await.unwrap_err();
    assert!(matches!(err, TaskError::NotShared { .. }), "{err}");
    assert!(
        err.to_string().contains("/share add") && !err.to_string().contains("test-agent"),
        "{err}"
    );

    core.share_add("1", "2", Some(vec!["web".into()]), ShareLevel::Standard)
        .await
        .unwrap();
    for project in ["api", "/home/one/api", "~/web", "web/../api"] {
        let err = core
            .submit_task(shared("2", "1", project))
            .await
            .unwrap_err();
        assert!(
            matches!(err, TaskError::ProjectNotShared { .. }),
            "{project}: {err}"
        );
        assert!(err.to_string().contains("web"), "{err}");
    }
    // Someone else's share does not count for user 3.
    assert!(matches!(
        core.submit_task(shared("3", "1", "web")).await,
        Err(TaskError::NotShared { .. })
    ));

    let rec = core
        .submit_task(Submit {
            name: Some("  Bo\u{7}b  ".into()),
            ..shared("2", "1", "web")
        })
        .await
        .unwrap();
    let spec = expect_start(&mut agent).await;
    assert_eq!(spec.task, rec.spec.task);
    assert_eq!(spec.requester.user, "2");
    assert_eq!(spec.requester.role, Role::Grantee);
    assert_eq!(spec.requester.name.as_deref(), Some("Bob"));

    // The grantee's own agents are not the owner's: without a target they have none.
    assert!(matches!(
        core.submit_task(own("2", "web")).await,
        Err(TaskError::NoAgent)
    ));
}

#[tokio::test]
async fn a_grantees_approvals_go_to_the_owner_unless_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let relay = TestRelay::start(dir.path()).await;
    let core = &relay.core;
    let (_key, mut agent) = agent(&relay, "1").await;

    core.share_add("1", "2", None, ShareLevel::Standard)
        .await
        .unwrap();
    let standard = core
        .submit_task(shared("2", "1", "web"))
        .await
        .unwrap()
        .spec
        .task;
    assert_eq!(expect_start(&mut agent).await.requester.role, Role::Grantee);
    event_acked(&mut agent, &standard, 1, approval()).await;
    assert_eq!(core.approver(&standard).await.unwrap(), "1");
    let err = core
        .decide("2", &standard, "a1", Decision::AllowSession)
        .await
        .unwrap_err();
    assert!(matches!(err, TaskError::NotYours(_)), "{err}");
    core.decide("1", &standard, "a1", Decision::AllowSession)
        .await
        .unwrap();
    assert_eq!(
        recv(&mut agent).await,
        RelayMessage::Decide {
            task: standard.clone(),
            approval: "a1".into(),
            decision: Decision::AllowSession
        }
    );

    core.share_add("1", "2", None, ShareLevel::Trusted)
        .await
        .unwrap();
    let trusted = core
        .submit_task(shared("2", "1", "web"))
        .await
        .unwrap()
        .spec
        .task;
    assert_eq!(
        expect_start(&mut agent).await.requester.role,
        Role::TrustedGrantee
    );
    event_acked(&mut agent, &trusted, 1, approval()).await;
    assert_eq!(core.approver(&trusted).await.unwrap(), "2");
    assert!(matches!(
        core.decide("1", &trusted, "a1", Decision::AllowSession)
            .await,
        Err(TaskError::NotYours(_))
    ));
    assert!(matches!(
        core.decide("3", &trusted, "a1", Decision::AllowSession)
            .await,
        Err(TaskError::NotYours(_))
    ));
    let deny = Decision::Deny {
        reason: "no".into(),
    };
    core.decide("2", &trusted, "a1", deny.clone())
        .await
        .unwrap();
    assert_eq!(
        recv(&mut agent).await,
        RelayMessage::Decide {
            task: trusted.clone(),
            approval: "a1".into(),
            decision: deny
        }
    );

    // Downgrading the share takes the trusted grantee's approvals back to the owner at once.
    core.share_add("1", "2", None, ShareLevel::Standard)
        .await
        .unwrap();
    assert_eq!(core.approver(&trusted).await.unwrap(), "1");
    assert!(matches!(
        core.decide("2", &trusted, "a1", Decision::AllowSession)
            .await,
        Err(TaskError::NotYours(_))
    ));
    // An upgrade does not reach back into a task submitted at the standard level.
    core.share_add("1", "2", None, ShareLevel::Trusted)
        .await
        .unwrap();
    assert_eq!(core.approver(&standard).await.unwrap(), "1");
}

#[tokio::test]
async fn revoking_a_share_cancels_queued_tasks_at_once_and_running_ones_through_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let relay = relay_with_slots(dir.path(), 2).await;
    let core = &relay.core;
    let (_key, mut agent) = agent(&relay, "1").await;
    core.share_add("1", "2", None, ShareLevel::Standard)
        .await
        .unwrap();

    let mine = core.submit_task(own("1", "web")).await.unwrap().spec.task;
    assert_eq!(expect_start(&mut agent).await.task, mine);
    let running = core
        .submit_task(shared("2", "1", "web"))
        .await
        .unwrap()
        .spec
        .task;
    assert_eq!(expect_start(&mut agent).await.task, running);
    let queued = core.submit_task(shared("2", "1", "web")).await.unwrap();
    assert_eq!(
        (queued.state, queued.dispatched_at),
        (TaskState::Queued, None)
    );
    let queued = queued.spec.task;
    let (_, _, mut follower) = core.follow(&queued).await.unwrap();

    let removed = core.share_remove("1", "2").await.unwrap();
    assert_eq!(removed.tasks.cancelled, vec![queued.clone()]);
    assert_eq!(removed.tasks.stopping, vec![running.clone()]);
    assert_eq!(
        recv(&mut agent).await,
        RelayMessage::CancelTask {
            task: running.clone()
        }
    );
    let rec = core.task(&queued).await.unwrap();
    assert_eq!((rec.state, rec.dispatched_at), (TaskState::Cancelled, None));
    assert!(
        rec.message.as_deref().unwrap().contains("stopped sharing"),
        "{rec:?}"
    );
    // Followers see it end through the normal event path.
    let (seq, event) = tokio::time::timeout(Duration::from_secs(5), follower.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(seq, 1);
    assert!(matches!(
        event,
        TaskEvent::Finished {
            state: FinalState::Cancelled,
            ..
        }
    ));
    assert!(matches!(
        core.submit_task(shared("2", "1", "web")).await,
        Err(TaskError::NotShared { .. })
    ));

    // Slots free up; the cancelled task is never sent, the owner's next one is.
    event_acked(&mut agent, &running, 1, finished(FinalState::Cancelled)).await;
    event_acked(&mut agent, &mine, 1, finished(FinalState::Done)).await;
    let next = core.submit_task(own("1", "web")).await.unwrap().spec.task;
    assert_eq!(expect_start(&mut agent).await.task, next);
    assert_eq!(core.task(&queued).await.unwrap().dispatched_at, None);
}

#[tokio::test]
async fn narrowing_a_share_cancels_the_tasks_it_no_longer_covers() {
    let dir = tempfile::tempdir().unwrap();
    let relay = relay_with_slots(dir.path(), 1).await;
    let core = &relay.core;
    let (_key, mut agent) = agent(&relay, "1").await;
    core.share_add("1", "2", None, ShareLevel::Standard)
        .await
        .unwrap();
    let mine = core.submit_task(own("1", "web")).await.unwrap().spec.task;
    expect_start(&mut agent).await;
    let web = core
        .submit_task(shared("2", "1", "web"))
        .await
        .unwrap()
        .spec
        .task;
    let api = core
        .submit_task(shared("2", "1", "api"))
        .await
        .unwrap()
        .spec
        .task;
    core.share_add("1", "2", Some(vec!["web".into()]), ShareLevel::Standard)
        .await
        .unwrap();
    let rec = core.task(&api).await.unwrap();
    assert_eq!(rec.state, TaskState::Cancelled);
    assert!(rec.message.unwrap().contains("\"api\""));
    assert_eq!(core.task(&web).await.unwrap().state, TaskState::Queued);
    event_acked(&mut agent, &mine, 1, finished(FinalState::Done)).await;
    assert_eq!(expect_start(&mut agent).await.task, web);
}

/// Revocation racing submission: every grantee task either is refused or ends cancelled without ever
/// reaching the agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_while_submitting_never_lets_a_task_through() {
    let dir = tempfile::tempdir().unwrap();
    let relay = relay_with_slots(dir.path(), 1).await;
    let (_key, mut agent) = agent(&relay, "1").await;
    // The owner's task holds the only slot, so a grantee task that got past revocation would wait queued.
    let mine = relay
        .core
        .submit_task(own("1", "web"))
        .await
        .unwrap()
        .spec
        .task;
    expect_start(&mut agent).await;

    let mut accepted = Vec::new();
    let mut refused = 0;
    for i in 0..60 {
        relay
            .core
            .share_add("1", "2", None, ShareLevel::Standard)
            .await
            .unwrap();
        let barrier = Arc::new(tokio::sync::Barrier::new(2));
        let (core, b) = (relay.core.clone(), barrier.clone());
        let submit = tokio::spawn(async move {
            b.wait().await;
            core.submit_task(shared("2", "1", "web")).await
        });
        let (core, b) = (relay.core.clone(), barrier.clone());
        let revoke = tokio::spawn(async move {
            b.wait().await;
            // Varying head starts for the submission, so both orders and the close calls in between occur.
            for _ in 0..(i % 12) * 2000 {
                std::hint::spin_loop();
            }
            core.share_remove("1", "2").await
        });
        revoke.await.unwrap().unwrap();
        match submit.await.unwrap() {
            Ok(rec) => accepted.push(rec.spec.task),
            Err(TaskError::NotShared { .. }) => refused += 1,
            Err(e) => panic!("unexpected refusal: {e}"),
        }
    }
    eprintln!(
        "{} submitted before the revocation, {refused} after",
        accepted.len()
    );
    for id in &accepted {
        let rec = relay.core.task(id).await.unwrap();
        assert_eq!(
            (rec.state, rec.dispatched_at),
            (TaskState::Cancelled, None),
            "{id}"
        );
    }
    // The slot frees up: the next task the agent is sent is the owner's new one, no grantee task.
    event_acked(&mut agent, &mine, 1, finished(FinalState::Done)).await;
    let next = relay
        .core
        .submit_task(own("1", "web"))
        .await
        .unwrap()
        .spec
        .task;
    assert_eq!(expect_start(&mut agent).await.task, next);
}

#[tokio::test]
async fn a_share_revoked_while_the_agent_was_offline_is_enforced_when_it_reconnects() {
    let dir = tempfile::tempdir().unwrap();
    let relay = TestRelay::start(dir.path()).await;
    let core = &relay.core;
    let (key, mut agent) = agent(&relay, "1").await;
    core.share_add("1", "2", None, ShareLevel::Standard)
        .await
        .unwrap();
    let task = core
        .submit_task(shared("2", "1", "web"))
        .await
        .unwrap()
        .spec
        .task;
    expect_start(&mut agent).await;
    event_acked(
        &mut agent,
        &task,
        1,
        TaskEvent::Started { cwd: "/w".into() },
    )
    .await;
    drop(agent);
    crate::support::eventually_async(Duration::from_secs(5), async || {
        !crate::support::is_online(&relay, &key).await
    })
    .await;

    let removed = core.share_remove("1", "2").await.unwrap();
    assert_eq!(removed.tasks.stopping, vec![task.clone()]);
    let mut agent = connect(&relay, &key).await;
    agent
        .writer
        .send(&AgentMessage::Running {
            tasks: vec![task.clone()],
        })
        .await
        .unwrap();
    assert_eq!(
        recv(&mut agent).await,
        RelayMessage::CancelTask { task: task.clone() }
    );
    crate::support::send_event(&mut agent, &task, 2, finished(FinalState::Cancelled)).await;
    expect_ack(&mut agent, &task, 2).await;
    assert_eq!(core.task(&task).await.unwrap().state, TaskState::Cancelled);
}

#[tokio::test]
async fn a_grantee_cannot_pick_a_permission_mode_that_approves_in_the_owners_place() {
    use ct_protocol::task::TaskOptions;
    let dir = tempfile::tempdir().unwrap();
    let relay = relay_with_slots(dir.path(), 1).await;
    let core = &relay.core;
    let (_key, mut agent) = agent(&relay, "1").await;
    let with_mode = |s: Submit, mode: &str| Submit {
        options: TaskOptions {
            permission_mode: Some(mode.into()),
            ..Default::default()
        },
        ..s
    };

    core.share_add("1", "2", None, ShareLevel::Standard)
        .await
        .unwrap();
    for mode in ["bypassPermissions", "acceptEdits", "auto", "somethingNew"] {
        let err = core
            .submit_task(with_mode(shared("2", "1", "web"), mode))
            .await
            .unwrap_err();
        assert!(
            matches!(err, TaskError::ModeNotAllowed { .. }),
            "{mode}: {err}"
        );
    }
    core.share_add("1", "2", None, ShareLevel::Trusted)
        .await
        .unwrap();
    let err = core
        .submit_task(with_mode(shared("2", "1", "web"), "bypassPermissions"))
        .await
        .unwrap_err();
    assert!(matches!(err, TaskError::ModeNotAllowed { .. }), "{err}");
    // Trusted: a mode that approves edits is theirs to choose (they decide their own approvals).
    let running = core
        .submit_task(with_mode(shared("2", "1", "web"), "acceptEdits"))
        .await
        .unwrap()
        .spec
        .task;
    assert_eq!(expect_start(&mut agent).await.task, running);
    let queued = core
        .submit_task(with_mode(shared("2", "1", "web"), "auto"))
        .await
        .unwrap()
        .spec
        .task;
    let plain = core
        .submit_task(with_mode(shared("2", "1", "web"), "plan"))
        .await
        .unwrap()
        .spec
        .task;

    // Downgraded: the tasks that rely on the trusted level end at once; the plain one stays.
    let enforced = core
        .share_add("1", "2", None, ShareLevel::Standard)
        .await
        .unwrap();
    assert_eq!(enforced.level, ShareLevel::Standard);
    assert_eq!(
        recv(&mut agent).await,
        RelayMessage::CancelTask {
            task: running.clone()
        }
    );
    let rec = core.task(&queued).await.unwrap();
    assert_eq!(rec.state, TaskState::Cancelled);
    assert!(rec.message.unwrap().contains("permission mode"));
    assert_eq!(core.task(&plain).await.unwrap().state, TaskState::Queued);
    event_acked(&mut agent, &running, 1, finished(FinalState::Cancelled)).await;
    let spec = expect_start(&mut agent).await;
    assert_eq!((spec.task, spec.requester.role), (plain, Role::Grantee));

    // The owner's own mode passes; options that could not travel are refused for everyone.
    core.submit_task(with_mode(own("1", "web"), "bypassPermissions"))
        .await
        .unwrap();
    for options in [
        TaskOptions {
            model: Some("m".repeat(1000)),
            ..Default::default()
        },
        TaskOptions {
            max_budget_usd: Some(f64::NAN),
            ..Default::default()
        },
        TaskOptions {
            max_turns: Some(0),
            ..Default::default()
        },
    ] {
        let err = core
            .submit_task(Submit {
                options,
                ..own("1", "web")
            })
            .await
            .unwrap_err();
        assert!(matches!(err, TaskError::BadOption(_)), "{err}");
    }
}
