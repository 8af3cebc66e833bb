//! Worker pools over the real core, with protocol-level stand-ins for the workers: access, modes, assignment
//! (least loaded, sticky, moved off drained and revoked workers), routing of cluster-mode tasks, and the pool
//! forms of the project commands.

use std::time::Duration;

use crate::support::{
    connect, eventually_async, expect_start, handshake, recv, Session, TestRelay,
};
use ct_protocol::handshake::PairRequest;
use ct_protocol::message::{AgentMessage, RelayMessage};
use ct_protocol::project::{ProjectOp, ProjectReply, ProjectsReport, UsageReport};
use ct_protocol::task::Role;
use ct_protocol::{Fingerprint, Transport};
use ct_relay::admin::{self, Reply, Request};
use ct_relay::core::pools::{Mode, PoolOp, PoolReply};
use ct_relay::store::{AuditKind, PoolAccess};
use ct_relay::tasks::{ReplyOutcome, Submit, TaskError};
use ed25519_dalek::SigningKey;

/// What a pool worker reports: no projects of its own (each user's are asked for).
fn pool_report() -> ProjectsReport {
    ProjectsReport {
        accepts_shared: true,
        pool: true,
        ..Default::default()
    }
}

fn fp(key: &SigningKey) -> Fingerprint {
    Fingerprint::of(&key.verifying_key())
}

/// Pairs a worker of `pool` named `name` with a pool code, connects it and has it report itself as a pool
/// worker (stored before this returns).
async fn worker(relay: &TestRelay, pool: &str, name: &str) -> (SigningKey, Session) {
    let key = SigningKey::generate(&mut rand::rngs::OsRng);
    let (token, _) = relay.core.pool_pairing_token(pool).await.unwrap();
    let pair = PairRequest {
        code: token.code.to_string(),
        name: name.into(),
    };
    let s = handshake(
        Transport::Quic,
        relay.addr,
        &key,
        relay.fingerprint,
        Some(pair),
    )
    .await
    .expect("the worker pairs");
    assert!(s.welcome.paired);
    assert_eq!(s.welcome.owner, format!("pool:{pool}"));
    drop(s);
    let mut s = connect(relay, &key).await;
    s.writer
        .send(&AgentMessage::Projects(pool_report()))
        .await
        .unwrap();
    let f = fp(&key);
    eventually_async(Duration::from_secs(5), async || {
        relay.core.agent_projects(&f).await.unwrap().is_some()
    })
    .await;
    (key, s)
}

fn task(user: &str, prompt: &str) -> Submit {
    Submit {
        user: user.into(),
        project: "web".into(),
        prompt: prompt.into(),
        ..Default::default()
    }
}

fn everyone() -> PoolAccess {
    PoolAccess::Everyone
}

fn cluster(pool: &str) -> Mode {
    Mode::Cluster {
        pool: Some(pool.into()),
    }
}

/// A relay with pool `gpu` open to everyone and two workers, `w1` and `w2`.
async fn two_workers(
    dir: &std::path::Path,
) -> (TestRelay, (SigningKey, Session), (SigningKey, Session)) {
    let relay = TestRelay::start(dir).await;
    relay.core.set_pool_access("gpu", everyone()).await.unwrap();
    let w1 = worker(&relay, "gpu", "w1").await;
    let w2 = worker(&relay, "gpu", "w2").await;
    (relay, w1, w2)
}

#[tokio::test]
async fn users_get_the_least_loaded_worker_and_stay_there() {
    let dir = tempfile::tempdir().unwrap();
    let (relay, (k1, mut w1), (k2, mut w2)) = two_workers(dir.path()).await;
    let core = &relay.core;
    for user in ["11", "12", "13"] {
        let view = core.set_mode(user, cluster("gpu"), None).await.unwrap();
        assert!(view.cluster);
        assert_eq!(view.pool.as_deref(), Some("gpu"));
        assert_eq!(view.worker, None, "a worker is chosen at the first use");
    }

    // Both empty: the first by name. The next user goes to the other, emptier one.
    let a = core.submit_task(task("11", "first")).await.unwrap();
    assert_eq!(a.agent, fp(&k1));
    let spec = expect_start(&mut w1).await;
    assert_eq!(spec.requester.user, "11");
    assert_eq!(spec.requester.role, Role::TrustedGrantee);
    // The worker reported no projects: the project is its to find in the user's workspace.
    assert_eq!(spec.project, "web");
    let b = core.submit_task(task("12", "second")).await.unwrap();
    assert_eq!(b.agent, fp(&k2));
    assert_eq!(expect_start(&mut w2).await.requester.user, "12");

    // Sticky: user 11 stays on w1 even though w1 is now the busier one.
    let again = core.submit_task(task("11", "again")).await.unwrap();
    assert_eq!(again.agent, fp(&k1));
    expect_start(&mut w1).await;

    // One user each: the tie goes to fewer open tasks (w1 has two, w2 one).
    let c = core.submit_task(task("13", "third")).await.unwrap();
    assert_eq!(c.agent, fp(&k2));
    expect_start(&mut w2).await;

    let view = core.mode("11").await.unwrap();
    assert_eq!(view.worker.as_deref(), Some("w1"));
    assert!(view.online && !view.draining);
    assert!(
        view.describe().contains("pool gpu, on worker w1"),
        "{}",
        view.describe()
    );

    let pools = core.pools().await.unwrap();
    assert_eq!(pools.len(), 1);
    let gpu = &pools[0];
    assert_eq!(gpu.access, PoolAccess::Everyone);
    let w = |name: &str| gpu.workers.iter().find(|w| w.name == name).unwrap();
    assert_eq!(w("w1").users, ["11"]);
    assert_eq!(w("w2").users, ["12", "13"]);
    assert_eq!((w("w1").open_tasks, w("w2").open_tasks), (2, 2));
    assert!(w("w1").online);
    assert_eq!(gpu.users.len(), 3);

    // Assignments are in the user's own audit log.
    let log = core.audit_for_owner("11", 10, None).await.unwrap();
    assert!(
        log.iter().any(
            |e| matches!(&e.kind, AuditKind::PoolChanged { pool } if pool == "gpu")
                && e.detail.contains("assigned to worker w1")
        ),
        "{log:?}"
    );
}

#[tokio::test]
async fn pool_tasks_are_approved_by_their_requester_and_follow_ups_reach_the_same_worker() {
    let dir = tempfile::tempdir().unwrap();
    let (relay, (k1, mut w1), _w2) = two_workers(dir.path()).await;
    let core = &relay.core;
    core.set_mode("11", cluster("gpu"), None).await.unwrap();
    let t = core.submit_task(task("11", "build it")).await.unwrap();
    assert_eq!(t.agent, fp(&k1));
    let spec = expect_start(&mut w1).await;
    assert_eq!(core.approver(&spec.task).await.unwrap(), "11");
    // The worker's owner is no person: nobody else may act on the task.
    assert!(core.approver(&spec.task).await.unwrap() != "pool:gpu");
    crate::support::event_acked(
        &mut w1,
        &spec.task,
        1,
        ct_protocol::task::TaskEvent::Text { text: "hi".into() },
    )
    .await;
    match core
        .reply("11", &spec.task, "more".into(), None)
        .await
        .unwrap()
    {
        ReplyOutcome::Sent(rec) => assert_eq!(rec.agent, fp(&k1)),
        other => panic!("expected the follow-up sent, got {other:?}"),
    }
    match recv(&mut w1).await {
        RelayMessage::TaskInput { task, prompt } => {
            assert_eq!(
                (task.as_str(), prompt.as_str()),
                (spec.task.as_str(), "more")
            )
        }
        other => panic!("expected the follow-up, got {other:?}"),
    }
    // The pool's log has the task, as a grantee's task is in an owner's.
    let log = core
        .read(|s| s.audit_of_owner("pool:gpu", None, 20))
        .await
        .unwrap()
        .unwrap();
    assert!(
        log.iter()
            .any(|e| matches!(e.kind, AuditKind::GranteeTask { .. })),
        "{log:?}"
    );
}

#[tokio::test]
async fn a_drained_worker_loses_its_users_at_their_next_use_and_they_hear_their_files_stay() {
    let dir = tempfile::tempdir().unwrap();
    let (relay, (k1, mut w1), (k2, mut w2)) = two_workers(dir.path()).await;
    let core = &relay.core;
    for user in ["11", "12"] {
        core.set_mode(user, cluster("gpu"), None).await.unwrap();
    }
    assert_eq!(
        core.submit_task(task("11", "a")).await.unwrap().agent,
        fp(&k1)
    );
    expect_start(&mut w1).await;
    // User 12 lands on w2; move them to w1 as well by draining w2 for a moment.
    let drained = core.drain_worker("w2", true).await.unwrap();
    assert!(drained.draining);
    let b = core.submit_task(task("12", "b")).await.unwrap();
    assert_eq!(b.agent, fp(&k1), "a draining worker takes no new users");
    expect_start(&mut w1).await;
    assert!(!core.drain_worker("w2", false).await.unwrap().draining);

    // Draining w1 moves each of its users on their next task or project command, not before.
    core.drain_worker(&fp(&k1).to_string(), true).await.unwrap();
    assert!(core.mode("11").await.unwrap().draining);
    assert_eq!(core.mode("11").await.unwrap().worker.as_deref(), Some("w1"));
    let moved = core.submit_task(task("11", "c")).await.unwrap();
    assert_eq!(moved.agent, fp(&k2));
    expect_start(&mut w2).await;
    let view = core.mode("11").await.unwrap();
    assert_eq!(view.worker.as_deref(), Some("w2"));
    let note = view.note.expect("the user is told where their files are");
    assert!(note.contains("stay on worker w1"), "{note}");

    // A project command moves user 12, and its answer says so.
    let pending = {
        let core = core.clone();
        tokio::spawn(async move { core.pool_project("12", None, PoolOp::List).await })
    };
    let (id, op) = expect_project(&mut w2).await;
    assert_eq!(op, ProjectOp::ListFor { user: "12".into() });
    answer(&mut w2, id, ProjectReply::Ok(pool_report())).await;
    let got = pending.await.unwrap().unwrap();
    assert_eq!(got.worker, "w2");
    let note = got.note.expect("moved just now");
    assert!(
        note.contains("being drained") && note.contains("your files on w1 stay there"),
        "{note}"
    );
    assert!(note.contains("starts empty"), "{note}");
    let pools = core.pools().await.unwrap();
    let w1_view = pools[0].workers.iter().find(|w| w.name == "w1").unwrap();
    assert!(w1_view.draining && w1_view.users.is_empty());
}

#[tokio::test]
async fn a_revoked_workers_users_are_reassigned() {
    let dir = tempfile::tempdir().unwrap();
    let (relay, (k1, mut w1), (k2, mut w2)) = two_workers(dir.path()).await;
    let core = &relay.core;
    core.set_mode("11", cluster("gpu"), None).await.unwrap();
    assert_eq!(
        core.submit_task(task("11", "a")).await.unwrap().agent,
        fp(&k1)
    );
    expect_start(&mut w1).await;
    core.revoke("w1", ct_relay::store::OPERATOR).await.unwrap();
    let next = core.submit_task(task("11", "b")).await.unwrap();
    assert_eq!(next.agent, fp(&k2));
    expect_start(&mut w2).await;
    let note = core.mode("11").await.unwrap().note.unwrap();
    assert!(note.contains("stay on worker w1"), "{note}");
    let log = core.audit_for_owner("11", 10, None).await.unwrap();
    assert!(
        log.iter().any(|e| e.detail.contains("key was revoked")),
        "{log:?}"
    );
}

#[tokio::test]
async fn users_not_allowed_are_refused_with_whom_to_ask() {
    let dir = tempfile::tempdir().unwrap();
    let relay = TestRelay::start(dir.path()).await;
    let core = &relay.core;
    // A new pool is open to nobody until the operator says who.
    core.create_pool("team").await.unwrap();
    let err = core
        .set_mode("11", cluster("team"), None)
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("Ask the relay's operator to add you"),
        "{err}"
    );

    core.set_pool_access(
        "team",
        PoolAccess::Users {
            users: vec!["11".into()],
        },
    )
    .await
    .unwrap();
    let (_k, mut w) = worker(&relay, "team", "t1").await;
    core.set_mode("11", cluster("team"), None).await.unwrap();
    let err = core
        .set_mode("12", cluster("team"), None)
        .await
        .unwrap_err();
    assert!(matches!(err, TaskError::Pool(_)), "{err}");
    assert!(err.to_string().contains("not on"), "{err}");

    // Roles: with the role, without it, and where roles cannot be known.
    core.set_pool_access(
        "staff",
        PoolAccess::Roles {
            roles: vec!["500".into()],
        },
    )
    .await
    .unwrap();
    let (_ks, mut ws) = worker(&relay, "staff", "s1").await;
    let member = ["500".to_string(), "9".to_string()];
    let other = ["9".to_string()];
    core.set_mode("13", cluster("staff"), Some(&member))
        .await
        .unwrap();
    let err = core
        .set_mode("14", cluster("staff"), Some(&other))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("none of them"), "{err}");
    let err = core
        .set_mode("14", cluster("staff"), None)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("Discord roles"), "{err}");
    // A task carries the roles it came with: without them a role-only pool refuses.
    let err = core.submit_task(task("13", "no roles")).await.unwrap_err();
    assert!(err.to_string().contains("Discord roles"), "{err}");
    let ok = Submit {
        roles: Some(member.to_vec()),
        ..task("13", "with roles")
    };
    core.submit_task(ok).await.unwrap();
    assert_eq!(expect_start(&mut ws).await.requester.user, "13");
    let lost = Submit {
        roles: Some(other.to_vec()),
        ..task("13", "role taken away")
    };
    let err = core.submit_task(lost).await.unwrap_err();
    assert!(err.to_string().contains("none of them"), "{err}");

    // With no pool named, the only one open to the user is taken; several need a name.
    let view = core
        .set_mode("11", Mode::Cluster { pool: None }, None)
        .await
        .unwrap();
    assert_eq!(view.pool.as_deref(), Some("team"));
    core.set_pool_access("staff", everyone()).await.unwrap();
    let err = core
        .set_mode("11", Mode::Cluster { pool: None }, None)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("several pools"), "{err}");
    let err = core
        .set_mode("11", cluster("nope"), None)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no pool called nope"), "{err}");

    // Taken off the list: refused at the next task, before anything reaches the worker.
    core.submit_task(task("11", "allowed")).await.unwrap();
    expect_start(&mut w).await;
    core.set_pool_access("team", PoolAccess::Users { users: vec![] })
        .await
        .unwrap();
    let err = core
        .submit_task(task("11", "not any more"))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("you may not use pool team"),
        "{err}"
    );
    // Every access change is in the pool's log.
    let log = core
        .read(|s| s.audit_of_owner("pool:team", None, 20))
        .await
        .unwrap()
        .unwrap();
    assert!(
        log.iter()
            .any(|e| e.detail.contains("is open to nobody yet")),
        "{log:?}"
    );
}

#[tokio::test]
async fn mode_local_sends_the_next_task_to_the_users_own_agent() {
    let dir = tempfile::tempdir().unwrap();
    let (relay, (k1, mut w1), _w2) = two_workers(dir.path()).await;
    let core = &relay.core;
    let (own, mut mine) = crate::support::agent(&relay, "11").await;
    core.set_mode("11", cluster("gpu"), None).await.unwrap();
    assert_eq!(
        core.submit_task(task("11", "pool")).await.unwrap().agent,
        fp(&k1)
    );
    expect_start(&mut w1).await;
    let view = core.set_mode("11", Mode::Local, None).await.unwrap();
    assert!(!view.cluster);
    assert_eq!(view.worker.as_deref(), Some("w1"), "the workspace is kept");
    assert!(view.describe().starts_with("local mode"));
    let t = core.submit_task(task("11", "mine")).await.unwrap();
    assert_eq!(t.agent, fp(&own));
    let spec = expect_start(&mut mine).await;
    assert_eq!(spec.requester.role, Role::Owner);
    // Naming an agent in cluster mode means that agent, not the pool.
    core.set_mode("11", cluster("gpu"), None).await.unwrap();
    let named = Submit {
        agent: Some("test-agent".into()),
        ..task("11", "named")
    };
    assert_eq!(core.submit_task(named).await.unwrap().agent, fp(&own));
    expect_start(&mut mine).await;
    // Pool commands need cluster mode.
    core.set_mode("11", Mode::Local, None).await.unwrap();
    let err = core
        .pool_project("11", None, PoolOp::List)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("local mode"), "{err}");
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

#[tokio::test]
async fn pool_project_commands_reach_the_worker_with_the_user() {
    let dir = tempfile::tempdir().unwrap();
    let (relay, (_k1, mut w1), _w2) = two_workers(dir.path()).await;
    let core = relay.core.clone();
    core.set_mode("11", cluster("gpu"), None).await.unwrap();

    let ask = |op: PoolOp| {
        let core = core.clone();
        tokio::spawn(async move { core.pool_project("11", None, op).await })
    };
    let pending = ask(PoolOp::Create {
        name: "web".into(),
        git: Some("https://example.com/a/web.git".into()),
    });
    let (id, op) = expect_project(&mut w1).await;
    assert_eq!(
        op,
        ProjectOp::Create {
            user: "11".into(),
            name: "web".into(),
            git: Some("https://example.com/a/web.git".into()),
        }
    );
    answer(&mut w1, id, ProjectReply::Ok(pool_report())).await;
    let got = pending.await.unwrap().unwrap();
    assert_eq!(got.worker, "w1");
    assert!(matches!(got.reply, PoolReply::Projects(_)));
    assert_eq!(got.note, None);
    let log = core.audit_for_owner("11", 10, None).await.unwrap();
    assert!(
        log.iter().any(|e| e.detail.contains("created project web")),
        "{log:?}"
    );

    let pending = ask(PoolOp::Usage);
    let (id, op) = expect_project(&mut w1).await;
    assert_eq!(op, ProjectOp::Usage { user: "11".into() });
    let usage = UsageReport {
        spent_micro_usd: 1_500_000,
        budget: Some("$5.00 a day".into()),
        ..Default::default()
    };
    answer(&mut w1, id, ProjectReply::Usage(usage.clone())).await;
    assert_eq!(
        pending.await.unwrap().unwrap().reply,
        PoolReply::Usage(usage)
    );

    let pending = ask(PoolOp::Remove { name: "web".into() });
    let (id, op) = expect_project(&mut w1).await;
    assert_eq!(
        op,
        ProjectOp::RemoveFor {
            user: "11".into(),
            name: "web".into()
        }
    );
    answer(
        &mut w1,
        id,
        ProjectReply::Refused {
            message: "no project web in your workspace".into(),
        },
    )
    .await;
    let err = pending.await.unwrap().unwrap_err();
    assert!(err.to_string().contains("no project web"), "{err}");

    // Names that would leave the workspace, and URLs that are not remote, never reach the worker.
    for bad in [
        PoolOp::Create {
            name: "../b".into(),
            git: None,
        },
        PoolOp::Create {
            name: ".ssh".into(),
            git: None,
        },
        PoolOp::Remove {
            name: "/etc".into(),
        },
        PoolOp::Create {
            name: "ok".into(),
            git: Some("file:///home/other".into()),
        },
        PoolOp::Create {
            name: "ok".into(),
            git: Some("--upload-pack=sh".into()),
        },
    ] {
        let err = core
            .pool_project("11", None, bad.clone())
            .await
            .unwrap_err();
        assert!(
            matches!(err, TaskError::BadProjectRequest(_)),
            "{bad:?}: {err}"
        );
    }
    assert_eq!(core.pending_project_requests().await, 0);
}

#[tokio::test]
async fn pool_names_and_access_lists_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let relay = TestRelay::start(dir.path()).await;
    let core = &relay.core;
    for bad in ["", "../x", "a b", "pool:x", "-x", &"p".repeat(33)] {
        assert!(core.create_pool(bad).await.is_err(), "{bad:?}");
        assert!(core.pool_pairing_token(bad).await.is_err(), "{bad:?}");
        assert!(
            core.set_mode("11", cluster(bad), None).await.is_err(),
            "{bad:?}"
        );
    }
    let err = core
        .set_pool_access(
            "gpu",
            PoolAccess::Users {
                users: vec!["bob".into()],
            },
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not a Discord user id"), "{err}");
    assert!(
        core.pools().await.unwrap().is_empty(),
        "nothing was created"
    );
    let err = core.drain_worker("nobody", true).await.unwrap_err();
    assert!(err.to_string().contains("no agent matches"), "{err}");
    // Only pool workers drain.
    let (_own, _s) = crate::support::agent(&relay, "11").await;
    let err = core.drain_worker("test-agent", true).await.unwrap_err();
    assert!(err.to_string().contains("not to a pool"), "{err}");
}

#[tokio::test]
async fn the_admin_socket_mints_pool_codes_sets_access_lists_and_drains() {
    let dir = tempfile::tempdir().unwrap();
    let relay = TestRelay::start(dir.path()).await;
    let data = relay.data_dir.clone();
    match admin::call(&data, &Request::PoolCode { pool: "gpu".into() })
        .await
        .unwrap()
    {
        Reply::PoolCode { pool, token, .. } => {
            assert_eq!(pool, "gpu");
            assert!(token.parse::<ct_protocol::pairing::PairingToken>().is_ok());
        }
        other => panic!("{other:?}"),
    }
    let access = Request::PoolAccess {
        pool: "gpu".into(),
        access: PoolAccess::Roles {
            roles: vec!["42".into()],
        },
    };
    match admin::call(&data, &access).await.unwrap() {
        Reply::Pool { pool } => assert_eq!(pool.access.describe(), "roles 42"),
        other => panic!("{other:?}"),
    }
    let _w = worker(&relay, "gpu", "w1").await;
    match admin::call(
        &data,
        &Request::PoolDrain {
            worker: "w1".into(),
            undo: false,
        },
    )
    .await
    .unwrap()
    {
        Reply::Worker { worker } => assert!(worker.draining && worker.online),
        other => panic!("{other:?}"),
    }
    match admin::call(&data, &Request::Pools).await.unwrap() {
        Reply::Pools { pools } => {
            assert_eq!(pools.len(), 1);
            assert_eq!(pools[0].workers.len(), 1);
            assert!(pools[0].workers[0].draining);
            let table = ct_relay::cli::pools_table(&pools);
            assert!(
                table.contains("gpu") && table.contains("draining"),
                "{table}"
            );
        }
        other => panic!("{other:?}"),
    }
    match admin::call(&data, &Request::PoolCode { pool: "a/b".into() })
        .await
        .unwrap()
    {
        Reply::Error { message } => assert!(message.contains("not a pool name"), "{message}"),
        other => panic!("{other:?}"),
    }
}

/// A task that waited in the worker's queue is checked again when it would start: a user taken off the pool's
/// list meanwhile does not get it run, and hears why.
#[tokio::test]
async fn a_queued_pool_task_of_a_user_no_longer_allowed_is_cancelled_with_words() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = ct_relay::RelayConfig::new(dir.path().into(), "127.0.0.1:0".parse().unwrap());
    config.core.max_running_per_agent = 1;
    let relay = TestRelay::start_with(config).await;
    let core = &relay.core;
    core.set_pool_access(
        "team",
        PoolAccess::Users {
            users: vec!["11".into()],
        },
    )
    .await
    .unwrap();
    let (_k, mut w) = worker(&relay, "team", "t1").await;
    core.set_mode("11", cluster("team"), None).await.unwrap();
    let first = core.submit_task(task("11", "runs")).await.unwrap();
    let spec = expect_start(&mut w).await;
    assert_eq!(spec.task, first.spec.task);
    let waiting = core.submit_task(task("11", "waits")).await.unwrap();
    assert_eq!(waiting.state, ct_relay::store::TaskState::Queued);
    core.set_pool_access("team", PoolAccess::Users { users: vec![] })
        .await
        .unwrap();
    crate::support::event_acked(
        &mut w,
        &spec.task,
        1,
        crate::support::finished(ct_protocol::task::FinalState::Done),
    )
    .await;
    let id = waiting.spec.task.clone();
    eventually_async(Duration::from_secs(5), async || {
        core.task(&id).await.unwrap().state == ct_relay::store::TaskState::Cancelled
    })
    .await;
    let message = core.task(&id).await.unwrap().message.unwrap_or_default();
    assert!(
        message.contains("cancelled: you may not use pool team"),
        "{message}"
    );
}
