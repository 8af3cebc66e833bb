//! What one person (or one of their agents) may keep on the relay: agents paired, project reports a minute,
//! stored task output. Each limit is pushed past, and the refusal must say what to do.

use ct_protocol::message::AgentMessage;
use ct_protocol::project::{ProjectInfo, ProjectsReport};
use ct_protocol::task::TaskEvent;
use ct_relay::core::CoreError;
use ct_relay::tasks::{Submit, TaskError};
use ct_relay::RelayConfig;

use crate::support::{event_acked, expect_start, try_pair, TestRelay};

fn config(dir: &std::path::Path) -> RelayConfig {
    RelayConfig::new(dir.into(), "127.0.0.1:0".parse().unwrap())
}

fn submit(user: &str) -> Submit {
    Submit {
        user: user.into(),
        project: "web".into(),
        prompt: "go".into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_person_cannot_pair_more_agents_than_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    config.core.max_agents_per_user = 2;
    let relay = TestRelay::start_with(config).await;
    // A code minted while there is room, kept for later.
    let early = relay.token("5").await.code.to_string();
    try_pair(&relay, relay.token("5").await.code.to_string())
        .await
        .unwrap();
    try_pair(&relay, relay.token("5").await.code.to_string())
        .await
        .unwrap();

    // Full: no new code, and the early one is refused too, both saying what to do.
    let err = relay.core.mint_pairing_token("5").await.unwrap_err();
    assert!(
        matches!(err, CoreError::TooManyAgents { have: 2, max: 2 }),
        "{err}"
    );
    assert!(err.to_string().contains("unregister"), "{err}");
    let (_, message) = try_pair(&relay, early.clone()).await.unwrap_err();
    assert!(message.contains("unregister"), "{message}");
    // Someone else is unaffected.
    relay.core.mint_pairing_token("6").await.unwrap();

    // Unregistering one makes room, and the early code still works.
    let one = relay.core.agents().await.unwrap()[0]
        .fingerprint
        .to_string();
    relay.core.revoke(&one, "5").await.unwrap();
    try_pair(&relay, early).await.unwrap();
}

#[tokio::test]
async fn an_agent_flooding_project_reports_has_the_extra_ones_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    config.core.project_reports_per_minute = 2;
    let relay = TestRelay::start_with(config).await;
    let (_, mut agent) = crate::support::agent(&relay, "1").await;
    let id = relay.core.submit_task(submit("1")).await.unwrap().spec.task;
    assert_eq!(expect_start(&mut agent).await.task, id);
    let report = |n: usize| ProjectsReport {
        projects: vec![ProjectInfo {
            name: format!("p{n}"),
            path: format!("/src/p{n}"),
        }],
        allowed_dirs: vec!["/src".into()],
        accepts_shared: false,
        accepts_files: false,
        pool: false,
    };
    for n in 1..=50 {
        agent
            .writer
            .send(&AgentMessage::Projects(report(n)))
            .await
            .unwrap();
    }
    // The session handles an agent's messages in order: once this event is acknowledged, every report
    // before it has been handled.
    event_acked(&mut agent, &id, 1, TaskEvent::Text { text: "x".into() }).await;
    let fp = relay.core.agents().await.unwrap()[0].fingerprint;
    let kept = relay.core.agent_projects(&fp).await.unwrap().unwrap();
    assert_eq!(kept, report(2), "only the burst of 2 was stored");
}

#[tokio::test]
async fn a_persons_stored_output_is_capped_and_the_refusal_says_when_it_frees() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    config.core.max_stored_per_user = 4096;
    let relay = TestRelay::start_with(config).await;
    let (_, mut agent) = crate::support::agent(&relay, "1").await;
    let id = relay.core.submit_task(submit("1")).await.unwrap().spec.task;
    assert_eq!(expect_start(&mut agent).await.task, id);
    event_acked(
        &mut agent,
        &id,
        1,
        TaskEvent::Text {
            text: "y".repeat(5000),
        },
    )
    .await;
    let err = relay.core.submit_task(submit("1")).await.unwrap_err();
    assert!(matches!(err, TaskError::StorageFull { .. }), "{err}");
    let said = err.to_string();
    assert!(said.contains("4 KiB") && said.contains("30 days"), "{said}");
    // Another person's tasks are not held back by it.
    let (_, mut other) = crate::support::agent(&relay, "2").await;
    relay.core.submit_task(submit("2")).await.unwrap();
    expect_start(&mut other).await;
}
