//! `ct-agent doctor` against the real things: the pinned Claude Code CLI (logged out, and logged in against
//! the scripted Messages API), a real relay started in-process, and a relay address nobody answers on.

use std::path::Path;
use std::time::Duration;

use ct_agent::connect::ConnectOptions;
use ct_agent::doctor::{self, DoctorOptions, Level, Report};
use ct_agent::proxy::ProxyConfig;
use ct_agent::{LinkStatus, RunOptions};
use ct_relay::{Relay, RelayConfig};
use ct_testkit::{ClaudeEnv, Cli, FakeAnthropic, PINNED_VERSION};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

fn direct() -> ConnectOptions {
    ConnectOptions {
        proxy: ProxyConfig::direct(),
        ..Default::default()
    }
}

fn options(config_dir: &Path, claude: &ClaudeEnv, allowed: Option<String>) -> DoctorOptions {
    DoctorOptions {
        config_dir: config_dir.to_path_buf(),
        claude_bin: Some(claude.cli().bin()),
        claude_env: Some(claude.vars().to_vec()),
        allowed_dirs: allowed,
        proxy: ProxyConfig::direct(),
        service: None,
        kernel_release: "6.8.0-generic".into(),
        // Generous: two shared cores, and the CLI is a 245 MB binary to load.
        timeout: Duration::from_secs(60),
    }
}

fn level(report: &Report, check: &str) -> Level {
    report
        .get(check)
        .unwrap_or_else(|| panic!("no {check} finding in\n{}", report.render()))
        .level
}

/// A paired agent whose relay is gone: a port that was bound and released, so nothing answers on it.
async fn paired_with_a_dead_relay(config_dir: &Path) {
    let relay_dir = tempfile::tempdir().unwrap();
    let relay = Relay::bind(RelayConfig::new(
        relay_dir.path().into(),
        "127.0.0.1:0".parse().unwrap(),
    ))
    .await
    .unwrap();
    let token = relay.core().mint_pairing_token("42").await.unwrap().0;
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(relay.run(shutdown.clone()));
    ct_agent::pair_with(config_dir, &token, Some("doc".into()), false, &direct())
        .await
        .unwrap();
    shutdown.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn logged_out_claude_and_an_unreachable_relay_are_failures_with_fixes() {
    let api = FakeAnthropic::start([]).await.unwrap();
    let claude = ClaudeEnv::logged_out(api.base_url()).unwrap();
    let agent_dir = tempfile::tempdir().unwrap();
    paired_with_a_dead_relay(agent_dir.path()).await;
    let project = tempfile::tempdir().unwrap();
    let allowed = format!("{},/nonexistent/ct-doctor-test", project.path().display());

    let report = doctor::run(&options(agent_dir.path(), &claude, Some(allowed))).await;
    let text = report.render();
    println!("{text}");

    assert_eq!(level(&report, "pairing"), Level::Ok);
    assert_eq!(level(&report, "key"), Level::Ok);
    let version = report.get("claude").unwrap();
    assert_eq!(version.level, Level::Ok);
    assert!(version.message.contains(PINNED_VERSION), "{text}");
    let login = report.get("claude/login").unwrap();
    assert_eq!(login.level, Level::Fail, "{text}");
    assert!(
        login.fix.as_deref().unwrap().contains("claude auth login"),
        "{text}"
    );
    assert_eq!(level(&report, "relay/websocket"), Level::Fail, "{text}");
    assert_eq!(level(&report, "relay/quic"), Level::Fail, "{text}");
    assert_eq!(level(&report, "relay/healthz"), Level::Fail, "{text}");
    assert!(
        text.contains("/nonexistent/ct-doctor-test does not exist"),
        "{text}"
    );
    assert!(
        text.contains("mkdir -p /nonexistent/ct-doctor-test"),
        "{text}"
    );
    assert_eq!(report.worst(), Level::Fail);
    for f in &report.findings {
        if f.level == Level::Fail {
            assert!(f.fix.is_some() || f.check == "pairing", "no fix for {f:?}");
        }
    }
    api.shutdown().await;
}

#[tokio::test]
async fn logged_in_claude_and_a_live_relay_pass_and_the_clock_is_measured() {
    let api = FakeAnthropic::start([]).await.unwrap();
    let claude = ClaudeEnv::new(api.base_url()).unwrap();
    let relay_dir = tempfile::tempdir().unwrap();
    let relay = Relay::bind(RelayConfig::new(
        relay_dir.path().into(),
        "127.0.0.1:0".parse().unwrap(),
    ))
    .await
    .unwrap();
    let core = relay.core();
    let token = core.mint_pairing_token("7").await.unwrap().0;
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(relay.run(shutdown.clone()));
    let agent_dir = tempfile::tempdir().unwrap();
    ct_agent::pair_with(
        agent_dir.path(),
        &token,
        Some("doc".into()),
        false,
        &direct(),
    )
    .await
    .unwrap();
    let project = tempfile::tempdir().unwrap();

    let opts = options(
        agent_dir.path(),
        &claude,
        Some(project.path().display().to_string()),
    );
    let report = doctor::run(&opts).await;
    let text = report.render();
    println!("{text}");
    for check in [
        "pairing",
        "key",
        "claude",
        "claude/login",
        "relay/quic",
        "relay/websocket",
        "relay/healthz",
        "clock",
        "folders",
    ] {
        assert_eq!(level(&report, check), Level::Ok, "{check}:\n{text}");
    }
    assert!(
        report
            .get("claude/login")
            .unwrap()
            .message
            .contains("api_key"),
        "{text}"
    );
    assert!(text.contains("owner 7"), "{text}");

    // With the agent running, doctor must not open a session of its own: that would replace the agent's
    // session, and a replaced agent stops for good.
    let (tx, mut status) = watch::channel(LinkStatus::Connecting);
    let agent_stop = CancellationToken::new();
    let mut run_opts = RunOptions::new(agent_dir.path());
    run_opts.connect = direct();
    let agent = tokio::spawn(ct_agent::run(run_opts, agent_stop.clone(), tx));
    tokio::time::timeout(
        Duration::from_secs(20),
        status.wait_for(|s| matches!(s, LinkStatus::Connected { .. })),
    )
    .await
    .expect("agent connects")
    .expect("agent runs");
    let report = doctor::run(&opts).await;
    let text = report.render();
    println!("{text}");
    assert_eq!(level(&report, "relay/session"), Level::Ok, "{text}");
    assert_eq!(level(&report, "relay/quic"), Level::Ok, "{text}");
    assert_eq!(level(&report, "relay/healthz"), Level::Ok, "{text}");
    assert!(report.get("relay/websocket").is_none(), "{text}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        matches!(*status.borrow(), LinkStatus::Connected { .. }),
        "the running agent lost its session: {:?}",
        *status.borrow()
    );
    assert!(!agent.is_finished());
    agent_stop.cancel();
    agent.await.unwrap().unwrap();

    shutdown.cancel();
    task.await.unwrap().unwrap();
    api.shutdown().await;
}

#[tokio::test]
async fn a_key_others_can_read_and_a_missing_claude_are_reported() {
    use std::os::unix::fs::PermissionsExt;
    let api = FakeAnthropic::start([]).await.unwrap();
    let claude = ClaudeEnv::logged_out(api.base_url()).unwrap();
    let agent_dir = tempfile::tempdir().unwrap();
    paired_with_a_dead_relay(agent_dir.path()).await;
    let key = agent_dir.path().join("agent.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut opts = options(agent_dir.path(), &claude, None);
    opts.claude_bin = Some(agent_dir.path().join("no-such-claude"));
    let report = doctor::run(&opts).await;
    let text = report.render();
    assert_eq!(level(&report, "key"), Level::Fail, "{text}");
    assert!(
        text.contains(&format!("chmod 600 {}", key.display())),
        "{text}"
    );
    assert_eq!(level(&report, "claude"), Level::Fail, "{text}");
    assert_eq!(level(&report, "folders"), Level::Warn, "{text}");
    assert!(text.contains("ct-agent project add NAME FOLDER"), "{text}");
    // A folder named with `ct-agent project add` is allowed without the variable: doctor says so, and says
    // when the folder is gone.
    let app = tempfile::tempdir().unwrap();
    let app_path = std::fs::canonicalize(app.path()).unwrap();
    let config = ct_agent::ConfigDir::open(agent_dir.path()).unwrap();
    let mut policy =
        ct_agent::projects::Policy::load_with(&config, "", ct_agent::projects::Host::detect())
            .unwrap();
    policy
        .add(
            "app",
            &app_path.display().to_string(),
            ct_agent::projects::Origin::Local,
        )
        .unwrap();
    let report = doctor::run(&opts).await;
    let text = report.render();
    assert_eq!(level(&report, "folders"), Level::Ok, "{text}");
    assert!(text.contains("added with `ct-agent project add`"), "{text}");
    drop(app);
    let report = doctor::run(&opts).await;
    let text = report.render();
    assert_eq!(level(&report, "folders"), Level::Fail, "{text}");
    assert!(text.contains("no longer exists"), "{text}");
    assert!(
        report.get("relay/quic").is_none(),
        "no relay check without a usable key:\n{text}"
    );

    // Not paired at all.
    let empty = tempfile::tempdir().unwrap();
    let report = doctor::run(&options(&empty.path().join("none"), &claude, None)).await;
    let f = report.get("pairing").unwrap();
    assert_eq!(f.level, Level::Fail);
    assert!(f.fix.as_deref().unwrap().contains("ct-agent pair"), "{f:?}");
    api.shutdown().await;
}

/// Doctor's Claude Code checks hold at both ends of the supported range: the version is named and called
/// tested, a logged-out CLI is a failure with the login fix, a logged-in one passes.
#[tokio::test]
async fn claude_checks_pass_on_every_supported_cli() {
    let api = FakeAnthropic::start([]).await.unwrap();
    let unpaired = tempfile::tempdir().unwrap();
    let config_dir = unpaired.path().join("none");
    for cli in [Cli::Newest, Cli::Minimum] {
        let out = ClaudeEnv::logged_out(api.base_url()).unwrap().with_cli(cli);
        let report = doctor::run(&options(&config_dir, &out, None)).await;
        let text = report.render();
        let version = report.get("claude").unwrap();
        assert_eq!(version.level, Level::Ok, "{cli:?}:\n{text}");
        assert!(
            version
                .message
                .contains(&format!("Claude Code {} (", cli.version())),
            "{cli:?}:\n{text}"
        );
        assert!(version.message.contains("tested"), "{text}");
        assert_eq!(
            level(&report, "claude/login"),
            Level::Fail,
            "{cli:?}:\n{text}"
        );

        let logged_in = ClaudeEnv::new(api.base_url()).unwrap().with_cli(cli);
        let report = doctor::run(&options(&config_dir, &logged_in, None)).await;
        let text = report.render();
        assert_eq!(
            level(&report, "claude/login"),
            Level::Ok,
            "{cli:?}:\n{text}"
        );
    }
    api.shutdown().await;
}

/// A CLI older than the minimum is a failure that says what to run; one newer than the newest tested is a
/// warning, not a failure.
#[tokio::test]
async fn claude_versions_outside_the_tested_range_are_named() {
    let api = FakeAnthropic::start([]).await.unwrap();
    let claude = ClaudeEnv::logged_out(api.base_url()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config_dir = dir.path().join("none");
    for (printed, want) in [
        ("2.0.5 (Claude Code)", Level::Fail),
        ("9.1.0 (Claude Code)", Level::Warn),
    ] {
        let bin = dir.path().join(format!("claude-{}", &printed[..5]));
        ct_testkit::process::write_executable(&bin, &format!("#!/bin/sh\necho '{printed}'\n"));
        let mut opts = options(&config_dir, &claude, None);
        opts.claude_bin = Some(bin);
        let report = doctor::run(&opts).await;
        let text = report.render();
        let f = report.get("claude").unwrap();
        assert_eq!(f.level, want, "{printed}:\n{text}");
        let fix = f.fix.as_deref().unwrap_or_default();
        if want == Level::Fail {
            assert!(f.message.contains("older than 2.1.197"), "{text}");
            assert!(
                fix.contains("npm install -g @anthropic-ai/claude-code@latest"),
                "{text}"
            );
            assert!(
                report.get("claude/login").is_none(),
                "no login check on a refused CLI:\n{text}"
            );
        } else {
            assert!(
                f.message.contains(&format!("newer than {PINNED_VERSION}")),
                "{text}"
            );
            assert!(
                fix.contains(&format!("@anthropic-ai/claude-code@{PINNED_VERSION}")),
                "{text}"
            );
        }
    }
    api.shutdown().await;
}
