//! The bot's configuration, from the environment.
//!
//! | variable | meaning |
//! |---|---|
//! | `DISCORD_TOKEN` | bot token: gateway mode, and the REST calls of either mode (threads, channel messages) |
//! | `DISCORD_PUBLIC_KEY` | application public key (hex): HTTP-interactions mode, signatures checked with it |
//! | `DISCORD_APPLICATION_ID` | required with `DISCORD_PUBLIC_KEY` (no READY tells us the id) |
//! | `DISCORD_GUILD_ID` | register commands in this guild (at once) instead of globally (up to an hour) |
//! | `DISCORD_CHANNEL_IDS` | comma-separated: answer only in these channels and their threads |
//! | `DISCORD_API_PROXY` | REST base URL instead of `https://discord.com` (a rate-limiting proxy, or the simulator) |
//! | `DISCORD_MESSAGE_CONTENT` | `0` to not ask for the privileged message-content intent (follow-ups then need `/reply`) |
//!
//! With neither a token nor a public key the bot is off, which is a normal way to run the relay.

use std::fmt;

use serenity::all::{ApplicationId, ChannelId, GuildId};

/// A secret string: usable, never printed by `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MASKED")
    }
}

/// How Discord delivers interactions to the bot. An application has one or the other.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// Over the gateway WebSocket the bot opens with its token.
    Gateway,
    /// As signed POSTs to the relay's interactions URL, checked with this public key (hex).
    Http { public_key: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BotConfig {
    pub delivery: Delivery,
    pub token: Option<Secret>,
    /// Known up front in HTTP mode; in gateway mode READY tells it.
    pub application_id: Option<ApplicationId>,
    pub guild_id: Option<GuildId>,
    /// Empty: everywhere.
    pub channel_ids: Vec<ChannelId>,
    pub api_proxy: Option<String>,
    pub message_content: bool,
    /// `DISCORD_PRIVATE_THREADS=1`: every task (otherwise only those run with `/task private:True`) gets a private thread that only its requester, the agent's
    /// owner (who decides approvals, or shares that with a trusted requester) and server moderators see, and
    /// its prompt is posted inside it rather than in the channel. Otherwise threads are public: everyone who
    /// can read the channel reads the task.
    pub private_threads: bool,
    /// This bot's node in a cluster of relays: the name it holds the Discord lease under (see
    /// [`crate::leader`]). Not read from the environment: the relay sets its own node id.
    pub node: String,
}

/// The node name of a bot nobody named (a relay of one names it after itself).
pub const DEFAULT_NODE: &str = "relay";

/// A configuration that cannot work; each message names the variable to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("{var}={value:?} is not a Discord id (a number like 123456789012345678)")]
    BadId { var: &'static str, value: String },
    #[error("DISCORD_PUBLIC_KEY needs DISCORD_APPLICATION_ID (the application id from the developer portal)")]
    NoApplicationId,
    #[error("DISCORD_PUBLIC_KEY is not a 64-hex-digit ed25519 public key")]
    BadPublicKey,
    #[error("DISCORD_API_PROXY={0:?} is not an http:// or https:// URL")]
    BadProxy(String),
}

fn id<T: From<std::num::NonZeroU64>>(var: &'static str, value: &str) -> Result<T, ConfigError> {
    value
        .trim()
        .parse::<std::num::NonZeroU64>()
        .map(T::from)
        .map_err(|_| ConfigError::BadId {
            var,
            value: value.to_string(),
        })
}

impl BotConfig {
    /// Reads the process environment. `Ok(None)`: the bot is off.
    pub fn from_env() -> Result<Option<Self>, ConfigError> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// Reads variables through `get` (tests pass a map). Empty values count as unset.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Option<Self>, ConfigError> {
        let get = |k: &str| get(k).filter(|v| !v.trim().is_empty());
        let token = get("DISCORD_TOKEN").map(|t| Secret::new(t.trim()));
        let delivery = match get("DISCORD_PUBLIC_KEY") {
            Some(key) => {
                let key = key.trim().to_ascii_lowercase();
                let bytes = hex::decode(&key).map_err(|_| ConfigError::BadPublicKey)?;
                let bytes: [u8; 32] = bytes.try_into().map_err(|_| ConfigError::BadPublicKey)?;
                ed25519_dalek::VerifyingKey::from_bytes(&bytes)
                    .map_err(|_| ConfigError::BadPublicKey)?;
                Delivery::Http { public_key: key }
            }
            None if token.is_some() => Delivery::Gateway,
            None => return Ok(None),
        };
        let application_id = get("DISCORD_APPLICATION_ID")
            .map(|v| id("DISCORD_APPLICATION_ID", &v))
            .transpose()?;
        if matches!(delivery, Delivery::Http { .. }) && application_id.is_none() {
            return Err(ConfigError::NoApplicationId);
        }
        let guild_id = get("DISCORD_GUILD_ID")
            .map(|v| id("DISCORD_GUILD_ID", &v))
            .transpose()?;
        let channel_ids = get("DISCORD_CHANNEL_IDS")
            .unwrap_or_default()
            .split(',')
            .filter(|s| !s.trim().is_empty())
            .map(|s| id("DISCORD_CHANNEL_IDS", s))
            .collect::<Result<_, _>>()?;
        let api_proxy = match get("DISCORD_API_PROXY") {
            Some(p) if p.starts_with("http://") || p.starts_with("https://") => {
                Some(p.trim_end_matches('/').to_string())
            }
            Some(p) => return Err(ConfigError::BadProxy(p)),
            None => None,
        };
        let message_content = !matches!(
            get("DISCORD_MESSAGE_CONTENT").as_deref().map(str::trim),
            Some("0" | "false" | "no" | "off")
        );
        let private_threads = matches!(
            get("DISCORD_PRIVATE_THREADS").as_deref().map(str::trim),
            Some("1" | "true" | "yes" | "on")
        );
        Ok(Some(Self {
            delivery,
            token,
            application_id,
            guild_id,
            channel_ids,
            api_proxy,
            message_content,
            private_threads,
            node: DEFAULT_NODE.into(),
        }))
    }

    /// A gateway-mode configuration (tests and embedders).
    pub fn gateway(token: &str) -> Self {
        Self {
            delivery: Delivery::Gateway,
            token: Some(Secret::new(token)),
            application_id: None,
            guild_id: None,
            channel_ids: Vec::new(),
            api_proxy: None,
            message_content: true,
            private_threads: false,
            node: DEFAULT_NODE.into(),
        }
    }

    /// The REST base URL below which `/api/v10/...` lives.
    pub fn api_base(&self) -> &str {
        self.api_proxy.as_deref().unwrap_or("https://discord.com")
    }

    /// Whether the bot answers in `channel`; a thread counts as its parent channel.
    pub fn allows_channel(&self, channel: ChannelId, parent: Option<ChannelId>) -> bool {
        self.channel_ids.is_empty()
            || self.channel_ids.contains(&channel)
            || parent.is_some_and(|p| self.channel_ids.contains(&p))
    }

    /// One line for the startup log: mode, scope and proxy, never a secret.
    pub fn describe(&self) -> String {
        let mode = match self.delivery {
            Delivery::Gateway => "gateway",
            Delivery::Http { .. } => "HTTP interactions",
        };
        let scope = self.guild_id.map_or_else(
            || "global commands".to_string(),
            |g| format!("commands in guild {g}"),
        );
        let channels = if self.channel_ids.is_empty() {
            String::new()
        } else {
            format!(", {} channel(s) only", self.channel_ids.len())
        };
        let proxy = self
            .api_proxy
            .as_deref()
            .map_or_else(String::new, |p| format!(", REST via {p}"));
        let threads = if self.private_threads {
            "private task threads"
        } else {
            "public task threads (DISCORD_PRIVATE_THREADS=1 for private ones)"
        };
        format!("Discord bot: {mode}, {scope}{channels}{proxy}, {threads}")
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    const KEY: &str = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a";

    fn load(vars: &[(&str, &str)]) -> Result<Option<BotConfig>, ConfigError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        BotConfig::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn off_without_token_or_key() {
        assert_eq!(load(&[]), Ok(None));
        assert_eq!(load(&[("DISCORD_TOKEN", "  ")]), Ok(None));
    }

    #[test]
    fn gateway_mode_with_everything() {
        let c = load(&[
            ("DISCORD_TOKEN", "abc.def"),
            ("DISCORD_GUILD_ID", "123456789012345678"),
            ("DISCORD_CHANNEL_IDS", "11, 22,"),
            ("DISCORD_API_PROXY", "http://127.0.0.1:9/"),
            ("DISCORD_MESSAGE_CONTENT", "0"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(c.delivery, Delivery::Gateway);
        assert_eq!(c.token.as_ref().unwrap().expose(), "abc.def");
        assert_eq!(c.guild_id, Some(GuildId::new(123_456_789_012_345_678)));
        assert_eq!(c.channel_ids, vec![ChannelId::new(11), ChannelId::new(22)]);
        assert_eq!(c.api_base(), "http://127.0.0.1:9");
        assert!(!c.message_content);
        assert!(c.allows_channel(ChannelId::new(11), None));
        assert!(
            c.allows_channel(ChannelId::new(99), Some(ChannelId::new(22))),
            "a thread of an allowed channel"
        );
        assert!(!c.allows_channel(ChannelId::new(99), None));
    }

    #[test]
    fn http_mode_needs_a_valid_key_and_the_application_id() {
        let c = load(&[
            ("DISCORD_PUBLIC_KEY", KEY),
            ("DISCORD_APPLICATION_ID", "42"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            c.delivery,
            Delivery::Http {
                public_key: KEY.into()
            }
        );
        assert_eq!(c.application_id, Some(ApplicationId::new(42)));
        assert!(c.token.is_none());
        assert_eq!(
            load(&[("DISCORD_PUBLIC_KEY", KEY)]),
            Err(ConfigError::NoApplicationId)
        );
        assert_eq!(
            load(&[
                ("DISCORD_PUBLIC_KEY", "abcd"),
                ("DISCORD_APPLICATION_ID", "42")
            ]),
            Err(ConfigError::BadPublicKey)
        );
    }

    #[test]
    fn bad_values_name_their_variable() {
        let err = load(&[("DISCORD_TOKEN", "t"), ("DISCORD_GUILD_ID", "general")]).unwrap_err();
        assert!(err.to_string().contains("DISCORD_GUILD_ID"), "{err}");
        let err = load(&[("DISCORD_TOKEN", "t"), ("DISCORD_CHANNEL_IDS", "1,x")]).unwrap_err();
        assert!(err.to_string().contains("DISCORD_CHANNEL_IDS"), "{err}");
        assert_eq!(
            load(&[("DISCORD_TOKEN", "t"), ("DISCORD_API_PROXY", "127.0.0.1:9")]),
            Err(ConfigError::BadProxy("127.0.0.1:9".into()))
        );
        assert!(load(&[("DISCORD_TOKEN", "t"), ("DISCORD_GUILD_ID", "0")]).is_err());
    }

    #[test]
    fn secrets_never_show_in_debug_or_describe() {
        let c = load(&[
            ("DISCORD_TOKEN", "super-secret-token"),
            ("DISCORD_API_PROXY", "http://p"),
        ])
        .unwrap()
        .unwrap();
        let shown = format!("{c:?} {}", c.describe());
        assert!(!shown.contains("super-secret-token"), "{shown}");
        assert!(shown.contains("MASKED"));
    }
}
