//! A relay node SIGKILLed mid-task, in a cluster of three relay *processes* on one PostgreSQL database and
//! one nats-server (both real), with the Discord bot in gateway mode on every node against the simulator,
//! the real agent as a process of its own, and the real Claude Code CLI on the scripted Messages API.
//!
//! The killed node holds everything at once: the agent's connection, the Discord gateway (the `discord`
//! lease) and the task's thread. In-process nodes can only drain; a process can die without a word, which
//! is what this checks: the agent moves to a survivor, another node takes the gateway (never two sessions
//! at once), the task finishes, every event is stored once, and the thread carries on with nothing posted
//! twice and no 429.
//!
//! The relays and the agent run as this package's own binary (`ct-loadgen relay ...`, `ct-loadgen agent
//! ...`: the same libraries as `ct-relay` and `ct-agent`). Their logs are files; a failing run keeps them
//! (the path is printed).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ct_loadgen::relay::{Program, RelayProcess};
use ct_protocol::pairing::PairingToken;
use ct_protocol::task::TaskEvent;
use ct_testkit::discord::{InteractionRef, Opt, SimMessage, SimUser, SlashCommand};
use ct_testkit::process::{descendants_of, poll_until};
use ct_testkit::{
    claude_bin, eventually_async, ClaudeEnv, DiscordSim, FakeAnthropic, LongJob, NatsServer,
    PgServer, Reply,
};
use serde_json::json;
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

/// Generous: two cores shared with other builds, the CLI is slow to start, and a dead leader's lease blocks
/// the others for its TTL (10 s) before anyone may take the gateway.
const T: Duration = Duration::from_secs(90);

const NODES: usize = 3;

fn me() -> &'static str {
    env!("CARGO_BIN_EXE_ct-loadgen")
}

/// Temporary folders outside /tmp (as the agent's Discord tests keep them): a sandboxed task gets a
/// private /tmp.
fn scratch(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/var/tmp")
        .unwrap_or_else(|_| tempfile::tempdir().unwrap())
}

/// A loopback port free for both UDP (QUIC) and TCP (WebSocket) right now, so the node's `--public-addr`
/// can name it before the node starts. Another process may take it meanwhile: [`start_node`] tries again.
fn free_port() -> SocketAddr {
    loop {
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = tcp.local_addr().unwrap();
        if UdpSocket::bind(addr).is_ok() {
            return addr;
        }
    }
}

/// The cluster's shared state, the simulator and the bot's settings every node gets.
struct Shared {
    database_url: String,
    nats_url: String,
    bot_env: Vec<(OsString, OsString)>,
}

/// Starts node `i` with its own data directory under `dir` and its own port, named by `--public-addr`.
async fn start_node(shared: &Shared, dir: &Path, i: usize) -> RelayProcess {
    let program = Program::with_prefix(me(), &["relay"]);
    let mut last = None;
    for _ in 0..3 {
        let listen = free_port();
        let args: Vec<OsString> = [
            ("--database-url", shared.database_url.clone()),
            ("--nats-url", shared.nats_url.clone()),
            ("--node-id", format!("node-{i}")),
            ("--public-addr", listen.to_string()),
        ]
        .into_iter()
        .flat_map(|(k, v)| [OsString::from(k), OsString::from(v)])
        .collect();
        match RelayProcess::start_on(
            &program,
            &dir.join(format!("node-{i}")),
            listen,
            &args,
            &shared.bot_env,
        )
        .await
        {
            Ok(node) => return node,
            // Most likely the port was taken between `free_port` and the bind; the log says.
            Err(e) => last = Some(e),
        }
    }
    panic!("node-{i} did not start: {:#}", last.unwrap());
}

/// The real agent (`ct-loadgen agent run`), in an environment of its own: the pinned CLI first on its
/// PATH, the CLI's hermetic variables (pointed at the fake API), its allowed folder. Killed with everything
/// below it when dropped (a Claude Code session and the job it runs are its children).
struct AgentProcess {
    child: Child,
}

impl AgentProcess {
    fn command(config_dir: &Path, claude: &ClaudeEnv, allowed: &Path, log: &Path) -> Command {
        let bin_dir = claude_bin().parent().unwrap().to_path_buf();
        let path = std::env::join_paths(std::iter::once(bin_dir).chain(std::env::split_paths(
            &std::env::var_os("PATH").unwrap_or_default(),
        )))
        .unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let mut cmd = Command::new(me());
        cmd.arg("agent")
            .arg("--config-dir")
            .arg(config_dir)
            .env_clear()
            .env("PATH", path)
            .envs(std::env::var_os("LANG").map(|v| (OsString::from("LANG"), v)))
            .envs(
                claude
                    .vars()
                    .iter()
                    .map(|(k, v)| (OsString::from(k), OsString::from(v))),
            )
            .env("ALLOWED_PROJECT_DIRS", allowed)
            .env("LOG_LEVEL", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .kill_on_drop(true);
        cmd
    }

    async fn pair(cmd: &mut Command, token: &PairingToken) {
        let status = cmd
            .arg("pair")
            .arg(token.to_string())
            .arg("--name")
            .arg("laptop")
            .status()
            .await
            .unwrap();
        assert!(status.success(), "pairing failed: {status}");
    }

    fn run(mut cmd: Command) -> Self {
        Self {
            child: cmd.arg("run").spawn().unwrap(),
        }
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        // Deepest first, so nothing is left to be re-parented to init: the job, the CLI, then the agent.
        if let Some(pid) = self.child.id() {
            let mut below = descendants_of(pid);
            below.reverse();
            for p in below {
                let _ = std::process::Command::new("kill")
                    .args(["-KILL", &p.to_string()])
                    .status();
            }
        }
        let _ = self.child.start_kill();
    }
}

/// Copies the processes' logs somewhere that outlives the temp dirs when the test fails.
struct KeepLogsOnFailure {
    logs: Vec<PathBuf>,
}

impl Drop for KeepLogsOnFailure {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let keep = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("failover-logs-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&keep);
        for log in &self.logs {
            if let Some(name) = log.file_name() {
                let _ = std::fs::copy(log, keep.join(name));
            }
        }
        eprintln!(
            "the relays' and the agent's logs are kept in {}",
            keep.display()
        );
    }
}

/// The message an interaction was answered with, once it is no longer "thinking…".
async fn answer(sim: &DiscordSim, ix: &InteractionRef) -> SimMessage {
    sim.wait_until(T, |s| {
        let i = s.interaction(&ix.id)?;
        let m = s.message(i.original_message.as_deref()?)?;
        (m.flags & 128 == 0 && (!m.content.is_empty() || m.embeds != json!([]))).then_some(m)
    })
    .await
    .unwrap_or_else(|e| panic!("no answer to interaction {}: {e:#}", ix.id))
}

/// The first message in `thread` that satisfies `pred`, waiting for it.
async fn message_in(
    sim: &DiscordSim,
    thread: &str,
    what: &str,
    pred: impl Fn(&SimMessage) -> bool,
) -> SimMessage {
    sim.wait_until(T, |s| s.messages(thread).into_iter().find(|m| pred(m)))
        .await
        .unwrap_or_else(|e| panic!("no {what}: {e:#}\n{:#?}", sim.messages(thread)))
}

/// `/task` as `user`; returns (task id, thread id) from the private answer.
async fn start_task(sim: &DiscordSim, user: &SimUser, prompt: &str) -> (String, String) {
    let cmd = SlashCommand::new("task")
        .opt(Opt::str("prompt", prompt))
        .opt(Opt::str("project", "app"));
    let ix = sim.send_slash(&sim.origin(user), &cmd).unwrap();
    let said = answer(sim, &ix).await.content;
    assert!(said.starts_with("🧵 Started `t_"), "{said}");
    let task = said.split('`').nth(1).unwrap().to_string();
    let start = said.find("<#").unwrap() + 2;
    let end = said[start..].find('>').unwrap() + start;
    (task, said[start..end].to_string())
}

/// The node (by id) holding the agent, as `node`'s admin socket sees it; `None` while it is offline.
async fn holder(node: &RelayProcess) -> Option<String> {
    let agents = node.agents().await.ok()?;
    agents.into_iter().find(|a| a.online).and_then(|a| a.node)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_sigkilled_mid_task_loses_its_agent_gateway_and_thread_to_the_survivors() {
    let began = Instant::now();
    let sim = Arc::new(DiscordSim::start().await.unwrap());
    let alice = sim.user("alice");
    let fake = FakeAnthropic::start([]).await.expect("fake API");
    let home = scratch("ct-home-");
    let mut claude = ClaudeEnv::new(fake.base_url()).unwrap();
    let home_path = std::fs::canonicalize(home.path()).unwrap();
    std::fs::create_dir_all(home_path.join(".claude")).unwrap();
    claude.set_var("HOME", &home_path.display().to_string());
    claude.set_var(
        "CLAUDE_CONFIG_DIR",
        &home_path.join(".claude").display().to_string(),
    );
    let root = scratch("ct-root-");
    let allowed = std::fs::canonicalize(root.path()).unwrap();
    let project = allowed.join("app");
    std::fs::create_dir(&project).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let agent_dir = dir.path().join("agent");
    let agent_log = dir.path().join("agent.log");

    // The most gateway sessions ever identified at once, sampled throughout.
    let most = Arc::new(AtomicUsize::new(0));
    let watching = CancellationToken::new();
    let watch = tokio::spawn({
        let (sim, most, watching) = (sim.clone(), most.clone(), watching.clone());
        async move {
            while !watching.is_cancelled() {
                most.fetch_max(sim.gateway_sessions(), Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    });

    let shared = Shared {
        database_url: PgServer::shared()
            .create_database(&format!("failover_{}", rand::random::<u64>()))
            .expect("a database for the test's cluster"),
        nats_url: NatsServer::shared().url(),
        bot_env: [
            ("DISCORD_TOKEN", sim.token().to_string()),
            ("DISCORD_API_PROXY", sim.api_base()),
            ("DISCORD_GUILD_ID", sim.guild_id().to_string()),
            ("LOG_LEVEL", "info".to_string()),
            // Plain text: the logs are files to read.
            ("NO_COLOR", "1".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.into(), v.into()))
        .collect(),
    };

    // node-0 first: it takes the `discord` lease and identifies; the others find the lease taken.
    let mut nodes = vec![start_node(&shared, dir.path(), 0).await];
    let _keep = KeepLogsOnFailure {
        logs: (0..NODES)
            .map(|i| dir.path().join(format!("node-{i}.log")))
            .chain([agent_log.clone()])
            .collect(),
    };
    sim.wait_identified(T).await.unwrap();
    sim.wait_for(|c| c.is("PUT", "/applications/*/guilds/*/commands"), T)
        .await
        .unwrap();
    let first_session = sim
        .gateway_events()
        .iter()
        .find(|e| e.op == 2)
        .expect("node-0 identified")
        .session;
    for i in 1..NODES {
        nodes.push(start_node(&shared, dir.path(), i).await);
    }
    let addrs: Vec<String> = nodes.iter().map(|n| n.target.addr.to_string()).collect();
    // node-0 puts the nodes it saw alive at its last heartbeat (every 2 s) into the tokens it mints: wait
    // until it has seen all three, then until a token names them.
    eventually_async(T, async || {
        nodes[0]
            .cluster()
            .await
            .is_ok_and(|v| v.iter().filter(|n| n.alive).count() == NODES)
    })
    .await;
    let mut token = None;
    eventually_async(T, async || {
        let t = nodes[0].pair_code(&alice.id).await.unwrap();
        let all = t.relays.len() == NODES;
        token = Some(t);
        all || {
            tokio::time::sleep(Duration::from_millis(500)).await;
            false
        }
    })
    .await;
    let token = token.unwrap();
    // Paired through node-0, so its address comes first and the agent connects there.
    assert_eq!(
        token.relays[0], addrs[0],
        "node-0 first: {:?}",
        token.relays
    );
    let mut named = token.relays.clone();
    named.sort();
    let mut all = addrs.clone();
    all.sort();
    assert_eq!(named, all, "the token names every node");
    let mut pair = AgentProcess::command(&agent_dir, &claude, &allowed, &agent_log);
    AgentProcess::pair(&mut pair, &token).await;
    let pairing = ct_agent::ConfigDir::open(&agent_dir)
        .unwrap()
        .load_pairing()
        .unwrap()
        .expect("paired");
    assert_eq!(
        pairing.relays, token.relays,
        "the pairing names all three nodes"
    );
    let _agent = AgentProcess::run(AgentProcess::command(
        &agent_dir, &claude, &allowed, &agent_log,
    ));
    eventually_async(T, async || {
        holder(&nodes[0]).await.as_deref() == Some("node-0")
    })
    .await;

    // The project, added from Discord: the gateway on node-0, the agent's answer through node-0.
    let add = SlashCommand::new("project").sub(
        "add",
        [
            Opt::str("name", "app"),
            Opt::str("path", &project.display().to_string()),
        ],
    );
    let ix = sim.send_slash(&sim.origin(&alice), &add).unwrap();
    let said = answer(&sim, &ix).await.content;
    assert!(said.contains("**app**"), "{said}");

    // Claude says what it will do (a message in the thread), runs the job, and sums up after it.
    let job = LongJob::printing(&project, 10);
    let intro = "Running the build; it prints as it goes.";
    let outro = "The build printed all its lines.";
    fake.push(Reply::text_then_tool_use(
        intro,
        "Bash",
        json!({ "command": job.command(), "description": "Run the build" }),
    ));
    fake.push(Reply::text(outro));
    let (task, thread) = start_task(&sim, &alice, "run the build").await;
    // Whether the CLI asks before running a project script is its own business: allow it if asked.
    let me = std::process::id();
    let approval_prefix = format!("ao:{task}:");
    tokio::select! {
        approval = message_in(&sim, &thread, "approval message", |m| {
            m.custom_ids().iter().any(|c| c.starts_with(&approval_prefix))
        }) => {
            let id = approval
                .custom_ids()
                .into_iter()
                .find(|c| c.starts_with(&approval_prefix))
                .unwrap();
            sim.send_button(&sim.origin_in(&alice, &thread), &approval.id, &id)
                .unwrap();
        }
        started = poll_until(T, "the job runs", || job.child_below(me).is_some()) => {
            started.expect("the job runs");
        }
    }
    poll_until(T, "the job runs", || job.child_below(me).is_some())
        .await
        .expect("the job runs");
    // Output has reached the thread: Claude's words, and the progress message showing the job.
    message_in(&sim, &thread, "Claude's first words", |m| {
        m.content == intro
    })
    .await;
    message_in(&sim, &thread, "the job in the progress message", |m| {
        m.custom_ids() == [format!("st:{task}")] && m.content.contains("long-job-lines")
    })
    .await;
    // Every node agrees where the agent is (the presence is in the shared store).
    for node in &nodes[1..] {
        eventually_async(T, async || holder(node).await.as_deref() == Some("node-0")).await;
    }

    // How the agent is connected decides how soon it notices (QUIC: at its idle timeout; TCP: a reset).
    let transport = nodes[0]
        .agents()
        .await
        .unwrap()
        .into_iter()
        .find_map(|a| a.transport)
        .expect("the agent's transport");
    // node-0 dies: no Closing, no lease released, no flush.
    let killed = Instant::now();
    nodes[0].kill().await.unwrap();

    // The agent comes back on a survivor, which its admin socket shows.
    let mut moved_to = None;
    eventually_async(T, async || {
        moved_to = holder(&nodes[1]).await.filter(|n| n != "node-0");
        moved_to.is_some()
    })
    .await;
    let agent_back = killed.elapsed();
    let moved_to = moved_to.unwrap();
    let survivor = if moved_to == "node-1" {
        &nodes[1]
    } else {
        &nodes[2]
    };
    assert_eq!(holder(survivor).await.as_deref(), Some(moved_to.as_str()));
    job.release();

    // Another node takes the lease (once node-0's has lapsed) and identifies: a new gateway session.
    sim.wait_until(T, |s| {
        s.gateway_events()
            .iter()
            .any(|e| e.op == 2 && e.session != first_session)
            .then_some(())
    })
    .await
    .expect("a survivor identifies with Discord");
    let gateway_back = killed.elapsed();

    // The task finishes, and its stored log is 1..n with each event once: read on both survivors.
    let mut logs = Vec::new();
    for node in &nodes[1..] {
        let (events, end) = node.follow(&task, T).await.unwrap();
        assert_eq!(end.as_deref(), Some("Done"), "{events:#?}");
        logs.push(events);
    }
    let events = &logs[0];
    let seqs: Vec<u64> = events.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, (1..=events.len() as u64).collect::<Vec<_>>());
    assert_eq!(logs[1].len(), events.len(), "both survivors read one log");
    let count = |f: &dyn Fn(&TaskEvent) -> bool| events.iter().filter(|(_, e)| f(e)).count();
    assert_eq!(count(&|e| matches!(e, TaskEvent::Started { .. })), 1);
    assert_eq!(count(&|e| matches!(e, TaskEvent::Finished { .. })), 1);
    assert_eq!(
        count(&|e| matches!(e, TaskEvent::Text { text } if text == intro)),
        1
    );
    assert_eq!(
        count(&|e| matches!(e, TaskEvent::Text { text } if text == outro)),
        1
    );
    let output: Vec<&str> = events
        .iter()
        .filter_map(|(_, e)| match e {
            TaskEvent::ToolResult { summary, .. } => Some(summary.as_str()),
            _ => None,
        })
        .flat_map(str::lines)
        .collect();
    for line in job.output_lines() {
        assert_eq!(
            output.iter().filter(|l| l.trim() == line).count(),
            1,
            "{line:?} once in the job's output: {output:#?}"
        );
    }

    // The thread gets the final result, and nothing in it is there twice.
    message_in(&sim, &thread, "the summary", |m| {
        m.embeds[0]["title"].as_str() == Some(&format!("✅ Done · {task}"))
    })
    .await;
    message_in(&sim, &thread, "Claude's last words", |m| m.content == outro).await;
    let messages = sim.messages(&thread);
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for m in &messages {
        *seen
            .entry(format!("{}|{}", m.content, m.embeds))
            .or_default() += 1;
    }
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "posted twice: {twice:#?}\n{messages:#?}");
    let progress = messages
        .iter()
        .filter(|m| m.custom_ids() == [format!("st:{task}")])
        .count();
    assert_eq!(progress, 1, "one progress message: {messages:#?}");

    watching.cancel();
    watch.await.unwrap();
    assert_eq!(
        most.load(Ordering::SeqCst),
        1,
        "never two gateway sessions identified at once"
    );
    let limited: Vec<_> = sim
        .calls()
        .into_iter()
        .filter(|c| c.status == 429)
        .collect();
    assert!(limited.is_empty(), "rate-limited calls: {limited:#?}");

    eprintln!(
        "failover: agent ({transport:?}) back on {moved_to} {:.1} s after the kill, gateway identified again \
         after {:.1} s; whole test {:.1} s",
        agent_back.as_secs_f64(),
        gateway_back.as_secs_f64(),
        began.elapsed().as_secs_f64()
    );
    for node in &mut nodes[1..] {
        node.stop().await.unwrap();
    }
    Arc::try_unwrap(sim).ok().unwrap().shutdown().await;
}
