//! What someone learns, and what they cost the relay, by naming tasks that are not theirs: nothing beyond
//! what naming a task that does not exist tells them.

use ct_bot::backend::Backend;
use ct_protocol::task::Decision;
use ct_relay::discord::CoreBackend;
use ct_relay::tasks::Submit;

use crate::support::TestRelay;

/// A running task of user 1 on their agent; returns the agent's session (kept open) and the task id.
async fn owners_task(relay: &TestRelay) -> (crate::support::Session, String) {
    let (_, mut agent) = crate::support::agent(relay, "1").await;
    let id = relay
        .core
        .submit_task(Submit {
            user: "1".into(),
            project: "web".into(),
            prompt: "rotate the production keys".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .spec
        .task;
    assert_eq!(crate::support::expect_start(&mut agent).await.task, id);
    (agent, id)
}

#[tokio::test]
async fn someone_elses_task_reads_exactly_like_one_that_does_not_exist() {
    let dir = tempfile::tempdir().unwrap();
    let relay = TestRelay::start(dir.path()).await;
    let (_agent, id) = owners_task(&relay).await;
    let backend = CoreBackend::new(relay.core.clone());
    let stranger = "666";
    let unknown = "t_0000000000";
    // Every way a command names a task: /status, /approve and /cc (which look the task up first), /cancel,
    // a follow-up, a decision.
    for (what, foreign, none) in [
        (
            "task",
            backend.task(stranger, &id).await.map(|_| ()),
            backend.task(stranger, unknown).await.map(|_| ()),
        ),
        (
            "cancel",
            backend.cancel(stranger, &id).await,
            backend.cancel(stranger, unknown).await,
        ),
        (
            "reply",
            backend.reply(stranger, &id, "hi").await.map(|_| ()),
            backend.reply(stranger, unknown, "hi").await.map(|_| ()),
        ),
        (
            "decide",
            backend
                .decide(stranger, &id, "a1", Decision::AllowSession)
                .await,
            backend
                .decide(stranger, unknown, "a1", Decision::AllowSession)
                .await,
        ),
    ] {
        let foreign = foreign.unwrap_err().to_string().replace(&id, "<id>");
        let none = none.unwrap_err().to_string().replace(unknown, "<id>");
        assert_eq!(foreign, none, "{what}: a stranger can tell the task exists");
        assert!(
            !foreign.contains("web") && !foreign.contains('1'),
            "{what}: {foreign}"
        );
    }
    // And the owner still gets on with it.
    assert_eq!(backend.task("1", &id).await.unwrap().id, id);
}

/// The agent's refusal as it words it for its owner (`agent/src/projects.rs`, `PolicyError::OutsideAllowed`).
const REFUSAL: &str = "/home/ana/clients/acme is not inside an allowed folder (allowed: /home/ana/src, \
                       /home/ana/private): run `ct-agent project add <name> /home/ana/clients/acme` on this \
                       machine, or add it to ALLOWED_PROJECT_DIRS";

/// The end message of a task the agent refused with [`REFUSAL`], as followers (the thread) get it.
async fn refused(relay: &TestRelay, agent: &mut crate::support::Session, submit: Submit) -> String {
    use ct_protocol::task::{FinalState, TaskEvent};
    let id = relay.core.submit_task(submit).await.unwrap().spec.task;
    assert_eq!(crate::support::expect_start(agent).await.task, id);
    crate::support::event_acked(
        agent,
        &id,
        1,
        TaskEvent::Finished {
            state: FinalState::Failed,
            message: Some(REFUSAL.into()),
        },
    )
    .await;
    let (_, past, _) = relay.core.follow(&id).await.unwrap();
    match &past[..] {
        [(1, TaskEvent::Finished { message, .. })] => message.clone().unwrap(),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_refusal_shown_to_a_grantee_names_none_of_the_owners_folders() {
    let dir = tempfile::tempdir().unwrap();
    let relay = TestRelay::start(dir.path()).await;
    let (_, mut agent) = crate::support::agent(&relay, "1").await;
    relay
        .core
        .share_add("1", "2", None, ct_relay::store::ShareLevel::Standard)
        .await
        .unwrap();
    let probe = |user: &str| Submit {
        user: user.into(),
        target: Some("1".into()),
        project: "/home/ana/clients/acme".into(),
        prompt: "list the files".into(),
        ..Default::default()
    };

    let grantee_sees = refused(&relay, &mut agent, probe("2")).await;
    assert!(!grantee_sees.contains("/home/ana"), "{grantee_sees}");
    assert!(
        grantee_sees.contains("is not inside an allowed folder"),
        "{grantee_sees}"
    );
    // The owner's own task keeps every word: the folders are theirs.
    let owner_sees = refused(&relay, &mut agent, probe("1")).await;
    assert_eq!(owner_sees, REFUSAL);
}
