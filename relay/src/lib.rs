//! The CodeTogether relay: the hosted server agents connect out to.
//!
//! - [`relay`]: lifecycle — bind from a [`RelayConfig`], run until a shutdown token fires, drain.
//! - [`endpoint`]: the agent endpoint — [`endpoint::quic`] (UDP) and [`endpoint::https`] (TCP: WebSocket,
//!   `/healthz`, `/readyz`, `/metrics`), both ending in [`endpoint::session`].
//! - [`core`]: pairing, admission, the live-agent table, revocation; what front ends call.
//! - [`tasks`]: task submission, each agent's queue, the sequenced event log, following, follow-ups, cancel,
//!   approvals.
//! - [`shares`]: sharing one's agents with another user, and revoking that at once.
//! - [`audit`]: the audit log — who did what to whose agents — and [`audit::Caller`], who is asking.
//! - [`output`]: the cap on what one task may store; [`redact`]: a grantee's task ends without the owner's
//!   folders in its message.
//! - [`retention`]: deleting old tasks, audit entries and pairing codes, hourly.
//! - [`routing`]: which agent a request goes to (named, only, or default).
//! - [`projects`]: project requests answered by the agent, and its stored project report.
//! - [`worktrees`]: merge, keep or discard a finished task's worktree branch: who may ask, and the agent's answer.
//! - [`store`]: the embedded sled store; [`durable`]: group commit, so acknowledgements wait for the disk
//!   without an fsync each.
//! - [`admin`]: the local admin socket behind `ct-relay admin ...`.
//! - [`discord`]: the Discord bot's backend over the core, and starting the bot with the relay.
//! - [`tls`]: the relay key agents pin, and the certificate.
//! - [`ratelimit`]: token buckets per address and per user, bounded in memory.
//! - [`metrics`], [`files`]: supporting pieces; [`sys`]: the descriptor limit and the umask, the crate's only `unsafe`.
//! - [`cli`]: the command line, kept out of `main.rs` so it can be tested.

pub mod admin;
pub mod audit;
pub mod cli;
pub mod core;
pub mod discord;
pub mod durable;
pub mod endpoint;
pub mod files;
pub mod metrics;
pub mod output;
pub mod projects;
pub mod ratelimit;
pub mod redact;
pub mod relay;
pub mod retention;
pub mod routing;
pub mod shares;
pub mod store;
pub mod sys;
pub mod tasks;
pub mod tls;
pub mod worktrees;

pub use relay::{Relay, RelayConfig};
