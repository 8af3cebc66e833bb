//! A user's own settings that are not about their agents: whether the bot @mentions them.

use super::state::State;
use super::tasks::TaskError;
use super::Core;
use crate::store::{AuditEntry, AuditKind};

impl Core {
    /// Turns the bot's @mentions of `user` on or off (approvals waiting for them, their tasks ending). Written
    /// on the core's thread, like the default agent, so two changes to the same user's settings never lose
    /// one another.
    pub async fn set_mentions(&self, user: &str, on: bool) -> Result<(), TaskError> {
        let user = user.to_string();
        self.run(move |state| state.set_mentions(&user, on)).await
    }
}

impl State {
    fn set_mentions(&mut self, user: &str, on: bool) -> Result<(), TaskError> {
        let mut settings = self.store().user(user)?;
        settings.quiet = !on;
        let detail = format!("mentions turned {}", if on { "on" } else { "off" });
        let entry = AuditEntry::new(AuditKind::SettingChanged, user, user, detail);
        self.store().put_user_audited(user, &settings, &entry)?;
        self.must_be_durable();
        Ok(())
    }
}
