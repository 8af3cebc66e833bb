//! The boundary between the bot and the relay core: [`Backend`] is everything the bot's command handlers
//! need, in the bot's own terms; `ct-relay` implements it over its `Core` (this crate must not depend on the
//! relay, which embeds the bot).
//!
//! Users are Discord user ids as strings, the relay's only human identity. Every refusal a user can cause
//! comes back as [`BackendError::Refused`] with a message that says what to do (agent offline since when,
//! unknown project with the list, not shared with you, path not allowed, Claude Code not logged in); the
//! bot shows it ephemerally as is. Anything else is [`BackendError::Internal`]: logged, and the user is told
//! to try again.
//!
//! Mapping to the core (as of writing; names there may still move):
//! `submit` → `Core::submit_task`, `follow` → `Core::follow`, `cancel` → `Core::cancel_task`,
//! `decide` → `Core::decide`, `task` → `Core::task`, `pairing_code` → `Core::mint_pairing_token`,
//! `agents` → `Core::agents` (filtered to the user), `unregister` → `Core::revoke` (after an ownership check),
//! `approver` → `Core::approver`, and the project, share and reply calls → the core's API for them.
//!
//! `/cc` needs nothing of its own here: the bot builds it from these calls (stop is [`Backend::cancel`],
//! compact a [`Backend::reply`], clear and model a [`Backend::submit`] with or without `resume`).

use std::collections::BTreeMap;

use async_trait::async_trait;
pub use ct_protocol::files::Attachment;
use ct_protocol::task::{Decision, TaskEvent, TaskOptions};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

/// Why a backend call did not happen.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The person asked for something that cannot be done; the message tells them what to do instead.
    #[error("{0}")]
    Refused(String),
    /// Our fault (store, bug); not shown in detail.
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

pub type Result<T> = std::result::Result<T, BackendError>;

/// One of a user's agents (or one shared with them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentInfo {
    pub name: String,
    /// Short fingerprint of the agent's key, for telling machines apart.
    pub fingerprint: String,
    /// Discord user id of the owner.
    pub owner: String,
    pub online: bool,
    /// Online since, or last seen, in Unix seconds.
    pub since: Option<u64>,
    /// `quic` or `websocket`: how it is (or was last) connected, when known.
    pub transport: Option<String>,
    /// The software version it last connected with, when known.
    pub version: Option<String>,
}

/// A project: a name for a folder on one agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProjectInfo {
    pub name: String,
    pub path: String,
    pub agent: String,
    /// Discord user id of the agent's owner (differs from the user for shared projects).
    pub owner: String,
}

/// What sharing allows a grantee.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShareLevel {
    /// Run tasks; approvals go to the owner.
    Run,
    /// Run tasks and answer their own approvals.
    Trusted,
}

/// A share, seen from either side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareInfo {
    pub owner: String,
    pub grantee: String,
    /// Empty: all projects.
    pub projects: Vec<String>,
    pub level: ShareLevel,
}

/// A task as the bot shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskInfo {
    pub id: String,
    pub project: String,
    pub agent: String,
    /// Discord user id of who asked.
    pub requester: String,
    /// Discord user id of the agent's owner (differs from `requester` on a shared agent).
    pub owner: String,
    /// `queued`, `running`, `waiting_approval`, `done`, `failed`, `cancelled`, `lost`.
    pub state: String,
    pub created_at: u64,
    pub session_id: Option<String>,
    /// The model asked for (`None`: the agent's default).
    pub model: Option<String>,
    /// The permission mode asked for.
    pub mode: Option<String>,
    /// The earlier task this one continues (a follow-up after that one ended).
    pub follows: Option<String>,
    /// What the requester asked (the conversation's first words in `/status`).
    pub prompt: String,
}

/// Which of a user's tasks `/tasks` lists: a page of those that match, newest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HistoryQuery {
    /// Only tasks on the agent of this name.
    pub agent: Option<String>,
    /// Only tasks in this state; `open` stands for queued, running and waiting for an approval.
    pub state: Option<String>,
    /// Only tasks in the project of this name.
    pub project: Option<String>,
    /// Only tasks this Discord user asked for.
    pub requester: Option<String>,
    /// Matching tasks to skip (the pages before this one).
    pub skip: usize,
    /// Matching tasks on this page.
    pub take: usize,
}

impl HistoryQuery {
    /// Whether `task` is one this query lists (on the agent and in the state it names).
    pub fn matches(&self, task: &TaskInfo) -> bool {
        let agent = self
            .agent
            .as_deref()
            .is_none_or(|a| a.eq_ignore_ascii_case(&task.agent));
        let state = match self.state.as_deref() {
            None => true,
            Some("open") => matches!(
                task.state.as_str(),
                "queued" | "running" | "waiting_approval"
            ),
            Some(s) => s == task.state,
        };
        let project = self
            .project
            .as_deref()
            .is_none_or(|p| p.eq_ignore_ascii_case(&task.project));
        let requester = self
            .requester
            .as_deref()
            .is_none_or(|r| r == task.requester);
        agent && state && project && requester
    }

    /// The tasks of `all` (newest first) on this query's page, and whether more match after it.
    pub fn page(&self, all: Vec<TaskInfo>) -> (Vec<TaskInfo>, bool) {
        let matching: Vec<TaskInfo> = all.into_iter().filter(|t| self.matches(t)).collect();
        let more = matching.len() > self.skip.saturating_add(self.take);
        let page = matching
            .into_iter()
            .skip(self.skip)
            .take(self.take)
            .collect();
        (page, more)
    }
}

/// One line of `/tasks`: a task and the Discord thread its output went to, when the backend knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryEntry {
    pub task: TaskInfo,
    pub thread: Option<u64>,
}

/// A page of `/tasks`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HistoryPage {
    pub entries: Vec<HistoryEntry>,
    /// More matching tasks follow this page.
    pub more: bool,
}

/// Where a user's tasks go: their own machines (local mode), or a worker pool the relay's operator runs
/// (cluster mode), where they have a workspace on one worker.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModeInfo {
    /// The pool, in cluster mode; `None`: local mode.
    pub pool: Option<String>,
    /// The worker holding their workspace, once they have one.
    pub worker: Option<String>,
    pub worker_online: bool,
    /// Something they should know, e.g. that their worker is being drained and their files stay on it.
    pub note: Option<String>,
}

/// A project command in a pool user's workspace on their worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkspaceOp {
    /// A new project, empty or cloned from a git URL.
    Create {
        name: String,
        git: Option<String>,
    },
    List,
    /// Removes the project and its files.
    Remove {
        name: String,
    },
}

/// What a pool user spent in the current budget period, as their worker counted it.
pub use ct_protocol::project::UsageReport;

/// A one-time link that signs its holder in to the web dashboard as the user it was minted for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DashboardLink {
    pub url: String,
    /// Seconds until it expires.
    pub expires_in: u64,
}

/// A request to start a task.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskRequest {
    pub user: String,
    pub prompt: String,
    pub project: Option<String>,
    /// Run on this user's agent (they must have shared it).
    pub target: Option<String>,
    pub agent: Option<String>,
    pub options: TaskOptions,
    /// A Claude Code session to continue (`/cc model` switching model mid-conversation); the backend
    /// checks it comes from a task of this user's on that agent.
    pub resume: Option<String>,
    /// The requester's display name, shown to the agent's owner.
    pub name: Option<String>,
    /// The requester's role ids in the guild, for pools open to a role.
    pub roles: Vec<String>,
}

/// A pairing code for `/register pair`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pairing {
    /// The token to paste: `ct-agent pair <token>`.
    pub token: String,
    /// Seconds until it expires.
    pub expires_in: u64,
}

/// A task's stored events and the live ones that follow; a follower skips live events whose sequence
/// number it already has (the two overlap by design, so nothing falls between them).
#[derive(Debug)]
pub struct TaskFeed {
    pub task: TaskInfo,
    pub past: Vec<(u64, TaskEvent)>,
    pub live: broadcast::Receiver<(u64, TaskEvent)>,
}

/// One line of `/audit`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEntry {
    pub at: u64,
    /// Discord user id of who did it.
    pub actor: String,
    pub what: String,
}

/// Where a task's output is going in Discord and how far it got. The backend keeps it for the bot, so a
/// restarted relay (or the next leader of a cluster) carries on in the same thread, editing the same progress
/// message, without posting anything twice: what was posted after the last mark before a crash is posted
/// again with the same nonces, which Discord deduplicates (for a few minutes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThreadMark {
    pub task: String,
    /// The thread's channel id.
    pub thread: u64,
    /// The progress message with the Stop button, once posted.
    pub progress: Option<u64>,
    /// The last event whose output is in the thread.
    pub posted: u64,
    /// The guild's upload limit, from the interaction that started the thread.
    pub upload_limit: u64,
    /// Approvals still open in the thread, by approval id, with the message carrying their buttons: a follower
    /// resumed after a restart edits them (buttons disabled, outcome shown) when they close. Marks written
    /// before this field existed have none.
    #[serde(default)]
    pub approvals: BTreeMap<String, u64>,
    /// The turn still open in the thread: the event its tool message began at, and the message of each of its
    /// parts (0 where a post failed). A follower that carries on edits those messages, so a tool shown as
    /// waiting before the restart gets its result in place. None in marks written before this existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub turn: Option<(u64, Vec<u64>)>,
    /// A thread still to be opened (`thread` is 0 until then): a node that does not lead leaves opening it to
    /// the leader, so that every call made with the bot token comes from one node (see `crate::leader`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub opening: Option<Opening>,
}

/// What the leader needs to open a task's thread for another node, and how it went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Opening {
    /// The channel the thread opens in.
    pub channel: u64,
    /// The task's prompt, for the thread's name and its first message.
    pub prompt: String,
    /// Whether the thread is private.
    pub private: bool,
    /// Set by the leader when the thread could not be opened (the task is then stopped): why, in words for
    /// the person who asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed: Option<String>,
}

/// Where a thread's chain of tasks is, and what the next follow-up in it does. The backend keeps it for the bot:
/// in a cluster every node answers the thread's commands (`/cc`, `/reply`) while the leader receives its
/// messages, so the chain cannot live in one node's memory: a `/cc model` answered by one node would be
/// unknown to the node that runs the follow-up, and a node that missed a follow-up would act on an older task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThreadChain {
    /// The thread's channel id.
    pub thread: u64,
    /// The chain's current task: follow-ups, `/cc` and the Stop button act on it.
    pub task: String,
    /// `/cc model`: the next follow-up starts a task with this model, resuming the session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_model: Option<String>,
    /// `/cc clear`: the next follow-up starts a new session instead of resuming.
    #[serde(default)]
    pub fresh: bool,
}

/// What the bot needs from the relay core. `user` is always the Discord user id of the person acting,
/// as Discord reported it; the backend enforces every permission.
#[async_trait]
pub trait Backend: Send + Sync + 'static {
    /// `/register pair`.
    async fn pairing_code(&self, user: &str) -> Result<Pairing>;
    /// `/register status`, `/agents`: the user's agents and those shared with them.
    async fn agents(&self, user: &str) -> Result<Vec<AgentInfo>>;
    /// Waits until an agent pairs with `pairing` and returns it, or `None` once the code expired unused
    /// (the bot then tells the user whose agent just paired).
    async fn wait_paired(&self, user: &str, pairing: &Pairing) -> Result<Option<AgentInfo>>;
    /// `/register unregister`.
    async fn unregister(&self, user: &str, agent: &str) -> Result<AgentInfo>;
    /// `/agents default:NAME`: the user's agent that takes their tasks (and their grantees') that name none.
    async fn set_default_agent(&self, _user: &str, _agent: &str) -> Result<AgentInfo> {
        Err(BackendError::Refused(
            "this relay cannot set a default agent: name the agent in each /task instead".into(),
        ))
    }
    /// The name of the user's default agent, if they set one and it is still theirs.
    async fn default_agent(&self, _user: &str) -> Result<Option<String>> {
        Ok(None)
    }

    /// `/project add`: answered by the agent, which checks the path against its allowed folders.
    async fn add_project(
        &self,
        user: &str,
        name: &str,
        path: &str,
        agent: Option<&str>,
    ) -> Result<ProjectInfo>;
    /// `/project list` and project autocomplete.
    async fn projects(&self, user: &str) -> Result<Vec<ProjectInfo>>;
    /// `/project remove`: on `agent` when given (the name may exist on several of the user's machines).
    async fn remove_project(&self, user: &str, name: &str, agent: Option<&str>) -> Result<()>;

    /// `/task`.
    async fn submit(&self, req: TaskRequest) -> Result<TaskInfo>;
    /// Refuses `req` if its submission would be refused for who asks (their standing, the agent, the
    /// project; with `files`, whether the agent takes files), taking and writing nothing. Asked before a
    /// `/task`'s files are downloaded, so nobody makes the bot fetch files for a task they may not run. A
    /// backend that cannot tell lets it through: the submission decides.
    async fn vet_submit(&self, _req: &TaskRequest, _files: bool) -> Result<()> {
        Ok(())
    }
    /// A message in a task's thread, or `/reply`: continue the same session.
    async fn reply(&self, user: &str, task: &str, prompt: &str) -> Result<TaskInfo>;
    /// `/task` with files attached (downloaded and within [`ct_protocol::files`]' limits). A backend that
    /// cannot carry files refuses rather than start the task without them.
    async fn submit_with_files(
        &self,
        req: TaskRequest,
        files: Vec<Attachment>,
    ) -> Result<TaskInfo> {
        if !files.is_empty() {
            return Err(BackendError::Refused(
                "this relay does not take attached files: send the task without them".into(),
            ));
        }
        self.submit(req).await
    }
    /// A follow-up with files attached; as [`submit_with_files`](Self::submit_with_files).
    async fn reply_with_files(
        &self,
        user: &str,
        task: &str,
        prompt: &str,
        files: Vec<Attachment>,
    ) -> Result<TaskInfo> {
        if !files.is_empty() {
            return Err(BackendError::Refused(
                "this relay does not take attached files: send the message without them".into(),
            ));
        }
        self.reply(user, task, prompt).await
    }
    /// `/status`.
    async fn task(&self, user: &str, task: &str) -> Result<TaskInfo>;
    /// The user's recent tasks (task-id autocomplete, `/audit`).
    async fn tasks(&self, user: &str) -> Result<Vec<TaskInfo>>;
    /// The thread's event stream.
    async fn follow(&self, task: &str) -> Result<TaskFeed>;
    /// A task's stored and live events for `user`, who must be allowed to see it (theirs, or on their agent);
    /// a task they may not see is refused as one that does not exist. The dashboard's live view.
    async fn watch(&self, user: &str, task: &str) -> Result<TaskFeed> {
        let task_info = self.task(user, task).await?;
        let feed = self.follow(&task_info.id).await?;
        Ok(TaskFeed {
            task: task_info,
            ..feed
        })
    }
    /// `/status` and the "Full output" button: the task as `user` may see it (theirs, or on their agent)
    /// and its stored events, read without following it. A task that does not exist and one the user may
    /// not see are refused in the same words, so a stranger learns nothing from the id.
    async fn task_events(
        &self,
        user: &str,
        task: &str,
    ) -> Result<(TaskInfo, Vec<(u64, TaskEvent)>)> {
        let info = self.task(user, task).await?;
        let feed = self.follow(task).await?;
        Ok((info, feed.past))
    }
    /// `/tasks`: the user's tasks and the tasks others ran on the user's agents, newest first, one page of
    /// those `query` matches, with their threads. The default pages through [`Backend::tasks`] and knows no
    /// threads.
    async fn history(&self, user: &str, query: &HistoryQuery) -> Result<HistoryPage> {
        let (page, more) = query.page(self.tasks(user).await?);
        Ok(HistoryPage {
            entries: page
                .into_iter()
                .map(|task| HistoryEntry { task, thread: None })
                .collect(),
            more,
        })
    }
    /// Remembers the thread a task's output goes to, for as long as the task is kept (`/tasks` links it).
    /// The thread `set_task_thread` recorded for `task`, if any.
    async fn task_thread(&self, task: &str) -> Result<Option<u64>>;
    async fn set_task_thread(&self, _task: &str, _thread: u64) -> Result<()> {
        Ok(())
    }
    /// `/cancel`, the Stop button.
    async fn cancel(&self, user: &str, task: &str) -> Result<()>;
    /// Merges, keeps or discards a finished task's worktree branch (the requester or the agent's owner only);
    /// a refusal or a conflict is `ok: false` with the reason and the conflicting files.
    async fn worktree(
        &self,
        _user: &str,
        _task: &str,
        _action: ct_protocol::task::WorktreeAction,
    ) -> Result<ct_protocol::task::WorktreeOutcome> {
        Err(BackendError::Refused(
            "this relay cannot merge, keep or discard task branches".into(),
        ))
    }
    /// Approval buttons, menus, modals and `/approve`.
    async fn decide(
        &self,
        user: &str,
        task: &str,
        approval: &str,
        decision: Decision,
    ) -> Result<()>;
    /// Who may answer the task's approvals right now (the owner, or a trusted grantee): Discord user id.
    async fn approver(&self, task: &str) -> Result<String>;

    /// `/share add`.
    async fn share(
        &self,
        owner: &str,
        grantee: &str,
        projects: Vec<String>,
        level: ShareLevel,
    ) -> Result<ShareInfo>;
    /// `/share remove`: takes effect at once.
    async fn unshare(&self, owner: &str, grantee: &str) -> Result<()>;
    /// `/share list` (as owner) and `/share available` (as grantee): every share the user is part of.
    async fn shares(&self, user: &str) -> Result<Vec<ShareInfo>>;

    /// `/audit`.
    async fn audit(&self, user: &str) -> Result<Vec<AuditEntry>>;

    /// Who stopped `task` (a Discord user id, or `operator`), if someone did: the requester is told when someone
    /// else stopped their task, whichever node the Stop was clicked on.
    async fn stopped_by(&self, _task: &TaskInfo) -> Result<Option<String>> {
        Ok(None)
    }
    /// Whether `user` wants to be @mentioned when an approval waits for them or their task ends.
    async fn wants_mentions(&self, _user: &str) -> Result<bool> {
        Ok(true)
    }
    /// `/mentions on|off`: the user's own choice, kept by the relay.
    async fn set_mentions(&self, _user: &str, _on: bool) -> Result<()> {
        Err(BackendError::Refused(
            "this relay cannot keep your mention setting".into(),
        ))
    }

    /// `/register mode`: local (`pool: None`) or cluster mode in `pool` (`Some("")`: the only pool the user may
    /// use). `roles`: the user's role ids in the guild, for pools open to a role.
    async fn set_mode(
        &self,
        _user: &str,
        _pool: Option<&str>,
        _roles: &[String],
    ) -> Result<ModeInfo> {
        Err(BackendError::Refused(
            "this relay has no worker pools: your tasks run on your own agents".into(),
        ))
    }
    /// `/register status`: the user's mode.
    async fn mode(&self, _user: &str) -> Result<ModeInfo> {
        Ok(ModeInfo::default())
    }
    /// `/project add|list|remove` of a user in cluster mode: their workspace on their worker (assigned at the
    /// first use); the projects there afterwards.
    async fn workspace(
        &self,
        _user: &str,
        _roles: &[String],
        _op: WorkspaceOp,
    ) -> Result<Vec<ProjectInfo>> {
        Err(BackendError::Refused(
            "this relay has no worker pools: add projects on your own agents".into(),
        ))
    }
    /// `/usage`: what the user spent on their pool worker, and what is left of their budget.
    async fn usage(&self, _user: &str, _roles: &[String]) -> Result<UsageReport> {
        Err(BackendError::Refused(
            "this relay has no worker pools, so no budgets: your own agents use your own Claude account".into(),
        ))
    }

    /// `/dashboard`: a one-time sign-in link to the web dashboard for `user`.
    async fn dashboard_link(&self, _user: &str) -> Result<DashboardLink> {
        Err(BackendError::Refused(
            "this relay has no web dashboard".into(),
        ))
    }
    /// `/dashboard signout:all`: ends every dashboard session of `user`; how many there were.
    async fn end_dashboard_sessions(&self, _user: &str) -> Result<usize> {
        Err(BackendError::Refused(
            "this relay has no web dashboard".into(),
        ))
    }

    /// Remembers where a task's output goes and how far it got; called as its follower posts.
    async fn mark_thread(&self, mark: &ThreadMark) -> Result<()>;
    /// Forgets a task's mark: its follower posted the summary.
    async fn forget_thread(&self, task: &str) -> Result<()>;
    /// Every mark still kept, with its task: followers that had not finished when the bot stopped. Marks of
    /// tasks that no longer exist are dropped.
    async fn thread_marks(&self) -> Result<Vec<(ThreadMark, TaskInfo)>>;
    /// One task's mark, if it has one.
    async fn thread_mark(&self, task: &str) -> Result<Option<ThreadMark>>;
    /// Tells whichever node leads that a mark asks it to open a thread, so that it scans now (its
    /// [`Bot::scan_now`](crate::Bot::scan_now)) rather than at its next scan. Best effort: a wake-up lost on
    /// the way only waits for that scan. A backend with no other nodes has nothing to do.
    async fn wake_leader(&self) {}
    /// Keeps `chain` as what its thread is at (see [`ThreadChain`]).
    async fn set_thread_chain(&self, chain: &ThreadChain) -> Result<()>;
    /// What was last kept for `thread`; `None` if nothing (a thread from before chains were kept, or one
    /// whose task is gone).
    async fn thread_chain(&self, thread: u64) -> Result<Option<ThreadChain>>;
    /// Adds one answer to an open AskUserQuestion (`approval` of `task`) and returns every answer given so
    /// far, atomically: people answering its questions through different nodes all count, and exactly the
    /// answer that completes the set sees it complete.
    async fn add_answer(
        &self,
        task: &str,
        approval: &str,
        question: u8,
        answer: &str,
    ) -> Result<BTreeMap<u8, String>>;

    /// Takes or renews the bot's leadership (the Discord gateway and every thread follower) for `holder`, for
    /// `ttl` from now by the backend's clock: granted when nobody holds it, when it expired, or when `holder`
    /// already does. A relay of one is trivially always granted it; a cluster's nodes share one lease in
    /// their shared store (see [`crate::leader`]).
    async fn lease(&self, _holder: &str, _ttl: std::time::Duration) -> Result<bool> {
        Ok(true)
    }
    /// Gives the leadership up if `holder` has it, so another node takes over at once rather than after
    /// the lease expires.
    async fn release_lease(&self, _holder: &str) -> Result<()> {
        Ok(())
    }
}
