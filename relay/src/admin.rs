//! The admin socket: a Unix socket (mode 0600) in the data directory that `ct-relay admin ...` talks to.
//!
//! One JSON request per line, one JSON reply per line. Only the relay's own user can open the socket, so it
//! needs no further authentication; every request is logged, and every change it makes is in the audit log
//! with the actor [`OPERATOR`] (and the user it acted as).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio_util::codec::{FramedRead, LinesCodec, LinesCodecError};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::audit::{AuditEntry, AuditFilter, Caller, OPERATOR};
use crate::core::{AgentView, Core};
use crate::store::ShareLevel;
use crate::tasks::ReplyOutcome;

/// Longest request line accepted.
const MAX_REQUEST: usize = 64 * 1024;

/// What an operator can ask.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    /// Mint a pairing token for a Discord user.
    PairCode { user: String },
    /// Mint a one-time web dashboard sign-in link for a Discord user (what `/dashboard` gives them).
    DashboardLink { user: String },
    /// List agents.
    Agents,
    /// Revoke an agent by fingerprint or name.
    Revoke { agent: String },
    /// Addresses, key, counts.
    Status,
    /// The nodes of the cluster and the agents each holds.
    Cluster,
    /// Submit a task as a user and stream its events until it ends.
    Task {
        user: String,
        #[serde(default)]
        agent: Option<String>,
        project: String,
        prompt: String,
        #[serde(default)]
        options: ct_protocol::task::TaskOptions,
        /// The owner whose shared agents to use (`None`: the user's own).
        #[serde(default)]
        target: Option<String>,
        /// The user's display name.
        #[serde(default)]
        name: Option<String>,
    },
    /// Send a follow-up to a task as a user: `Done` when it went to the running task, otherwise the stream
    /// of the new task that resumes its session.
    Reply {
        user: String,
        task: String,
        prompt: String,
        #[serde(default)]
        name: Option<String>,
    },
    /// Share the user's agents with another user (all projects unless `projects` names some).
    ShareAdd {
        user: String,
        grantee: String,
        #[serde(default)]
        projects: Option<Vec<String>>,
        #[serde(default)]
        trusted: bool,
    },
    /// Stop sharing with a user, cancelling their tasks on the user's agents.
    ShareRemove { user: String, grantee: String },
    /// Whom the user shares with.
    ShareList { user: String },
    /// Who shares with the user.
    ShareAvailable { user: String },
    /// Add, remove or list projects on one of the user's agents (answered by the agent).
    Project {
        user: String,
        #[serde(default)]
        agent: Option<String>,
        op: ct_protocol::project::ProjectOp,
    },
    /// Set the agent used when the user names none.
    DefaultAgent { user: String, agent: String },
    /// Stream a task's events (from the start) until it ends.
    Follow { task: String },
    /// Cancel a task as a user.
    Cancel { user: String, task: String },
    /// Answer an approval request as a user.
    Decide {
        user: String,
        task: String,
        approval: String,
        decision: ct_protocol::task::Decision,
    },
    /// Merge, keep or discard a finished task's worktree branch, acting as a Discord user.
    Worktree {
        user: String,
        task: String,
        action: ct_protocol::task::WorktreeAction,
    },
    /// Mint a pairing token for a new worker of a pool (created if new).
    PoolCode { pool: String },
    /// Set who may use a pool (created if new).
    PoolAccess {
        pool: String,
        access: crate::store::PoolAccess,
    },
    /// Every pool with its workers and users.
    Pools,
    /// Drain a pool worker (or take it back into use with `undo`).
    PoolDrain {
        worker: String,
        #[serde(default)]
        undo: bool,
    },
    /// Read the audit log, newest first.
    Audit {
        #[serde(default)]
        filter: AuditFilter,
        #[serde(default = "default_audit_limit")]
        limit: usize,
        /// Only entries older than this sequence number (the next page).
        #[serde(default)]
        before: Option<u64>,
    },
}

fn default_audit_limit() -> usize {
    50
}

/// The relay's answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "kebab-case")]
pub enum Reply {
    PairCode {
        token: String,
        expires_at: u64,
        user: String,
    },
    DashboardLink {
        url: String,
        expires_in: u64,
        user: String,
    },
    Agents {
        agents: Vec<AgentView>,
    },
    Revoked {
        agent: AgentView,
    },
    Status(StatusInfo),
    Cluster {
        nodes: Vec<crate::core::nodes::NodeView>,
    },
    /// The first reply of a task stream.
    Task {
        task: String,
        state: crate::store::TaskState,
        /// The earlier task this one continues.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        follows: Option<String>,
    },
    /// One event of a task stream.
    Event {
        seq: u64,
        event: ct_protocol::task::TaskEvent,
    },
    /// The last reply of a task stream.
    End {
        state: crate::store::TaskState,
        message: Option<String>,
    },
    /// A request was carried out.
    Done {
        message: String,
    },
    Error {
        message: String,
    },
    Shares {
        shares: Vec<crate::store::ShareRecord>,
    },
    Available {
        available: Vec<crate::shares::Available>,
    },
    Projects {
        agent: Option<String>,
        report: ct_protocol::project::ProjectsReport,
    },
    Audit {
        entries: Vec<AuditEntry>,
    },
    PoolCode {
        pool: String,
        token: String,
        expires_at: u64,
    },
    Pool {
        pool: crate::store::PoolRecord,
    },
    Pools {
        pools: Vec<crate::core::pools::PoolView>,
    },
    Worker {
        worker: crate::core::pools::WorkerView,
    },
}

/// What `ct-relay admin status` shows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusInfo {
    pub version: String,
    /// This node's id (a relay of one has one too).
    #[serde(default)]
    pub node: String,
    /// "embedded (sled)" or "cluster (PostgreSQL + NATS)".
    #[serde(default)]
    pub mode: String,
    pub quic: Option<String>,
    pub https: Option<String>,
    pub public_addrs: Vec<String>,
    pub relay_fingerprint: String,
    /// Agents online on any node: every node reads them from the shared store (`admin cluster` has each
    /// node's own count; `admin status` on a node of a cluster shows both).
    pub agents_online: usize,
    pub agents_paired: usize,
    pub data_dir: String,
    pub discord_bot: bool,
}

/// The admin socket's path for a data directory.
pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join("admin.sock")
}

/// Binds the socket, refusing to steal it from a relay that is still running on the same data directory.
pub async fn bind(path: &Path) -> Result<UnixListener> {
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            anyhow::bail!(
                "another ct-relay is already running with this data directory (its admin socket {} answers): \
                 stop it first, or use another --data-dir",
                path.display()
            );
        }
        std::fs::remove_file(path).with_context(|| format!("removing stale {}", path.display()))?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves admin requests until `shutdown`.
pub async fn serve(
    listener: UnixListener,
    core: Core,
    status: StatusInfo,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) {
    loop {
        let stream = tokio::select! {
            s = listener.accept() => match s {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        let (core, status, shutdown) = (core.clone(), status.clone(), shutdown.clone());
        tasks.spawn(async move {
            tokio::select! {
                r = handle(stream, &core, &status) => if let Err(e) = r {
                    tracing::debug!(error = %e, "admin connection ended with an error");
                },
                () = shutdown.cancelled() => {}
            }
        });
    }
}

async fn handle(stream: UnixStream, core: &Core, status: &StatusInfo) -> Result<()> {
    let (read, mut write) = stream.into_split();
    let mut lines = FramedRead::new(read, LinesCodec::new_with_max_length(MAX_REQUEST));
    while let Some(line) = lines.next().await {
        let reply = match line {
            Err(LinesCodecError::MaxLineLengthExceeded) => Reply::Error {
                message: format!("request longer than {MAX_REQUEST} bytes"),
            },
            Err(e) => return Err(e.into()),
            Ok(line) => match serde_json::from_str::<Request>(&line) {
                Ok(Request::Task {
                    user,
                    agent,
                    project,
                    prompt,
                    options,
                    target,
                    name,
                }) => {
                    tracing::info!(%user, ?agent, ?target, %project, "admin task request");
                    let submit = crate::tasks::Submit {
                        user,
                        target,
                        agent,
                        name,
                        project,
                        prompt,
                        options,
                        resume: None,
                        operator: true,
                        roles: None,
                    };
                    match core.submit_task(submit).await {
                        Ok(rec) => {
                            stream_task(core, &rec.spec.task, &mut write).await?;
                            continue;
                        }
                        Err(e) => Reply::Error {
                            message: e.to_string(),
                        },
                    }
                }
                Ok(Request::Follow { task }) => {
                    stream_task(core, &task, &mut write).await?;
                    continue;
                }
                Ok(Request::Reply {
                    user,
                    task,
                    prompt,
                    name,
                }) => {
                    tracing::info!(%user, %task, "admin reply request");
                    match core
                        .reply(Caller::operator(&user), &task, prompt, name)
                        .await
                    {
                        Ok(ReplyOutcome::Sent(_)) => Reply::Done {
                            message: format!("sent to the running task {task}"),
                        },
                        Ok(ReplyOutcome::Resumed(new)) => {
                            stream_task(core, &new.spec.task, &mut write).await?;
                            continue;
                        }
                        Err(e) => Reply::Error {
                            message: e.to_string(),
                        },
                    }
                }
                Ok(Request::Project { user, agent, op }) => {
                    tracing::info!(%user, ?agent, ?op, "admin project request");
                    match core
                        .project(Caller::operator(&user), agent.as_deref(), op)
                        .await
                    {
                        Ok(report) => Reply::Projects { agent, report },
                        Err(e) => Reply::Error {
                            message: e.to_string(),
                        },
                    }
                }
                Ok(Request::Worktree { user, task, action }) => {
                    tracing::info!(%user, %task, ?action, "admin worktree request");
                    match core.worktree(Caller::operator(&user), &task, action).await {
                        Ok(outcome) if outcome.ok => Reply::Done {
                            message: outcome.message,
                        },
                        Ok(outcome) => {
                            let files = if outcome.conflicts.is_empty() {
                                String::new()
                            } else {
                                format!(
                                    "\nconflicting files:\n  {}",
                                    outcome.conflicts.join("\n  ")
                                )
                            };
                            Reply::Error {
                                message: format!("{}{files}", outcome.message),
                            }
                        }
                        Err(e) => Reply::Error {
                            message: e.to_string(),
                        },
                    }
                }
                Ok(req) => {
                    tracing::info!(request = ?req, "admin request");
                    answer(req, core, status).await
                }
                Err(e) => Reply::Error {
                    message: format!("malformed request: {e}"),
                },
            },
        };
        let mut out = serde_json::to_vec(&reply)?;
        out.push(b'\n');
        write.write_all(&out).await?;
    }
    Ok(())
}

async fn answer(req: Request, core: &Core, status: &StatusInfo) -> Reply {
    let result = match req {
        Request::PairCode { user } => {
            core.mint_pairing_token(&user)
                .await
                .map(|(token, expires_at)| Reply::PairCode {
                    token: token.to_string(),
                    expires_at,
                    user,
                })
        }
        Request::DashboardLink { user } => {
            // The operator's own link: minted straight in the store, not through the bot's front end (whose
            // per-user limit is for what people ask of it in Discord).
            let who = user.clone();
            let minted = core
                .read(move |store| crate::sessions::mint_link(store, &who, crate::store::now()))
                .await;
            return match minted {
                Ok(Ok(token)) => Reply::DashboardLink {
                    url: crate::sessions::link_url(core.config(), &token),
                    expires_in: crate::sessions::LINK_TTL.as_secs(),
                    user,
                },
                Ok(Err(e)) => Reply::Error {
                    message: e.to_string(),
                },
                Err(e) => Reply::Error {
                    message: e.to_string(),
                },
            };
        }
        Request::Agents => core.agents().await.map(|agents| Reply::Agents { agents }),
        Request::Revoke { agent } => match core.revoke(&agent, OPERATOR).await {
            Ok(rec) => core.agents().await.and_then(|views| {
                let view = views.into_iter().find(|a| a.fingerprint == rec.fingerprint);
                Ok(Reply::Revoked {
                    agent: view.ok_or_else(|| crate::core::CoreError::NoSuchAgent(agent))?,
                })
            }),
            Err(e) => Err(e),
        },
        Request::Status => core.agents().await.map(|agents| {
            Reply::Status(StatusInfo {
                agents_online: agents.iter().filter(|a| a.online).count(),
                agents_paired: agents.iter().filter(|a| !a.revoked).count(),
                ..status.clone()
            })
        }),
        Request::Cluster => core
            .cluster_nodes()
            .await
            .map(|nodes| Reply::Cluster { nodes }),
        Request::Cancel { user, task } => {
            return match core.cancel_task(Caller::operator(&user), &task).await {
                Ok(_) => Reply::Done {
                    message: format!("asked the agent to cancel {task}"),
                },
                Err(e) => Reply::Error {
                    message: e.to_string(),
                },
            }
        }
        Request::Decide {
            user,
            task,
            approval,
            decision,
        } => {
            return match core
                .decide(Caller::operator(&user), &task, &approval, decision)
                .await
            {
                Ok(()) => Reply::Done {
                    message: format!("decision on {approval} sent to the agent"),
                },
                Err(e) => Reply::Error {
                    message: e.to_string(),
                },
            }
        }
        Request::ShareAdd {
            user,
            grantee,
            projects,
            trusted,
        } => {
            let level = if trusted {
                ShareLevel::Trusted
            } else {
                ShareLevel::Standard
            };
            return match core
                .share_add(Caller::operator(&user), &grantee, projects, level)
                .await
            {
                Ok(share) => Reply::Done {
                    message: format!(
                        "user {grantee} may now run tasks on your agents ({}, {})",
                        share.projects.map_or("all projects".into(), |p| format!(
                            "projects: {}",
                            p.join(", ")
                        )),
                        match share.level {
                            ShareLevel::Standard => "you decide their approvals",
                            ShareLevel::Trusted => "trusted: they decide their own approvals",
                        }
                    ),
                },
                Err(e) => Reply::Error {
                    message: e.to_string(),
                },
            };
        }
        Request::ShareRemove { user, grantee } => {
            return match core.share_remove(Caller::operator(&user), &grantee).await {
                Ok(removed) => Reply::Done {
                    message: format!(
                        "stopped sharing with user {grantee}: {} queued task(s) cancelled, {} running task(s) being cancelled",
                        removed.tasks.cancelled.len(),
                        removed.tasks.stopping.len()
                    ),
                },
                Err(e) => Reply::Error {
                    message: e.to_string(),
                },
            };
        }
        Request::ShareList { user } => {
            return match core.shares_of(&user).await {
                Ok(shares) => Reply::Shares { shares },
                Err(e) => Reply::Error {
                    message: e.to_string(),
                },
            };
        }
        Request::ShareAvailable { user } => {
            return match core.shares_available(&user).await {
                Ok(available) => Reply::Available { available },
                Err(e) => Reply::Error {
                    message: e.to_string(),
                },
            };
        }
        Request::DefaultAgent { user, agent } => {
            return match core
                .set_default_agent(Caller::operator(&user), &agent)
                .await
            {
                Ok(rec) => Reply::Done {
                    message: format!(
                        "{} is now your default agent: tasks that name no agent run there",
                        rec.name
                    ),
                },
                Err(e) => Reply::Error {
                    message: e.to_string(),
                },
            };
        }
        Request::PoolCode { pool } => {
            return match core.pool_pairing_token(&pool).await {
                Ok((token, expires_at)) => Reply::PoolCode {
                    pool,
                    token: token.to_string(),
                    expires_at,
                },
                Err(e) => Reply::Error {
                    message: e.to_string(),
                },
            };
        }
        Request::PoolAccess { pool, access } => {
            return match core.set_pool_access(&pool, access).await {
                Ok(pool) => Reply::Pool { pool },
                Err(e) => Reply::Error {
                    message: e.to_string(),
                },
            };
        }
        Request::Pools => {
            return match core.pools().await {
                Ok(pools) => Reply::Pools { pools },
                Err(e) => Reply::Error {
                    message: e.to_string(),
                },
            };
        }
        Request::PoolDrain { worker, undo } => {
            return match core.drain_worker(&worker, !undo).await {
                Ok(worker) => Reply::Worker { worker },
                Err(e) => Reply::Error {
                    message: e.to_string(),
                },
            };
        }
        Request::Audit {
            filter,
            limit,
            before,
        } => core
            .audit(&filter, limit, before)
            .await
            .map(|entries| Reply::Audit { entries }),
        Request::Task { .. }
        | Request::Follow { .. }
        | Request::Reply { .. }
        | Request::Project { .. }
        | Request::Worktree { .. } => {
            return Reply::Error {
                message: "task streams and agent requests are handled by the connection".into(),
            }
        }
    };
    result.unwrap_or_else(|e| Reply::Error {
        message: e.to_string(),
    })
}

async fn send_reply(write: &mut tokio::net::unix::OwnedWriteHalf, reply: &Reply) -> Result<()> {
    let mut out = serde_json::to_vec(reply)?;
    out.push(b'\n');
    write.write_all(&out).await?;
    Ok(())
}

/// Streams a task: its stored events, then live ones, until it ends. A follower that falls behind the live
/// channel re-reads the gap from the store, so it still sees every event once, in order.
async fn stream_task(
    core: &Core,
    task: &str,
    write: &mut tokio::net::unix::OwnedWriteHalf,
) -> Result<()> {
    let (rec, events, mut live) = match core.follow(task).await {
        Ok(f) => f,
        Err(e) => {
            return send_reply(
                write,
                &Reply::Error {
                    message: e.to_string(),
                },
            )
            .await
        }
    };
    send_reply(
        write,
        &Reply::Task {
            task: task.to_string(),
            state: rec.state,
            follows: rec.follows.clone(),
        },
    )
    .await?;
    let mut last = 0;
    // The record was read before the log, so the log may already hold the end the record does not show yet.
    let mut ended = rec.state.is_final();
    for (seq, event) in events {
        ended |= matches!(event, ct_protocol::task::TaskEvent::Finished { .. });
        last = seq;
        send_reply(write, &Reply::Event { seq, event }).await?;
    }
    while !ended {
        let batch = match live.recv().await {
            Ok((seq, event)) if seq > last => vec![(seq, event)],
            Ok(_) => continue,
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                let task = task.to_string();
                core.read(move |store| store.events(&task, last)).await??
            }
            // The task was deleted (retention) while being followed: say so below.
            Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
        };
        for (seq, event) in batch {
            ended |= matches!(event, ct_protocol::task::TaskEvent::Finished { .. });
            last = seq;
            send_reply(write, &Reply::Event { seq, event }).await?;
        }
    }
    let reply = match core.task(task).await {
        Ok(rec) => Reply::End {
            state: rec.state,
            message: rec.message,
        },
        Err(e) => Reply::Error {
            message: format!("{e} (any more): it ended long enough ago to be deleted"),
        },
    };
    send_reply(write, &reply).await
}

/// Sends one request and passes each reply to `each` until it returns false or the relay stops answering.
pub async fn call_stream(
    data_dir: &Path,
    req: &Request,
    mut each: impl FnMut(Reply) -> bool,
) -> Result<()> {
    let path = socket_path(data_dir);
    let stream = UnixStream::connect(&path).await.with_context(|| {
        format!(
            "cannot reach a running relay through {}: is `ct-relay --data-dir {}` running (as this user)?",
            path.display(),
            data_dir.display()
        )
    })?;
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    write.write_all(&line).await?;
    let mut lines = FramedRead::new(read, LinesCodec::new_with_max_length(16 * 1024 * 1024));
    while let Some(line) = lines.next().await {
        if !each(serde_json::from_str(&line?)?) {
            break;
        }
    }
    Ok(())
}

/// Sends one request to a running relay and returns its reply.
pub async fn call(data_dir: &Path, req: &Request) -> Result<Reply> {
    let mut first = None;
    call_stream(data_dir, req, |reply| {
        first = Some(reply);
        false
    })
    .await?;
    first.context("the relay closed the admin connection without answering")
}
