//! The embedded backend: sled trees of JSON records, one tree per kind of thing, and index trees derived from
//! them.
//!
//! Operations that change several trees (a task with its indexes, a change with its audit entry, a batch of
//! event runs) are sled transactions, so they are atomic also across a crash. Writes that must not race
//! (redeeming a pairing code) use compare-and-swap, so two agents can never redeem the same code even on
//! different connections at the same instant.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ct_protocol::Fingerprint;
use serde::{de::DeserializeOwned, Serialize};
use sled::transaction::{
    ConflictableTransactionError, ConflictableTransactionResult, TransactionalTree,
};
use sled::Transactional;

use super::{
    AgentRecord, AuditEntry, EventRun, PairCodeRecord, Result, ShareRecord, Store, StoreError,
    TaskRecord, UserRecord,
};

/// The open store.
#[derive(Debug, Clone)]
pub struct SledStore {
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

impl SledStore {
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

    fn index_agent(&self, rec: &AgentRecord) {
        self.owners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .set(rec.fingerprint, &rec.owner);
    }

    /// Applies `change` to `trees` and appends `entry` to the audit log in one transaction: both are written
    /// or neither.
    fn audited<T>(
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
            let mut rec: AgentRecord = serde_json::from_slice(&old).map_err(abort)?;
            rec.revoked_at.get_or_insert(t);
            tx[0].insert(&fp.0, serde_json::to_vec(&rec).map_err(abort)?)?;
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
        (&self.tasks, &self.open, &self.open_by_user)
            .transaction(|(tasks, open, by_user)| write.apply(tasks, open, by_user, None))
            .map_err(tx_error)
    }

    fn put_task_audited(&self, rec: &TaskRecord, entry: &AuditEntry) -> Result<AuditEntry> {
        let write = TaskWrite::new(rec)?;
        let ((), entry) =
            self.audited(&[&self.tasks, &self.open, &self.open_by_user], entry, |t| {
                write.apply(&t[0], &t[1], &t[2], None)
            })?;
        Ok(entry)
    }

    fn open_tasks(&self, agent: &Fingerprint) -> Result<Vec<TaskRecord>> {
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

    fn open_tasks_of_user(&self, user: &str) -> Result<usize> {
        let mut n = 0;
        for key in self.open_by_user.scan_prefix(user_prefix(user)).keys() {
            key?;
            n += 1;
        }
        Ok(n)
    }

    fn ended_before(
        &self,
        cutoff: u64,
        limit: usize,
        after: Option<&TaskRecord>,
    ) -> Result<Vec<TaskRecord>> {
        use std::ops::Bound;
        let from = match after {
            Some(rec) => Bound::Excluded(rec.spec.task.as_bytes().to_vec()),
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

    fn delete_task(&self, rec: &TaskRecord) -> Result<Option<usize>> {
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
        self.audited_with(&[&self.shares], |t| {
            let before: Option<ShareRecord> = match t[0].insert(key.as_slice(), value.as_slice())? {
                Some(old) => Some(serde_json::from_slice(&old).map_err(abort)?),
                None => None,
            };
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

    fn shares_of(&self, owner: &str) -> Result<Vec<ShareRecord>> {
        let mut prefix = owner.as_bytes().to_vec();
        prefix.push(0);
        self.shares
            .scan_prefix(prefix)
            .values()
            .map(|v| Ok(serde_json::from_slice(&v?)?))
            .collect()
    }

    fn shares_to(&self, grantee: &str) -> Result<Vec<ShareRecord>> {
        let mut out = Vec::new();
        for v in self.shares.iter().values() {
            let rec: ShareRecord = serde_json::from_slice(&v?)?;
            if rec.grantee == grantee {
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
        let ((), e) = self.audited(&[&self.users], entry, |t| {
            t[0].insert(id.as_bytes(), value.as_slice())?;
            Ok(())
        })?;
        Ok(e)
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

    fn put_thread_mark(&self, task: &str, mark: &[u8]) -> Result<()> {
        self.thread_marks.insert(task.as_bytes(), mark)?;
        Ok(())
    }

    fn delete_thread_mark(&self, task: &str) -> Result<()> {
        self.thread_marks.remove(task.as_bytes())?;
        Ok(())
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

    fn stored_bytes_of_user(&self, user: &str) -> Result<u64> {
        let mut used = 0u64;
        for v in self.tasks.iter().values() {
            let rec: TaskRecord = serde_json::from_slice(&v?)?;
            if rec.spec.requester.user == user {
                used = used.saturating_add(rec.output_bytes);
            }
        }
        Ok(used)
    }

    fn recent_tasks(
        &self,
        user: &str,
        agents: &[Fingerprint],
        limit: usize,
    ) -> Result<Vec<TaskRecord>> {
        let mut out = Vec::new();
        for v in self.tasks.iter().values() {
            let rec: TaskRecord = serde_json::from_slice(&v?)?;
            if rec.spec.requester.user == user || agents.contains(&rec.agent) {
                out.push(rec);
            }
        }
        out.sort_by_key(|t| std::cmp::Reverse((t.created_at, t.order)));
        out.truncate(limit);
        Ok(out)
    }

    fn tasks_with_session(&self, agent: &Fingerprint, session: &str) -> Result<Vec<TaskRecord>> {
        let mut out = Vec::new();
        for v in self.tasks.iter().values() {
            let rec: TaskRecord = serde_json::from_slice(&v?)?;
            if rec.agent == *agent && rec.session_id.as_deref() == Some(session) {
                out.push(rec);
            }
        }
        Ok(out)
    }

    fn append_event_runs(&self, runs: &[EventRun<'_>]) -> Result<Vec<bool>> {
        struct Prepared {
            write: TaskWrite,
            events: Vec<(Vec<u8>, Option<Vec<u8>>)>,
            was_open: Option<bool>,
        }
        let prepared = runs
            .iter()
            .map(|run| {
                Ok(Prepared {
                    write: TaskWrite::new(run.task)?,
                    events: run
                        .events
                        .iter()
                        .map(|(seq, e)| {
                            (event_key(&run.task.spec.task, *seq), e.map(<[u8]>::to_vec))
                        })
                        .collect(),
                    was_open: run.was_open,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        (&self.tasks, &self.events, &self.open, &self.open_by_user)
            .transaction(|(tasks, events, open, by_user)| {
                let mut written = Vec::with_capacity(prepared.len());
                for p in &prepared {
                    // A task deleted meanwhile (by retention) is not brought back by a late run.
                    if tasks.get(p.write.id.as_slice())?.is_none() {
                        written.push(false);
                        continue;
                    }
                    for (key, event) in &p.events {
                        if let Some(event) = event {
                            events.insert(key.as_slice(), event.as_slice())?;
                        }
                    }
                    p.write.apply(tasks, open, by_user, p.was_open)?;
                    written.push(true);
                }
                Ok(written)
            })
            .map_err(tx_error)
    }

    fn event_bytes(&self, task: &str, after: u64) -> Result<Vec<(u64, Vec<u8>)>> {
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
                Ok((seq, v.to_vec()))
            })
            .collect()
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{AuditKind, ShareLevel};

    fn entry() -> AuditEntry {
        AuditEntry::new(AuditKind::DefaultAgentSet, "1", "1", "test".into())
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
        let names = |store: &SledStore, owner: &str| {
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
            let store = SledStore::open(dir.path()).unwrap();
            for (n, owner) in [(1, "1"), (2, "1"), (3, "2"), (4, "12")] {
                store.put_agent(&agent(n, owner)).unwrap();
            }
            assert_eq!(names(&store, "1"), ["a1", "a2"]);
            assert_eq!(names(&store, "12"), ["a4"]);
            assert!(names(&store, "3").is_empty());
            // A record that changes hands leaves its old owner's list.
            store
                .update_agent(&Fingerprint([2; 32]), &mut |a| a.owner = "2".into())
                .unwrap();
            assert_eq!(names(&store, "1"), ["a1"]);
            assert_eq!(names(&store, "2"), ["a2", "a3"]);
            store.flush().unwrap();
        }
        let store = SledStore::open(dir.path()).unwrap();
        assert_eq!(names(&store, "1"), ["a1"]);
        assert_eq!(names(&store, "2"), ["a2", "a3"]);
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

    #[test]
    fn sequence_numbers_follow_commit_order_and_pages_read_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
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
