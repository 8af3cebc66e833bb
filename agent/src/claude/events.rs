//! The stream-json lines the CLI prints, parsed into the few shapes the runner acts on ([`CliEvent`]), and
//! the typed events a [`Session`](super::Session) hands to its owner ([`RunnerEvent`]).
//!
//! Parsing is by hand over `serde_json::Value` rather than strict structs: the CLI adds fields between
//! versions, and a line we do not understand is kept as [`CliEvent::Other`] (forwarded as
//! [`RunnerEvent::Raw`]) instead of failing the task.

use ct_protocol::scope::{main_field, SessionScope};
use serde_json::Value;

use super::TaskError;

/// Longest text kept for a tool summary or a tool result preview; the full data stays in the transcript.
const SUMMARY_CHARS: usize = 300;
const RESULT_PREVIEW_CHARS: usize = 2000;

/// What a session reports to its owner, in the order it happened.
#[derive(Debug, Clone, PartialEq)]
pub enum RunnerEvent {
    /// A turn started (the CLI sends `system/init` at the start of every turn).
    Init(Init),
    /// Text the model wrote.
    AssistantText { text: String },
    /// The model called a tool; `summary` is the file path, command, pattern or URL it acts on.
    ToolUse {
        id: String,
        name: String,
        summary: String,
        /// The whole input, for what is shown of the use (a Bash command in full, an edit's diff).
        input: Value,
    },
    /// A tool finished; `text` is a preview of what it returned.
    ToolResult {
        tool_use_id: String,
        is_error: bool,
        text: String,
        /// All of what it returned, as text (bounded only by the CLI's line limit).
        full: String,
        /// The CLI's `tool_use_result` for it: `structuredPatch` of an edit, `stdout` of Bash, ...
        structured: Value,
    },
    /// How much of the context window the conversation takes up now: after each model call (its usage) and
    /// after each turn (the CLI's `get_context_usage`, which also gives the window).
    Context { tokens: u64, window: Option<u64> },
    /// The CLI asks whether a tool may run: answer with [`Session::decide`](super::Session::decide).
    ApprovalRequested(ApprovalRequest),
    /// The CLI withdrew a pending approval (the turn was interrupted); a late decision is ignored.
    ApprovalWithdrawn { id: String },
    /// Nobody decided within the approval timeout: the tool use was denied.
    ApprovalTimedOut { id: String },
    /// An earlier "allow for the session" rule covers this request, so it was allowed without asking.
    ApprovalAutoAllowed {
        id: String,
        tool: String,
        /// What the use acts on ([`summarize_tool_input`]).
        summary: String,
        /// The rule that allowed it.
        rule: SessionScope,
    },
    /// The approver allowed a use for the session: from now on `rule` is answered without asking.
    RuleAdded { rule: SessionScope },
    /// A prompt arrived while a turn was running; it is sent when the queue before it has run.
    Queued { position: usize },
    /// A turn ended.
    TurnResult(TurnResult),
    /// The task cannot go on, for a reason the user can act on (e.g. not logged in).
    Failed(TaskError),
    /// Something went wrong reading the CLI (a line over the size limit, a read error); the session goes on.
    Error { message: String },
    /// Any other line worth forwarding (`system/task_started`, `system/api_retry`, ...), as the CLI printed it.
    Raw(Value),
    /// The CLI process ended; always the last event.
    Exited(ExitInfo),
}

/// How the CLI process ended.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ExitInfo {
    /// Exit code, if it exited by itself.
    pub code: Option<i32>,
    /// The signal that ended it, if any.
    pub signal: Option<i32>,
    /// The end of what it wrote to stderr, for failure messages.
    pub stderr_tail: String,
}

/// `system/init`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Init {
    pub session_id: String,
    pub model: String,
    pub cwd: String,
    pub tools: Vec<String>,
    pub version: String,
    pub permission_mode: String,
    /// `none` when the CLI found no API key (which is also the case for a claude.ai login).
    pub api_key_source: String,
}

/// A `can_use_tool` control request.
#[derive(Debug, Clone, PartialEq)]
pub struct ApprovalRequest {
    /// The control request id, to pass to [`Session::decide`](super::Session::decide).
    pub id: String,
    pub tool: String,
    pub input: Value,
    /// The CLI's short description (often the file name).
    pub description: Option<String>,
    /// What the CLI would change to allow this kind of call from now on (rules, modes, with destinations).
    pub suggestions: Vec<Value>,
    pub tool_use_id: Option<String>,
    pub decision_reason: Option<String>,
    pub blocked_path: Option<String>,
}

/// A `result` event: one turn ended.
#[derive(Debug, Clone, PartialEq)]
pub struct TurnResult {
    /// `success`, `error_max_turns`, `error_max_budget_usd`, `error_during_execution`.
    pub subtype: String,
    pub is_error: bool,
    /// The final text (absent on error results other than API errors).
    pub text: Option<String>,
    /// Error details of error results.
    pub errors: Vec<String>,
    pub session_id: String,
    /// Cumulative for the process.
    pub total_cost_usd: Option<f64>,
    /// API round trips of this turn.
    pub num_turns: Option<u64>,
    pub duration_ms: Option<u64>,
    pub usage: Value,
    pub api_error_status: Option<u64>,
    pub permission_denials: Vec<Value>,
}

/// One tool result inside a `user` event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolResultBlock {
    pub tool_use_id: String,
    pub is_error: bool,
    pub text: String,
    /// The whole content as text (`text` is its preview).
    pub full: String,
    /// The line's `tool_use_result` (the CLI prints one per line), given to the line's only result; `Null`
    /// when there is none or the line carries several results.
    pub structured: Value,
}

/// One model call's share of the context, from the `usage` of an `assistant` event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallUsage {
    pub message_id: String,
    /// Input, cache-read and cache-written tokens: what the call had in context.
    pub context_tokens: u64,
}

impl CallUsage {
    fn of(message: &Value) -> Option<Self> {
        let usage = message.get("usage")?;
        let n = |k: &str| usage[k].as_u64().unwrap_or(0);
        Some(Self {
            message_id: s(&message["id"]),
            context_tokens: n("input_tokens")
                .saturating_add(n("cache_read_input_tokens"))
                .saturating_add(n("cache_creation_input_tokens")),
        })
    }
}

/// The answer to `get_context_usage`: tokens in context and the window, as the CLI counts them.
pub fn context_usage(response: &Value) -> Option<(u64, Option<u64>)> {
    let tokens = response["totalTokens"].as_u64()?;
    Some((tokens, response["maxTokens"].as_u64().filter(|w| *w > 0)))
}

/// A stdout line, as far as the runner cares.
#[derive(Debug, Clone, PartialEq)]
pub enum CliEvent {
    Init(Init),
    /// An `assistant` event: text and tool uses, plus the `error` of synthetic messages
    /// (`authentication_failed`, ...).
    Assistant {
        texts: Vec<String>,
        tool_uses: Vec<(String, String, Value)>,
        error: Option<String>,
        /// The model call this block belongs to (the CLI prints one event per content block, each with the
        /// call's usage), and the tokens that call had in context.
        call: Option<CallUsage>,
    },
    /// A `user` event carrying tool results.
    ToolResults(Vec<ToolResultBlock>),
    Result(TurnResult),
    CanUseTool(ApprovalRequest),
    /// `control_cancel_request`: the CLI withdraws the request with this id.
    CancelRequest {
        request_id: String,
    },
    /// A control request of a subtype this agent does not handle (a newer CLI's, or one we never enabled). The
    /// CLI waits for an answer, so it gets an error response rather than silence.
    UnknownControlRequest {
        request_id: String,
        subtype: String,
    },
    /// The answer to a control request we sent.
    ControlResponse {
        request_id: String,
        error: Option<String>,
        /// The answer's `response` object on success.
        response: Value,
    },
    /// Anything else, including lines that are not JSON (as a JSON string).
    Other(Value),
}

fn s(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_owned()
}

fn opt_s(v: &Value) -> Option<String> {
    v.as_str().map(str::to_owned)
}

/// Parses one stdout line. Never fails: what is not understood comes back as [`CliEvent::Other`].
pub fn parse_line(line: &[u8]) -> CliEvent {
    match serde_json::from_slice::<Value>(line) {
        Ok(v) => parse_value(v),
        Err(_) => CliEvent::Other(Value::String(String::from_utf8_lossy(line).into_owned())),
    }
}

/// [`parse_line`] for an already parsed value.
pub fn parse_value(mut v: Value) -> CliEvent {
    match (v["type"].as_str(), v["subtype"].as_str()) {
        (Some("system"), Some("init")) => CliEvent::Init(Init {
            session_id: s(&v["session_id"]),
            model: s(&v["model"]),
            cwd: s(&v["cwd"]),
            tools: v["tools"]
                .as_array()
                .map(|t| {
                    t.iter()
                        .filter_map(|x| x.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default(),
            version: s(&v["claude_code_version"]),
            permission_mode: s(&v["permissionMode"]),
            api_key_source: s(&v["apiKeySource"]),
        }),
        (Some("assistant"), _) => {
            let mut texts = Vec::new();
            let mut tool_uses = Vec::new();
            for block in v["message"]["content"].as_array().into_iter().flatten() {
                match block["type"].as_str() {
                    Some("text") => texts.push(s(&block["text"])),
                    Some("tool_use") => {
                        tool_uses.push((s(&block["id"]), s(&block["name"]), block["input"].clone()))
                    }
                    _ => {}
                }
            }
            CliEvent::Assistant {
                texts,
                tool_uses,
                error: opt_s(&v["error"]),
                // A subagent's calls (the Task tool) have a context of their own, not the conversation's.
                call: v["parent_tool_use_id"]
                    .is_null()
                    .then(|| CallUsage::of(&v["message"]))
                    .flatten(),
            }
        }
        (Some("user"), _) => {
            let is_result = |b: &&Value| b["type"] == "tool_result";
            let n = v["message"]["content"]
                .as_array()
                .map_or(0, |c| c.iter().filter(is_result).count());
            // The CLI's structured result (an edit's whole original file, ...) is moved, never copied: it goes
            // to the line's only result.
            let mut structured = if n == 1 {
                v["tool_use_result"].take()
            } else {
                Value::Null
            };
            let blocks: Vec<ToolResultBlock> = v["message"]["content"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(is_result)
                .map(|b| {
                    let full = content_text(&b["content"]);
                    ToolResultBlock {
                        tool_use_id: s(&b["tool_use_id"]),
                        is_error: b["is_error"].as_bool().unwrap_or(false),
                        text: cut(&full, RESULT_PREVIEW_CHARS),
                        full,
                        structured: structured.take(),
                    }
                })
                .collect();
            if blocks.is_empty() {
                CliEvent::Other(v)
            } else {
                CliEvent::ToolResults(blocks)
            }
        }
        (Some("result"), _) => CliEvent::Result(TurnResult {
            subtype: s(&v["subtype"]),
            is_error: v["is_error"].as_bool().unwrap_or(false),
            text: opt_s(&v["result"]),
            errors: v["errors"]
                .as_array()
                .map(|e| {
                    e.iter()
                        .map(|x| x.as_str().map_or_else(|| x.to_string(), str::to_owned))
                        .collect()
                })
                .unwrap_or_default(),
            session_id: s(&v["session_id"]),
            total_cost_usd: v["total_cost_usd"].as_f64(),
            num_turns: v["num_turns"].as_u64(),
            duration_ms: v["duration_ms"].as_u64(),
            usage: v["usage"].clone(),
            api_error_status: v["api_error_status"].as_u64(),
            permission_denials: v["permission_denials"]
                .as_array()
                .cloned()
                .unwrap_or_default(),
        }),
        (Some("control_request"), _) if v["request"]["subtype"] == "can_use_tool" => {
            let r = &v["request"];
            CliEvent::CanUseTool(ApprovalRequest {
                id: s(&v["request_id"]),
                tool: s(&r["tool_name"]),
                input: r["input"].clone(),
                description: opt_s(&r["description"]),
                suggestions: r["permission_suggestions"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default(),
                tool_use_id: opt_s(&r["tool_use_id"]),
                decision_reason: match &r["decision_reason"] {
                    Value::Null => None,
                    Value::String(s) => Some(s.clone()),
                    other => Some(other.to_string()),
                },
                blocked_path: opt_s(&r["blocked_path"]),
            })
        }
        (Some("control_request"), _) => CliEvent::UnknownControlRequest {
            request_id: s(&v["request_id"]),
            subtype: v["request"]["subtype"]
                .as_str()
                .unwrap_or("(none)")
                .to_owned(),
        },
        (Some("control_cancel_request"), _) => CliEvent::CancelRequest {
            request_id: s(&v["request_id"]),
        },
        (Some("control_response"), _) => {
            let r = &v["response"];
            CliEvent::ControlResponse {
                request_id: s(&r["request_id"]),
                error: (r["subtype"] == "error").then(|| {
                    r["error"]
                        .as_str()
                        .map_or_else(|| r.to_string(), str::to_owned)
                }),
                response: r["response"].clone(),
            }
        }
        _ => CliEvent::Other(v),
    }
}

/// Which kind of line `v` is, as `type` or `type/subtype`, for logging what the runner skips.
pub fn kind(v: &Value) -> String {
    match (v["type"].as_str(), v["subtype"].as_str()) {
        (Some(t), Some(sub)) => format!("{t}/{sub}"),
        (Some(t), None) => t.to_owned(),
        (None, _) if v.is_string() => "(not JSON)".to_owned(),
        (None, _) => "(no type)".to_owned(),
    }
}

/// Kinds of lines the CLI prints that the runner has no use for: skipped without a word in the log.
const KNOWN_UNUSED: &[&str] = &[
    "system/task_started",
    "system/task_notification",
    "system/task_progress",
    "system/api_retry",
    "system/status",
    "system/compact_boundary",
    "system/hook_started",
    "system/hook_response",
    "stream_event",
    "rate_limit_event",
    "user",
];

/// Whether a skipped line is of a kind the runner knows it does not need (as opposed to one it has never seen).
pub fn is_known_unused(kind: &str) -> bool {
    KNOWN_UNUSED.contains(&kind)
}

/// What the user is told when Claude Code compacted the conversation (`/compact`, or by itself when the context
/// filled up), from its `system/compact_boundary` line; `None` for any other line. As printed by 2.1.332:
/// `{"type":"system","subtype":"compact_boundary","compact_metadata":{"trigger":"manual","pre_tokens":13,
/// "post_tokens":2540,"duration_ms":34,...},...}`. The session forwards the line as [`RunnerEvent::Raw`].
pub fn compaction_notice(v: &Value) -> Option<String> {
    if v["type"] != "system" || v["subtype"] != "compact_boundary" {
        return None;
    }
    let meta = &v["compact_metadata"];
    let how = if meta["trigger"] == "auto" {
        " automatically"
    } else {
        ""
    };
    Some(match meta["pre_tokens"].as_u64() {
        Some(n) => format!("🗜️ Context compacted{how} ({n} tokens before)."),
        None => format!("🗜️ Context compacted{how}."),
    })
}

/// A tool result's content as text: a string, or the text blocks of an array.
fn content_text(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(blocks) => blocks
            .iter()
            .filter_map(|b| b["text"].as_str())
            .collect::<Vec<_>>()
            .join("\n"),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// What a call of `tool` acts on, in one short line: its command, path, pattern or URL ([`main_field`]);
/// for other tools the first such field found, else the input itself. Never the model's `description` of a
/// known tool.
pub fn summarize_tool_input(tool: &str, input: &Value) -> String {
    if let Some(key) = main_field(tool) {
        return match input[key].as_str() {
            Some(v) => cut(v, SUMMARY_CHARS),
            None => cut(&input.to_string(), SUMMARY_CHARS),
        };
    }
    for key in [
        "file_path",
        "notebook_path",
        "command",
        "pattern",
        "url",
        "query",
        "path",
        "description",
    ] {
        if let Some(v) = input[key].as_str() {
            return cut(v, SUMMARY_CHARS);
        }
    }
    cut(&input.to_string(), SUMMARY_CHARS)
}

/// `text` cut to `max` characters (on a char boundary) with an ellipsis.
pub(crate) fn cut(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_owned(),
    }
}

/// Whether an event belongs to a logged-out CLI: the synthetic `authentication_failed` assistant message or a
/// result saying `Not logged in · Please run /login`. (An invalid key gives `Invalid API key`, which is not
/// this: the user is "logged in" with a bad key, and the result says so.)
pub fn is_logged_out_text(text: &str) -> bool {
    text.starts_with("Not logged in") || text.contains("Please run /login")
}

/// Tools whose result is best shown as the change they made.
pub fn is_edit_tool(tool: &str) -> bool {
    matches!(tool, "Edit" | "Write" | "MultiEdit" | "NotebookEdit")
}

/// Bash's exit status as the CLI reports it: a failed command's result starts with `Exit code N`; a
/// successful one says nothing, which means 0. `None` when the result says neither (an error of the tool
/// itself, such as a refused command).
pub fn bash_exit_code(is_error: bool, text: &str) -> Option<i32> {
    if !is_error {
        return Some(0);
    }
    let first = text.lines().next()?.trim();
    first.strip_prefix("Exit code ")?.trim().parse().ok()
}

/// The change an edit made, as a unified diff: from the CLI's `structuredPatch` when it printed one (2.1.332
/// does, for Edit, MultiEdit and Write over an existing file), else from the tool's input (a new file is all
/// `+`; an Edit is its old and new strings). `None` for other tools or when there is nothing to show.
pub fn edit_diff(tool: &str, input: &Value, structured: &Value) -> Option<String> {
    if !is_edit_tool(tool) {
        return None;
    }
    let path = structured["filePath"]
        .as_str()
        .or_else(|| input["file_path"].as_str())
        .or_else(|| input["notebook_path"].as_str())
        .unwrap_or("(file)");
    let mut out = String::new();
    if let Some(hunks) = structured["structuredPatch"]
        .as_array()
        .filter(|h| !h.is_empty())
    {
        out.push_str(&format!("--- {path}\n+++ {path}\n"));
        for h in hunks {
            let n = |k: &str| h[k].as_u64().unwrap_or(0);
            out.push_str(&format!(
                "@@ -{},{} +{},{} @@\n",
                n("oldStart"),
                n("oldLines"),
                n("newStart"),
                n("newLines")
            ));
            for line in h["lines"].as_array().into_iter().flatten() {
                out.push_str(line.as_str().unwrap_or_default());
                out.push('\n');
            }
        }
        return Some(out);
    }
    let created = structured["type"] == "create" || structured["originalFile"].is_null();
    let plus = |out: &mut String, text: &str| {
        for line in text.lines() {
            out.push('+');
            out.push_str(line);
            out.push('\n');
        }
    };
    let minus = |out: &mut String, text: &str| {
        for line in text.lines() {
            out.push('-');
            out.push_str(line);
            out.push('\n');
        }
    };
    match tool {
        "Write" => {
            let content = structured["content"]
                .as_str()
                .or_else(|| input["content"].as_str())?;
            let from = if created && structured.is_object() {
                "/dev/null"
            } else {
                path
            };
            out.push_str(&format!(
                "--- {from}\n+++ {path}\n@@ -0,0 +1,{} @@\n",
                content.lines().count()
            ));
            plus(&mut out, content);
        }
        "Edit" => {
            out.push_str(&format!("--- {path}\n+++ {path}\n@@ @@\n"));
            minus(&mut out, input["old_string"].as_str()?);
            plus(&mut out, input["new_string"].as_str()?);
        }
        "MultiEdit" => {
            out.push_str(&format!("--- {path}\n+++ {path}\n"));
            for e in input["edits"].as_array()? {
                out.push_str("@@ @@\n");
                minus(&mut out, e["old_string"].as_str().unwrap_or_default());
                plus(&mut out, e["new_string"].as_str().unwrap_or_default());
            }
        }
        "NotebookEdit" => {
            let cell = input["cell_id"].as_str().unwrap_or("new cell");
            out.push_str(&format!(
                "--- {path} ({cell})\n+++ {path} ({cell})\n@@ @@\n"
            ));
            plus(&mut out, input["new_source"].as_str().unwrap_or_default());
        }
        _ => return None,
    }
    Some(out)
}

/// `text` within `max` bytes: whole when it fits, else its head and its tail (the end of a build log is what
/// people look for) around a line saying how much was left out. Returns the original size when cut.
pub fn head_and_tail(text: &str, max: usize) -> (String, Option<u64>) {
    if text.len() <= max {
        return (text.to_owned(), None);
    }
    let note = format!("\n[… {} bytes left out …]\n", text.len());
    let room = max.saturating_sub(note.len() + 8);
    let mut head = room / 4;
    while !text.is_char_boundary(head) {
        head -= 1;
    }
    let mut tail = text.len() - (room - head);
    while !text.is_char_boundary(tail) {
        tail += 1;
    }
    (
        format!("{}{note}{}", &text[..head], &text[tail..]),
        Some(text.len() as u64),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_the_lines_that_matter_and_keeps_the_rest() {
        let init = parse_line(
            br#"{"type":"system","subtype":"init","session_id":"s1","model":"m","cwd":"/p","tools":["Bash","Write"],"claude_code_version":"2.1.197","permissionMode":"default","apiKeySource":"none"}"#,
        );
        assert!(
            matches!(&init, CliEvent::Init(i) if i.tools.len() == 2 && i.api_key_source == "none")
        );

        let ask = parse_line(
            br#"{"type":"control_request","request_id":"r1","request":{"subtype":"can_use_tool","tool_name":"Write","input":{"file_path":"/p/a"},"permission_suggestions":[{"type":"setMode"}],"tool_use_id":"t1"}}"#,
        );
        assert!(
            matches!(&ask, CliEvent::CanUseTool(a) if a.id == "r1" && a.tool == "Write" && a.suggestions.len() == 1)
        );

        let result = parse_line(
            br#"{"type":"result","subtype":"error_during_execution","is_error":true,"errors":["x"],"num_turns":3,"session_id":"s1"}"#,
        );
        assert!(
            matches!(&result, CliEvent::Result(r) if r.text.is_none() && r.errors == ["x"] && r.num_turns == Some(3))
        );

        let tr = parse_line(
            br#"{"type":"user","message":{"content":[{"type":"tool_result","tool_use_id":"t1","is_error":true,"content":"nope"}]}}"#,
        );
        assert_eq!(
            tr,
            CliEvent::ToolResults(vec![ToolResultBlock {
                tool_use_id: "t1".into(),
                is_error: true,
                text: "nope".into(),
                full: "nope".into(),
                structured: Value::Null,
            }])
        );
        assert_eq!(
            parse_line(br#"{"type":"control_cancel_request","request_id":"r1"}"#),
            CliEvent::CancelRequest {
                request_id: "r1".into()
            }
        );
        let said = parse_line(
            br#"{"type":"assistant","message":{"id":"msg_1","content":[{"type":"text","text":"hi"}],"usage":{"input_tokens":5000,"output_tokens":1,"cache_read_input_tokens":20000,"cache_creation_input_tokens":300}}}"#,
        );
        assert!(matches!(
            &said,
            CliEvent::Assistant { call: Some(c), .. } if c.message_id == "msg_1" && c.context_tokens == 25_300
        ));
        let sub = parse_line(
            br#"{"type":"assistant","parent_tool_use_id":"toolu_1","message":{"id":"msg_2","content":[],"usage":{"input_tokens":9}}}"#,
        );
        assert!(
            matches!(&sub, CliEvent::Assistant { call: None, .. }),
            "{sub:?}"
        );
        // As 2.1.332 answers `get_context_usage` (trimmed).
        let ctx = parse_line(
            br#"{"type":"control_response","response":{"subtype":"success","request_id":"ct-ctx-1","response":{"totalTokens":25300,"maxTokens":1000000,"percentage":3}}}"#,
        );
        let CliEvent::ControlResponse {
            request_id,
            error: None,
            response,
        } = ctx
        else {
            panic!("not a control response: {ctx:?}");
        };
        assert_eq!(request_id, "ct-ctx-1");
        assert_eq!(context_usage(&response), Some((25_300, Some(1_000_000))));
        assert_eq!(context_usage(&json!({"error": "x"})), None);
        assert!(matches!(
            parse_line(b"not json"),
            CliEvent::Other(Value::String(_))
        ));
        assert!(matches!(
            parse_line(br#"{"type":"system","subtype":"api_retry"}"#),
            CliEvent::Other(_)
        ));
    }

    #[test]
    fn summaries_pick_the_path_or_command() {
        assert_eq!(
            summarize_tool_input("Write", &json!({"file_path": "/a/b", "content": "x"})),
            "/a/b"
        );
        // An extra field does not stand in for what a known tool acts on.
        assert_eq!(
            summarize_tool_input(
                "Bash",
                &json!({"command": "rm -rf ~", "file_path": "README.md", "description": "read"})
            ),
            "rm -rf ~"
        );
        assert_eq!(
            summarize_tool_input(
                "mcp__x__y",
                &json!({"url": "https://x", "description": "d"})
            ),
            "https://x"
        );
        assert_eq!(
            summarize_tool_input(
                "Bash",
                &json!({"command": "sleep 300", "description": "Wait"})
            ),
            "sleep 300"
        );
        assert_eq!(cut("héllo", 2), "hé…");
    }

    #[test]
    fn compaction_is_told_in_words() {
        let manual = json!({"type":"system","subtype":"compact_boundary",
            "compact_metadata":{"trigger":"manual","pre_tokens":13,"post_tokens":2540}});
        assert_eq!(
            compaction_notice(&manual).as_deref(),
            Some("🗜️ Context compacted (13 tokens before).")
        );
        let auto = json!({"type":"system","subtype":"compact_boundary",
            "compact_metadata":{"trigger":"auto"}});
        assert_eq!(
            compaction_notice(&auto).as_deref(),
            Some("🗜️ Context compacted automatically.")
        );
        let status = json!({"type":"system","subtype":"status","status":"compacting"});
        assert_eq!(compaction_notice(&status), None);
    }

    #[test]
    fn edits_become_unified_diffs_from_the_clis_patch_or_the_input() {
        // What CLI 2.1.332 printed for an Edit (tool_use_result).
        let edit = json!({"filePath":"/p/f.txt","oldString":"beta","newString":"BETA",
            "structuredPatch":[{"oldStart":1,"oldLines":3,"newStart":1,"newLines":3,
            "lines":[" alpha","-beta","+BETA"," gamma"]}]});
        assert_eq!(
            edit_diff("Edit", &json!({}), &edit).unwrap(),
            "--- /p/f.txt\n+++ /p/f.txt\n@@ -1,3 +1,3 @@\n alpha\n-beta\n+BETA\n gamma\n"
        );
        // A new file: the CLI's patch is empty; all of it is added.
        let create = json!({"type":"create","filePath":"/p/g.txt","content":"a\nb\n","structuredPatch":[],"originalFile":null});
        assert_eq!(
            edit_diff("Write", &json!({}), &create).unwrap(),
            "--- /dev/null\n+++ /p/g.txt\n@@ -0,0 +1,2 @@\n+a\n+b\n"
        );
        // An older CLI that printed no patch: from the input.
        let d = edit_diff(
            "Edit",
            &json!({"file_path":"/p/f","old_string":"x\ny","new_string":"z"}),
            &Value::Null,
        )
        .unwrap();
        assert!(d.contains("-x\n-y\n+z\n"), "{d}");
        assert_eq!(edit_diff("Read", &json!({"file_path":"/p"}), &edit), None);
    }

    #[test]
    fn exit_codes_and_bounded_output() {
        assert_eq!(bash_exit_code(true, "Exit code 3\nhello"), Some(3));
        assert_eq!(bash_exit_code(false, "hello"), Some(0));
        assert_eq!(bash_exit_code(true, "Blocked: standalone sleep"), None);
        let (whole, cut) = head_and_tail("short", 100);
        assert_eq!((whole.as_str(), cut), ("short", None));
        let long = format!("START{}END", "é".repeat(100_000));
        let (kept, cut) = head_and_tail(&long, 4096);
        assert!(kept.len() <= 4096, "{}", kept.len());
        assert!(kept.starts_with("START") && kept.ends_with("END"));
        assert_eq!(cut, Some(long.len() as u64));
        assert!(kept.contains("bytes left out"));
    }

    #[test]
    fn logged_out_texts() {
        assert!(is_logged_out_text("Not logged in · Please run /login"));
        assert!(!is_logged_out_text(
            "Invalid API key · Fix external API key"
        ));
    }
}
