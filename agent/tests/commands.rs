//! Every slash command, driven through the Discord simulator as a person would use it, against the real relay
//! and its bot, the real agent and the real Claude Code CLI (on the scripted Messages API). Each command is
//! checked in what its user sees: the words, whether the answer is private (ephemeral) or in the channel, and
//! what it changed in the relay (an agent refused, a project gone, a grantee's task stopped).
//!
//! Two worlds: one for the account commands (`/register`, `/project`, `/share`, `/audit`), one for the commands
//! that act on a task or its thread's session (`/approve`, `/reply`, `/cancel`, `/cc ...`). `/register pair`,
//! `/agents` and `/status` are driven in discord.rs.

use std::path::Path;

use crate::discord::{
    answer, approval_message, message_in, nth_summary, private, start_task, task_in_app, world,
    write, T,
};
use crate::support::{direct, TestAgent};
use ct_agent::projects::SharePolicy;
use ct_agent::RunError;
use ct_testkit::discord::{InteractionRef, Opt, SimMessage, SimUser, SlashCommand};
use ct_testkit::{DiscordSim, LongJob, Reply};
use serde_json::json;

/// Sends `cmd` as `user`, in `channel` (a task's thread) or in the guild's main channel.
fn send(
    sim: &DiscordSim,
    user: &SimUser,
    channel: Option<&str>,
    cmd: SlashCommand,
) -> InteractionRef {
    let origin = match channel {
        Some(c) => sim.origin_in(user, c),
        None => sim.origin(user),
    };
    sim.send_slash(&origin, &cmd).unwrap()
}

/// `cmd` as `user` in the main channel; the private answer's words.
async fn privately(sim: &DiscordSim, user: &SimUser, cmd: SlashCommand) -> String {
    private(sim, &send(sim, user, None, cmd)).await
}

/// `cmd` as `user` in `thread`; the answer, which everyone in the thread sees.
async fn publicly(sim: &DiscordSim, user: &SimUser, thread: &str, cmd: SlashCommand) -> SimMessage {
    let m = answer(sim, &send(sim, user, Some(thread), cmd)).await;
    assert!(
        !m.is_ephemeral(),
        "expected an answer in the thread: {:?}",
        m.content
    );
    m
}

fn sub(command: &str, name: &str, opts: impl IntoIterator<Item = Opt>) -> SlashCommand {
    SlashCommand::new(command).sub(name, opts)
}

fn cc(name: &str) -> SlashCommand {
    sub("cc", name, [])
}

fn approve(option: &str) -> SlashCommand {
    SlashCommand::new("approve").opt(Opt::str("option", option))
}

/// `/project add NAME PATH`.
fn project_add(name: &str, path: &Path) -> SlashCommand {
    sub(
        "project",
        "add",
        [
            Opt::str("name", name),
            Opt::str("path", &path.display().to_string()),
        ],
    )
}

/// `/register status|unregister`, `/project add|list|remove`, `/share add|list|available|remove` and `/audit`,
/// each as the person who may use it and as someone who may not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn account_commands_answer_privately_and_take_effect_in_the_relay() {
    let w = world().await;
    let sim = &w.sim;
    let (alice, bob, gina) = (sim.user("alice"), sim.user("bob"), sim.user("gina"));

    // /register status with nothing paired says what to do.
    let said = privately(sim, &alice, sub("register", "status", [])).await;
    assert_eq!(
        said,
        "You have no agents yet: pair one with `/register pair`."
    );

    // Two agents: the laptop ("e2e", taking shared tasks) and a desktop.
    crate::support::pair(&w.relay, w.agent_dir.path(), &alice.id).await;
    w.sharing(SharePolicy::All);
    let mut agent = TestAgent::start_with(w.run_options());
    agent.connected(T).await;
    let desktop_dir = tempfile::tempdir().unwrap();
    let desktop = ct_agent::pair_with(
        desktop_dir.path(),
        &w.relay.token(&alice.id).await,
        Some("desktop".into()),
        false,
        &direct(),
    )
    .await
    .unwrap();
    let mut run = w.run_options();
    run.config_dir = desktop_dir.path().to_path_buf();
    let mut desktop_agent = TestAgent::start_with(run);
    desktop_agent.connected(T).await;

    let said = privately(sim, &alice, sub("register", "status", [])).await;
    let lines: Vec<&str> = said.lines().collect();
    assert_eq!(lines.len(), 2, "{said}");
    let short = desktop.pairing.agent_fingerprint.short();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("**e2e** · `") && l.contains("🟢 online")),
        "{said}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with(&format!("**desktop** · `{short}` · 🟢 online"))),
        "{said}"
    );
    // Only one's own agents: bob has none.
    let said = privately(sim, &bob, sub("register", "status", [])).await;
    assert!(said.starts_with("You have no agents yet"), "{said}");

    // /register unregister: someone else's agent cannot be named; one's own is revoked at once, and the agent
    // is told so and stops.
    let unregister = |name: &str| sub("register", "unregister", [Opt::str("agent", name)]);
    let said = privately(sim, &bob, unregister("desktop")).await;
    assert_eq!(
        said, "⚠️ you have no agent called \"desktop\"; yours are: none",
        "a stranger cannot unregister alice's agent"
    );
    let said = privately(sim, &alice, unregister("desktop")).await;
    assert_eq!(
        said,
        format!(
            "🗑️ Agent **desktop** (`{short}`) is unregistered: its key is refused from now on."
        )
    );
    let ended = tokio::time::timeout(T, desktop_agent.wait())
        .await
        .expect("the unregistered agent stops");
    assert!(matches!(ended, Err(RunError::Revoked { .. })), "{ended:?}");
    let said = privately(sim, &alice, sub("register", "status", [])).await;
    assert!(
        !said.contains("desktop") && said.contains("**e2e**"),
        "{said}"
    );
    let said = privately(sim, &alice, unregister("desktop")).await;
    assert_eq!(
        said,
        "⚠️ you have no agent called \"desktop\"; yours are: e2e"
    );
    // Its key is refused: started again, it is turned away.
    let mut run = w.run_options();
    run.config_dir = desktop_dir.path().to_path_buf();
    let again = tokio::time::timeout(T, TestAgent::start_with(run).wait())
        .await
        .expect("the revoked agent is turned away");
    let why = again.expect_err("a revoked key is refused").to_string();
    assert!(why.contains("was revoked"), "{why}");

    // /project add, list, remove.
    let other = w.allowed.join("other");
    std::fs::create_dir(&other).unwrap();
    let said = privately(sim, &alice, project_add("app", &w.project)).await;
    assert_eq!(
        said,
        format!(
            "📁 Project **app** is `{}` on **e2e**.",
            w.project.display()
        )
    );
    privately(sim, &alice, project_add("other", &other)).await;
    let said = privately(sim, &alice, sub("project", "list", [])).await;
    let mut listed: Vec<&str> = said.lines().collect();
    listed.sort_unstable();
    assert_eq!(
        listed,
        [
            format!("**app** on e2e · `{}`", w.project.display()),
            format!("**other** on e2e · `{}`", other.display()),
        ],
        "{said}"
    );
    let said = privately(sim, &bob, sub("project", "list", [])).await;
    assert_eq!(
        said,
        "No projects yet: add one with `/project add name path`."
    );
    let said = privately(
        sim,
        &alice,
        sub("project", "remove", [Opt::str("name", "other")]),
    )
    .await;
    assert_eq!(
        said,
        "📁 Project **other** removed (the folder is untouched)."
    );
    assert!(other.is_dir(), "the folder is untouched");
    let said = privately(sim, &alice, sub("project", "list", [])).await;
    assert!(
        !said.contains("other") && said.contains("**app**"),
        "{said}"
    );
    let said = privately(
        sim,
        &alice,
        SlashCommand::new("task")
            .opt(Opt::str("prompt", "hi"))
            .opt(Opt::str("project", "other")),
    )
    .await;
    assert!(said.contains("unknown project \"other\""), "{said}");

    // /share add, then /share list as the owner and /share available as the grantee; each sees only their side.
    let said = privately(
        sim,
        &alice,
        sub(
            "share",
            "add",
            [Opt::user("user", &gina), Opt::str("projects", "app")],
        ),
    )
    .await;
    assert!(
        said.starts_with(&format!(
            "🤝 <@{}> may now run tasks on your agents (projects app)",
            gina.id
        )),
        "{said}"
    );
    let said = privately(sim, &alice, sub("share", "list", [])).await;
    assert_eq!(said, format!("<@{}> · app · run", gina.id));
    let said = privately(sim, &gina, sub("share", "available", [])).await;
    assert_eq!(said, format!("<@{}> · app · run", alice.id));
    let said = privately(sim, &gina, sub("share", "list", [])).await;
    assert!(said.starts_with("You share with nobody."), "{said}");
    let said = privately(sim, &bob, sub("share", "available", [])).await;
    assert_eq!(said, "Nobody shares their agents with you yet.");
    // The grantee sees the project's name, not the owner's folders.
    let said = privately(sim, &gina, sub("project", "list", [])).await;
    assert_eq!(said, format!("**app** on e2e · shared by <@{}>", alice.id));

    // /share remove takes effect at once: the grantee's running task is stopped, the next is refused.
    let target = w.project.join("gina.txt");
    w.fake
        .push(Reply::tool_use("Write", write(&target, "from gina")));
    let gina_task = || {
        SlashCommand::new("task")
            .opt(Opt::str("prompt", "write gina.txt"))
            .opt(Opt::str("project", "app"))
            .opt(Opt::user("target", &alice))
    };
    let (gtask, gthread) = start_task(sim, &gina, gina_task()).await;
    approval_message(sim, &gthread, &gtask).await;
    let said = privately(
        sim,
        &alice,
        sub("share", "remove", [Opt::user("user", &gina)]),
    )
    .await;
    assert_eq!(
        said,
        format!(
            "🔒 <@{}> can no longer use your agents; their tasks there were stopped.",
            gina.id
        )
    );
    assert_eq!(
        nth_summary(sim, &gthread, 1).await,
        format!("⏹️ Cancelled · {gtask}")
    );
    assert!(!target.exists(), "the stopped task wrote nothing");
    let said = privately(sim, &gina, gina_task()).await;
    assert!(
        said.starts_with("⚠️") && said.contains("has not shared"),
        "{said}"
    );
    let said = privately(sim, &gina, sub("share", "available", [])).await;
    assert_eq!(said, "Nobody shares their agents with you yet.");
    let said = privately(
        sim,
        &alice,
        sub("share", "remove", [Opt::user("user", &gina)]),
    )
    .await;
    assert!(said.starts_with("⚠️"), "removing twice is refused: {said}");

    // Shared again at the trusted level: the grantee answers their own approvals, with /approve too, and the
    // owner's /approve is told whose they are.
    let said = privately(
        sim,
        &alice,
        sub(
            "share",
            "add",
            [Opt::user("user", &gina), Opt::str("level", "trusted")],
        ),
    )
    .await;
    assert!(
        said.contains("(all your projects); they answer their own tool approvals"),
        "{said}"
    );
    let said = privately(sim, &alice, sub("share", "list", [])).await;
    assert_eq!(said, format!("<@{}> · all projects · trusted", gina.id));
    w.fake
        .push(Reply::tool_use("Write", write(&target, "from gina")));
    w.fake.push(Reply::text("written for gina"));
    let (gtask2, gthread2) = start_task(sim, &gina, gina_task()).await;
    approval_message(sim, &gthread2, &gtask2).await;
    let said = private(sim, &send(sim, &alice, Some(&gthread2), approve("once"))).await;
    assert_eq!(
        said,
        format!(
            "This approval is for <@{}>: only they can answer it.",
            gina.id
        )
    );
    let said = private(sim, &send(sim, &gina, Some(&gthread2), approve("once"))).await;
    assert_eq!(said, "✅ Allowed once.");
    assert_eq!(
        nth_summary(sim, &gthread2, 1).await,
        format!("✅ Done · {gtask2}")
    );
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "from gina");

    // /audit: what happened on alice's agents, newest first, by whom; nothing of it for anyone else.
    let said = privately(sim, &alice, SlashCommand::new("audit")).await;
    for what in [
        "agent desktop revoked".to_string(),
        format!("stopped sharing with user {}", gina.id),
    ] {
        assert!(
            said.lines()
                .any(|l| l.contains(&format!("<@{}>", alice.id)) && l.contains(&what)),
            "{what:?} in the audit: {said}"
        );
    }
    assert!(
        said.lines().any(|l| l.contains(&format!("<@{}>", gina.id))
            && l.contains("started a task in app on e2e: \"write gina.txt\"")),
        "the grantee's task, by the grantee: {said}"
    );
    let at = |what: &str| said.lines().position(|l| l.contains(what));
    assert!(
        at("stopped sharing").expect("the share's removal")
            < at("shared projects app with").expect("the share"),
        "newest first: {said}"
    );
    let said = privately(sim, &bob, SlashCommand::new("audit")).await;
    assert_eq!(said, "Nothing has happened on your agents yet.");

    let refused: Vec<_> = sim
        .calls()
        .into_iter()
        .filter(|c| c.status >= 400)
        .collect();
    assert!(refused.is_empty(), "{refused:#?}");
    agent.stop().await.unwrap();
    w.relay.stop().await;
}

/// `/approve` (the command, not the buttons), `/reply`, `/cancel` and `/cc status|model|compact|clear|stop` in a
/// task's thread, on one Claude Code session. `/cc compact` is shown to compact on the real CLI: the CLI asks
/// the API for a summary, the thread says the context was compacted, and the next turn carries the summary
/// instead of the conversation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_commands_act_on_the_threads_task() {
    let w = world().await;
    let sim = &w.sim;
    let (alice, bob) = (sim.user("alice"), sim.user("bob"));
    crate::support::pair(&w.relay, w.agent_dir.path(), &alice.id).await;
    let mut agent = TestAgent::start_with(w.run_options());
    agent.connected(T).await;
    privately(sim, &alice, project_add("app", &w.project)).await;

    // /approve option:once in the thread allows the waiting Write; a stranger's /approve is refused as if the
    // task did not exist.
    let one = w.project.join("one.txt");
    w.fake.push(Reply::tool_use("Write", write(&one, "one\n")));
    w.fake.push(Reply::text("wrote one"));
    let (task, thread) = start_task(sim, &alice, task_in_app("write one.txt")).await;
    let approval = approval_message(sim, &thread, &task).await;
    let said = private(sim, &send(sim, &bob, Some(&thread), approve("once"))).await;
    assert!(said.contains("there is no task"), "{said}");
    let said = private(sim, &send(sim, &alice, Some(&thread), approve("once"))).await;
    assert_eq!(said, "✅ Allowed once.");
    message_in(sim, &thread, "the approval closed by the command", |m| {
        m.id == approval.id
            && m.content.contains("Allowed once")
            && m.content.contains(&format!("by <@{}>", alice.id))
            && m.components.to_string().contains("\"disabled\":true")
    })
    .await;
    assert_eq!(
        nth_summary(sim, &thread, 1).await,
        format!("✅ Done · {task}")
    );
    assert_eq!(std::fs::read_to_string(&one).unwrap(), "one\n");
    let said = private(sim, &send(sim, &alice, Some(&thread), approve("once"))).await;
    assert_eq!(said, format!("⚠️ `{task}` has no approval waiting"));

    // /reply continues the session, in the open; /approve option:deny with a task id from elsewhere refuses
    // the next tool use, and Claude is told.
    let two = w.project.join("two.txt");
    w.fake.push(Reply::tool_use("Write", write(&two, "two\n")));
    w.fake.push(Reply::text("not writing two"));
    let said = publicly(
        sim,
        &alice,
        &thread,
        SlashCommand::new("reply").opt(Opt::str("prompt", "now write two.txt")),
    )
    .await;
    let task2 = said.content.split('`').nth(1).unwrap().to_string();
    assert_eq!(
        said.content,
        format!("↪️ <@{}> → `{task2}`: now write two.txt", alice.id)
    );
    approval_message(sim, &thread, &task2).await;
    let said = privately(
        sim,
        &alice,
        approve("deny").opt(Opt::str("task_id", &task2)),
    )
    .await;
    assert_eq!(said, "🚫 Denied.");
    assert_eq!(
        nth_summary(sim, &thread, 2).await,
        format!("✅ Done · {task2}")
    );
    assert!(!two.exists());
    let denied = w
        .fake
        .main_requests()
        .last()
        .unwrap()
        .tool_results()
        .last()
        .cloned()
        .cloned();
    assert_eq!(
        denied.as_ref().map(|r| r["is_error"].clone()),
        Some(json!(true)),
        "Claude was told: {denied:?}"
    );
    let conversation = w.fake.main_requests().last().unwrap().body["messages"].to_string();
    assert!(
        conversation.contains("write one.txt") && conversation.contains("now write two.txt"),
        "one session: {conversation}"
    );

    // /approve option:session allows this use and the same use again, which then runs unasked (and the thread
    // is told).
    let three = w.project.join("three.txt");
    w.fake
        .push(Reply::tool_use("Write", write(&three, "three\n")));
    w.fake
        .push(Reply::tool_use("Write", write(&three, "three\n")));
    w.fake.push(Reply::text("wrote three twice"));
    sim.send_message(&sim.origin_in(&alice, &thread), "write three.txt twice")
        .unwrap();
    let asked = sim
        .wait_until(T, |s| {
            s.messages(&thread).into_iter().find(|m| {
                m.content.contains("three.txt")
                    && m.custom_ids().iter().any(|c| c.starts_with("ao:"))
                    && !m.components.to_string().contains("\"disabled\":true")
            })
        })
        .await
        .expect("the approval for three.txt");
    let said = private(sim, &send(sim, &alice, Some(&thread), approve("session"))).await;
    assert_eq!(
        said,
        "✅ Allowed for this session: this exact use (the same command, file or site)."
    );
    message_in(sim, &thread, "the second write, auto-allowed", |m| {
        m.content.starts_with("🔓 Auto-allowed by session rule") && m.content.contains("three.txt")
    })
    .await;
    let title = nth_summary(sim, &thread, 3).await;
    let task3 = title
        .strip_prefix("✅ Done · ")
        .unwrap_or_else(|| panic!("{title}"))
        .to_string();
    assert_eq!(
        sim.messages(&thread)
            .iter()
            .filter(|m| m.content.contains("three.txt")
                && m.custom_ids().iter().any(|c| c.starts_with("ao:")))
            .map(|m| m.id.clone())
            .collect::<Vec<_>>(),
        [asked.id],
        "asked once"
    );
    assert_eq!(std::fs::read_to_string(&three).unwrap(), "three\n");

    // Outside a task's thread, the commands that act on one say what they need.
    let said = privately(sim, &alice, approve("once")).await;
    assert!(said.starts_with("⚠️ which task?"), "{said}");
    let said = answer(sim, &send(sim, &alice, None, cc("status")))
        .await
        .content;
    assert_eq!(
        said,
        "⚠️ use /cc in a task's thread: it acts on that thread's session"
    );
    let said = answer(
        sim,
        &send(
            sim,
            &alice,
            None,
            SlashCommand::new("reply").opt(Opt::str("prompt", "hi")),
        ),
    )
    .await
    .content;
    assert!(said.starts_with("⚠️ this is not a task thread"), "{said}");
    let said = answer(sim, &send(sim, &bob, Some(&thread), cc("status")))
        .await
        .content;
    assert!(
        said.contains("there is no task"),
        "a stranger's /cc status: {said}"
    );

    // /cc status: the thread's session, privately.
    let said = private(sim, &send(sim, &alice, Some(&thread), cc("status"))).await;
    assert!(
        said.starts_with(&format!("✅ **Done** · `{task3}` · "))
            && said.contains("📊")
            && said.contains("claude-")
            && said.contains("session `"),
        "{said}"
    );
    assert!(!said.contains("session `not started`"), "{said}");

    // /cc compact: the real CLI compacts the conversation; the thread says so with its size before.
    let compactions = w.fake.compactions().len();
    let said = publicly(sim, &alice, &thread, cc("compact")).await;
    let compacting = said.content.split('`').nth(1).unwrap().to_string();
    assert_eq!(
        said.content,
        format!("🗜️ Compacting the conversation (`{compacting}`)…")
    );
    let notice = message_in(sim, &thread, "the compaction notice", |m| {
        m.content.starts_with("🗜️ Context compacted (")
    })
    .await;
    let before: u64 = notice.content["🗜️ Context compacted (".len()..]
        .split(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("a token count: {}", notice.content));
    assert!(
        before > 0 && notice.content.ends_with(" tokens before)."),
        "{}",
        notice.content
    );
    assert_eq!(
        nth_summary(sim, &thread, 4).await,
        format!("✅ Done · {compacting}")
    );
    assert_eq!(
        w.fake.compactions().len(),
        compactions + 1,
        "the CLI asked the API for one summary"
    );
    // The next turn goes on from the summary, not the whole conversation.
    w.fake.push(Reply::text("still here"));
    sim.send_message(&sim.origin_in(&alice, &thread), "what did we do?")
        .unwrap();
    nth_summary(sim, &thread, 5).await;
    let conversation = w.fake.main_requests().last().unwrap().body["messages"].to_string();
    assert!(
        conversation.contains("summary by the fake API")
            && conversation.contains("what did we do?")
            && !conversation.contains("now write two.txt"),
        "the conversation after compaction: {conversation}"
    );

    // /cc model: said in the thread, shown by /cc status, used by the next turn.
    let said = publicly(
        sim,
        &alice,
        &thread,
        sub("cc", "model", [Opt::str("name", "haiku")]),
    )
    .await;
    assert_eq!(
        said.content,
        "🔁 From the next message on, Claude uses **haiku** (the conversation continues)."
    );
    let said = private(sim, &send(sim, &alice, Some(&thread), cc("status"))).await;
    assert!(
        said.contains("The next message switches to model **haiku**."),
        "{said}"
    );
    w.fake.push(Reply::text("on haiku"));
    sim.send_message(&sim.origin_in(&alice, &thread), "which model?")
        .unwrap();
    nth_summary(sim, &thread, 6).await;
    let last = w.fake.main_requests().last().unwrap().body.clone();
    assert!(
        last["model"].to_string().contains("haiku"),
        "{}",
        last["model"]
    );
    assert!(
        last["messages"]
            .to_string()
            .contains("summary by the fake API"),
        "the compacted session continued"
    );

    // /cc clear: the next message starts a conversation of its own.
    let said = publicly(sim, &alice, &thread, cc("clear")).await;
    assert!(
        said.content
            .starts_with("🧹 The next message here starts a fresh"),
        "{}",
        said.content
    );
    // Nothing to compact until then: refused, and the next message still starts afresh.
    let said = answer(sim, &send(sim, &alice, Some(&thread), cc("compact"))).await;
    assert_eq!(
        said.content,
        "⚠️ there is nothing to compact: after /cc clear the next message here starts a fresh session"
    );
    let said = private(sim, &send(sim, &alice, Some(&thread), cc("status"))).await;
    assert!(
        said.contains("The next message starts a fresh session."),
        "{said}"
    );
    w.fake.push(Reply::text("hello again"));
    sim.send_message(&sim.origin_in(&alice, &thread), "fresh start")
        .unwrap();
    nth_summary(sim, &thread, 7).await;
    let conversation = w.fake.main_requests().last().unwrap().body["messages"].to_string();
    assert!(
        conversation.contains("fresh start") && !conversation.contains("summary by the fake API"),
        "a new session: {conversation}"
    );

    // /cc stop interrupts what Claude is doing in the thread (running the job, or waiting to be allowed to).
    let job = LongJob::write(&w.project, 300);
    w.fake.push(Reply::tool_use(
        "Bash",
        json!({ "command": job.command(), "description": "Run the long job" }),
    ));
    sim.send_message(&sim.origin_in(&alice, &thread), "run the long job")
        .unwrap();
    message_in(
        sim,
        &thread,
        "the long job, running or asking to run",
        |m| {
            m.content.contains("▶ Bash `sh long-job.sh 300`")
                || (m.content.contains("long-job.sh")
                    && m.custom_ids().iter().any(|c| c.starts_with("ao:")))
        },
    )
    .await;
    let said = answer(sim, &send(sim, &bob, Some(&thread), cc("stop"))).await;
    assert!(
        said.content.contains("there is no task"),
        "a stranger cannot stop it: {}",
        said.content
    );
    let said = publicly(sim, &alice, &thread, cc("stop")).await;
    let stopped = said.content.split('`').nth(1).unwrap().to_string();
    assert_eq!(said.content, format!("⏹️ Stopping `{stopped}`…"));
    assert_eq!(
        nth_summary(sim, &thread, 8).await,
        format!("⏹️ Cancelled · {stopped}")
    );

    // /cancel in a task's thread stops its task, said in the open.
    let job = LongJob::write(&w.project, 300);
    w.fake.push(Reply::tool_use(
        "Bash",
        json!({ "command": job.command(), "description": "Run the long job" }),
    ));
    let (cancelled, thread2) = start_task(
        sim,
        &alice,
        SlashCommand::new("task")
            .opt(Opt::str("prompt", "wait"))
            .opt(Opt::str("project", "app")),
    )
    .await;
    message_in(sim, &thread2, "the Bash tool", |m| {
        m.content.contains("▶ Bash `sh long-job.sh 300`")
    })
    .await;
    let said = publicly(sim, &alice, &thread2, SlashCommand::new("cancel")).await;
    assert_eq!(said.content, format!("⏹️ Stopping `{cancelled}`…"));
    assert_eq!(
        nth_summary(sim, &thread2, 1).await,
        format!("⏹️ Cancelled · {cancelled}")
    );

    let refused: Vec<_> = sim
        .calls()
        .into_iter()
        .filter(|c| c.status >= 400)
        .collect();
    assert!(refused.is_empty(), "{refused:#?}");
    agent.stop().await.unwrap();
    w.relay.stop().await;
}
