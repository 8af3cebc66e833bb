//! Leadership: which node of a cluster of relays runs the Discord gateway and posts in task threads.
//!
//! Every node runs the bot, and every node answers HTTP interactions (Discord sends each to whichever node
//! the load balancer picks; the answer goes to that interaction's own webhook). Two things must be done by
//! one node only:
//! - the gateway connection: two sessions of one bot each receive every interaction and would handle it
//!   twice (a `/task` submitted twice);
//! - posting a task's events in its thread: two followers post everything twice.
//!
//! So one node, the **leader**, holds a lease in the shared store ([`crate::Backend::lease`]) and runs the gateway
//! (in gateway mode) and every thread follower. That also keeps Discord's rate limits for the cluster as a
//! whole: the per-route and global limits are the bot token's, and every call made with the bot token comes
//! from the leader's one REST client ([`crate::Rest`], which makes one call at a time per route and paces
//! them by the `X-RateLimit-*` headers). Other nodes only answer the interactions they receive, through
//! each interaction's own token and webhook (their own buckets, outside the global limit). The one exception
//! is rare: reading a channel to recognise an old task thread the backend keeps no chain for.
//!
//! So a node that does not lead does not open the thread of a task submitted through it either: it writes
//! the task's [`ThreadMark`] with no thread and what the opening needs (`opening`), and waits a few seconds
//! for the leader to open it, to answer "Started … in #thread" ([`crate::dispatch`]). The leader adopts
//! every mark it does not follow yet when it becomes leader, and then every [`LeaseTimes::scan`] (a read of
//! the marks of unfinished threads): it opens the threads asked for and follows them. The asking node also
//! wakes the leader's scan at once ([`crate::Backend::wake_leader`]; a relay passes it on over the cluster
//! bus to every node's [`Bot::scan_now`](crate::Bot::scan_now)), so such a `/task` answers in about the
//! time the thread takes to open; a wake-up lost on the way costs at most the scan period (2 s), while
//! Discord shows "thinking…". If the leader cannot
//! open the thread, it stops the task and says why in the mark, and the asking node passes that on. With no
//! leader for longer than the wait (a hand-over), the answer says the thread opens in a moment, and the next
//! leader opens it.
//!
//! A thread's chain and `/cc` settings ([`crate::backend::ThreadChain`]) and AskUserQuestion answers are kept
//! by the backend, not in a node's memory, since any node answers a thread's commands.
//!
//! A term of leadership (`Term`) owns its followers. It ends when a renewal is refused, when no renewal
//! succeeded in time (the store unreachable: the term's watchdog ends it `grace` before the lease could
//! lapse, measured from when the last granted renewal was asked for, less a margin), or when the node shuts
//! down (then the lease is released, so a survivor takes over at its next renewal, within
//! [`LeaseTimes::renew`], instead of after the TTL). Followers are stopped cleanly first — each finishes the
//! event in hand and saves its mark — and then, after [`LeaseTimes::grace`], dropped where they stand.
//! The next leader carries on from the marks, so a hand-over posts nothing twice. A watchdog in each term
//! stops its followers before the lease can have expired even if this loop is stuck (a renewal that hangs,
//! a slow gateway connect), so two nodes never post at once.
//!
//! A relay of one runs the same loop: the lease in its own store is always its own.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::app::{Bot, Handler, Inner};
use crate::backend::ThreadMark;
use crate::commands;
use crate::config::Delivery;
use crate::gateway::{self, GatewayHandle};
use crate::thread::{FollowerStop, ThreadInfo};

/// The timings of leadership. The defaults suit production; tests shorten them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseTimes {
    /// How long a granted lease lasts: how long a dead leader's lease blocks the others.
    pub ttl: Duration,
    /// How often the lease is renewed (and, by other nodes, asked for): how soon a survivor takes over a
    /// lease released at shutdown. Also the most a renewal may take.
    pub renew: Duration,
    /// How often the leader looks for marks it does not follow yet (threads opened by other nodes).
    pub scan: Duration,
    /// How long followers have to stop cleanly before they are dropped.
    pub grace: Duration,
}

impl Default for LeaseTimes {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(10),
            renew: Duration::from_secs(2),
            scan: Duration::from_secs(2),
            grace: Duration::from_secs(2),
        }
    }
}

impl LeaseTimes {
    /// Kept off the end of a lease: for the store's clock running ahead of ours, and for the last
    /// follower's request in flight.
    fn margin(&self) -> Duration {
        self.ttl / 10
    }

    /// Until when a lease asked for at `asked` is surely ours: the backend granted it after we asked, so
    /// by its clock it lasts at least until `asked + ttl`.
    fn held_until(&self, asked: Instant) -> Instant {
        asked + self.ttl.saturating_sub(self.margin())
    }
}

/// One term of leadership: the followers it runs and when they must stop.
#[derive(Debug)]
pub(crate) struct Term {
    pub stop: FollowerStop,
    pub tracker: TaskTracker,
    /// Until when the lease is surely held, moved on by each renewal; `None`: for good (a bot on its own,
    /// started with [`Bot::connect`]).
    held_until: Option<watch::Sender<Instant>>,
}

impl Term {
    /// Whether the term is over (ended, or its lease may have lapsed): nothing new starts in it.
    fn over(&self) -> bool {
        self.stop.soft.is_cancelled()
    }

    fn renewed(&self, until: Instant) {
        if let Some(held) = &self.held_until {
            held.send_replace(until);
        }
    }
}

impl Inner {
    /// The term in force, if this node leads (and the term is not ending).
    pub(crate) fn term(&self) -> Option<Arc<Term>> {
        self.term
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .filter(|t| !t.over())
    }

    /// Fires when the current term is over (ended, or stopped by its watchdog); `None` without a term.
    fn term_over(&self) -> Option<CancellationToken> {
        self.term
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|t| t.stop.soft.clone())
    }

    fn has_term(&self) -> bool {
        self.term
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// Starts a term: followers may start in it from now on. With `held_until`, a watchdog stops them before
    /// the lease can have expired unless [`Term::renewed`] moves it on.
    pub(crate) fn begin_term(
        self: &Arc<Self>,
        held_until: Option<Instant>,
        times: LeaseTimes,
    ) -> Arc<Term> {
        let term = Arc::new(Term {
            stop: FollowerStop {
                soft: self.stop.child_token(),
                hard: self.stop.child_token(),
            },
            tracker: TaskTracker::new(),
            held_until: held_until.map(|t| watch::channel(t).0),
        });
        if let Some(held) = &term.held_until {
            term.tracker
                .spawn(watchdog(held.subscribe(), term.stop.clone(), times.grace));
        }
        let inner = self.clone();
        let stop = term.stop.soft.clone();
        term.tracker.spawn(async move {
            let mut tick = tokio::time::interval_at(Instant::now() + times.scan, times.scan);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = tick.tick() => {}
                    () = inner.scan_now.notified() => {}
                }
                inner.adopt_marks().await;
            }
        });
        *self.term.lock().unwrap_or_else(|p| p.into_inner()) = Some(term.clone());
        term
    }

    /// Ends the term: followers stop cleanly (each saves its mark), and after `grace` are dropped.
    pub(crate) async fn end_term(&self, grace: Duration) {
        let Some(term) = self.term.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            return;
        };
        term.stop.soft.cancel();
        term.tracker.close();
        if tokio::time::timeout(grace, term.tracker.wait())
            .await
            .is_err()
        {
            warn!(
                followers = self.threads.followed(),
                "followers did not stop within {grace:?}; dropping them"
            );
        }
        term.stop.hard.cancel();
        term.tracker.wait().await;
    }

    /// Follows every thread whose mark says it is unfinished and that nobody follows here yet: at the start of
    /// a term (threads a restart or the previous leader left), then at each scan (threads other nodes opened).
    pub(crate) async fn adopt_marks(self: &Arc<Self>) {
        if self.config.token.is_none() || self.term().is_none() {
            return;
        }
        let mut marks = match self.backend.thread_marks().await {
            Ok(marks) => marks,
            Err(err) => {
                warn!(%err, "cannot read which threads need a follower; trying again at the next scan");
                return;
            }
        };
        // Oldest first, so a thread's newest task is the one it remembers.
        marks.sort_by_key(|(_, task)| task.created_at);
        for (mut mark, task) in marks {
            if self.threads.is_followed(&task.id) {
                continue;
            }
            let Some(thread) =
                std::num::NonZeroU64::new(mark.thread).map(serenity::all::ChannelId::from)
            else {
                // A thread another node left to the leader to open (or one that could not be opened).
                if let Some(opening) = mark.opening.as_mut().filter(|o| o.failed.is_none()) {
                    debug!(task = %task.id, "opening a thread for another node");
                    if let Err(why) = self.open_or_stop(opening, &task, mark.upload_limit).await {
                        opening.failed = Some(why);
                        if let Err(err) = self.backend.mark_thread(&mark).await {
                            warn!(%err, task = %task.id, "could not say why the thread did not open");
                        }
                    }
                }
                continue;
            };
            // What `/cc` set for the thread is the backend's (`ThreadChain`); only the remembered task moves on.
            if self
                .threads
                .update(thread, |info| info.task = task.id.clone())
                .is_none()
            {
                self.threads
                    .insert(ThreadInfo::new(thread, &task, mark.upload_limit));
            }
            debug!(task = %task.id, posted = mark.posted, "adopting a thread from its mark");
            let limit = mark.upload_limit;
            self.spawn_follower(thread, task, limit, Some(mark));
        }
    }

    /// The mark a new thread starts with: nothing posted yet. Written before anyone follows it, so that if
    /// this node does not lead (or stops leading in the meantime) the leader finds the thread.
    pub(crate) fn fresh_mark(task: &str, thread: u64, upload_limit: u64) -> ThreadMark {
        ThreadMark {
            task: task.to_string(),
            thread,
            progress: None,
            posted: 0,
            upload_limit,
            approvals: Default::default(),
            turn: None,
            opening: None,
        }
    }
}

/// Stops a term's followers before its lease can have expired: cleanly `grace` before, and for good at the
/// end. Each renewal moves the end on.
async fn watchdog(mut held: watch::Receiver<Instant>, stop: FollowerStop, grace: Duration) {
    loop {
        let until = *held.borrow_and_update();
        let soft_at = until.checked_sub(grace).unwrap_or(until);
        tokio::select! {
            () = stop.soft.cancelled() => break,
            changed = held.changed() => if changed.is_err() { break },
            () = tokio::time::sleep_until(soft_at) => {
                warn!("the Discord lease was not renewed in time: this node stops posting");
                stop.soft.cancel();
                break;
            }
        }
    }
    let until = *held.borrow();
    tokio::select! {
        () = stop.hard.cancelled() => {}
        () = tokio::time::sleep_until(until) => stop.hard.cancel(),
    }
}

/// Gateway reconnects after a failure wait this long at first, doubling up to [`GATEWAY_RETRY_MAX`].
const GATEWAY_RETRY: Duration = Duration::from_secs(2);
const GATEWAY_RETRY_MAX: Duration = Duration::from_secs(60);

/// What the leadership loop holds between renewals.
struct Leading {
    gateway: Option<GatewayHandle>,
    /// When to try the gateway (or the commands' registration in HTTP mode) again, and the wait after that.
    retry_at: Instant,
    retry_wait: Duration,
    /// HTTP mode: the commands are registered (once per term, like the gateway's on READY).
    registered: bool,
}

impl Bot {
    /// Runs the bot as one node of a cluster until `shutdown`: takes the Discord lease when it is free and
    /// then runs the gateway (in gateway mode) and every thread follower; steps down when the lease is lost;
    /// at shutdown stops everything and releases the lease. HTTP interactions are answered through
    /// [`Bot::handle_http`] whether or not this node leads. Then call [`Bot::shutdown`].
    pub async fn lead(&self, shutdown: CancellationToken) {
        self.lead_with(shutdown, LeaseTimes::default()).await;
    }

    /// [`Bot::lead`] with other timings (tests).
    pub async fn lead_with(&self, shutdown: CancellationToken, times: LeaseTimes) {
        let node = self.inner.config.node.clone();
        let mut leading: Option<Leading> = None;
        let mut tick = tokio::time::interval(times.renew);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // The watchdog ends a term whose lease was not renewed in time: the gateway closes then too.
            let term_over = self.inner.term_over();
            tokio::select! {
                () = shutdown.cancelled() => break,
                _ = tick.tick() => {}
                () = async { match &term_over { Some(over) => over.cancelled().await, None => std::future::pending().await } } => {
                    info!(node = %node, "the Discord lease was not renewed in time: no longer leading");
                    self.step_down(&mut leading, times).await;
                    continue;
                }
            }
            let asked = Instant::now();
            // `None`: no answer (the store is unreachable, or slow). A leader keeps leading through that
            // while its lease surely holds — the watchdog ends the term otherwise — so a passing hiccup does
            // not stop and restart every follower.
            let granted =
                match tokio::time::timeout(times.renew, self.inner.backend.lease(&node, times.ttl))
                    .await
                {
                    Ok(Ok(granted)) => Some(granted),
                    Ok(Err(err)) => {
                        warn!(%err, "cannot take or renew the Discord lease");
                        None
                    }
                    Err(_) => {
                        warn!(
                            "taking or renewing the Discord lease took longer than {:?}",
                            times.renew
                        );
                        None
                    }
                };
            match (self.inner.term(), granted) {
                (Some(term), Some(true)) => {
                    term.renewed(times.held_until(asked));
                    if let Some(l) = &mut leading {
                        self.keep_connected(l, times).await;
                    }
                }
                (Some(_), None) => {}
                (_, granted) => {
                    // Lost to another node, or a term already over: close what is left of it first.
                    if self.inner.has_term() {
                        info!(node = %node, "no longer leading the Discord bot");
                        self.step_down(&mut leading, times).await;
                    }
                    if granted == Some(true) {
                        info!(node = %node, "leading the Discord bot: gateway and thread followers run here");
                        self.inner.begin_term(Some(times.held_until(asked)), times);
                        // Before the gateway: a message in a thread must find its follower adopted, not start
                        // one from scratch.
                        self.inner.adopt_marks().await;
                        let mut l = Leading {
                            gateway: None,
                            retry_at: Instant::now(),
                            retry_wait: GATEWAY_RETRY,
                            registered: false,
                        };
                        self.keep_connected(&mut l, times).await;
                        leading = Some(l);
                    }
                }
            }
        }
        if leading.is_some() || self.inner.has_term() {
            self.step_down(&mut leading, times).await;
        }
        // Released only once nothing of this node posts any more; a survivor takes over at its next renewal.
        match tokio::time::timeout(times.renew, self.inner.backend.release_lease(&node)).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => {
                warn!(%err, "could not release the Discord lease; it expires by itself")
            }
            Err(_) => warn!("releasing the Discord lease timed out; it expires by itself"),
        }
    }

    /// Whether this node leads now (runs the gateway and the followers).
    pub fn leading(&self) -> bool {
        self.inner.term().is_some()
    }

    /// Threads this node follows now.
    pub fn followed(&self) -> usize {
        self.inner.threads.followed()
    }

    /// The leader's connection to Discord: the gateway in gateway mode, the commands' registration in HTTP
    /// mode; tried again with a growing wait after a failure. Each attempt is bounded by the renewal period,
    /// so the lease is renewed on time.
    async fn keep_connected(&self, l: &mut Leading, times: LeaseTimes) {
        let done = match self.inner.config.delivery {
            Delivery::Gateway => l.gateway.is_some(),
            Delivery::Http { .. } => l.registered,
        };
        if done || Instant::now() < l.retry_at {
            return;
        }
        let attempt = async {
            match self.inner.config.delivery {
                Delivery::Gateway => {
                    let handler = Handler { bot: self.clone() };
                    l.gateway = Some(
                        gateway::connect(&self.inner.config, self.inner.rest.clone(), handler)
                            .await?,
                    );
                }
                Delivery::Http { .. } => {
                    info!("{}", self.inner.config.describe());
                    if self.inner.config.token.is_some() {
                        commands::register(&self.inner.rest, self.inner.config.guild_id).await?;
                    } else {
                        warn!("no DISCORD_TOKEN: commands are not registered and tasks cannot open threads");
                    }
                    l.registered = true;
                }
            }
            anyhow::Ok(())
        };
        let failed = match tokio::time::timeout(times.renew, attempt).await {
            Ok(Ok(())) => return,
            Ok(Err(err)) => format!("{err:#}"),
            Err(_) => format!("no answer within {:?}", times.renew),
        };
        error!(error = %failed, retry_in = ?l.retry_wait, "the Discord bot could not connect; followers still post over REST");
        l.retry_at = Instant::now() + l.retry_wait;
        l.retry_wait = (l.retry_wait * 2).min(GATEWAY_RETRY_MAX);
    }

    /// Ends this node's term: the gateway closes and the followers stop (cleanly, then for good), both within
    /// the grace.
    async fn step_down(&self, leading: &mut Option<Leading>, times: LeaseTimes) {
        let gateway = leading.take().and_then(|l| l.gateway);
        let close = async {
            if let Some(gateway) = gateway {
                // Dropping the handle on timeout stops the client without waiting for it.
                let _ = tokio::time::timeout(times.grace, gateway.shutdown()).await;
            }
        };
        tokio::join!(close, self.inner.end_term(times.grace));
    }
}
