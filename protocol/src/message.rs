//! Session messages: what flows after the handshake, one enum per direction.
//!
//! Both enums are internally tagged JSON (`{"type": "...", ...}`) so a newer peer's unknown message is a
//! clear decode error rather than a misread field.

use serde::{Deserialize, Serialize};

use crate::files::FilePart;
use crate::project::{ProjectOp, ProjectReply, ProjectsReport};
use crate::task::{Decision, Requester, TaskEvent, TaskSpec, WorktreeAction, WorktreeOutcome};

/// Agent → relay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AgentMessage {
    /// Keep-alive, sent on a fixed interval; any frame resets the peer's dead-link timer.
    Heartbeat,
    /// The agent closes this session on purpose (shutdown, or moving to a better transport).
    Goodbye { reason: String },
    /// Sent once after each handshake: the tasks this agent is still running. The relay marks any other task
    /// it thought was running on this agent as lost.
    Running { tasks: Vec<String> },
    /// A task event with its per-task sequence number (from 1). Re-sent after a reconnect until acknowledged.
    Event {
        task: String,
        seq: u64,
        event: TaskEvent,
    },
    /// The agent's projects and allowed folders: sent after each handshake and whenever they change, so the
    /// relay can name them (autocomplete, "unknown project" errors) without asking.
    Projects(ProjectsReport),
    /// The answer to [`RelayMessage::Project`] with the same `id`.
    ProjectReply { id: u64, reply: ProjectReply },
    /// The answer to [`RelayMessage::Worktree`] with the same `id`.
    WorktreeReply { id: u64, outcome: WorktreeOutcome },
}

/// Relay → agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RelayMessage {
    /// Keep-alive, sent on a fixed interval; any frame resets the peer's dead-link timer.
    Heartbeat,
    /// The relay ends this session; `reason` tells the agent whether to come back.
    Closing {
        reason: CloseReason,
        message: String,
    },
    /// Start a task (a Claude Code session in a project).
    StartTask(TaskSpec),
    /// A piece of a file attached to the `StartTask` or `TaskInput` of `task` that follows it (see
    /// [`crate::files`]). Sent only to agents that reported `accepts_files`.
    FilePart(FilePart),
    /// A follow-up message for a running task's session.
    TaskInput { task: String, prompt: String },
    /// Interrupt and end a task.
    CancelTask { task: String },
    /// The answer to an approval request.
    Decide {
        task: String,
        approval: String,
        decision: Decision,
    },
    /// Every event of `task` up to `seq` is stored; the agent may forget them.
    Ack { task: String, seq: u64 },
    /// Add, remove or list projects on the agent's own policy; answered by [`AgentMessage::ProjectReply`].
    /// The agent checks paths against its allowed folders itself: the relay cannot widen them.
    Project { id: u64, op: ProjectOp },
    /// Merge, keep or discard the worktree branch of a finished `task`; answered by
    /// [`AgentMessage::WorktreeReply`]. Sent only for tasks whose agent reported a worktree (so only to agents
    /// that understand it). The agent checks `requester` itself: the task's requester or its owner.
    Worktree {
        id: u64,
        task: String,
        action: WorktreeAction,
        requester: Requester,
    },
}

/// Why the relay ended a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CloseReason {
    /// The relay is shutting down or restarting: reconnect at once.
    Shutdown,
    /// A newer connection with the same key took over this one: do not fight it.
    Replaced,
    /// The agent's key was revoked: do not reconnect; the owner must pair again.
    Revoked,
}
