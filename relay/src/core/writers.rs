//! Task events written on threads of their own in a cluster, so the core's thread decides while PostgreSQL
//! writes.
//!
//! On PostgreSQL a batch of event runs is one statement, but the core's thread used to wait out its round
//! trip and the server's work on it, and decided nothing meanwhile: the events path ran at one thread's pace,
//! the relay's part and the server's part one after the other. Now the core's thread checks a batch (what to
//! store, against each task's record), hands the write to a writer, and goes on; when the write is done, its
//! follow-up (acknowledge, publish, move queues) runs back on the core's thread ([`State::collect_written`]).
//! With [`WRITERS`] writers on connections of their own (`CoreConfig::event_writers`; a relay in a cluster
//! has them), two batches are at the server at once.
//!
//! What keeps this as safe as one thread doing everything:
//! - A task is in at most one batch in flight. A batch that names a task already in flight waits for it
//!   (the core's thread settles first), so a task's writes reach the server in order.
//! - Every other job settles first ([`State::settle`]): it waits for the batches in flight and runs their
//!   follow-ups, then sees the store and the core's state as if each batch had been written in place. So
//!   nothing else on this node writes a task while its events are in flight (a cancel's `finish_here` would
//!   otherwise write the relay's end over an older `last_seq`).
//! - A writer takes the batch's group-commit ticket right after its write, as the core's thread did (see
//!   [`crate::durable`]).
//!
//! A single relay on sled writes in place: its writes are memory copies, and a hop to another thread would
//! only add to them.
//!
//! [`State::collect_written`]: super::state::State::collect_written
//! [`State::settle`]: super::state::State::settle

use std::collections::{HashMap, HashSet};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;

use super::state::{Job, State};
use crate::durable::{GroupCommit, Ticket};
use crate::store::{SharedStore, Store};

/// Batches at the server at once in a cluster, each on a writer thread (and a pooled connection) of its own.
/// Two: while one batch is at the server, the core's thread checks the next, and PostgreSQL works on two.
pub const WRITERS: usize = 2;

/// What a write hands back to the core's thread.
pub(crate) type Followup = Box<dyn FnOnce(&mut State) + Send>;
/// A write, run on a writer thread with the store; it is given the group-commit ticket taken right after it.
pub(crate) type Write = Box<dyn FnOnce(&dyn Store, &dyn Fn() -> Ticket) -> Followup + Send>;

/// The writer threads and what the core's thread has in flight on them. Owned by the core's state.
pub(crate) struct Writers {
    queue: Option<mpsc::SyncSender<(u64, Write)>>,
    done: mpsc::Receiver<(u64, Option<Followup>)>,
    threads: Vec<JoinHandle<()>>,
    /// Batches in flight, each with the tasks it writes.
    in_flight: HashMap<u64, HashSet<String>>,
    next: u64,
}

impl std::fmt::Debug for Writers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writers")
            .field("threads", &self.threads.len())
            .field("in_flight", &self.in_flight.len())
            .finish()
    }
}

impl Writers {
    /// Starts the writers. Each wakes the core's thread through `wake` when a write is done, so a thread
    /// waiting for its next job runs the follow-up at once; the weak handle never keeps the core alive.
    pub(crate) fn start(
        store: SharedStore,
        commit: Arc<GroupCommit>,
        count: usize,
        wake: tokio::sync::mpsc::WeakSender<Job>,
    ) -> std::io::Result<Self> {
        // One batch per writer waits at most: the core's thread hands one over only when a writer is free.
        let (queue, writes) = mpsc::sync_channel::<(u64, Write)>(count);
        let writes = Arc::new(Mutex::new(writes));
        let (finished, done) = mpsc::channel();
        let mut threads = Vec::with_capacity(count);
        for n in 0..count {
            let (store, commit, writes, finished, wake) = (
                store.clone(),
                commit.clone(),
                writes.clone(),
                finished.clone(),
                wake.clone(),
            );
            threads.push(
                std::thread::Builder::new()
                    .name(format!("ct-relay-writer-{n}"))
                    .spawn(move || loop {
                        // The lock is held only while waiting for the next write, never during one.
                        let next = writes.lock().map(|rx| rx.recv());
                        let Ok(Ok((id, write))) = next else { break };
                        // A write that panics (a bug) must not leave its batch in flight for ever: the core's
                        // thread would wait for it at its next settle. (The events' own write catches a store
                        // call's panic and fails the batch properly; this is the last resort.)
                        let followup =
                            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                                write(&*store, &|| commit.ticket())
                            }))
                            .ok();
                        if finished.send((id, followup)).is_err() {
                            break;
                        }
                        if let Some(jobs) = wake.upgrade() {
                            // Full: the core's thread has jobs to run, and collects after each.
                            let _ = jobs.try_send(Job::Wake);
                        }
                    })?,
            );
        }
        Ok(Self {
            queue: Some(queue),
            done,
            threads,
            in_flight: HashMap::new(),
            next: 0,
        })
    }

    /// Whether every writer has a batch.
    pub(crate) fn busy(&self) -> bool {
        self.in_flight.len() >= self.threads.len()
    }

    /// Whether `task` is in a batch in flight.
    pub(crate) fn holds(&self, task: &str) -> bool {
        self.in_flight.values().any(|tasks| tasks.contains(task))
    }

    /// Hands `write` of `tasks` to a writer. The caller made sure one is free and none of `tasks` is in flight.
    pub(crate) fn submit(&mut self, tasks: HashSet<String>, write: Write) {
        let id = self.next;
        self.next += 1;
        self.in_flight.insert(id, tasks);
        let sent = self.queue.as_ref().map(|q| q.send((id, write)));
        if !matches!(sent, Some(Ok(()))) {
            // Every writer is gone (they only stop when this is dropped): nothing will come back.
            self.in_flight.remove(&id);
        }
    }

    /// The follow-up of a write that is done: waits for one with `block` (if any is in flight).
    pub(crate) fn done(&mut self, block: bool) -> Option<Followup> {
        loop {
            if self.in_flight.is_empty() {
                return None;
            }
            let next = if block {
                self.done.recv().ok()
            } else {
                self.done.try_recv().ok()
            };
            let Some((id, followup)) = next else {
                if block {
                    // Every writer is gone: nothing in flight will come back.
                    self.in_flight.clear();
                }
                return None;
            };
            self.in_flight.remove(&id);
            if let Some(followup) = followup {
                return Some(followup);
            }
            tracing::error!("a write on a writer thread panicked; its follow-up is lost");
        }
    }
}

impl Drop for Writers {
    /// The writers finish what they have before the store is closed (the core's state, which owns this, goes
    /// last). The core's thread settles before it stops, so normally nothing is left.
    fn drop(&mut self) {
        drop(self.queue.take());
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}
