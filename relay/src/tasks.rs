//! Tasks in the relay core: submission (on the user's own agents or on agents shared with them), each agent's
//! queue and its concurrency limit, the per-task event log with its sequence numbers and acknowledgements,
//! following a task live, follow-ups, cancelling, deciding approvals, and reconciling an agent's running tasks
//! after it reconnects.
//!
//! Front ends (the admin socket now, the Discord bot later) call the `pub` functions; the agent endpoint
//! calls [`Core::record_events`] and [`Core::agent_running`].
//!
//! A task is stored as queued first. It is dispatched (sent to the agent as `StartTask`) while fewer than
//! [`CoreConfig::max_running_per_agent`](crate::core::CoreConfig) of that agent's tasks are dispatched and
//! unfinished; otherwise it waits, first in first out, and the queue moves whenever a task ends or the agent
//! reconnects. Until it is dispatched a task belongs to the relay alone: it cannot be lost by the agent, the
//! agent cannot write events into it, and cancelling it needs no agent.

use std::collections::HashMap;
use std::sync::Mutex;

use ct_protocol::task::{
    Decision, FinalState, Requester, Role, TaskEvent, TaskOptions, TaskSpec, MAX_PROMPT_LEN,
};
use ct_protocol::{Fingerprint, RelayMessage};
use rand::Rng;
use tokio::sync::broadcast;

use crate::audit::{describe_decision, preview, AuditEntry, AuditKind, Caller};
use crate::core::{human_duration, Core, RoutingGuard};
use crate::output::{self, Keep};
use crate::store::{now, AgentRecord, EventRun, StoreError, TaskRecord, TaskState};

/// Events buffered per follower before it is considered too slow and skips ahead (it can re-read the log).
const FOLLOW_BUFFER: usize = 1024;
/// Longest project (a name or a path) a task may name, in bytes.
pub const MAX_PROJECT_LEN: usize = 1024;
/// Longest display name kept for a requester, in characters (Discord's own limit is 32).
const MAX_DISPLAY_NAME: usize = 64;
/// Longest Claude Code session id accepted for `resume` (they are UUIDs).
const MAX_SESSION_ID: usize = 128;
/// Tasks remembered as sent during a session whose `Running` report has not arrived yet.
const MAX_UNRECONCILED: usize = 1024;

/// What [`Core::follow`] returns: the task, its stored events, and a receiver for the ones that follow.
pub type Following = (
    TaskRecord,
    Vec<(u64, TaskEvent)>,
    broadcast::Receiver<(u64, TaskEvent)>,
);

/// Live followers per task.
pub(crate) type Followers = Mutex<HashMap<String, broadcast::Sender<(u64, TaskEvent)>>>;

/// A request to run a task.
#[derive(Debug, Clone, Default)]
pub struct Submit {
    /// Discord user id of the person asking.
    pub user: String,
    /// The Discord user id of the agents' owner when running on someone else's agents (they must have
    /// shared with `user`); `None` for the user's own agents.
    pub target: Option<String>,
    /// Which of the owner's agents (name or fingerprint); needed only when there are several and no default.
    pub agent: Option<String>,
    /// The requester's display name, shown to the agent's owner.
    pub name: Option<String>,
    pub project: String,
    pub prompt: String,
    pub options: TaskOptions,
    /// A Claude Code session to continue: it must come from an earlier task on the same agent that this user
    /// may act on (so nobody resumes, and reads, someone else's session).
    pub resume: Option<String>,
    /// Whether the relay operator submits this as `user` through the admin socket (recorded in the audit log).
    pub operator: bool,
}

/// What [`Core::reply`] did with a follow-up.
#[derive(Debug, Clone, PartialEq)]
pub enum ReplyOutcome {
    /// The task was still running: the prompt went to its live session.
    Sent(TaskRecord),
    /// The task had ended: a new task (this record) resumes its Claude Code session.
    Resumed(TaskRecord),
}

/// Why a request was refused; each message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error(
        "you have no agent paired yet: pair one with /register (or `ct-relay admin pair-code`)"
    )]
    NoAgent,
    #[error("user {0} has no agent paired yet: ask them to pair one with /register")]
    OwnerHasNoAgent(String),
    #[error(
        "you have several agents ({0}): say which one to use, or set a default with /agents default \
         (`ct-relay admin default-agent AGENT --as YOU`)"
    )]
    WhichAgent(String),
    #[error(
        "user {owner} has several agents ({names}): say which one to use (or ask them to set a default)"
    )]
    WhichSharedAgent { owner: String, names: String },
    #[error("{whose} no agent called {wanted:?}; the agents are: {names}")]
    UnknownAgent {
        wanted: String,
        /// "you have" or "user 123 has".
        whose: String,
        names: String,
    },
    #[error("agent {name} is offline ({seen}): start it on that machine with `ct-agent run`, or install it as a service")]
    Offline { name: String, seen: String },
    #[error("the prompt is {len} bytes, over the {max}-byte limit: shorten it or attach a file")]
    PromptTooLong { len: usize, max: usize },
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error(
        "name a project: one the agent knows (see /project list), or a folder path on that machine"
    )]
    NoProject,
    #[error(
        "the project is {len} bytes, over the {max}-byte limit: use its name or a shorter path"
    )]
    ProjectTooLong { len: usize, max: usize },
    #[error(
        "there is no task {0:?} that you can see: check the id (yours are offered as you type it)"
    )]
    NoSuchTask(String),
    /// Worded exactly like [`NoSuchTask`](TaskError::NoSuchTask): a stranger who names someone's task id
    /// learns nothing, not even that it exists.
    #[error(
        "there is no task {0:?} that you can see: check the id (yours are offered as you type it)"
    )]
    NotYours(String),
    #[error("task {task} has already ended ({state:?})")]
    Ended { task: String, state: TaskState },
    #[error("agent {0} is not keeping up; try again in a moment")]
    AgentBusy(String),
    #[error("{0:?} is not a Discord user id (a number like 123456789012345678)")]
    BadUser(String),
    #[error(
        "user {owner} has not shared their agents with you: ask them to run /share add with your name \
         (optionally limited to the projects you need)"
    )]
    NotShared { owner: String },
    #[error(
        "user {owner} shares only these projects with you: {allowed}; {project:?} is not one of them: \
         use one of those, or ask them to add it to your share"
    )]
    ProjectNotShared {
        owner: String,
        project: String,
        allowed: String,
    },
    #[error(
        "agent {agent} does not accept tasks from people its owner shares with: ask user {owner} to allow \
         shared tasks in its configuration"
    )]
    SharedNotAccepted { agent: String, owner: String },
    #[error("unknown project {project:?}; agent {agent} has: {names} ({hint})")]
    UnknownProject {
        project: String,
        agent: String,
        names: String,
        /// What the person can do about it (add one, or ask the owner to).
        hint: String,
    },
    #[error(
        "agent {agent} already has {queued} tasks waiting (the most it keeps): wait for some to finish, \
         or cancel one"
    )]
    QueueFull { agent: String, queued: usize },
    #[error("task {0} is still queued: wait until it starts to send more, or cancel it and start a new one")]
    NotStarted(String),
    #[error(
        "task {0} ended before Claude Code started a session, so it cannot be continued: start a new task \
         with /task"
    )]
    NoSession(String),
    #[error(
        "no task of yours on agent {agent} has Claude Code session {session:?}: reply in that task's thread \
         instead"
    )]
    ResumeNotYours { agent: String, session: String },
    #[error("that is not a Claude Code session id: reply in the task's thread to continue it")]
    BadResume,
    #[error("{0}")]
    BadOption(String),
    #[error(
        "permission mode {mode:?} is not available on someone else's agent at your level: use one of {allowed} \
         (the owner decides what runs unasked on their machine)"
    )]
    ModeNotAllowed { mode: String, allowed: String },
    #[error("you cannot share with yourself: your own agents are always yours to use")]
    ShareWithSelf,
    #[error("{0}")]
    BadShare(String),
    #[error("you do not share with user {0}: nothing to remove (see /share list)")]
    NoSuchShare(String),
    #[error("{0}")]
    BadProjectRequest(String),
    #[error(
        "agent {agent} did not answer within {secs} seconds: is it running? (`ct-agent status` on that \
         machine)"
    )]
    NoAnswer { agent: String, secs: u64 },
    #[error("agent {0} disconnected before answering: try again when it is back")]
    AgentGone(String),
    #[error("agent {agent} refused: {message}")]
    ProjectRefused { agent: String, message: String },
    #[error("agent {0} has too many project requests in flight: try again in a moment")]
    TooManyRequests(String),
    #[error(
        "you are starting tasks too quickly (at most {per_minute} a minute, {burst} in a row): try again in \
         {retry}"
    )]
    RateLimited {
        per_minute: u32,
        burst: u32,
        /// How long until the next task would be accepted, in words.
        retry: String,
    },
    #[error(
        "you already have {open} tasks queued or running (at most {max} at once, across all agents): wait \
         for one to finish, or cancel one with /cancel, then try again"
    )]
    TooManyTasks { open: usize, max: usize },
    #[error(
        "your tasks keep {used} of output on this relay, the most one person may ({max}): ended tasks are \
         deleted {days} days after they end, which frees room; ask the relay's operator if you need more sooner"
    )]
    StorageFull {
        used: String,
        max: String,
        days: u64,
    },
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

fn check_prompt(prompt: &str) -> Result<(), TaskError> {
    if prompt.trim().is_empty() {
        return Err(TaskError::EmptyPrompt);
    }
    if prompt.len() > MAX_PROMPT_LEN {
        return Err(TaskError::PromptTooLong {
            len: prompt.len(),
            max: MAX_PROMPT_LEN,
        });
    }
    Ok(())
}

fn check_project_text(project: &str) -> Result<(), TaskError> {
    if project.trim().is_empty() {
        return Err(TaskError::NoProject);
    }
    if project.len() > MAX_PROJECT_LEN {
        return Err(TaskError::ProjectTooLong {
            len: project.len(),
            max: MAX_PROJECT_LEN,
        });
    }
    Ok(())
}

/// Longest model name accepted, in bytes.
const MAX_MODEL_LEN: usize = 100;
/// Claude Code permission modes a grantee may choose. Modes that approve by themselves (`acceptEdits`, `auto`)
/// would take the owner's approvals away, so only a trusted grantee (who decides their own) gets them;
/// `bypassPermissions` stays the owner's alone. An owner's mode is passed on as given.
const GRANTEE_MODES: &[&str] = &["default", "plan", "dontAsk"];
const TRUSTED_MODES: &[&str] = &["default", "plan", "dontAsk", "acceptEdits", "auto"];

/// Checks per-task options: bounded (they travel in one frame to the agent) and, for people the owner shares
/// with, limited to the permission modes their level allows.
pub(crate) fn check_options(role: Role, options: &TaskOptions) -> Result<(), TaskError> {
    if options.model.as_ref().is_some_and(|m| {
        m.is_empty() || m.len() > MAX_MODEL_LEN || m.chars().any(|c| c.is_control())
    }) {
        return Err(TaskError::BadOption(format!(
            "the model must be a name like `sonnet` or `opus`, at most {MAX_MODEL_LEN} bytes"
        )));
    }
    if options.max_turns == Some(0) {
        return Err(TaskError::BadOption("max turns must be at least 1".into()));
    }
    if options
        .max_budget_usd
        .is_some_and(|b| !b.is_finite() || b <= 0.0)
    {
        return Err(TaskError::BadOption(
            "the budget must be a positive amount of dollars".into(),
        ));
    }
    if let Some(mode) = &options.permission_mode {
        let allowed = match role {
            Role::Owner => None,
            Role::Grantee => Some(GRANTEE_MODES),
            Role::TrustedGrantee => Some(TRUSTED_MODES),
        };
        if mode.len() > 32 {
            return Err(TaskError::BadOption(
                "that is not a permission mode (default, plan, acceptEdits, ...)".into(),
            ));
        }
        if let Some(allowed) = allowed.filter(|a| !a.contains(&mode.as_str())) {
            return Err(TaskError::ModeNotAllowed {
                mode: mode.clone(),
                allowed: allowed.join(", "),
            });
        }
    }
    Ok(())
}

/// A display name, trimmed and shortened; it is only shown, never trusted.
fn display_name(name: Option<String>) -> Option<String> {
    let name: String = name?
        .chars()
        .filter(|c| !c.is_control())
        .take(MAX_DISPLAY_NAME)
        .collect();
    let name = name.trim();
    (!name.is_empty()).then(|| name.to_string())
}

/// Whether a project as typed is a path (which the agent's policy checks) rather than a project name.
pub fn is_path(project: &str) -> bool {
    project.contains('/') || project.contains('\\') || project.starts_with('~')
}

/// A task to put into an agent's queue, once the requester's standing has been established.
struct NewTask {
    agent: AgentRecord,
    user: String,
    name: Option<String>,
    role: Role,
    project: String,
    prompt: String,
    options: TaskOptions,
    resume: Option<String>,
    follows: Option<String>,
    /// Whether the operator acts as `user` (for the audit log).
    operator: bool,
}

impl Core {
    /// Queues a task on one of the user's agents, or on an agent another user shared with them
    /// ([`Submit::target`]), and dispatches it at once if the agent has a free slot. The agent must be
    /// online: a task for an offline machine would otherwise wait unseen for hours.
    pub fn submit_task(&self, req: Submit) -> Result<TaskRecord, TaskError> {
        check_prompt(&req.prompt)?;
        check_project_text(&req.project)?;
        if let Some(resume) = &req.resume {
            if resume.is_empty()
                || resume.len() > MAX_SESSION_ID
                || !resume
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return Err(TaskError::BadResume);
            }
        }
        self.take_task_token(&req.user)?;
        self.check_stored(&req.user)?;
        let routing = self.routing();
        let owner = match req.target {
            Some(t) if t != req.user => t,
            _ => req.user.clone(),
        };
        // The share is checked before anything about the owner's agents is looked at, so someone without a
        // share learns nothing about them (not even their names).
        let role = self.role_for(&req.user, &owner, &req.project)?;
        let agent = self.choose_agent(&owner, req.agent.as_deref(), owner == req.user)?;
        if let Some(session) = &req.resume {
            self.check_resume(&req.user, &agent, session)?;
        }
        self.enqueue(
            &routing,
            NewTask {
                agent,
                user: req.user,
                name: display_name(req.name),
                role,
                project: req.project,
                prompt: req.prompt,
                options: req.options,
                resume: req.resume,
                follows: None,
                operator: req.operator,
            },
        )
    }

    /// Refuses a new task when the output `user`'s tasks keep has reached `CoreConfig::max_stored_per_user`.
    /// Scans the task history like [`Core::tasks_for`]; it runs after the task
    /// rate limit, so one person cannot make it run more often than they may start tasks.
    fn check_stored(&self, user: &str) -> Result<(), TaskError> {
        let max = self.config().max_stored_per_user;
        let used = self.store().stored_bytes_of_user(user)?;
        if used >= max {
            return Err(TaskError::StorageFull {
                used: human_bytes(used),
                max: human_bytes(max),
                days: self.config().task_retention.as_secs().div_ceil(86_400),
            });
        }
        Ok(())
    }

    /// Counts a task started by `user` against [`CoreConfig::tasks_per_minute`](crate::core::CoreConfig).
    /// Taken once the request is well-formed, before the store is consulted: failed attempts count too, so
    /// a flood of them cannot keep the relay busy either.
    fn take_task_token(&self, user: &str) -> Result<(), TaskError> {
        self.task_limit.take(&user.to_string()).map_err(|wait| {
            let config = self.config();
            TaskError::RateLimited {
                per_minute: config.tasks_per_minute,
                burst: config.task_burst,
                retry: human_duration(wait.as_secs_f64().ceil().max(1.0) as u64),
            }
        })
    }

    /// Users the task rate limiter remembers now (bounded by `CoreConfig::rate_limit_keys`).
    pub fn rate_limited_users(&self) -> usize {
        self.task_limit.len()
    }

    /// The requester's role on `owner`'s agents for `project`, or why they may not use them.
    pub(crate) fn role_for(
        &self,
        user: &str,
        owner: &str,
        project: &str,
    ) -> Result<Role, TaskError> {
        if user == owner {
            return Ok(Role::Owner);
        }
        let Some(share) = self.store().share(owner, user)? else {
            return Err(TaskError::NotShared {
                owner: owner.to_string(),
            });
        };
        if !share.allows(project) {
            return Err(TaskError::ProjectNotShared {
                owner: owner.to_string(),
                project: project.to_string(),
                allowed: share.projects.unwrap_or_default().join(", "),
            });
        }
        Ok(crate::shares::role_of(share.level))
    }

    /// Refuses a `resume` of a session that does not come from a task on this agent the user may act on.
    fn check_resume(
        &self,
        user: &str,
        agent: &AgentRecord,
        session: &str,
    ) -> Result<(), TaskError> {
        let mine = self
            .store()
            .tasks_with_session(&agent.fingerprint, session)?
            .into_iter()
            .any(|t| t.spec.requester.user == user || agent.owner == user);
        match mine {
            true => Ok(()),
            false => Err(TaskError::ResumeNotYours {
                agent: agent.name.clone(),
                session: session.to_string(),
            }),
        }
    }

    /// Checks the project against what the agent reported (when it has), and whether it takes shared tasks.
    fn check_agent_project(
        &self,
        agent: &AgentRecord,
        role: Role,
        user: &str,
        project: &str,
    ) -> Result<(), TaskError> {
        let Some(report) = &agent.projects else {
            // An agent that never reported its projects decides for itself.
            return Ok(());
        };
        if role != Role::Owner && !report.accepts_shared {
            return Err(TaskError::SharedNotAccepted {
                agent: agent.name.clone(),
                owner: agent.owner.clone(),
            });
        }
        if is_path(project) || report.projects.iter().any(|p| p.name == project) {
            return Ok(());
        }
        let share = if role == Role::Owner {
            None
        } else {
            self.store().share(&agent.owner, user)?
        };
        let names: Vec<&str> = report
            .projects
            .iter()
            .map(|p| p.name.as_str())
            .filter(|n| share.as_ref().is_none_or(|s| s.allows(n)))
            .collect();
        Err(TaskError::UnknownProject {
            project: project.to_string(),
            agent: agent.name.clone(),
            names: if names.is_empty() {
                "no projects yet".into()
            } else {
                names.join(", ")
            },
            hint: if role == Role::Owner {
                "add one with /project add, or give a folder path".into()
            } else {
                format!("ask user {} to add one", agent.owner)
            },
        })
    }

    /// Stores a new task in its agent's queue and dispatches what the agent has room for.
    fn enqueue(&self, routing: &RoutingGuard<'_>, task: NewTask) -> Result<TaskRecord, TaskError> {
        let agent = task.agent;
        check_options(task.role, &task.options)?;
        self.check_agent_project(&agent, task.role, &task.user, &task.project)?;
        if !self.live().contains_key(&agent.fingerprint) {
            let seen = agent.last_seen.map_or("never connected".into(), |t| {
                format!("last seen {} ago", human_duration(now().saturating_sub(t)))
            });
            return Err(TaskError::Offline {
                name: agent.name,
                seen,
            });
        }
        let max = self.config().max_tasks_per_user;
        let mine = self.store().open_tasks_of_user(&task.user)?;
        if mine >= max {
            return Err(TaskError::TooManyTasks { open: mine, max });
        }
        let open = self.store().open_tasks(&agent.fingerprint)?;
        let running = open.iter().filter(|t| t.is_dispatched()).count();
        let queued = open.len() - running;
        let must_wait = queued > 0 || running >= self.config().max_running_per_agent;
        if must_wait && queued >= self.config().max_queued_per_agent {
            return Err(TaskError::QueueFull {
                agent: agent.name,
                queued,
            });
        }
        let t = now();
        // About 40 bits per id: collisions are rare, but a reused id would merge two tasks' logs.
        let mut id = task_id();
        while self.store().task(&id)?.is_some() {
            id = task_id();
        }
        let rec = TaskRecord {
            spec: TaskSpec {
                task: id.clone(),
                project: task.project,
                prompt: task.prompt,
                requester: Requester {
                    user: task.user,
                    name: task.name,
                    role: task.role,
                },
                options: task.options,
                resume: task.resume,
            },
            agent: agent.fingerprint,
            state: TaskState::Queued,
            created_at: t,
            updated_at: t,
            last_seq: 0,
            session_id: None,
            message: None,
            dispatched_at: None,
            follows: task.follows,
            order: self.store().next_order()?,
            output_bytes: 0,
            output_truncated: false,
            worktree: None,
        };
        if rec.spec.requester.role == Role::Owner {
            self.store().put_task(&rec)?;
        } else {
            // A grantee's task and its audit entry are written together: the owner must be able to see every
            // task someone else ran on their machine, so without the entry there is no task.
            let user = &rec.spec.requester.user;
            let caller = Caller {
                user,
                operator: task.operator,
            };
            let who = match &rec.spec.requester.name {
                Some(name) => format!("user {user} ({name})"),
                None => format!("user {user}"),
            };
            let what = if rec.follows.is_some() {
                "continued a task"
            } else {
                "started a task"
            };
            let prompt = preview(&rec.spec.prompt);
            let entry = AuditEntry::new(
                AuditKind::GranteeTask {
                    requester: user.clone(),
                    project: rec.spec.project.clone(),
                    prompt: prompt.clone(),
                    follow_up: false,
                },
                caller.actor(),
                &agent.owner,
                format!(
                    "{who} {what} in {} on {}: \"{prompt}\"",
                    rec.spec.project, agent.name
                ),
            )
            .by(caller)
            .on(&agent)
            .task(&id);
            self.store().put_task_audited(&rec, &entry)?;
        }
        tracing::info!(task = %id, agent = %agent.name, user = %rec.spec.requester.user, role = ?rec.spec.requester.role, "task queued");
        // The task is durable before the caller hears of it. Dispatching flushes before it sends, which covers
        // the write above; only when it did not (the task stays queued) is a flush of its own needed. One
        // fsync, not two, on the path from submit to the agent.
        let dispatched = self.dispatch_queued(routing, &agent.fingerprint);
        if !matches!(dispatched, Ok(true)) {
            self.store().flush()?;
        }
        dispatched?;
        self.task(&id)
    }

    /// Sends queued tasks to the agent, oldest first, while it has free slots. A task whose requester lost
    /// their share while it waited is cancelled instead. Returns whether it flushed the store (it does before
    /// each send), which makes every earlier write durable too.
    pub(crate) fn dispatch_queued(
        &self,
        _routing: &RoutingGuard<'_>,
        agent: &Fingerprint,
    ) -> Result<bool, TaskError> {
        if let Some(live) = self.live().get_mut(agent) {
            live.retry_dispatch = false;
        } else {
            return Ok(false);
        }
        let mut flushed = false;
        let open = self.store().open_tasks(agent)?;
        let mut running = open.iter().filter(|t| t.is_dispatched()).count();
        for mut rec in open.into_iter().filter(|t| !t.is_dispatched()) {
            if running >= self.config().max_running_per_agent {
                break;
            }
            // The share may have been narrowed or downgraded while the task waited.
            let standing = self.standing(&rec);
            match standing {
                Ok(role) => rec.spec.requester.role = role,
                Err(why) => {
                    self.finish_here(&mut rec, TaskState::Cancelled, why)?;
                    continue;
                }
            }
            // Durable before it is sent: after a crash the relay must not send the same task twice.
            rec.dispatched_at = Some(now());
            rec.updated_at = now();
            self.store().put_task(&rec)?;
            self.store().flush()?;
            flushed = true;
            let sent = match self.live().get_mut(agent) {
                Some(live) => match live
                    .outbound
                    .try_send(RelayMessage::StartTask(rec.spec.clone()))
                {
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
                        live.retry_dispatch = true;
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
            tracing::info!(task = %rec.spec.task, "task dispatched");
        }
        Ok(flushed)
    }

    /// Retries dispatching for an agent whose outbound queue was full the last time. Called on heartbeats.
    pub(crate) fn retry_dispatch(&self, agent: &Fingerprint) {
        if !self.live().get(agent).is_some_and(|l| l.retry_dispatch) {
            return;
        }
        let routing = self.routing();
        if let Err(e) = self.dispatch_queued(&routing, agent) {
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
        let owner = match self.store().agent(&rec.agent) {
            Ok(Some(a)) => a.owner,
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
        match self.store().share(&owner, user) {
            Ok(Some(share)) if share.allows(&rec.spec.project) => {
                Ok(crate::shares::role_of(share.level))
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

    /// Ends a task from the relay's side (one the agent does not have, or can no longer report on), through
    /// the normal event path so followers see why.
    pub(crate) fn finish_here(
        &self,
        rec: &mut TaskRecord,
        state: TaskState,
        message: String,
    ) -> Result<(), TaskError> {
        let event = TaskEvent::Finished {
            state: match state {
                TaskState::Cancelled => FinalState::Cancelled,
                TaskState::Done => FinalState::Done,
                _ => FinalState::Failed,
            },
            message: Some(message),
        };
        let seq = rec.last_seq + 1;
        apply(rec, &event);
        rec.state = state;
        rec.last_seq = seq;
        rec.updated_at = now();
        // The relay's own end is always kept: it is short, and followers wait for it.
        let bytes = serde_json::to_vec(&event).map_err(StoreError::from)?;
        rec.output_bytes += bytes.len() as u64;
        let run = [(seq, Some(bytes.as_slice()))];
        self.store().append_event_runs(&[EventRun {
            task: rec,
            events: &run,
            was_open: None,
        }])?;
        self.publish(&rec.spec.task, seq, &event);
        tracing::info!(task = %rec.spec.task, ?state, "task ended by the relay");
        Ok(())
    }

    /// The user's most recent tasks, newest first: those they asked for and those on their agents (for
    /// task-id autocomplete and history). Scans the task history, so front ends should not call it per
    /// keystroke without a limit.
    pub fn tasks_for(&self, user: &str, limit: usize) -> Result<Vec<TaskRecord>, TaskError> {
        let mine: Vec<Fingerprint> = self
            .store()
            .agents_of(user)?
            .into_iter()
            .map(|a| a.fingerprint)
            .collect();
        Ok(self.store().recent_tasks(user, &mine, limit)?)
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

    /// Drops a task's live channel, so whoever follows it sees it closed (the task was deleted) instead of
    /// waiting for events that will never come.
    pub(crate) fn close_followers(&self, id: &str) {
        self.followers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
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
    pub(crate) fn to_agent(&self, agent: &Fingerprint, msg: RelayMessage) -> bool {
        let outbound = self.live().get(agent).map(|l| l.outbound.clone());
        outbound.is_some_and(|o| o.try_send(msg).is_ok())
    }

    /// Cancels a task. Only the requester or the agent's owner may. A queued task just ends (the agent never
    /// had it); a dispatched one is interrupted by the agent, whose `Finished` event ends it.
    ///
    /// Audited: if the entry cannot be written the cancel still happens (stopping work is the safe side), and
    /// the failure is logged as an error.
    pub fn cancel_task<'a>(
        &self,
        who: impl Into<Caller<'a>>,
        id: &str,
    ) -> Result<TaskRecord, TaskError> {
        let caller = who.into();
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
            let routing = self.routing();
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
                self.dispatch_queued(&routing, &rec.agent)?;
                drop(routing);
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

    /// Sends `msg` to an agent only with `entry` in the audit log: a place in the agent's queue is reserved
    /// first, so no entry is written for a message that then cannot go, and no message goes without its
    /// entry. `Ok(false)` when the agent is offline or not keeping up.
    fn to_agent_audited(
        &self,
        agent: &Fingerprint,
        msg: RelayMessage,
        entry: &AuditEntry,
    ) -> Result<bool, StoreError> {
        let Some(outbound) = self.live().get(agent).map(|l| l.outbound.clone()) else {
            return Ok(false);
        };
        let Ok(permit) = outbound.try_reserve() else {
            return Ok(false);
        };
        self.store().append_audit(entry)?;
        permit.send(msg);
        Ok(true)
    }

    /// Continues a task with a follow-up prompt from `user` (its requester or the agent's owner). A task
    /// that is still running gets the prompt in its live session; one that ended starts a new task on the
    /// same agent and project that resumes its Claude Code session, with the user's standing checked afresh
    /// (a share may have changed since).
    ///
    /// A grantee's follow-up is audited like their tasks (and not sent without its entry). A follow-up that
    /// starts a new task counts against the user's task limits; one into a running task does not.
    pub fn reply<'a>(
        &self,
        who: impl Into<Caller<'a>>,
        id: &str,
        prompt: String,
        name: Option<String>,
    ) -> Result<ReplyOutcome, TaskError> {
        let caller = who.into();
        let user = caller.user;
        check_prompt(&prompt)?;
        let rec = self.task(id)?;
        self.may_act(user, &rec)?;
        let agent = self
            .store()
            .agent(&rec.agent)?
            .ok_or_else(|| TaskError::NoSuchTask(id.to_string()))?;
        if !rec.state.is_final() {
            if !rec.is_dispatched() {
                return Err(TaskError::NotStarted(id.to_string()));
            }
            // A grantee whose share was revoked or narrowed may not keep talking to the owner's machine; the
            // lock keeps a revocation from landing between this check and the send.
            let _routing = self.routing();
            let role = self.role_for(user, &agent.owner, &rec.spec.project)?;
            let preview = preview(&prompt);
            let input = RelayMessage::TaskInput {
                task: id.to_string(),
                prompt,
            };
            let sent = if role == Role::Owner {
                self.to_agent(&rec.agent, input)
            } else {
                let entry = AuditEntry::new(
                    AuditKind::GranteeTask {
                        requester: user.to_string(),
                        project: rec.spec.project.clone(),
                        prompt: preview.clone(),
                        follow_up: true,
                    },
                    caller.actor(),
                    &agent.owner,
                    format!(
                        "user {user} sent a follow-up in {} on {}: \"{preview}\"",
                        rec.spec.project, agent.name
                    ),
                )
                .by(caller)
                .on(&agent)
                .task(id);
                self.to_agent_audited(&rec.agent, input, &entry)?
            };
            if !sent {
                return Err(TaskError::Offline {
                    name: agent.name,
                    seen: "not connected now".into(),
                });
            }
            return Ok(ReplyOutcome::Sent(rec));
        }
        let Some(session) = rec.session_id.clone() else {
            return Err(TaskError::NoSession(id.to_string()));
        };
        if agent.revoked_at.is_some() {
            return Err(TaskError::Offline {
                name: agent.name,
                seen: "its key was revoked".into(),
            });
        }
        self.take_task_token(user)?;
        let routing = self.routing();
        let role = self.role_for(user, &agent.owner, &rec.spec.project)?;
        let new = self.enqueue(
            &routing,
            NewTask {
                agent,
                user: user.to_string(),
                name: display_name(name),
                role,
                project: rec.spec.project,
                prompt,
                options: rec.spec.options,
                resume: Some(session),
                follows: Some(id.to_string()),
                operator: caller.operator,
            },
        )?;
        Ok(ReplyOutcome::Resumed(new))
    }

    /// Who decides the approvals of a task: the agent's owner, or the requester when the owner trusts them
    /// (checked now, so downgrading or revoking a share takes effect at once). Front ends use it to say whom
    /// an approval is waiting for.
    pub fn approver(&self, id: &str) -> Result<String, TaskError> {
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

    /// Passes a decision on an approval request to the agent; only the task's [`approver`](Core::approver)
    /// may decide. The decision is audited before it is sent, and not sent if the entry cannot be written: a
    /// decision lets something run on the owner's machine.
    pub fn decide<'a>(
        &self,
        who: impl Into<Caller<'a>>,
        id: &str,
        approval: &str,
        decision: Decision,
    ) -> Result<(), TaskError> {
        let caller = who.into();
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
        if !self.to_agent_audited(&rec.agent, msg, &entry)? {
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

    /// Stores a run of events of one task from `agent`, each exactly once, in one write. Returns the sequence
    /// number to acknowledge (everything up to it is stored), or `None` when nothing can be acknowledged (a
    /// gap, or a task that is not this agent's). A task's end frees a slot, so the agent's queue moves on.
    pub fn record_events(
        &self,
        agent: &Fingerprint,
        id: &str,
        run: Vec<(u64, TaskEvent)>,
    ) -> Result<Option<u64>, TaskError> {
        let Some(mut rec) = self.store().task(id)? else {
            tracing::warn!(task = id, "event for an unknown task; ignored");
            return Ok(None);
        };
        if rec.agent != *agent {
            tracing::warn!(task = id, "event for a task on another agent; ignored");
            return Ok(None);
        }
        let cap = self.config().max_task_output;
        let was_open = !rec.state.is_final();
        let mut writes: Vec<(u64, Option<Vec<u8>>)> = Vec::new();
        let mut published = Vec::new();
        let mut finished = false;
        let mut resent = false;
        // Tool uses the agent allowed by a session rule, audited once they are stored.
        let mut auto_allowed = Vec::new();
        for (seq, event) in run {
            if seq <= rec.last_seq {
                // Re-sent after a reconnect: already stored. Acknowledged again so the agent can let it go.
                resent = true;
                continue;
            }
            if !rec.is_dispatched() {
                // The agent was never given this task (it is queued, or the relay ended it while it was): it
                // cannot have anything to say about it. What came before in the run is still stored.
                tracing::warn!(
                    task = id,
                    "event for a task never sent to this agent; ignored"
                );
                break;
            }
            if seq != rec.last_seq + 1 {
                tracing::warn!(
                    task = id,
                    seq,
                    stored = rec.last_seq,
                    "event out of order; waiting for the gap to be re-sent"
                );
                break;
            }
            finished |= matches!(event, TaskEvent::Finished { .. });
            // The end message (often the agent's refusal, worded for its owner) lands in a thread the
            // requester reads: someone else's task gets it without the owner's folders.
            let event = match event {
                TaskEvent::Finished {
                    state,
                    message: Some(m),
                } if rec.spec.requester.role != Role::Owner => TaskEvent::Finished {
                    state,
                    message: Some(crate::redact::for_grantee(&m)),
                },
                other => other,
            };
            if let TaskEvent::Tool {
                name,
                summary,
                auto_allowed: Some(rule),
            } = &event
            {
                auto_allowed.push((name.clone(), summary.clone(), rule.clone()));
            }
            let was_final = rec.state.is_final();
            apply(&mut rec, &event);
            rec.last_seq = seq;
            let encoded = serde_json::to_vec(&event).map_err(StoreError::from)?;
            let kept = match output::keep(&rec, event, encoded.len() as u64, cap, was_final) {
                Keep::Unchanged(e) => Some((e, encoded)),
                Keep::Store(e) => {
                    let bytes = serde_json::to_vec(&e).map_err(StoreError::from)?;
                    Some((e, bytes))
                }
                Keep::Marker => {
                    rec.output_truncated = true;
                    tracing::warn!(
                        task = id,
                        cap,
                        "task output past the cap; later output is dropped"
                    );
                    let marker = output::marker(cap);
                    let bytes = serde_json::to_vec(&marker).map_err(StoreError::from)?;
                    Some((marker, bytes))
                }
                // Acknowledged all the same, so the agent's outbox drains; the marker already said so.
                Keep::Drop => None,
            };
            match kept {
                Some((event, bytes)) => {
                    rec.output_bytes += bytes.len() as u64;
                    writes.push((seq, Some(bytes)));
                    published.push((seq, event));
                }
                None => writes.push((seq, None)),
            }
        }
        if writes.is_empty() {
            return Ok(resent.then_some(rec.last_seq));
        }
        rec.updated_at = now();
        let run: Vec<(u64, Option<&[u8]>)> = writes
            .iter()
            .map(|(seq, bytes)| (*seq, bytes.as_deref()))
            .collect();
        self.store().append_event_runs(&[EventRun {
            task: &rec,
            events: &run,
            was_open: Some(was_open),
        }])?;
        if !auto_allowed.is_empty() {
            self.audit_auto_allowed(&rec, auto_allowed);
        }
        for (seq, event) in &published {
            self.publish(id, *seq, event);
        }
        if finished {
            let routing = self.routing();
            self.dispatch_queued(&routing, agent)?;
        }
        Ok(Some(rec.last_seq))
    }

    /// Audits uses the agent already allowed by a session rule. They have happened, so a missing entry is
    /// logged rather than refused (like a cancel); the events themselves are stored and shown either way.
    fn audit_auto_allowed(
        &self,
        rec: &TaskRecord,
        uses: Vec<(String, String, ct_protocol::scope::SessionScope)>,
    ) {
        let agent = match self.store().agent(&rec.agent) {
            Ok(Some(agent)) => agent,
            Ok(None) => return,
            Err(e) => {
                tracing::error!(error = %e, task = %rec.spec.task, "could not audit auto-allowed uses: agent unreadable");
                return;
            }
        };
        for (tool, summary, rule) in uses {
            self.audit_or_log(crate::audit::auto_allowed_entry(
                &agent,
                &rec.spec.task,
                &rec.spec.requester.user,
                &tool,
                &summary,
                &rule,
            ));
        }
    }

    /// Reconciles after a (re)connect: the agent reports what it still runs; any other task it had been sent
    /// in an earlier session is lost. Queued tasks are the relay's and stay queued; then the queue moves. A
    /// running task whose requester lost their share meanwhile is cancelled through the agent.
    pub fn agent_running(&self, agent: &Fingerprint, running: &[String]) -> Result<(), TaskError> {
        let routing = self.routing();
        let sent_here = match self.live().get_mut(agent) {
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
        for mut rec in self.store().open_tasks(agent)? {
            if !rec.is_dispatched() || sent_here.contains(&rec.spec.task) {
                continue;
            }
            if running.contains(&rec.spec.task) {
                if self.standing(&rec).is_err() {
                    let cancel = RelayMessage::CancelTask {
                        task: rec.spec.task.clone(),
                    };
                    self.to_agent(agent, cancel);
                }
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
        self.dispatch_queued(&routing, agent)?;
        Ok(())
    }

    /// Called when an agent's session starts: what fits its free slots goes out now (tasks still counted as
    /// running from before wait for its `Running` report).
    pub(crate) fn agent_connected(&self, agent: &Fingerprint) {
        let routing = self.routing();
        if let Err(e) = self.dispatch_queued(&routing, agent) {
            tracing::error!(error = %e, "could not dispatch queued tasks");
        }
    }

    /// Ends a revoked agent's unfinished tasks: it will never connect again to report on them.
    pub(crate) fn end_tasks_of_revoked(&self, agent: &AgentRecord) {
        let _routing = self.routing();
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
        // The record is rewritten with every event: keep only as much of the agent's branch name as git
        // itself would take.
        TaskEvent::Worktree { branch, .. } => {
            rec.worktree = Some(branch.chars().take(MAX_BRANCH_CHARS).collect())
        }
        _ => {}
    }
}

/// Longest worktree branch name kept from an agent.
const MAX_BRANCH_CHARS: usize = 255;

/// "12 MiB", "3 KiB": for messages people read.
fn human_bytes(n: u64) -> String {
    match n {
        0..=1023 => format!("{n} bytes"),
        1024..=1_048_575 => format!("{} KiB", n / 1024),
        1_048_576..=1_073_741_823 => format!("{} MiB", n / 1_048_576),
        _ => format!("{:.1} GiB", n as f64 / 1_073_741_824.0),
    }
}
