//! The agent's tasks: what happens between a relay's `StartTask` and the last acknowledged event.
//!
//! [`Tasks`] lives as long as `ct-agent run`, across links: a task keeps running while the link is down, its
//! events wait in the [`Outbox`], and the next session sends them (and whatever the relay did not
//! acknowledge) once it is up. Per task it:
//!
//! 1. checks the requester (the owner — the Discord id this agent was paired with, whatever role the relay
//!    claims — or a grantee this agent's own share policy accepts) and resolves the project through
//!    [`Policy`] — the agent's folders, not the relay's word;
//! 2. runs Claude Code through a [`claude::Session`] owned by one driver task, which turns [`RunnerEvent`]s
//!    into [`TaskEvent`]s (text cut to [`MAX_EVENT_TEXT`], tool inputs bounded) and relayed decisions, input
//!    and cancels into session calls;
//! 3. ends the task when its last turn has a result, and keeps the Claude Code process warm for
//!    [`TaskConfig::idle_timeout`]: a follow-up task that resumes that session, from the same person, is sent
//!    to the same process; after the process ended, the follow-up runs `claude --resume` instead;
//! 4. with isolation (asked for, the project's default, or because another task already runs in the
//!    project's folder), runs the task in a git [`worktree`] of its own, reports its diff at the end, and
//!    merges, keeps or discards it when the requester or the owner asks.
//!
//! Project requests from the relay (`/project add` in Discord) are answered here too, from the same policy.

use std::collections::{HashMap, HashSet, VecDeque};
use std::ffi::OsString;
use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ct_protocol::files::Attachment;
use ct_protocol::project::{ProjectInfo, ProjectOp, ProjectReply, ProjectsReport};
use ct_protocol::scope::SessionScope;
use ct_protocol::task::{
    Decision as WireDecision, FinalState, Isolation, Requester, Role, TaskEvent, TaskSpec,
    WorktreeAction, WorktreeOutcome, MAX_EVENT_TEXT, MAX_TOOL_COMMAND,
};
use ct_protocol::{AgentMessage, RelayMessage};
use serde_json::Value;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use crate::attachments::{self, Assembly};
use crate::claude::{self, Decision, PermissionMode, RunnerEvent, Session, SessionSpec};
use crate::config::ConfigDir;
use crate::meter::{self, Meter};
use crate::outbox::{self, Outbox};
use crate::pool::PoolConfig;
use crate::projects::{Host, Origin, Policy, PolicyError, SharePolicy};
use crate::sandbox::{self, Bwrap, SandboxError};
use crate::worktree::{self, Merged, WorktreeError, Worktrees};

/// Project replies and reports waiting for a link; older ones are dropped (a report is re-sent on every
/// handshake, and a reply nobody waits for any more is useless).
const MAX_CONTROL: usize = 64;
/// Longest string kept inside a tool input shown for approval when the whole input is too large to send.
const MAX_INPUT_STRING: usize = 4000;
/// An approval's tool input is sent whole up to this size (JSON bytes), so the approver can read all of what
/// would run (the bot attaches it); past it, long strings are cut and the approval says so.
const MAX_APPROVAL_INPUT: usize = 256 * 1024;
/// Tool uses remembered per process until their result comes (for the result's tool name and an edit's
/// diff): results follow their uses closely, so a few dozen is plenty; older ones are forgotten.
const MAX_PENDING_TOOLS: usize = 64;

/// How tasks run on this machine.
#[derive(Debug, Clone)]
pub struct TaskConfig {
    /// `claude` to run; `None` looks on `PATH` and in the usual install places.
    pub claude_bin: Option<PathBuf>,
    /// Start Claude Code with only `PATH`, `LANG` and [`TaskConfig::env`] (tests); normally it inherits the
    /// agent's environment, which is where its login lives.
    pub env_clear: bool,
    pub env: Vec<(OsString, OsString)>,
    /// `ALLOWED_PROJECT_DIRS` as given; `None` reads the variable (tests pass it to avoid process-wide env).
    pub allowed_dirs: Option<String>,
    /// A pending approval is denied after this long.
    pub approval_timeout: Duration,
    /// How long a finished task's Claude Code process waits for a follow-up before it exits.
    pub idle_timeout: Duration,
    /// How long a worktree is kept after its last task ended; then it is removed (its branch stays).
    pub worktree_retention: Duration,
    /// How often an agent looks for worktrees past their retention, besides at every task start (so an idle
    /// agent lets them go too). The first look is at start.
    pub worktree_sweep_every: Duration,
    /// Each step of a cancel (interrupt, SIGINT, closed stdin) waits this long before the next, harsher one.
    pub cancel_step: Duration,
    /// Claude Code processes at once (running and warm); a warm one is closed to make room.
    pub max_sessions: usize,
    /// Apply Claude Code's permission suggestions on "allow for this session", which may write
    /// `.claude/settings*.json` into the project; off by default, so a decision in Discord never edits files.
    pub allow_settings_writes: bool,
    /// Unacknowledged event bytes before tasks stop reading Claude Code's output.
    pub outbox_limit: usize,
    /// Called with the project folder once it is open for a sandbox, before the sandbox starts. Only tests
    /// set it: to swap the folder for a symlink in exactly that window.
    pub before_sandbox: Option<SandboxHook>,
    /// The API key the proxy adds for shared tasks (`CT_AGENT_SHARED_API_KEY`); `None` uses the owner's
    /// `ANTHROPIC_API_KEY`. Either way the key stays outside the sandbox ([`crate::meter::proxy`]); with
    /// neither (an owner signed in with `claude login` only), shared tasks are refused.
    pub shared_api_key: Option<SharedKey>,
    /// The `ct-agent` executable, run inside a grantee's sandbox as its only way to the API
    /// (`ct-agent sandbox-forward`); `None`: grantees' sandboxes keep the host's network.
    pub forwarder: Option<PathBuf>,
    /// A pool worker (`ct-agent run --pool`): every requester is a pool user with a workspace of their own
    /// ([`crate::pool`]), always sandboxed, limited and metered; the share policy is not consulted (the relay
    /// decides who may use the pool). Its workspaces folder must be [`PoolConfig::prepare`]d.
    pub pool: Option<PoolConfig>,
}

/// An API key the owner set aside for shared tasks. `Debug` never prints it.
#[derive(Clone)]
pub struct SharedKey(pub String);

impl std::fmt::Debug for SharedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedKey(MASKED)")
    }
}

/// See [`TaskConfig::before_sandbox`].
#[derive(Clone)]
pub struct SandboxHook(pub Arc<dyn Fn(&Path) + Send + Sync>);

impl std::fmt::Debug for SandboxHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SandboxHook")
    }
}

impl Default for TaskConfig {
    fn default() -> Self {
        Self {
            claude_bin: None,
            env_clear: false,
            env: Vec::new(),
            allowed_dirs: None,
            approval_timeout: Duration::from_secs(600),
            idle_timeout: Duration::from_secs(600),
            worktree_retention: Duration::from_secs(7 * 86_400),
            worktree_sweep_every: Duration::from_secs(3600),
            cancel_step: Duration::from_secs(5),
            max_sessions: 8,
            allow_settings_writes: false,
            outbox_limit: outbox::DEFAULT_LIMIT,
            before_sandbox: None,
            shared_api_key: None,
            forwarder: None,
            pool: None,
        }
    }
}

/// The agent's task manager. Cheap to clone; every clone is the same manager.
#[derive(Clone)]
pub struct Tasks {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Tasks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tasks").finish_non_exhaustive()
    }
}

struct Inner {
    config: TaskConfig,
    dir: ConfigDir,
    /// The Discord id this agent was paired with: the only requester treated as the owner.
    owner_id: Option<String>,
    /// What grantees spent, against the owner's budgets.
    meter: Meter,
    /// The shared-task API proxy, started with the first shared task.
    proxy: tokio::sync::OnceCell<meter::proxy::ApiProxy>,
    outbox: Mutex<Outbox>,
    /// Non-event messages for the next link (project replies and reports).
    control: Mutex<VecDeque<AgentMessage>>,
    /// Something is waiting to be sent (one waiter: the current session).
    to_send: Notify,
    /// The relay acknowledged events (waiters: drivers held back by a full outbox).
    acked: Notify,
    drivers: Mutex<Drivers>,
    next_key: AtomicU64,
    /// Tasks' git worktrees (in the agent's data folder).
    worktrees: Worktrees,
    tracker: TaskTracker,
    /// Held by the one worktree sweep running (see [`Inner::sweep`]).
    sweeping: tokio::sync::Mutex<()>,
    shutdown: CancellationToken,
    /// The relay of the current (or last) link understands [`TaskEvent::Context`].
    live_usage: AtomicBool,
    /// The relay in use asked for tool output (its Welcome's `tool_output`): tool results go out whole
    /// (bounded), with their use's id, exit status and diff. Off, they are the short previews older relays
    /// know.
    tool_output: AtomicBool,
    /// Files on their way from the relay, until the start or input they belong to (see [`attachments`]).
    files: Mutex<Assembly>,
}

#[derive(Default)]
struct Drivers {
    /// Tasks being run, by task id.
    running: HashMap<String, mpsc::UnboundedSender<Cmd>>,
    /// Finished tasks' processes waiting for a follow-up, by Claude Code session id.
    warm: HashMap<String, Warm>,
    /// The folder of each task started in a project's own folder (entries whose task no longer runs are
    /// dropped when read): another task there gets a worktree unless the owner chose otherwise.
    shared: HashMap<String, PathBuf>,
}

struct Warm {
    key: u64,
    tx: mpsc::UnboundedSender<Cmd>,
    owner: Owner,
}

/// Who a Claude Code process belongs to: a follow-up from anyone else, or with other settings, gets its own
/// process (a grantee must never inherit the owner's "allow for this session").
#[derive(Debug, Clone, PartialEq)]
struct Owner {
    cwd: PathBuf,
    user: String,
    role: Role,
    options: ct_protocol::task::TaskOptions,
    /// Run inside bubblewrap (see [`crate::sandbox`]).
    sandbox: Option<Bwrap>,
    /// In the sandbox without a network (grantees, unless the owner opened it).
    no_network: bool,
    /// The task whose git worktree this process runs in (`cwd` is inside it).
    worktree: Option<String>,
    /// A pool user's task: in their workspace, with resource limits.
    pool: bool,
}

#[derive(Debug)]
enum Cmd {
    /// Run task `task` on this (warm) process, starting with `prompt`.
    Attach {
        task: String,
        prompt: String,
        files: Vec<Attachment>,
    },
    /// A follow-up, with the files that came with it (or why they did not arrive whole).
    Input(String, Option<Result<Vec<Attachment>, String>>),
    Decide {
        approval: String,
        decision: WireDecision,
    },
    Cancel,
}

impl Tasks {
    /// A manager for the agent whose config directory is `dir`. `shutdown` ends every task (killing its
    /// process tree); [`Tasks::wait`] returns once they are gone.
    pub fn new(dir: ConfigDir, config: TaskConfig, shutdown: CancellationToken) -> Self {
        let outbox = Outbox::new(config.outbox_limit);
        // Read once: re-pairing (`ct-agent pair --force`) needs a restart anyway. Unpaired or unreadable,
        // nobody is the owner, so every task is judged as a grantee's.
        let owner_id = match dir.load_pairing() {
            Ok(pairing) => pairing.map(|p| p.owner),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the pairing: no task is treated as the owner's");
                None
            }
        };
        let mut meter = Meter::load(&dir).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot read shared-task usage; counting from zero");
            Meter::empty(&dir)
        });
        if let Some(pool) = &config.pool {
            meter = meter.for_pool(pool.budget_per_user);
        }
        let tasks = Self {
            inner: Arc::new(Inner {
                worktrees: Worktrees::load(dir.path().join("worktrees")),
                config,
                dir,
                owner_id,
                meter,
                proxy: tokio::sync::OnceCell::new(),
                outbox: Mutex::new(outbox),
                control: Mutex::new(VecDeque::new()),
                to_send: Notify::new(),
                acked: Notify::new(),
                drivers: Mutex::new(Drivers::default()),
                next_key: AtomicU64::new(1),
                tracker: TaskTracker::new(),
                sweeping: tokio::sync::Mutex::new(()),
                shutdown,
                live_usage: AtomicBool::new(false),
                tool_output: AtomicBool::new(false),
                files: Mutex::new(Assembly::default()),
            }),
        };
        if let Some(pool) = tasks.inner.config.pool.clone() {
            tasks.inner.tracker.spawn(async move {
                let _ = tokio::task::spawn_blocking(move || pool.sweep_leftovers()).await;
            });
        }
        let inner = tasks.inner.clone();
        tasks.inner.tracker.spawn(async move {
            let mut every = tokio::time::interval(inner.config.worktree_sweep_every);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = inner.shutdown.cancelled() => break,
                    _ = every.tick() => inner.sweep().await,
                }
            }
        });
        tasks
    }

    /// Waits until every task's process is gone (after the shutdown token fired).
    pub async fn wait(&self) {
        self.inner.tracker.close();
        self.inner.tracker.wait().await;
    }

    /// What the relay just connected to offers, read as each event is built: whether it wants tool results
    /// whole ([`Welcome::tool_output`]; older relays ignore fields they do not know, so events already queued
    /// keep what they were built with) and whether it takes context usage ([`Welcome::live_usage`]; an event
    /// kind it does not know would cost the link, so none is built for it).
    ///
    /// [`Welcome::tool_output`]: ct_protocol::handshake::Welcome::tool_output
    /// [`Welcome::live_usage`]: ct_protocol::handshake::Welcome::live_usage
    pub fn welcomed(&self, welcome: &ct_protocol::handshake::Welcome) {
        let inner = &self.inner;
        inner
            .tool_output
            .store(welcome.tool_output, Ordering::Relaxed);
        inner
            .live_usage
            .store(welcome.live_usage, Ordering::Relaxed);
    }

    /// What a new link sends first: every event the relay has not acknowledged (the relay drops those it
    /// already stored), then the tasks still running — after the events, so a task that finished while the
    /// link was down is recorded as finished before the relay marks unreported tasks lost — then the projects.
    pub fn hello(&self) -> Vec<AgentMessage> {
        let mut out = {
            let mut outbox = self.inner.outbox();
            outbox.rewind();
            let mut out = outbox.take_unsent();
            out.push(AgentMessage::Running {
                tasks: outbox.running(),
            });
            out
        };
        // Replies meant for the previous link are useless; the report below supersedes queued reports.
        self.inner.control().clear();
        // Files half-sent on the previous link never complete: their message is lost with them.
        self.inner.files().clear();
        out.push(AgentMessage::Projects(self.inner.report()));
        out
    }

    /// The next messages to send on the current link, waiting until there are some. Cancel-safe: nothing is
    /// taken until the future completes.
    pub async fn outgoing(&self) -> Vec<AgentMessage> {
        loop {
            let mut out: Vec<AgentMessage> = self.inner.control().drain(..).collect();
            out.extend(self.inner.outbox().take_unsent());
            if !out.is_empty() {
                return out;
            }
            self.inner.to_send.notified().await;
        }
    }

    /// Handles a task or project message from the relay. Never blocks: work runs in owned tasks.
    pub fn handle(&self, msg: RelayMessage) {
        match msg {
            RelayMessage::StartTask(spec) => self.start(spec),
            RelayMessage::FilePart(part) => self.inner.files().part(part),
            RelayMessage::TaskInput { task, prompt } => {
                let files = self.inner.files().take(&task);
                self.command(&task, Cmd::Input(prompt, files))
            }
            RelayMessage::CancelTask { task } => self.command(&task, Cmd::Cancel),
            RelayMessage::Decide {
                task,
                approval,
                decision,
            } => self.command(&task, Cmd::Decide { approval, decision }),
            RelayMessage::Ack { task, seq } => {
                self.inner.outbox().ack(&task, seq);
                self.inner.acked.notify_waiters();
            }
            RelayMessage::Project { id, op } => self.project(id, op),
            RelayMessage::Worktree {
                id,
                task,
                action,
                requester,
            } => {
                let inner = self.inner.clone();
                self.inner.tracker.spawn(async move {
                    let outcome = inner.worktree_action(&task, action, &requester).await;
                    inner.send_control(AgentMessage::WorktreeReply { id, outcome });
                });
            }
            RelayMessage::Heartbeat | RelayMessage::Closing { .. } => {}
        }
    }

    /// Task ids this agent is running now (tests and status).
    pub fn running(&self) -> Vec<String> {
        self.inner.outbox().running()
    }

    fn command(&self, task: &str, cmd: Cmd) {
        let tx = self.inner.drivers().running.get(task).cloned();
        match tx {
            Some(tx) => {
                let _ = tx.send(cmd);
            }
            None => tracing::debug!(task, ?cmd, "message for a task this agent does not run"),
        }
    }

    fn start(&self, mut spec: TaskSpec) {
        let id = spec.task.clone();
        let files = self.inner.files().take(&id);
        if self.inner.drivers().running.contains_key(&id) || self.inner.outbox().knows(&id) {
            // Sent twice (a relay retry): the first one is running or has ended.
            tracing::debug!(task = %id, "duplicate StartTask ignored");
            return;
        }
        let files = match files.unwrap_or(Ok(Vec::new())) {
            Ok(files) => files,
            Err(why) => {
                self.inner.emit_now(
                    &id,
                    TaskEvent::Finished {
                        state: FinalState::Failed,
                        message: Some(format!(
                            "the attached files did not arrive whole ({why}): start the task again"
                        )),
                    },
                );
                return;
            }
        };
        let owner = match self.admit(&spec) {
            Ok(owner) => owner,
            Err(message) => {
                tracing::info!(task = %id, user = %spec.requester.user, %message, "task refused");
                self.inner.emit_now(
                    &id,
                    TaskEvent::Finished {
                        state: FinalState::Failed,
                        message: Some(message),
                    },
                );
                return;
            }
        };
        // A pool workspace has no worktrees: they would live in the agent's own folder, outside the user's
        // workspace and its quota. Its tasks run in the project's folder, side by side if need be.
        let pool_worktree = owner.pool && spec.options.isolation == Some(Isolation::Worktree);
        if owner.pool {
            spec.options.isolation = None;
        } else if spec.options.isolation.is_none() {
            // The owner's default for the project (read per task, like the rest of the policy).
            spec.options.isolation = self
                .inner
                .policy()
                .ok()
                .and_then(|p| p.isolation_of(&spec.project));
        }
        let crowded = !owner.pool
            && spec.resume.is_none()
            && owner.worktree.is_none()
            && spec.options.isolation.is_none()
            && self.crowded(&owner.cwd);
        if crowded {
            spec.options.isolation = Some(Isolation::Worktree);
        }
        tracing::info!(task = %id, user = %spec.requester.user, role = ?owner.role, cwd = %owner.cwd.display(), isolation = ?spec.options.isolation, "task accepted");
        // Emitted before anything slow, so a reconnect in the next second reports this task as running.
        self.inner.emit_now(
            &id,
            TaskEvent::Started {
                cwd: owner.cwd.display().to_string(),
            },
        );
        if pool_worktree {
            self.inner.emit_now(
                &id,
                TaskEvent::Text {
                    text: "ⓘ a pool workspace has no worktrees: this task runs in the project's own folder"
                        .into(),
                },
            );
        }
        let in_project =
            owner.worktree.is_none() && spec.options.isolation != Some(Isolation::Worktree);

        // Worktrees past their retention go now, off this thread (never one a task uses: this one's is
        // claimed first).
        if let Some(of) = &owner.worktree {
            self.inner.worktrees.claim(of, &id);
        }
        let inner = self.inner.clone();
        self.inner.tracker.spawn(async move { inner.sweep().await });

        let mut drivers = self.inner.drivers();
        let warm = spec
            .resume
            .as_ref()
            .and_then(|sid| {
                drivers
                    .warm
                    .get(sid)
                    .filter(|w| w.owner == owner)
                    .map(|_| sid.clone())
            })
            .and_then(|sid| drivers.warm.remove(&sid));
        if let Some(warm) = warm {
            // The driver is parked idle; the Attach wakes it before its idle timer can close it (it checks the
            // warm map, which no longer has it, under this lock). If its process died meanwhile the send
            // fails, and the task gets a fresh process below instead of waiting on a dead one.
            let attach = Cmd::Attach {
                task: id.clone(),
                prompt: spec.prompt.clone(),
                files: files.clone(),
            };
            if warm.tx.send(attach).is_ok() {
                if warm.owner.worktree.is_none() {
                    drivers.shared.insert(id.clone(), warm.owner.cwd.clone());
                }
                drivers.running.insert(id, warm.tx);
                return;
            }
        }
        self.make_room(&mut drivers);
        let (tx, rx) = mpsc::unbounded_channel();
        if in_project {
            drivers.shared.insert(id.clone(), owner.cwd.clone());
        }
        drivers.running.insert(id.clone(), tx);
        drop(drivers);
        let key = self.inner.next_key.fetch_add(1, Ordering::Relaxed);
        let inner = self.inner.clone();
        let span = tracing::info_span!("task", task = %id);
        self.inner
            .tracker
            .spawn(Driver::start(inner, key, spec, files, owner, rx, crowded).instrument(span));
    }

    /// Whether a task already runs in `cwd`, the project's own folder.
    fn crowded(&self, cwd: &Path) -> bool {
        let mut drivers = self.inner.drivers();
        let Drivers {
            running, shared, ..
        } = &mut *drivers;
        shared.retain(|task, _| running.contains_key(task));
        shared
            .values()
            .any(|c| c.starts_with(cwd) || cwd.starts_with(c))
    }

    /// Closes the oldest warm process when the machine already runs as many as it may.
    fn make_room(&self, drivers: &mut Drivers) {
        while drivers.running.len() + drivers.warm.len() >= self.inner.config.max_sessions {
            let Some(oldest) = drivers
                .warm
                .iter()
                .min_by_key(|(_, w)| w.key)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            if let Some(w) = drivers.warm.remove(&oldest) {
                let _ = w.tx.send(Cmd::Cancel);
            }
        }
    }

    /// Whether this requester may run this task here, and where. The error is the message the user sees.
    fn admit(&self, spec: &TaskSpec) -> Result<Owner, String> {
        if let Some(pool) = &self.inner.config.pool {
            return self.admit_pool(spec, pool);
        }
        let policy = self.inner.policy().map_err(|e| e.to_string())?;
        let role = role_of(&spec.requester, self.inner.owner_id.as_deref());
        if role != spec.requester.role {
            tracing::warn!(user = %spec.requester.user, claimed = ?spec.requester.role, "the relay called a requester this agent's owner, but the agent is paired with someone else: treated as a grantee");
        }
        if role != Role::Owner {
            let who = spec
                .requester
                .name
                .clone()
                .unwrap_or_else(|| spec.requester.user.clone());
            match policy.sharing() {
                SharePolicy::Off => {
                    return Err(format!(
                        "this agent does not run tasks for people its owner shared it with (asked by {who}): \
                         its owner can allow it on that machine with `ct-agent sharing all` or \
                         `ct-agent sharing only <discord user id>`"
                    ))
                }
                sharing if !sharing.accepts(&spec.requester.user) => {
                    return Err(format!(
                        "this agent's owner has not allowed {who} to run tasks on it: the owner can add them on \
                         that machine with `ct-agent sharing only <ids...>`"
                    ))
                }
                _ => {}
            }
        }
        let total = self.inner.drivers().running.len();
        if total >= self.inner.config.max_sessions {
            return Err(format!(
                "this agent already runs {total} tasks, its limit: wait for one to finish, or cancel one"
            ));
        }
        if let Some(mode) = &spec.options.permission_mode {
            let mode = mode.parse::<PermissionMode>()?;
            check_mode(mode, role, policy.sandbox())?;
        }
        let cwd = policy.resolve(&spec.project).map_err(|e| e.to_string())?;
        let sandbox =
            sandbox_for(role, policy.sandbox(), sandbox::detect()).map_err(|e| e.to_string())?;
        if role != Role::Owner && sandbox.is_some() {
            if upstream(&self.inner.config).is_none() {
                return Err(NO_SHARED_KEY.into());
            }
            self.inner
                .meter
                .check(&spec.requester.user)
                .map_err(|e| e.to_string())?;
        }
        let no_network = sandbox.is_some()
            && role != Role::Owner
            && !policy.sandbox().network_open_for(&spec.requester.user)
            && self.inner.config.forwarder.is_some();
        // A follow-up resumes in the worktree its session ran in (Claude Code finds a session only from the
        // folder it ran in), whatever isolation it asks for.
        let resumed = spec
            .resume
            .as_deref()
            .and_then(|sid| self.inner.worktrees.of_session(sid))
            .filter(|w| cwd.starts_with(&w.repo) && w.cwd.is_dir());
        let (cwd, worktree) = match resumed {
            Some(w) => (w.cwd, Some(w.task)),
            None => (cwd, None),
        };
        // The isolation wanted is carried outside `options`, which must compare equal for a warm follow-up.
        let mut options = spec.options.clone();
        options.isolation = None;
        Ok(Owner {
            no_network,
            cwd,
            user: spec.requester.user.clone(),
            role,
            options,
            sandbox,
            worktree,
            pool: false,
        })
    }

    /// [`Tasks::admit`] on a pool worker: whoever the relay sends is a pool user (never the owner: the
    /// worker's owner is `pool:NAME`, no Discord id), in their own project folder, always in the sandbox with
    /// no network but the metering proxy, within their budget. The workspace quota is checked when the task
    /// starts ([`Driver::start`]), off this thread.
    fn admit_pool(&self, spec: &TaskSpec, pool: &PoolConfig) -> Result<Owner, String> {
        let user = &spec.requester.user;
        crate::pool::check_user(user)?;
        // Approvals go to the requester themselves (the relay sends them as trusted); a relay calling them
        // "owner" is lowered like anywhere else.
        let role = match spec.requester.role {
            Role::Owner => Role::TrustedGrantee,
            other => other,
        };
        let total = self.inner.drivers().running.len();
        if total >= self.inner.config.max_sessions {
            return Err(format!(
                "this pool worker already runs {total} tasks, its limit: try again in a few minutes"
            ));
        }
        if let Some(mode) = &spec.options.permission_mode {
            let mode = mode.parse::<PermissionMode>()?;
            check_mode(mode, role, &sandbox::SandboxSettings::default())?;
        }
        let sandbox = match sandbox::detect() {
            Ok(bwrap) => bwrap,
            Err(e) => {
                let why = e.map_or_else(
                    || "bubblewrap is not installed".to_owned(),
                    |e| e.to_string(),
                );
                return Err(format!(
                    "this pool worker cannot isolate tasks, so it runs none: {why}. Its operator must make \
                     bubblewrap work there (`ct-agent doctor`)"
                ));
            }
        };
        if upstream(&self.inner.config).is_none() {
            return Err(
                "this pool worker has no API key to run tasks with: its operator must start it with \
                 CT_AGENT_SHARED_API_KEY (or ANTHROPIC_API_KEY) set"
                    .into(),
            );
        }
        if self.inner.config.forwarder.is_none() {
            return Err(
                "this pool worker cannot give a sandbox its way to the API: its operator must run it as \
                 `ct-agent run --pool`"
                    .into(),
            );
        }
        pool.limits.command()?;
        self.inner.meter.check(user).map_err(|e| e.to_string())?;
        let cwd = pool.project_dir(user, &spec.project)?;
        let mut options = spec.options.clone();
        options.isolation = None;
        Ok(Owner {
            no_network: true,
            cwd,
            user: user.clone(),
            role,
            options,
            sandbox: Some(sandbox),
            worktree: None,
            pool: true,
        })
    }

    /// A pool user's project command, answered when done (a clone takes a while): `Create`, `ListFor`,
    /// `RemoveFor` and `Usage`; the owner's own commands (`Add`, `Remove`) have no meaning here.
    fn pool_project(&self, id: u64, op: ProjectOp, pool: PoolConfig) {
        let inner = self.inner.clone();
        self.inner.tracker.spawn(async move {
            let listed = |pool: PoolConfig, user: String| async move {
                tokio::task::spawn_blocking(move || pool.list(&user))
                    .await
                    .map_err(|e| e.to_string())?
            };
            let done: Result<ProjectReply, String> = match op {
                ProjectOp::Create { user, name, git } => {
                    // A clone is stopped by shutdown (dropping it kills git; the start sweeps its folder).
                    let created = tokio::select! {
                        r = pool.create(&user, &name, git.as_deref()) => r,
                        () = inner.shutdown.cancelled() => Err("the worker is shutting down: try again when it is back".into()),
                    };
                    match created {
                        Ok(()) => {
                            tracing::info!(%user, %name, cloned = git.is_some(), "pool project created");
                            listed(pool, user).await.map(|p| ProjectReply::Ok(pool_report(p)))
                        }
                        Err(e) => Err(e),
                    }
                }
                ProjectOp::ListFor { user } => {
                    listed(pool, user).await.map(|p| ProjectReply::Ok(pool_report(p)))
                }
                ProjectOp::RemoveFor { user, name } => {
                    let running = inner.pool_project_busy(&user, &name, &pool);
                    if running {
                        Err(format!(
                            "a task of yours is still running in `{name}`: wait for it to end, or cancel it"
                        ))
                    } else {
                        let p = pool.clone();
                        let (u, n) = (user.clone(), name.clone());
                        match tokio::task::spawn_blocking(move || p.remove(&u, &n)).await {
                            Ok(Ok(())) => {
                                tracing::info!(%user, %name, "pool project removed");
                                listed(pool, user).await.map(|p| ProjectReply::Ok(pool_report(p)))
                            }
                            Ok(Err(e)) => Err(e),
                            Err(e) => Err(e.to_string()),
                        }
                    }
                }
                ProjectOp::Usage { user } => crate::pool::check_user(&user).map(|()| {
                    let meter = inner.meter.clone();
                    ProjectReply::Usage(meter.report(&user))
                }),
                ProjectOp::Add { .. } | ProjectOp::Remove { .. } => Err(
                    "this agent is a pool worker: projects live in each user's workspace (`/project add NAME \
                     [git URL]`), not in folders named by its owner"
                        .into(),
                ),
                ProjectOp::List => Ok(ProjectReply::Ok(pool_report(Vec::new()))),
            };
            let reply = done.unwrap_or_else(|message| ProjectReply::Refused { message });
            inner.send_control(AgentMessage::ProjectReply { id, reply });
        });
    }

    fn project(&self, id: u64, op: ProjectOp) {
        if let Some(pool) = &self.inner.config.pool {
            return self.pool_project(id, op, pool.clone());
        }
        let changed = !matches!(op, ProjectOp::List);
        let reply = match self.inner.policy() {
            Err(e) => ProjectReply::Refused {
                message: e.to_string(),
            },
            Ok(mut policy) => {
                let done = match op {
                    ProjectOp::Add { name, path } => {
                        policy.add(&name, &path, Origin::Relay).map(|_| ())
                    }
                    ProjectOp::Remove { name } => policy.remove(&name).map(|_| ()),
                    ProjectOp::List => Ok(()),
                    // Workspaces of pool users: only a pool worker has them.
                    ProjectOp::Create { .. }
                    | ProjectOp::ListFor { .. }
                    | ProjectOp::RemoveFor { .. }
                    | ProjectOp::Usage { .. } => {
                        let reply = ProjectReply::Refused {
                            message: "this agent is not a pool worker: it has no workspaces for pool users"
                                .into(),
                        };
                        self.inner
                            .send_control(AgentMessage::ProjectReply { id, reply });
                        return;
                    }
                };
                match done {
                    Ok(()) => ProjectReply::Ok(report_of(&policy)),
                    Err(e) => ProjectReply::Refused {
                        message: e.to_string(),
                    },
                }
            }
        };
        let report = match (&reply, changed) {
            (ProjectReply::Ok(report), true) => Some(report.clone()),
            _ => None,
        };
        self.inner
            .send_control(AgentMessage::ProjectReply { id, reply });
        if let Some(report) = report {
            self.inner.send_control(AgentMessage::Projects(report));
        }
    }
}

impl Inner {
    fn files(&self) -> MutexGuard<'_, Assembly> {
        self.files.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn outbox(&self) -> MutexGuard<'_, Outbox> {
        self.outbox.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn control(&self) -> MutexGuard<'_, VecDeque<AgentMessage>> {
        self.control.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn drivers(&self) -> MutexGuard<'_, Drivers> {
        self.drivers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A path through the shared-task API proxy for `user`, starting the proxy the first time.
    async fn lease(
        &self,
        user: &str,
        no_network: bool,
    ) -> Result<Option<meter::proxy::Lease>, String> {
        let upstream = upstream(&self.config).ok_or(NO_SHARED_KEY)?;
        let proxy = self
            .proxy
            .get_or_try_init(|| {
                meter::proxy::ApiProxy::start(
                    upstream,
                    self.meter.clone(),
                    self.shutdown.clone(),
                    &self.tracker,
                )
            })
            .await
            .map_err(|e| format!("cannot start the API proxy for shared tasks: {e}"))?;
        let socket_dir = if no_network {
            // The agent's own config directory is 0700, so nobody else can reach these sockets.
            let dir = self.dir.path().join("run");
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            Some(dir)
        } else {
            None
        };
        let lease = proxy
            .lease(
                user,
                socket_dir.as_deref().map(|d| (d, sandbox::forward::PORT)),
            )
            .map_err(|e| format!("cannot open the API proxy for this shared task: {e}"))?;
        Ok(Some(lease))
    }

    /// Whether a task runs, or a warm process waits, in the worktree `w`.
    fn in_use(&self, w: &worktree::Worktree) -> bool {
        let drivers = self.drivers();
        std::iter::once(&w.task)
            .chain(&w.tasks)
            .any(|t| drivers.running.contains_key(t))
            || drivers
                .warm
                .values()
                .any(|warm| warm.owner.worktree.as_deref() == Some(w.task.as_str()))
    }

    /// Removes the worktrees whose last task ended longer ago than the retention, keeping their branches.
    async fn sweep(&self) {
        // One sweep at a time: the hourly one and those at task starts would otherwise remove the same
        // worktree twice.
        let Ok(_one_at_a_time) = self.sweeping.try_lock() else {
            return;
        };
        let retention = self.config.worktree_retention.as_secs();
        for w in self.worktrees.expired(retention) {
            // Looked at again just before removing: a follow-up may have claimed it since it was listed.
            if self.in_use(&w) || !self.worktrees.still_expired(&w.task, retention) {
                continue;
            }
            match worktree::remove(&w, false).await {
                Ok(()) => {
                    tracing::info!(branch = %w.branch, path = %w.path.display(), "worktree past its retention removed; its branch stays");
                    self.worktrees.forget(&w.task).await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, path = %w.path.display(), "cannot remove a worktree past its retention")
                }
            }
        }
    }

    /// Merges, keeps or discards a finished task's worktree, for its requester or the owner only.
    async fn worktree_action(
        &self,
        task: &str,
        action: WorktreeAction,
        requester: &Requester,
    ) -> WorktreeOutcome {
        let refuse = |message: String| WorktreeOutcome {
            ok: false,
            message,
            conflicts: Vec::new(),
        };
        let Some(w) = self.worktrees.of_task(task) else {
            return refuse(format!(
                "task {task} has no worktree on this agent (any more)"
            ));
        };
        let is_owner = role_of(requester, self.owner_id.as_deref()) == Role::Owner;
        if !is_owner && requester.user != w.user {
            tracing::warn!(user = %requester.user, task, ?action, "worktree request from someone who is neither the requester nor the owner");
            return refuse(format!(
                "only the person who started task {task}, or this agent's owner, may merge, keep or discard its branch"
            ));
        }
        {
            let mut drivers = self.drivers();
            let in_use = std::iter::once(&w.task)
                .chain(&w.tasks)
                .any(|t| drivers.running.contains_key(t));
            if in_use {
                return refuse(format!(
                    "a task is still running in {}: wait for it to end, or cancel it",
                    w.branch
                ));
            }
            if action != WorktreeAction::Keep {
                // A warm process there would resume in a folder that is about to go.
                let warm: Vec<String> = drivers
                    .warm
                    .iter()
                    .filter(|(_, warm)| warm.owner.worktree.as_deref() == Some(w.task.as_str()))
                    .map(|(sid, _)| sid.clone())
                    .collect();
                for sid in warm {
                    if let Some(warm) = drivers.warm.remove(&sid) {
                        let _ = warm.tx.send(Cmd::Cancel);
                    }
                }
            }
        }
        let done = match action {
            WorktreeAction::Keep => Ok(format!(
                "kept branch {} (worktree {})",
                w.branch,
                w.path.display()
            )),
            WorktreeAction::Discard => worktree::remove(&w, true)
                .await
                .map(|()| format!("discarded {}: its worktree and branch are gone", w.branch)),
            WorktreeAction::Merge => match worktree::merge(&w).await {
                Ok(Merged::Conflict(conflicts)) => {
                    return WorktreeOutcome {
                        ok: false,
                        message: format!(
                        "{} conflicts with the project's branch in {} file(s); nothing was changed",
                        w.branch,
                        conflicts.len()
                    ),
                        conflicts,
                    }
                }
                Ok(how) => {
                    let how = if how == Merged::FastForward {
                        "fast-forward"
                    } else {
                        "merge commit"
                    };
                    worktree::remove(&w, true).await.map(|()| {
                        format!(
                            "merged {} into the project ({how}); its worktree and branch are gone",
                            w.branch
                        )
                    })
                }
                Err(e) => Err(e),
            },
        };
        match done {
            Ok(message) => {
                if action != WorktreeAction::Keep {
                    self.worktrees.forget(&w.task).await;
                }
                WorktreeOutcome {
                    ok: true,
                    message,
                    conflicts: Vec::new(),
                }
            }
            Err(e) => refuse(e.to_string()),
        }
    }

    fn policy(&self) -> Result<Policy, PolicyError> {
        // Loaded per use, so `ct-agent project add` and `sharing` on this machine apply without a restart.
        match &self.config.allowed_dirs {
            Some(dirs) => Policy::load_with(&self.dir, dirs, Host::detect()),
            None => Policy::load(&self.dir),
        }
    }

    /// Whether a task runs in `user`'s project `name`, which must then not be removed under it. Warm
    /// processes there (finished tasks waiting for a follow-up) are closed instead: the project is going.
    fn pool_project_busy(&self, user: &str, name: &str, pool: &PoolConfig) -> bool {
        let Ok(path) = pool.project_dir(user, name) else {
            return false;
        };
        let mut drivers = self.drivers();
        let running = drivers
            .shared
            .iter()
            .any(|(task, c)| drivers.running.contains_key(task) && c.starts_with(&path));
        if !running {
            let warm: Vec<String> = drivers
                .warm
                .iter()
                .filter(|(_, w)| w.owner.cwd.starts_with(&path))
                .map(|(sid, _)| sid.clone())
                .collect();
            for sid in warm {
                if let Some(w) = drivers.warm.remove(&sid) {
                    let _ = w.tx.send(Cmd::Cancel);
                }
            }
        }
        running
    }

    fn report(&self) -> ProjectsReport {
        if self.config.pool.is_some() {
            return pool_report(Vec::new());
        }
        match self.policy() {
            Ok(policy) => report_of(&policy),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the project policy for the relay");
                ProjectsReport::default()
            }
        }
    }

    fn send_control(&self, msg: AgentMessage) {
        {
            let mut control = self.control();
            if control.len() >= MAX_CONTROL {
                control.pop_front();
            }
            control.push_back(msg);
        }
        self.to_send.notify_one();
    }

    /// Queues an event regardless of the outbox limit (a handful of small events per task).
    fn emit_now(&self, task: &str, event: TaskEvent) {
        self.outbox().push(task, event);
        self.to_send.notify_one();
    }

    /// Queues an event once the outbox has room, so a task that prints faster than the relay acknowledges
    /// stops reading Claude Code's output instead of growing memory. Gives up only at shutdown.
    async fn emit(&self, task: &str, event: TaskEvent) {
        loop {
            // Created before the check, so an ack between the check and the wait still wakes us.
            let acked = self.acked.notified();
            if !self.outbox().is_full() {
                break;
            }
            tokio::select! {
                () = acked => {}
                () = self.shutdown.cancelled() => break,
            }
        }
        self.emit_now(task, event);
    }
}

/// The task a driver is bound to now ("" if none).
fn task_of(bound: &Option<Bound>) -> String {
    bound.as_ref().map(|b| b.task.clone()).unwrap_or_default()
}

/// Saves `files` in the task's folder (off the async threads) and gives the user message content: the
/// prompt naming them, with images as image content. Without files, the prompt as it was.
async fn with_files(
    cwd: &Path,
    task: &str,
    prompt: String,
    files: Vec<Attachment>,
) -> Result<Value, String> {
    if files.is_empty() {
        return Ok(Value::String(prompt));
    }
    let (cwd, task) = (cwd.to_path_buf(), task.to_string());
    let (saved, files) =
        tokio::task::spawn_blocking(move || (attachments::save(&cwd, &task, &files), files))
            .await
            .map_err(|e| format!("saving stopped: {e}"))?;
    let saved = saved?;
    tracing::info!(dir = %saved.dir, files = ?saved.names, "attached files saved");
    let prompt = saved.prompt(&prompt);
    Ok(attachments::content(&prompt, &files).unwrap_or(Value::String(prompt)))
}

fn report_of(policy: &Policy) -> ProjectsReport {
    ProjectsReport {
        projects: policy
            .list()
            .into_iter()
            .map(|p| ProjectInfo {
                name: p.name,
                path: p.path.display().to_string(),
            })
            .collect(),
        allowed_dirs: policy
            .allowed_dirs()
            .iter()
            .map(|d| d.display().to_string())
            .collect(),
        accepts_shared: *policy.sharing() != SharePolicy::Off,
        accepts_files: true,
        pool: false,
    }
}

/// What a pool worker reports: no projects of its own (each user's are asked for with `ListFor`, and `projects`
/// holds them only in such a reply), tasks from anyone the relay lets use the pool, files accepted.
fn pool_report(projects: Vec<ProjectInfo>) -> ProjectsReport {
    ProjectsReport {
        projects,
        allowed_dirs: Vec::new(),
        accepts_shared: true,
        accepts_files: true,
        pool: true,
    }
}

/// The task a driver's process is working for.
struct Bound {
    task: String,
    /// Prompts sent whose turn has not ended yet; the task ends when this reaches zero.
    turns_due: usize,
    approvals: HashSet<String>,
    cancelled: bool,
    session_reported: bool,
}

/// Owns one Claude Code process for its whole life: one task, then (warm) perhaps follow-ups.
struct Driver {
    inner: Arc<Inner>,
    key: u64,
    owner: Owner,
    session: Session,
    events: mpsc::Receiver<RunnerEvent>,
    cmds: mpsc::UnboundedReceiver<Cmd>,
    bound: Option<Bound>,
    session_id: Option<String>,
    /// Kept so an idle driver can register itself as warm.
    tx: Option<mpsc::UnboundedSender<Cmd>>,
    /// A grantee session's path through the API proxy, closed with the process.
    _lease: Option<meter::proxy::Lease>,
    /// The context usage last reported, so an unchanged one is not sent again.
    last_context: Option<(u64, Option<u64>)>,
    /// The model and CLI version the process's init reported, for follow-ups on it.
    init: Option<(Option<String>, Option<String>)>,
    /// Tool uses whose result has not come yet.
    tool_uses: ToolEvents,
}

impl Driver {
    async fn start(
        inner: Arc<Inner>,
        key: u64,
        spec: TaskSpec,
        files: Vec<Attachment>,
        owner: Owner,
        cmds: mpsc::UnboundedReceiver<Cmd>,
        crowded: bool,
    ) {
        let task = spec.task.clone();
        let mut owner = owner;
        if let (true, Some(pool)) = (owner.pool, inner.config.pool.clone()) {
            // Measured here, not in `admit`: a large workspace takes a while to walk.
            let user = owner.user.clone();
            let quota = tokio::task::spawn_blocking(move || pool.check_quota(&user))
                .await
                .unwrap_or_else(|e| Err(e.to_string()));
            if let Err(message) = quota {
                inner.drivers().running.remove(&task);
                inner.emit_now(
                    &task,
                    TaskEvent::Finished {
                        state: FinalState::Failed,
                        message: Some(message),
                    },
                );
                return;
            }
        }
        if let Some(of) = &owner.worktree {
            inner.worktrees.add_task(of, &task).await;
        } else if spec.options.isolation == Some(Isolation::Worktree) && spec.resume.is_some() {
            // Claude Code resumes a session only from the folder it ran in, which was the project's.
            inner.emit_now(
                &task,
                TaskEvent::Text {
                    text: "ⓘ this follow-up continues a session that ran in the project's own folder, \
                           so it runs there too (a worktree would lose the conversation)"
                        .into(),
                },
            );
        } else if spec.options.isolation == Some(Isolation::Worktree) {
            match inner.worktrees.create(&owner.cwd, &task, &owner.user).await {
                Ok(created) => {
                    let w = created.worktree;
                    if crowded {
                        inner.emit_now(
                            &task,
                            TaskEvent::Text {
                                text: "ⓘ another task is running in this project's folder, so this one \
                                       runs in a git worktree of its own (the owner can choose otherwise: \
                                       `ct-agent project set NAME isolation=shared`)"
                                    .into(),
                            },
                        );
                    }
                    tracing::info!(branch = %w.branch, path = %w.path.display(), "task runs in a worktree");
                    inner.emit_now(
                        &task,
                        TaskEvent::Worktree {
                            branch: w.branch.clone(),
                            base: w.base.clone(),
                            note: created.note,
                            change: None,
                            diff: None,
                            diff_cut: false,
                        },
                    );
                    owner.cwd = w.cwd;
                    owner.worktree = Some(w.task);
                }
                // Not asked for (only crowded): a project that is no repository runs shared as it always did.
                Err(WorktreeError::NotARepo(_)) if crowded => {}
                Err(e) if crowded => {
                    inner.emit_now(
                        &task,
                        TaskEvent::Text {
                            text: format!(
                                "ⓘ another task is running in this project's folder, and this one could not \
                                 get a worktree of its own, so it runs beside it: {e}"
                            ),
                        },
                    );
                }
                Err(e @ WorktreeError::NotARepo(_)) => {
                    inner.emit_now(
                        &task,
                        TaskEvent::Text {
                            text: format!("⚠ {e}"),
                        },
                    );
                }
                Err(e) => {
                    tracing::info!(error = %e, "no worktree for the task");
                    inner.drivers().running.remove(&task);
                    inner.emit_now(
                        &task,
                        TaskEvent::Finished {
                            state: FinalState::Failed,
                            message: Some(format!(
                                "this task asked for a worktree of its own: {e}"
                            )),
                        },
                    );
                    return;
                }
            }
        }
        // Saved in the folder the task runs in (its worktree, if it has one), before Claude Code starts.
        let prompt = match with_files(&owner.cwd, &task, spec.prompt.clone(), files).await {
            Ok(prompt) => prompt,
            Err(e) => {
                tracing::warn!(error = %e, "attached files not saved");
                inner.drivers().running.remove(&task);
                inner.emit_now(
                    &task,
                    TaskEvent::Finished {
                        state: FinalState::Failed,
                        message: Some(format!("the attached files could not be saved: {e}")),
                    },
                );
                return;
            }
        };
        let started = Self::spawn(&inner, &owner, &spec).await;
        let (session, events, lease) = match started {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "Claude Code did not start");
                inner.drivers().running.remove(&task);
                inner.emit_now(
                    &task,
                    TaskEvent::Finished {
                        state: FinalState::Failed,
                        message: Some(e.to_string()),
                    },
                );
                return;
            }
        };
        // A cancel that arrived while the process was starting is still in `cmds` and handled first.
        let tx = inner.drivers().running.get(&task).cloned();
        let mut driver = Driver {
            inner,
            key,
            owner,
            session,
            events,
            cmds,
            bound: Some(Bound {
                task,
                turns_due: 1,
                approvals: HashSet::new(),
                cancelled: false,
                session_reported: false,
            }),
            session_id: spec.resume.clone(),
            tx,
            _lease: lease,
            last_context: None,
            init: None,
            tool_uses: ToolEvents::default(),
        };
        if let Err(e) = driver.session.send_content(prompt) {
            driver.fail(e.to_string()).await;
        }
        driver.run().await;
    }

    /// Starts the Claude Code process: for a grantee, with a path through the API proxy first (the sandbox
    /// needs its address and socket), kept for as long as the process lives.
    async fn spawn(
        inner: &Inner,
        owner: &Owner,
        spec: &TaskSpec,
    ) -> Result<
        (
            Session,
            mpsc::Receiver<RunnerEvent>,
            Option<meter::proxy::Lease>,
        ),
        String,
    > {
        let lease = match &owner.sandbox {
            Some(_) if owner.role != Role::Owner => {
                inner.lease(&owner.user, owner.no_network).await?
            }
            _ => None,
        };
        let spec = session_spec(&inner.config, inner.dir.path(), owner, spec, lease.as_ref())?;
        let (session, events) = Session::start(spec).await.map_err(|e| e.to_string())?;
        Ok((session, events, lease))
    }

    async fn run(mut self) {
        let shutdown = self.inner.shutdown.clone();
        let mut shutting_down = false;
        loop {
            let idle = self.bound.is_none();
            tokio::select! {
                event = self.events.recv() => match event {
                    Some(RunnerEvent::Exited(info)) => {
                        self.exited(info).await;
                        break;
                    }
                    Some(event) => self.on_event(event).await,
                    None => break,
                },
                Some(cmd) = self.cmds.recv() => self.on_cmd(cmd).await,
                () = tokio::time::sleep(self.inner.config.idle_timeout), if idle => {
                    if self.leave_warm() {
                        tracing::info!("no follow-up in {:?}: closing Claude Code", self.inner.config.idle_timeout);
                        let _ = self.session.close();
                    }
                }
                () = shutdown.cancelled(), if !shutting_down => {
                    shutting_down = true;
                    self.session.start_cancel();
                }
            }
        }
        self.leave_warm();
        if let Some(bound) = &self.bound {
            self.inner.drivers().running.remove(&bound.task);
        }
    }

    /// Takes this driver out of the warm map; false when a follow-up already took it (an Attach is coming).
    fn leave_warm(&self) -> bool {
        let mut drivers = self.inner.drivers();
        let mine = self
            .session_id
            .as_ref()
            .is_some_and(|sid| drivers.warm.get(sid).is_some_and(|w| w.key == self.key));
        if mine {
            if let Some(sid) = &self.session_id {
                drivers.warm.remove(sid);
            }
        }
        mine
    }

    async fn emit(&self, event: TaskEvent) {
        if let Some(bound) = &self.bound {
            self.inner.emit(&bound.task, event).await;
        }
    }

    async fn on_cmd(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Attach {
                task,
                prompt,
                files,
            } => {
                self.bound = Some(Bound {
                    task,
                    turns_due: 1,
                    approvals: HashSet::new(),
                    cancelled: false,
                    session_reported: false,
                });
                self.report_session().await;
                // A new task asks afresh: "allow for the session" rules of the task before it end with it
                // (the driver is only ever reused for the same requester, but a rule must not outlive the
                // task whose approver made it, unseen).
                let forgotten = self.session.forget_rules();
                let prompt =
                    match with_files(&self.owner.cwd, &task_of(&self.bound), prompt, files).await {
                        Ok(prompt) => prompt,
                        Err(e) => {
                            self.fail(format!("the attached files could not be saved: {e}"))
                                .await;
                            return;
                        }
                    };
                if let Err(e) = forgotten.and_then(|()| self.session.send_content(prompt)) {
                    self.fail(e.to_string()).await;
                }
            }
            Cmd::Input(prompt, files) => {
                let Some(bound) = &self.bound else { return };
                if bound.cancelled {
                    return;
                }
                let task = bound.task.clone();
                let files = match files.unwrap_or(Ok(Vec::new())) {
                    Ok(files) => files,
                    Err(why) => {
                        self.emit(TaskEvent::Text {
                            text: format!("⚠ the files with that message did not arrive whole ({why}): send them again"),
                        })
                        .await;
                        Vec::new()
                    }
                };
                let prompt = match with_files(&self.owner.cwd, &task, prompt, files).await {
                    Ok(prompt) => prompt,
                    Err(e) => {
                        self.emit(TaskEvent::Text {
                            text: format!("⚠ that message was not passed on: its files could not be saved: {e}"),
                        })
                        .await;
                        return;
                    }
                };
                let Some(bound) = &mut self.bound else { return };
                bound.turns_due += 1;
                if let Err(e) = self.session.send_content(prompt) {
                    if let Some(b) = &mut self.bound {
                        b.turns_due -= 1;
                    }
                    self.emit(TaskEvent::Text {
                        text: format!("⚠ that message was not passed on: {e}"),
                    })
                    .await;
                }
            }
            Cmd::Decide { approval, decision } => {
                let Some(bound) = &mut self.bound else { return };
                if !bound.approvals.remove(&approval) {
                    tracing::debug!(%approval, "decision for an approval that is no longer pending");
                    return;
                }
                let outcome = match &decision {
                    WireDecision::AllowOnce { .. } => "allowed",
                    WireDecision::AllowSession | WireDecision::AllowSessionPrefix { .. } => {
                        "allowed_for_session"
                    }
                    WireDecision::Deny { .. } => "denied",
                    WireDecision::Answers { .. } => "answered",
                };
                let decision = match decision {
                    WireDecision::AllowOnce { updated_input } => {
                        Decision::AllowOnce { updated_input }
                    }
                    WireDecision::AllowSession => Decision::AllowSession { prefix: None },
                    WireDecision::AllowSessionPrefix { prefix } => Decision::AllowSession {
                        prefix: Some(prefix),
                    },
                    WireDecision::Deny { reason } => Decision::Deny { reason },
                    WireDecision::Answers { answers } => Decision::Answers(answers),
                };
                let _ = self.session.decide(&approval, decision);
                self.emit(TaskEvent::ApprovalClosed {
                    approval,
                    outcome: outcome.into(),
                })
                .await;
            }
            Cmd::Cancel => {
                if let Some(bound) = &mut self.bound {
                    bound.cancelled = true;
                }
                self.session.start_cancel();
            }
        }
    }

    async fn report_session(&mut self) {
        let Some(sid) = self.session_id.clone() else {
            return;
        };
        let Some(bound) = &mut self.bound else { return };
        if std::mem::replace(&mut bound.session_reported, true) {
            return;
        }
        // A warm process's init came with an earlier task: what it said still holds for this one.
        let (model, claude_version) = self.init.clone().unwrap_or_default();
        self.emit(TaskEvent::Session {
            session_id: sid,
            model,
            claude_version,
        })
        .await;
    }

    async fn on_event(&mut self, event: RunnerEvent) {
        match event {
            RunnerEvent::Init(init) => {
                self.session_id = Some(init.session_id.clone());
                self.init = Some((
                    Some(init.model.clone()).filter(|m| !m.is_empty()),
                    Some(init.version.clone()).filter(|v| !v.is_empty()),
                ));
                if let Some(of) = &self.owner.worktree {
                    self.inner.worktrees.add_session(of, &init.session_id).await;
                }
                let Some(bound) = &mut self.bound else { return };
                if std::mem::replace(&mut bound.session_reported, true) {
                    return;
                }
                self.emit(TaskEvent::Session {
                    session_id: init.session_id,
                    model: Some(init.model).filter(|m| !m.is_empty()),
                    claude_version: Some(init.version).filter(|v| !v.is_empty()),
                })
                .await;
            }
            RunnerEvent::AssistantText { text } => {
                for text in chunks(&text, MAX_EVENT_TEXT) {
                    self.emit(TaskEvent::Text { text }).await;
                }
            }
            RunnerEvent::ToolUse {
                id,
                name,
                summary,
                input,
            } => {
                let on = self.inner.tool_output.load(Ordering::Relaxed);
                let event = self.tool_uses.tool_use(on, id, name, summary, input);
                self.emit(event).await;
            }
            RunnerEvent::ApprovalAutoAllowed {
                tool,
                summary,
                rule,
                ..
            } => {
                // Posted in the thread and audited by the relay: a use nobody was asked about is still seen.
                self.emit(TaskEvent::Tool {
                    name: tool,
                    summary,
                    auto_allowed: Some(wire_scope(rule)),
                    id: None,
                    command: None,
                })
                .await;
            }
            RunnerEvent::ToolResult {
                tool_use_id,
                is_error,
                text,
                full,
                structured,
            } => {
                let on = self.inner.tool_output.load(Ordering::Relaxed);
                let event =
                    self.tool_uses
                        .result(on, tool_use_id, is_error, text, &full, &structured);
                self.emit(event).await;
            }
            RunnerEvent::ApprovalRequested(req) => {
                let Some(bound) = &mut self.bound else {
                    // Only a running turn asks; an idle process has none. Refuse rather than leave it hanging.
                    let _ = self.session.decide(
                        &req.id,
                        Decision::Deny {
                            reason: "no task is running in this session".into(),
                        },
                    );
                    return;
                };
                bound.approvals.insert(req.id.clone());
                // What the use acts on, from its input: never the model's `description` in its place (the
                // model writes that, and it can say "npm test" about anything).
                let summary = claude::events::summarize_tool_input(&req.tool, &req.input);
                let session = SessionScope::exact(&req.tool, &req.input).map(wire_scope);
                let whole = serde_json::to_vec(&req.input).map_or(0, |v| v.len());
                let (input, input_cut) = if whole <= MAX_APPROVAL_INPUT {
                    (req.input, false)
                } else {
                    (bound_value(req.input), true)
                };
                self.emit(TaskEvent::ApprovalRequested {
                    approval: req.id,
                    question: req.tool == "AskUserQuestion",
                    tool: req.tool,
                    summary,
                    input,
                    description: req
                        .description
                        .filter(|d| !d.is_empty())
                        .map(|d| cut_bytes(&d, MAX_INPUT_STRING)),
                    session,
                    input_cut,
                })
                .await;
            }
            RunnerEvent::Context { tokens, window } => {
                let now = Some((tokens, window));
                if self.inner.live_usage.load(Ordering::Relaxed) && self.last_context != now {
                    self.last_context = now;
                    self.emit(TaskEvent::Context { tokens, window }).await;
                }
            }
            RunnerEvent::ApprovalWithdrawn { id } => self.close_approval(id, "withdrawn").await,
            RunnerEvent::ApprovalTimedOut { id } => self.close_approval(id, "timed_out").await,
            RunnerEvent::TurnResult(result) => {
                let usage = |k: &str| result.usage.get(k).and_then(Value::as_u64);
                let event = TaskEvent::TurnFinished {
                    is_error: result.is_error,
                    subtype: result.subtype.clone(),
                    text: result.text.as_deref().map(|t| cut_bytes(t, MAX_EVENT_TEXT)),
                    cost_usd: result.total_cost_usd,
                    turns: result.num_turns.and_then(|n| u32::try_from(n).ok()),
                    input_tokens: usage("input_tokens"),
                    output_tokens: usage("output_tokens"),
                    duration_ms: result.duration_ms,
                };
                if !result.session_id.is_empty() {
                    self.session_id = Some(result.session_id.clone());
                    if let Some(of) = &self.owner.worktree {
                        self.inner
                            .worktrees
                            .add_session(of, &result.session_id)
                            .await;
                    }
                }
                self.emit(event).await;
                let Some(bound) = &mut self.bound else { return };
                bound.turns_due = bound.turns_due.saturating_sub(1);
                if bound.turns_due > 0 || bound.cancelled {
                    return;
                }
                let (state, message) = if result.is_error {
                    let detail = if result.errors.is_empty() {
                        result
                            .text
                            .clone()
                            .unwrap_or_else(|| result.subtype.clone())
                    } else {
                        result.errors.join("; ")
                    };
                    (
                        FinalState::Failed,
                        Some(format!("Claude Code stopped: {detail}")),
                    )
                } else {
                    (FinalState::Done, None)
                };
                self.worktree_summary().await;
                self.emit(TaskEvent::Finished { state, message }).await;
                self.park();
            }
            RunnerEvent::Failed(e) => self.fail(e.to_string()).await,
            RunnerEvent::Error { message } => {
                tracing::warn!(%message, "Claude Code output problem");
            }
            // Compaction is told as a line of text, the one kind of event every relay shows: a new event kind
            // would not decode on an older relay, which would then never acknowledge it (nor anything after).
            RunnerEvent::Raw(line) if line["subtype"] == "compact_boundary" => {
                if let Some(text) = claude::events::compaction_notice(&line) {
                    self.emit(TaskEvent::Text { text }).await;
                }
            }
            RunnerEvent::RuleAdded { .. }
            | RunnerEvent::Queued { .. }
            | RunnerEvent::Raw(_)
            | RunnerEvent::Exited(_) => {}
        }
    }

    async fn close_approval(&mut self, id: String, outcome: &str) {
        let Some(bound) = &mut self.bound else { return };
        if bound.approvals.remove(&id) {
            self.emit(TaskEvent::ApprovalClosed {
                approval: id,
                outcome: outcome.into(),
            })
            .await;
        }
    }

    /// The task has ended; keep the process for a follow-up from the same person.
    fn park(&mut self) {
        let Some(bound) = self.bound.take() else {
            return;
        };
        let mut drivers = self.inner.drivers();
        drivers.running.remove(&bound.task);
        match (&self.session_id, &self.tx) {
            (Some(sid), Some(tx)) if !self.inner.shutdown.is_cancelled() => {
                drivers.warm.insert(
                    sid.clone(),
                    Warm {
                        key: self.key,
                        tx: tx.clone(),
                        owner: self.owner.clone(),
                    },
                );
            }
            _ => {
                let _ = self.session.close();
            }
        }
    }

    /// The task cannot go on: say why, and stop the process.
    async fn fail(&mut self, message: String) {
        if self.bound.is_none() {
            return;
        }
        self.emit(TaskEvent::Finished {
            state: FinalState::Failed,
            message: Some(message),
        })
        .await;
        if let Some(bound) = self.bound.take() {
            self.inner.drivers().running.remove(&bound.task);
        }
        self.session.start_cancel();
    }

    async fn exited(&mut self, info: claude::ExitInfo) {
        let Some(bound) = &self.bound else { return };
        let (state, message) = if bound.cancelled {
            (FinalState::Cancelled, None)
        } else if self.inner.shutdown.is_cancelled() {
            (
                FinalState::Cancelled,
                Some("the agent on that machine is shutting down".to_string()),
            )
        } else {
            let how = match (info.code, info.signal) {
                (Some(code), _) => format!("exit status {code}"),
                (None, Some(sig)) => format!("signal {sig}"),
                _ => "no exit status".into(),
            };
            let tail = info.stderr_tail.trim();
            let tail = if tail.is_empty() {
                String::new()
            } else {
                format!(": {}", cut_bytes(tail, 2000))
            };
            (
                FinalState::Failed,
                Some(format!("Claude Code exited unexpectedly ({how}){tail}")),
            )
        };
        self.worktree_summary().await;
        self.emit(TaskEvent::Finished { state, message }).await;
    }

    /// For a task in a worktree: commits what it left there on its branch and reports the change against
    /// where the worktree started, before the task's end.
    async fn worktree_summary(&self) {
        let Some(of) = &self.owner.worktree else {
            return;
        };
        let Some(w) = self.inner.worktrees.of_task(of) else {
            return;
        };
        let finished = self
            .bound
            .as_ref()
            .map_or_else(|| w.task.clone(), |b| b.task.clone());
        let event = match worktree::summarize(&w, &finished).await {
            Ok((change, diff, diff_cut)) => TaskEvent::Worktree {
                branch: w.branch.clone(),
                base: w.base.clone(),
                note: None,
                change: Some(change),
                diff: Some(diff),
                diff_cut,
            },
            Err(e) => TaskEvent::Worktree {
                branch: w.branch.clone(),
                base: w.base.clone(),
                note: Some(format!("could not record what the task changed: {e}")),
                change: None,
                diff: None,
                diff_cut: false,
            },
        };
        self.inner.worktrees.ended(of).await;
        self.emit(event).await;
    }
}

/// Whether a task runs sandboxed: grantees' always where bubblewrap works (else refused, unless the owner
/// opted out), the owner's when the owner chose so.
fn sandbox_for(
    role: Role,
    settings: &sandbox::SandboxSettings,
    found: Result<Bwrap, Option<SandboxError>>,
) -> Result<Option<Bwrap>, SandboxError> {
    let wanted = role != Role::Owner || settings.owner;
    match (wanted, found) {
        (false, _) => Ok(None),
        (true, Ok(bwrap)) => Ok(Some(bwrap)),
        (true, Err(_)) if role != Role::Owner && settings.unsandboxed_grantees => {
            tracing::warn!("running a shared task without a sandbox: the owner allowed it and bubblewrap is unavailable");
            Ok(None)
        }
        (true, Err(Some(unusable))) => Err(unusable),
        (true, Err(None)) if role == Role::Owner => Err(SandboxError::MissingForOwner),
        (true, Err(None)) => Err(SandboxError::MissingForGrantee),
    }
}

/// Why a shared task is refused when the agent has no API key the proxy could add.
const NO_SHARED_KEY: &str = "this agent has no API key it can use for shared tasks, so it runs only its owner's \
     own: the owner's Claude Code is signed in with `claude login`, which is never lent. The owner can give the \
     agent a key for shared tasks on that machine (`CT_AGENT_SHARED_API_KEY=sk-ant-... ct-agent run`); it stays \
     outside the sandbox, and `ct-agent sharing budget` limits what each person may spend";

/// Where the shared-task proxy forwards, with which key: the shared key, else the owner's API key; `None` when
/// there is neither (an OAuth login cannot be added by a proxy, and is never lent).
fn upstream(config: &TaskConfig) -> Option<meter::proxy::Upstream> {
    let env = sandbox::env::agent_env(config.env_clear, &config.env);
    let var = |key: &str| {
        env.iter()
            .find(|(k, _)| k == key)
            .and_then(|(_, v)| v.to_str())
            .filter(|v| !v.is_empty())
            .map(str::to_owned)
    };
    let api_key = config
        .shared_api_key
        .as_ref()
        .map(|k| k.0.clone())
        .or_else(|| var("ANTHROPIC_API_KEY"))?;
    Some(meter::proxy::Upstream {
        base_url: var("ANTHROPIC_BASE_URL").unwrap_or_else(|| "https://api.anthropic.com".into()),
        api_key,
    })
}

/// Who the agent treats a requester as: the owner only when their Discord id is the one this agent was paired
/// with. The relay's word is taken only to lower a role, never to raise one: a relay that labels someone
/// else "owner" gets a grantee (judged by the share policy, sandboxed).
fn role_of(requester: &ct_protocol::task::Requester, owner_id: Option<&str>) -> Role {
    let is_owner = owner_id == Some(requester.user.as_str());
    match requester.role {
        Role::Owner if is_owner => Role::Owner,
        Role::Owner => Role::Grantee,
        // The owner asking through a share of their own agent is still the owner.
        _ if is_owner => Role::Owner,
        other => other,
    }
}

/// Permission modes the agent refuses whatever the relay sends: `bypassPermissions` turns approvals off, so
/// only the owner's own tasks may use it, and only once the owner allowed it on this machine.
fn check_mode(
    mode: PermissionMode,
    role: Role,
    settings: &sandbox::SandboxSettings,
) -> Result<(), String> {
    if mode != PermissionMode::BypassPermissions {
        return Ok(());
    }
    if role != Role::Owner {
        return Err("bypassPermissions is only for the owner's own tasks on this agent".into());
    }
    if !settings.bypass_permissions {
        return Err(
            "this agent does not run tasks in bypassPermissions mode: its owner can allow it on that \
             machine with `ct-agent sandbox bypass on`"
                .into(),
        );
    }
    Ok(())
}

fn session_spec(
    config: &TaskConfig,
    agent_config: &Path,
    owner: &Owner,
    spec: &TaskSpec,
    lease: Option<&meter::proxy::Lease>,
) -> Result<SessionSpec, String> {
    let mut s = SessionSpec::new(&owner.cwd);
    s.claude_bin = config.claude_bin.clone();
    s.env_clear = config.env_clear;
    s.env = config.env.clone();
    if let Some(bwrap) = &owner.sandbox {
        sandboxed(&mut s, bwrap, config, agent_config, owner, lease)?;
    }
    s.approval_timeout = config.approval_timeout;
    s.allow_settings_writes = config.allow_settings_writes;
    s.cancel_step = config.cancel_step;
    s.model = spec.options.model.clone();
    s.permission_mode = spec
        .options
        .permission_mode
        .as_deref()
        .and_then(|m| m.parse().ok());
    s.max_turns = spec.options.max_turns;
    s.max_budget_usd = spec.options.max_budget_usd;
    s.resume = spec.resume.clone();
    Ok(s)
}

/// Puts `s` inside the sandbox: the bubblewrap prefix, the allow-listed environment, the project descriptor
/// it inherits, and the resolved Claude Code executable (reachable inside because its folder is bound).
fn sandboxed(
    s: &mut SessionSpec,
    bwrap: &Bwrap,
    config: &TaskConfig,
    agent_config: &Path,
    owner: &Owner,
    lease: Option<&meter::proxy::Lease>,
) -> Result<(), String> {
    let source = sandbox::env::agent_env(config.env_clear, &config.env);
    let var = |key: &str| {
        source
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| PathBuf::from(v))
            .filter(|p| p.is_absolute())
    };
    let owner_home = var("HOME");
    // The owner's home path, so `~/...` paths read the same inside; it is an empty tmpfs there.
    let home = owner_home
        .clone()
        .filter(|h| h.parent().is_some())
        .unwrap_or_else(|| PathBuf::from("/home/sandbox"));
    let (claude_config, credentials) = if owner.role == Role::Owner {
        let claude_config = sandbox::ClaudeConfig::Owner {
            config_dir: var("CLAUDE_CONFIG_DIR"),
            home: home.clone(),
        };
        (claude_config, sandbox::env::Credentials::Owner)
    } else {
        let dir = sandbox::grantee_config_dir(agent_config, &owner.user).map_err(|e| {
            format!("cannot prepare a Claude Code config folder for this shared task: {e}")
        })?;
        (
            sandbox::ClaudeConfig::Own(dir),
            sandbox::env::Credentials::None,
        )
    };
    let path_env = source
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.clone());
    let bin = claude::preflight::find_claude(
        config.claude_bin.as_deref(),
        path_env,
        owner_home.as_deref(),
    )
    .map_err(|e| e.to_string())?;
    let (bin, install) = sandbox::claude_install(&bin)
        .map_err(|e| format!("cannot resolve {}: {e}", bin.display()))?;
    let project = sandbox::ProjectDir::open(&owner.cwd).map_err(|e| e.to_string())?;
    if let Some(hook) = &config.before_sandbox {
        (hook.0)(project.path());
    }
    let network = match (
        owner.no_network,
        lease.and_then(|l| l.socket()),
        &config.forwarder,
    ) {
        (true, Some(socket), Some(forwarder)) => Some(sandbox::Network {
            forwarder: forwarder.clone(),
            socket: socket.to_path_buf(),
        }),
        (true, _, _) => return Err("the sandbox's way to the API is missing".into()),
        (false, _, _) => None,
    };
    // A grantee may change the project's files, not what runs as the owner later unseen (git hooks and
    // config, Claude Code's project settings): those are bound read-only over the project.
    // A pool user's project is their own: nothing in it runs as anyone else later.
    let protected = if owner.role == Role::Owner || owner.pool {
        Vec::new()
    } else {
        project.protected().map_err(|e| e.to_string())?
    };
    s.wrapper = sandbox::Plan {
        project: &project,
        protected: &protected,
        home: home.clone(),
        claude_install: Some(install),
        config: &claude_config,
        network,
    }
    .command(bwrap);
    if owner.pool {
        // The limits wrap the whole sandbox: prlimit sets them on itself and execs bubblewrap, so every
        // process of the task inherits them.
        let limits = config
            .pool
            .as_ref()
            .map(|p| p.limits.command())
            .transpose()?
            .ok_or("a pool task without the pool's settings")?;
        s.wrapper = limits
            .into_iter()
            .chain(std::mem::take(&mut s.wrapper))
            .collect();
    }
    s.inherit_fds = std::iter::once(project.shared_fd())
        .chain(protected.iter().map(|p| p.shared_fd()))
        .collect();
    s.claude_bin = Some(bin);
    s.env_clear = true;
    s.env = sandbox::env::sandbox_env(
        source,
        &home,
        claude_config.dir_inside(&home).as_deref(),
        credentials,
    );
    if owner.role != Role::Owner {
        // Only the proxy's path and a placeholder key: the real key is added outside.
        let lease = lease.ok_or(NO_SHARED_KEY)?;
        s.env.retain(|(k, _)| k != "ANTHROPIC_BASE_URL");
        s.env
            .push(("ANTHROPIC_BASE_URL".into(), lease.base_url().into()));
        s.env
            .push(("ANTHROPIC_API_KEY".into(), meter::proxy::DUMMY_KEY.into()));
    }
    Ok(())
}

/// A rule as sent to the relay: an exact-input rule leaves out the input (the approval carried it already,
/// and one use's input can be large).
fn wire_scope(rule: SessionScope) -> SessionScope {
    match rule {
        SessionScope::Input { tool, .. } => SessionScope::Input {
            tool,
            input: Value::Null,
        },
        other => other,
    }
}

/// Builds tool events: what older relays know (the use's summary, a preview of the result) unless the relay
/// asked for tool output; then also the use's id and whole Bash command, and the result whole (bounded), with
/// Bash's exit status and an edit's diff. Remembers uses until their result comes, for the result's tool and
/// the diff of an older CLI that prints no patch.
#[derive(Debug, Default)]
struct ToolEvents {
    /// (id, tool, input), oldest first, at most [`MAX_PENDING_TOOLS`].
    pending: VecDeque<(String, String, Value)>,
}

impl ToolEvents {
    fn tool_use(
        &mut self,
        tool_output: bool,
        id: String,
        name: String,
        summary: String,
        input: Value,
    ) -> TaskEvent {
        if !tool_output {
            return TaskEvent::Tool {
                name,
                summary,
                auto_allowed: None,
                id: None,
                command: None,
            };
        }
        let command = (name == "Bash")
            .then(|| {
                input["command"]
                    .as_str()
                    .map(|c| cut_bytes(c, MAX_TOOL_COMMAND))
            })
            .flatten();
        if self.pending.len() >= MAX_PENDING_TOOLS {
            self.pending.pop_front();
        }
        self.pending.push_back((id.clone(), name.clone(), input));
        TaskEvent::Tool {
            name,
            summary,
            auto_allowed: None,
            id: Some(id),
            command,
        }
    }

    fn result(
        &mut self,
        tool_output: bool,
        tool_use_id: String,
        is_error: bool,
        summary: String,
        full: &str,
        structured: &Value,
    ) -> TaskEvent {
        if !tool_output {
            return TaskEvent::ToolResult {
                is_error,
                summary,
                tool_use_id: None,
                output: None,
                output_bytes: None,
                exit_code: None,
                diff: None,
                diff_cut: false,
            };
        }
        let (tool, input) = match self.pending.iter().position(|(id, ..)| *id == tool_use_id) {
            Some(at) => self
                .pending
                .remove(at)
                .map(|(_, tool, input)| (tool, input))
                .unwrap_or_default(),
            None => (String::new(), Value::Null),
        };
        let (diff, diff_cut) = match claude::events::edit_diff(&tool, &input, structured) {
            Some(d) if d.len() > MAX_EVENT_TEXT => (Some(cut_bytes(&d, MAX_EVENT_TEXT)), true),
            d => (d, false),
        };
        // An edit's result text only says it worked; its diff is what there is to see.
        let (output, output_bytes) = if diff.is_some() {
            (None, None)
        } else {
            let (o, cut) = claude::events::head_and_tail(full, MAX_EVENT_TEXT);
            (Some(o), cut)
        };
        TaskEvent::ToolResult {
            is_error,
            summary,
            exit_code: (tool == "Bash")
                .then(|| claude::events::bash_exit_code(is_error, full))
                .flatten(),
            tool_use_id: Some(tool_use_id),
            output,
            output_bytes,
            diff,
            diff_cut,
        }
    }
}

/// `text` in pieces of at most `max` bytes, cut on char boundaries (preferring a line break in the last
/// quarter, so a reader of one piece sees whole lines).
fn chunks(text: &str, max: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while rest.len() > max {
        let mut at = max;
        while !rest.is_char_boundary(at) {
            at -= 1;
        }
        if let Some(nl) = rest[..at].rfind('\n').filter(|&nl| nl >= max * 3 / 4) {
            at = nl + 1;
        }
        out.push(rest[..at].to_owned());
        rest = &rest[at..];
    }
    if !rest.is_empty() || out.is_empty() {
        out.push(rest.to_owned());
    }
    out
}

/// `text` cut to at most `max` bytes on a char boundary, with an ellipsis when cut.
fn cut_bytes(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut at = max.saturating_sub(3);
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    format!("{}…", &text[..at])
}

/// A tool input small enough for one event: long strings (a whole file being written) are cut, saying how
/// much was left out. The agent keeps the full input; an approval applies to it, not to this preview.
fn bound_value(v: Value) -> Value {
    match v {
        Value::String(s) if s.len() > MAX_INPUT_STRING => {
            let more = s.len() - MAX_INPUT_STRING;
            Value::String(format!(
                "{} [… {more} more bytes]",
                cut_bytes(&s, MAX_INPUT_STRING)
            ))
        }
        Value::Array(items) => Value::Array(items.into_iter().take(100).map(bound_value).collect()),
        Value::Object(map) => Value::Object(
            map.into_iter()
                .take(100)
                .map(|(k, v)| (k, bound_value(v)))
                .collect(),
        ),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[tokio::test]
    async fn only_the_requester_or_the_paired_owner_may_decide_a_worktree_whatever_the_relay_says()
    {
        let dir = tempfile::tempdir().unwrap();
        let repo = std::fs::canonicalize(dir.path()).unwrap().join("repo");
        std::fs::create_dir(&repo).unwrap();
        let sh = |args: &[&str]| {
            let ok = std::process::Command::new("git")
                .arg("-C")
                .arg(&repo)
                .args(args)
                .status()
                .unwrap()
                .success();
            assert!(ok, "git {args:?}");
        };
        sh(&["init", "-q", "-b", "main"]);
        sh(&[
            "-c",
            "user.name=T",
            "-c",
            "user.email=t@e",
            "commit",
            "-q",
            "--allow-empty",
            "-m",
            "one",
        ]);
        let config = ConfigDir::open(dir.path().join("agent")).unwrap();
        let tasks = Tasks::new(config, TaskConfig::default(), CancellationToken::new());
        let inner = &tasks.inner;
        let w = inner
            .worktrees
            .create(&repo, "t_1", "300")
            .await
            .unwrap()
            .worktree;
        // This agent is not paired: nobody is its owner, so a relay calling someone "owner" proves nothing.
        let who = |user: &str, role| Requester {
            user: user.into(),
            name: None,
            role,
        };
        for stranger in [who("400", Role::Owner), who("400", Role::Grantee)] {
            let out = inner
                .worktree_action("t_1", WorktreeAction::Discard, &stranger)
                .await;
            assert!(
                !out.ok && out.message.contains("only the person"),
                "{out:?}"
            );
            assert!(w.path.is_dir());
        }
        let out = inner
            .worktree_action("t_1", WorktreeAction::Discard, &who("300", Role::Grantee))
            .await;
        assert!(out.ok, "{out:?}");
        assert!(!w.path.exists());
    }

    #[test]
    fn grantees_are_sandboxed_or_refused_and_owners_only_by_choice() {
        let bwrap = || {
            Ok(Bwrap {
                path: "/usr/bin/bwrap".into(),
            })
        };
        let off = sandbox::SandboxSettings::default();
        let owner_on = sandbox::SandboxSettings {
            owner: true,
            ..off.clone()
        };
        let opt_out = sandbox::SandboxSettings {
            unsandboxed_grantees: true,
            ..off.clone()
        };
        assert_eq!(sandbox_for(Role::Owner, &off, bwrap()), Ok(None));
        assert!(sandbox_for(Role::Owner, &owner_on, bwrap())
            .unwrap()
            .is_some());
        assert_eq!(
            sandbox_for(Role::Owner, &owner_on, Err(None)),
            Err(SandboxError::MissingForOwner)
        );
        for role in [Role::Grantee, Role::TrustedGrantee] {
            assert!(
                sandbox_for(role, &off, bwrap()).unwrap().is_some(),
                "{role:?}"
            );
            let refused = sandbox_for(role, &off, Err(None)).unwrap_err();
            assert_eq!(refused, SandboxError::MissingForGrantee);
            assert!(refused.to_string().contains("apt install bubblewrap"));
            assert_eq!(sandbox_for(role, &opt_out, Err(None)), Ok(None));
            // Even opted out, a working bubblewrap is used.
            assert!(sandbox_for(role, &opt_out, bwrap()).unwrap().is_some());
        }
    }

    #[test]
    fn only_the_paired_owner_is_the_owner_whatever_the_relay_says() {
        let who = |user: &str, role| ct_protocol::task::Requester {
            user: user.into(),
            name: None,
            role,
        };
        let owner = Some("100");
        assert_eq!(role_of(&who("100", Role::Owner), owner), Role::Owner);
        assert_eq!(role_of(&who("200", Role::Owner), owner), Role::Grantee);
        assert_eq!(role_of(&who("200", Role::Owner), None), Role::Grantee);
        assert_eq!(
            role_of(&who("200", Role::TrustedGrantee), owner),
            Role::TrustedGrantee
        );
        assert_eq!(role_of(&who("100", Role::Grantee), owner), Role::Owner);
    }

    #[test]
    fn bypass_permissions_needs_the_owner_and_their_local_setting() {
        let off = sandbox::SandboxSettings::default();
        let on = sandbox::SandboxSettings {
            bypass_permissions: true,
            ..off.clone()
        };
        let bypass = PermissionMode::BypassPermissions;
        let refused = check_mode(bypass, Role::Owner, &off).unwrap_err();
        assert!(refused.contains("ct-agent sandbox bypass on"), "{refused}");
        assert_eq!(check_mode(bypass, Role::Owner, &on), Ok(()));
        assert!(check_mode(bypass, Role::TrustedGrantee, &on).is_err());
        assert_eq!(
            check_mode(PermissionMode::AcceptEdits, Role::Grantee, &off),
            Ok(())
        );
    }

    #[test]
    fn tool_events_are_what_older_relays_know_unless_the_relay_asked_for_output() {
        let input = serde_json::json!({"command": "make && echo ok"});
        let big = "x".repeat(MAX_EVENT_TEXT * 3);
        // Off: byte for byte the events agents sent before tool output existed.
        let mut t = ToolEvents::default();
        let used = t.tool_use(
            false,
            "toolu_1".into(),
            "Bash".into(),
            "make".into(),
            input.clone(),
        );
        assert_eq!(
            serde_json::to_string(&used).unwrap(),
            r#"{"kind":"tool","name":"Bash","summary":"make"}"#
        );
        let done = t.result(
            false,
            "toolu_1".into(),
            true,
            "Exit code 2".into(),
            &big,
            &Value::Null,
        );
        assert_eq!(
            serde_json::to_string(&done).unwrap(),
            r#"{"kind":"tool_result","is_error":true,"summary":"Exit code 2"}"#
        );
        assert!(
            t.pending.is_empty(),
            "nothing remembered when nothing is sent"
        );
        // On: the id, the whole command, the output bounded with its size, the exit status.
        let used = t.tool_use(true, "toolu_1".into(), "Bash".into(), "make".into(), input);
        assert!(
            matches!(&used, TaskEvent::Tool { id: Some(i), command: Some(c), .. }
            if i == "toolu_1" && c == "make && echo ok")
        );
        let full = format!("Exit code 2\n{big}");
        let TaskEvent::ToolResult {
            tool_use_id,
            output,
            output_bytes,
            exit_code,
            diff,
            ..
        } = t.result(
            true,
            "toolu_1".into(),
            true,
            "Exit code 2".into(),
            &full,
            &Value::Null,
        )
        else {
            panic!("not a result");
        };
        assert_eq!(tool_use_id.as_deref(), Some("toolu_1"));
        assert!(output.unwrap().len() <= MAX_EVENT_TEXT);
        assert_eq!(output_bytes, Some(full.len() as u64));
        assert_eq!(exit_code, Some(2));
        assert_eq!(diff, None);
        // An edit's result is its diff, from the input when the CLI printed no patch.
        t.tool_use(
            true,
            "toolu_2".into(),
            "Edit".into(),
            "f".into(),
            serde_json::json!({"file_path": "f", "old_string": "a", "new_string": "b"}),
        );
        let TaskEvent::ToolResult { output, diff, .. } = t.result(
            true,
            "toolu_2".into(),
            false,
            "updated".into(),
            "updated",
            &Value::Null,
        ) else {
            panic!("not a result");
        };
        assert_eq!(output, None);
        assert!(diff.unwrap().ends_with("-a\n+b\n"));
        // Uses whose result never comes are forgotten, oldest first.
        for i in 0..MAX_PENDING_TOOLS + 10 {
            t.tool_use(
                true,
                format!("u{i}"),
                "Read".into(),
                "f".into(),
                Value::Null,
            );
        }
        assert_eq!(t.pending.len(), MAX_PENDING_TOOLS);
    }

    #[test]
    fn chunks_stay_under_the_limit_on_char_boundaries_and_lose_nothing() {
        let text = "héllo wörld\n".repeat(10_000);
        let parts = chunks(&text, 1000);
        assert!(parts.iter().all(|p| p.len() <= 1000));
        assert!(parts.iter().all(|p| p.ends_with('\n')), "cut at line ends");
        assert_eq!(parts.concat(), text);
        let one_line = "ü".repeat(3000);
        let parts = chunks(&one_line, 1001);
        assert!(parts.iter().all(|p| p.len() <= 1001));
        assert_eq!(parts.concat(), one_line);
        assert_eq!(chunks("", 10), vec![String::new()]);
    }

    #[test]
    fn tool_inputs_are_bounded_for_display() {
        let big = json!({"file_path": "/p/a.rs", "content": "x".repeat(100_000), "list": (0..1000).collect::<Vec<_>>()});
        let shown = bound_value(big);
        let size = serde_json::to_string(&shown).unwrap().len();
        assert!(size < MAX_EVENT_TEXT, "{size}");
        assert_eq!(shown["file_path"], "/p/a.rs");
        assert!(shown["content"]
            .as_str()
            .unwrap()
            .ends_with("[… 96000 more bytes]"));
    }
}
