//! What each interaction and thread message does: slash commands, autocomplete, buttons, select menus,
//! modals, and follow-up messages in task threads, each turned into [`Backend`](crate::Backend) calls and
//! answered within Discord's deadline ([`deliver`]).
//!
//! Every refusal a user can cause is answered ephemerally with the backend's own words; our own failures
//! are logged and the user is told to try again.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use ct_protocol::scope::SessionScope;
use ct_protocol::task::{Decision, TaskEvent, TaskOptions};
use serenity::all::{
    ActionRowComponent, AutocompleteChoice, ChannelId, CommandData, CommandDataOption,
    CommandDataOptionValue, CommandInteraction, ComponentInteraction, ComponentInteractionDataKind,
    CreateAllowedMentions, CreateInteractionResponseFollowup, CreateMessage, Interaction, Message,
    ModalInteraction, UserId,
};
use tracing::{debug, error, info, info_span, warn, Instrument};

use crate::app::Inner;
use crate::backend::{
    BackendError, HistoryQuery, Opening, Pairing, ShareLevel, TaskInfo, TaskRequest, ThreadChain,
    ThreadMark, WorkspaceOp,
};
use crate::commands::{completion_for, Completion};
use crate::custom_id::{Action, HistoryPage, Scope};
use crate::render::approval::{
    answer_modal, deny_modal, not_yours, prefix_modal, questions, rule_words,
};
use crate::render::escape::inline_code;
use crate::render::output::Placement;
use crate::render::summary::{summary_embed, SummaryContext};
use crate::render::transcript::{deliver as place_transcript, transcript};
use crate::render::truncate;
use crate::respond::{deliver, Answer, Initial, Responder};
use crate::rest::Upload;
use crate::thread::{
    answers_json, follow, open_request, phase_of, progress_of, question_count, upload_limit,
    view_of, OpenApproval, ThreadInfo,
};

/// Autocomplete lists at most this many choices (Discord's limit).
const MAX_CHOICES: usize = 25;
/// Models offered by autocomplete; any name Claude Code accepts may be typed.
const MODELS: &[&str] = &["sonnet", "opus", "haiku"];
/// Thread names carry the task id first, so a restarted relay finds the task a thread belongs to.
const THREAD_NAME_PROMPT: usize = 80;
/// Characters of the prompt shown in the thread's first message.
const STARTER_PROMPT: usize = 1500;
/// How long `/task` on a node that does not lead waits for the leader to open the thread, and how often it
/// looks. The leader opens it at its next scan of the marks (`LeaseTimes::scan`, 2 s).
const OPENING_WAIT: Duration = Duration::from_secs(10);
const OPENING_POLL: Duration = Duration::from_millis(100);
/// Tasks on one page of `/tasks`.
const HISTORY_PAGE: usize = 10;

type After = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A handler's result: the initial response, and work to run once it is delivered (a follow-up message
/// needs the response to exist first).
struct Reply {
    initial: Initial,
    after: Option<After>,
}

impl From<Answer> for Reply {
    fn from(a: Answer) -> Self {
        Self {
            initial: Initial::Message(a),
            after: None,
        }
    }
}

impl From<Initial> for Reply {
    fn from(initial: Initial) -> Self {
        Self {
            initial,
            after: None,
        }
    }
}

/// The answer for a failed backend call: the refusal as is, or an apology for our own failure.
fn failed(e: BackendError) -> Answer {
    match e {
        BackendError::Refused(m) => Answer::private(format!("⚠️ {m}")),
        BackendError::Internal(err) => {
            error!(error = %format!("{err:#}"), "backend failure");
            Answer::private("Something went wrong on our side: try again in a moment.")
        }
    }
}

/// A command's options, with a subcommand's own options flattened.
struct Args {
    sub: Option<String>,
    opts: Vec<CommandDataOption>,
}

impl Args {
    fn of(data: &CommandData) -> Self {
        match data.options.first() {
            Some(CommandDataOption {
                name,
                value:
                    CommandDataOptionValue::SubCommand(opts)
                    | CommandDataOptionValue::SubCommandGroup(opts),
                ..
            }) => Self {
                sub: Some(name.clone()),
                opts: opts.clone(),
            },
            _ => Self {
                sub: None,
                opts: data.options.clone(),
            },
        }
    }

    fn str(&self, name: &str) -> Option<String> {
        self.opts
            .iter()
            .find(|o| o.name == name)
            .and_then(|o| match &o.value {
                CommandDataOptionValue::String(s) => Some(s.trim().to_string()),
                CommandDataOptionValue::Autocomplete { value, .. } => {
                    Some(value.trim().to_string())
                }
                _ => None,
            })
            .filter(|s| !s.is_empty())
    }

    fn bool(&self, name: &str) -> Option<bool> {
        self.opts
            .iter()
            .find(|o| o.name == name)
            .and_then(|o| match &o.value {
                CommandDataOptionValue::Boolean(b) => Some(*b),
                _ => None,
            })
    }

    /// The attachment given to option `name`, as Discord resolved it in the interaction.
    fn attachment(&self, name: &str, data: &CommandData) -> Option<crate::files::Wanted> {
        self.opts
            .iter()
            .find(|o| o.name == name)
            .and_then(|o| match &o.value {
                CommandDataOptionValue::Attachment(id) => data.resolved.attachments.get(id),
                _ => None,
            })
            .map(crate::files::Wanted::from)
    }

    fn user(&self, name: &str) -> Option<UserId> {
        self.opts
            .iter()
            .find(|o| o.name == name)
            .and_then(|o| match &o.value {
                CommandDataOptionValue::User(u) => Some(*u),
                _ => None,
            })
    }
}

/// `<t:…:R>`: Discord shows it as "5 minutes ago" in the reader's own time zone.
fn when(unix: u64) -> String {
    format!("<t:{unix}:R>")
}

fn mention(user: &str) -> String {
    format!("<@{user}>")
}

impl Inner {
    /// One interaction, from the gateway or an HTTP POST.
    pub(crate) async fn interaction(self: &Arc<Self>, ix: Interaction, responder: Responder) {
        let (token, ephemeral, what) = match &ix {
            Interaction::Command(c) => (
                c.token.clone(),
                !is_public(&c.data.name) && !self.status_in_own_thread(c),
                format!("/{}", c.data.name),
            ),
            Interaction::Autocomplete(c) => (
                c.token.clone(),
                true,
                format!("autocomplete /{}", c.data.name),
            ),
            Interaction::Component(c) => (
                c.token.clone(),
                true,
                format!("component {}", c.data.custom_id),
            ),
            Interaction::Modal(m) => (m.token.clone(), true, format!("modal {}", m.data.custom_id)),
            _ => return,
        };
        let mut after = None;
        let work = async {
            let reply = match ix {
                Interaction::Command(c) => self.command(c).await,
                Interaction::Autocomplete(c) => self.autocomplete(c).await,
                Interaction::Component(c) => self.component(c).await,
                Interaction::Modal(m) => self.modal(m).await,
                _ => Reply::from(Initial::Acknowledge),
            };
            after = reply.after;
            reply.initial
        };
        if let Err(err) = deliver(&self.rest, responder, &token, ephemeral, work).await {
            warn!(%err, %what, "could not answer the interaction");
            return;
        }
        if let Some(after) = after {
            self.spawn(after);
        }
    }

    fn allowed(&self, channel: ChannelId, parent: Option<ChannelId>) -> Option<Reply> {
        if self.config.allows_channel(channel, parent) {
            return None;
        }
        let list: Vec<String> = self
            .config
            .channel_ids
            .iter()
            .map(|c| format!("<#{c}>"))
            .collect();
        Some(Answer::private(format!("I only work in {} here.", list.join(", "))).into())
    }

    async fn command(self: &Arc<Self>, c: CommandInteraction) -> Reply {
        let parent = c.channel.as_ref().and_then(|ch| ch.parent_id);
        if let Some(refusal) = self.allowed(c.channel_id, parent) {
            return refusal;
        }
        let user = c.user.id.to_string();
        let args = Args::of(&c.data);
        let result = match (c.data.name.as_str(), args.sub.as_deref()) {
            ("register", Some("pair")) => return self.register_pair(&user, &c.token).await,
            ("register", Some("status")) => self.register_status(&user).await,
            ("register", Some("mode")) => {
                let pool = match args.str("mode").as_deref() {
                    Some("cluster") => Some(args.str("pool").unwrap_or_default()),
                    _ => None,
                };
                self.set_mode(&user, pool.as_deref(), &roles_of(&c)).await
            }
            ("usage", _) => self.usage_text(&user, &roles_of(&c)).await,
            ("register", Some("unregister")) => {
                let agent = args.str("agent").unwrap_or_default();
                self.backend.unregister(&user, &agent).await.map(|a| {
                    Answer::private(format!(
                        "🗑️ Agent **{}** (`{}`) is unregistered: its key is refused from now on.",
                        a.name, a.fingerprint
                    ))
                })
            }
            ("project", _) if args.str("agent").is_none() && self.in_pool(&user).await => {
                self.workspace_command(&user, &roles_of(&c), args.sub.as_deref(), &args)
                    .await
            }
            ("project", Some("add")) => {
                let (name, path) = (
                    args.str("name").unwrap_or_default(),
                    args.str("path").unwrap_or_default(),
                );
                self.backend
                    .add_project(&user, &name, &path, args.str("agent").as_deref())
                    .await
                    .map(|p| {
                        Answer::private(format!(
                            "📁 Project **{}** is `{}` on **{}**.",
                            p.name, p.path, p.agent
                        ))
                    })
            }
            ("project", Some("list")) => self.projects_text(&user).await,
            ("project", Some("remove")) => {
                let (mut name, mut agent) =
                    (args.str("name").unwrap_or_default(), args.str("agent"));
                if agent.is_none() {
                    if let Some(p) = self.agent_project(&user, &name).await {
                        (name, agent) = (p.name, Some(p.agent));
                    }
                }
                self.backend
                    .remove_project(&user, &name, agent.as_deref())
                    .await
                    .map(|()| {
                        let on = agent.map(|a| format!(" on **{a}**")).unwrap_or_default();
                        Answer::private(format!(
                            "📁 Project **{name}**{on} removed (the folder is untouched)."
                        ))
                    })
            }
            ("task", _) => self.task_command(&c, &user, &args).await,
            ("reply", _) => {
                let prompt = args.str("prompt").unwrap_or_default();
                self.continue_thread(
                    &user,
                    c.channel_id,
                    &prompt,
                    upload_limit(c.attachment_size_limit),
                )
                .await
                .map(|t| {
                    Answer::text(format!(
                        "↪️ {} → `{}`: {}",
                        mention(&user),
                        t.id,
                        truncate(&prompt, 1500)
                    ))
                })
            }
            ("status", _) => {
                return match self.task_arg(&user, &args, c.channel_id).await {
                    Ok(task) => {
                        let public = self.status_in_own_thread(&c);
                        let limit = upload_limit(c.attachment_size_limit);
                        self.status(&user, &task, public, &c.token, limit).await
                    }
                    Err(e) => failed(e).into(),
                }
            }
            ("tasks", _) => {
                let page = HistoryPage {
                    page: 0,
                    state: args.str("state"),
                    agent: args.str("agent"),
                };
                self.tasks_page(&user, &page).await
            }
            ("cancel", _) => match self.task_arg(&user, &args, c.channel_id).await {
                Ok(task) => self
                    .backend
                    .cancel(&user, &task)
                    .await
                    .map(|()| Answer::text(format!("⏹️ Stopping `{task}`…"))),
                Err(e) => Err(e),
            },
            ("approve", _) => match self.task_arg(&user, &args, c.channel_id).await {
                Ok(task) => {
                    self.approve_command(&user, &task, args.str("option").as_deref())
                        .await
                }
                Err(e) => Err(e),
            },
            ("agents", _) => match args.str("default") {
                Some(agent) => self.set_default_agent(&user, &agent).await,
                None => self.agents_text(&user, false).await,
            },
            ("share", Some(sub)) => self.share_command(&user, sub, &args).await,
            ("cc", Some(sub)) => self.cc(&user, sub, &args, c.channel_id).await,
            ("audit", _) => self.audit_text(&user).await,
            ("mentions", _) => self.mentions(&user, args.str("set").as_deref()).await,
            ("dashboard", _) => self.dashboard(&user, args.str("signout").is_some()).await,
            (name, sub) => {
                warn!(command = name, ?sub, "unknown command");
                Ok(Answer::private(
                    "I do not know that command: the list may be out of date, try again shortly.",
                ))
            }
        };
        result.unwrap_or_else(failed).into()
    }

    async fn register_pair(self: &Arc<Self>, user: &str, token: &str) -> Reply {
        let pairing = match self.backend.pairing_code(user).await {
            Ok(p) => p,
            Err(e) => return failed(e).into(),
        };
        let minutes = pairing.expires_in.div_ceil(60).max(1);
        let answer = Answer::private(format!(
            "🔗 **Pair your computer** — run this on it (the code works once, for {minutes} minutes):\n\
             ```\nct-agent pair {}\n```\n\
             Keep it to yourself: whoever runs it pairs their machine as yours. I will tell you here when \
             it has paired.",
            pairing.token
        ));
        let (inner, user, token) = (self.clone(), user.to_string(), token.to_string());
        let after: After =
            Box::pin(async move { inner.tell_when_paired(&user, &token, pairing).await });
        Reply {
            initial: Initial::Message(answer),
            after: Some(after),
        }
    }

    /// Waits for the agent to pair, then tells the user through the interaction (ephemeral). The pairing
    /// code expires before the interaction token does (15 minutes), so the follow-up can always be sent.
    async fn tell_when_paired(&self, user: &str, token: &str, pairing: Pairing) {
        let agent = match self.backend.wait_paired(user, &pairing).await {
            Ok(Some(a)) => a,
            Ok(None) => return,
            Err(e) => {
                warn!(error = %e, "waiting for a pairing failed");
                return;
            }
        };
        let msg = CreateInteractionResponseFollowup::new()
            .content(format!(
                "✅ Agent **{}** paired (fingerprint `{}`). Next: name a folder on it with `/project add`.",
                agent.name, agent.fingerprint
            ))
            .ephemeral(true);
        if let Err(err) = self.rest.followup(token, &msg, &[]).await {
            warn!(%err, "could not tell the user their agent paired");
        }
    }

    /// `/agents default:NAME`: sets it, then lists the agents with it marked.
    async fn set_default_agent(&self, user: &str, agent: &str) -> crate::backend::Result<Answer> {
        let a = self.backend.set_default_agent(user, agent).await?;
        let list = self.agents_text(user, false).await?;
        Ok(Answer::private(truncate(
            &format!(
                "⭐ **{}** is now your default agent: tasks that name no agent (yours, and those of people you \
                 share with) run there.\n\n{}",
                a.name, list.content
            ),
            2000,
        )))
    }

    /// Whether the user's tasks (and project commands) go to a worker pool. Not knowing counts as no: their own
    /// agents answer as before.
    async fn in_pool(&self, user: &str) -> bool {
        self.backend
            .mode(user)
            .await
            .is_ok_and(|m| m.pool.is_some())
    }

    /// `/project add|list|remove` in a pool user's workspace.
    async fn workspace_command(
        &self,
        user: &str,
        roles: &[String],
        sub: Option<&str>,
        args: &Args,
    ) -> crate::backend::Result<Answer> {
        let name = args.str("name").unwrap_or_default();
        let op = match sub {
            Some("add") => WorkspaceOp::Create {
                name: name.clone(),
                git: args.str("path").filter(|p| !p.trim().is_empty()),
            },
            Some("remove") => WorkspaceOp::Remove { name: name.clone() },
            _ => WorkspaceOp::List,
        };
        let said = match &op {
            WorkspaceOp::Create { git: Some(url), .. } => {
                format!("📁 Project **{name}** is cloned from `{url}` in your workspace.\n")
            }
            WorkspaceOp::Create { git: None, .. } => {
                format!("📁 Project **{name}** is in your workspace, empty.\n")
            }
            WorkspaceOp::Remove { .. } => {
                format!("🗑️ Project **{name}** and its files are gone from your workspace.\n")
            }
            WorkspaceOp::List => String::new(),
        };
        let projects = self.backend.workspace(user, roles, op).await?;
        let list: Vec<String> = projects
            .iter()
            .map(|p| format!("**{}** on {}", p.name, p.agent))
            .collect();
        Ok(Answer::private(truncate(
            &if list.is_empty() {
                format!("{said}Your workspace has no projects: `/project add NAME [git URL]` makes one.")
            } else {
                format!("{said}Your workspace: {}", list.join(", "))
            },
            2000,
        )))
    }

    /// `/register status`: where the user's tasks go (for a user of a pool), then their own agents.
    async fn register_status(&self, user: &str) -> crate::backend::Result<Answer> {
        let mode = self.backend.mode(user).await?;
        let agents = self.agents_text(user, true).await?;
        if mode == crate::backend::ModeInfo::default() {
            // Never near a pool: the agents are the whole story.
            return Ok(agents);
        }
        Ok(Answer::private(truncate(
            &format!("{}\n{}", mode_line(&mode), agents.content),
            2000,
        )))
    }

    /// `/register mode local|cluster [pool]`.
    async fn set_mode(
        &self,
        user: &str,
        pool: Option<&str>,
        roles: &[String],
    ) -> crate::backend::Result<Answer> {
        let mode = self.backend.set_mode(user, pool, roles).await?;
        let next = if mode.pool.is_some() {
            "Add a project in your workspace with `/project add NAME [git URL]`, then `/task`. `/usage` shows \
             your budget; `/register mode local` goes back to your own machines."
        } else {
            "Your tasks run on your own agents again; your workspace on the pool stays where it was."
        };
        Ok(Answer::private(format!("{}\n{next}", mode_line(&mode))))
    }

    /// `/usage`: what the user spent on their pool worker in this budget period.
    async fn usage_text(&self, user: &str, roles: &[String]) -> crate::backend::Result<Answer> {
        let u = self.backend.usage(user, roles).await?;
        let mut text = format!(
            "💳 This period: **${:.2}** ({} tokens in, {} out).",
            u.spent_micro_usd as f64 / 1e6,
            u.input_tokens,
            u.output_tokens
        );
        match (&u.budget, &u.left) {
            (Some(budget), Some(left)) => {
                text.push_str(&format!("\nBudget {budget}: **{left}** left."))
            }
            (Some(budget), None) => text.push_str(&format!("\nBudget {budget}.")),
            _ => text.push_str("\nNo budget is set for you on this pool."),
        }
        if let Some(at) = u.resets_at {
            text.push_str(&format!(" It starts again {}.", when(at)));
        }
        Ok(Answer::private(text))
    }

    async fn agents_text(&self, user: &str, own_only: bool) -> crate::backend::Result<Answer> {
        let agents = self.backend.agents(user).await?;
        // Only a mark in the list: not knowing it is no reason to fail the listing.
        let default = self.backend.default_agent(user).await.ok().flatten();
        let lines: Vec<String> = agents
            .iter()
            .filter(|a| !own_only || a.owner == user)
            .map(|a| {
                let state = match (a.online, a.since) {
                    (true, Some(t)) => format!("🟢 online since {}", when(t)),
                    (true, None) => "🟢 online".into(),
                    (false, Some(t)) => format!("⚫ offline, last seen {}", when(t)),
                    (false, None) => "⚫ never connected".into(),
                };
                let whose = if a.owner == user {
                    if default.as_deref() == Some(a.name.as_str()) {
                        " · ⭐ default".to_string()
                    } else {
                        String::new()
                    }
                } else {
                    format!(" · shared by {}", mention(&a.owner))
                };
                format!("**{}** · `{}` · {state}{whose}", a.name, a.fingerprint)
            })
            .collect();
        Ok(Answer::private(if lines.is_empty() {
            "You have no agents yet: pair one with `/register pair`.".to_string()
        } else {
            truncate(&lines.join("\n"), 2000)
        }))
    }

    async fn projects_text(&self, user: &str) -> crate::backend::Result<Answer> {
        let projects = self.backend.projects(user).await?;
        let lines: Vec<String> = projects
            .iter()
            .map(|p| {
                let whose = if p.owner == user {
                    String::new()
                } else {
                    format!(" · shared by {}", mention(&p.owner))
                };
                let path = if p.path.is_empty() {
                    String::new()
                } else {
                    format!(" · `{}`", p.path)
                };
                format!("**{}** on {}{path}{whose}", p.name, p.agent)
            })
            .collect();
        Ok(Answer::private(if lines.is_empty() {
            "No projects yet: add one with `/project add name path`.".to_string()
        } else {
            truncate(&lines.join("\n"), 2000)
        }))
    }

    /// `/task`: submits, opens the thread, starts following. The thread is started from a message the bot
    /// posts in the channel, so everything after this goes through the bot token (tasks outlive the
    /// interaction token).
    async fn task_command(
        self: &Arc<Self>,
        c: &CommandInteraction,
        user: &str,
        args: &Args,
    ) -> crate::backend::Result<Answer> {
        if self.config.token.is_none() {
            return Err(BackendError::Refused(
                "this bot has no DISCORD_TOKEN, so it cannot open task threads: ask the relay's operator".into(),
            ));
        }
        let prompt = args.str("prompt").unwrap_or_default();
        let (mut project, mut agent) = (args.str("project"), args.str("agent"));
        let mut target = args.user("target").map(|u| u.to_string());
        // `agent/project`, as autocomplete offers a name that several machines have.
        if let (Some(p), None) = (project.as_deref(), agent.as_deref()) {
            if let Some(found) = self.agent_project(user, p).await {
                if found.owner != user && target.is_none() {
                    target = Some(found.owner.clone());
                }
                (project, agent) = (Some(found.name), Some(found.agent));
            }
        }
        let req = TaskRequest {
            user: user.to_string(),
            prompt: prompt.clone(),
            project,
            target,
            agent,
            options: TaskOptions {
                model: args.str("model"),
                permission_mode: args.str("mode"),
                isolation: args.str("isolation").and_then(|i| i.parse().ok()),
                ..TaskOptions::default()
            },
            resume: None,
            name: c
                .member
                .as_ref()
                .and_then(|m| m.nick.clone())
                .or_else(|| c.user.global_name.clone()),
            roles: roles_of(c),
        };
        // Nothing is downloaded for a task its requester may not run (a stranger naming someone's agents):
        // refused by the size Discord reports, then by the relay's checks, before anything is fetched.
        let wanted: Vec<_> = args.attachment("file", &c.data).into_iter().collect();
        if !wanted.is_empty() {
            crate::files::check(&wanted).map_err(BackendError::Refused)?;
            self.backend.vet_submit(&req, true).await?;
        }
        let files = crate::files::fetch(&wanted, self.config.api_proxy.as_deref())
            .await
            .map_err(BackendError::Refused)?;
        let task = self.backend.submit_with_files(req, files).await?;
        // A thread cannot hold a thread: inside one, open the new thread in its channel.
        let channel = c
            .channel
            .as_ref()
            .and_then(|ch| ch.parent_id)
            .filter(|_| is_thread(c))
            .unwrap_or(c.channel_id);
        let opening = Opening {
            channel: channel.get(),
            prompt: truncate(&prompt, STARTER_PROMPT),
            // A task may be more private than the server's setting, never less: a grantee must not publish
            // the owner's work to a channel the owner expects not to see it.
            private: self.config.private_threads || args.bool("private") == Some(true),
            failed: None,
        };
        let limit = upload_limit(c.attachment_size_limit);
        let opened = if self.term().is_some() {
            self.open_or_stop(&opening, &task, limit).await.map(Some)
        } else {
            self.open_through_leader(opening, &task, limit).await
        };
        let started = format!(
            "🧵 Started `{}` on **{}** in **{}**",
            task.id, task.agent, task.project
        );
        match opened {
            Ok(Some(thread)) => Ok(Answer::private(format!("{started}: <#{thread}>"))),
            Ok(None) => Ok(Answer::private(format!(
                "{started}: its thread opens in <#{channel}> in a moment"
            ))),
            Err(why) => Err(BackendError::Refused(why)),
        }
    }

    /// Opens `task`'s thread here (this node leads); if it cannot be opened, stops the task, since nobody could
    /// see or answer it, and says why in words for the person who asked.
    pub(crate) async fn open_or_stop(
        self: &Arc<Self>,
        opening: &Opening,
        task: &TaskInfo,
        limit: u64,
    ) -> Result<ChannelId, String> {
        let channel = ChannelId::new(opening.channel);
        match self
            .open_thread(channel, task, &opening.prompt, limit, opening.private)
            .await
        {
            Ok(thread) => Ok(thread),
            Err(err) => {
                warn!(%err, task = %task.id, "could not open the task's thread; cancelling the task");
                if let Err(e) = self.backend.cancel(&task.requester, &task.id).await {
                    warn!(error = %e, task = %task.id, "could not cancel the unseen task");
                }
                Err(format!(
                    "I could not open a thread for `{}` here ({err}), so I stopped it: check that I may \
                     create threads in this channel",
                    task.id
                ))
            }
        }
    }

    /// On a node that does not lead: leaves opening `task`'s thread to the leader through the task's mark (see
    /// `crate::leader`), and waits for it, for at most [`OPENING_WAIT`]. `None` if it has not opened by then
    /// (the leader is changing hands, say): it opens when there is one.
    async fn open_through_leader(
        self: &Arc<Self>,
        opening: Opening,
        task: &TaskInfo,
        limit: u64,
    ) -> Result<Option<ChannelId>, String> {
        let mut mark = Inner::fresh_mark(&task.id, 0, limit);
        mark.opening = Some(opening.clone());
        if let Err(err) = self.backend.mark_thread(&mark).await {
            warn!(%err, task = %task.id, "could not leave the thread to the leader; opening it here");
            return self.open_or_stop(&opening, task, limit).await.map(Some);
        }
        self.backend.wake_leader().await;
        let deadline = tokio::time::Instant::now() + OPENING_WAIT;
        while tokio::time::Instant::now() < deadline {
            tokio::time::sleep(OPENING_POLL).await;
            match self.backend.thread_mark(&task.id).await {
                Ok(Some(mark)) => {
                    if let Some(thread) = std::num::NonZeroU64::new(mark.thread) {
                        return Ok(Some(thread.into()));
                    }
                    if let Some(why) = mark.opening.and_then(|o| o.failed) {
                        if let Err(err) = self.backend.forget_thread(&task.id).await {
                            warn!(%err, task = %task.id, "could not forget a thread that did not open");
                        }
                        return Err(why);
                    }
                }
                // Opened, followed and finished already: the thread is kept with the task.
                Ok(None) => {
                    let thread = self.backend.task_thread(&task.id).await.ok().flatten();
                    return Ok(thread.and_then(std::num::NonZeroU64::new).map(Into::into));
                }
                Err(err) => {
                    debug!(%err, task = %task.id, "waiting for the leader to open the thread")
                }
            }
        }
        Ok(None)
    }

    async fn open_thread(
        self: &Arc<Self>,
        channel: ChannelId,
        task: &TaskInfo,
        prompt: &str,
        limit: u64,
        private: bool,
    ) -> Result<ChannelId, crate::rest::RestError> {
        let starter = CreateMessage::new()
            .content(format!(
                "🧵 `{}` · **{}** on **{}** · {}\n>>> {}",
                task.id,
                task.project,
                task.agent,
                mention(&task.requester),
                truncate(prompt, STARTER_PROMPT)
            ))
            .allowed_mentions(CreateAllowedMentions::new());
        let first_line = prompt.lines().next().unwrap_or("");
        let name = format!("{} · {}", task.id, truncate(first_line, THREAD_NAME_PROMPT));
        let thread = if private {
            // Nothing of the task in the channel: the thread is private, its people are added, and the
            // prompt goes inside it.
            let thread = self.rest.start_private_thread(channel, &name).await?;
            for person in thread_people(task) {
                self.rest.add_thread_member(thread.id, person).await?;
            }
            self.rest.send_message(thread.id, &starter, &[]).await?;
            thread
        } else {
            let msg = self.rest.send_message(channel, &starter, &[]).await?;
            self.rest.start_thread(channel, msg.id, &name).await?
        };
        self.threads.insert(ThreadInfo::new(thread.id, task, limit));
        self.start_follower(thread.id, task.clone(), limit).await;
        Ok(thread.id)
    }

    /// A new task in `thread`: its mark is written first, with nothing posted yet, then it is followed here
    /// if this node leads. A node that does not lead (or stops leading meanwhile) leaves it to the leader,
    /// which finds the mark at its next scan (see `crate::leader`).
    pub(crate) async fn start_follower(&self, thread: ChannelId, task: TaskInfo, limit: u64) {
        // Kept with the task for `/tasks`, long after the mark is gone.
        if let Err(err) = self.backend.set_task_thread(&task.id, thread.get()).await {
            warn!(%err, task = %task.id, "could not record the task's thread for its history");
        }
        // The chain is at this task now, and the `/cc` settings a follow-up used are spent.
        let chain = ThreadChain {
            thread: thread.get(),
            task: task.id.clone(),
            next_model: None,
            fresh: false,
        };
        if let Err(err) = self.backend.set_thread_chain(&chain).await {
            warn!(%err, task = %task.id, "could not record the thread's current task; other nodes may act on the one before");
        }
        let mark = Inner::fresh_mark(&task.id, thread.get(), limit);
        if let Err(err) = self.backend.mark_thread(&mark).await {
            warn!(%err, task = %task.id, "could not record the task's thread; only this node can follow it");
        }
        if !self.spawn_follower(thread, task.clone(), limit, None) {
            debug!(task = %task.id, %thread, "not leading: the leader follows this thread");
        }
    }

    /// Follows `task` in `thread` in the current term; false (and nothing runs) if this node does not lead.
    pub(crate) fn spawn_follower(
        &self,
        thread: ChannelId,
        task: TaskInfo,
        limit: u64,
        resume: Option<ThreadMark>,
    ) -> bool {
        let Some(term) = self.term() else {
            return false;
        };
        let env = self.follower_env();
        info!(task = %task.id, %thread, resumed = resume.is_some(), "following task in its thread");
        let span = info_span!("follow", task = %task.id, %thread);
        term.tracker
            .spawn(follow(env, thread, task, limit, resume, term.stop.clone()).instrument(span));
        true
    }

    /// The thread's task chain, as the backend keeps it ([`ThreadChain`]): every node of a cluster answers a
    /// thread's commands, so what one node remembers may be behind. Without a kept chain (a thread from
    /// before chains were kept, or the backend unreachable): what this node remembers, or the chain found
    /// again from the thread's name (`t_… · prompt`), walking forward through follow-ups to the newest task.
    pub(crate) async fn thread_info(&self, channel: ChannelId, user: &str) -> Option<ThreadInfo> {
        let remembered = self.threads.get(channel);
        if remembered.is_none() && !self.threads.maybe_thread(channel) {
            return None;
        }
        let chain = match self.backend.thread_chain(channel.get()).await {
            Ok(chain) => chain,
            Err(err) => {
                warn!(%err, %channel, "could not read the thread's chain; using what this node remembers");
                None
            }
        };
        match (chain, remembered) {
            (Some(chain), remembered) => {
                let info = match remembered {
                    Some(info) if info.task == chain.task => info,
                    // Another node moved the chain on (or this one does not know the thread yet).
                    remembered => {
                        let task = self.backend.task(user, &chain.task).await.ok()?;
                        let limit = remembered.map_or(upload_limit(0), |i| i.upload_limit);
                        ThreadInfo::new(channel, &task, limit)
                    }
                };
                let info = ThreadInfo {
                    next_model: chain.next_model,
                    fresh: chain.fresh,
                    ..info
                };
                self.threads.insert(info.clone());
                Some(info)
            }
            (None, Some(info)) => Some(info),
            (None, None) => self.thread_from_name(channel, user).await,
        }
    }

    /// A thread's chain found again from its name (`t_… · prompt`), for a thread nothing is kept for.
    async fn thread_from_name(&self, channel: ChannelId, user: &str) -> Option<ThreadInfo> {
        // Without a token there is no Discord to ask.
        self.config.token.as_ref()?;
        let name = match self.rest.channel(channel).await {
            Ok(serenity::all::Channel::Guild(g)) if g.thread_metadata.is_some() => g.name,
            _ => {
                self.threads.not_a_thread(channel);
                return None;
            }
        };
        let first = task_in_name(&name)?;
        let mut task = self.backend.task(user, first).await.ok()?;
        if let Ok(recent) = self.backend.tasks(user).await {
            while let Some(next) = recent
                .iter()
                .find(|t| t.follows.as_deref() == Some(task.id.as_str()))
            {
                task = next.clone();
            }
        }
        let info = ThreadInfo::new(channel, &task, upload_limit(0));
        self.threads.insert(info.clone());
        // An existing task: followed here only if this node leads (its mark, if any, is the leader's).
        if !phase_of(&task.state).is_final() {
            self.spawn_follower(channel, task, info.upload_limit, None);
        }
        Some(info)
    }

    /// Keeps the `/cc` settings of `info` for the thread's next follow-up, for every node.
    async fn save_chain(&self, info: &ThreadInfo) -> crate::backend::Result<()> {
        let chain = ThreadChain {
            thread: info.thread.get(),
            task: info.task.clone(),
            next_model: info.next_model.clone(),
            fresh: info.fresh,
        };
        self.backend.set_thread_chain(&chain).await?;
        self.threads.insert(info.clone());
        Ok(())
    }

    /// A follow-up in a thread without files (see [`continue_thread_with`](Self::continue_thread_with)).
    async fn continue_thread(
        self: &Arc<Self>,
        user: &str,
        channel: ChannelId,
        prompt: &str,
        limit: u64,
    ) -> crate::backend::Result<TaskInfo> {
        self.continue_thread_with(user, channel, prompt, limit, Vec::new())
            .await
    }

    /// A follow-up in a thread (a message or `/reply`): into the running session, or a new task that
    /// resumes it; after `/cc clear` a fresh session, after `/cc model` the session on another model.
    async fn continue_thread_with(
        self: &Arc<Self>,
        user: &str,
        channel: ChannelId,
        prompt: &str,
        limit: u64,
        files: Vec<crate::backend::Attachment>,
    ) -> crate::backend::Result<TaskInfo> {
        let Some(info) = self.thread_info(channel, user).await else {
            return Err(BackendError::Refused(
                "this is not a task thread: start a task with /task, then reply in its thread"
                    .into(),
            ));
        };
        if info.fresh || info.next_model.is_some() {
            let current = self.backend.task(user, &info.task).await?;
            let ended = phase_of(&current.state).is_final();
            if info.fresh && !ended {
                return Err(BackendError::Refused(format!(
                    "`{}` is still running: stop it first (`/cc stop`), then write again to start afresh",
                    info.task
                )));
            }
            if ended {
                let resume = if info.fresh {
                    None
                } else {
                    Some(current.session_id.clone().ok_or_else(|| {
                        BackendError::Refused(format!(
                            "`{}` ended before Claude Code started a session: use `/cc clear` to start afresh",
                            info.task
                        ))
                    })?)
                };
                let req = TaskRequest {
                    user: user.to_string(),
                    prompt: prompt.to_string(),
                    project: Some(info.project.clone()),
                    target: (user != info.owner).then(|| info.owner.clone()),
                    agent: Some(info.agent.clone()),
                    options: TaskOptions {
                        model: info.next_model.clone().or(info.model.clone()),
                        permission_mode: info.mode.clone(),
                        ..TaskOptions::default()
                    },
                    resume,
                    name: None,
                    roles: Vec::new(),
                };
                let task = self.backend.submit_with_files(req, files).await?;
                self.threads.update(channel, |i| {
                    i.task = task.id.clone();
                    i.model = task.model.clone();
                    i.fresh = false;
                    i.next_model = None;
                });
                self.start_follower(channel, task.clone(), limit.max(info.upload_limit))
                    .await;
                return Ok(task);
            }
        }
        let task = self
            .backend
            .reply_with_files(user, &info.task, prompt, files)
            .await?;
        if task.id != info.task {
            self.threads.update(channel, |i| i.task = task.id.clone());
            self.start_follower(channel, task.clone(), info.upload_limit)
                .await;
        }
        Ok(task)
    }

    /// A message in a thread: a follow-up if the thread is a task's; anything else is ignored.
    pub(crate) async fn thread_message(self: &Arc<Self>, msg: Message) {
        let user = msg.author.id.to_string();
        let Some(info) = self.thread_info(msg.channel_id, &user).await else {
            return;
        };
        // Others may talk in a task's thread too; only the requester's and the owner's messages are
        // follow-ups, and nobody else is answered with a refusal for chatting.
        if let Err(e) = self.backend.task(&user, &info.task).await {
            debug!(error = %e, %user, task = %info.task, "a message in a task thread from someone who may not act on it");
            return;
        }
        let limit = self
            .threads
            .get(msg.channel_id)
            .map_or(0, |i| i.upload_limit);
        let wanted: Vec<crate::files::Wanted> = msg.attachments.iter().map(Into::into).collect();
        let sent = match crate::files::fetch(&wanted, self.config.api_proxy.as_deref()).await {
            Ok(files) => {
                // A message that is only files still says something to Claude.
                let prompt = match msg.content.trim() {
                    "" if !files.is_empty() => "Please look at the attached files.",
                    _ => &msg.content,
                };
                self.continue_thread_with(&user, msg.channel_id, prompt, limit, files)
                    .await
            }
            Err(why) => Err(BackendError::Refused(why)),
        };
        if let Err(e) = sent {
            // No interaction to answer privately: reply in the thread, to that person only.
            let text = match e {
                BackendError::Refused(m) => format!("⚠️ {}: {m}", mention(&user)),
                BackendError::Internal(err) => {
                    error!(error = %format!("{err:#}"), "backend failure on a follow-up");
                    format!(
                        "⚠️ {}: something went wrong on our side; try again in a moment.",
                        mention(&user)
                    )
                }
            };
            let reply = CreateMessage::new()
                .content(truncate(&text, 2000))
                .reference_message(&msg)
                .allowed_mentions(CreateAllowedMentions::new().users(vec![msg.author.id]));
            if let Err(err) = self.rest.send_message(msg.channel_id, &reply, &[]).await {
                warn!(%err, "could not answer a follow-up");
            }
        }
    }

    /// The task a command names, or the thread's task.
    async fn task_arg(
        &self,
        user: &str,
        args: &Args,
        channel: ChannelId,
    ) -> crate::backend::Result<String> {
        if let Some(t) = args.str("task_id") {
            return Ok(t);
        }
        match self.thread_info(channel, user).await {
            Some(info) => Ok(info.task),
            None => Err(BackendError::Refused(
                "which task? Give its id (`task_id`), or use the command in the task's thread"
                    .into(),
            )),
        }
    }

    /// `/status` and "Full output": the summary, then the whole transcript as follow-ups (a couple of
    /// messages, or `<task>.md`). Private unless `public` (used in the task's own thread, which shows that
    /// output to everyone in it already). A stranger is refused before anything of the task is read, in the
    /// words used for an id that does not exist.
    async fn status(
        self: &Arc<Self>,
        user: &str,
        task: &str,
        public: bool,
        token: &str,
        limit: u64,
    ) -> Reply {
        let (info, events) = match self.backend.task_events(user, task).await {
            Ok(found) => found,
            Err(e) => return failed(e).into(),
        };
        let progress = progress_of(&info, &events);
        let ctx = SummaryContext {
            agent: info.agent.clone(),
            project: info.project.clone(),
            elapsed: std::time::Duration::from_secs(
                crate::thread::unix_now().saturating_sub(info.created_at),
            ),
        };
        let placement = place_transcript(&info.id, &transcript(&info, &events), limit);
        let answer = Answer {
            content: format!("📜 `{}`: the summary, and the whole output below.", info.id),
            embeds: vec![summary_embed(&progress, &ctx)],
            components: Vec::new(),
            ephemeral: !public,
        };
        let (inner, token, task) = (self.clone(), token.to_string(), info.id.clone());
        let after: After = Box::pin(async move {
            inner
                .send_transcript(&token, &task, placement, !public)
                .await;
        });
        Reply {
            initial: Initial::Message(answer),
            after: Some(after),
        }
    }

    /// The transcript's messages or file, as follow-ups of the interaction that asked (their own token, so a
    /// deleted or archived thread does not matter). Nobody is pinged, whatever the task printed.
    async fn send_transcript(
        &self,
        token: &str,
        task: &str,
        placement: Placement,
        ephemeral: bool,
    ) {
        let quiet = |content: String| {
            CreateInteractionResponseFollowup::new()
                .content(content)
                .ephemeral(ephemeral)
                .allowed_mentions(CreateAllowedMentions::new())
        };
        let sent = match placement {
            Placement::Messages(parts) => {
                let mut result = Ok(());
                for part in parts {
                    if let Err(err) = self.rest.followup(token, &quiet(part), &[]).await {
                        result = Err(err);
                        break;
                    }
                }
                result
            }
            Placement::Attachment {
                filename,
                data,
                note,
            } => {
                let file = Upload { filename, data };
                self.rest
                    .followup(token, &quiet(note), std::slice::from_ref(&file))
                    .await
                    .map(|_| ())
            }
        };
        if let Err(err) = sent {
            warn!(%err, %task, "could not send a task's transcript");
        }
    }

    /// Whether `/status` is used in the thread of the task it names (or names none, in a task's thread): its
    /// answer is then for everyone there. Decided from what the interaction carries, before the answer (Discord
    /// fixes a deferred answer's privacy at the defer).
    fn status_in_own_thread(&self, c: &CommandInteraction) -> bool {
        if c.data.name != "status" || !is_thread(c) {
            return false;
        }
        let known = self.threads.get(c.channel_id).map(|i| i.task);
        let first = c
            .channel
            .as_ref()
            .and_then(|ch| ch.name.as_deref())
            .and_then(task_in_name)
            .map(str::to_string);
        match Args::of(&c.data).str("task_id") {
            Some(named) => {
                known.as_deref() == Some(named.as_str()) || first.as_deref() == Some(named.as_str())
            }
            None => known.is_some() || first.is_some(),
        }
    }

    /// `/tasks` and its Previous / Next buttons: one page of the user's tasks and those others ran on their
    /// agents, newest first, each with its thread when the backend knows it.
    async fn tasks_page(&self, user: &str, page: &HistoryPage) -> crate::backend::Result<Answer> {
        let query = HistoryQuery {
            agent: page.agent.clone(),
            state: page.state.clone(),
            skip: usize::try_from(page.page)
                .unwrap_or(usize::MAX)
                .saturating_mul(HISTORY_PAGE),
            take: HISTORY_PAGE,
            ..HistoryQuery::default()
        };
        let found = self.backend.history(user, &query).await?;
        let filters = match (&page.agent, &page.state) {
            (None, None) => String::new(),
            (a, s) => {
                let mut f = Vec::new();
                if let Some(a) = a {
                    f.push(format!("on {}", inline_code(a, 40)));
                }
                if let Some(s) = s {
                    f.push(format!("state {}", inline_code(s, 20)));
                }
                format!(" ({})", f.join(", "))
            }
        };
        if found.entries.is_empty() {
            return Ok(Answer::private(if page.page == 0 {
                format!("No tasks{filters} yet: start one with `/task`.")
            } else {
                format!("No more tasks{filters}.")
            }));
        }
        let mut lines = vec![format!("📋 **Tasks{filters}** · page {}", page.page + 1)];
        for e in &found.entries {
            let t = &e.task;
            let icon = phase_of(&t.state).icon();
            let thread = e.thread.map(|id| format!(" · <#{id}>")).unwrap_or_default();
            let by = if t.requester == user {
                String::new()
            } else {
                format!(" · by {}", mention(&t.requester))
            };
            lines.push(truncate(
                &format!(
                    "{icon} `{}` · {} on {} · {} · {}{by}{thread}",
                    t.id,
                    inline_code(&t.project, 40),
                    inline_code(&t.agent, 40),
                    t.state.replace('_', " "),
                    when(t.created_at),
                ),
                190,
            ));
        }
        let mut answer = Answer::private(truncate(&lines.join("\n"), 2000));
        answer.components = page_buttons(page, found.more);
        Ok(answer)
    }

    /// The user's project that `value` names as `agent/project` (what autocomplete offers where a name repeats
    /// across machines). `None` for anything else, which is used as typed (a project name, or a folder path).
    async fn agent_project(&self, user: &str, value: &str) -> Option<crate::backend::ProjectInfo> {
        let (agent, name) = value.split_once('/')?;
        if agent.is_empty() || name.is_empty() {
            return None;
        }
        let projects = self.backend.projects(user).await.ok()?;
        projects
            .into_iter()
            .find(|p| p.agent == agent && p.name == name)
    }

    /// The open approval of a task: remembered here, or read from its log.
    async fn open_approval(&self, task: &str) -> crate::backend::Result<Option<String>> {
        let feed = self.backend.follow(task).await?;
        let mut open: Vec<String> = Vec::new();
        for (_, ev) in &feed.past {
            match ev {
                TaskEvent::ApprovalRequested { approval, .. } => open.push(approval.clone()),
                TaskEvent::ApprovalClosed { approval, .. } => open.retain(|a| a != approval),
                _ => {}
            }
        }
        Ok(open.into_iter().next())
    }

    async fn approve_command(
        &self,
        user: &str,
        task: &str,
        option: Option<&str>,
    ) -> crate::backend::Result<Answer> {
        // Who asks is checked before anything of the task is read: a stranger is refused as if the id did
        // not exist (the backend words both alike), and does not make the relay load the task's events.
        self.backend.task(user, task).await?;
        if let Err(refusal) = self.gate(user, task).await? {
            return Ok(refusal);
        }
        let Some(approval) = self.open_approval(task).await? else {
            return Err(BackendError::Refused(format!(
                "`{task}` has no approval waiting"
            )));
        };
        let (decision, said) = match option {
            Some("session") => (
                Decision::AllowSession,
                "✅ Allowed for this session: this exact use (the same command, file or site).",
            ),
            Some("deny") => (
                Decision::Deny {
                    reason: String::new(),
                },
                "🚫 Denied.",
            ),
            _ => (
                Decision::AllowOnce {
                    updated_input: None,
                },
                "✅ Allowed once.",
            ),
        };
        self.decide(user, task, &approval, decision).await?;
        Ok(Answer::private(said))
    }

    /// `Ok(Ok(()))` when `user` may answer the task's approvals; `Ok(Err(answer))` says who may.
    async fn gate(&self, user: &str, task: &str) -> crate::backend::Result<Result<(), Answer>> {
        let approver = self.backend.approver(task).await?;
        if approver == user {
            return Ok(Ok(()));
        }
        let id = approver.parse().unwrap_or(UserId::new(1));
        Ok(Err(Answer::private(not_yours(id))))
    }

    async fn decide(
        &self,
        user: &str,
        task: &str,
        approval: &str,
        decision: Decision,
    ) -> crate::backend::Result<()> {
        let rule = match &decision {
            Decision::AllowSession => self
                .threads
                .approval(task, approval)
                .and_then(|open| open.view.session),
            Decision::AllowSessionPrefix { prefix } => Some(SessionScope::Prefix {
                prefix: prefix.clone(),
            }),
            _ => None,
        };
        // Recorded before the decision goes out: the agent can act on it and report the approval closed (which
        // edits the message with who decided and the rule) before `decide` returns here. Put back if the
        // decision did not go out, so a later click is credited to whoever makes it.
        let by = user.parse().ok();
        let before = self.threads.update_approval(task, approval, |a| {
            let before = (a.decided_by, a.rule.clone());
            a.decided_by = by;
            a.rule = rule;
            before
        });
        let sent = self.backend.decide(user, task, approval, decision).await;
        if let (Err(_), Some((decided_by, rule))) = (&sent, before) {
            self.threads.update_approval(task, approval, |a| {
                a.decided_by = decided_by;
                a.rule = rule;
            });
        }
        sent
    }

    async fn share_command(
        &self,
        user: &str,
        sub: &str,
        args: &Args,
    ) -> crate::backend::Result<Answer> {
        match sub {
            "add" => {
                let Some(grantee) = args.user("user") else {
                    return Err(BackendError::Refused("say whom to share with".into()));
                };
                let projects: Vec<String> = args
                    .str("projects")
                    .unwrap_or_default()
                    .split(',')
                    .map(|p| p.trim().to_string())
                    .filter(|p| !p.is_empty())
                    .collect();
                let level = if args.str("level").as_deref() == Some("trusted") {
                    ShareLevel::Trusted
                } else {
                    ShareLevel::Run
                };
                let s = self
                    .backend
                    .share(user, &grantee.to_string(), projects, level)
                    .await?;
                let what = if s.projects.is_empty() {
                    "all your projects".to_string()
                } else {
                    format!("projects {}", s.projects.join(", "))
                };
                let approvals = match s.level {
                    ShareLevel::Run => "their tool approvals come to you",
                    ShareLevel::Trusted => "they answer their own tool approvals",
                };
                Ok(Answer::private(format!(
                    "🤝 {} may now run tasks on your agents ({what}); {approvals}. Their agent must also accept \
                     shared tasks (`ct-agent sharing`).",
                    mention(&s.grantee)
                )))
            }
            "remove" => {
                let Some(grantee) = args.user("user") else {
                    return Err(BackendError::Refused(
                        "say whom to stop sharing with".into(),
                    ));
                };
                self.backend.unshare(user, &grantee.to_string()).await?;
                Ok(Answer::private(format!(
                    "🔒 {} can no longer use your agents; their tasks there were stopped.",
                    mention(&grantee.to_string())
                )))
            }
            "list" | "available" => {
                let shares = self.backend.shares(user).await?;
                let lines: Vec<String> = shares
                    .iter()
                    .filter(|s| {
                        if sub == "list" {
                            s.owner == user
                        } else {
                            s.grantee == user
                        }
                    })
                    .map(|s| {
                        let who = if sub == "list" {
                            mention(&s.grantee)
                        } else {
                            mention(&s.owner)
                        };
                        let what = if s.projects.is_empty() {
                            "all projects".to_string()
                        } else {
                            s.projects.join(", ")
                        };
                        let level = match s.level {
                            ShareLevel::Run => "run",
                            ShareLevel::Trusted => "trusted",
                        };
                        format!("{who} · {what} · {level}")
                    })
                    .collect();
                Ok(Answer::private(if lines.is_empty() {
                    if sub == "list" {
                        "You share with nobody. `/share add` lets someone run tasks on your agents."
                            .to_string()
                    } else {
                        "Nobody shares their agents with you yet.".to_string()
                    }
                } else {
                    truncate(&lines.join("\n"), 2000)
                }))
            }
            _ => Ok(Answer::private("Unknown /share subcommand.")),
        }
    }

    async fn cc(
        self: &Arc<Self>,
        user: &str,
        sub: &str,
        args: &Args,
        channel: ChannelId,
    ) -> crate::backend::Result<Answer> {
        let Some(info) = self.thread_info(channel, user).await else {
            return Err(BackendError::Refused(
                "use /cc in a task's thread: it acts on that thread's session".into(),
            ));
        };
        // Only people who may act on the task change its session (the backend checks who that is).
        let task = self.backend.task(user, &info.task).await?;
        match sub {
            "stop" => {
                self.backend.cancel(user, &task.id).await?;
                Ok(Answer::text(format!("⏹️ Stopping `{}`…", task.id)))
            }
            "status" => {
                let feed = self.backend.follow(&task.id).await?;
                let p = progress_of(&task, &feed.past);
                // The same lines as the thread's pinned status message, and the session they belong to.
                let elapsed = std::time::Duration::from_secs(
                    crate::thread::unix_now().saturating_sub(task.created_at),
                );
                let mut lines = vec![
                    p.render(elapsed),
                    format!(
                        "-# session `{}`",
                        task.session_id.as_deref().unwrap_or("not started")
                    ),
                ];
                if info.fresh {
                    lines.push("The next message starts a fresh session.".into());
                }
                if let Some(m) = &info.next_model {
                    lines.push(format!("The next message switches to model **{m}**."));
                }
                Ok(Answer::private(lines.join("\n")))
            }
            "clear" => {
                self.save_chain(&ThreadInfo {
                    fresh: true,
                    ..info
                })
                .await?;
                Ok(Answer::text(
                    "🧹 The next message here starts a fresh Claude Code session (same project and agent).",
                ))
            }
            "model" => {
                let Some(name) = args.str("name") else {
                    return Err(BackendError::Refused(
                        "name a model, e.g. sonnet or opus".into(),
                    ));
                };
                self.save_chain(&ThreadInfo {
                    next_model: Some(name.clone()),
                    ..info
                })
                .await?;
                Ok(Answer::text(format!(
                    "🔁 From the next message on, Claude uses **{name}** (the conversation continues)."
                )))
            }
            "compact" => {
                // After /cc clear there is no conversation to compact: sending "/compact" would start the fresh
                // session early, only to fail with "No messages to compact".
                if info.fresh {
                    return Err(BackendError::Refused(
                        "there is nothing to compact: after /cc clear the next message here starts a fresh session"
                            .into(),
                    ));
                }
                let next = self
                    .continue_thread(user, channel, "/compact", info.upload_limit)
                    .await?;
                Ok(Answer::text(format!(
                    "🗜️ Compacting the conversation (`{}`)…",
                    next.id
                )))
            }
            _ => Ok(Answer::private("Unknown /cc subcommand.")),
        }
    }

    /// `/mentions [on|off]`: the user's own choice, shown back to them.
    async fn mentions(&self, user: &str, set: Option<&str>) -> crate::backend::Result<Answer> {
        let on = match set {
            Some(v) => {
                let on = v == "on";
                self.backend.set_mentions(user, on).await?;
                on
            }
            None => self.backend.wants_mentions(user).await?,
        };
        Ok(Answer::private(if on {
            "🔔 Mentions are **on**: I @mention you when an approval waits for you and when your task ends. \
             `/mentions set:off` turns them off."
        } else {
            "🔕 Mentions are **off**: approvals and endings are still posted in the thread, without pinging \
             you. `/mentions set:on` turns them back on."
        }))
    }

    /// `/dashboard`: a sign-in link only the user sees, or (`signout:all`) every session of theirs ended.
    async fn dashboard(&self, user: &str, sign_out: bool) -> crate::backend::Result<Answer> {
        if sign_out {
            let ended = self.backend.end_dashboard_sessions(user).await?;
            return Ok(Answer::private(match ended {
                0 => "You were not signed in to the dashboard anywhere.".to_string(),
                1 => "🔒 Signed out: your one dashboard session has ended.".to_string(),
                n => format!("🔒 Signed out everywhere: {n} dashboard sessions have ended."),
            }));
        }
        let link = self.backend.dashboard_link(user).await?;
        Ok(Answer::private(format!(
            "🔐 [Open your dashboard]({}). This link signs you in once and expires in {} minutes: do not share \
             it. `/dashboard signout:all` signs you out everywhere.",
            link.url,
            link.expires_in.div_ceil(60)
        )))
    }

    async fn audit_text(&self, user: &str) -> crate::backend::Result<Answer> {
        let entries = self.backend.audit(user).await?;
        let lines: Vec<String> = entries
            .iter()
            .map(|e| {
                format!(
                    "{} · {} · {}",
                    when(e.at),
                    mention(&e.actor),
                    truncate(&e.what, 200)
                )
            })
            .collect();
        Ok(Answer::private(if lines.is_empty() {
            "Nothing has happened on your agents yet.".to_string()
        } else {
            truncate(&lines.join("\n"), 2000)
        }))
    }

    async fn autocomplete(&self, c: CommandInteraction) -> Reply {
        let user = c.user.id.to_string();
        let sub = Args::of(&c.data).sub;
        let Some(focused) = c.data.autocomplete() else {
            return Initial::Choices(Vec::new()).into();
        };
        let typed = focused.value.to_lowercase();
        let names: Vec<(String, String)> =
            match completion_for(&c.data.name, sub.as_deref(), focused.name) {
                Some(Completion::Project) => self
                    .backend
                    .projects(&user)
                    .await
                    .map(|ps| {
                        // A name on several machines is offered once per machine, as `agent/project`.
                        let repeats = |name: &str| ps.iter().filter(|p| p.name == name).count() > 1;
                        ps.iter()
                            .map(|p| {
                                let value = if repeats(&p.name) {
                                    format!("{}/{}", p.agent, p.name)
                                } else {
                                    p.name.clone()
                                };
                                (format!("{} ({})", p.name, p.agent), value)
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
                Some(Completion::Agent) => self
                    .backend
                    .agents(&user)
                    .await
                    .map(|a| {
                        a.into_iter()
                            .map(|a| {
                                let on = if a.online { "online" } else { "offline" };
                                (format!("{} ({on})", a.name), a.name)
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
                Some(Completion::Task) => self
                    .backend
                    .tasks(&user)
                    .await
                    .map(|ts| {
                        ts.into_iter()
                            .map(|t| (format!("{} · {} · {}", t.id, t.project, t.state), t.id))
                            .collect()
                    })
                    .unwrap_or_default(),
                Some(Completion::Model) => {
                    let mut m: Vec<(String, String)> = MODELS
                        .iter()
                        .map(|m| (m.to_string(), m.to_string()))
                        .collect();
                    if !typed.is_empty() && !MODELS.contains(&typed.as_str()) {
                        m.insert(0, (focused.value.to_string(), focused.value.to_string()));
                    }
                    m
                }
                None => Vec::new(),
            };
        let choices = names
            .into_iter()
            .filter(|(label, _)| label.to_lowercase().contains(&typed))
            .take(MAX_CHOICES)
            .map(|(label, value)| {
                AutocompleteChoice::new(truncate(&label, 100), truncate(&value, 100))
            })
            .collect();
        Initial::Choices(choices).into()
    }

    async fn component(self: &Arc<Self>, c: ComponentInteraction) -> Reply {
        let parent = c.channel.as_ref().and_then(|ch| ch.parent_id);
        if let Some(refusal) = self.allowed(c.channel_id, parent) {
            return refusal;
        }
        let user = c.user.id.to_string();
        if let Some(page) = HistoryPage::parse(&c.data.custom_id) {
            // The clicker's own history, whoever's list the button was under.
            return self
                .tasks_page(&user, &page)
                .await
                .unwrap_or_else(failed)
                .into();
        }
        let Some(action) = Action::parse(&c.data.custom_id) else {
            return Answer::private(
                "This button is from an older version of the bot: use the commands instead.",
            )
            .into();
        };
        let task = action.task().to_string();
        if let Action::FullOutput { .. } = action {
            // For the clicker only: the thread already shows the output to everyone in it.
            let limit = upload_limit(c.attachment_size_limit);
            return self.status(&user, &task, false, &c.token, limit).await;
        }
        if let Action::Stop { .. } = action {
            return match self.backend.cancel(&user, &task).await {
                Ok(()) => Answer::private(format!("⏹️ Stopping `{task}`…")).into(),
                Err(e) => failed(e).into(),
            };
        }
        if let Action::Worktree { action, .. } = action {
            // The relay allows only the task's requester or the agent's owner; the agent checks again.
            return match self.backend.worktree(&user, &task, action).await {
                Ok(outcome) => {
                    let files = if outcome.conflicts.is_empty() {
                        String::new()
                    } else {
                        let list: Vec<String> = outcome
                            .conflicts
                            .iter()
                            .take(20)
                            .map(|f| crate::render::escape::inline_code(f, 200))
                            .collect();
                        format!("\nConflicting files: {}", list.join(", "))
                    };
                    let icon = if outcome.ok { "✅" } else { "⚠️" };
                    let text = crate::render::truncate(&outcome.message, 1500);
                    if outcome.ok {
                        Answer::text(format!("{icon} {text}")).into()
                    } else {
                        Answer::private(format!("{icon} {text}{files}")).into()
                    }
                }
                Err(e) => failed(e).into(),
            };
        }
        match self.gate(&user, &task).await {
            Ok(Ok(())) => {}
            Ok(Err(refusal)) => return refusal.into(),
            Err(e) => return failed(e).into(),
        }
        let result = match action {
            Action::Allow {
                approval, scope, ..
            } => {
                let decision = match scope {
                    Scope::Once => Some(Decision::AllowOnce {
                        updated_input: None,
                    }),
                    Scope::Session => Some(Decision::AllowSession),
                    // The word comes from the request this bot showed, never from the click.
                    Scope::FirstWord => self
                        .find_approval(&task, &approval)
                        .await
                        .filter(|open| takes_prefixes(&open.view))
                        .and_then(|open| {
                            SessionScope::first_word(&open.view.tool, &open.view.input)
                        })
                        .map(|rule| Decision::AllowSessionPrefix {
                            prefix: rule.subject().to_string(),
                        }),
                };
                match decision {
                    // The message is edited (buttons disabled, outcome shown) when the agent reports it closed.
                    Some(decision) => self
                        .decide(&user, &task, &approval, decision)
                        .await
                        .map(|()| Initial::Acknowledge),
                    None => Ok(Initial::Message(Answer::private(
                        "That approval is no longer open here: allow this command only, or deny.",
                    ))),
                }
            }
            Action::Prefix { approval, .. } => {
                let command = self
                    .find_approval(&task, &approval)
                    .await
                    .and_then(|o| o.view.input["command"].as_str().map(str::to_string))
                    .unwrap_or_default();
                Ok(match prefix_modal(&task, &approval, &command) {
                    Ok(m) => Initial::Modal(m),
                    Err(err) => Initial::Message(Answer::private(format!("⚠️ {err}"))),
                })
            }
            Action::Deny { approval, .. } => Ok(match deny_modal(&task, &approval) {
                Ok(m) => Initial::Modal(m),
                Err(err) => Initial::Message(Answer::private(format!(
                    "⚠️ {err}: deny with `/approve option:deny`"
                ))),
            }),
            Action::Answer {
                approval, question, ..
            } => {
                let values = match &c.data.kind {
                    ComponentInteractionDataKind::StringSelect { values } => values.clone(),
                    _ => Vec::new(),
                };
                let labels = self.find_approval(&task, &approval).await.map(|open| {
                    let qs = questions(&open.view.input);
                    values
                        .iter()
                        .filter_map(|v| {
                            let i: usize = v.parse().ok()?;
                            qs.get(usize::from(question))?
                                .options
                                .get(i)
                                .map(|(l, _)| l.clone())
                        })
                        .collect::<Vec<_>>()
                        .join(", ")
                });
                match labels {
                    Some(answer) if !answer.is_empty() => self.answer(&user, &task, &approval, question, answer).await,
                    _ => Ok(Initial::Message(Answer::private(
                        "That question is no longer open here: answer in words, or wait for Claude to ask again.",
                    ))),
                }
            }
            Action::AnswerOther {
                approval, question, ..
            } => {
                let text = self
                    .find_approval(&task, &approval)
                    .await
                    .and_then(|o| {
                        questions(&o.view.input)
                            .get(usize::from(question))
                            .map(|q| q.text.clone())
                    })
                    .unwrap_or_default();
                Ok(match answer_modal(&task, &approval, question, &text) {
                    Ok(m) => Initial::Modal(m),
                    Err(err) => Initial::Message(Answer::private(format!("⚠️ {err}"))),
                })
            }
            Action::Stop { .. }
            | Action::FullOutput { .. }
            | Action::Worktree { .. }
            | Action::DenyReason { .. }
            | Action::AnswerText { .. }
            | Action::PrefixText { .. } => {
                Ok(Initial::Message(Answer::private("That is not a button.")))
            }
        };
        result
            .unwrap_or_else(|e| Initial::Message(failed(e)))
            .into()
    }

    /// An open approval of `task`: as this node's follower posted it, or — on a node that does not follow the
    /// task (a cluster's other nodes answer its buttons in HTTP-interactions mode) — from the task's stored
    /// events, if the request is still open there. The words and rules offered always come from the request
    /// the agent sent, never from the click.
    async fn find_approval(&self, task: &str, approval: &str) -> Option<OpenApproval> {
        if let Some(open) = self.threads.approval(task, approval) {
            return Some(open);
        }
        let feed = self.backend.follow(task).await.ok()?;
        let request = open_request(&feed.past, approval)?;
        let decider = self
            .backend
            .approver(task)
            .await
            .unwrap_or_else(|_| feed.task.owner.clone());
        Some(OpenApproval {
            view: view_of(task, request, &decider)?,
            channel: self.threads.thread_of(task).unwrap_or(ChannelId::new(1)),
            message: None,
            decided_by: None,
            rule: None,
        })
    }

    /// "Allow a prefix…", submitted: the prefix must cover the command the approver was shown (the agent checks
    /// it again), so allowing this use and adding the rule are one decision.
    async fn allow_prefix(
        &self,
        user: &str,
        task: &str,
        approval: &str,
        prefix: &str,
    ) -> crate::backend::Result<Initial> {
        let Some(open) = self
            .find_approval(task, approval)
            .await
            .filter(|open| takes_prefixes(&open.view))
        else {
            return Ok(Initial::Message(Answer::private(
                "That approval is no longer open here: allow this command only, or deny.",
            )));
        };
        let rule = match SessionScope::prefix(&open.view.tool, &open.view.input, prefix) {
            Ok(rule) => rule,
            Err(why) => {
                return Ok(Initial::Message(Answer::private(format!(
                    "⚠️ Not allowed: {why}. Nothing was decided; the approval is still open."
                ))))
            }
        };
        let said = format!("✅ Allowed for this session: {}.", rule_words(&rule));
        let decision = Decision::AllowSessionPrefix {
            prefix: rule.subject().to_string(),
        };
        self.decide(user, task, approval, decision).await?;
        Ok(Initial::Message(Answer::private(said)))
    }

    /// Records one AskUserQuestion answer; sends them all once every question has one. The answers are kept
    /// by the backend, so in a cluster the questions may be answered through different nodes.
    async fn answer(
        &self,
        user: &str,
        task: &str,
        approval: &str,
        question: u8,
        answer: String,
    ) -> crate::backend::Result<Initial> {
        let Some(open) = self.find_approval(task, approval).await else {
            return Ok(Initial::Message(Answer::private(
                "That question is no longer open: nothing was sent.",
            )));
        };
        if usize::from(question) >= question_count(&open.view) {
            return Ok(Initial::Message(Answer::private(
                "That is not one of the questions asked.",
            )));
        }
        let given = self
            .backend
            .add_answer(task, approval, question, &answer)
            .await?;
        if given.len() < question_count(&open.view) {
            return Ok(Initial::Message(Answer::private(
                "Noted: answer the other questions too, then it goes to Claude.",
            )));
        }
        let answers = answers_json(&open.view, &given);
        self.decide(user, task, approval, Decision::Answers { answers })
            .await?;
        Ok(Initial::Message(Answer::private(
            "💬 Answer sent to Claude.",
        )))
    }

    async fn modal(self: &Arc<Self>, m: ModalInteraction) -> Reply {
        let parent = m.channel.as_ref().and_then(|ch| ch.parent_id);
        if let Some(refusal) = self.allowed(m.channel_id, parent) {
            return refusal;
        }
        let user = m.user.id.to_string();
        let field = |id: &str| {
            m.data
                .components
                .iter()
                .flat_map(|row| &row.components)
                .find_map(|c| match c {
                    ActionRowComponent::InputText(t) if t.custom_id == id => t.value.clone(),
                    _ => None,
                })
                .unwrap_or_default()
        };
        let Some(action) = Action::parse(&m.data.custom_id) else {
            return Answer::private(
                "This form is from an older version of the bot: use the commands instead.",
            )
            .into();
        };
        let task = action.task().to_string();
        match self.gate(&user, &task).await {
            Ok(Ok(())) => {}
            Ok(Err(refusal)) => return refusal.into(),
            Err(e) => return failed(e).into(),
        }
        let result = match action {
            Action::DenyReason { approval, .. } => {
                let reason = field("reason");
                self.decide(&user, &task, &approval, Decision::Deny { reason })
                    .await
                    .map(|()| Initial::Message(Answer::private("🚫 Denied; Claude is told why.")))
            }
            Action::AnswerText {
                approval, question, ..
            } => {
                self.answer(&user, &task, &approval, question, field("answer"))
                    .await
            }
            Action::PrefixText { approval, .. } => {
                self.allow_prefix(&user, &task, &approval, &field("prefix"))
                    .await
            }
            _ => Ok(Initial::Message(Answer::private("That is not a form."))),
        };
        result
            .unwrap_or_else(|e| Initial::Message(failed(e)))
            .into()
    }
}

/// Whether the agent behind an approval understands prefix rules: it said what "Allow for session" covers,
/// and for Bash that is a command. An older agent would not parse the decision.
fn takes_prefixes(view: &crate::render::approval::ApprovalView) -> bool {
    matches!(view.session, Some(SessionScope::Command { .. }))
}

/// Previous / Next under a `/tasks` page (none when there is only the one page).
fn page_buttons(page: &HistoryPage, more: bool) -> Vec<serenity::all::CreateActionRow> {
    use serenity::all::{ButtonStyle, CreateActionRow, CreateButton};
    if page.page == 0 && !more {
        return Vec::new();
    }
    let to = |n: u32| HistoryPage {
        page: n,
        ..page.clone()
    };
    let (Ok(prev), Ok(next)) = (
        to(page.page.saturating_sub(1)).encode(),
        to(page.page.saturating_add(1)).encode(),
    ) else {
        return Vec::new();
    };
    vec![CreateActionRow::Buttons(vec![
        CreateButton::new(prev)
            .label("Previous")
            .style(ButtonStyle::Secondary)
            .disabled(page.page == 0),
        CreateButton::new(next)
            .label("Next")
            .style(ButtonStyle::Secondary)
            .disabled(!more),
    ])]
}

/// Commands whose answer everyone in the channel should see (and so whose deferral is public too).
fn is_public(name: &str) -> bool {
    matches!(name, "reply" | "cancel" | "cc")
}

/// The task a thread is named after: its name starts with the task's id.
fn task_in_name(name: &str) -> Option<&str> {
    name.split_whitespace()
        .next()
        .filter(|t| t.starts_with("t_"))
}

/// One line saying where the user's tasks go.
fn mode_line(m: &crate::backend::ModeInfo) -> String {
    let mut line = match (&m.pool, &m.worker) {
        (None, _) => "🖥️ Mode: **local**: your tasks run on your own agents.".to_string(),
        (Some(pool), None) => format!(
            "☁️ Mode: **cluster**, pool **{pool}**: a worker is chosen for you on your first task or project."
        ),
        (Some(pool), Some(worker)) => format!(
            "☁️ Mode: **cluster**, pool **{pool}**: your workspace is on worker **{worker}** ({}).",
            if m.worker_online { "online" } else { "offline" }
        ),
    };
    if let Some(note) = &m.note {
        line.push_str(&format!("\n⚠️ {note}"));
    }
    line
}

/// The member's role ids in the guild (none in a DM), for pools open to a role.
fn roles_of(c: &CommandInteraction) -> Vec<String> {
    c.member
        .as_ref()
        .map(|m| m.roles.iter().map(|r| r.to_string()).collect())
        .unwrap_or_default()
}

fn is_thread(c: &CommandInteraction) -> bool {
    c.channel.as_ref().is_some_and(|ch| {
        matches!(
            ch.kind,
            serenity::all::ChannelType::PublicThread
                | serenity::all::ChannelType::PrivateThread
                | serenity::all::ChannelType::NewsThread
        )
    })
}

/// Who is added to a task's private thread: its requester and the agent's owner. The approver is always one
/// of them (the owner, or a requester the owner trusts with their own approvals).
fn thread_people(task: &TaskInfo) -> Vec<UserId> {
    let mut people: Vec<UserId> = [&task.requester, &task.owner]
        .into_iter()
        .filter_map(|id| id.parse().ok())
        .collect();
    people.dedup();
    people
}
