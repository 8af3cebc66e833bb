//! A task's whole output as one Markdown transcript, for `/status` and the "Full output" button: a header
//! (task, project, agent, requester, state, cost and tokens), then the conversation in the order it happened —
//! Claude's text, each tool use and its result as the events carry them, approvals and how they closed, each
//! turn's end, the worktree's diff, and how the task ended.
//!
//! What Claude or a tool wrote is shown as what it is: Claude's own text stays Markdown (it is written to be
//! read that way) but a code block it leaves open is closed where its text ends, so it cannot swallow the rest
//! of the transcript; tool and approval text goes through [`escape`](super::escape) (code blocks that cannot be
//! broken out of, hidden characters written out). Mentions in any of it ping nobody: every message that
//! carries a transcript says so itself (`allowed_mentions` empty).
//!
//! Each event kind has its own function below, so what an event carries can grow (full tool output, diffs)
//! with one function changed.

use std::fmt::Write as _;

use ct_protocol::scope::SessionScope;
use ct_protocol::task::{DiffStat, FinalState, TaskEvent};
use serde_json::Value;

use super::escape::{code_block, inline_code, tool_name, visible};
use super::output::{place, OutputKind, Placement};
use super::tools::ToolOutcome;
use crate::backend::TaskInfo;
use crate::split::open_fence_after;

/// Characters of one tool summary or result shown inline; the events are short summaries already.
const SUMMARY_MAX: usize = 1500;
/// A tool's whole output or diff: the agent already bounds each at 64 KiB.
const OUTPUT_MAX: usize = 70_000;
/// A prompt, whole: the relay takes at most 100 KiB.
const PROMPT_MAX: usize = 110_000;
/// Characters of a diff shown in the transcript (the agent bounds it too; this keeps a file readable).
const DIFF_MAX: usize = 200_000;

/// The transcript of `task` from its stored `events`, as Markdown.
pub fn transcript(task: &TaskInfo, events: &[(u64, TaskEvent)]) -> String {
    let mut out = header(task, events);
    if !task.prompt.trim().is_empty() {
        // The requester's words, shown as exactly what they are (a prompt may hold fences and mentions).
        push(
            &mut out,
            &format!("🗣️ **Asked**\n{}", code_block(&task.prompt, PROMPT_MAX).0),
        );
    }
    let mut text = String::new();
    for (_, event) in events {
        // Long assistant text arrives as several events: shown as one block, closed once at its end.
        if let TaskEvent::Text { text: t } = event {
            text.push_str(t);
            continue;
        }
        if !text.is_empty() {
            push(&mut out, &claude_text(&text));
            text.clear();
        }
        if let Some(block) = event_block(event) {
            push(&mut out, &block);
        }
    }
    if !text.is_empty() {
        push(&mut out, &claude_text(&text));
    }
    if events.is_empty() {
        push(&mut out, "_Nothing was recorded for this task yet._");
    }
    out
}

/// How a transcript goes out: in a couple of messages when it is short, else as `<task>.md` within the
/// upload limit (cut, with a note, when even that is too small).
pub fn deliver(task: &str, transcript: &str, upload_limit: u64) -> Placement {
    place(transcript, OutputKind::Text, task, upload_limit)
}

fn push(out: &mut String, block: &str) {
    if !out.ends_with("\n\n") {
        out.push_str(if out.ends_with('\n') { "\n" } else { "\n\n" });
    }
    out.push_str(block.trim_end_matches('\n'));
    out.push('\n');
}

/// The task, who asked, where it ran, and what it cost (from its turns' ends).
fn header(task: &TaskInfo, events: &[(u64, TaskEvent)]) -> String {
    let (mut cost, mut turns, mut input, mut output) = (0.0, 0u32, 0u64, 0u64);
    for (_, e) in events {
        if let TaskEvent::TurnFinished {
            cost_usd,
            turns: t,
            input_tokens,
            output_tokens,
            ..
        } = e
        {
            // Turns and tokens are each turn's own; the cost is the Claude Code process's running total.
            if let Some(c) = cost_usd {
                cost = *c;
            }
            turns += t.unwrap_or(0);
            input += input_tokens.unwrap_or(0);
            output += output_tokens.unwrap_or(0);
        }
    }
    let mut h = format!(
        "# Task `{}`\n\n**{}** on **{}** · asked by <@{}> · state **{}** · started <t:{}:f>\n",
        visible(&task.id),
        visible(&task.project),
        visible(&task.agent),
        task.requester,
        task.state,
        task.created_at
    );
    let _ = write!(
        h,
        "{turns} turns · ${cost:.4} · {input} tokens in, {output} out"
    );
    if let Some(m) = &task.model {
        let _ = write!(h, " · model {}", inline_code(m, 60));
    }
    if let Some(f) = &task.follows {
        let _ = write!(h, " · continues `{}`", visible(f));
    }
    h.push('\n');
    h
}

/// One event's block; `None` for what a reader gains nothing from.
fn event_block(event: &TaskEvent) -> Option<String> {
    match event {
        TaskEvent::Started { .. } => Some(started()),
        TaskEvent::Session {
            session_id,
            model,
            claude_version,
        } => Some(session(
            session_id,
            model.as_deref(),
            claude_version.as_deref(),
        )),
        TaskEvent::Text { text } => Some(claude_text(text)),
        TaskEvent::Tool {
            name,
            summary,
            auto_allowed,
            command,
            ..
        } => Some(tool(
            name,
            command.as_deref().unwrap_or(summary),
            auto_allowed.as_ref(),
        )),
        TaskEvent::ToolResult { .. } => ToolOutcome::of(event).map(|r| tool_result(&r)),
        TaskEvent::ApprovalRequested {
            tool,
            summary,
            question,
            description,
            input_cut,
            input,
            ..
        } => Some(approval_requested(
            tool,
            summary,
            input,
            *question,
            description.as_deref(),
            *input_cut,
        )),
        TaskEvent::ApprovalClosed { outcome, .. } => Some(approval_closed(outcome)),
        TaskEvent::TurnFinished {
            is_error,
            subtype,
            text,
            ..
        } => turn_finished(*is_error, subtype, text.as_deref()),
        TaskEvent::Worktree {
            branch,
            base,
            note,
            change,
            diff,
            diff_cut,
        } => Some(worktree(
            branch,
            base,
            note.as_deref(),
            change.as_ref(),
            diff.as_deref(),
            *diff_cut,
        )),
        TaskEvent::Finished { state, message } => Some(finished(*state, message.as_deref())),
        // Live figures for the pinned status; the summary at the top has the totals.
        TaskEvent::Context { .. } => None,
    }
}

fn started() -> String {
    "▶️ Claude Code started.".into()
}

fn session(id: &str, model: Option<&str>, version: Option<&str>) -> String {
    let mut s = format!("Session {}", inline_code(id, 80));
    if let Some(m) = model {
        let _ = write!(s, " · model {}", inline_code(m, 60));
    }
    if let Some(v) = version {
        let _ = write!(s, " · Claude Code {}", inline_code(v, 40));
    }
    s
}

/// Claude's words, as Markdown, with a code block it leaves open closed at the end.
fn claude_text(text: &str) -> String {
    let mut t = format!("**Claude:**\n{}", text.trim_end_matches('\n'));
    if open_fence_after(&t).is_some() {
        t.push_str("\n```");
    }
    t
}

fn tool(name: &str, summary: &str, auto_allowed: Option<&SessionScope>) -> String {
    let mut s = format!("🔧 **{}**{}", tool_name(name), one_or_block(summary));
    if auto_allowed.is_some() {
        s.push_str("\n_(allowed without asking, by a rule for this session)_");
    }
    s
}

/// The diff of an edit in a ```diff block, or else the output (whole, as the agent kept it) in a code block,
/// or else the preview older agents send.
fn tool_result(r: &ToolOutcome<'_>) -> String {
    let mut s = match (r.is_error, r.exit_code) {
        (_, Some(code)) if code != 0 => format!("❌ exit {code}"),
        (true, _) => "❌ failed".to_string(),
        (false, Some(_)) => "↳ exit 0".to_string(),
        (false, None) => "↳".to_string(),
    };
    if let Some(diff) = r.diff.filter(|d| !d.trim().is_empty()) {
        let block = code_block(diff.trim_end_matches('\n'), OUTPUT_MAX).0;
        let _ = write!(s, "\n```diff{}", &block[3..]);
        if r.diff_cut {
            s.push_str("\n_(the diff was cut)_");
        }
        return s;
    }
    match r.output {
        Some(out) if out.trim().is_empty() => s.push_str(" (no output)"),
        Some(out) => {
            let _ = write!(
                s,
                "\n{}",
                code_block(out.trim_end_matches('\n'), OUTPUT_MAX).0
            );
            if let Some(n) = r.output_bytes {
                let _ = write!(
                    s,
                    "\n_(cut: the tool printed {n} bytes; the agent kept its start and end)_"
                );
            }
        }
        None => s.push_str(&one_or_block(r.summary)),
    }
    s
}

fn approval_requested(
    tool: &str,
    summary: &str,
    input: &Value,
    question: bool,
    description: Option<&str>,
    input_cut: bool,
) -> String {
    let what = if question {
        "❓ Claude asked"
    } else {
        "🔐 Approval asked for"
    };
    let mut s = format!("{what} **{}**", tool_name(tool));
    // What runs (the command, the file), never only Claude's description of it.
    let shown = input
        .get("command")
        .and_then(Value::as_str)
        .unwrap_or(summary);
    s.push_str(&one_or_block(shown));
    if let Some(d) = description.filter(|d| !d.trim().is_empty()) {
        let _ = write!(s, "\nClaude says it is to: {}", inline_code(d, 300));
    }
    if input_cut {
        s.push_str("\n_(the request was too long to show whole)_");
    }
    s
}

fn approval_closed(outcome: &str) -> String {
    format!(
        "🔓 Approval closed: {}",
        inline_code(&outcome.replace('_', " "), 200)
    )
}

/// A turn's end: errors shown with what Claude Code said; a normal end is a rule between turns.
fn turn_finished(is_error: bool, subtype: &str, text: Option<&str>) -> Option<String> {
    if !is_error {
        return Some("───".into());
    }
    let mut s = format!(
        "⚠️ The turn ended with an error ({})",
        inline_code(subtype, 60)
    );
    if let Some(t) = text.filter(|t| !t.trim().is_empty()) {
        let _ = write!(s, "\n{}", code_block(t, SUMMARY_MAX).0);
    }
    Some(s)
}

fn worktree(
    branch: &str,
    base: &str,
    note: Option<&str>,
    change: Option<&DiffStat>,
    diff: Option<&str>,
    diff_cut: bool,
) -> String {
    let mut s = format!(
        "🌿 Worktree branch {} from {}",
        inline_code(branch, 100),
        inline_code(&base.chars().take(12).collect::<String>(), 20)
    );
    if let Some(n) = note {
        let _ = write!(s, "\n{}", inline_code(n, 500));
    }
    if let Some(c) = change {
        let _ = write!(
            s,
            "\n{} files changed, +{} −{}",
            c.files_changed, c.insertions, c.deletions
        );
    }
    if let Some(d) = diff.filter(|d| !d.is_empty()) {
        let (block, cut) = code_block(d, DIFF_MAX);
        let _ = write!(s, "\n{}", block.replacen("```\n", "```diff\n", 1));
        if cut || diff_cut {
            s.push_str("\n_(the diff was cut)_");
        }
    }
    s
}

fn finished(state: FinalState, message: Option<&str>) -> String {
    let words = match state {
        FinalState::Done => "✅ Done.",
        FinalState::Failed => "❌ Failed.",
        FinalState::Cancelled => "⏹️ Cancelled.",
    };
    match message.filter(|m| !m.trim().is_empty()) {
        Some(m) => format!("{words} {}", inline_code(m, 1000)),
        None => words.into(),
    }
}

/// One line as inline code after a space; several as a code block on lines of its own (a fence only counts
/// at the start of a line), which cannot be broken out of.
fn one_or_block(text: &str) -> String {
    if text.contains('\n') {
        format!("\n{}", code_block(text, SUMMARY_MAX).0)
    } else {
        format!(" {}", inline_code(text, SUMMARY_MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::split::split;

    fn info() -> TaskInfo {
        TaskInfo {
            id: "t_1".into(),
            project: "app".into(),
            agent: "laptop".into(),
            requester: "42".into(),
            owner: "42".into(),
            state: "done".into(),
            created_at: 1_700_000_000,
            session_id: None,
            model: None,
            mode: None,
            follows: None,
            prompt: "write hello.txt\n```\n@everyone".into(),
        }
    }

    fn events(list: Vec<TaskEvent>) -> Vec<(u64, TaskEvent)> {
        list.into_iter().zip(1..).map(|(e, n)| (n, e)).collect()
    }

    #[test]
    fn every_kind_of_event_is_shown_in_order() {
        let t = transcript(
            &info(),
            &events(vec![
                TaskEvent::Started {
                    cwd: "/secret/path".into(),
                },
                TaskEvent::Text {
                    text: "I will write ".into(),
                },
                TaskEvent::Text {
                    text: "hello.txt".into(),
                },
                TaskEvent::ApprovalRequested {
                    approval: "a1".into(),
                    tool: "Bash".into(),
                    summary: "echo hi".into(),
                    input: serde_json::json!({"command": "echo hi"}),
                    question: false,
                    description: Some("say hi".into()),
                    session: None,
                    input_cut: false,
                },
                TaskEvent::ApprovalClosed {
                    approval: "a1".into(),
                    outcome: "allowed_once".into(),
                },
                TaskEvent::Tool {
                    name: "Bash".into(),
                    summary: "echo hi".into(),
                    auto_allowed: None,
                    id: None,
                    command: None,
                },
                TaskEvent::ToolResult {
                    is_error: true,
                    summary: "exit 1\nno such file".into(),
                    tool_use_id: None,
                    output: None,
                    output_bytes: None,
                    exit_code: None,
                    diff: None,
                    diff_cut: false,
                },
                TaskEvent::TurnFinished {
                    is_error: false,
                    subtype: "success".into(),
                    text: Some("done".into()),
                    cost_usd: Some(0.5),
                    turns: Some(3),
                    input_tokens: Some(10),
                    output_tokens: Some(20),
                    duration_ms: None,
                },
                TaskEvent::Finished {
                    state: FinalState::Done,
                    message: None,
                },
            ]),
        );
        let order = [
            "# Task `t_1`",
            "3 turns · $0.5000 · 10 tokens in, 20 out",
            // The prompt, whole, in a block its own fence cannot end.
            "🗣️ **Asked**\n```\nwrite hello.txt\n`\u{200b}`\u{200b}`\n@everyone\n```",
            "**Claude:**\nI will write hello.txt",
            "🔐 Approval asked for **Bash** `echo hi`",
            "Claude says it is to: `say hi`",
            "🔓 Approval closed: `allowed once`",
            "🔧 **Bash** `echo hi`",
            "❌ failed\n```\nexit 1\nno such file\n```",
            "───",
            "✅ Done.",
        ];
        let mut from = 0;
        for want in order {
            let at = t[from..]
                .find(want)
                .unwrap_or_else(|| panic!("{want:?} missing after {from} in:\n{t}"));
            from += at + want.len();
        }
        // The agent's folders are not part of what a grantee may read.
        assert!(!t.contains("/secret/path"), "{t}");
    }

    #[test]
    fn an_open_code_block_in_claudes_text_is_closed_where_the_text_ends() {
        let t = transcript(
            &info(),
            &events(vec![
                TaskEvent::Text {
                    text: "look:\n```rust\nfn main() {".into(),
                },
                TaskEvent::Tool {
                    name: "Read".into(),
                    summary: "src/main.rs".into(),
                    auto_allowed: None,
                    id: None,
                    command: None,
                },
            ]),
        );
        assert_eq!(open_fence_after(&t), None, "{t}");
        let tool_line = t.lines().find(|l| l.starts_with("🔧")).unwrap();
        assert_eq!(tool_line, "🔧 **Read** `src/main.rs`");
        // Outside any block: the line before the tool is the closing fence and a blank line.
        assert!(t.contains("fn main() {\n```\n\n🔧"), "{t}");
    }

    #[test]
    fn tool_text_cannot_break_out_or_hide_what_it_is() {
        let t = transcript(
            &info(),
            &events(vec![
                TaskEvent::Tool {
                    name: "Bash".into(),
                    summary: "echo ```\n@everyone <@1> rm -rf ~/\u{202E}txt.dab".into(),
                    auto_allowed: None,
                    id: None,
                    command: None,
                },
                TaskEvent::ToolResult {
                    is_error: false,
                    summary: "``` **bold**".into(),
                    tool_use_id: None,
                    output: None,
                    output_bytes: None,
                    exit_code: None,
                    diff: None,
                    diff_cut: false,
                },
            ]),
        );
        // Every code block opened is closed, and the hidden character is written out.
        assert_eq!(open_fence_after(&t), None, "{t}");
        assert!(t.contains("<U+202E>") && !t.contains('\u{202E}'), "{t}");
        assert!(t.contains("↳ `ˋˋˋ **bold**`"), "{t}");
    }

    #[test]
    fn a_long_transcript_becomes_a_file_and_a_short_one_messages() {
        let short = transcript(
            &info(),
            &events(vec![TaskEvent::Text { text: "hi".into() }]),
        );
        match deliver("t_1", &short, 10_000_000) {
            Placement::Messages(m) => {
                assert!(m.iter().all(|m| m.chars().count() <= 2000));
                assert!(m.concat().contains("hi"));
            }
            other => panic!("expected messages: {other:?}"),
        }
        let long_text = "a line of Claude's output\n".repeat(400);
        let long = transcript(
            &info(),
            &events(vec![TaskEvent::Text {
                text: long_text.clone(),
            }]),
        );
        assert!(split(&long).len() > 2);
        match deliver("t_1", &long, 10_000_000) {
            Placement::Attachment { filename, data, .. } => {
                assert_eq!(filename, "t_1.md");
                assert_eq!(data, long.as_bytes());
            }
            other => panic!("expected a file: {other:?}"),
        }
    }
}
