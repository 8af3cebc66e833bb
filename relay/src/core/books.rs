//! Bookkeeping writes the core's decisions do not wait for (when an agent was last seen), made on a thread of
//! their own in a cluster.
//!
//! On PostgreSQL each such write is a transaction of several round trips; on the core's thread it held up
//! every decision behind it, and an agent's session writes one as it starts and one as it ends, so a burst of
//! reconnects (a node going away hands all its agents to the others) stalled the surviving nodes' dispatching.
//! The writes run in the order they were handed over, one at a time. When the thread falls behind, the core
//! waits for room rather than drop one. A single relay on sled writes in place: its writes are memory
//! copies, and it answers "last seen" from what it wrote itself.

use std::sync::mpsc;
use std::thread::JoinHandle;

use crate::store::{SharedStore, Store};

/// Writes waiting for the thread: a burst of reconnects' worth.
const BACKLOG: usize = 4096;

type Write = Box<dyn FnOnce(&dyn Store) + Send>;

#[derive(Debug)]
pub(crate) struct Books {
    queue: Option<mpsc::SyncSender<Write>>,
    thread: Option<JoinHandle<()>>,
}

impl Books {
    pub(crate) fn start(store: SharedStore) -> std::io::Result<Self> {
        let (queue, writes) = mpsc::sync_channel::<Write>(BACKLOG);
        let thread = std::thread::Builder::new()
            .name("ct-relay-books".into())
            .spawn(move || {
                for write in writes {
                    write(&*store);
                }
            })?;
        Ok(Self {
            queue: Some(queue),
            thread: Some(thread),
        })
    }

    /// Queues `write`; waits for room when the thread is behind.
    pub(crate) fn write(&self, write: impl FnOnce(&dyn Store) + Send + 'static) {
        if let Some(queue) = &self.queue {
            // Only fails once the thread is gone (it panicked): nothing left to write with.
            let _ = queue.send(Box::new(write));
        }
    }
}

impl Drop for Books {
    /// The queued writes are made before the store is closed (the core's state, which owns this, goes last).
    fn drop(&mut self) {
        drop(self.queue.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
