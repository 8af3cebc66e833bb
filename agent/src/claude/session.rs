//! [`Session`]: one live Claude Code process and the actor task that owns it.
//!
//! The actor is the only thing that touches the process: it writes prompts and control messages to stdin,
//! reads parsed stdout lines from a reader task, keeps the pending approvals with their deadlines, and emits
//! [`RunnerEvent`]s in order on one channel. The [`Session`] handle only sends it commands, none of which wait
//! for the actor, so a caller that is slow to read events cannot deadlock it. Dropping the handle kills the
//! process tree.
//!
//! Rules taken from the CLI's observed behaviour (testkit/CLAUDE-NOTES.md):
//! - a prompt sent while a turn runs would be injected into that turn without a result of its own, so prompts
//!   are queued here and sent one per `result`;
//! - `updatedInput` is required on allow and `message` on deny;
//! - a `control_cancel_request` withdraws a pending `can_use_tool`, which must then not be answered;
//! - "allow for the session" is remembered here as narrow rules ([`SessionScope`]), never as the CLI's own
//!   permission rules: the actor answers a request a rule covers itself and reports it
//!   ([`RunnerEvent::ApprovalAutoAllowed`]), so every such use is seen; the rules end with
//!   [`Session::forget_rules`] (the agent calls it when the process is handed to a follow-up task);
//! - SIGTERM orphans the Bash tool's children, so cancel goes interrupt → SIGINT → close stdin → SIGKILL of
//!   the whole tree.

use std::collections::{HashMap, HashSet, VecDeque};
use std::os::fd::AsRawFd as _;
use std::os::unix::process::ExitStatusExt as _;
use std::process::{ExitStatus, Stdio};

use ct_protocol::scope::SessionScope;
use serde_json::{json, Value};
use tokio::io::{AsyncWriteExt as _, BufReader};
use tokio::process::{Child, ChildStdin};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::Instrument as _;

use super::events::{self, parse_line, CliEvent, ExitInfo, RunnerEvent};
use super::process::{self, BoundedLine, ProcInfo, StderrTail, MAX_LINE};
use super::{preflight, Decision, SessionSpec, TaskError};

/// Events buffered for a slow reader before the actor stops reading the CLI (which then blocks writing).
const EVENT_BUFFER: usize = 1024;
/// Parsed lines between the reader task and the actor.
const LINE_BUFFER: usize = 64;
/// Most session rules one process keeps; past it, "allow for the session" allows that one use only.
const MAX_RULES: usize = 256;

/// A handle on one live CLI process. Commands return at once; what happens shows up as [`RunnerEvent`]s.
#[derive(Debug)]
pub struct Session {
    cmds: mpsc::UnboundedSender<Command>,
    pid: u32,
    session_id: watch::Receiver<Option<String>>,
    exit: watch::Receiver<Option<ExitInfo>>,
}

#[derive(Debug)]
enum Command {
    /// A user message's content: a string, or content blocks (text and images).
    Send(Value),
    Decide(String, Decision),
    ForgetRules,
    Interrupt,
    Cancel,
    Close,
}

impl Session {
    /// Checks that `claude` is installed and new enough, then spawns it in `spec.cwd` in its own process
    /// group. Returns the handle and the event stream (which ends after [`RunnerEvent::Exited`]).
    pub async fn start(
        spec: SessionSpec,
    ) -> Result<(Session, mpsc::Receiver<RunnerEvent>), TaskError> {
        let bin = spec.find_claude()?;
        preflight::check_version(&bin, spec.min_version).await?;

        let spawn_err = |detail: String| TaskError::Spawn {
            bin: bin.display().to_string(),
            cwd: spec.cwd.display().to_string(),
            detail,
        };
        if !spec.cwd.is_dir() {
            return Err(spawn_err("the project folder does not exist".into()));
        }
        let mut cmd = match spec.wrapper.split_first() {
            Some((wrapper, wrapper_args)) => {
                let mut cmd = tokio::process::Command::new(wrapper);
                cmd.args(wrapper_args).arg(&bin);
                cmd
            }
            None => tokio::process::Command::new(&bin),
        };
        if spec.env_clear {
            cmd.env_clear();
            for key in ["PATH", "LANG"] {
                if let Some(v) = std::env::var_os(key) {
                    cmd.env(key, v);
                }
            }
        }
        cmd.envs(spec.env.iter().map(|(k, v)| (k, v)))
            .args(spec.args())
            .current_dir(&spec.cwd)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own group, so the tree can be signalled without touching the agent.
            .process_group(0)
            .kill_on_drop(true);
        crate::sys::inherit_fds(
            &mut cmd,
            spec.inherit_fds.iter().map(|fd| fd.as_raw_fd()).collect(),
        );
        let mut child = cmd.spawn().map_err(|e| spawn_err(e.to_string()))?;
        let pid = child
            .id()
            .ok_or_else(|| spawn_err("it exited at once".into()))?;
        let (stdin, stdout, stderr) =
            match (child.stdin.take(), child.stdout.take(), child.stderr.take()) {
                (Some(i), Some(o), Some(e)) => (i, o, e),
                _ => return Err(spawn_err("its pipes are missing".into())),
            };

        let span = tracing::info_span!("claude", pid, cwd = %spec.cwd.display());
        let stderr_tail = StderrTail::default();
        let stderr_task =
            tokio::spawn(stderr_tail.clone().collect(stderr).instrument(span.clone()));
        let (line_tx, line_rx) = mpsc::channel(LINE_BUFFER);
        let reader_task = tokio::spawn(read_stdout(stdout, line_tx).instrument(span.clone()));

        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let (event_tx, event_rx) = mpsc::channel(EVENT_BUFFER);
        let (session_id_tx, session_id_rx) = watch::channel(spec.resume.clone());
        let (exit_tx, exit_rx) = watch::channel(None);
        let actor = Actor {
            host: crate::sys::hostname().unwrap_or_else(|| "this machine".into()),
            spec,
            child,
            pid,
            stdin: Some(stdin),
            lines: line_rx,
            cmds: cmd_rx,
            events: event_tx,
            stderr: stderr_tail,
            tasks: vec![stderr_task, reader_task],
            session_id: session_id_tx,
            exit: exit_tx,
            turn_running: false,
            queue: VecDeque::new(),
            closing: false,
            pending: HashMap::new(),
            rules: Vec::new(),
            unknown_kinds: HashSet::new(),
            next_request: 1,
            context_request: None,
            context_refused: false,
            context_window: None,
            last_call: None,
            logged_out: false,
            cancel: None,
            tree: Vec::new(),
            exited: None,
        };
        tokio::spawn(actor.run().instrument(span));
        Ok((
            Session {
                cmds: cmd_tx,
                pid,
                session_id: session_id_rx,
                exit: exit_rx,
            },
            event_rx,
        ))
    }

    /// The CLI's process id (also its process group id).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The session id, once the CLI has reported it (or the id being resumed).
    pub fn session_id(&self) -> Option<String> {
        self.session_id.borrow().clone()
    }

    /// Sends a prompt; while a turn runs it is queued ([`RunnerEvent::Queued`]) and sent after the turn's
    /// result.
    pub fn send(&self, prompt: impl Into<String>) -> Result<(), TaskError> {
        self.command(Command::Send(Value::String(prompt.into())))
    }

    /// [`send`](Self::send) with content blocks (text, then images) instead of a string.
    pub fn send_content(&self, content: Value) -> Result<(), TaskError> {
        self.command(Command::Send(content))
    }

    /// Answers the approval request `id`. A decision for a request that was withdrawn, timed out or already
    /// answered is ignored.
    pub fn decide(&self, id: &str, decision: Decision) -> Result<(), TaskError> {
        self.command(Command::Decide(id.to_owned(), decision))
    }

    /// Drops every "allow for the session" rule: later requests ask again. Ordered with the other commands,
    /// so a prompt sent after this call is never answered by an older rule.
    pub fn forget_rules(&self) -> Result<(), TaskError> {
        self.command(Command::ForgetRules)
    }

    /// Ends the running turn (the `interrupt` control request) and drops queued prompts; the session stays
    /// alive for the next prompt.
    pub fn interrupt(&self) -> Result<(), TaskError> {
        self.command(Command::Interrupt)
    }

    /// No more prompts: the running turn and the queued prompts finish, then the CLI exits.
    pub fn close(&self) -> Result<(), TaskError> {
        self.command(Command::Close)
    }

    /// Stops the session: `interrupt`, then SIGINT, then closing stdin, then SIGKILL of the whole process tree,
    /// each step after [`SessionSpec::cancel_step`] without progress. Returns once the process is gone.
    pub async fn cancel(&self) -> ExitInfo {
        let _ = self.command(Command::Cancel);
        self.wait().await
    }

    /// Starts [`Session::cancel`] without waiting for it: the caller keeps reading events (it must, or the
    /// actor stalls on a full event channel) and sees [`RunnerEvent::Exited`] when the process is gone.
    pub fn start_cancel(&self) {
        let _ = self.command(Command::Cancel);
    }

    /// Waits until the process has exited and everything it started is gone.
    pub async fn wait(&self) -> ExitInfo {
        let mut exit = self.exit.clone();
        let info = match exit.wait_for(Option::is_some).await {
            Ok(info) => info.clone().unwrap_or_default(),
            Err(_) => ExitInfo::default(),
        };
        info
    }

    fn command(&self, cmd: Command) -> Result<(), TaskError> {
        self.cmds.send(cmd).map_err(|_| TaskError::SessionEnded)
    }
}

/// What the reader task passes on.
#[derive(Debug)]
enum ReadItem {
    Event(CliEvent),
    TooLong(usize),
    Failed(String),
}

async fn read_stdout(stdout: tokio::process::ChildStdout, tx: mpsc::Sender<ReadItem>) {
    let mut reader = BufReader::with_capacity(64 * 1024, stdout);
    loop {
        let item = match process::read_line_bounded(&mut reader, MAX_LINE).await {
            Ok(Some(BoundedLine::Line(line))) if line.trim_ascii().is_empty() => continue,
            Ok(Some(BoundedLine::Line(line))) => ReadItem::Event(parse_line(&line)),
            Ok(Some(BoundedLine::TooLong(n))) => ReadItem::TooLong(n),
            Ok(None) => return,
            Err(e) => ReadItem::Failed(e.to_string()),
        };
        let failed = matches!(item, ReadItem::Failed(_));
        if tx.send(item).await.is_err() || failed {
            return;
        }
    }
}

#[derive(Debug)]
struct Pending {
    tool: String,
    input: Value,
    suggestions: Vec<Value>,
    deadline: Instant,
}

/// Where a cancel is; each step has a deadline after which the next one is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CancelStep {
    Interrupted,
    Signalled,
    StdinClosed,
    Killed,
}

/// Kinds of unknown lines a session remembers (to log each once).
const MAX_UNKNOWN_KINDS: usize = 64;

#[derive(Debug)]
struct Actor {
    spec: SessionSpec,
    host: String,
    child: Child,
    pid: u32,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<ReadItem>,
    cmds: mpsc::UnboundedReceiver<Command>,
    events: mpsc::Sender<RunnerEvent>,
    stderr: StderrTail,
    tasks: Vec<JoinHandle<()>>,
    session_id: watch::Sender<Option<String>>,
    exit: watch::Sender<Option<ExitInfo>>,

    turn_running: bool,
    queue: VecDeque<Value>,
    /// No more prompts are accepted; stdin is closed once the queue has run.
    closing: bool,
    pending: HashMap<String, Pending>,
    /// Uses allowed for the rest of the session (until [`Session::forget_rules`]).
    rules: Vec<SessionScope>,
    /// Kinds of lines and control requests skipped so far, so each is logged once.
    unknown_kinds: HashSet<String>,
    next_request: u64,
    /// The `get_context_usage` request awaiting its answer.
    context_request: Option<String>,
    /// The CLI could not answer `get_context_usage`.
    context_refused: bool,
    /// The model's context window, once the CLI said it.
    context_window: Option<u64>,
    /// The model call whose context was last reported.
    last_call: Option<String>,
    /// The CLI said it is not logged in during this turn.
    logged_out: bool,
    cancel: Option<(CancelStep, Instant)>,
    /// Processes below the CLI seen before stdin was closed, killed at the end if still there (after the CLI
    /// exits they are re-parented and no longer found below it).
    tree: Vec<ProcInfo>,
    exited: Option<ExitStatus>,
}

/// A deadline far enough away to mean "never" for a disabled `select!` branch.
fn never() -> Instant {
    Instant::now() + std::time::Duration::from_secs(86400 * 365)
}

impl Actor {
    async fn run(mut self) {
        let mut cmds_open = true;
        loop {
            let approval_deadline = self.pending.values().map(|p| p.deadline).min();
            let cancel_deadline = self.cancel.map(|(_, at)| at);
            tokio::select! {
                item = self.lines.recv() => match item {
                    Some(item) => self.on_item(item).await,
                    None => break,
                },
                cmd = self.cmds.recv(), if cmds_open => match cmd {
                    Some(cmd) => self.on_command(cmd).await,
                    None => {
                        // The handle is gone: nobody can answer or read, so stop everything now.
                        cmds_open = false;
                        tracing::debug!("session handle dropped: killing the CLI");
                        self.kill_now();
                        self.cancel = Some((CancelStep::Killed, Instant::now() + self.spec.cancel_step));
                    }
                },
                status = self.child.wait(), if self.exited.is_none() => {
                    self.exited = status.ok();
                    // Output still open after the exit means something else holds it: give it a moment.
                    if self.cancel.is_none() {
                        self.cancel = Some((CancelStep::StdinClosed, Instant::now() + self.spec.cancel_step));
                    }
                }
                () = tokio::time::sleep_until(approval_deadline.unwrap_or_else(never)), if approval_deadline.is_some() => {
                    self.expire_approvals().await;
                }
                () = tokio::time::sleep_until(cancel_deadline.unwrap_or_else(never)), if cancel_deadline.is_some() => {
                    if !self.cancel_next_step().await {
                        break;
                    }
                }
            }
        }
        self.finish().await;
    }

    async fn emit(&self, event: RunnerEvent) {
        // The receiver may be gone (the owner only cares about the exit); that is not an error.
        let _ = self.events.send(event).await;
    }

    async fn on_item(&mut self, item: ReadItem) {
        match item {
            ReadItem::Event(ev) => self.on_event(ev).await,
            ReadItem::TooLong(n) => {
                self.emit(RunnerEvent::Error {
                    message: format!("Claude Code printed a line of {n} bytes, over the {MAX_LINE}-byte limit; it was skipped"),
                })
                .await;
            }
            ReadItem::Failed(e) => {
                self.emit(RunnerEvent::Error {
                    message: format!("reading Claude Code's output failed: {e}"),
                })
                .await;
            }
        }
    }

    async fn on_event(&mut self, ev: CliEvent) {
        match ev {
            CliEvent::Init(init) => {
                self.session_id.send_replace(Some(init.session_id.clone()));
                self.emit(RunnerEvent::Init(init)).await;
            }
            CliEvent::Assistant {
                texts,
                tool_uses,
                error,
                call,
            } => {
                if error.as_deref() == Some("authentication_failed")
                    && texts.iter().any(|t| events::is_logged_out_text(t))
                {
                    self.logged_out = true;
                    return;
                }
                if let Some(call) = call {
                    self.on_call(call).await;
                }
                for text in texts.into_iter().filter(|t| !t.is_empty()) {
                    self.emit(RunnerEvent::AssistantText { text }).await;
                }
                for (id, name, input) in tool_uses {
                    let summary = events::summarize_tool_input(&name, &input);
                    self.emit(RunnerEvent::ToolUse {
                        id,
                        name,
                        summary,
                        input,
                    })
                    .await;
                }
            }
            CliEvent::ToolResults(blocks) => {
                for b in blocks {
                    self.emit(RunnerEvent::ToolResult {
                        tool_use_id: b.tool_use_id,
                        is_error: b.is_error,
                        text: b.text,
                        full: b.full,
                        structured: b.structured,
                    })
                    .await;
                }
            }
            CliEvent::Result(result) => self.on_result(result).await,
            CliEvent::CanUseTool(req) => self.on_can_use_tool(req).await,
            CliEvent::CancelRequest { request_id } => {
                if self.pending.remove(&request_id).is_some() {
                    self.emit(RunnerEvent::ApprovalWithdrawn { id: request_id })
                        .await;
                }
            }
            CliEvent::ControlResponse {
                request_id,
                error,
                response,
            } => {
                if self.context_request.as_deref() == Some(request_id.as_str()) {
                    self.context_request = None;
                    self.on_context_usage(error.as_deref(), &response).await;
                } else if let Some(error) = error {
                    self.emit(RunnerEvent::Error {
                        message: format!(
                            "Claude Code refused control request {request_id}: {error}"
                        ),
                    })
                    .await;
                }
            }
            CliEvent::UnknownControlRequest {
                request_id,
                subtype,
            } => {
                if self.note_unknown(&format!("control_request/{subtype}")) {
                    tracing::warn!(
                        %subtype,
                        "Claude Code sent a control request this agent does not handle; answering with an error \
                         (once per kind and session in this log)"
                    );
                }
                let error = format!("ct-agent does not handle control request {subtype:?}");
                self.write(&json!({
                    "type": "control_response",
                    "response": { "subtype": "error", "request_id": request_id, "error": error },
                }))
                .await;
            }
            CliEvent::Other(v) => {
                let kind = events::kind(&v);
                if !events::is_known_unused(&kind) && self.note_unknown(&kind) {
                    tracing::info!(
                        %kind,
                        "skipping a line of a kind this agent does not know (a newer Claude Code?); \
                         once per kind and session in this log"
                    );
                }
                self.emit(RunnerEvent::Raw(v)).await
            }
        }
    }

    /// True the first time `kind` is seen (so it is logged once). The kinds come from the CLI's output, so
    /// only the first [`MAX_UNKNOWN_KINDS`] are remembered; past that nothing more is logged.
    fn note_unknown(&mut self, kind: &str) -> bool {
        self.unknown_kinds.len() < MAX_UNKNOWN_KINDS && self.unknown_kinds.insert(kind.to_owned())
    }

    async fn on_result(&mut self, result: events::TurnResult) {
        self.turn_running = false;
        // Requests of a finished turn can no longer be answered usefully.
        self.pending.clear();
        let logged_out = self.logged_out
            || (result.is_error
                && result
                    .text
                    .as_deref()
                    .is_some_and(events::is_logged_out_text));
        if logged_out {
            self.queue.clear();
            self.closing = true;
            self.emit(RunnerEvent::Failed(TaskError::NotLoggedIn {
                host: self.host.clone(),
            }))
            .await;
        } else {
            self.emit(RunnerEvent::TurnResult(result)).await;
            if self.cancel.is_none() {
                self.ask_context_usage().await;
            }
        }
        match self.cancel {
            Some((CancelStep::Interrupted | CancelStep::Signalled, _)) => {
                self.close_stdin();
                self.cancel = Some((
                    CancelStep::StdinClosed,
                    Instant::now() + self.spec.cancel_step,
                ));
            }
            Some(_) => {}
            None => self.pump().await,
        }
    }

    /// After a turn: send the next queued prompt, or close stdin if the session is closing.
    async fn pump(&mut self) {
        if self.turn_running {
            return;
        }
        if let Some(prompt) = self.queue.pop_front() {
            self.write_prompt(prompt).await;
        } else if self.closing {
            self.close_stdin();
        }
    }

    async fn on_can_use_tool(&mut self, req: events::ApprovalRequest) {
        if self.cancel.is_some() {
            self.write_deny(&req.id, "The task was cancelled.").await;
            return;
        }
        let covering = self
            .rules
            .iter()
            .find(|r| r.covers(&req.tool, &req.input))
            .cloned();
        if let Some(rule) = covering {
            self.write_allow(&req.id, &req.input, None).await;
            self.emit(RunnerEvent::ApprovalAutoAllowed {
                summary: events::summarize_tool_input(&req.tool, &req.input),
                id: req.id,
                tool: req.tool,
                rule,
            })
            .await;
            return;
        }
        self.pending.insert(
            req.id.clone(),
            Pending {
                tool: req.tool.clone(),
                input: req.input.clone(),
                suggestions: req.suggestions.clone(),
                deadline: Instant::now() + self.spec.approval_timeout,
            },
        );
        self.emit(RunnerEvent::ApprovalRequested(req)).await;
    }

    async fn expire_approvals(&mut self) {
        let now = Instant::now();
        let expired: Vec<String> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for id in expired {
            self.pending.remove(&id);
            let message = format!(
                "Nobody approved this tool use within {} s, so it was denied (the approval timed out).",
                self.spec.approval_timeout.as_secs()
            );
            self.write_deny(&id, &message).await;
            self.emit(RunnerEvent::ApprovalTimedOut { id }).await;
        }
    }

    async fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Send(prompt) => {
                if self.closing || self.cancel.is_some() || self.stdin.is_none() {
                    self.emit(RunnerEvent::Error {
                        message: format!("message not sent: {}", TaskError::SessionEnded),
                    })
                    .await;
                } else if self.turn_running {
                    if self.queue.len() >= self.spec.max_queued {
                        let err = TaskError::QueueFull {
                            max: self.spec.max_queued,
                        };
                        self.emit(RunnerEvent::Error {
                            message: format!("message not sent: {err}"),
                        })
                        .await;
                    } else {
                        self.queue.push_back(prompt);
                        let position = self.queue.len();
                        self.emit(RunnerEvent::Queued { position }).await;
                    }
                } else {
                    self.write_prompt(prompt).await;
                }
            }
            Command::Decide(id, decision) => match self.pending.remove(&id) {
                Some(pending) => self.answer(&id, pending, decision).await,
                None => tracing::debug!(id, "decision for a request that is no longer pending"),
            },
            Command::ForgetRules => self.rules.clear(),
            Command::Interrupt => {
                self.queue.clear();
                if self.turn_running {
                    self.write_interrupt().await;
                }
            }
            Command::Close => {
                self.closing = true;
                if !self.turn_running && self.queue.is_empty() {
                    self.close_stdin();
                }
            }
            Command::Cancel => {
                if self.cancel.is_some() {
                    return;
                }
                self.queue.clear();
                self.closing = true;
                let step = if self.turn_running {
                    self.write_interrupt().await;
                    CancelStep::Interrupted
                } else {
                    self.close_stdin();
                    CancelStep::StdinClosed
                };
                self.cancel = Some((step, Instant::now() + self.spec.cancel_step));
            }
        }
    }

    /// The deadline of the current cancel step passed: take the next, harsher one. `false` ends the actor.
    async fn cancel_next_step(&mut self) -> bool {
        let next = match self.cancel {
            Some((CancelStep::Interrupted, _)) => {
                tracing::debug!("no result after interrupt: SIGINT");
                process::interrupt(self.pid);
                CancelStep::Signalled
            }
            Some((CancelStep::Signalled, _)) => {
                self.close_stdin();
                CancelStep::StdinClosed
            }
            Some((CancelStep::StdinClosed, _)) => {
                tracing::debug!("the CLI did not exit: killing its process tree");
                self.kill_now();
                CancelStep::Killed
            }
            Some((CancelStep::Killed, _)) | None => {
                tracing::warn!("the CLI's output is still open after killing its process tree; giving up on it");
                return false;
            }
        };
        self.cancel = Some((next, Instant::now() + self.spec.cancel_step));
        true
    }

    async fn answer(&mut self, id: &str, pending: Pending, decision: Decision) {
        match decision {
            Decision::AllowOnce { updated_input } => {
                let input = updated_input.unwrap_or(pending.input);
                self.write_allow(id, &input, None).await;
            }
            Decision::AllowSession { prefix } => {
                // A prefix the bot offered always covers the use; one that does not (a stale or hand-made
                // decision) falls back to the exact use rather than to something wider.
                let rule = prefix
                    .and_then(|p| {
                        SessionScope::prefix(&pending.tool, &pending.input, &p)
                            .inspect_err(
                                |e| tracing::warn!(%e, "prefix refused; allowing the exact use"),
                            )
                            .ok()
                    })
                    .or_else(|| SessionScope::exact(&pending.tool, &pending.input));
                match rule {
                    Some(rule) if self.rules.len() < MAX_RULES => {
                        if !self.rules.contains(&rule) {
                            self.rules.push(rule.clone());
                        }
                        self.emit(RunnerEvent::RuleAdded { rule }).await;
                    }
                    _ => tracing::debug!(tool = %pending.tool, "no session rule added"),
                }
                // The agent remembers the rule itself. The CLI's suggestions are passed on only if the owner
                // chose so: they may write .claude/settings.local.json into the project, or widen the
                // permission mode beyond this one use (and uses they cover are then not seen here).
                let permissions = self
                    .spec
                    .allow_settings_writes
                    .then_some(Value::Array(pending.suggestions));
                self.write_allow(id, &pending.input, permissions).await;
            }
            Decision::Deny { reason } => {
                let reason = if reason.trim().is_empty() {
                    "The user denied this tool use.".to_owned()
                } else {
                    reason
                };
                self.write_deny(id, &reason).await;
            }
            Decision::Answers(answers) => {
                let mut input = pending.input;
                match input.as_object_mut() {
                    Some(obj) => {
                        obj.insert("answers".into(), answers);
                    }
                    None => input = json!({ "answers": answers }),
                }
                self.write_allow(id, &input, None).await;
            }
        }
    }

    async fn write_prompt(&mut self, prompt: Value) {
        self.turn_running = true;
        self.logged_out = false;
        self.write(&json!({ "type": "user", "message": { "role": "user", "content": prompt } }))
            .await;
    }

    async fn write_allow(&mut self, id: &str, input: &Value, permissions: Option<Value>) {
        let mut response = json!({ "behavior": "allow", "updatedInput": input });
        if let Some(p) = permissions {
            response["updatedPermissions"] = p;
        }
        self.write(&control_success(id, response)).await;
    }

    async fn write_deny(&mut self, id: &str, message: &str) {
        self.write(&control_success(
            id,
            json!({ "behavior": "deny", "message": message }),
        ))
        .await;
    }

    /// The first event of a model call says how much it had in context. The CLI repeats the call's usage on
    /// each of its content blocks, so only a new call counts.
    async fn on_call(&mut self, call: events::CallUsage) {
        if call.context_tokens == 0 || self.last_call.as_deref() == Some(call.message_id.as_str()) {
            return;
        }
        self.last_call = Some(call.message_id);
        if self.context_window.is_none() {
            // The window is only in the CLI's own count: ask for it once the first call is under way.
            self.ask_context_usage().await;
        }
        self.emit(RunnerEvent::Context {
            tokens: call.context_tokens,
            window: self.context_window,
        })
        .await;
    }

    /// After a turn: asks the CLI how full the context is, which also tells the model's window (the usage of
    /// calls does not). Its answer arrives as a control response ([`Actor::on_context_usage`]).
    async fn ask_context_usage(&mut self) {
        if self.context_request.is_some() || self.context_refused {
            return;
        }
        let id = format!("ct-ctx-{}", self.next_request);
        self.next_request += 1;
        self.context_request = Some(id.clone());
        self.write(&json!({ "type": "control_request", "request_id": id, "request": { "subtype": "get_context_usage" } }))
            .await;
    }

    /// A CLI that cannot answer `get_context_usage` (an older or newer one) only costs the window: the usage
    /// of each call still says the tokens. Not worth an error in the thread.
    async fn on_context_usage(&mut self, error: Option<&str>, response: &Value) {
        // Asked once more, it would say the same: not asked again for this process.
        if let Some(error) = error {
            tracing::debug!(%error, "get_context_usage refused");
            self.context_refused = true;
            return;
        }
        let Some((tokens, window)) = events::context_usage(response) else {
            tracing::debug!(%response, "get_context_usage answered without totalTokens");
            self.context_refused = true;
            return;
        };
        if window.is_some() {
            self.context_window = window;
        }
        self.emit(RunnerEvent::Context {
            tokens,
            window: self.context_window,
        })
        .await;
    }

    async fn write_interrupt(&mut self) {
        let id = format!("ct-{}", self.next_request);
        self.next_request += 1;
        self.write(&json!({ "type": "control_request", "request_id": id, "request": { "subtype": "interrupt" } }))
            .await;
    }

    async fn write(&mut self, msg: &Value) {
        let Some(stdin) = self.stdin.as_mut() else {
            tracing::debug!("stdin already closed; not sent: {msg}");
            return;
        };
        let mut line = msg.to_string();
        line.push('\n');
        let written = async {
            stdin.write_all(line.as_bytes()).await?;
            stdin.flush().await
        }
        .await;
        if let Err(err) = written {
            // The CLI is exiting; its exit (and stderr) will say why.
            tracing::debug!(%err, "writing to the CLI's stdin failed");
            self.stdin = None;
        }
    }

    fn close_stdin(&mut self) {
        self.remember_tree();
        self.stdin = None;
    }

    fn remember_tree(&mut self) {
        if self.exited.is_none() {
            for p in process::descendants(self.pid) {
                if !self.tree.contains(&p) {
                    self.tree.push(p);
                }
            }
        }
    }

    fn kill_now(&mut self) {
        self.remember_tree();
        let cli = self.exited.is_none().then_some(self.pid);
        process::kill_tree(cli, &self.tree);
    }

    async fn finish(mut self) {
        if self.exited.is_none() {
            let waited = tokio::time::timeout(self.spec.cancel_step, self.child.wait()).await;
            self.exited = match waited {
                Ok(status) => status.ok(),
                Err(_) => {
                    self.kill_now();
                    self.child.wait().await.ok()
                }
            };
        }
        // Whatever the CLI left running (background commands) goes with it.
        process::kill_tree(None, &self.tree);
        // The stderr task may still be copying its last bytes; it ends at EOF, which the exit has caused
        // (unless a stray process holds the pipe, hence the bound).
        if let Some(stderr_task) = self.tasks.first_mut() {
            let _ = tokio::time::timeout(std::time::Duration::from_millis(500), stderr_task).await;
        }
        for task in &self.tasks {
            task.abort();
        }
        let info = ExitInfo {
            code: self.exited.and_then(|s| s.code()),
            signal: self.exited.and_then(|s| s.signal()),
            stderr_tail: self.stderr.text(),
        };
        tracing::debug!(?info.code, ?info.signal, "claude exited");
        self.exit.send_replace(Some(info.clone()));
        self.emit(RunnerEvent::Exited(info)).await;
    }
}

fn control_success(request_id: &str, response: Value) -> Value {
    json!({
        "type": "control_response",
        "response": { "subtype": "success", "request_id": request_id, "response": response },
    })
}
