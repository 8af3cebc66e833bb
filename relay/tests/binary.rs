//! The `ct-relay` binary as an operator uses it: start on embedded defaults, the admin commands (with the
//! global flags before or after the subcommand; shares, projects, the default agent), health over HTTPS, and
//! a SIGTERM that drains and exits 0.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use ct_protocol::handshake::PairRequest;
use ct_protocol::message::{AgentMessage, RelayMessage};
use ct_protocol::pairing::PairingToken;
use ct_protocol::project::{ProjectInfo, ProjectOp, ProjectReply, ProjectsReport};
use ct_protocol::Transport;
use ed25519_dalek::SigningKey;

fn relay() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ct-relay"));
    cmd.env_remove("DISCORD_TOKEN").env("LOG_LEVEL", "info");
    cmd
}

fn admin(dir: &Path, args: &[&str]) -> Output {
    relay()
        .arg("admin")
        .args(args)
        .arg("--data-dir")
        .arg(dir)
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    assert!(
        o.status.success(),
        "command failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the relay on embedded defaults with its log appended to `log`.
fn start(data: &Path, log: &Path) -> Running {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    Running(
        relay()
            .arg("--data-dir")
            .arg(data)
            .args(["--listen", "127.0.0.1:0"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    )
}

/// Waits until the admin socket answers (the relay is ready) and returns `admin status --json`.
fn ready(data: &Path) -> serde_json::Value {
    let started = Instant::now();
    loop {
        let o = relay()
            .args(["--data-dir"])
            .arg(data)
            .args(["admin", "status", "--json"])
            .output()
            .unwrap();
        if o.status.success() {
            break serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap();
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "relay did not come up: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test]
async fn operator_workflow_from_start_to_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut child = start(&data, &dir.path().join("relay.log"));
    let status = ready(&data);
    let https = status["https"].as_str().unwrap().to_string();
    assert_eq!(
        status["quic"].as_str(),
        Some(https.as_str()),
        "QUIC and HTTPS share the port"
    );
    let human = stdout(&admin(&data, &["status"]));
    assert!(
        human.contains(&https)
            && human.contains("SHA256:")
            && human.contains("off (no DISCORD_TOKEN)"),
        "{human}"
    );

    // Pairing token for a user, used by an agent.
    let text = stdout(&admin(&data, &["pair-code", "--user", "4242"]));
    let token_line = text
        .lines()
        .find(|l| l.trim_start().starts_with("ctpair1_"))
        .expect("token printed");
    let token: PairingToken = token_line.trim().parse().unwrap();
    assert!(
        text.contains(&format!("ct-agent pair {}", token_line.trim())),
        "{text}"
    );
    let key = SigningKey::generate(&mut rand::rngs::OsRng);
    let pair = PairRequest {
        code: token.code.to_string(),
        name: "box".into(),
    };
    let addr = https.parse().unwrap();
    let mut session =
        crate::support::handshake(Transport::Quic, addr, &key, token.relay, Some(pair))
            .await
            .unwrap();
    assert_eq!(session.welcome.owner, "4242");

    let agents = stdout(&admin(&data, &["agents"]));
    assert!(
        agents.contains("4242")
            && agents.contains("box")
            && agents.contains("online")
            && agents.contains("quic"),
        "{agents}"
    );
    // Shares, the default agent, and a project request the agent answers.
    let added = stdout(&admin(
        &data,
        &["share", "add", "5", "--as", "4242", "--project", "web,api"],
    ));
    assert!(
        added.contains("user 5 may now run tasks") && added.contains("projects: web, api"),
        "{added}"
    );
    let list = stdout(&admin(&data, &["share", "list", "--as", "4242"]));
    assert!(
        list.contains("GRANTEE") && list.contains("web, api"),
        "{list}"
    );
    let available = stdout(&admin(&data, &["share", "available", "--as", "5"]));
    assert!(
        available.contains("user 4242")
            && available.contains("box")
            && available.contains("online"),
        "{available}"
    );
    let me = admin(&data, &["share", "add", "4242", "--as", "4242"]);
    assert!(
        !me.status.success() && String::from_utf8_lossy(&me.stderr).contains("yourself"),
        "{me:?}"
    );
    let default = stdout(&admin(&data, &["default-agent", "box", "--as", "4242"]));
    assert!(
        default.contains("box is now your default agent"),
        "{default}"
    );
    let dir_arg = data.clone();
    let listing = tokio::task::spawn_blocking(move || {
        admin(
            &dir_arg,
            &["project", "list", "--as", "4242", "--agent", "box"],
        )
    });
    let id = match crate::support::recv(&mut session).await {
        RelayMessage::Project {
            id,
            op: ProjectOp::List,
        } => id,
        other => panic!("expected a project request, got {other:?}"),
    };
    let report = ProjectsReport {
        projects: vec![ProjectInfo {
            name: "web".into(),
            path: "/srv/web".into(),
        }],
        allowed_dirs: vec!["/srv".into()],
        accepts_shared: true,
        accepts_files: false,
        pool: false,
    };
    session
        .writer
        .send(&AgentMessage::ProjectReply {
            id,
            reply: ProjectReply::Ok(report),
        })
        .await
        .unwrap();
    let projects = stdout(&listing.await.unwrap());
    assert!(
        projects.contains("/srv/web") && projects.contains("allowed folders: /srv"),
        "{projects}"
    );
    let removed = stdout(&admin(&data, &["share", "remove", "5", "--as", "4242"]));
    assert!(removed.contains("stopped sharing with user 5"), "{removed}");
    let refused = admin(
        &data,
        &[
            "task",
            "--as",
            "5",
            "--target",
            "4242",
            "--project",
            "web",
            "hi",
        ],
    );
    assert!(
        !refused.status.success()
            && String::from_utf8_lossy(&refused.stderr).contains("has not shared"),
        "{refused:?}"
    );
    let reply = admin(&data, &["reply", "--as", "4242", "t_nosuch", "more"]);
    assert!(
        String::from_utf8_lossy(&reply.stderr).contains("there is no task"),
        "{reply:?}"
    );

    let bad = admin(&data, &["pair-code", "--user", "not-a-number"]);
    assert!(
        !bad.status.success()
            && String::from_utf8_lossy(&bad.stderr).contains("not a Discord user id")
    );
    let revoked = stdout(&admin(&data, &["revoke", "box"]));
    assert!(revoked.contains("Revoked 4242/box"), "{revoked}");
    assert!(stdout(&admin(&data, &["agents"])).contains("revoked"));

    // SIGTERM: drain and exit 0, removing the admin socket.
    let pid = child.0.id() as i32;
    assert!(Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap()
        .success());
    let deadline = Instant::now() + Duration::from_secs(15);
    let exit = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "relay did not stop after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(exit.success(), "exit status {exit:?}");
    assert!(!data.join("admin.sock").exists());
    let log = std::fs::read_to_string(dir.path().join("relay.log")).unwrap();
    assert!(log.contains("the Discord bot is off"), "{log}");
    assert!(
        log.contains("relay listening") && log.contains("relay stopped"),
        "{log}"
    );
    let down = admin(&data, &["status"]);
    assert!(
        String::from_utf8_lossy(&down.stderr).contains("is `ct-relay --data-dir"),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
}

/// An acknowledgement lets the agent forget an event, so it must only go out once the event is on disk. Here
/// the agent streams output, and the relay is SIGKILLed (no drain, no flush) the moment the last event is
/// acknowledged: after a restart every acknowledged event must be in the task's log. With acknowledgements sent
/// before the store flushed, the tail of the log was lost and the task could never finish.
#[tokio::test]
async fn acknowledged_events_survive_a_sigkill() {
    use ct_protocol::task::TaskEvent;
    use ct_relay::admin::{self, Reply, Request};

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let log = dir.path().join("relay.log");
    let mut child = start(&data, &log);
    let status = ready(&data);
    let addr = status["https"].as_str().unwrap().parse().unwrap();

    let token: PairingToken = match admin::call(&data, &Request::PairCode { user: "7".into() })
        .await
        .unwrap()
    {
        Reply::PairCode { token, .. } => token.parse().unwrap(),
        other => panic!("{other:?}"),
    };
    let key = SigningKey::generate(&mut rand::rngs::OsRng);
    let pair = PairRequest {
        code: token.code.to_string(),
        name: "box".into(),
    };
    let mut session =
        crate::support::handshake(Transport::Quic, addr, &key, token.relay, Some(pair))
            .await
            .unwrap();
    let submit = Request::Task {
        user: "7".into(),
        agent: None,
        project: "/srv/web".into(),
        prompt: "stream".into(),
        options: Default::default(),
        target: None,
        name: None,
    };
    let task = match admin::call(&data, &submit).await.unwrap() {
        Reply::Task { task, .. } => task,
        other => panic!("{other:?}"),
    };
    assert_eq!(crate::support::expect_start(&mut session).await.task, task);

    // A burst, as Claude Code's output arrives: the relay acknowledges in batches, cumulatively.
    const EVENTS: u64 = 300;
    for seq in 1..=EVENTS {
        let text = format!("line {seq} {}", "x".repeat(200));
        crate::support::send_event(&mut session, &task, seq, TaskEvent::Text { text }).await;
    }
    crate::support::expect_ack(&mut session, &task, EVENTS).await;
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    drop(session);

    let _child = start(&data, &log);
    ready(&data);
    let mut stored = Vec::new();
    let req = Request::Follow { task: task.clone() };
    let follow = admin::call_stream(&data, &req, |reply| match reply {
        Reply::Event { seq, .. } => {
            stored.push(seq);
            true
        }
        Reply::Task { .. } => true,
        _ => false,
    });
    // The task has not ended (its agent is gone), so following it waits for more: read what is stored.
    let _ = tokio::time::timeout(Duration::from_secs(3), follow).await;
    assert_eq!(
        stored,
        (1..=EVENTS).collect::<Vec<_>>(),
        "every acknowledged event is stored after the crash"
    );
}

/// Starts the relay under a descriptor limit of 64 (soft and hard, so it cannot raise it), with `args`.
fn start_with_64_descriptors(data: &Path, log: &Path, args: &[&str]) -> Running {
    let log = std::fs::File::create(log).unwrap();
    Running(
        Command::new("sh")
            .arg("-c")
            .arg("ulimit -n 64 && exec \"$0\" \"$@\"")
            .arg(env!("CARGO_BIN_EXE_ct-relay"))
            .arg("--data-dir")
            .arg(data)
            .args(["--listen", "127.0.0.1:0", "--no-quic"])
            .args(["--max-connections-per-address", "1000"])
            .args(["--request-timeout-secs", "2"])
            .args(args)
            .env_remove("DISCORD_TOKEN")
            .env("LOG_LEVEL", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    )
}

/// Opens `n` TCP connections that say nothing, holds them for `hold`, and returns whether every one was
/// either served or refused (none left hanging past the relay's time limit).
async fn flood(addr: std::net::SocketAddr, n: usize, hold: Duration) {
    let mut held = Vec::new();
    for _ in 0..n {
        if let Ok(s) = tokio::net::TcpStream::connect(addr).await {
            held.push(s);
        }
    }
    tokio::time::sleep(hold).await;
}

/// `GET /healthz` answers 200 within `limit` (retried: the relay may still be shedding a flood).
async fn healthy_within(addr: std::net::SocketAddr, limit: Duration) {
    let started = Instant::now();
    loop {
        let attempt = tokio::time::timeout(
            Duration::from_secs(3),
            crate::support::try_http_request(addr, "GET /healthz", b""),
        )
        .await;
        if matches!(attempt, Ok(Ok((200, _)))) {
            return;
        }
        assert!(
            started.elapsed() < limit,
            "the relay is not serving after a flood"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn at_a_low_descriptor_limit_the_relay_keeps_serving_and_does_not_flood_its_log() {
    let dir = tempfile::tempdir().unwrap();

    // Default: the connection limit is derived from the 64 descriptors, so a flood is refused at accept and
    // accept itself never fails.
    let data = dir.path().join("derived");
    let log = dir.path().join("derived.log");
    let _relay = start_with_64_descriptors(&data, &log, &[]);
    let addr: std::net::SocketAddr = ready(&data)["https"].as_str().unwrap().parse().unwrap();
    flood(addr, 100, Duration::from_millis(500)).await;
    healthy_within(addr, Duration::from_secs(20)).await;
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("serving at most 32 connections at once: the descriptor limit (64)"),
        "{text}"
    );
    assert!(!text.contains("accept failed"), "{text}");

    // An operator who sets the limit past the descriptors gets a warning, and when accept does fail
    // (EMFILE) the relay backs off and says so once, not hundreds of times.
    let data = dir.path().join("forced");
    let log = dir.path().join("forced.log");
    let _relay = start_with_64_descriptors(&data, &log, &["--max-connections", "1000"]);
    let addr: std::net::SocketAddr = ready(&data)["https"].as_str().unwrap().parse().unwrap();
    flood(addr, 100, Duration::from_secs(1)).await;
    healthy_within(addr, Duration::from_secs(20)).await;
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("is more than the descriptor limit (64) leaves room for"),
        "{text}"
    );
    let failures = text.matches("accept failed").count();
    assert!(
        (1..=2).contains(&failures),
        "{failures} accept failures logged:\n{text}"
    );
}
