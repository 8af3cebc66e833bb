//! The message bus between the relay nodes of a cluster: NATS core subjects and request-reply, nothing of
//! our own. It knows subjects and bytes only; what travels on it, and what a node does with it, is the core's
//! (`core::remote`).
//!
//! - `ct.agent.<fingerprint>`: the node holding an agent's session subscribes to it for as long as the session
//!   lives. Another node reaches the agent by publishing there (a task to dispatch, a decision, a cancel) or
//!   by a request (a project request, whose answer comes back as the reply). A request nobody subscribes to
//!   fails at once with "no responders": the fast way to learn that no node holds the agent.
//! - `ct.task.<id>`: after a node stores a task's events it publishes the last sequence number there. Nodes
//!   with followers of the task read what they have not seen from the shared store, so a lost notice loses
//!   nothing (the next notice, or the periodic check, catches up).
//!
//! Publishing from the core's own thread (which is not async) goes through a bounded queue to a pump task
//! ([`Publisher`]): the thread never waits for the network.

use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use async_nats::Subscriber;

/// Messages waiting for the pump. A burst beyond this (NATS unreachable for long) is dropped with a warning:
/// every message on the bus is a hint that a later one, or a periodic check, repeats.
const PUBLISH_QUEUE: usize = 16_384;

/// Subjects name agents by fingerprint and tasks by id, both of which are safe in a subject (no dots, spaces
/// or wildcards); anything else is refused rather than published somewhere unexpected.
fn token_ok(token: &str) -> bool {
    !token.is_empty()
        && token.len() <= 128
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The subject of the node holding `agent` (a fingerprint in its text form).
pub fn agent_subject(agent: &str) -> Option<String> {
    token_ok(agent).then(|| format!("ct.agent.{agent}"))
}

/// The subject on which a task's new events are announced.
pub fn task_subject(task: &str) -> Option<String> {
    token_ok(task).then(|| format!("ct.task.{task}"))
}

/// A connection to NATS, shared by everything on one node.
#[derive(Debug, Clone)]
pub struct Bus {
    client: async_nats::Client,
    publisher: Publisher,
}

/// Publishes without waiting, from any thread.
#[derive(Debug, Clone)]
pub struct Publisher {
    queue: mpsc::Sender<(String, Bytes)>,
}

impl Publisher {
    /// Queues `payload` for `subject`. `false` when the queue is full (NATS has been unreachable for a while).
    pub fn publish(&self, subject: String, payload: Bytes) -> bool {
        match self.queue.try_send((subject, payload)) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "the cluster bus is not keeping up; a notice was dropped");
                false
            }
        }
    }
}

/// Why a request got no answer.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// Nobody subscribes to the subject: no node holds the agent.
    #[error("no node holds it")]
    NoResponders,
    #[error("no answer within {0:?}")]
    TimedOut(Duration),
    #[error("the cluster bus is unavailable: {0}")]
    Unavailable(String),
}

impl Bus {
    /// Connects to NATS at `url` as `node`. The relay starts even when NATS is down: the client keeps
    /// retrying with backoff (and so does every reconnect later), and [`Bus::connected`] says how it stands,
    /// which `/readyz` reports. The pump task stops with `shutdown`.
    pub async fn connect(
        url: &str,
        node: &str,
        shutdown: CancellationToken,
        tasks: &TaskTracker,
    ) -> anyhow::Result<Self> {
        let client = async_nats::ConnectOptions::new()
            .name(format!("ct-relay {node}"))
            // A node never needs its own notices: it has already acted on them.
            .no_echo()
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connection_timeout(Duration::from_secs(5))
            .ping_interval(Duration::from_secs(10))
            .request_timeout(Some(Duration::from_secs(10)))
            .reconnect_delay_callback(|attempts| {
                // 100 ms doubling to 5 s: quick after a blip, gentle during an outage.
                Duration::from_millis(100 << attempts.min(6)).min(Duration::from_secs(5))
            })
            .event_callback(|event| async move {
                match event {
                    async_nats::Event::Connected => tracing::info!("connected to NATS"),
                    async_nats::Event::Disconnected => {
                        tracing::warn!("lost NATS; reconnecting with backoff")
                    }
                    other => tracing::debug!(event = %other, "NATS"),
                }
            })
            .connect(url)
            .await
            .with_context(|| format!("connecting to NATS at {url}"))?;
        let (queue, mut rx) = mpsc::channel::<(String, Bytes)>(PUBLISH_QUEUE);
        let pump = client.clone();
        tasks.spawn(async move {
            loop {
                let next = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    next = rx.recv() => next,
                };
                let Some((subject, payload)) = next else {
                    break;
                };
                if let Err(e) = pump.publish(subject, payload).await {
                    tracing::warn!(error = %e, "could not publish on the cluster bus");
                }
            }
            // What was queued before shutdown still goes out (a drain's last notices).
            while let Ok((subject, payload)) = rx.try_recv() {
                let _ = pump.publish(subject, payload).await;
            }
            let _ = pump.flush().await;
        });
        Ok(Self {
            client,
            publisher: Publisher { queue },
        })
    }

    pub fn publisher(&self) -> Publisher {
        self.publisher.clone()
    }

    /// Whether the connection to NATS is up now.
    pub fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// A request to `subject`, answered by whoever subscribes to it.
    pub async fn request(
        &self,
        subject: String,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Bytes, RequestError> {
        use async_nats::RequestErrorKind as Kind;
        let request = async_nats::Request::new()
            .payload(payload)
            .timeout(Some(timeout));
        match self.client.send_request(subject, request).await {
            Ok(message) => Ok(message.payload),
            Err(e) => Err(match e.kind() {
                Kind::NoResponders => RequestError::NoResponders,
                Kind::TimedOut => RequestError::TimedOut(timeout),
                _ => RequestError::Unavailable(e.to_string()),
            }),
        }
    }

    /// Answers a request.
    pub async fn reply(&self, to: async_nats::Subject, payload: Bytes) {
        if let Err(e) = self.client.publish(to, payload).await {
            tracing::warn!(error = %e, "could not answer a request on the cluster bus");
        }
    }

    /// Subscribes to `subject` until the returned subscriber is dropped.
    pub async fn subscribe(&self, subject: String) -> anyhow::Result<Subscriber> {
        self.client
            .subscribe(subject)
            .await
            .context("subscribing on the cluster bus")
    }
}
