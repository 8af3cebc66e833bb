//! Abuse limits and retention, each test trying to get past one: tasks per user per minute (new tasks and
//! replies that start one), tasks open per user, prompt size on submit and reply, pairing codes per user,
//! pairing attempts per address (even with the right code), the rate limiter's memory under 100k users, the
//! per-task output cap against an agent printing 40 MiB, and retention deleting old tasks, events and audit
//! entries while keeping recent ones.

use std::time::Duration;

use crate::support::{
    agent, event_acked, expect_start, finished, recv, try_pair, wrong_code, TestRelay,
};
use ct_protocol::handshake::Rejection;
use ct_protocol::message::{AgentMessage, RelayMessage};
use ct_protocol::task::{FinalState, TaskEvent, MAX_EVENT_TEXT, MAX_PROMPT_LEN};
use ct_relay::audit::AuditFilter;
use ct_relay::output::STRUCTURAL_SLACK;
use ct_relay::store::{now, ShareLevel, TaskState};
use ct_relay::tasks::{ReplyOutcome, Submit, TaskError};
use ct_relay::RelayConfig;

fn own(user: &str) -> Submit {
    Submit {
        user: user.into(),
        project: "web".into(),
        prompt: "do it".into(),
        ..Default::default()
    }
}

fn config(dir: &std::path::Path) -> RelayConfig {
    let mut config = RelayConfig::new(dir.into(), "127.0.0.1:0".parse().unwrap());
    config.core.max_running_per_agent = 10;
    config.core.max_queued_per_agent = 100;
    config
}

fn session(id: &str) -> TaskEvent {
    TaskEvent::Session {
        session_id: id.into(),
        model: None,
        claude_version: None,
    }
}

#[tokio::test]
async fn tasks_per_minute_are_limited_for_new_tasks_and_replies_that_start_one() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.core.tasks_per_minute = 20;
    cfg.core.task_burst = 3;
    let relay = TestRelay::start_with(cfg).await;
    let core = &relay.core;
    let (_key, mut agent) = agent(&relay, "1").await;

    let first = core.submit_task(own("1")).await.unwrap().spec.task;
    expect_start(&mut agent).await;
    event_acked(&mut agent, &first, 1, session("s-1")).await;
    event_acked(&mut agent, &first, 2, finished(FinalState::Done)).await;
    let running = core.submit_task(own("1")).await.unwrap().spec.task;
    expect_start(&mut agent).await;
    core.submit_task(own("1")).await.unwrap();
    expect_start(&mut agent).await;

    let err = core.submit_task(own("1")).await.unwrap_err();
    assert!(matches!(err, TaskError::RateLimited { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("at most 20 a minute, 3 in a row") && msg.contains("try again in 3 seconds"),
        "{msg}"
    );
    // A reply that would start a new task (the first one ended) counts the same...
    let err = core
        .reply("1", &first, "more".into(), None)
        .await
        .unwrap_err();
    assert!(matches!(err, TaskError::RateLimited { .. }), "{err}");
    // ...one into a running task does not start anything.
    assert!(matches!(
        core.reply("1", &running, "more".into(), None).await,
        Ok(ReplyOutcome::Sent(_))
    ));
    // Another person is not held up (user 2 has no agent: that, not the limit, is what they hear).
    assert!(matches!(
        core.submit_task(own("2")).await,
        Err(TaskError::NoAgent)
    ));
}

#[tokio::test]
async fn tasks_open_at_once_per_user_are_limited_across_agents() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.core.max_tasks_per_user = 3;
    cfg.core.max_running_per_agent = 1;
    let relay = TestRelay::start_with(cfg).await;
    let core = &relay.core;
    let (_a, mut laptop) = agent(&relay, "1").await;
    let (_b, mut desktop) = agent(&relay, "1").await;
    let (_c, mut other) = agent(&relay, "5").await;
    core.share_add("5", "1", None, ShareLevel::Standard)
        .await
        .unwrap();
    let on = |agent: &str| Submit {
        agent: Some(agent.into()),
        ..own("1")
    };

    // One running on each of the user's agents, one on an agent shared with them: three, in all.
    let a = core.submit_task(on("test-agent")).await.unwrap().spec.task;
    expect_start(&mut laptop).await;
    event_acked(&mut laptop, &a, 1, session("s-a")).await;
    core.submit_task(on("test-agent-2")).await.unwrap();
    expect_start(&mut desktop).await;
    core.submit_task(Submit {
        target: Some("5".into()),
        ..own("1")
    })
    .await
    .unwrap();
    expect_start(&mut other).await;

    let err = core.submit_task(on("test-agent")).await.unwrap_err();
    assert!(
        matches!(err, TaskError::TooManyTasks { open: 3, max: 3 }),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("you already have 3 tasks queued or running (at most 3 at once"),
        "{err}"
    );
    // The owner of the shared agent is not limited by their grantee's tasks.
    core.submit_task(own("5")).await.unwrap();

    // Once one ends there is room again; a reply that resumes it takes that room.
    event_acked(&mut laptop, &a, 2, finished(FinalState::Done)).await;
    let resumed = core.reply("1", &a, "again".into(), None).await.unwrap();
    assert!(matches!(resumed, ReplyOutcome::Resumed(_)));
    assert!(matches!(
        core.submit_task(on("test-agent")).await,
        Err(TaskError::TooManyTasks { .. })
    ));
    assert!(matches!(
        core.reply("1", &a, "and again".into(), None).await,
        Err(TaskError::TooManyTasks { .. })
    ));
    // Cancelling a running task frees its place once the agent confirms.
    let ReplyOutcome::Resumed(resumed) = resumed else {
        unreachable!()
    };
    assert!(resumed.dispatched_at.is_some());
    assert_eq!(expect_start(&mut laptop).await.task, resumed.spec.task);
    core.cancel_task("1", &resumed.spec.task).await.unwrap();
    assert!(matches!(
        recv(&mut laptop).await,
        RelayMessage::CancelTask { .. }
    ));
    event_acked(
        &mut laptop,
        &resumed.spec.task,
        1,
        finished(FinalState::Cancelled),
    )
    .await;
    core.submit_task(on("test-agent")).await.unwrap();
}

#[tokio::test]
async fn prompt_size_is_checked_on_submit_and_on_both_kinds_of_reply() {
    let dir = tempfile::tempdir().unwrap();
    let relay = TestRelay::start_with(config(dir.path())).await;
    let core = &relay.core;
    let (_key, mut agent) = agent(&relay, "1").await;
    let huge = "x".repeat(MAX_PROMPT_LEN + 1);
    let limit = format!("over the {MAX_PROMPT_LEN}-byte limit");

    let err = core
        .submit_task(Submit {
            prompt: huge.clone(),
            ..own("1")
        })
        .await
        .unwrap_err();
    assert!(err.to_string().contains(&limit), "{err}");
    // Exactly at the limit is fine.
    let running = core
        .submit_task(Submit {
            prompt: "y".repeat(MAX_PROMPT_LEN),
            ..own("1")
        })
        .await
        .unwrap()
        .spec
        .task;
    expect_start(&mut agent).await;
    let ended = core.submit_task(own("1")).await.unwrap().spec.task;
    expect_start(&mut agent).await;
    event_acked(&mut agent, &ended, 1, session("s-1")).await;
    event_acked(&mut agent, &ended, 2, finished(FinalState::Done)).await;

    for task in [&running, &ended] {
        let err = core.reply("1", task, huge.clone(), None).await.unwrap_err();
        assert!(
            matches!(err, TaskError::PromptTooLong { len, max } if len == MAX_PROMPT_LEN + 1 && max == MAX_PROMPT_LEN),
            "{err}"
        );
    }
    // Nothing reached the agent: the next message it gets is the one sent after.
    core.reply("1", &running, "ok".into(), None).await.unwrap();
    assert!(matches!(
        recv(&mut agent).await,
        RelayMessage::TaskInput { prompt, .. } if prompt == "ok"
    ));
}

#[tokio::test]
async fn outstanding_pairing_codes_are_capped_per_user_and_the_oldest_gives_way() {
    let dir = tempfile::tempdir().unwrap();
    let relay = TestRelay::start(dir.path()).await;
    let max = relay.core.config().max_pair_codes_per_user;
    assert_eq!(max, 5);
    let mut tokens = Vec::new();
    for _ in 0..max + 2 {
        tokens.push(relay.token("7").await);
    }
    let other = relay.token("8").await;

    let t = now();
    let live = |user: &str| {
        relay
            .core
            .store()
            .pair_codes_of(user)
            .unwrap()
            .into_iter()
            .filter(|c| c.outstanding(t, 5))
            .count()
    };
    assert_eq!(live("7"), max);
    assert_eq!(live("8"), 1, "another user's codes are not touched");

    for old in &tokens[..2] {
        let (reason, message) = try_pair(&relay, old.code.to_string()).await.unwrap_err();
        assert_eq!(reason, Rejection::CodeExpired);
        assert!(
            message.contains("replaced by newer ones (at most 5 work at once)"),
            "{message}"
        );
    }
    try_pair(&relay, tokens[2].code.to_string()).await.unwrap();
    try_pair(&relay, tokens.last().unwrap().code.to_string())
        .await
        .unwrap();
    try_pair(&relay, other.code.to_string()).await.unwrap();
}

#[tokio::test]
async fn pairing_attempts_per_address_are_limited_even_with_the_right_code() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.core.pair_burst = 2;
    cfg.core.pair_refill = Duration::from_secs(60);
    let relay = TestRelay::start_with(cfg).await;
    let token = relay.token("9").await;
    let wrong = wrong_code(&token.code.to_string(), 0);
    for _ in 0..2 {
        let (reason, _) = try_pair(&relay, wrong.clone()).await.unwrap_err();
        assert_eq!(reason, Rejection::CodeWrong);
    }
    let (reason, message) = try_pair(&relay, token.code.to_string()).await.unwrap_err();
    assert_eq!(reason, Rejection::RateLimited);
    assert!(
        message.contains("at most 2 in a row, then one every 60 seconds")
            && message.contains("try again in"),
        "{message}"
    );
    // The refused attempt did not use the code up.
    let rec = relay
        .core
        .store()
        .pair_code(&token.code.id)
        .unwrap()
        .unwrap();
    assert_eq!(rec.used_at, None);
}

#[tokio::test]
async fn the_task_rate_limiter_stays_bounded_under_100k_distinct_users() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.core.rate_limit_keys = 1000;
    cfg.core.task_burst = 1;
    let relay = TestRelay::start_with(cfg).await;
    let core = relay.core.clone();
    let most = tokio::spawn(async move {
        let mut most = 0;
        for user in 1_000_000..1_100_000u64 {
            // Each gets through the limiter (a fresh bucket) and is then refused for having no agent.
            let err = core.submit_task(own(&user.to_string())).await.unwrap_err();
            assert!(matches!(err, TaskError::NoAgent), "{err}");
            most = most.max(core.rate_limited_users().await);
        }
        // A user seen just now is still limited: the flood did not reset the recent ones.
        let last = (1_100_000 - 1).to_string();
        assert!(matches!(
            core.submit_task(own(&last)).await,
            Err(TaskError::RateLimited { .. })
        ));
        most
    })
    .await
    .unwrap();
    assert!(most <= 1000, "{most} users remembered");
}

#[tokio::test]
async fn output_past_the_cap_is_acknowledged_but_dropped_behind_one_marker() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    let cap: u64 = 1024 * 1024;
    cfg.core.max_task_output = cap;
    let relay = TestRelay::start_with(cfg).await;
    let core = &relay.core;
    let (_key, mut agent) = agent(&relay, "1").await;
    let id = core.submit_task(own("1")).await.unwrap().spec.task;
    expect_start(&mut agent).await;
    let (_, _, mut live) = core.follow(&id).await.unwrap();

    let mut seq = 0;
    let mut next = || {
        seq += 1;
        seq
    };
    event_acked(
        &mut agent,
        &id,
        next(),
        TaskEvent::Started { cwd: "/w".into() },
    )
    .await;
    // 40 MiB of text, in the largest events an agent sends, each acknowledged (so its outbox drains).
    let chunk = "o".repeat(MAX_EVENT_TEXT);
    let chunks = 40 * 1024 * 1024 / MAX_EVENT_TEXT;
    for _ in 0..chunks {
        let text = TaskEvent::Text {
            text: chunk.clone(),
        };
        event_acked(&mut agent, &id, next(), text).await;
    }
    let approval = TaskEvent::ApprovalRequested {
        approval: "a1".into(),
        tool: "Bash".into(),
        summary: "ls".into(),
        input: serde_json::json!({"command": "ls"}),
        question: false,
        description: None,
        session: None,
        input_cut: false,
    };
    event_acked(&mut agent, &id, next(), approval.clone()).await;
    let turn = TaskEvent::TurnFinished {
        is_error: false,
        subtype: "success".into(),
        text: Some("done".into()),
        cost_usd: Some(0.1),
        turns: Some(1),
        input_tokens: None,
        output_tokens: None,
        duration_ms: None,
    };
    event_acked(&mut agent, &id, next(), turn.clone()).await;
    event_acked(
        &mut agent,
        &id,
        next(),
        TaskEvent::Tool {
            name: "Bash".into(),
            summary: "x".repeat(1000),
            auto_allowed: None,
            id: None,
            command: None,
        },
    )
    .await;
    let last = next();
    event_acked(&mut agent, &id, last, finished(FinalState::Done)).await;
    // A re-sent end (its acknowledgement lost) is acknowledged again, not stored again.
    event_acked(&mut agent, &id, last, finished(FinalState::Done)).await;

    let rec = core.task(&id).await.unwrap();
    assert_eq!((rec.state, rec.last_seq), (TaskState::Done, last));
    assert!(rec.output_truncated);
    let stored = core.store().events(&id, 0).unwrap();
    let bytes: u64 = stored
        .iter()
        .map(|(_, e)| serde_json::to_vec(e).unwrap().len() as u64)
        .sum();
    assert_eq!(bytes, rec.output_bytes);
    assert!(
        bytes <= cap + STRUCTURAL_SLACK,
        "{bytes} bytes stored for a {cap}-byte cap"
    );
    let markers: Vec<&str> = stored
        .iter()
        .filter_map(|(_, e)| match e {
            TaskEvent::Text { text } if text.starts_with("[output truncated:") => {
                Some(text.as_str())
            }
            _ => None,
        })
        .collect();
    assert_eq!(markers.len(), 1, "one marker");
    assert!(markers[0].contains("more than 1 MiB"), "{}", markers[0]);
    let kept: Vec<&TaskEvent> = stored.iter().map(|(_, e)| e).collect();
    assert!(kept.contains(&&approval) && kept.contains(&&turn));
    assert_eq!(stored.last().unwrap(), &(last, finished(FinalState::Done)));
    assert!(
        !kept.iter().any(|e| matches!(e, TaskEvent::Tool { .. })),
        "output after the cap is dropped"
    );

    // A follower saw what was stored, the marker included, and the end: nothing hangs.
    let mut seen = Vec::new();
    while let Ok(Ok((seq, e))) = tokio::time::timeout(Duration::from_secs(5), live.recv()).await {
        let end = matches!(e, TaskEvent::Finished { .. });
        seen.push(seq);
        if end {
            break;
        }
    }
    assert_eq!(seen, stored.iter().map(|(s, _)| *s).collect::<Vec<_>>());
}

/// Waits until the wall clock (in whole seconds, as the store keeps times) has passed `t`.
async fn clock_past(t: u64) {
    crate::support::eventually(Duration::from_secs(3), || now() > t).await;
}

#[tokio::test]
async fn prune_deletes_old_tasks_events_and_audit_entries_and_keeps_recent_ones() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.core.task_retention = Duration::from_secs(10);
    cfg.core.audit_retention = Duration::from_secs(1000);
    let relay = TestRelay::start_with(cfg).await;
    let core = &relay.core;
    let (_key, mut agent) = agent(&relay, "1").await;

    let old = core.submit_task(own("1")).await.unwrap().spec.task;
    expect_start(&mut agent).await;
    event_acked(&mut agent, &old, 1, TaskEvent::Text { text: "a".into() }).await;
    event_acked(&mut agent, &old, 2, finished(FinalState::Done)).await;
    let open = core.submit_task(own("1")).await.unwrap().spec.task;
    expect_start(&mut agent).await;
    let (_, _, mut following) = core.follow(&old).await.unwrap();
    let old_ended = core.task(&old).await.unwrap().updated_at;

    clock_past(old_ended).await;
    core.share_add("1", "2", None, ShareLevel::Standard)
        .await
        .unwrap();
    let recent = core.submit_task(own("1")).await.unwrap().spec.task;
    expect_start(&mut agent).await;
    event_acked(&mut agent, &recent, 1, finished(FinalState::Done)).await;
    let t = core.task(&recent).await.unwrap().updated_at;
    assert!(t > old_ended);
    // An entry written at `t` or later, which must outlive the older ones.
    core.share_add("1", "2", None, ShareLevel::Trusted)
        .await
        .unwrap();
    let entries = core
        .audit(&AuditFilter::default(), 100, None)
        .await
        .unwrap();
    let due = entries.iter().filter(|e| e.at < t).count();
    assert!(due >= 1, "the pairing, at least, is older than {t}");

    // Ten seconds after `t`: the old task is past its retention, the recent one not, the open one never.
    let pruned = core.prune(t + 10).await.unwrap();
    assert_eq!((pruned.tasks, pruned.events, pruned.audit), (1, 2, 0));
    assert!(matches!(
        core.task(&old).await,
        Err(TaskError::NoSuchTask(_))
    ));
    assert!(core.store().events(&old, 0).unwrap().is_empty());
    assert_eq!(core.store().events(&recent, 0).unwrap().len(), 1);
    assert!(!core.task(&open).await.unwrap().state.is_final());
    // Whoever followed the deleted task is told it is gone instead of waiting forever.
    let closed = tokio::time::timeout(Duration::from_secs(5), following.recv())
        .await
        .expect("the follower is not left hanging");
    assert!(closed.is_err());
    // An agent's late event cannot bring the task back.
    agent
        .writer
        .send(&AgentMessage::Event {
            task: old.clone(),
            seq: 3,
            event: TaskEvent::Text {
                text: "late".into(),
            },
        })
        .await
        .unwrap();
    event_acked(
        &mut agent,
        &open,
        1,
        TaskEvent::Started { cwd: "/w".into() },
    )
    .await;
    assert!(matches!(
        core.task(&old).await,
        Err(TaskError::NoSuchTask(_))
    ));

    // 1000 seconds after `t`: audit entries from before `t` go, those from `t` on stay.
    let pruned = core.prune(t + 1000).await.unwrap();
    assert_eq!(pruned.tasks, 1, "the recent task's time came too");
    assert_eq!(pruned.audit, due);
    let left = core
        .audit(&AuditFilter::default(), 100, None)
        .await
        .unwrap();
    assert!(
        !left.is_empty() && left.iter().all(|e| e.at >= t),
        "{left:#?}"
    );
    assert_eq!(core.task(&open).await.unwrap().state, TaskState::Running);

    // A day after pairing codes expired, they go too; nothing open is ever pruned.
    relay.token("1").await;
    let pruned = core.prune(now() + 2 * 86_400).await.unwrap();
    assert!(pruned.pair_codes >= 1);
    assert_eq!(core.task(&open).await.unwrap().state, TaskState::Running);
}

#[tokio::test]
async fn the_relay_prunes_by_itself_when_it_starts() {
    let dir = tempfile::tempdir().unwrap();
    let relay = TestRelay::start_with(config(dir.path())).await;
    let (_key, mut agent) = agent(&relay, "1").await;
    let id = relay.core.submit_task(own("1")).await.unwrap().spec.task;
    expect_start(&mut agent).await;
    event_acked(&mut agent, &id, 1, finished(FinalState::Done)).await;
    let ended = relay.core.task(&id).await.unwrap().updated_at;
    drop(agent);
    relay.stop().await;

    clock_past(ended).await;
    let mut cfg = config(dir.path());
    cfg.core.task_retention = Duration::ZERO;
    let relay = TestRelay::start_with(cfg).await;
    crate::support::eventually_async(Duration::from_secs(10), async || {
        matches!(relay.core.task(&id).await, Err(TaskError::NoSuchTask(_)))
    })
    .await;
}
