//! The relay under test: a separate `ct-relay` process (so its memory and descriptors are its own, and it can
//! be killed), or a relay library running in this process (for latency and throughput scenarios that submit
//! through `Core` directly, where sharing the process is fair and said so in the table).
//!
//! The process is driven only through what operators have: its command line, its admin socket, signals.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use ct_protocol::pairing::PairingToken;
use ct_protocol::task::TaskEvent;
use ct_relay::admin::{self, Reply, Request, StatusInfo};
use ct_relay::core::{Core, CoreConfig};
use ct_relay::relay::ClusterConfig;
use ct_relay::{Relay, RelayConfig};
use tokio::process::{Child, Command};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::dial::Target;
use crate::procfs;

/// How to start a program: the binary, and arguments that come before ours (the smoke test runs the relay
/// and the agent through `ct-loadgen relay ...` and `ct-loadgen agent ...`).
#[derive(Debug, Clone)]
pub struct Program {
    pub path: PathBuf,
    pub prefix: Vec<OsString>,
}

impl Program {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            prefix: Vec::new(),
        }
    }

    pub fn with_prefix(path: impl Into<PathBuf>, prefix: &[&str]) -> Self {
        Self {
            path: path.into(),
            prefix: prefix.iter().map(OsString::from).collect(),
        }
    }

    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.path);
        cmd.args(&self.prefix);
        cmd
    }
}

/// A `ct-relay` process on loopback, restarted on the same data directory and port when asked.
#[derive(Debug)]
pub struct RelayProcess {
    program: Program,
    /// Arguments after ours: a cluster node's database, bus and name, limits.
    args: Vec<OsString>,
    /// Environment on top of ours: the bot's `DISCORD_*` settings, a `LOG_LEVEL`.
    env: Vec<(OsString, OsString)>,
    pub data_dir: PathBuf,
    listen: SocketAddr,
    child: Option<Child>,
    pub target: Arc<Target>,
    log: PathBuf,
}

impl RelayProcess {
    /// Starts a relay on `127.0.0.1:0` with its store in `data_dir` and waits until it answers.
    pub async fn start(program: &Program, data_dir: &Path) -> Result<Self> {
        Self::start_with(program, data_dir, &[]).await
    }

    /// [`start`](Self::start) with more of `ct-relay`'s arguments (`--database-url ...` for a cluster node).
    pub async fn start_with(program: &Program, data_dir: &Path, args: &[OsString]) -> Result<Self> {
        let any_port = "127.0.0.1:0".parse().expect("a valid address");
        Self::start_on(program, data_dir, any_port, args, &[]).await
    }

    /// [`start_with`](Self::start_with) on `listen` (a node whose `--public-addr` must name its port before it
    /// starts) and with `env` set for it (the bot's `DISCORD_*` settings; `LOG_LEVEL` wins over ours).
    pub async fn start_on(
        program: &Program,
        data_dir: &Path,
        listen: SocketAddr,
        args: &[OsString],
        env: &[(OsString, OsString)],
    ) -> Result<Self> {
        std::fs::create_dir_all(data_dir)?;
        let log = data_dir.with_extension("log");
        let mut relay = Self {
            program: program.clone(),
            args: args.to_vec(),
            env: env.to_vec(),
            data_dir: data_dir.to_path_buf(),
            listen,
            child: None,
            target: Arc::new(Target::new(
                "127.0.0.1:0".parse().expect("a valid address"),
                ct_protocol::Fingerprint([0; 32]),
            )),
            log,
        };
        let status = relay.spawn().await?.1;
        let addr: SocketAddr = status
            .https
            .or(status.quic)
            .context("the relay reports no address")?
            .parse()?;
        relay.listen = addr;
        relay.target = Arc::new(Target::new(addr, status.relay_fingerprint.parse()?));
        Ok(relay)
    }

    /// Spawns the process and returns when its admin socket answers: the moment the relay is ready.
    async fn spawn(&mut self) -> Result<(Instant, StatusInfo)> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut cmd = self.program.command();
        cmd.arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--listen")
            .arg(self.listen.to_string())
            .args(&self.args)
            // Logging at `warn` measures the relay rather than its log formatting (`info` writes a line per
            // connection); the table says so. `BENCH_RELAY_LOG` overrides it to look inside a run, e.g.
            // `warn,quinn_proto::endpoint=debug` for the stateless resets a restarted relay sends.
            .env(
                "LOG_LEVEL",
                std::env::var("BENCH_RELAY_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .env_remove("DISCORD_TOKEN")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", self.program.path.display()))?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(exit) = child.try_wait()? {
                bail!(
                    "the relay exited ({exit}) before it was ready; see {}",
                    self.log.display()
                );
            }
            if let Ok(Reply::Status(status)) = admin::call(&self.data_dir, &Request::Status).await {
                let ready = Instant::now();
                self.child = Some(child);
                return Ok((ready, status));
            }
            if Instant::now() > deadline {
                bail!(
                    "the relay did not answer within a minute; see {}",
                    self.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// The process's figures right now.
    pub fn stats(&self) -> Result<procfs::Stats> {
        procfs::stats(self.pid().context("the relay is not running")?)
    }

    /// SIGKILL: no drain, no flush, as a crash or an OOM kill.
    pub async fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.start_kill()?;
            child.wait().await?;
        }
        Ok(())
    }

    /// SIGTERM, as an operator's restart: agents are told to come back, the store is flushed.
    pub async fn stop(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            if let Some(pid) = child.id() {
                procfs::signal(pid, "TERM")?;
            }
            if tokio::time::timeout(Duration::from_secs(15), child.wait())
                .await
                .is_err()
            {
                child.start_kill()?;
                child.wait().await?;
                bail!("the relay did not stop within 15 s of SIGTERM");
            }
        }
        Ok(())
    }

    /// Starts it again on the same data directory and port; returns when it is ready.
    pub async fn restart(&mut self) -> Result<Instant> {
        anyhow::ensure!(self.child.is_none(), "the relay is still running");
        Ok(self.spawn().await?.0)
    }

    pub async fn status(&self) -> Result<StatusInfo> {
        match admin::call(&self.data_dir, &Request::Status).await? {
            Reply::Status(s) => Ok(s),
            other => bail!("unexpected admin reply {other:?}"),
        }
    }

    /// The cluster's nodes as this one sees them (`ct-relay admin cluster`).
    pub async fn cluster(&self) -> Result<Vec<ct_relay::core::nodes::NodeView>> {
        match admin::call(&self.data_dir, &Request::Cluster).await? {
            Reply::Cluster { nodes } => Ok(nodes),
            other => bail!("unexpected admin reply {other:?}"),
        }
    }

    /// Every agent the relay knows, with its live state.
    pub async fn agents(&self) -> Result<Vec<ct_relay::core::AgentView>> {
        match admin::call(&self.data_dir, &Request::Agents).await? {
            Reply::Agents { agents } => Ok(agents),
            other => bail!("unexpected admin reply {other:?}"),
        }
    }

    /// A one-time pairing token for `user`, as `ct-relay admin pair-code --user USER` mints it (the same
    /// request over the same socket, without a process per code).
    pub async fn pair_code(&self, user: &str) -> Result<PairingToken> {
        match admin::call(&self.data_dir, &Request::PairCode { user: user.into() }).await? {
            Reply::PairCode { token, .. } => Ok(token.parse()?),
            other => bail!("pair-code refused: {other:?}"),
        }
    }

    /// The log file the process writes to (its stdout and stderr).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Submits a task as `user` on their agent (as `ct-relay admin task --as USER` does) and returns its id
    /// once the relay has queued it, without following its output.
    pub async fn submit(&self, user: &str, prompt: &str) -> Result<String> {
        Self::submit_in(&self.data_dir, user, prompt).await
    }

    /// [`submit`](Self::submit) through the admin socket of the relay whose data directory is `data_dir`, for
    /// callers that cannot borrow the process (a task spawned per submission).
    pub async fn submit_in(data_dir: &Path, user: &str, prompt: &str) -> Result<String> {
        let req = Request::Task {
            user: user.into(),
            agent: None,
            project: "/srv/bench".into(),
            prompt: prompt.into(),
            options: Default::default(),
            target: None,
            name: None,
        };
        match admin::call(data_dir, &req).await? {
            Reply::Task { task, .. } => Ok(task),
            other => bail!("task refused: {other:?}"),
        }
    }

    /// A task's stored log, read through the admin socket from the start, and its final state; `None` when
    /// the task has not ended within `limit` (the log read so far is still returned).
    pub async fn follow(
        &self,
        task: &str,
        limit: Duration,
    ) -> Result<(Vec<(u64, TaskEvent)>, Option<String>)> {
        let mut events = Vec::new();
        let mut end = None;
        let mut error = None;
        let req = Request::Follow { task: task.into() };
        let stream = admin::call_stream(&self.data_dir, &req, |reply| match reply {
            Reply::Event { seq, event } => {
                events.push((seq, event));
                true
            }
            Reply::End { state, .. } => {
                end = Some(format!("{state:?}"));
                false
            }
            Reply::Task { .. } => true,
            other => {
                error = Some(format!("{other:?}"));
                false
            }
        });
        // A task that never ends (its log has a gap the agent cannot fill) is reported, not waited for.
        if let Ok(result) = tokio::time::timeout(limit, stream).await {
            result?;
        }
        if let Some(e) = error {
            bail!("following {task}: {e}");
        }
        Ok((events, end))
    }
}

/// A relay library running in this process on loopback, with its core at hand.
#[derive(Debug)]
pub struct InProcessRelay {
    pub core: Core,
    pub target: Arc<Target>,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<Result<()>>>,
}

impl InProcessRelay {
    /// Binds a relay on `127.0.0.1:0` with its store in `data_dir` and runs it until [`stop`](Self::stop).
    pub async fn start(data_dir: &Path) -> Result<Self> {
        Self::start_node(data_dir, None).await
    }

    /// [`start`](Self::start), as one node of a cluster (state in its PostgreSQL database) when `cluster` is
    /// given.
    pub async fn start_node(data_dir: &Path, cluster: Option<ClusterConfig>) -> Result<Self> {
        let mut config = RelayConfig::new(data_dir.to_path_buf(), "127.0.0.1:0".parse()?);
        config.cluster = cluster;
        config.core = CoreConfig {
            // Everything pairs from one machine here, and a few users submit thousands of tasks: the abuse
            // limits are for strangers, not for a benchmark, which measures the path behind them.
            pair_burst: 1_000_000,
            tasks_per_minute: 1_000_000,
            task_burst: 1_000_000,
            max_tasks_per_user: 1_000_000,
            ..CoreConfig::default()
        };
        let relay = Relay::bind(config).await?;
        let addr = relay
            .https_addr()
            .or(relay.quic_addr())
            .context("relay bound nothing")?;
        let target = Arc::new(Target::new(addr, relay.fingerprint()));
        let core = relay.core();
        let shutdown = CancellationToken::new();
        let task = Some(tokio::spawn(relay.run(shutdown.clone())));
        Ok(Self {
            core,
            target,
            shutdown,
            task,
        })
    }

    /// Graceful stop, as on SIGTERM.
    pub async fn stop(mut self) -> Result<()> {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            task.await??;
        }
        Ok(())
    }
}

impl Drop for InProcessRelay {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
