//! The relay core: who may connect, pairing, and which agents are live right now.
//!
//! Front ends (the admin socket today, the Discord bot later) call these functions; the agent endpoint calls
//! [`Core::admit`] after a handshake and holds a [`SessionGuard`] while the session lives.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ct_protocol::handshake::{Rejection, VerifiedAgent, Welcome};
use ct_protocol::message::CloseReason;
use ct_protocol::pairing::{PairCode, PairingToken};
use ct_protocol::{Fingerprint, Transport};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::audit::{AuditEntry, AuditKind};
use crate::metrics::Metrics;
use crate::ratelimit::RateLimiter;
use crate::store::{now, AgentRecord, PairCodeRecord, SharedStore, StoreError};

/// Wrong secrets tried against one code before it is disabled.
pub(crate) const MAX_CODE_FAILURES: u32 = 5;
/// Messages waiting for one agent's session to write them. Bounded: a stuck agent cannot grow relay memory.
const OUTBOUND_QUEUE: usize = 256;
/// How long used and expired codes are remembered, so late attempts get the right error.
pub(crate) const CODE_MEMORY: u64 = 24 * 3600;

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
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Relay-wide settings the core needs.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// Addresses put into pairing tokens.
    pub public_addrs: Vec<String>,
    pub pair_code_ttl: Duration,
    /// Pairing attempts per address: burst, then one per this interval.
    pub pair_burst: u32,
    pub pair_refill: Duration,
    /// Connections (QUIC and TCP together, agents and HTTP alike) served at once; more are refused at
    /// accept, so a flood of idle sockets cannot exhaust memory or file descriptors.
    pub max_connections: usize,
    /// Connections one address (IPv6: one /64) may hold at once, so one party cannot take every slot of
    /// `max_connections`. Agents behind one NAT share an address: keep this above the agents one office runs.
    pub max_connections_per_address: usize,
    /// Time a TCP client has for its TLS handshake, and then for each HTTP request's headers and for the
    /// whole request (body included) to be read and answered. A client trickling bytes is cut off after it.
    pub request_timeout: Duration,
    /// Tasks one agent runs at once (sent to it and not finished); more wait in its queue. At least 1.
    pub max_running_per_agent: usize,
    /// Tasks waiting in one agent's queue; beyond this a submit is refused rather than left waiting for hours.
    pub max_queued_per_agent: usize,
    /// How long a project request waits for the agent's answer.
    pub project_timeout: Duration,
    /// Tasks one person may start per minute, on average (new tasks and replies that start one)...
    pub tasks_per_minute: u32,
    /// ...and at once after a quiet spell (the token bucket's size).
    pub task_burst: u32,
    /// Tasks one person may have queued or running at once, across all agents (their own and shared ones).
    pub max_tasks_per_user: usize,
    /// Agents one person may have paired (not revoked). Each agent costs a stored record, a live session and
    /// its reports; pairing is refused past this, with what to do.
    pub max_agents_per_user: usize,
    /// Project reports one agent may send per minute (after a burst of as many). Each report rewrites the
    /// agent's stored record; reports past the rate are dropped (the next one in time is kept).
    pub project_reports_per_minute: u32,
    /// Bytes of task output one person's tasks may keep in the store, counted over the tasks they asked for.
    /// Past it new tasks are refused until retention deletes old ones; running tasks finish (each within
    /// `max_task_output`).
    pub max_stored_per_user: u64,
    /// Pairing codes one user may hold that could still pair an agent. Minting another supersedes the
    /// oldest rather than refusing: a person who lost a token can always get a working one, and fewer live
    /// bearer secrets is the safer side.
    pub max_pair_codes_per_user: usize,
    /// Bytes of events kept per task. Past it the relay keeps acknowledging, but stores only the events that
    /// change the task's course (approvals, turn results, the end) and one marker saying output was dropped.
    pub max_task_output: u64,
    /// How long a task and its events are kept after it ended.
    pub task_retention: Duration,
    /// How long audit entries are kept.
    pub audit_retention: Duration,
    /// Keys (users, addresses) one rate limiter remembers at most; see [`RateLimiter`].
    pub rate_limit_keys: usize,
}

impl Default for CoreConfig {
    fn default() -> Self {
        Self {
            public_addrs: Vec::new(),
            pair_code_ttl: Duration::from_secs(600),
            pair_burst: 10,
            pair_refill: Duration::from_secs(6),
            max_connections: 50_000,
            max_connections_per_address: 128,
            request_timeout: Duration::from_secs(10),
            max_running_per_agent: 2,
            max_queued_per_agent: 20,
            project_timeout: Duration::from_secs(10),
            tasks_per_minute: 20,
            task_burst: 10,
            max_tasks_per_user: 8,
            max_agents_per_user: 20,
            project_reports_per_minute: 12,
            max_stored_per_user: 512 * 1024 * 1024,
            max_pair_codes_per_user: 5,
            max_task_output: 32 * 1024 * 1024,
            task_retention: Duration::from_secs(30 * 86_400),
            audit_retention: Duration::from_secs(180 * 86_400),
            rate_limit_keys: 100_000,
        }
    }
}

/// Proof that the routing lock is held.
pub(crate) type RoutingGuard<'a> = std::sync::MutexGuard<'a, ()>;

#[derive(Debug)]
pub(crate) struct LiveAgent {
    pub(crate) session: u64,
    transport: Transport,
    pub(crate) since: u64,
    peer: SocketAddr,
    close: mpsc::Sender<CloseReason>,
    /// Messages for the agent (task starts, decisions, acks), written by its session.
    pub(crate) outbound: mpsc::Sender<ct_protocol::RelayMessage>,
    /// Whether this session's `Running` report was reconciled. Until then, the tasks sent during this
    /// session are remembered in `dispatched_here`: the report was written before the agent saw them, so
    /// their absence from it does not mean they were lost.
    pub(crate) reconciled: bool,
    pub(crate) dispatched_here: HashSet<String>,
    /// A task start could not be queued for this session (its outbound queue was full); retried on the next
    /// heartbeat so the task does not wait for an unrelated event.
    pub(crate) retry_dispatch: bool,
}

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
}

/// The shared state of one relay.
#[derive(Debug)]
pub struct Core {
    store: SharedStore,
    /// Flushes the store for writes that must be durable before the relay answers (event acknowledgements).
    commit: crate::durable::GroupCommit,
    relay_key: ed25519_dalek::SigningKey,
    relay: Fingerprint,
    config: CoreConfig,
    pub metrics: Arc<Metrics>,
    live: Mutex<HashMap<Fingerprint, LiveAgent>>,
    pair_limit: RateLimiter,
    /// Tasks started per user; see [`CoreConfig::tasks_per_minute`].
    pub(crate) task_limit: RateLimiter<String>,
    /// Project reports per agent; see [`CoreConfig::project_reports_per_minute`].
    pub(crate) report_limit: RateLimiter<Fingerprint>,
    /// At most one warning a minute per agent whose reports are being dropped.
    pub(crate) report_warnings: RateLimiter<Fingerprint>,
    /// Serialises minting, so two codes minted at once for one user cannot both slip under the cap.
    minting: Mutex<()>,
    next_session: AtomicU64,
    /// One permit per connection being served; see [`CoreConfig::max_connections`].
    pub connections: Arc<tokio::sync::Semaphore>,
    /// Connections each address holds; see [`CoreConfig::max_connections_per_address`].
    pub per_address: Arc<crate::endpoint::limits::PerAddress>,
    /// Live followers of each task (admin `task`, later the Discord bot).
    pub(crate) followers: crate::tasks::Followers,
    /// Serialises every decision about who may run what where: submitting, dispatching from the queues,
    /// reconciling, cancelling queued tasks and changing shares. Without it a share revoked while a task is
    /// being submitted could let that task through. Held only around store calls, never across an await.
    routing: Mutex<()>,
    /// Project requests waiting for their agent's answer.
    pub(crate) pending_projects: crate::projects::Pending,
    next_request: AtomicU64,
}

impl Core {
    pub fn new(
        store: SharedStore,
        relay_key: ed25519_dalek::SigningKey,
        mut config: CoreConfig,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Self> {
        // With no running slot, nothing would ever leave the queue.
        config.max_running_per_agent = config.max_running_per_agent.max(1);
        Ok(Self {
            relay: Fingerprint::of(&relay_key.verifying_key()),
            relay_key,
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
            minting: Mutex::new(()),
            connections: Arc::new(tokio::sync::Semaphore::new(config.max_connections)),
            per_address: crate::endpoint::limits::PerAddress::new(
                config.max_connections_per_address,
            ),
            commit: crate::durable::GroupCommit::start(store.clone())?,
            store,
            config,
            metrics,
            live: Mutex::new(HashMap::new()),
            next_session: AtomicU64::new(1),
            followers: Default::default(),
            routing: Mutex::new(()),
            pending_projects: Default::default(),
            next_request: AtomicU64::new(1),
        })
    }

    pub fn config(&self) -> &CoreConfig {
        &self.config
    }

    /// Takes the routing lock (see the field). Functions that need it held take the guard as an argument.
    pub(crate) fn routing(&self) -> RoutingGuard<'_> {
        self.routing.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A fresh id for a request to an agent.
    pub(crate) fn next_request_id(&self) -> u64 {
        self.next_request.fetch_add(1, Ordering::Relaxed)
    }

    pub fn store(&self) -> &SharedStore {
        &self.store
    }

    /// Group commit for what must be on disk before the relay says so; see [`crate::durable`].
    pub fn commit(&self) -> &crate::durable::GroupCommit {
        &self.commit
    }

    /// The relay's signing key, for handshakes.
    pub fn relay_key(&self) -> &ed25519_dalek::SigningKey {
        &self.relay_key
    }

    /// The relay key fingerprint agents pin.
    pub fn relay_fingerprint(&self) -> Fingerprint {
        self.relay
    }

    pub(crate) fn live(&self) -> std::sync::MutexGuard<'_, HashMap<Fingerprint, LiveAgent>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Mints a one-time pairing token for a Discord user. `/register` and `ct-relay admin pair-code` call this.
    /// A user holds at most [`CoreConfig::max_pair_codes_per_user`] usable codes: minting another supersedes
    /// the oldest (see there why).
    pub fn mint_pairing_token(&self, owner: &str) -> Result<(PairingToken, u64), CoreError> {
        if owner.is_empty() || owner.len() > 20 || !owner.bytes().all(|b| b.is_ascii_digit()) {
            return Err(CoreError::BadUser(owner.to_string()));
        }
        let _minting = self.minting.lock().unwrap_or_else(|p| p.into_inner());
        self.check_agent_count(owner)?;
        let t = now();
        self.store.prune_pair_codes(t.saturating_sub(CODE_MEMORY))?;
        let mut live: Vec<PairCodeRecord> = self
            .store
            .pair_codes_of(owner)?
            .into_iter()
            .filter(|c| c.outstanding(t, MAX_CODE_FAILURES))
            .collect();
        live.sort_by_key(|c| (c.created_at, c.order));
        let keep = self.config.max_pair_codes_per_user.max(1) - 1;
        for old in live.iter().take(live.len().saturating_sub(keep)) {
            let mut superseded = old.clone();
            superseded.superseded_at = Some(t);
            // A conflict means it was just used or burned: it is no longer outstanding either way.
            match self.store.swap_pair_code(old, &superseded) {
                Ok(()) | Err(StoreError::Conflict) => {}
                Err(e) => return Err(e.into()),
            }
            tracing::info!(owner, code_id = %old.id, "older pairing code superseded");
        }
        let code = PairCode::generate();
        let expires_at = t + self.config.pair_code_ttl.as_secs();
        self.store.put_pair_code(&PairCodeRecord {
            id: code.id.clone(),
            secret: code.secret().to_string(),
            owner: owner.to_string(),
            created_at: t,
            expires_at,
            used_at: None,
            failures: 0,
            superseded_at: None,
            order: self.store.next_order()?,
        })?;
        self.store.flush()?;
        tracing::info!(owner, code_id = %code.id, "pairing code minted");
        Ok((
            PairingToken {
                relays: self.config.public_addrs.clone(),
                code,
                relay: self.relay,
            },
            expires_at,
        ))
    }

    /// Refuses a new agent for `owner` when they have [`CoreConfig::max_agents_per_user`] already. Checked when
    /// a code is minted (so the person hears it in Discord) and again when one is redeemed (codes minted
    /// earlier, or several at once).
    fn check_agent_count(&self, owner: &str) -> Result<(), CoreError> {
        let have = self
            .store
            .agents_of(owner)?
            .iter()
            .filter(|a| a.revoked_at.is_none())
            .count();
        let max = self.config.max_agents_per_user.max(1);
        if have >= max {
            return Err(CoreError::TooManyAgents { have, max });
        }
        Ok(())
    }

    /// Decides whether an authenticated agent may hold a session, pairing it first when it brings a code.
    pub fn admit(
        &self,
        agent: &VerifiedAgent,
        peer: IpAddr,
    ) -> Result<Welcome, (Rejection, String)> {
        let unavailable = |e: StoreError| {
            tracing::error!(error = %e, "store failure while admitting an agent");
            (
                Rejection::Unavailable,
                "the relay could not read its store; try again shortly".to_string(),
            )
        };
        let known = self.store.agent(&agent.fingerprint).map_err(unavailable)?;
        let (record, paired) = match (known, &agent.pair) {
            (Some(rec), _) if rec.revoked_at.is_some() => {
                return Err((
                    Rejection::Revoked,
                    format!(
                        "this agent's key ({}) was revoked: pair it again with `ct-agent pair --force <token>` \
                         (get a token with /register in Discord)",
                        agent.fingerprint.short()
                    ),
                ))
            }
            (Some(rec), _) => (rec, false),
            (None, None) => {
                return Err((
                    Rejection::UnknownKey,
                    "this agent's key is not paired with this relay: run `ct-agent pair <token>` with a token \
                     from /register in Discord"
                        .to_string(),
                ))
            }
            (None, Some(pair)) => {
                if let Err(wait) = self.pair_limit.take_addr(peer) {
                    return Err((
                        Rejection::RateLimited,
                        format!(
                            "too many pairing attempts from your address (at most {} in a row, then one every {}): \
                             try again in {}",
                            self.config.pair_burst,
                            human_duration(self.config.pair_refill.as_secs().max(1)),
                            human_duration(wait.as_secs_f64().ceil().max(1.0) as u64)
                        ),
                    ));
                }
                (self.redeem(agent, &pair.code, &pair.name).map_err(|e| match e {
                    Redeem::Rejected(r, m) => (r, m),
                    Redeem::Store(e) => unavailable(e),
                })?, true)
            }
        };
        Ok(Welcome {
            owner: record.owner,
            owner_name: None,
            agent_name: record.name,
            paired,
            heartbeat_ms: 0,
        })
    }

    fn redeem(&self, agent: &VerifiedAgent, code: &str, name: &str) -> Result<AgentRecord, Redeem> {
        let wrong = || {
            Redeem::Rejected(
                Rejection::CodeWrong,
                "that pairing code is not valid for this relay: copy the whole token again, or get a new one \
                 with /register in Discord"
                    .to_string(),
            )
        };
        let Ok(code) = code.parse::<PairCode>() else {
            return Err(wrong());
        };
        let Some(rec) = self.store.pair_code(&code.id)? else {
            return Err(wrong());
        };
        let stored = PairCode::from_parts(rec.id.clone(), rec.secret.clone());
        if !stored.secret_matches(&code) {
            let mut burned = rec.clone();
            burned.failures += 1;
            // A conflict means someone else updated it at the same moment; the attempt is refused either way.
            let _ = self.store.swap_pair_code(&rec, &burned);
            return Err(wrong());
        }
        let t = now();
        if rec.failures >= MAX_CODE_FAILURES {
            return Err(Redeem::Rejected(
                Rejection::CodeWrong,
                "that pairing code was disabled after too many wrong attempts: get a new one with /register"
                    .to_string(),
            ));
        }
        if rec.used_at.is_some() {
            return Err(Redeem::Rejected(
                Rejection::CodeUsed,
                "that pairing code was already used (each code works once): get a new one with /register in \
                 Discord"
                    .to_string(),
            ));
        }
        if rec.superseded_at.is_some() {
            return Err(Redeem::Rejected(
                Rejection::CodeExpired,
                format!(
                    "that pairing code was replaced by newer ones (at most {} work at once): use the newest \
                     token, or get a new one with /register in Discord",
                    self.config.max_pair_codes_per_user
                ),
            ));
        }
        if t >= rec.expires_at {
            return Err(Redeem::Rejected(
                Rejection::CodeExpired,
                format!(
                    "that pairing code expired {} ago (codes last {}): get a new one with /register in Discord",
                    human_duration(t - rec.expires_at),
                    human_duration(self.config.pair_code_ttl.as_secs())
                ),
            ));
        }
        match self.check_agent_count(&rec.owner) {
            Ok(()) => {}
            Err(CoreError::Store(e)) => return Err(Redeem::Store(e)),
            // The code stays usable: once an agent is unregistered, the same token pairs.
            Err(e) => return Err(Redeem::Rejected(Rejection::Unavailable, e.to_string())),
        }
        let mut used = rec.clone();
        used.used_at = Some(t);
        let record = AgentRecord {
            key: agent.key.to_bytes(),
            fingerprint: agent.fingerprint,
            owner: rec.owner.clone(),
            name: self.unique_name(&rec.owner, name)?,
            paired_at: t,
            last_seen: Some(t),
            last_transport: None,
            revoked_at: None,
            projects: None,
        };
        // One transaction: the code is used, the agent exists and the log says so, or none of it. A failed
        // audit write fails the pairing (the agent is told the relay is unavailable and may retry).
        let entry = AuditEntry::new(
            AuditKind::Paired,
            &rec.owner,
            &rec.owner,
            format!("agent {} paired", record.name),
        )
        .on(&record);
        self.store
            .pair_agent_audited(&rec, &used, &record, &entry)
            .map_err(|e| {
                match e {
                StoreError::Conflict => Redeem::Rejected(
                    Rejection::CodeUsed,
                    "that pairing code was just used by another agent: get a new one with /register"
                        .to_string(),
                ),
                e => Redeem::Store(e),
            }
            })?;
        self.store.flush()?;
        self.metrics.pairings.inc();
        tracing::info!(owner = %record.owner, agent = %record.name, fingerprint = %record.fingerprint, "agent paired");
        Ok(record)
    }

    /// The requested name, cleaned up and made unique among the owner's agents.
    fn unique_name(&self, owner: &str, wanted: &str) -> Result<String, StoreError> {
        let base: String = wanted
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                    c
                } else {
                    '-'
                }
            })
            .take(32)
            .collect();
        let base = if base.trim_matches('-').is_empty() {
            "agent".to_string()
        } else {
            base
        };
        let taken: Vec<String> = self
            .store
            .agents_of(owner)?
            .into_iter()
            .filter(|a| a.revoked_at.is_none())
            .map(|a| a.name)
            .collect();
        Ok((1..)
            .map(|n| {
                if n == 1 {
                    base.clone()
                } else {
                    format!("{base}-{n}")
                }
            })
            .find(|n| !taken.contains(n))
            .unwrap_or(base))
    }

    /// Records a live session; an older session with the same key is told it was replaced.
    pub fn register_session(
        self: &Arc<Self>,
        fp: Fingerprint,
        transport: Transport,
        peer: SocketAddr,
    ) -> SessionGuard {
        let (close, close_rx) = mpsc::channel(1);
        let (outbound, outbound_rx) = mpsc::channel(OUTBOUND_QUEUE);
        let session = self.next_session.fetch_add(1, Ordering::Relaxed);
        let since = now();
        let old = self.live().insert(
            fp,
            LiveAgent {
                session,
                transport,
                since,
                peer,
                close,
                outbound,
                reconciled: false,
                dispatched_here: HashSet::new(),
                retry_dispatch: false,
            },
        );
        if let Some(old) = old {
            let _ = old.close.try_send(CloseReason::Replaced);
        }
        self.metrics.agents(transport).inc();
        self.touch(&fp, Some(transport));
        SessionGuard {
            core: self.clone(),
            fp,
            session,
            transport,
            close_rx,
            outbound_rx,
        }
    }

    fn touch(&self, fp: &Fingerprint, transport: Option<Transport>) {
        let update = self.store.update_agent(fp, &mut |rec| {
            rec.last_seen = Some(now());
            rec.last_transport = transport.or(rec.last_transport);
        });
        if let Err(e) = update {
            tracing::warn!(error = %e, "could not record when an agent was last seen");
        }
    }

    /// Finds one agent by fingerprint (or a unique prefix of it), or by name (`name` or `owner/name`).
    pub fn find_agent(&self, query: &str) -> Result<AgentRecord, CoreError> {
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

    /// Refuses an agent's key from now on and ends its live session. Its unfinished tasks end as lost: the
    /// agent can never report on them again. `actor` is who did it, for the audit log: the owner's user id
    /// (the bot checks ownership first), or [`OPERATOR`](crate::audit::OPERATOR). The revocation and its audit
    /// entry are written together: if the entry cannot be written, nothing is revoked and the error says so.
    pub fn revoke(&self, query: &str, actor: &str) -> Result<AgentRecord, CoreError> {
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
            self.store.flush()?;
            rec
        } else {
            rec
        };
        if let Some(live) = self.live().remove(&rec.fingerprint) {
            let _ = live.close.try_send(CloseReason::Revoked);
        }
        self.end_tasks_of_revoked(&rec);
        tracing::info!(owner = %rec.owner, agent = %rec.name, fingerprint = %rec.fingerprint, "agent revoked");
        Ok(rec)
    }

    /// Every agent the relay knows, with its live state.
    pub fn agents(&self) -> Result<Vec<AgentView>, CoreError> {
        let live = self.live();
        let mut out: Vec<AgentView> = self
            .store
            .agents()?
            .into_iter()
            .map(|a| {
                let l = live.get(&a.fingerprint);
                AgentView {
                    online: l.is_some(),
                    transport: l.map(|l| l.transport).or(a.last_transport),
                    since: l.map(|l| l.since).or(a.last_seen),
                    peer: l.map(|l| l.peer.to_string()),
                    revoked: a.revoked_at.is_some(),
                    owner: a.owner,
                    name: a.name,
                    fingerprint: a.fingerprint,
                }
            })
            .collect();
        out.sort_by(|a, b| (&a.owner, &a.name).cmp(&(&b.owner, &b.name)));
        Ok(out)
    }

    /// Live sessions right now.
    pub fn online(&self) -> usize {
        self.live().len()
    }

    /// Asks every live session to close for a shutdown.
    pub fn close_all(&self, reason: CloseReason) {
        for live in self.live().values() {
            let _ = live.close.try_send(reason);
        }
    }
}

enum Redeem {
    Rejected(Rejection, String),
    Store(StoreError),
}

impl From<StoreError> for Redeem {
    fn from(e: StoreError) -> Self {
        Redeem::Store(e)
    }
}

/// Held by a live session; dropping it removes the session from the live table (if it is still the
/// current one for that key) and records when the agent was last seen.
#[derive(Debug)]
pub struct SessionGuard {
    core: Arc<Core>,
    fp: Fingerprint,
    session: u64,
    transport: Transport,
    /// Receives the reason when the core wants this session closed (revoked, replaced, shutdown).
    pub close_rx: mpsc::Receiver<CloseReason>,
    /// Messages the core wants sent to the agent.
    pub outbound_rx: mpsc::Receiver<ct_protocol::RelayMessage>,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        // Each guard added one to its transport's gauge and takes exactly that one back, whatever happened
        // to the live entry meanwhile (replaced by a newer session, or removed by a revocation).
        self.core.metrics.agents(self.transport).dec();
        let mut live = self.core.live();
        if live
            .get(&self.fp)
            .is_some_and(|l| l.session == self.session)
        {
            live.remove(&self.fp);
            drop(live);
            self.core.touch(&self.fp, None);
        } else {
            drop(live);
        }
        // Requests this session was asked can no longer be answered: their callers hear so at once.
        self.core.drop_pending_projects(self.session);
    }
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
