//! Shares: an owner lets another Discord user run tasks on all of the owner's agents, optionally limited to
//! named projects, at the standard level (the owner decides that user's approvals) or the trusted one (they
//! decide their own). Removing or narrowing a share takes effect at once: the grantee's queued tasks that it
//! no longer covers are cancelled, and their running ones are cancelled through the agent.

use ct_protocol::task::Role;
use ct_protocol::{Fingerprint, RelayMessage};
use serde::{Deserialize, Serialize};

use super::audit::{self, Caller, OwnedCaller};
use super::state::State;
use super::tasks::TaskError;
use super::Core;
use crate::store::{now, AuditEntry, AuditKind, ShareLevel, ShareRecord, TaskState};

/// Most projects one share may name.
pub const MAX_SHARE_PROJECTS: usize = 50;
/// Longest project name a share may hold, in bytes.
pub const MAX_SHARE_PROJECT_LEN: usize = 100;

/// The role a share gives its grantee.
pub(crate) fn role_of(level: ShareLevel) -> Role {
    match level {
        ShareLevel::Standard => Role::Grantee,
        ShareLevel::Trusted => Role::TrustedGrantee,
    }
}

fn check_user(id: &str) -> Result<(), TaskError> {
    if !super::is_user_id(id) {
        return Err(TaskError::BadUser(id.to_string()));
    }
    Ok(())
}

/// What [`Core::share_remove`] (and narrowing a share) did to the grantee's tasks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShareEnforced {
    /// Queued tasks that were cancelled (they never reached an agent).
    pub cancelled: Vec<String>,
    /// Running tasks the agents were asked to cancel.
    pub stopping: Vec<String>,
}

/// What [`Core::share_remove`] returns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShareRemoved {
    pub share: ShareRecord,
    #[serde(flatten)]
    pub tasks: ShareEnforced,
}

/// One owner who shares with the person asking, as [`Core::shares_available`] lists them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Available {
    pub owner: String,
    pub level: ShareLevel,
    /// The projects the share is limited to; `None` for all.
    pub projects: Option<Vec<String>>,
    pub agents: Vec<AvailableAgent>,
}

/// One of the owner's agents, as a grantee sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AvailableAgent {
    pub name: String,
    pub fingerprint: Fingerprint,
    pub online: bool,
    /// Online since, or last seen, in Unix seconds.
    pub since: Option<u64>,
    /// The projects the grantee may use there, as far as the agent has reported them (a limited share
    /// lists its projects even before that).
    pub projects: Vec<String>,
    /// Whether the agent accepts shared tasks at all; `None` until it has reported.
    pub accepts_shared: Option<bool>,
}

impl Core {
    /// Shares all of `owner`'s agents with `grantee`, limited to `projects` when given. Adding a share that
    /// exists replaces its projects and level; a narrower share cancels the tasks it no longer covers.
    ///
    /// The share and its audit entry (added, or changed from what it was) are written in one transaction: if
    /// the entry cannot be written, the share does not change and the error says so.
    pub async fn share_add<'a>(
        &self,
        owner: impl Into<Caller<'a>>,
        grantee: &str,
        projects: Option<Vec<String>>,
        level: ShareLevel,
    ) -> Result<ShareRecord, TaskError> {
        let (caller, grantee) = (OwnedCaller::from(owner.into()), grantee.to_string());
        self.run(move |state| state.share_add(caller.as_caller(), &grantee, projects, level))
            .await
    }

    /// Stops sharing `owner`'s agents with `grantee`, at once: their queued tasks there are cancelled and
    /// their running ones are cancelled through the agents. Audited like [`share_add`](Self::share_add): no
    /// entry, no removal.
    pub async fn share_remove<'a>(
        &self,
        owner: impl Into<Caller<'a>>,
        grantee: &str,
    ) -> Result<ShareRemoved, TaskError> {
        let (caller, grantee) = (OwnedCaller::from(owner.into()), grantee.to_string());
        self.run(move |state| state.share_remove(caller.as_caller(), &grantee))
            .await
    }

    /// Everyone `owner` shares with.
    pub async fn shares_of(&self, owner: &str) -> Result<Vec<ShareRecord>, TaskError> {
        let owner = owner.to_string();
        self.run(move |state| state.shares_of(&owner)).await
    }

    /// Who shares with `grantee`: each owner with their agents (online or when last seen) and the projects
    /// the grantee may use there.
    pub async fn shares_available(&self, grantee: &str) -> Result<Vec<Available>, TaskError> {
        let grantee = grantee.to_string();
        self.run(move |state| state.shares_available(&grantee))
            .await
    }
}

impl State {
    fn share_add(
        &mut self,
        caller: Caller<'_>,
        grantee: &str,
        projects: Option<Vec<String>>,
        level: ShareLevel,
    ) -> Result<ShareRecord, TaskError> {
        let owner = caller.user;
        check_user(owner)?;
        check_user(grantee)?;
        if owner == grantee {
            return Err(TaskError::ShareWithSelf);
        }
        let projects = match projects {
            None => None,
            Some(list) => {
                let mut clean: Vec<String> = Vec::new();
                for p in list {
                    let p = p.trim().to_string();
                    if p.is_empty() {
                        continue;
                    }
                    if p.len() > MAX_SHARE_PROJECT_LEN {
                        return Err(TaskError::BadShare(format!(
                            "project name {:?}… is longer than {MAX_SHARE_PROJECT_LEN} bytes: share projects by \
                             their names",
                            p.chars().take(20).collect::<String>()
                        )));
                    }
                    if !clean.contains(&p) {
                        clean.push(p);
                    }
                }
                if clean.is_empty() {
                    // Reading "no projects" as "all projects" would widen a share by mistake.
                    return Err(TaskError::BadShare(
                        "name at least one project to share, or leave the projects out to share them all"
                            .into(),
                    ));
                }
                if clean.len() > MAX_SHARE_PROJECTS {
                    return Err(TaskError::BadShare(format!(
                        "a share can name at most {MAX_SHARE_PROJECTS} projects: share all projects instead, \
                         or fewer"
                    )));
                }
                Some(clean)
            }
        };
        let created_at = self
            .store()
            .share(owner, grantee)?
            .map_or_else(now, |s| s.created_at);
        let rec = ShareRecord {
            owner: owner.to_string(),
            grantee: grantee.to_string(),
            projects,
            level,
            created_at,
        };
        self.store()
            .put_share_audited(&rec, &|before| audit::share_entry(caller, &rec, before))?;
        self.must_be_durable();
        tracing::info!(%owner, %grantee, projects = ?rec.projects, ?level, "share added");
        self.enforce_share(owner, grantee)?;
        Ok(rec)
    }

    fn share_remove(
        &mut self,
        caller: Caller<'_>,
        grantee: &str,
    ) -> Result<ShareRemoved, TaskError> {
        let owner = caller.user;
        let removed = self.store().remove_share_audited(owner, grantee, &|old| {
            AuditEntry::new(
                AuditKind::ShareRemoved {
                    grantee: old.grantee.clone(),
                },
                caller.actor(),
                owner,
                format!(
                    "stopped sharing with user {} (who had {})",
                    old.grantee,
                    audit::projects_text(&old.projects)
                ),
            )
            .by(caller)
        })?;
        let Some((share, _)) = removed else {
            return Err(TaskError::NoSuchShare(grantee.to_string()));
        };
        self.must_be_durable();
        tracing::info!(%owner, %grantee, "share removed");
        let tasks = self.enforce_share(owner, grantee)?;
        Ok(ShareRemoved { share, tasks })
    }

    /// Ends the grantee's tasks on the owner's agents that the current share (if any) no longer covers.
    fn enforce_share(&mut self, owner: &str, grantee: &str) -> Result<ShareEnforced, TaskError> {
        let mut done = ShareEnforced {
            cancelled: Vec::new(),
            stopping: Vec::new(),
        };
        // Revoked agents too: a task queued on one must not outlive the share either.
        let agents = self.store().agents_of(owner)?;
        for agent in agents {
            let mut touched = false;
            for mut rec in self.store().open_tasks(&agent.fingerprint)? {
                if rec.spec.requester.user != grantee {
                    continue;
                }
                let Err(why) = self.standing(&rec) else {
                    continue;
                };
                if rec.is_dispatched() {
                    let cancel = RelayMessage::CancelTask {
                        task: rec.spec.task.clone(),
                    };
                    if !self.to_agent(&agent.fingerprint, cancel) {
                        // Offline now: when it reconnects and reports this task running, it is cancelled then.
                        tracing::info!(task = %rec.spec.task, "share ended; the agent is offline and is told on reconnect");
                    }
                    done.stopping.push(rec.spec.task);
                } else {
                    self.finish_here(&mut rec, TaskState::Cancelled, why)?;
                    done.cancelled.push(rec.spec.task);
                    touched = true;
                }
            }
            if touched {
                self.dispatch_queued(&agent.fingerprint)?;
            }
        }
        Ok(done)
    }

    fn shares_of(&self, owner: &str) -> Result<Vec<ShareRecord>, TaskError> {
        let mut shares = self.store().shares_of(owner)?;
        shares.sort_by(|a, b| a.grantee.cmp(&b.grantee));
        Ok(shares)
    }

    fn shares_available(&self, grantee: &str) -> Result<Vec<Available>, TaskError> {
        let mut out = Vec::new();
        for share in self.store().shares_to(grantee)? {
            let agents = self
                .agents_of(&share.owner)?
                .into_iter()
                .map(|a| {
                    let live = self.live.get(&a.fingerprint).map(|l| l.since);
                    let projects = match (&share.projects, &a.projects) {
                        (Some(limited), _) => limited.clone(),
                        (None, Some(report)) => {
                            report.projects.iter().map(|p| p.name.clone()).collect()
                        }
                        (None, None) => Vec::new(),
                    };
                    AvailableAgent {
                        online: live.is_some(),
                        since: live.or(a.last_seen),
                        accepts_shared: a.projects.as_ref().map(|r| r.accepts_shared),
                        projects,
                        name: a.name,
                        fingerprint: a.fingerprint,
                    }
                })
                .collect();
            out.push(Available {
                owner: share.owner,
                level: share.level,
                projects: share.projects,
                agents,
            });
        }
        out.sort_by(|a, b| a.owner.cmp(&b.owner));
        Ok(out)
    }
}
