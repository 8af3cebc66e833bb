//! The real agent at rest: the release `ct-agent` binary, paired and connected to a relay process, doing
//! nothing but keep-alives. Its resident memory, the CPU time it uses over a quiet window (from
//! `/proc/PID/stat`), how often its threads wake, and the size of the release binaries.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use ct_protocol::Transport;
use tokio::time::Instant;

use crate::procfs::{self, Stats};
use crate::relay::RelayProcess;
use crate::scenario::Tools;

/// What the run measured.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub transport: Option<Transport>,
    /// At the start of the quiet window, and at its end.
    pub start: Stats,
    pub end: Stats,
    /// After the relay was restarted (SIGTERM, started again) and the agent reconnected.
    pub reconnected: Stats,
    pub window: Duration,
    /// Release binaries and their sizes in bytes.
    pub sizes: Vec<(String, u64)>,
}

impl Outcome {
    /// CPU time used during the window, in milliseconds.
    pub fn cpu_ms(&self) -> f64 {
        self.end.cpu_ms() - self.start.cpu_ms()
    }

    pub fn wakeups_per_s(&self) -> f64 {
        (self.end.voluntary_switches - self.start.voluntary_switches) as f64
            / self.window.as_secs_f64()
    }
}

/// Pairs and runs the agent binary against a fresh relay process, then watches it for `window`.
pub async fn run(tools: &Tools, window: Duration) -> Result<Outcome> {
    let dir = tools.work_dir.join("footprint");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let mut relay = RelayProcess::start(&tools.relay, &dir.join("relay")).await?;
    let token = relay.pair_code("200000000000000001").await?;
    let config = dir.join("agent");
    let paired = tools
        .agent
        .command()
        .arg("--config-dir")
        .arg(&config)
        .arg("pair")
        .arg(token.to_string())
        .arg("--name")
        .arg("footprint")
        .stdin(Stdio::null())
        .output()
        .await
        .context("running the agent's pair command")?;
    ensure!(
        paired.status.success(),
        "pairing the agent failed: {}",
        String::from_utf8_lossy(&paired.stderr)
    );
    let log = std::fs::File::create(dir.join("agent.log"))?;
    let mut agent = tools
        .agent
        .command()
        .arg("--config-dir")
        .arg(&config)
        .arg("run")
        // As installed by default: no folder allowed, so no task could run; the link is all there is.
        .env("ALLOWED_PROJECT_DIRS", "")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .context("starting the agent")?;
    let pid = agent.id().context("the agent exited at once")?;

    let transport = online(&relay, &dir).await?;
    // Start-up work (the handshake, the first reports) is not idling.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let start = procfs::stats(pid)?;
    tokio::time::sleep(window).await;
    let end = procfs::stats(pid)?;
    // A reconnect builds a new QUIC endpoint and TLS session: memory should come back to the same level.
    relay.stop().await?;
    relay.restart().await?;
    online(&relay, &dir).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let reconnected = procfs::stats(pid)?;

    procfs::signal(pid, "TERM")?;
    let _ = tokio::time::timeout(Duration::from_secs(10), agent.wait()).await;
    relay.stop().await?;
    let sizes = tools
        .sizes
        .iter()
        .filter_map(|(name, path)| Some((name.clone(), std::fs::metadata(path).ok()?.len())))
        .collect();
    Ok(Outcome {
        transport,
        start,
        end,
        reconnected,
        window,
        sizes,
    })
}

/// Waits until the relay lists the agent online; returns its transport.
async fn online(relay: &RelayProcess, dir: &std::path::Path) -> Result<Option<Transport>> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(a) = relay.agents().await?.into_iter().find(|a| a.online) {
            return Ok(a.transport);
        }
        if Instant::now() > deadline {
            bail!(
                "the agent did not connect within 30 s; see {}",
                dir.join("agent.log").display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
