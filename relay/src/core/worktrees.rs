//! A finished task's git worktree: its requester or the agent's owner merges, keeps or discards its branch.
//! The relay checks who asks and that the agent reported a worktree for the task (so only agents that
//! understand the request get it); the agent checks the requester again and does the git work.

use ct_protocol::task::{Requester, Role, WorktreeAction, WorktreeOutcome};
use ct_protocol::RelayMessage;

use super::audit::{Caller, OwnedCaller};
use super::projects::Answer;
use super::tasks::TaskError;
use super::Core;
use crate::store::{AuditEntry, AuditKind};

/// Longest outcome message kept from an agent, and most conflicting files listed.
const MAX_MESSAGE: usize = 2000;
const MAX_CONFLICTS: usize = 50;

impl Core {
    /// Asks the agent of task `id` to merge, keep or discard its worktree branch, and waits (bounded) for
    /// the outcome. Only the task's requester or the agent's owner may ask.
    pub async fn worktree<'a>(
        &self,
        who: impl Into<Caller<'a>>,
        id: &str,
        action: WorktreeAction,
    ) -> Result<WorktreeOutcome, TaskError> {
        let owned = OwnedCaller::from(who.into());
        let caller = owned.as_caller();
        let user = caller.user;
        let (rec, agent) = {
            let (user, id) = (user.to_string(), id.to_string());
            self.run(move |state| {
                let rec = state.task(&id)?;
                state.may_act(&user, &rec)?;
                let agent = state.store().agent(&rec.agent)?;
                Ok::<_, TaskError>((rec, agent))
            })
            .await?
        };
        let refused = |message: String| WorktreeOutcome {
            ok: false,
            message,
            conflicts: Vec::new(),
        };
        let Some(branch) = rec.worktree.clone() else {
            return Ok(refused(format!(
                "task {id} did not run in a worktree of its own, so it has no branch to merge, keep or discard"
            )));
        };
        if !rec.state.is_final() {
            return Ok(refused(format!(
                "task {id} is still running: {branch} can be merged, kept or discarded once it ends"
            )));
        }
        let agent = agent.ok_or_else(|| TaskError::NoSuchTask(id.to_string()))?;
        // The agent judges the role by the id it was paired with; the relay's word can only lower it.
        let role = if agent.owner == user {
            Role::Owner
        } else {
            rec.spec.requester.role
        };
        let requester = Requester {
            user: user.to_string(),
            name: None,
            role,
        };
        let answer = self
            .ask_agent(&agent, {
                let task = id.to_string();
                move |request| RelayMessage::Worktree {
                    id: request,
                    task,
                    action,
                    requester,
                }
            })
            .await;
        tracing::info!(task = id, %user, ?action, "worktree request answered");
        match answer? {
            Answer::Worktree(mut outcome) => {
                outcome.message = outcome.message.chars().take(MAX_MESSAGE).collect();
                outcome.conflicts.truncate(MAX_CONFLICTS);
                for file in &mut outcome.conflicts {
                    *file = file.chars().take(512).collect();
                }
                // What changed the owner's repository (or tried to) is on the record, with who asked.
                let verb = match action {
                    WorktreeAction::Merge => "merge",
                    WorktreeAction::Keep => "keep",
                    WorktreeAction::Discard => "discard",
                };
                let requester = rec.spec.requester.user.clone();
                let entry = AuditEntry::new(
                    AuditKind::WorktreeDecided {
                        action: verb.into(),
                        branch: branch.clone(),
                        requester,
                        ok: outcome.ok,
                    },
                    caller.actor(),
                    &agent.owner,
                    format!(
                        "{verb} {branch} of task {id} on {}: {}",
                        agent.name, outcome.message
                    ),
                )
                .by(caller)
                .on(&agent)
                .task(id);
                self.run(move |state| {
                    state.audit_or_log(entry);
                    Ok::<_, TaskError>(())
                })
                .await?;
                Ok(outcome)
            }
            Answer::Project(_) => Err(TaskError::AgentGone(agent.name)),
        }
    }
}
