//! Group commit: many writers, one fsync.
//!
//! An acknowledgement tells an agent it may forget an event, so the relay may send one only once the event is
//! on disk: sled keeps recent writes in its own buffers, and a relay killed (SIGKILL, power loss) before they
//! are flushed loses them. Flushing after every event would cost an fsync per event and cap a whole relay at
//! a few thousand events a second; instead each writer takes a [`Ticket`] after its write, and one flusher
//! thread flushes everything written so far and then releases every ticket that flush covered. Events that
//! arrive during one fsync ride on the next, so a busy relay does fewer fsyncs per event, not more.

use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::watch;

use crate::store::{SharedStore, Store};

/// Proof of a write that wants to be durable: it is once [`GroupCommit::durable`] reaches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ticket(u64);

/// The flusher thread and the tickets waiting for it. Dropping it flushes what is outstanding and stops the
/// thread.
#[derive(Debug)]
pub struct GroupCommit {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    /// The highest ticket known durable.
    durable: watch::Sender<u64>,
    /// The highest ticket whose writes the store may have lost (PostgreSQL crashed before they reached its
    /// disk): those tickets fail rather than become durable.
    failed: watch::Sender<u64>,
    /// How many times the store lost writes (see [`GroupCommit::losses`]).
    losses: watch::Sender<u64>,
}

/// The store lost writes it had accepted: this ticket will never be durable.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the store lost writes in a crash; try again")]
pub struct Broken;

#[derive(Debug, Default)]
struct State {
    /// The last ticket handed out.
    issued: u64,
    stop: bool,
}

impl GroupCommit {
    /// Starts the flusher for `store`. Fails only if the system refuses a thread.
    pub fn start(store: SharedStore) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            durable: watch::Sender::new(0),
            failed: watch::Sender::new(0),
            losses: watch::Sender::new(0),
        });
        let thread = std::thread::Builder::new()
            .name("ct-relay-flush".into())
            .spawn({
                let shared = shared.clone();
                move || flusher(&shared, &*store)
            })?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// Takes a ticket for everything this thread has written so far. Call it after the write.
    pub fn ticket(&self) -> Ticket {
        let mut state = self.shared.lock();
        state.issued += 1;
        self.shared.wake.notify_one();
        Ticket(state.issued)
    }

    /// Resolves once `ticket`'s write is on disk, or with [`Broken`] once it never will be. Cancel-safe:
    /// dropping it loses nothing but the wait.
    pub async fn durable(&self, ticket: Ticket) -> Result<(), Broken> {
        let mut rx = self.shared.durable.subscribe();
        let mut failed = self.shared.failed.subscribe();
        // The senders live as long as `self`, which outlives this borrow: the waits cannot fail.
        tokio::select! {
            biased;
            _ = rx.wait_for(|done| *done >= ticket.0) => Ok(()),
            _ = failed.wait_for(|f| *f >= ticket.0) => Err(Broken),
        }
    }

    /// Changes each time the store lost writes it had accepted: whoever relied on what was written before
    /// (an agent's session, whose presence claim may be gone) must start over.
    pub fn losses(&self) -> watch::Receiver<u64> {
        self.shared.losses.subscribe()
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// How long writes nobody waits for (a last-seen time, a retention pass) may stay unflushed. A PostgreSQL
/// crash within this window after such a write makes the node restart (see [`Broken`]); past it they are on
/// disk, and a crash costs the node nothing.
const IDLE_FLUSH: Duration = Duration::from_secs(1);

fn flusher(shared: &Shared, store: &dyn Store) {
    let mut flushed = 0;
    loop {
        let target = {
            let mut state = shared.lock();
            while state.issued == flushed && !state.stop {
                let (next, waited) = shared
                    .wake
                    .wait_timeout(state, IDLE_FLUSH)
                    .unwrap_or_else(|p| p.into_inner());
                state = next;
                if waited.timed_out() && state.issued == flushed && !state.stop {
                    // Idle: flush what was written without a ticket (cheap when there is nothing).
                    drop(state);
                    if let Err(crate::store::StoreError::WritesLost) = store.flush() {
                        lost(shared, flushed);
                    }
                    state = shared.lock();
                }
            }
            if state.issued == flushed {
                return;
            }
            state.issued
        };
        // Every ticket up to `target` was taken after its write, so this flush covers them all.
        match store.flush() {
            Ok(_) => {
                flushed = target;
                shared.durable.send_replace(target);
            }
            Err(crate::store::StoreError::WritesLost) => {
                // Retrying cannot help: what was lost is gone. What waited for it fails, and the relay has
                // its agents reconnect and send again what was never acknowledged.
                lost(shared, target);
                flushed = target;
            }
            Err(e) => {
                // Nothing is released: agents keep what was not acknowledged and send it again. Retrying
                // soon, not spinning, in case the disk recovers.
                tracing::error!(error = %e, "could not flush the store; acknowledgements wait");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

/// Fails every ticket up to `upto` and counts a loss.
fn lost(shared: &Shared, upto: u64) {
    tracing::error!("{}", crate::store::StoreError::WritesLost);
    shared.failed.send_replace(upto);
    shared.losses.send_modify(|n| *n += 1);
}

impl Drop for GroupCommit {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sled::SledStore;

    #[tokio::test]
    async fn a_ticket_resolves_after_a_flush_that_covers_its_write() {
        let dir = tempfile::tempdir().unwrap();
        let store: SharedStore = Arc::new(SledStore::open(dir.path()).unwrap());
        let commit = GroupCommit::start(store.clone()).unwrap();
        store.put_thread_mark("k", b"v").unwrap();
        let t1 = commit.ticket();
        store.put_thread_mark("k2", b"v").unwrap();
        let t2 = commit.ticket();
        assert!(t2 > t1);
        tokio::time::timeout(Duration::from_secs(10), commit.durable(t2))
            .await
            .expect("a flush releases the ticket")
            .expect("durable");
        // An earlier ticket is covered by the same flush.
        tokio::time::timeout(Duration::from_millis(100), commit.durable(t1))
            .await
            .expect("covered already")
            .expect("durable");
    }

    #[tokio::test]
    async fn many_concurrent_writers_all_complete() {
        let dir = tempfile::tempdir().unwrap();
        let store: SharedStore = Arc::new(SledStore::open(dir.path()).unwrap());
        let commit = Arc::new(GroupCommit::start(store.clone()).unwrap());
        let mut waits = tokio::task::JoinSet::new();
        for i in 0..200u32 {
            let (store, commit) = (store.clone(), commit.clone());
            waits.spawn(async move {
                store.put_thread_mark(&i.to_string(), b"v").unwrap();
                let t = commit.ticket();
                commit.durable(t).await.expect("durable");
            });
        }
        tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(r) = waits.join_next().await {
                r.unwrap();
            }
        })
        .await
        .expect("every ticket is released");
    }
}
