//! Worker pools (issue 17): agents the relay's operator runs, each serving many users in workspaces of their
//! own. A pool is named by the operator; its workers are ordinary agents paired with a code minted for the
//! owner `pool:NAME` ([`pool_owner`]), which is never a Discord id, so no person owns a worker.
//!
//! The relay's part:
//! - **access**: who may use a pool (everyone, members of Discord roles, a list of users), checked whenever a
//!   user sets their mode, starts a task, or asks their workspace for something. The front end passes the
//!   member's role ids; where none are known (the admin socket) only the user list or "everyone" admits;
//! - **mode**: a user's tasks go to their own machines (local) or to a pool (cluster), kept in their
//!   [`UserRecord`];
//! - **assignment**: on first use a user gets the online, not draining worker of the pool with the fewest
//!   assigned users (then the fewest open tasks), and stays there, because their workspace lives there. A
//!   user whose worker is drained or gone moves on their next task or project command, and is told that their
//!   files stay behind;
//! - **routing** (in [`super::submit`]): a cluster-mode user's task that names no owner and no agent goes to
//!   their worker with the role [`Role::TrustedGrantee`] (approvals go to the requester), and its project is
//!   the worker's to check in the user's workspace.
//!
//! Every change is in the audit log ([`AuditKind::PoolChanged`]): the operator's under the pool's owner, a
//! user's (mode, assignment) under the user.

use ct_protocol::pairing::PairingToken;
use ct_protocol::project::{ProjectOp, ProjectReply, ProjectsReport, UsageReport};
use ct_protocol::task::Role;
use ct_protocol::{Fingerprint, RelayMessage};
use serde::{Deserialize, Serialize};

use super::audit::{Caller, OwnedCaller};
use super::projects::{Answer, MAX_PROJECT_NAME};
use super::state::State;
use super::tasks::TaskError;
use super::{Core, CoreError};
use crate::store::{
    now, pool_of_owner, pool_owner, AgentRecord, AuditEntry, AuditKind, PoolAccess, PoolRecord,
    ProjectChange, UserRecord, OPERATOR,
};

/// Longest pool name, in bytes.
pub const MAX_POOL_NAME: usize = 32;
/// Most users, or roles, one pool's access may list (each is checked on every pool request).
pub const MAX_ACCESS_IDS: usize = 1000;
/// Longest git URL a project may be cloned from, in bytes.
pub const MAX_GIT_URL: usize = 2048;
/// Most role ids a request may carry (Discord allows 250 roles in a guild).
pub const MAX_ROLES: usize = 250;

/// Where a user's tasks go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum Mode {
    /// Their own machines (and those shared with them).
    Local,
    /// A worker pool: the one named, or the only one open to them when none is.
    Cluster {
        #[serde(default)]
        pool: Option<String>,
    },
}

/// A user's mode as `/register status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModeView {
    /// Whether the user is in cluster mode.
    pub cluster: bool,
    /// Their pool (cluster mode only).
    pub pool: Option<String>,
    /// The worker they are assigned to, if any yet (kept in local mode too: their files are there).
    pub worker: Option<String>,
    pub worker_fingerprint: Option<Fingerprint>,
    /// Whether that worker is connected now.
    pub online: bool,
    /// Whether the operator is draining it (they move on their next task).
    pub draining: bool,
    /// What else they should know, in words (their files left on a worker they were moved off, a worker
    /// that will be chosen at their first task).
    pub note: Option<String>,
}

impl ModeView {
    /// One or two sentences for the person.
    pub fn describe(&self) -> String {
        let mut out = match (&self.pool, &self.worker) {
            (Some(pool), Some(worker)) => format!(
                "cluster mode: your tasks run in pool {pool}, on worker {worker} ({}{})",
                if self.online { "online" } else { "offline" },
                if self.draining { ", being drained" } else { "" }
            ),
            (Some(pool), None) => format!(
                "cluster mode: your tasks run in pool {pool}; a worker is chosen at your first task or project"
            ),
            (None, _) => "local mode: your tasks run on your own machines".to_string(),
        };
        if let Some(note) = &self.note {
            out.push_str(". ");
            out.push_str(note);
        }
        out
    }
}

/// One worker of a pool, for the operator's list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerView {
    pub name: String,
    pub fingerprint: Fingerprint,
    pub online: bool,
    pub draining: bool,
    pub revoked: bool,
    /// The users assigned to it (their workspaces are there).
    pub users: Vec<String>,
    /// Its tasks queued or running.
    pub open_tasks: usize,
}

/// One user of a pool, for the operator's list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolUserView {
    pub user: String,
    /// Whether the user's tasks go to this pool now (else they only have a workspace here).
    pub cluster: bool,
    /// Their worker's name, once assigned.
    pub worker: Option<String>,
}

/// A pool as the operator sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolView {
    pub name: String,
    pub access: PoolAccess,
    pub created_at: u64,
    pub workers: Vec<WorkerView>,
    pub users: Vec<PoolUserView>,
}

/// What a pool user asks of their workspace (the pool form of `/project` and `/usage`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum PoolOp {
    /// A new project, empty or cloned from `git`.
    Create {
        name: String,
        #[serde(default)]
        git: Option<String>,
    },
    List,
    /// Removes a project and its files.
    Remove {
        name: String,
    },
    /// What the user spent, and their budget.
    Usage,
}

/// The worker's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum PoolReply {
    Projects(ProjectsReport),
    Usage(UsageReport),
}

/// A worker's answer to a pool user, with the worker's name and what the user should know.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolAnswer {
    pub worker: String,
    pub reply: PoolReply,
    /// Set when the user was just moved to this worker (their files stay on the old one).
    pub note: Option<String>,
}

/// Refuses a pool name that is not a short word: it is part of workers' owners, commands and file names.
pub fn check_pool_name(name: &str) -> Result<(), TaskError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_POOL_NAME
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    match ok {
        true => Ok(()),
        false => Err(TaskError::Pool(format!(
            "{:?} is not a pool name: use 1 to {MAX_POOL_NAME} letters, digits, `-` or `_`, starting with a \
             letter or digit (for example `gpu` or `team-a`)",
            name.chars().take(64).collect::<String>()
        ))),
    }
}

/// Refuses a project name a workspace must not have (the worker checks again, on its own disk).
pub fn check_workspace_project(name: &str) -> Result<(), TaskError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_PROJECT_NAME
        && !name.starts_with('.')
        && !name.contains("..")
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    match ok {
        true => Ok(()),
        false => Err(TaskError::BadProjectRequest(format!(
            "{:?} cannot be a project name: use 1 to {MAX_PROJECT_NAME} letters, digits, `.`, `_` or `-`, \
             not starting with `.` and without `..` (a project is a folder in your workspace)",
            name.chars().take(80).collect::<String>()
        ))),
    }
}

/// Refuses a git URL a worker must not clone: only `https://`, `ssh://` and `git@host:path` (no local
/// files, no `ext::` helpers, nothing git could read as an option).
pub fn check_git_url(url: &str) -> Result<(), TaskError> {
    let scp_like = url.strip_prefix("git@").is_some_and(|rest| {
        rest.split_once(':')
            .is_some_and(|(host, path)| !host.is_empty() && !path.is_empty() && !host.contains('/'))
    });
    let ok = url.len() <= MAX_GIT_URL
        && !url.starts_with('-')
        && !url.contains("::")
        && !url.chars().any(|c| c.is_whitespace() || c.is_control())
        && (url.starts_with("https://") || url.starts_with("ssh://") || scp_like);
    match ok {
        true => Ok(()),
        false => Err(TaskError::BadProjectRequest(
            "the git URL must start with https:// or ssh://, or be git@host:path, without spaces (at most \
             2048 bytes): local paths and other transports are not cloned on a pool worker"
                .into(),
        )),
    }
}

/// Refuses an access list with an id that is not a Discord id, or too many of them; sorted, without repeats.
fn checked_access(access: PoolAccess) -> Result<PoolAccess, TaskError> {
    let check = |ids: Vec<String>, what: &str| {
        if ids.len() > MAX_ACCESS_IDS {
            return Err(TaskError::Pool(format!(
                "at most {MAX_ACCESS_IDS} {what}s may be listed: use a role for large groups"
            )));
        }
        let mut ids: Vec<String> = ids.into_iter().map(|i| i.trim().to_string()).collect();
        if let Some(bad) = ids.iter().find(|i| !super::is_user_id(i)) {
            return Err(TaskError::Pool(format!(
                "{bad:?} is not a Discord {what} id (a number like 123456789012345678)"
            )));
        }
        ids.sort();
        ids.dedup();
        Ok(ids)
    };
    Ok(match access {
        PoolAccess::Everyone => PoolAccess::Everyone,
        PoolAccess::Roles { roles } => PoolAccess::Roles {
            roles: check(roles, "role")?,
        },
        PoolAccess::Users { users } => PoolAccess::Users {
            users: check(users, "user")?,
        },
    })
}

/// Whether `user` (with `roles`, when known) may use `pool`, or the refusal saying whom to ask.
pub fn check_access(
    pool: &PoolRecord,
    user: &str,
    roles: Option<&[String]>,
) -> Result<(), TaskError> {
    let name = &pool.name;
    match &pool.access {
        PoolAccess::Everyone => Ok(()),
        PoolAccess::Users { users } if users.iter().any(|u| u == user) => Ok(()),
        PoolAccess::Users { .. } => Err(TaskError::Pool(format!(
            "you may not use pool {name}: it is open to a list of people you are not on. Ask the relay's \
             operator to add you (`ct-relay admin pool-access --pool {name} --user ...`), or use \
             /register mode local to run on your own machine"
        ))),
        PoolAccess::Roles { roles: allowed } => match roles {
            Some(mine) if mine.iter().any(|r| allowed.contains(r)) => Ok(()),
            Some(_) => Err(TaskError::Pool(format!(
                "you may not use pool {name}: it is open to members of certain Discord roles, and you have \
                 none of them. Ask a server admin for the role, or the relay's operator for access; or use \
                 /register mode local to run on your own machine"
            ))),
            None => Err(TaskError::Pool(format!(
                "pool {name} is open to members of certain Discord roles, which this request cannot show \
                 (it did not come through Discord): use the pool from Discord, or ask the relay's operator \
                 to list you by id (`ct-relay admin pool-access --pool {name} --user ...`)"
            ))),
        },
    }
}

/// Roles as a request carries them: at most [`MAX_ROLES`] (Discord's own limit), since they are compared for
/// every pool request.
pub(crate) fn bounded_roles(roles: &[String]) -> &[String] {
    &roles[..roles.len().min(MAX_ROLES)]
}

fn pool_entry(pool: &str, actor: &str, owner: &str, detail: String) -> AuditEntry {
    AuditEntry::new(
        AuditKind::PoolChanged {
            pool: pool.to_string(),
        },
        actor,
        owner,
        detail,
    )
}

impl Core {
    /// Creates pool `name` (nobody may use it until [`set_pool_access`](Self::set_pool_access) says who); an
    /// existing pool is returned as it is.
    pub async fn create_pool(&self, name: &str) -> Result<PoolRecord, TaskError> {
        let name = name.to_string();
        self.run(move |state| state.ensure_pool(&name)).await
    }

    /// Sets who may use pool `name` (created if new). Users already assigned who are no longer allowed are
    /// refused at their next task or command.
    pub async fn set_pool_access(
        &self,
        name: &str,
        access: PoolAccess,
    ) -> Result<PoolRecord, TaskError> {
        let name = name.to_string();
        self.run(move |state| state.set_pool_access(&name, access))
            .await
    }

    /// Every pool with its workers (online, draining, users, open tasks) and users.
    pub async fn pools(&self) -> Result<Vec<PoolView>, TaskError> {
        self.run(|state| state.pool_views()).await
    }

    /// A one-time pairing token for a new worker of `pool` (created if new), and when it expires. The agent
    /// that redeems it is owned by `pool:NAME`.
    pub async fn pool_pairing_token(&self, pool: &str) -> Result<(PairingToken, u64), TaskError> {
        let pool = pool.to_string();
        self.run(move |state| {
            state.ensure_pool(&pool)?;
            let owner = pool_owner(&pool);
            state
                .check_agent_count(&owner)
                .and_then(|()| state.mint_code(&owner))
                .map_err(|e| match e {
                    CoreError::Store(e) => TaskError::Store(e),
                    CoreError::Stopped(e) => TaskError::Stopped(e),
                    CoreError::TooManyAgents { have, max } => TaskError::Pool(format!(
                        "pool {pool} has {have} workers, the most one pool may have ({max}): revoke one \
                         (`ct-relay admin revoke`) or make another pool"
                    )),
                    other => TaskError::Pool(other.to_string()),
                })
        })
        .await
    }

    /// Marks a worker (name, `pool:NAME/name`, or fingerprint) draining (`on`) or not: a draining worker
    /// gets no new users, and its users move to another worker on their next task or project command.
    pub async fn drain_worker(&self, worker: &str, on: bool) -> Result<WorkerView, TaskError> {
        let worker = worker.to_string();
        self.run(move |state| state.drain_worker(&worker, on)).await
    }

    /// Sets where `who`'s tasks go. For a pool, access is checked with `roles` (the member's Discord role
    /// ids; `None` when not known); with no pool named, the only pool open to them is taken. The worker is
    /// chosen at their first task or project command.
    pub async fn set_mode<'a>(
        &self,
        who: impl Into<Caller<'a>>,
        mode: Mode,
        roles: Option<&[String]>,
    ) -> Result<ModeView, TaskError> {
        let caller = OwnedCaller::from(who.into());
        let roles = roles.map(|r| bounded_roles(r).to_vec());
        self.run(move |state| state.set_mode(caller.as_caller(), mode, roles.as_deref()))
            .await
    }

    /// `user`'s mode, pool and worker.
    pub async fn mode(&self, user: &str) -> Result<ModeView, TaskError> {
        let user = user.to_string();
        self.run(move |state| {
            let rec = state.store().user(&user)?;
            state.mode_view(&rec, None)
        })
        .await
    }

    /// Sends a pool user's project or usage request to their worker (assigning one first if needed, or
    /// moving them off a drained or removed one) and returns the worker's answer.
    pub async fn pool_project<'a>(
        &self,
        who: impl Into<Caller<'a>>,
        roles: Option<&[String]>,
        op: PoolOp,
    ) -> Result<PoolAnswer, TaskError> {
        let caller = OwnedCaller::from(who.into());
        let user = caller.as_caller().user.to_string();
        match &op {
            PoolOp::Create { name, git } => {
                check_workspace_project(name)?;
                if let Some(git) = git {
                    check_git_url(git)?;
                }
            }
            PoolOp::Remove { name } => check_workspace_project(name)?,
            PoolOp::List | PoolOp::Usage => {}
        }
        let roles = roles.map(|r| bounded_roles(r).to_vec());
        let assigning = caller.clone();
        let (worker, note) = self
            .run(move |state| state.assign_worker(assigning.as_caller(), roles.as_deref()))
            .await?;
        let change = match &op {
            PoolOp::Create { name, git } => Some((ProjectChange::Added, name.clone(), git.clone())),
            PoolOp::Remove { name } => Some((ProjectChange::Removed, name.clone(), None)),
            _ => None,
        };
        let wire = match op {
            PoolOp::Create { name, git } => ProjectOp::Create {
                user: user.clone(),
                name,
                git,
            },
            PoolOp::List => ProjectOp::ListFor { user: user.clone() },
            PoolOp::Remove { name } => ProjectOp::RemoveFor {
                user: user.clone(),
                name,
            },
            PoolOp::Usage => ProjectOp::Usage { user: user.clone() },
        };
        let answer = self
            .ask_agent(&worker, move |id| RelayMessage::Project { id, op: wire })
            .await?;
        let reply = match answer {
            Answer::Project(ProjectReply::Ok(report)) => PoolReply::Projects(report),
            Answer::Project(ProjectReply::Usage(usage)) => PoolReply::Usage(usage),
            Answer::Project(ProjectReply::Refused { message }) => {
                return Err(TaskError::ProjectRefused {
                    agent: worker.name,
                    message: message.chars().take(2000).collect(),
                })
            }
            Answer::Worktree(_) => return Err(TaskError::AgentGone(worker.name)),
        };
        if let Some((change, name, git)) = change {
            let detail = match &change {
                ProjectChange::Added => format!(
                    "user {user} created project {name}{} in their workspace on pool worker {}",
                    git.as_deref()
                        .map(|g| format!(" (cloned from {g})"))
                        .unwrap_or_default(),
                    worker.name
                ),
                ProjectChange::Removed => format!(
                    "user {user} removed project {name} from their workspace on pool worker {}",
                    worker.name
                ),
            };
            let entry = AuditEntry::new(
                AuditKind::ProjectChanged {
                    change,
                    name,
                    path: git,
                },
                caller.as_caller().actor(),
                &user,
                detail,
            )
            .by(caller.as_caller())
            .on(&worker);
            let _ = self.call(move |state| state.audit_or_log(entry)).await;
        }
        Ok(PoolAnswer {
            worker: worker.name,
            reply,
            note,
        })
    }
}

impl State {
    /// Pool `name`, created (with nobody allowed yet) if it is new.
    fn ensure_pool(&mut self, name: &str) -> Result<PoolRecord, TaskError> {
        check_pool_name(name)?;
        if let Some(rec) = self.store().pool(name)? {
            return Ok(rec);
        }
        let rec = PoolRecord {
            name: name.to_string(),
            access: PoolAccess::Users { users: Vec::new() },
            created_at: now(),
            drained: Vec::new(),
        };
        let entry = pool_entry(
            name,
            OPERATOR,
            &pool_owner(name),
            format!("pool {name} created (nobody may use it yet)"),
        );
        self.store().put_pool_audited(&rec, &entry)?;
        self.must_be_durable();
        tracing::info!(pool = name, "worker pool created");
        Ok(rec)
    }

    fn set_pool_access(&mut self, name: &str, access: PoolAccess) -> Result<PoolRecord, TaskError> {
        let access = checked_access(access)?;
        let mut rec = self.ensure_pool(name)?;
        let was = std::mem::replace(&mut rec.access, access);
        let entry = pool_entry(
            name,
            OPERATOR,
            &pool_owner(name),
            format!(
                "pool {name} is open to {} (was {})",
                rec.access.describe(),
                was.describe()
            ),
        );
        self.store().put_pool_audited(&rec, &entry)?;
        self.must_be_durable();
        Ok(rec)
    }

    fn drain_worker(&mut self, query: &str, on: bool) -> Result<WorkerView, TaskError> {
        let agent = self.find_agent(query).map_err(|e| match e {
            CoreError::Store(e) => TaskError::Store(e),
            other => TaskError::Pool(other.to_string()),
        })?;
        let Some(pool) = pool_of_owner(&agent.owner).map(str::to_string) else {
            return Err(TaskError::Pool(format!(
                "agent {} belongs to user {}, not to a pool: only pool workers are drained",
                agent.name, agent.owner
            )));
        };
        let mut rec = self.ensure_pool(&pool)?;
        let was = rec.drained.contains(&agent.fingerprint);
        if was != on {
            rec.drained.retain(|fp| *fp != agent.fingerprint);
            if on {
                rec.drained.push(agent.fingerprint);
            }
            let detail = match on {
                true => format!(
                    "worker {} of pool {pool} is being drained: no new users, and its users move on their \
                     next task",
                    agent.name
                ),
                false => format!(
                    "worker {} of pool {pool} takes users again",
                    agent.name
                ),
            };
            let entry = pool_entry(&pool, OPERATOR, &pool_owner(&pool), detail).on(&agent);
            self.store().put_pool_audited(&rec, &entry)?;
            self.must_be_durable();
        }
        let users = self.store().pool_users()?;
        self.worker_view(&agent, &rec, &users)
    }

    fn is_online(&self, fp: &Fingerprint) -> bool {
        self.live.contains_key(fp) || self.held_elsewhere(fp).is_some()
    }

    fn worker_view(
        &self,
        agent: &AgentRecord,
        pool: &PoolRecord,
        users: &[(String, UserRecord)],
    ) -> Result<WorkerView, TaskError> {
        Ok(WorkerView {
            name: agent.name.clone(),
            fingerprint: agent.fingerprint,
            online: self.is_online(&agent.fingerprint),
            draining: pool.drained.contains(&agent.fingerprint),
            revoked: agent.revoked_at.is_some(),
            users: users
                .iter()
                .filter(|(_, u)| u.worker == Some(agent.fingerprint))
                .map(|(id, _)| id.clone())
                .collect(),
            open_tasks: self.store().open_tasks(&agent.fingerprint)?.len(),
        })
    }

    fn pool_views(&self) -> Result<Vec<PoolView>, TaskError> {
        let users = self.store().pool_users()?;
        let mut out = Vec::new();
        for pool in self.store().pools()? {
            let agents = self.store().agents_of(&pool_owner(&pool.name))?;
            let workers = agents
                .iter()
                .map(|a| self.worker_view(a, &pool, &users))
                .collect::<Result<Vec<_>, _>>()?;
            let pool_users = users
                .iter()
                .filter_map(|(id, u)| {
                    let worker = u
                        .worker
                        .and_then(|fp| agents.iter().find(|a| a.fingerprint == fp));
                    let cluster = u.pool.as_deref() == Some(pool.name.as_str());
                    (cluster || worker.is_some()).then(|| PoolUserView {
                        user: id.clone(),
                        cluster,
                        worker: worker.map(|a| a.name.clone()),
                    })
                })
                .collect();
            out.push(PoolView {
                name: pool.name,
                access: pool.access,
                created_at: pool.created_at,
                workers,
                users: pool_users,
            });
        }
        Ok(out)
    }

    fn set_mode(
        &mut self,
        caller: Caller<'_>,
        mode: Mode,
        roles: Option<&[String]>,
    ) -> Result<ModeView, TaskError> {
        let user = caller.user;
        if !super::is_user_id(user) {
            return Err(TaskError::BadUser(user.to_string()));
        }
        let mut rec = self.store().user(user)?;
        let pool = match mode {
            Mode::Local => None,
            Mode::Cluster { pool: Some(name) } => {
                check_pool_name(&name)?;
                let Some(pool) = self.store().pool(&name)? else {
                    let open = self.open_pools(user, roles)?;
                    return Err(TaskError::Pool(format!(
                        "there is no pool called {name}: {}",
                        match open.as_slice() {
                            [] => "no pool is open to you; ask the relay's operator".to_string(),
                            names => format!("the pools open to you are {}", names.join(", ")),
                        }
                    )));
                };
                check_access(&pool, user, roles)?;
                Some(name)
            }
            Mode::Cluster { pool: None } => match self.open_pools(user, roles)?.as_slice() {
                [] => {
                    return Err(TaskError::Pool(
                        "no worker pool is open to you: ask the relay's operator for access, or keep running \
                         on your own machine (/register)"
                            .into(),
                    ))
                }
                [one] => Some(one.clone()),
                several => {
                    return Err(TaskError::Pool(format!(
                        "several pools are open to you ({}): name one, as in /register mode cluster {}",
                        several.join(", "),
                        several[0]
                    )))
                }
            },
        };
        if rec.pool != pool {
            let detail = match &pool {
                Some(p) => format!("user {user} switched to cluster mode, pool {p}"),
                None => format!("user {user} switched to local mode"),
            };
            let audited_pool = pool
                .clone()
                .or_else(|| rec.pool.clone())
                .unwrap_or_default();
            rec.pool = pool;
            let entry = pool_entry(&audited_pool, caller.actor(), user, detail).by(caller);
            self.store().put_user_audited(user, &rec, &entry)?;
            self.must_be_durable();
        }
        self.mode_view(&rec, None)
    }

    /// The pools `user` may use (with `roles`), by name.
    fn open_pools(&self, user: &str, roles: Option<&[String]>) -> Result<Vec<String>, TaskError> {
        Ok(self
            .store()
            .pools()?
            .into_iter()
            .filter(|p| check_access(p, user, roles).is_ok())
            .map(|p| p.name)
            .collect())
    }

    fn mode_view(&self, rec: &UserRecord, note: Option<String>) -> Result<ModeView, TaskError> {
        let worker = match rec.worker {
            Some(fp) => self.store().agent(&fp)?,
            None => None,
        };
        let draining = match worker.as_ref().and_then(|w| pool_of_owner(&w.owner)) {
            Some(pool) => self.store().pool(pool)?.is_some_and(|p| {
                worker
                    .as_ref()
                    .is_some_and(|w| p.drained.contains(&w.fingerprint))
            }),
            None => false,
        };
        let note = note.or_else(|| {
            rec.left_behind.as_ref().map(|old| {
                format!("your files from before stay on worker {old}, which you were moved off")
            })
        });
        Ok(ModeView {
            cluster: rec.pool.is_some(),
            pool: rec.pool.clone(),
            online: worker
                .as_ref()
                .is_some_and(|w| self.is_online(&w.fingerprint)),
            draining,
            worker_fingerprint: worker.as_ref().map(|w| w.fingerprint),
            worker: worker.map(|w| w.name),
            note,
        })
    }

    /// The worker `caller`'s pool work goes to: their assigned one while it is in their pool, not drained and
    /// not revoked (online or not: their workspace is there), else the least loaded online worker, which is
    /// stored as their assignment. With the worker, words for the user when they were moved.
    pub(crate) fn assign_worker(
        &mut self,
        caller: Caller<'_>,
        roles: Option<&[String]>,
    ) -> Result<(AgentRecord, Option<String>), TaskError> {
        let user = caller.user;
        let mut rec = self.store().user(user)?;
        let Some(name) = rec.pool.clone() else {
            return Err(TaskError::Pool(
                "you are in local mode: your tasks run on your own machines. Use /register mode cluster to \
                 use a worker pool"
                    .into(),
            ));
        };
        let Some(pool) = self.store().pool(&name)? else {
            return Err(TaskError::Pool(format!(
                "pool {name} no longer exists: choose another with /register mode cluster, or go back to \
                 your own machine with /register mode local"
            )));
        };
        check_access(&pool, user, roles)?;
        let workers = self.agents_of(&pool_owner(&name))?;
        let current = rec.worker.map(|fp| {
            let found = workers.iter().find(|w| w.fingerprint == fp);
            (fp, found.cloned())
        });
        let why_moved = match &current {
            Some((fp, Some(w))) if !pool.drained.contains(fp) => return Ok((w.clone(), None)),
            Some((_, Some(w))) => {
                Some((w.name.clone(), "is being drained by the relay's operator"))
            }
            Some((fp, None)) => Some(self.left_worker(fp, &name)?),
            None => None,
        };
        let users = self.store().pool_users()?;
        let mut best: Option<((usize, usize, String), &AgentRecord)> = None;
        for w in &workers {
            if pool.drained.contains(&w.fingerprint) || !self.is_online(&w.fingerprint) {
                continue;
            }
            let assigned = users
                .iter()
                .filter(|(id, u)| id != user && u.worker == Some(w.fingerprint))
                .count();
            let open = self.store().open_tasks(&w.fingerprint)?.len();
            let key = (assigned, open, w.name.clone());
            if best.as_ref().is_none_or(|(k, _)| key < *k) {
                best = Some((key, w));
            }
        }
        let Some((_, chosen)) = best else {
            return Err(TaskError::Pool(format!(
                "no worker of pool {name} can take you now ({}): try again in a few minutes, or ask the relay's \
                 operator",
                if workers.is_empty() {
                    "it has no workers".to_string()
                } else {
                    format!("{} workers, none online and taking users", workers.len())
                }
            )));
        };
        let chosen = chosen.clone();
        let note = why_moved.as_ref().map(|(old, why)| {
            format!(
                "worker {old} {why}, so you were moved to worker {}: your files on {old} stay there (they are \
                 not copied), and your workspace on {} starts empty",
                chosen.name, chosen.name
            )
        });
        let detail = match &why_moved {
            Some((old, why)) => format!(
                "user {user} moved from worker {old} (which {why}) to worker {} of pool {name}; their files \
                 stay on {old}",
                chosen.name
            ),
            None => format!("user {user} assigned to worker {} of pool {name}", chosen.name),
        };
        rec.worker = Some(chosen.fingerprint);
        if let Some((old, _)) = why_moved {
            rec.left_behind = Some(old);
        }
        let entry = pool_entry(&name, caller.actor(), user, detail)
            .by(caller)
            .on(&chosen);
        self.store().put_user_audited(user, &rec, &entry)?;
        self.must_be_durable();
        tracing::info!(user, pool = %name, worker = %chosen.name, "pool user assigned");
        Ok((chosen, note))
    }

    /// The name of a worker a user is assigned to that is no longer one of `pool`'s usable workers, and why.
    fn left_worker(
        &self,
        fp: &Fingerprint,
        pool: &str,
    ) -> Result<(String, &'static str), TaskError> {
        Ok(match self.store().agent(fp)? {
            Some(a) if a.revoked_at.is_some() => {
                (a.name, "was removed from its pool (its key was revoked)")
            }
            Some(a) if pool_of_owner(&a.owner) != Some(pool) => {
                (a.name, "is not in the pool you use now")
            }
            Some(a) => (a.name, "can no longer be used"),
            None => (fp.short(), "no longer exists"),
        })
    }

    /// The role of `user`'s task on a worker of `pool`, or why they may no longer use it: checked when a
    /// queued pool task is dispatched and when a pool task gets a follow-up. The role ids are not known there,
    /// so a pool open to roles admits (they were checked when the task was submitted); a pool gone or a user
    /// taken off its list refuses.
    pub(crate) fn pool_standing(&self, pool: &str, user: &str) -> Result<Role, TaskError> {
        let Some(rec) = self.store().pool(pool)? else {
            return Err(TaskError::Pool(format!(
                "pool {pool} no longer exists: use /register mode local, or another pool"
            )));
        };
        match &rec.access {
            PoolAccess::Roles { .. } => Ok(Role::TrustedGrantee),
            _ => check_access(&rec, user, None).map(|()| Role::TrustedGrantee),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_names_are_short_words() {
        for ok in ["gpu", "team-a", "A_1", "x"] {
            assert!(check_pool_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-x", "_x", "a b", "a/b", "a:b", "é", &"a".repeat(33)] {
            assert!(check_pool_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn workspace_project_names_cannot_escape() {
        for ok in ["web", "my.app", "a-b_c", "v1.2"] {
            assert!(check_workspace_project(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "/etc",
            "a/b",
            "a\\b",
            ".git",
            "a..b",
            "~",
            &"a".repeat(65),
        ] {
            assert!(check_workspace_project(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn git_urls_are_remote_only() {
        for ok in [
            "https://github.com/a/b.git",
            "ssh://git@host/a/b",
            "git@github.com:a/b.git",
        ] {
            assert!(check_git_url(ok).is_ok(), "{ok}");
        }
        for bad in [
            "file:///etc",
            "/srv/repo",
            "-u/bin/sh",
            "ext::sh -c id",
            "http://plain.example/x",
            "git@:x",
            "https://a b",
            "git://host/x",
        ] {
            assert!(check_git_url(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn access_lists_take_only_discord_ids() {
        assert!(checked_access(PoolAccess::Users {
            users: vec!["12".into(), "x".into()]
        })
        .is_err());
        assert_eq!(
            checked_access(PoolAccess::Roles {
                roles: vec!["3".into(), "1".into(), "3".into()]
            })
            .unwrap(),
            PoolAccess::Roles {
                roles: vec!["1".into(), "3".into()]
            }
        );
    }
}
