//! Tasks: what a request to run one says ([`Submit`]), why one is refused ([`TaskError`]), and the checks
//! every request goes through. The rest of a task's life is in [`submit`](super::submit) (on the user's own
//! agents or on agents shared with them), [`queue`](super::queue) (each agent's queue, its concurrency limit,
//! and reconciling an agent's running tasks after it reconnects), [`events`](super::events) (the per-task
//! event log with its sequence numbers, and following a task live) and [`control`](super::control)
//! (follow-ups, cancelling, deciding approvals).
//!
//! A task is stored as queued first. It is dispatched (sent to the agent as `StartTask`) while fewer than
//! [`CoreConfig::max_running_per_agent`](crate::core::CoreConfig) of that agent's tasks are dispatched and
//! unfinished; otherwise it waits, first in first out, and the queue moves whenever a task ends or the agent
//! reconnects. Until it is dispatched a task belongs to the relay alone: it cannot be lost by the agent, the
//! agent cannot write events into it, and cancelling it needs no agent.

use ct_protocol::task::{Role, TaskOptions, MAX_PROMPT_LEN};

use crate::store::{StoreError, TaskRecord, TaskState};

/// Longest project (a name or a path) a task may name, in bytes.
pub const MAX_PROJECT_LEN: usize = 1024;

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
    /// The Discord role ids of `user` in the guild, when the front end knows them (the bot does): a user in
    /// cluster mode is checked against their pool's access with them. `None` (the admin socket): only a
    /// pool's user list or "everyone" can admit them, and a pool open only to roles refuses, saying why.
    pub roles: Option<Vec<String>>,
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
    #[error("task {0} started just now: cancel it again to stop it")]
    JustStarted(String),
    /// The agent's session is on another node of the cluster: the handle asks that node (never shown).
    #[error("agent {0} is connected to another relay node")]
    HeldElsewhere(String),
    /// What the node holding the agent answered, word for word.
    #[error("{0}")]
    FromOtherNode(String),
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
    #[error(
        "agent {agent} runs a ct-agent too old to receive attached files: ask its owner to upgrade \
         ct-agent on that machine and restart it, or send this without files"
    )]
    FilesNotSupported { agent: String },
    #[error(
        "{count} files attached, more than the {max} a task takes: attach fewer (or zip them)"
    )]
    TooManyFiles { count: usize, max: usize },
    #[error(
        "{name:?} is {size}, over the {max} a file may be: attach a smaller file (or a part of it)"
    )]
    FileTooBig {
        name: String,
        size: String,
        max: String,
    },
    #[error("the attached files add up to {total}, over the {max} a task takes: attach fewer or smaller ones")]
    FilesTooBig { total: String, max: String },
    #[error(
        "agent {0} is connected to another relay node, which cannot be handed files for a running task: \
         send the message without files, or again in a moment"
    )]
    FilesElsewhere(String),
    /// About worker pools (a refusal, an unknown pool, no worker online), in words that say what to do.
    #[error("{0}")]
    Pool(String),
    #[error(transparent)]
    Stopped(#[from] super::Stopped),
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub(super) fn check_prompt(prompt: &str) -> Result<(), TaskError> {
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

pub(super) fn check_project_text(project: &str) -> Result<(), TaskError> {
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

/// Whether a project as typed is a path (which the agent's policy checks) rather than a project name.
pub fn is_path(project: &str) -> bool {
    project.contains('/') || project.contains('\\') || project.starts_with('~')
}
