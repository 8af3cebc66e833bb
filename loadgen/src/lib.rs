//! `ct-loadgen`: the load generator and benchmarks for CodeTogether (issue 6).
//!
//! It opens real agent connections (fresh ed25519 keys paired through real one-time codes, full handshakes
//! over QUIC and WebSocket), keeps them alive on the agent's timing, answers tasks with synthetic Claude Code
//! output, and measures the relay, the real agent binary, and rathole beside them.
//!
//! How the crate is laid out, from the wire up:
//!
//! - [`tls`] and [`dial`]: reaching the relay as an agent does, from a chosen loopback address; the
//!   QUIC-first race.
//! - [`agent`]: one simulated agent: heartbeats, task output through `ct-agent`'s outbox, acknowledgements,
//!   reconnects with `ct-agent`'s backoff.
//! - [`fleet`]: pairing many agents and running them as owned tasks.
//! - [`relay`]: the relay under test, as a process (admin socket, signals) or in this process.
//! - [`procfs`]: memory, descriptors and CPU time from `/proc`.
//! - [`tcp`]: the iperf-like sink and pusher for tunnel throughput.
//! - [`scenario`]: the scenarios, each returning a typed outcome.
//! - [`bench`], [`report`], [`stats`]: running a plan and printing the table.
//!
//! Nothing here asserts a timing: scenarios return figures; the smoke test checks that they happened.

pub mod agent;
pub mod bench;
pub mod delay;
pub mod dial;
pub mod fleet;
pub mod procfs;
pub mod relay;
pub mod report;
pub mod scenario;
pub mod stats;
pub mod tcp;
pub mod tls;
