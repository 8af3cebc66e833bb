//! Issue 16, items 2 and 6, end to end: a task's whole output from `/status` after its thread was deleted and
//! the relay restarted, the same refusal for a stranger's task id and a made-up one, `/tasks` with the
//! thread's link, and a user with two machines: `agent/project` names, `/agents default`, and `/project remove`
//! with an agent. The real relay (gateway mode, REST through the Discord simulator), two real agents, and the
//! real Claude Code CLI against the scripted Messages API; users act only as they would in Discord.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::discord::{answer, delete_channel, gateway_config, private, relay_with_bot, scratch, T};
use crate::support::{direct, TestAgent, TestRelay};
use ct_agent::tasks::TaskConfig;
use ct_agent::RunOptions;
use ct_relay::RelayConfig;
use ct_testkit::discord::{InteractionRef, Opt, SimMessage, SimUser, SlashCommand};
use ct_testkit::{claude_bin, ClaudeEnv, DiscordSim, FakeAnthropic, Reply};
use serde_json::json;

/// `/name ...` as `user` in #general; its private answer.
async fn say(sim: &DiscordSim, user: &SimUser, cmd: SlashCommand) -> String {
    let ix = sim.send_slash(&sim.origin(user), &cmd).unwrap();
    private(sim, &ix).await
}

/// The follow-ups of an interaction, once there are at least `n`.
async fn followups(sim: &DiscordSim, ix: &InteractionRef, n: usize) -> Vec<SimMessage> {
    sim.wait_until(T, |s| {
        let i = s.interaction(&ix.id)?;
        let f: Vec<SimMessage> = i.followups.iter().filter_map(|id| s.message(id)).collect();
        (f.len() >= n).then_some(f)
    })
    .await
    .unwrap_or_else(|e| panic!("no follow-ups for {}: {e:#}", ix.id))
}

/// One of the user's machines: a paired agent with an allowed folder holding the project `app`.
struct Machine {
    name: &'static str,
    dir: tempfile::TempDir,
    allowed: PathBuf,
    project: PathBuf,
    _root: tempfile::TempDir,
}

impl Machine {
    fn new(name: &'static str) -> Self {
        let root = scratch("ct-root-");
        let allowed = std::fs::canonicalize(root.path()).unwrap();
        let project = allowed.join("app");
        std::fs::create_dir(&project).unwrap();
        Self {
            name,
            dir: tempfile::tempdir().unwrap(),
            allowed,
            project,
            _root: root,
        }
    }

    async fn pair(&self, relay: &TestRelay, user: &str) {
        ct_agent::pair_with(
            self.dir.path(),
            &relay.token(user).await,
            Some(self.name.into()),
            false,
            &direct(),
        )
        .await
        .unwrap();
    }

    fn start(&self, claude_env: &ClaudeEnv) -> TestAgent {
        let mut run = RunOptions::new(self.dir.path());
        run.tasks = TaskConfig {
            claude_bin: Some(claude_bin()),
            env_clear: true,
            env: claude_env
                .vars()
                .iter()
                .map(|(k, v)| (OsString::from(k), OsString::from(v)))
                .collect(),
            allowed_dirs: Some(self.allowed.display().to_string()),
            cancel_step: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(600),
            ..TaskConfig::default()
        };
        TestAgent::start_with(run)
    }
}

fn claude_env(fake: &FakeAnthropic, home: &Path) -> ClaudeEnv {
    let mut env = ClaudeEnv::new(fake.base_url()).expect("claude env");
    std::fs::create_dir_all(home.join(".claude")).unwrap();
    env.set_var("HOME", &home.display().to_string());
    env.set_var(
        "CLAUDE_CONFIG_DIR",
        &home.join(".claude").display().to_string(),
    );
    env
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tasks_whole_output_and_history_outlive_its_thread_and_a_relay_restart() {
    let sim = DiscordSim::start().await.unwrap();
    let fake = FakeAnthropic::start([]).await.expect("fake API");
    let home_dir = scratch("ct-home-");
    let home = std::fs::canonicalize(home_dir.path()).unwrap();
    let env = claude_env(&fake, &home);
    let relay_dir = tempfile::tempdir().unwrap();
    let relay = relay_with_bot(&sim, relay_dir.path()).await;
    let (alice, bob) = (sim.user("alice"), sim.user("bob"));

    // Alice has two machines, each with a project called `app`.
    let (laptop, desktop) = (Machine::new("laptop"), Machine::new("desktop"));
    let mut agents = Vec::new();
    for m in [&laptop, &desktop] {
        m.pair(&relay, &alice.id).await;
        let mut agent = m.start(&env);
        agent.connected(T).await;
        agents.push(agent);
        let said = say(
            &sim,
            &alice,
            SlashCommand::new("project").sub(
                "add",
                [
                    Opt::str("name", "app"),
                    Opt::str("path", &m.project.display().to_string()),
                    Opt::str("agent", m.name),
                ],
            ),
        )
        .await;
        assert!(said.contains("**app**") && said.contains(m.name), "{said}");
    }

    // `/agents default`: the laptop takes tasks that name no agent; `/agents` alone still lists.
    let said = say(
        &sim,
        &alice,
        SlashCommand::new("agents").opt(Opt::str("default", "laptop")),
    )
    .await;
    assert!(
        said.starts_with("⭐ **laptop** is now your default agent"),
        "{said}"
    );
    let list = say(&sim, &alice, SlashCommand::new("agents")).await;
    let marked: Vec<&str> = list.lines().filter(|l| l.contains("⭐ default")).collect();
    assert!(
        marked.len() == 1 && marked[0].starts_with("**laptop**") && list.contains("**desktop**"),
        "{list}"
    );

    // Autocomplete names `app` by machine, and `/task` takes `desktop/app` (not the default laptop's).
    let ix = sim
        .send_autocomplete(
            &sim.origin(&alice),
            &SlashCommand::new("task")
                .opt(Opt::str("prompt", "x"))
                .opt(Opt::focused("project", "app")),
        )
        .unwrap();
    let cb = sim.wait_callback(&ix, T).await.unwrap();
    let mut values: Vec<String> = cb.body["data"]["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["value"].as_str().unwrap().to_string())
        .collect();
    values.sort();
    assert_eq!(values, ["desktop/app", "laptop/app"], "{}", cb.body);

    let target = desktop.project.join("hello.txt");
    fake.push(Reply::tool_use(
        "Write",
        json!({ "file_path": target.display().to_string(), "content": "hi from claude\n" }),
    ));
    fake.push(Reply::text("I wrote hello.txt on the desktop."));
    let said = say(
        &sim,
        &alice,
        SlashCommand::new("task")
            .opt(Opt::str("prompt", "write hello.txt"))
            .opt(Opt::str("project", "desktop/app"))
            .opt(Opt::str("mode", "default")),
    )
    .await;
    assert!(
        said.starts_with("🧵 Started `t_") && said.contains("**desktop**"),
        "{said}"
    );
    let task = said.split('`').nth(1).unwrap().to_string();
    let start = said.find("<#").unwrap() + 2;
    let thread = said[start..start + said[start..].find('>').unwrap()].to_string();
    let approval = sim
        .wait_until(T, |s| {
            s.messages(&thread).into_iter().find(|m| {
                m.custom_ids()
                    .iter()
                    .any(|c| c.starts_with(&format!("ao:{task}:")))
            })
        })
        .await
        .expect("the approval");
    let allow = approval
        .custom_ids()
        .into_iter()
        .find(|c| c.starts_with("ao:"))
        .unwrap();
    sim.send_button(&sim.origin_in(&alice, &thread), &approval.id, &allow)
        .unwrap();
    let summary = sim
        .wait_until(T, |s| {
            s.messages(&thread)
                .into_iter()
                .find(|m| m.embeds.as_array().is_some_and(|e| !e.is_empty()))
        })
        .await
        .expect("the summary");
    assert!(
        summary.custom_ids().contains(&format!("fo:{task}")),
        "a Full output button: {:?}",
        summary.custom_ids()
    );
    assert_eq!(
        std::fs::read_to_string(&target).unwrap(),
        "hi from claude\n"
    );

    // The thread is deleted, and the relay restarts on the same data.
    delete_channel(&sim, &thread).await;
    let addr = relay.addr;
    relay.stop().await;
    for a in &mut agents {
        a.disconnected(T).await;
    }
    let mut config = RelayConfig::new(relay_dir.path().to_path_buf(), addr);
    config.bot = Some(gateway_config(&sim));
    let relay = TestRelay::start(config).await;
    sim.wait_identified(T).await.unwrap();

    // `/status`: the summary and the whole conversation, privately, from the relay's store.
    let ix = sim
        .send_slash(
            &sim.origin(&alice),
            &SlashCommand::new("status").opt(Opt::str("task_id", &task)),
        )
        .unwrap();
    let said = answer(&sim, &ix).await;
    assert!(said.is_ephemeral());
    assert_eq!(
        said.embeds[0]["title"].as_str(),
        Some(format!("✅ Done · {task}").as_str())
    );
    let whole = followups(&sim, &ix, 1).await;
    let text: String = whole.iter().map(|m| m.content.clone()).collect();
    // The header first and the end last; the tool use and its approval in between (which of those two
    // comes first is the CLI's business).
    let mut from = 0;
    for want in [
        format!("# Task `{task}`"),
        "**app** on **desktop**".to_string(),
        "I wrote hello.txt on the desktop.".to_string(),
        "✅ Done.".to_string(),
    ] {
        let at = text[from..]
            .find(&want)
            .unwrap_or_else(|| panic!("{want:?} missing, or out of order, in:\n{text}"));
        from += at + want.len();
    }
    for want in [
        "🔐 Approval asked for **Write**",
        "🔓 Approval closed",
        "🔧 **Write**",
    ] {
        assert!(text.contains(want), "{want:?} missing in:\n{text}");
    }
    assert!(whole.iter().all(SimMessage::is_ephemeral));
    assert!(whole.iter().all(|m| m.content.chars().count() <= 2000));

    // A stranger: alice's task and a made-up id get the same words, and nothing else.
    let mut refusals = Vec::new();
    for id in [task.as_str(), "t_nonexistent"] {
        let ix = sim
            .send_slash(
                &sim.origin(&bob),
                &SlashCommand::new("status").opt(Opt::str("task_id", id)),
            )
            .unwrap();
        let m = answer(&sim, &ix).await;
        assert!(m.is_ephemeral() && m.embeds == json!([]), "{m:?}");
        refusals.push(m.content.replace(id, "<id>"));
    }
    assert_eq!(refusals[0], refusals[1]);
    assert!(refusals[0].contains("no task"), "{}", refusals[0]);

    // `/tasks`: the task, its state, project, agent, and a link to its thread.
    let listed = say(&sim, &alice, SlashCommand::new("tasks")).await;
    let line = listed
        .lines()
        .find(|l| l.contains(&task))
        .unwrap_or_else(|| panic!("{task} not listed: {listed}"));
    assert!(
        line.contains("`app`") && line.contains("`desktop`") && line.contains("done"),
        "{line}"
    );
    assert!(line.contains(&format!("<#{thread}>")), "{line}");
    let none = say(&sim, &bob, SlashCommand::new("tasks")).await;
    assert!(none.starts_with("No tasks"), "{none}");

    // `/project remove`: `app` is on both machines, so it asks which; with an agent, only that one goes.
    for a in &mut agents {
        a.connected(T).await;
    }
    let said = say(
        &sim,
        &alice,
        SlashCommand::new("project").sub("remove", [Opt::str("name", "app")]),
    )
    .await;
    assert!(
        said.starts_with("⚠️") && said.contains("desktop, laptop") && said.contains("agent"),
        "{said}"
    );
    let said = say(
        &sim,
        &alice,
        SlashCommand::new("project").sub(
            "remove",
            [Opt::str("name", "app"), Opt::str("agent", "laptop")],
        ),
    )
    .await;
    assert!(
        said.contains("removed") && said.contains("laptop"),
        "{said}"
    );
    let list = say(&sim, &alice, SlashCommand::new("project").sub("list", [])).await;
    let apps: Vec<&str> = list.lines().filter(|l| l.starts_with("**app**")).collect();
    assert!(apps.len() == 1 && apps[0].contains("desktop"), "{list}");

    for a in agents {
        a.stop().await.unwrap();
    }
    relay.stop().await;
    sim.shutdown().await;
    drop(home_dir);
}
