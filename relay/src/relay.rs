//! The relay's lifecycle: bind everything from a [`RelayConfig`], serve until the shutdown token fires, then
//! drain: readiness goes false, every agent is told to reconnect, sessions finish, the store is flushed.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use ct_protocol::version::SOFTWARE_VERSION;
use ct_protocol::Fingerprint;
use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;

use crate::admin::{self, StatusInfo};
use crate::cluster::{Bus, Seal};
use crate::core::{Core, CoreConfig};
use crate::endpoint::limits::Admission;
use crate::endpoint::{https, quic};
use crate::files;
use crate::metrics::Metrics;
use crate::store::postgres::PgStore;
use crate::store::sled::SledStore;
use crate::store::{SharedStore, RELAY_KEY};
use crate::tls::{self, CertSource};

/// How long shutdown waits for sessions to send their goodbyes.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Everything needed to start a relay.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    pub data_dir: PathBuf,
    /// QUIC (UDP) and HTTPS (TCP) share this port number; port 0 picks a free one for both.
    pub listen: SocketAddr,
    /// Addresses put into pairing tokens; defaults to the bound address.
    pub public_addrs: Vec<String>,
    pub cert: CertSource,
    pub quic: bool,
    pub websocket: bool,
    pub core: CoreConfig,
    /// The Discord bot, when configured (`DISCORD_TOKEN` or `DISCORD_PUBLIC_KEY`); `None`: the bot is off.
    pub bot: Option<crate::discord::BotConfig>,
    /// One node of a cluster: state in PostgreSQL, routing over NATS. `None`: a relay of one, on sled in
    /// `data_dir`.
    pub cluster: Option<ClusterConfig>,
}

/// Where a cluster node finds the others.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub database_url: String,
    pub nats_url: String,
}

impl RelayConfig {
    pub fn new(data_dir: PathBuf, listen: SocketAddr) -> Self {
        Self {
            data_dir,
            listen,
            public_addrs: Vec::new(),
            cert: CertSource::SelfSigned,
            quic: true,
            websocket: true,
            core: CoreConfig::default(),
            bot: None,
            cluster: None,
        }
    }
}

/// A relay whose sockets are bound and whose store is open, ready to [`run`](Relay::run).
#[derive(Debug)]
pub struct Relay {
    core: Core,
    admission: Admission,
    quic: Option<quinn::Endpoint>,
    tcp: Option<TcpListener>,
    admin: UnixListener,
    https_tls: Arc<rustls::ServerConfig>,
    status: StatusInfo,
    ready: Arc<AtomicBool>,
    data_dir: PathBuf,
    bot: Option<crate::discord::BotConfig>,
    /// Tasks started while binding (the cluster bus's pump), stopped after the drain with `stop_bus`.
    bus_tasks: TaskTracker,
    stop_bus: CancellationToken,
}

impl Relay {
    /// Opens the store, loads or creates keys and certificate, and binds every listener.
    pub async fn bind(config: RelayConfig) -> Result<Self> {
        anyhow::ensure!(
            config.quic || config.websocket,
            "both QUIC and WebSocket are disabled: enable at least one"
        );
        // Everything the relay writes is private to its user: keys, certificate, admin socket, and the
        // store's files, which sled creates with the default mode (0644 under the usual umask).
        crate::sys::private_umask();
        files::private_dir(&config.data_dir)?;
        let admin = admin::bind(&admin::socket_path(&config.data_dir)).await?;
        // Opening the store reads its indexes (and rebuilds them after an upgrade), and the permission check
        // walks the data directory: both on the blocking pool, not on a runtime worker.
        let (store, loosened) = {
            let dir = config.data_dir.clone();
            let database = config.cluster.as_ref().map(|c| c.database_url.clone());
            tokio::task::spawn_blocking(move || -> Result<(SharedStore, usize)> {
                let store: SharedStore = match database {
                    Some(url) => {
                        Arc::new(PgStore::open(&url).context(
                            "opening the cluster's PostgreSQL database (--database-url)",
                        )?)
                    }
                    None => Arc::new(
                        SledStore::open(&dir.join("db"))
                            .with_context(|| format!("opening the store in {}", dir.display()))?,
                    ),
                };
                Ok((store, files::make_private(&dir)?))
            })
            .await
            .context("opening the store")??
        };
        if loosened > 0 {
            tracing::warn!(
                loosened,
                "files in the data directory were readable by other users; they are private (0600) now"
            );
        }
        let mut relay_key = tls::relay_key(&config.data_dir)?;
        if config.cluster.is_some() {
            // Every node answers for the same key, so agents move between nodes without re-pairing: the
            // first node to start puts its key in the shared store, and every node uses that one.
            let proposed = relay_key.to_bytes();
            let store = store.clone();
            let shared =
                tokio::task::spawn_blocking(move || store.shared_secret(RELAY_KEY, &proposed))
                    .await
                    .context("reading the cluster's relay key")??;
            let seed: [u8; 32] = shared.as_slice().try_into().map_err(|_| {
                anyhow::anyhow!(
                    "the cluster's relay key in PostgreSQL is {} bytes, not 32: restore it from a backup",
                    shared.len()
                )
            })?;
            relay_key = ed25519_dalek::SigningKey::from_bytes(&seed);
        }
        let (certs, key) = tls::certificate(&config.data_dir, &config.cert)?;
        let https_tls = tls::https_config(certs.clone(), key.clone_key())?;
        let quic_cfg = tls::quic_config(certs, key)?;

        let (tcp, udp) = bind_pair(config.listen, config.websocket, config.quic)?;
        let quic = udp
            .map(|udp| {
                quinn::Endpoint::new(
                    tls::quic_endpoint_config(&relay_key),
                    Some(quic_cfg),
                    udp,
                    Arc::new(quinn::TokioRuntime),
                )
            })
            .transpose()
            .context("starting the QUIC endpoint")?;
        let tcp = tcp.map(TcpListener::from_std).transpose()?;
        let quic_addr = quic.as_ref().map(|e| e.local_addr()).transpose()?;
        let https_addr = tcp.as_ref().map(|t| t.local_addr()).transpose()?;
        let bound = https_addr.or(quic_addr).context("nothing bound")?;

        let mut core_cfg = config.core.clone();
        if config.cluster.is_some() {
            core_cfg.event_writers = crate::core::EVENT_WRITERS;
        }
        core_cfg.public_addrs = if config.public_addrs.is_empty() {
            let ip = if bound.ip().is_unspecified() {
                Ipv4Addr::LOCALHOST.into()
            } else {
                bound.ip()
            };
            let addr = SocketAddr::new(ip, bound.port()).to_string();
            if bound.ip().is_unspecified() {
                tracing::warn!(
                    %addr,
                    "no --public-addr given: pairing tokens will point at {addr}, which only works on this machine; \
                     set --public-addr HOST:PORT to the name agents use to reach this relay"
                );
            }
            vec![addr]
        } else {
            config.public_addrs.clone()
        };
        let fingerprint = Fingerprint::of(&relay_key.verifying_key());
        let status = StatusInfo {
            version: SOFTWARE_VERSION.to_string(),
            node: core_cfg.node_id.clone(),
            mode: if config.cluster.is_some() {
                "cluster (PostgreSQL + NATS)".into()
            } else {
                "embedded (sled)".into()
            },
            quic: quic_addr.map(|a| a.to_string()),
            https: https_addr.map(|a| a.to_string()),
            public_addrs: core_cfg.public_addrs.clone(),
            relay_fingerprint: fingerprint.to_string(),
            agents_online: 0,
            agents_paired: 0,
            data_dir: config.data_dir.display().to_string(),
            discord_bot: config.bot.is_some(),
        };
        let admission = Admission::new(
            core_cfg.max_connections,
            core_cfg.max_connections_per_address,
        );
        let bus_tasks = TaskTracker::new();
        let stop_bus = CancellationToken::new();
        let bus = match &config.cluster {
            Some(cluster) => Some(
                Bus::connect(
                    &cluster.nats_url,
                    &core_cfg.node_id,
                    Seal::from_relay_secret(&relay_key.to_bytes()),
                    stop_bus.clone(),
                    &bus_tasks,
                )
                .await?,
            ),
            None => None,
        };
        let metrics = Arc::new(Metrics::for_node(&core_cfg.node_id));
        let core = Core::start(store, relay_key, core_cfg, metrics, bus)
            .context("starting the core's thread and the store's flusher thread")?;
        core.join_cluster().await;
        Ok(Self {
            core,
            admission,
            quic,
            tcp,
            admin,
            https_tls,
            status,
            ready: Arc::new(AtomicBool::new(false)),
            data_dir: config.data_dir,
            bot: config.bot,
            bus_tasks,
            stop_bus,
        })
    }

    pub fn core(&self) -> Core {
        self.core.clone()
    }

    /// The connection limits the endpoints enforce (for tests and metrics).
    pub fn admission(&self) -> Admission {
        self.admission.clone()
    }

    pub fn quic_addr(&self) -> Option<SocketAddr> {
        self.quic.as_ref().and_then(|e| e.local_addr().ok())
    }

    pub fn https_addr(&self) -> Option<SocketAddr> {
        self.tcp.as_ref().and_then(|t| t.local_addr().ok())
    }

    pub fn fingerprint(&self) -> Fingerprint {
        self.core.relay_fingerprint()
    }

    /// Serves until `shutdown` is cancelled, then drains and returns.
    pub async fn run(self, shutdown: CancellationToken) -> Result<()> {
        let Relay {
            core,
            admission,
            quic,
            tcp,
            admin,
            https_tls,
            status,
            ready,
            data_dir,
            bot,
            bus_tasks,
            stop_bus,
        } = self;
        let tasks = TaskTracker::new();
        let clustered = core.bus().is_some();
        info!(
            node = %status.node,
            mode = %status.mode,
            quic = ?status.quic,
            https = ?status.https,
            public = ?status.public_addrs,
            fingerprint = %status.relay_fingerprint,
            data_dir = %status.data_dir,
            "relay listening"
        );
        if let Some(endpoint) = quic.clone() {
            tasks.spawn(quic::serve(
                endpoint,
                core.clone(),
                admission.clone(),
                shutdown.clone(),
                tasks.clone(),
            ));
        }
        // The bot stops with the relay's shutdown token; its tasks are waited for with the others.
        let discord = match bot {
            Some(config) => crate::discord::start(core.clone(), config, shutdown.clone(), &tasks),
            None => None,
        };
        if let Some(tcp) = tcp {
            let http = https::Http {
                core: core.clone(),
                admission,
                ready: ready.clone(),
                shutdown: shutdown.clone(),
                discord,
                web: crate::web::Web::new(core.clone(), shutdown.clone()),
            };
            tasks.spawn(https::serve(tcp, https_tls, http, tasks.clone()));
        }
        tasks.spawn(admin::serve(
            admin,
            core.clone(),
            status,
            shutdown.clone(),
            tasks.clone(),
        ));
        // Retention: old tasks, audit entries and pairing codes are deleted now and hourly.
        tasks.spawn(crate::retention::run(core.clone(), shutdown.clone()));
        // Heartbeat: which nodes are alive, their addresses for pairing tokens, readiness.
        {
            let core = core.clone();
            let shutdown = shutdown.clone();
            tasks.spawn(async move { core.heartbeat(shutdown).await });
        }
        ready.store(true, Ordering::Relaxed);

        // When the store lost writes in a crash, every agent here reconnects: its presence claim may be among
        // them, and it sends again what was never acknowledged.
        {
            let (core, shutdown) = (core.clone(), shutdown.clone());
            let mut losses = core.commit().losses();
            tasks.spawn(async move {
                loop {
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        changed = losses.changed() => if changed.is_err() { break },
                    }
                    core.reconnect_everyone().await;
                }
            });
        }
        shutdown.cancelled().await;
        ready.store(false, Ordering::Relaxed);
        let online = core.online().await;
        info!(
            agents = online,
            "shutting down: asking agents to reconnect later"
        );
        tasks.close();
        if tokio::time::timeout(DRAIN_TIMEOUT, tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                "some connections did not finish within {DRAIN_TIMEOUT:?}; closing them"
            );
        }
        if let Some(endpoint) = quic {
            endpoint.close(0u32.into(), b"relay shutting down");
            let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
        }
        core.flush().await;
        if clustered {
            core.leave_cluster().await;
        }
        stop_bus.cancel();
        bus_tasks.close();
        bus_tasks.wait().await;
        let _ = std::fs::remove_file(admin::socket_path(&data_dir));
        info!("relay stopped");
        Ok(())
    }
}

/// Binds TCP and UDP on the same port number. With port 0, the TCP port is chosen first and UDP follows it;
/// if that UDP port is taken, try again with another.
fn bind_pair(
    addr: SocketAddr,
    tcp: bool,
    udp: bool,
) -> Result<(Option<std::net::TcpListener>, Option<UdpSocket>)> {
    let attempts = if addr.port() == 0 && tcp && udp {
        20
    } else {
        1
    };
    let mut last_err = None;
    for _ in 0..attempts {
        let t = if tcp {
            Some(listen_tcp(addr).with_context(|| format!("binding TCP {addr}"))?)
        } else {
            None
        };
        let port = t
            .as_ref()
            .map(|l| l.local_addr())
            .transpose()?
            .map_or(addr.port(), |a| a.port());
        if !udp {
            return Ok((t, None));
        }
        match UdpSocket::bind(SocketAddr::new(addr.ip(), port)) {
            Ok(u) => {
                size_udp_buffers(&u);
                return Ok((t, Some(u)));
            }
            Err(e) => last_err = Some(e),
        }
    }
    Err(last_err.map_or_else(|| anyhow::anyhow!("could not bind"), |e| anyhow::anyhow!(e)))
        .with_context(|| format!("binding UDP for {addr}"))
}

/// Connections waiting to be accepted. std's listeners allow 128: after a relay restart thousands of agents
/// reconnect within a second, the queue overflows, and the kernel drops their SYNs, which they only resend
/// after 1, 3, 7 s. Measured with 1,000 agents reconnecting after a SIGKILL: p95 back online 7.4 s with 128,
/// the kernel's SYN-drop counter rising by thousands. The kernel caps it at `net.core.somaxconn`.
const LISTEN_BACKLOG: i32 = 8192;

/// UDP socket buffers for the QUIC endpoint. Every QUIC agent shares this one socket; the default 208 KiB
/// holds about 170 full packets, so a reconnect storm (every agent's first flight at once) overflows it and
/// the dropped handshakes wait on retransmission timers. The kernel caps it at `net.core.rmem_max` /
/// `wmem_max`.
const UDP_BUFFER: usize = 8 * 1024 * 1024;

fn listen_tcp(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    // As std does: a restarted relay can bind its port again while old connections linger in TIME_WAIT.
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// Asks for [`UDP_BUFFER`]-sized buffers and says so once, with the fix, when the system allows less.
fn size_udp_buffers(udp: &UdpSocket) {
    let sock = socket2::SockRef::from(udp);
    let _ = sock.set_recv_buffer_size(UDP_BUFFER);
    let _ = sock.set_send_buffer_size(UDP_BUFFER);
    // Linux reports twice what was granted (it counts its own bookkeeping).
    let granted = sock.recv_buffer_size().unwrap_or(0);
    if granted < UDP_BUFFER {
        tracing::warn!(
            granted,
            wanted = UDP_BUFFER,
            "the QUIC socket's receive buffer is small, so reconnect storms will drop handshakes; \
             raise it with `sysctl -w net.core.rmem_max={UDP_BUFFER} net.core.wmem_max={UDP_BUFFER}`"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A reconnect storm queues far more than std's 128 connections before the relay accepts one: they must
    /// all complete their handshake with the kernel at once, not wait seconds for a resent SYN.
    #[test]
    fn hundreds_of_connections_can_wait_to_be_accepted() {
        let (tcp, _) = bind_pair("127.0.0.1:0".parse().unwrap(), true, false).unwrap();
        let tcp = tcp.unwrap();
        let addr = tcp.local_addr().unwrap();
        let somaxconn: usize = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .map_or(4096, |s| s.trim().parse().unwrap_or(4096));
        let waiting = 600.min(somaxconn);
        let mut held = Vec::new();
        for i in 0..waiting {
            let conn = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500))
                .unwrap_or_else(|e| panic!("connection {i} of {waiting} not queued: {e}"));
            held.push(conn);
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_quic_socket_asks_for_large_buffers() {
        let (_, udp) = bind_pair("127.0.0.1:0".parse().unwrap(), false, true).unwrap();
        let granted = socket2::SockRef::from(&udp.unwrap())
            .recv_buffer_size()
            .unwrap();
        let max: usize = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(
            granted >= UDP_BUFFER.min(max),
            "granted {granted}, system maximum {max}"
        );
    }
}
