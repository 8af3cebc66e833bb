//! Retention: what the relay forgets, and when. Tasks (with their events) are deleted
//! [`CoreConfig::task_retention`](crate::core::CoreConfig) after they ended, audit entries
//! `audit_retention` after they were written, pairing codes a day after they expired. [`Core::prune`] does it
//! for a given time, so tests can move the clock; [`run`] calls it hourly for the relay's lifetime.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::core::{Core, CoreError, CODE_MEMORY};

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
    pub fn prune(&self, now: u64) -> Result<Pruned, CoreError> {
        let config = self.config();
        let mut done = Pruned::default();
        let task_cutoff = now.saturating_sub(config.task_retention.as_secs());
        let mut after: Option<crate::store::TaskRecord> = None;
        loop {
            let due = self
                .store()
                .ended_before(task_cutoff, BATCH, after.as_ref())?;
            for rec in &due {
                // `None`: it changed since it was read (a late event); it is looked at again next time.
                if let Some(events) = self.store().delete_task(rec)? {
                    done.tasks += 1;
                    done.events += events;
                    self.close_followers(&rec.spec.task);
                }
            }
            match due.last() {
                Some(last) if due.len() == BATCH => after = Some(last.clone()),
                _ => break,
            }
        }
        done.audit = self
            .store()
            .prune_audit(now.saturating_sub(config.audit_retention.as_secs()))?;
        done.pair_codes = self
            .store()
            .prune_pair_codes(now.saturating_sub(CODE_MEMORY))?;
        if done != Pruned::default() {
            self.store().flush()?;
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

/// Prunes at once and then every [`PRUNE_EVERY`] until `shutdown`. The store work runs on a blocking thread,
/// so a long prune does not hold up sessions on the runtime.
pub async fn run(core: Arc<Core>, shutdown: CancellationToken) {
    let mut every = tokio::time::interval(PRUNE_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let core = core.clone();
        let prune = tokio::task::spawn_blocking(move || core.prune(crate::store::now()));
        // On shutdown the prune in progress finishes on its own (each deletion is complete in itself); the
        // relay does not wait for it.
        tokio::select! {
            r = prune => match r {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::error!(error = %e, "prune failed; trying again in an hour"),
                Err(e) => tracing::error!(error = %e, "prune stopped unexpectedly; trying again in an hour"),
            },
            () = shutdown.cancelled() => return,
        }
    }
}
