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
}

/// The agent's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum ProjectReply {
    /// Done; the projects as they are now.
    Ok(ProjectsReport),
    /// Refused, with what to do (for example the allowed folders a path must be inside).
    Refused { message: String },
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
        };
        for answer in [
            AgentMessage::ProjectReply {
                id: 7,
                reply: ProjectReply::Ok(report.clone()),
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
