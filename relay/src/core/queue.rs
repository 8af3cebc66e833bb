//! Each agent's queue: tasks wait, first in first out, until the agent has a free slot
//! ([`CoreConfig::max_running_per_agent`](super::CoreConfig)); the queue moves when a task ends, when the agent
//! reconnects, and on heartbeats after its outbound queue was full. After a reconnect the agent's report of
//! what it still runs is reconciled with what the relay sent it.

use std::sync::atomic::Ordering;

use ct_protocol::task::Role;
use ct_protocol::{Fingerprint, RelayMessage};

use super::state::{Outbound, State};
use super::tasks::{check_options, TaskError};
use super::Core;
use crate::store::{now, AgentRecord, TaskRecord, TaskState};

/// Tasks remembered as sent during a session whose `Running` report has not arrived yet.
const MAX_UNRECONCILED: usize = 1024;

impl Core {
    /// Called when an agent's session starts: what fits its free slots goes out now (tasks still counted as
    /// running from before wait for its `Running` report).
    pub async fn agent_connected(&self, agent: Fingerprint) {
        let open = self.open_tasks_ahead(agent).await;
        // A dispatch writes only queued tasks, which have no events in flight (see `Job::Unsettled`).
        let _ = self
            .call_unsettled(move |state| state.agent_connected(&agent, open))
            .await;
    }

    /// In a cluster, `agent`'s open tasks read on the blocking pool for a dispatch on the core's thread (see
    /// [`State::dispatch_queued_from`]): every agent that connects, and every task submitted for an agent
    /// held here, would otherwise cost the core's thread a round trip to PostgreSQL. `None` on a single
    /// relay (read in place), or when the read failed (read again there).
    pub(crate) async fn open_tasks_ahead(&self, agent: Fingerprint) -> Option<Vec<TaskRecord>> {
        self.bus()?;
        self.read(move |store| store.open_tasks(&agent).ok())
            .await
            .ok()
            .flatten()
    }

    /// Retries dispatching for an agent whose outbound queue was full the last time: called on a heartbeat
    /// when the session's guard says a task start waits (`SessionGuard::dispatch_waiting`).
    pub async fn retry_dispatch(&self, agent: Fingerprint) {
        let _ = self.call(move |state| state.retry_dispatch(&agent)).await;
    }

    /// Reconciles after a (re)connect: the agent reports what it still runs; any other task it had been sent
    /// in an earlier session is lost. Queued tasks are the relay's and stay queued; then the queue moves. A
    /// running task whose requester lost their share meanwhile is cancelled through the agent.
    pub async fn agent_running(
        &self,
        agent: Fingerprint,
        running: Vec<String>,
    ) -> Result<(), TaskError> {
        self.run(move |state| state.agent_running(&agent, &running))
            .await
    }
}

impl State {
    /// Sends queued tasks to the agent, oldest first, while it has free slots. A task whose requester lost
    /// their share while it waited is cancelled instead.
    pub(crate) fn dispatch_queued(&mut self, agent: &Fingerprint) -> Result<(), TaskError> {
        self.dispatch_queued_from(agent, None)
    }

    /// [`dispatch_queued`](Self::dispatch_queued) with the agent's open tasks read already: `open`, when
    /// `Some`, is what the store said a moment ago (in a cluster, read on the blocking pool: see
    /// [`Core::open_tasks_ahead`]). Every dispatch is a compare-and-swap against the record as read, so a
    /// stale list sends nothing twice; it can count too few tasks as running (one another pass dispatched
    /// since), so once a swap fails the list is read again here and the pass starts over.
    pub(crate) fn dispatch_queued_from(
        &mut self,
        agent: &Fingerprint,
        mut open: Option<Vec<TaskRecord>>,
    ) -> Result<(), TaskError> {
        let epoch = if let Some(live) = self.live.get_mut(agent) {
            live.retry.store(false, Ordering::Release);
            live.epoch
        } else {
            // Held by another node (or by none yet): whichever node holds it dispatches.
            self.tell_holder(agent, &super::remote::NodeMsg::Kick);
            return Ok(());
        };
        let read_ahead = open.is_some();
        let open = match open.take() {
            Some(open) => open,
            None => self.store().open_tasks(agent)?,
        };
        let mut running = open.iter().filter(|t| t.is_dispatched()).count();
        for mut rec in open.into_iter().filter(|t| !t.is_dispatched()) {
            if running >= self.config().max_running_per_agent {
                break;
            }
            // The record as read: dispatching swaps it for the dispatched one if it still is.
            let was = rec.clone();
            // The share may have been narrowed or downgraded while the task waited.
            let standing = self.standing(&rec);
            match standing {
                Ok(role) => rec.spec.requester.role = role,
                Err(why) => {
                    match self.finish_here(&mut rec, TaskState::Cancelled, why) {
                        Ok(()) | Err(TaskError::JustStarted(_)) => {}
                        Err(e) => return Err(e),
                    }
                    continue;
                }
            }
            // Durable before it is sent: after a crash the relay must not send the same task twice. The session
            // writes the start once the ticket's flush is done.
            // Read before the task is marked sent: a store that cannot give them leaves it queued.
            let parts = if rec.files > 0 {
                let files = self.store().task_files(&rec.spec.task)?;
                if files.len() != rec.files as usize {
                    tracing::warn!(task = %rec.spec.task, kept = files.len(), attached = rec.files, "a task's files are not all kept");
                }
                ct_protocol::files::parts_of(&rec.spec.task, &files)
            } else {
                Vec::new()
            };
            rec.dispatched_at = Some(now());
            rec.updated_at = now();
            self.forget_written(agent, &rec.spec.task);
            if !self.store().dispatch_task_from(&rec, &was, epoch)? {
                if read_ahead {
                    return self.dispatch_queued_from(agent, None);
                }
                // Another session took it (this one was replaced), or it ended meanwhile on another node.
                tracing::debug!(task = %rec.spec.task, "task not dispatched here: taken or ended elsewhere");
                continue;
            }
            let start = Outbound {
                after: Some(self.ticket()),
                msg: RelayMessage::StartTask(rec.spec.clone()),
                parts,
            };
            let sent = match self.live.get_mut(agent) {
                Some(live) => match live.outbound.try_send(start) {
                    Ok(()) => {
                        if live.dispatched_here.len() >= MAX_UNRECONCILED {
                            // An agent that sent no report after this many tasks does not send one: stop
                            // remembering (and stop expecting it) rather than grow without bound.
                            live.reconciled = true;
                            live.dispatched_here.clear();
                        }
                        if !live.reconciled {
                            live.dispatched_here.insert(rec.spec.task.clone());
                        }
                        true
                    }
                    Err(_) => {
                        live.retry.store(true, Ordering::Release);
                        false
                    }
                },
                None => false,
            };
            if !sent {
                // Still the relay's: it goes out on a later attempt (a heartbeat, a reconnect, a task ending).
                rec.dispatched_at = None;
                self.store().put_task(&rec)?;
                tracing::warn!(task = %rec.spec.task, "could not send a task to its agent now; it stays queued");
                break;
            }
            running += 1;
            // Its first events are checked against the record as dispatched, without reading it back.
            self.remember_written(agent, &rec);
            tracing::info!(task = %rec.spec.task, "task dispatched");
        }
        Ok(())
    }

    fn retry_dispatch(&mut self, agent: &Fingerprint) {
        if !self
            .live
            .get(agent)
            .is_some_and(|l| l.retry.load(Ordering::Acquire))
        {
            return;
        }
        if let Err(e) = self.dispatch_queued(agent) {
            tracing::error!(error = %e, "could not dispatch queued tasks");
        }
    }

    /// The requester's current role on the task's agent, or (as the message for them) why they no longer
    /// may run it: shares can be revoked, narrowed or downgraded (below the task's permission mode) after a
    /// task was submitted.
    pub(crate) fn standing(&self, rec: &TaskRecord) -> Result<Role, String> {
        let role = self.share_standing(rec)?;
        check_options(role, &rec.spec.options).map_err(|e| format!("cancelled: {e}"))?;
        Ok(role)
    }

    fn share_standing(&self, rec: &TaskRecord) -> Result<Role, String> {
        let held = self.live.get(&rec.agent).map(|l| l.owner.clone());
        let read = match held {
            Some(owner) => Ok(Some(owner)),
            None => self.store().agent(&rec.agent).map(|a| a.map(|a| a.owner)),
        };
        let owner = match read {
            Ok(Some(owner)) => owner,
            Ok(None) => return Err("cancelled: its agent no longer exists".into()),
            Err(e) => {
                // Refusing is the safe side when the store cannot say.
                tracing::error!(error = %e, "could not read an agent while checking a share");
                return Err(
                    "cancelled: the relay could not check the share; start it again".into(),
                );
            }
        };
        let user = &rec.spec.requester.user;
        if *user == owner {
            return Ok(Role::Owner);
        }
        if let Some(pool) = crate::store::pool_of_owner(&owner) {
            return self
                .pool_standing(pool, user)
                .map_err(|e| format!("cancelled: {e}"));
        }
        match self.store().share(&owner, user) {
            Ok(Some(share)) if share.allows(&rec.spec.project) => {
                Ok(super::shares::role_of(share.level))
            }
            Ok(Some(_)) => Err(format!(
                "cancelled: user {owner} no longer shares project {:?} with you",
                rec.spec.project
            )),
            Ok(None) => Err(format!(
                "cancelled: user {owner} stopped sharing their agents with you"
            )),
            Err(e) => {
                tracing::error!(error = %e, "could not read a share");
                Err("cancelled: the relay could not check the share; start it again".into())
            }
        }
    }

    fn agent_running(&mut self, agent: &Fingerprint, running: &[String]) -> Result<(), TaskError> {
        let sent_here = match self.live.get_mut(agent) {
            Some(live) if live.reconciled => {
                // The report comes once per session; a second one was written after tasks we sent since, and
                // could wrongly make them lost.
                tracing::debug!("repeated Running report ignored");
                return Ok(());
            }
            Some(live) => {
                live.reconciled = true;
                std::mem::take(&mut live.dispatched_here)
            }
            None => Default::default(),
        };
        // What is still open after this reconciliation: read here, not ahead (a task it ends as lost is written
        // from this record), and handed to the dispatch that follows rather than read again.
        let mut still_open = Vec::new();
        for mut rec in self.store().open_tasks(agent)? {
            if !rec.is_dispatched() || sent_here.contains(&rec.spec.task) {
                still_open.push(rec);
                continue;
            }
            if running.contains(&rec.spec.task) {
                if self.standing(&rec).is_err() {
                    let cancel = RelayMessage::CancelTask {
                        task: rec.spec.task.clone(),
                    };
                    self.to_agent(agent, cancel);
                }
                still_open.push(rec);
                continue;
            }
            // A task sent while the agent was going away never reached it; one it ran is gone with its process.
            self.finish_here(
                &mut rec,
                TaskState::Lost,
                "the agent stopped running this task (it restarted or lost it): start it again"
                    .into(),
            )?;
            tracing::warn!(task = %rec.spec.task, "task lost: its agent no longer runs it");
        }
        self.dispatch_queued_from(agent, Some(still_open))?;
        Ok(())
    }

    fn agent_connected(&mut self, agent: &Fingerprint, open: Option<Vec<TaskRecord>>) {
        if let Err(e) = self.dispatch_queued_from(agent, open) {
            tracing::error!(error = %e, "could not dispatch queued tasks");
        }
    }

    /// Ends a revoked agent's unfinished tasks: it will never connect again to report on them.
    pub(crate) fn end_tasks_of_revoked(&mut self, agent: &AgentRecord) {
        let result = self
            .store()
            .open_tasks(&agent.fingerprint)
            .and_then(|open| {
                for mut rec in open {
                    let message = format!(
                        "agent {} was revoked, so this task can no longer run or report",
                        agent.name
                    );
                    if let Err(TaskError::Store(e)) =
                        self.finish_here(&mut rec, TaskState::Lost, message)
                    {
                        return Err(e);
                    }
                }
                Ok(())
            });
        if let Err(e) = result {
            tracing::error!(error = %e, "could not end a revoked agent's tasks");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::CoreConfig;

    fn queued(id: &str, agent: Fingerprint, order: u64) -> TaskRecord {
        serde_json::from_value(serde_json::json!({
            "spec": {"task": id, "project": "p", "prompt": "go",
                     "requester": {"user": "1", "role": "owner"}},
            "agent": agent,
            "state": "queued", "created_at": 0, "updated_at": 0, "last_seq": 0, "order": order,
        }))
        .unwrap()
    }

    /// A dispatch from open tasks read a moment earlier (a cluster reads them off the core's thread) never
    /// runs more of an agent's tasks at once than its limit: a task dispatched since the read is not counted
    /// as running in that list, so the pass reads again when it finds one taken.
    #[tokio::test]
    async fn a_dispatch_from_a_stale_list_keeps_the_agents_limit() {
        let dir = tempfile::tempdir().unwrap();
        let config = CoreConfig {
            max_running_per_agent: 1,
            ..CoreConfig::default()
        };
        let core = crate::core::tests::core_with(dir.path(), config);
        let fp = Fingerprint([5; 32]);
        for (i, id) in ["t_a", "t_b"].iter().enumerate() {
            core.store()
                .put_task(&queued(id, fp, i as u64 + 1))
                .unwrap();
        }
        let stale = core.store().open_tasks(&fp).unwrap();
        let (live, _closed, mut outbound) = crate::core::agents::tests::live("1");
        core.run(move |state| state.register_session(fp, live, None))
            .await
            .unwrap();
        core.run(move |state| state.dispatch_queued(&fp))
            .await
            .unwrap();
        core.run(move |state| state.dispatch_queued_from(&fp, Some(stale)))
            .await
            .unwrap();
        let mut started = Vec::new();
        while let Ok(out) = outbound.try_recv() {
            if let RelayMessage::StartTask(spec) = out.msg {
                started.push(spec.task);
            }
        }
        assert_eq!(started, ["t_a"]);
        let open = core.store().open_tasks(&fp).unwrap();
        let dispatched: Vec<_> = open.iter().filter(|t| t.is_dispatched()).collect();
        assert_eq!(dispatched.len(), 1, "{open:?}");
    }
}
