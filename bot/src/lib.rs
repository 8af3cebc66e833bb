//! CodeTogether's Discord front end (`ct-bot`).
//!
//! The bot runs inside `ct-relay`. Layout, one module per concern:
//!
//! - [`config`]: [`BotConfig`] from the environment — gateway or HTTP-interactions delivery, guild,
//!   channel restriction, REST proxy; secrets never printed.
//! - [`commands`]: the slash command definitions and their registration (one guild or global).
//! - [`rest`]: [`Rest`], the bot's REST client: honours `X-RateLimit-*` headers and 429 `retry_after`
//!   itself, because serenity's own rate limiter is off when a proxy is set.
//! - [`gateway`]: connects a serenity client for a config and registers the commands on READY.
//! - [`respond`]: answer an interaction with the result of some work, deferring first when the work is
//!   slow, so the 3-second deadline is never missed.
//! - [`verify`]: HTTP-interactions mode — the ed25519 signature check and PING.
//! - [`mentions`]: every message the bot posts or edits pings nobody unless it says whom.
//! - [`split`]: assistant text into ≤ 2,000-character messages, code fences kept whole.
//! - [`render`]: what a task looks like in Discord — progress line and edit throttle, summary embed,
//!   approval buttons and menus, attachment-or-message for long output.
//! - [`custom_id`]: what a button, menu or modal means, encoded in its `custom_id` and parsed back.
//! - [`app`]: [`Bot`], the running front end: gateway events or HTTP interactions in, every task it spawns
//!   owned and stopped at shutdown.
//! - [`dispatch`]: what each command, button, menu, modal and thread message does, in backend calls.
//! - [`files`]: attached files: checked by their reported size, downloaded from Discord's CDN only, bounded.
//! - [`thread`]: a task's thread — which task of a follow-up chain it shows, and the follower posting the
//!   task's progress, text, approvals and summary there.
//! - [`leader`]: which node of a cluster runs the gateway and posts in task threads — a lease, renewed, with
//!   threads opened elsewhere handed over through their marks.
//! - [`backend`]: the [`Backend`] trait — everything the bot needs from the relay core, which the relay
//!   implements. Nothing in this crate depends on the relay.

pub mod app;
pub mod backend;
pub mod commands;
pub mod config;
pub mod custom_id;
pub mod dispatch;
pub mod files;
pub mod gateway;
pub mod leader;
pub mod mentions;
pub mod render;
pub mod respond;
pub mod rest;
pub mod split;
pub mod thread;
pub mod verify;

pub use app::Bot;
pub use backend::Backend;
pub use config::BotConfig;
pub use rest::Rest;
