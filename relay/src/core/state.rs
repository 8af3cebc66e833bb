//! The core's state and the thread that owns it: every job from a [`Core`](super::Core) handle runs here, one
//! at a time, in arrival order. See the module docs of [`crate::core`] for why.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ct_protocol::message::CloseReason;
use ct_protocol::task::TaskEvent;
use ct_protocol::{Fingerprint, RelayMessage, Transport};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::{broadcast, mpsc};

use super::config::CoreConfig;
use super::events::EventsJob;
use super::projects::PendingRequest;
use super::writers::Writers;
use crate::cluster::Publisher;
use crate::durable::{GroupCommit, Ticket};
use crate::metrics::Metrics;
use crate::ratelimit::RateLimiter;
use crate::store::{SharedStore, Store};

/// Event jobs written together at most: bounds one store operation, and the time other jobs wait behind it.
const MAX_EVENT_BATCH: usize = 64;

/// An operation on the state, which replies through whatever it captured.
pub(crate) type Operation = Box<dyn FnOnce(&mut State) + Send>;

/// Work for the core's thread.
pub(crate) enum Job {
    /// Any operation. The event writes in flight are settled first (see [`super::writers`]).
    Call(Operation),
    /// An operation that reads and writes no record an event write in flight could change (a session's
    /// admission, a submission's decision, a dispatch of queued tasks): runs without waiting for those
    /// writes. In a cluster, with PostgreSQL a round trip away, that wait was most of the core's thread's
    /// time under load (the `settle` part of `ct_relay_core_busy_seconds`), ahead of every submission.
    Unsettled(Operation),
    /// A session's burst of task events. Consecutive ones are written together (see [`super::events`]).
    Events(EventsJob),
    /// A writer finished a write (see [`super::writers`]): its follow-up is waiting.
    Wake,
}

/// A message for an agent's session to write, once `after` (if any) is durable: a task start must not reach
/// the agent before the record saying it was sent is on disk, or a crash could send it twice.
#[derive(Debug)]
pub struct Outbound {
    pub after: Option<Ticket>,
    pub msg: RelayMessage,
    /// Files attached to `msg` (a task start or input), written just before it (see [`super::files`]).
    pub parts: Vec<ct_protocol::files::FilePart>,
}

/// One live session in the live table.
#[derive(Debug)]
pub(crate) struct LiveAgent {
    pub(crate) session: u64,
    /// The presence epoch this session claimed: what dispatching under it checks (see
    /// [`Store::dispatch_task`](crate::store::Store::dispatch_task)).
    pub(crate) epoch: u64,
    pub(crate) transport: Transport,
    pub(crate) since: u64,
    pub(crate) peer: SocketAddr,
    pub(crate) close: mpsc::Sender<CloseReason>,
    /// Messages for the agent (task starts, decisions, requests), written by its session in order.
    pub(crate) outbound: mpsc::Sender<Outbound>,
    /// Whether this session's `Running` report was reconciled. Until then, the tasks sent during this
    /// session are remembered in `dispatched_here`: the report was written before the agent saw them, so
    /// their absence from it does not mean they were lost.
    pub(crate) reconciled: bool,
    pub(crate) dispatched_here: HashSet<String>,
    /// A task start could not be queued for this session (its outbound queue was full); retried on the next
    /// heartbeat so the task does not wait for an unrelated event. Shared with the session's guard, which
    /// asks it at each heartbeat without a job on this thread.
    pub(crate) retry: Arc<AtomicBool>,
    /// The records of this session's running tasks as this node last wrote them (and their JSON), so the next
    /// burst of a task's events is checked without reading its record back: on PostgreSQL that read was a
    /// round trip on the core's thread per task per burst. Every other write of such a record on this node
    /// drops its entry (`State::forget_written`), and the next write is conditional on the stored record
    /// still being this one (`Store::append_event_runs_expecting`), so a record another node wrote meanwhile
    /// (it revoked the agent and ended its tasks, or the agent moved to it) is never written over; a new
    /// session starts empty. At most [`MAX_WRITTEN`] entries; a task leaves when it ends.
    pub(crate) written: HashMap<String, (crate::store::TaskRecord, Vec<u8>)>,
    /// The agent's owner, as the session's admission read it. An agent's owner never changes, and a revoked
    /// agent's session is closed, so dispatching checks shares against this rather than reading the agent's
    /// record again for every task: on PostgreSQL that read was a round trip on the core's thread per
    /// dispatch.
    pub(crate) owner: String,
}

/// Running tasks' records one session keeps (see [`LiveAgent::written`]): more than an agent runs at once.
pub(crate) const MAX_WRITTEN: usize = 64;

/// Everything the core changes, owned by its thread.
#[derive(Debug)]
pub(crate) struct State {
    pub(crate) store: SharedStore,
    commit: Arc<GroupCommit>,
    pub(crate) config: Arc<CoreConfig>,
    pub(crate) metrics: Arc<Metrics>,
    /// The relay key's fingerprint, put into pairing tokens.
    pub(crate) relay: Fingerprint,
    pub(crate) live: HashMap<Fingerprint, LiveAgent>,
    pub(crate) next_session: u64,
    pub(crate) pair_limit: RateLimiter,
    /// Tasks started per user; see [`CoreConfig::tasks_per_minute`].
    pub(crate) task_limit: RateLimiter<String>,
    /// Project reports per agent; see [`CoreConfig::project_reports_per_minute`].
    pub(crate) report_limit: RateLimiter<Fingerprint>,
    /// At most one warning a minute per agent whose reports are being dropped.
    pub(crate) report_warnings: RateLimiter<Fingerprint>,
    /// Live followers of each task (admin `task`, the Discord bot).
    pub(crate) followers: HashMap<String, broadcast::Sender<(u64, TaskEvent)>>,
    /// The last event sequence number passed to each task's followers here.
    pub(crate) follower_seq: HashMap<String, u64>,
    /// Requests waiting for an agent's answer, by request id.
    pub(crate) pending: HashMap<u64, PendingRequest>,
    pub(crate) next_request: u64,
    /// Set when the running job wrote something that must be durable before its caller hears back.
    durable: Option<Ticket>,
    /// The cluster bus, when this relay is one node of several (see [`super::remote`]).
    pub(crate) bus: Option<Publisher>,
    /// This node's watches of followed tasks, to wake one when its followers wait for it (`publish`).
    pub(crate) watches: super::remote::Watches,
    /// In a cluster, the thread for writes no decision waits for (see [`super::books`]).
    pub(crate) books: Option<super::books::Books>,
    /// In a cluster, the threads that write task events (see [`super::writers`]).
    pub(crate) writers: Option<Writers>,
    /// Nodes whose heartbeat is recent, this one included (refreshed by [`super::nodes`]).
    pub(crate) alive_nodes: HashSet<String>,
    /// Every live node's public addresses, this node's first: what pairing tokens carry.
    pub(crate) cluster_addrs: Vec<String>,
}

impl State {
    /// The state, with the threads it owns: in a cluster (the bus, and the node's watches of followed tasks)
    /// the bookkeeping thread, and the event writers when the config asks for them (`wake` is how they reach
    /// the core's thread). Fails only if the system refuses a thread.
    pub(crate) fn new(
        store: SharedStore,
        commit: Arc<GroupCommit>,
        config: Arc<CoreConfig>,
        metrics: Arc<Metrics>,
        relay: Fingerprint,
        cluster: Option<(Publisher, super::remote::Watches)>,
        wake: mpsc::WeakSender<Job>,
    ) -> std::io::Result<Self> {
        let (bus, watches) = match cluster {
            Some((bus, watches)) => (Some(bus), watches),
            None => (None, Default::default()),
        };
        Ok(Self {
            books: bus
                .as_ref()
                .map(|_| super::books::Books::start(store.clone()))
                .transpose()?,
            writers: (config.event_writers > 0)
                .then(|| Writers::start(store.clone(), commit.clone(), config.event_writers, wake))
                .transpose()?,
            alive_nodes: HashSet::from([config.node_id.clone()]),
            cluster_addrs: config.public_addrs.clone(),
            bus,
            watches,
            pair_limit: RateLimiter::new(
                config.pair_burst,
                config.pair_refill,
                config.rate_limit_keys,
            ),
            task_limit: RateLimiter::new(
                config.task_burst,
                Duration::from_secs(60) / config.tasks_per_minute.max(1),
                config.rate_limit_keys,
            ),
            report_limit: RateLimiter::new(
                config.project_reports_per_minute,
                Duration::from_secs(60) / config.project_reports_per_minute.max(1),
                config.rate_limit_keys,
            ),
            report_warnings: RateLimiter::new(1, Duration::from_secs(60), config.rate_limit_keys),
            store,
            commit,
            config,
            metrics,
            relay,
            live: HashMap::new(),
            next_session: 1,
            followers: HashMap::new(),
            follower_seq: HashMap::new(),
            pending: HashMap::new(),
            next_request: 1,
            durable: None,
        })
    }

    pub(crate) fn store(&self) -> &dyn Store {
        &*self.store
    }

    pub(crate) fn config(&self) -> &CoreConfig {
        &self.config
    }

    /// Marks the running job's writes so far as ones its caller must not hear of before they are durable.
    pub(crate) fn must_be_durable(&mut self) {
        self.durable = Some(self.commit.ticket());
    }

    /// A ticket for everything written so far, for a message that must wait for it (see [`Outbound`]).
    pub(crate) fn ticket(&self) -> Ticket {
        self.commit.ticket()
    }

    pub(crate) fn take_durable(&mut self) -> Option<Ticket> {
        self.durable.take()
    }

    /// The thread's loop: until every handle is gone. Consecutive event jobs are taken together.
    pub(crate) fn run(mut self, mut jobs: mpsc::Receiver<Job>) {
        let mut next = None;
        let busy = Busy::new(&self.metrics);
        loop {
            let job = match next.take() {
                Some(job) => job,
                None => match jobs.blocking_recv() {
                    Some(job) => job,
                    None => break,
                },
            };
            match job {
                Job::Wake => {}
                Job::Call(job) => {
                    // Sees the store and this state as if every event batch had been written in place.
                    let start = Instant::now();
                    self.settle();
                    let settled = Instant::now();
                    job(&mut self);
                    busy.settle.inc_by((settled - start).as_secs_f64());
                    busy.jobs.inc_by(settled.elapsed().as_secs_f64());
                }
                Job::Unsettled(job) => {
                    let start = Instant::now();
                    job(&mut self);
                    busy.jobs.inc_by(start.elapsed().as_secs_f64());
                }
                Job::Events(first) => {
                    let start = Instant::now();
                    // While every writer is busy, the jobs that come in meanwhile join this batch.
                    self.wait_for_writer();
                    let waited = Instant::now();
                    busy.writers.inc_by((waited - start).as_secs_f64());
                    let mut batch = vec![first];
                    while batch.len() < MAX_EVENT_BATCH {
                        match jobs.try_recv() {
                            Ok(Job::Events(more)) => batch.push(more),
                            Ok(Job::Wake) => {}
                            Ok(other) => {
                                next = Some(other);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    // A task is in one batch in flight at most, so its writes reach the store in order.
                    if self.writers.as_ref().is_some_and(|w| {
                        batch
                            .iter()
                            .flat_map(|job| &job.runs)
                            .any(|(task, _)| w.holds(task))
                    }) {
                        self.settle();
                    }
                    self.record_batch(batch);
                    busy.events.inc_by(waited.elapsed().as_secs_f64());
                }
            }
            self.collect_written();
        }
        self.settle();
        tracing::debug!("the core's thread stops: every handle is gone");
    }

    /// Runs the follow-ups of writes that are done, without waiting for any.
    fn collect_written(&mut self) {
        while let Some(followup) = self.writers.as_mut().and_then(|w| w.done(false)) {
            followup(self);
        }
    }

    /// Waits for every write in flight and runs its follow-up.
    fn settle(&mut self) {
        while let Some(followup) = self.writers.as_mut().and_then(|w| w.done(true)) {
            followup(self);
        }
    }

    /// Waits until a writer is free, running the follow-ups of those that finish.
    fn wait_for_writer(&mut self) {
        while self.writers.as_ref().is_some_and(Writers::busy) {
            match self.writers.as_mut().and_then(|w| w.done(true)) {
                Some(followup) => followup(self),
                None => break,
            }
        }
    }
}

/// The core thread's busy-time counters (see [`Metrics::core_busy`]).
struct Busy {
    jobs: Counter<f64, AtomicU64>,
    events: Counter<f64, AtomicU64>,
    settle: Counter<f64, AtomicU64>,
    writers: Counter<f64, AtomicU64>,
}

impl Busy {
    fn new(metrics: &Metrics) -> Self {
        Self {
            jobs: metrics.core_busy("jobs"),
            events: metrics.core_busy("events"),
            settle: metrics.core_busy("settle"),
            writers: metrics.core_busy("writers"),
        }
    }
}
