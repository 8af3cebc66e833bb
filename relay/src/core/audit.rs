//! The audit log: what was done to whose agents, and by whom — pairings, revocations, share changes, every
//! task a grantee runs, every approval decision, cancellations, project changes and default-agent changes.
//!
//! Entries are written by the core where the action happens (never by a front end), so the Discord bot and
//! the admin socket are covered alike. Each entry names the `owner` whose agents it concerns, so an owner can
//! be shown their own ([`Core::audit_for_owner`], behind `/audit`), and the `actor`: a Discord user id, or
//! [`OPERATOR`] for the admin socket (with the user the operator acted as in `acting_as`). Operators read
//! everything through [`Core::audit`] (`ct-relay admin audit`). Entries older than
//! [`CoreConfig::audit_retention`](crate::core::CoreConfig) are deleted by [`Core::prune`].
//!
//! What happens when an entry cannot be written depends on the action. Security-relevant changes — pairing,
//! revoking, share changes, a grantee's task, an approval decision, the default agent — are written in the same
//! store transaction as the change (or, for a decision, before it is sent), so the action fails rather than
//! happen unlogged. Stopping things — cancelling a task — and changes the agent already made (projects) go
//! ahead, and the missing entry is logged as an error: refusing to stop a task because the log is broken
//! would be worse than a gap in the log.

use ct_protocol::task::Decision;
use serde::{Deserialize, Serialize};

use super::state::State;
use super::{Core, CoreError};
use crate::store::{AgentRecord, ShareLevel, ShareRecord};

pub use crate::store::records::{
    AuditAgent, AuditEntry, AuditKind, ProjectChange, AGENT, OPERATOR,
};
/// Longest prompt preview kept in an entry, in characters.
pub const PREVIEW_CHARS: usize = 200;
/// Most entries one read returns.
pub const MAX_PAGE: usize = 1000;

/// The entry for a tool use the agent allowed by a session rule (`summary`: what it acted on).
pub(crate) fn auto_allowed_entry(
    agent: &AgentRecord,
    task: &str,
    requester: &str,
    tool: &str,
    summary: &str,
    rule: &ct_protocol::scope::SessionScope,
) -> AuditEntry {
    let summary = preview(summary);
    let rule = preview(&rule.to_string());
    let detail = format!(
        "agent {} allowed {tool} `{summary}` in user {requester}'s task without asking, by the session rule: {rule}",
        agent.name
    );
    AuditEntry::new(
        AuditKind::AutoAllowed {
            tool: preview(tool),
            summary,
            rule,
            requester: requester.to_string(),
        },
        AGENT,
        &agent.owner,
        detail,
    )
    .on(agent)
    .task(task)
}

/// Who is asking: a Discord user acting for themselves, or the relay operator acting as that user through the
/// admin socket. Permissions are checked for `user` either way; the audit log records who really acted.
/// A plain `&str` is the user themselves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller<'a> {
    /// The Discord user whose standing is checked.
    pub user: &'a str,
    /// Whether the operator did this through the admin socket (`ct-relay admin ... --as USER`).
    pub operator: bool,
}

impl<'a> Caller<'a> {
    /// A Discord user acting for themselves (what the bot passes).
    pub fn user(user: &'a str) -> Self {
        Self {
            user,
            operator: false,
        }
    }

    /// The operator acting as `user` through the admin socket.
    pub fn operator(user: &'a str) -> Self {
        Self {
            user,
            operator: true,
        }
    }

    /// The actor an audit entry names.
    pub fn actor(&self) -> &'a str {
        if self.operator {
            OPERATOR
        } else {
            self.user
        }
    }

    /// The user the operator acted as, when it was the operator.
    pub fn acting_as(&self) -> Option<String> {
        self.operator.then(|| self.user.to_string())
    }
}

impl<'a> From<&'a str> for Caller<'a> {
    fn from(user: &'a str) -> Self {
        Self::user(user)
    }
}

impl<'a> From<&'a String> for Caller<'a> {
    fn from(user: &'a String) -> Self {
        Self::user(user)
    }
}

/// A [`Caller`] that owns its user id, to carry a request to the core's thread.
#[derive(Debug, Clone)]
pub(crate) struct OwnedCaller {
    user: String,
    operator: bool,
}

impl From<Caller<'_>> for OwnedCaller {
    fn from(c: Caller<'_>) -> Self {
        Self {
            user: c.user.to_string(),
            operator: c.operator,
        }
    }
}

impl OwnedCaller {
    pub(crate) fn as_caller(&self) -> Caller<'_> {
        Caller {
            user: &self.user,
            operator: self.operator,
        }
    }
}

impl AuditEntry {
    /// The same entry, attributed to `caller` (the operator, acting as someone, or a user).
    pub fn by(mut self, caller: Caller<'_>) -> Self {
        self.actor = caller.actor().to_string();
        self.acting_as = caller.acting_as();
        self
    }
}

/// What [`Core::audit`] selects; every field given must match.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditFilter {
    /// The agents' owner the entry concerns.
    #[serde(default)]
    pub owner: Option<String>,
    /// Who acted (a user id, or `operator`).
    #[serde(default)]
    pub actor: Option<String>,
    /// The agent: its name, its fingerprint, or a prefix of the fingerprint (10 characters or more).
    #[serde(default)]
    pub agent: Option<String>,
}

impl AuditFilter {
    fn matches(&self, e: &AuditEntry) -> bool {
        self.owner.as_ref().is_none_or(|o| *o == e.owner)
            && self.actor.as_ref().is_none_or(|a| *a == e.actor)
            && self.agent.as_ref().is_none_or(|q| {
                e.agent.as_ref().is_some_and(|a| {
                    let fp = a.fingerprint.to_string();
                    a.name == *q || fp == *q || (q.len() >= 10 && fp.starts_with(q.as_str()))
                })
            })
    }
}

/// A prompt shortened for the log: at most [`PREVIEW_CHARS`] characters, control characters (newlines too)
/// turned into spaces so an entry stays one line.
pub fn preview(prompt: &str) -> String {
    let mut out: String = prompt
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(PREVIEW_CHARS + 1)
        .collect();
    if out.chars().count() > PREVIEW_CHARS {
        out = out.chars().take(PREVIEW_CHARS - 1).collect();
        out.push('…');
    }
    out
}

/// A decision in words.
pub fn describe_decision(d: &Decision) -> String {
    match d {
        Decision::AllowOnce { .. } => "allow once".into(),
        Decision::AllowSession => "allow for the session (this exact use)".into(),
        Decision::AllowSessionPrefix { prefix } => format!(
            "allow for the session: simple Bash commands starting with {:?}",
            preview(prefix)
        ),
        Decision::Deny { reason } => format!("deny: {}", preview(reason)),
        Decision::Answers { .. } => "answered".into(),
    }
}

/// A share's projects in words.
pub fn projects_text(p: &Option<Vec<String>>) -> String {
    p.as_ref().map_or_else(
        || "all projects".into(),
        |p| format!("projects {}", p.join(", ")),
    )
}

pub(crate) fn level_text(level: ShareLevel) -> &'static str {
    match level {
        ShareLevel::Standard => "standard: the owner decides their approvals",
        ShareLevel::Trusted => "trusted: they decide their own approvals",
    }
}

/// The entry for a share being stored, given what it was before.
pub(crate) fn share_entry(
    caller: Caller<'_>,
    rec: &ShareRecord,
    before: Option<&ShareRecord>,
) -> AuditEntry {
    let (kind, detail) = match before {
        None => (
            AuditKind::ShareAdded {
                grantee: rec.grantee.clone(),
                projects: rec.projects.clone(),
                level: rec.level,
            },
            format!(
                "shared {} with user {} ({})",
                projects_text(&rec.projects),
                rec.grantee,
                level_text(rec.level)
            ),
        ),
        Some(old) => (
            AuditKind::ShareChanged {
                grantee: rec.grantee.clone(),
                projects: rec.projects.clone(),
                level: rec.level,
                was_projects: old.projects.clone(),
                was_level: old.level,
            },
            format!(
                "share with user {} changed from {} ({}) to {} ({})",
                rec.grantee,
                projects_text(&old.projects),
                level_text(old.level),
                projects_text(&rec.projects),
                level_text(rec.level)
            ),
        ),
    };
    AuditEntry::new(kind, caller.actor(), &rec.owner, detail).by(caller)
}

/// "2024-05-01 12:34:56 UTC", for tables people read (no time-zone database needed).
pub fn utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

impl Core {
    /// The entries concerning `owner`'s agents, newest first: at most `limit` (capped at [`MAX_PAGE`]), and
    /// only those older than entry `before` when given (pass the last `seq` of a page to get the next).
    /// What `/audit` shows; the bot passes the id of the person asking, so nobody reads another's log.
    ///
    /// Like every read of the log, it runs on the blocking pool: the core's thread is not involved.
    pub async fn audit_for_owner(
        &self,
        owner: &str,
        limit: usize,
        before: Option<u64>,
    ) -> Result<Vec<AuditEntry>, CoreError> {
        if !super::is_user_id(owner) {
            return Err(CoreError::BadUser(owner.to_string()));
        }
        let owner = owner.to_string();
        Ok(self
            .read(move |store| store.audit_of_owner(&owner, before, limit.min(MAX_PAGE)))
            .await??)
    }

    /// Entries matching `filter`, newest first, paged like [`audit_for_owner`](Self::audit_for_owner). For
    /// operators (`ct-relay admin audit`).
    pub async fn audit(
        &self,
        filter: &AuditFilter,
        limit: usize,
        before: Option<u64>,
    ) -> Result<Vec<AuditEntry>, CoreError> {
        let limit = limit.min(MAX_PAGE);
        let filter = filter.clone();
        Ok(self
            .read(move |store| match &filter.owner {
                // The owner index narrows the scan; the other fields filter what it yields.
                Some(owner) if filter.actor.is_none() && filter.agent.is_none() => {
                    store.audit_of_owner(owner, before, limit)
                }
                _ => store.audit_where(before, limit, &mut |e| filter.matches(e)),
            })
            .await??)
    }
}

impl State {
    /// Writes an entry for an action that goes ahead whether or not it is logged (see the module doc): a
    /// failure is logged as an error, with the entry, so the gap can be found.
    pub(crate) fn audit_or_log(&self, entry: AuditEntry) {
        if let Err(e) = self.store().append_audit(&entry) {
            tracing::error!(error = %e, entry = ?entry, "could not write an audit entry; the action went ahead");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn previews_are_short_and_one_line() {
        assert_eq!(preview("fix\nthe build"), "fix the build");
        let long = "é".repeat(500);
        let p = preview(&long);
        assert_eq!(p.chars().count(), PREVIEW_CHARS);
        assert!(p.ends_with('…'));
        assert_eq!(
            preview(&"a".repeat(PREVIEW_CHARS)),
            "a".repeat(PREVIEW_CHARS)
        );
    }

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(1_700_000_000), "2023-11-14 22:13:20 UTC");
    }
}
