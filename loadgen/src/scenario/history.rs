//! A relay with a long history: its store holds a hundred thousand finished tasks, and the paths people hit on
//! every command must not slow down with it (issue 14: "autocomplete, submit, share changes and resume checks
//! stay fast with 100,000 stored tasks").
//!
//! One agent is paired through a real relay; with the relay stopped, the history is written straight into its
//! store (a hundred users' tasks, one user's on that agent with Claude Code sessions to resume); then the relay
//! starts on it, the agent connects, and each hot path is called a few hundred times, one call at a time, as
//! a front end would. Each figure is the `Core` call alone, as the Discord front end awaits it.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use ct_protocol::task::{Requester, Role, TaskSpec};
use ct_protocol::Fingerprint;
use ct_relay::store::sled::SledStore;
use ct_relay::store::{now, AgentRecord, ShareLevel, Store, TaskRecord, TaskState};
use ct_relay::tasks::Submit;
use ed25519_dalek::SigningKey;
use tokio::time::Instant;

use crate::agent::{Behaviour, Note, Output};
use crate::dial::{Dial, Identity};
use crate::fleet::{self, Fleet};
use crate::relay::InProcessRelay;
use crate::stats::Summary;

/// Tasks asked for per autocomplete call: what Discord shows in one suggestion list.
pub const AUTOCOMPLETE: usize = 25;

/// How long each figure may take at most. A store that scans its whole history on a hot path costs a good
/// part of a second per call at 100,000 tasks; the figure then rests on fewer calls (the table says how
/// many) rather than the run taking many minutes to say the same thing.
const BUDGET: Duration = Duration::from_secs(20);

/// Where the history's records start: every task ended within the relay's retention (30 days by default),
/// so the prune at start deletes none of them.
const HISTORY_SPAN: u64 = 20 * 86_400;

/// What the run measured.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Tasks written into the store before the relay started, and how many users asked for them.
    pub stored: usize,
    pub users: usize,
    /// Writing them (one `put_task` each, then a flush).
    pub populate: Duration,
    /// `InProcessRelay::start` on that store: opening it, binding, ready to accept.
    pub start: Duration,
    /// One retention sweep with nothing due (the relay runs one at start, then hourly).
    pub sweep: Duration,
    /// `Core::tasks_for(user, 25)`: task-id autocomplete.
    pub autocomplete: Summary,
    /// Tasks the last autocomplete call returned.
    pub autocomplete_found: usize,
    /// `Core::submit_task` on the user's agent: checked, stored, flushed, dispatched.
    pub submit: Summary,
    /// The same with `resume` naming a session from the user's history (the resume check).
    pub resume: Summary,
    /// `Core::share_add` and `Core::share_remove`, each enforcing the share over the owner's open tasks.
    pub share_add: Summary,
    pub share_remove: Summary,
    /// Tasks submitted during the run that the agent finished (every one must).
    pub finished: usize,
}

/// Writes `tasks` finished tasks for `users` users into a fresh relay's store in `dir`, then calls each hot
/// path up to `calls` times.
pub async fn run(dir: &Path, tasks: usize, users: usize, calls: usize) -> Result<Outcome> {
    ensure!(
        users > 1 && tasks >= users,
        "the history needs two users or more, each with a task"
    );
    // Pair the one real agent, then stop the relay so its store can be written directly (every `Core` handle
    // gone with it: a handle keeps the store open).
    let relay = InProcessRelay::start(dir).await?;
    let who = fleet::pair(&relay.target, 0, 1, Dial::Quic, |user| {
        let core = relay.core.clone();
        async move { Ok(core.mint_pairing_token(&user).await?.0) }
    })
    .await?
    .remove(0);
    relay.stop().await?;

    let populate = {
        let (db, who) = (dir.join("db"), who.clone());
        tokio::task::spawn_blocking(move || populate(&db, &who, tasks, users)).await??
    };

    // sled lets go of its lock on the directory when its last thread has finished, a moment after the store
    // is dropped; the relay would wait for that (up to 2 s), and the wait is not the relay's start.
    let deadline = Instant::now() + Duration::from_secs(10);
    while store_locked(&dir.join("db"))? {
        ensure!(
            Instant::now() < deadline,
            "the history's store was still locked 10 s after it was closed"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let t0 = Instant::now();
    let relay = InProcessRelay::start(dir).await?;
    let start = t0.elapsed();
    let core = relay.core.clone();

    let mut fleet = Fleet::default();
    let how = Behaviour {
        dial: Dial::Quic,
        output: Output {
            texts: 1,
            text_bytes: 100,
            pace: Duration::ZERO,
        },
        reconnect: false,
        dial_limit: None,
    };
    fleet.spawn(0, who.clone(), relay.target.clone(), how);
    fleet.wait_online(1, Duration::from_secs(30)).await?;

    // The relay sweeps once as it starts; the first sweep here waits behind that one (the core runs its jobs
    // in turn), so the second is the one timed, and no figure below waits behind either.
    core.prune(now()).await?;
    let t0 = Instant::now();
    core.prune(now()).await?;
    let sweep = t0.elapsed();

    let user = who.user.clone();
    let mut s = Sampler::new(calls);
    let mut autocomplete_found = 0;
    while s.more() {
        let t0 = Instant::now();
        let found = core.tasks_for(&user, AUTOCOMPLETE).await?;
        s.took(t0.elapsed());
        autocomplete_found = found.len();
    }
    let autocomplete = s.summary();

    let mut finished = 0;
    let mut s = Sampler::new(calls);
    while s.more() {
        let k = s.samples.len();
        let took = submit_one(
            &core,
            &mut fleet,
            &user,
            format!("history submit {k}"),
            None,
        )
        .await?;
        s.took(took);
        finished += 1;
    }
    let submit = s.summary();

    let per_user = tasks / users;
    let mut s = Sampler::new(calls);
    while s.more() {
        // Sessions from all over the history, not one the store has just read.
        let k = s.samples.len();
        let session = session_id(0, (k * 7_919) % per_user);
        let took = submit_one(
            &core,
            &mut fleet,
            &user,
            format!("history resume {k}"),
            Some(session),
        )
        .await?;
        s.took(took);
        finished += 1;
    }
    let resume = s.summary();

    let grantee = user_id(&who, 1);
    let (mut added, mut removed) = (Sampler::new(calls), Sampler::new(calls));
    while added.more() {
        let t0 = Instant::now();
        core.share_add(user.as_str(), &grantee, None, ShareLevel::Standard)
            .await?;
        added.took(t0.elapsed());
        let t0 = Instant::now();
        core.share_remove(user.as_str(), &grantee).await?;
        removed.took(t0.elapsed());
    }

    fleet.stop().await;
    relay.stop().await?;
    Ok(Outcome {
        stored: per_user * users,
        users,
        populate,
        start,
        sweep,
        autocomplete,
        autocomplete_found,
        submit,
        resume,
        share_add: added.summary(),
        share_remove: removed.summary(),
        finished,
    })
}

/// Submits one task on `user`'s agent and waits until the agent has finished it, so every call meets the
/// same relay (nothing queued, nothing running). Returns how long the `submit_task` call took.
async fn submit_one(
    core: &ct_relay::core::Core,
    fleet: &mut Fleet,
    user: &str,
    prompt: String,
    resume: Option<String>,
) -> Result<Duration> {
    let t0 = Instant::now();
    let rec = core
        .submit_task(Submit {
            user: user.to_string(),
            project: "/srv/bench".into(),
            prompt,
            resume,
            ..Default::default()
        })
        .await
        .context("submitting")?;
    let took = t0.elapsed();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match fleet.next_note(deadline).await {
            Some(Note::Done { task, .. }) if task == rec.spec.task => return Ok(took),
            Some(Note::Refused { error, .. }) => bail!("the agent was refused: {error}"),
            Some(Note::Offline { .. }) => bail!("the agent went offline"),
            Some(_) => {}
            None => bail!("task {} did not finish within 30 s", rec.spec.task),
        }
    }
}

/// Calls of one figure: up to `calls` of them, within [`BUDGET`].
struct Sampler {
    calls: usize,
    began: Instant,
    samples: Vec<Duration>,
}

impl Sampler {
    fn new(calls: usize) -> Self {
        Self {
            calls,
            began: Instant::now(),
            samples: Vec::with_capacity(calls),
        }
    }

    fn more(&self) -> bool {
        self.samples.len() < self.calls
            && (self.samples.is_empty() || self.began.elapsed() < BUDGET)
    }

    fn took(&mut self, d: Duration) {
        self.samples.push(d);
    }

    fn summary(&mut self) -> Summary {
        Summary::of(std::mem::take(&mut self.samples))
    }
}

/// User `u` of the history: the paired agent's own user first, then made-up Discord ids.
fn user_id(who: &Identity, u: usize) -> String {
    match u {
        0 => who.user.clone(),
        u => (200_000_000_000_000_000u64 + u as u64).to_string(),
    }
}

/// The Claude Code session of user `u`'s task `k` (a UUID, as Claude Code's are).
fn session_id(u: usize, k: usize) -> String {
    format!("{k:08x}-5e55-4000-8000-{u:012x}")
}

/// Writes the history into the store at `db` (the relay stopped): `tasks / users` finished tasks for each of
/// `users` users, over the last [`HISTORY_SPAN`] seconds, interleaved as people use a shared relay. User 0's
/// run on the paired agent; every other user gets a made-up agent of their own. Returns how long it took.
fn populate(db: &Path, who: &Identity, tasks: usize, users: usize) -> Result<Duration> {
    let store = SledStore::open(db)?;
    let t0 = std::time::Instant::now();
    let mut agents: Vec<Fingerprint> = vec![who.fingerprint()];
    let paired_at = now() - HISTORY_SPAN - 86_400;
    for u in 1..users {
        let key = SigningKey::generate(&mut rand::rngs::OsRng).verifying_key();
        let rec = AgentRecord {
            key: key.to_bytes(),
            fingerprint: Fingerprint::of(&key),
            owner: user_id(who, u),
            name: "workstation".into(),
            paired_at,
            last_seen: Some(paired_at),
            last_transport: None,
            last_version: None,
            revoked_at: None,
            projects: None,
        };
        store.put_agent(&rec)?;
        agents.push(rec.fingerprint);
    }
    let per_user = tasks / users;
    let total = per_user * users;
    let first = now() - HISTORY_SPAN;
    for i in 0..total {
        let (u, k) = (i % users, i / users);
        let created_at = first + (i as u64 * HISTORY_SPAN) / total as u64;
        let rec = TaskRecord {
            spec: TaskSpec {
                task: format!("t_0{i:07}"),
                project: ["web", "api", "infra"][k % 3].into(),
                prompt: format!(
                    "task {k}: make the parser's error messages name the line and column, and add a test"
                ),
                requester: Requester {
                    user: user_id(who, u),
                    name: Some(format!("user {u}")),
                    role: Role::Owner,
                },
                options: Default::default(),
                resume: None,
            },
            agent: agents[u],
            // Most tasks succeed; some fail or are cancelled, as in any history.
            state: match k % 20 {
                0 => TaskState::Failed,
                1 => TaskState::Cancelled,
                _ => TaskState::Done,
            },
            created_at,
            updated_at: created_at + 90,
            last_seq: 40,
            session_id: Some(session_id(u, k)),
            message: None,
            dispatched_at: Some(created_at),
            follows: None,
            order: store.next_order()?,
            output_bytes: 2_000 + (i as u64 * 7_919) % 60_000,
            output_truncated: false,
            worktree: None,
            files: 0,
        };
        store.put_task(&rec)?;
    }
    store.flush()?;
    let took = t0.elapsed();
    drop(store);
    Ok(took)
}

/// Whether a store (in this process or another) holds sled's lock on the database at `db`: an exclusive
/// `flock` on its `db` file, which sled takes at open.
#[allow(unsafe_code)]
fn store_locked(db: &Path) -> Result<bool> {
    use std::os::fd::AsRawFd;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(db.join("db"))
        .context("opening the store's lock file")?;
    // SAFETY: flock takes only a descriptor, which `file` keeps open for the call. The lock it may take
    // belongs to this open file, and closing `file` releases it.
    let taken = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
    Ok(!taken)
}
