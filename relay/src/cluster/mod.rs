//! The message bus between the relay nodes of a cluster: NATS core subjects and request-reply, nothing of
//! our own. It knows subjects and bytes only; what travels on it, and what a node does with it, is the core's
//! (`core::remote`).
//!
//! - `ct.agent.<fingerprint in hex>`: the node holding an agent's session subscribes to it for as long as the session
//!   lives. Another node reaches the agent by publishing there (a task to dispatch, a decision, a cancel) or
//!   by a request (a project request, whose answer comes back as the reply). A request nobody subscribes to
//!   fails at once with "no responders": the fast way to learn that no node holds the agent.
//! - `ct.task.<id>`: after a node stores a task's events it publishes the last sequence number there. Nodes
//!   with followers of the task read what they have not seen from the shared store, so a lost notice loses
//!   nothing (the next notice, or the periodic check, catches up).
//! - `ct.bot.scan`: a node that left a Discord thread for the leading node to open (see `ct_bot::leader`)
//!   publishes here, empty; every node subscribes, and the one that leads looks for such threads at once
//!   instead of at its next scan, which a lost message only waits for.
//!
//! Publishing from the core's own thread (which is not async) goes through a bounded queue to a pump task
//! ([`Publisher`]): the thread never waits for the network.
//!
//! Every payload is sealed with the cluster's key ([`seal`]): a message a node did not send, or one it sent
//! for another subject or long ago, never reaches the core.

mod seal;

pub use seal::{Refused, Seal, MAX_AGE};

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use futures_util::Stream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use seal::{Replays, RequestTag};

/// Messages waiting for the pump. A burst beyond this (NATS unreachable for long) is dropped with a warning:
/// every message on the bus is a hint that a later one, or a periodic check, repeats.
const PUBLISH_QUEUE: usize = 16_384;

/// Subjects name agents by their fingerprint's bytes in hex and tasks by id; a task id that is not safe in a
/// subject (dots, spaces, wildcards) is refused rather than published somewhere unexpected.
fn token_ok(token: &str) -> bool {
    !token.is_empty()
        && token.len() <= 128
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The subject of the node holding the agent whose key has the fingerprint `agent`.
pub fn agent_subject(agent: &[u8; 32]) -> String {
    format!("ct.agent.{}", hex::encode(agent))
}

/// The subject on which the node leading the Discord bot is asked to look for threads to open now.
pub const BOT_SCAN_SUBJECT: &str = "ct.bot.scan";

/// The subject on which a task's new events are announced.
pub fn task_subject(task: &str) -> Option<String> {
    token_ok(task).then(|| format!("ct.task.{task}"))
}

/// The client options for `url`, with the credentials it carries, and the URL without them (for logs and
/// errors). async-nats connects to a URL's host but does not send its `user:password@` or `token@` part, so
/// they are taken out here and given as options; without this, a NATS that requires authentication
/// refuses every node.
fn nats_options(url: &str) -> anyhow::Result<(async_nats::ConnectOptions, String)> {
    // As async-nats reads it: `HOST:PORT` alone means nats://HOST:PORT.
    let full = if url.contains("://") {
        url.to_string()
    } else {
        format!("nats://{url}")
    };
    let mut parsed = url::Url::parse(&full)
        .ok()
        .filter(|u| matches!(u.scheme(), "nats" | "tls" | "ws" | "wss") && u.has_host())
        .ok_or_else(|| {
            anyhow::anyhow!("--nats-url / CT_NATS_URL is not a NATS URL: give nats://HOST:4222")
        })?;
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8()
            .map(|s| s.into_owned())
            .map_err(|_| anyhow::anyhow!("--nats-url / CT_NATS_URL: credentials are not UTF-8"))
    };
    let user = decode(parsed.username())?;
    let password = parsed.password().map(decode).transpose()?;
    let options = match (user.is_empty(), password) {
        (false, Some(password)) => async_nats::ConnectOptions::with_user_and_password(user, password),
        (false, None) => async_nats::ConnectOptions::with_token(user),
        (true, Some(_)) => anyhow::bail!(
            "--nats-url / CT_NATS_URL has a password but no user: give nats://USER:PASSWORD@HOST:4222"
        ),
        (true, None) => async_nats::ConnectOptions::new(),
    };
    // Setting these cannot fail on a URL that has a host, which a NATS URL must.
    let _ = parsed.set_username("");
    let _ = parsed.set_password(None);
    Ok((options, parsed.to_string()))
}

/// A connection to NATS, shared by everything on one node.
#[derive(Debug, Clone)]
pub struct Bus {
    client: async_nats::Client,
    publisher: Publisher,
    seal: Seal,
}

/// Publishes without waiting, from any thread.
#[derive(Debug, Clone)]
pub struct Publisher {
    queue: mpsc::Sender<(String, Bytes)>,
    seal: Seal,
}

impl Publisher {
    /// Queues `payload` for `subject`. `false` when the queue is full (NATS has been unreachable for a while).
    pub fn publish(&self, subject: String, payload: Bytes) -> bool {
        // Sealed now rather than by the pump: the seal time is when the node decided to send it.
        let sealed = self.seal.seal(&subject, &payload);
        match self.queue.try_send((subject, sealed)) {
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
    /// Connects to NATS at `url` as `node`, sealing and checking every message with `seal`. The relay starts even when NATS is down: the client keeps
    /// retrying with backoff (and so does every reconnect later), and [`Bus::connected`] says how it stands,
    /// which `/readyz` reports. The pump task stops with `shutdown`.
    pub async fn connect(
        url: &str,
        node: &str,
        seal: Seal,
        shutdown: CancellationToken,
        tasks: &TaskTracker,
    ) -> anyhow::Result<Self> {
        let (options, shown) = nats_options(url)?;
        let client = options
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
            // The URL without its credentials: they went into the options, and nothing else needs to hold them.
            .connect(shown.as_str())
            .await
            .with_context(|| format!("connecting to NATS at {shown}"))?;
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
            publisher: Publisher {
                queue,
                seal: seal.clone(),
            },
            seal,
        })
    }

    pub fn publisher(&self) -> Publisher {
        self.publisher.clone()
    }

    /// Waits, at most `within`, until NATS has taken in everything this node sent it so far (a subscription
    /// included): after this, a message another node publishes reaches that subscription. Whether it did.
    pub async fn settled(&self, within: Duration) -> bool {
        matches!(
            tokio::time::timeout(within, self.client.flush()).await,
            Ok(Ok(()))
        )
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
        let (sealed, tag) = self.seal.seal_request(&subject, &payload);
        let request = async_nats::Request::new()
            .payload(sealed)
            .timeout(Some(timeout));
        match self.client.send_request(subject, request).await {
            Ok(message) => self
                .seal
                .open_reply(&tag, &message.payload)
                .map_err(|e| RequestError::Unavailable(format!("an answer was refused: {e}"))),
            Err(e) => Err(match e.kind() {
                Kind::NoResponders => RequestError::NoResponders,
                Kind::TimedOut => RequestError::TimedOut(timeout),
                _ => RequestError::Unavailable(e.to_string()),
            }),
        }
    }

    /// Answers a request.
    pub async fn reply(&self, to: ReplyTo, payload: Bytes) {
        let sealed = self.seal.seal_reply(&to.request, &payload);
        if let Err(e) = self.client.publish(to.subject, sealed).await {
            tracing::warn!(error = %e, "could not answer a request on the cluster bus");
        }
    }

    /// Subscribes to `subject` until the returned subscription is dropped. It yields only what a node of
    /// this cluster sealed for `subject` in the last [`MAX_AGE`], each message once.
    pub async fn subscribe(&self, subject: String) -> anyhow::Result<Subscription> {
        let inner = self
            .client
            .subscribe(subject.clone())
            .await
            .context("subscribing on the cluster bus")?;
        Ok(Subscription {
            inner,
            subject,
            seal: self.seal.clone(),
            replays: Replays::default(),
            warned: None,
        })
    }
}

/// A message from another node, opened.
#[derive(Debug)]
pub struct Message {
    pub payload: Bytes,
    /// Where the answer goes, for a request.
    pub reply: Option<ReplyTo>,
}

/// The inbox of a request, and the request's tag its answer is bound to.
#[derive(Debug)]
pub struct ReplyTo {
    subject: async_nats::Subject,
    request: RequestTag,
}

/// The messages on one subject that nodes of this cluster sealed for it. What is refused is dropped, with a
/// warning at most every [`WARN_EVERY`] per subscription, so a flood of forgeries cannot flood the log.
#[derive(Debug)]
pub struct Subscription {
    inner: async_nats::Subscriber,
    subject: String,
    seal: Seal,
    replays: Replays,
    warned: Option<Instant>,
}

const WARN_EVERY: Duration = Duration::from_secs(10);

impl Subscription {
    fn refused(&mut self, why: Refused) {
        if self.warned.is_some_and(|t| t.elapsed() < WARN_EVERY) {
            return;
        }
        self.warned = Some(Instant::now());
        tracing::warn!(subject = %self.subject, reason = %why, "refused a message on the cluster bus");
    }
}

impl Stream for Subscription {
    type Item = Message;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Message>> {
        loop {
            let message = match Pin::new(&mut self.inner).poll_next(cx) {
                Poll::Ready(Some(m)) => m,
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            };
            let this = &mut *self;
            let opened = this
                .seal
                .open(&this.subject, &message.payload)
                .and_then(|(body, tag)| match this.replays.first_now(tag) {
                    true => Ok((body, tag)),
                    false => Err(Refused::Replayed),
                });
            match opened {
                Ok((payload, request)) => {
                    return Poll::Ready(Some(Message {
                        payload,
                        reply: message.reply.map(|subject| ReplyTo { subject, request }),
                    }))
                }
                Err(why) => this.refused(why),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ct_testkit::nats::NatsServer;

    #[test]
    fn credentials_are_taken_out_of_the_url_and_decoded() {
        let (_, shown) = nats_options("nats://ct:p%40ss%20w@nats.example:4222").unwrap();
        assert_eq!(shown, "nats://nats.example:4222");
        let (_, shown) = nats_options("nats://s3cret-token@nats.example:4222").unwrap();
        assert_eq!(shown, "nats://nats.example:4222");
        let (_, shown) = nats_options("tls://nats.example").unwrap();
        assert_eq!(shown, "tls://nats.example");
        let refused = nats_options("nats://:only-a-password@nats.example:4222").unwrap_err();
        assert!(refused.to_string().contains("no user"), "{refused}");
        let (_, shown) = nats_options("nats.example:4222").unwrap();
        assert_eq!(shown, "nats://nats.example:4222");
        for bad in ["nats.example:4222 oops", "http://nats.example", "nats://"] {
            let refused = nats_options(bad).unwrap_err();
            assert!(
                refused.to_string().contains("nats://HOST:4222"),
                "{refused}"
            );
        }
    }

    async fn connected_within(url: &str, wait: Duration) -> bool {
        let (shutdown, tasks) = (CancellationToken::new(), TaskTracker::new());
        let seal = Seal::from_relay_secret(&[7; 32]);
        let bus = Bus::connect(url, "n1", seal, shutdown.clone(), &tasks)
            .await
            .unwrap();
        let deadline = Instant::now() + wait;
        while !bus.connected() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let connected = bus.connected();
        shutdown.cancel();
        connected
    }

    /// A NATS that requires a user and password admits a node whose URL carries them (percent-encoded, as
    /// in any URL), and no node without them or with a wrong password.
    #[tokio::test]
    async fn a_nats_that_requires_a_password_admits_the_url_that_carries_it() {
        let nats = NatsServer::start_with_user("ct", "p@ss w").unwrap();
        let port = nats.addr().port();
        let with = |creds: &str| format!("nats://{creds}127.0.0.1:{port}");
        assert!(connected_within(&with("ct:p%40ss%20w@"), Duration::from_secs(10)).await);
        assert!(!connected_within(&with("ct:wrong@"), Duration::from_secs(1)).await);
        assert!(!connected_within(&with(""), Duration::from_secs(1)).await);
    }
}
