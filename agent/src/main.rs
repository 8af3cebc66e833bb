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
    /// Keep this agent connected to the relay (until stopped)
    Run,
    /// Show the pairing and whether the agent is connected
    Status {
        /// Machine-readable output
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
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
    let config_dir = ct_agent::resolve_config_dir(cli.config_dir)?;
    match cli.command {
        Command::Pair { token, name, force } => pair(&config_dir, &token, name, force).await,
        Command::Run => run(config_dir).await,
        Command::Status { json } => status(&config_dir, json),
    }
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

async fn run(config_dir: PathBuf) -> anyhow::Result<ExitCode> {
    let shutdown = CancellationToken::new();
    let signals = tokio::spawn(cancel_on_signal(shutdown.clone()));
    let (status, _) = tokio::sync::watch::channel(ct_agent::LinkStatus::Connecting);
    let result = ct_agent::run(ct_agent::RunOptions::new(config_dir), shutdown, status).await;
    signals.abort();
    match result {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) => {
            eprintln!("error: {e}");
            Ok(ExitCode::from(e.exit_code()))
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

/// `LOG_LEVEL` (an env-filter directive, default `info`) and `LOG_FORMAT=json`. Logs go to stderr so
/// `status --json` output stays clean.
fn init_tracing() {
    let filter = std::env::var("LOG_LEVEL").unwrap_or_else(|_| "info".into());
    let filter = tracing_subscriber::EnvFilter::try_new(&filter).unwrap_or_else(|e| {
        eprintln!("warning: LOG_LEVEL={filter:?} is not a valid filter ({e}); using info");
        tracing_subscriber::EnvFilter::new("info")
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::env::var("LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json")) {
        builder.json().init();
    } else {
        builder.with_ansi(std::io::stderr().is_terminal()).init();
    }
}
