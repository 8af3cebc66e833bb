//! The `ct-agent` binary: arguments, logging, signals; everything else is in the library.

use std::io::{IsTerminal, Read};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use ct_agent::config::ENV_CONFIG_DIR;
use ct_protocol::pairing::PairingToken;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(
    name = "ct-agent",
    version,
    about = "Drive Claude Code on this machine from Discord"
)]
struct Cli {
    /// Config directory [default: $XDG_CONFIG_HOME/codetogether or ~/.config/codetogether]
    #[arg(long, global = true, env = ENV_CONFIG_DIR, value_name = "DIR")]
    config_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Pair this machine with your Discord account, using a token from /register
    Pair {
        /// The pairing token (`ctpair1_...`), or `-` to read it from standard input
        token: String,
        /// The name this agent is listed under [default: the host name]
        #[arg(long)]
        name: Option<String>,
        /// Replace an existing pairing
        #[arg(long)]
        force: bool,
    },
    /// Keep this agent connected to the relay and run the tasks it sends (until stopped)
    Run {
        /// Seconds a tool approval waits for an answer from Discord before it is denied
        #[arg(
            long,
            env = "CT_AGENT_APPROVAL_TIMEOUT",
            default_value_t = 600,
            value_name = "SECS"
        )]
        approval_timeout: u64,
        /// Seconds a finished task's Claude Code stays up for a follow-up before it exits (later follow-ups
        /// resume the session from disk)
        #[arg(
            long,
            env = "CT_AGENT_IDLE_TIMEOUT",
            default_value_t = 600,
            value_name = "SECS"
        )]
        idle_timeout: u64,
        /// Days a task's git worktree is kept after its last task ended before the agent removes it (its
        /// branch stays); never while a task uses it
        #[arg(
            long,
            env = "CT_AGENT_WORKTREE_RETENTION_DAYS",
            default_value_t = 7,
            value_name = "DAYS"
        )]
        worktree_retention_days: u64,
        /// The `claude` to run [default: found on PATH or in the usual install places]
        #[arg(long, env = "CT_AGENT_CLAUDE_BIN", value_name = "PATH")]
        claude_bin: Option<PathBuf>,
        /// Let "allow for this session" apply Claude Code's permission suggestions, which can write
        /// .claude/settings*.json into your projects (off: approvals never edit files)
        #[arg(long, env = "CT_AGENT_ALLOW_SETTINGS_WRITES")]
        allow_settings_writes: bool,
        /// The Anthropic API key the agent adds to shared tasks' requests, outside their sandbox [default:
        /// ANTHROPIC_API_KEY]; with neither (a `claude login` only), shared tasks are refused
        #[arg(
            long,
            env = "CT_AGENT_SHARED_API_KEY",
            hide_env_values = true,
            value_name = "KEY"
        )]
        shared_api_key: Option<String>,
        #[command(flatten)]
        pool: PoolArgs,
    },
    /// Whether people you share this agent with (/share in Discord) may run tasks here; off by default
    Sharing {
        #[command(subcommand)]
        command: Option<SharingCommand>,
    },
    /// Show the pairing and whether the agent is connected
    Status {
        /// Machine-readable output
        #[arg(long)]
        json: bool,
    },
    /// Name the folders tasks may run in: add, list or remove projects
    Project {
        #[command(subcommand)]
        command: ProjectCommand,
    },
    /// Who runs inside the bubblewrap sandbox (Linux): shared tasks always, your own if you choose
    Sandbox {
        #[command(subcommand)]
        command: Option<SandboxCommand>,
    },
    /// Run the agent as a service that survives reboots and log-outs (systemd, launchd, WSL)
    Service {
        #[command(subcommand)]
        command: ServiceCommand,
    },
    /// Check Claude Code, the relay, the key, the clock, the allowed folders and the service
    Doctor {
        /// Machine-readable output
        #[arg(long)]
        json: bool,
    },
    /// Inside a shared task's sandbox: forward 127.0.0.1:PORT to the agent's API socket while COMMAND runs
    #[command(hide = true)]
    SandboxForward {
        #[arg(long)]
        port: u16,
        #[arg(long)]
        socket: PathBuf,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
}

/// `ct-agent run --pool`: a worker of a pool, serving many users each in a workspace of their own.
#[derive(Debug, clap::Args)]
struct PoolArgs {
    /// Run as a pool worker (paired with a token from `ct-relay admin pool-code`): every task runs sandboxed
    /// in its user's own workspace, with resource limits and a budget per user
    #[arg(long, env = "CT_AGENT_POOL")]
    pool: bool,
    /// Where the users' workspaces live (`DIR/users/<discord id>/<project>`)
    #[arg(
        long,
        env = "CT_AGENT_WORKSPACES",
        default_value = "/data",
        value_name = "DIR"
    )]
    workspaces: PathBuf,
    /// What each user may spend, unless `ct-agent sharing budget` set their own: `5usd/day`,
    /// `200000tokens/month`, `20usd` (in total) [default: no limit beyond the key's own]
    #[arg(
        long,
        env = "CT_AGENT_BUDGET_PER_USER",
        value_name = "AMOUNT[/day|/month]"
    )]
    budget_per_user: Option<String>,
    /// Address space of each process of a task, in MiB (Claude Code itself reserves about 2.5 GiB: keep
    /// this at 3072 or more)
    #[arg(
        long,
        env = "CT_AGENT_TASK_MEMORY_MIB",
        default_value_t = 4096,
        value_name = "MIB"
    )]
    task_memory_mib: u64,
    /// CPU seconds of each process of a task
    #[arg(
        long,
        env = "CT_AGENT_TASK_CPU_SECS",
        default_value_t = 3600,
        value_name = "SECS"
    )]
    task_cpu_secs: u64,
    /// Processes (RLIMIT_NPROC, counted per uid: shared by all of this worker's tasks)
    #[arg(
        long,
        env = "CT_AGENT_TASK_PROCESSES",
        default_value_t = 512,
        value_name = "N"
    )]
    task_processes: u64,
    /// Largest a user's workspace may grow before their tasks and new projects are refused, in MiB (also the
    /// largest file a task may write)
    #[arg(
        long,
        env = "CT_AGENT_WORKSPACE_QUOTA_MIB",
        default_value_t = 10240,
        value_name = "MIB"
    )]
    workspace_quota_mib: u64,
    /// Tests only: URL schemes a project may be cloned from, `:`-separated [default: https:ssh]. `file` lets
    /// tests clone a local repository; never on a real worker (it would clone any repository on its disk)
    #[arg(long, env = "CT_AGENT_POOL_GIT_PROTOCOLS", hide = true)]
    pool_git_protocols: Option<String>,
}

impl PoolArgs {
    /// The pool's settings, checked: a worker that could not isolate, limit or pay for its tasks refuses to
    /// start rather than refusing every task.
    fn config(
        self,
        config_dir: &std::path::Path,
        api_key: bool,
    ) -> anyhow::Result<Option<ct_agent::pool::PoolConfig>> {
        if !self.pool {
            return Ok(None);
        }
        let mib = |m: u64| m.saturating_mul(1024 * 1024);
        let mut pool = ct_agent::pool::PoolConfig {
            workspaces: self.workspaces,
            budget_per_user: self
                .budget_per_user
                .as_deref()
                .map(ct_agent::meter::Budget::parse)
                .transpose()
                .map_err(anyhow::Error::msg)?,
            limits: ct_agent::pool::Limits {
                memory_bytes: mib(self.task_memory_mib),
                cpu_secs: self.task_cpu_secs,
                processes: self.task_processes,
                file_bytes: mib(self.workspace_quota_mib),
            },
            quota_bytes: mib(self.workspace_quota_mib),
            ..Default::default()
        };
        if let Some(protocols) = self.pool_git_protocols {
            tracing::warn!(%protocols, "git protocols for project clones widened (tests only)");
            pool.git_protocols = protocols.split(':').map(str::to_owned).collect();
        }
        pool.prepare().map_err(anyhow::Error::msg)?;
        if let Err(e) = ct_agent::sandbox::detect() {
            let why = e.map_or_else(
                || "bubblewrap is not installed".to_owned(),
                |e| e.to_string(),
            );
            anyhow::bail!(
                "a pool worker runs every task in a bubblewrap sandbox, and it cannot here: {why}"
            );
        }
        pool.limits.command().map_err(anyhow::Error::msg)?;
        if !api_key {
            anyhow::bail!(
                "a pool worker needs the operator's Anthropic API key, which its metering proxy adds outside \
                 the sandboxes: set CT_AGENT_SHARED_API_KEY (or ANTHROPIC_API_KEY)"
            );
        }
        let config_dir = std::fs::canonicalize(config_dir).with_context(|| {
            format!(
                "{} does not exist: pair this worker first (`ct-agent pair <token from ct-relay admin pool-code>`)",
                config_dir.display()
            )
        })?;
        if let Some(shared) = ct_agent::sandbox::seen_by_every_sandbox(&config_dir) {
            anyhow::bail!(
                "the agent's config folder {} is inside {shared}, which every task's sandbox sees: move it \
                 (`--config-dir`)",
                config_dir.display()
            );
        }
        Ok(Some(pool))
    }
}

#[derive(Debug, Subcommand)]
enum ProjectCommand {
    /// Name a folder; the folder becomes allowed for tasks
    Add {
        /// Short name used in /task (letters, digits, `.`, `_`, `-`)
        name: String,
        /// The folder (`~` and, inside WSL, Windows paths like C:\src\app are understood)
        path: String,
    },
    /// The projects and every allowed folder
    List {
        /// Machine-readable output
        #[arg(long)]
        json: bool,
    },
    /// Forget a project name
    Remove { name: String },
    /// Change a project's setting: `isolation=worktree` (each task in a git worktree and branch of its
    /// own) or `isolation=shared` (tasks edit the project's folder itself, even side by side)
    Set {
        name: String,
        /// KEY=VALUE
        setting: String,
    },
}

#[derive(Debug, Subcommand)]
enum SharingCommand {
    /// Show the setting (the default when no subcommand is given)
    Show,
    /// Only your own tasks run here
    Off,
    /// Anyone you shared the agent with in Discord
    All,
    /// Only these Discord user ids (and only while you share with them in Discord)
    Only {
        #[arg(required = true, value_name = "DISCORD_USER_ID")]
        users: Vec<String>,
    },
    /// Limit what one person's shared tasks may spend, in total (`5usd`, `200000tokens`, `200k`) or per UTC
    /// day or month (`5usd/day`, `200k/month`), or `none`; on a pool worker, overrides --budget-per-user
    Budget {
        #[arg(value_name = "DISCORD_USER_ID")]
        user: String,
        #[arg(value_name = "AMOUNT")]
        amount: String,
    },
}

#[derive(Debug, Subcommand)]
enum SandboxCommand {
    /// Show the settings and whether bubblewrap works here (the default)
    Show,
    /// Sandbox your own tasks too (`on`) or not (`off`, the default)
    Owner {
        #[arg(value_parser = ["on", "off"])]
        setting: String,
    },
    /// Where bubblewrap is missing: refuse shared tasks (`required`, the default) or run them unsandboxed
    Grantees {
        #[arg(value_parser = ["required", "unsandboxed"])]
        setting: String,
    },
    /// Shared tasks reach only the Claude API, through the agent (`isolated`, the default), or the network
    /// like any program of yours (`open`); with ids, for those people only
    Network {
        #[arg(value_parser = ["isolated", "open"])]
        setting: String,
        #[arg(value_name = "DISCORD_USER_ID")]
        users: Vec<String>,
    },
    /// Let your own tasks run in bypassPermissions mode (`on`), or refuse that mode from the relay (`off`, the
    /// default); shared tasks never get it
    Bypass {
        #[arg(value_parser = ["on", "off"])]
        setting: String,
    },
}

#[derive(Debug, Subcommand)]
enum ServiceCommand {
    /// Install and start the service (re-running it updates the service)
    Install {
        #[command(flatten)]
        scope: ScopeArgs,
        /// Which user a system unit runs as [default: $SUDO_USER, else you]
        #[arg(long, value_name = "USER")]
        run_as: Option<String>,
        /// A folder Claude Code may work in (repeatable), added to ALLOWED_PROJECT_DIRS
        #[arg(long = "allow-dir", value_name = "DIR")]
        allow_dirs: Vec<PathBuf>,
        /// Another path the service may write, e.g. ~/.cargo or ~/.npm (repeatable; systemd)
        #[arg(long = "rw-path", value_name = "PATH")]
        rw_paths: Vec<PathBuf>,
        /// Let the service write anywhere in your home directory (systemd)
        #[arg(long)]
        writable_home: bool,
        /// Print every file and command instead of changing anything
        #[arg(long)]
        dry_run: bool,
    },
    /// Stop the service and remove everything `install` created
    Uninstall {
        #[command(flatten)]
        scope: ScopeArgs,
        /// Print every command and file instead of changing anything
        #[arg(long)]
        dry_run: bool,
    },
    /// What the service manager says about the agent
    Status {
        #[command(flatten)]
        scope: ScopeArgs,
    },
    /// Show the service's log
    Logs {
        #[command(flatten)]
        scope: ScopeArgs,
        /// How many lines
        #[arg(short = 'n', long, default_value_t = 100)]
        lines: u32,
        /// Keep following the log
        #[arg(short, long)]
        follow: bool,
    },
}

#[derive(Debug, clap::Args)]
struct ScopeArgs {
    /// A systemd system unit instead of a user unit (needs sudo; the agent still runs as a user)
    #[arg(long)]
    system: bool,
    /// Inside WSL: a Windows logon task even when systemd runs in the distribution
    #[arg(long)]
    windows_task: bool,
    /// Plan for another platform (with --dry-run: see what would be installed there)
    #[arg(long, value_enum, hide = true)]
    target: Option<ct_agent::service::Os>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    // One thread: the agent waits on a socket and a few child processes, so more threads would only add
    // wake-ups (each keep-alive handed from thread to thread) and, on a many-core laptop, idle stacks.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    if let Command::SandboxForward {
        port,
        socket,
        command,
    } = cli.command
    {
        return ct_agent::sandbox::forward::run(port, socket, command).await;
    }
    if let Command::Service { command } = cli.command {
        // The service's config dir is resolved for the user it runs as, so it gets the raw choice.
        return service(cli.config_dir, command);
    }
    let config_dir = ct_agent::resolve_config_dir(cli.config_dir)?;
    match cli.command {
        Command::Pair { token, name, force } => pair(&config_dir, &token, name, force).await,
        Command::Run {
            approval_timeout,
            idle_timeout,
            worktree_retention_days,
            claude_bin,
            allow_settings_writes,
            shared_api_key,
            pool,
        } => {
            let api_key = shared_api_key.as_deref().is_some_and(|k| !k.is_empty())
                || std::env::var_os("ANTHROPIC_API_KEY").is_some_and(|k| !k.is_empty());
            let pool = pool.config(&config_dir, api_key)?;
            let mut opts = ct_agent::RunOptions::new(config_dir);
            opts.tasks.pool = pool;
            opts.tasks.approval_timeout = std::time::Duration::from_secs(approval_timeout);
            opts.tasks.idle_timeout = std::time::Duration::from_secs(idle_timeout);
            opts.tasks.worktree_retention =
                std::time::Duration::from_secs(worktree_retention_days.saturating_mul(86_400));
            opts.tasks.claude_bin = claude_bin;
            opts.tasks.allow_settings_writes = allow_settings_writes;
            // This very binary is what runs inside a shared task's sandbox as its way to the API.
            opts.tasks.forwarder = std::env::current_exe().ok();
            opts.tasks.shared_api_key = shared_api_key
                .filter(|k| !k.is_empty())
                .map(ct_agent::tasks::SharedKey);
            run(opts).await
        }
        Command::Sandbox { command } => {
            sandbox(&config_dir, command.unwrap_or(SandboxCommand::Show))
        }
        Command::Sharing { command } => {
            sharing(&config_dir, command.unwrap_or(SharingCommand::Show))
        }
        Command::Status { json } => status(&config_dir, json),
        Command::Doctor { json } => doctor(config_dir, json).await,
        Command::Project { command } => project(&config_dir, command),
        Command::Service { .. } | Command::SandboxForward { .. } => unreachable!("handled above"),
    }
}

fn project(config_dir: &std::path::Path, command: ProjectCommand) -> anyhow::Result<ExitCode> {
    use ct_agent::projects::{Origin, Policy};
    let dir = ct_agent::ConfigDir::open(config_dir)?;
    let mut policy = Policy::load(&dir)?;
    match command {
        ProjectCommand::Add { name, path } => {
            let p = policy.add(&name, &path, Origin::Local)?;
            println!(
                "Project {} is {} (tasks may now run there).",
                p.name,
                p.path.display()
            );
        }
        ProjectCommand::Set { name, setting } => {
            let value = setting.strip_prefix("isolation=").ok_or_else(|| {
                anyhow::anyhow!(
                    "the setting is `isolation=worktree` or `isolation=shared`, not `{setting}`"
                )
            })?;
            let isolation: ct_protocol::task::Isolation =
                value.parse().map_err(|e: String| anyhow::anyhow!(e))?;
            policy.set_isolation(&name, isolation)?;
            println!(
                "Tasks in project {name} now run with isolation={value} unless they ask otherwise."
            );
        }
        ProjectCommand::Remove { name } => {
            let p = policy.remove(&name)?;
            println!("Removed project {} ({}).", p.name, p.path.display());
        }
        ProjectCommand::List { json } => {
            let (projects, allowed) = (policy.list(), policy.allowed_dirs());
            if json {
                let out = serde_json::json!({ "projects": projects, "allowed_dirs": allowed });
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else if allowed.is_empty() {
                println!(
                    "No folder is allowed yet, so no task can run here. Allow one with \
                     `ct-agent project add <name> <folder>` or ALLOWED_PROJECT_DIRS=/path/one,/path/two."
                );
            } else {
                for p in &projects {
                    println!("{:<20} {}", p.name, p.path.display());
                }
                println!("Allowed folders:");
                for d in &allowed {
                    println!("  {}", d.display());
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn sharing(config_dir: &std::path::Path, command: SharingCommand) -> anyhow::Result<ExitCode> {
    use ct_agent::projects::{Policy, SharePolicy};
    let dir = ct_agent::ConfigDir::open(config_dir)?;
    let mut policy = Policy::load(&dir)?;
    let new = match command {
        SharingCommand::Budget { user, amount } => {
            if user.is_empty() || !user.bytes().all(|b| b.is_ascii_digit()) {
                anyhow::bail!("`{user}` is not a Discord user id (digits only)");
            }
            let budget = match amount.trim() {
                "none" | "off" => None,
                other => Some(ct_agent::meter::Budget::parse(other).map_err(anyhow::Error::msg)?),
            };
            ct_agent::meter::set_budget(&dir, &user, budget)?;
            None
        }
        SharingCommand::Show => None,
        SharingCommand::Off => Some(SharePolicy::Off),
        SharingCommand::All => Some(SharePolicy::All),
        SharingCommand::Only { users } => Some(SharePolicy::Listed { users }),
    };
    if let Some(new) = new {
        policy.set_sharing(new)?;
    }
    match policy.sharing() {
        SharePolicy::Off => println!(
            "Sharing is off: only your own tasks run on this agent, whatever /share says in Discord."
        ),
        SharePolicy::All => println!(
            "Sharing is on: anyone you share this agent with in Discord (/share add) may run tasks here. \
             Their approvals come to you unless you share at the trusted level."
        ),
        SharePolicy::Listed { users } => println!(
            "Sharing is limited to {}: and only while you also share with them in Discord (/share add).",
            users.join(", ")
        ),
    }
    let budgets = ct_agent::meter::budgets(&dir)?;
    let meter = ct_agent::meter::Meter::load(&dir)?;
    let now = ct_agent::meter::now_secs();
    for (user, budget) in &budgets {
        let period = match budget.period {
            ct_agent::meter::Period::Total => "so far",
            ct_agent::meter::Period::Day => "today (UTC)",
            ct_agent::meter::Period::Month => "this month (UTC)",
        };
        println!(
            "Budget for {user}: {budget}; used {period}: {}.",
            meter.record(user).in_period(budget.period, now)
        );
    }
    if budgets.is_empty() {
        println!(
            "No budgets: shared tasks may spend up to the key's own limit (`ct-agent sharing budget <id> 5usd`)."
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn sandbox(config_dir: &std::path::Path, command: SandboxCommand) -> anyhow::Result<ExitCode> {
    use ct_agent::projects::Policy;
    let dir = ct_agent::ConfigDir::open(config_dir)?;
    let mut policy = Policy::load(&dir)?;
    let mut settings = policy.sandbox().clone();
    match command {
        SandboxCommand::Show => {}
        SandboxCommand::Owner { setting } => settings.owner = setting == "on",
        SandboxCommand::Grantees { setting } => {
            settings.unsandboxed_grantees = setting == "unsandboxed"
        }
        SandboxCommand::Bypass { setting } => settings.bypass_permissions = setting == "on",
        SandboxCommand::Network { setting, users } => {
            if let Some(bad) = users
                .iter()
                .find(|u| u.is_empty() || !u.bytes().all(|b| b.is_ascii_digit()))
            {
                anyhow::bail!("`{bad}` is not a Discord user id (digits only)");
            }
            let open = setting == "open";
            if users.is_empty() {
                settings.open_network = open;
                if !open {
                    settings.open_network_for.clear();
                }
            } else {
                settings.open_network_for.retain(|u| !users.contains(u));
                if open {
                    settings.open_network_for.extend(users);
                }
            }
        }
    }
    policy.set_sandbox(settings.clone())?;
    match ct_agent::sandbox::detect() {
        Ok(b) => println!("bubblewrap: {} (works here)", b.path.display()),
        Err(Some(e)) => println!("bubblewrap: unusable: {e}"),
        Err(None) => println!("bubblewrap: not installed (sudo apt install bubblewrap)"),
    }
    println!(
        "Your own tasks: {}",
        if settings.owner {
            "sandboxed"
        } else {
            "not sandboxed"
        }
    );
    println!(
        "Shared tasks: sandboxed{}",
        if settings.unsandboxed_grantees {
            "; run without a sandbox where bubblewrap is unavailable"
        } else {
            "; refused where bubblewrap is unavailable"
        }
    );
    println!(
        "Shared tasks' network: {}",
        if settings.open_network {
            "open (they can reach the internet and services on this machine's loopback)".to_owned()
        } else if settings.open_network_for.is_empty() {
            "none but the Claude API, through the agent".to_owned()
        } else {
            format!(
                "none but the Claude API, through the agent; open for {}",
                settings.open_network_for.join(", ")
            )
        }
    );
    println!(
        "bypassPermissions: {}",
        if settings.bypass_permissions {
            "allowed for your own tasks"
        } else {
            "refused (approvals always apply)"
        }
    );
    Ok(ExitCode::SUCCESS)
}

fn service(config_dir: Option<PathBuf>, command: ServiceCommand) -> anyhow::Result<ExitCode> {
    use ct_agent::service::{self, Options};
    let (scope, mut opts) = match &command {
        ServiceCommand::Install {
            scope,
            run_as,
            allow_dirs,
            rw_paths,
            writable_home,
            ..
        } => (
            scope,
            Options {
                run_as: run_as.clone(),
                allow_dirs: allow_dirs.clone(),
                rw_paths: rw_paths.clone(),
                writable_home: *writable_home,
                ..Options::default()
            },
        ),
        ServiceCommand::Uninstall { scope, .. }
        | ServiceCommand::Status { scope }
        | ServiceCommand::Logs { scope, .. } => (scope, Options::default()),
    };
    opts.system = scope.system;
    opts.windows_task = scope.windows_task;
    opts.config_dir = config_dir;
    let host = service::Host::probe(scope.target).context("cannot read this machine's setup")?;
    let ctx = service::Context::resolve(&host, &opts, &service::lookup_user)?;
    let mut stdout = std::io::stdout();
    match command {
        ServiceCommand::Install { dry_run, .. } | ServiceCommand::Uninstall { dry_run, .. } => {
            let install = matches!(command, ServiceCommand::Install { .. });
            let plan = if install {
                service::install_plan(&ctx, &host)?
            } else {
                service::uninstall_plan(&ctx)?
            };
            if dry_run {
                println!(
                    "Dry run: {} the agent as a {} (nothing is changed). Steps:\n",
                    if install { "install" } else { "uninstall" },
                    ctx.manager
                );
                print!("{}", plan.describe());
            } else {
                plan.execute(&mut stdout, service::advice(&ctx, &host).as_deref())?;
                if install {
                    println!("\nInstalled the agent as a {}.", ctx.manager);
                } else {
                    println!("\nUninstalled the agent's {}.", ctx.manager);
                }
                for note in &plan.notes {
                    println!("{note}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        ServiceCommand::Status { .. } => {
            let status = service::status(&ctx);
            print!("{}", status.render());
            Ok(if status.installed && status.running {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(3)
            })
        }
        ServiceCommand::Logs { lines, follow, .. } => {
            let argv = service::logs_command(&ctx, lines, follow);
            let status = std::process::Command::new(&argv[0])
                .args(&argv[1..])
                .status()
                .with_context(|| format!("cannot run {}", argv[0]))?;
            Ok(if status.success() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

async fn doctor(config_dir: PathBuf, json: bool) -> anyhow::Result<ExitCode> {
    use ct_agent::service;
    let mut opts = ct_agent::doctor::DoctorOptions::from_env(config_dir);
    // The service check is best effort: a machine without a service manager still gets every other check.
    opts.service = service::Host::probe(None).ok().and_then(|host| {
        service::Context::resolve(&host, &service::Options::default(), &service::lookup_user).ok()
    });
    let report = ct_agent::doctor::run(&opts).await;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.render());
    }
    Ok(if report.worst() == ct_agent::doctor::Level::Fail {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

async fn pair(
    config_dir: &std::path::Path,
    token: &str,
    name: Option<String>,
    force: bool,
) -> anyhow::Result<ExitCode> {
    let token = if token == "-" {
        let mut text = String::new();
        std::io::stdin()
            .take(ct_protocol::pairing::MAX_TOKEN_LEN as u64 + 2)
            .read_to_string(&mut text)
            .context("cannot read the token from standard input")?;
        text
    } else {
        token.to_string()
    };
    let token: PairingToken = token.parse()?;
    let outcome = ct_agent::pair(config_dir, &token, name, force).await?;
    let p = &outcome.pairing;
    println!(
        "Paired with relay {} over {}.",
        outcome.relay_addr, outcome.transport
    );
    println!(
        "This agent is \"{}\", owned by {}.",
        p.agent_name,
        p.owner_label()
    );
    println!("Agent key:  {}", p.agent_fingerprint);
    println!("Relay key:  {}", p.relay_fingerprint);
    println!();
    println!("Next: run `ct-agent run` to keep it connected.");
    Ok(ExitCode::SUCCESS)
}

async fn run(opts: ct_agent::RunOptions) -> anyhow::Result<ExitCode> {
    let shutdown = CancellationToken::new();
    let signals = tokio::spawn(cancel_on_signal(shutdown.clone()));
    let (status, _) = tokio::sync::watch::channel(ct_agent::LinkStatus::Connecting);
    let result = ct_agent::run(opts, shutdown, status).await;
    signals.abort();
    match result {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) => {
            eprintln!("error: {e}");
            // Under launchd a permanent error exits 0 so KeepAlive does not restart it (see service).
            let code = if e.exit_code() == ct_agent::EXIT_PERMANENT {
                ct_agent::service::permanent_exit_code()
            } else {
                e.exit_code()
            };
            Ok(ExitCode::from(code))
        }
    }
}

/// Cancels `shutdown` on SIGTERM (service managers) or SIGINT (ctrl-c).
async fn cancel_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM; only ctrl-c stops the agent");
            let _ = tokio::signal::ctrl_c().await;
            shutdown.cancel();
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupt: shutting down"),
    }
    shutdown.cancel();
}

fn status(config_dir: &std::path::Path, json: bool) -> anyhow::Result<ExitCode> {
    let report = ct_agent::status::gather(config_dir)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!(
            "{}",
            ct_agent::status::render(&report, ct_agent::config::unix_now())
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `LOG_LEVEL` (a level, or per-target levels such as `info,ct_agent=debug`; default `info`) and
/// `LOG_FORMAT=json`. Logs go to stderr so `status --json` output stays clean.
///
/// The filter is `Targets`, not `EnvFilter`: the agent idles on laptops all day, and `EnvFilter`'s regular
/// expressions (for span-field directives nobody sets on an agent) add about a megabyte of code to every
/// agent's resident memory.
fn init_tracing() {
    use tracing_subscriber::filter::Targets;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;

    let filter = std::env::var("LOG_LEVEL").unwrap_or_else(|_| "info".into());
    let filter = filter.parse::<Targets>().unwrap_or_else(|e| {
        eprintln!("warning: LOG_LEVEL={filter:?} is not a valid filter ({e}); using info");
        Targets::new().with_default(tracing::Level::INFO)
    });
    let builder = tracing_subscriber::fmt().with_writer(std::io::stderr);
    if std::env::var("LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json")) {
        builder.json().finish().with(filter).init();
    } else {
        builder
            .with_ansi(std::io::stderr().is_terminal())
            .finish()
            .with(filter)
            .init();
    }
}
