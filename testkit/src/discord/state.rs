//! What the simulator remembers: every REST call, the guild's channels and threads with their messages,
//! registered commands, dispatched interactions and how each was answered, and the rate-limit buckets.
//!
//! All of it sits behind one mutex in the simulator's shared state; handlers take the lock, do their work, and release
//! it before any await, so a test reading state sees each call applied whole.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::model::{timestamp_now, Origin, SimUser};

/// One REST call the simulator received, with what it answered.
#[derive(Debug, Clone)]
pub struct Call {
    /// Position in arrival order, from 0.
    pub seq: usize,
    /// When it arrived; tests measure spacing between calls with it (a retry after a 429).
    pub at: Instant,
    pub method: String,
    /// Path below `/api/v10`, e.g. `/channels/123/messages`.
    pub path: String,
    pub query: Option<String>,
    /// The JSON body; for multipart requests, `payload_json` (or the text fields as an object).
    pub body: Value,
    /// Files of a multipart request.
    pub files: Vec<FilePart>,
    /// The status the simulator answered.
    pub status: u16,
    /// The JSON it answered with (`Null` for 204).
    pub response: Value,
}

impl Call {
    /// True when the call is `method` on a path matching `pattern`, where `*` stands for one segment:
    /// `call.is("POST", "/interactions/*/*/callback")`.
    pub fn is(&self, method: &str, pattern: &str) -> bool {
        self.method.eq_ignore_ascii_case(method) && path_matches(pattern, &self.path)
    }

    /// The callback `type` of an interaction callback, or of any body with a `type`.
    pub fn body_type(&self) -> Option<u64> {
        self.body["type"].as_u64()
    }
}

/// `*` matches exactly one path segment; everything else must be equal; segment counts must agree.
pub fn path_matches(pattern: &str, path: &str) -> bool {
    let p: Vec<_> = pattern.trim_matches('/').split('/').collect();
    let s: Vec<_> = path.trim_matches('/').split('/').collect();
    p.len() == s.len() && p.iter().zip(&s).all(|(p, s)| *p == "*" || p == s)
}

/// One file part of a multipart request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilePart {
    /// The form field, e.g. `files[0]`.
    pub field: String,
    pub filename: String,
    pub size: usize,
    pub content_type: Option<String>,
}

/// An attachment on a stored message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimAttachment {
    pub id: String,
    pub filename: String,
    pub size: usize,
}

/// A message as it stands now (after any edits).
#[derive(Debug, Clone)]
pub struct SimMessage {
    pub id: String,
    pub channel_id: String,
    pub author: SimUser,
    pub content: String,
    /// Array of embed objects, as sent.
    pub embeds: Value,
    /// Array of action rows, as sent.
    pub components: Value,
    pub attachments: Vec<SimAttachment>,
    pub flags: u64,
    /// How many times it was edited.
    pub edits: u32,
    /// Set for an interaction's response and follow-ups.
    pub interaction_id: Option<String>,
    /// Set for an application's (webhook) message.
    pub webhook_id: Option<String>,
    pub timestamp: String,
    pub edited_timestamp: Option<String>,
    /// The thread started from this message, if any.
    pub thread_id: Option<String>,
    /// The `nonce` it was created with, as a string (Discord accepts a string or a number).
    pub nonce: Option<String>,
    /// Pinned in its channel.
    pub pinned: bool,
}

impl SimMessage {
    /// True when the message is only visible to the person who used the interaction.
    pub fn is_ephemeral(&self) -> bool {
        self.flags & 64 != 0
    }

    /// Every `custom_id` on the message's components, in order.
    pub fn custom_ids(&self) -> Vec<String> {
        let mut ids = Vec::new();
        for row in self.components.as_array().into_iter().flatten() {
            for c in row["components"].as_array().into_iter().flatten() {
                if let Some(id) = c["custom_id"].as_str() {
                    ids.push(id.to_string());
                }
            }
        }
        ids
    }

    /// The message object Discord returns.
    pub fn json(&self, guild_id: &str) -> Value {
        let mut v = json!({
            "id": self.id,
            "channel_id": self.channel_id,
            "author": self.author.json(),
            "content": self.content,
            "timestamp": self.timestamp,
            "edited_timestamp": self.edited_timestamp,
            "tts": false,
            "mention_everyone": false,
            "mentions": [],
            "mention_roles": [],
            "mention_channels": [],
            "attachments": self.attachments.iter().map(|a| json!({
                "id": a.id,
                "filename": a.filename,
                "size": a.size,
                "url": format!("https://cdn.discordapp.com/attachments/{}/{}/{}", self.channel_id, a.id, a.filename),
                "proxy_url": format!("https://media.discordapp.net/attachments/{}/{}/{}", self.channel_id, a.id, a.filename),
            })).collect::<Vec<_>>(),
            "embeds": self.embeds,
            "components": self.components,
            "pinned": self.pinned,
            "type": if self.interaction_id.is_some() { 20 } else { 0 },
            "flags": self.flags,
        });
        if !self.author.bot {
            v["guild_id"] = json!(guild_id);
        }
        if let Some(w) = &self.webhook_id {
            v["webhook_id"] = json!(w);
            v["application_id"] = json!(w);
        }
        v
    }
}

/// A channel or thread in the simulated guild.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimChannel {
    pub id: String,
    /// 0 text, 11 public thread, 12 private thread.
    pub kind: u8,
    pub name: String,
    pub guild_id: String,
    pub parent_id: Option<String>,
    pub owner_id: Option<String>,
}

impl SimChannel {
    pub fn is_thread(&self) -> bool {
        matches!(self.kind, 10..=12)
    }

    pub fn json(&self) -> Value {
        let mut v = json!({
            "id": self.id,
            "type": self.kind,
            "guild_id": self.guild_id,
            "name": self.name,
            "position": 0,
            "permission_overwrites": [],
            "nsfw": false,
            "parent_id": self.parent_id,
            "last_message_id": null,
            "rate_limit_per_user": 0,
            "flags": 0,
        });
        if self.is_thread() {
            v["owner_id"] = json!(self.owner_id);
            v["message_count"] = json!(0);
            v["member_count"] = json!(1);
            v["total_message_sent"] = json!(0);
            v["thread_metadata"] = json!({
                "archived": false,
                "auto_archive_duration": 1440,
                "archive_timestamp": timestamp_now(),
                "locked": false,
                "create_timestamp": timestamp_now(),
            });
        } else {
            v["topic"] = Value::Null;
        }
        v
    }

    /// The partial channel an interaction carries.
    pub(crate) fn partial_json(&self) -> Value {
        json!({
            "id": self.id,
            "type": self.kind,
            "name": self.name,
            "guild_id": self.guild_id,
            "parent_id": self.parent_id,
            "permissions": "2251799813685247",
        })
    }
}

/// An interaction the simulator dispatched, and how the bot has answered it so far.
#[derive(Debug, Clone)]
pub struct SimInteraction {
    pub id: String,
    pub token: String,
    /// 2 command, 3 component, 4 autocomplete, 5 modal submit.
    pub kind: u8,
    pub origin: Origin,
    pub dispatched_at: Instant,
    /// The callback type of the initial response, once there is one.
    pub response_type: Option<u8>,
    /// The message `@original` refers to.
    pub original_message: Option<String>,
    /// For a component interaction: the message the component is on.
    pub message_id: Option<String>,
    /// Messages created through the webhook (follow-ups).
    pub followups: Vec<String>,
}

/// A scripted rate limit: the next `times` calls matching `method` + `pattern` get 429.
#[derive(Debug, Clone)]
pub(crate) struct RateRule {
    pub method: String,
    pub pattern: String,
    pub times: u32,
    pub retry_after: Duration,
    pub global: bool,
}

/// One rate-limit bucket's current window.
#[derive(Debug, Clone)]
pub(crate) struct Bucket {
    pub window_start: Instant,
    pub used: u32,
}

#[derive(Debug, Default)]
pub(crate) struct State {
    pub calls: Vec<Call>,
    pub channels: BTreeMap<String, SimChannel>,
    pub messages: BTreeMap<String, Vec<SimMessage>>,
    pub interactions: HashMap<String, SimInteraction>,
    pub global_commands: Vec<Value>,
    pub guild_commands: HashMap<String, Vec<Value>>,
    pub rate_rules: Vec<RateRule>,
    pub buckets: HashMap<String, Bucket>,
    pub users: BTreeMap<String, SimUser>,
    pub settings: super::Settings,
    /// Bytes of the files users attached ([`super::SimUpload`]), by attachment id: what the CDN serves.
    pub uploads: HashMap<String, Vec<u8>>,
}

impl State {
    pub fn message_mut(&mut self, channel: &str, id: &str) -> Option<&mut SimMessage> {
        self.messages
            .get_mut(channel)?
            .iter_mut()
            .find(|m| m.id == id)
    }

    pub fn find_message(&self, id: &str) -> Option<&SimMessage> {
        self.messages.values().flatten().find(|m| m.id == id)
    }

    pub fn interaction_by_token(&self, token: &str) -> Option<&SimInteraction> {
        self.interactions.values().find(|i| i.token == token)
    }

    /// The registered command called `name`: guild commands first, as Discord shows them.
    pub fn command_id(&self, guild: &str, name: &str) -> Option<String> {
        self.guild_commands
            .get(guild)
            .into_iter()
            .flatten()
            .chain(&self.global_commands)
            .find(|c| c["name"] == name)
            .and_then(|c| c["id"].as_str())
            .map(str::to_string)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_whole_segments() {
        assert!(path_matches(
            "/channels/*/messages",
            "/channels/12/messages"
        ));
        assert!(!path_matches(
            "/channels/*/messages",
            "/channels/12/messages/3"
        ));
        assert!(!path_matches(
            "/channels/*/messages/*",
            "/channels/12/messages"
        ));
        assert!(path_matches(
            "/interactions/*/*/callback",
            "/interactions/1/tok/callback"
        ));
        assert!(!path_matches("/users/@me", "/users/1"));
    }
}
