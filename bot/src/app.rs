//! [`Bot`]: the running Discord front end — the backend, the REST client, the task threads and every task
//! the bot spawns — and its two entry points: gateway events ([`Bot::connect`]) and HTTP interactions
//! ([`Bot::handle_http`]).
//!
//! Every task the bot spawns (thread followers, interaction work that outlives an HTTP response, pairing
//! watches) is tracked and stopped by [`Bot::shutdown`]. Thread followers belong to the current term of
//! leadership ([`crate::leader`]): a bot started with [`Bot::connect`] leads for its whole life; one run
//! with [`Bot::lead`] leads while it holds the cluster's lease.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use http::HeaderMap;
use serde_json::{json, Value};
use serenity::all::{Context, EventHandler, Interaction, Message};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::backend::Backend;
use crate::commands;
use crate::config::{BotConfig, Delivery};
use crate::gateway::{self, GatewayHandle};
use crate::leader::{LeaseTimes, Term};
use crate::respond::Responder;
use crate::rest::Rest;
use crate::thread::{FollowerEnv, Threads};
use crate::verify::{pong, Incoming, InteractionVerifier};

/// How long the HTTP handler waits for the initial response: inside Discord's 3 seconds, so a late
/// answer becomes a 500 that Discord shows as "the application did not respond" rather than a timeout.
const HTTP_ANSWER_WAIT: Duration = Duration::from_millis(2800);

pub(crate) struct Inner {
    pub backend: Arc<dyn Backend>,
    pub rest: Rest,
    pub config: BotConfig,
    pub threads: Arc<Threads>,
    verifier: Option<InteractionVerifier>,
    tracker: TaskTracker,
    pub(crate) stop: CancellationToken,
    /// The term of leadership in force, if this node leads: its followers and when they must stop.
    pub(crate) term: std::sync::Mutex<Option<Arc<Term>>>,
    /// Wakes the leader's scan before its next tick (see [`Bot::scan_now`]). Wakings while a scan is due
    /// already fold into it.
    pub(crate) scan_now: tokio::sync::Notify,
}

/// The bot. Cheap to clone.
#[derive(Clone)]
pub struct Bot {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Bot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bot")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl Bot {
    /// A bot for `config` calling `backend`. Nothing runs until [`Bot::connect`] (gateway) or the first
    /// [`Bot::handle_http`] (HTTP interactions).
    pub fn new(config: BotConfig, backend: Arc<dyn Backend>) -> anyhow::Result<Self> {
        let verifier = match &config.delivery {
            Delivery::Http { public_key } => Some(
                InteractionVerifier::from_hex(public_key)
                    .map_err(|e| anyhow::anyhow!("DISCORD_PUBLIC_KEY: {e}"))?,
            ),
            Delivery::Gateway => None,
        };
        Ok(Self {
            inner: Arc::new(Inner {
                backend,
                rest: Rest::new(&config),
                config,
                threads: Arc::new(Threads::default()),
                verifier,
                tracker: TaskTracker::new(),
                stop: CancellationToken::new(),
                term: std::sync::Mutex::new(None),
                scan_now: tokio::sync::Notify::new(),
            }),
        })
    }

    /// Asks this node, if it leads, to look for marks it does not follow now rather than at its next scan:
    /// another node left a thread to open (its relay heard so from [`Backend::wake_leader`], on the cluster
    /// bus). A node that does not lead ignores it. Cheap and safe to call any number of times: calls before
    /// the scan runs fold into one, and a scan only reads the marks.
    pub fn scan_now(&self) {
        self.inner.scan_now.notify_one();
    }

    pub fn config(&self) -> &BotConfig {
        &self.inner.config
    }

    pub fn rest(&self) -> &Rest {
        &self.inner.rest
    }

    /// Runs the bot on its own, leading for its whole life with no lease (a relay runs [`Bot::lead`]
    /// instead). Resumes the followers a restart interrupted, then starts receiving interactions: in gateway
    /// mode connects (and registers the commands on READY);
    /// in HTTP mode registers the commands over REST when there is a token (interactions then arrive
    /// through [`Bot::handle_http`]), and returns `None`.
    pub async fn connect(&self) -> anyhow::Result<Option<GatewayHandle>> {
        self.inner.begin_term(None, LeaseTimes::default());
        // Threads that were following tasks when the relay stopped carry on (over REST: no gateway needed).
        self.inner.adopt_marks().await;
        match self.inner.config.delivery {
            Delivery::Gateway => {
                let handler = Handler { bot: self.clone() };
                let handle =
                    gateway::connect(&self.inner.config, self.inner.rest.clone(), handler).await?;
                Ok(Some(handle))
            }
            Delivery::Http { .. } => {
                info!("{}", self.inner.config.describe());
                if self.inner.config.token.is_some() {
                    commands::register(&self.inner.rest, self.inner.config.guild_id).await?;
                } else {
                    warn!("no DISCORD_TOKEN: commands are not registered and tasks cannot open threads");
                }
                Ok(None)
            }
        }
    }

    /// Stops every follower and piece of interaction work, and waits for them.
    pub async fn shutdown(&self) {
        // Followers first, cleanly, so each leaves its mark where it really got to.
        self.inner.end_term(LeaseTimes::default().grace).await;
        self.inner.stop.cancel();
        self.inner.tracker.close();
        self.inner.tracker.wait().await;
    }

    /// HTTP-interactions mode: one POST from Discord (headers and the raw body). Returns the status and
    /// JSON body to answer with: PONG for a PING, 401 for a bad signature, else the interaction's initial
    /// response (its work may continue afterwards, editing the response).
    pub async fn handle_http(&self, headers: &HeaderMap, body: &[u8]) -> (u16, Value) {
        let Some(verifier) = &self.inner.verifier else {
            return (
                404,
                json!({"message": "this relay's bot does not use HTTP interactions"}),
            );
        };
        match verifier.check(headers, body, SystemTime::now()) {
            Err(e) => (e.status(), json!({"message": e.to_string()})),
            Ok(Incoming::Ping) => (200, pong()),
            Ok(Incoming::Interaction(ix)) => {
                let (tx, rx) = oneshot::channel();
                let inner = self.inner.clone();
                self.spawn(async move { inner.interaction(*ix, Responder::Http(tx)).await });
                match tokio::time::timeout(HTTP_ANSWER_WAIT, rx).await {
                    Ok(Ok(body)) => (200, body),
                    _ => (
                        500,
                        json!({"message": "the interaction was not answered in time"}),
                    ),
                }
            }
        }
    }

    /// Runs `fut` as one of the bot's tracked tasks (stopped by [`Bot::shutdown`]).
    pub(crate) fn spawn(&self, fut: impl Future<Output = ()> + Send + 'static) {
        self.inner.spawn(fut);
    }
}

impl Inner {
    /// Runs `fut` as one of the bot's tracked tasks; it is dropped at shutdown.
    pub(crate) fn spawn(&self, fut: impl Future<Output = ()> + Send + 'static) {
        let stop = self.stop.clone();
        self.tracker.spawn(async move {
            tokio::select! {
                () = fut => {}
                () = stop.cancelled() => {}
            }
        });
    }

    pub(crate) fn follower_env(&self) -> FollowerEnv {
        FollowerEnv {
            backend: self.backend.clone(),
            rest: self.rest.clone(),
            threads: self.threads.clone(),
        }
    }
}

/// Gateway events into the bot.
pub(crate) struct Handler {
    pub(crate) bot: Bot,
}

#[async_trait]
impl EventHandler for Handler {
    async fn interaction_create(&self, _ctx: Context, interaction: Interaction) {
        let Some(id) = interaction_id(&interaction) else {
            return;
        };
        // Serenity runs each event in its own task; tracking the work as well lets shutdown wait for it.
        let inner = self.bot.inner.clone();
        self.bot
            .spawn(async move { inner.interaction(interaction, Responder::Rest { id }).await });
    }

    async fn message(&self, _ctx: Context, msg: Message) {
        if msg.author.bot || msg.content.trim().is_empty() {
            return;
        }
        let inner = self.bot.inner.clone();
        self.bot
            .spawn(async move { inner.thread_message(msg).await });
    }
}

fn interaction_id(i: &Interaction) -> Option<serenity::all::InteractionId> {
    Some(match i {
        Interaction::Command(c) | Interaction::Autocomplete(c) => c.id,
        Interaction::Component(c) => c.id,
        Interaction::Modal(m) => m.id,
        _ => return None,
    })
}
