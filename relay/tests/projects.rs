//! Projects through the agent, with a protocol-level stand-in for it: requests answered (or not) by the agent,
//! who may ask, who may answer, the bound on requests in flight, and the stored report used at submit.

use std::time::Duration;

use crate::support::{agent, event_acked, expect_start, recv, Session, TestRelay};
use ct_protocol::message::{AgentMessage, RelayMessage};
use ct_protocol::project::{ProjectInfo, ProjectOp, ProjectReply, ProjectsReport};
use ct_protocol::task::{FinalState, TaskEvent};
use ct_protocol::Fingerprint;
use ct_relay::core::Core;
use ct_relay::store::ShareLevel;
use ct_relay::tasks::{Submit, TaskError};
use ct_relay::RelayConfig;

fn report(names: &[&str], accepts_shared: bool) -> ProjectsReport {
    ProjectsReport {
        projects: names
            .iter()
            .map(|n| ProjectInfo {
                name: n.to_string(),
                path: format!("/home/one/src/{n}"),
            })
            .collect(),
        allowed_dirs: vec!["/home/one/src".into()],
        accepts_shared,
        accepts_files: false,
        pool: false,
    }
}

async fn relay_with_timeout(dir: &std::path::Path, timeout: Duration) -> TestRelay {
    let mut config = RelayConfig::new(dir.into(), "127.0.0.1:0".parse().unwrap());
    config.core.project_timeout = timeout;
    TestRelay::start_with(config).await
}

/// Starts a project request in the background, as a front end would.
fn ask(
    core: &Core,
    user: &str,
    agent: Option<&str>,
    op: ProjectOp,
) -> tokio::task::JoinHandle<Result<ProjectsReport, TaskError>> {
    let (core, user, agent) = (core.clone(), user.to_string(), agent.map(str::to_string));
    tokio::spawn(async move { core.project(&user, agent.as_deref(), op).await })
}

async fn expect_project(s: &mut Session) -> (u64, ProjectOp) {
    match recv(s).await {
        RelayMessage::Project { id, op } => (id, op),
        other => panic!("expected a project request, got {other:?}"),
    }
}

async fn answer(s: &mut Session, id: u64, reply: ProjectReply) {
    s.writer
        .send(&AgentMessage::ProjectReply { id, reply })
        .await
        .unwrap();
}

fn fp(key: &ed25519_dalek::SigningKey) -> Fingerprint {
    Fingerprint::of(&key.verifying_key())
}

#[tokio::test]
async fn project_requests_are_answered_by_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let relay = TestRelay::start(dir.path()).await;
    let (key, mut agent) = agent(&relay, "1").await;
    assert_eq!(relay.core.agent_projects(&fp(&key)).await.unwrap(), None);

    let add = ProjectOp::Add {
        name: "web".into(),
        path: "~/src/web".into(),
    };
    let pending = ask(&relay.core, "1", None, add.clone());
    let (id, op) = expect_project(&mut agent).await;
    assert_eq!(op, add);
    answer(&mut agent, id, ProjectReply::Ok(report(&["web"], false))).await;
    let got = pending.await.unwrap().unwrap();
    assert_eq!(got, report(&["web"], false));
    // The answer is also kept as the agent's report.
    assert_eq!(
        relay.core.agent_projects(&fp(&key)).await.unwrap(),
        Some(report(&["web"], false))
    );

    let pending = ask(
        &relay.core,
        "1",
        Some("test-agent"),
        ProjectOp::Add {
            name: "etc".into(),
            path: "/etc".into(),
        },
    );
    let (id, _) = expect_project(&mut agent).await;
    let refusal = "/etc is outside the allowed folders (/home/one/src)";
    answer(
        &mut agent,
        id,
        ProjectReply::Refused {
            message: refusal.into(),
        },
    )
    .await;
    let err = pending.await.unwrap().unwrap_err();
    assert!(matches!(err, TaskError::ProjectRefused { .. }), "{err}");
    assert!(err.to_string().contains(refusal), "{err}");
    assert_eq!(relay.core.pending_project_requests().await, 0);

    // Requests that would confuse names with paths, or are too large, never reach the agent.
    for bad in [
        ProjectOp::Add {
            name: "a/b".into(),
            path: "~/x".into(),
        },
        ProjectOp::Add {
            name: "x".repeat(65),
            path: "~/x".into(),
        },
        ProjectOp::Add {
            name: "ok".into(),
            path: "/".repeat(5000),
        },
        ProjectOp::Remove { name: " ".into() },
    ] {
        let err = relay.core.project("1", None, bad).await.unwrap_err();
        assert!(matches!(err, TaskError::BadProjectRequest(_)), "{err}");
    }
    let pending = ask(&relay.core, "1", None, ProjectOp::List);
    let (id, op) = expect_project(&mut agent).await;
    assert_eq!(op, ProjectOp::List, "the refused requests were never sent");
    answer(&mut agent, id, ProjectReply::Ok(report(&["web"], false))).await;
    pending.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_silent_agent_times_out_and_leaves_nothing_pending() {
    let dir = tempfile::tempdir().unwrap();
    let relay = relay_with_timeout(dir.path(), Duration::from_millis(300)).await;
    let (_key, mut agent) = agent(&relay, "1").await;
    let pending = ask(&relay.core, "1", None, ProjectOp::List);
    let (id, _) = expect_project(&mut agent).await;
    let err = pending.await.unwrap().unwrap_err();
    assert!(matches!(err, TaskError::NoAnswer { .. }), "{err}");
    assert!(err.to_string().contains("is it running?"), "{err}");
    assert_eq!(relay.core.pending_project_requests().await, 0);
    // A late answer is ignored and the session carries on.
    answer(&mut agent, id, ProjectReply::Ok(report(&["late"], true))).await;
    let task = relay
        .core
        .submit_task(Submit {
            user: "1".into(),
            project: "web".into(),
            prompt: "hi".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .spec
        .task;
    assert_eq!(expect_start(&mut agent).await.task, task);
}

#[tokio::test]
async fn only_the_owner_asks_and_only_the_asked_agent_answers() {
    let dir = tempfile::tempdir().unwrap();
    let relay = TestRelay::start(dir.path()).await;
    let (victim_key, mut victim) = agent(&relay, "1").await;
    let victim_fp = fp(&victim_key).to_string();

    // A user without agents, and one with their own agent, both naming the victim's agent.
    let err = relay
        .core
        .project("3", Some(&victim_fp), ProjectOp::List)
        .await
        .unwrap_err();
    assert!(matches!(err, TaskError::NoAgent), "{err}");
    let (_attacker_key, mut attacker) = agent(&relay, "2").await;
    let err = relay
        .core
        .project("2", Some(&victim_fp), ProjectOp::List)
        .await
        .unwrap_err();
    assert!(matches!(err, TaskError::UnknownAgent { .. }), "{err}");
    // A share lets a user run tasks, not change the owner's projects.
    relay
        .core
        .share_add("1", "3", None, ShareLevel::Trusted)
        .await
        .unwrap();
    assert!(relay
        .core
        .project("3", Some(&victim_fp), ProjectOp::List)
        .await
        .is_err());

    // The owner's request: the attacker's agent answers it first with the id the victim was sent. Ids are
    // sequential, so guessing them is easy; the answer must still come from the agent that was asked.
    let pending = ask(&relay.core, "1", None, ProjectOp::List);
    let (id, _) = expect_project(&mut victim).await;
    answer(&mut attacker, id, ProjectReply::Ok(report(&["evil"], true))).await;
    // The attacker's session handles its messages in order: once this task event is acknowledged, the
    // forged answer was handled.
    let own = relay
        .core
        .submit_task(Submit {
            user: "2".into(),
            project: "x".into(),
            prompt: "hi".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .spec
        .task;
    expect_start(&mut attacker).await;
    event_acked(
        &mut attacker,
        &own,
        1,
        TaskEvent::Started { cwd: "/x".into() },
    )
    .await;
    assert!(!pending.is_finished());
    answer(&mut victim, id, ProjectReply::Ok(report(&["web"], false))).await;
    assert_eq!(pending.await.unwrap().unwrap(), report(&["web"], false));
}

#[tokio::test]
async fn requests_in_flight_are_bounded_and_fail_when_the_agent_leaves() {
    let dir = tempfile::tempdir().unwrap();
    let relay = relay_with_timeout(dir.path(), Duration::from_secs(60)).await;
    let (_key, agent) = agent(&relay, "1").await;
    let max = ct_relay::projects::MAX_PENDING_PER_AGENT;
    let waiting: Vec<_> = (0..max)
        .map(|_| ask(&relay.core, "1", None, ProjectOp::List))
        .collect();
    crate::support::eventually_async(Duration::from_secs(5), async || {
        relay.core.pending_project_requests().await == max
    })
    .await;
    let err = relay
        .core
        .project("1", None, ProjectOp::List)
        .await
        .unwrap_err();
    assert!(matches!(err, TaskError::TooManyRequests(_)), "{err}");

    drop(agent);
    for w in waiting {
        let err = tokio::time::timeout(Duration::from_secs(10), w)
            .await
            .expect("answered when the agent left, not at the timeout")
            .unwrap()
            .unwrap_err();
        assert!(matches!(err, TaskError::AgentGone(_)), "{err}");
    }
    assert_eq!(relay.core.pending_project_requests().await, 0);
    let err = relay
        .core
        .project("1", None, ProjectOp::List)
        .await
        .unwrap_err();
    assert!(matches!(err, TaskError::Offline { .. }), "{err}");
}

#[tokio::test]
async fn the_agents_report_is_kept_and_unknown_projects_are_refused_with_the_list() {
    let dir = tempfile::tempdir().unwrap();
    let relay = TestRelay::start(dir.path()).await;
    let core = &relay.core;
    let (key, mut agent) = agent(&relay, "1").await;
    agent
        .writer
        .send(&AgentMessage::Projects(report(&["web", "api"], false)))
        .await
        .unwrap();
    crate::support::eventually_async(Duration::from_secs(5), async || {
        core.agent_projects(&fp(&key)).await.unwrap().is_some()
    })
    .await;

    let submit = |user: &str, target: Option<&str>, project: &str| Submit {
        user: user.into(),
        target: target.map(str::to_string),
        project: project.into(),
        prompt: "go".into(),
        ..Default::default()
    };
    let err = core
        .submit_task(submit("1", None, "nope"))
        .await
        .unwrap_err();
    assert!(matches!(err, TaskError::UnknownProject { .. }), "{err}");
    assert!(
        err.to_string().contains("web, api") && err.to_string().contains("/project add"),
        "{err}"
    );
    for fine in ["web", "~/src/other", "/home/one/src/x", "C:\\src\\app"] {
        let id = core
            .submit_task(submit("1", None, fine))
            .await
            .unwrap()
            .spec
            .task;
        let spec = expect_start(&mut agent).await;
        assert_eq!((spec.task, spec.project.as_str()), (id.clone(), fine));
        event_acked(
            &mut agent,
            &id,
            1,
            crate::support::finished(FinalState::Done),
        )
        .await;
    }

    // This agent refuses shared tasks: a grantee hears so from the relay.
    core.share_add("1", "2", None, ShareLevel::Standard)
        .await
        .unwrap();
    let err = core
        .submit_task(submit("2", Some("1"), "web"))
        .await
        .unwrap_err();
    assert!(matches!(err, TaskError::SharedNotAccepted { .. }), "{err}");

    agent
        .writer
        .send(&AgentMessage::Projects(report(&["web", "api"], true)))
        .await
        .unwrap();
    crate::support::eventually_async(Duration::from_secs(5), async || {
        core.agent_projects(&fp(&key))
            .await
            .unwrap()
            .is_some_and(|r| r.accepts_shared)
    })
    .await;
    let err = core
        .submit_task(submit("2", Some("1"), "nope"))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("web, api") && err.to_string().contains("ask user 1"),
        "{err}"
    );
    assert_eq!(
        core.usable_projects("2", Some("1"), None).await.unwrap(),
        vec!["web", "api"]
    );
    // A limited grantee sees only their projects, in the list and in refusals.
    core.share_add("1", "2", Some(vec!["web".into()]), ShareLevel::Standard)
        .await
        .unwrap();
    assert_eq!(
        core.usable_projects("2", Some("1"), None).await.unwrap(),
        vec!["web"]
    );
    let available = core.shares_available("2").await.unwrap();
    assert_eq!(available[0].agents[0].projects, vec!["web"]);
    assert_eq!(available[0].agents[0].accepts_shared, Some(true));
    assert!(matches!(
        core.usable_projects("3", Some("1"), None).await,
        Err(TaskError::NotShared { .. })
    ));

    // Kept while the agent is offline.
    drop(agent);
    crate::support::eventually_async(Duration::from_secs(5), async || {
        !crate::support::is_online(&relay, &key).await
    })
    .await;
    assert_eq!(
        core.agent_projects(&fp(&key)).await.unwrap(),
        Some(report(&["web", "api"], true))
    );
    assert_eq!(
        core.usable_projects("1", None, None).await.unwrap(),
        vec!["web", "api"]
    );
}

#[tokio::test]
async fn an_oversized_report_is_cut_to_its_bound() {
    let dir = tempfile::tempdir().unwrap();
    let relay = TestRelay::start(dir.path()).await;
    let (key, agent) = agent(&relay, "1").await;
    let mut agent = agent;
    let names: Vec<String> = (0..ct_relay::projects::MAX_REPORTED + 100)
        .map(|i| format!("p{i}"))
        .collect();
    let mut big = report(&names.iter().map(String::as_str).collect::<Vec<_>>(), true);
    big.projects.push(ProjectInfo {
        name: "n".repeat(1000),
        path: "/x".into(),
    });
    agent
        .writer
        .send(&AgentMessage::Projects(big))
        .await
        .unwrap();
    crate::support::eventually_async(Duration::from_secs(5), async || {
        relay
            .core
            .agent_projects(&fp(&key))
            .await
            .unwrap()
            .is_some()
    })
    .await;
    let kept = relay.core.agent_projects(&fp(&key)).await.unwrap().unwrap();
    assert_eq!(kept.projects.len(), ct_relay::projects::MAX_REPORTED);
    assert!(kept.projects.iter().all(|p| p.name.len() <= 64));

    // Long paths: fewer entries, within the byte budget.
    let long: Vec<ProjectInfo> = (0..200)
        .map(|i| ProjectInfo {
            name: format!("p{i}"),
            path: format!("/{}", "d".repeat(4000)),
        })
        .collect();
    let wide = ProjectsReport {
        projects: long,
        allowed_dirs: vec!["/".into()],
        accepts_shared: true,
        accepts_files: false,
        pool: false,
    };
    agent
        .writer
        .send(&AgentMessage::Projects(wide))
        .await
        .unwrap();
    crate::support::eventually_async(Duration::from_secs(5), async || {
        relay
            .core
            .agent_projects(&fp(&key))
            .await
            .unwrap()
            .unwrap()
            .projects
            .len()
            < 200
    })
    .await;
    let kept = relay.core.agent_projects(&fp(&key)).await.unwrap().unwrap();
    let bytes: usize = kept
        .projects
        .iter()
        .map(|p| p.name.len() + p.path.len())
        .sum();
    assert!(bytes <= ct_relay::projects::MAX_REPORT_BYTES, "{bytes}");
    assert!(!kept.projects.is_empty());
}
