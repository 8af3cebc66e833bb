//! The agent's integration tests, built as one binary.
//!
//! Each file here used to be its own test binary, and each of those linked the whole crate with tokio, rustls,
//! quinn and serenity: the workspace's ~30 test binaries took most of a clean build's disk and link time, and
//! CI ran out of disk. One binary per crate links once. `cargo test -p <crate> <file>::` still runs one file.

mod claude_runner;
mod cluster;
mod commands;
mod dashboard;
mod discord;
mod doctor;
mod e2e;
mod files_in;
mod history;
mod link;
mod pool;
mod pool_discord;
mod project_cli;
mod sandbox;
mod service;
mod support;
mod tasks;
mod tool_output;
mod worktree;
