//! The `ct-relay` command line: run the relay, or talk to a running one through its admin socket.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::admin::{self, Reply, Request};
use crate::core::{human_duration, AgentView};
use crate::relay::{Relay, RelayConfig};
use crate::store::{now, TaskState};
use crate::tls::CertSource;
use ct_protocol::task::TaskEvent;

/// CodeTogether relay: agents connect out to it; Discord users drive them through it.
#[derive(Debug, Parser)]
#[command(name = "ct-relay", version)]
pub struct Cli {
    /// Where the store, keys, certificate and admin socket live.
    #[arg(long, global = true, env = "CT_RELAY_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Address for QUIC (UDP) and HTTPS (TCP), same port; port 0 picks a free one.
    #[arg(
        long,
        global = true,
        env = "CT_RELAY_LISTEN",
        default_value = "0.0.0.0:7443"
    )]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub run: RunArgs,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// HOST:PORT agents use to reach this relay, put into pairing tokens (repeat for several).
    #[arg(
        long = "public-addr",
        env = "CT_RELAY_PUBLIC_ADDR",
        value_delimiter = ','
    )]
    pub public_addrs: Vec<String>,
    /// PEM certificate chain to serve instead of the generated self-signed one.
    #[arg(long, env = "CT_RELAY_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, env = "CT_RELAY_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Do not serve QUIC (agents use WebSocket over TLS).
    #[arg(long)]
    pub no_quic: bool,
    /// Do not serve WebSocket (agents must reach UDP).
    #[arg(long)]
    pub no_websocket: bool,
    /// Minutes a pairing code stays valid.
    #[arg(long, env = "CT_RELAY_PAIR_CODE_MINUTES", default_value_t = 10)]
    pub pair_code_minutes: u64,
    /// Connections served at once (QUIC and TCP together); more are refused at accept.
    #[arg(long, env = "CT_RELAY_MAX_CONNECTIONS", default_value_t = 50_000)]
    pub max_connections: usize,
    /// Discord bot token; without it the relay serves agents and the bot is off.
    #[arg(long, env = "DISCORD_TOKEN", hide_env_values = true)]
    pub discord_token: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Talk to the running relay through its admin socket.
    Admin {
        #[command(subcommand)]
        command: AdminCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Mint a one-time pairing token for a Discord user.
    PairCode {
        /// The Discord user id the agent will belong to.
        #[arg(long)]
        user: String,
    },
    /// List paired agents.
    Agents {
        #[arg(long)]
        json: bool,
    },
    /// Refuse an agent's key from now on and drop its connection.
    Revoke {
        /// Fingerprint (or its first 10+ characters), name, or owner/name.
        agent: String,
    },
    /// Addresses, key fingerprint and counts of the running relay.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Run a task as a Discord user and follow its output here until it ends.
    Task {
        /// The Discord user id to act as.
        #[arg(long = "as", value_name = "USER")]
        user: String,
        /// The project (a name the agent knows, or an allowed path).
        #[arg(long)]
        project: String,
        /// Which of the user's agents, when they have several.
        #[arg(long)]
        agent: Option<String>,
        /// Claude model for this task.
        #[arg(long)]
        model: Option<String>,
        /// Claude Code permission mode (default, acceptEdits, plan, ...).
        #[arg(long)]
        mode: Option<String>,
        /// The prompt.
        #[arg(required = true, num_args = 1..)]
        prompt: Vec<String>,
    },
    /// Follow a task's output from the start until it ends.
    Follow { task: String },
    /// Cancel a task, acting as a Discord user.
    Cancel {
        #[arg(long = "as", value_name = "USER")]
        user: String,
        task: String,
    },
    /// Answer an approval request, acting as a Discord user: allow, allow-session, or deny (with --reason).
    Approve {
        #[arg(long = "as", value_name = "USER")]
        user: String,
        task: String,
        approval: String,
        #[arg(value_parser = ["allow", "allow-session", "deny"])]
        decision: String,
        #[arg(long)]
        reason: Option<String>,
    },
}

/// The default data directory: `$XDG_DATA_HOME/ct-relay`, else `~/.local/share/ct-relay`.
pub fn default_data_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(x).join("ct-relay");
    }
    match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        Some(home) => PathBuf::from(home).join(".local/share/ct-relay"),
        None => PathBuf::from("ct-relay-data"),
    }
}

/// Sets up logging: `LOG_LEVEL` (default info) and `LOG_FORMAT=json`.
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("LOG_LEVEL")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::env::var("LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json")) {
        builder.json().init();
    } else {
        builder.init();
    }
}

pub async fn run(cli: Cli) -> Result<()> {
    let data_dir = cli.data_dir.clone().unwrap_or_else(default_data_dir);
    match cli.command {
        None => serve(cli, data_dir).await,
        Some(Command::Admin { command }) => admin_command(&data_dir, command).await,
    }
}

async fn serve(cli: Cli, data_dir: PathBuf) -> Result<()> {
    let mut config = RelayConfig::new(data_dir, cli.listen);
    config.public_addrs = cli.run.public_addrs;
    if let (Some(cert), Some(key)) = (cli.run.tls_cert, cli.run.tls_key) {
        config.cert = CertSource::Files { cert, key };
    }
    config.quic = !cli.run.no_quic;
    config.websocket = !cli.run.no_websocket;
    config.core.pair_code_ttl =
        std::time::Duration::from_secs(cli.run.pair_code_minutes.max(1) * 60);
    config.core.max_connections = cli.run.max_connections.max(1);
    config.discord_token = cli.run.discord_token.is_some_and(|t| !t.is_empty());
    if config.discord_token {
        tracing::warn!("DISCORD_TOKEN is set, but this build has no Discord bot yet: serving agents and the admin socket only");
    } else {
        tracing::info!("DISCORD_TOKEN is not set: the Discord bot is off; agents and the admin socket work as usual");
    }
    let relay = Relay::bind(config).await?;
    let shutdown = CancellationToken::new();
    let signals = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        signals.cancel();
    });
    relay.run(shutdown).await
}

async fn wait_for_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM; only ctrl-c stops the relay");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupt received"),
    }
}

async fn admin_command(data_dir: &std::path::Path, command: AdminCommand) -> Result<()> {
    let (req, json) = match &command {
        AdminCommand::Task {
            user,
            project,
            agent,
            model,
            mode,
            prompt,
        } => {
            let options = ct_protocol::task::TaskOptions {
                model: model.clone(),
                permission_mode: mode.clone(),
                ..Default::default()
            };
            let req = Request::Task {
                user: user.clone(),
                agent: agent.clone(),
                project: project.clone(),
                prompt: prompt.join(" "),
                options,
            };
            return follow_task(data_dir, &req).await;
        }
        AdminCommand::Follow { task } => {
            return follow_task(data_dir, &Request::Follow { task: task.clone() }).await
        }
        AdminCommand::Cancel { user, task } => (
            Request::Cancel {
                user: user.clone(),
                task: task.clone(),
            },
            false,
        ),
        AdminCommand::Approve {
            user,
            task,
            approval,
            decision,
            reason,
        } => {
            use ct_protocol::task::Decision;
            let decision = match decision.as_str() {
                "allow" => Decision::AllowOnce {
                    updated_input: None,
                },
                "allow-session" => Decision::AllowSession,
                _ => Decision::Deny {
                    reason: reason
                        .clone()
                        .unwrap_or_else(|| "denied by the operator".into()),
                },
            };
            let req = Request::Decide {
                user: user.clone(),
                task: task.clone(),
                approval: approval.clone(),
                decision,
            };
            (req, false)
        }
        AdminCommand::PairCode { user } => (Request::PairCode { user: user.clone() }, false),
        AdminCommand::Agents { json } => (Request::Agents, *json),
        AdminCommand::Revoke { agent } => (
            Request::Revoke {
                agent: agent.clone(),
            },
            false,
        ),
        AdminCommand::Status { json } => (Request::Status, *json),
    };
    let reply = admin::call(data_dir, &req).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&reply)?);
        return Ok(());
    }
    match reply {
        Reply::Error { message } => anyhow::bail!(message),
        Reply::Done { message } => println!("{message}"),
        Reply::Task { .. } | Reply::Event { .. } | Reply::End { .. } => {
            anyhow::bail!("unexpected task stream reply")
        }
        Reply::PairCode {
            token,
            expires_at,
            user,
        } => {
            println!(
                "Pairing token for Discord user {user} (valid for {}, single use):\n",
                human_duration(expires_at.saturating_sub(now()))
            );
            println!("  {token}\n");
            println!("On the machine the agent should run on:\n\n  ct-agent pair {token}");
        }
        Reply::Agents { agents } => print!("{}", agents_table(&agents)),
        Reply::Revoked { agent } => println!(
            "Revoked {}/{} ({}): its key is refused from now on{}.",
            agent.owner,
            agent.name,
            agent.fingerprint,
            if agent.online {
                ""
            } else {
                " and its connection was dropped"
            }
        ),
        Reply::Status(s) => {
            println!("ct-relay {}", s.version);
            println!(
                "  QUIC (UDP):        {}",
                s.quic.as_deref().unwrap_or("off")
            );
            println!(
                "  HTTPS/WS (TCP):    {}",
                s.https.as_deref().unwrap_or("off")
            );
            println!("  public addresses:  {}", s.public_addrs.join(", "));
            println!("  relay key:         {}", s.relay_fingerprint);
            println!(
                "  agents:            {} online, {} paired",
                s.agents_online, s.agents_paired
            );
            println!("  data directory:    {}", s.data_dir);
            println!(
                "  Discord bot:       {}",
                if s.discord_bot {
                    "token set"
                } else {
                    "off (no DISCORD_TOKEN)"
                }
            );
        }
    }
    Ok(())
}

/// Streams a task's events to the terminal; fails (exit 1) unless the task ends done.
async fn follow_task(data_dir: &std::path::Path, req: &Request) -> Result<()> {
    use std::io::Write as _;
    let mut outcome: Option<(TaskState, Option<String>)> = None;
    let mut error = None;
    admin::call_stream(data_dir, req, |reply| {
        let mut out = std::io::stdout().lock();
        match reply {
            Reply::Task { task, state } => {
                let _ = writeln!(out, "task {task} ({state:?})");
            }
            Reply::Event { event, .. } => {
                let _ = write!(out, "{}", render_event(&event));
                let _ = out.flush();
            }
            Reply::End { state, message } => {
                outcome = Some((state, message));
                return false;
            }
            Reply::Error { message } => {
                error = Some(message);
                return false;
            }
            other => error = Some(format!("unexpected reply {other:?}")),
        }
        true
    })
    .await?;
    if let Some(message) = error {
        anyhow::bail!(message);
    }
    match outcome {
        Some((TaskState::Done, _)) => Ok(()),
        Some((state, message)) => {
            anyhow::bail!("task ended {state:?}{}", message.map(|m| format!(": {m}")).unwrap_or_default())
        }
        None => anyhow::bail!("the relay stopped streaming before the task ended (it may be restarting): follow it again with `ct-relay admin follow <task>`"),
    }
}

/// One task event as terminal text.
pub fn render_event(event: &TaskEvent) -> String {
    match event {
        TaskEvent::Started { cwd } => format!("> started in {cwd}\n"),
        TaskEvent::Session { session_id, model, .. } => {
            format!("> session {session_id}{}\n", model.as_deref().map(|m| format!(" ({m})")).unwrap_or_default())
        }
        TaskEvent::Text { text } => format!("{text}\n"),
        TaskEvent::Tool { name, summary } => format!("  - {name}: {summary}\n"),
        TaskEvent::ToolResult { is_error: true, summary } => format!("    error: {summary}\n"),
        TaskEvent::ToolResult { .. } => String::new(),
        TaskEvent::ApprovalRequested { approval, tool, summary, .. } => format!(
            "? approval {approval}: {tool} {summary}\n  answer: ct-relay admin approve --as <owner> <task> {approval} allow|allow-session|deny\n"
        ),
        TaskEvent::ApprovalClosed { approval, outcome } => format!("  approval {approval}: {outcome}\n"),
        TaskEvent::TurnFinished { is_error, turns, cost_usd, .. } => format!(
            "> turn {}{}{}\n",
            if *is_error { "failed" } else { "done" },
            turns.map(|t| format!(", {t} turns")).unwrap_or_default(),
            cost_usd.map(|c| format!(", ${c:.4}")).unwrap_or_default()
        ),
        TaskEvent::Finished { state, message } => {
            format!("> {state:?}{}\n", message.as_deref().map(|m| format!(": {m}")).unwrap_or_default())
        }
    }
}

/// The `admin agents` table.
pub fn agents_table(agents: &[AgentView]) -> String {
    if agents.is_empty() {
        return "No agents paired yet. Mint a token with `ct-relay admin pair-code --user <discord-user-id>`.\n".into();
    }
    let t = now();
    let rows: Vec<[String; 5]> = agents
        .iter()
        .map(|a| {
            let state = if a.revoked {
                "revoked".to_string()
            } else if a.online {
                format!(
                    "online {}",
                    a.since
                        .map(|s| format!("for {}", human_duration(t.saturating_sub(s))))
                        .unwrap_or_default()
                )
            } else {
                a.since.map_or("never connected".into(), |s| {
                    format!("last seen {} ago", human_duration(t.saturating_sub(s)))
                })
            };
            let transport = a.transport.map_or("-".to_string(), |t| t.to_string());
            [
                a.owner.clone(),
                a.name.clone(),
                a.fingerprint.to_string(),
                state,
                transport,
            ]
        })
        .collect();
    let header = ["OWNER", "NAME", "FINGERPRINT", "STATUS", "TRANSPORT"];
    let widths: Vec<usize> = (0..5)
        .map(|i| {
            rows.iter()
                .map(|r| r[i].len())
                .chain([header[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: &[&str]| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
            + "\n"
    };
    let mut out = line(&header);
    for r in &rows {
        out += &line(&r.iter().map(String::as_str).collect::<Vec<_>>());
    }
    out
}
