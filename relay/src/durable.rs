//! Group commit: many writers, one fsync.
//!
//! An acknowledgement tells an agent it may forget an event, so the relay may send one only once the event is
//! on disk: sled keeps recent writes in its own buffers, and a relay killed (SIGKILL, power loss) before they
//! are flushed loses them. Flushing after every event would cost an fsync per event and cap a whole relay at
//! a few thousand events a second; instead each writer takes a [`Ticket`] after its write, and one flusher
//! thread flushes everything written so far and then releases every ticket that flush covered. Events that
//! arrive during one fsync ride on the next, so a busy relay does fewer fsyncs per event, not more.
//!
//! A store whose server can crash and come back (PostgreSQL) may lose writes it had accepted
//! ([`StoreError::WritesLost`]). Each ticket remembers the store's [`write mark`](Store::write_mark) when it
//! was taken, which is at least the mark of every write its holder made before it; the store says up to which
//! mark writes went to the server's run that crashed. The tickets still waiting then whose mark is up to
//! there fail ([`Broken`]): their writes may be gone. A ticket taken after a write on the new run has a
//! later mark and is flushed as usual, even by the same flush that reports the loss. (What this cannot see: a
//! holder whose write went to the old run and who took its ticket only after the store had met the new run
//! and someone wrote there. That needs the server to crash and recover between a write and the ticket its
//! writer takes next, which the relay's core takes right after its writes, with no store call between.)

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::watch;

use crate::store::{SharedStore, Store, StoreError};

/// Proof of a write that wants to be durable: it is once [`GroupCommit::durable`] reaches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ticket(u64);

/// The flusher thread and the tickets waiting for it. Dropping it flushes what is outstanding and stops the
/// thread.
#[derive(Debug)]
pub struct GroupCommit {
    shared: Arc<Shared>,
    store: Arc<dyn Flush>,
    thread: Option<JoinHandle<()>>,
}

/// What the group commit needs of a store: [`Store::flush`] and [`Store::write_mark`]. Its own trait so that
/// the tests below can make a store fail when they choose.
trait Flush: Send + Sync + std::fmt::Debug + 'static {
    fn flush(&self) -> Result<(), StoreError>;
    fn write_mark(&self) -> u64;
}

impl Flush for SharedStore {
    fn flush(&self) -> Result<(), StoreError> {
        Store::flush(&**self)
    }

    fn write_mark(&self) -> u64 {
        Store::write_mark(&**self)
    }
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    /// Which tickets are resolved, and which of those failed.
    progress: watch::Sender<Progress>,
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
    /// The write marks of the tickets not resolved yet, oldest first: (the last ticket taken at this mark,
    /// the mark). Marks never decrease from one ticket to the next (each is read under this state's lock),
    /// so tickets at or below a mark are always the oldest ones.
    marks: VecDeque<(u64, u64)>,
    stop: bool,
}

#[derive(Debug, Default)]
struct Progress {
    /// Every ticket up to this one is resolved: durable, unless it is in `failed`.
    resolved: u64,
    /// The tickets that failed, as ranges (first, last), oldest first: one range each time the store lost
    /// writes that tickets stood for, which takes a crash of its server.
    failed: Vec<(u64, u64)>,
}

impl GroupCommit {
    /// Starts the flusher for `store`. Fails only if the system refuses a thread.
    pub fn start(store: SharedStore) -> std::io::Result<Self> {
        Self::start_with(Arc::new(store), IDLE_FLUSH)
    }

    fn start_with(store: Arc<dyn Flush>, idle: Duration) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            progress: watch::Sender::new(Progress::default()),
            losses: watch::Sender::new(0),
        });
        let thread = std::thread::Builder::new()
            .name("ct-relay-flush".into())
            .spawn({
                let (shared, store) = (shared.clone(), store.clone());
                move || flusher(&shared, &*store, idle)
            })?;
        Ok(Self {
            shared,
            store,
            thread: Some(thread),
        })
    }

    /// Takes a ticket for everything this thread has written so far. Call it after the write.
    pub fn ticket(&self) -> Ticket {
        let mut state = self.shared.lock();
        state.issued += 1;
        let (issued, mark) = (state.issued, self.store.write_mark());
        match state.marks.back_mut() {
            Some((last, m)) if *m == mark => *last = issued,
            _ => state.marks.push_back((issued, mark)),
        }
        self.shared.wake.notify_one();
        Ticket(issued)
    }

    /// Resolves once `ticket`'s write is on disk, or with [`Broken`] once it never will be. Cancel-safe:
    /// dropping it loses nothing but the wait.
    pub async fn durable(&self, ticket: Ticket) -> Result<(), Broken> {
        let mut rx = self.shared.progress.subscribe();
        // The sender lives as long as `self`, which outlives this borrow: the wait cannot fail.
        let Ok(progress) = rx.wait_for(|p| p.resolved >= ticket.0).await else {
            return Err(Broken);
        };
        match progress
            .failed
            .iter()
            .any(|&(first, last)| (first..=last).contains(&ticket.0))
        {
            true => Err(Broken),
            false => Ok(()),
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

    /// Every ticket up to `upto` is durable.
    fn release(&self, upto: u64) {
        let mut state = self.lock();
        while state.marks.front().is_some_and(|&(last, _)| last <= upto) {
            state.marks.pop_front();
        }
        self.progress
            .send_modify(|p| p.resolved = p.resolved.max(upto));
    }

    /// The store lost writes up to the mark `upto`: the tickets waiting with a mark up to there fail, and the
    /// loss is counted. Returns the last ticket resolved.
    fn lost(&self, upto: u64) -> u64 {
        let mut state = self.lock();
        let mut failed = None;
        while let Some(&(last, mark)) = state.marks.front() {
            if mark > upto {
                break;
            }
            failed = Some(last);
            state.marks.pop_front();
        }
        let (mut resolved, mut tickets) = (0, 0);
        self.progress.send_modify(|p| {
            if let Some(last) = failed {
                tickets = last - p.resolved;
                p.failed.push((p.resolved + 1, last));
                p.resolved = last;
            }
            resolved = p.resolved;
        });
        drop(state);
        tracing::error!(tickets, "{}", StoreError::WritesLost { upto });
        self.losses.send_modify(|n| *n += 1);
        resolved
    }
}

/// How long writes nobody waits for (a last-seen time, a retention pass) may stay unflushed. A PostgreSQL
/// crash within this window after such a write makes the node restart (see [`Broken`]); past it they are on
/// disk, and a crash costs the node nothing.
const IDLE_FLUSH: Duration = Duration::from_secs(1);

fn flusher(shared: &Shared, store: &dyn Flush, idle: Duration) {
    // The last ticket resolved, durable or failed.
    let mut resolved = 0;
    loop {
        let target = {
            let mut state = shared.lock();
            while state.issued == resolved && !state.stop {
                let (next, waited) = shared
                    .wake
                    .wait_timeout(state, idle)
                    .unwrap_or_else(|p| p.into_inner());
                state = next;
                if waited.timed_out() && state.issued == resolved && !state.stop {
                    // Idle: flush what was written without a ticket (cheap when there is nothing). Tickets
                    // taken meanwhile for writes a loss covers fail with it.
                    drop(state);
                    if let Err(StoreError::WritesLost { upto }) = store.flush() {
                        resolved = resolved.max(shared.lost(upto));
                    }
                    state = shared.lock();
                }
            }
            if state.issued == resolved {
                return;
            }
            (state.issued, state.stop)
        };
        let (target, stopping) = target;
        // Every ticket up to `target` was taken after its write, so this flush covers them all.
        match store.flush() {
            Ok(()) => {
                shared.release(target);
                resolved = target;
            }
            Err(StoreError::WritesLost { upto }) => {
                // Retrying cannot bring back what was lost. What waited for it fails, and the relay has its
                // agents reconnect and send again what was never acknowledged; tickets for writes on the
                // server's new run wait for the next flush, at once.
                resolved = resolved.max(shared.lost(upto));
            }
            Err(e) if stopping => {
                // Shutting down (so nobody waits: a waiter borrows the group commit being dropped): one
                // attempt, rather than holding the relay's exit until the store comes back.
                tracing::error!(error = %e, "could not flush the store before stopping");
                return;
            }
            Err(e) => {
                // Nothing is released: agents keep what was not acknowledged and send it again. Retrying
                // soon, not spinning, in case the store recovers.
                tracing::error!(error = %e, "could not flush the store; acknowledgements wait");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
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
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::mpsc;

    use super::*;
    use crate::store::sled::SledStore;

    /// A store whose flushes end as the test says, when it says: each waits for the next outcome the test
    /// sends, and succeeds once the test has hung up. Its writes are only counted.
    #[derive(Debug)]
    struct Scripted {
        writes: AtomicU64,
        outcomes: Mutex<mpsc::Receiver<Result<(), StoreError>>>,
    }

    impl Scripted {
        fn new(outcomes: mpsc::Receiver<Result<(), StoreError>>) -> Arc<Self> {
            Arc::new(Self {
                writes: AtomicU64::new(0),
                outcomes: Mutex::new(outcomes),
            })
        }

        /// A write; its mark.
        fn write(&self) -> u64 {
            self.writes.fetch_add(1, Ordering::SeqCst) + 1
        }
    }

    impl Flush for Scripted {
        fn flush(&self) -> Result<(), StoreError> {
            let outcomes = self.outcomes.lock().unwrap();
            outcomes.recv().unwrap_or(Ok(()))
        }

        fn write_mark(&self) -> u64 {
            self.writes.load(Ordering::SeqCst)
        }
    }

    /// Long enough that no idle flush takes an outcome meant for a ticket's.
    const NEVER_IDLE: Duration = Duration::from_secs(3600);
    const PATIENCE: Duration = Duration::from_secs(30);

    /// PostgreSQL crashed with three writes unflushed, and came back; the store met its new run and one more
    /// write went there before the flush that reports the loss. Every waiter of the three tickets is woken
    /// with `Broken`; the fourth ticket is flushed by the next flush, and later ones as usual.
    #[tokio::test]
    async fn tickets_a_loss_covers_fail_and_a_ticket_for_a_write_after_it_is_flushed() {
        let (tx, rx) = mpsc::channel();
        let store = Scripted::new(rx);
        let commit = Arc::new(GroupCommit::start_with(store.clone(), NEVER_IDLE).unwrap());
        // Declared after the group commit, so dropped before it even when an assertion fails: its flusher
        // then stops waiting for outcomes, and the drop does not hang.
        let script = tx;
        let before: Vec<Ticket> = (0..3)
            .map(|_| {
                store.write();
                commit.ticket()
            })
            .collect();
        let mut waiters = tokio::task::JoinSet::new();
        for &t in &before {
            for _ in 0..4 {
                let commit = commit.clone();
                waiters.spawn(async move { commit.durable(t).await });
            }
        }
        let upto = store.write_mark();
        store.write();
        let after = commit.ticket();
        let losses = commit.losses();

        script.send(Err(StoreError::WritesLost { upto })).unwrap();
        let woken = tokio::time::timeout(PATIENCE, async {
            let mut woken = 0;
            while let Some(outcome) = waiters.join_next().await {
                assert!(matches!(outcome.unwrap(), Err(Broken)));
                woken += 1;
            }
            woken
        })
        .await
        .expect("every waiter of a lost write is woken");
        assert_eq!(woken, 12);
        assert_eq!(*losses.borrow(), 1);
        // A late waiter hears the same.
        for t in &before {
            assert!(matches!(commit.durable(*t).await, Err(Broken)));
        }

        script.send(Ok(())).unwrap();
        tokio::time::timeout(PATIENCE, commit.durable(after))
            .await
            .expect("the next flush resolves it")
            .expect("its write went to the new run: durable");
        store.write();
        let later = commit.ticket();
        script.send(Ok(())).unwrap();
        tokio::time::timeout(PATIENCE, commit.durable(later))
            .await
            .expect("resolved")
            .expect("durable");
        assert_eq!(*losses.borrow(), 1, "one loss, counted once");
        assert!(matches!(commit.durable(before[2]).await, Err(Broken)));
    }

    /// A flush that fails for another reason (the server unreachable) resolves nothing: the tickets wait for a
    /// flush that works, and nothing counts as lost.
    #[tokio::test]
    async fn a_flush_that_fails_otherwise_leaves_its_tickets_waiting_for_the_next() {
        let (tx, rx) = mpsc::channel();
        let store = Scripted::new(rx);
        let commit = GroupCommit::start_with(store.clone(), NEVER_IDLE).unwrap();
        let script = tx;
        store.write();
        let t = commit.ticket();
        script
            .send(Err(StoreError::Schema("the server is unreachable".into())))
            .unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(300), commit.durable(t))
                .await
                .is_err(),
            "a failed flush resolves nothing"
        );
        script.send(Ok(())).unwrap();
        tokio::time::timeout(PATIENCE, commit.durable(t))
            .await
            .expect("the retry resolves it")
            .expect("durable");
        assert_eq!(*commit.losses().borrow(), 0);
    }

    /// A loss found by an idle flush (writes nobody waited for) is counted, so the relay has its agents
    /// reconnect, and a ticket taken afterwards is flushed as usual.
    #[tokio::test]
    async fn a_loss_found_while_idle_is_counted_and_later_tickets_are_flushed() {
        let (tx, rx) = mpsc::channel();
        let store = Scripted::new(rx);
        let commit = GroupCommit::start_with(store.clone(), Duration::from_millis(10)).unwrap();
        let script = tx;
        let mut losses = commit.losses();
        let upto = store.write();
        script.send(Err(StoreError::WritesLost { upto })).unwrap();
        tokio::time::timeout(PATIENCE, losses.changed())
            .await
            .expect("the idle flush reports the loss")
            .unwrap();
        store.write();
        let t = commit.ticket();
        // Idle flushes may take some of these before the ticket's own flush does.
        let outcome = tokio::time::timeout(PATIENCE, async {
            loop {
                script.send(Ok(())).unwrap();
                if let Ok(outcome) =
                    tokio::time::timeout(Duration::from_millis(50), commit.durable(t)).await
                {
                    break outcome;
                }
            }
        })
        .await
        .expect("resolved");
        outcome.expect("a write after the loss is durable");
        assert_eq!(*losses.borrow(), 1);
    }

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
