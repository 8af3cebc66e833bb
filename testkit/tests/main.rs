//! The test kit's own tests (the Discord simulator, the fake Messages API, the Claude Code sessions, nats-server), built as one binary.
//!
//! Each file here used to be its own test binary, and each of those linked the whole crate with tokio, rustls,
//! quinn and serenity: the workspace's ~30 test binaries took most of a clean build's disk and link time, and
//! CI ran out of disk. One binary per crate links once. `cargo test -p <crate> <file>::` still runs one file.

mod discord_sim;
mod fake_api;
mod nats;
mod one_shot;
mod postgres;
mod session;
