//! Issue 17 end to end, from Discord: the operator runs a pool of two real workers (`ct-agent run --pool`,
//! paired with a pool code); two users switch to cluster mode, each gets a workspace on the less loaded
//! worker, makes a project and runs a task there through the real relay and bot (the Discord simulator) with
//! the real Claude Code CLI in the workers' sandboxes on the scripted Messages API. One user's budget runs out
//! mid-task and the thread says so; a worker restarts and the workspace is still there; a user goes back to
//! local mode and their next task runs on their own machine.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::discord::{
    approval_message, click, message_in, nth_summary, private, scratch, world, World, T,
};
use crate::support::{direct, TestAgent};
use ct_agent::pool::PoolConfig;
use ct_agent::tasks::{SharedKey, TaskConfig};
use ct_agent::RunOptions;
use ct_relay::store::PoolAccess;
use ct_testkit::discord::{Opt, SimUser, SlashCommand};
use ct_testkit::{claude_bin, DiscordSim, Reply};
use serde_json::json;

/// `/name ...` as `user`; the private answer.
async fn say(sim: &DiscordSim, user: &SimUser, cmd: SlashCommand) -> String {
    let ix = sim.send_slash(&sim.origin(user), &cmd).unwrap();
    private(sim, &ix).await
}

/// One pool worker: a paired agent serving workspaces under its own folder.
struct Worker {
    dir: tempfile::TempDir,
    workspaces: PathBuf,
    _ws: tempfile::TempDir,
}

impl Worker {
    async fn pair(w: &World, name: &str) -> Self {
        let (token, _) = w.relay.core.pool_pairing_token("shared").await.unwrap();
        let dir = scratch("ct-worker-");
        ct_agent::pair_with(dir.path(), &token, Some(name.into()), false, &direct())
            .await
            .expect("a worker pairs with a pool code");
        let ws = scratch("ct-ws-");
        Self {
            workspaces: ws.path().join("data"),
            dir,
            _ws: ws,
        }
    }

    fn start(&self, w: &World) -> TestAgent {
        let mut pool = PoolConfig {
            workspaces: self.workspaces.clone(),
            ..PoolConfig::default()
        };
        pool.prepare().unwrap();
        let mut run = RunOptions::new(self.dir.path());
        let own = w.run_options();
        run.tasks = TaskConfig {
            claude_bin: Some(claude_bin()),
            env_clear: true,
            env: own.tasks.env.clone(),
            cancel_step: Duration::from_secs(10),
            // The operator's key: only the metering proxy outside the sandboxes holds it.
            shared_api_key: Some(SharedKey("operator-key-never-in-a-sandbox".into())),
            forwarder: Some(env!("CARGO_BIN_EXE_ct-agent").into()),
            pool: Some(pool),
            ..TaskConfig::default()
        };
        TestAgent::start_with(run)
    }

    fn project(&self, user: &str, name: &str) -> PathBuf {
        self.workspaces.join("users").join(user).join(name)
    }

    fn config(&self) -> ct_agent::ConfigDir {
        ct_agent::ConfigDir::open(self.dir.path()).unwrap()
    }
}

/// Runs `/task` in `project` as `user` and returns (task, thread) from the private answer.
async fn task(sim: &DiscordSim, user: &SimUser, prompt: &str) -> (String, String) {
    let said = say(
        sim,
        user,
        SlashCommand::new("task")
            .opt(Opt::str("prompt", prompt))
            .opt(Opt::str("project", "app"))
            .opt(Opt::str("mode", "default")),
    )
    .await;
    assert!(said.starts_with("🧵 Started `t_"), "{said}");
    let id = said.split('`').nth(1).unwrap().to_string();
    let start = said.find("<#").unwrap() + 2;
    let thread = said[start..start + said[start..].find('>').unwrap()].to_string();
    (id, thread)
}

/// Waits for the thread's summary, allowing (as `user`) any tool use Claude Code asks about on the way; the
/// summary's title.
async fn finish(sim: &DiscordSim, user: &SimUser, thread: &str, task: &str) -> String {
    loop {
        tokio::select! {
            title = nth_summary(sim, thread, 1) => return title,
            approval = approval_message(sim, thread, task) => {
                click(sim, user, thread, &approval, "ao:");
                message_in(sim, thread, "closed approval", |m| {
                    m.id == approval.id && m.components.to_string().contains("\"disabled\":true")
                })
                .await;
            }
        }
    }
}

fn write(path: &Path, content: &str) -> serde_json::Value {
    json!({ "file_path": path.display().to_string(), "content": content })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_users_work_on_a_pool_from_discord_and_one_goes_back_to_their_own_machine() {
    if let Err(e) = ct_agent::sandbox::detect() {
        panic!("bubblewrap must work for this test (scripts/test installs it): {e:?}");
    }
    let w = world().await;
    let (alice, bob) = (w.sim.user("alice"), w.sim.user("bob"));

    // The operator: pool `shared`, open to everyone, with two workers.
    w.relay
        .core
        .set_pool_access("shared", PoolAccess::Everyone)
        .await
        .unwrap();
    let workers = [
        Worker::pair(&w, "worker-a").await,
        Worker::pair(&w, "worker-b").await,
    ];
    let mut running = Vec::new();
    for worker in &workers {
        let mut agent = worker.start(&w);
        agent.connected(T).await;
        running.push(agent);
    }

    // Both users choose the pool; each gets a workspace on a worker of their own (the less loaded one).
    for user in [&alice, &bob] {
        let said = say(
            &w.sim,
            user,
            SlashCommand::new("register").sub("mode", [Opt::str("mode", "cluster")]),
        )
        .await;
        assert!(
            said.contains("cluster") && said.contains("shared"),
            "{said}"
        );
        let said = say(
            &w.sim,
            user,
            SlashCommand::new("project").sub("add", [Opt::str("name", "app")]),
        )
        .await;
        assert!(
            said.contains("**app**") && said.contains("workspace"),
            "{said}"
        );
    }
    assert!(workers[0].project(&alice.id, "app").is_dir());
    assert!(workers[1].project(&bob.id, "app").is_dir());
    assert!(!workers[0].project(&bob.id, "app").exists());
    let status = say(
        &w.sim,
        &bob,
        SlashCommand::new("register").sub("status", []),
    )
    .await;
    assert!(
        status.contains("worker-b") && status.contains("online"),
        "{status}"
    );

    // Alice's task runs on her worker, in her workspace, and she answers its approval herself.
    let notes = workers[0].project(&alice.id, "app").join("notes.txt");
    w.fake
        .push(Reply::tool_use("Write", write(&notes, "from the pool\n")));
    w.fake
        .push(Reply::text("Wrote notes.txt in your workspace."));
    let (first, thread) = task(&w.sim, &alice, "write notes.txt").await;
    let title = finish(&w.sim, &alice, &thread, &first).await;
    assert!(title.contains("Done"), "{title}");
    assert_eq!(std::fs::read_to_string(&notes).unwrap(), "from the pool\n");

    // Bob's budget on his worker is tiny: his task's second model call is refused, and the thread says why.
    ct_agent::meter::set_budget(
        &workers[1].config(),
        &bob.id,
        Some(ct_agent::meter::Budget::parse("5tokens/day").unwrap()),
    )
    .unwrap();
    w.fake.push(Reply::tool_use(
        "Bash",
        json!({ "command": "echo step one", "description": "first step" }),
    ));
    // No second reply is scripted: the proxy refuses that call before it reaches the API.
    let (second, thread) = task(&w.sim, &bob, "two steps").await;
    finish(&w.sim, &bob, &thread, &second).await;
    message_in(&w.sim, &thread, "the budget refusal", |m| {
        format!("{} {}", m.content, m.embeds).contains("pool budget of 5 tokens a day is used up")
    })
    .await;
    assert_eq!(w.fake.remaining_replies(), 0);
    let usage = say(&w.sim, &bob, SlashCommand::new("usage")).await;
    assert!(
        usage.contains("5 tokens a day") && usage.contains("0 tokens"),
        "{usage}"
    );

    // Alice's worker restarts: her workspace is still there.
    let restarted = running.remove(0);
    restarted.stop().await.unwrap();
    let mut again = workers[0].start(&w);
    again.connected(T).await;
    let listed = say(&w.sim, &alice, SlashCommand::new("project").sub("list", [])).await;
    assert!(listed.contains("**app** on worker-a"), "{listed}");
    assert_eq!(std::fs::read_to_string(&notes).unwrap(), "from the pool\n");

    // Back to local mode: her next task runs on her own machine.
    let said = say(
        &w.sim,
        &alice,
        SlashCommand::new("register").sub("mode", [Opt::str("mode", "local")]),
    )
    .await;
    assert!(said.contains("local"), "{said}");
    crate::support::pair(&w.relay, w.agent_dir.path(), &alice.id).await;
    let mut own = TestAgent::start_with(w.run_options());
    own.connected(T).await;
    crate::discord::add_project(&w.sim, &alice, &w.project).await;
    let mine = w.project.join("mine.txt");
    w.fake
        .push(Reply::tool_use("Write", write(&mine, "at home\n")));
    w.fake.push(Reply::text("Wrote it on your machine."));
    let (local, thread) = task(&w.sim, &alice, "write mine.txt").await;
    finish(&w.sim, &alice, &thread, &local).await;
    assert_eq!(std::fs::read_to_string(&mine).unwrap(), "at home\n");
    assert!(!workers[0]
        .project(&alice.id, "app")
        .join("mine.txt")
        .exists());

    own.stop().await.unwrap();
    again.stop().await.unwrap();
    for agent in running {
        agent.stop().await.unwrap();
    }
}
