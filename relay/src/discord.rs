//! The Discord bot inside the relay: [`CoreBackend`], the bot's [`Backend`] over the relay [`Core`], and
//! [`start`], which runs the bot for the relay's lifetime.
//!
//! Everything here is a translation: permissions, limits and audit live in the core, and each refusal the
//! core gives a person ([`TaskError`], [`CoreError`]) reaches them as is, as a [`BackendError::Refused`].
//! Store failures are ours, and become [`BackendError::Internal`].

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use ct_bot::backend::{
    AgentInfo, AuditEntry, BackendError, DashboardLink, HistoryEntry, HistoryPage, HistoryQuery,
    ModeInfo, Pairing, ProjectInfo, Result, ShareInfo, ShareLevel, TaskFeed, TaskInfo, TaskRequest,
    ThreadChain, ThreadMark, UsageReport, WorkspaceOp,
};
use ct_bot::leader::LeaseTimes;
use ct_protocol::pairing::PairingToken;
use ct_protocol::project::ProjectOp;
use ct_protocol::task::{Decision, TaskEvent};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info};

pub use ct_bot::config::{BotConfig, Delivery};
pub use ct_bot::{Backend, Bot};

use crate::core::pools::{Mode, PoolOp, PoolReply};
use crate::core::{AgentView, Core, CoreError};
use crate::store::{self, now, AgentRecord, Store, TaskRecord, TaskState};
use crate::tasks::{ReplyOutcome, Submit, TaskError};
use ct_protocol::Fingerprint;

/// How often a pairing code is checked while the bot waits to tell its user the agent paired.
const PAIR_POLL: Duration = Duration::from_secs(1);
/// Recent tasks offered to autocomplete and history.
const RECENT_TASKS: usize = 25;
/// The most tasks `/tasks` looks through for one page: its filters and pages reach this far back in a
/// person's history, and reading it costs one indexed read of this many records.
const HISTORY_SCAN: usize = 500;
/// Audit entries shown by `/audit`.
const AUDIT_LINES: usize = 20;
/// Dashboard sign-in links one user may mint: a few at once, then one a minute.
const DASHBOARD_LINK_BURST: u32 = 5;
const DASHBOARD_LINK_EVERY: Duration = Duration::from_secs(60);
/// How far back in the owner's audit log a task's cancel is looked for when it ends (it is among the latest).
const STOP_LOOKBACK: usize = 100;
/// The lease whose holder runs the Discord gateway and every thread follower (see `ct_bot::leader`).
pub const LEASE: &str = "discord";

fn task_err(e: TaskError) -> BackendError {
    match e {
        TaskError::Store(e) => BackendError::Internal(e.into()),
        other => BackendError::Refused(other.to_string()),
    }
}

fn core_err(e: CoreError) -> BackendError {
    match e {
        CoreError::Store(e) => BackendError::Internal(e.into()),
        other => BackendError::Refused(other.to_string()),
    }
}

fn store_err(e: store::StoreError) -> BackendError {
    BackendError::Internal(e.into())
}

fn state_name(s: TaskState) -> &'static str {
    match s {
        TaskState::Queued => "queued",
        TaskState::Running => "running",
        TaskState::WaitingApproval => "waiting_approval",
        TaskState::Done => "done",
        TaskState::Failed => "failed",
        TaskState::Cancelled => "cancelled",
        TaskState::Lost => "lost",
    }
}

fn agent_info(a: &AgentView) -> AgentInfo {
    AgentInfo {
        name: a.name.clone(),
        fingerprint: a.fingerprint.short(),
        owner: a.owner.clone(),
        online: a.online,
        since: a.since,
        transport: a.transport.map(|t| t.to_string()),
        version: a.version.clone(),
    }
}

/// The bot's backend: the relay core, called as the Discord user who acts.
#[derive(Debug, Clone)]
pub struct CoreBackend {
    core: Core,
}

impl CoreBackend {
    pub fn new(core: Core) -> Self {
        Self { core }
    }

    /// Runs a store read on the blocking pool.
    async fn read<R: Send + 'static>(
        &self,
        query: impl FnOnce(&dyn Store) -> store::Result<R> + Send + 'static,
    ) -> Result<R> {
        self.core
            .read(query)
            .await
            .map_err(|e| BackendError::Internal(e.into()))?
            .map_err(store_err)
    }

    async fn info(&self, rec: &TaskRecord) -> Result<TaskInfo> {
        Ok(self.infos(std::slice::from_ref(rec)).await?.remove(0))
    }

    /// What the bot shows of each task, with its agent's name and owner read in one go.
    async fn infos(&self, recs: &[TaskRecord]) -> Result<Vec<TaskInfo>> {
        // Each agent once: a history of hundreds of tasks runs on a handful of machines.
        let fps: std::collections::BTreeSet<Fingerprint> = recs.iter().map(|r| r.agent).collect();
        let agents: std::collections::HashMap<Fingerprint, Option<AgentRecord>> = self
            .read(move |store| {
                fps.into_iter()
                    .map(|fp| Ok((fp, store.agent(&fp)?)))
                    .collect::<store::Result<_>>()
            })
            .await?;
        Ok(recs
            .iter()
            .map(|rec| task_info(rec, agents.get(&rec.agent).cloned().flatten()))
            .collect())
    }

    /// The user's own agents that are not revoked.
    async fn own_agents(&self, user: &str) -> Result<Vec<AgentRecord>> {
        let user = user.to_string();
        let mut mine: Vec<AgentRecord> = self
            .read(move |store| store.agents_of(&user))
            .await?
            .into_iter()
            .filter(|a| a.revoked_at.is_none())
            .collect();
        mine.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(mine)
    }

    /// Which of the user's agents a project request means (as the core will choose it), for naming it.
    async fn which_agent(&self, user: &str, wanted: Option<&str>) -> Result<Option<AgentRecord>> {
        let mine = self.own_agents(user).await?;
        Ok(match wanted {
            Some(w) => mine
                .into_iter()
                .find(|a| a.name == w || a.fingerprint.to_string().starts_with(w) && w.len() >= 10),
            None if mine.len() == 1 => mine.into_iter().next(),
            None => self.core.default_agent(user).await.map_err(task_err)?,
        })
    }

    /// A task the user may see: theirs, or on their agents.
    async fn visible_task(&self, user: &str, id: &str) -> Result<TaskRecord> {
        let rec = self.core.task(id).await.map_err(task_err)?;
        let fp = rec.agent;
        let owner = self
            .read(move |store| store.agent(&fp))
            .await?
            .map(|a| a.owner);
        if rec.spec.requester.user == user || owner.as_deref() == Some(user) {
            Ok(rec)
        } else {
            Err(task_err(TaskError::NotYours(id.to_string())))
        }
    }

    /// The project a `/task` without one means: the only one the user may use there.
    async fn default_project(&self, req: &TaskRequest) -> Result<String> {
        let names = self
            .core
            .usable_projects(&req.user, req.target.as_deref(), req.agent.as_deref())
            .await
            .map_err(task_err)?;
        match names.as_slice() {
            [one] => Ok(one.clone()),
            [] => Err(BackendError::Refused(
                "there are no projects to work in yet: add one with /project add, or give a folder path \
                 as the project"
                    .into(),
            )),
            many => Err(BackendError::Refused(format!(
                "say which project: {}",
                many.join(", ")
            ))),
        }
    }
}

impl CoreBackend {
    /// Whether `req` goes to the requester's pool worker (answered only where it matters: a request that names
    /// its project and no agent gets `false` and is still routed to the worker by the core), and makes it say so the way the core routes it: no
    /// target and no agent. A follow-up of a pool task names the worker's owner (`pool:NAME`) as its target,
    /// and the dashboard names the worker as the agent of a workspace project: both mean the user's worker.
    async fn to_pool(&self, req: &mut TaskRequest) -> Result<bool> {
        if req
            .target
            .as_deref()
            .is_some_and(|t| store::pool_of_owner(t).is_some())
        {
            req.target = None;
            req.agent = None;
        }
        if req.target.is_some() {
            return Ok(false);
        }
        // A task naming its project and no agent is routed by the core by itself: asking the user's mode here
        // is needed only to pick a default project or to recognise the worker named as the agent.
        if req.agent.is_none() && req.project.is_some() {
            return Ok(false);
        }
        let mode = self.core.mode(&req.user).await.map_err(task_err)?;
        if !mode.cluster {
            return Ok(false);
        }
        if req.agent.is_some() && req.agent == mode.worker {
            req.agent = None;
        }
        Ok(req.agent.is_none())
    }

    /// The project a pool user's `/task` without one means: the only one in their workspace.
    async fn default_workspace_project(&self, req: &TaskRequest) -> Result<String> {
        let names: Vec<String> = self
            .workspace(&req.user, &req.roles, WorkspaceOp::List)
            .await?
            .into_iter()
            .map(|p| p.name)
            .collect();
        match names.as_slice() {
            [one] => Ok(one.clone()),
            [] => Err(BackendError::Refused(
                "your workspace has no projects yet: make one with `/project add NAME [git URL]`"
                    .into(),
            )),
            many => Err(BackendError::Refused(format!(
                "say which project: {}",
                many.join(", ")
            ))),
        }
    }
}

/// The core's submission for the bot's request, in `project` (resolved by the caller).
fn submission(req: TaskRequest, project: String) -> Submit {
    Submit {
        user: req.user,
        target: req.target,
        agent: req.agent,
        name: req.name,
        project,
        prompt: req.prompt,
        options: req.options,
        resume: req.resume,
        operator: false,
        roles: Some(req.roles),
    }
}

/// An agent as the bot shows it, from its record alone (it is not online, or not known to be).
fn record_info(rec: &AgentRecord) -> AgentInfo {
    AgentInfo {
        name: rec.name.clone(),
        fingerprint: rec.fingerprint.short(),
        owner: rec.owner.clone(),
        online: false,
        since: rec.last_seen,
        transport: rec.last_transport.map(|t| t.to_string()),
        version: rec.last_version.clone(),
    }
}

/// What `/register status` shows of a user's mode.
fn mode_info(view: crate::core::pools::ModeView) -> ModeInfo {
    ModeInfo {
        pool: view.cluster.then_some(view.pool).flatten(),
        worker: view.worker,
        worker_online: view.online,
        note: match (view.draining, view.note) {
            (true, Some(note)) => Some(format!("Your worker is being drained: your next task moves you to another one. {note}")),
            (true, None) => Some("Your worker is being drained: your next task moves you to another one, and your files stay on this one.".into()),
            (false, note) => note,
        },
    }
}

/// What the bot shows of a task, given its agent's record (if it still exists).
fn task_info(rec: &TaskRecord, agent: Option<AgentRecord>) -> TaskInfo {
    let (agent, owner) =
        agent.map_or_else(|| (rec.agent.short(), String::new()), |a| (a.name, a.owner));
    TaskInfo {
        id: rec.spec.task.clone(),
        project: rec.spec.project.clone(),
        agent,
        requester: rec.spec.requester.user.clone(),
        owner,
        state: state_name(rec.state).to_string(),
        created_at: rec.created_at,
        session_id: rec.session_id.clone(),
        model: rec.spec.options.model.clone(),
        mode: rec.spec.options.permission_mode.clone(),
        follows: rec.follows.clone(),
        prompt: rec.spec.prompt.clone(),
    }
}

#[async_trait]
impl Backend for CoreBackend {
    async fn pairing_code(&self, user: &str) -> Result<Pairing> {
        let (token, expires_at) = self.core.mint_pairing_token(user).await.map_err(core_err)?;
        Ok(Pairing {
            token: token.to_string(),
            expires_in: expires_at.saturating_sub(now()),
        })
    }

    async fn wait_paired(&self, user: &str, pairing: &Pairing) -> Result<Option<AgentInfo>> {
        let token: PairingToken = pairing
            .token
            .parse()
            .map_err(|e| BackendError::Internal(anyhow::anyhow!("our own pairing token: {e}")))?;
        // The core has no pairing notification; the code's record says when it was used. Polling is bounded
        // by the code's life (minutes), once a second.
        loop {
            let id = token.code.id.clone();
            let rec = self.read(move |store| store.pair_code(&id)).await?;
            let Some(rec) = rec else { return Ok(None) };
            if let Some(used) = rec.used_at {
                let agent = self
                    .own_agents(user)
                    .await?
                    .into_iter()
                    .filter(|a| a.paired_at >= used)
                    .min_by_key(|a| a.paired_at);
                let views = self.core.agents().await.map_err(core_err)?;
                return Ok(agent.and_then(|a| {
                    views
                        .iter()
                        .find(|v| v.fingerprint == a.fingerprint)
                        .map(agent_info)
                }));
            }
            if rec.superseded_at.is_some() || now() >= rec.expires_at {
                return Ok(None);
            }
            tokio::time::sleep(PAIR_POLL).await;
        }
    }

    async fn agents(&self, user: &str) -> Result<Vec<AgentInfo>> {
        let mut out: Vec<AgentInfo> = self
            .core
            .agents()
            .await
            .map_err(core_err)?
            .iter()
            .filter(|a| a.owner == user && !a.revoked)
            .map(agent_info)
            .collect();
        for shared in self.core.shares_available(user).await.map_err(task_err)? {
            out.extend(shared.agents.iter().map(|a| AgentInfo {
                name: a.name.clone(),
                fingerprint: a.fingerprint.short(),
                owner: shared.owner.clone(),
                online: a.online,
                since: a.since,
                // How the owner's machine connects is the owner's business.
                transport: None,
                version: None,
            }));
        }
        Ok(out)
    }

    async fn unregister(&self, user: &str, agent: &str) -> Result<AgentInfo> {
        // Only among the user's own agents: `find_agent` alone would match anyone's agent by name.
        let wanted = agent.trim();
        let mine = self.own_agents(user).await?;
        let found: Vec<&AgentRecord> = mine
            .iter()
            .filter(|a| {
                a.name == wanted
                    || (wanted.len() >= 10 && a.fingerprint.to_string().starts_with(wanted))
            })
            .collect();
        let [one] = found.as_slice() else {
            let names: Vec<&str> = mine.iter().map(|a| a.name.as_str()).collect();
            return Err(BackendError::Refused(format!(
                "you have no agent called {wanted:?}; yours are: {}",
                if names.is_empty() {
                    "none".to_string()
                } else {
                    names.join(", ")
                }
            )));
        };
        let rec = self
            .core
            .revoke(&one.fingerprint.to_string(), user)
            .await
            .map_err(core_err)?;
        Ok(record_info(&rec))
    }

    async fn add_project(
        &self,
        user: &str,
        name: &str,
        path: &str,
        agent: Option<&str>,
    ) -> Result<ProjectInfo> {
        let report = self
            .core
            .project(
                user,
                agent,
                ProjectOp::Add {
                    name: name.to_string(),
                    path: path.to_string(),
                },
            )
            .await
            .map_err(task_err)?;
        let agent_name = self
            .which_agent(user, agent)
            .await?
            .map_or_else(|| agent.unwrap_or("your agent").to_string(), |a| a.name);
        let added = report.projects.iter().find(|p| p.name == name);
        Ok(ProjectInfo {
            name: name.to_string(),
            path: added.map_or_else(|| path.to_string(), |p| p.path.clone()),
            agent: agent_name,
            owner: user.to_string(),
        })
    }

    async fn projects(&self, user: &str) -> Result<Vec<ProjectInfo>> {
        let mut out = Vec::new();
        for agent in self.own_agents(user).await? {
            let report = self
                .core
                .agent_projects(&agent.fingerprint)
                .await
                .map_err(task_err)?;
            for p in report.map(|r| r.projects).unwrap_or_default() {
                out.push(ProjectInfo {
                    name: p.name,
                    path: p.path,
                    agent: agent.name.clone(),
                    owner: user.to_string(),
                });
            }
        }
        for shared in self.core.shares_available(user).await.map_err(task_err)? {
            for agent in &shared.agents {
                // A grantee sees names only: the owner's folder layout is not theirs to read.
                out.extend(agent.projects.iter().map(|name| ProjectInfo {
                    name: name.clone(),
                    path: String::new(),
                    agent: agent.name.clone(),
                    owner: shared.owner.clone(),
                }));
            }
        }
        // A pool user's workspace, asked of their worker. The front ends know no roles here, so a pool open
        // only to a role lists nothing from it; `/project list` (with the member's roles) still does.
        if self.core.mode(user).await.is_ok_and(|m| m.cluster) {
            match self.workspace(user, &[], WorkspaceOp::List).await {
                Ok(projects) => out.extend(projects),
                Err(e) => {
                    tracing::debug!(error = %e, "a pool user's workspace could not be listed")
                }
            }
        }
        Ok(out)
    }

    async fn remove_project(&self, user: &str, name: &str, agent: Option<&str>) -> Result<()> {
        // With no agent named, the project's own machine: the one of the user's agents that has a project of
        // that name, and a refusal listing them when several have. (None has: the core words the refusal.)
        let agent = match agent.map(str::trim).filter(|a| !a.is_empty()) {
            Some(a) => Some(a.to_string()),
            None => {
                let mut on = Vec::new();
                for a in self.own_agents(user).await? {
                    let report = self
                        .core
                        .agent_projects(&a.fingerprint)
                        .await
                        .map_err(task_err)?;
                    if report.is_some_and(|r| r.projects.iter().any(|p| p.name == name)) {
                        on.push(a.name);
                    }
                }
                match on.len() {
                    0 => None,
                    1 => on.pop(),
                    _ => {
                        return Err(BackendError::Refused(format!(
                            "{name:?} is a project on several of your agents ({}): say which with the agent \
                             option, e.g. agent:{}",
                            on.join(", "),
                            on[0]
                        )))
                    }
                }
            }
        };
        self.core
            .project(
                user,
                agent.as_deref(),
                ProjectOp::Remove {
                    name: name.to_string(),
                },
            )
            .await
            .map_err(task_err)?;
        Ok(())
    }

    async fn submit(&self, req: TaskRequest) -> Result<TaskInfo> {
        self.submit_with_files(req, Vec::new()).await
    }

    async fn vet_submit(&self, req: &TaskRequest, files: bool) -> Result<()> {
        let mut req = req.clone();
        let pooled = self.to_pool(&mut req).await?;
        let project = match (&req.project, pooled) {
            (Some(p), _) => p.clone(),
            // Their pool worker, which finds the project in their own workspace (asking it is a round trip to
            // the worker, left to the submission, which also checks their access to the pool): nobody else's
            // agents are at stake, so there is nothing to vet.
            (None, true) => return Ok(()),
            (None, false) => self.default_project(&req).await?,
        };
        self.core
            .vet_task(submission(req, project), files)
            .await
            .map_err(task_err)
    }

    async fn submit_with_files(
        &self,
        req: TaskRequest,
        files: Vec<ct_bot::backend::Attachment>,
    ) -> Result<TaskInfo> {
        let mut req = req;
        let pooled = self.to_pool(&mut req).await?;
        let project = match (&req.project, pooled) {
            (Some(p), _) => p.clone(),
            (None, true) => self.default_workspace_project(&req).await?,
            (None, false) => self.default_project(&req).await?,
        };
        let rec = self
            .core
            .submit_task_with_files(submission(req, project), files)
            .await
            .map_err(task_err)?;
        self.info(&rec).await
    }

    async fn reply(&self, user: &str, task: &str, prompt: &str) -> Result<TaskInfo> {
        self.reply_with_files(user, task, prompt, Vec::new()).await
    }

    async fn reply_with_files(
        &self,
        user: &str,
        task: &str,
        prompt: &str,
        files: Vec<ct_bot::backend::Attachment>,
    ) -> Result<TaskInfo> {
        let rec = match self
            .core
            .reply_with_files(user, task, prompt.to_string(), None, files)
            .await
            .map_err(task_err)?
        {
            ReplyOutcome::Sent(rec) | ReplyOutcome::Resumed(rec) => rec,
        };
        self.info(&rec).await
    }

    async fn task(&self, user: &str, task: &str) -> Result<TaskInfo> {
        let rec = self.visible_task(user, task).await?;
        self.info(&rec).await
    }

    async fn tasks(&self, user: &str) -> Result<Vec<TaskInfo>> {
        let recs = self
            .core
            .tasks_for(user, RECENT_TASKS)
            .await
            .map_err(task_err)?;
        self.infos(&recs).await
    }

    async fn task_events(
        &self,
        user: &str,
        task: &str,
    ) -> Result<(TaskInfo, Vec<(u64, TaskEvent)>)> {
        // Who asks is checked before anything of the task is read, and a stranger's refusal is worded as
        // for an id that does not exist. The log is read without following the task (no live subscription
        // is left behind by a look at history).
        let rec = self.visible_task(user, task).await?;
        let info = self.info(&rec).await?;
        let id = task.to_string();
        let events = self.read(move |store| store.events(&id, 0)).await?;
        Ok((info, events))
    }

    async fn history(&self, user: &str, query: &HistoryQuery) -> Result<HistoryPage> {
        let who = user.to_string();
        let recs = self
            .read(move |store| {
                let mine: Vec<Fingerprint> = store
                    .agents_of(&who)?
                    .into_iter()
                    .map(|a| a.fingerprint)
                    .collect();
                store.recent_tasks(&who, &mine, HISTORY_SCAN)
            })
            .await?;
        let (page, more) = query.page(self.infos(&recs).await?);
        let ids: Vec<String> = page.iter().map(|t| t.id.clone()).collect();
        let threads: std::collections::HashMap<String, u64> = self
            .read(move |store| store.task_threads(&ids))
            .await?
            .into_iter()
            .collect();
        Ok(HistoryPage {
            entries: page
                .into_iter()
                .map(|task| HistoryEntry {
                    thread: threads.get(&task.id).copied(),
                    task,
                })
                .collect(),
            more,
        })
    }

    async fn task_thread(&self, task: &str) -> Result<Option<u64>> {
        let task = vec![task.to_string()];
        let found = self.read(move |store| store.task_threads(&task)).await?;
        Ok(found.first().map(|(_, thread)| *thread))
    }

    async fn set_task_thread(&self, task: &str, thread: u64) -> Result<()> {
        let task = task.to_string();
        self.read(move |store| store.put_task_thread(&task, thread))
            .await
    }

    async fn set_default_agent(&self, user: &str, agent: &str) -> Result<AgentInfo> {
        let rec = self
            .core
            .set_default_agent(user, agent)
            .await
            .map_err(task_err)?;
        let views = self.core.agents().await.map_err(core_err)?;
        Ok(views
            .iter()
            .find(|v| v.fingerprint == rec.fingerprint)
            .map_or_else(|| record_info(&rec), agent_info))
    }

    async fn default_agent(&self, user: &str) -> Result<Option<String>> {
        Ok(self
            .core
            .default_agent(user)
            .await
            .map_err(task_err)?
            .map(|a| a.name))
    }

    // Thread marks are the bot's own bookkeeping, not the core's state: written straight to the store, on the
    // blocking pool.
    async fn mark_thread(&self, mark: &ThreadMark) -> Result<()> {
        let (task, mark) = (
            mark.task.clone(),
            serde_json::to_vec(mark).map_err(|e| store_err(e.into()))?,
        );
        self.read(move |store| store.put_thread_mark(&task, &mark))
            .await
    }

    async fn wake_leader(&self) {
        // Only a cluster has another node to wake: a relay of one leads itself, and never asks.
        if let Some(bus) = self.core.bus() {
            bus.publisher().publish(
                crate::cluster::BOT_SCAN_SUBJECT.to_string(),
                Default::default(),
            );
        }
    }

    async fn forget_thread(&self, task: &str) -> Result<()> {
        let task = task.to_string();
        self.read(move |store| store.delete_thread_mark(&task))
            .await
    }

    async fn thread_mark(&self, task: &str) -> Result<Option<ThreadMark>> {
        let task = task.to_string();
        let Some(bytes) = self.read(move |store| store.thread_mark(&task)).await? else {
            return Ok(None);
        };
        match serde_json::from_slice(&bytes) {
            Ok(mark) => Ok(Some(mark)),
            // Only the bot writes these; one that does not read back is as good as none (as in `thread_marks`).
            Err(err) => {
                tracing::warn!(%err, "a thread mark does not decode; ignoring it");
                Ok(None)
            }
        }
    }

    async fn set_thread_chain(&self, chain: &ThreadChain) -> Result<()> {
        let (thread, task) = (chain.thread, chain.task.clone());
        let body = serde_json::to_vec(chain).map_err(|e| store_err(e.into()))?;
        self.read(move |store| store.put_thread_chain(thread, &task, &body))
            .await
    }

    async fn thread_chain(&self, thread: u64) -> Result<Option<ThreadChain>> {
        let Some(body) = self.read(move |store| store.thread_chain(thread)).await? else {
            return Ok(None);
        };
        match serde_json::from_slice::<ThreadChain>(&body) {
            Ok(chain) if chain.thread == thread => Ok(Some(chain)),
            // Only the bot writes these; one that does not read back costs the thread its kept settings.
            _ => {
                tracing::warn!(thread, "a kept thread chain does not decode; ignoring it");
                Ok(None)
            }
        }
    }

    async fn add_answer(
        &self,
        task: &str,
        approval: &str,
        question: u8,
        answer: &str,
    ) -> Result<std::collections::BTreeMap<u8, String>> {
        let (task, approval, answer) = (task.to_string(), approval.to_string(), answer.to_string());
        self.read(move |store| store.add_answer(&task, &approval, question, &answer))
            .await
    }

    async fn thread_marks(&self) -> Result<Vec<(ThreadMark, TaskInfo)>> {
        let marked = self
            .read(|store| {
                let mut out = Vec::new();
                for (task, mark) in store.thread_marks::<ThreadMark>()? {
                    match store.task(&task)? {
                        Some(rec) if mark.task == task => {
                            let agent = store.agent(&rec.agent)?;
                            out.push((mark, task_info(&rec, agent)));
                        }
                        // Deleted by retention (or a mark filed under another key): nothing left to follow.
                        _ => store.delete_thread_mark(&task)?,
                    }
                }
                Ok(out)
            })
            .await?;
        Ok(marked)
    }

    // The store's lease, by the store's clock: in a cluster the nodes share it; in a relay of one it is always
    // this node's (its id is stable across restarts, so even a crash does not make it wait for its own).
    async fn lease(&self, holder: &str, ttl: Duration) -> Result<bool> {
        let holder = holder.to_string();
        self.read(move |store| store.lease(LEASE, &holder, ttl))
            .await
    }

    async fn release_lease(&self, holder: &str) -> Result<()> {
        let holder = holder.to_string();
        self.read(move |store| store.release_lease(LEASE, &holder))
            .await
    }

    async fn follow(&self, task: &str) -> Result<TaskFeed> {
        let (rec, past, live) = self.core.follow(task).await.map_err(task_err)?;
        Ok(TaskFeed {
            task: self.info(&rec).await?,
            past,
            live,
        })
    }

    async fn cancel(&self, user: &str, task: &str) -> Result<()> {
        self.core.cancel_task(user, task).await.map_err(task_err)?;
        Ok(())
    }

    async fn worktree(
        &self,
        user: &str,
        task: &str,
        action: ct_protocol::task::WorktreeAction,
    ) -> Result<ct_protocol::task::WorktreeOutcome> {
        self.core
            .worktree(user, task, action)
            .await
            .map_err(task_err)
    }

    async fn decide(
        &self,
        user: &str,
        task: &str,
        approval: &str,
        decision: Decision,
    ) -> Result<()> {
        self.core
            .decide(user, task, approval, decision)
            .await
            .map_err(task_err)
    }

    async fn approver(&self, task: &str) -> Result<String> {
        self.core.approver(task).await.map_err(task_err)
    }

    async fn share(
        &self,
        owner: &str,
        grantee: &str,
        projects: Vec<String>,
        level: ShareLevel,
    ) -> Result<ShareInfo> {
        let level = match level {
            ShareLevel::Run => store::ShareLevel::Standard,
            ShareLevel::Trusted => store::ShareLevel::Trusted,
        };
        let projects = (!projects.is_empty()).then_some(projects);
        let rec = self
            .core
            .share_add(owner, grantee, projects, level)
            .await
            .map_err(task_err)?;
        Ok(share_info(&rec))
    }

    async fn unshare(&self, owner: &str, grantee: &str) -> Result<()> {
        self.core
            .share_remove(owner, grantee)
            .await
            .map_err(task_err)?;
        Ok(())
    }

    async fn shares(&self, user: &str) -> Result<Vec<ShareInfo>> {
        let mut out: Vec<ShareInfo> = self
            .core
            .shares_of(user)
            .await
            .map_err(task_err)?
            .iter()
            .map(share_info)
            .collect();
        for a in self.core.shares_available(user).await.map_err(task_err)? {
            out.push(ShareInfo {
                owner: a.owner,
                grantee: user.to_string(),
                projects: a.projects.unwrap_or_default(),
                level: match a.level {
                    store::ShareLevel::Standard => ShareLevel::Run,
                    store::ShareLevel::Trusted => ShareLevel::Trusted,
                },
            });
        }
        Ok(out)
    }

    async fn audit(&self, user: &str) -> Result<Vec<AuditEntry>> {
        Ok(self
            .core
            .audit_for_owner(user, AUDIT_LINES, None)
            .await
            .map_err(core_err)?
            .into_iter()
            .map(|e| AuditEntry {
                at: e.at,
                actor: e.actor,
                what: e.detail,
            })
            .collect())
    }

    async fn stopped_by(&self, task: &TaskInfo) -> Result<Option<String>> {
        // Every cancel is audited with who did it, on whichever node it was asked (`Core::cancel_task`); the
        // latest entries of the agent's owner hold it.
        if task.owner.is_empty() {
            return Ok(None);
        }
        let entries = self
            .core
            .audit_for_owner(&task.owner, STOP_LOOKBACK, None)
            .await
            .map_err(core_err)?;
        Ok(entries
            .into_iter()
            .find(|e| {
                matches!(e.kind, store::AuditKind::TaskCancelled { .. })
                    && e.task.as_deref() == Some(task.id.as_str())
            })
            .map(|e| e.actor))
    }

    async fn set_mode(&self, user: &str, pool: Option<&str>, roles: &[String]) -> Result<ModeInfo> {
        let mode = match pool.map(str::trim) {
            None => Mode::Local,
            Some("") => Mode::Cluster { pool: None },
            Some(p) => Mode::Cluster {
                pool: Some(p.to_string()),
            },
        };
        let view = self
            .core
            .set_mode(user, mode, Some(roles))
            .await
            .map_err(task_err)?;
        Ok(mode_info(view))
    }

    async fn mode(&self, user: &str) -> Result<ModeInfo> {
        let view = self.core.mode(user).await.map_err(task_err)?;
        Ok(mode_info(view))
    }

    async fn workspace(
        &self,
        user: &str,
        roles: &[String],
        op: WorkspaceOp,
    ) -> Result<Vec<ProjectInfo>> {
        let op = match op {
            WorkspaceOp::Create { name, git } => PoolOp::Create { name, git },
            WorkspaceOp::List => PoolOp::List,
            WorkspaceOp::Remove { name } => PoolOp::Remove { name },
        };
        let answer = self
            .core
            .pool_project(user, Some(roles), op)
            .await
            .map_err(task_err)?;
        match answer.reply {
            PoolReply::Projects(report) => Ok(report
                .projects
                .into_iter()
                .map(|p| ProjectInfo {
                    name: p.name,
                    path: p.path,
                    agent: answer.worker.clone(),
                    owner: user.to_string(),
                })
                .collect()),
            PoolReply::Usage(_) => Err(BackendError::Internal(anyhow::anyhow!(
                "the worker answered a project command with usage"
            ))),
        }
    }

    async fn usage(&self, user: &str, roles: &[String]) -> Result<UsageReport> {
        let answer = self
            .core
            .pool_project(user, Some(roles), PoolOp::Usage)
            .await
            .map_err(task_err)?;
        match answer.reply {
            PoolReply::Usage(usage) => Ok(usage),
            PoolReply::Projects(_) => Err(BackendError::Internal(anyhow::anyhow!(
                "the worker answered a usage question with projects"
            ))),
        }
    }

    async fn dashboard_link(&self, user: &str) -> Result<DashboardLink> {
        let who = user.to_string();
        let token = self
            .read(move |store| {
                // Links per user, across the cluster: each is a row until it expires.
                let bucket = format!("dashboard-link:{who}");
                if !store.take_token(&bucket, DASHBOARD_LINK_BURST, DASHBOARD_LINK_EVERY)? {
                    return Ok(None);
                }
                crate::sessions::mint_link(store, &who, store::now()).map(Some)
            })
            .await?
            .ok_or_else(|| {
                BackendError::Refused(
                    "you asked for several sign-in links just now: use the last one, or try again in a minute"
                        .into(),
                )
            })?;
        Ok(DashboardLink {
            url: crate::sessions::link_url(self.core.config(), &token),
            expires_in: crate::sessions::LINK_TTL.as_secs(),
        })
    }

    async fn end_dashboard_sessions(&self, user: &str) -> Result<usize> {
        let who = user.to_string();
        self.read(move |store| crate::sessions::end_all(store, &who))
            .await
    }

    async fn wants_mentions(&self, user: &str) -> Result<bool> {
        let user = user.to_string();
        Ok(!self.read(move |s| s.user(&user)).await?.quiet)
    }

    async fn set_mentions(&self, user: &str, on: bool) -> Result<()> {
        self.core.set_mentions(user, on).await.map_err(task_err)
    }
}

fn share_info(rec: &store::ShareRecord) -> ShareInfo {
    ShareInfo {
        owner: rec.owner.clone(),
        grantee: rec.grantee.clone(),
        projects: rec.projects.clone().unwrap_or_default(),
        level: match rec.level {
            store::ShareLevel::Standard => ShareLevel::Run,
            store::ShareLevel::Trusted => ShareLevel::Trusted,
        },
    }
}

/// Starts the bot for `config` over `core`, for as long as `shutdown` is not cancelled, and returns it for
/// the HTTPS endpoint's interactions route (every node answers those). The node leads — runs the gateway in
/// gateway mode, registers the commands in HTTP mode, and follows every task thread — while it holds the
/// [`LEASE`] in the store, shared by a cluster's nodes and always this node's in a relay of one
/// (`ct_bot::leader`). The bot's own tasks stop at shutdown, before the relay drains (`tasks` waits), and the
/// lease is released then, so another node takes over at once.
///
/// A bot that cannot connect (a refused token, Discord unreachable) is logged and tried again; agents are
/// served meanwhile.
pub fn start(
    core: Core,
    config: BotConfig,
    shutdown: CancellationToken,
    tasks: &TaskTracker,
) -> Option<Bot> {
    start_with(core, config, shutdown, tasks, LeaseTimes::default())
}

/// [`start`] with other lease timings (tests).
pub fn start_with(
    core: Core,
    mut config: BotConfig,
    shutdown: CancellationToken,
    tasks: &TaskTracker,
    times: LeaseTimes,
) -> Option<Bot> {
    config.node = core.node_id().to_string();
    let bus = core.bus().cloned();
    let backend: Arc<dyn Backend> = Arc::new(CoreBackend::new(core));
    let bot = match Bot::new(config, backend) {
        Ok(bot) => bot,
        Err(err) => {
            error!(error = %format!("{err:#}"), "the Discord bot is off");
            return None;
        }
    };
    if let Some(bus) = bus {
        tasks.spawn(pass_on_wakes(bus, bot.clone(), shutdown.clone()));
    }
    let running = bot.clone();
    tasks.spawn(async move {
        running.lead_with(shutdown, times).await;
        running.shutdown().await;
        info!("Discord bot stopped");
    });
    Some(bot)
}

/// Passes every wake-up another node sent on the cluster bus ([`CoreBackend::wake_leader`]) to this node's bot,
/// which acts on it only while it leads. Sealed like everything on the bus, so only a node of this cluster can
/// wake it; and a wake-up only makes the leader read the marks a little early.
async fn pass_on_wakes(bus: crate::cluster::Bus, bot: Bot, shutdown: CancellationToken) {
    use futures_util::StreamExt;
    let mut wakes = match bus
        .subscribe(crate::cluster::BOT_SCAN_SUBJECT.to_string())
        .await
    {
        Ok(wakes) => wakes,
        Err(e) => {
            tracing::warn!(
                error = %format!("{e:#}"),
                "cannot hear other nodes' wake-ups: threads they leave to this node open at its next scan"
            );
            return;
        }
    };
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            wake = wakes.next() => match wake {
                Some(_) => bot.scan_now(),
                None => return,
            },
        }
    }
}
