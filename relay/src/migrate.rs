//! `ct-relay migrate`: moves an embedded relay's state (its sled store and its relay key) into a cluster's
//! PostgreSQL database, so the relay can run as nodes of a cluster and its agents reconnect without pairing
//! again (the nodes answer for the same key).
//!
//! The copy goes through the storage interface's export and import, so it is the same for any two
//! backends. It refuses a target that already holds a relay's state (agents, tasks or audit entries) or a
//! different relay key: merging two relays' histories is not something to do by accident.

use std::fmt;

use anyhow::{bail, Context as _, Result};

use crate::store::{Exported, Store, RELAY_KEY};

/// Records written per import call: bounds memory (a task's events travel with it) and each transaction.
const BATCH: usize = 500;

/// What was copied.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Moved {
    pub agents: usize,
    pub pair_codes: usize,
    pub users: usize,
    pub shares: usize,
    pub tasks: usize,
    pub events: usize,
    pub audit: usize,
    pub thread_marks: usize,
    pub secrets: usize,
    pub pools: usize,
}

impl fmt::Display for Moved {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} agents, {} users, {} shares, {} tasks with {} events, {} audit entries, {} pairing codes, \
             {} Discord thread marks, {} shared secrets, {} worker pools",
            self.agents,
            self.users,
            self.shares,
            self.tasks,
            self.events,
            self.audit,
            self.pair_codes,
            self.thread_marks,
            self.secrets,
            self.pools
        )
    }
}

impl Moved {
    fn count(&mut self, r: &Exported) {
        match r {
            Exported::Agent(_) => self.agents += 1,
            Exported::PairCode(_) => self.pair_codes += 1,
            Exported::User(..) => self.users += 1,
            Exported::Share(_) => self.shares += 1,
            Exported::Task(_, events) => {
                self.tasks += 1;
                self.events += events.len();
            }
            Exported::Audit(_) => self.audit += 1,
            Exported::ThreadMark(..) => self.thread_marks += 1,
            // Links from a task to its Discord thread, and a thread's chain: part of the task, not counted on their own.
            Exported::TaskThread(..) | Exported::ThreadChain(..) => {}
            Exported::Secret(..) => self.secrets += 1,
            Exported::Pool(_) => self.pools += 1,
        }
    }
}

/// Copies everything in `from` into `to`, with `relay_key` (the embedded relay's key seed) as the cluster's
/// relay key. Blocking: call it from a plain thread or the blocking pool.
pub fn copy(from: &dyn Store, to: &dyn Store, relay_key: &[u8; 32]) -> Result<Moved> {
    if !to.agents()?.is_empty() || to.audit_len()? > 0 {
        bail!(
            "the target database already holds a relay's state (agents or audit entries): migrate into an empty \
             database, or drop this one's tables first if it is a failed earlier attempt"
        );
    }
    let stored = to.shared_secret(RELAY_KEY, relay_key)?;
    if stored != relay_key {
        bail!(
            "the target database already has a different relay key: its nodes answer for another relay, and \
             this relay's agents would have to pair again. Migrate into an empty database"
        );
    }
    let mut moved = Moved::default();
    let mut batch = Vec::with_capacity(BATCH);
    let mut failed: Option<anyhow::Error> = None;
    let read = from.export(&mut |record| {
        moved.count(&record);
        batch.push(record);
        if batch.len() >= BATCH {
            if let Err(e) = to.import(&batch) {
                failed = Some(e.into());
                // Stops the export: nothing more is read once a write failed.
                return Err(crate::store::StoreError::Conflict);
            }
            batch.clear();
        }
        Ok(())
    });
    if let Some(write) = failed {
        return Err(write.context("writing the records to the target"));
    }
    read.context("reading the records")?;
    to.import(&batch).context("copying the records")?;
    to.flush().context("making the copy durable")?;
    Ok(moved)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sled::SledStore;
    use crate::store::{AgentRecord, AuditEntry, AuditKind};
    use ct_protocol::Fingerprint;

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

    #[test]
    fn copies_everything_and_refuses_a_used_target_or_another_key() {
        let (a, b, c) = (
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
        );
        let from = SledStore::open(a.path()).unwrap();
        for n in 1..=3 {
            from.put_agent(&agent(n)).unwrap();
        }
        from.append_audit(&AuditEntry::new(
            AuditKind::DefaultAgentSet,
            "1",
            "1",
            "x".into(),
        ))
        .unwrap();
        let to = SledStore::open(b.path()).unwrap();
        let moved = copy(&from, &to, &[9; 32]).unwrap();
        assert_eq!((moved.agents, moved.audit), (3, 1));
        assert_eq!(to.agents().unwrap().len(), 3);
        assert_eq!(to.shared_secret(RELAY_KEY, &[0; 32]).unwrap(), vec![9; 32]);
        // Twice into the same target: refused, nothing doubled.
        let again = copy(&from, &to, &[9; 32]).unwrap_err().to_string();
        assert!(again.contains("already holds"), "{again}");
        // A target that answers for another relay key.
        let other = SledStore::open(c.path()).unwrap();
        other.shared_secret(RELAY_KEY, &[1; 32]).unwrap();
        let err = copy(&from, &other, &[9; 32]).unwrap_err().to_string();
        assert!(err.contains("different relay key"), "{err}");
        assert!(other.agents().unwrap().is_empty());
    }

    /// Sled into PostgreSQL, as `ct-relay migrate` does: every record arrives, and the target answers like
    /// the source.
    #[test]
    fn an_embedded_relay_moves_into_postgresql_whole() {
        let dir = tempfile::tempdir().unwrap();
        let from = SledStore::open(dir.path()).unwrap();
        for n in 1..=2 {
            from.put_agent(&agent(n)).unwrap();
        }
        let mut rec = crate::store::TaskRecord {
            spec: ct_protocol::task::TaskSpec {
                task: "t_moved".into(),
                project: "app".into(),
                prompt: "p".into(),
                requester: ct_protocol::task::Requester {
                    user: "1".into(),
                    name: None,
                    role: ct_protocol::task::Role::Owner,
                },
                options: Default::default(),
                resume: None,
            },
            agent: Fingerprint([1; 32]),
            state: crate::store::TaskState::Queued,
            created_at: 1,
            updated_at: 1,
            last_seq: 0,
            session_id: None,
            message: None,
            dispatched_at: None,
            follows: None,
            order: 1,
            output_bytes: 0,
            output_truncated: false,
            worktree: None,
            files: 0,
        };
        from.put_task(&rec).unwrap();
        rec.last_seq = 2;
        rec.output_bytes = 4;
        from.append_event_runs(&[crate::store::EventRun {
            task: &rec,
            events: &[(1, Some(b"{}")), (2, Some(b"[]"))],
            was_open: None,
        }])
        .unwrap();
        from.append_audit(&AuditEntry::new(
            AuditKind::DefaultAgentSet,
            "1",
            "1",
            "x".into(),
        ))
        .unwrap();
        let server = ct_testkit::postgres::PgServer::shared();
        let url = server.create_database("migrate_whole").unwrap();
        let to = crate::store::postgres::PgStore::open(&url).unwrap();
        let moved = copy(&from, &to, &[3; 32]).unwrap();
        assert_eq!(
            (moved.agents, moved.tasks, moved.events, moved.audit),
            (2, 1, 2, 1)
        );
        let dump = |s: &dyn Store| {
            let mut all = Vec::new();
            s.export(&mut |r| {
                all.push(format!("{r:?}"));
                Ok(())
            })
            .unwrap();
            all.sort();
            all
        };
        let mut want = dump(&from);
        want.push(format!(
            "{:?}",
            Exported::Secret(RELAY_KEY.into(), vec![3; 32])
        ));
        want.sort();
        assert_eq!(dump(&to), want);
        assert_eq!(to.open_tasks(&Fingerprint([1; 32])).unwrap(), vec![rec]);
        assert_eq!(to.event_bytes("t_moved", 1).unwrap().len(), 1);
    }
}
