//! What only this backend has: migrations, the WAL flush, reconnecting, the database's own view of the data.
//! What every backend must do is in the contract suite, `relay/tests/store.rs`, which runs on this one too.

use std::sync::{Arc, Barrier};
use std::time::Instant;

use ct_protocol::task::{Requester, Role, TaskSpec};
use ct_testkit::postgres::PgServer;

use super::*;
use crate::store::{AuditKind, PairCodeRecord, TaskState};

/// A fresh database of its own on the test binary's shared server.
pub(super) fn database(name: &str) -> String {
    PgServer::shared()
        .create_database(&format!("unit_{name}"))
        .expect("creating a test database")
}

/// A plain client, to look at (or tamper with) what the store wrote.
fn client(url: &str) -> postgres::Client {
    postgres::Client::connect(url, postgres::NoTls).expect("connecting")
}

/// A running task of user 1's on agent [1; 32], at `order`.
pub(super) fn task(id: &str, order: u64) -> TaskRecord {
    TaskRecord {
        spec: TaskSpec {
            task: id.into(),
            project: "p".into(),
            prompt: "x".into(),
            requester: Requester {
                user: "1".into(),
                name: None,
                role: Role::Owner,
            },
            options: Default::default(),
            resume: None,
        },
        agent: Fingerprint([1; 32]),
        state: TaskState::Running,
        created_at: order,
        updated_at: order,
        last_seq: 0,
        session_id: None,
        message: None,
        dispatched_at: None,
        follows: None,
        order,
        output_bytes: 0,
        output_truncated: false,
        worktree: None,
        files: 0,
    }
}

fn agent(n: u8) -> AgentRecord {
    AgentRecord {
        key: [n; 32],
        fingerprint: Fingerprint([n; 32]),
        owner: "1".into(),
        name: format!("a{n}"),
        paired_at: 0,
        last_seen: None,
        last_transport: None,
        last_version: None,
        revoked_at: None,
        projects: None,
    }
}

/// Appends `events` (sequence number, bytes) to `rec`, moving its record as the relay does.
fn append(store: &PgStore, rec: &mut TaskRecord, events: &[(u64, &[u8])]) -> bool {
    let run: Vec<(u64, Option<&[u8]>)> = events.iter().map(|(s, b)| (*s, Some(*b))).collect();
    rec.last_seq = rec.last_seq.max(events.last().map_or(0, |e| e.0));
    store
        .append_event_runs(&[EventRun {
            task: rec,
            events: &run,
            was_open: Some(true),
        }])
        .unwrap()[0]
}

/// Three nodes starting at once on an empty database: all open, and each migration is applied once.
#[test]
fn three_nodes_starting_at_once_migrate_once() {
    let url = database("migrate_once");
    let start = Arc::new(Barrier::new(3));
    let nodes: Vec<_> = (0..3)
        .map(|_| {
            let (url, start) = (url.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                PgStore::open(&url)
            })
        })
        .collect();
    for node in nodes {
        node.join().unwrap().expect("every node opens");
    }
    let rows = client(&url)
        .query(
            "SELECT version, name FROM ct_schema_migrations ORDER BY version",
            &[],
        )
        .unwrap();
    let applied: Vec<(i32, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let versions: Vec<i32> = applied.iter().map(|(v, _)| *v).collect();
    assert_eq!(
        versions,
        (1..=PgStore::schema_version()).collect::<Vec<_>>()
    );
    assert_eq!(applied[0], (1, "init".to_string()));
    assert_eq!(
        applied.last().unwrap(),
        &(10, "hot_task_rows".to_string()),
        "{applied:?}"
    );
}

/// Two nodes on one database: each sees the other's writes at once, of two redeems of one code on different
/// nodes exactly one wins, and audit numbers handed out on both follow one order without gaps.
#[test]
fn two_nodes_share_one_log_and_one_code() {
    let url = database("two_nodes");
    let nodes = [PgStore::open(&url).unwrap(), PgStore::open(&url).unwrap()];
    nodes[0].put_agent(&agent(9)).unwrap();
    assert_eq!(
        nodes[1].agent(&Fingerprint([9; 32])).unwrap(),
        Some(agent(9))
    );

    let code = PairCodeRecord {
        id: "c".into(),
        secret: "s".into(),
        owner: "1".into(),
        created_at: 0,
        expires_at: u64::MAX,
        used_at: None,
        failures: 0,
        superseded_at: None,
        order: 0,
    };
    nodes[0].put_pair_code(&code).unwrap();
    let start = Barrier::new(8);
    let entry = AuditEntry::new(AuditKind::Paired, "1", "1", "x".into());
    let (won, numbers) = std::thread::scope(|s| {
        let threads: Vec<_> = (1..=8u8)
            .map(|n| {
                let (node, start, code, entry) =
                    (&nodes[usize::from(n % 2)], &start, &code, &entry);
                s.spawn(move || {
                    let used = PairCodeRecord {
                        used_at: Some(u64::from(n)),
                        ..code.clone()
                    };
                    start.wait();
                    let redeemed = node.pair_agent_audited(code, &used, &agent(n), entry);
                    let numbers: Vec<u64> = (0..10)
                        .map(|_| node.append_audit(entry).unwrap().seq)
                        .collect();
                    (redeemed, numbers)
                })
            })
            .collect();
        let mut won = 0;
        let mut numbers = Vec::new();
        for t in threads {
            let (redeemed, mut seqs) = t.join().unwrap();
            match redeemed {
                Ok(e) => {
                    won += 1;
                    numbers.push(e.seq);
                }
                Err(StoreError::Conflict) => {}
                Err(e) => panic!("{e}"),
            }
            numbers.append(&mut seqs);
        }
        (won, numbers)
    });
    assert_eq!(won, 1, "exactly one redeem wins");
    let mut numbers = numbers;
    numbers.sort();
    assert_eq!(numbers, (1..=81).collect::<Vec<u64>>());
    assert_eq!(
        nodes[1].agents().unwrap().len(),
        2,
        "agent 9 and the winner"
    );
}

/// Runs appended on one node while another deletes the task (retention): whichever commits first wins, and a
/// task that is gone has no events left behind, whatever the interleaving.
#[test]
fn runs_racing_a_delete_on_another_node_leave_no_events_behind() {
    let url = database("append_delete");
    let (a, b) = (PgStore::open(&url).unwrap(), PgStore::open(&url).unwrap());
    let mut deleted_mid_stream = 0;
    for round in 0..20 {
        let id = format!("t{round}");
        let mut rec = task(&id, round);
        a.put_task(&rec).unwrap();
        let start = Barrier::new(2);
        let appended = std::thread::scope(|s| {
            let appender = s.spawn(|| {
                start.wait();
                let mut runs = 0;
                for n in 0..30u64 {
                    let first = n * 5 + 1;
                    let events: Vec<(u64, &[u8])> =
                        (first..first + 5).map(|seq| (seq, &b"e"[..])).collect();
                    if !append(&a, &mut rec, &events) {
                        break;
                    }
                    runs += 1;
                }
                runs
            });
            start.wait();
            // Retention deletes the record it read; a run committed meanwhile makes that stale: read again.
            loop {
                let Some(current) = b.task(&id).unwrap() else {
                    panic!("only this loop deletes");
                };
                if b.delete_task(&current).unwrap().is_some() {
                    break;
                }
            }
            appender.join().unwrap()
        });
        assert_eq!(a.task(&id).unwrap(), None);
        assert!(
            a.event_bytes(&id, 0).unwrap().is_empty(),
            "round {round}: events outlived their task"
        );
        if appended < 30 {
            deleted_mid_stream += 1;
        }
    }
    // The race was run, not only the two orders that need none.
    assert!(
        deleted_mid_stream > 0,
        "every delete came after the last run"
    );
}

/// A node older than the database's schema refuses to run on it, and says what to do.
#[test]
fn a_database_migrated_by_a_newer_relay_is_refused() {
    let url = database("newer_schema");
    PgStore::open(&url).unwrap();
    let mut db = client(&url);
    db.execute(
        "INSERT INTO ct_schema_migrations (version, name) VALUES ($1, 'from_the_future')",
        &[&(PgStore::schema_version() + 1)],
    )
    .unwrap();
    let err = PgStore::open(&url).expect_err("a newer schema is refused");
    assert!(
        matches!(err, StoreError::SchemaTooNew { found, .. } if found == PgStore::schema_version() + 1),
        "{err}"
    );
    assert!(err.to_string().contains("upgrade this node"), "{err}");

    // A version this binary knows under another name is not its own schema.
    db.batch_execute(
        "DELETE FROM ct_schema_migrations WHERE name = 'from_the_future';
         UPDATE ct_schema_migrations SET name = 'something_else' WHERE version = 1",
    )
    .unwrap();
    let err = PgStore::open(&url).expect_err("a foreign schema is refused");
    assert!(matches!(err, StoreError::Schema(_)), "{err}");

    // A statement the server refuses says why.
    db.batch_execute("DROP TABLE ct_users").unwrap();
    db.batch_execute("UPDATE ct_schema_migrations SET name = 'init' WHERE version = 1")
        .unwrap();
    let store = PgStore::open(&url).unwrap();
    let err = store.user("1").expect_err("no table");
    assert!(
        err.to_string()
            .contains("relation \"ct_users\" does not exist"),
        "{err}"
    );
}

/// Writes commit without waiting for the disk; `flush` makes every one before it durable. Seen from the
/// server: the WAL is flushed past a write's commit only after `flush`.
#[test]
fn flush_makes_every_earlier_write_durable() {
    // The WAL writer flushes asynchronous commits on its own every `wal_writer_delay`: made lazy here, so that
    // what flushes the WAL in this test is `flush`.
    let server = PgServer::start_with(&[("wal_writer_delay", "10s")]).unwrap();
    let url = server.create_database("flush").unwrap();
    let store = PgStore::open(&url).unwrap();
    let mut probe = client(&url);
    let lsn = |probe: &mut postgres::Client, f: &str| -> i64 {
        probe
            .query_one(&format!("SELECT ({f}() - '0/0'::pg_lsn)::bigint"), &[])
            .unwrap()
            .get(0)
    };
    // A write that the WAL writer happened to flush meanwhile proves nothing: write again until one is seen
    // waiting for the disk.
    let mut waiting = None;
    for n in 0..20 {
        store.put_agent(&agent(n)).unwrap();
        let written = lsn(&mut probe, "pg_current_wal_insert_lsn");
        if lsn(&mut probe, "pg_current_wal_flush_lsn") < written {
            waiting = Some(written);
            break;
        }
    }
    let written = waiting.expect("a write commits before its WAL is on disk");
    store.flush().unwrap();
    assert!(
        lsn(&mut probe, "pg_current_wal_flush_lsn") >= written,
        "flush made the write durable"
    );
}

/// PostgreSQL killed and started again: calls fail while it is down, the store reconnects by itself once it
/// is back, and what was flushed before the crash is there.
#[test]
fn the_store_recovers_when_postgresql_comes_back() {
    let server = PgServer::start().unwrap();
    let url = server.create_database("recover").unwrap();
    let store = PgStore::open(&url).unwrap();
    store.put_agent(&agent(1)).unwrap();
    store.flush().unwrap();

    server.kill();
    let err = store
        .agent(&Fingerprint([1; 32]))
        .expect_err("the server is down");
    assert!(matches!(err, StoreError::Postgres(_)), "{err}");
    assert!(err.to_string().starts_with("store: PostgreSQL:"), "{err}");
    let err = store.put_agent(&agent(2)).expect_err("still down");
    assert!(matches!(err, StoreError::Postgres(_)), "{err}");
    // The words an operator acts on, not only the client's "error connecting to server".
    assert!(err.to_string().contains("Connection refused"), "{err}");

    server.restart().unwrap();
    assert_eq!(
        store.agent(&Fingerprint([1; 32])).unwrap(),
        Some(agent(1)),
        "the flushed write survived, and the store reconnected"
    );
    store.put_agent(&agent(2)).unwrap();
    assert_eq!(store.agents().unwrap().len(), 2);
}

/// PostgreSQL crashed while a write of this node was not flushed yet: the recovered server may not have it,
/// so no flush may vouch for it. The flush that would have covered it fails (once: the relay fails what
/// waited for it); later writes are flushed as usual.
#[test]
fn a_crash_before_a_flush_fails_the_flush_that_would_cover_the_write() {
    let server = PgServer::start().unwrap();
    let store = PgStore::open(&server.create_database("lost").unwrap()).unwrap();
    store.put_agent(&agent(1)).unwrap();
    store.flush().unwrap();
    store.put_agent(&agent(2)).unwrap();

    server.kill();
    server.restart().unwrap();
    // The first call may find a connection from before the crash.
    let err = match store.flush() {
        Err(StoreError::Postgres(_)) => store.flush().expect_err("the write may be lost"),
        other => other.expect_err("the write may be lost"),
    };
    assert!(matches!(err, StoreError::WritesLost { .. }), "{err}");
    assert!(err.to_string().contains("agents reconnect"), "{err}");
    store.flush().expect("reported once: nothing written since");
    assert!(store.agent(&Fingerprint([1; 32])).unwrap().is_some());
    store.put_agent(&agent(3)).unwrap();
    store
        .flush()
        .expect("a write after the crash is flushed as usual");
}

/// What the store wrote after it met the server's new run is not among what the crash may have lost: the
/// loss names the last write before it, and the next flush covers the later one.
#[test]
fn a_crash_names_the_last_write_it_may_have_lost() {
    let server = PgServer::start().unwrap();
    let store = PgStore::open(&server.create_database("lost_upto").unwrap()).unwrap();
    store.put_agent(&agent(1)).unwrap();
    store.flush().unwrap();
    store.put_agent(&agent(2)).unwrap();
    let unflushed = store.write_mark();

    server.kill();
    server.restart().unwrap();
    // The first call may find a connection from before the crash: a read, so that no write is left in doubt.
    if store.agents().is_err() {
        store.agents().unwrap();
    }
    store.put_agent(&agent(3)).unwrap();
    let after = store.write_mark();
    match store.flush() {
        Err(StoreError::WritesLost { upto }) => assert!(
            unflushed <= upto && upto < after,
            "the loss names writes up to {upto}: the unflushed one is {unflushed}, the one after it {after}"
        ),
        other => panic!("{other:?}"),
    }
    assert!(
        store.server().flushed < after,
        "the later write is not vouched for yet"
    );
    store.flush().expect("the write on the new run is flushed");
    assert_eq!(store.server().flushed, after);
    assert!(store.agent(&Fingerprint([3; 32])).unwrap().is_some());
}

/// A write still running when a flush began may commit after it: that flush does not cover it, so a crash
/// before the next one counts it as possibly lost (rather than as flushed, and its ticket as durable).
#[test]
fn a_write_still_running_when_a_flush_began_is_not_covered_by_it() {
    let server = PgServer::start().unwrap();
    let url = server.create_database("in_flight").unwrap();
    let store = PgStore::open(&url).unwrap();
    store.put_agent(&agent(1)).unwrap();
    store.flush().unwrap();

    // Another client holds the agent's row, so the store's change of it waits, in flight.
    let mut holder = client(&url);
    let mut held = holder.transaction().unwrap();
    held.execute(
        "SELECT 1 FROM ct_agents WHERE fingerprint = $1 FOR UPDATE",
        &[&&[1u8; 32][..]],
    )
    .unwrap();
    std::thread::scope(|s| {
        let writing = s.spawn(|| {
            store
                .update_agent(&Fingerprint([1; 32]), &mut |a| a.name = "renamed".into())
                .unwrap()
        });
        let mut watcher = client(&url);
        let deadline = Instant::now() + Duration::from_secs(30);
        while watcher
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'ct-relay' AND wait_event_type = 'Lock'",
                &[],
            )
            .unwrap()
            .get::<_, i64>(0)
            == 0
        {
            assert!(Instant::now() < deadline, "the change never waited for the row");
            std::thread::sleep(Duration::from_millis(10));
        }
        store.flush().unwrap();
        held.commit().unwrap();
        assert!(writing.join().unwrap().is_some());
    });

    server.kill();
    server.restart().unwrap();
    let err = match store.flush() {
        Err(StoreError::Postgres(_)) => store.flush().expect_err("the change may be lost"),
        other => other.expect_err("the change may be lost"),
    };
    assert!(matches!(err, StoreError::WritesLost { .. }), "{err}");
}

/// A crash that finds every write flushed costs only the calls that failed: flushes go on.
#[test]
fn a_crash_after_a_flush_loses_nothing_and_flushes_go_on() {
    let server = PgServer::start().unwrap();
    let store = PgStore::open(&server.create_database("nothing_lost").unwrap()).unwrap();
    store.put_agent(&agent(1)).unwrap();
    store.flush().unwrap();

    server.kill();
    server.restart().unwrap();
    match store.flush() {
        Ok(()) | Err(StoreError::Postgres(_)) => {}
        Err(e) => panic!("{e}"),
    }
    store.flush().expect("nothing was waiting for a flush");
    // The first call to use a pooled connection from before the crash fails (here a read, so that no write
    // is left in doubt); the next one reconnects.
    if store.agents().is_err() {
        store.agents().unwrap();
    }
    store.put_agent(&agent(2)).unwrap();
    store.flush().unwrap();
    assert_eq!(store.agents().unwrap().len(), 2);
}

/// A connection broken while idle in the pool (the server restarted between two calls) costs one call, not
/// the store: the call that finds it broken fails, and the next one connects afresh.
#[test]
fn idle_connections_broken_by_a_restart_are_replaced() {
    let server = PgServer::start().unwrap();
    let url = server.create_database("idle").unwrap();
    let store = PgStore::open(&url).unwrap();
    // Several idle connections: three calls at once.
    let start = Arc::new(Barrier::new(3));
    std::thread::scope(|s| {
        for _ in 0..3 {
            let (store, start) = (&store, start.clone());
            s.spawn(move || {
                start.wait();
                store.agents().unwrap();
            });
        }
    });
    server.restart().unwrap();
    let first = store.agents();
    assert!(
        matches!(first, Err(StoreError::Postgres(_)) | Ok(_)),
        "{first:?}"
    );
    store.agents().expect("the next call reconnects");
    store.put_agent(&agent(1)).expect("writes too");
}

/// Records that do not decode are reported as a corrupt store, never a panic.
#[test]
fn corrupt_data_is_an_error() {
    let url = database("corrupt");
    let store = PgStore::open(&url).unwrap();
    let mut t = task("t", 1);
    store.put_task(&t).unwrap();
    append(&store, &mut t, &[(1, b"{}")]);
    store.put_agent(&agent(1)).unwrap();
    let mut db = client(&url);
    db.batch_execute(
        "UPDATE ct_tasks SET body = 'not json'::bytea;
         UPDATE ct_agents SET body = '{\"key\":1}'::bytea;",
    )
    .unwrap();
    assert!(matches!(store.task("t"), Err(StoreError::Corrupt(_))));
    assert!(matches!(
        store.open_tasks(&Fingerprint([1; 32])),
        Err(StoreError::Corrupt(_))
    ));
    assert!(matches!(
        store.agent(&Fingerprint([1; 32])),
        Err(StoreError::Corrupt(_))
    ));
    assert!(matches!(store.agents(), Err(StoreError::Corrupt(_))));
    assert!(matches!(
        store.update_agent(&Fingerprint([1; 32]), &mut |_| {}),
        Err(StoreError::Corrupt(_))
    ));
    db.batch_execute("UPDATE ct_audit_counter SET last = -5")
        .unwrap();
    let entry = AuditEntry::new(AuditKind::DefaultAgentSet, "1", "1", "x".into());
    assert!(matches!(
        store.append_audit(&entry),
        Err(StoreError::Corrupt(_))
    ));
    assert_eq!(store.audit_len().unwrap(), 0, "nothing written");
}

/// An event the agent sends again (after a reconnect) is stored once, as it was first stored.
#[test]
fn an_event_sent_again_is_stored_once() {
    let store = PgStore::open(&database("resent")).unwrap();
    let mut t = task("t", 1);
    store.put_task(&t).unwrap();
    assert!(append(&store, &mut t, &[(1, b"a"), (2, b"b"), (3, b"c")]));
    assert!(append(&store, &mut t, &[(2, b"B"), (3, b"C"), (4, b"d")]));
    let events = store.event_bytes("t", 0).unwrap();
    assert_eq!(
        events,
        [
            (1, b"a".to_vec()),
            (2, b"b".to_vec()),
            (3, b"c".to_vec()),
            (4, b"d".to_vec())
        ]
    );
}

/// A running task's row is updated in place (HOT) at each burst of its events, although its `updated_at` and
/// `output_bytes` move every time: no index reads them while the task is open (migration 10). Before, every
/// such update wrote into all of the table's indexes. Its ending is an ordinary update, and retention and the
/// byte count then find it.
#[test]
fn a_running_tasks_event_runs_update_its_row_in_place() {
    let url = database("hot_rows");
    let store = PgStore::open(&url).unwrap();
    let mut t = task("t", 1);
    store.put_task(&t).unwrap();
    let runs = 20;
    for seq in 1..=runs {
        t.updated_at += 1;
        t.output_bytes += 10;
        assert!(append(&store, &mut t, &[(seq, b"event")]));
    }
    assert_eq!(store.stored_bytes_of_user("1").unwrap(), 10 * runs);
    assert!(store.ended_before(u64::MAX, 10, None).unwrap().is_empty());
    // A backend reports its table statistics when it exits: closing the store's connections makes them visible.
    drop(store);
    let deadline = Instant::now() + std::time::Duration::from_secs(10);
    let (updated, in_place) = loop {
        let row = client(&url)
            .query_one(
                "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = 'ct_tasks'",
                &[],
            )
            .unwrap();
        let counts: (i64, i64) = (row.get(0), row.get(1));
        if counts.0 >= runs as i64 || Instant::now() > deadline {
            break counts;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert_eq!(updated, runs as i64, "one update per run");
    assert_eq!(
        in_place, updated,
        "every update of the running task was HOT"
    );

    let store = PgStore::open(&url).unwrap();
    t.state = TaskState::Done;
    t.updated_at += 1;
    store.put_task(&t).unwrap();
    assert_eq!(store.stored_bytes_of_user("1").unwrap(), 10 * runs);
    let ended = store.ended_before(u64::MAX, 10, None).unwrap();
    assert_eq!(
        ended
            .iter()
            .map(|t| t.spec.task.as_str())
            .collect::<Vec<_>>(),
        ["t"]
    );
    assert!(store
        .ended_before(t.updated_at, 10, None)
        .unwrap()
        .is_empty());
}

/// An event's sequence number is part of its key: one the column cannot hold is refused, not capped onto
/// another event's.
#[test]
fn an_event_number_past_the_column_is_refused() {
    let store = PgStore::open(&database("huge_seq")).unwrap();
    let mut t = task("t", 1);
    store.put_task(&t).unwrap();
    t.last_seq = u64::MAX;
    let run: Vec<(u64, Option<&[u8]>)> = vec![(u64::MAX - 1, Some(b"a")), (u64::MAX, Some(b"b"))];
    let result = store.append_event_runs(&[EventRun {
        task: &t,
        events: &run,
        was_open: Some(true),
    }]);
    assert!(matches!(result, Err(StoreError::Corrupt(_))), "{result:?}");
    assert_eq!(
        store.task("t").unwrap().unwrap().last_seq,
        0,
        "nothing written"
    );
}

/// A run's events as `EventRun` borrows them.
type Run<'a> = Vec<(u64, Option<&'a [u8]>)>;

/// Throughput of `append_event_runs` with a flush after each call, as the relay's group commit does: printed,
/// not asserted (`cargo test -p ct-relay --release append_throughput -- --ignored --nocapture`).
#[test]
#[ignore = "a benchmark: run it on purpose"]
fn append_throughput() {
    const TASKS: usize = 50;
    const EVENTS_PER_RUN: u64 = 40;
    const CALLS: usize = 100;
    let store = PgStore::open(&database("throughput")).unwrap();
    let mut tasks: Vec<TaskRecord> = (0..TASKS)
        .map(|i| task(&format!("task-{i}"), i as u64))
        .collect();
    for t in &tasks {
        store.put_task(t).unwrap();
    }
    // A typical streamed event: a line of text in a JSON object.
    let body = format!("{{\"type\":\"text\",\"text\":\"{}\"}}", "x".repeat(150));
    let started = Instant::now();
    let mut events = 0;
    let mut appending = std::time::Duration::ZERO;
    for _ in 0..CALLS {
        let runs: Vec<(TaskRecord, Run)> = tasks
            .iter_mut()
            .map(|t| {
                let first = t.last_seq + 1;
                t.last_seq += EVENTS_PER_RUN;
                t.output_bytes += EVENTS_PER_RUN * body.len() as u64;
                let run = (first..=t.last_seq)
                    .map(|s| (s, Some(body.as_bytes())))
                    .collect();
                (t.clone(), run)
            })
            .collect();
        let runs: Vec<EventRun> = runs
            .iter()
            .map(|(t, run)| EventRun {
                task: t,
                events: run,
                was_open: Some(true),
            })
            .collect();
        let t0 = Instant::now();
        store.append_event_runs(&runs).unwrap();
        appending += t0.elapsed();
        store.flush().unwrap();
        events += TASKS * EVENTS_PER_RUN as usize;
    }
    let elapsed = started.elapsed();
    println!(
        "append_event_runs: {events} events of {} bytes in {CALLS} calls of {TASKS} runs, each flushed: \
         {elapsed:.2?} ({appending:.2?} appending, the rest flushing), {:.0} events/s",
        body.len(),
        events as f64 / elapsed.as_secs_f64()
    );
}

/// The last handle on a store may go on a thread running async code (the group commit's, when the relay
/// stops): closing its connections there must not panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_store_dropped_inside_async_code_closes_its_connections_without_panicking() {
    let url = database("drop_in_async");
    let store = tokio::task::spawn_blocking(move || {
        let store = PgStore::open(&url).unwrap();
        store.put_task(&task("t-drop", 1)).unwrap();
        store
    })
    .await
    .unwrap();
    // Dropped here, on a runtime worker, with idle connections in its pool.
    drop(store);
}
