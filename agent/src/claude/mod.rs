//! Running the user's own Claude Code CLI: one long-lived `claude -p --input-format stream-json
//! --output-format stream-json --verbose --permission-prompt-tool stdio` process per live session.
//!
//! - [`preflight`]: is `claude` installed and new enough, before anything is spawned.
//! - [`process`]: the OS side: own process group, bounded stdout lines, stderr tail, killing the whole tree.
//! - [`events`]: the stream-json lines parsed into what the runner acts on, and the [`RunnerEvent`]s it emits.
//! - [`session`]: the [`Session`] actor: prompts (queued while a turn runs), approvals with a timeout,
//!   interrupt, cancel, close, resume.
//!
//! Nothing here knows about the relay: the caller turns [`RunnerEvent`]s into wire messages and relayed
//! decisions into [`Session::decide`] calls.

pub mod events;
pub mod preflight;
pub mod process;
pub mod session;

use std::ffi::OsString;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde_json::Value;

pub use events::{ApprovalRequest, ExitInfo, Init, RunnerEvent, TurnResult};
pub use preflight::{Support, Version, MIN_VERSION, NEWEST_TESTED};
pub use session::Session;

/// Why a task cannot run, in words the user can act on. Cheap to clone, so it can travel in events.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TaskError {
    /// No `claude` binary where we looked.
    #[error(
        "Claude Code is not installed on this machine: install it with `npm install -g @anthropic-ai/claude-code` \
         (needs Node.js 18+); looked in {looked_in}"
    )]
    NotInstalled { looked_in: String },
    /// The CLI is older than [`MIN_VERSION`].
    #[error(
        "Claude Code {found} on this machine is too old: CodeTogether needs {minimum} or newer; upgrade with \
         `npm install -g @anthropic-ai/claude-code@latest` (or `claude update`)"
    )]
    TooOld { found: String, minimum: String },
    /// The binary exists but does not run or does not say its version.
    #[error("Claude Code at {bin} does not work: {detail}; reinstall it with `npm install -g @anthropic-ai/claude-code`")]
    Broken { bin: String, detail: String },
    /// The CLI has no credentials on this machine.
    #[error(
        "Claude Code is not logged in on {host}: run `claude login` there (or set ANTHROPIC_API_KEY for the \
         agent's service)"
    )]
    NotLoggedIn { host: String },
    /// Spawning the CLI failed.
    #[error("cannot start Claude Code ({bin}) in {cwd}: {detail}")]
    Spawn {
        bin: String,
        cwd: String,
        detail: String,
    },
    /// The session has ended (its process exited or was cancelled): start a new one, with `resume`.
    #[error("this Claude Code session has ended")]
    SessionEnded,
    /// Too many prompts are waiting behind the running turn.
    #[error("{max} messages are already waiting for the running turn: wait for it to finish")]
    QueueFull { max: usize },
}

/// `--permission-mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PermissionMode {
    Default,
    AcceptEdits,
    Auto,
    BypassPermissions,
    DontAsk,
    Plan,
}

impl PermissionMode {
    /// The CLI's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Default => "default",
            Self::AcceptEdits => "acceptEdits",
            Self::Auto => "auto",
            Self::BypassPermissions => "bypassPermissions",
            Self::DontAsk => "dontAsk",
            Self::Plan => "plan",
        }
    }
}

impl fmt::Display for PermissionMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for PermissionMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [
            Self::Default,
            Self::AcceptEdits,
            Self::Auto,
            Self::BypassPermissions,
            Self::DontAsk,
            Self::Plan,
        ]
        .into_iter()
        .find(|m| m.as_str().eq_ignore_ascii_case(s))
        .ok_or_else(|| {
            format!("unknown permission mode `{s}`: use default, acceptEdits, auto, bypassPermissions, dontAsk or plan")
        })
    }
}

/// The answer to an [`ApprovalRequest`].
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Run it this once; `updated_input` replaces the tool input (default: the input as requested).
    AllowOnce { updated_input: Option<Value> },
    /// Run it, and allow the same use without asking until [`Session::forget_rules`] (remembered by the
    /// agent): the exact command, file, origin or input ([`SessionScope::exact`](ct_protocol::scope::SessionScope::exact)), or for Bash the simple
    /// commands starting with `prefix` ([`SessionScope::prefix`](ct_protocol::scope::SessionScope::prefix)). Never the whole tool.
    AllowSession { prefix: Option<String> },
    /// Do not run it; the model is told `reason`.
    Deny { reason: String },
    /// The user's answers to an `AskUserQuestion` (sent as `updatedInput.answers`).
    Answers(Value),
}

/// How to run one session.
#[derive(Debug, Clone)]
pub struct SessionSpec {
    /// The project folder (already checked by [`crate::projects::Policy::resolve`]).
    pub cwd: PathBuf,
    /// `claude` to run; `None` looks for it on `PATH` and in the usual install places.
    pub claude_bin: Option<PathBuf>,
    pub model: Option<String>,
    pub permission_mode: Option<PermissionMode>,
    pub max_turns: Option<u32>,
    pub max_budget_usd: Option<f64>,
    /// Resume this session id (`--resume`); it must have run in the same `cwd`.
    pub resume: Option<String>,
    /// Start the CLI with an empty environment (plus `PATH` and `LANG`) instead of the agent's own.
    pub env_clear: bool,
    /// Variables set for the CLI, over the inherited (or cleared) environment.
    pub env: Vec<(OsString, OsString)>,
    /// A pending approval is denied after this long.
    pub approval_timeout: Duration,
    /// How long each step of [`Session::cancel`] waits (for the turn to end after `interrupt`, after SIGINT,
    /// for the exit after stdin is closed) before the next, harsher one.
    pub cancel_step: Duration,
    /// Pass the CLI's permission suggestions on "allow for this session", including those that write
    /// `.claude/settings*.json` into the project or the user's settings. Off: nothing is written.
    pub allow_settings_writes: bool,
    /// The oldest CLI accepted.
    pub min_version: Version,
    /// Most prompts waiting behind a running turn.
    pub max_queued: usize,
    /// A command the CLI runs under (`bwrap ... --`, see [`crate::sandbox`]); empty runs it directly.
    pub wrapper: Vec<OsString>,
    /// Descriptors the wrapper inherits (the sandbox's project folder, bound by descriptor); kept open for
    /// the session's life.
    pub inherit_fds: Vec<std::sync::Arc<std::os::fd::OwnedFd>>,
}

impl SessionSpec {
    /// The `claude` this session runs: [`SessionSpec::claude_bin`], else the first on the `PATH` given to it
    /// (or the agent's own), else the places the installers put it.
    pub fn find_claude(&self) -> Result<PathBuf, TaskError> {
        let path_env = self
            .env
            .iter()
            .find(|(k, _)| k == "PATH")
            .map(|(_, v)| v.clone())
            .or_else(|| std::env::var_os("PATH"));
        let home = std::env::var_os("HOME").map(PathBuf::from);
        preflight::find_claude(self.claude_bin.as_deref(), path_env, home.as_deref())
    }

    /// A session in `cwd` with the defaults: 10 minute approval timeout, 5 s cancel steps, no settings writes.
    pub fn new(cwd: impl Into<PathBuf>) -> Self {
        Self {
            cwd: cwd.into(),
            claude_bin: None,
            model: None,
            permission_mode: None,
            max_turns: None,
            max_budget_usd: None,
            resume: None,
            env_clear: false,
            env: Vec::new(),
            approval_timeout: Duration::from_secs(600),
            cancel_step: Duration::from_secs(5),
            allow_settings_writes: false,
            min_version: MIN_VERSION,
            max_queued: 32,
            wrapper: Vec::new(),
            inherit_fds: Vec::new(),
        }
    }

    /// The CLI arguments for this spec.
    pub fn args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = [
            "-p",
            "--input-format",
            "stream-json",
            "--output-format",
            "stream-json",
            "--verbose",
            "--permission-prompt-tool",
            "stdio",
        ]
        .into_iter()
        .map(OsString::from)
        .collect();
        let mut opt = |flag: &str, value: String| {
            args.push(flag.into());
            args.push(value.into());
        };
        if let Some(model) = &self.model {
            opt("--model", model.clone());
        }
        if let Some(mode) = self.permission_mode {
            opt("--permission-mode", mode.as_str().to_owned());
        }
        if let Some(n) = self.max_turns {
            opt("--max-turns", n.to_string());
        }
        if let Some(usd) = self.max_budget_usd {
            opt("--max-budget-usd", usd.to_string());
        }
        if let Some(id) = &self.resume {
            opt("--resume", id.clone());
        }
        args
    }
}
