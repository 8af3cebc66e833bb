//! The CodeTogether relay: the hosted server agents connect out to.
//!
//! - [`relay`]: lifecycle — bind from a [`RelayConfig`], run until a shutdown token fires, drain.
//! - [`endpoint`]: the agent endpoint — [`endpoint::quic`] (UDP) and [`endpoint::https`] (TCP: WebSocket,
//!   `/healthz`, `/readyz`, `/metrics`), both ending in [`endpoint::session`].
//! - [`store`]: what the relay keeps ([`store::records`]) and the operations on it, behind one interface
//!   ([`store::Store`]), with sled as the embedded backend; it imports nothing else of the relay.
//! - [`cluster`]: the NATS bus between the nodes of a cluster (subjects and bytes; what travels is the core's).
//! - [`durable`]: group commit, so acknowledgements wait for the disk without an fsync each.
//! - [`core`]: users, agents, pairing, shares, projects, tasks and their queues. One thread owns its state; front
//!   ends and sessions hold a cheap [`core::Core`] handle with async methods. Its folder has one file per concern.
//! - [`migrate`]: `ct-relay migrate`, an embedded relay's state into a cluster's database.
//! - [`admin`]: the local admin socket behind `ct-relay admin ...`.
//! - [`discord`]: the Discord bot's backend over the core, and starting the bot with the relay.
//! - [`tls`]: the relay key agents pin, and the certificate.
//! - [`ratelimit`]: token buckets per address and per user, bounded in memory.
//! - [`metrics`], [`files`]: supporting pieces; [`sys`]: the descriptor limit and the umask, the crate's only `unsafe`.
//! - [`cli`]: the command line, kept out of `main.rs` so it can be tested.

pub mod admin;
pub mod cli;
pub mod cluster;
pub mod core;
pub mod discord;
pub mod durable;
pub mod endpoint;
pub mod files;
pub mod metrics;
pub mod migrate;
pub mod ratelimit;
pub mod relay;
pub mod sessions;
pub mod store;
pub mod sys;
pub mod tls;
pub mod web;

// The core's concerns, where front ends and tests have always found them.
pub use crate::core::{
    audit, output, projects, redact, retention, routing, shares, tasks, worktrees,
};

pub use relay::{Relay, RelayConfig};
