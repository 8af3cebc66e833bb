//! A turn's tool uses in the thread: one message listing them (more when it would pass 2,000 characters),
//! each line filled in as its result comes.
//!
//! - Bash: the command, its exit status and the tail of its output in a code block; the whole output as a
//!   `.txt` attachment when the tail is not all of it (or the command was too long to show in full).
//! - Edit, Write, MultiEdit, NotebookEdit: the change as a ```diff block, or a `.patch` attachment when long.
//! - Everything else (Read, Grep, Glob, WebFetch, WebSearch, TodoWrite, ...): one compact line.
//!
//! Everything the tool or the model wrote goes through [`escape`](super::escape): commands and paths as inline
//! code, output in fenced blocks that cannot be broken out of, hidden and right-to-left characters written
//! out. Mentions are inert in code, and the follower posts with no allowed mentions besides.
//!
//! [`TurnTools`] is plain state: the follower feeds it events and posts or edits the parts it says changed.
//! Each line reserves, while its result is pending, the most room its kind can take once the result is in, so
//! a part posted once never outgrows a message when its lines are filled in.

use ct_protocol::task::TaskEvent;

use super::escape::{code_block, inline_code, tool_name};
use super::output::size;
use super::progress::tool_line;
use super::truncate;
use crate::split::MESSAGE_LIMIT;

/// Most lines of Bash output shown inline.
pub const TAIL_LINES: usize = 15;
/// Most characters of Bash output shown inline (inside the block).
pub const TAIL_CHARS: usize = 600;
/// Most characters of a diff shown inline (inside the block); a longer one is attached.
pub const DIFF_INLINE_CHARS: usize = 700;
/// Most characters of a command or path shown in a line; a longer command is attached in full.
const HEAD_CHARS: usize = 240;
/// The most a line's head (icon, tool, what it acts on, its status) takes.
const HEAD_MAX: usize = HEAD_CHARS + 80;
/// The most a compact line takes with its result.
const COMPACT_MAX: usize = HEAD_MAX + 160;
/// Room for a code block's fences, language and the notes under it.
const BLOCK_EXTRA: usize = 180;

/// How Claude Code starts a result it cut (over its own limit), keeping a preview.
const PERSISTED: &str = "<persisted-output>";

/// How a tool is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Bash,
    Edit,
    Compact,
}

impl Kind {
    fn of(tool: &str) -> Self {
        match tool {
            "Bash" => Self::Bash,
            "Edit" | "Write" | "MultiEdit" | "NotebookEdit" => Self::Edit,
            _ => Self::Compact,
        }
    }

    /// The most a line of this kind takes once its result is in.
    fn reserve(self) -> usize {
        match self {
            Self::Bash => HEAD_MAX + TAIL_CHARS + BLOCK_EXTRA,
            Self::Edit => HEAD_MAX + DIFF_INLINE_CHARS + BLOCK_EXTRA,
            Self::Compact => COMPACT_MAX,
        }
    }
}

/// A file to post with a tool's result, in a message of its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolFile {
    pub filename: String,
    pub data: Vec<u8>,
    /// The line posted with it.
    pub note: String,
}

/// What a tool use was, as far as showing its result needs: kept by the follower for uses posted before a
/// restart, so their results still say what they answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolUse {
    pub id: Option<String>,
    pub name: String,
    pub summary: String,
    pub command: Option<String>,
}

impl ToolUse {
    /// The use in `ev`, if it is a plain tool use (an auto-allowed one repeats a use already shown).
    pub fn of(ev: &TaskEvent) -> Option<Self> {
        match ev {
            TaskEvent::Tool {
                name,
                summary,
                auto_allowed: None,
                id,
                command,
            } => Some(Self {
                id: id.clone(),
                name: name.clone(),
                summary: summary.clone(),
                command: command.clone(),
            }),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
struct Line {
    tool: ToolUse,
    kind: Kind,
    /// The rendered result, once it came.
    result: Option<String>,
    part: usize,
}

impl Line {
    fn render(&self) -> String {
        let head = head(&self.tool);
        match &self.result {
            None => format!("{head} ⏳"),
            Some(r) => format!("{head}{r}"),
        }
    }

    fn room(&self) -> usize {
        match self.result {
            None => self.kind.reserve(),
            Some(_) => self.render().chars().count(),
        }
    }
}

/// What a line starts with: the tool and what it acts on (the whole command for Bash, up to a point).
fn head(t: &ToolUse) -> String {
    match Kind::of(&t.name) {
        Kind::Bash => {
            let cmd = t.command.as_deref().unwrap_or(&t.summary);
            format!("▶ {}", inline_code(cmd.trim(), HEAD_CHARS))
        }
        Kind::Edit => format!(
            "✏️ {} {}",
            tool_name(&t.name),
            inline_code(t.summary.trim(), HEAD_CHARS)
        ),
        Kind::Compact => truncate(&tool_line(&t.name, &t.summary), HEAD_CHARS + 20),
    }
}

/// One assistant turn's tool uses, laid out in message-sized parts.
#[derive(Debug, Clone)]
pub struct TurnTools {
    /// The sequence number of the event that opened it: with the part index, each part message's nonce.
    pub first_seq: u64,
    task: String,
    upload_limit: u64,
    /// The task's folder: paths inside it are shown relative to it.
    cwd: Option<String>,
    lines: Vec<Line>,
    parts: usize,
}

/// What changed in a [`TurnTools`].
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Change {
    /// A part to post as a new message (its index).
    pub new_part: Option<usize>,
    /// A part already posted whose content changed.
    pub edited: Option<usize>,
    /// Files to post on their own.
    pub files: Vec<ToolFile>,
}

impl TurnTools {
    pub fn new(task: &str, first_seq: u64, upload_limit: u64) -> Self {
        Self {
            first_seq,
            task: task.to_string(),
            upload_limit,
            cwd: None,
            lines: Vec::new(),
            parts: 0,
        }
    }

    /// Shows paths inside `cwd` (the task's folder) relative to it, in lines and diffs.
    pub fn with_cwd(mut self, cwd: Option<String>) -> Self {
        self.cwd = cwd.filter(|c| !c.is_empty());
        self
    }

    /// How many parts (messages) it has.
    #[cfg(test)]
    pub fn parts(&self) -> usize {
        self.parts
    }

    /// Part `i` as message content, at most 2,000 characters.
    pub fn render(&self, part: usize) -> String {
        let out = self
            .lines
            .iter()
            .filter(|l| l.part == part)
            .map(Line::render)
            .collect::<Vec<_>>()
            .join("\n");
        // Never needed by construction (lines reserve their room); a guard, not a layout.
        truncate(&out, MESSAGE_LIMIT)
    }

    /// The uses still waiting for their result.
    pub fn pending(&self) -> impl Iterator<Item = ToolUse> + '_ {
        self.lines
            .iter()
            .filter(|l| l.result.is_none())
            .map(|l| l.tool.clone())
    }

    /// Adds a tool use; its line goes in the last part, or a new one when the last is full.
    pub fn add(&mut self, mut tool: ToolUse) -> Change {
        let kind = Kind::of(&tool.name);
        if kind != Kind::Bash {
            tool.summary = relative(&tool.summary, self.cwd.as_deref()).to_string();
        }
        let last = self.parts.checked_sub(1);
        let fits = last.is_some_and(|p| {
            let used: usize = self
                .lines
                .iter()
                .filter(|l| l.part == p)
                .map(|l| l.room() + 1)
                .sum();
            used + kind.reserve() <= MESSAGE_LIMIT
        });
        let mut change = Change::default();
        let part = match last {
            Some(p) if fits => {
                change.edited = Some(p);
                p
            }
            _ => {
                self.parts += 1;
                change.new_part = Some(self.parts - 1);
                self.parts - 1
            }
        };
        self.lines.push(Line {
            tool,
            kind,
            result: None,
            part,
        });
        change
    }

    /// Fills in a result: the line of its use (by id; from an older agent without ids, the first line still
    /// waiting). A result whose use is not here (`earlier`: posted before a restart, or in an earlier turn) gets
    /// a line of its own.
    pub fn result(&mut self, ev: &TaskEvent, seq: u64, earlier: Option<&ToolUse>) -> Change {
        let TaskEvent::ToolResult { tool_use_id, .. } = ev else {
            return Change::default();
        };
        let at = match tool_use_id {
            Some(id) => self
                .lines
                .iter()
                .position(|l| l.result.is_none() && l.tool.id.as_deref() == Some(id)),
            None => self.lines.iter().position(|l| l.result.is_none()),
        };
        let (at, mut change) = match at {
            Some(at) => (at, Change::default()),
            None => {
                let tool = earlier.cloned().unwrap_or_else(|| ToolUse {
                    id: tool_use_id.clone(),
                    name: "tool".into(),
                    summary: String::new(),
                    command: None,
                });
                let change = self.add(tool);
                (self.lines.len() - 1, change)
            }
        };
        let (shown, files) = show_result(
            &self.task,
            seq,
            &self.lines[at].tool,
            ev,
            self.upload_limit,
            self.cwd.as_deref(),
        );
        let line = &mut self.lines[at];
        line.result = Some(shown);
        if change.new_part.is_none() {
            change.edited = Some(line.part);
        }
        change.files = files;
        change
    }
}

/// `text`'s last lines in a code block of at most [`TAIL_CHARS`] characters; true when that is not all of it.
pub fn tail_block(text: &str) -> (String, bool) {
    let text = text.trim_end_matches('\n');
    let lines: Vec<&str> = text.lines().collect();
    let mut from = lines.len().saturating_sub(TAIL_LINES);
    loop {
        let tail = lines[from..].join("\n");
        let (block, cut) = code_block(&tail, TAIL_CHARS);
        if !cut {
            return (block, from > 0);
        }
        if from + 1 < lines.len() {
            from += 1;
            continue;
        }
        // One line longer than the room: its end.
        let chars: Vec<char> = tail.chars().collect();
        let mut keep = TAIL_CHARS / 2;
        loop {
            let end: String = chars[chars.len().saturating_sub(keep)..].iter().collect();
            let (block, cut) = code_block(&end, TAIL_CHARS);
            if !cut || keep <= 1 {
                return (block, true);
            }
            keep /= 2;
        }
    }
}

/// A diff in a ```diff block, if it fits [`DIFF_INLINE_CHARS`].
pub fn diff_block(diff: &str) -> Option<String> {
    let (block, cut) = code_block(diff.trim_end_matches('\n'), DIFF_INLINE_CHARS);
    (!cut).then(|| format!("```diff{}", &block[3..]))
}

/// The first line of `text`, shown as inline code.
fn first_line(text: &str, max: usize) -> String {
    inline_code(
        text.lines().find(|l| !l.trim().is_empty()).unwrap_or(""),
        max,
    )
}

/// A tool result's fields, borrowed from its event: whole (bounded) from agents that send tool output, only
/// `summary` (a preview) from older ones. The thread and the transcript both show results from this.
#[derive(Debug, Clone, Copy)]
pub struct ToolOutcome<'a> {
    pub is_error: bool,
    pub summary: &'a str,
    pub output: Option<&'a str>,
    /// The size of the whole output, when the agent cut it.
    pub output_bytes: Option<u64>,
    pub exit_code: Option<i32>,
    pub diff: Option<&'a str>,
    pub diff_cut: bool,
}

impl<'a> ToolOutcome<'a> {
    /// The result in `ev`; `None` for other events.
    pub fn of(ev: &'a TaskEvent) -> Option<Self> {
        let TaskEvent::ToolResult {
            is_error,
            summary,
            output,
            output_bytes,
            exit_code,
            diff,
            diff_cut,
            ..
        } = ev
        else {
            return None;
        };
        Some(Self {
            is_error: *is_error,
            summary,
            output: output.as_deref(),
            output_bytes: *output_bytes,
            exit_code: *exit_code,
            diff: diff.as_deref(),
            diff_cut: *diff_cut,
        })
    }
}

/// How a result shows after its use's head, and the files to post with it.
fn show_result(
    task: &str,
    seq: u64,
    tool: &ToolUse,
    ev: &TaskEvent,
    upload_limit: u64,
    cwd: Option<&str>,
) -> (String, Vec<ToolFile>) {
    let Some(ToolOutcome {
        is_error,
        summary,
        output,
        output_bytes,
        exit_code,
        diff,
        diff_cut,
    }) = ToolOutcome::of(ev)
    else {
        return (String::new(), Vec::new());
    };
    // From an agent that sends no output, the preview is all there is.
    let text = output.unwrap_or(summary);
    let stem = format!("{task}-{seq}");
    let mut files = Vec::new();
    let attach = |files: &mut Vec<ToolFile>, ext: &str, data: String, what: &str| -> String {
        let filename = format!("{stem}.{ext}");
        if data.len() as u64 > upload_limit {
            return format!(
                "({what}: {}, over this server's upload limit)",
                size(data.len() as u64)
            );
        }
        let note = format!("📎 {what} of {} ({})", head(tool), size(data.len() as u64));
        files.push(ToolFile {
            filename,
            data: data.into_bytes(),
            note: truncate(&note, MESSAGE_LIMIT),
        });
        format!("(whole {what} attached below)")
    };
    let cut_note = |bytes: Option<u64>| match bytes {
        Some(n) => format!(", cut by the agent from {}", size(n)),
        None => String::new(),
    };
    let shown = match Kind::of(&tool.name) {
        Kind::Bash => {
            let status = match (exit_code, is_error) {
                (Some(0), _) => " → ✅ exit 0".to_string(),
                (Some(n), _) => format!(" → ❌ exit {n}"),
                (None, true) => " → ❌ error".to_string(),
                (None, false) => " → ✅".to_string(),
            };
            if text.trim().is_empty() {
                format!("{status} (no output)")
            } else {
                let (block, partial) = tail_block(text);
                let command = tool.command.as_deref().unwrap_or(&tool.summary);
                let long_command = command.chars().count() > HEAD_CHARS;
                let mut note = String::new();
                if text.trim_start().starts_with(PERSISTED) {
                    // Claude Code's own cut: the model saw only a preview, and so does the thread.
                    note.push_str("\n-# ✂️ too long for Claude Code, which kept this preview");
                }
                if partial || long_command || output_bytes.is_some() {
                    let data = format!("$ {command}\n{text}");
                    note += &format!(
                        "\n-# last lines shown · {}{}",
                        attach(&mut files, "txt", data, "output"),
                        cut_note(output_bytes)
                    );
                }
                format!("{status}\n{block}{note}")
            }
        }
        Kind::Edit => match diff.filter(|d| !d.trim().is_empty()) {
            _ if is_error => format!(" → ❌ {}", first_line(text, 200)),
            Some(d) => {
                let d = &relative_diff(d, cwd);
                let (plus, minus) = diff_lines(d).fold((0, 0), |(p, m), (kind, _)| match kind {
                    DiffLine::Added => (p + 1, m),
                    DiffLine::Removed => (p, m + 1),
                    _ => (p, m),
                });
                let stat = format!(" (+{plus} −{minus})");
                let cut = if diff_cut { " · cut by the agent" } else { "" };
                match diff_block(d).filter(|_| !diff_cut) {
                    Some(block) => format!("{stat}\n{block}"),
                    None => format!(
                        "{stat} {}{cut}",
                        attach(&mut files, "patch", d.to_string(), "diff")
                    ),
                }
            }
            None => " ✓".to_string(),
        },
        Kind::Compact if is_error => format!(" → ❌ {}", first_line(text, 150)),
        Kind::Compact => match output {
            // Only a whole output is worth counting (a preview's count would mislead).
            Some(o) => count(&tool.name, o, output_bytes.is_some()),
            None => String::new(),
        },
    };
    (shown, files)
}

/// What a compact line says of a whole output: how many lines Read read, how many files or matches Grep and
/// Glob found; nothing for other tools (their output is prose).
fn count(tool: &str, output: &str, cut: bool) -> String {
    let output = output.trim_end_matches('\n');
    if output.trim().is_empty() {
        return String::new();
    }
    let more = if cut { "+" } else { "" };
    let n = output.lines().count();
    let plural = |n: usize, one: &str, many: &str| {
        format!(" ({n}{more} {})", if n == 1 { one } else { many })
    };
    match tool {
        "Read" => plural(n, "line", "lines"),
        "Glob" | "LS" => plural(n, "file", "files"),
        "Grep" => {
            // `Found 3 files` heads Grep's default listing: that number, not the lines under it.
            let first = output.lines().next().unwrap_or_default();
            let mut words = first.split_whitespace();
            match (
                words.next(),
                words.next().and_then(|w| w.parse::<usize>().ok()),
            ) {
                (Some("Found"), Some(found)) => plural(found, "file", "files"),
                _ => plural(n, "match", "matches"),
            }
        }
        _ => String::new(),
    }
}

/// `path` relative to `cwd` when it is inside it.
fn relative<'a>(path: &'a str, cwd: Option<&str>) -> &'a str {
    cwd.and_then(|c| path.strip_prefix(c.trim_end_matches('/')))
        .and_then(|rest| rest.strip_prefix('/'))
        .filter(|rest| !rest.is_empty())
        .unwrap_or(path)
}

/// What a line of a unified diff is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DiffLine {
    /// `--- old` or `+++ new`.
    Header,
    /// `@@ -a,b +c,d @@`.
    Hunk,
    Added,
    Removed,
    Context,
}

/// The lines of a unified diff (line ends kept), each with what it is. Inside a hunk whose header gives line
/// counts, a line is content until the counts are used up, even one starting with `--- ` or `+++ ` (a removed
/// `-- x` or an added `++ y`); a hunk without counts (`@@ @@`) lasts until the next header pair.
fn diff_lines(diff: &str) -> impl Iterator<Item = (DiffLine, &str)> {
    let lines: Vec<&str> = diff.split_inclusive('\n').collect();
    let mut out = Vec::with_capacity(lines.len());
    // Old and new lines still due in the current counted hunk.
    let mut due: Option<(u64, u64)> = None;
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let counted = due.is_some_and(|(o, n)| o + n > 0);
        let header_pair = !counted
            && line.starts_with("--- ")
            && lines.get(i + 1).is_some_and(|n| n.starts_with("+++ "));
        if header_pair {
            out.push((DiffLine::Header, line));
            out.push((DiffLine::Header, lines[i + 1]));
            due = None;
            i += 2;
            continue;
        }
        if !counted && line.starts_with("@@") {
            due = hunk_counts(line);
            out.push((DiffLine::Hunk, line));
            i += 1;
            continue;
        }
        let kind = match line.as_bytes().first() {
            Some(b'+') => DiffLine::Added,
            Some(b'-') => DiffLine::Removed,
            _ => DiffLine::Context,
        };
        if let Some((o, n)) = &mut due {
            match kind {
                DiffLine::Added => *n = n.saturating_sub(1),
                DiffLine::Removed => *o = o.saturating_sub(1),
                _ => {
                    *o = o.saturating_sub(1);
                    *n = n.saturating_sub(1);
                }
            }
        }
        out.push((kind, line));
        i += 1;
    }
    out.into_iter()
}

/// The old and new line counts of `@@ -a,b +c,d @@` (a missing count is 1); `None` without numbers.
fn hunk_counts(line: &str) -> Option<(u64, u64)> {
    let mut parts = line.split_whitespace().skip(1);
    let count = |p: Option<&str>, sign: char| -> Option<u64> {
        let range = p?.strip_prefix(sign)?;
        match range.split_once(',') {
            Some((_, n)) => n.parse().ok(),
            None => range.parse::<u64>().ok().map(|_| 1),
        }
    };
    Some((count(parts.next(), '-')?, count(parts.next(), '+')?))
}

/// A diff whose file headers name paths inside `cwd` as `a/PATH` and `b/PATH` (what `git apply` takes).
fn relative_diff(diff: &str, cwd: Option<&str>) -> String {
    let Some(cwd) = cwd else {
        return diff.to_string();
    };
    diff_lines(diff)
        .map(|(kind, line)| {
            let (side, prefix) = match (kind, line.get(..4)) {
                (DiffLine::Header, Some("--- ")) => ("--- ", "a/"),
                (DiffLine::Header, Some("+++ ")) => ("+++ ", "b/"),
                _ => return line.to_string(),
            };
            let path = line[4..].trim_end_matches('\n');
            let eol = &line[4 + path.len()..];
            match relative(path, Some(cwd)) {
                rel if rel == path => line.to_string(),
                rel => format!("{side}{prefix}{rel}{eol}"),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn use_(id: &str, name: &str, summary: &str) -> TaskEvent {
        TaskEvent::Tool {
            name: name.into(),
            summary: summary.into(),
            auto_allowed: None,
            id: Some(id.into()),
            command: (name == "Bash").then(|| summary.to_string()),
        }
    }

    fn result(
        id: Option<&str>,
        is_error: bool,
        output: Option<&str>,
        exit: Option<i32>,
    ) -> TaskEvent {
        TaskEvent::ToolResult {
            is_error,
            summary: output.unwrap_or("preview").chars().take(2000).collect(),
            tool_use_id: id.map(str::to_string),
            output: output.map(str::to_string),
            output_bytes: None,
            exit_code: exit,
            diff: None,
            diff_cut: false,
        }
    }

    fn diff_result(id: &str, diff: &str) -> TaskEvent {
        TaskEvent::ToolResult {
            is_error: false,
            summary: "The file was updated".into(),
            tool_use_id: Some(id.into()),
            output: None,
            output_bytes: None,
            exit_code: None,
            diff: Some(diff.into()),
            diff_cut: false,
        }
    }

    fn turn() -> TurnTools {
        TurnTools::new("t_1", 5, 10 * 1024 * 1024)
    }

    #[test]
    fn bash_shows_command_status_and_output_tail_and_attaches_long_output() {
        let mut t = turn();
        let c = t.add(ToolUse::of(&use_("a", "Bash", "cargo test")).unwrap());
        assert_eq!(c.new_part, Some(0));
        assert_eq!(t.render(0), "▶ `cargo test` ⏳");
        let c = t.result(
            &result(Some("a"), false, Some("hello-line\n"), Some(0)),
            6,
            None,
        );
        assert_eq!(c.edited, Some(0));
        assert!(c.files.is_empty());
        assert_eq!(
            t.render(0),
            "▶ `cargo test` → ✅ exit 0\n```\nhello-line\n```"
        );

        // Long output: its last lines inline, all of it attached with the command.
        let long: String = (1..=200).map(|i| format!("line {i}\n")).collect();
        t.add(ToolUse::of(&use_("b", "Bash", "seq 200")).unwrap());
        let c = t.result(&result(Some("b"), true, Some(&long), Some(2)), 8, None);
        let shown = t.render(0);
        assert!(shown.contains("▶ `seq 200` → ❌ exit 2"), "{shown}");
        assert!(shown.contains("line 200\n```"), "{shown}");
        assert!(!shown.contains("line 150\n"), "{shown}");
        assert!(shown.contains("attached"), "{shown}");
        assert_eq!(c.files.len(), 1);
        assert_eq!(c.files[0].filename, "t_1-8.txt");
        let data = String::from_utf8(c.files[0].data.clone()).unwrap();
        assert!(data.starts_with("$ seq 200\nline 1\n") && data.ends_with("line 200\n"));
        assert!(shown.chars().count() <= MESSAGE_LIMIT);
    }

    #[test]
    fn one_long_line_keeps_its_end() {
        let (block, cut) = tail_block(&format!("{}END", "x".repeat(5000)));
        assert!(cut);
        assert!(block.ends_with("END\n```"), "{block}");
        assert!(block.chars().count() <= TAIL_CHARS + 8);
    }

    #[test]
    fn diffs_inline_when_short_and_attached_when_long() {
        let mut t = turn();
        t.add(ToolUse::of(&use_("e", "Edit", "src/f.rs")).unwrap());
        let c = t.result(
            &diff_result("e", "--- f\n+++ f\n@@ -1 +1 @@\n-old\n+new\n"),
            6,
            None,
        );
        assert!(c.files.is_empty());
        let shown = t.render(0);
        assert!(
            shown.starts_with("✏️ Edit `src/f.rs` (+1 −1)\n```diff\n"),
            "{shown}"
        );
        assert!(shown.contains("\n-old\n+new\n```"), "{shown}");

        let big: String = (0..400).map(|i| format!("+added {i}\n")).collect();
        t.add(ToolUse::of(&use_("w", "Write", "src/big.rs")).unwrap());
        let c = t.result(&diff_result("w", &big), 8, None);
        assert_eq!(c.files.len(), 1);
        assert_eq!(c.files[0].filename, "t_1-8.patch");
        assert_eq!(c.files[0].data, big.as_bytes());
        let shown = t.render(0);
        assert!(
            shown.contains("✏️ Write `src/big.rs` (+400 −0) (whole diff attached below)"),
            "{shown}"
        );
    }

    #[test]
    fn paths_in_the_tasks_folder_show_relative_to_it() {
        let mut t = TurnTools::new("t_1", 5, 1 << 20).with_cwd(Some("/src/app".into()));
        t.add(ToolUse::of(&use_("e", "Edit", "/src/app/lib/f.rs")).unwrap());
        t.add(ToolUse::of(&use_("r", "Read", "/etc/passwd")).unwrap());
        t.result(
            &diff_result(
                "e",
                "--- /src/app/lib/f.rs\n+++ /src/app/lib/f.rs\n@@ -1,2 +1,2 @@\n--- x\n+++ y\n",
            ),
            6,
            None,
        );
        let shown = t.render(0);
        assert!(shown.starts_with("✏️ Edit `lib/f.rs` (+1 −1)\n```diff\n--- a/lib/f.rs\n+++ b/lib/f.rs\n@@ -1,2 +1,2 @@\n--- x\n+++ y\n```"), "{shown}");
        // Outside the folder: as it is.
        assert!(shown.contains("📖 Read `/etc/passwd`"), "{shown}");
        assert_eq!(relative("/src/app", Some("/src/app")), "/src/app");
        assert_eq!(
            relative("/src/application/x", Some("/src/app")),
            "/src/application/x"
        );
    }

    #[test]
    fn a_line_never_takes_more_than_it_reserved() {
        // The worst of everything: the longest command with hidden characters, an odd exit status, output cut
        // by Claude Code and by the agent, over the upload limit; a long diff cut; a long error.
        let cmd = "\u{202e}`x`".repeat(400);
        let mut t = TurnTools::new("t_1", 5, 10);
        t.add(ToolUse {
            id: Some("a".into()),
            name: "Bash".into(),
            summary: cmd.clone(),
            command: Some(cmd),
        });
        let out = format!("{PERSISTED}\n{}", "\u{200b}y\n".repeat(5000));
        t.result(
            &TaskEvent::ToolResult {
                is_error: true,
                summary: String::new(),
                tool_use_id: Some("a".into()),
                output: Some(out),
                output_bytes: Some(u64::MAX),
                exit_code: Some(i32::MIN),
                diff: None,
                diff_cut: false,
            },
            u64::MAX,
            None,
        );
        let name = "mcp__".to_string() + &"\u{202e}".repeat(100);
        t.add(ToolUse::of(&use_("e", "MultiEdit", &"\u{202e}".repeat(500))).unwrap());
        t.result(
            &TaskEvent::ToolResult {
                is_error: false,
                summary: String::new(),
                tool_use_id: Some("e".into()),
                output: None,
                output_bytes: None,
                exit_code: None,
                diff: Some("+\u{202e}\n".repeat(5000)),
                diff_cut: true,
            },
            u64::MAX,
            None,
        );
        t.add(ToolUse::of(&use_("c", &name, &"\u{202e}".repeat(500))).unwrap());
        t.result(
            &result(Some("c"), true, Some(&"\u{202e}".repeat(500)), None),
            9,
            None,
        );
        for line in &t.lines {
            let used = line.render().chars().count();
            assert!(
                used <= line.kind.reserve(),
                "{used} > {}: {}",
                line.kind.reserve(),
                line.render()
            );
        }
    }

    #[test]
    fn other_tools_are_one_compact_line() {
        let mut t = turn();
        t.add(ToolUse::of(&use_("r", "Read", "src/main.rs")).unwrap());
        t.result(&result(Some("r"), false, Some("a\nb\nc\n"), None), 6, None);
        t.add(ToolUse::of(&use_("g", "Grep", "TODO")).unwrap());
        t.result(
            &result(Some("g"), true, Some("bad regex\nmore"), None),
            8,
            None,
        );
        t.add(ToolUse::of(&use_("h", "Grep", "fn main")).unwrap());
        t.result(
            &result(Some("h"), false, Some("Found 2 files\na.rs\nb.rs"), None),
            10,
            None,
        );
        t.add(ToolUse::of(&use_("o", "Glob", "**/*.rs")).unwrap());
        t.result(&result(Some("o"), false, Some("a.rs\n"), None), 12, None);
        t.add(ToolUse::of(&use_("d", "TodoWrite", "")).unwrap());
        t.result(
            &result(Some("d"), false, Some("Todos have been modified"), None),
            14,
            None,
        );
        assert_eq!(
            t.render(0),
            "📖 Read `src/main.rs` (3 lines)\n🔎 Grep `TODO` → ❌ `bad regex`\n🔎 Grep `fn main` (2 files)\n\
             🔎 Glob `**/*.rs` (1 file)\n📋 TodoWrite"
        );
    }

    #[test]
    fn a_busy_turn_is_split_into_messages_under_the_limit() {
        let mut t = turn();
        let mut new_parts = 0;
        for i in 0..12 {
            let c =
                t.add(ToolUse::of(&use_(&format!("b{i}"), "Bash", &format!("step {i}"))).unwrap());
            new_parts += usize::from(c.new_part.is_some());
        }
        assert_eq!(new_parts, t.parts());
        assert!(t.parts() > 1, "12 Bash lines reserve more than one message");
        for i in 0..12 {
            let out = format!("{}\n", "o".repeat(80)).repeat(30);
            t.result(
                &result(Some(&format!("b{i}")), false, Some(&out), Some(0)),
                20 + i,
                None,
            );
        }
        for p in 0..t.parts() {
            let shown = t.render(p);
            assert!(
                shown.chars().count() <= MESSAGE_LIMIT,
                "part {p}: {}",
                shown.len()
            );
            assert!(!shown.is_empty());
        }
        // Every line is in exactly one part, in order.
        let all: String = (0..t.parts()).map(|p| t.render(p)).collect();
        for i in 0..12 {
            assert_eq!(all.matches(&format!("`step {i}`")).count(), 1);
        }
        // Finished lines take only their room: many compact lines share one message.
        let mut t = turn();
        for i in 0..10 {
            t.add(ToolUse::of(&use_(&format!("r{i}"), "Read", "f")).unwrap());
            t.result(
                &result(Some(&format!("r{i}")), false, Some("x"), None),
                30 + i,
                None,
            );
        }
        assert_eq!(t.parts(), 1);
    }

    #[test]
    fn an_older_agents_events_show_from_the_summary() {
        // No id, no output, no exit status: paired in order, the preview shown.
        let mut t = turn();
        let old_use = TaskEvent::Tool {
            name: "Bash".into(),
            summary: "echo hi".into(),
            auto_allowed: None,
            id: None,
            command: None,
        };
        t.add(ToolUse::of(&old_use).unwrap());
        let old_result = TaskEvent::ToolResult {
            is_error: false,
            summary: "hi".into(),
            tool_use_id: None,
            output: None,
            output_bytes: None,
            exit_code: None,
            diff: None,
            diff_cut: false,
        };
        let c = t.result(&old_result, 6, None);
        assert_eq!(c.edited, Some(0));
        assert_eq!(t.render(0), "▶ `echo hi` → ✅\n```\nhi\n```");
    }

    #[test]
    fn a_result_of_an_earlier_use_gets_its_own_line() {
        let mut t = turn();
        let earlier = ToolUse::of(&use_("x", "Bash", "make")).unwrap();
        let c = t.result(
            &result(Some("x"), false, Some("built"), Some(0)),
            9,
            Some(&earlier),
        );
        assert_eq!(c.new_part, Some(0));
        assert_eq!(t.render(0), "▶ `make` → ✅ exit 0\n```\nbuilt\n```");
    }

    #[test]
    fn output_and_commands_cannot_ping_break_out_or_hide() {
        let mut t = turn();
        let evil = "echo '@everyone <@123> <@&456> ```' \u{202e}txt.exe\u{200b}";
        t.add(ToolUse::of(&use_("a", "Bash", evil)).unwrap());
        let out = "@everyone <@123> <@&456>\n```\n**bold** \u{202e}gnp.exe\n```";
        t.result(&result(Some("a"), false, Some(out), Some(0)), 6, None);
        let shown = t.render(0);
        // The command is inline code, without a backtick of its own; hidden characters are written out.
        assert!(
            shown.starts_with("▶ `echo '@everyone <@123> <@&456> ˋˋˋ' <U+202E>txt.exe<U+200B>`"),
            "{shown}"
        );
        // The output stays inside one block: exactly one opening and one closing fence.
        assert_eq!(shown.matches("```").count(), 2, "{shown}");
        assert!(shown.ends_with("\n```"));
        assert!(shown.contains("<U+202E>gnp.exe"));
        assert!(!shown.contains('\u{202e}'));
        // Every @everyone and user or role mention is inside code, where Discord does not ping (and the
        // follower posts with allowed_mentions empty besides).
        let outside_code: String = shown
            .split("```")
            .step_by(2)
            .flat_map(|s| s.split('`').step_by(2))
            .collect();
        assert!(!outside_code.contains('@'), "{outside_code}");
        // A tool name from an MCP server is not Markdown.
        let mut t = turn();
        t.add(ToolUse::of(&use_("m", "mcp__x__@everyone", "a")).unwrap());
        t.add(ToolUse::of(&use_("n", "Edit", "a")).unwrap());
        assert!(!t.render(0).contains("@everyone"));
    }
}
