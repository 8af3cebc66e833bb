//! The per-task event log: each event stored exactly once under its sequence number, acknowledged once it is
//! durable, and published to live followers.
//!
//! Sessions hand their bursts of events to the core's thread as [`EventsJob`]s. The thread takes every event
//! job waiting at that moment, from all sessions, and writes them in one store operation
//! ([`Store::append_event_runs`](crate::store::Store::append_event_runs)); one group-commit ticket then covers
//! the lot, and each session acknowledges its events once that ticket is durable. Under load a flush therefore
//! carries many sessions' writes, and the disk sees one write and one flush for all of them. In a cluster the
//! write itself runs on a writer thread, and what follows it back on the core's thread ([`super::writers`]).

use std::collections::{BTreeSet, HashMap, HashSet};

use ct_protocol::message::CloseReason;
use ct_protocol::task::{FinalState, Role, TaskEvent};
use ct_protocol::Fingerprint;
use tokio::sync::{broadcast, oneshot};

use super::output::{self, Keep};
use super::state::{Job, State, MAX_WRITTEN};
use super::tasks::TaskError;
use super::{Core, Stopped};
use crate::durable::Ticket;
use crate::store::{now, EventRun, Store, StoreError, TaskRecord, TaskState};

/// Events buffered per follower before it is considered too slow and skips ahead (it can re-read the log).
const FOLLOW_BUFFER: usize = 1024;

/// What [`Core::follow`] returns: the task, its stored events, and a receiver for the ones that follow.
pub type Following = (
    TaskRecord,
    Vec<(u64, TaskEvent)>,
    broadcast::Receiver<(u64, TaskEvent)>,
);

/// An event as [`EventRun`] carries it: its sequence number and stored bytes (`None`: dropped under the cap).
type StoredEvent<'a> = (u64, Option<&'a [u8]>);

/// One task's run of consecutive events, as an agent sent them.
pub type Run = (String, Vec<(u64, TaskEvent)>);

/// An event on its way to the core's thread, with its JSON already encoded.
type Encoded = (u64, TaskEvent, Vec<u8>);

/// A session's burst of events, for the core's thread.
pub(crate) struct EventsJob {
    pub(crate) agent: Fingerprint,
    pub(crate) runs: Vec<(String, Vec<Encoded>)>,
    reply: oneshot::Sender<Recorded>,
}

/// What became of a burst of events.
#[derive(Debug)]
pub struct Recorded {
    /// Per task, the sequence number to acknowledge (everything up to it is stored).
    pub acks: Vec<(String, u64)>,
    /// Acknowledge only once this is durable.
    pub ticket: Option<Ticket>,
}

/// A run checked and encoded, waiting for the batch's write.
struct Prepared {
    job: usize,
    rec: TaskRecord,
    was_open: bool,
    writes: Vec<(u64, Option<Vec<u8>>)>,
    published: Vec<(u64, TaskEvent)>,
    finished: bool,
    /// Tool uses the agent allowed by a session rule, audited once they are stored.
    auto_allowed: Vec<(String, String, ct_protocol::scope::SessionScope)>,
    /// The stored record's JSON this run was checked against, when it came from what this node last wrote
    /// (see `LiveAgent::written`): written only if the record still is that.
    expected: Option<Vec<u8>>,
}

/// A batch checked, its write on the way: what its follow-up needs.
struct Batch {
    /// Per job, what to acknowledge.
    acks: Vec<Vec<(String, u64)>>,
    replies: Vec<(Fingerprint, oneshot::Sender<Recorded>)>,
    prepared: Vec<Prepared>,
    /// Agents whose events could not be stored: they reconnect to send them again.
    reconnect: BTreeSet<Fingerprint>,
    /// Tasks written on the condition that their record is still as this node last wrote it.
    conditional: HashSet<String>,
}

/// How a batch's write ended: per run, whether it was written; or why nothing was.
type Written = Result<Vec<bool>, String>;

/// What checking a run came to.
enum Checked {
    /// Nothing to store or acknowledge (a gap, or a task that is not this agent's).
    Nothing,
    /// Only events stored before (re-sent after a reconnect): acknowledged again up to this.
    Resent(u64),
    Write(Box<Prepared>),
}

impl Core {
    /// Stores a burst of events from `agent`, each exactly once; a task's end frees a slot, so the agent's
    /// queue moves on. Returns what to acknowledge, and the ticket to wait for first.
    pub async fn record_events(
        &self,
        agent: Fingerprint,
        runs: Vec<Run>,
    ) -> Result<Recorded, Stopped> {
        // Encoded here, on the session's task, so the core's thread (which checks every batch) spends its time
        // on what only it can do. An event that cannot be encoded cannot be stored either: its run stops before
        // it, unacknowledged, and the log says why.
        let runs = runs
            .into_iter()
            .map(|(task, run)| {
                let mut encoded = Vec::with_capacity(run.len());
                for (seq, event) in run {
                    match serde_json::to_vec(&event) {
                        Ok(bytes) => encoded.push((seq, event, bytes)),
                        Err(e) => {
                            tracing::error!(%task, seq, error = %e, "an event that does not encode");
                            break;
                        }
                    }
                }
                (task, encoded)
            })
            .collect();
        let (reply, done) = oneshot::channel();
        self.send(Job::Events(EventsJob { agent, runs, reply }))
            .await?;
        done.await.map_err(|_| Stopped)
    }

    /// The user's most recent tasks, newest first: those they asked for and those on their agents (for
    /// task-id autocomplete and history). Read through the store's indexes: the cost follows `limit`, not the
    /// history.
    pub async fn tasks_for(&self, user: &str, limit: usize) -> Result<Vec<TaskRecord>, TaskError> {
        let user = user.to_string();
        self.run(move |state| state.tasks_for(&user, limit)).await
    }

    /// A task's record. On a single relay, read by the core's thread. In a cluster, as the store has it, read
    /// on the blocking pool without waiting for the event writes this node has in flight: another node's
    /// reader never waits for them either, and every follower that saw a task end asks for its record (a
    /// round trip, and a wait for the event writes, on the core's thread for each task otherwise). Writes a
    /// caller was told of (an acknowledged event, a submission) have landed already.
    pub async fn task(&self, id: &str) -> Result<TaskRecord, TaskError> {
        let id = id.to_string();
        if self.bus().is_some() {
            let read = {
                let id = id.clone();
                self.read(move |store| store.task(&id)).await??
            };
            return read.ok_or(TaskError::NoSuchTask(id));
        }
        self.run(move |state| state.task(&id)).await
    }

    /// The task's stored events, and a receiver for those that follow. Subscribing happens before reading the
    /// log, so nothing falls between the two; a follower skips live events whose `seq` it already has. The log
    /// (up to the output cap) is read on the blocking pool, not on the core's thread, after the record: it may
    /// hold events (the end, too) that the record does not count yet, so a follower takes the end from the
    /// events, not from the record's state alone.
    ///
    /// In a cluster the record, too, is read on the blocking pool, once the follower is subscribed: the bot
    /// follows every task it posts, and each read would be a round trip on the core's thread. It may then miss
    /// a batch of events this node is writing at that moment; the follower gets those live, as it gets every
    /// event written after it subscribed.
    pub async fn follow(&self, id: &str) -> Result<Following, TaskError> {
        let id = id.to_string();
        let (rec, rx) = match self.bus() {
            None => {
                let id = id.clone();
                self.run(move |state| state.subscribe(&id)).await?
            }
            Some(_) => {
                let rx = {
                    let id = id.clone();
                    self.call_unsettled(move |state| state.followers_of(&id).subscribe())
                        .await?
                };
                let rec = {
                    let id = id.clone();
                    self.read(move |store| store.task(&id)).await??
                };
                let rec = rec.ok_or_else(|| TaskError::NoSuchTask(id.clone()))?;
                let (at, seq) = (id.clone(), rec.last_seq);
                self.call_unsettled(move |state| state.followed_from(&at, seq))
                    .await?;
                (rec, rx)
            }
        };
        // In a cluster another node may hold the agent and write the events: watch for its notices.
        self.watch(&id);
        let events = self.read(move |store| store.events(&id, 0)).await??;
        Ok((rec, events, rx))
    }
}

impl State {
    /// Writes a batch of event jobs in one store operation, then acknowledges, publishes and moves queues. In
    /// a cluster the write runs on a writer thread and the rest follows when it is done (see
    /// [`super::writers`]); the caller made sure a writer is free and none of the batch's tasks is in flight.
    pub(crate) fn record_batch(&mut self, jobs: Vec<EventsJob>) {
        let batch = self.check_batch(jobs);
        if batch.prepared.is_empty() {
            return self.finish_batch(batch, Ok(Vec::new()), None);
        }
        let Some(writers) = &mut self.writers else {
            let written = write_runs(self.store(), &batch.prepared).map_err(|e| e.to_string());
            return self.finish_batch(batch, written, None);
        };
        let tasks = batch
            .prepared
            .iter()
            .map(|p| p.rec.spec.task.clone())
            .collect();
        writers.submit(
            tasks,
            Box::new(move |store, ticket| {
                // A store call that panics (a bug) fails the batch like a store error, so its agents reconnect
                // and send the events again.
                let written = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    write_runs(store, &batch.prepared)
                }))
                .map_err(|_| "the store panicked".to_string())
                .and_then(|w| w.map_err(|e| e.to_string()));
                // Taken right after the write, before anything else this thread writes (see `durable`).
                let ticket = ticket();
                Box::new(move |state: &mut State| state.finish_batch(batch, written, Some(ticket)))
            }),
        );
    }

    /// Checks every run of a batch against its task's record: what to write, and what to acknowledge already.
    fn check_batch(&mut self, jobs: Vec<EventsJob>) -> Batch {
        let mut batch = Batch {
            acks: vec![Vec::new(); jobs.len()],
            replies: Vec::with_capacity(jobs.len()),
            prepared: Vec::new(),
            reconnect: BTreeSet::new(),
            conditional: HashSet::new(),
        };
        // Where a task's record, as an earlier run in this batch left it, is in `prepared` (an agent may
        // interleave tasks, and two sessions of one agent may overlap).
        let mut latest: HashMap<String, usize> = HashMap::new();
        for (i, job) in jobs.into_iter().enumerate() {
            for (id, run) in job.runs {
                // The record as an earlier run of this batch left it; else as this node last wrote it (then
                // written on the condition that it still is); else read.
                let (known, expected) = match latest.get(&id) {
                    Some(&at) => (Some(batch.prepared[at].rec.clone()), None),
                    None => match self.live.get(&job.agent).and_then(|l| l.written.get(&id)) {
                        Some((rec, body)) => (Some(rec.clone()), Some(body.clone())),
                        None => (None, None),
                    },
                };
                match self.check_run(i, &job.agent, &id, run, known) {
                    Ok(Checked::Nothing) => {}
                    Ok(Checked::Resent(seq)) => batch.acks[i].push((id, seq)),
                    Ok(Checked::Write(mut p)) => {
                        if expected.is_some() {
                            batch.conditional.insert(id.clone());
                        }
                        p.expected = expected;
                        latest.insert(id, batch.prepared.len());
                        batch.prepared.push(*p);
                    }
                    // Not acknowledged, so the agent sends it again on its next connection, which closing
                    // this one brings about; nothing is lost.
                    Err(e) => {
                        tracing::error!(task = %id, error = %e, "could not store task events");
                        batch.reconnect.insert(job.agent);
                    }
                }
            }
            batch.replies.push((job.agent, job.reply));
        }
        batch
    }

    /// What follows a batch's write: acknowledge, publish, and move the queues of agents whose tasks ended.
    /// `ticket`: taken right after the write (on a writer); else taken here.
    fn finish_batch(&mut self, batch: Batch, written: Written, ticket: Option<Ticket>) {
        let Batch {
            mut acks,
            replies,
            prepared,
            mut reconnect,
            conditional,
        } = batch;
        let mut finished = BTreeSet::new();
        match written {
            Ok(written) => {
                for (p, ok) in prepared.into_iter().zip(written) {
                    let agent = replies[p.job].0;
                    if !ok {
                        self.forget_written(&agent, &p.rec.spec.task);
                        if conditional.contains(&p.rec.spec.task) {
                            // Another node wrote the record meanwhile (it ended the task, or the agent moved
                            // to it). Not acknowledged: the agent sends the run again on its next session,
                            // which reads the record afresh.
                            tracing::warn!(task = %p.rec.spec.task, "task changed on another node meanwhile; the agent reconnects");
                            reconnect.insert(agent);
                        } else {
                            tracing::warn!(task = %p.rec.spec.task, "events for a task deleted meanwhile; dropped");
                        }
                        continue;
                    }
                    self.remember_written(&agent, &p.rec);
                    if !p.auto_allowed.is_empty() {
                        self.audit_auto_allowed(&p.rec, p.auto_allowed);
                    }
                    for (seq, event) in &p.published {
                        self.publish(&p.rec.spec.task, *seq, event);
                    }
                    self.announce(&p.rec.spec.task, p.rec.last_seq);
                    if p.finished {
                        finished.insert(agent);
                    }
                    acks[p.job].push((p.rec.spec.task.clone(), p.rec.last_seq));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, runs = prepared.len(), "could not store task events");
                // The agent sends unacknowledged events again only on a new connection: close these
                // sessions, so they come back (to this node or another) once the store answers again.
                reconnect.extend(prepared.iter().map(|p| replies[p.job].0));
            }
        }
        for agent in &reconnect {
            // Whether the failed write landed is unknown: the next burst reads the record.
            if let Some(live) = self.live.get_mut(agent) {
                live.written.clear();
            }
        }
        for agent in reconnect {
            if let Some(live) = self.live.get(&agent) {
                let _ = live.close.try_send(CloseReason::Shutdown);
            }
        }
        for agent in finished {
            if let Err(e) = self.dispatch_queued(&agent) {
                tracing::error!(error = %e, "could not dispatch queued tasks");
            }
        }
        // One ticket for the whole batch, taken after its write: its flush covers every run in it.
        let ticket = acks
            .iter()
            .any(|a| !a.is_empty())
            .then(|| ticket.unwrap_or_else(|| self.ticket()));
        for ((_, reply), acks) in replies.into_iter().zip(acks) {
            let _ = reply.send(Recorded { acks, ticket });
        }
    }

    /// Checks one task's run from `agent` against the task's record (`known`: as an earlier run in this batch
    /// left it; else read) and the output cap, and keeps what is to be stored. Nothing is written here.
    fn check_run(
        &self,
        job: usize,
        agent: &Fingerprint,
        id: &str,
        run: Vec<Encoded>,
        known: Option<TaskRecord>,
    ) -> Result<Checked, TaskError> {
        let rec = match known {
            Some(rec) => Some(rec),
            None => self.store().task(id)?,
        };
        let Some(mut rec) = rec else {
            tracing::warn!(task = id, "event for an unknown task; ignored");
            return Ok(Checked::Nothing);
        };
        if rec.agent != *agent {
            tracing::warn!(task = id, "event for a task on another agent; ignored");
            return Ok(Checked::Nothing);
        }
        let cap = self.config().max_task_output;
        let was_open = !rec.state.is_final();
        let mut writes: Vec<(u64, Option<Vec<u8>>)> = Vec::new();
        let mut published = Vec::new();
        let mut finished = false;
        let mut resent = false;
        let mut auto_allowed = Vec::new();
        for (seq, event, encoded) in run {
            if seq <= rec.last_seq {
                // Re-sent after a reconnect: already stored. Acknowledged again so the agent can let it go.
                resent = true;
                continue;
            }
            if !rec.is_dispatched() {
                // The agent was never given this task (it is queued, or the relay ended it while it was): it
                // cannot have anything to say about it. What came before in the run is still stored.
                tracing::warn!(
                    task = id,
                    "event for a task never sent to this agent; ignored"
                );
                break;
            }
            if seq != rec.last_seq + 1 {
                tracing::warn!(
                    task = id,
                    seq,
                    stored = rec.last_seq,
                    "event out of order; waiting for the gap to be re-sent"
                );
                break;
            }
            finished |= matches!(event, TaskEvent::Finished { .. });
            // The end message (often the agent's refusal, worded for its owner) lands in a thread the
            // requester reads: someone else's task gets it without the owner's folders.
            let (event, encoded) = match event {
                TaskEvent::Finished {
                    state,
                    message: Some(m),
                } if rec.spec.requester.role != Role::Owner => {
                    let redacted = TaskEvent::Finished {
                        state,
                        message: Some(super::redact::for_grantee(&m)),
                    };
                    let bytes = serde_json::to_vec(&redacted).map_err(StoreError::from)?;
                    (redacted, bytes)
                }
                other => (other, encoded),
            };
            if let TaskEvent::Tool {
                name,
                summary,
                auto_allowed: Some(rule),
                ..
            } = &event
            {
                auto_allowed.push((name.clone(), summary.clone(), rule.clone()));
            }
            let was_final = rec.state.is_final();
            apply(&mut rec, &event);
            rec.last_seq = seq;
            let kept = match output::keep(&rec, event, encoded.len() as u64, cap, was_final) {
                Keep::Unchanged(e) => Some((e, encoded)),
                Keep::Store(e) => {
                    let bytes = serde_json::to_vec(&e).map_err(StoreError::from)?;
                    Some((e, bytes))
                }
                Keep::Marker => {
                    rec.output_truncated = true;
                    tracing::warn!(
                        task = id,
                        cap,
                        "task output past the cap; later output is dropped"
                    );
                    let marker = output::marker(cap);
                    let bytes = serde_json::to_vec(&marker).map_err(StoreError::from)?;
                    Some((marker, bytes))
                }
                // Acknowledged all the same, so the agent's outbox drains; the marker already said so.
                Keep::Drop => None,
            };
            match kept {
                Some((event, bytes)) => {
                    rec.output_bytes += bytes.len() as u64;
                    writes.push((seq, Some(bytes)));
                    published.push((seq, event));
                }
                None => writes.push((seq, None)),
            }
        }
        if writes.is_empty() {
            return Ok(if resent {
                Checked::Resent(rec.last_seq)
            } else {
                Checked::Nothing
            });
        }
        rec.updated_at = now();
        Ok(Checked::Write(Box::new(Prepared {
            job,
            rec,
            was_open,
            writes,
            published,
            finished,
            auto_allowed,
            expected: None,
        })))
    }

    /// Keeps `rec`, just written with its events, for the next burst of its task (see [`LiveAgent::written`]).
    ///
    /// [`LiveAgent::written`]: super::state::LiveAgent::written
    pub(crate) fn remember_written(&mut self, agent: &Fingerprint, rec: &TaskRecord) {
        let Some(live) = self.live.get_mut(agent) else {
            return;
        };
        let id = &rec.spec.task;
        if rec.state.is_final() {
            live.written.remove(id);
            return;
        }
        if !live.written.contains_key(id) && live.written.len() >= MAX_WRITTEN {
            return;
        }
        // The JSON the store keeps for it (the condition of the next write); a record that does not encode
        // is read again next time.
        match serde_json::to_vec(rec) {
            Ok(body) => {
                live.written.insert(id.clone(), (rec.clone(), body));
            }
            Err(_) => {
                live.written.remove(id);
            }
        }
    }

    /// Drops what [`remember_written`](Self::remember_written) kept of task `id`: written some other way.
    pub(crate) fn forget_written(&mut self, agent: &Fingerprint, id: &str) {
        if let Some(live) = self.live.get_mut(agent) {
            live.written.remove(id);
        }
    }

    /// Audits uses the agent already allowed by a session rule. They have happened, so a missing entry is
    /// logged rather than refused (like a cancel); the events themselves are stored and shown either way.
    fn audit_auto_allowed(
        &self,
        rec: &TaskRecord,
        uses: Vec<(String, String, ct_protocol::scope::SessionScope)>,
    ) {
        let agent = match self.store().agent(&rec.agent) {
            Ok(Some(agent)) => agent,
            Ok(None) => return,
            Err(e) => {
                tracing::error!(error = %e, task = %rec.spec.task, "could not audit auto-allowed uses: agent unreadable");
                return;
            }
        };
        for (tool, summary, rule) in uses {
            self.audit_or_log(super::audit::auto_allowed_entry(
                &agent,
                &rec.spec.task,
                &rec.spec.requester.user,
                &tool,
                &summary,
                &rule,
            ));
        }
    }

    /// Ends a task from the relay's side (one the agent does not have, or can no longer report on), through
    /// the normal event path so followers see why.
    pub(crate) fn finish_here(
        &mut self,
        rec: &mut TaskRecord,
        state: TaskState,
        message: String,
    ) -> Result<(), TaskError> {
        let event = TaskEvent::Finished {
            state: match state {
                TaskState::Cancelled => FinalState::Cancelled,
                TaskState::Done => FinalState::Done,
                _ => FinalState::Failed,
            },
            message: Some(message),
        };
        self.forget_written(&rec.agent, &rec.spec.task);
        let seq = rec.last_seq + 1;
        let queued = !rec.is_dispatched();
        apply(rec, &event);
        rec.state = state;
        rec.last_seq = seq;
        rec.updated_at = now();
        // The relay's own end is always kept: it is short, and followers wait for it.
        let bytes = serde_json::to_vec(&event).map_err(StoreError::from)?;
        rec.output_bytes += bytes.len() as u64;
        // A task that never reached its agent ends only if no node sent it meanwhile: the record is swapped
        // first, and the event written after it.
        if queued && !self.store().finish_queued(rec)? {
            return Err(TaskError::JustStarted(rec.spec.task.clone()));
        }
        if queued && rec.files > 0 {
            // Never sent, never will be: its files would otherwise wait for retention (a person could fill
            // the disk by submitting and cancelling).
            if let Err(e) = self.store().delete_task_files(&rec.spec.task) {
                tracing::warn!(error = %e, task = %rec.spec.task, "could not forget the files of a task that never started");
            }
        }
        let run = [(seq, Some(bytes.as_slice()))];
        self.store().append_event_runs(&[EventRun {
            task: rec,
            events: &run,
            was_open: None,
        }])?;
        self.publish(&rec.spec.task, seq, &event);
        self.announce(&rec.spec.task, seq);
        tracing::info!(task = %rec.spec.task, ?state, "task ended by the relay");
        Ok(())
    }

    fn tasks_for(&self, user: &str, limit: usize) -> Result<Vec<TaskRecord>, TaskError> {
        let mine: Vec<Fingerprint> = self
            .store()
            .agents_of(user)?
            .into_iter()
            .map(|a| a.fingerprint)
            .collect();
        Ok(self.store().recent_tasks(user, &mine, limit)?)
    }

    pub(crate) fn task(&self, id: &str) -> Result<TaskRecord, TaskError> {
        self.store()
            .task(id)?
            .ok_or_else(|| TaskError::NoSuchTask(id.to_string()))
    }

    /// Subscribes to a task's live events, then reads its record: see [`Core::follow`].
    fn subscribe(
        &mut self,
        id: &str,
    ) -> Result<(TaskRecord, broadcast::Receiver<(u64, TaskEvent)>), TaskError> {
        let rx = self.followers_of(id).subscribe();
        let rec = self.task(id)?;
        self.followed_from(id, rec.last_seq);
        Ok((rec, rx))
    }

    /// Where a watch of another node's events for `id` starts (see `remote`), when nobody here followed it yet:
    /// the follower reads the log up to `seq` itself.
    fn followed_from(&mut self, id: &str, seq: u64) {
        self.follower_seq.entry(id.to_string()).or_insert(seq);
    }

    /// How far this node's followers of `id` have been sent events; `None` when nobody here follows it.
    pub(crate) fn followed_up_to(&mut self, id: &str) -> Option<u64> {
        match self.followers.get(id) {
            Some(tx) if tx.receiver_count() > 0 => {
                Some(self.follower_seq.get(id).copied().unwrap_or(0))
            }
            _ => {
                self.followers.remove(id);
                self.follower_seq.remove(id);
                None
            }
        }
    }

    /// Passes events another node stored to this node's followers, each once.
    pub(crate) fn publish_caught_up(&mut self, id: &str, events: Vec<(u64, TaskEvent)>) {
        for (seq, event) in events {
            if seq > self.follower_seq.get(id).copied().unwrap_or(0) {
                self.publish(id, seq, &event);
            }
        }
    }

    fn followers_of(&mut self, id: &str) -> broadcast::Sender<(u64, TaskEvent)> {
        self.followers.retain(|_, tx| tx.receiver_count() > 0);
        self.followers
            .entry(id.to_string())
            .or_insert_with(|| broadcast::channel(FOLLOW_BUFFER).0)
            .clone()
    }

    /// Drops a task's live channel, so whoever follows it sees it closed (the task was deleted) instead of
    /// waiting for events that will never come.
    pub(crate) fn close_followers(&mut self, id: &str) {
        self.followers.remove(id);
        self.follower_seq.remove(id);
    }

    fn publish(&mut self, id: &str, seq: u64, event: &TaskEvent) {
        let Some(tx) = self.followers.get(id) else {
            return;
        };
        let up_to = self.follower_seq.entry(id.to_string()).or_insert(0);
        // In a cluster the events just before this one may have been written by another node (the agent
        // moved here mid-task, and the old node's last write landed first). They reach this node's followers
        // only through its watch, from the store; sent now, this one would overtake them and they would be
        // skipped as old. So it is left to the watch too, which is woken to read everything after `up_to`, in
        // order (a node does not hear its own notices, so nothing else would wake it before its next poll).
        if self.bus.is_some() && seq > *up_to + 1 {
            self.watches.wake(id);
            return;
        }
        let _ = tx.send((seq, event.clone()));
        *up_to = (*up_to).max(seq);
    }
}

/// Writes a batch's runs in one store operation: per run, whether it was written (see
/// [`Store::append_event_runs_expecting`]).
fn write_runs(store: &dyn Store, prepared: &[Prepared]) -> Result<Vec<bool>, StoreError> {
    // Each run's events as the store takes them: borrowed from the prepared runs.
    let events: Vec<Vec<StoredEvent<'_>>> = prepared
        .iter()
        .map(|p| {
            p.writes
                .iter()
                .map(|(seq, bytes)| (*seq, bytes.as_deref()))
                .collect()
        })
        .collect();
    let runs: Vec<EventRun<'_>> = prepared
        .iter()
        .zip(&events)
        .map(|(p, events)| EventRun {
            task: &p.rec,
            events,
            was_open: Some(p.was_open),
        })
        .collect();
    let expected: Vec<Option<&[u8]>> = prepared.iter().map(|p| p.expected.as_deref()).collect();
    store.append_event_runs_expecting(&runs, &expected)
}

/// The state change an event implies.
fn apply(rec: &mut TaskRecord, event: &TaskEvent) {
    match event {
        TaskEvent::Started { .. } => rec.state = TaskState::Running,
        TaskEvent::Session { session_id, .. } => rec.session_id = Some(session_id.clone()),
        TaskEvent::ApprovalRequested { .. } => rec.state = TaskState::WaitingApproval,
        TaskEvent::ApprovalClosed { .. } if rec.state == TaskState::WaitingApproval => {
            rec.state = TaskState::Running
        }
        TaskEvent::Finished { state, message } => {
            rec.state = match state {
                FinalState::Done => TaskState::Done,
                FinalState::Failed => TaskState::Failed,
                FinalState::Cancelled => TaskState::Cancelled,
            };
            rec.message = message.clone();
        }
        // The record is rewritten with every event: keep only as much of the agent's branch name as git
        // itself would take.
        TaskEvent::Worktree { branch, .. } => {
            rec.worktree = Some(branch.chars().take(MAX_BRANCH_CHARS).collect())
        }
        _ => {}
    }
}

/// Longest worktree branch name kept from an agent.
const MAX_BRANCH_CHARS: usize = 255;
