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
}

/// The open store.
#[derive(Debug, Clone)]
pub struct Store {
    db: sled::Db,
    agents: sled::Tree,
    pair_codes: sled::Tree,
    tasks: sled::Tree,
    events: sled::Tree,
}

impl Store {
    pub fn open(dir: &Path) -> Result<Self> {
        let db = sled::Config::new()
            .path(dir)
            .mode(sled::Mode::LowSpace)
            .open()?;
        Ok(Self {
            agents: db.open_tree("agents")?,
            pair_codes: db.open_tree("pair_codes")?,
            tasks: db.open_tree("tasks")?,
            events: db.open_tree("events")?,
            db,
        })
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

    pub fn put_task(&self, rec: &TaskRecord) -> Result<()> {
        put(&self.tasks, rec.spec.task.as_bytes(), rec)
    }

    /// Tasks on one agent that have not ended.
    pub fn open_tasks(&self, agent: &Fingerprint) -> Result<Vec<TaskRecord>> {
        let mut out = Vec::new();
        for v in self.tasks.iter().values() {
            let rec: TaskRecord = serde_json::from_slice(&v?)?;
            if rec.agent == *agent && !rec.state.is_final() {
                out.push(rec);
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
        let id = rec.spec.task.as_bytes();
        (&self.tasks, &self.events)
            .transaction(|(tasks, events)| {
                events.insert(key.as_slice(), event.as_slice())?;
                tasks.insert(id, task.as_slice())?;
                Ok::<_, sled::transaction::ConflictableTransactionError<()>>(())
            })
            .map_err(|e| match e {
                sled::transaction::TransactionError::Storage(e) => StoreError::Sled(e),
                sled::transaction::TransactionError::Abort(()) => StoreError::Conflict,
            })
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
