//! The CodeTogether agent: pairs this machine with a relay and keeps an outbound, authenticated link to it.
//!
//! How the crate is laid out, in the order a connection uses it:
//!
//! - [`config`]: the config directory (`0700`), the agent key (`agent.key`, `0600`, atomic writes) and
//!   `pairing.json`.
//! - [`pair`]: `ct-agent pair <token>`: new key, handshake with the token's one-time code, then persist.
//! - [`connect`]: reaching the relay: QUIC first, WebSocket/TLS raced after 500 ms, handshake, a [`Link`].
//! - [`tls`]: the TLS 1.3 client config (relay authenticated by the handshake, not the certificate) and the
//!   channel binding.
//! - [`proxy`]: HTTP CONNECT proxies for WebSocket (`https_proxy`, `no_proxy`).
//! - [`outbox`]: task events kept until the relay acknowledges them, re-sent after a reconnect.
//! - [`session`]: one session on a link: heartbeats, the dead-link timer, the dispatch of relay messages.
//! - [`attachments`]: files attached to a task, assembled, saved inside its folder, and named in its prompt.
//! - [`tasks`]: the task manager: policy checks, one Claude Code process per session, events through the
//!   outbox, warm processes for follow-ups, project requests from the relay.
//! - [`worktree`]: a git worktree and branch per task (`git` run through `tokio::process`), its diff, and
//!   merging, keeping or discarding it.
//! - [`backoff`]: the reconnect delays (quick first retry, full jitter, 30 s cap, reset after a healthy minute).
//! - [`run`]: `ct-agent run`: the reconnect loop, the move back to QUIC, status reporting, shutdown.
//! - [`status`]: `status.json` and the `ct-agent status` report.
//! - [`projects`]: allowed folders (`ALLOWED_PROJECT_DIRS`, `projects.json`), named projects, share policy.
//! - [`sandbox`]: bubblewrap around Claude Code, an allow-list: system folders read-only, an empty home with the
//!   requester's own Claude config, the project bound by descriptor, an allow-listed environment, own namespaces.
//! - [`meter`]: the local Messages API proxy for shared tasks: the real key added outside the sandbox, usage
//!   metered per grantee, the owner's budgets enforced (in total, or per UTC day or month).
//! - [`pool`]: a pool worker's (`ct-agent run --pool`) workspaces, one per user (`<workspaces>/users/<id>/`),
//!   project folders created, cloned and removed by descriptor, the quota, and the resource limits of its tasks.
//! - [`claude`]: running Claude Code: preflight, one stream-json process per session, approvals, cancel.
//! - [`service`]: `ct-agent service install|uninstall|status|logs`: systemd, launchd, WSL (systemd or a
//!   Windows logon task), rendered from the templates in `installers/`.
//! - [`doctor`]: `ct-agent doctor`: Claude Code, the relay over both transports, key, clock, folders, service.
//! - [`sys`]: host name and process liveness, the crate's only `unsafe` (libc calls).
//!
//! The binary (`main.rs`) only parses arguments, sets up logging and calls [`pair()`], [`run()`] or
//! [`status::gather`]; tests drive the same functions.

pub mod attachments;
pub mod backoff;
pub mod claude;
pub mod config;
pub mod connect;
pub mod doctor;
pub mod meter;
pub mod outbox;
pub mod pair;
pub mod pool;
pub mod projects;
pub mod proxy;
pub mod run;
pub mod sandbox;
pub mod service;
pub mod session;
pub mod status;
pub mod sys;
pub mod tasks;
pub mod tls;
pub mod worktree;

pub use config::{resolve_config_dir, AgentKey, ConfigDir, ConfigError, Pairing};
pub use connect::{ConnectError, ConnectOptions, Link, TransportPolicy};
pub use pair::{pair, pair_with, PairError, PairOutcome};
pub use run::{run, LinkStatus, RunError, RunOptions, EXIT_PERMANENT};
pub use status::{StatusFile, StatusReport};
