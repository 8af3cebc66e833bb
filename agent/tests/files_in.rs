//! Files in, end to end: a person attaches files in Discord (the `/task` file option, a message in a task's
//! thread); the bot downloads them from the simulator's CDN, the real relay keeps them with the task and sends
//! them in parts, the real agent saves them in the project under `.codetogether/attachments/<task>/` and names
//! them in the prompt, and the real Claude Code CLI reads them (and gets images as image content) from the
//! fake Messages API, which records what reached it.

use std::path::{Path, PathBuf};

use crate::discord::{
    add_project, approval_message, click, gateway_config, message_in, nth_summary, private,
    start_task, task_in_app, world, World, T,
};
use crate::support::TestAgent;
use ct_agent::projects::SharePolicy;
use ct_relay::store::TaskState;
use ct_relay::RelayConfig;
use ct_testkit::discord::{Opt, SimUser, SlashCommand};
use ct_testkit::{eventually, DiscordSim, FakeAnthropic, Reply};
use serde_json::{json, Value};

/// A 1×1 PNG.
const PNG: &[u8] = &[
    137, 80, 78, 71, 13, 10, 26, 10, 0, 0, 0, 13, 73, 72, 68, 82, 0, 0, 0, 1, 0, 0, 0, 1, 8, 6, 0,
    0, 0, 31, 21, 196, 137, 0, 0, 0, 13, 73, 68, 65, 84, 120, 156, 99, 248, 207, 192, 240, 31, 0,
    5, 0, 1, 255, 137, 153, 61, 29, 0, 0, 0, 0, 73, 69, 78, 68, 174, 66, 96, 130,
];

/// `/task` in project `app` with one file.
fn task_with(prompt: &str, file: &ct_testkit::discord::SimUpload) -> SlashCommand {
    task_in_app(prompt).opt(Opt::attachment("file", file))
}

/// The folder the last prompt in `text` names: `.codetogether/attachments/t_…` from "Attached files (in
/// DIR/): …".
fn named_dir(text: &str) -> Option<String> {
    let start = text.rfind("Attached files (in ")? + "Attached files (in ".len();
    let end = text[start..].find("/): ")? + start;
    Some(text[start..end].to_string())
}

/// The main requests whose JSON mentions `text`.
fn requests_with(fake: &FakeAnthropic, text: &str) -> Vec<Value> {
    fake.main_requests()
        .into_iter()
        .map(|r| r.body)
        .filter(|b| b.to_string().contains(text))
        .collect()
}

/// Waits for summary `n` of the thread, allowing any tool use the CLI asks about on the way.
async fn done(sim: &DiscordSim, user: &SimUser, thread: &str, task: &str, n: usize) -> String {
    loop {
        tokio::select! {
            title = nth_summary(sim, thread, n) => return title,
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

/// The last message of a request, for failure messages (the whole body is tens of kilobytes).
fn last_message(body: &Value) -> String {
    body["messages"]
        .as_array()
        .and_then(|m| m.last())
        .map(Value::to_string)
        .unwrap_or_default()
}

fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_reach_claude_from_a_task_a_thread_and_a_queue_and_never_escape_the_project() {
    let w = world().await;
    let sim = &w.sim;
    let alice = sim.user("alice");
    crate::support::pair(&w.relay, w.agent_dir.path(), &alice.id).await;
    // Shared tasks too (reported when the agent connects): a grantee's task runs sandboxed.
    w.sharing(SharePolicy::All);
    let mut agent = TestAgent::start_with(w.run_options());
    agent.connected(T).await;
    add_project(sim, &alice, &w.project).await;

    // /task with a text file: saved in the project, named in the prompt, and Claude's Read of it works.
    let notes = sim.upload(
        "notes.log",
        Some("text/plain; charset=utf-8"),
        b"the secret word is PAPAYA\n".to_vec(),
    );
    let project = w.project.clone();
    w.fake.push(Reply::with(move |body| {
        let dir = named_dir(&body.to_string()).expect("the prompt names the files' folder");
        let path = project.join(dir).join("notes.log");
        Reply::tool_use("Read", json!({ "file_path": path.display().to_string() }))
    }));
    w.fake.push(Reply::text("The word is PAPAYA."));
    let (task, thread) = start_task(sim, &alice, task_with("what does the log say?", &notes)).await;
    assert_eq!(
        done(sim, &alice, &thread, &task, 1).await,
        format!("✅ Done · {task}")
    );
    let dir = w.project.join(".codetogether/attachments").join(&task);
    assert_eq!(
        std::fs::read_to_string(dir.join("notes.log")).unwrap(),
        "the secret word is PAPAYA\n"
    );
    assert_eq!(
        std::fs::read_to_string(w.project.join(".codetogether/.gitignore")).unwrap(),
        "*\n",
        "git-ignored"
    );
    let asked = requests_with(&w.fake, "what does the log say?");
    let first = asked[0].to_string();
    assert!(
        first.contains(&format!(
            "Attached files (in .codetogether/attachments/{task}/): notes.log"
        )),
        "the prompt names the file: {first}"
    );
    let read_back = w
        .fake
        .main_requests()
        .into_iter()
        .flat_map(|r| r.tool_results().into_iter().cloned().collect::<Vec<_>>())
        .any(|r| r.to_string().contains("PAPAYA"));
    assert!(read_back, "Claude Code's Read returned the file's text");
    assert_eq!(sim.downloads().len(), 1, "one download from the CDN");
    assert!(
        w.relay.core.store().task_files(&task).unwrap().is_empty(),
        "delivered files are not kept by the relay"
    );

    // A message in the thread with an image continues the same session with it: saved, named, and given to
    // the API as an image block.
    let shot = sim.upload("shot.png", Some("image/png"), PNG.to_vec());
    w.fake.push(Reply::text("A tiny red square."));
    sim.send_message_with_files(
        &sim.origin_in(&alice, &thread),
        "and this picture?",
        &[shot],
    )
    .unwrap();
    nth_summary(sim, &thread, 2).await;
    let asked = requests_with(&w.fake, "and this picture?");
    let body = asked.first().expect("the follow-up reached the API");
    assert!(
        body.to_string().contains("what does the log say?"),
        "the follow-up continues the conversation: {}",
        last_message(body)
    );
    let image = body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["content"].as_array())
        .flatten()
        .find(|b| b["type"] == "image")
        .unwrap_or_else(|| panic!("no image block reached the API: {}", last_message(body)));
    assert_eq!(image["source"]["media_type"], "image/png");
    use base64::Engine;
    assert_eq!(
        image["source"]["data"],
        base64::engine::general_purpose::STANDARD.encode(PNG)
    );
    let follow_dir = named_dir(&body.to_string()).expect("the follow-up names its file");
    assert_eq!(
        std::fs::read(w.project.join(&follow_dir).join("shot.png")).unwrap(),
        PNG
    );

    // 50 MB, by what Discord reports: refused before anything is downloaded, and nothing starts.
    let (threads, requests) = (sim.threads().len(), w.fake.main_requests().len());
    let huge = sim.upload_claiming("huge.bin", None, b"tiny really".to_vec(), 50_000_000);
    let ix = sim
        .send_slash(&sim.origin(&alice), &task_with("read this", &huge))
        .unwrap();
    let said = private(sim, &ix).await;
    assert!(
        said.contains("\"huge.bin\" is 47.7 MiB, over the 8.0 MiB a file may be")
            && said.contains("nothing was started"),
        "{said}"
    );
    assert!(
        sim.downloads().iter().all(|c| !c.path.contains(&huge.id)),
        "never downloaded"
    );
    assert_eq!(sim.threads().len(), threads, "no thread");
    assert_eq!(w.fake.main_requests().len(), requests, "no task");

    // A name that tries to climb out is saved as a plain name inside the task's folder.
    let evil = sim.upload("../../etc/passwd", None, b"root:x:0:0\n".to_vec());
    w.fake.push(Reply::text("A passwd-like file."));
    let (task, thread) = start_task(sim, &alice, task_with("what is this?", &evil)).await;
    done(sim, &alice, &thread, &task, 1).await;
    let dir = w.project.join(".codetogether/attachments").join(&task);
    assert_eq!(listing(&dir), ["etc_passwd"]);
    assert!(!w.allowed.join("etc").exists() && !w.project.join("etc").exists());
    let asked = requests_with(&w.fake, "what is this?");
    assert!(
        asked[0].to_string().contains("): etc_passwd"),
        "{}",
        asked[0]
    );

    // A project whose .codetogether is a symlink out of it: the task fails saying so; nothing is written there.
    let outside = tempfile::tempdir().unwrap();
    let linked = w.allowed.join("linked");
    std::fs::create_dir(&linked).unwrap();
    std::os::unix::fs::symlink(outside.path(), linked.join(".codetogether")).unwrap();
    let said = private(
        sim,
        &sim.send_slash(
            &sim.origin(&alice),
            &SlashCommand::new("project").sub(
                "add",
                [
                    Opt::str("name", "linked"),
                    Opt::str("path", &linked.display().to_string()),
                ],
            ),
        )
        .unwrap(),
    )
    .await;
    assert!(said.contains("**linked**"), "{said}");
    let sneaky = sim.upload("a.txt", None, b"hello".to_vec());
    let (_task, thread) = start_task(
        sim,
        &alice,
        SlashCommand::new("task")
            .opt(Opt::str("prompt", "read it"))
            .opt(Opt::str("project", "linked"))
            .opt(Opt::attachment("file", &sneaky)),
    )
    .await;
    let failed = nth_summary(sim, &thread, 1).await;
    assert!(failed.starts_with("❌"), "{failed}");
    let shown = serde_json::to_string(
        &sim.messages(&thread)
            .iter()
            .map(|m| (&m.content, &m.embeds))
            .collect::<Vec<_>>(),
    )
    .unwrap();
    assert!(shown.contains("symbolic link"), "{shown}");
    assert!(
        listing(outside.path()).is_empty(),
        "nothing written outside"
    );

    // Before any share, gina naming alice's agents with a file is refused, and the file is never fetched: a
    // stranger cannot make the bot download (and hold up others' downloads) for a task they may not run.
    let gina = sim.user("gina");
    let early = sim.upload("early.txt", None, b"not yet".to_vec());
    let said = private(
        sim,
        &sim.send_slash(
            &sim.origin(&gina),
            &task_with("read it", &early).opt(Opt::user("target", &alice)),
        )
        .unwrap(),
    )
    .await;
    assert!(
        said.contains("has not shared their agents with you"),
        "{said}"
    );
    // Nor for someone with no agent at all.
    let said = private(
        sim,
        &sim.send_slash(
            &sim.origin(&sim.user("mallory")),
            &task_with("read it", &early),
        )
        .unwrap(),
    )
    .await;
    assert!(said.contains("you have no agent paired yet"), "{said}");
    assert!(
        sim.downloads().iter().all(|c| !c.path.contains(&early.id)),
        "never downloaded"
    );

    // A grantee's task runs in the sandbox, and reads its file there (the project folder is bound into it).
    let said = private(
        sim,
        &sim.send_slash(
            &sim.origin(&alice),
            &SlashCommand::new("share").sub("add", [Opt::user("user", &gina)]),
        )
        .unwrap(),
    )
    .await;
    assert!(said.contains(&gina.id), "{said}");
    let spec = sim.upload(
        "spec.md",
        Some("text/markdown"),
        b"# GRANTEE-SPEC
"
        .to_vec(),
    );
    let project = w.project.clone();
    w.fake.push(Reply::with(move |body| {
        let dir = named_dir(&body.to_string()).expect("the prompt names the files' folder");
        let path = project.join(dir).join("spec.md");
        Reply::tool_use("Read", json!({ "file_path": path.display().to_string() }))
    }));
    w.fake.push(Reply::text("Read the spec."));
    let (gtask, gthread) = start_task(
        sim,
        &gina,
        task_with("read the spec", &spec).opt(Opt::user("target", &alice)),
    )
    .await;
    // Any approval goes to the owner.
    assert_eq!(
        done(sim, &alice, &gthread, &gtask, 1).await,
        format!("✅ Done · {gtask}")
    );
    let read_back = w
        .fake
        .main_requests()
        .into_iter()
        .flat_map(|r| r.tool_results().into_iter().cloned().collect::<Vec<_>>())
        .any(|r| r.to_string().contains("GRANTEE-SPEC"));
    assert!(read_back, "the sandboxed task read its file");

    queued_while_offline(w, agent).await;
}

/// A task with a file waits in the agent's queue (its one slot is taken), the agent goes away and the relay
/// restarts; when the agent connects again, the task starts with its file.
async fn queued_while_offline(w: World, agent: TestAgent) {
    let run_options = w.run_options();
    let World {
        sim,
        relay,
        fake,
        _dirs,
        project,
        ..
    } = w;
    let alice = sim.user("alice");
    let addr = relay.addr;
    let relay_dir: PathBuf = _dirs[2].path().to_path_buf();
    let config = || {
        let mut config = RelayConfig::new(relay_dir.clone(), addr);
        config.bot = Some(gateway_config(&sim));
        config.core.max_running_per_agent = 1;
        config
    };
    relay.stop().await;
    let relay = crate::support::TestRelay::start(config()).await;
    let mut agent = agent;
    agent.connected(T).await;

    // The slot: a task waiting for an approval.
    fake.push(Reply::tool_use(
        "Write",
        crate::discord::write(&project.join("slot.txt"), "x"),
    ));
    let (holder, holder_thread) = start_task(&sim, &alice, task_in_app("hold the slot")).await;
    approval_message(&sim, &holder_thread, &holder).await;

    let queued_file = sim.upload("queued.txt", None, b"waited in line\n".to_vec());
    let (task, thread) = start_task(
        &sim,
        &alice,
        task_with("read the queued file", &queued_file),
    )
    .await;
    let rec = relay.core.store().task(&task).unwrap().unwrap();
    assert_eq!((rec.state, rec.files), (TaskState::Queued, 1));
    assert_eq!(relay.core.store().task_files(&task).unwrap().len(), 1);

    agent.stop().await.unwrap();
    relay.stop().await;
    let relay = crate::support::TestRelay::start(config()).await;
    fake.push(Reply::text("Read it."));
    let mut run = TestAgent::start_with(run_options);
    run.connected(T).await;

    nth_summary(&sim, &thread, 1).await;
    assert_eq!(
        std::fs::read_to_string(
            project
                .join(".codetogether/attachments")
                .join(&task)
                .join("queued.txt")
        )
        .unwrap(),
        "waited in line\n"
    );
    assert!(
        requests_with(&fake, "read the queued file")[0]
            .to_string()
            .contains("): queued.txt"),
        "the prompt names the file"
    );
    eventually(T, || {
        relay.core.store().task_files(&task).unwrap().is_empty()
    })
    .await;
    run.stop().await.unwrap();
    relay.stop().await;
    sim.shutdown().await;
}
