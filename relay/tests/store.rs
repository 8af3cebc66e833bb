//! The storage contract: what every backend of [`Store`] must do, one test per case.
//!
//! The cases use only the trait and the records in `ct_relay::store`, never a backend's own types, so a new
//! backend runs the same suite with one line, `contract!(name, open, another)`: a module name, a function that
//! opens the backend on a directory, and one that gives another handle on an open store, as another relay
//! node would have one (a clone where one process owns the store). `open` is called again on the same
//! directory to check that what was written survives a reopen.

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::{Arc, Barrier};

use ct_protocol::task::{Requester, Role, TaskSpec};
use ct_protocol::Fingerprint;
use ct_relay::store::postgres::PgStore;
use ct_relay::store::sled::SledStore;
use ct_relay::store::{
    Admission, AgentRecord, AuditEntry, AuditKind, EventRun, Exported, NodeRecord, PairCodeRecord,
    PoolAccess, PoolRecord, ShareLevel, ShareRecord, SharedStore, StoreError, TaskLimits,
    TaskRecord, TaskState, UserRecord, WebSessionKind, WebSessionRecord,
};
use ct_testkit::postgres::PgServer;
use sha2::{Digest as _, Sha256};
use tempfile::TempDir;

/// Opens a backend on `dir`: a fresh store on an empty directory, the same store again on a used one.
type Open = fn(&Path) -> SharedStore;

/// Another handle on the store open on `dir`, such as another node of a cluster holds.
type Another = fn(&Path, &SharedStore) -> SharedStore;

/// One `#[test]` per contract case, in a module named `$backend`, each on a store that `$open` opens.
macro_rules! contract {
    ($backend:ident, $open:expr, $another:expr) => {
        contract!(@cases $backend, $open, $another;
            records_round_trip_and_survive_a_reopen,
            next_order_increases_also_across_a_reopen,
            agents_of_follows_every_write_and_a_change_of_owner,
            update_agent_retries_a_concurrent_change_instead_of_losing_it,
            two_redeems_of_one_code_exactly_one_wins,
            racing_redeems_of_one_code_exactly_one_wins,
            a_swap_against_a_stale_pairing_code_is_a_conflict,
            pair_codes_of_an_owner_and_pruning,
            revoking_keeps_the_first_time_and_writes_its_entry,
            audit_numbers_follow_commit_order_without_gaps,
            concurrent_audited_writes_get_distinct_numbers_without_gaps,
            a_refused_audited_write_leaves_nothing_behind,
            put_share_entry_sees_the_previous_share,
            removing_a_missing_share_writes_nothing,
            shares_of_and_shares_to_follow_every_change,
            users_have_defaults_and_audited_settings,
            pools_round_trip_and_pool_users_follow_every_user_write,
            open_tasks_in_queue_order_and_only_open_ones,
            open_tasks_of_user_counts_across_agents,
            stored_bytes_of_user_follow_every_write_and_delete,
            recent_tasks_newest_first_across_own_and_agents_tasks_once_each,
            tasks_with_session_follow_the_session_a_later_write_sets,
            ended_before_pages_through_final_tasks_with_the_cursor,
            delete_task_only_when_unchanged_and_with_its_events,
            append_event_runs_writes_several_tasks_and_not_a_deleted_one,
            events_are_read_after_a_sequence_number,
            dropped_events_move_the_record_but_store_nothing,
            thread_marks_are_kept_and_deleted,
            task_threads_are_kept_with_their_task_and_deleted_with_it,
            thread_chains_are_kept_by_thread_and_deleted_with_their_task,
            answers_merge_and_are_deleted_with_their_task,
            task_files_are_kept_in_order_until_delivered_or_deleted_with_their_task,
            audit_pages_newest_first_by_owner_and_by_filter,
            indexes_agree_with_the_records_after_random_operations,
            presence_epochs_grow_and_only_the_current_session_releases,
            a_task_is_dispatched_once_and_only_under_the_current_epoch,
            a_queued_task_ends_only_if_nobody_dispatched_it,
            leases_are_exclusive_until_released_or_expired,
            token_buckets_allow_a_burst_then_refill,
            the_first_proposed_secret_wins_also_across_a_reopen,
            node_heartbeats_are_listed_and_removed,
            an_export_imported_into_an_empty_store_is_the_same_store,
            admission_checks_each_limit_and_writes_only_what_it_admits,
            admission_counts_a_running_task_as_running_with_or_without_its_dispatch_time,
            web_sessions_round_trip_by_hash_and_by_user_and_survive_a_reopen,
            a_sign_in_link_is_taken_once_and_only_as_a_link,
            web_sessions_are_not_returned_once_ended,
            touching_a_web_session_moves_it_forward_and_never_revives_it,
            a_user_cannot_delete_another_users_session_by_its_id,
            deleting_all_of_a_users_sessions_touches_nobody_else,
            pruning_forgets_only_ended_web_sessions,
            web_sessions_are_not_exported;
            // Cases on several handles at once:
            racing_admissions_never_take_a_person_past_their_limit,
            racing_admissions_never_overfill_an_agents_queue,
            racing_takes_of_one_sign_in_link_exactly_one_wins,
            racing_answers_on_several_handles_all_land
        );
    };
    (@cases $backend:ident, $open:expr, $another:expr; $($case:ident),* ; $($several:ident),* $(,)?) => {
        mod $backend {
            // For `$open`, written where the macro is used.
            use super::*;

            $(#[test]
            fn $case() {
                super::$case($open)
            })*

            $(#[test]
            fn $several() {
                super::$several($open, $another)
            })*
        }
    };
}

contract!(sled, open_sled, another_sled);
contract!(postgres, open_postgres, another_postgres);

fn open_sled(dir: &Path) -> SharedStore {
    Arc::new(SledStore::open(dir).expect("the sled store opens"))
}

/// One process owns a sled directory (a second open is refused): every handle is a clone of the one store.
fn another_sled(_dir: &Path, store: &SharedStore) -> SharedStore {
    store.clone()
}

/// A store opened again on the same database: its own pool of connections, as another node has.
fn another_postgres(dir: &Path, _store: &SharedStore) -> SharedStore {
    open_postgres(dir)
}

/// One database per directory, on the test binary's PostgreSQL server: a new directory is a new, empty
/// database, the same directory again the same database (named from a hash of the path).
fn open_postgres(dir: &Path) -> SharedStore {
    let hash = Sha256::digest(dir.as_os_str().as_encoded_bytes());
    let name = format!("contract_{}", hex::encode(&hash[..10]));
    let url = PgServer::shared()
        .create_database(&name)
        .expect("creating the test database");
    Arc::new(PgStore::open(&url).expect("the PostgreSQL store opens"))
}

// --- records ---

fn fresh(open: Open) -> (TempDir, SharedStore) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = open(dir.path());
    (dir, store)
}

/// Closes `store` (every clone must be gone) and opens the same directory again.
fn reopen(open: Open, dir: &TempDir, store: SharedStore) -> SharedStore {
    store.flush().expect("flush");
    assert_eq!(
        Arc::strong_count(&store),
        1,
        "a clone of the store is still open"
    );
    drop(store);
    open(dir.path())
}

pub(crate) fn fp(n: u8) -> Fingerprint {
    Fingerprint([n; 32])
}

fn agent(n: u8, owner: &str) -> AgentRecord {
    AgentRecord {
        key: [n; 32],
        fingerprint: fp(n),
        owner: owner.into(),
        name: format!("a{n}"),
        paired_at: 0,
        last_seen: None,
        last_transport: None,
        last_version: None,
        revoked_at: None,
        projects: None,
    }
}

pub(crate) fn task(id: &str, user: &str, agent: u8, order: u64) -> TaskRecord {
    TaskRecord {
        spec: TaskSpec {
            task: id.into(),
            project: "p".into(),
            prompt: format!("prompt of {id}"),
            requester: Requester {
                user: user.into(),
                name: None,
                role: Role::Owner,
            },
            options: Default::default(),
            resume: None,
        },
        agent: fp(agent),
        state: TaskState::Queued,
        created_at: 1_000 + order,
        updated_at: 1_000 + order,
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

fn ended(mut rec: TaskRecord, at: u64) -> TaskRecord {
    rec.state = TaskState::Done;
    rec.updated_at = at;
    rec
}

fn share(owner: &str, grantee: &str, level: ShareLevel) -> ShareRecord {
    ShareRecord {
        owner: owner.into(),
        grantee: grantee.into(),
        projects: None,
        level,
        created_at: 0,
    }
}

fn code(id: &str, owner: &str, expires_at: u64) -> PairCodeRecord {
    PairCodeRecord {
        id: id.into(),
        secret: "secret".into(),
        owner: owner.into(),
        created_at: 0,
        expires_at,
        used_at: None,
        failures: 0,
        superseded_at: None,
        order: 0,
    }
}

fn entry(owner: &str) -> AuditEntry {
    AuditEntry::new(AuditKind::DefaultAgentSet, owner, owner, "test".into())
}

fn ids(tasks: &[TaskRecord]) -> Vec<String> {
    tasks.iter().map(|t| t.spec.task.clone()).collect()
}

fn sorted_ids(tasks: &[TaskRecord]) -> Vec<String> {
    let mut v = ids(tasks);
    v.sort();
    v
}

/// Appends `n` stored events of `size` bytes to `rec` (as the relay does: the record moves with them).
fn append(store: &SharedStore, rec: &mut TaskRecord, n: u64, size: usize) -> bool {
    let body = vec![b'e'; size];
    let first = rec.last_seq + 1;
    rec.last_seq += n;
    rec.output_bytes += n * size as u64;
    let events: Vec<(u64, Option<&[u8]>)> = (first..=rec.last_seq)
        .map(|seq| (seq, Some(body.as_slice())))
        .collect();
    let run = EventRun {
        task: rec,
        events: &events,
        was_open: Some(!rec.state.is_final()),
    };
    store.append_event_runs(&[run]).expect("append")[0]
}

fn seqs(entries: &[AuditEntry]) -> Vec<u64> {
    entries.iter().map(|e| e.seq).collect()
}

fn all_audit(store: &SharedStore) -> Vec<AuditEntry> {
    store.audit_where(None, usize::MAX, &mut |_| true).unwrap()
}

// --- the cases ---

fn records_round_trip_and_survive_a_reopen(open: Open) {
    let (dir, store) = fresh(open);
    store.put_agent(&agent(1, "1")).unwrap();
    store.put_pair_code(&code("c1", "1", 100)).unwrap();
    let mut t = task("t1", "1", 1, store.next_order().unwrap());
    t.session_id = Some("s".into());
    store.put_task(&t).unwrap();
    assert!(append(&store, &mut t, 3, 10));
    let done = ended(task("t2", "1", 1, store.next_order().unwrap()), 50);
    store.put_task_audited(&done, &entry("1")).unwrap();
    store
        .put_share_audited(&share("1", "2", ShareLevel::Trusted), &|_| entry("1"))
        .unwrap();
    let user = UserRecord {
        default_agent: Some(fp(1)),
        quiet: false,
        ..Default::default()
    };
    store.put_user_audited("1", &user, &entry("1")).unwrap();
    store.put_thread_mark("t1", b"{\"m\":1}").unwrap();

    let store = reopen(open, &dir, store);
    assert_eq!(store.agent(&fp(1)).unwrap(), Some(agent(1, "1")));
    assert_eq!(store.agents_of("1").unwrap(), vec![agent(1, "1")]);
    assert_eq!(store.pair_code("c1").unwrap(), Some(code("c1", "1", 100)));
    assert_eq!(store.task("t1").unwrap(), Some(t.clone()));
    assert_eq!(store.task("t2").unwrap(), Some(done.clone()));
    assert_eq!(store.event_bytes("t1", 0).unwrap().len(), 3);
    assert_eq!(ids(&store.open_tasks(&fp(1)).unwrap()), ["t1"]);
    assert_eq!(store.open_tasks_of_user("1").unwrap(), 1);
    assert_eq!(store.stored_bytes_of_user("1").unwrap(), 30);
    assert_eq!(
        ids(&store.recent_tasks("1", &[], 10).unwrap()),
        ["t2", "t1"]
    );
    assert_eq!(ids(&store.tasks_with_session(&fp(1), "s").unwrap()), ["t1"]);
    assert_eq!(ids(&store.ended_before(100, 10, None).unwrap()), ["t2"]);
    assert_eq!(
        store.share("1", "2").unwrap(),
        Some(share("1", "2", ShareLevel::Trusted))
    );
    assert_eq!(store.shares_to("2").unwrap().len(), 1);
    assert_eq!(store.user("1").unwrap(), user);
    assert_eq!(store.thread_mark_bytes().unwrap().len(), 1);
    assert_eq!(store.audit_len().unwrap(), 3);
    assert_eq!(store.audit_of_owner("1", None, 10).unwrap().len(), 3);
    // Numbering goes on where it stopped.
    assert_eq!(store.append_audit(&entry("1")).unwrap().seq, 4);
}

fn next_order_increases_also_across_a_reopen(open: Open) {
    let (dir, store) = fresh(open);
    let mut last = store.next_order().unwrap();
    for _ in 0..100 {
        let n = store.next_order().unwrap();
        assert!(n > last, "{n} after {last}");
        last = n;
    }
    let store = reopen(open, &dir, store);
    assert!(store.next_order().unwrap() > last);
}

fn agents_of_follows_every_write_and_a_change_of_owner(open: Open) {
    let (dir, store) = fresh(open);
    let names = |store: &SharedStore, owner: &str| {
        let mut v: Vec<String> = store
            .agents_of(owner)
            .unwrap()
            .into_iter()
            .map(|a| a.name)
            .collect();
        v.sort();
        v
    };
    for (n, owner) in [(1, "1"), (2, "1"), (3, "2"), (4, "12")] {
        store.put_agent(&agent(n, owner)).unwrap();
    }
    let pairing = code("c", "1", u64::MAX);
    let used = PairCodeRecord {
        used_at: Some(1),
        ..pairing.clone()
    };
    store.put_pair_code(&pairing).unwrap();
    store
        .pair_agent_audited(&pairing, &used, &agent(5, "1"), &entry("1"))
        .unwrap();
    store.revoke_agent_audited(&fp(5), 9, &entry("1")).unwrap();
    assert_eq!(
        names(&store, "1"),
        ["a1", "a2", "a5"],
        "revoked ones included"
    );
    assert_eq!(names(&store, "12"), ["a4"]);
    assert!(names(&store, "3").is_empty());
    assert_eq!(store.agents().unwrap().len(), 5);
    // A record that changes hands leaves its old owner's list.
    store
        .update_agent(&fp(2), &mut |a| a.owner = "2".into())
        .unwrap();
    assert_eq!(names(&store, "1"), ["a1", "a5"]);
    assert_eq!(names(&store, "2"), ["a2", "a3"]);
    let store = reopen(open, &dir, store);
    assert_eq!(names(&store, "1"), ["a1", "a5"]);
    assert_eq!(names(&store, "2"), ["a2", "a3"]);
    assert_eq!(names(&store, "12"), ["a4"]);
}

fn update_agent_retries_a_concurrent_change_instead_of_losing_it(open: Open) {
    let (_dir, store) = fresh(open);
    assert_eq!(store.update_agent(&fp(1), &mut |_| {}).unwrap(), None);
    store.put_agent(&agent(1, "1")).unwrap();
    let start = Arc::new(Barrier::new(4));
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let (store, start) = (store.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                for _ in 0..25 {
                    store
                        .update_agent(&fp(1), &mut |a| {
                            a.last_seen = Some(a.last_seen.unwrap_or(0) + 1)
                        })
                        .unwrap()
                        .expect("the agent exists");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(store.agent(&fp(1)).unwrap().unwrap().last_seen, Some(100));
}

fn two_redeems_of_one_code_exactly_one_wins(open: Open) {
    let (_dir, store) = fresh(open);
    let pairing = code("c", "1", u64::MAX);
    store.put_pair_code(&pairing).unwrap();
    let used = PairCodeRecord {
        used_at: Some(5),
        ..pairing.clone()
    };
    let first = store
        .pair_agent_audited(&pairing, &used, &agent(1, "1"), &entry("1"))
        .unwrap();
    assert_eq!(first.seq, 1);
    let second = store.pair_agent_audited(&pairing, &used, &agent(2, "1"), &entry("1"));
    assert!(matches!(second, Err(StoreError::Conflict)), "{second:?}");
    assert_eq!(store.pair_code("c").unwrap(), Some(used));
    assert!(store.agent(&fp(1)).unwrap().is_some());
    assert!(
        store.agent(&fp(2)).unwrap().is_none(),
        "the loser is not paired"
    );
    assert_eq!(store.agents_of("1").unwrap().len(), 1);
    assert_eq!(store.audit_len().unwrap(), 1, "the loser wrote no entry");
}

fn racing_redeems_of_one_code_exactly_one_wins(open: Open) {
    let (_dir, store) = fresh(open);
    let pairing = code("c", "1", u64::MAX);
    store.put_pair_code(&pairing).unwrap();
    let start = Arc::new(Barrier::new(8));
    let threads: Vec<_> = (1..=8u8)
        .map(|n| {
            let (store, start, pairing) = (store.clone(), start.clone(), pairing.clone());
            std::thread::spawn(move || {
                let used = PairCodeRecord {
                    used_at: Some(u64::from(n)),
                    ..pairing.clone()
                };
                start.wait();
                store.pair_agent_audited(&pairing, &used, &agent(n, "1"), &entry("1"))
            })
        })
        .collect();
    let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(
        results.iter().filter(|r| r.is_ok()).count(),
        1,
        "{results:?}"
    );
    assert!(results
        .iter()
        .all(|r| r.is_ok() || matches!(r, Err(StoreError::Conflict))));
    assert_eq!(store.agents().unwrap().len(), 1);
    assert_eq!(store.audit_len().unwrap(), 1);
    let winner = store.agents().unwrap()[0].fingerprint.0[0];
    assert_eq!(
        store.pair_code("c").unwrap().unwrap().used_at,
        Some(u64::from(winner)),
        "the code records the winner's redemption"
    );
}

fn a_swap_against_a_stale_pairing_code_is_a_conflict(open: Open) {
    let (_dir, store) = fresh(open);
    let old = code("c", "1", 100);
    let missing = store.swap_pair_code(&old, &old);
    assert!(matches!(missing, Err(StoreError::Conflict)), "{missing:?}");
    store.put_pair_code(&old).unwrap();
    let failed_once = PairCodeRecord {
        failures: 1,
        ..old.clone()
    };
    store.swap_pair_code(&old, &failed_once).unwrap();
    let superseded = PairCodeRecord {
        superseded_at: Some(3),
        ..old.clone()
    };
    let stale = store.swap_pair_code(&old, &superseded);
    assert!(matches!(stale, Err(StoreError::Conflict)), "{stale:?}");
    assert_eq!(store.pair_code("c").unwrap(), Some(failed_once));
}

fn pair_codes_of_an_owner_and_pruning(open: Open) {
    let (_dir, store) = fresh(open);
    for (id, owner, expires) in [
        ("a", "1", 10),
        ("b", "1", 20),
        ("c", "12", 5),
        ("d", "2", 30),
    ] {
        store.put_pair_code(&code(id, owner, expires)).unwrap();
    }
    let of = |owner: &str| {
        let mut v: Vec<String> = store
            .pair_codes_of(owner)
            .unwrap()
            .into_iter()
            .map(|c| c.id)
            .collect();
        v.sort();
        v
    };
    assert_eq!(of("1"), ["a", "b"]);
    assert_eq!(of("12"), ["c"]);
    assert!(of("3").is_empty());
    assert_eq!(
        store.prune_pair_codes(20).unwrap(),
        2,
        "expired before 20: a, c"
    );
    assert_eq!(of("1"), ["b"]);
    assert!(of("12").is_empty());
    assert_eq!(store.prune_pair_codes(20).unwrap(), 0);
}

fn revoking_keeps_the_first_time_and_writes_its_entry(open: Open) {
    let (_dir, store) = fresh(open);
    assert!(store
        .revoke_agent_audited(&fp(1), 10, &entry("1"))
        .unwrap()
        .is_none());
    assert_eq!(store.audit_len().unwrap(), 0, "no agent, no entry");
    store.put_agent(&agent(1, "1")).unwrap();
    let (rec, e) = store
        .revoke_agent_audited(&fp(1), 10, &entry("1"))
        .unwrap()
        .unwrap();
    assert_eq!((rec.revoked_at, e.seq), (Some(10), 1));
    let (rec, _) = store
        .revoke_agent_audited(&fp(1), 20, &entry("1"))
        .unwrap()
        .unwrap();
    assert_eq!(rec.revoked_at, Some(10));
    assert_eq!(store.agent(&fp(1)).unwrap().unwrap().revoked_at, Some(10));
}

fn audit_numbers_follow_commit_order_without_gaps(open: Open) {
    let (_dir, store) = fresh(open);
    let pairing = code("c", "1", u64::MAX);
    store.put_pair_code(&pairing).unwrap();
    let used = PairCodeRecord {
        used_at: Some(1),
        ..pairing.clone()
    };
    let mut got = vec![
        store.append_audit(&entry("1")).unwrap().seq,
        store
            .pair_agent_audited(&pairing, &used, &agent(1, "1"), &entry("1"))
            .unwrap()
            .seq,
        store
            .revoke_agent_audited(&fp(1), 1, &entry("1"))
            .unwrap()
            .unwrap()
            .1
            .seq,
        store
            .put_task_audited(&task("t", "1", 1, 1), &entry("1"))
            .unwrap()
            .seq,
        store
            .put_share_audited(&share("1", "2", ShareLevel::Standard), &|_| entry("1"))
            .unwrap()
            .1
            .seq,
    ];
    got.push(
        store
            .remove_share_audited("1", "2", &|_| entry("1"))
            .unwrap()
            .unwrap()
            .1
            .seq,
    );
    got.push(
        store
            .put_user_audited("1", &UserRecord::default(), &entry("1"))
            .unwrap()
            .seq,
    );
    assert_eq!(got, (1..=7).collect::<Vec<_>>());
    let stored = all_audit(&store);
    assert_eq!(seqs(&stored), (1..=7).rev().collect::<Vec<_>>());
    assert_eq!(store.audit_len().unwrap(), 7);
}

fn concurrent_audited_writes_get_distinct_numbers_without_gaps(open: Open) {
    let (_dir, store) = fresh(open);
    let start = Arc::new(Barrier::new(4));
    let threads: Vec<_> = (0..4)
        .map(|n| {
            let (store, start) = (store.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                (0..25)
                    .map(|i| {
                        let mut e = entry(&n.to_string());
                        e.detail = format!("{n}/{i}");
                        let written = if i % 2 == 0 {
                            store.append_audit(&e).unwrap()
                        } else {
                            let id = format!("t{n}_{i}");
                            store.put_task_audited(&task(&id, "1", 1, 0), &e).unwrap()
                        };
                        (written.seq, written.detail)
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut numbers = BTreeMap::new();
    for t in threads {
        for (seq, detail) in t.join().unwrap() {
            assert!(numbers.insert(seq, detail).is_none(), "{seq} given twice");
        }
    }
    assert_eq!(
        numbers.keys().copied().collect::<Vec<_>>(),
        (1..=100).collect::<Vec<_>>()
    );
    // What each writer was told is what the log holds.
    for e in all_audit(&store) {
        assert_eq!(numbers[&e.seq], e.detail);
    }
}

fn a_refused_audited_write_leaves_nothing_behind(open: Open) {
    let (_dir, store) = fresh(open);
    let pairing = code("c", "1", u64::MAX);
    store.put_pair_code(&pairing).unwrap();
    let burned = PairCodeRecord {
        failures: 3,
        ..pairing.clone()
    };
    store.swap_pair_code(&pairing, &burned).unwrap();
    let used = PairCodeRecord {
        used_at: Some(1),
        ..pairing.clone()
    };
    // Redeeming against the record as it was before it changed: refused, and neither the agent nor the
    // entry is written.
    let stale = store.pair_agent_audited(&pairing, &used, &agent(1, "1"), &entry("1"));
    assert!(matches!(stale, Err(StoreError::Conflict)), "{stale:?}");
    assert_eq!(store.pair_code("c").unwrap(), Some(burned));
    assert!(store.agent(&fp(1)).unwrap().is_none());
    assert!(store.agents_of("1").unwrap().is_empty());
    assert_eq!(store.audit_len().unwrap(), 0);
    assert_eq!(
        store.append_audit(&entry("1")).unwrap().seq,
        1,
        "no number used"
    );
}

fn put_share_entry_sees_the_previous_share(open: Open) {
    let (_dir, store) = fresh(open);
    let saw: Cell<Option<Option<ShareRecord>>> = Cell::new(None);
    let first = share("1", "2", ShareLevel::Standard);
    let (before, e) = store
        .put_share_audited(&first, &|prev| {
            saw.set(Some(prev.cloned()));
            entry("1")
        })
        .unwrap();
    assert_eq!((before, saw.take(), e.seq), (None, Some(None), 1));
    let wider = ShareRecord {
        level: ShareLevel::Trusted,
        projects: Some(vec!["p".into()]),
        ..first.clone()
    };
    let (before, e) = store
        .put_share_audited(&wider, &|prev| {
            saw.set(Some(prev.cloned()));
            entry("1")
        })
        .unwrap();
    assert_eq!(before, Some(first.clone()));
    assert_eq!(saw.take(), Some(Some(first)));
    assert_eq!(e.seq, 2);
    assert_eq!(store.share("1", "2").unwrap(), Some(wider));
}

fn removing_a_missing_share_writes_nothing(open: Open) {
    let (_dir, store) = fresh(open);
    let called = Cell::new(false);
    let removed = store
        .remove_share_audited("1", "2", &|_| {
            called.set(true);
            entry("1")
        })
        .unwrap();
    assert!(removed.is_none());
    assert!(!called.get(), "no entry is made for nothing");
    assert_eq!(store.audit_len().unwrap(), 0);
    store
        .put_share_audited(&share("1", "2", ShareLevel::Standard), &|_| entry("1"))
        .unwrap();
    let (old, e) = store
        .remove_share_audited("1", "2", &|old| {
            assert_eq!(old.grantee, "2");
            entry("1")
        })
        .unwrap()
        .unwrap();
    assert_eq!((old.level, e.seq), (ShareLevel::Standard, 2));
    assert!(store
        .remove_share_audited("1", "2", &|_| entry("1"))
        .unwrap()
        .is_none());
    assert_eq!(store.audit_len().unwrap(), 2);
}

fn shares_of_and_shares_to_follow_every_change(open: Open) {
    let (dir, store) = fresh(open);
    let pairs = |shares: Vec<ShareRecord>| {
        let mut v: Vec<(String, String)> =
            shares.into_iter().map(|s| (s.owner, s.grantee)).collect();
        v.sort();
        v
    };
    let p = |o: &str, g: &str| (o.to_string(), g.to_string());
    // "1" and "12" are different people whose ids share a prefix.
    for (owner, grantee) in [
        ("1", "2"),
        ("1", "12"),
        ("12", "2"),
        ("3", "1"),
        ("2", "12"),
    ] {
        store
            .put_share_audited(&share(owner, grantee, ShareLevel::Standard), &|_| {
                entry(owner)
            })
            .unwrap();
    }
    assert_eq!(
        pairs(store.shares_of("1").unwrap()),
        [p("1", "12"), p("1", "2")]
    );
    assert_eq!(pairs(store.shares_of("12").unwrap()), [p("12", "2")]);
    assert_eq!(
        pairs(store.shares_to("2").unwrap()),
        [p("1", "2"), p("12", "2")]
    );
    assert_eq!(
        pairs(store.shares_to("12").unwrap()),
        [p("1", "12"), p("2", "12")]
    );
    assert_eq!(pairs(store.shares_to("1").unwrap()), [p("3", "1")]);
    assert!(store.shares_to("4").unwrap().is_empty());
    // Changing a share's level does not list it twice.
    store
        .put_share_audited(&share("1", "2", ShareLevel::Trusted), &|_| entry("1"))
        .unwrap();
    let to_two = store.shares_to("2").unwrap();
    assert_eq!(to_two.len(), 2);
    assert!(to_two
        .iter()
        .any(|s| s.owner == "1" && s.level == ShareLevel::Trusted));
    store
        .remove_share_audited("1", "2", &|_| entry("1"))
        .unwrap();
    assert_eq!(pairs(store.shares_to("2").unwrap()), [p("12", "2")]);
    assert_eq!(pairs(store.shares_of("1").unwrap()), [p("1", "12")]);
    let store = reopen(open, &dir, store);
    assert_eq!(pairs(store.shares_to("2").unwrap()), [p("12", "2")]);
    assert_eq!(
        pairs(store.shares_to("12").unwrap()),
        [p("1", "12"), p("2", "12")]
    );
}

fn users_have_defaults_and_audited_settings(open: Open) {
    let (_dir, store) = fresh(open);
    assert_eq!(store.user("1").unwrap(), UserRecord::default());
    // Every setting survives the round trip (a user who turned mentions off stays quiet).
    let rec = UserRecord {
        default_agent: Some(fp(3)),
        quiet: true,
        ..Default::default()
    };
    let e = store.put_user_audited("1", &rec, &entry("1")).unwrap();
    assert_eq!(e.seq, 1);
    assert_eq!(store.user("1").unwrap(), rec);
    assert_eq!(store.user("12").unwrap(), UserRecord::default());
}

fn pool(name: &str, access: PoolAccess) -> PoolRecord {
    PoolRecord {
        name: name.into(),
        access,
        created_at: 5,
        drained: Vec::new(),
    }
}

fn pools_round_trip_and_pool_users_follow_every_user_write(open: Open) {
    let (dir, store) = fresh(open);
    assert_eq!(store.pool("gpu").unwrap(), None);
    assert!(store.pools().unwrap().is_empty());
    let gpu = pool("gpu", PoolAccess::Users { users: vec![] });
    let e = store.put_pool_audited(&gpu, &entry("pool:gpu")).unwrap();
    assert_eq!(e.seq, 1, "the pool is written with its entry");
    let mut changed = pool(
        "gpu",
        PoolAccess::Roles {
            roles: vec!["77".into()],
        },
    );
    changed.drained = vec![fp(4)];
    store
        .put_pool_audited(&changed, &entry("pool:gpu"))
        .unwrap();
    store
        .put_pool_audited(&pool("cpu", PoolAccess::Everyone), &entry("pool:cpu"))
        .unwrap();
    assert_eq!(store.pool("gpu").unwrap(), Some(changed.clone()));
    let names: Vec<String> = store.pools().unwrap().into_iter().map(|p| p.name).collect();
    assert_eq!(names, ["cpu", "gpu"], "by name");
    assert_eq!(store.audit_of_owner("pool:gpu", None, 10).unwrap().len(), 2);

    // Only users whose record says something about pools are listed, and each follows its latest write.
    let plain = UserRecord {
        quiet: true,
        ..Default::default()
    };
    let cluster = UserRecord {
        pool: Some("gpu".into()),
        ..Default::default()
    };
    let assigned_local = UserRecord {
        worker: Some(fp(4)),
        ..Default::default()
    };
    store.put_user_audited("1", &plain, &entry("1")).unwrap();
    store.put_user_audited("2", &cluster, &entry("2")).unwrap();
    store
        .put_user_audited("3", &assigned_local, &entry("3"))
        .unwrap();
    assert_eq!(
        store.pool_users().unwrap(),
        [
            ("2".to_string(), cluster.clone()),
            ("3".to_string(), assigned_local.clone())
        ]
    );
    // Leaving pools altogether takes a user off the list; joining puts them on.
    store.put_user_audited("2", &plain, &entry("2")).unwrap();
    store.put_user_audited("1", &cluster, &entry("1")).unwrap();
    let store = reopen(open, &dir, store);
    assert_eq!(
        store.pool_users().unwrap(),
        [
            ("1".to_string(), cluster),
            ("3".to_string(), assigned_local)
        ]
    );
    assert_eq!(store.pool("gpu").unwrap(), Some(changed));
}

fn open_tasks_in_queue_order_and_only_open_ones(open: Open) {
    let (_dir, store) = fresh(open);
    // Written out of queue order; queue order is `order`.
    for (id, order) in [("c", 30), ("a", 10), ("b", 20), ("d", 40)] {
        store.put_task(&task(id, "1", 1, order)).unwrap();
    }
    store.put_task(&task("other", "1", 2, 5)).unwrap();
    let mut running = task("b", "1", 1, 20);
    running.state = TaskState::Running;
    store.put_task(&running).unwrap();
    store
        .put_task_audited(&ended(task("d", "1", 1, 40), 50), &entry("1"))
        .unwrap();
    let open_ones = store.open_tasks(&fp(1)).unwrap();
    assert_eq!(ids(&open_ones), ["a", "b", "c"]);
    assert_eq!(open_ones[1].state, TaskState::Running);
    assert_eq!(ids(&store.open_tasks(&fp(2)).unwrap()), ["other"]);
    assert!(store.open_tasks(&fp(3)).unwrap().is_empty());
    for state in [
        TaskState::WaitingApproval,
        TaskState::Failed,
        TaskState::Cancelled,
        TaskState::Lost,
    ] {
        let mut rec = task("a", "1", 1, 10);
        rec.state = state;
        store.put_task(&rec).unwrap();
        let listed = ids(&store.open_tasks(&fp(1)).unwrap()).contains(&"a".to_string());
        assert_eq!(listed, !state.is_final(), "{state:?}");
    }
}

fn open_tasks_of_user_counts_across_agents(open: Open) {
    let (_dir, store) = fresh(open);
    for (id, user, agent) in [("a", "1", 1), ("b", "1", 2), ("c", "12", 1), ("d", "2", 1)] {
        store.put_task(&task(id, user, agent, 0)).unwrap();
    }
    assert_eq!(store.open_tasks_of_user("1").unwrap(), 2);
    assert_eq!(store.open_tasks_of_user("12").unwrap(), 1);
    assert_eq!(store.open_tasks_of_user("3").unwrap(), 0);
    let done = ended(task("a", "1", 1, 0), 5);
    store.put_task(&done).unwrap();
    assert_eq!(store.open_tasks_of_user("1").unwrap(), 1);
    assert_eq!(store.delete_task(&done).unwrap(), Some(0));
    let c = task("c", "12", 1, 0);
    store.delete_task(&c).unwrap();
    assert_eq!(store.open_tasks_of_user("1").unwrap(), 1);
    assert_eq!(store.open_tasks_of_user("12").unwrap(), 0);
}

fn stored_bytes_of_user_follow_every_write_and_delete(open: Open) {
    let (dir, store) = fresh(open);
    let mut a = task("a", "1", 1, 1);
    let mut b = task("b", "1", 2, 2);
    let mut c = task("c", "12", 1, 3);
    for t in [&a, &b, &c] {
        store.put_task(t).unwrap();
    }
    assert_eq!(store.stored_bytes_of_user("1").unwrap(), 0);
    append(&store, &mut a, 4, 100);
    append(&store, &mut b, 2, 50);
    append(&store, &mut c, 1, 7);
    assert_eq!(store.stored_bytes_of_user("1").unwrap(), 500);
    assert_eq!(store.stored_bytes_of_user("12").unwrap(), 7);
    // Several runs of one task in one call.
    let body = [b'x'; 10];
    let first: Vec<(u64, Option<&[u8]>)> = vec![(5, Some(&body[..]))];
    let mut a1 = a.clone();
    a1.last_seq = 5;
    a1.output_bytes += 10;
    let second: Vec<(u64, Option<&[u8]>)> = vec![(6, Some(&body[..]))];
    let mut a2 = a1.clone();
    a2.last_seq = 6;
    a2.output_bytes += 10;
    let runs = [
        EventRun {
            task: &a1,
            events: &first,
            was_open: Some(true),
        },
        EventRun {
            task: &a2,
            events: &second,
            was_open: Some(true),
        },
    ];
    assert_eq!(store.append_event_runs(&runs).unwrap(), [true, true]);
    let a = a2;
    assert_eq!(store.stored_bytes_of_user("1").unwrap(), 520);
    // Ending a task keeps its output; a plain record write sets what the record says.
    let a = ended(a, 90);
    store.put_task(&a).unwrap();
    assert_eq!(store.stored_bytes_of_user("1").unwrap(), 520);
    let mut b_rewritten = b.clone();
    b_rewritten.output_bytes = 30;
    store.put_task_audited(&b_rewritten, &entry("1")).unwrap();
    assert_eq!(store.stored_bytes_of_user("1").unwrap(), 450);
    let store = reopen(open, &dir, store);
    assert_eq!(store.stored_bytes_of_user("1").unwrap(), 450);
    assert_eq!(store.delete_task(&a).unwrap(), Some(6));
    assert_eq!(store.stored_bytes_of_user("1").unwrap(), 30);
    assert_eq!(store.delete_task(&b_rewritten).unwrap(), Some(2));
    assert_eq!(store.stored_bytes_of_user("1").unwrap(), 0);
    assert_eq!(store.stored_bytes_of_user("12").unwrap(), 7);
}

fn recent_tasks_newest_first_across_own_and_agents_tasks_once_each(open: Open) {
    let (_dir, store) = fresh(open);
    // User 1 owns agent 1. Their own tasks run on agents 1 and 2 (someone else's, shared with them); user 2
    // runs tasks on agent 1; user 12 and agent 3 are none of theirs.
    let rows = [
        ("own-on-1-old", "1", 1),
        ("theirs-on-1", "2", 1),
        ("own-on-2", "1", 2),
        ("not-mine", "12", 3),
        ("theirs-on-3", "2", 3),
        ("own-on-1-new", "1", 1),
        ("not-mine-on-2", "2", 2),
    ];
    for (id, user, agent) in rows {
        let order = store.next_order().unwrap();
        store.put_task(&task(id, user, agent, order)).unwrap();
    }
    let expected = ["own-on-1-new", "own-on-2", "theirs-on-1", "own-on-1-old"];
    assert_eq!(
        ids(&store.recent_tasks("1", &[fp(1)], 10).unwrap()),
        expected
    );
    assert_eq!(
        ids(&store.recent_tasks("1", &[fp(1)], 3).unwrap()),
        expected[..3]
    );
    assert!(store.recent_tasks("1", &[fp(1)], 0).unwrap().is_empty());
    // An agent named twice still gives each task once.
    assert_eq!(
        ids(&store.recent_tasks("1", &[fp(1), fp(1)], 10).unwrap()),
        expected
    );
    assert_eq!(
        ids(&store.recent_tasks("1", &[], 10).unwrap()),
        ["own-on-1-new", "own-on-2", "own-on-1-old"]
    );
    assert_eq!(
        ids(&store.recent_tasks("nobody", &[fp(3)], 10).unwrap()),
        ["theirs-on-3", "not-mine"]
    );
    // A changed record keeps its place (order does not change) and comes back as it is now.
    let mut changed = task("own-on-2", "1", 2, 3);
    changed.order = store.recent_tasks("1", &[], 10).unwrap()[1].order;
    changed.state = TaskState::Running;
    store.put_task(&changed).unwrap();
    let now = store.recent_tasks("1", &[fp(1)], 10).unwrap();
    assert_eq!(ids(&now), expected);
    assert_eq!(now[1].state, TaskState::Running);
    // A deleted one is gone.
    store.delete_task(&now[0]).unwrap();
    assert_eq!(
        ids(&store.recent_tasks("1", &[fp(1)], 10).unwrap()),
        expected[1..]
    );
}

fn tasks_with_session_follow_the_session_a_later_write_sets(open: Open) {
    let (_dir, store) = fresh(open);
    let mut a = task("a", "1", 1, 1);
    store.put_task(&a).unwrap();
    assert!(store.tasks_with_session(&fp(1), "s").unwrap().is_empty());
    // The session arrives with an event.
    a.session_id = Some("s".into());
    append(&store, &mut a, 1, 10);
    assert_eq!(ids(&store.tasks_with_session(&fp(1), "s").unwrap()), ["a"]);
    let mut b = task("b", "2", 1, 2);
    b.session_id = Some("s".into());
    store.put_task(&b).unwrap();
    // Same session id on another agent, and a session id that extends this one.
    let mut c = task("c", "1", 2, 3);
    c.session_id = Some("s".into());
    store.put_task(&c).unwrap();
    let mut d = task("d", "1", 1, 4);
    d.session_id = Some("s2".into());
    store.put_task(&d).unwrap();
    assert_eq!(
        sorted_ids(&store.tasks_with_session(&fp(1), "s").unwrap()),
        ["a", "b"]
    );
    assert_eq!(ids(&store.tasks_with_session(&fp(2), "s").unwrap()), ["c"]);
    assert_eq!(ids(&store.tasks_with_session(&fp(1), "s2").unwrap()), ["d"]);
    assert!(store.tasks_with_session(&fp(1), "").unwrap().is_empty());
    // A resumed session can report a new id: the task moves to it.
    a.session_id = Some("s3".into());
    append(&store, &mut a, 1, 10);
    assert_eq!(ids(&store.tasks_with_session(&fp(1), "s").unwrap()), ["b"]);
    assert_eq!(ids(&store.tasks_with_session(&fp(1), "s3").unwrap()), ["a"]);
    store.delete_task(&b).unwrap();
    assert!(store.tasks_with_session(&fp(1), "s").unwrap().is_empty());
}

fn ended_before_pages_through_final_tasks_with_the_cursor(open: Open) {
    let (_dir, store) = fresh(open);
    // Several tasks end at the same second, so a batch boundary falls between equal times.
    let ends = [
        ("a", 50),
        ("b", 10),
        ("c", 30),
        ("d", 30),
        ("e", 30),
        ("f", 20),
        ("g", 99),
        ("h", 100),
    ];
    for (i, (id, at)) in ends.iter().enumerate() {
        store
            .put_task(&ended(task(id, "1", 1, i as u64 + 1), *at))
            .unwrap();
    }
    let mut still_open = task("open", "1", 1, 20);
    still_open.updated_at = 5;
    store.put_task(&still_open).unwrap();
    let cutoff = 100;
    let all = store.ended_before(cutoff, 100, None).unwrap();
    assert_eq!(sorted_ids(&all), ["a", "b", "c", "d", "e", "f", "g"]);
    let times: Vec<u64> = all.iter().map(|t| t.updated_at).collect();
    assert!(
        times.windows(2).all(|w| w[0] <= w[1]),
        "oldest first: {times:?}"
    );
    for batch in 1..=4 {
        let mut seen = Vec::new();
        let mut after: Option<TaskRecord> = None;
        loop {
            // A cursor that does not move on would page forever: fail instead.
            assert!(seen.len() <= all.len(), "batches of {batch} repeat tasks");
            let got = store.ended_before(cutoff, batch, after.as_ref()).unwrap();
            assert!(got.len() <= batch);
            seen.extend(got.iter().cloned());
            match got.last() {
                Some(last) if got.len() == batch => after = Some(last.clone()),
                _ => break,
            }
        }
        assert_eq!(ids(&seen), ids(&all), "batches of {batch}");
    }
    // A task that ended again later (a late event) moves out of the range.
    let g = ended(task("g", "1", 1, 7), 150);
    store.put_task(&g).unwrap();
    assert_eq!(
        sorted_ids(&store.ended_before(cutoff, 100, None).unwrap()),
        ["a", "b", "c", "d", "e", "f"]
    );
    assert!(store.ended_before(10, 100, None).unwrap().is_empty());
}

fn delete_task_only_when_unchanged_and_with_its_events(open: Open) {
    let (_dir, store) = fresh(open);
    let mut t = task("t", "1", 1, 1);
    t.session_id = Some("s".into());
    store.put_task(&t).unwrap();
    let stale = t.clone();
    append(&store, &mut t, 3, 10);
    let t = ended(t, 40);
    store.put_task(&t).unwrap();
    // Another task whose id extends this one's keeps its events.
    let mut t1 = task("t1", "1", 1, 2);
    store.put_task(&t1).unwrap();
    append(&store, &mut t1, 2, 10);

    assert_eq!(store.delete_task(&stale).unwrap(), None, "changed since");
    assert_eq!(store.task("t").unwrap(), Some(t.clone()));
    assert_eq!(store.event_bytes("t", 0).unwrap().len(), 3);

    assert_eq!(store.delete_task(&t).unwrap(), Some(3));
    assert_eq!(store.task("t").unwrap(), None);
    assert!(store.event_bytes("t", 0).unwrap().is_empty());
    assert_eq!(store.event_bytes("t1", 0).unwrap().len(), 2);
    assert_eq!(ids(&store.recent_tasks("1", &[fp(1)], 10).unwrap()), ["t1"]);
    assert!(store.tasks_with_session(&fp(1), "s").unwrap().is_empty());
    assert!(store.ended_before(u64::MAX, 10, None).unwrap().is_empty());
    assert_eq!(store.stored_bytes_of_user("1").unwrap(), 20);
    assert_eq!(store.delete_task(&t).unwrap(), None, "already gone");
}

fn append_event_runs_writes_several_tasks_and_not_a_deleted_one(open: Open) {
    let (_dir, store) = fresh(open);
    let (a, b, c) = (
        task("a", "1", 1, 1),
        task("b", "1", 1, 2),
        task("c", "2", 2, 3),
    );
    for t in [&a, &b, &c] {
        store.put_task(t).unwrap();
    }
    assert_eq!(store.delete_task(&b).unwrap(), Some(0));
    let moved = |t: &TaskRecord, n: u64| TaskRecord {
        last_seq: n,
        output_bytes: n * 2,
        updated_at: t.updated_at + 1,
        state: TaskState::Running,
        ..t.clone()
    };
    let (a2, b2, c2) = (moved(&a, 2), moved(&b, 2), moved(&c, 1));
    let two: Vec<(u64, Option<&[u8]>)> = vec![(1, Some(&b"e1"[..])), (2, Some(&b"e2"[..]))];
    let one: Vec<(u64, Option<&[u8]>)> = vec![(1, Some(&b"f1"[..]))];
    let runs = [
        EventRun {
            task: &a2,
            events: &two,
            was_open: Some(true),
        },
        EventRun {
            task: &b2,
            events: &two,
            was_open: Some(true),
        },
        EventRun {
            task: &c2,
            events: &one,
            was_open: None,
        },
    ];
    assert_eq!(store.append_event_runs(&runs).unwrap(), [true, false, true]);
    assert_eq!(store.task("a").unwrap(), Some(a2));
    assert_eq!(store.task("c").unwrap(), Some(c2));
    assert_eq!(
        store.task("b").unwrap(),
        None,
        "a late run does not bring it back"
    );
    assert!(store.event_bytes("b", 0).unwrap().is_empty());
    assert_eq!(
        store.event_bytes("a", 0).unwrap(),
        [(1, b"e1".to_vec()), (2, b"e2".to_vec())]
    );
    assert_eq!(store.event_bytes("c", 0).unwrap(), [(1, b"f1".to_vec())]);
    assert_eq!(store.stored_bytes_of_user("1").unwrap(), 4);
    assert_eq!(store.open_tasks_of_user("1").unwrap(), 1);
    assert!(store.append_event_runs(&[]).unwrap().is_empty());
}

fn events_are_read_after_a_sequence_number(open: Open) {
    let (_dir, store) = fresh(open);
    let mut t = task("t", "1", 1, 1);
    store.put_task(&t).unwrap();
    let mut t10 = task("t10", "1", 1, 2);
    store.put_task(&t10).unwrap();
    append(&store, &mut t, 5, 3);
    append(&store, &mut t10, 2, 3);
    let after = |task: &str, n: u64| -> Vec<u64> {
        store
            .event_bytes(task, n)
            .unwrap()
            .into_iter()
            .map(|(seq, _)| seq)
            .collect()
    };
    assert_eq!(after("t", 0), [1, 2, 3, 4, 5]);
    assert_eq!(after("t", 2), [3, 4, 5]);
    assert!(after("t", 5).is_empty());
    assert!(after("t", u64::MAX).is_empty());
    assert_eq!(after("t10", 0), [1, 2]);
    assert!(after("nothing", 0).is_empty());
    // Typed reading, through the convenience over the bytes.
    let event = ct_protocol::task::TaskEvent::Text { text: "hi".into() };
    let bytes = serde_json::to_vec(&event).unwrap();
    let mut u = task("u", "1", 1, 3);
    store.put_task(&u).unwrap();
    u.last_seq = 1;
    let run: Vec<(u64, Option<&[u8]>)> = vec![(1, Some(&bytes))];
    store
        .append_event_runs(&[EventRun {
            task: &u,
            events: &run,
            was_open: Some(true),
        }])
        .unwrap();
    assert_eq!(store.events("u", 0).unwrap(), [(1, event)]);
}

fn dropped_events_move_the_record_but_store_nothing(open: Open) {
    let (_dir, store) = fresh(open);
    let t = task("t", "1", 1, 1);
    store.put_task(&t).unwrap();
    let mut moved = t.clone();
    moved.last_seq = 3;
    moved.output_bytes = 2;
    moved.output_truncated = true;
    let events: Vec<(u64, Option<&[u8]>)> = vec![(1, Some(&b"ok"[..])), (2, None), (3, None)];
    let run = EventRun {
        task: &moved,
        events: &events,
        was_open: Some(true),
    };
    assert_eq!(store.append_event_runs(&[run]).unwrap(), [true]);
    assert_eq!(store.task("t").unwrap(), Some(moved));
    assert_eq!(store.event_bytes("t", 0).unwrap(), [(1, b"ok".to_vec())]);
    assert_eq!(store.stored_bytes_of_user("1").unwrap(), 2);
}

fn thread_marks_are_kept_and_deleted(open: Open) {
    let (dir, store) = fresh(open);
    store.put_thread_mark("a", br#"{"n":1}"#).unwrap();
    store.put_thread_mark("b", br#"{"n":2}"#).unwrap();
    store.put_thread_mark("a", br#"{"n":3}"#).unwrap();
    store.put_thread_mark("c", b"not json").unwrap();
    store.delete_thread_mark("b").unwrap();
    store.delete_thread_mark("nothing").unwrap();
    let store = reopen(open, &dir, store);
    let mut raw = store.thread_mark_bytes().unwrap();
    raw.sort();
    assert_eq!(
        raw,
        [
            ("a".to_string(), br#"{"n":3}"#.to_vec()),
            ("c".to_string(), b"not json".to_vec())
        ]
    );
    // The typed reading skips what does not decode.
    let marks: Vec<(String, serde_json::Value)> = store.thread_marks().unwrap();
    assert_eq!(marks, [("a".to_string(), serde_json::json!({"n": 3}))]);
    // One mark by its task.
    assert_eq!(
        store.thread_mark("a").unwrap().as_deref(),
        Some(&br#"{"n":3}"#[..])
    );
    assert_eq!(store.thread_mark("b").unwrap(), None);
}

fn task_threads_are_kept_with_their_task_and_deleted_with_it(open: Open) {
    let (dir, store) = fresh(open);
    let (t1, t2, t3) = (
        task("t1", "u1", 1, 1),
        task("t2", "u1", 1, 2),
        task("t3", "u2", 2, 3),
    );
    for t in [&t1, &t2, &t3] {
        store.put_task(t).unwrap();
    }
    store.put_task_thread("t1", 11).unwrap();
    store.put_task_thread("t2", 22).unwrap();
    // The last thread written is kept (a task found again in another thread).
    store.put_task_thread("t2", u64::MAX - 1).unwrap();
    // A task that is not stored gets no link.
    store.put_task_thread("nothing", 33).unwrap();
    let store = reopen(open, &dir, store);
    let wanted: Vec<String> = ["t1", "t2", "t3", "nothing"].map(String::from).to_vec();
    let mut found = store.task_threads(&wanted).unwrap();
    found.sort();
    assert_eq!(
        found,
        [("t1".to_string(), 11), ("t2".to_string(), u64::MAX - 1)]
    );
    assert_eq!(store.task_threads(&[]).unwrap(), []);
    // Only what was asked for.
    assert_eq!(
        store.task_threads(&["t1".to_string()]).unwrap(),
        [("t1".to_string(), 11)]
    );
    // Gone with its task.
    assert_eq!(store.delete_task(&t1).unwrap(), Some(0));
    let mut found = store.task_threads(&wanted).unwrap();
    found.sort();
    assert_eq!(found, [("t2".to_string(), u64::MAX - 1)]);
    // A task stored again under a deleted one's id starts without a thread.
    store.put_task(&t1).unwrap();
    assert_eq!(store.task_threads(&["t1".to_string()]).unwrap(), []);
}

fn thread_chains_are_kept_by_thread_and_deleted_with_their_task(open: Open) {
    let (dir, store) = fresh(open);
    let (t1, t2) = (task("t1", "u1", 1, 1), task("t2", "u1", 1, 2));
    store.put_task(&t1).unwrap();
    store.put_task(&t2).unwrap();
    store.put_task_thread("t1", 11).unwrap();
    store.put_task_thread("t2", 11).unwrap();
    store.put_thread_chain(11, "t1", b"{\"a\":1}").unwrap();
    store.put_thread_chain(u64::MAX, "t2", b"{}").unwrap();
    // A task that is not stored gets no chain.
    store.put_thread_chain(33, "nothing", b"{}").unwrap();
    let store = reopen(open, &dir, store);
    assert_eq!(
        store.thread_chain(11).unwrap().as_deref(),
        Some(&b"{\"a\":1}"[..])
    );
    assert_eq!(
        store.thread_chain(u64::MAX).unwrap().as_deref(),
        Some(&b"{}"[..])
    );
    assert_eq!(store.thread_chain(33).unwrap(), None);
    // The chain moves on to its follow-up: the last one written is kept.
    store.put_thread_chain(11, "t2", b"{\"b\":2}").unwrap();
    assert_eq!(
        store.thread_chain(11).unwrap().as_deref(),
        Some(&b"{\"b\":2}"[..])
    );
    // Deleting a task that is no longer the chain's current one leaves the chain.
    assert_eq!(store.delete_task(&t1).unwrap(), Some(0));
    assert!(store.thread_chain(11).unwrap().is_some());
    // Deleting the current task deletes every chain that names it.
    assert_eq!(store.delete_task(&t2).unwrap(), Some(0));
    assert_eq!(store.thread_chain(11).unwrap(), None);
    assert_eq!(store.thread_chain(u64::MAX).unwrap(), None);
}

fn answers_merge_and_are_deleted_with_their_task(open: Open) {
    let (dir, store) = fresh(open);
    let t1 = task("t1", "u1", 1, 1);
    store.put_task(&t1).unwrap();
    let got = |pairs: &[(u8, &str)]| -> BTreeMap<u8, String> {
        pairs.iter().map(|(q, a)| (*q, a.to_string())).collect()
    };
    assert_eq!(
        store.add_answer("t1", "q", 1, "blue").unwrap(),
        got(&[(1, "blue")])
    );
    let store = reopen(open, &dir, store);
    assert_eq!(
        store
            .add_answer("t1", "q", 0, "Rust, \"of course\"")
            .unwrap(),
        got(&[(0, "Rust, \"of course\""), (1, "blue")])
    );
    // A question answered again keeps the last answer; another approval has its own answers.
    assert_eq!(
        store.add_answer("t1", "q", 1, "green").unwrap(),
        got(&[(0, "Rust, \"of course\""), (1, "green")])
    );
    assert_eq!(
        store.add_answer("t1", "r", 255, "x").unwrap(),
        got(&[(255, "x")])
    );
    // A task that is not stored keeps nothing.
    assert_eq!(
        store.add_answer("nothing", "q", 0, "a").unwrap(),
        got(&[(0, "a")])
    );
    assert_eq!(
        store.add_answer("nothing", "q", 1, "b").unwrap(),
        got(&[(1, "b")])
    );
    // Gone with the task: a task stored again under its id starts with no answers.
    assert_eq!(store.delete_task(&t1).unwrap(), Some(0));
    store.put_task(&t1).unwrap();
    assert_eq!(
        store.add_answer("t1", "q", 2, "z").unwrap(),
        got(&[(2, "z")])
    );
}

fn task_files_are_kept_in_order_until_delivered_or_deleted_with_their_task(open: Open) {
    use ct_relay::store::Attachment;
    let file = |name: &str, media_type: Option<&str>, data: Vec<u8>| Attachment {
        name: name.into(),
        media_type: media_type.map(str::to_string),
        data,
    };
    let (dir, store) = fresh(open);
    let big: Vec<u8> = (0..3 * 1024 * 1024).map(|i: u32| (i % 251) as u8).collect();
    let files = vec![
        file("a.log", Some("text/plain"), b"line\n".to_vec()),
        file("shot.png", Some("image/png"), big),
        file("empty", None, vec![]),
    ];
    store.put_task_files("t", &files).unwrap();
    // Another task whose id extends this one's keeps its own.
    store.put_task_files("t1", &files[..1]).unwrap();
    let store = reopen(open, &dir, store);
    assert_eq!(store.task_files("t").unwrap(), files);
    assert_eq!(store.task_files("t1").unwrap(), files[..1]);
    assert!(store.task_files("nothing").unwrap().is_empty());
    // Writing again replaces, never appends.
    store.put_task_files("t", &files[2..]).unwrap();
    assert_eq!(store.task_files("t").unwrap(), files[2..]);
    // Delivered: gone; the other task's stay.
    store.delete_task_files("t").unwrap();
    assert!(store.task_files("t").unwrap().is_empty());
    store.delete_task_files("t").unwrap();
    assert_eq!(store.task_files("t1").unwrap(), files[..1]);
    // Retention deletes a task's files with it.
    let t1 = ended(task("t1", "1", 1, 1), 10);
    store.put_task(&t1).unwrap();
    assert_eq!(store.delete_task(&t1).unwrap(), Some(0));
    assert!(store.task_files("t1").unwrap().is_empty());
}

fn audit_pages_newest_first_by_owner_and_by_filter(open: Open) {
    let (_dir, store) = fresh(open);
    for (owner, at) in [("1", 10), ("2", 20), ("1", 30), ("12", 40), ("1", 50)] {
        let mut e = entry(owner);
        e.at = at;
        store.append_audit(&e).unwrap();
    }
    assert_eq!(
        seqs(&store.audit_of_owner("1", None, 10).unwrap()),
        [5, 3, 1]
    );
    assert_eq!(
        seqs(&store.audit_of_owner("1", Some(5), 1).unwrap()),
        [3],
        "the next page starts below the last seen"
    );
    assert_eq!(seqs(&store.audit_of_owner("12", None, 10).unwrap()), [4]);
    assert!(store.audit_of_owner("3", None, 10).unwrap().is_empty());
    assert_eq!(
        seqs(&store.audit_where(None, 2, &mut |_| true).unwrap()),
        [5, 4]
    );
    assert_eq!(
        seqs(
            &store
                .audit_where(Some(4), 10, &mut |e| e.owner != "1")
                .unwrap()
        ),
        [2]
    );
    assert_eq!(store.prune_audit(30).unwrap(), 2, "entries at 10 and 20");
    assert_eq!(store.audit_len().unwrap(), 3);
    assert_eq!(seqs(&store.audit_of_owner("1", None, 10).unwrap()), [5, 3]);
    assert!(store.audit_of_owner("2", None, 10).unwrap().is_empty());
    assert_eq!(store.prune_audit(u64::MAX).unwrap(), 3);
    assert!(store.audit_of_owner("1", None, 10).unwrap().is_empty());
    // Numbers are never reused after a prune.
    assert_eq!(store.append_audit(&entry("1")).unwrap().seq, 6);
}

// --- every index against the records ---

/// A small deterministic generator (xorshift64*), so a failure replays exactly.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

const USERS: [&str; 3] = ["1", "12", "2"];
const AGENTS: [u8; 3] = [1, 2, 3];
const SESSIONS: [&str; 3] = ["s", "s1", "t"];
const BODY: &[u8] = b"0123456789";

/// A run's events: sequence number, stored bytes (`None`: dropped).
type Events = Vec<(u64, Option<&'static [u8]>)>;

/// Every index-backed query against the answer computed from the records the test knows are stored.
fn check_indexes(store: &SharedStore, known: &BTreeMap<String, TaskRecord>, step: usize) {
    let at = |what: &str| format!("step {step}: {what}");
    for (id, rec) in known {
        assert_eq!(store.task(id).unwrap().as_ref(), Some(rec), "{}", at(id));
    }
    for user in USERS {
        let mine = known.values().filter(|t| t.spec.requester.user == user);
        let bytes: u64 = mine.clone().map(|t| t.output_bytes).sum();
        let open = mine.filter(|t| !t.state.is_final()).count();
        assert_eq!(
            store.stored_bytes_of_user(user).unwrap(),
            bytes,
            "{}",
            at(user)
        );
        assert_eq!(
            store.open_tasks_of_user(user).unwrap(),
            open,
            "{}",
            at(user)
        );
        for agents in [&[][..], &[fp(1)][..], &[fp(2), fp(3)][..]] {
            let mut expected: Vec<&TaskRecord> = known
                .values()
                .filter(|t| t.spec.requester.user == user || agents.contains(&t.agent))
                .collect();
            expected.sort_by_key(|t| std::cmp::Reverse(t.order));
            for limit in [1, 5, usize::MAX] {
                let want: Vec<String> = expected
                    .iter()
                    .take(limit)
                    .map(|t| t.spec.task.clone())
                    .collect();
                let got = store.recent_tasks(user, agents, limit).unwrap();
                assert_eq!(ids(&got), want, "{}", at(&format!("recent {user} {limit}")));
            }
        }
    }
    for agent in AGENTS {
        let mut open: Vec<&TaskRecord> = known
            .values()
            .filter(|t| t.agent == fp(agent) && !t.state.is_final())
            .collect();
        open.sort_by_key(|t| t.order);
        let want: Vec<String> = open.iter().map(|t| t.spec.task.clone()).collect();
        assert_eq!(
            ids(&store.open_tasks(&fp(agent)).unwrap()),
            want,
            "{}",
            at("open")
        );
        for session in SESSIONS {
            let want: Vec<String> = known
                .values()
                .filter(|t| t.agent == fp(agent) && t.session_id.as_deref() == Some(session))
                .map(|t| t.spec.task.clone())
                .collect();
            let got = store.tasks_with_session(&fp(agent), session).unwrap();
            assert_eq!(sorted_ids(&got), want, "{}", at(session));
        }
    }
    for cutoff in [20, 60, u64::MAX] {
        let want: BTreeSet<String> = known
            .values()
            .filter(|t| t.state.is_final() && t.updated_at < cutoff)
            .map(|t| t.spec.task.clone())
            .collect();
        let mut seen = Vec::new();
        let mut after: Option<TaskRecord> = None;
        loop {
            assert!(
                seen.len() <= want.len(),
                "{}",
                at("ended: the cursor moves on")
            );
            let got = store.ended_before(cutoff, 3, after.as_ref()).unwrap();
            seen.extend(got.iter().cloned());
            match got.last() {
                Some(last) if got.len() == 3 => after = Some(last.clone()),
                _ => break,
            }
        }
        let times: Vec<u64> = seen.iter().map(|t| t.updated_at).collect();
        assert!(
            times.windows(2).all(|w| w[0] <= w[1]),
            "{}",
            at("ended order")
        );
        assert_eq!(seen.len(), want.len(), "{}", at("ended: each once"));
        assert_eq!(
            ids(&seen).into_iter().collect::<BTreeSet<_>>(),
            want,
            "{}",
            at("ended")
        );
    }
}

/// How many operations of each kind a random run made.
#[derive(Debug, Default)]
struct Done {
    created: usize,
    changed: usize,
    runs: usize,
    runs_of_deleted: usize,
    deleted: usize,
    reopened: usize,
}

fn indexes_agree_with_the_records_after_random_operations(open: Open) {
    let (dir, mut store) = fresh(open);
    let mut rng = Rng(0x5eed_0fc0_de00_0001);
    let mut known: BTreeMap<String, TaskRecord> = BTreeMap::new();
    let mut stored_events: HashMap<String, usize> = HashMap::new();
    let mut next_id = 0;
    let mut done = Done::default();
    let states = [
        TaskState::Queued,
        TaskState::Running,
        TaskState::WaitingApproval,
        TaskState::Done,
        TaskState::Failed,
        TaskState::Cancelled,
        TaskState::Lost,
    ];
    for step in 0..400 {
        let existing: Vec<String> = known.keys().cloned().collect();
        let roll = rng.below(100);
        match roll {
            // A new task.
            0..=29 => {
                done.created += 1;
                next_id += 1;
                let id = format!("t{next_id}");
                let (user, agent) = (*rng.pick(&USERS), *rng.pick(&AGENTS));
                let rec = task(&id, user, agent, store.next_order().unwrap());
                if rng.below(2) == 0 {
                    store.put_task(&rec).unwrap();
                } else {
                    store.put_task_audited(&rec, &entry(user)).unwrap();
                }
                known.insert(id, rec);
            }
            // A changed record: state, session, time, output, now and then its requester or agent.
            30..=54 if !existing.is_empty() => {
                done.changed += 1;
                let id = rng.pick(&existing).clone();
                let mut rec = known[&id].clone();
                rec.state = *rng.pick(&states);
                rec.updated_at = rng.below(100);
                match rng.below(10) {
                    0 => rec.session_id = None,
                    1..=4 => rec.session_id = Some(rng.pick(&SESSIONS).to_string()),
                    _ => {}
                }
                rec.output_bytes = rng.below(1_000);
                if rng.below(10) == 0 {
                    rec.spec.requester.user = rng.pick(&USERS).to_string();
                }
                if rng.below(10) == 0 {
                    rec.agent = fp(*rng.pick(&AGENTS));
                }
                store.put_task(&rec).unwrap();
                known.insert(id, rec);
            }
            // Runs of events for a few tasks, now and then one deleted just before.
            55..=84 if !existing.is_empty() => {
                done.runs += 1;
                let mut moved: Vec<(String, TaskRecord, Events)> = Vec::new();
                for _ in 0..=rng.below(2) {
                    let id = rng.pick(&existing).clone();
                    // Several runs of one task in one call: each continues from the one before.
                    let mut rec = match moved.iter().rev().find(|(i, ..)| *i == id) {
                        Some((_, prev, _)) => prev.clone(),
                        None => known[&id].clone(),
                    };
                    let mut events = Vec::new();
                    for _ in 0..=rng.below(3) {
                        rec.last_seq += 1;
                        // A quarter are dropped, as under the output cap.
                        let stored = (rng.below(4) != 0).then_some(BODY);
                        rec.output_bytes += stored.map_or(0, |b| b.len() as u64);
                        events.push((rec.last_seq, stored));
                    }
                    rec.updated_at = rng.below(100);
                    if rng.below(5) == 0 {
                        rec.session_id = Some(rng.pick(&SESSIONS).to_string());
                    }
                    if rng.below(8) == 0 {
                        rec.state = *rng.pick(&states);
                    }
                    moved.push((id, rec, events));
                }
                let deleted = (rng.below(5) == 0).then(|| moved[0].0.clone());
                done.runs_of_deleted += usize::from(deleted.is_some());
                if let Some(id) = &deleted {
                    let events = stored_events.remove(id).unwrap_or(0);
                    assert_eq!(store.delete_task(&known[id]).unwrap(), Some(events));
                    known.remove(id);
                }
                let runs: Vec<EventRun> = moved
                    .iter()
                    .map(|(_, rec, events)| EventRun {
                        task: rec,
                        events,
                        was_open: None,
                    })
                    .collect();
                let written = store.append_event_runs(&runs).unwrap();
                for ((id, rec, events), ok) in moved.iter().zip(written) {
                    assert_eq!(ok, deleted.as_ref() != Some(id), "step {step}: {id}");
                    if ok {
                        known.insert(id.clone(), rec.clone());
                        *stored_events.entry(id.clone()).or_default() +=
                            events.iter().filter(|(_, e)| e.is_some()).count();
                    }
                }
            }
            // A delete, of the record as it is or as it was.
            85..=94 if !existing.is_empty() => {
                done.deleted += 1;
                let id = rng.pick(&existing).clone();
                let rec = known[&id].clone();
                if rng.below(3) == 0 {
                    let mut stale = rec.clone();
                    stale.last_seq += 1;
                    assert_eq!(store.delete_task(&stale).unwrap(), None, "step {step}");
                } else {
                    let events = stored_events.remove(&id).unwrap_or(0);
                    assert_eq!(
                        store.delete_task(&rec).unwrap(),
                        Some(events),
                        "step {step}"
                    );
                    known.remove(&id);
                }
            }
            95..=96 => {
                done.reopened += 1;
                store = reopen(open, &dir, store);
            }
            _ => {}
        }
        check_indexes(&store, &known, step);
        for (id, n) in &stored_events {
            assert_eq!(
                store.event_bytes(id, 0).unwrap().len(),
                *n,
                "step {step}: {id}"
            );
        }
    }
    // The run did enough of everything to mean something (a new seed or mix must keep it so).
    assert!(known.len() >= 30, "{} tasks left", known.len());
    assert!(
        done.created >= 50
            && done.changed >= 50
            && done.runs >= 50
            && done.runs_of_deleted >= 5
            && done.deleted >= 20
            && done.reopened >= 3,
        "{done:?}"
    );
}

// --- the dashboard's sign-in links and sessions ---

/// A sign-in link of `user`, valid until `expires_at`, stored under `hash`.
fn link(hash: &str, user: &str, id: &str, expires_at: u64) -> WebSessionRecord {
    WebSessionRecord {
        hash: hash.into(),
        kind: WebSessionKind::Link,
        id: id.into(),
        user: user.into(),
        created_at: 100,
        expires_at,
        last_seen: 100,
        idle_secs: None,
        csrf: String::new(),
        client: String::new(),
    }
}

/// A session of `user` created and last seen at `at`, ending after `idle` seconds unused or at `expires_at`.
fn web_session(
    hash: &str,
    user: &str,
    id: &str,
    at: u64,
    expires_at: u64,
    idle: u64,
) -> WebSessionRecord {
    WebSessionRecord {
        hash: hash.into(),
        kind: WebSessionKind::Session,
        id: id.into(),
        user: user.into(),
        created_at: at,
        expires_at,
        last_seen: at,
        idle_secs: Some(idle),
        csrf: format!("csrf-of-{id}"),
        client: "Firefox on Linux".into(),
    }
}

fn web_ids(recs: &[WebSessionRecord]) -> Vec<&str> {
    recs.iter().map(|r| r.id.as_str()).collect()
}

fn web_sessions_round_trip_by_hash_and_by_user_and_survive_a_reopen(open: Open) {
    let (dir, store) = fresh(open);
    let l = link("h-link", "1", "i-link", 1_000);
    let s1 = web_session("h-s1", "1", "i-s1", 200, 10_000, 500);
    let s2 = web_session("h-s2", "1", "i-s2", 150, 10_000, 500);
    // A user whose id starts with the other's: their keys must not run together.
    let other = web_session("h-other", "12", "i-other", 100, 10_000, 500);
    for r in [&l, &s1, &s2, &other] {
        store.put_web_session(r).unwrap();
    }
    assert_eq!(store.web_session("h-s1", 300).unwrap(), Some(s1.clone()));
    assert_eq!(store.web_session("h-link", 300).unwrap(), Some(l.clone()));
    assert_eq!(store.web_session("h-none", 300).unwrap(), None);
    assert_eq!(
        store.web_session("i-s1", 300).unwrap(),
        None,
        "found by hash only"
    );
    assert_eq!(
        web_ids(&store.web_sessions_of("1", 300).unwrap()),
        ["i-link", "i-s2", "i-s1"],
        "oldest first, links too"
    );
    assert_eq!(
        web_ids(&store.web_sessions_of("12", 300).unwrap()),
        ["i-other"]
    );
    assert!(store.web_sessions_of("2", 300).unwrap().is_empty());
    // Stored again under the same hash, the newer record replaces the older, also in the list by user.
    let moved = WebSessionRecord {
        user: "2".into(),
        ..s2.clone()
    };
    store.put_web_session(&moved).unwrap();
    assert_eq!(
        web_ids(&store.web_sessions_of("1", 300).unwrap()),
        ["i-link", "i-s1"]
    );
    assert_eq!(
        store.web_sessions_of("2", 300).unwrap(),
        std::slice::from_ref(&moved)
    );
    let store = reopen(open, &dir, store);
    assert_eq!(store.web_session("h-s1", 300).unwrap(), Some(s1));
    assert_eq!(store.web_sessions_of("2", 300).unwrap(), [moved]);
    assert_eq!(store.web_sessions_of("12", 300).unwrap(), [other]);
}

fn a_sign_in_link_is_taken_once_and_only_as_a_link(open: Open) {
    let (_dir, store) = fresh(open);
    let l = link("h-link", "1", "i-link", 1_000);
    store.put_web_session(&l).unwrap();
    let s = web_session("h-s", "1", "i-s", 100, 10_000, 500);
    store.put_web_session(&s).unwrap();
    assert_eq!(
        store
            .take_web_session("h-s", WebSessionKind::Link, 200)
            .unwrap(),
        None,
        "a session is not spent as a link"
    );
    assert_eq!(store.web_session("h-s", 200).unwrap(), Some(s));
    assert_eq!(
        store
            .take_web_session("h-link", WebSessionKind::Link, 200)
            .unwrap(),
        Some(l.clone())
    );
    assert_eq!(
        store
            .take_web_session("h-link", WebSessionKind::Link, 200)
            .unwrap(),
        None
    );
    assert_eq!(store.web_session("h-link", 200).unwrap(), None);
    assert_eq!(web_ids(&store.web_sessions_of("1", 200).unwrap()), ["i-s"]);
    assert_eq!(
        store
            .take_web_session("h-none", WebSessionKind::Link, 200)
            .unwrap(),
        None
    );
    // An expired link is not taken, late or not.
    store.put_web_session(&l).unwrap();
    assert_eq!(
        store
            .take_web_session("h-link", WebSessionKind::Link, 1_000)
            .unwrap(),
        None
    );
    assert_eq!(
        store
            .take_web_session("h-link", WebSessionKind::Link, 5_000)
            .unwrap(),
        None
    );
}

/// Threads spending one link at once through several handles (nodes): exactly one gets it.
fn racing_takes_of_one_sign_in_link_exactly_one_wins(open: Open, another: Another) {
    let (dir, store) = fresh(open);
    let handles: Vec<SharedStore> = std::iter::once(store.clone())
        .chain((1..4).map(|_| another(dir.path(), &store)))
        .collect();
    for round in 0..5 {
        let hash = format!("h-{round}");
        store
            .put_web_session(&link(&hash, "1", &format!("i-{round}"), 1_000))
            .unwrap();
        let start = Arc::new(Barrier::new(8));
        let threads: Vec<_> = (0..8)
            .map(|n| {
                let (store, start, hash) = (handles[n % 4].clone(), start.clone(), hash.clone());
                std::thread::spawn(move || {
                    start.wait();
                    store
                        .take_web_session(&hash, WebSessionKind::Link, 200)
                        .expect("take")
                })
            })
            .collect();
        let taken: Vec<_> = threads
            .into_iter()
            .filter_map(|t| t.join().expect("a taking thread"))
            .collect();
        assert_eq!(taken.len(), 1, "round {round}: {taken:?}");
        assert_eq!(taken[0].hash, hash);
    }
    assert!(store.web_sessions_of("1", 200).unwrap().is_empty());
}

fn web_sessions_are_not_returned_once_ended(open: Open) {
    let (_dir, store) = fresh(open);
    store
        .put_web_session(&link("h-link", "1", "i-link", 1_000))
        .unwrap();
    // Ends at 1_000 absolute, or 50 seconds after its last use, whichever comes first.
    store
        .put_web_session(&web_session("h-s", "1", "i-s", 100, 1_000, 50))
        .unwrap();
    assert!(store.web_session("h-s", 149).unwrap().is_some());
    assert!(store.web_session("h-s", 150).unwrap().is_none(), "idle");
    assert_eq!(
        web_ids(&store.web_sessions_of("1", 150).unwrap()),
        ["i-link"]
    );
    assert!(store.web_session("h-link", 999).unwrap().is_some());
    assert!(
        store.web_session("h-link", 1_000).unwrap().is_none(),
        "expired"
    );
    assert!(store.web_sessions_of("1", 1_000).unwrap().is_empty());
    assert_eq!(
        store
            .take_web_session("h-s", WebSessionKind::Session, 150)
            .unwrap(),
        None
    );
    assert_eq!(
        store.touch_web_session("h-s", 150).unwrap(),
        None,
        "idle: not revived"
    );
    assert!(
        store.web_session("h-s", 149).unwrap().is_some(),
        "only ended, not removed"
    );
    // Used in time, the idle clock starts again, but never past the absolute end.
    assert!(store.touch_web_session("h-s", 149).unwrap().is_some());
    assert!(store.web_session("h-s", 198).unwrap().is_some());
    let mut t = 149;
    while t + 40 < 1_000 {
        t += 40;
        assert!(
            store.touch_web_session("h-s", t).unwrap().is_some(),
            "at {t}"
        );
    }
    assert!(store.web_session("h-s", 999).unwrap().is_some());
    assert!(store.web_session("h-s", 1_000).unwrap().is_none());
    assert_eq!(store.touch_web_session("h-s", 1_000).unwrap(), None);
}

fn touching_a_web_session_moves_it_forward_and_never_revives_it(open: Open) {
    let (_dir, store) = fresh(open);
    let s = web_session("h-s", "1", "i-s", 100, 10_000, 50);
    store.put_web_session(&s).unwrap();
    let touched = store.touch_web_session("h-s", 140).unwrap().expect("live");
    assert_eq!(touched.last_seen, 140);
    assert_eq!(
        WebSessionRecord {
            last_seen: 100,
            ..touched.clone()
        },
        s,
        "only last_seen changes"
    );
    assert_eq!(
        store.web_session("h-s", 140).unwrap(),
        Some(touched.clone())
    );
    // A node whose clock is behind does not move it back.
    assert_eq!(
        store
            .touch_web_session("h-s", 120)
            .unwrap()
            .unwrap()
            .last_seen,
        140
    );
    assert_eq!(
        store.web_session("h-s", 189).unwrap().unwrap().last_seen,
        140
    );
    // Deleted (signed out on another node), a touch does not write it back.
    assert!(store.delete_web_session("1", "i-s").unwrap());
    assert_eq!(store.touch_web_session("h-s", 150).unwrap(), None);
    assert_eq!(store.web_session("h-s", 150).unwrap(), None);
    assert!(store.web_sessions_of("1", 150).unwrap().is_empty());
    assert_eq!(store.touch_web_session("h-none", 150).unwrap(), None);
}

fn a_user_cannot_delete_another_users_session_by_its_id(open: Open) {
    let (_dir, store) = fresh(open);
    let mine = web_session("h-mine", "1", "shared-looking-id", 100, 10_000, 500);
    let theirs = web_session("h-theirs", "2", "their-id", 100, 10_000, 500);
    store.put_web_session(&mine).unwrap();
    store.put_web_session(&theirs).unwrap();
    assert!(!store.delete_web_session("1", "their-id").unwrap());
    assert!(!store.delete_web_session("12", "shared-looking-id").unwrap());
    assert!(
        !store.delete_web_session("1", "h-mine").unwrap(),
        "an id, not a hash"
    );
    assert_eq!(
        store.web_session("h-theirs", 200).unwrap(),
        Some(theirs.clone())
    );
    assert!(store.delete_web_session("1", "shared-looking-id").unwrap());
    assert!(!store.delete_web_session("1", "shared-looking-id").unwrap());
    assert_eq!(store.web_session("h-mine", 200).unwrap(), None);
    assert_eq!(store.web_sessions_of("2", 200).unwrap(), [theirs]);
}

fn deleting_all_of_a_users_sessions_touches_nobody_else(open: Open) {
    let (_dir, store) = fresh(open);
    for r in [
        web_session("h-a1", "1", "a1", 100, 10_000, 500),
        web_session("h-a2", "1", "a2", 100, 10_000, 500),
        // Ended already (idle): removed, not counted.
        web_session("h-a3", "1", "a3", 100, 10_000, 10),
        link("h-alink", "1", "alink", 1_000),
        web_session("h-b", "12", "b", 100, 10_000, 500),
        link("h-blink", "12", "blink", 1_000),
    ] {
        store.put_web_session(&r).unwrap();
    }
    assert_eq!(store.delete_web_sessions_of("1", 200).unwrap(), 2);
    assert!(store.web_sessions_of("1", 0).unwrap().is_empty());
    for hash in ["h-a1", "h-a2", "h-a3", "h-alink"] {
        assert_eq!(store.web_session(hash, 0).unwrap(), None, "{hash}");
    }
    assert_eq!(
        web_ids(&store.web_sessions_of("12", 200).unwrap()),
        ["b", "blink"]
    );
    assert_eq!(store.delete_web_sessions_of("1", 200).unwrap(), 0);
    assert_eq!(store.delete_web_sessions_of("nobody", 200).unwrap(), 0);
}

fn pruning_forgets_only_ended_web_sessions(open: Open) {
    let (_dir, store) = fresh(open);
    for r in [
        link("h-l1", "1", "l1", 300),
        link("h-l2", "1", "l2", 1_000),
        web_session("h-idle", "1", "idle", 100, 10_000, 50),
        web_session("h-busy", "2", "busy", 100, 10_000, 50),
        web_session("h-old", "2", "old", 100, 400, 1_000),
    ] {
        store.put_web_session(&r).unwrap();
    }
    store.touch_web_session("h-busy", 140).unwrap().unwrap();
    assert_eq!(store.prune_web_sessions(100).unwrap(), 0);
    // At 150: idle has ended; busy (used at 140) has not.
    assert_eq!(store.prune_web_sessions(150).unwrap(), 1);
    assert_eq!(store.web_session("h-idle", 0).unwrap(), None);
    assert!(store.web_session("h-busy", 150).unwrap().is_some());
    // At 400: l1 (300), old (400) and busy (190) have ended.
    assert_eq!(store.prune_web_sessions(400).unwrap(), 3);
    assert_eq!(web_ids(&store.web_sessions_of("1", 400).unwrap()), ["l2"]);
    assert!(
        store.web_sessions_of("2", 0).unwrap().is_empty(),
        "gone, not just ended"
    );
    assert_eq!(store.prune_web_sessions(400).unwrap(), 0);
}

/// Sign-in links and sessions are credentials that last days at most: `ct-relay migrate` leaves them behind.
fn web_sessions_are_not_exported(open: Open) {
    let (_dir, store) = fresh(open);
    store
        .put_web_session(&link("h-l", "1", "l", 1_000))
        .unwrap();
    store
        .put_web_session(&web_session("h-s", "1", "s", 100, 10_000, 500))
        .unwrap();
    assert!(export_all(&store).is_empty(), "{:?}", export_all(&store));
}

// --- the cluster ---

fn presence_epochs_grow_and_only_the_current_session_releases(open: Open) {
    let (dir, store) = fresh(open);
    assert_eq!(store.presence(&fp(1)).unwrap(), None);
    let first = store.claim_presence(&fp(1), "node-a").unwrap();
    let second = store.claim_presence(&fp(1), "node-b").unwrap();
    assert!(second.epoch > first.epoch, "{first:?} then {second:?}");
    assert_eq!(store.presence(&fp(1)).unwrap().as_ref(), Some(&second));
    // Another agent's epoch is greater still: epochs are never reused, whatever the agent.
    let other = store.claim_presence(&fp(2), "node-a").unwrap();
    assert!(other.epoch > second.epoch);
    let mut all = store.presences().unwrap();
    all.sort_by_key(|(f, _)| f.0);
    assert_eq!(all, vec![(fp(1), second.clone()), (fp(2), other.clone())]);
    // The replaced session going away must not end the newer one's presence.
    assert!(!store.release_presence(&fp(1), first.epoch).unwrap());
    assert_eq!(store.presence(&fp(1)).unwrap().as_ref(), Some(&second));
    let store = reopen(open, &dir, store);
    let third = store.claim_presence(&fp(1), "node-a").unwrap();
    assert!(third.epoch > other.epoch, "epochs grow across a reopen");
    assert!(store.release_presence(&fp(1), third.epoch).unwrap());
    assert_eq!(store.presence(&fp(1)).unwrap(), None);
    assert!(!store.release_presence(&fp(1), third.epoch).unwrap());
}

fn dispatched(rec: &TaskRecord) -> TaskRecord {
    let mut rec = rec.clone();
    rec.dispatched_at = Some(5_000);
    rec
}

// --- admission under the open-task limits ---

fn limits(open_per_user: usize, running_per_agent: usize, queued_per_agent: usize) -> TaskLimits {
    TaskLimits {
        open_per_user,
        running_per_agent,
        queued_per_agent,
    }
}

fn admission_checks_each_limit_and_writes_only_what_it_admits(open: Open) {
    let (dir, store) = fresh(open);
    let l = limits(2, 1, 1);
    // A person's open tasks, across agents; a refused task leaves neither the task nor its entry behind.
    assert_eq!(
        store.admit_task(&task("a", "1", 1, 1), None, &l).unwrap(),
        Admission::Admitted(None)
    );
    let Admission::Admitted(Some(e)) = store
        .admit_task(&task("b", "1", 2, 2), Some(&entry("9")), &l)
        .unwrap()
    else {
        panic!("admitted with its entry")
    };
    assert_eq!(e.seq, 1);
    assert_eq!(
        store
            .admit_task(&task("c", "1", 3, 3), Some(&entry("9")), &l)
            .unwrap(),
        Admission::TooManyTasks { open: 2 }
    );
    assert!(store.task("c").unwrap().is_none());
    assert_eq!(store.audit_len().unwrap(), 1);
    // An ended task no longer counts.
    store.put_task(&ended(task("a", "1", 1, 1), 10)).unwrap();
    assert_eq!(
        store.admit_task(&task("c", "1", 3, 3), None, &l).unwrap(),
        Admission::Admitted(None)
    );
    // An agent's queue: "b" waits on agent 2, which has a free slot, so nothing more may wait there...
    assert_eq!(
        store.admit_task(&task("d", "2", 2, 4), None, &l).unwrap(),
        Admission::QueueFull { queued: 1 }
    );
    // ... until it runs: then one may wait (every slot is taken), and no second one.
    store.put_task(&dispatched(&task("b", "1", 2, 2))).unwrap();
    assert_eq!(
        store.admit_task(&task("d", "2", 2, 4), None, &l).unwrap(),
        Admission::Admitted(None)
    );
    assert_eq!(
        store.admit_task(&task("e", "3", 2, 5), None, &l).unwrap(),
        Admission::QueueFull { queued: 1 }
    );
    // The person's limit is checked first.
    assert_eq!(
        store.admit_task(&task("e", "1", 2, 5), None, &l).unwrap(),
        Admission::TooManyTasks { open: 2 }
    );
    // A new task never replaces another with its id.
    let again = task("c", "4", 5, 6);
    let conflict = store.admit_task(&again, Some(&entry("9")), &l);
    assert!(
        matches!(conflict, Err(StoreError::Conflict)),
        "{conflict:?}"
    );
    assert_eq!(store.task("c").unwrap().unwrap().spec.requester.user, "1");
    assert_eq!(store.audit_len().unwrap(), 1);
    assert_eq!(store.open_tasks_of_user("4").unwrap(), 0);

    let store = reopen(open, &dir, store);
    assert_eq!(
        sorted_ids(&store.open_tasks(&fp(2)).unwrap()),
        ["b", "d"],
        "what was admitted survives a reopen"
    );
    assert_eq!(store.open_tasks_of_user("1").unwrap(), 2);
}

/// What a task on an agent counts as, running or queued, is the record's own reading
/// ([`TaskRecord::is_dispatched`]); each backend must read it the same way, including from a record written
/// before `dispatched_at` existed (running, with no dispatch time).
fn admission_counts_a_running_task_as_running_with_or_without_its_dispatch_time(open: Open) {
    for state in [TaskState::Running, TaskState::WaitingApproval] {
        let (_dir, store) = fresh(open);
        let l = limits(100, 1, 1);
        let mut old = task("old", "u", 1, 1);
        old.state = state;
        store.put_task(&old).unwrap();
        // Its one slot is taken, so a new task waits, and the queue holds one.
        assert_eq!(
            store.admit_task(&task("a", "v", 1, 2), None, &l).unwrap(),
            Admission::Admitted(None),
            "{state:?} without a dispatch time counts as running"
        );
        assert_eq!(
            store.admit_task(&task("b", "v", 1, 3), None, &l).unwrap(),
            Admission::QueueFull { queued: 1 }
        );
        // A queued task that was handed to the agent but has not started counts as running too.
        store.put_task(&dispatched(&task("a", "v", 1, 2))).unwrap();
        store.put_task(&ended(old, 10)).unwrap();
        assert_eq!(
            store.admit_task(&task("b", "v", 1, 3), None, &l).unwrap(),
            Admission::Admitted(None)
        );
        assert_eq!(
            store.admit_task(&task("c", "v", 1, 4), None, &l).unwrap(),
            Admission::QueueFull { queued: 1 }
        );
    }
}

/// Admits 6 tasks from each of 8 threads at once, spread over 4 handles on `store` (on PostgreSQL, as many
/// nodes), each task made by `make(thread, i)` and every other one with an audit entry. Each attempt's
/// outcome.
fn race_admissions(
    (dir, store): (&TempDir, &SharedStore),
    another: Another,
    l: TaskLimits,
    make: fn(usize, usize) -> TaskRecord,
) -> Vec<Admission> {
    let (handles, threads, per_thread) = (4, 8, 6);
    let stores: Vec<SharedStore> = std::iter::once(store.clone())
        .chain((1..handles).map(|_| another(dir.path(), store)))
        .collect();
    let start = Arc::new(Barrier::new(threads));
    let workers: Vec<_> = (0..threads)
        .map(|n| {
            let (store, start) = (stores[n % handles].clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                (0..per_thread)
                    .map(|i| {
                        let audited = (n + i) % 2 == 0;
                        let e = entry("owner");
                        store
                            .admit_task(&make(n, i), audited.then_some(&e), &l)
                            .expect("admission")
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    workers
        .into_iter()
        .flat_map(|w| w.join().expect("an admitting thread"))
        .collect()
}

/// Several people answering the questions of one AskUserQuestion at once, through several handles (nodes):
/// every answer lands, and the answer that completes the set sees all of them (so exactly the last one sends
/// the decision; with a lost update none would).
fn racing_answers_on_several_handles_all_land(open: Open, another: Another) {
    let (dir, store) = fresh(open);
    store.put_task(&task("t1", "u1", 1, 1)).unwrap();
    let (handles, questions) = (4, 16u8);
    let stores: Vec<SharedStore> = std::iter::once(store.clone())
        .chain((1..handles).map(|_| another(dir.path(), &store)))
        .collect();
    let start = Arc::new(Barrier::new(questions as usize));
    let workers: Vec<_> = (0..questions)
        .map(|q| {
            let (store, start) = (stores[q as usize % handles].clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                store
                    .add_answer("t1", "q", q, &format!("a{q}"))
                    .unwrap()
                    .len()
            })
        })
        .collect();
    let seen: Vec<usize> = workers.into_iter().map(|w| w.join().unwrap()).collect();
    assert_eq!(
        seen.iter().filter(|n| **n == questions as usize).count(),
        1,
        "exactly one answer completes the set: {seen:?}"
    );
    let all = store.add_answer("t1", "q", 0, "a0").unwrap();
    assert_eq!(all.len(), questions as usize);
}

/// Many submissions for one person at once, through several handles (nodes), each to another agent, so only
/// the person's limit holds them back: exactly that many are admitted, and every other is told the limit.
fn racing_admissions_never_take_a_person_past_their_limit(open: Open, another: Another) {
    let (dir, store) = fresh(open);
    let outcomes = race_admissions((&dir, &store), another, limits(5, 100, 100), |n, i| {
        task(&format!("t{n}-{i}"), "u", (n * 6 + i) as u8 + 1, 1)
    });
    let admitted: Vec<_> = outcomes
        .iter()
        .filter_map(|o| match o {
            Admission::Admitted(e) => Some(e),
            _ => None,
        })
        .collect();
    assert_eq!(admitted.len(), 5, "{outcomes:?}");
    assert!(
        outcomes.iter().all(|o| matches!(
            o,
            Admission::Admitted(_) | Admission::TooManyTasks { open: 5 }
        )),
        "{outcomes:?}"
    );
    assert_eq!(store.open_tasks_of_user("u").unwrap(), 5);
    // Only admitted tasks wrote their entries, numbered without gaps.
    let entries = admitted.iter().filter(|e| e.is_some()).count();
    assert_eq!(store.audit_len().unwrap(), entries);
    assert_eq!(
        seqs(&all_audit(&store)),
        (1..=entries as u64).rev().collect::<Vec<_>>()
    );
}

/// Many people submitting to one agent at once, through several handles (nodes): its queue fills to the
/// limit and no further. One task runs already, so every new one has to wait.
fn racing_admissions_never_overfill_an_agents_queue(open: Open, another: Another) {
    let (dir, store) = fresh(open);
    store
        .put_task(&dispatched(&task("running", "u", 1, 0)))
        .unwrap();
    let outcomes = race_admissions((&dir, &store), another, limits(100, 1, 3), |n, i| {
        task(&format!("t{n}-{i}"), &format!("u{n}"), 1, 1)
    });
    let admitted = outcomes
        .iter()
        .filter(|o| matches!(o, Admission::Admitted(_)))
        .count();
    assert_eq!(admitted, 3, "the queue is full, not past it: {outcomes:?}");
    let open_tasks = store.open_tasks(&fp(1)).unwrap();
    assert_eq!(open_tasks.len(), 4);
    assert_eq!(open_tasks.iter().filter(|t| t.is_dispatched()).count(), 1);
    assert!(
        outcomes.iter().all(|o| matches!(
            o,
            Admission::Admitted(_) | Admission::QueueFull { queued: 3 }
        )),
        "{outcomes:?}"
    );
}

fn a_task_is_dispatched_once_and_only_under_the_current_epoch(open: Open) {
    let (_dir, store) = fresh(open);
    store.put_agent(&agent(1, "u")).unwrap();
    let t = task("t1", "u", 1, 1);
    store.put_task(&t).unwrap();
    // No session holds the agent: nobody may dispatch.
    assert!(!store.dispatch_task(&dispatched(&t), 1).unwrap());
    let old = store.claim_presence(&fp(1), "node-a").unwrap();
    let new = store.claim_presence(&fp(1), "node-b").unwrap();
    // The replaced session cannot take it.
    assert!(!store.dispatch_task(&dispatched(&t), old.epoch).unwrap());
    assert!(store.task("t1").unwrap().unwrap().dispatched_at.is_none());
    // The current one can, once.
    assert!(store.dispatch_task(&dispatched(&t), new.epoch).unwrap());
    assert!(!store.dispatch_task(&dispatched(&t), new.epoch).unwrap());
    let stored = store.task("t1").unwrap().unwrap();
    assert_eq!(stored.dispatched_at, Some(5_000));
    assert_eq!(store.open_tasks(&fp(1)).unwrap().len(), 1);
    // An ended task is never dispatched, and a missing one neither.
    let mut ended = task("t2", "u", 1, 2);
    ended.state = TaskState::Cancelled;
    store.put_task(&ended).unwrap();
    assert!(!store.dispatch_task(&dispatched(&ended), new.epoch).unwrap());
    assert!(!store
        .dispatch_task(&dispatched(&task("t3", "u", 1, 3)), new.epoch)
        .unwrap());
    assert!(store.task("t3").unwrap().is_none());
}

fn a_queued_task_ends_only_if_nobody_dispatched_it(open: Open) {
    let (_dir, store) = fresh(open);
    store.put_agent(&agent(1, "u")).unwrap();
    let t = task("t1", "u", 1, 1);
    store.put_task(&t).unwrap();
    let epoch = store.claim_presence(&fp(1), "node-a").unwrap().epoch;
    assert!(store.dispatch_task(&dispatched(&t), epoch).unwrap());
    let mut cancelled = t.clone();
    cancelled.state = TaskState::Cancelled;
    assert!(
        !store.finish_queued(&cancelled).unwrap(),
        "the dispatch won"
    );
    assert_eq!(store.task("t1").unwrap().unwrap().state, TaskState::Queued);
    let q = task("t2", "u", 1, 2);
    store.put_task(&q).unwrap();
    let mut cancelled = q.clone();
    cancelled.state = TaskState::Cancelled;
    assert!(store.finish_queued(&cancelled).unwrap());
    assert_eq!(
        store.task("t2").unwrap().unwrap().state,
        TaskState::Cancelled
    );
    assert_eq!(store.open_tasks(&fp(1)).unwrap().len(), 1, "indexes follow");
    assert!(!store.dispatch_task(&dispatched(&q), epoch).unwrap());
}

fn leases_are_exclusive_until_released_or_expired(open: Open) {
    let (_dir, store) = fresh(open);
    let long = std::time::Duration::from_secs(60);
    assert!(store.lease("gateway", "a", long).unwrap());
    assert!(!store.lease("gateway", "b", long).unwrap());
    assert!(
        store.lease("gateway", "a", long).unwrap(),
        "the holder renews"
    );
    assert!(
        store.lease("other", "b", long).unwrap(),
        "leases are independent"
    );
    store.release_lease("gateway", "b").unwrap();
    assert!(
        !store.lease("gateway", "b", long).unwrap(),
        "only the holder releases"
    );
    store.release_lease("gateway", "a").unwrap();
    assert!(store.lease("gateway", "b", long).unwrap());
    // An expired lease is free for anyone.
    assert!(store
        .lease("short", "a", std::time::Duration::from_millis(50))
        .unwrap());
    std::thread::sleep(std::time::Duration::from_millis(120));
    assert!(store.lease("short", "b", long).unwrap());
    assert!(!store.lease("short", "a", long).unwrap());
}

fn token_buckets_allow_a_burst_then_refill(open: Open) {
    let (_dir, store) = fresh(open);
    let hour = std::time::Duration::from_secs(3600);
    let taken = (0..5)
        .filter(|_| store.take_token("u1", 3, hour).unwrap())
        .count();
    assert_eq!(taken, 3, "a burst of three, then none for an hour");
    assert!(
        store.take_token("u2", 3, hour).unwrap(),
        "buckets are independent"
    );
    let fast = std::time::Duration::from_millis(20);
    while store.take_token("fast", 2, fast).unwrap() {}
    std::thread::sleep(std::time::Duration::from_millis(60));
    assert!(store.take_token("fast", 2, fast).unwrap(), "refilled");
    // Idle buckets are forgotten (they would be full again); a used one is kept.
    assert_eq!(store.prune_buckets(hour).unwrap(), 0);
    std::thread::sleep(std::time::Duration::from_millis(30));
    assert!(store.take_token("u2", 3, hour).unwrap());
    assert_eq!(
        store
            .prune_buckets(std::time::Duration::from_millis(20))
            .unwrap(),
        2,
        "u1 and fast were idle; u2 was just used"
    );
    assert!(
        store.take_token("u1", 3, hour).unwrap(),
        "u1 starts full again"
    );
}

fn the_first_proposed_secret_wins_also_across_a_reopen(open: Open) {
    let (dir, store) = fresh(open);
    assert_eq!(
        store.shared_secret("relay-key", b"first").unwrap(),
        b"first"
    );
    assert_eq!(
        store.shared_secret("relay-key", b"second").unwrap(),
        b"first"
    );
    assert_eq!(store.shared_secret("other", b"x").unwrap(), b"x");
    let store = reopen(open, &dir, store);
    assert_eq!(
        store.shared_secret("relay-key", b"third").unwrap(),
        b"first"
    );
}

fn node_heartbeats_are_listed_and_removed(open: Open) {
    let (_dir, store) = fresh(open);
    let node = |id: &str, agents| NodeRecord {
        id: id.into(),
        public_addrs: vec![format!("{id}.example:7443")],
        version: "1".into(),
        started_at: 1,
        seen_at: 2,
        agents,
        draining: false,
    };
    store.put_node(&node("a", 1)).unwrap();
    store.put_node(&node("b", 2)).unwrap();
    store.put_node(&node("a", 3)).unwrap();
    let mut nodes = store.nodes().unwrap();
    nodes.sort_by(|x, y| x.id.cmp(&y.id));
    assert_eq!(nodes, vec![node("a", 3), node("b", 2)]);
    assert!(store.remove_node("a").unwrap());
    assert!(!store.remove_node("a").unwrap());
    assert_eq!(store.nodes().unwrap(), vec![node("b", 2)]);
}

// --- moving between backends ---

fn export_all(store: &SharedStore) -> Vec<String> {
    let mut out = Vec::new();
    store
        .export(&mut |r| {
            out.push(format!("{r:?}"));
            Ok(())
        })
        .unwrap();
    out.sort();
    out
}

fn an_export_imported_into_an_empty_store_is_the_same_store(open: Open) {
    let (_a, from) = fresh(open);
    from.put_agent(&agent(1, "u1")).unwrap();
    from.put_agent(&agent(2, "u2")).unwrap();
    from.put_pair_code(&code("c1", "u1", 9_999)).unwrap();
    from.put_user_audited(
        "u1",
        &UserRecord {
            default_agent: Some(fp(1)),
            quiet: true,
            pool: Some("gpu".into()),
            worker: Some(fp(2)),
            left_behind: None,
        },
        &entry("u1"),
    )
    .unwrap();
    from.put_share_audited(&share("u1", "u2", ShareLevel::Trusted), &|_| entry("u1"))
        .unwrap();
    let mut t1 = task("t1", "u1", 1, 1);
    from.put_task(&t1).unwrap();
    t1.last_seq = 2;
    t1.output_bytes = 7;
    from.append_event_runs(&[EventRun {
        task: &t1,
        events: &[(1, Some(b"{\"a\":1}")), (2, None)],
        was_open: None,
    }])
    .unwrap();
    let mut t2 = task("t2", "u2", 2, 2);
    t2.state = TaskState::Done;
    from.put_task(&t2).unwrap();
    from.append_audit(&entry("u2")).unwrap();
    from.put_thread_mark("t1", b"{\"thread\":5}").unwrap();
    from.put_task_thread("t2", 77).unwrap();
    from.put_thread_chain(77, "t2", b"{\"fresh\":true}")
        .unwrap();
    from.shared_secret("relay_key", b"k").unwrap();
    from.put_pool_audited(&pool("gpu", PoolAccess::Everyone), &entry("pool:gpu"))
        .unwrap();
    let exported = {
        let mut all = Vec::new();
        from.export(&mut |r| {
            all.push(r);
            Ok(())
        })
        .unwrap();
        all
    };
    assert!(exported
        .iter()
        .any(|r| matches!(r, Exported::Task(t, e) if t.spec.task == "t1" && e.len() == 1)));
    let (_b, to) = fresh(open);
    to.import(&exported).unwrap();
    assert_eq!(export_all(&to), export_all(&from));
    // What the indexes answer, too: imported records are found the way new ones are.
    assert_eq!(to.open_tasks(&fp(1)).unwrap(), vec![t1.clone()]);
    assert_eq!(to.open_tasks_of_user("u1").unwrap(), 1);
    assert_eq!(to.stored_bytes_of_user("u1").unwrap(), 7);
    assert_eq!(to.shares_to("u2").unwrap().len(), 1);
    assert_eq!(to.agents_of("u2").unwrap().len(), 1);
    assert_eq!(to.audit_of_owner("u1", None, 10).unwrap().len(), 2);
    // Pools and the index of their users come along.
    assert_eq!(to.pools().unwrap(), from.pools().unwrap());
    assert_eq!(
        to.pool_users().unwrap(),
        [("u1".to_string(), from.user("u1").unwrap())]
    );
    // The log goes on after the imported numbers, without reusing one.
    let next = to.append_audit(&entry("u1")).unwrap();
    assert_eq!(next.seq, 5, "four entries were imported");
    assert_eq!(to.shared_secret("relay_key", b"other").unwrap(), b"k");
    assert_eq!(
        to.task_threads(&["t2".to_string()]).unwrap(),
        [("t2".to_string(), 77)]
    );
}
