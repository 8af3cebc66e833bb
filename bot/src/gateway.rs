//! Gateway mode: a serenity client for a [`BotConfig`], with the slash commands registered on READY.
//!
//! Before connecting, the application is looked up over REST: that checks the token with a clear error,
//! and gives [`Rest`] the application id before the first interaction can arrive (interaction webhooks and
//! command registration need it). With `DISCORD_API_PROXY`, serenity's REST goes to the proxy with its rate
//! limiter off (the only way serenity uses a proxy) and the gateway URL comes from the proxy's
//! `GET /gateway`; the bot's own calls go through [`Rest`], which honours rate limits itself.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context as _;
use async_trait::async_trait;
use serde_json::Value;
use serenity::all::{
    ApplicationId, ClientBuilder, Context, EventHandler, GatewayIntents, GuildId, HttpBuilder,
    Ready, ShardManager,
};
use tokio::task::JoinHandle;

use crate::commands;
use crate::config::{BotConfig, Delivery};
use crate::rest::{Rest, RestError};

/// A running gateway connection. [`GatewayHandle::shutdown`] closes it cleanly; dropping the handle stops
/// it too (without waiting).
#[derive(Debug)]
pub struct GatewayHandle {
    shard_manager: Arc<ShardManager>,
    task: Option<JoinHandle<Result<(), serenity::Error>>>,
}

impl GatewayHandle {
    /// Closes the shards and waits for the client to stop.
    pub async fn shutdown(mut self) {
        self.shard_manager.shutdown_all().await;
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }

    /// Waits for the client to stop by itself, which means it failed for good: a refused token, or
    /// disallowed intents (close code 4014: enable the message-content intent in the developer portal,
    /// or set `DISCORD_MESSAGE_CONTENT=0`).
    pub async fn wait(mut self) -> anyhow::Result<()> {
        let task = self.task.take().context("already stopped")?;
        task.await.context("gateway task panicked")??;
        Ok(())
    }
}

impl Drop for GatewayHandle {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Registers the commands on the first READY (a reconnect sends READY again; registering once is enough,
/// and a failure is retried on the next one).
struct Registrar {
    rest: Rest,
    guild: Option<GuildId>,
    done: AtomicBool,
}

#[async_trait]
impl EventHandler for Registrar {
    async fn ready(&self, _ctx: Context, ready: Ready) {
        tracing::info!(user = %ready.user.name, guilds = ready.guilds.len(), "connected to the Discord gateway");
        self.rest.set_application_id(ready.application.id);
        if self.done.swap(true, Ordering::SeqCst) {
            return;
        }
        if let Err(err) = commands::register(&self.rest, self.guild).await {
            tracing::error!(%err, "registering slash commands failed; will retry on the next READY");
            self.done.store(false, Ordering::SeqCst);
        }
    }
}

/// The intents the bot asks for: guilds (threads), guild messages (follow-ups in task threads), and
/// message content when allowed (privileged: without it, follow-ups go through `/reply`).
pub fn intents(config: &BotConfig) -> GatewayIntents {
    let base = GatewayIntents::GUILDS | GatewayIntents::GUILD_MESSAGES;
    if config.message_content {
        base | GatewayIntents::MESSAGE_CONTENT
    } else {
        base
    }
}

/// Connects to the gateway for `config` and starts dispatching events to `handler`. Returns once the
/// application is known and the client is started; READY (and command registration) follow.
pub async fn connect(
    config: &BotConfig,
    rest: Rest,
    handler: impl EventHandler + 'static,
) -> anyhow::Result<GatewayHandle> {
    anyhow::ensure!(
        config.delivery == Delivery::Gateway,
        "gateway::connect needs gateway delivery; this configuration uses HTTP interactions"
    );
    let token = config
        .token
        .as_ref()
        .context("gateway mode needs DISCORD_TOKEN")?;
    let app: Value = match rest
        .call(reqwest::Method::GET, "/oauth2/applications/@me", None, &[])
        .await
    {
        Err(RestError::Discord { status: 401, .. }) => {
            anyhow::bail!("Discord refused DISCORD_TOKEN (401): copy the bot token again from the developer portal")
        }
        other => other.context("looking up the Discord application")?,
    };
    let app_id: ApplicationId = app["id"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .context("Discord's application has no id")?;
    rest.set_application_id(app_id);

    let mut http = HttpBuilder::new(token.expose()).application_id(app_id);
    if let Some(proxy) = &config.api_proxy {
        http = http.proxy(proxy.as_str()).ratelimiter_disabled(true);
    }
    let mut client = ClientBuilder::new_with_http(http.build(), intents(config))
        .event_handler(Registrar {
            rest,
            guild: config.guild_id,
            done: AtomicBool::new(false),
        })
        .event_handler(handler)
        .await
        .context("building the Discord client")?;
    // Read before logging: an await inside the macro's arguments would hold its formatting state across
    // the await and make this future (and the relay's, which awaits it) not `Send`.
    let gateway_url = client.ws_url.lock().await.clone();
    tracing::info!(gateway = %gateway_url, "{}", config.describe());
    let shard_manager = client.shard_manager.clone();
    let task = tokio::spawn(async move { client.start().await });
    Ok(GatewayHandle {
        shard_manager,
        task: Some(task),
    })
}
