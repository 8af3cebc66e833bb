//! Test support for running the real Claude Code CLI offline.
//!
//! - [`claude`]: where the two pinned CLI binaries are (the newest and the oldest supported) (installed by `testkit/claude/install.sh`) and the hermetic
//!   environment to run it in ([`ClaudeEnv`]).
//! - [`anthropic`]: [`FakeAnthropic`], a scripted fake of the Anthropic Messages API on 127.0.0.1:0 that the CLI
//!   is pointed at with `ANTHROPIC_BASE_URL`.
//! - [`process`]: [`ClaudeProcess`], a running `--output-format stream-json` CLI read as JSON events, with
//!   helpers for stream-json input and control responses.
//!
//! - [`browser`]: [`Browser`], a real headless Chromium driven over WebDriver (Debian's chromium and
//!   chromium-driver), for the web dashboard's end-to-end tests.
//! - [`job`]: [`LongJob`], a project script that keeps the Bash tool busy for cancel and interrupt tests.
//! - [`discord`]: [`DiscordSim`], a Discord simulator (REST + gateway + HTTP-interaction signing) that the
//!   bot runs against through `DISCORD_API_PROXY`.
//! - [`nats`]: [`NatsServer`], a real `nats-server` on loopback for the relay's cluster tests.
//! - [`ports`]: loopback ports a test can stop a server on and start it again (below the ephemeral range).
//! - [`postgres`]: [`PgServer`], a real throwaway PostgreSQL server on loopback (one shared per test binary, or
//!   one of a test's own to kill and restart), for the relay's PostgreSQL store and the cluster.
//! - [`udp_proxy`]: [`UdpProxy`], a loopback UDP forwarder a test can black-hole, so a QUIC link falls silent
//!   the way it does when a node dies.
//!
//! What the CLI was observed to do against the fake is written down in `testkit/CLAUDE-NOTES.md`.

pub mod anthropic;
pub mod browser;
pub mod claude;
pub mod discord;
pub mod job;
pub mod nats;
pub mod ports;
pub mod postgres;
pub mod process;
pub mod udp_proxy;
pub mod wait;

pub use anthropic::{FakeAnthropic, RecordedRequest, Reply, RequestKind};
pub use browser::Browser;
pub use claude::{claude_bin, ClaudeEnv, Cli, MIN_PINNED_VERSION, PINNED_VERSION};
pub use discord::DiscordSim;
pub use job::LongJob;
pub use nats::NatsServer;
pub use postgres::PgServer;
pub use process::{ClaudeProcess, SESSION_ARGS};
pub use udp_proxy::UdpProxy;
pub use wait::{eventually, eventually_async};
