//! Task messages: what the relay asks of an agent's Claude Code, and the events that come back.
//!
//! Delivery rule: every [`TaskEvent`] an agent sends carries a per-task sequence number starting at 1. The
//! relay persists an event before acknowledging it, and acknowledges cumulatively (`Ack { seq }` covers every
//! event up to `seq`). The agent keeps what is unacknowledged and sends it again, in order, after a
//! reconnect; the relay drops any `seq` it already stored. So nothing a task printed is lost to a dropped link
//! or a relay restart, and nothing is shown twice.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::scope::SessionScope;

/// Longest prompt the relay forwards (bytes). Front ends refuse longer ones with a message.
pub const MAX_PROMPT_LEN: usize = 100 * 1024;
/// Longest text carried by one event (bytes); longer output is split into several events.
pub const MAX_EVENT_TEXT: usize = 64 * 1024;
/// Longest Bash command a [`TaskEvent::Tool`] carries in full (bytes).
pub const MAX_TOOL_COMMAND: usize = 16 * 1024;

/// Who asked for a task, as the relay established it (Discord user id), and in what capacity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Requester {
    pub user: String,
    #[serde(default)]
    pub name: Option<String>,
    pub role: Role,
}

/// The requester's standing on this agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Owner,
    /// Shared with by the owner; approvals go to the owner.
    Grantee,
    /// Shared with at the trusted level; approvals go to the grantee.
    TrustedGrantee,
}

/// Options a user may set per task.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TaskOptions {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permission_mode: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_turns: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_budget_usd: Option<f64>,
    /// Where the task edits files; unset, the project's default on the agent applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub isolation: Option<Isolation>,
}

/// Where a task edits files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Isolation {
    /// In the project's own working tree, alongside anything else running there.
    Shared,
    /// In a git worktree of its own, on branch `ct/<task>`, created from the project's HEAD.
    Worktree,
}

impl std::str::FromStr for Isolation {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "shared" => Ok(Self::Shared),
            "worktree" => Ok(Self::Worktree),
            other => Err(format!(
                "isolation is `worktree` or `shared`, not `{other}`"
            )),
        }
    }
}

/// Longest diff a [`TaskEvent::Worktree`] carries (bytes); a longer one is cut and says so.
pub const MAX_DIFF_LEN: usize = 256 * 1024;

/// What a task in a worktree changed against the commit it started from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiffStat {
    pub files_changed: u32,
    pub insertions: u32,
    pub deletions: u32,
}

/// What to do with a finished task's worktree branch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorktreeAction {
    /// Merge the branch into the project's checked-out branch (fast-forward, else a merge commit), then
    /// remove the worktree and the branch.
    Merge,
    /// Remove the worktree, keep the branch.
    Keep,
    /// Remove the worktree and delete the branch.
    Discard,
}

/// How a [`WorktreeAction`] went: `ok` false says why in `message` (with the conflicting files for a merge).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorktreeOutcome {
    pub ok: bool,
    pub message: String,
    /// Files a merge would conflict on; nothing was changed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conflicts: Vec<String>,
}

/// Everything an agent needs to start a task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskSpec {
    /// Chosen by the relay; short enough to type (`/status t_k3m9x2`).
    pub task: String,
    /// A project name, or a path the agent's policy must allow.
    pub project: String,
    pub prompt: String,
    pub requester: Requester,
    #[serde(default)]
    pub options: TaskOptions,
    /// A Claude Code session to continue (`--resume`), when the task follows an earlier one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume: Option<String>,
}

/// A decision on an approval request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "decision", rename_all = "snake_case")]
pub enum Decision {
    /// Run this one tool use (optionally with edited input).
    AllowOnce {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        updated_input: Option<Value>,
    },
    /// Run it, and allow the same use for the rest of the task without asking: the exact command, file,
    /// origin or input (see [`SessionScope::exact`]); never the whole tool.
    AllowSession,
    /// Bash: run it, and allow simple commands starting with `prefix` for the rest of the task (see
    /// [`SessionScope::prefix`]). Only offered for approvals that came with a
    /// [`session`](TaskEvent::ApprovalRequested) scope, i.e. from agents that understand it.
    AllowSessionPrefix { prefix: String },
    /// Refuse, telling Claude why.
    Deny { reason: String },
    /// Answers to an AskUserQuestion request.
    Answers { answers: Value },
}

/// How a task ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinalState {
    Done,
    Failed,
    Cancelled,
}

/// One thing that happened in a task, in the order it happened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TaskEvent {
    /// The agent accepted the task and Claude Code started in `cwd`.
    Started { cwd: String },
    /// Claude Code's session details (from its init message).
    Session {
        session_id: String,
        #[serde(default)]
        model: Option<String>,
        #[serde(default)]
        claude_version: Option<String>,
    },
    /// Assistant text (at most [`MAX_EVENT_TEXT`] bytes; longer text arrives in several events).
    Text { text: String },
    /// A tool use, summarised for people: which tool, which file or command.
    Tool {
        name: String,
        summary: String,
        /// Set when the agent allowed this use itself, without asking, because an earlier "allow for the
        /// session" rule covers it (the rule). Such an event follows the plain one for the same use.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        auto_allowed: Option<SessionScope>,
        /// Claude Code's id of this use, which its [`TaskEvent::ToolResult`] names. Only from agents that
        /// send tool output (see [`Welcome::tool_output`](crate::handshake::Welcome::tool_output)).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
        /// Bash: the whole command, at most [`MAX_TOOL_COMMAND`] bytes (`summary` is cut much shorter), so
        /// nothing of what ran is hidden. Only from agents that send tool output.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        command: Option<String>,
    },
    /// A tool's outcome. `summary` is a short preview (what older agents send, and all older bots read); the
    /// other fields come only from agents that send tool output, to relays that asked for it.
    ToolResult {
        is_error: bool,
        summary: String,
        /// The [`TaskEvent::Tool`] `id` this result belongs to.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tool_use_id: Option<String>,
        /// What the tool returned, whole up to [`MAX_EVENT_TEXT`] bytes; past that its head and tail with a
        /// line in between saying how much was left out, and `output_bytes` says the original size.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        output: Option<String>,
        /// The size of the whole output in bytes, set only when `output` was cut.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        output_bytes: Option<u64>,
        /// Bash: the command's exit status, where Claude Code tells it (it says `Exit code N` on failure and
        /// nothing on success, which is 0).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        exit_code: Option<i32>,
        /// Edit, Write, MultiEdit, NotebookEdit: the change as a unified diff, at most [`MAX_EVENT_TEXT`]
        /// bytes.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        diff: Option<String>,
        /// The diff was longer and was cut.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        diff_cut: bool,
    },
    /// Claude Code asks permission; the answer is a [`Decision`] for `approval`.
    ApprovalRequested {
        approval: String,
        tool: String,
        summary: String,
        input: Value,
        /// True for AskUserQuestion: the answer is [`Decision::Answers`].
        #[serde(default)]
        question: bool,
        /// What the model says the use is for. Claude's words, not a description of what runs: shown after
        /// the input, labelled as Claude's.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        description: Option<String>,
        /// What "Allow for session" allows for this request; absent from agents that allowed the whole tool.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        session: Option<SessionScope>,
        /// The input was too large for one event and long strings in `input` were cut: the approver cannot
        /// see all of it (the agent still applies the decision to the whole input).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        input_cut: bool,
    },
    /// The request is no longer pending: decided, timed out, or withdrawn by Claude Code.
    ApprovalClosed { approval: String, outcome: String },
    /// One turn ended (Claude Code's `result`).
    TurnFinished {
        is_error: bool,
        subtype: String,
        #[serde(default)]
        text: Option<String>,
        #[serde(default)]
        cost_usd: Option<f64>,
        #[serde(default)]
        turns: Option<u32>,
        #[serde(default)]
        input_tokens: Option<u64>,
        #[serde(default)]
        output_tokens: Option<u64>,
        #[serde(default)]
        duration_ms: Option<u64>,
    },
    /// How much of the model's context window the conversation takes up now: after each model call (from its
    /// usage) and after each turn (Claude Code's own `get_context_usage`). Sent only to relays that said they
    /// understand it ([`Welcome::live_usage`](crate::handshake::Welcome::live_usage)).
    Context {
        /// Tokens in the context: input, cached and cache-written tokens of the latest call.
        tokens: u64,
        /// The model's context window, once Claude Code has said it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        window: Option<u64>,
    },
    /// The task runs (at start) or ran (before [`TaskEvent::Finished`], with `change`) in a git worktree on
    /// `branch`, created from commit `base`. Only sent for tasks in a worktree, which older relays never ask
    /// for.
    Worktree {
        branch: String,
        base: String,
        /// Something the user should know (uncommitted changes left out, why it runs shared instead).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        note: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        change: Option<DiffStat>,
        /// The whole diff against `base`, at most [`MAX_DIFF_LEN`] bytes.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        diff: Option<String>,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        diff_cut: bool,
    },
    /// The task is over; `message` explains a failure in words the user can act on.
    Finished {
        state: FinalState,
        #[serde(default)]
        message: Option<String>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AgentMessage, RelayMessage};

    #[test]
    fn events_and_decisions_from_older_peers_still_parse() {
        // An agent from before session scopes: no description, scope or cut flag; tools without auto_allowed.
        let old: TaskEvent = serde_json::from_str(
            r#"{"kind":"approval_requested","approval":"a1","tool":"Bash","summary":"ls","input":{"command":"ls"}}"#,
        )
        .unwrap();
        assert!(matches!(
            old,
            TaskEvent::ApprovalRequested {
                description: None,
                session: None,
                input_cut: false,
                ..
            }
        ));
        let tool: TaskEvent =
            serde_json::from_str(r#"{"kind":"tool","name":"Bash","summary":"ls"}"#).unwrap();
        assert!(matches!(
            tool,
            TaskEvent::Tool {
                auto_allowed: None,
                ..
            }
        ));
        // What a newer agent sends when nothing is new stays what older relays read.
        let plain = TaskEvent::Tool {
            name: "Bash".into(),
            summary: "ls".into(),
            auto_allowed: None,
            id: None,
            command: None,
        };
        assert_eq!(
            serde_json::to_string(&plain).unwrap(),
            r#"{"kind":"tool","name":"Bash","summary":"ls"}"#
        );
        assert_eq!(
            serde_json::to_string(&Decision::AllowSession).unwrap(),
            r#"{"decision":"allow_session"}"#
        );
        let prefix = Decision::AllowSessionPrefix {
            prefix: "npm test".into(),
        };
        let back: Decision =
            serde_json::from_str(&serde_json::to_string(&prefix).unwrap()).unwrap();
        assert_eq!(back, prefix);
        let auto = TaskEvent::Tool {
            name: "Bash".into(),
            summary: "npm test".into(),
            auto_allowed: Some(SessionScope::Prefix {
                prefix: "npm".into(),
            }),
            id: None,
            command: None,
        };
        let back: TaskEvent = serde_json::from_str(&serde_json::to_string(&auto).unwrap()).unwrap();
        assert_eq!(back, auto);
    }

    #[test]
    fn live_usage_is_offered_by_the_relay_and_context_events_round_trip() {
        use crate::handshake::Welcome;
        // A Welcome from an older relay says nothing: the agent must assume it cannot take context events.
        let old: Welcome =
            serde_json::from_str(r#"{"owner":"1","agent_name":"box","heartbeat_ms":5000}"#)
                .unwrap();
        assert!(!old.live_usage);
        let mut new = old.clone();
        assert!(!serde_json::to_string(&new).unwrap().contains("live_usage"));
        new.live_usage = true;
        let back: Welcome = serde_json::from_str(&serde_json::to_string(&new).unwrap()).unwrap();
        assert!(back.live_usage);
        for ev in [
            TaskEvent::Context {
                tokens: 25_300,
                window: Some(1_000_000),
            },
            TaskEvent::Context {
                tokens: 10,
                window: None,
            },
        ] {
            let json = serde_json::to_string(&ev).unwrap();
            assert_eq!(serde_json::from_str::<TaskEvent>(&json).unwrap(), ev);
        }
        assert_eq!(
            serde_json::to_string(&TaskEvent::Context {
                tokens: 10,
                window: None
            })
            .unwrap(),
            r#"{"kind":"context","tokens":10}"#
        );
    }

    #[test]
    fn tool_output_fields_are_additive() {
        // What an older agent sends: no id, no output, no diff. It still parses, with nothing set.
        let old: TaskEvent =
            serde_json::from_str(r#"{"kind":"tool_result","is_error":false,"summary":"hi"}"#)
                .unwrap();
        assert_eq!(
            old,
            TaskEvent::ToolResult {
                is_error: false,
                summary: "hi".into(),
                tool_use_id: None,
                output: None,
                output_bytes: None,
                exit_code: None,
                diff: None,
                diff_cut: false,
            }
        );
        let tool: TaskEvent =
            serde_json::from_str(r#"{"kind":"tool","name":"Bash","summary":"ls"}"#).unwrap();
        assert!(matches!(
            tool,
            TaskEvent::Tool {
                id: None,
                command: None,
                ..
            }
        ));
        // Unset, a newer agent's events are byte for byte what older relays and bots read.
        assert_eq!(
            serde_json::to_string(&old).unwrap(),
            r#"{"kind":"tool_result","is_error":false,"summary":"hi"}"#
        );
        // Set, they round-trip, and an older reader that knows only the old fields still gets those.
        let full = TaskEvent::ToolResult {
            is_error: true,
            summary: "Exit code 3".into(),
            tool_use_id: Some("toolu_1".into()),
            output: Some("Exit code 3\nout".into()),
            output_bytes: Some(1 << 20),
            exit_code: Some(3),
            diff: Some("-a\n+b\n".into()),
            diff_cut: true,
        };
        let json = serde_json::to_string(&full).unwrap();
        let back: TaskEvent = serde_json::from_str(&json).unwrap();
        assert_eq!(back, full);
        #[derive(Deserialize)]
        #[serde(tag = "kind", rename_all = "snake_case")]
        enum OldEvent {
            ToolResult { is_error: bool, summary: String },
        }
        let OldEvent::ToolResult { is_error, summary } = serde_json::from_str(&json).unwrap();
        assert!(is_error);
        assert_eq!(summary, "Exit code 3");
        let use_ = TaskEvent::Tool {
            name: "Bash".into(),
            summary: "ls".into(),
            auto_allowed: None,
            id: Some("toolu_1".into()),
            command: Some("ls -la".into()),
        };
        let back: TaskEvent = serde_json::from_str(&serde_json::to_string(&use_).unwrap()).unwrap();
        assert_eq!(back, use_);
    }

    #[test]
    fn the_tool_output_flag_of_welcome_is_additive() {
        use crate::handshake::Welcome;
        // An older relay's Welcome: no flag, so the agent sends what it always sent.
        let old: Welcome = serde_json::from_str(
            r#"{"owner":"1","agent_name":"box","paired":false,"heartbeat_ms":1000}"#,
        )
        .unwrap();
        assert!(!old.tool_output);
        // Unset, a newer relay's Welcome is what older agents read; set, it says so.
        assert!(!serde_json::to_string(&old).unwrap().contains("tool_output"));
        let new = Welcome {
            tool_output: true,
            ..old
        };
        let json = serde_json::to_string(&new).unwrap();
        assert!(json.contains(r#""tool_output":true"#));
        assert_eq!(serde_json::from_str::<Welcome>(&json).unwrap(), new);
    }

    #[test]
    fn worktree_options_events_and_requests_are_additive() {
        // Options from an older relay: no isolation.
        let old: TaskOptions = serde_json::from_str(r#"{"model":"sonnet"}"#).unwrap();
        assert_eq!(old.isolation, None);
        // Unset, nothing new is sent to older agents.
        assert_eq!(
            serde_json::to_string(&TaskOptions::default()).unwrap(),
            "{}"
        );
        let set = TaskOptions {
            isolation: Some(Isolation::Worktree),
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_string(&set).unwrap(),
            r#"{"isolation":"worktree"}"#
        );
        assert_eq!("shared".parse::<Isolation>(), Ok(Isolation::Shared));
        assert!("both".parse::<Isolation>().is_err());
        let ev = TaskEvent::Worktree {
            branch: "ct/t_1".into(),
            base: "abc".into(),
            note: None,
            change: Some(DiffStat {
                files_changed: 1,
                insertions: 2,
                deletions: 3,
            }),
            diff: Some("+x".into()),
            diff_cut: false,
        };
        let back: TaskEvent = serde_json::from_str(&serde_json::to_string(&ev).unwrap()).unwrap();
        assert_eq!(back, ev);
        let req = RelayMessage::Worktree {
            id: 1,
            task: "t_1".into(),
            action: WorktreeAction::Merge,
            requester: Requester {
                user: "1".into(),
                name: None,
                role: Role::Owner,
            },
        };
        let frame = crate::frame::encode(&req).unwrap();
        assert_eq!(
            crate::frame::decode::<RelayMessage>(&frame)
                .unwrap()
                .unwrap()
                .0,
            req
        );
        let reply = AgentMessage::WorktreeReply {
            id: 1,
            outcome: WorktreeOutcome {
                ok: false,
                message: "conflict".into(),
                conflicts: vec!["a.txt".into()],
            },
        };
        let frame = crate::frame::encode(&reply).unwrap();
        assert_eq!(
            crate::frame::decode::<AgentMessage>(&frame)
                .unwrap()
                .unwrap()
                .0,
            reply
        );
    }

    #[test]
    fn task_messages_round_trip_as_frames() {
        let spec = TaskSpec {
            task: "t_abc".into(),
            project: "web".into(),
            prompt: "fix the build".into(),
            requester: Requester {
                user: "1".into(),
                name: None,
                role: Role::Grantee,
            },
            options: TaskOptions {
                model: Some("sonnet".into()),
                ..Default::default()
            },
            resume: None,
        };
        for msg in [
            RelayMessage::StartTask(spec),
            RelayMessage::Decide {
                task: "t_abc".into(),
                approval: "a1".into(),
                decision: Decision::Deny {
                    reason: "no".into(),
                },
            },
            RelayMessage::Ack {
                task: "t_abc".into(),
                seq: 7,
            },
        ] {
            let frame = crate::frame::encode(&msg).unwrap();
            assert_eq!(
                crate::frame::decode::<RelayMessage>(&frame)
                    .unwrap()
                    .unwrap()
                    .0,
                msg
            );
        }
        let ev = AgentMessage::Event {
            task: "t_abc".into(),
            seq: 3,
            event: TaskEvent::Finished {
                state: FinalState::Failed,
                message: Some("not logged in".into()),
            },
        };
        let frame = crate::frame::encode(&ev).unwrap();
        assert_eq!(
            crate::frame::decode::<AgentMessage>(&frame)
                .unwrap()
                .unwrap()
                .0,
            ev
        );
    }
}
