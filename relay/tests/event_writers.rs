//! Task events on a cluster node, written by writer threads while the core's thread goes on (`core::writers`):
//! a write the server holds up holds up nothing else, and nothing else on the node writes a task while its
//! events are at the server.
//!
//! The server holds a write up for real: the test takes the task's row lock in PostgreSQL from a connection of
//! its own, so the node's `UPDATE` of that row waits for it, as it would behind a slow disk or another
//! node's transaction.

use std::time::Duration;

use crate::support::{agent, expect_ack, expect_start, send_event, Session, TestRelay};
use ct_protocol::task::{FinalState, TaskEvent};
use ct_relay::relay::{ClusterConfig, RelayConfig};
use ct_relay::store::TaskState;
use ct_relay::tasks::Submit;
use ct_testkit::nats::NatsServer;
use ct_testkit::postgres::PgServer;

/// A relay node on a database of its own (on the shared PostgreSQL server) and the shared nats-server.
async fn node(dir: &std::path::Path) -> (TestRelay, String) {
    let name = format!("writers_{}", rand::random::<u64>());
    let url = PgServer::shared()
        .create_database(&name)
        .expect("a database for the test");
    let mut config = RelayConfig::new(dir.to_path_buf(), "127.0.0.1:0".parse().unwrap());
    config.cluster = Some(ClusterConfig {
        database_url: url.clone(),
        nats_url: NatsServer::shared().url(),
    });
    (TestRelay::start_with(config).await, url)
}

fn text(t: &str) -> TaskEvent {
    TaskEvent::Text { text: t.into() }
}

/// Submits a task for `user`'s agent and has the agent start it, its first event stored (so the node keeps
/// the task's record, and the next write of it is conditional on that).
async fn running(relay: &TestRelay, user: &str, s: &mut Session) -> String {
    let rec = relay
        .core
        .submit_task(Submit {
            user: user.into(),
            project: "web".into(),
            prompt: "go".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let spec = expect_start(s).await;
    assert_eq!(spec.task, rec.spec.task);
    send_event(s, &spec.task, 1, TaskEvent::Started { cwd: "/w".into() }).await;
    expect_ack(s, &spec.task, 1).await;
    spec.task
}

/// A PostgreSQL transaction holding a task's row lock until it is dropped (rolled back).
struct RowLock {
    done: std::sync::mpsc::Sender<()>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RowLock {
    /// Takes the lock on `task`'s row and returns once it holds it.
    fn take(url: &str, task: &str) -> Self {
        let (url, task) = (url.to_string(), task.to_string());
        let (held, is_held) = std::sync::mpsc::channel();
        let (done, wait) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let mut client = postgres::Client::connect(&url, postgres::NoTls).unwrap();
            let mut tx = client.transaction().unwrap();
            let rows = tx
                .query("SELECT 1 FROM ct_tasks WHERE id = $1 FOR UPDATE", &[&task])
                .unwrap();
            assert_eq!(rows.len(), 1, "the task's row");
            held.send(()).unwrap();
            let _ = wait.recv();
            tx.rollback().unwrap();
        });
        is_held.recv().expect("the row lock is taken");
        Self {
            done,
            thread: Some(thread),
        }
    }
}

/// Waits until a write of this database waits for a row lock: the node's batch has reached the server and is
/// held up there.
async fn until_a_write_waits(url: &str) {
    let url = url.to_string();
    tokio::task::spawn_blocking(move || {
        let mut client = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let waiting: i64 = client
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity
                     WHERE datname = current_database() AND wait_event_type = 'Lock'",
                    &[],
                )
                .unwrap()
                .get(0);
            if waiting > 0 {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no write reached the locked row"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    })
    .await
    .unwrap();
}

impl Drop for RowLock {
    fn drop(&mut self) {
        let _ = self.done.send(());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The task's stored events, as (seq, event).
async fn events(relay: &TestRelay, task: &str) -> Vec<(u64, TaskEvent)> {
    let task = task.to_string();
    relay
        .core
        .read(move |store| store.events(&task, 0))
        .await
        .unwrap()
        .unwrap()
}

#[tokio::test]
async fn a_write_the_server_holds_up_holds_up_no_other_agent() {
    let dir = tempfile::tempdir().unwrap();
    let (relay, url) = node(dir.path()).await;
    let (_a, mut slow) = agent(&relay, "1").await;
    let (_b, mut other) = agent(&relay, "2").await;
    let held = running(&relay, "1", &mut slow).await;
    let free = running(&relay, "2", &mut other).await;

    let lock = RowLock::take(&url, &held);
    send_event(&mut slow, &held, 2, text("waits for the lock")).await;
    until_a_write_waits(&url).await;
    // Another agent's events are stored and acknowledged meanwhile: the core's thread is not waiting on the
    // held write, and the other writer takes this one.
    for seq in 2..=4 {
        send_event(&mut other, &free, seq, text("goes on")).await;
    }
    tokio::time::timeout(Duration::from_secs(5), expect_ack(&mut other, &free, 4))
        .await
        .expect("another agent's events are acknowledged while one write is held up");
    assert_eq!(events(&relay, &held).await.len(), 1, "the held write waits");

    drop(lock);
    expect_ack(&mut slow, &held, 2).await;
    let stored = events(&relay, &held).await;
    assert_eq!(stored.len(), 2, "{stored:?}");
    assert_eq!(stored[1], (2, text("waits for the lock")));
    relay.stop().await;
}

#[tokio::test]
async fn revoking_an_agent_while_its_events_are_at_the_server_loses_none_of_them() {
    let dir = tempfile::tempdir().unwrap();
    let (relay, url) = node(dir.path()).await;
    let (key, mut s) = agent(&relay, "1").await;
    let task = running(&relay, "1", &mut s).await;

    let lock = RowLock::take(&url, &task);
    for seq in 2..=4 {
        send_event(&mut s, &task, seq, text(&format!("line {seq}"))).await;
    }
    until_a_write_waits(&url).await;
    // Revoking ends the agent's open tasks with an event of the relay's own. It must come after the agent's
    // events in flight, whatever the order the server would have taken the two writes in.
    let fingerprint = ct_protocol::Fingerprint::of(&key.verifying_key()).to_string();
    let revoke = {
        let core = relay.core.clone();
        tokio::spawn(async move { core.revoke(&fingerprint, "1").await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(lock);
    revoke.await.unwrap().expect("the agent is revoked");

    let stored = events(&relay, &task).await;
    let seqs: Vec<u64> = stored.iter().map(|(seq, _)| *seq).collect();
    assert_eq!(seqs, [1, 2, 3, 4, 5], "{stored:?}");
    for (seq, event) in &stored[1..4] {
        assert_eq!(*event, text(&format!("line {seq}")));
    }
    assert!(
        matches!(
            &stored[4].1,
            TaskEvent::Finished {
                state: FinalState::Failed,
                message: Some(m),
            } if m.contains("revoked")
        ),
        "{:?}",
        stored[4]
    );
    let rec = relay.core.task(&task).await.unwrap();
    assert_eq!((rec.state, rec.last_seq), (TaskState::Lost, 5));
    relay.stop().await;
}
