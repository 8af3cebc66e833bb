//! Projects over the wire: the relay asks an agent to add, remove or list the names it gives to folders, and
//! the agent reports what it has. The agent's own policy decides; these messages only carry the question and
//! the answer (a refusal is text written for the person who asked).

use serde::{Deserialize, Serialize};

/// One named project folder on an agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProjectInfo {
    pub name: String,
    /// The canonical folder on the agent's machine.
    pub path: String,
}

/// What the agent has: sent after each handshake and after every change.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProjectsReport {
    pub projects: Vec<ProjectInfo>,
    /// Folders tasks may run in (ALLOWED_PROJECT_DIRS and the config file), canonical.
    pub allowed_dirs: Vec<String>,
    /// Whether this agent accepts tasks from users its owner shared it with.
    #[serde(default)]
    pub accepts_shared: bool,
    /// Whether this agent takes attached files ([`FilePart`](crate::files::FilePart)s before a start or an
    /// input). Absent from older agents, which could not decode them: the relay refuses files for those.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub accepts_files: bool,
    /// A pool worker (`ct-agent run --pool`): it serves many users, each in a workspace of their own, and
    /// answers the `*_for` and `Create` operations for them; `projects` is empty (each user's are asked for).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pool: bool,
}

/// A change or a question about projects.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ProjectOp {
    /// Name `path` (as typed: `~`, relative to home, or a Windows path on WSL) `name`.
    Add {
        name: String,
        path: String,
    },
    Remove {
        name: String,
    },
    List,
    /// Pool workers only: a new project `name` in `user`'s workspace, empty or cloned from `git`.
    Create {
        user: String,
        name: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        git: Option<String>,
    },
    /// Pool workers only: the projects in `user`'s workspace.
    ListFor {
        user: String,
    },
    /// Pool workers only: removes project `name` (and its files) from `user`'s workspace.
    RemoveFor {
        user: String,
        name: String,
    },
    /// Pool workers only: what `user` has spent through the worker's metering proxy, and their budget.
    Usage {
        user: String,
    },
}

/// What a pool user spent in the current budget period, as the worker's metering proxy counted it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageReport {
    /// In millionths of a dollar, estimated from list prices per model family (the proxy sees tokens, not
    /// invoices).
    pub spent_micro_usd: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// The budget in words (`$5.00 a day`), when the operator set one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<String>,
    /// What is left of it, in words (`$3.20`, `120000 tokens`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub left: Option<String>,
    /// When the period starts again (Unix seconds), for budgets per day or month.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resets_at: Option<u64>,
}

/// The agent's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum ProjectReply {
    /// Done; the projects as they are now.
    Ok(ProjectsReport),
    /// Refused, with what to do (for example the allowed folders a path must be inside).
    Refused { message: String },
    /// The answer to [`ProjectOp::Usage`].
    Usage(UsageReport),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AgentMessage, RelayMessage};

    #[test]
    fn project_messages_round_trip_as_frames() {
        let ask = RelayMessage::Project {
            id: 7,
            op: ProjectOp::Add {
                name: "web".into(),
                path: "C:\\src\\web".into(),
            },
        };
        let frame = crate::frame::encode(&ask).unwrap();
        assert_eq!(
            crate::frame::decode::<RelayMessage>(&frame)
                .unwrap()
                .unwrap()
                .0,
            ask
        );
        let report = ProjectsReport {
            projects: vec![ProjectInfo {
                name: "web".into(),
                path: "/mnt/c/src/web".into(),
            }],
            allowed_dirs: vec!["/mnt/c/src".into()],
            accepts_shared: false,
            accepts_files: false,
            pool: false,
        };
        for answer in [
            AgentMessage::ProjectReply {
                id: 7,
                reply: ProjectReply::Ok(report.clone()),
            },
            AgentMessage::ProjectReply {
                id: 8,
                reply: ProjectReply::Usage(UsageReport {
                    spent_micro_usd: 1_250_000,
                    input_tokens: 10,
                    output_tokens: 2,
                    budget: Some("$5.00 a day".into()),
                    left: Some("$3.75".into()),
                    resets_at: Some(1_800_000_000),
                }),
            },
            AgentMessage::ProjectReply {
                id: 8,
                reply: ProjectReply::Refused {
                    message: "outside the allowed folders".into(),
                },
            },
            AgentMessage::Projects(report),
        ] {
            let frame = crate::frame::encode(&answer).unwrap();
            assert_eq!(
                crate::frame::decode::<AgentMessage>(&frame)
                    .unwrap()
                    .unwrap()
                    .0,
                answer
            );
        }
    }

    #[test]
    fn reports_from_older_agents_parse_and_say_no_files() {
        let old: ProjectsReport = serde_json::from_str(
            r#"{"projects":[],"allowed_dirs":["/src"],"accepts_shared":true}"#,
        )
        .unwrap();
        assert!(!old.accepts_files);
        // Unset, it serializes as before, so an older relay reads exactly what it always did.
        let json = serde_json::to_string(&old).unwrap();
        assert_eq!(
            json,
            r#"{"projects":[],"allowed_dirs":["/src"],"accepts_shared":true}"#
        );
        let new = ProjectsReport {
            accepts_files: true,
            ..old
        };
        assert!(serde_json::to_string(&new)
            .unwrap()
            .contains(r#""accepts_files":true"#));
    }
}
