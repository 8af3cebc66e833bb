//! The `ct-loadgen` binary: arguments and logging; the scenarios live in the library.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use ct_loadgen::relay::Program;
use ct_loadgen::scenario::{Plan, Tools};
use ct_loadgen::{bench, procfs};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(
    name = "ct-loadgen",
    version,
    about = "Load generator and benchmarks for the CodeTogether relay and agent"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the benchmark scenarios and print the table (scripts/bench runs this with release binaries)
    Bench(BenchArgs),
    /// Run a relay from this binary, with ct-relay's arguments (lets tests use a relay process without
    /// building ct-relay)
    #[command(hide = true)]
    Relay {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0..)]
        args: Vec<String>,
    },
    /// `pair` and `run` as ct-agent has them, from this binary (for the smoke test)
    #[command(hide = true)]
    Agent(AgentArgs),
}

#[derive(Debug, Args)]
struct BenchArgs {
    /// A smaller run (a tenth of the sizes or less) that takes a few minutes
    #[arg(long)]
    quick: bool,
    /// The smoke test's sizes: every scenario happens, nothing meaningful is measured
    #[arg(long, conflicts_with = "quick")]
    tiny: bool,
    /// Only these scenarios (comma-separated): footprint, dispatch, events, history, idle, churn, restart,
    /// rathole, cluster, cluster-events (the cluster's events figures alone)
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// The ct-relay binary [default: next to this one]
    #[arg(long)]
    relay_bin: Option<PathBuf>,
    /// The ct-agent binary [default: next to this one]
    #[arg(long)]
    agent_bin: Option<PathBuf>,
    /// The rathole binary; its scenario is skipped without one
    #[arg(long)]
    rathole_bin: Option<PathBuf>,
    /// Where relay data, logs and configs go (wiped per scenario)
    #[arg(long, default_value = "target/bench")]
    work_dir: PathBuf,
    /// Agents in the idle scenario [default: 10,000; 1,000 with --quick]
    #[arg(long)]
    idle_agents: Option<usize>,
    /// Reconnect cycles in the churn scenario, to see whether memory levels off [default: 10,000; 1,000 with
    /// --quick]
    #[arg(long)]
    churn_cycles: Option<usize>,
    /// Tasks streaming output while the relay is killed in the restart scenario, 0 for none: sets the load
    /// the agents' return competes with [default: 200; 40 with --quick]
    #[arg(long)]
    restart_tasks: Option<usize>,
    /// Agents held across the cluster's three nodes, and by the single node beside them [default: 10,000;
    /// 1,000 with --quick]
    #[arg(long)]
    cluster_agents: Option<usize>,
    /// A round trip in milliseconds added between the cluster's relays and PostgreSQL, as if it were on
    /// another host (a delaying proxy on loopback) [default: 0]
    #[arg(long)]
    pg_rtt_ms: Option<f64>,
    /// Share of QUIC agents where transports are mixed
    #[arg(long, default_value_t = 0.5)]
    quic_share: f64,
}

#[derive(Debug, Args)]
struct AgentArgs {
    #[arg(long, global = true)]
    config_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: AgentCommand,
}

#[derive(Debug, Subcommand)]
enum AgentCommand {
    Pair {
        token: String,
        #[arg(long)]
        name: Option<String>,
    },
    Run,
}

fn main() -> ExitCode {
    fix_mmap_threshold();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Bench(args) => {
            init_tracing();
            runtime.block_on(run_bench(args))
        }
        Command::Relay { args } => {
            let cli = <ct_relay::cli::Cli as Parser>::parse_from(
                std::iter::once("ct-relay".to_string()).chain(args),
            );
            ct_relay::cli::init_tracing();
            runtime.block_on(ct_relay::cli::run(cli))
        }
        Command::Agent(args) => {
            init_tracing();
            runtime.block_on(agent(args))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Keeps glibc from moving its mmap threshold, which would cost the load generator gigabytes.
///
/// Every quinn endpoint (one per QUIC agent, as on separate machines) allocates a 2.9 MiB receive buffer with
/// `calloc`. Above the mmap threshold that is a fresh mapping, and only the pages packets land in become
/// resident. But glibc raises the threshold past any mapped chunk that is freed, so once the first endpoints
/// close (every pairing closes one) the next buffers come from the heap, where `calloc` zeroes them whole:
/// 1,000 QUIC agents cost this process 2 GB, and 10,000 of them were killed by the OOM killer. Setting the
/// threshold explicitly turns the adjustment off. It changes nothing in the relay or agent processes.
#[allow(unsafe_code)]
fn fix_mmap_threshold() {
    // SAFETY: mallopt only changes the allocator's tuning; it is called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("LOG_LEVEL")
        // An in-process relay warns about every link a scenario drops on purpose; its errors still show.
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,ct_relay=error"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

async fn run_bench(args: BenchArgs) -> anyhow::Result<()> {
    let mut plan = if args.tiny {
        Plan::tiny()
    } else if args.quick {
        Plan::quick()
    } else {
        Plan::full()
    };
    if let Some(n) = args.idle_agents {
        plan.idle_agents = n;
    }
    if let Some(n) = args.churn_cycles {
        plan.churn_cycles = n.max(1);
    }
    if let Some(n) = args.cluster_agents {
        plan.cluster_agents = n.max(1);
    }
    if let Some(ms) = args.pg_rtt_ms {
        plan.pg_rtt = std::time::Duration::from_secs_f64(ms.clamp(0.0, 1000.0) / 1000.0);
    }
    if let Some(n) = args.restart_tasks {
        plan.restart_tasks = n.min(plan.restart_agents);
    }
    plan.quic_share = args.quic_share.clamp(0.0, 1.0);
    let here = std::env::current_exe()?
        .parent()
        .context("this binary has no directory")?
        .to_path_buf();
    let relay = args.relay_bin.unwrap_or_else(|| here.join("ct-relay"));
    let agent = args.agent_bin.unwrap_or_else(|| here.join("ct-agent"));
    let tools = Tools {
        relay: Program::new(&relay),
        agent: Program::new(&agent),
        sizes: vec![("ct-agent".into(), agent), ("ct-relay".into(), relay)],
        rathole: args.rathole_bin,
        work_dir: args.work_dir,
    };
    let only: BTreeSet<String> = args.only.into_iter().collect();
    if let Some(unknown) = only
        .iter()
        .find(|s| !bench::SCENARIOS.contains(&s.as_str()))
    {
        anyhow::bail!(
            "no scenario {unknown:?}; the scenarios are {}",
            bench::SCENARIOS.join(", ")
        );
    }
    if let Some(limit) = procfs::open_files_limit() {
        let need = plan.idle_agents.max(plan.cluster_agents) as u64 + 1000;
        if limit < need {
            eprintln!(
                "ct-loadgen: warning: the open-file limit is {limit}, and {} agents need about {need}; \
                 raise it (`ulimit -n {need}`; scripts/bench does)",
                plan.idle_agents.max(plan.cluster_agents)
            );
        }
    }
    let out = bench::run(&plan, &tools, &only).await?;
    println!("Machine: {}", procfs::machine());
    println!("Source:  {}", source_version());
    println!(
        "Run:     ct-loadgen {}",
        std::env::args().skip(1).collect::<Vec<_>>().join(" ")
    );
    println!();
    print!("{}", bench::report(&out, &plan));
    Ok(())
}

/// The commit measured, and whether the tree had uncommitted changes (`git describe --always --dirty`).
fn source_version() -> String {
    std::process::Command::new("git")
        .args(["describe", "--always", "--dirty"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown (not a git checkout)".into())
}

/// Just enough of `ct-agent` to pair and run from this binary, through the agent library.
async fn agent(args: AgentArgs) -> anyhow::Result<()> {
    let dir = ct_agent::resolve_config_dir(args.config_dir)?;
    match args.command {
        AgentCommand::Pair { token, name } => {
            let token = token.parse()?;
            ct_agent::pair(&dir, &token, name, false).await?;
        }
        AgentCommand::Run => {
            let shutdown = CancellationToken::new();
            let on_signal = shutdown.clone();
            let signals = tokio::spawn(async move {
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
                term.recv().await;
                on_signal.cancel();
                anyhow::Ok(())
            });
            let (status, _) = tokio::sync::watch::channel(ct_agent::LinkStatus::Connecting);
            let result = ct_agent::run(ct_agent::RunOptions::new(dir), shutdown, status).await;
            signals.abort();
            result?;
        }
    }
    Ok(())
}
