//! The relay core: users, agents, pairing, shares, projects, tasks and their queues: what front ends and the
//! agent endpoint call.
//!
//! # One owner
//!
//! The core's mutable state (the live-agent table, each agent's queue as the store holds it, followers,
//! requests waiting for an agent, rate limiters) belongs to one [`State`](state::State), which lives on its own
//! thread, `ct-relay-core`. Everyone else holds a [`Core`]: a cheap, cloneable handle whose methods are
//! `async`. A method sends a job down a bounded channel to that thread and awaits its reply, so:
//!
//! - decisions about who may run what where (submitting, dispatching from a queue, reconciling an agent's
//!   report, changing a share, revoking) happen one at a time, in arrival order, with no lock: a share revoked
//!   while a task is being submitted is decided before or after it, never in between;
//! - every store call, and with it every disk read and write, runs on that thread (or, for large read-only
//!   queries, on the blocking pool through [`Core::read`]; in a cluster, see "A cluster" below), never on an
//!   async runtime worker;
//! - nothing fsyncs inline. A job whose writes must be on disk before anyone hears of them takes a group-commit
//!   ticket ([`crate::durable`]), and the handle awaits it after the thread has moved on to the next job. A
//!   message to an agent that must not leave before a write is durable (a task start) carries its ticket, and
//!   the agent's session waits for it before writing the message;
//! - event runs from every session that are waiting together are written in one store operation and covered
//!   by one ticket (see [`events`]), so under load the disk sees one write and one flush for many sessions.
//!
//! The bounded channel is the backpressure: when the thread falls behind, callers wait to hand it work rather
//! than queueing without limit.
//!
//! # Layout
//!
//! One file per concern, each with the handle's async methods (`impl Core`) next to the state's logic
//! (`impl State`): [`config`], [`agents`] (sessions and the live table), [`pairing`], [`routing`] (which
//! agent a request means), [`tasks`] (requests and errors), [`submit`] (new tasks and follow-ups), [`queue`],
//! [`events`], [`control`] (cancel, approvals), [`shares`], [`projects`], [`worktrees`], [`audit`], [`output`],
//! [`redact`], [`retention`], and for a cluster `books`, `remote` (reaching an agent held by another node, being
//! that node, following events another node writes) and [`nodes`] (heartbeats, live nodes, readiness).
//!
//! # A cluster
//!
//! Several nodes share one store (PostgreSQL) and a bus (NATS, [`crate::cluster`]); each node has its own
//! `State`. Decisions still happen on whichever node is asked, over the shared records; only what must go
//! down an agent's session crosses to the node holding it. Exactly-once dispatch is the store's
//! compare-and-swap under the session's presence epoch, not a lock of this thread's.
//!
//! Since the store, not this thread, is what orders decisions across nodes, a node's thread keeps its
//! PostgreSQL round trips to what only it can do: a submission's reads and its admission run on the blocking
//! pool around the decision ([`submit`]); so do an agent's admission read and presence claim
//! ([`Core::register_session`]), the open tasks a dispatch starts from ([`Core::open_tasks_ahead`]), and a
//! follower's first read of its task and `Core::task`. Bookkeeping no decision waits for (when an agent was last
//! seen, a session's presence released) runs on threads of its own (`books`), and task events on writer threads
//! while the core's thread goes on deciding (`writers`). Decisions that touch no record an event write in flight
//! could change do not wait for those writes (`Job::Unsettled`). With PostgreSQL a network round trip away,
//! each round trip left on this thread caps the node at one over its duration, shared by everything the node
//! does; the blocking pool's calls run side by side, up to [`READS_AT_ONCE`]. How busy the thread is:
//! `ct_relay_core_busy_seconds_total` on `/metrics`.

use std::sync::Arc;

use ct_protocol::Fingerprint;
use tokio::sync::{mpsc, oneshot};

use crate::cluster::Bus;
use crate::durable::GroupCommit;
use crate::metrics::Metrics;
use crate::store::{SharedStore, Store, StoreError};

pub mod agents;
pub mod audit;
mod books;
pub mod config;
pub mod control;
pub mod events;
pub mod files;
pub mod nodes;
pub mod output;
pub mod pairing;
pub mod pools;
pub mod projects;
pub mod queue;
pub mod redact;
pub(crate) mod remote;
pub mod retention;
pub mod routing;
pub mod settings;
pub mod shares;
mod state;
pub mod submit;
pub mod tasks;
pub mod worktrees;
mod writers;

pub use agents::{AgentView, SessionGuard};
pub use config::CoreConfig;
pub use state::Outbound;
pub use writers::WRITERS as EVENT_WRITERS;

use state::{Job, Operation, State};

/// Jobs waiting for the core's thread. Enough to absorb a burst (a relay restart brings a thousand
/// handshakes at once); past it, callers wait.
const JOB_QUEUE: usize = 4096;

/// Store calls [`Core::read`] runs at once. On PostgreSQL each holds one of the node's pooled connections
/// (16) for its round trips; without a cap, a burst of them (a thousand agents reconnecting, each with a read
/// and a claim) took every connection, and the core's thread, the event writers and the bookkeeping threads
/// waited for one behind them: every decision on the node stalled. Half the pool is left to those.
const READS_AT_ONCE: usize = 8;

/// Errors a front end shows to a person.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error("{0:?} is not a Discord user id (a number like 123456789012345678)")]
    BadUser(String),
    #[error("no agent matches {0:?}: list them with `ct-relay admin agents`")]
    NoSuchAgent(String),
    #[error("{query:?} matches several agents ({names}): use the fingerprint")]
    Ambiguous { query: String, names: String },
    #[error(
        "you already have {have} agents paired, the most one person may have on this relay ({max}): \
         unregister one you no longer use (/register unregister) first"
    )]
    TooManyAgents { have: usize, max: usize },
    /// The agent's key (short fingerprint) was revoked.
    #[error(
        "this agent's key ({0}) was revoked: pair it again with `ct-agent pair --force <token>` \
         (get a token with /register in Discord)"
    )]
    Revoked(String),
    #[error(transparent)]
    Stopped(#[from] Stopped),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The core's thread is gone: the relay is shutting down.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the relay is shutting down or restarting: try again in a moment")]
pub struct Stopped;

/// A handle to the relay core. Cloning it is cheap; the core stops when the last handle is dropped.
#[derive(Debug, Clone)]
pub struct Core {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    jobs: mpsc::Sender<Job>,
    /// For read-only queries on the blocking pool ([`Core::read`]); writes go through the core's thread.
    store: SharedStore,
    /// Store calls on the blocking pool at once (see [`READS_AT_ONCE`]).
    reads: Arc<tokio::sync::Semaphore>,
    commit: Arc<GroupCommit>,
    config: Arc<CoreConfig>,
    metrics: Arc<Metrics>,
    relay_key: ed25519_dalek::SigningKey,
    relay: Fingerprint,
    /// The cluster bus, when this relay is one node of several.
    bus: Option<Bus>,
    /// Whether the shared store answered the last heartbeat (readiness in a cluster).
    health: nodes::Health,
    /// Followers' watches of tasks whose events another node writes (see [`remote`]).
    watches: remote::Watches,
    /// The core's thread, joined when the last handle goes (after the channel closed, so it is on its way out).
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Close the channel first (a sender is the only thing keeping the thread's loop alive), then wait for
        // the thread to drop the state, so the store is closed when the last handle is gone (a relay restarted
        // in place opens the same directory next).
        let (closed, _) = mpsc::channel(1);
        drop(std::mem::replace(&mut self.jobs, closed));
        if let Some(thread) = self.thread.take() {
            if thread.thread().id() != std::thread::current().id() {
                let _ = thread.join();
            }
        }
    }
}

impl Core {
    /// Starts the core's thread and the store's group commit. Fails only if the system refuses a thread.
    pub fn start(
        store: SharedStore,
        relay_key: ed25519_dalek::SigningKey,
        mut config: CoreConfig,
        metrics: Arc<Metrics>,
        bus: Option<Bus>,
    ) -> std::io::Result<Self> {
        // With no running slot, nothing would ever leave the queue.
        config.max_running_per_agent = config.max_running_per_agent.max(1);
        let config = Arc::new(config);
        let commit = Arc::new(GroupCommit::start(store.clone())?);
        let relay = Fingerprint::of(&relay_key.verifying_key());
        let (jobs, rx) = mpsc::channel(JOB_QUEUE);
        let watches = remote::Watches::default();
        let state = State::new(
            store.clone(),
            commit.clone(),
            config.clone(),
            metrics.clone(),
            relay,
            bus.as_ref().map(|bus| (bus.publisher(), watches.clone())),
            jobs.downgrade(),
        )?;
        let thread = std::thread::Builder::new()
            .name("ct-relay-core".into())
            .spawn(move || state.run(rx))?;
        Ok(Self {
            shared: Arc::new(Shared {
                jobs,
                store,
                reads: Arc::new(tokio::sync::Semaphore::new(READS_AT_ONCE)),
                commit,
                config,
                metrics,
                relay_key,
                relay,
                bus,
                watches,
                health: Default::default(),
                thread: Some(thread),
            }),
        })
    }

    pub fn config(&self) -> &CoreConfig {
        &self.shared.config
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.shared.metrics
    }

    /// The store, for reads outside the core's thread. Its calls block: from async code, go through
    /// [`Core::read`].
    pub fn store(&self) -> &SharedStore {
        &self.shared.store
    }

    /// Group commit for what must be on disk before the relay says so; see [`crate::durable`].
    pub fn commit(&self) -> &GroupCommit {
        &self.shared.commit
    }

    /// The relay's signing key, for handshakes.
    pub fn relay_key(&self) -> &ed25519_dalek::SigningKey {
        &self.shared.relay_key
    }

    /// The relay key fingerprint agents pin.
    pub fn relay_fingerprint(&self) -> Fingerprint {
        self.shared.relay
    }

    /// Runs a store call that is not a decision of the core's on the blocking pool: large reads (a task's whole
    /// event log, the audit log), and the Discord bot's own bookkeeping (its thread marks).
    pub async fn read<R: Send + 'static>(
        &self,
        query: impl FnOnce(&dyn Store) -> R + Send + 'static,
    ) -> Result<R, Stopped> {
        // Held by the call itself, so a caller that stops waiting does not free a connection still in use.
        // (The semaphore is never closed.)
        let turn = self.shared.reads.clone().acquire_owned().await;
        let store = self.shared.store.clone();
        tokio::task::spawn_blocking(move || {
            let _turn = turn;
            query(&*store)
        })
        .await
        .map_err(|_| Stopped)
    }

    /// Makes every write so far durable (shutdown).
    pub async fn flush(&self) {
        let ticket = self.shared.commit.ticket();
        // A store that lost writes has nothing more to make durable.
        let _ = self.shared.commit.durable(ticket).await;
    }

    /// Runs `job` on the core's thread and returns what it returned, once what it asked to be durable is.
    async fn call<R: Send + 'static>(
        &self,
        job: impl FnOnce(&mut State) -> R + Send + 'static,
    ) -> Result<R, Stopped> {
        self.call_as(Job::Call, job).await
    }

    /// [`call`](Self::call) for a job that reads and writes no record an event write in flight could change
    /// (see [`Job::Unsettled`]).
    async fn call_unsettled<R: Send + 'static>(
        &self,
        job: impl FnOnce(&mut State) -> R + Send + 'static,
    ) -> Result<R, Stopped> {
        self.call_as(Job::Unsettled, job).await
    }

    /// [`run`](Self::run) for a job that reads and writes no record an event write in flight could change.
    async fn run_unsettled<T: Send + 'static, E: From<Stopped> + Send + 'static>(
        &self,
        job: impl FnOnce(&mut State) -> Result<T, E> + Send + 'static,
    ) -> Result<T, E> {
        self.call_unsettled(job).await?
    }

    async fn call_as<R: Send + 'static>(
        &self,
        kind: fn(Operation) -> Job,
        job: impl FnOnce(&mut State) -> R + Send + 'static,
    ) -> Result<R, Stopped> {
        let (tx, rx) = oneshot::channel();
        let job = kind(Box::new(move |state: &mut State| {
            let out = job(state);
            let _ = tx.send((out, state.take_durable()));
        }));
        self.shared.jobs.send(job).await.map_err(|_| Stopped)?;
        let (out, ticket) = rx.await.map_err(|_| Stopped)?;
        if let Some(ticket) = ticket {
            self.shared
                .commit
                .durable(ticket)
                .await
                .map_err(|_| Stopped)?;
        }
        Ok(out)
    }

    /// [`call`](Self::call) for jobs that can fail: the thread being gone is one more way to fail.
    async fn run<T: Send + 'static, E: From<Stopped> + Send + 'static>(
        &self,
        job: impl FnOnce(&mut State) -> Result<T, E> + Send + 'static,
    ) -> Result<T, E> {
        self.call(job).await?
    }

    /// Hands `job` to the core's thread without waiting for it, from code that cannot wait (a `Drop`).
    fn fire(&self, job: impl FnOnce(&mut State) + Send + 'static) {
        let job = Job::Call(Box::new(move |state: &mut State| {
            job(state);
            // A fire-and-forget job's writes need no flush of their own: the next flush covers them.
            state.take_durable();
        }));
        match self.shared.jobs.try_send(job) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(job)) => {
                // The queue is full for a moment: wait for room on the runtime rather than lose the job (it
                // ends a session, or removes a request nobody waits for).
                // The waiting task holds a weak sender, so it never keeps the core alive past its last handle.
                if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                    let jobs = self.shared.jobs.downgrade();
                    runtime.spawn(async move {
                        if let Some(jobs) = jobs.upgrade() {
                            let _ = jobs.send(job).await;
                        }
                    });
                }
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }

    /// Hands a job to the core's thread and waits for it to be taken in (not done).
    async fn send(&self, job: Job) -> Result<(), Stopped> {
        self.shared.jobs.send(job).await.map_err(|_| Stopped)
    }
}

/// Whether `id` looks like a Discord user id (a snowflake: up to 20 digits). Checked wherever a user id comes
/// from outside (the admin socket, a share's grantee) before anything is stored under it.
pub(crate) fn is_user_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 20 && id.bytes().all(|b| b.is_ascii_digit())
}

/// "3 minutes", "2 hours": for messages people read.
pub fn human_duration(secs: u64) -> String {
    match secs {
        1 => "1 second".to_string(),
        0..=89 => format!("{secs} seconds"),
        90..=5399 => format!("{} minutes", (secs + 30) / 60),
        5400..=129_599 => format!("{} hours", (secs + 1800) / 3600),
        _ => format!("{} days", (secs + 43_200) / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sled::SledStore;

    /// A single relay's core on sled in `dir`, for the core's own tests.
    pub(super) fn core(dir: &std::path::Path) -> Core {
        core_with(dir, CoreConfig::default())
    }

    pub(super) fn core_with(dir: &std::path::Path, config: CoreConfig) -> Core {
        let store: SharedStore = Arc::new(SledStore::open(dir).unwrap());
        let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
        Core::start(store, key, config, Default::default(), None).unwrap()
    }

    /// The core's thread stops with the last handle, and the store is closed with it: the same directory opens
    /// again at once (a relay restarted in place).
    #[tokio::test]
    async fn the_last_handle_stops_the_thread_and_closes_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let core = core(dir.path());
        let other = core.clone();
        assert_eq!(other.online().await, 0);
        drop(other);
        drop(core);
        SledStore::open(dir.path()).expect("the store was closed");
    }
}
