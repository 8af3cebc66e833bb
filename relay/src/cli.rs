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
    /// Where people open the web dashboard, when not at the first --public-addr: e.g.
    /// `https://relay.example.com` for a relay behind a reverse proxy. `/dashboard` links are made from it.
    #[arg(long, env = "CT_RELAY_DASHBOARD_URL", value_parser = dashboard_url)]
    pub dashboard_url: Option<String>,
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
    /// Connections served at once (QUIC and TCP together); more are refused at accept. Default: what the
    /// descriptor limit allows (raised to its hard limit at start), less a reserve, at most 50,000.
    #[arg(long, env = "CT_RELAY_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Connections one address (IPv6: one /64) may hold at once. Agents behind one NAT share an address.
    #[arg(
        long,
        env = "CT_RELAY_MAX_CONNECTIONS_PER_ADDRESS",
        default_value_t = 128
    )]
    pub max_connections_per_address: usize,
    /// Seconds a TCP client has for its TLS handshake and then for each HTTP request (headers and body).
    #[arg(long, env = "CT_RELAY_REQUEST_TIMEOUT_SECS", default_value_t = 10)]
    pub request_timeout_secs: u64,
    /// Tasks one person may start per minute (after a burst of half as many, at least 1).
    #[arg(long, env = "CT_RELAY_TASKS_PER_MINUTE", default_value_t = 20)]
    pub tasks_per_minute: u32,
    /// Tasks one person may have queued or running at once, across all agents.
    #[arg(long, env = "CT_RELAY_MAX_TASKS_PER_USER", default_value_t = 8)]
    pub max_tasks_per_user: usize,
    /// Agents one person may have paired at once.
    #[arg(long, env = "CT_RELAY_MAX_AGENTS_PER_USER", default_value_t = 20)]
    pub max_agents_per_user: usize,
    /// Project reports one agent may send per minute; more are ignored.
    #[arg(
        long,
        env = "CT_RELAY_PROJECT_REPORTS_PER_MINUTE",
        default_value_t = 12
    )]
    pub project_reports_per_minute: u32,
    /// MiB of task output one person's tasks may keep; past it their new tasks are refused until old ones
    /// are deleted by retention.
    #[arg(long, env = "CT_RELAY_MAX_STORED_MIB_PER_USER", default_value_t = 512)]
    pub max_stored_mib_per_user: u64,
    /// MiB of output the relay keeps per task; past it only approvals, turn results and the end are kept.
    #[arg(long, env = "CT_RELAY_MAX_TASK_OUTPUT_MIB", default_value_t = 32)]
    pub max_task_output_mib: u64,
    /// Days an ended task and its output are kept.
    #[arg(long, env = "CT_RELAY_TASK_RETENTION_DAYS", default_value_t = 30)]
    pub task_retention_days: u64,
    /// Days audit entries are kept.
    #[arg(long, env = "CT_RELAY_AUDIT_RETENTION_DAYS", default_value_t = 180)]
    pub audit_retention_days: u64,
    /// PostgreSQL URL (postgres://USER:PASSWORD@HOST/DB): run as one node of a cluster whose state is in this
    /// database. Needs --nats-url too. Without both, the relay keeps its state in --data-dir (sled).
    #[arg(
        long,
        env = "CT_DATABASE_URL",
        hide_env_values = true,
        requires = "nats_url"
    )]
    pub database_url: Option<String>,
    /// NATS URL (nats://HOST:4222) the nodes of a cluster route through; with credentials,
    /// nats://USER:PASSWORD@HOST:4222 or nats://TOKEN@HOST:4222 (percent-encode special characters). Needs
    /// --database-url too.
    #[arg(
        long,
        env = "CT_NATS_URL",
        hide_env_values = true,
        requires = "database_url"
    )]
    pub nats_url: Option<String>,
    /// This node's name in the cluster (logs, metrics, `ct-relay admin cluster`); defaults to the host name.
    #[arg(long, env = "CT_NODE_ID")]
    pub node_id: Option<String>,
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
    /// Move an embedded relay (its data directory: agents, users, shares, tasks, events, audit log and relay
    /// key) into a cluster's PostgreSQL database. Stop the relay first. Agents reconnect to the cluster's
    /// nodes without pairing again: the nodes answer for the same relay key.
    Migrate {
        /// The embedded relay's data directory.
        #[arg(long = "from-data-dir", value_name = "DIR")]
        from: PathBuf,
        /// The cluster's database (postgres://USER:PASSWORD@HOST/DB), empty or freshly created.
        #[arg(
            long = "to",
            value_name = "URL",
            env = "CT_DATABASE_URL",
            hide_env_values = true
        )]
        to: String,
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
    /// Mint a one-time sign-in link to the web dashboard for a Discord user (as `/dashboard` does in
    /// Discord): for relays without the bot, or to hand someone a link yourself.
    DashboardLink {
        /// The Discord user id the link signs in as.
        #[arg(long)]
        user: String,
    },
    /// Mint a one-time pairing token for a new worker of a pool (the pool is created if new, open to nobody
    /// until `pool-access` says who may use it).
    PoolCode {
        /// The pool's name: letters, digits, `-` and `_`.
        #[arg(long)]
        pool: String,
    },
    /// Set who may use a pool: everyone, members of Discord roles, or a list of Discord users.
    #[command(group(clap::ArgGroup::new("who").required(true).args(["everyone", "role", "user"])))]
    PoolAccess {
        #[arg(long)]
        pool: String,
        /// Everyone who can use the relay.
        #[arg(long)]
        everyone: bool,
        /// Members of these Discord roles (role ids; repeat, or separate with commas).
        #[arg(long, value_delimiter = ',', num_args = 1..)]
        role: Vec<String>,
        /// These Discord users (user ids; repeat, or separate with commas).
        #[arg(long, value_delimiter = ',', num_args = 1..)]
        user: Vec<String>,
    },
    /// Pools, their access, workers (online, draining, users, open tasks) and users.
    Pools {
        #[arg(long)]
        json: bool,
    },
    /// Drain a pool worker: it gets no new users, and its users move to another worker on their next task
    /// (their files stay on this one).
    PoolDrain {
        /// The worker's name, pool:NAME/name, or fingerprint (or its first 10+ characters).
        #[arg(long)]
        worker: String,
        /// Take the worker back into use.
        #[arg(long)]
        undo: bool,
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
    /// The relay nodes of the cluster (one, for an embedded relay) and how many agents each holds.
    Cluster {
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
        /// Where the task edits: `worktree` (a git worktree and branch ct/<task> of its own) or `shared`
        /// (the project's own folder); unset, the project's default on the agent.
        #[arg(long, value_parser = ["worktree", "shared"])]
        isolation: Option<String>,
        /// Run on the agents of this Discord user, who shared them with USER.
        #[arg(long, value_name = "OWNER")]
        target: Option<String>,
        /// USER's display name, shown to the agent's owner.
        #[arg(long)]
        name: Option<String>,
        /// The prompt.
        #[arg(required = true, num_args = 1..)]
        prompt: Vec<String>,
    },
    /// Send a follow-up to a task: to its live session while it runs, or as a new task that resumes its
    /// session once it has ended (followed here until it ends).
    Reply {
        #[arg(long = "as", value_name = "USER")]
        user: String,
        /// USER's display name, shown to the agent's owner.
        #[arg(long)]
        name: Option<String>,
        task: String,
        #[arg(required = true, num_args = 1..)]
        prompt: Vec<String>,
    },
    /// Share a user's agents with other users, stop, or list shares.
    Share {
        #[command(subcommand)]
        command: ShareCommand,
    },
    /// Add, remove or list the projects of one of a user's agents (the agent must be online).
    Project {
        #[command(subcommand)]
        command: ProjectCommand,
    },
    /// Set the agent used when USER names none.
    DefaultAgent {
        #[arg(long = "as", value_name = "USER")]
        user: String,
        /// Agent name or fingerprint.
        agent: String,
    },
    /// Follow a task's output from the start until it ends.
    Follow { task: String },
    /// Cancel a task, acting as a Discord user.
    Cancel {
        #[arg(long = "as", value_name = "USER")]
        user: String,
        task: String,
    },
    /// Show the audit log, newest first: pairings, revocations, share changes, grantees' tasks, approval
    /// decisions, cancels, project and default-agent changes, and who did each.
    Audit {
        /// Only entries about this owner's agents.
        #[arg(long)]
        owner: Option<String>,
        /// Only entries by this actor (a Discord user id, or `operator`).
        #[arg(long)]
        actor: Option<String>,
        /// Only entries about this agent (name or fingerprint).
        #[arg(long)]
        agent: Option<String>,
        /// How many entries (at most 1000).
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Only entries older than this sequence number: the next page after the last one shown.
        #[arg(long)]
        before: Option<u64>,
        #[arg(long)]
        json: bool,
    },
    /// Merge a finished task's worktree branch into the project's checked-out branch, keep the branch, or
    /// discard it (worktree and branch), acting as a Discord user: the task's requester or the agent's owner.
    Worktree {
        #[arg(value_parser = ["merge", "keep", "discard"])]
        action: String,
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

#[derive(Debug, Subcommand)]
pub enum ShareCommand {
    /// Let GRANTEE run tasks on all of USER's agents (all projects unless --project names some).
    Add {
        #[arg(long = "as", value_name = "USER")]
        user: String,
        grantee: String,
        /// Limit the share to these projects (repeat, or separate with commas).
        #[arg(long = "project", value_delimiter = ',')]
        projects: Vec<String>,
        /// Let GRANTEE decide the approvals of their own tasks.
        #[arg(long)]
        trusted: bool,
    },
    /// Stop sharing with GRANTEE at once, cancelling their queued and running tasks.
    Remove {
        #[arg(long = "as", value_name = "USER")]
        user: String,
        grantee: String,
    },
    /// Whom USER shares with.
    List {
        #[arg(long = "as", value_name = "USER")]
        user: String,
        #[arg(long)]
        json: bool,
    },
    /// Who shares with USER, and which agents and projects that gives them.
    Available {
        #[arg(long = "as", value_name = "USER")]
        user: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum ProjectCommand {
    /// Name a folder on the agent's machine (it must be inside the agent's allowed folders).
    Add {
        #[arg(long = "as", value_name = "USER")]
        user: String,
        #[arg(long)]
        agent: Option<String>,
        name: String,
        path: String,
    },
    /// Forget a project name (the folder is untouched).
    Remove {
        #[arg(long = "as", value_name = "USER")]
        user: String,
        #[arg(long)]
        agent: Option<String>,
        name: String,
    },
    /// The agent's projects and allowed folders.
    List {
        #[arg(long = "as", value_name = "USER")]
        user: String,
        #[arg(long)]
        agent: Option<String>,
        #[arg(long)]
        json: bool,
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
        Some(Command::Migrate { from, to }) => migrate(from, to).await,
    }
}

async fn migrate(from: PathBuf, to: String) -> Result<()> {
    use anyhow::Context as _;
    let moved = tokio::task::spawn_blocking(move || -> Result<crate::migrate::Moved> {
        let key = crate::tls::existing_relay_key(&from)?;
        let source = crate::store::sled::SledStore::open(&from.join("db")).with_context(|| {
            format!(
                "opening the embedded relay's store in {} (is that relay still running? stop it first)",
                from.display()
            )
        })?;
        let target = crate::store::postgres::PgStore::open(&to)
            .context("opening the cluster's PostgreSQL database (--to)")?;
        crate::migrate::copy(&source, &target, &key.to_bytes())
    })
    .await
    .context("the migration stopped")??;
    println!("moved {moved}");
    println!(
        "start the cluster's nodes with --database-url (and --nats-url); agents reconnect to them without \
         pairing again once the relay's address (or every node's) is what their pairing names"
    );
    Ok(())
}

/// `--dashboard-url`: an https URL with no path beyond `/`, query or fragment (links are made by appending to it).
fn dashboard_url(value: &str) -> Result<String, String> {
    let base = value.trim().trim_end_matches('/');
    let rest = base.strip_prefix("https://").ok_or_else(|| {
        "the dashboard URL must start with https:// (sessions use Secure cookies)".to_string()
    })?;
    if rest.is_empty() || rest.contains(['/', '?', '#', ' ']) {
        return Err(format!(
            "{value:?} is not a site's address: give only scheme and host, e.g. https://relay.example.com"
        ));
    }
    Ok(base.to_string())
}

async fn serve(cli: Cli, data_dir: PathBuf) -> Result<()> {
    let mut config = RelayConfig::new(data_dir, cli.listen);
    config.public_addrs = cli.run.public_addrs;
    config.core.dashboard_url = cli.run.dashboard_url;
    config.core.node_id = match cli.run.node_id {
        Some(id) => id,
        None => crate::sys::host_name(),
    };
    config.cluster = match (cli.run.database_url, cli.run.nats_url) {
        (Some(database_url), Some(nats_url)) => Some(crate::relay::ClusterConfig {
            database_url,
            nats_url,
        }),
        _ => None,
    };
    if let (Some(cert), Some(key)) = (cli.run.tls_cert, cli.run.tls_key) {
        config.cert = CertSource::Files { cert, key };
    }
    config.quic = !cli.run.no_quic;
    config.websocket = !cli.run.no_websocket;
    config.core.pair_code_ttl =
        std::time::Duration::from_secs(cli.run.pair_code_minutes.max(1) * 60);
    config.core.max_connections = connection_limit(cli.run.max_connections);
    config.core.max_connections_per_address = cli.run.max_connections_per_address.max(1);
    config.core.request_timeout =
        std::time::Duration::from_secs(cli.run.request_timeout_secs.max(1));
    config.core.tasks_per_minute = cli.run.tasks_per_minute.max(1);
    config.core.task_burst = (cli.run.tasks_per_minute / 2).max(1);
    config.core.max_tasks_per_user = cli.run.max_tasks_per_user.max(1);
    config.core.max_task_output = cli.run.max_task_output_mib.max(1) * 1024 * 1024;
    config.core.max_agents_per_user = cli.run.max_agents_per_user.max(1);
    config.core.project_reports_per_minute = cli.run.project_reports_per_minute.max(1);
    config.core.max_stored_per_user = cli.run.max_stored_mib_per_user.max(1) * 1024 * 1024;
    config.core.task_retention =
        std::time::Duration::from_secs(cli.run.task_retention_days.max(1) * 86_400);
    config.core.audit_retention =
        std::time::Duration::from_secs(cli.run.audit_retention_days.max(1) * 86_400);
    // The token may come from the flag as well as the environment; the rest of the bot's settings are
    // read from the environment (see `ct_bot::config`).
    let token = cli.run.discord_token.clone();
    config.bot = crate::discord::BotConfig::from_lookup(|k| match k {
        "DISCORD_TOKEN" => token.clone(),
        _ => std::env::var(k).ok(),
    })
    .map_err(|e| anyhow::anyhow!("the Discord bot's configuration: {e}"))?;
    match &config.bot {
        Some(bot) => tracing::info!("{}", bot.describe()),
        None => tracing::info!(
            "neither DISCORD_TOKEN nor DISCORD_PUBLIC_KEY is set: the Discord bot is off; agents and the admin \
             socket work as usual"
        ),
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

/// The most connections served at once that the descriptor limit allows, or `chosen` (with a warning when it
/// is more than that): past the descriptor limit `accept` fails with EMFILE for everyone, agents and health
/// checks alike, while refusing at the limit keeps the connections already served working.
fn connection_limit(chosen: Option<usize>) -> usize {
    use crate::endpoint::limits::{connections_for, descriptor_reserve};
    const CEILING: usize = 50_000;
    let Some(descriptors) = crate::sys::raise_descriptor_limit() else {
        let limit = chosen.unwrap_or(CEILING).max(1);
        tracing::warn!(
            limit,
            "cannot read the descriptor limit; serving at most {limit} connections"
        );
        return limit;
    };
    let allowed = connections_for(descriptors, CEILING);
    match chosen {
        None => {
            tracing::info!(
                descriptors,
                max_connections = allowed,
                "serving at most {allowed} connections at once: the descriptor limit ({descriptors}) less {} \
                 kept for the store and listeners; raise LimitNOFILE (or ulimit -n) for more",
                descriptor_reserve(descriptors)
            );
            allowed
        }
        Some(n) => {
            if n > allowed {
                tracing::warn!(
                    descriptors,
                    max_connections = n,
                    "--max-connections {n} is more than the descriptor limit ({descriptors}) leaves room for \
                     ({allowed}): past it accept fails for everyone; raise LimitNOFILE or lower --max-connections"
                );
            }
            n.max(1)
        }
    }
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
            isolation,
            target,
            name,
            prompt,
        } => {
            let options = ct_protocol::task::TaskOptions {
                model: model.clone(),
                permission_mode: mode.clone(),
                isolation: isolation.as_deref().and_then(|i| i.parse().ok()),
                ..Default::default()
            };
            let req = Request::Task {
                user: user.clone(),
                agent: agent.clone(),
                project: project.clone(),
                prompt: prompt.join(" "),
                options,
                target: target.clone(),
                name: name.clone(),
            };
            return follow_task(data_dir, &req).await;
        }
        AdminCommand::Reply {
            user,
            name,
            task,
            prompt,
        } => {
            let req = Request::Reply {
                user: user.clone(),
                task: task.clone(),
                prompt: prompt.join(" "),
                name: name.clone(),
            };
            return follow_task(data_dir, &req).await;
        }
        AdminCommand::Share { command } => match command {
            ShareCommand::Add {
                user,
                grantee,
                projects,
                trusted,
            } => (
                Request::ShareAdd {
                    user: user.clone(),
                    grantee: grantee.clone(),
                    projects: (!projects.is_empty()).then(|| projects.clone()),
                    trusted: *trusted,
                },
                false,
            ),
            ShareCommand::Remove { user, grantee } => (
                Request::ShareRemove {
                    user: user.clone(),
                    grantee: grantee.clone(),
                },
                false,
            ),
            ShareCommand::List { user, json } => (Request::ShareList { user: user.clone() }, *json),
            ShareCommand::Available { user, json } => {
                (Request::ShareAvailable { user: user.clone() }, *json)
            }
        },
        AdminCommand::Project { command } => {
            use ct_protocol::project::ProjectOp;
            let (user, agent, op, json) = match command {
                ProjectCommand::Add {
                    user,
                    agent,
                    name,
                    path,
                } => (
                    user,
                    agent,
                    ProjectOp::Add {
                        name: name.clone(),
                        path: path.clone(),
                    },
                    false,
                ),
                ProjectCommand::Remove { user, agent, name } => {
                    (user, agent, ProjectOp::Remove { name: name.clone() }, false)
                }
                ProjectCommand::List { user, agent, json } => (user, agent, ProjectOp::List, *json),
            };
            let req = Request::Project {
                user: user.clone(),
                agent: agent.clone(),
                op,
            };
            (req, json)
        }
        AdminCommand::DefaultAgent { user, agent } => (
            Request::DefaultAgent {
                user: user.clone(),
                agent: agent.clone(),
            },
            false,
        ),
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
        AdminCommand::Worktree { action, user, task } => {
            use ct_protocol::task::WorktreeAction;
            let action = match action.as_str() {
                "merge" => WorktreeAction::Merge,
                "keep" => WorktreeAction::Keep,
                _ => WorktreeAction::Discard,
            };
            let req = Request::Worktree {
                user: user.clone(),
                task: task.clone(),
                action,
            };
            (req, false)
        }
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
        AdminCommand::Audit {
            owner,
            actor,
            agent,
            limit,
            before,
            json,
        } => (
            Request::Audit {
                filter: crate::audit::AuditFilter {
                    owner: owner.clone(),
                    actor: actor.clone(),
                    agent: agent.clone(),
                },
                limit: *limit,
                before: *before,
            },
            *json,
        ),
        AdminCommand::PairCode { user } => (Request::PairCode { user: user.clone() }, false),
        AdminCommand::DashboardLink { user } => {
            (Request::DashboardLink { user: user.clone() }, false)
        }
        AdminCommand::Agents { json } => (Request::Agents, *json),
        AdminCommand::PoolCode { pool } => (Request::PoolCode { pool: pool.clone() }, false),
        AdminCommand::PoolAccess {
            pool,
            everyone,
            role,
            user,
        } => {
            let access = match (*everyone, role.is_empty(), user.is_empty()) {
                (true, true, true) => crate::store::PoolAccess::Everyone,
                (false, false, true) => crate::store::PoolAccess::Roles {
                    roles: role.clone(),
                },
                (false, true, false) => crate::store::PoolAccess::Users {
                    users: user.clone(),
                },
                _ => anyhow::bail!(
                    "give one of --everyone, --role ROLE_ID... or --user USER_ID... (a pool is open to one kind \
                     of group at a time)"
                ),
            };
            (
                Request::PoolAccess {
                    pool: pool.clone(),
                    access,
                },
                false,
            )
        }
        AdminCommand::Pools { json } => (Request::Pools, *json),
        AdminCommand::PoolDrain { worker, undo } => (
            Request::PoolDrain {
                worker: worker.clone(),
                undo: *undo,
            },
            false,
        ),
        AdminCommand::Revoke { agent } => (
            Request::Revoke {
                agent: agent.clone(),
            },
            false,
        ),
        AdminCommand::Status { json } => (Request::Status, *json),
        AdminCommand::Cluster { json } => (Request::Cluster, *json),
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
        Reply::DashboardLink {
            url,
            expires_in,
            user,
        } => {
            println!(
                "Dashboard sign-in link for Discord user {user} (valid for {}, single use; whoever opens it is \
                 signed in as {user}, so hand it only to them):\n\n  {url}",
                human_duration(expires_in)
            );
        }
        Reply::Agents { agents } => print!("{}", agents_table(&agents)),
        Reply::PoolCode {
            pool,
            token,
            expires_at,
        } => {
            println!(
                "Pairing token for a new worker of pool {pool} (valid for {}, single use):\n",
                human_duration(expires_at.saturating_sub(now()))
            );
            println!("  {token}\n");
            println!("On the worker machine (or in its container):\n");
            println!("  ct-agent pair {token}");
            println!("  ct-agent run --pool");
            println!(
                "\nWho may use the pool: `ct-relay admin pool-access --pool {pool} --everyone` (or --role / --user)."
            );
        }
        Reply::Pool { pool } => {
            println!("Pool {} is open to {}.", pool.name, pool.access.describe())
        }
        Reply::Pools { pools } => print!("{}", pools_table(&pools)),
        Reply::Worker { worker } => println!(
            "Worker {} ({}) {}: {} users, {} open tasks.",
            worker.name,
            worker.fingerprint,
            if worker.draining {
                "is draining: no new users, and its users move on their next task (their files stay on it)"
            } else {
                "takes users"
            },
            worker.users.len(),
            worker.open_tasks
        ),
        Reply::Shares { shares } => print!("{}", shares_table(&shares)),
        Reply::Available { available } => print!("{}", available_text(&available)),
        Reply::Projects { report, .. } => print!("{}", projects_text(&report)),
        Reply::Audit { entries } => print!("{}", audit_table(&entries)),
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
        Reply::Cluster { nodes } => {
            println!(
                "{:<24} {:<8} {:>7} {:>10}  {:<10} ADDRESSES",
                "NODE", "STATE", "AGENTS", "HEARTBEAT", "VERSION"
            );
            for n in nodes {
                let state = if n.draining {
                    "draining"
                } else if n.alive {
                    "up"
                } else {
                    "down"
                };
                let id = if n.this {
                    format!("{} (this)", n.id)
                } else {
                    n.id.clone()
                };
                println!(
                    "{:<24} {:<8} {:>7} {:>9}s  {:<10} {}",
                    id,
                    state,
                    n.agents,
                    n.seen_secs_ago,
                    n.version,
                    n.public_addrs.join(", ")
                );
            }
        }
        Reply::Status(s) => {
            println!("ct-relay {}", s.version);
            println!("  node:              {} ({})", s.node, s.mode);
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
            let here = match s.mode.starts_with("cluster") {
                true => agents_held_here(data_dir, &s.node).await,
                false => None,
            };
            println!("  agents:            {}", agents_line(&s, here));
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

/// How many agents the node `node` holds now, from the agent list (the status's own count is the cluster's).
/// `None` when the list cannot be had: the status is printed without it.
async fn agents_held_here(data_dir: &std::path::Path, node: &str) -> Option<usize> {
    match admin::call(data_dir, &Request::Agents).await {
        Ok(Reply::Agents { agents }) => Some(
            agents
                .iter()
                .filter(|a| a.online && a.node.as_deref() == Some(node))
                .count(),
        ),
        _ => None,
    }
}

/// The status's line about agents. `agents_online` counts agents online on any node (every node reads the
/// shared store), so on a node of a cluster the line says so, beside how many this node holds (`here`), and
/// nobody takes the cluster's count for the node's.
fn agents_line(s: &admin::StatusInfo, here: Option<usize>) -> String {
    let (online, paired) = (s.agents_online, s.agents_paired);
    if !s.mode.starts_with("cluster") {
        return format!("{online} online, {paired} paired");
    }
    match here {
        Some(here) => {
            format!("{online} online in the cluster ({here} on this node), {paired} paired")
        }
        None => format!("{online} online in the cluster (on all nodes), {paired} paired"),
    }
}

/// Streams a task's events to the terminal; fails (exit 1) unless the task ends done.
async fn follow_task(data_dir: &std::path::Path, req: &Request) -> Result<()> {
    use std::io::Write as _;
    let mut outcome: Option<(TaskState, Option<String>)> = None;
    let mut error = None;
    admin::call_stream(data_dir, req, |reply| {
        let mut out = std::io::stdout().lock();
        match reply {
            Reply::Task {
                task,
                state,
                follows,
            } => {
                let follows = follows
                    .map(|f| format!(", continuing {f}"))
                    .unwrap_or_default();
                let _ = writeln!(out, "task {task} ({state:?}{follows})");
            }
            // A follow-up that went to a running task: nothing to follow here.
            Reply::Done { message } if outcome.is_none() => {
                let _ = writeln!(out, "{message}");
                outcome = Some((TaskState::Done, None));
                return false;
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
        TaskEvent::Tool {
            name,
            summary,
            auto_allowed: None,
            ..
        } => format!("  - {name}: {summary}\n"),
        TaskEvent::Tool {
            name,
            summary,
            auto_allowed: Some(rule),
            ..
        } => format!("  - {name}: {summary} (auto-allowed by the session rule: {rule})\n"),
        TaskEvent::ToolResult { is_error: true, summary, .. } => format!("    error: {summary}\n"),
        TaskEvent::ToolResult { .. } => String::new(),
        TaskEvent::ApprovalRequested { approval, tool, summary, .. } => format!(
            "? approval {approval}: {tool} {summary}\n  answer: ct-relay admin approve --as <owner> <task> {approval} allow|allow-session|deny\n"
        ),
        TaskEvent::ApprovalClosed { approval, outcome } => format!("  approval {approval}: {outcome}\n"),
        // Live figures for a Discord thread's status line; a terminal following the task has no use for them.
        TaskEvent::Context { .. } => String::new(),
        TaskEvent::TurnFinished { is_error, turns, cost_usd, .. } => format!(
            "> turn {}{}{}\n",
            if *is_error { "failed" } else { "done" },
            turns.map(|t| format!(", {t} turns")).unwrap_or_default(),
            cost_usd.map(|c| format!(", ${c:.4}")).unwrap_or_default()
        ),
        TaskEvent::Worktree { branch, base, note, change: None, .. } => format!(
            "> in worktree branch {branch} from {}{}\n",
            &base[..base.len().min(10)],
            note.as_deref().map(|n| format!(" ({n})")).unwrap_or_default()
        ),
        TaskEvent::Worktree { branch, change: Some(c), diff_cut, .. } => format!(
            "> branch {branch}: {} file(s) changed, {} insertion(s)(+), {} deletion(s)(-){}\n  merge, keep or discard it: ct-relay admin worktree merge|keep|discard --as <you> <task>\n",
            c.files_changed,
            c.insertions,
            c.deletions,
            if *diff_cut { " (diff cut)" } else { "" }
        ),
        TaskEvent::Finished { state, message } => {
            format!("> {state:?}{}\n", message.as_deref().map(|m| format!(": {m}")).unwrap_or_default())
        }
    }
}

/// Columns padded to their widest cell.
fn table<const N: usize>(header: [&str; N], rows: &[[String; N]]) -> String {
    let widths: Vec<usize> = (0..N)
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
    for r in rows {
        out += &line(&r.iter().map(String::as_str).collect::<Vec<_>>());
    }
    out
}

fn seen(online: bool, since: Option<u64>) -> String {
    let t = now();
    if online {
        since.map_or("online".into(), |s| {
            format!("online for {}", human_duration(t.saturating_sub(s)))
        })
    } else {
        since.map_or("never connected".into(), |s| {
            format!("last seen {} ago", human_duration(t.saturating_sub(s)))
        })
    }
}

/// The `admin audit` table, newest first, with a hint for the next page.
pub fn audit_table(entries: &[crate::audit::AuditEntry]) -> String {
    if entries.is_empty() {
        return "No audit entries match.\n".into();
    }
    let rows: Vec<[String; 6]> = entries
        .iter()
        .map(|e| {
            let actor = match &e.acting_as {
                Some(user) => format!("{} (as {user})", e.actor),
                None => e.actor.clone(),
            };
            [
                e.seq.to_string(),
                crate::audit::utc(e.at),
                e.kind.label().to_string(),
                actor,
                e.owner.clone(),
                match &e.task {
                    Some(task) => format!("[{task}] {}", e.detail),
                    None => e.detail.clone(),
                },
            ]
        })
        .collect();
    let mut out = table(["SEQ", "WHEN", "WHAT", "ACTOR", "OWNER", "DETAIL"], &rows);
    if let Some(last) = entries.last().filter(|e| e.seq > 1) {
        out += &format!("(older entries: add --before {})\n", last.seq);
    }
    out
}

/// The `admin share list` table.
pub fn shares_table(shares: &[crate::store::ShareRecord]) -> String {
    if shares.is_empty() {
        return "You share your agents with nobody. Share them with `ct-relay admin share add <user> --as <you>`.\n"
            .into();
    }
    let rows: Vec<[String; 3]> = shares
        .iter()
        .map(|s| {
            [
                s.grantee.clone(),
                format!("{:?}", s.level).to_lowercase(),
                s.projects.as_ref().map_or("all".into(), |p| p.join(", ")),
            ]
        })
        .collect();
    table(["GRANTEE", "LEVEL", "PROJECTS"], &rows)
}

/// The `admin share available` text: each owner, then their agents.
pub fn available_text(available: &[crate::shares::Available]) -> String {
    if available.is_empty() {
        return "Nobody shares their agents with you yet: ask an owner to run /share add with your name.\n".into();
    }
    let mut out = String::new();
    for a in available {
        out += &format!(
            "user {} ({}; projects: {})\n",
            a.owner,
            format!("{:?}", a.level).to_lowercase(),
            a.projects.as_ref().map_or("all".into(), |p| p.join(", "))
        );
        if a.agents.is_empty() {
            out += "  no agents paired yet\n";
        }
        for agent in &a.agents {
            let projects = if agent.projects.is_empty() {
                "not reported yet".to_string()
            } else {
                agent.projects.join(", ")
            };
            let refuses = if agent.accepts_shared == Some(false) {
                " (refuses shared tasks)"
            } else {
                ""
            };
            out += &format!(
                "  {}  {}  projects: {projects}{refuses}\n",
                agent.name,
                seen(agent.online, agent.since)
            );
        }
    }
    out
}

/// The `admin project` output: the agent's projects, then its allowed folders.
pub fn projects_text(report: &ct_protocol::project::ProjectsReport) -> String {
    let mut out = if report.projects.is_empty() {
        "No projects yet: add one with `ct-relay admin project add <name> <path> --as <you>`.\n"
            .to_string()
    } else {
        let rows: Vec<[String; 2]> = report
            .projects
            .iter()
            .map(|p| [p.name.clone(), p.path.clone()])
            .collect();
        table(["PROJECT", "PATH"], &rows)
    };
    out += &format!(
        "allowed folders: {}\nshared users' tasks: {}\n",
        if report.allowed_dirs.is_empty() {
            "none".to_string()
        } else {
            report.allowed_dirs.join(", ")
        },
        if report.accepts_shared {
            "accepted"
        } else {
            "refused"
        }
    );
    out
}

/// The `admin pools` table: one row per worker (a pool without workers gets one row saying so).
pub fn pools_table(pools: &[crate::core::pools::PoolView]) -> String {
    if pools.is_empty() {
        return "No pools yet. Make one with `ct-relay admin pool-code --pool NAME`.\n".into();
    }
    let mut rows: Vec<[String; 6]> = Vec::new();
    for p in pools {
        let access = p.access.describe();
        if p.workers.is_empty() {
            rows.push([
                p.name.clone(),
                access.clone(),
                "(no workers)".into(),
                "-".into(),
                "0".into(),
                "0".into(),
            ]);
        }
        for w in &p.workers {
            let state = if w.revoked {
                "revoked"
            } else if w.draining {
                "draining"
            } else if w.online {
                "online"
            } else {
                "offline"
            };
            rows.push([
                p.name.clone(),
                access.clone(),
                w.name.clone(),
                state.into(),
                w.users.len().to_string(),
                w.open_tasks.to_string(),
            ]);
        }
        let waiting = p.users.iter().filter(|u| u.worker.is_none()).count();
        if waiting > 0 {
            rows.push([
                p.name.clone(),
                access,
                "(not assigned yet)".into(),
                "-".into(),
                waiting.to_string(),
                "-".into(),
            ]);
        }
    }
    table(
        ["POOL", "ACCESS", "WORKER", "STATE", "USERS", "OPEN TASKS"],
        &rows,
    )
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
    table(
        ["OWNER", "NAME", "FINGERPRINT", "STATUS", "TRANSPORT"],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(mode: &str) -> admin::StatusInfo {
        admin::StatusInfo {
            version: "0".into(),
            node: "relay-1".into(),
            mode: mode.into(),
            quic: None,
            https: None,
            public_addrs: Vec::new(),
            relay_fingerprint: String::new(),
            agents_online: 7,
            agents_paired: 9,
            data_dir: String::new(),
            discord_bot: false,
        }
    }

    /// `admin pool-access` takes exactly one kind of group; ids may be repeated or comma-separated.
    #[test]
    fn pool_access_takes_one_kind_of_group() {
        use clap::Parser as _;
        let parse = |args: &[&str]| {
            Cli::try_parse_from(
                ["ct-relay", "admin", "pool-access", "--pool", "gpu"]
                    .iter()
                    .chain(args),
            )
        };
        let roles = parse(&["--role", "1,2", "--role", "3"]).unwrap();
        match roles.command {
            Some(Command::Admin {
                command:
                    AdminCommand::PoolAccess {
                        role,
                        user,
                        everyone,
                        ..
                    },
            }) => {
                assert_eq!(role, ["1", "2", "3"]);
                assert!(user.is_empty() && !everyone);
            }
            other => panic!("{other:?}"),
        }
        assert!(parse(&["--everyone"]).is_ok());
        assert!(parse(&["--user", "11", "12"]).is_ok());
        assert!(parse(&[]).is_err(), "one group is required");
        assert!(parse(&["--everyone", "--user", "11"]).is_err());
    }

    /// `admin status` on a node of a cluster names the count it shows, so the cluster's is not read as the
    /// node's; a relay of one, where they are the same, says it as before.
    #[test]
    fn the_agents_line_says_whose_count_it_is() {
        let cluster = status("cluster (PostgreSQL + NATS)");
        assert_eq!(
            agents_line(&cluster, Some(2)),
            "7 online in the cluster (2 on this node), 9 paired"
        );
        assert_eq!(
            agents_line(&cluster, None),
            "7 online in the cluster (on all nodes), 9 paired"
        );
        assert_eq!(
            agents_line(&status("embedded (sled)"), Some(7)),
            "7 online, 9 paired"
        );
    }
}
