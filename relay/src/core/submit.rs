//! Submitting: a new task on the user's own agents or on agents shared with them, and a follow-up to an ended
//! task, which starts a new task resuming its Claude Code session. Every check runs on the core's thread, so
//! nothing this node does (a share revoked) changes between a check and the task it admits; the open-task
//! limits, which every node's submissions count against, are checked by the store as it writes the task.

use ct_protocol::task::{Requester, Role, TaskOptions, TaskSpec};
use ct_protocol::{Fingerprint, RelayMessage};
use rand::Rng;

use super::audit::{preview, Caller, OwnedCaller};
use super::state::State;
use super::tasks::{
    check_options, check_project_text, check_prompt, is_path, ReplyOutcome, Submit, TaskError,
};
use super::{human_duration, Core};
use crate::store::{
    now, pool_of_owner, Admission, AgentRecord, Attachment, AuditEntry, AuditKind, Presence, Store,
    StoreError, TaskLimits, TaskRecord, TaskState, UserRecord,
};

/// Longest Claude Code session id accepted for `resume` (they are UUIDs).
const MAX_SESSION_ID: usize = 128;
/// Longest display name kept for a requester, in characters (Discord's own limit is 32).
const MAX_DISPLAY_NAME: usize = 64;

/// How long after an agent left a node its tasks are still queued for it in a cluster (see
/// `State::between_nodes`): about as long as an agent takes to reach another node.
const RECONNECT_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

impl Core {
    /// Queues a task on one of the user's agents, or on an agent another user shared with them
    /// ([`Submit::target`]), and dispatches it at once if the agent has a free slot. The agent must be
    /// online: a task for an offline machine would otherwise wait unseen for hours. The task is on disk
    /// before this returns.
    pub async fn submit_task(&self, req: Submit) -> Result<TaskRecord, TaskError> {
        self.submit_task_with_files(req, Vec::new()).await
    }

    /// [`submit_task`](Self::submit_task) with files attached (see [`super::files`]): kept with the task
    /// until its agent is sent them, and refused for an agent that did not say it takes files.
    pub async fn submit_task_with_files(
        &self,
        req: Submit,
        files: Vec<Attachment>,
    ) -> Result<TaskRecord, TaskError> {
        let files = super::files::checked(files)?;
        let pre = self.preread(&req).await?;
        if self.bus().is_none() {
            return self
                .run(move |state| state.submit_task(req, pre, files))
                .await;
        }
        let resumes = req.resume.is_some();
        // In a cluster the decision is the core's, the write (the id check, the order, the admission: each a
        // round trip to PostgreSQL) is the blocking pool's, and the queue moves on the core's thread again.
        // The store's admission is what keeps the limits across nodes (see [`Admit::write`]), and a share
        // revoked between the decision and the dispatch is caught by the dispatch, which checks the
        // requester's standing again: the same as when the revocation happens on another node, which a
        // cluster has to handle anyway.
        // Neither the decision nor the queue reads a record an event write in flight could change, except
        // a resumed session's origin (see `check_resume`), so neither waits for those writes.
        let decide = move |state: &mut State| state.decide_task(req, pre, files).map(Box::new);
        let admit = match resumes {
            false => self.run_unsettled(decide).await?,
            true => self.run(decide).await?,
        };
        let rec = self.read(move |store| admit.write(store)).await??;
        self.run_unsettled(move |state| state.queued(rec)).await
    }

    /// Refuses `req` now if its submission would be refused for who is asking: their standing on the owner's
    /// agents and the project, the agent it means, its options, and (with `files`) whether that agent takes
    /// files. Nothing is taken or written. The bot asks this before it downloads a `/task`'s files, so a
    /// person who may not run the task cannot make the relay fetch, and hold in memory, files for it (the
    /// downloads at once are few, and theirs would hold up everyone else's). The submission checks all of
    /// it again, with the limits and whether the agent is online.
    pub async fn vet_task(&self, req: Submit, files: bool) -> Result<(), TaskError> {
        check_request(&req)?;
        // Shares, agents and settings: nothing an event write in flight changes.
        self.run_unsettled(move |state| state.vet_task(&req, files))
            .await
    }

    /// In a cluster, the reads of a submission that can be done before its decision (see [`Preread`]), on the
    /// blocking pool; nothing without a cluster.
    async fn preread(&self, req: &Submit) -> Result<Preread, TaskError> {
        if self.bus().is_none() {
            return Ok(Preread::default());
        }
        check_request(req)?;
        // The node's own limiter first, as on the core's thread: a flood is refused before it costs the store
        // anything.
        let user = req.user.clone();
        self.run_unsettled(move |state| state.take_local_token(&user))
            .await?;
        let config = self.config();
        let (burst, per) = (config.task_burst, token_period(config.tasks_per_minute));
        let (user, owner, wanted) = (req.user.clone(), owner_of(req), req.agent.clone());
        let pre = self
            .read(move |store| Preread::read(store, &user, &owner, wanted.as_deref(), burst, per))
            .await?;
        Ok(pre)
    }

    /// Continues a task with a follow-up prompt from `user` (its requester or the agent's owner). A task
    /// that is still running gets the prompt in its live session; one that ended starts a new task on the
    /// same agent and project that resumes its Claude Code session, with the user's standing checked afresh
    /// (a share may have changed since).
    ///
    /// A grantee's follow-up is audited like their tasks (and not sent without its entry). A follow-up that
    /// starts a new task counts against the user's task limits; one into a running task does not.
    pub async fn reply<'a>(
        &self,
        who: impl Into<Caller<'a>>,
        id: &str,
        prompt: String,
        name: Option<String>,
    ) -> Result<ReplyOutcome, TaskError> {
        self.reply_with_files(who, id, prompt, name, Vec::new())
            .await
    }

    /// [`reply`](Self::reply) with files attached: they go to the running session just before the prompt,
    /// or with the new task that resumes an ended one.
    pub async fn reply_with_files<'a>(
        &self,
        who: impl Into<Caller<'a>>,
        id: &str,
        prompt: String,
        name: Option<String>,
        files: Vec<Attachment>,
    ) -> Result<ReplyOutcome, TaskError> {
        let files = super::files::checked(files)?;
        let (caller, id) = (OwnedCaller::from(who.into()), id.to_string());
        self.run(move |state| state.reply(caller.as_caller(), &id, prompt, name, files))
            .await
    }

    /// Users the task rate limiter remembers now (bounded by `CoreConfig::rate_limit_keys`).
    pub async fn rate_limited_users(&self) -> usize {
        self.call(|state| state.rate_limited_users())
            .await
            .unwrap_or(0)
    }
}

/// What a submission in a cluster reads before the core's thread takes it up, on the blocking pool.
///
/// On PostgreSQL every read is a round trip, and the core's one thread would sit each out while every other
/// submission, session and event waits behind it: at a few hundred tasks a second that thread was the
/// cluster's bottleneck. Each value here is one another node can change at any moment anyway (the shared
/// token bucket, the user's stored output, the owner's agents, where an agent is held), so reading it a
/// moment before the decision rather than during it admits nothing a cluster did not already admit; the
/// decision itself (the share, the limits, the write) still happens on the core's thread, in the same order,
/// refusing with the same errors. A read that failed here is simply done again there. A single relay reads
/// nothing ahead: its core is the only writer, and deciding on what it read itself is what keeps, say, a
/// revocation from landing between a check and the task it admits.
#[derive(Debug, Default)]
pub(crate) struct Preread {
    /// The user's token from this node's own limiter was taken already.
    local_token: bool,
    /// The user's token from the cluster's bucket: taken (`true`) or refused.
    cluster_token: Option<bool>,
    stored_bytes: Option<u64>,
    /// The owner's agents that may be chosen, as [`usable`](super::routing::usable) leaves them.
    agents: Option<Vec<AgentRecord>>,
    /// Where the one agent the request can mean is held (`None`: nowhere), when it can mean only one.
    presence: Option<(Fingerprint, Option<Presence>)>,
    /// The requester's settings: their pool, and their default agent when the agents are their own.
    user: Option<UserRecord>,
}

impl Preread {
    fn read(
        store: &dyn Store,
        user: &str,
        owner: &str,
        wanted: Option<&str>,
        burst: u32,
        per: std::time::Duration,
    ) -> Self {
        let cluster_token = store.take_token(&format!("task/{user}"), burst, per).ok();
        let stored_bytes = store.stored_bytes_of_user(user).ok();
        let agents = store.agents_of(owner).ok().map(super::routing::usable);
        let presence = agents
            .as_deref()
            .and_then(|mine| super::routing::the_only_match(mine, wanted))
            .and_then(|fp| Some((fp, store.presence(&fp).ok()?)));
        Self {
            local_token: true,
            cluster_token,
            stored_bytes,
            agents,
            presence,
            user: store.user(user).ok(),
        }
    }
}

/// Refuses a malformed request before anything is looked up for it.
fn check_request(req: &Submit) -> Result<(), TaskError> {
    check_prompt(&req.prompt)?;
    check_project_text(&req.project)?;
    if let Some(resume) = &req.resume {
        if resume.is_empty()
            || resume.len() > MAX_SESSION_ID
            || !resume
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(TaskError::BadResume);
        }
    }
    Ok(())
}

/// Whose agents a submission runs on.
fn owner_of(req: &Submit) -> String {
    match &req.target {
        Some(t) if *t != req.user => t.clone(),
        _ => req.user.clone(),
    }
}

/// How often the task limiter gives a token back.
fn token_period(per_minute: u32) -> std::time::Duration {
    std::time::Duration::from_secs(60) / per_minute.max(1)
}

impl State {
    fn submit_task(
        &mut self,
        req: Submit,
        pre: Preread,
        files: Vec<Attachment>,
    ) -> Result<TaskRecord, TaskError> {
        let admit = self.decide_task(req, pre, files)?;
        let rec = admit.write(self.store())?;
        self.queued(rec)
    }

    /// Everything about a new task that is this node's to decide: the limits on the person, their standing,
    /// the agent, the options; the task as it will be written, not yet written.
    fn decide_task(
        &mut self,
        req: Submit,
        pre: Preread,
        files: Vec<Attachment>,
    ) -> Result<Admit, TaskError> {
        check_request(&req)?;
        self.take_task_token(&req.user, &pre)?;
        self.check_stored(&req.user, pre.stored_bytes, super::files::size_of(&files))?;
        let Some((role, agent)) = self.requesters_standing(&req, pre.user, pre.agents)? else {
            return self.decide_pool_task(req, files);
        };
        if let Some(session) = &req.resume {
            self.check_resume(&req.user, &agent, session)?;
        }
        let presence = pre
            .presence
            .filter(|(fp, _)| *fp == agent.fingerprint)
            .map(|(_, p)| p);
        self.prepare(NewTask {
            presence,
            agent,
            user: req.user,
            name: display_name(req.name),
            role,
            project: req.project,
            prompt: req.prompt,
            options: req.options,
            resume: req.resume,
            follows: None,
            operator: req.operator,
            files,
        })
    }

    /// What [`Core::vet_task`] checks.
    fn vet_task(&mut self, req: &Submit, files: bool) -> Result<(), TaskError> {
        let Some((role, agent)) = self.requesters_standing(req, None, None)? else {
            // Their pool worker: it runs the task in the requester's own workspace, and the submission checks
            // their access to the pool.
            return Ok(());
        };
        self.check_fit(&agent, role, &req.user, &req.project, &req.options, files)
    }

    /// The requester's role and the agent a request means, or why they may not run it; `None` when it goes to
    /// their pool worker (a user in cluster mode who names nobody's machine). `settings` and `mine` (the
    /// owner's usable agents), when read already, are not read again.
    fn requesters_standing(
        &mut self,
        req: &Submit,
        settings: Option<UserRecord>,
        mine: Option<Vec<AgentRecord>>,
    ) -> Result<Option<(Role, AgentRecord)>, TaskError> {
        let settings = match settings {
            Some(settings) => settings,
            None => self.store().user(&req.user)?,
        };
        if req.target.is_none() && req.agent.is_none() && settings.pool.is_some() {
            return Ok(None);
        }
        let owner = owner_of(req);
        // The share is checked before anything about the owner's agents is looked at, so someone without a
        // share learns nothing about them (not even their names).
        let role = self.role_for(&req.user, &owner, &req.project)?;
        let mine = match mine {
            Some(mine) => mine,
            None => self.agents_of(&owner)?,
        };
        let own = owner == req.user;
        let default = own.then_some(settings.default_agent);
        let agent = self.choose_agent_among(&owner, req.agent.as_deref(), own, mine, default)?;
        Ok(Some((role, agent)))
    }

    /// Whether `agent` can take the task as asked: the options for the requester's role, files, the project.
    fn check_fit(
        &mut self,
        agent: &AgentRecord,
        role: Role,
        user: &str,
        project: &str,
        options: &TaskOptions,
        files: bool,
    ) -> Result<(), TaskError> {
        check_options(role, options)?;
        if files {
            super::files::agent_takes_files(agent)?;
        }
        self.check_agent_project(agent, role, user, project)
    }

    /// A cluster-mode user's task, for their pool worker (assigned, or moved off a drained or removed one,
    /// here: see [`super::pools`]). The requester is a trusted grantee, so approvals go to them; the project
    /// is the worker's to find in their workspace.
    fn decide_pool_task(
        &mut self,
        req: Submit,
        files: Vec<Attachment>,
    ) -> Result<Admit, TaskError> {
        let caller = Caller {
            user: &req.user,
            operator: req.operator,
        };
        let roles = req.roles.as_deref().map(super::pools::bounded_roles);
        let (agent, _moved) = self.assign_worker(caller, roles)?;
        if let Some(session) = &req.resume {
            self.check_resume(&req.user, &agent, session)?;
        }
        self.prepare(NewTask {
            presence: None,
            agent,
            user: req.user,
            name: display_name(req.name),
            role: Role::TrustedGrantee,
            project: req.project,
            prompt: req.prompt,
            options: req.options,
            resume: req.resume,
            follows: None,
            operator: req.operator,
            files,
        })
    }

    /// The requester's role on the agent of `owner` a task ran on: a share's, or for a pool worker the
    /// pool's (see [`State::pool_standing`]).
    fn role_on(&mut self, user: &str, owner: &str, project: &str) -> Result<Role, TaskError> {
        match pool_of_owner(owner) {
            Some(pool) => self.pool_standing(pool, user),
            None => self.role_for(user, owner, project),
        }
    }

    /// Refuses a new task when the output `user`'s tasks keep has reached `CoreConfig::max_stored_per_user`.
    /// Scans the task history like [`Core::tasks_for`]; it runs after the task
    /// rate limit, so one person cannot make it run more often than they may start tasks.
    /// `adding`: bytes of files the new task brings (kept only until its agent has them, but kept meanwhile).
    fn check_stored(
        &mut self,
        user: &str,
        read: Option<u64>,
        adding: u64,
    ) -> Result<(), TaskError> {
        let max = self.config().max_stored_per_user;
        let used = match read {
            Some(used) => used,
            None => self.store().stored_bytes_of_user(user)?,
        };
        if used >= max || used + adding > max {
            return Err(TaskError::StorageFull {
                used: human_bytes(used),
                max: human_bytes(max),
                days: self.config().task_retention.as_secs().div_ceil(86_400),
            });
        }
        Ok(())
    }

    /// Counts a task started by `user` against [`CoreConfig::tasks_per_minute`](crate::core::CoreConfig).
    /// Taken once the request is well-formed, before the store is consulted: failed attempts count too, so
    /// a flood of them cannot keep the relay busy either.
    /// `pre`: what was taken ahead (see [`Preread`]).
    fn take_task_token(&mut self, user: &str, pre: &Preread) -> Result<(), TaskError> {
        if !pre.local_token {
            self.take_local_token(user)?;
        }
        // In a cluster the limit is the cluster's: each node's own bucket would let a person start as many
        // tasks again on every node.
        if self.bus.is_some() {
            let config = self.config();
            let per = token_period(config.tasks_per_minute);
            let taken = match pre.cluster_token {
                Some(taken) => taken,
                None => self
                    .store()
                    .take_token(&format!("task/{user}"), config.task_burst, per)?,
            };
            if !taken {
                return Err(self.rate_limited(per));
            }
        }
        Ok(())
    }

    /// The token from this node's own limiter.
    fn take_local_token(&mut self, user: &str) -> Result<(), TaskError> {
        match self.task_limit.take(&user.to_string()) {
            Ok(()) => Ok(()),
            Err(wait) => Err(self.rate_limited(wait)),
        }
    }

    fn rate_limited(&self, wait: std::time::Duration) -> TaskError {
        let config = self.config();
        TaskError::RateLimited {
            per_minute: config.tasks_per_minute,
            burst: config.task_burst,
            retry: human_duration(wait.as_secs_f64().ceil().max(1.0) as u64),
        }
    }

    fn rate_limited_users(&self) -> usize {
        self.task_limit.len()
    }

    /// The requester's role on `owner`'s agents for `project`, or why they may not use them.
    pub(crate) fn role_for(
        &mut self,
        user: &str,
        owner: &str,
        project: &str,
    ) -> Result<Role, TaskError> {
        if user == owner {
            return Ok(Role::Owner);
        }
        let Some(share) = self.store().share(owner, user)? else {
            return Err(TaskError::NotShared {
                owner: owner.to_string(),
            });
        };
        if !share.allows(project) {
            return Err(TaskError::ProjectNotShared {
                owner: owner.to_string(),
                project: project.to_string(),
                allowed: share.projects.unwrap_or_default().join(", "),
            });
        }
        Ok(super::shares::role_of(share.level))
    }

    /// Refuses a `resume` of a session that does not come from a task on this agent the user may act on.
    fn check_resume(
        &mut self,
        user: &str,
        agent: &AgentRecord,
        session: &str,
    ) -> Result<(), TaskError> {
        let mine = self
            .store()
            .tasks_with_session(&agent.fingerprint, session)?
            .into_iter()
            .any(|t| t.spec.requester.user == user || agent.owner == user);
        match mine {
            true => Ok(()),
            false => Err(TaskError::ResumeNotYours {
                agent: agent.name.clone(),
                session: session.to_string(),
            }),
        }
    }

    /// Checks the project against what the agent reported (when it has), and whether it takes shared tasks.
    fn check_agent_project(
        &mut self,
        agent: &AgentRecord,
        role: Role,
        user: &str,
        project: &str,
    ) -> Result<(), TaskError> {
        let Some(report) = &agent.projects else {
            // An agent that never reported its projects decides for itself.
            return Ok(());
        };
        if pool_of_owner(&agent.owner).is_some() {
            // A pool worker finds the project in the user's own workspace; its report lists none.
            return Ok(());
        }
        if role != Role::Owner && !report.accepts_shared {
            return Err(TaskError::SharedNotAccepted {
                agent: agent.name.clone(),
                owner: agent.owner.clone(),
            });
        }
        if is_path(project) || report.projects.iter().any(|p| p.name == project) {
            return Ok(());
        }
        let share = if role == Role::Owner {
            None
        } else {
            self.store().share(&agent.owner, user)?
        };
        let names: Vec<&str> = report
            .projects
            .iter()
            .map(|p| p.name.as_str())
            .filter(|n| share.as_ref().is_none_or(|s| s.allows(n)))
            .collect();
        Err(TaskError::UnknownProject {
            project: project.to_string(),
            agent: agent.name.clone(),
            names: if names.is_empty() {
                "no projects yet".into()
            } else {
                names.join(", ")
            },
            hint: if role == Role::Owner {
                "add one with /project add, or give a folder path".into()
            } else {
                format!("ask user {} to add one", agent.owner)
            },
        })
    }

    /// In a cluster, whether an agent no node holds right now is on its way to another one: its node died
    /// with its presence still claimed, or it left one moments ago (a node drained). Its tasks are queued
    /// rather than refused, and whichever node it connects to next dispatches them, once each.
    /// This also covers an agent another live node holds (its presence is claimed). `presence`: read ahead
    /// (see [`Preread`]), else read here.
    fn between_nodes(&self, agent: &AgentRecord, presence: Option<Option<Presence>>) -> bool {
        if self.bus.is_none() {
            return false;
        }
        let claimed = match presence {
            Some(read) => read.is_some(),
            None => matches!(self.store().presence(&agent.fingerprint), Ok(Some(_))),
        };
        let just_left = agent
            .last_seen
            .is_some_and(|t| now().saturating_sub(t) <= RECONNECT_GRACE.as_secs());
        claimed || just_left
    }

    /// Stores a new task in its agent's queue and dispatches what the agent has room for, all on the core's
    /// thread (a follow-up that starts a new task).
    fn enqueue(&mut self, task: NewTask) -> Result<TaskRecord, TaskError> {
        let admit = self.prepare(task)?;
        let rec = admit.write(self.store())?;
        self.queued(rec)
    }

    /// Checks what the agent itself decides on (its projects, whether it is reachable) and makes the task's
    /// record, and for a grantee its audit entry, ready to write.
    fn prepare(&mut self, task: NewTask) -> Result<Admit, TaskError> {
        let agent = task.agent;
        let files = !task.files.is_empty();
        self.check_fit(
            &agent,
            task.role,
            &task.user,
            &task.project,
            &task.options,
            files,
        )?;
        if !self.live.contains_key(&agent.fingerprint) && !self.between_nodes(&agent, task.presence)
        {
            let seen = agent.last_seen.map_or("never connected".into(), |t| {
                format!("last seen {} ago", human_duration(now().saturating_sub(t)))
            });
            return Err(TaskError::Offline {
                name: agent.name,
                seen,
            });
        }
        let t = now();
        // The id is checked for uniqueness, and the order taken, as the task is written (see `Admit::write`).
        let id = task_id();
        let rec = TaskRecord {
            spec: TaskSpec {
                task: id.clone(),
                project: task.project,
                prompt: task.prompt,
                requester: Requester {
                    user: task.user,
                    name: task.name,
                    role: task.role,
                },
                options: task.options,
                resume: task.resume,
            },
            agent: agent.fingerprint,
            state: TaskState::Queued,
            created_at: t,
            updated_at: t,
            last_seq: 0,
            session_id: None,
            message: None,
            dispatched_at: None,
            follows: task.follows,
            order: 0,
            output_bytes: 0,
            output_truncated: false,
            worktree: None,
            files: task.files.len() as u32,
        };
        let limits = TaskLimits {
            open_per_user: self.config().max_tasks_per_user,
            running_per_agent: self.config().max_running_per_agent,
            queued_per_agent: self.config().max_queued_per_agent,
        };
        // A grantee's task and its audit entry are written together: the owner must be able to see every task
        // someone else ran on their machine, so without the entry there is no task.
        let entry = (rec.spec.requester.role != Role::Owner).then(|| {
            let user = &rec.spec.requester.user;
            let caller = Caller {
                user,
                operator: task.operator,
            };
            let who = match &rec.spec.requester.name {
                Some(name) => format!("user {user} ({name})"),
                None => format!("user {user}"),
            };
            let what = if rec.follows.is_some() {
                "continued a task"
            } else {
                "started a task"
            };
            let prompt = preview(&rec.spec.prompt);
            AuditEntry::new(
                AuditKind::GranteeTask {
                    requester: user.clone(),
                    project: rec.spec.project.clone(),
                    prompt: prompt.clone(),
                    follow_up: false,
                },
                caller.actor(),
                &agent.owner,
                format!(
                    "{who} {what} in {} on {}: \"{prompt}\"",
                    rec.spec.project, agent.name
                ),
            )
            .by(caller)
            .on(&agent)
            .task(&id)
        });
        Ok(Admit {
            rec,
            entry,
            limits,
            agent_name: agent.name,
            files: task.files,
        })
    }

    /// After the task was written: the queue moves (here, or on the node holding the agent).
    fn queued(&mut self, rec: TaskRecord) -> Result<TaskRecord, TaskError> {
        let id = rec.spec.task.clone();
        tracing::info!(task = %id, agent = %rec.agent, user = %rec.spec.requester.user, role = ?rec.spec.requester.role, "task queued");
        // The task is durable before the caller hears of it (and before the agent does: dispatching sends the
        // start only once the write is on disk). One flush covers both.
        self.must_be_durable();
        let here = self.live.contains_key(&rec.agent);
        self.dispatch_queued(&rec.agent)?;
        // Dispatching changes the record only when this node holds the agent; otherwise it is as written (a
        // read would be one more round trip on the core's thread for every submission in a cluster).
        match here {
            true => self.task(&id),
            false => Ok(rec),
        }
    }

    fn reply(
        &mut self,
        caller: Caller<'_>,
        id: &str,
        prompt: String,
        name: Option<String>,
        files: Vec<Attachment>,
    ) -> Result<ReplyOutcome, TaskError> {
        let user = caller.user;
        check_prompt(&prompt)?;
        let rec = self.task(id)?;
        self.may_act(user, &rec)?;
        let agent = self
            .store()
            .agent(&rec.agent)?
            .ok_or_else(|| TaskError::NoSuchTask(id.to_string()))?;
        if !rec.state.is_final() {
            if !rec.is_dispatched() {
                return Err(TaskError::NotStarted(id.to_string()));
            }
            // A grantee whose share was revoked or narrowed may not keep talking to the owner's machine; the
            // lock keeps a revocation from landing between this check and the send.
            let role = self.role_on(user, &agent.owner, &rec.spec.project)?;
            let preview = preview(&prompt);
            if !files.is_empty() {
                super::files::agent_takes_files(&agent)?;
                if !self.live.contains_key(&rec.agent) && self.held_elsewhere(&rec.agent).is_some()
                {
                    return Err(TaskError::FilesElsewhere(agent.name));
                }
            }
            let parts = ct_protocol::files::parts_of(id, &files);
            let input = RelayMessage::TaskInput {
                task: id.to_string(),
                prompt,
            };
            let sent = if role == Role::Owner {
                self.to_agent_with(&rec.agent, input, parts)
            } else {
                let entry = AuditEntry::new(
                    AuditKind::GranteeTask {
                        requester: user.to_string(),
                        project: rec.spec.project.clone(),
                        prompt: preview.clone(),
                        follow_up: true,
                    },
                    caller.actor(),
                    &agent.owner,
                    format!(
                        "user {user} sent a follow-up in {} on {}: \"{preview}\"",
                        rec.spec.project, agent.name
                    ),
                )
                .by(caller)
                .on(&agent)
                .task(id);
                self.to_agent_audited(&rec.agent, input, parts, &entry)?
            };
            if !sent {
                return Err(TaskError::Offline {
                    name: agent.name,
                    seen: "not connected now".into(),
                });
            }
            return Ok(ReplyOutcome::Sent(rec));
        }
        let Some(session) = rec.session_id.clone() else {
            return Err(TaskError::NoSession(id.to_string()));
        };
        if agent.revoked_at.is_some() {
            return Err(TaskError::Offline {
                name: agent.name,
                seen: "its key was revoked".into(),
            });
        }
        self.take_task_token(user, &Preread::default())?;
        let role = self.role_on(user, &agent.owner, &rec.spec.project)?;
        let new = self.enqueue(NewTask {
            presence: None,
            agent,
            user: user.to_string(),
            name: display_name(name),
            role,
            project: rec.spec.project,
            prompt,
            options: rec.spec.options,
            resume: Some(session),
            follows: Some(id.to_string()),
            operator: caller.operator,
            files,
        })?;
        Ok(ReplyOutcome::Resumed(new))
    }
}

/// A task to put into an agent's queue, once the requester's standing has been established.
struct NewTask {
    agent: AgentRecord,
    user: String,
    name: Option<String>,
    role: Role,
    project: String,
    prompt: String,
    options: TaskOptions,
    resume: Option<String>,
    follows: Option<String>,
    /// Whether the operator acts as `user` (for the audit log).
    operator: bool,
    /// Where the agent is held, read ahead (see [`Preread`]); `None`: not read yet.
    presence: Option<Option<Presence>>,
    /// Attached, already checked (see [`super::files`]).
    files: Vec<Attachment>,
}

/// A new task decided on, to be written: its id is checked and its order taken as it is, and the store
/// refuses it there if the person or the agent is at a limit, counting every node's tasks.
pub(crate) struct Admit {
    rec: TaskRecord,
    entry: Option<AuditEntry>,
    limits: TaskLimits,
    /// For messages.
    agent_name: String,
    /// Written just before the task, and deleted again if the task is not admitted.
    files: Vec<Attachment>,
}

impl Admit {
    /// Writes the task. Runs on the core's thread on a single relay, and on the blocking pool in a cluster
    /// (see [`Core::submit_task`]).
    fn write(mut self, store: &dyn Store) -> Result<TaskRecord, TaskError> {
        // About 40 bits per id: collisions are rare, but a reused id would merge two tasks' logs. The store
        // refuses a task whose id is taken (`Conflict`), and a task without files is then written again under
        // a new id: no read before the write, which on PostgreSQL is a round trip on every submission's way.
        // Files are written before their task (once it is, any node may dispatch it and must find them), and
        // under a taken id they would replace another task's: with files, the id is checked first.
        let admitted = loop {
            if !self.files.is_empty() {
                while store.task(&self.rec.spec.task)?.is_some() {
                    self.new_id();
                }
            }
            self.rec.order = store.next_order()?;
            if !self.files.is_empty() {
                store.put_task_files(&self.rec.spec.task, &self.files)?;
            }
            match store.admit_task(&self.rec, self.entry.as_ref(), &self.limits) {
                Err(StoreError::Conflict) if self.files.is_empty() => self.new_id(),
                admitted => break admitted,
            }
        };
        let id = &self.rec.spec.task;
        if !self.files.is_empty() && !matches!(admitted, Ok(Admission::Admitted(_))) {
            if let Err(e) = store.delete_task_files(id) {
                tracing::warn!(error = %e, task = %id, "could not delete the files of a task not admitted");
            }
        }
        match admitted? {
            Admission::Admitted(_) => Ok(self.rec),
            Admission::TooManyTasks { open } => Err(TaskError::TooManyTasks {
                open,
                max: self.limits.open_per_user,
            }),
            Admission::QueueFull { queued } => Err(TaskError::QueueFull {
                agent: self.agent_name,
                queued,
            }),
        }
    }

    /// Gives the task (and its audit entry) another id, when the one it had is taken.
    fn new_id(&mut self) {
        let id = task_id();
        if let Some(entry) = &mut self.entry {
            entry.task = Some(id.clone());
        }
        self.rec.spec.task = id;
    }
}

fn task_id() -> String {
    const ALPHABET: &[u8] = b"abcdefghjkmnpqrstuvwxyz23456789";
    let mut rng = rand::rngs::OsRng;
    let body: String = (0..8)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect();
    format!("t_{body}")
}

/// A display name, trimmed and shortened; it is only shown, never trusted.
fn display_name(name: Option<String>) -> Option<String> {
    let name: String = name?
        .chars()
        .filter(|c| !c.is_control())
        .take(MAX_DISPLAY_NAME)
        .collect();
    let name = name.trim();
    (!name.is_empty()).then(|| name.to_string())
}

/// "12 MiB", "3 KiB": for messages people read.
pub(crate) fn human_bytes(n: u64) -> String {
    match n {
        0..=1023 => format!("{n} bytes"),
        1024..=1_048_575 => format!("{} KiB", n / 1024),
        1_048_576..=1_073_741_823 => format!("{} MiB", n / 1_048_576),
        _ => format!("{:.1} GiB", n as f64 / 1_073_741_824.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sled::SledStore;

    /// A task whose id turns out to be taken is written under another, and the task that had the id is left
    /// as it was: the store's refusal is what catches the collision, with no read before the write.
    #[test]
    fn a_taken_id_is_replaced_and_the_task_that_has_it_is_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let first: TaskRecord = serde_json::from_value(serde_json::json!({
            "spec": {"task": "t_taken", "project": "p", "prompt": "first",
                     "requester": {"user": "1", "role": "owner"}},
            "agent": Fingerprint([1; 32]),
            "state": "queued", "created_at": 0, "updated_at": 0, "last_seq": 0,
        }))
        .unwrap();
        store.put_task(&first).unwrap();
        let mut second = first.clone();
        second.spec.prompt = "second".into();
        let admit = Admit {
            rec: second,
            entry: None,
            limits: TaskLimits {
                open_per_user: 10,
                running_per_agent: 1,
                queued_per_agent: 10,
            },
            agent_name: "a".into(),
            files: Vec::new(),
        };
        let written = admit.write(&store).unwrap();
        assert_ne!(written.spec.task, "t_taken");
        assert_eq!(store.task("t_taken").unwrap(), Some(first));
        let stored = store.task(&written.spec.task).unwrap().unwrap();
        assert_eq!(stored.spec.prompt, "second");
    }
}
