//! Discord API v10 objects as JSON, built the way Discord sends them: snowflake ids as strings, ISO 8601
//! timestamps, and every field serenity 0.12.5 requires present (see shared/reference/discord.md).
//!
//! Also the test-side description of what a user does: [`SimUser`], [`Origin`] (who, in which guild and
//! channel), and [`SlashCommand`] / [`Opt`] for the options of a slash command or an autocomplete.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

/// Discord's epoch (2015-01-01T00:00:00Z) in Unix milliseconds; snowflakes count from it.
const DISCORD_EPOCH_MS: u64 = 1_420_070_400_000;

/// The default upload limit Discord reports in `attachment_size_limit` for a guild without boosts.
pub const DEFAULT_ATTACHMENT_SIZE_LIMIT: u64 = 10 * 1024 * 1024;

/// Hands out snowflakes: timestamp bits from the clock, and a counter in the low bits so two ids made in the
/// same millisecond still differ and still sort in creation order.
#[derive(Debug, Default)]
pub(crate) struct Snowflakes {
    counter: AtomicU64,
}

impl Snowflakes {
    pub(crate) fn next(&self) -> String {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let ms = unix_ms().saturating_sub(DISCORD_EPOCH_MS);
        // 22 low bits: worker, process and increment in real snowflakes; a counter here.
        ((ms << 22) | (n & 0x3f_ffff)).to_string()
    }
}

pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `2024-05-01T12:34:56.789000+00:00`, the form Discord uses.
pub(crate) fn timestamp_now() -> String {
    iso8601(unix_ms())
}

pub(crate) fn iso8601(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}000+00:00",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

/// Howard Hinnant's days-to-civil algorithm; avoids a date crate for one format.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// A Discord user the test acts as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimUser {
    pub id: String,
    pub name: String,
    pub bot: bool,
}

impl SimUser {
    pub(crate) fn json(&self) -> Value {
        json!({
            "id": self.id,
            "username": self.name,
            "discriminator": "0",
            "global_name": if self.bot { Value::Null } else { json!(self.name) },
            "avatar": null,
            "bot": self.bot,
            "public_flags": 0,
        })
    }

    /// A guild member object; `with_user` is false where Discord leaves the user out (MESSAGE_CREATE's
    /// `member`, `resolved.members`).
    pub(crate) fn member_json(&self, with_user: bool) -> Value {
        let mut m = json!({
            "nick": null,
            "avatar": null,
            "roles": [],
            "joined_at": iso8601(DISCORD_EPOCH_MS + 86_400_000 * 3000),
            "premium_since": null,
            "deaf": false,
            "mute": false,
            "flags": 0,
            "pending": false,
            // Send messages, embed links, attach files, use application commands, ...: a plain member.
            "permissions": "2248473465835073",
        });
        if with_user {
            m["user"] = self.json();
        }
        m
    }
}

/// Who does something, and where: a user in a guild channel (or a thread).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub user: SimUser,
    pub guild_id: String,
    pub channel_id: String,
}

/// A value given to a command option.
#[derive(Debug, Clone, PartialEq)]
pub enum OptValue {
    Str(String),
    Int(i64),
    Num(f64),
    Bool(bool),
    /// A user option: the id goes in `value`, the user in `data.resolved`.
    User(SimUser),
    /// An attachment option: the id goes in `value`, the attachment in `data.resolved.attachments`.
    Attachment(SimUpload),
}

/// A file a simulated user attached (see [`DiscordSim::upload`](super::DiscordSim::upload)): the simulator's
/// CDN serves its bytes at `url`'s path below the API base.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimUpload {
    pub id: String,
    pub filename: String,
    /// The size Discord reports (the real one, unless the test chose another).
    pub size: u64,
    pub content_type: Option<String>,
    pub url: String,
}

impl SimUpload {
    /// The attachment object, as Discord puts it in `resolved.attachments` and in a message.
    pub fn json(&self) -> Value {
        let mut v = json!({
            "id": self.id,
            "filename": self.filename,
            "size": self.size,
            "url": self.url,
            "proxy_url": self.url.replace("https://cdn.discordapp.com", "https://media.discordapp.net"),
        });
        if let Some(t) = &self.content_type {
            v["content_type"] = json!(t);
        }
        v
    }
}

impl OptValue {
    fn type_code(&self) -> u8 {
        match self {
            Self::Str(_) => 3,
            Self::Int(_) => 4,
            Self::Bool(_) => 5,
            Self::User(_) => 6,
            Self::Attachment(_) => 11,
            Self::Num(_) => 10,
        }
    }

    fn json(&self) -> Value {
        match self {
            Self::Str(s) => json!(s),
            Self::Int(i) => json!(i),
            Self::Num(n) => json!(n),
            Self::Bool(b) => json!(b),
            Self::User(u) => json!(u.id),
            Self::Attachment(a) => json!(a.id),
        }
    }
}

/// One option in a slash command or autocomplete interaction.
#[derive(Debug, Clone, PartialEq)]
pub struct Opt {
    pub name: String,
    kind: OptKind,
}

#[derive(Debug, Clone, PartialEq)]
enum OptKind {
    Sub(Vec<Opt>),
    Group(Vec<Opt>),
    Value { value: OptValue, focused: bool },
}

impl Opt {
    pub fn str(name: &str, value: &str) -> Self {
        Self::value(name, OptValue::Str(value.into()))
    }
    pub fn int(name: &str, value: i64) -> Self {
        Self::value(name, OptValue::Int(value))
    }
    pub fn bool(name: &str, value: bool) -> Self {
        Self::value(name, OptValue::Bool(value))
    }
    pub fn user(name: &str, user: &SimUser) -> Self {
        Self::value(name, OptValue::User(user.clone()))
    }
    pub fn attachment(name: &str, file: &SimUpload) -> Self {
        Self::value(name, OptValue::Attachment(file.clone()))
    }
    pub fn value(name: &str, value: OptValue) -> Self {
        Self {
            name: name.into(),
            kind: OptKind::Value {
                value,
                focused: false,
            },
        }
    }
    /// The option being typed in an autocomplete interaction (Discord sends the partial text as a string).
    pub fn focused(name: &str, partial: &str) -> Self {
        Self {
            name: name.into(),
            kind: OptKind::Value {
                value: OptValue::Str(partial.into()),
                focused: true,
            },
        }
    }
    pub fn sub(name: &str, options: impl IntoIterator<Item = Opt>) -> Self {
        Self {
            name: name.into(),
            kind: OptKind::Sub(options.into_iter().collect()),
        }
    }
    pub fn group(name: &str, subcommand: Opt) -> Self {
        Self {
            name: name.into(),
            kind: OptKind::Group(vec![subcommand]),
        }
    }

    fn json(&self, resolved: &mut Resolved) -> Value {
        match &self.kind {
            OptKind::Sub(opts) => json!({
                "name": self.name, "type": 1,
                "options": opts.iter().map(|o| o.json(resolved)).collect::<Vec<_>>(),
            }),
            OptKind::Group(opts) => json!({
                "name": self.name, "type": 2,
                "options": opts.iter().map(|o| o.json(resolved)).collect::<Vec<_>>(),
            }),
            OptKind::Value { value, focused } => {
                match value {
                    OptValue::User(u) => resolved.users.push(u.clone()),
                    OptValue::Attachment(a) => resolved.attachments.push(a.clone()),
                    _ => {}
                }
                let mut v =
                    json!({"name": self.name, "type": value.type_code(), "value": value.json()});
                if *focused {
                    v["focused"] = json!(true);
                }
                v
            }
        }
    }
}

/// What a command's options refer to, for `data.resolved`.
#[derive(Default)]
struct Resolved {
    users: Vec<SimUser>,
    attachments: Vec<SimUpload>,
}

/// A slash command as a user invokes it: `/project add name:web path:/src/web`.
#[derive(Debug, Clone, PartialEq)]
pub struct SlashCommand {
    pub name: String,
    pub options: Vec<Opt>,
}

impl SlashCommand {
    pub fn new(name: &str) -> Self {
        Self {
            name: name.into(),
            options: Vec::new(),
        }
    }
    /// Adds a top-level option.
    pub fn opt(mut self, opt: Opt) -> Self {
        self.options.push(opt);
        self
    }
    /// Invokes subcommand `name` with `options`.
    pub fn sub(self, name: &str, options: impl IntoIterator<Item = Opt>) -> Self {
        self.opt(Opt::sub(name, options))
    }

    /// `data` of an application-command interaction. `command_id` is the id Discord gave the registered
    /// command.
    pub(crate) fn data_json(&self, command_id: &str, guild_id: &str) -> Value {
        let mut resolved = Resolved::default();
        let options: Vec<Value> = self.options.iter().map(|o| o.json(&mut resolved)).collect();
        let Resolved { users, attachments } = resolved;
        let mut data = json!({
            "id": command_id,
            "name": self.name,
            "type": 1,
            "options": options,
            "guild_id": guild_id,
        });
        if !users.is_empty() {
            let mut u = Map::new();
            let mut m = Map::new();
            for user in users {
                u.insert(user.id.clone(), user.json());
                m.insert(user.id.clone(), user.member_json(false));
            }
            data["resolved"] = json!({"users": u, "members": m});
        }
        if !attachments.is_empty() {
            let a: Map<String, Value> = attachments
                .iter()
                .map(|a| (a.id.clone(), a.json()))
                .collect();
            if !data["resolved"].is_object() {
                data["resolved"] = json!({});
            }
            data["resolved"]["attachments"] = Value::Object(a);
        }
        data
    }
}

/// The fields every interaction has, whatever its type.
pub(crate) struct InteractionBase<'a> {
    pub id: &'a str,
    pub application_id: &'a str,
    pub token: &'a str,
    pub origin: &'a Origin,
    pub channel: Value,
    pub attachment_size_limit: u64,
}

pub(crate) fn interaction_json(base: &InteractionBase<'_>, kind: u8, data: Option<Value>) -> Value {
    let mut v = json!({
        "id": base.id,
        "application_id": base.application_id,
        "type": kind,
        "token": base.token,
        "version": 1,
        "guild_id": base.origin.guild_id,
        "channel_id": base.origin.channel_id,
        "channel": base.channel,
        "member": base.origin.user.member_json(true),
        "locale": "en-US",
        "guild_locale": "en-US",
        "entitlements": [],
        "attachment_size_limit": base.attachment_size_limit,
        // Everything a bot is usually granted in a guild channel, threads included.
        "app_permissions": "2251799813685247",
        "authorizing_integration_owners": {"0": base.origin.guild_id},
        "context": 0,
    });
    if let Some(data) = data {
        v["data"] = data;
    }
    v
}

/// `data` of a modal submit: one action row per text input, as Discord sends them back.
pub(crate) fn modal_data_json(custom_id: &str, fields: &[(&str, &str)]) -> Value {
    json!({
        "custom_id": custom_id,
        "components": fields.iter().map(|(id, value)| json!({
            "type": 1,
            "components": [{"type": 4, "custom_id": id, "value": value}],
        })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_iso8601_utc() {
        assert_eq!(iso8601(0), "1970-01-01T00:00:00.000000+00:00");
        assert_eq!(
            iso8601(1_420_070_400_000 + 1234),
            "2015-01-01T00:00:01.234000+00:00"
        );
        // A leap day.
        assert_eq!(
            iso8601(1_709_208_000_000),
            "2024-02-29T12:00:00.000000+00:00"
        );
    }

    #[test]
    fn snowflakes_are_unique_and_increasing() {
        let s = Snowflakes::default();
        let a: u64 = s.next().parse().unwrap();
        let b: u64 = s.next().parse().unwrap();
        assert!(b > a);
        // Timestamp bits decode back to roughly now.
        let ms = (b >> 22) + DISCORD_EPOCH_MS;
        assert!(unix_ms().abs_diff(ms) < 60_000);
    }
}
