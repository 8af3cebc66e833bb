//! Task events waiting for the relay's acknowledgement: the agent's half of "nothing a task printed is lost".
//!
//! Each task's events are numbered from 1 as they are produced. An event stays here until the relay
//! acknowledges it (cumulatively); after a reconnect, everything still here is sent again, in order, and the
//! relay drops what it already stored. Events are never dropped to save memory: when too much is waiting,
//! [`Outbox::is_full`] tells the caller to stop reading Claude Code's output until acknowledgements arrive,
//! which pushes back on the CLI through its stdout pipe.

use std::collections::{HashMap, VecDeque};

use ct_protocol::task::TaskEvent;
use ct_protocol::AgentMessage;

/// Unacknowledged bytes (approximate, JSON size) above which the outbox is full.
pub const DEFAULT_LIMIT: usize = 64 * 1024 * 1024;

#[derive(Debug, Default)]
struct TaskLog {
    next_seq: u64,
    /// Highest seq handed to the current link; everything after it is still to send.
    sent: u64,
    unacked: VecDeque<(u64, TaskEvent, usize)>,
    finished: bool,
}

/// Per-task sequenced events awaiting acknowledgement.
#[derive(Debug)]
pub struct Outbox {
    tasks: HashMap<String, TaskLog>,
    bytes: usize,
    limit: usize,
}

impl Default for Outbox {
    fn default() -> Self {
        Self::new(DEFAULT_LIMIT)
    }
}

impl Outbox {
    pub fn new(limit: usize) -> Self {
        Self {
            tasks: HashMap::new(),
            bytes: 0,
            limit,
        }
    }

    /// Numbers a new event and keeps it until acknowledged; it goes out with the next [`Outbox::take_unsent`].
    pub fn push(&mut self, task: &str, event: TaskEvent) -> AgentMessage {
        let size = serde_json::to_vec(&event).map_or(0, |v| v.len());
        let log = self.tasks.entry(task.to_string()).or_default();
        log.next_seq += 1;
        let seq = log.next_seq;
        log.finished |= matches!(event, TaskEvent::Finished { .. });
        log.unacked.push_back((seq, event.clone(), size));
        self.bytes += size;
        AgentMessage::Event {
            task: task.to_string(),
            seq,
            event,
        }
    }

    /// Forgets every event of `task` up to `seq`. A finished task with nothing left unacknowledged is gone.
    pub fn ack(&mut self, task: &str, seq: u64) {
        let Some(log) = self.tasks.get_mut(task) else {
            return;
        };
        while log.unacked.front().is_some_and(|(s, _, _)| *s <= seq) {
            if let Some((_, _, size)) = log.unacked.pop_front() {
                self.bytes -= size;
            }
        }
        if log.finished && log.unacked.is_empty() {
            self.tasks.remove(task);
        }
    }

    /// Events not yet handed to the current link, each task's in sequence order, now marked as handed over.
    pub fn take_unsent(&mut self) -> Vec<AgentMessage> {
        let mut out = Vec::new();
        for (task, log) in &mut self.tasks {
            for (seq, event, _) in log.unacked.iter().filter(|(seq, _, _)| *seq > log.sent) {
                out.push(AgentMessage::Event {
                    task: task.clone(),
                    seq: *seq,
                    event: event.clone(),
                });
            }
            log.sent = log.next_seq;
        }
        out
    }

    /// A new link: everything unacknowledged is to be sent again (the relay drops what it already stored).
    pub fn rewind(&mut self) {
        for log in self.tasks.values_mut() {
            log.sent = log
                .unacked
                .front()
                .map_or(log.next_seq, |(seq, _, _)| seq - 1);
        }
    }

    /// Whether `task` has events here (running, or finished and not yet fully acknowledged).
    pub fn knows(&self, task: &str) -> bool {
        self.tasks.contains_key(task)
    }

    /// Everything unacknowledged, task by task in sequence order: what to send again after a reconnect.
    pub fn pending(&self) -> Vec<AgentMessage> {
        let mut out = Vec::new();
        for (task, log) in &self.tasks {
            for (seq, event, _) in &log.unacked {
                out.push(AgentMessage::Event {
                    task: task.clone(),
                    seq: *seq,
                    event: event.clone(),
                });
            }
        }
        out
    }

    /// Tasks not yet finished, for the `Running` report after each handshake.
    pub fn running(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .tasks
            .iter()
            .filter(|(_, l)| !l.finished)
            .map(|(t, _)| t.clone())
            .collect();
        out.sort();
        out
    }

    /// Too much is waiting for acknowledgement: stop producing until some arrives.
    pub fn is_full(&self) -> bool {
        self.bytes >= self.limit
    }

    /// Approximate unacknowledged bytes.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ct_protocol::task::FinalState;

    fn text(t: &str) -> TaskEvent {
        TaskEvent::Text { text: t.into() }
    }

    fn seqs(msgs: &[AgentMessage]) -> Vec<(String, u64)> {
        msgs.iter()
            .map(|m| match m {
                AgentMessage::Event { task, seq, .. } => (task.clone(), *seq),
                other => panic!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn numbers_per_task_and_resends_only_what_is_unacknowledged() {
        let mut o = Outbox::default();
        for i in 0..3 {
            o.push("a", text(&i.to_string()));
        }
        o.push("b", text("x"));
        o.ack("a", 2);
        let mut pending = seqs(&o.pending());
        pending.sort();
        assert_eq!(pending, vec![("a".into(), 3), ("b".into(), 1)]);
        assert_eq!(o.running(), vec!["a".to_string(), "b".to_string()]);
    }

    #[test]
    fn a_finished_task_leaves_once_fully_acknowledged_and_is_not_reported_running() {
        let mut o = Outbox::default();
        o.push("a", text("hi"));
        o.push(
            "a",
            TaskEvent::Finished {
                state: FinalState::Done,
                message: None,
            },
        );
        assert!(
            o.running().is_empty(),
            "finished tasks are not running even before the ack"
        );
        assert_eq!(o.pending().len(), 2);
        o.ack("a", 1);
        assert_eq!(o.pending().len(), 1);
        o.ack("a", 2);
        assert!(o.pending().is_empty() && o.bytes() == 0);
        o.ack("a", 9); // a late duplicate ack is harmless
    }

    #[test]
    fn hands_each_event_to_a_link_once_and_everything_unacknowledged_again_after_rewind() {
        let mut o = Outbox::default();
        o.push("a", text("1"));
        o.push("a", text("2"));
        assert_eq!(
            seqs(&o.take_unsent()),
            vec![("a".into(), 1), ("a".into(), 2)]
        );
        assert!(o.take_unsent().is_empty(), "nothing is handed over twice");
        o.push("a", text("3"));
        assert_eq!(seqs(&o.take_unsent()), vec![("a".into(), 3)]);
        o.ack("a", 1);
        o.rewind();
        assert_eq!(
            seqs(&o.take_unsent()),
            vec![("a".into(), 2), ("a".into(), 3)]
        );
        o.ack("a", 3);
        o.rewind();
        assert!(o.take_unsent().is_empty());
        o.push("a", text("4"));
        assert_eq!(seqs(&o.take_unsent()), vec![("a".into(), 4)]);
    }

    #[test]
    fn fills_up_instead_of_dropping() {
        let mut o = Outbox::new(1000);
        while !o.is_full() {
            o.push("a", text(&"x".repeat(100)));
        }
        let n = o.pending().len();
        assert!(n >= 8, "each event is about 125 bytes of JSON: {n}");
        o.ack("a", n as u64);
        assert!(!o.is_full() && o.bytes() == 0);
    }
}
