//! Storage: the relay's records and the operations it performs on them, behind one interface.
//!
//! [`Store`] is written at the level of the relay's own operations (create a task with its audit entry, append
//! a run of events, list what is open on an agent, redeem a pairing code with compare-and-swap), not as a
//! key-value API, so a SQL backend implements each one as a statement or a short transaction as naturally as
//! [`sled`] (embedded, the default) does with its trees: [`postgres`] does, for relays that run as several
//! nodes of a cluster. The records ([`records`]) are plain data; this module imports nothing else of the relay.
//!
//! Backends are synchronous on purpose. The relay core calls them from its own thread, and
//! read-only queries from the blocking pool, never from an async runtime worker; a backend may block on disk or
//! on a network round trip without holding anything else up. Every backend passes the same contract tests
//! (`relay/tests/store.rs`).
//!
//! Durability: writes are visible at once and durable after the next [`Store::flush`]. The relay's group commit
//! calls `flush` from its own thread and releases every write made before it, so callers wait
//! for the disk without an fsync each.

use std::sync::Arc;

pub use ct_protocol::files::Attachment;
use ct_protocol::Fingerprint;

pub mod postgres;
pub mod records;
pub mod sled;

pub use records::*;

/// Storage failures. The relay reports these to peers as "unavailable", never as their fault.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store: {0}")]
    Sled(#[from] ::sled::Error),
    #[error("store: corrupt record: {0}")]
    Corrupt(#[from] serde_json::Error),
    #[error("store: the record changed while it was being updated")]
    Conflict,
    #[error(
        "store: {0} is in use by another ct-relay: stop that one, or give this one its own --data-dir"
    )]
    InUse(String),
    /// The PostgreSQL client's errors: the server unreachable or gone, a statement refused. The next call
    /// connects afresh, so the store recovers by itself when the server is back. Displayed with its causes,
    /// where the words an operator can act on are ("Connection refused", the server's own message).
    #[error("store: PostgreSQL: {}", with_causes(.0))]
    Postgres(::postgres::Error),
    /// PostgreSQL crashed after this node wrote something that no flush had made durable yet: it may be lost.
    /// Returned once, by the flush that would have covered those writes, so nothing is acknowledged on the
    /// strength of them; later flushes cover later writes.
    ///
    /// `upto` is the [`Store::write_mark`] at which the store met the server's new run: writes up to it ran on
    /// the run that crashed (those no flush covered may be lost), later ones on the new run, which a flush
    /// makes durable as usual.
    #[error(
        "store: PostgreSQL restarted after a crash, before this node's last writes were flushed, and they may \
         be lost: what waited for them fails, and agents reconnect and send again whatever was not acknowledged"
    )]
    WritesLost { upto: u64 },
    /// The database URL cannot be used as given (an unknown option, a TLS setting that cannot be honoured).
    #[error("store: {0}")]
    Config(String),
    /// The database's schema is newer than this binary: a newer ct-relay migrated it.
    #[error(
        "store: the database was migrated by a newer ct-relay (schema version {found}, {name:?}; this ct-relay \
         knows up to {known}): upgrade this node to the version the other nodes run"
    )]
    SchemaTooNew {
        found: i32,
        name: String,
        known: i32,
    },
    /// The database's schema is not one this binary made.
    #[error("store: {0}")]
    Schema(String),
}

impl From<::postgres::Error> for StoreError {
    fn from(e: ::postgres::Error) -> Self {
        Self::Postgres(e)
    }
}

/// An error and its causes in one line. The client's own message is only the kind of failure ("db error",
/// "error connecting to server"); what happened is in its cause. Not given as the variant's `source`, so that
/// a log that prints the chain does not print it twice.
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// The store as the relay holds it: shared by the core's thread, the group commit and read-only queries.
pub type SharedStore = Arc<dyn Store>;

/// One task's run of events, written with the task's new record (see [`Store::append_event_runs`]).
#[derive(Debug, Clone, Copy)]
pub struct EventRun<'a> {
    /// The task's record after the run (its `last_seq` is the run's last event).
    pub task: &'a TaskRecord,
    /// Sequence number and stored bytes of each event; `None` for an event dropped under the output cap,
    /// which moves the record on without being stored.
    pub events: &'a [(u64, Option<&'a [u8]>)],
    /// Whether the task was open before the run, when the caller knows: a hint for a backend that would
    /// otherwise read it to decide whether the open-task indexes change (sled keeps its own record of it).
    pub was_open: Option<bool>,
}

/// The limits a new task is admitted under (see [`Store::admit_task`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskLimits {
    /// Tasks one person may have open (queued or running) across all agents.
    pub open_per_user: usize,
    /// Tasks one agent runs at once: a new task has to wait in its queue only when they are all taken, or
    /// when others wait already.
    pub running_per_agent: usize,
    /// Tasks that may wait in one agent's queue.
    pub queued_per_agent: usize,
}

impl TaskLimits {
    /// Which limit refuses one more task for a person with `open_of_user` open tasks, on an agent whose open
    /// tasks are `agent_open`; `None` when it may be admitted. The person's limit is checked first.
    /// PostgreSQL decides the same in `ct_admit_task` (migration 9), next to the data; the store contract
    /// suite holds both to the same cases.
    pub fn refuses(&self, open_of_user: usize, agent_open: &[TaskRecord]) -> Option<Admission> {
        if open_of_user >= self.open_per_user {
            return Some(Admission::TooManyTasks { open: open_of_user });
        }
        let running = agent_open.iter().filter(|t| t.is_dispatched()).count();
        let queued = agent_open.len() - running;
        let must_wait = queued > 0 || running >= self.running_per_agent;
        (must_wait && queued >= self.queued_per_agent).then_some(Admission::QueueFull { queued })
    }
}

/// What [`Store::admit_task`] did with a new task.
#[derive(Debug, Clone, PartialEq)]
pub enum Admission {
    /// Stored, with its audit entry as numbered when one was given (boxed: the refusals are small).
    Admitted(Option<Box<AuditEntry>>),
    /// Not stored: its requester has `open` tasks open already, the limit or more.
    TooManyTasks { open: usize },
    /// Not stored: its agent has no free slot and `queued` tasks wait in its queue already, the limit or more.
    QueueFull { queued: usize },
}

/// What the relay keeps, and every operation it performs on it.
///
/// Each method is one atomic operation: it happens entirely or not at all, also across a crash. Methods that
/// write an [`AuditEntry`] write it in the same operation as the change it records, and give it its sequence
/// number there (numbers follow commit order, without gaps).
pub trait Store: Send + Sync + std::fmt::Debug + 'static {
    /// Makes every write so far durable.
    fn flush(&self) -> Result<()>;
    /// A mark for the writes begun so far through this handle (a count that only grows), for telling which
    /// of them a crash may have lost ([`StoreError::WritesLost`]). A backend that never reports lost writes
    /// may leave it at 0.
    fn write_mark(&self) -> u64 {
        0
    }
    /// A number greater than every one handed out before, also across restarts (queue and mint order).
    fn next_order(&self) -> Result<u64>;

    // --- agents ---

    fn agent(&self, fp: &Fingerprint) -> Result<Option<AgentRecord>>;
    fn put_agent(&self, rec: &AgentRecord) -> Result<()>;
    /// Every agent `owner` paired, revoked ones included.
    fn agents_of(&self, owner: &str) -> Result<Vec<AgentRecord>>;
    /// Every agent the relay knows (operators' lists; pairing checks names through [`agents_of`](Self::agents_of)).
    fn agents(&self) -> Result<Vec<AgentRecord>>;
    /// Changes one agent record in place; a concurrent change is retried rather than lost. `None` when there
    /// is no such agent.
    fn update_agent(
        &self,
        fp: &Fingerprint,
        change: &mut dyn FnMut(&mut AgentRecord),
    ) -> Result<Option<AgentRecord>>;
    /// Redeems a pairing code: marks it `used` only if it is still exactly `code` (else
    /// [`StoreError::Conflict`]: two agents can never redeem one code), and stores the agent and the entry.
    fn pair_agent_audited(
        &self,
        code: &PairCodeRecord,
        used: &PairCodeRecord,
        agent: &AgentRecord,
        entry: &AuditEntry,
    ) -> Result<AuditEntry>;
    /// Marks an agent revoked at `t` (an earlier revocation time is kept) with its entry. `None` when there is
    /// no such agent.
    fn revoke_agent_audited(
        &self,
        fp: &Fingerprint,
        t: u64,
        entry: &AuditEntry,
    ) -> Result<Option<(AgentRecord, AuditEntry)>>;

    // --- pairing codes ---

    fn pair_code(&self, id: &str) -> Result<Option<PairCodeRecord>>;
    fn put_pair_code(&self, rec: &PairCodeRecord) -> Result<()>;
    /// Replaces `old` with `new` only if the stored record is still exactly `old`; else
    /// [`StoreError::Conflict`].
    fn swap_pair_code(&self, old: &PairCodeRecord, new: &PairCodeRecord) -> Result<()>;
    /// Every code minted for `owner` that is still remembered.
    fn pair_codes_of(&self, owner: &str) -> Result<Vec<PairCodeRecord>>;
    /// Removes codes that expired before `cutoff`; returns how many.
    fn prune_pair_codes(&self, cutoff: u64) -> Result<usize>;

    // --- tasks ---

    fn task(&self, id: &str) -> Result<Option<TaskRecord>>;
    /// Stores a new or changed task record (and keeps every index of tasks in step).
    fn put_task(&self, rec: &TaskRecord) -> Result<()>;
    /// Stores a task record with an audit entry: a task the log must show is not written without it.
    fn put_task_audited(&self, rec: &TaskRecord, entry: &AuditEntry) -> Result<AuditEntry>;
    /// Stores a new task, with its audit entry when `entry` is given, only if `limits` still allow it: its
    /// requester's open tasks and its agent's queue are counted and the task written in one operation that
    /// no other admission, through any handle or on any node, can interleave with, so concurrent submissions
    /// never take a person or an agent past a limit. (Tasks that end or are dispatched meanwhile only lower
    /// the counts.) A task with the same id already stored is a [`StoreError::Conflict`], and nothing is
    /// written: a new task never overwrites another.
    fn admit_task(
        &self,
        rec: &TaskRecord,
        entry: Option<&AuditEntry>,
        limits: &TaskLimits,
    ) -> Result<Admission>;
    /// Tasks on one agent that have not ended, in queue order (oldest first).
    fn open_tasks(&self, agent: &Fingerprint) -> Result<Vec<TaskRecord>>;
    /// How many tasks `user` asked for that have not ended, across all agents.
    fn open_tasks_of_user(&self, user: &str) -> Result<usize>;
    /// Bytes of events stored for the tasks `user` asked for (the sum of their `output_bytes`).
    fn stored_bytes_of_user(&self, user: &str) -> Result<u64>;
    /// The most recent tasks `user` asked for or that ran on one of `agents`, newest (highest `order`) first,
    /// at most `limit`; each task once.
    fn recent_tasks(
        &self,
        user: &str,
        agents: &[Fingerprint],
        limit: usize,
    ) -> Result<Vec<TaskRecord>>;
    /// Tasks on `agent` whose Claude Code session is `session`.
    fn tasks_with_session(&self, agent: &Fingerprint, session: &str) -> Result<Vec<TaskRecord>>;
    /// Final tasks that ended before `cutoff` (by `updated_at`), at most `limit`, oldest first, after the
    /// task `after` in that order (a cursor for the next batch).
    fn ended_before(
        &self,
        cutoff: u64,
        limit: usize,
        after: Option<&TaskRecord>,
    ) -> Result<Vec<TaskRecord>>;
    /// Deletes a task and its events if its record is still exactly `rec`. The number of events deleted, or
    /// `None` when the record changed meanwhile.
    fn delete_task(&self, rec: &TaskRecord) -> Result<Option<usize>>;
    /// Writes several tasks' runs of events, each with its task's new record, in one operation. A run whose
    /// task no longer exists (deleted by retention) is not written, and is `false` in the result; the others
    /// are written.
    fn append_event_runs(&self, runs: &[EventRun<'_>]) -> Result<Vec<bool>>;
    /// [`append_event_runs`](Self::append_event_runs), where a run with an `expected` record (per run: the
    /// task's stored JSON as the caller last wrote it; `None`: no condition) is written only if its task's
    /// stored record is still exactly that, and is `false` otherwise, like a task deleted meanwhile. Runs of
    /// one task in one call are judged by the first one's. For the nodes of a cluster, where another node may
    /// write a record between two of this node's writes; a store only one relay writes (sled) has nothing to
    /// check, so the default ignores the condition.
    fn append_event_runs_expecting(
        &self,
        runs: &[EventRun<'_>],
        expected: &[Option<&[u8]>],
    ) -> Result<Vec<bool>> {
        let _ = expected;
        self.append_event_runs(runs)
    }
    /// A task's stored events after `after`, in order, as stored bytes.
    fn event_bytes(&self, task: &str, after: u64) -> Result<Vec<(u64, Vec<u8>)>>;

    // --- files attached to tasks ---

    /// Keeps the files attached to a queued task (replacing any kept before), until the agent was sent them
    /// or the task is deleted ([`delete_task`](Self::delete_task) deletes them too).
    fn put_task_files(&self, task: &str, files: &[Attachment]) -> Result<()>;
    /// A task's files, in the order they were attached; none when none are kept.
    fn task_files(&self, task: &str) -> Result<Vec<Attachment>>;
    /// Forgets a task's files (after they went to the agent).
    fn delete_task_files(&self, task: &str) -> Result<()>;

    // --- the Discord front end's thread marks (its own JSON) ---

    fn put_thread_mark(&self, task: &str, mark: &[u8]) -> Result<()>;
    fn delete_thread_mark(&self, task: &str) -> Result<()>;
    fn thread_mark_bytes(&self) -> Result<Vec<(String, Vec<u8>)>>;
    /// One task's thread mark, if it has one.
    fn thread_mark(&self, task: &str) -> Result<Option<Vec<u8>>>;
    /// Remembers the Discord thread a task's output went to, for as long as the task is kept (thread marks
    /// last only while a follower runs; a task's history links its thread long after). Written again with the
    /// same or another thread, the last one is kept. Deleted with the task.
    fn put_task_thread(&self, task: &str, thread: u64) -> Result<()>;
    /// The threads of those of `tasks` that have one, in no particular order.
    fn task_threads(&self, tasks: &[String]) -> Result<Vec<(String, u64)>>;
    /// Keeps what a Discord thread's chain of tasks is at (the bot's own JSON), replacing what was kept for
    /// `thread`. Every node of a cluster answers the thread's commands, so this lives in the shared store, not
    /// in a node's memory. Deleted with `task`, the chain's current task; nothing is kept for a task that is
    /// not stored.
    fn put_thread_chain(&self, thread: u64, task: &str, chain: &[u8]) -> Result<()>;
    /// What [`put_thread_chain`](Self::put_thread_chain) last kept for `thread`.
    fn thread_chain(&self, thread: u64) -> Result<Option<Vec<u8>>>;
    /// Adds `answer` to question `question` of an open AskUserQuestion (`approval` of `task`), replacing an
    /// earlier answer to that question, and returns every answer given so far. One atomic step: two people
    /// answering two questions at once on two nodes each see the other's answer or are seen by it, so the
    /// one who completes the set knows it. Deleted with the task; nothing is kept for a task that is not
    /// stored (just this answer is returned).
    fn add_answer(
        &self,
        task: &str,
        approval: &str,
        question: u8,
        answer: &str,
    ) -> Result<std::collections::BTreeMap<u8, String>>;

    // --- shares and users ---

    fn share(&self, owner: &str, grantee: &str) -> Result<Option<ShareRecord>>;
    /// Stores a share with an entry made from the share as it was before (if any), read in the same
    /// operation, so the log says exactly what changed.
    fn put_share_audited(
        &self,
        rec: &ShareRecord,
        entry: &dyn Fn(Option<&ShareRecord>) -> AuditEntry,
    ) -> Result<(Option<ShareRecord>, AuditEntry)>;
    /// Removes a share with its entry. `None` (and nothing written) when there was none.
    fn remove_share_audited(
        &self,
        owner: &str,
        grantee: &str,
        entry: &dyn Fn(&ShareRecord) -> AuditEntry,
    ) -> Result<Option<(ShareRecord, AuditEntry)>>;
    /// Everyone `owner` shares with.
    fn shares_of(&self, owner: &str) -> Result<Vec<ShareRecord>>;
    /// Everyone who shares with `grantee`.
    fn shares_to(&self, grantee: &str) -> Result<Vec<ShareRecord>>;
    /// A user's settings (the defaults when none were stored).
    fn user(&self, id: &str) -> Result<UserRecord>;
    fn put_user_audited(
        &self,
        id: &str,
        rec: &UserRecord,
        entry: &AuditEntry,
    ) -> Result<AuditEntry>;

    // --- worker pools ---

    /// The pool `name`, if the operator made one.
    fn pool(&self, name: &str) -> Result<Option<PoolRecord>>;
    /// Every pool, by name.
    fn pools(&self) -> Result<Vec<PoolRecord>>;
    /// Creates or replaces a pool with its entry.
    fn put_pool_audited(&self, rec: &PoolRecord, entry: &AuditEntry) -> Result<AuditEntry>;
    /// Every user whose record says anything about pools ([`UserRecord::in_pools`]: a mode, an assignment),
    /// by id: what assignment counts load from and what the operator's pool list shows. Read through an index,
    /// not a pass over every user.
    fn pool_users(&self) -> Result<Vec<(String, UserRecord)>>;

    // --- the audit log ---

    /// Appends one entry on its own.
    fn append_audit(&self, entry: &AuditEntry) -> Result<AuditEntry>;
    /// Entries newest first, below `before`, that `keep` accepts, at most `limit` (operators' filters).
    fn audit_where(
        &self,
        before: Option<u64>,
        limit: usize,
        keep: &mut dyn FnMut(&AuditEntry) -> bool,
    ) -> Result<Vec<AuditEntry>>;
    /// The entries concerning `owner`, newest first, below `before`, at most `limit`, read through an index.
    fn audit_of_owner(
        &self,
        owner: &str,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<AuditEntry>>;
    /// Deletes entries written before `cutoff`; returns how many.
    fn prune_audit(&self, cutoff: u64) -> Result<usize>;
    /// Entries in the log.
    fn audit_len(&self) -> Result<usize>;

    // --- the dashboard's sign-in links and sessions ---
    //
    // In the store, not in a node's memory, so a browser signed in through one node is signed in on every node
    // of a cluster, and signing out on one ends the session on all. Each is found by the hash of its secret
    // (see [`WebSessionRecord`]); none is returned once it is no longer valid at the `now` a call gives
    // ([`WebSessionRecord::live_at`]), though it stays stored until pruned.

    /// Stores a link or session (replacing one with the same hash, which a random secret never repeats).
    fn put_web_session(&self, rec: &WebSessionRecord) -> Result<()>;
    /// The link or session whose secret hashes to `hash`, if valid at `now`.
    fn web_session(&self, hash: &str, now: u64) -> Result<Option<WebSessionRecord>>;
    /// Removes and returns the `kind` of record whose secret hashes to `hash`, if it is valid at `now`:
    /// spending a sign-in link. Atomic across handles and nodes, so of any number of takes at once exactly one
    /// gets it. A record of the other kind is left alone (a session's cookie is no sign-in link).
    fn take_web_session(
        &self,
        hash: &str,
        kind: WebSessionKind,
        now: u64,
    ) -> Result<Option<WebSessionRecord>>;
    /// Marks the record `hash` as used at `now` (its `last_seen` never moves back), if it is still valid
    /// then; the record as it is now stored. `None` when it is gone or no longer valid: one ended meanwhile,
    /// on any node, is never written back.
    fn touch_web_session(&self, hash: &str, now: u64) -> Result<Option<WebSessionRecord>>;
    /// Every link and session of `user` valid at `now`, oldest first.
    fn web_sessions_of(&self, user: &str, now: u64) -> Result<Vec<WebSessionRecord>>;
    /// Removes `user`'s link or session whose public id is `id`: another user's is never touched, whatever
    /// its id. Whether there was one.
    fn delete_web_session(&self, user: &str, id: &str) -> Result<bool>;
    /// Removes every link and session of `user` (and nobody else's); returns how many of them were sessions
    /// valid at `now`, which is what "signed out everywhere" counts for the person.
    fn delete_web_sessions_of(&self, user: &str, now: u64) -> Result<usize>;
    /// Removes every link and session no longer valid at `now`; returns how many.
    fn prune_web_sessions(&self, now: u64) -> Result<usize>;

    // --- the cluster: presence, nodes, leases, shared limits and secrets ---
    //
    // A single relay uses these too (it is a cluster of one), so one code path serves both.

    /// Records that `node` holds `agent`'s session from now on, replacing whichever session held it before,
    /// on any node. The new epoch is greater than every epoch handed out before (also across restarts).
    fn claim_presence(&self, agent: &Fingerprint, node: &str) -> Result<Presence>;
    /// Ends `agent`'s presence only if it is still `epoch` (a newer session is left alone). Whether it was.
    fn release_presence(&self, agent: &Fingerprint, epoch: u64) -> Result<bool>;
    /// Who holds `agent`'s session, as last claimed and not released.
    fn presence(&self, agent: &Fingerprint) -> Result<Option<Presence>>;
    /// Every agent's presence, in one read (lists of many agents).
    fn presences(&self) -> Result<Vec<(Fingerprint, Presence)>>;
    /// Exactly-once dispatch: stores `rec` (which now has `dispatched_at`) only if the stored task is still
    /// open and not dispatched, and its agent's presence is still `epoch`. Whether it was stored; `false`
    /// means another session (or node) took the task, it ended, or this session was replaced.
    fn dispatch_task(&self, rec: &TaskRecord, epoch: u64) -> Result<bool>;
    /// [`dispatch_task`](Self::dispatch_task) of `rec`, made from `was`, the queued record as the caller just
    /// read it: the same result. A backend whose full check costs several round trips may first swap `was`
    /// for `rec` in one conditional write and fall back to the full check when `was` is no longer stored.
    fn dispatch_task_from(&self, rec: &TaskRecord, was: &TaskRecord, epoch: u64) -> Result<bool> {
        let _ = was;
        self.dispatch_task(rec, epoch)
    }
    /// Ends a task that never reached its agent: stores the final `rec` only if the stored task is still
    /// open and not dispatched (a node that dispatched it meanwhile wins). Whether it was stored.
    fn finish_queued(&self, rec: &TaskRecord) -> Result<bool>;

    /// Stores a node's heartbeat.
    fn put_node(&self, rec: &NodeRecord) -> Result<()>;
    /// Every node that reported itself and was not removed.
    fn nodes(&self) -> Result<Vec<NodeRecord>>;
    /// Forgets a node (it shut down, or an operator removed a dead one). Whether it was known.
    fn remove_node(&self, id: &str) -> Result<bool>;

    /// Takes or renews the lease `name` for `holder` for `ttl`: granted when it is free, expired, or already
    /// `holder`'s. The backend's own clock decides expiry, so nodes' clocks need not agree.
    fn lease(&self, name: &str, holder: &str, ttl: std::time::Duration) -> Result<bool>;
    /// Gives the lease up if `holder` has it.
    fn release_lease(&self, name: &str, holder: &str) -> Result<()>;
    /// A token from the bucket `bucket` (at most `burst` tokens, one more every `per_token`): whether one
    /// was taken. Shared by every node using the store, so a limit holds across the cluster.
    fn take_token(&self, bucket: &str, burst: u32, per_token: std::time::Duration) -> Result<bool>;
    /// Forgets buckets not used for `idle` (by then they are full again, like a new one). How many.
    fn prune_buckets(&self, idle: std::time::Duration) -> Result<usize>;
    /// The secret `name` shared by every node: `proposed` is stored if there is none yet; the stored one is
    /// returned either way (the first node to start decides).
    fn shared_secret(&self, name: &str, proposed: &[u8]) -> Result<Vec<u8>>;

    // --- moving a relay's state between backends (`ct-relay migrate`) ---

    /// Every durable record, one at a time, to `sink` (which may stop the export by returning an error).
    /// What only matters while nodes run (presence, heartbeats, leases, rate-limit buckets) is not exported,
    /// nor are the dashboard's sign-in links and sessions: they last minutes to days, and signing in again
    /// after a move costs a person one `/dashboard`, where carrying them would carry live credentials.
    fn export(&self, sink: &mut dyn FnMut(Exported) -> Result<()>) -> Result<()>;
    /// Writes exported records as they were: audit entries keep their numbers (and later ones follow them),
    /// tasks keep their events and stored-bytes counts. Meant for an empty store; a record that exists is
    /// overwritten.
    fn import(&self, records: &[Exported]) -> Result<()>;
}

/// One record of a whole store (see [`Store::export`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Exported {
    Agent(AgentRecord),
    PairCode(PairCodeRecord),
    User(String, UserRecord),
    Share(ShareRecord),
    /// A task with its stored events, in order.
    Task(TaskRecord, Vec<(u64, Vec<u8>)>),
    Audit(AuditEntry),
    ThreadMark(String, Vec<u8>),
    /// A task's Discord thread (see [`Store::put_task_thread`]).
    TaskThread(String, u64),
    /// A Discord thread's chain (see [`Store::put_thread_chain`]): thread, current task, the bot's JSON.
    ThreadChain(u64, String, Vec<u8>),
    Secret(String, Vec<u8>),
    Pool(PoolRecord),
}

/// Typed conveniences over the byte-level methods, for callers (tests, front ends) that want records.
impl dyn Store {
    /// A task's stored events after `after`, decoded.
    pub fn events(
        &self,
        task: &str,
        after: u64,
    ) -> Result<Vec<(u64, ct_protocol::task::TaskEvent)>> {
        self.event_bytes(task, after)?
            .into_iter()
            .map(|(seq, bytes)| Ok((seq, serde_json::from_slice(&bytes)?)))
            .collect()
    }

    /// Every thread mark, decoded as `T`. A mark that no longer decodes is skipped (and logged): it only costs
    /// that thread its automatic resumption.
    pub fn thread_marks<T: serde::de::DeserializeOwned>(&self) -> Result<Vec<(String, T)>> {
        let mut marks = Vec::new();
        for (task, bytes) in self.thread_mark_bytes()? {
            match serde_json::from_slice(&bytes) {
                Ok(mark) => marks.push((task, mark)),
                Err(e) => tracing::warn!(%task, error = %e, "unreadable thread mark skipped"),
            }
        }
        Ok(marks)
    }
}
