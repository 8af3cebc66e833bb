//! Approval requests in a task thread.
//!
//! A tool approval is a message with three buttons — Allow once, Allow for session, Deny (which opens a
//! modal for the reason Claude is told). An AskUserQuestion request is one select menu per question (the
//! option's index is the value) plus "Answer in words" buttons that open a free-text modal. When the
//! approval closes (decided, timed out, withdrawn by Claude Code) the same components are shown disabled
//! with what happened, so nobody clicks a dead button. Every task message also carries a Stop button.

use serde_json::Value;
use serenity::all::{
    ButtonStyle, CreateActionRow, CreateButton, CreateInputText, CreateModal, CreateSelectMenu,
    CreateSelectMenuKind, CreateSelectMenuOption, InputTextStyle, UserId,
};

use super::truncate;
use crate::custom_id::{Action, EncodeError, Scope};

/// How much of a tool's input is shown for the person deciding.
const INPUT_PREVIEW: usize = 900;
/// Selects plus one row of "answer in words" buttons must fit Discord's 5 rows.
const MAX_QUESTIONS: usize = 4;
const OPTIONS_MAX: usize = 25;
/// Longest reason or free-text answer taken from a modal.
const FREE_TEXT_MAX: u16 = 1000;

/// An open approval, as the bot shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct ApprovalView {
    pub task: String,
    pub approval: String,
    pub tool: String,
    pub summary: String,
    pub input: Value,
    /// AskUserQuestion: answered with choices, not allow/deny.
    pub question: bool,
    /// Who may answer (the owner, or a trusted grantee).
    pub decider: UserId,
}

/// One AskUserQuestion question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Question {
    pub text: String,
    pub header: Option<String>,
    pub options: Vec<(String, Option<String>)>,
    pub multi: bool,
}

/// The questions of an AskUserQuestion input (`{"questions": [{"question", "header", "options": [{"label",
/// "description"}], "multiSelect"}]}`); empty if the input has another shape.
pub fn questions(input: &Value) -> Vec<Question> {
    input["questions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|q| {
            Some(Question {
                text: q["question"].as_str()?.to_string(),
                header: q["header"].as_str().map(str::to_string),
                options: q["options"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|o| {
                        Some((
                            o["label"].as_str()?.to_string(),
                            o["description"].as_str().map(str::to_string),
                        ))
                    })
                    .collect(),
                multi: q["multiSelect"].as_bool().unwrap_or(false),
            })
        })
        .collect()
}

/// How an approval ended, from the agent's `ApprovalClosed.outcome`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Closed {
    Allowed,
    AllowedForSession,
    Denied,
    Answered,
    TimedOut,
    Withdrawn,
    Other(String),
}

impl Closed {
    pub fn from_outcome(outcome: &str) -> Self {
        match outcome {
            "allowed" => Self::Allowed,
            "allowed_for_session" => Self::AllowedForSession,
            "denied" => Self::Denied,
            "answered" => Self::Answered,
            "timed_out" => Self::TimedOut,
            "withdrawn" => Self::Withdrawn,
            other => Self::Other(other.to_string()),
        }
    }

    fn line(&self) -> String {
        match self {
            Self::Allowed => "✅ Allowed once".into(),
            Self::AllowedForSession => "✅ Allowed for this session".into(),
            Self::Denied => "🚫 Denied".into(),
            Self::Answered => "💬 Answered".into(),
            Self::TimedOut => "⌛ Timed out: nobody answered in time".into(),
            Self::Withdrawn => "↩️ Withdrawn: Claude Code no longer needs it".into(),
            Self::Other(o) => format!("Closed: {}", truncate(o, 100)),
        }
    }
}

fn preview(input: &Value) -> String {
    let text = serde_json::to_string_pretty(input).unwrap_or_default();
    // Inside a code block a ``` would end it early.
    truncate(&text.replace("```", "ˋˋˋ"), INPUT_PREVIEW)
}

fn header(view: &ApprovalView) -> String {
    let what = super::progress::tool_line(&view.tool, &view.summary);
    let kind = if view.question {
        "Claude has a question"
    } else {
        "Approval needed"
    };
    format!(
        "✋ **{kind}** · `{}` · for <@{}>\n{what}",
        view.task, view.decider
    )
}

/// The message content for an open approval.
pub fn approval_content(view: &ApprovalView) -> String {
    let mut out = header(view);
    if view.question {
        for (i, q) in questions(&view.input)
            .iter()
            .take(MAX_QUESTIONS)
            .enumerate()
        {
            out.push_str(&format!("\n**{}.** {}", i + 1, truncate(&q.text, 300)));
        }
    } else if !view.input.is_null() {
        out.push_str(&format!("\n```json\n{}\n```", preview(&view.input)));
    }
    out
}

/// The components of an approval message; `disabled` for the closed version.
pub fn approval_components(
    view: &ApprovalView,
    disabled: bool,
) -> Result<Vec<CreateActionRow>, EncodeError> {
    let (task, approval) = (view.task.clone(), view.approval.clone());
    if !view.question {
        let allow = |scope| Action::Allow {
            task: task.clone(),
            approval: approval.clone(),
            scope,
        };
        let buttons = vec![
            CreateButton::new(allow(Scope::Once).encode()?)
                .label("Allow once")
                .style(ButtonStyle::Success)
                .disabled(disabled),
            CreateButton::new(allow(Scope::Session).encode()?)
                .label("Allow for session")
                .style(ButtonStyle::Primary)
                .disabled(disabled),
            CreateButton::new(
                Action::Deny {
                    task: task.clone(),
                    approval: approval.clone(),
                }
                .encode()?,
            )
            .label("Deny")
            .style(ButtonStyle::Danger)
            .disabled(disabled),
        ];
        return Ok(vec![CreateActionRow::Buttons(buttons)]);
    }
    let qs = questions(&view.input);
    let mut rows = Vec::new();
    let mut words = Vec::new();
    for (i, q) in qs.iter().take(MAX_QUESTIONS).enumerate() {
        let question = i as u8;
        if !q.options.is_empty() {
            let options: Vec<_> = q
                .options
                .iter()
                .take(OPTIONS_MAX)
                .enumerate()
                .map(|(j, (label, desc))| {
                    let o = CreateSelectMenuOption::new(truncate(label, 100), j.to_string());
                    match desc {
                        Some(d) => o.description(truncate(d, 100)),
                        None => o,
                    }
                })
                .collect();
            let n = options.len() as u8;
            let placeholder = q.header.clone().unwrap_or_else(|| q.text.clone());
            let id = Action::Answer {
                task: task.clone(),
                approval: approval.clone(),
                question,
            }
            .encode()?;
            let menu = CreateSelectMenu::new(id, CreateSelectMenuKind::String { options })
                .placeholder(truncate(&format!("{}. {placeholder}", i + 1), 150))
                .min_values(1)
                .max_values(if q.multi { n } else { 1 })
                .disabled(disabled);
            rows.push(CreateActionRow::SelectMenu(menu));
        }
        let label = if qs.len() == 1 {
            "Answer in words".to_string()
        } else {
            format!("Answer {} in words", i + 1)
        };
        words.push(
            CreateButton::new(
                Action::AnswerOther {
                    task: task.clone(),
                    approval: approval.clone(),
                    question,
                }
                .encode()?,
            )
            .label(label)
            .style(ButtonStyle::Secondary)
            .disabled(disabled),
        );
    }
    if words.is_empty() {
        // A question we cannot read: still let the person answer in words.
        words.push(
            CreateButton::new(
                Action::AnswerOther {
                    task,
                    approval,
                    question: 0,
                }
                .encode()?,
            )
            .label("Answer in words")
            .style(ButtonStyle::Secondary)
            .disabled(disabled),
        );
    }
    rows.push(CreateActionRow::Buttons(words));
    Ok(rows)
}

/// The content once the approval has closed (`by`: who decided, when known).
pub fn closed_content(view: &ApprovalView, closed: &Closed, by: Option<UserId>) -> String {
    let by = by.map_or_else(String::new, |u| format!(" by <@{u}>"));
    format!("{}\n{}{by}", header(view), closed.line())
}

/// The modal that asks why a tool use is denied (the reason is passed to Claude).
pub fn deny_modal(task: &str, approval: &str) -> Result<CreateModal, EncodeError> {
    let id = Action::DenyReason {
        task: task.into(),
        approval: approval.into(),
    }
    .encode()?;
    let input = CreateInputText::new(
        InputTextStyle::Paragraph,
        "Reason (Claude is told)",
        "reason",
    )
    .placeholder("e.g. not on the main branch; use a feature branch")
    .required(false)
    .max_length(FREE_TEXT_MAX);
    Ok(CreateModal::new(id, "Deny this tool use")
        .components(vec![CreateActionRow::InputText(input)]))
}

/// The free-text modal for question `question` of an AskUserQuestion.
pub fn answer_modal(
    task: &str,
    approval: &str,
    question: u8,
    text: &str,
) -> Result<CreateModal, EncodeError> {
    let id = Action::AnswerText {
        task: task.into(),
        approval: approval.into(),
        question,
    }
    .encode()?;
    let label = if text.is_empty() {
        "Your answer".to_string()
    } else {
        truncate(text, 45)
    };
    let input = CreateInputText::new(InputTextStyle::Paragraph, label, "answer")
        .required(true)
        .max_length(FREE_TEXT_MAX);
    Ok(CreateModal::new(id, "Answer Claude").components(vec![CreateActionRow::InputText(input)]))
}

/// The Stop button of a task.
pub fn stop_button(task: &str, disabled: bool) -> Result<CreateButton, EncodeError> {
    Ok(
        CreateButton::new(Action::Stop { task: task.into() }.encode()?)
            .label("Stop")
            .emoji('⏹')
            .style(ButtonStyle::Danger)
            .disabled(disabled),
    )
}

/// What someone else sees when they click an approval that is not theirs (ephemeral).
pub fn not_yours(decider: UserId) -> String {
    format!("This approval is for <@{decider}>: only they can answer it.")
}

#[cfg(test)]
mod tests {
    use ct_testkit::discord::limits;
    use serde_json::json;
    use serenity::all::CreateInteractionResponse;

    use super::*;

    fn view(question: bool, input: Value) -> ApprovalView {
        ApprovalView {
            task: "t_k3m9x2ab".into(),
            approval: "toolu_01AbCdEfGhIjKlMnOpQrStUv".into(),
            tool: if question { "AskUserQuestion" } else { "Write" }.into(),
            summary: "src/lib.rs".into(),
            input,
            question,
            decider: UserId::new(42),
        }
    }

    fn message_json(content: String, rows: Vec<CreateActionRow>) -> Value {
        json!({"content": content, "components": rows})
    }

    fn ids(v: &Value) -> Vec<(String, bool)> {
        v["components"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|r| r["components"].as_array().unwrap().clone())
            .map(|c| {
                (
                    c["custom_id"].as_str().unwrap().to_string(),
                    c["disabled"] == true,
                )
            })
            .collect()
    }

    #[test]
    fn tool_approval_has_three_buttons_that_parse_back() {
        let v = view(
            false,
            json!({"file_path": "src/lib.rs", "content": "x".repeat(5000)}),
        );
        let msg = message_json(
            approval_content(&v),
            approval_components(&v, false).unwrap(),
        );
        limits::check_message(&msg, 0, false).unwrap();
        assert!(msg["content"].as_str().unwrap().contains("for <@42>"));
        let actions: Vec<Action> = ids(&msg)
            .iter()
            .map(|(id, _)| Action::parse(id).unwrap())
            .collect();
        assert_eq!(
            actions,
            vec![
                Action::Allow {
                    task: v.task.clone(),
                    approval: v.approval.clone(),
                    scope: Scope::Once
                },
                Action::Allow {
                    task: v.task.clone(),
                    approval: v.approval.clone(),
                    scope: Scope::Session
                },
                Action::Deny {
                    task: v.task.clone(),
                    approval: v.approval.clone()
                },
            ]
        );
        assert!(ids(&msg).iter().all(|(_, disabled)| !disabled));
    }

    #[test]
    fn closed_approval_disables_everything_and_says_what_happened() {
        let v = view(false, json!({}));
        let msg = message_json(
            closed_content(&v, &Closed::from_outcome("timed_out"), None),
            approval_components(&v, true).unwrap(),
        );
        limits::check_message(&msg, 0, false).unwrap();
        assert!(ids(&msg).iter().all(|(_, disabled)| *disabled));
        assert!(msg["content"]
            .as_str()
            .unwrap()
            .ends_with("⌛ Timed out: nobody answered in time"));
        let decided = closed_content(
            &v,
            &Closed::from_outcome("allowed_for_session"),
            Some(UserId::new(7)),
        );
        assert!(decided.ends_with("✅ Allowed for this session by <@7>"));
        assert_eq!(Closed::from_outcome("weird"), Closed::Other("weird".into()));
    }

    #[test]
    fn ask_user_question_becomes_select_menus_within_limits() {
        let opts = |n: usize| {
            (0..n).map(|i| json!({"label": format!("Option {i} {}", "l".repeat(150)), "description": "d".repeat(300)})).collect::<Vec<_>>()
        };
        let input = json!({"questions": [
            {"question": "Which database?", "header": "DB", "options": opts(30), "multiSelect": false},
            {"question": "Which features?", "header": "Features", "options": opts(3), "multiSelect": true},
            {"question": "q3", "options": opts(2)}, {"question": "q4", "options": opts(2)},
            {"question": "q5 (one too many)", "options": opts(2)},
        ]});
        let v = view(true, input);
        let rows = approval_components(&v, false).unwrap();
        let msg = message_json(approval_content(&v), rows);
        if let Err(e) = limits::check_message(&msg, 0, false) {
            panic!("{}", e.body);
        }
        let comps = msg["components"].as_array().unwrap();
        assert_eq!(
            comps.len(),
            5,
            "4 menus and a row of answer-in-words buttons"
        );
        assert_eq!(
            comps[0]["components"][0]["options"]
                .as_array()
                .unwrap()
                .len(),
            25
        );
        assert_eq!(comps[0]["components"][0]["max_values"], 1);
        assert_eq!(
            comps[1]["components"][0]["max_values"], 3,
            "multiSelect allows all"
        );
        assert_eq!(comps[4]["components"].as_array().unwrap().len(), 4);
        assert_eq!(
            Action::parse(comps[1]["components"][0]["custom_id"].as_str().unwrap()),
            Some(Action::Answer {
                task: v.task.clone(),
                approval: v.approval.clone(),
                question: 1
            })
        );
        // An input we cannot read still offers a way to answer.
        let odd = view(true, json!({"something": "else"}));
        let rows = serde_json::to_value(approval_components(&odd, false).unwrap()).unwrap();
        assert_eq!(rows.as_array().unwrap().len(), 1);
    }

    #[test]
    fn modals_and_stop_button_are_valid() {
        for modal in [
            deny_modal("t_1", "a1").unwrap(),
            answer_modal("t_1", "a1", 2, &"a very long question ".repeat(10)).unwrap(),
        ] {
            let v = serde_json::to_value(CreateInteractionResponse::Modal(modal)).unwrap();
            assert_eq!(v["type"], 9);
            if let Err(e) = limits::check_modal(&v["data"]) {
                panic!("{}", e.body);
            }
            assert!(Action::parse(v["data"]["custom_id"].as_str().unwrap()).is_some());
        }
        let row = CreateActionRow::Buttons(vec![stop_button("t_1", false).unwrap()]);
        let msg = message_json("x".into(), vec![row]);
        limits::check_message(&msg, 0, false).unwrap();
        assert_eq!(ids(&msg)[0].0, "st:t_1");
        assert_eq!(
            not_yours(UserId::new(5)),
            "This approval is for <@5>: only they can answer it."
        );
    }
}
