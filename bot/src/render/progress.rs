//! The live progress message of a task: fed [`TaskEvent`]s, rendered as a few compact lines, and edited
//! no more than about once a second (Discord allows ~5 edits per 5 s per channel; the thread also gets
//! text messages, so the progress message must leave room).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use ct_protocol::task::{FinalState, TaskEvent};

use super::escape::{inline_code, tool_name};
use super::{human_duration, truncate};

/// Tool lines kept on the message; older ones are counted, not shown.
pub const RECENT_TOOLS: usize = 6;
/// How much of a tool's summary (a path, a command) is shown.
const SUMMARY_MAX: usize = 90;
/// Default minimum spacing between edits.
pub const EDIT_INTERVAL: Duration = Duration::from_millis(1100);

/// Where a task stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Queued,
    Running,
    WaitingApproval,
    Done,
    Failed,
    Cancelled,
    /// The agent never reported an end (it was revoked, or the task was lost with its machine).
    Lost,
}

impl Phase {
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Self::Done | Self::Failed | Self::Cancelled | Self::Lost
        )
    }

    pub fn icon(self) -> &'static str {
        match self {
            Self::Queued => "🕓",
            Self::Running => "⚙️",
            Self::WaitingApproval => "✋",
            Self::Done => "✅",
            Self::Failed => "❌",
            Self::Cancelled => "⏹️",
            Self::Lost => "❔",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Self::Queued => "Queued",
            Self::Running => "Running",
            Self::WaitingApproval => "Waiting for approval",
            Self::Done => "Done",
            Self::Failed => "Failed",
            Self::Cancelled => "Cancelled",
            Self::Lost => "Lost",
        }
    }
}

impl From<FinalState> for Phase {
    fn from(s: FinalState) -> Self {
        match s {
            FinalState::Done => Self::Done,
            FinalState::Failed => Self::Failed,
            FinalState::Cancelled => Self::Cancelled,
        }
    }
}

/// One line of tool activity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Activity {
    pub line: String,
    /// The tool's result was an error.
    pub failed: bool,
}

/// Everything the progress message and the summary show, accumulated from events.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskProgress {
    pub task: String,
    pub phase: Phase,
    pub cwd: Option<String>,
    pub session_id: Option<String>,
    pub model: Option<String>,
    pub recent: VecDeque<Activity>,
    pub tools_used: u32,
    /// Open approval requests: (approval id, what it is for).
    pub pending: Vec<(String, String)>,
    pub turns: u32,
    pub cost_usd: f64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// Claude Code's own time across turns.
    pub duration_ms: u64,
    /// Why it failed, in words the user can act on.
    pub message: Option<String>,
    /// The git worktree branch the task runs on, and what it changed once it ended.
    pub worktree: Option<WorktreeShown>,
    /// Tokens in the model's context now, and its window once known (agents that report it).
    pub context: Option<(u64, Option<u64>)>,
}

/// A task's worktree as the summary shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorktreeShown {
    pub branch: String,
    pub note: Option<String>,
    pub change: Option<ct_protocol::task::DiffStat>,
    /// The diff for a `.patch` attachment, and whether the agent cut it.
    pub diff: Option<String>,
    pub diff_cut: bool,
}

/// `🔧 Edit `src/main.rs``, `▶ Bash `cargo test``: which tool, on what. The summary is the model's or a
/// tool's text, so it is shown in a code span (no Markdown, no mentions, hidden characters written out), all
/// of it on one line.
pub fn tool_line(name: &str, summary: &str) -> String {
    let summary = summary.trim();
    let icon = match name {
        "Bash" | "BashOutput" | "KillShell" => "▶",
        "Read" => "📖",
        "Grep" | "Glob" | "LS" => "🔎",
        "WebFetch" | "WebSearch" => "🌐",
        "TodoWrite" => "📋",
        "Task" | "Agent" => "🤖",
        _ => "🔧",
    };
    let name = tool_name(name);
    if summary.is_empty() {
        format!("{icon} {name}")
    } else {
        format!("{icon} {name} {}", inline_code(summary, SUMMARY_MAX))
    }
}

impl TaskProgress {
    pub fn new(task: &str) -> Self {
        Self {
            task: task.to_string(),
            phase: Phase::Queued,
            cwd: None,
            session_id: None,
            model: None,
            recent: VecDeque::new(),
            tools_used: 0,
            pending: Vec::new(),
            turns: 0,
            cost_usd: 0.0,
            input_tokens: 0,
            output_tokens: 0,
            duration_ms: 0,
            message: None,
            worktree: None,
            context: None,
        }
    }

    /// Takes in one event. Returns whether the progress message would change (assistant text does not
    /// change it: text goes to its own messages).
    pub fn apply(&mut self, event: &TaskEvent) -> bool {
        match event {
            TaskEvent::Started { cwd } => {
                self.cwd = Some(cwd.clone());
                self.phase = Phase::Running;
            }
            TaskEvent::Session {
                session_id, model, ..
            } => {
                self.session_id = Some(session_id.clone());
                if model.is_some() {
                    self.model.clone_from(model);
                }
            }
            TaskEvent::Text { .. } => return false,
            TaskEvent::Context { tokens, window } => {
                let window = window.or(self.context.and_then(|(_, w)| w));
                self.context = Some((*tokens, window));
            }
            TaskEvent::Worktree {
                branch,
                note,
                change,
                diff,
                diff_cut,
                ..
            } => {
                let shown = self.worktree.get_or_insert_with(WorktreeShown::default);
                shown.branch.clone_from(branch);
                if note.is_some() {
                    shown.note.clone_from(note);
                }
                if change.is_some() {
                    shown.change.clone_from(change);
                    shown.diff.clone_from(diff);
                    shown.diff_cut = *diff_cut;
                }
            }
            // The same use was counted when the model called the tool; the thread gets its own line for it.
            TaskEvent::Tool {
                auto_allowed: Some(_),
                ..
            } => return false,
            TaskEvent::Tool { name, summary, .. } => {
                self.tools_used += 1;
                self.recent.push_back(Activity {
                    line: tool_line(name, summary),
                    failed: false,
                });
                while self.recent.len() > RECENT_TOOLS {
                    self.recent.pop_front();
                }
            }
            TaskEvent::ToolResult { is_error, .. } => {
                if !*is_error {
                    return false;
                }
                match self.recent.back_mut() {
                    Some(last) => last.failed = true,
                    None => return false,
                }
            }
            TaskEvent::ApprovalRequested {
                approval,
                tool,
                summary,
                ..
            } => {
                self.pending
                    .push((approval.clone(), tool_line(tool, summary)));
                self.phase = Phase::WaitingApproval;
            }
            TaskEvent::ApprovalClosed { approval, .. } => {
                self.pending.retain(|(a, _)| a != approval);
                if self.pending.is_empty() && self.phase == Phase::WaitingApproval {
                    self.phase = Phase::Running;
                }
            }
            TaskEvent::TurnFinished {
                cost_usd,
                turns,
                input_tokens,
                output_tokens,
                duration_ms,
                ..
            } => {
                // Each turn's `result` reports that turn's turns, tokens and time, so the task's are their sum;
                // but `total_cost_usd` is the Claude Code process's running total, so the latest one is the
                // cost (summing would count every earlier turn again).
                self.turns += turns.unwrap_or(0);
                if let Some(cost) = cost_usd {
                    self.cost_usd = *cost;
                }
                self.input_tokens += input_tokens.unwrap_or(0);
                self.output_tokens += output_tokens.unwrap_or(0);
                self.duration_ms += duration_ms.unwrap_or(0);
            }
            TaskEvent::Finished { state, message } => {
                self.phase = (*state).into();
                self.message.clone_from(message);
                self.pending.clear();
            }
        }
        true
    }

    /// `📊 5.0k in · 42 out · $0.0263 so far · context 25.3k of 1.0M (3%) · 2 turns`: what the task has used
    /// so far (tokens and cost as of the last finished turn, the context as of the last model call). `None`
    /// until there is something to say.
    pub fn usage_line(&self) -> Option<String> {
        use super::summary::{count, money};
        let mut parts = Vec::new();
        if self.turns > 0 || self.input_tokens > 0 || self.output_tokens > 0 {
            let so_far = if self.phase.is_final() { "" } else { " so far" };
            parts.push(format!(
                "{} in · {} out · {}{so_far}",
                count(self.input_tokens),
                count(self.output_tokens),
                money(self.cost_usd)
            ));
        }
        match self.context {
            Some((tokens, Some(window))) if window > 0 => {
                let pct = (tokens as f64 * 100.0 / window as f64).round();
                parts.push(format!(
                    "context {} of {} ({pct:.0}%)",
                    count(tokens),
                    count(window)
                ));
            }
            Some((tokens, _)) => parts.push(format!("context {}", count(tokens))),
            None => {}
        }
        if self.turns > 0 {
            let s = if self.turns == 1 { "" } else { "s" };
            parts.push(format!("{} turn{s}", self.turns));
        }
        (!parts.is_empty()).then(|| format!("📊 {}", parts.join(" · ")))
    }

    /// The progress message: a header line and the recent tool activity. Always under 2,000 characters.
    pub fn render(&self, elapsed: Duration) -> String {
        let mut out = format!(
            "{} **{}** · `{}` · {}",
            self.phase.icon(),
            self.phase.label(),
            self.task,
            human_duration(elapsed)
        );
        if self.tools_used > 0 {
            let s = if self.tools_used == 1 { "" } else { "s" };
            out.push_str(&format!(" · {} tool{s}", self.tools_used));
        }
        if let Some(m) = &self.model {
            out.push_str(&format!(" · {}", truncate(m, 40)));
        }
        if let Some(usage) = self.usage_line() {
            out.push('\n');
            out.push_str(&usage);
        }
        let hidden = self.tools_used as usize - self.recent.len().min(self.tools_used as usize);
        if hidden > 0 {
            out.push_str(&format!("\n-# …{hidden} earlier"));
        }
        for a in &self.recent {
            out.push('\n');
            out.push_str(&a.line);
            if a.failed {
                out.push_str(" ⚠️");
            }
        }
        for (_, what) in &self.pending {
            out.push_str(&format!("\n✋ Approval needed: {what}"));
        }
        if let (true, Some(m)) = (self.phase.is_final(), &self.message) {
            out.push_str(&format!("\n{}", truncate(m, 400)));
        }
        truncate(&out, crate::split::MESSAGE_LIMIT)
    }
}

/// What the edit loop should do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EditDecision {
    /// Edit the message now.
    Now,
    /// There is a change, but wait until then.
    At(Instant),
    /// Nothing changed since the last edit.
    Idle,
}

/// Decides when to edit the progress message: at most once per interval, the final state always at once.
/// Pure (the caller passes the time), so the loop around it can be tested and reasoned about.
#[derive(Debug, Clone)]
pub struct EditThrottle {
    interval: Duration,
    last_edit: Option<Instant>,
    dirty: bool,
}

impl EditThrottle {
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            last_edit: None,
            dirty: false,
        }
    }

    /// The content changed (also call this after an edit failed, to try again).
    pub fn changed(&mut self) {
        self.dirty = true;
    }

    /// Whether to edit at `now`. Returning [`EditDecision::Now`] counts as the edit being made.
    pub fn poll(&mut self, now: Instant, is_final: bool) -> EditDecision {
        if !self.dirty {
            return EditDecision::Idle;
        }
        let due = self.last_edit.map(|t| t + self.interval);
        match due {
            Some(due) if now < due && !is_final => EditDecision::At(due),
            _ => {
                self.dirty = false;
                self.last_edit = Some(now);
                EditDecision::Now
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn tool(name: &str, summary: &str) -> TaskEvent {
        TaskEvent::Tool {
            name: name.into(),
            summary: summary.into(),
            auto_allowed: None,
            id: None,
            command: None,
        }
    }

    #[test]
    fn tool_lines_are_compact() {
        assert_eq!(tool_line("Edit", "src/main.rs"), "🔧 Edit `src/main.rs`");
        assert_eq!(tool_line("Bash", "cargo test"), "▶ Bash `cargo test`");
        assert_eq!(
            tool_line("Bash", "echo `date`\nmore"),
            "▶ Bash `echo ˋdateˋ ⏎ more`"
        );
        // Summaries are never Markdown, and hide nothing.
        assert_eq!(
            tool_line("Write", "**x** @everyone [a](http://b)\u{202E}"),
            "🔧 Write `**x** @everyone [a](http://b)<U+202E>`"
        );
        assert_eq!(tool_line("Read", ""), "📖 Read");
        assert!(tool_line("Write", &"x".repeat(500)).chars().count() <= 100);
    }

    #[test]
    fn follows_a_task_from_start_to_end() {
        let mut p = TaskProgress::new("t_abc");
        assert!(p
            .render(Duration::ZERO)
            .starts_with("🕓 **Queued** · `t_abc` · 0s"));
        p.apply(&TaskEvent::Started {
            cwd: "/src/web".into(),
        });
        p.apply(&TaskEvent::Session {
            session_id: "s1".into(),
            model: Some("claude-sonnet".into()),
            claude_version: None,
        });
        assert!(
            !p.apply(&TaskEvent::Text { text: "hi".into() }),
            "text is not progress"
        );
        p.apply(&tool("Edit", "src/main.rs"));
        p.apply(&tool("Bash", "cargo test"));
        p.apply(&TaskEvent::ToolResult {
            is_error: true,
            summary: "1 failed".into(),
            tool_use_id: None,
            output: None,
            output_bytes: None,
            exit_code: None,
            diff: None,
            diff_cut: false,
        });
        let shown = p.render(Duration::from_secs(65));
        assert_eq!(
            shown,
            "⚙️ **Running** · `t_abc` · 1m 05s · 2 tools · claude-sonnet\n🔧 Edit `src/main.rs`\n▶ Bash `cargo test` ⚠️"
        );

        p.apply(&TaskEvent::ApprovalRequested {
            approval: "a1".into(),
            tool: "Write".into(),
            summary: "src/lib.rs".into(),
            input: json!({}),
            question: false,
            description: None,
            session: None,
            input_cut: false,
        });
        assert_eq!(p.phase, Phase::WaitingApproval);
        assert!(p
            .render(Duration::ZERO)
            .ends_with("✋ Approval needed: 🔧 Write `src/lib.rs`"));
        p.apply(&TaskEvent::ApprovalClosed {
            approval: "a1".into(),
            outcome: "allowed".into(),
        });
        assert_eq!(p.phase, Phase::Running);

        for (turns, cost) in [(2, 0.01), (1, 0.02)] {
            p.apply(&TaskEvent::TurnFinished {
                is_error: false,
                subtype: "success".into(),
                text: None,
                cost_usd: Some(cost),
                turns: Some(turns),
                input_tokens: Some(100),
                output_tokens: Some(20),
                duration_ms: Some(1500),
            });
        }
        assert_eq!(
            (p.turns, p.input_tokens, p.output_tokens, p.duration_ms),
            (3, 200, 40, 3000)
        );
        assert!(
            (p.cost_usd - 0.02).abs() < 1e-9,
            "the cost is the process's running total, not a sum: {}",
            p.cost_usd
        );

        p.apply(&TaskEvent::Finished {
            state: FinalState::Failed,
            message: Some(
                "Claude Code is not logged in on laptop: run `claude login` there".into(),
            ),
        });
        assert!(p.phase.is_final());
        let last = p.render(Duration::from_secs(70));
        assert!(last.starts_with("❌ **Failed**"));
        assert!(last.ends_with("run `claude login` there"));
    }

    #[test]
    fn the_usage_line_shows_tokens_cost_context_and_turns_as_they_come() {
        let mut p = TaskProgress::new("t_1");
        assert_eq!(p.usage_line(), None, "nothing to say yet");
        // The first call's usage comes before the CLI has said the window.
        assert!(p.apply(&TaskEvent::Context {
            tokens: 25_300,
            window: None
        }));
        assert_eq!(p.usage_line().unwrap(), "📊 context 25.3k");
        assert!(p.apply(&TaskEvent::Context {
            tokens: 25_300,
            window: Some(1_000_000)
        }));
        assert_eq!(p.usage_line().unwrap(), "📊 context 25.3k of 1.0M (3%)");
        // A later call without the window keeps the one known.
        p.apply(&TaskEvent::Context {
            tokens: 150_000,
            window: None,
        });
        p.apply(&TaskEvent::TurnFinished {
            is_error: false,
            subtype: "success".into(),
            text: None,
            cost_usd: Some(0.0263),
            turns: Some(2),
            input_tokens: Some(5_000),
            output_tokens: Some(42),
            duration_ms: Some(900),
        });
        let line = p.usage_line().unwrap();
        assert_eq!(
            line,
            "📊 5000 in · 42 out · $0.0263 so far · context 150.0k of 1.0M (15%) · 2 turns"
        );
        let shown = p.render(Duration::from_secs(3));
        assert_eq!(shown.lines().nth(1), Some(line.as_str()), "{shown}");
        // Once the task is over, the figures are its totals.
        p.apply(&TaskEvent::Finished {
            state: FinalState::Done,
            message: None,
        });
        assert!(
            p.usage_line()
                .unwrap()
                .starts_with("📊 5000 in · 42 out · $0.0263 · context"),
            "{:?}",
            p.usage_line()
        );
        // A window of 0 (a CLI that does not know it) is no window.
        let mut q = TaskProgress::new("t_2");
        q.apply(&TaskEvent::Context {
            tokens: 10,
            window: Some(0),
        });
        assert_eq!(q.usage_line().unwrap(), "📊 context 10");
    }

    #[test]
    fn keeps_only_recent_tools_and_stays_under_the_limit() {
        let mut p = TaskProgress::new("t_abc");
        for i in 0..50 {
            p.apply(&tool(
                "Read",
                &format!("src/file{i}.rs {}", "x".repeat(300)),
            ));
        }
        let shown = p.render(Duration::ZERO);
        assert_eq!(p.recent.len(), RECENT_TOOLS);
        assert!(shown.contains("…44 earlier"));
        assert!(shown.contains("file49.rs") && !shown.contains("file43.rs"));
        assert!(shown.chars().count() <= 2000);
    }

    #[test]
    fn throttle_edits_at_most_once_per_interval_and_flushes_the_end() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut th = EditThrottle::new(s);
        assert_eq!(
            th.poll(t0, false),
            EditDecision::Idle,
            "nothing to show yet"
        );
        th.changed();
        assert_eq!(
            th.poll(t0, false),
            EditDecision::Now,
            "the first change shows at once"
        );
        th.changed();
        assert_eq!(th.poll(t0 + s / 2, false), EditDecision::At(t0 + s));
        th.changed();
        assert_eq!(
            th.poll(t0 + s / 2, false),
            EditDecision::At(t0 + s),
            "changes coalesce"
        );
        assert_eq!(th.poll(t0 + s, false), EditDecision::Now);
        assert_eq!(th.poll(t0 + s, false), EditDecision::Idle);
        th.changed();
        assert_eq!(
            th.poll(t0 + s + s / 10, true),
            EditDecision::Now,
            "the final state is never held back"
        );

        // Over a burst of 100 changes in 3 s, at most 4 edits.
        let mut th = EditThrottle::new(s);
        let edits = (0..100)
            .filter(|i| {
                th.changed();
                th.poll(t0 + Duration::from_millis(30 * i), false) == EditDecision::Now
            })
            .count();
        assert_eq!(edits, 3);
    }
}
