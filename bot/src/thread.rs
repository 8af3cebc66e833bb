//! A task's thread: which task a thread is following now, and the follower that turns the task's events
//! into Discord messages.
//!
//! A thread follows a chain of tasks: `/task` starts the first, and a follow-up after a task ended starts a
//! new task that resumes the same Claude Code session ([`Backend::reply`] returns it), which the same thread
//! then follows. [`Threads`] remembers, per thread, the current task and the session settings `/cc` changes;
//! in memory only, but the thread's name starts with the first task's id, so a relay that restarted finds
//! the chain again from the thread (see `dispatch`).
//!
//! Each task gets a follower ([`follow`]) that posts, in the thread and always with the bot token (never the
//! interaction webhook, whose token dies after 15 minutes while tasks may run for hours):
//! - a progress message with a Stop button, edited at most about once a second ([`EditThrottle`]);
//! - assistant text, split at 2,000 characters, or as an attachment when it is long ([`output::place`]);
//! - each turn's tool uses in one message (more past 2,000 characters), edited as results come, with long
//!   output and diffs attached in messages of their own (`TurnMessages`, [`crate::render::tools`]);
//! - one message per approval request with its buttons, edited (disabled, with the outcome) when the agent
//!   reports it closed;
//! - the summary embed when the task ends.
//!
//! The follower keeps a [`ThreadMark`] with the backend as it posts (the thread, the progress message, the
//! last event posted, the messages of approvals still open) and forgets it after the summary. A relay that
//! restarts — or the next leader of a cluster ([`crate::leader`]) — finds the marks of followers that had not
//! finished and starts them again from there: the thread carries on without anyone writing in it, and
//! without posting anything twice. A follower stopped on purpose stops between events, its mark exact; one
//! that died between a post and its mark is covered by the posts' nonces (Discord's `enforce_nonce` returns
//! the message already there).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::num::NonZeroU64;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ct_protocol::scope::SessionScope;
use ct_protocol::task::TaskEvent;
use serde_json::Value;
use serenity::all::{
    ButtonStyle, ChannelId, CreateActionRow, CreateAllowedMentions, CreateButton, CreateMessage,
    EditMessage, Message, MessageId, Nonce, UserId,
};
use tokio::sync::broadcast::error::RecvError;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::backend::{Backend, TaskInfo, ThreadMark};
use crate::render::approval::{
    approval_components, approval_content, attachment, auto_allowed_line, closed_content,
    stop_button, ApprovalView, Closed,
};
use crate::render::output::{place, OutputKind, Placement, DEFAULT_ATTACHMENT_LIMIT};
use crate::render::progress::{EditDecision, EditThrottle, Phase, TaskProgress, EDIT_INTERVAL};
use crate::render::summary::{summary_embed, SummaryContext};
use crate::render::tools::{Change, ToolUse, TurnTools};
use crate::rest::{Rest, Upload};

/// Discord's JSON error code for a channel (here: a thread) that does not exist, or no longer does.
const UNKNOWN_CHANNEL: u64 = 10_003;

/// Threads remembered at once; the oldest are forgotten first (and found again from their name if used).
const MAX_THREADS: usize = 10_000;

/// What a thread is following, and the `/cc` settings for its next follow-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThreadInfo {
    pub thread: ChannelId,
    /// The chain's current task: follow-ups, `/cc` and the Stop button act on it.
    pub task: String,
    pub requester: String,
    pub owner: String,
    pub agent: String,
    pub project: String,
    /// The model the chain runs with (what a fresh task after `/cc clear` asks for).
    pub model: Option<String>,
    pub mode: Option<String>,
    /// `/cc model`: the next follow-up starts a task with this model, resuming the session.
    pub next_model: Option<String>,
    /// `/cc clear`: the next follow-up starts a new session instead of resuming.
    pub fresh: bool,
    /// The guild's upload limit, from the interaction that started the thread.
    pub upload_limit: u64,
}

impl ThreadInfo {
    pub fn new(thread: ChannelId, task: &TaskInfo, upload_limit: u64) -> Self {
        Self {
            thread,
            task: task.id.clone(),
            requester: task.requester.clone(),
            owner: task.owner.clone(),
            agent: task.agent.clone(),
            project: task.project.clone(),
            model: task.model.clone(),
            mode: task.mode.clone(),
            next_model: None,
            fresh: false,
            upload_limit,
        }
    }
}

/// An approval request posted in a thread and still open.
#[derive(Debug, Clone)]
pub struct OpenApproval {
    pub view: ApprovalView,
    pub channel: ChannelId,
    /// Set once posted. The approval is remembered before it is posted: a click can arrive as soon as
    /// Discord has the message, before our call returns.
    pub message: Option<MessageId>,
    /// Who answered it through Discord, shown once the agent reports it closed.
    pub decided_by: Option<UserId>,
    /// The "allow for the session" rule chosen here, shown once the agent reports it closed.
    pub rule: Option<SessionScope>,
}

#[derive(Debug, Default)]
struct State {
    threads: HashMap<ChannelId, ThreadInfo>,
    /// Insertion order, for forgetting the oldest.
    order: VecDeque<ChannelId>,
    by_task: HashMap<String, ChannelId>,
    /// Open approvals by (task, approval id).
    approvals: HashMap<(String, String), OpenApproval>,
    /// Tasks with a live follower, so one task is never followed twice.
    following: HashSet<String>,
    /// Tasks whose follower posted the summary here: never followed again by this bot, even from a mark read
    /// just before the follower forgot it (the leader's scan of marks races with followers finishing).
    finished: HashSet<String>,
    /// Channels known not to be task threads, so messages there cost no lookup.
    not_threads: HashSet<ChannelId>,
}

/// The bot's memory of its task threads.
#[derive(Debug, Default)]
pub struct Threads {
    state: Mutex<State>,
}

impl Threads {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records (or replaces) what `info.thread` follows.
    pub fn insert(&self, info: ThreadInfo) {
        let mut st = self.lock();
        st.by_task.insert(info.task.clone(), info.thread);
        if st.threads.insert(info.thread, info.clone()).is_none() {
            st.order.push_back(info.thread);
        }
        while st.order.len() > MAX_THREADS {
            if let Some(old) = st.order.pop_front() {
                if let Some(gone) = st.threads.remove(&old) {
                    st.by_task.retain(|_, t| *t != gone.thread);
                }
            }
        }
    }

    pub fn get(&self, thread: ChannelId) -> Option<ThreadInfo> {
        self.lock().threads.get(&thread).cloned()
    }

    /// Changes what a thread remembers; `None` if the thread is unknown.
    pub fn update<T>(&self, thread: ChannelId, f: impl FnOnce(&mut ThreadInfo) -> T) -> Option<T> {
        let mut st = self.lock();
        let info = st.threads.get_mut(&thread)?;
        let out = f(info);
        let task = info.task.clone();
        st.by_task.insert(task, thread);
        Some(out)
    }

    /// Whether `channel` could be a task thread not remembered yet (worth looking up).
    pub fn maybe_thread(&self, channel: ChannelId) -> bool {
        !self.lock().not_threads.contains(&channel)
    }

    /// Remembers that `channel` is not a task thread.
    pub fn not_a_thread(&self, channel: ChannelId) {
        let mut st = self.lock();
        // Bounded: forgetting them all only costs a lookup each again.
        if st.not_threads.len() >= MAX_THREADS {
            st.not_threads.clear();
        }
        st.not_threads.insert(channel);
    }

    /// The thread a task is shown in.
    pub fn thread_of(&self, task: &str) -> Option<ChannelId> {
        self.lock().by_task.get(task).copied()
    }

    /// Marks `task` followed; false if it already is, or its follower already finished here.
    fn start_following(&self, task: &str) -> bool {
        let mut st = self.lock();
        !st.finished.contains(task) && st.following.insert(task.to_string())
    }

    fn stop_following(&self, task: &str, finished: bool) {
        let mut st = self.lock();
        st.following.remove(task);
        if finished {
            // Bounded: forgetting them only matters for a mark read in the instant before it was forgotten.
            if st.finished.len() >= MAX_THREADS {
                st.finished.clear();
            }
            st.finished.insert(task.to_string());
        }
    }

    /// Whether `task` has a follower here, or had one that posted its summary.
    pub fn is_followed(&self, task: &str) -> bool {
        let st = self.lock();
        st.following.contains(task) || st.finished.contains(task)
    }

    /// Tasks with a live follower here.
    pub fn followed(&self) -> usize {
        self.lock().following.len()
    }

    pub fn approval(&self, task: &str, approval: &str) -> Option<OpenApproval> {
        self.lock()
            .approvals
            .get(&(task.to_string(), approval.to_string()))
            .cloned()
    }

    /// Changes an open approval; `None` if it is not open (or not known here).
    pub fn update_approval<T>(
        &self,
        task: &str,
        approval: &str,
        f: impl FnOnce(&mut OpenApproval) -> T,
    ) -> Option<T> {
        self.lock()
            .approvals
            .get_mut(&(task.to_string(), approval.to_string()))
            .map(f)
    }

    fn open_approval(&self, task: &str, a: OpenApproval) {
        self.lock()
            .approvals
            .insert((task.to_string(), a.view.approval.clone()), a);
    }

    fn close_approval(&self, task: &str, approval: &str) -> Option<OpenApproval> {
        self.lock()
            .approvals
            .remove(&(task.to_string(), approval.to_string()))
    }

    /// The task's open approvals that have a message, by approval id: what a thread mark keeps.
    fn approval_messages(&self, task: &str) -> BTreeMap<String, u64> {
        self.lock()
            .approvals
            .iter()
            .filter(|((t, _), _)| t == task)
            .filter_map(|((_, approval), open)| Some((approval.clone(), open.message?.get())))
            .collect()
    }

    fn close_all_approvals(&self, task: &str) -> Vec<OpenApproval> {
        let mut st = self.lock();
        let keys: Vec<_> = st
            .approvals
            .keys()
            .filter(|(t, _)| t == task)
            .cloned()
            .collect();
        keys.iter().filter_map(|k| st.approvals.remove(k)).collect()
    }
}

/// What a follower needs from the bot.
#[derive(Clone)]
pub struct FollowerEnv {
    pub backend: Arc<dyn Backend>,
    pub rest: Rest,
    pub threads: Arc<Threads>,
}

impl std::fmt::Debug for FollowerEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FollowerEnv")
            .field("rest", &self.rest)
            .finish_non_exhaustive()
    }
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Wall-clock time since the task was created (Unix seconds), so a follower started after a restart
/// still shows the task's real age.
fn age(created_at: u64) -> Duration {
    Duration::from_secs(unix_now().saturating_sub(created_at))
}

/// Merge / Keep / Discard for a finished task's worktree branch.
fn worktree_row(task: &str) -> Vec<CreateActionRow> {
    use ct_protocol::task::WorktreeAction;
    let buttons: Result<Vec<CreateButton>, _> = [
        (WorktreeAction::Merge, "Merge", ButtonStyle::Success),
        (WorktreeAction::Keep, "Keep branch", ButtonStyle::Secondary),
        (WorktreeAction::Discard, "Discard", ButtonStyle::Danger),
    ]
    .into_iter()
    .map(|(action, label, style)| {
        crate::custom_id::Action::Worktree {
            task: task.to_string(),
            action,
        }
        .encode()
        .map(|id| CreateButton::new(id).label(label).style(style))
    })
    .collect();
    match buttons {
        Ok(b) => vec![CreateActionRow::Buttons(b)],
        Err(err) => {
            warn!(%err, task, "no worktree buttons");
            Vec::new()
        }
    }
}

fn stop_row(task: &str, disabled: bool) -> Vec<CreateActionRow> {
    match stop_button(task, disabled) {
        Ok(b) => vec![CreateActionRow::Buttons(vec![b])],
        Err(err) => {
            warn!(%err, task, "no Stop button");
            Vec::new()
        }
    }
}

/// One task's follower: its state between events.
struct Follower {
    env: FollowerEnv,
    thread: ChannelId,
    task: TaskInfo,
    upload_limit: u64,
    progress: TaskProgress,
    progress_msg: Option<MessageId>,
    throttle: EditThrottle,
    last_seq: u64,
    /// Carrying on from a mark left before a restart: events up to `last_seq` are already in the thread.
    resumed: bool,
    /// From that mark: approvals that were open, with their messages, to be reopened as their requests replay.
    reopen: BTreeMap<String, u64>,
    /// From that mark: the turn whose tool message was open, to be rebuilt on its messages as it replays.
    reopen_turn: Option<(u64, Vec<u64>)>,
    /// Messages posted so far for the event `last_seq`: with it, each message's nonce.
    posts: std::sync::atomic::AtomicU32,
    /// Discord said the thread no longer exists: nothing more is posted or edited.
    gone: std::sync::atomic::AtomicBool,
    /// The tool messages of the turn in hand.
    tools: TurnMessages,
}

/// Uses remembered after their turn's message closed (or from before a restart), for results that come
/// later; the oldest are forgotten first.
const MAX_EARLIER_TOOLS: usize = 64;

/// A turn's tool uses as shown in the thread ([`TurnTools`]) and the messages showing them.
///
/// A turn's message is posted at once with its first tool (and another when it would pass 2,000 characters),
/// then edited as results come, at most once per [`EDIT_INTERVAL`] after its last post or edit (the progress
/// message's pace); attachments go at once, in messages of their own. Text, a turn's end or the task's end
/// closes the message: its last edit is made first, waiting for its turn if it must (at most that interval).
///
/// Restarts: the mark never claims an event whose edit is still waiting (see [`Follower::shown_through`]), so
/// nothing is lost, and it names the open turn's messages: a follower that carries on rebuilds that turn from
/// the replayed events and fills in its lines in place ([`Follower::reopen_tools`]). A result whose use was in
/// an earlier, closed turn gets a line of its own, named by its use (remembered from the replayed events). A
/// clean stop makes the waiting edit first, so a hand-over repeats nothing; after a crash, at most about a
/// second of tool lines may show again (every post has a nonce, so no message is posted twice).
#[derive(Default)]
struct TurnMessages {
    turn: Option<TurnTools>,
    /// The message of each part, once posted.
    messages: Vec<Option<MessageId>>,
    /// Parts whose edit waits for the throttle.
    dirty: BTreeSet<usize>,
    /// The first event whose change waits in `dirty`.
    dirty_since: Option<u64>,
    /// When a tool message was last posted or edited: the next edit waits until [`EDIT_INTERVAL`] after.
    last_write: Option<Instant>,
    earlier: VecDeque<ToolUse>,
}

impl TurnMessages {
    /// When the waiting edits may be made (now or earlier: at once); `None` when nothing waits.
    fn due(&self) -> Option<Instant> {
        if self.dirty.is_empty() {
            return None;
        }
        Some(
            self.last_write
                .map_or_else(Instant::now, |t| t + EDIT_INTERVAL),
        )
    }

    fn remember(&mut self, tool: ToolUse) {
        if self.earlier.len() >= MAX_EARLIER_TOOLS {
            self.earlier.pop_front();
        }
        self.earlier.push_back(tool);
    }

    /// The remembered use a result answers (by id).
    fn earlier(&self, ev: &TaskEvent) -> Option<&ToolUse> {
        let TaskEvent::ToolResult {
            tool_use_id: Some(id),
            ..
        } = ev
        else {
            return None;
        };
        self.earlier
            .iter()
            .rev()
            .find(|t| t.id.as_deref() == Some(id))
    }
}

/// How a follower is told to stop.
#[derive(Debug, Clone, Default)]
pub struct FollowerStop {
    /// Stop cleanly: finish the event in hand (whatever it posts, and the mark after it), save the mark, and
    /// return, so the next follower (another node's, after a hand-over) carries on from exactly there.
    pub soft: tokio_util::sync::CancellationToken,
    /// Stop now, wherever it is: for when a clean stop took too long (a node's lease is about to expire) and
    /// at shutdown. What was posted after the last mark may be posted again by the next follower.
    pub hard: tokio_util::sync::CancellationToken,
}

/// How a follower's run ended.
enum Ended {
    /// The summary is posted and the mark forgotten.
    Finished,
    /// Told to stop (or could not follow); the mark says how far it got.
    Stopped,
}

/// Follows `task` in `thread` until it ends or `stop` fires. Returns at once if the task already has a
/// follower here. With `resume`, carries on where the mark says an earlier follower got to.
pub async fn follow(
    env: FollowerEnv,
    thread: ChannelId,
    task: TaskInfo,
    upload_limit: u64,
    resume: Option<ThreadMark>,
    stop: FollowerStop,
) {
    if !env.threads.start_following(&task.id) {
        return;
    }
    // A mark with nothing posted yet is a hand-over from a node that opened the thread but does not follow
    // (see `crate::leader`): its follower starts afresh, without saying anything restarted.
    let resumed = resume
        .as_ref()
        .is_some_and(|m| m.progress.is_some() || m.posted > 0);
    let id = task.id.clone();
    let mut f = Follower {
        progress: TaskProgress::new(&task.id),
        env: env.clone(),
        thread,
        task,
        upload_limit,
        // Discord ids are never 0, and `MessageId::new(0)` panics: a damaged mark must not take the bot down.
        progress_msg: resume
            .as_ref()
            .and_then(|m| m.progress)
            .and_then(NonZeroU64::new)
            .map(MessageId::from),
        throttle: EditThrottle::new(EDIT_INTERVAL),
        last_seq: resume.as_ref().map_or(0, |m| m.posted),
        resumed,
        reopen_turn: resume.as_ref().and_then(|m| m.turn.clone()),
        reopen: resume.map(|m| m.approvals).unwrap_or_default(),
        posts: std::sync::atomic::AtomicU32::new(0),
        gone: std::sync::atomic::AtomicBool::new(false),
        tools: TurnMessages::default(),
    };
    let ended = tokio::select! {
        ended = f.run(&stop.soft) => ended,
        () = stop.hard.cancelled() => {
            debug!(task = %id, "follower stopped where it stood");
            Ended::Stopped
        }
    };
    env.threads
        .stop_following(&id, matches!(ended, Ended::Finished));
}

impl Follower {
    /// Posts the task's events until it ends (then the summary) or `soft` fires. `soft` is looked at only
    /// between events, never in the middle of posting one, so a stopped follower's mark says exactly what is
    /// in the thread.
    async fn run(&mut self, soft: &tokio_util::sync::CancellationToken) -> Ended {
        if soft.is_cancelled() {
            return Ended::Stopped;
        }
        if self.progress_msg.is_none() {
            self.post_progress().await;
        }
        self.save_mark().await;
        let feed = match self.env.backend.follow(&self.task.id).await {
            Ok(feed) => feed,
            Err(crate::backend::BackendError::Internal(err)) => {
                // Ours and passing (the store): the mark stays, and the leader's next scan of marks tries
                // again, so nothing is said in the thread each time.
                warn!(error = %format!("{err:#}"), task = %self.task.id, "cannot follow the task for now");
                return Ended::Stopped;
            }
            Err(err) => {
                // For good (the task is gone): said once, and the mark forgotten so nobody tries again.
                warn!(%err, task = %self.task.id, "cannot follow the task");
                self.post_notice(&format!("⚠️ Cannot follow `{}`: {err}", self.task.id))
                    .await;
                if let Err(err) = self.env.backend.forget_thread(&self.task.id).await {
                    warn!(%err, task = %self.task.id, "could not forget the mark of a task that cannot be followed");
                }
                return Ended::Finished;
            }
        };
        self.progress.model = self.task.model.clone();
        let mut live = feed.live;
        if self.resumed {
            self.post_notice(
                "↻ The relay restarted; this task kept running and its output carries on here.",
            )
            .await;
            self.throttle.changed();
        }
        let already_posted = self.last_seq;
        for (seq, ev) in feed.past {
            if soft.is_cancelled() {
                self.flush_tools().await;
                self.save_mark().await;
                return Ended::Stopped;
            }
            if seq <= already_posted {
                // In the thread before the restart: it only counts towards the progress shown, and brings
                // back the approvals and the turn's tool message still open there.
                self.progress.apply(&ev);
                self.reopen(&ev).await;
                self.reopen_tools(seq, &ev);
            } else {
                self.event(seq, ev).await;
            }
        }
        while !self.progress.phase.is_final() {
            let wake = match self.throttle.poll(Instant::now().into_std(), false) {
                EditDecision::Now => {
                    self.edit_progress().await;
                    self.save_mark().await;
                    continue;
                }
                EditDecision::At(t) => Some(Instant::from_std(t)),
                EditDecision::Idle => None,
            };
            let tools_wake = self.tools_due().await;
            tokio::select! {
                // Between events: whatever the last one posted is in the mark once it is saved here.
                () = soft.cancelled() => {
                    self.flush_tools().await;
                    self.save_mark().await;
                    return Ended::Stopped;
                }
                () = async { if let Some(t) = tools_wake { tokio::time::sleep_until(t).await } else { std::future::pending().await } } => {}
                got = live.recv() => match got {
                    Ok((seq, ev)) => self.event(seq, ev).await,
                    Err(RecvError::Lagged(n)) => {
                        // Too slow for a burst of events: read the stored log again from where we are.
                        debug!(task = %self.task.id, skipped = n, "follower lagged; re-reading the log");
                        match self.env.backend.follow(&self.task.id).await {
                            Ok(feed) => {
                                live = feed.live;
                                for (seq, ev) in feed.past {
                                    self.event(seq, ev).await;
                                }
                            }
                            Err(err) => {
                                warn!(%err, task = %self.task.id, "cannot follow the task again");
                                break;
                            }
                        }
                    }
                    Err(RecvError::Closed) => {
                        // The relay dropped the task (deleted by retention, or revoked): take its state.
                        if let Ok(t) = self.env.backend.task(&self.task.requester, &self.task.id).await {
                            self.progress.phase = phase_of(&t.state);
                        }
                        break;
                    }
                },
                () = async { if let Some(t) = wake { tokio::time::sleep_until(t).await } else { std::future::pending().await } } => {}
            }
        }
        self.finish().await;
        Ended::Finished
    }

    async fn event(&mut self, seq: u64, ev: TaskEvent) {
        if seq <= self.last_seq {
            return;
        }
        self.last_seq = seq;
        self.posts.store(0, std::sync::atomic::Ordering::Relaxed);
        let posts = matches!(
            &ev,
            TaskEvent::Text { .. }
                | TaskEvent::ApprovalRequested { .. }
                | TaskEvent::ApprovalClosed { .. }
                | TaskEvent::Tool {
                    auto_allowed: Some(_),
                    ..
                }
        );
        let tool_posted = self.tool_event(seq, &ev).await;
        match &ev {
            TaskEvent::Text { text } => self.post_output(text).await,
            TaskEvent::Tool {
                name,
                summary,
                auto_allowed: Some(rule),
                ..
            } => {
                // Nobody was asked about this use, so the thread is told it happened.
                self.post_text(&auto_allowed_line(name, summary, rule))
                    .await;
            }
            TaskEvent::ApprovalRequested { .. } => {
                if let Some(view) = self.approval_view(&ev).await {
                    self.post_approval(view).await;
                }
            }
            TaskEvent::ApprovalClosed { approval, outcome } => {
                if let Some(open) = self.env.threads.close_approval(&self.task.id, approval) {
                    self.close_approval(&open, &Closed::from_outcome(outcome))
                        .await;
                }
            }
            _ => {}
        }
        if posts || tool_posted {
            self.save_mark().await;
        }
        if self.progress.apply(&ev) {
            self.throttle.changed();
        }
    }

    /// How an approval request shows in the thread, with who must decide it now; `None` for other events.
    async fn approval_view(&self, ev: &TaskEvent) -> Option<ApprovalView> {
        if !matches!(ev, TaskEvent::ApprovalRequested { .. }) {
            return None;
        }
        let decider = match self.env.backend.approver(&self.task.id).await {
            Ok(u) => u,
            Err(err) => {
                warn!(%err, task = %self.task.id, "approver unknown; showing the owner");
                self.task.owner.clone()
            }
        };
        view_of(&self.task.id, ev, &decider)
    }

    /// Replaying an event posted before a restart: an approval the mark says is still open is known again,
    /// with its message, so that when it closes its buttons are disabled in place and a click on them is
    /// credited to whoever clicked.
    async fn reopen(&mut self, ev: &TaskEvent) {
        match ev {
            TaskEvent::ApprovalRequested { approval, .. } => {
                let Some(message) = self.reopen.remove(approval).and_then(NonZeroU64::new) else {
                    return;
                };
                if let Some(view) = self.approval_view(ev).await {
                    self.env.threads.open_approval(
                        &self.task.id,
                        OpenApproval {
                            view,
                            channel: self.thread,
                            message: Some(MessageId::from(message)),
                            decided_by: None,
                            rule: None,
                        },
                    );
                }
            }
            TaskEvent::ApprovalClosed { approval, .. } => {
                self.env.threads.close_approval(&self.task.id, approval);
            }
            TaskEvent::Tool { .. } => {
                // Shown before the restart: its result, if still to come, names it.
                if let Some(tool) = ToolUse::of(ev) {
                    self.tools.remember(tool);
                }
            }
            _ => {}
        }
    }

    /// Replaying an event posted before a restart that belongs to the turn still open then: the turn's tool
    /// message is rebuilt as it stood, on the messages it was posted as, posting nothing; results that come
    /// after the restart then fill in their lines there instead of leaving them waiting.
    fn reopen_tools(&mut self, seq: u64, ev: &TaskEvent) {
        let Some((from, ids)) = &self.reopen_turn else {
            return;
        };
        if seq < *from || !matches!(ev, TaskEvent::Tool { .. } | TaskEvent::ToolResult { .. }) {
            return;
        }
        if self.tools.turn.is_none() {
            let turn = TurnTools::new(&self.task.id, *from, self.upload_limit)
                .with_cwd(self.progress.cwd.clone());
            self.tools.turn = Some(turn);
            self.tools.messages = ids
                .iter()
                .map(|id| NonZeroU64::new(*id).map(MessageId::from))
                .collect();
        }
        let Some(turn) = self.tools.turn.as_mut() else {
            return;
        };
        // What these would post (a line, a file) is in the thread already.
        match ev {
            TaskEvent::Tool { .. } => {
                if let Some(tool) = ToolUse::of(ev) {
                    turn.add(tool);
                }
            }
            _ => {
                turn.result(ev, seq, None);
            }
        }
    }

    /// Tells the backend how far this thread got, so a restarted relay neither skips nor repeats output.
    async fn save_mark(&self) {
        let mark = ThreadMark {
            task: self.task.id.clone(),
            thread: self.thread.get(),
            progress: self.progress_msg.map(MessageId::get),
            posted: self.shown_through(),
            upload_limit: self.upload_limit,
            approvals: self.env.threads.approval_messages(&self.task.id),
            turn: self.tools.turn.as_ref().map(|t| {
                let ids = self.tools.messages.iter();
                (
                    t.first_seq,
                    ids.map(|m| m.map_or(0, MessageId::get)).collect(),
                )
            }),
            opening: None,
        };
        if let Err(err) = self.env.backend.mark_thread(&mark).await {
            warn!(%err, task = %self.task.id, "could not record how far the thread got");
        }
    }

    fn render(&self) -> String {
        self.progress.render(age(self.task.created_at))
    }

    /// Posts in the thread, unless it is gone; `what` names the post in the log when it fails.
    async fn send(&self, msg: &CreateMessage, files: &[Upload], what: &str) -> Option<Message> {
        if self.gone.load(std::sync::atomic::Ordering::Relaxed) {
            return None;
        }
        match self.env.rest.send_message(self.thread, msg, files).await {
            Ok(m) => Some(m),
            Err(err) => {
                self.failed(&err, what);
                None
            }
        }
    }

    /// Edits a message in the thread, unless it is gone.
    async fn edit(&self, channel: ChannelId, id: MessageId, edit: &EditMessage, what: &str) {
        if self.gone.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        if let Err(err) = self.env.rest.edit_message(channel, id, edit).await {
            self.failed(&err, what);
        }
    }

    /// A thread deleted mid-task answers every call with "Unknown Channel". The task goes on (its output is
    /// stored: `/status` shows it), but nothing more is sent there: each refused call counts towards the
    /// invalid requests for which Discord bans a bot for an hour.
    fn failed(&self, err: &crate::rest::RestError, what: &str) {
        if err.code() == Some(UNKNOWN_CHANNEL) {
            if !self.gone.swap(true, std::sync::atomic::Ordering::Relaxed) {
                warn!(task = %self.task.id, thread = %self.thread, "the task's thread is gone; following on without posting");
            }
        } else {
            warn!(%err, task = %self.task.id, "could not {what}");
        }
    }

    async fn post_progress(&mut self) {
        let msg = CreateMessage::new()
            .content(self.render())
            .components(stop_row(&self.task.id, false))
            .allowed_mentions(CreateAllowedMentions::new())
            .nonce(nonce(&self.task.id, "progress", 0, 0))
            .enforce_nonce(true);
        if let Some(m) = self.send(&msg, &[], "post the progress message").await {
            self.progress_msg = Some(m.id);
            // Pinned, so the task's live status is one click away however long the thread grows. A bot
            // without the permission to pin still shows it; that is not worth a word in the thread.
            if let Err(err) = self.env.rest.pin_message(self.thread, m.id).await {
                warn!(%err, task = %self.task.id, "could not pin the progress message");
            }
        }
    }

    async fn edit_progress(&mut self) {
        let Some(id) = self.progress_msg else {
            return;
        };
        let fin = self.progress.phase.is_final();
        let edit = EditMessage::new()
            .content(self.render())
            .components(stop_row(&self.task.id, fin));
        self.edit(self.thread, id, &edit, "edit the progress message")
            .await;
    }

    /// Posts plain text with mentions disabled: Claude's output must not ping anyone. Part of the event in
    /// hand, so idempotent (see [`Follower::event_nonce`]).
    async fn post_text(&self, content: &str) {
        let msg = CreateMessage::new()
            .content(content)
            .allowed_mentions(CreateAllowedMentions::new())
            .nonce(self.event_nonce())
            .enforce_nonce(true);
        self.send(&msg, &[], "post in the thread").await;
    }

    /// Posts a note of the follower's own (not of an event): each one is new.
    async fn post_notice(&self, content: &str) {
        let msg = CreateMessage::new()
            .content(content)
            .allowed_mentions(CreateAllowedMentions::new());
        self.send(&msg, &[], "post in the thread").await;
    }

    /// The nonce of the next message posted for the event in hand. A follower that carries on after one that
    /// died between posting and saving its mark posts the same messages again with the same nonces, and
    /// Discord (`enforce_nonce`) returns the messages already there instead of posting them twice.
    fn event_nonce(&self) -> Nonce {
        let n = self
            .posts
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        nonce(&self.task.id, "event", self.last_seq, n)
    }

    async fn post_output(&self, text: &str) {
        if text.trim().is_empty() {
            return;
        }
        let name = format!("{}-reply", self.task.id);
        match place(text, OutputKind::Text, &name, self.upload_limit) {
            Placement::Messages(parts) => {
                for part in parts {
                    self.post_text(&part).await;
                }
            }
            Placement::Attachment {
                filename,
                data,
                note,
            } => {
                let msg = CreateMessage::new()
                    .content(note)
                    .allowed_mentions(CreateAllowedMentions::new())
                    .nonce(self.event_nonce())
                    .enforce_nonce(true);
                let file = Upload { filename, data };
                self.send(&msg, &[file], "post the attachment").await;
            }
        }
    }

    async fn post_approval(&self, view: ApprovalView) {
        let components = match approval_components(&view, false) {
            Ok(c) => c,
            Err(err) => {
                // An approval id too long for a button: the user can still answer with /approve.
                warn!(%err, task = %view.task, "approval has no buttons");
                Vec::new()
            }
        };
        // Ping the person who must decide (unless they turned mentions off), and nobody else.
        let ping = if self.wants_mentions(&view.decider.to_string()).await {
            vec![view.decider]
        } else {
            Vec::new()
        };
        let msg = CreateMessage::new()
            .content(approval_content(&view))
            .components(components)
            .allowed_mentions(CreateAllowedMentions::new().users(ping))
            .nonce(self.event_nonce())
            .enforce_nonce(true);
        // What did not fit in the message goes with it, whole, as a file (within the upload limit: the agent
        // sends at most a few hundred KiB of input).
        let (files, too_big): (Vec<Upload>, Vec<Upload>) = attachment(&view)
            .map(|(filename, data)| Upload { filename, data })
            .into_iter()
            .partition(|f| f.data.len() as u64 <= self.upload_limit);
        let approval = view.approval.clone();
        self.env.threads.open_approval(
            &self.task.id,
            OpenApproval {
                view,
                channel: self.thread,
                message: None,
                decided_by: None,
                rule: None,
            },
        );
        if let Some(m) = self.send(&msg, &files, "post the approval").await {
            self.env
                .threads
                .update_approval(&self.task.id, &approval, |a| a.message = Some(m.id));
        }
        if let Some(f) = too_big.first() {
            // The message says the input is attached; it must not leave the approver thinking so.
            self.post_text(&format!(
                "⚠️ The whole input of that approval ({} bytes) is over this server's upload limit and could not \
                 be attached: deny it unless you expected something that large.",
                f.data.len()
            ))
            .await;
        }
    }

    async fn close_approval(&self, open: &OpenApproval, closed: &Closed) {
        let Some(message) = open.message else {
            return;
        };
        let closed = match (closed, &open.rule) {
            (Closed::AllowedForSession, Some(rule)) => Closed::AllowedForRule(rule.clone()),
            (closed, _) => closed.clone(),
        };
        let edit = EditMessage::new()
            .content(closed_content(&open.view, &closed, open.decided_by))
            .components(approval_components(&open.view, true).unwrap_or_default());
        self.edit(
            open.channel,
            message,
            &edit,
            "disable the approval's buttons",
        )
        .await;
    }

    /// Who to mention when the task ends: its requester, unless they stopped it themselves or turned their
    /// mentions off.
    async fn requester_to_tell(&self) -> Option<UserId> {
        if self.progress.phase == Phase::Cancelled {
            match self.env.backend.stopped_by(&self.task).await {
                Ok(Some(who)) if who == self.task.requester => return None,
                Ok(_) => {}
                // A ping too many beats none: the requester may not know their task stopped.
                Err(err) => warn!(%err, task = %self.task.id, "who stopped the task is unknown"),
            }
        }
        let who: UserId = self.task.requester.parse().ok()?;
        self.wants_mentions(&self.task.requester)
            .await
            .then_some(who)
    }

    /// Whether `user` wants to be mentioned; when the backend cannot say, yes (a ping too many beats a missed
    /// approval).
    async fn wants_mentions(&self, user: &str) -> bool {
        match self.env.backend.wants_mentions(user).await {
            Ok(yes) => yes,
            Err(err) => {
                warn!(%err, %user, "cannot read the user's mention setting; mentioning");
                true
            }
        }
    }

    async fn finish(&mut self) {
        self.close_tools().await;
        for open in self.env.threads.close_all_approvals(&self.task.id) {
            self.close_approval(&open, &Closed::Other("the task ended".into()))
                .await;
        }
        self.edit_progress().await;
        let ctx = SummaryContext {
            agent: self.task.agent.clone(),
            project: self.task.project.clone(),
            elapsed: age(self.task.created_at),
        };
        let mut msg = CreateMessage::new()
            .embed(summary_embed(&self.progress, &ctx))
            .allowed_mentions(CreateAllowedMentions::new())
            .nonce(nonce(&self.task.id, "summary", 0, 0))
            .enforce_nonce(true);
        if let Some(who) = self.requester_to_tell().await {
            // Only that user may be pinged, whatever the content says.
            msg = msg
                .content(format!(
                    "<@{who}> `{}` {}.",
                    self.task.id,
                    ended_how(self.progress.phase)
                ))
                .allowed_mentions(CreateAllowedMentions::new().users(vec![who]));
        }
        let mut files = Vec::new();
        if let Some(w) = self
            .progress
            .worktree
            .as_ref()
            .filter(|w| w.change.is_some())
        {
            // The whole diff rides along as a file (where it fits Discord's upload limit); the buttons decide
            // the branch's fate, for the requester or the owner only (the relay checks who clicks).
            if let Some(diff) = w.diff.as_deref().filter(|d| !d.is_empty()) {
                let limit = usize::try_from(DEFAULT_ATTACHMENT_LIMIT).unwrap_or(usize::MAX);
                if diff.len() <= limit {
                    files.push(Upload {
                        filename: format!("{}.patch", self.task.id),
                        data: diff.as_bytes().to_vec(),
                    });
                }
            }
            msg = msg.components(worktree_row(&self.task.id));
        }
        msg = crate::render::summary::with_full_output(msg, &self.task.id);
        self.send(&msg, &files, "post the summary").await;
        if let Err(err) = self.env.backend.forget_thread(&self.task.id).await {
            warn!(%err, task = %self.task.id, "could not forget the finished thread's mark");
        }
    }
}

/// `is done`, `failed`, ...: the end of "your task t_x ..." when the requester is told.
fn ended_how(phase: Phase) -> &'static str {
    match phase {
        Phase::Done => "is done",
        Phase::Failed => "failed",
        Phase::Cancelled => "was stopped",
        Phase::Lost => "was lost (its agent never said how it ended)",
        Phase::Queued | Phase::Running | Phase::WaitingApproval => "stopped being followed",
    }
}

impl Follower {
    /// Shows a tool use or result in the turn's message, and closes that message when text or the turn's end
    /// comes. True when it posted something (a message or a file), so the mark is saved.
    async fn tool_event(&mut self, seq: u64, ev: &TaskEvent) -> bool {
        match ev {
            TaskEvent::Text { .. }
            | TaskEvent::TurnFinished { .. }
            | TaskEvent::Finished { .. } => {
                self.close_tools().await;
                false
            }
            TaskEvent::Tool { .. } => {
                let Some(tool) = ToolUse::of(ev) else {
                    return false;
                };
                let (limit, cwd) = (self.upload_limit, self.progress.cwd.clone());
                let turn = self
                    .tools
                    .turn
                    .get_or_insert_with(|| TurnTools::new(&self.task.id, seq, limit).with_cwd(cwd));
                let change = turn.add(tool);
                self.apply_tools(seq, change).await
            }
            TaskEvent::ToolResult { .. } => {
                let earlier = self.tools.earlier(ev).cloned();
                let (limit, cwd) = (self.upload_limit, self.progress.cwd.clone());
                let turn = self
                    .tools
                    .turn
                    .get_or_insert_with(|| TurnTools::new(&self.task.id, seq, limit).with_cwd(cwd));
                let change = turn.result(ev, seq, earlier.as_ref());
                self.apply_tools(seq, change).await
            }
            _ => false,
        }
    }

    /// Posts a new part and the files at once; an edit waits for the throttle.
    async fn apply_tools(&mut self, seq: u64, change: Change) -> bool {
        let mut posted = false;
        if let Some(part) = change.new_part {
            self.post_tools_part(part).await;
            posted = true;
        }
        if let Some(part) = change.edited {
            self.tools.dirty.insert(part);
            self.tools.dirty_since.get_or_insert(seq);
        }
        for file in change.files {
            let msg = CreateMessage::new()
                .content(file.note)
                .allowed_mentions(CreateAllowedMentions::new())
                .nonce(self.event_nonce())
                .enforce_nonce(true);
            let upload = Upload {
                filename: file.filename,
                data: file.data,
            };
            self.send(&msg, &[upload], "post a tool's output").await;
            posted = true;
        }
        posted
    }

    async fn post_tools_part(&mut self, part: usize) {
        let Some(turn) = &self.tools.turn else { return };
        let msg = CreateMessage::new()
            .content(turn.render(part))
            .allowed_mentions(CreateAllowedMentions::new())
            // The same message of the same turn on every node and after a restart: posted once.
            .nonce(nonce(&self.task.id, "tools", turn.first_seq, part as u32))
            .enforce_nonce(true);
        self.tools.last_write = Some(Instant::now());
        let id = self
            .send(&msg, &[], "post the turn's tools")
            .await
            .map(|m| m.id);
        if self.tools.messages.len() <= part {
            self.tools.messages.resize(part + 1, None);
        }
        self.tools.messages[part] = id;
    }

    /// Makes the waiting edits now (whatever their pace), then saves the mark they held back.
    async fn flush_tools(&mut self) {
        if self.tools.dirty.is_empty() {
            return;
        }
        self.tools.last_write = Some(Instant::now());
        for part in std::mem::take(&mut self.tools.dirty) {
            let Some(turn) = &self.tools.turn else { break };
            match self.tools.messages.get(part).copied().flatten() {
                Some(id) => {
                    let edit = EditMessage::new()
                        .content(turn.render(part))
                        .allowed_mentions(CreateAllowedMentions::new());
                    self.edit(self.thread, id, &edit, "edit the turn's tools")
                        .await;
                }
                // Its post failed: try once more (same nonce, so never twice).
                None => self.post_tools_part(part).await,
            }
        }
        if self.tools.dirty_since.take().is_some() {
            self.save_mark().await;
        }
    }

    /// Makes the waiting edits when due; otherwise when to come back for them.
    async fn tools_due(&mut self) -> Option<Instant> {
        let due = self.tools.due()?;
        if due > Instant::now() {
            return Some(due);
        }
        self.flush_tools().await;
        None
    }

    /// Ends the turn's message with its last edit (when its pace allows: at most [`EDIT_INTERVAL`] from now);
    /// uses still waiting for a result are remembered.
    async fn close_tools(&mut self) {
        if let Some(due) = self.tools.due() {
            tokio::time::sleep_until(due).await;
        }
        self.flush_tools().await;
        if let Some(turn) = self.tools.turn.take() {
            for tool in turn.pending() {
                self.tools.remember(tool);
            }
        }
        self.tools.messages.clear();
    }

    /// How far the thread shows the task: the last event handled, but not past an edit still waiting.
    fn shown_through(&self) -> u64 {
        match self.tools.dirty_since {
            Some(seq) => seq.saturating_sub(1).min(self.last_seq),
            None => self.last_seq,
        }
    }
}

/// How the approval request `ev` shows, for `decider`; `None` for other events.
pub(crate) fn view_of(task: &str, ev: &TaskEvent, decider: &str) -> Option<ApprovalView> {
    let TaskEvent::ApprovalRequested {
        approval,
        tool,
        summary,
        input,
        question,
        description,
        session,
        input_cut,
    } = ev
    else {
        return None;
    };
    Some(ApprovalView {
        task: task.to_string(),
        approval: approval.clone(),
        tool: tool.clone(),
        summary: summary.clone(),
        input: input.clone(),
        question: *question,
        description: description.clone(),
        session: session.clone(),
        input_cut: *input_cut,
        decider: decider.parse().unwrap_or(UserId::new(1)),
    })
}

/// The request of approval `approval` of a task, from its stored events, if it is still open there.
pub(crate) fn open_request<'a>(
    past: &'a [(u64, TaskEvent)],
    approval: &str,
) -> Option<&'a TaskEvent> {
    let mut open = None;
    for (_, ev) in past {
        match ev {
            TaskEvent::ApprovalRequested { approval: a, .. } if a == approval => open = Some(ev),
            TaskEvent::ApprovalClosed { approval: a, .. } if a == approval => open = None,
            _ => {}
        }
    }
    open
}

/// A message's nonce, the same on every node for the same message of a task (Discord allows 25 characters):
/// FNV-1a over what the message is, stable across builds (unlike `std`'s hasher).
fn nonce(task: &str, kind: &str, seq: u64, n: u32) -> Nonce {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let key = format!("{task}/{kind}/{seq}/{n}");
    for b in key.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    Nonce::String(format!("ct{h:016x}"))
}

/// The progress phase for a task state as the backend names it.
pub fn phase_of(state: &str) -> Phase {
    match state {
        "queued" => Phase::Queued,
        "running" => Phase::Running,
        "waiting_approval" => Phase::WaitingApproval,
        "done" => Phase::Done,
        "failed" => Phase::Failed,
        "cancelled" => Phase::Cancelled,
        _ => Phase::Lost,
    }
}

/// The upload limit an interaction reported, or Discord's default when it reported none.
pub fn upload_limit(reported: u32) -> u64 {
    if reported == 0 {
        DEFAULT_ATTACHMENT_LIMIT
    } else {
        u64::from(reported)
    }
}

/// A task's progress so far, from its stored events (`/status`, `/cc status`).
pub fn progress_of(task: &TaskInfo, past: &[(u64, TaskEvent)]) -> TaskProgress {
    let mut p = TaskProgress::new(&task.id);
    p.model = task.model.clone();
    for (_, ev) in past {
        p.apply(ev);
    }
    if !p.phase.is_final() {
        p.phase = phase_of(&task.state);
    }
    p
}

/// JSON answers for AskUserQuestion: `{question text: answer}`, as Claude Code reads them.
pub fn answers_json(view: &ApprovalView, answers: &BTreeMap<u8, String>) -> Value {
    let questions = crate::render::approval::questions(&view.input);
    let mut out = serde_json::Map::new();
    for (i, a) in answers {
        let key = questions
            .get(usize::from(*i))
            .map_or_else(|| format!("question {}", i + 1), |q| q.text.clone());
        out.insert(key, Value::String(a.clone()));
    }
    Value::Object(out)
}

/// How many questions an AskUserQuestion approval has (at least one).
pub fn question_count(view: &ApprovalView) -> usize {
    crate::render::approval::questions(&view.input).len().max(1)
}
