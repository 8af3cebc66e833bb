//! Pool workers (`ct-agent run --pool`), attacked: two users on one worker, the real Claude Code CLI in the
//! real sandbox against the scripted fake Messages API, the metering proxy in between.
//!
//! The relay's side of pools (routing a user's tasks to their worker) is built separately; these tests speak
//! to the worker's task manager the way a relay session does — `RelayMessage`s in, `AgentMessage`s out, every
//! event acknowledged, every approval allowed as the requester would — so that everything from the agent's
//! `StartTask` down (workspaces, sandbox, limits, proxy, budgets) is the real thing.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::tasks::{scratch, SHARED_KEY, T};
use ct_agent::pool::PoolConfig;
use ct_agent::tasks::{SharedKey, TaskConfig, Tasks};
use ct_agent::ConfigDir;
use ct_protocol::project::{ProjectOp, ProjectReply, ProjectsReport};
use ct_protocol::task::{Decision, FinalState, Requester, Role, TaskEvent, TaskOptions, TaskSpec};
use ct_protocol::{AgentMessage, RelayMessage};
use ct_testkit::{claude_bin, ClaudeEnv, FakeAnthropic, Reply};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

const ALICE: &str = "1001";
const BOB: &str = "2002";

/// What the worker sent, as a relay would have stored it.
#[derive(Default)]
struct Log {
    events: HashMap<String, Vec<TaskEvent>>,
    replies: HashMap<u64, ProjectReply>,
}

/// One worker: its task manager, and the loop that plays the relay's part.
struct Worker {
    tasks: Tasks,
    stop: CancellationToken,
    log: Arc<Mutex<Log>>,
    next_id: std::sync::atomic::AtomicU64,
}

impl Worker {
    fn start(config_dir: &Path, config: TaskConfig) -> Self {
        let stop = CancellationToken::new();
        let tasks = Tasks::new(ConfigDir::open(config_dir).unwrap(), config, stop.clone());
        let log = Arc::new(Mutex::new(Log::default()));
        let (t, l, s) = (tasks.clone(), log.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let msgs = tokio::select! {
                    () = s.cancelled() => break,
                    m = t.outgoing() => m,
                };
                for msg in msgs {
                    match msg {
                        AgentMessage::Event { task, seq, event } => {
                            if let TaskEvent::ApprovalRequested { approval, .. } = &event {
                                t.handle(RelayMessage::Decide {
                                    task: task.clone(),
                                    approval: approval.clone(),
                                    decision: Decision::AllowOnce {
                                        updated_input: None,
                                    },
                                });
                            }
                            l.lock()
                                .unwrap()
                                .events
                                .entry(task.clone())
                                .or_default()
                                .push(event);
                            t.handle(RelayMessage::Ack { task, seq });
                        }
                        AgentMessage::ProjectReply { id, reply } => {
                            l.lock().unwrap().replies.insert(id, reply);
                        }
                        _ => {}
                    }
                }
            }
        });
        Self {
            tasks,
            stop,
            log,
            next_id: 1.into(),
        }
    }

    async fn stop(self) {
        self.stop.cancel();
        self.tasks.wait().await;
    }

    async fn wait_for<R>(&self, what: &str, f: impl Fn(&Log) -> Option<R>) -> R {
        let deadline = tokio::time::Instant::now() + T;
        loop {
            if let Some(r) = f(&self.log.lock().unwrap()) {
                return r;
            }
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "no {what} within {T:?}; events: {:#?}",
                    self.log.lock().unwrap().events
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn project(&self, op: ProjectOp) -> ProjectReply {
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.tasks.handle(RelayMessage::Project { id, op });
        self.wait_for("a project reply", |l| l.replies.get(&id).cloned())
            .await
    }

    async fn refused(&self, op: ProjectOp) -> String {
        match self.project(op.clone()).await {
            ProjectReply::Refused { message } => message,
            other => panic!("{op:?} was not refused: {other:?}"),
        }
    }

    async fn created(&self, user: &str, name: &str, git: Option<String>) -> ProjectsReport {
        let op = ProjectOp::Create {
            user: user.into(),
            name: name.into(),
            git,
        };
        match self.project(op).await {
            ProjectReply::Ok(report) => report,
            other => panic!("{name} not created: {other:?}"),
        }
    }

    fn start_task(&self, task: &str, user: &str, project: &str, prompt: &str) {
        self.tasks.handle(RelayMessage::StartTask(TaskSpec {
            task: task.into(),
            project: project.into(),
            prompt: prompt.into(),
            requester: Requester {
                user: user.into(),
                name: None,
                role: Role::TrustedGrantee,
            },
            options: TaskOptions {
                permission_mode: Some("default".into()),
                ..TaskOptions::default()
            },
            resume: None,
        }));
    }

    fn events(&self, task: &str) -> Vec<TaskEvent> {
        self.log
            .lock()
            .unwrap()
            .events
            .get(task)
            .cloned()
            .unwrap_or_default()
    }

    async fn finished(&self, task: &str) -> (FinalState, Option<String>) {
        self.wait_for(&format!("end of {task}"), |l| {
            l.events.get(task)?.iter().find_map(|e| match e {
                TaskEvent::Finished { state, message } => Some((*state, message.clone())),
                _ => None,
            })
        })
        .await
    }
}

/// A pool worker's surroundings: the fake API, Claude Code's environment, the worker's config folder and its
/// workspaces (outside /tmp, which every sandbox replaces).
struct Pool {
    fake: FakeAnthropic,
    _env: ClaudeEnv,
    _home: tempfile::TempDir,
    config_dir: tempfile::TempDir,
    _ws: tempfile::TempDir,
    config: TaskConfig,
}

impl Pool {
    async fn new(tune: impl FnOnce(&mut PoolConfig)) -> Self {
        if let Err(e) = ct_agent::sandbox::detect() {
            panic!("bubblewrap must work for this test (scripts/test installs it): {e:?}");
        }
        let fake = FakeAnthropic::start([]).await.expect("fake API");
        let mut env = ClaudeEnv::new(fake.base_url()).expect("claude env");
        let home_dir = scratch("ct-home-");
        let home = std::fs::canonicalize(home_dir.path()).unwrap();
        env.set_var("HOME", &home.display().to_string());
        let ws = scratch("ct-ws-");
        let mut pool = PoolConfig {
            workspaces: ws.path().join("data"),
            ..PoolConfig::default()
        };
        tune(&mut pool);
        pool.prepare().unwrap();
        let config = TaskConfig {
            claude_bin: Some(claude_bin()),
            env_clear: true,
            env: env
                .vars()
                .iter()
                .map(|(k, v)| (OsString::from(k), OsString::from(v)))
                .collect(),
            cancel_step: Duration::from_secs(10),
            shared_api_key: Some(SharedKey(SHARED_KEY.into())),
            forwarder: Some(env!("CARGO_BIN_EXE_ct-agent").into()),
            pool: Some(pool),
            ..TaskConfig::default()
        };
        Self {
            fake,
            _env: env,
            _home: home_dir,
            config_dir: scratch("ct-worker-"),
            _ws: ws,
            config,
        }
    }

    fn worker(&self) -> Worker {
        Worker::start(self.config_dir.path(), self.config.clone())
    }

    fn pool(&self) -> &PoolConfig {
        self.config.pool.as_ref().unwrap()
    }

    fn user_dir(&self, user: &str) -> PathBuf {
        self.pool().workspaces.join("users").join(user)
    }
}

fn bash(command: &str) -> Reply {
    Reply::tool_use(
        "Bash",
        json!({ "command": command, "description": "look around" }),
    )
}

/// How many tool results the request's conversation carries: the step the conversation is at.
fn step(body: &Value) -> usize {
    body["messages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["content"].as_array())
        .flatten()
        .filter(|b| b["type"] == "tool_result")
        .count()
}

/// The tool results of every request whose conversation contains `marker` (one user's task).
fn results_of(fake: &FakeAnthropic, marker: &str) -> String {
    fake.main_requests()
        .iter()
        .filter(|r| r.body.to_string().contains(marker))
        .flat_map(|r| r.tool_results().into_iter().map(Value::to_string))
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test]
async fn a_pool_users_task_cannot_reach_another_users_workspace_processes_the_workers_key_or_its_memory(
) {
    let p = Pool::new(|_| {}).await;
    let w = p.worker();
    let hello = w.tasks.hello();
    assert!(
        hello
            .iter()
            .any(|m| matches!(m, AgentMessage::Projects(r) if r.pool && r.projects.is_empty())),
        "{hello:?}"
    );
    w.created(ALICE, "app", None).await;
    let report = w.created(BOB, "app", None).await;
    assert_eq!(report.projects.len(), 1, "{report:?}");
    let bob_app = p.user_dir(BOB).join("app");
    std::fs::write(bob_app.join("secret.txt"), "BOB-PRIVATE-CONTENT\n").unwrap();
    std::fs::write(
        p.config_dir.path().join("canary.txt"),
        "WORKER-CONFIG-CANARY\n",
    )
    .unwrap();
    let users = p.pool().workspaces.join("users");
    let agent_dir = p.config_dir.path().display().to_string();

    // One script for both conversations, each reply chosen by whose conversation asks and how far it is.
    let alice_steps = [
        format!(
            "cat {b}/secret.txt 2>&1; echo EVIL > {b}/pwned.txt 2>&1; ls -la {u} {u}/{BOB} 2>&1; echo STEP-ONE-DONE",
            b = bob_app.display(),
            u = users.display()
        ),
        "ps aux 2>&1; ls /proc 2>&1; cat /proc/*/cmdline 2>/dev/null | tr '\\0' ' '; echo STEP-TWO-DONE".into(),
        format!(
            "cat {agent_dir}/canary.txt {agent_dir}/*.json 2>&1; ls -la {agent_dir} 2>&1; env; echo STEP-THREE-DONE"
        ),
        "python3 -c 'x = bytearray(10**10); print(\"ALLOC\" + \"ATED-TEN-GB\")' 2>&1; \
         head -c 6000000000 /dev/zero | python3 -c 'import sys; d = sys.stdin.buffer.read(); print(\"READ\" + \"-ALL\", len(d))' 2>&1; \
         echo \"LIMITS-ARE $(ulimit -v) $(ulimit -t) $(ulimit -u) $(ulimit -f)\"; grep CapEff /proc/self/status; \
         echo STEP-FOUR-DONE"
            .into(),
    ];
    let bob_steps = [
        // Waits (as a long build would) until the test lets it go; `B-PROCESS-MARKER` is in its command line.
        "while [ ! -f go ]; do sleep 0.2; done; echo B-PROCESS-MARKER > /dev/null; echo BOB-WORKED > done.txt; echo BOB-STEP-DONE".to_owned(),
    ];
    for _ in 0..16 {
        let (a, b) = (alice_steps.clone(), bob_steps.clone());
        p.fake.push(Reply::with(move |body| {
            let n = step(body);
            let (steps, end): (&[String], _) = if body.to_string().contains("ALICE-ATTACKS") {
                (&a, "alice is done")
            } else {
                (&b, "bob is done")
            };
            match steps.get(n) {
                Some(cmd) => bash(cmd),
                None => Reply::text(end),
            }
        }));
    }
    w.start_task("t_bob", BOB, "app", "BOB-WORKS: build it");
    // Bob's command runs (seen from the host, where everything is visible) before Alice starts looking.
    ct_testkit::process::poll_until(T, "bob's command running", || {
        std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
            std::fs::read(e.path().join("cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains("B-PROCESS-MARKER"))
                .unwrap_or(false)
        })
    })
    .await
    .expect("bob's task runs");

    w.start_task("t_alice", ALICE, "app", "ALICE-ATTACKS: look around");
    let (state, message) = w.finished("t_alice").await;
    assert_eq!(
        state,
        FinalState::Done,
        "{message:?}: {:#?}",
        w.events("t_alice")
    );
    let seen = results_of(&p.fake, "ALICE-ATTACKS");
    for marker in [
        "STEP-ONE-DONE",
        "STEP-TWO-DONE",
        "STEP-THREE-DONE",
        "STEP-FOUR-DONE",
    ] {
        assert!(
            seen.contains(marker),
            "{marker} missing: did the commands run? {seen}"
        );
    }
    for leak in [
        "BOB-PRIVATE-CONTENT",
        "B-PROCESS-MARKER",
        "BOB-WORKS",
        "WORKER-CONFIG-CANARY",
        SHARED_KEY,
        p.fake.base_url(),
        "ALLOCATED-TEN-GB",
        "READ-ALL",
    ] {
        assert!(
            !seen.contains(leak),
            "{leak} reached alice's sandbox: {seen}"
        );
    }
    assert!(
        seen.contains(&format!(
            "ANTHROPIC_API_KEY={}",
            ct_agent::meter::proxy::DUMMY_KEY
        )),
        "only the placeholder key inside: {seen}"
    );
    assert!(
        seen.contains("MemoryError"),
        "the allocation failed: {seen}"
    );
    // The defaults, in ulimit's units: KiB of address space, CPU seconds, processes, 1 KiB blocks per file.
    assert!(
        seen.contains("LIMITS-ARE 4194304 3600 512 10485760"),
        "every process of the task has the limits: {seen}"
    );
    assert!(
        seen.contains("CapEff:\\t0000000000000000"),
        "no capabilities, whoever runs the worker: {seen}"
    );
    assert!(
        !bob_app.join("pwned.txt").exists(),
        "alice wrote into bob's workspace"
    );
    assert_eq!(
        std::fs::read_to_string(bob_app.join("secret.txt")).unwrap(),
        "BOB-PRIVATE-CONTENT\n"
    );
    // Every request reached the API with the operator's key, added outside the sandboxes.
    assert!(p
        .fake
        .main_requests()
        .iter()
        .all(|r| r.api_key.as_deref() == Some(SHARED_KEY)));

    // Bob's task ran on all along, and ends well once let go.
    assert!(
        !w.events("t_bob")
            .iter()
            .any(|e| matches!(e, TaskEvent::Finished { .. })),
        "bob's task ended early: {:#?}",
        w.events("t_bob")
    );
    std::fs::write(bob_app.join("go"), "").unwrap();
    let (state, message) = w.finished("t_bob").await;
    assert_eq!(
        state,
        FinalState::Done,
        "{message:?}: {:#?}",
        w.events("t_bob")
    );
    assert_eq!(
        std::fs::read_to_string(bob_app.join("done.txt")).unwrap(),
        "BOB-WORKED\n"
    );
    assert!(results_of(&p.fake, "BOB-WORKS").contains("BOB-STEP-DONE"));
    // Both were metered, each on their own.
    for user in [ALICE, BOB] {
        match w.project(ProjectOp::Usage { user: user.into() }).await {
            ProjectReply::Usage(u) => assert!(u.input_tokens > 0 && u.budget.is_none(), "{u:?}"),
            other => panic!("{other:?}"),
        }
    }
    w.stop().await;
}

#[tokio::test]
async fn a_pool_budget_runs_out_mid_task_and_the_task_ends_saying_so() {
    let p = Pool::new(|pool| {
        pool.budget_per_user = Some(ct_agent::meter::Budget::parse("5tokens/day").unwrap());
    })
    .await;
    // Bob has a budget of his own (`ct-agent sharing budget`), which overrides the pool's.
    let dir = ConfigDir::open(p.config_dir.path()).unwrap();
    ct_agent::meter::set_budget(
        &dir,
        BOB,
        Some(ct_agent::meter::Budget::parse("1000000tokens/day").unwrap()),
    )
    .unwrap();
    let w = p.worker();
    w.created(ALICE, "app", None).await;
    w.created(BOB, "app", None).await;
    for _ in 0..8 {
        p.fake.push(Reply::with(|body| {
            if step(body) == 0 {
                bash("echo FIRST-STEP")
            } else {
                Reply::text("finished")
            }
        }));
    }
    w.start_task("t_a", ALICE, "app", "two steps");
    let (state, message) = w.finished("t_a").await;
    assert_eq!(
        state,
        FinalState::Failed,
        "{message:?}: {:#?}",
        w.events("t_a")
    );
    let shown = format!("{message:?} {:?}", w.events("t_a"));
    assert!(
        shown.contains("your pool budget of 5 tokens a day is used up")
            && shown.contains("it resets at 00:00 UTC"),
        "the proxy's refusal reached the task: {shown}"
    );
    assert_eq!(
        p.fake.main_requests().len(),
        1,
        "the second request never reached the API"
    );
    match w.project(ProjectOp::Usage { user: ALICE.into() }).await {
        ProjectReply::Usage(u) => {
            assert_eq!(u.budget.as_deref(), Some("5 tokens a day"), "{u:?}");
            assert_eq!(u.left.as_deref(), Some("0 tokens"), "{u:?}");
            assert!(u.resets_at.unwrap() > ct_agent::meter::now_secs());
        }
        other => panic!("{other:?}"),
    }
    // Her next task is refused before Claude Code starts; Bob, with his own budget, runs.
    w.start_task("t_a2", ALICE, "app", "again");
    let (state, message) = w.finished("t_a2").await;
    assert_eq!(state, FinalState::Failed);
    assert!(message.unwrap_or_default().contains("pool budget"));
    assert_eq!(p.fake.main_requests().len(), 1);
    w.start_task("t_b", BOB, "app", "two steps");
    let (state, message) = w.finished("t_b").await;
    assert_eq!(
        state,
        FinalState::Done,
        "{message:?}: {:#?}",
        w.events("t_b")
    );
    w.stop().await;
}

/// A bare repository with one commit, outside /tmp.
fn bare_repo(root: &Path) -> PathBuf {
    let work = root.join("work");
    let bare = root.join("repo.git");
    std::fs::create_dir_all(&work).unwrap();
    std::fs::write(work.join("README"), "CLONED-CONTENT\n").unwrap();
    let git = |dir: &Path, args: &[&str]| {
        let ok = std::process::Command::new("git")
            .current_dir(dir)
            .args(["-c", "user.name=T", "-c", "user.email=t@e"])
            .args(args)
            .status()
            .unwrap()
            .success();
        assert!(ok, "git {args:?}");
    };
    git(&work, &["init", "-q", "-b", "main"]);
    git(&work, &["add", "."]);
    git(&work, &["commit", "-q", "-m", "one"]);
    git(root, &["clone", "-q", "--bare", "work", "repo.git"]);
    bare
}

/// Every path under `dir`, with file contents, to compare before and after.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let path = e.path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            if meta.is_dir() {
                todo.push(path.clone());
                out.push((path, Vec::new()));
            } else if meta.is_file() {
                out.push((path.clone(), std::fs::read(&path).unwrap()));
            } else {
                out.push((path, b"link".to_vec()));
            }
        }
    }
    out.sort();
    out
}

#[tokio::test]
async fn project_commands_refuse_escapes_bad_urls_and_a_full_workspace_and_touch_nothing_else() {
    let p = Pool::new(|pool| {
        pool.quota_bytes = 1024 * 1024;
        pool.clone_timeout = Duration::from_secs(30);
    })
    .await;
    let w = p.worker();
    let bob = w.created(BOB, "keep", None).await;
    assert_eq!(bob.projects[0].name, "keep");
    let bob_dir = p.user_dir(BOB);
    std::fs::write(bob_dir.join("keep/file.txt"), "BOB\n").unwrap();
    w.created(ALICE, "app", None).await;
    let alice_dir = p.user_dir(ALICE);
    // Planted by someone with access to the disk (a user's own tasks cannot reach their user folder): a
    // link to Bob's project in Alice's folder, and a user folder that is a link to Bob's.
    std::os::unix::fs::symlink(bob_dir.join("keep"), alice_dir.join("link")).unwrap();
    std::os::unix::fs::symlink(&bob_dir, p.pool().workspaces.join("users/3003")).unwrap();
    let bob_before = snapshot(&bob_dir);

    let create = |user: &str, name: &str, git: Option<&str>| ProjectOp::Create {
        user: user.into(),
        name: name.into(),
        git: git.map(str::to_owned),
    };
    for bad in ["../x", "/abs", ".hidden", "..", "a/b", "../2002/keep"] {
        let m = w.refused(create(ALICE, bad, None)).await;
        assert!(m.contains("is not a project name"), "{bad}: {m}");
    }
    let m = w.refused(create(ALICE, "link", None)).await;
    assert!(m.contains("already have"), "{m}");
    let m = w.refused(create("3003", "x", None)).await;
    assert!(m.contains("cannot open the workspace"), "{m}");
    let m = w.refused(create("../2002", "x", None)).await;
    assert!(m.contains("not a Discord user id"), "{m}");
    // A task in the link, or for the linked user, never starts.
    w.start_task("t_link", ALICE, "link", "look");
    let (state, message) = w.finished("t_link").await;
    assert_eq!(state, FinalState::Failed);
    assert!(message.unwrap().contains("not a folder"));
    w.start_task("t_3003", "3003", "keep", "look");
    assert_eq!(w.finished("t_3003").await.0, FinalState::Failed);
    w.start_task("t_none", ALICE, "nothing", "look");
    let (_, message) = w.finished("t_none").await;
    assert!(message.unwrap().contains("/project add nothing"));

    // URLs: one that cannot be cloned, and kinds never cloned at all.
    let m = w
        .refused(create(ALICE, "net", Some("https://127.0.0.1:1/x.git")))
        .await;
    assert!(
        m.contains("could not clone") && m.contains("Nothing was created"),
        "{m}"
    );
    let repo_root = scratch("ct-repo-");
    let bare = bare_repo(repo_root.path());
    for url in [
        format!("file://{}", bare.display()),
        bare.display().to_string(),
        "ext::sh -c touch% /tmp/pwned".into(),
        "--upload-pack=touch /tmp/pwned".into(),
    ] {
        let m = w.refused(create(ALICE, "local", Some(&url))).await;
        assert!(m.contains("cannot be cloned here"), "{url}: {m}");
    }
    let leftovers: Vec<_> = std::fs::read_dir(&alice_dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let mut names = leftovers.clone();
    names.sort();
    assert_eq!(names, ["app", "link"], "nothing left behind: {leftovers:?}");

    // Over the quota: no new project, and no task.
    std::fs::write(alice_dir.join("app/big.bin"), vec![7u8; 2 * 1024 * 1024]).unwrap();
    let m = w.refused(create(ALICE, "more", None)).await;
    assert!(m.contains("uses 2.0 MiB of its 1.0 MiB quota"), "{m}");
    w.start_task("t_full", ALICE, "app", "go");
    let (state, message) = w.finished("t_full").await;
    assert_eq!(state, FinalState::Failed);
    assert!(message.unwrap().contains("quota"));
    assert!(p.fake.main_requests().is_empty(), "Claude Code never ran");

    // Removing: the link goes as a link (what it pointed to stays), then the project with its files.
    match w
        .project(ProjectOp::RemoveFor {
            user: ALICE.into(),
            name: "link".into(),
        })
        .await
    {
        ProjectReply::Ok(r) => assert_eq!(r.projects.len(), 1, "{r:?}"),
        other => panic!("{other:?}"),
    }
    match w
        .project(ProjectOp::RemoveFor {
            user: ALICE.into(),
            name: "app".into(),
        })
        .await
    {
        ProjectReply::Ok(r) => assert!(r.projects.is_empty(), "{r:?}"),
        other => panic!("{other:?}"),
    }
    assert!(!alice_dir.join("app").exists());
    let m = w
        .refused(ProjectOp::RemoveFor {
            user: ALICE.into(),
            name: "../2002/keep".into(),
        })
        .await;
    assert!(m.contains("is not a project name"), "{m}");
    assert_eq!(snapshot(&bob_dir), bob_before, "bob's workspace changed");
    w.stop().await;
}

#[tokio::test]
async fn a_project_is_cloned_from_a_repository_and_workspaces_outlive_a_worker_restart() {
    // No git server offline: this worker may clone `file://` (tests only, see `PoolConfig::git_protocols`).
    let p = Pool::new(|pool| pool.git_protocols = vec!["file".into()]).await;
    let repo_root = scratch("ct-repo-");
    let bare = bare_repo(repo_root.path());
    let w = p.worker();
    let report = w
        .created(ALICE, "cloned", Some(format!("file://{}", bare.display())))
        .await;
    assert_eq!(report.projects.len(), 1);
    assert!(report.pool);
    let project = p.user_dir(ALICE).join("cloned");
    assert_eq!(
        std::fs::read_to_string(project.join("README")).unwrap(),
        "CLONED-CONTENT\n"
    );
    let m = w
        .refused(ProjectOp::Create {
            user: ALICE.into(),
            name: "cloned".into(),
            git: Some(format!("file://{}", bare.display())),
        })
        .await;
    assert!(m.contains("already have"), "{m}");
    // A task in it writes a file; the worker restarts; the workspace is there, and a task runs in it again.
    for _ in 0..2 {
        p.fake.push(Reply::with(|body| {
            if step(body) == 0 {
                bash("cat README; echo AFTER > after.txt; echo WROTE")
            } else {
                Reply::text("done")
            }
        }));
    }
    w.start_task("t_1", ALICE, "cloned", "CLONE-TASK-ONE");
    assert_eq!(
        w.finished("t_1").await.0,
        FinalState::Done,
        "{:#?}",
        w.events("t_1")
    );
    assert!(results_of(&p.fake, "CLONE-TASK-ONE").contains("CLONED-CONTENT"));
    w.stop().await;
    // What a worker stopped mid-clone would leave: removed when it starts again.
    std::fs::create_dir_all(p.user_dir(ALICE).join(".clone-0123456789abcdef/.git")).unwrap();

    let w = p.worker();
    ct_testkit::process::poll_until(T, "the leftover clone removed", || {
        !p.user_dir(ALICE).join(".clone-0123456789abcdef").exists()
    })
    .await
    .expect("leftovers swept at start");
    match w.project(ProjectOp::ListFor { user: ALICE.into() }).await {
        ProjectReply::Ok(r) => assert_eq!(r.projects[0].name, "cloned", "{r:?}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        std::fs::read_to_string(project.join("after.txt")).unwrap(),
        "AFTER\n"
    );
    for _ in 0..2 {
        p.fake.push(Reply::with(|body| {
            if step(body) == 0 {
                bash("cat after.txt; echo AGAIN")
            } else {
                Reply::text("done")
            }
        }));
    }
    w.start_task("t_2", ALICE, "cloned", "CLONE-TASK-TWO");
    assert_eq!(
        w.finished("t_2").await.0,
        FinalState::Done,
        "{:#?}",
        w.events("t_2")
    );
    assert!(results_of(&p.fake, "CLONE-TASK-TWO").contains("AFTER"));
    // Its Claude Code waits warm for a follow-up; removing the project closes it rather than waiting.
    match w
        .project(ProjectOp::RemoveFor {
            user: ALICE.into(),
            name: "cloned".into(),
        })
        .await
    {
        ProjectReply::Ok(r) => assert!(r.projects.is_empty(), "{r:?}"),
        other => panic!("{other:?}"),
    }
    assert!(!project.exists());
    w.stop().await;
}

#[test]
fn a_worker_that_could_not_isolate_or_pay_for_its_tasks_refuses_to_start() {
    let dir = scratch("ct-worker-");
    let ws = scratch("ct-ws-");
    let run = |args: &[&str], key: bool| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_ct-agent"));
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap())
            .arg("--config-dir")
            .arg(dir.path())
            .args(["run", "--pool"])
            .args(args);
        if key {
            cmd.env("CT_AGENT_SHARED_API_KEY", SHARED_KEY);
        }
        let out = cmd.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let in_ws = ws.path().join("data").display().to_string();
    let (ok, err) = run(&["--workspaces", &in_ws], false);
    assert!(
        !ok && err.contains("needs the operator's Anthropic API key"),
        "{err}"
    );
    let (ok, err) = run(&["--workspaces", &in_ws, "--budget-per-user", "lots"], true);
    assert!(!ok && err.contains("is not a budget"), "{err}");
    // Every sandbox binds /opt (and /usr, /etc...) read-only: workspaces there would be everyone's.
    let (ok, err) = run(&["--workspaces", "/opt/ct-pool-test-workspaces"], true);
    assert!(
        !ok && err.contains("which every task's sandbox sees"),
        "{err}"
    );
    assert!(
        !Path::new("/opt/ct-pool-test-workspaces").exists(),
        "nothing created there"
    );
    // Good settings get as far as the pairing.
    let (ok, err) = run(
        &["--workspaces", &in_ws, "--budget-per-user", "5usd/day"],
        true,
    );
    assert!(!ok && err.contains("not paired"), "{err}");
    assert!(ws.path().join("data").is_dir());
}

#[tokio::test]
async fn a_clone_that_would_not_fit_in_the_quota_leaves_nothing_behind() {
    let p = Pool::new(|pool| {
        pool.git_protocols = vec!["file".into()];
        pool.quota_bytes = 1024 * 1024;
    })
    .await;
    let repo_root = scratch("ct-repo-");
    let work = repo_root.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    // Random bytes do not compress: the clone holds them twice (object and checkout), well over 1 MiB.
    let mut noise = vec![0u8; 3 * 1024 * 1024];
    use rand::RngCore as _;
    rand::thread_rng().fill_bytes(&mut noise);
    std::fs::write(work.join("noise.bin"), noise).unwrap();
    let bare = {
        let git = |dir: &Path, args: &[&str]| {
            assert!(std::process::Command::new("git")
                .current_dir(dir)
                .args(["-c", "user.name=T", "-c", "user.email=t@e"])
                .args(args)
                .status()
                .unwrap()
                .success());
        };
        git(&work, &["init", "-q", "-b", "main"]);
        git(&work, &["add", "."]);
        git(&work, &["commit", "-q", "-m", "big"]);
        git(
            repo_root.path(),
            &["clone", "-q", "--bare", "work", "big.git"],
        );
        repo_root.path().join("big.git")
    };
    let w = p.worker();
    w.created(ALICE, "small", None).await;
    let m = w
        .refused(ProjectOp::Create {
            user: ALICE.into(),
            name: "big".into(),
            git: Some(format!("file://{}", bare.display())),
        })
        .await;
    assert!(m.contains("quota") && m.contains("MiB"), "{m}");
    let left: Vec<_> = std::fs::read_dir(p.user_dir(ALICE))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(left, ["small"], "nothing of the clone is left");
    // The workspace is as usable as before.
    w.created(ALICE, "other", None).await;
    w.stop().await;
}
