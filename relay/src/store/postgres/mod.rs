//! The cluster backend: the relay's records in PostgreSQL, shared by every node.
//!
//! Each [`Store`] operation is one statement or one short transaction, so it is atomic and every node sees it
//! whole. The tables (`relay/migrations/`) keep each record's JSON as the embedded store does, beside the
//! fields its queries select and sort by; indexes do what the embedded store's derived trees do, and the
//! database keeps them in step with the records.
//!
//! Concurrency comes from the database rather than from compare-and-swap loops: a change made from what was
//! read (updating an agent, revoking it, a share with the entry that describes its change) locks the row it
//! read; a compare-and-swap (redeeming a pairing code, deleting an unchanged task) is one `UPDATE`/`DELETE`
//! whose `WHERE` names the expected record, which PostgreSQL evaluates again on the newest row when another
//! transaction changed it meanwhile. The audit log's numbers come from a one-row counter that each audited
//! write bumps last, just before it commits, and that stays locked until it has: numbers follow commit order
//! without gaps, and a write that is refused or fails takes none.
//!
//! Durability. The store promises that writes are visible at once and durable after the next
//! [`Store::flush`]. Writes run with `synchronous_commit = off`: each commits on its own (other nodes see it at
//! once) without waiting for its WAL to reach the disk. `flush` runs a tiny transaction with
//! `synchronous_commit = on` that writes one WAL record; its commit waits until the WAL is on disk up to its
//! commit record, and since the WAL is one sequence, that covers every commit before it, on any connection of
//! any node. (A transaction must write WAL for its commit to wait: one that only takes a transaction id, such as
//! `SELECT txid_current()`, commits asynchronously whatever the setting. Hence
//! `pg_logical_emit_message(true, ...)`, which any role may call; logical decoding ignores its messages unless
//! asked for them.) The relay's group commit calls `flush` from one thread and releases everything written
//! before it: one fsync for many writes, as with the embedded store.
//!
//! Crashes. What a crash of PostgreSQL can lose is what no flush covered yet, as with the embedded store, and
//! another node may already have *read* such a write; the relay acknowledges and announces only what a flush
//! covered. Unlike the embedded store, the relay outlives the crash: a later flush, on a new connection to the
//! recovered server, would succeed and seem to vouch for writes that were lost with it. So the store tells
//! the server's runs apart: each connection reads a random token from `ct_incarnation`, an unlogged table
//! that crash recovery empties (and that the first connection after it fills again), while a clean restart
//! keeps it. When the store meets a new token while some of its writes were not covered by a flush yet, they
//! may be lost: the next flush fails with [`StoreError::WritesLost`] (once), so the relay fails whatever waited
//! for those writes and has its agents reconnect and send again what was never acknowledged. The error names
//! the last write that went to the crashed run (writes are numbered as they begin, [`Store::write_mark`]):
//! what was written on the new run is not in doubt, and the next flush covers it. A crash that finds
//! everything flushed costs nothing but the failed calls.

mod cluster;
mod conditional;
mod migrate;
mod pool;
#[cfg(test)]
mod tests;
mod tls;
mod web;

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use ct_protocol::Fingerprint;
use postgres::error::SqlState;
use postgres::Row;
use serde::de::DeserializeOwned;

use self::pool::{Conn, Lease, Pool};
use super::{
    Admission, AgentRecord, Attachment, AuditEntry, EventRun, Exported, NodeRecord, PairCodeRecord,
    PoolRecord, Presence, Result, ShareRecord, Store, StoreError, TaskLimits, TaskRecord,
    UserRecord, WebSessionKind, WebSessionRecord,
};

/// The open store: a pool of connections to one database.
#[derive(Debug)]
pub struct PgStore {
    pool: Pool,
    /// The server's run the store last saw, and where this store's writes stand (see "Crashes" above).
    server: Mutex<ServerRun>,
}

/// This store's writes are numbered in the order they begin (their [`Store::write_mark`]s); a write is
/// counted in the same step that checks its connection's server run, so every write numbered before the store
/// met a new run went to an earlier one.
#[derive(Debug)]
struct ServerRun {
    /// Its `ct_incarnation` token.
    token: String,
    /// Writes begun (the last number handed out).
    begun: u64,
    /// Writes begun that have not finished (committed, failed, or been abandoned).
    in_flight: u64,
    /// The latest `begun` at which no write was in flight: every write up to it has finished. A flush covers
    /// the writes that had finished when it began; one still running then may commit after the flush.
    settled: u64,
    /// Writes up to here are durable (a flush covered them) or were reported lost.
    flushed: u64,
    /// Writes up to here may have been lost in a crash of the server, and no flush has reported it yet.
    lost: Option<u64>,
}

/// How often a transaction that PostgreSQL aborted to break a deadlock is run again before its error is
/// returned. Deadlocks need two nodes writing the same tasks' runs in different orders: rare, and over at once.
const DEADLOCK_RETRIES: usize = 5;

impl PgStore {
    /// Connects to the database at `url` (`postgres://user:password@host:port/dbname?...`, or libpq's
    /// `key=value` form), and migrates it to this binary's schema (see `migrate`).
    pub fn open(url: &str) -> Result<Self> {
        Self::with_pool_size(url, pool::DEFAULT_SIZE)
    }

    /// [`open`](Self::open) with at most `size` connections at once.
    pub fn with_pool_size(url: &str, size: usize) -> Result<Self> {
        let mut target =
            tls::Target::parse(url).map_err(|e| StoreError::Config(format!("{e:#}")))?;
        let config = &mut target.config;
        if config.get_application_name().is_none() {
            // Shown in pg_stat_activity, so an operator can tell the relay's connections apart.
            config.application_name("ct-relay");
        }
        // A server that does not answer must not hold the relay's core thread forever: the relay reports the
        // store unavailable and tries again. Settings given in the URL are kept.
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(10));
        }
        if config.get_tcp_user_timeout().is_none() {
            config.tcp_user_timeout(Duration::from_secs(30));
        }
        let mut client = target.connect()?;
        migrate::migrate(&mut client)?;
        drop(client);
        let pool = Pool::new(target, size);
        // One connection is opened now, so that a store that opens is one that works, and knows its server.
        let token = pool.get()?.incarnation().to_string();
        Ok(Self {
            pool,
            server: Mutex::new(ServerRun {
                token,
                begun: 0,
                in_flight: 0,
                settled: 0,
                flushed: 0,
                lost: None,
            }),
        })
    }

    /// The schema version this binary brings a database to.
    pub fn schema_version() -> i32 {
        migrate::latest()
    }

    fn server(&self) -> std::sync::MutexGuard<'_, ServerRun> {
        self.server.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A pooled connection, once the server's run it talks to is checked against the one the store knew.
    fn conn(&self) -> Result<Lease<'_>> {
        Ok(self.conn_counting(false)?.0)
    }

    /// [`conn`](Self::conn), and with `count`, a write begun on it, counted in the same step as the check (see
    /// [`ServerRun`]); the [`Writing`] ends it.
    fn conn_counting(&self, count: bool) -> Result<(Lease<'_>, Option<Writing<'_>>)> {
        let conn = self.pool.get()?;
        let mut server = self.server();
        if server.token != conn.incarnation() {
            // Every write counted so far ran on a connection to the previous run, so the ones no flush
            // covered went down with it, or may have; those counted from now on go to the new run.
            if server.begun > server.flushed {
                let upto = server.begun;
                server.lost = Some(upto);
                tracing::error!("{}", StoreError::WritesLost { upto });
            } else {
                tracing::warn!(
                    "PostgreSQL restarted after a crash; every write of this node had been flushed"
                );
            }
            server.token = conn.incarnation().to_string();
        }
        let writing = count.then(|| {
            server.begun += 1;
            server.in_flight += 1;
            Writing(self)
        });
        Ok((conn, writing))
    }

    /// Runs a read on a pooled connection.
    fn read<T>(&self, op: impl FnOnce(&mut Conn) -> Result<T>) -> Result<T> {
        let mut conn = self.conn()?;
        op(&mut conn)
    }

    /// Runs a write in a transaction.
    fn transaction<T>(&self, mut op: impl FnMut(&mut Conn) -> Result<T>) -> Result<T> {
        self.write(|c| c.transaction(&mut op))
    }

    /// Runs a write (one statement, or a transaction) on a pooled connection, counted for
    /// [`flush`](Store::flush), and again when PostgreSQL aborted it to break a deadlock.
    fn write<T>(&self, op: impl FnMut(&mut Conn) -> Result<T>) -> Result<T> {
        self.write_counted(true, op)
    }

    /// A write whose loss in a crash costs nothing (a heartbeat, a lease, a rate-limit bucket: each is
    /// written again within seconds), so it does not make a crash count as losing writes.
    fn passing_write<T>(&self, op: impl FnMut(&mut Conn) -> Result<T>) -> Result<T> {
        self.write_counted(false, op)
    }

    fn write_counted<T>(
        &self,
        counted: bool,
        mut op: impl FnMut(&mut Conn) -> Result<T>,
    ) -> Result<T> {
        // Counted whether it succeeds or not: a write whose reply was lost may have committed.
        let (mut conn, _writing) = self.conn_counting(counted)?;
        let mut attempt = 0;
        loop {
            match op(&mut conn) {
                Err(StoreError::Postgres(e)) if retryable(&e) && attempt < DEADLOCK_RETRIES => {
                    attempt += 1;
                    tracing::debug!(error = %e, attempt, "store transaction retried");
                }
                other => return other,
            }
        }
    }

    /// Takes the next audit number and writes `entry` under it. Called last in an audited transaction, so the
    /// counter's row is locked only until the commit that follows.
    fn audit(conn: &mut Conn, entry: &AuditEntry) -> Result<AuditEntry> {
        let row = conn.query_one(
            "UPDATE ct_audit_counter SET last = last + 1 RETURNING last",
            &[],
        )?;
        let mut entry = entry.clone();
        entry.seq = unsigned(row.try_get(0)?, "audit counter")?;
        conn.execute(
            "INSERT INTO ct_audit (seq, owner, at, body) VALUES ($1, $2, $3, $4)",
            &[
                &int(entry.seq),
                &entry.owner,
                &int(entry.at),
                &serde_json::to_vec(&entry)?,
            ],
        )?;
        Ok(entry)
    }

    fn put_task_on(conn: &mut Conn, rec: &TaskRecord) -> Result<()> {
        let row = TaskRow::of(rec)?;
        conn.execute(
            "INSERT INTO ct_tasks (id, agent, requester, session, is_open, ord, updated_at, output_bytes, body)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
             ON CONFLICT (id) DO UPDATE SET
                 agent = excluded.agent, requester = excluded.requester, session = excluded.session,
                 is_open = excluded.is_open, ord = excluded.ord, updated_at = excluded.updated_at,
                 output_bytes = excluded.output_bytes, body = excluded.body",
            &row.columns(),
        )?;
        Ok(())
    }

    /// Writes a user's record with its `in_pool` mark (see migration 7).
    fn put_user_on(conn: &mut Conn, id: &str, in_pool: bool, value: &[u8]) -> Result<()> {
        conn.execute(
            "INSERT INTO ct_users (id, body, in_pool) VALUES ($1, $2, $3)
             ON CONFLICT (id) DO UPDATE SET body = excluded.body, in_pool = excluded.in_pool",
            &[&id, &value, &in_pool],
        )?;
        Ok(())
    }

    fn put_pool_on(conn: &mut Conn, name: &str, value: &[u8]) -> Result<()> {
        conn.execute(
            "INSERT INTO ct_pools (name, body) VALUES ($1, $2)
             ON CONFLICT (name) DO UPDATE SET body = excluded.body",
            &[&name, &value],
        )?;
        Ok(())
    }

    fn put_agent_on(conn: &mut Conn, rec: &AgentRecord) -> Result<()> {
        conn.execute(
            "INSERT INTO ct_agents (fingerprint, owner, body) VALUES ($1, $2, $3)
             ON CONFLICT (fingerprint) DO UPDATE SET owner = excluded.owner, body = excluded.body",
            &[
                &&rec.fingerprint.0[..],
                &rec.owner,
                &serde_json::to_vec(rec)?,
            ],
        )?;
        Ok(())
    }
}

impl Store for PgStore {
    fn flush(&self) -> Result<()> {
        {
            let server = self.server();
            if server.begun <= server.flushed && server.lost.is_none() {
                // Nothing written since the last flush: nothing to wait for (the relay flushes when idle).
                return Ok(());
            }
        }
        let mut conn = self.conn()?;
        // Reported once, to the flush that would have covered the lost writes; the store then goes on with
        // the recovered server (the relay fails what waited for them and has its agents reconnect). Writes
        // made on the new run are left for the next flush.
        let report_lost = |server: &mut ServerRun| match server.lost.take() {
            Some(upto) => {
                server.flushed = server.flushed.max(upto);
                Err(StoreError::WritesLost { upto })
            }
            None => Ok(()),
        };
        let covered = {
            let mut server = self.server();
            report_lost(&mut server)?;
            server.settled
        };
        // See the module's documentation: this commit waits for the WAL up to itself, which is every commit
        // before it. One statement in its own transaction, the setting local to it: `set_config`'s `true` is
        // `SET LOCAL`, in force until the statement's transaction commits (one round trip, one statement, for
        // what `BEGIN; SET LOCAL ...; SELECT ...; COMMIT` did in four).
        conn.batch(
            "SELECT set_config('synchronous_commit', 'on', true),
                    pg_logical_emit_message(true, 'ct-relay', 'flush')",
        )?;
        let mut server = self.server();
        // A crash noticed meanwhile on another connection, before this flush reached the disk.
        report_lost(&mut server)?;
        server.flushed = server.flushed.max(covered);
        Ok(())
    }

    fn write_mark(&self) -> u64 {
        self.server().begun
    }

    fn next_order(&self) -> Result<u64> {
        let row = self.write(|c| c.query_one("SELECT nextval('ct_order')", &[]))?;
        unsigned(row.try_get(0)?, "order")
    }

    // --- agents ---

    fn agent(&self, fp: &Fingerprint) -> Result<Option<AgentRecord>> {
        let row = self.read(|c| {
            c.query_opt(
                "SELECT body FROM ct_agents WHERE fingerprint = $1",
                &[&&fp.0[..]],
            )
        })?;
        row.map(|r| body(&r)).transpose()
    }

    fn put_agent(&self, rec: &AgentRecord) -> Result<()> {
        self.write(|c| Self::put_agent_on(c, rec))
    }

    fn agents_of(&self, owner: &str) -> Result<Vec<AgentRecord>> {
        bodies(&self.read(|c| {
            c.query(
                "SELECT body FROM ct_agents WHERE owner = $1 ORDER BY fingerprint",
                &[&owner],
            )
        })?)
    }

    fn agents(&self) -> Result<Vec<AgentRecord>> {
        bodies(&self.read(|c| c.query("SELECT body FROM ct_agents ORDER BY fingerprint", &[]))?)
    }

    fn update_agent(
        &self,
        fp: &Fingerprint,
        change: &mut dyn FnMut(&mut AgentRecord),
    ) -> Result<Option<AgentRecord>> {
        // The row stays locked from the read to the commit: a concurrent change waits, then starts from this
        // one's result.
        self.transaction(|c| {
            let Some(row) = c.query_opt(
                "SELECT body FROM ct_agents WHERE fingerprint = $1 FOR UPDATE",
                &[&&fp.0[..]],
            )?
            else {
                return Ok(None);
            };
            let mut rec: AgentRecord = body(&row)?;
            change(&mut rec);
            c.execute(
                "UPDATE ct_agents SET owner = $2, body = $3 WHERE fingerprint = $1",
                &[&&fp.0[..], &rec.owner, &serde_json::to_vec(&rec)?],
            )?;
            Ok(Some(rec))
        })
    }

    fn pair_agent_audited(
        &self,
        code: &PairCodeRecord,
        used: &PairCodeRecord,
        agent: &AgentRecord,
        entry: &AuditEntry,
    ) -> Result<AuditEntry> {
        let (old, new) = (serde_json::to_vec(code)?, serde_json::to_vec(used)?);
        self.transaction(|c| {
            // Of two redeems at once, the second waits for the first's row lock, then finds the body changed.
            let swapped = c.execute(
                "UPDATE ct_pair_codes SET owner = $2, expires_at = $3, body = $4 WHERE id = $1 AND body = $5",
                &[&code.id, &used.owner, &int(used.expires_at), &new, &old],
            )?;
            if swapped == 0 {
                return Err(StoreError::Conflict);
            }
            Self::put_agent_on(c, agent)?;
            Self::audit(c, entry)
        })
    }

    fn revoke_agent_audited(
        &self,
        fp: &Fingerprint,
        t: u64,
        entry: &AuditEntry,
    ) -> Result<Option<(AgentRecord, AuditEntry)>> {
        self.transaction(|c| {
            let Some(row) = c.query_opt(
                "SELECT body FROM ct_agents WHERE fingerprint = $1 FOR UPDATE",
                &[&&fp.0[..]],
            )?
            else {
                return Ok(None);
            };
            let mut rec: AgentRecord = body(&row)?;
            rec.revoked_at.get_or_insert(t);
            c.execute(
                "UPDATE ct_agents SET body = $2 WHERE fingerprint = $1",
                &[&&fp.0[..], &serde_json::to_vec(&rec)?],
            )?;
            let e = Self::audit(c, entry)?;
            Ok(Some((rec, e)))
        })
    }

    // --- pairing codes ---

    fn pair_code(&self, id: &str) -> Result<Option<PairCodeRecord>> {
        let row =
            self.read(|c| c.query_opt("SELECT body FROM ct_pair_codes WHERE id = $1", &[&id]))?;
        row.map(|r| body(&r)).transpose()
    }

    fn put_pair_code(&self, rec: &PairCodeRecord) -> Result<()> {
        self.write(|c| {
            c.execute(
                "INSERT INTO ct_pair_codes (id, owner, expires_at, body) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (id) DO UPDATE SET
                     owner = excluded.owner, expires_at = excluded.expires_at, body = excluded.body",
                &[
                    &rec.id,
                    &rec.owner,
                    &int(rec.expires_at),
                    &serde_json::to_vec(rec)?,
                ],
            )
        })?;
        Ok(())
    }

    fn swap_pair_code(&self, old: &PairCodeRecord, new: &PairCodeRecord) -> Result<()> {
        let (old_bytes, new_bytes) = (serde_json::to_vec(old)?, serde_json::to_vec(new)?);
        let swapped = self.write(|c| {
            c.execute(
                "UPDATE ct_pair_codes SET owner = $2, expires_at = $3, body = $4 WHERE id = $1 AND body = $5",
                &[
                    &old.id,
                    &new.owner,
                    &int(new.expires_at),
                    &new_bytes,
                    &old_bytes,
                ],
            )
        })?;
        if swapped == 0 {
            return Err(StoreError::Conflict);
        }
        Ok(())
    }

    fn pair_codes_of(&self, owner: &str) -> Result<Vec<PairCodeRecord>> {
        bodies(&self.read(|c| {
            c.query(
                "SELECT body FROM ct_pair_codes WHERE owner = $1 ORDER BY id",
                &[&owner],
            )
        })?)
    }

    fn prune_pair_codes(&self, cutoff: u64) -> Result<usize> {
        let n = self.write(|c| {
            c.execute(
                "DELETE FROM ct_pair_codes WHERE expires_at < $1",
                &[&int(cutoff)],
            )
        })?;
        Ok(count(n))
    }

    // --- tasks ---

    fn task(&self, id: &str) -> Result<Option<TaskRecord>> {
        let row = self.read(|c| c.query_opt("SELECT body FROM ct_tasks WHERE id = $1", &[&id]))?;
        row.map(|r| body(&r)).transpose()
    }

    fn put_task(&self, rec: &TaskRecord) -> Result<()> {
        self.write(|c| Self::put_task_on(c, rec))
    }

    fn put_task_audited(&self, rec: &TaskRecord, entry: &AuditEntry) -> Result<AuditEntry> {
        self.transaction(|c| {
            Self::put_task_on(c, rec)?;
            Self::audit(c, entry)
        })
    }

    fn admit_task(
        &self,
        rec: &TaskRecord,
        entry: Option<&AuditEntry>,
        limits: &TaskLimits,
    ) -> Result<Admission> {
        let row = TaskRow::of(rec)?;
        let bound = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        let (open_per_user, running_per_agent, queued_per_agent) = (
            bound(limits.open_per_user),
            bound(limits.running_per_agent),
            bound(limits.queued_per_agent),
        );
        // Locks, counts, the decision and the insert are one call to `ct_admit_task` (migration 9), which holds
        // the same locks as any other admission, on any node, until its task is committed. Without an audit
        // entry the call is its own transaction: one round trip. With one, the entry is numbered in the same
        // transaction, after the task (the counter's row is then locked only until the commit).
        let admit = |c: &mut Conn| -> Result<Admission> {
            let columns = row.columns();
            let limits: [&(dyn postgres::types::ToSql + Sync); 3] =
                [&open_per_user, &running_per_agent, &queued_per_agent];
            let out = c.query_one(
                "SELECT outcome, n FROM ct_admit_task($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
                &[&columns[..], &limits[..]].concat(),
            )?;
            let n = unsigned(out.try_get(1)?, "count")? as usize;
            match out.try_get::<_, &str>(0)? {
                "admitted" => Ok(Admission::Admitted(None)),
                "too_many_tasks" => Ok(Admission::TooManyTasks { open: n }),
                "queue_full" => Ok(Admission::QueueFull { queued: n }),
                "conflict" => Err(StoreError::Conflict),
                other => Err(StoreError::Schema(format!(
                    "ct_admit_task answered {other:?}, which this ct-relay does not know"
                ))),
            }
        };
        match entry {
            None => self.write(admit),
            Some(entry) => self.transaction(|c| match admit(c)? {
                Admission::Admitted(_) => {
                    Ok(Admission::Admitted(Some(Box::new(Self::audit(c, entry)?))))
                }
                refused => Ok(refused),
            }),
        }
    }

    fn open_tasks(&self, agent: &Fingerprint) -> Result<Vec<TaskRecord>> {
        bodies(&self.read(|c| {
            c.query(
                "SELECT body FROM ct_tasks WHERE agent = $1 AND is_open ORDER BY ord, id",
                &[&&agent.0[..]],
            )
        })?)
    }

    fn open_tasks_of_user(&self, user: &str) -> Result<usize> {
        let row = self.read(|c| {
            c.query_one(
                "SELECT count(*) FROM ct_tasks WHERE requester = $1 AND is_open",
                &[&user],
            )
        })?;
        Ok(unsigned(row.try_get(0)?, "count")? as usize)
    }

    fn stored_bytes_of_user(&self, user: &str) -> Result<u64> {
        // Ended tasks' bytes from the per-person index alone, open tasks' (a few) from their rows: the column the
        // index includes stays NULL while a task runs, so its updates stay in place (migration 10). The sum of
        // bigints is a numeric: capped back into a bigint, as the embedded store saturates.
        let row = self.read(|c| {
            c.query_one(
                "SELECT least(
                     (SELECT coalesce(sum(ended_bytes), 0) FROM ct_tasks WHERE requester = $1)
                     + (SELECT coalesce(sum(output_bytes), 0) FROM ct_tasks WHERE requester = $1 AND is_open),
                     9223372036854775807)::bigint",
                &[&user],
            )
        })?;
        unsigned(row.try_get(0)?, "stored bytes")
    }

    fn recent_tasks(
        &self,
        user: &str,
        agents: &[Fingerprint],
        limit: usize,
    ) -> Result<Vec<TaskRecord>> {
        // The newest `limit` of the user's own tasks and of each agent's, each read from the end of its index,
        // then merged: a person with a long history costs `limit` rows per list, not their whole history. A
        // task in two lists is one row of the union.
        let agents: Vec<&[u8]> = agents.iter().map(|a| &a.0[..]).collect();
        bodies(&self.read(|c| {
            c.query(
                "SELECT body FROM ct_tasks WHERE id IN (
                     (SELECT id FROM ct_tasks WHERE requester = $1 ORDER BY ord DESC, id DESC LIMIT $3)
                     UNION
                     (SELECT t.id FROM unnest($2::bytea[]) AS a(agent) CROSS JOIN LATERAL
                         (SELECT id FROM ct_tasks WHERE agent = a.agent ORDER BY ord DESC, id DESC LIMIT $3) t)
                 )
                 ORDER BY ord DESC, id DESC LIMIT $3",
                &[&user, &agents, &limit_of(limit)],
            )
        })?)
    }

    fn tasks_with_session(&self, agent: &Fingerprint, session: &str) -> Result<Vec<TaskRecord>> {
        bodies(&self.read(|c| {
            c.query(
                "SELECT body FROM ct_tasks WHERE agent = $1 AND session = $2 ORDER BY id",
                &[&&agent.0[..], &session],
            )
        })?)
    }

    fn ended_before(
        &self,
        cutoff: u64,
        limit: usize,
        after: Option<&TaskRecord>,
    ) -> Result<Vec<TaskRecord>> {
        // `ended_at` is an ended task's `updated_at` (NULL while open: migration 10). The cursor is where the
        // previous batch's last task was in (ended_at, id) order, whatever happened to that task since; the
        // next batch starts strictly after it.
        let rows = self.read(|c| match after {
            None => c.query(
                "SELECT body FROM ct_tasks WHERE ended_at < $1
                 ORDER BY ended_at, id LIMIT $2",
                &[&int(cutoff), &limit_of(limit)],
            ),
            Some(rec) => c.query(
                "SELECT body FROM ct_tasks
                 WHERE ended_at < $1 AND (ended_at, id) > ($3, $4)
                 ORDER BY ended_at, id LIMIT $2",
                &[
                    &int(cutoff),
                    &limit_of(limit),
                    &int(rec.updated_at),
                    &rec.spec.task,
                ],
            ),
        })?;
        bodies(&rows)
    }

    fn delete_task(&self, rec: &TaskRecord) -> Result<Option<usize>> {
        // One statement: the task goes only if its body is still `rec`, and its events with it. A run being
        // appended holds the task's row until it commits; the delete then finds the body changed and keeps
        // both. A run appended after the delete finds no task and writes nothing (see `append_event_runs`).
        let expected = serde_json::to_vec(rec)?;
        let row = self.write(|c| {
            c.query_one(
                "WITH gone AS (DELETE FROM ct_tasks WHERE id = $1 AND body = $2 RETURNING id),
                      events AS (DELETE FROM ct_events WHERE task = $1 AND EXISTS (SELECT 1 FROM gone)
                                 RETURNING 1),
                      files AS (DELETE FROM ct_task_files WHERE task = $1 AND EXISTS (SELECT 1 FROM gone))
                 SELECT (SELECT count(*) FROM gone), (SELECT count(*) FROM events)",
                &[&rec.spec.task, &expected],
            )
        })?;
        let (tasks, events): (i64, i64) = (row.try_get(0)?, row.try_get(1)?);
        Ok((tasks > 0)
            .then(|| unsigned(events, "count"))
            .transpose()?
            .map(|n| n as usize))
    }

    fn append_event_runs(&self, runs: &[EventRun<'_>]) -> Result<Vec<bool>> {
        // The conditional write with no condition: one statement for both (`conditional.rs`).
        self.append_event_runs_expecting_(runs, &vec![None; runs.len()])
    }

    fn append_event_runs_expecting(
        &self,
        runs: &[EventRun<'_>],
        expected: &[Option<&[u8]>],
    ) -> Result<Vec<bool>> {
        self.append_event_runs_expecting_(runs, expected)
    }

    fn event_bytes(&self, task: &str, after: u64) -> Result<Vec<(u64, Vec<u8>)>> {
        let rows = self.read(|c| {
            c.query(
                "SELECT seq, body FROM ct_events WHERE task = $1 AND seq > $2 ORDER BY seq",
                &[&task, &int(after)],
            )
        })?;
        rows.iter()
            .map(|r| {
                Ok((
                    unsigned(r.try_get(0)?, "event sequence number")?,
                    r.try_get(1)?,
                ))
            })
            .collect()
    }

    // --- the Discord front end's thread marks ---

    fn put_task_files(&self, task: &str, files: &[Attachment]) -> Result<()> {
        self.transaction(|c| {
            c.execute("DELETE FROM ct_task_files WHERE task = $1", &[&task])?;
            for (i, f) in files.iter().enumerate() {
                c.execute(
                    "INSERT INTO ct_task_files (task, idx, name, media_type, data)
                     VALUES ($1, $2, $3, $4, $5)",
                    &[&task, &(i as i32), &f.name, &f.media_type, &f.data],
                )?;
            }
            Ok(())
        })
    }

    fn task_files(&self, task: &str) -> Result<Vec<Attachment>> {
        let rows = self.read(|c| {
            c.query(
                "SELECT name, media_type, data FROM ct_task_files WHERE task = $1 ORDER BY idx",
                &[&task],
            )
        })?;
        rows.iter()
            .map(|r| {
                Ok(Attachment {
                    name: r.try_get(0)?,
                    media_type: r.try_get(1)?,
                    data: r.try_get(2)?,
                })
            })
            .collect()
    }

    fn delete_task_files(&self, task: &str) -> Result<()> {
        self.write(|c| c.execute("DELETE FROM ct_task_files WHERE task = $1", &[&task]))?;
        Ok(())
    }

    fn put_thread_mark(&self, task: &str, mark: &[u8]) -> Result<()> {
        self.write(|c| {
            c.execute(
                "INSERT INTO ct_thread_marks (task, mark) VALUES ($1, $2)
                 ON CONFLICT (task) DO UPDATE SET mark = excluded.mark",
                &[&task, &mark],
            )
        })?;
        Ok(())
    }

    fn delete_thread_mark(&self, task: &str) -> Result<()> {
        self.write(|c| c.execute("DELETE FROM ct_thread_marks WHERE task = $1", &[&task]))?;
        Ok(())
    }

    fn thread_mark(&self, task: &str) -> Result<Option<Vec<u8>>> {
        let row = self
            .read(|c| c.query_opt("SELECT mark FROM ct_thread_marks WHERE task = $1", &[&task]))?;
        Ok(row.map(|r| r.try_get(0)).transpose()?)
    }

    fn thread_mark_bytes(&self) -> Result<Vec<(String, Vec<u8>)>> {
        let rows =
            self.read(|c| c.query("SELECT task, mark FROM ct_thread_marks ORDER BY task", &[]))?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect()
    }

    fn put_task_thread(&self, task: &str, thread: u64) -> Result<()> {
        // Nothing for a task that is not stored (as sled does): the row would outlive nothing.
        self.write(|c| {
            c.execute(
                "INSERT INTO ct_task_threads (task, thread)
                 SELECT $1, $2 WHERE EXISTS (SELECT 1 FROM ct_tasks WHERE id = $1)
                 ON CONFLICT (task) DO UPDATE SET thread = excluded.thread",
                &[&task, &thread_bits(thread)],
            )
        })?;
        Ok(())
    }

    fn task_threads(&self, tasks: &[String]) -> Result<Vec<(String, u64)>> {
        let rows = self.read(|c| {
            c.query(
                "SELECT task, thread FROM ct_task_threads WHERE task = ANY($1)",
                &[&tasks],
            )
        })?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, thread_of_bits(r.try_get(1)?))))
            .collect()
    }

    fn put_thread_chain(&self, thread: u64, task: &str, chain: &[u8]) -> Result<()> {
        // Nothing for a task that is not stored (as sled does).
        self.write(|c| {
            c.execute(
                "INSERT INTO ct_thread_chains (thread, task, body)
                 SELECT $1, $2, $3 WHERE EXISTS (SELECT 1 FROM ct_tasks WHERE id = $2)
                 ON CONFLICT (thread) DO UPDATE SET task = excluded.task, body = excluded.body",
                &[&thread_bits(thread), &task, &chain],
            )
        })?;
        Ok(())
    }

    fn thread_chain(&self, thread: u64) -> Result<Option<Vec<u8>>> {
        let row = self.read(|c| {
            c.query_opt(
                "SELECT body FROM ct_thread_chains WHERE thread = $1",
                &[&thread_bits(thread)],
            )
        })?;
        Ok(row.map(|r| r.try_get(0)).transpose()?)
    }

    fn add_answer(
        &self,
        task: &str,
        approval: &str,
        question: u8,
        answer: &str,
    ) -> Result<BTreeMap<u8, String>> {
        // The upsert locks the row and merges into its latest version, so concurrent answers all land and
        // the last of them returns the whole set.
        let row = self.write(|c| {
            c.query_opt(
                "INSERT INTO ct_approval_answers (task, approval, answers)
                 SELECT $1, $2, jsonb_build_object($3::text, $4::text)
                 WHERE EXISTS (SELECT 1 FROM ct_tasks WHERE id = $1)
                 ON CONFLICT (task, approval)
                 DO UPDATE SET answers = ct_approval_answers.answers || excluded.answers
                 RETURNING answers::text",
                &[&task, &approval, &question.to_string(), &answer],
            )
        })?;
        let Some(row) = row else {
            // Not a stored task (the decision will be refused): just this answer.
            return Ok(BTreeMap::from([(question, answer.to_string())]));
        };
        let json: String = row.try_get(0)?;
        // serde_json reads the object's keys ("0", "1", …) as the numbers they spell.
        Ok(serde_json::from_str(&json)?)
    }

    // --- shares and users ---

    fn share(&self, owner: &str, grantee: &str) -> Result<Option<ShareRecord>> {
        let row = self.read(|c| {
            c.query_opt(
                "SELECT body FROM ct_shares WHERE owner = $1 AND grantee = $2",
                &[&owner, &grantee],
            )
        })?;
        row.map(|r| body(&r)).transpose()
    }

    fn put_share_audited(
        &self,
        rec: &ShareRecord,
        entry: &dyn Fn(Option<&ShareRecord>) -> AuditEntry,
    ) -> Result<(Option<ShareRecord>, AuditEntry)> {
        let value = serde_json::to_vec(rec)?;
        self.transaction(|c| {
            // The share as it was, read under a lock (or its absence, made sure of by the insert), so the entry
            // describes exactly the change made.
            let before = loop {
                if let Some(row) = c.query_opt(
                    "SELECT body FROM ct_shares WHERE owner = $1 AND grantee = $2 FOR UPDATE",
                    &[&rec.owner, &rec.grantee],
                )? {
                    let old: ShareRecord = body(&row)?;
                    c.execute(
                        "UPDATE ct_shares SET body = $3 WHERE owner = $1 AND grantee = $2",
                        &[&rec.owner, &rec.grantee, &value],
                    )?;
                    break Some(old);
                }
                let inserted = c.execute(
                    "INSERT INTO ct_shares (owner, grantee, body) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                    &[&rec.owner, &rec.grantee, &value],
                )?;
                if inserted == 1 {
                    break None;
                }
                // Someone else created it since the read: read it again, locked this time.
            };
            let e = Self::audit(c, &entry(before.as_ref()))?;
            Ok((before, e))
        })
    }

    fn remove_share_audited(
        &self,
        owner: &str,
        grantee: &str,
        entry: &dyn Fn(&ShareRecord) -> AuditEntry,
    ) -> Result<Option<(ShareRecord, AuditEntry)>> {
        self.transaction(|c| {
            let Some(row) = c.query_opt(
                "DELETE FROM ct_shares WHERE owner = $1 AND grantee = $2 RETURNING body",
                &[&owner, &grantee],
            )?
            else {
                return Ok(None);
            };
            let old: ShareRecord = body(&row)?;
            let e = Self::audit(c, &entry(&old))?;
            Ok(Some((old, e)))
        })
    }

    fn shares_of(&self, owner: &str) -> Result<Vec<ShareRecord>> {
        bodies(&self.read(|c| {
            c.query(
                "SELECT body FROM ct_shares WHERE owner = $1 ORDER BY grantee",
                &[&owner],
            )
        })?)
    }

    fn shares_to(&self, grantee: &str) -> Result<Vec<ShareRecord>> {
        bodies(&self.read(|c| {
            c.query(
                "SELECT body FROM ct_shares WHERE grantee = $1 ORDER BY owner",
                &[&grantee],
            )
        })?)
    }

    fn user(&self, id: &str) -> Result<UserRecord> {
        let row = self.read(|c| c.query_opt("SELECT body FROM ct_users WHERE id = $1", &[&id]))?;
        Ok(row.map(|r| body(&r)).transpose()?.unwrap_or_default())
    }

    fn put_user_audited(
        &self,
        id: &str,
        rec: &UserRecord,
        entry: &AuditEntry,
    ) -> Result<AuditEntry> {
        let value = serde_json::to_vec(rec)?;
        self.transaction(|c| {
            Self::put_user_on(c, id, rec.in_pools(), &value)?;
            Self::audit(c, entry)
        })
    }

    fn pool(&self, name: &str) -> Result<Option<PoolRecord>> {
        let row =
            self.read(|c| c.query_opt("SELECT body FROM ct_pools WHERE name = $1", &[&name]))?;
        row.map(|r| body(&r)).transpose()
    }

    fn pools(&self) -> Result<Vec<PoolRecord>> {
        bodies(&self.read(|c| c.query("SELECT body FROM ct_pools ORDER BY name", &[]))?)
    }

    fn put_pool_audited(&self, rec: &PoolRecord, entry: &AuditEntry) -> Result<AuditEntry> {
        let value = serde_json::to_vec(rec)?;
        self.transaction(|c| {
            Self::put_pool_on(c, &rec.name, &value)?;
            Self::audit(c, entry)
        })
    }

    fn pool_users(&self) -> Result<Vec<(String, UserRecord)>> {
        self.read(|c| {
            c.query(
                "SELECT id, body FROM ct_users WHERE in_pool ORDER BY id",
                &[],
            )
        })?
        .iter()
        .map(|row| {
            let bytes: &[u8] = row.try_get(1)?;
            Ok((row.try_get(0)?, serde_json::from_slice(bytes)?))
        })
        .collect()
    }

    // --- the audit log ---

    fn append_audit(&self, entry: &AuditEntry) -> Result<AuditEntry> {
        self.transaction(|c| Self::audit(c, entry))
    }

    fn audit_where(
        &self,
        before: Option<u64>,
        limit: usize,
        keep: &mut dyn FnMut(&AuditEntry) -> bool,
    ) -> Result<Vec<AuditEntry>> {
        // Read a page at a time, newest first, until `limit` entries were kept: a filter that keeps few
        // entries reads further back, one that keeps most reads little.
        const PAGE: i64 = 256;
        let mut below = before.map_or(i64::MAX, int);
        let mut out = Vec::new();
        let mut conn = self.conn()?;
        while out.len() < limit {
            let rows = conn.query(
                "SELECT seq, body FROM ct_audit WHERE seq < $1 ORDER BY seq DESC LIMIT $2",
                &[&below, &PAGE],
            )?;
            for row in &rows {
                below = row.try_get(0)?;
                let e: AuditEntry = serde_json::from_slice(row.try_get(1)?)?;
                if keep(&e) {
                    out.push(e);
                    if out.len() >= limit {
                        break;
                    }
                }
            }
            if rows.len() < PAGE as usize {
                break;
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
        bodies(&self.read(|c| {
            c.query(
                "SELECT body FROM ct_audit WHERE owner = $1 AND seq < $2 ORDER BY seq DESC LIMIT $3",
                &[&owner, &before.map_or(i64::MAX, int), &limit_of(limit)],
            )
        })?)
    }

    fn prune_audit(&self, cutoff: u64) -> Result<usize> {
        // The oldest entries up to the first one written at or after `cutoff`, as the embedded store prunes:
        // what is left of the log has no holes.
        let n = self.write(|c| {
            c.execute(
                "DELETE FROM ct_audit WHERE seq < coalesce(
                     (SELECT seq FROM ct_audit WHERE at >= $1 ORDER BY seq LIMIT 1),
                     (SELECT max(seq) + 1 FROM ct_audit))",
                &[&int(cutoff)],
            )
        })?;
        Ok(count(n))
    }

    fn audit_len(&self) -> Result<usize> {
        let row = self.read(|c| c.query_one("SELECT count(*) FROM ct_audit", &[]))?;
        Ok(unsigned(row.try_get(0)?, "count")? as usize)
    }

    // --- the dashboard's links and sessions (see `web`) ---

    fn put_web_session(&self, rec: &WebSessionRecord) -> Result<()> {
        self.put_web_session_(rec)
    }

    fn web_session(&self, hash: &str, now: u64) -> Result<Option<WebSessionRecord>> {
        self.web_session_(hash, now)
    }

    fn take_web_session(
        &self,
        hash: &str,
        kind: WebSessionKind,
        now: u64,
    ) -> Result<Option<WebSessionRecord>> {
        self.take_web_session_(hash, kind, now)
    }

    fn touch_web_session(&self, hash: &str, now: u64) -> Result<Option<WebSessionRecord>> {
        self.touch_web_session_(hash, now)
    }

    fn web_sessions_of(&self, user: &str, now: u64) -> Result<Vec<WebSessionRecord>> {
        self.web_sessions_of_(user, now)
    }

    fn delete_web_session(&self, user: &str, id: &str) -> Result<bool> {
        self.delete_web_session_(user, id)
    }

    fn delete_web_sessions_of(&self, user: &str, now: u64) -> Result<usize> {
        self.delete_web_sessions_of_(user, now)
    }

    fn prune_web_sessions(&self, now: u64) -> Result<usize> {
        self.prune_web_sessions_(now)
    }

    // --- the cluster (see `cluster`) ---

    fn claim_presence(&self, agent: &Fingerprint, node: &str) -> Result<Presence> {
        self.claim_presence_(agent, node)
    }

    fn release_presence(&self, agent: &Fingerprint, epoch: u64) -> Result<bool> {
        self.release_presence_(agent, epoch)
    }

    fn presence(&self, agent: &Fingerprint) -> Result<Option<Presence>> {
        self.presence_(agent)
    }

    fn presences(&self) -> Result<Vec<(Fingerprint, Presence)>> {
        self.presences_()
    }

    fn dispatch_task_from(&self, rec: &TaskRecord, was: &TaskRecord, epoch: u64) -> Result<bool> {
        self.dispatch_task_from_(rec, was, epoch)
    }

    fn dispatch_task(&self, rec: &TaskRecord, epoch: u64) -> Result<bool> {
        self.dispatch_task_(rec, epoch)
    }

    fn finish_queued(&self, rec: &TaskRecord) -> Result<bool> {
        self.finish_queued_(rec)
    }

    fn put_node(&self, rec: &NodeRecord) -> Result<()> {
        self.put_node_(rec)
    }

    fn nodes(&self) -> Result<Vec<NodeRecord>> {
        self.nodes_()
    }

    fn remove_node(&self, id: &str) -> Result<bool> {
        self.remove_node_(id)
    }

    fn lease(&self, name: &str, holder: &str, ttl: Duration) -> Result<bool> {
        self.lease_(name, holder, ttl)
    }

    fn release_lease(&self, name: &str, holder: &str) -> Result<()> {
        self.release_lease_(name, holder)
    }

    fn take_token(&self, bucket: &str, burst: u32, per_token: Duration) -> Result<bool> {
        self.take_token_(bucket, burst, per_token)
    }

    fn prune_buckets(&self, idle: Duration) -> Result<usize> {
        self.prune_buckets_(idle)
    }

    fn shared_secret(&self, name: &str, proposed: &[u8]) -> Result<Vec<u8>> {
        self.shared_secret_(name, proposed)
    }

    fn export(&self, sink: &mut dyn FnMut(Exported) -> Result<()>) -> Result<()> {
        self.export_(sink)
    }

    fn import(&self, records: &[Exported]) -> Result<()> {
        self.import_(records)
    }
}

/// A counted write in progress: ends it when dropped, however the write ended.
struct Writing<'a>(&'a PgStore);

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        let mut server = self.0.server();
        server.in_flight -= 1;
        if server.in_flight == 0 {
            server.settled = server.begun;
        }
    }
}

/// A task record's row: the columns the queries use, and the record itself.
pub(super) struct TaskRow<'a> {
    id: &'a str,
    agent: &'a [u8],
    requester: &'a str,
    session: Option<&'a str>,
    is_open: bool,
    ord: i64,
    updated_at: i64,
    output_bytes: i64,
    body: Vec<u8>,
}

impl<'a> TaskRow<'a> {
    fn of(rec: &'a TaskRecord) -> Result<Self> {
        Ok(Self {
            id: &rec.spec.task,
            agent: &rec.agent.0,
            requester: &rec.spec.requester.user,
            session: rec.session_id.as_deref(),
            is_open: !rec.state.is_final(),
            ord: int(rec.order),
            updated_at: int(rec.updated_at),
            output_bytes: int(rec.output_bytes),
            body: serde_json::to_vec(rec)?,
        })
    }

    /// The row's values as the task queries bind them, in column order: `id, agent, requester, session,
    /// is_open, ord, updated_at, output_bytes, body` ($1..$9).
    fn columns(&self) -> [&(dyn postgres::types::ToSql + Sync); 9] {
        [
            &self.id,
            &self.agent,
            &self.requester,
            &self.session,
            &self.is_open,
            &self.ord,
            &self.updated_at,
            &self.output_bytes,
            &self.body,
        ]
    }
}

/// Whether PostgreSQL aborted a transaction that can simply run again.
fn retryable(e: &postgres::Error) -> bool {
    matches!(
        e.code(),
        Some(c) if *c == SqlState::T_R_DEADLOCK_DETECTED || *c == SqlState::T_R_SERIALIZATION_FAILURE
    )
}

/// A u64 for a bigint column or bound: capped at `i64::MAX`, which nothing the relay counts reaches (see the
/// first migration). Comparisons stay exact below the cap; a "no bound" `u64::MAX` is the cap itself.
fn int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A Discord id in a bigint column, bit for bit: snowflakes fit in 63 bits today, but an id is not a count to
/// cap, and every u64 must read back as written.
pub(super) fn thread_bits(id: u64) -> i64 {
    i64::from_ne_bytes(id.to_ne_bytes())
}

/// [`thread_bits`] read back.
pub(super) fn thread_of_bits(v: i64) -> u64 {
    u64::from_ne_bytes(v.to_ne_bytes())
}

/// A row limit (`usize::MAX` means none).
fn limit_of(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// An event's sequence number, which is part of its key and so is never capped: two events must not share one.
fn event_seq(seq: u64) -> Result<i64> {
    i64::try_from(seq).map_err(|_| corrupt("event sequence number above 2^63-1"))
}

/// A bigint column read back as a u64: a negative one was not written by this store.
fn unsigned(v: i64, what: &str) -> Result<u64> {
    u64::try_from(v).map_err(|_| corrupt(&format!("negative {what}")))
}

fn count(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

/// Data that does not decode: reported like a record that does not.
fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt(<serde_json::Error as serde::de::Error>::custom(what))
}

/// The record in a row's first column.
fn body<T: DeserializeOwned>(row: &Row) -> Result<T> {
    Ok(serde_json::from_slice(row.try_get::<_, &[u8]>(0)?)?)
}

fn bodies<T: DeserializeOwned>(rows: &[Row]) -> Result<Vec<T>> {
    rows.iter().map(body).collect()
}
