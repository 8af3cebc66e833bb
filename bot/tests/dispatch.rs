//! The bot's behaviour against the Discord simulator with a scripted backend: what the relay and agent
//! would do is played by [`Fake`], so each Discord-side rule is checked quickly and exactly — `/cc` on a
//! thread's session, Deny with a reason, AskUserQuestion menus, closed approvals, the progress edit rate,
//! failures shown in the thread, autocomplete, the channel restriction, and a thread found again after a
//! restart. (The real relay, agent and Claude Code are in `agent/tests/discord.rs`.)

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use ct_bot::backend::{
    AgentInfo, AuditEntry, BackendError, HistoryEntry, HistoryPage, HistoryQuery, Pairing,
    ProjectInfo, Result, ShareInfo, ShareLevel, TaskFeed, TaskInfo, TaskRequest, ThreadChain,
    ThreadMark,
};
use ct_bot::config::{BotConfig, Delivery};
use ct_bot::{Backend, Bot};
use ct_protocol::task::{Decision, FinalState, TaskEvent};
use ct_testkit::discord::{DiscordSim, InteractionRef, Opt, SimMessage, SimUser, SlashCommand};
use ct_testkit::eventually;
use serde_json::json;
use tokio::sync::broadcast;

const T: Duration = Duration::from_secs(10);

/// One scripted task: its record, its log, and its live channel.
pub(crate) struct FakeTask {
    pub(crate) info: TaskInfo,
    log: Vec<(u64, TaskEvent)>,
    live: broadcast::Sender<(u64, TaskEvent)>,
}

/// A backend that records what it is asked and lets the test play the agent.
#[derive(Default)]
pub(crate) struct Fake {
    owner: String,
    pub(crate) tasks: Mutex<HashMap<String, FakeTask>>,
    next: Mutex<u32>,
    pub(crate) submits: Mutex<Vec<TaskRequest>>,
    replies: Mutex<Vec<(String, String)>>,
    pub(crate) decisions: Mutex<Vec<(String, String, Decision)>>,
    pub(crate) cancels: Mutex<Vec<String>>,
    /// Who cancelled each task, as the relay's audit log keeps it.
    stopped: Mutex<HashMap<String, String>>,
    /// Times a task's stored events were read (`follow`): what a stranger must not make the relay do.
    follows: std::sync::atomic::AtomicUsize,
    /// The relay's store of thread marks, which outlives a bot.
    pub(crate) marks: Mutex<HashMap<String, ThreadMark>>,
    /// The Discord lease as a shared store keeps it: its holder and until when.
    pub(crate) lease: Mutex<Option<(String, std::time::Instant)>>,
    /// Times each node asked for the lease.
    pub(crate) lease_asks: Mutex<HashMap<String, usize>>,
    /// Nodes that cannot reach the store: their lease calls fail.
    pub(crate) cut_off: Mutex<std::collections::HashSet<String>>,
    /// Marks written while set are lost, as the writes of a node that died before they reached the store.
    pub(crate) marks_lost: std::sync::atomic::AtomicBool,
    /// While set, a decision closes its approval (as a fast agent reports it) before `decide` returns, and
    /// `decide` takes a while longer: a relay busy after the decision went out.
    pub(crate) close_on_decide: std::sync::atomic::AtomicBool,
    /// The projects `projects` lists.
    projects: Mutex<Vec<ProjectInfo>>,
    /// `/project remove` calls: (name, agent).
    removed: Mutex<Vec<(String, Option<String>)>>,
    /// The default agent set last, by user.
    defaults: Mutex<HashMap<String, String>>,
    /// Each task's thread, as the relay keeps it.
    task_threads: Mutex<HashMap<String, u64>>,
    /// Each thread's chain, as the relay keeps it.
    chains: Mutex<HashMap<u64, ThreadChain>>,
    /// AskUserQuestion answers given so far, by (task, approval), as the relay keeps them.
    answers: Mutex<HashMap<(String, String), BTreeMap<u8, String>>>,
    /// The bots a wake-up for the leader reaches, as a relay's cluster bus reaches every node's.
    pub(crate) woken: Mutex<Vec<ct_bot::Bot>>,
}

impl Fake {
    pub(crate) fn new(owner: &str) -> Arc<Self> {
        Arc::new(Self {
            owner: owner.into(),
            ..Self::default()
        })
    }

    pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        m.lock().unwrap()
    }

    fn create(&self, req: &TaskRequest, follows: Option<String>) -> TaskInfo {
        let mut n = Self::lock(&self.next);
        *n += 1;
        let info = TaskInfo {
            id: format!("t_fake{n}"),
            project: req.project.clone().unwrap_or_else(|| "app".into()),
            agent: "laptop".into(),
            requester: req.user.clone(),
            owner: self.owner.clone(),
            state: "running".into(),
            created_at: 0,
            session_id: Some(format!("session-{n}")),
            model: req.options.model.clone(),
            mode: req.options.permission_mode.clone(),
            follows,
            prompt: req.prompt.clone(),
        };
        Self::lock(&self.tasks).insert(
            info.id.clone(),
            FakeTask {
                info: info.clone(),
                log: Vec::new(),
                live: broadcast::channel(1024).0,
            },
        );
        info
    }

    /// The agent reports `event` for `task`.
    pub(crate) fn emit(&self, task: &str, event: TaskEvent) {
        let mut tasks = Self::lock(&self.tasks);
        let t = tasks.get_mut(task).expect("a known task");
        if let TaskEvent::Finished { state, .. } = &event {
            t.info.state = match state {
                FinalState::Done => "done",
                FinalState::Failed => "failed",
                FinalState::Cancelled => "cancelled",
            }
            .into();
        }
        let seq = t.log.len() as u64 + 1;
        t.log.push((seq, event.clone()));
        let _ = t.live.send((seq, event));
    }

    fn info(&self, task: &str) -> Result<TaskInfo> {
        Self::lock(&self.tasks)
            .get(task)
            .map(|t| t.info.clone())
            .ok_or_else(|| BackendError::Refused(format!("there is no task {task:?}")))
    }
}

#[async_trait]
impl Backend for Fake {
    async fn pairing_code(&self, _: &str) -> Result<Pairing> {
        Ok(Pairing {
            token: "tok".into(),
            expires_in: 600,
        })
    }
    async fn wait_paired(&self, _: &str, _: &Pairing) -> Result<Option<AgentInfo>> {
        Ok(None)
    }
    async fn agents(&self, user: &str) -> Result<Vec<AgentInfo>> {
        Ok((0..40)
            .map(|i| AgentInfo {
                name: format!("box{i:02}"),
                fingerprint: format!("fp{i}"),
                owner: user.into(),
                online: i % 2 == 0,
                since: Some(1_700_000_000),
                transport: None,
                version: None,
            })
            .collect())
    }
    async fn unregister(&self, _: &str, _: &str) -> Result<AgentInfo> {
        Err(BackendError::Refused("no".into()))
    }
    async fn add_project(&self, _: &str, _: &str, _: &str, _: Option<&str>) -> Result<ProjectInfo> {
        Err(BackendError::Refused("no".into()))
    }
    async fn projects(&self, _: &str) -> Result<Vec<ProjectInfo>> {
        Ok(Self::lock(&self.projects).clone())
    }
    async fn remove_project(&self, _: &str, name: &str, agent: Option<&str>) -> Result<()> {
        Self::lock(&self.removed).push((name.into(), agent.map(Into::into)));
        Ok(())
    }
    async fn set_default_agent(&self, user: &str, agent: &str) -> Result<AgentInfo> {
        Self::lock(&self.defaults).insert(user.into(), agent.into());
        Ok(AgentInfo {
            name: agent.into(),
            fingerprint: "fp".into(),
            owner: user.into(),
            online: true,
            since: None,
            transport: None,
            version: None,
        })
    }
    async fn default_agent(&self, user: &str) -> Result<Option<String>> {
        Ok(Self::lock(&self.defaults).get(user).cloned())
    }
    async fn task_thread(&self, task: &str) -> Result<Option<u64>> {
        Ok(Self::lock(&self.task_threads).get(task).copied())
    }
    async fn set_task_thread(&self, task: &str, thread: u64) -> Result<()> {
        Self::lock(&self.task_threads).insert(task.into(), thread);
        Ok(())
    }
    // As the relay does: the user's tasks and those on their agents, newest first, with their threads.
    async fn history(&self, user: &str, q: &HistoryQuery) -> Result<HistoryPage> {
        let mut all: Vec<TaskInfo> = Self::lock(&self.tasks)
            .values()
            .map(|t| t.info.clone())
            .filter(|t| (t.requester == user || t.owner == user) && q.matches(t))
            .collect();
        let n = |t: &TaskInfo| {
            t.id.trim_start_matches("t_fake")
                .parse::<u32>()
                .unwrap_or(0)
        };
        all.sort_by_key(|t| std::cmp::Reverse(n(t)));
        let threads = Self::lock(&self.task_threads).clone();
        Ok(HistoryPage {
            more: all.len() > q.skip + q.take,
            entries: all
                .into_iter()
                .skip(q.skip)
                .take(q.take)
                .map(|task| HistoryEntry {
                    thread: threads.get(&task.id).copied(),
                    task,
                })
                .collect(),
        })
    }
    async fn submit(&self, req: TaskRequest) -> Result<TaskInfo> {
        let info = self.create(&req, None);
        Self::lock(&self.submits).push(req);
        Ok(info)
    }
    async fn reply(&self, user: &str, task: &str, prompt: &str) -> Result<TaskInfo> {
        Self::lock(&self.replies).push((task.into(), prompt.into()));
        let cur = self.info(task)?;
        if cur.state == "running" {
            return Ok(cur);
        }
        let req = TaskRequest {
            user: user.into(),
            prompt: prompt.into(),
            project: Some(cur.project.clone()),
            target: None,
            agent: None,
            options: Default::default(),
            resume: cur.session_id.clone(),
            name: None,
            roles: Vec::new(),
        };
        Ok(self.create(&req, Some(task.into())))
    }
    async fn task(&self, user: &str, task: &str) -> Result<TaskInfo> {
        // As the relay does: someone else's task reads exactly like one that does not exist.
        self.info(task)
            .ok()
            .filter(|t| t.requester == user || t.owner == user)
            .ok_or_else(|| BackendError::Refused(format!("there is no task {task:?}")))
    }
    async fn tasks(&self, _: &str) -> Result<Vec<TaskInfo>> {
        Ok(Self::lock(&self.tasks)
            .values()
            .map(|t| t.info.clone())
            .collect())
    }
    async fn follow(&self, task: &str) -> Result<TaskFeed> {
        self.follows
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let tasks = Self::lock(&self.tasks);
        let t = tasks
            .get(task)
            .ok_or_else(|| BackendError::Refused("no such task".into()))?;
        Ok(TaskFeed {
            task: t.info.clone(),
            past: t.log.clone(),
            live: t.live.subscribe(),
        })
    }
    async fn cancel(&self, user: &str, task: &str) -> Result<()> {
        Self::lock(&self.cancels).push(task.into());
        Self::lock(&self.stopped).insert(task.into(), user.into());
        Ok(())
    }
    async fn stopped_by(&self, task: &TaskInfo) -> Result<Option<String>> {
        Ok(Self::lock(&self.stopped).get(&task.id).cloned())
    }
    async fn decide(&self, user: &str, task: &str, approval: &str, d: Decision) -> Result<()> {
        let outcome = match &d {
            Decision::AllowOnce { .. } => "allowed",
            Decision::Deny { .. } => "denied",
            _ => "allowed_for_session",
        };
        Self::lock(&self.decisions).push((user.into(), task.into(), d));
        if self
            .close_on_decide
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            self.emit(
                task,
                TaskEvent::ApprovalClosed {
                    approval: approval.into(),
                    outcome: outcome.into(),
                },
            );
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
        Ok(())
    }
    async fn approver(&self, _: &str) -> Result<String> {
        Ok(self.owner.clone())
    }
    async fn share(&self, _: &str, _: &str, _: Vec<String>, _: ShareLevel) -> Result<ShareInfo> {
        Err(BackendError::Refused("no".into()))
    }
    async fn unshare(&self, _: &str, _: &str) -> Result<()> {
        Ok(())
    }
    async fn shares(&self, _: &str) -> Result<Vec<ShareInfo>> {
        Ok(Vec::new())
    }
    async fn audit(&self, _: &str) -> Result<Vec<AuditEntry>> {
        Ok(Vec::new())
    }
    async fn mark_thread(&self, mark: &ThreadMark) -> Result<()> {
        if self.marks_lost.load(std::sync::atomic::Ordering::SeqCst) {
            return Ok(());
        }
        Self::lock(&self.marks).insert(mark.task.clone(), mark.clone());
        Ok(())
    }
    async fn forget_thread(&self, task: &str) -> Result<()> {
        Self::lock(&self.marks).remove(task);
        Ok(())
    }
    async fn thread_mark(&self, task: &str) -> Result<Option<ThreadMark>> {
        Ok(Self::lock(&self.marks).get(task).cloned())
    }
    async fn wake_leader(&self) {
        for bot in Self::lock(&self.woken).iter() {
            bot.scan_now();
        }
    }
    async fn set_thread_chain(&self, chain: &ThreadChain) -> Result<()> {
        Self::lock(&self.chains).insert(chain.thread, chain.clone());
        Ok(())
    }
    async fn thread_chain(&self, thread: u64) -> Result<Option<ThreadChain>> {
        Ok(Self::lock(&self.chains).get(&thread).cloned())
    }
    async fn add_answer(
        &self,
        task: &str,
        approval: &str,
        question: u8,
        answer: &str,
    ) -> Result<BTreeMap<u8, String>> {
        let mut all = Self::lock(&self.answers);
        let given = all.entry((task.into(), approval.into())).or_default();
        given.insert(question, answer.into());
        Ok(given.clone())
    }
    async fn thread_marks(&self) -> Result<Vec<(ThreadMark, TaskInfo)>> {
        let marks: Vec<ThreadMark> = Self::lock(&self.marks).values().cloned().collect();
        Ok(marks
            .into_iter()
            .filter_map(|m| Some((m.clone(), self.info(&m.task).ok()?)))
            .collect())
    }
    // As the relay's store does it: granted when free, expired, or already the holder's.
    async fn lease(&self, holder: &str, ttl: Duration) -> Result<bool> {
        *Self::lock(&self.lease_asks)
            .entry(holder.to_string())
            .or_default() += 1;
        if Self::lock(&self.cut_off).contains(holder) {
            return Err(BackendError::Internal(anyhow::anyhow!(
                "the store does not answer"
            )));
        }
        let now = std::time::Instant::now();
        let mut lease = Self::lock(&self.lease);
        match &*lease {
            Some((who, until)) if who != holder && *until > now => Ok(false),
            _ => {
                *lease = Some((holder.to_string(), now + ttl));
                Ok(true)
            }
        }
    }
    async fn release_lease(&self, holder: &str) -> Result<()> {
        let mut lease = Self::lock(&self.lease);
        if lease.as_ref().is_some_and(|(who, _)| who == holder) {
            *lease = None;
        }
        Ok(())
    }
}

struct World {
    sim: DiscordSim,
    fake: Arc<Fake>,
    bot: Bot,
    gateway: Option<ct_bot::gateway::GatewayHandle>,
    alice: SimUser,
}

async fn world_with(tweak: impl FnOnce(&DiscordSim, &mut BotConfig)) -> World {
    let sim = DiscordSim::start().await.unwrap();
    let alice = sim.user("alice");
    let fake = Fake::new(&alice.id);
    let mut config = BotConfig::gateway(sim.token());
    config.api_proxy = Some(sim.api_base());
    config.guild_id = Some(sim.guild_id().parse().unwrap());
    tweak(&sim, &mut config);
    let bot = Bot::new(config, fake.clone()).unwrap();
    let gateway = bot.connect().await.unwrap();
    sim.wait_identified(T).await.unwrap();
    sim.wait_for(|c| c.is("PUT", "/applications/*/guilds/*/commands"), T)
        .await
        .unwrap();
    World {
        sim,
        fake,
        bot,
        gateway,
        alice,
    }
}

async fn world() -> World {
    world_with(|_, _| {}).await
}

impl World {
    async fn stop(self) {
        let (sim, _, _) = self.stop_bot().await;
        sim.shutdown().await;
    }

    /// Stops the bot as a relay restart does, keeping Discord, the backend (the relay's store) and the user.
    async fn stop_bot(self) -> (DiscordSim, Arc<Fake>, SimUser) {
        if let Some(g) = self.gateway {
            g.shutdown().await;
        }
        self.bot.shutdown().await;
        (self.sim, self.fake, self.alice)
    }

    /// The message an interaction was answered with.
    async fn answer(&self, ix: &InteractionRef) -> SimMessage {
        self.sim
            .wait_until(T, |s| {
                let i = s.interaction(&ix.id)?;
                let m = s.message(i.original_message.as_deref()?)?;
                (m.flags & 128 == 0 && !m.content.is_empty()).then_some(m)
            })
            .await
            .unwrap()
    }

    /// `/task` in #general; returns (task, thread).
    /// `/task PROMPT private:PRIVATE` by alice: what she was told, and the thread it names.
    async fn task_private(&self, prompt: &str, private: bool) -> (String, String) {
        let ix = self
            .sim
            .send_slash(
                &self.sim.origin(&self.alice),
                &SlashCommand::new("task")
                    .opt(Opt::str("prompt", prompt))
                    .opt(Opt::bool("private", private)),
            )
            .unwrap();
        let said = self.answer(&ix).await.content;
        let thread = said
            .split("<#")
            .nth(1)
            .unwrap()
            .trim_end_matches('>')
            .to_string();
        (said, thread)
    }

    async fn task(&self, prompt: &str) -> (String, String) {
        let ix = self
            .sim
            .send_slash(
                &self.sim.origin(&self.alice),
                &SlashCommand::new("task").opt(Opt::str("prompt", prompt)),
            )
            .unwrap();
        let said = self.answer(&ix).await.content;
        let task = said.split('`').nth(1).unwrap().to_string();
        let start = said.find("<#").unwrap() + 2;
        let thread = said[start..said.len() - 1].to_string();
        (task, thread)
    }

    async fn find(
        &self,
        channel: &str,
        what: &str,
        pred: impl Fn(&SimMessage) -> bool,
    ) -> SimMessage {
        self.sim
            .wait_until(T, |s| s.messages(channel).into_iter().find(|m| pred(m)))
            .await
            .unwrap_or_else(|e| panic!("no {what}: {e:#}\n{:#?}", self.sim.messages(channel)))
    }

    /// The agent asks to run `rm -rf build`; returns the approval message once it is in the thread.
    async fn ask_bash(&self, task: &str, thread: &str, approval: &str) -> SimMessage {
        self.fake.emit(
            task,
            TaskEvent::ApprovalRequested {
                approval: approval.into(),
                tool: "Bash".into(),
                summary: "rm -rf build".into(),
                input: json!({"command": "rm -rf build"}),
                question: false,
                description: None,
                session: None,
                input_cut: false,
            },
        );
        let deny = format!("dn:{task}:{approval}");
        self.find(thread, "approval", |m| m.custom_ids().contains(&deny))
            .await
    }

    async fn summary(&self, thread: &str, n: usize) -> SimMessage {
        self.sim
            .wait_until(T, |s| {
                s.messages(thread)
                    .into_iter()
                    .filter(|m| m.embeds != json!([]))
                    .nth(n - 1)
            })
            .await
            .unwrap()
    }

    fn cc(&self, thread: &str, sub: &str, opts: Vec<Opt>) -> InteractionRef {
        self.sim
            .send_slash(
                &self.sim.origin_in(&self.alice, thread),
                &SlashCommand::new("cc").sub(sub, opts),
            )
            .unwrap()
    }
}

/// An AskUserQuestion with two questions ("Which DB?": Postgres or SQLite; "Tests?": yes or no).
pub(crate) fn two_questions(approval: &str) -> TaskEvent {
    TaskEvent::ApprovalRequested {
        approval: approval.into(),
        tool: "AskUserQuestion".into(),
        summary: String::new(),
        input: json!({"questions": [
            {"question": "Which DB?", "header": "DB", "options": [{"label": "Postgres"}, {"label": "SQLite"}]},
            {"question": "Tests?", "options": [{"label": "yes"}, {"label": "no"}]},
        ]}),
        question: true,
        description: None,
        session: None,
        input_cut: false,
    }
}

pub(crate) fn finished(state: FinalState, message: Option<&str>) -> TaskEvent {
    TaskEvent::Finished {
        state,
        message: message.map(Into::into),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cc_controls_the_threads_session() {
    let w = world().await;
    let (t1, thread) = w.task("first").await;
    w.fake.emit(&t1, finished(FinalState::Done, None));
    w.summary(&thread, 1).await;

    // /cc model: the next message resumes the same session on the new model (a new task, same thread).
    let said = w
        .answer(&w.cc(&thread, "model", vec![Opt::str("name", "opus")]))
        .await;
    assert!(said.content.contains("**opus**"), "{}", said.content);
    w.sim
        .send_message(&w.sim.origin_in(&w.alice, &thread), "go on")
        .unwrap();
    w.sim
        .wait_until(T, |_| {
            (Fake::lock(&w.fake.submits).len() == 2).then_some(())
        })
        .await
        .unwrap();
    let req = Fake::lock(&w.fake.submits)[1].clone();
    assert_eq!(req.options.model.as_deref(), Some("opus"));
    assert_eq!(
        req.resume.as_deref(),
        Some("session-1"),
        "the conversation continues"
    );
    assert_eq!(req.prompt, "go on");
    let t2 = "t_fake2";
    w.find(&thread, "t2's progress", |m| {
        m.custom_ids() == [format!("st:{t2}")]
    })
    .await;

    // /cc status: the session, model and cost so far, from the task's record and log.
    w.fake.emit(
        t2,
        TaskEvent::TurnFinished {
            is_error: false,
            subtype: "success".into(),
            text: None,
            cost_usd: Some(0.25),
            turns: Some(3),
            input_tokens: None,
            output_tokens: None,
            duration_ms: None,
        },
    );
    let said = w.answer(&w.cc(&thread, "status", vec![])).await;
    assert!(said.is_ephemeral());
    for part in [t2, "session-2", "opus", "$0.2500", "3 turns"] {
        assert!(said.content.contains(part), "{part} in {}", said.content);
    }

    // /cc compact while it runs: "/compact" into the running session.
    let said = w.answer(&w.cc(&thread, "compact", vec![])).await;
    assert!(said.content.contains("Compacting"), "{}", said.content);
    assert_eq!(
        Fake::lock(&w.fake.replies).last().unwrap(),
        &(t2.to_string(), "/compact".to_string())
    );

    // /cc clear: refused while running; after the end, the next message starts a fresh session.
    w.answer(&w.cc(&thread, "clear", vec![])).await;
    w.sim
        .send_message(&w.sim.origin_in(&w.alice, &thread), "too early")
        .unwrap();
    let refusal = w
        .find(&thread, "refusal", |m| m.content.contains("still running"))
        .await;
    assert!(refusal.content.contains(&format!("<@{}>", w.alice.id)));
    w.fake.emit(t2, finished(FinalState::Done, None));
    w.summary(&thread, 2).await;
    w.sim
        .send_message(&w.sim.origin_in(&w.alice, &thread), "start over")
        .unwrap();
    w.sim
        .wait_until(T, |_| {
            (Fake::lock(&w.fake.submits).len() == 3).then_some(())
        })
        .await
        .unwrap();
    let req = Fake::lock(&w.fake.submits)[2].clone();
    assert_eq!(req.resume, None, "a fresh session");
    assert_eq!(
        req.options.model.as_deref(),
        Some("opus"),
        "the thread keeps its model"
    );

    // /cc stop: cancels the thread's current task.
    w.answer(&w.cc(&thread, "stop", vec![])).await;
    assert_eq!(Fake::lock(&w.fake.cancels).last().unwrap(), "t_fake3");
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approvals_deny_with_a_reason_questions_and_closing() {
    let w = world().await;
    let (task, thread) = w.task("ask me").await;

    // Deny opens a modal; its reason goes to the agent.
    let msg = w.ask_bash(&task, &thread, "a1").await;
    let ix = w
        .sim
        .send_button(
            &w.sim.origin_in(&w.alice, &thread),
            &msg.id,
            &format!("dn:{task}:a1"),
        )
        .unwrap();
    let cb = w.sim.wait_callback(&ix, T).await.unwrap();
    assert_eq!(cb.body_type(), Some(9), "a modal: {}", cb.body);
    let ix = w
        .sim
        .send_modal_submit(
            &w.sim.origin_in(&w.alice, &thread),
            &format!("dr:{task}:a1"),
            &[("reason", "use a branch")],
        )
        .unwrap();
    assert!(w.answer(&ix).await.content.contains("Denied"));
    assert_eq!(
        Fake::lock(&w.fake.decisions)[0].2,
        Decision::Deny {
            reason: "use a branch".into()
        }
    );
    w.fake.emit(
        &task,
        TaskEvent::ApprovalClosed {
            approval: "a1".into(),
            outcome: "denied".into(),
        },
    );
    let closed = w
        .find(&thread, "closed approval", |m| {
            m.id == msg.id && m.content.contains("🚫 Denied")
        })
        .await;
    assert!(closed.content.contains(&format!("by <@{}>", w.alice.id)));
    assert!(closed.components.to_string().contains("\"disabled\":true"));

    // AskUserQuestion: a select per question; the answers go once both have one.
    w.fake.emit(&task, two_questions("q1"));
    let q = w
        .find(&thread, "question", |m| {
            m.custom_ids().contains(&format!("qa:0:{task}:q1"))
        })
        .await;
    let origin = w.sim.origin_in(&w.alice, &thread);
    let ix = w
        .sim
        .send_select(&origin, &q.id, &format!("qa:0:{task}:q1"), &["1"])
        .unwrap();
    let said = w.answer(&ix).await.content;
    assert!(said.contains("other questions"), "{said}");
    let ix = w
        .sim
        .send_select(&origin, &q.id, &format!("qa:1:{task}:q1"), &["0"])
        .unwrap();
    assert!(w.answer(&ix).await.content.contains("sent"));
    assert_eq!(
        Fake::lock(&w.fake.decisions)[1].2,
        Decision::Answers {
            answers: json!({"Which DB?": "SQLite", "Tests?": "yes"})
        }
    );

    // /approve is the fallback for buttons: it answers the thread's open approval.
    w.fake.emit(
        &task,
        TaskEvent::ApprovalClosed {
            approval: "q1".into(),
            outcome: "answered".into(),
        },
    );
    w.fake.emit(
        &task,
        TaskEvent::ApprovalRequested {
            approval: "a3".into(),
            tool: "Edit".into(),
            summary: "src/lib.rs".into(),
            input: json!({}),
            question: false,
            description: None,
            session: None,
            input_cut: false,
        },
    );
    w.find(&thread, "a3", |m| {
        m.custom_ids().contains(&format!("ao:{task}:a3"))
    })
    .await;
    let ix = w
        .sim
        .send_slash(
            &w.sim.origin_in(&w.alice, &thread),
            &SlashCommand::new("approve").opt(Opt::str("option", "session")),
        )
        .unwrap();
    assert!(w
        .answer(&ix)
        .await
        .content
        .contains("Allowed for this session"));
    assert_eq!(
        Fake::lock(&w.fake.decisions)[2],
        (w.alice.id.clone(), task.clone(), Decision::AllowSession)
    );
    w.fake.emit(
        &task,
        TaskEvent::ApprovalClosed {
            approval: "a3".into(),
            outcome: "allowed_for_session".into(),
        },
    );

    // An approval still open when the task ends is disabled too; the failure shows in progress and summary.
    w.fake.emit(
        &task,
        TaskEvent::ApprovalRequested {
            approval: "a2".into(),
            tool: "Write".into(),
            summary: "x".into(),
            input: json!({}),
            question: false,
            description: None,
            session: None,
            input_cut: false,
        },
    );
    let open = w
        .find(&thread, "last approval", |m| {
            m.custom_ids().contains(&format!("ao:{task}:a2"))
        })
        .await;
    let why = "Claude Code is not logged in on laptop: run `claude login` there";
    w.fake.emit(&task, finished(FinalState::Failed, Some(why)));
    let summary = w.summary(&thread, 1).await;
    assert_eq!(summary.embeds[0]["description"], why);
    let progress = &w.sim.messages(&thread)[0];
    assert!(
        progress.content.starts_with("❌ **Failed**") && progress.content.ends_with(why),
        "{}",
        progress.content
    );
    let open = w.sim.message(&open.id).unwrap();
    assert!(
        open.components.to_string().contains("\"disabled\":true"),
        "{}",
        open.content
    );
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_is_edited_at_most_about_once_a_second() {
    let w = world().await;
    let (task, thread) = w.task("busy").await;
    let progress = w
        .find(&thread, "progress", |m| {
            m.custom_ids() == [format!("st:{task}")]
        })
        .await;
    // A burst of tool activity over ~2.5 s.
    for i in 0..50 {
        w.fake.emit(
            &task,
            TaskEvent::Tool {
                name: "Read".into(),
                summary: format!("src/file{i}.rs"),
                auto_allowed: None,
                id: None,
                command: None,
            },
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    w.fake.emit(&task, finished(FinalState::Done, None));
    w.summary(&thread, 1).await;
    let edits = w.sim.calls_to(
        "PATCH",
        &format!("/channels/{thread}/messages/{}", progress.id),
    );
    assert!(
        edits.len() >= 2 && edits.len() <= 5,
        "{} edits",
        edits.len()
    );
    // Every edit but the final one (never held back) waits out the interval after the one before.
    for pair in edits[..edits.len() - 1].windows(2) {
        let gap = pair[1].at - pair[0].at;
        assert!(gap >= Duration::from_millis(1000), "edits {gap:?} apart");
    }
    let last = w.sim.message(&progress.id).unwrap();
    assert!(
        last.content.contains("file49.rs") && last.content.contains("50 tools"),
        "{}",
        last.content
    );
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_configured_channels_and_autocomplete_within_limits() {
    let w = world_with(|sim, config| {
        let other = sim.add_channel("bots");
        config.channel_ids = vec![other.parse().unwrap()];
    })
    .await;
    let ix = w
        .sim
        .send_slash(
            &w.sim.origin(&w.alice),
            &SlashCommand::new("task").opt(Opt::str("prompt", "x")),
        )
        .unwrap();
    let said = w.answer(&ix).await;
    assert!(
        said.is_ephemeral() && said.content.starts_with("I only work in <#"),
        "{}",
        said.content
    );
    assert!(
        Fake::lock(&w.fake.submits).is_empty(),
        "nothing was started"
    );

    // Autocomplete: at most 25 choices, filtered by what was typed.
    let ix = w
        .sim
        .send_autocomplete(
            &w.sim.origin(&w.alice),
            &SlashCommand::new("task")
                .opt(Opt::str("prompt", "x"))
                .opt(Opt::focused("agent", "box")),
        )
        .unwrap();
    let cb = w.sim.wait_callback(&ix, T).await.unwrap();
    assert_eq!(
        (cb.status, cb.body_type()),
        (204, Some(8)),
        "{}",
        cb.response
    );
    assert_eq!(cb.body["data"]["choices"].as_array().unwrap().len(), 25);
    let ix = w
        .sim
        .send_autocomplete(
            &w.sim.origin(&w.alice),
            &SlashCommand::new("task")
                .opt(Opt::str("prompt", "x"))
                .opt(Opt::focused("agent", "box07")),
        )
        .unwrap();
    let cb = w.sim.wait_callback(&ix, T).await.unwrap();
    assert_eq!(
        cb.body["data"]["choices"],
        json!([{"name": "box07 (offline)", "value": "box07"}])
    );
    w.stop().await;
}

/// A bot for the HTTP-interactions endpoint on `sim`, as a restarted relay makes one: interactions are
/// called directly, so there is no gateway session to wait for.
fn http_bot(sim: &DiscordSim, fake: &Arc<Fake>) -> Bot {
    let mut config = BotConfig::gateway(sim.token());
    config.api_proxy = Some(sim.api_base());
    config.delivery = Delivery::Http {
        public_key: sim.signer().public_key_hex(),
    };
    config.application_id = Some(sim.application_id().parse().unwrap());
    Bot::new(config, fake.clone()).unwrap()
}

/// The agent may report an approval closed before the decision's call returns to the bot (a fast agent, a
/// busy relay): the closed message still says who decided and which rule they chose.
#[tokio::test]
async fn an_approval_closed_before_the_decision_call_returns_still_says_who_and_what() {
    let w = world().await;
    w.fake
        .close_on_decide
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let (task, thread) = w.task("ask me").await;
    w.fake.emit(
        &task,
        TaskEvent::ApprovalRequested {
            approval: "a1".into(),
            tool: "Bash".into(),
            summary: "cargo test".into(),
            input: json!({"command": "cargo test"}),
            question: false,
            description: None,
            session: Some(ct_protocol::scope::SessionScope::Command {
                command: "cargo test".into(),
            }),
            input_cut: false,
        },
    );
    let allow = format!("as:{task}:a1");
    let msg = w
        .find(&thread, "approval", |m| m.custom_ids().contains(&allow))
        .await;
    w.sim
        .send_button(&w.sim.origin_in(&w.alice, &thread), &msg.id, &allow)
        .unwrap();
    let closed = w
        .find(&thread, "closed approval", |m| {
            m.id == msg.id && m.content.contains("✅ Allowed for this session")
        })
        .await;
    assert!(
        closed.content.contains(&format!("by <@{}>", w.alice.id))
            && closed.content.contains("this command"),
        "{}",
        closed.content
    );
}

/// An approval is waiting when the relay restarts: its message is found again, so a click on it after the
/// restart is credited to who clicked, and when it closes its buttons are disabled in place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approval_open_across_a_restart_is_closed_in_place() {
    let w = world().await;
    let (task, thread) = w.task("ask me").await;
    let asked = w.ask_bash(&task, &thread, "a1").await;
    eventually(T, || {
        Fake::lock(&w.fake.marks)
            .get(&task)
            .is_some_and(|m| m.approvals.get("a1") == Some(&asked.id.parse::<u64>().unwrap()))
    })
    .await;

    let (sim, fake, alice) = w.stop_bot().await;
    let mut config = BotConfig::gateway(sim.token());
    config.api_proxy = Some(sim.api_base());
    let bot = Bot::new(config, fake.clone()).unwrap();
    let gateway = bot.connect().await.unwrap().expect("a gateway bot");
    sim.wait_identified(T).await.unwrap();
    sim.wait_until(T, |s| {
        s.messages(&thread)
            .into_iter()
            .find(|m| m.content.contains("relay restarted"))
    })
    .await
    .unwrap();
    // The same message's buttons, clicked after the restart: the click is credited to who made it.
    let ix = sim
        .send_button(
            &sim.origin_in(&alice, &thread),
            &asked.id,
            &format!("ao:{task}:a1"),
        )
        .unwrap();
    sim.wait_callback(&ix, T).await.unwrap();
    fake.emit(
        &task,
        TaskEvent::ApprovalClosed {
            approval: "a1".into(),
            outcome: "allowed".into(),
        },
    );
    let closed = sim
        .wait_until(T, |s| {
            s.messages(&thread)
                .into_iter()
                .find(|m| m.id == asked.id && m.content.contains("Allowed once"))
        })
        .await
        .unwrap();
    assert!(
        closed.components.to_string().contains("\"disabled\":true"),
        "buttons disabled in place: {closed:#?}"
    );
    assert!(
        closed.content.contains(&format!("by <@{}>", alice.id)),
        "{}",
        closed.content
    );
    eventually(T, || {
        Fake::lock(&fake.marks)
            .get(&task)
            .is_some_and(|m| m.approvals.is_empty())
    })
    .await;
    gateway.shutdown().await;
    bot.shutdown().await;
}

/// The relay restarts while a task runs on the agent: the new bot carries on in the same thread by itself,
/// editing the same progress message, posting what arrived while it was down and what comes after, each
/// once; a task whose summary was already posted is left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_relay_carries_on_in_the_thread_by_itself() {
    let w = world().await;
    let (done, done_thread) = w.task("short job").await;
    w.fake.emit(&done, finished(FinalState::Done, None));
    w.summary(&done_thread, 1).await;
    let (task, thread) = w.task("long job").await;
    w.fake.emit(
        &task,
        TaskEvent::Text {
            text: "before the restart".into(),
        },
    );
    w.find(&thread, "the first output", |m| {
        m.content == "before the restart"
    })
    .await;
    // The mark of the first output (the backend's own state: the simulator does not see it).
    eventually(T, || {
        Fake::lock(&w.fake.marks)
            .get(&task)
            .is_some_and(|m| m.posted >= 1 && m.progress.is_some())
    })
    .await;
    assert!(
        !Fake::lock(&w.fake.marks).contains_key(&done),
        "a finished follower leaves no mark"
    );

    let (sim, fake, _) = w.stop_bot().await;
    // While the relay is down the agent keeps the task running; its output is stored when it reconnects.
    fake.emit(
        &task,
        TaskEvent::Text {
            text: "while the relay was down".into(),
        },
    );

    let bot = http_bot(&sim, &fake);
    assert!(bot.connect().await.unwrap().is_none());
    let notice = sim
        .wait_until(T, |s| {
            s.messages(&thread)
                .into_iter()
                .find(|m| m.content.contains("relay restarted"))
        })
        .await
        .unwrap();
    fake.emit(
        &task,
        TaskEvent::Text {
            text: "after the restart".into(),
        },
    );
    fake.emit(&task, finished(FinalState::Done, None));
    sim.wait_until(T, |s| {
        s.messages(&thread)
            .into_iter()
            .find(|m| m.embeds != json!([]))
    })
    .await
    .unwrap();

    let messages = sim.messages(&thread);
    let count = |text: &str| messages.iter().filter(|m| m.content == text).count();
    assert_eq!(count("before the restart"), 1, "{messages:#?}");
    assert_eq!(count("while the relay was down"), 1, "{messages:#?}");
    assert_eq!(count("after the restart"), 1, "{messages:#?}");
    let progress: Vec<_> = messages
        .iter()
        .filter(|m| m.custom_ids() == [format!("st:{task}")])
        .collect();
    assert_eq!(
        progress.len(),
        1,
        "one progress message, edited: {messages:#?}"
    );
    assert!(
        progress[0]
            .components
            .to_string()
            .contains("\"disabled\":true"),
        "the first progress message was edited to the end: {:#?}",
        progress[0]
    );
    let position = |text: &str| messages.iter().position(|m| m.content == text).unwrap();
    let notice_at = messages.iter().position(|m| m.id == notice.id).unwrap();
    assert!(
        position("before the restart") < notice_at
            && notice_at < position("while the relay was down"),
        "the notice sits where the restart happened: {messages:#?}"
    );
    assert_eq!(
        messages.iter().filter(|m| m.embeds != json!([])).count(),
        1,
        "one summary: {messages:#?}"
    );
    assert!(
        sim.messages(&done_thread)
            .iter()
            .all(|m| !m.content.contains("relay restarted")),
        "the finished task's thread is left alone"
    );
    // The finished follower forgets its mark.
    eventually(T, || Fake::lock(&fake.marks).is_empty()).await;
    bot.shutdown().await;
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_bot_finds_the_threads_task_from_its_name() {
    let w = world().await;
    let (t1, thread) = w.task("first").await;
    w.fake.emit(&t1, finished(FinalState::Done, None));
    w.summary(&thread, 1).await;
    // A follow-up chain t1 → t2, then the bot restarts (its memory of threads is gone).
    w.sim
        .send_message(&w.sim.origin_in(&w.alice, &thread), "second")
        .unwrap();
    w.find(&thread, "t2's progress", |m| {
        m.custom_ids() == ["st:t_fake2".to_string()]
    })
    .await;
    w.fake.emit("t_fake2", finished(FinalState::Done, None));
    w.summary(&thread, 2).await;
    let (sim, fake, alice) = w.stop_bot().await;
    let bot = http_bot(&sim, &fake);
    let p = sim
        .prepare_slash(
            &sim.origin_in(&alice, &thread),
            &SlashCommand::new("reply").opt(Opt::str("prompt", "third")),
        )
        .unwrap();
    let body = serde_json::to_vec(&p.json).unwrap();
    let mut headers = http::HeaderMap::new();
    for (k, v) in sim.signer().headers(&body) {
        headers.insert(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    let (status, reply) = bot.handle_http(&headers, &body).await;
    assert_eq!(status, 200, "{reply}");
    assert!(
        reply["data"]["content"]
            .as_str()
            .unwrap()
            .contains("t_fake3"),
        "{reply}"
    );
    assert_eq!(
        Fake::lock(&fake.replies)[1],
        ("t_fake2".to_string(), "third".to_string()),
        "the follow-up went to the newest task of the thread's chain"
    );
    bot.shutdown().await;
    sim.shutdown().await;
}

#[tokio::test]
async fn a_strangers_approve_is_refused_before_the_tasks_events_are_read() {
    use std::sync::atomic::Ordering::SeqCst;
    let w = world().await;
    let (task, _thread) = w.task("fix the bug").await;
    // The thread's follower reads the log once; after that, only a command would.
    eventually(T, || w.fake.follows.load(SeqCst) >= 1).await;
    let read = w.fake.follows.load(SeqCst);
    let mallory = w.sim.user("mallory");
    let mut answers = Vec::new();
    for id in [task.as_str(), "t_nosuchtask"] {
        let ix = w
            .sim
            .send_slash(
                &w.sim.origin(&mallory),
                &SlashCommand::new("approve").opt(Opt::str("task_id", id)),
            )
            .unwrap();
        answers.push(w.answer(&ix).await.content.replace(id, "<id>"));
    }
    assert_eq!(
        w.fake.follows.load(SeqCst),
        read,
        "a stranger's /approve made the relay read the task's events"
    );
    assert_eq!(
        answers[0], answers[1],
        "someone's task and no task must read alike"
    );
    assert!(Fake::lock(&w.fake.decisions).is_empty());
    w.stop().await;
}

/// Where a recorded call carries a message, the `allowed_mentions` it sent (`Null` when it sent none).
fn allowed_mentions_of(c: &ct_testkit::discord::Call) -> Option<serde_json::Value> {
    let parts: Vec<&str> = c.path.trim_start_matches('/').split('/').collect();
    let message = match parts.as_slice() {
        ["channels", _, "messages"] | ["channels", _, "messages", _] => &c.body,
        ["webhooks", ..] => &c.body,
        ["interactions", _, _, "callback"] if [4, 7].contains(&c.body["type"].as_u64()?) => {
            &c.body["data"]
        }
        _ => return None,
    };
    (c.method == "POST" || c.method == "PATCH").then(|| message["allowed_mentions"].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_or_output_saying_everyone_pings_nobody() {
    let w = world().await;
    let ping = "@everyone @here <@&4242> <@9999>";
    let (task, thread) = w.task(&format!("look {ping}")).await;
    w.fake.emit(
        &task,
        TaskEvent::Text {
            text: format!("done {ping}"),
        },
    );
    w.fake.emit(&task, finished(FinalState::Done, None));
    w.summary(&thread, 1).await;
    let calls = w.sim.calls();
    let posted: Vec<_> = calls
        .iter()
        .filter_map(|c| Some((c, allowed_mentions_of(c)?)))
        .collect();
    assert!(
        posted
            .iter()
            .any(|(c, _)| c.body.to_string().contains("done @everyone")),
        "the output was posted"
    );
    for (c, allowed) in &posted {
        assert_eq!(
            allowed["parse"],
            json!([]),
            "{} {} may ping by kind: {allowed}",
            c.method,
            c.path
        );
        assert!(
            allowed["roles"].as_array().is_none_or(Vec::is_empty),
            "{} {} may ping roles: {allowed}",
            c.method,
            c.path
        );
        let users = allowed["users"].as_array().cloned().unwrap_or_default();
        assert!(
            users.iter().all(|u| u == &json!(w.alice.id)),
            "{} {} may ping someone other than the requester: {allowed}",
            c.method,
            c.path
        );
    }
    w.stop().await;
}

/// A long Bash command: the approval says it was cut and attaches the whole input; where even that is over the
/// server's upload limit, the thread says so instead of leaving "attached" unexplained.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_approval_attaches_its_input_or_says_why_it_could_not() {
    let w = world().await;
    w.sim.set_attachment_size_limit(4000);
    let (task, thread) = w.task("long commands").await;
    let ask = |approval: &str, command: &str| {
        let input = json!({ "command": command, "description": "npm test" });
        w.fake.emit(
            &task,
            TaskEvent::ApprovalRequested {
                approval: approval.into(),
                tool: "Bash".into(),
                summary: command.into(),
                session: ct_protocol::scope::SessionScope::exact("Bash", &input),
                input,
                question: false,
                description: Some("npm test".into()),
                input_cut: false,
            },
        );
    };
    ask("a1", &format!("echo {} ; curl x|sh", "a".repeat(2000)));
    let fits = w
        .find(&thread, "the first approval", |m| {
            m.custom_ids().contains(&format!("ao:{task}:a1"))
        })
        .await;
    assert!(fits.content.contains("Cut to fit"), "{}", fits.content);
    assert_eq!(fits.attachments.len(), 1, "{fits:?}");
    assert!(fits.attachments[0].size > 2000, "{fits:?}");

    ask("a2", &format!("echo {} ; curl x|sh", "b".repeat(5000)));
    let over = w
        .find(&thread, "the second approval", |m| {
            m.custom_ids().contains(&format!("ao:{task}:a2"))
        })
        .await;
    assert!(over.attachments.is_empty(), "{over:?}");
    w.find(&thread, "the warning", |m| {
        m.content.contains("over this server's upload limit")
    })
    .await;
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_private_threads_a_task_is_seen_only_by_its_people() {
    let w = world_with(|_, config| config.private_threads = true).await;
    // Bob runs a task on Alice's agent (she shared it): both must be in the thread, nobody else.
    let bob = w.sim.user("bob");
    let secret = "rotate the keys of project nightingale";
    let ix = w
        .sim
        .send_slash(
            &w.sim.origin(&bob),
            &SlashCommand::new("task").opt(Opt::str("prompt", secret)),
        )
        .unwrap();
    let said = w.answer(&ix).await.content;
    let thread = said
        .split("<#")
        .nth(1)
        .unwrap()
        .trim_end_matches('>')
        .to_string();

    let created = w
        .sim
        .calls_to("POST", &format!("/channels/{}/threads", w.sim.channel_id()));
    assert_eq!(
        created.len(),
        1,
        "one thread, not started from a channel message"
    );
    assert_eq!(created[0].body["type"], json!(12), "{}", created[0].body);
    assert_eq!(created[0].body["invitable"], json!(false));
    assert_eq!(w.sim.channel(&thread).unwrap().kind, 12);
    let mut added: Vec<String> = w
        .sim
        .calls()
        .iter()
        .filter(|c| c.method == "PUT" && c.status == 204)
        .filter_map(|c| {
            c.path
                .strip_prefix(&format!("/channels/{thread}/thread-members/"))
                .map(str::to_string)
        })
        .collect();
    added.sort();
    let mut people = vec![bob.id.clone(), w.alice.id.clone()];
    people.sort();
    assert_eq!(
        added, people,
        "the requester and the agent's owner are added"
    );

    // The prompt is in the thread, and nowhere in the channel.
    w.sim
        .wait_until(T, |s| {
            s.messages(&thread)
                .iter()
                .any(|m| m.content.contains(secret))
                .then_some(())
        })
        .await
        .unwrap();
    assert!(
        w.sim
            .messages(w.sim.channel_id())
            .iter()
            .all(|m| !m.content.contains("nightingale")),
        "the channel shows the private task's prompt"
    );
    w.stop().await;
}

/// An agent that did not scope its session rules would not understand a prefix: a prefix form submitted for
/// its approval (Discord never showed one) is refused, and nothing is decided.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefix_is_never_sent_for_an_older_agents_approval() {
    let w = world().await;
    let (task, thread) = w.task("old agent").await;
    let approval = w.ask_bash(&task, &thread, "a1").await;
    assert!(
        approval
            .content
            .contains("Allow for session: every `Bash` use"),
        "{}",
        approval.content
    );
    assert!(
        !approval
            .custom_ids()
            .iter()
            .any(|c| c.starts_with("ap:") || c.starts_with("aw:")),
        "{:?}",
        approval.custom_ids()
    );
    let ix = w
        .sim
        .send_modal_submit(
            &w.sim.origin_in(&w.alice, &thread),
            &format!("pp:{task}:a1"),
            &[("prefix", "rm")],
        )
        .unwrap();
    assert!(w.answer(&ix).await.content.contains("no longer open here"));
    assert!(Fake::lock(&w.fake.decisions).is_empty());
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_can_be_more_private_than_the_servers_setting_never_less() {
    let w = world().await;
    let (said, thread) = w.task_private("quietly fix it", true).await;
    assert_eq!(w.sim.channel(&thread).unwrap().kind, 12, "{said}");
    assert!(w
        .sim
        .messages(w.sim.channel_id())
        .iter()
        .all(|m| !m.content.contains("quietly")));
    // Without the option, the server's default: public, started from a message in the channel.
    let (_, public) = w.task("loudly fix it").await;
    assert_eq!(w.sim.channel(&public).unwrap().kind, 11);
    w.stop().await;

    // Where the server says private, a task cannot ask to be public.
    let w = world_with(|_, config| config.private_threads = true).await;
    let (said, thread) = w.task_private("publish it", false).await;
    assert_eq!(w.sim.channel(&thread).unwrap().kind, 12, "{said}");
    w.stop().await;
}

/// The follow-ups of an interaction so far, in order.
fn followups(sim: &DiscordSim, ix: &InteractionRef) -> Vec<SimMessage> {
    sim.interaction(&ix.id)
        .map(|i| {
            i.followups
                .iter()
                .filter_map(|id| sim.message(id))
                .collect()
        })
        .unwrap_or_default()
}

/// Waits for at least `n` follow-ups of `ix`.
async fn wait_followups(sim: &DiscordSim, ix: &InteractionRef, n: usize) -> Vec<SimMessage> {
    sim.wait_until(T, |s| {
        let f = followups(s, ix);
        (f.len() >= n).then_some(f)
    })
    .await
    .unwrap_or_else(|e| panic!("no follow-ups for {}: {e:#}", ix.id))
}

impl World {
    fn status(&self, user: &SimUser, channel: &str, task: Option<&str>) -> InteractionRef {
        let mut cmd = SlashCommand::new("status");
        if let Some(t) = task {
            cmd = cmd.opt(Opt::str("task_id", t));
        }
        self.sim
            .send_slash(&self.sim.origin_in(user, channel), &cmd)
            .unwrap()
    }
}

/// Issue 16, item 2: `/status` (and "Full output" under the summary) gives the requester the whole
/// conversation, privately, with nobody pinged and Claude's open code block closed; in the task's own thread
/// it answers for everyone there; a stranger cannot tell someone's task from no task, and makes the relay
/// read nothing of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_gives_the_whole_output_to_its_people_and_nothing_to_others() {
    use std::sync::atomic::Ordering::SeqCst;
    let w = world().await;
    let general = w.sim.channel_id().to_string();
    let (task, thread) = w.task("fix the bug").await;
    w.fake.emit(
        &task,
        TaskEvent::Text {
            text: "Looking at @everyone's code <@9999>:\n```rust\nfn main() {".into(),
        },
    );
    w.fake.emit(
        &task,
        TaskEvent::Tool {
            name: "Bash".into(),
            summary: "cargo test".into(),
            auto_allowed: None,
            id: None,
            command: None,
        },
    );
    // As an older agent sends it: a preview only.
    w.fake.emit(
        &task,
        TaskEvent::ToolResult {
            is_error: false,
            summary: "12 passed".into(),
            tool_use_id: None,
            output: None,
            output_bytes: None,
            exit_code: None,
            diff: None,
            diff_cut: false,
        },
    );
    // As a newer agent sends it to a relay that shows tool output: whole, with the exit status or the diff.
    for (name, command) in [("Bash", Some("ls -1")), ("Edit", None)] {
        w.fake.emit(
            &task,
            TaskEvent::Tool {
                name: name.into(),
                summary: command.unwrap_or("src/a.rs").into(),
                auto_allowed: None,
                id: Some(format!("toolu_{name}")),
                command: command.map(Into::into),
            },
        );
    }
    w.fake.emit(
        &task,
        TaskEvent::ToolResult {
            is_error: false,
            summary: "a.txt".into(),
            tool_use_id: Some("toolu_Bash".into()),
            output: Some("a.txt\nb.txt\n".into()),
            output_bytes: None,
            exit_code: Some(0),
            diff: None,
            diff_cut: false,
        },
    );
    w.fake.emit(
        &task,
        TaskEvent::ToolResult {
            is_error: false,
            summary: "updated".into(),
            tool_use_id: Some("toolu_Edit".into()),
            output: Some("The file src/a.rs has been updated.".into()),
            output_bytes: None,
            exit_code: None,
            diff: Some("--- a/src/a.rs\n+++ b/src/a.rs\n@@ -1 +1 @@\n-old\n+new\n".into()),
            diff_cut: false,
        },
    );
    w.fake.emit(&task, finished(FinalState::Done, None));
    let summary = w.summary(&thread, 1).await;
    assert!(
        summary.custom_ids().contains(&format!("fo:{task}")),
        "{:?}",
        summary.custom_ids()
    );

    // The requester, from the channel: the summary, then the conversation, all private.
    let ix = w.status(&w.alice, &general, Some(&task));
    let said = w.answer(&ix).await;
    assert!(said.is_ephemeral(), "{said:?}");
    assert!(
        said.embeds[0]["title"].as_str().unwrap().contains(&task),
        "{}",
        said.embeds
    );
    let whole = wait_followups(&w.sim, &ix, 1).await;
    let text: String = whole.iter().map(|m| m.content.as_str()).collect();
    for want in [
        "Looking at @everyone's code <@9999>:\n```rust\nfn main() {\n```",
        "🔧 **Bash** `cargo test`",
        "↳ `12 passed`",
        "🔧 **Bash** `ls -1`",
        "↳ exit 0\n```\na.txt\nb.txt\n```",
        "```diff\n--- a/src/a.rs\n+++ b/src/a.rs\n@@ -1 +1 @@\n-old\n+new\n```",
        "✅ Done.",
    ] {
        assert!(text.contains(want), "{want:?} missing from {text}");
    }
    assert!(whole.iter().all(SimMessage::is_ephemeral), "{whole:#?}");
    for c in w.sim.calls() {
        if c.path.contains(&ix.token) {
            if let Some(allowed) = allowed_mentions_of(&c) {
                assert_eq!(allowed["parse"], json!([]), "{} {}", c.method, c.path);
                assert!(allowed["users"].as_array().is_none_or(Vec::is_empty));
            }
        }
    }

    // The same in the task's own thread, named or not, is for everyone there.
    for named in [Some(task.as_str()), None] {
        let ix = w.status(&w.alice, &thread, named);
        let said = w.answer(&ix).await;
        assert!(!said.is_ephemeral(), "{named:?}: {said:?}");
        let f = wait_followups(&w.sim, &ix, 1).await;
        assert!(f.iter().all(|m| !m.is_ephemeral()));
        assert!(f.iter().any(|m| m.content.contains("cargo test")));
    }

    // "Full output" under the summary: the clicker's own copy.
    let ix = w
        .sim
        .send_button(
            &w.sim.origin_in(&w.alice, &thread),
            &summary.id,
            &format!("fo:{task}"),
        )
        .unwrap();
    let said = w.answer(&ix).await;
    assert!(said.is_ephemeral());
    let f = wait_followups(&w.sim, &ix, 1).await;
    assert!(f.iter().all(SimMessage::is_ephemeral));
    assert!(f.iter().any(|m| m.content.contains("cargo test")));

    // A stranger: someone's task and no task read alike, and nothing of the task is read for them.
    let read = w.fake.follows.load(SeqCst);
    let mallory = w.sim.user("mallory");
    let mut refusals = Vec::new();
    for id in [task.as_str(), "t_nosuchtask"] {
        let ix = w.status(&mallory, &general, Some(id));
        let said = w.answer(&ix).await;
        assert!(said.is_ephemeral() && said.embeds == json!([]), "{said:?}");
        refusals.push(said.content.replace(id, "<id>"));
        // Nothing follows a refusal.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(followups(&w.sim, &ix).is_empty());
    }
    assert_eq!(refusals[0], refusals[1]);
    assert!(refusals[0].starts_with("⚠️"), "{}", refusals[0]);
    let ix = w
        .sim
        .send_button(
            &w.sim.origin_in(&mallory, &thread),
            &summary.id,
            &format!("fo:{task}"),
        )
        .unwrap();
    assert_eq!(
        w.answer(&ix).await.content.replace(&task, "<id>"),
        refusals[0]
    );
    assert_eq!(
        w.fake.follows.load(SeqCst),
        read,
        "a stranger made the relay read the log"
    );
    w.stop().await;
}

/// A transcript too long for a couple of messages arrives as one `<task>.md` with the whole text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_transcript_is_one_markdown_file() {
    let w = world().await;
    let (task, thread) = w.task("explain everything").await;
    let long = "a line of what Claude explained at length\n".repeat(300);
    w.fake.emit(&task, TaskEvent::Text { text: long.clone() });
    w.fake.emit(&task, finished(FinalState::Done, None));
    w.summary(&thread, 1).await;
    let ix = w.status(&w.alice, w.sim.channel_id(), Some(&task));
    w.answer(&ix).await;
    let f = wait_followups(&w.sim, &ix, 1).await;
    assert_eq!(f.len(), 1, "{f:#?}");
    let names: Vec<&str> = f[0]
        .attachments
        .iter()
        .map(|a| a.filename.as_str())
        .collect();
    assert_eq!(names, [format!("{task}.md")]);
    let call = w
        .sim
        .calls()
        .into_iter()
        .find(|c| c.path.contains(&ix.token) && !c.files.is_empty())
        .expect("the upload");
    // The whole text, with the header and the end around it.
    assert_eq!(call.files[0].filename, format!("{task}.md"));
    assert!(call.files[0].size > long.len(), "{:?}", call.files[0]);
    assert!(f[0].is_ephemeral());
    w.stop().await;
}

/// Issue 16, item 6: `/tasks` pages through the user's tasks newest first with each one's thread, filters by
/// state, and its buttons carry the page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_lists_pages_of_history_with_their_threads() {
    let w = world().await;
    let mut started = Vec::new();
    for n in 0..12 {
        started.push(w.task(&format!("job {n}")).await);
    }
    let (done, _) = &started[0];
    w.fake.emit(done, finished(FinalState::Done, None));
    let ix = w
        .sim
        .send_slash(&w.sim.origin(&w.alice), &SlashCommand::new("tasks"))
        .unwrap();
    let page1 = w.answer(&ix).await;
    assert!(page1.is_ephemeral());
    let lines: Vec<&str> = page1.content.lines().skip(1).collect();
    assert_eq!(lines.len(), 10, "{}", page1.content);
    // Newest first, each with its thread.
    let (newest, newest_thread) = &started[11];
    assert!(
        lines[0].contains(newest.as_str()) && lines[0].contains(&format!("<#{newest_thread}>")),
        "{}",
        lines[0]
    );
    let next = page1
        .custom_ids()
        .into_iter()
        .find(|c| c.starts_with("tl:1:"))
        .expect("a Next button");
    let ix = w
        .sim
        .send_button(&w.sim.origin(&w.alice), &page1.id, &next)
        .unwrap();
    let page2 = w.answer(&ix).await;
    let lines: Vec<&str> = page2.content.lines().skip(1).collect();
    assert_eq!(lines.len(), 2, "{}", page2.content);
    assert!(lines[1].contains(done.as_str()), "{}", page2.content);
    assert!(
        page2.components.to_string().contains("\"disabled\":true"),
        "Next is off on the last page"
    );

    let ix = w
        .sim
        .send_slash(
            &w.sim.origin(&w.alice),
            &SlashCommand::new("tasks").opt(Opt::str("state", "done")),
        )
        .unwrap();
    let done_only = w.answer(&ix).await.content;
    assert_eq!(done_only.lines().count(), 2, "{done_only}");
    assert!(done_only.contains(done.as_str()));
    // Someone with no tasks of theirs sees none of alice's.
    let ix = w
        .sim
        .send_slash(
            &w.sim.origin(&w.sim.user("mallory")),
            &SlashCommand::new("tasks"),
        )
        .unwrap();
    let none = w.answer(&ix).await.content;
    assert!(none.starts_with("No tasks"), "{none}");
    w.stop().await;
}

/// Issue 16, item 6, several machines: autocomplete offers `agent/project` where a name repeats, `/task` and
/// `/project remove` take it, `/project remove` passes an agent, and `/agents default:NAME` sets the default
/// while `/agents` alone still lists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_machines_agent_project_names_and_the_default_agent() {
    let w = world().await;
    let me = w.alice.id.clone();
    *Fake::lock(&w.fake.projects) = ["laptop", "desktop"]
        .iter()
        .map(|a| ProjectInfo {
            name: "app".into(),
            path: "/src/app".into(),
            agent: (*a).into(),
            owner: me.clone(),
        })
        .chain([ProjectInfo {
            name: "web".into(),
            path: "/src/web".into(),
            agent: "laptop".into(),
            owner: me.clone(),
        }])
        .collect();
    let ix = w
        .sim
        .send_autocomplete(
            &w.sim.origin(&w.alice),
            &SlashCommand::new("task")
                .opt(Opt::str("prompt", "x"))
                .opt(Opt::focused("project", "")),
        )
        .unwrap();
    let cb = w.sim.wait_callback(&ix, T).await.unwrap();
    let values: Vec<&str> = cb.body["data"]["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["value"].as_str().unwrap())
        .collect();
    assert_eq!(values, ["laptop/app", "desktop/app", "web"]);

    let ix = w
        .sim
        .send_slash(
            &w.sim.origin(&w.alice),
            &SlashCommand::new("task")
                .opt(Opt::str("prompt", "x"))
                .opt(Opt::str("project", "desktop/app")),
        )
        .unwrap();
    w.answer(&ix).await;
    let req = Fake::lock(&w.fake.submits).last().cloned().unwrap();
    assert_eq!(
        (req.project.as_deref(), req.agent.as_deref()),
        (Some("app"), Some("desktop"))
    );
    // A folder path is not taken for an agent's project.
    let ix = w
        .sim
        .send_slash(
            &w.sim.origin(&w.alice),
            &SlashCommand::new("task")
                .opt(Opt::str("prompt", "x"))
                .opt(Opt::str("project", "src/app")),
        )
        .unwrap();
    w.answer(&ix).await;
    let req = Fake::lock(&w.fake.submits).last().cloned().unwrap();
    assert_eq!((req.project.as_deref(), req.agent), (Some("src/app"), None));

    for (opts, want) in [
        (
            vec![Opt::str("name", "app"), Opt::str("agent", "laptop")],
            ("app", Some("laptop")),
        ),
        (
            vec![Opt::str("name", "desktop/app")],
            ("app", Some("desktop")),
        ),
        (vec![Opt::str("name", "web")], ("web", None)),
    ] {
        let ix = w
            .sim
            .send_slash(
                &w.sim.origin(&w.alice),
                &SlashCommand::new("project").sub("remove", opts),
            )
            .unwrap();
        let said = w.answer(&ix).await.content;
        assert!(said.contains("removed"), "{said}");
        let last = Fake::lock(&w.fake.removed).last().cloned().unwrap();
        assert_eq!((last.0.as_str(), last.1.as_deref()), want);
    }

    let ix = w
        .sim
        .send_slash(
            &w.sim.origin(&w.alice),
            &SlashCommand::new("agents").opt(Opt::str("default", "box03")),
        )
        .unwrap();
    let said = w.answer(&ix).await.content;
    assert!(
        said.starts_with("⭐ **box03** is now your default agent"),
        "{said}"
    );
    assert_eq!(
        Fake::lock(&w.fake.defaults).get(&me).map(String::as_str),
        Some("box03")
    );
    let ix = w
        .sim
        .send_slash(&w.sim.origin(&w.alice), &SlashCommand::new("agents"))
        .unwrap();
    let list = w.answer(&ix).await.content;
    let marked: Vec<&str> = list.lines().filter(|l| l.contains("⭐ default")).collect();
    assert_eq!(marked.len(), 1, "{list}");
    assert!(marked[0].starts_with("**box03**"), "{list}");
    w.stop().await;
}

/// The requester is told, by a mention naming only them, when someone else stops their task; not when they
/// stop it themselves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_requester_is_pinged_when_someone_else_stops_their_task() {
    let w = world().await;
    let bob = w.sim.user("bob");
    for (who, pinged) in [(&bob, true), (&w.alice, false)] {
        let (task, thread) = w.task("work").await;
        let progress = w
            .find(&thread, "the progress message", |m| {
                m.custom_ids() == [format!("st:{task}")]
            })
            .await;
        let ix = w
            .sim
            .send_button(
                &w.sim.origin_in(who, &thread),
                &progress.id,
                &format!("st:{task}"),
            )
            .unwrap();
        w.answer(&ix).await;
        w.fake.emit(&task, finished(FinalState::Cancelled, None));
        let summary = w.summary(&thread, 1).await;
        let body = w
            .sim
            .calls_to("POST", &format!("/channels/{thread}/messages"))
            .into_iter()
            .map(|c| c.body)
            .find(|b| b["embeds"].as_array().is_some_and(|e| !e.is_empty()))
            .unwrap();
        let users = body["allowed_mentions"]["users"].clone();
        if pinged {
            assert_eq!(
                summary.content,
                format!("<@{}> `{task}` was stopped.", w.alice.id)
            );
            assert_eq!(users, json!([w.alice.id]), "{body}");
        } else {
            assert_eq!(summary.content, "", "{body}");
            assert!(users.as_array().is_none_or(Vec::is_empty), "{body}");
        }
        assert_eq!(body["allowed_mentions"]["parse"], json!([]), "{body}");
    }
    w.stop().await;
}
