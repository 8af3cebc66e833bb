//! A person's task history through the bot's backend over the real core (`/tasks`, `/status`): their own tasks
//! and the tasks a grantee ran on their agents, newest first, filtered and paged, with the thread each went to;
//! a grantee sees only what they asked for; a task's events go only to its people, and someone else's task
//! is refused exactly like one that does not exist.

use ct_bot::backend::{Backend, HistoryQuery};
use ct_relay::discord::CoreBackend;
use ct_relay::store::ShareLevel;
use ct_relay::tasks::Submit;

use crate::support::{expect_start, TestRelay};

fn all(take: usize) -> HistoryQuery {
    HistoryQuery {
        take,
        ..HistoryQuery::default()
    }
}

#[tokio::test]
async fn history_holds_own_and_grantees_tasks_with_their_threads_and_events_only_for_their_people()
{
    let dir = tempfile::tempdir().unwrap();
    let relay = TestRelay::start(dir.path()).await;
    let (_, mut agent) = crate::support::agent(&relay, "1").await;
    relay
        .core
        .share_add("1", "2", None, ShareLevel::Standard)
        .await
        .unwrap();
    let submit = |user: &str, prompt: &str| Submit {
        user: user.into(),
        target: (user != "1").then(|| "1".into()),
        project: "web".into(),
        prompt: prompt.into(),
        ..Default::default()
    };
    let own = relay
        .core
        .submit_task(submit("1", "mine"))
        .await
        .unwrap()
        .spec
        .task;
    assert_eq!(expect_start(&mut agent).await.task, own);
    let granted = relay
        .core
        .submit_task(submit("2", "the grantee's"))
        .await
        .unwrap()
        .spec
        .task;
    assert_eq!(expect_start(&mut agent).await.task, granted);
    let backend = CoreBackend::new(relay.core.clone());
    backend.set_task_thread(&own, 4242).await.unwrap();

    // The owner: both, newest first, the grantee named as requester, the thread where there was one.
    let page = backend.history("1", &all(10)).await.unwrap();
    let listed: Vec<(&str, &str, Option<u64>)> = page
        .entries
        .iter()
        .map(|e| (e.task.id.as_str(), e.task.requester.as_str(), e.thread))
        .collect();
    assert_eq!(
        listed,
        [
            (granted.as_str(), "2", None),
            (own.as_str(), "1", Some(4242))
        ]
    );
    assert!(!page.more);
    // Paged.
    let first = backend.history("1", &all(1)).await.unwrap();
    assert_eq!((first.entries.len(), first.more), (1, true));
    let second = backend
        .history("1", &HistoryQuery { skip: 1, ..all(1) })
        .await
        .unwrap();
    assert_eq!(second.entries[0].task.id, own);
    assert!(!second.more);
    // Filtered by agent and state.
    let agent_name = page.entries[0].task.agent.clone();
    for (query, n) in [
        (
            HistoryQuery {
                agent: Some(agent_name.clone()),
                ..all(10)
            },
            2,
        ),
        (
            HistoryQuery {
                agent: Some("nowhere".into()),
                ..all(10)
            },
            0,
        ),
        (
            HistoryQuery {
                state: Some("open".into()),
                ..all(10)
            },
            2,
        ),
        (
            HistoryQuery {
                state: Some("done".into()),
                ..all(10)
            },
            0,
        ),
    ] {
        let found = backend.history("1", &query).await.unwrap();
        assert_eq!(found.entries.len(), n, "{query:?}");
    }
    // The grantee: what they asked for only. A stranger: nothing.
    let theirs = backend.history("2", &all(10)).await.unwrap();
    let ids: Vec<&str> = theirs.entries.iter().map(|e| e.task.id.as_str()).collect();
    assert_eq!(ids, [granted.as_str()]);
    assert!(backend
        .history("3", &all(10))
        .await
        .unwrap()
        .entries
        .is_empty());

    // The whole output: the requester and the owner read it; the grantee cannot read the owner's task, and
    // is told exactly what a made-up id gets.
    assert_eq!(
        backend.task_events("2", &granted).await.unwrap().0.id,
        granted
    );
    assert_eq!(
        backend.task_events("1", &granted).await.unwrap().0.id,
        granted
    );
    let unknown = "t_0000000000";
    let foreign = backend
        .task_events("2", &own)
        .await
        .unwrap_err()
        .to_string();
    let none = backend
        .task_events("2", unknown)
        .await
        .unwrap_err()
        .to_string();
    assert_eq!(foreign.replace(&own, "<id>"), none.replace(unknown, "<id>"));
}
