//! The relay's integration tests, built as one binary.
//!
//! Each file here used to be its own test binary, and each of those linked the whole crate with tokio, rustls,
//! quinn and serenity: the workspace's ~30 test binaries took most of a clean build's disk and link time, and
//! CI ran out of disk. One binary per crate links once. `cargo test -p <crate> <file>::` still runs one file.

mod audit;
mod binary;
mod connections;
mod discord;
mod endpoint;
mod event_writers;
mod files;
mod history;
mod installers;
mod layout;
mod limits;
mod per_user;
mod pools;
mod private_files;
mod projects;
mod queue;
mod shares;
mod store;
mod strangers;
mod support;
mod tasks;
mod web;
