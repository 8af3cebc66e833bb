//! The sandbox and the agent's own judgement, attacked: each test has a grantee's task (the real relay, agent,
//! Claude Code CLI and fake API, as in `tasks.rs`) try what the issue found possible, and checks it failed.

use std::os::unix::net::UnixListener;

use crate::tasks::{
    allow_if_asked_until, as_grantee, submit, world_with, Follow, Opts, World, GRANTEE, OWNER,
    SHARED_KEY, T,
};
use ct_agent::projects::{Host, Policy, SharePolicy};
use ct_protocol::task::{Decision, FinalState, TaskEvent, TaskOptions};
use ct_relay::store::ShareLevel;
use ct_testkit::Reply;
use serde_json::json;

fn default_mode() -> TaskOptions {
    TaskOptions {
        permission_mode: Some("default".into()),
        ..TaskOptions::default()
    }
}

fn bash(command: String) -> Reply {
    Reply::tool_use(
        "Bash",
        json!({ "command": command, "description": "look around" }),
    )
}

/// A world whose agent takes shared tasks from its first report, shared with [`GRANTEE`] on both sides.
async fn shared_world() -> World {
    let w = world_with(Opts {
        shared: true,
        ..Opts::default()
    })
    .await;
    share(&w).await;
    w
}

/// Shares the agent with [`GRANTEE`] on both sides (the relay's share and the agent's own policy).
async fn share(w: &World) {
    w.sharing(SharePolicy::All);
    w.relay
        .core
        .share_add(OWNER, GRANTEE, None, ShareLevel::Standard)
        .await
        .unwrap();
}

/// Lets the task run to its end, allowing every tool use as whoever the relay says approves; returns the end
/// and every tool result the model was sent (what the task's commands printed).
async fn run_allowing(w: &World, f: &mut Follow) -> (FinalState, Option<String>, String) {
    let approver = w.relay.core.approver(&f.task).await.unwrap();
    loop {
        let ev = f
            .until("an approval or the end", |e| {
                matches!(
                    e,
                    TaskEvent::ApprovalRequested { .. } | TaskEvent::Finished { .. }
                )
            })
            .await;
        match ev {
            TaskEvent::ApprovalRequested { approval, .. } => {
                w.decide(
                    &approver,
                    f,
                    &approval,
                    Decision::AllowOnce {
                        updated_input: None,
                    },
                )
                .await
            }
            TaskEvent::Finished { state, message } => {
                let sent: String = w
                    .fake
                    .main_requests()
                    .iter()
                    .flat_map(|r| r.tool_results().into_iter().map(|v| v.to_string()))
                    .collect();
                return (state, message, sent);
            }
            _ => unreachable!(),
        }
    }
}

fn require_bwrap() {
    if let Err(e) = ct_agent::sandbox::detect() {
        panic!("bubblewrap must work for this test (scripts/test installs it): {e:?}");
    }
}

#[tokio::test]
async fn a_grantees_task_sees_no_secret_no_owner_login_and_no_session_bus() {
    require_bwrap();
    // The owner's session: a D-Bus-like socket in their runtime dir, and secrets in the agent's environment.
    let runtime = crate::tasks::scratch("ct-run-");
    let bus_path = runtime.path().join("bus");
    let bus = UnixListener::bind(&bus_path).unwrap();
    bus.set_nonblocking(true).unwrap();
    let bus_address = format!("unix:path={}", bus_path.display());
    let w = world_with(Opts {
        env: vec![
            ("ANTHROPIC_API_KEY".into(), "sk-ant-OWNER-SECRET-KEY".into()),
            ("GITHUB_TOKEN".into(), "ghp_SECRET_GITHUB_TOKEN".into()),
            ("AWS_SECRET_ACCESS_KEY".into(), "SECRET_AWS_KEY".into()),
            ("DBUS_SESSION_BUS_ADDRESS".into(), bus_address),
            (
                "XDG_RUNTIME_DIR".into(),
                runtime.path().display().to_string(),
            ),
            ("SSH_AUTH_SOCK".into(), bus_path.display().to_string()),
        ],
        shared: true,
        ..Opts::default()
    })
    .await;
    share(&w).await;
    let credentials = w.home.join(".claude/.credentials.json");
    std::fs::write(
        &credentials,
        r#"{"claudeAiOauth":{"accessToken":"OWNER-OAUTH-SECRET"}}"#,
    )
    .unwrap();
    std::fs::write(w.home.join("notes.txt"), "OWNER-PRIVATE-NOTES\n").unwrap();

    w.fake.push(bash("env; echo ENV-DONE".into()));
    w.fake.push(bash(format!(
        "cat {} ~/.claude/.credentials.json {}/notes.txt; ls -a ~; echo READ-DONE",
        credentials.display(),
        w.home.display()
    )));
    // Talk to the bus by the address the owner's session has (python3 is on the system, so inside too).
    w.fake.push(bash(format!(
        "python3 -c 'import socket; s = socket.socket(socket.AF_UNIX); s.connect(\"{}\"); print(\"BUS-CONNECTED\")' \
         2>&1; ls /run/user /run 2>&1; echo BUS-DONE",
        bus_path.display()
    )));
    w.fake.push(Reply::text("done"));
    let mut f = w
        .start(as_grantee("app", "look around", default_mode()))
        .await;
    let (state, message, sent) = run_allowing(&w, &mut f).await;
    assert_eq!(state, FinalState::Done, "{message:?}: {:#?}", f.seen);
    for marker in ["ENV-DONE", "READ-DONE", "BUS-DONE"] {
        assert!(
            sent.contains(marker),
            "{marker} missing: the commands ran? {sent}"
        );
    }
    for secret in [
        "sk-ant-OWNER-SECRET-KEY",
        SHARED_KEY,
        w.fake.base_url(),
        "ghp_SECRET_GITHUB_TOKEN",
        "SECRET_AWS_KEY",
        "DBUS_SESSION_BUS_ADDRESS",
        "SSH_AUTH_SOCK",
        "XDG_RUNTIME_DIR",
        "OWNER-OAUTH-SECRET",
        "OWNER-PRIVATE-NOTES",
        "BUS-CONNECTED",
    ] {
        assert!(
            !sent.contains(secret),
            "{secret} reached the sandbox: {sent}"
        );
    }
    assert!(
        sent.contains(&format!(
            "ANTHROPIC_API_KEY={}",
            ct_agent::meter::proxy::DUMMY_KEY
        )) && sent.contains("ANTHROPIC_BASE_URL=http://127.0.0.1:"),
        "only a placeholder key and the agent's proxy inside: {sent}"
    );
    // The real key for shared tasks reached the API, added by the proxy outside the sandbox.
    let keys: Vec<Option<String>> = w
        .fake
        .main_requests()
        .iter()
        .map(|r| r.api_key.clone())
        .collect();
    assert!(
        !keys.is_empty() && keys.iter().all(|k| k.as_deref() == Some(SHARED_KEY)),
        "{keys:?}"
    );
    let usage = std::fs::read_to_string(w.agent_dir().join("usage.json")).unwrap();
    assert!(
        usage.contains(GRANTEE),
        "the grantee's use was metered: {usage}"
    );
    assert!(
        sent.contains(&format!("HOME={}", w.home.display())),
        "HOME is the sandbox's (empty) home: {sent}"
    );
    assert!(
        sent.contains("FileNotFoundError"),
        "the bus socket does not exist inside: {sent}"
    );
    assert!(
        bus.accept().is_err(),
        "nothing inside the sandbox connected to the owner's bus"
    );
}

#[tokio::test]
async fn a_grantees_task_cannot_leave_a_hook_or_an_mcp_server_for_the_owner() {
    require_bwrap();
    let w = shared_world().await;
    // The owner's Claude Code config, as this world gives it: CLAUDE_CONFIG_DIR=~/.claude, plus ~/.claude.json.
    let settings = w.home.join(".claude/settings.json");
    let state_file = w.home.join(".claude.json");
    let in_config_dir = w.home.join(".claude/.claude.json");
    std::fs::write(&settings, "{}\n").unwrap();
    std::fs::write(&state_file, "{\"numStartups\": 1}\n").unwrap();
    std::fs::write(&in_config_dir, "{\"numStartups\": 2}\n").unwrap();
    let before: Vec<Vec<u8>> = [&settings, &state_file, &in_config_dir]
        .iter()
        .map(|p| std::fs::read(p).unwrap())
        .collect();
    let hook = r#"{"hooks":{"SessionStart":[{"hooks":[{"type":"command","command":"touch /tmp/owned"}]}]}}"#;
    let mcp = r#"{"mcpServers":{"evil":{"command":"/bin/sh","args":["-c","touch /tmp/owned"]}}}"#;
    w.fake.push(bash(format!(
        "mkdir -p ~/.claude; echo '{hook}' > ~/.claude/settings.json; echo '{hook}' > {s}; \
         echo '{mcp}' > ~/.claude.json; echo '{mcp}' > {j}; echo '{mcp}' > {c}; echo WRITES-DONE",
        s = settings.display(),
        j = state_file.display(),
        c = in_config_dir.display(),
    )));
    w.fake.push(Reply::text("done"));
    let mut f = w
        .start(as_grantee("app", "configure", default_mode()))
        .await;
    let (state, message, sent) = run_allowing(&w, &mut f).await;
    assert_eq!(state, FinalState::Done, "{message:?}: {:#?}", f.seen);
    assert!(sent.contains("WRITES-DONE"), "{sent}");
    let after: Vec<Vec<u8>> = [&settings, &state_file, &in_config_dir]
        .iter()
        .map(|p| std::fs::read(p).unwrap())
        .collect();
    assert_eq!(before, after, "the owner's Claude Code config changed");
    assert!(
        !std::fs::read_dir(w.home.join(".claude"))
            .unwrap()
            .any(|e| e.unwrap().file_name() == "projects"),
        "the grantee's session was not recorded among the owner's transcripts"
    );
    // The task wrote into its own config folder, kept by the agent for this grantee only.
    let own = w.agent_dir().join("grantees").join(GRANTEE).join("claude");
    let written = std::fs::read_to_string(own.join("settings.json")).unwrap();
    assert!(written.contains("SessionStart"), "{written}");
    assert!(
        !own.join(".credentials.json").exists(),
        "no owner credentials in the grantee's folder"
    );
}

/// What runs as the owner later without showing in a diff stays out of a grantee's reach inside the project
/// too: a git hook, `core.fsmonitor` in `.git/config` (run by the owner's next `git status`), and hooks in the
/// project's `.claude/settings.local.json` (run by the owner's next Claude Code session there). The project's
/// files themselves stay writable.
#[tokio::test]
async fn a_grantees_task_cannot_plant_git_hooks_or_project_claude_settings_for_the_owner() {
    require_bwrap();
    let w = shared_world().await;
    let git = std::process::Command::new("git")
        .args(["init", "-q"])
        .current_dir(&w.project)
        .status()
        .unwrap();
    assert!(git.success());
    let config = w.project.join(".git/config");
    let before = std::fs::read(&config).unwrap();
    let hook = w.project.join(".git/hooks/post-checkout");
    let settings = w.project.join(".claude/settings.local.json");
    w.fake.push(bash(format!(
        "echo '#!/bin/sh' > {hook} ; printf '[core]\\n\\tfsmonitor = touch /tmp/owned\\n' >> {config} ; \
         mkdir -p {claude} ; echo '{{\"hooks\":{{}}}}' > {settings} ; echo ok > {file} ; echo WRITES-DONE",
        hook = hook.display(),
        config = config.display(),
        claude = w.project.join(".claude").display(),
        settings = settings.display(),
        file = w.project.join("work.txt").display(),
    )));
    w.fake.push(Reply::text("done"));
    let mut f = w
        .start(as_grantee("app", "set things up", default_mode()))
        .await;
    let (state, message, sent) = run_allowing(&w, &mut f).await;
    assert_eq!(state, FinalState::Done, "{message:?}: {:#?}", f.seen);
    assert!(sent.contains("WRITES-DONE"), "{sent}");
    assert!(sent.contains("Read-only file system"), "{sent}");
    assert!(!hook.exists(), "a git hook was planted for the owner");
    assert_eq!(
        std::fs::read(&config).unwrap(),
        before,
        "the repository's config changed"
    );
    assert!(
        !settings.exists(),
        "project Claude Code settings were planted for the owner"
    );
    assert_eq!(
        std::fs::read_to_string(w.project.join("work.txt")).unwrap(),
        "ok\n",
        "the project's own files stay the grantee's to change"
    );
}

#[tokio::test]
async fn swapping_the_project_for_a_symlink_after_the_check_binds_the_real_folder_not_the_home() {
    require_bwrap();
    let w = world_with(Opts {
        swap_project_for_home: true,
        shared: true,
        ..Opts::default()
    })
    .await;
    share(&w).await;
    std::fs::write(w.home.join("notes.txt"), "OWNER-PRIVATE-NOTES\n").unwrap();
    std::fs::write(w.project.join("README"), "the project\n").unwrap();
    w.fake.push(bash(
        "cat notes.txt README; echo pwned > escaped.txt; echo SWAP-DONE".into(),
    ));
    w.fake.push(Reply::text("done"));
    let mut f = w.start(as_grantee("app", "look", default_mode())).await;
    let (state, message, sent) = run_allowing(&w, &mut f).await;
    assert_eq!(state, FinalState::Done, "{message:?}: {:#?}", f.seen);
    assert!(sent.contains("SWAP-DONE"), "{sent}");
    // The hook did swap: the project's path now leads to the home.
    let moved = w.project.with_file_name("app.moved");
    assert_eq!(std::fs::read_link(&w.project).unwrap(), w.home);
    assert!(
        !sent.contains("OWNER-PRIVATE-NOTES"),
        "the home was bound: {sent}"
    );
    assert!(
        sent.contains("the project"),
        "the real folder was bound: {sent}"
    );
    assert!(
        !w.home.join("escaped.txt").exists(),
        "the task wrote into the home"
    );
    assert_eq!(
        std::fs::read_to_string(moved.join("escaped.txt")).unwrap(),
        "pwned\n"
    );
}

#[tokio::test]
async fn a_relay_that_labels_a_grantee_the_owner_gets_a_grantee() {
    require_bwrap();
    // The relay has this agent under GRANTEE, so it sends GRANTEE's tasks as the owner's; the agent was
    // paired with OWNER.
    let w = world_with(Opts {
        relay_owner: Some(GRANTEE),
        ..Opts::default()
    })
    .await;
    let mut f = w
        .start(submit(GRANTEE, "app", "hello", TaskOptions::default()))
        .await;
    let spec_role = w
        .relay
        .core
        .task(&f.task)
        .await
        .unwrap()
        .spec
        .requester
        .role;
    assert_eq!(spec_role, ct_protocol::task::Role::Owner, "the relay lied");
    let (state, message) = f.finished().await;
    assert_eq!(state, FinalState::Failed);
    assert!(
        message
            .as_deref()
            .unwrap_or_default()
            .contains("ct-agent sharing"),
        "judged as a grantee under `sharing off`: {message:?}"
    );
    assert!(w.fake.main_requests().is_empty(), "Claude Code never ran");

    // With sharing on, the same task runs, but sandboxed: the owner's home is not there.
    w.sharing(SharePolicy::All);
    std::fs::write(w.home.join("notes.txt"), "OWNER-PRIVATE-NOTES\n").unwrap();
    w.fake.push(bash(format!(
        "cat {}/notes.txt; echo CAT-DONE",
        w.home.display()
    )));
    w.fake.push(Reply::text("done"));
    let mut f = w
        .start(submit(GRANTEE, "app", "look", default_mode()))
        .await;
    let (state, message, sent) = run_allowing(&w, &mut f).await;
    assert_eq!(state, FinalState::Done, "{message:?}: {:#?}", f.seen);
    assert!(sent.contains("CAT-DONE"), "{sent}");
    assert!(
        !sent.contains("OWNER-PRIVATE-NOTES"),
        "ran unsandboxed: {sent}"
    );
    assert!(
        w.agent_dir().join("grantees").join(GRANTEE).is_dir(),
        "it ran with the grantee's own Claude Code config"
    );
}

#[tokio::test]
async fn bypass_permissions_from_the_relay_is_refused_until_the_owner_allows_it_locally() {
    let w = world_with(Opts::default()).await;
    let bypass = TaskOptions {
        permission_mode: Some("bypassPermissions".into()),
        ..TaskOptions::default()
    };
    let target = w.project.join("bypassed.txt");
    let mut f = w.start(submit(OWNER, "app", "write", bypass.clone())).await;
    let (state, message) = f.finished().await;
    let message = message.unwrap_or_default();
    assert_eq!(state, FinalState::Failed);
    assert!(message.contains("ct-agent sandbox bypass on"), "{message}");
    assert!(w.fake.main_requests().is_empty(), "Claude Code never ran");

    let policy = || Policy::load_with(&w.agent_config, &w.allowed_env, Host::detect()).unwrap();
    let mut settings = policy().sandbox().clone();
    settings.bypass_permissions = true;
    policy().set_sandbox(settings).unwrap();
    w.fake
        .push(Reply::tool_use("Write", crate::tasks::write(&target, "b")));
    w.fake.push(Reply::text("done"));
    let mut f = w.start(submit(OWNER, "app", "write", bypass)).await;
    let (state, message) = f.finished().await;
    assert_eq!(state, FinalState::Done, "{message:?}: {:#?}", f.seen);
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "b");
}

#[tokio::test]
async fn an_owner_with_only_a_claude_login_gets_shared_tasks_refused_not_lent() {
    require_bwrap();
    // No API key anywhere: the owner's Claude Code would use its OAuth login, which a proxy cannot add.
    let w = world_with(Opts {
        logged_out: true,
        no_shared_key: true,
        shared: true,
        ..Opts::default()
    })
    .await;
    share(&w).await;
    let mut f = w.start(as_grantee("app", "hello", default_mode())).await;
    let (state, message) = f.finished().await;
    let message = message.unwrap_or_default();
    assert_eq!(state, FinalState::Failed);
    assert!(
        message.contains("claude login") && message.contains("CT_AGENT_SHARED_API_KEY"),
        "{message}"
    );
    assert_eq!(
        f.seen.len(),
        1,
        "refused before anything ran: {:#?}",
        f.seen
    );
    assert!(w.fake.main_requests().is_empty(), "Claude Code never ran");
}

#[tokio::test]
async fn a_spent_budget_stops_a_grantees_requests_at_the_proxy_and_refuses_their_next_task() {
    require_bwrap();
    let w = shared_world().await;
    // One token: the first request is let through (nothing spent yet) and spends it.
    ct_agent::meter::set_budget(
        &w.agent_config,
        GRANTEE,
        Some(ct_agent::meter::Budget::total(
            ct_agent::meter::Amount::Tokens(1),
        )),
    )
    .unwrap();
    w.fake.push(bash("echo FIRST-STEP".into()));
    w.fake.push(Reply::text("this answer is never fetched"));
    let mut f = w
        .start(as_grantee("app", "two steps", default_mode()))
        .await;
    let (state, message, _) = run_allowing(&w, &mut f).await;
    assert_eq!(state, FinalState::Failed, "{message:?}: {:#?}", f.seen);
    let shown = format!("{message:?} {:?}", f.seen);
    assert!(
        shown.contains("budget") && shown.contains("ct-agent sharing budget"),
        "the proxy's refusal reached the task: {shown}"
    );
    assert_eq!(
        w.fake.main_requests().len(),
        1,
        "the second request never reached the API"
    );
    // The next task is refused before Claude Code starts.
    let mut g = w.start(as_grantee("app", "again", default_mode())).await;
    let (state, message) = g.finished().await;
    assert_eq!(state, FinalState::Failed);
    assert!(
        message.unwrap_or_default().contains("budget"),
        "{:#?}",
        g.seen
    );
    assert_eq!(w.fake.main_requests().len(), 1);
    // The owner's own tasks are not metered.
    w.fake.push(Reply::text("hi owner"));
    let mut o = w
        .start(submit(OWNER, "app", "hello", TaskOptions::default()))
        .await;
    assert_eq!(o.finished().await.0, FinalState::Done);
}

#[tokio::test]
async fn cancelling_a_grantees_task_ends_everything_in_its_sandbox() {
    use ct_testkit::process::{cmdline, descendants_of, poll_until};
    require_bwrap();
    let w = shared_world().await;
    let job = ct_testkit::LongJob::write(&w.project, 300);
    w.fake.push(Reply::tool_use(
        "Bash",
        json!({ "command": job.command(), "description": "Run the long job" }),
    ));
    let mut f = w.start(as_grantee("app", "wait", default_mode())).await;
    f.until(
        "the Bash tool",
        |e| matches!(e, TaskEvent::Tool { name, .. } if name == "Bash"),
    )
    .await;
    // The sandbox runs in its own session and PID namespace; find its `sleep` by this world's HOME.
    let home = format!("HOME={}", w.home.display());
    let ours = |pid: u32| {
        std::fs::read(format!("/proc/{pid}/environ"))
            .is_ok_and(|env| env.split(|&b| b == 0).any(|v| v == home.as_bytes()))
    };
    let sleeping = || {
        descendants_of(std::process::id())
            .into_iter()
            .any(|pid| ours(pid) && cmdline(pid).is_some_and(|c| c == "sleep 300"))
    };
    // The approval, if the CLI asks, goes to the owner.
    allow_if_asked_until(&w.relay, &mut f, sleeping).await;
    let inside: Vec<u32> = descendants_of(std::process::id())
        .into_iter()
        .filter(|&pid| ours(pid))
        .collect();
    w.relay
        .core
        .cancel_task(GRANTEE, &f.task)
        .await
        .expect("cancel");
    let (state, _) = f.finished().await;
    assert_eq!(state, FinalState::Cancelled, "{:#?}", f.seen);
    poll_until(T, "every process of the sandbox gone", || {
        inside.iter().all(|&pid| cmdline(pid).is_none())
    })
    .await
    .expect("no process left behind by a cancelled sandboxed task");
}

#[tokio::test]
async fn the_owners_own_sandboxed_task_runs_with_the_owners_config_and_nothing_else_of_the_home() {
    require_bwrap();
    let w = world_with(Opts::default()).await;
    let policy = || Policy::load_with(&w.agent_config, &w.allowed_env, Host::detect()).unwrap();
    let mut settings = policy().sandbox().clone();
    settings.owner = true;
    policy().set_sandbox(settings).unwrap();
    std::fs::write(w.home.join("notes.txt"), "OWNER-PRIVATE-NOTES\n").unwrap();
    let target = w.project.join("mine.txt");
    w.fake.push(bash(format!(
        "cat {}/notes.txt; echo mine > {}; echo OWNER-DONE",
        w.home.display(),
        target.display()
    )));
    w.fake.push(Reply::text("done"));
    let mut f = w.start(submit(OWNER, "app", "work", default_mode())).await;
    let (state, message, sent) = run_allowing(&w, &mut f).await;
    assert_eq!(state, FinalState::Done, "{message:?}: {:#?}", f.seen);
    assert!(sent.contains("OWNER-DONE"), "{sent}");
    assert!(
        !sent.contains("OWNER-PRIVATE-NOTES"),
        "the home is empty inside: {sent}"
    );
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "mine\n");
    // The owner's own Claude Code config was used: the session is among the owner's transcripts.
    assert!(
        w.home.join(".claude/projects").is_dir(),
        "the owner's config dir holds the session"
    );
    assert!(!w.agent_dir().join("grantees").exists());
}

#[tokio::test]
async fn a_grantees_task_reaches_nothing_on_the_owners_loopback_unless_the_owner_opens_the_network()
{
    require_bwrap();
    // A service of the owner's on 127.0.0.1 (a database, a dev server, an admin socket's TCP twin).
    let service = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    service.set_nonblocking(true).unwrap();
    let port = service.local_addr().unwrap().port();
    let w = shared_world().await;
    let dial = format!(
        "python3 -c 'import socket; socket.create_connection((\"127.0.0.1\", {port}), 5); print(\"LOOPBACK-\" + \"REACHED\")' \
         2>&1 | tail -1; echo NET-DONE"
    );
    w.fake.push(bash(dial.clone()));
    w.fake.push(Reply::text("done"));
    let mut f = w.start(as_grantee("app", "dial", default_mode())).await;
    let (state, message, sent) = run_allowing(&w, &mut f).await;
    assert_eq!(state, FinalState::Done, "{message:?}: {:#?}", f.seen);
    assert!(sent.contains("NET-DONE"), "{sent}");
    assert!(!sent.contains("LOOPBACK-REACHED"), "{sent}");
    assert!(sent.contains("ConnectionRefusedError"), "{sent}");
    assert!(
        service.accept().is_err(),
        "nothing in the sandbox reached the owner's service"
    );

    // The owner opens the network for this grantee: the same task now reaches it (so the check above could fail).
    let policy = || Policy::load_with(&w.agent_config, &w.allowed_env, Host::detect()).unwrap();
    let mut settings = policy().sandbox().clone();
    settings.open_network_for = vec![GRANTEE.into()];
    policy().set_sandbox(settings).unwrap();
    w.fake.push(bash(dial));
    w.fake.push(Reply::text("done"));
    let mut f = w.start(as_grantee("app", "dial", default_mode())).await;
    let (state, message, sent) = run_allowing(&w, &mut f).await;
    assert_eq!(state, FinalState::Done, "{message:?}: {:#?}", f.seen);
    assert!(sent.contains("LOOPBACK-REACHED"), "{sent}");
    assert!(service.accept().is_ok());
}

#[test]
fn the_owner_sets_budgets_and_network_from_the_command_line() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("cfg");
    let run = |args: &[&str]| {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_ct-agent"))
            .arg("--config-dir")
            .arg(&cfg)
            .args(args)
            .env("LOG_LEVEL", "error")
            .output()
            .unwrap();
        let out = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        (o.status.success(), out)
    };
    let (ok, out) = run(&["sharing", "budget", GRANTEE, "5usd"]);
    assert!(
        ok && out.contains(&format!("Budget for {GRANTEE}: $5.00")),
        "{out}"
    );
    let (ok, out) = run(&["sharing", "budget", GRANTEE, "lots"]);
    assert!(!ok && out.contains("is not a budget"), "{out}");
    let (ok, out) = run(&["sharing", "budget", "../100", "5usd"]);
    assert!(!ok && out.contains("not a Discord user id"), "{out}");
    let dir = ct_agent::ConfigDir::open(&cfg).unwrap();
    assert_eq!(
        ct_agent::meter::budgets(&dir).unwrap().get(GRANTEE),
        Some(&ct_agent::meter::Budget::total(
            ct_agent::meter::Amount::Usd(5.0)
        ))
    );
    let (ok, out) = run(&["sharing", "budget", GRANTEE, "none"]);
    assert!(ok && out.contains("No budgets"), "{out}");

    let (ok, out) = run(&["sandbox"]);
    assert!(
        ok && out.contains("none but the Claude API") && out.contains("refused"),
        "isolated network and no bypassPermissions by default: {out}"
    );
    let (ok, out) = run(&["sandbox", "network", "open", GRANTEE]);
    assert!(ok && out.contains(&format!("open for {GRANTEE}")), "{out}");
    let (ok, out) = run(&["sandbox", "network", "open"]);
    assert!(ok && out.contains("open (they can reach"), "{out}");
    let (ok, out) = run(&["sandbox", "network", "isolated"]);
    assert!(
        ok && out.contains("none but the Claude API") && !out.contains("open for"),
        "{out}"
    );
}

#[tokio::test]
async fn a_grantees_task_in_a_worktree_writes_only_its_own_worktree() {
    require_bwrap();
    let w = shared_world().await;
    crate::worktree::repo(&w);
    let isolated = |mode: &str| TaskOptions {
        permission_mode: Some(mode.into()),
        isolation: Some(ct_protocol::task::Isolation::Worktree),
        ..TaskOptions::default()
    };
    // The owner's task, in its own worktree.
    w.fake.push(Reply::text("done"));
    let mut owners = w
        .start(submit(OWNER, "app", "hello", isolated("acceptEdits")))
        .await;
    assert_eq!(owners.finished().await.0, FinalState::Done);
    let theirs = crate::worktree::worktree_of(&w, &owners.task);
    assert!(theirs.is_dir());

    let rec = w
        .relay
        .core
        .submit_task(as_grantee("app", "write around", isolated("default")))
        .await
        .unwrap();
    let mine = crate::worktree::worktree_of(&w, &rec.spec.task);
    w.fake.push(bash(format!(
        "echo pwned > {o}/owned.txt; echo pwned > {p}/owned.txt; echo own > mine.txt; echo WRITES-DONE",
        o = theirs.display(),
        p = w.project.display(),
    )));
    w.fake.push(Reply::text("done"));
    let mut f = w.follow(&rec.spec.task).await;
    let (state, message, sent) = run_allowing(&w, &mut f).await;
    assert_eq!(state, FinalState::Done, "{message:?}: {:#?}", f.seen);
    assert!(sent.contains("WRITES-DONE"), "{sent}");
    assert_eq!(
        std::fs::read_to_string(mine.join("mine.txt")).unwrap(),
        "own\n",
        "the grantee's own worktree is writable"
    );
    assert!(
        !theirs.join("owned.txt").exists(),
        "the grantee wrote into the owner's task's worktree"
    );
    assert!(
        !w.project.join("owned.txt").exists(),
        "the grantee wrote into the project's own tree"
    );
}
