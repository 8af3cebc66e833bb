//! What a task looks like in Discord. Pure functions of plain state, so each is tested without Discord:
//!
//! - [`progress`]: the live progress message (state, elapsed, compact tool activity) built from task
//!   events, and [`progress::EditThrottle`], which decides when to edit it (about once a second, the final
//!   state always).
//! - [`summary`]: the embed posted when a task ends (state, duration, turns, cost, tokens, model, agent,
//!   project, session), always within Discord's embed limits.
//! - [`escape`]: model- and tool-written text shown as exactly what it is (code blocks that cannot be broken
//!   out of, hidden and bidirectional characters written out).
//! - [`approval`]: approval requests as buttons, AskUserQuestion as select menus, the deny-reason and
//!   free-text modals, disabled versions once an approval is closed, and the Stop button.
//! - [`transcript`]: a task's whole output as Markdown (`/status`, the summary's "Full output" button), in
//!   messages or as `<task>.md`.
//! - [`tools`]: a turn's tool uses as one message (or a few), each line filled in with its result: Bash's
//!   command, exit status and output tail, an edit's diff, a compact line for the rest; attachments when long.
//! - [`output`]: whether long output (tool results, diffs) goes in messages or an attachment, within the
//!   interaction's upload limit.

pub mod approval;
pub mod escape;
pub mod output;
pub mod progress;
pub mod summary;
pub mod tools;
pub mod transcript;

/// `4s`, `1m 05s`, `2h 03m`: short enough for a progress line.
pub fn human_duration(d: std::time::Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m {:02}s", s / 60, s % 60),
        _ => format!("{}h {:02}m", s / 3600, s % 3600 / 60),
    }
}

/// Cuts `s` to at most `max` characters, ending with `…` when cut.
pub fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn durations_read_naturally() {
        assert_eq!(human_duration(Duration::from_millis(4900)), "4s");
        assert_eq!(human_duration(Duration::from_secs(65)), "1m 05s");
        assert_eq!(human_duration(Duration::from_secs(7380)), "2h 03m");
    }

    #[test]
    fn truncation_counts_characters() {
        assert_eq!(truncate("héllo", 5), "héllo");
        assert_eq!(truncate("héllo world", 5), "héll…");
        assert_eq!(truncate("héllo world", 5).chars().count(), 5);
    }
}
