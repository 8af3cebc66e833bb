//! The embedded backend: sled trees of JSON records, one tree per kind of thing, and index trees derived from
//! them.
//!
//! Operations that change several trees (a task with its indexes, a change with its audit entry, a batch of
//! event runs) are sled transactions, so they are atomic also across a crash. Writes that must not race
//! (redeeming a pairing code) use compare-and-swap, so two agents can never redeem the same code even on
//! different connections at the same instant.
//!
//! The queries the relay runs while someone waits (a submission's quota checks, task-id autocomplete, a resume
//! check, a share change) read a range of an index and then only the records it names, never the whole history.
//! The indexes are derived data: each is written in the same transaction as the records it is derived from, and
//! all of them are rebuilt from the records at open when the store was last written by a relay that kept
//! different ones (see [`INDEX_VERSION`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Bound;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ct_protocol::Fingerprint;
use serde::{de::DeserializeOwned, Serialize};
use sled::transaction::{
    ConflictableTransactionError, ConflictableTransactionResult, TransactionError,
    TransactionalTree,
};
use sled::Transactional;

use super::{
    Admission, AgentRecord, Attachment, AuditEntry, EventRun, Exported, NodeRecord, PairCodeRecord,
    PoolRecord, Presence, Result, ShareRecord, Store, StoreError, TaskLimits, TaskRecord,
    UserRecord, WebSessionKind, WebSessionRecord,
};

/// The open store.
#[derive(Debug, Clone)]
pub struct SledStore {
    db: sled::Db,
    agents: sled::Tree,
    pair_codes: sled::Tree,
    tasks: sled::Tree,
    events: sled::Tree,
    /// The indexes derived from `tasks`.
    idx: TaskIndexes,
    /// (owner, grantee) → [`ShareRecord`].
    shares: sled::Tree,
    /// Index of shares by grantee ([`grantee_key`]): derived from `shares`, written in the same transaction, so
    /// finding who shares with someone (every submission that names an owner does) does not read every share.
    shares_by_grantee: sled::Tree,
    /// User id → [`UserRecord`].
    users: sled::Tree,
    /// Index of the users whose record says anything about pools ([`UserRecord::in_pools`]): user id → ().
    /// Written in the same transaction as `users`; no record written before pools existed has a pool, so an
    /// older store's empty index is complete.
    pool_users: sled::Tree,
    /// Pool name → [`PoolRecord`].
    pools: sled::Tree,
    /// The audit log: sequence number (big-endian u64) → [`AuditEntry`].
    audit: sled::Tree,
    /// Index of the audit log by the owner each entry concerns: owner, 0, sequence number → ().
    audit_owner: sled::Tree,
    /// Small counters: the audit log's last sequence number, the indexes' version.
    meta: sled::Tree,
    /// Task id → where the Discord front end posts that task's output and how far it got (its own JSON,
    /// `ct_bot::backend::ThreadMark`), while its follower has not finished.
    thread_marks: sled::Tree,
    /// Task id → the Discord thread its output went to (big-endian u64), kept with the task.
    task_threads: sled::Tree,
    /// Discord thread id (big-endian u64) → the chain's current task, 0, the bot's JSON
    /// ([`Store::put_thread_chain`]).
    thread_chains: sled::Tree,
    /// Task id, 0, thread id (big-endian u64) → (): which chains may name a task, so deleting the task finds
    /// them. An entry may outlive its chain's move to another task; the chain itself says which it names.
    chains_by_task: sled::Tree,
    /// Task id, 0, approval id → the answers given so far to an AskUserQuestion (JSON: question → answer).
    approval_answers: sled::Tree,
    /// Task id, 0, file index (big-endian u32) → a file attached to the task ([`file_value`]).
    task_files: sled::Tree,
    /// Agents by owner, in memory: derived from `agents` at open and kept in step with every write to it, so
    /// finding one person's agents (every task submission does) reads their records, not everyone's.
    owners: Arc<Mutex<AgentOwners>>,
    /// Held by [`Store::admit_task`] from counting a person's and an agent's open tasks to writing the new
    /// one. One process holds the directory (sled's lock: a second opener is told [`StoreError::InUse`]), and
    /// every handle on it is a clone of this one, so this lock orders every admission there can be; writes that
    /// do not take it only end or dispatch tasks, which can only lower what an admission counted.
    admissions: Arc<Mutex<()>>,
    /// What a cluster of one keeps like a cluster of many: presence (`p/` + fingerprint), node heartbeats
    /// (`n/` + id), leases (`l/` + name), token buckets (`b/` + name) and shared secrets (`s/` + name).
    cluster: sled::Tree,
    /// The dashboard's sign-in links and sessions: hex hash of the secret → [`WebSessionRecord`].
    web_sessions: sled::Tree,
    /// Index of `web_sessions` by user ([`web_user_key`]). Written in the same transaction as the records, like
    /// the task indexes, but not rebuilt with them: no relay ever wrote one without the other, so
    /// [`INDEX_VERSION`] does not cover it.
    web_by_user: sled::Tree,
}

/// The trees derived from the task records. Every write of a task record updates them in its own transaction,
/// from the [`TaskFacts`] of the record it replaces and of the new one, so they never disagree with `tasks`.
/// Each key layout is documented at the function that builds it.
#[derive(Debug, Clone)]
struct TaskIndexes {
    /// Task id → [`TaskFacts`] of the stored record: what its index entries were made from, so a write finds
    /// the entries to replace, and the bytes to take off its requester's count, without decoding the old
    /// record's JSON.
    facts: sled::Tree,
    /// Tasks that have not ended ([`agent_order_key`]): an agent's running and queued tasks in queue order.
    /// Tree `open_tasks`, as the relay before versioned indexes named it.
    open: sled::Tree,
    /// Open tasks by requester ([`user_open_key`]): how much one person has queued or running across all
    /// agents. Tree `open_by_user`, likewise.
    open_by_user: sled::Tree,
    /// Every task by requester ([`user_task_key`]), in creation order.
    by_user: sled::Tree,
    /// Every task by agent ([`agent_order_key`]), in creation order.
    by_agent: sled::Tree,
    /// Tasks by agent and Claude Code session ([`session_key`]), for resume checks.
    by_session: sled::Tree,
    /// Final tasks by the time they ended ([`ended_key`]), for retention.
    ended: sled::Tree,
    /// User id → bytes of events stored for the tasks they asked for (big-endian u64; no key when 0).
    stored_bytes: sled::Tree,
}

impl TaskIndexes {
    fn open(db: &sled::Db) -> Result<Self> {
        Ok(Self {
            facts: db.open_tree("task_facts")?,
            open: db.open_tree("open_tasks")?,
            open_by_user: db.open_tree("open_by_user")?,
            by_user: db.open_tree("tasks_by_user")?,
            by_agent: db.open_tree("tasks_by_agent")?,
            by_session: db.open_tree("tasks_by_session")?,
            ended: db.open_tree("ended_tasks")?,
            stored_bytes: db.open_tree("stored_bytes")?,
        })
    }

    /// The trees of keys without values, in the order of [`TaskFacts::keys`].
    fn keyed(&self) -> [&sled::Tree; 6] {
        [
            &self.open,
            &self.open_by_user,
            &self.by_user,
            &self.by_agent,
            &self.by_session,
            &self.ended,
        ]
    }
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

/// The layout of the derived trees ([`TaskIndexes`] and `shares_by_grantee`). Raise it whenever one changes or
/// one is added: a store that does not carry this version has them all rebuilt from the records at open.
const INDEX_VERSION: u64 = 1;

/// Where the version is kept (big-endian): in `meta`, and again in `open_tasks`. The relay before versioned
/// indexes clears `open_tasks` at every open and keeps none of the newer indexes: if it runs on this store
/// again (a rollback), it wipes the second copy, and the next open of this relay rebuilds what it missed. The
/// key is shorter than a fingerprint, so it is in no agent's key range.
const INDEX_VERSION_KEY: &[u8] = b"index_version";

impl SledStore {
    pub fn open(dir: &Path) -> Result<Self> {
        let db = open_db(dir)?;
        let store = Self {
            agents: db.open_tree("agents")?,
            pair_codes: db.open_tree("pair_codes")?,
            tasks: db.open_tree("tasks")?,
            events: db.open_tree("events")?,
            idx: TaskIndexes::open(&db)?,
            shares: db.open_tree("shares")?,
            shares_by_grantee: db.open_tree("shares_by_grantee")?,
            users: db.open_tree("users")?,
            pool_users: db.open_tree("pool_users")?,
            pools: db.open_tree("pools")?,
            audit: db.open_tree("audit")?,
            audit_owner: db.open_tree("audit_owner")?,
            meta: db.open_tree("meta")?,
            thread_marks: db.open_tree("thread_marks")?,
            task_threads: db.open_tree("task_threads")?,
            thread_chains: db.open_tree("thread_chains")?,
            chains_by_task: db.open_tree("thread_chains_by_task")?,
            approval_answers: db.open_tree("approval_answers")?,
            task_files: db.open_tree("task_files")?,
            cluster: db.open_tree("cluster")?,
            web_sessions: db.open_tree("web_sessions")?,
            web_by_user: db.open_tree("web_sessions_by_user")?,
            owners: Default::default(),
            admissions: Default::default(),
            db,
        };
        // Only a store written by another relay version pays for a pass over the history: a restart with a big
        // history should take no longer than one with none.
        if !store.indexes_current()? {
            store.rebuild_indexes()?;
        }
        for rec in store.agents()? {
            store.index_agent(&rec);
        }
        Ok(store)
    }

    /// Whether the derived trees were written by this layout and not touched by an older relay since.
    fn indexes_current(&self) -> Result<bool> {
        let version = INDEX_VERSION.to_be_bytes();
        Ok(
            self.meta.get(INDEX_VERSION_KEY)?.as_deref() == Some(&version[..])
                && self.idx.open.get(INDEX_VERSION_KEY)?.as_deref() == Some(&version[..]),
        )
    }

    /// Recomputes every derived tree from the records (one pass over the tasks and one over the shares), then
    /// records the version that vouches for them.
    fn rebuild_indexes(&self) -> Result<()> {
        let started = Instant::now();
        for tree in [
            &self.idx.facts,
            &self.idx.stored_bytes,
            &self.shares_by_grantee,
        ] {
            tree.clear()?;
        }
        for tree in self.idx.keyed() {
            tree.clear()?;
        }
        let mut stored: HashMap<Vec<u8>, u64> = HashMap::new();
        let mut tasks = 0usize;
        for kv in self.tasks.iter() {
            let (id, value) = kv?;
            let facts = TaskFacts::of(&serde_json::from_slice(&value)?);
            self.idx.facts.insert(&id, facts.encode())?;
            for (tree, key) in self.idx.keyed().into_iter().zip(facts.keys(&id)) {
                if let Some(key) = key {
                    tree.insert(key, &[])?;
                }
            }
            let sum = stored.entry(facts.user).or_default();
            *sum = sum.saturating_add(facts.output_bytes);
            tasks += 1;
        }
        for (user, bytes) in stored {
            if bytes > 0 {
                self.idx.stored_bytes.insert(user, &bytes.to_be_bytes())?;
            }
        }
        for v in self.shares.iter().values() {
            let rec: ShareRecord = serde_json::from_slice(&v?)?;
            self.shares_by_grantee
                .insert(grantee_key(&rec.grantee, &rec.owner), &[])?;
        }
        // The indexes reach the disk before the version that vouches for them: a crash in between finds no
        // version, and rebuilds again.
        self.db.flush()?;
        let version = INDEX_VERSION.to_be_bytes();
        self.meta.insert(INDEX_VERSION_KEY, &version)?;
        self.idx.open.insert(INDEX_VERSION_KEY, &version)?;
        self.db.flush()?;
        tracing::info!(
            tasks,
            elapsed = ?started.elapsed(),
            "store indexes rebuilt from the records"
        );
        Ok(())
    }

    fn index_agent(&self, rec: &AgentRecord) {
        self.owners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .set(rec.fingerprint, &rec.owner);
    }

    /// `tasks` and its indexes, in the order [`TaskTx::of`] takes them inside a transaction.
    fn task_trees(&self) -> [&sled::Tree; 9] {
        let i = &self.idx;
        [
            &self.tasks,
            &i.facts,
            &i.open,
            &i.open_by_user,
            &i.by_user,
            &i.by_agent,
            &i.by_session,
            &i.ended,
            &i.stored_bytes,
        ]
    }

    /// Applies `change` to `trees` and appends `entry` to the audit log in one transaction: both are written
    /// or neither.
    fn audited<T>(
        &self,
        trees: &[&sled::Tree],
        entry: &AuditEntry,
        change: impl Fn(&[TransactionalTree]) -> TxResult<T>,
    ) -> Result<(T, AuditEntry)> {
        self.audited_with(trees, |t| Ok((change(t)?, entry.clone())))
    }

    /// Like [`audited`](Self::audited), with the entry made inside the transaction from what `change` saw.
    fn audited_with<T>(
        &self,
        trees: &[&sled::Tree],
        change: impl Fn(&[TransactionalTree]) -> TxResult<(T, AuditEntry)>,
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
                let value = serde_json::to_vec(&entry).map_err(fail)?;
                t[n].insert(&entry.seq.to_be_bytes(), value)?;
                t[n + 1].insert(audit_owner_key(&entry.owner, entry.seq), &[])?;
                Ok((out, entry))
            })
            .map_err(tx_error)
    }
}

/// The dashboard's links and sessions: every write goes through a transaction over the records and their
/// index together, so the two never disagree and a take cannot interleave with another.
impl SledStore {
    fn web_tx<T>(
        &self,
        op: impl Fn(&TransactionalTree, &TransactionalTree) -> TxResult<T>,
    ) -> Result<T> {
        (&self.web_sessions, &self.web_by_user)
            .transaction(|(recs, by_user)| op(recs, by_user))
            .map_err(tx_error)
    }

    /// Removes the record `hash` if `remove` accepts what is stored there; what it removed.
    fn remove_web_session_if(
        &self,
        hash: &[u8],
        remove: impl Fn(&WebSessionRecord) -> bool,
    ) -> Result<Option<WebSessionRecord>> {
        self.web_tx(|recs, by_user| {
            let Some(v) = recs.get(hash)? else {
                return Ok(None);
            };
            let rec: WebSessionRecord = serde_json::from_slice(&v).map_err(fail)?;
            if !remove(&rec) {
                return Ok(None);
            }
            recs.remove(hash)?;
            by_user.remove(web_user_key(&rec.user, hash))?;
            Ok(Some(rec))
        })
    }

    /// The hashes `user`'s index entries name.
    fn web_hashes_of(&self, user: &str) -> Result<Vec<Vec<u8>>> {
        let prefix = user_prefix(user);
        self.web_by_user
            .scan_prefix(&prefix)
            .keys()
            .map(|k| Ok(k?[prefix.len()..].to_vec()))
            .collect()
    }
}

impl Store for SledStore {
    fn flush(&self) -> Result<()> {
        self.db.flush()?;
        Ok(())
    }

    fn next_order(&self) -> Result<u64> {
        Ok(self.db.generate_id()?)
    }

    fn agent(&self, fp: &Fingerprint) -> Result<Option<AgentRecord>> {
        get(&self.agents, &fp.0)
    }

    fn put_agent(&self, rec: &AgentRecord) -> Result<()> {
        put(&self.agents, &rec.fingerprint.0, rec)?;
        self.index_agent(rec);
        Ok(())
    }

    fn agents_of(&self, owner: &str) -> Result<Vec<AgentRecord>> {
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

    fn agents(&self) -> Result<Vec<AgentRecord>> {
        self.agents
            .iter()
            .values()
            .map(|v| Ok(serde_json::from_slice(&v?)?))
            .collect()
    }

    fn update_agent(
        &self,
        fp: &Fingerprint,
        change: &mut dyn FnMut(&mut AgentRecord),
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

    fn pair_agent_audited(
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

    fn revoke_agent_audited(
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
            let mut rec: AgentRecord = serde_json::from_slice(&old).map_err(fail)?;
            rec.revoked_at.get_or_insert(t);
            tx[0].insert(&fp.0, serde_json::to_vec(&rec).map_err(fail)?)?;
            Ok(rec)
        })?;
        Ok(Some((rec, e)))
    }

    fn pair_code(&self, id: &str) -> Result<Option<PairCodeRecord>> {
        get(&self.pair_codes, id.as_bytes())
    }

    fn put_pair_code(&self, rec: &PairCodeRecord) -> Result<()> {
        put(&self.pair_codes, rec.id.as_bytes(), rec)
    }

    fn swap_pair_code(&self, old: &PairCodeRecord, new: &PairCodeRecord) -> Result<()> {
        let (old_bytes, new_bytes) = (serde_json::to_vec(old)?, serde_json::to_vec(new)?);
        self.pair_codes
            .compare_and_swap(old.id.as_bytes(), Some(old_bytes), Some(new_bytes))?
            .map_err(|_| StoreError::Conflict)
    }

    fn pair_codes_of(&self, owner: &str) -> Result<Vec<PairCodeRecord>> {
        let mut out = Vec::new();
        for v in self.pair_codes.iter().values() {
            let rec: PairCodeRecord = serde_json::from_slice(&v?)?;
            if rec.owner == owner {
                out.push(rec);
            }
        }
        Ok(out)
    }

    fn prune_pair_codes(&self, cutoff: u64) -> Result<usize> {
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

    fn task(&self, id: &str) -> Result<Option<TaskRecord>> {
        get(&self.tasks, id.as_bytes())
    }

    fn put_task(&self, rec: &TaskRecord) -> Result<()> {
        let write = TaskWrite::new(rec)?;
        self.task_trees()
            .as_slice()
            .transaction(|t| {
                let tx = TaskTx::of(t)?;
                let old = tx.stored_facts(&write.id)?;
                tx.write(&write, old.as_ref())
            })
            .map_err(tx_error)
    }

    fn put_task_audited(&self, rec: &TaskRecord, entry: &AuditEntry) -> Result<AuditEntry> {
        let write = TaskWrite::new(rec)?;
        let ((), entry) = self.audited(&self.task_trees(), entry, |t| {
            let tx = TaskTx::of(t)?;
            let old = tx.stored_facts(&write.id)?;
            tx.write(&write, old.as_ref())
        })?;
        Ok(entry)
    }

    fn admit_task(
        &self,
        rec: &TaskRecord,
        entry: Option<&AuditEntry>,
        limits: &TaskLimits,
    ) -> Result<Admission> {
        // The counts are read outside the write's transaction (a sled transaction cannot scan an index), but
        // under the admissions lock, which no other admission can pass until this one has written its task:
        // see `admissions`.
        let _admitting = self.admissions.lock().unwrap_or_else(|p| p.into_inner());
        let open = self.open_tasks(&rec.agent)?;
        if let Some(refused) =
            limits.refuses(self.open_tasks_of_user(&rec.spec.requester.user)?, &open)
        {
            return Ok(refused);
        }
        let write = TaskWrite::new(rec)?;
        let new_task = |t: &[TransactionalTree]| {
            let tx = TaskTx::of(t)?;
            if tx.stored_facts(&write.id)?.is_some() {
                return Err(ConflictableTransactionError::Abort(StoreError::Conflict));
            }
            tx.write(&write, None)
        };
        match entry {
            None => {
                self.task_trees()
                    .as_slice()
                    .transaction(|t| new_task(t))
                    .map_err(tx_error)?;
                Ok(Admission::Admitted(None))
            }
            Some(entry) => {
                let ((), entry) = self.audited(&self.task_trees(), entry, new_task)?;
                Ok(Admission::Admitted(Some(Box::new(entry))))
            }
        }
    }

    fn open_tasks(&self, agent: &Fingerprint) -> Result<Vec<TaskRecord>> {
        let mut out = Vec::new();
        for key in self.idx.open.scan_prefix(agent.0).keys() {
            let key = key?;
            let id = key
                .get(AGENT_ORDER_PREFIX..)
                .ok_or_else(|| corrupt("open task key too short"))?;
            // The index is written with the records, and a record that changed between reading the index and
            // reading it is checked again.
            if let Some(rec) = get::<TaskRecord>(&self.tasks, id)? {
                if !rec.state.is_final() {
                    out.push(rec);
                }
            }
        }
        Ok(out)
    }

    fn open_tasks_of_user(&self, user: &str) -> Result<usize> {
        let mut n = 0;
        for key in self.idx.open_by_user.scan_prefix(user_prefix(user)).keys() {
            key?;
            n += 1;
        }
        Ok(n)
    }

    fn stored_bytes_of_user(&self, user: &str) -> Result<u64> {
        match self.idx.stored_bytes.get(user.as_bytes())? {
            Some(v) => be_u64(&v),
            None => Ok(0),
        }
    }

    fn recent_tasks(
        &self,
        user: &str,
        agents: &[Fingerprint],
        limit: usize,
    ) -> Result<Vec<TaskRecord>> {
        // Both indexes keep a person's or an agent's tasks by `order`, which `next_order` hands out increasing
        // as tasks are created: newest first by order is newest first by creation. (The scan this replaced
        // sorted by (created_at, order), which agrees, except across a wall clock stepped back, where order
        // is the truer one; records from before `order` existed all have 0 and come last, by id.) So the
        // newest tasks are a merge of the ends of these ranges, and only the records returned are read.
        let user_prefix = user_prefix(user);
        let mut ranges = vec![NewestFirst::new(
            self.idx.by_user.scan_prefix(&user_prefix),
            user_prefix.len(),
        )?];
        for agent in agents {
            ranges.push(NewestFirst::new(
                self.idx.by_agent.scan_prefix(agent.0),
                agent.0.len(),
            )?);
        }
        let mut out = Vec::new();
        // A task both asked for by `user` and run on one of `agents` is in two ranges; the merge takes both
        // copies one after the other, so remembering the last one taken is enough to take it once.
        let mut last: Option<(u64, Vec<u8>)> = None;
        while out.len() < limit {
            let Some(newest) = ranges
                .iter()
                .enumerate()
                .filter_map(|(i, r)| r.head.as_ref().map(|h| (h, i)))
                .max()
                .map(|(_, i)| i)
            else {
                break;
            };
            let Some(head) = ranges[newest].next()? else {
                break;
            };
            if last.as_ref() == Some(&head) {
                continue;
            }
            if let Some(rec) = get(&self.tasks, &head.1)? {
                out.push(rec);
            }
            last = Some(head);
        }
        Ok(out)
    }

    fn tasks_with_session(&self, agent: &Fingerprint, session: &str) -> Result<Vec<TaskRecord>> {
        let prefix = session_prefix(&agent.0, session.as_bytes());
        let mut out = Vec::new();
        for key in self.idx.by_session.scan_prefix(&prefix).keys() {
            let key = key?;
            let id = key
                .get(prefix.len()..)
                .ok_or_else(|| corrupt("session key too short"))?;
            // Checked again on the record, which another write may have changed since the index was read.
            if let Some(rec) = get::<TaskRecord>(&self.tasks, id)? {
                if rec.agent == *agent && rec.session_id.as_deref() == Some(session) {
                    out.push(rec);
                }
            }
        }
        Ok(out)
    }

    fn ended_before(
        &self,
        cutoff: u64,
        limit: usize,
        after: Option<&TaskRecord>,
    ) -> Result<Vec<TaskRecord>> {
        // The cursor is where the previous batch's last task was in the index, whatever happened to that task
        // since; the next batch starts strictly after it.
        let from = match after {
            Some(rec) if rec.updated_at >= cutoff => return Ok(Vec::new()),
            Some(rec) => Bound::Excluded(ended_key(rec.updated_at, rec.spec.task.as_bytes())),
            None => Bound::Unbounded,
        };
        // Every key of a task that ended before `cutoff` sorts below the bare `cutoff`.
        let to = Bound::Excluded(cutoff.to_be_bytes().to_vec());
        let mut out = Vec::new();
        for key in self.idx.ended.range::<Vec<u8>, _>((from, to)).keys() {
            if out.len() >= limit {
                break;
            }
            let key = key?;
            let id = key
                .get(8..)
                .ok_or_else(|| corrupt("ended task key too short"))?;
            // A task that changed since the index was read (a late event) is judged by its record; if it still
            // qualifies, a later batch or the next prune finds it under its new time.
            if let Some(rec) = get::<TaskRecord>(&self.tasks, id)? {
                if rec.state.is_final() && rec.updated_at < cutoff {
                    out.push(rec);
                }
            }
        }
        Ok(out)
    }

    fn delete_task(&self, rec: &TaskRecord) -> Result<Option<usize>> {
        let expected = serde_json::to_vec(rec)?;
        let id = rec.spec.task.as_bytes();
        let removed = self
            .task_trees()
            .as_slice()
            .transaction(|t| {
                let tx = TaskTx::of(t)?;
                if tx.tasks.get(id)?.as_deref() != Some(expected.as_slice()) {
                    return Ok(false);
                }
                let old = tx.stored_facts(id)?;
                tx.tasks.remove(id)?;
                tx.facts.remove(id)?;
                tx.reindex(id, old.as_ref(), None)?;
                Ok(true)
            })
            .map_err(tx_error)?;
        if !removed {
            return Ok(None);
        }
        // Outside the transaction (a range cannot be read in one): the record is gone, so no run of events is
        // written for it any more (see `append_event_runs`), and what is left here is only deleted.
        let (from, to) = (
            event_key(&rec.spec.task, 0),
            event_key(&rec.spec.task, u64::MAX),
        );
        let mut n = 0;
        for kv in self.events.range(from..=to) {
            let (key, value) = kv?;
            n += stored_events(&key, &value)?.len();
            self.events.remove(key)?;
        }
        self.task_threads.remove(id)?;
        for key in self
            .chains_by_task
            .scan_prefix(task_prefix(&rec.spec.task))
            .keys()
        {
            let key = key?;
            let thread = &key[rec.spec.task.len() + 1..];
            if let Some(chain) = self.thread_chains.get(thread)? {
                if chain_task(&chain)? == rec.spec.task.as_bytes() {
                    self.thread_chains.remove(thread)?;
                }
            }
            self.chains_by_task.remove(key)?;
        }
        for key in self
            .approval_answers
            .scan_prefix(task_prefix(&rec.spec.task))
            .keys()
        {
            self.approval_answers.remove(key?)?;
        }
        self.delete_task_files(&rec.spec.task)?;
        Ok(Some(n))
    }

    fn append_event_runs(&self, runs: &[EventRun<'_>]) -> Result<Vec<bool>> {
        struct Prepared {
            write: TaskWrite,
            /// The run's stored events as few values (see `run_values`).
            events: Vec<(Vec<u8>, Vec<u8>)>,
        }
        // `EventRun::was_open` is not needed here: the stored facts say what the task was.
        let prepared = runs
            .iter()
            .map(|run| {
                Ok(Prepared {
                    write: TaskWrite::new(run.task)?,
                    events: run_values(&run.task.spec.task, run.events),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let mut trees = vec![&self.events];
        trees.extend(self.task_trees());
        trees
            .as_slice()
            .transaction(|t| {
                let [events, t @ ..] = t.as_slice() else {
                    return Err(missing_trees());
                };
                let tx = TaskTx::of(t)?;
                let mut written = Vec::with_capacity(prepared.len());
                for p in &prepared {
                    // The facts, not the record, are read: they say whether the task still exists (one deleted
                    // by retention is not brought back by a late run) and what its index entries and stored
                    // bytes were, without decoding its JSON.
                    let Some(old) = tx.stored_facts(&p.write.id)? else {
                        written.push(false);
                        continue;
                    };
                    for (key, value) in &p.events {
                        events.insert(key.as_slice(), value.as_slice())?;
                    }
                    tx.write(&p.write, Some(&old))?;
                    written.push(true);
                }
                Ok(written)
            })
            .map_err(tx_error)
    }

    fn event_bytes(&self, task: &str, after: u64) -> Result<Vec<(u64, Vec<u8>)>> {
        let next = after.saturating_add(1);
        // A run is stored under its first sequence number, so the event after `after` may sit in the value
        // stored at or before it: start from the last key at or below it.
        let start = match self
            .events
            .range(event_key(task, 0)..=event_key(task, next))
            .keys()
            .next_back()
        {
            Some(key) => key?.to_vec(),
            None => event_key(task, next),
        };
        let mut out = Vec::new();
        for kv in self.events.range(start..=event_key(task, u64::MAX)) {
            let (key, value) = kv?;
            out.extend(
                stored_events(&key, &value)?
                    .into_iter()
                    .filter(|(seq, _)| *seq > after),
            );
        }
        Ok(out)
    }

    fn share(&self, owner: &str, grantee: &str) -> Result<Option<ShareRecord>> {
        get(&self.shares, &share_key(owner, grantee))
    }

    fn put_share_audited(
        &self,
        rec: &ShareRecord,
        entry: &dyn Fn(Option<&ShareRecord>) -> AuditEntry,
    ) -> Result<(Option<ShareRecord>, AuditEntry)> {
        let (key, value) = (
            share_key(&rec.owner, &rec.grantee),
            serde_json::to_vec(rec)?,
        );
        let by_grantee = grantee_key(&rec.grantee, &rec.owner);
        self.audited_with(&[&self.shares, &self.shares_by_grantee], |t| {
            let before: Option<ShareRecord> = match t[0].insert(key.as_slice(), value.as_slice())? {
                Some(old) => Some(serde_json::from_slice(&old).map_err(fail)?),
                None => None,
            };
            t[1].insert(by_grantee.as_slice(), &[])?;
            let e = entry(before.as_ref());
            Ok((before, e))
        })
    }

    fn remove_share_audited(
        &self,
        owner: &str,
        grantee: &str,
        entry: &dyn Fn(&ShareRecord) -> AuditEntry,
    ) -> Result<Option<(ShareRecord, AuditEntry)>> {
        let key = share_key(owner, grantee);
        // Checked first so that removing nothing writes no entry; the transaction checks again.
        if self.shares.get(&key)?.is_none() {
            return Ok(None);
        }
        let by_grantee = grantee_key(grantee, owner);
        let (old, written) = self.audited_with(&[&self.shares, &self.shares_by_grantee], |t| {
            let Some(old) = t[0].remove(key.as_slice())? else {
                return Err(abort(()));
            };
            t[1].remove(by_grantee.as_slice())?;
            let old: ShareRecord = serde_json::from_slice(&old).map_err(fail)?;
            let e = entry(&old);
            Ok((old, e))
        })?;
        Ok(Some((old, written)))
    }

    fn shares_of(&self, owner: &str) -> Result<Vec<ShareRecord>> {
        self.shares
            .scan_prefix(user_prefix(owner))
            .values()
            .map(|v| Ok(serde_json::from_slice(&v?)?))
            .collect()
    }

    fn shares_to(&self, grantee: &str) -> Result<Vec<ShareRecord>> {
        let prefix = user_prefix(grantee);
        let mut out = Vec::new();
        for key in self.shares_by_grantee.scan_prefix(&prefix).keys() {
            let key = key?;
            let owner = key
                .get(prefix.len()..)
                .ok_or_else(|| corrupt("share index key too short"))?;
            if let Some(rec) = get(&self.shares, &share_key(owner, grantee))? {
                out.push(rec);
            }
        }
        Ok(out)
    }

    fn user(&self, id: &str) -> Result<UserRecord> {
        Ok(get(&self.users, id.as_bytes())?.unwrap_or_default())
    }

    fn put_user_audited(
        &self,
        id: &str,
        rec: &UserRecord,
        entry: &AuditEntry,
    ) -> Result<AuditEntry> {
        let value = serde_json::to_vec(rec)?;
        let ((), e) = self.audited(&[&self.users, &self.pool_users], entry, |t| {
            t[0].insert(id.as_bytes(), value.as_slice())?;
            if rec.in_pools() {
                t[1].insert(id.as_bytes(), &[])?;
            } else {
                t[1].remove(id.as_bytes())?;
            }
            Ok(())
        })?;
        Ok(e)
    }

    fn pool(&self, name: &str) -> Result<Option<PoolRecord>> {
        get(&self.pools, name.as_bytes())
    }

    fn pools(&self) -> Result<Vec<PoolRecord>> {
        self.pools
            .iter()
            .values()
            .map(|v| Ok(serde_json::from_slice(&v?)?))
            .collect()
    }

    fn put_pool_audited(&self, rec: &PoolRecord, entry: &AuditEntry) -> Result<AuditEntry> {
        let value = serde_json::to_vec(rec)?;
        let ((), e) = self.audited(&[&self.pools], entry, |t| {
            t[0].insert(rec.name.as_bytes(), value.as_slice())?;
            Ok(())
        })?;
        Ok(e)
    }

    fn pool_users(&self) -> Result<Vec<(String, UserRecord)>> {
        let mut out = Vec::new();
        for key in self.pool_users.iter().keys() {
            let key = key?;
            let id =
                String::from_utf8(key.to_vec()).map_err(|_| corrupt("user id is not UTF-8"))?;
            if let Some(rec) = get::<UserRecord>(&self.users, &key)? {
                out.push((id, rec));
            }
        }
        Ok(out)
    }

    fn append_audit(&self, entry: &AuditEntry) -> Result<AuditEntry> {
        Ok(self.audited(&[], entry, |_| Ok(()))?.1)
    }

    fn audit_where(
        &self,
        before: Option<u64>,
        limit: usize,
        keep: &mut dyn FnMut(&AuditEntry) -> bool,
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

    fn audit_of_owner(
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

    fn prune_audit(&self, cutoff: u64) -> Result<usize> {
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

    fn audit_len(&self) -> Result<usize> {
        Ok(self.audit.len())
    }

    fn put_task_files(&self, task: &str, files: &[Attachment]) -> Result<()> {
        self.delete_task_files(task)?;
        let mut batch = sled::Batch::default();
        for (i, f) in files.iter().enumerate() {
            batch.insert(file_key(task, i as u32), file_value(f)?);
        }
        self.task_files.apply_batch(batch)?;
        Ok(())
    }

    fn task_files(&self, task: &str) -> Result<Vec<Attachment>> {
        self.task_files
            .scan_prefix(file_key(task, 0).split_at(task.len() + 1).0)
            .values()
            .map(|v| file_of(&v?))
            .collect()
    }

    fn delete_task_files(&self, task: &str) -> Result<()> {
        let mut batch = sled::Batch::default();
        for key in self
            .task_files
            .scan_prefix(file_key(task, 0).split_at(task.len() + 1).0)
            .keys()
        {
            batch.remove(key?);
        }
        self.task_files.apply_batch(batch)?;
        Ok(())
    }

    fn put_thread_mark(&self, task: &str, mark: &[u8]) -> Result<()> {
        self.thread_marks.insert(task.as_bytes(), mark)?;
        Ok(())
    }

    fn delete_thread_mark(&self, task: &str) -> Result<()> {
        self.thread_marks.remove(task.as_bytes())?;
        Ok(())
    }

    fn thread_mark(&self, task: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.thread_marks.get(task.as_bytes())?.map(|v| v.to_vec()))
    }

    fn thread_mark_bytes(&self) -> Result<Vec<(String, Vec<u8>)>> {
        self.thread_marks
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                Ok((String::from_utf8_lossy(&k).into_owned(), v.to_vec()))
            })
            .collect()
    }

    fn put_task_thread(&self, task: &str, thread: u64) -> Result<()> {
        // Nothing for a task that is not stored: the link would outlive nothing.
        if !self.tasks.contains_key(task.as_bytes())? {
            return Ok(());
        }
        self.task_threads
            .insert(task.as_bytes(), &thread.to_be_bytes())?;
        Ok(())
    }

    fn task_threads(&self, tasks: &[String]) -> Result<Vec<(String, u64)>> {
        let mut out = Vec::new();
        for task in tasks {
            if let Some(v) = self.task_threads.get(task.as_bytes())? {
                let bytes: [u8; 8] = v
                    .as_ref()
                    .try_into()
                    .map_err(|_| corrupt("a task's thread id is not 8 bytes"))?;
                out.push((task.clone(), u64::from_be_bytes(bytes)));
            }
        }
        Ok(out)
    }

    fn put_thread_chain(&self, thread: u64, task: &str, chain: &[u8]) -> Result<()> {
        // Nothing for a task that is not stored: the chain would outlive nothing.
        if !self.tasks.contains_key(task.as_bytes())? {
            return Ok(());
        }
        let mut value = Vec::with_capacity(task.len() + 1 + chain.len());
        value.extend_from_slice(task.as_bytes());
        value.push(0);
        value.extend_from_slice(chain);
        let mut index = task_prefix(task);
        index.extend_from_slice(&thread.to_be_bytes());
        self.chains_by_task.insert(index, &[])?;
        if let Some(old) = self.thread_chains.insert(thread.to_be_bytes(), value)? {
            let old = chain_task(&old)?;
            if old != task.as_bytes() {
                let mut index = old.to_vec();
                index.push(0);
                index.extend_from_slice(&thread.to_be_bytes());
                self.chains_by_task.remove(index)?;
            }
        }
        Ok(())
    }

    fn thread_chain(&self, thread: u64) -> Result<Option<Vec<u8>>> {
        let Some(value) = self.thread_chains.get(thread.to_be_bytes())? else {
            return Ok(None);
        };
        let task = chain_task(&value)?.len();
        Ok(Some(value[task + 1..].to_vec()))
    }

    fn add_answer(
        &self,
        task: &str,
        approval: &str,
        question: u8,
        answer: &str,
    ) -> Result<BTreeMap<u8, String>> {
        // Nothing kept for a task that is not stored (the decision will be refused): just this answer.
        if !self.tasks.contains_key(task.as_bytes())? {
            return Ok(BTreeMap::from([(question, answer.to_string())]));
        }
        let mut key = task_prefix(task);
        key.extend_from_slice(approval.as_bytes());
        // `update_and_fetch` retries the closure until its compare-and-swap wins: the merge is atomic.
        let merged = self.approval_answers.update_and_fetch(&key, |old| {
            let mut answers: BTreeMap<u8, String> = old
                .and_then(|v| serde_json::from_slice(v).ok())
                .unwrap_or_default();
            answers.insert(question, answer.to_string());
            serde_json::to_vec(&answers).ok()
        })?;
        let merged = merged.ok_or_else(|| corrupt("answers could not be encoded"))?;
        Ok(serde_json::from_slice(&merged)?)
    }

    fn put_web_session(&self, rec: &WebSessionRecord) -> Result<()> {
        let value = serde_json::to_vec(rec)?;
        let hash = rec.hash.as_bytes();
        self.web_tx(|recs, by_user| {
            if let Some(old) = recs.insert(hash, value.as_slice())? {
                let old: WebSessionRecord = serde_json::from_slice(&old).map_err(fail)?;
                by_user.remove(web_user_key(&old.user, hash))?;
            }
            by_user.insert(web_user_key(&rec.user, hash), &[])?;
            Ok(())
        })
    }

    fn web_session(&self, hash: &str, now: u64) -> Result<Option<WebSessionRecord>> {
        Ok(
            get::<WebSessionRecord>(&self.web_sessions, hash.as_bytes())?
                .filter(|r| r.live_at(now)),
        )
    }

    fn take_web_session(
        &self,
        hash: &str,
        kind: WebSessionKind,
        now: u64,
    ) -> Result<Option<WebSessionRecord>> {
        self.remove_web_session_if(hash.as_bytes(), |r| r.kind == kind && r.live_at(now))
    }

    fn touch_web_session(&self, hash: &str, now: u64) -> Result<Option<WebSessionRecord>> {
        let hash = hash.as_bytes();
        self.web_tx(|recs, _| {
            let Some(v) = recs.get(hash)? else {
                return Ok(None);
            };
            let mut rec: WebSessionRecord = serde_json::from_slice(&v).map_err(fail)?;
            if !rec.live_at(now) {
                return Ok(None);
            }
            if now > rec.last_seen {
                rec.last_seen = now;
                recs.insert(hash, serde_json::to_vec(&rec).map_err(fail)?)?;
            }
            Ok(Some(rec))
        })
    }

    fn web_sessions_of(&self, user: &str, now: u64) -> Result<Vec<WebSessionRecord>> {
        let mut out = Vec::new();
        for hash in self.web_hashes_of(user)? {
            // An entry whose record was removed since the scan read it is simply not listed.
            if let Some(rec) = get::<WebSessionRecord>(&self.web_sessions, &hash)? {
                if rec.user == user && rec.live_at(now) {
                    out.push(rec);
                }
            }
        }
        out.sort_by(|a, b| (a.created_at, &a.hash).cmp(&(b.created_at, &b.hash)));
        Ok(out)
    }

    fn delete_web_session(&self, user: &str, id: &str) -> Result<bool> {
        for hash in self.web_hashes_of(user)? {
            if self
                .remove_web_session_if(&hash, |r| r.user == user && r.id == id)?
                .is_some()
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn delete_web_sessions_of(&self, user: &str, now: u64) -> Result<usize> {
        let mut sessions = 0;
        for hash in self.web_hashes_of(user)? {
            if let Some(rec) = self.remove_web_session_if(&hash, |r| r.user == user)? {
                if rec.kind == WebSessionKind::Session && rec.live_at(now) {
                    sessions += 1;
                }
            }
        }
        Ok(sessions)
    }

    fn prune_web_sessions(&self, now: u64) -> Result<usize> {
        let mut removed = 0;
        for hash in self.web_sessions.iter().keys() {
            // Judged again inside the removal: one used meanwhile is kept if that made it valid.
            if self
                .remove_web_session_if(&hash?, |r| !r.live_at(now))?
                .is_some()
            {
                removed += 1;
            }
        }
        Ok(removed)
    }

    fn claim_presence(&self, agent: &Fingerprint, node: &str) -> Result<Presence> {
        let presence = Presence {
            node: node.to_string(),
            epoch: self.db.generate_id()? + 1,
            since: super::now(),
        };
        put(&self.cluster, &cluster_key(b"p/", agent.0), &presence)?;
        Ok(presence)
    }

    fn release_presence(&self, agent: &Fingerprint, epoch: u64) -> Result<bool> {
        let key = cluster_key(b"p/", agent.0);
        loop {
            let Some(old) = self.cluster.get(&key)? else {
                return Ok(false);
            };
            let presence: Presence = serde_json::from_slice(&old)?;
            if presence.epoch != epoch {
                return Ok(false);
            }
            if self
                .cluster
                .compare_and_swap(&key, Some(old), None as Option<&[u8]>)?
                .is_ok()
            {
                return Ok(true);
            }
        }
    }

    fn presence(&self, agent: &Fingerprint) -> Result<Option<Presence>> {
        get(&self.cluster, &cluster_key(b"p/", agent.0))
    }

    fn presences(&self) -> Result<Vec<(Fingerprint, Presence)>> {
        let mut out = Vec::new();
        for kv in self.cluster.scan_prefix(b"p/") {
            let (k, v) = kv?;
            let fp: [u8; 32] = k[2..].try_into().map_err(|_| corrupt("presence key"))?;
            out.push((Fingerprint(fp), serde_json::from_slice(&v)?));
        }
        Ok(out)
    }

    fn dispatch_task(&self, rec: &TaskRecord, epoch: u64) -> Result<bool> {
        let write = TaskWrite::new(rec)?;
        let presence_key = cluster_key(b"p/", rec.agent.0);
        let mut trees = self.task_trees().to_vec();
        trees.push(&self.cluster);
        trees
            .as_slice()
            .transaction(|t| {
                let tx = TaskTx::of(&t[..9])?;
                let current = match t[9].get(&presence_key)? {
                    Some(v) => serde_json::from_slice::<Presence>(&v).map_err(fail)?.epoch,
                    None => return Ok(false),
                };
                if current != epoch || !still_queued(&tx, &write.id)? {
                    return Ok(false);
                }
                let old = tx.stored_facts(&write.id)?;
                tx.write(&write, old.as_ref())?;
                Ok(true)
            })
            .map_err(tx_error)
    }

    fn finish_queued(&self, rec: &TaskRecord) -> Result<bool> {
        let write = TaskWrite::new(rec)?;
        self.task_trees()
            .as_slice()
            .transaction(|t| {
                let tx = TaskTx::of(t)?;
                if !still_queued(&tx, &write.id)? {
                    return Ok(false);
                }
                let old = tx.stored_facts(&write.id)?;
                tx.write(&write, old.as_ref())?;
                Ok(true)
            })
            .map_err(tx_error)
    }

    fn put_node(&self, rec: &NodeRecord) -> Result<()> {
        put(&self.cluster, &cluster_key(b"n/", rec.id.as_bytes()), rec)
    }

    fn nodes(&self) -> Result<Vec<NodeRecord>> {
        self.cluster
            .scan_prefix(b"n/")
            .map(|kv| Ok(serde_json::from_slice(&kv?.1)?))
            .collect()
    }

    fn remove_node(&self, id: &str) -> Result<bool> {
        Ok(self
            .cluster
            .remove(cluster_key(b"n/", id.as_bytes()))?
            .is_some())
    }

    fn lease(&self, name: &str, holder: &str, ttl: Duration) -> Result<bool> {
        let key = cluster_key(b"l/", name.as_bytes());
        loop {
            let old = self.cluster.get(&key)?;
            let now = now_ms();
            if let Some(v) = &old {
                let lease: Lease = serde_json::from_slice(v)?;
                if lease.holder != holder && lease.until_ms > now {
                    return Ok(false);
                }
            }
            let new = serde_json::to_vec(&Lease {
                holder: holder.to_string(),
                until_ms: now + ttl.as_millis() as u64,
            })?;
            if self.cluster.compare_and_swap(&key, old, Some(new))?.is_ok() {
                return Ok(true);
            }
        }
    }

    fn release_lease(&self, name: &str, holder: &str) -> Result<()> {
        let key = cluster_key(b"l/", name.as_bytes());
        if let Some(v) = self.cluster.get(&key)? {
            let lease: Lease = serde_json::from_slice(&v)?;
            if lease.holder == holder {
                // Lost to a concurrent taker: then it is theirs, which is what releasing wants.
                let _ = self
                    .cluster
                    .compare_and_swap(&key, Some(v), None as Option<&[u8]>)?;
            }
        }
        Ok(())
    }

    fn take_token(&self, bucket: &str, burst: u32, per_token: Duration) -> Result<bool> {
        let key = cluster_key(b"b/", bucket.as_bytes());
        let per_ms = per_token.as_millis().max(1) as f64;
        loop {
            let old = self.cluster.get(&key)?;
            let now = now_ms();
            let mut b: Bucket = match &old {
                Some(v) => serde_json::from_slice(v)?,
                None => Bucket {
                    tokens: f64::from(burst),
                    at_ms: now,
                },
            };
            b.tokens =
                (b.tokens + now.saturating_sub(b.at_ms) as f64 / per_ms).min(f64::from(burst));
            b.at_ms = now;
            let taken = b.tokens >= 1.0;
            if taken {
                b.tokens -= 1.0;
            }
            let new = serde_json::to_vec(&b)?;
            if self.cluster.compare_and_swap(&key, old, Some(new))?.is_ok() {
                return Ok(taken);
            }
        }
    }

    fn export(&self, sink: &mut dyn FnMut(Exported) -> Result<()>) -> Result<()> {
        // The dashboard's links and sessions stay behind: see `Store::export`.
        for v in self.agents.iter().values() {
            sink(Exported::Agent(serde_json::from_slice(&v?)?))?;
        }
        for v in self.pair_codes.iter().values() {
            sink(Exported::PairCode(serde_json::from_slice(&v?)?))?;
        }
        for kv in self.users.iter() {
            let (k, v) = kv?;
            let id = String::from_utf8(k.to_vec()).map_err(|_| corrupt("user id is not UTF-8"))?;
            sink(Exported::User(id, serde_json::from_slice(&v)?))?;
        }
        for v in self.shares.iter().values() {
            sink(Exported::Share(serde_json::from_slice(&v?)?))?;
        }
        for v in self.pools.iter().values() {
            sink(Exported::Pool(serde_json::from_slice(&v?)?))?;
        }
        for v in self.tasks.iter().values() {
            let rec: TaskRecord = serde_json::from_slice(&v?)?;
            let events = self.event_bytes(&rec.spec.task, 0)?;
            sink(Exported::Task(rec, events))?;
        }
        for v in self.audit.iter().values() {
            sink(Exported::Audit(serde_json::from_slice(&v?)?))?;
        }
        for (task, mark) in self.thread_mark_bytes()? {
            sink(Exported::ThreadMark(task, mark))?;
        }
        for kv in self.task_threads.iter() {
            let (k, v) = kv?;
            let task =
                String::from_utf8(k.to_vec()).map_err(|_| corrupt("task id is not UTF-8"))?;
            let bytes: [u8; 8] = v
                .as_ref()
                .try_into()
                .map_err(|_| corrupt("a task's thread id is not 8 bytes"))?;
            sink(Exported::TaskThread(task, u64::from_be_bytes(bytes)))?;
        }
        for kv in self.thread_chains.iter() {
            let (k, v) = kv?;
            let thread: [u8; 8] = k
                .as_ref()
                .try_into()
                .map_err(|_| corrupt("a thread id is not 8 bytes"))?;
            let task = chain_task(&v)?;
            let task =
                String::from_utf8(task.to_vec()).map_err(|_| corrupt("task id is not UTF-8"))?;
            let chain = v[task.len() + 1..].to_vec();
            sink(Exported::ThreadChain(
                u64::from_be_bytes(thread),
                task,
                chain,
            ))?;
        }
        for kv in self.cluster.scan_prefix(b"s/") {
            let (k, v) = kv?;
            let name = String::from_utf8(k[2..].to_vec()).map_err(|_| corrupt("secret name"))?;
            sink(Exported::Secret(name, v.to_vec()))?;
        }
        Ok(())
    }

    fn import(&self, records: &[Exported]) -> Result<()> {
        for record in records {
            match record {
                Exported::Agent(rec) => self.put_agent(rec)?,
                Exported::PairCode(rec) => self.put_pair_code(rec)?,
                Exported::User(id, rec) => {
                    put(&self.users, id.as_bytes(), rec)?;
                    if rec.in_pools() {
                        self.pool_users.insert(id.as_bytes(), &[])?;
                    }
                }
                Exported::Pool(rec) => put(&self.pools, rec.name.as_bytes(), rec)?,
                Exported::Share(rec) => {
                    put(&self.shares, &share_key(&rec.owner, &rec.grantee), rec)?;
                    self.shares_by_grantee
                        .insert(grantee_key(&rec.grantee, &rec.owner), &[])?;
                }
                Exported::Task(rec, events) => {
                    self.put_task(rec)?;
                    if !events.is_empty() {
                        let run: Vec<(u64, Option<&[u8]>)> = events
                            .iter()
                            .map(|(s, b)| (*s, Some(b.as_slice())))
                            .collect();
                        self.append_event_runs(&[EventRun {
                            task: rec,
                            events: &run,
                            was_open: None,
                        }])?;
                    }
                }
                Exported::Audit(entry) => {
                    put(&self.audit, &entry.seq.to_be_bytes(), entry)?;
                    self.audit_owner
                        .insert(audit_owner_key(&entry.owner, entry.seq), &[])?;
                    // Later entries follow the highest number imported.
                    self.meta.fetch_and_update(AUDIT_SEQ, |old| {
                        let last = old
                            .and_then(|v| v.try_into().ok())
                            .map_or(0, u64::from_be_bytes);
                        Some(last.max(entry.seq).to_be_bytes().to_vec())
                    })?;
                }
                Exported::ThreadMark(task, mark) => self.put_thread_mark(task, mark)?,
                Exported::TaskThread(task, thread) => self.put_task_thread(task, *thread)?,
                Exported::ThreadChain(thread, task, chain) => {
                    self.put_thread_chain(*thread, task, chain)?
                }
                Exported::Secret(name, value) => {
                    self.cluster
                        .insert(cluster_key(b"s/", name.as_bytes()), value.as_slice())?;
                }
            }
        }
        Ok(())
    }

    fn prune_buckets(&self, idle: Duration) -> Result<usize> {
        let cutoff = now_ms().saturating_sub(idle.as_millis() as u64);
        let mut n = 0;
        for kv in self.cluster.scan_prefix(b"b/") {
            let (key, value) = kv?;
            let bucket: Bucket = serde_json::from_slice(&value)?;
            // Only if unchanged: a token taken meanwhile keeps the bucket.
            if bucket.at_ms < cutoff
                && self
                    .cluster
                    .compare_and_swap(&key, Some(value), None as Option<&[u8]>)?
                    .is_ok()
            {
                n += 1;
            }
        }
        Ok(n)
    }

    fn shared_secret(&self, name: &str, proposed: &[u8]) -> Result<Vec<u8>> {
        let key = cluster_key(b"s/", name.as_bytes());
        match self
            .cluster
            .compare_and_swap(&key, None as Option<&[u8]>, Some(proposed))?
        {
            Ok(()) => Ok(proposed.to_vec()),
            Err(e) => Ok(e.current.map(|v| v.to_vec()).unwrap_or_default()),
        }
    }
}

/// One index range of tasks read from its end, for the merge in [`SledStore::recent_tasks`]: `head` is the
/// (order, task id) of the newest task not taken yet.
struct NewestFirst {
    keys: std::iter::Rev<sled::Iter>,
    /// Length of the key before the order.
    prefix: usize,
    head: Option<(u64, Vec<u8>)>,
}

impl NewestFirst {
    fn new(range: sled::Iter, prefix: usize) -> Result<Self> {
        let mut r = Self {
            keys: range.rev(),
            prefix,
            head: None,
        };
        r.next()?;
        Ok(r)
    }

    /// Takes the head and reads the next one.
    fn next(&mut self) -> Result<Option<(u64, Vec<u8>)>> {
        let next = match self.keys.next() {
            Some(kv) => {
                let (key, _) = kv?;
                let mut rest = key
                    .get(self.prefix..)
                    .ok_or_else(|| corrupt("task index key too short"))?;
                let order = take_u64(&mut rest)?;
                Some((order, rest.to_vec()))
            }
            None => None,
        };
        Ok(std::mem::replace(&mut self.head, next))
    }
}

/// A task record's write, prepared outside a transaction (which may run its closure more than once).
struct TaskWrite {
    id: Vec<u8>,
    value: Vec<u8>,
    facts: TaskFacts,
    encoded_facts: Vec<u8>,
}

impl TaskWrite {
    fn new(rec: &TaskRecord) -> Result<Self> {
        let facts = TaskFacts::of(rec);
        Ok(Self {
            id: rec.spec.task.as_bytes().to_vec(),
            value: serde_json::to_vec(rec)?,
            encoded_facts: facts.encode(),
            facts,
        })
    }
}

/// `tasks` and its indexes inside one transaction over [`SledStore::task_trees`].
struct TaskTx<'a> {
    tasks: &'a TransactionalTree,
    facts: &'a TransactionalTree,
    /// In the order of [`TaskFacts::keys`].
    keyed: [&'a TransactionalTree; 6],
    stored_bytes: &'a TransactionalTree,
}

impl<'a> TaskTx<'a> {
    fn of(t: &'a [TransactionalTree]) -> TxResult<Self> {
        let [tasks, facts, open, open_by_user, by_user, by_agent, by_session, ended, stored_bytes] =
            t
        else {
            return Err(missing_trees());
        };
        Ok(Self {
            tasks,
            facts,
            keyed: [open, open_by_user, by_user, by_agent, by_session, ended],
            stored_bytes,
        })
    }

    /// The facts of the stored record, `None` when there is no such task.
    fn stored_facts(&self, id: &[u8]) -> TxResult<Option<TaskFacts>> {
        if let Some(v) = self.facts.get(id)? {
            return TaskFacts::decode(&v).map(Some).map_err(fail);
        }
        // Every write stores a record's facts with it, so this is a new task; the record is read to make sure,
        // which costs a lookup only when the facts are missing.
        match self.tasks.get(id)? {
            Some(v) => {
                let rec: TaskRecord = serde_json::from_slice(&v).map_err(fail)?;
                Ok(Some(TaskFacts::of(&rec)))
            }
            None => Ok(None),
        }
    }

    /// Stores the record and moves its index entries and its requester's stored bytes from `old`, the facts of
    /// the record it replaces.
    fn write(&self, w: &TaskWrite, old: Option<&TaskFacts>) -> TxResult<()> {
        self.tasks.insert(w.id.as_slice(), w.value.as_slice())?;
        if old == Some(&w.facts) {
            return Ok(());
        }
        self.facts
            .insert(w.id.as_slice(), w.encoded_facts.as_slice())?;
        self.reindex(&w.id, old, Some(&w.facts))
    }

    /// Replaces the index entries made from `old` by those made from `new` (either may be absent: a new task,
    /// a deleted one), touching only the entries that differ. A run of output changes none of them except the
    /// stored bytes.
    fn reindex(&self, id: &[u8], old: Option<&TaskFacts>, new: Option<&TaskFacts>) -> TxResult<()> {
        let old_keys = old.map(|f| f.keys(id)).unwrap_or_default();
        let new_keys = new.map(|f| f.keys(id)).unwrap_or_default();
        for ((tree, old), new) in self.keyed.iter().zip(old_keys).zip(new_keys) {
            if old == new {
                continue;
            }
            if let Some(key) = old {
                tree.remove(key)?;
            }
            if let Some(key) = new {
                tree.insert(key, &[])?;
            }
        }
        match (old, new) {
            (Some(o), Some(n)) if o.user == n.user => {
                self.add_stored(&n.user, n.output_bytes, o.output_bytes)
            }
            _ => {
                if let Some(o) = old {
                    self.add_stored(&o.user, 0, o.output_bytes)?;
                }
                if let Some(n) = new {
                    self.add_stored(&n.user, n.output_bytes, 0)?;
                }
                Ok(())
            }
        }
    }

    /// Moves `user`'s stored-bytes count by `add - sub`.
    fn add_stored(&self, user: &[u8], add: u64, sub: u64) -> TxResult<()> {
        if add == sub {
            return Ok(());
        }
        let was = match self.stored_bytes.get(user)? {
            Some(v) => be_u64(&v).map_err(fail)?,
            None => 0,
        };
        match was.saturating_sub(sub).saturating_add(add) {
            0 => self.stored_bytes.remove(user)?,
            now => self.stored_bytes.insert(user, &now.to_be_bytes())?,
        };
        Ok(())
    }
}

/// What a task's index entries are made of: the fields of its record that the indexes use.
///
/// Stored per task in `task_facts` (see [`encode`](Self::encode)), so that replacing a record finds the
/// entries to replace by reading a few dozen bytes instead of decoding the whole old record.
#[derive(Debug, Clone, PartialEq)]
struct TaskFacts {
    order: u64,
    updated_at: u64,
    output_bytes: u64,
    is_final: bool,
    agent: [u8; 32],
    /// The requester.
    user: Vec<u8>,
    session: Option<Vec<u8>>,
}

/// [`TaskFacts`] flags.
const FINAL: u8 = 1;
const HAS_SESSION: u8 = 2;

impl TaskFacts {
    fn of(rec: &TaskRecord) -> Self {
        Self {
            order: rec.order,
            updated_at: rec.updated_at,
            output_bytes: rec.output_bytes,
            is_final: rec.state.is_final(),
            agent: rec.agent.0,
            user: rec.spec.requester.user.as_bytes().to_vec(),
            session: rec.session_id.as_ref().map(|s| s.as_bytes().to_vec()),
        }
    }

    /// Order, updated_at and output_bytes (big-endian u64 each), flags (one byte: [`FINAL`], [`HAS_SESSION`]),
    /// the agent's fingerprint (32 bytes), the requester's length (big-endian u64) and bytes, then the session
    /// id to the end.
    fn encode(&self) -> Vec<u8> {
        let session = self.session.as_deref().unwrap_or_default();
        let mut b = Vec::with_capacity(8 * 4 + 1 + 32 + self.user.len() + session.len());
        b.extend_from_slice(&self.order.to_be_bytes());
        b.extend_from_slice(&self.updated_at.to_be_bytes());
        b.extend_from_slice(&self.output_bytes.to_be_bytes());
        let mut flags = 0;
        if self.is_final {
            flags |= FINAL;
        }
        if self.session.is_some() {
            flags |= HAS_SESSION;
        }
        b.push(flags);
        b.extend_from_slice(&self.agent);
        b.extend_from_slice(&(self.user.len() as u64).to_be_bytes());
        b.extend_from_slice(&self.user);
        b.extend_from_slice(session);
        b
    }

    fn decode(mut b: &[u8]) -> Result<Self> {
        let (order, updated_at, output_bytes) =
            (take_u64(&mut b)?, take_u64(&mut b)?, take_u64(&mut b)?);
        let (&flags, rest) = b
            .split_first()
            .ok_or_else(|| corrupt("task facts too short"))?;
        let (agent, mut rest) = rest
            .split_first_chunk::<32>()
            .ok_or_else(|| corrupt("task facts too short"))?;
        let user_len = usize::try_from(take_u64(&mut rest)?)
            .map_err(|_| corrupt("task facts: requester too long"))?;
        let (user, session) = rest
            .split_at_checked(user_len)
            .ok_or_else(|| corrupt("task facts too short"))?;
        Ok(Self {
            order,
            updated_at,
            output_bytes,
            is_final: flags & FINAL != 0,
            agent: *agent,
            user: user.to_vec(),
            session: (flags & HAS_SESSION != 0).then(|| session.to_vec()),
        })
    }

    /// The task's key in each index of keys without values, in the order of [`TaskIndexes::keyed`]: `open`,
    /// `open_by_user`, `by_user`, `by_agent`, `by_session`, `ended`; `None` where it has no entry.
    fn keys(&self, id: &[u8]) -> [Option<Vec<u8>>; 6] {
        let open = !self.is_final;
        [
            open.then(|| agent_order_key(&self.agent, self.order, id)),
            open.then(|| user_open_key(&self.user, id)),
            Some(user_task_key(&self.user, self.order, id)),
            Some(agent_order_key(&self.agent, self.order, id)),
            self.session
                .as_ref()
                .map(|s| session_key(&self.agent, s, id)),
            self.is_final.then(|| ended_key(self.updated_at, id)),
        ]
    }
}

type TxResult<T> = ConflictableTransactionResult<T, StoreError>;

/// Aborts a transaction with [`StoreError::Conflict`]: what it was to change is not as expected (a pairing
/// code redeemed meanwhile, a share removed meanwhile), or the audit counter is unreadable.
fn abort<E>(_: E) -> ConflictableTransactionError<StoreError> {
    ConflictableTransactionError::Abort(StoreError::Conflict)
}

/// Aborts a transaction with `e`, typically a record that does not decode.
fn fail(e: impl Into<StoreError>) -> ConflictableTransactionError<StoreError> {
    ConflictableTransactionError::Abort(e.into())
}

/// For a transaction given fewer trees than it works on: a mistake in this file, not in the data.
fn missing_trees() -> ConflictableTransactionError<StoreError> {
    fail(sled::Error::ReportableBug(
        "a store transaction is missing trees".into(),
    ))
}

fn tx_error(e: TransactionError<StoreError>) -> StoreError {
    match e {
        TransactionError::Storage(e) => StoreError::Sled(e),
        TransactionError::Abort(e) => e,
    }
}

/// Derived data that does not decode: reported like a record that does not.
/// The task a stored thread chain names: its value up to the first 0.
fn chain_task(value: &[u8]) -> Result<&[u8]> {
    let end = value
        .iter()
        .position(|b| *b == 0)
        .ok_or_else(|| corrupt("a thread chain has no task"))?;
    Ok(&value[..end])
}

/// `task`, 0: the start of every key of `task`'s approval answers.
fn task_prefix(task: &str) -> Vec<u8> {
    let mut key = task.as_bytes().to_vec();
    key.push(0);
    key
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt(<serde_json::Error as serde::de::Error>::custom(what))
}

/// Reads a big-endian u64 off the front of `b`.
fn take_u64(b: &mut &[u8]) -> Result<u64> {
    let (n, rest) = b
        .split_first_chunk::<8>()
        .ok_or_else(|| corrupt("index data too short"))?;
    *b = rest;
    Ok(u64::from_be_bytes(*n))
}

/// A value that is exactly one big-endian u64.
fn be_u64(b: &[u8]) -> Result<u64> {
    <[u8; 8]>::try_from(b)
        .map(u64::from_be_bytes)
        .map_err(|_| corrupt("counter is not 8 bytes"))
}

/// A user id and the 0 byte that ends it in keys: user ids (Discord snowflakes, [`OPERATOR`]) never contain
/// one, so one user's keys form a range that no other user's overlap.
///
/// [`OPERATOR`]: super::OPERATOR
fn user_prefix(user: impl AsRef<[u8]>) -> Vec<u8> {
    let mut k = user.as_ref().to_vec();
    k.push(0);
    k
}

/// Open tasks by requester: user id, 0, task id.
fn user_open_key(user: &[u8], id: &[u8]) -> Vec<u8> {
    let mut k = user_prefix(user);
    k.extend_from_slice(id);
    k
}

/// The dashboard's links and sessions by user: user id, 0, hash of the secret.
fn web_user_key(user: &str, hash: &[u8]) -> Vec<u8> {
    let mut k = user_prefix(user);
    k.extend_from_slice(hash);
    k
}

/// Every task by requester: user id, 0, order (big-endian u64), task id. One user's tasks form a key range in
/// creation order, read from its end for the newest.
fn user_task_key(user: &[u8], order: u64, id: &[u8]) -> Vec<u8> {
    let mut k = user_prefix(user);
    k.extend_from_slice(&order.to_be_bytes());
    k.extend_from_slice(id);
    k
}

/// Length of [`agent_order_key`] before the task id: fingerprint, then order.
const AGENT_ORDER_PREFIX: usize = 32 + 8;

/// Tasks by agent: fingerprint (32 bytes), order (big-endian u64), task id, so one agent's tasks form a key
/// range in queue order. The id only breaks ties between records written before `order` existed (all 0).
/// `open_tasks` and `tasks_by_agent` both use it.
fn agent_order_key(agent: &[u8; 32], order: u64, id: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(AGENT_ORDER_PREFIX + id.len());
    k.extend_from_slice(agent);
    k.extend_from_slice(&order.to_be_bytes());
    k.extend_from_slice(id);
    k
}

/// The part of [`session_key`] before the task id.
fn session_prefix(agent: &[u8; 32], session: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(32 + 8 + session.len());
    k.extend_from_slice(agent);
    k.extend_from_slice(&(session.len() as u64).to_be_bytes());
    k.extend_from_slice(session);
    k
}

/// Tasks by Claude Code session: fingerprint (32 bytes), the session id's length (big-endian u64), the session
/// id, task id. Session ids come from agents; the length makes one session's key range exact whatever bytes
/// they hold (no session id is a prefix of another's range).
fn session_key(agent: &[u8; 32], session: &[u8], id: &[u8]) -> Vec<u8> {
    let mut k = session_prefix(agent, session);
    k.extend_from_slice(id);
    k
}

/// Final tasks by end time: updated_at (big-endian u64), task id. The tasks that ended before a cutoff are the
/// range below the cutoff's eight bytes, oldest first.
fn ended_key(updated_at: u64, id: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + id.len());
    k.extend_from_slice(&updated_at.to_be_bytes());
    k.extend_from_slice(id);
    k
}

/// Audit entries by owner: owner, 0, sequence number (big-endian), so one owner's entries form a key range in
/// log order.
fn audit_owner_key(owner: &str, seq: u64) -> Vec<u8> {
    let mut k = user_prefix(owner);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// Shares: owner, 0, grantee, so one owner's shares form a key range.
fn share_key(owner: impl AsRef<[u8]>, grantee: impl AsRef<[u8]>) -> Vec<u8> {
    let mut k = user_prefix(owner);
    k.extend_from_slice(grantee.as_ref());
    k
}

/// Shares by grantee: grantee, 0, owner → (), so everyone who shares with one person is a key range.
fn grantee_key(grantee: &str, owner: &str) -> Vec<u8> {
    share_key(grantee, owner)
}

/// The first byte of a value that holds several events. An event on its own is stored as its JSON, which never
/// starts with this byte, so stores written before events were packed (one value per event) read the same.
const RUN_VALUE: u8 = 0;

/// Events at least this large are stored each as its own value; smaller ones are packed together.
const PACK_BELOW: usize = 4096;
/// Bytes of events packed into one value at most.
const PACK_LIMIT: usize = 64 * 1024;

/// A run's stored events as few values: sled's cost is per inserted value, and a burst of output is tens to
/// hundreds of small events. Consecutive small events are packed into one value under the first one's key
/// ([`RUN_VALUE`], then per event its sequence number (u64) and length (u32), big-endian, and its bytes); a
/// large event, or a pack of one, is stored as the event itself. Large events gain nothing from packing: sled
/// copies their bytes either way.
fn run_values(task: &str, run: &[(u64, Option<&[u8]>)]) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut out = Vec::new();
    let mut pack: Vec<(u64, &[u8])> = Vec::new();
    let mut packed = 0;
    let flush = |pack: &mut Vec<(u64, &[u8])>, out: &mut Vec<(Vec<u8>, Vec<u8>)>| {
        match pack.as_slice() {
            [] => {}
            [(seq, event)] => out.push((event_key(task, *seq), event.to_vec())),
            [(first, _), ..] => {
                let len = pack.iter().map(|(_, e)| 12 + e.len()).sum::<usize>();
                let mut value = Vec::with_capacity(1 + len);
                value.push(RUN_VALUE);
                for (seq, event) in pack.iter() {
                    value.extend_from_slice(&seq.to_be_bytes());
                    value.extend_from_slice(&(event.len() as u32).to_be_bytes());
                    value.extend_from_slice(event);
                }
                out.push((event_key(task, *first), value));
            }
        }
        pack.clear();
    };
    for (seq, event) in run.iter().filter_map(|(seq, e)| e.map(|e| (*seq, e))) {
        if event.len() >= PACK_BELOW {
            flush(&mut pack, &mut out);
            packed = 0;
            out.push((event_key(task, seq), event.to_vec()));
            continue;
        }
        if packed + event.len() > PACK_LIMIT {
            flush(&mut pack, &mut out);
            packed = 0;
        }
        packed += event.len();
        pack.push((seq, event));
    }
    flush(&mut pack, &mut out);
    out
}

/// The events one stored value holds: a pack (see [`run_values`]), or one event under its own key.
fn stored_events(key: &[u8], value: &[u8]) -> Result<Vec<(u64, Vec<u8>)>> {
    if value.first() != Some(&RUN_VALUE) {
        let seq = key
            .len()
            .checked_sub(8)
            .and_then(|at| key[at..].try_into().ok())
            .map(u64::from_be_bytes)
            .ok_or_else(|| corrupt("an event key without its sequence number"))?;
        return Ok(vec![(seq, value.to_vec())]);
    }
    let mut out = Vec::new();
    let mut rest = &value[1..];
    while !rest.is_empty() {
        let (head, tail) = rest
            .split_at_checked(12)
            .ok_or_else(|| corrupt("a run of events cut short"))?;
        let (mut seq, mut len) = ([0; 8], [0; 4]);
        seq.copy_from_slice(&head[..8]);
        len.copy_from_slice(&head[8..]);
        let (seq, len) = (u64::from_be_bytes(seq), u32::from_be_bytes(len) as usize);
        let (event, tail) = tail
            .split_at_checked(len)
            .ok_or_else(|| corrupt("a run of events cut short"))?;
        out.push((seq, event.to_vec()));
        rest = tail;
    }
    Ok(out)
}

/// Events sort by task, then by sequence number (big-endian).
/// Key of file `index` of `task` in `task_files`: the 0 ends the id, so one task's files are one prefix.
fn file_key(task: &str, index: u32) -> Vec<u8> {
    let mut k = Vec::with_capacity(task.len() + 5);
    k.extend_from_slice(task.as_bytes());
    k.push(0);
    k.extend_from_slice(&index.to_be_bytes());
    k
}

/// A file as stored: the length of its JSON header (big-endian u32), the header (name, type), the bytes.
fn file_value(f: &Attachment) -> Result<Vec<u8>> {
    let head = serde_json::to_vec(&(&f.name, &f.media_type))?;
    let mut v = Vec::with_capacity(4 + head.len() + f.data.len());
    v.extend_from_slice(&(head.len() as u32).to_be_bytes());
    v.extend_from_slice(&head);
    v.extend_from_slice(&f.data);
    Ok(v)
}

fn file_of(v: &[u8]) -> Result<Attachment> {
    let bad = || corrupt("a stored task file is cut short");
    let len =
        u32::from_be_bytes(v.get(..4).ok_or_else(bad)?.try_into().map_err(|_| bad())?) as usize;
    let head = v.get(4..4 + len).ok_or_else(bad)?;
    let (name, media_type): (String, Option<String>) = serde_json::from_slice(head)?;
    Ok(Attachment {
        name,
        media_type,
        data: v[4 + len..].to_vec(),
    })
}

fn event_key(task: &str, seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(task.len() + 9);
    k.extend_from_slice(task.as_bytes());
    k.push(0);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// A key of the `cluster` tree: its kind's prefix, then the name.
fn cluster_key(kind: &[u8], name: impl AsRef<[u8]>) -> Vec<u8> {
    [kind, name.as_ref()].concat()
}

/// Milliseconds since the Unix epoch: leases and buckets need finer time than [`super::now`].
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A lease as the `cluster` tree keeps it.
#[derive(serde::Serialize, serde::Deserialize)]
struct Lease {
    holder: String,
    until_ms: u64,
}

/// A token bucket as the `cluster` tree keeps it.
#[derive(serde::Serialize, serde::Deserialize)]
struct Bucket {
    tokens: f64,
    at_ms: u64,
}

/// Whether the stored task `id` is open and was never sent to its agent.
fn still_queued(tx: &TaskTx<'_>, id: &[u8]) -> TxResult<bool> {
    Ok(match tx.tasks.get(id)? {
        Some(v) => {
            let stored: TaskRecord = serde_json::from_slice(&v).map_err(fail)?;
            !stored.state.is_final() && !stored.is_dispatched()
        }
        None => false,
    })
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

#[cfg(test)]
mod tests {
    //! What only this backend has: its files, its lock, its derived trees. What every backend must do is in
    //! the contract suite, `relay/tests/store.rs`.

    use super::*;
    use crate::store::{AuditKind, ShareLevel, TaskState};
    use ct_protocol::task::{Requester, Role, TaskSpec};

    fn entry() -> AuditEntry {
        AuditEntry::new(AuditKind::DefaultAgentSet, "1", "1", "test".into())
    }

    fn task(id: &str, user: &str, agent: u8, order: u64) -> TaskRecord {
        TaskRecord {
            spec: TaskSpec {
                task: id.into(),
                project: "p".into(),
                prompt: "x".into(),
                requester: Requester {
                    user: user.into(),
                    name: None,
                    role: Role::Owner,
                },
                options: Default::default(),
                resume: None,
            },
            agent: Fingerprint([agent; 32]),
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

    fn ids(tasks: &[TaskRecord]) -> Vec<&str> {
        tasks.iter().map(|t| t.spec.task.as_str()).collect()
    }

    /// Security-relevant changes are written with their audit entry or not at all: with the log unwritable
    /// (its counter corrupted), the change fails and leaves nothing behind.
    #[test]
    fn no_audit_entry_means_no_change() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let share = ShareRecord {
            owner: "1".into(),
            grantee: "2".into(),
            projects: None,
            level: ShareLevel::Standard,
            created_at: 0,
        };
        store.put_share_audited(&share, &|_| entry()).unwrap();
        assert_eq!(store.audit_len().unwrap(), 1);

        store.meta.insert(AUDIT_SEQ, b"not a number").unwrap();
        let wider = ShareRecord {
            level: ShareLevel::Trusted,
            ..share.clone()
        };
        assert!(matches!(
            store.put_share_audited(&wider, &|_| entry()),
            Err(StoreError::Conflict)
        ));
        assert_eq!(store.share("1", "2").unwrap(), Some(share));
        assert!(store.remove_share_audited("1", "2", &|_| entry()).is_err());
        assert!(store.share("1", "2").unwrap().is_some());
        assert!(store
            .put_user_audited("1", &UserRecord::default(), &entry())
            .is_err());
        assert!(get::<UserRecord>(&store.users, b"1").unwrap().is_none());
        assert_eq!(store.audit_len().unwrap(), 1);
    }

    /// A second relay on the same data directory is told what is wrong, not handed sled's lock error.
    #[test]
    fn a_store_in_use_is_refused_in_words() {
        let dir = tempfile::tempdir().unwrap();
        let _first = SledStore::open(dir.path()).unwrap();
        let Err(err) = SledStore::open(dir.path()) else {
            panic!("opened a store that is in use");
        };
        assert!(matches!(err, StoreError::InUse(_)), "{err}");
        assert!(err.to_string().contains("--data-dir"), "{err}");
    }

    /// A data directory written by the relay before versioned indexes (records, and the two open-task trees
    /// only, one of them stale) opens with every index right.
    #[test]
    fn a_store_from_the_previous_relay_gets_its_indexes_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let (mut a, mut b, c) = (
            task("a", "1", 1, 1),
            task("b", "12", 1, 2),
            task("c", "1", 2, 3),
        );
        a.session_id = Some("s".into());
        a.output_bytes = 100;
        a.state = TaskState::Done;
        a.updated_at = 40;
        b.output_bytes = 5;
        b.session_id = Some("s".into());
        {
            let db = open_db(dir.path()).unwrap();
            let tasks = db.open_tree("tasks").unwrap();
            for t in [&a, &b, &c] {
                tasks
                    .insert(t.spec.task.as_bytes(), serde_json::to_vec(t).unwrap())
                    .unwrap();
            }
            // The previous layout: `open_tasks` and `open_by_user`, here still listing `a` as open.
            let (open, by_user) = (
                db.open_tree("open_tasks").unwrap(),
                db.open_tree("open_by_user").unwrap(),
            );
            for t in [&a, &b] {
                let id = t.spec.task.as_bytes();
                open.insert(agent_order_key(&t.agent.0, t.order, id), &[])
                    .unwrap();
                by_user
                    .insert(user_open_key(t.spec.requester.user.as_bytes(), id), &[])
                    .unwrap();
            }
            let share = ShareRecord {
                owner: "1".into(),
                grantee: "2".into(),
                projects: None,
                level: ShareLevel::Standard,
                created_at: 0,
            };
            db.open_tree("shares")
                .unwrap()
                .insert(share_key("1", "2"), serde_json::to_vec(&share).unwrap())
                .unwrap();
            db.open_tree("meta")
                .unwrap()
                .insert(AUDIT_SEQ, &7u64.to_be_bytes())
                .unwrap();
            db.flush().unwrap();
        }
        let store = SledStore::open(dir.path()).unwrap();
        assert_eq!(
            ids(&store.open_tasks(&Fingerprint([1; 32])).unwrap()),
            ["b"]
        );
        assert_eq!(
            ids(&store.open_tasks(&Fingerprint([2; 32])).unwrap()),
            ["c"]
        );
        assert_eq!(store.open_tasks_of_user("1").unwrap(), 1);
        assert_eq!(store.open_tasks_of_user("12").unwrap(), 1);
        assert_eq!(store.stored_bytes_of_user("1").unwrap(), 100);
        assert_eq!(store.stored_bytes_of_user("12").unwrap(), 5);
        assert_eq!(
            ids(&store
                .recent_tasks("1", &[Fingerprint([1; 32])], 10)
                .unwrap()),
            ["c", "b", "a"]
        );
        let mut with_session = store
            .tasks_with_session(&Fingerprint([1; 32]), "s")
            .unwrap();
        with_session.sort_by(|x, y| x.spec.task.cmp(&y.spec.task));
        assert_eq!(ids(&with_session), ["a", "b"]);
        assert_eq!(ids(&store.ended_before(100, 10, None).unwrap()), ["a"]);
        assert_eq!(store.shares_to("2").unwrap().len(), 1);
        assert_eq!(
            store.append_audit(&entry()).unwrap().seq,
            8,
            "the log goes on"
        );
        assert!(store.indexes_current().unwrap());
        // And writes keep them from there.
        b.state = TaskState::Done;
        store.put_task(&b).unwrap();
        assert_eq!(store.open_tasks_of_user("12").unwrap(), 0);
    }

    /// A restart does not pay for a pass over the history; a store last opened by another relay version does.
    #[test]
    fn indexes_are_rebuilt_only_when_another_relay_version_wrote_the_store() {
        let dir = tempfile::tempdir().unwrap();
        // A record written behind the indexes' back shows whether an open rebuilt them.
        let sneak = |store: &SledStore, id: &str| {
            let mut t = task(id, "9", 1, 1);
            t.output_bytes = 10;
            put(&store.tasks, id.as_bytes(), &t).unwrap();
            store.flush().unwrap();
        };
        let reopen = |store: SledStore| {
            store.flush().unwrap();
            drop(store);
            SledStore::open(dir.path()).unwrap()
        };
        let store = SledStore::open(dir.path()).unwrap();
        sneak(&store, "x");
        let store = reopen(store);
        assert_eq!(store.stored_bytes_of_user("9").unwrap(), 0, "not rebuilt");

        // The previous relay clears `open_tasks` whenever it opens the store, and then writes tasks without
        // these indexes: after such a rollback, this relay rebuilds.
        store.idx.open.clear().unwrap();
        let store = reopen(store);
        assert_eq!(store.stored_bytes_of_user("9").unwrap(), 10, "rebuilt");

        // An older layout version.
        sneak(&store, "y");
        store
            .meta
            .insert(INDEX_VERSION_KEY, &(INDEX_VERSION - 1).to_be_bytes())
            .unwrap();
        let store = reopen(store);
        assert_eq!(store.stored_bytes_of_user("9").unwrap(), 20, "rebuilt");
        assert!(store.indexes_current().unwrap());
    }

    /// Events stored one value per event (by the previous relay) and runs stored one value per run read as one
    /// log, from any point, also from the middle of a run; a run cut short is a corrupt store, not a panic.
    #[test]
    fn events_stored_per_event_and_per_run_read_as_one_log() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = task("a", "1", 1, 1);
        {
            // The previous layout: events 1 and 2, each its own value.
            let db = open_db(dir.path()).unwrap();
            db.open_tree("tasks")
                .unwrap()
                .insert(b"a", serde_json::to_vec(&t).unwrap())
                .unwrap();
            let events = db.open_tree("events").unwrap();
            for seq in [1u64, 2] {
                events
                    .insert(event_key("a", seq), format!("{{\"n\":{seq}}}").as_bytes())
                    .unwrap();
            }
            db.flush().unwrap();
        }
        let store = SledStore::open(dir.path()).unwrap();
        let (e3, e5, e6) = (b"{\"n\":3}", b"{\"n\":5}", b"{\"n\":6}");
        t.last_seq = 6;
        // 3 and 5 to 6 stored, 4 dropped under the cap: one value for the run.
        let run = [
            (3, Some(&e3[..])),
            (4, None),
            (5, Some(&e5[..])),
            (6, Some(&e6[..])),
        ];
        let written = store
            .append_event_runs(&[EventRun {
                task: &t,
                events: &run,
                was_open: None,
            }])
            .unwrap();
        assert_eq!(written, [true]);
        assert_eq!(store.events.len(), 3, "the run is one value");
        let seqs = |after| -> Vec<u64> {
            store
                .event_bytes("a", after)
                .unwrap()
                .into_iter()
                .map(|(seq, _)| seq)
                .collect()
        };
        assert_eq!(seqs(0), [1, 2, 3, 5, 6]);
        assert_eq!(seqs(2), [3, 5, 6]);
        assert_eq!(seqs(3), [5, 6], "from the middle of a run");
        assert_eq!(seqs(4), [5, 6]);
        assert_eq!(seqs(6), Vec::<u64>::new());
        assert_eq!(store.event_bytes("a", 4).unwrap()[0].1, e5);
        // A large event is its own value, between packs of the small ones around it.
        let big = format!("{{\"text\":\"{}\"}}", "x".repeat(PACK_BELOW));
        t.last_seq = 10;
        let run = [
            (7, Some(&e3[..])),
            (8, Some(big.as_bytes())),
            (9, Some(&e5[..])),
            (10, Some(&e6[..])),
        ];
        store
            .append_event_runs(&[EventRun {
                task: &t,
                events: &run,
                was_open: None,
            }])
            .unwrap();
        assert_eq!(store.events.len(), 6, "7 alone, 8 alone, 9 and 10 packed");
        assert_eq!(seqs(6), [7, 8, 9, 10]);
        assert_eq!(store.event_bytes("a", 7).unwrap()[0].1, big.as_bytes());
        let mut truncated = vec![RUN_VALUE];
        truncated.extend_from_slice(&9u64.to_be_bytes());
        truncated.extend_from_slice(&100u32.to_be_bytes());
        store.events.insert(event_key("a", 11), truncated).unwrap();
        assert!(matches!(
            store.event_bytes("a", 10),
            Err(StoreError::Corrupt(_))
        ));
    }

    /// Derived data that no longer decodes is reported as a corrupt store, never a panic, and a write that
    /// needs it changes nothing.
    #[test]
    fn corrupt_index_data_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let t = task("t", "1", 1, 1);
        store.put_task(&t).unwrap();

        store.idx.facts.insert("t", &[1, 2, 3]).unwrap();
        let mut changed = t.clone();
        changed.state = TaskState::Done;
        assert!(matches!(
            store.put_task(&changed),
            Err(StoreError::Corrupt(_))
        ));
        assert_eq!(store.task("t").unwrap(), Some(t.clone()));
        let events: Vec<(u64, Option<&[u8]>)> = vec![(1, Some(b"e"))];
        let run = EventRun {
            task: &changed,
            events: &events,
            was_open: None,
        };
        assert!(matches!(
            store.append_event_runs(&[run]),
            Err(StoreError::Corrupt(_))
        ));
        assert!(store.event_bytes("t", 0).unwrap().is_empty());

        store.idx.stored_bytes.insert("1", &[0, 1]).unwrap();
        assert!(matches!(
            store.stored_bytes_of_user("1"),
            Err(StoreError::Corrupt(_))
        ));
        store.idx.by_user.insert(b"1\0\x01", &[]).unwrap();
        assert!(matches!(
            store.recent_tasks("1", &[], 10),
            Err(StoreError::Corrupt(_))
        ));
        store.idx.ended.insert(b"abc", &[]).unwrap();
        assert!(matches!(
            store.ended_before(u64::MAX, 10, None),
            Err(StoreError::Corrupt(_))
        ));
    }
}
