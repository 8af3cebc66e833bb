//! Tasks in the relay core: submission and routing to an agent, the per-task event log with its sequence
//! numbers and acknowledgements, following a task live, cancelling, deciding approvals, and reconciling an
//! agent's running tasks after it reconnects.
//!
//! Front ends (the admin socket now, the Discord bot later) call the `pub` functions; the agent endpoint
//! calls [`Core::record_event`] and [`Core::agent_running`].

use std::collections::HashMap;
use std::sync::Mutex;

use ct_protocol::task::{
    Decision, FinalState, Requester, Role, TaskEvent, TaskOptions, TaskSpec, MAX_PROMPT_LEN,
};
use ct_protocol::{Fingerprint, RelayMessage};
use rand::Rng;
use tokio::sync::broadcast;

use crate::core::{human_duration, Core};
use crate::store::{now, StoreError, TaskRecord, TaskState};

/// Events buffered per follower before it is considered too slow and skips ahead (it can re-read the log).
const FOLLOW_BUFFER: usize = 1024;

/// What [`Core::follow`] returns: the task, its stored events, and a receiver for the ones that follow.
pub type Following = (
    TaskRecord,
    Vec<(u64, TaskEvent)>,
    broadcast::Receiver<(u64, TaskEvent)>,
);

/// Live followers per task.
pub(crate) type Followers = Mutex<HashMap<String, broadcast::Sender<(u64, TaskEvent)>>>;

/// A request to run a task.
#[derive(Debug, Clone)]
pub struct Submit {
    /// Discord user id of the person asking.
    pub user: String,
    /// Which of the user's agents (name or fingerprint); needed only when they have several.
    pub agent: Option<String>,
    pub project: String,
    pub prompt: String,
    pub options: TaskOptions,
}

/// Why a task request was refused; each message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error(
        "you have no agent paired yet: pair one with /register (or `ct-relay admin pair-code`)"
    )]
    NoAgent,
    #[error("you have several agents ({0}): say which one to use")]
    WhichAgent(String),
    #[error("you have no agent called {wanted:?}; yours are: {names}")]
    UnknownAgent { wanted: String, names: String },
    #[error("agent {name} is offline ({seen}): start it on that machine with `ct-agent run`, or install it as a service")]
    Offline { name: String, seen: String },
    #[error("the prompt is {len} bytes, over the {max}-byte limit: shorten it or attach a file")]
    PromptTooLong { len: usize, max: usize },
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("there is no task {0:?}")]
    NoSuchTask(String),
    #[error("task {0} is not yours to act on")]
    NotYours(String),
    #[error("task {task} has already ended ({state:?})")]
    Ended { task: String, state: TaskState },
    #[error("agent {0} is not keeping up; try again in a moment")]
    AgentBusy(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn task_id() -> String {
    const ALPHABET: &[u8] = b"abcdefghjkmnpqrstuvwxyz23456789";
    let mut rng = rand::rngs::OsRng;
    let body: String = (0..8)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect();
    format!("t_{body}")
}

impl Core {
    /// Starts a task on one of the user's agents. The agent must be online: a task for an offline machine
    /// would otherwise wait unseen for hours.
    pub fn submit_task(&self, req: Submit) -> Result<TaskRecord, TaskError> {
        if req.prompt.trim().is_empty() {
            return Err(TaskError::EmptyPrompt);
        }
        if req.prompt.len() > MAX_PROMPT_LEN {
            return Err(TaskError::PromptTooLong {
                len: req.prompt.len(),
                max: MAX_PROMPT_LEN,
            });
        }
        let mine: Vec<_> = self
            .store()
            .agents()?
            .into_iter()
            .filter(|a| a.owner == req.user && a.revoked_at.is_none())
            .collect();
        let names = || {
            mine.iter()
                .map(|a| a.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let agent = match (&req.agent, mine.as_slice()) {
            (_, []) => return Err(TaskError::NoAgent),
            (None, [one]) => one.clone(),
            (None, _) => return Err(TaskError::WhichAgent(names())),
            (Some(wanted), _) => mine
                .iter()
                .find(|a| &a.name == wanted || a.fingerprint.to_string() == *wanted)
                .cloned()
                .ok_or_else(|| TaskError::UnknownAgent {
                    wanted: wanted.clone(),
                    names: names(),
                })?,
        };
        let outbound = self
            .live()
            .get(&agent.fingerprint)
            .map(|l| l.outbound.clone());
        let Some(outbound) = outbound else {
            let seen = agent.last_seen.map_or("never connected".into(), |t| {
                format!("last seen {} ago", human_duration(now().saturating_sub(t)))
            });
            return Err(TaskError::Offline {
                name: agent.name,
                seen,
            });
        };
        let t = now();
        // About 40 bits per id: collisions are rare, but a reused id would merge two tasks' logs.
        let mut id = task_id();
        while self.store().task(&id)?.is_some() {
            id = task_id();
        }
        let spec = TaskSpec {
            task: id,
            project: req.project,
            prompt: req.prompt,
            requester: Requester {
                user: req.user,
                name: None,
                role: Role::Owner,
            },
            options: req.options,
            resume: None,
        };
        let rec = TaskRecord {
            spec: spec.clone(),
            agent: agent.fingerprint,
            state: TaskState::Queued,
            created_at: t,
            updated_at: t,
            last_seq: 0,
            session_id: None,
            message: None,
        };
        self.store().put_task(&rec)?;
        self.store().flush()?;
        outbound
            .try_send(RelayMessage::StartTask(spec))
            .map_err(|_| TaskError::AgentBusy(agent.name.clone()))?;
        tracing::info!(task = %rec.spec.task, agent = %agent.name, user = %rec.spec.requester.user, "task submitted");
        Ok(rec)
    }

    pub fn task(&self, id: &str) -> Result<TaskRecord, TaskError> {
        self.store()
            .task(id)?
            .ok_or_else(|| TaskError::NoSuchTask(id.to_string()))
    }

    /// The task's stored events, and a receiver for those that follow. Subscribing happens before reading the
    /// log, so nothing falls between the two; a follower skips live events whose `seq` it already has.
    pub fn follow(&self, id: &str) -> Result<Following, TaskError> {
        let rx = self.followers_of(id).subscribe();
        let rec = self.task(id)?;
        let events = self.store().events(id, 0)?;
        Ok((rec, events, rx))
    }

    fn followers_of(&self, id: &str) -> broadcast::Sender<(u64, TaskEvent)> {
        let mut map = self.followers.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, tx| tx.receiver_count() > 0);
        map.entry(id.to_string())
            .or_insert_with(|| broadcast::channel(FOLLOW_BUFFER).0)
            .clone()
    }

    fn publish(&self, id: &str, seq: u64, event: &TaskEvent) {
        let tx = self
            .followers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned();
        if let Some(tx) = tx {
            let _ = tx.send((seq, event.clone()));
        }
    }

    /// Sends a message to an agent, if it is online and keeping up.
    fn to_agent(&self, agent: &Fingerprint, msg: RelayMessage) -> bool {
        let outbound = self.live().get(agent).map(|l| l.outbound.clone());
        outbound.is_some_and(|o| o.try_send(msg).is_ok())
    }

    /// Asks the agent to interrupt and end a task. Only the requester or the agent's owner may.
    pub fn cancel_task(&self, user: &str, id: &str) -> Result<TaskRecord, TaskError> {
        let rec = self.task(id)?;
        self.may_act(user, &rec)?;
        if rec.state.is_final() {
            return Err(TaskError::Ended {
                task: id.to_string(),
                state: rec.state,
            });
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
        Ok(rec)
    }

    /// Passes a decision on an approval request to the agent. Approvals belong to the agent's owner unless the
    /// requester was trusted by the owner.
    pub fn decide(
        &self,
        user: &str,
        id: &str,
        approval: &str,
        decision: Decision,
    ) -> Result<(), TaskError> {
        let rec = self.task(id)?;
        let owner = self
            .store()
            .agent(&rec.agent)?
            .map(|a| a.owner)
            .unwrap_or_default();
        let decider = match rec.spec.requester.role {
            Role::TrustedGrantee => rec.spec.requester.user.as_str(),
            Role::Owner | Role::Grantee => owner.as_str(),
        };
        if user != decider {
            return Err(TaskError::NotYours(id.to_string()));
        }
        let msg = RelayMessage::Decide {
            task: id.to_string(),
            approval: approval.to_string(),
            decision,
        };
        if !self.to_agent(&rec.agent, msg) {
            return Err(TaskError::Offline {
                name: self.agent_name(&rec.agent),
                seen: "not connected now".into(),
            });
        }
        Ok(())
    }

    fn may_act(&self, user: &str, rec: &TaskRecord) -> Result<(), TaskError> {
        let owner = self.store().agent(&rec.agent)?.map(|a| a.owner);
        if rec.spec.requester.user == user || owner.as_deref() == Some(user) {
            Ok(())
        } else {
            Err(TaskError::NotYours(rec.spec.task.clone()))
        }
    }

    fn agent_name(&self, fp: &Fingerprint) -> String {
        self.store()
            .agent(fp)
            .ok()
            .flatten()
            .map_or_else(|| fp.short(), |a| a.name)
    }

    /// Stores event `seq` of a task from `agent`, exactly once. Returns the sequence number to acknowledge
    /// (everything up to it is stored), or `None` when nothing can be acknowledged (a gap, or a task that is
    /// not this agent's).
    pub fn record_event(
        &self,
        agent: &Fingerprint,
        id: &str,
        seq: u64,
        event: TaskEvent,
    ) -> Result<Option<u64>, TaskError> {
        let Some(mut rec) = self.store().task(id)? else {
            tracing::warn!(task = id, "event for an unknown task; ignored");
            return Ok(None);
        };
        if rec.agent != *agent {
            tracing::warn!(task = id, "event for a task on another agent; ignored");
            return Ok(None);
        }
        if seq <= rec.last_seq {
            // Re-sent after a reconnect: already stored. Acknowledge again so the agent can let it go.
            return Ok(Some(rec.last_seq));
        }
        if seq != rec.last_seq + 1 {
            tracing::warn!(
                task = id,
                seq,
                stored = rec.last_seq,
                "event out of order; waiting for the gap to be re-sent"
            );
            return Ok(None);
        }
        apply(&mut rec, &event);
        rec.last_seq = seq;
        rec.updated_at = now();
        self.store().append_event(&rec, seq, &event)?;
        self.publish(id, seq, &event);
        Ok(Some(seq))
    }

    /// Reconciles after a (re)connect: the agent reports what it still runs; any other open task on it is lost.
    pub fn agent_running(&self, agent: &Fingerprint, running: &[String]) -> Result<(), TaskError> {
        for mut rec in self.store().open_tasks(agent)? {
            if running.contains(&rec.spec.task) {
                continue;
            }
            // A task sent while the agent was going away never reached it; one it ran is gone with its process.
            let event = TaskEvent::Finished {
                state: FinalState::Failed,
                message: Some(
                    "the agent stopped running this task (it restarted or lost it): start it again"
                        .into(),
                ),
            };
            let seq = rec.last_seq + 1;
            apply(&mut rec, &event);
            rec.state = TaskState::Lost;
            rec.last_seq = seq;
            rec.updated_at = now();
            self.store().append_event(&rec, seq, &event)?;
            self.publish(&rec.spec.task, seq, &event);
            tracing::warn!(task = %rec.spec.task, "task lost: its agent no longer runs it");
        }
        Ok(())
    }
}

/// The state change an event implies.
fn apply(rec: &mut TaskRecord, event: &TaskEvent) {
    match event {
        TaskEvent::Started { .. } => rec.state = TaskState::Running,
        TaskEvent::Session { session_id, .. } => rec.session_id = Some(session_id.clone()),
        TaskEvent::ApprovalRequested { .. } => rec.state = TaskState::WaitingApproval,
        TaskEvent::ApprovalClosed { .. } if rec.state == TaskState::WaitingApproval => {
            rec.state = TaskState::Running
        }
        TaskEvent::Finished { state, message } => {
            rec.state = match state {
                FinalState::Done => TaskState::Done,
                FinalState::Failed => TaskState::Failed,
                FinalState::Cancelled => TaskState::Cancelled,
            };
            rec.message = message.clone();
        }
        _ => {}
    }
}
