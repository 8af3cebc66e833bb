//! The agent's Claude Code runner against the real pinned CLI and the scripted fake API: approvals (allow
//! once, deny, allow for the session, timeout, withdrawal), queued follow-ups, resume, cancel without
//! orphans, and the preflight failures (not installed, too old, not logged in). The contract runs against both
//! pinned CLIs (see [`contract!`]).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ct_agent::claude::{Decision, RunnerEvent, Session, SessionSpec, TaskError, TurnResult};
use ct_protocol::scope::SessionScope;
use ct_testkit::process::{cmdline, descendants_of, poll_until};
use ct_testkit::{ClaudeEnv, Cli, FakeAnthropic, LongJob, Reply};
use serde_json::{json, Value};
use tokio::sync::mpsc;

/// Generous: two cores shared with other builds, and the CLI binary is 245 MB to load.
const T: Duration = Duration::from_secs(90);

/// The runner's contract: each of these runs against both pinned CLIs (`claude_runner::newest::NAME` and
/// `claude_runner::minimum::NAME`), the newest tested and the oldest supported ([`ct_agent::claude::MIN_VERSION`]).
macro_rules! contract {
    ($($name:ident),* $(,)?) => {
        mod newest {
            $(#[tokio::test]
            async fn $name() {
                super::$name(ct_testkit::Cli::Newest).await
            })*
        }
        mod minimum {
            $(#[tokio::test]
            async fn $name() {
                super::$name(ct_testkit::Cli::Minimum).await
            })*
        }
    };
}

contract!(
    allow_once_writes_the_file_in_the_project,
    deny_tells_the_model_why_and_writes_nothing,
    allow_for_the_session_covers_the_same_file_only_and_writes_no_settings,
    a_bash_prefix_rule_never_covers_a_chained_command_and_rules_can_be_forgotten,
    a_follow_up_sent_during_a_turn_is_queued_and_gets_its_own_result,
    resume_after_exit_continues_the_same_session,
    cancel_leaves_no_process_behind,
    dropping_the_handle_kills_the_whole_tree,
    an_unanswered_approval_times_out_to_deny,
    interrupt_withdraws_a_pending_approval_and_the_session_goes_on,
    logged_out_fails_with_the_login_instruction,
    ask_user_question_gets_the_users_answers,
);

/// The pins are the range the agent claims: the oldest is exactly `MIN_VERSION`, the newest exactly the newest
/// version `ct-agent doctor` calls tested.
#[test]
fn the_pinned_clis_are_the_ends_of_the_supported_range() {
    assert_eq!(
        ct_agent::claude::MIN_VERSION.to_string(),
        ct_testkit::MIN_PINNED_VERSION
    );
    assert_eq!(
        ct_agent::claude::NEWEST_TESTED.to_string(),
        ct_testkit::PINNED_VERSION
    );
}

struct Setup {
    fake: FakeAnthropic,
    env: ClaudeEnv,
    _project: tempfile::TempDir,
    /// Canonical project folder (the CLI reports and stores sessions under the real path).
    project: PathBuf,
}

async fn setup(cli: Cli) -> Setup {
    setup_with(cli, false).await
}

async fn setup_with(cli: Cli, logged_out: bool) -> Setup {
    let fake = FakeAnthropic::start([]).await.expect("fake");
    let env = if logged_out {
        ClaudeEnv::logged_out(fake.base_url())
    } else {
        ClaudeEnv::new(fake.base_url())
    }
    .expect("env")
    .with_cli(cli);
    let dir = tempfile::tempdir().expect("project dir");
    let project = std::fs::canonicalize(dir.path()).expect("canonical");
    Setup {
        fake,
        env,
        _project: dir,
        project,
    }
}

impl Setup {
    fn spec(&self) -> SessionSpec {
        let mut spec = SessionSpec::new(&self.project);
        spec.claude_bin = Some(self.env.cli().bin());
        spec.env_clear = true;
        spec.env = self
            .env
            .vars()
            .iter()
            .map(|(k, v)| (OsString::from(k), OsString::from(v)))
            .collect();
        spec.cancel_step = Duration::from_secs(10);
        spec
    }

    async fn start(&self, spec: SessionSpec) -> (Session, Events) {
        let (session, rx) = Session::start(spec).await.expect("session starts");
        (
            session,
            Events {
                rx,
                seen: Vec::new(),
            },
        )
    }
}

/// The event stream, with everything seen kept for assertions and failure messages.
struct Events {
    rx: mpsc::Receiver<RunnerEvent>,
    seen: Vec<RunnerEvent>,
}

impl Events {
    async fn wait_for(&mut self, what: &str, pred: impl Fn(&RunnerEvent) -> bool) -> RunnerEvent {
        let deadline = tokio::time::Instant::now() + T;
        loop {
            let next = tokio::time::timeout_at(deadline, self.rx.recv()).await;
            match next {
                Ok(Some(ev)) => {
                    self.seen.push(ev.clone());
                    if pred(&ev) {
                        return ev;
                    }
                }
                Ok(None) => panic!("event stream ended before {what}; events: {:#?}", self.seen),
                Err(_) => panic!("no {what} within {T:?}; events: {:#?}", self.seen),
            }
        }
    }

    async fn approval(&mut self) -> ct_agent::claude::ApprovalRequest {
        match self
            .wait_for("an approval request", |e| {
                matches!(e, RunnerEvent::ApprovalRequested(_))
            })
            .await
        {
            RunnerEvent::ApprovalRequested(req) => req,
            _ => unreachable!(),
        }
    }

    async fn result(&mut self) -> TurnResult {
        match self
            .wait_for("a turn result", |e| matches!(e, RunnerEvent::TurnResult(_)))
            .await
        {
            RunnerEvent::TurnResult(r) => r,
            _ => unreachable!(),
        }
    }

    async fn exited(&mut self) -> ct_agent::claude::ExitInfo {
        match self
            .wait_for("the exit", |e| matches!(e, RunnerEvent::Exited(_)))
            .await
        {
            RunnerEvent::Exited(info) => info,
            _ => unreachable!(),
        }
    }

    fn count(&self, pred: impl Fn(&RunnerEvent) -> bool) -> usize {
        self.seen.iter().filter(|e| pred(e)).count()
    }
}

/// A reply that echoes the last tool_result the model received, so the result text shows what it was told.
fn echo_tool_result() -> Reply {
    Reply::with(|body| {
        let result = body["messages"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| m["content"].as_array())
            .flatten()
            .rfind(|b| b["type"] == "tool_result")
            .map(|b| b["content"].to_string())
            .unwrap_or_else(|| "no tool_result".into());
        Reply::text(format!("saw: {result}"))
    })
}

fn write_input(path: &Path, content: &str) -> Value {
    json!({ "file_path": path, "content": content })
}

async fn allow_once_writes_the_file_in_the_project(cli: Cli) {
    let s = setup(cli).await;
    let target = s.project.join("hello.txt");
    s.fake
        .push(Reply::tool_use("Write", write_input(&target, "hi\n")));
    s.fake.push(Reply::text("wrote it"));

    let (session, mut ev) = s.start(s.spec()).await;
    session.send("write hello.txt").expect("send");
    let init = match ev
        .wait_for("init", |e| matches!(e, RunnerEvent::Init(_)))
        .await
    {
        RunnerEvent::Init(i) => i,
        _ => unreachable!(),
    };
    assert_eq!(init.version, cli.version());
    assert_eq!(Path::new(&init.cwd), s.project);
    assert!(init.tools.iter().any(|t| t == "Write"), "{init:?}");
    assert_eq!(
        session.session_id().as_deref(),
        Some(init.session_id.as_str())
    );

    let ask = ev.approval().await;
    assert_eq!(ask.tool, "Write");
    assert_eq!(ask.input, write_input(&target, "hi\n"));
    assert!(!target.exists(), "nothing written before the approval");
    session
        .decide(
            &ask.id,
            Decision::AllowOnce {
                updated_input: None,
            },
        )
        .expect("decide");

    let result = ev.result().await;
    assert_eq!(result.subtype, "success");
    assert!(!result.is_error);
    assert_eq!(result.text.as_deref(), Some("wrote it"));
    assert_eq!(result.num_turns, Some(2));
    assert_eq!(result.session_id, init.session_id);
    assert_eq!(std::fs::read_to_string(&target).expect("written"), "hi\n");
    assert!(
        ev.seen
            .iter()
            .any(|e| matches!(e, RunnerEvent::ToolUse { name, summary, .. }
            if name == "Write" && Path::new(summary) == target)),
        "{:#?}",
        ev.seen
    );
    assert!(ev.seen.iter().any(|e| matches!(
        e,
        RunnerEvent::ToolResult {
            is_error: false,
            ..
        }
    )));

    session.close().expect("close");
    let exit = ev.exited().await;
    assert_eq!(exit.code, Some(0), "{exit:?}");
}

async fn deny_tells_the_model_why_and_writes_nothing(cli: Cli) {
    const REASON: &str = "not in this repo, please";
    let s = setup(cli).await;
    let target = s.project.join("nope.txt");
    s.fake
        .push(Reply::tool_use("Write", write_input(&target, "x")));
    s.fake.push(echo_tool_result());

    let (session, mut ev) = s.start(s.spec()).await;
    session.send("write nope.txt").expect("send");
    let ask = ev.approval().await;
    session
        .decide(
            &ask.id,
            Decision::Deny {
                reason: REASON.into(),
            },
        )
        .expect("decide");
    let result = ev.result().await;
    assert!(
        result.text.as_deref().is_some_and(|t| t.contains(REASON)),
        "{result:?}"
    );
    assert_eq!(result.permission_denials.len(), 1, "{result:?}");
    assert!(!target.exists(), "a denied write must not happen");
    let main = s.fake.main_requests();
    let told = main[1].tool_results();
    assert_eq!(told[0]["content"], REASON);
    assert_eq!(told[0]["is_error"], true);
    // A late second answer to the same request is ignored.
    session
        .decide(
            &ask.id,
            Decision::AllowOnce {
                updated_input: None,
            },
        )
        .expect("ignored, not an error");
    session.close().expect("close");
    ev.exited().await;
    assert!(!target.exists());
}

/// "Allow for session" covers the same use, not the tool: the same file again passes without asking (and is
/// reported), another file asks; nothing is written into the project's settings.
async fn allow_for_the_session_covers_the_same_file_only_and_writes_no_settings(cli: Cli) {
    let s = setup(cli).await;
    let a = s.project.join("a.txt");
    let b = s.project.join("b.txt");
    s.fake.push(Reply::tool_use("Write", write_input(&a, "a")));
    s.fake
        .push(Reply::tool_use("Write", write_input(&a, "a again")));
    s.fake.push(Reply::tool_use("Write", write_input(&b, "b")));
    s.fake.push(Reply::text("written"));

    let (session, mut ev) = s.start(s.spec()).await;
    session.send("write a twice and b").expect("send");
    let ask = ev.approval().await;
    assert!(
        !ask.suggestions.is_empty(),
        "the CLI offers suggestions: {ask:?}"
    );
    session
        .decide(&ask.id, Decision::AllowSession { prefix: None })
        .expect("decide");
    // The second write of a.txt is allowed by the rule; b.txt is another file, so it asks.
    let ask_b = ev.approval().await;
    assert_eq!(ask_b.input["file_path"], json!(b), "{ask_b:?}");
    let rule = SessionScope::File {
        path: a.display().to_string(),
    };
    assert_eq!(
        ev.count(|e| matches!(e, RunnerEvent::ApprovalAutoAllowed { tool, rule: r, .. } if tool == "Write" && *r == rule)),
        1,
        "{:#?}",
        ev.seen
    );
    session
        .decide(
            &ask_b.id,
            Decision::Deny {
                reason: "not b".into(),
            },
        )
        .expect("decide");
    let result = ev.result().await;
    assert_eq!(result.text.as_deref(), Some("written"), "{result:?}");
    assert_eq!(std::fs::read_to_string(&a).expect("a"), "a again");
    assert!(!b.exists(), "b.txt was asked about and denied");
    assert!(
        !s.project.join(".claude").exists(),
        "nothing may be written into the project's .claude/"
    );
    session.close().expect("close");
    ev.exited().await;
    assert!(!s.project.join(".claude/settings.local.json").exists());
}

/// A Bash prefix rule covers simple commands that start with it and nothing chained onto them; forgetting
/// the rules (a new task on the same process) makes the same command ask again.
async fn a_bash_prefix_rule_never_covers_a_chained_command_and_rules_can_be_forgotten(cli: Cli) {
    let s = setup(cli).await;
    let bash = |c: &str| json!({ "command": c, "description": "npm test" });
    s.fake.push(Reply::tool_use("Bash", bash("touch one.txt")));
    s.fake.push(Reply::tool_use("Bash", bash("touch two.txt")));
    s.fake.push(Reply::tool_use(
        "Bash",
        bash("touch three.txt && touch four.txt"),
    ));
    s.fake.push(Reply::text("first turn"));
    s.fake.push(Reply::tool_use("Bash", bash("touch five.txt")));
    s.fake.push(Reply::text("second turn"));

    let (session, mut ev) = s.start(s.spec()).await;
    session.send("touch things").expect("send");
    let ask = ev.approval().await;
    assert_eq!(ask.input["command"], "touch one.txt");
    session
        .decide(
            &ask.id,
            Decision::AllowSession {
                prefix: Some("touch".into()),
            },
        )
        .expect("decide");
    // `touch two.txt` passes under the rule; the chained command asks.
    let chained = ev.approval().await;
    assert_eq!(
        chained.input["command"], "touch three.txt && touch four.txt",
        "{:#?}",
        ev.seen
    );
    session
        .decide(
            &chained.id,
            Decision::Deny {
                reason: "no".into(),
            },
        )
        .expect("decide");
    ev.result().await;
    assert!(s.project.join("one.txt").exists() && s.project.join("two.txt").exists());
    assert!(!s.project.join("three.txt").exists());
    let touch = SessionScope::Prefix {
        prefix: "touch".into(),
    };
    assert_eq!(
        ev.count(|e| matches!(e, RunnerEvent::RuleAdded { rule } if *rule == touch)),
        1,
        "{:#?}",
        ev.seen
    );
    assert_eq!(
        ev.count(|e| matches!(e, RunnerEvent::ApprovalAutoAllowed { summary, .. } if summary == "touch two.txt")),
        1,
        "{:#?}",
        ev.seen
    );

    session.forget_rules().expect("forget");
    session.send("touch five").expect("send");
    let again = ev.approval().await;
    assert_eq!(again.input["command"], "touch five.txt");
    session
        .decide(
            &again.id,
            Decision::AllowOnce {
                updated_input: None,
            },
        )
        .expect("decide");
    ev.result().await;
    session.close().expect("close");
    ev.exited().await;
}

async fn a_follow_up_sent_during_a_turn_is_queued_and_gets_its_own_result(cli: Cli) {
    const FOLLOW_UP: &str = "and also this, later";
    let s = setup(cli).await;
    let target = s.project.join("first.txt");
    s.fake
        .push(Reply::tool_use("Write", write_input(&target, "1")));
    s.fake.push(Reply::text("first done"));
    s.fake.push(Reply::text("second done"));

    let (session, mut ev) = s.start(s.spec()).await;
    session.send("first task").expect("send");
    // The turn is running (it waits for this approval) when the follow-up arrives.
    let ask = ev.approval().await;
    session.send(FOLLOW_UP).expect("send follow-up");
    ev.wait_for("queued", |e| {
        matches!(e, RunnerEvent::Queued { position: 1 })
    })
    .await;
    session
        .decide(
            &ask.id,
            Decision::AllowOnce {
                updated_input: None,
            },
        )
        .expect("decide");

    let first = ev.result().await;
    assert_eq!(first.text.as_deref(), Some("first done"));
    let second = ev.result().await;
    assert_eq!(second.text.as_deref(), Some("second done"));
    assert_eq!(second.session_id, first.session_id);
    assert_eq!(second.num_turns, Some(1));

    // The follow-up was not injected into the first turn: only the third request carries it.
    let main = s.fake.main_requests();
    assert_eq!(main.len(), 3);
    assert!(!main[1].body.to_string().contains(FOLLOW_UP));
    assert!(main[2].body.to_string().contains(FOLLOW_UP));
    session.close().expect("close");
    assert_eq!(ev.exited().await.code, Some(0));
}

async fn resume_after_exit_continues_the_same_session(cli: Cli) {
    const MARKER: &str = "remember the number 4217";
    let s = setup(cli).await;
    s.fake.push(Reply::text("noted"));
    let (first, mut ev) = s.start(s.spec()).await;
    first.send(MARKER).expect("send");
    let r1 = ev.result().await;
    first.close().expect("close");
    assert_eq!(ev.exited().await.code, Some(0));
    let id = first.session_id().expect("session id");
    assert_eq!(r1.session_id, id);

    s.fake.push(Reply::text("it was 4217"));
    let mut spec = s.spec();
    spec.resume = Some(id.clone());
    let (second, mut ev) = s.start(spec).await;
    second.send("what was the number?").expect("send");
    let r2 = ev.result().await;
    assert_eq!(r2.session_id, id, "same session after --resume");
    assert_eq!(r2.text.as_deref(), Some("it was 4217"));
    let last = s.fake.main_requests().pop().expect("a request");
    assert!(
        last.body["messages"].to_string().contains(MARKER),
        "the resumed request replays the earlier prompt"
    );
    second.close().expect("close");
    ev.exited().await;
}

/// Starts the project's long job through the Bash tool (answering its approval if the CLI asks) and returns
/// the pid of the `sleep` it runs, once that runs below the CLI.
async fn start_long_job(s: &Setup, session: &Session, ev: &mut Events) -> u32 {
    let job = LongJob::write(&s.project, 300);
    s.fake.push(Reply::tool_use(
        "Bash",
        json!({ "command": job.command(), "description": "Run the long job" }),
    ));
    session.send("run the long job").expect("send");
    let started = ev
        .wait_for("the Bash tool starting or asking", |e| match e {
            RunnerEvent::ApprovalRequested(_) => true,
            RunnerEvent::Raw(v) => v["subtype"] == "task_started",
            _ => false,
        })
        .await;
    if let RunnerEvent::ApprovalRequested(req) = started {
        session
            .decide(
                &req.id,
                Decision::AllowOnce {
                    updated_input: None,
                },
            )
            .expect("allow");
    }
    let cli = session.pid();
    let mut child = None;
    poll_until(T, "the long job's `sleep` runs below the CLI", || {
        child = job.child_below(cli);
        child.is_some()
    })
    .await
    .expect("long job started");
    child.expect("found above")
}

async fn cancel_leaves_no_process_behind(cli: Cli) {
    let s = setup(cli).await;
    let (session, mut ev) = s.start(s.spec()).await;
    let child = start_long_job(&s, &session, &mut ev).await;
    let claude = session.pid();
    let tree = descendants_of(claude);
    assert!(tree.contains(&child));

    let exit = session.cancel().await;
    // The interrupt ended the turn, then stdin was closed: the CLI exits 1 after an error result.
    assert_eq!(exit.code, Some(1), "{exit:?}");
    let result = ev.result().await;
    assert_eq!(result.subtype, "error_during_execution");
    ev.exited().await;
    poll_until(T, "every process of the tree is gone", || {
        tree.iter()
            .chain([&claude])
            .all(|&pid| cmdline(pid).is_none())
    })
    .await
    .expect("no orphans");
    assert!(session.send("more?").is_err(), "the session has ended");
}

async fn dropping_the_handle_kills_the_whole_tree(cli: Cli) {
    // SIGKILL of the CLI alone would orphan the job (the Bash tool gives it its own process group); the tree
    // kill must reach it.
    let s = setup(cli).await;
    let (session, mut ev) = s.start(s.spec()).await;
    let child = start_long_job(&s, &session, &mut ev).await;
    let claude = session.pid();
    let job_group = ct_agent::claude::process::proc_info(child)
        .expect("the job's sleep in /proc")
        .pgrp;
    assert_ne!(
        job_group, claude,
        "the Bash tool runs commands outside the CLI's process group"
    );
    drop(session);
    let exit = ev.exited().await;
    assert_eq!(exit.signal, Some(9), "{exit:?}");
    poll_until(T, "the CLI and the job are gone", || {
        cmdline(child).is_none() && cmdline(claude).is_none()
    })
    .await
    .expect("no orphans");
}

async fn an_unanswered_approval_times_out_to_deny(cli: Cli) {
    let s = setup(cli).await;
    let target = s.project.join("late.txt");
    s.fake
        .push(Reply::tool_use("Write", write_input(&target, "x")));
    s.fake.push(echo_tool_result());
    let mut spec = s.spec();
    spec.approval_timeout = Duration::from_secs(1);

    let (session, mut ev) = s.start(spec).await;
    session.send("write late.txt").expect("send");
    let ask = ev.approval().await;
    ev.wait_for(
        "the timeout",
        |e| matches!(e, RunnerEvent::ApprovalTimedOut { id } if *id == ask.id),
    )
    .await;
    let result = ev.result().await;
    assert!(
        result
            .text
            .as_deref()
            .is_some_and(|t| t.contains("timed out")),
        "the model is told it timed out: {result:?}"
    );
    assert!(!target.exists());
    // Deciding afterwards changes nothing.
    session
        .decide(
            &ask.id,
            Decision::AllowOnce {
                updated_input: None,
            },
        )
        .expect("ignored");
    session.close().expect("close");
    ev.exited().await;
    assert!(!target.exists());
}

async fn interrupt_withdraws_a_pending_approval_and_the_session_goes_on(cli: Cli) {
    let s = setup(cli).await;
    let target = s.project.join("never.txt");
    s.fake
        .push(Reply::tool_use("Write", write_input(&target, "x")));

    let (session, mut ev) = s.start(s.spec()).await;
    session.send("write never.txt").expect("send");
    let ask = ev.approval().await;
    session.interrupt().expect("interrupt");
    ev.wait_for(
        "the withdrawal",
        |e| matches!(e, RunnerEvent::ApprovalWithdrawn { id } if *id == ask.id),
    )
    .await;
    let result = ev.result().await;
    assert_eq!(result.subtype, "error_during_execution");
    // A decision after the withdrawal is not sent (the CLI must not get an answer to a cancelled request).
    session
        .decide(
            &ask.id,
            Decision::AllowOnce {
                updated_input: None,
            },
        )
        .expect("ignored");

    s.fake.push(Reply::text("still here"));
    session.send("are you there?").expect("send");
    let next = ev.result().await;
    assert_eq!(next.text.as_deref(), Some("still here"));
    assert!(!target.exists());
    session.close().expect("close");
    ev.exited().await;
}

async fn logged_out_fails_with_the_login_instruction(cli: Cli) {
    let s = setup_with(cli, true).await;
    let (session, mut ev) = s.start(s.spec()).await;
    session.send("hi").expect("send");
    let failed = ev
        .wait_for("the failure", |e| matches!(e, RunnerEvent::Failed(_)))
        .await;
    let RunnerEvent::Failed(err) = failed else {
        unreachable!()
    };
    assert!(matches!(err, TaskError::NotLoggedIn { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.starts_with("Claude Code is not logged in on "), "{msg}");
    assert!(msg.contains("run `claude login` there"), "{msg}");
    assert_eq!(ev.count(|e| matches!(e, RunnerEvent::TurnResult(_))), 0);
    ev.exited().await;
    assert!(s.fake.main_requests().is_empty());
}

#[tokio::test]
async fn a_missing_binary_says_how_to_install() {
    let s = setup(Cli::Newest).await;
    let mut spec = s.spec();
    spec.claude_bin = Some(s.project.join("no-such-claude"));
    let err = Session::start(spec).await.expect_err("must fail");
    assert!(matches!(err, TaskError::NotInstalled { .. }), "{err:?}");
    assert!(
        err.to_string().starts_with(
            "Claude Code is not installed on this machine: install it with \
             `npm install -g @anthropic-ai/claude-code` (needs Node.js 18+)"
        ),
        "{err}"
    );
}

#[tokio::test]
async fn a_too_old_binary_says_how_to_upgrade() {
    let s = setup(Cli::Newest).await;
    let old = s.project.join("claude");
    ct_testkit::process::write_executable(&old, "#!/bin/sh\necho '1.0.3 (Claude Code)'\n");
    let mut spec = s.spec();
    spec.claude_bin = Some(old);
    let err = Session::start(spec).await.expect_err("must fail");
    assert!(
        matches!(&err, TaskError::TooOld { found, .. } if found == "1.0.3"),
        "{err:?}"
    );
    assert!(err.to_string().contains("too old"), "{err}");
    assert!(
        err.to_string()
            .contains("npm install -g @anthropic-ai/claude-code@latest"),
        "{err}"
    );
}

async fn ask_user_question_gets_the_users_answers(cli: Cli) {
    let s = setup(cli).await;
    s.fake.push(Reply::tool_use(
        "AskUserQuestion",
        json!({ "questions": [{
            "question": "Which database should I use?",
            "header": "Database",
            "options": [
                { "label": "Postgres", "description": "relational" },
                { "label": "SQLite", "description": "embedded" }
            ],
            "multiSelect": false
        }] }),
    ));
    s.fake.push(echo_tool_result());

    let (session, mut ev) = s.start(s.spec()).await;
    session.send("set up storage").expect("send");
    let ask = ev.approval().await;
    assert_eq!(ask.tool, "AskUserQuestion");
    session
        .decide(
            &ask.id,
            Decision::Answers(json!({ "Which database should I use?": "SQLite" })),
        )
        .expect("decide");
    let result = ev.result().await;
    // 2.1.197 words it: Your questions have been answered: "Which database should I use?"="SQLite". ...
    assert!(
        result
            .text
            .as_deref()
            .is_some_and(|t| t.contains(r#"\"Which database should I use?\"=\"SQLite\""#)),
        "the model gets the answer: {result:?}"
    );
    session.close().expect("close");
    ev.exited().await;
}

/// A newer CLI may print event types, content blocks and control requests this agent has never seen. None of
/// them may break the task: unknown lines are skipped (and logged once), and an unknown control request gets an
/// error answer, because the CLI waits for one. Fed by a scripted stand-in for the CLI, since no real version
/// prints these on cue.
#[tokio::test]
async fn unknown_events_and_control_requests_are_skipped_and_the_turn_goes_on() {
    let s = setup(Cli::Newest).await;
    let cli = s.project.join("claude-from-the-future");
    ct_testkit::process::write_executable(
        &cli,
        r#"#!/bin/sh
case "$1" in --version) echo '2.1.332 (Claude Code)'; exit 0;; esac
IFS= read -r prompt
echo '{"type":"system","subtype":"init","session_id":"s-new","model":"m","cwd":"/p","tools":[],"claude_code_version":"9.9.9","permissionMode":"default","apiKeySource":"ANTHROPIC_API_KEY"}'
echo '{"type":"hologram","subtype":"projected","extra":{"nested":[1,2]}}'
echo 'not json at all'
echo '{"type":"control_request","request_id":"cr-1","request":{"subtype":"teleport","where":"mars"}}'
IFS= read -r answer
printf '%s\n' "$answer" > control-answer.json
echo '{"type":"assistant","message":{"content":[{"type":"text","text":"still fine"},{"type":"brand_new_block","x":1}]}}'
echo '{"type":"result","subtype":"success","is_error":false,"result":"still fine","session_id":"s-new","num_turns":1,"a_new_field":true}'
IFS= read -r rest || true
exit 0
"#,
    );
    let mut spec = s.spec();
    spec.claude_bin = Some(cli);
    let (session, mut ev) = s.start(spec).await;
    session.send("go").expect("send");
    let result = ev.result().await;
    assert_eq!(result.text.as_deref(), Some("still fine"), "{:#?}", ev.seen);
    assert!(!result.is_error);
    let answer: Value = serde_json::from_str(
        &std::fs::read_to_string(s.project.join("control-answer.json"))
            .expect("the CLI got an answer"),
    )
    .expect("the answer is JSON");
    assert_eq!(answer["type"], "control_response", "{answer}");
    assert_eq!(answer["response"]["subtype"], "error", "{answer}");
    assert_eq!(answer["response"]["request_id"], "cr-1", "{answer}");
    assert!(
        answer["response"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("teleport")),
        "{answer}"
    );
    assert_eq!(
        ev.count(|e| matches!(e, RunnerEvent::Failed(_) | RunnerEvent::Error { .. })),
        0,
        "{:#?}",
        ev.seen
    );
    assert_eq!(
        ev.count(|e| matches!(e, RunnerEvent::AssistantText { text } if text == "still fine")),
        1
    );
    session.close().expect("close");
    assert_eq!(ev.exited().await.code, Some(0));
}
