//! Long-lived stream-json sessions: approvals over stdio (allow and deny), a second turn, interrupt, and
//! `--resume` after the process exited.

use std::time::Duration;

use ct_testkit::process::{cmdline, poll_until};
use ct_testkit::{ClaudeEnv, ClaudeProcess, FakeAnthropic, LongJob, Reply, SESSION_ARGS};
use serde_json::{json, Value};

/// Generous: two cores shared with other builds, and the CLI binary is 245 MB to load.
const T: Duration = Duration::from_secs(60);

struct Setup {
    fake: FakeAnthropic,
    env: ClaudeEnv,
    project: tempfile::TempDir,
}

async fn setup() -> Setup {
    let fake = FakeAnthropic::start([]).await.expect("fake");
    let env = ClaudeEnv::new(fake.base_url()).expect("env");
    let project = tempfile::tempdir().expect("temp project dir");
    Setup { fake, env, project }
}

fn request_id(control_request: &Value) -> String {
    control_request["request_id"]
        .as_str()
        .expect("request_id")
        .to_owned()
}

#[tokio::test]
async fn allow_write_then_second_turn_in_same_session() {
    let s = setup().await;
    let target = s.project.path().join("hello.txt");
    s.fake.push(Reply::tool_use(
        "Write",
        json!({ "file_path": target, "content": "hi there\n" }),
    ));
    s.fake.push(Reply::text("wrote it"));

    let mut claude = ClaudeProcess::spawn(&s.env, s.project.path(), SESSION_ARGS).expect("spawn");
    claude.send_user("write hello.txt").await.expect("send");

    let ask = claude
        .wait_for_control_request(T, "can_use_tool")
        .await
        .expect("can_use_tool");
    let req = &ask["request"];
    assert_eq!(req["tool_name"], "Write");
    assert_eq!(req["display_name"], "Write");
    assert_eq!(
        req["input"],
        json!({ "file_path": target, "content": "hi there\n" })
    );
    assert_eq!(req["description"], "hello.txt");
    assert!(
        req["tool_use_id"]
            .as_str()
            .is_some_and(|id| id.starts_with("toolu_")),
        "{ask}"
    );
    assert_eq!(
        req["permission_suggestions"],
        json!([{ "type": "setMode", "mode": "acceptEdits", "destination": "session" }])
    );
    assert!(!target.exists(), "nothing written before the approval");
    claude
        .allow(&request_id(&ask), &req["input"])
        .await
        .expect("allow");

    let first = claude.wait_for_result(T).await.expect("first result");
    assert_eq!(first["subtype"], "success");
    assert_eq!(first["result"], "wrote it");
    assert_eq!(first["num_turns"], 2);
    assert_eq!(
        std::fs::read_to_string(&target).expect("file written"),
        "hi there\n"
    );
    let tool_result = claude
        .events()
        .iter()
        .find(|e| e["type"] == "user")
        .expect("a user event with the tool_result");
    assert_eq!(tool_result["tool_use_result"]["type"], "create");
    let session_id = first["session_id"].clone();

    s.fake.push(Reply::text("second answer"));
    claude.send_user("and now?").await.expect("send");
    let second = claude.wait_for_result(T).await.expect("second result");
    assert_eq!(second["result"], "second answer");
    assert_eq!(second["session_id"], session_id);
    assert_eq!(second["num_turns"], 1, "num_turns counts per turn");

    // Every turn starts with its own system/init, all in the one session.
    let inits: Vec<_> = claude
        .events()
        .iter()
        .filter(|e| e["subtype"] == "init")
        .collect();
    assert_eq!(inits.len(), 2);
    assert!(inits.iter().all(|e| e["session_id"] == session_id));

    // The second turn's request carries the first turn, tool_result included.
    let main = s.fake.main_requests();
    assert_eq!(main.len(), 3);
    assert_eq!(main[2].tool_results().len(), 1);

    claude.close_stdin();
    let status = claude.wait_exit(T).await.expect("exit");
    assert_eq!(status.code(), Some(0), "stderr: {}", claude.stderr());
}

#[tokio::test]
async fn deny_reaches_the_model_as_an_error_tool_result() {
    const DENIAL: &str = "CodeTogether: the owner denied this write";
    let s = setup().await;
    let target = s.project.path().join("nope.txt");
    s.fake.push(Reply::tool_use(
        "Write",
        json!({ "file_path": target, "content": "x" }),
    ));
    // Echo the tool_result back, so the result event shows what the model was told.
    s.fake.push(Reply::with(|body| {
        let last = body["messages"].as_array().and_then(|m| {
            m.iter()
                .rev()
                .find(|m| m["role"] == "user" && m["content"].to_string().contains("tool_result"))
        });
        let result = last
            .and_then(|m| m["content"].as_array())
            .and_then(|c| c.iter().find(|b| b["type"] == "tool_result"))
            .map(|b| b["content"].to_string())
            .unwrap_or_else(|| "no tool_result".into());
        Reply::text(format!("saw: {result}"))
    }));

    let mut claude = ClaudeProcess::spawn(&s.env, s.project.path(), SESSION_ARGS).expect("spawn");
    claude.send_user("write nope.txt").await.expect("send");
    let ask = claude
        .wait_for_control_request(T, "can_use_tool")
        .await
        .expect("can_use_tool");
    claude.deny(&request_id(&ask), DENIAL).await.expect("deny");

    let result = claude.wait_for_result(T).await.expect("result");
    assert_eq!(result["subtype"], "success");
    assert!(
        result["result"]
            .as_str()
            .is_some_and(|r| r.starts_with("saw: ") && r.contains(DENIAL)),
        "{result}"
    );
    assert!(!target.exists(), "denied write must not happen");

    let denials = result["permission_denials"]
        .as_array()
        .expect("permission_denials");
    assert_eq!(denials.len(), 1, "{result}");
    assert_eq!(denials[0]["tool_name"], "Write");
    assert_eq!(
        denials[0]["tool_input"],
        json!({ "file_path": target, "content": "x" })
    );

    let main = s.fake.main_requests();
    assert_eq!(main.len(), 2);
    let results = main[1].tool_results();
    assert_eq!(results.len(), 1);
    assert_eq!(results[0]["is_error"], true);
    assert_eq!(
        results[0]["content"], DENIAL,
        "the deny message reaches the model verbatim"
    );
}

#[tokio::test]
async fn interrupt_ends_the_turn_and_kills_the_bash_child() {
    let s = setup().await;
    let project = std::fs::canonicalize(s.project.path()).expect("canonical project");
    let job = LongJob::write(&project, 300);
    s.fake.push(Reply::tool_use(
        "Bash",
        json!({ "command": job.command(), "description": "Run the long job" }),
    ));

    let mut claude = ClaudeProcess::spawn(&s.env, s.project.path(), SESSION_ARGS).expect("spawn");
    let cli_pid = claude.pid().expect("pid");
    claude.send_user("wait a while").await.expect("send");

    // Whether the CLI asks before running a project script is its own business: allow it if asked.
    let started = claude
        .wait_for(T, |e| {
            e["subtype"] == "task_started"
                || (e["type"] == "control_request" && e["request"]["subtype"] == "can_use_tool")
        })
        .await
        .expect("tool started or asked");
    if started["type"] == "control_request" {
        claude
            .allow(&request_id(&started), &started["request"]["input"])
            .await
            .expect("allow");
    } else {
        assert_eq!(started["task_type"], "local_bash");
    }

    let mut sleep_pid = None;
    poll_until(T, "the long job's `sleep` runs below the CLI", || {
        sleep_pid = job.child_below(cli_pid);
        sleep_pid.is_some()
    })
    .await
    .expect("sleep started");
    let sleep_pid = sleep_pid.expect("found above");

    let interrupt_id = claude.interrupt().await.expect("interrupt");
    let ack = claude
        .wait_for(T, |e| e["type"] == "control_response")
        .await
        .expect("interrupt acknowledged");
    // The fields the agent reads; 2.1.332 adds `response: {"still_queued": [...]}`.
    assert_eq!(ack["response"]["subtype"], "success", "{ack}");
    assert_eq!(
        ack["response"]["request_id"],
        interrupt_id.as_str(),
        "{ack}"
    );

    let result = claude.wait_for_result(T).await.expect("result");
    assert_eq!(result["subtype"], "error_during_execution");
    assert_eq!(result["is_error"], true);
    assert_eq!(result["terminal_reason"], "aborted_tools");
    assert!(
        result.get("result").is_none(),
        "no result text on error results: {result}"
    );
    poll_until(T, "the interrupted job is gone", || {
        cmdline(sleep_pid).is_none()
    })
    .await
    .expect("sleep killed");

    // The interrupted tool surfaces as a rejected tool_result.
    let rejected = claude
        .events()
        .iter()
        .find(|e| e["type"] == "user" && e["tool_use_result"] == "User rejected tool use")
        .cloned();
    assert!(rejected.is_some(), "events: {}", claude.recent_events());

    // The process survives an interrupt and takes the next turn.
    assert!(cmdline(cli_pid).is_some(), "CLI still running");
    s.fake.push(Reply::text("still here"));
    claude.send_user("are you there?").await.expect("send");
    let next = claude.wait_for_result(T).await.expect("next result");
    assert_eq!(next["result"], "still here");
    assert_eq!(next["session_id"], result["session_id"]);

    claude.close_stdin();
    let status = claude.wait_exit(T).await.expect("exit");
    assert_eq!(status.code(), Some(0), "stderr: {}", claude.stderr());
}

#[tokio::test]
async fn resume_from_same_cwd_continues_the_conversation() {
    let s = setup().await;
    s.fake.push(Reply::text("noted: the word is ostrich"));
    let one_shot = ["-p", "--output-format", "stream-json", "--verbose"];

    let mut first = ClaudeProcess::spawn(
        &s.env,
        s.project.path(),
        &[&one_shot[..], &["remember ostrich"]].concat(),
    )
    .expect("spawn");
    let result = first.wait_for_result(T).await.expect("first result");
    let status = first.wait_exit(T).await.expect("first exit");
    assert!(status.success(), "stderr: {}", first.stderr());
    let session_id = result["session_id"]
        .as_str()
        .expect("session_id")
        .to_owned();

    // The transcript lives under the config dir, keyed by the sanitized cwd.
    let sessions = s.env.config_dir().join("projects");
    let transcript = std::fs::read_dir(&sessions)
        .expect("projects dir")
        .filter_map(|d| d.ok())
        .map(|d| d.path().join(format!("{session_id}.jsonl")))
        .find(|p| p.exists());
    assert!(
        transcript.is_some(),
        "no {session_id}.jsonl under {}",
        sessions.display()
    );

    s.fake.push(Reply::with(|body| {
        let history = body["messages"].to_string();
        let saw =
            history.contains("remember ostrich") && history.contains("noted: the word is ostrich");
        Reply::text(if saw {
            "it was ostrich"
        } else {
            "I have no memory"
        })
    }));
    let mut second = ClaudeProcess::spawn(
        &s.env,
        s.project.path(),
        &[
            &one_shot[..],
            &["--resume", &session_id, "what was the word?"],
        ]
        .concat(),
    )
    .expect("spawn");
    let resumed = second.wait_for_result(T).await.expect("resumed result");
    assert_eq!(
        resumed["result"], "it was ostrich",
        "the fake got the earlier turn"
    );
    assert_eq!(
        resumed["session_id"],
        session_id.as_str(),
        "--resume keeps the session id"
    );
    assert!(second.wait_exit(T).await.expect("second exit").success());

    let main = s.fake.main_requests();
    assert_eq!(main.len(), 2);
    let roles: Vec<_> = main[1].body["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| m["role"].as_str().unwrap_or("?").to_owned())
        .collect();
    // The first turn's role "system" message (agent types, skills) is replayed as part of the history.
    assert_eq!(
        roles,
        ["user", "system", "assistant", "user"],
        "history replayed first"
    );
}

#[tokio::test]
async fn interrupt_while_approval_pending_cancels_the_request() {
    let s = setup().await;
    let target = s.project.path().join("pending.txt");
    s.fake.push(Reply::tool_use(
        "Write",
        json!({ "file_path": target, "content": "y" }),
    ));

    let mut claude = ClaudeProcess::spawn(&s.env, s.project.path(), SESSION_ARGS).expect("spawn");
    claude.send_user("write pending.txt").await.expect("send");
    let ask = claude
        .wait_for_control_request(T, "can_use_tool")
        .await
        .expect("can_use_tool");
    claude.interrupt().await.expect("interrupt");

    let cancel = claude
        .wait_for(T, |e| e["type"] == "control_cancel_request")
        .await
        .expect("pending approval cancelled");
    assert_eq!(
        cancel,
        json!({ "type": "control_cancel_request", "request_id": ask["request_id"] })
    );
    let result = claude.wait_for_result(T).await.expect("result");
    assert_eq!(result["subtype"], "error_during_execution");
    assert_eq!(
        result["permission_denials"][0]["tool_name"], "Write",
        "{result}"
    );
    assert!(!target.exists());

    // Closing stdin right after an error result: the process exits 1 (the last result decides).
    claude.close_stdin();
    let status = claude.wait_exit(T).await.expect("exit");
    assert_eq!(status.code(), Some(1));
}
