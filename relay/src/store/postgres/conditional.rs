//! Writes on the condition that a task's record is still the one the writer last saw: each one statement,
//! so one round trip for the core's thread instead of a read before the write (or a transaction's four).
//!
//! - Event runs: the core keeps the record of every running task it just wrote (see `core::events`), so the
//!   next burst is checked without reading the record back. In a cluster another node may have written the
//!   record meanwhile (it revoked the agent and ended its tasks; the agent moved to it): the condition turns
//!   that rare case into a run that is not written, rather than a record written over with an older view.
//! - Dispatching: the queued record as just read, swapped for the dispatched one while the agent's presence
//!   is still the session's epoch. When the record changed meanwhile, the full check of
//!   [`Store::dispatch_task`](crate::store::Store::dispatch_task) decides, as before.

use super::{event_seq, int, PgStore, TaskRow};
use crate::store::{EventRun, Result, TaskRecord};

impl PgStore {
    /// [`Store::dispatch_task_from`](crate::store::Store::dispatch_task_from): one statement when `was` is
    /// still the stored record, else the full check.
    pub(super) fn dispatch_task_from_(
        &self,
        rec: &TaskRecord,
        was: &TaskRecord,
        epoch: u64,
    ) -> Result<bool> {
        let row = TaskRow::of(rec)?;
        let was = serde_json::to_vec(was)?;
        let bound_epoch = int(epoch);
        // The presence row is locked (shared) as `dispatch_task` locks it, so a newer session's claim waits for
        // this commit, and then finds the task dispatched.
        let n = self.write(|c| {
            c.execute(
                "WITH holder AS (
                     SELECT 1 FROM ct_presence WHERE agent = $2 AND epoch = $11 FOR SHARE
                 )
                 UPDATE ct_tasks SET
                     agent = $2, requester = $3, session = $4, is_open = $5, ord = $6, updated_at = $7,
                     output_bytes = $8, body = $9
                 WHERE id = $1 AND body = $10 AND EXISTS (SELECT 1 FROM holder)",
                &[&row.columns()[..], &[&was, &bound_epoch]].concat(),
            )
        })?;
        if n == 1 {
            return Ok(true);
        }
        // Changed since it was read, or the session is no longer the agent's newest: the full check says
        // which, and whether the task may still go out.
        self.dispatch_task_(rec, epoch)
    }

    /// [`Store::append_event_runs`](crate::store::Store::append_event_runs), where a task whose `expected`
    /// body (per run; `None`: unconditional) is no longer its stored record is not written (`false`), like
    /// one deleted meanwhile. Runs of one task in one call are judged by the first run's `expected`.
    pub(super) fn append_event_runs_expecting_(
        &self,
        runs: &[EventRun<'_>],
        expected: &[Option<&[u8]>],
    ) -> Result<Vec<bool>> {
        if runs.is_empty() {
            return Ok(Vec::new());
        }
        // Several runs of one task in one call continue each other: the task's row is written once, with the
        // last run's record (and the first run's condition), and its events are all of theirs.
        let mut tasks: Vec<(TaskRow, Option<&[u8]>)> = Vec::new();
        let mut slot: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
        for (i, run) in runs.iter().enumerate() {
            let row = TaskRow::of(run.task)?;
            match slot.get(run.task.spec.task.as_str()) {
                Some(&at) => tasks[at].0 = row,
                None => {
                    slot.insert(&run.task.spec.task, tasks.len());
                    tasks.push((row, expected.get(i).copied().flatten()));
                }
            }
        }
        let mut event_tasks: Vec<&str> = Vec::new();
        let mut event_seqs: Vec<i64> = Vec::new();
        let mut event_bodies: Vec<&[u8]> = Vec::new();
        for run in runs {
            for (seq, bytes) in run.events {
                if let Some(bytes) = bytes {
                    event_tasks.push(&run.task.spec.task);
                    event_seqs.push(event_seq(*seq)?);
                    event_bodies.push(bytes);
                }
            }
        }
        let ids: Vec<&str> = tasks.iter().map(|(t, _)| t.id).collect();
        let agents: Vec<&[u8]> = tasks.iter().map(|(t, _)| t.agent).collect();
        let requesters: Vec<&str> = tasks.iter().map(|(t, _)| t.requester).collect();
        let sessions: Vec<Option<&str>> = tasks.iter().map(|(t, _)| t.session).collect();
        let open: Vec<bool> = tasks.iter().map(|(t, _)| t.is_open).collect();
        let ords: Vec<i64> = tasks.iter().map(|(t, _)| t.ord).collect();
        let updated: Vec<i64> = tasks.iter().map(|(t, _)| t.updated_at).collect();
        let output: Vec<i64> = tasks.iter().map(|(t, _)| t.output_bytes).collect();
        let task_bodies: Vec<&[u8]> = tasks.iter().map(|(t, _)| t.body.as_slice()).collect();
        let was: Vec<Option<&[u8]>> = tasks.iter().map(|(_, e)| *e).collect();
        // One statement, so one round trip whatever the number of runs and events: the tasks' rows are updated
        // first (which locks them, and finds which still exist and, where asked, are still as expected), then
        // the events of the tasks that are in `moved` are inserted, all in one multi-row insert. A task deleted
        // or changed meanwhile is in no `moved` row, so neither its record nor its events are written; an
        // event already stored (sent again after a reconnect) is kept as it was.
        let rows = self.write(|c| {
            c.query(
                "WITH run AS (
                     SELECT * FROM unnest($1::text[], $2::bytea[], $3::text[], $4::text[], $5::bool[],
                                          $6::int8[], $7::int8[], $8::int8[], $9::bytea[], $13::bytea[])
                         AS r(id, agent, requester, session, is_open, ord, updated_at, output_bytes, body, was)
                 ), moved AS (
                     UPDATE ct_tasks t SET
                         agent = run.agent, requester = run.requester, session = run.session,
                         is_open = run.is_open, ord = run.ord, updated_at = run.updated_at,
                         output_bytes = run.output_bytes, body = run.body
                     FROM run WHERE t.id = run.id AND (run.was IS NULL OR t.body = run.was)
                     RETURNING t.id
                 ), stored AS (
                     INSERT INTO ct_events (task, seq, body)
                     SELECT e.task, e.seq, e.body
                     FROM unnest($10::text[], $11::int8[], $12::bytea[]) AS e(task, seq, body)
                     WHERE e.task IN (SELECT id FROM moved)
                     ON CONFLICT (task, seq) DO NOTHING
                 )
                 SELECT id FROM moved",
                &[
                    &ids,
                    &agents,
                    &requesters,
                    &sessions,
                    &open,
                    &ords,
                    &updated,
                    &output,
                    &task_bodies,
                    &event_tasks,
                    &event_seqs,
                    &event_bodies,
                    &was,
                ],
            )
        })?;
        let mut moved = std::collections::HashSet::with_capacity(rows.len());
        for row in &rows {
            moved.insert(row.try_get::<_, String>(0)?);
        }
        Ok(runs
            .iter()
            .map(|run| moved.contains(&run.task.spec.task))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Store, TaskState};

    fn store(name: &str) -> PgStore {
        PgStore::open(&super::super::tests::database(&format!(
            "conditional_{name}"
        )))
        .unwrap()
    }

    fn queued(id: &str) -> TaskRecord {
        let mut rec = super::super::tests::task(id, 1);
        rec.state = TaskState::Queued;
        rec
    }

    fn dispatched(was: &TaskRecord) -> TaskRecord {
        let mut rec = was.clone();
        rec.dispatched_at = Some(2);
        rec.updated_at = 2;
        rec
    }

    /// The one-statement swap dispatches once, under the session's epoch only, and a stale `was` falls back
    /// to the full check (which still says no to a task dispatched already).
    #[test]
    fn dispatching_from_a_record_read_is_exactly_once() {
        let store = store("dispatch");
        let was = queued("t1");
        store.put_task(&was).unwrap();
        let epoch = store.claim_presence(&was.agent, "n1").unwrap().epoch;
        let rec = dispatched(&was);
        assert!(
            !store.dispatch_task_from(&rec, &was, epoch + 1).unwrap(),
            "not the agent's epoch"
        );
        assert!(store.dispatch_task_from(&rec, &was, epoch).unwrap());
        assert_eq!(store.task("t1").unwrap(), Some(rec.clone()));
        assert!(
            !store.dispatch_task_from(&rec, &was, epoch).unwrap(),
            "dispatched already"
        );

        // Changed meanwhile but still queued (another order, say): the full check dispatches it.
        let was = queued("t2");
        let mut changed = was.clone();
        changed.order = 5;
        store.put_task(&changed).unwrap();
        let rec = dispatched(&changed);
        assert!(store.dispatch_task_from(&rec, &was, epoch).unwrap());
        assert_eq!(store.task("t2").unwrap(), Some(rec));
    }

    /// A run conditional on the record the writer last wrote is written while that is still stored, and
    /// not at all (neither record nor events) once another writer changed the record.
    #[test]
    fn event_runs_are_written_only_over_the_record_expected() {
        let store = store("events");
        let mut rec = dispatched(&queued("t1"));
        rec.state = TaskState::Running;
        store.put_task(&rec).unwrap();
        let body = serde_json::to_vec(&rec).unwrap();

        let mut next = rec.clone();
        next.last_seq = 2;
        let events = [(1, Some(&b"{}"[..])), (2, Some(&b"{}"[..]))];
        let run = EventRun {
            task: &next,
            events: &events,
            was_open: Some(true),
        };
        let written = store
            .append_event_runs_expecting(&[run], &[Some(&body[..])])
            .unwrap();
        assert_eq!(written, [true]);
        assert_eq!(store.event_bytes("t1", 0).unwrap().len(), 2);

        // Another writer ended the task meanwhile: a run checked against the older record is refused whole.
        let mut ended = next.clone();
        ended.state = TaskState::Lost;
        ended.last_seq = 3;
        store.put_task(&ended).unwrap();
        let mut stale = next.clone();
        stale.last_seq = 3;
        let events = [(3, Some(&b"{\"late\":1}"[..]))];
        let run = EventRun {
            task: &stale,
            events: &events,
            was_open: Some(true),
        };
        let old = serde_json::to_vec(&next).unwrap();
        let written = store
            .append_event_runs_expecting(&[run], &[Some(&old[..])])
            .unwrap();
        assert_eq!(written, [false]);
        assert_eq!(store.task("t1").unwrap(), Some(ended));
        assert_eq!(store.event_bytes("t1", 0).unwrap().len(), 2);
    }
}
