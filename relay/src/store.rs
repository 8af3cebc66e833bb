//! The relay's embedded store: sled trees of JSON records, one tree per kind of thing.
//!
//! Records are JSON so an operator can inspect them and a newer relay can read an older one's data. Writes
//! that must not race (redeeming a pairing code) use compare-and-swap, so two agents can never redeem the
//! same code even on different connections at the same instant.

use std::path::Path;

use ct_protocol::Fingerprint;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use sled::Transactional;

/// Storage failures. The relay reports these to peers as "unavailable", never as their fault.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store: {0}")]
    Sled(#[from] sled::Error),
    #[error("store: corrupt record: {0}")]
    Corrupt(#[from] serde_json::Error),
    #[error("store: the record changed while it was being updated")]
    Conflict,
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
}

impl Store {
    pub fn open(dir: &Path) -> Result<Self> {
        let db = sled::Config::new()
            .path(dir)
            .mode(sled::Mode::LowSpace)
            .open()?;
        let store = Self {
            agents: db.open_tree("agents")?,
            pair_codes: db.open_tree("pair_codes")?,
            tasks: db.open_tree("tasks")?,
            events: db.open_tree("events")?,
            open: db.open_tree("open_tasks")?,
            shares: db.open_tree("shares")?,
            users: db.open_tree("users")?,
            db,
        };
        store.rebuild_open_index()?;
        Ok(store)
    }

    /// Recomputes the open-task index from the task records, so it is right even after a relay older than
    /// the index wrote tasks.
    fn rebuild_open_index(&self) -> Result<()> {
        self.open.clear()?;
        for v in self.tasks.iter().values() {
            let rec: TaskRecord = serde_json::from_slice(&v?)?;
            if !rec.state.is_final() {
                self.open.insert(open_key(&rec), &[])?;
            }
        }
        Ok(())
    }

    /// A fresh queue position, greater than every one handed out before (also across restarts).
    pub fn next_order(&self) -> Result<u64> {
        Ok(self.db.generate_id()?)
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
        put(&self.agents, &rec.fingerprint.0, rec)
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
                return Ok(Some(rec));
            }
        }
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

    /// Stores a task record and keeps the open-task index in step with it, atomically.
    pub fn put_task(&self, rec: &TaskRecord) -> Result<()> {
        let task = serde_json::to_vec(rec)?;
        let (id, open) = (rec.spec.task.as_bytes(), open_key(rec));
        let is_open = !rec.state.is_final();
        (&self.tasks, &self.open)
            .transaction(|(tasks, index)| {
                tasks.insert(id, task.as_slice())?;
                if is_open {
                    index.insert(open.as_slice(), &[])?;
                } else {
                    index.remove(open.as_slice())?;
                }
                Ok::<_, sled::transaction::ConflictableTransactionError<()>>(())
            })
            .map_err(tx_error)
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

    /// Stores event `seq` of a task together with the task's new record, atomically: either both are written
    /// or neither, so `last_seq` never runs ahead of the events it counts.
    pub fn append_event(
        &self,
        rec: &TaskRecord,
        seq: u64,
        event: &ct_protocol::task::TaskEvent,
    ) -> Result<()> {
        let key = event_key(&rec.spec.task, seq);
        let (event, task) = (serde_json::to_vec(event)?, serde_json::to_vec(rec)?);
        let (id, open) = (rec.spec.task.as_bytes(), open_key(rec));
        let is_open = !rec.state.is_final();
        (&self.tasks, &self.events, &self.open)
            .transaction(|(tasks, events, index)| {
                events.insert(key.as_slice(), event.as_slice())?;
                tasks.insert(id, task.as_slice())?;
                if is_open {
                    index.insert(open.as_slice(), &[])?;
                } else {
                    index.remove(open.as_slice())?;
                }
                Ok::<_, sled::transaction::ConflictableTransactionError<()>>(())
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

impl Store {
    pub fn share(&self, owner: &str, grantee: &str) -> Result<Option<ShareRecord>> {
        get(&self.shares, &share_key(owner, grantee))
    }

    pub fn put_share(&self, rec: &ShareRecord) -> Result<()> {
        put(&self.shares, &share_key(&rec.owner, &rec.grantee), rec)
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
