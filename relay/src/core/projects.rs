//! Projects through the agent: the owner adds, removes and lists the names their agent gives to folders. The
//! agent's own policy decides (the relay cannot widen its allowed folders); the relay asks, waits a bounded
//! time for the answer, and keeps the agent's latest report so names are known while it is offline.

use ct_protocol::project::{ProjectInfo, ProjectOp, ProjectReply, ProjectsReport};
use ct_protocol::{Fingerprint, RelayMessage};
use tokio::sync::oneshot;

use super::audit::{Caller, OwnedCaller};
use super::remote;
use super::state::State;
use super::tasks::{is_path, TaskError};
use super::{human_duration, Core};
use crate::store::{now, AgentRecord, AuditEntry, AuditKind, ProjectChange};

/// Project requests waiting for an answer from one agent; more are refused, so a silent agent cannot make
/// the relay hold an unbounded number of them.
pub const MAX_PENDING_PER_AGENT: usize = 64;
/// Longest project name, in bytes.
pub const MAX_PROJECT_NAME: usize = 64;
/// Longest path sent to or kept from an agent, in bytes.
pub const MAX_PATH_LEN: usize = 4096;
/// Most projects, and most allowed folders, kept from one agent's report.
pub const MAX_REPORTED: usize = 500;
/// Bytes of names and paths kept from one report. The report lives in the agent's record, which is read
/// whenever agents are listed or chosen, so it must stay small whatever the agent sends.
pub const MAX_REPORT_BYTES: usize = 64 * 1024;

/// A request waiting for its answer.
#[derive(Debug)]
pub(crate) struct PendingRequest {
    pub(crate) agent: Fingerprint,
    /// The session the request went to; when it ends, the request can no longer be answered.
    pub(crate) session: u64,
    pub(crate) reply: oneshot::Sender<Answer>,
}

/// An agent's answer to a request the relay is waiting on.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(crate) enum Answer {
    Project(ProjectReply),
    Worktree(ct_protocol::task::WorktreeOutcome),
}

/// Removes a request from the pending map when its caller stops waiting, however that happens (answer,
/// timeout, or the caller's future being dropped).
struct Waiting<'a> {
    core: &'a Core,
    id: u64,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let id = self.id;
        self.core.fire(move |state| {
            state.pending.remove(&id);
        });
    }
}

fn check_op(op: &ProjectOp) -> Result<(), TaskError> {
    let check_name = |name: &str| {
        if name.trim().is_empty() {
            return Err(TaskError::BadProjectRequest(
                "name the project (a short word like `web`)".into(),
            ));
        }
        if name.len() > MAX_PROJECT_NAME {
            return Err(TaskError::BadProjectRequest(format!(
                "project names are at most {MAX_PROJECT_NAME} bytes: pick a shorter one"
            )));
        }
        if is_path(name) {
            // A name that looks like a path would be taken for a path when a task names it.
            return Err(TaskError::BadProjectRequest(
                "a project name cannot contain / or \\ or start with ~: those are read as paths"
                    .into(),
            ));
        }
        Ok(())
    };
    match op {
        ProjectOp::Add { name, path } => {
            check_name(name)?;
            if path.trim().is_empty() {
                return Err(TaskError::BadProjectRequest(
                    "give the folder on the agent's machine (for example ~/src/web)".into(),
                ));
            }
            if path.len() > MAX_PATH_LEN {
                return Err(TaskError::BadProjectRequest(format!(
                    "the path is longer than {MAX_PATH_LEN} bytes"
                )));
            }
            Ok(())
        }
        ProjectOp::Remove { name } => check_name(name),
        ProjectOp::List => Ok(()),
        // Workspaces on pool workers are reached through the pool's own calls, not this one.
        ProjectOp::Create { .. }
        | ProjectOp::ListFor { .. }
        | ProjectOp::RemoveFor { .. }
        | ProjectOp::Usage { .. } => Err(TaskError::BadProjectRequest(
            "that is a pool worker's operation: use it through your pool".into(),
        )),
    }
}

/// Keeps what is worth keeping of an agent's report: bounded in count and length, so a misbehaving agent
/// cannot make its stored record (read on every submit) large.
fn sanitize(mut report: ProjectsReport) -> ProjectsReport {
    let before = (report.projects.len(), report.allowed_dirs.len());
    let mut budget = MAX_REPORT_BYTES;
    let mut fits = |len: usize| {
        let ok = len <= budget;
        budget = budget.saturating_sub(len);
        ok
    };
    report
        .projects
        .retain(|p: &ProjectInfo| p.name.len() <= MAX_PROJECT_NAME && p.path.len() <= MAX_PATH_LEN);
    report.projects.truncate(MAX_REPORTED);
    report
        .projects
        .retain(|p| fits(p.name.len() + p.path.len()));
    report.allowed_dirs.retain(|d| d.len() <= MAX_PATH_LEN);
    report.allowed_dirs.truncate(MAX_REPORTED);
    report.allowed_dirs.retain(|d| fits(d.len()));
    if before != (report.projects.len(), report.allowed_dirs.len()) {
        tracing::warn!("the agent's project report was too large; only part of it is kept");
    }
    report
}

impl Core {
    /// Adds, removes or lists projects on one of the user's own agents (named, the only one, or the default)
    /// and returns the agent's projects as they are after it. Only the owner may: the agent's folders are
    /// theirs. The agent's policy decides; its refusal comes back as [`TaskError::ProjectRefused`].
    ///
    /// Adding and removing are audited once the agent has made the change; a failure to write the entry is
    /// logged as an error (the agent's change cannot be taken back from here).
    pub async fn project<'a>(
        &self,
        who: impl Into<Caller<'a>>,
        agent: Option<&str>,
        op: ProjectOp,
    ) -> Result<ProjectsReport, TaskError> {
        let caller = OwnedCaller::from(who.into());
        check_op(&op)?;
        let agent = {
            let (user, wanted) = (
                caller.as_caller().user.to_string(),
                agent.map(str::to_string),
            );
            self.run(move |state| state.choose_agent(&user, wanted.as_deref(), true))
                .await?
        };
        let change = match &op {
            ProjectOp::Add { name, path } => {
                Some((ProjectChange::Added, name.clone(), Some(path.clone())))
            }
            ProjectOp::Remove { name } => Some((ProjectChange::Removed, name.clone(), None)),
            _ => None,
        };
        match self
            .ask_agent(&agent, move |id| RelayMessage::Project { id, op })
            .await?
        {
            Answer::Project(ProjectReply::Ok(report)) => {
                let report = sanitize(report);
                let kept = report.clone();
                self.run(move |state| {
                    state.store_projects(&agent.fingerprint, kept);
                    if let Some((change, name, path)) = change {
                        let detail = match (&change, &path) {
                            (ProjectChange::Added, Some(path)) => {
                                format!("added project {name} ({path}) on {}", agent.name)
                            }
                            _ => format!("removed project {name} from {}", agent.name),
                        };
                        let caller = caller.as_caller();
                        let entry = AuditEntry::new(
                            AuditKind::ProjectChanged { change, name, path },
                            caller.actor(),
                            &agent.owner,
                            detail,
                        )
                        .by(caller)
                        .on(&agent);
                        state.audit_or_log(entry);
                    }
                    Ok::<_, TaskError>(())
                })
                .await?;
                Ok(report)
            }
            Answer::Project(ProjectReply::Refused { message }) => Err(TaskError::ProjectRefused {
                agent: agent.name,
                message: message.chars().take(2000).collect(),
            }),
            Answer::Worktree(_) | Answer::Project(ProjectReply::Usage(_)) => {
                Err(TaskError::AgentGone(agent.name))
            }
        }
    }

    /// Sends the request `msg(id)` to the agent's live session and waits (bounded by the project timeout)
    /// for its answer to that id. At most [`MAX_PENDING_PER_AGENT`] requests wait on one agent; the request
    /// leaves the pending map however the wait ends.
    pub(crate) async fn ask_agent(
        &self,
        agent: &AgentRecord,
        msg: impl FnOnce(u64) -> RelayMessage + Send + 'static,
    ) -> Result<Answer, TaskError> {
        let (tx, rx) = oneshot::channel();
        let asked = agent.clone();
        // Built once here: if another node holds the agent, the same message goes there (with its own id).
        let template = msg(0);
        let local = template.clone();
        let id = match self
            .run(move |state| state.ask(&asked, |id| remote::with_request_id(local, id), tx))
            .await
        {
            Err(TaskError::HeldElsewhere(_)) => return self.ask_elsewhere(agent, template).await,
            other => other?,
        };
        let _waiting = Waiting { core: self, id };
        let timeout = self.config().project_timeout;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(_)) => Err(TaskError::AgentGone(agent.name.clone())),
            Err(_) => Err(TaskError::NoAnswer {
                agent: agent.name.clone(),
                secs: timeout.as_secs().max(1),
            }),
        }
    }

    /// An agent's answer to a request. Only the agent that was asked can answer it: an id sent by another
    /// agent is ignored (and leaves the request waiting for its real answer).
    pub(crate) async fn answer(&self, agent: Fingerprint, id: u64, reply: Answer) {
        let _ = self
            .call(move |state| state.answer(&agent, id, reply))
            .await;
    }

    /// Requests waiting for an agent's answer, across all agents (for metrics and tests).
    pub async fn pending_project_requests(&self) -> usize {
        self.call(|state| state.pending.len()).await.unwrap_or(0)
    }

    /// An agent's projects report (after each handshake and each change).
    /// Reports past [`CoreConfig::project_reports_per_minute`](super::CoreConfig) are dropped: each one
    /// rewrites the agent's stored record, and an agent sending them in a loop would keep the store busy.
    pub(crate) async fn projects_reported(&self, agent: Fingerprint, report: ProjectsReport) {
        let _ = self
            .call(move |state| state.projects_reported(&agent, report))
            .await;
    }

    /// The agent's projects as it last reported them, kept while it is offline. `None` until it reports.
    pub async fn agent_projects(
        &self,
        agent: &Fingerprint,
    ) -> Result<Option<ProjectsReport>, TaskError> {
        let agent = *agent;
        Ok(self
            .read(move |store| store.agent(&agent))
            .await??
            .and_then(|a| a.projects))
    }

    /// The project names `user` may use on an agent of `target` (or their own when `None`): for
    /// autocomplete. A grantee sees only what their share allows.
    pub async fn usable_projects(
        &self,
        user: &str,
        target: Option<&str>,
        agent: Option<&str>,
    ) -> Result<Vec<String>, TaskError> {
        let (user, target, agent) = (
            user.to_string(),
            target.map(str::to_string),
            agent.map(str::to_string),
        );
        self.run(move |state| state.usable_projects(&user, target.as_deref(), agent.as_deref()))
            .await
    }
}

impl State {
    /// Registers a request to an agent's live session and sends it. Returns its id.
    fn ask(
        &mut self,
        agent: &AgentRecord,
        msg: impl FnOnce(u64) -> RelayMessage,
        reply: oneshot::Sender<Answer>,
    ) -> Result<u64, TaskError> {
        let Some(session) = self.live.get(&agent.fingerprint).map(|l| l.session) else {
            if self.held_elsewhere(&agent.fingerprint).is_some() {
                return Err(TaskError::HeldElsewhere(agent.name.clone()));
            }
            return Err(TaskError::Offline {
                seen: agent.last_seen.map_or("never connected".into(), |t| {
                    format!("last seen {} ago", human_duration(now().saturating_sub(t)))
                }),
                name: agent.name.clone(),
            });
        };
        if self
            .pending
            .values()
            .filter(|p| p.agent == agent.fingerprint)
            .count()
            >= MAX_PENDING_PER_AGENT
        {
            return Err(TaskError::TooManyRequests(agent.name.clone()));
        }
        let id = self.next_request;
        self.next_request += 1;
        self.pending.insert(
            id,
            PendingRequest {
                agent: agent.fingerprint,
                session,
                reply,
            },
        );
        if !self.to_agent(&agent.fingerprint, msg(id)) {
            self.pending.remove(&id);
            return Err(TaskError::AgentBusy(agent.name.clone()));
        }
        Ok(id)
    }

    fn answer(&mut self, agent: &Fingerprint, id: u64, reply: Answer) {
        match self.pending.get(&id) {
            Some(p) if p.agent == *agent => {
                if let Some(p) = self.pending.remove(&id) {
                    // The caller may have stopped waiting just now; nothing to do then.
                    let _ = p.reply.send(reply);
                }
            }
            Some(_) => tracing::warn!(id, "project reply for another agent's request; ignored"),
            None => tracing::debug!(id, "project reply nobody waits for (timed out?); ignored"),
        }
    }

    /// Fails the requests a session was asked, when it ends.
    pub(crate) fn drop_pending_requests(&mut self, session: u64) {
        self.pending.retain(|_, p| p.session != session);
    }

    fn projects_reported(&mut self, agent: &Fingerprint, report: ProjectsReport) {
        if self.report_limit.take(agent).is_err() {
            if self.report_warnings.take(agent).is_ok() {
                tracing::warn!(
                    %agent,
                    per_minute = self.config().project_reports_per_minute,
                    "this agent sends project reports faster than the relay keeps them; ignoring the extra ones"
                );
            }
            return;
        }
        self.store_projects(agent, sanitize(report));
    }

    fn store_projects(&self, agent: &Fingerprint, report: ProjectsReport) {
        let stored = self
            .store()
            .update_agent(agent, &mut |rec| rec.projects = Some(report.clone()));
        if let Err(e) = stored {
            tracing::error!(error = %e, "could not store the agent's projects");
        }
    }

    fn usable_projects(
        &self,
        user: &str,
        target: Option<&str>,
        agent: Option<&str>,
    ) -> Result<Vec<String>, TaskError> {
        let owner = target.unwrap_or(user);
        let share = if owner == user {
            None
        } else {
            Some(
                self.store()
                    .share(owner, user)?
                    .ok_or_else(|| TaskError::NotShared {
                        owner: owner.to_string(),
                    })?,
            )
        };
        let agent = self.choose_agent(owner, agent, owner == user)?;
        let known: Vec<String> = agent
            .projects
            .map(|r| r.projects.into_iter().map(|p| p.name).collect())
            .unwrap_or_default();
        Ok(match share.and_then(|s| s.projects) {
            None => known,
            Some(limited) => limited,
        })
    }
}
