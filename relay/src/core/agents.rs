//! Agents: the live table of sessions (one per agent key), what is shown about each agent, and revoking one.
//! The agent endpoint holds a [`SessionGuard`] while a session lives.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use ct_protocol::message::CloseReason;
use ct_protocol::{Fingerprint, Transport};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::state::{LiveAgent, Outbound, State};
use super::{Core, CoreError};
use crate::store::{now, AgentRecord, AuditEntry, AuditKind, Presence};

/// Messages waiting for one agent's session to write them. Bounded: a stuck agent cannot grow relay memory.
const OUTBOUND_QUEUE: usize = 256;

/// The longest software version kept for an agent (its own words, e.g. `0.1.0`).
const MAX_VERSION_CHARS: usize = 64;

/// What `agents` shows for one agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentView {
    pub owner: String,
    pub name: String,
    pub fingerprint: Fingerprint,
    pub online: bool,
    pub transport: Option<Transport>,
    /// Online since, or last seen, in Unix seconds.
    pub since: Option<u64>,
    pub peer: Option<String>,
    pub revoked: bool,
    /// The node holding its session, when it is online.
    #[serde(default)]
    pub node: Option<String>,
    /// The software version it last connected with.
    #[serde(default)]
    pub version: Option<String>,
}

impl Core {
    /// Records a live session; an older session with the same key is told it was replaced. The session lives
    /// as long as the returned guard. `owner`: the agent's owner, as [`admit`](Self::admit) read it.
    ///
    /// In a cluster the claim of the agent's presence (a write to PostgreSQL) is made on the blocking pool,
    /// not on the core's thread: a node's agents moving to the others all at once would otherwise queue every
    /// other decision on those nodes behind one round trip each. Once the session can hear other nodes, the
    /// agent's record is read again: a revocation that landed after the admission read it (on this node or
    /// another, whose notice this session could not hear yet) ends the session here.
    pub async fn register_session(
        &self,
        fp: Fingerprint,
        transport: Transport,
        peer: SocketAddr,
        software: &str,
        owner: String,
    ) -> Result<SessionGuard, CoreError> {
        // The agent says what it is; shown to its owner on the dashboard, so kept short and printable.
        let version: String = software
            .chars()
            .filter(|c| !c.is_control())
            .take(MAX_VERSION_CHARS)
            .collect();
        let claimed = match self.bus() {
            Some(_) => {
                let node = self.config().node_id.clone();
                Some(
                    self.read(move |store| store.claim_presence(&fp, &node))
                        .await??,
                )
            }
            None => None,
        };
        let (close, close_rx) = mpsc::channel(1);
        let (outbound, outbound_rx) = mpsc::channel(OUTBOUND_QUEUE);
        let retry = Arc::new(AtomicBool::new(false));
        let (session, epoch) = {
            let retry = retry.clone();
            let live = Live {
                link: (transport, version),
                peer,
                owner,
                close,
                outbound,
                retry,
            };
            // Touches the live table, not a task (a replaced session's batch in flight hands its record to the
            // new session's table when it lands: the record as this node last wrote it, which it is).
            self.run_unsettled(move |state| state.register_session(fp, live, claimed))
                .await?
        };
        self.metrics().agents(transport).inc();
        let mut guard = SessionGuard {
            core: self.clone(),
            fp,
            session,
            transport,
            close_rx,
            outbound_rx,
            retry,
            _holding: None,
        };
        guard._holding = self.hold(fp, epoch).await;
        if self.bus().is_some() {
            // Dropping the guard on the way out ends the session again.
            let read = self.read(move |store| store.agent(&fp)).await?;
            match read? {
                Some(rec) if rec.revoked_at.is_none() => {}
                _ => return Err(CoreError::Revoked(fp.short())),
            }
        }
        Ok(guard)
    }

    /// Finds one agent by fingerprint (or a unique prefix of it), or by name (`name` or `owner/name`).
    pub async fn find_agent(&self, query: &str) -> Result<AgentRecord, CoreError> {
        let query = query.to_string();
        self.run(move |state| state.find_agent(&query)).await
    }

    /// Refuses an agent's key from now on and ends its live session. Its unfinished tasks end as lost: the
    /// agent can never report on them again. `actor` is who did it, for the audit log: the owner's user id
    /// (the bot checks ownership first), or [`OPERATOR`](crate::audit::OPERATOR). The revocation and its audit
    /// entry are written together: if the entry cannot be written, nothing is revoked and the error says so.
    pub async fn revoke(&self, query: &str, actor: &str) -> Result<AgentRecord, CoreError> {
        let (query, actor) = (query.to_string(), actor.to_string());
        self.run(move |state| state.revoke(&query, &actor)).await
    }

    /// Every agent the relay knows, with its live state.
    pub async fn agents(&self) -> Result<Vec<AgentView>, CoreError> {
        self.run(|state| state.agents()).await
    }

    /// Closes every session here with "reconnect at once" (after the store lost writes in a crash).
    pub async fn reconnect_everyone(&self) {
        let _ = self
            .call(|state| {
                for (_, live) in state.live.drain() {
                    let _ = live.close.try_send(CloseReason::Shutdown);
                }
            })
            .await;
    }

    /// Live sessions right now.
    pub async fn online(&self) -> usize {
        self.call(|state| state.live.len()).await.unwrap_or(0)
    }
}

impl State {
    /// `claimed`: the presence a cluster's node claimed on the blocking pool; `None`, claimed here.
    pub(super) fn register_session(
        &mut self,
        fp: Fingerprint,
        live: Live,
        claimed: Option<Presence>,
    ) -> Result<(u64, u64), CoreError> {
        // The newest session wins everywhere: its epoch is greater than any other's, and dispatching checks
        // it, so a replaced session (here or on another node) can no longer take a task.
        let epoch = match claimed {
            Some(presence) => presence.epoch,
            None => self.store.claim_presence(&fp, &self.config.node_id)?.epoch,
        };
        let session = self.next_session;
        self.next_session += 1;
        let Live {
            link,
            peer,
            owner,
            close,
            outbound,
            retry,
        } = live;
        // Claims made off this thread can arrive here out of order (an agent that gave up on a slow handshake
        // and connected again): the newest claim wins here as it does in the store, and the older session is
        // the one replaced.
        if self.live.get(&fp).is_some_and(|l| l.epoch > epoch) {
            let _ = close.try_send(CloseReason::Replaced);
            return Ok((session, epoch));
        }
        let old = self.live.insert(
            fp,
            LiveAgent {
                session,
                epoch,
                transport: link.0,
                since: now(),
                peer,
                close,
                outbound,
                reconciled: false,
                dispatched_here: HashSet::new(),
                retry,
                written: HashMap::new(),
                owner,
            },
        );
        if let Some(old) = old {
            let _ = old.close.try_send(CloseReason::Replaced);
        }
        self.touch(&fp, Some(link));
        Ok((session, epoch))
    }

    /// A session ended: it leaves the live table (if it is still the current one for its key), the agent's
    /// last-seen time is recorded, and requests it was asked fail at once.
    fn session_ended(&mut self, fp: &Fingerprint, session: u64) {
        if let Some(live) = self.live.get(fp).filter(|l| l.session == session) {
            // Only this session's presence: a newer one (on any node) keeps its own, so the release can wait
            // for the bookkeeping thread in a cluster. Until it is made, other nodes take this node for the
            // agent's and queue its tasks, which its next node dispatches.
            let (fp, epoch) = (*fp, live.epoch);
            self.book(&fp, move |store| {
                if let Err(e) = store.release_presence(&fp, epoch) {
                    tracing::warn!(error = %e, "could not record that an agent's session ended");
                }
            });
            self.live.remove(&fp);
            self.touch(&fp, None);
        }
        self.drop_pending_requests(session);
    }

    /// Records when the agent was last seen: in place on a single relay, by the bookkeeping thread in a
    /// cluster (see [`super::books`]).
    fn touch(&self, fp: &Fingerprint, link: Option<(Transport, String)>) {
        let fp = *fp;
        let write = move |store: &dyn crate::store::Store| {
            let update = store.update_agent(&fp, &mut |rec| {
                rec.last_seen = Some(now());
                if let Some((transport, version)) = &link {
                    rec.last_transport = Some(*transport);
                    rec.last_version = Some(version.clone());
                }
            });
            if let Err(e) = update {
                tracing::warn!(error = %e, "could not record when an agent was last seen");
            }
        };
        self.book(&fp, write);
    }

    /// Makes a write no decision waits for: in place on a single relay, by the bookkeeping thread in a
    /// cluster (see [`super::books`]).
    fn book(
        &self,
        agent: &Fingerprint,
        write: impl FnOnce(&dyn crate::store::Store) + Send + 'static,
    ) {
        match &self.books {
            Some(books) => books.write(agent, write),
            None => write(&*self.store),
        }
    }

    pub(crate) fn find_agent(&self, query: &str) -> Result<AgentRecord, CoreError> {
        let all = self.store.agents()?;
        let q = query.trim();
        let matches: Vec<&AgentRecord> = all
            .iter()
            .filter(|a| {
                let fp = a.fingerprint.to_string();
                (q.len() >= 10 && fp.starts_with(q))
                    || fp == q
                    || a.name == q
                    || format!("{}/{}", a.owner, a.name) == q
            })
            .collect();
        match matches.as_slice() {
            [] => Err(CoreError::NoSuchAgent(q.to_string())),
            [one] => Ok((*one).clone()),
            many => Err(CoreError::Ambiguous {
                query: q.to_string(),
                names: many
                    .iter()
                    .map(|a| format!("{}/{}", a.owner, a.name))
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        }
    }

    fn revoke(&mut self, query: &str, actor: &str) -> Result<AgentRecord, CoreError> {
        let rec = self.find_agent(query)?;
        let rec = if rec.revoked_at.is_none() {
            let entry = AuditEntry::new(
                AuditKind::Revoked,
                actor,
                &rec.owner,
                format!("agent {} revoked", rec.name),
            )
            .on(&rec);
            let rec = self
                .store
                .revoke_agent_audited(&rec.fingerprint, now(), &entry)?
                .map_or(rec, |(r, _)| r);
            self.must_be_durable();
            rec
        } else {
            rec
        };
        if let Some(live) = self.live.remove(&rec.fingerprint) {
            let _ = live.close.try_send(CloseReason::Revoked);
        }
        // Wherever else it is connected, it goes too.
        self.tell_holder(
            &rec.fingerprint,
            &super::remote::NodeMsg::Close {
                reason: CloseReason::Revoked,
            },
        );
        self.end_tasks_of_revoked(&rec);
        tracing::info!(owner = %rec.owner, agent = %rec.name, fingerprint = %rec.fingerprint, "agent revoked");
        Ok(rec)
    }

    fn agents(&self) -> Result<Vec<AgentView>, CoreError> {
        let live = &self.live;
        // Sessions on other nodes: one read for the whole list (not one per agent).
        let elsewhere: HashMap<Fingerprint, Presence> = if self.bus.is_some() {
            self.store
                .presences()?
                .into_iter()
                .filter(|(fp, p)| {
                    !live.contains_key(fp)
                        && p.node != self.config.node_id
                        && self.alive_nodes.contains(&p.node)
                })
                .collect()
        } else {
            HashMap::new()
        };
        let mut out: Vec<AgentView> = self
            .store
            .agents()?
            .into_iter()
            .map(|a| {
                let l = live.get(&a.fingerprint);
                let elsewhere = elsewhere.get(&a.fingerprint);
                AgentView {
                    node: match (l, elsewhere) {
                        (Some(_), _) => Some(self.config.node_id.clone()),
                        (None, Some(p)) => Some(p.node.clone()),
                        (None, None) => None,
                    },
                    online: l.is_some() || elsewhere.is_some(),
                    transport: l.map(|l| l.transport).or(a.last_transport),
                    since: l.map(|l| l.since).or(a.last_seen),
                    peer: l.map(|l| l.peer.to_string()),
                    revoked: a.revoked_at.is_some(),
                    version: a.last_version,
                    owner: a.owner,
                    name: a.name,
                    fingerprint: a.fingerprint,
                }
            })
            .collect();
        out.sort_by(|a, b| (&a.owner, &a.name).cmp(&(&b.owner, &b.name)));
        Ok(out)
    }
}

/// What a new session brings to the live table.
pub(super) struct Live {
    /// Its transport, and the software version the agent gave.
    link: (Transport, String),
    peer: SocketAddr,
    owner: String,
    close: mpsc::Sender<CloseReason>,
    outbound: mpsc::Sender<Outbound>,
    retry: Arc<AtomicBool>,
}

/// Held by a live session; dropping it removes the session from the live table (if it is still the
/// current one for that key) and records when the agent was last seen.
#[derive(Debug)]
pub struct SessionGuard {
    core: Core,
    fp: Fingerprint,
    session: u64,
    transport: Transport,
    /// Receives the reason when the core wants this session closed (revoked, replaced, shutdown).
    pub close_rx: mpsc::Receiver<CloseReason>,
    /// Messages the core wants sent to the agent, each once what it waits for is durable.
    pub outbound_rx: mpsc::Receiver<Outbound>,
    /// Set by the core when a task start could not be queued for this session (see `LiveAgent::retry`).
    retry: Arc<AtomicBool>,
    /// In a cluster: what other nodes send this session.
    _holding: Option<super::remote::Holding>,
}

impl SessionGuard {
    /// Whether a task start waits to be sent again ([`Core::retry_dispatch`]): asked at every heartbeat, and
    /// nearly always no, so it is answered here rather than by a job on the core's thread per agent per beat.
    pub fn dispatch_waiting(&self) -> bool {
        self.retry.load(Ordering::Acquire)
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        // Each guard added one to its transport's gauge and takes exactly that one back, whatever happened
        // to the live entry meanwhile (replaced by a newer session, or removed by a revocation).
        self.core.metrics().agents(self.transport).dec();
        let (fp, session) = (self.fp, self.session);
        self.core
            .fire(move |state| state.session_ended(&fp, session));
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::store::Presence;

    /// A session's parts as the endpoint would hand them over, and the receiving end of its close channel.
    pub(in crate::core) fn live(
        owner: &str,
    ) -> (Live, mpsc::Receiver<CloseReason>, mpsc::Receiver<Outbound>) {
        let (close, close_rx) = mpsc::channel(1);
        let (outbound, outbound_rx) = mpsc::channel(OUTBOUND_QUEUE);
        let live = Live {
            link: (Transport::Quic, "test".into()),
            peer: "127.0.0.1:9".parse().unwrap(),
            owner: owner.into(),
            close,
            outbound,
            retry: Arc::default(),
        };
        (live, close_rx, outbound_rx)
    }

    fn claimed(epoch: u64) -> Option<Presence> {
        Some(Presence {
            node: "n".into(),
            epoch,
            since: 0,
        })
    }

    /// In a cluster a session's presence is claimed off the core's thread, so an agent's two connections
    /// (one it gave up on, one it made since) can be registered in the opposite order to their claims. The
    /// newer claim is the session that stays, whichever comes last, as it is in the store.
    #[tokio::test]
    async fn an_older_claim_registered_after_a_newer_one_is_the_session_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let core = crate::core::tests::core(dir.path());
        let fp = Fingerprint([3; 32]);
        let (newer, mut newer_closed, _out) = live("1");
        let (older, mut older_closed, _out2) = live("1");
        core.run(move |state| state.register_session(fp, newer, claimed(9)))
            .await
            .unwrap();
        core.run(move |state| state.register_session(fp, older, claimed(4)))
            .await
            .unwrap();
        assert_eq!(older_closed.try_recv().ok(), Some(CloseReason::Replaced));
        assert!(newer_closed.try_recv().is_err(), "the newer session stays");
        let held = core.call(move |state| state.live.get(&fp).map(|l| l.epoch));
        assert_eq!(held.await.unwrap(), Some(9));
    }
}
