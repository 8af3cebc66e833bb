//! Pairing: one-time codes minted for a Discord user, and an agent's first handshake redeeming one, which binds
//! its key to that user. Also who may connect at all: [`Core::admit`] after every handshake.

use std::net::IpAddr;

use ct_protocol::handshake::{Rejection, VerifiedAgent, Welcome};
use ct_protocol::pairing::{PairCode, PairingToken};

use super::state::State;
use super::{human_duration, Core, CoreError};
use crate::store::{now, AgentRecord, AuditEntry, AuditKind, PairCodeRecord, StoreError};

/// Wrong secrets tried against one code before it is disabled.
pub(crate) const MAX_CODE_FAILURES: u32 = 5;
/// How long used and expired codes are remembered, so late attempts get the right error.
pub(crate) const CODE_MEMORY: u64 = 24 * 3600;

impl Core {
    /// Mints a one-time pairing token for a Discord user. `/register` and `ct-relay admin pair-code` call this.
    /// A user holds at most [`CoreConfig::max_pair_codes_per_user`](super::CoreConfig) usable codes: minting
    /// another supersedes the oldest (see there why).
    pub async fn mint_pairing_token(&self, owner: &str) -> Result<(PairingToken, u64), CoreError> {
        let owner = owner.to_string();
        self.run(move |state| state.mint_pairing_token(&owner))
            .await
    }

    /// Decides whether an authenticated agent may hold a session, pairing it first when it brings a code.
    ///
    /// In a cluster the agent's record is read on the blocking pool first, as a submission's reads are (see
    /// [`super::submit`]'s `Preread`): a burst of reconnects would otherwise hold up the core's thread for a
    /// round trip each. A revocation that lands after this read is caught when the session is registered
    /// (see [`Core::register_session`]).
    pub async fn admit(
        &self,
        agent: &VerifiedAgent,
        peer: IpAddr,
    ) -> Result<Welcome, (Rejection, String)> {
        let agent = agent.clone();
        let fp = agent.fingerprint;
        let known = match self.bus() {
            Some(_) => self
                .read(move |store| store.agent(&fp).ok())
                .await
                .ok()
                .flatten(),
            None => None,
        };
        // Reads and writes agents and pairing codes, never a task.
        self.call_unsettled(move |state| state.admit(&agent, peer, known))
            .await
            .unwrap_or_else(|stopped| Err((Rejection::Unavailable, stopped.to_string())))
    }
}

impl State {
    /// In a cluster, a pairing attempt also takes a token from the cluster's bucket for its address: each
    /// node's own would give a stranger the burst again on every node. A store that cannot answer refuses
    /// (the safe side for a guessing attempt).
    fn take_shared_pair_token(&self, peer: std::net::IpAddr) -> Result<(), std::time::Duration> {
        if self.bus.is_none() {
            return Ok(());
        }
        let bucket = format!("pair/{}", crate::ratelimit::group(peer));
        match self
            .store
            .take_token(&bucket, self.config.pair_burst, self.config.pair_refill)
        {
            Ok(true) => Ok(()),
            Ok(false) => Err(self.config.pair_refill),
            Err(e) => {
                tracing::warn!(error = %e, "could not check the cluster's pairing limit; attempt refused");
                Err(self.config.pair_refill)
            }
        }
    }

    fn mint_pairing_token(&mut self, owner: &str) -> Result<(PairingToken, u64), CoreError> {
        if !super::is_user_id(owner) {
            return Err(CoreError::BadUser(owner.to_string()));
        }
        // Minting runs on the core's thread, one at a time: two codes minted at once for one user cannot both
        // slip under the cap.
        self.check_agent_count(owner)?;
        self.mint_code(owner)
    }

    /// Mints a code for `owner`, already checked (a user id, or a pool's owner: see [`super::pools`]),
    /// superseding the oldest of its outstanding ones past the cap.
    pub(crate) fn mint_code(&mut self, owner: &str) -> Result<(PairingToken, u64), CoreError> {
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
        self.must_be_durable();
        tracing::info!(owner, code_id = %code.id, "pairing code minted");
        // In a cluster, the nodes as the store knows them now: the heartbeat's view (`cluster_addrs`) is up to
        // a beat old, and would leave out a node that joined since. Minting is rare; one more read is cheap.
        let relays = match self.bus {
            Some(_) => match self.store.nodes() {
                Ok(nodes) => super::nodes::cluster_addrs(
                    &self.config.node_id,
                    &self.config.public_addrs,
                    &nodes,
                    t,
                ),
                Err(e) => {
                    tracing::warn!(error = %e, "could not read the cluster's nodes; the token names those last seen");
                    self.cluster_addrs.clone()
                }
            },
            None => self.cluster_addrs.clone(),
        };
        Ok((
            PairingToken {
                relays,
                code,
                relay: self.relay,
            },
            expires_at,
        ))
    }

    /// Refuses a new agent for `owner` when they have [`CoreConfig::max_agents_per_user`] already. Checked when
    /// a code is minted (so the person hears it in Discord) and again when one is redeemed (codes minted
    /// earlier, or several at once).
    pub(crate) fn check_agent_count(&self, owner: &str) -> Result<(), CoreError> {
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

    /// `known`: the agent's record as read ahead (`Some(None)`: no such agent); `None`: read here.
    fn admit(
        &mut self,
        agent: &VerifiedAgent,
        peer: IpAddr,
        known: Option<Option<AgentRecord>>,
    ) -> Result<Welcome, (Rejection, String)> {
        let unavailable = |e: StoreError| {
            tracing::error!(error = %e, "store failure while admitting an agent");
            (
                Rejection::Unavailable,
                "the relay could not read its store; try again shortly".to_string(),
            )
        };
        let known = match known {
            Some(read) => read,
            None => self.store.agent(&agent.fingerprint).map_err(unavailable)?,
        };
        let (record, paired) = match (known, &agent.pair) {
            (Some(rec), _) if rec.revoked_at.is_some() => {
                return Err((
                    Rejection::Revoked,
                    CoreError::Revoked(agent.fingerprint.short()).to_string(),
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
                if let Err(wait) = self.pair_limit.take_addr(peer).and_then(|()| self.take_shared_pair_token(peer)) {
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
            // Only a cluster's: a single relay's own address is what the agent dialled (or a loopback
            // default, when no --public-addr was given, that would be no use to anyone).
            relays: match self.bus {
                Some(_) => self.cluster_addrs.clone(),
                None => Vec::new(),
            },
            live_usage: true,
            // Set by the endpoint, which owns what the wire offers.
            tool_output: false,
        })
    }

    fn redeem(
        &mut self,
        agent: &VerifiedAgent,
        code: &str,
        name: &str,
    ) -> Result<AgentRecord, Redeem> {
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
            last_version: None,
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
        self.must_be_durable();
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
