//! The records the relay keeps: plain data, stored as JSON so an operator can inspect them and a newer relay
//! can read an older one's data.

use ct_protocol::Fingerprint;
use serde::{Deserialize, Serialize};

/// The name of the relay key among a cluster's shared secrets (see `Store::shared_secret`): every node
/// answers for the same key.
pub const RELAY_KEY: &str = "relay_key";

/// The actor recorded for actions taken through the admin socket.
pub const OPERATOR: &str = "operator";
/// The actor recorded when the agent allowed a tool use itself, under a rule an approver made earlier.
pub const AGENT: &str = "agent";

/// A paired agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentRecord {
    /// The raw ed25519 public key.
    #[serde(with = "ct_protocol::b64::array")]
    pub key: [u8; 32],
    pub fingerprint: Fingerprint,
    /// Discord user id of the owner.
    pub owner: String,
    /// Unique among the owner's agents.
    pub name: String,
    pub paired_at: u64,
    /// Unix seconds of the last disconnect (or connect, while online).
    #[serde(default)]
    pub last_seen: Option<u64>,
    #[serde(default)]
    pub last_transport: Option<ct_protocol::Transport>,
    /// The software version the agent last connected with (the dashboard shows it; absent in records written
    /// before it was kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_version: Option<String>,
    /// Set when revoked; the key is refused from then on.
    #[serde(default)]
    pub revoked_at: Option<u64>,
    /// The agent's projects as it last reported them (kept while it is offline, for autocomplete and for
    /// "unknown project" errors). `None` until an agent that reports projects has connected.
    #[serde(default)]
    pub projects: Option<ct_protocol::project::ProjectsReport>,
}

/// A one-time pairing code as stored: the secret is kept to compare in constant time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PairCodeRecord {
    pub id: String,
    pub secret: String,
    pub owner: String,
    pub created_at: u64,
    pub expires_at: u64,
    #[serde(default)]
    pub used_at: Option<u64>,
    /// Wrong secrets tried against this id; the code is burned after a few.
    #[serde(default)]
    pub failures: u32,
    /// Set when a newer code for the same owner pushed this one out (only a few may be valid at once).
    #[serde(default)]
    pub superseded_at: Option<u64>,
    /// Mint order (increasing across restarts), so "the oldest" is well defined within one second.
    #[serde(default)]
    pub order: u64,
}

impl PairCodeRecord {
    /// Whether the code could still pair an agent at `t`.
    pub fn outstanding(&self, t: u64, max_failures: u32) -> bool {
        self.used_at.is_none()
            && self.superseded_at.is_none()
            && self.failures < max_failures
            && t < self.expires_at
    }
}

/// Where a task is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    Queued,
    Running,
    WaitingApproval,
    Done,
    Failed,
    Cancelled,
    /// The agent no longer runs it (it restarted, or the relay lost track): nothing more will arrive.
    Lost,
}

impl TaskState {
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Self::Done | Self::Failed | Self::Cancelled | Self::Lost
        )
    }
}

/// A task as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskRecord {
    pub spec: ct_protocol::task::TaskSpec,
    /// The agent it runs on.
    pub agent: Fingerprint,
    pub state: TaskState,
    pub created_at: u64,
    pub updated_at: u64,
    /// Highest event sequence number stored (events are 1..=last_seq).
    pub last_seq: u64,
    #[serde(default)]
    pub session_id: Option<String>,
    /// Why it failed or was lost, in words for the user.
    #[serde(default)]
    pub message: Option<String>,
    /// When the relay sent it to the agent. `None` while it waits in the agent's queue: such a task is not the
    /// agent's yet, so it is never marked lost and can be cancelled without the agent.
    #[serde(default)]
    pub dispatched_at: Option<u64>,
    /// The earlier task this one continues (a reply after that one ended resumes its Claude Code session).
    #[serde(default)]
    pub follows: Option<String>,
    /// Position in the agent's queue: increasing across restarts, so the queue is first in, first out.
    #[serde(default)]
    pub order: u64,
    /// Bytes of events stored for this task (their JSON), counted against
    /// `CoreConfig::max_task_output` (the relay core's limit).
    #[serde(default)]
    pub output_bytes: u64,
    /// Whether output past the cap was dropped (a marker event in the log says so where it started).
    #[serde(default)]
    pub output_truncated: bool,
    /// The git branch the agent reported this task's worktree on: only such tasks can be merged, kept or
    /// discarded (and only agents that report one understand the request).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worktree: Option<String>,
    /// How many files were attached to the task, kept apart ([`Store::task_files`](super::Store::task_files))
    /// until the agent was sent them: dispatching reads them only for a task that has some.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub files: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl TaskRecord {
    /// Whether the agent was given this task. Running records from before `dispatched_at` existed count as
    /// dispatched; a task the relay ended while it was queued (cancelled, or lost with a revoked agent) does
    /// not.
    pub fn is_dispatched(&self) -> bool {
        self.dispatched_at.is_some()
            || matches!(self.state, TaskState::Running | TaskState::WaitingApproval)
    }
}

/// How far a share trusts the grantee.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShareLevel {
    /// The grantee runs tasks; the owner decides their approvals.
    Standard,
    /// The grantee also decides the approvals of their own tasks.
    Trusted,
}

/// One owner's agents shared with one grantee.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShareRecord {
    /// Discord user id of the agents' owner.
    pub owner: String,
    /// Discord user id of the person allowed to use them.
    pub grantee: String,
    /// The project names the grantee may use; `None` means every project.
    #[serde(default)]
    pub projects: Option<Vec<String>>,
    pub level: ShareLevel,
    pub created_at: u64,
}

impl ShareRecord {
    pub fn allows(&self, project: &str) -> bool {
        self.projects
            .as_ref()
            .is_none_or(|p| p.iter().any(|n| n == project))
    }
}

/// Per-user settings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRecord {
    /// The agent used when the user (or someone they shared with) names none and they have several.
    #[serde(default)]
    pub default_agent: Option<Fingerprint>,
    /// The user asked not to be @mentioned (`/mentions off`). Unset in records written before it existed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub quiet: bool,
    /// The worker pool the user's tasks go to (`/register mode cluster`); `None`: their own machines (local
    /// mode). Unset in records written before pools existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// The pool worker the user is assigned to, where their workspace lives. Kept when they go back to local
    /// mode, so coming back finds their files; replaced only when the worker is drained or gone, or the user
    /// moves to another pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<Fingerprint>,
    /// The name of the worker the user was last moved off (drained or removed): their files from before stay
    /// there, which `/register status` keeps saying.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub left_behind: Option<String>,
}

impl UserRecord {
    /// Whether the record says anything about pools (the stores index these users).
    pub fn in_pools(&self) -> bool {
        self.pool.is_some() || self.worker.is_some()
    }
}

/// The owner recorded for the workers of pool `name`: never a Discord id (those are digits), so no person is
/// ever the owner of a worker.
pub fn pool_owner(name: &str) -> String {
    format!("{POOL_OWNER_PREFIX}{name}")
}

/// The pool an agent's owner names, if the agent is a pool worker.
pub fn pool_of_owner(owner: &str) -> Option<&str> {
    owner.strip_prefix(POOL_OWNER_PREFIX)
}

/// What pool workers' owners start with.
pub const POOL_OWNER_PREFIX: &str = "pool:";

/// Who may use a worker pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PoolAccess {
    /// Everyone who can reach the relay (everyone in the guild, through the bot).
    Everyone,
    /// Members of any of these Discord roles (role ids).
    Roles { roles: Vec<String> },
    /// These Discord users (an empty list: nobody, which is what a new pool starts with).
    Users { users: Vec<String> },
}

impl PoolAccess {
    /// In words, for tables and the audit log.
    pub fn describe(&self) -> String {
        match self {
            Self::Everyone => "everyone".into(),
            Self::Roles { roles } if roles.is_empty() => "nobody (no roles)".into(),
            Self::Roles { roles } => format!("roles {}", roles.join(", ")),
            Self::Users { users } if users.is_empty() => "nobody yet".into(),
            Self::Users { users } => format!("users {}", users.join(", ")),
        }
    }
}

/// A worker pool, named by the operator. Its workers are the agents whose owner is [`pool_owner`]`(name)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolRecord {
    pub name: String,
    pub access: PoolAccess,
    pub created_at: u64,
    /// Workers being drained: no new users, and their users move on their next task or project command. Kept
    /// here, with the operator's other decisions about the pool (one audited write), rather than in the
    /// agent's record, which the agent's own sessions keep rewriting (reports, last seen).
    #[serde(default)]
    pub drained: Vec<Fingerprint>,
}

/// A project change made through the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProjectChange {
    Added,
    Removed,
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AuditKind {
    /// An agent was paired with the owner's account.
    Paired,
    /// An agent's key was revoked.
    Revoked,
    /// The owner began sharing their agents with `grantee`.
    ShareAdded {
        grantee: String,
        /// `None`: all projects.
        projects: Option<Vec<String>>,
        level: ShareLevel,
    },
    /// An existing share's projects or level changed.
    ShareChanged {
        grantee: String,
        projects: Option<Vec<String>>,
        level: ShareLevel,
        was_projects: Option<Vec<String>>,
        was_level: ShareLevel,
    },
    /// The owner stopped sharing with `grantee`.
    ShareRemoved { grantee: String },
    /// A grantee started a task on the owner's agent (or sent a follow-up into one).
    GranteeTask {
        requester: String,
        project: String,
        /// The prompt's first [`PREVIEW_CHARS`] characters, control characters blanked.
        prompt: String,
        /// True for a follow-up sent into a running task rather than a new task.
        #[serde(default)]
        follow_up: bool,
    },
    /// An approval request was decided.
    ApprovalDecided {
        approval: String,
        /// "allow once", "allow for the session", "deny: reason", "answered".
        decision: String,
        /// Whose task it was.
        requester: String,
    },
    /// The agent allowed a tool use without asking, because an "allow for the session" rule covers it.
    AutoAllowed {
        tool: String,
        /// What the use acted on (the command, the path), shortened like a prompt.
        summary: String,
        /// The rule, in words.
        rule: String,
        /// Whose task it was.
        requester: String,
    },
    /// A task was cancelled by a person.
    TaskCancelled { requester: String },
    /// A project was added to or removed from an agent through the relay.
    ProjectChanged {
        change: ProjectChange,
        name: String,
        #[serde(default)]
        path: Option<String>,
    },
    /// The owner's default agent was set.
    DefaultAgentSet,
    /// The user changed a setting of their own (`detail` says which and to what).
    SettingChanged,
    /// A worker pool was created or changed (its access, a worker drained), a user changed mode or pool,
    /// or was assigned to (or moved between) its workers: `detail` says what.
    PoolChanged { pool: String },
    /// A finished task's worktree branch was merged, kept or discarded (or that was refused: `ok` false).
    WorktreeDecided {
        /// "merge", "keep" or "discard".
        action: String,
        branch: String,
        /// Whose task it was.
        requester: String,
        ok: bool,
    },
}

impl AuditKind {
    /// A short label for tables.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Paired => "paired",
            Self::Revoked => "revoked",
            Self::ShareAdded { .. } => "share-added",
            Self::ShareChanged { .. } => "share-changed",
            Self::ShareRemoved { .. } => "share-removed",
            Self::GranteeTask { .. } => "grantee-task",
            Self::ApprovalDecided { .. } => "approval",
            Self::AutoAllowed { .. } => "auto-allowed",
            Self::TaskCancelled { .. } => "cancelled",
            Self::WorktreeDecided { .. } => "worktree",
            Self::ProjectChanged { .. } => "project",
            Self::DefaultAgentSet => "default-agent",
            Self::SettingChanged => "setting",
            Self::PoolChanged { .. } => "pool",
        }
    }
}

/// The agent an entry concerns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditAgent {
    pub fingerprint: Fingerprint,
    pub name: String,
}

impl From<&AgentRecord> for AuditAgent {
    fn from(a: &AgentRecord) -> Self {
        Self {
            fingerprint: a.fingerprint,
            name: a.name.clone(),
        }
    }
}

/// One entry of the audit log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Position in the log: increasing, without gaps except where entries were pruned.
    pub seq: u64,
    /// Unix seconds.
    pub at: u64,
    pub kind: AuditKind,
    /// Discord user id of whoever did it, or [`OPERATOR`].
    pub actor: String,
    /// The user the operator acted as (admin `--as`), when the actor is the operator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acting_as: Option<String>,
    /// Discord user id of the agents' owner this concerns.
    pub owner: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<AuditAgent>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    /// One sentence for people.
    pub detail: String,
}

impl AuditEntry {
    /// A new entry (its `seq` is given when it is written).
    pub fn new(kind: AuditKind, actor: &str, owner: &str, detail: String) -> Self {
        Self {
            seq: 0,
            at: now(),
            kind,
            actor: actor.to_string(),
            acting_as: None,
            owner: owner.to_string(),
            agent: None,
            task: None,
            detail,
        }
    }

    pub fn on(mut self, agent: &AgentRecord) -> Self {
        self.agent = Some(agent.into());
        self
    }

    pub fn task(mut self, task: &str) -> Self {
        self.task = Some(task.to_string());
        self
    }
}

/// Which node holds an agent's live session now, and that session's epoch (see [`Store::claim_presence`]).
///
/// [`Store::claim_presence`]: super::Store::claim_presence
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Presence {
    pub node: String,
    /// Greater than every epoch handed out before for any agent: the newest session wins everywhere.
    pub epoch: u64,
    /// Unix seconds when the session was claimed.
    pub since: u64,
}

/// One relay node of a cluster, as it last reported itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub id: String,
    /// The addresses agents dial to reach this node (what it puts into pairing tokens).
    pub public_addrs: Vec<String>,
    pub version: String,
    pub started_at: u64,
    /// Unix seconds of the node's last heartbeat.
    pub seen_at: u64,
    /// Live agent sessions the node held at its last heartbeat.
    pub agents: usize,
    /// The node is shutting down: its agents are moving to the others.
    #[serde(default)]
    pub draining: bool,
}

/// What a [`WebSessionRecord`] lets its holder do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WebSessionKind {
    /// A one-time sign-in link: spent once ([`Store::take_web_session`]) for a session.
    ///
    /// [`Store::take_web_session`]: super::Store::take_web_session
    Link,
    /// A signed-in browser: its secret is the dashboard's session cookie.
    Session,
}

impl WebSessionKind {
    /// The name stored beside the record where a backend filters on it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Link => "link",
            Self::Session => "session",
        }
    }
}

/// A dashboard sign-in link or session, as stored. The secret itself is never stored, only its hash, so
/// whoever reads the store (a backup, an operator) cannot sign in as anyone.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebSessionRecord {
    /// Hex SHA-256 of the secret (the link's token, the session's cookie): the key it is found by.
    pub hash: String,
    pub kind: WebSessionKind,
    /// A random name for it, unrelated to the secret: what the page shows and ends sessions by. Knowing it
    /// gives nothing away, and only its own user can end a session by it.
    pub id: String,
    /// Discord user id of who it signs in.
    pub user: String,
    pub created_at: u64,
    /// Unix seconds from which it is no longer valid, however recently it was used.
    pub expires_at: u64,
    /// Unix seconds of its last use (its creation until then).
    pub last_seen: u64,
    /// Seconds without use after which it is no longer valid; `None`: only `expires_at` ends it.
    #[serde(default)]
    pub idle_secs: Option<u64>,
    /// The token state-changing requests of this session must carry (empty for a link).
    #[serde(default)]
    pub csrf: String,
    /// A short label of the browser it was signed in from, for people telling their sessions apart.
    #[serde(default)]
    pub client: String,
}

impl WebSessionRecord {
    /// Unix seconds from which it is no longer valid: its absolute expiry, or earlier when unused for too long.
    pub fn ends_at(&self) -> u64 {
        match self.idle_secs {
            Some(idle) => self.expires_at.min(self.last_seen.saturating_add(idle)),
            None => self.expires_at,
        }
    }

    /// Whether it is still valid at `t`.
    pub fn live_at(&self, t: u64) -> bool {
        t < self.ends_at()
    }
}

/// Without the CSRF token: records get logged and printed in test failures.
impl std::fmt::Debug for WebSessionRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebSessionRecord")
            .field("hash", &self.hash)
            .field("kind", &self.kind)
            .field("id", &self.id)
            .field("user", &self.user)
            .field("created_at", &self.created_at)
            .field("expires_at", &self.expires_at)
            .field("last_seen", &self.last_seen)
            .field("idle_secs", &self.idle_secs)
            .field("csrf", &"MASKED")
            .field("client", &self.client)
            .finish()
    }
}

/// Seconds since the Unix epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_records_from_before_files_read_as_none_and_none_writes_as_before() {
        let old = serde_json::json!({
            "spec": {"task": "t_x", "project": "p", "prompt": "p",
                     "requester": {"user": "1", "role": "owner"}},
            "agent": Fingerprint([0; 32]),
            "state": "queued", "created_at": 0, "updated_at": 0, "last_seq": 0,
        });
        let rec: TaskRecord = serde_json::from_value(old).unwrap();
        assert_eq!(rec.files, 0);
        // An older relay reading this store (a rollback) sees exactly the record it always wrote.
        assert!(!serde_json::to_string(&rec).unwrap().contains("files"));
        let with = TaskRecord { files: 2, ..rec };
        let back: TaskRecord =
            serde_json::from_str(&serde_json::to_string(&with).unwrap()).unwrap();
        assert_eq!(back.files, 2);
    }
}
