//! What a button, select menu or modal means, carried in its `custom_id` (Discord gives it back verbatim
//! on a click, and allows at most 100 characters).
//!
//! Format: a two-letter verb, then fields separated by `:`, the approval id last so it may itself contain
//! `:` (it comes from the agent). Task ids never contain `:`. Anything that does not parse is a stale or
//! foreign component, and the handler says so instead of guessing.

use std::fmt;

/// Discord's limit on `custom_id`.
pub const CUSTOM_ID_MAX: usize = 100;

/// How far an approval reaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// This one tool use.
    Once,
    /// The same use (this command, file, site or input) for the rest of the session.
    Session,
    /// Bash: simple commands starting with this command's first word, for the rest of the session.
    FirstWord,
}

/// The action behind a component.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// "Allow once" / "Allow for session".
    Allow {
        task: String,
        approval: String,
        scope: Scope,
    },
    /// "Allow a prefix…": opens the prefix modal.
    Prefix { task: String, approval: String },
    /// The prefix modal, submitted.
    PrefixText { task: String, approval: String },
    /// "Deny": opens the reason modal.
    Deny { task: String, approval: String },
    /// The reason modal, submitted.
    DenyReason { task: String, approval: String },
    /// A choice in the select menu of AskUserQuestion question `question`.
    Answer {
        task: String,
        approval: String,
        question: u8,
    },
    /// "Other…" for question `question`: opens a free-text modal.
    AnswerOther {
        task: String,
        approval: String,
        question: u8,
    },
    /// The free-text modal for question `question`, submitted.
    AnswerText {
        task: String,
        approval: String,
        question: u8,
    },
    /// The Stop button of a task.
    Stop { task: String },
    /// Merge / Keep / Discard on a finished task's worktree branch.
    Worktree {
        task: String,
        action: ct_protocol::task::WorktreeAction,
    },
    /// "Full output" on a task's summary: its whole transcript, as `/status` gives it.
    FullOutput { task: String },
}

/// Previous / Next under a `/tasks` list: the page to show and the filters it was listed with. Not an
/// [`Action`], which is always about one task. Format: `tl:PAGE:STATE:AGENT` (empty for no filter; the agent
/// last, so its name may hold `:`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryPage {
    /// From 0.
    pub page: u32,
    pub state: Option<String>,
    pub agent: Option<String>,
}

impl HistoryPage {
    /// The `custom_id`, or why it does not fit.
    pub fn encode(&self) -> Result<String, EncodeError> {
        let id = format!(
            "tl:{}:{}:{}",
            self.page,
            self.state.as_deref().unwrap_or(""),
            self.agent.as_deref().unwrap_or("")
        );
        let n = id.chars().count();
        if n > CUSTOM_ID_MAX {
            return Err(EncodeError::TooLong(n));
        }
        Ok(id)
    }

    /// The page a `custom_id` stands for, if it is a `/tasks` page button.
    pub fn parse(id: &str) -> Option<Self> {
        let rest = id.strip_prefix("tl:")?;
        let (page, rest) = rest.split_once(':')?;
        let (state, agent) = rest.split_once(':')?;
        let some = |s: &str| (!s.is_empty()).then(|| s.to_string());
        if state.contains(|c: char| !c.is_ascii_lowercase() && c != '_') {
            return None;
        }
        Some(Self {
            page: page.parse().ok()?,
            state: some(state),
            agent: some(agent),
        })
    }
}

/// Why an action cannot be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("custom_id would be {0} characters, over Discord's {CUSTOM_ID_MAX}")]
    TooLong(usize),
    #[error("task id {0:?} contains ':'")]
    BadTask(String),
}

impl Action {
    /// The `custom_id` for this action, or an error if the ids do not fit.
    pub fn encode(&self) -> Result<String, EncodeError> {
        let task = self.task();
        if task.contains(':') {
            return Err(EncodeError::BadTask(task.to_string()));
        }
        let id = self.to_string();
        let n = id.chars().count();
        if n > CUSTOM_ID_MAX {
            return Err(EncodeError::TooLong(n));
        }
        Ok(id)
    }

    /// The action a `custom_id` stands for, if it is one of ours.
    pub fn parse(id: &str) -> Option<Self> {
        let (verb, rest) = id.split_once(':')?;
        let task_approval = |s: &str| -> Option<(String, String)> {
            let (t, a) = s.split_once(':')?;
            (!t.is_empty() && !a.is_empty()).then(|| (t.to_string(), a.to_string()))
        };
        let question = |s: &str| -> Option<(u8, String, String)> {
            let (q, rest) = s.split_once(':')?;
            let (t, a) = task_approval(rest)?;
            Some((q.parse().ok()?, t, a))
        };
        Some(match verb {
            "ao" | "as" | "aw" => {
                let (task, approval) = task_approval(rest)?;
                Self::Allow {
                    task,
                    approval,
                    scope: match verb {
                        "ao" => Scope::Once,
                        "as" => Scope::Session,
                        _ => Scope::FirstWord,
                    },
                }
            }
            "ap" => {
                let (task, approval) = task_approval(rest)?;
                Self::Prefix { task, approval }
            }
            "pp" => {
                let (task, approval) = task_approval(rest)?;
                Self::PrefixText { task, approval }
            }
            "dn" => {
                let (task, approval) = task_approval(rest)?;
                Self::Deny { task, approval }
            }
            "dr" => {
                let (task, approval) = task_approval(rest)?;
                Self::DenyReason { task, approval }
            }
            "qa" | "qo" | "qt" => {
                let (question, task, approval) = question(rest)?;
                match verb {
                    "qa" => Self::Answer {
                        task,
                        approval,
                        question,
                    },
                    "qo" => Self::AnswerOther {
                        task,
                        approval,
                        question,
                    },
                    _ => Self::AnswerText {
                        task,
                        approval,
                        question,
                    },
                }
            }
            "st" if !rest.is_empty() && !rest.contains(':') => Self::Stop {
                task: rest.to_string(),
            },
            "fo" if !rest.is_empty() && !rest.contains(':') => Self::FullOutput {
                task: rest.to_string(),
            },
            "wm" | "wk" | "wd" if !rest.is_empty() && !rest.contains(':') => Self::Worktree {
                task: rest.to_string(),
                action: match verb {
                    "wm" => ct_protocol::task::WorktreeAction::Merge,
                    "wk" => ct_protocol::task::WorktreeAction::Keep,
                    _ => ct_protocol::task::WorktreeAction::Discard,
                },
            },
            _ => return None,
        })
    }

    /// The task the action is about.
    pub fn task(&self) -> &str {
        match self {
            Self::Allow { task, .. }
            | Self::Prefix { task, .. }
            | Self::PrefixText { task, .. }
            | Self::Deny { task, .. }
            | Self::DenyReason { task, .. }
            | Self::Answer { task, .. }
            | Self::AnswerOther { task, .. }
            | Self::AnswerText { task, .. }
            | Self::Stop { task }
            | Self::FullOutput { task }
            | Self::Worktree { task, .. } => task,
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Allow {
                task,
                approval,
                scope,
            } => {
                let verb = match scope {
                    Scope::Once => "ao",
                    Scope::Session => "as",
                    Scope::FirstWord => "aw",
                };
                write!(f, "{verb}:{task}:{approval}")
            }
            Self::Prefix { task, approval } => write!(f, "ap:{task}:{approval}"),
            Self::PrefixText { task, approval } => write!(f, "pp:{task}:{approval}"),
            Self::Deny { task, approval } => write!(f, "dn:{task}:{approval}"),
            Self::DenyReason { task, approval } => write!(f, "dr:{task}:{approval}"),
            Self::Answer {
                task,
                approval,
                question,
            } => write!(f, "qa:{question}:{task}:{approval}"),
            Self::AnswerOther {
                task,
                approval,
                question,
            } => write!(f, "qo:{question}:{task}:{approval}"),
            Self::AnswerText {
                task,
                approval,
                question,
            } => write!(f, "qt:{question}:{task}:{approval}"),
            Self::Stop { task } => write!(f, "st:{task}"),
            Self::FullOutput { task } => write!(f, "fo:{task}"),
            Self::Worktree { task, action } => {
                let verb = match action {
                    ct_protocol::task::WorktreeAction::Merge => "wm",
                    ct_protocol::task::WorktreeAction::Keep => "wk",
                    ct_protocol::task::WorktreeAction::Discard => "wd",
                };
                write!(f, "{verb}:{task}")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn every_action_round_trips() {
        let (t, a) = ("t_k3m9x2ab".to_string(), "toolu_01ABC:weird".to_string());
        for action in [
            Action::Allow {
                task: t.clone(),
                approval: a.clone(),
                scope: Scope::Once,
            },
            Action::Allow {
                task: t.clone(),
                approval: a.clone(),
                scope: Scope::Session,
            },
            Action::Allow {
                task: t.clone(),
                approval: a.clone(),
                scope: Scope::FirstWord,
            },
            Action::Prefix {
                task: t.clone(),
                approval: a.clone(),
            },
            Action::PrefixText {
                task: t.clone(),
                approval: a.clone(),
            },
            Action::Deny {
                task: t.clone(),
                approval: a.clone(),
            },
            Action::DenyReason {
                task: t.clone(),
                approval: a.clone(),
            },
            Action::Answer {
                task: t.clone(),
                approval: a.clone(),
                question: 3,
            },
            Action::AnswerOther {
                task: t.clone(),
                approval: a.clone(),
                question: 0,
            },
            Action::AnswerText {
                task: t.clone(),
                approval: a.clone(),
                question: 1,
            },
            Action::Stop { task: t.clone() },
            Action::FullOutput { task: t.clone() },
            Action::Worktree {
                task: t.clone(),
                action: ct_protocol::task::WorktreeAction::Merge,
            },
            Action::Worktree {
                task: t.clone(),
                action: ct_protocol::task::WorktreeAction::Keep,
            },
            Action::Worktree {
                task: t.clone(),
                action: ct_protocol::task::WorktreeAction::Discard,
            },
        ] {
            let id = action.encode().unwrap();
            assert!(id.len() <= CUSTOM_ID_MAX);
            assert_eq!(Action::parse(&id), Some(action), "{id}");
        }
    }

    #[test]
    fn refuses_what_does_not_fit() {
        let long = Action::Deny {
            task: "t_1".into(),
            approval: "a".repeat(98),
        };
        assert_eq!(long.encode(), Err(EncodeError::TooLong(105)));
        let colon = Action::Stop { task: "t:1".into() };
        assert!(matches!(colon.encode(), Err(EncodeError::BadTask(_))));
    }

    #[test]
    fn foreign_ids_do_not_parse() {
        for id in [
            "", "st", "st:", "xx:t:a", "ao:t_1", "ao::a", "qa:x:t:a", "qa:1:t", "st:a:b", "wm:",
            "wd:a:b", "fo:", "fo:a:b",
        ] {
            assert_eq!(Action::parse(id), None, "{id:?}");
        }
    }

    #[test]
    fn history_pages_round_trip_and_foreign_ids_do_not_parse() {
        for page in [
            HistoryPage {
                page: 0,
                state: None,
                agent: None,
            },
            HistoryPage {
                page: 7,
                state: Some("waiting_approval".into()),
                agent: Some("desk:top".into()),
            },
        ] {
            let id = page.encode().unwrap();
            assert_eq!(HistoryPage::parse(&id), Some(page), "{id}");
            // Never taken for a task's action, nor the other way round.
            assert_eq!(Action::parse(&id), None);
        }
        for id in ["tl:", "tl:x::", "tl:1", "tl:1:", "st:t_1", "tl:1:Bad!:a"] {
            assert_eq!(HistoryPage::parse(id), None, "{id:?}");
        }
        let long = HistoryPage {
            page: 1,
            state: None,
            agent: Some("a".repeat(100)),
        };
        assert!(matches!(long.encode(), Err(EncodeError::TooLong(_))));
    }

    proptest! {
        #[test]
        fn parse_never_panics(id in ".{0,120}") {
            let _ = Action::parse(&id);
        }

        #[test]
        fn approvals_with_any_text_round_trip(task in "t_[a-z0-9]{1,12}", approval in "[^\\x00]{1,60}", q in 0u8..4) {
            let action = Action::Answer { task, approval, question: q };
            if let Ok(id) = action.encode() {
                prop_assert_eq!(Action::parse(&id), Some(action));
            }
        }
    }
}
