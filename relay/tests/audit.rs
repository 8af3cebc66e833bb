//! The audit log, each test trying to get past it: a grantee's task and the owner's decision land in the
//! owner's log and nobody else's; strangers neither read it nor leave entries by failing; share changes and
//! revocations carry their actor; what the operator does through the admin socket is attributed to
//! `operator`; `ct-relay admin audit` prints it.

use std::time::Duration;

use crate::support::{agent, event_acked, expect_start, finished, recv, TestRelay};
use ct_protocol::message::RelayMessage;
use ct_protocol::task::{Decision, FinalState, TaskEvent};
use ct_relay::admin::{self, Reply, Request};
use ct_relay::audit::{AuditEntry, AuditFilter, AuditKind, Caller, OPERATOR, PREVIEW_CHARS};
use ct_relay::core::CoreError;
use ct_relay::store::ShareLevel;
use ct_relay::tasks::{Submit, TaskError};

fn own(user: &str) -> Submit {
    Submit {
        user: user.into(),
        project: "web".into(),
        prompt: "fix the build".into(),
        ..Default::default()
    }
}

fn shared(user: &str, owner: &str, prompt: &str) -> Submit {
    Submit {
        target: Some(owner.into()),
        prompt: prompt.into(),
        ..own(user)
    }
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

fn labels(entries: &[AuditEntry]) -> Vec<&'static str> {
    entries.iter().map(|e| e.kind.label()).collect()
}

#[tokio::test]
async fn a_grantees_task_and_the_owners_decision_are_in_the_owners_log_and_nobody_elses() {
    let dir = tempfile::tempdir().unwrap();
    let relay = TestRelay::start(dir.path()).await;
    let core = &relay.core;
    let (_key, mut agent) = agent(&relay, "1").await;
    core.share_add("1", "2", None, ShareLevel::Standard)
        .await
        .unwrap();

    // The owner's own task is theirs to run: it is not a grantee task and leaves no entry.
    let mine = core.submit_task(own("1")).await.unwrap().spec.task;
    expect_start(&mut agent).await;
    event_acked(&mut agent, &mine, 1, finished(FinalState::Done)).await;

    let long = format!("please\nrefactor {}", "everything ".repeat(100));
    let theirs = core
        .submit_task(Submit {
            name: Some("Bob".into()),
            ..shared("2", "1", &long)
        })
        .await
        .unwrap()
        .spec
        .task;
    expect_start(&mut agent).await;
    event_acked(&mut agent, &theirs, 1, approval()).await;
    core.decide(
        "1",
        &theirs,
        "a1",
        Decision::AllowOnce {
            updated_input: None,
        },
    )
    .await
    .unwrap();
    assert!(matches!(
        recv(&mut agent).await,
        RelayMessage::Decide { .. }
    ));

    let log = core.audit_for_owner("1", 50, None).await.unwrap();
    assert_eq!(
        labels(&log),
        vec!["approval", "grantee-task", "share-added", "paired"],
        "newest first: {log:#?}"
    );
    let (decided, task) = (&log[0], &log[1]);
    assert_eq!(
        (
            decided.actor.as_str(),
            decided.owner.as_str(),
            decided.task.as_deref()
        ),
        ("1", "1", Some(theirs.as_str()))
    );
    assert!(matches!(
        &decided.kind,
        AuditKind::ApprovalDecided { approval, decision, requester }
            if approval == "a1" && decision == "allow once" && requester == "2"
    ));
    assert!(
        decided.detail.contains("user 2's task"),
        "{}",
        decided.detail
    );
    assert_eq!(
        (
            task.actor.as_str(),
            task.task.as_deref(),
            task.acting_as.as_deref()
        ),
        ("2", Some(theirs.as_str()), None)
    );
    let AuditKind::GranteeTask {
        requester,
        project,
        prompt,
        follow_up,
    } = &task.kind
    else {
        panic!("{task:?}")
    };
    assert_eq!(
        (requester.as_str(), project.as_str(), *follow_up),
        ("2", "web", false)
    );
    assert_eq!(
        prompt.chars().count(),
        PREVIEW_CHARS,
        "the preview is bounded"
    );
    assert!(prompt.starts_with("please refactor"), "one line: {prompt}");
    assert!(task.detail.contains("Bob") && task.detail.contains("test-agent"));
    assert_eq!(
        task.agent.as_ref().map(|a| a.name.as_str()),
        Some("test-agent")
    );
    assert!(log.windows(2).all(|w| w[0].seq > w[1].seq));

    // A follow-up the grantee sends into the running task is recorded too.
    core.reply("2", &theirs, "and the docs".into(), None)
        .await
        .unwrap();
    assert!(matches!(
        recv(&mut agent).await,
        RelayMessage::TaskInput { .. }
    ));
    let latest = &core.audit_for_owner("1", 1, None).await.unwrap()[0];
    assert!(matches!(
        &latest.kind,
        AuditKind::GranteeTask { follow_up: true, prompt, .. } if prompt == "and the docs"
    ));

    // Neither the grantee nor a stranger sees the owner's entries: each reads only what concerns them.
    assert!(core
        .audit_for_owner("2", 50, None)
        .await
        .unwrap()
        .is_empty());
    assert!(core
        .audit_for_owner("3", 50, None)
        .await
        .unwrap()
        .is_empty());
    // Something that is not a user id does not read across owners either (a prefix, an empty id).
    for bad in ["", "1\0", "1%", "operator"] {
        assert!(
            matches!(
                core.audit_for_owner(bad, 50, None).await,
                Err(CoreError::BadUser(_))
            ),
            "{bad:?}"
        );
    }
    assert!(core
        .audit_for_owner("11", 50, None)
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn refused_attempts_leave_no_entries_and_strangers_cannot_act() {
    let dir = tempfile::tempdir().unwrap();
    let relay = TestRelay::start(dir.path()).await;
    let core = &relay.core;
    let (_key, mut agent) = agent(&relay, "1").await;
    core.share_add("1", "2", Some(vec!["web".into()]), ShareLevel::Standard)
        .await
        .unwrap();
    let before = core
        .audit(&AuditFilter::default(), 100, None)
        .await
        .unwrap()
        .len();

    // A stranger's task, a grantee outside their projects, decisions and cancels by the wrong people.
    assert!(matches!(
        core.submit_task(shared("3", "1", "x")).await,
        Err(TaskError::NotShared { .. })
    ));
    assert!(matches!(
        core.submit_task(Submit {
            project: "api".into(),
            ..shared("2", "1", "x")
        })
        .await,
        Err(TaskError::ProjectNotShared { .. })
    ));
    let theirs = core
        .submit_task(shared("2", "1", "x"))
        .await
        .unwrap()
        .spec
        .task;
    expect_start(&mut agent).await;
    event_acked(&mut agent, &theirs, 1, approval()).await;
    for who in ["2", "3"] {
        assert!(matches!(
            core.decide(who, &theirs, "a1", Decision::AllowSession)
                .await,
            Err(TaskError::NotYours(_))
        ));
    }
    assert!(matches!(
        core.cancel_task("3", &theirs).await,
        Err(TaskError::NotYours(_))
    ));
    assert!(matches!(
        core.share_remove("3", "2").await,
        Err(TaskError::NoSuchShare(_))
    ));
    let after = core
        .audit(&AuditFilter::default(), 100, None)
        .await
        .unwrap();
    assert_eq!(
        labels(&after[..after.len() - before]),
        vec!["grantee-task"],
        "only the task that ran is recorded"
    );

    // The grantee cancels their own task: recorded for the owner, with the grantee as the actor.
    core.cancel_task("2", &theirs).await.unwrap();
    assert!(matches!(
        recv(&mut agent).await,
        RelayMessage::CancelTask { .. }
    ));
    let cancel = &core.audit_for_owner("1", 1, None).await.unwrap()[0];
    assert_eq!(
        (
            cancel.kind.label(),
            cancel.actor.as_str(),
            cancel.task.as_deref()
        ),
        ("cancelled", "2", Some(theirs.as_str()))
    );
}

#[tokio::test]
async fn share_changes_and_revocations_are_recorded_with_their_actor() {
    let dir = tempfile::tempdir().unwrap();
    let relay = TestRelay::start(dir.path()).await;
    let core = &relay.core;
    let (_key, _agent) = agent(&relay, "1").await;

    core.share_add("1", "2", Some(vec!["web".into()]), ShareLevel::Standard)
        .await
        .unwrap();
    core.share_add("1", "2", None, ShareLevel::Trusted)
        .await
        .unwrap();
    core.share_remove("1", "2").await.unwrap();
    core.set_default_agent("1", "test-agent").await.unwrap();
    core.revoke("test-agent", "1").await.unwrap();
    // Revoking what is already revoked changes nothing and is not recorded again.
    core.revoke("test-agent", "1").await.unwrap();

    let log = core.audit_for_owner("1", 50, None).await.unwrap();
    assert_eq!(
        labels(&log),
        vec![
            "revoked",
            "default-agent",
            "share-removed",
            "share-changed",
            "share-added",
            "paired"
        ]
    );
    assert!(log.iter().all(|e| e.actor == "1" && e.owner == "1"));
    assert!(matches!(
        &log[3].kind,
        AuditKind::ShareChanged {
            grantee,
            projects: None,
            level: ShareLevel::Trusted,
            was_projects: Some(was),
            was_level: ShareLevel::Standard,
        } if grantee == "2" && was == &vec!["web".to_string()]
    ));
    assert!(log[3].detail.contains("projects web") && log[3].detail.contains("all projects"));
    assert!(matches!(&log[2].kind, AuditKind::ShareRemoved { grantee } if grantee == "2"));
    assert_eq!(log[0].agent.as_ref().unwrap().name, "test-agent");

    // Paging: newest first, then what is older than the last one seen, without overlap or gaps.
    let first = core.audit_for_owner("1", 2, None).await.unwrap();
    let rest = core
        .audit_for_owner("1", 50, Some(first[1].seq))
        .await
        .unwrap();
    assert_eq!(
        first.iter().chain(&rest).map(|e| e.seq).collect::<Vec<_>>(),
        log.iter().map(|e| e.seq).collect::<Vec<_>>()
    );
    // Sequence numbers have no gaps: a missing one would mean a deleted entry.
    let all = core
        .audit(&AuditFilter::default(), 100, None)
        .await
        .unwrap();
    assert!(all.windows(2).all(|w| w[0].seq == w[1].seq + 1), "{all:#?}");
    // The operator's filters: by actor, by agent (name or fingerprint prefix).
    let fp = log[0].agent.as_ref().unwrap().fingerprint.to_string();
    let filter = |actor: Option<&str>, agent: Option<&str>| AuditFilter {
        owner: None,
        actor: actor.map(Into::into),
        agent: agent.map(Into::into),
    };
    assert_eq!(
        core.audit(&filter(Some("1"), None), 100, None)
            .await
            .unwrap()
            .len(),
        6
    );
    assert!(core
        .audit(&filter(Some("2"), None), 100, None)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        labels(
            &core
                .audit(&filter(None, Some(&fp[..14])), 100, None)
                .await
                .unwrap()
        ),
        vec!["revoked", "default-agent", "paired"]
    );
}

#[tokio::test]
async fn the_operators_actions_are_attributed_to_the_operator() {
    let dir = tempfile::tempdir().unwrap();
    let relay = TestRelay::start(dir.path()).await;
    let core = relay.core.clone();
    let (_key, mut agent) = agent(&relay, "1").await;
    let call = |req: Request| {
        let dir = relay.data_dir.clone();
        async move { admin::call(&dir, &req).await.unwrap() }
    };
    let done = |r: Reply| assert!(matches!(r, Reply::Done { .. }), "{r:?}");

    done(
        call(Request::ShareAdd {
            user: "1".into(),
            grantee: "2".into(),
            projects: None,
            trusted: false,
        })
        .await,
    );
    done(
        call(Request::DefaultAgent {
            user: "1".into(),
            agent: "test-agent".into(),
        })
        .await,
    );
    // A grantee task submitted by the operator as user 2, and the owner's decision made by the operator.
    let theirs = core
        .submit_task(Submit {
            operator: true,
            ..shared("2", "1", "x")
        })
        .await
        .unwrap()
        .spec
        .task;
    expect_start(&mut agent).await;
    event_acked(&mut agent, &theirs, 1, approval()).await;
    done(
        call(Request::Decide {
            user: "1".into(),
            task: theirs.clone(),
            approval: "a1".into(),
            decision: Decision::Deny {
                reason: "not now".into(),
            },
        })
        .await,
    );
    assert!(matches!(
        recv(&mut agent).await,
        RelayMessage::Decide { .. }
    ));
    done(
        call(Request::Cancel {
            user: "1".into(),
            task: theirs.clone(),
        })
        .await,
    );
    done(
        call(Request::ShareRemove {
            user: "1".into(),
            grantee: "2".into(),
        })
        .await,
    );
    assert!(matches!(
        call(Request::Revoke {
            agent: "test-agent".into()
        })
        .await,
        Reply::Revoked { .. }
    ));

    let log = core.audit_for_owner("1", 50, None).await.unwrap();
    assert_eq!(
        labels(&log),
        vec![
            "revoked",
            "share-removed",
            "cancelled",
            "approval",
            "grantee-task",
            "default-agent",
            "share-added",
            "paired"
        ]
    );
    for e in &log[..log.len() - 1] {
        assert_eq!(e.actor, OPERATOR, "{e:?}");
    }
    assert_eq!(log[0].acting_as, None, "a revocation is the operator's own");
    assert_eq!(
        log[4].acting_as.as_deref(),
        Some("2"),
        "the task was the operator as user 2"
    );
    assert_eq!(log[3].acting_as.as_deref(), Some("1"));
    assert!(
        matches!(&log[3].kind, AuditKind::ApprovalDecided { decision, .. } if decision == "deny: not now")
    );
    // A Discord user can never be mistaken for the operator: user ids are digits.
    assert_eq!(Caller::operator("1").actor(), OPERATOR);

    // The operator reads it through the socket, filtered.
    let Reply::Audit { entries } = call(Request::Audit {
        filter: AuditFilter {
            owner: Some("1".into()),
            actor: Some(OPERATOR.into()),
            agent: None,
        },
        limit: 3,
        before: None,
    })
    .await
    else {
        panic!("expected audit entries")
    };
    assert_eq!(
        labels(&entries),
        vec!["revoked", "share-removed", "cancelled"]
    );

    // And through the command line, as a table and as JSON (on a blocking thread: the relay answering it runs
    // on this test's runtime).
    let cli = |args: &'static [&'static str]| {
        let dir = relay.data_dir.clone();
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_ct-relay"))
                .args(["admin", "audit"])
                .args(args)
                .arg("--data-dir")
                .arg(dir)
                .output()
                .unwrap()
        })
    };
    let out = cli(&["--owner", "1", "--limit", "2"]).await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].starts_with("SEQ") && lines[0].contains("ACTOR"),
        "{text}"
    );
    assert!(
        lines[1].contains("revoked") && lines[1].contains("operator") && lines[1].contains("UTC"),
        "{text}"
    );
    assert!(
        lines[2].contains("share-removed") && lines[2].contains("operator (as 1)"),
        "{text}"
    );
    assert!(
        text.contains("--before"),
        "says how to see older entries: {text}"
    );
    let out = cli(&["--actor", "2", "--json"]).await.unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["entries"].as_array().unwrap().len(), 0, "{json}");
    tokio::time::timeout(Duration::from_secs(5), relay.stop())
        .await
        .unwrap();
}

/// A tool use the agent allowed by a session rule is in the owner's log once, with the agent as actor, even when
/// the agent sends the event again after a reconnect.
#[tokio::test]
async fn a_use_allowed_by_a_session_rule_is_audited_once() {
    let dir = tempfile::tempdir().unwrap();
    let relay = TestRelay::start(dir.path()).await;
    let core = &relay.core;
    let (_key, mut agent) = agent(&relay, "1").await;
    core.share_add("1", "2", None, ShareLevel::Standard)
        .await
        .unwrap();
    let theirs = core
        .submit_task(shared("2", "1", "run the tests"))
        .await
        .unwrap()
        .spec
        .task;
    expect_start(&mut agent).await;
    let auto = TaskEvent::Tool {
        name: "Bash".into(),
        summary: "npm test\n--ci".into(),
        auto_allowed: Some(ct_protocol::scope::SessionScope::Prefix {
            prefix: "npm test".into(),
        }),
        id: None,
        command: None,
    };
    event_acked(&mut agent, &theirs, 1, auto.clone()).await;
    // Re-sent after a reconnect: stored once, audited once.
    event_acked(&mut agent, &theirs, 1, auto).await;
    let plain = TaskEvent::Tool {
        name: "Bash".into(),
        summary: "ls".into(),
        auto_allowed: None,
        id: None,
        command: None,
    };
    event_acked(&mut agent, &theirs, 2, plain).await;

    let log = core.audit_for_owner("1", 100, None).await.unwrap();
    let autos: Vec<&AuditEntry> = log
        .iter()
        .filter(|e| matches!(e.kind, AuditKind::AutoAllowed { .. }))
        .collect();
    assert_eq!(autos.len(), 1, "{log:#?}");
    let e = autos[0];
    assert_eq!(
        (e.actor.as_str(), e.owner.as_str(), e.task.as_deref()),
        (ct_relay::audit::AGENT, "1", Some(theirs.as_str()))
    );
    assert_eq!(
        e.kind,
        AuditKind::AutoAllowed {
            tool: "Bash".into(),
            summary: "npm test --ci".into(),
            rule: "simple Bash commands starting with \"npm test\"".into(),
            requester: "2".into(),
        }
    );
    assert!(e.detail.contains("user 2's task"), "{}", e.detail);
    // Not in the grantee's own log (they own no agents).
    assert!(core
        .audit_for_owner("2", 100, None)
        .await
        .unwrap()
        .iter()
        .all(|e| !matches!(e.kind, AuditKind::AutoAllowed { .. })));
}
