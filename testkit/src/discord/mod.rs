//! `DiscordSim`: a local stand-in for Discord that a bot (serenity 0.12.5 with `DISCORD_API_PROXY`) runs
//! against, so every Discord behaviour the bot relies on is tested offline.
//!
//! - [`rest`]: the REST API under `http://127.0.0.1:P/api/v10` — gateway discovery, the bot's user and
//!   application, commands, interaction callbacks and webhooks, channel messages (JSON and multipart),
//!   threads. Every call is recorded as a [`Call`]; limits are enforced with Discord-shaped 400s
//!   ([`limits`]); every reply carries `X-RateLimit-*` headers, a bucket overrun gets 429, and tests can
//!   script 429s ([`DiscordSim::rate_limit`]).
//! - [`gateway`]: `ws://127.0.0.1:Q` — HELLO, IDENTIFY → READY, heartbeat ACKs, and dispatches the test
//!   drives ([`DiscordSim::send_slash`], [`DiscordSim::send_button`], ...).
//! - [`sign`]: HTTP interactions mode — Discord's ed25519 signature over timestamp + body, and a POST helper.
//! - [`state`]: what tests read back: messages per channel as they stand after edits, threads, commands,
//!   interactions and how each was answered.
//!
//! Interactions behave like Discord's: the initial response must come within 3 s (then the callback
//! gets 404 "Unknown interaction"), only once (then 400 "already acknowledged"), and the webhook token works
//! for 15 minutes; both times can be shortened for tests.
//!
//! Every task the simulator spawns is owned by it: [`DiscordSim::shutdown`] (or dropping it) stops them.

pub mod gateway;
pub mod limits;
pub mod model;
pub mod rest;
pub mod sign;
pub mod state;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use gateway::GatewayEvent;
pub use limits::DiscordError;
pub use model::{
    Opt, OptValue, Origin, SimUpload, SimUser, SlashCommand, DEFAULT_ATTACHMENT_SIZE_LIMIT,
};
pub use sign::{HttpReply, InteractionSigner};
pub use state::{Call, FilePart, SimAttachment, SimChannel, SimInteraction, SimMessage};

use model::{interaction_json, InteractionBase, Snowflakes};
use state::{RateRule, State};

/// Knobs a test may turn while the simulator runs.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    /// How long after dispatch the initial response is accepted (Discord: 3 s).
    pub interaction_deadline: Duration,
    /// How long the interaction webhook token works (Discord: 15 min).
    pub token_ttl: Duration,
    /// Requests per bucket per window before a 429.
    pub bucket_limit: u32,
    pub bucket_window: Duration,
    /// Sent in HELLO.
    pub heartbeat_interval: Duration,
    /// Whether the app may ask for the privileged MESSAGE_CONTENT intent.
    pub message_content_allowed: bool,
    /// Sent in every interaction's `attachment_size_limit`.
    pub attachment_size_limit: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            interaction_deadline: Duration::from_secs(3),
            token_ttl: Duration::from_secs(15 * 60),
            // Generous, so tests that are not about rate limits never meet one; Discord's own per-route
            // limits are unpublished and read from headers.
            bucket_limit: 50,
            bucket_window: Duration::from_secs(1),
            heartbeat_interval: Duration::from_millis(41_250),
            message_content_allowed: true,
            attachment_size_limit: DEFAULT_ATTACHMENT_SIZE_LIMIT,
        }
    }
}

/// Fixed at start.
#[derive(Debug)]
pub(crate) struct Fixed {
    pub token: String,
    pub application_id: String,
    pub bot: SimUser,
    pub guild_id: String,
    pub channel_id: String,
    pub gateway_url: String,
}

#[derive(Debug)]
pub(crate) struct Shared {
    pub cfg: Fixed,
    state: Mutex<State>,
    pub ids: Snowflakes,
    /// Bumped after every change, so waiters re-check without polling.
    changed: watch::Sender<u64>,
    pub gateway: gateway::Hub,
    signer: InteractionSigner,
}

impl Shared {
    /// A poisoned lock means a handler panicked mid-call; the state is still what tests want to see.
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn bump(&self) {
        self.changed.send_modify(|n| *n += 1);
    }

    pub(crate) fn gateway_url(&self) -> &str {
        &self.cfg.gateway_url
    }

    pub(crate) fn application_json(&self) -> Value {
        json!({
            "id": self.cfg.application_id,
            "name": "CodeTogether (simulated)",
            "icon": null,
            "description": "",
            "bot_public": false,
            "bot_require_code_grant": false,
            "verify_key": self.signer.public_key_hex(),
            "flags": 0,
            "team": null,
            "owner": {"id": "1", "username": "owner", "discriminator": "0", "avatar": null},
            "bot": self.cfg.bot.json(),
        })
    }

    pub(crate) fn ready_json(&self, session: u64) -> Value {
        let mut user = self.cfg.bot.json();
        user["verified"] = json!(true);
        user["mfa_enabled"] = json!(false);
        user["flags"] = json!(0);
        json!({
            "v": 10,
            "user": user,
            "guilds": [{"id": self.cfg.guild_id, "unavailable": true}],
            "session_id": format!("simsession{session}"),
            "resume_gateway_url": self.cfg.gateway_url,
            "shard": [0, 1],
            "application": {"id": self.cfg.application_id, "flags": 0},
            "private_channels": [],
            "relationships": [],
            "presences": [],
            "guild_join_requests": [],
            "geo_ordered_rtc_regions": [],
        })
    }
}

/// An interaction the simulator sent: what the bot's callback and webhook calls refer to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InteractionRef {
    pub id: String,
    pub token: String,
}

/// An interaction built for HTTP delivery: registered with the simulator (so follow-ups work) but not
/// dispatched on the gateway.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub interaction: InteractionRef,
    pub json: Value,
}

/// The running simulator. Dropping it stops its servers.
#[derive(Debug)]
pub struct DiscordSim {
    shared: Arc<Shared>,
    rest_addr: SocketAddr,
    gateway_addr: SocketAddr,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl Drop for DiscordSim {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

impl DiscordSim {
    /// Binds REST and gateway on 127.0.0.1:0, with one guild holding one text channel (`#general`).
    pub async fn start() -> anyhow::Result<Self> {
        let rest = TcpListener::bind("127.0.0.1:0").await?;
        let gw = TcpListener::bind("127.0.0.1:0").await?;
        let (rest_addr, gateway_addr) = (rest.local_addr()?, gw.local_addr()?);
        let ids = Snowflakes::default();
        let bot = SimUser {
            id: ids.next(),
            name: "CodeTogether".into(),
            bot: true,
        };
        let cfg = Fixed {
            token: format!("SIM.{}.token", ids.next()),
            application_id: bot.id.clone(),
            bot,
            guild_id: ids.next(),
            channel_id: ids.next(),
            gateway_url: format!("ws://{gateway_addr}"),
        };
        let mut state = State::default();
        state.channels.insert(
            cfg.channel_id.clone(),
            SimChannel {
                id: cfg.channel_id.clone(),
                kind: 0,
                name: "general".into(),
                guild_id: cfg.guild_id.clone(),
                parent_id: None,
                owner_id: None,
            },
        );
        let shared = Arc::new(Shared {
            cfg,
            state: Mutex::new(state),
            ids,
            changed: watch::channel(0).0,
            gateway: gateway::Hub::default(),
            signer: InteractionSigner::generate(),
        });
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let app = rest::router(shared.clone());
        let stop = cancel.clone();
        tracker.spawn(async move {
            let serve = axum::serve(rest, app).with_graceful_shutdown(stop.cancelled_owned());
            if let Err(err) = serve.await {
                tracing::warn!(%err, "simulated Discord REST stopped");
            }
        });
        tracker.spawn(gateway::serve(
            shared.clone(),
            gw,
            cancel.clone(),
            tracker.clone(),
        ));
        tracing::debug!(%rest_addr, %gateway_addr, "Discord simulator started");
        Ok(Self {
            shared,
            rest_addr,
            gateway_addr,
            cancel,
            tracker,
        })
    }

    /// Stops both servers and waits for every connection task to end.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }

    /// What `DISCORD_API_PROXY` is set to: `http://127.0.0.1:P` (serenity appends `/api/v10/...`).
    pub fn api_base(&self) -> String {
        format!("http://{}", self.rest_addr)
    }

    /// The gateway URL that `GET /gateway` hands out.
    pub fn gateway_url(&self) -> String {
        format!("ws://{}", self.gateway_addr)
    }

    /// The bot token the simulator accepts (REST `Authorization: Bot ...` and IDENTIFY).
    pub fn token(&self) -> &str {
        &self.shared.cfg.token
    }

    pub fn application_id(&self) -> &str {
        &self.shared.cfg.application_id
    }

    pub fn bot_user(&self) -> &SimUser {
        &self.shared.cfg.bot
    }

    pub fn guild_id(&self) -> &str {
        &self.shared.cfg.guild_id
    }

    /// The guild's `#general` text channel.
    pub fn channel_id(&self) -> &str {
        &self.shared.cfg.channel_id
    }

    /// The application's interactions key pair (its public half is `verify_key` in `/applications/@me`).
    pub fn signer(&self) -> &InteractionSigner {
        &self.shared.signer
    }

    /// Adds a text channel to the guild; returns its id.
    pub fn add_channel(&self, name: &str) -> String {
        let id = self.shared.ids.next();
        self.shared.lock().channels.insert(
            id.clone(),
            SimChannel {
                id: id.clone(),
                kind: 0,
                name: name.into(),
                guild_id: self.shared.cfg.guild_id.clone(),
                parent_id: None,
                owner_id: None,
            },
        );
        id
    }

    /// A guild member called `name`; the same name gives the same user.
    pub fn user(&self, name: &str) -> SimUser {
        let mut st = self.shared.lock();
        st.users
            .entry(name.to_string())
            .or_insert_with(|| SimUser {
                id: self.shared.ids.next(),
                name: name.into(),
                bot: false,
            })
            .clone()
    }

    /// `user` acting in `#general`.
    pub fn origin(&self, user: &SimUser) -> Origin {
        self.origin_in(user, self.channel_id())
    }

    /// `user` acting in `channel` (a channel or thread id).
    pub fn origin_in(&self, user: &SimUser, channel: &str) -> Origin {
        Origin {
            user: user.clone(),
            guild_id: self.guild_id().to_string(),
            channel_id: channel.to_string(),
        }
    }

    // ---- settings ----

    /// Shortens (or lengthens) the 3-second window for the initial response.
    pub fn set_interaction_deadline(&self, d: Duration) {
        self.shared.lock().settings.interaction_deadline = d;
    }

    /// Shortens the 15-minute life of interaction webhook tokens.
    pub fn set_token_ttl(&self, d: Duration) {
        self.shared.lock().settings.token_ttl = d;
    }

    /// Each bucket allows `limit` calls per `window`; beyond that the simulator answers 429.
    pub fn set_bucket_limit(&self, limit: u32, window: Duration) {
        let mut st = self.shared.lock();
        st.settings.bucket_limit = limit;
        st.settings.bucket_window = window;
        st.buckets.clear();
    }

    /// The heartbeat interval HELLO announces to connections made from now on.
    pub fn set_heartbeat_interval(&self, d: Duration) {
        self.shared.lock().settings.heartbeat_interval = d;
    }

    /// Whether IDENTIFY may ask for MESSAGE_CONTENT; when not, it is closed with 4014.
    pub fn allow_message_content(&self, allowed: bool) {
        self.shared.lock().settings.message_content_allowed = allowed;
    }

    /// The `attachment_size_limit` put into interactions from now on.
    pub fn set_attachment_size_limit(&self, bytes: u64) {
        self.shared.lock().settings.attachment_size_limit = bytes;
    }

    /// The next `times` calls of `method` on paths matching `pattern` (`*` = one segment, relative to
    /// `/api/v10`) are answered 429 with `retry_after`, in the body and in `Retry-After`.
    pub fn rate_limit(&self, method: &str, pattern: &str, times: u32, retry_after: Duration) {
        self.push_rule(method, pattern, times, retry_after, false);
    }

    /// Like [`Self::rate_limit`], but a global limit (`"global": true`, `X-RateLimit-Global`).
    pub fn rate_limit_global(
        &self,
        method: &str,
        pattern: &str,
        times: u32,
        retry_after: Duration,
    ) {
        self.push_rule(method, pattern, times, retry_after, true);
    }

    fn push_rule(
        &self,
        method: &str,
        pattern: &str,
        times: u32,
        retry_after: Duration,
        global: bool,
    ) {
        self.shared.lock().rate_rules.push(RateRule {
            method: method.into(),
            pattern: pattern.into(),
            times,
            retry_after,
            global,
        });
    }

    // ---- observation ----

    /// Every REST call so far, in arrival order.
    pub fn calls(&self) -> Vec<Call> {
        self.shared.lock().calls.clone()
    }

    /// Calls of `method` on paths matching `pattern` (see [`Call::is`]).
    pub fn calls_to(&self, method: &str, pattern: &str) -> Vec<Call> {
        self.shared
            .lock()
            .calls
            .iter()
            .filter(|c| c.is(method, pattern))
            .cloned()
            .collect()
    }

    /// The current messages of a channel or thread, oldest first.
    pub fn messages(&self, channel: &str) -> Vec<SimMessage> {
        self.shared
            .lock()
            .messages
            .get(channel)
            .cloned()
            .unwrap_or_default()
    }

    /// A message by id, wherever it is.
    pub fn message(&self, id: &str) -> Option<SimMessage> {
        self.shared.lock().find_message(id).cloned()
    }

    pub fn channel(&self, id: &str) -> Option<SimChannel> {
        self.shared.lock().channels.get(id).cloned()
    }

    /// All threads, oldest first.
    pub fn threads(&self) -> Vec<SimChannel> {
        let st = self.shared.lock();
        let mut t: Vec<_> = st
            .channels
            .values()
            .filter(|c| c.is_thread())
            .cloned()
            .collect();
        t.sort_by_key(|c| c.id.parse::<u64>().unwrap_or(0));
        t
    }

    /// Registered commands: of `guild`, or global with `None`.
    pub fn commands(&self, guild: Option<&str>) -> Vec<Value> {
        let st = self.shared.lock();
        match guild {
            Some(g) => st.guild_commands.get(g).cloned().unwrap_or_default(),
            None => st.global_commands.clone(),
        }
    }

    /// A dispatched interaction and how it was answered.
    pub fn interaction(&self, id: &str) -> Option<SimInteraction> {
        self.shared.lock().interactions.get(id).cloned()
    }

    /// What the bot sent on the gateway (IDENTIFY, heartbeats, ...).
    pub fn gateway_events(&self) -> Vec<GatewayEvent> {
        self.shared.gateway.received()
    }

    /// Waits until `check` returns `Some`, re-checking after every call or gateway event.
    pub async fn wait_until<T>(
        &self,
        timeout: Duration,
        mut check: impl FnMut(&Self) -> Option<T>,
    ) -> anyhow::Result<T> {
        let mut rx = self.shared.changed.subscribe();
        let waited = tokio::time::timeout(timeout, async {
            loop {
                rx.borrow_and_update();
                if let Some(t) = check(self) {
                    return t;
                }
                // The sender lives in `self.shared`, so this only fails if the simulator is gone.
                if rx.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        })
        .await;
        waited.map_err(|_| {
            let recent: Vec<String> = self
                .calls()
                .iter()
                .rev()
                .take(10)
                .map(|c| format!("{} {} -> {}", c.method, c.path, c.status))
                .collect();
            anyhow::anyhow!("timed out after {timeout:?}; latest calls (newest first): {recent:#?}")
        })
    }

    /// Waits for the first call (already made or still to come) that satisfies `pred`.
    pub async fn wait_for(
        &self,
        pred: impl Fn(&Call) -> bool,
        timeout: Duration,
    ) -> anyhow::Result<Call> {
        self.wait_until(timeout, |s| {
            s.shared.lock().calls.iter().find(|c| pred(c)).cloned()
        })
        .await
    }

    /// Waits for the initial-response callback of `ix`.
    pub async fn wait_callback(
        &self,
        ix: &InteractionRef,
        timeout: Duration,
    ) -> anyhow::Result<Call> {
        let path = format!("/interactions/{}/{}/callback", ix.id, ix.token);
        self.wait_for(|c| c.method == "POST" && c.path == path, timeout)
            .await
    }

    /// Waits until a gateway session has identified (READY sent).
    pub async fn wait_identified(&self, timeout: Duration) -> anyhow::Result<()> {
        self.wait_until(timeout, |s| {
            (s.shared.gateway.identified() > 0).then_some(())
        })
        .await
        .context("no gateway session identified")
    }

    /// Gateway sessions identified (READY sent) and still connected now: one bot should have one.
    pub fn gateway_sessions(&self) -> usize {
        self.shared.gateway.identified()
    }

    // ---- driving ----

    /// Sends a dispatch (op 0) to every identified gateway session.
    pub fn dispatch(&self, event: &str, data: &Value) -> anyhow::Result<()> {
        if self.shared.gateway.dispatch(event, data) == 0 {
            bail!("no identified gateway session to send {event} to");
        }
        Ok(())
    }

    /// Closes every gateway connection with `code` (4000 makes a client reconnect and identify again).
    pub fn disconnect_gateway(&self, code: u16) {
        self.shared.gateway.close_all(code, "closed by the test");
    }

    fn register(
        &self,
        origin: &Origin,
        kind: u8,
        data: Option<Value>,
        message_id: Option<String>,
        extra: Option<(&str, Value)>,
    ) -> anyhow::Result<Prepared> {
        let mut st = self.shared.lock();
        let channel = st
            .channels
            .get(&origin.channel_id)
            .with_context(|| format!("the simulator has no channel {}", origin.channel_id))?
            .partial_json();
        let id = self.shared.ids.next();
        let token = format!("aW50ZXJhY3Rpb246{id}:{}", self.shared.ids.next());
        let base = InteractionBase {
            id: &id,
            application_id: &self.shared.cfg.application_id,
            token: &token,
            origin,
            channel,
            attachment_size_limit: st.settings.attachment_size_limit,
        };
        let mut json = interaction_json(&base, kind, data);
        if let Some((k, v)) = extra {
            json[k] = v;
        }
        st.interactions.insert(
            id.clone(),
            SimInteraction {
                id: id.clone(),
                token: token.clone(),
                kind,
                origin: origin.clone(),
                dispatched_at: Instant::now(),
                response_type: None,
                original_message: None,
                message_id,
                followups: Vec::new(),
            },
        );
        Ok(Prepared {
            interaction: InteractionRef { id, token },
            json,
        })
    }

    fn send(&self, p: anyhow::Result<Prepared>) -> anyhow::Result<InteractionRef> {
        let p = p?;
        // Count the 3 s from the moment it goes out, not from when it was built.
        if let Some(ix) = self.shared.lock().interactions.get_mut(&p.interaction.id) {
            ix.dispatched_at = Instant::now();
        }
        self.dispatch("INTERACTION_CREATE", &p.json)?;
        Ok(p.interaction)
    }

    fn command_data(&self, origin: &Origin, cmd: &SlashCommand) -> Value {
        let id = self
            .shared
            .lock()
            .command_id(&origin.guild_id, &cmd.name)
            .unwrap_or_else(|| self.shared.ids.next());
        cmd.data_json(&id, &origin.guild_id)
    }

    /// Builds a slash-command interaction without dispatching it (for HTTP interactions mode).
    pub fn prepare_slash(&self, origin: &Origin, cmd: &SlashCommand) -> anyhow::Result<Prepared> {
        let data = self.command_data(origin, cmd);
        self.register(origin, 2, Some(data), None, None)
    }

    /// A PING, as Discord sends to check an interactions endpoint URL.
    pub fn ping_json(&self) -> Value {
        json!({
            "id": self.shared.ids.next(),
            "application_id": self.shared.cfg.application_id,
            "type": 1,
            "token": format!("ping{}", self.shared.ids.next()),
            "version": 1,
            "entitlements": [],
            "attachment_size_limit": DEFAULT_ATTACHMENT_SIZE_LIMIT,
            "locale": "en-US",
        })
    }

    /// Signs `json` with the application key and POSTs it to `url`; if the reply is an initial response,
    /// records it as the interaction's callback, as Discord would.
    pub async fn post_interaction(
        &self,
        url: &str,
        prepared: &Prepared,
    ) -> anyhow::Result<HttpReply> {
        let body = serde_json::to_vec(&prepared.json)?;
        if let Some(ix) = self
            .shared
            .lock()
            .interactions
            .get_mut(&prepared.interaction.id)
        {
            ix.dispatched_at = Instant::now();
        }
        let reply = self.shared.signer.post(url, &body).await?;
        if reply.status == 200 {
            if let Ok(v) = reply.json() {
                let id = &prepared.interaction.id;
                if let Err(refused) = rest::http_reply(&self.shared, id, &v) {
                    // Discord would drop such a reply; kept as the response so tests can see what came.
                    tracing::warn!(?refused, "the interaction's HTTP reply would be refused");
                    let kind = v["type"].as_u64().map(|t| t as u8);
                    if let Some(ix) = self.shared.lock().interactions.get_mut(id) {
                        ix.response_type = kind;
                    }
                }
                self.shared.bump();
            }
        }
        Ok(reply)
    }

    /// `/name ...` used by `origin`; returns the interaction so the test can wait for its callback.
    pub fn send_slash(
        &self,
        origin: &Origin,
        cmd: &SlashCommand,
    ) -> anyhow::Result<InteractionRef> {
        self.send(self.prepare_slash(origin, cmd))
    }

    /// An autocomplete request while `origin` types `cmd`; mark the option being typed with
    /// [`Opt::focused`].
    pub fn send_autocomplete(
        &self,
        origin: &Origin,
        cmd: &SlashCommand,
    ) -> anyhow::Result<InteractionRef> {
        self.send(self.prepare_autocomplete(origin, cmd))
    }

    /// Builds an autocomplete interaction without dispatching it.
    pub fn prepare_autocomplete(
        &self,
        origin: &Origin,
        cmd: &SlashCommand,
    ) -> anyhow::Result<Prepared> {
        let data = self.command_data(origin, cmd);
        self.register(origin, 4, Some(data), None, None)
    }

    /// A click on the button `custom_id` of message `message_id`. Fails if the message has no such button
    /// or it is disabled: Discord would not let anyone click it.
    pub fn send_button(
        &self,
        origin: &Origin,
        message_id: &str,
        custom_id: &str,
    ) -> anyhow::Result<InteractionRef> {
        self.send(self.prepare_component(origin, message_id, custom_id, None))
    }

    /// A choice in the select menu `custom_id` of message `message_id`.
    pub fn send_select(
        &self,
        origin: &Origin,
        message_id: &str,
        custom_id: &str,
        values: &[&str],
    ) -> anyhow::Result<InteractionRef> {
        self.send(self.prepare_component(origin, message_id, custom_id, Some(values)))
    }

    /// Builds a component interaction without dispatching it: a button click when `values` is `None`,
    /// else a choice in a select menu.
    pub fn prepare_component(
        &self,
        origin: &Origin,
        message_id: &str,
        custom_id: &str,
        values: Option<&[&str]>,
    ) -> anyhow::Result<Prepared> {
        let component_type: u8 = if values.is_some() { 3 } else { 2 };
        let msg = self
            .message(message_id)
            .with_context(|| format!("no message {message_id}"))?;
        let component = msg
            .components
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|row| row["components"].as_array().cloned().unwrap_or_default())
            .find(|c| c["custom_id"] == custom_id)
            .with_context(|| {
                format!(
                    "message {message_id} has no component {custom_id:?}; it has {:?}",
                    msg.custom_ids()
                )
            })?;
        if component["disabled"].as_bool() == Some(true) {
            bail!("component {custom_id:?} on message {message_id} is disabled");
        }
        if component["type"].as_u64() != Some(u64::from(component_type)) {
            bail!(
                "component {custom_id:?} is of type {}, not {component_type}",
                component["type"]
            );
        }
        let mut data = json!({"custom_id": custom_id, "component_type": component_type});
        if let Some(v) = values {
            data["values"] = json!(v);
        }
        let message = msg.json(self.guild_id());
        self.register(
            origin,
            3,
            Some(data),
            Some(message_id.to_string()),
            Some(("message", message)),
        )
    }

    /// A submitted modal `custom_id` with `(text input custom_id, value)` pairs.
    pub fn send_modal_submit(
        &self,
        origin: &Origin,
        custom_id: &str,
        fields: &[(&str, &str)],
    ) -> anyhow::Result<InteractionRef> {
        self.send(self.prepare_modal_submit(origin, custom_id, fields))
    }

    /// Builds a modal submit without dispatching it.
    pub fn prepare_modal_submit(
        &self,
        origin: &Origin,
        custom_id: &str,
        fields: &[(&str, &str)],
    ) -> anyhow::Result<Prepared> {
        let data = model::modal_data_json(custom_id, fields);
        self.register(origin, 5, Some(data), None, None)
    }

    /// A file a user attaches: its bytes are served by the simulator's CDN (below [`api_base`](Self::api_base),
    /// at the path of its `https://cdn.discordapp.com/...` URL); give it to [`Opt::attachment`] or
    /// [`send_message_with_files`](Self::send_message_with_files).
    pub fn upload(&self, filename: &str, content_type: Option<&str>, bytes: Vec<u8>) -> SimUpload {
        let size = bytes.len() as u64;
        self.upload_claiming(filename, content_type, bytes, size)
    }

    /// [`upload`](Self::upload) whose reported size is `size`, whatever its bytes (a huge file without the
    /// memory, or a server that lies).
    pub fn upload_claiming(
        &self,
        filename: &str,
        content_type: Option<&str>,
        bytes: Vec<u8>,
        size: u64,
    ) -> SimUpload {
        let id = self.shared.ids.next();
        // As Discord does, the URL gets a tame version of the name; the name itself is kept as given.
        let tame: String = filename
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let url = format!(
            "https://cdn.discordapp.com/attachments/{}/{id}/{tame}?ex=0&is=0&hm=0",
            self.channel_id()
        );
        self.shared.lock().uploads.insert(id.clone(), bytes);
        SimUpload {
            id,
            filename: filename.into(),
            size,
            content_type: content_type.map(str::to_string),
            url,
        }
    }

    /// Calls to the simulator's CDN (attachment downloads), as `GET /attachments/...` in the call log.
    pub fn downloads(&self) -> Vec<Call> {
        self.calls_to("GET", "/attachments/*/*/*")
    }

    /// A message `origin.user` writes in `origin.channel_id` (a thread, usually): stored, then dispatched as
    /// MESSAGE_CREATE. Returns the message id.
    pub fn send_message(&self, origin: &Origin, content: &str) -> anyhow::Result<String> {
        self.send_message_with_files(origin, content, &[])
    }

    /// [`send_message`](Self::send_message) with attached files.
    pub fn send_message_with_files(
        &self,
        origin: &Origin,
        content: &str,
        files: &[SimUpload],
    ) -> anyhow::Result<String> {
        let msg = SimMessage {
            id: self.shared.ids.next(),
            channel_id: origin.channel_id.clone(),
            author: origin.user.clone(),
            content: content.into(),
            embeds: json!([]),
            components: json!([]),
            attachments: files
                .iter()
                .map(|f| SimAttachment {
                    id: f.id.clone(),
                    filename: f.filename.clone(),
                    size: f.size as usize,
                })
                .collect(),
            flags: 0,
            edits: 0,
            interaction_id: None,
            webhook_id: None,
            timestamp: model::timestamp_now(),
            edited_timestamp: None,
            thread_id: None,
            nonce: None,
            pinned: false,
        };
        let mut json = msg.json(&origin.guild_id);
        json["attachments"] = files.iter().map(SimUpload::json).collect();
        json["guild_id"] = json!(origin.guild_id);
        json["member"] = origin.user.member_json(false);
        {
            let mut st = self.shared.lock();
            if !st.channels.contains_key(&origin.channel_id) {
                bail!("the simulator has no channel {}", origin.channel_id);
            }
            st.messages
                .entry(origin.channel_id.clone())
                .or_default()
                .push(msg.clone());
        }
        self.dispatch("MESSAGE_CREATE", &json)?;
        Ok(msg.id)
    }
}
