//! [`Rest`]: the bot's Discord REST client.
//!
//! Why not serenity's `Http`: with `DISCORD_API_PROXY` set, serenity must run with its rate limiter
//! disabled (the proxy replaces the base URL only on that path), and then a 429 comes back as an error whose
//! body serenity cannot even decode (Discord's 429 body has no `code`), so `retry_after` is lost. This client
//! reads the response itself: it waits out `X-RateLimit-Remaining: 0` before the next call on the same route,
//! and on a 429 sleeps `retry_after` (body, else `Retry-After`) and tries again, never bursting. Bodies are
//! serenity's builders serialized as JSON; answers are serenity's model types.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use reqwest::Method;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};
use serenity::all::{
    ApplicationId, Channel, ChannelId, Command, CreateCommand, CreateInteractionResponse,
    CreateInteractionResponseFollowup, CreateMessage, EditInteractionResponse, EditMessage,
    GuildChannel, GuildId, InteractionId, Message, MessageId, UserId,
};
use tokio::time::Instant;

use crate::config::{BotConfig, Secret};

/// How long one call may spend waiting on rate limits before it gives up.
const DEFAULT_MAX_WAIT: Duration = Duration::from_secs(15);
/// An interaction's initial response is useless after 3 s; never wait past this for one.
const CALLBACK_MAX_WAIT: Duration = Duration::from_millis(2500);
/// 429s tolerated in one call; more means something is wrong with our pacing or the proxy.
const MAX_429S: u32 = 5;
/// Discord's limit on thread names.
const THREAD_NAME_MAX: usize = 100;

/// A file to upload with a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upload {
    pub filename: String,
    pub data: Vec<u8>,
}

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum RestError {
    /// Discord answered with an error (its JSON error body is in `body`).
    #[error("Discord refused {method} {path}: {status} {message} (code {code})")]
    Discord {
        method: Method,
        path: String,
        status: u16,
        code: u64,
        message: String,
        body: Value,
    },
    /// Waiting out the rate limit would take longer than this call may wait.
    #[error("{method} {path} is rate limited for {retry_after:?}, longer than the call may wait")]
    RateLimited {
        method: Method,
        path: String,
        retry_after: Duration,
    },
    #[error("{method} {path}: {source}")]
    Transport {
        method: Method,
        path: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("reading Discord's answer to {method} {path}: {source}")]
    Decode {
        method: Method,
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("encoding the body of {method} {path}: {source}")]
    Encode {
        method: Method,
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "the application id is not known yet (it comes with READY, or from DISCORD_APPLICATION_ID)"
    )]
    NoApplicationId,
    #[error("{0} needs a bot token (DISCORD_TOKEN)")]
    NoToken(String),
}

impl RestError {
    /// Discord's JSON error code, when Discord answered with one (10062 unknown interaction, ...).
    pub fn code(&self) -> Option<u64> {
        match self {
            Self::Discord { code, .. } => Some(*code),
            _ => None,
        }
    }
}

struct Inner {
    client: reqwest::Client,
    /// `https://discord.com/api/v10`, or the proxy's equivalent.
    base: String,
    token: Option<Secret>,
    application_id: RwLock<Option<ApplicationId>>,
    /// Per route: the bucket's state, locked for the whole of each call on the route (see [`Bucket`]).
    buckets: Mutex<HashMap<String, Bucket>>,
    /// Every call waits until this instant (a global 429).
    global: Mutex<Option<Instant>>,
}

/// One route's rate-limit state: until when its calls must wait (the bucket is empty, or a 429 said so).
///
/// Calls on one route go one at a time: each holds the lock from before it is sent until its answer's
/// headers are read. Otherwise calls in flight together all see the last answer's `X-RateLimit-Remaining`
/// (say 1) and all go, and all but one get 429. This is how discord.js and serenity queue per bucket. Routes
/// that differ (another channel, another interaction) do not wait for each other.
type Bucket = Arc<tokio::sync::Mutex<Option<Instant>>>;

/// Buckets kept before idle ones are forgotten (one per channel, thread, interaction and webhook used).
const BUCKETS_KEPT: usize = 1024;

/// The REST client; cheap to clone (shared state, one connection pool).
#[derive(Clone)]
pub struct Rest {
    inner: Arc<Inner>,
    max_wait: Duration,
}

impl std::fmt::Debug for Rest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rest")
            .field("base", &self.inner.base)
            .field("token", &self.inner.token)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Calls on the same route share a bucket: the path with message ids folded, keeping the "major"
/// parameters (channel, guild, webhook) Discord keys its buckets by.
fn bucket_key(method: &Method, path: &str) -> String {
    let mut out = Vec::new();
    let mut prev = "";
    for seg in path.trim_matches('/').split('/') {
        out.push(if prev == "messages" && seg != "@original" {
            ":id"
        } else {
            seg
        });
        prev = seg;
    }
    format!("{method} /{}", out.join("/"))
}

fn header_secs(headers: &reqwest::header::HeaderMap, name: &str) -> Option<Duration> {
    let v: f64 = headers.get(name)?.to_str().ok()?.trim().parse().ok()?;
    (v.is_finite() && v >= 0.0).then(|| Duration::from_secs_f64(v))
}

impl Rest {
    /// A client for `config` (token, proxy, and the application id when it is configured).
    pub fn new(config: &BotConfig) -> Self {
        Self::with_base(config.api_base(), config.token.clone(), DEFAULT_MAX_WAIT)
            .with_application_id(config.application_id)
    }

    /// A client for the API under `base` (`https://discord.com` or a proxy).
    pub fn with_base(base: &str, token: Option<Secret>, max_wait: Duration) -> Self {
        let client = reqwest::Client::builder()
            .user_agent(concat!(
                "DiscordBot (https://github.com/codetogether/codetogether, ",
                env!("CARGO_PKG_VERSION"),
                ")"
            ))
            .timeout(Duration::from_secs(30))
            .build()
            .expect("reqwest client with rustls builds");
        Self {
            inner: Arc::new(Inner {
                client,
                base: format!("{}/api/v10", base.trim_end_matches('/')),
                token,
                application_id: RwLock::new(None),
                buckets: Mutex::new(HashMap::new()),
                global: Mutex::new(None),
            }),
            max_wait,
        }
    }

    /// The same client (same rate-limit state) with another bound on how long one call may wait.
    pub fn with_max_wait(&self, max_wait: Duration) -> Self {
        Self {
            inner: self.inner.clone(),
            max_wait,
        }
    }

    fn with_application_id(self, id: Option<ApplicationId>) -> Self {
        if let Some(id) = id {
            self.set_application_id(id);
        }
        self
    }

    /// Records the application id (READY brings it in gateway mode).
    pub fn set_application_id(&self, id: ApplicationId) {
        *self
            .inner
            .application_id
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Some(id);
    }

    pub fn application_id(&self) -> Result<ApplicationId, RestError> {
        self.inner
            .application_id
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .ok_or(RestError::NoApplicationId)
    }

    /// One call: `body` as JSON (or, with `files`, as multipart `payload_json` plus `files[n]`), waiting out
    /// rate limits up to the client's `max_wait`. Decodes the answer as `T` (`()` for 204).
    pub async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        files: &[Upload],
    ) -> Result<T, RestError> {
        self.call_within(method, path, body, files, self.max_wait)
            .await
    }

    async fn call_within<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        files: &[Upload],
        max_wait: Duration,
    ) -> Result<T, RestError> {
        let key = bucket_key(&method, path);
        let url = format!("{}{path}", self.inner.base);
        // Interaction callbacks and webhooks are authorised by their token; everything else by ours.
        let open = path.starts_with("/interactions/") || path.starts_with("/webhooks/");
        if !open && self.inner.token.is_none() {
            return Err(RestError::NoToken(format!("{method} {path}")));
        }
        let started = Instant::now();
        let bucket = self.bucket(&key);
        let Ok(mut bucket) = tokio::time::timeout(max_wait, bucket.lock_owned()).await else {
            return Err(RestError::RateLimited {
                method,
                path: path.to_string(),
                retry_after: Duration::ZERO,
            });
        };
        let mut limited = 0;
        loop {
            // Wait for an empty bucket or a global limit to reset, if that is within our budget.
            let until = {
                let global = *lock(&self.inner.global);
                global.into_iter().chain(*bucket).max()
            };
            if let Some(until) = until {
                let now = Instant::now();
                if until > now {
                    if until.duration_since(started) > max_wait {
                        return Err(RestError::RateLimited {
                            method,
                            path: path.to_string(),
                            retry_after: until - now,
                        });
                    }
                    tracing::debug!(route = %key, wait_ms = (until - now).as_millis() as u64, "waiting for rate limit");
                    tokio::time::sleep_until(until).await;
                }
            }

            let mut req = self.inner.client.request(method.clone(), &url);
            if let Some(token) = &self.inner.token {
                req = req.header("authorization", format!("Bot {}", token.expose()));
            }
            req = match (body, files.is_empty()) {
                (_, false) => req.multipart(multipart(body, files)),
                (Some(b), true) => req.json(b),
                (None, true) => req,
            };
            let resp = req.send().await.map_err(|source| RestError::Transport {
                method: method.clone(),
                path: path.to_string(),
                source,
            })?;
            let status = resp.status().as_u16();
            let headers = resp.headers().clone();
            let bytes = resp.bytes().await.map_err(|source| RestError::Transport {
                method: method.clone(),
                path: path.to_string(),
                source,
            })?;
            let now = Instant::now();
            if headers
                .get("x-ratelimit-remaining")
                .is_some_and(|v| v.as_bytes() == b"0")
            {
                if let Some(after) = header_secs(&headers, "x-ratelimit-reset-after") {
                    *bucket = Some(now + after);
                }
            }

            if status == 429 {
                let parsed: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                let retry_after = parsed["retry_after"]
                    .as_f64()
                    .filter(|s| s.is_finite() && *s >= 0.0)
                    .map(Duration::from_secs_f64)
                    .or_else(|| header_secs(&headers, "retry-after"))
                    .unwrap_or(Duration::from_secs(1));
                let global = parsed["global"].as_bool() == Some(true)
                    || headers.get("x-ratelimit-global").is_some();
                tracing::warn!(route = %key, ?retry_after, global, "Discord answered 429");
                if global {
                    *lock(&self.inner.global) = Some(now + retry_after);
                } else {
                    *bucket = Some(now + retry_after);
                }
                limited += 1;
                if limited > MAX_429S || (now + retry_after).duration_since(started) > max_wait {
                    return Err(RestError::RateLimited {
                        method,
                        path: path.to_string(),
                        retry_after,
                    });
                }
                continue;
            }

            if !(200..300).contains(&status) {
                let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                return Err(RestError::Discord {
                    method,
                    path: path.to_string(),
                    status,
                    code: body["code"].as_u64().unwrap_or(0),
                    message: body["message"].as_str().unwrap_or("").to_string(),
                    body,
                });
            }
            let decoded = if bytes.is_empty() {
                serde_json::from_value(Value::Null)
            } else {
                serde_json::from_slice(&bytes)
            };
            return decoded.map_err(|source| RestError::Decode {
                method,
                path: path.to_string(),
                source,
            });
        }
    }

    /// The bucket of route `key`, made on first use. Forgets idle buckets (no call holds or waits for one)
    /// once more than [`BUCKETS_KEPT`] are kept; an empty one is kept until it has reset.
    fn bucket(&self, key: &str) -> Bucket {
        let mut buckets = lock(&self.inner.buckets);
        if let Some(b) = buckets.get(key) {
            return b.clone();
        }
        if buckets.len() >= BUCKETS_KEPT {
            let now = Instant::now();
            buckets.retain(|_, b| {
                Arc::strong_count(b) > 1
                    || b.try_lock()
                        .map_or(true, |until| until.is_some_and(|t| t > now))
            });
        }
        buckets.entry(key.to_string()).or_default().clone()
    }

    async fn send<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: &impl Serialize,
        files: &[Upload],
    ) -> Result<T, RestError> {
        let mut body = serde_json::to_value(body).map_err(|source| RestError::Encode {
            method: method.clone(),
            path: path.to_string(),
            source,
        })?;
        if crate::mentions::carries_message(path) {
            crate::mentions::quiet_message(&mut body);
        }
        self.call(method, path, Some(&body), files).await
    }

    /// Replaces the application's commands in `guild`, or globally with `None` (bulk overwrite).
    pub async fn register_commands(
        &self,
        guild: Option<GuildId>,
        commands: &[CreateCommand],
    ) -> Result<Vec<Command>, RestError> {
        let app = self.application_id()?;
        let path = match guild {
            Some(g) => format!("/applications/{app}/guilds/{g}/commands"),
            None => format!("/applications/{app}/commands"),
        };
        self.send(Method::PUT, &path, &commands, &[]).await
    }

    /// The initial response to an interaction. Gives up rather than wait past the 3-second deadline.
    pub async fn respond(
        &self,
        id: InteractionId,
        token: &str,
        response: &CreateInteractionResponse,
        files: &[Upload],
    ) -> Result<(), RestError> {
        let path = format!("/interactions/{id}/{token}/callback");
        let mut body = serde_json::to_value(response).map_err(|source| RestError::Encode {
            method: Method::POST,
            path: path.clone(),
            source,
        })?;
        crate::mentions::quiet_response(&mut body);
        // With files, `data` is what carries the attachment list.
        self.call_within(Method::POST, &path, Some(&body), files, CALLBACK_MAX_WAIT)
            .await
    }

    /// Edits the interaction's original response (works for 15 minutes after the interaction).
    pub async fn edit_original(
        &self,
        token: &str,
        edit: &EditInteractionResponse,
        files: &[Upload],
    ) -> Result<Message, RestError> {
        let app = self.application_id()?;
        let path = format!("/webhooks/{app}/{token}/messages/@original");
        self.send(Method::PATCH, &path, edit, files).await
    }

    /// A follow-up message to an interaction.
    pub async fn followup(
        &self,
        token: &str,
        message: &CreateInteractionResponseFollowup,
        files: &[Upload],
    ) -> Result<Message, RestError> {
        let app = self.application_id()?;
        self.send(
            Method::POST,
            &format!("/webhooks/{app}/{token}"),
            message,
            files,
        )
        .await
    }

    /// A message in a channel or thread (what a task keeps using after its interaction token expires).
    pub async fn send_message(
        &self,
        channel: ChannelId,
        message: &CreateMessage,
        files: &[Upload],
    ) -> Result<Message, RestError> {
        self.send(
            Method::POST,
            &format!("/channels/{channel}/messages"),
            message,
            files,
        )
        .await
    }

    pub async fn edit_message(
        &self,
        channel: ChannelId,
        message: MessageId,
        edit: &EditMessage,
    ) -> Result<Message, RestError> {
        let path = format!("/channels/{channel}/messages/{message}");
        self.send(Method::PATCH, &path, edit, &[]).await
    }

    /// A public thread started from `message` (its id becomes the thread's id). Long names are cut to
    /// Discord's 100 characters.
    pub async fn start_thread(
        &self,
        channel: ChannelId,
        message: MessageId,
        name: &str,
    ) -> Result<GuildChannel, RestError> {
        let name: String = name.chars().take(THREAD_NAME_MAX).collect();
        let path = format!("/channels/{channel}/messages/{message}/threads");
        self.send(
            Method::POST,
            &path,
            &json!({"name": name, "auto_archive_duration": 1440}),
            &[],
        )
        .await
    }

    /// A private thread in `channel` (type 12, not started from a message): only the people added to it
    /// (and moderators) see it, and members cannot invite others.
    pub async fn start_private_thread(
        &self,
        channel: ChannelId,
        name: &str,
    ) -> Result<GuildChannel, RestError> {
        let name: String = name.chars().take(THREAD_NAME_MAX).collect();
        let path = format!("/channels/{channel}/threads");
        let body = json!({
            "name": name,
            "type": 12,
            "invitable": false,
            "auto_archive_duration": 1440,
        });
        self.send(Method::POST, &path, &body, &[]).await
    }

    /// Adds `user` to a thread (how a private thread's people get to see it).
    pub async fn add_thread_member(
        &self,
        thread: ChannelId,
        user: UserId,
    ) -> Result<(), RestError> {
        let path = format!("/channels/{thread}/thread-members/{user}");
        self.call::<Value>(Method::PUT, &path, None, &[])
            .await
            .map(drop)
    }

    /// Pins `message` in its channel (the task's live status stays at the top of the thread's pins).
    pub async fn pin_message(
        &self,
        channel: ChannelId,
        message: MessageId,
    ) -> Result<(), RestError> {
        let path = format!("/channels/{channel}/pins/{message}");
        self.call::<Value>(Method::PUT, &path, None, &[])
            .await
            .map(drop)
    }

    pub async fn channel(&self, channel: ChannelId) -> Result<Channel, RestError> {
        self.call(Method::GET, &format!("/channels/{channel}"), None, &[])
            .await
    }
}

/// A multipart body as Discord wants it: `payload_json` with an `attachments` entry per file (`id` = its
/// index), and the files as `files[n]`.
fn multipart(body: Option<&Value>, files: &[Upload]) -> reqwest::multipart::Form {
    let mut payload = body.cloned().unwrap_or_else(|| json!({}));
    // An interaction response carries the message in `data`.
    let target = if payload.get("type").is_some() && payload.get("data").is_some() {
        &mut payload["data"]
    } else {
        &mut payload
    };
    let mut attachments: Vec<Value> = target["attachments"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    attachments.extend(
        files
            .iter()
            .enumerate()
            .map(|(i, f)| json!({"id": i, "filename": f.filename})),
    );
    target["attachments"] = Value::Array(attachments);
    let mut form = reqwest::multipart::Form::new().text("payload_json", payload.to_string());
    for (i, f) in files.iter().enumerate() {
        let part = reqwest::multipart::Part::bytes(f.data.clone()).file_name(f.filename.clone());
        form = form.part(format!("files[{i}]"), part);
    }
    form
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_fold_message_ids() {
        assert_eq!(
            bucket_key(&Method::PATCH, "/channels/1/messages/2"),
            bucket_key(&Method::PATCH, "/channels/1/messages/3")
        );
        assert_ne!(
            bucket_key(&Method::PATCH, "/channels/1/messages/2"),
            bucket_key(&Method::PATCH, "/channels/2/messages/2")
        );
        assert_ne!(
            bucket_key(&Method::PATCH, "/webhooks/1/t/messages/@original"),
            bucket_key(&Method::PATCH, "/webhooks/1/t/messages/5")
        );
    }

    #[test]
    fn debug_hides_the_token() {
        let r = Rest::with_base("http://x", Some(Secret::new("tok-123")), DEFAULT_MAX_WAIT);
        assert!(!format!("{r:?}").contains("tok-123"));
    }
}
