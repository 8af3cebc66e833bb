//! The operations only a cluster needs (presence, exactly-once dispatch, heartbeats, leases, shared buckets
//! and secrets) and moving a relay's records in and out (`ct-relay migrate`), on the tables of
//! `relay/migrations/0002_cluster.sql`. Called from the `Store` implementation in `mod.rs`.

use std::time::Duration;

use ct_protocol::Fingerprint;

use super::{bodies, body, int, unsigned, PgStore};
use crate::store::{Exported, NodeRecord, Presence, Result, TaskRecord};

/// Tasks read per query while exporting: bounds memory for a long history.
const EXPORT_PAGE: i64 = 1000;

impl PgStore {
    pub(super) fn claim_presence_(&self, agent: &Fingerprint, node: &str) -> Result<Presence> {
        let since = crate::store::now();
        let row = self.write(|c| {
            c.query_one(
                "INSERT INTO ct_presence (agent, node, epoch, since) VALUES ($1, $2, nextval('ct_epoch'), $3)
                 ON CONFLICT (agent) DO UPDATE SET
                     node = excluded.node, epoch = excluded.epoch, since = excluded.since
                 RETURNING epoch",
                &[&&agent.0[..], &node, &int(since)],
            )
        })?;
        Ok(Presence {
            node: node.to_string(),
            epoch: unsigned(row.try_get(0)?, "epoch")?,
            since,
        })
    }

    pub(super) fn release_presence_(&self, agent: &Fingerprint, epoch: u64) -> Result<bool> {
        let n = self.write(|c| {
            c.execute(
                "DELETE FROM ct_presence WHERE agent = $1 AND epoch = $2",
                &[&&agent.0[..], &int(epoch)],
            )
        })?;
        Ok(n == 1)
    }

    pub(super) fn presence_(&self, agent: &Fingerprint) -> Result<Option<Presence>> {
        let row = self.read(|c| {
            c.query_opt(
                "SELECT node, epoch, since FROM ct_presence WHERE agent = $1",
                &[&&agent.0[..]],
            )
        })?;
        row.map(|r| {
            Ok(Presence {
                node: r.try_get(0)?,
                epoch: unsigned(r.try_get(1)?, "epoch")?,
                since: unsigned(r.try_get(2)?, "since")?,
            })
        })
        .transpose()
    }

    pub(super) fn presences_(&self) -> Result<Vec<(Fingerprint, Presence)>> {
        let rows = self.read(|c| {
            c.query(
                "SELECT agent, node, epoch, since FROM ct_presence ORDER BY agent",
                &[],
            )
        })?;
        rows.iter()
            .map(|r| {
                let key: Vec<u8> = r.try_get(0)?;
                let fp: [u8; 32] = key
                    .as_slice()
                    .try_into()
                    .map_err(|_| super::corrupt("presence key"))?;
                Ok((
                    Fingerprint(fp),
                    Presence {
                        node: r.try_get(1)?,
                        epoch: unsigned(r.try_get(2)?, "epoch")?,
                        since: unsigned(r.try_get(3)?, "since")?,
                    },
                ))
            })
            .collect()
    }

    /// Writes `rec` if the stored task `still_queued` and, with `epoch`, the agent's presence is that epoch.
    /// The task's row is locked from the read to the commit, and the presence row is read with a share
    /// lock, so a claim by a newer session waits for this dispatch rather than slipping in between.
    fn swap_queued(&self, rec: &TaskRecord, epoch: Option<u64>) -> Result<bool> {
        self.transaction(|c| {
            let Some(row) = c.query_opt(
                "SELECT body FROM ct_tasks WHERE id = $1 FOR UPDATE",
                &[&rec.spec.task],
            )?
            else {
                return Ok(false);
            };
            let stored: TaskRecord = body(&row)?;
            if stored.state.is_final() || stored.is_dispatched() {
                return Ok(false);
            }
            if let Some(epoch) = epoch {
                let current = c.query_opt(
                    "SELECT epoch FROM ct_presence WHERE agent = $1 FOR SHARE",
                    &[&&rec.agent.0[..]],
                )?;
                match current {
                    Some(r) if unsigned(r.try_get(0)?, "epoch")? == epoch => {}
                    _ => return Ok(false),
                }
            }
            Self::put_task_on(c, rec)?;
            Ok(true)
        })
    }

    pub(super) fn dispatch_task_(&self, rec: &TaskRecord, epoch: u64) -> Result<bool> {
        self.swap_queued(rec, Some(epoch))
    }

    pub(super) fn finish_queued_(&self, rec: &TaskRecord) -> Result<bool> {
        self.swap_queued(rec, None)
    }

    pub(super) fn put_node_(&self, rec: &NodeRecord) -> Result<()> {
        let value = serde_json::to_vec(rec)?;
        self.passing_write(|c| {
            c.execute(
                "INSERT INTO ct_nodes (id, body) VALUES ($1, $2)
                 ON CONFLICT (id) DO UPDATE SET body = excluded.body",
                &[&rec.id, &value],
            )
        })?;
        Ok(())
    }

    pub(super) fn nodes_(&self) -> Result<Vec<NodeRecord>> {
        bodies(&self.read(|c| c.query("SELECT body FROM ct_nodes ORDER BY id", &[]))?)
    }

    pub(super) fn remove_node_(&self, id: &str) -> Result<bool> {
        Ok(self.passing_write(|c| c.execute("DELETE FROM ct_nodes WHERE id = $1", &[&id]))? == 1)
    }

    pub(super) fn lease_(&self, name: &str, holder: &str, ttl: Duration) -> Result<bool> {
        // One statement: taken when free, expired, or already the holder's; the database's clock decides.
        let n = self.passing_write(|c| {
            c.execute(
                "INSERT INTO ct_leases (name, holder, until)
                 VALUES ($1, $2, clock_timestamp() + make_interval(secs => $3))
                 ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, until = excluded.until
                 WHERE ct_leases.holder = excluded.holder OR ct_leases.until < clock_timestamp()",
                &[&name, &holder, &ttl.as_secs_f64()],
            )
        })?;
        Ok(n == 1)
    }

    pub(super) fn release_lease_(&self, name: &str, holder: &str) -> Result<()> {
        self.passing_write(|c| {
            c.execute(
                "DELETE FROM ct_leases WHERE name = $1 AND holder = $2",
                &[&name, &holder],
            )
        })?;
        Ok(())
    }

    pub(super) fn take_token_(
        &self,
        bucket: &str,
        burst: u32,
        per_token: Duration,
    ) -> Result<bool> {
        let per = per_token.as_secs_f64().max(0.001);
        let burst = f64::from(burst.max(1));
        // One statement, so one round trip on every submission's way. A new bucket starts full and gives its
        // first token. An existing one is locked by the upsert, so two nodes taking at once are counted one
        // after the other; it gives a token only when its refill (by the database's clock) makes one. A
        // refusal leaves the row as it was: the refill since `at` is counted again next time, which comes to
        // the same tokens as writing it now would (both are capped at the burst). So a refused bucket's `at` is
        // at most one token's refill old, well inside the hour after which idle buckets are pruned.
        let taken = self.passing_write(|c| {
            c.query_opt(
                "INSERT INTO ct_buckets AS b (name, tokens, at) VALUES ($1, $2::float8 - 1, clock_timestamp())
                 ON CONFLICT (name) DO UPDATE SET
                     tokens = least($2::float8, b.tokens
                         + greatest(extract(epoch FROM clock_timestamp() - b.at)::float8, 0) / $3::float8) - 1,
                     at = clock_timestamp()
                 WHERE least($2::float8, b.tokens
                     + greatest(extract(epoch FROM clock_timestamp() - b.at)::float8, 0) / $3::float8) >= 1
                 RETURNING 1",
                &[&bucket, &burst, &per],
            )
        })?;
        Ok(taken.is_some())
    }

    pub(super) fn prune_buckets_(&self, idle: Duration) -> Result<usize> {
        let n = self.passing_write(|c| {
            c.execute(
                "DELETE FROM ct_buckets WHERE at < clock_timestamp() - make_interval(secs => $1)",
                &[&idle.as_secs_f64()],
            )
        })?;
        Ok(n as usize)
    }

    pub(super) fn shared_secret_(&self, name: &str, proposed: &[u8]) -> Result<Vec<u8>> {
        self.write(|c| {
            c.execute(
                "INSERT INTO ct_secrets (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
                &[&name, &proposed],
            )?;
            // Whoever inserted first, this reads what is stored now.
            let row = c.query_one("SELECT value FROM ct_secrets WHERE name = $1", &[&name])?;
            Ok(row.try_get(0)?)
        })
    }
}

impl PgStore {
    pub(super) fn export_(&self, sink: &mut dyn FnMut(Exported) -> Result<()>) -> Result<()> {
        // ct_web_sessions stays behind: see `Store::export`.
        for row in self.read(|c| c.query("SELECT body FROM ct_agents ORDER BY fingerprint", &[]))? {
            sink(Exported::Agent(body(&row)?))?;
        }
        for row in self.read(|c| c.query("SELECT body FROM ct_pair_codes ORDER BY id", &[]))? {
            sink(Exported::PairCode(body(&row)?))?;
        }
        for row in self.read(|c| c.query("SELECT id, body FROM ct_users ORDER BY id", &[]))? {
            let bytes: Vec<u8> = row.try_get(1)?;
            sink(Exported::User(
                row.try_get(0)?,
                serde_json::from_slice(&bytes)?,
            ))?;
        }
        for row in
            self.read(|c| c.query("SELECT body FROM ct_shares ORDER BY owner, grantee", &[]))?
        {
            sink(Exported::Share(body(&row)?))?;
        }
        for row in self.read(|c| c.query("SELECT body FROM ct_pools ORDER BY name", &[]))? {
            sink(Exported::Pool(body(&row)?))?;
        }
        // Tasks a page at a time, each with its events.
        let mut after = String::new();
        loop {
            let page = self.read(|c| {
                c.query(
                    "SELECT id, body FROM ct_tasks WHERE id > $1 ORDER BY id LIMIT $2",
                    &[&after, &EXPORT_PAGE],
                )
            })?;
            let Some(last) = page.last() else { break };
            after = last.try_get(0)?;
            for row in &page {
                let bytes: Vec<u8> = row.try_get(1)?;
                let rec: TaskRecord = serde_json::from_slice(&bytes)?;
                let events = crate::store::Store::event_bytes(self, &rec.spec.task, 0)?;
                sink(Exported::Task(rec, events))?;
            }
        }
        for row in self.read(|c| c.query("SELECT body FROM ct_audit ORDER BY seq", &[]))? {
            sink(Exported::Audit(body(&row)?))?;
        }
        for row in
            self.read(|c| c.query("SELECT task, mark FROM ct_thread_marks ORDER BY task", &[]))?
        {
            sink(Exported::ThreadMark(row.try_get(0)?, row.try_get(1)?))?;
        }
        for row in self.read(|c| {
            c.query(
                "SELECT task, thread FROM ct_task_threads ORDER BY task",
                &[],
            )
        })? {
            sink(Exported::TaskThread(
                row.try_get(0)?,
                super::thread_of_bits(row.try_get(1)?),
            ))?;
        }
        for row in self.read(|c| {
            c.query(
                "SELECT thread, task, body FROM ct_thread_chains ORDER BY thread",
                &[],
            )
        })? {
            sink(Exported::ThreadChain(
                super::thread_of_bits(row.try_get(0)?),
                row.try_get(1)?,
                row.try_get(2)?,
            ))?;
        }
        for row in
            self.read(|c| c.query("SELECT name, value FROM ct_secrets ORDER BY name", &[]))?
        {
            sink(Exported::Secret(row.try_get(0)?, row.try_get(1)?))?;
        }
        Ok(())
    }

    /// One transaction per call: a batch is imported entirely or not at all.
    pub(super) fn import_(&self, records: &[Exported]) -> Result<()> {
        self.transaction(|c| {
            for record in records {
                match record {
                    Exported::Agent(rec) => Self::put_agent_on(c, rec)?,
                    Exported::PairCode(rec) => {
                        c.execute(
                            "INSERT INTO ct_pair_codes (id, owner, expires_at, body) VALUES ($1, $2, $3, $4)
                             ON CONFLICT (id) DO UPDATE SET
                                 owner = excluded.owner, expires_at = excluded.expires_at, body = excluded.body",
                            &[&rec.id, &rec.owner, &int(rec.expires_at), &serde_json::to_vec(rec)?],
                        )?;
                    }
                    Exported::User(id, rec) => {
                        Self::put_user_on(c, id, rec.in_pools(), &serde_json::to_vec(rec)?)?;
                    }
                    Exported::Pool(rec) => {
                        Self::put_pool_on(c, &rec.name, &serde_json::to_vec(rec)?)?;
                    }
                    Exported::Share(rec) => {
                        c.execute(
                            "INSERT INTO ct_shares (owner, grantee, body) VALUES ($1, $2, $3)
                             ON CONFLICT (owner, grantee) DO UPDATE SET body = excluded.body",
                            &[&rec.owner, &rec.grantee, &serde_json::to_vec(rec)?],
                        )?;
                    }
                    Exported::Task(rec, events) => {
                        Self::put_task_on(c, rec)?;
                        let seqs: Vec<i64> = events.iter().map(|(s, _)| int(*s)).collect();
                        let bodies: Vec<&[u8]> = events.iter().map(|(_, b)| b.as_slice()).collect();
                        c.execute(
                            "INSERT INTO ct_events (task, seq, body)
                             SELECT $1, e.seq, e.body FROM unnest($2::int8[], $3::bytea[]) AS e(seq, body)
                             ON CONFLICT (task, seq) DO NOTHING",
                            &[&rec.spec.task, &seqs, &bodies],
                        )?;
                    }
                    Exported::Audit(entry) => {
                        c.execute(
                            "INSERT INTO ct_audit (seq, owner, at, body) VALUES ($1, $2, $3, $4)
                             ON CONFLICT (seq) DO UPDATE SET
                                 owner = excluded.owner, at = excluded.at, body = excluded.body",
                            &[&int(entry.seq), &entry.owner, &int(entry.at), &serde_json::to_vec(entry)?],
                        )?;
                        // Later entries follow the highest number imported.
                        c.execute(
                            "UPDATE ct_audit_counter SET last = greatest(last, $1)",
                            &[&int(entry.seq)],
                        )?;
                    }
                    Exported::ThreadMark(task, mark) => {
                        c.execute(
                            "INSERT INTO ct_thread_marks (task, mark) VALUES ($1, $2)
                             ON CONFLICT (task) DO UPDATE SET mark = excluded.mark",
                            &[task, mark],
                        )?;
                    }
                    Exported::TaskThread(task, thread) => {
                        c.execute(
                            "INSERT INTO ct_task_threads (task, thread) VALUES ($1, $2)
                             ON CONFLICT (task) DO UPDATE SET thread = excluded.thread",
                            &[task, &super::thread_bits(*thread)],
                        )?;
                    }
                    Exported::ThreadChain(thread, task, chain) => {
                        c.execute(
                            "INSERT INTO ct_thread_chains (thread, task, body) VALUES ($1, $2, $3)
                             ON CONFLICT (thread) DO UPDATE SET task = excluded.task, body = excluded.body",
                            &[&super::thread_bits(*thread), task, chain],
                        )?;
                    }
                    Exported::Secret(name, value) => {
                        c.execute(
                            "INSERT INTO ct_secrets (name, value) VALUES ($1, $2)
                             ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                            &[name, value],
                        )?;
                    }
                }
            }
            Ok(())
        })
    }
}
