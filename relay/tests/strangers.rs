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
