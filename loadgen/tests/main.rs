//! The load generator's integration tests, built as one binary (one link for the crate, as every crate in
//! the workspace has; see agent/tests/main.rs). `cargo test -p ct-loadgen --test loadgen <file>::` runs one
//! file.

mod failover;
mod smoke;
