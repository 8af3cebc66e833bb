//! `ct-agent run`: keep a session with the relay up for as long as the agent runs.
//!
//! The loop: load key and pairing → connect (QUIC/WebSocket race) → run the session → on a drop, back off and
//! reconnect, forever. Only answers that retrying cannot change (revoked key, unknown key, wrong relay key,
//! incompatible version, another agent with the same key) end it, with an error that says what to do. While
//! on WebSocket, QUIC is retried every [`RunOptions::quic_retry`] (jittered) and the session moves to QUIC as
//! soon as a QUIC handshake completes, so a network that blocked UDP for a while does not pin the agent to
//! the slower transport for good (cloudflared #1534).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use ct_protocol::handshake::{HandshakeError, Rejection, HANDSHAKE_TIMEOUT};
use ct_protocol::Transport;
use rand::Rng;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::backoff::Backoff;
use crate::config::{ConfigDir, ConfigError};
use crate::connect::{
    attempt_quic, connect_any, ConnectError, ConnectOptions, Credentials, Link, TransportPolicy,
    ATTEMPT_TIMEOUT,
};
use crate::session::{run_session, SessionEnd};
use crate::status::StatusFile;
use crate::tasks::{TaskConfig, Tasks};

/// Exit status for errors a restart cannot fix (`EX_CONFIG` from sysexits.h): service managers are told
/// not to restart on it.
pub const EXIT_PERMANENT: u8 = 78;

/// How often QUIC is retried while on WebSocket, before jitter.
pub const QUIC_RETRY: Duration = Duration::from_secs(60);

/// Options for [`run`].
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub config_dir: PathBuf,
    /// Mean interval between QUIC attempts while on WebSocket; each wait is uniform in ±50% of it.
    pub quic_retry: Duration,
    pub connect: ConnectOptions,
    /// How tasks run (Claude Code location, timeouts, limits).
    pub tasks: TaskConfig,
}

impl RunOptions {
    /// Defaults: retry QUIC every ~60 s, race transports, proxy from the environment.
    pub fn new(config_dir: impl Into<PathBuf>) -> Self {
        Self {
            config_dir: config_dir.into(),
            quic_retry: QUIC_RETRY,
            connect: ConnectOptions::default(),
            tasks: TaskConfig::default(),
        }
    }
}

/// What the link is doing, published on a watch channel and mirrored to `status.json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkStatus {
    Connecting,
    Connected {
        transport: Transport,
        relay_addr: String,
        since: SystemTime,
    },
    BackingOff {
        until: SystemTime,
        last_error: String,
    },
    /// `run` returned; `error` is its error, if any.
    Stopped {
        error: Option<String>,
    },
}

/// Why `run` stopped. Every variant is something a restart does not fix (see [`EXIT_PERMANENT`]).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The config directory or its files.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// No `pairing.json`.
    #[error(
        "this agent is not paired yet (no pairing in {}): run `ct-agent pair <token>` with a token from \
         /register in Discord",
        dir.display()
    )]
    NotPaired { dir: PathBuf },
    /// The relay revoked the key.
    #[error(
        "the relay revoked this agent's key ({message}): it will not reconnect. To use this machine again, \
         get a new token with /register in Discord and run `ct-agent pair --force <token>`"
    )]
    Revoked { message: String },
    /// Another process with the same key took over.
    #[error(
        "another ct-agent with the same key connected to the relay and took over this one ({message}). \
         Stop the other one (check `ct-agent status` and your service manager; a copied config directory \
         also does this) before starting this one again"
    )]
    Replaced { message: String },
    /// The relay refused the handshake in a way that retrying cannot change.
    #[error("{}", refusal_advice(.0))]
    Refused(#[source] HandshakeError),
}

impl RunError {
    /// The process exit status for this error.
    pub fn exit_code(&self) -> u8 {
        EXIT_PERMANENT
    }
}

fn refusal_advice(e: &HandshakeError) -> String {
    match e {
        HandshakeError::Rejected {
            reason: Rejection::Revoked,
            message,
        } => RunError::Revoked {
            message: message.clone(),
        }
        .to_string(),
        HandshakeError::Rejected {
            reason: Rejection::UnknownKey,
            message,
        } => format!(
            "the relay does not know this agent's key ({message}); it may have been unregistered. Get a new \
             token with /register in Discord and run `ct-agent pair --force <token>`"
        ),
        other => format!("the relay refused this agent: {other}"),
    }
}

/// Publishes link status to the watch channel and `status.json`.
struct Reporter {
    tx: watch::Sender<LinkStatus>,
    dir: ConfigDir,
    last_error: Mutex<Option<String>>,
}

impl Reporter {
    fn set(&self, status: LinkStatus) {
        let last_error = {
            let mut last = self.last_error.lock().unwrap_or_else(|p| p.into_inner());
            match &status {
                LinkStatus::BackingOff { last_error, .. } => *last = Some(last_error.clone()),
                LinkStatus::Stopped { error: Some(e) } => *last = Some(e.clone()),
                _ => {}
            }
            last.clone()
        };
        // A small synchronous write on a state change (a few per connection at most); failing to record
        // status must not take the link down, so it is only logged.
        if let Err(e) = StatusFile::new(std::process::id(), &status, last_error).store(&self.dir) {
            tracing::warn!(error = %e, "cannot write status.json");
        }
        self.tx.send_replace(status);
    }
}

/// Runs the agent until `shutdown` is cancelled (`Ok`) or a permanent error (`Err`). Status changes go to
/// `status` and to `status.json` in the config directory.
pub async fn run(
    opts: RunOptions,
    shutdown: CancellationToken,
    status: watch::Sender<LinkStatus>,
) -> Result<(), RunError> {
    let dir = ConfigDir::open(&opts.config_dir)?;
    let reporter = Reporter {
        tx: status,
        dir: dir.clone(),
        last_error: Mutex::new(None),
    };
    // Closing an old link (after a transport switch) runs in the background; the tracker owns those tasks
    // and `run` waits for them before returning.
    let closers = TaskTracker::new();
    // Tasks outlive links, not the agent: when `run` ends, every Claude Code process tree is ended too.
    let tasks_stop = shutdown.child_token();
    let tasks = Tasks::new(dir.clone(), opts.tasks.clone(), tasks_stop.clone());
    let result = run_loop(&opts, &dir, &shutdown, &reporter, &closers, &tasks).await;
    tasks_stop.cancel();
    closers.close();
    closers.wait().await;
    tasks.wait().await;
    if let Err(e) = &result {
        tracing::error!(error = %e, "agent stopped");
    }
    reporter.set(LinkStatus::Stopped {
        error: result.as_ref().err().map(ToString::to_string),
    });
    result
}

async fn run_loop(
    opts: &RunOptions,
    dir: &ConfigDir,
    shutdown: &CancellationToken,
    reporter: &Reporter,
    closers: &TaskTracker,
    tasks: &Tasks,
) -> Result<(), RunError> {
    let (key, pairing) = dir.load_identity()?.ok_or_else(|| RunError::NotPaired {
        dir: dir.path().to_path_buf(),
    })?;
    tracing::info!(
        agent = %key.fingerprint(),
        relays = ?pairing.relays,
        "starting"
    );
    let creds = Credentials {
        key,
        relay: pairing.relay_fingerprint,
        pair: None,
    };
    let mut backoff = Backoff::default();
    // The order addresses are tried in: the pairing's order at first; once connected, the node in use goes
    // last and the others are shuffled, so when it goes away (drained or died) its agents move to the other
    // nodes at once, spread over them, instead of waiting on it.
    let mut relays = pairing.relays.clone();

    loop {
        reporter.set(LinkStatus::Connecting);
        let attempt = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            r = connect_any(&relays, &creds, &opts.connect) => r,
        };
        let error = match attempt {
            Err(e) if e.is_permanent() => return Err(permanent(e)),
            Err(e) => e.to_string(),
            Ok(link) => {
                learn_relays(dir, &mut relays, &link.welcome.relays).await;
                let addr = link.relay_addr.clone();
                if let Some(at) = relays.iter().position(|r| *r == addr) {
                    let left = relays.remove(at);
                    // The others in a random order: when a node dies, its agents spread over the survivors
                    // instead of all dialling the same next one.
                    use rand::seq::SliceRandom as _;
                    relays.shuffle(&mut rand::thread_rng());
                    relays.push(left);
                }
                let elsewhere = ct_protocol::link::watches_transport(relays.len());
                let around = Around {
                    opts,
                    creds: &creds,
                    shutdown,
                    reporter,
                    closers,
                    tasks,
                };
                let (end, lasted) = serve(link, &around, elsewhere).await;
                backoff.session_ended(lasted);
                match end {
                    SessionEnd::Shutdown => return Ok(()),
                    SessionEnd::Revoked(message) => return Err(RunError::Revoked { message }),
                    SessionEnd::Replaced(message) => return Err(RunError::Replaced { message }),
                    SessionEnd::RelayRestarting => {
                        // The relay told us it is going away: come back as soon as it does.
                        backoff.reset();
                        "the relay restarted".to_string()
                    }
                    SessionEnd::Lost(reason) => reason,
                }
            }
        };
        let delay = backoff.next_delay();
        tracing::warn!(%error, retry_in = ?delay, "link down; reconnecting");
        reporter.set(LinkStatus::BackingOff {
            until: SystemTime::now() + delay,
            last_error: error,
        });
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// Remembers the cluster nodes a Welcome names that the pairing does not know (a node that joined after this
/// agent paired, or the nodes of a relay that became a cluster), in the pairing file and in this run's list,
/// so the agent can fail over to them. A file that cannot be written only costs the next start this.
async fn learn_relays(dir: &ConfigDir, relays: &mut Vec<String>, offered: &[String]) {
    if offered.iter().all(|a| relays.contains(a)) {
        return;
    }
    let (dir, offered) = (dir.clone(), offered.to_vec());
    match tokio::task::spawn_blocking(move || dir.learn_relays(&offered)).await {
        Ok(Ok(added)) => {
            for addr in added {
                if !relays.contains(&addr) {
                    tracing::info!(relay = %addr, "the relay's cluster has another node; it is tried when this one goes");
                    relays.push(addr);
                }
            }
        }
        Ok(Err(e)) => tracing::warn!(error = %e, "could not remember the cluster's other nodes"),
        Err(e) => tracing::warn!(error = %e, "could not remember the cluster's other nodes"),
    }
}

fn permanent(e: ConnectError) -> RunError {
    match e {
        ConnectError::Handshake { source, .. } => RunError::Refused(source),
        ConnectError::Both { quic, websocket } => {
            if quic.is_permanent() {
                permanent(*quic)
            } else {
                permanent(*websocket)
            }
        }
        // `is_permanent` is only true for handshake failures; keep the message if that ever changes.
        other => RunError::Refused(HandshakeError::Incompatible(other.to_string())),
    }
}

/// Runs sessions on `link` (and on the QUIC link that replaces it, if any) until one ends. Returns why and
/// for how long the agent was connected.
/// `elsewhere`: the agent knows another node to go to (see [`run_session`]).
async fn serve(mut link: Link, around: &Around<'_>, elsewhere: bool) -> (SessionEnd, Duration) {
    let Around {
        opts,
        creds,
        shutdown,
        reporter,
        closers,
        tasks,
    } = *around;
    let connected_at = Instant::now();
    loop {
        let span =
            tracing::info_span!("session", transport = %link.transport, relay = %link.relay_addr);
        span.in_scope(|| {
            tracing::info!(owner = %link.welcome.owner, agent_name = %link.welcome.agent_name, "connected")
        });
        reporter.set(LinkStatus::Connected {
            transport: link.transport,
            relay_addr: link.relay_addr.clone(),
            since: SystemTime::now(),
        });
        let session_started = Instant::now();

        let probe_quic =
            link.transport == Transport::WebSocket && opts.connect.policy == TransportPolicy::Race;
        let addr = link.relay_addr.clone();
        let probing = AtomicBool::new(false);
        // Pinned outside the select so that an attempt in flight survives the session ending (below).
        let probe = retry_quic(&addr, creds, opts.quic_retry, &probing);
        tokio::pin!(probe);
        let mut step = tokio::select! {
            end = run_session(&mut link, shutdown, tasks, elsewhere).instrument(span.clone()) => Step::Ended(end),
            quic = &mut probe, if probe_quic => Step::Switch(Box::new(quic)),
        };
        if matches!(step, Step::Ended(SessionEnd::Replaced(_))) && probing.load(Ordering::Relaxed) {
            // Our own QUIC attempt completed at the relay, which replaced this session with it, and the
            // notice reached us before the attempt's own Welcome: that is our switch, not another agent.
            step = match tokio::time::timeout(ATTEMPT_TIMEOUT, &mut probe).await {
                Ok(quic) => Step::Switch(Box::new(quic)),
                Err(_) => Step::Ended(SessionEnd::Lost(
                    "replaced by this agent's own QUIC attempt, which then failed".into(),
                )),
            };
        }
        match step {
            Step::Switch(quic) => {
                tracing::info!(relay = %addr, "QUIC works again; moving the session off WebSocket");
                let old = std::mem::replace(&mut link, *quic);
                // The relay replaces the WebSocket session with the QUIC one by itself (that is the
                // `Replaced` we no longer read); the Goodbye is a courtesy, so it does not hold up the new
                // session.
                closers.spawn(old.close("switching to QUIC"));
            }
            Step::Ended(end) => {
                let end = match end {
                    // Our own losing race attempt can complete at the relay after the winner did, and the
                    // relay then replaces the winner with it. That is us, not another agent: reconnect.
                    SessionEnd::Replaced(message)
                        if link.raced && session_started.elapsed() < HANDSHAKE_TIMEOUT * 2 =>
                    {
                        SessionEnd::Lost(format!(
                            "replaced by this agent's own parallel connection attempt ({message})"
                        ))
                    }
                    other => other,
                };
                match &end {
                    SessionEnd::Shutdown => link.close("agent shutting down").await,
                    SessionEnd::Lost(reason) => {
                        tracing::warn!(%reason, transport = %link.transport, "session lost")
                    }
                    _ => {}
                }
                return (end, connected_at.elapsed());
            }
        }
    }
}

/// What every session of a run shares.
#[derive(Clone, Copy)]
struct Around<'a> {
    opts: &'a RunOptions,
    creds: &'a Credentials,
    shutdown: &'a CancellationToken,
    reporter: &'a Reporter,
    closers: &'a TaskTracker,
    tasks: &'a Tasks,
}

enum Step {
    Ended(SessionEnd),
    Switch(Box<Link>),
}

/// Tries QUIC every `every` (±50% jitter) until a session is established; never returns otherwise.
/// `probing` is true while an attempt is in flight.
async fn retry_quic(
    addr: &str,
    creds: &Credentials,
    every: Duration,
    probing: &AtomicBool,
) -> Link {
    loop {
        let wait = every.mul_f64(rand::thread_rng().gen_range(0.5..1.5));
        tokio::time::sleep(wait).await;
        probing.store(true, Ordering::Relaxed);
        let attempt = attempt_quic(addr, creds).await;
        probing.store(false, Ordering::Relaxed);
        match attempt {
            Ok(link) => return link,
            Err(e) => tracing::debug!(relay = %addr, error = %e, "QUIC still unavailable"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_is_send_so_tests_can_spawn_it() {
        fn assert_send<T: Send>(_: &T) {}
        let (tx, _rx) = watch::channel(LinkStatus::Connecting);
        let fut = run(
            RunOptions::new("/nonexistent"),
            CancellationToken::new(),
            tx,
        );
        assert_send(&fut);
    }

    #[tokio::test]
    async fn an_unpaired_agent_stops_with_advice() {
        let tmp = tempfile::tempdir().unwrap();
        let (tx, rx) = watch::channel(LinkStatus::Connecting);
        let err = run(RunOptions::new(tmp.path()), CancellationToken::new(), tx)
            .await
            .unwrap_err();
        assert!(matches!(err, RunError::NotPaired { .. }), "{err}");
        assert!(err.to_string().contains("ct-agent pair <token>"), "{err}");
        assert_eq!(err.exit_code(), EXIT_PERMANENT);
        assert!(matches!(
            &*rx.borrow(),
            LinkStatus::Stopped { error: Some(_) }
        ));
    }
}
