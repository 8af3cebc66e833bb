//! Retention: what the relay forgets, and when. Tasks (with their events) are deleted
//! [`CoreConfig::task_retention`](crate::core::CoreConfig) after they ended, audit entries
//! `audit_retention` after they were written, pairing codes a day after they expired. [`Core::prune`] does it
//! for a given time, so tests can move the clock; [`run`] calls it hourly for the relay's lifetime.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::pairing::CODE_MEMORY;
use super::state::State;
use super::{Core, CoreError};
use crate::store::TaskRecord;

/// How often the relay prunes.
pub const PRUNE_EVERY: Duration = Duration::from_secs(3600);
/// Tasks deleted per store scan: each scan collects at most this many, so memory stays bounded however many
/// are due.
const BATCH: usize = 1000;

/// What one prune deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pruned {
    pub tasks: usize,
    pub events: usize,
    pub audit: usize,
    pub pair_codes: usize,
}

impl Core {
    /// Deletes what is past its retention at `now` (Unix seconds): ended tasks and their events, audit
    /// entries, and old pairing codes. Open tasks are never deleted. Anyone following a deleted task is told it
    /// is gone (their receiver closes) rather than left waiting.
    ///
    /// Tasks go in batches of [`BATCH`], each one job on the core's thread, so other work goes on between
    /// them however much is due.
    pub async fn prune(&self, now: u64) -> Result<Pruned, CoreError> {
        let config = self.config();
        let task_cutoff = now.saturating_sub(config.task_retention.as_secs());
        let audit_cutoff = now.saturating_sub(config.audit_retention.as_secs());
        let mut done = Pruned::default();
        let mut after: Option<TaskRecord> = None;
        loop {
            let (tasks, events, next) = self
                .run(move |state| state.prune_tasks(task_cutoff, after.as_ref()))
                .await?;
            done.tasks += tasks;
            done.events += events;
            match next {
                Some(last) => after = Some(last),
                None => break,
            }
        }
        let (audit, pair_codes) = self
            .run(move |state| state.prune_records(audit_cutoff, now))
            .await?;
        done.audit = audit;
        done.pair_codes = pair_codes;
        if done != Pruned::default() {
            tracing::info!(
                tasks = done.tasks,
                events = done.events,
                audit = done.audit,
                pair_codes = done.pair_codes,
                "pruned what is past its retention"
            );
        }
        Ok(done)
    }
}

impl State {
    /// Deletes one batch of tasks that ended before `cutoff`, after the cursor. Returns the tasks and events
    /// deleted, and the cursor for the next batch (`None`: this was the last).
    fn prune_tasks(
        &mut self,
        cutoff: u64,
        after: Option<&TaskRecord>,
    ) -> Result<(usize, usize, Option<TaskRecord>), CoreError> {
        let due = self.store().ended_before(cutoff, BATCH, after)?;
        let (mut tasks, mut events) = (0, 0);
        for rec in &due {
            // `None`: it changed since it was read (a late event); it is looked at again next time.
            if let Some(n) = self.store().delete_task(rec)? {
                tasks += 1;
                events += n;
                self.close_followers(&rec.spec.task);
            }
        }
        if tasks > 0 {
            self.must_be_durable();
        }
        let next = match due.last() {
            Some(last) if due.len() == BATCH => Some(last.clone()),
            _ => None,
        };
        Ok((tasks, events, next))
    }

    /// Deletes audit entries written before `audit_cutoff` and pairing codes forgotten by `now`.
    fn prune_records(&mut self, audit_cutoff: u64, now: u64) -> Result<(usize, usize), CoreError> {
        let audit = self.store().prune_audit(audit_cutoff)?;
        let codes = self
            .store()
            .prune_pair_codes(now.saturating_sub(CODE_MEMORY))?;
        if let Err(e) = self.store().prune_buckets(BUCKET_IDLE) {
            tracing::warn!(error = %e, "could not forget idle rate-limit buckets");
        }
        // Expired dashboard links and sessions: refused already when used, here only forgotten.
        if let Err(e) = self.store().prune_web_sessions(now) {
            tracing::warn!(error = %e, "could not forget expired dashboard sessions");
        }
        if audit + codes > 0 {
            self.must_be_durable();
        }
        Ok((audit, codes))
    }
}

/// Shared rate-limit buckets idle this long are full again (every limit refills within minutes), so they are
/// forgotten.
const BUCKET_IDLE: std::time::Duration = std::time::Duration::from_secs(3600);

/// Prunes at once and then every [`PRUNE_EVERY`] until `shutdown`.
pub async fn run(core: Core, shutdown: CancellationToken) {
    let mut every = tokio::time::interval(PRUNE_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            () = shutdown.cancelled() => return,
        }
        // On shutdown the prune stops between two batches (each deletion is complete in itself).
        tokio::select! {
            r = core.prune(crate::store::now()) => if let Err(e) = r {
                tracing::error!(error = %e, "prune failed; trying again in an hour");
            },
            () = shutdown.cancelled() => return,
        }
    }
}
