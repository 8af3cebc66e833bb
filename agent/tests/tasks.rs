//! Tasks end to end: the real relay (library, 127.0.0.1), the real agent (library), the real pinned Claude
//! Code CLI, and the scripted fake of the Anthropic Messages API. A task is submitted through the relay core
//! the way the Discord bot and `ct-relay admin task` do, and followed through the core's event log.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::support::{pair, TestAgent, TestRelay};
use ct_agent::projects::{Host, Origin, Policy, SharePolicy};
use ct_agent::tasks::{SandboxHook, SharedKey, TaskConfig};
use ct_agent::{ConfigDir, RunOptions};
use ct_protocol::task::{Decision, FinalState, TaskEvent, TaskOptions};
use ct_relay::store::{ShareLevel, TaskState};
use ct_relay::tasks::{ReplyOutcome, Submit};
use ct_testkit::process::{cmdline, descendants_of, poll_until};
use ct_testkit::{claude_bin, eventually, ClaudeEnv, FakeAnthropic, LongJob, Reply};
use serde_json::json;
use tokio::sync::broadcast;

/// Generous: two cores shared with other builds, and the CLI binary is large to load.
pub(crate) const T: Duration = Duration::from_secs(90);
pub(crate) const OWNER: &str = "100";

pub(crate) struct World {
    pub(crate) relay: TestRelay,
    /// The cluster's other nodes (see [`Opts::cluster`]).
    pub(crate) nodes: Vec<TestRelay>,
    _node_dirs: Vec<tempfile::TempDir>,
    pub(crate) agent_config: ConfigDir,
    pub(crate) allowed_env: String,
    /// Claude Code's HOME, as the agent gives it.
    pub(crate) home: PathBuf,
    relay_dir: tempfile::TempDir,
    agent_dir: tempfile::TempDir,
    agent: Option<TestAgent>,
    /// How the agent was started, to start it again.
    run: RunOptions,
    pub(crate) fake: FakeAnthropic,
    _env: ClaudeEnv,
    _home: tempfile::TempDir,
    _root: tempfile::TempDir,
    /// The project `app` (canonical), inside the allowed folder.
    pub(crate) project: PathBuf,
    /// A folder outside everything allowed.
    pub(crate) outside: PathBuf,
    _outside: tempfile::TempDir,
}

#[derive(Default)]
pub(crate) struct Opts {
    pub(crate) logged_out: bool,
    pub(crate) idle_timeout: Option<Duration>,
    pub(crate) worktree_retention: Option<Duration>,
    pub(crate) worktree_sweep_every: Option<Duration>,
    /// More variables in the agent's environment for Claude Code (secrets a sandbox must keep out).
    pub(crate) env: Vec<(String, String)>,
    /// Pair at the relay as this user, while the agent keeps [`OWNER`] as its owner: a relay that has the
    /// agent under someone else and so labels their tasks the owner's.
    pub(crate) relay_owner: Option<&'static str>,
    /// Replace the project folder by a symlink to the home after the agent opened it for a sandbox.
    pub(crate) swap_project_for_home: bool,
    /// Accept shared tasks (`ct-agent sharing all`) from the start, so the agent's first report to the relay
    /// already says so (set later, the relay may have stored the earlier "no" and refuse on its side).
    pub(crate) shared: bool,
    /// Run without a key for shared tasks (`CT_AGENT_SHARED_API_KEY`); otherwise it is [`SHARED_KEY`].
    pub(crate) no_shared_key: bool,
    /// Run the relay as this many nodes of a cluster (one PostgreSQL database, one nats-server); the agent
    /// pairs with (and so connects to) `World::relay`, the second node; the others are `World::nodes`.
    pub(crate) cluster: Option<usize>,
    /// The cluster's database and NATS; a database of its own on the shared servers when `None`.
    pub(crate) cluster_state: Option<crate::cluster::SharedState>,
}

/// The key the agent gives shared tasks in these tests (the fake API accepts any key).
pub(crate) const SHARED_KEY: &str = "shared-tasks-test-key";

impl World {
    /// Stops the agent (its tasks end, its warm processes close) and starts it again on the same folder.
    pub(crate) async fn restart_agent(&mut self) {
        if let Some(agent) = self.agent.take() {
            agent.stop().await.unwrap();
        }
        let mut agent = TestAgent::start_with(self.run.clone());
        agent.connected(T).await;
        self.agent = Some(agent);
    }

    /// The running agent, taken out of the world (to wait for its run to end).
    pub(crate) fn take_agent(&mut self) -> TestAgent {
        self.agent.take().expect("the agent runs")
    }

    /// The agent's config directory.
    pub(crate) fn agent_dir(&self) -> &Path {
        self.agent_dir.path()
    }
}

/// Temporary folders outside /tmp: a sandbox gives tasks a private /tmp, which would hide (or swallow
/// writes to) anything a test put there for the wrong reason.
pub(crate) fn scratch(prefix: &str) -> tempfile::TempDir {
    let base = Path::new("/var/tmp");
    let builder = tempfile::Builder::new().prefix(prefix).tempdir_in(base);
    builder.unwrap_or_else(|_| tempfile::tempdir().unwrap())
}

pub(crate) async fn world() -> World {
    world_with(Opts::default()).await
}

pub(crate) async fn world_with(mut opts: Opts) -> World {
    let fake = FakeAnthropic::start([]).await.expect("fake API");
    let mut env = if opts.logged_out {
        ClaudeEnv::logged_out(fake.base_url())
    } else {
        ClaudeEnv::new(fake.base_url())
    }
    .expect("claude env");
    let home_dir = scratch("ct-home-");
    let home = std::fs::canonicalize(home_dir.path()).unwrap();
    std::fs::create_dir_all(home.join(".claude")).unwrap();
    env.set_var("HOME", &home.display().to_string());
    env.set_var(
        "CLAUDE_CONFIG_DIR",
        &home.join(".claude").display().to_string(),
    );
    for (k, v) in &opts.env {
        env.set_var(k, v);
    }
    let root = scratch("ct-root-");
    let allowed = std::fs::canonicalize(root.path()).unwrap();
    let project = allowed.join("app");
    std::fs::create_dir(&project).unwrap();
    let outside_dir = scratch("ct-outside-");
    let outside = std::fs::canonicalize(outside_dir.path()).unwrap();

    let (relay_dir, agent_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (relay, nodes, node_dirs) = match opts.cluster {
        None => (
            TestRelay::on(relay_dir.path(), "127.0.0.1:0").await,
            Vec::new(),
            Vec::new(),
        ),
        Some(n) => {
            let cluster = opts
                .cluster_state
                .take()
                .unwrap_or_else(crate::cluster::shared_state);
            let mut node_dirs = Vec::new();
            let mut nodes = Vec::new();
            for i in 0..n.max(2) {
                let dir = tempfile::tempdir().unwrap();
                nodes.push(TestRelay::start(cluster.node(dir.path(), i)).await);
                node_dirs.push(dir);
            }
            let relay = nodes.remove(1);
            (relay, nodes, node_dirs)
        }
    };
    pair(&relay, agent_dir.path(), opts.relay_owner.unwrap_or(OWNER)).await;
    let allowed_env = allowed.display().to_string();
    let agent_config = ConfigDir::open(agent_dir.path()).unwrap();
    if opts.shared {
        Policy::load_with(&agent_config, &allowed_env, Host::detect())
            .unwrap()
            .set_sharing(SharePolicy::All)
            .unwrap();
    }
    if opts.relay_owner.is_some() {
        let mut pairing = agent_config.load_pairing().unwrap().unwrap();
        pairing.owner = OWNER.into();
        agent_config.store_pairing(&pairing).unwrap();
    }
    let config = agent_config.clone();
    Policy::load_with(&config, &allowed_env, Host::detect())
        .unwrap()
        .add("app", &project.display().to_string(), Origin::Local)
        .unwrap();

    let mut run = RunOptions::new(agent_dir.path());
    run.tasks = TaskConfig {
        claude_bin: Some(claude_bin()),
        env_clear: true,
        env: env
            .vars()
            .iter()
            .map(|(k, v)| (OsString::from(k), OsString::from(v)))
            .collect(),
        allowed_dirs: Some(allowed_env.clone()),
        cancel_step: Duration::from_secs(10),
        idle_timeout: opts.idle_timeout.unwrap_or(Duration::from_secs(600)),
        worktree_retention: opts
            .worktree_retention
            .unwrap_or(Duration::from_secs(86_400)),
        worktree_sweep_every: opts
            .worktree_sweep_every
            .unwrap_or(Duration::from_secs(3600)),
        before_sandbox: opts.swap_project_for_home.then(|| {
            let home = home.clone();
            SandboxHook(Arc::new(move |project: &Path| {
                let mut moved = project.as_os_str().to_owned();
                moved.push(".moved");
                std::fs::rename(project, moved).unwrap();
                std::os::unix::fs::symlink(&home, project).unwrap();
            }))
        }),
        shared_api_key: (!opts.no_shared_key).then(|| SharedKey(SHARED_KEY.into())),
        forwarder: Some(env!("CARGO_BIN_EXE_ct-agent").into()),
        ..TaskConfig::default()
    };
    let mut agent = TestAgent::start_with(run.clone());
    agent.connected(T).await;
    World {
        run,
        relay,
        nodes,
        _node_dirs: node_dirs,
        agent_config,
        allowed_env,
        home,
        _home: home_dir,
        relay_dir,
        agent_dir,
        agent: Some(agent),
        fake,
        _env: env,
        _root: root,
        project,
        outside,
        _outside: outside_dir,
    }
}

pub(crate) fn submit(user: &str, project: &str, prompt: &str, options: TaskOptions) -> Submit {
    Submit {
        user: user.into(),
        project: project.into(),
        prompt: prompt.into(),
        options,
        ..Submit::default()
    }
}

fn accept_edits() -> TaskOptions {
    TaskOptions {
        permission_mode: Some("acceptEdits".into()),
        ..TaskOptions::default()
    }
}

impl World {
    pub(crate) async fn start(&self, req: Submit) -> Follow {
        let rec = self
            .relay
            .core
            .submit_task(req)
            .await
            .expect("task accepted by the relay");
        self.follow(&rec.spec.task).await
    }

    pub(crate) async fn follow(&self, task: &str) -> Follow {
        let (_, stored, rx) = self.relay.core.follow(task).await.expect("follow");
        Follow {
            task: task.into(),
            seen: stored,
            cursor: 0,
            rx,
        }
    }

    /// The owner's follow-up to a finished task: it resumes as a new task, followed here.
    pub(crate) async fn resume_as_owner(&self, task: &str, text: &str) -> Follow {
        let ReplyOutcome::Resumed(next) = self
            .relay
            .core
            .reply(OWNER, task, text.into(), None)
            .await
            .unwrap()
        else {
            panic!("a finished task is resumed")
        };
        self.follow(&next.spec.task).await
    }

    pub(crate) fn sharing(&self, sharing: SharePolicy) {
        Policy::load_with(&self.agent_config, &self.allowed_env, Host::detect())
            .unwrap()
            .set_sharing(sharing)
            .unwrap();
    }

    pub(crate) async fn decide(&self, user: &str, f: &Follow, approval: &str, decision: Decision) {
        self.relay
            .core
            .decide(user, &f.task, approval, decision)
            .await
            .expect("decision accepted");
    }
}

/// Waits until `running` holds, allowing the tool use once if the CLI asks first: whether it asks before
/// running a project script is the CLI's own business, and differs between versions.
pub(crate) async fn allow_if_asked_until(
    relay: &TestRelay,
    f: &mut Follow,
    running: impl Fn() -> bool,
) {
    tokio::select! {
        (approval, _) = f.approval() => relay
            .core
            .decide(
                OWNER,
                &f.task,
                &approval,
                Decision::AllowOnce {
                    updated_input: None,
                },
            ).await
            .expect("decision accepted"),
        started = poll_until(T, "the tool running", &running) => started.expect("the tool runs"),
    }
    poll_until(T, "the tool running", running)
        .await
        .expect("the tool runs");
}

/// A task's events through the relay core: what was stored, then what arrives live.
pub(crate) struct Follow {
    pub(crate) task: String,
    pub(crate) seen: Vec<(u64, TaskEvent)>,
    /// How many of `seen` earlier waits have looked at.
    cursor: usize,
    rx: broadcast::Receiver<(u64, TaskEvent)>,
}

impl Follow {
    pub(crate) fn new(
        task: &str,
        seen: Vec<(u64, TaskEvent)>,
        rx: broadcast::Receiver<(u64, TaskEvent)>,
    ) -> Self {
        Self {
            task: task.into(),
            seen,
            cursor: 0,
            rx,
        }
    }

    /// The sequence numbers seen so far, in order.
    pub(crate) fn seqs(&self) -> Vec<u64> {
        self.seen.iter().map(|(s, _)| *s).collect()
    }

    /// The next event (in order) matching `pred`.
    pub(crate) async fn until(
        &mut self,
        what: &str,
        pred: impl Fn(&TaskEvent) -> bool,
    ) -> TaskEvent {
        let deadline = tokio::time::Instant::now() + T;
        loop {
            while self.cursor < self.seen.len() {
                self.cursor += 1;
                let ev = &self.seen[self.cursor - 1].1;
                if pred(ev) {
                    return ev.clone();
                }
            }
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Ok((seq, ev))) => {
                    let last = self.seen.last().map_or(0, |(s, _)| *s);
                    if seq > last {
                        self.seen.push((seq, ev));
                    }
                }
                Ok(Err(broadcast::error::RecvError::Lagged(_))) => {
                    panic!("follower lagged; events so far: {:#?}", self.seen)
                }
                Ok(Err(broadcast::error::RecvError::Closed)) | Err(_) => {
                    panic!("no {what} within {T:?}; events: {:#?}", self.seen)
                }
            }
        }
    }

    async fn approval(&mut self) -> (String, String) {
        match self
            .until("an approval request", |e| {
                matches!(e, TaskEvent::ApprovalRequested { .. })
            })
            .await
        {
            TaskEvent::ApprovalRequested { approval, tool, .. } => (approval, tool),
            _ => unreachable!(),
        }
    }

    pub(crate) async fn finished(&mut self) -> (FinalState, Option<String>) {
        match self
            .until("the end of the task", |e| {
                matches!(e, TaskEvent::Finished { .. })
            })
            .await
        {
            TaskEvent::Finished { state, message } => (state, message),
            _ => unreachable!(),
        }
    }

    /// The kinds of events seen, without the context-usage reports (how many there are depends on how the
    /// CLI's answers interleave; `discord::the_status_is_pinned_...` checks them).
    fn kinds(&self) -> Vec<&'static str> {
        self.seen
            .iter()
            .map(|(_, e)| kind(e))
            .filter(|k| *k != "context")
            .collect()
    }
}

fn kind(e: &TaskEvent) -> &'static str {
    match e {
        TaskEvent::Started { .. } => "started",
        TaskEvent::Session { .. } => "session",
        TaskEvent::Text { .. } => "text",
        TaskEvent::Tool { .. } => "tool",
        TaskEvent::ToolResult { .. } => "tool_result",
        TaskEvent::ApprovalRequested { .. } => "approval_requested",
        TaskEvent::ApprovalClosed { .. } => "approval_closed",
        TaskEvent::TurnFinished { .. } => "turn_finished",
        TaskEvent::Finished { .. } => "finished",
        TaskEvent::Worktree { .. } => "worktree",
        TaskEvent::Context { .. } => "context",
    }
}

pub(crate) fn write(path: &Path, content: &str) -> serde_json::Value {
    json!({ "file_path": path.display().to_string(), "content": content })
}

/// The stored log must be 1..=n with no gap and no repeat.
fn assert_contiguous(events: &[(u64, TaskEvent)]) {
    let seqs: Vec<u64> = events.iter().map(|(s, _)| *s).collect();
    let want: Vec<u64> = (1..=seqs.len() as u64).collect();
    assert_eq!(seqs, want, "{events:#?}");
}

#[tokio::test]
async fn a_task_writes_a_file_in_its_project_and_every_event_arrives_in_order() {
    let w = world().await;
    let target = w.project.join("hello.txt");
    w.fake
        .push(Reply::tool_use("Write", write(&target, "hi from claude\n")));
    w.fake.push(Reply::text("I wrote hello.txt."));
    let mut f = w
        .start(submit(OWNER, "app", "write hello.txt", accept_edits()))
        .await;
    let (state, message) = f.finished().await;
    assert_eq!(state, FinalState::Done, "{message:?}; {:#?}", f.seen);
    assert_eq!(
        std::fs::read_to_string(&target).unwrap(),
        "hi from claude\n"
    );
    assert_eq!(
        f.kinds(),
        [
            "started",
            "session",
            "tool",
            "tool_result",
            "text",
            "turn_finished",
            "finished"
        ],
        "{:#?}",
        f.seen
    );
    assert!(
        matches!(&f.seen[0].1, TaskEvent::Started { cwd } if Path::new(cwd) == w.project),
        "{:?}",
        f.seen[0]
    );
    assert!(
        f.seen.iter().any(|(_, e)| matches!(e, TaskEvent::Tool { name, summary, .. } if name == "Write" && summary.ends_with("hello.txt")))
    );
    // What the relay stored is the same log, numbered from 1 with no gap, and the task record agrees.
    let (rec, stored, _) = w.relay.core.follow(&f.task).await.unwrap();
    assert_contiguous(&stored);
    assert_eq!(stored.len(), f.seen.len());
    assert_eq!(rec.state, TaskState::Done);
    assert!(rec.session_id.is_some(), "{rec:?}");
}

#[tokio::test]
async fn folders_outside_the_allowed_ones_are_refused_by_the_agent() {
    let w = world().await;
    // A plain path outside, and a symlink inside the project that points outside: both resolve outside.
    let link = w.project.join("escape");
    std::os::unix::fs::symlink(&w.outside, &link).unwrap();
    for asked in [
        w.outside.display().to_string(),
        link.display().to_string(),
        format!("{}/../..", w.project.display()),
    ] {
        let mut f = w
            .start(submit(OWNER, &asked, "look around", TaskOptions::default()))
            .await;
        let (state, message) = f.finished().await;
        let message = message.unwrap_or_default();
        assert_eq!(state, FinalState::Failed, "{asked}: {message}");
        assert!(
            message.contains("not inside an allowed folder")
                && message.contains(&w.project.parent().unwrap().display().to_string()),
            "{asked}: the refusal names the allowed folders: {message}"
        );
        assert_eq!(f.kinds(), ["finished"], "nothing ran for {asked}");
    }
    assert!(
        w.fake.main_requests().is_empty(),
        "Claude Code never started for a refused folder"
    );
}

#[tokio::test]
async fn approvals_round_trip_through_the_relay_and_only_the_owner_decides() {
    let w = world().await;
    let (allowed, denied) = (w.project.join("a.txt"), w.project.join("b.txt"));
    let outside = w.outside.join("x.txt");
    w.fake.push(Reply::tool_use("Write", write(&allowed, "a")));
    w.fake.push(Reply::tool_use("Write", write(&denied, "b")));
    // Even in acceptEdits a write outside the project asks; denied, nothing lands there.
    w.fake.push(Reply::tool_use("Write", write(&outside, "x")));
    w.fake.push(Reply::text("finished"));
    let options = TaskOptions {
        permission_mode: Some("default".into()),
        ..TaskOptions::default()
    };
    let mut f = w
        .start(submit(OWNER, "app", "write three files", options))
        .await;

    let (id, tool) = f.approval().await;
    assert_eq!(tool, "Write");
    assert_eq!(
        w.relay.core.task(&f.task).await.unwrap().state,
        TaskState::WaitingApproval
    );
    let stranger = w
        .relay
        .core
        .decide(
            "999",
            &f.task,
            &id,
            Decision::AllowOnce {
                updated_input: None,
            },
        )
        .await;
    assert!(stranger.is_err(), "a stranger cannot approve");
    w.decide(
        OWNER,
        &f,
        &id,
        Decision::AllowOnce {
            updated_input: None,
        },
    )
    .await;
    f.until("the approval closing", |e| {
        matches!(e, TaskEvent::ApprovalClosed { approval, outcome } if *approval == id && outcome == "allowed")
    })
    .await;

    let (id, _) = f.approval().await;
    w.decide(
        OWNER,
        &f,
        &id,
        Decision::Deny {
            reason: "not b.txt, please".into(),
        },
    )
    .await;
    let (id, _) = f.approval().await;
    w.decide(
        OWNER,
        &f,
        &id,
        Decision::Deny {
            reason: "stay in the project".into(),
        },
    )
    .await;
    let (state, message) = f.finished().await;
    assert_eq!(state, FinalState::Done, "{message:?}");
    assert_eq!(std::fs::read_to_string(&allowed).unwrap(), "a");
    assert!(!denied.exists(), "a denied write did not happen");
    assert!(!outside.exists(), "nothing was written outside the project");
    // Claude was told why.
    let told: Vec<String> = w
        .fake
        .main_requests()
        .iter()
        .flat_map(|r| r.tool_results().into_iter().map(|v| v.to_string()))
        .collect();
    assert!(
        told.iter().any(|t| t.contains("not b.txt, please")),
        "{told:#?}"
    );
}

#[tokio::test]
async fn cancel_ends_the_task_and_leaves_no_process_behind() {
    let w = world().await;
    let job = LongJob::write(&w.project, 300);
    w.fake.push(Reply::tool_use(
        "Bash",
        json!({ "command": job.command(), "description": "Run the long job" }),
    ));
    let mut f = w
        .start(submit(OWNER, "app", "wait", TaskOptions::default()))
        .await;
    f.until(
        "the Bash tool",
        |e| matches!(e, TaskEvent::Tool { name, .. } if name == "Bash"),
    )
    .await;
    let me = std::process::id();
    allow_if_asked_until(&w.relay, &mut f, || job.child_below(me).is_some()).await;
    let mut sleep_pid = None;
    poll_until(T, "the long job running below the agent", || {
        sleep_pid = job.child_below(me);
        sleep_pid.is_some()
    })
    .await
    .expect("long job started");
    let claude = claude_processes(&w.project);
    assert!(!claude.is_empty());

    w.relay
        .core
        .cancel_task(OWNER, &f.task)
        .await
        .expect("cancel");
    let (state, _) = f.finished().await;
    assert_eq!(state, FinalState::Cancelled, "{:#?}", f.seen);
    poll_until(T, "`sleep` and Claude Code gone", || {
        claude
            .iter()
            .chain(sleep_pid.as_ref())
            .all(|&pid| cmdline(pid).is_none())
    })
    .await
    .expect("no orphans after cancel");
    assert_eq!(
        w.relay.core.task(&f.task).await.unwrap().state,
        TaskState::Cancelled
    );
}

#[tokio::test]
async fn a_logged_out_claude_code_fails_the_task_saying_what_to_run() {
    let w = world_with(Opts {
        logged_out: true,
        ..Opts::default()
    })
    .await;
    let mut f = w
        .start(submit(OWNER, "app", "hello", TaskOptions::default()))
        .await;
    let (state, message) = f.finished().await;
    let message = message.unwrap_or_default();
    assert_eq!(state, FinalState::Failed);
    assert!(
        message.contains("not logged in") && message.contains("claude login"),
        "{message}"
    );
}

#[tokio::test]
async fn a_relay_restart_in_the_middle_of_a_task_delivers_every_event_exactly_once() {
    let World {
        relay,
        relay_dir,
        agent_dir: _agent_dir,
        agent,
        fake,
        _env,
        _home,
        _root,
        _outside,
        project,
        ..
    } = world().await;
    // The job runs until released: it ends, and the model answers after it, while the relay is down.
    let job = LongJob::gated(&project);
    fake.push(Reply::tool_use(
        "Bash",
        json!({ "command": job.command(), "description": "Run the long job" }),
    ));
    fake.push(Reply::text("slept well"));
    let rec = relay
        .core
        .submit_task(submit(
            OWNER,
            "app",
            "run the long job",
            TaskOptions::default(),
        ))
        .await
        .unwrap();
    let task = rec.spec.task.clone();
    let (_, stored, rx) = relay.core.follow(&task).await.unwrap();
    let mut f = Follow {
        task: task.clone(),
        seen: stored,
        cursor: 0,
        rx,
    };
    f.until(
        "the Bash tool",
        |e| matches!(e, TaskEvent::Tool { name, .. } if name == "Bash"),
    )
    .await;
    allow_if_asked_until(&relay, &mut f, || {
        job.child_below(std::process::id()).is_some()
    })
    .await;
    let before = f.seen.len();
    let addr = relay.addr.to_string();
    relay.stop().await;
    job.release();
    // The model has had the job's result and answered, with no relay to tell.
    eventually(T, || fake.main_requests().len() >= 2).await;
    let relay = TestRelay::on(relay_dir.path(), &addr).await;

    let (_, stored, rx) = relay.core.follow(&task).await.unwrap();
    let mut f = Follow {
        task: task.clone(),
        seen: stored,
        cursor: 0,
        rx,
    };
    let (state, message) = f.finished().await;
    assert_eq!(state, FinalState::Done, "{message:?}: {:#?}", f.seen);
    let (rec, stored, _) = relay.core.follow(&task).await.unwrap();
    assert_contiguous(&stored);
    // Whether the CLI asked before running the job is its own business.
    let kinds: Vec<&str> = stored
        .iter()
        .map(|(_, e)| kind(e))
        .filter(|k| !k.starts_with("approval_") && *k != "context")
        .collect();
    assert_eq!(
        kinds,
        [
            "started",
            "session",
            "tool",
            "tool_result",
            "text",
            "turn_finished",
            "finished"
        ],
        "each event stored once, in order"
    );
    assert_eq!(rec.state, TaskState::Done);
    println!(
        "relay restart mid-task: {before} events stored before, {} after (re-sent by the agent)",
        stored.len() - before
    );
    agent.expect("the agent").stop().await.unwrap();
    relay.stop().await;
}

pub(crate) const GRANTEE: &str = "200";

pub(crate) fn as_grantee(project: &str, prompt: &str, options: TaskOptions) -> Submit {
    Submit {
        target: Some(OWNER.into()),
        name: Some("Gina".into()),
        ..submit(GRANTEE, project, prompt, options)
    }
}

#[tokio::test]
async fn an_agent_whose_owner_did_not_allow_sharing_refuses_a_grantee_even_when_the_relay_shares() {
    // The relay refuses on its own when the agent has reported that it takes no shared tasks; to reach the
    // agent's own check, the relay must believe it does. So the agent starts out sharing, the relay stores
    // that report, and then the owner turns sharing off on the machine (which the agent reads per task).
    let w = world_with(Opts {
        shared: true,
        ..Opts::default()
    })
    .await;
    let core = w.relay.core.clone();
    ct_testkit::eventually_async(T, async || {
        let agents = core.agents().await.unwrap();
        let Some(agent) = agents.iter().find(|a| a.owner == OWNER) else {
            return false;
        };
        core.agent_projects(&agent.fingerprint)
            .await
            .unwrap()
            .is_some_and(|r| r.accepts_shared)
    })
    .await;
    w.sharing(SharePolicy::Off);
    w.relay
        .core
        .share_add(OWNER, GRANTEE, None, ShareLevel::Standard)
        .await
        .unwrap();
    let mut f = w
        .start(as_grantee("app", "hello", TaskOptions::default()))
        .await;
    let (state, message) = f.finished().await;
    let message = message.unwrap_or_default();
    assert_eq!(state, FinalState::Failed);
    assert!(
        message.contains("ct-agent sharing"),
        "the refusal says how the owner allows it: {message}"
    );
    assert!(w.fake.main_requests().is_empty(), "Claude Code never ran");
}

#[tokio::test]
async fn a_grantees_task_runs_sandboxed_and_its_approvals_go_to_the_owner() {
    // Sharing from the agent's first report: turned on after it, the relay may have stored the "no" already.
    let w = world_with(Opts {
        shared: true,
        ..Opts::default()
    })
    .await;
    if let Err(e) = ct_agent::sandbox::detect() {
        panic!("bubblewrap must work for this test (scripts/test installs it): {e:?}");
    }
    w.sharing(SharePolicy::All);
    w.relay
        .core
        .share_add(OWNER, GRANTEE, None, ShareLevel::Standard)
        .await
        .unwrap();
    let secret = w.home.join(".ssh/id_ed25519");
    std::fs::create_dir_all(secret.parent().unwrap()).unwrap();
    std::fs::write(&secret, "SECRET-KEY-MATERIAL\n").unwrap();
    let escaped = w.outside.join("escaped.txt");
    let written = w.project.join("ok.txt");
    w.fake.push(Reply::tool_use(
        "Bash",
        json!({ "command": format!("cat {}", secret.display()), "description": "Read a key" }),
    ));
    w.fake.push(Reply::tool_use(
        "Bash",
        json!({ "command": format!("echo pwned > {}", escaped.display()), "description": "Write outside" }),
    ));
    w.fake.push(Reply::tool_use("Write", write(&written, "ok")));
    w.fake.push(Reply::text("all done"));
    let options = TaskOptions {
        permission_mode: Some("default".into()),
        ..TaskOptions::default()
    };
    let mut f = w.start(as_grantee("app", "try things", options)).await;
    assert_eq!(w.relay.core.approver(&f.task).await.unwrap(), OWNER);
    let mut approvals = 0;
    loop {
        let ev = f
            .until("an approval or the end", |e| {
                matches!(
                    e,
                    TaskEvent::ApprovalRequested { .. } | TaskEvent::Finished { .. }
                )
            })
            .await;
        let TaskEvent::ApprovalRequested { approval, .. } = ev else {
            break;
        };
        approvals += 1;
        // The grantee cannot approve their own task's tool use; the owner can.
        let own = w
            .relay
            .core
            .decide(
                GRANTEE,
                &f.task,
                &approval,
                Decision::AllowOnce {
                    updated_input: None,
                },
            )
            .await;
        assert!(own.is_err(), "a grantee approved their own tool use");
        w.decide(
            OWNER,
            &f,
            &approval,
            Decision::AllowOnce {
                updated_input: None,
            },
        )
        .await;
    }
    assert!(
        approvals >= 2,
        "the writes asked for approval: {:#?}",
        f.seen
    );
    let (state, message) = match &f.seen.last().unwrap().1 {
        TaskEvent::Finished { state, message } => (*state, message.clone()),
        other => panic!("{other:?}"),
    };
    assert_eq!(state, FinalState::Done, "{message:?}: {:#?}", f.seen);
    assert_eq!(
        std::fs::read_to_string(&written).unwrap(),
        "ok",
        "the project is writable"
    );
    assert!(
        !escaped.exists(),
        "a sandboxed task wrote outside its project"
    );
    let sent: String = w
        .fake
        .main_requests()
        .iter()
        .flat_map(|r| r.tool_results().into_iter().map(|v| v.to_string()))
        .collect();
    assert!(
        !sent.contains("SECRET-KEY-MATERIAL"),
        "the hidden key reached the model: {sent}"
    );
    assert!(
        sent.contains("No such file") || sent.contains("Read-only"),
        "the tools failed for the sandbox's reasons: {sent}"
    );
}

#[tokio::test]
async fn a_trusted_grantee_decides_their_own_approvals() {
    // Sharing from the agent's first report (see above); then narrowed to the grantee on the machine.
    let w = world_with(Opts {
        shared: true,
        ..Opts::default()
    })
    .await;
    w.sharing(SharePolicy::Listed {
        users: vec![GRANTEE.into()],
    });
    w.relay
        .core
        .share_add(
            OWNER,
            GRANTEE,
            Some(vec!["app".into()]),
            ShareLevel::Trusted,
        )
        .await
        .unwrap();
    let target = w.project.join("t.txt");
    w.fake.push(Reply::tool_use("Write", write(&target, "t")));
    w.fake.push(Reply::text("ok"));
    let options = TaskOptions {
        permission_mode: Some("default".into()),
        ..TaskOptions::default()
    };
    let mut f = w.start(as_grantee("app", "write", options)).await;
    let (id, _) = f.approval().await;
    assert_eq!(w.relay.core.approver(&f.task).await.unwrap(), GRANTEE);
    w.decide(GRANTEE, &f, &id, Decision::AllowSession).await;
    let (state, message) = f.finished().await;
    assert_eq!(state, FinalState::Done, "{message:?}");
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "t");
}

/// The user messages (prompts) in the last main request the fake saw: the conversation Claude was given.
pub(crate) fn prompts_in_last_request(fake: &FakeAnthropic) -> String {
    let reqs = fake.main_requests();
    let last = reqs.last().expect("a request");
    last.body["messages"].to_string()
}

#[tokio::test]
async fn follow_ups_go_to_the_running_session_then_to_the_warm_process() {
    let w = world().await;
    let job = LongJob::gated(&w.project);
    w.fake.push(Reply::tool_use(
        "Bash",
        json!({ "command": job.command(), "description": "Think" }),
    ));
    w.fake.push(Reply::text("first answer"));
    w.fake.push(Reply::text("second answer"));
    let mut f = w
        .start(submit(
            OWNER,
            "app",
            "first question",
            TaskOptions::default(),
        ))
        .await;
    f.until("the Bash tool", |e| matches!(e, TaskEvent::Tool { .. }))
        .await;
    allow_if_asked_until(&w.relay, &mut f, || {
        job.child_below(std::process::id()).is_some()
    })
    .await;
    // While the turn runs: the message is queued into the same session and the task waits for both turns.
    let sent = w
        .relay
        .core
        .reply(OWNER, &f.task, "second question".into(), None)
        .await
        .unwrap();
    assert!(matches!(sent, ReplyOutcome::Sent(_)), "{sent:?}");
    job.release();
    let (state, _) = f.finished().await;
    assert_eq!(state, FinalState::Done);
    let turns = f.kinds().iter().filter(|k| **k == "turn_finished").count();
    assert_eq!(turns, 2, "{:#?}", f.seen);
    assert!(prompts_in_last_request(&w.fake).contains("second question"));
    let session = w
        .relay
        .core
        .task(&f.task)
        .await
        .unwrap()
        .session_id
        .unwrap();
    let claude_before: Vec<u32> = claude_processes(&w.project);
    assert_eq!(claude_before.len(), 1, "one warm process");

    // After the task ended: a new task resumes the session, on the same (warm) process.
    w.fake.push(Reply::text("third answer"));
    let resumed = w
        .relay
        .core
        .reply(OWNER, &f.task, "third question".into(), None)
        .await
        .unwrap();
    let ReplyOutcome::Resumed(next) = resumed else {
        panic!("{resumed:?}")
    };
    assert_eq!(next.follows.as_deref(), Some(f.task.as_str()));
    let mut g = w.follow(&next.spec.task).await;
    let (state, message) = g.finished().await;
    assert_eq!(state, FinalState::Done, "{message:?}");
    let conversation = prompts_in_last_request(&w.fake);
    assert!(
        conversation.contains("first question") && conversation.contains("third question"),
        "the follow-up continued the conversation: {conversation}"
    );
    assert!(
        g.seen.iter().any(
            |(_, e)| matches!(e, TaskEvent::Session { session_id, .. } if *session_id == session)
        ),
        "{:#?}",
        g.seen
    );
    assert_eq!(
        claude_processes(&w.project),
        claude_before,
        "the warm process was reused"
    );
}

#[tokio::test]
async fn after_the_process_ended_a_follow_up_resumes_the_session_from_disk() {
    let w = world_with(Opts {
        idle_timeout: Some(Duration::from_millis(300)),
        ..Opts::default()
    })
    .await;
    w.fake.push(Reply::text("first answer"));
    let mut f = w
        .start(submit(
            OWNER,
            "app",
            "remember the word kumquat",
            TaskOptions::default(),
        ))
        .await;
    assert_eq!(f.finished().await.0, FinalState::Done);
    poll_until(T, "the idle Claude Code exits", || {
        claude_processes(&w.project).is_empty()
    })
    .await
    .expect("idle process closed");

    w.fake.push(Reply::text("kumquat"));
    let mut g = w.resume_as_owner(&f.task, "which word?").await;
    assert_eq!(g.finished().await.0, FinalState::Done, "{:#?}", g.seen);
    let conversation = prompts_in_last_request(&w.fake);
    assert!(
        conversation.contains("kumquat") && conversation.contains("which word?"),
        "--resume replayed the conversation: {conversation}"
    );
}

/// Claude Code processes below this test process working in `project` (other tests run beside this one).
pub(crate) fn claude_processes(project: &Path) -> Vec<u32> {
    let mut pids: Vec<u32> = descendants_of(std::process::id())
        .into_iter()
        .filter(|&pid| cmdline(pid).is_some_and(|c| c.contains("stream-json")))
        .filter(|pid| {
            std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd == project)
        })
        .collect();
    pids.sort_unstable();
    pids
}
