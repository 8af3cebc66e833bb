//! Tool output in a task's thread, end to end: the Discord simulator, the real relay and its bot, the real
//! agent, and the real Claude Code CLI (the newest pin) against the scripted Messages API. One task whose turn
//! runs a Bash command printing a known line, an Edit, a Bash command printing more than is shown inline,
//! one printing mentions, a code fence and a right-to-left override, and one printing 100 MB; everything is checked in what the
//! simulator recorded, as a person in the thread would see it.
//!
//! The world and the helpers are `discord.rs`'s.

use std::time::Duration;

use crate::discord::{gateway_config, message_in, private, start_task, world, World, T};
use crate::support::{pair, TestAgent, TestRelay};
use ct_relay::RelayConfig;
use ct_testkit::discord::{Opt, SimMessage, SlashCommand};
use ct_testkit::process::poll_until;
use ct_testkit::{eventually, eventually_async, LongJob, Reply};
use serde_json::{json, Value};

/// `/task` in the test project with a permission `mode`.
fn task(prompt: &str, mode: &str) -> SlashCommand {
    SlashCommand::new("task")
        .opt(Opt::str("prompt", prompt))
        .opt(Opt::str("project", "app"))
        .opt(Opt::str("mode", mode))
}

/// What of `content` is outside code (fenced blocks and inline spans): where Markdown and mentions act.
fn outside_code(content: &str) -> String {
    content
        .split("```")
        .step_by(2)
        .flat_map(|s| s.split('`').step_by(2))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_turns_tools_show_their_output_diffs_and_attachments_safely() {
    let w = world().await;
    let sim = &w.sim;
    let alice = sim.user("alice");
    pair(&w.relay, w.agent_dir.path(), &alice.id).await;
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
    let said = private(sim, &ix).await;
    assert!(said.contains("**app**"), "{said}");

    let notes = w.project.join("notes.txt");
    std::fs::write(&notes, "alpha\nbeta\ngamma\n").unwrap();
    // Printed by a file, so no shell quoting stands between the test and what the tool prints.
    let evil = "@everyone <@123> <@&456>\n```\n**not bold** \u{202e}gnp.exe\n```\nend";
    std::fs::write(w.project.join("evil.txt"), evil).unwrap();
    let long: String = (1..=400).map(|i| format!("row {i:04}\n")).collect();
    std::fs::write(w.project.join("long.txt"), &long).unwrap();

    w.fake.push(Reply::tool_use(
        "Bash",
        json!({ "command": "echo known-line-42", "description": "say it" }),
    ));
    w.fake.push(Reply::tool_use(
        "Edit",
        json!({ "file_path": notes.display().to_string(), "old_string": "beta", "new_string": "BETA" }),
    ));
    w.fake.push(Reply::tool_use(
        "Bash",
        json!({ "command": "cat long.txt", "description": "show it" }),
    ));
    w.fake.push(Reply::tool_use(
        "Bash",
        json!({ "command": "cat evil.txt", "description": "show it" }),
    ));
    // 100 MB printed: Claude Code keeps a preview, the agent at most 64 KiB, and the task goes on.
    w.fake.push(Reply::tool_use(
        "Bash",
        json!({ "command": "seq 1 12000000 | tr -d '\\n' | head -c 100000000; echo; echo after-the-flood", "description": "flood" }),
    ));
    w.fake.push(Reply::text("All five done."));
    // acceptEdits: the Edit runs without asking; read-only commands run without asking on the pinned CLI.
    let (task, thread) = start_task(sim, &alice, task("show me tools", "acceptEdits")).await;
    message_in(sim, &thread, "the summary", |m| {
        m.embeds.as_array().is_some_and(|e| !e.is_empty())
    })
    .await;
    assert_eq!(
        std::fs::read_to_string(&notes).unwrap(),
        "alpha\nBETA\ngamma\n"
    );
    let messages = sim.messages(&thread);
    let all = || messages.iter().map(|m| m.content.as_str());

    // 1. The Bash command's printed line, in a code block under the command and its exit status.
    let echo = all()
        .find(|c| c.contains("▶ `echo known-line-42`"))
        .unwrap_or_else(|| panic!("no echo line: {messages:#?}"));
    assert!(
        echo.contains("▶ `echo known-line-42` → ✅ exit 0\n```\nknown-line-42\n```"),
        "{echo}"
    );

    // 2. The edit as a diff.
    let edit = all()
        .find(|c| c.contains("```diff"))
        .unwrap_or_else(|| panic!("no diff: {messages:#?}"));
    assert!(edit.contains("✏️ Edit `"), "{edit}");
    assert!(edit.contains("\n-beta\n+BETA\n"), "{edit}");
    // From the CLI's own structuredPatch (with line numbers and context), not rebuilt from the input.
    assert!(
        edit.contains("@@ -1,3 +1,3 @@\n alpha\n-beta\n+BETA\n gamma\n```"),
        "{edit}"
    );

    // 3. Long output: the tail inline, the whole as a .txt attachment of its own.
    let tail = all()
        .find(|c| c.contains("▶ `cat long.txt`"))
        .unwrap_or_else(|| panic!("no long output: {messages:#?}"));
    assert!(tail.contains("row 0400\n```"), "the tail is shown: {tail}");
    assert!(!tail.contains("row 0001"), "not the whole: {tail}");
    assert!(tail.contains("attached"), "{tail}");
    let file = messages
        .iter()
        .flat_map(|m| &m.attachments)
        .find(|a| a.filename.ends_with(".txt"))
        .unwrap_or_else(|| panic!("no .txt attachment: {messages:#?}"));
    // The command, then the whole output (the CLI drops the last line feed).
    let whole = format!("$ cat long.txt\n{}", long.trim_end_matches('\n'));
    assert_eq!(file.size, whole.len(), "{file:?}");

    // 4. Nothing the tool printed can ping, break out of its block, or hide.
    let shown = all()
        .find(|c| c.contains("▶ `cat evil.txt`"))
        .unwrap_or_else(|| panic!("no evil output: {messages:#?}"));
    assert!(shown.contains("<U+202E>gnp.exe"), "{shown}");
    assert!(!shown.contains('\u{202e}'));
    for m in &messages {
        let out = outside_code(&m.content);
        assert!(
            !out.contains("@everyone") && !out.contains("<@123>") && !out.contains("<@&456>"),
            "a mention outside code: {:?}",
            m.content
        );
        assert!(!m.content.contains("**not bold**") || !out.contains("**not bold**"));
    }
    // Every message and edit in the thread went out with no mention allowed.
    let calls: Vec<Value> = sim
        .calls()
        .into_iter()
        .filter(|c| {
            (c.is("POST", &format!("/channels/{thread}/messages"))
                || c.is("PATCH", &format!("/channels/{thread}/messages/*")))
                && c.body["content"].as_str().is_some_and(|t| t.contains("▶"))
        })
        .map(|c| c.body)
        .collect();
    assert!(calls.len() >= 2, "{calls:#?}");
    for body in &calls {
        assert_eq!(
            body["allowed_mentions"]["parse"],
            json!([]),
            "mentions allowed in {body}"
        );
        for key in ["users", "roles"] {
            assert!(
                body["allowed_mentions"][key]
                    .as_array()
                    .is_none_or(Vec::is_empty),
                "{body}"
            );
        }
    }
    // The flood: the thread says it was cut, and the task went on to its end.
    let flood = all()
        .find(|c| c.contains("▶ `seq 1 12000000"))
        .unwrap_or_else(|| panic!("no flood: {messages:#?}"));
    assert!(flood.contains("too long for Claude Code"), "{flood}");
    assert!(flood.contains("→ ✅ exit 0"), "{flood}");

    // One turn, its tools in few messages (edited as they finished), each within Discord's limit.
    let tool_messages: Vec<&SimMessage> = messages
        .iter()
        .filter(|m| m.content.starts_with('▶') && m.attachments.is_empty())
        .collect();
    assert!(!tool_messages.is_empty());
    assert!(tool_messages.len() <= 3, "{tool_messages:#?}");
    assert!(tool_messages
        .iter()
        .all(|m| m.content.chars().count() <= 2000));
    assert!(messages.iter().any(|m| m.content == "All five done."));
    // The turn's message is written at the progress message's pace: a post or an edit, then none for about
    // a second (a lower bound by design, so a slow machine only spaces them more).
    let turn_msg = tool_messages[0];
    let writes: Vec<std::time::Instant> = sim
        .calls()
        .into_iter()
        .filter(|c| {
            c.is(
                "PATCH",
                &format!("/channels/{thread}/messages/{}", turn_msg.id),
            ) || (c.is("POST", &format!("/channels/{thread}/messages"))
                && c.response["id"].as_str() == Some(turn_msg.id.as_str()))
        })
        .map(|c| c.at)
        .collect();
    assert!(writes.len() >= 2, "posted, then edited: {writes:?}");
    for pair in writes.windows(2) {
        assert!(
            pair[1] - pair[0] >= Duration::from_millis(1000),
            "edits too close: {:?}",
            pair[1] - pair[0]
        );
    }

    // The relay stored the results whole, linked to their uses.
    let (_, stored, _) = w.relay.core.follow(&task).await.unwrap();
    assert!(stored.iter().any(|(_, e)| matches!(e,
        ct_protocol::task::TaskEvent::ToolResult { tool_use_id: Some(_), output: Some(o), exit_code: Some(0), .. }
            if o.ends_with("row 0400"))));
    // Every stored result is bounded, the flood's included.
    let biggest = stored
        .iter()
        .filter_map(|(_, e)| match e {
            ct_protocol::task::TaskEvent::ToolResult { output, .. } => {
                output.as_ref().map(String::len)
            }
            _ => None,
        })
        .max()
        .unwrap();
    assert!(biggest <= ct_protocol::task::MAX_EVENT_TEXT, "{biggest}");

    agent.stop().await.unwrap();
    w.relay.stop().await;
    w.sim.shutdown().await;
}

/// A relay restart while a Bash command runs: the turn's message posted before it is not posted again, and
/// the result that arrives after it shows in a line of its own naming the command.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_restart_mid_tool_posts_nothing_twice() {
    let w = world().await;
    let alice = w.sim.user("alice");
    pair(&w.relay, w.agent_dir.path(), &alice.id).await;
    let mut agent = TestAgent::start_with(w.run_options());
    agent.connected(T).await;
    let ix = w
        .sim
        .send_slash(
            &w.sim.origin(&alice),
            &SlashCommand::new("project").sub(
                "add",
                [
                    Opt::str("name", "app"),
                    Opt::str("path", &w.project.display().to_string()),
                ],
            ),
        )
        .unwrap();
    private(&w.sim, &ix).await;

    let job = LongJob::gated(&w.project);
    w.fake.push(Reply::tool_use(
        "Bash",
        json!({ "command": "echo before-the-restart", "description": "first" }),
    ));
    w.fake.push(Reply::tool_use(
        "Bash",
        json!({ "command": job.command(), "description": "Run the long job" }),
    ));
    w.fake.push(Reply::text("slept well"));
    let (task, thread) = start_task(&w.sim, &alice, task("run the long job", "default")).await;
    let me = std::process::id();
    tokio::select! {
        approval = message_in(&w.sim, &thread, "an approval", |m| m.custom_ids().iter().any(|c| c.starts_with("ao:"))) => {
            let id = approval.custom_ids().into_iter().find(|c| c.starts_with("ao:")).unwrap();
            w.sim.send_button(&w.sim.origin_in(&alice, &thread), &approval.id, &id).unwrap();
        }
        started = poll_until(T, "the long job runs", || job.child_below(me).is_some()) => {
            started.expect("the long job runs");
        }
    }
    poll_until(T, "the long job runs", || job.child_below(me).is_some())
        .await
        .expect("the long job runs");
    // The turn's message shows the first command's output and the job waiting, and the mark covers both.
    let command = job.command();
    message_in(&w.sim, &thread, "the turn's message", |m| {
        m.content.contains("before-the-restart\n```") && m.content.contains(" ⏳")
    })
    .await;
    eventually_async(T, async || {
        let (_, stored, _) = w.relay.core.follow(&task).await.unwrap();
        let tool_seq = stored
            .iter()
            .filter(|(_, e)| matches!(e, ct_protocol::task::TaskEvent::Tool { .. }))
            .map(|(seq, _)| *seq)
            .max();
        let marks: Vec<(String, Value)> = w.relay.core.store().thread_marks().unwrap();
        let posted = marks
            .iter()
            .find(|(t, _)| *t == task)
            .and_then(|(_, m)| m["posted"].as_u64());
        tool_seq.is_some_and(|s| posted >= Some(s))
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
    eventually(T, || fake.main_requests().len() >= 3).await;
    let mut config = RelayConfig::new(relay_dir, addr);
    config.bot = Some(gateway_config(&sim));
    let relay = TestRelay::start(config).await;
    message_in(&sim, &thread, "the summary", |m| {
        m.embeds.as_array().is_some_and(|e| !e.is_empty())
    })
    .await;

    let messages = sim.messages(&thread);
    let shown = format!("{messages:#?}");
    let with = |text: &str| messages.iter().filter(|m| m.content.contains(text)).count();
    // The first command's output is in the thread once: its message was not posted again.
    assert_eq!(with("before-the-restart\n```"), 1, "{shown}");
    // The job's result, after the restart, fills in its own line in the turn's message, in place: nothing is
    // left shown as waiting.
    let first_line = command.lines().next().unwrap().to_string();
    let results: Vec<&SimMessage> = messages
        .iter()
        .filter(|m| {
            m.content
                .lines()
                .any(|l| l == format!("▶ `{first_line}` → ✅ exit 0"))
        })
        .collect();
    assert_eq!(results.len(), 1, "{shown}");
    assert!(
        results[0].content.contains("before-the-restart\n```"),
        "the same message as before the restart: {shown}"
    );
    assert_eq!(with(" ⏳"), 0, "{shown}");
    assert_eq!(with("slept well"), 1, "{shown}");
    // No message was created twice (each create's nonce is unique in the thread).
    let nonces: Vec<&String> = messages.iter().filter_map(|m| m.nonce.as_ref()).collect();
    let unique: std::collections::HashSet<_> = nonces.iter().collect();
    assert_eq!(nonces.len(), unique.len(), "{shown}");
    agent.stop().await.unwrap();
    relay.stop().await;
    sim.shutdown().await;
}
