//! Reaching an agent held by another node of the cluster, and being that node.
//!
//! Every node uses the shared store, so deciding (who may do what, which task goes next) happens on whichever
//! node is asked. Only what must go down an agent's session crosses to the node holding it, over
//! `ct.agent.<fingerprint>` (see [`crate::cluster`]):
//!
//! - [`NodeMsg::Claimed`]: a newer session took the agent; an older one anywhere closes (`Replaced`).
//! - [`NodeMsg::Kick`]: the agent has queued work; its node dispatches what fits. Dispatch itself is the
//!   store's compare-and-swap under the session's epoch, so a task goes out once even if two nodes try.
//! - [`NodeMsg::Deliver`]: a cancel, a decision or a follow-up to write to the agent (audited already, by
//!   the node that decided it).
//! - [`NodeMsg::Close`]: the agent was revoked.
//! - [`NodeMsg::Ask`]: a project request; the holding node asks its agent and the answer is the reply.
//!
//! Each message names the epoch it is for where that matters, and the holding node acts only for the session
//! it holds now. A message that finds no node is not an error on its own: the task stays queued for whichever
//! node the agent connects to next, and the presence record says whether the agent is online at all.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use ct_protocol::message::CloseReason;
use ct_protocol::{Fingerprint, RelayMessage};
use futures_util::StreamExt as _;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::task::AbortOnDropHandle;

use super::projects::Answer;
use super::state::{Outbound, State};
use super::tasks::TaskError;
use super::Core;
use crate::cluster::{self, Bus, RequestError};
use crate::store::{AgentRecord, Presence, TaskRecord};

/// Project requests one holding node answers at once for one agent (each waits up to the project timeout).
const MAX_ASKS_IN_FLIGHT: usize = 8;

/// How long a node's heartbeat may be old before its presence records are not trusted to mean "online".
pub(crate) const NODE_STALE: Duration = Duration::from_secs(15);

/// What one node tells the node holding an agent.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub(crate) enum NodeMsg {
    Claimed { epoch: u64 },
    Kick,
    Deliver { msg: RelayMessage },
    Close { reason: CloseReason },
    Ask { msg: RelayMessage },
}

/// The reply to [`NodeMsg::Ask`].
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum AskReply {
    Answer(Answer),
    Refused(String),
}

/// Sets a request's id in the messages that carry one (the holding node numbers its own requests).
pub(crate) fn with_request_id(msg: RelayMessage, id: u64) -> RelayMessage {
    match msg {
        RelayMessage::Project { op, .. } => RelayMessage::Project { id, op },
        RelayMessage::Worktree {
            task,
            action,
            requester,
            ..
        } => RelayMessage::Worktree {
            id,
            task,
            action,
            requester,
        },
        other => other,
    }
}

impl State {
    /// Publishes `msg` to the node holding `agent`, if this relay is part of a cluster.
    pub(crate) fn tell_holder(&self, agent: &Fingerprint, msg: &NodeMsg) -> bool {
        let Some(bus) = &self.bus else {
            return false;
        };
        let subject = cluster::agent_subject(&agent.0);
        match serde_json::to_vec(msg) {
            Ok(payload) => bus.publish(subject, Bytes::from(payload)),
            Err(e) => {
                tracing::error!(error = %e, "could not encode a message for another node");
                false
            }
        }
    }

    /// Announces that `task` has events up to `seq`, for followers on other nodes.
    pub(crate) fn announce(&self, task: &str, seq: u64) {
        if let (Some(bus), Some(subject)) = (&self.bus, cluster::task_subject(task)) {
            bus.publish(subject, Bytes::from(seq.to_string()));
        }
    }

    /// Where `agent`'s live session is, when not here: another node whose heartbeat is recent and that is
    /// not draining. `None` without a cluster.
    pub(crate) fn held_elsewhere(&self, agent: &Fingerprint) -> Option<Presence> {
        if self.bus.is_none() || self.live.contains_key(agent) {
            return None;
        }
        match self.store().presence(agent) {
            Ok(Some(p)) if p.node != self.config.node_id && self.alive_nodes.contains(&p.node) => {
                Some(p)
            }
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(error = %e, "could not read an agent's presence");
                None
            }
        }
    }

    /// The epoch of the session this node holds for `agent`, if any.
    fn epoch_here(&self, agent: &Fingerprint) -> Option<u64> {
        self.live.get(agent).map(|l| l.epoch)
    }

    /// Another node queued a task for `agent`, held here at `epoch`: dispatch what fits. `open`: its open
    /// tasks, read ahead (see [`Core::open_tasks_ahead`]).
    fn kicked(&mut self, agent: &Fingerprint, epoch: u64, open: Option<Vec<TaskRecord>>) {
        if self.epoch_here(agent) != Some(epoch) {
            return;
        }
        if let Err(e) = self.dispatch_queued_from(agent, open) {
            tracing::error!(error = %e, "could not dispatch queued tasks");
        }
    }

    /// A message from another node for the session this node holds for `agent` at `epoch`.
    fn on_node_msg(&mut self, agent: &Fingerprint, epoch: u64, msg: NodeMsg) {
        if self.epoch_here(agent) != Some(epoch) {
            return;
        }
        match msg {
            NodeMsg::Claimed { epoch: newer } if newer > epoch => {
                if let Some(live) = self.live.remove(agent) {
                    let _ = live.close.try_send(CloseReason::Replaced);
                    tracing::info!(fingerprint = %agent, "agent connected to another node; this session closes");
                }
            }
            NodeMsg::Claimed { .. } => {}
            NodeMsg::Kick => self.kicked(agent, epoch, None),
            NodeMsg::Deliver { msg } => {
                // While a newer session of the agent (on another node) has not closed this one yet, both
                // receive the message: only the session whose epoch the store names passes it on, so a
                // follow-up is not written twice.
                match self.store().presence(agent) {
                    Ok(Some(p)) if p.epoch == epoch => {}
                    Ok(_) => return,
                    Err(e) => {
                        tracing::warn!(error = %e, "could not check an agent's presence; message passed on");
                    }
                }
                let sent = self.live.get(agent).is_some_and(|l| {
                    l.outbound
                        .try_send(Outbound {
                            after: None,
                            msg,
                            parts: Vec::new(),
                        })
                        .is_ok()
                });
                if !sent {
                    tracing::warn!(fingerprint = %agent, "a message from another node could not be passed on: the agent is not keeping up");
                }
            }
            NodeMsg::Close { reason } => {
                if let Some(live) = self.live.remove(agent) {
                    let _ = live.close.try_send(reason);
                }
            }
            // Answered by the handle (it waits for the agent), never sent here.
            NodeMsg::Ask { .. } => {}
        }
    }
}

/// How long a new session's subscription waits for NATS to confirm it (see [`Core::hold`]).
const SUBSCRIBE_WAIT: Duration = Duration::from_secs(2);

/// While a session lives on this node: the subscription to its agent's subject and the task serving it.
/// Dropping it ends both.
#[derive(Debug)]
pub(crate) struct Holding {
    _task: AbortOnDropHandle<()>,
}

impl Core {
    /// Subscribes to what other nodes send `agent`'s session at `epoch`, then tells them this session is
    /// the agent's newest. `None` without a cluster.
    pub(crate) async fn hold(&self, agent: Fingerprint, epoch: u64) -> Option<Holding> {
        let bus = self.shared.bus.clone()?;
        let subject = cluster::agent_subject(&agent.0);
        let mut sub = match bus.subscribe(subject).await {
            Ok(sub) => sub,
            Err(e) => {
                // The session still works for this node; others reach it once NATS is back and it reconnects.
                tracing::warn!(error = %e, "could not subscribe for an agent on the cluster bus");
                return None;
            }
        };
        // The session's registration reads the agent's record once this returns, to catch a revocation whose
        // notice came before the subscription (see `Core::register_session`); that needs NATS to have the
        // subscription by then. Without NATS it waits at most `SUBSCRIBE_WAIT`: the record is read anyway.
        bus.settled(SUBSCRIBE_WAIT).await;
        let core = self.clone();
        let task = tokio::spawn(async move {
            let mut asks = JoinSet::new();
            loop {
                let message = tokio::select! {
                    m = sub.next() => match m { Some(m) => m, None => break },
                    Some(_) = asks.join_next(), if !asks.is_empty() => continue,
                };
                let msg: NodeMsg = match serde_json::from_slice(&message.payload) {
                    Ok(msg) => msg,
                    Err(e) => {
                        tracing::warn!(error = %e, "unreadable message from another node; ignored");
                        continue;
                    }
                };
                match msg {
                    NodeMsg::Ask { msg } => {
                        let Some(reply_to) = message.reply else {
                            continue;
                        };
                        if asks.len() >= MAX_ASKS_IN_FLIGHT {
                            let refused = AskReply::Refused(
                                TaskError::TooManyRequests(agent.short()).to_string(),
                            );
                            bus.reply(reply_to, encode(&refused)).await;
                            continue;
                        }
                        let (core, bus) = (core.clone(), bus.clone());
                        asks.spawn(async move {
                            let reply = match core.ask_here(&agent, epoch, msg).await {
                                Ok(answer) => AskReply::Answer(answer),
                                Err(e) => AskReply::Refused(e.to_string()),
                            };
                            bus.reply(reply_to, encode(&reply)).await;
                        });
                    }
                    NodeMsg::Kick => {
                        let open = core.open_tasks_ahead(agent).await;
                        let _ = core
                            .call_unsettled(move |state| state.kicked(&agent, epoch, open))
                            .await;
                    }
                    other => {
                        let _ = core
                            .call(move |state| state.on_node_msg(&agent, epoch, other))
                            .await;
                    }
                }
            }
        });
        // Subscribed first, then announced: a message for the new session cannot fall in between.
        let _ = self
            .call_unsettled(move |state| state.tell_holder(&agent, &NodeMsg::Claimed { epoch }))
            .await;
        Some(Holding {
            _task: AbortOnDropHandle::new(task),
        })
    }

    /// A project request from another node, for the session held here at `epoch`.
    async fn ask_here(
        &self,
        agent: &Fingerprint,
        epoch: u64,
        msg: RelayMessage,
    ) -> Result<Answer, TaskError> {
        let agent = *agent;
        let rec = self
            .run(move |state| {
                if state.epoch_here(&agent) != Some(epoch) {
                    return Err(TaskError::AgentGone(agent.short()));
                }
                state
                    .store()
                    .agent(&agent)?
                    .ok_or_else(|| TaskError::AgentGone(agent.short()))
            })
            .await?;
        self.ask_agent(&rec, move |id| with_request_id(msg, id))
            .await
    }

    /// Asks the node holding `agent` to put `template` (its request id is set there) to the agent.
    pub(crate) async fn ask_elsewhere(
        &self,
        agent: &AgentRecord,
        template: RelayMessage,
    ) -> Result<Answer, TaskError> {
        let Some(bus) = self.shared.bus.clone() else {
            return Err(TaskError::AgentGone(agent.name.clone()));
        };
        let subject = cluster::agent_subject(&agent.fingerprint.0);
        let timeout = self.config().project_timeout + Duration::from_secs(1);
        let payload = encode(&NodeMsg::Ask { msg: template });
        match bus.request(subject, payload, timeout).await {
            Ok(bytes) => match serde_json::from_slice::<AskReply>(&bytes) {
                Ok(AskReply::Answer(answer)) => Ok(answer),
                Ok(AskReply::Refused(message)) => Err(TaskError::FromOtherNode(message)),
                Err(e) => {
                    tracing::warn!(error = %e, "unreadable answer from another node");
                    Err(TaskError::AgentGone(agent.name.clone()))
                }
            },
            Err(RequestError::NoResponders) => Err(TaskError::AgentGone(agent.name.clone())),
            Err(RequestError::TimedOut(_)) => Err(TaskError::NoAnswer {
                agent: agent.name.clone(),
                secs: timeout.as_secs(),
            }),
            Err(e @ RequestError::Unavailable(_)) => Err(TaskError::FromOtherNode(format!(
                "agent {} is connected to another relay node, which cannot be reached now ({e}): try again in \
                 a moment",
                agent.name
            ))),
        }
    }

    /// The bus, when this relay is a node of a cluster.
    pub fn bus(&self) -> Option<&Bus> {
        self.shared.bus.as_ref()
    }
}

/// How often a watch reads a followed task's log even without a notice: a lost notice costs at most this.
const WATCH_POLL: Duration = Duration::from_secs(2);

/// This node's watches of followed tasks (see [`Core::watch`]), shared by the core's handles and its thread.
#[derive(Debug, Default, Clone)]
pub(crate) struct Watches(Arc<Mutex<HashMap<String, Watch>>>);

#[derive(Debug)]
struct Watch {
    run: AbortOnDropHandle<()>,
    /// Makes the watch read the task's log now, as a notice would.
    wake: Arc<Notify>,
}

impl Watches {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Watch>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Has `task`'s watch read its log now (or as soon as it finishes the read in hand), if one runs.
    pub(crate) fn wake(&self, task: &str) {
        if let Some(watch) = self.lock().get(task) {
            watch.wake.notify_one();
        }
    }
}

impl Core {
    /// Makes sure this node's followers of `task` get the events other nodes store for it: a task watching
    /// `ct.task.<id>` (and the log every [`WATCH_POLL`]) until nobody here follows the task. No-op without a
    /// cluster, or when a watch runs already.
    pub(crate) fn watch(&self, task: &str) {
        let Some(bus) = self.shared.bus.clone() else {
            return;
        };
        let mut watches = self.shared.watches.lock();
        watches.retain(|_, w| !w.run.is_finished());
        if watches.contains_key(task) {
            return;
        }
        let (core, id) = (self.clone(), task.to_string());
        let wake = Arc::new(Notify::new());
        let woken = wake.clone();
        let handle = tokio::spawn(async move {
            let mut notices = match cluster::task_subject(&id) {
                Some(subject) => bus.subscribe(subject).await.ok(),
                None => None,
            };
            let mut poll = tokio::time::interval(WATCH_POLL);
            loop {
                tokio::select! {
                    Some(_) = async { notices.as_mut()?.next().await }, if notices.is_some() => {}
                    () = woken.notified() => {}
                    _ = poll.tick() => {}
                }
                // Both steps touch only this node's followers, ordered by sequence number (see `publish`),
                // so neither waits for this node's event writes: a watch wakes for every batch another node
                // writes, several times a task.
                let watched = id.clone();
                let Ok(Some(after)) = core
                    .call_unsettled(move |s| s.followed_up_to(&watched))
                    .await
                else {
                    break;
                };
                let watched = id.clone();
                let events = match core.read(move |s| s.events(&watched, after)).await {
                    Ok(Ok(events)) => events,
                    Ok(Err(e)) => {
                        tracing::warn!(task = %id, error = %e, "could not read a followed task's events");
                        continue;
                    }
                    Err(_) => break,
                };
                if !events.is_empty() {
                    let watched = id.clone();
                    let _ = core
                        .call_unsettled(move |s| s.publish_caught_up(&watched, events))
                        .await;
                }
            }
        });
        watches.insert(
            task.to_string(),
            Watch {
                run: AbortOnDropHandle::new(handle),
                wake,
            },
        );
    }
}

fn encode<T: Serialize>(value: &T) -> Bytes {
    // Our own enums of plain data: encoding cannot fail.
    Bytes::from(serde_json::to_vec(value).unwrap_or_default())
}
