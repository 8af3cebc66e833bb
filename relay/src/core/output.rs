//! The cap on what one task may store ([`CoreConfig::max_task_output`](crate::core::CoreConfig)).
//!
//! Under the cap every event is kept. Past it the relay still acknowledges every event (so the agent's outbox
//! drains and nothing waits on the relay), but keeps only the events that change the task's course —
//! started, session, approvals, turn results, the end — within [`STRUCTURAL_SLACK`] more bytes, and the end
//! always. The first event it drops is replaced by one marker saying so, so text is never lost without a
//! visible notice. Whatever the agent sends, one task stores at most cap + slack + one marker + one short end.

use ct_protocol::task::TaskEvent;

use crate::store::TaskRecord;

/// Bytes past the cap still allowed for events that change the task's course.
pub const STRUCTURAL_SLACK: u64 = 1024 * 1024;
/// Longest failure message kept with a task's end once the cap was passed, in bytes.
const MAX_END_MESSAGE: usize = 4096;

/// What to store for one incoming event.
#[derive(Debug, PartialEq)]
pub(crate) enum Keep {
    /// Store the event as it came (the caller may reuse bytes it already encoded).
    Unchanged(TaskEvent),
    /// Store this shortened copy of the event.
    Store(TaskEvent),
    /// Store the truncation marker in its place.
    Marker,
    /// Store nothing; the task record still moves on.
    Drop,
}

/// Text, tool calls and tool results are output; everything else changes the task's course. A tool use the
/// agent allowed by a session rule counts as a decision: nobody was asked, so the thread must still show it.
fn is_output(event: &TaskEvent) -> bool {
    matches!(
        event,
        TaskEvent::Text { .. }
            | TaskEvent::Tool {
                auto_allowed: None,
                ..
            }
            | TaskEvent::ToolResult { .. }
    )
}

/// Decides what to keep of `event` (`len` bytes as stored) for a task whose record is `rec` (with the bytes
/// stored so far); `was_final` says whether the task had already ended before this event.
pub(crate) fn keep(
    rec: &TaskRecord,
    event: TaskEvent,
    len: u64,
    cap: u64,
    was_final: bool,
) -> Keep {
    let total = rec.output_bytes.saturating_add(len);
    // Once output was dropped, later output is too, even a piece that would still fit: text resuming after
    // the marker would read as if nothing were missing.
    if total <= cap && !(rec.output_truncated && is_output(&event)) {
        return Keep::Unchanged(event);
    }
    match event {
        // The end is what followers wait for: always kept (once), with its message bounded.
        TaskEvent::Finished { state, message } if !was_final => Keep::Store(TaskEvent::Finished {
            state,
            message: message.map(|m| shorten(m, MAX_END_MESSAGE)),
        }),
        e if !is_output(&e)
            && !matches!(e, TaskEvent::Finished { .. })
            && total <= cap.saturating_add(STRUCTURAL_SLACK) =>
        {
            Keep::Unchanged(e)
        }
        _ if !rec.output_truncated => Keep::Marker,
        _ => Keep::Drop,
    }
}

/// The event stored where output started being dropped.
pub(crate) fn marker(cap: u64) -> TaskEvent {
    TaskEvent::Text {
        text: format!(
            "[output truncated: this task printed more than {}, the most the relay keeps per task; later text \
             and tool output were dropped here (approvals, turn results and the end are still kept)]",
            size_text(cap)
        ),
    }
}

/// "32 MiB", "512 KiB", "100 bytes".
pub fn size_text(bytes: u64) -> String {
    const KIB: u64 = 1024;
    const MIB: u64 = 1024 * 1024;
    if bytes >= MIB && bytes.is_multiple_of(MIB) {
        format!("{} MiB", bytes / MIB)
    } else if bytes >= KIB && bytes.is_multiple_of(KIB) {
        format!("{} KiB", bytes / KIB)
    } else {
        format!("{bytes} bytes")
    }
}

fn shorten(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use ct_protocol::task::FinalState;

    fn rec(bytes: u64, truncated: bool) -> TaskRecord {
        serde_json::from_value(serde_json::json!({
            "spec": {"task": "t_x", "project": "p", "prompt": "p",
                     "requester": {"user": "1", "role": "owner"}},
            "agent": ct_protocol::Fingerprint([0; 32]),
            "state": "running", "created_at": 0, "updated_at": 0, "last_seq": 0,
            "output_bytes": bytes, "output_truncated": truncated,
        }))
        .unwrap()
    }

    fn text() -> TaskEvent {
        TaskEvent::Text { text: "x".into() }
    }

    fn end(message: Option<String>) -> TaskEvent {
        TaskEvent::Finished {
            state: FinalState::Done,
            message,
        }
    }

    #[test]
    fn past_the_cap_an_auto_allowed_use_is_still_kept() {
        let auto = TaskEvent::Tool {
            name: "Bash".into(),
            summary: "npm test".into(),
            auto_allowed: Some(ct_protocol::scope::SessionScope::Prefix {
                prefix: "npm".into(),
            }),
            id: None,
            command: None,
        };
        assert_eq!(
            keep(&rec(95, true), auto.clone(), 10, 100, false),
            Keep::Unchanged(auto)
        );
        let plain = TaskEvent::Tool {
            name: "Bash".into(),
            summary: "npm test".into(),
            auto_allowed: None,
            id: None,
            command: None,
        };
        assert_eq!(keep(&rec(95, true), plain, 10, 100, false), Keep::Drop);
    }

    #[test]
    fn under_the_cap_everything_is_kept() {
        assert_eq!(
            keep(&rec(90, false), text(), 10, 100, false),
            Keep::Unchanged(text())
        );
    }

    #[test]
    fn past_the_cap_output_becomes_one_marker_then_nothing() {
        assert_eq!(keep(&rec(95, false), text(), 10, 100, false), Keep::Marker);
        assert_eq!(keep(&rec(95, true), text(), 10, 100, false), Keep::Drop);
        assert_eq!(
            keep(&rec(50, true), text(), 10, 100, false),
            Keep::Drop,
            "a small piece after the marker is dropped too"
        );
    }

    #[test]
    fn past_the_cap_the_course_of_the_task_is_kept_within_the_slack() {
        let turn = TaskEvent::TurnFinished {
            is_error: false,
            subtype: "success".into(),
            text: None,
            cost_usd: None,
            turns: None,
            input_tokens: None,
            output_tokens: None,
            duration_ms: None,
        };
        assert_eq!(
            keep(&rec(95, true), turn.clone(), 10, 100, false),
            Keep::Unchanged(turn.clone())
        );
        let beyond = 100 + STRUCTURAL_SLACK;
        assert_eq!(
            keep(&rec(beyond, true), turn.clone(), 10, 100, false),
            Keep::Drop
        );
        assert_eq!(
            keep(&rec(beyond, false), turn, 10, 100, false),
            Keep::Marker
        );
    }

    #[test]
    fn the_end_is_always_kept_once_and_short() {
        let beyond = 100 + STRUCTURAL_SLACK;
        let Keep::Store(TaskEvent::Finished {
            message: Some(m), ..
        }) = keep(
            &rec(beyond, true),
            end(Some("e".repeat(100_000))),
            100_000,
            100,
            false,
        )
        else {
            panic!("the end was not kept")
        };
        assert!(m.len() <= MAX_END_MESSAGE + '…'.len_utf8());
        assert_eq!(
            keep(&rec(beyond, true), end(None), 10, 100, true),
            Keep::Drop
        );
    }

    #[test]
    fn sizes_read_well() {
        assert_eq!(size_text(32 * 1024 * 1024), "32 MiB");
        assert_eq!(size_text(512 * 1024), "512 KiB");
        assert_eq!(size_text(1000), "1000 bytes");
    }
}
