//! The relay's embedded store: sled trees of JSON records, one tree per kind of thing.
//!
//! Records are JSON so an operator can inspect them and a newer relay can read an older one's data. Writes
//! that must not race (redeeming a pairing code) use compare-and-swap, so two agents can never redeem the
//! same code even on different connections at the same instant.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ct_protocol::Fingerprint;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use sled::transaction::{
    ConflictableTransactionError, ConflictableTransactionResult, TransactionalTree,
};
use sled::Transactional;

use crate::audit::AuditEntry;

/// Storage failures. The relay reports these to peers as "unavailable", never as their fault.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store: {0}")]
    Sled(#[from] sled::Error),
    #[error("store: corrupt record: {0}")]
    Corrupt(#[from] serde_json::Error),
    #[error("store: the record changed while it was being updated")]
    Conflict,
    #[error(
        "store: {0} is in use by another ct-relay: stop that one, or give this one its own --data-dir"
    )]
    InUse(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// A paired agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentRecord {
    /// The raw ed25519 public key.
    #[serde(with = "ct_protocol::b64::array")]
    pub key: [u8; 32],
    pub fingerprint: Fingerprint,
    /// Discord user id of the owner.
    pub owner: String,
    /// Unique among the owner's agents.
    pub name: String,
    pub paired_at: u64,
    /// Unix seconds of the last disconnect (or connect, while online).
    #[serde(default)]
    pub last_seen: Option<u64>,
    #[serde(default)]
    pub last_transport: Option<ct_protocol::Transport>,
    /// Set when revoked; the key is refused from then on.
    #[serde(default)]
    pub revoked_at: Option<u64>,
    /// The agent's projects as it last reported them (kept while it is offline, for autocomplete and for
    /// "unknown project" errors). `None` until an agent that reports projects has connected.
    #[serde(default)]
    pub projects: Option<ct_protocol::project::ProjectsReport>,
}

/// A one-time pairing code as stored: the secret is kept to compare in constant time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PairCodeRecord {
    pub id: String,
    pub secret: String,
    pub owner: String,
    pub created_at: u64,
    pub expires_at: u64,
    #[serde(default)]
    pub used_at: Option<u64>,
    /// Wrong secrets tried against this id; the code is burned after a few.
    #[serde(default)]
    pub failures: u32,
    /// Set when a newer code for the same owner pushed this one out (only a few may be valid at once).
    #[serde(default)]
    pub superseded_at: Option<u64>,
    /// Mint order (increasing across restarts), so "the oldest" is well defined within one second.
    #[serde(default)]
    pub order: u64,
}

impl PairCodeRecord {
    /// Whether the code could still pair an agent at `t`.
    pub fn outstanding(&self, t: u64, max_failures: u32) -> bool {
        self.used_at.is_none()
            && self.superseded_at.is_none()
            && self.failures < max_failures
            && t < self.expires_at
    }
}

/// Where a task is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    Queued,
    Running,
    WaitingApproval,
    Done,
    Failed,
    Cancelled,
    /// The agent no longer runs it (it restarted, or the relay lost track): nothing more will arrive.
    Lost,
}

impl TaskState {
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Self::Done | Self::Failed | Self::Cancelled | Self::Lost
        )
    }
}

/// A task as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskRecord {
    pub spec: ct_protocol::task::TaskSpec,
    /// The agent it runs on.
    pub agent: Fingerprint,
    pub state: TaskState,
    pub created_at: u64,
    pub updated_at: u64,
    /// Highest event sequence number stored (events are 1..=last_seq).
    pub last_seq: u64,
    #[serde(default)]
    pub session_id: Option<String>,
    /// Why it failed or was lost, in words for the user.
    #[serde(default)]
    pub message: Option<String>,
    /// When the relay sent it to the agent. `None` while it waits in the agent's queue: such a task is not the
    /// agent's yet, so it is never marked lost and can be cancelled without the agent.
    #[serde(default)]
    pub dispatched_at: Option<u64>,
    /// The earlier task this one continues (a reply after that one ended resumes its Claude Code session).
    #[serde(default)]
    pub follows: Option<String>,
    /// Position in the agent's queue: increasing across restarts, so the queue is first in, first out.
    #[serde(default)]
    pub order: u64,
    /// Bytes of events stored for this task (their JSON), counted against
    /// [`CoreConfig::max_task_output`](crate::core::CoreConfig).
    #[serde(default)]
    pub output_bytes: u64,
    /// Whether output past the cap was dropped (a marker event in the log says so where it started).
    #[serde(default)]
    pub output_truncated: bool,
    /// The git branch the agent reported this task's worktree on: only such tasks can be merged, kept or
    /// discarded (and only agents that report one understand the request).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worktree: Option<String>,
}

impl TaskRecord {
    /// Whether the agent was given this task. Running records from before `dispatched_at` existed count as
    /// dispatched; a task the relay ended while it was queued (cancelled, or lost with a revoked agent) does
    /// not.
    pub fn is_dispatched(&self) -> bool {
        self.dispatched_at.is_some()
            || matches!(self.state, TaskState::Running | TaskState::WaitingApproval)
    }
}

/// How far a share trusts the grantee.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShareLevel {
    /// The grantee runs tasks; the owner decides their approvals.
    Standard,
    /// The grantee also decides the approvals of their own tasks.
    Trusted,
}

/// One owner's agents shared with one grantee.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShareRecord {
    /// Discord user id of the agents' owner.
    pub owner: String,
    /// Discord user id of the person allowed to use them.
    pub grantee: String,
    /// The project names the grantee may use; `None` means every project.
    #[serde(default)]
    pub projects: Option<Vec<String>>,
    pub level: ShareLevel,
    pub created_at: u64,
}

impl ShareRecord {
    pub fn allows(&self, project: &str) -> bool {
        self.projects
            .as_ref()
            .is_none_or(|p| p.iter().any(|n| n == project))
    }
}

/// Per-user settings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRecord {
    /// The agent used when the user (or someone they shared with) names none and they have several.
    #[serde(default)]
    pub default_agent: Option<Fingerprint>,
}

/// The open store.
#[derive(Debug, Clone)]
pub struct Store {
    db: sled::Db,
    agents: sled::Tree,
    pair_codes: sled::Tree,
    tasks: sled::Tree,
    events: sled::Tree,
    /// Index of tasks that have not ended: agent fingerprint, queue order, task id → (). Derived from `tasks`
    /// (rebuilt at open), so finding an agent's running and queued tasks does not scan the whole history.
    open: sled::Tree,
    /// (owner, grantee) → [`ShareRecord`].
    shares: sled::Tree,
    /// User id → [`UserRecord`].
    users: sled::Tree,
    /// Index of open tasks by requester: user id, 0, task id → (). Derived like `open`; counts what one person
    /// has queued or running across all agents without scanning them all.
    open_by_user: sled::Tree,
    /// The audit log: sequence number (big-endian u64) → [`AuditEntry`].
    audit: sled::Tree,
    /// Index of the audit log by the owner each entry concerns: owner, 0, sequence number → ().
    audit_owner: sled::Tree,
    /// Small counters: the audit log's last sequence number.
    meta: sled::Tree,
    /// Task id → where the Discord front end posts that task's output and how far it got (its own JSON,
    /// `ct_bot::backend::ThreadMark`), while its follower has not finished.
    thread_marks: sled::Tree,
    /// Agents by owner, in memory: derived from `agents` at open and kept in step with every write to it, so
    /// finding one person's agents (every task submission does) reads their records, not everyone's.
    owners: Arc<Mutex<AgentOwners>>,
}

#[derive(Debug, Default)]
struct AgentOwners {
    by_owner: HashMap<String, BTreeSet<Fingerprint>>,
    owner_of: HashMap<Fingerprint, String>,
}

impl AgentOwners {
    fn set(&mut self, fp: Fingerprint, owner: &str) {
        if let Some(old) = self.owner_of.insert(fp, owner.to_string()) {
            if old != owner {
                if let Some(set) = self.by_owner.get_mut(&old) {
                    set.remove(&fp);
                    if set.is_empty() {
                        self.by_owner.remove(&old);
                    }
                }
            }
        }
        self.by_owner
            .entry(owner.to_string())
            .or_default()
            .insert(fp);
    }
}

/// How long opening waits for sled's lock on the directory. A store closed in this process (a relay restarted
/// in place) lets go of it only when sled's background thread has finished, a moment after the drop.
const LOCK_WAIT: Duration = Duration::from_secs(2);

fn open_db(dir: &Path) -> Result<sled::Db> {
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        match sled::Config::new()
            .path(dir)
            .mode(sled::Mode::LowSpace)
            .open()
        {
            // sled says so only in words: "could not acquire lock on ...".
            Err(sled::Error::Io(e)) if e.to_string().contains("acquire lock") => {
                if std::time::Instant::now() >= deadline {
                    return Err(StoreError::InUse(dir.display().to_string()));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            other => return Ok(other?),
        }
    }
}

/// The key in `meta` holding the last audit sequence number handed out.
const AUDIT_SEQ: &[u8] = b"audit_seq";

impl Store {
    pub fn open(dir: &Path) -> Result<Self> {
        let db = open_db(dir)?;
        let store = Self {
            agents: db.open_tree("agents")?,
            pair_codes: db.open_tree("pair_codes")?,
            tasks: db.open_tree("tasks")?,
            events: db.open_tree("events")?,
            open: db.open_tree("open_tasks")?,
            shares: db.open_tree("shares")?,
            users: db.open_tree("users")?,
            open_by_user: db.open_tree("open_by_user")?,
            audit: db.open_tree("audit")?,
            audit_owner: db.open_tree("audit_owner")?,
            meta: db.open_tree("meta")?,
            thread_marks: db.open_tree("thread_marks")?,
            owners: Default::default(),
            db,
        };
        store.rebuild_open_index()?;
        for rec in store.agents()? {
            store.index_agent(&rec);
        }
        Ok(store)
    }

    /// Recomputes the open-task index from the task records, so it is right even after a relay older than
    /// the index wrote tasks.
    fn rebuild_open_index(&self) -> Result<()> {
        self.open.clear()?;
        self.open_by_user.clear()?;
        for v in self.tasks.iter().values() {
            let rec: TaskRecord = serde_json::from_slice(&v?)?;
            if !rec.state.is_final() {
                self.open.insert(open_key(&rec), &[])?;
                self.open_by_user.insert(user_open_key(&rec), &[])?;
            }
        }
        Ok(())
    }

    /// A fresh queue position, greater than every one handed out before (also across restarts).
    pub fn next_order(&self) -> Result<u64> {
        Ok(self.db.generate_id()?)
    }

    /// A flusher that makes writes durable in groups; see [`crate::durable`].
    pub fn group_commit(&self) -> std::io::Result<crate::durable::GroupCommit> {
        crate::durable::GroupCommit::start(self.db.clone())
    }

    /// Makes every write so far durable.
    pub fn flush(&self) -> Result<()> {
        self.db.flush()?;
        Ok(())
    }

    pub fn agent(&self, fp: &Fingerprint) -> Result<Option<AgentRecord>> {
        get(&self.agents, &fp.0)
    }

    pub fn put_agent(&self, rec: &AgentRecord) -> Result<()> {
        put(&self.agents, &rec.fingerprint.0, rec)?;
        self.index_agent(rec);
        Ok(())
    }

    fn index_agent(&self, rec: &AgentRecord) {
        self.owners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .set(rec.fingerprint, &rec.owner);
    }

    /// Every agent `owner` paired, revoked ones included.
    pub fn agents_of(&self, owner: &str) -> Result<Vec<AgentRecord>> {
        let fps: Vec<Fingerprint> = self
            .owners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .by_owner
            .get(owner)
            .map(|set| set.iter().copied().collect())
            .unwrap_or_default();
        let mut out = Vec::with_capacity(fps.len());
        for fp in fps {
            if let Some(rec) = self.agent(&fp)?.filter(|a| a.owner == owner) {
                out.push(rec);
            }
        }
        Ok(out)
    }

    /// Changes one agent record in place; concurrent changes (a disconnect's last-seen and a projects report)
    /// are retried rather than lost. Returns the new record, or `None` when there is no such agent.
    pub fn update_agent(
        &self,
        fp: &Fingerprint,
        mut change: impl FnMut(&mut AgentRecord),
    ) -> Result<Option<AgentRecord>> {
        loop {
            let Some(old) = self.agents.get(fp.0)? else {
                return Ok(None);
            };
            let mut rec: AgentRecord = serde_json::from_slice(&old)?;
            change(&mut rec);
            let new = serde_json::to_vec(&rec)?;
            if self
                .agents
                .compare_and_swap(fp.0, Some(old), Some(new))?
                .is_ok()
            {
                self.index_agent(&rec);
                return Ok(Some(rec));
            }
        }
    }

    /// Redeems a pairing code: marks it used (only if it is still exactly `code`, so two agents can never
    /// redeem one code), stores the new agent and its audit entry, all in one transaction.
    pub fn pair_agent_audited(
        &self,
        code: &PairCodeRecord,
        used: &PairCodeRecord,
        agent: &AgentRecord,
        entry: &AuditEntry,
    ) -> Result<AuditEntry> {
        let (old, new) = (serde_json::to_vec(code)?, serde_json::to_vec(used)?);
        let value = serde_json::to_vec(agent)?;
        let id = code.id.as_bytes();
        let ((), e) = self.audited(&[&self.pair_codes, &self.agents], entry, |t| {
            if t[0].get(id)?.as_deref() != Some(old.as_slice()) {
                return Err(abort(()));
            }
            t[0].insert(id, new.as_slice())?;
            t[1].insert(&agent.fingerprint.0, value.as_slice())?;
            Ok(())
        })?;
        self.index_agent(agent);
        Ok(e)
    }

    /// Marks an agent revoked at `t` (keeping an earlier revocation time) and writes the audit entry, together.
    /// `None` when there is no such agent.
    pub fn revoke_agent_audited(
        &self,
        fp: &Fingerprint,
        t: u64,
        entry: &AuditEntry,
    ) -> Result<Option<(AgentRecord, AuditEntry)>> {
        if self.agents.get(fp.0)?.is_none() {
            return Ok(None);
        }
        let (rec, e) = self.audited(&[&self.agents], entry, |tx| {
            let Some(old) = tx[0].get(fp.0)? else {
                return Err(abort(()));
            };
            let mut rec: AgentRecord = serde_json::from_slice(&old).map_err(abort)?;
            rec.revoked_at.get_or_insert(t);
            tx[0].insert(&fp.0, serde_json::to_vec(&rec).map_err(abort)?)?;
            Ok(rec)
        })?;
        Ok(Some((rec, e)))
    }

    pub fn agents(&self) -> Result<Vec<AgentRecord>> {
        self.agents
            .iter()
            .values()
            .map(|v| Ok(serde_json::from_slice(&v?)?))
            .collect()
    }

    pub fn pair_code(&self, id: &str) -> Result<Option<PairCodeRecord>> {
        get(&self.pair_codes, id.as_bytes())
    }

    pub fn put_pair_code(&self, rec: &PairCodeRecord) -> Result<()> {
        put(&self.pair_codes, rec.id.as_bytes(), rec)
    }

    /// Replaces `old` with `new` only if the stored record is still exactly `old`.
    pub fn swap_pair_code(&self, old: &PairCodeRecord, new: &PairCodeRecord) -> Result<()> {
        let (old_bytes, new_bytes) = (serde_json::to_vec(old)?, serde_json::to_vec(new)?);
        self.pair_codes
            .compare_and_swap(old.id.as_bytes(), Some(old_bytes), Some(new_bytes))?
            .map_err(|_| StoreError::Conflict)
    }

    /// Every code minted for `owner` that is still remembered. Codes are few (pruned a day after expiry), so
    /// a scan is fine.
    pub fn pair_codes_of(&self, owner: &str) -> Result<Vec<PairCodeRecord>> {
        let mut out = Vec::new();
        for v in self.pair_codes.iter().values() {
            let rec: PairCodeRecord = serde_json::from_slice(&v?)?;
            if rec.owner == owner {
                out.push(rec);
            }
        }
        Ok(out)
    }

    /// Removes codes whose expiry passed before `cutoff`; they are kept a while after use or expiry so a
    /// late attempt is told "used" or "expired" rather than "wrong".
    pub fn prune_pair_codes(&self, cutoff: u64) -> Result<usize> {
        let mut removed = 0;
        for entry in self.pair_codes.iter() {
            let (k, v) = entry?;
            let rec: PairCodeRecord = serde_json::from_slice(&v)?;
            if rec.expires_at < cutoff {
                self.pair_codes.remove(k)?;
                removed += 1;
            }
        }
        Ok(removed)
    }
}

impl Store {
    pub fn task(&self, id: &str) -> Result<Option<TaskRecord>> {
        get(&self.tasks, id.as_bytes())
    }

    /// Stores a task record and keeps the open-task indexes in step with it, atomically.
    pub fn put_task(&self, rec: &TaskRecord) -> Result<()> {
        let write = TaskWrite::new(rec)?;
        (&self.tasks, &self.open, &self.open_by_user)
            .transaction(|(tasks, open, by_user)| write.apply(tasks, open, by_user, None))
            .map_err(tx_error)
    }

    /// Stores a new or changed task record and appends `entry` to the audit log, atomically: a task the log
    /// must show (a grantee's) is not created unless its entry is written too.
    pub fn put_task_audited(&self, rec: &TaskRecord, entry: &AuditEntry) -> Result<AuditEntry> {
        let write = TaskWrite::new(rec)?;
        let ((), entry) =
            self.audited(&[&self.tasks, &self.open, &self.open_by_user], entry, |t| {
                write.apply(&t[0], &t[1], &t[2], None)
            })?;
        Ok(entry)
    }

    /// How many tasks `user` asked for that have not ended, across all agents.
    pub fn open_tasks_of_user(&self, user: &str) -> Result<usize> {
        let mut n = 0;
        for key in self.open_by_user.scan_prefix(user_prefix(user)).keys() {
            key?;
            n += 1;
        }
        Ok(n)
    }

    /// Final tasks last changed before `cutoff` (a final task changes no more, so this is when it ended), at
    /// most `limit` of them, in id order after the task `after` (a cursor for the next batch).
    pub fn ended_before(
        &self,
        cutoff: u64,
        limit: usize,
        after: Option<&str>,
    ) -> Result<Vec<TaskRecord>> {
        use std::ops::Bound;
        let from = match after {
            Some(id) => Bound::Excluded(id.as_bytes().to_vec()),
            None => Bound::Unbounded,
        };
        let mut out = Vec::new();
        for v in self
            .tasks
            .range::<Vec<u8>, _>((from, Bound::Unbounded))
            .values()
        {
            let rec: TaskRecord = serde_json::from_slice(&v?)?;
            if rec.state.is_final() && rec.updated_at < cutoff {
                out.push(rec);
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Deletes a task and its events, if its record is still exactly `rec`. Returns the number of events
    /// deleted, or `None` when the record changed meanwhile (it is left for a later attempt). The record goes
    /// first, in a transaction that [`append_event`](Self::append_event) also checks against, so a late event
    /// cannot bring back half a task.
    pub fn delete_task(&self, rec: &TaskRecord) -> Result<Option<usize>> {
        let expected = serde_json::to_vec(rec)?;
        let (id, open, by_user) = (rec.spec.task.as_bytes(), open_key(rec), user_open_key(rec));
        let removed = (&self.tasks, &self.open, &self.open_by_user)
            .transaction(|(tasks, o, u)| {
                if tasks.get(id)?.as_deref() != Some(expected.as_slice()) {
                    return Ok(false);
                }
                tasks.remove(id)?;
                o.remove(open.as_slice())?;
                u.remove(by_user.as_slice())?;
                Ok::<_, ConflictableTransactionError<()>>(true)
            })
            .map_err(tx_error)?;
        if !removed {
            return Ok(None);
        }
        let (from, to) = (
            event_key(&rec.spec.task, 0),
            event_key(&rec.spec.task, u64::MAX),
        );
        let mut n = 0;
        for key in self.events.range(from..=to).keys() {
            self.events.remove(key?)?;
            n += 1;
        }
        Ok(Some(n))
    }

    /// The first task `pred` accepts, scanning the whole history: only for rare requests.
    pub fn find_task(
        &self,
        mut pred: impl FnMut(&TaskRecord) -> bool,
    ) -> Result<Option<TaskRecord>> {
        for v in self.tasks.iter().values() {
            let rec: TaskRecord = serde_json::from_slice(&v?)?;
            if pred(&rec) {
                return Ok(Some(rec));
            }
        }
        Ok(None)
    }

    /// Every task `pred` accepts, scanning the whole history.
    pub fn tasks_where(
        &self,
        mut pred: impl FnMut(&TaskRecord) -> bool,
    ) -> Result<Vec<TaskRecord>> {
        let mut out = Vec::new();
        for v in self.tasks.iter().values() {
            let rec: TaskRecord = serde_json::from_slice(&v?)?;
            if pred(&rec) {
                out.push(rec);
            }
        }
        Ok(out)
    }

    /// Tasks on one agent that have not ended, in queue order (oldest first).
    pub fn open_tasks(&self, agent: &Fingerprint) -> Result<Vec<TaskRecord>> {
        let mut out = Vec::new();
        for key in self.open.scan_prefix(agent.0).keys() {
            let key = key?;
            let id = std::str::from_utf8(&key[OPEN_PREFIX..]).map_err(|_| StoreError::Conflict)?;
            // The index is derived data: a dangling entry (it cannot happen through this API) is skipped.
            if let Some(rec) = self.task(id)? {
                if !rec.state.is_final() {
                    out.push(rec);
                }
            }
        }
        Ok(out)
    }

    /// Stores event `seq` of a task together with the task's new record; see [`Store::append_events`].
    pub fn append_event(&self, rec: &TaskRecord, seq: u64, event: Option<&[u8]>) -> Result<()> {
        self.append_events(rec, &[(seq, event)], None)
    }

    /// Stores a run of a task's events together with the task's new record, atomically: either all are
    /// written or none, so `last_seq` never runs ahead of the events it counts. One transaction per run, not
    /// per event: the record is rewritten once however many events a burst of output brings.
    ///
    /// Each event comes as its stored bytes (the caller measured them against the task's output cap), or
    /// `None` when it was dropped under that cap and only the record moves on. A task deleted meanwhile (by
    /// retention) is not brought back: the write is refused as a conflict.
    ///
    /// `was_open` is whether the task was open (not ended) before the run, when the caller knows: the
    /// open-task indexes are then written only if that changes, as most runs are plain output.
    pub fn append_events(
        &self,
        rec: &TaskRecord,
        run: &[(u64, Option<&[u8]>)],
        was_open: Option<bool>,
    ) -> Result<()> {
        let keys: Vec<(Vec<u8>, Option<&[u8]>)> = run
            .iter()
            .map(|(seq, event)| (event_key(&rec.spec.task, *seq), *event))
            .collect();
        let write = TaskWrite::new(rec)?;
        (&self.tasks, &self.events, &self.open, &self.open_by_user)
            .transaction(|(tasks, events, open, by_user)| {
                if tasks.get(write.id.as_slice())?.is_none() {
                    return Err(ConflictableTransactionError::Abort(()));
                }
                for (key, event) in &keys {
                    if let Some(event) = event {
                        events.insert(key.as_slice(), *event)?;
                    }
                }
                write.apply(tasks, open, by_user, was_open)
            })
            .map_err(tx_error)
    }

    /// A task's stored events after `after`, in order.
    pub fn events(
        &self,
        task: &str,
        after: u64,
    ) -> Result<Vec<(u64, ct_protocol::task::TaskEvent)>> {
        let (from, to) = (
            event_key(task, after.saturating_add(1)),
            event_key(task, u64::MAX),
        );
        self.events
            .range(from..=to)
            .map(|kv| {
                let (k, v) = kv?;
                let seq = u64::from_be_bytes(
                    k[k.len() - 8..]
                        .try_into()
                        .map_err(|_| StoreError::Conflict)?,
                );
                Ok((seq, serde_json::from_slice(&v)?))
            })
            .collect()
    }
}

/// The Discord front end's thread marks. Not flushed on write: after a crash a mark may be up to one flush
/// interval behind, which costs a few repeated messages, never a skipped one.
impl Store {
    pub fn put_thread_mark<T: Serialize>(&self, task: &str, mark: &T) -> Result<()> {
        put(&self.thread_marks, task.as_bytes(), mark)
    }

    pub fn delete_thread_mark(&self, task: &str) -> Result<()> {
        self.thread_marks.remove(task.as_bytes())?;
        Ok(())
    }

    /// Every mark, by task id. A mark that no longer decodes is skipped (and logged): it only costs that
    /// thread its automatic resumption.
    pub fn thread_marks<T: DeserializeOwned>(&self) -> Result<Vec<(String, T)>> {
        let mut marks = Vec::new();
        for kv in self.thread_marks.iter() {
            let (k, v) = kv?;
            let task = String::from_utf8_lossy(&k).into_owned();
            match serde_json::from_slice(&v) {
                Ok(mark) => marks.push((task, mark)),
                Err(e) => tracing::warn!(%task, error = %e, "unreadable thread mark skipped"),
            }
        }
        Ok(marks)
    }
}

impl Store {
    pub fn share(&self, owner: &str, grantee: &str) -> Result<Option<ShareRecord>> {
        get(&self.shares, &share_key(owner, grantee))
    }

    pub fn put_share(&self, rec: &ShareRecord) -> Result<()> {
        put(&self.shares, &share_key(&rec.owner, &rec.grantee), rec)
    }

    /// Stores a share and its audit entry together. `entry` is made from the share as it was before (if any),
    /// read inside the same transaction, so the log says exactly what changed.
    pub fn put_share_audited(
        &self,
        rec: &ShareRecord,
        entry: impl Fn(Option<&ShareRecord>) -> AuditEntry,
    ) -> Result<(Option<ShareRecord>, AuditEntry)> {
        let (key, value) = (
            share_key(&rec.owner, &rec.grantee),
            serde_json::to_vec(rec)?,
        );
        self.audited_with(&[&self.shares], |t| {
            let before: Option<ShareRecord> = match t[0].insert(key.as_slice(), value.as_slice())? {
                Some(old) => Some(serde_json::from_slice(&old).map_err(abort)?),
                None => None,
            };
            let e = entry(before.as_ref());
            Ok((before, e))
        })
    }

    /// Removes a share and writes its audit entry together. `None` (and nothing written) when there was none.
    pub fn remove_share_audited(
        &self,
        owner: &str,
        grantee: &str,
        entry: impl Fn(&ShareRecord) -> AuditEntry,
    ) -> Result<Option<(ShareRecord, AuditEntry)>> {
        let key = share_key(owner, grantee);
        // Checked first so that removing nothing writes no entry; the transaction checks again.
        if self.shares.get(&key)?.is_none() {
            return Ok(None);
        }
        let (old, written) = self.audited_with(&[&self.shares], |t| {
            let Some(old) = t[0].remove(key.as_slice())? else {
                return Err(abort(()));
            };
            let old: ShareRecord = serde_json::from_slice(&old).map_err(abort)?;
            let e = entry(&old);
            Ok((old, e))
        })?;
        Ok(Some((old, written)))
    }

    /// Removes a share, returning what it was.
    pub fn remove_share(&self, owner: &str, grantee: &str) -> Result<Option<ShareRecord>> {
        self.shares
            .remove(share_key(owner, grantee))?
            .map(|v| serde_json::from_slice(&v))
            .transpose()
            .map_err(Into::into)
    }

    /// Everyone `owner` shares with.
    pub fn shares_of(&self, owner: &str) -> Result<Vec<ShareRecord>> {
        let mut prefix = owner.as_bytes().to_vec();
        prefix.push(0);
        self.shares
            .scan_prefix(prefix)
            .values()
            .map(|v| Ok(serde_json::from_slice(&v?)?))
            .collect()
    }

    /// Everyone who shares with `grantee`. Shares are few next to tasks, so a scan is fine.
    pub fn shares_to(&self, grantee: &str) -> Result<Vec<ShareRecord>> {
        let mut out = Vec::new();
        for v in self.shares.iter().values() {
            let rec: ShareRecord = serde_json::from_slice(&v?)?;
            if rec.grantee == grantee {
                out.push(rec);
            }
        }
        Ok(out)
    }

    pub fn user(&self, id: &str) -> Result<UserRecord> {
        Ok(get(&self.users, id.as_bytes())?.unwrap_or_default())
    }

    pub fn put_user(&self, id: &str, rec: &UserRecord) -> Result<()> {
        put(&self.users, id.as_bytes(), rec)
    }

    /// Stores a user's settings and an audit entry together.
    pub fn put_user_audited(
        &self,
        id: &str,
        rec: &UserRecord,
        entry: &AuditEntry,
    ) -> Result<AuditEntry> {
        let value = serde_json::to_vec(rec)?;
        let ((), e) = self.audited(&[&self.users], entry, |t| {
            t[0].insert(id.as_bytes(), value.as_slice())?;
            Ok(())
        })?;
        Ok(e)
    }
}

/// The audit log.
impl Store {
    /// Appends one entry on its own.
    pub fn append_audit(&self, entry: &AuditEntry) -> Result<AuditEntry> {
        Ok(self.audited(&[], entry, |_| Ok(()))?.1)
    }

    /// Applies `change` to `trees` and appends `entry` to the audit log in one transaction: both are written
    /// or neither.
    pub(crate) fn audited<T>(
        &self,
        trees: &[&sled::Tree],
        entry: &AuditEntry,
        change: impl Fn(&[TransactionalTree]) -> ConflictableTransactionResult<T, ()>,
    ) -> Result<(T, AuditEntry)> {
        self.audited_with(trees, |t| Ok((change(t)?, entry.clone())))
    }

    /// Like [`audited`](Self::audited), with the entry made inside the transaction from what `change` saw.
    fn audited_with<T>(
        &self,
        trees: &[&sled::Tree],
        change: impl Fn(&[TransactionalTree]) -> ConflictableTransactionResult<(T, AuditEntry), ()>,
    ) -> Result<(T, AuditEntry)> {
        let n = trees.len();
        let mut all: Vec<&sled::Tree> = trees.to_vec();
        all.extend([&self.audit, &self.audit_owner, &self.meta]);
        all.as_slice()
            .transaction(|t| {
                let (out, mut entry) = change(&t[..n])?;
                // The counter is read and bumped inside the transaction, so sequence numbers follow commit
                // order without gaps: a missing number in the log means an entry was deleted.
                let last = match t[n + 2].get(AUDIT_SEQ)? {
                    Some(v) => u64::from_be_bytes(v.as_ref().try_into().map_err(abort)?),
                    None => 0,
                };
                entry.seq = last + 1;
                t[n + 2].insert(AUDIT_SEQ, &entry.seq.to_be_bytes())?;
                let value = serde_json::to_vec(&entry).map_err(abort)?;
                t[n].insert(&entry.seq.to_be_bytes(), value)?;
                t[n + 1].insert(audit_owner_key(&entry.owner, entry.seq), &[])?;
                Ok((out, entry))
            })
            .map_err(tx_error)
    }

    /// Audit entries newest first, starting below `before`, that `keep` accepts, at most `limit`. Scans the
    /// log: for operators' filters; owners' views use [`audit_of_owner`](Self::audit_of_owner).
    pub fn audit_where(
        &self,
        before: Option<u64>,
        limit: usize,
        mut keep: impl FnMut(&AuditEntry) -> bool,
    ) -> Result<Vec<AuditEntry>> {
        let end = before.unwrap_or(u64::MAX).to_be_bytes();
        let mut out = Vec::new();
        for kv in self.audit.range(..end).rev() {
            let (_, v) = kv?;
            let e: AuditEntry = serde_json::from_slice(&v)?;
            if keep(&e) {
                out.push(e);
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// The entries concerning `owner`, newest first, below `before`, at most `limit`: read through the owner
    /// index, so the cost follows the page, not the log.
    pub fn audit_of_owner(
        &self,
        owner: &str,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<AuditEntry>> {
        let from = audit_owner_key(owner, 0);
        let to = audit_owner_key(owner, before.unwrap_or(u64::MAX));
        let mut out = Vec::new();
        for key in self.audit_owner.range(from..to).keys().rev() {
            let key = key?;
            let seq = &key[key.len() - 8..];
            // The index is written with the entry; one pruned in between is skipped.
            if let Some(v) = self.audit.get(seq)? {
                out.push(serde_json::from_slice(&v)?);
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Deletes entries written before `cutoff`, oldest first, stopping at the first younger one (entries are
    /// written in time order, give or take a clock step). Returns how many were deleted.
    pub fn prune_audit(&self, cutoff: u64) -> Result<usize> {
        let mut removed = 0;
        for kv in self.audit.iter() {
            let (k, v) = kv?;
            let e: AuditEntry = serde_json::from_slice(&v)?;
            if e.at >= cutoff {
                break;
            }
            self.audit_owner.remove(audit_owner_key(&e.owner, e.seq))?;
            self.audit.remove(k)?;
            removed += 1;
        }
        Ok(removed)
    }

    /// Number of entries in the log.
    pub fn audit_len(&self) -> usize {
        self.audit.len()
    }
}

/// A task record's write, prepared outside a transaction (which may run its closure more than once).
struct TaskWrite {
    id: Vec<u8>,
    value: Vec<u8>,
    open: Vec<u8>,
    by_user: Vec<u8>,
    is_open: bool,
}

impl TaskWrite {
    fn new(rec: &TaskRecord) -> Result<Self> {
        Ok(Self {
            id: rec.spec.task.as_bytes().to_vec(),
            value: serde_json::to_vec(rec)?,
            open: open_key(rec),
            by_user: user_open_key(rec),
            is_open: !rec.state.is_final(),
        })
    }

    /// Writes the record and its open-task index entries. `was_open`, when known, is whether the task was open
    /// before: the index entries are left alone when that has not changed.
    fn apply(
        &self,
        tasks: &TransactionalTree,
        open: &TransactionalTree,
        by_user: &TransactionalTree,
        was_open: Option<bool>,
    ) -> ConflictableTransactionResult<(), ()> {
        tasks.insert(self.id.as_slice(), self.value.as_slice())?;
        if was_open == Some(self.is_open) {
            return Ok(());
        }
        if self.is_open {
            open.insert(self.open.as_slice(), &[])?;
            by_user.insert(self.by_user.as_slice(), &[])?;
        } else {
            open.remove(self.open.as_slice())?;
            by_user.remove(self.by_user.as_slice())?;
        }
        Ok(())
    }
}

/// Aborts a transaction (reported as [`StoreError::Conflict`]) for something that cannot happen through this
/// API, such as a record that does not parse.
fn abort<E>(_: E) -> ConflictableTransactionError<()> {
    ConflictableTransactionError::Abort(())
}

fn user_prefix(user: &str) -> Vec<u8> {
    let mut k = user.as_bytes().to_vec();
    k.push(0);
    k
}

/// Open tasks by requester: user id (which never contains a 0 byte), 0, task id.
fn user_open_key(rec: &TaskRecord) -> Vec<u8> {
    let mut k = user_prefix(&rec.spec.requester.user);
    k.extend_from_slice(rec.spec.task.as_bytes());
    k
}

/// Audit entries by owner: owner, 0, sequence number (big-endian), so one owner's entries form a key range in
/// log order.
fn audit_owner_key(owner: &str, seq: u64) -> Vec<u8> {
    let mut k = user_prefix(owner);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// Owner and grantee separated by a byte no user id contains, so one owner's shares form a key range.
fn share_key(owner: &str, grantee: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(owner.len() + grantee.len() + 1);
    k.extend_from_slice(owner.as_bytes());
    k.push(0);
    k.extend_from_slice(grantee.as_bytes());
    k
}

/// Length of the open-index key before the task id: fingerprint, then queue order.
const OPEN_PREFIX: usize = 32 + 8;

/// Open tasks sort by agent, then queue order (big-endian), then id (which only breaks ties between records
/// written before `order` existed).
fn open_key(rec: &TaskRecord) -> Vec<u8> {
    let mut k = Vec::with_capacity(OPEN_PREFIX + rec.spec.task.len());
    k.extend_from_slice(&rec.agent.0);
    k.extend_from_slice(&rec.order.to_be_bytes());
    k.extend_from_slice(rec.spec.task.as_bytes());
    k
}

fn tx_error(e: sled::transaction::TransactionError<()>) -> StoreError {
    match e {
        sled::transaction::TransactionError::Storage(e) => StoreError::Sled(e),
        sled::transaction::TransactionError::Abort(()) => StoreError::Conflict,
    }
}

/// Events sort by task, then by sequence number (big-endian).
fn event_key(task: &str, seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(task.len() + 9);
    k.extend_from_slice(task.as_bytes());
    k.push(0);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn get<T: DeserializeOwned>(tree: &sled::Tree, key: &[u8]) -> Result<Option<T>> {
    tree.get(key)?
        .map(|v| serde_json::from_slice(&v))
        .transpose()
        .map_err(Into::into)
}

fn put<T: Serialize>(tree: &sled::Tree, key: &[u8], value: &T) -> Result<()> {
    tree.insert(key, serde_json::to_vec(value)?)?;
    Ok(())
}

/// Seconds since the Unix epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::AuditKind;

    fn entry() -> AuditEntry {
        AuditEntry::new(AuditKind::DefaultAgentSet, "1", "1", "test".into())
    }

    /// Security-relevant changes are written with their audit entry or not at all: with the log unwritable
    /// (its counter corrupted), the change fails and leaves nothing behind.
    #[test]
    fn no_audit_entry_means_no_change() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let share = ShareRecord {
            owner: "1".into(),
            grantee: "2".into(),
            projects: None,
            level: ShareLevel::Standard,
            created_at: 0,
        };
        store.put_share_audited(&share, |_| entry()).unwrap();
        assert_eq!(store.audit_len(), 1);

        store.meta.insert(AUDIT_SEQ, b"not a number").unwrap();
        let wider = ShareRecord {
            level: ShareLevel::Trusted,
            ..share.clone()
        };
        assert!(matches!(
            store.put_share_audited(&wider, |_| entry()),
            Err(StoreError::Conflict)
        ));
        assert_eq!(store.share("1", "2").unwrap(), Some(share));
        assert!(store.remove_share_audited("1", "2", |_| entry()).is_err());
        assert!(store.share("1", "2").unwrap().is_some());
        assert!(store
            .put_user_audited("1", &UserRecord::default(), &entry())
            .is_err());
        assert!(get::<UserRecord>(&store.users, b"1").unwrap().is_none());
        assert_eq!(store.audit_len(), 1);
    }

    /// Each owner sees exactly their agents, through every kind of write and across a reopen (the index
    /// lives in memory and is rebuilt from the records).
    #[test]
    fn agents_of_an_owner_follow_every_write() {
        let dir = tempfile::tempdir().unwrap();
        let agent = |n: u8, owner: &str| AgentRecord {
            key: [n; 32],
            fingerprint: Fingerprint([n; 32]),
            owner: owner.into(),
            name: format!("a{n}"),
            paired_at: 0,
            last_seen: None,
            last_transport: None,
            revoked_at: None,
            projects: None,
        };
        let names = |store: &Store, owner: &str| {
            let mut v: Vec<String> = store
                .agents_of(owner)
                .unwrap()
                .into_iter()
                .map(|a| a.name)
                .collect();
            v.sort();
            v
        };
        {
            let store = Store::open(dir.path()).unwrap();
            for (n, owner) in [(1, "1"), (2, "1"), (3, "2"), (4, "12")] {
                store.put_agent(&agent(n, owner)).unwrap();
            }
            assert_eq!(names(&store, "1"), ["a1", "a2"]);
            assert_eq!(names(&store, "12"), ["a4"]);
            assert!(names(&store, "3").is_empty());
            // A record that changes hands leaves its old owner's list.
            store
                .update_agent(&Fingerprint([2; 32]), |a| a.owner = "2".into())
                .unwrap();
            assert_eq!(names(&store, "1"), ["a1"]);
            assert_eq!(names(&store, "2"), ["a2", "a3"]);
            store.flush().unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(names(&store, "1"), ["a1"]);
        assert_eq!(names(&store, "2"), ["a2", "a3"]);
    }

    /// A second relay on the same data directory is told what is wrong, not handed sled's lock error.
    #[test]
    fn a_store_in_use_is_refused_in_words() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Store::open(dir.path()).unwrap();
        let Err(err) = Store::open(dir.path()) else {
            panic!("opened a store that is in use");
        };
        assert!(matches!(err, StoreError::InUse(_)), "{err}");
        assert!(err.to_string().contains("--data-dir"), "{err}");
    }

    #[test]
    fn sequence_numbers_follow_commit_order_and_pages_read_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        for owner in ["1", "2", "1", "12", "1"] {
            let e = AuditEntry {
                owner: owner.into(),
                ..entry()
            };
            store.append_audit(&e).unwrap();
        }
        let ones: Vec<u64> = store
            .audit_of_owner("1", None, 10)
            .unwrap()
            .iter()
            .map(|e| e.seq)
            .collect();
        assert_eq!(ones, vec![5, 3, 1]);
        assert_eq!(
            store.audit_of_owner("1", Some(5), 1).unwrap()[0].seq,
            3,
            "the next page starts below the last seen"
        );
        assert_eq!(store.audit_of_owner("12", None, 10).unwrap().len(), 1);
        assert_eq!(store.prune_audit(u64::MAX).unwrap(), 5);
        assert!(store.audit_of_owner("1", None, 10).unwrap().is_empty());
        // Numbers are never reused after a prune.
        assert_eq!(store.append_audit(&entry()).unwrap().seq, 6);
    }
}
