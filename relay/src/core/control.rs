//! Acting on a task that exists: cancelling it, deciding its approvals (and who may), and sending messages to
//! its agent that must be audited first.

use ct_protocol::task::{Decision, Role};
use ct_protocol::{Fingerprint, RelayMessage};

use super::audit::{describe_decision, Caller, OwnedCaller};
use super::state::{Outbound, State};
use super::tasks::TaskError;
use super::Core;
use crate::store::{AuditEntry, AuditKind, StoreError, TaskRecord, TaskState};

impl Core {
    /// Cancels a task. Only the requester or the agent's owner may. A queued task just ends (the agent never
    /// had it); a dispatched one is interrupted by the agent, whose `Finished` event ends it.
    ///
    /// Audited: if the entry cannot be written the cancel still happens (stopping work is the safe side), and
    /// the failure is logged as an error.
    pub async fn cancel_task<'a>(
        &self,
        who: impl Into<Caller<'a>>,
        id: &str,
    ) -> Result<TaskRecord, TaskError> {
        let (caller, id) = (OwnedCaller::from(who.into()), id.to_string());
        self.run(move |state| state.cancel_task(caller.as_caller(), &id))
            .await
    }

    /// Who decides the approvals of a task: the agent's owner, or the requester when the owner trusts them
    /// (checked now, so downgrading or revoking a share takes effect at once). Front ends use it to say whom
    /// an approval is waiting for.
    pub async fn approver(&self, id: &str) -> Result<String, TaskError> {
        let id = id.to_string();
        self.run(move |state| state.approver(&id)).await
    }

    /// Passes a decision on an approval request to the agent; only the task's [`approver`](Core::approver)
    /// may decide. The decision is audited before it is sent, and not sent if the entry cannot be written: a
    /// decision lets something run on the owner's machine.
    pub async fn decide<'a>(
        &self,
        who: impl Into<Caller<'a>>,
        id: &str,
        approval: &str,
        decision: Decision,
    ) -> Result<(), TaskError> {
        let (caller, id, approval) = (
            OwnedCaller::from(who.into()),
            id.to_string(),
            approval.to_string(),
        );
        self.run(move |state| state.decide(caller.as_caller(), &id, &approval, decision))
            .await
    }
}

impl State {
    fn cancel_task(&mut self, caller: Caller<'_>, id: &str) -> Result<TaskRecord, TaskError> {
        let user = caller.user;
        let rec = self.task(id)?;
        self.may_act(user, &rec)?;
        if rec.state.is_final() {
            return Err(TaskError::Ended {
                task: id.to_string(),
                state: rec.state,
            });
        }
        if !rec.is_dispatched() {
            // Read again under the lock: it may have been dispatched or ended meanwhile.
            let mut rec = self.task(id)?;
            if rec.state.is_final() {
                return Err(TaskError::Ended {
                    task: id.to_string(),
                    state: rec.state,
                });
            }
            if !rec.is_dispatched() {
                let by = if user == rec.spec.requester.user {
                    String::new()
                } else {
                    format!(" by user {user}")
                };
                self.finish_here(
                    &mut rec,
                    TaskState::Cancelled,
                    format!("cancelled{by} before it started"),
                )?;
                self.dispatch_queued(&rec.agent)?;
                self.audit_cancel(caller, &rec, "before it started");
                return Ok(rec);
            }
        }
        if !self.to_agent(
            &rec.agent,
            RelayMessage::CancelTask {
                task: id.to_string(),
            },
        ) {
            return Err(TaskError::Offline {
                name: self.agent_name(&rec.agent),
                seen: "not connected now".into(),
            });
        }
        self.audit_cancel(caller, &rec, "while it ran");
        Ok(rec)
    }

    fn audit_cancel(&self, caller: Caller<'_>, rec: &TaskRecord, when: &str) {
        let agent = match self.store().agent(&rec.agent) {
            Ok(Some(a)) => a,
            Ok(None) => return,
            Err(e) => {
                tracing::error!(error = %e, task = %rec.spec.task, "could not audit a cancel: agent unreadable");
                return;
            }
        };
        let requester = &rec.spec.requester.user;
        let whose = if requester == caller.user {
            "their own task".to_string()
        } else {
            format!("user {requester}'s task")
        };
        let entry = AuditEntry::new(
            AuditKind::TaskCancelled {
                requester: requester.clone(),
            },
            caller.actor(),
            &agent.owner,
            format!("cancelled {whose} on {} {when}", agent.name),
        )
        .by(caller)
        .on(&agent)
        .task(&rec.spec.task);
        self.audit_or_log(entry);
    }

    /// Sends a message to an agent, if it is online and keeping up: through its session here, or through
    /// the node that holds it (which passes it on if the session is still there; see [`super::remote`]).
    pub(crate) fn to_agent(&self, agent: &Fingerprint, msg: RelayMessage) -> bool {
        self.to_agent_with(agent, msg, Vec::new())
    }

    /// [`to_agent`](Self::to_agent) with files written just before `msg`. Files go only through a session
    /// here (the caller checks: see [`super::files`]).
    pub(crate) fn to_agent_with(
        &self,
        agent: &Fingerprint,
        msg: RelayMessage,
        parts: Vec<ct_protocol::files::FilePart>,
    ) -> bool {
        if let Some(live) = self.live.get(agent) {
            return live
                .outbound
                .try_send(Outbound {
                    after: None,
                    msg,
                    parts,
                })
                .is_ok();
        }
        if !parts.is_empty() {
            return false;
        }
        self.held_elsewhere(agent).is_some()
            && self.tell_holder(agent, &super::remote::NodeMsg::Deliver { msg })
    }

    /// Sends `msg` to an agent only with `entry` in the audit log: a place in the agent's queue is reserved
    /// first, so no entry is written for a message that then cannot go, and no message goes without its
    /// entry. `Ok(false)` when the agent is offline or not keeping up.
    pub(crate) fn to_agent_audited(
        &self,
        agent: &Fingerprint,
        msg: RelayMessage,
        parts: Vec<ct_protocol::files::FilePart>,
        entry: &AuditEntry,
    ) -> Result<bool, StoreError> {
        let Some(live) = self.live.get(agent) else {
            if !parts.is_empty() {
                return Ok(false);
            }
            // On another node: the entry is written here, where the decision was made, and the message goes
            // to that node. (Its session may end before it arrives; so may a session here.)
            if self.held_elsewhere(agent).is_none() {
                return Ok(false);
            }
            self.store().append_audit(entry)?;
            return Ok(self.tell_holder(agent, &super::remote::NodeMsg::Deliver { msg }));
        };
        let Ok(permit) = live.outbound.try_reserve() else {
            return Ok(false);
        };
        self.store().append_audit(entry)?;
        permit.send(Outbound {
            after: None,
            msg,
            parts,
        });
        Ok(true)
    }

    fn approver(&self, id: &str) -> Result<String, TaskError> {
        let rec = self.task(id)?;
        self.approver_of(&rec)
    }

    fn approver_of(&self, rec: &TaskRecord) -> Result<String, TaskError> {
        let owner = self
            .store()
            .agent(&rec.agent)?
            .map(|a| a.owner)
            .unwrap_or_default();
        let trusted = rec.spec.requester.role == Role::TrustedGrantee
            && self.standing(rec) == Ok(Role::TrustedGrantee);
        Ok(if trusted {
            rec.spec.requester.user.clone()
        } else {
            owner
        })
    }

    fn decide(
        &self,
        caller: Caller<'_>,
        id: &str,
        approval: &str,
        decision: Decision,
    ) -> Result<(), TaskError> {
        let user = caller.user;
        let rec = self.task(id)?;
        if user != self.approver_of(&rec)? {
            return Err(TaskError::NotYours(id.to_string()));
        }
        let agent = self
            .store()
            .agent(&rec.agent)?
            .ok_or_else(|| TaskError::NoSuchTask(id.to_string()))?;
        let requester = &rec.spec.requester.user;
        let described = describe_decision(&decision);
        let approval: String = approval.chars().take(128).collect();
        let whose = if requester == user {
            "their own task".to_string()
        } else {
            format!("user {requester}'s task")
        };
        let entry = AuditEntry::new(
            AuditKind::ApprovalDecided {
                approval: approval.clone(),
                decision: described.clone(),
                requester: requester.clone(),
            },
            caller.actor(),
            &agent.owner,
            format!(
                "decided approval {approval} in {whose} on {}: {described}",
                agent.name
            ),
        )
        .by(caller)
        .on(&agent)
        .task(id);
        let msg = RelayMessage::Decide {
            task: id.to_string(),
            approval,
            decision,
        };
        if !self.to_agent_audited(&rec.agent, msg, Vec::new(), &entry)? {
            return Err(TaskError::Offline {
                name: self.agent_name(&rec.agent),
                seen: "not connected now".into(),
            });
        }
        Ok(())
    }

    pub(crate) fn may_act(&self, user: &str, rec: &TaskRecord) -> Result<(), TaskError> {
        let owner = self.store().agent(&rec.agent)?.map(|a| a.owner);
        if rec.spec.requester.user == user || owner.as_deref() == Some(user) {
            Ok(())
        } else {
            Err(TaskError::NotYours(rec.spec.task.clone()))
        }
    }

    pub(crate) fn agent_name(&self, fp: &Fingerprint) -> String {
        self.store()
            .agent(fp)
            .ok()
            .flatten()
            .map_or_else(|| fp.short(), |a| a.name)
    }
}
