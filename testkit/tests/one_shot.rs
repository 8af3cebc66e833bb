//! `claude -p` runs that exit after one turn: the text turn, API errors, and the logged-out case.

use std::process::Output;
use std::time::Duration;

use ct_testkit::{ClaudeEnv, FakeAnthropic, RecordedRequest, Reply, RequestKind, PINNED_VERSION};
use serde_json::Value;

/// Generous: two cores shared with other builds, and the CLI binary is 245 MB to load.
const T: Duration = Duration::from_secs(60);

async fn run(env: &ClaudeEnv, args: &[&str]) -> Output {
    let project = tempfile::tempdir().expect("temp project dir");
    let out = env.command(project.path()).args(args).output();
    tokio::time::timeout(T, out)
        .await
        .expect("claude finished in time")
        .expect("claude ran")
}

fn events(out: &Output) -> Vec<Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("non-JSON line {l:?}: {e}")))
        .collect()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The `HEAD /` the CLI sends at start (even logged out, and for `auth status`).
fn is_probe(r: &RecordedRequest) -> bool {
    r.method == "HEAD" && r.path == "/"
}

fn result_event(events: &[Value]) -> &Value {
    let results: Vec<_> = events.iter().filter(|e| e["type"] == "result").collect();
    assert_eq!(results.len(), 1, "exactly one result event in {events:#?}");
    results[0]
}

const ONE_SHOT: &[&str] = &["-p", "--output-format", "stream-json", "--verbose", "hi"];

#[tokio::test]
async fn version_is_pinned() {
    let fake = FakeAnthropic::start([]).await.expect("fake");
    let env = ClaudeEnv::new(fake.base_url()).expect("env");
    let out = run(&env, &["--version"]).await;
    assert!(out.status.success());
    assert_eq!(
        text(&out.stdout).trim(),
        format!("{PINNED_VERSION} (Claude Code)")
    );
    assert!(
        fake.requests().is_empty(),
        "--version must not call the API"
    );
}

#[tokio::test]
async fn one_shot_text_turn() {
    let fake = FakeAnthropic::start([Reply::text("Hello from the fake")])
        .await
        .expect("fake");
    let env = ClaudeEnv::new(fake.base_url()).expect("env");
    let out = run(&env, ONE_SHOT).await;
    assert!(
        out.status.success(),
        "rc {:?}, stderr {}",
        out.status,
        text(&out.stderr)
    );
    let events = events(&out);

    let init = &events[0];
    assert_eq!(
        (&init["type"], &init["subtype"]),
        (&"system".into(), &"init".into())
    );
    assert_eq!(init["claude_code_version"], PINNED_VERSION);
    assert_eq!(init["apiKeySource"], "ANTHROPIC_API_KEY");
    assert_eq!(init["permissionMode"], "default");

    let result = result_event(&events);
    assert_eq!(result["subtype"], "success");
    assert_eq!(result["is_error"], false);
    assert_eq!(result["result"], "Hello from the fake");
    assert_eq!(result["session_id"], init["session_id"]);

    // The prompt reached the fake in one main request, streamed, with tools; besides the `HEAD /`
    // connectivity probe at start, nothing else was sent.
    let reqs: Vec<_> = fake
        .requests()
        .into_iter()
        .filter(|r| !is_probe(r))
        .collect();
    assert_eq!(
        reqs.len(),
        1,
        "one request, no auxiliary traffic: {reqs:#?}"
    );
    let req = &reqs[0];
    assert_eq!(req.kind, RequestKind::Main);
    assert_eq!(req.path, "/v1/messages?beta=true");
    assert_eq!(req.body["stream"], true);
    let messages = req.body["messages"].as_array().expect("messages array");
    assert_eq!(messages[0]["role"], "user");
    let prompt = messages[0]["content"]
        .as_array()
        .and_then(|c| c.last())
        .expect("content blocks");
    assert_eq!(prompt["text"], "hi");
    // 2.1.197 appends a role "system" message (agent types and skills) after the user turn.
    assert_eq!(messages.last().map(|m| &m["role"]), Some(&"system".into()));
}

#[tokio::test]
async fn api_errors_become_error_results_after_retries() {
    for (status, result_text) in [
        (401, "Invalid API key · Fix external API key"),
        (
            429,
            "API Error: Request rejected (429) · Number of requests has exceeded your rate limit.",
        ),
        (529, "API Error: 529 Overloaded."),
        (500, "API Error: 500 Internal server error."),
    ] {
        // CLAUDE_CODE_MAX_RETRIES=1: one retry (about 0.5 s back-off), so two failing requests in all.
        let fake = FakeAnthropic::start([Reply::error(status), Reply::error(status)])
            .await
            .expect("fake");
        let mut env = ClaudeEnv::new(fake.base_url()).expect("env");
        env.set_var("CLAUDE_CODE_MAX_RETRIES", "1");
        let out = run(&env, ONE_SHOT).await;
        let events = events(&out);
        assert_eq!(out.status.code(), Some(1), "{status}: {events:#?}");

        let retry = events
            .iter()
            .find(|e| e["type"] == "system" && e["subtype"] == "api_retry")
            .unwrap_or_else(|| panic!("{status}: no api_retry in {events:#?}"));
        assert_eq!(retry["error_status"], status);
        assert_eq!(retry["attempt"], 1);
        assert_eq!(retry["max_retries"], 1);

        let result = result_event(&events);
        assert_eq!(result["subtype"], "success", "{status}");
        assert_eq!(result["is_error"], true, "{status}");
        assert_eq!(result["api_error_status"], status);
        let got = result["result"].as_str().unwrap_or_default();
        assert!(
            got.starts_with(result_text),
            "{status}: result text {got:?}"
        );
        assert_eq!(
            fake.main_requests().len(),
            2,
            "{status}: request + one retry"
        );
    }
}

#[tokio::test]
async fn logged_out() {
    let fake = FakeAnthropic::start([]).await.expect("fake");
    let env = ClaudeEnv::logged_out(fake.base_url()).expect("env");

    let out = run(&env, ONE_SHOT).await;
    let events = events(&out);
    assert_eq!(out.status.code(), Some(1));
    // Still a normal start: system/init first (apiKeySource "none"), then a synthetic assistant reply.
    assert_eq!(
        (&events[0]["type"], &events[0]["subtype"]),
        (&"system".into(), &"init".into())
    );
    assert_eq!(events[0]["apiKeySource"], "none");
    let assistant = events
        .iter()
        .find(|e| e["type"] == "assistant")
        .expect("assistant event");
    assert_eq!(assistant["error"], "authentication_failed");
    assert_eq!(assistant["message"]["model"], "<synthetic>");
    assert_eq!(
        assistant["message"]["content"][0]["text"],
        "Not logged in · Please run /login"
    );
    let result = result_event(&events);
    assert_eq!(result["subtype"], "success");
    assert_eq!(result["is_error"], true);
    assert_eq!(result["result"], "Not logged in · Please run /login");
    assert_eq!(result["api_error_status"], Value::Null);

    let plain = run(&env, &["-p", "hi"]).await;
    assert_eq!(plain.status.code(), Some(1));
    assert_eq!(text(&plain.stdout), "Not logged in · Please run /login\n");

    let status = run(&env, &["auth", "status"]).await;
    assert_eq!(status.status.code(), Some(1));
    let json: Value = serde_json::from_slice(&status.stdout).expect("auth status prints JSON");
    // Only the fields `ct-agent doctor` reads: newer CLIs add more (configDirectory, loginExpiresAt, ...).
    assert_eq!(json["loggedIn"], false, "{json}");
    assert_eq!(json["authMethod"], "none", "{json}");
    let reqs = fake.requests();
    assert!(
        reqs.iter().all(is_probe),
        "logged out, the CLI only probes `HEAD /`: {reqs:#?}"
    );

    let logged_in = ClaudeEnv::new(fake.base_url()).expect("env");
    let status = run(&logged_in, &["auth", "status"]).await;
    assert_eq!(status.status.code(), Some(0));
    let json: Value = serde_json::from_slice(&status.stdout).expect("auth status prints JSON");
    assert_eq!(json["loggedIn"], true, "{json}");
    assert_eq!(json["authMethod"], "api_key", "{json}");
}
