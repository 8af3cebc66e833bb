//! rathole on the same machine in the same run: its idle client, its server's memory per thousand clients,
//! and TCP throughput through its tunnel on loopback, measured the way ours are.
//!
//! rathole has no single "client" object on the server: each service a client forwards has its own control
//! channel (one TCP connection, plus a pool of data channels the client opens ahead of visitors). A thousand
//! clients with one service each and ten clients with a hundred services each cost its server the same, so
//! the thousand control channels are spread over a few client processes rather than a thousand of them.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::process::{Child, Command};
use tokio::time::Instant;

use crate::procfs::{self, Stats};
use crate::tcp::{self, Sink};

/// What the run measured.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub version: String,
    /// A client forwarding one service, connected and idle.
    pub client_idle: Stats,
    /// The server before any client, and holding `services` control channels.
    pub server_base: Stats,
    pub server_loaded: Stats,
    pub services: usize,
    pub clients: usize,
    pub bytes: u64,
    /// Pushing `bytes` through the tunnel, and straight to the sink (the loopback ceiling).
    pub tunnel: Duration,
    pub direct: Duration,
}

impl Outcome {
    /// Server memory per 1,000 control channels, KiB.
    pub fn server_per_1000_kib(&self) -> f64 {
        (self.server_loaded.rss_kib as f64 - self.server_base.rss_kib as f64) * 1000.0
            / self.services.max(1) as f64
    }
}

/// Runs a rathole server, one single-service client, and `clients` more clients holding `services` services
/// between them.
pub async fn run(
    rathole: &Path,
    work_dir: &Path,
    services: usize,
    clients: usize,
    bytes: u64,
) -> Result<Outcome> {
    let dir = work_dir.join("rathole");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let version = Command::new(rathole)
        .arg("--version")
        .output()
        .await
        .map(|o| {
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            // `--version` prints a build report; the line that matters is "Build Version: 0.5.0".
            text.lines()
                .find_map(|l| l.trim().strip_prefix("Build Version:"))
                .map_or_else(|| text.trim().to_string(), |v| v.trim().to_string())
        })
        .unwrap_or_default();

    let sink = Sink::bind().await?;
    let direct = tcp::push(sink.addr, bytes).await?;

    // Service 0 belongs to the single-service client; 1..=services to the others.
    let ports = free_ports(services + 2)?;
    let (control, service_ports) = (ports[0], &ports[1..]);
    let mut server_toml =
        format!("[server]\nbind_addr = \"127.0.0.1:{control}\"\ndefault_token = \"bench\"\n\n");
    for (i, port) in service_ports.iter().enumerate() {
        server_toml += &format!("[server.services.s{i}]\nbind_addr = \"127.0.0.1:{port}\"\n\n");
    }
    let server_cfg = dir.join("server.toml");
    std::fs::write(&server_cfg, server_toml)?;
    let mut children = vec![spawn(
        rathole,
        "--server",
        &server_cfg,
        &dir.join("server.log"),
    )?];
    let server_pid = children[0].id().context("rathole server exited")?;
    wait_listening(&[control], Duration::from_secs(10)).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let server_base = procfs::stats(server_pid)?;

    let client_cfg = |name: &str, ids: &[usize]| -> Result<PathBuf> {
        let mut toml = format!(
            "[client]\nremote_addr = \"127.0.0.1:{control}\"\ndefault_token = \"bench\"\n\n"
        );
        for i in ids {
            toml += &format!("[client.services.s{i}]\nlocal_addr = \"{}\"\n\n", sink.addr);
        }
        let path = dir.join(format!("{name}.toml"));
        std::fs::write(&path, toml)?;
        Ok(path)
    };
    let solo = client_cfg("solo", &[0])?;
    children.push(spawn(rathole, "--client", &solo, &dir.join("solo.log"))?);
    let solo_pid = children[1].id().context("rathole client exited")?;
    for c in 0..clients {
        let ids: Vec<usize> = (1..=services).filter(|i| i % clients == c).collect();
        let cfg = client_cfg(&format!("client{c}"), &ids)?;
        children.push(spawn(
            rathole,
            "--client",
            &cfg,
            &dir.join(format!("client{c}.log")),
        )?);
    }
    // The server listens on a service's port once that service's control channel is up.
    let all: Vec<u16> = service_ports[..=services].to_vec();
    wait_listening(&all, Duration::from_secs(60)).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let server_loaded = procfs::stats(server_pid)?;
    let client_idle = procfs::stats(solo_pid)?;

    let tunnel = tcp::push(format!("127.0.0.1:{}", service_ports[0]).parse()?, bytes).await?;
    for mut child in children {
        let _ = child.start_kill();
        let _ = child.wait().await;
    }
    sink.stop().await;
    Ok(Outcome {
        version,
        client_idle,
        server_base,
        server_loaded,
        services,
        clients,
        bytes,
        tunnel,
        direct,
    })
}

fn spawn(rathole: &Path, mode: &str, config: &Path, log: &Path) -> Result<Child> {
    let log = std::fs::File::create(log)?;
    Command::new(rathole)
        .arg(mode)
        .arg(config)
        // Our relay runs at `warn` too.
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", rathole.display()))
}

/// `n` loopback ports free right now (bound and released; nothing else on this machine should take them in
/// the next second).
fn free_ports(n: usize) -> Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()?;
    listeners
        .iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect()
}

async fn wait_listening(ports: &[u16], limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    let want: HashSet<u16> = ports.iter().copied().collect();
    loop {
        let listening = procfs::listening_ports()?;
        let missing = want.difference(&listening).count();
        if missing == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{missing} of {} rathole ports never listened", want.len());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
