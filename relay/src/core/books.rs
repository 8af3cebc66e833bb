//! Bookkeeping writes the core's decisions do not wait for (when an agent was last seen, a session's presence
//! released), made on threads of their own in a cluster.
//!
//! On PostgreSQL each such write is a transaction of several round trips; on the core's thread it held up
//! every decision behind it, and an agent's session writes one as it starts and two as it ends, so a burst of
//! reconnects (a node going away hands all its agents to the others) stalled the surviving nodes' dispatching.
//! The writes for one agent run in the order they were handed over, one at a time, on one of [`THREADS`]
//! threads (chosen by the agent's key), so a draining node's thousands of session ends are written side by
//! side rather than one after another while it shuts down. When a thread falls behind, the core waits for
//! room rather than drop a write. A single relay on sled writes in place: its writes are memory copies, and
//! it answers "last seen" from what it wrote itself.

use std::sync::mpsc;
use std::thread::JoinHandle;

use ct_protocol::Fingerprint;

use crate::store::{SharedStore, Store};

/// Threads writing, each on a pooled connection of its own when busy.
const THREADS: usize = 3;

/// Writes waiting for one thread: a burst of reconnects' worth.
const BACKLOG: usize = 2048;

type Write = Box<dyn FnOnce(&dyn Store) + Send>;

#[derive(Debug)]
pub(crate) struct Books {
    queues: Vec<mpsc::SyncSender<Write>>,
    threads: Vec<JoinHandle<()>>,
}

impl Books {
    pub(crate) fn start(store: SharedStore) -> std::io::Result<Self> {
        let mut books = Self {
            queues: Vec::with_capacity(THREADS),
            threads: Vec::with_capacity(THREADS),
        };
        for n in 0..THREADS {
            let (queue, writes) = mpsc::sync_channel::<Write>(BACKLOG);
            let store = store.clone();
            let thread = std::thread::Builder::new()
                .name(format!("ct-relay-books-{n}"))
                .spawn(move || {
                    for write in writes {
                        write(&*store);
                    }
                })?;
            books.queues.push(queue);
            books.threads.push(thread);
        }
        Ok(books)
    }

    /// Queues `write` about `agent` after the earlier ones about it; waits for room when its thread is behind.
    pub(crate) fn write(
        &self,
        agent: &Fingerprint,
        write: impl FnOnce(&dyn Store) + Send + 'static,
    ) {
        let queue = &self.queues[usize::from(agent.0[0]) % self.queues.len()];
        // Only fails once the thread is gone (it panicked): nothing left to write with.
        let _ = queue.send(Box::new(write));
    }
}

impl Drop for Books {
    /// The queued writes are made before the store is closed (the core's state, which owns this, goes last).
    fn drop(&mut self) {
        self.queues.clear();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::store::sled::SledStore;

    /// Writes about one agent land in the order they were handed over (a session's start before its end),
    /// whichever thread takes them, and every queued write is made before the books are gone.
    #[test]
    fn one_agents_writes_land_in_order_and_all_before_the_books_stop() {
        let dir = tempfile::tempdir().unwrap();
        let store: SharedStore = Arc::new(SledStore::open(dir.path()).unwrap());
        let books = Books::start(store).unwrap();
        let landed = Arc::new(Mutex::new(Vec::new()));
        let agents: Vec<Fingerprint> = (0..8u8).map(|i| Fingerprint([i; 32])).collect();
        for n in 0..200 {
            for agent in &agents {
                let (landed, agent) = (landed.clone(), *agent);
                books.write(&agent, move |_| landed.lock().unwrap().push((agent, n)));
            }
        }
        drop(books);
        let landed = landed.lock().unwrap();
        assert_eq!(landed.len(), 200 * agents.len());
        for agent in &agents {
            let order: Vec<u32> = landed
                .iter()
                .filter(|(a, _)| a == agent)
                .map(|(_, n)| *n)
                .collect();
            assert_eq!(order, (0..200).collect::<Vec<_>>());
        }
    }
}
