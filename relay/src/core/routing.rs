//! Which agent a request goes to: the one named, the owner's only one, or the owner's default; and setting
//! that default.

use ct_protocol::Fingerprint;

use super::audit::{Caller, OwnedCaller};
use super::state::State;
use super::tasks::TaskError;
use super::Core;
use crate::store::{AgentRecord, AuditEntry, AuditKind, UserRecord};

/// Shortest fingerprint prefix accepted in place of a name (as `ct-relay admin revoke` accepts).
const MIN_PREFIX: usize = 10;

fn matches(agent: &AgentRecord, wanted: &str) -> bool {
    let fp = agent.fingerprint.to_string();
    agent.name == wanted || fp == wanted || (wanted.len() >= MIN_PREFIX && fp.starts_with(wanted))
}

impl Core {
    /// Makes one of the user's agents (by name or fingerprint) the one used when they, or someone they share
    /// with, name none. Returns that agent. The setting and its audit entry are written together (it decides
    /// where grantees' tasks run).
    pub async fn set_default_agent<'a>(
        &self,
        who: impl Into<Caller<'a>>,
        agent: &str,
    ) -> Result<AgentRecord, TaskError> {
        let (caller, agent) = (OwnedCaller::from(who.into()), agent.to_string());
        self.run(move |state| state.set_default_agent(caller.as_caller(), &agent))
            .await
    }

    /// The user's default agent, if they set one and it is still theirs and not revoked.
    pub async fn default_agent(&self, user: &str) -> Result<Option<AgentRecord>, TaskError> {
        let user = user.to_string();
        self.run(move |state| state.default_agent(&user)).await
    }
}

/// The agents of a list that may be chosen (not revoked), by name.
pub(crate) fn usable(agents: Vec<AgentRecord>) -> Vec<AgentRecord> {
    let mut mine: Vec<_> = agents
        .into_iter()
        .filter(|a| a.revoked_at.is_none())
        .collect();
    mine.sort_by(|a, b| a.name.cmp(&b.name));
    mine
}

/// The agent of `mine` that `wanted` can only mean, without reading the owner's default: the one named, or
/// the only one. `None` when choosing needs more (or finds nothing).
pub(crate) fn the_only_match(
    mine: &[AgentRecord],
    wanted: Option<&str>,
) -> Option<ct_protocol::Fingerprint> {
    let mut found = match wanted.map(str::trim) {
        None | Some("") => mine.iter().collect::<Vec<_>>(),
        Some(wanted) => mine.iter().filter(|a| matches(a, wanted)).collect(),
    };
    match found.len() {
        1 => found.pop().map(|a| a.fingerprint),
        _ => None,
    }
}

impl State {
    /// `owner`'s agents that have not been revoked.
    pub(crate) fn agents_of(&self, owner: &str) -> Result<Vec<AgentRecord>, TaskError> {
        Ok(usable(self.store().agents_of(owner)?))
    }

    /// The agent of `owner`'s that a request means. `own` says whether the person asking is the owner, which
    /// only changes the wording of refusals. Callers check a non-owner's share first.
    pub(crate) fn choose_agent(
        &self,
        owner: &str,
        wanted: Option<&str>,
        own: bool,
    ) -> Result<AgentRecord, TaskError> {
        let mine = self.agents_of(owner)?;
        self.choose_agent_among(owner, wanted, own, mine, None)
    }

    /// [`choose_agent`](Self::choose_agent) among `mine`, the owner's agents as [`usable`] leaves them.
    /// `default`: the owner's default agent, when it was read already (else it is read here if needed).
    pub(crate) fn choose_agent_among(
        &self,
        owner: &str,
        wanted: Option<&str>,
        own: bool,
        mine: Vec<AgentRecord>,
        default: Option<Option<Fingerprint>>,
    ) -> Result<AgentRecord, TaskError> {
        let names = || {
            mine.iter()
                .map(|a| a.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        match (wanted.map(str::trim), mine.as_slice()) {
            (_, []) if own => Err(TaskError::NoAgent),
            (_, []) => Err(TaskError::OwnerHasNoAgent(owner.to_string())),
            (None | Some(""), [one]) => Ok(one.clone()),
            (None | Some(""), _) => {
                let default = match default {
                    Some(read) => read,
                    None => self.store().user(owner)?.default_agent,
                };
                if let Some(agent) = mine.iter().find(|a| Some(a.fingerprint) == default) {
                    return Ok(agent.clone());
                }
                Err(if own {
                    TaskError::WhichAgent(names())
                } else {
                    TaskError::WhichSharedAgent {
                        owner: owner.to_string(),
                        names: names(),
                    }
                })
            }
            (Some(wanted), _) => {
                let found: Vec<&AgentRecord> = mine.iter().filter(|a| matches(a, wanted)).collect();
                match found.as_slice() {
                    [one] => Ok((*one).clone()),
                    _ => Err(TaskError::UnknownAgent {
                        wanted: wanted.to_string(),
                        whose: if own {
                            "you have".into()
                        } else {
                            format!("user {owner} has")
                        },
                        names: names(),
                    }),
                }
            }
        }
    }

    fn set_default_agent(
        &mut self,
        caller: Caller<'_>,
        agent: &str,
    ) -> Result<AgentRecord, TaskError> {
        let user = caller.user;
        if agent.trim().is_empty() {
            return Err(TaskError::UnknownAgent {
                wanted: String::new(),
                whose: "you have".into(),
                names: self
                    .agents_of(user)?
                    .iter()
                    .map(|a| a.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        let rec = self.choose_agent(user, Some(agent), true)?;
        let mut settings = self.store().user(user)?;
        settings.default_agent = Some(rec.fingerprint);
        let entry = AuditEntry::new(
            AuditKind::DefaultAgentSet,
            caller.actor(),
            user,
            format!("default agent set to {}", rec.name),
        )
        .by(caller)
        .on(&rec);
        self.store().put_user_audited(user, &settings, &entry)?;
        self.must_be_durable();
        tracing::info!(%user, agent = %rec.name, "default agent set");
        Ok(rec)
    }

    fn default_agent(&self, user: &str) -> Result<Option<AgentRecord>, TaskError> {
        let UserRecord { default_agent, .. } = self.store().user(user)?;
        Ok(self
            .agents_of(user)?
            .into_iter()
            .find(|a| Some(a.fingerprint) == default_agent))
    }
}
